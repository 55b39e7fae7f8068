/* ============================================================================================
   >>moe:migu  MIGU: update only the output units with large magnitudes
   ============================================================================================
   MIGU (Du et al., arXiv 2406.17245 §3): per linear layer y = x W^T, the magnitude of each
   output unit j over the tokens of one optimisation step decides whether row j of W may be
   updated in that step; the top (1 - T) of the units are, the rest are masked. The statistic:
     MOE_MIGU_L1   a_j = sum_tokens |y_j| / ||y||_1   the paper's per-token L1-normalised form,
                                                       summed instead of averaged
                                                       (the quantile does not care);
     MOE_MIGU_SUM  a_j = sum_tokens |y_j|             the official code's raw sum.
   Units kept: a_j >= the T-quantile of the layer's a (torch.quantile's linear interpolation:
   ties keep more, as the code); with distinct values that is n - ceil(T (n - 1)) units. The
   random control (the code's random_update) keeps n - floor(T n) units drawn uniformly.
   A "linear layer" is one matrix of the model: the q, k and v thirds of the fused attention
   projection separately (they are three nn.Linear in the paper's T5), the attention output,
   the dense FFN's gate, up and down, and every expert's gate, up and down separately (an
   expert sees only its tokens). moe_migu_accumulate reads the outputs the forward left in the
   model's caches after each micro-batch; moe_migu_mask turns the step's statistics into a
   moe_mask (either mode of >>moe:mask) and resets them: statistics never span steps. Whether
   a task is masked at all (the paper trains the first task normally) is the caller's loop.
   Under rotary positions q and k are read after the rotation (the model caches them so); a
   rotation mixes unit pairs, so their magnitudes differ slightly from x W_q^T's. */

typedef enum moe_migu_stat {
    MOE_MIGU_L1 = 0, /* per-token L1-normalised magnitudes (the paper) */
    MOE_MIGU_SUM = 1 /* raw sum of magnitudes (the official code)      */
} moe_migu_stat;

typedef struct moe_migu_config {
    float threshold;    /* T in [0, 1): the fraction of units masked per layer; 0.7     */
    moe_migu_stat stat;
    int random;         /* 1: the random control, same ratio, statistics ignored        */
    int parts;          /* MOE_SEL_* of the matrices watched; MOE_SEL_LINEAR (all)      */
    uint64_t seed;      /* the random control's                                          */
} moe_migu_config;

typedef struct moe_migu {
    moe_migu_config cfg;
    int n_tensors;        /* watched matrices                                             */
    long long *off;       /* (S.count) start of a tensor's units in stat, -1 = not watched */
    int *group;           /* (S.count) units per linear layer of the tensor               */
    double *stat;         /* (units) this step's statistic, a row of the tensor per unit   */
    unsigned char *keep;  /* (units) the last mask                                         */
    double *sorted;       /* (largest group) quantile scratch                              */
    size_t units;
    int micro_batches;    /* accumulated since the last mask                               */
    uint64_t fingerprint; /* the model's layout                                            */
    moe_rng rng;
    moe_err err;
} moe_migu;

MOEDEF moe_migu_config moe_migu_config_default(void);
/* The model must be initialised. T outside [0, 1), an unknown statistic or a selection
   naming no matrix: MOE_ERR_INVALID_ARG and nothing allocated. */
MOEDEF moe_status moe_migu_init(moe_migu *g, const moe_model *m, const moe_migu_config *c);
MOEDEF void moe_migu_free(moe_migu *g);
/* Adds the last forward's output magnitudes (call after each micro-batch's forward). */
MOEDEF moe_status moe_migu_accumulate(moe_migu *g, const moe_model *m);
/* Rows of every watched matrix kept or masked from this step's statistics (or at random),
   written into k (other tensors untouched); then the statistics reset. A step without any
   accumulated forward is an error for the statistic (not for the random control). */
MOEDEF moe_status moe_migu_mask(moe_migu *g, const moe_model *m, moe_mask *k);
MOEDEF void moe_migu_reset(moe_migu *g);

/* @implementation */
/* ============================================================================================
   >>moe:migu
   ============================================================================================ */

MOE__IMPL moe_migu_config moe_migu_config_default(void) {
    moe_migu_config c;
    c.threshold = 0.7f;
    c.stat = MOE_MIGU_L1;
    c.random = 0;
    c.parts = MOE_SEL_LINEAR;
    c.seed = 1;
    return c;
}

MOE__IMPL void moe_migu_free(moe_migu *g) {
    MOE_FREE(g->off); MOE_FREE(g->group); MOE_FREE(g->stat); MOE_FREE(g->keep); MOE_FREE(g->sorted);
    memset(g, 0, sizeof *g);
}

MOE__IMPL moe_status moe_migu_init(moe_migu *g, const moe_model *m, const moe_migu_config *c) {
    int id, widest = 1;
    memset(g, 0, sizeof *g);
    if (!(c->threshold >= 0.0f && c->threshold < 1.0f))
        return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "MIGU threshold T = %g is outside [0, 1)", (double)c->threshold);
    if (c->stat != MOE_MIGU_L1 && c->stat != MOE_MIGU_SUM) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "unknown MIGU statistic %d", (int)c->stat);
    if (!m->blocks || !m->S.params) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU on a model that is not initialised");
    if (moe_model_select(m, c->parts, NULL, 0) == 0) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "the MIGU selection %d names no matrix of this model", c->parts);
    g->cfg = *c;
    g->off = (long long *)moe__calloc((size_t)m->S.count, sizeof(long long));
    g->group = (int *)moe__calloc((size_t)m->S.count, sizeof(int));
    if (!g->off || !g->group) {
        moe_migu_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory");
    }
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        int role = moe__select_role(m, id) & c->parts, rows = (int)(t->numel / (size_t)t->shape[t->ndim - 1]);
        g->off[id] = -1;
        if (!role) continue;
        g->off[id] = (long long)g->units;
        g->group[id] = role == MOE_SEL_QKV ? rows / 3 : t->ndim == 3 ? t->shape[1] : rows;
        if (g->group[id] > widest) widest = g->group[id];
        g->units += (size_t)rows;
        g->n_tensors++;
    }
    g->stat = (double *)moe__calloc(g->units, sizeof(double));
    g->keep = (unsigned char *)moe__calloc(g->units, 1);
    g->sorted = (double *)moe__calloc((size_t)widest, sizeof(double));
    if (!g->stat || !g->keep || !g->sorted) {
        moe_migu_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory for MIGU statistics");
    }
    g->fingerprint = moe_store_fingerprint(&m->S);
    moe_rng_seed(&g->rng, c->seed);
    return MOE_OK;
}

MOE__IMPL void moe_migu_reset(moe_migu *g) {
    if (g->stat) memset(g->stat, 0, g->units * sizeof(double));
    g->micro_batches = 0;
}

/* rows [r0, r1) of outputs h (leading dimension ld, `units` wide; minus `sub` when not NULL)
   into stat */
static void moe__migu_add(double *stat, const float *h, const float *sub, size_t ld, int r0, int r1, int units, int l1) {
    int r, j;
    for (r = r0; r < r1; r++) {
        const float *y = h + (size_t)r * ld, *s = sub ? sub + (size_t)r * ld : NULL;
        double norm = 1.0;
        if (l1) {
            norm = 0.0;
            for (j = 0; j < units; j++) norm += fabs((double)y[j] - (s ? s[j] : 0.0f));
            if (norm <= 0.0) continue;
        }
        for (j = 0; j < units; j++) stat[j] += fabs((double)y[j] - (s ? s[j] : 0.0f)) / norm;
    }
}

/* every expert of a bank: its rows of the grouped caches */
static void moe__migu_bank(moe_migu *g, const moe_store *S, int id, const float *h, const moe_assign *a, int l1) {
    const moe_tensor *t;
    int e, units;
    if (id < 0 || g->off[id] < 0 || !h) return;
    t = &S->tensors[id];
    units = t->shape[1];
    for (e = 0; e < t->shape[0] && e < a->E; e++)
        moe__migu_add(g->stat + g->off[id] + (size_t)e * units, h, NULL, (size_t)units, a->offset[e], a->offset[e + 1], units, l1);
}

MOE__IMPL moe_status moe_migu_accumulate(moe_migu *g, const moe_model *m) {
    int l, N = m->B * m->T, d = m->cfg.d, l1 = g->cfg.stat == MOE_MIGU_L1, k;
    if (!g->stat) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU used before moe_migu_init");
    if (moe_store_fingerprint(&m->S) != g->fingerprint) return moe_err_set(&g->err, MOE_ERR_SHAPE, "MIGU made for another model layout");
    if (N == 0) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU statistics need a forward first");
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        if (g->off[b->id_qkv] >= 0)
            for (k = 0; k < 3; k++) moe__migu_add(g->stat + g->off[b->id_qkv] + (size_t)k * d, b->qkv + (size_t)k * d, NULL, (size_t)3 * d, 0, N, d, l1);
        /* the output projection's output is x2 - x (the residual was added in place) */
        if (g->off[b->id_wo] >= 0) moe__migu_add(g->stat + g->off[b->id_wo], b->x2, b->x, (size_t)d, 0, N, d, l1);
        if (!b->is_moe) {
            int F = m->cfg.d_ff;
            if (g->off[b->id_gate] >= 0) moe__migu_add(g->stat + g->off[b->id_gate], b->hg, NULL, (size_t)F, 0, N, F, l1);
            if (g->off[b->id_up] >= 0) moe__migu_add(g->stat + g->off[b->id_up], b->hu, NULL, (size_t)F, 0, N, F, l1);
            if (g->off[b->id_down] >= 0) moe__migu_add(g->stat + g->off[b->id_down], b->ffn, NULL, (size_t)d, 0, N, d, l1);
        } else {
            const moe_layer *L = &b->moe;
            moe__migu_bank(g, &m->S, L->id_gate, L->hg, &L->routed, l1);
            moe__migu_bank(g, &m->S, L->id_up, L->hu, &L->routed, l1);
            moe__migu_bank(g, &m->S, L->id_down, L->eout, &L->routed, l1);
            if (L->cfg.n_shared > 0) {
                moe__migu_bank(g, &m->S, L->id_s_gate, L->s_hg, &L->shared, l1);
                moe__migu_bank(g, &m->S, L->id_s_up, L->s_hu, &L->shared, l1);
                moe__migu_bank(g, &m->S, L->id_s_down, L->s_eout, &L->shared, l1);
            }
        }
    }
    g->micro_batches++;
    return MOE_OK;
}

static int moe__migu_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* one linear layer's keep vector from its statistics (or at random) */
static void moe__migu_group(moe_migu *g, const double *a, unsigned char *keep, int n) {
    double T = (double)g->cfg.threshold;
    int j;
    if (g->cfg.random) {
        int want = n - (int)floor(T * n), i;
        int *idx = (int *)g->sorted; /* n ints fit in n doubles */
        for (j = 0; j < n; j++) { idx[j] = j; keep[j] = 0; }
        for (i = 0; i < want; i++) { /* partial Fisher-Yates: the first `want` of a shuffle */
            int r = i + moe_rng_below(&g->rng, n - i), tmp = idx[i];
            idx[i] = idx[r]; idx[r] = tmp;
            keep[idx[i]] = 1;
        }
    } else {
        double pos, q;
        int lo;
        memcpy(g->sorted, a, (size_t)n * sizeof(double));
        qsort(g->sorted, (size_t)n, sizeof(double), moe__migu_cmp);
        pos = T * (n - 1);
        lo = (int)floor(pos);
        q = g->sorted[lo] + (lo + 1 < n ? (pos - lo) * (g->sorted[lo + 1] - g->sorted[lo]) : 0.0);
        for (j = 0; j < n; j++) keep[j] = (unsigned char)(a[j] >= q);
    }
}

MOE__IMPL moe_status moe_migu_mask(moe_migu *g, const moe_model *m, moe_mask *k) {
    int id;
    if (!g->stat) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU used before moe_migu_init");
    if (moe_store_fingerprint(&m->S) != g->fingerprint) return moe_err_set(&g->err, MOE_ERR_SHAPE, "MIGU made for another model layout");
    if (moe__mask_check(k, &m->S) != MOE_OK) return moe_err_set(&g->err, k->err.status, "%s", k->err.msg);
    if (!g->cfg.random && g->micro_batches == 0) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU mask without statistics: accumulate after each forward");
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        size_t rows, r;
        if (g->off[id] < 0) continue;
        rows = t->numel / (size_t)t->shape[t->ndim - 1];
        for (r = 0; r < rows; r += (size_t)g->group[id])
            moe__migu_group(g, g->stat + g->off[id] + r, g->keep + g->off[id] + r, g->group[id]);
        moe_mask_set_rows(k, &m->S, id, g->keep + g->off[id]);
    }
    moe_migu_reset(g);
    return MOE_OK;
}
