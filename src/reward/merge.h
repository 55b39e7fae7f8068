/* ============================================================================================
   >>rwd:merge  merging models of the same layout: linear, SLERP, task arithmetic, TIES, DARE,
                breadcrumbs
   ============================================================================================
   Works on moe.h's one tensor table (moe_store): every input store has the destination's
   layout (same names, shapes and flags, the fingerprint of moe_store_fingerprint), and each
   method runs tensor by tensor on the flat params, as mergekit does
   (github.com/arcee-ai/mergekit: merge_methods/linear.py, slerp.py,
   generalized_task_arithmetic.py, sparsify.py; its names for the methods are used below).
   With n models theta_m, their weights w_m and (task-vector methods) a base model theta_b:

   linear (model soups, Wortsman et al., arXiv 2203.05482):
       theta = sum_m w_m theta_m,  divided by sum_m w_m when normalize (mergekit's default).
   SLERP (Shoemake 1985; exactly two models; t = 0 gives models[0], t = 1 models[1]): with
       unit directions v_m / |v_m| (a norm <= 1e-8 is left undivided) and d = their dot product,
       theta = sin((1-t) O)/sin O v_0 + sin(t O)/sin O v_1,  O = acos d,
       applied to the UNNORMALISED tensors; where |d| > 0.9995 (near-parallel or
       near-antiparallel, as mergekit) it falls back to (1-t) v_0 + t v_1.
   task arithmetic (Ilharco et al., arXiv 2212.04089) and its generalisations: task vectors
       tau_m = theta_m - theta_b, then per model
         sparsify (keep a share `density` of tau_m):
           MAGNITUDE  TIES's trim (Yadav et al., arXiv 2306.01708): the k = floor(density n)
                      entries of largest |tau| (ties to the lower index);
           RANDOM     DARE (Yu et al., arXiv 2311.03099): each entry kept with probability
                      density, drawn with a moe_rng seeded from (seed, model, tensor);
           OUTLIERS   Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop the
                      floor(gamma n) largest |tau| and then the smallest, so that
                      floor(density n) stay (fewer large ones dropped when they do not fit);
         rescale the kept entries:
           DENSITY    divide by density (the DARE paper; older mergekit versions);
           L1, L2, LINF  match that norm of the unmasked tau_m (current mergekit's rescale,
                      L1 there); left unscaled when either norm is below 1e-7;
       u_m = w_m tau_m', and elementwise
         no consensus:  delta = sum_m u_m,  divisor = sum_m w_m
         TIES's sign election: s = +1 where sum_m u_m >= 0 (SUM; the paper) or where
                      sum_m sign(u_m) >= 0 (COUNT), else -1; only u_m of sign s enter (a zero
                      never does): delta = sum_m u_m [sign u_m = s], divisor = sum_m w_m [.]
                      (the disjoint mean), a divisor of 0 read as 1;
       theta = theta_b + delta, or theta_b + delta / divisor with normalize.
   rwd_merge_config_default(method) sets mergekit's defaults of each named method; every field
   can then be changed (DARE with TIES's trim, TIES with a norm rescale, ...).

   Where this departs from mergekit, on purpose:
   - TIES keeps at least one entry per tensor where floor(density n) = 0 (mergekit stops with
     an assertion there).
   - Breadcrumbs with floor(gamma n) = 0 drops no large entry. mergekit's slice [n_bot:-n_top]
     is then empty and keeps nothing: with its default gamma 0.01 every tensor under 100
     entries lost its whole task vector.
   - Weights that sum to (almost) 0 with normalize (linear; task arithmetic without consensus)
     are refused with a status; mergekit divides by 0 (linear) or by 1 (|sum| < 1e-8).
   - Everything accumulates in double and rounds once to float; mergekit computes in the
     tensors' dtype (float32 on CPU).
   - density >= 1 leaves a task vector as it is (no mask, no rescale), as mergekit.

   Weights come in one of three layouts (rwd_merge_per), n_w values per slot, n_w = n_models
   (SLERP: n_w = 1, the slot's t):
     RWD_PER_MODEL   weights[m]                            one weight per model everywhere
     RWD_PER_TENSOR  weights[t * n_w + m]                  per tensor t of the table
     RWD_PER_BLOCK   weights[b * n_w + m], b = block[t];   per block of layers (rwd_block_map);
                     tensors outside every layer (b = -1) use row b = n_blocks
   A block is the tensors of one or several transformer layers, found by the name prefix
   "l<N>." of moe.h's model ("l3.attn.wqkv" is in layer 3; "wte", "lnf.w" in none).

   Nothing is half-merged: every input is checked before the destination is written, the
   destination must be a store of its own (not an input), and on any error it is unchanged. */

typedef enum rwd_merge_method {
    RWD_MERGE_LINEAR = 0,
    RWD_MERGE_SLERP,
    RWD_MERGE_TASK_ARITHMETIC,  /* no sparsification, no consensus, no normalisation        */
    RWD_MERGE_TIES,             /* MAGNITUDE + SUM election + normalize                        */
    RWD_MERGE_DARE_LINEAR,      /* RANDOM + rescale, no consensus, no normalisation            */
    RWD_MERGE_DARE_TIES,        /* RANDOM + rescale + SUM election, no normalisation           */
    RWD_MERGE_BREADCRUMBS,      /* OUTLIERS, no consensus                                      */
    RWD_MERGE_BREADCRUMBS_TIES, /* OUTLIERS + SUM election                                     */
    RWD_MERGE_METHOD_COUNT
} rwd_merge_method;

typedef enum rwd_sparsify {
    RWD_SPARSIFY_NONE = 0,
    RWD_SPARSIFY_MAGNITUDE, /* top-k by |tau| (TIES)                 */
    RWD_SPARSIFY_RANDOM,    /* Bernoulli(density) (DARE)             */
    RWD_SPARSIFY_OUTLIERS   /* drop largest gamma, then the smallest (breadcrumbs) */
} rwd_sparsify;

typedef enum rwd_consensus {
    RWD_CONSENSUS_NONE = 0,
    RWD_CONSENSUS_SUM,  /* sign of sum_m u_m (TIES paper)   */
    RWD_CONSENSUS_COUNT /* majority of the signs            */
} rwd_consensus;

typedef enum rwd_rescale {
    RWD_RESCALE_NONE = 0,
    RWD_RESCALE_DENSITY, /* / density (DARE paper)            */
    RWD_RESCALE_L1,      /* match the L1 norm (mergekit now)  */
    RWD_RESCALE_L2,
    RWD_RESCALE_LINF
} rwd_rescale;

typedef enum rwd_merge_per { RWD_PER_MODEL = 0, RWD_PER_TENSOR, RWD_PER_BLOCK } rwd_merge_per;

typedef struct rwd_merge_config {
    rwd_merge_method method;
    /* task-vector methods (TASK_ARITHMETIC .. BREADCRUMBS_TIES) read these four: */
    rwd_sparsify sparsify;
    rwd_consensus consensus;
    int normalize;           /* divide by the (masked) sum of weights; see above              */
    rwd_rescale rescale;
    double density;          /* share kept by the sparsification, in (0, 1]; 1                */
    const double *densities; /* (n_models) per-model densities, or NULL: density for all     */
    double gamma;            /* breadcrumbs: share of the largest |tau| dropped, [0, 1); 0.01  */
    uint64_t seed;           /* DARE's draws; 1                                                */
    /* DARE's masks given instead of drawn (tests compare with another language's RNG this
       way): keep_masks[m] (numel of the table) 1 = keep entry, 0 = drop; NULL = draw */
    const unsigned char *const *keep_masks;
    rwd_merge_per per;       /* layout of the weights; RWD_PER_MODEL                          */
    const int *block;        /* (table count) block of each tensor (-1 = none), RWD_PER_BLOCK */
    int n_blocks;
} rwd_merge_config;

/* mergekit's defaults for the method (normalize: linear and TIES yes, others no; DARE
   rescales by 1/density as its paper; set rescale = RWD_RESCALE_L1 for current mergekit). */
RWDDEF rwd_merge_config rwd_merge_config_default(rwd_merge_method method);

/* dst = the merge of models[0..n_models) (and base, NULL for LINEAR and SLERP), weights in the
   layout of c->per. dst, every model and base: allocated stores of one layout; dst none of
   them. On error dst is unchanged and err says why. */
RWDDEF moe_status rwd_merge(moe_store *dst, const moe_store *base, const moe_store *const *models,
                            int n_models, const double *weights, const rwd_merge_config *c,
                            moe_err *err);

/* MOE_OK when b has a's layout; else MOE_ERR_SHAPE and a sentence naming the first tensor
   that differs ("what" names b in it, e.g. "model 2"). */
RWDDEF moe_status rwd_store_same_layout(const moe_store *a, const moe_store *b, const char *what,
                                        moe_err *err);
/* N from a name "l<N>.<...>" (moe.h's per-layer tensors), else -1 */
RWDDEF int rwd_tensor_layer(const char *name);
/* 1 for a normalisation or embedding tensor: a name part ('.'-separated) that starts with
   "ln" or contains "norm" or "emb", or is "wte" / "wpe"; 0 for everything else (linear maps,
   their biases, routers, experts). */
RWDDEF int rwd_tensor_is_norm_or_embedding(const char *name);
/* block (s->count): the block of every tensor, -1 outside every layer. Pivots split the
   layers as the alignment-tax code's part-wise averaging (arXiv 2309.06256): layer l is in
   block b = the number of pivots below l, so a pivot layer closes its block; *n_blocks =
   n_pivots + 1. Pivots: strictly increasing, in [0, n_layers - 1). */
RWDDEF moe_status rwd_block_map(int *block, int *n_blocks, const moe_store *s, const int *pivots,
                                int n_pivots, moe_err *err);
/* pivots (n_blocks - 1) of n_blocks equal blocks of floor(n_layers / n_blocks) layers, the last
   taking the remainder (the official code's "blockN"; n_blocks = n_layers: one per layer) */
RWDDEF moe_status rwd_pivots_equal(int *pivots, int n_layers, int n_blocks, moe_err *err);
/* 1 + the largest layer index of s's tensor names (0: no per-layer tensors) */
RWDDEF int rwd_store_layers(const moe_store *s);

/* @implementation */
/* ============================================================================================
   >>rwd:merge
   ============================================================================================ */

RWD__IMPL rwd_merge_config rwd_merge_config_default(rwd_merge_method method) {
    rwd_merge_config c;
    memset(&c, 0, sizeof c);
    c.method = method;
    c.density = 1.0;
    c.gamma = 0.01;
    c.seed = 1;
    c.per = RWD_PER_MODEL;
    switch (method) {
    case RWD_MERGE_LINEAR: c.normalize = 1; break;
    case RWD_MERGE_TIES: c.sparsify = RWD_SPARSIFY_MAGNITUDE; c.consensus = RWD_CONSENSUS_SUM; c.normalize = 1; break;
    case RWD_MERGE_DARE_LINEAR: c.sparsify = RWD_SPARSIFY_RANDOM; c.rescale = RWD_RESCALE_DENSITY; break;
    case RWD_MERGE_DARE_TIES: c.sparsify = RWD_SPARSIFY_RANDOM; c.rescale = RWD_RESCALE_DENSITY; c.consensus = RWD_CONSENSUS_SUM; break;
    case RWD_MERGE_BREADCRUMBS: c.sparsify = RWD_SPARSIFY_OUTLIERS; break;
    case RWD_MERGE_BREADCRUMBS_TIES: c.sparsify = RWD_SPARSIFY_OUTLIERS; c.consensus = RWD_CONSENSUS_SUM; break;
    default: break;
    }
    return c;
}

static void rwd__shape_str(char *buf, size_t cap, const moe_tensor *t) {
    int i;
    size_t len = 0;
    buf[0] = 0;
    for (i = 0; i < t->ndim && len + 16 < cap; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%d", i ? ", " : "(", t->shape[i]);
    snprintf(buf + len, cap - len, ")");
}

RWD__IMPL moe_status rwd_store_same_layout(const moe_store *a, const moe_store *b, const char *what,
                                           moe_err *err) {
    int i, n;
    if (!a || !b) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: a store is missing (NULL)", what);
    n = a->count < b->count ? a->count : b->count;
    for (i = 0; i < n; i++) {
        const moe_tensor *p = &a->tensors[i], *q = &b->tensors[i];
        int same = strcmp(p->name, q->name) == 0 && p->ndim == q->ndim && p->flags == q->flags;
        int d;
        for (d = 0; same && d < p->ndim; d++) same = p->shape[d] == q->shape[d];
        if (!same) {
            char sp[64], sq[64];
            rwd__shape_str(sp, sizeof sp, p);
            rwd__shape_str(sq, sizeof sq, q);
            return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout: tensor %d is '%s' %s flags %d there, '%s' %s flags %d in the destination",
                               what, i, q->name, sq, q->flags, p->name, sp, p->flags);
        }
    }
    if (a->count != b->count)
        return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout: %d tensors, the destination %d (first extra: '%s')", what,
                           b->count, a->count, b->count > n ? b->tensors[n].name : a->tensors[n].name);
    if (moe_store_fingerprint(a) != moe_store_fingerprint(b))
        return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout fingerprint", what); /* unreachable: same table */
    return MOE_OK;
}

RWD__IMPL int rwd_tensor_layer(const char *name) {
    long v = 0;
    const char *p = name;
    if (!p || p[0] != 'l' || p[1] < '0' || p[1] > '9') return -1;
    for (p++; *p >= '0' && *p <= '9'; p++) {
        v = 10 * v + (*p - '0');
        if (v > 1000000) return -1;
    }
    return *p == '.' ? (int)v : -1;
}

RWD__IMPL int rwd_tensor_is_norm_or_embedding(const char *name) {
    const char *p = name;
    while (*p) {
        char part[MOE_NAME_LEN];
        size_t n = 0;
        while (p[n] && p[n] != '.' && n + 1 < sizeof part) { part[n] = p[n]; n++; }
        part[n] = 0;
        if (strncmp(part, "ln", 2) == 0 || strstr(part, "norm") || strstr(part, "emb") ||
            strcmp(part, "wte") == 0 || strcmp(part, "wpe") == 0)
            return 1;
        p += n;
        while (*p && *p != '.') p++; /* a part longer than the buffer */
        if (*p == '.') p++;
    }
    return 0;
}

RWD__IMPL int rwd_store_layers(const moe_store *s) {
    int i, L = 0;
    for (i = 0; i < s->count; i++) {
        int l = rwd_tensor_layer(s->tensors[i].name);
        if (l + 1 > L) L = l + 1;
    }
    return L;
}

RWD__IMPL moe_status rwd_block_map(int *block, int *n_blocks, const moe_store *s, const int *pivots,
                                   int n_pivots, moe_err *err) {
    int i, j, L;
    if (!block || !n_blocks || !s || n_pivots < 0 || (n_pivots > 0 && !pivots))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "block map: missing argument or negative pivot count");
    L = rwd_store_layers(s);
    for (j = 0; j < n_pivots; j++)
        if (pivots[j] < 0 || pivots[j] >= L - 1 || (j > 0 && pivots[j] <= pivots[j - 1]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "pivot %d is %d: pivots must increase strictly within [0, %d) for %d layers", j, pivots[j], L - 1, L);
    for (i = 0; i < s->count; i++) {
        int l = rwd_tensor_layer(s->tensors[i].name), b = 0;
        if (l < 0) { block[i] = -1; continue; }
        for (j = 0; j < n_pivots; j++) b += l > pivots[j];
        block[i] = b;
    }
    *n_blocks = n_pivots + 1;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_pivots_equal(int *pivots, int n_layers, int n_blocks, moe_err *err) {
    int b, q;
    if (n_blocks < 1 || n_blocks > n_layers)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%d equal blocks of %d layers: need 1 <= blocks <= layers", n_blocks, n_layers);
    q = n_layers / n_blocks;
    for (b = 0; b + 1 < n_blocks; b++) pivots[b] = (b + 1) * q - 1;
    return MOE_OK;
}

/* the weight of model m (or SLERP's t, m = 0) for tensor t */
static double rwd__merge_weight(const rwd_merge_config *c, const double *w, int n_w, int t, int m) {
    if (c->per == RWD_PER_TENSOR) return w[(size_t)t * n_w + m];
    if (c->per == RWD_PER_BLOCK) return w[(size_t)(c->block[t] < 0 ? c->n_blocks : c->block[t]) * n_w + m];
    return w[m];
}

/* splitmix64 finaliser: independent DARE streams per (seed, model, tensor) */
static uint64_t rwd__mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static int rwd__sign(double x) { return (x > 0.0) - (x < 0.0); }

static moe_status rwd__merge_check(const moe_store *dst, const moe_store *base, const moe_store *const *models,
                                   int nm, const double *weights, const rwd_merge_config *c, int *n_w_out, moe_err *err) {
    int m, t, n_w, slots, is_ta;
    char what[32];
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: no config");
    if ((int)c->method < 0 || c->method >= RWD_MERGE_METHOD_COUNT) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown method %d", (int)c->method);
    is_ta = c->method >= RWD_MERGE_TASK_ARITHMETIC;
    if (!dst || !dst->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the destination is missing or not allocated");
    if (nm < 1 || !models) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: %d models (need at least one)", nm);
    if (c->method == RWD_MERGE_SLERP && nm != 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SLERP merges exactly 2 models, not %d", nm);
    if (is_ta && !base) return moe_err_set(err, MOE_ERR_INVALID_ARG, "task-vector merges need a base model");
    for (m = -1; m < nm; m++) {
        const moe_store *s = m < 0 ? base : models[m];
        if (m < 0 && !s) continue;
        if (m < 0) snprintf(what, sizeof what, "the base model");
        else snprintf(what, sizeof what, "model %d", m);
        if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: %s is missing or not allocated", what);
        if (s == dst || s->params == dst->params)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the destination is %s; merge into a store of its own (nothing is merged in place)", what);
        if (rwd_store_same_layout(dst, s, what, err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    }
    if ((int)c->sparsify < 0 || c->sparsify > RWD_SPARSIFY_OUTLIERS || (int)c->consensus < 0 || c->consensus > RWD_CONSENSUS_COUNT ||
        (int)c->rescale < 0 || c->rescale > RWD_RESCALE_LINF)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown sparsify, consensus or rescale value");
    n_w = c->method == RWD_MERGE_SLERP ? 1 : nm;
    switch (c->per) {
    case RWD_PER_MODEL: slots = 1; break;
    case RWD_PER_TENSOR: slots = dst->count; break;
    case RWD_PER_BLOCK:
        if (!c->block || c->n_blocks < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "per-block weights need the block map and n_blocks >= 1");
        for (t = 0; t < dst->count; t++)
            if (c->block[t] < -1 || c->block[t] >= c->n_blocks)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "block map: tensor '%s' is in block %d, not in [-1, %d)", dst->tensors[t].name, c->block[t], c->n_blocks);
        slots = c->n_blocks + 1;
        break;
    default: return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown weight layout %d", (int)c->per);
    }
    if (!weights) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: no weights");
    for (t = 0; t < slots * n_w; t++) {
        double v = weights[t];
        if (!(v == v) || v > 1e300 || v < -1e300) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: weight %d is not finite", t);
        if (c->method == RWD_MERGE_SLERP && !(v >= 0.0 && v <= 1.0))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "SLERP: t = %g (slot %d) is outside [0, 1]", v, t);
    }
    if (c->normalize && (c->method == RWD_MERGE_LINEAR || (is_ta && c->consensus == RWD_CONSENSUS_NONE)))
        for (t = 0; t < dst->count; t++) {
            double sw = 0.0;
            for (m = 0; m < nm; m++) sw += rwd__merge_weight(c, weights, n_w, t, m);
            if (fabs(sw) < 1e-8)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the weights of tensor '%s' sum to %g; normalize would divide by 0", dst->tensors[t].name, sw);
        }
    if (is_ta && c->sparsify != RWD_SPARSIFY_NONE) {
        for (m = 0; m < nm; m++) {
            double d = c->densities ? c->densities[m] : c->density;
            if (!(d > 0.0 && d <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "density %g of model %d is outside (0, 1]", d, m);
            if (c->sparsify == RWD_SPARSIFY_RANDOM && c->keep_masks && !c->keep_masks[m])
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "DARE: keep_masks given without a mask for model %d", m);
        }
        if (c->sparsify == RWD_SPARSIFY_OUTLIERS && !(c->gamma >= 0.0 && c->gamma < 1.0))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "breadcrumbs: gamma %g is outside [0, 1)", c->gamma);
    }
    *n_w_out = n_w;
    return MOE_OK;
}

/* sparsify and rescale one task vector tau (n) in place; order: scratch of n entries */
static void rwd__sparsify(float *tau, size_t n, const rwd_merge_config *c, double d, const unsigned char *keep,
                          uint64_t stream, rwd__xi *order) {
    size_t i, lo = 0, hi = n; /* OUTLIERS / MAGNITUDE keep ranks [lo, hi) of the sort */
    double before = 0.0, after = 0.0, scale = 1.0;
    if (c->sparsify == RWD_SPARSIFY_NONE || d >= 1.0 || n == 0) return;
    if (c->rescale == RWD_RESCALE_L1 || c->rescale == RWD_RESCALE_L2 || c->rescale == RWD_RESCALE_LINF)
        for (i = 0; i < n; i++) {
            double a = fabs((double)tau[i]);
            if (c->rescale == RWD_RESCALE_L1) before += a;
            else if (c->rescale == RWD_RESCALE_L2) before += a * a;
            else if (a > before) before = a;
        }
    if (c->sparsify == RWD_SPARSIFY_RANDOM) {
        moe_rng r;
        moe_rng_seed(&r, stream);
        for (i = 0; i < n; i++) {
            int k = keep ? keep[i] != 0 : (double)moe_rng_uniform(&r) < d;
            if (!k) tau[i] = 0.0f;
        }
    } else {
        size_t keep_n = (size_t)(d * (double)n);
        int magnitude = c->sparsify == RWD_SPARSIFY_MAGNITUDE;
        /* MAGNITUDE: descending |tau| is ascending -|tau|; the index breaks ties either way */
        for (i = 0; i < n; i++) { order[i].x = magnitude ? -fabs((double)tau[i]) : fabs((double)tau[i]); order[i].i = i; }
        qsort(order, n, sizeof *order, rwd__cmp_xi);
        if (magnitude) {
            hi = keep_n > 0 ? keep_n : 1; /* mergekit asserts k > 0; one entry survives here */
        } else {
            size_t n_top = (size_t)(c->gamma * (double)n), n_bot;
            if (keep_n + n_top > n) n_top = n - keep_n;
            n_bot = n - keep_n - n_top;
            lo = n_bot; hi = n - n_top;
        }
        for (i = 0; i < n; i++)
            if (i < lo || i >= hi) tau[order[i].i] = 0.0f;
    }
    if (c->rescale == RWD_RESCALE_DENSITY) {
        for (i = 0; i < n; i++) tau[i] = (float)((double)tau[i] / d);
    } else if (c->rescale != RWD_RESCALE_NONE) {
        for (i = 0; i < n; i++) {
            double a = fabs((double)tau[i]);
            if (c->rescale == RWD_RESCALE_L1) after += a;
            else if (c->rescale == RWD_RESCALE_L2) after += a * a;
            else if (a > after) after = a;
        }
        if (c->rescale == RWD_RESCALE_L2) { before = sqrt(before); after = sqrt(after); }
        scale = (before < 1e-7 || after < 1e-7) ? 1.0 : before / after;
    }
    if (scale != 1.0)
        for (i = 0; i < n; i++) tau[i] = (float)((double)tau[i] * scale);
}

static void rwd__merge_slerp(float *out, const float *v0, const float *v1, size_t n, double t) {
    double n0 = 0.0, n1 = 0.0, dot = 0.0, s0, s1;
    size_t i;
    for (i = 0; i < n; i++) {
        n0 += (double)v0[i] * v0[i];
        n1 += (double)v1[i] * v1[i];
        dot += (double)v0[i] * v1[i];
    }
    n0 = sqrt(n0); n1 = sqrt(n1);
    dot /= (n0 > 1e-8 ? n0 : 1.0) * (n1 > 1e-8 ? n1 : 1.0);
    if (fabs(dot) > 0.9995) {
        s0 = 1.0 - t; s1 = t;
    } else {
        double om = acos(dot), so = sin(om);
        s0 = sin((1.0 - t) * om) / so;
        s1 = sin(t * om) / so;
    }
    for (i = 0; i < n; i++) out[i] = (float)(s0 * v0[i] + s1 * v1[i]);
}

RWD__IMPL moe_status rwd_merge(moe_store *dst, const moe_store *base, const moe_store *const *models,
                               int n_models, const double *weights, const rwd_merge_config *c, moe_err *err) {
    int t, m, n_w = 0, nm = n_models;
    size_t maxn = 0;
    float *tau = NULL;
    rwd__xi *order = NULL;
    double *wt = NULL;
    if (rwd__merge_check(dst, base, models, nm, weights, c, &n_w, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    for (t = 0; t < dst->count; t++)
        if (dst->tensors[t].numel > maxn) maxn = dst->tensors[t].numel;
    wt = (double *)moe__calloc((size_t)nm, sizeof(double));
    if (c->method >= RWD_MERGE_TASK_ARITHMETIC) {
        tau = (float *)moe__calloc((size_t)nm * maxn, sizeof(float));
        if (c->sparsify == RWD_SPARSIFY_MAGNITUDE || c->sparsify == RWD_SPARSIFY_OUTLIERS)
            order = (rwd__xi *)moe__calloc(maxn, sizeof(rwd__xi));
    }
    if (!wt || (c->method >= RWD_MERGE_TASK_ARITHMETIC && !tau) ||
        ((c->sparsify == RWD_SPARSIFY_MAGNITUDE || c->sparsify == RWD_SPARSIFY_OUTLIERS) && c->method >= RWD_MERGE_TASK_ARITHMETIC && !order)) {
        MOE_FREE(wt); MOE_FREE(tau); MOE_FREE(order);
        return moe_err_set(err, MOE_ERR_NOMEM, "merge: out of memory for the scratch of %d models x %zu entries", nm, maxn);
    }
    for (t = 0; t < dst->count; t++) {
        const moe_tensor *T = &dst->tensors[t];
        size_t i, n = T->numel, off = T->offset;
        float *out = dst->params + off;
        for (m = 0; m < n_w; m++) wt[m] = rwd__merge_weight(c, weights, n_w, t, m); /* SLERP: wt[0] = t */
        if (c->method == RWD_MERGE_LINEAR) {
            double sw = 0.0;
            for (m = 0; m < nm; m++) sw += wt[m];
            for (i = 0; i < n; i++) {
                double acc = 0.0;
                for (m = 0; m < nm; m++) acc += wt[m] * models[m]->params[off + i];
                out[i] = (float)(c->normalize ? acc / sw : acc);
            }
        } else if (c->method == RWD_MERGE_SLERP) {
            rwd__merge_slerp(out, models[0]->params + off, models[1]->params + off, n, wt[0]);
        } else {
            const float *b = base->params + off;
            double sw = 0.0;
            for (m = 0; m < nm; m++) {
                float *tm = tau + (size_t)m * maxn;
                const float *x = models[m]->params + off;
                double d = c->densities ? c->densities[m] : c->density;
                for (i = 0; i < n; i++) tm[i] = x[i] - b[i];
                rwd__sparsify(tm, n, c, d, c->keep_masks ? c->keep_masks[m] + off : NULL,
                              rwd__mix64(c->seed ^ rwd__mix64(((uint64_t)(unsigned)m << 32) | (uint64_t)(unsigned)t)), order);
                sw += wt[m];
            }
            for (i = 0; i < n; i++) {
                double delta = 0.0, div = sw;
                if (c->consensus == RWD_CONSENSUS_NONE) {
                    for (m = 0; m < nm; m++) delta += wt[m] * tau[(size_t)m * maxn + i];
                } else {
                    double vote = 0.0;
                    int s;
                    for (m = 0; m < nm; m++) {
                        double u = wt[m] * tau[(size_t)m * maxn + i];
                        vote += c->consensus == RWD_CONSENSUS_SUM ? u : (double)rwd__sign(u);
                    }
                    s = vote >= 0.0 ? 1 : -1;
                    div = 0.0;
                    for (m = 0; m < nm; m++) {
                        double u = wt[m] * tau[(size_t)m * maxn + i];
                        if (rwd__sign(u) == s) { delta += u; div += wt[m]; }
                    }
                    if (div == 0.0) div = 1.0;
                }
                out[i] = (float)((double)b[i] + (c->normalize ? delta / div : delta));
            }
        }
    }
    MOE_FREE(wt); MOE_FREE(tau); MOE_FREE(order);
    return MOE_OK;
}
