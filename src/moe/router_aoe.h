/* ============================================================================================
   >>moe:router_aoe  Autonomy-of-Experts: router-free, experts choose by their own activation
                     norms (Lv et al. 2025, arXiv 2501.13074)
   ============================================================================================
   Every expert factorises its gate, W_gate_e = W_out_e . W_in_e (rank r = aoe_rank), and
   computes its low-rank cache C_e = x . W_in_e^T (T, r) for every token; the logits are the
   norms ||C_e||, the choice is softmax top-k over them (renormalize = 1: the
   softmax over the k chosen norms, the paper's; 0: the softmax over all norms read at the
   chosen, the official code's). The chosen experts reuse their cache for the gate:
   h_gate = C_e . W_out_e^T, then SwiGLU as usual. Tensors experts.w_gate_in (E, r, d)
   and experts.w_gate_out (E, D, r) replace the router and the experts' w_gate. */

typedef struct moe_router_aoe {
    int id_w_in;           /* (E, r, d) W_in of every expert                                 */
    int id_w_out;          /* (E, D, r) W_out                                                */
    float *cache;          /* (T, E r) C_e = x . W_in_e^T of every expert                    */
    float *d_cache;        /* (T, E r) backward                                              */
    float *cache_chosen;   /* (cap, r) the chosen experts' caches, in the assignment order   */
    float *d_cache_chosen; /* (cap, r) backward                                              */
} moe_router_aoe;

/* AoE's parameter matching (paper Eq. 5): the expert width D' that gives a rank-r AoE layer the
   parameters of a SwiGLU MoE layer of width D: (3 d D - r d) / (r + 2 d), rounded up. */
MOEDEF int moe_aoe_matched_width(int d, int D, int r);

/* @implementation */
/* ============================================================================================
   >>moe:router_aoe
   ============================================================================================ */

MOE__IMPL int moe_aoe_matched_width(int d, int D, int r) {
    /* rounded up, as the paper's 6469.2 -> 6470 (the 1e-9 keeps exact integers exact) */
    return (int)ceil((3.0 * d * D - (double)r * d) / ((double)r + 2.0 * d) - 1e-9);
}

static int moe__aoe_alloc(moe_layer *L) {
    moe_router_aoe *a = &L->aoe;
    size_t TEr = (size_t)L->max_tokens * L->cfg.n_experts * L->cfg.aoe_rank, capr = (size_t)L->cap * L->cfg.aoe_rank;
    return MOE__ALLOC(a->cache, TEr, float) && MOE__ALLOC(a->d_cache, TEr, float) && MOE__ALLOC(a->cache_chosen, capr, float) &&
           MOE__ALLOC(a->d_cache_chosen, capr, float);
}

static void moe__aoe_free(moe_layer *L) {
    moe_router_aoe *a = &L->aoe;
    MOE_FREE(a->cache); MOE_FREE(a->d_cache); MOE_FREE(a->cache_chosen); MOE_FREE(a->d_cache_chosen);
    a->cache = a->d_cache = a->cache_chosen = a->d_cache_chosen = NULL;
}

static void moe__aoe_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    L->aoe.id_w_in = moe__declare(L, s, prefix, "experts.w_gate_in", MOE_TENSOR_DECAY, c->n_experts, c->aoe_rank, c->d);
    L->aoe.id_w_out = moe__declare(L, s, prefix, "experts.w_gate_out", MOE_TENSOR_DECAY, c->n_experts, c->d_ff, c->aoe_rank);
}

/* nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) for both factors, as the experts' matrices */
static void moe__aoe_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int ids[2], k;
    size_t i;
    ids[0] = L->aoe.id_w_in;
    ids[1] = L->aoe.id_w_out;
    for (k = 0; k < 2; k++) {
        const moe_tensor *t = &s->tensors[ids[k]];
        float *p = moe_store_param(s, ids[k]), bound = 1.0f / sqrtf((float)t->shape[2]);
        for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
    }
}

/* C = x . W_in^T (T, E r) for every expert; logits (T, E) = ||C_e|| */
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, t;
    moe_matmul_forward(L->aoe.cache, x, moe_store_param(s, L->aoe.id_w_in), NULL, T, L->cfg.d, E * r, &L->work);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            const float *c = L->aoe.cache + ((size_t)t * E + e) * r;
            double ss = 0.0;
            for (j = 0; j < r; j++) ss += (double)c[j] * c[j];
            L->logits[(size_t)t * E + e] = (float)sqrt(ss);
        }
    }
}

/* the chosen experts' caches, gathered, then h_gate = C_e . W_out_e^T per expert: the routed
   experts' forward takes it as its gate pre-activation */
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, i, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->aoe.id_w_out);
    for (i = 0; i < a->n; i++)
        memcpy(L->aoe.cache_chosen + (size_t)i * r, L->aoe.cache + ((size_t)a->token[i] * E + a->expert[i]) * r, sizeof(float) * (size_t)r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_forward(L->hg + (size_t)lo * D, L->aoe.cache_chosen + (size_t)lo * r, wout + (size_t)e * D * r, NULL, n, r, D, &L->work);
    }
}

/* d h_gate (left by the experts' backward in experts_dh_gate) -> d W_out and d_cache_chosen */
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->aoe.id_w_out);
    float *gout = moe_store_grad(s, L->aoe.id_w_out);
    memset(L->aoe.d_cache_chosen, 0, sizeof(float) * (size_t)a->n * r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_backward(L->aoe.d_cache_chosen + (size_t)lo * r, gout + (size_t)e * D * r, NULL, L->experts_dh_gate + (size_t)lo * D,
                                L->aoe.cache_chosen + (size_t)lo * r, wout + (size_t)e * D * r, n, r, D, &L->work);
    }
}

/* the router's backward: dC = the chosen experts' cache gradients + dlogit * C / ||C||;
   then dW_in and dx */
static void moe__aoe_backward(moe_layer *L, moe_store *s, float *dx, const float *x) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, T = L->T, i, t;
    const moe_assign *a = &L->routed;
    size_t n = (size_t)T * E * r;
    memset(L->aoe.d_cache, 0, sizeof(float) * n);
    for (i = 0; i < a->n; i++) /* each (token, expert) appears once: plain copies */
        memcpy(L->aoe.d_cache + ((size_t)a->token[i] * E + a->expert[i]) * r, L->aoe.d_cache_chosen + (size_t)i * r, sizeof(float) * (size_t)r);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            size_t k = (size_t)t * E + e;
            const float *c = L->aoe.cache + k * r;
            float *dc = L->aoe.d_cache + k * r, norm = L->logits[k];
            float g = L->d_logits[k] / (norm > 1e-12f ? norm : 1e-12f);
            for (j = 0; j < r; j++) dc[j] += g * c[j];
        }
    }
    moe_matmul_backward(dx, moe_store_grad(s, L->aoe.id_w_in), NULL, L->aoe.d_cache, x, moe_store_param(s, L->aoe.id_w_in), T,
                        L->cfg.d, E * r, &L->work);
}
