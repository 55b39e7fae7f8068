/* ============================================================================================
   >>rwd:calib  post-hoc reward calibration (Huang et al., arXiv 2409.17407, ICLR 2025)
   ============================================================================================
   r_cal = r - alpha * b(c): b is the average reward of responses with a similar
   characteristic c (length), estimated on the pooled chosen + rejected responses. RC-Mean is
   the paper's uniform local average, RC-LWR its locally weighted regression (>>rwd:lowess).
   Settings and lookups follow the official code (github.com/ZeroYuHuang/Reward-Calibration,
   src/calibrate_rewardbench.py and src/calibrate_alpacaeval.py); where this header departs
   from that code, the function's comment says so. */

/* RC-LWR curve for out-of-sample queries (the paper's AlpacaEval setting: the baseline's
   outputs are scored against a fit made without them). */
typedef struct rwd_lwr {
    double *x;   /* (n) distinct fitted x values, ascending */
    double *fit; /* (n) LOWESS fit at x[i]                  */
    size_t n;
} rwd_lwr;

RWDDEF moe_status rwd_lwr_fit(rwd_lwr *m, const double *x, const double *y, size_t n, double frac,
                              int iters, moe_err *err);
/* b(c): the fit at the smallest fitted x >= c (the official code's bisect_left step lookup);
   above the largest x, the last fit (the official code would index past its array).
   interpolate != 0: linear interpolation between the neighbours instead, constant outside the
   range. */
RWDDEF double rwd_lwr_predict(const rwd_lwr *m, double c, int interpolate);
RWDDEF void rwd_lwr_free(rwd_lwr *m);

/* RC-LWR in-sample (RewardBench setting): out[i] = r[i] - alpha * lowess(c, r)[i], n points
   (pool chosen then rejected). out may equal r. */
RWDDEF moe_status rwd_calibrate_lwr(double *out, const double *c, const double *r, size_t n,
                                    double frac, int iters, double alpha, moe_err *err);

/* RC-Mean (the paper's uniform local average) on N pairs: T = mean |c_w - c_l| / ratio;
   points pooled interleaved (w0, l0, w1, ...), shuffled with moe_rng(seed) if shuffle (the
   official code's shuffle is unseeded), stable-sorted by c. The window of c0 holds the points
   with |c - c0| <= T minus the last one in sorted order (the official code's slice end).
   A pair is calibrated only if both windows hold >= min_count points: r - alpha * mean(window).
   out_w/out_l may equal s_w/s_l. */
RWDDEF moe_status rwd_calibrate_mean(double *out_w, double *out_l, const double *s_w,
                                     const double *s_l, const double *c_w, const double *c_l,
                                     size_t n, double ratio, int min_count, double alpha,
                                     int shuffle, uint64_t seed, moe_err *err);

typedef enum rwd_cal_method {
    RWD_CAL_LWR = 0,     /* RC-LWR                                                         */
    RWD_CAL_MEAN,        /* RC-Mean                                                        */
    RWD_CAL_PENALTY,     /* r - penalty * text length (the paper's length-penalty baseline) */
    RWD_CAL_PENALTY_LWR, /* penalty, then RC-LWR on the penalised scores                    */
    RWD_CAL_PENALTY_MEAN /* penalty, then RC-Mean                                           */
} rwd_cal_method;

typedef struct rwd_cal_config {
    int method;      /* rwd_cal_method; RWD_CAL_LWR                                       */
    double frac;     /* LOWESS span, (0, 1]; 1.0 (RewardBench script)                       */
    int iters;       /* LOWESS robustness passes; 3 (statsmodels default)                   */
    double alpha;    /* strength; 1.0                                                      */
    double ratio;    /* RC-Mean threshold divisor; 4 (RewardBench)                          */
    int min_count;   /* RC-Mean minimum window; 20 (RewardBench)                            */
    int shuffle;     /* RC-Mean: shuffle before the stable sort; 1                          */
    uint64_t seed;   /* RC-Mean shuffle seed; 0                                            */
    double penalty;  /* length penalty per code point; 0.001                               */
} rwd_cal_config;

RWDDEF rwd_cal_config rwd_cal_config_default(void);
RWDDEF moe_status rwd_cal_config_check(const rwd_cal_config *c, moe_err *err);
/* Calibrates N pairs by c->method. c_w/c_l: characteristic (response length); t_w/t_l: the
   length the penalty uses (full chat-formatted text, as the official code), or NULL for c.
   Outputs may equal the score arrays. */
RWDDEF moe_status rwd_calibrate_pairs(double *out_w, double *out_l, const double *s_w,
                                      const double *s_l, const double *c_w, const double *c_l,
                                      const double *t_w, const double *t_l, size_t n,
                                      const rwd_cal_config *c, moe_err *err);
/* Several characteristics in sequence (the official code's feature list, e.g. length then
   markdown count, each with its alpha): feature f re-estimates b on the scores
   already calibrated for features 0..f-1, with alpha[f]. c_w[f], c_l[f]: (n) each. The
   penalty (if the method has one) is applied once, before the first feature. Unlike the
   paper's RC-Mean code, which re-reads the uncalibrated scores, RC-Mean chains too. */
RWDDEF moe_status rwd_calibrate_sequence(double *out_w, double *out_l, const double *s_w,
                                         const double *s_l, const double *const *c_w,
                                         const double *const *c_l, const double *alpha,
                                         int n_features, const double *t_w, const double *t_l,
                                         size_t n, const rwd_cal_config *c, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:calib
   ============================================================================================ */

static moe_status rwd__check_finite(const double *a, size_t n, const char *what, moe_err *err) {
    size_t i;
    if (!a) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: missing array", what);
    for (i = 0; i < n; i++)
        if (!isfinite(a[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s[%zu] is not a finite number (%g)", what, i, a[i]);
    return MOE_OK;
}

/* Scores and characteristics enter sums, means and squares: beyond this magnitude the
   arithmetic overflows (a score of 1e308 calibrated to inf, or to 0 through inf - inf). */
#define RWD__CAL_MAX_ABS 1e150

static moe_status rwd__check_magnitude(const double *a, size_t n, const char *what, moe_err *err) {
    size_t i;
    moe_status st = rwd__check_finite(a, n, what, err);
    if (st != MOE_OK) return st;
    for (i = 0; i < n; i++)
        if (fabs(a[i]) > RWD__CAL_MAX_ABS)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s[%zu] is %g: calibration takes magnitudes up to %g (rescale the values)", what, i,
                               a[i], RWD__CAL_MAX_ABS);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lwr_fit(rwd_lwr *m, const double *x, const double *y, size_t n, double frac,
                                 int iters, moe_err *err) {
    double *fit;
    size_t *order, i, u = 0;
    moe_status st;
    memset(m, 0, sizeof *m);
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR needs at least one point to fit");
    fit = (double *)MOE_MALLOC(n * sizeof(double));
    order = (size_t *)MOE_MALLOC(n * sizeof(size_t));
    m->x = (double *)MOE_MALLOC(n * sizeof(double));
    m->fit = (double *)MOE_MALLOC(n * sizeof(double));
    if (!fit || !order || !m->x || !m->fit) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu points", n);
    else if ((st = rwd_lowess(fit, x, y, n, frac, iters, err)) == MOE_OK && (st = rwd__argsort(order, x, n, err)) == MOE_OK) {
        for (i = 0; i < n; i++) /* ties share one fitted value: keep one entry per x */
            if (u == 0 || x[order[i]] != m->x[u - 1]) {
                m->x[u] = x[order[i]];
                m->fit[u++] = fit[order[i]];
            }
        m->n = u;
    }
    MOE_FREE(fit);
    MOE_FREE(order);
    if (st != MOE_OK) rwd_lwr_free(m);
    return st;
}

RWD__IMPL double rwd_lwr_predict(const rwd_lwr *m, double c, int interpolate) {
    size_t lo = 0, hi = m->n;
    if (m->n == 0) return NAN;
    while (lo < hi) { /* bisect_left: first x >= c */
        size_t mid = lo + (hi - lo) / 2;
        if (m->x[mid] < c) lo = mid + 1;
        else hi = mid;
    }
    if (lo == m->n) return m->fit[m->n - 1];
    if (!interpolate || lo == 0 || m->x[lo] == c) return m->fit[lo];
    {
        double t = (c - m->x[lo - 1]) / (m->x[lo] - m->x[lo - 1]);
        return m->fit[lo - 1] + t * (m->fit[lo] - m->fit[lo - 1]);
    }
}

RWD__IMPL void rwd_lwr_free(rwd_lwr *m) {
    MOE_FREE(m->x);
    MOE_FREE(m->fit);
    memset(m, 0, sizeof *m);
}

RWD__IMPL moe_status rwd_calibrate_lwr(double *out, const double *c, const double *r, size_t n,
                                       double frac, int iters, double alpha, moe_err *err) {
    size_t i;
    double *fit;
    moe_status st;
    if (!out) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR needs an output array");
    if (!isfinite(alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR alpha must be finite, got %g", alpha);
    fit = (double *)MOE_MALLOC((n ? n : 1) * sizeof(double));
    if (!fit) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu points", n);
    /* every query is a fitted point, so the official code's bisect_left lookup is the point's own fit */
    st = rwd_lowess(fit, c, r, n, frac, iters, err);
    if (st == MOE_OK)
        for (i = 0; i < n; i++) out[i] = r[i] - alpha * fit[i];
    MOE_FREE(fit);
    return st;
}

static size_t rwd__lower_bound(const double *a, size_t n, double v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static size_t rwd__upper_bound(const double *a, size_t n, double v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

RWD__IMPL moe_status rwd_calibrate_mean(double *out_w, double *out_l, const double *s_w,
                                        const double *s_l, const double *c_w, const double *c_l,
                                        size_t n, double ratio, int min_count, double alpha,
                                        int shuffle, uint64_t seed, moe_err *err) {
    size_t m = 2 * n, i, *perm, *order;
    double *pc, *pr, *sc, *sr, T = 0.0;
    moe_status st;
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean needs at least one pair");
    if (!out_w || !out_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean needs output arrays");
    if (!(ratio > 0.0) || !isfinite(ratio)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean ratio must be a positive number, got %g", ratio);
    if (min_count < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean min_count must be >= 0, got %d", min_count);
    if (!isfinite(alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean alpha must be finite, got %g", alpha);
    if (m > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean takes at most %d responses", INT_MAX);
    if ((st = rwd__check_finite(s_w, n, "chosen scores", err)) || (st = rwd__check_finite(s_l, n, "rejected scores", err)) ||
        (st = rwd__check_finite(c_w, n, "chosen characteristic", err)) || (st = rwd__check_finite(c_l, n, "rejected characteristic", err)))
        return st;
    pc = (double *)moe__calloc(4 * m, sizeof(double)); /* zeroed: quiets gcc -Wmaybe-uninitialized */
    perm = (size_t *)MOE_MALLOC(2 * m * sizeof(size_t));
    if (!pc || !perm) {
        MOE_FREE(pc); MOE_FREE(perm);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-Mean on %zu pairs", n);
    }
    pr = pc + m; sc = pr + m; sr = sc + m; order = perm + m;
    for (i = 0; i < m; i++) perm[i] = i;
    if (shuffle) { /* Fisher-Yates as Python's random.shuffle, but seeded */
        moe_rng rng;
        moe_rng_seed(&rng, seed);
        for (i = m - 1; i > 0; i--) {
            size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
    }
    for (i = 0; i < m; i++) { /* pooled interleaved: point 2p is pair p's chosen, 2p+1 its rejected */
        size_t q = perm[i] / 2;
        pc[i] = (perm[i] % 2) ? c_l[q] : c_w[q];
        pr[i] = (perm[i] % 2) ? s_l[q] : s_w[q];
    }
    if ((st = rwd__argsort(order, pc, m, err)) == MOE_OK) {
        for (i = 0; i < m; i++) { sc[i] = pc[order[i]]; sr[i] = pr[order[i]]; }
        for (i = 0; i < n; i++) T += fabs(c_w[i] - c_l[i]);
        T = T / (double)n / ratio;
        for (i = 0; i < n; i++) {
            double mean[2], cq[2], sq[2];
            size_t cnt[2];
            int side;
            cq[0] = c_w[i]; cq[1] = c_l[i]; sq[0] = s_w[i]; sq[1] = s_l[i];
            for (side = 0; side < 2; side++) {
                /* Python's all_scores[bisect_left(c0 - T) : bisect_right(c0 + T) - 1] */
                size_t a = rwd__lower_bound(sc, m, cq[side] - T), b = rwd__upper_bound(sc, m, cq[side] + T) - 1, j;
                double sum = 0.0;
                cnt[side] = b > a ? b - a : 0;
                for (j = a; j < b; j++) sum += sr[j];
                mean[side] = cnt[side] ? sum / (double)cnt[side] : 0.0;
            }
            if (cnt[0] >= (size_t)min_count && cnt[1] >= (size_t)min_count && cnt[0] > 0 && cnt[1] > 0) {
                out_w[i] = sq[0] - alpha * mean[0];
                out_l[i] = sq[1] - alpha * mean[1];
            } else {
                out_w[i] = sq[0];
                out_l[i] = sq[1];
            }
        }
    }
    MOE_FREE(pc);
    MOE_FREE(perm);
    return st;
}

RWD__IMPL rwd_cal_config rwd_cal_config_default(void) {
    rwd_cal_config c;
    memset(&c, 0, sizeof c);
    c.method = RWD_CAL_LWR;
    c.frac = 1.0;
    c.iters = 3;
    c.alpha = 1.0;
    c.ratio = 4.0;
    c.min_count = 20;
    c.shuffle = 1;
    c.seed = 0;
    c.penalty = 0.001;
    return c;
}

RWD__IMPL moe_status rwd_cal_config_check(const rwd_cal_config *c, moe_err *err) {
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "no calibration config");
    if (c->method < RWD_CAL_LWR || c->method > RWD_CAL_PENALTY_MEAN) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown calibration method %d", c->method);
    if (!(c->frac > 0.0 && c->frac <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "frac must be in (0, 1], got %g", c->frac);
    if (c->iters < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "iters must be >= 0, got %d", c->iters);
    if (!isfinite(c->alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "alpha must be finite, got %g", c->alpha);
    if (!(c->ratio > 0.0) || !isfinite(c->ratio)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "ratio must be a positive number, got %g", c->ratio);
    if (c->min_count < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "min_count must be >= 0, got %d", c->min_count);
    if (!isfinite(c->penalty)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "penalty must be finite, got %g", c->penalty);
    return MOE_OK;
}

/* one characteristic with the method's calibrator (LWR or Mean), inputs may alias outputs */
static moe_status rwd__calibrate_feature(double *out_w, double *out_l, const double *s_w, const double *s_l,
                                         const double *c_w, const double *c_l, size_t n, double alpha,
                                         const rwd_cal_config *c, moe_err *err) {
    double *pool;
    moe_status st;
    if (c->method == RWD_CAL_MEAN || c->method == RWD_CAL_PENALTY_MEAN)
        return rwd_calibrate_mean(out_w, out_l, s_w, s_l, c_w, c_l, n, c->ratio, c->min_count, alpha, c->shuffle, c->seed, err);
    /* RC-LWR pools all chosen, then all rejected (the official code's x_train) */
    pool = (double *)MOE_MALLOC((4 * n + 1) * sizeof(double));
    if (!pool) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu pairs", n);
    memcpy(pool, c_w, n * sizeof(double));
    memcpy(pool + n, c_l, n * sizeof(double));
    memcpy(pool + 2 * n, s_w, n * sizeof(double));
    memcpy(pool + 3 * n, s_l, n * sizeof(double));
    st = rwd_calibrate_lwr(pool + 2 * n, pool, pool + 2 * n, 2 * n, c->frac, c->iters, alpha, err);
    if (st == MOE_OK) {
        memcpy(out_w, pool + 2 * n, n * sizeof(double));
        memcpy(out_l, pool + 3 * n, n * sizeof(double));
    }
    MOE_FREE(pool);
    return st;
}

RWD__IMPL moe_status rwd_calibrate_sequence(double *out_w, double *out_l, const double *s_w,
                                            const double *s_l, const double *const *c_w,
                                            const double *const *c_l, const double *alpha,
                                            int n_features, const double *t_w, const double *t_l,
                                            size_t n, const rwd_cal_config *c, moe_err *err) {
    size_t i;
    int f, pen;
    moe_status st;
    if ((st = rwd_cal_config_check(c, err)) != MOE_OK) return st;
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs at least one pair");
    if (!out_w || !out_l || n_features < 0 || (n_features > 0 && (!c_w || !c_l || !alpha)))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs outputs and, per feature, characteristics and an alpha");
    if ((st = rwd__check_magnitude(s_w, n, "chosen scores", err)) || (st = rwd__check_magnitude(s_l, n, "rejected scores", err))) return st;
    for (f = 0; f < n_features; f++)
        if ((st = rwd__check_magnitude(c_w[f], n, "chosen characteristic", err)) || (st = rwd__check_magnitude(c_l[f], n, "rejected characteristic", err)))
            return st;
    pen = c->method == RWD_CAL_PENALTY || c->method == RWD_CAL_PENALTY_LWR || c->method == RWD_CAL_PENALTY_MEAN;
    if (pen) { /* the paper's baseline: r - penalty * length of the full chat-formatted text.
                  Each response uses its own length; the official calibrate_alpacaeval.py
                  penalises the baseline's score with the evaluated model's length instead. */
        const double *lw = t_w ? t_w : (n_features > 0 ? c_w[0] : NULL), *ll = t_l ? t_l : (n_features > 0 ? c_l[0] : NULL);
        if (!lw || !ll) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the length penalty needs text lengths");
        if ((st = rwd__check_magnitude(lw, n, "chosen text length", err)) || (st = rwd__check_magnitude(ll, n, "rejected text length", err))) return st;
        for (i = 0; i < n; i++) {
            out_w[i] = s_w[i] - c->penalty * lw[i];
            out_l[i] = s_l[i] - c->penalty * ll[i];
        }
    } else {
        memmove(out_w, s_w, n * sizeof(double));
        memmove(out_l, s_l, n * sizeof(double));
    }
    if (c->method != RWD_CAL_PENALTY)
        for (f = 0; f < n_features; f++)
            if ((st = rwd__calibrate_feature(out_w, out_l, out_w, out_l, c_w[f], c_l[f], n, alpha[f], c, err)) != MOE_OK) return st;
    for (i = 0; i < n; i++) /* a calibrated score is a number, or the call says why not */
        if (!isfinite(out_w[i]) || !isfinite(out_l[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibrating pair %zu gave %g, %g: the scores, lengths or alpha are too large (rescale them)", i,
                               out_w[i], out_l[i]);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_calibrate_pairs(double *out_w, double *out_l, const double *s_w,
                                         const double *s_l, const double *c_w, const double *c_l,
                                         const double *t_w, const double *t_l, size_t n,
                                         const rwd_cal_config *c, moe_err *err) {
    const double *cw[1], *cl[1];
    double alpha[1];
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "no calibration config");
    cw[0] = c_w; cl[0] = c_l; alpha[0] = c->alpha;
    if (!c_w || !c_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs the responses' characteristic (length)");
    return rwd_calibrate_sequence(out_w, out_l, s_w, s_l, cw, cl, alpha, 1, t_w, t_l, n, c, err);
}

