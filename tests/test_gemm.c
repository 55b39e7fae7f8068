/* test_gemm.c - the blocked GEMM against its naive reference, the matmul and expert pairs
   against naive compositions, and bit-identity between 1 and 2 OpenMP threads. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "tests/test.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static void fill(float *x, size_t n, moe_rng *r) {
    size_t i;
    for (i = 0; i < n; i++) x[i] = 2.0f * moe_rng_uniform(r) - 1.0f;
}

static float *falloc(size_t n) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    if (!p) {
        printf("out of memory\n");
        exit(1);
    }
    return p;
}

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* one GEMM case: C (M,N) (+)= op(A) . B with leading dims wider than the matrices; the
   padding around C must stay untouched */
static int gemm_case(moe_rng *r, int M, int N, int K, int a_trans, int accumulate, int pad) {
    int lda = (a_trans ? M : K) + pad, ldb = N + pad, ldc = N + pad;
    size_t na = (size_t)(a_trans ? K : M) * lda, nb = (size_t)K * ldb, nc = (size_t)M * ldc;
    float *A = falloc(na), *B = falloc(nb), *C = falloc(nc), *R = falloc(nc);
    size_t i;
    int ok, i2, j;
    double scale = K > 0 ? sqrt((double)K) : 1.0;
    char name[128];
    fill(A, na, r);
    fill(B, nb, r);
    fill(C, nc, r);
    memcpy(R, C, nc * sizeof(float));
    moe_gemm(M, N, K, A, lda, a_trans, B, ldb, C, ldc, accumulate, NULL);
    moe_gemm_naive(M, N, K, A, lda, a_trans, B, ldb, R, ldc, accumulate);
    snprintf(name, sizeof name, "gemm M=%d N=%d K=%d at=%d acc=%d", M, N, K, a_trans, accumulate);
    ok = check_close(name, C, R, nc, 1e-5 * scale, 1e-5);
    /* the padding columns are the same in both (fill), so equality there means untouched */
    for (i2 = 0; i2 < M; i2++)
        for (j = N; j < ldc; j++)
            if (C[(size_t)i2 * ldc + j] != R[(size_t)i2 * ldc + j]) ok = 0;
    (void)i;
    free(A);
    free(B);
    free(C);
    free(R);
    return ok;
}

static void test_gemm_shapes(void) {
    /* sizes around the tile and block sizes: 1, MR +- 1, NR +- 1, KC +- 1, MC + 1 */
    int sizes[] = {1, 2, 3, MOE_GEMM_MR - 1, MOE_GEMM_MR, MOE_GEMM_MR + 1, MOE_GEMM_NR - 1, MOE_GEMM_NR + 1,
                   37, MOE_GEMM_KC - 1, MOE_GEMM_KC + 3, MOE_GEMM_MC + 5};
    int ns = (int)(sizeof sizes / sizeof sizes[0]), a, b, c, at, acc, bad = 0, count = 0;
    moe_rng r;
    TEST_BEGIN("moe_gemm vs moe_gemm_naive over odd shapes, a_trans, accumulate, wide leading dims");
    moe_rng_seed(&r, 11);
    for (a = 0; a < ns; a++)
        for (b = 0; b < ns; b++)
            for (c = 0; c < ns; c++) {
                /* all (M, N) pairs at a few K, all K at a few (M, N): enough and quick */
                if (!(c % 4 == 0 || (a % 5 == 0 && b % 5 == 0))) continue;
                for (at = 0; at < 2; at++)
                    for (acc = 0; acc < 2; acc++) {
                        if ((a + b + c + at + acc) % 2) continue;
                        count++;
                        if (!gemm_case(&r, sizes[a], sizes[b], sizes[c], at, acc, (a + b) % 3 * 5)) bad++;
                    }
            }
    CHECK(bad == 0, "%d of %d GEMM cases differ from the reference", bad, count);
    CHECK(gemm_case(&r, MOE_GEMM_MC * 2 + 7, MOE_GEMM_NC + MOE_GEMM_NR + 3, 2 * MOE_GEMM_KC + 9, 0, 1, 4),
          "GEMM past every block size");
    CHECK(gemm_case(&r, 300, 70, 600, 1, 0, 1), "GEMM a_trans, several K blocks");
    CHECK(gemm_case(&r, 5, 3, 0, 0, 0, 2), "K = 0 overwrites with zeros");
    CHECK(gemm_case(&r, 5, 3, 0, 1, 1, 2), "K = 0 accumulate leaves C");
}

/* the same element must get the same bits wherever it lies: a row computed alone equals
   that row inside a large product */
static void test_gemm_position(void) {
    int M = 2 * MOE_GEMM_MC + 3, N = MOE_GEMM_NR * 3 + 5, K = MOE_GEMM_KC + 17, i;
    float *A = falloc((size_t)M * K), *B = falloc((size_t)K * N), *C = falloc((size_t)M * N), *c1 = falloc(N);
    moe_rng r;
    int same = 1;
    TEST_BEGIN("moe_gemm: an element's bits do not depend on its position");
    moe_rng_seed(&r, 5);
    fill(A, (size_t)M * K, &r);
    fill(B, (size_t)K * N, &r);
    moe_gemm(M, N, K, A, K, 0, B, N, C, N, 0, NULL);
    for (i = 0; i < M; i += 37) {
        moe_gemm(1, N, K, A + (size_t)i * K, K, 0, B, N, c1, N, 0, NULL);
        if (memcmp(c1, C + (size_t)i * N, (size_t)N * sizeof(float)) != 0) same = 0;
        /* and a single column of that row */
        moe_gemm(1, 1, K, A + (size_t)i * K, K, 0, B + N - 1, N, c1, 1, 0, NULL);
        if (memcmp(c1, C + (size_t)i * N + N - 1, sizeof(float)) != 0) same = 0;
    }
    CHECK(same, "rows (and single elements) computed alone differ from the full product");
    free(A);
    free(B);
    free(C);
    free(c1);
}

static void test_matmul(void) {
    int shapes[][3] = {{1, 1, 1}, {7, 5, 3}, {64, 33, 17}, {129, 300, 40}, {300, 65, 257}, {5, 700, 9}};
    int ns = (int)(sizeof shapes / sizeof shapes[0]), s;
    moe_rng r;
    TEST_BEGIN("moe_matmul_forward/backward vs naive");
    moe_rng_seed(&r, 7);
    for (s = 0; s < ns; s++) {
        int M = shapes[s][0], K = shapes[s][1], N = shapes[s][2];
        float *x = falloc((size_t)M * K), *w = falloc((size_t)N * K), *bias = falloc(N), *dy = falloc((size_t)M * N);
        float *y = falloc((size_t)M * N), *y0 = falloc((size_t)M * N);
        float *dx = falloc((size_t)M * K), *dx0 = falloc((size_t)M * K), *dw = falloc((size_t)N * K),
              *dw0 = falloc((size_t)N * K), *db = falloc(N), *db0 = falloc(N);
        double tol = 1e-5 * sqrt((double)(K > M ? (K > N ? K : N) : (M > N ? M : N)));
        fill(x, (size_t)M * K, &r);
        fill(w, (size_t)N * K, &r);
        fill(bias, N, &r);
        fill(dy, (size_t)M * N, &r);
        fill(dx, (size_t)M * K, &r); /* backward accumulates: start from the same values */
        memcpy(dx0, dx, (size_t)M * K * sizeof(float));
        fill(dw, (size_t)N * K, &r);
        memcpy(dw0, dw, (size_t)N * K * sizeof(float));
        fill(db, N, &r);
        memcpy(db0, db, (size_t)N * sizeof(float));
        moe_matmul_forward(y, x, w, bias, M, K, N, NULL);
        moe_matmul_forward_naive(y0, x, w, bias, M, K, N);
        check_close("matmul forward", y, y0, (size_t)M * N, tol, 1e-5);
        moe_matmul_backward(dx, dw, db, dy, x, w, M, K, N, NULL);
        moe_matmul_backward_naive(dx0, dw0, db0, dy, x, w, M, K, N);
        check_close("matmul backward dinp", dx, dx0, (size_t)M * K, tol, 1e-5);
        check_close("matmul backward dweight", dw, dw0, (size_t)N * K, tol, 1e-5);
        check_close("matmul backward dbias", db, db0, N, tol, 1e-5);
        free(x); free(w); free(bias); free(dy); free(y); free(y0);
        free(dx); free(dx0); free(dw); free(dw0); free(db); free(db0);
    }
}

/* matmul results for 1 and 2 threads must be the same bits */
static void test_matmul_threads(void) {
    int M = 517, K = 300, N = 130;
    float *x = falloc((size_t)M * K), *w = falloc((size_t)N * K), *dy = falloc((size_t)M * N);
    float *y1 = falloc((size_t)M * N), *y2 = falloc((size_t)M * N);
    float *dx1 = falloc((size_t)M * K), *dx2 = falloc((size_t)M * K), *dw1 = falloc((size_t)N * K),
          *dw2 = falloc((size_t)N * K), *db1 = falloc(N), *db2 = falloc(N);
    moe_rng r;
    TEST_BEGIN("moe_matmul_forward/backward: 1 and 2 threads give the same bits");
    moe_rng_seed(&r, 9);
    fill(x, (size_t)M * K, &r);
    fill(w, (size_t)N * K, &r);
    fill(dy, (size_t)M * N, &r);
    memset(dx1, 0, (size_t)M * K * sizeof(float)); memset(dx2, 0, (size_t)M * K * sizeof(float));
    memset(dw1, 0, (size_t)N * K * sizeof(float)); memset(dw2, 0, (size_t)N * K * sizeof(float));
    memset(db1, 0, (size_t)N * sizeof(float)); memset(db2, 0, (size_t)N * sizeof(float));
    set_threads(1);
    moe_matmul_forward(y1, x, w, NULL, M, K, N, NULL);
    moe_matmul_backward(dx1, dw1, db1, dy, x, w, M, K, N, NULL);
    /* a small-M product takes the column split */
    moe_matmul_backward(NULL, dw1, NULL, dy, x, w, 24, K, N, NULL);
    set_threads(2);
    moe_matmul_forward(y2, x, w, NULL, M, K, N, NULL);
    moe_matmul_backward(dx2, dw2, db2, dy, x, w, M, K, N, NULL);
    moe_matmul_backward(NULL, dw2, NULL, dy, x, w, 24, K, N, NULL);
    CHECK(memcmp(y1, y2, (size_t)M * N * sizeof(float)) == 0, "forward differs between 1 and 2 threads");
    CHECK(memcmp(dx1, dx2, (size_t)M * K * sizeof(float)) == 0, "dinp differs between 1 and 2 threads");
    CHECK(memcmp(dw1, dw2, (size_t)N * K * sizeof(float)) == 0, "dweight differs between 1 and 2 threads");
    CHECK(memcmp(db1, db2, (size_t)N * sizeof(float)) == 0, "dbias differs between 1 and 2 threads");
    free(x); free(w); free(dy); free(y1); free(y2);
    free(dx1); free(dx2); free(dw1); free(dw2); free(db1); free(db2);
}

/* A bank of experts with uneven (and one empty) row groups. */
typedef struct bank {
    int E, d, D, N, kind;
    int offset[8];
    float *w;        /* gate, up, down, b_up, b_down back to back */
    moe_expert_weights W;
} bank;

static void bank_init(bank *b, moe_rng *r, int kind, int E, int d, int D, const int *rows) {
    size_t wsz;
    int e;
    b->E = E; b->d = d; b->D = D; b->kind = kind;
    b->offset[0] = 0;
    for (e = 0; e < E; e++) b->offset[e + 1] = b->offset[e] + rows[e];
    b->N = b->offset[E];
    wsz = (size_t)E * D * d;
    b->w = falloc(3 * wsz + (size_t)E * (D + d));
    fill(b->w, 3 * wsz + (size_t)E * (D + d), r);
    b->W.gate = kind == MOE_EXPERT_SWIGLU ? b->w : NULL;
    b->W.up = b->w + wsz;
    b->W.down = b->w + 2 * wsz;
    b->W.b_up = kind == MOE_EXPERT_FFN ? b->w + 3 * wsz : NULL;
    b->W.b_down = kind == MOE_EXPERT_FFN ? b->w + 3 * wsz + (size_t)E * D : NULL;
}

/* reference forward from naive matmuls and the kernels: out (N, d) */
static void experts_ref(const bank *b, float *out, const float *xg, moe_activation act) {
    int e, d = b->d, D = b->D;
    size_t wsz = (size_t)D * d;
    float *hg = falloc((size_t)b->N * D), *hu = falloc((size_t)b->N * D), *h = falloc((size_t)b->N * D);
    for (e = 0; e < b->E; e++) {
        int n = b->offset[e + 1] - b->offset[e], r0 = b->offset[e];
        size_t lo = (size_t)r0 * D;
        if (n == 0) continue;
        moe_matmul_forward_naive(hu + lo, xg + (size_t)r0 * d, b->W.up + wsz * e, b->W.b_up ? b->W.b_up + (size_t)e * D : NULL, n, d, D);
        if (b->kind == MOE_EXPERT_SWIGLU) {
            moe_matmul_forward_naive(hg + lo, xg + (size_t)r0 * d, b->W.gate + wsz * e, NULL, n, d, D);
            moe_swiglu_forward(h + lo, hg + lo, hu + lo, (size_t)n * D);
        } else {
            moe_activation_forward(h + lo, hu + lo, (size_t)n * D, act);
        }
        moe_matmul_forward_naive(out + (size_t)r0 * d, h + lo, b->W.down + wsz * e, b->W.b_down ? b->W.b_down + (size_t)e * d : NULL, n, D, d);
    }
    free(hg); free(hu); free(h);
}

/* forward against the reference; backward weight gradients against finite-difference-free
   naive products; 1 vs 2 threads bit-identical for both passes */
static void test_experts(int kind) {
    int rows[] = {37, 0, 130, 5, 64, 1};
    int E = 6, d = 40, D = 72, e;
    moe_activation act = MOE_ACT_GELU;
    bank b;
    moe_rng r;
    size_t wsz, nw;
    float *xg, *dy, *out[2], *hg[2], *hu[2], *dx[2], *gwb[2], *s1, *s2, *ref;
    int t;
    TEST_BEGIN(kind == MOE_EXPERT_SWIGLU ? "moe_experts_forward/backward (SwiGLU): reference and 1 vs 2 threads"
                                         : "moe_experts_forward/backward (FFN+bias): reference and 1 vs 2 threads");
    moe_rng_seed(&r, 3 + kind);
    bank_init(&b, &r, kind, E, d, D, rows);
    wsz = (size_t)E * D * d;
    nw = 3 * wsz + (size_t)E * (D + d);
    xg = falloc((size_t)b.N * d);
    dy = falloc((size_t)b.N * d);
    ref = falloc((size_t)b.N * d);
    s1 = falloc((size_t)b.N * D);
    s2 = falloc((size_t)b.N * D);
    fill(xg, (size_t)b.N * d, &r);
    fill(dy, (size_t)b.N * d, &r);
    for (t = 0; t < 2; t++) {
        moe_expert_weights gw;
        out[t] = falloc((size_t)b.N * d);
        hg[t] = falloc((size_t)b.N * D);
        hu[t] = falloc((size_t)b.N * D);
        dx[t] = falloc((size_t)b.N * d);
        gwb[t] = falloc(nw);
        memset(gwb[t], 0, nw * sizeof(float));
        memset(hg[t], 0, (size_t)b.N * D * sizeof(float));
        gw.gate = kind == MOE_EXPERT_SWIGLU ? gwb[t] : NULL;
        gw.up = gwb[t] + wsz;
        gw.down = gwb[t] + 2 * wsz;
        gw.b_up = kind == MOE_EXPERT_FFN ? gwb[t] + 3 * wsz : NULL;
        gw.b_down = kind == MOE_EXPERT_FFN ? gwb[t] + 3 * wsz + (size_t)E * D : NULL;
        set_threads(t + 1);
        moe_experts_forward(out[t], hg[t], hu[t], xg, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
        moe_experts_backward(dx[t], &gw, dy, xg, hg[t], hu[t], &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, s1, s2, NULL);
        /* a second backward accumulates on top */
        moe_experts_backward(dx[t], &gw, dy, xg, hg[t], hu[t], &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, s1, s2, NULL);
    }
    experts_ref(&b, ref, xg, act);
    check_close("experts forward vs naive", out[0], ref, (size_t)b.N * d, 1e-5, 1e-4);
    /* weight gradient of down against the naive product dW2_e = dout_e^T . h_e, twice */
    {
        float *h = falloc((size_t)b.N * D), *dw = falloc(wsz);
        memset(dw, 0, wsz * sizeof(float));
        if (kind == MOE_EXPERT_SWIGLU) moe_swiglu_forward(h, hg[0], hu[0], (size_t)b.N * D);
        else moe_activation_forward(h, hu[0], (size_t)b.N * D, act);
        for (e = 0; e < E; e++) {
            int n = b.offset[e + 1] - b.offset[e], r0 = b.offset[e];
            /* dW (d, D) += dy^T . h: matmul_backward's dweight with out=d, in=D */
            moe_matmul_backward_naive(NULL, dw + (size_t)e * D * d, NULL, dy + (size_t)r0 * d, h + (size_t)r0 * D, b.W.down + (size_t)e * D * d, n, D, d);
            moe_matmul_backward_naive(NULL, dw + (size_t)e * D * d, NULL, dy + (size_t)r0 * d, h + (size_t)r0 * D, b.W.down + (size_t)e * D * d, n, D, d);
        }
        check_close("experts backward dW_down vs naive", gwb[0] + 2 * wsz, dw, wsz, 1e-4, 1e-4);
        free(h);
        free(dw);
    }
    CHECK(memcmp(out[0], out[1], (size_t)b.N * d * sizeof(float)) == 0, "forward output differs between 1 and 2 threads");
    CHECK(memcmp(hu[0], hu[1], (size_t)b.N * D * sizeof(float)) == 0, "forward cache differs between 1 and 2 threads");
    CHECK(memcmp(dx[0], dx[1], (size_t)b.N * d * sizeof(float)) == 0, "dxg differs between 1 and 2 threads");
    CHECK(memcmp(gwb[0], gwb[1], nw * sizeof(float)) == 0, "weight gradients differ between 1 and 2 threads");
    for (t = 0; t < 2; t++) {
        free(out[t]); free(hg[t]); free(hu[t]); free(dx[t]); free(gwb[t]);
    }
    free(xg); free(dy); free(ref); free(s1); free(s2); free(b.w);
    set_threads(2);
}

/* dxg and the up/gate gradients against finite differences of a scalar loss L = <dy, out> */
static void test_experts_grad(int kind) {
    int rows[] = {9, 0, 17, 3};
    int E = 4, d = 12, D = 20, i;
    moe_activation act = MOE_ACT_GELU;
    bank b;
    moe_rng r;
    size_t wsz, nw, nx;
    float *xg, *dy, *out, *hg, *hu, *dx, *gwb, *s1, *s2, *v;
    moe_expert_weights gw;
    double an, num, eps = 1e-2;
    TEST_BEGIN(kind == MOE_EXPERT_SWIGLU ? "moe_experts_backward (SwiGLU): directional finite differences"
                                         : "moe_experts_backward (FFN+bias): directional finite differences");
    moe_rng_seed(&r, 21 + kind);
    bank_init(&b, &r, kind, E, d, D, rows);
    wsz = (size_t)E * D * d;
    nw = 3 * wsz + (size_t)E * (D + d);
    nx = (size_t)b.N * d;
    xg = falloc(nx); dy = falloc(nx); out = falloc(nx); dx = falloc(nx); v = falloc(nw > nx ? nw : nx);
    hg = falloc((size_t)b.N * D); hu = falloc((size_t)b.N * D); s1 = falloc((size_t)b.N * D); s2 = falloc((size_t)b.N * D);
    gwb = falloc(nw);
    memset(gwb, 0, nw * sizeof(float));
    memset(hg, 0, (size_t)b.N * D * sizeof(float));
    fill(xg, nx, &r);
    fill(dy, nx, &r);
    gw.gate = kind == MOE_EXPERT_SWIGLU ? gwb : NULL;
    gw.up = gwb + wsz;
    gw.down = gwb + 2 * wsz;
    gw.b_up = kind == MOE_EXPERT_FFN ? gwb + 3 * wsz : NULL;
    gw.b_down = kind == MOE_EXPERT_FFN ? gwb + 3 * wsz + (size_t)E * D : NULL;
    moe_experts_forward(out, hg, hu, xg, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
    moe_experts_backward(dx, &gw, dy, xg, hg, hu, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, s1, s2, NULL);
    /* input direction */
    {
        float *xp = falloc(nx), *xm = falloc(nx);
        double lp = 0.0, lm = 0.0;
        fill(v, nx, &r);
        an = 0.0;
        for (i = 0; i < (int)nx; i++) {
            xp[i] = xg[i] + (float)eps * v[i];
            xm[i] = xg[i] - (float)eps * v[i];
            an += (double)dx[i] * v[i];
        }
        moe_experts_forward(out, hg, hu, xp, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
        for (i = 0; i < (int)nx; i++) lp += (double)dy[i] * out[i];
        moe_experts_forward(out, hg, hu, xm, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
        for (i = 0; i < (int)nx; i++) lm += (double)dy[i] * out[i];
        num = (lp - lm) / (2 * eps);
        check_grad("experts dxg", an, num, 2e-3);
        free(xp);
        free(xm);
    }
    /* weight direction (all matrices and biases at once) */
    {
        float *w0 = falloc(nw);
        double lp = 0.0, lm = 0.0;
        memcpy(w0, b.w, nw * sizeof(float));
        fill(v, nw, &r);
        an = 0.0;
        for (i = 0; i < (int)nw; i++) an += (double)gwb[i] * v[i];
        for (i = 0; i < (int)nw; i++) b.w[i] = w0[i] + (float)eps * v[i];
        moe_experts_forward(out, hg, hu, xg, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
        for (i = 0; i < (int)nx; i++) lp += (double)dy[i] * out[i];
        for (i = 0; i < (int)nw; i++) b.w[i] = w0[i] - (float)eps * v[i];
        moe_experts_forward(out, hg, hu, xg, &b.W, b.offset, E, d, D, (moe_expert_kind)kind, act, NULL);
        for (i = 0; i < (int)nx; i++) lm += (double)dy[i] * out[i];
        num = (lp - lm) / (2 * eps);
        check_grad("experts weight gradients", an, num, 2e-3);
        memcpy(b.w, w0, nw * sizeof(float));
        free(w0);
    }
    free(xg); free(dy); free(out); free(dx); free(v); free(hg); free(hu); free(s1); free(s2); free(gwb); free(b.w);
}

int main(void) {
    printf("GEMM tile MR=%d NR=%d KC=%d MC=%d NC=%d, threads=%d\n", MOE_GEMM_MR, MOE_GEMM_NR, MOE_GEMM_KC,
           MOE_GEMM_MC, MOE_GEMM_NC, moe_num_threads());
    test_gemm_shapes();
    test_gemm_position();
    test_matmul();
    test_matmul_threads();
    test_experts(MOE_EXPERT_SWIGLU);
    test_experts(MOE_EXPERT_FFN);
    test_experts_grad(MOE_EXPERT_SWIGLU);
    test_experts_grad(MOE_EXPERT_FFN);
    return test_summary();
}
