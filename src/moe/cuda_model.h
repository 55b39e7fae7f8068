/* ============================================================================================
   >>moe:cuda_model  the CUDA twin of the tiny transformer (MOE_CUDA)
   ============================================================================================
   moe_model_forward / moe_model_backward on the device for the models the CUDA layer covers:
   learned or rotary positions, dense SwiGLU blocks and MoE blocks with the standard softmax
   top-k router, no auxiliary losses (moe.balance = MOE_BALANCE_NONE, z_coef = 0), no router
   input (GRU / MLP), no GW-MoE, no HyperMoE. The host model gives the config and the tensor
   table; its parameters are copied to the device at init. A training step on the device:
     moe_model_forward_cuda, moe_model_backward_cuda, moe_clip_grad_norm_cuda(&mc.S),
     moe_adamw_step_cuda(&mc.S), moe_store_zero_grad_cuda(&mc.S);
   before a checkpoint or a CPU evaluation, moe_store_download_cuda(cu, &mc.S, &m.S). */
#ifdef MOE_CUDA

typedef struct moe_block_cuda {
    float *x, *ln1, *rstd1, *qkv, *att, *atty, *x2, *ln2, *rstd2, *hg, *hu, *h, *ffn; /* as moe_block's */
} moe_block_cuda;

typedef struct moe_model_cuda {
    const moe_model *host;   /* config, tensor table                                     */
    moe_store_cuda S;        /* the parameters, gradients and moments on the device        */
    moe_block_cuda *blocks;  /* (n_layers) host array of device pointers                  */
    moe_layer_cuda *layers;  /* (n_layers) the MoE blocks' device layers                  */
    int max_B, max_T, B, T, count; /* count: targets >= 0 in the last forward            */
    int *inputs, *targets;   /* (N) device                                                */
    float *x_final, *lnf, *rstd_f, *logits, *losses, *rope;
    float *d_res, *d_res2, *d_ln, *d_qkv, *d_atty, *d_logits, *dh, *dhg, *dhu;
    double *att_dot;         /* (B NH T) attention backward scratch                       */
    double loss;             /* mean cross-entropy of the last forward                    */
} moe_model_cuda;

/* Device buffers for batches of up to max_B x max_T of the host model m (initialised, with
   its weights), its store copied to the device. MOE_ERR_UNSUPPORTED names what the twin does
   not cover. */
MOEDEF moe_status moe_model_init_cuda(moe_model_cuda *mc, moe_cuda *c, const moe_model *m, int max_B, int max_T);
MOEDEF void moe_model_free_cuda(moe_model_cuda *mc);
/* inputs, targets: HOST arrays (B, T) as moe_model_forward's (targets may be NULL); sets
   mc->loss (waits for the device when there are targets) */
MOEDEF moe_status moe_model_forward_cuda(moe_cuda *c, moe_model_cuda *mc, const int *inputs, const int *targets, int B,
                                         int T);
/* gradients of loss * scale, accumulated into mc->S.grads */
MOEDEF moe_status moe_model_backward_cuda(moe_cuda *c, moe_model_cuda *mc, float scale);

#endif /* MOE_CUDA */

/* @implementation */
/* ============================================================================================
   >>moe:cuda_model
   ============================================================================================ */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

/* x (N, d) element (i, j) = wte[inputs[i]][j] (+ wpe[i % T][j]) */
MOE__BODY void moe__cuda_embed_forward_body(int bx, int tx, int bdx, float *x, const int *inputs, const float *wte,
                                            const float *wpe, int N, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int i, j;
    if (id >= (long long)N * d) return;
    i = (int)(id / d);
    j = (int)(id % d);
    x[id] = wte[(size_t)inputs[i] * d + j] + (wpe ? wpe[(size_t)(i % T) * d + j] : 0.0f);
}

/* gwte element (v, j) += the gradient rows of the tokens whose id is v, in token order (the
   CPU's serial scatter, as a gather) */
MOE__BODY void moe__cuda_embed_backward_wte_body(int bx, int tx, int bdx, float *gwte, const float *g, const int *inputs,
                                                 int N, int V, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int v, j, i;
    float o;
    if (id >= (long long)V * d) return;
    v = (int)(id / d);
    j = (int)(id % d);
    o = gwte[id];
    for (i = 0; i < N; i++)
        if (inputs[i] == v) o += g[(size_t)i * d + j];
    gwte[id] = o;
}

/* gwpe element (t, j) += the gradient rows at position t, sequences in order */
MOE__BODY void moe__cuda_embed_backward_wpe_body(int bx, int tx, int bdx, float *gwpe, const float *g, int B, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, b;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = gwpe[id];
    for (b = 0; b < B; b++) o += g[((size_t)b * T + t) * d + j];
    gwpe[id] = o;
}

/* out = a + b, elementwise (out may be a) */
MOE__BODY void moe__cuda_add_body(int bx, int tx, int bdx, float *out, const float *a, const float *b, long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = a[i] + b[i];
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA

MOE__KERNEL(embed_forward, (float *x, const int *inputs, const float *wte, const float *wpe, int N, int T, int d),
            MOE__A(x, inputs, wte, wpe, N, T, d))
MOE__KERNEL(embed_backward_wte, (float *gwte, const float *g, const int *inputs, int N, int V, int d),
            MOE__A(gwte, g, inputs, N, V, d))
MOE__KERNEL(embed_backward_wpe, (float *gwpe, const float *g, int B, int T, int d), MOE__A(gwpe, g, B, T, d))
MOE__KERNEL(add, (float *out, const float *a, const float *b, long long n), MOE__A(out, a, b, n))

MOE__IMPL void moe_model_free_cuda(moe_model_cuda *mc) {
    int l;
    if (mc->blocks) {
        for (l = 0; l < mc->host->cfg.n_layers; l++) {
            moe_block_cuda *b = &mc->blocks[l];
            void *p[] = {b->x, b->ln1, b->rstd1, b->qkv, b->att, b->atty, b->x2, b->ln2, b->rstd2, b->hg, b->hu, b->h, b->ffn};
            size_t i;
            for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
        }
        MOE_FREE(mc->blocks);
    }
    if (mc->layers) {
        for (l = 0; l < mc->host->cfg.n_layers; l++) moe_layer_free_cuda(&mc->layers[l]);
        MOE_FREE(mc->layers);
    }
    {
        void *p[] = {mc->inputs, mc->targets, mc->x_final, mc->lnf, mc->rstd_f, mc->logits, mc->losses, mc->rope,
                     mc->d_res, mc->d_res2, mc->d_ln, mc->d_qkv, mc->d_atty, mc->d_logits, mc->dh, mc->dhg, mc->dhu,
                     mc->att_dot};
        size_t i;
        for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
    }
    moe_store_free_cuda(&mc->S);
    memset(mc, 0, sizeof *mc);
}

/* what the twin runs of the host model as it is now (checked at init and at every forward) */
static moe_status moe__model_cuda_covers(moe_cuda *c, const moe_model *m) {
    int l;
    if (m->cfg.router_input != MOE_RIN_DIRECT || m->cfg.balance_all_layers)
        return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "the CUDA model covers routers that read x, each layer its own loss");
    if (m->group_size) return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "the CUDA model runs its layers in sequence, not as CQIL groups");
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->layer_scale[l] != 1.0f)
            return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "layer %d's residual scale is %g: the CUDA model runs unscaled residuals (masked growth is CPU-only)", l, (double)m->layer_scale[l]);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_init_cuda(moe_model_cuda *mc, moe_cuda *c, const moe_model *m, int max_B, int max_T) {
    const moe_model_config *g = &m->cfg;
    size_t N = (size_t)max_B * max_T, d = (size_t)g->d, V = (size_t)g->vocab, F, NH = (size_t)g->n_heads;
    moe_status s = MOE_OK;
    int l;
    memset(mc, 0, sizeof *mc);
    if (!m->blocks) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_model_init_cuda: the host model is not initialised");
    if (max_B <= 0 || max_T <= 0 || max_B > m->max_B || max_T > m->max_T)
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the host model's (%d x %d)", max_B, max_T, m->max_B, m->max_T);
    if ((s = moe__model_cuda_covers(c, m)) != MOE_OK) return s;
    mc->host = m;
    mc->max_B = max_B;
    mc->max_T = max_T;
    F = moe__dense_width(m) > (size_t)g->moe.d_ff ? moe__dense_width(m) : (size_t)g->moe.d_ff;
    mc->blocks = (moe_block_cuda *)MOE_MALLOC(sizeof(moe_block_cuda) * (size_t)g->n_layers);
    mc->layers = (moe_layer_cuda *)MOE_MALLOC(sizeof(moe_layer_cuda) * (size_t)g->n_layers);
    if (!mc->blocks || !mc->layers) {
        MOE_FREE(mc->blocks);
        MOE_FREE(mc->layers);
        mc->blocks = NULL;
        mc->layers = NULL;
        return moe_err_set(&c->err, MOE_ERR_NOMEM, "out of memory for the CUDA model's block table");
    }
    memset(mc->blocks, 0, sizeof(moe_block_cuda) * (size_t)g->n_layers);
    memset(mc->layers, 0, sizeof(moe_layer_cuda) * (size_t)g->n_layers);
#define MOE__DEV(ptr, count, type) (s = moe_cuda_malloc(c, (void **)&(ptr), sizeof(type) * (count))) == MOE_OK
    for (l = 0; l < g->n_layers && s == MOE_OK; l++) {
        moe_block_cuda *b = &mc->blocks[l];
        if (!(MOE__DEV(b->x, N * d, float) && MOE__DEV(b->ln1, N * d, float) && MOE__DEV(b->rstd1, N, float) &&
              MOE__DEV(b->qkv, N * 3 * d, float) && MOE__DEV(b->att, N * NH * max_T, float) && MOE__DEV(b->atty, N * d, float) &&
              MOE__DEV(b->x2, N * d, float) && MOE__DEV(b->ln2, N * d, float) && MOE__DEV(b->rstd2, N, float) &&
              MOE__DEV(b->ffn, N * d, float)))
            break;
        if (m->blocks[l].is_moe) {
            s = moe_layer_init_cuda(&mc->layers[l], c, &m->blocks[l].moe, (int)N);
        } else if (!(MOE__DEV(b->hg, N * g->d_ff, float) && MOE__DEV(b->hu, N * g->d_ff, float) && MOE__DEV(b->h, N * g->d_ff, float))) {
            break;
        }
    }
    if (s == MOE_OK &&
        !(MOE__DEV(mc->inputs, N, int) && MOE__DEV(mc->targets, N, int) && MOE__DEV(mc->x_final, N * d, float) &&
          MOE__DEV(mc->lnf, N * d, float) && MOE__DEV(mc->rstd_f, N, float) && MOE__DEV(mc->logits, N * V, float) &&
          MOE__DEV(mc->losses, N, float) && MOE__DEV(mc->rope, (size_t)m->max_T * (d / NH), float) &&
          MOE__DEV(mc->d_res, N * d, float) && MOE__DEV(mc->d_res2, N * d, float) && MOE__DEV(mc->d_ln, N * d, float) &&
          MOE__DEV(mc->d_qkv, N * 3 * d, float) && MOE__DEV(mc->d_atty, N * d, float) && MOE__DEV(mc->d_logits, N * V, float) &&
          MOE__DEV(mc->dh, N * F, float) && MOE__DEV(mc->dhg, N * F, float) && MOE__DEV(mc->dhu, N * F, float) &&
          MOE__DEV(mc->att_dot, N * NH, double)))
        ;
#undef MOE__DEV
    if (s == MOE_OK && g->pos == MOE_POS_ROPE)
        s = moe_cuda_upload(c, mc->rope, m->rope, sizeof(float) * (size_t)m->max_T * (d / NH));
    if (s == MOE_OK) s = moe_store_alloc_cuda(&mc->S, c, &m->S);
    if (s != MOE_OK) moe_model_free_cuda(mc);
    return s;
}

#define MOE__P(mc, id) ((mc)->S.params + (mc)->host->S.tensors[id].offset)
#define MOE__G(mc, id) ((mc)->S.grads + (mc)->host->S.tensors[id].offset)
#define MOE__TRY(call)                     \
    do {                                   \
        moe_status moe__s = (call);        \
        if (moe__s != MOE_OK) return moe__s; \
    } while (0)

MOE__IMPL moe_status moe_model_forward_cuda(moe_cuda *c, moe_model_cuda *mc, const int *inputs, const int *targets, int B,
                                            int T) {
    const moe_model *m = mc->host;
    const moe_model_config *g = &m->cfg;
    int d = g->d, NH = g->n_heads, V = g->vocab, N = B * T, l, i, F = g->d_ff;
    moe_status s0 = moe__model_cuda_covers(c, m);
    if (s0 != MOE_OK) return s0;
    if (B <= 0 || T <= 0 || B > mc->max_B || T > mc->max_T)
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the device activations (%d x %d)", B, T, mc->max_B, mc->max_T);
    for (i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "input token %d at position %d is outside [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < -1 || targets[i] >= V)) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "target %d at position %d is outside [-1, %d)", targets[i], i, V);
    }
    mc->B = mc->T = 0;
    mc->count = 0;
    MOE__TRY(moe_cuda_upload(c, mc->inputs, inputs, sizeof(int) * (size_t)N));
    if (targets) {
        MOE__TRY(moe_cuda_upload(c, mc->targets, targets, sizeof(int) * (size_t)N));
        for (i = 0; i < N; i++) mc->count += targets[i] >= 0;
    }
    MOE__LAUNCH(c, embed_forward, (long long)N * d, MOE__CUDA_BLOCK, mc->blocks[0].x, mc->inputs, MOE__P(mc, m->id_wte),
                m->id_wpe >= 0 ? MOE__P(mc, m->id_wpe) : (const float *)NULL, N, T, d);
    for (l = 0; l < g->n_layers; l++) {
        const moe_block *hb = &m->blocks[l];
        moe_block_cuda *b = &mc->blocks[l];
        float *out = l + 1 < g->n_layers ? mc->blocks[l + 1].x : mc->x_final;
        MOE__TRY(moe_rmsnorm_forward_cuda(c, b->ln1, b->rstd1, b->x, MOE__P(mc, hb->id_ln1), N, d, g->norm_eps));
        MOE__TRY(moe_matmul_forward_cuda(c, b->qkv, b->ln1, MOE__P(mc, hb->id_qkv), NULL, N, d, 3 * d));
        if (g->pos == MOE_POS_ROPE) MOE__TRY(moe_rope_apply_cuda(c, b->qkv, mc->rope, B, T, d, NH, 0));
        MOE__TRY(moe_attention_forward_cuda(c, b->atty, b->att, b->qkv, B, T, d, NH));
        MOE__TRY(moe_matmul_forward_cuda(c, b->x2, b->atty, MOE__P(mc, hb->id_wo), NULL, N, d, d));
        MOE__LAUNCH(c, add, (long long)N * d, MOE__CUDA_BLOCK, b->x2, b->x2, b->x, (long long)N * d);
        MOE__TRY(moe_rmsnorm_forward_cuda(c, b->ln2, b->rstd2, b->x2, MOE__P(mc, hb->id_ln2), N, d, g->norm_eps));
        if (hb->is_moe) {
            MOE__TRY(moe_layer_forward_cuda(c, &mc->layers[l], &mc->S, b->ffn, b->ln2, N));
        } else {
            MOE__TRY(moe_matmul_forward_cuda(c, b->hg, b->ln2, MOE__P(mc, hb->id_gate), NULL, N, d, F));
            MOE__TRY(moe_matmul_forward_cuda(c, b->hu, b->ln2, MOE__P(mc, hb->id_up), NULL, N, d, F));
            MOE__TRY(moe_swiglu_forward_cuda(c, b->h, b->hg, b->hu, (size_t)N * F));
            MOE__TRY(moe_matmul_forward_cuda(c, b->ffn, b->h, MOE__P(mc, hb->id_down), NULL, N, F, d));
        }
        MOE__LAUNCH(c, add, (long long)N * d, MOE__CUDA_BLOCK, out, b->x2, b->ffn, (long long)N * d);
    }
    MOE__TRY(moe_rmsnorm_forward_cuda(c, mc->lnf, mc->rstd_f, mc->x_final, MOE__P(mc, m->id_lnf), N, d, g->norm_eps));
    MOE__TRY(moe_matmul_forward_cuda(c, mc->logits, mc->lnf, MOE__P(mc, m->id_wte), NULL, N, d, V));
    mc->loss = 0.0;
    if (targets) MOE__TRY(moe_crossentropy_forward_cuda(c, mc->losses, mc->logits, mc->targets, N, V, &mc->loss));
    mc->B = B;
    mc->T = T;
    mc->count = targets ? (mc->count > 0 ? mc->count : -1) : 0; /* -1: targets, none counted */
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_backward_cuda(moe_cuda *c, moe_model_cuda *mc, float scale) {
    const moe_model *m = mc->host;
    const moe_model_config *g = &m->cfg;
    int B = mc->B, T = mc->T, N = B * T, d = g->d, NH = g->n_heads, V = g->vocab, F = g->d_ff, l;
    size_t Nd = (size_t)N * d * sizeof(float);
    if (mc->count == 0 || N == 0) return moe_err_set(&c->err, MOE_ERR_STATE, "backward needs a forward with targets before it");
    MOE__CUDA_TRY(c, cudaMemset(mc->d_logits, 0, sizeof(float) * (size_t)N * V), "cudaMemset");
    if (mc->count > 0) MOE__TRY(moe_crossentropy_backward_cuda(c, mc->d_logits, mc->logits, mc->targets, N, V, scale / (float)mc->count));
    MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
    MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, m->id_wte), NULL, mc->d_logits, mc->lnf, MOE__P(mc, m->id_wte), N, d, V));
    MOE__CUDA_TRY(c, cudaMemset(mc->d_res, 0, Nd), "cudaMemset");
    MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res, MOE__G(mc, m->id_lnf), mc->d_ln, mc->x_final, MOE__P(mc, m->id_lnf), mc->rstd_f, N, d));
    for (l = g->n_layers - 1; l >= 0; l--) {
        const moe_block *hb = &m->blocks[l];
        moe_block_cuda *b = &mc->blocks[l];
        MOE__CUDA_TRY(c, cudaMemcpy(mc->d_res2, mc->d_res, Nd, cudaMemcpyDeviceToDevice), "cudaMemcpy");
        MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
        if (hb->is_moe) {
            MOE__TRY(moe_layer_backward_cuda(c, &mc->layers[l], &mc->S, mc->d_ln, mc->d_res, b->ln2));
        } else { /* the dense SwiGLU: moe_experts_backward with one expert */
            size_t NF = sizeof(float) * (size_t)N * F;
            MOE__CUDA_TRY(c, cudaMemset(mc->dh, 0, NF), "cudaMemset");
            MOE__CUDA_TRY(c, cudaMemset(mc->dhg, 0, NF), "cudaMemset");
            MOE__CUDA_TRY(c, cudaMemset(mc->dhu, 0, NF), "cudaMemset");
            MOE__TRY(moe_matmul_backward_cuda(c, mc->dh, MOE__G(mc, hb->id_down), NULL, mc->d_res, b->h, MOE__P(mc, hb->id_down), N, F, d));
            MOE__TRY(moe_swiglu_backward_cuda(c, mc->dhg, mc->dhu, mc->dh, b->hg, b->hu, (size_t)N * F));
            MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_gate), NULL, mc->dhg, b->ln2, MOE__P(mc, hb->id_gate), N, d, F));
            MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_up), NULL, mc->dhu, b->ln2, MOE__P(mc, hb->id_up), N, d, F));
        }
        MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res2, MOE__G(mc, hb->id_ln2), mc->d_ln, b->x2, MOE__P(mc, hb->id_ln2), b->rstd2, N, d));
        MOE__CUDA_TRY(c, cudaMemcpy(mc->d_res, mc->d_res2, Nd, cudaMemcpyDeviceToDevice), "cudaMemcpy");
        MOE__CUDA_TRY(c, cudaMemset(mc->d_atty, 0, Nd), "cudaMemset");
        MOE__TRY(moe_matmul_backward_cuda(c, mc->d_atty, MOE__G(mc, hb->id_wo), NULL, mc->d_res2, b->atty, MOE__P(mc, hb->id_wo), N, d, d));
        MOE__TRY(moe_attention_backward_cuda(c, mc->d_qkv, mc->d_atty, b->qkv, b->att, B, T, d, NH, mc->att_dot));
        if (g->pos == MOE_POS_ROPE) MOE__TRY(moe_rope_apply_cuda(c, mc->d_qkv, mc->rope, B, T, d, NH, 1));
        MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
        MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_qkv), NULL, mc->d_qkv, b->ln1, MOE__P(mc, hb->id_qkv), N, d, 3 * d));
        MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res, MOE__G(mc, hb->id_ln1), mc->d_ln, b->x, MOE__P(mc, hb->id_ln1), b->rstd1, N, d));
    }
    MOE__LAUNCH(c, embed_backward_wte, (long long)V * d, MOE__CUDA_BLOCK, MOE__G(mc, m->id_wte), mc->d_res, mc->inputs, N, V, d);
    if (m->id_wpe >= 0) MOE__LAUNCH(c, embed_backward_wpe, (long long)T * d, MOE__CUDA_BLOCK, MOE__G(mc, m->id_wpe), mc->d_res, B, T, d);
    return MOE_OK;
}

#undef MOE__P
#undef MOE__G
#undef MOE__TRY

#endif /* MOE_CUDA */
