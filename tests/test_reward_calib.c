/* test_reward_calib.c - reward.h sections 2 (lowess) and 3 (calib):
 * LOWESS against statsmodels (the shared toy_lowess.csv, 5 settings, and tests/ref/lowess_ref.csv),
 * fast against naive, bad input; RC-LWR lookup and RC-Mean against the paper's code
 * (tests/ref/rc_ref.csv) and on a hand-checked input; penalty, sequences. */
#define _POSIX_C_SOURCE 200809L
#include "reward.h" /* defines: rwd_lowess*, rwd_lwr_*, rwd_calibrate_* */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, test_summary, test_shared_data */
#include "reward_util.h" /* defines: csv_read, csv_col, read_data */

static double max_abs_diff(const double *a, const double *b, size_t n) {
    double m = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

/* every fit column "fit_frac<F>_it<I>" of a statsmodels reference table */
static void check_lowess_table(const char *label, const csv_table *t, double tol) {
    const double *x = csv_col(t, "x"), *y = csv_col(t, "y");
    double *fit = (double *)malloc((size_t)t->rows * sizeof(double));
    int c;
    for (c = 2; c < t->cols; c++) {
        double frac = 0.0, d;
        int it = -1;
        moe_err err;
        CHECK(sscanf(t->names[c], "fit_frac%lf_it%d", &frac, &it) == 2, "%s: column name %s", label, t->names[c]);
        CHECK(rwd_lowess(fit, x, y, (size_t)t->rows, frac, it, &err) == MOE_OK, "%s", err.msg);
        d = max_abs_diff(fit, csv_col(t, t->names[c]), (size_t)t->rows);
        printf("   %s %s: max |fast - statsmodels| = %.3g\n", label, t->names[c], d);
        CHECK(d <= tol, "%s %s: fast LOWESS differs from statsmodels by %g", label, t->names[c], d);
        CHECK(rwd_lowess_naive(fit, x, y, (size_t)t->rows, frac, it, &err) == MOE_OK, "%s", err.msg);
        d = max_abs_diff(fit, csv_col(t, t->names[c]), (size_t)t->rows);
        printf("   %s %s: max |naive - statsmodels| = %.3g\n", label, t->names[c], d);
        CHECK(d <= tol, "%s %s: naive LOWESS differs from statsmodels by %g", label, t->names[c], d);
    }
    free(fit);
}

static void test_lowess_references(void) {
    csv_table t;
    const char *root = test_shared_data();
    TEST_BEGIN("LOWESS = statsmodels (shared toy_lowess.csv, 5 settings)");
    if (!root) printf("SKIP toy_lowess.csv: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n");
    else {
        char path[1100];
        snprintf(path, sizeof path, "%s/reward-calibration/lowess-reference/toy_lowess.csv", root);
        CHECK(csv_read(&t, path) == 0 && t.rows == 20 && t.cols == 7, "cannot read %s", path);
        if (t.data) check_lowess_table("toy", &t, 1e-9);
        csv_free(&t);
    }
    TEST_BEGIN("LOWESS = statsmodels (tests/ref/lowess_ref.csv, 400 lengths with ties)");
    CHECK(csv_read(&t, "tests/ref/lowess_ref.csv") == 0 && t.rows == 400, "cannot read tests/ref/lowess_ref.csv");
    if (t.data) check_lowess_table("ref", &t, 1e-9);
    csv_free(&t);
}

static void test_lowess_fast_vs_naive(void) {
    static const double fracs[4] = {0.02, 0.3, 0.77, 1.0};
    moe_rng rng;
    int trial;
    TEST_BEGIN("fast LOWESS = naive LOWESS on random data (ties, outliers, constant runs)");
    moe_rng_seed(&rng, 11);
    for (trial = 0; trial < 24; trial++) {
        size_t n = 2 + (size_t)moe_rng_below(&rng, 700), i;
        double *x = (double *)malloc(4 * n * sizeof(double)), *y = x + n, *f1 = y + n, *f2 = f1 + n, d;
        int levels = 1 + moe_rng_below(&rng, trial % 3 == 0 ? 5 : 400), it = trial % 4;
        moe_err err;
        for (i = 0; i < n; i++) {
            x[i] = trial % 5 == 4 ? moe_rng_uniform(&rng) : (double)moe_rng_below(&rng, levels);
            y[i] = sin(0.05 * x[i]) + 0.3 * moe_rng_normal(&rng) + (moe_rng_below(&rng, 20) == 0 ? 4.0 : 0.0);
        }
        CHECK(rwd_lowess(f1, x, y, n, fracs[trial % 4], it, &err) == MOE_OK, "%s", err.msg);
        CHECK(rwd_lowess_naive(f2, x, y, n, fracs[trial % 4], it, &err) == MOE_OK, "%s", err.msg);
        d = max_abs_diff(f1, f2, n);
        CHECK(d <= 1e-10, "trial %d (n %zu, %d levels, frac %g, it %d): fast - naive = %g", trial, n, levels, fracs[trial % 4], it, d);
        free(x);
    }
}

static void test_lowess_edges(void) {
    double x[5] = {1, 2, 3, 4, 5}, y[5] = {1, 2, 3, 4, 5}, f[5], c[3] = {2, 2, 2}, cy[3] = {5, 1, 3};
    double nan_y[5] = {1, 2, NAN, 4, 5};
    moe_err err;
    TEST_BEGIN("LOWESS edge cases and bad input");
    CHECK(rwd_lowess(f, x, y, 5, 1.0, 3, &err) == MOE_OK && fabs(f[2] - 3.0) < 1e-12, "a line is its own fit");
    CHECK(rwd_lowess(f, x, y, 1, 1.0, 3, &err) == MOE_OK && f[0] == 1.0, "one point fits itself");
    CHECK(rwd_lowess(f, c, cy, 3, 1.0, 3, &err) == MOE_OK && f[0] == 5.0 && f[1] == 5.0 && f[2] == 5.0,
          "all-tied window: the first point's y (documented degenerate case)");
    CHECK(rwd_lowess(f, x, y, 0, 1.0, 3, &err) == MOE_ERR_INVALID_ARG, "empty input is an error");
    CHECK(rwd_lowess(f, x, y, 5, 0.0, 3, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "frac"), "frac 0: %s", err.msg);
    CHECK(rwd_lowess(f, x, y, 5, 1.5, 3, &err) == MOE_ERR_INVALID_ARG, "frac > 1 is an error");
    CHECK(rwd_lowess(f, x, y, 5, NAN, 3, &err) == MOE_ERR_INVALID_ARG, "frac NaN is an error");
    CHECK(rwd_lowess(f, x, y, 5, 0.5, -1, &err) == MOE_ERR_INVALID_ARG, "negative iterations are an error");
    CHECK(rwd_lowess(f, x, nan_y, 5, 0.5, 3, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "point 2"), "NaN y: %s", err.msg);
    CHECK(rwd_lowess_naive(f, x, nan_y, 5, 0.5, 3, &err) == MOE_ERR_INVALID_ARG, "naive: NaN y is an error");
}

static void test_rc_reference(void) {
    csv_table t;
    size_t n, i;
    const double *lw, *ll, *sw, *sl;
    double *ow, *ol, d;
    rwd_lwr m;
    moe_err err;
    TEST_BEGIN("RC-Mean and RC-LWR lookup = the paper's code (tests/ref/rc_ref.csv)");
    if (csv_read(&t, "tests/ref/rc_ref.csv") != 0) { CHECK(0, "cannot read tests/ref/rc_ref.csv"); return; }
    n = (size_t)t.rows;
    lw = csv_col(&t, "len_w"); ll = csv_col(&t, "len_l"); sw = csv_col(&t, "s_w"); sl = csv_col(&t, "s_l");
    ow = (double *)malloc(2 * n * sizeof(double));
    ol = ow + n;
    CHECK(rwd_calibrate_mean(ow, ol, sw, sl, lw, ll, n, 4.0, 5, 1.0, 1, 123, &err) == MOE_OK, "%s", err.msg);
    d = fmax(max_abs_diff(ow, csv_col(&t, "mean_w"), n), max_abs_diff(ol, csv_col(&t, "mean_l"), n));
    CHECK(d <= 1e-12, "RC-Mean differs from the paper's code by %g", d);
    /* RC-LWR fitted on the pooled pairs, queried out of sample with the step lookup */
    memcpy(ow, lw, n * sizeof(double)); memcpy(ol, ll, n * sizeof(double));
    {
        double *ys = (double *)malloc(2 * n * sizeof(double));
        memcpy(ys, sw, n * sizeof(double)); memcpy(ys + n, sl, n * sizeof(double));
        CHECK(rwd_lwr_fit(&m, ow, ys, 2 * n, 0.3, 3, &err) == MOE_OK, "%s", err.msg);
        free(ys);
    }
    d = 0.0;
    for (i = 0; i < n; i++) d = fmax(d, fabs(rwd_lwr_predict(&m, csv_col(&t, "query")[i], 0) - csv_col(&t, "lwr_pred")[i]));
    CHECK(d <= 1e-9, "RC-LWR step lookup differs from the paper's code by %g", d);
    rwd_lwr_free(&m);
    free(ow);
    csv_free(&t);
}

static void test_rc_hand(void) {
    /* 3 pairs, lengths 10/20, 30/40, 50/60: mean |dc| = 10, ratio 1 -> T = 10. Sorted points
       c = 10 20 30 40 50 60, r = 1 2 3 4 5 6. Window of c0 = 30: c in [20, 40] is {20,30,40},
       minus the last -> {2, 3}: mean 2.5. Window of 10: {10, 20} minus last -> {1}: mean 1.
       Window of 60: {50, 60} minus last -> {5}. With min_count 1 every pair is calibrated. */
    double cw[3] = {10, 30, 50}, cl[3] = {20, 40, 60}, sw[3] = {1, 3, 5}, sl[3] = {2, 4, 6}, ow[3], ol[3];
    double lin_c[6] = {1, 2, 3, 4, 5, 6}, lin_r[6] = {3, 5, 7, 9, 11, 13}, out[6];
    double tw[3] = {100, 100, 100}, tl[3] = {300, 100, 100};
    rwd_cal_config cfg = rwd_cal_config_default();
    moe_err err;
    int i;
    TEST_BEGIN("RC-Mean, RC-LWR, penalty on hand-checked inputs");
    CHECK(rwd_calibrate_mean(ow, ol, sw, sl, cw, cl, 3, 1.0, 1, 1.0, 0, 0, &err) == MOE_OK, "%s", err.msg);
    CHECK(ow[0] == 1 - 1.0 && ol[0] == 2 - 1.5 && ow[1] == 3 - 2.5 && ol[1] == 4 - 3.5 && ow[2] == 5 - 4.5 && ol[2] == 6 - 5.0,
          "RC-Mean windows: got %g %g %g %g %g %g", ow[0], ol[0], ow[1], ol[1], ow[2], ol[2]);
    CHECK(rwd_calibrate_mean(ow, ol, sw, sl, cw, cl, 3, 1.0, 2, 1.0, 0, 0, &err) == MOE_OK && ow[0] == 1 && ol[0] == 2 && ow[1] == 3 - 2.5 && ow[2] == 5,
          "min_count 2 leaves the end pairs alone (their windows hold 1 point)");
    /* a straight line is its own LOWESS fit at frac 1: RC-LWR removes it entirely */
    CHECK(rwd_calibrate_lwr(out, lin_c, lin_r, 6, 1.0, 3, 1.0, &err) == MOE_OK, "%s", err.msg);
    for (i = 0; i < 6; i++) CHECK(fabs(out[i]) < 1e-12, "RC-LWR of a line: residual %g at %d", out[i], i);
    cfg.method = RWD_CAL_PENALTY;
    CHECK(rwd_calibrate_pairs(ow, ol, sw, sl, cw, cl, tw, tl, 3, &cfg, &err) == MOE_OK && fabs(ow[0] - (1 - 0.1)) < 1e-15 && fabs(ol[0] - (2 - 0.3)) < 1e-15,
          "penalty uses the text lengths: %g %g", ow[0], ol[0]);
    CHECK(rwd_calibrate_pairs(ow, ol, sw, sl, cw, cl, NULL, NULL, 3, &cfg, &err) == MOE_OK && fabs(ol[2] - (6 - 0.06)) < 1e-15,
          "penalty falls back to the characteristic");
    cfg.method = RWD_CAL_MEAN; cfg.ratio = 1.0; cfg.min_count = 1; cfg.shuffle = 0;
    CHECK(rwd_calibrate_pairs(ow, ol, sw, sl, cw, cl, NULL, NULL, 3, &cfg, &err) == MOE_OK && ow[1] == 0.5, "pairs + RC-Mean");
    /* bad input */
    CHECK(rwd_calibrate_mean(ow, ol, sw, sl, cw, cl, 0, 4.0, 20, 1.0, 1, 0, &err) == MOE_ERR_INVALID_ARG, "no pairs is an error");
    sw[1] = NAN;
    CHECK(rwd_calibrate_mean(ow, ol, sw, sl, cw, cl, 3, 4.0, 20, 1.0, 1, 0, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "[1]"), "NaN score: %s", err.msg);
    CHECK(rwd_calibrate_pairs(ow, ol, sw, sl, cw, cl, NULL, NULL, 3, &cfg, &err) == MOE_ERR_INVALID_ARG, "pairs: NaN score is an error");
    sw[1] = 3;
    cfg.frac = 0.0;
    CHECK(rwd_calibrate_pairs(ow, ol, sw, sl, cw, cl, NULL, NULL, 3, &cfg, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "frac"), "frac 0: %s", err.msg);
}

static void test_rc_sequence(void) {
    /* two characteristics in sequence = two single calls chained (RC-LWR and RC-Mean) */
    enum { N = 200 };
    double cw0[N], cl0[N], cw1[N], cl1[N], sw[N], sl[N], aw[N], al[N], bw[N], bl[N], alpha[2] = {1.0, 0.5};
    const double *cws[2], *cls[2];
    rwd_cal_config cfg = rwd_cal_config_default();
    moe_rng rng;
    moe_err err;
    int i, m;
    TEST_BEGIN("calibration over two characteristics in sequence");
    moe_rng_seed(&rng, 3);
    for (i = 0; i < N; i++) {
        cw0[i] = (double)moe_rng_below(&rng, 500); cl0[i] = (double)moe_rng_below(&rng, 500);
        cw1[i] = (double)moe_rng_below(&rng, 8); cl1[i] = (double)moe_rng_below(&rng, 8);
        sw[i] = 0.01 * cw0[i] + 0.2 * cw1[i] + moe_rng_normal(&rng);
        sl[i] = 0.01 * cl0[i] + 0.2 * cl1[i] + moe_rng_normal(&rng);
    }
    cws[0] = cw0; cws[1] = cw1; cls[0] = cl0; cls[1] = cl1;
    for (m = 0; m < 2; m++) {
        cfg.method = m ? RWD_CAL_MEAN : RWD_CAL_LWR;
        cfg.frac = 0.5;
        CHECK(rwd_calibrate_sequence(aw, al, sw, sl, cws, cls, alpha, 2, NULL, NULL, N, &cfg, &err) == MOE_OK, "%s", err.msg);
        cfg.alpha = 1.0;
        CHECK(rwd_calibrate_pairs(bw, bl, sw, sl, cw0, cl0, NULL, NULL, N, &cfg, &err) == MOE_OK, "%s", err.msg);
        cfg.alpha = 0.5;
        CHECK(rwd_calibrate_pairs(bw, bl, bw, bl, cw1, cl1, NULL, NULL, N, &cfg, &err) == MOE_OK, "%s", err.msg);
        cfg.alpha = 1.0;
        CHECK(max_abs_diff(aw, bw, N) == 0.0 && max_abs_diff(al, bl, N) == 0.0, "method %d: sequence = chained calls", m);
    }
}

int main(void) {
    test_lowess_references();
    test_lowess_fast_vs_naive();
    test_lowess_edges();
    test_rc_reference();
    test_rc_hand();
    test_rc_sequence();
    return test_summary();
}
