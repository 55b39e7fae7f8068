/* test_core.c - moe.h sections 1-4: status strings, RNG, the tensor store and its fingerprint,
   AdamW, gradient clipping, the learning-rate schedule, checkpoints (round trip, corruption,
   atomic writes). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h" /* defines: moe_rng_*, moe_store_*, moe_adamw_step, moe_clip_grad_norm, moe_checkpoint_* */
#include "test.h"
#include "proc.h" /* defines: proc_mkdirs */
#ifdef _OPENMP
#include <omp.h>
#endif

static char tmpdir[256];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "build/tmp_core_%ld", (long)time(NULL) ^ (long)clock());
    proc_mkdirs(tmpdir); /* says why when it cannot */
}

static void test_status_and_rng(void) {
    moe_rng a, b;
    double m = 0.0, v = 0.0;
    int i, below_ok = 1, n = 200000, same = 1;
    moe_err e;
    TEST_BEGIN("status strings, error sentences, RNG");
    CHECK(strcmp(moe_status_string(MOE_ERR_SHAPE), "shape mismatch") == 0, "status string");
    CHECK(moe_err_set(&e, MOE_ERR_IO, "file %s", "x.bin") == MOE_ERR_IO && strcmp(e.msg, "file x.bin") == 0, "moe_err_set formats");
    CHECK(moe_err_set(NULL, MOE_ERR_IO, "ignored") == MOE_ERR_IO, "NULL err allowed");
    moe_rng_seed(&a, 42);
    moe_rng_seed(&b, 42);
    for (i = 0; i < 1000; i++) same &= moe_rng_u32(&a) == moe_rng_u32(&b);
    CHECK(same, "same seed, same stream");
    moe_rng_seed(&b, 43);
    CHECK(moe_rng_u32(&a) != moe_rng_u32(&b), "different seeds differ");
    for (i = 0; i < n; i++) {
        double x = moe_rng_normal(&a);
        m += x;
        v += x * x;
    }
    m /= n;
    v = v / n - m * m;
    CHECK(fabs(m) < 0.01 && fabs(v - 1.0) < 0.02, "normal: mean %.4f var %.4f", m, v);
    m = 0.0;
    for (i = 0; i < n; i++) {
        float u = moe_rng_uniform(&a);
        if (u < 0.0f || u >= 1.0f) below_ok = 0;
        m += u;
    }
    CHECK(below_ok && fabs(m / n - 0.5) < 0.005, "uniform in [0,1): mean %.4f", m / n);
    for (i = 0; i < 10000; i++) {
        int k = moe_rng_below(&a, 7);
        if (k < 0 || k >= 7) below_ok = 0;
    }
    CHECK(below_ok && moe_rng_below(&a, 1) == 0, "moe_rng_below in range");
}

static void test_store(void) {
    moe_store s, t;
    uint64_t f1, f2;
    TEST_BEGIN("tensor store: offsets, lookup, fingerprint, frozen after alloc");
    moe_store_init(&s);
    CHECK(moe_store_add(&s, "w", MOE_TENSOR_DECAY, 3, 4, 0, 0) == 0, "add w");
    CHECK(moe_store_add(&s, "b", 0, 4, 0, 0, 0) == 1, "add b");
    CHECK(moe_store_add(&s, "e", MOE_TENSOR_DECAY, 2, 3, 4, 5) == 2, "add 4-d");
    CHECK(s.numel == 12 + 4 + 120 && s.tensors[1].offset == 12 && s.tensors[2].offset == 16, "offsets");
    CHECK(moe_store_find(&s, "b") == 1 && moe_store_find(&s, "nope") == -1, "find");
    CHECK(moe_store_alloc(&s, 1) == MOE_OK && s.adam_m && s.adam_v, "alloc with optimizer");
    CHECK(moe_store_param(&s, 1) == s.params + 12 && moe_store_grad(&s, 2) == s.grads + 16 && moe_store_param(&s, -1) == NULL, "pointers");
    CHECK(moe_store_add(&s, "late", 0, 1, 0, 0, 0) < 0 && s.err.status == MOE_ERR_STATE, "no tensors after alloc: %s", s.err.msg);
    f1 = moe_store_fingerprint(&s);
    moe_store_init(&t);
    moe_store_add(&t, "w", MOE_TENSOR_DECAY, 3, 4, 0, 0);
    moe_store_add(&t, "b", 0, 4, 0, 0, 0);
    moe_store_add(&t, "e", MOE_TENSOR_DECAY, 2, 3, 5, 4); /* same size, other shape */
    f2 = moe_store_fingerprint(&t);
    CHECK(f1 != f2, "fingerprint sees a shape change of equal size");
    moe_store_free(&t);
    moe_store_init(&t);
    moe_store_add(&t, "w", MOE_TENSOR_DECAY, 3, 4, 0, 0);
    moe_store_add(&t, "b", 0, 4, 0, 0, 0);
    moe_store_add(&t, "e", MOE_TENSOR_DECAY, 2, 3, 4, 5);
    CHECK(moe_store_fingerprint(&t) == f1, "same layout, same fingerprint");
    moe_store_free(&t);
    moe_store_free(&s);
}

/* AdamW against the update written out in double, step by step, for two tensors (one
   decayed, one not) over 5 steps with changing gradients. Sizes: more than one span of the
   parallel loop, whole vectors and a remainder (the SIMD and the portable code both run). */
static void test_adamw(void) {
    enum { NW = 4096 + 37, NB = 21, N = NW + NB };
    moe_store s;
    moe_adamw_config c = moe_adamw_config_default();
    static double p[N], m[N], v[N];
    float lr = 0.05f;
    int i, step, ok = 1;
    moe_rng r;
    TEST_BEGIN("AdamW: decoupled decay only on MOE_TENSOR_DECAY tensors, bias correction");
    moe_store_init(&s);
    moe_store_add(&s, "w", MOE_TENSOR_DECAY, NW, 0, 0, 0);
    moe_store_add(&s, "b", 0, NB, 0, 0, 0);
    moe_store_alloc(&s, 1);
    c.weight_decay = 0.1f;
    moe_rng_seed(&r, 5);
    for (i = 0; i < N; i++) {
        p[i] = s.params[i] = moe_rng_normal(&r);
        m[i] = v[i] = 0.0;
    }
    for (step = 1; step <= 5; step++) {
        double bc1 = 1.0 - pow(0.9, step), bc2 = 1.0 - pow(0.999, step);
        for (i = 0; i < N; i++) s.grads[i] = moe_rng_normal(&r);
        CHECK(moe_adamw_step(&s, &c, lr, step) == MOE_OK, "step");
        for (i = 0; i < N; i++) {
            double g = s.grads[i];
            if (i < NW) p[i] *= 1.0 - (double)lr * c.weight_decay;
            m[i] = 0.9 * m[i] + 0.1 * g;
            v[i] = 0.999 * v[i] + 0.001 * g * g;
            p[i] -= lr * (m[i] / bc1) / (sqrt(v[i] / bc2) + 1e-8);
            if (fabs(p[i] - s.params[i]) > 1e-5 * (1.0 + fabs(p[i]))) ok = 0;
        }
    }
    CHECK(ok, "AdamW matches the double-precision update on all %d elements", N);
    CHECK(moe_adamw_step(&s, &c, lr, 0) == MOE_ERR_INVALID_ARG, "step 0 rejected: %s", s.err.msg);
    moe_store_free(&s);
    moe_store_init(&s);
    moe_store_add(&s, "w", 0, 3, 0, 0, 0);
    moe_store_alloc(&s, 0);
    CHECK(moe_adamw_step(&s, &c, lr, 1) == MOE_ERR_STATE, "no moments: %s", s.err.msg);
    moe_store_free(&s);
#ifdef _OPENMP
    { /* enough elements for the parallel loop: 1 and 2 threads give the same bits */
        moe_store t[2];
        int k, same;
        for (k = 0; k < 2; k++) {
            moe_store_init(&t[k]);
            moe_store_add(&t[k], "w", MOE_TENSOR_DECAY, 40000, 0, 0, 0);
            moe_store_add(&t[k], "b", 0, 4097, 0, 0, 0);
            moe_store_add(&t[k], "c", MOE_TENSOR_DECAY, 33, 0, 0, 0);
            moe_store_alloc(&t[k], 1);
            moe_rng_seed(&r, 9);
            for (i = 0; i < (int)t[k].numel; i++) {
                t[k].params[i] = moe_rng_normal(&r);
                t[k].grads[i] = moe_rng_normal(&r);
            }
            omp_set_num_threads(k + 1);
            for (step = 1; step <= 3; step++) moe_adamw_step(&t[k], &c, lr, step);
        }
        same = memcmp(t[0].params, t[1].params, t[0].numel * sizeof(float)) == 0 &&
               memcmp(t[0].adam_v, t[1].adam_v, t[0].numel * sizeof(float)) == 0;
        CHECK(same, "AdamW identical for 1 and 2 threads (%zu elements)", t[0].numel);
        for (k = 0; k < 2; k++) moe_store_free(&t[k]);
    }
#endif
}

static void test_clip_and_schedule(void) {
    moe_store s;
    float norm;
    size_t i, n = 100003;
    double ref = 0.0, after = 0.0;
    TEST_BEGIN("gradient-norm clipping, warm-up + cosine schedule");
    moe_store_init(&s);
    moe_store_add(&s, "g", 0, (int)n, 0, 0, 0);
    moe_store_alloc(&s, 0);
    for (i = 0; i < n; i++) {
        s.grads[i] = (float)((i % 7) - 3) * 0.01f;
        ref += (double)s.grads[i] * s.grads[i];
    }
    ref = sqrt(ref);
#ifdef _OPENMP
    {
        float n1, n2;
        omp_set_num_threads(1);
        n1 = moe_clip_grad_norm(&s, 0.0f);
        omp_set_num_threads(2);
        n2 = moe_clip_grad_norm(&s, 0.0f);
        CHECK(n1 == n2, "norm identical for 1 and 2 threads");
    }
#endif
    norm = moe_clip_grad_norm(&s, 1.0f);
    CHECK(fabs(norm - ref) < 1e-4 * ref, "norm %g vs %g", (double)norm, ref);
    for (i = 0; i < n; i++) after += (double)s.grads[i] * s.grads[i];
    CHECK(fabs(sqrt(after) - 1.0) < 1e-4, "clipped to 1: %g", sqrt(after));
    norm = moe_clip_grad_norm(&s, 10.0f);
    CHECK(fabs(norm - 1.0) < 1e-4, "below the limit: unchanged (%g)", (double)norm);
    moe_store_free(&s);
    CHECK(fabsf(moe_lr_cosine(0, 10, 100, 1.0f, 0.1f) - 0.1f) < 1e-7f, "first warm-up step lr/warmup");
    CHECK(fabsf(moe_lr_cosine(9, 10, 100, 1.0f, 0.1f) - 1.0f) < 1e-7f, "end of warm-up at lr_max");
    CHECK(fabsf(moe_lr_cosine(55, 10, 100, 1.0f, 0.1f) - 0.55f) < 1e-6f, "half-way: midpoint");
    CHECK(moe_lr_cosine(100, 10, 100, 1.0f, 0.1f) == 0.1f && moe_lr_cosine(500, 10, 100, 1.0f, 0.1f) == 0.1f, "after the end: lr_min");
    CHECK(moe_lr_cosine(30, 10, 100, 1.0f, 0.1f) > moe_lr_cosine(31, 10, 100, 1.0f, 0.1f), "decreasing");
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fclose(f);
    return n;
}

static int copy_prefix(const char *src, const char *dst, long n, long flip_at) {
    FILE *a = fopen(src, "rb"), *b = fopen(dst, "wb");
    long i;
    int ch;
    if (!a || !b) return 0;
    for (i = 0; i < n && (ch = fgetc(a)) != EOF; i++) fputc(i == flip_at ? ch ^ 0x10 : ch, b);
    fclose(a);
    fclose(b);
    return 1;
}

static void test_checkpoint(void) {
    moe_store s, t;
    moe_err err;
    char path[512], bad[512], dirpath[512];
    long long step = 0;
    int cfg = 7, cfg_out = 0, other_cfg = 8;
    unsigned char state[5] = {1, 2, 3, 4, 5}, state_out[5];
    size_t i;
    long size;
    float *backup;
    moe_ckpt_info info;
    TEST_BEGIN("checkpoints: round trip, truncated/flipped/wrong version/wrong layout rejected, atomic");
    CHECK(moe_crc32(0, "123456789", 9) == 0xCBF43926u, "CRC-32 check value of the zlib polynomial");
    {   /* the sliced CRC against the bit-at-a-time definition, whole and split at every offset */
        unsigned char buf[300];
        size_t n, cut;
        int ok = 1;
        for (i = 0; i < sizeof buf; i++) buf[i] = (unsigned char)(i * 151u + 7u + (i >> 3));
        for (n = 0; n <= sizeof buf; n += (n < 40 ? 1 : 37)) {
            uint32_t want = 0xFFFFFFFFu;
            size_t j;
            int k;
            for (j = 0; j < n; j++) {
                want ^= buf[j];
                for (k = 0; k < 8; k++) want = (want >> 1) ^ (0xEDB88320u & (0u - (want & 1u)));
            }
            want = ~want;
            for (cut = 0; cut <= n; cut += (n < 40 ? 1 : 11))
                if (moe_crc32(moe_crc32(0, buf, cut), buf + cut, n - cut) != want) ok = 0;
        }
        CHECK(ok, "CRC-32 of 0..300 bytes, whole and in two pieces, equals the bit-at-a-time definition");
    }
    moe_store_init(&s);
    moe_store_add(&s, "a", 0, 10, 3, 0, 0);
    moe_store_add(&s, "b", 0, 7, 0, 0, 0);
    moe_store_alloc(&s, 1);
    for (i = 0; i < s.numel; i++) {
        s.params[i] = (float)i * 0.5f - 3.0f;
        s.adam_m[i] = (float)i;
        s.adam_v[i] = 1.0f / (float)(i + 1);
    }
    moe_store_init(&t);
    moe_store_add(&t, "a", 0, 10, 3, 0, 0);
    moe_store_add(&t, "b", 0, 7, 0, 0, 0);
    moe_store_alloc(&t, 1);
    snprintf(path, sizeof path, "%s/model.ckpt", tmpdir);
    snprintf(bad, sizeof bad, "%s/bad.ckpt", tmpdir);
    CHECK(moe_checkpoint_save(path, &s, 1, 123, &cfg, sizeof cfg, state, sizeof state, &err) == MOE_OK, "save: %s", err.msg);
    CHECK(moe_checkpoint_info(path, &info, &err) == MOE_OK && info.step == 123 && info.has_moments && info.numel == s.numel, "info");
    CHECK(moe_checkpoint_load(path, &t, &step, &cfg, &cfg_out, sizeof cfg, state_out, sizeof state_out, &err) == MOE_OK, "load: %s", err.msg);
    CHECK(step == 123 && cfg_out == 7 && memcmp(state, state_out, 5) == 0, "step, config, state restored");
    CHECK(memcmp(s.params, t.params, s.numel * 4) == 0 && memcmp(s.adam_m, t.adam_m, s.numel * 4) == 0 &&
          memcmp(s.adam_v, t.adam_v, s.numel * 4) == 0, "params and moments bit-identical");
    size = file_size(path);
    backup = (float *)malloc(t.numel * sizeof(float));
    memset(t.params, 0, t.numel * sizeof(float)); /* a failed load must leave these zeros */
    memcpy(backup, t.params, t.numel * sizeof(float));
    /* truncated */
    copy_prefix(path, bad, size - 9, -1);
    CHECK(moe_checkpoint_load(bad, &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "truncated"), "truncated: %s", err.msg);
    CHECK(memcmp(backup, t.params, t.numel * 4) == 0, "store untouched after a failed load");
    /* one flipped bit in the payload */
    copy_prefix(path, bad, size, size / 2);
    CHECK(moe_checkpoint_load(bad, &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "CRC"), "bit flip: %s", err.msg);
    /* wrong version (byte 8) */
    copy_prefix(path, bad, size, 8);
    CHECK(moe_checkpoint_load(bad, &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "version"), "version: %s", err.msg);
    /* wrong magic */
    copy_prefix(path, bad, size, 0);
    CHECK(moe_checkpoint_load(bad, &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "magic"), "magic: %s", err.msg);
    /* wrong config */
    CHECK(moe_checkpoint_load(path, &t, NULL, &other_cfg, NULL, sizeof other_cfg, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "config"), "config: %s", err.msg);
    CHECK(memcmp(backup, t.params, t.numel * 4) == 0, "store untouched after a config mismatch");
    /* wrong layout */
    {
        moe_store u;
        moe_store_init(&u);
        moe_store_add(&u, "a", 0, 3, 10, 0, 0);
        moe_store_add(&u, "b", 0, 7, 0, 0, 0);
        moe_store_alloc(&u, 0);
        CHECK(moe_checkpoint_load(path, &u, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_FORMAT && strstr(err.msg, "layout"), "layout: %s", err.msg);
        moe_store_free(&u);
    }
    CHECK(moe_checkpoint_load("no/such/file.ckpt", &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_IO, "missing file: %s", err.msg);
    /* a failed save leaves the existing file as it was: the directory of the temp file is a file */
    snprintf(dirpath, sizeof dirpath, "%s/model.ckpt/inner.ckpt", tmpdir);
    CHECK(moe_checkpoint_save(dirpath, &s, 0, 1, NULL, 0, NULL, 0, &err) == MOE_ERR_IO, "unwritable path: %s", err.msg);
    CHECK(file_size(path) == size && moe_checkpoint_load(path, &t, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_OK, "existing checkpoint intact");
    /* without moments: the loading store's moments are reset */
    CHECK(moe_checkpoint_save(path, &s, 0, 5, NULL, 0, NULL, 0, &err) == MOE_OK, "save without moments");
    CHECK(moe_checkpoint_load(path, &t, &step, NULL, NULL, 0, NULL, 0, &err) == MOE_OK && step == 5 && t.adam_m[3] == 0.0f, "moments reset");
    free(backup);
    moe_store_free(&s);
    moe_store_free(&t);
}

int main(void) {
    make_tmpdir();
    test_status_and_rng();
    test_store();
    test_adamw();
    test_clip_and_schedule();
    test_checkpoint();
    return test_summary();
}
