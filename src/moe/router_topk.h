/* ============================================================================================
   >>moe:router_topk  token choice: the linear router, softmax and sigmoid top-k, capacity
   ============================================================================================
   The linear router (every family but AoE): logits z = r . Wr^T (+ b), r = the router input
   (x, or what the caller supplies: RMoE's GRU state, an MLP router's hidden layer).
   Softmax top-k: p = softmax(z); token t takes the k largest p (ties to the lower index) with
   the weights p (Switch, arXiv 2101.03961; DeepSeekMoE, arXiv 2401.06066) or, renormalize = 1,
   p / sum of the k = the softmax over the k chosen logits (Mixtral, arXiv 2401.04088).
   Sigmoid top-k: p = sigmoid(z), the same choice, weights p or p / sum of the k (>= 1e-20);
   its balance loss reads the normalised scores p / sum_j p_j.
   Capacity (capacity_factor > 0; GShard, arXiv 2006.16668): each expert keeps at most
   C = ceil(cf k T / E) assignments, admitted slot by slot (every token's first choice before
   any second choice), tokens in index order, or with MOE_CAPACITY_TOKEN_MAJOR token by token;
   a dropped assignment contributes nothing (the token keeps its residual; with
   drop_passthrough it contributes weight * x instead, as HF's Switch Transformers, whose
   dropped token keeps its input as its expert output) and the kept weights are not
   renormalised. */

/* @implementation */
/* ============================================================================================
   >>moe:router_topk
   ============================================================================================ */

static void moe__linear_router_declare(moe_layer *L, moe_store *s, const char *prefix) {
    L->id_router_w = moe__declare(L, s, prefix, "router.w", MOE_TENSOR_DECAY, L->cfg.n_experts, L->cfg.router_dim, 0);
    if (L->cfg.router_bias) L->id_router_b = moe__declare(L, s, prefix, "router.b", 0, L->cfg.n_experts, 0, 0);
    /* no decay and never a gradient: AdamW leaves it alone, the balancing rule moves it */
    if (L->cfg.selection_bias) L->id_selection_bias = moe__declare(L, s, prefix, "router.selection_bias", 0, L->cfg.n_experts, 0, 0);
}

/* logits (T, E) = rin (T, router_dim) . Wr^T + b */
static void moe__linear_router_logits(moe_layer *L, const moe_store *s, const float *rin, int T) {
    moe_matmul_forward(L->logits, rin, moe_store_param(s, L->id_router_w), moe_store_param(s, L->id_router_b), T,
                       L->cfg.router_dim, L->cfg.n_experts, &L->work);
}

/* d_logits -> dWr, db, and drin += (the router input's gradient) */
static void moe__linear_router_backward(moe_layer *L, moe_store *s, float *drin, const float *rin) {
    moe_matmul_backward(drin, moe_store_grad(s, L->id_router_w), moe_store_grad(s, L->id_router_b), L->d_logits, rin,
                        moe_store_param(s, L->id_router_w), L->T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
}

/* token t: the k largest probabilities (plus the selection bias, when there is one) and
   their weights (softmax or sigmoid scores) */
static void moe__topk_select(moe_layer *L, const moe_store *st, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s;
    const float *p = L->probs + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K;
    float *g = L->gates + (size_t)t * E;
    if (L->cfg.selection_bias) {
        const float *b = moe_store_param(st, L->id_selection_bias);
        float *score = L->selection_scores + (size_t)t * E;
        for (s = 0; s < E; s++) score[s] = p[s] + b[s];
        moe__topk_row(score, E, K, idx);
    } else {
        moe__topk_row(p, E, K, idx);
    }
    if (L->cfg.renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
}

/* The raw assignment list of a token-choice router: each token's k choices in slot order,
   less the drops of capacity; GW-MoE's broadcast tokens bring every expert instead. The
   picks per expert count every choice (capacity or not). Returns the list's length.
   dropless (moe_layer_args): capacity admits every choice on this call. */
static int moe__topk_assign(moe_layer *L, int T, int dropless) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, n = 0, t, s, e;
    const int *topk = L->topk;
    float *picks = L->aux.picks;
    for (e = 0; e < E; e++) picks[e] = 0.0f;
    for (t = 0; t < T; t++)
        for (s = 0; s < K; s++) picks[topk[(size_t)t * K + s]] += 1.0f;
    if (c->capacity_factor > 0.0f && dropless) {
        for (t = 0; t < T * K; t++) L->admitted[t] = 1;
    } else if (c->capacity_factor > 0.0f) { /* admission, in slot-major or token-major order */
        int C = (int)ceil((double)c->capacity_factor * K * T / E), token_major = c->capacity_order == MOE_CAPACITY_TOKEN_MAJOR;
        int outer = token_major ? T : K, inner = token_major ? K : T, i, j;
        int *count = L->capacity_count;
        for (e = 0; e < E; e++) count[e] = 0;
        for (i = 0; i < outer; i++)
            for (j = 0; j < inner; j++) {
                t = token_major ? i : j;
                s = token_major ? j : i;
                if (L->gw.uncertain[t]) continue; /* broadcast tokens bypass capacity */
                e = topk[(size_t)t * K + s];
                L->admitted[(size_t)t * K + s] = count[e] < C;
                if (count[e] < C) count[e]++;
            }
    }
    for (t = 0; t < T; t++) {
        if (c->drop_passthrough) L->passthrough[t] = 0.0f;
        if (L->gw.uncertain[t]) {
            n = moe__gw_assign_token(L, t, n);
            continue;
        }
        for (s = 0; s < K; s++) {
            if (c->capacity_factor > 0.0f && !L->admitted[(size_t)t * K + s]) {
                if (c->drop_passthrough) L->passthrough[t] += L->gates[(size_t)t * E + topk[(size_t)t * K + s]] * c->routed_scale;
                continue;
            }
            e = topk[(size_t)t * K + s];
            L->raw_token[n] = t; L->raw_expert[n] = e; L->raw_slot[n] = s; L->raw_weight[n] = L->gates[(size_t)t * E + e];
            n++;
        }
    }
    return n;
}

/* drop_passthrough: y += (the dropped weights) * x, and its backward: dx += w dy, and
   d w = <dy, x> for the router (each dropped assignment's gate gets it, times routed_scale) */
static void moe__topk_passthrough_forward(moe_layer *L, float *y, const float *x, int T) {
    int d = L->cfg.d, t, j;
    for (t = 0; t < T; t++)
        if (L->passthrough[t] != 0.0f)
            for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->passthrough[t] * x[(size_t)t * d + j];
}

static void moe__topk_passthrough_backward(moe_layer *L, float *dx, const float *dy, const float *x) {
    int d = L->cfg.d, t, j;
    for (t = 0; t < L->T; t++) {
        const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
        float dot = 0.0f;
        for (j = 0; j < d; j++) {
            dot += g[j] * xt[j];
            dx[(size_t)t * d + j] += L->passthrough[t] * g[j];
        }
        L->d_passthrough[t] = dot;
    }
}

static void moe__topk_passthrough_gates_backward(moe_layer *L) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, t, s;
    for (t = 0; t < L->T; t++)
        for (s = 0; s < K; s++)
            if (!L->gw.uncertain[t] && !L->admitted[(size_t)t * K + s])
                L->d_gates[(size_t)t * E + L->topk[(size_t)t * K + s]] = L->d_passthrough[t] * L->cfg.routed_scale;
}

/* g = softmax over all E read at the chosen experts (Switch, expert choice):
   dz = p * (dg - <dg, p>) */
static void moe__softmax_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *dg = L->d_gates + r;
    float *dz = L->d_logits + r, dot = 0.0f;
    for (e = 0; e < E; e++) dot += dg[e] * p[e];
    for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
}

/* softmax top-k (and AoE's top-k of the norms): renormalised, g = softmax over the chosen
   logits, dz_i = g_i (dg_i - <dg, g>) on the chosen; else the full softmax's backward */
static void moe__topk_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s;
    size_t r = (size_t)t * E;
    const float *g = L->gates + r, *dg = L->d_gates + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dz = L->d_logits + r, dot = 0.0f;
    if (!L->cfg.renormalize) {
        moe__softmax_backward_token(L, t);
        return;
    }
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
}

/* sigmoid gating: independent scores p = sigmoid(z) */
static void moe__sigmoid_probs(moe_layer *L, int T) {
    size_t i, TE = (size_t)T * L->cfg.n_experts;
    for (i = 0; i < TE; i++) L->probs[i] = moe__sigmoid(L->logits[i]);
}

static void moe__sigmoid_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *g = L->gates + r, *dg = L->d_gates + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dz = L->d_logits + r;
    if (L->cfg.renormalize) { /* g = p / sum over the chosen */
        float sum = 0.0f, dot = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
        for (s = 0; s < K; s++) {
            e = idx[s];
            dz[e] += (dg[e] - dot) / sum * p[e] * (1.0f - p[e]);
        }
    } else {
        for (s = 0; s < K; s++) {
            e = idx[s];
            dz[e] += dg[e] * p[e] * (1.0f - p[e]);
        }
    }
}

/* the normalised scores p / sum_j p_j of token t, which the balance loss averages into P */
static void moe__sigmoid_norm_probs(const moe_layer *L, int t, float *out) {
    int E = L->cfg.n_experts, j;
    const float *p = L->probs + (size_t)t * E;
    float s = 0.0f;
    for (j = 0; j < E; j++) s += p[j];
    for (j = 0; j < E; j++) out[j] = p[j] / s;
}

/* the balance loss's gradient dP through the normalised scores of token t */
static void moe__sigmoid_mean_prob_backward(moe_layer *L, int t) {
    int E = L->cfg.n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *dP = L->aux.d_mean_prob;
    float *dz = L->d_logits + r, sum = 0.0f, dot = 0.0f;
    for (e = 0; e < E; e++) sum += p[e];
    for (e = 0; e < E; e++) dot += dP[e] * p[e] / sum;
    for (e = 0; e < E; e++) dz[e] += (dP[e] - dot) / sum * p[e] * (1.0f - p[e]);
}
