/* ============================================================================================
   >>moe:model  a tiny decoder-only MoE transformer over bytes
   ============================================================================================
   x = wte[token] (+ wpe[pos]);  for each layer:  x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))
   where FFN is a dense SwiGLU (a bank of one expert that every token visits) or an MoE layer;
   logits = RMSNorm(x) . wte^T (tied head). Loss: mean cross-entropy + every MoE layer's aux.
   Layer l is MoE when moe_every > 0, l >= dense_first and (l - dense_first) % moe_every == 0.
   Parameters: one moe_store; tensor names "wte", "wpe", "l3.attn.wqkv", "l3.moe.experts.w_up",
   "lnf.w", ... Per-layer tensors (not stacked on L) because layers differ in kind.
   CQIL (moe_model_set_groups): the layer loop reads a per-model group table and runs each
   group's layers concurrently on one common input, summing their residual updates. */

typedef enum moe_pos_kind {
    MOE_POS_LEARNED = 0, /* wpe (max_seq, d) added to the embeddings */
    MOE_POS_ROPE = 1     /* rotary q/k, no position parameters        */
} moe_pos_kind;

typedef struct moe_model_config {
    int vocab;              /* 256 (bytes)                                            */
    int max_seq;            /* longest sequence (and learned position table)          */
    int d;                  /* model width                                            */
    int n_layers;
    int n_heads;            /* d % n_heads == 0                                       */
    int d_ff;               /* dense SwiGLU FFN width                                 */
    moe_pos_kind pos;
    float rope_theta;       /* 10000                                                  */
    float norm_eps;         /* RMSNorm epsilon, 1e-5                                  */
    int moe_every;          /* 0 = dense model; 1 = every layer MoE; 2 = every other  */
    int dense_first;        /* that many first layers stay dense                      */
    moe_layer_config moe;   /* the MoE FFN; its d is set to the model's d             */
    moe_router_input router_input; /* what the routers read (>>moe:router_input)      */
    int router_dim;         /* p: GRU / MLP width of the router input (RMoE: 128)     */
    float init_std;         /* 0.02; residual outputs get init_std / sqrt(2 L)        */
    int balance_all_layers; /* 1: the MoE layers' balance loss is ONE loss over all their
                               tokens at once, f and P averaged over the layers (RMoE's
                               official code: HF's load_balancing_loss_func over the
                               concatenated router logits); 0: the sum of per-layer losses */
} moe_model_config;

typedef struct moe_block {
    int is_moe;
    int id_ln1, id_qkv, id_wo, id_ln2;    /* tensor ids                              */
    int id_gate, id_up, id_down;          /* dense FFN (-1 for MoE blocks)           */
    moe_layer moe;                        /* MoE FFN (is_moe)                        */
    float *x;        /* (N, d) block input: the residual stream                     */
    float *ln1;      /* (N, d) RMSNorm(x)                                            */
    float *rstd1;    /* (N)                                                          */
    float *qkv;      /* (N, 3d) q, k (rotated under RoPE), v                         */
    float *att;      /* (B, NH, T, T) attention probabilities                        */
    float *atty;     /* (N, d) attention output before the projection               */
    float *x2;       /* (N, d) x + attention                                         */
    float *ln2;      /* (N, d) RMSNorm(x2)                                           */
    float *rstd2;    /* (N)                                                          */
    float *hg, *hu;  /* (N, d_ff) dense FFN caches                                   */
    float *ffn;      /* (N, d) FFN output                                            */
    int id_rproj;    /* (p, d) router-input projector (RMoE, MLP router), else -1      */
    float *rxp;      /* (N, p) projector output                                       */
    float *rh;       /* (N, p) the router's input: GRU state h_l or GELU(rxp)          */
    float *rgi, *rgh;/* (N, 3p) GRU caches                                             */
    const float *rh_prev; /* (N, p) the state this layer's GRU step read               */
} moe_block;

/* The buffers one member of a CQIL group runs on, so that members run concurrently. */
typedef struct moe_group_lane {
    float *att;              /* (N, d) the member's attention output a_q                      */
    float *da;               /* (N, d) backward: dL/da_q                                       */
    float *g;                /* (N, d) backward: dL/dr_q through the member's FFN               */
    float *d_ln, *d_atty;    /* (N, d)                                                          */
    float *d_qkv;            /* (N, 3d)                                                         */
    float *scratch1, *scratch2; /* (N, d_ff) dense FFN backward                                 */
    moe_work work;           /* the member's kernel scratch, planned for one thread            */
    moe_err err;             /* a failing member's sentence                                     */
} moe_group_lane;

typedef struct moe_model {
    moe_model_config cfg;
    moe_store S;            /* every parameter, gradient and Adam moment              */
    moe_block *blocks;      /* (n_layers)                                             */
    int id_wte, id_wpe, id_lnf;
    int id_gru_wih, id_gru_whh, id_gru_bih, id_gru_bhh; /* RMoE's shared GRU, else -1      */
    int max_B, max_T;       /* activation buffers are sized for these                 */
    int B, T;               /* the last forward's batch shape, 0 = none              */
    int has_targets;        /* the last forward had targets: backward is allowed      */
    int *inputs, *targets;  /* (N) copies of the last forward's tokens; a forward
                               without targets leaves targets alone (rwd_lm_features
                               builds its input window there)                         */
    float *x_final;         /* (N, d) residual stream after the last block            */
    float *lnf, *rstd_f;    /* (N, d), (N)                                            */
    float *logits;          /* (N, V)                                                 */
    float *losses;          /* (N) per-token cross-entropy                            */
    float *rope;            /* (max_T, hd/2, 2) cos, sin                              */
    float *d_res, *d_res2, *d_ln, *d_qkv, *d_atty, *d_logits, *scratch1, *scratch2; /* backward */
    float *r_zero, *r_drin, *r_carry, *r_dxp, *r_scratch; /* router-input buffers (N p), (N 6p) */
    float *routing_noise;   /* (N, E) noisy top-k routers: this forward's N(0,1) draws     */
    int gw_broadcast;       /* GW-MoE broadcast on in every MoE layer (set_broadcast)  */
    float *gen_probs;       /* (2 V) generation: probabilities and their sorted copy    */
    moe_work work;          /* scratch of every kernel call of the model, its MoE layers'
                               included (calls never overlap), sized at init            */
    double loss;            /* mean cross-entropy of the last forward (nats)          */
    double aux_loss;        /* sum of the MoE layers' aux losses (balance_all_layers:
                               their balance terms replaced by the one over all layers) */
    float *balance_f_all;   /* (E) balance_all_layers: mean over layers of f / L_moe, the
                               f every layer's backward differentiates with          */
    /* Interventions for evaluation: moe_model_forward calls ffn_hook(m, l, ffn_hook_user)
       once block l's FFN output is in blocks[l].ffn and before it joins the residual stream
       (swap a token's expert, ablate a layer). Backward does not see what it changes.
       NULL (the default after moe_model_init) = none. */
    void (*ffn_hook)(struct moe_model *m, int layer, void *user);
    void *ffn_hook_user;
    /* CQIL groups (moe_model_set_groups): group_size[l] = P > 0 when layers l..l+P-1 run as one
       group on a common input, 0 inside a group and for sequential layers; NULL = none */
    int *group_size;        /* (n_layers)                                                  */
    int group_bypass;       /* d: each member's MLP also reads up to d earlier attention outputs */
    int group_double_count; /* the official training code's bypass (see moe_model_set_groups) */
    int n_lanes;            /* the largest group: one lane of buffers per member            */
    moe_group_lane *lanes;   /* (n_lanes)                                             */
    /* (n_layers) the multiplier of each block's two residual updates, x += s_l Attn(..) and
       x += s_l FFN(..), forward and backward; 1 after init. Masked growth (G_random, arXiv
       2405.15319 §2) ramps a new layer's s_l from 0 to 1 (moe_grow_set_mask). Decoding honours it;
       a CQIL group's members must keep 1 (the forward refuses otherwise). */
    float *layer_scale;
    moe_err err;
} moe_model;


typedef struct moe_sampler {
    float temperature; /* 0 = greedy                         */
    int top_k;         /* 0 = off                            */
    float top_p;       /* 1 = off (nucleus sampling)         */
} moe_sampler;

MOEDEF moe_model_config moe_model_config_default(void);
MOEDEF moe_status moe_model_config_validate(const moe_model_config *c, moe_err *err);
/* Declares every tensor, allocates parameters, gradients, Adam moments, the activations for
   batches of up to max_B sequences of up to max_T tokens and the kernels' scratch for the
   thread count of this moment (moe_num_threads; later calls use at most that many): forward,
   backward, the optimizer step and generation allocate nothing. Weights are zero until
   moe_model_init_weights or a checkpoint load. On failure m holds only the error (free is safe). */
MOEDEF moe_status moe_model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T);
/* The parameter table alone: declares every tensor c implies into m->S (names, shapes,
   m->S.numel, moe_store_fingerprint) and allocates no buffer, so a file loader can compare a
   config with a file before reserving memory. Stops with MOE_ERR_INVALID_ARG once more than
   max_numel parameters are declared (0 = no limit). Only moe_model_free may follow. */
MOEDEF moe_status moe_model_declare(moe_model *m, const moe_model_config *c, size_t max_numel);
MOEDEF void moe_model_free(moe_model *m);
/* The parameter count of a model of this config (a checkpoint's numel), through
   moe_model_declare: a loader compares it with the file before it builds the model. */
MOEDEF moe_status moe_model_param_count(const moe_model_config *c, size_t *numel, moe_err *err);
/* GPT-2 style: N(0, init_std), residual projections N(0, init_std/sqrt(2L)), norms 1,
   routers N(0, moe.router_init_std), noise projections and biases 0. */
MOEDEF void moe_model_init_weights(moe_model *m, uint64_t seed);
/* inputs, targets: (B, T) bytes in [0, vocab). targets may be NULL (logits only). noise: NULL,
   or for noisy top-k routers an RNG that draws the routing noise (training). Sets m->loss and
   m->aux_loss. */
MOEDEF moe_status moe_model_forward(moe_model *m, const int *inputs, const int *targets, int B, int T,
                                    moe_rng *noise);
/* Gradients of (loss + aux_loss) * scale, ACCUMULATED into m->S.grads (scale = 1/n for n
   micro-batches of gradient accumulation). */
MOEDEF moe_status moe_model_backward(moe_model *m, float scale);
/* GW-MoE: switch the broadcast of uncertain tokens on (fine-tuning) or off (evaluation and
   inference) in every MoE layer; the layers' gw_threshold decides which tokens qualify. */
MOEDEF void moe_model_set_broadcast(moe_model *m, int on);
/* DeepSeek-V3's auxiliary-loss-free balancing: moe_layer_update_selection_bias on every MoE
   layer (their config needs selection_bias), from the last forward's loads. */
MOEDEF moe_status moe_model_update_selection_bias(moe_model *m, float gamma);
/* total parameters, and those one token uses (routers + its k experts + everything dense) */
MOEDEF size_t moe_model_params_total(const moe_model *m);
MOEDEF size_t moe_model_params_active(const moe_model *m);
/* Appends n_new sampled bytes to prompt (n_prompt >= 1); out must hold n_prompt + n_new.
   Uses the last max_T tokens as context. Refused for expert-choice routers (not causal). */
MOEDEF moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                     const moe_sampler *sampler, moe_rng *rng);
/* Gradients of a loss of the last forward's logits whose gradient the caller gives, plus
   aux_loss * scale, ACCUMULATED into m->S.grads; d_logits (B T, V) already holds any scale (a
   distillation loss: softmax(student) - softmax(teacher), divided by the tokens). The forward
   may be without targets. */
MOEDEF moe_status moe_model_backward_logits(moe_model *m, const float *d_logits, float scale);
/* CQIL (Zou et al., arXiv 2404.06709, §3): n_groups groups of consecutive layers
   [first[i], first[i] + size[i]), in increasing order and disjoint, each run on ONE common
   input h with their residual updates summed; the other layers stay sequential. Member q of a
   group (q = 0..P-1, layer j_q) computes a_q = Attn_q(RMSNorm(h)) and, with bypass distance d,
   its FFN reads r_q = h + a_q + beta_q, beta_q = sum of a_u for max(0, q - d) <= u < q:
     clean (double_count 0, the default):  h_out = h + sum_q (a_q + FFN_q(r_q))
     official training code (double_count 1): h_out = h + sum_q (a_q + beta_q + FFN_q(r_q)),
       the bypass added in place to the saved residual, so an earlier member's attention
       output is counted again in every later member it reaches.
   d = 0: every member reads h alone (the multi-GPU inference code; it never uses its bypass).
   A group of size 1 computes what the sequential layer does. The members run concurrently
   (OpenMP over members, each on one thread and its own lane of buffers, allocated here) and
   are summed in member order, so results do not depend on the thread count. Forward and
   backward both follow the groups (fine-tuning in CQIL form). n_groups = 0 restores the
   sequential model. Refused: ranges outside the model, overlapping or unordered groups, a
   negative d, MoE members whose routers read a GRU state or an MLP (RMoE carries a state
   from layer to layer), HyperMoE members (one hypernetwork shared by the layers, whose
   gradients concurrent members would race on), and (at forward) routing noise for grouped
   MoE layers. The groups are a run-time option: model files do not record them. */
MOEDEF moe_status moe_model_set_groups(moe_model *m, const int *first, const int *size, int n_groups, int bypass,
                                       int double_count);
/* Sequential steps of a forward with the current groups: n_layers minus (P - 1) for every
   group (the latency proxy when the members of a group run in parallel). */
MOEDEF int moe_model_depth(const moe_model *m);

/* @implementation */
/* ============================================================================================
   >>moe:model
   ============================================================================================ */

MOE__IMPL moe_model_config moe_model_config_default(void) {
    moe_model_config c;
    memset(&c, 0, sizeof c);
    c.vocab = 256;
    c.max_seq = 256;
    c.d = 128;
    c.n_layers = 4;
    c.n_heads = 4;
    c.d_ff = 256;
    c.pos = MOE_POS_LEARNED;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    c.moe_every = 1;
    c.dense_first = 0;
    c.moe = moe_layer_config_default();
    c.moe.d_ff = 128;
    c.init_std = 0.02f;
    return c;
}

static int moe__block_is_moe(const moe_model_config *c, int l) {
    return c->moe_every > 0 && l >= c->dense_first && (l - c->dense_first) % c->moe_every == 0;
}

#define MOE__MAX_WIDTH (1 << 24)

MOE__IMPL moe_status moe_model_config_validate(const moe_model_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    int any;
    if (!c) return moe_err_set(err, bad, "model config is NULL");
    if (c->vocab <= 0 || c->max_seq <= 0 || c->d <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->d_ff <= 0)
        return moe_err_set(err, bad, "vocab, max_seq, d, n_layers, n_heads and d_ff must be positive");
    if (c->d % c->n_heads != 0) return moe_err_set(err, bad, "d (%d) must be a multiple of n_heads (%d)", c->d, c->n_heads);
    if (c->pos != MOE_POS_LEARNED && c->pos != MOE_POS_ROPE) return moe_err_set(err, bad, "unknown position kind %d", (int)c->pos);
    if (c->pos == MOE_POS_ROPE && (c->d / c->n_heads) % 2 != 0) return moe_err_set(err, bad, "rotary positions need an even head width, got %d", c->d / c->n_heads);
    if (c->pos == MOE_POS_ROPE && !(c->rope_theta > 1.0f)) return moe_err_set(err, bad, "rope_theta must be > 1");
    if (!(c->norm_eps > 0.0f) || !(c->init_std >= 0.0f)) return moe_err_set(err, bad, "norm_eps must be > 0 and init_std >= 0");
    if (c->moe_every < 0 || c->dense_first < 0) return moe_err_set(err, bad, "moe_every and dense_first must not be negative");
    if ((int)c->router_input < 0 || (int)c->router_input > MOE_RIN_MLP) return moe_err_set(err, bad, "unknown router input %d", (int)c->router_input);
    if (c->router_input != MOE_RIN_DIRECT && c->router_dim <= 0) return moe_err_set(err, bad, "a GRU or MLP router needs router_dim > 0");
    /* the declarations multiply widths by small constants in int (3 d for QKV, 3 router_dim for
       the GRU) before the store can weigh the tensor, so every width is bounded first */
    if (c->vocab > MOE__MAX_WIDTH || c->d > MOE__MAX_WIDTH || c->router_dim > MOE__MAX_WIDTH)
        return moe_err_set(err, bad, "vocab (%d), d (%d) and router_dim (%d) must be at most %d", c->vocab, c->d, c->router_dim, MOE__MAX_WIDTH);
    any = c->moe_every > 0 && c->dense_first < c->n_layers; /* layer dense_first is MoE */
    if (any) {
        moe_layer_config mc = c->moe;
        mc.d = c->d;
        mc.router_dim = 0;
        if (moe_layer_config_validate(&mc, err) != MOE_OK) return err ? err->status : bad;
    }
    if ((double)c->max_seq * c->max_seq * c->n_heads > 1e9) return moe_err_set(err, bad, "max_seq %d is too long for the stored attention matrices", c->max_seq);
    return MOE_OK;
}

static int moe__model_add(moe_model *m, const char *name, int flags, int n0, int n1, int n2) {
    int id;
    if (m->err.status != MOE_OK) return -1;
    id = moe_store_add(&m->S, name, flags, n0, n1, n2, 0);
    if (id < 0) moe_err_set(&m->err, m->S.err.status, "%s", m->S.err.msg);
    return id;
}

/* d_ff where some block is dense, else 0: an all-MoE model stores a d_ff it never uses, which
   must size no buffer (a model file's d_ff is then bounded by nothing it holds) */
static size_t moe__dense_width(const moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (!m->blocks[l].is_moe) return (size_t)m->cfg.d_ff;
    return 0;
}

/* max_numel > 0 (moe_model_declare): declare the tensors only, within that budget */
static moe_status moe__model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T, size_t max_numel) {
    int l, d, N, L, NH, V, F;
    char name[MOE_NAME_LEN];
    size_t Nd;
    int ok = 1, declare_only = max_numel > 0;
    moe_block one; /* declare_only: every layer's ids go here, no (n_layers) array */
    memset(m, 0, sizeof *m);
    if (moe_model_config_validate(c, &m->err) != MOE_OK) return m->err.status;
    if (declare_only) max_B = max_T = 1;
    if (max_B <= 0 || max_T <= 0 || max_T > c->max_seq)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "batch shape %d x %d: need B >= 1 and 1 <= T <= max_seq (%d)", max_B, max_T, c->max_seq);
    if ((double)max_B * max_T > (1 << 24)) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "batch of %d x %d tokens is too large", max_B, max_T);
    m->cfg = *c;
    m->cfg.moe.d = c->d;
    m->cfg.moe.router_dim = c->router_input != MOE_RIN_DIRECT ? c->router_dim : 0;
    m->id_gru_wih = m->id_gru_whh = m->id_gru_bih = m->id_gru_bhh = -1;
    d = c->d; L = c->n_layers; NH = c->n_heads; V = c->vocab; F = c->d_ff;
    m->max_B = max_B; m->max_T = max_T;
    N = max_B * max_T;
    Nd = (size_t)N * d;
    moe_store_init(&m->S);
    m->blocks = declare_only ? NULL : (moe_block *)moe__calloc((size_t)L, sizeof(moe_block));
    if (!m->blocks && !declare_only) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory");
    m->id_wte = moe__model_add(m, "wte", MOE_TENSOR_DECAY, V, d, 0);
    m->id_wpe = c->pos == MOE_POS_LEARNED ? moe__model_add(m, "wpe", MOE_TENSOR_DECAY, c->max_seq, d, 0) : -1;
    moe__router_input_declare(m);
    for (l = 0; l < L; l++) {
        moe_block *b = declare_only ? &one : &m->blocks[l];
        if (declare_only && m->err.status == MOE_OK && m->S.numel > max_numel)
            moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "the config implies more than %zu parameters (%zu by layer %d of %d)", max_numel, m->S.numel, l, L);
        if (m->err.status != MOE_OK) break;
        if (declare_only) memset(b, 0, sizeof *b);
        b->is_moe = moe__block_is_moe(c, l);
        sprintf(name, "l%d.ln1.w", l);
        b->id_ln1 = moe__model_add(m, name, 0, d, 0, 0);
        sprintf(name, "l%d.attn.wqkv", l);
        b->id_qkv = moe__model_add(m, name, MOE_TENSOR_DECAY, 3 * d, d, 0);
        sprintf(name, "l%d.attn.wo", l);
        b->id_wo = moe__model_add(m, name, MOE_TENSOR_DECAY, d, d, 0);
        sprintf(name, "l%d.ln2.w", l);
        b->id_ln2 = moe__model_add(m, name, 0, d, 0, 0);
        b->id_gate = b->id_up = b->id_down = b->id_rproj = -1;
        moe__router_input_declare_block(m, b, l);
        if (b->is_moe) {
            if (m->err.status == MOE_OK) {
                sprintf(name, "l%d.moe.", l);
                moe_layer_config lc = m->cfg.moe;
                lc.hyper_layers = L; /* the shared layer embedding has a row per layer */
                lc.hyper_layer = l;
                if (moe__layer_init(&b->moe, &lc, &m->S, name, N, declare_only) != MOE_OK)
                    moe_err_set(&m->err, b->moe.err.status, "layer %d: %s", l, b->moe.err.msg);
            }
        } else if (m->err.status == MOE_OK) { /* a dense FFN is a bank of one SwiGLU expert */
            sprintf(name, "l%d.ffn.w_gate", l);
            b->id_gate = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, F, d);
            sprintf(name, "l%d.ffn.w_up", l);
            b->id_up = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, F, d);
            sprintf(name, "l%d.ffn.w_down", l);
            b->id_down = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, d, F);
        }
    }
    m->id_lnf = moe__model_add(m, "lnf.w", 0, d, 0, 0);
    if (declare_only && m->err.status == MOE_OK && m->S.numel > max_numel)
        moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "the config implies %zu parameters, more than %zu", m->S.numel, max_numel);
    if (m->err.status != MOE_OK) { moe_model_free(m); return m->err.status; }
    if (declare_only) return MOE_OK;
    if (moe_store_alloc(&m->S, 1) != MOE_OK) {
        moe_err_set(&m->err, m->S.err.status, "%s", m->S.err.msg);
        moe_model_free(m);
        return m->err.status;
    }
    for (l = 0; l < L; l++) {
        moe_block *b = &m->blocks[l];
        b->x = (float *)moe__calloc(Nd, sizeof(float));
        b->ln1 = (float *)moe__calloc(Nd, sizeof(float));
        b->rstd1 = (float *)moe__calloc((size_t)N, sizeof(float));
        b->qkv = (float *)moe__calloc(Nd * 3, sizeof(float));
        b->att = (float *)moe__calloc((size_t)max_B * NH * max_T * max_T, sizeof(float));
        b->atty = (float *)moe__calloc(Nd, sizeof(float));
        b->x2 = (float *)moe__calloc(Nd, sizeof(float));
        b->ln2 = (float *)moe__calloc(Nd, sizeof(float));
        b->rstd2 = (float *)moe__calloc((size_t)N, sizeof(float));
        b->ffn = (float *)moe__calloc(Nd, sizeof(float));
        if (!b->is_moe) {
            b->hg = (float *)moe__calloc((size_t)N * F, sizeof(float));
            b->hu = (float *)moe__calloc((size_t)N * F, sizeof(float));
        }
        ok = ok && moe__router_input_alloc_block(m, b, N);
        ok = ok && b->x && b->ln1 && b->rstd1 && b->qkv && b->att && b->atty && b->x2 && b->ln2 &&
             b->rstd2 && b->ffn && (b->is_moe || (b->hg && b->hu));
    }
    m->inputs = (int *)moe__calloc((size_t)N, sizeof(int));
    m->targets = (int *)moe__calloc((size_t)N, sizeof(int));
    m->x_final = (float *)moe__calloc(Nd, sizeof(float));
    m->lnf = (float *)moe__calloc(Nd, sizeof(float));
    m->rstd_f = (float *)moe__calloc((size_t)N, sizeof(float));
    m->logits = (float *)moe__calloc((size_t)N * V, sizeof(float));
    m->losses = (float *)moe__calloc((size_t)N, sizeof(float));
    m->rope = (float *)moe__calloc((size_t)max_T * (d / NH), sizeof(float));
    m->d_res = (float *)moe__calloc(Nd, sizeof(float));
    m->d_res2 = (float *)moe__calloc(Nd, sizeof(float));
    m->d_ln = (float *)moe__calloc(Nd, sizeof(float));
    m->d_qkv = (float *)moe__calloc(Nd * 3, sizeof(float));
    m->d_atty = (float *)moe__calloc(Nd, sizeof(float));
    m->d_logits = (float *)moe__calloc((size_t)N * V, sizeof(float));
    m->scratch1 = (float *)moe__calloc((size_t)N * moe__dense_width(m), sizeof(float));
    m->scratch2 = (float *)moe__calloc((size_t)N * moe__dense_width(m), sizeof(float));
    ok = ok && moe__router_input_alloc(m, N);
    if (ok && c->moe_every > 0 && moe__router_draws_noise(&c->moe)) ok = MOE__ALLOC(m->routing_noise, (size_t)N * c->moe.n_experts, float);
    if (ok && c->balance_all_layers) ok = MOE__ALLOC(m->balance_f_all, c->moe.n_experts, float);
    ok = ok && m->inputs && m->targets && m->x_final && m->lnf && m->rstd_f && m->logits && m->losses &&
         m->rope && m->d_res && m->d_res2 && m->d_ln && m->d_qkv && m->d_atty && m->d_logits && m->scratch1 && m->scratch2;
    { /* ONE work buffer: the largest scratch of the model's kernel calls and its layers' */
        int nt = moe_num_threads(), dense = 0, P = c->router_dim;
        size_t need = moe_attention_work_floats(max_T, d, NH, nt), w, k;
        size_t mm[4];
        mm[0] = moe_matmul_work_floats(N, d, 3 * d, nt); /* qkv */
        mm[1] = moe_matmul_work_floats(N, d, d, nt);     /* attention output */
        mm[2] = moe_matmul_work_floats(N, d, V, nt);     /* tied head */
        mm[3] = c->router_input != MOE_RIN_DIRECT ? moe_matmul_work_floats(N, d, P, nt) : 0; /* router-input projector */
        for (k = 0; k < 4; k++) need = mm[k] > need ? mm[k] : need;
        for (l = 0; l < L; l++) dense |= !m->blocks[l].is_moe;
        if (dense && (w = moe_experts_work_floats(N, 1, d, F, MOE_EXPERT_SWIGLU, nt)) > need) need = w;
        if (m->id_gru_wih >= 0 && (w = moe_gru_work_floats(N, P, nt)) > need) need = w;
        for (l = 0; l < L; l++)
            if (m->blocks[l].is_moe && m->blocks[l].moe.work.floats > need) need = m->blocks[l].moe.work.floats;
        ok = ok && moe_work_alloc(&m->work, need, nt) == MOE_OK;
        for (l = 0; ok && l < L; l++) /* the layers give theirs back and run on the model's */
            if (m->blocks[l].is_moe) {
                moe_work_free(&m->blocks[l].moe.work);
                m->blocks[l].moe.work = m->work;
            }
        ok = ok && MOE__ALLOC(m->gen_probs, (size_t)V * 2, float);
        ok = ok && MOE__ALLOC(m->layer_scale, L, float);
        for (l = 0; ok && l < L; l++) m->layer_scale[l] = 1.0f;
    }
    if (!ok) {
        moe_model_free(m);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the activations of %d x %d tokens", max_B, max_T);
    }
    if (c->pos == MOE_POS_ROPE) moe_rope_table(m->rope, max_T, d / NH, c->rope_theta);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T) {
    return moe__model_init(m, c, max_B, max_T, 0);
}

MOE__IMPL moe_status moe_model_declare(moe_model *m, const moe_model_config *c, size_t max_numel) {
    return moe__model_init(m, c, 1, 1, max_numel > 0 ? max_numel : (size_t)-1);
}

MOE__IMPL moe_status moe_model_param_count(const moe_model_config *c, size_t *numel, moe_err *err) {
    moe_model m;
    moe_status st = moe_model_declare(&m, c, 0);
    if (st == MOE_OK) *numel = m.S.numel;
    else if (err) *err = m.err;
    moe_model_free(&m);
    return st;
}

static void moe__groups_free(moe_model *m) {
    int q;
    for (q = 0; q < m->n_lanes; q++) {
        moe_group_lane *ln = &m->lanes[q];
        MOE_FREE(ln->att); MOE_FREE(ln->da); MOE_FREE(ln->g); MOE_FREE(ln->d_ln); MOE_FREE(ln->d_atty);
        MOE_FREE(ln->d_qkv); MOE_FREE(ln->scratch1); MOE_FREE(ln->scratch2);
        moe_work_free(&ln->work);
    }
    MOE_FREE(m->lanes);
    MOE_FREE(m->group_size);
    m->lanes = NULL;
    m->group_size = NULL;
    m->n_lanes = 0;
}

MOE__IMPL void moe_model_free(moe_model *m) {
    int l;
    if (m->blocks) {
        for (l = 0; l < m->cfg.n_layers; l++) {
            moe_block *b = &m->blocks[l];
            if (b->is_moe) {
                if (b->moe.work.buf == m->work.buf) memset(&b->moe.work, 0, sizeof b->moe.work); /* the model's */
                moe_layer_free(&b->moe);
            }
            MOE_FREE(b->x); MOE_FREE(b->ln1); MOE_FREE(b->rstd1); MOE_FREE(b->qkv); MOE_FREE(b->att);
            MOE_FREE(b->atty); MOE_FREE(b->x2); MOE_FREE(b->ln2); MOE_FREE(b->rstd2); MOE_FREE(b->ffn);
            MOE_FREE(b->hg); MOE_FREE(b->hu);
            moe__router_input_free_block(b);
        }
        MOE_FREE(m->blocks);
    }
    MOE_FREE(m->inputs); MOE_FREE(m->targets); MOE_FREE(m->x_final); MOE_FREE(m->lnf); MOE_FREE(m->rstd_f);
    MOE_FREE(m->logits); MOE_FREE(m->losses); MOE_FREE(m->rope); MOE_FREE(m->d_res); MOE_FREE(m->d_res2);
    MOE_FREE(m->d_ln); MOE_FREE(m->d_qkv); MOE_FREE(m->d_atty); MOE_FREE(m->d_logits);
    MOE_FREE(m->scratch1); MOE_FREE(m->scratch2);
    moe__router_input_free(m);
    moe__groups_free(m);
    MOE_FREE(m->routing_noise);
    MOE_FREE(m->balance_f_all);
    MOE_FREE(m->gen_probs);
    MOE_FREE(m->layer_scale);
    moe_work_free(&m->work);
    moe_store_free(&m->S);
    {
        moe_err keep = m->err;
        memset(m, 0, sizeof *m);
        m->err = keep;
    }
}

MOE__IMPL void moe_model_init_weights(moe_model *m, uint64_t seed) {
    moe_rng r;
    int id;
    size_t i;
    float std = m->cfg.init_std, res_std = std / sqrtf(2.0f * (float)m->cfg.n_layers);
    moe_rng_seed(&r, seed);
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        float *p = m->S.params + t->offset, sd;
        if (moe__hyper_init_tensor(t, p, &r)) continue;
        if (moe__ends_with(t->name, "ln1.w") || moe__ends_with(t->name, "ln2.w") || strcmp(t->name, "lnf.w") == 0) {
            for (i = 0; i < t->numel; i++) p[i] = 1.0f;
            continue;
        }
        if (moe__router_input_init_std(m, t->name, &sd)) { /* the GRU, the projectors */
        } else if (moe__ends_with(t->name, "router.w")) sd = m->cfg.moe.router_init_std;
        else if (t->ndim == 1 || moe__ends_with(t->name, "router.w_noise") || moe__ends_with(t->name, ".b") ||
                 moe__ends_with(t->name, "b_up") || moe__ends_with(t->name, "b_down")) sd = 0.0f;
        else if (moe__ends_with(t->name, "attn.wo") || moe__ends_with(t->name, "w_down")) sd = res_std;
        else sd = std;
        for (i = 0; i < t->numel; i++) p[i] = sd * moe_rng_normal(&r);
    }
}

static moe_expert_weights moe__dense_ffn(const moe_model *m, const moe_block *b, int grads) {
    moe_expert_weights w;
    float *(*get)(const moe_store *, int) = grads ? moe_store_grad : moe_store_param;
    w.gate = get(&m->S, b->id_gate);
    w.up = get(&m->S, b->id_up);
    w.down = get(&m->S, b->id_down);
    w.b_up = w.b_down = NULL;
    return w;
}

/* balance_all_layers: one balance loss over all MoE layers' tokens, f_all = mean_l f_l and
   P_all = mean_l P_l (every layer sees the same T tokens); it replaces the layers' own
   balance terms in aux_loss, and each layer's backward differentiates it through its P_l with
   f_all / L_moe */
static void moe__model_balance_all_layers(moe_model *m) {
    const moe_layer_config *c = &m->cfg.moe;
    int E = c->n_experts, l, e, n = 0;
    double acc = 0.0, own = 0.0;
    float *f = m->balance_f_all;
    for (e = 0; e < E; e++) f[e] = 0.0f;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_layer *L = &m->blocks[l].moe;
        if (!m->blocks[l].is_moe) continue;
        for (e = 0; e < E; e++) f[e] += L->aux.balance_f[e];
        own += L->stats.aux_balance;
        n++;
    }
    if (n == 0 || c->balance == MOE_BALANCE_NONE) return;
    for (e = 0; e < E; e++) {
        double P = 0.0;
        for (l = 0; l < m->cfg.n_layers; l++)
            if (m->blocks[l].is_moe) P += m->blocks[l].moe.aux.mean_prob[e];
        f[e] /= (float)n;
        acc += (double)f[e] * (P / n);
        f[e] /= (float)n; /* the gradient through each P_l carries 1 / L_moe */
    }
    m->aux_loss += c->balance_coef * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc - own;
}

/* A kernel call that fails (only a workspace that does not fit its call can) ends the pass
   with the kernel's status and what failed (layer l, or the model's own parts for l < 0). */
static moe_status moe__model_kernel_err(moe_err *err, moe_status st, int l, const char *what) {
    if (l < 0) return moe_err_set(err, st, "%s: %s", what, moe_status_string(st));
    return moe_err_set(err, st, "layer %d, %s: %s", l, what, moe_status_string(st));
}
#define MOE__ERR_TRY(err, call, l, what)                                                 \
    do {                                                                                 \
        moe_status st_ = (call);                                                         \
        if (st_ != MOE_OK) return moe__model_kernel_err(err, st_, l, what);              \
    } while (0)
#define MOE__MODEL_TRY(call, l, what) MOE__ERR_TRY(&m->err, call, l, what)

/* Block l's halves, forward and backward, on the given workspace, errors into err: the layer
   loop runs them one layer at a time on the model's buffers, a CQIL group runs its members'
   halves concurrently, each on its lane (>>moe:model, moe_model_set_groups). */

/* x2 = x + Attn(RMSNorm(x)); the projection lands in att (a CQIL member's a_q, which its
   bypass reads) or, att NULL, in x2 itself */
static moe_status moe__block_attention_forward(moe_model *m, int l, int B, int T, float *att, moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    int d = c->d, N = B * T, i;
    moe_rmsnorm_forward(b->ln1, b->rstd1, b->x, moe_store_param(&m->S, b->id_ln1), N, d, c->norm_eps);
    MOE__ERR_TRY(err, moe_matmul_forward(b->qkv, b->ln1, moe_store_param(&m->S, b->id_qkv), NULL, N, d, 3 * d, work), l, "qkv");
    if (c->pos == MOE_POS_ROPE) moe_rope_apply(b->qkv, m->rope, B, T, d, c->n_heads, 0);
    MOE__ERR_TRY(err, moe_attention_forward(b->atty, b->att, b->qkv, B, T, d, c->n_heads, work), l, "attention");
    MOE__ERR_TRY(err, moe_matmul_forward(att ? att : b->x2, b->atty, moe_store_param(&m->S, b->id_wo), NULL, N, d, d, work), l,
                 "attention output");
    if (att)
        for (i = 0; i < N * d; i++) b->x2[i] = att[i] + b->x[i];
    else if (m->layer_scale[l] != 1.0f) { /* masked growth: x2 = x + s_l Attn(..) */
        float s = m->layer_scale[l];
        for (i = 0; i < N * d; i++) b->x2[i] = s * b->x2[i] + b->x[i];
    } else
        for (i = 0; i < N * d; i++) b->x2[i] += b->x[i];
    return MOE_OK;
}

/* an MoE block's per-call args in a forward over sequences of T tokens (noise: its draws or NULL) */
static moe_layer_args moe__block_args(const moe_model *m, int T, const float *noise) {
    moe_layer_args a = moe_layer_args_default();
    a.seq_len = T;
    a.gw_active = m->gw_broadcast;
    a.noise = noise;
    return a;
}

/* ffn = FFN(RMSNorm(x2)) on N tokens; a: the MoE layer's per-call args (seq_len, gw_active,
   noise, dropless: the caller's; router_input is set here); rh_prev: RMoE's state chain (NULL in
   a CQIL group, where such routers are refused). The full forward, a CQIL group and the cached
   decoding (>>moe:generate) share it, so all run the same arithmetic per token. */
static moe_status moe__block_ffn_forward(moe_model *m, int l, int N, moe_layer_args a, const float **rh_prev, moe_work *work,
                                         moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    int d = c->d;
    moe_rmsnorm_forward(b->ln2, b->rstd2, b->x2, moe_store_param(&m->S, b->id_ln2), N, d, c->norm_eps);
    if (b->is_moe) {
        moe_work keep = b->moe.work; /* the model's, or a lane's for this call */
        moe_status st;
        if (b->id_rproj >= 0) { /* the router's input: GRU state or MLP hidden layer */
            st = moe__router_input_forward(m, b, rh_prev, N, l);
            if (st != MOE_OK) return st;
            a.router_input = b->rh;
        }
        b->moe.work = *work;
        st = moe_layer_forward(&b->moe, &m->S, b->ffn, b->ln2, N, &a);
        b->moe.work = keep;
        if (st != MOE_OK) return moe_err_set(err, st, "layer %d: %s", l, b->moe.err.msg);
    } else {
        moe_expert_weights w = moe__dense_ffn(m, b, 0);
        int offset[2];
        offset[0] = 0;
        offset[1] = N;
        MOE__ERR_TRY(err, moe_experts_forward(b->ffn, b->hg, b->hu, b->ln2, &w, offset, 1, d, c->d_ff, MOE_EXPERT_SWIGLU, MOE_ACT_SILU, work),
                     l, "dense FFN");
    }
    return MOE_OK;
}

/* the FFN half backward from dout = dL/d(ffn): acc += RMSNorm2'(d ffn input) (dL/dx2 through
   the FFN); d_ln, scratch1, scratch2 are the call's scratch */
static moe_status moe__block_ffn_backward(moe_model *m, int l, const float *dout, float *acc, float scale, float *d_ln,
                                          float *scratch1, float *scratch2, moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    moe_store *S = &m->S;
    int N = m->B * m->T, d = c->d;
    memset(d_ln, 0, sizeof(float) * (size_t)N * d);
    if (b->is_moe) {
        moe_layer_args a = moe_layer_args_default();
        moe_work keep = b->moe.work;
        moe_status st;
        a.aux_grad_scale = scale; /* dout already carries the scale from d_logits */
        a.balance_f = m->balance_f_all; /* NULL: each layer's own balance loss */
        if (b->id_rproj >= 0) {
            a.router_input = b->rh;
            a.d_router_input = m->r_drin;
            memset(m->r_drin, 0, sizeof(float) * (size_t)N * c->router_dim);
        }
        b->moe.work = *work;
        st = moe_layer_backward(&b->moe, S, d_ln, dout, b->ln2, &a);
        b->moe.work = keep;
        if (st != MOE_OK) return moe_err_set(err, st, "layer %d: %s", l, b->moe.err.msg);
        if (b->id_rproj >= 0 && (st = moe__router_input_backward(m, b, l)) != MOE_OK) return st;
    } else {
        moe_expert_weights w = moe__dense_ffn(m, b, 0), gw = moe__dense_ffn(m, b, 1);
        int offset[2];
        offset[0] = 0;
        offset[1] = N;
        MOE__ERR_TRY(err, moe_experts_backward(d_ln, &gw, dout, b->ln2, b->hg, b->hu, &w, offset, 1, d, c->d_ff, MOE_EXPERT_SWIGLU,
                                               MOE_ACT_SILU, scratch1, scratch2, work),
                     l, "dense FFN backward");
    }
    moe_rmsnorm_backward(acc, moe_store_grad(S, b->id_ln2), d_ln, b->x2, moe_store_param(S, b->id_ln2), b->rstd2, N, d);
    return MOE_OK;
}

/* the attention half backward from da = dL/d(attention output): d_ln = dL/d RMSNorm1(x) (the
   caller adds RMSNorm1' of it to dL/dx); d_atty, d_qkv scratch */
static moe_status moe__block_attention_backward(moe_model *m, int l, const float *da, float *d_ln, float *d_atty, float *d_qkv,
                                                moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    moe_store *S = &m->S;
    int B = m->B, T = m->T, N = B * T, d = c->d;
    memset(d_atty, 0, sizeof(float) * (size_t)N * d);
    MOE__ERR_TRY(err, moe_matmul_backward(d_atty, moe_store_grad(S, b->id_wo), NULL, da, b->atty, moe_store_param(S, b->id_wo), N, d, d, work),
                 l, "attention output backward");
    MOE__ERR_TRY(err, moe_attention_backward(d_qkv, d_atty, b->qkv, b->att, B, T, d, c->n_heads, work), l, "attention backward");
    if (c->pos == MOE_POS_ROPE) moe_rope_apply(d_qkv, m->rope, B, T, d, c->n_heads, 1);
    memset(d_ln, 0, sizeof(float) * (size_t)N * d);
    MOE__ERR_TRY(err, moe_matmul_backward(d_ln, moe_store_grad(S, b->id_qkv), NULL, d_qkv, b->ln1, moe_store_param(S, b->id_qkv), N, d, 3 * d, work),
                 l, "qkv backward");
    return MOE_OK;
}

/* the first failing member's sentence becomes the model's */
static moe_status moe__group_status(moe_model *m, int P) {
    int q;
    for (q = 0; q < P; q++)
        if (m->lanes[q].err.status != MOE_OK) {
            m->err = m->lanes[q].err;
            return m->err.status;
        }
    return MOE_OK;
}

/* CQIL group forward, layers l0..l0+P-1 on the common input h = blocks[l0].x (arXiv
   2404.06709 §3; the formulas at moe_model_set_groups). Each member's block caches hold what
   the sequential block would for input h and FFN input r_q, so backward reuses them. */
static moe_status moe__group_forward(moe_model *m, int l0, int P, int B, int T) {
    const moe_model_config *c = &m->cfg;
    int q, dist = m->group_bypass;
    size_t i, Nd = (size_t)B * T * c->d;
    const float *h = m->blocks[l0].x;
    float *out = l0 + P < c->n_layers ? m->blocks[l0 + P].x : m->x_final;
    for (q = 1; q < P; q++) memcpy(m->blocks[l0 + q].x, h, sizeof(float) * Nd);
    for (q = 0; q < P; q++) m->lanes[q].err.status = MOE_OK;
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) moe__block_attention_forward(m, l0 + q, B, T, m->lanes[q].att, &m->lanes[q].work, &m->lanes[q].err);
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 1; dist > 0 && q < P; q++) { /* r_q = h + a_q + beta_q */
        float *x2 = m->blocks[l0 + q].x2;
        int u;
        for (u = q - dist < 0 ? 0 : q - dist; u < q; u++) {
            const float *a = m->lanes[u].att;
            for (i = 0; i < Nd; i++) x2[i] += a[i];
        }
    }
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) moe__block_ffn_forward(m, l0 + q, B * T, moe__block_args(m, T, NULL), NULL, &m->lanes[q].work, &m->lanes[q].err);
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 0; q < P; q++) {
        if (m->blocks[l0 + q].is_moe) m->aux_loss += m->blocks[l0 + q].moe.stats.aux_total;
        if (m->ffn_hook) m->ffn_hook(m, l0 + q, m->ffn_hook_user);
    }
    /* h_out = (h + a_0 + FFN_0) + sum_{q>=1} (a_q [+ beta_q] + FFN_q), in member order */
    {
        const float *x2 = m->blocks[l0].x2, *f = m->blocks[l0].ffn;
        for (i = 0; i < Nd; i++) out[i] = x2[i] + f[i];
    }
    for (q = 1; q < P; q++) {
        const float *a = m->lanes[q].att, *f = m->blocks[l0 + q].ffn;
        int u;
        for (i = 0; i < Nd; i++) out[i] += a[i];
        for (u = q - dist < 0 ? 0 : q - dist; m->group_double_count && u < q; u++) {
            const float *b = m->lanes[u].att;
            for (i = 0; i < Nd; i++) out[i] += b[i];
        }
        for (i = 0; i < Nd; i++) out[i] += f[i];
    }
    return MOE_OK;
}

/* CQIL group backward: d_res holds dL/dh_out on entry, dL/dh on return. With D = dL/dh_out,
   G_q = dL/dr_q through member q's FFN and R_q = G_q (+ D when double counting):
     dL/da_q = D + G_q + sum of R_u over the later members u whose bypass reads a_q
               (double counting: D + G_q ... with every R_u carrying a D)
     dL/dh   = D + sum_q G_q + sum_q RMSNorm1_q'(attention_q'(dL/da_q)) */
static moe_status moe__group_backward(moe_model *m, int l0, int P, float scale) {
    const moe_model_config *c = &m->cfg;
    int q, dist = m->group_bypass, N = m->B * m->T;
    size_t i, Nd = (size_t)N * c->d;
    const float *D = m->d_res;
    float *dh = m->d_res2;
    for (q = 0; q < P; q++) m->lanes[q].err.status = MOE_OK;
    memcpy(m->lanes[0].da, D, sizeof(float) * Nd); /* member 0 accumulates onto D, as a sequential block */
    for (q = 1; q < P; q++) memset(m->lanes[q].g, 0, sizeof(float) * Nd);
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        moe__block_ffn_backward(m, l0 + q, D, q == 0 ? ln->da : ln->g, scale, ln->d_ln, ln->scratch1, ln->scratch2, &ln->work, &ln->err);
    }
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    memcpy(dh, m->lanes[0].da, sizeof(float) * Nd);
    for (q = 1; q < P; q++) {
        const float *g = m->lanes[q].g;
        float *da = m->lanes[q].da;
        for (i = 0; i < Nd; i++) dh[i] += g[i];
        for (i = 0; i < Nd; i++) da[i] = D[i] + g[i];
    }
    for (q = 0; dist > 0 && q + 1 < P; q++) { /* a_q reaches members q+1 .. q+dist */
        float *da = m->lanes[q].da;
        int u;
        for (u = q + 1; u < P && u <= q + dist; u++) {
            const float *g = m->lanes[u].g;
            for (i = 0; i < Nd; i++) da[i] += g[i];
            if (m->group_double_count)
                for (i = 0; i < Nd; i++) da[i] += D[i];
        }
    }
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        moe__block_attention_backward(m, l0 + q, ln->da, ln->d_ln, ln->d_atty, ln->d_qkv, &ln->work, &ln->err);
    }
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 0; q < P; q++) {
        const moe_block *b = &m->blocks[l0 + q];
        moe_rmsnorm_backward(dh, moe_store_grad(&m->S, b->id_ln1), m->lanes[q].d_ln, b->x, moe_store_param(&m->S, b->id_ln1), b->rstd1, N,
                             c->d);
    }
    memcpy(m->d_res, dh, sizeof(float) * Nd);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_forward(moe_model *m, const int *inputs, const int *targets, int B, int T,
                                       moe_rng *noise) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, V = c->vocab, N = B * T, l, i, t, P;
    const float *wte, *wpe, *rh_prev;
    float *x;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!inputs) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "inputs must not be NULL");
    if (B <= 0 || T <= 0 || B > m->max_B || T > m->max_T)
        return moe_err_set(&m->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the activations (%d x %d)", B, T, m->max_B, m->max_T);
    for (i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "input token %d at position %d is outside [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < -1 || targets[i] >= V)) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "target %d at position %d is outside [-1, %d)", targets[i], i, V);
    }
    m->B = m->T = 0;
    m->has_targets = 0;
    memcpy(m->inputs, inputs, sizeof(int) * (size_t)N);
    if (targets) memcpy(m->targets, targets, sizeof(int) * (size_t)N);
    /* embeddings */
    wte = moe_store_param(&m->S, m->id_wte);
    wpe = moe_store_param(&m->S, m->id_wpe);
    x = m->blocks[0].x;
    for (i = 0; i < N; i++) {
        const float *e = wte + (size_t)inputs[i] * d;
        float *o = x + (size_t)i * d;
        int j;
        t = i % T;
        for (j = 0; j < d; j++) o[j] = e[j] + (wpe ? wpe[(size_t)t * d + j] : 0.0f);
    }
    m->aux_loss = 0.0;
    rh_prev = m->r_zero; /* RMoE: h_0 = 0 before the first MoE layer; dense layers pass h on */
    for (l = 0; l < c->n_layers; l += P) {
        moe_block *b = &m->blocks[l];
        float *out = l + 1 < c->n_layers ? m->blocks[l + 1].x : m->x_final;
        const float *draws = NULL;
        moe_status st;
        P = m->group_size ? m->group_size[l] : 0;
        if (P > 0) { /* a CQIL group */
            for (i = l; i < l + P; i++)
                if (noise && m->routing_noise && m->blocks[i].is_moe)
                    return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layers %d..%d run as a CQIL group: their MoE layers cannot draw routing noise (pass no noise RNG)", l, l + P - 1);
            for (i = l; i < l + P; i++)
                if (m->layer_scale[i] != 1.0f)
                    return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d runs in a CQIL group (layers %d..%d) with a residual scale of %g: grouped layers run unscaled (set it to 1 or ungroup)", i, l, l + P - 1, (double)m->layer_scale[i]);
            if ((st = moe__group_forward(m, l, P, B, T)) != MOE_OK) return st;
            continue;
        }
        P = 1;
        if ((st = moe__block_attention_forward(m, l, B, T, NULL, &m->work, &m->err)) != MOE_OK) return st;
        if (b->is_moe && noise && m->routing_noise) {
            size_t n = (size_t)N * c->moe.n_experts, k;
            for (k = 0; k < n; k++) m->routing_noise[k] = moe_rng_normal(noise);
            draws = m->routing_noise;
        }
        if ((st = moe__block_ffn_forward(m, l, N, moe__block_args(m, T, draws), &rh_prev, &m->work, &m->err)) != MOE_OK) return st;
        if (b->is_moe) m->aux_loss += b->moe.stats.aux_total;
        if (m->ffn_hook) m->ffn_hook(m, l, m->ffn_hook_user);
        if (m->layer_scale[l] != 1.0f) {
            float s = m->layer_scale[l];
            for (i = 0; i < N * d; i++) out[i] = b->x2[i] + s * b->ffn[i];
        } else
            for (i = 0; i < N * d; i++) out[i] = b->x2[i] + b->ffn[i];
    }
    if (c->balance_all_layers) moe__model_balance_all_layers(m);
    moe_rmsnorm_forward(m->lnf, m->rstd_f, m->x_final, moe_store_param(&m->S, m->id_lnf), N, d, c->norm_eps);
    MOE__MODEL_TRY(moe_matmul_forward(m->logits, m->lnf, wte, NULL, N, d, V, &m->work), -1, "tied head");
    m->loss = targets ? moe_crossentropy_forward(m->losses, m->logits, targets, N, V) : 0.0;
    m->B = B;
    m->T = T;
    m->has_targets = targets != NULL;
    return MOE_OK;
}

/* the size of the CQIL group whose last member is layer l, 0 when l ends none */
static int moe__group_ending_at(const moe_model *m, int l) {
    int s;
    for (s = l; m->group_size && s >= 0; s--)
        if (m->group_size[s] > 0) return s + m->group_size[s] - 1 == l ? m->group_size[s] : 0;
    return 0;
}

/* everything below the logits, from m->d_logits */
static moe_status moe__model_backward_from_logits(moe_model *m, float scale) {
    const moe_model_config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, d = c->d, V = c->vocab, l, i, P;
    float *d_res = m->d_res, *d_res2 = m->d_res2, s;
    moe_store *S = &m->S;
    moe_status st;
    (void)B;
    /* tied head: logits = lnf . wte^T */
    memset(m->d_ln, 0, sizeof(float) * (size_t)N * d);
    MOE__MODEL_TRY(moe_matmul_backward(m->d_ln, moe_store_grad(S, m->id_wte), NULL, m->d_logits, m->lnf, moe_store_param(S, m->id_wte),
                                       N, d, V, &m->work),
                   -1, "tied head backward");
    memset(d_res, 0, sizeof(float) * (size_t)N * d);
    moe_rmsnorm_backward(d_res, moe_store_grad(S, m->id_lnf), m->d_ln, m->x_final, moe_store_param(S, m->id_lnf), m->rstd_f, N, d);
    if (m->r_carry) memset(m->r_carry, 0, sizeof(float) * (size_t)N * c->router_dim); /* dL/dh of the layer above */
    for (l = c->n_layers - 1; l >= 0; l -= P) {
        moe_block *b;
        if ((P = moe__group_ending_at(m, l)) > 0) {
            if ((st = moe__group_backward(m, l - P + 1, P, scale)) != MOE_OK) return st;
            continue;
        }
        P = 1;
        b = &m->blocks[l];
        s = m->layer_scale[l];
        /* d_res = dL/d(block output). FFN branch: d x2 = d_res + RMSNorm2'(dFFN input) */
        memcpy(d_res2, d_res, sizeof(float) * (size_t)N * d);
        if (s != 1.0f) /* masked growth: dL/d ffn = s_l d_res (d_res is rewritten below) */
            for (i = 0; i < N * d; i++) d_res[i] *= s;
        st = moe__block_ffn_backward(m, l, d_res, d_res2, scale, m->d_ln, m->scratch1, m->scratch2, &m->work, &m->err);
        if (st != MOE_OK) return st;
        /* attention branch: d x = d x2 + RMSNorm1'(d qkv-projection input) */
        memcpy(d_res, d_res2, sizeof(float) * (size_t)N * d);
        if (s != 1.0f) /* dL/d Attn = s_l dL/dx2; d_res2 is read only by the attention backward */
            for (i = 0; i < N * d; i++) d_res2[i] *= s;
        if ((st = moe__block_attention_backward(m, l, d_res2, m->d_ln, m->d_atty, m->d_qkv, &m->work, &m->err)) != MOE_OK) return st;
        /* d_res now holds dL/dx of this block: the output gradient of the block below */
        moe_rmsnorm_backward(d_res, moe_store_grad(S, b->id_ln1), m->d_ln, b->x, moe_store_param(S, b->id_ln1), b->rstd1, N, d);
    }
    /* embeddings: a scatter by token id, serial so the sum order is fixed */
    {
        float *gwte = moe_store_grad(S, m->id_wte), *gwpe = moe_store_grad(S, m->id_wpe);
        int j;
        for (i = 0; i < N; i++) {
            const float *g = d_res + (size_t)i * d;
            float *o = gwte + (size_t)m->inputs[i] * d;
            for (j = 0; j < d; j++) o[j] += g[j];
            if (gwpe) {
                float *p = gwpe + (size_t)(i % T) * d;
                for (j = 0; j < d; j++) p[j] += g[j];
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_backward(moe_model *m, float scale) {
    int N = m->B * m->T, V = m->cfg.vocab, i, count = 0;
    if (!m->has_targets) return moe_err_set(&m->err, MOE_ERR_STATE, "backward needs a forward with targets before it");
    for (i = 0; i < N; i++) count += m->targets[i] >= 0;
    memset(m->d_logits, 0, sizeof(float) * (size_t)N * V);
    if (count > 0) moe_crossentropy_backward(m->d_logits, m->logits, m->targets, N, V, scale / (float)count);
    return moe__model_backward_from_logits(m, scale);
}

MOE__IMPL moe_status moe_model_backward_logits(moe_model *m, const float *d_logits, float scale) {
    if (!m->blocks || m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "backward needs a forward before it");
    if (!d_logits) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "d_logits must not be NULL");
    memcpy(m->d_logits, d_logits, sizeof(float) * (size_t)m->B * m->T * m->cfg.vocab);
    return moe__model_backward_from_logits(m, scale);
}

MOE__IMPL moe_status moe_model_set_groups(moe_model *m, const int *first, const int *size, int n_groups, int bypass,
                                          int double_count) {
    const moe_model_config *c = &m->cfg;
    int g, l, P = 0, end = 0, q, ok = 1;
    size_t Nd, NF;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (n_groups < 0 || (n_groups > 0 && (!first || !size)))
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL groups: n_groups must be >= 0, with first and size given");
    if (bypass < 0) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL bypass distance %d must not be negative", bypass);
    for (g = 0; g < n_groups; g++) {
        if (size[g] < 1 || first[g] < 0 || first[g] > c->n_layers - size[g])
            return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL group %d: layers [%d, %d) are not inside the model's %d layers", g, first[g],
                               first[g] + size[g], c->n_layers);
        if (first[g] < end)
            return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL group %d starts at layer %d, inside or before the group before it (which ends at %d): give disjoint groups in increasing order",
                               g, first[g], end);
        end = first[g] + size[g];
        P = size[g] > P ? size[g] : P;
        for (l = first[g]; l < end; l++) {
            const moe_block *b = &m->blocks[l];
            if (b->is_moe && b->id_rproj >= 0)
                return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "CQIL group %d: MoE layer %d's router reads a GRU state or an MLP, which runs layer after layer; group only layers with linear routers", g, l);
            if (b->is_moe && c->moe.hyper)
                return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "CQIL group %d: HyperMoE layers share one hypernetwork, whose gradients concurrent members would race on", g);
        }
    }
    moe__groups_free(m);
    m->group_bypass = bypass;
    m->group_double_count = double_count != 0;
    if (n_groups == 0) return MOE_OK;
    Nd = (size_t)m->max_B * m->max_T * c->d;
    NF = (size_t)m->max_B * m->max_T * moe__dense_width(m);
    m->group_size = (int *)moe__calloc((size_t)c->n_layers, sizeof(int));
    m->lanes = (moe_group_lane *)moe__calloc((size_t)P, sizeof(moe_group_lane));
    ok = m->group_size && m->lanes;
    if (ok) m->n_lanes = P;
    for (q = 0; ok && q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        ok = MOE__ALLOC(ln->att, Nd, float) && MOE__ALLOC(ln->da, Nd, float) && MOE__ALLOC(ln->g, Nd, float) &&
             MOE__ALLOC(ln->d_ln, Nd, float) && MOE__ALLOC(ln->d_atty, Nd, float) && MOE__ALLOC(ln->d_qkv, 3 * Nd, float) &&
             MOE__ALLOC(ln->scratch1, NF, float) && MOE__ALLOC(ln->scratch2, NF, float) &&
             moe_work_alloc(&ln->work, m->work.floats, 1) == MOE_OK; /* one thread: the members are the parallel loop */
    }
    if (!ok) {
        moe__groups_free(m);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the CQIL groups' buffers");
    }
    for (g = 0; g < n_groups; g++) m->group_size[first[g]] = size[g];
    return MOE_OK;
}

MOE__IMPL int moe_model_depth(const moe_model *m) {
    int l, depth = m->cfg.n_layers;
    for (l = 0; m->group_size && l < m->cfg.n_layers; l++)
        if (m->group_size[l] > 1) depth -= m->group_size[l] - 1;
    return depth;
}

MOE__IMPL void moe_model_set_broadcast(moe_model *m, int on) { m->gw_broadcast = on != 0; }

MOE__IMPL moe_status moe_model_update_selection_bias(moe_model *m, float gamma) {
    int l;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    for (l = 0; l < m->cfg.n_layers; l++) {
        moe_block *b = &m->blocks[l];
        if (b->is_moe && moe_layer_update_selection_bias(&b->moe, &m->S, gamma) != MOE_OK)
            return moe_err_set(&m->err, b->moe.err.status, "layer %d: %s", l, b->moe.err.msg);
    }
    return MOE_OK;
}

MOE__IMPL size_t moe_model_params_total(const moe_model *m) { return m->S.numel; }

MOE__IMPL size_t moe_model_params_active(const moe_model *m) {
    size_t total = m->S.numel;
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        const moe_layer_config *c = &b->moe.cfg;
        if (!b->is_moe) continue;
        total -= (size_t)(c->n_experts - c->top_k) * moe__router_idle_expert_params(c);
    }
    return total;
}

/* sampler's settings are usable */
static moe_status moe__sampler_check(moe_err *err, const moe_sampler *sampler) {
    if (!(sampler->temperature >= 0.0f) || sampler->top_k < 0 || !(sampler->top_p > 0.0f && sampler->top_p <= 1.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "sampler: temperature >= 0, top_k >= 0, 0 < top_p <= 1");
    return MOE_OK;
}

/* The next token from logits z (V): greedy at temperature 0 (no draw), else softmax at the
   temperature, keep the top-k and the top-p mass, one uniform draw from rng. p: (2 V) scratch. */
static int moe__sample_token(const float *z, int V, const moe_sampler *sampler, moe_rng *rng, float *p) {
    int i, next = 0;
    if (sampler->temperature == 0.0f) {
        for (i = 1; i < V; i++)
            if (z[i] > z[next]) next = i;
    } else {
        /* softmax at temperature, then keep the top-k and the top-p mass, sample */
        float mx = -FLT_MAX, *order = p + V, cut = -FLT_MAX;
        double sum = 0.0, acc = 0.0, u;
        for (i = 0; i < V; i++) mx = z[i] > mx ? z[i] : mx;
        for (i = 0; i < V; i++) { p[i] = expf((z[i] - mx) / sampler->temperature); sum += p[i]; }
        for (i = 0; i < V; i++) { p[i] = (float)(p[i] / sum); order[i] = p[i]; }
        if (sampler->top_k > 0 || sampler->top_p < 1.0f) {
            /* threshold = the smallest probability kept by both rules */
            int kept = 0;
            qsort(order, (size_t)V, sizeof(float), moe__float_desc);
            for (i = 0; i < V; i++) {
                if (sampler->top_k > 0 && kept >= sampler->top_k) break;
                if (acc >= sampler->top_p) break;
                acc += order[i];
                cut = order[i];
                kept++;
            }
            for (i = 0; i < V; i++)
                if (p[i] < cut) p[i] = 0.0f;
        }
        sum = 0.0;
        for (i = 0; i < V; i++) sum += p[i];
        u = moe_rng_uniform(rng) * sum;
        acc = 0.0;
        next = -1;
        for (i = 0; i < V; i++) {
            if (p[i] <= 0.0f) continue;
            acc += p[i];
            next = i;
            if (u < acc) break;
        }
    }
    return next;
}

MOE__IMPL moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                        const moe_sampler *sampler, moe_rng *rng) {
    int V = m->cfg.vocab, n = n_prompt, step;
    moe_status st;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!prompt || !out || n_prompt < 1 || n_new < 0 || !sampler || !rng)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "generate needs a prompt of at least one token, an output buffer, a sampler and an RNG");
    if (m->cfg.moe_every > 0 && !moe__router_is_causal(&m->cfg.moe))
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "expert-choice routing is not causal (a token's experts depend on later tokens): it cannot generate");
    if (moe__sampler_check(&m->err, sampler) != MOE_OK) return m->err.status;
    memcpy(out, prompt, sizeof(int) * (size_t)n_prompt);
    for (step = 0; step < n_new; step++) {
        int ctx = n < m->max_T ? n : m->max_T;
        st = moe_model_forward(m, out + n - ctx, NULL, 1, ctx, NULL);
        if (st != MOE_OK) return st;
        out[n++] = moe__sample_token(m->logits + (size_t)(ctx - 1) * V, V, sampler, rng, m->gen_probs);
    }
    m->B = m->T = 0; /* the generation forwards leave no batch to differentiate */
    m->has_targets = 0;
    return MOE_OK;
}

