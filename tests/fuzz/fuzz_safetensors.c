/* fuzz_safetensors.c - moe.h's safetensors reader (moe_safetensors_load) on arbitrary files,
 * into a store of the layout the seeds were written with. Every error has a sentence and
 * leaves the store unchanged; a success leaves only finite-or-not floats (no bounds escape). */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "fuzz.h"
#include <string.h>
#include <unistd.h>

static moe_store S;
static float *snapshot;
static char path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    moe_err err;
    FILE *f;
    if (!snapshot) { /* the layout of tests/fuzz/make_seeds.c */
        size_t i;
        moe_store_init(&S);
        moe_store_add(&S, "w", 0, 3, 4, 0, 0);
        moe_store_add(&S, "b", 0, 4, 0, 0, 0);
        if (moe_store_alloc(&S, 0) != MOE_OK) abort();
        for (i = 0; i < S.numel; i++) S.params[i] = (float)i;
        snapshot = (float *)malloc(sizeof(float) * S.numel);
        fuzz_temp_path(path, sizeof path, "st.safetensors");
    }
    f = fopen(path, "wb");
    if (!f) abort();
    if (size > 0) fwrite(data, 1, size, f);
    fclose(f);
    memcpy(snapshot, S.params, sizeof(float) * S.numel);
    err.msg[0] = 0;
    if (moe_safetensors_load(path, &S, &err) != MOE_OK)
        if (!err.msg[0] || memcmp(snapshot, S.params, sizeof(float) * S.numel) != 0) abort();
    remove(path);
    return 0;
}
