/* test_interchange.c - moe.h sections >>moe:safetensors and >>moe:gguf.

   float32 <-> F16 / BF16 rounding (every 16-bit value, and random floats against the
   nearest-even rule by search); any store as safetensors and back (F32 bit-exact, F16 / BF16
   equal to the conversion); crafted bad files (truncated, lying offsets, overlapping or
   unsorted ranges, a hole, a huge header length, a header larger than the file, unknown
   dtypes, duplicate names, missing or extra tensors, bad JSON): a status with a sentence, the
   store unchanged, and no allocation larger than the file; the model under Hugging Face
   names (dense Llama, Mixtral, and the moe_h extension with shared experts, dense layers and
   unrenormalised top-k) exported and imported bit-exact; configurations that do not map
   refused with a sentence; GGUF export (structure, llama.cpp's q/k permutation).

   Against other implementations (files committed under tests/ref/interchange/, rebuilt by
   `make goldens`, which runs this program with --write-refs and then the Python scripts):
     - tests/ref/safetensors_ref.py (numpy, written from the format's specification) read our
       files and wrote its own; we read its files, compare its numbers (safetensors_check.txt)
       and its F16 / BF16 rounding, bit for bit, with ours;
     - tests/ref/hf_ref.py (plain PyTorch Llama / Mixtral) loaded our exports by their HF
       names and wrote its logits (hf_logits.bin): ours must agree within 1e-4 (abs + rel);
       it also wrote a model of its own (torch_mixtral/), which we import and run;
     - it also read our GGUF as llama.cpp does (permuted q/k, adjacent-pair RoPE) and wrote
       those logits: ours must agree within 1e-4.

   Modes:
       test_interchange                    the tests
       test_interchange --write-refs DIR   the files above that this program writes (DIR)
       test_interchange --interop DIR      GGUF models, prompts, our logits and greedy
                                           continuations, our generation speed, for
                                           tests/interop/check.mjs (make interop) */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>

/* every allocation of the library passes here: a crafted file must not make it reserve much */
static size_t ic_alloc_largest = 0;
static void *ic_malloc(size_t n) {
    if (n > ic_alloc_largest) ic_alloc_largest = n;
    return malloc(n);
}
#define MOE_MALLOC(n) ic_malloc(n)
#define MOE_FREE(p) free(p)
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h"
#include "golden.h"
#include "proc.h" /* defines: proc_mkdirs, proc_rmtree */
#include <time.h>

#define REF_DIR "tests/ref/interchange"
#define IC_T 24 /* tokens of the fixed input */
static const char *ic_text = "The quick brown fox, MoE";

static char tmpdir[256];

static void make_dir(const char *dir) { proc_mkdirs(dir); /* says why when it cannot */ }

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "build/tmp_interchange_%ld", (long)time(NULL) ^ (long)clock());
    make_dir(tmpdir);
}

static const char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static int file_bytes(const char *path, unsigned char **out, size_t *n) {
    FILE *f = fopen(path, "rb");
    long size;
    *out = NULL;
    *n = 0;
    if (!f) return 0;
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    *out = (unsigned char *)malloc((size_t)size + 1);
    if (!*out || fread(*out, 1, (size_t)size, f) != (size_t)size) { fclose(f); free(*out); *out = NULL; return 0; }
    fclose(f);
    *n = (size_t)size;
    return 1;
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    int ok;
    if (!f) return 0;
    ok = fwrite(p, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

/* the fixed input: the bytes of ic_text */
static void ic_tokens(int *tok) {
    int i;
    for (i = 0; i < IC_T; i++) tok[i] = (unsigned char)ic_text[i];
}

/* ---- the models -------------------------------------------------------------------------- */
enum { IC_DENSE = 0, IC_MIXTRAL = 1, IC_MOEH = 2, IC_CASES = 3 };
static const char *ic_case_name[IC_CASES] = {"dense", "mixtral", "moeh"};

static moe_model_config ic_config(int which) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 256;
    c.max_seq = 64;
    c.d = 32;
    c.n_layers = 2;
    c.n_heads = 4;
    c.d_ff = 48;
    c.pos = MOE_POS_ROPE;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    c.init_std = 0.2f;  /* logits with some spread: greedy choices are not near-ties */
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 16;
    c.moe.router_init_std = 1.0f; /* clear routing margins */
    c.moe_every = which == IC_DENSE ? 0 : 1;
    if (which == IC_MOEH) { /* dense layers 0 and 2, MoE 1 and 3, two shared experts, no renormalisation */
        c.n_layers = 4;
        c.dense_first = 1;
        c.moe_every = 2;
        c.moe.n_shared = 2;
        c.moe.d_ff_shared = 8;
        c.moe.renormalize = 0;
        c.rope_theta = 500.0f;
        c.norm_eps = 1e-6f;
    }
    return c;
}

static int ic_model(moe_model *m, int which, uint64_t seed) {
    moe_model_config c = ic_config(which);
    if (moe_model_init(m, &c, 1, c.max_seq) != MOE_OK) {
        printf("model init: %s\n", m->err.msg);
        return 0;
    }
    moe_model_init_weights(m, seed);
    { /* norms away from 1, so that a swapped or misnamed norm shows in the logits */
        moe_rng r;
        int id;
        size_t i;
        moe_rng_seed(&r, seed + 1000);
        for (id = 0; id < m->S.count; id++)
            if (m->S.tensors[id].ndim == 1 && moe__ends_with(m->S.tensors[id].name, ".w"))
                for (i = 0; i < m->S.tensors[id].numel; i++) moe_store_param(&m->S, id)[i] = 1.0f + 0.2f * moe_rng_normal(&r);
    }
    return 1;
}

static int ic_logits(moe_model *m, const int *tok, int T, float *out) {
    if (moe_model_forward(m, tok, NULL, 1, T, NULL) != MOE_OK) {
        printf("forward: %s\n", m->err.msg);
        return 0;
    }
    memcpy(out, m->logits, sizeof(float) * (size_t)T * m->cfg.vocab);
    return 1;
}

/* a store of odd shapes holding values that exercise the 16-bit roundings */
static int ic_store(moe_store *s, uint64_t seed) {
    moe_rng r;
    size_t i;
    float *p;
    moe_store_init(s);
    if (moe_store_add(s, "embed", 0, 7, 5, 0, 0) < 0 || moe_store_add(s, "layer.0.norm", 0, 9, 0, 0, 0) < 0 ||
        moe_store_add(s, "bank.w", 0, 3, 4, 6, 0) < 0 || moe_store_add(s, "four.d", 0, 2, 3, 2, 2) < 0 ||
        moe_store_add(s, "specials", 0, 24, 0, 0, 0) < 0 || moe_store_alloc(s, 0) != MOE_OK)
        return 0;
    moe_rng_seed(&r, seed);
    for (i = 0; i < s->numel; i++) s->params[i] = moe_rng_normal(&r) * (i % 3 == 0 ? 1e-3f : i % 3 == 1 ? 1.0f : 300.0f);
    p = moe_store_param(s, moe_store_find(s, "specials"));
    {
        /* halfway cases of both 16-bit formats, subnormals, overflow, signed zero */
        const float v[24] = {1.0f + 1.0f / 2048.0f, 1.0f + 3.0f / 2048.0f, 1.0f + 1.0f / 256.0f, 1.0f + 3.0f / 256.0f,
                             65504.0f, 65519.0f, 65520.0f, 1e6f, 5.9604645e-8f, 2.9802322e-8f, 8.940697e-8f, 1e-10f,
                             -0.0f, -1.0f - 1.0f / 2048.0f, 3.0e38f, 1.17549435e-38f, 1e-40f, -7.0f, 0.1f, 0.2f,
                             0.3f, 1.0f / 3.0f, 6.1035156e-5f, 6.0975552e-5f};
        memcpy(p, v, sizeof v);
    }
    return 1;
}

/* ---- 16-bit conversions ------------------------------------------------------------------ */
static double f16_value(uint16_t h) { return (double)moe_f16_to_f32(h); }

/* is h the nearest (ties to even) 16-bit value to x among its neighbours? */
static int nearest_even_ok(double x, uint16_t h, double (*val)(uint16_t), uint16_t max_finite) {
    uint16_t mag = (uint16_t)(h & 0x7fffu), sign = (uint16_t)(h & 0x8000u);
    double v = val(h), ax = fabs(x);
    int k;
    if (mag > max_finite) { /* infinity: x must be at least halfway past the largest finite value */
        double top = val(max_finite), step = top - val((uint16_t)(max_finite - 1));
        return mag == max_finite + 1 && ax >= top + step / 2;
    }
    for (k = -1; k <= 1; k += 2) {
        int nm = (int)mag + k;
        double nv, dv = fabs(ax - fabs(v)), dn;
        if (nm < 0) nm = 1, nv = -val(1); /* the neighbour below zero is -smallest */
        else if (nm > max_finite) continue;
        else nv = val((uint16_t)nm);
        dn = fabs(ax - fabs(nv));
        if (dn < dv) return 0;
        if (dn == dv && (mag & 1u)) return 0;
    }
    return (sign != 0) == (x < 0 || (x == 0 && signbit(x)));
}

static double bf16_value(uint16_t h) { return (double)moe_bf16_to_f32(h); }

static void test_conversions(void) {
    uint32_t h;
    int bad_f16 = 0, bad_bf16 = 0, bad_rt16 = 0, bad_rtbf = 0, i;
    moe_rng r;
    TEST_BEGIN("F16 / BF16: every 16-bit value round-trips; random floats round to nearest even");
    for (h = 0; h < 65536u; h++) {
        float x = moe_f16_to_f32((uint16_t)h), y = moe_bf16_to_f32((uint16_t)h);
        if (x == x ? moe_f32_to_f16(x) != h : !(moe_f16_to_f32(moe_f32_to_f16(x)) != moe_f16_to_f32(moe_f32_to_f16(x)))) bad_rt16++;
        if (y == y ? moe_f32_to_bf16(y) != h : !(moe_bf16_to_f32(moe_f32_to_bf16(y)) != moe_bf16_to_f32(moe_f32_to_bf16(y)))) bad_rtbf++;
    }
    CHECK(bad_rt16 == 0, "%d half values do not round-trip", bad_rt16);
    CHECK(bad_rtbf == 0, "%d bfloat16 values do not round-trip", bad_rtbf);
    moe_rng_seed(&r, 7);
    for (i = 0; i < 400000; i++) {
        uint32_t u = moe_rng_u32(&r);
        float x;
        if (i % 4 == 0) u = (u & 0x80000000u) | (((u >> 23) % 40u + 100u) << 23) | (u & 0x007fffffu); /* around half's range */
        if (i % 8 == 1) u = (u & 0xffffe000u) | 0x1000u;                                            /* f16 ties */
        if (i % 8 == 3) u = (u & 0xffff0000u) | 0x8000u;                                            /* bf16 ties */
        memcpy(&x, &u, 4);
        if (x != x) continue;
        if (fabs((double)x) < 1e-9 || !nearest_even_ok((double)x, moe_f32_to_f16(x), f16_value, 0x7bffu)) bad_f16 += fabs((double)x) >= 1e-9;
        if (isinf(x) ? moe_f32_to_bf16(x) != (uint16_t)(u >> 16) : !nearest_even_ok((double)x, moe_f32_to_bf16(x), bf16_value, 0x7f7fu)) bad_bf16++;
    }
    CHECK(bad_f16 == 0, "%d floats rounded to the wrong half", bad_f16);
    CHECK(bad_bf16 == 0, "%d floats rounded to the wrong bfloat16", bad_bf16);
    /* the edges, by value */
    CHECK(moe_f32_to_f16(65504.0f) == 0x7bffu && moe_f32_to_f16(65519.0f) == 0x7bffu && moe_f32_to_f16(65520.0f) == 0x7c00u,
          "f16 overflow edge: 65504 -> %04x, 65519 -> %04x, 65520 -> %04x", moe_f32_to_f16(65504.0f), moe_f32_to_f16(65519.0f), moe_f32_to_f16(65520.0f));
    CHECK(moe_f32_to_f16(2.9802322e-8f) == 0 && moe_f32_to_f16(8.940697e-8f) == 2 && moe_f32_to_f16(-0.0f) == 0x8000u,
          "f16 subnormal ties: 2^-25 -> %04x (0), 1.5 x 2^-24 -> %04x (2)", moe_f32_to_f16(2.9802322e-8f), moe_f32_to_f16(8.940697e-8f));
    CHECK(moe_f32_to_f16(1.0f + 1.0f / 2048.0f) == 0x3c00u && moe_f32_to_f16(1.0f + 3.0f / 2048.0f) == 0x3c02u,
          "f16 normal ties to even: %04x %04x", moe_f32_to_f16(1.0f + 1.0f / 2048.0f), moe_f32_to_f16(1.0f + 3.0f / 2048.0f));
    CHECK(moe_f32_to_bf16(1.0f + 1.0f / 256.0f) == 0x3f80u && moe_f32_to_bf16(1.0f + 3.0f / 256.0f) == 0x3f82u && moe_f32_to_bf16(3.0e38f) == 0x7f62u,
          "bf16 ties to even: %04x %04x", moe_f32_to_bf16(1.0f + 1.0f / 256.0f), moe_f32_to_bf16(1.0f + 3.0f / 256.0f));
    {
        float nan;
        uint32_t u = 0x7fc00001u;
        memcpy(&nan, &u, 4);
        CHECK((moe_f32_to_f16(nan) & 0x7c00u) == 0x7c00u && (moe_f32_to_f16(nan) & 0x3ffu) && (moe_f32_to_bf16(nan) & 0x7fu),
              "NaN stays NaN: f16 %04x bf16 %04x", moe_f32_to_f16(nan), moe_f32_to_bf16(nan));
    }
}

/* ---- any store --------------------------------------------------------------------------- */
static float ic_round(float x, moe_dtype t) {
    return t == MOE_DTYPE_F16 ? moe_f16_to_f32(moe_f32_to_f16(x)) : t == MOE_DTYPE_BF16 ? moe_bf16_to_f32(moe_f32_to_bf16(x)) : x;
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void test_store_roundtrip(void) {
    moe_store a, b;
    moe_err e;
    int t;
    TEST_BEGIN("any store: F32 bit-exact, F16 / BF16 equal to the rounding; the file's layout");
    if (!CHECK(ic_store(&a, 1) && ic_store(&b, 2), "store setup")) return;
    for (t = 0; t < 3; t++) {
        const char *path = tmp_path(t == 0 ? "store_f32.safetensors" : t == 1 ? "store_f16.safetensors" : "store_bf16.safetensors");
        moe_status st = moe_safetensors_save(path, &a, (moe_dtype)t, &e);
        size_t i, bad = 0, n;
        unsigned char *bytes;
        CHECK(st == MOE_OK, "save %d: %s", t, e.msg);
        st = moe_safetensors_load(path, &b, &e);
        CHECK(st == MOE_OK, "load %d: %s", t, e.msg);
        for (i = 0; i < a.numel; i++) {
            float want = ic_round(a.params[i], (moe_dtype)t);
            if (memcmp(&want, &b.params[i], 4) != 0 && !(want != want && b.params[i] != b.params[i])) bad++;
        }
        CHECK(bad == 0, "dtype %d: %zu values differ from the rounding", t, bad);
        if (CHECK(file_bytes(path, &bytes, &n), "read back %s", path)) {
            uint64_t hl = 0;
            int k;
            for (k = 7; k >= 0; k--) hl = (hl << 8) | bytes[k];
            CHECK(hl % 8 == 0 && 8 + hl + a.numel * (t == 0 ? 4u : 2u) == n, "header %llu bytes, file %zu: data must follow, 8-aligned",
                  (unsigned long long)hl, n);
            CHECK(n > 8 + hl && memcmp(bytes + 8, "{\"__metadata__\":{\"format\":\"pt\"}", 31) == 0, "header starts with the metadata");
            free(bytes);
        }
    }
    moe_store_free(&a);
    moe_store_free(&b);
}

/* ---- bad files --------------------------------------------------------------------------- */

/* a file: 8-byte length of `header` (or `lie` when non-zero), the header, then `data_len` bytes */
static void craft(const char *path, const char *header, uint64_t lie, size_t data_len) {
    size_t hl = strlen(header), i;
    unsigned char *b = (unsigned char *)calloc(8 + hl + data_len + 1, 1);
    uint64_t L = lie ? lie : (uint64_t)hl;
    for (i = 0; i < 8; i++) b[i] = (unsigned char)(L >> (8 * i));
    memcpy(b + 8, header, hl);
    for (i = 0; i < data_len; i++) b[8 + hl + i] = (unsigned char)(i * 37u);
    write_bytes(path, b, 8 + hl + data_len);
    free(b);
}

static void test_bad_files(void) {
    /* the store: "a" (2, 3) and "b" (4): 40 bytes of F32 */
    static const struct {
        const char *what, *header;
        uint64_t lie;
        size_t data;
        const char *needle; /* a word the sentence must contain */
    } cases[] = {
        {"good (control)", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, NULL},
        {"truncated data", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 30, "outside"},
        {"bytes after the last tensor", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 48, "cover"},
        {"lying end offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,4000000000]}}", 0, 40, "outside"},
        {"offsets against shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]},\"b\":{\"dtype\":\"F32\",\"shape\":[5],\"data_offsets\":[20,40]}}", 0, 40, "shape"},
        {"overlapping", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]}}", 0, 40, "overlapping"},
        {"a hole", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[28,44]}}", 0, 44, "hole"},
        {"begin after end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,0]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "outside"},
        {"huge header length", "{}", (uint64_t)1 << 60, 0, "header"},
        {"header longer than the file", "{\"a\":1}", 4096, 0, "header"},
        {"wrong dtype", "{\"a\":{\"dtype\":\"I64\",\"shape\":[2,3],\"data_offsets\":[0,48]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[48,64]}}", 0, 64, "I64"},
        {"unknown dtype", "{\"a\":{\"dtype\":\"F7\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "dtype"},
        {"duplicate name", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "twice"},
        {"duplicate field", "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "repeated"},
        {"missing tensor", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"c\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "lacks tensor 'b'"},
        {"extra tensor", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]},\"z\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[40,44]}}", 0, 44, "'z'"},
        {"wrong shape", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3,2],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "shape"},
        {"shape product overflow", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,24]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[24,40]}}", 0, 40, "shape"},
        {"negative dimension", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2,3],\"data_offsets\":[0,24]}}", 0, 24, "integer"},
        {"missing field", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,24]}}", 0, 24, "shape"},
        {"not JSON", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}", 0, 24, "JSON"},
        {"trailing garbage", "{\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}} x", 0, 16, "JSON"},
        {"unterminated string", "{\"a", 0, 0, "JSON"},
        {"deep nesting", "{\"__metadata__\":{\"x\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}", 0, 0, "JSON"},
        {"metadata not text", "{\"__metadata__\":{\"format\":1}}", 0, 0, "JSON"},
        {"empty file of tensors with data", "{}", 0, 16, "no tensor"},
    };
    moe_store s, keep;
    moe_err e;
    size_t k;
    TEST_BEGIN("bad safetensors files: a status with a sentence, the store unchanged, allocations within the file's size");
    moe_store_init(&s);
    moe_store_add(&s, "a", 0, 2, 3, 0, 0);
    moe_store_add(&s, "b", 0, 4, 0, 0, 0);
    if (!CHECK(moe_store_alloc(&s, 0) == MOE_OK, "store")) return;
    moe_store_init(&keep);
    moe_store_add(&keep, "a", 0, 2, 3, 0, 0);
    moe_store_add(&keep, "b", 0, 4, 0, 0, 0);
    moe_store_alloc(&keep, 0);
    for (k = 0; k < 10; k++) s.params[k] = keep.params[k] = (float)k + 0.5f;
    for (k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const char *path = tmp_path("bad.safetensors");
        moe_status st;
        size_t file_size = 8 + strlen(cases[k].header) + cases[k].data;
        craft(path, cases[k].header, cases[k].lie, cases[k].data);
        memset(&e, 0, sizeof e);
        ic_alloc_largest = 0;
        st = moe_safetensors_load(path, &s, &e);
        if (!cases[k].needle) {
            CHECK(st == MOE_OK, "%s: %s", cases[k].what, e.msg);
            memcpy(s.params, keep.params, 10 * sizeof(float));
            continue;
        }
        CHECK(st != MOE_OK && e.msg[0] && strstr(e.msg, cases[k].needle), "%s: status %d, sentence '%s' (expected one with '%s')", cases[k].what,
              (int)st, e.msg, cases[k].needle);
        CHECK(same_bits(s.params, keep.params, 10), "%s: the store changed", cases[k].what);
        /* the chunk buffer (64 KiB) and the store's copy aside, nothing larger than the file */
        CHECK(ic_alloc_largest <= (file_size > 65536 ? file_size : 65536), "%s: allocated %zu bytes for a %zu-byte file", cases[k].what,
              ic_alloc_largest, file_size);
        if (test_verbose) printf("   %-32s %s\n", cases[k].what, e.msg);
    }
    {
        moe_status st = moe_safetensors_load(tmp_path("does_not_exist.safetensors"), &s, &e);
        CHECK(st == MOE_ERR_IO && strstr(e.msg, "cannot open"), "missing file: %s", e.msg);
        craft(tmp_path("short.safetensors"), "", 0, 0);
        write_bytes(tmp_path("short.safetensors"), "\x10\0\0", 3);
        st = moe_safetensors_load(tmp_path("short.safetensors"), &s, &e);
        CHECK(st == MOE_ERR_FORMAT && strstr(e.msg, "too short"), "3-byte file: %s", e.msg);
    }
    moe_store_free(&s);
    moe_store_free(&keep);
}

/* ---- the model under HF names ------------------------------------------------------------ */
static void test_hf_roundtrip(void) {
    int which, t, tok[IC_T];
    moe_err e;
    ic_tokens(tok);
    TEST_BEGIN("HF names: dense, Mixtral and moe_h models export and import bit-exact, same logits");
    for (which = 0; which < IC_CASES; which++)
        for (t = 0; t < 3; t++) {
            moe_model a, b;
            char dir[600];
            float *la, *lb;
            size_t i, bad = 0;
            snprintf(dir, sizeof dir, "%s/hf_%s_%d", tmpdir, ic_case_name[which], t);
            make_dir(dir);
            if (!ic_model(&a, which, 11 + which)) continue;
            CHECK(moe_model_export_hf(&a, dir, (moe_dtype)t, &e) == MOE_OK, "%s export: %s", ic_case_name[which], e.msg);
            if (!CHECK(moe_model_import_hf(&b, dir, 1, 0, &e) == MOE_OK, "%s import (dtype %d): %s", ic_case_name[which], t, e.msg)) {
                moe_model_free(&a);
                continue;
            }
            CHECK(b.S.numel == a.S.numel && moe_store_fingerprint(&b.S) == moe_store_fingerprint(&a.S), "%s: layouts differ", ic_case_name[which]);
            /* what the layout does not show: positions, norms, routing (d_ff of an all-MoE
               model and the MoE settings of a dense one are unused and not carried) */
            CHECK(b.cfg.pos == a.cfg.pos && b.cfg.rope_theta == a.cfg.rope_theta && b.cfg.norm_eps == a.cfg.norm_eps &&
                      b.cfg.max_seq == a.cfg.max_seq && b.cfg.moe_every == a.cfg.moe_every && b.cfg.dense_first == a.cfg.dense_first &&
                      (which == IC_DENSE || (b.cfg.moe.renormalize == a.cfg.moe.renormalize && b.cfg.moe.top_k == a.cfg.moe.top_k &&
                                             b.cfg.moe.router == a.cfg.moe.router && b.cfg.moe.n_shared == a.cfg.moe.n_shared)),
                  "%s: the config read from config.json differs", ic_case_name[which]);
            for (i = 0; i < a.S.numel; i++) {
                float want = ic_round(a.S.params[i], (moe_dtype)t);
                if (memcmp(&want, &b.S.params[i], 4) != 0) bad++;
            }
            CHECK(bad == 0, "%s dtype %d: %zu parameters differ", ic_case_name[which], t, bad);
            if (t == 0) {
                la = (float *)malloc(sizeof(float) * IC_T * 256);
                lb = (float *)malloc(sizeof(float) * IC_T * 256);
                if (ic_logits(&a, tok, IC_T, la) && ic_logits(&b, tok, IC_T, lb))
                    CHECK(same_bits(la, lb, (size_t)IC_T * 256), "%s: logits differ after the round trip", ic_case_name[which]);
                free(la);
                free(lb);
            }
            moe_model_free(&a);
            moe_model_free(&b);
        }
}

static void test_hf_refused(void) {
    moe_err e;
    int k;
    TEST_BEGIN("HF names: configurations that do not map, and config.json files that lie, get a sentence");
    for (k = 0; k < 7; k++) {
        moe_model_config c = ic_config(IC_MIXTRAL);
        const char *needle = "";
        moe_model m;
        switch (k) {
        case 0: c.pos = MOE_POS_LEARNED; needle = "positions"; break;
        case 1: c.moe.router = MOE_ROUTER_SIGMOID; needle = "top-k"; break;
        case 2: c.moe.expert = MOE_EXPERT_FFN; needle = "SwiGLU"; break;
        case 3: c.moe.router_bias = 1; needle = "bias"; break;
        case 4: c.moe.capacity_factor = 1.25f; needle = "capacity"; break;
        case 5: c.router_input = MOE_RIN_GRU; c.router_dim = 8; needle = "GRU"; break;
        case 6: c.moe.hyper = 1; needle = "HyperMoE"; break;
        }
        if (!CHECK(moe_model_init(&m, &c, 1, 8) == MOE_OK, "init %d: %s", k, m.err.msg)) continue;
        CHECK(moe_model_export_hf(&m, tmpdir, MOE_DTYPE_F32, &e) == MOE_ERR_UNSUPPORTED && strstr(e.msg, needle), "case %d: '%s'", k, e.msg);
        CHECK(moe_model_export_gguf(&m, tmp_path("x.gguf"), MOE_DTYPE_F32, &e) == MOE_ERR_UNSUPPORTED && strstr(e.msg, needle), "gguf %d: '%s'", k, e.msg);
        moe_model_free(&m);
    }
    {
        /* config.json files: a valid export, then one key changed at a time */
        moe_model a, b;
        char dir[600], path[700];
        unsigned char *json;
        size_t n;
        static const struct { const char *from, *to, *needle; } edits[] = {
            {"\"num_key_value_heads\": 4", "\"num_key_value_heads\": 2", "grouped-query"},
            {"\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false", "untied"},
            {"\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}", "rope_scaling"},
            {"\"model_type\": \"mixtral\"", "\"model_type\": \"gpt2\"", "model_type"},
            {"\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", "silu"},
            {"\"attention_bias\": false", "\"attention_bias\": true", "biases"},
            {"\"intermediate_size\": 16", "\"intermediate_size\": 1600000", "does not fit"},
            {"\"hidden_size\": 32", "\"hidden_size\": 3200", "do not fit"},
            {"\"num_hidden_layers\": 2", "\"num_hidden_layers\": 200000", "does not fit"},
            {"\"num_local_experts\": 4", "\"num_local_experts\": 40", "does not fit"},
            {"\"num_local_experts\": 4", "\"num_local_experts\": 2", "shape"},
            {"\"vocab_size\": 256", "\"vocab_size\": 256,", "JSON"},
            {"\"vocab_size\": 256", "\"vocab_size\": 25600000000", "too large"},
        };
        snprintf(dir, sizeof dir, "%s/hf_edit", tmpdir);
        make_dir(dir);
        if (!ic_model(&a, IC_MIXTRAL, 5)) return;
        CHECK(moe_model_export_hf(&a, dir, MOE_DTYPE_F32, &e) == MOE_OK, "export: %s", e.msg);
        snprintf(path, sizeof path, "%s/config.json", dir);
        if (CHECK(file_bytes(path, &json, &n), "read config.json")) {
            size_t q;
            for (q = 0; q < sizeof edits / sizeof edits[0]; q++) {
                char *text = (char *)malloc(n + 200), *at;
                moe_status st;
                json[n] = '\0';
                at = strstr((char *)json, edits[q].from);
                if (!CHECK(at != NULL, "config.json lacks %s", edits[q].from)) { free(text); continue; }
                memcpy(text, json, (size_t)(at - (char *)json));
                strcpy(text + (at - (char *)json), edits[q].to);
                strcat(text, at + strlen(edits[q].from));
                write_bytes(path, text, strlen(text));
                ic_alloc_largest = 0;
                st = moe_model_import_hf(&b, dir, 1, 0, &e);
                CHECK(st != MOE_OK && strstr(e.msg, edits[q].needle), "edit '%s': status %d '%s'", edits[q].to, (int)st, e.msg);
                CHECK(ic_alloc_largest < (size_t)4 << 20, "edit '%s': allocated %zu bytes", edits[q].to, ic_alloc_largest);
                free(text);
            }
            write_bytes(path, json, n);
            CHECK(moe_model_import_hf(&b, dir, 1, 0, &e) == MOE_OK, "restored config: %s", e.msg);
            moe_model_free(&b);
            free(json);
        }
        /* the weights file cut short, and one of its names changed */
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (CHECK(file_bytes(path, &json, &n), "read model.safetensors")) {
            char *at;
            moe_status st;
            write_bytes(path, json, n - 100);
            st = moe_model_import_hf(&b, dir, 1, 0, &e);
            CHECK(st == MOE_ERR_FORMAT && strstr(e.msg, "outside") && strstr(b.err.msg, "outside"), "truncated weights: '%s'", e.msg);
            json[n - 1] = '\0';
            at = strstr((char *)json + 8, "experts.3.w2");
            if (CHECK(at != NULL, "no expert 3 in the header")) {
                at[8] = '9';
                write_bytes(path, json, n);
                st = moe_model_import_hf(&b, dir, 1, 0, &e);
                CHECK(st == MOE_ERR_FORMAT && strstr(e.msg, "lacks tensor 'model.layers.0.block_sparse_moe.experts.3.w2.weight'"), "renamed tensor: '%s'", e.msg);
            }
            free(json);
        }
        moe_model_free(&a);
    }
}

/* ---- GGUF ---------------------------------------------------------------------------------- */

/* a minimal bounded GGUF reader for the test: the metadata keys and the tensor infos */
typedef struct gg_tensor { char name[64]; int ndim; uint64_t ne[4]; uint32_t type; uint64_t off; } gg_tensor;
typedef struct gg_file {
    unsigned char *b;
    size_t n, pos, data;
    uint64_t n_tensors, n_kv;
    gg_tensor t[64];
    char keys[64][64];
    int bad;
} gg_file;

static uint64_t gg_u(gg_file *g, int bytes) {
    uint64_t v = 0;
    int i;
    if (g->pos + (size_t)bytes > g->n) { g->bad = 1; return 0; }
    for (i = bytes - 1; i >= 0; i--) v = (v << 8) | g->b[g->pos + (size_t)i];
    g->pos += (size_t)bytes;
    return v;
}

static void gg_str(gg_file *g, char *out, size_t cap) {
    uint64_t n = gg_u(g, 8);
    if (g->bad || n > g->n - g->pos) { g->bad = 1; return; }
    if (out) { size_t c = n < cap - 1 ? (size_t)n : cap - 1; memcpy(out, g->b + g->pos, c); out[c] = '\0'; }
    g->pos += (size_t)n;
}

static void gg_value(gg_file *g, uint32_t type) {
    static const int size[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) gg_str(g, NULL, 0);
    else if (type == 9) {
        uint32_t it = (uint32_t)gg_u(g, 4);
        uint64_t n = gg_u(g, 8), i;
        for (i = 0; i < n && !g->bad; i++) gg_value(g, it);
    } else if (type < 13) g->pos += (size_t)size[type];
    else g->bad = 1;
}

static int gg_open(gg_file *g, const char *path) {
    uint64_t k;
    memset(g, 0, sizeof *g);
    if (!file_bytes(path, &g->b, &g->n) || g->n < 24 || memcmp(g->b, "GGUF", 4) != 0) return 0;
    g->pos = 4;
    if (gg_u(g, 4) != 3) return 0;
    g->n_tensors = gg_u(g, 8);
    g->n_kv = gg_u(g, 8);
    if (g->n_tensors > 64 || g->n_kv > 64) return 0;
    for (k = 0; k < g->n_kv && !g->bad; k++) {
        gg_str(g, g->keys[k], sizeof g->keys[k]);
        gg_value(g, (uint32_t)gg_u(g, 4));
    }
    for (k = 0; k < g->n_tensors && !g->bad; k++) {
        gg_tensor *t = &g->t[k];
        int d;
        gg_str(g, t->name, sizeof t->name);
        t->ndim = (int)gg_u(g, 4);
        if (t->ndim < 1 || t->ndim > 4) { g->bad = 1; break; }
        for (d = 0; d < t->ndim; d++) t->ne[d] = gg_u(g, 8);
        t->type = (uint32_t)gg_u(g, 4);
        t->off = gg_u(g, 8);
    }
    g->data = (g->pos + 31) / 32 * 32;
    return !g->bad;
}

static const gg_tensor *gg_find(const gg_file *g, const char *name) {
    uint64_t k;
    for (k = 0; k < g->n_tensors; k++)
        if (strcmp(g->t[k].name, name) == 0) return &g->t[k];
    return NULL;
}

static int gg_has_key(const gg_file *g, const char *key) {
    uint64_t k;
    for (k = 0; k < g->n_kv; k++)
        if (strcmp(g->keys[k], key) == 0) return 1;
    return 0;
}

static float gg_f32(const gg_file *g, const gg_tensor *t, size_t i) {
    float x;
    memcpy(&x, g->b + g->data + t->off + 4 * i, 4);
    return x;
}

static void test_gguf(void) {
    int which;
    moe_err e;
    TEST_BEGIN("GGUF: llama architecture, stacked experts, q/k rows permuted per head, byte vocabulary, aligned");
    for (which = 0; which < IC_CASES; which++) {
        moe_model m;
        gg_file g;
        const char *path = tmp_path("model.gguf");
        moe_status st;
        if (!ic_model(&m, which, 21)) continue;
        st = moe_model_export_gguf(&m, path, MOE_DTYPE_F32, &e);
        if (which == IC_MOEH) {
            CHECK(st == MOE_ERR_UNSUPPORTED && strstr(e.msg, "shared"), "moe_h must be refused: '%s'", e.msg);
            moe_model_free(&m);
            continue;
        }
        CHECK(st == MOE_OK, "%s: %s", ic_case_name[which], e.msg);
        if (CHECK(gg_open(&g, path), "%s: the GGUF does not parse", ic_case_name[which])) {
            const gg_tensor *q = gg_find(&g, "blk.1.attn_q.weight"), *k = gg_find(&g, "blk.0.attn_k.weight"), *v = gg_find(&g, "blk.1.attn_v.weight");
            const gg_tensor *ge = gg_find(&g, "blk.1.ffn_down_exps.weight"), *gi = gg_find(&g, "blk.0.ffn_gate_inp.weight");
            const float *wqkv1 = moe_store_param(&m.S, moe_store_find(&m.S, "l1.attn.wqkv"));
            const float *wqkv0 = moe_store_param(&m.S, moe_store_find(&m.S, "l0.attn.wqkv"));
            int d = 32, hd = 8, half = 4, h, i, j, c, bad = 0;
            uint64_t t;
            CHECK(gg_has_key(&g, "general.architecture") && gg_has_key(&g, "llama.rope.freq_base") && gg_has_key(&g, "tokenizer.ggml.tokens") &&
                      gg_has_key(&g, "tokenizer.ggml.merges") && gg_has_key(&g, "llama.attention.layer_norm_rms_epsilon") &&
                      (which == IC_DENSE || (gg_has_key(&g, "llama.expert_count") && gg_has_key(&g, "llama.expert_used_count"))),
                  "%s: metadata keys missing", ic_case_name[which]);
            CHECK(!gg_find(&g, "output.weight") && gg_find(&g, "token_embd.weight") && gg_find(&g, "output_norm.weight"), "tied head: no output.weight");
            for (t = 0; t < g.n_tensors; t++) {
                uint64_t bytes = g.t[t].type == 0 ? 4 : 2;
                int dd;
                for (dd = 0; dd < g.t[t].ndim; dd++) bytes *= g.t[t].ne[dd];
                if (g.t[t].off % 32 != 0 || g.data + g.t[t].off + bytes > g.n) bad++;
            }
            CHECK(bad == 0 && g.data % 32 == 0, "%s: %d tensors misaligned or past the end", ic_case_name[which], bad);
            bad = 0;
            if (CHECK(q && k && v && q->ne[0] == 32 && q->ne[1] == 32, "q/k/v tensors")) {
                for (h = 0; h < 4; h++)
                    for (i = 0; i < half; i++)
                        for (j = 0; j < 2; j++)
                            for (c = 0; c < d; c++) {
                                size_t file_row = (size_t)(h * hd + 2 * i + j), our_row = (size_t)(h * hd + j * half + i);
                                if (gg_f32(&g, q, file_row * d + c) != wqkv1[our_row * d + c]) bad++;
                                if (gg_f32(&g, k, file_row * d + c) != wqkv0[(size_t)d * d + our_row * d + c]) bad++;
                                if (gg_f32(&g, v, file_row * d + c) != wqkv1[(size_t)2 * d * d + file_row * d + c]) bad++;
                            }
                CHECK(bad == 0, "%s: %d q/k/v values not where llama.cpp's permutation puts them", ic_case_name[which], bad);
            }
            if (which == IC_MIXTRAL) {
                const float *wd = moe_store_param(&m.S, moe_store_find(&m.S, "l1.moe.experts.w_down"));
                CHECK(ge && ge->ndim == 3 && ge->ne[0] == 16 && ge->ne[1] == 32 && ge->ne[2] == 4 && gg_f32(&g, ge, 3 * 32 * 16 + 5) == wd[3 * 32 * 16 + 5],
                      "ffn_down_exps must be ne [D, d, E] = our (E, d, D)");
                CHECK(gi && gi->type == 0 && gi->ne[0] == 32 && gi->ne[1] == 4, "the router stays F32, ne [d, E]");
            }
            free(g.b);
        }
        if (which == IC_MIXTRAL) {
            unsigned char *a, *b;
            size_t na, nb;
            CHECK(moe_model_export_gguf(&m, tmp_path("model_f16.gguf"), MOE_DTYPE_F16, &e) == MOE_OK, "f16: %s", e.msg);
            if (file_bytes(tmp_path("model_f16.gguf"), &a, &na) && file_bytes(path, &b, &nb)) {
                CHECK(na < nb && na > nb / 2, "F16 file %zu bytes vs F32 %zu", na, nb);
                free(a);
                free(b);
            }
        }
        moe_model_free(&m);
    }
}

/* ---- against the Python references (committed files) ------------------------------------- */
static const char *ref(const char *name) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", REF_DIR, name);
    return buf[k];
}

/* the numpy reader's check lines: "<file> <tensor> <dtype> <numel> <sum> <first> <last>" */
static void test_numpy_reference(void) {
    static const char *files[3] = {"st_store_f32", "st_store_f16", "st_store_bf16"};
    FILE *f = fopen(ref("safetensors_check.txt"), "r");
    char line[512];
    int lines = 0, t;
    moe_store ours, theirs;
    moe_err e;
    TEST_BEGIN("numpy's safetensors reader agrees with our files; its files load here; its F16 / BF16 rounding is ours");
    if (!CHECK(f != NULL, "%s missing. " GOLDEN_HINT, ref("safetensors_check.txt"))) return;
    if (!CHECK(ic_store(&ours, 1) && ic_store(&theirs, 2), "stores")) { fclose(f); return; }
    while (fgets(line, sizeof line, f)) {
        char file[128], name[128], dtype[16];
        unsigned long long numel;
        double sum, first, last;
        moe_store s;
        if (line[0] == '#' || sscanf(line, "%127s %127s %15s %llu %lf %lf %lf", file, name, dtype, &numel, &sum, &first, &last) != 7) continue;
        lines++;
        if (!ic_store(&s, 9)) break;
        {
            char path[300];
            int id;
            snprintf(path, sizeof path, "%s.safetensors", file);
            if (!CHECK(moe_safetensors_load(ref(path), &s, &e) == MOE_OK, "%s: %s", path, e.msg)) { moe_store_free(&s); continue; }
            id = moe_store_find(&s, name);
            if (CHECK(id >= 0 && s.tensors[id].numel == numel, "%s: tensor %s", file, name)) {
                const float *p = moe_store_param(&s, id);
                double ssum = 0.0;
                size_t i;
                for (i = 0; i < numel; i++) ssum += (double)p[i] * ((i % 7) + 1); /* a weighted sum: order matters */
                CHECK(fabs(ssum - sum) <= 1e-9 * (fabs(sum) + 1.0) || (ssum != ssum && sum != sum) || (isinf(ssum) && ssum == sum),
                      "%s/%s: our weighted sum %.12g, numpy's %.12g", file, name, ssum, sum);
                /* 9 significant digits name a float32 exactly */
                CHECK((p[0] == (float)first || (p[0] != p[0] && first != first)) && (p[numel - 1] == (float)last || (p[numel - 1] != p[numel - 1] && last != last)),
                      "%s/%s: first/last %g %g, numpy's %g %g", file, name, (double)p[0], (double)p[numel - 1], first, last);
            }
        }
        moe_store_free(&s);
    }
    fclose(f);
    CHECK(lines >= 15, "only %d check lines", lines);
    /* numpy's own files (its writer, its rounding of our F32 values) against ours */
    for (t = 0; t < 3; t++) {
        char name[128];
        snprintf(name, sizeof name, "%s_numpy.safetensors", files[t]);
        if (CHECK(moe_safetensors_load(ref(name), &theirs, &e) == MOE_OK, "%s: %s", name, e.msg)) {
            size_t i, bad = 0;
            snprintf(name, sizeof name, "%s.safetensors", files[0]);
            moe_safetensors_load(ref(name), &ours, &e);
            for (i = 0; i < ours.numel; i++) {
                float want = ic_round(ours.params[i], (moe_dtype)t);
                if (memcmp(&want, &theirs.params[i], 4) != 0 && !(want != want && theirs.params[i] != theirs.params[i])) bad++;
            }
            CHECK(bad == 0, "%s: %zu values rounded differently by numpy", files[t], bad);
        }
    }
    /* our writer is deterministic: re-writing what we read gives the committed bytes */
    for (t = 0; t < 3; t++) {
        unsigned char *a = NULL, *b = NULL;
        size_t na, nb;
        char name[128];
        snprintf(name, sizeof name, "%s.safetensors", files[t]);
        moe_safetensors_load(ref(name), &ours, &e);
        moe_safetensors_save(tmp_path("again.safetensors"), &ours, (moe_dtype)t, &e);
        if (CHECK(file_bytes(ref(name), &a, &na) && file_bytes(tmp_path("again.safetensors"), &b, &nb), "read %s", name)) {
            CHECK(na == nb && memcmp(a, b, na) == 0, "%s: writing it again gives other bytes", name);
        }
        free(a);
        free(b);
    }
    moe_store_free(&ours);
    moe_store_free(&theirs);
}

static void test_torch_reference(void) {
    golden_file g;
    int which, tok[IC_T], i;
    moe_err e;
    TEST_BEGIN("PyTorch Llama / Mixtral / moe_h on our exports: same logits (1e-4); its own model imports and runs the same");
    if (!CHECK(golden_load(&g, ref("hf_logits.bin")) == 0, "%s", g.err)) return;
    ic_tokens(tok);
    {
        const golden_tensor *gt = golden_find(&g, "tokens");
        int same = gt && gt->dtype == GOLDEN_I32 && gt->numel == IC_T;
        for (i = 0; same && i < IC_T; i++) same = gt->i32[i] == tok[i];
        CHECK(same, "the golden's input is not ours");
    }
    for (which = 0; which < IC_CASES + 1; which++) {
        moe_model m;
        char dir[300], key[64];
        const char *name = which < IC_CASES ? ic_case_name[which] : "torch_mixtral";
        const float *want;
        float *got;
        snprintf(dir, sizeof dir, "%s/%s%s", REF_DIR, which < IC_CASES ? "hf_" : "", name);
        if (!CHECK(moe_model_import_hf(&m, dir, 1, 0, &e) == MOE_OK, "%s: %s", dir, e.msg)) continue;
        snprintf(key, sizeof key, "%s.logits", name);
        want = golden_f32(&g, key, (size_t)IC_T * 256);
        got = (float *)malloc(sizeof(float) * IC_T * 256);
        if (CHECK(want != NULL, "%s", g.err) && ic_logits(&m, tok, IC_T, got))
            check_close(key, got, want, (size_t)IC_T * 256, 1e-4, 1e-4);
        /* llama.cpp's conventions in numpy, on our GGUF of this model */
        snprintf(key, sizeof key, "%s.gguf_logits", name);
        if (golden_find(&g, key)) {
            want = golden_f32(&g, key, (size_t)IC_T * 256);
            if (want) check_close(key, got, want, (size_t)IC_T * 256, 1e-4, 1e-4);
        } else {
            CHECK(which == IC_MOEH || which == IC_CASES, "%s: no GGUF reference logits", name);
        }
        free(got);
        if (which < IC_CASES) { /* our exporters are deterministic: the committed files come back */
            unsigned char *a = NULL, *b = NULL;
            size_t na, nb;
            char path[400];
            moe_model_export_hf(&m, tmpdir, MOE_DTYPE_F32, &e);
            snprintf(path, sizeof path, "%s/model.safetensors", dir);
            CHECK(file_bytes(path, &a, &na) && file_bytes(tmp_path("model.safetensors"), &b, &nb) && na == nb && memcmp(a, b, na) == 0,
                  "%s: exporting the imported model gives other bytes", name);
            free(a); free(b);
            snprintf(path, sizeof path, "%s/config.json", dir);
            CHECK(file_bytes(path, &a, &na) && file_bytes(tmp_path("config.json"), &b, &nb) && na == nb && memcmp(a, b, na) == 0,
                  "%s: config.json differs", name);
            free(a); free(b);
            if (which != IC_MOEH) { /* the GGUF hf_ref.py read: its size and CRC-32 */
                const golden_tensor *gc;
                b = NULL;
                snprintf(key, sizeof key, "%s.gguf_size_crc32", name);
                gc = golden_find(&g, key);
                moe_model_export_gguf(&m, tmp_path("again.gguf"), MOE_DTYPE_F32, &e);
                if (CHECK(gc && gc->dtype == GOLDEN_I32 && gc->numel == 2 && file_bytes(tmp_path("again.gguf"), &b, &nb), "%s: %s", key, g.err))
                    CHECK((size_t)gc->i32[0] == nb && (uint32_t)gc->i32[1] == moe_crc32(0, b, nb), "%s: the GGUF differs from the one hf_ref.py ran", name);
                free(b);
            }
        }
        moe_model_free(&m);
    }
    golden_free(&g);
}

/* ---- modes ------------------------------------------------------------------------------- */
static int write_refs(const char *dir) {
    moe_store s;
    moe_err e;
    int which, t, ok = 1;
    char path[600];
    make_dir(dir);
    if (!ic_store(&s, 1)) return 1;
    for (t = 0; t < 3; t++) {
        snprintf(path, sizeof path, "%s/st_store_%s.safetensors", dir, t == 0 ? "f32" : t == 1 ? "f16" : "bf16");
        if (moe_safetensors_save(path, &s, (moe_dtype)t, &e) != MOE_OK) { printf("%s\n", e.msg); ok = 0; }
    }
    moe_store_free(&s);
    for (which = 0; which < IC_CASES; which++) {
        moe_model m;
        if (!ic_model(&m, which, 100 + which)) return 1;
        snprintf(path, sizeof path, "%s/hf_%s", dir, ic_case_name[which]);
        make_dir(path);
        if (moe_model_export_hf(&m, path, MOE_DTYPE_F32, &e) != MOE_OK) { printf("%s\n", e.msg); ok = 0; }
        if (which != IC_MOEH) {
            snprintf(path, sizeof path, "%s/%s.gguf", dir, ic_case_name[which]);
            if (moe_model_export_gguf(&m, path, MOE_DTYPE_F32, &e) != MOE_OK) { printf("%s\n", e.msg); ok = 0; }
        }
        moe_model_free(&m);
    }
    printf("wrote the reference files into %s\n", dir);
    return ok ? 0 : 1;
}

/* JSON for tests/interop/check.mjs: per model and prompt our next-token logits at the last
   prompt position and our greedy continuation; our generation speed, timed as llama.cpp
   generates: KV-cached decoding (moe_model_generate_batch), batch 1, greedy. */
static int write_interop(const char *dir) {
    static const char *prompts[] = {"Hello", "The quick brown fox jumps", "MoE layers route tokens to experts. ", "0123456789"};
    const int n_new = 24;
    FILE *f;
    char path[600];
    int which, p, first_case = 1;
    moe_err e;
    make_dir(dir);
    snprintf(path, sizeof path, "%s/expected.json", dir);
    f = fopen(path, "w");
    if (!f) return 1;
    fprintf(f, "{\n  \"threads\": %d,\n  \"cases\": [", moe_num_threads());
    for (which = 0; which < 2; which++) {
        moe_model m;
        moe_kv_cache kc;
        char src[300];
        int max_len = 0;
        snprintf(src, sizeof src, "%s/hf_%s", REF_DIR, ic_case_name[which]);
        if (moe_model_import_hf(&m, src, 1, 0, &e) != MOE_OK) { printf("%s\n", e.msg); fclose(f); return 1; }
        for (p = 0; p < (int)(sizeof prompts / sizeof prompts[0]); p++)
            if ((int)strlen(prompts[p]) + n_new > max_len) max_len = (int)strlen(prompts[p]) + n_new;
        if (moe_kv_cache_init(&kc, &m, 1, max_len) != MOE_OK) { printf("%s\n", kc.err.msg); moe_model_free(&m); fclose(f); return 1; }
        snprintf(path, sizeof path, "%s/%s.gguf", dir, ic_case_name[which]);
        if (moe_model_export_gguf(&m, path, MOE_DTYPE_F32, &e) != MOE_OK) { printf("%s\n", e.msg); fclose(f); return 1; }
        snprintf(path, sizeof path, "%s/%s_f16.gguf", dir, ic_case_name[which]);
        if (moe_model_export_gguf(&m, path, MOE_DTYPE_F16, &e) != MOE_OK) { printf("%s\n", e.msg); fclose(f); return 1; }
        for (p = 0; p < (int)(sizeof prompts / sizeof prompts[0]); p++) {
            int n = (int)strlen(prompts[p]), tok[128], out[160], i, reps, rep;
            moe_gen_seq q;
            double t0, secs;
            float *z;
            for (i = 0; i < n; i++) tok[i] = (unsigned char)prompts[p][i];
            if (moe_model_forward(&m, tok, NULL, 1, n, NULL) != MOE_OK) { fclose(f); return 1; }
            z = m.logits + (size_t)(n - 1) * 256;
            fprintf(f, "%s\n    {\"model\": \"%s\", \"prompt\": [", first_case ? "" : ",", ic_case_name[which]);
            first_case = 0;
            for (i = 0; i < n; i++) fprintf(f, "%s%d", i ? ", " : "", tok[i]);
            fprintf(f, "],\n     \"logits\": [");
            for (i = 0; i < 256; i++) fprintf(f, "%s%.9g", i ? ", " : "", (double)z[i]);
            memset(&q, 0, sizeof q);
            q.prompt = tok;
            q.n_prompt = n;
            q.max_new = n_new;
            q.stop = -1;
            q.sampler.temperature = 0.0f;
            q.sampler.top_k = 0;
            q.sampler.top_p = 1.0f;
            q.out = out + n;
            memcpy(out, tok, sizeof(int) * (size_t)n);
            reps = 3;
            t0 = moe_time_seconds();
            for (rep = 0; rep < reps; rep++) {
                moe_rng_seed(&q.rng, 1);
                if (moe_model_generate_batch(&m, &kc, &q, 1) != MOE_OK || q.n_out != n_new) {
                    printf("%s\n", m.err.msg);
                    moe_kv_cache_free(&kc);
                    moe_model_free(&m);
                    fclose(f);
                    return 1;
                }
            }
            secs = (moe_time_seconds() - t0) / reps;
            fprintf(f, "],\n     \"greedy\": [");
            for (i = 0; i < n_new; i++) fprintf(f, "%s%d", i ? ", " : "", out[n + i]);
            /* the margin of each greedy choice over the runner-up, to tell near-ties apart */
            fprintf(f, "],\n     \"margins\": [");
            for (i = 0; i < n_new; i++) {
                int j, best = out[n + i];
                float second = -FLT_MAX;
                moe_model_forward(&m, out, NULL, 1, n + i, NULL);
                z = m.logits + (size_t)(n + i - 1) * 256;
                for (j = 0; j < 256; j++)
                    if (j != best && z[j] > second) second = z[j];
                fprintf(f, "%s%.6g", i ? ", " : "", (double)(z[best] - second));
            }
            fprintf(f, "],\n     \"ours_tokens_per_s\": %.1f}", n_new / secs);
        }
        moe_kv_cache_free(&kc);
        moe_model_free(&m);
    }
    fprintf(f, "\n  ]\n}\n");
    fclose(f);
    printf("wrote %s/{dense,mixtral}{,_f16}.gguf and expected.json\n", dir);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--write-refs") == 0) return write_refs(argv[2]);
    if (argc == 3 && strcmp(argv[1], "--interop") == 0) return write_interop(argv[2]);
    make_tmpdir();
    test_conversions();
    test_store_roundtrip();
    test_bad_files();
    test_hf_roundtrip();
    test_hf_refused();
    test_gguf();
    test_numpy_reference();
    test_torch_reference();
    if (proc_rmtree(tmpdir) != 0) printf("could not remove %s\n", tmpdir);
    return test_summary();
}
