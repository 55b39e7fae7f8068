/* ============================================================================================
   >>moe:closer_look  diagnostics of "A Closer Look into MoE in LLMs" and routing statistics
   ============================================================================================
   Lo et al., arXiv 2406.18219 (§3-§5), in this library's convention: neuron i of a SwiGLU
   expert is row i of its gate matrix A (w_gate, (D, d)) and of its up matrix B (w_up), and
   column i of its down matrix O (w_down, (d, D)); the router's gate embedding of expert e is
   row e of router.w (E, d).
     two-pass protocol (§3): pass 1 is an ordinary moe_model_forward, which keeps every
       layer's FFN input (blocks[l].ln2) and the gate scores of every expert (the router's
       softmax, moe_layer.probs); pass 2, moe_expert_outputs, runs EVERY expert of layer l on
       those inputs (top-k = E) before gate weighting.
     norm-vs-score ranks (§4.2): per token, rank the experts by output L2 norm and by gate
       score; counts[rank_norm][rank_score] += 1 (ties: the lower expert index ranks first).
     similarities (§4.1, §5): cosine of flattened expert matrices, or of "neuron-averaged"
       vectors (the mean of an expert's neurons: order-invariant), the angular similarity
       1 - arccos(cos) / pi for averaging; mean output similarity over tokens.
     gate-vs-neuron regression (§4.3): over expert pairs m < n, X = cos of the gate embeddings,
       Y = cos of the neuron-averaged A (or B, or O) vectors; Pearson R and R^2.
     Kendall's tau (tau-b, with ties, as scipy.stats.kendalltau) for orders, e.g. a neuron
       permutation found by matching (§4.1).
   Also here: the routing statistics of the RMoE paper (arXiv 2408.06793 §4.3: inner and outer
   balance, the cross-layer mutual information of routing vectors) and the cosine similarity
   of adjacent layers' inputs that CQIL groups layers by (arXiv 2404.06709 §3.1).
   Diagnostics allocate what they need (they are not on the training path); anything asked
   of a dense layer, a layer without a linear router or experts without a gate matrix is a
   status with a sentence in m->err (or err). */

typedef enum moe_expert_matrix {
    MOE_MATRIX_ROUTER = 0, /* the gate embedding, router.w row e (E, d)         */
    MOE_MATRIX_GATE = 1,   /* A, w_gate (D, d) per expert: neurons are rows      */
    MOE_MATRIX_UP = 2,     /* B, w_up (D, d): neurons are rows                   */
    MOE_MATRIX_DOWN = 3    /* O, w_down (d, D): neurons are columns              */
} moe_expert_matrix;

/* cos(a, b) of two n-vectors in double; 0 when either is zero */
MOEDEF double moe_cosine(const float *a, const float *b, size_t n);
/* 1 - arccos(cos) / pi, cos clamped to [-1, 1] (arXiv 2406.18219 §5) */
MOEDEF double moe_angular_similarity(double cos);
/* Pearson correlation of n pairs; NaN when n < 2 or a side is constant */
MOEDEF double moe_pearson(const double *x, const double *y, size_t n);
/* Kendall's tau-b of n pairs (ties in x or y corrected as scipy.stats.kendalltau does); NaN
   when n < 2, a side is constant or memory runs out. O(n log n), 3n doubles of scratch. */
MOEDEF double moe_kendall_tau(const double *x, const double *y, size_t n);

/* Inner and outer balance of n tokens' routing probabilities probs (n, E): inner[t] =
   p_top1 / p_top2 (the denominator at least 1e-30), outer[t] = the sum of the k largest
   (arXiv 2408.06793 §4.3). E >= 2, 1 <= k <= E. */
MOEDEF moe_status moe_routing_balance(float *inner, float *outer, const float *probs, int n, int E, int k, moe_err *err);
/* The RMoE paper's cross-layer mutual information of n tokens, mi (n) in nats: token t's two
   routing vectors p, q (n, E) become labels a_e = bin of p_e, b_e = bin of q_e (bins equal-
   width on [0, 1], the last closed); the plug-in MI of the E label pairs (as sklearn's
   mutual_info_score): (1/E) sum_e ln(E n(a_e, b_e) / (n(a_e) n(b_e))). */
MOEDEF moe_status moe_routing_mi(double *mi, const float *p, const float *q, int n, int E, int bins, moe_err *err);

/* Pass 2 of the two-pass protocol on the last forward of m (B T tokens): out (B T, E, d) =
   every routed expert's output on layer l's stored FFN input, before gate weighting (shared
   experts are not among them); scores (B T, E) = the router's probabilities of that forward
   (softmax; sigmoid scores for sigmoid routers). Either may be NULL. AoE experts (no gate
   matrix of their own) are refused. */
MOEDEF moe_status moe_expert_outputs(float *out, float *scores, moe_model *m, int l);
/* counts (E, E) += per token, [rank of the expert by output norm][its rank by score] */
MOEDEF void moe_rank_count(int64_t *counts, const float *out, const float *scores, int n, int E, int d);
/* sim (E, E): mean over n tokens of cos (angular = 0) or the angular similarity (1) of the
   experts' outputs out (n, E, d) */
MOEDEF void moe_output_similarity(double *sim, const float *out, int n, int E, int d, int angular);
/* v (E, d): each expert's mean neuron of matrix `which` of layer l (ROUTER: its gate
   embedding row itself) */
MOEDEF moe_status moe_neuron_means(float *v, moe_model *m, int l, moe_expert_matrix which);
/* sim (E, E): cosine (angular: the angular similarity) of layer l's experts' matrix `which`,
   flattened (neuron_mean 0) or neuron-averaged (1); the router's rows either way */
MOEDEF moe_status moe_expert_similarity(double *sim, moe_model *m, int l, moe_expert_matrix which, int neuron_mean, int angular);
/* Pearson R (and R^2) over the E (E-1)/2 expert pairs of layer l between the gate embeddings'
   cosine and the neuron-averaged `which` vectors' cosine (arXiv 2406.18219 §4.3, Table 1) */
MOEDEF moe_status moe_gate_neuron_regression(double *R, double *R2, moe_model *m, int l, moe_expert_matrix which);
/* Similarity by depth: mean[l] = the mean over expert pairs m < n of moe_expert_similarity's
   cosine for every MoE layer, NaN for dense layers. (n_layers) values. */
MOEDEF moe_status moe_similarity_by_depth(double *mean, moe_model *m, moe_expert_matrix which, int neuron_mean);
/* cos (n_layers - 1): cos[l] = mean over the last forward's tokens of cos(x_l, x_{l+1}), x_l
   the residual stream entering layer l (CQIL, arXiv 2404.06709 §3.1, Figure 2). Run on the
   sequential model (inside a CQIL group every member's input is the group's). Dense models
   too. */
MOEDEF moe_status moe_layer_input_similarity(double *cos, moe_model *m);

/* @implementation */
/* ============================================================================================
   >>moe:closer_look
   ============================================================================================ */

MOE__IMPL double moe_cosine(const float *a, const float *b, size_t n) {
    double ab = 0.0, aa = 0.0, bb = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return aa > 0.0 && bb > 0.0 ? ab / sqrt(aa * bb) : 0.0;
}

MOE__IMPL double moe_angular_similarity(double cos) {
    cos = cos > 1.0 ? 1.0 : cos < -1.0 ? -1.0 : cos;
    return 1.0 - acos(cos) / 3.14159265358979323846;
}

MOE__IMPL double moe_pearson(const double *x, const double *y, size_t n) {
    double mx = 0.0, my = 0.0, sxy = 0.0, sxx = 0.0, syy = 0.0;
    size_t i;
    if (n < 2) return NAN;
    for (i = 0; i < n; i++) { mx += x[i]; my += y[i]; }
    mx /= (double)n;
    my /= (double)n;
    for (i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
        syy += (y[i] - my) * (y[i] - my);
    }
    return sxx > 0.0 && syy > 0.0 ? sxy / sqrt(sxx * syy) : NAN;
}

typedef struct moe__xy { double x, y; } moe__xy;

static int moe__cmp_xy(const void *p, const void *q) {
    const moe__xy *a = (const moe__xy *)p, *b = (const moe__xy *)q;
    if (a->x != b->x) return a->x < b->x ? -1 : 1;
    return (a->y > b->y) - (a->y < b->y);
}

/* merge sort of y counting strict inversions (pairs i < j with y_i > y_j) */
static uint64_t moe__inversions(double *y, double *tmp, size_t n) {
    size_t width, i;
    uint64_t inv = 0;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            size_t mid = i + width < n ? i + width : n, hi = i + 2 * width < n ? i + 2 * width : n;
            size_t p = i, q = mid, o = i;
            while (p < mid && q < hi) {
                if (y[q] < y[p]) { inv += mid - p; tmp[o++] = y[q++]; }
                else tmp[o++] = y[p++];
            }
            while (p < mid) tmp[o++] = y[p++];
            while (q < hi) tmp[o++] = y[q++];
        }
        memcpy(y, tmp, n * sizeof(double));
    }
    return inv;
}

/* tied pairs within runs of equal values of a sorted array */
static double moe__tied_pairs(const double *v, size_t n) {
    size_t i = 0, j;
    double t = 0.0;
    while (i < n) {
        for (j = i + 1; j < n && v[j] == v[i]; j++) {}
        t += 0.5 * (double)(j - i) * (double)(j - i - 1);
        i = j;
    }
    return t;
}

MOE__IMPL double moe_kendall_tau(const double *a, const double *b, size_t n) {
    /* Knight's O(n log n) tau-b, the algorithm of scipy.stats.kendalltau */
    moe__xy *p;
    double *y, *tmp, tot, xt, yt, jt = 0.0, dis, tau;
    size_t i = 0, j;
    if (n < 2) return NAN;
    p = (moe__xy *)MOE_MALLOC(n * sizeof *p);
    y = (double *)MOE_MALLOC(2 * n * sizeof(double));
    if (!p || !y) { MOE_FREE(p); MOE_FREE(y); return NAN; }
    tmp = y + n;
    for (i = 0; i < n; i++) { p[i].x = a[i]; p[i].y = b[i]; }
    qsort(p, n, sizeof *p, moe__cmp_xy);
    for (i = 0; i < n; i++) { y[i] = p[i].x; }
    xt = moe__tied_pairs(y, n);
    for (i = 0; i < n; i = j) { /* joint ties: equal (x, y) */
        for (j = i + 1; j < n && p[j].x == p[i].x && p[j].y == p[i].y; j++) {}
        jt += 0.5 * (double)(j - i) * (double)(j - i - 1);
    }
    for (i = 0; i < n; i++) y[i] = p[i].y;
    dis = (double)moe__inversions(y, tmp, n); /* y is now sorted */
    yt = moe__tied_pairs(y, n);
    tot = 0.5 * (double)n * (double)(n - 1);
    MOE_FREE(p);
    MOE_FREE(y);
    if (tot - xt <= 0.0 || tot - yt <= 0.0) return NAN;
    tau = (tot - xt - yt + jt - 2.0 * dis) / sqrt((tot - xt) * (tot - yt)); /* exactly +-1 at the ends */
    return tau;
}

MOE__IMPL moe_status moe_routing_balance(float *inner, float *outer, const float *probs, int n, int E, int k, moe_err *err) {
    int t;
    if (!inner || !outer || !probs || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing balance: NULL buffer or negative token count");
    if (E < 2 || k < 1 || k > E) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing balance needs E >= 2 and 1 <= k <= E, got E = %d, k = %d", E, k);
    for (t = 0; t < n; t++) {
        const float *p = probs + (size_t)t * E;
        float top1 = -1.0f, top2 = -1.0f, sum = 0.0f, prev = 0.0f;
        int j, i, prev_i = -1;
        for (i = 0; i < E; i++) {
            if (p[i] > top1) { top2 = top1; top1 = p[i]; }
            else if (p[i] > top2) top2 = p[i];
        }
        inner[t] = top1 / (top2 > 1e-30f ? top2 : 1e-30f);
        /* the k largest in descending order (ties: lower index first), summed in that order */
        for (j = 0; j < k; j++) {
            int best = -1;
            for (i = 0; i < E; i++) {
                int after = prev_i < 0 || p[i] < prev || (p[i] == prev && i > prev_i); /* not yet taken */
                if (after && (best < 0 || p[i] > p[best])) best = i;
            }
            if (best < 0) break; /* NaN scores */
            sum += p[best];
            prev = p[best];
            prev_i = best;
        }
        outer[t] = sum;
    }
    return MOE_OK;
}

static int moe__bin_of(float v, int bins) {
    int b = (int)(v * bins);
    return b < 0 ? 0 : b >= bins ? bins - 1 : b;
}

MOE__IMPL moe_status moe_routing_mi(double *mi, const float *p, const float *q, int n, int E, int bins, moe_err *err) {
    int t, i, j;
    if (!mi || !p || !q || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing MI: NULL buffer or negative token count");
    if (E < 1 || bins < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing MI needs E >= 1 and bins >= 1, got E = %d, bins = %d", E, bins);
    for (t = 0; t < n; t++) {
        const float *pt = p + (size_t)t * E, *qt = q + (size_t)t * E;
        double acc = 0.0;
        for (i = 0; i < E; i++) {
            int ai = moe__bin_of(pt[i], bins), bi = moe__bin_of(qt[i], bins), nab = 0, na = 0, nb = 0;
            for (j = 0; j < E; j++) {
                int aj = moe__bin_of(pt[j], bins), bj = moe__bin_of(qt[j], bins);
                na += aj == ai;
                nb += bj == bi;
                nab += aj == ai && bj == bi;
            }
            acc += log((double)E * nab / ((double)na * nb));
        }
        mi[t] = acc / E;
    }
    return MOE_OK;
}

/* layer l of m is an MoE layer whose experts (and router, when asked) can be read */
static moe_status moe__closer_check(moe_model *m, int l, int need_router) {
    const moe_layer *L;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    if (l < 0 || l >= m->cfg.n_layers) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "layer %d is outside the model's %d layers", l, m->cfg.n_layers);
    if (!m->blocks[l].is_moe)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d is a dense FFN: the expert diagnostics need an MoE layer (moe_every, dense_first)", l);
    L = &m->blocks[l].moe;
    if (need_router && L->id_router_w < 0)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d has no linear router (AoE): no gate embeddings to compare", l);
    if (need_router && L->cfg.router_dim != 0 && L->cfg.router_dim != m->cfg.d)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d's router reads a %d-wide GRU state or MLP, not x: its gate embeddings live in another space", l, L->cfg.router_dim);
    return MOE_OK;
}

MOE__IMPL moe_status moe_expert_outputs(float *out, float *scores, moe_model *m, int l) {
    moe_status st = moe__closer_check(m, l, 0);
    const moe_layer *L;
    moe_expert_weights w, we;
    int N, E, d, D, e, t, offset[2];
    float *y = NULL, *hg = NULL, *hu = NULL;
    if (st != MOE_OK) return st;
    if (m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "the two-pass protocol needs a forward first (pass 1 stores each layer's input)");
    L = &m->blocks[l].moe;
    N = m->B * m->T;
    E = L->cfg.n_experts;
    d = L->cfg.d;
    D = L->cfg.d_ff;
    if (scores) memcpy(scores, L->probs, sizeof(float) * (size_t)N * E);
    if (!out) return MOE_OK;
    w = moe_layer_experts(L, &m->S, 0, 0);
    if (L->cfg.expert == MOE_EXPERT_SWIGLU && !w.gate)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d: AoE experts take their gate from the router's low-rank cache; their outputs are not separable from routing", l);
    if (!MOE__ALLOC(y, (size_t)N * d, float) || !MOE__ALLOC(hg, (size_t)N * D, float) || !MOE__ALLOC(hu, (size_t)N * D, float)) {
        MOE_FREE(y); MOE_FREE(hg); MOE_FREE(hu);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the expert outputs of %d tokens", N);
    }
    offset[0] = 0;
    offset[1] = N;
    for (e = 0; e < E && st == MOE_OK; e++) { /* expert e as a bank of one on every token */
        we.gate = w.gate ? w.gate + (size_t)e * D * d : NULL;
        we.up = w.up + (size_t)e * D * d;
        we.down = w.down + (size_t)e * d * D;
        we.b_up = w.b_up ? w.b_up + (size_t)e * D : NULL;
        we.b_down = w.b_down ? w.b_down + (size_t)e * d : NULL;
        st = moe_experts_forward(y, hg, hu, m->blocks[l].ln2, &we, offset, 1, d, D, L->cfg.expert, L->cfg.activation, NULL);
        for (t = 0; st == MOE_OK && t < N; t++) memcpy(out + ((size_t)t * E + e) * d, y + (size_t)t * d, sizeof(float) * d);
    }
    MOE_FREE(y); MOE_FREE(hg); MOE_FREE(hu);
    if (st != MOE_OK) return moe_err_set(&m->err, st, "layer %d, expert outputs: %s", l, moe_status_string(st));
    return MOE_OK;
}

MOE__IMPL void moe_rank_count(int64_t *counts, const float *out, const float *scores, int n, int E, int d) {
    int t, e, j;
    for (t = 0; t < n; t++) {
        const float *o = out + (size_t)t * E * d, *s = scores + (size_t)t * E;
        for (e = 0; e < E; e++) {
            double ne = 0.0;
            int rn = 0, rs = 0, k;
            for (k = 0; k < d; k++) ne += (double)o[(size_t)e * d + k] * o[(size_t)e * d + k];
            for (j = 0; j < E; j++) {
                double nj = 0.0;
                if (j == e) continue;
                for (k = 0; k < d; k++) nj += (double)o[(size_t)j * d + k] * o[(size_t)j * d + k];
                rn += nj > ne || (nj == ne && j < e);
                rs += s[j] > s[e] || (s[j] == s[e] && j < e);
            }
            counts[(size_t)rn * E + rs] += 1;
        }
    }
}

MOE__IMPL void moe_output_similarity(double *sim, const float *out, int n, int E, int d, int angular) {
    int t, a, b;
    for (a = 0; a < E * E; a++) sim[a] = 0.0;
    for (t = 0; t < n; t++) {
        const float *o = out + (size_t)t * E * d;
        for (a = 0; a < E; a++)
            for (b = 0; b < E; b++) {
                double c = moe_cosine(o + (size_t)a * d, o + (size_t)b * d, (size_t)d);
                sim[a * E + b] += angular ? moe_angular_similarity(c) : c;
            }
    }
    for (a = 0; n > 0 && a < E * E; a++) sim[a] /= n;
}

/* the matrix `which` of layer l: its base, per-expert stride and shape (rows, cols, neuron
   axis: 0 = neurons are rows, 1 = columns) */
static moe_status moe__closer_matrix(moe_model *m, int l, moe_expert_matrix which, const float **base, size_t *stride, int *rows,
                                     int *cols, int *neuron_cols) {
    const moe_layer *L;
    moe_expert_weights w;
    moe_status st = moe__closer_check(m, l, which == MOE_MATRIX_ROUTER);
    int d = m ? m->cfg.d : 0, D;
    if (st != MOE_OK) return st;
    L = &m->blocks[l].moe;
    D = L->cfg.d_ff;
    w = moe_layer_experts(L, &m->S, 0, 0);
    *neuron_cols = 0;
    switch (which) {
    case MOE_MATRIX_ROUTER: *base = moe_store_param(&m->S, L->id_router_w); *rows = 1; *cols = d; break;
    case MOE_MATRIX_GATE:
        if (!w.gate) return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d's experts have no gate matrix (two-matrix FFN or AoE)", l);
        *base = w.gate; *rows = D; *cols = d; break;
    case MOE_MATRIX_UP: *base = w.up; *rows = D; *cols = d; break;
    case MOE_MATRIX_DOWN: *base = w.down; *rows = d; *cols = D; *neuron_cols = 1; break;
    default: return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "unknown expert matrix %d", (int)which);
    }
    *stride = (size_t)*rows * *cols;
    return MOE_OK;
}

MOE__IMPL moe_status moe_neuron_means(float *v, moe_model *m, int l, moe_expert_matrix which) {
    const float *W;
    size_t stride;
    int rows, cols, ncols, e, i, j, E;
    moe_status st = moe__closer_matrix(m, l, which, &W, &stride, &rows, &cols, &ncols);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    for (e = 0; e < E; e++) {
        const float *M = W + (size_t)e * stride;
        float *o = v + (size_t)e * m->cfg.d;
        if (!ncols) { /* neurons are rows: the mean row */
            for (j = 0; j < cols; j++) {
                double acc = 0.0;
                for (i = 0; i < rows; i++) acc += M[(size_t)i * cols + j];
                o[j] = (float)(acc / rows);
            }
        } else { /* neurons are columns: the mean column */
            for (i = 0; i < rows; i++) {
                double acc = 0.0;
                for (j = 0; j < cols; j++) acc += M[(size_t)i * cols + j];
                o[i] = (float)(acc / cols);
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_expert_similarity(double *sim, moe_model *m, int l, moe_expert_matrix which, int neuron_mean, int angular) {
    const float *W;
    size_t stride;
    int rows, cols, ncols, a, b, E, d;
    float *v = NULL;
    moe_status st = moe__closer_matrix(m, l, which, &W, &stride, &rows, &cols, &ncols);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    d = m->cfg.d;
    if (neuron_mean && which != MOE_MATRIX_ROUTER) {
        if (!MOE__ALLOC(v, (size_t)E * d, float)) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d neuron means", E);
        moe_neuron_means(v, m, l, which);
        W = v;
        stride = (size_t)d;
    }
    for (a = 0; a < E; a++)
        for (b = 0; b < E; b++) {
            double c = moe_cosine(W + (size_t)a * stride, W + (size_t)b * stride, stride);
            sim[a * E + b] = angular ? moe_angular_similarity(c) : c;
        }
    MOE_FREE(v);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gate_neuron_regression(double *R, double *R2, moe_model *m, int l, moe_expert_matrix which) {
    double *gs = NULL, *ns = NULL, *x = NULL, *y = NULL, r;
    int E, a, b, n = 0;
    moe_status st = moe__closer_check(m, l, 1);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    if (!MOE__ALLOC(gs, (size_t)E * E, double) || !MOE__ALLOC(ns, (size_t)E * E, double) || !MOE__ALLOC(x, (size_t)E * E, double) ||
        !MOE__ALLOC(y, (size_t)E * E, double))
        st = moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d experts' similarities", E);
    if (st == MOE_OK) st = moe_expert_similarity(gs, m, l, MOE_MATRIX_ROUTER, 0, 0);
    if (st == MOE_OK) st = moe_expert_similarity(ns, m, l, which, 1, 0);
    if (st == MOE_OK) {
        for (a = 0; a < E; a++)
            for (b = a + 1; b < E; b++) {
                x[n] = gs[a * E + b];
                y[n++] = ns[a * E + b];
            }
        r = moe_pearson(x, y, (size_t)n);
        if (R) *R = r;
        if (R2) *R2 = r * r;
    }
    MOE_FREE(gs); MOE_FREE(ns); MOE_FREE(x); MOE_FREE(y);
    return st;
}

MOE__IMPL moe_status moe_similarity_by_depth(double *mean, moe_model *m, moe_expert_matrix which, int neuron_mean) {
    int l, a, b, E, any = 0;
    double *sim = NULL;
    moe_status st = MOE_OK;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    E = m->cfg.moe.n_experts;
    for (l = 0; l < m->cfg.n_layers; l++) any |= m->blocks[l].is_moe;
    if (!any) return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "the model is dense (moe_every = 0): there are no experts to compare");
    if (!MOE__ALLOC(sim, (size_t)E * E, double)) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d experts' similarities", E);
    for (l = 0; l < m->cfg.n_layers && st == MOE_OK; l++) {
        double acc = 0.0;
        mean[l] = NAN;
        if (!m->blocks[l].is_moe) continue;
        if ((st = moe_expert_similarity(sim, m, l, which, neuron_mean, 0)) != MOE_OK) break;
        for (a = 0; a < E; a++)
            for (b = a + 1; b < E; b++) acc += sim[a * E + b];
        mean[l] = E > 1 ? acc / (0.5 * E * (E - 1)) : NAN;
    }
    MOE_FREE(sim);
    return st;
}

MOE__IMPL moe_status moe_layer_input_similarity(double *cos, moe_model *m) {
    int l, t, N, d;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    if (m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "layer input similarity needs a forward first");
    N = m->B * m->T;
    d = m->cfg.d;
    for (l = 0; l + 1 < m->cfg.n_layers; l++) {
        double acc = 0.0;
        for (t = 0; t < N; t++) acc += moe_cosine(m->blocks[l].x + (size_t)t * d, m->blocks[l + 1].x + (size_t)t * d, (size_t)d);
        cos[l] = acc / N;
    }
    return MOE_OK;
}
