/* ============================================================================================
   >>moe:cuda_layer  the CUDA twin of the MoE layer (MOE_CUDA): standard softmax top-k
   ============================================================================================
   The CPU layer (>>moe:layer) with the standard router family on the device: the linear
   router, softmax, top-k (renormalised or not, routed_scale), the counting sort, gather,
   SwiGLU or FFN experts grouped per expert (one cuBLAS GEMM per expert and matrix; the
   experts' row counts come back to the host once per forward), combine; backward in reverse.
   The host layer gives the config and the tensor ids; its store's device copy holds the
   weights. What the twin does not cover returns MOE_ERR_UNSUPPORTED at init: other router
   families, shared experts, capacity, selection bias, GW-MoE, HyperMoE, a separate router
   input, and the auxiliary losses (balance, z-loss): configure balance = MOE_BALANCE_NONE
   and z_coef = 0 for a device layer. */
#ifdef MOE_CUDA

typedef struct moe_layer_cuda {
    const moe_layer *host;        /* config and tensor ids                                   */
    int max_tokens, T;            /* capacity; tokens of the last forward                    */
    float *logits, *probs, *gates, *d_gates, *d_logits; /* (max_tokens, E) device            */
    int *topk;                    /* (max_tokens, K)                                         */
    int *raw_token, *raw_expert, *raw_slot; /* (max_tokens * K) the router's raw list        */
    float *raw_weight;
    moe_assign routed;            /* device arrays; n, T, E on the host                      */
    int *offset_host;             /* (E + 1) the experts' rows, copied back each forward     */
    float *xg, *hg, *hu, *h, *eout;         /* (cap, d) (cap, D) x3 (cap, d)                 */
    float *d_weight, *dxg, *deout, *dh, *dhg, *dhu; /* backward scratch, same shapes         */
    moe_err err;
} moe_layer_cuda;

/* Device buffers for up to max_tokens tokens of the host layer L (initialised, its store
   allocated). */
MOEDEF moe_status moe_layer_init_cuda(moe_layer_cuda *Lc, moe_cuda *c, const moe_layer *L, int max_tokens);
MOEDEF void moe_layer_free_cuda(moe_layer_cuda *Lc);
/* y (T, d) = MoE(x (T, d)), device pointers; weights from the device store d */
MOEDEF moe_status moe_layer_forward_cuda(moe_cuda *c, moe_layer_cuda *Lc, const moe_store_cuda *d, float *y,
                                         const float *x, int T);
/* dx (T, d) += dLoss/dx; gradients += into d->grads; x must be the forward's */
MOEDEF moe_status moe_layer_backward_cuda(moe_cuda *c, moe_layer_cuda *Lc, moe_store_cuda *d, float *dx,
                                          const float *dy, const float *x);

#endif /* MOE_CUDA */

/* @implementation */
/* ============================================================================================
   >>moe:cuda_layer
   ============================================================================================ */
#ifdef MOE_CUDA

MOE__IMPL void moe_layer_free_cuda(moe_layer_cuda *Lc) {
    void *p[] = {Lc->logits, Lc->probs, Lc->gates, Lc->d_gates, Lc->d_logits, Lc->topk, Lc->raw_token, Lc->raw_expert,
                 Lc->raw_slot, Lc->raw_weight, Lc->xg, Lc->hg, Lc->hu, Lc->h, Lc->eout, Lc->d_weight, Lc->dxg,
                 Lc->deout, Lc->dh, Lc->dhg, Lc->dhu};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
    moe_assign_free_cuda(&Lc->routed);
    MOE_FREE(Lc->offset_host);
    memset(Lc, 0, sizeof *Lc);
}

MOE__IMPL moe_status moe_layer_init_cuda(moe_layer_cuda *Lc, moe_cuda *c, const moe_layer *L, int max_tokens) {
    const moe_layer_config *g = &L->cfg;
    size_t TE, TK, cap, d, D;
    moe_status s;
    memset(Lc, 0, sizeof *Lc);
    if (g->router != MOE_ROUTER_TOPK || g->n_shared || g->capacity_factor > 0.0f || g->selection_bias ||
        g->gw_threshold > 0.0f || g->hyper || (g->router_dim && g->router_dim != g->d) ||
        (g->balance != MOE_BALANCE_NONE && g->balance_coef > 0.0f) || g->z_coef > 0.0f)
        return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED,
                           "the CUDA layer covers the standard softmax top-k router without shared experts, capacity, "
                           "selection bias, GW-MoE, HyperMoE or auxiliary losses");
    if (max_tokens <= 0 || max_tokens > L->max_tokens)
        return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "max_tokens %d outside [1, %d] (the host layer's)", max_tokens, L->max_tokens);
    Lc->host = L;
    Lc->max_tokens = max_tokens;
    TE = (size_t)max_tokens * g->n_experts;
    TK = (size_t)max_tokens * g->top_k;
    cap = TK;
    d = (size_t)g->d;
    D = (size_t)g->d_ff;
#define MOE__DEV(ptr, count, type) (s = moe_cuda_malloc(c, (void **)&(ptr), sizeof(type) * (count))) == MOE_OK
    if (!(MOE__DEV(Lc->logits, TE, float) && MOE__DEV(Lc->probs, TE, float) && MOE__DEV(Lc->gates, TE, float) &&
          MOE__DEV(Lc->d_gates, TE, float) && MOE__DEV(Lc->d_logits, TE, float) && MOE__DEV(Lc->topk, TK, int) &&
          MOE__DEV(Lc->raw_token, TK, int) && MOE__DEV(Lc->raw_expert, TK, int) && MOE__DEV(Lc->raw_slot, TK, int) &&
          MOE__DEV(Lc->raw_weight, TK, float) && MOE__DEV(Lc->xg, cap * d, float) && MOE__DEV(Lc->hg, cap * D, float) &&
          MOE__DEV(Lc->hu, cap * D, float) && MOE__DEV(Lc->h, cap * D, float) && MOE__DEV(Lc->eout, cap * d, float) &&
          MOE__DEV(Lc->d_weight, cap, float) && MOE__DEV(Lc->dxg, cap * d, float) && MOE__DEV(Lc->deout, cap * d, float) &&
          MOE__DEV(Lc->dh, cap * D, float) && MOE__DEV(Lc->dhg, cap * D, float) && MOE__DEV(Lc->dhu, cap * D, float) &&
          (s = moe_assign_alloc_cuda(c, &Lc->routed, (int)cap, max_tokens, g->n_experts)) == MOE_OK)) {
        moe_layer_free_cuda(Lc);
        return s;
    }
#undef MOE__DEV
    Lc->offset_host = (int *)MOE_MALLOC(sizeof(int) * (size_t)(g->n_experts + 1));
    if (!Lc->offset_host) {
        moe_layer_free_cuda(Lc);
        return moe_err_set(&c->err, MOE_ERR_NOMEM, "out of memory for the CUDA layer's expert offsets");
    }
    return MOE_OK;
}

/* a tensor of the host layer in one of the device store's buffers (NULL for id < 0) */
static float *moe__cuda_tensor(const moe_store_cuda *d, float *buf, int id) {
    return id < 0 ? NULL : buf + d->host->tensors[id].offset;
}

MOE__IMPL moe_status moe_layer_forward_cuda(moe_cuda *c, moe_layer_cuda *Lc, const moe_store_cuda *d, float *y,
                                            const float *x, int T) {
    const moe_layer *L = Lc->host;
    const moe_layer_config *g = &L->cfg;
    int E = g->n_experts, K = g->top_k, dm = g->d, D = g->d_ff, e, ffn = g->expert == MOE_EXPERT_FFN;
    float *Wg = moe__cuda_tensor(d, d->params, L->id_gate), *Wu = moe__cuda_tensor(d, d->params, L->id_up);
    float *Wd = moe__cuda_tensor(d, d->params, L->id_down), *bu = moe__cuda_tensor(d, d->params, L->id_b_up);
    float *bd = moe__cuda_tensor(d, d->params, L->id_b_down);
    moe_status s;
    if (T <= 0 || T > Lc->max_tokens) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "T = %d outside [1, %d]", T, Lc->max_tokens);
    Lc->T = 0;
    if ((s = moe_matmul_forward_cuda(c, Lc->logits, x, moe__cuda_tensor(d, d->params, L->id_router_w),
                                     moe__cuda_tensor(d, d->params, L->id_router_b), T, dm, E)) != MOE_OK ||
        (s = moe_softmax_forward_cuda(c, Lc->probs, Lc->logits, T, E)) != MOE_OK ||
        (s = moe_topk_select_cuda(c, Lc->topk, Lc->gates, Lc->raw_token, Lc->raw_expert, Lc->raw_slot, Lc->raw_weight,
                                  Lc->probs, T, E, K, g->renormalize, g->routed_scale)) != MOE_OK ||
        (s = moe_dispatch_cuda(c, &Lc->routed, Lc->raw_token, Lc->raw_expert, Lc->raw_slot, Lc->raw_weight, T * K, T, E)) != MOE_OK ||
        (s = moe_gather_cuda(c, Lc->xg, x, &Lc->routed, dm)) != MOE_OK ||
        (s = moe_cuda_download(c, Lc->offset_host, Lc->routed.offset, sizeof(int) * (size_t)(E + 1))) != MOE_OK)
        return s;
    for (e = 0; e < E; e++) { /* the experts, one GEMM per matrix on their rows */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        size_t eD = (size_t)e * D * dm;
        if (m == 0) continue;
        if (!ffn && (s = moe_matmul_forward_cuda(c, Lc->hg + (size_t)o * D, Lc->xg + (size_t)o * dm, Wg + eD, NULL, m, dm, D)) != MOE_OK)
            return s;
        if ((s = moe_matmul_forward_cuda(c, Lc->hu + (size_t)o * D, Lc->xg + (size_t)o * dm, Wu + eD,
                                         bu ? bu + (size_t)e * D : NULL, m, dm, D)) != MOE_OK)
            return s;
    }
    {
        size_t nD = (size_t)T * K * D;
        s = ffn ? moe_activation_forward_cuda(c, Lc->h, Lc->hu, nD, g->activation) : moe_swiglu_forward_cuda(c, Lc->h, Lc->hg, Lc->hu, nD);
        if (s != MOE_OK) return s;
    }
    for (e = 0; e < E; e++) {
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        if (m == 0) continue;
        if ((s = moe_matmul_forward_cuda(c, Lc->eout + (size_t)o * dm, Lc->h + (size_t)o * D, Wd + (size_t)e * dm * D,
                                         bd ? bd + (size_t)e * dm : NULL, m, D, dm)) != MOE_OK)
            return s;
    }
    if ((s = moe_combine_forward_cuda(c, y, Lc->eout, &Lc->routed, dm, 0)) != MOE_OK) return s;
    Lc->T = T;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_backward_cuda(moe_cuda *c, moe_layer_cuda *Lc, moe_store_cuda *d, float *dx,
                                             const float *dy, const float *x) {
    const moe_layer *L = Lc->host;
    const moe_layer_config *g = &L->cfg;
    int E = g->n_experts, K = g->top_k, dm = g->d, D = g->d_ff, T = Lc->T, e, ffn = g->expert == MOE_EXPERT_FFN;
    size_t nD = (size_t)T * K * D, nd = (size_t)T * K * dm;
    float *Wg = moe__cuda_tensor(d, d->params, L->id_gate), *Wu = moe__cuda_tensor(d, d->params, L->id_up);
    float *Wd = moe__cuda_tensor(d, d->params, L->id_down);
    float *gWg = moe__cuda_tensor(d, d->grads, L->id_gate), *gWu = moe__cuda_tensor(d, d->grads, L->id_up);
    float *gWd = moe__cuda_tensor(d, d->grads, L->id_down), *gbu = moe__cuda_tensor(d, d->grads, L->id_b_up);
    float *gbd = moe__cuda_tensor(d, d->grads, L->id_b_down);
    moe_status s;
    if (T <= 0) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_layer_backward_cuda without a forward");
    if ((s = moe_combine_backward_cuda(c, Lc->deout, Lc->d_weight, dy, Lc->eout, &Lc->routed, dm)) != MOE_OK) return s;
    MOE__CUDA_TRY(c, cudaMemset(Lc->dh, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dhg, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dhu, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dxg, 0, sizeof(float) * nd), "cudaMemset");
    for (e = 0; e < E; e++) { /* dh = deout . Wd_e; dWd_e += deout^T h */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        if (m == 0) continue;
        if ((s = moe_matmul_backward_cuda(c, Lc->dh + (size_t)o * D, gWd + (size_t)e * dm * D, gbd ? gbd + (size_t)e * dm : NULL,
                                          Lc->deout + (size_t)o * dm, Lc->h + (size_t)o * D, Wd + (size_t)e * dm * D, m, D,
                                          dm)) != MOE_OK)
            return s;
    }
    s = ffn ? moe_activation_backward_cuda(c, Lc->dhu, Lc->dh, Lc->hu, nD, g->activation)
            : moe_swiglu_backward_cuda(c, Lc->dhg, Lc->dhu, Lc->dh, Lc->hg, Lc->hu, nD);
    if (s != MOE_OK) return s;
    for (e = 0; e < E; e++) { /* dxg = dhg . Wg_e + dhu . Wu_e and the two weight gradients */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        size_t eD = (size_t)e * D * dm;
        if (m == 0) continue;
        if (!ffn && (s = moe_matmul_backward_cuda(c, Lc->dxg + (size_t)o * dm, gWg + eD, NULL, Lc->dhg + (size_t)o * D,
                                                  Lc->xg + (size_t)o * dm, Wg + eD, m, dm, D)) != MOE_OK)
            return s;
        if ((s = moe_matmul_backward_cuda(c, Lc->dxg + (size_t)o * dm, gWu + eD, gbu ? gbu + (size_t)e * D : NULL,
                                          Lc->dhu + (size_t)o * D, Lc->xg + (size_t)o * dm, Wu + eD, m, dm, D)) != MOE_OK)
            return s;
    }
    if ((s = moe_gather_backward_cuda(c, dx, Lc->dxg, &Lc->routed, dm)) != MOE_OK ||
        (s = moe_gate_grads_cuda(c, Lc->d_gates, Lc->d_weight, &Lc->routed, g->routed_scale)) != MOE_OK)
        return s;
    MOE__CUDA_TRY(c, cudaMemset(Lc->d_logits, 0, sizeof(float) * (size_t)T * E), "cudaMemset");
    if ((s = moe_topk_backward_cuda(c, Lc->d_logits, Lc->d_gates, Lc->gates, Lc->probs, Lc->topk, T, E, K, g->renormalize)) != MOE_OK)
        return s;
    return moe_matmul_backward_cuda(c, dx, moe__cuda_tensor(d, d->grads, L->id_router_w),
                                    moe__cuda_tensor(d, d->grads, L->id_router_b), Lc->d_logits, x,
                                    moe__cuda_tensor(d, d->params, L->id_router_w), T, dm, E);
}

#endif /* MOE_CUDA */
