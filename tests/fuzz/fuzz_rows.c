/* fuzz_rows.c - reward.h's rating-row readers (rwd_rows_parse_csv / _jsonl) on arbitrary text:
 * every input parses or returns a status with a sentence; parsed rows hold finite numbers or
 * NaN (missing) and NUL-terminated texts. */
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h"
#include "fuzz.h"
#include <math.h>
#include <string.h>

static void check(const rwd_rows *r) {
    size_t i;
    int j;
    for (i = 0; i < r->n; i++) {
        for (j = 0; j < r->n_num; j++) {
            double v = r->num[i * (size_t)r->n_num + j];
            if (v == v && !isfinite(v)) abort(); /* only finite numbers or NaN (missing) */
        }
        for (j = 0; j < r->n_text; j++)
            if (!r->text[i * (size_t)r->n_text + j]) abort();
        (void)strlen(r->n_text ? r->text[i * (size_t)r->n_text] : "");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char *const num[2] = {"helpfulness", "score"};
    static const char *const txt[1] = {"response"};
    rwd_rows r;
    moe_err err;
    int pass;
    for (pass = 0; pass < 2; pass++) {
        moe_status st;
        memset(&r, 0, sizeof r);
        err.msg[0] = 0;
        st = pass == 0 ? rwd_rows_parse_csv(&r, (const char *)data, size, num, 2, txt, 1, &err)
                       : rwd_rows_parse_jsonl(&r, (const char *)data, size, num, 2, txt, 1, &err);
        if (st == MOE_OK) check(&r);
        else if (!err.msg[0]) abort();
        rwd_rows_free(&r);
    }
    return 0;
}
