/* test_reward_text.c - reward.h section 1 (text): UTF-8 code points, the JSON parser (escapes,
 * surrogate pairs, strictness, error line numbers), the HH-RLHF line reader and bad input. */
#define _POSIX_C_SOURCE 200809L
#include "reward.h" /* defines: rwd_json_*, rwd_utf8_length, rwd_hh_*, rwd_text_pairs_* */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, test_summary */

static moe_status parse(rwd_json *d, const char *s, moe_err *err) { return rwd_json_parse(d, s, strlen(s), 1, err); }

static void test_utf8(void) {
    TEST_BEGIN("code points, not bytes");
    CHECK(rwd_utf8_length("abc", 3) == 3, "ASCII");
    CHECK(rwd_utf8_length("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80", 14) == 9, "2-, 3- and 4-byte sequences count once");
}

static void test_json_values(void) {
    rwd_json d;
    moe_err err;
    const rwd_json_node *r, *c;
    const char *s;
    memset(&d, 0, sizeof d);
    TEST_BEGIN("JSON values, escapes and surrogate pairs");
    CHECK(parse(&d, " {\"a\": [1, -2.5e3, true, false, null], \"b\": \"x\", \"a\": 7} ", &err) == MOE_OK, "%s", err.msg);
    r = rwd_json_root(&d);
    CHECK(r->type == RWD_JSON_OBJECT && r->count == 3, "object with 3 members");
    c = rwd_json_member(&d, r, "a");
    CHECK(c && c->type == RWD_JSON_NUMBER && c->number == 7, "a repeated key takes the last value, as Python");
    c = rwd_json_child(&d, rwd_json_child(&d, r));
    CHECK(c && c->number == 1 && rwd_json_next(&d, c)->number == -2500.0, "array numbers");
    CHECK(rwd_json_next(&d, rwd_json_next(&d, c))->type == RWD_JSON_TRUE, "true");
    CHECK(parse(&d, "\"q\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\u20ac\\ud83d\\ude00\"", &err) == MOE_OK, "%s", err.msg);
    s = rwd_json_string(&d, rwd_json_root(&d));
    CHECK(s && strcmp(s, "q\"\\/\b\f\n\r\t\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80") == 0, "every escape decoded");
    CHECK(rwd_utf8_length(s, rwd_json_root(&d)->str_len) == 12, "the surrogate pair is one code point (%zu)",
          rwd_utf8_length(s, rwd_json_root(&d)->str_len));
    CHECK(parse(&d, "\"\\ud83d!\"", &err) == MOE_OK && rwd_utf8_length(rwd_json_string(&d, rwd_json_root(&d)), rwd_json_root(&d)->str_len) == 2,
          "a lone surrogate counts as one code point, as Python");
    CHECK(parse(&d, "\"\xe2\x82\xac\"", &err) == MOE_OK && rwd_json_root(&d)->str_len == 3, "raw UTF-8 is kept");
    CHECK(parse(&d, "[]", &err) == MOE_OK && rwd_json_root(&d)->count == 0 && !rwd_json_child(&d, rwd_json_root(&d)), "empty array");
    rwd_json_free(&d);
}

static void test_json_errors(void) {
    static const char *const bad[] = {
        "", "{", "[1,]", "{\"a\" 1}", "{\"a\":1,}", "tru", "01", "1.", "1e", "-", "\"abc", "\"a\\x\"",
        "\"\\u12g4\"", "\"a\nb\"", "[1] 2", "{1:2}", "nul", "+1"};
    rwd_json d;
    moe_err err;
    size_t i;
    char deep[600];
    memset(&d, 0, sizeof d);
    TEST_BEGIN("malformed JSON gives a status and a sentence with the line");
    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err.msg[0] = 0;
        CHECK(parse(&d, bad[i], &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 1"), "'%s' must fail with a line number: %s", bad[i], err.msg);
    }
    CHECK(rwd_json_parse(&d, "{\n\"a\": 1,\n\"b\": ?}", 17, 40, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 42"),
          "the error names the line of the fault: %s", err.msg);
    memset(deep, '[', sizeof deep);
    CHECK(rwd_json_parse(&d, deep, sizeof deep, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "deeper"), "deep nesting is refused: %s", err.msg);
    rwd_json_free(&d);
}

static void test_hh_lines(void) {
    const char *good = "{\"chosen\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Hello!\\n\\nHuman: More?\\n\\nAssistant: Sure \\u00e9\", "
                       "\"rejected\": \"\\n\\nHuman: Hi?\\n\\nAssistant: Hello!\\n\\nHuman: More?\\n\\nAssistant: No\"}\n";
    rwd_text_pairs p;
    moe_err err;
    FILE *f = tmpfile();
    memset(&p, 0, sizeof p);
    TEST_BEGIN("HH-RLHF lines: final turn, prompt, bad lines with their line number");
    CHECK(f != NULL, "tmpfile");
    if (!f) return;
    fputs(good, f);
    fputs(good, f);
    rewind(f);
    CHECK(rwd_hh_read(&p, f, &err) == MOE_OK && p.n == 2, "two pairs: %s", err.msg);
    if (p.n == 2) {
        CHECK(strcmp(p.chosen[1], " Sure \xc3\xa9") == 0 && strcmp(p.rejected[1], " No") == 0, "final responses keep the leading space");
        CHECK(rwd_utf8_length(p.chosen[1], strlen(p.chosen[1])) == 7, "code points of the response");
        CHECK(strcmp(p.prompt[0], "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: More?\n\nAssistant:") == 0, "prompt ends at the last marker");
    }
    rwd_text_pairs_free(&p);
    fclose(f);
    f = tmpfile();
    if (!f) return;
    fputs(good, f);
    fputs("\n{\"chosen\": \"x\\n\\nAssistant: a\", \"rejected\": 5}\n", f);
    rewind(f);
    CHECK(rwd_hh_read(&p, f, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 3"), "a non-string field names line 3: %s", err.msg);
    rwd_text_pairs_free(&p);
    fclose(f);
    f = tmpfile();
    if (!f) return;
    fputs(good, f);
    fputs("{\"chosen\": \"no marker\", \"rejected\": \"x\\n\\nAssistant: b\"", f);
    rewind(f);
    CHECK(rwd_hh_read(&p, f, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 2"), "a truncated line names line 2: %s", err.msg);
    rwd_text_pairs_free(&p);
    fclose(f);
    f = tmpfile();
    if (!f) return;
    CHECK(rwd_hh_read(&p, f, &err) == MOE_ERR_FORMAT && strstr(err.msg, "empty"), "an empty file is an error: %s", err.msg);
    fclose(f);
}

int main(void) {
    test_utf8();
    test_json_values();
    test_json_errors();
    test_hh_lines();
    return test_summary();
}
