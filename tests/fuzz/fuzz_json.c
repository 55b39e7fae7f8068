/* fuzz_json.c - reward.h's JSON parser (rwd_json_parse) and the HH-RLHF line reader on
 * arbitrary bytes: every input must parse or return a status with a sentence, and a parsed
 * document must be walkable to its last node. */
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h"
#include "fuzz.h"
#include <string.h>

static size_t walk(const rwd_json *doc, const rwd_json_node *n, int depth) {
    size_t count = 1;
    const rwd_json_node *c;
    if (depth > 10000) abort(); /* a cycle in the links */
    if (n->type == RWD_JSON_STRING && strlen(rwd_json_string(doc, n)) > n->str_len) abort();
    for (c = rwd_json_child(doc, n); c; c = rwd_json_next(doc, c)) count += walk(doc, c, depth + 1);
    return count;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    rwd_json doc;
    rwd_text_pairs pairs;
    moe_err err;
    memset(&doc, 0, sizeof doc);
    memset(&pairs, 0, sizeof pairs);
    err.msg[0] = 0;
    if (rwd_json_parse(&doc, (const char *)data, size, 1, &err) == MOE_OK) {
        if (walk(&doc, rwd_json_root(&doc), 0) != doc.n_nodes) abort();
    } else if (!err.msg[0]) {
        abort(); /* an error without its sentence */
    }
    err.msg[0] = 0;
    if (rwd_hh_parse_line(&pairs, &doc, (const char *)data, size, 1, &err) != MOE_OK && !err.msg[0]) abort();
    rwd_text_pairs_free(&pairs);
    rwd_json_free(&doc);
    return 0;
}
