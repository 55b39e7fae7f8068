/* ============================================================================================
   >>rwd:head  reward heads on feature rows, Bradley-Terry loss and training
   ============================================================================================
   linear: r = x . w1^T                             w1 (1, d_in)
   MLP:    r = act(x . w1^T + b1) . w2^T            w1 (H, d_in), b1 (H), w2 (1, H)
   No output bias (as Hugging Face's reward score head): it cancels in every BT margin, and
   Adam would only amplify the rounding noise of its ~0 gradient.
   The tensors live in a caller's moe_store (prefix + "w1" ...); weights decay, biases do not.
   BT loss of B pairs with margins m and centering coefficient c: the reward-model loss of
   InstructGPT (Ouyang et al., arXiv 2203.02155) as TRL's RewardTrainer computes it
   (github.com/huggingface/trl, trl/trainer/reward_trainer.py), whose centering term is from
   Eisenstein et al. (arXiv 2312.09244); note it squares the SUM of a pair's two rewards:
     L = -(1/B) sum log sigmoid(r_w - r_l - m) + c (1/B) sum (r_w + r_l)^2
   Pairs are batched as 2B rows: B chosen rows, then B rejected rows. */

typedef enum rwd_head_kind { RWD_HEAD_LINEAR = 0, RWD_HEAD_MLP = 1 } rwd_head_kind;

typedef struct rwd_head_config {
    int kind;       /* rwd_head_kind; RWD_HEAD_LINEAR                                      */
    int d_in;       /* feature width (required)                                           */
    int d_hidden;   /* MLP hidden width H; 64                                              */
    int activation; /* moe_activation of the MLP; MOE_ACT_GELU                              */
    int max_rows;   /* rows one forward may take (activations are sized for it); 512        */
    float init_std; /* weights ~ N(0, init_std^2), biases 0; 0.02                          */
} rwd_head_config;

typedef struct rwd_head {
    rwd_head_config cfg;
    int id_w1, id_b1, id_w2;        /* tensor ids in the store (-1 where absent)              */
    float *pre;                     /* (max_rows, H) MLP pre-activation, cached by forward     */
    float *hid;                     /* (max_rows, H) MLP activation, cached by forward         */
    float *dhid;                    /* (max_rows, 2H) backward scratch                         */
    moe_work work;                  /* the matmuls' scratch for max_rows, sized at init        */
} rwd_head;

RWDDEF rwd_head_config rwd_head_config_default(void);
/* declares the head's tensors in s (before moe_store_alloc) and allocates its activations and
   scratch (forward and backward then allocate nothing); on failure h is freeable */
RWDDEF moe_status rwd_head_init(rwd_head *h, const rwd_head_config *c, moe_store *s, const char *prefix, moe_err *err);
RWDDEF void rwd_head_init_weights(rwd_head *h, moe_store *s, moe_rng *rng);
RWDDEF void rwd_head_free(rwd_head *h);
/* r (rows) = head(x (rows, d_in)), rows <= max_rows; caches activations for backward */
RWDDEF void rwd_head_forward(rwd_head *h, const moe_store *s, float *r, const float *x, int rows);
/* ACCUMULATES parameter gradients into s->grads and, if dx != NULL, dx (rows, d_in) += dL/dx,
   given dr (rows) = dL/dr; uses the caches of the last forward (same x, same rows). */
RWDDEF void rwd_head_backward(rwd_head *h, moe_store *s, float *dx, const float *dr, const float *x, int rows);
/* scores of any number of rows (chunks of max_rows), as doubles for the metrics */
RWDDEF void rwd_head_score(rwd_head *h, const moe_store *s, double *r, const float *x, size_t rows);

/* L of B pairs (margin may be NULL: 0); *n_correct (may be NULL) counts r_w > r_l */
RWDDEF double rwd_bt_loss_forward(const float *r_w, const float *r_l, const float *margin, int B,
                                  float center, int *n_correct);
/* dr_w, dr_l (B) += dL/dr_w, dL/dr_l */
RWDDEF void rwd_bt_loss_backward(float *dr_w, float *dr_l, const float *r_w, const float *r_l,
                                 const float *margin, int B, float center);

typedef struct rwd_train_config {
    int epochs;         /* passes over the pairs; 10                                         */
    int batch;          /* pairs per step (2 * batch <= the head's max_rows); 32               */
    float lr;           /* peak learning rate (main expert for PoE); 3e-3                      */
    float lr_min;       /* cosine floor at the last step; 3e-4                                 */
    int warmup;         /* linear warm-up steps; 0                                             */
    float weight_decay; /* AdamW decoupled decay of the weights; 0.01                          */
    float center;       /* centering coefficient c (TRL recommends 0.01); 0                     */
    float clip;         /* global gradient-norm clip, 0 = off; 0                               */
    uint64_t seed;      /* shuffling and PoE noise; 1                                          */
    float bias_lr;      /* PoE: the bias expert's peak learning rate (larger, as the paper); 1e-2 */
    float noise_std;    /* PoE: s of the N(0, s^2) noise on the bias expert's inputs; 0.1, about
                           one hashed word feature (rwd_featurize scales them by 1/sqrt(words)) */
    int noise_cols;     /* PoE: noise goes to the first noise_cols input columns (the hashed
                           words), < 0 = all; -1. See the PoE section for why length stays clean */
} rwd_train_config;

typedef struct rwd_train_stats {
    double loss;      /* mean loss over the last epoch (PoE: of the product)                  */
    double accuracy;  /* training accuracy over the last epoch (PoE: of the product)          */
    long long steps;  /* optimizer steps taken                                                */
} rwd_train_stats;

RWDDEF rwd_train_config rwd_train_config_default(void);
/* Trains h (its store s allocated with optimizer moments) on n pairs of feature rows x_w, x_l
   (n, d_in) with optional margins (n): shuffled mini-batches, AdamW, warm-up + cosine. */
RWDDEF moe_status rwd_bt_train(rwd_head *h, moe_store *s, const float *x_w, const float *x_l,
                               const float *margin, size_t n, const rwd_train_config *tc,
                               rwd_train_stats *stats, moe_err *err);
#ifndef MOE_NO_STDIO
/* one checkpoint format (moe.h): a head's parameters with its shape (kind, d_in, d_hidden,
   activation) as the config blob. Load needs a head set up with the same shape; it checks. */
RWDDEF moe_status rwd_head_save(const rwd_head *h, const moe_store *s, const char *path, moe_err *err);
RWDDEF moe_status rwd_head_load(rwd_head *h, moe_store *s, const char *path, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>rwd:head
   ============================================================================================ */

RWD__IMPL rwd_head_config rwd_head_config_default(void) {
    rwd_head_config c;
    c.kind = RWD_HEAD_LINEAR;
    c.d_in = 0;
    c.d_hidden = 64;
    c.activation = MOE_ACT_GELU;
    c.max_rows = 512;
    c.init_std = 0.02f;
    return c;
}

RWD__IMPL moe_status rwd_head_init(rwd_head *h, const rwd_head_config *c, moe_store *s, const char *prefix, moe_err *err) {
    char name[MOE_NAME_LEN];
    int mlp, H;
    memset(h, 0, sizeof *h);
    h->id_w1 = h->id_b1 = h->id_w2 = -1;
    if (!c || !s || !prefix) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_head_init needs a config, a store and a prefix");
    mlp = c->kind == RWD_HEAD_MLP;
    if (c->kind != RWD_HEAD_LINEAR && !mlp) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown head kind %d", c->kind);
    if (c->d_in < 1 || (mlp && c->d_hidden < 1)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "head widths must be >= 1 (d_in %d, d_hidden %d)", c->d_in, c->d_hidden);
    if (c->max_rows < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "max_rows must be >= 2, got %d", c->max_rows);
    if (c->activation < MOE_ACT_SILU || c->activation > MOE_ACT_RELU) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown activation %d", c->activation);
    if (!(c->init_std >= 0.0f) || !isfinite(c->init_std)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "init_std must be >= 0, got %g", (double)c->init_std);
    if (strlen(prefix) + 3 > sizeof name) return moe_err_set(err, MOE_ERR_INVALID_ARG, "tensor prefix '%s' is too long", prefix);
    h->cfg = *c;
    if (!mlp) h->cfg.d_hidden = 0; /* canonical, so equal heads have equal configs */
    H = mlp ? c->d_hidden : 1;
    sprintf(name, "%sw1", prefix);
    h->id_w1 = moe_store_add(s, name, MOE_TENSOR_DECAY, H, c->d_in, 0, 0);
    if (mlp) {
        sprintf(name, "%sb1", prefix);
        h->id_b1 = moe_store_add(s, name, 0, H, 0, 0, 0);
        sprintf(name, "%sw2", prefix);
        h->id_w2 = moe_store_add(s, name, MOE_TENSOR_DECAY, 1, H, 0, 0);
    }
    if (h->id_w1 < 0 || (mlp && (h->id_b1 < 0 || h->id_w2 < 0)))
        return moe_err_set(err, s->err.status != MOE_OK ? s->err.status : MOE_ERR_STATE, "declaring the head's tensors failed: %s", s->err.msg);
    if (mlp) {
        size_t rh = (size_t)c->max_rows * (size_t)H;
        h->pre = (float *)moe__calloc(4 * rh, sizeof(float)); /* pre, hid, dhid (2 rh) in one block */
        if (!h->pre) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the head's activations");
        h->hid = h->pre + rh;
        h->dhid = h->hid + rh;
    }
    { /* linear: (d_in -> 1); MLP: (d_in -> H), (H -> 1) */
        int nt = moe_num_threads();
        size_t need = moe_matmul_work_floats(c->max_rows, c->d_in, H, nt), w2 = moe_matmul_work_floats(c->max_rows, H, 1, nt);
        if (mlp && w2 > need) need = w2;
        if (moe_work_alloc(&h->work, need, nt) != MOE_OK) {
            rwd_head_free(h);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the head's matmul scratch");
        }
    }
    return MOE_OK;
}

RWD__IMPL void rwd_head_init_weights(rwd_head *h, moe_store *s, moe_rng *rng) {
    int ids[2], k;
    ids[0] = h->id_w1;
    ids[1] = h->id_w2;
    for (k = 0; k < 2; k++) {
        float *w = moe_store_param(s, ids[k]);
        size_t i;
        if (!w) continue;
        for (i = 0; i < s->tensors[ids[k]].numel; i++) w[i] = h->cfg.init_std * moe_rng_normal(rng);
    }
}

RWD__IMPL void rwd_head_free(rwd_head *h) {
    MOE_FREE(h->pre);
    moe_work_free(&h->work);
    memset(h, 0, sizeof *h);
}

RWD__IMPL void rwd_head_forward(rwd_head *h, const moe_store *s, float *r, const float *x, int rows) {
    int d = h->cfg.d_in, H = h->cfg.d_hidden;
    MOE_ASSERT(rows <= h->cfg.max_rows);
    if (h->cfg.kind == RWD_HEAD_LINEAR) {
        moe_matmul_forward(r, x, moe_store_param(s, h->id_w1), NULL, rows, d, 1, &h->work);
        return;
    }
    moe_matmul_forward(h->pre, x, moe_store_param(s, h->id_w1), moe_store_param(s, h->id_b1), rows, d, H, &h->work);
    moe_activation_forward(h->hid, h->pre, (size_t)rows * (size_t)H, (moe_activation)h->cfg.activation);
    moe_matmul_forward(r, h->hid, moe_store_param(s, h->id_w2), NULL, rows, H, 1, &h->work);
}

RWD__IMPL void rwd_head_backward(rwd_head *h, moe_store *s, float *dx, const float *dr, const float *x, int rows) {
    int d = h->cfg.d_in, H = h->cfg.d_hidden;
    size_t rh = (size_t)rows * (size_t)H;
    float *dhid, *dpre;
    if (h->cfg.kind == RWD_HEAD_LINEAR) { /* no hidden buffers: h->dhid is NULL */
        moe_matmul_backward(dx, moe_store_grad(s, h->id_w1), NULL, dr, x, moe_store_param(s, h->id_w1), rows, d, 1, &h->work);
        return;
    }
    dhid = h->dhid;
    dpre = h->dhid + (size_t)h->cfg.max_rows * (size_t)H;
    memset(dhid, 0, rh * sizeof(float)); /* activation gradients are per call, not accumulated */
    memset(dpre, 0, rh * sizeof(float));
    moe_matmul_backward(dhid, moe_store_grad(s, h->id_w2), NULL, dr, h->hid, moe_store_param(s, h->id_w2), rows, H, 1, &h->work);
    moe_activation_backward(dpre, dhid, h->pre, rh, (moe_activation)h->cfg.activation);
    moe_matmul_backward(dx, moe_store_grad(s, h->id_w1), moe_store_grad(s, h->id_b1), dpre, x,
                        moe_store_param(s, h->id_w1), rows, d, H, &h->work);
}

RWD__IMPL void rwd_head_score(rwd_head *h, const moe_store *s, double *r, const float *x, size_t rows) {
    float buf[256];
    size_t i = 0, j;
    while (i < rows) {
        int m = (int)(rows - i < 256 ? rows - i : 256);
        if (m > h->cfg.max_rows) m = h->cfg.max_rows;
        rwd_head_forward(h, s, buf, x + i * (size_t)h->cfg.d_in, m);
        for (j = 0; j < (size_t)m; j++) r[i + j] = buf[j];
        i += (size_t)m;
    }
}

/* -log sigmoid(z) = softplus(-z), and sigmoid(-z), both without overflow */
static double rwd__nll_sigmoid(double z) { return (z > 0 ? 0.0 : -z) + log1p(exp(-fabs(z))); }
static double rwd__sigmoid_neg(double z) {
    double e = exp(-fabs(z));
    return z >= 0 ? e / (1.0 + e) : 1.0 / (1.0 + e);
}

RWD__IMPL double rwd_bt_loss_forward(const float *r_w, const float *r_l, const float *margin, int B,
                                     float center, int *n_correct) {
    double loss = 0.0;
    int i, ok = 0;
    for (i = 0; i < B; i++) {
        double z = (double)r_w[i] - (double)r_l[i] - (margin ? (double)margin[i] : 0.0), sum = (double)r_w[i] + (double)r_l[i];
        loss += rwd__nll_sigmoid(z) + (double)center * sum * sum;
        ok += r_w[i] > r_l[i];
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL void rwd_bt_loss_backward(float *dr_w, float *dr_l, const float *r_w, const float *r_l,
                                    const float *margin, int B, float center) {
    int i;
    for (i = 0; i < B; i++) {
        double z = (double)r_w[i] - (double)r_l[i] - (margin ? (double)margin[i] : 0.0);
        double g = -rwd__sigmoid_neg(z) / B, gc = 2.0 * (double)center * ((double)r_w[i] + (double)r_l[i]) / B;
        dr_w[i] += (float)(g + gc);
        dr_l[i] += (float)(-g + gc);
    }
}

RWD__IMPL rwd_train_config rwd_train_config_default(void) {
    rwd_train_config c;
    c.epochs = 10;
    c.batch = 32;
    c.lr = 3e-3f;
    c.lr_min = 3e-4f;
    c.warmup = 0;
    c.weight_decay = 0.01f;
    c.center = 0.0f;
    c.clip = 0.0f;
    c.seed = 1;
    c.bias_lr = 1e-2f;
    c.noise_std = 0.1f;
    c.noise_cols = -1;
    return c;
}

static moe_status rwd__check_rows(const float *x, size_t n, int d, const char *what, moe_err *err) {
    size_t i, m = n * (size_t)d;
    if (!x) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: missing feature rows", what);
    for (i = 0; i < m; i++)
        if (!isfinite(x[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: pair %zu, feature %zu is not finite", what, i / (size_t)d, i % (size_t)d);
    return MOE_OK;
}

/* gathers pairs idx[0..B) as 2B rows: B chosen, then B rejected */
static void rwd__gather(float *X, const float *x_w, const float *x_l, const size_t *idx, int B, int d) {
    int i;
    for (i = 0; i < B; i++) {
        memcpy(X + (size_t)i * d, x_w + idx[i] * (size_t)d, (size_t)d * sizeof(float));
        memcpy(X + (size_t)(B + i) * d, x_l + idx[i] * (size_t)d, (size_t)d * sizeof(float));
    }
}

/* The one training loop: Bradley-Terry when bias == NULL, Product of Experts otherwise. */
static moe_status rwd__train(rwd_head *mh, moe_store *sm, rwd_head *bh, moe_store *sb, const float *x_w,
                             const float *x_l, const float *xb_w, const float *xb_l, const float *margin,
                             size_t n, const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    int d = mh->cfg.d_in, db = bh ? bh->cfg.d_in : 0, B, e;
    size_t i, *perm;
    float *X, *XB, *r, *rb, *dr, *drb, *mg;
    long long steps_per_epoch, total, step = 0;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_rng rng;
    moe_status st = MOE_OK;
    if (stats) memset(stats, 0, sizeof *stats);
    if (!tc || n == 0 || n > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "training needs a config and 1 .. %d pairs (got %zu)", INT_MAX, n);
    if (tc->epochs < 1 || tc->batch < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "epochs and batch must be >= 1 (got %d, %d)", tc->epochs, tc->batch);
    if (2 * tc->batch > mh->cfg.max_rows || (bh && 2 * tc->batch > bh->cfg.max_rows))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "a batch of %d pairs is %d rows, more than the head's max_rows", tc->batch, 2 * tc->batch);
    if (!(tc->lr > 0.0f) || !(tc->lr_min >= 0.0f) || !isfinite(tc->lr) || !isfinite(tc->lr_min) || tc->warmup < 0 || !(tc->weight_decay >= 0.0f) ||
        !isfinite(tc->center) || !(tc->clip >= 0.0f) || (bh && (!(tc->bias_lr > 0.0f) || !isfinite(tc->bias_lr) || !(tc->noise_std >= 0.0f) || !isfinite(tc->noise_std))))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "learning rates must be > 0 and finite; warm-up, decay, clip and noise >= 0");
    if (!sm->adam_m || (bh && !sb->adam_m)) return moe_err_set(err, MOE_ERR_STATE, "allocate the store with optimizer moments (moe_store_alloc(s, 1)) before training");
    if ((st = rwd__check_rows(x_w, n, d, "chosen", err)) || (st = rwd__check_rows(x_l, n, d, "rejected", err))) return st;
    if (bh && ((st = rwd__check_rows(xb_w, n, db, "bias chosen", err)) || (st = rwd__check_rows(xb_l, n, db, "bias rejected", err)))) return st;
    if (margin && (st = rwd__check_rows(margin, n, 1, "margin", err))) return st;
    B = tc->batch < (int)n ? tc->batch : (int)n;
    perm = (size_t *)MOE_MALLOC(n * sizeof(size_t));
    X = (float *)moe__calloc((size_t)2 * B * (size_t)(d + db) + (size_t)9 * B, sizeof(float));
    if (!perm || !X) { MOE_FREE(perm); MOE_FREE(X); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for training batches"); }
    XB = X + (size_t)2 * B * d;
    r = XB + (size_t)2 * B * db; rb = r + 2 * B; dr = rb + 2 * B; drb = dr + 2 * B; mg = drb + 2 * B;
    opt.weight_decay = tc->weight_decay;
    moe_rng_seed(&rng, tc->seed);
    for (i = 0; i < n; i++) perm[i] = i;
    steps_per_epoch = ((long long)n + B - 1) / B;
    total = steps_per_epoch * tc->epochs;
    for (e = 0; e < tc->epochs && st == MOE_OK; e++) {
        double loss_sum = 0.0;
        long long correct = 0;
        size_t start;
        for (i = n - 1; i > 0; i--) { /* Fisher-Yates, seeded */
            size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (start = 0; start < n && st == MOE_OK; start += (size_t)B, step++) {
            int b = (int)(n - start < (size_t)B ? n - start : (size_t)B), k, ok = 0;
            float lr = moe_lr_cosine(step, tc->warmup, total, tc->lr, tc->lr_min);
            rwd__gather(X, x_w, x_l, perm + start, b, d);
            rwd_head_forward(mh, sm, r, X, 2 * b);
            memset(dr, 0, (size_t)2 * b * sizeof(float));
            memset(drb, 0, (size_t)2 * b * sizeof(float));
            moe_store_zero_grad(sm);
            if (bh) {
                rwd__gather(XB, xb_w, xb_l, perm + start, b, db);
                for (k = 0; k < 2 * b * db; k++)
                    if (tc->noise_cols < 0 || k % db < tc->noise_cols) XB[k] += tc->noise_std * moe_rng_normal(&rng);
                rwd_head_forward(bh, sb, rb, XB, 2 * b);
                loss_sum += b * rwd_poe_loss_forward(r, r + b, rb, rb + b, b, &ok);
                rwd_poe_loss_backward(dr, dr + b, drb, drb + b, r, r + b, rb, rb + b, b);
                moe_store_zero_grad(sb);
                rwd_head_backward(bh, sb, NULL, drb, XB, 2 * b);
            } else {
                if (margin)
                    for (k = 0; k < b; k++) mg[k] = margin[perm[start + (size_t)k]];
                loss_sum += b * rwd_bt_loss_forward(r, r + b, margin ? mg : NULL, b, tc->center, &ok);
                rwd_bt_loss_backward(dr, dr + b, r, r + b, margin ? mg : NULL, b, tc->center);
            }
            rwd_head_backward(mh, sm, NULL, dr, X, 2 * b);
            correct += ok;
            if (tc->clip > 0.0f) moe_clip_grad_norm(sm, tc->clip);
            st = moe_adamw_step(sm, &opt, lr, step + 1);
            if (bh && st == MOE_OK) { /* same schedule, scaled to the bias expert's peak rate */
                if (tc->clip > 0.0f) moe_clip_grad_norm(sb, tc->clip);
                st = moe_adamw_step(sb, &opt, lr * (tc->bias_lr / tc->lr), step + 1);
            }
        }
        if (stats) {
            stats->loss = loss_sum / (double)n;
            stats->accuracy = (double)correct / (double)n;
            stats->steps = step;
        }
    }
    if (st != MOE_OK) moe_err_set(err, st, "optimizer step failed: %s", bh && sb->err.status ? sb->err.msg : sm->err.msg);
    MOE_FREE(perm);
    MOE_FREE(X);
    return st;
}

RWD__IMPL moe_status rwd_bt_train(rwd_head *h, moe_store *s, const float *x_w, const float *x_l,
                                  const float *margin, size_t n, const rwd_train_config *tc,
                                  rwd_train_stats *stats, moe_err *err) {
    return rwd__train(h, s, NULL, NULL, x_w, x_l, NULL, NULL, margin, n, tc, stats, err);
}

#ifndef MOE_NO_STDIO
/* the checkpoint's config blob: what a head's shape is, as little-endian int32 */
static void rwd__head_blob(int32_t blob[6], const rwd_head *h) {
    blob[0] = 0x48445752; /* "RWDH" */
    blob[1] = 1;          /* blob version */
    blob[2] = h->cfg.kind;
    blob[3] = h->cfg.d_in;
    blob[4] = h->cfg.d_hidden;
    blob[5] = h->cfg.activation;
}

RWD__IMPL moe_status rwd_head_save(const rwd_head *h, const moe_store *s, const char *path, moe_err *err) {
    int32_t blob[6];
    rwd__head_blob(blob, h);
    return moe_checkpoint_save(path, s, 0, 0, blob, sizeof blob, NULL, 0, err);
}

RWD__IMPL moe_status rwd_head_load(rwd_head *h, moe_store *s, const char *path, moe_err *err) {
    int32_t blob[6];
    rwd__head_blob(blob, h);
    /* the store's fingerprint checks the tensor shapes; the blob also checks the activation */
    return moe_checkpoint_load(path, s, NULL, blob, NULL, sizeof blob, NULL, 0, err);
}
#endif

