/* test_kernels.c - every forward/backward kernel pair checked by directional finite
   differences (double objective, float kernels); the fast matmul and the blocked causal
   attention against their naive references. PyTorch goldens: tests/test_golden.c. */
#include "moe.h" /* defines: moe_matmul_*, moe_softmax_*, moe_activation_*, moe_swiglu_*,
                    moe_rmsnorm_*, moe_layernorm_*, moe_crossentropy_* */
#include "test.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static moe_rng rng;

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static float *randn(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float) + 1);
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * moe_rng_normal(&rng);
    return p;
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* A kernel under test: up to 3 float inputs (perturbed), one output, J = <out, w>. */
typedef struct kcase {
    const char *name;
    float *in[3];
    size_t n_in[3];
    float *grad[3];
    size_t n_out;
    void (*fwd)(struct kcase *k, float *out);
    void (*bwd)(struct kcase *k, const float *dout); /* accumulates into grad[] */
    int rows, n, m;                                  /* sizes the case needs */
    float *cache1, *cache2;
} kcase;

static void gradcheck(kcase *k, double rtol) {
    float *out = (float *)calloc(k->n_out, sizeof(float)), *w = randn(k->n_out, 1.0f);
    float *v[3] = {NULL, NULL, NULL}, *saved[3] = {NULL, NULL, NULL};
    const double eps = 1e-3;
    double analytic = 0.0, jp, jm;
    int i;
    size_t j;
    k->fwd(k, out);
    for (i = 0; i < 3; i++)
        if (k->in[i]) {
            k->grad[i] = (float *)calloc(k->n_in[i], sizeof(float));
            v[i] = randn(k->n_in[i], 1.0f);
            saved[i] = (float *)malloc(k->n_in[i] * sizeof(float));
            memcpy(saved[i], k->in[i], k->n_in[i] * sizeof(float));
        }
    k->bwd(k, w);
    for (i = 0; i < 3; i++)
        if (k->in[i]) analytic += dot(k->grad[i], v[i], k->n_in[i]);
    for (i = 0; i < 3; i++)
        if (k->in[i])
            for (j = 0; j < k->n_in[i]; j++) k->in[i][j] = saved[i][j] + (float)eps * v[i][j];
    k->fwd(k, out);
    jp = dot(out, w, k->n_out);
    for (i = 0; i < 3; i++)
        if (k->in[i])
            for (j = 0; j < k->n_in[i]; j++) k->in[i][j] = saved[i][j] - (float)eps * v[i][j];
    k->fwd(k, out);
    jm = dot(out, w, k->n_out);
    for (i = 0; i < 3; i++)
        if (k->in[i]) memcpy(k->in[i], saved[i], k->n_in[i] * sizeof(float));
    check_grad(k->name, analytic, (jp - jm) / (2 * eps), rtol);
    for (i = 0; i < 3; i++) {
        free(k->grad[i]); free(v[i]); free(saved[i]); free(k->in[i]);
        k->grad[i] = NULL;
        k->in[i] = NULL;
    }
    free(out);
    free(w);
    free(k->cache1);
    free(k->cache2);
    k->cache1 = k->cache2 = NULL;
}

/* ---- the cases ---- */
static void mm_fwd(kcase *k, float *out) { moe_matmul_forward(out, k->in[0], k->in[1], k->in[2], k->rows, k->n, k->m, NULL); }
static void mm_bwd(kcase *k, const float *d) { moe_matmul_backward(k->grad[0], k->grad[1], k->grad[2], d, k->in[0], k->in[1], k->rows, k->n, k->m, NULL); }
static void sm_fwd(kcase *k, float *out) { moe_softmax_forward(out, k->in[0], k->rows, k->n); }
static void sm_bwd(kcase *k, const float *d) {
    float *y = (float *)malloc(sizeof(float) * (size_t)k->rows * k->n);
    moe_softmax_forward(y, k->in[0], k->rows, k->n);
    moe_softmax_backward(k->grad[0], d, y, k->rows, k->n);
    free(y);
}
static moe_activation act_under_test;
static void act_fwd(kcase *k, float *out) { moe_activation_forward(out, k->in[0], k->n_in[0], act_under_test); }
static void act_bwd(kcase *k, const float *d) { moe_activation_backward(k->grad[0], d, k->in[0], k->n_in[0], act_under_test); }
static void sw_fwd(kcase *k, float *out) { moe_swiglu_forward(out, k->in[0], k->in[1], k->n_in[0]); }
static void sw_bwd(kcase *k, const float *d) { moe_swiglu_backward(k->grad[0], k->grad[1], d, k->in[0], k->in[1], k->n_in[0]); }
static void rms_fwd(kcase *k, float *out) {
    if (!k->cache1) k->cache1 = (float *)malloc(sizeof(float) * (size_t)k->rows);
    moe_rmsnorm_forward(out, k->cache1, k->in[0], k->in[1], k->rows, k->n, 1e-5f);
}
static void rms_bwd(kcase *k, const float *d) { moe_rmsnorm_backward(k->grad[0], k->grad[1], d, k->in[0], k->in[1], k->cache1, k->rows, k->n); }
static void ln_fwd(kcase *k, float *out) {
    if (!k->cache1) {
        k->cache1 = (float *)malloc(sizeof(float) * (size_t)k->rows);
        k->cache2 = (float *)malloc(sizeof(float) * (size_t)k->rows);
    }
    moe_layernorm_forward(out, k->cache1, k->cache2, k->in[0], k->in[1], k->in[2], k->rows, k->n, 1e-5f);
}
static void ln_bwd(kcase *k, const float *d) {
    moe_layernorm_backward(k->grad[0], k->grad[1], k->grad[2], d, k->in[0], k->in[1], k->cache1, k->cache2, k->rows, k->n);
}
static int ce_targets[64];
static void ce_fwd(kcase *k, float *out) { moe_crossentropy_forward(out, k->in[0], ce_targets, k->rows, k->n); }
static void ce_bwd(kcase *k, const float *d) {
    /* J = sum_r w_r loss_r: per-row weights; the kernel takes one dloss, so call per row */
    int r;
    for (r = 0; r < k->rows; r++)
        moe_crossentropy_backward(k->grad[0] + (size_t)r * k->n, k->in[0] + (size_t)r * k->n, ce_targets + r, 1, k->n, d[r]);
}

/* GRU: six inputs, checked three at a time with the other three held fixed */
static float *gru_fixed[3];
static int gru_split; /* 0: perturb x, h_prev, w_ih; 1: perturb w_hh, b_ih, b_hh */
static void gru_args(kcase *k, const float **in6) {
    int i;
    for (i = 0; i < 3; i++) {
        in6[gru_split ? 3 + i : i] = k->in[i];
        in6[gru_split ? i : 3 + i] = gru_fixed[i];
    }
}
static void gru_fwd(kcase *k, float *out) {
    const float *a[6];
    int N = k->rows, p = k->n;
    float *gi = (float *)malloc(sizeof(float) * (size_t)N * 3 * p), *gh = (float *)malloc(sizeof(float) * (size_t)N * 3 * p);
    gru_args(k, a); /* order: x, h_prev, w_ih | w_hh, b_ih, b_hh */
    moe_gru_forward(out, gi, gh, a[0], a[1], a[2], a[3], a[4], a[5], N, p, NULL);
    free(gi);
    free(gh);
}
static void gru_bwd(kcase *k, const float *d) {
    const float *a[6];
    int N = k->rows, p = k->n;
    float *gi = (float *)malloc(sizeof(float) * (size_t)N * 3 * p), *gh = (float *)malloc(sizeof(float) * (size_t)N * 3 * p);
    float *h = (float *)malloc(sizeof(float) * (size_t)N * p), *scratch = (float *)malloc(sizeof(float) * (size_t)N * 6 * p);
    float *g[6];
    int i;
    float *junk = (float *)calloc((size_t)3 * p * p + (size_t)N * p * 3, sizeof(float));
    gru_args(k, a);
    moe_gru_forward(h, gi, gh, a[0], a[1], a[2], a[3], a[4], a[5], N, p, NULL);
    for (i = 0; i < 6; i++) g[i] = junk; /* gradients of the fixed inputs go nowhere */
    for (i = 0; i < 3; i++) g[gru_split ? 3 + i : i] = k->grad[i];
    moe_gru_backward(g[0], g[1], g[2], g[3], g[4], g[5], d, a[0], a[1], gi, gh, a[2], a[3], N, p, scratch, NULL);
    free(gi); free(gh); free(h); free(scratch); free(junk);
}

static void test_gradchecks(void) {
    kcase k;
    int r;
    moe_activation acts[] = {MOE_ACT_SILU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_RELU};
    const char *act_names[] = {"silu", "gelu (erf)", "gelu (tanh)", "relu"};
    TEST_BEGIN("kernels: forward/backward pairs by directional finite differences");
    memset(&k, 0, sizeof k);
    k.name = "matmul (with bias)"; k.rows = 37; k.n = 29; k.m = 41;
    k.in[0] = randn(37 * 29, 1.0f); k.n_in[0] = 37 * 29;
    k.in[1] = randn(41 * 29, 0.3f); k.n_in[1] = 41 * 29;
    k.in[2] = randn(41, 1.0f); k.n_in[2] = 41;
    k.n_out = 37 * 41; k.fwd = mm_fwd; k.bwd = mm_bwd;
    gradcheck(&k, 1e-3);
    k.name = "matmul (large, parallel path)"; k.rows = 300; k.n = 70; k.m = 90;
    k.in[0] = randn(300 * 70, 1.0f); k.n_in[0] = 300 * 70;
    k.in[1] = randn(90 * 70, 0.3f); k.n_in[1] = 90 * 70;
    k.in[2] = NULL;
    k.n_out = 300 * 90;
    gradcheck(&k, 1e-3);
    k.name = "softmax"; k.rows = 9; k.n = 13; k.in[0] = randn(9 * 13, 2.0f); k.n_in[0] = 9 * 13;
    k.n_out = 9 * 13; k.fwd = sm_fwd; k.bwd = sm_bwd;
    gradcheck(&k, 1e-3);
    for (r = 0; r < 4; r++) {
        act_under_test = acts[r];
        k.name = act_names[r]; k.in[0] = randn(500, 2.0f); k.n_in[0] = 500; k.n_out = 500;
        k.fwd = act_fwd; k.bwd = act_bwd;
        gradcheck(&k, r == 3 ? 1e-2 : 1e-3); /* a ReLU kink inside eps is possible but rare */
    }
    k.name = "swiglu"; k.in[0] = randn(400, 2.0f); k.in[1] = randn(400, 1.0f); k.n_in[0] = k.n_in[1] = 400;
    k.n_out = 400; k.fwd = sw_fwd; k.bwd = sw_bwd;
    gradcheck(&k, 1e-3);
    k.name = "rmsnorm"; k.rows = 7; k.n = 24; k.in[0] = randn(7 * 24, 1.5f); k.n_in[0] = 7 * 24;
    k.in[1] = randn(24, 1.0f); k.n_in[1] = 24; k.n_out = 7 * 24; k.fwd = rms_fwd; k.bwd = rms_bwd;
    gradcheck(&k, 1e-3);
    k.name = "layernorm"; k.rows = 7; k.n = 24; k.in[0] = randn(7 * 24, 1.5f); k.n_in[0] = 7 * 24;
    k.in[1] = randn(24, 1.0f); k.n_in[1] = 24; k.in[2] = randn(24, 1.0f); k.n_in[2] = 24;
    k.n_out = 7 * 24; k.fwd = ln_fwd; k.bwd = ln_bwd;
    gradcheck(&k, 1e-3);
    for (gru_split = 0; gru_split < 2; gru_split++) {
        int N = 6, p = 5;
        /* fixed inputs of this half, then the perturbed ones */
        if (gru_split == 0) {
            gru_fixed[0] = randn((size_t)3 * p * p, 0.5f); gru_fixed[1] = randn((size_t)3 * p, 0.5f); gru_fixed[2] = randn((size_t)3 * p, 0.5f);
            k.in[0] = randn((size_t)N * p, 1.0f); k.n_in[0] = (size_t)N * p;
            k.in[1] = randn((size_t)N * p, 1.0f); k.n_in[1] = (size_t)N * p;
            k.in[2] = randn((size_t)3 * p * p, 0.5f); k.n_in[2] = (size_t)3 * p * p;
            k.name = "gru (x, h_prev, w_ih)";
        } else {
            gru_fixed[0] = randn((size_t)N * p, 1.0f); gru_fixed[1] = randn((size_t)N * p, 1.0f); gru_fixed[2] = randn((size_t)3 * p * p, 0.5f);
            k.in[0] = randn((size_t)3 * p * p, 0.5f); k.n_in[0] = (size_t)3 * p * p;
            k.in[1] = randn((size_t)3 * p, 0.5f); k.n_in[1] = (size_t)3 * p;
            k.in[2] = randn((size_t)3 * p, 0.5f); k.n_in[2] = (size_t)3 * p;
            k.name = "gru (w_hh, b_ih, b_hh)";
        }
        k.rows = N; k.n = p; k.n_out = (size_t)N * p; k.fwd = gru_fwd; k.bwd = gru_bwd;
        gradcheck(&k, 1e-3);
        free(gru_fixed[0]); free(gru_fixed[1]); free(gru_fixed[2]);
    }
    for (r = 0; r < 11; r++) ce_targets[r] = r == 4 ? -1 : (r * 7) % 19; /* one ignored row */
    k.name = "cross-entropy (one row ignored)"; k.rows = 11; k.n = 19; k.in[0] = randn(11 * 19, 2.0f);
    k.n_in[0] = 11 * 19; k.n_out = 11; k.fwd = ce_fwd; k.bwd = ce_bwd;
    gradcheck(&k, 5e-3); /* float losses ~3 per row: rounding ~1e-3 after / 2eps */
}

static void test_crossentropy_value(void) {
    float logits[2 * 3] = {1.0f, 2.0f, 3.0f, 0.0f, 0.0f, 0.0f}, losses[2];
    int targets[2] = {2, -1};
    double mean;
    TEST_BEGIN("cross-entropy: value, ignored rows");
    mean = moe_crossentropy_forward(losses, logits, targets, 2, 3);
    CHECK(fabs(losses[0] - (log(exp(1.0) + exp(2.0) + exp(3.0)) - 3.0)) < 1e-6 && losses[1] == 0.0f, "row losses");
    CHECK(fabs(mean - losses[0]) < 1e-9, "mean over counted rows only");
    { /* a NaN anywhere in a counted row (a diverged run) shows in its loss and gradient */
        float bad[20], dz[20] = {0};
        int t = 3, i;
        for (i = 0; i < 20; i++) bad[i] = 0.1f * (float)i;
        bad[17] = NAN;
        moe_crossentropy_forward(losses, bad, &t, 1, 20);
        moe_crossentropy_backward(dz, bad, &t, 1, 20, 1.0f);
        CHECK(losses[0] != losses[0] && dz[3] != dz[3], "NaN logit off the target: loss %g, dz[target] %g", losses[0], dz[3]);
    }
}

static void test_matmul_vs_naive(void) {
    int shapes[][3] = {{1, 1, 1}, {5, 3, 7}, {33, 65, 17}, {130, 40, 300}, {64, 257, 129}};
    size_t s;
    TEST_BEGIN("matmul: fast (blocked) against the naive reference");
    for (s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = shapes[s][0], K = shapes[s][1], N = shapes[s][2];
        float *x = randn((size_t)M * K, 1.0f), *w = randn((size_t)N * K, 1.0f), *b = randn((size_t)N, 1.0f);
        float *dy = randn((size_t)M * N, 1.0f);
        float *o1 = (float *)calloc((size_t)M * N, 4), *o2 = (float *)calloc((size_t)M * N, 4);
        float *dx1 = (float *)calloc((size_t)M * K, 4), *dx2 = (float *)calloc((size_t)M * K, 4);
        float *dw1 = (float *)calloc((size_t)N * K, 4), *dw2 = (float *)calloc((size_t)N * K, 4);
        float *db1 = (float *)calloc((size_t)N, 4), *db2 = (float *)calloc((size_t)N, 4);
        double tol = 1e-5 * sqrt((double)K);
        moe_matmul_forward(o1, x, w, b, M, K, N, NULL);
        moe_matmul_forward_naive(o2, x, w, b, M, K, N);
        check_close("matmul forward", o1, o2, (size_t)M * N, tol, 1e-5);
        moe_matmul_backward(dx1, dw1, db1, dy, x, w, M, K, N, NULL);
        moe_matmul_backward_naive(dx2, dw2, db2, dy, x, w, M, K, N);
        check_close("matmul dinp", dx1, dx2, (size_t)M * K, 1e-5 * sqrt((double)N), 1e-5);
        check_close("matmul dweight", dw1, dw2, (size_t)N * K, 1e-5 * sqrt((double)M), 1e-5);
        check_close("matmul dbias", db1, db2, (size_t)N, 1e-5 * sqrt((double)M), 1e-5);
        free(x); free(w); free(b); free(dy); free(o1); free(o2); free(dx1); free(dx2);
        free(dw1); free(dw2); free(db1); free(db2);
    }
}

/* One attention shape: moe_attention_forward/backward on 1 and 2 threads against the naive
   pair. out, att and dqkv start from garbage: every element must be written (att's upper
   triangle with zeros). T around the query/key block (32 rows) and its multiples. */
static void attention_case(int B, int T, int NH, int hd) {
    int d = NH * hd, t;
    size_t nqkv = (size_t)B * T * 3 * d, nout = (size_t)B * T * d, natt = (size_t)B * NH * T * T;
    float *qkv = randn(nqkv, 1.0f), *dout = randn(nout, 1.0f);
    float *out[3], *att[3], *dqkv[3];
    char name[128];
    for (t = 0; t < 3; t++) {
        out[t] = (float *)malloc(nout * sizeof(float));
        att[t] = (float *)malloc(natt * sizeof(float));
        dqkv[t] = (float *)malloc(nqkv * sizeof(float));
        memset(out[t], 0x7f, nout * sizeof(float));
        memset(att[t], 0x7f, natt * sizeof(float));
        memset(dqkv[t], 0x7f, nqkv * sizeof(float));
        if (t == 0) {
            moe_attention_forward_naive(out[t], att[t], qkv, B, T, d, NH);
            moe_attention_backward_naive(dqkv[t], dout, qkv, att[t], B, T, d, NH);
        } else {
            set_threads(t);
            moe_attention_forward(out[t], att[t], qkv, B, T, d, NH, NULL);
            moe_attention_backward(dqkv[t], dout, qkv, att[t], B, T, d, NH, NULL);
        }
    }
    set_threads(2);
    snprintf(name, sizeof name, "B=%d T=%d NH=%d hd=%d out", B, T, NH, hd);
    check_close(name, out[1], out[0], nout, 1e-5, 1e-4);
    snprintf(name, sizeof name, "B=%d T=%d NH=%d hd=%d att", B, T, NH, hd);
    check_close(name, att[1], att[0], natt, 1e-6, 1e-4);
    snprintf(name, sizeof name, "B=%d T=%d NH=%d hd=%d dqkv", B, T, NH, hd);
    check_close(name, dqkv[1], dqkv[0], nqkv, 1e-5, 1e-4);
    {
        size_t r, u, zeros = 1;
        for (r = 0; r < (size_t)B * NH * T; r++)
            for (u = r % (size_t)T + 1; u < (size_t)T; u++) zeros &= att[1][r * T + u] == 0.0f;
        CHECK(zeros, "B=%d T=%d NH=%d: probabilities above the diagonal are not 0", B, T, NH);
    }
    CHECK(memcmp(out[1], out[2], nout * sizeof(float)) == 0 && memcmp(att[1], att[2], natt * sizeof(float)) == 0,
          "B=%d T=%d NH=%d: forward differs between 1 and 2 threads", B, T, NH);
    CHECK(memcmp(dqkv[1], dqkv[2], nqkv * sizeof(float)) == 0, "B=%d T=%d NH=%d: backward differs between 1 and 2 threads",
          B, T, NH);
    for (t = 0; t < 3; t++) {
        free(out[t]); free(att[t]); free(dqkv[t]);
    }
    free(qkv);
    free(dout);
}

static void test_attention_vs_naive(void) {
    TEST_BEGIN("causal attention: blocked against the naive reference, 1 and 2 threads");
    attention_case(1, 1, 1, 4);
    attention_case(2, 31, 2, 8);
    attention_case(2, 32, 4, 6);
    attention_case(1, 33, 1, 16);
    attention_case(3, 70, 3, 10);
    attention_case(1, 129, 2, 32);
}

/* The naive pair's backward against finite differences, so that the reference the blocked
   pair is compared with is itself right: J = <out, w> over a perturbation of qkv. */
static void test_attention_naive_grad(void) {
    int B = 2, T = 9, NH = 2, hd = 4, d = NH * hd;
    size_t nqkv = (size_t)B * T * 3 * d, nout = (size_t)B * T * d, natt = (size_t)B * NH * T * T, i;
    float *qkv = randn(nqkv, 1.0f), *w = randn(nout, 1.0f), *v = randn(nqkv, 1.0f);
    float *out = (float *)malloc(nout * sizeof(float)), *att = (float *)malloc(natt * sizeof(float));
    float *dqkv = (float *)malloc(nqkv * sizeof(float)), *x = (float *)malloc(nqkv * sizeof(float));
    const double eps = 1e-3;
    double jp, jm;
    TEST_BEGIN("causal attention: the naive backward by directional finite differences");
    moe_attention_forward_naive(out, att, qkv, B, T, d, NH);
    moe_attention_backward_naive(dqkv, w, qkv, att, B, T, d, NH);
    for (i = 0; i < nqkv; i++) x[i] = qkv[i] + (float)eps * v[i];
    moe_attention_forward_naive(out, att, x, B, T, d, NH);
    jp = dot(out, w, nout);
    for (i = 0; i < nqkv; i++) x[i] = qkv[i] - (float)eps * v[i];
    moe_attention_forward_naive(out, att, x, B, T, d, NH);
    jm = dot(out, w, nout);
    check_grad("attention (naive) dqkv", dot(dqkv, v, nqkv), (jp - jm) / (2 * eps), 1e-3);
    free(qkv); free(w); free(v); free(out); free(att); free(dqkv); free(x);
}

int main(void) {
    moe_rng_seed(&rng, 2026);
    test_gradchecks();
    test_crossentropy_value();
    test_matmul_vs_naive();
    test_attention_vs_naive();
    test_attention_naive_grad();
    return test_summary();
}
