/* ============================================================================================
   >>moe:router  the router interface: config, routing statistics, the hooks, ONE dispatcher
   ============================================================================================
   A router turns the layer's input into routing data (DESIGN: "routing is data"): per token
   the chosen experts (topk) and their mixing weights (gates), and ONE assignment list
   (token, expert, slot, weight) that the experts consume (>>moe:dispatch). Every family
   implements the same few hooks, each family in its own section with forward and backward
   side by side:
     declare    its tensors in the store; its buffers, sized for max_tokens at init
     scores     logits (T, E) and probabilities (T, E)
     select     each token's choice: topk ids and dense gates
     assign     the raw assignment list and the picks each expert was asked for
     backward   gate gradients -> logit gradients (per token) -> router parameters and input
     aux        auxiliary losses and their gradients (balance and z-loss are shared by all)
   Three extensions compose with the families: GW-MoE broadcasts uncertain tokens after
   select (>>moe:router_gw); HyperMoE adds a hyper-expert to the output (>>moe:router_hyper);
   the router input (RMoE's GRU state, an MLP router) replaces what the linear router reads
   (>>moe:router_input). The dispatcher in this section's implementation is the only code that
   looks at cfg.router. A non-finite router logit is an error: moe_layer_forward returns
   MOE_ERR_NUMERIC with a sentence naming the token and expert, before any selection. */

typedef enum moe_router_kind {
    MOE_ROUTER_TOPK = 0,          /* softmax over E, keep the top k (Switch, DeepSeekMoE;
                                     renormalize = 1 gives Mixtral)                          */
    MOE_ROUTER_SIGMOID = 1,       /* independent sigmoid scores, top k (renormalize optional) */
    MOE_ROUTER_NOISY_TOPK = 2,    /* Shazeer 2017: H = z + noise * (softplus(x Wn) + eps),
                                     weights = softmax over the k kept H                      */
    MOE_ROUTER_EXPERT_CHOICE = 3, /* arXiv 2202.09368: expert e takes its ceil(k*T/E) best tokens.
                                     NOT CAUSAL: a token's routing depends on later tokens    */
    MOE_ROUTER_AOE = 4            /* Autonomy-of-Experts (arXiv 2501.13074): no router. Every
                                     expert computes C_e = x . W_in_e^T (rank aoe_rank), the
                                     logits are the norms ||C_e||, top-k by norm; the chosen
                                     experts reuse C_e for their gate: h_gate = C_e . W_out_e^T.
                                     renormalize = 1: softmax over the k chosen norms (paper);
                                     0: softmax over all norms, unrenormalised (official code) */
} moe_router_kind;

typedef enum moe_balance_loss {
    MOE_BALANCE_NONE = 0,
    MOE_BALANCE_SWITCH = 1,   /* coef * E * sum_i f_i P_i, f_i = share of tokens whose top-1 is i */
    MOE_BALANCE_MIXTRAL = 2,  /* coef * E * sum_i f_i P_i, f_i = (top-k picks of i) / T  (= k at
                                 perfect balance; HF transformers' load_balancing_loss_func)     */
    MOE_BALANCE_DEEPSEEK = 3  /* coef * sum_i f_i P_i, f_i = E/(k T) (picks of i)  (= 1 at balance) */
} moe_balance_loss;

/* Which assignments capacity (capacity_factor > 0) admits first. */
typedef enum moe_capacity_order {
    MOE_CAPACITY_SLOT_MAJOR = 0, /* every token's first choice before any second choice, tokens
                                    in index order (GShard, arXiv 2006.16668; the default)  */
    MOE_CAPACITY_TOKEN_MAJOR = 1 /* token by token, each token's choices in slot order (a
                                    running count over the flattened (token, choice) list) */
} moe_capacity_order;

typedef struct moe_layer_config {
    int d;                    /* model width                                             */
    int d_ff;                 /* expert hidden width D                                   */
    int n_experts;            /* routed experts E                                        */
    int top_k;                /* k, experts per token (per-expert capacity factor for EC) */
    int n_shared;             /* DeepSeekMoE shared experts: always on, weight 1; 0 = none */
    int d_ff_shared;          /* hidden width of a shared expert; 0 = d_ff               */
    moe_expert_kind expert;   /* SwiGLU (default) or two-matrix FFN                      */
    moe_activation activation;/* FFN experts' activation (GELU default)                  */
    int expert_bias;          /* FFN experts carry b_up, b_down                           */
    moe_router_kind router;
    int renormalize;          /* divide the k weights by their sum (>= 1e-20). With k = 1
                                 the weight is always 1: the router then learns only from
                                 the auxiliary losses (use Switch's unnormalised form)   */
    int router_bias;          /* router logits get a bias (E)                             */
    float capacity_factor;    /* 0 = dropless (default); else each expert keeps at most
                                 ceil(cf * k * T / E) assignments, see moe_layer_forward   */
    moe_balance_loss balance; /* load-balancing loss form                                */
    float balance_coef;       /* 0.01                                                    */
    float z_coef;             /* ST-MoE router z-loss coefficient; 0 (1e-3 typical)       */
    float importance_coef;    /* noisy top-k: CV^2 of importance; 0.01 (HyperMoE code)     */
    float load_coef;          /* noisy top-k: CV^2 of smooth load; 0.01                    */
    float noise_eps;          /* noisy top-k: added to softplus(x Wn); 1e-2                */
    float router_init_std;    /* router init N(0, std); 0 = zeros (Shazeer); 0.02         */
    /* GW-MoE (Global Workspace broadcast, fine-tuning only; softmax top-k routers): while the
       call's gw_active flag is set (moe_layer_args), a token whose routing entropy
       u = -sum p ln(p + 1e-5) (the released code's form; divided by ln E when gw_normalized)
       is >= gw_threshold is sent to ALL experts with the full softmax weights. gw_slots > 0
       keeps only the first gw_slots uncertain tokens of each sequence (seq_len tokens each).
       Broadcast assignments are not subject to capacity. gw_released = 1 reproduces the
       released code instead: an uncertain token skips the experts and outputs p_{E-1} * x. */
    float gw_threshold;       /* 0 = off                                                 */
    int gw_normalized;
    int gw_slots;
    int gw_released;
    int aoe_rank;             /* AoE: rank r of the factorised gate (paper: about d/3)   */
    /* HyperMoE (arXiv 2402.12656): hyper = 1 adds a per-token hyper-expert whose weights a
       hypernetwork generates from the embeddings of the experts the token did NOT choose.
       Sizes (official code / tiny): expert embedding e 128/32, processor hidden 128/32,
       condition q 128/32, layer embedding 10/4, hypernetwork b 128/32, adapter a 64/16. */
    int hyper;
    int hyper_embed, hyper_hidden, hyper_cond, hyper_layer_dim, hyper_width, hyper_adapter;
    int hyper_layers;         /* rows of the shared layer embedding (a model: its layers) */
    int hyper_layer;          /* this layer's row                                       */
    int router_dim;           /* width of the router's input; 0 = d (the router reads x).
                                 Another width means the caller supplies router_input
                                 (moe_layer_args): RMoE's GRU state, an MLP router's hidden */
    /* Conventions of the field, as options; the defaults keep this library's own choices. */
    float ec_capacity_factor; /* expert choice: each expert takes ceil(cf T / E) tokens (the
                                 paper's capacity factor c); 0 = top_k, ceil(k T / E)      */
    moe_capacity_order capacity_order; /* which assignments capacity admits first         */
    int drop_passthrough;     /* a dropped assignment outputs weight * x, as HF's Switch
                                 Transformers do (the dropped token passes through its
                                 expert's place), instead of nothing                      */
    float routed_scale;       /* multiplies every routed assignment's weight (DeepSeek-V3's
                                 routed_scaling_factor, arXiv 2412.19437 §2.1.2); 1        */
    float shared_scale;       /* multiplies the shared experts' output; 1                 */
    int hyper_head_bias;      /* HyperMoE: the hypernetwork's output heads carry biases, as
                                 the official code's nn.Linear heads: the generated W_dn,
                                 b_dn, W_up, b_up each get a learned constant             */
    int selection_bias;       /* DeepSeek-V3's auxiliary-loss-free balancing (arXiv
                                 2412.19437 §2.1.2): the top-k choice ranks p + b, the
                                 weights stay p; b (E) = the tensor router.selection_bias,
                                 no gradient, moved by moe_layer_update_selection_bias
                                 (softmax and sigmoid top-k)                              */
    int cv_unbiased;          /* noisy top-k's CV^2 with the unbiased variance (divided by
                                 E - 1), as torch.var in the HyperMoE code; 0 = the
                                 population variance (divided by E), Shazeer's definition */
} moe_layer_config;

/* Routing statistics of the last forward, per layer. */
typedef struct moe_routing_stats {
    int tokens;           /* T                                                               */
    int requested;        /* assignments the router asked for                                */
    int kept;             /* assignments the experts computed                                */
    int dropped;          /* requested - kept (capacity)                                     */
    float drop_rate;      /* dropped / requested                                             */
    int broadcast;        /* GW-MoE: tokens sent to every expert                             */
    float *load;          /* (E) share of kept assignments per expert, sums to 1            */
    float *mean_prob;     /* (E) P_i: mean router probability (normalised scores)           */
    float load_entropy;   /* H(load), nats; ln E = perfectly balanced                       */
    float gate_entropy;   /* mean over tokens of H(probabilities), nats                      */
    float aux_balance;    /* balance loss, coefficient included                              */
    float aux_z;          /* router z-loss, coefficient included                             */
    float aux_cv;         /* noisy top-k CV^2 losses, coefficients included                  */
    float aux_total;      /* the sum: what backward differentiates besides dy              */
    /* each auxiliary term on its own, before its coefficient (computed whatever the
       coefficient, 0 included, so a run can watch a loss it does not train on) */
    float raw_balance;    /* E sum_i f_i P_i (DeepSeek: sum_i f_i P_i); 0 for MOE_BALANCE_NONE */
    float raw_z;          /* mean over tokens of logsumexp(z)^2                              */
    float raw_importance; /* noisy top-k: CV^2 of Importance (0 for other routers)           */
    float raw_load;       /* noisy top-k: CV^2 of Load (0 for other routers)                 */
} moe_routing_stats;

/* The per-expert pieces of the auxiliary losses every family shares (balance, z-loss), in
   the layer, sized at init. */
typedef struct moe_router_aux {
    float *picks;        /* (E) assignments the router asked of each expert, before capacity */
    float *balance_f;    /* (E) f_i of the balance loss (its form: moe_balance_loss)         */
    float *mean_prob;    /* (E) P_i: mean over tokens of the normalised probabilities        */
    float *token_probs;  /* (E) one token's normalised probabilities, while P is summed      */
    float *d_mean_prob;  /* (E) backward: dLoss/dP_i of the balance loss                     */
} moe_router_aux;

MOEDEF moe_layer_config moe_layer_config_default(void);
/* Checks a config; a sentence in err on failure. */
MOEDEF moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>moe:router
   ============================================================================================
   THE HOOKS, family by family (each defined in its own section below this one). A hook
   takes the layer; T is the forward's token count; t a token. */
/* the linear router, read by every family but AoE (>>moe:router_topk) */
static void moe__linear_router_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__linear_router_logits(moe_layer *L, const moe_store *s, const float *rin, int T);
static void moe__linear_router_backward(moe_layer *L, moe_store *s, float *drin, const float *rin);
/* softmax / sigmoid top-k (>>moe:router_topk) */
static void moe__topk_select(moe_layer *L, const moe_store *s, int t);
static int moe__topk_assign(moe_layer *L, int T, int dropless);
static void moe__topk_backward_token(moe_layer *L, int t);
static void moe__softmax_backward_token(moe_layer *L, int t);
static void moe__sigmoid_probs(moe_layer *L, int T);
static void moe__topk_passthrough_forward(moe_layer *L, float *y, const float *x, int T);
static void moe__topk_passthrough_backward(moe_layer *L, float *dx, const float *dy, const float *x);
static void moe__topk_passthrough_gates_backward(moe_layer *L);
static void moe__sigmoid_backward_token(moe_layer *L, int t);
static void moe__sigmoid_norm_probs(const moe_layer *L, int t, float *out);
static void moe__sigmoid_mean_prob_backward(moe_layer *L, int t);
/* noisy top-k (>>moe:router_noisy) */
static int moe__noisy_alloc(moe_layer *L);
static void moe__noisy_free(moe_layer *L);
static void moe__noisy_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__noisy_scores(moe_layer *L, const moe_store *s, const float *rin, const float *noise, int T);
static void moe__noisy_select(moe_layer *L, int t);
static void moe__noisy_aux(moe_layer *L, int T);
static void moe__noisy_aux_backward(moe_layer *L, float scale);
static void moe__noisy_backward_token(moe_layer *L, int t);
static void moe__noisy_backward(moe_layer *L, moe_store *s, float *drin, const float *rin);
/* expert choice (>>moe:router_ec) */
static int moe__ec_alloc(moe_layer *L);
static void moe__ec_free(moe_layer *L);
static int moe__ec_assign(moe_layer *L, int T);
/* AoE (>>moe:router_aoe) */
static int moe__aoe_alloc(moe_layer *L);
static void moe__aoe_free(moe_layer *L);
static void moe__aoe_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__aoe_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T);
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s);
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s);
static void moe__aoe_backward(moe_layer *L, moe_store *s, float *dx, const float *x);
/* GW-MoE broadcast, an extension of softmax top-k (>>moe:router_gw) */
static int moe__gw_alloc(moe_layer *L);
static void moe__gw_free(moe_layer *L);
static void moe__gw_mark(moe_layer *L, int T, const moe_layer_args *a);
static int moe__gw_assign_token(moe_layer *L, int t, int n);
static void moe__gw_output_forward(moe_layer *L, float *y, const float *x, int T);
static void moe__gw_output_backward(moe_layer *L, float *dx, const float *dy, const float *x);
static void moe__gw_backward_token(moe_layer *L, int t);
/* HyperMoE, an extension of any family (>>moe:router_hyper) */
static int moe__hyper_alloc(moe_layer *L);
static void moe__hyper_free(moe_layer *L);
static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__hyper_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T);
static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x);

/* ---- helpers the families share ---- */

/* ptr = count zeroed objects of type; 1 when it worked (chains with &&: after a failure the
   remaining pointers stay NULL, so a free function can free them all) */
#define MOE__ALLOC(ptr, count, type) (((ptr) = (type *)moe__calloc((size_t)(count), sizeof(type))) != NULL)

/* declares one of the layer's tensors, `prefix` + name; the first failure stays in L->err */
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

static float moe__softplus(float x) { return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x))); }

/* 1 when score a (index ia) ranks above score b (index ib): larger first, ties to the lower
   index, NaN below every number, so the order is total and a pick is always an index */
static int moe__ranks_above(float a, int ia, float b, int ib) {
    if (a != a || b != b) return (b != b) && (a == a || ia < ib);
    return a > b || (a == b && ia < ib);
}

/* idx[0..k) = indices of the k largest scores, descending; ties go to the lower index (k <= E).
   The readable reference: each pick is the best entry that ranks below the previous pick
   (k passes over the row). The forward refuses non-finite logits before any selection; the
   total order keeps both versions in bounds even so. */
MOE__REF void moe__topk_row_naive(const float *score, int E, int k, int *idx) {
    int s, j;
    for (s = 0; s < k; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0 && !moe__ranks_above(score[idx[s - 1]], idx[s - 1], score[j], j)) continue;
            if (best < 0 || moe__ranks_above(score[j], j, score[best], best)) best = j;
        }
        idx[s] = best;
    }
}

/* The same picks in one pass: idx holds the best so far in order, and an entry that ranks
   below the k-th costs one comparison (E = 64, k = 8: a layer's selection for 4096 tokens
   took 2.8 ms instead of 8.1). The order is total, so the result is the reference's exactly. */
static void moe__topk_row(const float *score, int E, int k, int *idx) {
    int n = 0, j, s;
    for (j = 0; j < E; j++) {
        if (n == k && !moe__ranks_above(score[j], j, score[idx[k - 1]], idx[k - 1])) continue;
        s = n < k ? n++ : k - 1;
        for (; s > 0 && moe__ranks_above(score[j], j, score[idx[s - 1]], idx[s - 1]); s--) idx[s] = idx[s - 1];
        idx[s] = j;
    }
}

static int moe__float_desc(const void *pa, const void *pb) {
    float a = *(const float *)pa, b = *(const float *)pb;
    return a > b ? -1 : a < b;
}

static int moe__int_cmp(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    return a < b ? -1 : a > b;
}

/* CV^2 = var / (mean^2 + 1e-10) of x (n >= 2), var the population variance (divided by n)
   or the unbiased one (by n - 1); times coef, and its gradient dx (n) */
static float moe__cv2(const float *x, int n, float coef, float *dx, int unbiased) {
    double m = 0.0, var = 0.0, den, div = unbiased ? (double)(n - 1) : (double)n;
    int i;
    for (i = 0; i < n; i++) m += x[i];
    m /= n;
    for (i = 0; i < n; i++) var += (x[i] - m) * (x[i] - m);
    var /= div;
    den = m * m + 1e-10;
    if (dx)
        for (i = 0; i < n; i++)
            dx[i] = (float)(coef * ((2.0 * (x[i] - m) / div) * den - var * 2.0 * m / n) / (den * den));
    return (float)(coef * var / den);
}

static double moe__entropy(const float *p, int n) {
    double h = 0.0;
    int i;
    for (i = 0; i < n; i++)
        if (p[i] > 0.0f) h -= (double)p[i] * log((double)p[i]);
    return h;
}

/* ---- THE DISPATCHER: one switch per hook, the only code that reads cfg.router ----------------
   A switch rather than a table of function pointers: the families share most hooks (the linear
   router serves four of them, softmax top-k's selection serves sigmoid and AoE, its backward
   serves expert choice), a case list says so in one line, and the extensions (GW-MoE,
   HyperMoE, the router input) combine with any kind, which a table indexed by the kind cannot
   express. */

static moe_status moe__router_validate(const moe_layer_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    switch (c->router) {
    case MOE_ROUTER_AOE:
        if (c->aoe_rank <= 0 || c->expert != MOE_EXPERT_SWIGLU || c->router_bias || c->router_dim > 0)
            return moe_err_set(err, bad, "AoE needs aoe_rank > 0 and SwiGLU experts, and has no router (no router_bias, no router_input)");
        if ((double)c->n_experts * c->aoe_rank * (c->d > c->d_ff ? c->d : c->d_ff) > 4e9)
            return moe_err_set(err, bad, "aoe_rank %d is too large for %d experts", c->aoe_rank, c->n_experts);
        break;
    case MOE_ROUTER_NOISY_TOPK:
        if (c->top_k >= c->n_experts)
            return moe_err_set(err, bad, "noisy top-k needs top_k < n_experts (its load estimate compares with the (k+1)-th logit); got k=%d, E=%d", c->top_k, c->n_experts);
        break;
    case MOE_ROUTER_EXPERT_CHOICE:
        if (c->capacity_factor != 0.0f)
            return moe_err_set(err, bad, "expert-choice takes its capacity from ec_capacity_factor (or top_k): each expert keeps ceil(cf*T/E) tokens; leave capacity_factor at 0");
        break;
    default: break;
    }
    if (c->drop_passthrough && (c->capacity_factor <= 0.0f || c->router == MOE_ROUTER_EXPERT_CHOICE))
        return moe_err_set(err, bad, "drop_passthrough needs a token-choice router with capacity (capacity_factor > 0)");
    if (c->selection_bias && c->router != MOE_ROUTER_TOPK && c->router != MOE_ROUTER_SIGMOID)
        return moe_err_set(err, bad, "selection_bias applies to the softmax and sigmoid top-k routers");
    if (c->ec_capacity_factor != 0.0f && c->router != MOE_ROUTER_EXPERT_CHOICE)
        return moe_err_set(err, bad, "ec_capacity_factor applies to the expert-choice router only (token-choice routers use capacity_factor)");
    if (c->gw_threshold > 0.0f && c->router != MOE_ROUTER_TOPK)
        return moe_err_set(err, bad, "GW-MoE broadcast needs the softmax top-k router (MOE_ROUTER_TOPK)");
    return MOE_OK;
}

/* a token's routing depends on that token alone (expert choice ranks tokens against each other) */
static int moe__router_is_causal(const moe_layer_config *c) { return c->router != MOE_ROUTER_EXPERT_CHOICE; }
/* training draws N(0, 1) routing noise (moe_layer_args.noise) */
static int moe__router_draws_noise(const moe_layer_config *c) { return c->router == MOE_ROUTER_NOISY_TOPK; }
/* the router declares the routed experts' gate (AoE's factorised w_gate_in, w_gate_out) */
static int moe__router_owns_expert_gate(const moe_layer_config *c) { return c->router == MOE_ROUTER_AOE; }
/* parameters of one routed expert that a token leaves idle when it does not choose the expert
   (AoE: every expert's W_in runs for every token) */
static size_t moe__router_idle_expert_params(const moe_layer_config *c) {
    if (c->router == MOE_ROUTER_AOE) return 2 * (size_t)c->d * c->d_ff + (size_t)c->d_ff * c->aoe_rank;
    return (size_t)(c->expert == MOE_EXPERT_SWIGLU ? 3 : 2) * c->d * c->d_ff + (c->expert_bias ? (size_t)c->d_ff + c->d : 0);
}

/* rows of the routed assignment list: token choice needs T K; expert choice
   E ceil(cf T / E) <= ceil(cf) T + E (cf = top_k by default); GW broadcast T E */
static int moe__router_list_rows(const moe_layer_config *c, int max_tokens) {
    int per_token = c->top_k;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->ec_capacity_factor > 0.0f) per_token = (int)ceil(c->ec_capacity_factor);
    /* an expert takes a token at most once (expert choice caps C at T) */
    if (c->gw_threshold > 0.0f || per_token > c->n_experts) per_token = c->n_experts;
    return max_tokens * per_token + c->n_experts;
}

/* the router's tensors: they come first in the layer's part of the store */
static void moe__router_declare(moe_layer *L, moe_store *s, const char *prefix) {
    switch (L->cfg.router) {
    case MOE_ROUTER_AOE: moe__aoe_declare(L, s, prefix); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe__linear_router_declare(L, s, prefix);
        moe__noisy_declare(L, s, prefix);
        break;
    default: moe__linear_router_declare(L, s, prefix); break;
    }
}

/* the extensions' tensors: after the experts' (the store's order is the checkpoint layout) */
static void moe__router_declare_extensions(moe_layer *L, moe_store *s, const char *prefix) {
    if (L->cfg.hyper) moe__hyper_declare(L, s, prefix);
}

/* the families' and extensions' buffers, sized for max_tokens; 0 when out of memory */
static int moe__router_alloc(moe_layer *L) {
    int ok = moe__gw_alloc(L) && /* GW's per-token flags are read by every token-choice family */
             (!L->cfg.selection_bias || MOE__ALLOC(L->selection_scores, (size_t)L->max_tokens * L->cfg.n_experts, float)) &&
             (!L->cfg.drop_passthrough || (MOE__ALLOC(L->passthrough, L->max_tokens, float) &&
                                           MOE__ALLOC(L->d_passthrough, L->max_tokens, float)));
    switch (L->cfg.router) {
    case MOE_ROUTER_NOISY_TOPK: ok = ok && moe__noisy_alloc(L); break;
    case MOE_ROUTER_EXPERT_CHOICE: ok = ok && moe__ec_alloc(L); break;
    case MOE_ROUTER_AOE: ok = ok && moe__aoe_alloc(L); break;
    default: break;
    }
    return ok && (!L->cfg.hyper || moe__hyper_alloc(L));
}

static void moe__router_free(moe_layer *L) {
    MOE_FREE(L->selection_scores); MOE_FREE(L->passthrough); MOE_FREE(L->d_passthrough);
    L->selection_scores = L->passthrough = L->d_passthrough = NULL;
    moe__gw_free(L);
    moe__noisy_free(L);
    moe__ec_free(L);
    moe__aoe_free(L);
    moe__hyper_free(L);
}

/* draws in a fixed order: HyperMoE's tensors, then the router (a linear router's weight or
   AoE's gate factors); biases and the noise projection start at zero */
static void moe__router_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    float *w = moe_store_param(s, L->id_router_w), *b = moe_store_param(s, L->id_router_b);
    size_t i;
    if (L->cfg.hyper) moe__hyper_init_weights(L, s, rng);
    if (w)
        for (i = 0; i < s->tensors[L->id_router_w].numel; i++) w[i] = L->cfg.router_init_std * moe_rng_normal(rng);
    if (b) memset(b, 0, s->tensors[L->id_router_b].numel * sizeof(float));
    if (L->id_selection_bias >= 0) memset(moe_store_param(s, L->id_selection_bias), 0, sizeof(float) * (size_t)L->cfg.n_experts);
    switch (L->cfg.router) {
    case MOE_ROUTER_AOE: moe__aoe_init_weights(L, s, rng); break;
    case MOE_ROUTER_NOISY_TOPK: {
        float *wn = moe_store_param(s, L->noisy.id_w_noise);
        memset(wn, 0, s->tensors[L->noisy.id_w_noise].numel * sizeof(float)); /* Shazeer: zero */
        break;
    }
    default: break;
    }
}

/* logits, lse, probabilities (and noisy top-k's H); a non-finite logit (or H) is an error */
static moe_status moe__router_scores(moe_layer *L, const moe_store *s, const float *x, const float *rin,
                                     const moe_layer_args *a, int T) {
    int E = L->cfg.n_experts, t;
    size_t i, TE = (size_t)T * E;
    if (L->cfg.router == MOE_ROUTER_AOE)
        moe__aoe_logits(L, s, x, T);
    else
        moe__linear_router_logits(L, s, rin, T);
    for (i = 0; i < TE; i++)
        if (!isfinite(L->logits[i]))
            return moe_err_set(&L->err, MOE_ERR_NUMERIC, "router logit of token %d for expert %d is %g: the router's parameters "
                               "or its input are not finite (a diverged run?); nothing was routed",
                               (int)(i / (size_t)E), (int)(i % (size_t)E), (double)L->logits[i]);
    MOE_OMP_FOR_IF((double)T * E > 1e5) /* per token: the same bits for any thread count */
    for (t = 0; t < T; t++) {
        const float *z = L->logits + (size_t)t * E;
        float mx = -FLT_MAX;
        double sum = 0.0;
        int e;
        for (e = 0; e < E; e++) mx = z[e] > mx ? z[e] : mx;
        for (e = 0; e < E; e++) sum += exp((double)(z[e] - mx));
        L->lse[t] = (float)(log(sum) + mx);
    }
    switch (L->cfg.router) {
    case MOE_ROUTER_SIGMOID: moe__sigmoid_probs(L, T); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe_softmax_forward(L->probs, L->logits, T, E);
        moe__noisy_scores(L, s, rin, a->noise, T);
        for (i = 0; i < TE; i++)
            if (!isfinite(L->noisy.H[i]))
                return moe_err_set(&L->err, MOE_ERR_NUMERIC, "noisy router score H of token %d for expert %d is %g: the noise "
                                   "projection, the noise or the input is not finite; nothing was routed",
                                   (int)(i / (size_t)E), (int)(i % (size_t)E), (double)L->noisy.H[i]);
        break;
    default: moe_softmax_forward(L->probs, L->logits, T, E); break;
    }
    return MOE_OK;
}

/* token t's choice: topk ids and dense gates (gates were zeroed) */
static void moe__router_select_token(moe_layer *L, const moe_store *st, int t) {
    int K = L->cfg.top_k, s;
    switch (L->cfg.router) {
    case MOE_ROUTER_NOISY_TOPK: moe__noisy_select(L, t); break;
    case MOE_ROUTER_EXPERT_CHOICE: /* the experts choose in assign: no per-token choice */
        for (s = 0; s < K; s++) L->topk[(size_t)t * K + s] = -1;
        break;
    default: moe__topk_select(L, st, t); break; /* softmax, sigmoid, AoE (softmax of the norms) */
    }
}

/* the raw assignment list and the requested picks; returns its length */
static int moe__router_assign(moe_layer *L, int T, const moe_layer_args *a) {
    switch (L->cfg.router) {
    case MOE_ROUTER_EXPERT_CHOICE: return moe__ec_assign(L, T);
    default: return moe__topk_assign(L, T, a->dropless); /* token choice, capacity, GW broadcast */
    }
}

/* The router's forward: scores, each token's choice, GW-MoE's broadcast, the raw assignment
   list (L->raw_*, *n entries) whose weights carry routed_scale. */
static moe_status moe__router_forward(moe_layer *L, const moe_store *s, const float *x, int T, const moe_layer_args *a,
                                      int *n) {
    const float *rin = a->router_input ? a->router_input : x;
    moe_status st;
    int t;
    if ((st = moe__router_scores(L, s, x, rin, a, T)) != MOE_OK) return st;
    memset(L->gates, 0, (size_t)T * L->cfg.n_experts * sizeof(float));
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_select_token(L, s, t);
    moe__gw_mark(L, T, a);
    *n = moe__router_assign(L, T, a);
    if (L->cfg.routed_scale != 1.0f)
        for (t = 0; t < *n; t++) L->raw_weight[t] *= L->cfg.routed_scale;
    return MOE_OK;
}

/* the routed experts' gate pre-activation from the router (AoE reuses its low-rank cache),
   before the routed experts run; and its backward (d h_gate in L->experts_dh_gate) */
static void moe__router_expert_gate_forward(moe_layer *L, const moe_store *s) {
    if (moe__router_owns_expert_gate(&L->cfg)) moe__aoe_gate_forward(L, s);
}
static void moe__router_expert_gate_backward(moe_layer *L, moe_store *s) {
    if (moe__router_owns_expert_gate(&L->cfg)) moe__aoe_gate_backward(L, s);
}

/* what else reaches y after the experts: dropped assignments passed through (HF Switch),
   GW's released-code bypass, HyperMoE's hyper-expert; and their backward (dx +=; the
   pass-through and the bypass keep the gradient of their weight for the router) */
static void moe__router_output_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    if (L->cfg.drop_passthrough) moe__topk_passthrough_forward(L, y, x, T);
    if (L->cfg.gw_released) moe__gw_output_forward(L, y, x, T);
    if (L->cfg.hyper) moe__hyper_forward(L, s, y, x, T);
}
static void moe__router_output_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    if (L->cfg.hyper) moe__hyper_backward(L, s, dx, dy, x); /* no gradient to the router: the set is discrete */
    if (L->cfg.gw_released) moe__gw_output_backward(L, dx, dy, x);
    if (L->cfg.drop_passthrough) moe__topk_passthrough_backward(L, dx, dy, x);
}

/* Auxiliary losses of the last forward and the routing statistics. P_i (the balance loss's
   mean probability) averages the normalised probabilities: the softmax itself, or for the
   sigmoid router the scores divided by their sum. */
static void moe__router_aux(moe_layer *L, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, t, e;
    float *f = L->aux.balance_f, *P = L->aux.mean_prob, *pn = L->aux.token_probs, *picks = L->aux.picks;
    double gate_h = 0.0, acc, z = 0.0;
    moe_routing_stats *st = &L->stats;
    for (e = 0; e < E; e++) P[e] = f[e] = 0.0f;
    for (t = 0; t < T; t++) { /* P_i, summed in token order */
        if (c->router == MOE_ROUTER_SIGMOID) moe__sigmoid_norm_probs(L, t, pn);
        else memcpy(pn, L->probs + (size_t)t * E, sizeof(float) * (size_t)E);
        for (e = 0; e < E; e++) P[e] += pn[e];
        gate_h += moe__entropy(pn, E);
    }
    for (e = 0; e < E; e++) P[e] /= (float)T;
    if (c->balance == MOE_BALANCE_SWITCH) { /* f_i: share of tokens whose top-1 is i */
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
    st->raw_balance = c->balance == MOE_BALANCE_NONE ? 0.0f : (float)((c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc);
    for (t = 0; t < T; t++) z += (double)L->lse[t] * L->lse[t];
    st->aux_z = (float)(c->z_coef * z / T);
    st->raw_z = (float)(z / T);
    st->aux_cv = st->raw_importance = st->raw_load = 0.0f;
    if (c->router == MOE_ROUTER_NOISY_TOPK) moe__noisy_aux(L, T); /* sets aux_cv, raw_importance, raw_load */
    st->aux_total = st->aux_balance + st->aux_z + st->aux_cv;
    /* statistics; broadcast (GW) tokens are outside the requested/kept/dropped accounting */
    st->tokens = T;
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
}

/* dlogits of token t from its gate gradients, the balance loss through P and the z-loss */
static void moe__router_backward_token(moe_layer *L, int t, float aux_scale) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *z = L->logits + r;
    float *dz = L->d_logits + r;
    if (L->gw.uncertain[t]) moe__gw_backward_token(L, t); /* broadcast: gates are the full softmax */
    else switch (c->router) {
    case MOE_ROUTER_SIGMOID: moe__sigmoid_backward_token(L, t); break;
    case MOE_ROUTER_NOISY_TOPK: moe__noisy_backward_token(L, t); break;
    case MOE_ROUTER_EXPERT_CHOICE: moe__softmax_backward_token(L, t); break; /* g = p at the chosen */
    default: moe__topk_backward_token(L, t); break; /* softmax top-k, AoE */
    }
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) { /* the balance loss through P */
        if (c->router == MOE_ROUTER_SIGMOID) {
            moe__sigmoid_mean_prob_backward(L, t);
        } else {
            const float *dP = L->aux.d_mean_prob;
            float dot = 0.0f;
            for (e = 0; e < E; e++) dot += dP[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dP[e] - dot);
        }
    }
    if (c->z_coef > 0.0f) { /* z-loss: d/dz_j of c/T * lse^2 = 2c/T * lse * softmax(z)_j */
        float g = 2.0f * c->z_coef * aux_scale / (float)L->T * L->lse[t];
        for (e = 0; e < E; e++) dz[e] += g * expf(z[e] - L->lse[t]);
    }
}

/* The router's backward, after the experts': d(assignment weight) in L->d_weight -> gate
   gradients -> logit gradients -> the router's parameters, and its input's gradient into drin
   (the router input's when the router reads one, else dx). aux_scale multiplies the aux
   losses' gradients; balance_f, when given, replaces the layer's own f of the balance loss. */
static void moe__router_backward(moe_layer *L, moe_store *s, float *dx, const float *x, const float *rin, float *drin,
                                 float aux_scale, const float *balance_f) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, T = L->T, t, e, i;
    size_t TE = (size_t)T * E;
    memset(L->d_gates, 0, TE * sizeof(float));
    memset(L->d_logits, 0, TE * sizeof(float));
    for (i = 0; i < L->routed.n; i++) /* weight = gate * routed_scale */
        L->d_gates[(size_t)L->routed.token[i] * E + L->routed.expert[i]] = L->d_weight[i] * c->routed_scale;
    if (c->gw_released)
        for (t = 0; t < T; t++)
            if (L->gw.uncertain[t]) L->d_gates[(size_t)t * E + E - 1] = L->gw.d_bypass[t];
    if (c->drop_passthrough) moe__topk_passthrough_gates_backward(L);
    if (c->router == MOE_ROUTER_NOISY_TOPK) moe__noisy_aux_backward(L, aux_scale);
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) {
        float scale = c->balance_coef * aux_scale * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0f : (float)E) / (float)T;
        const float *f = balance_f ? balance_f : L->aux.balance_f;
        for (e = 0; e < E; e++) L->aux.d_mean_prob[e] = scale * f[e]; /* f is a constant */
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_backward_token(L, t, aux_scale);
    switch (c->router) {
    case MOE_ROUTER_AOE: moe__aoe_backward(L, s, dx, x); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe__linear_router_backward(L, s, drin, rin);
        moe__noisy_backward(L, s, drin, rin);
        break;
    default: moe__linear_router_backward(L, s, drin, rin); break;
    }
}

/* ---- the config ---- */

MOE__IMPL moe_layer_config moe_layer_config_default(void) {
    moe_layer_config c;
    memset(&c, 0, sizeof c);
    c.d = 64;
    c.d_ff = 128;
    c.n_experts = 8;
    c.top_k = 2;
    c.expert = MOE_EXPERT_SWIGLU;
    c.activation = MOE_ACT_GELU;
    c.router = MOE_ROUTER_TOPK;
    c.renormalize = 1;
    c.balance = MOE_BALANCE_MIXTRAL;
    c.balance_coef = 0.01f;
    c.importance_coef = 0.01f;
    c.load_coef = 0.01f;
    c.noise_eps = 1e-2f;
    c.router_init_std = 0.02f;
    c.hyper_embed = c.hyper_hidden = c.hyper_cond = c.hyper_width = 32; /* used when hyper = 1 */
    c.hyper_layer_dim = 4;
    c.hyper_adapter = 16;
    c.hyper_layers = 1;
    c.routed_scale = c.shared_scale = 1.0f;
    return c;
}

static int moe__bad_coef(float x) { return !(x >= 0.0f) || x > 1e30f; } /* negative, NaN, inf */

MOE__IMPL moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    if (!c) return moe_err_set(err, bad, "layer config is NULL");
    if (c->d <= 0 || c->d_ff <= 0) return moe_err_set(err, bad, "d (%d) and d_ff (%d) must be positive", c->d, c->d_ff);
    if (c->n_experts <= 0) return moe_err_set(err, bad, "n_experts must be positive, got %d", c->n_experts);
    if (c->top_k <= 0) return moe_err_set(err, bad, "top_k must be at least 1, got %d", c->top_k);
    if (c->top_k > c->n_experts) return moe_err_set(err, bad, "top_k (%d) exceeds n_experts (%d)", c->top_k, c->n_experts);
    if ((int)c->router < 0 || (int)c->router > MOE_ROUTER_AOE) return moe_err_set(err, bad, "unknown router kind %d", (int)c->router);
    if ((int)c->expert < 0 || (int)c->expert > MOE_EXPERT_FFN) return moe_err_set(err, bad, "unknown expert kind %d", (int)c->expert);
    if ((int)c->activation < 0 || (int)c->activation > MOE_ACT_RELU) return moe_err_set(err, bad, "unknown activation %d", (int)c->activation);
    if (c->expert_bias && c->expert != MOE_EXPERT_FFN) return moe_err_set(err, bad, "expert_bias applies to MOE_EXPERT_FFN experts only");
    if ((int)c->balance < 0 || (int)c->balance > MOE_BALANCE_DEEPSEEK) return moe_err_set(err, bad, "unknown balance loss %d", (int)c->balance);
    if (c->n_shared < 0 || c->d_ff_shared < 0) return moe_err_set(err, bad, "n_shared (%d) and d_ff_shared (%d) must not be negative", c->n_shared, c->d_ff_shared);
    if (!(c->capacity_factor >= 0.0f) || c->capacity_factor > 1e6f)
        return moe_err_set(err, bad, "capacity_factor must be 0 (dropless) or positive, got %g", (double)c->capacity_factor);
    if (moe__bad_coef(c->balance_coef) || moe__bad_coef(c->z_coef) || moe__bad_coef(c->importance_coef) ||
        moe__bad_coef(c->load_coef) || moe__bad_coef(c->noise_eps) || moe__bad_coef(c->router_init_std))
        return moe_err_set(err, bad, "loss coefficients, noise_eps and router_init_std must be finite and >= 0");
    if (!(c->gw_threshold >= 0.0f) || c->gw_slots < 0) return moe_err_set(err, bad, "gw_threshold and gw_slots must not be negative");
    if (!(c->routed_scale > 0.0f) || c->routed_scale > 1e6f || !(c->shared_scale > 0.0f) || c->shared_scale > 1e6f)
        return moe_err_set(err, bad, "routed_scale (%g) and shared_scale (%g) must be positive and finite (1 = unscaled)",
                           (double)c->routed_scale, (double)c->shared_scale);
    if ((int)c->capacity_order < 0 || (int)c->capacity_order > MOE_CAPACITY_TOKEN_MAJOR)
        return moe_err_set(err, bad, "unknown capacity_order %d", (int)c->capacity_order);
    if (!(c->ec_capacity_factor >= 0.0f) || c->ec_capacity_factor > 1e6f)
        return moe_err_set(err, bad, "ec_capacity_factor must be 0 (top_k) or positive, got %g", (double)c->ec_capacity_factor);
    if (c->router_dim < 0) return moe_err_set(err, bad, "router_dim must not be negative");
    if (c->hyper && (c->hyper_embed <= 0 || c->hyper_hidden <= 0 || c->hyper_cond <= 0 || c->hyper_layer_dim <= 0 ||
                     c->hyper_width <= 0 || c->hyper_adapter <= 0 || c->hyper_layers <= 0 || c->hyper_layer < 0 ||
                     c->hyper_layer >= c->hyper_layers))
        return moe_err_set(err, bad, "HyperMoE needs positive hyper sizes and 0 <= hyper_layer < hyper_layers");
    if (c->hyper && ((double)c->hyper_adapter * c->hyper_width + c->hyper_width > 1e8 || (double)c->hyper_cond + c->hyper_layer_dim > 1e8 ||
                     (double)c->hyper_adapter * c->hyper_width * c->d > 4e9 || (double)c->hyper_embed * c->hyper_hidden > 4e9 ||
                     (double)c->hyper_hidden * c->hyper_cond > 4e9))
        return moe_err_set(err, bad, "HyperMoE's sizes are too large (hyper_adapter %d x hyper_width %d)", c->hyper_adapter, c->hyper_width);
    if (c->n_shared > 0 && (double)c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff) * c->d > 4e9)
        return moe_err_set(err, bad, "shared experts too large (n_shared*d_ff_shared*d = %.3g floats)", (double)c->n_shared * c->d_ff_shared * c->d);
    if (moe__router_validate(c, err) != MOE_OK) return bad;
    if ((double)c->n_experts * c->d_ff * c->d > 4e9) return moe_err_set(err, bad, "layer too large (E*d_ff*d = %.3g floats)", (double)c->n_experts * c->d_ff * c->d);
    return MOE_OK;
}
