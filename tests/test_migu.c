/* test_migu.c - MIGU (moe.h >>moe:migu): the output-magnitude statistics of every linear
   layer against direct computations, the top-(1 - T) selection, micro-batches, the reset,
   the random control, a masked step, bad input. */
#include "moe.h"  /* defines: moe_migu_*, moe_mask_*, moe_model_*, moe_matmul_forward_naive */
#include "test.h" /* defines: CHECK, test_summary */

static moe_model_config tiny_config(int moe) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 12;
    c.d = 16;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 24;
    c.moe_every = moe ? 1 : 0;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 12;
    return c;
}

static void tokens(int *x, int n, uint64_t seed) {
    moe_rng r;
    int i;
    moe_rng_seed(&r, seed);
    for (i = 0; i < n; i++) x[i] = moe_rng_below(&r, 32);
}

static const double *stat_of(const moe_migu *g, const moe_model *m, const char *name) {
    int id = moe_store_find(&m->S, name);
    return id >= 0 && g->off[id] >= 0 ? g->stat + g->off[id] : NULL;
}

/* l0.attn.wo's statistic = sum over tokens of |atty W_o^T| (raw) or its per-token L1-normalised
   form, computed here from the attention output the model cached */
static void test_statistics(void) {
    moe_model m;
    moe_model_config c = tiny_config(0);
    moe_migu g[2];
    moe_migu_config mc = moe_migu_config_default();
    int in[16], tg[16], s, i, j, N = 16, d = 16;
    float *y = (float *)malloc(sizeof(float) * 16 * 16);
    double want[2][16];
    TEST_BEGIN("migu: statistics of the attention output and dense down projections");
    CHECK(moe_model_init(&m, &c, 2, 8) == MOE_OK, "init");
    moe_model_init_weights(&m, 1);
    tokens(in, 16, 2); tokens(tg, 16, 3);
    for (s = 0; s < 2; s++) {
        mc.stat = s ? MOE_MIGU_SUM : MOE_MIGU_L1;
        CHECK(moe_migu_init(&g[s], &m, &mc) == MOE_OK, "init: %s", g[s].err.msg);
    }
    CHECK(g[0].n_tensors == 2 * 5, "every linear of 2 layers watched: %d", g[0].n_tensors);
    moe_model_forward(&m, in, tg, 2, 8, NULL);
    for (s = 0; s < 2; s++) CHECK(moe_migu_accumulate(&g[s], &m) == MOE_OK, "accumulate");
    moe_matmul_forward_naive(y, m.blocks[0].atty, moe_store_param(&m.S, moe_store_find(&m.S, "l0.attn.wo")), NULL, N, d, d);
    memset(want, 0, sizeof want);
    for (i = 0; i < N; i++) {
        double l1 = 0;
        for (j = 0; j < d; j++) l1 += fabs(y[i * d + j]);
        for (j = 0; j < d; j++) {
            want[0][j] += fabs(y[i * d + j]) / l1;
            want[1][j] += fabs(y[i * d + j]);
        }
    }
    for (s = 0; s < 2; s++) {
        const double *a = stat_of(&g[s], &m, "l0.attn.wo");
        double worst = 0;
        for (j = 0; j < d; j++) worst = fmax(worst, fabs(a[j] - want[s][j]) / (1e-6 + fabs(want[s][j])));
        CHECK(worst < 1e-4, "%s statistic of l0.attn.wo: worst relative error %g", s ? "raw" : "L1", worst);
    }
    { /* L1 form: each token adds 1 in total over a layer's units */
        const double *a = stat_of(&g[0], &m, "l1.ffn.w_down");
        double total = 0;
        CHECK(a != NULL, "dense down watched");
        if (a) {
            for (j = 0; j < d; j++) total += a[j];
            CHECK(fabs(total - N) < 1e-9 * N + 1e-6, "L1 statistic sums to the token count: %g", total);
        }
    }
    for (s = 0; s < 2; s++) moe_migu_free(&g[s]);
    free(y);
    moe_model_free(&m);
}

/* two micro-batches accumulate what one forward of both gives; the mask keeps the largest
   units, n - ceil(T (n - 1)) of each linear, and resets the statistics */
static void test_selection_and_reset(void) {
    moe_model m, m2;
    moe_model_config c = tiny_config(1);
    moe_migu g, g2;
    moe_migu_config mc = moe_migu_config_default();
    moe_mask k, k2;
    int in[32], tg[32], id, l;
    double worst = 0;
    TEST_BEGIN("migu: micro-batches, top (1 - T) per linear and per expert, reset");
    mc.stat = MOE_MIGU_SUM;
    CHECK(moe_model_init(&m, &c, 4, 8) == MOE_OK && moe_model_init(&m2, &c, 2, 8) == MOE_OK, "init");
    moe_model_init_weights(&m, 1);
    moe_model_init_weights(&m2, 1);
    tokens(in, 32, 4); tokens(tg, 32, 5);
    moe_migu_init(&g, &m, &mc);
    moe_migu_init(&g2, &m2, &mc);
    moe_model_forward(&m, in, tg, 4, 8, NULL);
    moe_migu_accumulate(&g, &m);
    moe_model_forward(&m2, in, tg, 2, 8, NULL);
    moe_migu_accumulate(&g2, &m2);
    moe_model_forward(&m2, in + 16, tg + 16, 2, 8, NULL);
    moe_migu_accumulate(&g2, &m2);
    CHECK(g2.micro_batches == 2, "two micro-batches");
    /* attention and routed experts: per-token statistics, so the split does not matter */
    for (id = 0; id < (int)g.units; id++) worst = fmax(worst, fabs(g.stat[id] - g2.stat[id]) / (1e-6 + fabs(g.stat[id])));
    CHECK(worst < 1e-4, "micro-batches sum to the whole batch: worst relative difference %g", worst);
    moe_mask_init(&k, &m.S, MOE_MASK_UPDATE);
    CHECK(moe_migu_mask(&g, &m, &k) == MOE_OK, "mask: %s", g.err.msg);
    for (l = 0; l < 2; l++) {
        char name[64];
        int e, j, D = 12, d = 16;
        const moe_tensor *t;
        snprintf(name, sizeof name, "l%d.moe.experts.w_up", l);
        id = moe_store_find(&m.S, name);
        CHECK(id >= 0, "%s", name);
        if (id < 0) continue;
        t = &m.S.tensors[id];
        for (e = 0; e < 4; e++) {
            const double *a = g2.stat + g2.off[id] + (size_t)e * D; /* g's were reset; g2 holds the same */
            int kept = 0, bad = 0, i;
            for (j = 0; j < D; j++) {
                int kj = k.keep[t->offset + ((size_t)e * D + j) * d];
                kept += kj;
                for (i = 0; i < D; i++) /* a kept unit is never smaller than a masked one */
                    if (kj && !k.keep[t->offset + ((size_t)e * D + i) * d] && a[j] < a[i]) bad = 1;
            }
            CHECK(kept == D - (int)ceil(0.7 * (D - 1)) && !bad, "%s expert %d: %d units kept (want %d), largest ones", name, e, kept,
                  D - (int)ceil(0.7 * (D - 1)));
        }
    }
    id = moe_store_find(&m.S, "l0.attn.wqkv");
    {
        int third, kept[3] = {0, 0, 0}, j;
        for (j = 0; j < 48; j++) kept[j / 16] += k.keep[m.S.tensors[id].offset + (size_t)j * 16];
        for (third = 0; third < 3; third++) CHECK(kept[third] == 16 - 11, "q/k/v third %d keeps %d of 16", third, kept[third]);
    }
    CHECK(moe_mask_count(&k, &m.S, moe_store_find(&m.S, "wte")) == m.S.tensors[moe_store_find(&m.S, "wte")].numel, "embeddings untouched");
    for (id = 0, worst = 0; id < (int)g.units; id++) worst = fmax(worst, g.stat[id]);
    CHECK(worst == 0 && g.micro_batches == 0, "statistics reset after the mask");
    CHECK(moe_migu_mask(&g, &m, &k) == MOE_ERR_STATE, "no statistics, no mask: %s", g.err.msg);
    /* random control: the same ratio, other units */
    mc.random = 1;
    moe_migu_free(&g2);
    moe_migu_init(&g2, &m, &mc);
    moe_mask_init(&k2, &m.S, MOE_MASK_UPDATE);
    CHECK(moe_migu_mask(&g2, &m, &k2) == MOE_OK, "random mask without statistics");
    {
        const moe_tensor *t = &m.S.tensors[moe_store_find(&m.S, "l1.attn.wo")];
        int kept = 0, j;
        for (j = 0; j < 16; j++) kept += k2.keep[t->offset + (size_t)j * 16];
        CHECK(kept == 16 - (int)floor(0.7 * 16), "random control keeps n - floor(T n) = %d of 16", kept);
    }
    CHECK(memcmp(k.keep, k2.keep, k.numel) != 0, "random units differ from MIGU's");
    moe_mask_free(&k); moe_mask_free(&k2);
    moe_migu_free(&g); moe_migu_free(&g2);
    moe_model_free(&m); moe_model_free(&m2);
}

/* one training step under the MIGU mask (update mode): kept rows move, masked rows do not */
static void test_masked_step(void) {
    moe_model m;
    moe_model_config c = tiny_config(0);
    moe_migu g;
    moe_migu_config mc = moe_migu_config_default();
    moe_mask k;
    moe_adamw_config ac = moe_adamw_config_default();
    int in[16], tg[16], j, moved = 0, stayed = 0, wrong = 0, id;
    float *p0;
    TEST_BEGIN("migu: a masked step moves exactly the kept rows");
    CHECK(moe_model_init(&m, &c, 2, 8) == MOE_OK, "init");
    moe_model_init_weights(&m, 1);
    tokens(in, 16, 2); tokens(tg, 16, 3);
    moe_migu_init(&g, &m, &mc);
    moe_mask_init(&k, &m.S, MOE_MASK_UPDATE);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    moe_store_zero_grad(&m.S);
    moe_model_forward(&m, in, tg, 2, 8, NULL);
    moe_migu_accumulate(&g, &m);
    moe_model_backward(&m, 1.0f);
    CHECK(moe_migu_mask(&g, &m, &k) == MOE_OK, "mask");
    CHECK(moe_mask_step(&k, &m.S, &ac, 1e-2f, 1, 1.0f, NULL) == MOE_OK, "step");
    id = moe_store_find(&m.S, "l1.attn.wo");
    for (j = 0; j < 16 * 16; j++) {
        size_t o = m.S.tensors[id].offset + (size_t)j;
        int changed = m.S.params[o] != p0[o];
        if (k.keep[o]) moved += changed;
        else { stayed += !changed; wrong += changed; }
    }
    CHECK(moved > 0 && stayed == 11 * 16 && wrong == 0, "kept rows moved (%d), 11 masked rows stayed (%d)", moved, stayed);
    free(p0);
    moe_mask_free(&k);
    moe_migu_free(&g);
    moe_model_free(&m);
}

static void test_bad_input(void) {
    moe_model m, other;
    moe_model_config c = tiny_config(0), c2 = tiny_config(0);
    moe_migu g;
    moe_migu_config mc = moe_migu_config_default();
    moe_mask k;
    TEST_BEGIN("migu: bad input gets a status and a sentence");
    c2.d_ff = 20;
    CHECK(moe_model_init(&m, &c, 1, 4) == MOE_OK && moe_model_init(&other, &c2, 1, 4) == MOE_OK, "init");
    mc.threshold = 1.0f;
    CHECK(moe_migu_init(&g, &m, &mc) == MOE_ERR_INVALID_ARG && strstr(g.err.msg, "[0, 1)") && !g.stat, "T = 1: %s", g.err.msg);
    mc.threshold = -0.1f;
    CHECK(moe_migu_init(&g, &m, &mc) == MOE_ERR_INVALID_ARG, "T = -0.1: %s", g.err.msg);
    mc.threshold = (float)sqrt(-1.0);
    CHECK(moe_migu_init(&g, &m, &mc) == MOE_ERR_INVALID_ARG, "T = NaN: %s", g.err.msg);
    mc = moe_migu_config_default();
    mc.parts = 0;
    CHECK(moe_migu_init(&g, &m, &mc) == MOE_ERR_INVALID_ARG, "empty selection: %s", g.err.msg);
    mc = moe_migu_config_default();
    CHECK(moe_migu_init(&g, &m, &mc) == MOE_OK, "init");
    CHECK(moe_migu_accumulate(&g, &m) == MOE_ERR_STATE, "before any forward: %s", g.err.msg);
    CHECK(moe_migu_accumulate(&g, &other) == MOE_ERR_SHAPE, "another model: %s", g.err.msg);
    moe_mask_init(&k, &other.S, MOE_MASK_GRAD);
    CHECK(moe_migu_mask(&g, &m, &k) == MOE_ERR_SHAPE && moe_mask_count(&k, &other.S, -1) == k.numel, "a mask of another layout: %s", g.err.msg);
    moe_mask_free(&k);
    moe_migu_free(&g);
    moe_model_free(&m); moe_model_free(&other);
}

int main(void) {
    test_statistics();
    test_selection_and_reset();
    test_masked_step();
    test_bad_input();
    return test_summary();
}
