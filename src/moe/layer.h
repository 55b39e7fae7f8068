/* ============================================================================================
   >>moe:layer  the MoE layer: router, routed experts, shared experts
   ============================================================================================
   y = sum over the token's assignments of weight * expert(x)  (+ the shared experts, weight
     shared_scale, 1 by default)
     (+ what a router extension adds: GW-MoE's bypass, HyperMoE's hyper-expert).
   Forward: the router fills the assignment list (>>moe:router); the experts run on the
   gathered tokens (>>moe:experts); combine scatters back in a fixed order (>>moe:dispatch).
   Backward in reverse, ending with the router's backward from the gradients of the
   assignment weights. moe_layer_init allocates every buffer for up to max_tokens tokens:
   forward and backward allocate nothing. */

/* Per-call inputs of moe_layer_forward and moe_layer_backward. NULL means
   moe_layer_args_default(): no noise, the router reads x, the T tokens are one sequence, no
   GW broadcast, aux gradient scale 1. Give backward the args of the forward before it. */
typedef struct moe_layer_args {
    const float *noise;        /* forward: (T, E) N(0,1) draws for the noisy top-k router
                                  (training); NULL = evaluation (H = z)                        */
    const float *router_input; /* (T, router_dim) what the router reads when it is not x: RMoE's
                                  GRU state, an MLP router's hidden layer (required when
                                  router_dim != d); NULL = x. Backward checks it is the
                                  forward's pointer                                            */
    float *d_router_input;     /* backward: (T, router_dim) += the router input's gradient
                                  (required with router_input; dx receives none of it)         */
    int seq_len;               /* forward: tokens per sequence (GW-MoE's gw_slots count per
                                  sequence); 0 = the T tokens are one sequence                 */
    int gw_active;             /* forward: GW-MoE broadcast on (fine-tuning); 0 = sparse top-k */
    int dropless;              /* forward: capacity (capacity_factor) admits every choice on this
                                  call. Generation sets it: with a capacity, a token's experts
                                  would depend on the other sequences of the batch             */
    float aux_grad_scale;      /* backward: multiplies the aux losses' gradients; 1 in the
                                  defaults (1/n for n micro-batches whose dy carries 1/n);
                                  a zeroed struct has 0: no aux gradient                        */
    const float *balance_f;    /* backward: (E) the f_i the balance loss's gradient uses instead
                                  of this layer's own: one loss over several layers' tokens
                                  gives each layer mean_l f_l / L (moe_model_config's
                                  balance_all_layers); NULL = the layer's own loss             */
} moe_layer_args;

/* Who runs the routed bank's experts. NULL (the default) = this process, on every expert.
   Set, forward takes the gathered rows L->xg grouped by expert (L->routed.offset) and fills
   L->eout; backward takes L->deout, fills L->dxg and accumulates the experts' weight
   gradients. Expert parallelism (>>moe:mpi) runs them on the ranks that own the experts. */
struct moe_layer;
typedef struct moe_experts_runner {
    moe_status (*forward)(struct moe_layer *L, const moe_store *s, void *user);
    moe_status (*backward)(struct moe_layer *L, moe_store *s, void *user);
    void *user;
} moe_experts_runner;

typedef struct moe_layer {
    moe_layer_config cfg;
    int max_tokens;
    int cap;                /* rows of the routed assignment list: T K + E, T E with GW        */
    /* ---- the router (>>moe:router): its decisions in the last forward, T = its tokens ---- */
    int id_router_w;        /* (E, router_dim) the linear router, -1 for AoE                   */
    int id_router_b;        /* (E) its bias, -1 when absent                                    */
    int id_selection_bias;  /* (E) DeepSeek-V3's selection-only bias, -1 when absent           */
    float *logits;          /* (T, E) router logits r . Wr^T + b (AoE: the norms ||C_e||)      */
    float *probs;           /* (T, E) softmax (sigmoid) of logits                              */
    float *lse;             /* (T) logsumexp of logits (z-loss)                                */
    int *topk;              /* (T, K) chosen experts, descending score; -1 for expert choice   */
    float *gates;           /* (T, E) mixing weight of each (token, expert), 0 when not chosen
                               (the assignments' weights are these times routed_scale)       */
    float *selection_scores;/* (T, E) with selection_bias: what top-k ranked, probs + b       */
    float *d_gates;         /* (T, E) backward: dLoss/dgates                                   */
    float *d_logits;        /* (T, E) backward: dLoss/dlogits                                  */
    moe_router_aux aux;     /* (E) each: the pieces of the balance loss                        */
    moe_router_noisy noisy; /* noisy top-k: noise logits, H, load thresholds, CV^2 pieces      */
    moe_router_ec ec;       /* expert choice: its ranking buffers                              */
    moe_router_aoe aoe;     /* AoE: the gate factors and the low-rank caches                   */
    moe_router_gw gw;       /* GW-MoE: the uncertain tokens (all 0 while broadcast is off)     */
    moe_router_hyper hyper; /* HyperMoE: the hypernetwork's tensors and caches                 */
    /* ---- the experts ---- */
    int id_gate, id_up, id_down, id_b_up, id_b_down;           /* routed bank, -1 when absent */
    int id_s_gate, id_s_up, id_s_down, id_s_b_up, id_s_b_down; /* shared bank                 */
    moe_assign routed;      /* assignment list of the routed bank                              */
    moe_assign shared;      /* assignment list of the shared bank (every token, shared_scale)  */
    float *xg, *hg, *hu, *eout;         /* routed bank caches: (cap,d) (cap,D) (cap,D) (cap,d)  */
    float *s_xg, *s_hg, *s_hu, *s_eout; /* shared bank caches, (S*T, ...)                      */
    /* the raw list a router (or the shared bank) fills before dispatch; rows = max(cap, S T) */
    int *raw_token, *raw_expert, *raw_slot;
    float *raw_weight;
    int *admitted;          /* (T, K) capacity: 1 when the token's s-th choice got a place     */
    int *capacity_count;    /* (E) capacity: places taken per expert                           */
    float *passthrough;     /* (T) drop_passthrough: y += passthrough * x, the dropped weights */
    float *d_passthrough;   /* (T) backward: dLoss/d passthrough                               */
    /* backward scratch; rows = max(cap, S T) */
    float *d_weight;        /* (cap) dLoss/d(assignment weight), from combine's backward       */
    float *dxg, *deout;     /* (rows, d) gradients of the gathered inputs and expert outputs   */
    float *experts_dh_gate; /* (rows, max(D, Ds)) the experts' first backward scratch; it ends
                               holding d h_gate, which AoE's gate backward reads               */
    float *experts_scratch; /* (rows, max(D, Ds)) the experts' second backward scratch         */
    int T;                  /* tokens of the last forward, 0 = none                            */
    const float *fwd_router_input; /* the router input of the last forward                     */
    moe_work work;          /* scratch of the layer's matmuls and experts, sized at init; a
                               model's layers share the model's (>>moe:model)                 */
    moe_routing_stats stats;
    float *stat_load, *stat_prob; /* (E) backing for stats                                     */
    const moe_experts_runner *runner; /* NULL = the experts run here (see moe_experts_runner) */
    moe_err err;
} moe_layer;

/* Validates cfg, declares the layer's tensors in s under `prefix` (s must not be allocated
   yet) and allocates every buffer for up to max_tokens tokens. On failure (a sentence in
   L->err; out of memory is MOE_ERR_NOMEM) nothing stays allocated and moe_layer_free is safe. */
MOEDEF moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                 const char *prefix, int max_tokens);
MOEDEF void moe_layer_free(moe_layer *L);
/* Router N(0, router_init_std); expert matrices U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear;
   biases 0. */
MOEDEF void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
/* Pointers to the layer's weights in the params (grads = 0) or grads (grads = 1) buffer. */
MOEDEF moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads);
MOEDEF moe_layer_args moe_layer_args_default(void);
/* DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437 §2.1.2), for a layer with
   selection_bias: after a step, b_i += gamma * sign(mean_j c_j - c_i), c_i = the tokens that
   chose expert i in the last forward: an overloaded expert's bias goes down by gamma, an
   underloaded one's up (the paper: gamma 0.001 for most of training). */
MOEDEF moe_status moe_layer_update_selection_bias(moe_layer *L, moe_store *s, float gamma);
/* y (T, d) = MoE(x (T, d)); args may be NULL (see moe_layer_args). Fills L->stats.
   Capacity: assignments are admitted slot by slot (every token's first choice before any
   second choice), tokens in index order (token by token with capacity_order); a dropped
   assignment contributes nothing (the token keeps its residual), weights are not
   renormalised afterwards. A non-finite router logit returns MOE_ERR_NUMERIC naming the
   token and expert, and leaves no forward to differentiate. */
MOEDEF moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                    int T, const moe_layer_args *args);
/* dx (T, d) += dLoss/dx; parameter gradients += into s->grads. The auxiliary losses of the
   last forward (L->stats.aux_total, times args->aux_grad_scale) are part of the
   differentiated objective. x and args must be the forward's. */
MOEDEF moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                     const float *x, const moe_layer_args *args);

/* @implementation */
/* ============================================================================================
   >>moe:layer
   ============================================================================================ */

MOE__IMPL moe_layer_args moe_layer_args_default(void) {
    moe_layer_args a;
    memset(&a, 0, sizeof a);
    a.aux_grad_scale = 1.0f;
    return a;
}

static void moe__declare_bank(moe_layer *L, moe_store *s, const char *prefix, const char *bank, int E,
                              int D, int *id_gate, int *id_up, int *id_down, int *id_b_up, int *id_b_down) {
    const moe_layer_config *c = &L->cfg;
    char name[48];
    int d = c->d;
    *id_gate = *id_b_up = *id_b_down = -1;
    /* AoE's routed experts factorise their gate (w_gate_in, w_gate_out), declared by the router */
    if (c->expert == MOE_EXPERT_SWIGLU && !(moe__router_owns_expert_gate(c) && strcmp(bank, "experts") == 0)) {
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

static int moe__assign_alloc(moe_assign *a, int cap, int T, int E) {
    return MOE__ALLOC(a->token, cap, int) && MOE__ALLOC(a->expert, cap, int) && MOE__ALLOC(a->slot, cap, int) &&
           MOE__ALLOC(a->weight, cap, float) && MOE__ALLOC(a->offset, E + 1, int) && MOE__ALLOC(a->tok_offset, T + 1, int) &&
           MOE__ALLOC(a->tok_index, cap > E ? cap : E, int);
}

static void moe__assign_free(moe_assign *a) {
    MOE_FREE(a->token); MOE_FREE(a->expert); MOE_FREE(a->slot); MOE_FREE(a->weight);
    MOE_FREE(a->offset); MOE_FREE(a->tok_offset); MOE_FREE(a->tok_index);
    memset(a, 0, sizeof *a);
}

/* declare_only: the tensors without any buffer (a model's parameter table alone) */
static moe_status moe__layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                  const char *prefix, int max_tokens, int declare_only) {
    int E, K, d, D, S, Ds, cap, rows, wide, k, ok;
    size_t TE;
    memset(L, 0, sizeof *L);
    L->id_router_w = L->id_router_b = L->id_selection_bias = L->noisy.id_w_noise = L->aoe.id_w_in = L->aoe.id_w_out = -1;
    L->id_gate = L->id_up = L->id_down = L->id_b_up = L->id_b_down = -1;
    L->id_s_gate = L->id_s_up = L->id_s_down = L->id_s_b_up = L->id_s_b_down = -1;
    for (k = 0; k < MOE_HYPER_TENSORS; k++) L->hyper.id[k] = -1;
    if (moe_layer_config_validate(cfg, &L->err) != MOE_OK) return L->err.status;
    if (!s || s->allocated) return moe_err_set(&L->err, MOE_ERR_STATE, "moe_layer_init needs a store that is not allocated yet (declare every layer, then moe_store_alloc)");
    if (declare_only) max_tokens = 1;
    if (max_tokens <= 0 || max_tokens > (1 << 24)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "max_tokens must be in [1, 2^24], got %d", max_tokens);
    if (!prefix) prefix = "";
    L->cfg = *cfg;
    E = cfg->n_experts; K = cfg->top_k; d = cfg->d; D = cfg->d_ff;
    S = cfg->n_shared; Ds = S > 0 && cfg->d_ff_shared > 0 ? cfg->d_ff_shared : D; /* unused without shared experts */
    L->cfg.d_ff_shared = Ds;
    L->cfg.router_dim = cfg->router_dim > 0 ? cfg->router_dim : d;
    L->max_tokens = max_tokens;
    cap = L->cap = moe__router_list_rows(cfg, max_tokens);
    moe__router_declare(L, s, prefix);
    moe__declare_bank(L, s, prefix, "experts", E, D, &L->id_gate, &L->id_up, &L->id_down, &L->id_b_up, &L->id_b_down);
    if (S > 0) moe__declare_bank(L, s, prefix, "shared", S, Ds, &L->id_s_gate, &L->id_s_up, &L->id_s_down, &L->id_s_b_up, &L->id_s_b_down);
    moe__router_declare_extensions(L, s, prefix);
    if (L->err.status != MOE_OK || declare_only) return L->err.status;
    TE = (size_t)max_tokens * E;
    rows = cap > S * max_tokens ? cap : S * max_tokens;
    wide = D > Ds ? D : Ds;
    ok = MOE__ALLOC(L->logits, TE, float) && MOE__ALLOC(L->probs, TE, float) && MOE__ALLOC(L->lse, max_tokens, float) &&
         MOE__ALLOC(L->topk, (size_t)max_tokens * K, int) && MOE__ALLOC(L->gates, TE, float) &&
         MOE__ALLOC(L->d_gates, TE, float) && MOE__ALLOC(L->d_logits, TE, float) &&
         MOE__ALLOC(L->aux.picks, E, float) && MOE__ALLOC(L->aux.balance_f, E, float) && MOE__ALLOC(L->aux.mean_prob, E, float) &&
         MOE__ALLOC(L->aux.token_probs, E, float) && MOE__ALLOC(L->aux.d_mean_prob, E, float) &&
         MOE__ALLOC(L->xg, (size_t)cap * d, float) && MOE__ALLOC(L->eout, (size_t)cap * d, float) &&
         MOE__ALLOC(L->hg, (size_t)cap * D, float) && MOE__ALLOC(L->hu, (size_t)cap * D, float) &&
         MOE__ALLOC(L->raw_token, rows, int) && MOE__ALLOC(L->raw_expert, rows, int) && MOE__ALLOC(L->raw_slot, rows, int) &&
         MOE__ALLOC(L->raw_weight, rows, float) && MOE__ALLOC(L->admitted, (size_t)max_tokens * K, int) &&
         MOE__ALLOC(L->capacity_count, E, int) && MOE__ALLOC(L->d_weight, cap, float) &&
         MOE__ALLOC(L->dxg, (size_t)rows * d, float) && MOE__ALLOC(L->deout, (size_t)rows * d, float) &&
         MOE__ALLOC(L->experts_dh_gate, (size_t)rows * wide, float) && MOE__ALLOC(L->experts_scratch, (size_t)rows * wide, float) &&
         MOE__ALLOC(L->stat_load, E, float) && MOE__ALLOC(L->stat_prob, E, float) &&
         moe__assign_alloc(&L->routed, cap, max_tokens, E) && moe__router_alloc(L);
    if (ok && S > 0)
        ok = moe__assign_alloc(&L->shared, S * max_tokens, max_tokens, S) && MOE__ALLOC(L->s_xg, (size_t)S * max_tokens * d, float) &&
             MOE__ALLOC(L->s_eout, (size_t)S * max_tokens * d, float) && MOE__ALLOC(L->s_hg, (size_t)S * max_tokens * Ds, float) &&
             MOE__ALLOC(L->s_hu, (size_t)S * max_tokens * Ds, float);
    { /* the work buffer: the largest of the kernel calls' scratch; every router sends a token
         to an expert at most once, so an expert gets at most max_tokens rows. (K, N) of the
         matmuls: the linear (and noise) router, AoE's, HyperMoE's */
        int nt = moe_num_threads(), r = cfg->router == MOE_ROUTER_AOE ? cfg->aoe_rank : 0, a = cfg->hyper ? cfg->hyper_adapter : 0;
        /* HyperMoE's sizes mean nothing without it (and are bounded by the validation with it) */
        int hw = cfg->hyper ? cfg->hyper_width : 0, ab = a * hw, he = cfg->hyper ? cfg->hyper_embed : 0;
        int hh = cfg->hyper ? cfg->hyper_hidden : 0, hc = cfg->hyper ? cfg->hyper_cond : 0, hl = cfg->hyper ? cfg->hyper_layer_dim : 0;
        int mm[10][2] = {{L->cfg.router_dim, E}, {d, E * r}, {r, D}, {he, hh}, {hh, hc}, {hc + hl, hw}, {d, ab}, {ab + hw, d},
                         {d, a}, {a + 1, d}};
        size_t need = moe_experts_work_floats(max_tokens, E, d, D, cfg->expert, nt), w;
        if (S > 0 && (w = moe_experts_work_floats(max_tokens, S, d, Ds, cfg->expert, nt)) > need) need = w;
        for (k = 0; k < (cfg->hyper ? 10 : 3); k++)
            if ((w = moe_matmul_work_floats(max_tokens, mm[k][0], mm[k][1], nt)) > need) need = w;
        ok = ok && moe_work_alloc(&L->work, need, nt) == MOE_OK;
    }
    if (!ok) {
        moe_layer_free(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the buffers of a layer of %d tokens (E = %d, d = %d, d_ff = %d)",
                           max_tokens, E, d, D);
    }
    L->stats.load = L->stat_load;
    L->stats.mean_prob = L->stat_prob;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                    const char *prefix, int max_tokens) {
    return moe__layer_init(L, cfg, s, prefix, max_tokens, 0);
}

MOE__IMPL void moe_layer_free(moe_layer *L) {
    float **fp[] = {&L->logits, &L->probs, &L->lse, &L->gates, &L->d_gates, &L->d_logits, &L->aux.picks, &L->aux.balance_f,
                    &L->aux.mean_prob, &L->aux.token_probs, &L->aux.d_mean_prob, &L->xg, &L->eout, &L->hg, &L->hu,
                    &L->s_xg, &L->s_hg, &L->s_hu, &L->s_eout, &L->raw_weight, &L->d_weight, &L->dxg, &L->deout,
                    &L->experts_dh_gate, &L->experts_scratch, &L->stat_load, &L->stat_prob};
    int **ip[] = {&L->topk, &L->raw_token, &L->raw_expert, &L->raw_slot, &L->admitted, &L->capacity_count};
    size_t i;
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) {
        MOE_FREE(*fp[i]);
        *fp[i] = NULL;
    }
    for (i = 0; i < sizeof ip / sizeof ip[0]; i++) {
        MOE_FREE(*ip[i]);
        *ip[i] = NULL;
    }
    moe__router_free(L);
    moe__assign_free(&L->routed);
    moe__assign_free(&L->shared);
    moe_work_free(&L->work);
    L->stats.load = L->stats.mean_prob = NULL;
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
    int ids[] = {L->id_gate, L->id_up, L->id_down, L->id_b_up, L->id_b_down, L->id_s_gate, L->id_s_up, L->id_s_down,
                 L->id_s_b_up, L->id_s_b_down};
    size_t k, i;
    moe__router_init_weights(L, s, rng); /* first: the draws' order is part of the results */
    for (k = 0; k < sizeof ids / sizeof ids[0]; k++) {
        const moe_tensor *t;
        float *p = moe_store_param(s, ids[k]);
        if (!p) continue;
        t = &s->tensors[ids[k]];
        if (t->ndim == 3) { /* (E, out, in): nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) */
            float bound = 1.0f / sqrtf((float)t->shape[2]);
            for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
        } else {
            memset(p, 0, t->numel * sizeof(float)); /* biases */
        }
    }
}

static moe_status moe__layer_check(moe_layer *L, const moe_store *s) {
    if (!L->logits) return moe_err_set(&L->err, MOE_ERR_STATE, "layer is not initialised (moe_layer_init failed or was not called)");
    if (!s || !s->allocated || L->id_down >= s->count) return moe_err_set(&L->err, MOE_ERR_STATE, "the store is not allocated or does not hold this layer's tensors");
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_update_selection_bias(moe_layer *L, moe_store *s, float gamma) {
    const float *c = L->aux.picks;
    float *b;
    double mean = 0.0;
    int E = L->cfg.n_experts, e;
    if (moe__layer_check(L, s) != MOE_OK) return L->err.status;
    if (L->id_selection_bias < 0) return moe_err_set(&L->err, MOE_ERR_STATE, "the layer has no selection bias (set selection_bias in its config)");
    if (L->T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "update_selection_bias needs a forward before it (it reads that forward's expert loads)");
    if (!(gamma >= 0.0f) || gamma > 1e6f) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "gamma must be finite and >= 0, got %g", (double)gamma);
    b = moe_store_param(s, L->id_selection_bias);
    for (e = 0; e < E; e++) mean += c[e];
    mean /= E;
    for (e = 0; e < E; e++) b[e] += c[e] > mean ? -gamma : c[e] < mean ? gamma : 0.0f;
    return MOE_OK;
}

/* the shared bank: every token to every shared expert, weight 1; y is overwritten */
static moe_status moe__shared_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    int S = c->n_shared, t, j, k;
    moe_expert_weights w = moe_layer_experts(L, s, 1, 0);
    moe_status st;
    for (t = 0, k = 0; t < T; t++)
        for (j = 0; j < S; j++, k++) {
            L->raw_token[k] = t; L->raw_expert[k] = j; L->raw_slot[k] = j; L->raw_weight[k] = c->shared_scale;
        }
    st = moe_dispatch(&L->shared, L->raw_token, L->raw_expert, L->raw_slot, L->raw_weight, S * T, T, S, &L->err);
    if (st != MOE_OK) return st;
    moe_gather(L->s_xg, x, &L->shared, c->d);
    moe_experts_forward(L->s_eout, L->s_hg, L->s_hu, L->s_xg, &w, L->shared.offset, S, c->d, c->d_ff_shared, c->expert, c->activation, &L->work);
    moe_combine_forward(y, L->s_eout, &L->shared, c->d, 0);
    return MOE_OK;
}

static void moe__shared_backward(moe_layer *L, moe_store *s, float *dx, const float *dy) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 1, 0), gw = moe_layer_experts(L, s, 1, 1);
    moe_combine_backward(L->deout, NULL, dy, L->s_eout, &L->shared, c->d);
    moe_experts_backward(L->dxg, &gw, L->deout, L->s_xg, L->s_hg, L->s_hu, &w, L->shared.offset, c->n_shared, c->d,
                         c->d_ff_shared, c->expert, c->activation, L->experts_dh_gate, L->experts_scratch, &L->work);
    moe_gather_backward(dx, L->dxg, &L->shared, c->d);
}

/* the routed bank: gather, the router's gate pre-activation (AoE), experts, combine (onto the
   shared experts' output when there are any) */
static moe_status moe__routed_forward(moe_layer *L, const moe_store *s, float *y, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 0, 0);
    moe_status st;
    moe_gather(L->xg, x, &L->routed, c->d);
    moe__router_expert_gate_forward(L, s);
    if (L->runner) {
        if ((st = L->runner->forward(L, s, L->runner->user)) != MOE_OK) return st;
    } else {
        moe_experts_forward(L->eout, L->hg, L->hu, L->xg, &w, L->routed.offset, c->n_experts, c->d, c->d_ff, c->expert, c->activation, &L->work);
    }
    moe_combine_forward(y, L->eout, &L->routed, c->d, c->n_shared > 0);
    return MOE_OK;
}

/* after combine's backward (deout, d_weight) */
static moe_status moe__routed_backward(moe_layer *L, moe_store *s, float *dx) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 0, 0), gw = moe_layer_experts(L, s, 0, 1);
    moe_status st;
    if (L->runner) {
        if ((st = L->runner->backward(L, s, L->runner->user)) != MOE_OK) return st;
    } else {
        moe_experts_backward(L->dxg, &gw, L->deout, L->xg, L->hg, L->hu, &w, L->routed.offset, c->n_experts, c->d, c->d_ff,
                             c->expert, c->activation, L->experts_dh_gate, L->experts_scratch, &L->work);
    }
    moe_gather_backward(dx, L->dxg, &L->routed, c->d);
    moe__router_expert_gate_backward(L, s);
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                       int T, const moe_layer_args *args) {
    moe_layer_args a = args ? *args : moe_layer_args_default();
    moe_status st;
    int n;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (!y || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer forward: x and y must not be NULL");
    if (T <= 0 || T > L->max_tokens) return moe_err_set(&L->err, MOE_ERR_SHAPE, "layer forward: T = %d tokens, the layer was sized for 1..%d", T, L->max_tokens);
    if (L->cfg.router_dim != L->cfg.d && !a.router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "router_dim %d differs from d %d: give the router's input in moe_layer_args.router_input", L->cfg.router_dim, L->cfg.d);
    L->T = 0;
    if ((st = moe__router_forward(L, s, x, T, &a, &n)) != MOE_OK) return st;
    st = moe_dispatch(&L->routed, L->raw_token, L->raw_expert, L->raw_slot, L->raw_weight, n, T, L->cfg.n_experts, &L->err);
    if (st != MOE_OK) return st;
    if (L->cfg.n_shared > 0 && (st = moe__shared_forward(L, s, y, x, T)) != MOE_OK) return st;
    if ((st = moe__routed_forward(L, s, y, x)) != MOE_OK) return st;
    moe__router_output_forward(L, s, y, x, T);
    moe__router_aux(L, T);
    L->fwd_router_input = a.router_input;
    L->T = T;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                        const float *x, const moe_layer_args *args) {
    moe_layer_args a = args ? *args : moe_layer_args_default();
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (L->T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "layer backward called without a forward before it");
    if (!dx || !dy || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: dx, dy and x must not be NULL");
    if (a.router_input != L->fwd_router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: give it the router_input of the forward before it");
    if (a.router_input && !a.d_router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: router_input is set, so d_router_input must be too");
    moe_combine_backward(L->deout, L->d_weight, dy, L->eout, &L->routed, L->cfg.d);
    moe__router_output_backward(L, s, dx, dy, x);
    if ((st = moe__routed_backward(L, s, dx)) != MOE_OK) return st;
    if (L->cfg.n_shared > 0) moe__shared_backward(L, s, dx, dy);
    moe__router_backward(L, s, dx, x, a.router_input ? a.router_input : x, a.router_input ? a.d_router_input : dx,
                         a.aux_grad_scale, a.balance_f);
    return MOE_OK;
}
