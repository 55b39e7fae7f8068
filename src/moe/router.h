/* ============================================================================================
   >>moe:router  routers and their auxiliary losses
   ============================================================================================ */

typedef enum moe_router_kind {
    MOE_ROUTER_TOPK = 0,          /* softmax over E, keep the top k (Switch, DeepSeekMoE;
                                     renormalize = 1 gives Mixtral)                          */
    MOE_ROUTER_SIGMOID = 1,       /* independent sigmoid scores, top k (renormalize optional) */
    MOE_ROUTER_NOISY_TOPK = 2,    /* Shazeer 2017: H = z + noise * (softplus(x Wn) + eps),
                                     weights = softmax over the k kept H                      */
    MOE_ROUTER_EXPERT_CHOICE = 3, /* Zhou 2022: expert e takes its ceil(k*T/E) best tokens.
                                     NOT CAUSAL: a token's routing depends on later tokens    */
    MOE_ROUTER_AOE = 4            /* Autonomy-of-Experts (Lv et al. 2025): no router. Every
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
       layer's gw_active flag is set, a token whose routing entropy u = -sum p ln(p + 1e-5)
       (the released code's form; divided by ln E when gw_normalized) is >= gw_threshold is
       sent to ALL experts with the full softmax weights. gw_slots > 0 keeps only the first
       gw_slots uncertain tokens of each sequence (seq_len tokens each). Broadcast
       assignments are not subject to capacity. gw_released = 1 reproduces the released
       code instead: an uncertain token skips the experts and outputs p_{E-1} * x.        */
    float gw_threshold;       /* 0 = off                                                 */
    int gw_normalized;
    int gw_slots;
    int gw_released;
    int aoe_rank;             /* AoE: rank r of the factorised gate (paper: about d/3)   */
    /* HyperMoE (Zhao et al. 2024): hyper = 1 adds a per-token hyper-expert whose weights a
       hypernetwork generates from the embeddings of the experts the token did NOT choose.
       Sizes (official code / tiny): expert embedding e 128/32, processor hidden 128/32,
       condition q 128/32, layer embedding 10/4, hypernetwork b 128/32, adapter a 64/16. */
    int hyper;
    int hyper_embed, hyper_hidden, hyper_cond, hyper_layer_dim, hyper_width, hyper_adapter;
    int hyper_layers;         /* rows of the shared layer embedding (a model: its layers) */
    int hyper_layer;          /* this layer's row                                       */
    int router_dim;           /* width of the router's input; 0 = d (the router reads x).
                                 Another width means the caller supplies router_input:
                                 RMoE's GRU state, an MLP router's hidden layer          */
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
} moe_routing_stats;

MOEDEF moe_layer_config moe_layer_config_default(void);
/* AoE's parameter matching (paper Eq. 5): the expert width D' that gives a rank-r AoE layer the
   parameters of a SwiGLU MoE layer of width D: (3 d D - r d) / (r + 2 d), rounded up. */
MOEDEF int moe_aoe_matched_width(int d, int D, int r);
/* Checks a config; a sentence in err on failure. */
MOEDEF moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>moe:router
   ============================================================================================ */

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
    return c;
}

MOE__IMPL int moe_aoe_matched_width(int d, int D, int r) {
    /* rounded up, as the paper's 6469.2 -> 6470 (the 1e-9 keeps exact integers exact) */
    return (int)ceil((3.0 * d * D - (double)r * d) / ((double)r + 2.0 * d) - 1e-9);
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
    if (c->router == MOE_ROUTER_AOE && (c->aoe_rank <= 0 || c->expert != MOE_EXPERT_SWIGLU || c->router_bias || c->router_dim > 0))
        return moe_err_set(err, bad, "AoE needs aoe_rank > 0 and SwiGLU experts, and has no router (no router_bias, no router_input)");
    if (c->router == MOE_ROUTER_NOISY_TOPK && c->top_k >= c->n_experts)
        return moe_err_set(err, bad, "noisy top-k needs top_k < n_experts (its load estimate compares with the (k+1)-th logit); got k=%d, E=%d", c->top_k, c->n_experts);
    if ((int)c->expert < 0 || (int)c->expert > MOE_EXPERT_FFN) return moe_err_set(err, bad, "unknown expert kind %d", (int)c->expert);
    if ((int)c->activation < 0 || (int)c->activation > MOE_ACT_RELU) return moe_err_set(err, bad, "unknown activation %d", (int)c->activation);
    if (c->expert_bias && c->expert != MOE_EXPERT_FFN) return moe_err_set(err, bad, "expert_bias applies to MOE_EXPERT_FFN experts only");
    if ((int)c->balance < 0 || (int)c->balance > MOE_BALANCE_DEEPSEEK) return moe_err_set(err, bad, "unknown balance loss %d", (int)c->balance);
    if (c->n_shared < 0 || c->d_ff_shared < 0) return moe_err_set(err, bad, "n_shared (%d) and d_ff_shared (%d) must not be negative", c->n_shared, c->d_ff_shared);
    if (!(c->capacity_factor >= 0.0f) || c->capacity_factor > 1e6f)
        return moe_err_set(err, bad, "capacity_factor must be 0 (dropless) or positive, got %g", (double)c->capacity_factor);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->capacity_factor != 0.0f)
        return moe_err_set(err, bad, "expert-choice takes its capacity from top_k (each expert keeps ceil(k*T/E) tokens); leave capacity_factor at 0");
    if (moe__bad_coef(c->balance_coef) || moe__bad_coef(c->z_coef) || moe__bad_coef(c->importance_coef) ||
        moe__bad_coef(c->load_coef) || moe__bad_coef(c->noise_eps) || moe__bad_coef(c->router_init_std))
        return moe_err_set(err, bad, "loss coefficients, noise_eps and router_init_std must be finite and >= 0");
    if (!(c->gw_threshold >= 0.0f) || c->gw_slots < 0) return moe_err_set(err, bad, "gw_threshold and gw_slots must not be negative");
    if (c->gw_threshold > 0.0f && c->router != MOE_ROUTER_TOPK)
        return moe_err_set(err, bad, "GW-MoE broadcast needs the softmax top-k router (MOE_ROUTER_TOPK)");
    if (c->router_dim < 0) return moe_err_set(err, bad, "router_dim must not be negative");
    if (c->hyper && (c->hyper_embed <= 0 || c->hyper_hidden <= 0 || c->hyper_cond <= 0 || c->hyper_layer_dim <= 0 ||
                     c->hyper_width <= 0 || c->hyper_adapter <= 0 || c->hyper_layers <= 0 || c->hyper_layer < 0 ||
                     c->hyper_layer >= c->hyper_layers))
        return moe_err_set(err, bad, "HyperMoE needs positive hyper sizes and 0 <= hyper_layer < hyper_layers");
    if ((double)c->n_experts * c->d_ff * c->d > 4e9) return moe_err_set(err, bad, "layer too large (E*d_ff*d = %.3g floats)", (double)c->n_experts * c->d_ff * c->d);
    return MOE_OK;
}

static float moe__softplus(float x) { return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x))); }

/* idx[0..k) = indices of the k largest scores, descending; ties go to the lower index.
   Each pick is the best entry that ranks below the previous pick in (score desc, index asc). */
static void moe__topk_row(const float *score, int E, int k, int *idx) {
    int s, j;
    for (s = 0; s < k; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0) {
                float ps = score[idx[s - 1]];
                if (!(score[j] < ps || (score[j] == ps && j > idx[s - 1]))) continue;
            }
            if (best < 0 || score[j] > score[best]) best = j;
        }
        idx[s] = best;
    }
}

typedef struct moe__scored {
    float score;
    int index;
} moe__scored;

static int moe__scored_cmp(const void *pa, const void *pb) {
    const moe__scored *a = (const moe__scored *)pa, *b = (const moe__scored *)pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

static int moe__float_desc(const void *pa, const void *pb) {
    float a = *(const float *)pa, b = *(const float *)pb;
    return a > b ? -1 : a < b;
}

static int moe__int_cmp(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    return a < b ? -1 : a > b;
}

/* population CV^2 = var / (mean^2 + 1e-10) of x (n), and its gradient dx (n) times coef */
static float moe__cv2(const float *x, int n, float coef, float *dx) {
    double m = 0.0, var = 0.0, den;
    int i;
    for (i = 0; i < n; i++) m += x[i];
    m /= n;
    for (i = 0; i < n; i++) var += (x[i] - m) * (x[i] - m);
    var /= n;
    den = m * m + 1e-10;
    if (dx)
        for (i = 0; i < n; i++)
            dx[i] = (float)(coef * ((2.0 * (x[i] - m) / n) * den - var * 2.0 * m / n) / (den * den));
    return (float)(coef * var / den);
}

static double moe__entropy(const float *p, int n) {
    double h = 0.0;
    int i;
    for (i = 0; i < n; i++)
        if (p[i] > 0.0f) h -= (double)p[i] * log((double)p[i]);
    return h;
}

/* Normalised routing probabilities of token t: the softmax itself, or sigmoid / sum. */
static void moe__norm_probs(const moe_layer *L, int t, float *out) {
    int E = L->cfg.n_experts, j;
    const float *p = L->probs + (size_t)t * E;
    if (L->cfg.router == MOE_ROUTER_SIGMOID) {
        float s = 0.0f;
        for (j = 0; j < E; j++) s += p[j];
        for (j = 0; j < E; j++) out[j] = p[j] / s;
    } else {
        for (j = 0; j < E; j++) out[j] = p[j];
    }
}

