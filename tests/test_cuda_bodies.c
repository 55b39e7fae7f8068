/* test_cuda_bodies.c - the CUDA kernels' per-thread bodies, run on the CPU.
   Every kernel of the MOE_CUDA path is a plain function of (block, thread, block size); nvcc
   compiles it for the device, the ordinary C compiler compiles it here (MOE_CUDA_BODIES).
   This program runs each body over the grid its launcher uses, and over a small odd block
   size, with the threads in order and in reverse order (a GPU promises no order: results
   must not depend on it), and compares the results with the CPU path bit for bit where the
   arithmetic is the same, or within a stated tolerance where cuBLAS stands in. Canaries
   after every output catch a thread that writes past its row.
   What this cannot see: the device's own expf/exp/erff (a few ulp off glibc's), FMA
   contraction in device code, and anything about launches; tests/test_cuda.cu checks those
   on a GPU. */
#define MOE_IMPLEMENTATION
#define MOE_CUDA_BODIES
#include "moe.h"
#include "test.h"

static moe_rng rng;
static int grid_reverse; /* run the grid's threads last to first */

/* the launch, emulated: every (block, thread) of ceil(count / block) blocks */
#define RUN_GRID(count, block, body, ...)                                                      \
    do {                                                                                       \
        long long n_ = (count);                                                                \
        int b_ = (block), nb_ = moe__cuda_blocks(n_, b_), bi_, ti_;                            \
        for (bi_ = 0; bi_ < nb_; bi_++)                                                        \
            for (ti_ = 0; ti_ < b_; ti_++)                                                     \
                body(grid_reverse ? nb_ - 1 - bi_ : bi_, grid_reverse ? b_ - 1 - ti_ : ti_, b_, __VA_ARGS__); \
    } while (0)

#define PAD 8
static const float CANARY = -1234.5f; /* no kernel maps it to itself */

static float *fbuf(size_t n) { /* n floats + canaries */
    float *p = (float *)malloc((n + PAD) * sizeof(float));
    size_t i;
    for (i = 0; i < n + PAD; i++) p[i] = CANARY;
    return p;
}
static float *randn(size_t n, float scale) {
    float *p = fbuf(n);
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * moe_rng_normal(&rng);
    return p;
}
static float *copyf(const float *src, size_t n) {
    float *p = fbuf(n);
    memcpy(p, src, n * sizeof(float));
    return p;
}
static int canaries_ok(const float *p, size_t n) {
    int i;
    for (i = 0; i < PAD; i++)
        if (memcmp(&p[n + i], &CANARY, sizeof(float)) != 0) return 0;
    return 1;
}
/* -1 when a and b hold the same bits, else the first index that differs */
static long long first_diff(const void *a, const void *b, size_t n, size_t size) {
    size_t i;
    for (i = 0; i < n; i++)
        if (memcmp((const char *)a + i * size, (const char *)b + i * size, size) != 0) return (long long)i;
    return -1;
}
#define SAME_F(name, got, ref, n)                                                                \
    do {                                                                                         \
        long long at_ = first_diff(got, ref, n, sizeof(float));                                  \
        CHECK(at_ < 0, "%s (block %d, %s): element %lld is %.9g, the CPU's %.9g", name, blk,     \
              grid_reverse ? "reverse" : "in order", at_, at_ < 0 ? 0.0 : (double)(got)[at_],    \
              at_ < 0 ? 0.0 : (double)(ref)[at_]);                                               \
        CHECK(canaries_ok(got, n), "%s (block %d): a thread wrote past the end", name, blk);     \
    } while (0)
#define SAME_I(name, got, ref, n)                                                                \
    do {                                                                                         \
        long long at_ = first_diff(got, ref, n, sizeof(int));                                    \
        CHECK(at_ < 0, "%s (block %d, %s): element %lld is %d, the CPU's %d", name, blk,         \
              grid_reverse ? "reverse" : "in order", at_, at_ < 0 ? 0 : (got)[at_], at_ < 0 ? 0 : (ref)[at_]); \
    } while (0)

/* the launchers' block sizes, then an odd one that leaves a partial last block everywhere */
static const int BLOCKS[2][2] = {{MOE__CUDA_BLOCK, 128}, {7, 7}};
#define FOR_GRIDS(k, rev) for (k = 0; k < 2; k++) for (rev = 0; rev < 2; rev++)

static void test_elementwise(void) {
    size_t n = 1003;
    int k, rev, a;
    float *x = randn(n, 2.0f), *g = randn(n, 1.0f), *dy = randn(n, 1.0f), *init = randn(n, 0.5f), *init2 = randn(n, 0.5f);
    TEST_BEGIN("elementwise: activations, SwiGLU, forward and backward");
    FOR_GRIDS(k, rev) {
        int blk = BLOCKS[k][0];
        grid_reverse = rev;
        for (a = 0; a < 4; a++) {
            moe_activation act = (moe_activation)a;
            float *o1 = fbuf(n), *o2 = fbuf(n), *d1 = copyf(init, n), *d2 = copyf(init, n);
            RUN_GRID(n, blk, moe__cuda_activation_forward_body, o1, x, (long long)n, act);
            moe_activation_forward(o2, x, n, act);
            SAME_F("activation forward", o1, o2, n);
            RUN_GRID(n, blk, moe__cuda_activation_backward_body, d1, dy, x, (long long)n, act);
            moe_activation_backward(d2, dy, x, n, act);
            SAME_F("activation backward", d1, d2, n);
            free(o1); free(o2); free(d1); free(d2);
        }
        {
            float *o1 = fbuf(n), *o2 = fbuf(n), *dg1 = copyf(init, n), *dg2 = copyf(init, n);
            float *du1 = copyf(init2, n), *du2 = copyf(init2, n);
            RUN_GRID(n, blk, moe__cuda_swiglu_forward_body, o1, x, g, (long long)n);
            moe_swiglu_forward(o2, x, g, n);
            SAME_F("swiglu forward", o1, o2, n);
            RUN_GRID(n, blk, moe__cuda_swiglu_backward_body, dg1, du1, dy, x, g, (long long)n);
            moe_swiglu_backward(dg2, du2, dy, x, g, n);
            SAME_F("swiglu backward dgate", dg1, dg2, n);
            SAME_F("swiglu backward dup", du1, du2, n);
            free(o1); free(o2); free(dg1); free(dg2); free(du1); free(du2);
        }
    }
    free(x); free(g); free(dy); free(init); free(init2);
}

static void test_rows(void) {
    static const int shapes[3][2] = {{13, 37}, {5, 1}, {9, 70}}; /* 70: past the CPU's 64-column blocks */
    int si, k, rev;
    TEST_BEGIN("per-row kernels: softmax, RMSNorm (dx and dweight), forward and backward");
    for (si = 0; si < 3; si++) {
        int rows = shapes[si][0], n = shapes[si][1];
        size_t rn = (size_t)rows * n;
        float *x = randn(rn, 3.0f), *dy = randn(rn, 1.0f), *w = randn((size_t)n, 1.0f), *init = randn(rn, 0.3f);
        float *winit = randn((size_t)n, 0.3f);
        FOR_GRIDS(k, rev) {
            int blk = BLOCKS[k][1];
            float *y1 = fbuf(rn), *y2 = fbuf(rn), *d1 = copyf(init, rn), *d2 = copyf(init, rn);
            float *r1 = fbuf((size_t)rows), *r2 = fbuf((size_t)rows), *dw1 = copyf(winit, (size_t)n), *dw2 = copyf(winit, (size_t)n);
            grid_reverse = rev;
            RUN_GRID(rows, blk, moe__cuda_softmax_forward_body, y1, x, rows, n);
            moe_softmax_forward(y2, x, rows, n);
            SAME_F("softmax forward", y1, y2, rn);
            RUN_GRID(rows, blk, moe__cuda_softmax_backward_body, d1, dy, y2, rows, n);
            moe_softmax_backward(d2, dy, y2, rows, n);
            SAME_F("softmax backward", d1, d2, rn);
            memcpy(d1, init, rn * sizeof(float));
            memcpy(d2, init, rn * sizeof(float));
            RUN_GRID(rows, blk, moe__cuda_rmsnorm_forward_body, y1, r1, x, w, rows, n, 1e-5f);
            moe_rmsnorm_forward(y2, r2, x, w, rows, n, 1e-5f);
            SAME_F("rmsnorm forward", y1, y2, rn);
            SAME_F("rmsnorm rstd", r1, r2, (size_t)rows);
            RUN_GRID(rows, blk, moe__cuda_rmsnorm_backward_body, d1, dy, x, w, r2, rows, n);
            RUN_GRID(n, blk, moe__cuda_rmsnorm_dweight_body, dw1, dy, x, r2, rows, n);
            moe_rmsnorm_backward(d2, dw2, dy, x, w, r2, rows, n);
            SAME_F("rmsnorm backward dx", d1, d2, rn);
            SAME_F("rmsnorm backward dweight", dw1, dw2, (size_t)n);
            free(y1); free(y2); free(d1); free(d2); free(r1); free(r2); free(dw1); free(dw2);
        }
        free(x); free(dy); free(w); free(init); free(winit);
    }
}

static void test_crossentropy(void) {
    static const int Vs[3] = {37, 256, 16};
    int vi, k, rev, rows = 19, r;
    TEST_BEGIN("cross-entropy: per-row losses, the mean, backward (ignored targets too)");
    for (vi = 0; vi < 3; vi++) {
        int V = Vs[vi], count = 0;
        size_t rv = (size_t)rows * V;
        float *z = randn(rv, 4.0f), *init = randn(rv, 0.1f);
        int *tg = (int *)malloc(sizeof(int) * (size_t)rows);
        for (r = 0; r < rows; r++) tg[r] = r % 7 == 3 ? -1 : (r % 7 == 5 ? V : moe_rng_below(&rng, V));
        for (r = 0; r < rows; r++) count += tg[r] >= 0 && tg[r] < V;
        FOR_GRIDS(k, rev) {
            int blk = BLOCKS[k][1];
            float *l1 = fbuf((size_t)rows), *l2 = fbuf((size_t)rows), *d1 = copyf(init, rv), *d2 = copyf(init, rv);
            double mean1 = -1.0, mean2;
            grid_reverse = rev;
            RUN_GRID(rows, blk, moe__cuda_crossentropy_forward_body, l1, z, tg, rows, V);
            mean2 = moe_crossentropy_forward(l2, z, tg, rows, V);
            SAME_F("crossentropy losses", l1, l2, (size_t)rows);
            RUN_GRID(1, 1, moe__cuda_crossentropy_mean_body, &mean1, l1, tg, rows, V);
            CHECK(memcmp(&mean1, &mean2, sizeof mean1) == 0, "crossentropy mean %.17g, the CPU's %.17g", mean1, mean2);
            RUN_GRID(rows, blk, moe__cuda_crossentropy_backward_body, d1, z, tg, rows, V, 1.0f / (float)count);
            moe_crossentropy_backward(d2, z, tg, rows, V, 1.0f / (float)count);
            SAME_F("crossentropy backward", d1, d2, rv);
            free(l1); free(l2); free(d1); free(d2);
        }
        free(z); free(init); free(tg);
    }
}

static void test_bias(void) {
    int M = 11, N = 70, K = 5, k, rev, i;
    float *dout = randn((size_t)M * N, 1.0f), *bias = randn((size_t)N, 1.0f), *init = randn((size_t)N, 0.2f);
    float *inp = randn((size_t)M * K, 1.0f), *w = randn((size_t)N * K, 1.0f);
    TEST_BEGIN("matmul's bias and bias gradient around the GEMM (cuBLAS's product emulated)");
    FOR_GRIDS(k, rev) {
        int blk = BLOCKS[k][1];
        float *db1 = copyf(init, (size_t)N), *db2 = copyf(init, (size_t)N), *o1 = fbuf((size_t)M * N), *o2 = fbuf((size_t)M * N);
        grid_reverse = rev;
        RUN_GRID(N, blk, moe__cuda_bias_grad_body, db1, dout, M, N);
        moe_matmul_backward(NULL, NULL, db2, dout, inp, w, M, K, N, NULL);
        SAME_F("matmul dbias", db1, db2, (size_t)N);
        /* forward: bias rows, then cuBLAS adds the product (beta = 1) */
        RUN_GRID((long long)M * N, BLOCKS[k][0], moe__cuda_bias_fill_body, o1, bias, (long long)M, N);
        for (i = 0; i < M * N; i++) {
            int r = i / N, j = i % N, p;
            double acc = 0.0;
            for (p = 0; p < K; p++) acc += (double)inp[r * K + p] * w[j * K + p];
            o1[i] += (float)acc;
        }
        moe_matmul_forward_naive(o2, inp, w, bias, M, K, N);
        check_close("matmul forward with the bias filled first", o1, o2, (size_t)M * N, 1e-6, 1e-6);
        CHECK(canaries_ok(o1, (size_t)M * N), "bias fill wrote past the end");
        free(db1); free(db2); free(o1); free(o2);
    }
    free(dout); free(bias); free(init); free(inp); free(w);
}

static void test_attention(void) {
    static const int shapes[3][4] = {{2, 9, 12, 3}, {1, 1, 8, 2}, {3, 16, 16, 1}}; /* B T d NH */
    int si, k, rev;
    TEST_BEGIN("attention: the naive causal pair, per (sequence, head, row); rotary positions");
    for (si = 0; si < 3; si++) {
        int B = shapes[si][0], T = shapes[si][1], d = shapes[si][2], NH = shapes[si][3];
        size_t nq = (size_t)B * T * 3 * d, no = (size_t)B * T * d, na = (size_t)B * NH * T * T, nr = (size_t)B * NH * T;
        float *qkv = randn(nq, 1.0f), *dout = randn(no, 1.0f), *cs = fbuf((size_t)T * (d / NH));
        moe_rope_table(cs, T, d / NH, 10000.0f);
        FOR_GRIDS(k, rev) {
            int blk = k == 0 ? 64 : 7, inv;
            float *o1 = fbuf(no), *o2 = fbuf(no), *a1 = fbuf(na), *a2 = fbuf(na), *dq1 = fbuf(nq), *dq2 = fbuf(nq);
            double *dot = (double *)malloc(sizeof(double) * nr);
            grid_reverse = rev;
            RUN_GRID(nr, blk, moe__cuda_attention_forward_body, o1, a1, qkv, B, T, d, NH);
            moe_attention_forward_naive(o2, a2, qkv, B, T, d, NH);
            SAME_F("attention out", o1, o2, no);
            SAME_F("attention probabilities", a1, a2, na);
            /* dqkv is overwritten: start from garbage */
            memcpy(dq1, qkv, nq * sizeof(float));
            RUN_GRID(nr, blk, moe__cuda_attention_backward_q_body, dq1, dot, dout, qkv, a2, B, T, d, NH);
            RUN_GRID(nr, blk, moe__cuda_attention_backward_kv_body, dq1, dot, dout, qkv, a2, B, T, d, NH);
            moe_attention_backward_naive(dq2, dout, qkv, a2, B, T, d, NH);
            SAME_F("attention dqkv", dq1, dq2, nq);
            for (inv = 0; inv < 2; inv++) {
                memcpy(dq1, qkv, nq * sizeof(float));
                memcpy(dq2, qkv, nq * sizeof(float));
                RUN_GRID((long long)B * T * 2 * NH, blk, moe__cuda_rope_body, dq1, cs, B, T, d, NH, inv);
                moe_rope_apply(dq2, cs, B, T, d, NH, inv);
                SAME_F(inv ? "rope inverse" : "rope", dq1, dq2, nq);
            }
            free(o1); free(o2); free(a1); free(a2); free(dq1); free(dq2); free(dot);
        }
        free(qkv); free(dout); free(cs);
    }
}

/* the device dispatch's five launches, on the host */
static void dispatch_bodies(moe_assign *a, const int *token, const int *expert, const int *slot, const float *weight,
                            int n, int T, int E, int blk) {
    a->n = n; a->T = T; a->E = E;
    RUN_GRID(E + 1, blk, moe__cuda_dispatch_count_body, a->offset, token, expert, n, T, E);
    RUN_GRID(1, 1, moe__cuda_scan_body, a->offset, E);
    RUN_GRID(E, blk, moe__cuda_dispatch_place_body, a->token, a->expert, a->slot, a->weight, a->offset, token, expert,
             slot, weight, n, T, E);
    RUN_GRID(T + 1, blk, moe__cuda_dispatch_token_count_body, a->tok_offset, a->token, n, T);
    RUN_GRID(1, 1, moe__cuda_scan_body, a->tok_offset, T);
    RUN_GRID(T, blk, moe__cuda_dispatch_token_fill_body, a->tok_index, a->tok_offset, a->token, a->slot, n, T);
}

static void assign_alloc(moe_assign *a, int cap, int T, int E) {
    memset(a, 0, sizeof *a);
    a->token = (int *)calloc((size_t)cap + 1, sizeof(int));
    a->expert = (int *)calloc((size_t)cap + 1, sizeof(int));
    a->slot = (int *)calloc((size_t)cap + 1, sizeof(int));
    a->weight = (float *)calloc((size_t)cap + 1, sizeof(float));
    a->tok_index = (int *)calloc((size_t)cap + 1, sizeof(int));
    a->offset = (int *)calloc((size_t)E + 1, sizeof(int));
    a->tok_offset = (int *)calloc((size_t)T + 1, sizeof(int));
}
static void assign_free(moe_assign *a) {
    free(a->token); free(a->expert); free(a->slot); free(a->weight); free(a->tok_index); free(a->offset); free(a->tok_offset);
}

static void compare_assign(const moe_assign *g, const moe_assign *r, int blk) {
    CHECK(g->n == r->n && g->T == r->T && g->E == r->E, "assignment list sizes %d/%d/%d vs %d/%d/%d", g->n, g->T, g->E, r->n, r->T, r->E);
    SAME_I("dispatch offset", g->offset, r->offset, (size_t)r->E + 1);
    SAME_I("dispatch token", g->token, r->token, (size_t)r->n);
    SAME_I("dispatch expert", g->expert, r->expert, (size_t)r->n);
    SAME_I("dispatch slot", g->slot, r->slot, (size_t)r->n);
    CHECK(first_diff(g->weight, r->weight, (size_t)r->n, sizeof(float)) < 0, "dispatch weight differs (block %d)", blk);
    SAME_I("dispatch tok_offset", g->tok_offset, r->tok_offset, (size_t)r->T + 1);
    SAME_I("dispatch tok_index", g->tok_index, r->tok_index, (size_t)r->n);
}

static void test_dispatch(void) {
    int T = 11, E = 5, n = 40, d = 9, i, k, rev, acc;
    int *token = (int *)malloc(sizeof(int) * (size_t)n), *expert = (int *)malloc(sizeof(int) * (size_t)n);
    int *slot = (int *)malloc(sizeof(int) * (size_t)n);
    float *weight = randn((size_t)n, 1.0f), *x = randn((size_t)T * d, 1.0f), *eout = randn((size_t)n * d, 1.0f);
    float *dy = randn((size_t)T * d, 1.0f), *init = randn((size_t)T * d, 0.5f);
    moe_assign ref, got;
    moe_err err;
    TEST_BEGIN("dispatch (counting sort), gather, combine: an arbitrary raw list");
    /* tokens 2 and 7 get nothing, expert 3 gets nothing, slots out of order and repeated */
    for (i = 0; i < n; i++) {
        do token[i] = moe_rng_below(&rng, T); while (token[i] == 2 || token[i] == 7);
        do expert[i] = moe_rng_below(&rng, E); while (expert[i] == 3);
        slot[i] = moe_rng_below(&rng, 4);
    }
    assign_alloc(&ref, n, T, E);
    assign_alloc(&got, n, T, E);
    CHECK(moe_dispatch(&ref, token, expert, slot, weight, n, T, E, &err) == MOE_OK, "CPU dispatch: %s", err.msg);
    FOR_GRIDS(k, rev) {
        int blk = BLOCKS[k][1];
        float *xg1 = fbuf((size_t)n * d), *xg2 = fbuf((size_t)n * d), *y1 = copyf(init, (size_t)T * d), *y2 = copyf(init, (size_t)T * d);
        float *de1 = fbuf((size_t)n * d), *de2 = fbuf((size_t)n * d), *dw1 = fbuf((size_t)n), *dw2 = fbuf((size_t)n);
        grid_reverse = rev;
        dispatch_bodies(&got, token, expert, slot, weight, n, T, E, blk);
        compare_assign(&got, &ref, blk);
        RUN_GRID((long long)n * d, BLOCKS[k][0], moe__cuda_gather_body, xg1, x, got.token, n, d);
        moe_gather(xg2, x, &ref, d);
        SAME_F("gather", xg1, xg2, (size_t)n * d);
        RUN_GRID((long long)T * d, BLOCKS[k][0], moe__cuda_gather_backward_body, y1, eout, got.tok_offset, got.tok_index, T, d);
        moe_gather_backward(y2, eout, &ref, d);
        SAME_F("gather backward", y1, y2, (size_t)T * d);
        for (acc = 0; acc < 2; acc++) {
            RUN_GRID((long long)T * d, BLOCKS[k][0], moe__cuda_combine_forward_body, y1, eout, got.weight, got.tok_offset,
                     got.tok_index, T, d, acc);
            moe_combine_forward(y2, eout, &ref, d, acc);
            SAME_F(acc ? "combine forward (accumulate)" : "combine forward", y1, y2, (size_t)T * d);
        }
        RUN_GRID(n, blk, moe__cuda_combine_backward_body, de1, dw1, dy, eout, got.token, got.weight, n, d);
        moe_combine_backward(de2, dw2, dy, eout, &ref, d);
        SAME_F("combine backward deout", de1, de2, (size_t)n * d);
        SAME_F("combine backward dweight", dw1, dw2, (size_t)n);
        free(xg1); free(xg2); free(y1); free(y2); free(de1); free(de2); free(dw1); free(dw2);
    }
    { /* an empty list: offsets all 0 */
        int blk = 7;
        grid_reverse = 0;
        CHECK(moe_dispatch(&ref, token, expert, slot, weight, 0, T, E, &err) == MOE_OK, "CPU dispatch of nothing");
        dispatch_bodies(&got, token, expert, slot, weight, 0, T, E, blk);
        compare_assign(&got, &ref, blk);
    }
    assign_free(&ref); assign_free(&got);
    free(token); free(expert); free(slot); free(weight); free(x); free(eout); free(dy); free(init);
}

/* The standard router of a real layer: the bodies reproduce its probabilities, choices,
   gates and grouped list from its logits, and its per-token backward. */
static void test_routing_layer(void) {
    int variant, k, rev, t, T = 37;
    TEST_BEGIN("softmax top-k routing against moe_layer_forward (renormalised and not, routed_scale)");
    for (variant = 0; variant < 3; variant++) {
        moe_layer_config c = moe_layer_config_default();
        moe_layer L;
        moe_store s;
        moe_rng wr;
        int E, K;
        float *x, *y;
        c.d = 12; c.d_ff = 16; c.n_experts = variant == 2 ? 9 : 6; c.top_k = variant == 2 ? 3 : 2;
        c.router_init_std = 1.0f;
        c.renormalize = variant != 1;
        c.routed_scale = variant == 2 ? 1.5f : 1.0f;
        E = c.n_experts; K = c.top_k;
        moe_store_init(&s);
        if (!CHECK(moe_layer_init(&L, &c, &s, "l.", T) == MOE_OK, "layer init: %s", L.err.msg)) return;
        CHECK(moe_store_alloc(&s, 0) == MOE_OK, "store alloc");
        moe_rng_seed(&wr, 5 + (uint64_t)variant);
        moe_layer_init_weights(&L, &s, &wr);
        x = randn((size_t)T * c.d, 1.0f);
        y = fbuf((size_t)T * c.d);
        CHECK(moe_layer_forward(&L, &s, y, x, T, NULL) == MOE_OK, "layer forward: %s", L.err.msg);
        FOR_GRIDS(k, rev) {
            int blk = BLOCKS[k][1];
            size_t TE = (size_t)T * E, TK = (size_t)T * K;
            float *probs = fbuf(TE), *gates = fbuf(TE), *rw = fbuf(TK), *dl1 = randn(TE, 0.1f), *dl2 = copyf(dl1, TE);
            float *dg = randn(TE, 1.0f), *dgs = fbuf(TE), *dgr = fbuf(TE), *saved_dl = L.d_logits, *saved_dg = L.d_gates;
            int *topk = (int *)malloc(sizeof(int) * TK), *rt = (int *)malloc(sizeof(int) * TK);
            int *re = (int *)malloc(sizeof(int) * TK), *rs = (int *)malloc(sizeof(int) * TK);
            moe_assign got;
            grid_reverse = rev;
            RUN_GRID(T, blk, moe__cuda_softmax_forward_body, probs, L.logits, T, E);
            SAME_F("router probabilities", probs, L.probs, TE);
            RUN_GRID(T, blk, moe__cuda_topk_select_body, topk, gates, rt, re, rs, rw, probs, T, E, K, c.renormalize, c.routed_scale);
            SAME_I("top-k ids", topk, L.topk, TK);
            SAME_F("gates", gates, L.gates, TE);
            assign_alloc(&got, (int)TK, T, E);
            dispatch_bodies(&got, rt, re, rs, rw, (int)TK, T, E, blk);
            compare_assign(&got, &L.routed, blk);
            /* backward per token, from the same d_gates */
            L.d_logits = dl2;
            L.d_gates = dg;
            for (t = 0; t < T; t++) moe__topk_backward_token(&L, t);
            L.d_logits = saved_dl;
            L.d_gates = saved_dg;
            RUN_GRID(T, blk, moe__cuda_topk_backward_body, dl1, dg, gates, probs, topk, T, E, K, c.renormalize);
            SAME_F("top-k backward d_logits", dl1, dl2, TE);
            /* the combine's dweight into d_gates, as the router's backward does */
            {
                size_t i;
                for (i = 0; i < TE; i++) dgs[i] = dgr[i] = 0.0f;
                RUN_GRID(got.n, blk, moe__cuda_gate_grads_body, dgs, dg, got.token, got.expert, got.n, E, c.routed_scale);
                for (i = 0; i < (size_t)L.routed.n; i++)
                    dgr[(size_t)L.routed.token[i] * E + L.routed.expert[i]] = dg[i] * c.routed_scale;
                SAME_F("gate gradients", dgs, dgr, TE);
            }
            assign_free(&got);
            free(probs); free(gates); free(rw); free(dl1); free(dl2); free(dg); free(dgs); free(dgr);
            free(topk); free(rt); free(re); free(rs);
        }
        free(x); free(y);
        moe_layer_free(&L);
        moe_store_free(&s);
    }
}

static void test_topk_ties(void) {
    /* exact ties go to the lower index; NaN ranks lowest (moe__topk_row) */
    float rows[4][6] = {{0.2f, 0.3f, 0.3f, 0.1f, 0.3f, 0.0f},
                        {0.25f, 0.25f, 0.25f, 0.25f, 0.0f, 0.0f},
                        {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 1.0f},
                        {0.5f, 0.0f, 0.2f, 0.3f, 0.0f, 0.0f}};
    int E = 6, K = 3, T = 4, t, s, topk[12], ref[12], rt[12], re[12], rs[12], blk = 3;
    float gates[24], rw[12];
    TEST_BEGIN("top-k ties go to the lower index, NaN last, as moe__topk_row");
    rows[3][1] = sqrtf(-1.0f + 0.0f * rows[0][0]); /* a NaN the compiler cannot fold away */
    grid_reverse = 0;
    RUN_GRID(T, blk, moe__cuda_topk_select_body, topk, gates, rt, re, rs, rw, &rows[0][0], T, E, K, 1, 1.0f);
    for (t = 0; t < T; t++) moe__topk_row(rows[t], E, K, ref + t * K);
    SAME_I("top-k with ties", topk, ref, 12);
    for (t = 0; t < T; t++)
        for (s = 0; s < K; s++) CHECK(rt[t * K + s] == t && rs[t * K + s] == s && re[t * K + s] == ref[t * K + s], "raw list (%d, %d)", t, s);
    CHECK(topk[0] == 1 && topk[1] == 2 && topk[2] == 4, "row 0 ties: %d %d %d", topk[0], topk[1], topk[2]);
}

static void test_optimizer(void) {
    moe_store a, b;
    moe_adamw_config cfg = moe_adamw_config_default();
    int step, ti, k, rev;
    TEST_BEGIN("AdamW and gradient clipping: the CPU's arithmetic, element for element");
    FOR_GRIDS(k, rev) {
        int blk = BLOCKS[k][0];
        size_t i;
        moe_store_init(&a);
        moe_store_init(&b);
        moe_store_add(&a, "w", MOE_TENSOR_DECAY, 1000, 0, 0, 0);
        moe_store_add(&a, "b", 0, 37, 0, 0, 0);
        moe_store_add(&a, "big", MOE_TENSOR_DECAY, 200, 210, 0, 0); /* 42000: three clipping chunks */
        moe_store_add(&b, "w", MOE_TENSOR_DECAY, 1000, 0, 0, 0);
        moe_store_add(&b, "b", 0, 37, 0, 0, 0);
        moe_store_add(&b, "big", MOE_TENSOR_DECAY, 200, 210, 0, 0);
        if (!CHECK(moe_store_alloc(&a, 1) == MOE_OK && moe_store_alloc(&b, 1) == MOE_OK, "stores")) return;
        grid_reverse = rev;
        for (i = 0; i < a.numel; i++) a.params[i] = b.params[i] = moe_rng_normal(&rng);
        for (step = 1; step <= 3; step++) {
            float max_norm = step == 2 ? 1e9f : 5.0f, norm_ref;
            long long nchunk = ((long long)a.numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
            double part[8], norm = 0.0;
            moe__adamw_consts kc = moe__adamw_consts_for(&cfg, 1e-2f, step);
            for (i = 0; i < a.numel; i++) a.grads[i] = b.grads[i] = 0.1f * moe_rng_normal(&rng);
            /* clipping: per-chunk sums, the total, the scale */
            RUN_GRID(nchunk, 64, moe__cuda_clip_part_body, part, a.grads, (long long)a.numel);
            RUN_GRID(1, 1, moe__cuda_clip_total_body, &norm, part, nchunk);
            RUN_GRID((long long)a.numel, blk, moe__cuda_clip_scale_body, a.grads, (long long)a.numel, &norm, max_norm);
            norm_ref = moe_clip_grad_norm(&b, max_norm);
            CHECK((float)norm == norm_ref, "clip norm %.9g, the CPU's %.9g", norm, (double)norm_ref);
            CHECK(first_diff(a.grads, b.grads, a.numel, sizeof(float)) < 0, "clipped gradients differ (step %d)", step);
            /* AdamW: one launch per tensor, decay by its flag */
            for (ti = 0; ti < a.count; ti++) {
                const moe_tensor *t = &a.tensors[ti];
                moe__adamw_consts kt = kc;
                kt.decay = (t->flags & MOE_TENSOR_DECAY) ? 1.0f - 1e-2f * cfg.weight_decay : 1.0f;
                RUN_GRID((long long)t->numel, blk, moe__cuda_adamw_body, a.params + t->offset, a.grads + t->offset,
                         a.adam_m + t->offset, a.adam_v + t->offset, (long long)t->numel, kt);
            }
            CHECK(moe_adamw_step(&b, &cfg, 1e-2f, step) == MOE_OK, "CPU AdamW");
            CHECK(first_diff(a.params, b.params, a.numel, sizeof(float)) < 0, "AdamW params differ at step %d (block %d)", step, blk);
            CHECK(first_diff(a.adam_m, b.adam_m, a.numel, sizeof(float)) < 0, "AdamW m differs at step %d", step);
            CHECK(first_diff(a.adam_v, b.adam_v, a.numel, sizeof(float)) < 0, "AdamW v differs at step %d", step);
        }
        moe_store_free(&a);
        moe_store_free(&b);
    }
}

/* the embeddings of a real model: the forward against moe_model_forward's first block input,
   the backward against the CPU backward's serial scatter */
static void test_embeddings(void) {
    int pos, k, rev, i, j;
    TEST_BEGIN("embeddings (learned and rotary positions) forward and backward; the residual add");
    for (pos = 0; pos < 2; pos++) {
        moe_model_config c = moe_model_config_default();
        moe_model m;
        int B = 3, T = 10, N = B * T, d, V;
        int in[30], tg[30];
        c.vocab = 256; c.max_seq = 16; c.d = 16; c.n_layers = 1; c.n_heads = 2; c.d_ff = 24; c.moe_every = 0;
        c.pos = pos ? MOE_POS_ROPE : MOE_POS_LEARNED;
        d = c.d; V = c.vocab;
        memset(&m, 0, sizeof m);
        if (!CHECK(moe_model_init(&m, &c, B, T) == MOE_OK, "model init: %s", m.err.msg)) return;
        moe_model_init_weights(&m, 3);
        for (i = 0; i < N; i++) { in[i] = i % 4 == 1 ? 65 : moe_rng_below(&rng, 80); tg[i] = moe_rng_below(&rng, V); } /* repeats */
        CHECK(moe_model_forward(&m, in, tg, B, T, NULL) == MOE_OK, "model forward: %s", m.err.msg);
        FOR_GRIDS(k, rev) {
            int blk = BLOCKS[k][0];
            const float *wte = moe_store_param(&m.S, m.id_wte), *wpe = moe_store_param(&m.S, m.id_wpe);
            float *x = fbuf((size_t)N * d), *g = randn((size_t)N * d, 1.0f), *gw1 = randn((size_t)V * d, 0.1f);
            float *gw2 = copyf(gw1, (size_t)V * d), *gp1 = randn((size_t)T * d, 0.1f), *gp2 = copyf(gp1, (size_t)T * d);
            float *sum = fbuf((size_t)N * d), *ref = fbuf((size_t)N * d);
            grid_reverse = rev;
            RUN_GRID((long long)N * d, blk, moe__cuda_embed_forward_body, x, in, wte, wpe, N, T, d);
            SAME_F("embedding forward", x, m.blocks[0].x, (size_t)N * d);
            RUN_GRID((long long)V * d, blk, moe__cuda_embed_backward_wte_body, gw1, g, in, N, V, d);
            RUN_GRID((long long)T * d, blk, moe__cuda_embed_backward_wpe_body, gp1, g, B, T, d);
            for (i = 0; i < N; i++) /* moe_model_backward's loop */
                for (j = 0; j < d; j++) {
                    gw2[(size_t)in[i] * d + j] += g[(size_t)i * d + j];
                    gp2[(size_t)(i % T) * d + j] += g[(size_t)i * d + j];
                }
            SAME_F("embedding backward wte", gw1, gw2, (size_t)V * d);
            SAME_F("embedding backward wpe", gp1, gp2, (size_t)T * d);
            RUN_GRID((long long)N * d, blk, moe__cuda_add_body, sum, x, g, (long long)N * d);
            for (i = 0; i < N * d; i++) ref[i] = x[i] + g[i];
            SAME_F("residual add", sum, ref, (size_t)N * d);
            free(x); free(g); free(gw1); free(gw2); free(gp1); free(gp2); free(sum); free(ref);
        }
        moe_model_free(&m);
    }
}

int main(void) {
    moe_rng_seed(&rng, 2026);
    test_elementwise();
    test_rows();
    test_crossentropy();
    test_bias();
    test_attention();
    test_dispatch();
    test_routing_layer();
    test_topk_ties();
    test_optimizer();
    test_embeddings();
    return test_summary();
}
