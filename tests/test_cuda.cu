/* test_cuda.cu - the CUDA path against the CPU path, on a GPU (nvcc, MOE_CUDA).
   Every kernel, the store's device copy with AdamW and clipping, the layer (forward and
   backward against moe_layer_forward/backward), 20 training steps of a tiny LM (dense and
   MoE blocks) against the same steps on the CPU, and determinism: two deterministic-mode
   runs of the layer and of the training are bit-identical. Tolerances are stated per kernel below: they cover
   the device's expf/exp/erff/tanhf (a few ulp off glibc's) and cuBLAS's summation order;
   where the arithmetic is the same (integers, sums without transcendental functions, the
   clipping norm) the comparison is exact. Built with --fmad=false so that no multiply-add
   is contracted in the kernels.
   Without a device (or driver) moe_cuda_init must fail with MOE_ERR_NO_DEVICE and a
   sentence, the CPU path must keep working, and the program says that the device tests were
   skipped. */
#define MOE_IMPLEMENTATION
#define MOE_CUDA
#include "moe.h"
#include "test.h"

static moe_cuda cu;
static moe_rng rng;

static float *randn_h(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float) + 4);
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * moe_rng_normal(&rng);
    return p;
}
static void *dev(const void *host, size_t bytes) { /* a device copy of host (zeros when NULL) */
    void *d = NULL;
    if (moe_cuda_malloc(&cu, &d, bytes) != MOE_OK) return NULL;
    if (host && moe_cuda_upload(&cu, d, host, bytes) != MOE_OK) return NULL;
    return d;
}
static float *devf(const float *h, size_t n) { return (float *)dev(h, n * sizeof(float)); }
static float *back(const float *d, size_t n) { /* a host copy of a device buffer, after the queue ran */
    float *h = (float *)malloc(n * sizeof(float) + 4);
    if (moe_cuda_sync(&cu) != MOE_OK || moe_cuda_download(&cu, h, d, n * sizeof(float)) != MOE_OK)
        printf("device error: %s\n", cu.err.msg);
    return h;
}
static int ok(moe_status s) { return CHECK(s == MOE_OK, "device call: %s", cu.err.msg); }

static void test_elementwise_rows(void) {
    size_t n = 4099;
    int rows = 33, cols = 257, a, V = 256, r;
    size_t rn = (size_t)rows * cols;
    float *x = randn_h(n, 2.0f), *g = randn_h(n, 1.0f), *dy = randn_h(n, 1.0f);
    float *X = randn_h(rn, 3.0f), *DY = randn_h(rn, 1.0f), *w = randn_h((size_t)cols, 1.0f);
    float *dx_ = devf(x, n), *dg_ = devf(g, n), *ddy = devf(dy, n), *dX = devf(X, rn), *dDY = devf(DY, rn), *dw = devf(w, (size_t)cols);
    TEST_BEGIN("device kernels vs CPU: activations, SwiGLU, softmax, RMSNorm, cross-entropy");
    for (a = 0; a < 4; a++) { /* device expf/erff/tanhf: rtol 1e-5 */
        float *o = devf(NULL, n), *d = devf(NULL, n), *ref = (float *)malloc(n * 4), *dref = (float *)calloc(n, 4);
        ok(moe_activation_forward_cuda(&cu, o, dx_, n, (moe_activation)a));
        ok(moe_activation_backward_cuda(&cu, d, ddy, dx_, n, (moe_activation)a));
        moe_activation_forward(ref, x, n, (moe_activation)a);
        moe_activation_backward(dref, dy, x, n, (moe_activation)a);
        { float *h = back(o, n); check_close("activation forward", h, ref, n, 1e-6, 1e-5); free(h); }
        { float *h = back(d, n); check_close("activation backward", h, dref, n, 1e-6, 1e-5); free(h); }
        moe_cuda_mfree(o); moe_cuda_mfree(d); free(ref); free(dref);
    }
    {
        float *o = devf(NULL, n), *d1 = devf(NULL, n), *d2 = devf(NULL, n);
        float *ref = (float *)malloc(n * 4), *r1 = (float *)calloc(n, 4), *r2 = (float *)calloc(n, 4), *h;
        ok(moe_swiglu_forward_cuda(&cu, o, dx_, dg_, n));
        ok(moe_swiglu_backward_cuda(&cu, d1, d2, ddy, dx_, dg_, n));
        moe_swiglu_forward(ref, x, g, n);
        moe_swiglu_backward(r1, r2, dy, x, g, n);
        h = back(o, n); check_close("swiglu forward", h, ref, n, 1e-6, 1e-5); free(h);
        h = back(d1, n); check_close("swiglu dgate", h, r1, n, 1e-6, 1e-5); free(h);
        h = back(d2, n); check_close("swiglu dup", h, r2, n, 1e-6, 1e-5); free(h);
        moe_cuda_mfree(o); moe_cuda_mfree(d1); moe_cuda_mfree(d2); free(ref); free(r1); free(r2);
    }
    {
        float *o = devf(NULL, rn), *d = devf(NULL, rn), *rs = devf(NULL, (size_t)rows), *dwt = devf(NULL, (size_t)cols);
        float *ref = (float *)malloc(rn * 4), *dref = (float *)calloc(rn, 4), *rref = (float *)malloc((size_t)rows * 4);
        float *dwref = (float *)calloc((size_t)cols, 4), *h;
        ok(moe_softmax_forward_cuda(&cu, o, dX, rows, cols));
        ok(moe_softmax_backward_cuda(&cu, d, dDY, o, rows, cols));
        moe_softmax_forward(ref, X, rows, cols);
        moe_softmax_backward(dref, DY, ref, rows, cols);
        h = back(o, rn); check_close("softmax forward (rtol 1e-5)", h, ref, rn, 1e-7, 1e-5); free(h);
        h = back(d, rn); check_close("softmax backward (atol 1e-6, rtol 1e-4)", h, dref, rn, 1e-6, 1e-4); free(h);
        ok(moe_cuda_upload(&cu, d, (memset(dref, 0, rn * 4), dref), rn * 4));
        ok(moe_rmsnorm_forward_cuda(&cu, o, rs, dX, dw, rows, cols, 1e-5f));
        ok(moe_rmsnorm_backward_cuda(&cu, d, dwt, dDY, dX, dw, rs, rows, cols));
        moe_rmsnorm_forward(ref, rref, X, w, rows, cols, 1e-5f);
        moe_rmsnorm_backward(dref, dwref, DY, X, w, rref, rows, cols);
        /* sqrtf and division are IEEE on the device without fast-math: exact in deterministic mode */
        h = back(o, rn); check_close("rmsnorm forward (exact)", h, ref, rn, 0, 0); free(h);
        h = back(d, rn); check_close("rmsnorm dx (exact)", h, dref, rn, 0, 0); free(h);
        h = back(dwt, (size_t)cols);
        check_close("rmsnorm dweight (exact; fast mode: rtol 1e-4)", h, dwref, (size_t)cols, cu.mode == MOE_CUDA_FAST ? 1e-5 : 0,
                    cu.mode == MOE_CUDA_FAST ? 1e-4 : 0);
        free(h);
        moe_cuda_mfree(o); moe_cuda_mfree(d); moe_cuda_mfree(rs); moe_cuda_mfree(dwt);
        free(ref); free(dref); free(rref); free(dwref);
    }
    { /* cross-entropy: the polynomial exp is plain float arithmetic; log in double: rtol 1e-6 */
        size_t rv = (size_t)rows * V;
        float *z = randn_h(rv, 4.0f), *lref = (float *)malloc((size_t)rows * 4), *dref = (float *)calloc(rv, 4), *h;
        int *tg = (int *)malloc(sizeof(int) * (size_t)rows);
        float *dz = devf(z, rv), *dl = devf(NULL, (size_t)rows), *dd = devf(NULL, rv);
        int *dtg;
        double mean = 0.0, mref;
        for (r = 0; r < rows; r++) tg[r] = r % 5 == 2 ? -1 : moe_rng_below(&rng, V);
        dtg = (int *)dev(tg, sizeof(int) * (size_t)rows);
        ok(moe_crossentropy_forward_cuda(&cu, dl, dz, dtg, rows, V, &mean));
        ok(moe_crossentropy_backward_cuda(&cu, dd, dz, dtg, rows, V, 0.25f));
        mref = moe_crossentropy_forward(lref, z, tg, rows, V);
        moe_crossentropy_backward(dref, z, tg, rows, V, 0.25f);
        CHECK(fabs(mean - mref) <= 1e-6 * fabs(mref), "cross-entropy mean %.9g vs CPU %.9g", mean, mref);
        h = back(dl, (size_t)rows); check_close("cross-entropy losses", h, lref, (size_t)rows, 1e-6, 1e-6); free(h);
        h = back(dd, rv); check_close("cross-entropy backward", h, dref, rv, 1e-7, 1e-6); free(h);
        moe_cuda_mfree(dz); moe_cuda_mfree(dl); moe_cuda_mfree(dd); moe_cuda_mfree(dtg);
        free(z); free(lref); free(dref); free(tg);
    }
    moe_cuda_mfree(dx_); moe_cuda_mfree(dg_); moe_cuda_mfree(ddy); moe_cuda_mfree(dX); moe_cuda_mfree(dDY); moe_cuda_mfree(dw);
    free(x); free(g); free(dy); free(X); free(DY); free(w);
}

static void test_matmul_attention(void) {
    int M = 77, K = 96, N = 130, B = 2, T = 33, d = 32, NH = 4;
    size_t nq = (size_t)B * T * 3 * d, no = (size_t)B * T * d, na = (size_t)B * NH * T * T;
    float *inp = randn_h((size_t)M * K, 1.0f), *w = randn_h((size_t)N * K, 0.1f), *b = randn_h((size_t)N, 1.0f);
    float *dout = randn_h((size_t)M * N, 1.0f), *ref = (float *)malloc((size_t)M * N * 4);
    float *di_ref = (float *)calloc((size_t)M * K, 4), *dw_ref = (float *)calloc((size_t)N * K, 4), *db_ref = (float *)calloc((size_t)N, 4);
    float *qkv = randn_h(nq, 1.0f), *dyo = randn_h(no, 1.0f), *oref = (float *)malloc(no * 4), *aref = (float *)malloc(na * 4);
    float *dqref = (float *)malloc(nq * 4), *h;
    float *Dinp = devf(inp, (size_t)M * K), *Dw = devf(w, (size_t)N * K), *Db = devf(b, (size_t)N), *Ddout = devf(dout, (size_t)M * N);
    float *Dout = devf(NULL, (size_t)M * N), *Ddi = devf(NULL, (size_t)M * K), *Ddw = devf(NULL, (size_t)N * K), *Ddb = devf(NULL, (size_t)N);
    float *Dqkv = devf(qkv, nq), *Ddyo = devf(dyo, no), *Do = devf(NULL, no), *Da = devf(NULL, na), *Ddq = devf(NULL, nq);
    double *Ddot = (double *)dev(NULL, sizeof(double) * (size_t)B * NH * T);
    TEST_BEGIN("device GEMMs (cuBLAS, no TF32) and causal attention vs CPU");
    ok(moe_matmul_forward_cuda(&cu, Dout, Dinp, Dw, Db, M, K, N));
    ok(moe_matmul_backward_cuda(&cu, Ddi, Ddw, Ddb, Ddout, Dinp, Dw, M, K, N));
    moe_matmul_forward_naive(ref, inp, w, b, M, K, N);
    moe_matmul_backward_naive(di_ref, dw_ref, db_ref, dout, inp, w, M, K, N);
    /* float32 GEMMs in another summation order: rtol 1e-4 (TF32 would miss by 1e-3) */
    h = back(Dout, (size_t)M * N); check_close("matmul forward", h, ref, (size_t)M * N, 1e-4, 1e-4); free(h);
    h = back(Ddi, (size_t)M * K); check_close("matmul dinp", h, di_ref, (size_t)M * K, 1e-4, 1e-4); free(h);
    h = back(Ddw, (size_t)N * K); check_close("matmul dweight", h, dw_ref, (size_t)N * K, 1e-4, 1e-4); free(h);
    h = back(Ddb, (size_t)N); check_close("matmul dbias", h, db_ref, (size_t)N, 1e-5, 1e-5); free(h);
    ok(moe_attention_forward_cuda(&cu, Do, Da, Dqkv, B, T, d, NH));
    ok(moe_attention_backward_cuda(&cu, Ddq, Ddyo, Dqkv, Da, B, T, d, NH, Ddot));
    moe_attention_forward_naive(oref, aref, qkv, B, T, d, NH);
    moe_attention_backward_naive(dqref, dyo, qkv, aref, B, T, d, NH);
    /* double accumulation; the device's exp(double) is within 1 ulp of glibc's: rtol 1e-6 */
    h = back(Do, no); check_close("attention out", h, oref, no, 1e-6, 1e-6); free(h);
    h = back(Da, na); check_close("attention probabilities", h, aref, na, 1e-7, 1e-6); free(h);
    h = back(Ddq, nq); check_close("attention dqkv", h, dqref, nq, 1e-6, 1e-5); free(h);
    moe_cuda_mfree(Dinp); moe_cuda_mfree(Dw); moe_cuda_mfree(Db); moe_cuda_mfree(Ddout); moe_cuda_mfree(Dout);
    moe_cuda_mfree(Ddi); moe_cuda_mfree(Ddw); moe_cuda_mfree(Ddb); moe_cuda_mfree(Dqkv); moe_cuda_mfree(Ddyo);
    moe_cuda_mfree(Do); moe_cuda_mfree(Da); moe_cuda_mfree(Ddq); moe_cuda_mfree(Ddot);
    free(inp); free(w); free(b); free(dout); free(ref); free(di_ref); free(dw_ref); free(db_ref);
    free(qkv); free(dyo); free(oref); free(aref); free(dqref);
}

static void test_store_optimizer(void) {
    moe_store s, r;
    moe_store_cuda ds;
    moe_adamw_config cfg = moe_adamw_config_default();
    int step;
    float norm = 0.0f, nref;
    TEST_BEGIN("device store: upload, AdamW, clipping, download (the checkpoint path)");
    moe_store_init(&s);
    moe_store_init(&r);
    moe_store_add(&s, "w", MOE_TENSOR_DECAY, 300, 170, 0, 0);
    moe_store_add(&s, "b", 0, 37, 0, 0, 0);
    moe_store_add(&r, "w", MOE_TENSOR_DECAY, 300, 170, 0, 0);
    moe_store_add(&r, "b", 0, 37, 0, 0, 0);
    if (!CHECK(moe_store_alloc(&s, 1) == MOE_OK && moe_store_alloc(&r, 1) == MOE_OK, "stores")) return;
    {
        size_t i;
        for (i = 0; i < s.numel; i++) s.params[i] = r.params[i] = moe_rng_normal(&rng);
    }
    if (!ok(moe_store_alloc_cuda(&ds, &cu, &s))) return;
    for (step = 1; step <= 3; step++) {
        size_t i;
        for (i = 0; i < s.numel; i++) r.grads[i] = 0.1f * moe_rng_normal(&rng);
        ok(moe_cuda_upload(&cu, ds.grads, r.grads, s.numel * 4));
        ok(moe_clip_grad_norm_cuda(&cu, &ds, 5.0f, &norm));
        nref = moe_clip_grad_norm(&r, 5.0f);
        CHECK(norm == nref, "clip norm %.9g vs CPU %.9g (the same double sums: exact)", (double)norm, (double)nref);
        ok(moe_adamw_step_cuda(&cu, &ds, &cfg, 1e-2f, step));
        ok(moe_adamw_step(&r, &cfg, 1e-2f, step));
    }
    ok(moe_cuda_sync(&cu));
    ok(moe_store_download_cuda(&cu, &ds, &s));
    /* sqrtf and division are IEEE on the device: the same bits unless FMA crept in */
    check_close("AdamW params after 3 steps", s.params, r.params, s.numel, 0, 1e-6);
    check_close("AdamW m", s.adam_m, r.adam_m, s.numel, 0, 1e-6);
    check_close("AdamW v", s.adam_v, r.adam_v, s.numel, 0, 1e-6);
    moe_store_free_cuda(&ds);
    moe_store_free(&s);
    moe_store_free(&r);
}

/* one forward and backward of the device layer; outputs to host buffers */
static int layer_run(moe_layer *L, moe_store *s, const float *x, const float *dy, int T, float *y, float *dx, float *grads) {
    moe_layer_cuda Lc;
    moe_store_cuda ds;
    int d = L->cfg.d;
    float *Dx = devf(x, (size_t)T * d), *Ddy = devf(dy, (size_t)T * d), *Dy = devf(NULL, (size_t)T * d), *Ddx = devf(NULL, (size_t)T * d);
    int good = ok(moe_store_alloc_cuda(&ds, &cu, s)) && ok(moe_layer_init_cuda(&Lc, &cu, L, T)) &&
               ok(moe_layer_forward_cuda(&cu, &Lc, &ds, Dy, Dx, T)) && ok(moe_layer_backward_cuda(&cu, &Lc, &ds, Ddx, Ddy, Dx)) &&
               ok(moe_cuda_sync(&cu)) && ok(moe_cuda_download(&cu, y, Dy, sizeof(float) * (size_t)T * d)) &&
               ok(moe_cuda_download(&cu, dx, Ddx, sizeof(float) * (size_t)T * d)) &&
               ok(moe_cuda_download(&cu, grads, ds.grads, sizeof(float) * s->numel));
    moe_layer_free_cuda(&Lc);
    moe_store_free_cuda(&ds);
    moe_cuda_mfree(Dx); moe_cuda_mfree(Ddy); moe_cuda_mfree(Dy); moe_cuda_mfree(Ddx);
    return good;
}

static void test_layer(void) {
    int variant, T = 200;
    TEST_BEGIN("device MoE layer vs moe_layer_forward/backward; two deterministic runs bit-identical");
    for (variant = 0; variant < 3; variant++) {
        moe_layer_config c = moe_layer_config_default();
        moe_layer L;
        moe_store s;
        moe_rng wr;
        size_t nd;
        float *x, *dy, *y, *dx, *y2, *dx2, *g, *g2, *yref, *dxref;
        c.d = 64; c.d_ff = 96; c.n_experts = 8; c.top_k = 2;
        c.balance = MOE_BALANCE_NONE; c.z_coef = 0.0f; c.router_init_std = 0.5f;
        if (variant == 1) { c.renormalize = 0; c.routed_scale = 2.0f; c.router_bias = 1; }
        if (variant == 2) { c.expert = MOE_EXPERT_FFN; c.expert_bias = 1; c.activation = MOE_ACT_GELU; }
        moe_store_init(&s);
        if (!CHECK(moe_layer_init(&L, &c, &s, "l.", T) == MOE_OK && moe_store_alloc(&s, 0) == MOE_OK, "layer")) return;
        moe_rng_seed(&wr, 17);
        moe_layer_init_weights(&L, &s, &wr);
        nd = (size_t)T * c.d;
        x = randn_h(nd, 1.0f); dy = randn_h(nd, 1.0f);
        y = (float *)malloc(nd * 4); dx = (float *)malloc(nd * 4); y2 = (float *)malloc(nd * 4); dx2 = (float *)malloc(nd * 4);
        g = (float *)malloc(s.numel * 4); g2 = (float *)malloc(s.numel * 4);
        yref = (float *)malloc(nd * 4); dxref = (float *)calloc(nd, 4);
        if (layer_run(&L, &s, x, dy, T, y, dx, g) && layer_run(&L, &s, x, dy, T, y2, dx2, g2)) {
            moe_store_zero_grad(&s);
            CHECK(moe_layer_forward(&L, &s, yref, x, T, NULL) == MOE_OK, "CPU forward");
            CHECK(moe_layer_backward(&L, &s, dxref, dy, x, NULL) == MOE_OK, "CPU backward");
            /* routing is integer and exact given equal logits; the GEMMs differ in order: rtol 1e-4 */
            check_close("layer y", y, yref, nd, 1e-5, 1e-4);
            check_close("layer dx", dx, dxref, nd, 1e-5, 1e-4);
            check_close("layer parameter gradients", g, s.grads, s.numel, 1e-5, 1e-4);
            if (cu.mode == MOE_CUDA_DETERMINISTIC) {
                CHECK(memcmp(y, y2, nd * 4) == 0 && memcmp(dx, dx2, nd * 4) == 0 && memcmp(g, g2, s.numel * 4) == 0,
                      "two deterministic device runs differ");
            }
        }
        free(x); free(dy); free(y); free(dx); free(y2); free(dx2); free(g); free(g2); free(yref); free(dxref);
        moe_layer_free(&L);
        moe_store_free(&s);
    }
}

static void test_dispatch_device(void) {
    int T = 300, E = 7, n = 900, d = 16, i;
    int *tok = (int *)malloc(sizeof(int) * n), *ex = (int *)malloc(sizeof(int) * n), *sl = (int *)malloc(sizeof(int) * n);
    float *wt = randn_h((size_t)n, 1.0f), *eo = randn_h((size_t)n * d, 1.0f);
    moe_assign ref, got;
    moe_err err;
    int *h = (int *)malloc(sizeof(int) * (size_t)(n + T + 1));
    TEST_BEGIN("device dispatch and combine vs CPU (exact)");
    for (i = 0; i < n; i++) { tok[i] = moe_rng_below(&rng, T); ex[i] = moe_rng_below(&rng, E); sl[i] = moe_rng_below(&rng, 3); }
    memset(&ref, 0, sizeof ref);
    ref.token = (int *)malloc(sizeof(int) * n); ref.expert = (int *)malloc(sizeof(int) * n); ref.slot = (int *)malloc(sizeof(int) * n);
    ref.weight = (float *)malloc(sizeof(float) * n); ref.tok_index = (int *)malloc(sizeof(int) * n);
    ref.offset = (int *)malloc(sizeof(int) * (E + 1)); ref.tok_offset = (int *)malloc(sizeof(int) * (T + 1));
    CHECK(moe_dispatch(&ref, tok, ex, sl, wt, n, T, E, &err) == MOE_OK, "CPU dispatch");
    if (ok(moe_assign_alloc_cuda(&cu, &got, n, T, E))) {
        int *Dt = (int *)dev(tok, sizeof(int) * n), *De = (int *)dev(ex, sizeof(int) * n), *Ds = (int *)dev(sl, sizeof(int) * n);
        float *Dw = devf(wt, (size_t)n), *Deo = devf(eo, (size_t)n * d), *Dy = devf(NULL, (size_t)T * d);
        float *yref = (float *)malloc(sizeof(float) * (size_t)T * d), *yh;
        ok(moe_dispatch_cuda(&cu, &got, Dt, De, Ds, Dw, n, T, E));
        ok(moe_combine_forward_cuda(&cu, Dy, Deo, &got, d, 0));
        ok(moe_cuda_sync(&cu));
        ok(moe_cuda_download(&cu, h, got.tok_index, sizeof(int) * n));
        CHECK(memcmp(h, ref.tok_index, sizeof(int) * n) == 0, "tok_index differs");
        ok(moe_cuda_download(&cu, h, got.token, sizeof(int) * n));
        CHECK(memcmp(h, ref.token, sizeof(int) * n) == 0, "grouped tokens differ");
        ok(moe_cuda_download(&cu, h, got.offset, sizeof(int) * (E + 1)));
        CHECK(memcmp(h, ref.offset, sizeof(int) * (E + 1)) == 0, "expert offsets differ");
        /* combine reads eout in grouped order: give the CPU the same rows */
        moe_combine_forward(yref, eo, &ref, d, 0);
        yh = back(Dy, (size_t)T * d);
        check_close("combine (exact in deterministic mode)", yh, yref, (size_t)T * d, cu.mode == MOE_CUDA_FAST ? 1e-6 : 0,
                    cu.mode == MOE_CUDA_FAST ? 1e-5 : 0);
        free(yh); free(yref);
        moe_cuda_mfree(Dt); moe_cuda_mfree(De); moe_cuda_mfree(Ds); moe_cuda_mfree(Dw); moe_cuda_mfree(Deo); moe_cuda_mfree(Dy);
        moe_assign_free_cuda(&got);
    }
    free(ref.token); free(ref.expert); free(ref.slot); free(ref.weight); free(ref.tok_index); free(ref.offset); free(ref.tok_offset);
    free(tok); free(ex); free(sl); free(wt); free(eo); free(h);
}

/* steps of training on the device from the host model's weights; losses (steps) and the final
   parameters to host buffers */
static int model_train_device(moe_model *m, const int *in, const int *tg, int B, int T, int steps, double *losses, float *params) {
    moe_model_cuda mc;
    moe_adamw_config ac = moe_adamw_config_default();
    int s, good = ok(moe_model_init_cuda(&mc, &cu, m, B, T));
    for (s = 0; good && s < steps; s++) {
        const int *bi = in + (size_t)s * B * T, *bt = tg + (size_t)s * B * T;
        good = ok(moe_model_forward_cuda(&cu, &mc, bi, bt, B, T)) && ok(moe_model_backward_cuda(&cu, &mc, 1.0f)) &&
               ok(moe_clip_grad_norm_cuda(&cu, &mc.S, 1.0f, NULL)) && ok(moe_adamw_step_cuda(&cu, &mc.S, &ac, 3e-3f, s + 1)) &&
               ok(moe_store_zero_grad_cuda(&cu, &mc.S));
        losses[s] = mc.loss;
    }
    good = good && ok(moe_cuda_sync(&cu)) && ok(moe_cuda_download(&cu, params, mc.S.params, sizeof(float) * m->S.numel));
    if (mc.host) moe_model_free_cuda(&mc);
    return good;
}

static void test_model_training(void) {
    enum { STEPS = 20, B = 4, T = 32 };
    int variant;
    TEST_BEGIN("tiny LM: 20 training steps on the device vs the CPU (dense + MoE blocks); two device runs bit-identical");
    for (variant = 0; variant < 2; variant++) {
        moe_model_config c = moe_model_config_default();
        moe_model m;
        moe_adamw_config ac = moe_adamw_config_default();
        int *in = (int *)malloc(sizeof(int) * STEPS * B * T), *tg = (int *)malloc(sizeof(int) * STEPS * B * T), s, i;
        double lc[STEPS], ld[STEPS], ld2[STEPS], worst = 0.0;
        float *pd, *pd2;
        const char *text = "the quick brown fox jumps over the lazy dog; a tiny model learns bytes. ";
        size_t tl = strlen(text);
        c.vocab = 256; c.max_seq = T; c.d = 64; c.n_layers = 2; c.n_heads = 4; c.d_ff = 128;
        c.moe_every = 2; /* block 0 MoE, block 1 dense */
        c.moe.n_experts = 4; c.moe.top_k = 2; c.moe.d_ff = 64; c.moe.balance = MOE_BALANCE_NONE; c.moe.z_coef = 0.0f;
        c.pos = variant ? MOE_POS_LEARNED : MOE_POS_ROPE;
        for (i = 0; i < STEPS * B * T; i++) {
            size_t o = (size_t)(i / T) * 7 + (size_t)(i % T);
            in[i] = (unsigned char)text[o % tl];
            tg[i] = (unsigned char)text[(o + 1) % tl];
        }
        memset(&m, 0, sizeof m);
        if (!CHECK(moe_model_init(&m, &c, B, T) == MOE_OK, "model: %s", m.err.msg)) return;
        moe_model_init_weights(&m, 11);
        pd = (float *)malloc(sizeof(float) * m.S.numel);
        pd2 = (float *)malloc(sizeof(float) * m.S.numel);
        if (model_train_device(&m, in, tg, B, T, STEPS, ld, pd) && model_train_device(&m, in, tg, B, T, STEPS, ld2, pd2)) {
            for (s = 0; s < STEPS; s++) { /* the same steps on the CPU (the host model still holds the initial weights) */
                CHECK(moe_model_forward(&m, in + (size_t)s * B * T, tg + (size_t)s * B * T, B, T, NULL) == MOE_OK, "CPU forward");
                CHECK(moe_model_backward(&m, 1.0f) == MOE_OK, "CPU backward");
                moe_clip_grad_norm(&m.S, 1.0f);
                moe_adamw_step(&m.S, &ac, 3e-3f, s + 1);
                moe_store_zero_grad(&m.S);
                lc[s] = m.loss;
                if (fabs(ld[s] - lc[s]) / lc[s] > worst) worst = fabs(ld[s] - lc[s]) / lc[s];
                printf("model=%s step=%d cpu_loss=%.6f gpu_loss=%.6f\n", variant ? "learned" : "rope", s + 1, lc[s], ld[s]);
            }
            /* the first step sees the same weights: GEMM order only (1e-5); then 20 AdamW steps
               amplify rounding a little: 2e-3 relative on the loss */
            CHECK(fabs(ld[0] - lc[0]) <= 1e-5 * lc[0], "step 1 loss %.9g vs CPU %.9g", ld[0], lc[0]);
            CHECK(worst <= 2e-3, "device and CPU losses differ by %.3g relative over 20 steps", worst);
            CHECK(lc[STEPS - 1] < lc[0] - 0.5, "the CPU run learns (loss %.3f -> %.3f)", lc[0], lc[STEPS - 1]);
            check_close("parameters after 20 steps", pd, m.S.params, m.S.numel, 1e-3, 1e-2);
            if (cu.mode == MOE_CUDA_DETERMINISTIC)
                CHECK(memcmp(ld, ld2, sizeof ld) == 0 && memcmp(pd, pd2, sizeof(float) * m.S.numel) == 0,
                      "two device runs differ (deterministic mode must be bit-identical)");
        }
        free(in); free(tg); free(pd); free(pd2);
        moe_model_free(&m);
    }
}

int main(int argc, char **argv) {
    moe_cuda_mode mode = argc > 1 && strcmp(argv[1], "--fast") == 0 ? MOE_CUDA_FAST : MOE_CUDA_DETERMINISTIC;
    moe_status s;
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        printf("usage: test_cuda [--fast]\n  the CUDA path against the CPU path on device 0 (deterministic mode unless --fast)\n");
        return 0;
    }
    moe_rng_seed(&rng, 7);
    s = moe_cuda_init(&cu, 0, mode);
    if (s != MOE_OK) {
        float in[4] = {1, 2, 3, 4}, out[4];
        TEST_BEGIN("no usable CUDA device: a status with a sentence, the CPU path keeps working");
        printf("CUDA unavailable: %s\nthe device tests are skipped (they run where a GPU is)\n", cu.err.msg);
        CHECK(s == MOE_ERR_NO_DEVICE, "moe_cuda_init returned %s, expected MOE_ERR_NO_DEVICE", moe_status_string(s));
        CHECK(strlen(cu.err.msg) > 20 && strstr(cu.err.msg, "CUDA") != NULL, "the sentence: '%s'", cu.err.msg);
        CHECK(cu.cublas == NULL && cu.scalars == NULL, "a failed init holds nothing");
        moe_cuda_free(&cu); /* safe after a failure */
        moe_softmax_forward(out, in, 1, 4);
        CHECK(fabsf(out[0] + out[1] + out[2] + out[3] - 1.0f) < 1e-6f, "the CPU softmax after a failed device init");
        return test_summary();
    }
    printf("CUDA device 0, %s mode\n", mode == MOE_CUDA_FAST ? "fast" : "deterministic");
    test_elementwise_rows();
    test_matmul_attention();
    test_dispatch_device();
    test_store_optimizer();
    test_layer();
    test_model_training();
    moe_cuda_free(&cu);
    return test_summary();
}
