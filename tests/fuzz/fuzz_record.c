/* fuzz_record.c - moe_record_read, the reader of the named-field records that hold a model's
 * config and an example's training state (train_lm's resume blob), on arbitrary bytes, against
 * a table with every field type and size. A refused record has a sentence and leaves the
 * object untouched; an accepted one ends its text fields inside their arrays, and written back
 * it reads back to the same object. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "fuzz.h"
#include <stddef.h>
#include <string.h>

typedef struct state {
    signed char i1;
    short i2;
    int i4;
    long long i8;
    unsigned long long u8;
    float f4;
    double f8;
    char text[16];
    char genres[256];
} state;

#define F(type, member) MOE_FIELD(type, state, member)
static const moe_field fields[] = {
    F(MOE_FIELD_INT, i1),    F(MOE_FIELD_INT, i2),   F(MOE_FIELD_INT, i4),    F(MOE_FIELD_INT, i8),  F(MOE_FIELD_INT, u8),
    F(MOE_FIELD_FLOAT, f4),  F(MOE_FIELD_FLOAT, f8), F(MOE_FIELD_TEXT, text), F(MOE_FIELD_TEXT, genres),
};
#undef F
#define N_FIELDS ((int)(sizeof fields / sizeof fields[0]))

static state start(void) {
    state s;
    memset(&s, 0, sizeof s); /* padding too, so memcmp compares values */
    s.i1 = -3; s.i2 = 300; s.i4 = 600; s.i8 = -1; s.u8 = 42; s.f4 = 2e-3f; s.f8 = 0.5;
    strcpy(s.text, "abc");
    strcpy(s.genres, "news,fiction");
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static unsigned char again[1 << 16];
    state s = start(), before = start(), t = start(), dflt = start();
    size_t used = 0, len = 0;
    moe_err err;
    err.msg[0] = 0;
    if (moe_record_read(&s, &used, data, size, fields, N_FIELDS, &err) != MOE_OK) {
        if (!err.msg[0] || memcmp(&s, &before, sizeof s) != 0) abort(); /* silent, or half-read */
        return 0;
    }
    if (used > size || !memchr(s.text, 0, sizeof s.text) || !memchr(s.genres, 0, sizeof s.genres)) abort();
    /* what was read, written back, reads back to itself */
    if (moe_record_write(again, sizeof again, &len, &s, &dflt, fields, N_FIELDS, &err) != MOE_OK) abort();
    if (moe_record_read(&t, &used, again, len, fields, N_FIELDS, &err) != MOE_OK || used != len) abort();
    if (s.i1 != t.i1 || s.i2 != t.i2 || s.i4 != t.i4 || s.i8 != t.i8 || s.u8 != t.u8) abort();
    if (memcmp(&s.f4, &t.f4, sizeof s.f4) != 0 || memcmp(&s.f8, &t.f8, sizeof s.f8) != 0) abort();
    if (strcmp(s.text, t.text) != 0 || strcmp(s.genres, t.genres) != 0) abort();
    return 0;
}
