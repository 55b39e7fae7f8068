/* fuzz_model.c - moe.h's model files (moe_model_load_config, moe_model_load) on arbitrary
 * files; half of the inputs get their trailing CRC-32 recomputed so mutations reach the config
 * record and the tensor checks behind the checksum. Every error has a sentence and leaves the
 * model freed; a loaded model runs a forward. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "fuzz.h"
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char path[64];
    moe_model m;
    moe_model_config c;
    moe_err err;
    FILE *f;
    if (!path[0]) fuzz_temp_path(path, sizeof path, "model.moe");
    f = fopen(path, "wb");
    if (!f) abort();
    if (size > 0) fwrite(data, 1, size, f);
    if ((size & 1) && size >= 8) {
        uint32_t crc = moe_crc32(0, data, size - 4);
        unsigned char b[4];
        int i;
        for (i = 0; i < 4; i++) b[i] = (unsigned char)(crc >> (8 * i));
        fseek(f, (long)(size - 4), SEEK_SET);
        fwrite(b, 1, 4, f);
    }
    fclose(f);
    err.msg[0] = 0;
    if (moe_model_load_config(path, &c, NULL, &err) != MOE_OK && !err.msg[0]) abort();
    err.msg[0] = 0;
    if (moe_model_load(&m, path, 1, 8, NULL, NULL, 0, &err) == MOE_OK) {
        int in[8], t, T = m.cfg.max_seq < 8 ? m.cfg.max_seq : 8;
        for (t = 0; t < 8; t++) in[t] = t % m.cfg.vocab;
        if (T > 0) (void)moe_model_forward(&m, in, in, 1, T, NULL);
        moe_model_free(&m);
    } else if (!err.msg[0]) {
        abort();
    }
    remove(path);
    return 0;
}
