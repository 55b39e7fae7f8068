/* ============================================================================================
   >>moe:router_hyper  HyperMoE: a hyper-expert generated from the experts a token did NOT
                       choose (Zhao et al. 2024, arXiv 2402.12656)
   ============================================================================================
   An extension of any family (it reads the gates). For token t:
     sig_t = sum of the expert embeddings Q_j of the experts t did not choose;
     c_t = proc(sig_t) (Linear-ReLU-Linear); z_t = [c_t ; layer_emb[l]]; hb_t = ReLU(net(z_t));
     u_t[j] = sum_k (M_t[j][k] + head_down_b[j][k]) hb_t[k]   with M = x . head_down^T, (T, a b);
     act = ReLU(u);  out_t = ([act_t ; 1] (x) hb_t) . head_up^T   (the "1" row is the up bias head);
     y_t += out_t.
   hyper_head_bias (the official code's heads are nn.Linear with biases): each generated
   matrix and vector also gets a learned constant, W_dn += head_down.bias (a, d), b_dn +=
   head_down_b.bias (a), [W_up | b_up] += head_up.bias (d, a + 1):
     u_t += x_t . head_down.bias^T + head_down_b.bias;  out_t += [act_t ; 1] . head_up.bias^T.
   The generated adapter weights W_dn(t) = sum_k hb_k head_down[:, k] are never materialised:
   both products are single GEMMs over all tokens. net and the heads are shared by every layer
   (found by name in the store), the embeddings and the processor are per layer. The selection
   is discrete: no gradient reaches the router through the hyper-expert. */

/* indices into moe_router_hyper.id */
enum {
    MOE_HYPER_EXPERT_EMB = 0, MOE_HYPER_PROC1_W, MOE_HYPER_PROC1_B, MOE_HYPER_PROC2_W, MOE_HYPER_PROC2_B, /* this layer */
    MOE_HYPER_LAYER_EMB, MOE_HYPER_NET_W, MOE_HYPER_NET_B, MOE_HYPER_HEAD_DOWN, MOE_HYPER_HEAD_DOWN_B,   /* shared */
    MOE_HYPER_HEAD_UP, MOE_HYPER_HEAD_DOWN_BIAS, MOE_HYPER_HEAD_DOWN_B_BIAS, MOE_HYPER_HEAD_UP_BIAS, /* shared, */
    MOE_HYPER_TENSORS                                                                                 /* with hyper_head_bias */
};

typedef struct moe_router_hyper {
    int id[MOE_HYPER_TENSORS]; /* tensor ids, in the order of the enum above                   */
    /* forward caches (T rows each) */
    float *sig;       /* (T, e) the unchosen experts' embeddings, summed                      */
    float *h1;        /* (T, h) ReLU(proc1(sig))                                               */
    float *cond;      /* (T, q) c = proc2(h1)                                                   */
    float *z;         /* (T, q + lam) [c ; layer embedding]                                    */
    float *hb;        /* (T, b) ReLU(net(z))                                                    */
    float *m;         /* (T, a b) x . head_down^T                                               */
    float *u;         /* (T, a) the adapter's pre-activation                                    */
    float *o;         /* (T, (a + 1) b) [ReLU(u) ; 1] (x) hb                                     */
    float *out;       /* (T, d) the hyper-expert's output                                        */
    float *emb_sum;   /* (e) the sum of all expert embeddings                                    */
    float *act1;      /* (T, a + 1) hyper_head_bias: [ReLU(u) ; 1]                               */
    float *bias_out;  /* (T, d) hyper_head_bias: [ReLU(u) ; 1] . head_up.bias^T                  */
    /* backward (T rows each) */
    float *d_o, *d_m, *d_hb, *d_z, *d_cond, *d_h1, *d_sig;
    float *d_act1;    /* (T, a + 1) hyper_head_bias: d [ReLU(u) ; 1] from head_up.bias          */
    float *d_u;       /* (T, a) hyper_head_bias: d u                                             */
} moe_router_hyper;

/* @implementation */
/* ============================================================================================
   >>moe:router_hyper
   ============================================================================================ */

static int moe__hyper_alloc(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *h = &L->hyper;
    size_t T = (size_t)L->max_tokens, ab = (size_t)c->hyper_adapter * c->hyper_width;
    size_t zq = (size_t)c->hyper_cond + c->hyper_layer_dim, ob = ab + (size_t)c->hyper_width;
    return MOE__ALLOC(h->sig, T * c->hyper_embed, float) && MOE__ALLOC(h->h1, T * c->hyper_hidden, float) &&
           MOE__ALLOC(h->cond, T * c->hyper_cond, float) && MOE__ALLOC(h->z, T * zq, float) &&
           MOE__ALLOC(h->hb, T * c->hyper_width, float) && MOE__ALLOC(h->m, T * ab, float) &&
           MOE__ALLOC(h->u, T * c->hyper_adapter, float) && MOE__ALLOC(h->o, T * ob, float) &&
           MOE__ALLOC(h->out, T * c->d, float) && MOE__ALLOC(h->emb_sum, c->hyper_embed, float) &&
           MOE__ALLOC(h->d_o, T * ob, float) && MOE__ALLOC(h->d_m, T * ab, float) &&
           MOE__ALLOC(h->d_hb, T * c->hyper_width, float) && MOE__ALLOC(h->d_z, T * zq, float) &&
           MOE__ALLOC(h->d_cond, T * c->hyper_cond, float) && MOE__ALLOC(h->d_h1, T * c->hyper_hidden, float) &&
           MOE__ALLOC(h->d_sig, T * c->hyper_embed, float) &&
           (!c->hyper_head_bias || (MOE__ALLOC(h->act1, T * (c->hyper_adapter + 1), float) &&
                                    MOE__ALLOC(h->bias_out, T * c->d, float) &&
                                    MOE__ALLOC(h->d_act1, T * (c->hyper_adapter + 1), float) &&
                                    MOE__ALLOC(h->d_u, T * c->hyper_adapter, float)));
}

static void moe__hyper_free(moe_layer *L) {
    moe_router_hyper *h = &L->hyper;
    float **bufs[] = {&h->sig, &h->h1, &h->cond, &h->z, &h->hb, &h->m, &h->u, &h->o, &h->out, &h->emb_sum,
                      &h->d_o, &h->d_m, &h->d_hb, &h->d_z, &h->d_cond, &h->d_h1, &h->d_sig,
                      &h->act1, &h->bias_out, &h->d_act1, &h->d_u};
    size_t i;
    for (i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        MOE_FREE(*bufs[i]);
        *bufs[i] = NULL;
    }
}

static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter;
    const char *shared[9] = {"hyper.layer_emb", "hyper.net.w", "hyper.net.b", "hyper.head_down", "hyper.head_down_b", "hyper.head_up",
                             "hyper.head_down.bias", "hyper.head_down_b.bias", "hyper.head_up.bias"};
    int dims[9][2], k, n_shared = c->hyper_head_bias ? 9 : 6;
    int *id = L->hyper.id;
    dims[0][0] = c->hyper_layers; dims[0][1] = lam;
    dims[1][0] = b; dims[1][1] = q + lam;
    dims[2][0] = b; dims[2][1] = 0;
    dims[3][0] = a * b; dims[3][1] = d;
    dims[4][0] = a; dims[4][1] = b;
    dims[5][0] = d; dims[5][1] = (a + 1) * b;
    dims[6][0] = a; dims[6][1] = d;
    dims[7][0] = a; dims[7][1] = 0;
    dims[8][0] = d; dims[8][1] = a + 1;
    id[MOE_HYPER_EXPERT_EMB] = moe__declare(L, s, prefix, "hyper.expert_emb", MOE_TENSOR_DECAY, E, e, 0);
    id[MOE_HYPER_PROC1_W] = moe__declare(L, s, prefix, "hyper.proc1.w", MOE_TENSOR_DECAY, h, e, 0);
    id[MOE_HYPER_PROC1_B] = moe__declare(L, s, prefix, "hyper.proc1.b", 0, h, 0, 0);
    id[MOE_HYPER_PROC2_W] = moe__declare(L, s, prefix, "hyper.proc2.w", MOE_TENSOR_DECAY, q, h, 0);
    id[MOE_HYPER_PROC2_B] = moe__declare(L, s, prefix, "hyper.proc2.b", 0, q, 0, 0);
    for (k = 0; k < n_shared && L->err.status == MOE_OK; k++) { /* shared: reuse the first layer's */
        int t = moe_store_find(s, shared[k]);
        if (t < 0) {
            t = moe__declare(L, s, "", shared[k], (k == 2 || k == 4 || k >= 6) ? 0 : MOE_TENSOR_DECAY, dims[k][0], dims[k][1], 0);
        } else if (s->tensors[t].shape[0] != dims[k][0] || (dims[k][1] && s->tensors[t].shape[1] != dims[k][1])) {
            moe_err_set(&L->err, MOE_ERR_SHAPE, "shared HyperMoE tensor '%s' exists with another shape (layers must agree on the hyper sizes)", shared[k]);
            t = -1;
        }
        id[MOE_HYPER_LAYER_EMB + k] = t;
    }
}

/* the HyperMoE tensors' initialisation; returns 0 for other tensors (the model's weight init
   asks by name) */
static int moe__hyper_init_tensor(const moe_tensor *t, float *p, moe_rng *r) {
    size_t i;
    float bound;
    const char *name = strstr(t->name, "hyper.");
    if (!name) return 0;
    if (moe__ends_with(name, ".b") || moe__ends_with(name, ".bias") || strcmp(name, "hyper.head_down_b") == 0) bound = 0.0f;
    else if (strstr(name, "hyper.head_")) bound = 1e-3f * sqrtf(3.0f / (float)t->shape[1]); /* near-zero adapter */
    else if (moe__ends_with(name, "emb")) bound = sqrtf(3.0f); /* unit variance, as nn.Embedding */
    else bound = 1.0f / sqrtf((float)t->shape[1]); /* nn.Linear */
    for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(r) - 1.0f);
    return 1;
}

/* (the shared tensors are re-drawn by every layer: harmless) */
static void moe__hyper_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int k;
    for (k = 0; k < MOE_HYPER_TENSORS; k++)
        if (L->hyper.id[k] >= 0) moe__hyper_init_tensor(&s->tensors[L->hyper.id[k]], moe_store_param(s, L->hyper.id[k]), rng);
}

/* y (T, d) += the hyper-expert's output */
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *hy = &L->hyper;
    const int *id = hy->id;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j;
    const float *Q = moe_store_param(s, id[MOE_HYPER_EXPERT_EMB]);
    const float *lemb = moe_store_param(s, id[MOE_HYPER_LAYER_EMB]) + (size_t)c->hyper_layer * lam;
    const float *bdn = moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B]);
    float *sum = hy->emb_sum, *out = hy->out;
    memset(sum, 0, sizeof(float) * (size_t)e);
    for (j = 0; j < E; j++) { /* sum of all embeddings, in expert order */
        int i;
        for (i = 0; i < e; i++) sum[i] += Q[(size_t)j * e + i];
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) { /* sig_t = sum - the chosen ones */
        float *sg = hy->sig + (size_t)t * e;
        int i, k;
        memcpy(sg, sum, sizeof(float) * (size_t)e);
        for (k = 0; k < E; k++)
            if (L->gates[(size_t)t * E + k] != 0.0f)
                for (i = 0; i < e; i++) sg[i] -= Q[(size_t)k * e + i];
    }
    moe_matmul_forward(hy->h1, hy->sig, moe_store_param(s, id[MOE_HYPER_PROC1_W]), moe_store_param(s, id[MOE_HYPER_PROC1_B]), T, e, h, &L->work);
    for (t = 0; t < T * h; t++) hy->h1[t] = hy->h1[t] > 0.0f ? hy->h1[t] : 0.0f;
    moe_matmul_forward(hy->cond, hy->h1, moe_store_param(s, id[MOE_HYPER_PROC2_W]), moe_store_param(s, id[MOE_HYPER_PROC2_B]), T, h, q, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(hy->z + (size_t)t * (q + lam), hy->cond + (size_t)t * q, sizeof(float) * (size_t)q);
        memcpy(hy->z + (size_t)t * (q + lam) + q, lemb, sizeof(float) * (size_t)lam);
    }
    moe_matmul_forward(hy->hb, hy->z, moe_store_param(s, id[MOE_HYPER_NET_W]), moe_store_param(s, id[MOE_HYPER_NET_B]), T, q + lam, b, &L->work);
    for (t = 0; t < T * b; t++) hy->hb[t] = hy->hb[t] > 0.0f ? hy->hb[t] : 0.0f;
    moe_matmul_forward(hy->m, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN]), NULL, T, d, ab, &L->work);
    if (c->hyper_head_bias) /* u starts at x . head_down.bias^T + head_down_b.bias */
        moe_matmul_forward(hy->u, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B_BIAS]),
                           T, d, a, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) { /* u = (M_t + B) hb_t, act = ReLU(u), O_t = [act ; 1] (x) hb_t */
        const float *M = hy->m + (size_t)t * ab, *hb = hy->hb + (size_t)t * b;
        float *u = hy->u + (size_t)t * a, *o = hy->o + (size_t)t * (ab + b);
        int i, k;
        for (i = 0; i < a; i++) {
            float acc = 0.0f;
            for (k = 0; k < b; k++) acc += (M[i * b + k] + bdn[i * b + k]) * hb[k];
            u[i] = c->hyper_head_bias ? u[i] + acc : acc;
        }
        if (c->hyper_head_bias) {
            float *a1 = hy->act1 + (size_t)t * (a + 1);
            for (i = 0; i < a; i++) a1[i] = u[i] > 0.0f ? u[i] : 0.0f;
            a1[a] = 1.0f;
        }
        for (i = 0; i <= a; i++) {
            float act = i < a ? (u[i] > 0.0f ? u[i] : 0.0f) : 1.0f;
            for (k = 0; k < b; k++) o[i * b + k] = act * hb[k];
        }
    }
    moe_matmul_forward(out, hy->o, moe_store_param(s, id[MOE_HYPER_HEAD_UP]), NULL, T, ab + b, d, &L->work);
    if (c->hyper_head_bias) { /* out += [act ; 1] . head_up.bias^T */
        moe_matmul_forward(hy->bias_out, hy->act1, moe_store_param(s, id[MOE_HYPER_HEAD_UP_BIAS]), NULL, T, a + 1, d, &L->work);
        for (t = 0; t < T * d; t++) out[t] += hy->bias_out[t];
    }
    for (t = 0; t < T * d; t++) y[t] += out[t];
}

/* dx += the hyper-expert's input gradient; its tensors' gradients += */
static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *hy = &L->hyper;
    const int *id = hy->id;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond, T = L->T;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j, i;
    const float *bdn = moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B]);
    float *dO = hy->d_o, *dM = hy->d_m, *dhb = hy->d_hb, *dz = hy->d_z, *dc = hy->d_cond, *dh1 = hy->d_h1, *dsig = hy->d_sig;
    float *gQ = moe_store_grad(s, id[MOE_HYPER_EXPERT_EMB]);
    float *glemb = moe_store_grad(s, id[MOE_HYPER_LAYER_EMB]) + (size_t)c->hyper_layer * lam;
    memset(dO, 0, sizeof(float) * (size_t)T * (ab + b));
    moe_matmul_backward(dO, moe_store_grad(s, id[MOE_HYPER_HEAD_UP]), NULL, dy, hy->o, moe_store_param(s, id[MOE_HYPER_HEAD_UP]), T, ab + b, d, &L->work);
    if (c->hyper_head_bias) { /* out += act1 . head_up.bias^T */
        memset(hy->d_act1, 0, sizeof(float) * (size_t)T * (a + 1));
        moe_matmul_backward(hy->d_act1, moe_store_grad(s, id[MOE_HYPER_HEAD_UP_BIAS]), NULL, dy, hy->act1,
                            moe_store_param(s, id[MOE_HYPER_HEAD_UP_BIAS]), T, a + 1, d, &L->work);
    }
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) {
        const float *M = hy->m + (size_t)t * ab, *hb = hy->hb + (size_t)t * b, *u = hy->u + (size_t)t * a;
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
            if (c->hyper_head_bias) {
                dact += hy->d_act1[(size_t)t * (a + 1) + ii];
                hy->d_u[(size_t)t * a + ii] = u[ii] > 0.0f ? dact : 0.0f;
            }
            du = u[ii] > 0.0f ? dact : 0.0f;
            for (k = 0; k < b; k++) {
                gm[ii * b + k] = du * hb[k];
                ghb[k] += du * (M[ii * b + k] + bdn[ii * b + k]);
            }
        }
        for (k = 0; k < b; k++) ghb[k] = hb[k] > 0.0f ? ghb[k] : 0.0f; /* through hb's ReLU */
    }
    moe__colsum_acc(moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_B]), dM, T, ab); /* d head_down_b = sum_t du (x) hb */
    moe_matmul_backward(dx, moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN]), NULL, dM, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN]), T, d, ab, &L->work);
    if (c->hyper_head_bias)
        moe_matmul_backward(dx, moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_B_BIAS]), hy->d_u,
                            x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), T, d, a, &L->work);
    memset(dz, 0, sizeof(float) * (size_t)T * (q + lam));
    moe_matmul_backward(dz, moe_store_grad(s, id[MOE_HYPER_NET_W]), moe_store_grad(s, id[MOE_HYPER_NET_B]), dhb, hy->z,
                        moe_store_param(s, id[MOE_HYPER_NET_W]), T, q + lam, b, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(dc + (size_t)t * q, dz + (size_t)t * (q + lam), sizeof(float) * (size_t)q);
        for (i = 0; i < lam; i++) glemb[i] += dz[(size_t)t * (q + lam) + q + i];
    }
    memset(dh1, 0, sizeof(float) * (size_t)T * h);
    moe_matmul_backward(dh1, moe_store_grad(s, id[MOE_HYPER_PROC2_W]), moe_store_grad(s, id[MOE_HYPER_PROC2_B]), dc, hy->h1,
                        moe_store_param(s, id[MOE_HYPER_PROC2_W]), T, h, q, &L->work);
    for (t = 0; t < T * h; t++) dh1[t] = hy->h1[t] > 0.0f ? dh1[t] : 0.0f;
    memset(dsig, 0, sizeof(float) * (size_t)T * e);
    moe_matmul_backward(dsig, moe_store_grad(s, id[MOE_HYPER_PROC1_W]), moe_store_grad(s, id[MOE_HYPER_PROC1_B]), dh1, hy->sig,
                        moe_store_param(s, id[MOE_HYPER_PROC1_W]), T, e, h, &L->work);
    /* sig_t = sum_{j not chosen by t} Q_j: dQ_j += sum over the tokens that did not choose j */
    for (j = 0; j < E; j++)
        for (t = 0; t < T; t++)
            if (L->gates[(size_t)t * E + j] == 0.0f)
                for (i = 0; i < e; i++) gQ[(size_t)j * e + i] += dsig[(size_t)t * e + i];
}
