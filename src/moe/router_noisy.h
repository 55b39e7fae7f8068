/* ============================================================================================
   >>moe:router_noisy  Shazeer's noisy top-k gating and its CV^2 losses (arXiv 1701.06538 §2.1)
   ============================================================================================
   H = z + xi * (softplus(r . Wn^T) + noise_eps), xi ~ N(0, 1) drawn by the caller (training;
   none at evaluation: H = z); token t keeps the k largest H, weights = softmax over the k kept
   H. Auxiliary losses (§4, Appendix A): importance_coef * CV^2(Importance), Importance_i = sum over
   tokens of the gates; load_coef * CV^2(Load), Load_i = sum_t Phi((z_ti - thr_ti) / sd_ti),
   the smooth probability that expert i stays chosen under fresh noise, thr = the k-th largest
   H of the other experts (the (k+1)-th for a chosen one, the k-th otherwise). Without noise
   Load is the count of picks. CV^2 = var / (mean^2 + 1e-10), var the population variance
   (Shazeer), or with cv_unbiased the unbiased one (torch.var, the HyperMoE code's). */

typedef struct moe_router_noisy {
    int id_w_noise;        /* (E, router_dim) the noise projection Wn                       */
    int has_noise;         /* the last forward was given noise (training)                   */
    float *noise;          /* (T, E) the N(0,1) draws used (0 at evaluation)                */
    float *noise_logits;   /* (T, E) r . Wn^T                                                */
    float *H;              /* (T, E) the noisy logits                                        */
    int *threshold;        /* (T, E) the expert whose H each expert's load compares with    */
    float *d_noise_logits; /* (T, E) backward                                                */
    float *importance;     /* (E) sum over tokens of the gates                               */
    float *load;           /* (E) the smooth load (with noise), the pick counts (without)    */
    float *d_importance;   /* (E) backward: importance_coef * dCV^2 / dImportance            */
    float *d_load;         /* (E) backward: load_coef * dCV^2 / dLoad                        */
} moe_router_noisy;

/* @implementation */
/* ============================================================================================
   >>moe:router_noisy
   ============================================================================================ */

static int moe__noisy_alloc(moe_layer *L) {
    moe_router_noisy *n = &L->noisy;
    size_t TE = (size_t)L->max_tokens * L->cfg.n_experts, E = (size_t)L->cfg.n_experts;
    return MOE__ALLOC(n->noise, TE, float) && MOE__ALLOC(n->noise_logits, TE, float) && MOE__ALLOC(n->H, TE, float) &&
           MOE__ALLOC(n->threshold, TE, int) && MOE__ALLOC(n->d_noise_logits, TE, float) &&
           MOE__ALLOC(n->importance, E, float) && MOE__ALLOC(n->load, E, float) && MOE__ALLOC(n->d_importance, E, float) &&
           MOE__ALLOC(n->d_load, E, float);
}

static void moe__noisy_free(moe_layer *L) {
    moe_router_noisy *n = &L->noisy;
    MOE_FREE(n->noise); MOE_FREE(n->noise_logits); MOE_FREE(n->H); MOE_FREE(n->threshold); MOE_FREE(n->d_noise_logits);
    MOE_FREE(n->importance); MOE_FREE(n->load); MOE_FREE(n->d_importance); MOE_FREE(n->d_load);
    n->noise = n->noise_logits = n->H = n->d_noise_logits = n->importance = n->load = n->d_importance = n->d_load = NULL;
    n->threshold = NULL;
}

static void moe__noisy_declare(moe_layer *L, moe_store *s, const char *prefix) {
    L->noisy.id_w_noise = moe__declare(L, s, prefix, "router.w_noise", MOE_TENSOR_DECAY, L->cfg.n_experts, L->cfg.router_dim, 0);
}

/* noise logits and H (the softmax probabilities of z are the dispatcher's) */
static void moe__noisy_scores(moe_layer *L, const moe_store *s, const float *rin, const float *noise, int T) {
    moe_router_noisy *n = &L->noisy;
    size_t i, TE = (size_t)T * L->cfg.n_experts;
    moe_matmul_forward(n->noise_logits, rin, moe_store_param(s, n->id_w_noise), NULL, T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
    n->has_noise = noise != NULL;
    for (i = 0; i < TE; i++) {
        n->noise[i] = noise ? noise[i] : 0.0f;
        n->H[i] = L->logits[i] + n->noise[i] * (moe__softplus(n->noise_logits[i]) + L->cfg.noise_eps);
    }
}

/* token t: the k largest H, softmax over them; each expert's load threshold */
static void moe__noisy_select(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, j, kth, k1th;
    const float *H = L->noisy.H + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K, *th = L->noisy.threshold + (size_t)t * E;
    float *g = L->gates + (size_t)t * E, mx, sum = 0.0f;
    moe__topk_row(H, E, K + 1, th); /* th is scratch here: the k+1 best */
    for (s = 0; s < K; s++) idx[s] = th[s];
    kth = th[K - 1];
    k1th = th[K];
    for (j = 0; j < E; j++) th[j] = kth;
    for (s = 0; s < K; s++) th[idx[s]] = k1th; /* selected: compare with the (k+1)-th */
    mx = H[idx[0]];
    for (s = 0; s < K; s++) sum += expf(H[idx[s]] - mx);
    for (s = 0; s < K; s++) g[idx[s]] = expf(H[idx[s]] - mx) / sum;
}

/* Importance and Load; stats.aux_cv and the two raw CV^2 */
static void moe__noisy_aux(moe_layer *L, int T) {
    moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts, ub = L->cfg.cv_unbiased, t, e;
    for (e = 0; e < E; e++) n->importance[e] = n->load[e] = 0.0f;
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) n->importance[e] += L->gates[(size_t)t * E + e];
    if (n->has_noise) {
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) {
                size_t i = (size_t)t * E + e;
                float sd = moe__softplus(n->noise_logits[i]) + L->cfg.noise_eps;
                float u = (L->logits[i] - n->H[(size_t)t * E + n->threshold[i]]) / sd;
                n->load[e] += 0.5f * erfcf(-u * 0.70710678118654752f);
            }
    } else {
        for (e = 0; e < E; e++) n->load[e] = L->aux.picks[e];
    }
    L->stats.aux_cv = moe__cv2(n->importance, E, L->cfg.importance_coef, NULL, ub) + moe__cv2(n->load, E, L->cfg.load_coef, NULL, ub);
    L->stats.raw_importance = moe__cv2(n->importance, E, 1.0f, NULL, ub);
    L->stats.raw_load = moe__cv2(n->load, E, 1.0f, NULL, ub);
}

/* the CV^2 losses' gradients (scale: the call's aux gradient scale); zeroes d_noise_logits */
static void moe__noisy_aux_backward(moe_layer *L, float scale) {
    moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts;
    memset(n->d_noise_logits, 0, sizeof(float) * (size_t)L->T * E);
    moe__cv2(n->importance, E, L->cfg.importance_coef * scale, n->d_importance, L->cfg.cv_unbiased);
    if (n->has_noise) moe__cv2(n->load, E, L->cfg.load_coef * scale, n->d_load, L->cfg.cv_unbiased);
}

/* token t: importance's gradient joins dgate; softmax over the kept H; the smooth load */
static void moe__noisy_backward_token(moe_layer *L, int t) {
    const moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, e;
    size_t r = (size_t)t * E;
    const float *g = L->gates + r, *z = L->logits + r, *xi = n->noise + r, *zn = n->noise_logits + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dg = L->d_gates + r, *dz = L->d_logits + r, *dzn = n->d_noise_logits + r, dot = 0.0f;
    for (s = 0; s < K; s++) dg[idx[s]] += n->d_importance[idx[s]]; /* importance = sum_t gates */
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) {
        float dH;
        e = idx[s];
        dH = g[e] * (dg[e] - dot);
        dz[e] += dH;
        dzn[e] += dH * xi[e] * moe__sigmoid(zn[e]);
    }
    if (n->has_noise) { /* smooth load: Phi((z_i - thr_i) / sd_i) */
        const float *H = n->H + r;
        const int *th = n->threshold + r;
        for (e = 0; e < E; e++) {
            float sd = moe__softplus(zn[e]) + L->cfg.noise_eps;
            int m = th[e];
            float u = (z[e] - H[m]) / sd;
            float du = n->d_load[e] * 0.3989422804014327f * expf(-0.5f * u * u);
            float dthr = -du / sd, dsd = -du * u / sd;
            dz[e] += du / sd;
            dz[m] += dthr; /* H_m = z_m + xi_m * sd_m */
            dzn[m] += dthr * xi[m] * moe__sigmoid(zn[m]);
            dzn[e] += dsd * moe__sigmoid(zn[e]);
        }
    }
}

/* d_noise_logits -> dWn, drin += */
static void moe__noisy_backward(moe_layer *L, moe_store *s, float *drin, const float *rin) {
    moe_matmul_backward(drin, moe_store_grad(s, L->noisy.id_w_noise), NULL, L->noisy.d_noise_logits, rin,
                        moe_store_param(s, L->noisy.id_w_noise), L->T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
}
