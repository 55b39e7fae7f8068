/* test_mask.c - update masks over the tensor table (moe.h >>moe:mask): freezing tensors and
   slices, the two modes under AdamW with weight decay, clipping, checkpoints, bad input. */
#include "moe.h"  /* defines: moe_mask_*, moe_store_*, moe_adamw_*, moe_checkpoint_* */
#include "test.h" /* defines: CHECK, test_summary */
#ifdef _OPENMP
#include <omp.h>
#endif

/* "w" (4, 3) with decay, "e" (2, 3, 2) with decay (an expert bank), "n" (5) without */
static int make_store(moe_store *s, int big) {
    moe_store_init(s);
    if (moe_store_add(s, "w", MOE_TENSOR_DECAY, 4, 3, 0, 0) < 0) return 0;
    if (moe_store_add(s, "e", MOE_TENSOR_DECAY, 2, 3, 2, 0) < 0) return 0;
    if (moe_store_add(s, "n", 0, 5, 0, 0, 0) < 0) return 0;
    if (big && moe_store_add(s, "big", MOE_TENSOR_DECAY, 300, 200, 0, 0) < 0) return 0;
    return moe_store_alloc(s, 1) == MOE_OK;
}

static void fill(moe_store *s, float *p, uint64_t seed) {
    moe_rng r;
    size_t i;
    moe_rng_seed(&r, seed);
    for (i = 0; i < s->numel; i++) p[i] = moe_rng_normal(&r);
}

static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void test_all_kept_equals_plain_step(void) {
    moe_store a, b;
    moe_mask k;
    moe_adamw_config c = moe_adamw_config_default();
    int mode;
    TEST_BEGIN("mask: everything kept = clip + AdamW, bit for bit, both modes");
    for (mode = 0; mode < 2; mode++) {
        long long step;
        CHECK(make_store(&a, 1) && make_store(&b, 1), "stores");
        fill(&a, a.params, 1); fill(&b, b.params, 1);
        CHECK(moe_mask_init(&k, &a, (moe_mask_mode)mode) == MOE_OK, "init: %s", k.err.msg);
        for (step = 1; step <= 3; step++) {
            float na = 0, nb;
            fill(&a, a.grads, 10 + (uint64_t)step); fill(&b, b.grads, 10 + (uint64_t)step);
            CHECK(moe_mask_step(&k, &a, &c, 1e-2f, step, 50.0f, &na) == MOE_OK, "step: %s", k.err.msg);
            nb = moe_clip_grad_norm(&b, 50.0f);
            moe_adamw_step(&b, &c, 1e-2f, step);
            CHECK(na == nb, "norms %g %g", na, nb);
        }
        CHECK(same(a.params, b.params, a.numel) && same(a.adam_m, b.adam_m, a.numel) && same(a.adam_v, b.adam_v, a.numel),
              "mode %d: parameters and moments equal the plain step", mode);
        moe_mask_free(&k); moe_store_free(&a); moe_store_free(&b);
    }
}

/* A row masked on step 2 after an unmasked step 1: MOE_MASK_GRAD still moves it (the first
   moment from step 1 and the decay), MOE_MASK_UPDATE does not; a row masked from step 1 on
   moves under MOE_MASK_GRAD by the decay alone: p (1 - lr wd) per step. */
static void test_modes_differ(void) {
    moe_store s[2];
    moe_mask k[2];
    moe_adamw_config c = moe_adamw_config_default();
    float lr = 0.1f, before[2][3], p0[3];
    int mode, j;
    TEST_BEGIN("mask: gradient mask vs update mask under AdamW with weight decay");
    c.weight_decay = 0.1f;
    for (mode = 0; mode < 2; mode++) {
        CHECK(make_store(&s[mode], 0), "store");
        fill(&s[mode], s[mode].params, 2);
        CHECK(moe_mask_init(&k[mode], &s[mode], (moe_mask_mode)mode) == MOE_OK, "init");
        /* row 0 of "w" masked from the start; row 1 masked from step 2 */
        CHECK(moe_mask_set_slice(&k[mode], &s[mode], "w", 0, 0, 0) == MOE_OK, "slice: %s", k[mode].err.msg);
        memcpy(p0, moe_store_param(&s[mode], 0), sizeof p0);
        fill(&s[mode], s[mode].grads, 3);
        CHECK(moe_mask_step(&k[mode], &s[mode], &c, lr, 1, 0.0f, NULL) == MOE_OK, "step 1");
        for (j = 0; j < 3; j++) {
            float want = mode == MOE_MASK_GRAD ? p0[j] * (1.0f - lr * c.weight_decay) : p0[j];
            CHECK(moe_store_param(&s[mode], 0)[j] == want, "mode %d: row masked from step 1 is %g, want %g", mode,
                  moe_store_param(&s[mode], 0)[j], want);
        }
        CHECK(moe_mask_set_slice(&k[mode], &s[mode], "w", 0, 1, 0) == MOE_OK, "slice");
        memcpy(before[mode], moe_store_param(&s[mode], 0) + 3, sizeof before[mode]);
        fill(&s[mode], s[mode].grads, 4);
        CHECK(moe_mask_step(&k[mode], &s[mode], &c, lr, 2, 0.0f, NULL) == MOE_OK, "step 2");
    }
    for (j = 0; j < 3; j++) {
        float g = moe_store_param(&s[0], 0)[3 + j], u = moe_store_param(&s[1], 0)[3 + j];
        CHECK(fabsf(g - before[0][j]) > 1e-3f, "gradient mask: row 1 still moves (%g -> %g)", before[0][j], g);
        CHECK(u == before[1][j], "update mask: row 1 stays (%g -> %g)", before[1][j], u);
    }
    CHECK(!same(s[0].params, s[1].params, s[0].numel), "the two modes end in different parameters");
    /* the unmasked rows agree exactly: the modes differ only on what they mask */
    CHECK(same(moe_store_param(&s[0], 0) + 6, moe_store_param(&s[1], 0) + 6, 6), "unmasked rows equal");
    for (mode = 0; mode < 2; mode++) { moe_mask_free(&k[mode]); moe_store_free(&s[mode]); }
}

static void test_freeze_slices_clip(void) {
    moe_store s, t;
    moe_mask k;
    moe_adamw_config c = moe_adamw_config_default();
    int e = 1, i, j;
    float norm = 0, frozen_m[5];
    double want = 0;
    TEST_BEGIN("mask: freeze a tensor, a column, an expert; clipping sees kept gradients only");
    CHECK(make_store(&s, 0) && make_store(&t, 0), "stores");
    fill(&s, s.params, 5);
    memcpy(t.params, s.params, s.numel * sizeof(float));
    CHECK(moe_mask_init(&k, &s, MOE_MASK_UPDATE) == MOE_OK, "init");
    CHECK(moe_mask_set_tensor(&k, &s, "n", 0) == MOE_OK, "freeze n");
    CHECK(moe_mask_set_slice(&k, &s, "w", 1, 2, 0) == MOE_OK, "column 2 of w");
    CHECK(moe_mask_set_slice(&k, &s, "e", 0, e, 0) == MOE_OK, "expert 1 of e");
    CHECK(moe_mask_count(&k, &s, -1) == 12 - 4 + 12 - 6, "kept count %zu", moe_mask_count(&k, &s, -1));
    CHECK(moe_mask_count(&k, &s, 2) == 0, "n fully frozen");
    fill(&s, s.grads, 6);
    for (i = 0; i < (int)s.numel; i++)
        if (k.keep[i]) want += (double)s.grads[i] * s.grads[i];
    memcpy(frozen_m, moe_store_param(&s, 2), sizeof frozen_m);
    CHECK(moe_mask_step(&k, &s, &c, 1e-2f, 1, 1e-3f, &norm) == MOE_OK, "step");
    CHECK(fabs(norm - sqrt(want)) < 1e-5 * sqrt(want), "clip norm %g = norm of kept gradients %g", norm, sqrt(want));
    CHECK(same(moe_store_param(&s, 2), frozen_m, 5), "frozen tensor unchanged");
    for (i = 0; i < 4; i++) {
        CHECK(moe_store_param(&s, 0)[i * 3 + 2] == moe_store_param(&t, 0)[i * 3 + 2], "masked column stays");
        CHECK(moe_store_param(&s, 0)[i * 3 + 0] != moe_store_param(&t, 0)[i * 3 + 0], "kept column moves");
    }
    for (j = 0; j < 6; j++) {
        CHECK(moe_store_param(&s, 1)[6 * e + j] == moe_store_param(&t, 1)[6 * e + j], "masked expert stays");
        CHECK(s.adam_v[s.tensors[1].offset + 6 * e + j] == 0.0f, "its second moment stays 0");
    }
    moe_mask_free(&k); moe_store_free(&s); moe_store_free(&t);
}

/* the mask travels in the checkpoint's state blob: stop after 2 steps, reload into a fresh
   store and mask, 2 more steps = 4 uninterrupted steps */
static void test_checkpoint(void) {
    moe_store a, b;
    moe_mask ka, kb;
    moe_adamw_config c = moe_adamw_config_default();
    moe_err err;
    char path[64];
    unsigned char *blob;
    size_t bytes;
    long long step, at = 0;
    unsigned char rows[4] = {1, 0, 1, 0};
    TEST_BEGIN("mask: a frozen part persists through a checkpoint");
    /* a name of its own: the suite runs the flavours of this test side by side */
    snprintf(path, sizeof path, "build/test_mask_%ld.ckpt", (long)time(NULL) ^ (long)clock());
    CHECK(make_store(&a, 0) && make_store(&b, 0), "stores");
    fill(&a, a.params, 7);
    CHECK(moe_mask_init(&ka, &a, MOE_MASK_UPDATE) == MOE_OK && moe_mask_init(&kb, &b, MOE_MASK_GRAD) == MOE_OK, "init");
    CHECK(moe_mask_set_rows(&ka, &a, 0, rows) == MOE_OK, "rows");
    moe_mask_set_tensor(&ka, &a, "n", 0);
    bytes = moe_mask_pack_bytes(&ka);
    blob = (unsigned char *)malloc(bytes);
    for (step = 1; step <= 2; step++) {
        fill(&a, a.grads, 20 + (uint64_t)step);
        moe_mask_step(&ka, &a, &c, 1e-2f, step, 1.0f, NULL);
    }
    CHECK(moe_mask_pack(&ka, blob, bytes) == MOE_OK, "pack");
    CHECK(moe_checkpoint_save(path, &a, 1, 2, NULL, 0, blob, bytes, &err) == MOE_OK, "save: %s", err.msg);
    memset(blob, 0, bytes);
    CHECK(moe_checkpoint_load(path, &b, &at, NULL, NULL, 0, blob, bytes, &err) == MOE_OK, "load: %s", err.msg);
    CHECK(moe_mask_unpack(&kb, blob, bytes) == MOE_OK, "unpack: %s", kb.err.msg);
    CHECK(kb.mode == MOE_MASK_UPDATE && memcmp(ka.keep, kb.keep, ka.numel) == 0, "mask and mode restored");
    for (step = 3; step <= 4; step++) {
        fill(&a, a.grads, 20 + (uint64_t)step); fill(&b, b.grads, 20 + (uint64_t)step);
        moe_mask_step(&ka, &a, &c, 1e-2f, step, 1.0f, NULL);
        moe_mask_step(&kb, &b, &c, 1e-2f, at + step - 2, 1.0f, NULL);
    }
    CHECK(same(a.params, b.params, a.numel) && same(a.adam_m, b.adam_m, a.numel), "resumed run = uninterrupted run");
    remove(path);
    free(blob);
    moe_mask_free(&ka); moe_mask_free(&kb); moe_store_free(&a); moe_store_free(&b);
}

static void test_threads(void) {
#ifdef _OPENMP
    moe_store s[2];
    moe_mask k[2];
    moe_adamw_config c = moe_adamw_config_default();
    int v, nt = omp_get_max_threads(), r;
    TEST_BEGIN("mask: update-mode step identical for 1 and 2 threads");
    for (v = 0; v < 2; v++) {
        omp_set_num_threads(v + 1);
        CHECK(make_store(&s[v], 1), "store");
        fill(&s[v], s[v].params, 8);
        fill(&s[v], s[v].grads, 9);
        moe_mask_init(&k[v], &s[v], MOE_MASK_UPDATE);
        for (r = 0; r < 300; r += 3) moe_mask_set_slice(&k[v], &s[v], "big", 0, r, 0);
        moe_mask_set_slice(&k[v], &s[v], "big", 1, 7, 0);
        moe_mask_step(&k[v], &s[v], &c, 1e-2f, 1, 1.0f, NULL);
    }
    omp_set_num_threads(nt);
    CHECK(same(s[0].params, s[1].params, s[0].numel), "parameters equal");
    for (v = 0; v < 2; v++) { moe_mask_free(&k[v]); moe_store_free(&s[v]); }
#endif
}

static void test_bad_input(void) {
    moe_store s, other;
    moe_mask k;
    unsigned char *blob, *copy;
    size_t bytes;
    moe_adamw_config c = moe_adamw_config_default();
    TEST_BEGIN("mask: bad input gets a status and a sentence; nothing half-applied");
    CHECK(make_store(&s, 0) && make_store(&other, 1), "stores");
    CHECK(moe_mask_init(&k, &s, (moe_mask_mode)7) == MOE_ERR_INVALID_ARG && k.err.msg[0], "unknown mode: %s", k.err.msg);
    CHECK(moe_mask_init(&k, &s, MOE_MASK_GRAD) == MOE_OK, "init");
    moe_mask_set_slice(&k, &s, "w", 0, 1, 0);
    copy = (unsigned char *)malloc(k.numel);
    memcpy(copy, k.keep, k.numel);
    CHECK(moe_mask_set_tensor(&k, &s, "nope", 0) == MOE_ERR_INVALID_ARG && strstr(k.err.msg, "nope"), "unknown tensor: %s", k.err.msg);
    CHECK(moe_mask_set_slice(&k, &s, "w", 2, 0, 0) == MOE_ERR_INVALID_ARG, "axis 2 of a matrix: %s", k.err.msg);
    CHECK(moe_mask_set_slice(&k, &s, "w", 0, 4, 0) == MOE_ERR_INVALID_ARG, "row 4 of 4: %s", k.err.msg);
    CHECK(moe_mask_set_slice(&k, &s, "w", 0, -1, 0) == MOE_ERR_INVALID_ARG, "row -1: %s", k.err.msg);
    CHECK(moe_mask_set_rows(&k, &s, 99, copy) == MOE_ERR_INVALID_ARG, "tensor id 99: %s", k.err.msg);
    CHECK(moe_mask_set_tensor(&k, &other, "w", 0) == MOE_ERR_SHAPE, "another layout: %s", k.err.msg);
    CHECK(moe_mask_step(&k, &other, &c, 1e-3f, 1, 0, NULL) == MOE_ERR_SHAPE, "step on another layout: %s", k.err.msg);
    CHECK(moe_mask_step(&k, &s, &c, 1e-3f, 0, 0, NULL) == MOE_ERR_INVALID_ARG, "step 0: %s", k.err.msg);
    CHECK(memcmp(copy, k.keep, k.numel) == 0, "mask unchanged by the failed calls");
    bytes = moe_mask_pack_bytes(&k);
    blob = (unsigned char *)malloc(bytes);
    moe_mask_pack(&k, blob, bytes);
    blob[20] ^= 1; /* the fingerprint */
    moe_mask_fill(&k, 1);
    CHECK(moe_mask_unpack(&k, blob, bytes) == MOE_ERR_SHAPE && moe_mask_count(&k, &s, -1) == k.numel, "foreign packed mask refused: %s", k.err.msg);
    blob[20] ^= 1;
    CHECK(moe_mask_unpack(&k, blob, bytes - 1) == MOE_ERR_FORMAT, "short packed mask: %s", k.err.msg);
    blob[0] ^= 1;
    CHECK(moe_mask_unpack(&k, blob, bytes) == MOE_ERR_FORMAT, "bad magic: %s", k.err.msg);
    CHECK(moe_mask_count(&k, &s, -1) == k.numel, "still all kept after the refusals");
    free(blob); free(copy);
    moe_mask_free(&k); moe_store_free(&s); moe_store_free(&other);
}

int main(void) {
    test_all_kept_equals_plain_step();
    test_modes_differ();
    test_freeze_slices_clip();
    test_checkpoint();
    test_threads();
    test_bad_input();
    return test_summary();
}
