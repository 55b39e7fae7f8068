/* fuzz_ckpt.c - moe.h's checkpoint reader (moe_checkpoint_info / _blobs / _load) on arbitrary
 * files. Half of the inputs get their trailing CRC-32 recomputed, so mutations reach the parsing
 * behind the checksum. Properties: no crash or sanitizer report; every error has a sentence;
 * a failed load leaves the store's parameters and moments byte-identical. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "fuzz.h"
#include <string.h>
#include <unistd.h>

static moe_store S;
static float *snapshot;
static char path[64];

static void setup(void) { /* the layout the seeds were written with (tests/fuzz/make_seeds.c) */
    size_t i;
    moe_store_init(&S);
    moe_store_add(&S, "w", 0, 3, 4, 0, 0);
    moe_store_add(&S, "b", 0, 4, 0, 0, 0);
    if (moe_store_alloc(&S, 1) != MOE_OK) abort();
    for (i = 0; i < S.numel; i++) S.params[i] = (float)i;
    snapshot = (float *)malloc(sizeof(float) * S.numel * 3);
    fuzz_temp_path(path, sizeof path, "ckpt.bin");
}

static int unchanged(void) {
    return memcmp(snapshot, S.params, sizeof(float) * S.numel) == 0 &&
           memcmp(snapshot + S.numel, S.adam_m, sizeof(float) * S.numel) == 0 &&
           memcmp(snapshot + 2 * S.numel, S.adam_v, sizeof(float) * S.numel) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_ckpt_info info;
    moe_err err;
    long long step = 0;
    FILE *f;
    if (!snapshot) setup();
    f = fopen(path, "wb");
    if (!f) abort();
    if (size > 0) fwrite(data, 1, size, f);
    if ((size & 1) && size >= 8) { /* recompute the CRC over everything before the last 4 bytes */
        uint32_t crc = moe_crc32(0, data, size - 4);
        unsigned char c[4];
        int i;
        for (i = 0; i < 4; i++) c[i] = (unsigned char)(crc >> (8 * i));
        fseek(f, (long)(size - 4), SEEK_SET);
        fwrite(c, 1, 4, f);
    }
    fclose(f);
    memcpy(snapshot, S.params, sizeof(float) * S.numel);
    memcpy(snapshot + S.numel, S.adam_m, sizeof(float) * S.numel);
    memcpy(snapshot + 2 * S.numel, S.adam_v, sizeof(float) * S.numel);

    err.msg[0] = 0;
    if (moe_checkpoint_info(path, &info, &err) == MOE_OK) {
        if (info.config_bytes < (1u << 16) && info.state_bytes < (1u << 16)) {
            void *cfg = malloc((size_t)info.config_bytes + 1), *st = malloc((size_t)info.state_bytes + 1);
            err.msg[0] = 0;
            if (moe_checkpoint_blobs(path, cfg, (size_t)info.config_bytes, st, (size_t)info.state_bytes, &err) != MOE_OK &&
                !err.msg[0])
                abort();
            free(cfg);
            free(st);
        }
    } else if (!err.msg[0]) {
        abort();
    }
    err.msg[0] = 0;
    if (moe_checkpoint_load(path, &S, &step, NULL, NULL, 0, NULL, 0, &err) != MOE_OK) {
        if (!err.msg[0] || !unchanged()) abort();
    }
    remove(path);
    return 0;
}
