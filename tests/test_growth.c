/* test_growth.c - moe.h section >>moe:growth (and the model's layer_scale it drives): the depth
   maps (stack = j mod l, interpolation, partial stacking, the paper's connection rates), the
   grown store's names and shapes, G_zero / G_random / width growth keeping the small model's
   logits, gradients through scaled residual branches, G_learn's map gradient, the paper's
   formulas, and bad input refused with a sentence and the target left untouched. */
#define _POSIX_C_SOURCE 200809L /* proc.h */
#include "moe.h"
#include "test.h"
#include "proc.h" /* defines: proc_run, proc_log_has */

enum { B = 2, T = 8 };

static moe_model_config cfg(int moe_every, int layers, int d_ff, int moe_ff) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 8;
    c.d = 16;
    c.n_layers = layers;
    c.n_heads = 2;
    c.d_ff = d_ff;
    c.moe_every = moe_every;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = moe_ff;
    c.moe.router_init_std = 1.0f;
    return c;
}

static void tokens(int *x, int n, int V, uint64_t seed) {
    moe_rng r;
    int i;
    moe_rng_seed(&r, seed);
    for (i = 0; i < n; i++) x[i] = moe_rng_below(&r, V);
}

/* a trained-looking small model: init weights times 3, so every path carries signal */
static int make_model(moe_model *m, const moe_model_config *c, uint64_t seed) {
    size_t i;
    if (moe_model_init(m, c, B, T) != MOE_OK) return 0;
    moe_model_init_weights(m, seed);
    for (i = 0; i < m->S.numel; i++) m->S.params[i] *= 3.0f;
    return 1;
}

static float *logits_of(moe_model *m, const int *x) {
    size_t n = (size_t)B * T * m->cfg.vocab;
    float *out = (float *)malloc(n * sizeof(float));
    if (moe_model_forward(m, x, NULL, B, T, NULL) != MOE_OK) { free(out); return NULL; }
    memcpy(out, m->logits, n * sizeof(float));
    return out;
}

static int params_equal(const moe_model *a, const char *na, const moe_model *b, const char *nb) {
    int ia = moe_store_find(&a->S, na), ib = moe_store_find(&b->S, nb);
    if (ia < 0 || ib < 0 || a->S.tensors[ia].numel != b->S.tensors[ib].numel) return 0;
    return memcmp(moe_store_param(&a->S, ia), moe_store_param(&b->S, ib), a->S.tensors[ia].numel * sizeof(float)) == 0;
}

static void test_maps(void) {
    moe_grow_spec s = moe_grow_spec_default();
    moe_err err;
    int map[24], j, ok = 1;
    TEST_BEGIN("growth: depth maps, partial stacking, connection rates");
    memset(&err, 0, sizeof err);
    CHECK(moe_grow_layer_map(map, 8, 2, &s, &err) == MOE_OK, "stack 2 -> 8");
    for (j = 0; j < 8; j++) ok &= map[j] == j % 2;
    CHECK(ok, "stacking maps layer j to j mod l");
    CHECK(!moe_grow_is_new(map, 1) && moe_grow_is_new(map, 2) && moe_grow_is_new(map, 7), "layers 0, 1 are the originals, 2.. the copies");
    s.order = MOE_GROW_INTERPOLATE;
    CHECK(moe_grow_layer_map(map, 8, 2, &s, &err) == MOE_OK && map[0] == 0 && map[3] == 0 && map[4] == 1 && map[7] == 1,
          "interpolation maps layer j to j / g");
    /* the paper's R_c for 8 -> 24: block stacking 91.3%, interpolation 30.4% */
    CHECK(moe_grow_layer_map(map, 24, 8, &s, &err) == MOE_OK && fabs(moe_grow_connection_rate(map, 24) - 7.0 / 23.0) < 1e-12,
          "interpolation 8 -> 24 keeps 7 of 23 connections (30.4%%)");
    s.order = MOE_GROW_STACK;
    CHECK(moe_grow_layer_map(map, 24, 8, &s, &err) == MOE_OK && fabs(moe_grow_connection_rate(map, 24) - 21.0 / 23.0) < 1e-12,
          "stacking 8 -> 24 keeps 21 of 23 connections (91.3%%)");
    CHECK(moe_grow_partial_map(map, 24, 6, 0, 2, &err) == MOE_OK && map[0] == 0 && map[1] == 1 && map[18] == 0 && map[19] == 1 &&
              map[20] == 2 && map[23] == 5,
          "partial stacking of the front block [0, 2): 10 copies, then layers 2..5");
    CHECK(moe_grow_partial_map(map, 24, 6, 2, 4, &err) != MOE_OK && strstr(err.msg, "cannot add"), "a block of 4 cannot add 18 layers: %s", err.msg);
    CHECK(moe_grow_layer_map(map, 8, 3, &s, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "not a multiple"), "3 -> 8: %s", err.msg);
    CHECK(moe_grow_layer_map(map, 2, 4, &s, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "at least as many"), "4 -> 2: %s", err.msg);
    {
        int bad[3] = {0, 1, 2};
        s.layer_map = bad;
        CHECK(moe_grow_layer_map(map, 3, 2, &s, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "layer_map[2]"), "map entry outside: %s", err.msg);
    }
}

static void test_stack_store(int moe_every) {
    moe_model_config cs = cfg(moe_every, 2, 24, 12), cb = cfg(moe_every, 8, 24, 12);
    moe_model small, big;
    moe_grow_spec s = moe_grow_spec_default();
    int j, ok = 1, per_layer = 0, t;
    char a[64], b[64];
    TEST_BEGIN(moe_every ? "growth: G_stack of an MoE model: names, shapes, experts and routers copied"
                         : "growth: G_stack of a dense model: names, shapes, layer j = layer j mod l");
    if (!CHECK(make_model(&small, &cs, 1) && make_model(&big, &cb, 2), "models built")) return;
    for (t = 0; (size_t)t < big.S.numel && t < 8; t++) big.S.adam_m[t] = big.S.adam_v[t] = big.S.grads[t] = 1.0f;
    CHECK(moe_model_grow(&big, &small, &s) == MOE_OK, "grow: %s", big.err.msg);
    for (t = 0; t < small.S.count; t++) per_layer += strncmp(small.S.tensors[t].name, "l0.", 3) == 0;
    CHECK(big.S.count == small.S.count + 6 * per_layer, "8 layers of %d tensors: %d tensors, got %d", per_layer, small.S.count + 6 * per_layer, big.S.count);
    for (t = 0; t < big.S.count; t++) {
        const char *name = big.S.tensors[t].name, *dot = strchr(name, '.');
        int src;
        if (name[0] != 'l' || !dot || name[1] < '0' || name[1] > '9') {
            ok &= params_equal(&big, name, &small, name);
            continue;
        }
        j = atoi(name + 1);
        snprintf(b, sizeof b, "l%d%s", j % 2, dot);
        src = moe_store_find(&small.S, b);
        ok &= src >= 0 && big.S.tensors[t].ndim == small.S.tensors[src].ndim &&
              memcmp(big.S.tensors[t].shape, small.S.tensors[src].shape, sizeof big.S.tensors[t].shape) == 0 && params_equal(&big, name, &small, b);
    }
    CHECK(ok, "every tensor of layer j is small layer j mod 2's (same shape and values); wte, lnf copied");
    snprintf(a, sizeof a, "l7.%s", moe_every ? "moe.experts.w_down" : "ffn.w_down");
    CHECK(moe_store_find(&big.S, a) >= 0, "the grown store has %s", a);
    if (moe_every) CHECK(params_equal(&big, "l5.moe.router.w", &small, "l1.moe.router.w"), "routers travel with their layers");
    ok = 1;
    for (t = 0; t < 8; t++) ok &= big.S.adam_m[t] == 0.0f && big.S.adam_v[t] == 0.0f && big.S.grads[t] == 0.0f;
    CHECK(ok, "the optimizer state restarts: moments and gradients zero");
    moe_model_free(&small);
    moe_model_free(&big);
}

/* G_zero and G_random at step 0 (and Net2Net width growth) compute the small model's function */
static void test_function_preserving(const char *label, int moe_every, int l, int L, int ff, int moe_ff, moe_grow_op op,
                                     moe_grow_order order) {
    moe_model_config cs = cfg(moe_every, l, 24, 12), cb = cfg(moe_every, L, ff, moe_ff);
    moe_model small, big;
    moe_grow_spec s = moe_grow_spec_default();
    int x[B * T];
    float *ys, *yb;
    TEST_BEGIN(label);
    if (!CHECK(make_model(&small, &cs, 5) && make_model(&big, &cb, 6), "models built")) return;
    s.op = op;
    s.order = order;
    tokens(x, B * T, 32, 9);
    CHECK(moe_model_grow(&big, &small, &s) == MOE_OK, "grow: %s", big.err.msg);
    ys = logits_of(&small, x);
    yb = logits_of(&big, x);
    if (ys && yb) check_close(label, yb, ys, (size_t)B * T * 32, 1e-4, 1e-4);
    else CHECK(0, "forward failed");
    if (op == MOE_GROW_RANDOM && ys && yb) {
        float *y2;
        double diff = 0.0;
        size_t i;
        CHECK(moe_grow_set_mask(&big, l, &s, 50, 100) == MOE_OK && big.layer_scale[L - 1] == 0.5f && big.layer_scale[0] == 1.0f,
              "half-way through the ramp the new layers' mask is 0.5, the originals' 1");
        y2 = logits_of(&big, x);
        for (i = 0; y2 && i < (size_t)B * T * 32; i++) diff += fabs(y2[i] - ys[i]);
        CHECK(y2 && diff > 1e-2, "the mask lets the random layers in (|dlogits| = %g)", diff);
        moe_grow_set_mask(&big, l, &s, 100, 100);
        CHECK(big.layer_scale[L - 1] == 1.0f, "the mask reaches 1 at the ramp's end");
        free(y2);
    }
    free(ys);
    free(yb);
    moe_model_free(&small);
    moe_model_free(&big);
}

/* the residual branches scaled by layer_scale: directional finite differences per tensor */
static void test_scaled_gradients(int moe_every) {
    moe_model_config c = cfg(moe_every, 2, 24, 12);
    moe_model m;
    int x[B * T], y[B * T], id;
    float *p0;
    TEST_BEGIN(moe_every ? "growth: gradients through scaled residual branches (MoE)" : "growth: gradients through scaled residual branches (dense)");
    if (!CHECK(make_model(&m, &c, 11), "model built")) return;
    m.layer_scale[0] = 0.3f;
    m.layer_scale[1] = 0.7f;
    tokens(x, B * T, 32, 12);
    tokens(y, B * T, 32, 13);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    moe_store_zero_grad(&m.S);
    CHECK(moe_model_forward(&m, x, y, B, T, NULL) == MOE_OK && moe_model_backward(&m, 1.0f) == MOE_OK, "forward, backward");
    for (id = 0; id < m.S.count; id++) {
        const moe_tensor *t = &m.S.tensors[id];
        float *p = m.S.params + t->offset;
        double analytic = 0.0, jp, jm, eps = 1e-3;
        moe_rng r;
        size_t i;
        if (strstr(t->name, "router")) continue; /* finite differences would flip top-k choices */
        moe_rng_seed(&r, (uint64_t)id + 100);
        for (i = 0; i < t->numel; i++) analytic += (double)m.S.grads[t->offset + i] * (0.1 * ((int)(i * 7 % 13) - 6));
        for (i = 0; i < t->numel; i++) p[i] = p0[t->offset + i] + (float)(eps * 0.1 * ((int)(i * 7 % 13) - 6));
        moe_model_forward(&m, x, y, B, T, NULL);
        jp = m.loss + m.aux_loss;
        for (i = 0; i < t->numel; i++) p[i] = p0[t->offset + i] - (float)(eps * 0.1 * ((int)(i * 7 % 13) - 6));
        moe_model_forward(&m, x, y, B, T, NULL);
        jm = m.loss + m.aux_loss;
        memcpy(p, p0 + t->offset, t->numel * sizeof(float));
        check_grad_tol(t->name, analytic, (jp - jm) / (2 * eps), 2e-2, 5e-4);
    }
    free(p0);
    moe_model_free(&m);
}

static void test_learn(void) {
    moe_model_config cs = cfg(0, 2, 24, 12), cb = cfg(0, 4, 24, 12);
    moe_model small, big, ref;
    moe_grow_spec s = moe_grow_spec_default();
    moe_grow_learner g;
    int x[B * T], y[B * T], j, i;
    double worst = 0.0;
    TEST_BEGIN("growth: G_learn starts at the stack and its map gradient matches finite differences");
    if (!CHECK(make_model(&small, &cs, 21) && make_model(&big, &cb, 22) && make_model(&ref, &cb, 22), "models built")) return;
    s.op = MOE_GROW_LEARN;
    CHECK(moe_model_grow(&ref, &small, &s) == MOE_OK, "grow: %s", ref.err.msg);
    if (!CHECK(moe_grow_learner_init(&g, &big, &small, &s) == MOE_OK, "learner: %s", g.err.msg)) return;
    moe_grow_learner_apply(&g, &big, &small);
    CHECK(memcmp(big.S.params, ref.S.params, big.S.numel * sizeof(float)) == 0, "D at the stack map gives G_stack's parameters");
    tokens(x, B * T, 32, 23);
    tokens(y, B * T, 32, 24);
    moe_store_zero_grad(&big.S);
    moe_model_forward(&big, x, y, B, T, NULL);
    moe_model_backward(&big, 1.0f);
    moe_grow_learner_backward(&g, &big, &small);
    for (j = 0; j < 4; j++)
        for (i = 0; i < 2; i++) {
            float keep = g.D[j * 2 + i];
            double eps = 1e-3, jp, jm, num, an = g.gD[j * 2 + i];
            g.D[j * 2 + i] = keep + (float)eps;
            moe_grow_learner_apply(&g, &big, &small);
            moe_model_forward(&big, x, y, B, T, NULL);
            jp = big.loss;
            g.D[j * 2 + i] = keep - (float)eps;
            moe_grow_learner_apply(&g, &big, &small);
            moe_model_forward(&big, x, y, B, T, NULL);
            jm = big.loss;
            g.D[j * 2 + i] = keep;
            num = (jp - jm) / (2 * eps);
            if (fabs(an - num) / (fabs(num) + 1e-2) > worst) worst = fabs(an - num) / (fabs(num) + 1e-2);
        }
    CHECK(worst < 3e-2, "dL/dD analytic vs numeric: worst relative error %g", worst);
    {
        double before, after;
        moe_grow_learner_apply(&g, &big, &small);
        moe_model_forward(&big, x, y, B, T, NULL);
        before = big.loss;
        for (i = 0; i < 20; i++) {
            moe_store_zero_grad(&big.S);
            moe_grow_learner_apply(&g, &big, &small);
            moe_model_forward(&big, x, y, B, T, NULL);
            moe_model_backward(&big, 1.0f);
            moe_grow_learner_backward(&g, &big, &small);
            moe_grow_learner_step(&g, 0.02f);
        }
        moe_grow_learner_apply(&g, &big, &small);
        moe_model_forward(&big, x, y, B, T, NULL);
        after = big.loss;
        CHECK(after < before, "20 Adam steps on D lower the loss on their batch (%.4f -> %.4f)", before, after);
    }
    moe_grow_learner_free(&g);
    moe_model_free(&small);
    moe_model_free(&big);
    moe_model_free(&ref);
}

static void test_bad_input(void) {
    moe_model small, big, odd;
    moe_model_config cs = cfg(0, 4, 24, 12), cb = cfg(0, 2, 24, 12), c6 = cfg(0, 6, 24, 12);
    moe_grow_spec s = moe_grow_spec_default();
    float *keep;
    TEST_BEGIN("growth: bad input is a status with a sentence, the target untouched");
    if (!CHECK(make_model(&small, &cs, 31) && make_model(&big, &cb, 32) && make_model(&odd, &c6, 33), "models built")) return;
    keep = (float *)malloc(odd.S.numel * sizeof(float));
    memcpy(keep, odd.S.params, odd.S.numel * sizeof(float));
    CHECK(moe_model_grow(&big, &small, &s) == MOE_ERR_INVALID_ARG && strstr(big.err.msg, "at least as many"), "4 -> 2 layers: %s", big.err.msg);
    CHECK(moe_model_grow(&odd, &small, &s) == MOE_ERR_INVALID_ARG && strstr(odd.err.msg, "not a multiple"), "4 -> 6 layers: %s", odd.err.msg);
    CHECK(memcmp(keep, odd.S.params, odd.S.numel * sizeof(float)) == 0, "nothing half-grown");
    moe_model_free(&small);
    moe_model_free(&big);
    { /* width of the model (d) does not grow; G_random only grows depth */
        moe_model_config a = cfg(0, 2, 24, 12), b = cfg(0, 6, 48, 12);
        a.d = 8;
        make_model(&small, &a, 34);
        CHECK(moe_model_grow(&odd, &small, &s) == MOE_ERR_INVALID_ARG && strstr(odd.err.msg, "d does not grow"), "d 8 -> 16: %s", odd.err.msg);
        moe_model_free(&small);
        a = cfg(0, 2, 24, 12);
        make_model(&small, &a, 35);
        make_model(&big, &b, 36);
        s.op = MOE_GROW_RANDOM;
        CHECK(moe_model_grow(&big, &small, &s) == MOE_ERR_UNSUPPORTED && strstr(big.err.msg, "depth only"), "G_random in width: %s", big.err.msg);
        moe_model_free(&big);
        moe_model_free(&small);
    }
    { /* MoE every other layer: a 3-layer base stacked to 6 puts a dense layer where the target has MoE */
        moe_model_config a = cfg(2, 3, 24, 12), b = cfg(2, 6, 24, 12);
        s.op = MOE_GROW_DIRECT;
        make_model(&small, &a, 37);
        make_model(&big, &b, 38);
        CHECK(moe_model_grow(&big, &small, &s) == MOE_ERR_INVALID_ARG && strstr(big.err.msg, "dense"), "MoE/dense mismatch: %s", big.err.msg);
        moe_model_free(&big);
        moe_model_free(&small);
    }
    CHECK(memcmp(keep, odd.S.params, odd.S.numel * sizeof(float)) == 0, "still nothing half-grown");
    free(keep);
    moe_model_free(&odd);
}

static void test_formulas(void) {
    double f[4] = {1, 2, 3, 4}, l[4] = {3.0, 2.0, 1.5, 1.2}, at = 0;
    moe_err err;
    TEST_BEGIN("growth: the paper's growth timing and factor fits, speed-up at equal loss");
    memset(&err, 0, sizeof err);
    /* the paper's table of d: Llama2-7B 11.11B, Llama2-13B 15.84B, Llama2-70B 42.48B (2T tokens) */
    CHECK(fabs(moe_grow_timing_tokens(7e9, 6 * 7e9 * 2e12) / 11.11e9 - 1) < 0.02, "7B/2T: %g", moe_grow_timing_tokens(7e9, 6 * 7e9 * 2e12));
    CHECK(fabs(moe_grow_timing_tokens(13e9, 6 * 13e9 * 2e12) / 15.84e9 - 1) < 0.02, "13B/2T: %g", moe_grow_timing_tokens(13e9, 6 * 13e9 * 2e12));
    CHECK(fabs(moe_grow_timing_tokens(70e9, 6 * 70e9 * 2e12) / 42.48e9 - 1) < 0.02, "70B/2T: %g", moe_grow_timing_tokens(70e9, 6 * 70e9 * 2e12));
    CHECK(moe_grow_factor_fit(7e9, 6 * 7e9 * 2e12) > 1.0, "the g fit gives a growth factor > 1 at 7B (%g)", moe_grow_factor_fit(7e9, 6 * 7e9 * 2e12));
    CHECK(moe_grow_flops_at_loss(f, l, 4, 1.75, &at, &err) == MOE_OK && fabs(at - 2.5) < 1e-12, "interpolated FLOPs at loss 1.75: %g", at);
    CHECK(moe_grow_flops_at_loss(f, l, 4, 1.0, &at, &err) != MOE_OK && strstr(err.msg, "never reaches"), "unreached loss: %s", err.msg);
    CHECK(fabs(moe_grow_speedup(3.0, 2.0) - 0.5) < 1e-12, "speed-up 3/2 - 1 = 50%%");
}

/* examples/grow --quick: every run trains, grows and reports a speed-up; the files appear */
static void test_example(void) {
    const char *bin = "build/examples/grow", *log = "build/grow_quick.log";
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    proc_opts po = proc_opts_default();
    TEST_BEGIN("examples/grow --quick: scratch vs grown runs at equal FLOPs");
    if (!f) {
        printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return;
    }
    fclose(f);
    f = fopen(bin, "rb");
    if (!f) {
        printf("   skipped: %s is not built (make test builds it)\n", bin);
        return;
    }
    fclose(f);
    po.env[0] = "OMP_NUM_THREADS=1"; /* a tiny model: threads only wait on each other */
    CHECK(proc_run(&po, log, bin, "--quick", "--out", "build/tmp_grow", (const char *)NULL) == 0, "grow --quick exits 0 (see %s)", log);
    CHECK(proc_log_has(log, "result run=stack_medium final_val_loss=") && proc_log_has(log, "result run=g8 ") &&
              proc_log_has(log, "result run=learn ") && proc_log_has(log, "run=random seed=2 base_layers=2"),
          "every run reports its final loss and speed-up (see %s)", log);
    CHECK(!proc_log_has(log, "nan"), "no NaN in the results (see %s)", log);
    f = fopen("build/tmp_grow/grow_loss.png", "rb");
    CHECK(f != NULL, "grow_loss.png written");
    if (f) fclose(f);
    f = fopen("build/tmp_grow/grow_results.csv", "rb");
    CHECK(f != NULL, "grow_results.csv written");
    if (f) fclose(f);
    CHECK(proc_run(NULL, "build/grow_bad.log", bin, "--layers", "6", "--quick", "--out", "build/tmp_grow", (const char *)NULL) == 2 &&
              proc_log_has("build/grow_bad.log", "multiple"),
          "a depth that g does not divide is refused with a sentence");
}

int main(void) {
    test_maps();
    test_stack_store(0);
    test_stack_store(1);
    test_function_preserving("growth: G_zero 2 -> 8 (dense) keeps the logits", 0, 2, 8, 24, 12, MOE_GROW_ZERO, MOE_GROW_STACK);
    test_function_preserving("growth: G_zero 2 -> 8 (MoE every layer) keeps the logits", 1, 2, 8, 24, 12, MOE_GROW_ZERO, MOE_GROW_STACK);
    test_function_preserving("growth: G_zero interpolation 2 -> 6 (MoE every layer) keeps the logits", 1, 2, 6, 24, 12, MOE_GROW_ZERO,
                             MOE_GROW_INTERPOLATE);
    test_function_preserving("growth: G_random at step 0, 2 -> 8 (MoE), keeps the logits; the mask ramps", 1, 2, 8, 24, 12, MOE_GROW_RANDOM,
                             MOE_GROW_STACK);
    test_function_preserving("growth: G_random at step 0, 2 -> 4 (dense) keeps the logits", 0, 2, 4, 24, 12, MOE_GROW_RANDOM, MOE_GROW_STACK);
    test_function_preserving("growth: Net2Net width d_ff 24 -> 48, experts 12 -> 36 (MoE every other layer) keep the logits", 2, 2, 2, 48,
                             36, MOE_GROW_DIRECT, MOE_GROW_STACK);
    test_function_preserving("growth: G_zero width d_ff 24 -> 40 with depth 2 -> 4 (dense) keeps the logits", 0, 2, 4, 40, 12, MOE_GROW_ZERO,
                             MOE_GROW_STACK);
    test_scaled_gradients(0);
    test_scaled_gradients(1);
    test_learn();
    test_bad_input();
    test_formulas();
    test_example();
    return test_summary();
}
