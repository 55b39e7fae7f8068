/* ============================================================================================
   >>rwd:ssrm  semi-supervised reward modelling by iterative self-training (SSRM)
   ============================================================================================
   SSRM (He et al., arXiv 2409.06903, section 3): train on the labelled pairs D_l; then each
   round (1) pseudo-label every unlabelled pair (a, b) with the current model, (2) keep it if its
   confidence max(P, 1 - P) is above the threshold (0.8 in the released script, strictly
   greater), (3) fine-tune on D_l plus the kept pairs, continuing from the current model.
   With a scalar reward model P(a > b) = sigmoid(r(a) - r(b)). The loop drives any model through
   rwd_pair_model: the linear and MLP heads and ArmoRM's gate have ready-made adapters below.
   Where the released script differs: it keeps the confident pairs but trains them in the data
   set's own chosen/rejected order, i.e. with the true label even when the pseudo-label is wrong
   (which is not semi-supervised). The default trains on the pseudo-labels, as the paper says;
   keep_true_order = 1 reproduces the script (it needs the true labels). */

typedef struct rwd_pair_model {
    void *ctx;
    /* p (count) = P(side a of pair idx[i] is preferred), i < count */
    moe_status (*prob)(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err);
    /* train (round 0: from the start; later rounds: continue) on pairs idx with a_wins[i] = 1
       when side a is the preferred one */
    moe_status (*train)(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err);
    /* optional: a number recorded after every round (e.g. held-out accuracy); NULL = none */
    double (*evaluate)(void *eval_ctx);
    void *eval_ctx;
} rwd_pair_model;

typedef struct rwd_ssrm_config {
    int rounds;          /* self-training rounds after the supervised start; 3                */
    double threshold;    /* keep a pseudo-label when max(P, 1-P) > threshold, in (0.5, 1]; 0.8 */
    int keep_true_order; /* 1: the released script's variant (needs the true labels); 0        */
} rwd_ssrm_config;

typedef struct rwd_ssrm_round {
    int round;              /* 0 = supervised on the labelled pairs only                      */
    size_t trained;         /* pairs trained on this round (labelled + kept)                   */
    size_t kept;            /* confident pseudo-labelled pairs (0 in round 0)                   */
    double kept_fraction;   /* kept / unlabelled                                              */
    double mean_confidence; /* mean max(P, 1-P) over the unlabelled pairs                      */
    double pseudo_accuracy; /* pseudo-labels that match the true label, all unlabelled (NaN if
                               the truth is not given)                                          */
    double kept_accuracy;   /* the same over the kept pairs (NaN if none or no truth)           */
    double eval;            /* evaluate() after this round's training (NaN without one)         */
} rwd_ssrm_round;

RWDDEF rwd_ssrm_config rwd_ssrm_config_default(void);
/* Runs round 0 and c->rounds rounds; stats (rounds + 1, may be NULL). lab (n_lab) pair ids with
   labels lab_a_wins; unl (n_unl) pair ids, unl_truth (n_unl) their hidden labels or NULL. */
RWDDEF moe_status rwd_ssrm_run(rwd_pair_model *m, const size_t *lab, const unsigned char *lab_a_wins, size_t n_lab,
                               const size_t *unl, const unsigned char *unl_truth, size_t n_unl,
                               const rwd_ssrm_config *c, rwd_ssrm_round *stats, moe_err *err);

/* Adapter: a reward head (linear or MLP) on pairs of feature rows x_a, x_b (n, d_in). Each
   training call runs rwd_bt_train on the gathered pairs (its own cosine schedule, continuing
   from the current weights). */
typedef struct rwd_ssrm_head {
    rwd_head *head;
    moe_store *store;
    const float *x_a, *x_b;  /* (n, head->cfg.d_in) the two sides of every pair in the pool */
    size_t n;
    rwd_train_config tc;     /* per-round training */
    int min_steps;           /* > 0: more epochs when a round's pairs make fewer optimizer
                                steps than this (a small labelled set still converges)       */
    float *buf;              /* owned gather buffer; rwd_ssrm_head_free releases it          */
    size_t buf_pairs;
} rwd_ssrm_head;
RWDDEF rwd_pair_model rwd_ssrm_head_model(rwd_ssrm_head *h);
RWDDEF void rwd_ssrm_head_free(rwd_ssrm_head *h);

/* Adapter: ArmoRM's gate (stage 2) on prompt rows x (n, d_in) and the rewards it mixes of the
   two sides r_a, r_b (n, K) (rwd_armo_mixed_rewards). */
typedef struct rwd_ssrm_gate {
    rwd_gate *gate;
    moe_store *store;
    const float *x;
    const double *r_a, *r_b;
    size_t n;
    rwd_gate_train_config tc;
    float *xbuf;             /* owned gather buffers; rwd_ssrm_gate_free releases them       */
    double *rbuf;
    size_t buf_pairs;
} rwd_ssrm_gate;
RWDDEF rwd_pair_model rwd_ssrm_gate_model(rwd_ssrm_gate *g);
RWDDEF void rwd_ssrm_gate_free(rwd_ssrm_gate *g);

/* @implementation */
/* ============================================================================================
   >>rwd:ssrm
   ============================================================================================ */

RWD__IMPL rwd_ssrm_config rwd_ssrm_config_default(void) {
    rwd_ssrm_config c;
    c.rounds = 3;
    c.threshold = 0.8;
    c.keep_true_order = 0;
    return c;
}

RWD__IMPL moe_status rwd_ssrm_run(rwd_pair_model *m, const size_t *lab, const unsigned char *lab_a_wins, size_t n_lab,
                                  const size_t *unl, const unsigned char *unl_truth, size_t n_unl,
                                  const rwd_ssrm_config *c, rwd_ssrm_round *stats, moe_err *err) {
    size_t *idx, i, total;
    unsigned char *wins;
    double *p;
    int t;
    moe_status st = MOE_OK;
    rwd_ssrm_config def = rwd_ssrm_config_default();
    if (!c) c = &def;
    if (!m || !m->prob || !m->train) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM needs a pair model with prob and train");
    if (!(c->threshold > 0.5 && c->threshold <= 1.0))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the confidence threshold must be in (0.5, 1]: max(P, 1-P) is never below 0.5, so %g would keep every pair", c->threshold);
    if (c->rounds < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rounds must be >= 0, got %d", c->rounds);
    if (n_lab == 0 || !lab || !lab_a_wins) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM starts from labelled pairs: none given");
    if (n_unl == 0 || !unl) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM needs unlabelled pairs to pseudo-label: none given (train on the labelled pairs alone instead)");
    if (c->keep_true_order && !unl_truth) return moe_err_set(err, MOE_ERR_INVALID_ARG, "keep_true_order (the released script's variant) needs the unlabelled pairs' true labels");
    total = n_lab + n_unl;
    idx = (size_t *)MOE_MALLOC(total * sizeof(size_t));
    wins = (unsigned char *)MOE_MALLOC(total);
    p = (double *)MOE_MALLOC(n_unl * sizeof(double));
    if (!idx || !wins || !p) { MOE_FREE(idx); MOE_FREE(wins); MOE_FREE(p); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    memcpy(idx, lab, n_lab * sizeof(size_t));
    for (i = 0; i < n_lab; i++) wins[i] = lab_a_wins[i] != 0;
    for (t = 0; t <= c->rounds && st == MOE_OK; t++) {
        rwd_ssrm_round r;
        size_t kept = 0, right = 0, kept_right = 0;
        double conf_sum = 0.0;
        memset(&r, 0, sizeof r);
        r.round = t;
        r.pseudo_accuracy = r.kept_accuracy = r.mean_confidence = NAN;
        if (t > 0) {
            if ((st = m->prob(m->ctx, p, unl, n_unl, err)) != MOE_OK) break;
            for (i = 0; i < n_unl; i++) {
                double q = p[i], conf = q > 0.5 ? q : 1.0 - q;
                unsigned char a_wins = q > 0.5; /* P = 0.5 is a tie: confidence 0.5, never kept */
                if (!isfinite(q) || q < 0.0 || q > 1.0) { st = moe_err_set(err, MOE_ERR_INVALID_ARG, "the model's probability for unlabelled pair %zu is %g, not in [0, 1]", unl[i], q); break; }
                conf_sum += conf;
                if (unl_truth) right += a_wins == (unl_truth[i] != 0);
                if (conf > c->threshold) {
                    idx[n_lab + kept] = unl[i];
                    wins[n_lab + kept] = c->keep_true_order ? (unl_truth[i] != 0) : a_wins;
                    if (unl_truth) kept_right += a_wins == (unl_truth[i] != 0);
                    kept++;
                }
            }
            if (st != MOE_OK) break;
            r.kept = kept;
            r.kept_fraction = (double)kept / (double)n_unl;
            r.mean_confidence = conf_sum / (double)n_unl;
            if (unl_truth) {
                r.pseudo_accuracy = (double)right / (double)n_unl;
                r.kept_accuracy = kept ? (double)kept_right / (double)kept : NAN;
            }
        }
        r.trained = n_lab + kept;
        if ((st = m->train(m->ctx, idx, wins, n_lab + kept, t, err)) != MOE_OK) break;
        r.eval = m->evaluate ? m->evaluate(m->eval_ctx) : NAN;
        if (stats) stats[t] = r;
    }
    MOE_FREE(idx);
    MOE_FREE(wins);
    MOE_FREE(p);
    return st;
}

/* ---- the head adapter ---- */

static moe_status rwd__ssrm_head_prob(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err) {
    rwd_ssrm_head *h = (rwd_ssrm_head *)ctx;
    size_t d = (size_t)h->head->cfg.d_in, i;
    float buf[2 * 128], *X;
    int chunk = h->head->cfg.max_rows / 2 < 128 ? h->head->cfg.max_rows / 2 : 128;
    if (chunk < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head's max_rows is below 2");
    X = (float *)MOE_MALLOC(2 * (size_t)chunk * d * sizeof(float));
    if (!X) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < count; i += (size_t)chunk) {
        int b = (int)(count - i < (size_t)chunk ? count - i : (size_t)chunk), j;
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            if (q >= h->n) { MOE_FREE(X); return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, h->n); }
            memcpy(X + (size_t)j * d, h->x_a + q * d, d * sizeof(float));
            memcpy(X + (size_t)(b + j) * d, h->x_b + q * d, d * sizeof(float));
        }
        rwd_head_forward(h->head, h->store, buf, X, 2 * b);
        for (j = 0; j < b; j++) p[i + (size_t)j] = 1.0 / (1.0 + exp(-((double)buf[j] - (double)buf[b + j])));
    }
    MOE_FREE(X);
    return MOE_OK;
}

static moe_status rwd__ssrm_head_train(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err) {
    rwd_ssrm_head *h = (rwd_ssrm_head *)ctx;
    size_t d = (size_t)h->head->cfg.d_in, i;
    float *xw, *xl;
    rwd_train_config tc = h->tc;
    if (count > h->buf_pairs) {
        MOE_FREE(h->buf);
        h->buf = (float *)MOE_MALLOC(2 * count * d * sizeof(float));
        h->buf_pairs = h->buf ? count : 0;
        if (!h->buf) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu training pairs", count);
    }
    xw = h->buf;
    xl = h->buf + count * d;
    for (i = 0; i < count; i++) {
        size_t q = idx[i];
        if (q >= h->n) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, h->n);
        memcpy(xw + i * d, (a_wins[i] ? h->x_a : h->x_b) + q * d, d * sizeof(float));
        memcpy(xl + i * d, (a_wins[i] ? h->x_b : h->x_a) + q * d, d * sizeof(float));
    }
    tc.seed = h->tc.seed + (uint64_t)round; /* a fresh shuffle each round */
    if (h->min_steps > 0 && tc.batch > 0) {
        long long per_epoch = ((long long)count + tc.batch - 1) / tc.batch;
        if (per_epoch * tc.epochs < h->min_steps) tc.epochs = (int)((h->min_steps + per_epoch - 1) / per_epoch);
    }
    return rwd_bt_train(h->head, h->store, xw, xl, NULL, count, &tc, NULL, err);
}

RWD__IMPL rwd_pair_model rwd_ssrm_head_model(rwd_ssrm_head *h) {
    rwd_pair_model m;
    memset(&m, 0, sizeof m);
    m.ctx = h;
    m.prob = rwd__ssrm_head_prob;
    m.train = rwd__ssrm_head_train;
    return m;
}

RWD__IMPL void rwd_ssrm_head_free(rwd_ssrm_head *h) {
    MOE_FREE(h->buf);
    h->buf = NULL;
    h->buf_pairs = 0;
}

/* ---- the gate adapter ---- */

static moe_status rwd__ssrm_gate_prob(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err) {
    rwd_ssrm_gate *g = (rwd_ssrm_gate *)ctx;
    int K = g->gate->cfg.K, d = g->gate->cfg.d_in, chunk = g->gate->cfg.max_rows, k;
    size_t i;
    float *X = (float *)MOE_MALLOC((size_t)chunk * ((size_t)d + (size_t)K) * sizeof(float));
    if (!X) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < count; i += (size_t)chunk) {
        int b = (int)(count - i < (size_t)chunk ? count - i : (size_t)chunk), j;
        float *G = X + (size_t)chunk * (size_t)d;
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            if (q >= g->n) { MOE_FREE(X); return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, g->n); }
            memcpy(X + (size_t)j * (size_t)d, g->x + q * (size_t)d, (size_t)d * sizeof(float));
        }
        rwd_gate_forward(g->gate, g->store, G, X, b, NULL);
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            double m = 0.0;
            for (k = 0; k < K; k++) m += (double)G[(size_t)j * (size_t)K + (size_t)k] * (g->r_a[q * (size_t)K + (size_t)k] - g->r_b[q * (size_t)K + (size_t)k]);
            p[i + (size_t)j] = 1.0 / (1.0 + exp(-m));
        }
    }
    MOE_FREE(X);
    return MOE_OK;
}

static moe_status rwd__ssrm_gate_train(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err) {
    rwd_ssrm_gate *g = (rwd_ssrm_gate *)ctx;
    size_t K = (size_t)g->gate->cfg.K, d = (size_t)g->gate->cfg.d_in, i;
    rwd_gate_train_config tc = g->tc;
    if (count > g->buf_pairs) {
        MOE_FREE(g->xbuf);
        MOE_FREE(g->rbuf);
        g->xbuf = (float *)MOE_MALLOC(count * d * sizeof(float));
        g->rbuf = (double *)MOE_MALLOC(2 * count * K * sizeof(double));
        g->buf_pairs = g->xbuf && g->rbuf ? count : 0;
        if (!g->buf_pairs) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu training pairs", count);
    }
    for (i = 0; i < count; i++) {
        size_t q = idx[i];
        if (q >= g->n) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, g->n);
        memcpy(g->xbuf + i * d, g->x + q * d, d * sizeof(float));
        memcpy(g->rbuf + i * K, (a_wins[i] ? g->r_a : g->r_b) + q * K, K * sizeof(double));
        memcpy(g->rbuf + (count + i) * K, (a_wins[i] ? g->r_b : g->r_a) + q * K, K * sizeof(double));
    }
    tc.seed = g->tc.seed + (uint64_t)round;
    return rwd_gate_train(g->gate, g->store, g->xbuf, g->rbuf, g->rbuf + count * K, count, &tc, NULL, err);
}

RWD__IMPL rwd_pair_model rwd_ssrm_gate_model(rwd_ssrm_gate *g) {
    rwd_pair_model m;
    memset(&m, 0, sizeof m);
    m.ctx = g;
    m.prob = rwd__ssrm_gate_prob;
    m.train = rwd__ssrm_gate_train;
    return m;
}

RWD__IMPL void rwd_ssrm_gate_free(rwd_ssrm_gate *g) {
    MOE_FREE(g->xbuf);
    MOE_FREE(g->rbuf);
    g->xbuf = NULL;
    g->rbuf = NULL;
    g->buf_pairs = 0;
}
