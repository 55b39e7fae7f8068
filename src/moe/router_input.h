/* ============================================================================================
   >>moe:router_input  what the routers of a model read: x, RMoE's recurrent GRU state, or an
                       MLP router's hidden layer (Qiu et al., ICLR 2025, arXiv 2408.06793)
   ============================================================================================
   In MoE block l the router reads r_l instead of the block's normalised hidden state x_l:
     RMoE:      x'_l = x_l . P_l^T (a projector per layer, width p = router_dim, Eq. 4);
                h_l = GRU(x'_l, h_{l-1}) with ONE GRU shared by all MoE layers, h_0 = 0 (Eq. 5);
                r_l = h_l (Eq. 6). The state passes through dense blocks unchanged and carries
                full gradients back through depth.
     ablations: "NP" h_l = GRU(x'_l, 0); "detach" h_{l-1} enters without a gradient back.
     MLP:       r_l = GELU(x'_l), no recurrence (the paper's SMoE-MLP baseline).
   The layer sees r_l as moe_layer_args.router_input and returns its gradient in
   d_router_input (>>moe:layer); this section runs the GRU or the MLP around it. */

typedef enum moe_router_input {
    MOE_RIN_DIRECT = 0,     /* the layer's normalised hidden state x (a linear router)        */
    MOE_RIN_GRU = 1,        /* RMoE: h_l = GRU(x_l P_l, h_{l-1}), one GRU shared by all MoE
                               layers, state carried through depth with full gradients       */
    MOE_RIN_GRU_NP = 2,     /* ablation "no previous state": h_l = GRU(x_l P_l, 0)            */
    MOE_RIN_GRU_DETACH = 3, /* ablation: h_{l-1} enters layer l without a gradient back      */
    MOE_RIN_MLP = 4         /* baseline SMoE-MLP: router on GELU(x_l P_l), no recurrence      */
} moe_router_input;

/* @implementation */
/* ============================================================================================
   >>moe:router_input
   ============================================================================================
   The model's fields it uses (>>moe:model): the GRU's ids (id_gru_*), per MoE block the
   projector id_rproj and the caches rxp (N, p), rh (N, p) = r_l, rgi, rgh (N, 3p), rh_prev;
   the model's r_zero (h_0), r_drin (dL/dr_l), r_carry (dL/dh through depth), r_dxp, r_scratch. */

static int moe__model_add(moe_model *m, const char *name, int flags, int n0, int n1, int n2); /* >>moe:model */

static int moe__router_input_is_gru(const moe_model_config *c) {
    return c->router_input >= MOE_RIN_GRU && c->router_input <= MOE_RIN_GRU_DETACH;
}

/* the shared GRU, declared after the embeddings */
static void moe__router_input_declare(moe_model *m) {
    int P = m->cfg.router_dim;
    if (!moe__router_input_is_gru(&m->cfg)) return;
    m->id_gru_wih = moe__model_add(m, "rmoe.gru.w_ih", MOE_TENSOR_DECAY, 3 * P, P, 0);
    m->id_gru_whh = moe__model_add(m, "rmoe.gru.w_hh", MOE_TENSOR_DECAY, 3 * P, P, 0);
    m->id_gru_bih = moe__model_add(m, "rmoe.gru.b_ih", 0, 3 * P, 0, 0);
    m->id_gru_bhh = moe__model_add(m, "rmoe.gru.b_hh", 0, 3 * P, 0, 0);
}

/* block l's projector P_l (p, d), declared before the block's MoE layer */
static void moe__router_input_declare_block(moe_model *m, moe_block *b, int l) {
    char name[MOE_NAME_LEN];
    if (!b->is_moe || m->cfg.router_input == MOE_RIN_DIRECT) return;
    sprintf(name, "l%d.rmoe.proj", l);
    b->id_rproj = moe__model_add(m, name, MOE_TENSOR_DECAY, m->cfg.router_dim, m->cfg.d, 0);
}

/* buffers for N tokens: the block's caches; 0 when out of memory */
static int moe__router_input_alloc_block(moe_model *m, moe_block *b, int N) {
    size_t Np = (size_t)N * m->cfg.router_dim;
    if (b->id_rproj < 0) return 1;
    return MOE__ALLOC(b->rxp, Np, float) && MOE__ALLOC(b->rh, Np, float) && MOE__ALLOC(b->rgi, Np * 3, float) &&
           MOE__ALLOC(b->rgh, Np * 3, float);
}

/* the model's: h_0, the gradients through depth, the GRU's backward scratch */
static int moe__router_input_alloc(moe_model *m, int N) {
    size_t Np = (size_t)N * m->cfg.router_dim;
    if (m->cfg.router_input == MOE_RIN_DIRECT) return 1;
    return MOE__ALLOC(m->r_zero, Np, float) && MOE__ALLOC(m->r_drin, Np, float) && MOE__ALLOC(m->r_carry, Np, float) &&
           MOE__ALLOC(m->r_dxp, Np, float) && MOE__ALLOC(m->r_scratch, Np * 6, float);
}

static void moe__router_input_free_block(moe_block *b) {
    MOE_FREE(b->rxp); MOE_FREE(b->rh); MOE_FREE(b->rgi); MOE_FREE(b->rgh);
    b->rxp = b->rh = b->rgi = b->rgh = NULL;
}

static void moe__router_input_free(moe_model *m) {
    MOE_FREE(m->r_zero); MOE_FREE(m->r_drin); MOE_FREE(m->r_carry); MOE_FREE(m->r_dxp); MOE_FREE(m->r_scratch);
    m->r_zero = m->r_drin = m->r_carry = m->r_dxp = m->r_scratch = NULL;
}

/* the init std of this section's tensors (1 for them, 0 for other tensors): the GRU at torch's
   scale 1/sqrt(p), the projector so that x' has about unit scale */
static int moe__router_input_init_std(const moe_model *m, const char *name, float *sd) {
    if (strncmp(name, "rmoe.gru.w", 10) == 0) *sd = 1.0f / sqrtf((float)m->cfg.router_dim);
    else if (moe__ends_with(name, "rmoe.proj")) *sd = 1.0f / sqrtf((float)m->cfg.d);
    else return 0;
    return 1;
}

/* a kernel call of block l's router input that failed (only a workspace that does not fit
   its call can): the status, with what failed, in m->err */
static moe_status moe__router_input_err(moe_model *m, moe_status st, int l, const char *what) {
    return moe_err_set(&m->err, st, "layer %d, %s: %s", l, what, moe_status_string(st));
}

/* block b's (layer l's) router input r_l (b->rh) from its normalised hidden state b->ln2;
   *h_prev = the state of the MoE layer below (m->r_zero before the first), replaced by the
   state for the next. The kernels run on the model's workspace m->work. */
static moe_status moe__router_input_forward(moe_model *m, moe_block *b, const float **h_prev, int N, int l) {
    const moe_model_config *c = &m->cfg;
    size_t Np = (size_t)N * c->router_dim;
    moe_status st = moe_matmul_forward(b->rxp, b->ln2, moe_store_param(&m->S, b->id_rproj), NULL, N, c->d, c->router_dim, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router-input projector");
    if (c->router_input == MOE_RIN_MLP) {
        moe_activation_forward(b->rh, b->rxp, Np, MOE_ACT_GELU);
        return MOE_OK;
    }
    b->rh_prev = c->router_input == MOE_RIN_GRU_NP ? m->r_zero : *h_prev;
    st = moe_gru_forward(b->rh, b->rgi, b->rgh, b->rxp, b->rh_prev, moe_store_param(&m->S, m->id_gru_wih),
                         moe_store_param(&m->S, m->id_gru_whh), moe_store_param(&m->S, m->id_gru_bih),
                         moe_store_param(&m->S, m->id_gru_bhh), N, c->router_dim, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router GRU");
    *h_prev = b->rh;
    return MOE_OK;
}

/* Backward of block b's router input. On entry r_drin holds dL/dr_l from the layer and, for
   the GRU kinds, r_carry holds dL/dh_l from the MoE layer above; on exit r_carry holds
   dL/dh_{l-1} (0 for the NP and detach ablations) and d_ln has received the projector's input
   gradient. l: the block's index, for the error. */
static moe_status moe__router_input_backward(moe_model *m, const moe_block *b, int l) {
    const moe_model_config *c = &m->cfg;
    int N = m->B * m->T, P = c->router_dim;
    size_t i, Np = (size_t)N * P;
    moe_store *S = &m->S;
    moe_status st;
    memset(m->r_dxp, 0, sizeof(float) * Np);
    if (c->router_input == MOE_RIN_MLP) {
        moe_activation_backward(m->r_dxp, m->r_drin, b->rxp, Np, MOE_ACT_GELU);
    } else {
        for (i = 0; i < Np; i++) m->r_drin[i] += m->r_carry[i]; /* dL/dh_l: own router + layers above */
        memset(m->r_carry, 0, sizeof(float) * Np);
        st = moe_gru_backward(m->r_dxp, m->r_carry, moe_store_grad(S, m->id_gru_wih), moe_store_grad(S, m->id_gru_whh),
                              moe_store_grad(S, m->id_gru_bih), moe_store_grad(S, m->id_gru_bhh), m->r_drin, b->rxp,
                              b->rh_prev, b->rgi, b->rgh, moe_store_param(S, m->id_gru_wih),
                              moe_store_param(S, m->id_gru_whh), N, P, m->r_scratch, &m->work);
        if (st != MOE_OK) return moe__router_input_err(m, st, l, "router GRU backward");
        if (c->router_input != MOE_RIN_GRU) memset(m->r_carry, 0, sizeof(float) * Np);
    }
    st = moe_matmul_backward(m->d_ln, moe_store_grad(S, b->id_rproj), NULL, m->r_dxp, b->ln2,
                             moe_store_param(S, b->id_rproj), N, c->d, P, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router-input projector backward");
    return MOE_OK;
}
