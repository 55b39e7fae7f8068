/* test_golden.c - moe.h against PyTorch: the golden files under tests/ref/, written by
 * tests/ref/make_goldens.py (`make goldens`) and committed, so this test needs no PyTorch.
 *
 *   kernels.bin       matmul (fast and naive) forward/backward, softmax, SiLU, GELU (erf, tanh),
 *                     ReLU, SwiGLU, RMSNorm, LayerNorm, cross-entropy with ignored targets
 *   layer_<case>.bin  moe_layer_forward/backward for every router variant: logits,
 *                     probabilities, gates, top-k ids (exactly), y, routing counts (exactly),
 *                     aux losses, every gradient of sum(y*dy) + aux_total, and the gradient of
 *                     aux_total alone (dy = 0)
 *
 * Each tensor passes when |got - ref| <= atol + rtol*|ref| elementwise. TEST_VERBOSE=1 (or -v)
 * prints one line per tensor with its largest absolute and relative error. A missing or stale
 * golden file is a failure with a HINT: the files are committed, so it is a broken checkout.
 * Golden folder: $MOE_GOLDEN_DIR, default tests/ref (run from the repository root).
 */
#define _POSIX_C_SOURCE 200809L
#include "../moe.h"
#include "test.h"
#include "golden.h"

#include <unistd.h>

/* ---- comparison helpers -------------------------------------------------------------------- */

/* one summary group per test, named after it */
static void summary_begin(const char *what) {
    static const char *name[1];
    name[0] = what;
    golden_groups_begin(name, 1);
}


/* ---- the reader itself: missing file, wrong magic, wrong version ----------------------------- */

static void test_reader_errors(void) {
    char path[256];
    unsigned char hdr[128];
    golden_file g;
    FILE *f;
    TEST_BEGIN("golden reader: missing file, wrong magic and wrong version fail with a HINT");
    CHECK(golden_load(&g, "tests/ref/no_such_golden_file.bin") != 0, "a missing file must fail");
    CHECK(strstr(g.err, "missing") && strstr(g.err, "HINT: run make goldens"), "message: %s", g.err);
    snprintf(path, sizeof path, "/tmp/moe_golden_test_%ld.bin", (long)getpid());
    memset(hdr, 0, sizeof hdr);
    memcpy(hdr, "NOTGOLD", 8);
    f = fopen(path, "wb");
    if (!CHECK(f != NULL, "cannot create %s", path)) return;
    fwrite(hdr, 1, sizeof hdr, f);
    fclose(f);
    CHECK(golden_load(&g, path) != 0, "wrong magic must fail");
    CHECK(strstr(g.err, "magic") && strstr(g.err, "HINT: run make goldens"), "message: %s", g.err);
    memcpy(hdr, "MOEGOLD", 8);
    hdr[8] = 99; /* version 99 */
    f = fopen(path, "wb");
    if (f) {
        fwrite(hdr, 1, sizeof hdr, f);
        fclose(f);
    }
    CHECK(golden_load(&g, path) != 0, "wrong version must fail");
    CHECK(strstr(g.err, "version 99") && strstr(g.err, "HINT: run make goldens"), "message: %s", g.err);
    hdr[8] = GOLDEN_VERSION;
    hdr[12] = 1; /* one record promised, none there */
    f = fopen(path, "wb");
    if (f) {
        fwrite(hdr, 1, sizeof hdr, f);
        fclose(f);
    }
    CHECK(golden_load(&g, path) != 0, "a truncated file must fail");
    CHECK(strstr(g.err, "truncated") != NULL, "message: %s", g.err);
    remove(path);
}

/* ---- kernels --------------------------------------------------------------------------------- */

static void test_matmul(golden_file *g, const char *tag) {
    char nm[64];
    const golden_tensor *tw;
    const float *inp, *w, *b, *out, *dout, *dinp, *dw, *db;
    int M, K, N, naive;
    snprintf(nm, sizeof nm, "%s.weight", tag);
    tw = golden_find(g, nm);
    snprintf(nm, sizeof nm, "%s.inp", tag);
    if (!CHECK(tw && golden_find(g, nm), "%s: records missing", tag)) return;
    N = tw->shape[0];
    K = tw->shape[1];
    M = golden_find(g, nm)->shape[0];
#define REC(var, field, n) snprintf(nm, sizeof nm, "%s." field, tag); var = golden_need(g, nm, n)
    REC(inp, "inp", (size_t)M * K); REC(w, "weight", (size_t)N * K); REC(b, "bias", N);
    REC(out, "out", (size_t)M * N); REC(dout, "dout", (size_t)M * N); REC(dinp, "dinp", (size_t)M * K);
    REC(dw, "dweight", (size_t)N * K); REC(db, "dbias", N);
#undef REC
    if (!inp || !w || !b || !out || !dout || !dinp || !dw || !db) return;
    for (naive = 0; naive < 2; naive++) {
        float *o = golden_zeros((size_t)M * N), *gi = golden_zeros((size_t)M * K), *gw = golden_zeros((size_t)N * K), *gb = golden_zeros(N);
        const char *how = naive ? "naive" : "fast";
        if (naive) {
            moe_matmul_forward_naive(o, inp, w, b, M, K, N);
            moe_matmul_backward_naive(gi, gw, gb, dout, inp, w, M, K, N);
        } else {
            moe_matmul_forward(o, inp, w, b, M, K, N, NULL);
            moe_matmul_backward(gi, gw, gb, dout, inp, w, M, K, N, NULL);
        }
        /* float32 rounding grows with the sum: out and dinp add K or N terms of size ~1/sqrt(K)
           (results ~1); dweight and dbias add M = 67 terms of size ~1 (results up to ~20,
           with cancellation), so their absolute error reaches a few 1e-6 */
        snprintf(nm, sizeof nm, "%s.out (%s)", tag, how); golden_cmp(0, nm, o, out, (size_t)M * N, 1e-6, 1e-5);
        snprintf(nm, sizeof nm, "%s.dinp (%s)", tag, how); golden_cmp(0, nm, gi, dinp, (size_t)M * K, 1e-6, 1e-5);
        snprintf(nm, sizeof nm, "%s.dweight (%s)", tag, how); golden_cmp(0, nm, gw, dw, (size_t)N * K, 2e-5, 1e-5);
        snprintf(nm, sizeof nm, "%s.dbias (%s)", tag, how); golden_cmp(0, nm, gb, db, N, 1e-5, 1e-5);
        free(o); free(gi); free(gw); free(gb);
    }
}

static void test_kernels(void) {
    golden_file g;
    const golden_tensor *t;
    static const char *acts[4] = {"silu", "gelu", "gelu_tanh", "relu"};
    static const moe_activation act_ids[4] = {MOE_ACT_SILU, MOE_ACT_GELU, MOE_ACT_GELU_TANH, MOE_ACT_RELU};
    char nm[64];
    int a;
    TEST_BEGIN("golden kernels: matmul, softmax, activations, SwiGLU, RMSNorm, LayerNorm, cross-entropy vs PyTorch");
    summary_begin("kernels");
    if (!golden_open(&g, "kernels.bin")) return;
    test_matmul(&g, "matmul_small");
    test_matmul(&g, "matmul");

    /* softmax */
    if ((t = golden_find(&g, "softmax.inp")) != NULL && t->ndim == 2) {
        int rows = t->shape[0], n = t->shape[1];
        size_t sz = (size_t)rows * n;
        const float *inp = golden_need(&g, "softmax.inp", sz), *out = golden_need(&g, "softmax.out", sz);
        const float *dout = golden_need(&g, "softmax.dout", sz), *dinp = golden_need(&g, "softmax.dinp", sz);
        float *o = golden_zeros(sz), *gi = golden_zeros(sz);
        if (inp && out && dout && dinp) {
            moe_softmax_forward(o, inp, rows, n);
            golden_cmp(0, "softmax.out", o, out, sz, 1e-7, 1e-5);
            moe_softmax_backward(gi, dout, o, rows, n);
            golden_cmp(0, "softmax.dinp", gi, dinp, sz, 1e-6, 1e-5);
        }
        free(o); free(gi);
    } else CHECK(0, "softmax records missing");

    /* activations */
    for (a = 0; a < 4; a++) {
        size_t n;
        const float *inp, *out, *dout, *dinp;
        float *o, *gi;
        snprintf(nm, sizeof nm, "%s.inp", acts[a]);
        if (!CHECK((t = golden_find(&g, nm)) != NULL, "%s missing", nm)) continue;
        n = t->numel;
        inp = t->f32;
        snprintf(nm, sizeof nm, "%s.out", acts[a]); out = golden_need(&g, nm, n);
        snprintf(nm, sizeof nm, "%s.dout", acts[a]); dout = golden_need(&g, nm, n);
        snprintf(nm, sizeof nm, "%s.dinp", acts[a]); dinp = golden_need(&g, nm, n);
        if (!out || !dout || !dinp) continue;
        o = golden_zeros(n);
        gi = golden_zeros(n);
        moe_activation_forward(o, inp, n, act_ids[a]);
        moe_activation_backward(gi, dout, inp, n, act_ids[a]);
        snprintf(nm, sizeof nm, "%s.out", acts[a]); golden_cmp(0, nm, o, out, n, 1e-6, 1e-5);
        snprintf(nm, sizeof nm, "%s.dinp", acts[a]); golden_cmp(0, nm, gi, dinp, n, 1e-6, 1e-5);
        free(o); free(gi);
    }

    /* SwiGLU */
    if ((t = golden_find(&g, "swiglu.gate")) != NULL) {
        size_t n = t->numel;
        const float *gate = t->f32, *up = golden_need(&g, "swiglu.up", n), *out = golden_need(&g, "swiglu.out", n);
        const float *dout = golden_need(&g, "swiglu.dout", n), *dgate = golden_need(&g, "swiglu.dgate", n), *dup = golden_need(&g, "swiglu.dup", n);
        float *o = golden_zeros(n), *gg = golden_zeros(n), *gu = golden_zeros(n);
        if (up && out && dout && dgate && dup) {
            moe_swiglu_forward(o, gate, up, n);
            moe_swiglu_backward(gg, gu, dout, gate, up, n);
            golden_cmp(0, "swiglu.out", o, out, n, 1e-6, 1e-5);
            golden_cmp(0, "swiglu.dgate", gg, dgate, n, 1e-6, 1e-5);
            golden_cmp(0, "swiglu.dup", gu, dup, n, 1e-6, 1e-5);
        }
        free(o); free(gg); free(gu);
    } else CHECK(0, "swiglu records missing");

    /* RMSNorm */
    if ((t = golden_find(&g, "rmsnorm.inp")) != NULL && t->ndim == 2) {
        int rows = t->shape[0], n = t->shape[1];
        size_t sz = (size_t)rows * n;
        const float *inp = t->f32, *w = golden_need(&g, "rmsnorm.weight", n), *out = golden_need(&g, "rmsnorm.out", sz);
        const float *rstd = golden_need(&g, "rmsnorm.rstd", rows), *dout = golden_need(&g, "rmsnorm.dout", sz);
        const float *dinp = golden_need(&g, "rmsnorm.dinp", sz), *dw = golden_need(&g, "rmsnorm.dweight", n);
        float eps = golden_float(&g, "rmsnorm.eps", -1.0f);
        float *o = golden_zeros(sz), *rs = golden_zeros(rows), *gi = golden_zeros(sz), *gw = golden_zeros(n);
        CHECK(eps > 0.0f, "rmsnorm.eps missing");
        if (w && out && rstd && dout && dinp && dw) {
            moe_rmsnorm_forward(o, rs, inp, w, rows, n, eps);
            moe_rmsnorm_backward(gi, gw, dout, inp, w, rs, rows, n);
            golden_cmp(0, "rmsnorm.out", o, out, sz, 1e-6, 1e-5);
            golden_cmp(0, "rmsnorm.rstd", rs, rstd, rows, 1e-6, 1e-5);
            golden_cmp(0, "rmsnorm.dinp", gi, dinp, sz, 1e-6, 1e-5);
            golden_cmp(0, "rmsnorm.dweight", gw, dw, n, 1e-6, 1e-5);
        }
        free(o); free(rs); free(gi); free(gw);
    } else CHECK(0, "rmsnorm records missing");

    /* LayerNorm */
    if ((t = golden_find(&g, "layernorm.inp")) != NULL && t->ndim == 2) {
        int rows = t->shape[0], n = t->shape[1];
        size_t sz = (size_t)rows * n;
        const float *inp = t->f32, *w = golden_need(&g, "layernorm.weight", n), *b = golden_need(&g, "layernorm.bias", n);
        const float *out = golden_need(&g, "layernorm.out", sz), *mean = golden_need(&g, "layernorm.mean", rows);
        const float *rstd = golden_need(&g, "layernorm.rstd", rows), *dout = golden_need(&g, "layernorm.dout", sz);
        const float *dinp = golden_need(&g, "layernorm.dinp", sz), *dw = golden_need(&g, "layernorm.dweight", n);
        const float *db = golden_need(&g, "layernorm.dbias", n);
        float eps = golden_float(&g, "layernorm.eps", -1.0f);
        float *o = golden_zeros(sz), *mu = golden_zeros(rows), *rs = golden_zeros(rows), *gi = golden_zeros(sz), *gw = golden_zeros(n), *gb = golden_zeros(n);
        CHECK(eps > 0.0f, "layernorm.eps missing");
        if (w && b && out && mean && rstd && dout && dinp && dw && db) {
            moe_layernorm_forward(o, mu, rs, inp, w, b, rows, n, eps);
            moe_layernorm_backward(gi, gw, gb, dout, inp, w, mu, rs, rows, n);
            golden_cmp(0, "layernorm.out", o, out, sz, 1e-6, 1e-5);
            golden_cmp(0, "layernorm.mean", mu, mean, rows, 1e-6, 1e-5);
            golden_cmp(0, "layernorm.rstd", rs, rstd, rows, 1e-6, 1e-5);
            golden_cmp(0, "layernorm.dinp", gi, dinp, sz, 1e-6, 1e-5);
            golden_cmp(0, "layernorm.dweight", gw, dw, n, 1e-6, 1e-5);
            golden_cmp(0, "layernorm.dbias", gb, db, n, 1e-6, 1e-5);
        }
        free(o); free(mu); free(rs); free(gi); free(gw); free(gb);
    } else CHECK(0, "layernorm records missing");

    /* cross-entropy, ignore_index = -1 */
    if ((t = golden_find(&g, "xent.logits")) != NULL && t->ndim == 2) {
        int rows = t->shape[0], V = t->shape[1], r, count = 0, *tg = (int *)calloc((size_t)rows, sizeof(int));
        size_t sz = (size_t)rows * V;
        const int32_t *targets = golden_i32(&g, "xent.targets", rows);
        const float *losses = golden_need(&g, "xent.losses", rows), *loss = golden_need(&g, "xent.loss", 1);
        const float *dlogits = golden_need(&g, "xent.dlogits", sz);
        float *l = golden_zeros(rows), *gl = golden_zeros(sz);
        CHECK(targets != NULL, "%s", g.err);
        if (targets && losses && loss && dlogits) {
            double mean;
            for (r = 0; r < rows; r++) {
                tg[r] = targets[r];
                count += tg[r] >= 0;
            }
            mean = moe_crossentropy_forward(l, t->f32, tg, rows, V);
            moe_crossentropy_backward(gl, t->f32, tg, rows, V, 1.0f / (float)count);
            golden_cmp(0, "xent.losses", l, losses, rows, 1e-6, 1e-5);
            golden_cmp_scalar(0, "xent.loss", mean, loss[0], 1e-6, 1e-5);
            golden_cmp(0, "xent.dlogits", gl, dlogits, sz, 1e-7, 1e-5);
        }
        free(l); free(gl); free(tg);
    } else CHECK(0, "xent records missing");
    golden_groups_print();
    golden_free(&g);
}

/* ---- the MoE layer --------------------------------------------------------------------------- */

/* tolerances: forward values, gradients of the full objective, gradients of aux_total alone */
#define TOL_FWD_ATOL 1e-6
#define TOL_FWD_RTOL 1e-5
#define TOL_GRAD_ATOL 1e-5
#define TOL_GRAD_RTOL 1e-4
#define TOL_AUX_ATOL 1e-7
#define TOL_AUX_RTOL 1e-4



static void test_layer(const char *which, const char *what) {
    char file[128], title[256], nm[128];
    golden_file g;
    moe_layer_config c = moe_layer_config_default();
    moe_store S;
    moe_layer L;
    moe_layer_args args = moe_layer_args_default();
    int ok = 1, T, E, K, d, i, has_noise, pass;
    const float *x, *dy, *noise = NULL, *ref;
    float *y = NULL, *dx = NULL, *zero_dy = NULL;
    moe_status st;
    snprintf(file, sizeof file, "layer_%s.bin", which);
    snprintf(title, sizeof title, "golden layer %s: %s", which, what);
    TEST_BEGIN(title);
    summary_begin(which);
    if (!golden_open(&g, file)) return;
    c.d = golden_cfg_int(&g, "d", &ok);
    c.d_ff = golden_cfg_int(&g, "d_ff", &ok);
    c.n_experts = golden_cfg_int(&g, "n_experts", &ok);
    c.top_k = golden_cfg_int(&g, "top_k", &ok);
    c.n_shared = golden_cfg_int(&g, "n_shared", &ok);
    c.d_ff_shared = golden_cfg_int(&g, "d_ff_shared", &ok);
    c.expert = (moe_expert_kind)golden_cfg_int(&g, "expert", &ok);
    c.activation = (moe_activation)golden_cfg_int(&g, "activation", &ok);
    c.expert_bias = golden_cfg_int(&g, "expert_bias", &ok);
    c.router = (moe_router_kind)golden_cfg_int(&g, "router", &ok);
    c.renormalize = golden_cfg_int(&g, "renormalize", &ok);
    c.router_bias = golden_cfg_int(&g, "router_bias", &ok);
    c.balance = (moe_balance_loss)golden_cfg_int(&g, "balance", &ok);
    c.capacity_factor = golden_cfg_float(&g, "capacity_factor", &ok);
    c.balance_coef = golden_cfg_float(&g, "balance_coef", &ok);
    c.z_coef = golden_cfg_float(&g, "z_coef", &ok);
    c.importance_coef = golden_cfg_float(&g, "importance_coef", &ok);
    c.load_coef = golden_cfg_float(&g, "load_coef", &ok);
    c.noise_eps = golden_cfg_float(&g, "noise_eps", &ok);
    /* the conventions of the field: recorded only by the cases that change them */
    c.ec_capacity_factor = golden_float(&g, "cfg.ec_capacity_factor", 0.0f);
    c.cv_unbiased = golden_int(&g, "cfg.cv_unbiased", 0);
    c.capacity_order = (moe_capacity_order)golden_int(&g, "cfg.capacity_order", 0);
    c.routed_scale = golden_float(&g, "cfg.routed_scale", 1.0f);
    c.shared_scale = golden_float(&g, "cfg.shared_scale", 1.0f);
    c.selection_bias = golden_int(&g, "cfg.selection_bias", 0);
    c.drop_passthrough = golden_int(&g, "cfg.drop_passthrough", 0);
    T = golden_cfg_int(&g, "tokens", &ok);
    has_noise = golden_cfg_int(&g, "has_noise", &ok);
    if (!ok) { golden_free(&g); return; }
    E = c.n_experts; K = c.top_k; d = c.d;

    moe_store_init(&S);
    /* sized for more tokens than used: strides must follow T, not max_tokens */
    st = moe_layer_init(&L, &c, &S, "moe.", T + 5);
    if (!CHECK(st == MOE_OK, "moe_layer_init: %s", L.err.msg)) { moe_store_free(&S); golden_free(&g); return; }
    st = moe_store_alloc(&S, 0);
    if (!CHECK(st == MOE_OK, "moe_store_alloc: %s", S.err.msg)) goto done;
    /* the initial weights, by tensor name */
    if (!golden_store_params(&g, &S, 0)) goto done;
    x = golden_need(&g, "x", (size_t)T * d);
    dy = golden_need(&g, "dy", (size_t)T * d);
    if (has_noise) noise = golden_need(&g, "noise", (size_t)T * E);
    if (!x || !dy || (has_noise && !noise)) goto done;
    y = golden_zeros((size_t)T * d);
    dx = golden_zeros((size_t)T * d);
    zero_dy = golden_zeros((size_t)T * d);

    /* forward; y starts as garbage: forward overwrites it */
    for (i = 0; i < T * d; i++) y[i] = 1e3f;
    args.noise = noise;
    st = moe_layer_forward(&L, &S, y, x, T, &args);
    if (!CHECK(st == MOE_OK, "moe_layer_forward: %s", L.err.msg)) goto done;
    golden_cmp(0, "logits", L.logits, golden_need(&g, "logits", (size_t)T * E), (size_t)T * E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    golden_cmp(0, "probs", L.probs, golden_need(&g, "probs", (size_t)T * E), (size_t)T * E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    if (golden_find(&g, "noisy")) golden_cmp(0, "noisy logits H", L.noisy.H, golden_need(&g, "noisy", (size_t)T * E), (size_t)T * E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    golden_cmp_ints("top-k ids", L.topk, golden_i32(&g, "topk", (size_t)T * K), (size_t)T * K);
    golden_cmp(0, "gates", L.gates, golden_need(&g, "gates", (size_t)T * E), (size_t)T * E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    golden_cmp(0, "y", y, golden_need(&g, "y", (size_t)T * d), (size_t)T * d, TOL_FWD_ATOL, TOL_FWD_RTOL);
    {
        int counts[3];
        int32_t refc[3];
        counts[0] = L.stats.requested; counts[1] = L.stats.kept; counts[2] = L.stats.dropped;
        refc[0] = golden_int(&g, "stats.requested", -1);
        refc[1] = golden_int(&g, "stats.kept", -1);
        refc[2] = golden_int(&g, "stats.dropped", -1);
        golden_cmp_ints("stats requested/kept/dropped", counts, refc, 3);
    }
    golden_cmp(0, "stats.load", L.stats.load, golden_need(&g, "stats.load", E), E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    golden_cmp(0, "stats.mean_prob", L.stats.mean_prob, golden_need(&g, "stats.mean_prob", E), E, TOL_FWD_ATOL, TOL_FWD_RTOL);
    if ((ref = golden_need(&g, "stats.gate_entropy", 1)) != NULL) golden_cmp_scalar(0, "stats.gate_entropy", L.stats.gate_entropy, ref[0], 1e-6, 1e-5);
    if ((ref = golden_need(&g, "stats.load_entropy", 1)) != NULL) golden_cmp_scalar(0, "stats.load_entropy", L.stats.load_entropy, ref[0], 1e-6, 1e-5);
    if ((ref = golden_need(&g, "aux_balance", 1)) != NULL) golden_cmp_scalar(0, "aux_balance", L.stats.aux_balance, ref[0], 1e-7, 1e-5);
    if ((ref = golden_need(&g, "aux_z", 1)) != NULL) golden_cmp_scalar(0, "aux_z", L.stats.aux_z, ref[0], 1e-7, 1e-5);
    if ((ref = golden_need(&g, "aux_cv", 1)) != NULL) golden_cmp_scalar(0, "aux_cv", L.stats.aux_cv, ref[0], 1e-7, 1e-5);
    if ((ref = golden_need(&g, "aux_total", 1)) != NULL) golden_cmp_scalar(0, "aux_total", L.stats.aux_total, ref[0], 1e-7, 1e-5);

    /* backward. pass 0: the gradient of sum(y*dy) + aux_total; pass 1: the same forward and
       backward once more without zeroing, so every gradient (dx included) must double, as
       backward accumulates; pass 2: aux_total alone (dy = 0) */
    for (pass = 0; pass < 3; pass++) {
        const char *pre = pass == 2 ? "aux_grad." : "grad.";
        double atol = pass == 2 ? TOL_AUX_ATOL : TOL_GRAD_ATOL, rtol = pass == 2 ? TOL_AUX_RTOL : TOL_GRAD_RTOL;
        float scale = pass == 1 ? 2.0f : 1.0f;
        golden_record = pass != 1;
        if (pass > 0) {
            st = moe_layer_forward(&L, &S, y, x, T, &args);
            if (!CHECK(st == MOE_OK, "moe_layer_forward: %s", L.err.msg)) goto done;
        }
        if (pass != 1) {
            moe_store_zero_grad(&S);
            memset(dx, 0, sizeof(float) * (size_t)T * d);
        }
        st = moe_layer_backward(&L, &S, dx, pass == 2 ? zero_dy : dy, x, &args);
        if (!CHECK(st == MOE_OK, "moe_layer_backward: %s", L.err.msg)) goto done;
        snprintf(nm, sizeof nm, "%sdx", pre);
        golden_cmp_scaled(0, pass == 1 ? "2x grad.dx (accumulated)" : nm, dx, golden_need(&g, nm, (size_t)T * d), scale, (size_t)T * d, atol, rtol);
        for (i = 0; i < S.count; i++) {
            const moe_tensor *tn = &S.tensors[i];
            char label[160];
            snprintf(nm, sizeof nm, "%s%s", pre, tn->name);
            snprintf(label, sizeof label, "2x %s (accumulated)", nm);
            if (pass == 2 && strncmp(tn->name, "moe.router.", 11) != 0) {
                /* experts get nothing from the auxiliary losses */
                size_t j, nz = 0;
                const float *gr = moe_store_grad(&S, i);
                for (j = 0; j < tn->numel; j++) nz += gr[j] != 0.0f;
                CHECK(nz == 0, "%s: %zu non-zero gradients from the auxiliary losses alone", nm, nz);
                continue;
            }
            golden_cmp_scaled(0, pass == 1 ? label : nm, moe_store_grad(&S, i), golden_need(&g, nm, tn->numel), scale, tn->numel, atol, rtol);
            if (pass == 0 && strncmp(tn->name, "moe.experts.", 12) == 0) {
                /* an expert that got no tokens gets exactly zero gradient */
                size_t per = tn->numel / (size_t)E, j, nz;
                int e;
                for (e = 0; e < E; e++) {
                    const float *gr = moe_store_grad(&S, i) + per * (size_t)e;
                    if (L.routed.offset[e + 1] != L.routed.offset[e]) continue;
                    for (j = 0, nz = 0; j < per; j++) nz += gr[j] != 0.0f;
                    CHECK(nz == 0, "%s: idle expert %d has %zu non-zero gradients", nm, e, nz);
                }
            }
        }
    }
    golden_record = 1;
    golden_groups_print();
done:
    golden_record = 1;
    free(y); free(dx); free(zero_dy);
    moe_layer_free(&L);
    moe_store_free(&S);
    golden_free(&g);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) setenv("TEST_VERBOSE", "1", 1);
    test_reader_errors();
    test_kernels();
    test_layer("switch", "softmax top-1 (no renorm), FFN(GELU)+biases, router bias, an idle expert, Switch balance, z-loss");
    test_layer("mixtral", "renormalised softmax top-2, SwiGLU, Mixtral balance, z-loss");
    test_layer("deepseek", "2 shared + 16 fine-grained experts, softmax top-4 (no renorm), DeepSeek balance, z-loss");
    test_layer("deepseek_scaled", "the same with routed_scale 2.5 (DeepSeek-V3's routed scaling factor) and shared_scale 0.5");
    test_layer("sigmoid_v3", "DeepSeek-V3 gating: sigmoid, top-2 by score + selection bias, renormalised, routed_scale 2.5, 1 shared expert");
    test_layer("sigmoid", "sigmoid top-2 (no renorm), Mixtral balance on normalised scores, z-loss");
    test_layer("sigmoid_renorm", "sigmoid top-3 renormalised, FFN(GELU tanh), router bias, DeepSeek balance");
    test_layer("noisy", "Shazeer noisy top-2 with stored noise, importance + smooth-load CV^2");
    test_layer("noisy_large", "noisy top-2 at T = 320 (parallel router loops, multi-block experts), Mixtral balance, z-loss");
    test_layer("noisy_eval", "noisy top-1 without noise (H = z, Load = counts), Switch balance");
    test_layer("expert_choice", "expert choice, ceil(k*T/E) = 11 tokens per expert, z-loss");
    test_layer("topk_ties", "exact score ties (experts 1 and 4 share a router row): the lower expert index first");
    test_layer("expert_choice_ties", "exact ties (duplicated tokens) at each expert's capacity: the lower token index kept");
    test_layer("capacity", "capacity factor 1.0 with drops, renormalised top-2, FFN(ReLU)+biases, 1 shared FFN expert, Mixtral balance, z-loss");
    test_layer("capacity_token", "the same with token-major admission: each token's choices before the next token's");
    test_layer("capacity_switch", "capacity factor 1.25 with drops, top-1, FFN(SiLU), Switch balance");
    test_layer("capacity_switch_hf", "the same, dropped tokens output p_top1 * x as HF's Switch Transformers");
    test_layer("noisy_unbiased", "noisy top-2 whose CV^2 losses use the unbiased variance (torch.var, the HyperMoE code)");
    test_layer("expert_choice_cf", "expert choice with ec_capacity_factor 1.25 (7 tokens per expert), Mixtral balance, z-loss");
    return test_summary();
}
