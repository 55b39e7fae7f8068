/* make_seeds.c - writes the seed corpus of the fuzz targets into tests/fuzz/corpus/ (run by
 * `make fuzz-seeds`; the seeds are committed). Checkpoints of the layout fuzz_ckpt.c loads;
 * JSON documents and HH-RLHF lines of the shapes the readers accept and a few they refuse. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include <stdio.h>
#include <string.h>

static void write_text(const char *dir, const char *name, const char *text) {
    char p[512];
    FILE *f;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    f = fopen(p, "wb");
    if (!f) { perror(p); return; }
    fwrite(text, 1, strlen(text), f);
    fclose(f);
}

static void write_bytes(const char *dir, const char *name, const char *bytes, size_t n) {
    char p[512];
    FILE *f;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    f = fopen(p, "wb");
    if (!f) { perror(p); return; }
    fwrite(bytes, 1, n, f);
    fclose(f);
}
#define WRITE_ARGS(dir, name, lit) write_bytes(dir, name, lit, sizeof lit - 1) /* NULs kept: they split argv */

/* a record of fuzz_record.c's layout, with some fields missing and one unknown */
typedef struct seed_state { signed char i1; short i2; int i4; long long i8; unsigned long long u8; float f4; double f8; char text[16]; char genres[256]; } seed_state;

int main(int argc, char **argv) {
    const char *root = argc > 1 ? argv[1] : "tests/fuzz/corpus";
    char dir[512], p[600];
    moe_store S;
    moe_err err;
    size_t i;
    const char state[] = "rng+position";
    const char config[] = "config-blob";
    moe_store_init(&S);
    moe_store_add(&S, "w", 0, 3, 4, 0, 0);
    moe_store_add(&S, "b", 0, 4, 0, 0, 0);
    if (moe_store_alloc(&S, 1) != MOE_OK) return 1;
    for (i = 0; i < S.numel; i++) {
        S.params[i] = 0.25f * (float)i - 1.0f;
        S.adam_m[i] = 0.01f * (float)i;
        S.adam_v[i] = 0.001f * (float)i;
    }
    snprintf(dir, sizeof dir, "%s/ckpt", root);
    snprintf(p, sizeof p, "%s/plain.bin", dir);
    if (moe_checkpoint_save(p, &S, 0, 7, NULL, 0, NULL, 0, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
    snprintf(p, sizeof p, "%s/moments_blobs.bin", dir);
    if (moe_checkpoint_save(p, &S, 1, 123, config, sizeof config, state, sizeof state, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
    snprintf(dir, sizeof dir, "%s/safetensors", root);
    snprintf(p, sizeof p, "%s/f32.safetensors", dir);
    if (moe_safetensors_save(p, &S, MOE_DTYPE_F32, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
    snprintf(p, sizeof p, "%s/bf16.safetensors", dir);
    if (moe_safetensors_save(p, &S, MOE_DTYPE_BF16, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
    moe_store_free(&S);
    { /* model files: a tiny dense model and a tiny MoE one */
        moe_model m;
        moe_model_config c = moe_model_config_default();
        int moe;
        c.vocab = 16; c.max_seq = 8; c.d = 8; c.n_layers = 1; c.n_heads = 2; c.d_ff = 8; c.moe_every = 0;
        snprintf(dir, sizeof dir, "%s/model", root);
        for (moe = 0; moe < 2; moe++) {
            if (moe) { c.moe.n_experts = 2; c.moe.top_k = 1; c.moe.d_ff = 4; c.moe_every = 1; }
            if (moe_model_init(&m, &c, 1, 8) != MOE_OK) { fprintf(stderr, "%s\n", m.err.msg); return 1; }
            moe_model_init_weights(&m, 1);
            snprintf(p, sizeof p, "%s/%s.moe", dir, moe ? "moe" : "dense");
            if (moe_model_save(&m, p, moe, 3, NULL, 0, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
            moe_model_free(&m);
        }
    }

    snprintf(dir, sizeof dir, "%s/json", root);
    write_text(dir, "object.json", "{\"a\": [1, 2.5e-3, -0, true, false, null], \"b\": {\"c\": \"d\\u00e9\\ud83d\\ude00\\n\"}}");
    write_text(dir, "hh.jsonl", "{\"chosen\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Hello there.\", \"rejected\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Go away.\"}");
    write_text(dir, "lone_surrogate.json", "[\"\\udc00x\", \"\\\"\\\\\\/\\b\\f\\r\\t\"]");
    write_text(dir, "deep.json", "[[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]");
    write_text(dir, "bad_trailing_comma.json", "{\"a\": 1,}");
    write_text(dir, "empty.json", "");

    snprintf(dir, sizeof dir, "%s/rows", root);
    write_text(dir, "ratings.csv", "id,response,helpfulness,score\n1,\"a, \"\"quoted\"\"\nline\",3.5,NA\n2,plain,,1e-3\r\n");
    write_text(dir, "ratings.jsonl", "{\"response\": \"x\", \"helpfulness\": 2, \"score\": null}\n{\"response\": \"y\", \"score\": true}\n");
    write_text(dir, "bad_number.csv", "response,helpfulness,score\nx,1.5.2,3\n");

    snprintf(dir, sizeof dir, "%s/flags", root);
    WRITE_ARGS(dir, "run.args", "--steps\0" "20\0--lr=3e-4\0--router\0ec\0--quick\0a.csv\0b.csv");
    WRITE_ARGS(dir, "help.args", "--out\0x\0-h");
    WRITE_ARGS(dir, "bad_int.args", "--seed\0" "3abc");
    WRITE_ARGS(dir, "edge_float.args", "--frac=0.1\0--big\0" "1e300\0--margin\0-1e308\0--temp\0" "1e-6");
    WRITE_ARGS(dir, "dashdash.args", "--\0--steps\0-");

    { /* state records: written by moe_record_write from a table like the fuzz target's */
        static const moe_field f[] = {
            MOE_FIELD(MOE_FIELD_INT, seed_state, i1), MOE_FIELD(MOE_FIELD_INT, seed_state, i2),
            MOE_FIELD(MOE_FIELD_INT, seed_state, i4), MOE_FIELD(MOE_FIELD_INT, seed_state, i8),
            MOE_FIELD(MOE_FIELD_INT, seed_state, u8), MOE_FIELD(MOE_FIELD_FLOAT, seed_state, f4),
            MOE_FIELD(MOE_FIELD_FLOAT, seed_state, f8), MOE_FIELD(MOE_FIELD_TEXT, seed_state, text),
            MOE_FIELD(MOE_FIELD_TEXT, seed_state, genres),
        };
        static const moe_field renamed[] = {MOE_FIELD(MOE_FIELD_INT, seed_state, i4), {"unknown.later", MOE_FIELD_FLOAT, 0, 8}};
        seed_state s;
        unsigned char buf[1024];
        size_t len;
        memset(&s, 0, sizeof s);
        s.i1 = 5; s.i2 = -2; s.i4 = 123456; s.i8 = -7; s.u8 = 99; s.f4 = 0.25f; s.f8 = -1e300;
        strcpy(s.text, "hello"); strcpy(s.genres, "a,b,c");
        snprintf(dir, sizeof dir, "%s/record", root);
        if (moe_record_write(buf, sizeof buf, &len, &s, NULL, f, 9, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
        write_bytes(dir, "full.rec", (const char *)buf, len);
        if (moe_record_write(buf, sizeof buf, &len, &s, NULL, f + 2, 4, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
        write_bytes(dir, "partial.rec", (const char *)buf, len);
        if (moe_record_write(buf, sizeof buf, &len, &s, NULL, renamed, 2, &err) != MOE_OK) { fprintf(stderr, "%s\n", err.msg); return 1; }
        write_bytes(dir, "unknown_field.rec", (const char *)buf, len);
    }
    return 0;
}
