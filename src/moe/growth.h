/* ============================================================================================
   >>moe:growth  model growth: G_stack and the growth operators (arXiv 2405.15319)
   ============================================================================================
   Grows a trained small model (depth l, FFN width f) into a larger one (depth L >= l, FFN
   width F >= f) of the same d, heads, vocabulary and router, by copying through the two
   stores' tensor tables: no second copy of the model layout. Depth (arXiv 2405.15319 §2, §3):
   target layer j copies small layer map[j]; G_stack is map[j] = j mod l (block order
   0..l-1, 0..l-1, ...), layer interpolation is map[j] = j / g (f0 f0 f1 f1 ...), partial
   stacking repeats a sub-block (moe_grow_partial_map). A later copy of a source layer is a
   "new" layer. MoE layers carry their experts and routers with them.
     G_direct: copy (depth = G_stack);  width: Net2Net split, a new neuron copies neuron
               n mod f's fan-in and the fan-out of every copy is divided by its copies
               (function kept exactly for the FFN's hidden neurons).
     G_zero:   new layers' output projections (attn.wo, w_down, b_down) zero, so they start as
               the identity; width: new neurons keep the target's own random fan-in and get a
               zero fan-out.
     G_random: new layers keep the target's own random initialisation and are masked: their
               residual updates are multiplied by c, ramped 0 -> 1 (moe_grow_set_mask; the
               model reads moe_model.layer_scale). Depth only.
     G_learn:  LiGO-style (arXiv 2303.00980) learned depth map: target layer j's tensors are
               sum_i D[j,i] * small layer i's, D trained briefly on the LM loss
               (moe_grow_learner). One D for all of a layer's tensors (LiGO learns one per
               module kind); depth only.
   The optimizer state restarts (the official code starts the grown run at iteration 0 with
   fresh AdamW moments): moe_model_grow zeroes the target's gradients and moments; the caller
   restarts its step counter and learning-rate schedule. The model width d is not grown:
   RMSNorm cannot keep the function there (§2) and the paper finds width growth worse. */

typedef enum moe_grow_op {
    MOE_GROW_DIRECT = 0, /* copy: G_stack in depth, neuron split in width             */
    MOE_GROW_ZERO = 1,   /* new outputs zero: function-preserving                     */
    MOE_GROW_RANDOM = 2, /* new layers random, masked by a ramp                       */
    MOE_GROW_LEARN = 3   /* copies as G_direct; moe_grow_learner then fits the maps    */
} moe_grow_op;

typedef enum moe_grow_order {
    MOE_GROW_STACK = 0,      /* map[j] = j mod l  (f1 f0 f1 f0: block stacking)        */
    MOE_GROW_INTERPOLATE = 1 /* map[j] = j / (L/l) (f1 f1 f0 f0: layer interpolation)  */
} moe_grow_order;

typedef struct moe_grow_spec {
    moe_grow_op op;
    moe_grow_order order;  /* the depth map when layer_map is NULL; both need L % l == 0   */
    const int *layer_map;  /* (target n_layers) source layer of every target layer, or NULL */
    float noise;           /* alpha of W <- (1-alpha) W + alpha eps on every grown matrix
                              (§5 ablation, 0.2): eps ~ N(0, 1/(d L^2)) for output
                              projections, N(0, 2/(5d)) otherwise; 0 = none              */
    uint64_t seed;         /* the noise draws                                            */
} moe_grow_spec;

MOEDEF moe_grow_spec moe_grow_spec_default(void); /* G_direct, stacking, no noise */
/* The source layer of every target layer (map: L ints) for growing depth l to L; a status
   with a sentence for L < l, a depth the order cannot reach, or a layer_map entry outside. */
MOEDEF moe_status moe_grow_layer_map(int *map, int L, int l, const moe_grow_spec *spec, moe_err *err);
/* Partial stacking: layers [0, first) once, the block [first, first+count) repeated until the
   depth is L, then [first+count, l) once; (L - l) % count must be 0. */
MOEDEF moe_status moe_grow_partial_map(int *map, int L, int l, int first, int count, moe_err *err);
/* 1 when target layer j repeats a source layer that an earlier target layer already copies */
MOEDEF int moe_grow_is_new(const int *map, int j);
/* Fills big (built by moe_model_init for the target config, its weights initialised: G_zero
   and G_random take their new parameters from there) from small. Everything is checked before
   the first write: on a status big is unchanged. Zeroes big's gradients and AdamW moments and
   sets its layer_scale (0 for G_random's new layers, else 1). */
MOEDEF moe_status moe_model_grow(moe_model *big, const moe_model *small, const moe_grow_spec *spec);
/* G_random's mask c = min(1, step / ramp_steps) on the new layers (1 on the others); call
   before each training step of the grown model. ramp_steps <= 0: c = 1. */
MOEDEF float moe_grow_mask_value(long long step, long long ramp_steps);
MOEDEF moe_status moe_grow_set_mask(moe_model *big, int small_layers, const moe_grow_spec *spec, long long step,
                                    long long ramp_steps);

/* G_learn: the depth map D (L, l), initialised to the spec's map (D[j, map[j]] = 1). Loop:
   moe_grow_learner_apply (big's layer tensors = D . small's), zero big's gradients, forward +
   backward of big on the LM loss, moe_grow_learner_backward, moe_grow_learner_step. The
   small model and the non-layer tensors (embeddings, final norm) stay fixed. */
typedef struct moe_grow_learner {
    int L, l, count;      /* target and small depth; big's tensor count                   */
    float *D;             /* (L, l)                                                        */
    float *gD, *mD, *vD;  /* (L, l) gradient, AdamW moments                                */
    int *src;             /* (count, l) small's tensor id for big tensor t from layer i, -1 */
    int *layer;           /* (count) big tensor t's layer, -1 for the non-layer tensors    */
    long long step;
    moe_err err;
} moe_grow_learner;
MOEDEF moe_status moe_grow_learner_init(moe_grow_learner *g, const moe_model *big, const moe_model *small,
                                        const moe_grow_spec *spec);
MOEDEF void moe_grow_learner_apply(const moe_grow_learner *g, moe_model *big, const moe_model *small);
MOEDEF void moe_grow_learner_backward(moe_grow_learner *g, const moe_model *big, const moe_model *small);
MOEDEF void moe_grow_learner_step(moe_grow_learner *g, float lr); /* Adam (0.9, 0.999); zeroes gD */
MOEDEF void moe_grow_learner_free(moe_grow_learner *g);

/* The paper's fits (§4, N = target non-embedding parameters, C = training FLOPs ~ 6 N D):
   growth timing log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 (d: tokens for the small
   model), growth factor log10(g) = 1.01 log10(N) - 29.88 / log10(C) - 7.36. */
MOEDEF double moe_grow_timing_tokens(double N, double C);
MOEDEF double moe_grow_factor_fit(double N, double C);
/* Connection rate R_c (§5): the share of the L-1 adjacent target pairs (j, j+1) that were
   adjacent in the small model (map[j+1] == map[j] + 1); 8 -> 24: stack 91.3%, interpolate 30.4%. */
MOEDEF double moe_grow_connection_rate(const int *map, int L);
/* FLOPs at which a loss curve first reaches `loss` (linear between points; curves of n
   (flops, loss) points in order); MOE_ERR_INVALID_ARG with a sentence when it never does. */
MOEDEF moe_status moe_grow_flops_at_loss(const double *flops, const double *losses, int n, double loss, double *at,
                                         moe_err *err);
/* Speed-up sp = FLOPs_scratch / FLOPs_grown - 1 at equal loss (§3; grown counts the small model's FLOPs). */
MOEDEF double moe_grow_speedup(double flops_scratch, double flops_grown);

/* @implementation */
/* ============================================================================================
   >>moe:growth
   ============================================================================================ */

MOE__IMPL moe_grow_spec moe_grow_spec_default(void) {
    moe_grow_spec s;
    memset(&s, 0, sizeof s);
    s.op = MOE_GROW_DIRECT;
    s.order = MOE_GROW_STACK;
    return s;
}

MOE__IMPL moe_status moe_grow_layer_map(int *map, int L, int l, const moe_grow_spec *spec, moe_err *err) {
    int j;
    if (!map || !spec) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a map buffer and a spec");
    if (l <= 0 || L < l)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "cannot grow %d layers into %d: the target must have at least as many layers", l, L);
    if (spec->layer_map) {
        for (j = 0; j < L; j++) {
            if (spec->layer_map[j] < 0 || spec->layer_map[j] >= l)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "layer_map[%d] = %d is not a layer of the %d-layer model", j, spec->layer_map[j], l);
            map[j] = spec->layer_map[j];
        }
        return MOE_OK;
    }
    if (spec->order != MOE_GROW_STACK && spec->order != MOE_GROW_INTERPOLATE)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown growth order %d", (int)spec->order);
    if (L % l != 0)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s %d layers into %d needs a whole growth factor: %d is not a multiple of %d",
                           spec->order == MOE_GROW_STACK ? "stacking" : "interpolating", l, L, L, l);
    for (j = 0; j < L; j++) map[j] = spec->order == MOE_GROW_STACK ? j % l : j / (L / l);
    return MOE_OK;
}

MOE__IMPL moe_status moe_grow_partial_map(int *map, int L, int l, int first, int count, moe_err *err) {
    int j = 0, i, r;
    if (!map) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a map buffer");
    if (l <= 0 || L < l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "cannot grow %d layers into %d: the target must have at least as many layers", l, L);
    if (first < 0 || count <= 0 || first + count > l)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the stacked block [%d, %d) is not inside the %d layers", first, first + count, l);
    if ((L - l) % count != 0)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "repeating a block of %d layers cannot add the %d layers from %d to %d", count, L - l, l, L);
    for (i = 0; i < first; i++) map[j++] = i;
    for (r = 0; r < (L - l) / count + 1; r++)
        for (i = first; i < first + count; i++) map[j++] = i;
    for (i = first + count; i < l; i++) map[j++] = i;
    return MOE_OK;
}

MOE__IMPL int moe_grow_is_new(const int *map, int j) {
    int k;
    for (k = 0; k < j; k++)
        if (map[k] == map[j]) return 1;
    return 0;
}

/* "l12.attn.wo" -> 12 and the suffix "attn.wo"; -1 for the model's non-layer tensors */
static int moe__grow_layer_of(const char *name, const char **suffix) {
    int n = 0, digits = 0;
    const char *p = name + 1;
    *suffix = name;
    if (name[0] != 'l') return -1;
    while (*p >= '0' && *p <= '9' && digits < 6) { n = 10 * n + (*p - '0'); p++; digits++; }
    if (digits == 0 || *p != '.') return -1;
    *suffix = p + 1;
    return n;
}

/* the tensor of small that big tensor t copies: same name, or layer map[j]'s */
static int moe__grow_source(const moe_store *big, int t, const moe_store *small, const int *map, int *layer) {
    const char *suffix;
    char name[MOE_NAME_LEN + 16];
    int j = moe__grow_layer_of(big->tensors[t].name, &suffix);
    *layer = j;
    if (j < 0) return moe_store_find(small, big->tensors[t].name);
    sprintf(name, "l%d.%s", map[j], suffix);
    return strlen(name) < MOE_NAME_LEN ? moe_store_find(small, name) : -1;
}

static int moe__grow_is_output(const char *suffix) {
    return moe__ends_with(suffix, "attn.wo") || moe__ends_with(suffix, "w_down") || moe__ends_with(suffix, "b_down");
}
/* the FFN's hidden neurons: rows of w_gate / w_up / b_up (fan-in), columns of w_down (fan-out) */
static int moe__grow_is_fan_in(const char *suffix) {
    return moe__ends_with(suffix, "w_gate") || moe__ends_with(suffix, "w_up") || moe__ends_with(suffix, "b_up");
}

/* -1: equal shapes; k >= 0: only dimension k differs and may grow (FFN neurons); -2: neither */
static int moe__grow_width_dim(const moe_tensor *b, const moe_tensor *s, const char *suffix) {
    int k, diff = -1;
    if (b->ndim != s->ndim) return -2;
    for (k = 0; k < b->ndim; k++)
        if (b->shape[k] != s->shape[k]) {
            if (diff >= 0 || b->shape[k] < s->shape[k]) return -2;
            diff = k;
        }
    if (diff < 0) return -1;
    if (moe__grow_is_fan_in(suffix) && diff == 1) return diff;                        /* (E, F, d), (E, F) */
    if (moe__ends_with(suffix, "w_down") && diff == b->ndim - 1 && b->ndim == 3) return diff; /* (E, d, F) */
    return -2;
}

static moe_status moe__grow_check_config(const moe_model *big, const moe_model *small, moe_err *err) {
    const moe_model_config *a = &big->cfg, *b = &small->cfg;
    const moe_layer_config *x = &a->moe, *y = &b->moe;
    if (a->vocab != b->vocab || a->max_seq != b->max_seq || a->d != b->d || a->n_heads != b->n_heads || a->pos != b->pos ||
        a->rope_theta != b->rope_theta || a->norm_eps != b->norm_eps)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth keeps vocab, max_seq, d, n_heads and positions: the two configs differ there (width d does not grow)");
    if (a->moe_every != b->moe_every || a->dense_first != b->dense_first || a->router_input != b->router_input || a->router_dim != b->router_dim)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the two models differ in which layers are MoE or in the routers' input");
    if (a->moe_every > 0 && (x->n_experts != y->n_experts || x->top_k != y->top_k || x->n_shared != y->n_shared || x->expert != y->expert ||
                             x->activation != y->activation || x->expert_bias != y->expert_bias || x->router != y->router ||
                             x->renormalize != y->renormalize || x->router_bias != y->router_bias))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the two models' MoE layers differ in experts, top-k or router");
    if (a->moe_every > 0 && (x->hyper || y->hyper))
        return moe_err_set(err, MOE_ERR_UNSUPPORTED, "HyperMoE's layer embedding has one row per layer: growing its depth is not defined");
    return MOE_OK;
}

/* Everything moe_model_grow checks, before it writes: the map, the configs, each target
   tensor's source and shapes. */
static moe_status moe__grow_check(const moe_model *big, const moe_model *small, const moe_grow_spec *spec, int *map,
                                  moe_err *err) {
    int L, l, t, j;
    if (!big || !small || !spec) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a target, a small model and a spec");
    if (!big->blocks || !small->blocks || !big->S.params || !small->S.params)
        return moe_err_set(err, MOE_ERR_STATE, "growth needs two initialised models (moe_model_init)");
    if ((int)spec->op < 0 || (int)spec->op > MOE_GROW_LEARN) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown growth operator %d", (int)spec->op);
    if (!(spec->noise >= 0.0f && spec->noise < 1.0f)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth noise must be in [0, 1), got %g", (double)spec->noise);
    L = big->cfg.n_layers;
    l = small->cfg.n_layers;
    if (moe_grow_layer_map(map, L, l, spec, err) != MOE_OK) return err->status;
    if (moe__grow_check_config(big, small, err) != MOE_OK) return err->status;
    for (j = 0; j < L; j++)
        if (big->blocks[j].is_moe != small->blocks[map[j]].is_moe)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "target layer %d is %s but copies layer %d, which is %s", j,
                               big->blocks[j].is_moe ? "MoE" : "dense", map[j], small->blocks[map[j]].is_moe ? "MoE" : "dense");
    for (t = 0; t < big->S.count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        const char *suffix;
        int layer, s = moe__grow_source(&big->S, t, &small->S, map, &layer), k;
        moe__grow_layer_of(bt->name, &suffix);
        if (s < 0) return moe_err_set(err, MOE_ERR_SHAPE, "target tensor '%s' has no counterpart in the small model", bt->name);
        k = moe__grow_width_dim(bt, &small->S.tensors[s], suffix);
        if (k == -2) return moe_err_set(err, MOE_ERR_SHAPE, "tensor '%s' has a shape the small model's '%s' cannot grow into", bt->name, small->S.tensors[s].name);
        if (k >= 0 && (spec->op == MOE_GROW_RANDOM || spec->op == MOE_GROW_LEARN))
            return moe_err_set(err, MOE_ERR_UNSUPPORTED, "%s grows depth only: the FFN widths of the two models must match ('%s')",
                               spec->op == MOE_GROW_RANDOM ? "G_random" : "G_learn", bt->name);
    }
    return MOE_OK;
}

/* big tensor (outer, nb, inner) from small (outer, ns, inner) along the neuron dimension k */
static void moe__grow_width_copy(float *dst, const moe_tensor *bt, const float *src, const moe_tensor *st, int k,
                                 int fan_out, moe_grow_op op) {
    size_t outer = 1, inner = 1, o, in;
    int nb = bt->shape[k], ns = st->shape[k], n, i;
    for (i = 0; i < k; i++) outer *= (size_t)bt->shape[i];
    for (i = k + 1; i < bt->ndim; i++) inner *= (size_t)bt->shape[i];
    for (o = 0; o < outer; o++)
        for (n = 0; n < nb; n++) {
            int from = n % ns, copies = (nb - 1 - from) / ns + 1; /* the neurons that repeat `from` */
            float *y = dst + (o * (size_t)nb + (size_t)n) * inner;
            const float *x = src + (o * (size_t)ns + (size_t)from) * inner;
            if (op == MOE_GROW_ZERO) { /* old neurons as they were; new: own fan-in, zero fan-out */
                if (n < ns) memcpy(y, x, inner * sizeof(float));
                else if (fan_out) memset(y, 0, inner * sizeof(float));
            } else if (fan_out) {      /* Net2Net: the copies share the fan-out */
                for (in = 0; in < inner; in++) y[in] = x[in] / (float)copies;
            } else
                memcpy(y, x, inner * sizeof(float));
        }
}

MOE__IMPL moe_status moe_model_grow(moe_model *big, const moe_model *small, const moe_grow_spec *spec) {
    moe_err scratch, *err = big ? &big->err : &scratch;
    int *map, L, t, j;
    moe_status st;
    memset(&scratch, 0, sizeof scratch);
    if (!big) return MOE_ERR_INVALID_ARG;
    if (big->cfg.n_layers <= 0 || !(map = (int *)moe__calloc((size_t)big->cfg.n_layers, sizeof(int))))
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the layer map");
    st = moe__grow_check(big, small, spec, map, err);
    if (st != MOE_OK) { MOE_FREE(map); return st; }
    L = big->cfg.n_layers;
    for (t = 0; t < big->S.count; t++) {
        const moe_tensor *bt = &big->S.tensors[t], *stt;
        const char *suffix;
        int layer, s = moe__grow_source(&big->S, t, &small->S, map, &layer), k, is_new;
        float *dst = big->S.params + bt->offset;
        const float *src;
        moe__grow_layer_of(bt->name, &suffix);
        stt = &small->S.tensors[s];
        src = small->S.params + stt->offset;
        is_new = layer >= 0 && moe_grow_is_new(map, layer);
        if (is_new && spec->op == MOE_GROW_RANDOM) continue; /* the target's own initialisation */
        if (is_new && spec->op == MOE_GROW_ZERO && moe__grow_is_output(suffix)) {
            memset(dst, 0, bt->numel * sizeof(float));
            continue;
        }
        k = moe__grow_width_dim(bt, stt, suffix);
        if (k < 0) memcpy(dst, src, bt->numel * sizeof(float));
        else moe__grow_width_copy(dst, bt, src, stt, k, !moe__grow_is_fan_in(suffix), spec->op);
    }
    if (spec->noise > 0.0f) { /* §5: break the function preservation a little */
        moe_rng r;
        float a = spec->noise, d = (float)big->cfg.d;
        moe_rng_seed(&r, spec->seed);
        for (t = 0; t < big->S.count; t++) {
            const moe_tensor *bt = &big->S.tensors[t];
            const char *suffix;
            float *p = big->S.params + bt->offset, sd;
            size_t i;
            if (moe__grow_layer_of(bt->name, &suffix) < 0 || bt->ndim < 2) continue;
            sd = moe__grow_is_output(suffix) ? sqrtf(1.0f / (d * (float)L * (float)L)) : sqrtf(2.0f / (5.0f * d));
            for (i = 0; i < bt->numel; i++) p[i] = (1.0f - a) * p[i] + a * sd * moe_rng_normal(&r);
        }
    }
    for (j = 0; j < L; j++) big->layer_scale[j] = spec->op == MOE_GROW_RANDOM && moe_grow_is_new(map, j) ? 0.0f : 1.0f;
    memset(big->S.grads, 0, big->S.numel * sizeof(float));
    if (big->S.adam_m) memset(big->S.adam_m, 0, big->S.numel * sizeof(float));
    if (big->S.adam_v) memset(big->S.adam_v, 0, big->S.numel * sizeof(float));
    MOE_FREE(map);
    return MOE_OK;
}

MOE__IMPL float moe_grow_mask_value(long long step, long long ramp_steps) {
    if (ramp_steps <= 0 || step >= ramp_steps) return 1.0f;
    return step <= 0 ? 0.0f : (float)((double)step / (double)ramp_steps);
}

MOE__IMPL moe_status moe_grow_set_mask(moe_model *big, int small_layers, const moe_grow_spec *spec, long long step,
                                       long long ramp_steps) {
    int j, k, L;
    float c = moe_grow_mask_value(step, ramp_steps);
    if (!big || !big->layer_scale || !spec) return MOE_ERR_INVALID_ARG;
    L = big->cfg.n_layers;
    if (small_layers <= 0 || small_layers > L || (!spec->layer_map && L % small_layers != 0))
        return moe_err_set(&big->err, MOE_ERR_INVALID_ARG, "a %d-layer model is not grown from %d layers", L, small_layers);
    for (j = 0; j < L; j++) { /* is j a later copy? (no map buffer: this runs every step) */
        int src = spec->layer_map ? spec->layer_map[j] : spec->order == MOE_GROW_STACK ? j % small_layers : j / (L / small_layers);
        int is_new = 0;
        for (k = 0; k < j && !is_new; k++)
            is_new = src == (spec->layer_map ? spec->layer_map[k] : spec->order == MOE_GROW_STACK ? k % small_layers : k / (L / small_layers));
        big->layer_scale[j] = is_new ? c : 1.0f;
    }
    return MOE_OK;
}

/* ---- G_learn ---------------------------------------------------------------------------- */

MOE__IMPL moe_status moe_grow_learner_init(moe_grow_learner *g, const moe_model *big, const moe_model *small,
                                           const moe_grow_spec *spec) {
    int *map = NULL, t, i, L, l;
    char name[MOE_NAME_LEN + 16];
    moe_grow_spec direct;
    memset(g, 0, sizeof *g);
    if (!spec) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "G_learn needs a spec");
    direct = *spec;
    direct.op = MOE_GROW_LEARN;
    if (!big || big->cfg.n_layers <= 0 || !(map = (int *)moe__calloc((size_t)big->cfg.n_layers, sizeof(int))))
        return moe_err_set(&g->err, big ? MOE_ERR_NOMEM : MOE_ERR_INVALID_ARG, "G_learn needs a target model");
    if (moe__grow_check(big, small, &direct, map, &g->err) != MOE_OK) { MOE_FREE(map); return g->err.status; }
    L = g->L = big->cfg.n_layers;
    l = g->l = small->cfg.n_layers;
    g->count = big->S.count;
    if (!MOE__ALLOC(g->D, (size_t)L * l, float) || !MOE__ALLOC(g->gD, (size_t)L * l, float) || !MOE__ALLOC(g->mD, (size_t)L * l, float) ||
        !MOE__ALLOC(g->vD, (size_t)L * l, float) || !MOE__ALLOC(g->src, (size_t)g->count * l, int) || !MOE__ALLOC(g->layer, g->count, int)) {
        MOE_FREE(map);
        moe_grow_learner_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory for the growth maps");
    }
    for (i = 0; i < L; i++) g->D[(size_t)i * l + map[i]] = 1.0f;
    for (t = 0; t < g->count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        const char *suffix;
        g->layer[t] = moe__grow_layer_of(bt->name, &suffix);
        for (i = 0; i < l; i++) {
            int s = -1;
            if (g->layer[t] >= 0) {
                sprintf(name, "l%d.%s", i, suffix);
                s = strlen(name) < MOE_NAME_LEN ? moe_store_find(&small->S, name) : -1;
                if (s >= 0 && small->S.tensors[s].numel != bt->numel) s = -1;
            }
            g->src[(size_t)t * l + i] = s; /* a source layer without this tensor adds nothing */
        }
    }
    MOE_FREE(map);
    return MOE_OK;
}

MOE__IMPL void moe_grow_learner_apply(const moe_grow_learner *g, moe_model *big, const moe_model *small) {
    int t, i;
    for (t = 0; t < g->count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        float *dst = big->S.params + bt->offset;
        size_t n;
        if (g->layer[t] < 0) { /* embeddings, final norm: copied once, kept */
            int s = moe_store_find(&small->S, bt->name);
            memcpy(dst, small->S.params + small->S.tensors[s].offset, bt->numel * sizeof(float));
            continue;
        }
        memset(dst, 0, bt->numel * sizeof(float));
        for (i = 0; i < g->l; i++) {
            int s = g->src[(size_t)t * g->l + i];
            float w = g->D[(size_t)g->layer[t] * g->l + i];
            const float *x;
            if (s < 0 || w == 0.0f) continue;
            x = small->S.params + small->S.tensors[s].offset;
            for (n = 0; n < bt->numel; n++) dst[n] += w * x[n];
        }
    }
}

MOE__IMPL void moe_grow_learner_backward(moe_grow_learner *g, const moe_model *big, const moe_model *small) {
    int t, i;
    for (t = 0; t < g->count; t++) { /* dL/dD[j,i] = sum over layer j's tensors <dL/dW_j, W_i> */
        const moe_tensor *bt = &big->S.tensors[t];
        const float *gw = big->S.grads + bt->offset;
        size_t n;
        if (g->layer[t] < 0) continue;
        for (i = 0; i < g->l; i++) {
            int s = g->src[(size_t)t * g->l + i];
            const float *x;
            double acc = 0.0;
            if (s < 0) continue;
            x = small->S.params + small->S.tensors[s].offset;
            for (n = 0; n < bt->numel; n++) acc += (double)gw[n] * x[n];
            g->gD[(size_t)g->layer[t] * g->l + i] += (float)acc;
        }
    }
}

MOE__IMPL void moe_grow_learner_step(moe_grow_learner *g, float lr) {
    int k, n = g->L * g->l;
    double b1 = 0.9, b2 = 0.999, c1, c2;
    g->step++;
    c1 = 1.0 - pow(b1, (double)g->step);
    c2 = 1.0 - pow(b2, (double)g->step);
    for (k = 0; k < n; k++) {
        g->mD[k] = (float)(b1 * g->mD[k] + (1.0 - b1) * g->gD[k]);
        g->vD[k] = (float)(b2 * g->vD[k] + (1.0 - b2) * (double)g->gD[k] * g->gD[k]);
        g->D[k] -= (float)(lr * (g->mD[k] / c1) / (sqrt(g->vD[k] / c2) + 1e-8));
        g->gD[k] = 0.0f;
    }
}

MOE__IMPL void moe_grow_learner_free(moe_grow_learner *g) {
    MOE_FREE(g->D); MOE_FREE(g->gD); MOE_FREE(g->mD); MOE_FREE(g->vD); MOE_FREE(g->src); MOE_FREE(g->layer);
    g->D = g->gD = g->mD = g->vD = NULL;
    g->src = g->layer = NULL;
}

/* ---- the paper's formulas ------------------------------------------------------------- */

MOE__IMPL double moe_grow_timing_tokens(double N, double C) {
    return pow(10.0, 0.88 * log10(N) + 163.27 / log10(C) - 5.74);
}

MOE__IMPL double moe_grow_factor_fit(double N, double C) {
    return pow(10.0, 1.01 * log10(N) - 29.88 / log10(C) - 7.36);
}

MOE__IMPL double moe_grow_connection_rate(const int *map, int L) {
    int j, kept = 0;
    if (L < 2) return 1.0;
    for (j = 0; j + 1 < L; j++) kept += map[j + 1] == map[j] + 1;
    return (double)kept / (double)(L - 1);
}

MOE__IMPL moe_status moe_grow_flops_at_loss(const double *flops, const double *losses, int n, double loss, double *at,
                                            moe_err *err) {
    int i;
    if (!flops || !losses || !at || n <= 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a loss curve needs at least one point");
    if (losses[0] <= loss) { *at = flops[0]; return MOE_OK; }
    for (i = 1; i < n; i++)
        if (losses[i] <= loss) {
            double f = (losses[i - 1] - loss) / (losses[i - 1] - losses[i]);
            *at = flops[i - 1] + f * (flops[i] - flops[i - 1]);
            return MOE_OK;
        }
    return moe_err_set(err, MOE_ERR_INVALID_ARG, "the curve never reaches the loss %.4f (its lowest point is above)", loss);
}

MOE__IMPL double moe_grow_speedup(double flops_scratch, double flops_grown) { return flops_scratch / flops_grown - 1.0; }
