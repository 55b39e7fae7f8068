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
    moe_store_free(&S);

    snprintf(dir, sizeof dir, "%s/json", root);
    write_text(dir, "object.json", "{\"a\": [1, 2.5e-3, -0, true, false, null], \"b\": {\"c\": \"d\\u00e9\\ud83d\\ude00\\n\"}}");
    write_text(dir, "hh.jsonl", "{\"chosen\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Hello there.\", \"rejected\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Go away.\"}");
    write_text(dir, "lone_surrogate.json", "[\"\\udc00x\", \"\\\"\\\\\\/\\b\\f\\r\\t\"]");
    write_text(dir, "deep.json", "[[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]");
    write_text(dir, "bad_trailing_comma.json", "{\"a\": 1,}");
    write_text(dir, "empty.json", "");
    return 0;
}
