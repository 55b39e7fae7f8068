/* ============================================================================================
   >>moe:layer  the MoE layer
   ============================================================================================ */

typedef struct moe_layer {
    moe_layer_config cfg;
    int max_tokens;
    int cap;              /* capacity of the routed assignment list                          */
    /* tensor ids in the store, -1 when absent */
    int id_router_w;      /* (E, router_dim)                                                 */
    int id_router_b;      /* (E)                                                             */
    int id_noise_w;       /* (E, router_dim) noisy top-k                                     */
    int id_gate, id_up, id_down, id_b_up, id_b_down;        /* routed bank                 */
    int id_s_gate, id_s_up, id_s_down, id_s_b_up, id_s_b_down; /* shared bank             */
    int id_aoe_in, id_aoe_out;     /* AoE: gate factors (E, r, d) and (E, D, r)            */
    float *aoe_c, *aoe_dc;         /* AoE: (T, E r) every expert's cache and its gradient   */
    float *aoe_cg, *aoe_dcg;       /* AoE: (cap, r) the chosen experts' caches, gathered    */
    int id_hyper[11];     /* HyperMoE: expert_emb, proc1.w/b, proc2.w/b (this layer);
                             layer_emb, net.w/b, head_down, head_down_b, head_up (shared)  */
    float *hy_sig, *hy_h1, *hy_c, *hy_z, *hy_hb, *hy_m, *hy_u, *hy_o, *hy_out; /* caches       */
    float *hy_do, *hy_dm, *hy_dhb, *hy_dz, *hy_dc, *hy_dh1, *hy_dsig;          /* backward     */
    /* forward caches (sized for max_tokens) */
    int T;                /* tokens of the last forward, 0 = none                           */
    int has_noise;        /* last forward was given noise                                    */
    float *logits;        /* (T, E) x . Wr^T + b                                             */
    float *probs;         /* (T, E) softmax (or sigmoid) of logits                           */
    float *gates;         /* (T, E) mixing weight of each (token, expert), 0 when not chosen */
    float *noise;         /* (T, E) noisy top-k: the N(0,1) draws used                      */
    float *noise_logits;  /* (T, E) noisy top-k: x . Wn^T                                    */
    float *noisy;         /* (T, E) noisy top-k: H                                           */
    float *lse;           /* (T) logsumexp of logits (z-loss)                                */
    int *topk;            /* (T, K) chosen experts, descending score, -1 = none              */
    int *thresh;          /* (T, E) noisy top-k: index of the threshold logit for Load       */
    moe_assign routed;    /* assignment list of the routed bank                              */
    moe_assign shared;    /* assignment list of the shared bank (every token, weight 1)      */
    float *xg, *hg, *hu, *eout;     /* routed bank caches: (cap,d) (cap,D) (cap,D) (cap,d)  */
    float *s_xg, *s_hg, *s_hu, *s_eout; /* shared bank caches, (S*T, ...)                   */
    /* scratch */
    int *raw_i;           /* (4 * cap) raw token/expert/slot lists before dispatch          */
    float *raw_w;         /* (cap)                                                           */
    float *work_a, *work_b; /* (max(cap, S*T), max(D, Ds))                                  */
    float *dxg;           /* (max(cap, S*T), d)                                             */
    float *deout;         /* (max(cap, S*T), d)                                             */
    float *dgate;         /* (T, E)                                                          */
    float *dlogits;       /* (T, E)                                                          */
    float *dnoise_logits; /* (T, E)                                                          */
    moe_work work;        /* scratch of the layer's matmuls and experts, sized at init         */
    float *aux_tmp;       /* (5 * E) loss pieces: f, P, importance, load, requested picks     */
    float *stat_load, *stat_prob; /* (E) backing for stats                                  */
    int *uncertain;       /* (T) GW-MoE: 1 when the token was broadcast to every expert      */
    float *bypass;        /* (T) GW-MoE released-code emulation: y += bypass * x             */
    int gw_active;        /* GW-MoE broadcast on (set while fine-tuning; off = sparse)       */
    int seq_len;          /* tokens per sequence, for gw_slots (0: the batch is one sequence) */
    /* THE extension point for routers that read something other than x (RMoE, MLP router):
       when router_input is set, logits = router_input (T, router_dim) . Wr^T, and backward
       accumulates the router's input gradient into d_router_input instead of dx. */
    const float *router_input;
    float *d_router_input;
    moe_routing_stats stats;
    float aux_grad_scale; /* multiplies the aux losses' gradients in backward; 1 after init
                             (set 1/n for gradient accumulation over n micro-batches)     */
    moe_err err;
} moe_layer;

/* Validates cfg, declares the layer's tensors in s under `prefix` (s must not be allocated
   yet) and allocates activations for up to max_tokens tokens. */
MOEDEF moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                 const char *prefix, int max_tokens);
MOEDEF void moe_layer_free(moe_layer *L);
/* Router N(0, router_init_std); expert matrices U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear;
   biases 0. */
MOEDEF void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
/* Pointers to the layer's weights in the params (grads = 0) or grads (grads = 1) buffer. */
MOEDEF moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads);
/* y (T, d) = MoE(x (T, d)). noise (T, E): N(0,1) draws for the noisy top-k router during
   training, NULL at evaluation (then H = z). Fills L->stats. Capacity: assignments are admitted
   slot by slot (every token's first choice before any second choice), tokens in index order;
   a dropped assignment contributes nothing (the token keeps its residual), weights are not
   renormalised afterwards. */
MOEDEF moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                    int T, const float *noise);
/* dx (T, d) += dLoss/dx; parameter gradients += into s->grads. The auxiliary losses of the
   last forward (L->stats.aux_total) are part of the differentiated objective. x must be the
   forward's input. */
MOEDEF moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                     const float *x);

/* @implementation */
/* ============================================================================================
   >>moe:layer
   ============================================================================================ */

static int moe__declare(moe_layer *L, moe_store *s, const char *prefix, const char *name, int flags,
                        int n0, int n1, int n2) {
    char full[MOE_NAME_LEN + 64];
    int id;
    if (L->err.status != MOE_OK) return -1;
    if (strlen(prefix) + strlen(name) >= MOE_NAME_LEN) {
        moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "tensor name '%s%s' is longer than %d bytes", prefix, name, MOE_NAME_LEN - 1);
        return -1;
    }
    sprintf(full, "%s%s", prefix, name);
    id = moe_store_add(s, full, flags, n0, n1, n2, 0);
    if (id < 0) moe_err_set(&L->err, s->err.status, "%s", s->err.msg);
    return id;
}

static void moe__declare_bank(moe_layer *L, moe_store *s, const char *prefix, const char *bank, int E,
                              int D, int *id_gate, int *id_up, int *id_down, int *id_b_up, int *id_b_down) {
    const moe_layer_config *c = &L->cfg;
    char name[48];
    int d = c->d;
    *id_gate = *id_b_up = *id_b_down = -1;
    /* AoE's routed experts factorise their gate (w_gate_in, w_gate_out), declared by the router */
    if (c->expert == MOE_EXPERT_SWIGLU && !(c->router == MOE_ROUTER_AOE && strcmp(bank, "experts") == 0)) {
        sprintf(name, "%s.w_gate", bank);
        *id_gate = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, D, d);
    }
    sprintf(name, "%s.w_up", bank);
    *id_up = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, D, d);
    sprintf(name, "%s.w_down", bank);
    *id_down = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, d, D);
    if (c->expert == MOE_EXPERT_FFN && c->expert_bias) {
        sprintf(name, "%s.b_up", bank);
        *id_b_up = moe__declare(L, s, prefix, name, 0, E, D, 0);
        sprintf(name, "%s.b_down", bank);
        *id_b_down = moe__declare(L, s, prefix, name, 0, E, d, 0);
    }
}

/* ---- HyperMoE: a per-token hyper-expert generated from the UNselected experts ----
   sig_t = sum of the expert embeddings Q_j of the experts t did not choose;
   c_t = proc(sig_t) (Linear-ReLU-Linear); z_t = [c_t ; layer_emb[l]]; hb_t = ReLU(net(z_t));
   u_t[j] = sum_k (M_t[j][k] + head_down_b[j][k]) hb_t[k]   with M = x . head_down^T, (T, a b);
   act = ReLU(u);  out_t = ([act_t ; 1] (x) hb_t) . head_up^T   (the "1" row is the up bias head).
   The generated adapter weights W_dn(t) = sum_k hb_k head_down[:, k] are never materialised:
   both products are single GEMMs over all tokens. net and the heads are shared by every
   layer (found by name in the store), the embeddings and processor are per layer. */

/* the HyperMoE tensors' initialisation; returns 0 for other tensors */
static int moe__hyper_init_tensor(const moe_tensor *t, float *p, moe_rng *r) {
    size_t i;
    float bound;
    const char *name = strstr(t->name, "hyper.");
    if (!name) return 0;
    if (moe__ends_with(name, ".b") || strcmp(name, "hyper.head_down_b") == 0) bound = 0.0f;
    else if (strstr(name, "hyper.head_")) bound = 1e-3f * sqrtf(3.0f / (float)t->shape[1]); /* near-zero adapter */
    else if (moe__ends_with(name, "emb")) bound = sqrtf(3.0f); /* unit variance, as nn.Embedding */
    else bound = 1.0f / sqrtf((float)t->shape[1]); /* nn.Linear */
    for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(r) - 1.0f);
    return 1;
}

static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter;
    const char *shared[6] = {"hyper.layer_emb", "hyper.net.w", "hyper.net.b", "hyper.head_down", "hyper.head_down_b", "hyper.head_up"};
    int dims[6][2], k;
    dims[0][0] = c->hyper_layers; dims[0][1] = lam;
    dims[1][0] = b; dims[1][1] = q + lam;
    dims[2][0] = b; dims[2][1] = 0;
    dims[3][0] = a * b; dims[3][1] = d;
    dims[4][0] = a; dims[4][1] = b;
    dims[5][0] = d; dims[5][1] = (a + 1) * b;
    L->id_hyper[0] = moe__declare(L, s, prefix, "hyper.expert_emb", MOE_TENSOR_DECAY, E, e, 0);
    L->id_hyper[1] = moe__declare(L, s, prefix, "hyper.proc1.w", MOE_TENSOR_DECAY, h, e, 0);
    L->id_hyper[2] = moe__declare(L, s, prefix, "hyper.proc1.b", 0, h, 0, 0);
    L->id_hyper[3] = moe__declare(L, s, prefix, "hyper.proc2.w", MOE_TENSOR_DECAY, q, h, 0);
    L->id_hyper[4] = moe__declare(L, s, prefix, "hyper.proc2.b", 0, q, 0, 0);
    for (k = 0; k < 6 && L->err.status == MOE_OK; k++) { /* shared: reuse the first layer's */
        int id = moe_store_find(s, shared[k]);
        if (id < 0) {
            id = moe__declare(L, s, "", shared[k], (k == 2 || k == 4) ? 0 : MOE_TENSOR_DECAY, dims[k][0], dims[k][1], 0);
        } else if (s->tensors[id].shape[0] != dims[k][0] || (dims[k][1] && s->tensors[id].shape[1] != dims[k][1])) {
            moe_err_set(&L->err, MOE_ERR_SHAPE, "shared HyperMoE tensor '%s' exists with another shape (layers must agree on the hyper sizes)", shared[k]);
            id = -1;
        }
        L->id_hyper[5 + k] = id;
    }
}

/* y (T, d) += the hyper-expert's output */
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j;
    const float *Q = moe_store_param(s, L->id_hyper[0]), *lemb = moe_store_param(s, L->id_hyper[5]) + (size_t)c->hyper_layer * lam;
    const float *bdn = moe_store_param(s, L->id_hyper[9]);
    float *sum = (float *)moe__calloc((size_t)e, sizeof(float)), *out = L->hy_out;
    MOE_ASSERT(sum);
    for (j = 0; j < E; j++) { /* sum of all embeddings, in expert order */
        int i;
        for (i = 0; i < e; i++) sum[i] += Q[(size_t)j * e + i];
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) { /* sig_t = sum - the chosen ones */
        float *sg = L->hy_sig + (size_t)t * e;
        int i, k;
        memcpy(sg, sum, sizeof(float) * (size_t)e);
        for (k = 0; k < E; k++)
            if (L->gates[(size_t)t * E + k] != 0.0f)
                for (i = 0; i < e; i++) sg[i] -= Q[(size_t)k * e + i];
    }
    MOE_FREE(sum);
    moe_matmul_forward(L->hy_h1, L->hy_sig, moe_store_param(s, L->id_hyper[1]), moe_store_param(s, L->id_hyper[2]), T, e, h, &L->work);
    for (t = 0; t < T * h; t++) L->hy_h1[t] = L->hy_h1[t] > 0.0f ? L->hy_h1[t] : 0.0f;
    moe_matmul_forward(L->hy_c, L->hy_h1, moe_store_param(s, L->id_hyper[3]), moe_store_param(s, L->id_hyper[4]), T, h, q, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(L->hy_z + (size_t)t * (q + lam), L->hy_c + (size_t)t * q, sizeof(float) * (size_t)q);
        memcpy(L->hy_z + (size_t)t * (q + lam) + q, lemb, sizeof(float) * (size_t)lam);
    }
    moe_matmul_forward(L->hy_hb, L->hy_z, moe_store_param(s, L->id_hyper[6]), moe_store_param(s, L->id_hyper[7]), T, q + lam, b, &L->work);
    for (t = 0; t < T * b; t++) L->hy_hb[t] = L->hy_hb[t] > 0.0f ? L->hy_hb[t] : 0.0f;
    moe_matmul_forward(L->hy_m, x, moe_store_param(s, L->id_hyper[8]), NULL, T, d, ab, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) { /* u = (M_t + B) hb_t, act = ReLU(u), O_t = [act ; 1] (x) hb_t */
        const float *M = L->hy_m + (size_t)t * ab, *hb = L->hy_hb + (size_t)t * b;
        float *u = L->hy_u + (size_t)t * a, *o = L->hy_o + (size_t)t * (ab + b);
        int i, k;
        for (i = 0; i < a; i++) {
            float acc = 0.0f;
            for (k = 0; k < b; k++) acc += (M[i * b + k] + bdn[i * b + k]) * hb[k];
            u[i] = acc;
        }
        for (i = 0; i <= a; i++) {
            float act = i < a ? (u[i] > 0.0f ? u[i] : 0.0f) : 1.0f;
            for (k = 0; k < b; k++) o[i * b + k] = act * hb[k];
        }
    }
    moe_matmul_forward(out, L->hy_o, moe_store_param(s, L->id_hyper[10]), NULL, T, ab + b, d, &L->work);
    for (t = 0; t < T * d; t++) y[t] += out[t];
}

static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond, T = L->T;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j, i;
    const float *bdn = moe_store_param(s, L->id_hyper[9]);
    float *dO = L->hy_do, *dM = L->hy_dm, *dhb = L->hy_dhb, *dz = L->hy_dz, *dc = L->hy_dc, *dh1 = L->hy_dh1, *dsig = L->hy_dsig;
    float *gQ = moe_store_grad(s, L->id_hyper[0]), *glemb = moe_store_grad(s, L->id_hyper[5]) + (size_t)c->hyper_layer * lam;
    memset(dO, 0, sizeof(float) * (size_t)T * (ab + b));
    moe_matmul_backward(dO, moe_store_grad(s, L->id_hyper[10]), NULL, dy, L->hy_o, moe_store_param(s, L->id_hyper[10]), T, ab + b, d, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) {
        const float *M = L->hy_m + (size_t)t * ab, *hb = L->hy_hb + (size_t)t * b, *u = L->hy_u + (size_t)t * a;
        const float *g = dO + (size_t)t * (ab + b);
        float *gm = dM + (size_t)t * ab, *ghb = dhb + (size_t)t * b;
        int ii, k;
        for (k = 0; k < b; k++) ghb[k] = g[ab + k]; /* the bias row: act = 1 */
        for (ii = 0; ii < a; ii++) {
            float act = u[ii] > 0.0f ? u[ii] : 0.0f, dact = 0.0f, du;
            for (k = 0; k < b; k++) {
                dact += g[ii * b + k] * hb[k];
                ghb[k] += g[ii * b + k] * act;
            }
            du = u[ii] > 0.0f ? dact : 0.0f;
            for (k = 0; k < b; k++) {
                gm[ii * b + k] = du * hb[k];
                ghb[k] += du * (M[ii * b + k] + bdn[ii * b + k]);
            }
        }
        for (k = 0; k < b; k++) ghb[k] = hb[k] > 0.0f ? ghb[k] : 0.0f; /* through hb's ReLU */
    }
    moe__colsum_acc(moe_store_grad(s, L->id_hyper[9]), dM, T, ab); /* d head_down_b = sum_t du (x) hb */
    moe_matmul_backward(dx, moe_store_grad(s, L->id_hyper[8]), NULL, dM, x, moe_store_param(s, L->id_hyper[8]), T, d, ab, &L->work);
    memset(dz, 0, sizeof(float) * (size_t)T * (q + lam));
    moe_matmul_backward(dz, moe_store_grad(s, L->id_hyper[6]), moe_store_grad(s, L->id_hyper[7]), dhb, L->hy_z,
                        moe_store_param(s, L->id_hyper[6]), T, q + lam, b, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(dc + (size_t)t * q, dz + (size_t)t * (q + lam), sizeof(float) * (size_t)q);
        for (i = 0; i < lam; i++) glemb[i] += dz[(size_t)t * (q + lam) + q + i];
    }
    memset(dh1, 0, sizeof(float) * (size_t)T * h);
    moe_matmul_backward(dh1, moe_store_grad(s, L->id_hyper[3]), moe_store_grad(s, L->id_hyper[4]), dc, L->hy_h1,
                        moe_store_param(s, L->id_hyper[3]), T, h, q, &L->work);
    for (t = 0; t < T * h; t++) dh1[t] = L->hy_h1[t] > 0.0f ? dh1[t] : 0.0f;
    memset(dsig, 0, sizeof(float) * (size_t)T * e);
    moe_matmul_backward(dsig, moe_store_grad(s, L->id_hyper[1]), moe_store_grad(s, L->id_hyper[2]), dh1, L->hy_sig,
                        moe_store_param(s, L->id_hyper[1]), T, e, h, &L->work);
    /* sig_t = sum_{j not chosen by t} Q_j: dQ_j += sum over the tokens that did not choose j */
    for (j = 0; j < E; j++)
        for (t = 0; t < T; t++)
            if (L->gates[(size_t)t * E + j] == 0.0f)
                for (i = 0; i < e; i++) gQ[(size_t)j * e + i] += dsig[(size_t)t * e + i];
}

static int moe__assign_alloc(moe_assign *a, int cap, int T, int E) {
    a->token = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->expert = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->slot = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->weight = (float *)moe__calloc((size_t)cap, sizeof(float));
    a->offset = (int *)moe__calloc((size_t)E + 1, sizeof(int));
    a->tok_offset = (int *)moe__calloc((size_t)T + 1, sizeof(int));
    a->tok_index = (int *)moe__calloc((size_t)(cap > E ? cap : E), sizeof(int));
    return a->token && a->expert && a->slot && a->weight && a->offset && a->tok_offset && a->tok_index;
}

static void moe__assign_free(moe_assign *a) {
    MOE_FREE(a->token); MOE_FREE(a->expert); MOE_FREE(a->slot); MOE_FREE(a->weight);
    MOE_FREE(a->offset); MOE_FREE(a->tok_offset); MOE_FREE(a->tok_index);
    memset(a, 0, sizeof *a);
}

MOE__IMPL moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                    const char *prefix, int max_tokens) {
    int E, K, d, D, S, Ds, cap, rows_b, wide, ok;
    size_t TE;
    memset(L, 0, sizeof *L);
    L->id_router_b = L->id_noise_w = L->id_s_gate = L->id_s_up = L->id_s_down = L->id_s_b_up = L->id_s_b_down = -1;
    L->id_router_w = L->id_aoe_in = L->id_aoe_out = -1;
    if (moe_layer_config_validate(cfg, &L->err) != MOE_OK) return L->err.status;
    if (!s || s->allocated) return moe_err_set(&L->err, MOE_ERR_STATE, "moe_layer_init needs a store that is not allocated yet (declare every layer, then moe_store_alloc)");
    if (max_tokens <= 0 || max_tokens > (1 << 24)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "max_tokens must be in [1, 2^24], got %d", max_tokens);
    if (!prefix) prefix = "";
    L->cfg = *cfg;
    E = cfg->n_experts; K = cfg->top_k; d = cfg->d; D = cfg->d_ff;
    S = cfg->n_shared; Ds = cfg->d_ff_shared > 0 ? cfg->d_ff_shared : D;
    L->cfg.d_ff_shared = Ds;
    L->max_tokens = max_tokens;
    /* token choice needs T*K rows; expert choice E*ceil(K*T/E) <= K*T + E; GW broadcast T*E */
    cap = max_tokens * (cfg->gw_threshold > 0.0f ? E : K) + E;
    L->cap = cap;
    L->cfg.router_dim = cfg->router_dim > 0 ? cfg->router_dim : d;
    if (cfg->router == MOE_ROUTER_AOE) { /* router-free: the gate factors replace router and w_gate */
        L->id_aoe_in = moe__declare(L, s, prefix, "experts.w_gate_in", MOE_TENSOR_DECAY, E, cfg->aoe_rank, d);
        L->id_aoe_out = moe__declare(L, s, prefix, "experts.w_gate_out", MOE_TENSOR_DECAY, E, D, cfg->aoe_rank);
    } else {
        L->id_router_w = moe__declare(L, s, prefix, "router.w", MOE_TENSOR_DECAY, E, L->cfg.router_dim, 0);
    }
    if (cfg->router_bias) L->id_router_b = moe__declare(L, s, prefix, "router.b", 0, E, 0, 0);
    if (cfg->router == MOE_ROUTER_NOISY_TOPK) L->id_noise_w = moe__declare(L, s, prefix, "router.w_noise", MOE_TENSOR_DECAY, E, L->cfg.router_dim, 0);
    moe__declare_bank(L, s, prefix, "experts", E, D, &L->id_gate, &L->id_up, &L->id_down, &L->id_b_up, &L->id_b_down);
    if (S > 0) moe__declare_bank(L, s, prefix, "shared", S, Ds, &L->id_s_gate, &L->id_s_up, &L->id_s_down, &L->id_s_b_up, &L->id_s_b_down);
    {
        int k;
        for (k = 0; k < 11; k++) L->id_hyper[k] = -1;
    }
    if (cfg->hyper) moe__hyper_declare(L, s, prefix);
    if (L->err.status != MOE_OK) return L->err.status;
    TE = (size_t)max_tokens * E;
    rows_b = cap > S * max_tokens ? cap : S * max_tokens;
    wide = D > Ds ? D : Ds;
    L->logits = (float *)moe__calloc(TE, sizeof(float));
    L->probs = (float *)moe__calloc(TE, sizeof(float));
    L->gates = (float *)moe__calloc(TE, sizeof(float));
    L->noise = (float *)moe__calloc(TE, sizeof(float));
    L->noise_logits = (float *)moe__calloc(TE, sizeof(float));
    L->noisy = (float *)moe__calloc(TE, sizeof(float));
    L->lse = (float *)moe__calloc((size_t)max_tokens, sizeof(float));
    L->topk = (int *)moe__calloc((size_t)max_tokens * K, sizeof(int));
    L->thresh = (int *)moe__calloc(TE, sizeof(int));
    L->xg = (float *)moe__calloc((size_t)cap * d, sizeof(float));
    L->eout = (float *)moe__calloc((size_t)cap * d, sizeof(float));
    L->hg = (float *)moe__calloc((size_t)cap * D, sizeof(float));
    L->hu = (float *)moe__calloc((size_t)cap * D, sizeof(float));
    L->raw_i = (int *)moe__calloc((size_t)cap * 4, sizeof(int));
    L->raw_w = (float *)moe__calloc((size_t)cap, sizeof(float));
    L->work_a = (float *)moe__calloc((size_t)rows_b * wide, sizeof(float));
    L->work_b = (float *)moe__calloc((size_t)rows_b * wide, sizeof(float));
    L->dxg = (float *)moe__calloc((size_t)rows_b * d, sizeof(float));
    L->deout = (float *)moe__calloc((size_t)rows_b * d, sizeof(float));
    L->dgate = (float *)moe__calloc(TE, sizeof(float));
    L->dlogits = (float *)moe__calloc(TE, sizeof(float));
    L->dnoise_logits = (float *)moe__calloc(TE, sizeof(float));
    L->aux_tmp = (float *)moe__calloc((size_t)E * 5, sizeof(float));
    L->stat_load = (float *)moe__calloc((size_t)E, sizeof(float));
    L->stat_prob = (float *)moe__calloc((size_t)E, sizeof(float));
    L->uncertain = (int *)moe__calloc((size_t)max_tokens, sizeof(int));
    if (cfg->hyper) {
        size_t T = (size_t)max_tokens, ab = (size_t)cfg->hyper_adapter * cfg->hyper_width;
        size_t zq = (size_t)cfg->hyper_cond + cfg->hyper_layer_dim, ob = ab + (size_t)cfg->hyper_width;
        float **hb[16];
        size_t hn[16];
        int k, nb = 0;
#define MOE__HY(ptr, n) (hb[nb] = &(ptr), hn[nb++] = (n))
        MOE__HY(L->hy_sig, T * cfg->hyper_embed); MOE__HY(L->hy_h1, T * cfg->hyper_hidden); MOE__HY(L->hy_c, T * cfg->hyper_cond);
        MOE__HY(L->hy_z, T * zq); MOE__HY(L->hy_hb, T * cfg->hyper_width); MOE__HY(L->hy_m, T * ab);
        MOE__HY(L->hy_u, T * cfg->hyper_adapter); MOE__HY(L->hy_o, T * ob); MOE__HY(L->hy_out, T * d);
        MOE__HY(L->hy_do, T * ob); MOE__HY(L->hy_dm, T * ab); MOE__HY(L->hy_dhb, T * cfg->hyper_width);
        MOE__HY(L->hy_dz, T * zq); MOE__HY(L->hy_dc, T * cfg->hyper_cond); MOE__HY(L->hy_dh1, T * cfg->hyper_hidden);
        MOE__HY(L->hy_dsig, T * cfg->hyper_embed);
#undef MOE__HY
        for (k = 0; k < nb; k++) *hb[k] = (float *)moe__calloc(hn[k], sizeof(float));
    }
    if (cfg->router == MOE_ROUTER_AOE) {
        size_t r = (size_t)cfg->aoe_rank;
        L->aoe_c = (float *)moe__calloc(TE * r, sizeof(float));
        L->aoe_dc = (float *)moe__calloc(TE * r, sizeof(float));
        L->aoe_cg = (float *)moe__calloc((size_t)cap * r, sizeof(float));
        L->aoe_dcg = (float *)moe__calloc((size_t)cap * r, sizeof(float));
    }
    L->bypass = (float *)moe__calloc((size_t)max_tokens, sizeof(float));
    ok = L->uncertain && L->bypass && (!cfg->hyper || (L->hy_sig && L->hy_h1 && L->hy_c && L->hy_z && L->hy_hb && L->hy_m &&
         L->hy_u && L->hy_o && L->hy_out && L->hy_do && L->hy_dm && L->hy_dhb && L->hy_dz && L->hy_dc && L->hy_dh1 && L->hy_dsig)) && (cfg->router != MOE_ROUTER_AOE || (L->aoe_c && L->aoe_dc && L->aoe_cg && L->aoe_dcg)) && L->logits && L->probs && L->gates && L->noise && L->noise_logits && L->noisy && L->lse &&
         L->topk && L->thresh && L->xg && L->eout && L->hg && L->hu && L->raw_i && L->raw_w &&
         L->work_a && L->work_b && L->dxg && L->deout && L->dgate && L->dlogits && L->dnoise_logits &&
         L->aux_tmp && L->stat_load && L->stat_prob && moe__assign_alloc(&L->routed, cap, max_tokens, E);
    if (ok && S > 0) {
        ok = moe__assign_alloc(&L->shared, S * max_tokens, max_tokens, S);
        L->s_xg = (float *)moe__calloc((size_t)S * max_tokens * d, sizeof(float));
        L->s_eout = (float *)moe__calloc((size_t)S * max_tokens * d, sizeof(float));
        L->s_hg = (float *)moe__calloc((size_t)S * max_tokens * Ds, sizeof(float));
        L->s_hu = (float *)moe__calloc((size_t)S * max_tokens * Ds, sizeof(float));
        ok = ok && L->s_xg && L->s_eout && L->s_hg && L->s_hu;
    }
    { /* the work buffer: the largest of the kernel calls' scratch; an expert gets each token
         at most once, so at most max_tokens rows. (K, N) of the matmuls (AoE, HyperMoE last): */
        int nt = moe_num_threads(), r = cfg->router == MOE_ROUTER_AOE ? cfg->aoe_rank : 0, k;
        int hw = cfg->hyper_width, ab = cfg->hyper_adapter * hw;
        int mm[8][2] = {{L->cfg.router_dim, E}, {d, E * r}, {r, D}, {cfg->hyper_embed, cfg->hyper_hidden},
                        {cfg->hyper_hidden, cfg->hyper_cond}, {cfg->hyper_cond + cfg->hyper_layer_dim, hw}, {d, ab}, {ab + hw, d}};
        size_t need = moe_experts_work_floats(max_tokens, E, d, D, cfg->expert, nt), w;
        if (S > 0 && (w = moe_experts_work_floats(max_tokens, S, d, Ds, cfg->expert, nt)) > need) need = w;
        for (k = 0; k < (cfg->hyper ? 8 : 3); k++)
            if ((w = moe_matmul_work_floats(max_tokens, mm[k][0], mm[k][1], nt)) > need) need = w;
        ok = ok && moe_work_alloc(&L->work, need, nt) == MOE_OK;
    }
    if (!ok) {
        moe_layer_free(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the activations of %d tokens", max_tokens);
    }
    L->stats.load = L->stat_load;
    L->stats.mean_prob = L->stat_prob;
    L->aux_grad_scale = 1.0f;
    return MOE_OK;
}

MOE__IMPL void moe_layer_free(moe_layer *L) {
    float **fp[] = {&L->logits, &L->probs, &L->gates, &L->noise, &L->noise_logits, &L->noisy, &L->lse,
                    &L->xg, &L->eout, &L->hg, &L->hu, &L->s_xg, &L->s_hg, &L->s_hu, &L->s_eout,
                    &L->raw_w, &L->work_a, &L->work_b, &L->dxg, &L->deout, &L->dgate, &L->dlogits,
                    &L->dnoise_logits, &L->aux_tmp, &L->stat_load, &L->stat_prob, &L->bypass,
                    &L->aoe_c, &L->aoe_dc, &L->aoe_cg, &L->aoe_dcg, &L->hy_sig, &L->hy_h1, &L->hy_c, &L->hy_z,
                    &L->hy_hb, &L->hy_m, &L->hy_u, &L->hy_o, &L->hy_out, &L->hy_do, &L->hy_dm, &L->hy_dhb,
                    &L->hy_dz, &L->hy_dc, &L->hy_dh1, &L->hy_dsig};
    size_t i;
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) {
        MOE_FREE(*fp[i]);
        *fp[i] = NULL;
    }
    MOE_FREE(L->topk); MOE_FREE(L->thresh); MOE_FREE(L->raw_i); MOE_FREE(L->uncertain);
    L->topk = L->thresh = L->raw_i = L->uncertain = NULL;
    moe__assign_free(&L->routed);
    moe__assign_free(&L->shared);
    moe_work_free(&L->work);
    L->T = 0;
}

MOE__IMPL moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads) {
    moe_expert_weights w;
    float *(*get)(const moe_store *, int) = grads ? moe_store_grad : moe_store_param;
    w.gate = get(s, shared ? L->id_s_gate : L->id_gate);
    w.up = get(s, shared ? L->id_s_up : L->id_up);
    w.down = get(s, shared ? L->id_s_down : L->id_down);
    w.b_up = get(s, shared ? L->id_s_b_up : L->id_b_up);
    w.b_down = get(s, shared ? L->id_s_b_down : L->id_b_down);
    return w;
}

MOE__IMPL void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int ids[] = {L->id_router_w, L->id_router_b, L->id_noise_w, L->id_aoe_in, L->id_aoe_out, L->id_gate, L->id_up, L->id_down,
                 L->id_b_up, L->id_b_down, L->id_s_gate, L->id_s_up, L->id_s_down, L->id_s_b_up, L->id_s_b_down};
    size_t k, i;
    for (k = 0; k < 11; k++) /* HyperMoE tensors (shared ones are re-drawn per layer: harmless) */
        if (L->id_hyper[k] >= 0) moe__hyper_init_tensor(&s->tensors[L->id_hyper[k]], moe_store_param(s, L->id_hyper[k]), rng);
    for (k = 0; k < sizeof ids / sizeof ids[0]; k++) {
        const moe_tensor *t;
        float *p = moe_store_param(s, ids[k]);
        if (!p) continue;
        t = &s->tensors[ids[k]];
        if (ids[k] == L->id_router_w) {
            for (i = 0; i < t->numel; i++) p[i] = L->cfg.router_init_std * moe_rng_normal(rng);
        } else if (t->ndim == 3) { /* (E, out, in): nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) */
            float bound = 1.0f / sqrtf((float)t->shape[2]);
            for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
        } else {
            memset(p, 0, t->numel * sizeof(float)); /* biases, noise projection (Shazeer: zero) */
        }
    }
}

/* token-choice routers: top-k ids and dense gates of token t */
static void moe__route_token(moe_layer *L, int t) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, s;
    const float *p = L->probs + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K;
    float *g = L->gates + (size_t)t * E;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        const float *H = L->noisy + (size_t)t * E;
        int *th = L->thresh + (size_t)t * E, j;
        float mx, sum = 0.0f;
        moe__topk_row(H, E, K + 1, th); /* th is scratch here: the k+1 best */
        for (s = 0; s < K; s++) idx[s] = th[s];
        {
            int kth = th[K - 1], k1th = th[K];
            for (j = 0; j < E; j++) th[j] = kth;
            for (s = 0; s < K; s++) th[idx[s]] = k1th; /* selected: compare with the (k+1)-th */
        }
        mx = H[idx[0]];
        for (s = 0; s < K; s++) sum += expf(H[idx[s]] - mx);
        for (s = 0; s < K; s++) g[idx[s]] = expf(H[idx[s]] - mx) / sum;
        return;
    }
    moe__topk_row(p, E, K, idx);
    if (c->renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
}

/* GW-MoE: marks the uncertain tokens (serial: the slot cap counts in sequence order) and
   gives them the full softmax as gates (paper) or a bypass weight (released code). */
static void moe__gw_mark(moe_layer *L, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, t, e, used = 0, seq = L->seq_len > 0 ? L->seq_len : T;
    double norm = c->gw_normalized ? log((double)E) : 1.0;
    L->stats.broadcast = 0;
    for (t = 0; t < T; t++) {
        const float *p = L->probs + (size_t)t * E;
        double u = 0.0;
        L->uncertain[t] = 0;
        L->bypass[t] = 0.0f;
        if (!L->gw_active || c->gw_threshold <= 0.0f) continue;
        if (t % seq == 0) used = 0;
        for (e = 0; e < E; e++) u -= (double)p[e] * log((double)p[e] + 1e-5);
        if (u / norm < c->gw_threshold || (c->gw_slots > 0 && used >= c->gw_slots)) continue;
        used++;
        L->uncertain[t] = 1;
        L->stats.broadcast++;
        if (c->gw_released) {
            memset(L->gates + (size_t)t * E, 0, sizeof(float) * (size_t)E);
            L->bypass[t] = p[E - 1];
        } else {
            memcpy(L->gates + (size_t)t * E, p, sizeof(float) * (size_t)E);
        }
    }
}

/* Builds the raw (token, expert, slot, weight) list of the routed bank; returns its length.
   Counts requested picks per expert into `picks` (E). */
static int moe__build_assignments(moe_layer *L, int T, float *picks) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, n = 0, t, s, e;
    int *rt = L->raw_i, *re = rt + L->cap, *rs = re + L->cap, *keep = rs + L->cap;
    float *rw = L->raw_w;
    for (e = 0; e < E; e++) picks[e] = 0.0f;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        int C = (int)(((long long)K * T + E - 1) / E);
        moe__scored *sc = (moe__scored *)moe__calloc((size_t)T, sizeof *sc);
        int *chosen = (int *)moe__calloc((size_t)C, sizeof(int));
        MOE_ASSERT(sc && chosen);
        if (C > T) C = T;
        for (e = 0; e < E; e++) {
            for (t = 0; t < T; t++) {
                sc[t].score = L->probs[(size_t)t * E + e];
                sc[t].index = t;
            }
            qsort(sc, (size_t)T, sizeof *sc, moe__scored_cmp);
            for (s = 0; s < C; s++) chosen[s] = sc[s].index;
            qsort(chosen, (size_t)C, sizeof(int), moe__int_cmp);
            for (s = 0; s < C; s++) {
                float p = L->probs[(size_t)chosen[s] * E + e];
                rt[n] = chosen[s]; re[n] = e; rs[n] = e; rw[n] = p;
                L->gates[(size_t)chosen[s] * E + e] = p;
                n++;
            }
            picks[e] = (float)C;
        }
        MOE_FREE(sc);
        MOE_FREE(chosen);
        return n;
    }
    for (t = 0; t < T; t++)
        for (s = 0; s < K; s++) picks[L->topk[(size_t)t * K + s]] += 1.0f;
    if (c->capacity_factor > 0.0f) {
        /* admission: every first choice before any second choice, tokens in index order */
        int C = (int)ceil((double)c->capacity_factor * K * T / E);
        int *count = (int *)moe__calloc((size_t)E, sizeof(int));
        MOE_ASSERT(count);
        for (s = 0; s < K; s++)
            for (t = 0; t < T; t++) {
                if (L->uncertain[t]) continue; /* broadcast tokens bypass capacity */
                e = L->topk[(size_t)t * K + s];
                keep[(size_t)t * K + s] = count[e] < C;
                if (count[e] < C) count[e]++;
            }
        MOE_FREE(count);
    }
    for (t = 0; t < T; t++) {
        if (L->uncertain[t]) { /* GW-MoE broadcast: every expert, in expert order */
            if (!c->gw_released)
                for (e = 0; e < E; e++) {
                    rt[n] = t; re[n] = e; rs[n] = e; rw[n] = L->gates[(size_t)t * E + e];
                    n++;
                }
            continue;
        }
        for (s = 0; s < K; s++) {
            if (c->capacity_factor > 0.0f && !keep[(size_t)t * K + s]) continue;
            e = L->topk[(size_t)t * K + s];
            rt[n] = t; re[n] = e; rs[n] = s; rw[n] = L->gates[(size_t)t * E + e];
            n++;
        }
    }
    return n;
}

/* auxiliary losses of the last forward and the routing statistics */
static void moe__layer_aux(moe_layer *L, int T, const float *picks) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, t, e;
    float *f = L->aux_tmp, *P = f + E, *imp = P + E, *load = imp + E;
    float *pn = (float *)moe__calloc((size_t)E, sizeof(float));
    double gate_h = 0.0, acc, z = 0.0;
    moe_routing_stats *st = &L->stats;
    MOE_ASSERT(pn);
    for (e = 0; e < E; e++) P[e] = imp[e] = load[e] = f[e] = 0.0f;
    /* P_i: mean normalised probability, summed in token order */
    for (t = 0; t < T; t++) {
        moe__norm_probs(L, t, pn);
        for (e = 0; e < E; e++) P[e] += pn[e];
        gate_h += moe__entropy(pn, E);
    }
    for (e = 0; e < E; e++) P[e] /= (float)T;
    /* f_i for the balance loss */
    if (c->balance == MOE_BALANCE_SWITCH) {
        for (t = 0; t < T; t++) {
            const float *p = L->probs + (size_t)t * E;
            int best = 0;
            for (e = 1; e < E; e++)
                if (p[e] > p[best]) best = e;
            f[best] += 1.0f;
        }
        for (e = 0; e < E; e++) f[e] /= (float)T;
    } else if (c->balance == MOE_BALANCE_MIXTRAL) {
        for (e = 0; e < E; e++) f[e] = picks[e] / (float)T;
    } else if (c->balance == MOE_BALANCE_DEEPSEEK) {
        for (e = 0; e < E; e++) f[e] = picks[e] * (float)E / ((float)K * (float)T);
    }
    acc = 0.0;
    for (e = 0; e < E; e++) acc += (double)f[e] * P[e];
    st->aux_balance = c->balance == MOE_BALANCE_NONE ? 0.0f : (float)(c->balance_coef * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc);
    for (t = 0; t < T; t++) z += (double)L->lse[t] * L->lse[t];
    st->aux_z = (float)(c->z_coef * z / T);
    st->aux_cv = 0.0f;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) imp[e] += L->gates[(size_t)t * E + e];
        if (L->has_noise) {
            for (t = 0; t < T; t++)
                for (e = 0; e < E; e++) {
                    size_t i = (size_t)t * E + e;
                    float sd = moe__softplus(L->noise_logits[i]) + c->noise_eps;
                    float u = (L->logits[i] - L->noisy[(size_t)t * E + L->thresh[i]]) / sd;
                    load[e] += 0.5f * erfcf(-u * 0.70710678118654752f);
                }
        } else {
            for (e = 0; e < E; e++) load[e] = picks[e];
        }
        st->aux_cv = moe__cv2(imp, E, c->importance_coef, NULL) + moe__cv2(load, E, c->load_coef, NULL);
    }
    st->aux_total = st->aux_balance + st->aux_z + st->aux_cv;
    /* statistics */
    st->tokens = T;
    /* broadcast (GW) tokens are outside the requested/kept/dropped accounting */
    st->kept = L->routed.n - (c->gw_released ? 0 : E * st->broadcast);
    st->requested = -K * st->broadcast;
    for (e = 0; e < E; e++) st->requested += (int)picks[e];
    st->dropped = st->requested - st->kept;
    st->drop_rate = st->requested ? (float)st->dropped / (float)st->requested : 0.0f;
    for (e = 0; e < E; e++) { /* a broadcast token adds one assignment to every expert: not kept ones */
        int n_e = L->routed.offset[e + 1] - L->routed.offset[e] - (c->gw_released ? 0 : st->broadcast);
        st->load[e] = st->kept ? (float)n_e / (float)st->kept : 0.0f;
        st->mean_prob[e] = P[e];
    }
    st->load_entropy = (float)moe__entropy(st->load, E);
    st->gate_entropy = (float)(gate_h / T);
    MOE_FREE(pn);
}

/* ---- AoE: the router-free path (logits are norms of each expert's low-rank cache) ---- */

/* C = x . W_in^T (T, E r) for every expert; logits (T, E) = ||C_e|| */
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, t;
    moe_matmul_forward(L->aoe_c, x, moe_store_param(s, L->id_aoe_in), NULL, T, L->cfg.d, E * r, &L->work);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            const float *c = L->aoe_c + ((size_t)t * E + e) * r;
            double ss = 0.0;
            for (j = 0; j < r; j++) ss += (double)c[j] * c[j];
            L->logits[(size_t)t * E + e] = (float)sqrt(ss);
        }
    }
}

/* the chosen experts' caches, gathered, then h_gate = C_e . W_out_e^T per expert */
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, i, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->id_aoe_out);
    for (i = 0; i < a->n; i++)
        memcpy(L->aoe_cg + (size_t)i * r, L->aoe_c + ((size_t)a->token[i] * E + a->expert[i]) * r, sizeof(float) * (size_t)r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_forward(L->hg + (size_t)lo * D, L->aoe_cg + (size_t)lo * r, wout + (size_t)e * D * r, NULL, n, r, D, &L->work);
    }
}

/* d h_gate (in work_a) -> d W_out and the gathered caches' gradient aoe_dcg */
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->id_aoe_out);
    float *gout = moe_store_grad(s, L->id_aoe_out);
    memset(L->aoe_dcg, 0, sizeof(float) * (size_t)a->n * r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_backward(L->aoe_dcg + (size_t)lo * r, gout + (size_t)e * D * r, NULL, L->work_a + (size_t)lo * D,
                                L->aoe_cg + (size_t)lo * r, wout + (size_t)e * D * r, n, r, D, &L->work);
    }
}

/* dC = the chosen experts' cache gradients + dlogit * C / ||C||; then dW_in and dx */
static void moe__aoe_logits_backward(moe_layer *L, moe_store *s, float *dx, const float *x) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, T = L->T, i, t;
    const moe_assign *a = &L->routed;
    size_t n = (size_t)T * E * r;
    memset(L->aoe_dc, 0, sizeof(float) * n);
    for (i = 0; i < a->n; i++) /* each (token, expert) appears once: plain copies */
        memcpy(L->aoe_dc + ((size_t)a->token[i] * E + a->expert[i]) * r, L->aoe_dcg + (size_t)i * r, sizeof(float) * (size_t)r);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            size_t k = (size_t)t * E + e;
            const float *c = L->aoe_c + k * r;
            float *dc = L->aoe_dc + k * r, norm = L->logits[k];
            float g = L->dlogits[k] / (norm > 1e-12f ? norm : 1e-12f);
            for (j = 0; j < r; j++) dc[j] += g * c[j];
        }
    }
    moe_matmul_backward(dx, moe_store_grad(s, L->id_aoe_in), NULL, L->aoe_dc, x, moe_store_param(s, L->id_aoe_in), T,
                        L->cfg.d, E * r, &L->work);
}

static moe_status moe__layer_check(moe_layer *L, const moe_store *s) {
    if (!L->logits) return moe_err_set(&L->err, MOE_ERR_STATE, "layer is not initialised (moe_layer_init failed or was not called)");
    if (!s || !s->allocated || L->id_down >= s->count) return moe_err_set(&L->err, MOE_ERR_STATE, "the store is not allocated or does not hold this layer's tensors");
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                       int T, const float *noise) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, d = c->d, S = c->n_shared, t, n;
    size_t TE = (size_t)T * E, i;
    moe_expert_weights w;
    float *picks = L->aux_tmp + 4 * E; /* requested picks per expert */
    const float *rin;
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (!y || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer forward: x and y must not be NULL");
    if (T <= 0 || T > L->max_tokens) return moe_err_set(&L->err, MOE_ERR_SHAPE, "layer forward: T = %d tokens, the layer was sized for 1..%d", T, L->max_tokens);
    L->T = 0;
    /* 1. router logits and probabilities */
    if (c->router_dim != d && !L->router_input)
        return moe_err_set(&L->err, MOE_ERR_STATE, "router_dim %d differs from d %d: set router_input before forward", c->router_dim, d);
    rin = L->router_input ? L->router_input : x;
    if (c->router == MOE_ROUTER_AOE)
        moe__aoe_logits(L, s, x, T);
    else
        moe_matmul_forward(L->logits, rin, moe_store_param(s, L->id_router_w), moe_store_param(s, L->id_router_b), T, c->router_dim, E, &L->work);
    for (t = 0; t < T; t++) {
        const float *z = L->logits + (size_t)t * E;
        float mx = -FLT_MAX;
        double sum = 0.0;
        int e;
        for (e = 0; e < E; e++) mx = z[e] > mx ? z[e] : mx;
        for (e = 0; e < E; e++) sum += exp((double)(z[e] - mx));
        L->lse[t] = (float)(log(sum) + mx);
    }
    if (c->router == MOE_ROUTER_SIGMOID)
        for (i = 0; i < TE; i++) L->probs[i] = moe__sigmoid(L->logits[i]);
    else
        moe_softmax_forward(L->probs, L->logits, T, E);
    L->has_noise = 0;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        moe_matmul_forward(L->noise_logits, rin, moe_store_param(s, L->id_noise_w), NULL, T, c->router_dim, E, &L->work);
        L->has_noise = noise != NULL;
        for (i = 0; i < TE; i++) {
            L->noise[i] = noise ? noise[i] : 0.0f;
            L->noisy[i] = L->logits[i] + L->noise[i] * (moe__softplus(L->noise_logits[i]) + c->noise_eps);
        }
    }
    /* 2. selection: dense gates, then the assignment list */
    memset(L->gates, 0, TE * sizeof(float));
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        for (i = 0; i < (size_t)T * K; i++) L->topk[i] = -1;
    } else {
        MOE_OMP_FOR_IF(T > 256)
        for (t = 0; t < T; t++) moe__route_token(L, t);
    }
    moe__gw_mark(L, T);
    n = moe__build_assignments(L, T, picks);
    st = moe_dispatch(&L->routed, L->raw_i, L->raw_i + L->cap, L->raw_i + 2 * L->cap, L->raw_w, n, T, E, &L->err);
    if (st != MOE_OK) return st;
    /* 3. experts on gathered tokens, then combine (shared experts first, then slots 0..k-1) */
    if (S > 0) {
        int *rt = L->raw_i, *re = rt + L->cap, *rs = re + L->cap, k;
        float *rw = L->raw_w;
        for (t = 0, k = 0; t < T; t++) {
            int j;
            for (j = 0; j < S; j++, k++) { rt[k] = t; re[k] = j; rs[k] = j; rw[k] = 1.0f; }
        }
        st = moe_dispatch(&L->shared, rt, re, rs, rw, S * T, T, S, &L->err);
        if (st != MOE_OK) return st;
        w = moe_layer_experts(L, s, 1, 0);
        moe_gather(L->s_xg, x, &L->shared, d);
        moe_experts_forward(L->s_eout, L->s_hg, L->s_hu, L->s_xg, &w, L->shared.offset, S, d, c->d_ff_shared, c->expert, c->activation, &L->work);
        moe_combine_forward(y, L->s_eout, &L->shared, d, 0);
    }
    w = moe_layer_experts(L, s, 0, 0);
    moe_gather(L->xg, x, &L->routed, d);
    if (c->router == MOE_ROUTER_AOE) moe__aoe_gate_forward(L, s); /* h_gate from the caches */
    moe_experts_forward(L->eout, L->hg, L->hu, L->xg, &w, L->routed.offset, E, d, c->d_ff, c->expert, c->activation, &L->work);
    moe_combine_forward(y, L->eout, &L->routed, d, S > 0);
    if (c->gw_released && L->stats.broadcast > 0)
        for (t = 0; t < T; t++)
            if (L->bypass[t] != 0.0f) {
                int j;
                for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->bypass[t] * x[(size_t)t * d + j];
            }
    if (c->hyper) moe__hyper_forward(L, s, y, x, T);
    moe__layer_aux(L, T, picks);
    L->T = T;
    return MOE_OK;
}

/* dlogits (and dnoise_logits) of token t from dgate, the router kind and the aux losses */
static void moe__router_backward_token(moe_layer *L, int t, const float *dimp, const float *dload,
                                       const float *dP) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, e, s;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *g = L->gates + r, *z = L->logits + r;
    float *dg = L->dgate + r, *dz = L->dlogits + r, *dzn = L->dnoise_logits + r;
    const int *idx = L->topk + (size_t)t * K;
    float dot;
    /* importance = sum_t gates: its gradient joins dgate on the selected experts */
    if (dimp)
        for (s = 0; s < K; s++) dg[idx[s]] += dimp[idx[s]];
    if (L->uncertain[t]) { /* GW broadcast: gates are the full softmax (or p_{E-1} bypass) */
        dot = 0.0f;
        for (e = 0; e < E; e++) dot += dg[e] * p[e];
        for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
    } else switch (c->router) {
    case MOE_ROUTER_TOPK:
    case MOE_ROUTER_EXPERT_CHOICE:
    case MOE_ROUTER_AOE: /* top-k on the norm logits: the same two weightings */
        if ((c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_AOE) && c->renormalize) { /* g = softmax over the selected logits */
            dot = 0.0f;
            for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
            for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
        } else { /* g = softmax over all E, read at the selected experts */
            dot = 0.0f;
            for (e = 0; e < E; e++) dot += dg[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
        }
        break;
    case MOE_ROUTER_SIGMOID:
        if (c->renormalize) {
            float sum = 0.0f;
            for (s = 0; s < K; s++) sum += p[idx[s]];
            if (sum < 1e-20f) sum = 1e-20f;
            dot = 0.0f;
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
        break;
    case MOE_ROUTER_NOISY_TOPK: {
        const float *xi = L->noise + r, *zn = L->noise_logits + r;
        dot = 0.0f;
        for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
        for (s = 0; s < K; s++) {
            float dH;
            e = idx[s];
            dH = g[e] * (dg[e] - dot);
            dz[e] += dH;
            dzn[e] += dH * xi[e] * moe__sigmoid(zn[e]);
        }
        if (dload && L->has_noise) { /* smooth load: Phi((z_i - thr_i) / sd_i) */
            const float *H = L->noisy + r;
            const int *th = L->thresh + r;
            for (e = 0; e < E; e++) {
                float sd = moe__softplus(zn[e]) + c->noise_eps;
                int m = th[e];
                float u = (z[e] - H[m]) / sd;
                float du = dload[e] * 0.3989422804014327f * expf(-0.5f * u * u);
                float dthr = -du / sd, dsd = -du * u / sd;
                dz[e] += du / sd;
                dz[m] += dthr; /* H_m = z_m + xi_m * sd_m */
                dzn[m] += dthr * xi[m] * moe__sigmoid(zn[m]);
                dzn[e] += dsd * moe__sigmoid(zn[e]);
            }
        }
        break;
    }
    }
    /* balance loss through P (normalised probabilities) */
    if (dP) {
        if (c->router == MOE_ROUTER_SIGMOID) {
            float sum = 0.0f;
            dot = 0.0f;
            for (e = 0; e < E; e++) sum += p[e];
            for (e = 0; e < E; e++) dot += dP[e] * p[e] / sum;
            for (e = 0; e < E; e++) dz[e] += (dP[e] - dot) / sum * p[e] * (1.0f - p[e]);
        } else {
            dot = 0.0f;
            for (e = 0; e < E; e++) dot += dP[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dP[e] - dot);
        }
    }
    /* z-loss: d/dz_j of c/T * lse^2 = 2c/T * lse * softmax(z)_j */
    if (c->z_coef > 0.0f) {
        float a = 2.0f * c->z_coef * L->aux_grad_scale / (float)L->T * L->lse[t];
        for (e = 0; e < E; e++) dz[e] += a * expf(z[e] - L->lse[t]);
    }
}

MOE__IMPL moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                        const float *x) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, S = c->n_shared, T = L->T, t, i, e;
    size_t TE = (size_t)T * E;
    moe_expert_weights w, gw;
    float *f = L->aux_tmp, *imp = f + 2 * E, *load = f + 3 * E;
    float *dimp = NULL, *dload = NULL, *dP = NULL, *buf, *drin;
    const float *rin;
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "layer backward called without a forward before it");
    if (!dx || !dy || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: dx, dy and x must not be NULL");
    if (L->router_input && !L->d_router_input) return moe_err_set(&L->err, MOE_ERR_STATE, "router_input is set: set d_router_input too before backward");
    /* 1. routed bank: combine -> experts -> gather; the combine yields dL/dweight */
    memset(L->dgate, 0, TE * sizeof(float));
    memset(L->dlogits, 0, TE * sizeof(float));
    memset(L->dnoise_logits, 0, TE * sizeof(float));
    moe_combine_backward(L->deout, L->raw_w, dy, L->eout, &L->routed, d);
    for (i = 0; i < L->routed.n; i++) L->dgate[(size_t)L->routed.token[i] * E + L->routed.expert[i]] = L->raw_w[i];
    if (c->hyper) moe__hyper_backward(L, s, dx, dy, x); /* no gradient to the router: the set is discrete */
    if (c->gw_released && L->stats.broadcast > 0) /* y += p_{E-1} x for broadcast tokens */
        for (t = 0; t < T; t++)
            if (L->uncertain[t]) {
                const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
                float dot = 0.0f;
                int j;
                for (j = 0; j < d; j++) {
                    dot += g[j] * xt[j];
                    dx[(size_t)t * d + j] += L->bypass[t] * g[j];
                }
                L->dgate[(size_t)t * E + E - 1] = dot;
            }
    w = moe_layer_experts(L, s, 0, 0);
    gw = moe_layer_experts(L, s, 0, 1);
    moe_experts_backward(L->dxg, &gw, L->deout, L->xg, L->hg, L->hu, &w, L->routed.offset, E, d, c->d_ff,
                         c->expert, c->activation, L->work_a, L->work_b, &L->work);
    moe_gather_backward(dx, L->dxg, &L->routed, d);
    if (c->router == MOE_ROUTER_AOE) moe__aoe_gate_backward(L, s); /* work_a holds d h_gate */
    if (S > 0) {
        w = moe_layer_experts(L, s, 1, 0);
        gw = moe_layer_experts(L, s, 1, 1);
        moe_combine_backward(L->deout, NULL, dy, L->s_eout, &L->shared, d);
        moe_experts_backward(L->dxg, &gw, L->deout, L->s_xg, L->s_hg, L->s_hu, &w, L->shared.offset, S, d,
                             c->d_ff_shared, c->expert, c->activation, L->work_a, L->work_b, &L->work);
        moe_gather_backward(dx, L->dxg, &L->shared, d);
    }
    /* 2. auxiliary-loss gradients with respect to their per-expert pieces */
    buf = (float *)moe__calloc((size_t)E * 3, sizeof(float));
    if (!buf) return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory in layer backward");
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        dimp = buf;
        moe__cv2(imp, E, c->importance_coef * L->aux_grad_scale, dimp);
        if (L->has_noise) {
            dload = buf + E;
            moe__cv2(load, E, c->load_coef * L->aux_grad_scale, dload);
        }
    }
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) {
        float scale = c->balance_coef * L->aux_grad_scale * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0f : (float)E) / (float)T;
        dP = buf + 2 * E;
        for (e = 0; e < E; e++) dP[e] = scale * f[e]; /* f is a constant */
    }
    /* 3. router: per token (owner computes), then the two small matmuls */
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_backward_token(L, t, dimp, dload, dP);
    MOE_FREE(buf);
    rin = L->router_input ? L->router_input : x;
    drin = L->router_input ? L->d_router_input : dx;
    if (c->router == MOE_ROUTER_AOE)
        moe__aoe_logits_backward(L, s, dx, x);
    else
        moe_matmul_backward(drin, moe_store_grad(s, L->id_router_w), moe_store_grad(s, L->id_router_b), L->dlogits, rin,
                            moe_store_param(s, L->id_router_w), T, c->router_dim, E, &L->work);
    if (c->router == MOE_ROUTER_NOISY_TOPK)
        moe_matmul_backward(drin, moe_store_grad(s, L->id_noise_w), NULL, L->dnoise_logits, rin,
                            moe_store_param(s, L->id_noise_w), T, c->router_dim, E, &L->work);
    return MOE_OK;
}

