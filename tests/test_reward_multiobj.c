/* test_reward_multiobj.c - reward.h's multi-objective and semi-supervised parts: rows (CSV and
 * JSON Lines with missing values), armo (ridge and the lambda grid, verbosity penalties, the
 * gating network), dpa (directions, prompt weights, best-of-n, Pareto fronts, hypervolume) and
 * ssrm (the self-training loop and its adapters). Golden values from tests/ref/multiobj_ref.py
 * (numpy, scipy, PyTorch) in tests/ref/multiobj_ref.txt; the gate's gradients also by
 * directional finite differences; determinism (twice, 1 vs 2 threads); bad input. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_rows_*, rwd_ridge_*, rwd_armo_*, rwd_gate_*, rwd_dpa_*, rwd_pareto_front, rwd_hypervolume, rwd_ssrm_* */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, check_close, check_grad, test_summary */
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- reference arrays: "name count v0 v1 ..." per line ---- */
static double *ref(const char *name, int *count) {
    FILE *f = fopen("tests/ref/multiobj_ref.txt", "r");
    char key[64];
    int n, i;
    double *out = NULL;
    if (!f) return NULL;
    while (fscanf(f, "%63s %d", key, &n) == 2) {
        int want = strcmp(key, name) == 0;
        double *a = want ? (double *)malloc((size_t)n * sizeof(double) + 1) : NULL;
        for (i = 0; i < n; i++) {
            char tok[64];
            if (fscanf(f, "%63s", tok) != 1) break;
            if (a) a[i] = strcmp(tok, "nan") == 0 ? NAN : strtod(tok, NULL);
        }
        if (want) { out = a; if (count) *count = n; break; }
    }
    fclose(f);
    if (!out) printf("missing reference array %s (run make goldens)\n", name);
    return out;
}

static float *ref_f(const char *name, int *count) {
    int n = 0, i;
    double *a = ref(name, &n);
    float *f = a ? (float *)malloc((size_t)n * sizeof(float) + 1) : NULL;
    if (f)
        for (i = 0; i < n; i++) f[i] = (float)a[i];
    free(a);
    if (count) *count = n;
    return f;
}

/* |got - want| <= atol + rtol |want| for doubles; NaN matches NaN */
static int close_d(const char *what, const double *got, const double *want, int n, double atol, double rtol) {
    int i;
    for (i = 0; i < n; i++) {
        int both_nan = got[i] != got[i] && want[i] != want[i];
        if (!both_nan && !(fabs(got[i] - want[i]) <= atol + rtol * fabs(want[i]))) {
            CHECK(0, "%s[%d]: got %.17g, want %.17g", what, i, got[i], want[i]);
            return 0;
        }
    }
    CHECK(1, "%s", what);
    return 1;
}

static void set_threads(int t) {
#ifdef _OPENMP
    omp_set_num_threads(t);
#else
    (void)t;
#endif
}

/* ============================== rows ============================== */

static void test_rows_csv(void) {
    static const char *const num[3] = {"helpfulness", "verbosity", "is_safe"};
    static const char *const txt[1] = {"response"};
    const char *csv =
        "id,response,helpfulness,extra,verbosity,is_safe\r\n"
        "1,\"a, quoted \"\"answer\"\"\",0.7,x,0.2,1\r\n"
        "\n"
        "2,\"two\nlines\",,y,NA,0\n"
        "3,plain, 0.5 ,z,nan,\n";
    rwd_rows r;
    moe_err err;
    TEST_BEGIN("rows: CSV with quotes, quoted newlines, blank lines and missing values");
    memset(&r, 0, sizeof r);
    CHECK(rwd_rows_parse_csv(&r, csv, strlen(csv), num, 3, txt, 1, &err) == MOE_OK, "%s", err.msg);
    CHECK(r.n == 3 && r.n_num == 3 && r.n_text == 1, "3 rows of 3 numbers and 1 text, got %zu", r.n);
    if (r.n == 3) {
        CHECK(r.num[0] == 0.7 && r.num[1] == 0.2 && r.num[2] == 1.0, "row 1 numbers");
        CHECK(strcmp(r.text[0], "a, quoted \"answer\"") == 0, "quoted text: %s", r.text[0]);
        CHECK(isnan(r.num[3]) && isnan(r.num[4]) && r.num[5] == 0.0, "empty and NA are missing");
        CHECK(strcmp(r.text[1], "two\nlines") == 0 && r.line[1] == 4 && r.line[2] == 6, "quoted newline; lines %d %d", r.line[1], r.line[2]);
        CHECK(r.num[6] == 0.5 && isnan(r.num[7]) && isnan(r.num[8]), "spaces around a number; nan; trailing empty field");
    }
    rwd_rows_free(&r);
}

static void test_rows_bad(void) {
    static const char *const num[2] = {"a", "b"};
    rwd_rows r;
    moe_err err;
    const char *bad_value = "a,b\n1,2\n3,oops\n";
    const char *bad_col = "a,c\n1,2\n";
    const char *short_row = "a,b\n1,2\n3\n";
    const char *quote = "a,b\n1,\"2\n";
    const char *inf = "a,b\n1,inf\n";
    TEST_BEGIN("rows: bad CSV values name their line and column");
    memset(&r, 0, sizeof r);
    CHECK(rwd_rows_parse_csv(&r, bad_value, strlen(bad_value), num, 2, NULL, 0, &err) == MOE_ERR_FORMAT &&
          strstr(err.msg, "line 3") && strstr(err.msg, "column 2") && strstr(err.msg, "'b'") && strstr(err.msg, "oops"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, bad_col, strlen(bad_col), num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "no column 'b'"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, short_row, strlen(short_row), num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 3") && strstr(err.msg, "1 fields"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, quote, strlen(quote), num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 2") && strstr(err.msg, "quotes"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, inf, strlen(inf), num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 2"), "infinity is not a rating: %s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, "a,b\n", 4, num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "no rows"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_csv(&r, "", 0, num, 2, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "empty"), "%s", err.msg);
    rwd_rows_free(&r);
}

static void test_rows_jsonl(void) {
    static const char *const num[3] = {"helpfulness", "verbosity", "is_safe"};
    static const char *const txt[1] = {"prompt"};
    const char *ok = "{\"prompt\": \"q\\u00e9\", \"helpfulness\": 3, \"is_safe\": true}\n"
                     "\n"
                     "{\"prompt\": \"r\", \"helpfulness\": null, \"verbosity\": 0.25, \"is_safe\": false}\r\n";
    const char *bad = "{\"prompt\": \"q\", \"helpfulness\": 3}\n\n{\"prompt\": \"r\", \"verbosity\": \"long\"}\n";
    const char *no_text = "{\"helpfulness\": 3}\n";
    const char *broken = "{\"prompt\": \"q\", \"helpfulness\": 3}\n{\"prompt\": \"r\", }\n";
    rwd_rows r;
    moe_err err;
    TEST_BEGIN("rows: JSON Lines with null, absent keys and booleans; bad values name line and column");
    memset(&r, 0, sizeof r);
    CHECK(rwd_rows_parse_jsonl(&r, ok, strlen(ok), num, 3, txt, 1, &err) == MOE_OK, "%s", err.msg);
    CHECK(r.n == 2 && r.line[1] == 3, "2 rows, the second on line 3");
    if (r.n == 2) {
        CHECK(r.num[0] == 3.0 && isnan(r.num[1]) && r.num[2] == 1.0, "absent key = missing, true = 1");
        CHECK(isnan(r.num[3]) && r.num[4] == 0.25 && r.num[5] == 0.0, "null = missing, false = 0");
        CHECK(strcmp(r.text[0], "q\xc3\xa9") == 0, "escapes decoded");
    }
    /* appending a second file to the same rows */
    CHECK(rwd_rows_parse_jsonl(&r, ok, strlen(ok), num, 3, txt, 1, &err) == MOE_OK && r.n == 4, "rows append");
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_jsonl(&r, bad, strlen(bad), num, 3, txt, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 3") &&
          strstr(err.msg, "'verbosity'") && strstr(err.msg, "column 2") && strstr(err.msg, "a string"), "the value's own line: %s", err.msg);
    CHECK(r.n == 1, "the rows before the error stay (%zu)", r.n);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_jsonl(&r, no_text, strlen(no_text), num, 3, txt, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "'prompt'") && strstr(err.msg, "line 1"), "%s", err.msg);
    rwd_rows_free(&r);
    CHECK(rwd_rows_parse_jsonl(&r, broken, strlen(broken), num, 3, txt, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 2"), "%s", err.msg);
    rwd_rows_free(&r);
}

/* ============================== ArmoRM stage 1 ============================== */

static void test_ridge_golden(void) {
    int n, nt, nw, i, pass;
    TEST_BEGIN("ridge: primal and underdetermined (dual) solutions = numpy; NaN targets skipped");
    for (pass = 0; pass < 2; pass++) {
        const char *tag = pass ? "ridge_d" : "ridge_p";
        char name[64];
        float *x;
        double *t, *lam, *w_ref, w[32];
        moe_err err;
        snprintf(name, sizeof name, "%s_x", tag); x = ref_f(name, &n);
        snprintf(name, sizeof name, "%s_t", tag); t = ref(name, &nt);
        snprintf(name, sizeof name, "%s_lambda", tag); lam = ref(name, NULL);
        snprintf(name, sizeof name, "%s_w", tag); w_ref = ref(name, &nw);
        if (!x || !t || !lam || !w_ref) { CHECK(0, "reference arrays"); return; }
        CHECK(rwd_ridge_solve(w, x, t, (size_t)nt, nw, lam[0], &err) == MOE_OK, "%s", err.msg);
        close_d(pass ? "dual ridge w" : "primal ridge w", w, w_ref, nw, 1e-12, 1e-9);
        (void)i;
        free(x); free(t); free(lam); free(w_ref);
    }
}

/* the normal equations' residual |(X^T X + lambda I) w - X^T t| / |X^T t| of a solution */
static double ridge_residual(const double *w, const float *x, const double *t, int n, int d, double lambda) {
    double *g = (double *)calloc((size_t)d, sizeof(double)), num = 0.0, den = 0.0;
    int i, j;
    for (i = 0; i < n; i++) {
        double p = 0.0;
        for (j = 0; j < d; j++) p += (double)x[i * d + j] * w[j];
        for (j = 0; j < d; j++) g[j] += (double)x[i * d + j] * (p - t[i]);
    }
    for (j = 0; j < d; j++) {
        double xt = 0.0, r = g[j] + lambda * w[j];
        for (i = 0; i < n; i++) xt += (double)x[i * d + j] * t[i];
        num += r * r;
        den += xt * xt;
    }
    free(g);
    return sqrt(num / den);
}

static void test_ridge_blocked(void) {
    enum { N = 640, D = 520 }; /* several blocks of 64, so the parallel loops of the Cholesky run */
    float *x = (float *)malloc((size_t)N * D * sizeof(float));
    double *t = (double *)malloc(N * sizeof(double)), *w1 = (double *)malloc(2 * N * sizeof(double)), *w2 = w1 + N;
    moe_rng rng;
    moe_err err;
    int i, pass;
    TEST_BEGIN("ridge over many Cholesky blocks (primal 520 features, dual 640 features): normal equations hold; 1 = 2 threads");
    moe_rng_seed(&rng, 8);
    for (i = 0; i < N * D; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < N; i++) t[i] = moe_rng_normal(&rng);
    for (pass = 0; pass < 2; pass++) { /* primal: 640 rows x 520; dual: 520 rows x 640 */
        int n = pass ? D : N, d = pass ? N : D;
        set_threads(1);
        CHECK(rwd_ridge_solve(w1, x, t, (size_t)n, d, 0.01, &err) == MOE_OK, "%s", err.msg);
        set_threads(2);
        CHECK(rwd_ridge_solve(w2, x, t, (size_t)n, d, 0.01, &err) == MOE_OK, "%s", err.msg);
        CHECK(memcmp(w1, w2, (size_t)d * sizeof(double)) == 0, "%s: 1 and 2 threads give the same bits", pass ? "dual" : "primal");
        CHECK(ridge_residual(w1, x, t, n, d, 0.01) < 1e-10, "%s: normal-equation residual %.3g", pass ? "dual" : "primal", ridge_residual(w1, x, t, n, d, 0.01));
    }
    free(x); free(t); free(w1);
}

static void test_regress_golden(void) {
    int n, K = 3, d = 5, i, k, q;
    float *x = ref_f("regress_x", &n), W[15];
    double *y = ref("regress_y", NULL), *val = ref("regress_val", NULL), *lam = ref("regress_lambda", NULL);
    double *mse = ref("regress_mse", NULL), *w_ref = ref("regress_w", NULL), got[27], Wd[15];
    unsigned char mask[80];
    rwd_ridge_config c = rwd_ridge_config_default();
    rwd_ridge_report rep[3];
    moe_err err;
    TEST_BEGIN("stage 1: the lambda grid per objective by validation MSE, fit on the 80% (= numpy)");
    if (!x || !y || !val || !lam || !mse || !w_ref) { CHECK(0, "reference arrays"); return; }
    for (i = 0; i < 80; i++) mask[i] = val[i] != 0.0;
    c.val_mask = mask;
    CHECK(rwd_armo_regress(W, rep, x, y, 80, d, K, &c, &err) == MOE_OK, "%s", err.msg);
    for (k = 0; k < K; k++) {
        CHECK(rep[k].lambda == lam[k], "objective %d: lambda %g, numpy %g", k, rep[k].lambda, lam[k]);
        for (q = 0; q < 9; q++) got[k * 9 + q] = rep[k].grid_mse[q];
        CHECK(!rep[k].underdetermined && rep[k].note[0] == 0, "80 rows for 5 features is not underdetermined");
    }
    close_d("validation MSE of every lambda", got, mse, 27, 1e-12, 1e-7);
    for (i = 0; i < 15; i++) Wd[i] = W[i];
    close_d("W (float)", Wd, w_ref, 15, 1e-6, 1e-6);
    free(x); free(y); free(val); free(lam); free(mse); free(w_ref);
}

static void test_verbosity_golden(void) {
    int n;
    double *V = ref("verb_V", &n), *pen = ref("verb_penalty", NULL), *cor = ref("verb_corr", NULL), p[5], c[5], out[10];
    double r[10] = {1, 2, 3, 4, 5, 0.5, -1, 0, 2, 1};
    moe_err err;
    TEST_BEGIN("verbosity de-correlation: penalties and Spearman correlations = the stage-2 script with scipy");
    if (!V || !pen || !cor) { CHECK(0, "reference arrays"); return; }
    CHECK(rwd_armo_verbosity_penalties(p, c, V, 300, 5, 1, RWD_ARMO_CORR_THRESHOLD, &err) == MOE_OK, "%s", err.msg);
    close_d("penalties", p, pen, 5, 0.0, 0.0);
    close_d("correlations", c, cor, 5, 1e-12, 1e-10);
    rwd_armo_transform(out, r, p, 2, 5, 1);
    CHECK(out[1] == 0.0 && out[6] == 0.0, "r~_v = 0 (p_v = 1)");
    CHECK(out[0] == 1.0 - p[0] * 2.0 && out[8] == 2.0 - p[3] * -1.0, "r~_j = r_j - p_j r_v");
    free(V); free(pen); free(cor);
}

/* ============================== ArmoRM stage 2: the gate ============================== */

static void load_gate(moe_store *s, const char *tag) {
    char name[128];
    int i;
    for (i = 0; i < s->count; i++) {
        const char *tn = s->tensors[i].name + 5; /* after "gate." */
        float *v;
        int cnt;
        if (strcmp(tn, "logit_scale") == 0) snprintf(name, sizeof name, "%s_scale", tag);
        else snprintf(name, sizeof name, "%s_%s", tag, tn);
        v = ref_f(name, &cnt);
        if (!v || (size_t)cnt != s->tensors[i].numel) { CHECK(0, "reference tensor %s", name); free(v); continue; }
        memcpy(moe_store_param(s, i), v, (size_t)cnt * sizeof(float));
        free(v);
    }
}

static void test_gate_golden(int n_hidden) {
    const char *tag = n_hidden ? "gate2" : "gate0";
    rwd_gate_config gc = rwd_gate_config_default();
    rwd_gate g;
    moe_store s;
    moe_err err;
    char name[128];
    float *x, gates[24], dg[24], dx[42];
    double *rw, *rl, *loss_ref;
    float *gates_ref, *dx_ref;
    int i, n;
    TEST_BEGIN(n_hidden ? "gate (2 hidden layers, tau 10): gates, BT loss, every gradient = PyTorch"
                        : "gate (no hidden layer, tau 1.5, beta 1.3): gates, BT loss, every gradient = PyTorch");
    gc.d_in = 7; gc.K = 4; gc.n_hidden = n_hidden; gc.d_hidden = 9; gc.temperature = n_hidden ? 10.0f : 1.5f; gc.max_rows = 6;
    moe_store_init(&s);
    CHECK(rwd_gate_init(&g, &gc, &s, "gate.", &err) == MOE_OK, "%s", err.msg);
    moe_store_alloc(&s, 0);
    load_gate(&s, tag);
    snprintf(name, sizeof name, "%s_x", tag); x = ref_f(name, &n);
    snprintf(name, sizeof name, "%s_rw", tag); rw = ref(name, NULL);
    snprintf(name, sizeof name, "%s_rl", tag); rl = ref(name, NULL);
    snprintf(name, sizeof name, "%s_loss", tag); loss_ref = ref(name, NULL);
    snprintf(name, sizeof name, "%s_gates", tag); gates_ref = ref_f(name, NULL);
    snprintf(name, sizeof name, "%s_dx", tag); dx_ref = ref_f(name, NULL);
    if (!x || !rw || !rl || !loss_ref || !gates_ref || !dx_ref) { CHECK(0, "reference arrays"); return; }
    rwd_gate_forward(&g, &s, gates, x, 6, NULL);
    check_close("gates", gates, gates_ref, 24, 1e-6, 1e-5);
    {
        double loss = rwd_gate_bt_loss(dg, gates, rw, rl, 6, 4, NULL);
        CHECK(fabs(loss - loss_ref[0]) < 1e-6, "BT loss %.9g vs %.9g", loss, loss_ref[0]);
    }
    moe_store_zero_grad(&s);
    memset(dx, 0, sizeof dx);
    rwd_gate_backward(&g, &s, dx, dg, x, 6);
    check_close("dL/dx", dx, dx_ref, 42, 1e-7, 1e-4);
    for (i = 0; i < s.count; i++) {
        const char *tn = s.tensors[i].name + 5;
        float *gr;
        if (strcmp(tn, "logit_scale") == 0) snprintf(name, sizeof name, "%s_gscale", tag);
        else snprintf(name, sizeof name, "%s_g%s", tag, tn);
        gr = ref_f(name, &n);
        if (gr && (size_t)n == s.tensors[i].numel) check_close(name, moe_store_grad(&s, i), gr, n, 1e-7, 1e-4);
        else CHECK(0, "reference gradient %s", name);
        free(gr);
    }
    free(x); free(rw); free(rl); free(loss_ref); free(gates_ref); free(dx_ref);
    rwd_gate_free(&g);
    moe_store_free(&s);
}

static double gate_loss(rwd_gate *g, moe_store *s, const float *x, const double *rw, const double *rl, int B) {
    float gates[64 * 5];
    rwd_gate_forward(g, s, gates, x, B, NULL);
    return rwd_gate_bt_loss(NULL, gates, rw, rl, B, g->cfg.K, NULL);
}

static void test_gate_gradcheck(void) {
    enum { B = 10, D = 6, K = 5 };
    rwd_gate_config gc = rwd_gate_config_default();
    rwd_gate g;
    moe_store s;
    moe_rng rng;
    moe_err err;
    float x[B * D], gates[B * K], dg[B * K], dx[B * D], *v, *p0;
    double rw[B * K], rl[B * K];
    int i, t;
    TEST_BEGIN("gate gradients: directional finite differences (parameters, beta, inputs)");
    gc.d_in = D; gc.K = K; gc.n_hidden = 2; gc.d_hidden = 8; gc.temperature = 2.0f; gc.max_rows = B;
    moe_store_init(&s);
    CHECK(rwd_gate_init(&g, &gc, &s, "gate.", &err) == MOE_OK, "%s", err.msg);
    moe_store_alloc(&s, 1);
    moe_rng_seed(&rng, 77);
    rwd_gate_init_weights(&g, &s, &rng);
    for (i = 0; i < (int)s.numel; i++) s.params[i] *= 2.5f; /* larger logits than at init */
    moe_store_param(&s, g.id_scale)[0] = 1.7f;
    for (i = 0; i < B * D; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < B * K; i++) { rw[i] = 2.0 * moe_rng_normal(&rng); rl[i] = 2.0 * moe_rng_normal(&rng); }
    rwd_gate_forward(&g, &s, gates, x, B, NULL);
    rwd_gate_bt_loss(dg, gates, rw, rl, B, K, NULL);
    moe_store_zero_grad(&s);
    memset(dx, 0, sizeof dx);
    rwd_gate_backward(&g, &s, dx, dg, x, B);
    v = (float *)malloc(s.numel * sizeof(float));
    p0 = (float *)malloc(s.numel * sizeof(float));
    memcpy(p0, s.params, s.numel * sizeof(float));
    for (t = 0; t < 4; t++) {
        double ana = 0.0, lp, lm, eps = 3e-5; /* small: a random direction soon crosses a ReLU kink */
        size_t j;
        for (j = 0; j < s.numel; j++) {
            v[j] = t == 3 ? (j == s.tensors[g.id_scale].offset ? 1.0f : 0.0f) : moe_rng_normal(&rng); /* t = 3: beta alone */
            ana += (double)v[j] * s.grads[j];
        }
        for (j = 0; j < s.numel; j++) s.params[j] = p0[j] + (float)eps * v[j];
        lp = gate_loss(&g, &s, x, rw, rl, B);
        for (j = 0; j < s.numel; j++) s.params[j] = p0[j] - (float)eps * v[j];
        lm = gate_loss(&g, &s, x, rw, rl, B);
        memcpy(s.params, p0, s.numel * sizeof(float));
        check_grad_tol(t == 3 ? "dL/dbeta" : "dL/dparams", ana, (lp - lm) / (2 * eps), 5e-3, 1e-4);
    }
    {
        float xp[B * D], vx[B * D];
        double ana = 0.0, lp, lm, eps = 3e-5;
        for (i = 0; i < B * D; i++) { vx[i] = moe_rng_normal(&rng); ana += (double)vx[i] * dx[i]; }
        for (i = 0; i < B * D; i++) xp[i] = x[i] + (float)eps * vx[i];
        lp = gate_loss(&g, &s, xp, rw, rl, B);
        for (i = 0; i < B * D; i++) xp[i] = x[i] - (float)eps * vx[i];
        lm = gate_loss(&g, &s, xp, rw, rl, B);
        check_grad_tol("dL/dx", ana, (lp - lm) / (2 * eps), 5e-3, 1e-4);
    }
    { /* gates are beta * a softmax: non-negative, summing to beta */
        double sum = 0.0;
        rwd_gate_forward(&g, &s, gates, x, B, NULL);
        for (i = 0; i < K; i++) { sum += gates[i]; CHECK(gates[i] >= 0.0f, "gate >= 0"); }
        CHECK(fabs(sum - 1.7) < 1e-5, "gates sum to beta: %g", sum);
    }
    { /* dropout: the same rng gives the same mask; training-mode outputs differ from evaluation */
        moe_rng r1, r2;
        float ga[B * K], gb[B * K];
        g.cfg.dropout = 0.5f;
        moe_rng_seed(&r1, 3); moe_rng_seed(&r2, 3);
        rwd_gate_forward(&g, &s, ga, x, B, &r1);
        rwd_gate_forward(&g, &s, gb, x, B, &r2);
        CHECK(memcmp(ga, gb, sizeof ga) == 0 && memcmp(ga, gates, sizeof ga) != 0, "dropout is seeded and active in training only");
    }
    free(v); free(p0);
    rwd_gate_free(&g);
    moe_store_free(&s);
}

/* ============================== ArmoRM end to end on a simulator ============================== */

/* responses with K = 3 latent attributes a, features h = A a + noise (D); prompts of 3 types
   whose features say their type (DP); a pair of type t prefers by the t-th objective mostly */
enum { SIM_D = 16, SIM_DP = 6, SIM_K = 3 };

static void sim_response(float *h, double *a, const float *A, moe_rng *rng) {
    int i, k;
    for (k = 0; k < SIM_K; k++) a[k] = moe_rng_normal(rng);
    for (i = 0; i < SIM_D; i++) {
        double s = 0.05 * moe_rng_normal(rng);
        for (k = 0; k < SIM_K; k++) s += A[i * SIM_K + k] * a[k];
        h[i] = (float)s;
    }
}

static void sim_prompt(float *p, int type, moe_rng *rng) {
    int i;
    for (i = 0; i < SIM_DP; i++) p[i] = 0.2f * moe_rng_normal(rng) + (i % SIM_K == type ? 1.0f : 0.0f);
}

static void test_armo_end_to_end(void) {
    enum { NR = 600, NP = 1500, NT = 600 };
    static const double dir[3][3] = {{1.0, 0.1, 0.1}, {0.1, 1.0, 0.1}, {0.1, 0.1, 1.0}};
    float A[SIM_D * SIM_K], *xr, *xw, *xl, *xp;
    double *y, a[SIM_K], b[SIM_K], *sw, *sl, *gates;
    int *type, i, k, threads;
    moe_rng rng;
    moe_err err;
    rwd_gate_config gc = rwd_gate_config_default();
    rwd_gate_train_config tc = rwd_gate_train_config_default();
    rwd_ridge_report rep[SIM_K];
    float *first_W = NULL, *first_gate = NULL;
    TEST_BEGIN("ArmoRM on a simulator: stage 1 recovers the ratings, the gate follows the prompt type and beats a fixed mix; 1 = 2 threads");
    xr = (float *)malloc((size_t)(NR * SIM_D + 2 * (NP + NT) * SIM_D + (NP + NT) * SIM_DP) * sizeof(float));
    xw = xr + NR * SIM_D; xl = xw + (NP + NT) * SIM_D; xp = xl + (NP + NT) * SIM_D;
    y = (double *)malloc((size_t)(NR * SIM_K + 2 * NT + NT * SIM_K) * sizeof(double));
    sw = y + NR * SIM_K; sl = sw + NT; gates = sl + NT;
    type = (int *)malloc((NP + NT) * sizeof(int));
    moe_rng_seed(&rng, 11);
    for (i = 0; i < SIM_D * SIM_K; i++) A[i] = moe_rng_normal(&rng);
    for (i = 0; i < NR; i++) { /* ratings: noisy attributes, 30% missing per objective */
        sim_response(xr + i * SIM_D, a, A, &rng);
        for (k = 0; k < SIM_K; k++) y[i * SIM_K + k] = moe_rng_uniform(&rng) < 0.3f ? NAN : a[k] + 0.1 * moe_rng_normal(&rng);
    }
    for (i = 0; i < NP + NT; i++) {
        double u = 0.0;
        type[i] = moe_rng_below(&rng, 3);
        sim_prompt(xp + i * SIM_DP, type[i], &rng);
        sim_response(xw + i * SIM_D, a, A, &rng);
        sim_response(xl + i * SIM_D, b, A, &rng);
        for (k = 0; k < SIM_K; k++) u += dir[type[i]][k] * (a[k] - b[k]);
        if (u < 0) { /* chosen first */
            float tmp[SIM_D];
            memcpy(tmp, xw + i * SIM_D, sizeof tmp);
            memcpy(xw + i * SIM_D, xl + i * SIM_D, sizeof tmp);
            memcpy(xl + i * SIM_D, tmp, sizeof tmp);
        }
    }
    for (threads = 1; threads <= 2; threads++) {
        rwd_armo m;
        rwd_train_stats ts;
        set_threads(threads);
        gc.d_in = SIM_DP; gc.n_hidden = 1; gc.d_hidden = 16; gc.temperature = 1.0f; gc.dropout = 0.0f; gc.max_rows = 128;
        CHECK(rwd_armo_init(&m, SIM_K, SIM_D, -1, &gc, 5, &err) == MOE_OK, "%s", err.msg);
        CHECK(rwd_armo_fit_regression(&m, rep, xr, y, NR, NULL, &err) == MOE_OK, "%s", err.msg);
        for (k = 0; k < SIM_K; k++) CHECK(rep[k].n_train > 300 && rep[k].n_val > 50 && rep[k].val_mse < 0.03, "objective %d: validation MSE %g (noise 0.01)", k, rep[k].val_mse);
        tc.steps = 400; tc.batch = 64; tc.lr = 1e-2f; tc.seed = 3;
        CHECK(rwd_armo_fit_gate(&m, xp, xw, xl, NP, &tc, 0, &ts, &err) == MOE_OK, "%s", err.msg);
        CHECK(rwd_armo_infer(&m, sw, NULL, gates, xw + NP * SIM_D, xp + NP * SIM_DP, NT, &err) == MOE_OK, "%s", err.msg);
        rwd_armo_infer(&m, sl, NULL, NULL, xl + NP * SIM_D, xp + NP * SIM_DP, NT, &err);
        if (threads == 1) {
            double acc = rwd_pair_accuracy(sw, sl, NT), mean[3][3], fixed;
            int cnt[3] = {0, 0, 0}, t;
            memset(mean, 0, sizeof mean);
            for (i = 0; i < NT; i++) {
                t = type[NP + i];
                cnt[t]++;
                for (k = 0; k < SIM_K; k++) mean[t][k] += gates[i * SIM_K + k];
            }
            for (t = 0; t < 3; t++) {
                for (k = 0; k < SIM_K; k++) mean[t][k] /= cnt[t];
                CHECK(mean[t][t] > mean[t][(t + 1) % 3] && mean[t][t] > mean[t][(t + 2) % 3], "prompt type %d: its objective gets the largest mean gate (%.3f %.3f %.3f)", t, mean[t][0], mean[t][1], mean[t][2]);
            }
            { /* the best fixed mix: one weight vector for every prompt (a linear BT head on r) */
                double *rw = (double *)malloc((size_t)2 * NT * SIM_K * sizeof(double)), *rl = rw + NT * SIM_K, best = 0.0;
                int q;
                rwd_armo_rewards(rw, m.W, xw + NP * SIM_D, NT, SIM_D, SIM_K);
                rwd_armo_rewards(rl, m.W, xl + NP * SIM_D, NT, SIM_D, SIM_K);
                for (q = 0; q < 3; q++) { /* each single direction, and the uniform one */
                    int ok = 0;
                    for (i = 0; i < NT; i++) {
                        double u = 0.0;
                        for (k = 0; k < SIM_K; k++) u += dir[q][k] * (rw[i * SIM_K + k] - rl[i * SIM_K + k]);
                        ok += u > 0;
                    }
                    if ((double)ok / NT > best) best = (double)ok / NT;
                }
                fixed = best;
                free(rw);
            }
            CHECK(acc > 0.9 && acc > fixed + 0.05, "gated accuracy %.3f vs best fixed mix %.3f", acc, fixed);
            first_W = (float *)malloc(sizeof(float) * SIM_K * SIM_D);
            memcpy(first_W, m.W, sizeof(float) * SIM_K * SIM_D);
            first_gate = (float *)malloc(m.store.numel * sizeof(float));
            memcpy(first_gate, m.store.params, m.store.numel * sizeof(float));
        } else {
            CHECK(memcmp(first_W, m.W, sizeof(float) * SIM_K * SIM_D) == 0, "stage 1: 1 and 2 threads give the same W");
            CHECK(memcmp(first_gate, m.store.params, m.store.numel * sizeof(float)) == 0, "stage 2: 1 and 2 threads give the same gate");
        }
        rwd_armo_free(&m);
    }
    set_threads(2);
    free(first_W); free(first_gate);
    free(xr); free(y); free(type);
}

static void test_armo_bad_input(void) {
    enum { N = 10, D = 4 };
    float x[N * D], W[2 * D];
    double y[N * 2], y_pen[2];
    rwd_ridge_config c = rwd_ridge_config_default();
    rwd_ridge_report rep[2];
    rwd_gate_config gc = rwd_gate_config_default();
    rwd_armo m;
    moe_err err;
    moe_rng rng;
    int i;
    TEST_BEGIN("ArmoRM bad input: all-NaN objective, fewer rows than features (lambda named), infinite target, bad configs");
    moe_rng_seed(&rng, 1);
    for (i = 0; i < N * D; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < N; i++) { y[2 * i] = moe_rng_normal(&rng); y[2 * i + 1] = NAN; }
    CHECK(rwd_armo_regress(W, rep, x, y, N, D, 2, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "objective 1 has no labelled rows"), "%s", err.msg);
    {
        double t_nan[N], w[D];
        for (i = 0; i < N; i++) t_nan[i] = NAN;
        CHECK(rwd_ridge_solve(w, x, t_nan, N, D, 1.0, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "NaN"), "all targets missing: %s", err.msg);
        CHECK(rwd_ridge_solve(w, x, y, N, D, 0.0, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "lambda"), "lambda 0: %s", err.msg);
    }
    /* 10 rows, 4 features: fine; 10 rows for 40 features: underdetermined but defined */
    {
        float xb[N * 40], Wb[40];
        double yb[N];
        for (i = 0; i < N * 40; i++) xb[i] = moe_rng_normal(&rng);
        for (i = 0; i < N; i++) yb[i] = moe_rng_normal(&rng);
        CHECK(rwd_armo_regress(Wb, rep, xb, yb, N, 40, 1, NULL, &err) == MOE_OK, "%s", err.msg);
        CHECK(rep[0].underdetermined && strstr(rep[0].note, "8 labelled training rows for 40 features") && strstr(rep[0].note, "lambda"),
              "the note names the rows, the features and lambda: %s", rep[0].note);
        c.fixed_lambda = 0.5;
        CHECK(rwd_armo_regress(Wb, rep, xb, yb, N, 40, 1, &c, &err) == MOE_OK && rep[0].lambda == 0.5 && rep[0].n_train == N &&
              strstr(rep[0].note, "lambda 0.5 (fixed)"), "fixed lambda fits every row: %s", rep[0].note);
        c.fixed_lambda = 0.0;
    }
    for (i = 0; i < N; i++) y[2 * i + 1] = i == 0 ? 1.0 : NAN; /* one labelled row: cannot validate */
    CHECK(rwd_armo_regress(W, rep, x, y, N, D, 2, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "fixed_lambda"), "%s", err.msg);
    y[3] = INFINITY;
    CHECK(rwd_armo_regress(W, rep, x, y, N, D, 2, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "infinite"), "%s", err.msg);
    c.lambdas[2] = 0.0;
    CHECK(rwd_armo_regress(W, rep, x, y, N, D, 2, &c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "> 0"), "%s", err.msg);
    CHECK(rwd_armo_verbosity_penalties(y_pen, NULL, y, N, 2, 2, 0.03, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "verbosity objective 2"), "%s", err.msg);
    gc.d_in = 3;
    gc.n_hidden = RWD_GATE_MAX_HIDDEN + 1;
    CHECK(rwd_armo_init(&m, 2, D, 0, &gc, 1, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "hidden"), "%s", err.msg);
    gc.n_hidden = 1; gc.d_hidden = 4; gc.max_rows = 8;
    gc.dropout = 1.0f;
    CHECK(rwd_armo_init(&m, 2, D, 0, &gc, 1, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "dropout"), "%s", err.msg);
    gc.dropout = 0.0f;
    CHECK(rwd_armo_init(&m, 2, D, 0, &gc, 1, &err) == MOE_OK, "%s", err.msg);
    {
        rwd_gate_train_config tc = rwd_gate_train_config_default();
        float xp[N * 3];
        for (i = 0; i < N * 3; i++) xp[i] = 0.0f;
        CHECK(rwd_armo_fit_gate(&m, xp, x, x, N, &tc, 0, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "max_rows"), "batch 1024 > max_rows 8: %s", err.msg);
        CHECK(rwd_armo_fit_verbosity(&m, NULL, x, 1, 0.03, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, ">= 2"), "%s", err.msg);
    }
    rwd_armo_free(&m);
}

/* ============================== DPA ============================== */

static void test_dpa(void) {
    int n, i, w[2], wh[32];
    double *theta = ref("dpa_theta", &n), *rwh = ref("dpa_wh", NULL), *rwb = ref("dpa_wb", NULL);
    double *hv = ref("dpa_half_v", NULL), *hw = ref("dpa_half_w", NULL), v[3], u[3];
    double cands[5 * 2] = {1, 0, 0, 1, 0.6, 0.6, 1, 0, -1, 2};
    size_t best = 99;
    char prompt[256];
    moe_err err;
    TEST_BEGIN("DPA: prompt weights = numpy's round(100 cos), round(100 sin); directions; best-of-n; bad input");
    if (!theta || !rwh || !rwb || !hv || !hw) { CHECK(0, "reference arrays"); return; }
    for (i = 0; i < n; i++) {
        rwd_dpa_direction_angle(v, theta[i]);
        CHECK(rwd_dpa_weights(w, v, 2, &err) == MOE_OK && w[0] == (int)rwh[i] && w[1] == (int)rwb[i], "angle %g: (%d, %d) vs numpy (%g, %g)", theta[i], w[0], w[1], rwh[i], rwb[i]);
    }
    CHECK(rwd_dpa_weights(wh, hv, 7, &err) == MOE_OK, "%s", err.msg);
    for (i = 0; i < 7; i++) CHECK(wh[i] == (int)hw[i], "100 * %g rounds half to even: %d vs %g", hv[i], wh[i], hw[i]);
    u[0] = 3.0; u[1] = -4.0;
    CHECK(rwd_dpa_direction(v, u, 2, &err) == MOE_OK && fabs(v[0] - 0.6) < 1e-15 && fabs(v[1] + 0.8) < 1e-15, "normalised (0.6, -0.8)");
    w[0] = 97; w[1] = -26;
    CHECK(rwd_dpa_weights_direction(v, w, 2, &err) == MOE_OK && fabs(atan2(v[1], v[0]) * 180.0 / 3.141592653589793 + 15.0) < 0.1, "(97, -26) is -15 degrees");
    CHECK(rwd_dpa_system_prompt(prompt, sizeof prompt, 97, -26, &err) == MOE_OK && strstr(prompt, "weighted rating = helpfulness*97 + verbosity*-26"), "%s", prompt);
    CHECK(rwd_dpa_system_prompt(prompt, 20, 97, -26, &err) == MOE_ERR_INVALID_ARG, "short buffer");
    rwd_dpa_direction_angle(v, 0.0);
    CHECK(rwd_dpa_best_of_n(&best, v, cands, 5, 2, &err) == MOE_OK && best == 0, "ties go to the lower index (%zu)", best);
    rwd_dpa_direction_angle(v, 3.141592653589793 / 2);
    CHECK(rwd_dpa_best_of_n(&best, v, cands, 5, 2, &err) == MOE_OK && best == 4, "the most verbose (%zu)", best);
    CHECK(fabs(rwd_dpa_scalarize(v, cands + 8, 2) - 2.0) < 1e-15, "v . r");
    u[0] = 0.0; u[1] = 0.0; u[2] = 0.0;
    CHECK(rwd_dpa_direction(v, u, 3, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "length 0"), "%s", err.msg);
    CHECK(rwd_dpa_weights(w, u, 2, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "length 0"), "%s", err.msg);
    w[0] = w[1] = 0;
    CHECK(rwd_dpa_weights_direction(v, w, 2, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "length 0"), "%s", err.msg);
    CHECK(rwd_dpa_best_of_n(&best, v, cands, 0, 2, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "at least one"), "%s", err.msg);
    cands[3] = NAN;
    CHECK(rwd_dpa_best_of_n(&best, v, cands, 5, 2, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "point 1, objective 1"), "%s", err.msg);
    free(theta); free(rwh); free(rwb); free(hv); free(hw);
}

static void test_fronts_golden(void) {
    int k;
    moe_err err;
    TEST_BEGIN("Pareto fronts (brute force) and hypervolumes (coordinate compression) in 2, 3, 4 objectives = numpy");
    for (k = 2; k <= 4; k++) {
        char name[64];
        int n, nf, i;
        double *pts, *front, *refp, *hv, got = -1.0;
        size_t idx[64], m = 0;
        snprintf(name, sizeof name, "pf%d_points", k); pts = ref(name, &n);
        snprintf(name, sizeof name, "pf%d_front", k); front = ref(name, &nf);
        snprintf(name, sizeof name, "hv%d_ref", k); refp = ref(name, NULL);
        snprintf(name, sizeof name, "hv%d_value", k); hv = ref(name, NULL);
        if (!pts || !front || !refp || !hv) { CHECK(0, "reference arrays"); return; }
        n /= k;
        CHECK(rwd_pareto_front(idx, &m, pts, (size_t)n, k, &err) == MOE_OK && (int)m == nf, "k=%d: %zu front points, numpy %d", k, m, nf);
        for (i = 0; i < nf && i < (int)m; i++) CHECK(idx[i] == (size_t)front[i], "k=%d: front point %d is %zu, numpy %g", k, i, idx[i], front[i]);
        CHECK(rwd_hypervolume(&got, pts, (size_t)n, k, refp, &err) == MOE_OK && fabs(got - hv[0]) <= 1e-10 * hv[0], "k=%d: hypervolume %.15g, numpy %.15g", k, got, hv[0]);
        { /* the front alone has the same hypervolume */
            double sub[64 * 4], hf;
            for (i = 0; i < (int)m; i++) memcpy(sub + i * k, pts + idx[i] * (size_t)k, (size_t)k * sizeof(double));
            CHECK(rwd_hypervolume(&hf, sub, m, k, refp, &err) == MOE_OK && fabs(hf - got) <= 1e-12 * got, "k=%d: the front's hypervolume is the set's", k);
        }
        free(pts); free(front); free(refp); free(hv);
    }
    {
        double p[2] = {2.0, 3.0}, r0[2] = {0.0, 1.0}, hv;
        CHECK(rwd_hypervolume(&hv, p, 1, 2, r0, &err) == MOE_OK && hv == 4.0, "one box: 2 x 2");
        r0[1] = 3.0;
        CHECK(rwd_hypervolume(&hv, p, 1, 2, r0, &err) == MOE_OK && hv == 0.0, "a point on the reference adds nothing");
        CHECK(rwd_hypervolume(&hv, p, 0, 2, r0, &err) == MOE_OK && hv == 0.0, "no points: 0");
        p[0] = NAN;
        CHECK(rwd_hypervolume(&hv, p, 1, 2, r0, &err) == MOE_ERR_INVALID_ARG, "NaN point");
    }
}

/* ============================== SSRM ============================== */

/* a pair model with fixed probabilities that records what it was trained on */
typedef struct mock_model {
    const double *p;
    size_t last_count;
    size_t last_idx[64];
    unsigned char last_wins[64];
    int calls;
} mock_model;

static moe_status mock_prob(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err) {
    mock_model *m = (mock_model *)ctx;
    size_t i;
    (void)err;
    for (i = 0; i < count; i++) p[i] = m->p[idx[i]];
    return MOE_OK;
}

static moe_status mock_train(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err) {
    mock_model *m = (mock_model *)ctx;
    (void)round; (void)err;
    m->calls++;
    m->last_count = count;
    memcpy(m->last_idx, idx, count * sizeof(size_t));
    memcpy(m->last_wins, a_wins, count);
    return MOE_OK;
}

static void test_ssrm_loop(void) {
    /* pool: pairs 0-1 labelled, 2-9 unlabelled with these P(a > b) */
    static const double p[10] = {0.5, 0.5, 0.95, 0.8, 0.81, 0.1, 0.2, 0.5, 0.85, 0.19};
    static const unsigned char truth[8] = {1, 1, 1, 0, 1, 0, 1, 1};
    size_t lab[2] = {0, 1}, unl[8] = {2, 3, 4, 5, 6, 7, 8, 9};
    unsigned char lab_wins[2] = {1, 0};
    mock_model mm;
    rwd_pair_model pm;
    rwd_ssrm_config c = rwd_ssrm_config_default();
    rwd_ssrm_round st[4];
    moe_err err;
    TEST_BEGIN("SSRM loop: strict threshold, pseudo-labels (or the script's true order), per-round statistics, bad input");
    memset(&mm, 0, sizeof mm);
    mm.p = p;
    memset(&pm, 0, sizeof pm);
    pm.ctx = &mm; pm.prob = mock_prob; pm.train = mock_train;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 8, &c, st, &err) == MOE_OK, "%s", err.msg);
    CHECK(mm.calls == 4, "round 0 + 3 rounds");
    CHECK(st[0].trained == 2 && st[0].kept == 0 && isnan(st[0].pseudo_accuracy), "round 0: the labelled pairs only");
    /* kept: 0.95 (a), 0.81 (a), 0.1 (b), 0.85 (a), 0.19 (b); not 0.8 (strict), 0.2, 0.5 */
    CHECK(st[1].kept == 5 && mm.last_count == 7 && fabs(st[1].kept_fraction - 5.0 / 8.0) < 1e-15, "5 of 8 kept, %zu", st[1].kept);
    CHECK(mm.last_idx[2] == 2 && mm.last_idx[3] == 4 && mm.last_idx[4] == 5 && mm.last_idx[5] == 8 && mm.last_idx[6] == 9, "the kept pairs in order");
    CHECK(mm.last_wins[0] == 1 && mm.last_wins[1] == 0 && mm.last_wins[2] == 1 && mm.last_wins[3] == 1 && mm.last_wins[4] == 0 && mm.last_wins[5] == 1 && mm.last_wins[6] == 0,
          "labelled pairs keep their labels; kept pairs get their pseudo-labels");
    /* pseudo-labels a,a,a,b,b,(tie: b),a,b vs truth 1,1,1,0,1,0,1,1: right at 2,3,4,5,7,8 */
    CHECK(fabs(st[1].pseudo_accuracy - 6.0 / 8.0) < 1e-15 && fabs(st[1].kept_accuracy - 4.0 / 5.0) < 1e-15, "pseudo %.3f kept %.3f", st[1].pseudo_accuracy, st[1].kept_accuracy);
    CHECK(fabs(st[1].mean_confidence - (0.95 + 0.8 + 0.81 + 0.9 + 0.8 + 0.5 + 0.85 + 0.81) / 8) < 1e-12, "mean confidence");
    c.keep_true_order = 1;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 8, &c, st, &err) == MOE_OK, "%s", err.msg);
    CHECK(mm.last_wins[6] == 1, "the script's variant trains the wrongly pseudo-labelled pair 9 with its true label");
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, NULL, 8, &c, st, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "true labels"), "%s", err.msg);
    c.keep_true_order = 0;
    c.threshold = 0.5;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 8, &c, st, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "(0.5, 1]"), "%s", err.msg);
    c.threshold = 1.2;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 8, &c, st, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "1.2"), "%s", err.msg);
    c.threshold = 1.0;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 8, &c, st, &err) == MOE_OK && st[1].kept == 0 && isnan(st[1].kept_accuracy), "threshold 1 keeps nothing");
    c.threshold = 0.8;
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 2, unl, truth, 0, &c, st, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "no unlabelled") == NULL && strstr(err.msg, "unlabelled pairs"), "%s", err.msg);
    CHECK(rwd_ssrm_run(&pm, lab, lab_wins, 0, unl, truth, 8, &c, st, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "labelled"), "%s", err.msg);
}

/* linear preference data: x_a, x_b (n, D), side a preferred with probability sigmoid(beta w.(a-b)) */
static void make_pool(float *xa, float *xb, unsigned char *a_wins, int n, int D, double beta, uint64_t seed, double *w) {
    moe_rng rng;
    int i, j;
    moe_rng_seed(&rng, 99);
    for (j = 0; j < D; j++) w[j] = moe_rng_normal(&rng);
    moe_rng_seed(&rng, seed);
    for (i = 0; i < n; i++) {
        double m = 0.0;
        for (j = 0; j < D; j++) {
            xa[i * D + j] = moe_rng_normal(&rng);
            xb[i * D + j] = moe_rng_normal(&rng);
            m += w[j] * (xa[i * D + j] - xb[i * D + j]);
        }
        a_wins[i] = moe_rng_uniform(&rng) < 1.0 / (1.0 + exp(-beta * m));
    }
}

typedef struct eval_ctx { rwd_pair_model *pm; const size_t *idx; const unsigned char *truth; size_t n; double *p; } eval_ctx;

static double eval_acc(void *ctx) {
    eval_ctx *e = (eval_ctx *)ctx;
    moe_err err;
    size_t i, ok = 0;
    if (e->pm->prob(e->pm->ctx, e->p, e->idx, e->n, &err) != MOE_OK) return NAN;
    for (i = 0; i < e->n; i++) ok += (e->p[i] > 0.5) == (e->truth[i] != 0);
    return (double)ok / (double)e->n;
}

/* one SSRM run (threshold 1 = the control: the same rounds, no pseudo-label passes) of a
   linear (kind 0) or MLP (1) head or the gate (2) on the pool; fills st (4 rounds) */
typedef struct ssrm_pool { float *xa, *xb; unsigned char *wins; size_t *ids; double *pbuf, *wtrue; int nl, nu, nt, d; } ssrm_pool;

static void ssrm_one(rwd_ssrm_round *st, const ssrm_pool *P, int kind, double threshold, int min_steps) {
    rwd_ssrm_config c = rwd_ssrm_config_default();
    rwd_pair_model pm;
    eval_ctx ec;
    rwd_head h;
    moe_store s;
    rwd_ssrm_head sh;
    rwd_ssrm_gate sg;
    rwd_gate g;
    double *ra = NULL;
    float *xp = NULL;
    moe_rng rng;
    moe_err err;
    int i, D = P->d, N = P->nl + P->nu + P->nt;
    moe_store_init(&s);
    moe_rng_seed(&rng, 4);
    memset(&sh, 0, sizeof sh);
    memset(&sg, 0, sizeof sg);
    if (kind < 2) {
        rwd_head_config hc = rwd_head_config_default();
        hc.kind = kind; hc.d_in = D; hc.d_hidden = 16; hc.max_rows = 64;
        CHECK(rwd_head_init(&h, &hc, &s, "rm.", &err) == MOE_OK, "%s", err.msg);
        moe_store_alloc(&s, 1);
        rwd_head_init_weights(&h, &s, &rng);
        sh.head = &h; sh.store = &s; sh.x_a = P->xa; sh.x_b = P->xb; sh.n = (size_t)N;
        sh.tc = rwd_train_config_default();
        sh.tc.batch = 32; sh.tc.epochs = 10; sh.tc.lr = 0.02f; sh.tc.lr_min = 0.002f; sh.tc.weight_decay = 0.0f;
        sh.min_steps = min_steps;
        pm = rwd_ssrm_head_model(&sh);
    } else {
        /* the gate mixes K = D rewards sign(w_k) x_k (so the true mix is non-negative, as a
           gate's is) with weights from a constant prompt */
        rwd_gate_config gc = rwd_gate_config_default();
        gc.d_in = 2; gc.K = D; gc.n_hidden = 1; gc.d_hidden = 8; gc.temperature = 1.0f; gc.dropout = 0.0f; gc.max_rows = 64;
        CHECK(rwd_gate_init(&g, &gc, &s, "gate.", &err) == MOE_OK, "%s", err.msg);
        moe_store_alloc(&s, 1);
        rwd_gate_init_weights(&g, &s, &rng);
        ra = (double *)malloc(2 * (size_t)N * D * sizeof(double));
        xp = (float *)malloc(2 * (size_t)N * sizeof(float));
        for (i = 0; i < N * D; i++) {
            double sg_k = P->wtrue[i % D] < 0 ? -1.0 : 1.0;
            ra[i] = sg_k * P->xa[i];
            ra[N * D + i] = sg_k * P->xb[i];
        }
        for (i = 0; i < 2 * N; i++) xp[i] = 1.0f;
        sg.gate = &g; sg.store = &s; sg.x = xp; sg.r_a = ra; sg.r_b = ra + N * D; sg.n = (size_t)N;
        sg.tc = rwd_gate_train_config_default();
        sg.tc.steps = 200; sg.tc.batch = 64; sg.tc.lr = 1e-2f;
        pm = rwd_ssrm_gate_model(&sg);
    }
    ec.pm = &pm; ec.idx = P->ids + P->nl + P->nu; ec.truth = P->wins + P->nl + P->nu; ec.n = (size_t)P->nt; ec.p = P->pbuf;
    pm.evaluate = eval_acc;
    pm.eval_ctx = &ec;
    c.threshold = threshold;
    CHECK(rwd_ssrm_run(&pm, P->ids, P->wins, (size_t)P->nl, P->ids + P->nl, P->wins + P->nl, (size_t)P->nu, &c, st, &err) == MOE_OK, "%s", err.msg);
    if (kind < 2) { rwd_head_free(&h); rwd_ssrm_head_free(&sh); }
    else { rwd_gate_free(&g); rwd_ssrm_gate_free(&sg); free(ra); free(xp); }
    moe_store_free(&s);
}

static void test_ssrm_heads(void) {
    enum { NL = 40, NU = 2000, NT = 1000, N = NL + NU + NT, D = 10 };
    ssrm_pool P;
    rwd_ssrm_round st[4], ctl[4], slow[4];
    double wtrue[D];
    int kind, i, r;
    static const char *const names[3] = {"linear", "mlp", "gate"};
    TEST_BEGIN("SSRM with the linear and MLP heads and the gate: kept pseudo-labels are the accurate ones; the control keeps none; min_steps");
    P.xa = (float *)malloc(2 * (size_t)N * D * sizeof(float));
    P.xb = P.xa + N * D;
    P.wins = (unsigned char *)malloc(N);
    P.ids = (size_t *)malloc(N * sizeof(size_t));
    P.pbuf = (double *)malloc(NT * sizeof(double));
    P.wtrue = wtrue;
    P.nl = NL; P.nu = NU; P.nt = NT; P.d = D;
    make_pool(P.xa, P.xb, P.wins, N, D, 2.0, 7, wtrue);
    for (i = 0; i < N; i++) P.ids[i] = (size_t)i;
    for (kind = 0; kind < 3; kind++) {
        ssrm_one(st, &P, kind, 0.8, 200);
        ssrm_one(ctl, &P, kind, 1.0, 200);
        printf("   %s: eval %.3f -> %.3f %.3f %.3f (control %.3f); kept %.3f %.3f %.3f; pseudo acc %.3f, kept acc %.3f\n", names[kind],
               st[0].eval, st[1].eval, st[2].eval, st[3].eval, ctl[3].eval, st[1].kept_fraction, st[2].kept_fraction, st[3].kept_fraction,
               st[1].pseudo_accuracy, st[1].kept_accuracy);
        CHECK(st[0].eval > 0.6 && st[0].eval == ctl[0].eval, "%s: round 0 learns from %d labels (%.3f), the same in both runs", names[kind], NL, st[0].eval);
        CHECK(st[1].kept > 0 && st[1].kept_accuracy > st[1].pseudo_accuracy, "%s: confident pseudo-labels are more accurate than all (%.3f vs %.3f)",
              names[kind], st[1].kept_accuracy, st[1].pseudo_accuracy);
        for (r = 1; r <= 3; r++) CHECK(ctl[r].kept == 0 && ctl[r].trained == NL && isfinite(st[r].eval), "%s round %d: the control trains on the labelled pairs only", names[kind], r);
        CHECK(st[3].mean_confidence != ctl[3].mean_confidence, "%s: the pseudo-labels change the model", names[kind]);
    }
    ssrm_one(slow, &P, 0, 0.8, 0); /* 2 steps an epoch, 10 epochs: an unconverged start */
    CHECK(st[1].mean_confidence > slow[1].mean_confidence + 0.05, "min_steps 200 trains the small labelled set further: confidence %.3f vs %.3f",
          st[1].mean_confidence, slow[1].mean_confidence);
    free(P.xa); free(P.wins); free(P.ids); free(P.pbuf);
}

int main(void) {
    test_rows_csv();
    test_rows_bad();
    test_rows_jsonl();
    test_ridge_golden();
    test_ridge_blocked();
    test_regress_golden();
    test_verbosity_golden();
    test_gate_golden(2);
    test_gate_golden(0);
    test_gate_gradcheck();
    test_armo_end_to_end();
    test_armo_bad_input();
    test_dpa();
    test_fronts_golden();
    test_ssrm_loop();
    test_ssrm_heads();
    return test_summary();
}
