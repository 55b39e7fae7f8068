/* test_gemm.c - the blocked GEMM, the matmul pair, the expert pair and the one-pass top-k
   against their readable references (moe_gemm_naive, moe_matmul_*_naive, moe_experts_*_naive,
   moe__topk_row_naive), bit-identity between 1 and 2 OpenMP threads, and the experts'
   gradients by finite differences. */
#define MOE_IMPLEMENTATION
/* small chunks of experts (the default holds 64 MB of packed weights), so that banks of test
   size cross chunk boundaries */
#define MOE__EXPERT_CHUNK_FLOATS ((size_t)1 << 16)
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

/* A bank of experts with uneven (and empty) row groups, weights uniform in [-1, 1]. */
#define BANK_MAX_E 48
typedef struct bank {
    int E, d, D, N, kind, gate_input;
    int offset[BANK_MAX_E + 1];
    float *w;        /* gate, up, down, b_up, b_down back to back */
    moe_expert_weights W;
} bank;

/* the same layout over a gradient buffer */
static moe_expert_weights bank_view(const bank *b, float *buf) {
    size_t wsz = (size_t)b->E * b->D * b->d;
    moe_expert_weights v;
    v.gate = b->kind == MOE_EXPERT_SWIGLU && !b->gate_input ? buf : NULL;
    v.up = buf + wsz;
    v.down = buf + 2 * wsz;
    v.b_up = b->kind == MOE_EXPERT_FFN ? buf + 3 * wsz : NULL;
    v.b_down = b->kind == MOE_EXPERT_FFN ? buf + 3 * wsz + (size_t)b->E * b->D : NULL;
    return v;
}

static size_t bank_floats(const bank *b) { return 3 * (size_t)b->E * b->D * b->d + (size_t)b->E * (b->D + b->d); }

/* gate_input: a SwiGLU bank without gate weights, whose gate pre-activation comes in h_gate
   (AoE's low-rank cache) */
static void bank_init(bank *b, moe_rng *r, int kind, int E, int d, int D, const int *rows, int gate_input) {
    int e;
    b->E = E; b->d = d; b->D = D; b->kind = kind; b->gate_input = gate_input;
    b->offset[0] = 0;
    for (e = 0; e < E; e++) b->offset[e + 1] = b->offset[e] + rows[e];
    b->N = b->offset[E];
    b->w = falloc(bank_floats(b));
    fill(b->w, bank_floats(b), r);
    b->W = bank_view(b, b->w);
}

/* One bank shape: moe_experts_forward/backward (1 and 2 threads) against
   moe_experts_forward_naive/backward_naive. Outputs start from garbage (they must be
   overwritten), weight gradients from the same random values (they must accumulate); the
   pre-activation gradients left in scratch are part of the contract (AoE reads d h_gate). */
static void experts_case(const char *label, int kind, int E, int d, int D, const int *rows, int gate_input, int seed) {
    moe_activation act = kind == MOE_EXPERT_SWIGLU ? MOE_ACT_SILU : MOE_ACT_GELU;
    moe_expert_kind k = (moe_expert_kind)kind;
    int swiglu = kind == MOE_EXPERT_SWIGLU, t, e;
    bank b;
    moe_rng r;
    size_t nx, nh, nw, i, wsz;
    float *xg, *dy, *hg_in, *g0, *out[3], *hg[3], *hu[3], *dx[3], *gwb[3], *s1[3], *s2[3];
    char name[160];
    moe_rng_seed(&r, (uint64_t)seed);
    bank_init(&b, &r, kind, E, d, D, rows, gate_input);
    /* weights scaled by 1/sqrt(fan-in): activations stay about 1, one tolerance fits all shapes */
    wsz = (size_t)E * D * d;
    for (i = 0; i < 2 * wsz; i++) b.w[i] /= (float)sqrt((double)d);
    for (i = 2 * wsz; i < 3 * wsz; i++) b.w[i] /= (float)sqrt((double)D);
    nx = (size_t)b.N * d;
    nh = (size_t)b.N * D;
    nw = bank_floats(&b);
    xg = falloc(nx); dy = falloc(nx); hg_in = falloc(nh); g0 = falloc(nw);
    fill(xg, nx, &r);
    fill(dy, nx, &r);
    fill(hg_in, nh, &r);
    fill(g0, nw, &r);
    /* t = 0: the naive pair; t = 1, 2: the fast pair on 1 and 2 threads */
    for (t = 0; t < 3; t++) {
        moe_expert_weights gw;
        out[t] = falloc(nx); hg[t] = falloc(nh); hu[t] = falloc(nh); dx[t] = falloc(nx);
        s1[t] = falloc(nh); s2[t] = falloc(nh); gwb[t] = falloc(nw);
        memset(out[t], 0x7f, nx * sizeof(float)); /* 3.4e38: a row left unwritten shows */
        memset(dx[t], 0x7f, nx * sizeof(float));
        memset(hu[t], 0x7f, nh * sizeof(float));
        memset(s1[t], 0, nh * sizeof(float));
        memset(s2[t], 0, nh * sizeof(float));
        if (gate_input) memcpy(hg[t], hg_in, nh * sizeof(float));
        else memset(hg[t], 0x7f, nh * sizeof(float));
        memcpy(gwb[t], g0, nw * sizeof(float));
        gw = bank_view(&b, gwb[t]);
        if (t == 0) {
            moe_experts_forward_naive(out[t], hg[t], hu[t], xg, &b.W, b.offset, E, d, D, k, act);
            moe_experts_backward_naive(dx[t], &gw, dy, xg, hg[t], hu[t], &b.W, b.offset, E, d, D, k, act, s1[t], s2[t]);
        } else {
            set_threads(t);
            moe_experts_forward(out[t], hg[t], hu[t], xg, &b.W, b.offset, E, d, D, k, act, NULL);
            moe_experts_backward(dx[t], &gw, dy, xg, hg[t], hu[t], &b.W, b.offset, E, d, D, k, act, s1[t], s2[t], NULL);
        }
    }
    set_threads(2);
#define EXPERTS_CLOSE(what, arr, n, atol) \
    (snprintf(name, sizeof name, "%s: %s", label, what), check_close(name, arr[1], arr[0], n, atol, 1e-4))
    EXPERTS_CLOSE("out", out, nx, 1e-5);
    EXPERTS_CLOSE("h_up cache", hu, nh, 1e-5);
    if (swiglu) EXPERTS_CLOSE("h_gate cache", hg, nh, 1e-5);
    EXPERTS_CLOSE("dxg", dx, nx, 1e-5);
    EXPERTS_CLOSE("scratch2 (d up)", s2, nh, 1e-5);
    if (swiglu) EXPERTS_CLOSE("scratch1 (d gate)", s1, nh, 1e-5);
    EXPERTS_CLOSE("weight gradients", gwb, nw, 1e-4);
#undef EXPERTS_CLOSE
    /* an empty expert's gradients keep their start values in both */
    for (e = 0; e < E; e++)
        if (rows[e] == 0) {
            size_t m = (size_t)D * d, o = (size_t)e * m;
            int same = 1;
            for (t = 0; t < 3; t++)
                same &= memcmp(gwb[t] + wsz + o, g0 + wsz + o, m * sizeof(float)) == 0 &&
                        memcmp(gwb[t] + 2 * wsz + o, g0 + 2 * wsz + o, m * sizeof(float)) == 0;
            CHECK(same, "%s: expert %d has no tokens but its gradients moved", label, e);
        }
    CHECK(memcmp(out[1], out[2], nx * sizeof(float)) == 0 && memcmp(hu[1], hu[2], nh * sizeof(float)) == 0 &&
              memcmp(hg[1], hg[2], nh * sizeof(float)) == 0,
          "%s: forward differs between 1 and 2 threads", label);
    CHECK(memcmp(dx[1], dx[2], nx * sizeof(float)) == 0 && memcmp(s1[1], s1[2], nh * sizeof(float)) == 0 &&
              memcmp(s2[1], s2[2], nh * sizeof(float)) == 0 && memcmp(gwb[1], gwb[2], nw * sizeof(float)) == 0,
          "%s: backward differs between 1 and 2 threads", label);
    for (t = 0; t < 3; t++) {
        free(out[t]); free(hg[t]); free(hu[t]); free(dx[t]); free(gwb[t]); free(s1[t]); free(s2[t]);
    }
    free(xg); free(dy); free(hg_in); free(g0); free(b.w);
}

static void test_experts(void) {
    static const int ragged[] = {37, 0, 130, 5, 64, 1};
    static const int ends_empty[] = {0, 3, 0, 17, 0};
    static const int one_big[] = {2 * MOE_GEMM_MC + 7};
    static const int none[] = {0, 0, 0};
    static const int few[] = {1, 0, 3, MOE__EXPERT_DOT_ROWS, 2, 0}; /* the unpacked path (decoding) */
    static const int few_wide[] = {MOE__EXPERT_DOT_ROWS, 3};
    int many[BANK_MAX_E], kind, e;
    for (e = 0; e < BANK_MAX_E; e++) many[e] = (e * 7) % 13; /* zeros among them */
    TEST_BEGIN("moe_experts_forward/backward against the naive pair, 1 and 2 threads");
    for (kind = 0; kind < 2; kind++) {
        const char *kn = kind == MOE_EXPERT_SWIGLU ? "SwiGLU" : "FFN+bias";
        char label[96];
        snprintf(label, sizeof label, "%s ragged E=6 d=40 D=72", kn);
        experts_case(label, kind, 6, 40, 72, ragged, 0, 3 + kind);
        snprintf(label, sizeof label, "%s first and last empty, d=24 D=33", kn);
        experts_case(label, kind, 5, 24, 33, ends_empty, 0, 5 + kind);
        snprintf(label, sizeof label, "%s one expert, %d rows, d=17 D=50", kn, one_big[0]);
        experts_case(label, kind, 1, 17, 50, one_big, 0, 7 + kind);
        snprintf(label, sizeof label, "%s no tokens at all", kn);
        experts_case(label, kind, 3, 8, 8, none, 0, 9 + kind);
        /* more experts than one chunk of packed weights holds (MOE__EXPERT_CHUNK_FLOATS) */
        snprintf(label, sizeof label, "%s E=%d d=64 D=136 (several chunks)", kn, BANK_MAX_E);
        experts_case(label, kind, BANK_MAX_E, 64, 136, many, 0, 11 + kind);
        snprintf(label, sizeof label, "%s at most %d rows per expert (no packing), d=40 D=72", kn, MOE__EXPERT_DOT_ROWS);
        experts_case(label, kind, 6, 40, 72, few, 0, 15 + kind);
        /* large enough that the unpacked products split over threads */
        snprintf(label, sizeof label, "%s at most %d rows per expert, d=256 D=520", kn, MOE__EXPERT_DOT_ROWS);
        experts_case(label, kind, 2, 256, 520, few_wide, 0, 17 + kind);
    }
    experts_case("SwiGLU, few rows, gate pre-activation as input (AoE)", MOE_EXPERT_SWIGLU, 6, 40, 72, few, 1, 19);
    experts_case("SwiGLU, gate pre-activation as input (AoE)", MOE_EXPERT_SWIGLU, 6, 40, 72, ragged, 1, 13);
}

/* decoding's product on weights packed ahead (a moe_wpack: generation's path): every row
   count, panel split and thread count gives the bits of the GEMM (moe_matmul_forward) on the
   same operands; a matrix the pack does not hold, or a pack that is not live, takes the
   unpacked product */
static void test_decode_packed(void) {
    static const int Ks[] = {1, 17, 128, 300}, Ns[] = {1, 31, 32, 100, 130, 520}, Ms[] = {1, 2, 3, 8, 9, 16};
    int ki, ni, mi, all_gemm = 1, all_thr = 1, n_cases = 0;
    moe_rng r;
    moe_rng_seed(&r, 29);
    TEST_BEGIN("decoding's product on packed weights = the GEMM's bits, any rows, threads and split");
    CHECK(16.0 * 300 * 520 > MOE__DECODE_THREAD_MACS, "the largest case takes the threaded path");
    for (ki = 0; ki < 4; ki++)
        for (ni = 0; ni < 6; ni++) {
            int K = Ks[ki], N = Ns[ni];
            moe_wpack pk;
            float *W = falloc((size_t)N * K), *Wother = falloc((size_t)N * K);
            memset(&pk, 0, sizeof pk);
            fill(W, (size_t)N * K, &r);
            fill(Wother, (size_t)N * K, &r);
            moe__wpack_put(&pk, W, N, K);
            CHECK(moe__wpack_alloc(&pk, 2), "pack allocation");
            moe__wpack_put(&pk, W, N, K);
            moe__wpack_sort(&pk);
            moe__wpack_fill(&pk, 2);
            pk.live = 1;
            for (mi = 0; mi < 6; mi++) {
                int M = Ms[mi];
                float *x = falloc((size_t)M * K), *ref = falloc((size_t)M * N), *o1 = falloc((size_t)M * N), *o2 = falloc((size_t)M * N);
                fill(x, (size_t)M * K, &r);
                moe_matmul_forward(ref, x, W, NULL, M, K, N, NULL);
                moe__decode_linear(o1, x, W, M, K, N, 1, &pk);
                moe__decode_linear(o2, x, W, M, K, N, 2, &pk);
                if (memcmp(o1, ref, (size_t)M * N * sizeof(float)) != 0) { all_gemm = 0; printf("  M=%d K=%d N=%d: not the GEMM's bits\n", M, K, N); }
                if (memcmp(o1, o2, (size_t)M * N * sizeof(float)) != 0) { all_thr = 0; printf("  M=%d K=%d N=%d: 1 and 2 threads differ\n", M, K, N); }
                {   /* each panel range alone writes the same columns */
                    int nq = moe__round_up(N, MOE_GEMM_NR) / MOE_GEMM_NR, q;
                    for (q = 0; q < nq; q++) moe__gemm_panels(o2, x, pk.panels, M, K, N, q, q + 1, pk.apack);
                    if (memcmp(o1, o2, (size_t)M * N * sizeof(float)) != 0) { all_thr = 0; printf("  M=%d K=%d N=%d: panels one by one differ\n", M, K, N); }
                }
                n_cases++;
                free(x); free(ref); free(o1); free(o2);
            }
            {   /* not held, or not live: the unpacked product */
                float x1[300], a[520], b[520];
                fill(x1, (size_t)K, &r);
                moe__decode_linear(a, x1, Wother, 1, K, N, 1, &pk);
                moe__decode_linear(b, x1, Wother, 1, K, N, 1, NULL);
                CHECK(memcmp(a, b, sizeof(float) * (size_t)N) == 0, "K=%d N=%d: a matrix outside the pack takes the unpacked product", K, N);
                pk.live = 0;
                CHECK(moe__wpack_find(&pk, W, N, K) == NULL && moe__wpack_find(NULL, W, N, K) == NULL, "a pack that is not live holds nothing");
                pk.live = 1;
                CHECK(moe__wpack_find(&pk, W, N + 1, K) == NULL, "the address with another shape is not the matrix");
            }
            moe__wpack_free(&pk);
            free(W); free(Wother);
        }
    CHECK(all_gemm, "the packed product has the GEMM's bits in all %d cases", n_cases);
    CHECK(all_thr, "the packed product's bits do not depend on threads or panel split (%d cases)", n_cases);
}

/* decoding's unpacked product (moe__decode_linear): four columns at a time, each column
   bit for bit its one-column reference moe__dot_lanes, close to a double dot product, and
   the same bits on the threaded path as on the plain loop */
static void test_decode_linear(void) {
    static const int Ks[] = {5, 16, 37, 256}, Ns[] = {1, 3, 4, 7, 9, 520};
    int ki, ni, i, j, k, M = 16;
    moe_rng r;
    moe_rng_seed(&r, 23);
    CHECK((double)M * 256 * 520 > MOE__DECODE_THREAD_MACS, "the largest case takes the threaded path");
    TEST_BEGIN("decoding's unpacked product: 4-column kernel = its 1-column reference, threads");
    for (ki = 0; ki < 4; ki++)
        for (ni = 0; ni < 6; ni++) {
            int K = Ks[ki], N = Ns[ni], same = 1, close = 1, same_thr;
            float *x = falloc((size_t)M * K), *W = falloc((size_t)N * K), *o1 = falloc((size_t)M * N), *o2 = falloc((size_t)M * N);
            fill(x, (size_t)M * K, &r);
            fill(W, (size_t)N * K, &r);
            moe__decode_linear(o1, x, W, M, K, N, 1, NULL);
            moe__decode_linear(o2, x, W, M, K, N, 2, NULL); /* threaded above MOE__DECODE_THREAD_MACS */
            same_thr = memcmp(o1, o2, (size_t)M * N * sizeof(float)) == 0;
            for (i = 0; i < M; i++)
                for (j = 0; j < N; j++) {
                    double ref = 0.0, mag = 0.0;
                    float one = moe__dot_lanes(x + (size_t)i * K, W + (size_t)j * K, K);
                    for (k = 0; k < K; k++) {
                        ref += (double)x[(size_t)i * K + k] * W[(size_t)j * K + k];
                        mag += fabs((double)x[(size_t)i * K + k] * W[(size_t)j * K + k]);
                    }
                    same &= memcmp(&one, &o1[(size_t)i * N + j], sizeof one) == 0;
                    close &= fabs(o1[(size_t)i * N + j] - ref) <= 1e-6 * (mag + 1.0);
                }
            CHECK(same, "K=%d N=%d: a column differs from moe__dot_lanes", K, N);
            CHECK(close, "K=%d N=%d: the product is off the double reference", K, N);
            CHECK(same_thr, "K=%d N=%d: 1 and 2 threads differ", K, N);
            free(x); free(W); free(o1); free(o2);
        }
}

/* dxg and the up/gate gradients against finite differences of a scalar loss L = <dy, out> */
static void test_experts_grad(int kind) {
    int rows[] = {9, 0, 17, 3};
    int E = 4, d = 12, D = 20, i;
    moe_activation act = MOE_ACT_GELU;
    bank b;
    moe_rng r;
    size_t nw, nx;
    float *xg, *dy, *out, *hg, *hu, *dx, *gwb, *s1, *s2, *v;
    moe_expert_weights gw;
    double an, num, eps = 1e-2;
    TEST_BEGIN(kind == MOE_EXPERT_SWIGLU ? "moe_experts_backward (SwiGLU): directional finite differences"
                                         : "moe_experts_backward (FFN+bias): directional finite differences");
    moe_rng_seed(&r, 21 + kind);
    bank_init(&b, &r, kind, E, d, D, rows, 0);
    nw = bank_floats(&b);
    nx = (size_t)b.N * d;
    xg = falloc(nx); dy = falloc(nx); out = falloc(nx); dx = falloc(nx); v = falloc(nw > nx ? nw : nx);
    hg = falloc((size_t)b.N * D); hu = falloc((size_t)b.N * D); s1 = falloc((size_t)b.N * D); s2 = falloc((size_t)b.N * D);
    gwb = falloc(nw);
    memset(gwb, 0, nw * sizeof(float));
    memset(hg, 0, (size_t)b.N * D * sizeof(float));
    fill(xg, nx, &r);
    fill(dy, nx, &r);
    gw = bank_view(&b, gwb);
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

/* the one-pass top-k picks exactly what k passes pick: every k <= E, rows with many exact ties
   (scores on a grid of 4 values), NaN entries, infinities */
static void test_topk_row(void) {
    moe_rng r;
    float score[70];
    int fast[70], ref[70], E, k, trial, same = 1, bad_e = 0, bad_k = 0;
    TEST_BEGIN("one-pass top-k = the k-pass reference (ties, NaN, infinities), E = 1..70");
    moe_rng_seed(&r, 77);
    for (E = 1; E <= 70; E++)
        for (k = 1; k <= E; k++)
            for (trial = 0; trial < 6; trial++) {
                int j, s;
                for (j = 0; j < E; j++) {
                    float u = moe_rng_uniform(&r);
                    score[j] = trial < 2 ? moe_rng_normal(&r) : (float)(int)(4.0f * u); /* trials 2..5: ties */
                    if (trial >= 4 && moe_rng_uniform(&r) < 0.2f) score[j] = NAN;
                    if (trial == 5 && moe_rng_uniform(&r) < 0.1f) score[j] = u < 0.5f ? -INFINITY : INFINITY;
                }
                moe__topk_row(score, E, k, fast);
                moe__topk_row_naive(score, E, k, ref);
                for (s = 0; s < k; s++)
                    if (fast[s] != ref[s] && same) { same = 0; bad_e = E; bad_k = k; }
            }
    CHECK(same, "first difference at E=%d k=%d", bad_e, bad_k);
}

int main(void) {
    printf("GEMM tile MR=%d NR=%d KC=%d MC=%d NC=%d, threads=%d\n", MOE_GEMM_MR, MOE_GEMM_NR, MOE_GEMM_KC,
           MOE_GEMM_MC, MOE_GEMM_NC, moe_num_threads());
    test_gemm_shapes();
    test_gemm_position();
    test_matmul();
    test_matmul_threads();
    test_experts();
    test_decode_linear();
    test_decode_packed();
    test_experts_grad(MOE_EXPERT_SWIGLU);
    test_experts_grad(MOE_EXPERT_FFN);
    test_topk_row();
    return test_summary();
}
