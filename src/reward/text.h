/* ============================================================================================
   >>rwd:text  UTF-8 code points, JSON, HH-RLHF pairs
   ============================================================================================ */

/* Unicode code points in n bytes of UTF-8 (bytes that do not continue a sequence), which is
   Python's len(str) for valid UTF-8 and for the WTF-8 that rwd_json writes for lone surrogates. */
RWDDEF size_t rwd_utf8_length(const char *s, size_t n);

typedef enum rwd_json_type {
    RWD_JSON_NULL = 0, RWD_JSON_FALSE, RWD_JSON_TRUE, RWD_JSON_NUMBER, RWD_JSON_STRING,
    RWD_JSON_ARRAY, RWD_JSON_OBJECT
} rwd_json_type;

/* One value of a parsed document. Nodes live in one array; links are indices into it. */
typedef struct rwd_json_node {
    int type;       /* rwd_json_type                                                        */
    int line;       /* input line where the value starts, 1-based (for messages)            */
    double number;  /* RWD_JSON_NUMBER                                                      */
    size_t str;     /* RWD_JSON_STRING: offset of its decoded, NUL-terminated UTF-8 text     */
    size_t str_len; /*   in rwd_json.strings, and its length in bytes                        */
    size_t key;     /* member of an object: offset of its decoded key; (size_t)-1 otherwise  */
    size_t count;   /* ARRAY, OBJECT: number of children                                     */
    size_t first;   /* ARRAY, OBJECT: index of the first child; 0 = none (0 is the root)     */
    size_t next;    /* index of the next sibling; 0 = none                                  */
} rwd_json_node;

/* A parsed document; reuse one across many lines to keep its buffers. Zero it to start. */
typedef struct rwd_json {
    rwd_json_node *nodes; /* (n_nodes) nodes[0] is the root                                 */
    size_t n_nodes, cap_nodes;
    char *strings;        /* (n_strings) decoded strings and keys, each NUL-terminated       */
    size_t n_strings, cap_strings;
} rwd_json;

/* Parses one JSON value (RFC 8259, strict: no trailing commas, no comments, control bytes in
   strings rejected). Strings are decoded fully: every escape, \uXXXX with surrogate pairs to
   UTF-8; a lone surrogate is kept as its 3-byte WTF-8 form so code-point counts match Python.
   first_line: the line number of text[0] in the caller's file (errors cite it). */
RWDDEF moe_status rwd_json_parse(rwd_json *doc, const char *text, size_t len, int first_line, moe_err *err);
RWDDEF void rwd_json_free(rwd_json *doc);
RWDDEF const rwd_json_node *rwd_json_root(const rwd_json *doc);
RWDDEF const rwd_json_node *rwd_json_child(const rwd_json *doc, const rwd_json_node *n); /* or NULL */
RWDDEF const rwd_json_node *rwd_json_next(const rwd_json *doc, const rwd_json_node *n);  /* or NULL */
/* the member `key` of an object (the last one if repeated, as Python), or NULL */
RWDDEF const rwd_json_node *rwd_json_member(const rwd_json *doc, const rwd_json_node *obj, const char *key);
RWDDEF const char *rwd_json_string(const rwd_json *doc, const rwd_json_node *n); /* NULL unless STRING */

/* Preference pairs as text: a shared prompt (conversation so far) and two final responses. */
typedef struct rwd_text_pairs {
    char **prompt;   /* (n) NUL-terminated UTF-8, owned                          */
    char **chosen;   /* (n) the preferred final response                         */
    char **rejected; /* (n) the other final response                             */
    size_t n, cap;
} rwd_text_pairs; /* zero it to start */

RWDDEF moe_status rwd_text_pairs_add(rwd_text_pairs *p, const char *prompt, size_t prompt_len,
                                     const char *chosen, size_t chosen_len, const char *rejected,
                                     size_t rejected_len, moe_err *err); /* copies the texts */
RWDDEF void rwd_text_pairs_free(rwd_text_pairs *p);
/* HH-RLHF dialogue: offset of the final response, the text after the last "\n\nAssistant:"
   (its leading space included, as the data README counts it); 0 if there is no marker. */
RWDDEF size_t rwd_hh_response_offset(const char *dialogue, size_t len);
/* One HH-RLHF JSON line {"chosen": dialogue, "rejected": dialogue} appended to p: prompt = the
   chosen dialogue up to its final response. line_no is used in error messages. */
RWDDEF moe_status rwd_hh_parse_line(rwd_text_pairs *p, rwd_json *doc, const char *line, size_t len,
                                    int line_no, moe_err *err);
#ifndef MOE_NO_STDIO
/* Reads a whole (decompressed) HH-RLHF .jsonl stream; errors name the line. */
RWDDEF moe_status rwd_hh_read(rwd_text_pairs *p, FILE *f, moe_err *err);
/* Reads a whole stream into a NUL-terminated buffer the caller frees with free()/MOE_FREE. */
RWDDEF moe_status rwd_read_all(FILE *f, char **text, size_t *len, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>rwd:text
   ============================================================================================ */

RWD__IMPL size_t rwd_utf8_length(const char *s, size_t n) {
    size_t i, count = 0;
    for (i = 0; i < n; i++) count += ((unsigned char)s[i] & 0xC0u) != 0x80u;
    return count;
}

/* Recursive-descent parser state. Depth is bounded so hostile input cannot exhaust the stack. */
typedef struct rwd__jp {
    const char *s;
    size_t len, pos;
    int line;
    rwd_json *doc;
    moe_err *err;
} rwd__jp;

enum { RWD__JSON_MAX_DEPTH = 256 };

static moe_status rwd__jerr(rwd__jp *p, const char *what) {
    return moe_err_set(p->err, MOE_ERR_FORMAT, "JSON line %d: %s", p->line, what);
}

static void rwd__jskip(rwd__jp *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c == '\n') p->line++;
        else if (c != ' ' && c != '\t' && c != '\r') break;
        p->pos++;
    }
}

static int rwd__grow(void **buf, size_t *cap, size_t need, size_t elem) {
    size_t ncap;
    void *nb;
    if (need <= *cap) return 1;
    ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    nb = MOE_MALLOC(ncap * elem);
    if (!nb) return 0;
    if (*buf) {
        memcpy(nb, *buf, *cap * elem);
        MOE_FREE(*buf);
    }
    *buf = nb;
    *cap = ncap;
    return 1;
}

static int rwd__jput(rwd_json *d, const char *bytes, size_t n) {
    if (n == 0) return 1; /* an empty run: d->strings may still be NULL, and NULL + 0 is undefined */
    if (!rwd__grow((void **)&d->strings, &d->cap_strings, d->n_strings + n, 1)) return 0;
    memcpy(d->strings + d->n_strings, bytes, n);
    d->n_strings += n;
    return 1;
}

static int rwd__jput_utf8(rwd_json *d, unsigned long cp) {
    char b[4];
    size_t n;
    if (cp < 0x80) { b[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { b[0] = (char)(0xC0 | (cp >> 6)); b[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12)); b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18)); b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); b[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    return rwd__jput(d, b, n);
}

static int rwd__jhex4(const char *s, unsigned long *v) {
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = s[i];
        int h = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (h < 0) return 0;
        *v = (*v << 4) | (unsigned long)h;
    }
    return 1;
}

/* Decodes the string at p->pos (at the opening quote) into doc->strings; *off, *n get it. */
static moe_status rwd__jstring(rwd__jp *p, size_t *off, size_t *n) {
    rwd_json *d = p->doc;
    size_t start = d->n_strings;
    p->pos++; /* opening quote */
    for (;;) {
        size_t run = p->pos;
        unsigned char c;
        while (run < p->len && (unsigned char)p->s[run] >= 0x20 && p->s[run] != '"' && p->s[run] != '\\') run++;
        if (!rwd__jput(d, p->s + p->pos, run - p->pos)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        p->pos = run;
        if (p->pos >= p->len) return rwd__jerr(p, "unterminated string");
        c = (unsigned char)p->s[p->pos];
        if (c == '"') { p->pos++; break; }
        if (c < 0x20) return rwd__jerr(p, "control character inside a string (must be escaped)");
        /* backslash escape */
        if (p->pos + 1 >= p->len) return rwd__jerr(p, "unterminated escape");
        c = (unsigned char)p->s[p->pos + 1];
        p->pos += 2;
        if (c == 'u') {
            unsigned long cp, lo;
            if (p->pos + 4 > p->len || !rwd__jhex4(p->s + p->pos, &cp)) return rwd__jerr(p, "bad \\u escape (needs 4 hex digits)");
            p->pos += 4;
            /* a high surrogate followed by an escaped low one is one code point */
            if (cp >= 0xD800 && cp <= 0xDBFF && p->pos + 6 <= p->len && p->s[p->pos] == '\\' &&
                p->s[p->pos + 1] == 'u' && rwd__jhex4(p->s + p->pos + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p->pos += 6;
            }
            if (!rwd__jput_utf8(d, cp)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        } else {
            char e;
            switch (c) {
            case '"': e = '"'; break;
            case '\\': e = '\\'; break;
            case '/': e = '/'; break;
            case 'b': e = '\b'; break;
            case 'f': e = '\f'; break;
            case 'n': e = '\n'; break;
            case 'r': e = '\r'; break;
            case 't': e = '\t'; break;
            default: return rwd__jerr(p, "unknown escape in a string");
            }
            if (!rwd__jput(d, &e, 1)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        }
    }
    *off = start;
    *n = d->n_strings - start;
    if (!rwd__jput(d, "", 1)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
    return MOE_OK;
}

static moe_status rwd__jnumber(rwd__jp *p, double *v) {
    char buf[512];
    size_t i = p->pos, n;
    const char *s = p->s;
    if (i < p->len && s[i] == '-') i++;
    if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "unexpected character (not a JSON value)");
    if (s[i] == '0') i++;
    else while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    if (i < p->len && s[i] == '.') {
        i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "a digit must follow the decimal point");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "a digit must follow the exponent");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    n = i - p->pos;
    if (n >= sizeof buf) return rwd__jerr(p, "number longer than 511 characters");
    memcpy(buf, s + p->pos, n); /* strtod needs a terminated copy: the input need not be */
    buf[n] = 0;
    *v = strtod(buf, NULL);
    p->pos = i;
    return MOE_OK;
}

static moe_status rwd__jvalue(rwd__jp *p, size_t *out, int depth);

static moe_status rwd__jnode(rwd__jp *p, size_t *out, int type) {
    rwd_json *d = p->doc;
    rwd_json_node *n;
    if (!rwd__grow((void **)&d->nodes, &d->cap_nodes, d->n_nodes + 1, sizeof *d->nodes))
        return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
    n = &d->nodes[d->n_nodes];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->line = p->line;
    n->key = (size_t)-1;
    *out = d->n_nodes++;
    return MOE_OK;
}

/* array or object: children are linked in order through `next` */
static moe_status rwd__jcontainer(rwd__jp *p, size_t self, int depth) {
    int is_obj = p->doc->nodes[self].type == RWD_JSON_OBJECT;
    char close = is_obj ? '}' : ']';
    size_t prev = 0, count = 0;
    moe_status st;
    p->pos++;
    rwd__jskip(p);
    if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; return MOE_OK; }
    for (;;) {
        size_t child, key = (size_t)-1, key_len;
        rwd__jskip(p);
        if (is_obj) {
            if (p->pos >= p->len || p->s[p->pos] != '"') return rwd__jerr(p, "expected a string key in an object");
            if ((st = rwd__jstring(p, &key, &key_len)) != MOE_OK) return st;
            rwd__jskip(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return rwd__jerr(p, "expected ':' after an object key");
            p->pos++;
        }
        if ((st = rwd__jvalue(p, &child, depth + 1)) != MOE_OK) return st;
        p->doc->nodes[child].key = key;
        if (prev) p->doc->nodes[prev].next = child;
        else p->doc->nodes[self].first = child;
        prev = child;
        count++;
        rwd__jskip(p);
        if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; break; }
        return rwd__jerr(p, is_obj ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
    }
    p->doc->nodes[self].count = count;
    return MOE_OK;
}

static moe_status rwd__jvalue(rwd__jp *p, size_t *out, int depth) {
    moe_status st;
    char c;
    if (depth > RWD__JSON_MAX_DEPTH) return rwd__jerr(p, "nesting deeper than 256 levels");
    rwd__jskip(p);
    if (p->pos >= p->len) return rwd__jerr(p, "unexpected end of input (empty or truncated)");
    c = p->s[p->pos];
    if (c == '{' || c == '[') {
        if ((st = rwd__jnode(p, out, c == '{' ? RWD_JSON_OBJECT : RWD_JSON_ARRAY)) != MOE_OK) return st;
        return rwd__jcontainer(p, *out, depth);
    }
    if (c == '"') {
        size_t off, n;
        if ((st = rwd__jnode(p, out, RWD_JSON_STRING)) != MOE_OK) return st;
        if ((st = rwd__jstring(p, &off, &n)) != MOE_OK) return st;
        p->doc->nodes[*out].str = off;
        p->doc->nodes[*out].str_len = n;
        return MOE_OK;
    }
    {
        static const char *const words[3] = {"null", "false", "true"};
        int w;
        for (w = 0; w < 3; w++) {
            size_t wl = strlen(words[w]);
            if (p->len - p->pos >= wl && memcmp(p->s + p->pos, words[w], wl) == 0) {
                p->pos += wl;
                return rwd__jnode(p, out, RWD_JSON_NULL + w);
            }
        }
    }
    if ((st = rwd__jnode(p, out, RWD_JSON_NUMBER)) != MOE_OK) return st;
    return rwd__jnumber(p, &p->doc->nodes[*out].number);
}

RWD__IMPL moe_status rwd_json_parse(rwd_json *doc, const char *text, size_t len, int first_line, moe_err *err) {
    rwd__jp p;
    size_t root;
    moe_status st;
    if (!doc || (!text && len)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_json_parse needs a document and a text");
    doc->n_nodes = 0;
    doc->n_strings = 0;
    p.s = text; p.len = len; p.pos = 0; p.line = first_line; p.doc = doc; p.err = err;
    if ((st = rwd__jvalue(&p, &root, 0)) != MOE_OK) return st;
    rwd__jskip(&p);
    if (p.pos != p.len) return rwd__jerr(&p, "extra characters after the JSON value");
    return MOE_OK;
}

RWD__IMPL void rwd_json_free(rwd_json *doc) {
    MOE_FREE(doc->nodes);
    MOE_FREE(doc->strings);
    memset(doc, 0, sizeof *doc);
}

RWD__IMPL const rwd_json_node *rwd_json_root(const rwd_json *doc) { return doc->n_nodes ? &doc->nodes[0] : NULL; }

RWD__IMPL const rwd_json_node *rwd_json_child(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->first) ? &doc->nodes[n->first] : NULL;
}

RWD__IMPL const rwd_json_node *rwd_json_next(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->next) ? &doc->nodes[n->next] : NULL;
}

RWD__IMPL const rwd_json_node *rwd_json_member(const rwd_json *doc, const rwd_json_node *obj, const char *key) {
    const rwd_json_node *c, *found = NULL;
    if (!obj || obj->type != RWD_JSON_OBJECT) return NULL;
    for (c = rwd_json_child(doc, obj); c; c = rwd_json_next(doc, c))
        if (strcmp(doc->strings + c->key, key) == 0) found = c;
    return found;
}

RWD__IMPL const char *rwd_json_string(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->type == RWD_JSON_STRING) ? doc->strings + n->str : NULL;
}

static char *rwd__strndup(const char *s, size_t n) {
    char *d = (char *)MOE_MALLOC(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

RWD__IMPL moe_status rwd_text_pairs_add(rwd_text_pairs *p, const char *prompt, size_t prompt_len,
                                        const char *chosen, size_t chosen_len, const char *rejected,
                                        size_t rejected_len, moe_err *err) {
    char *a, *b, *c;
    if (p->n == p->cap) { /* the three arrays grow together */
        size_t cap = p->cap ? 2 * p->cap : 256;
        char **np = (char **)MOE_MALLOC(3 * cap * sizeof(char *));
        if (!np) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu text pairs", cap);
        if (p->n) {
            memcpy(np, p->prompt, p->n * sizeof(char *));
            memcpy(np + cap, p->chosen, p->n * sizeof(char *));
            memcpy(np + 2 * cap, p->rejected, p->n * sizeof(char *));
        }
        MOE_FREE(p->prompt);
        p->prompt = np; p->chosen = np + cap; p->rejected = np + 2 * cap;
        p->cap = cap;
    }
    a = rwd__strndup(prompt, prompt_len);
    b = rwd__strndup(chosen, chosen_len);
    c = rwd__strndup(rejected, rejected_len);
    if (!a || !b || !c) {
        MOE_FREE(a); MOE_FREE(b); MOE_FREE(c);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for a text pair");
    }
    p->prompt[p->n] = a; p->chosen[p->n] = b; p->rejected[p->n] = c;
    p->n++;
    return MOE_OK;
}

RWD__IMPL void rwd_text_pairs_free(rwd_text_pairs *p) {
    size_t i;
    for (i = 0; i < p->n; i++) {
        MOE_FREE(p->prompt[i]); MOE_FREE(p->chosen[i]); MOE_FREE(p->rejected[i]);
    }
    MOE_FREE(p->prompt); /* one block holds the three pointer arrays */
    memset(p, 0, sizeof *p);
}

RWD__IMPL size_t rwd_hh_response_offset(const char *dialogue, size_t len) {
    static const char marker[] = "\n\nAssistant:";
    const size_t m = sizeof marker - 1;
    size_t i;
    if (len < m) return 0;
    for (i = len - m + 1; i-- > 0;)
        if (memcmp(dialogue + i, marker, m) == 0) return i + m;
    return 0;
}

RWD__IMPL moe_status rwd_hh_parse_line(rwd_text_pairs *p, rwd_json *doc, const char *line, size_t len,
                                       int line_no, moe_err *err) {
    const rwd_json_node *root, *ch, *rj;
    const char *cs, *rs;
    size_t oc, orj;
    moe_status st = rwd_json_parse(doc, line, len, line_no, err);
    if (st != MOE_OK) return st;
    root = rwd_json_root(doc);
    ch = rwd_json_member(doc, root, "chosen");
    rj = rwd_json_member(doc, root, "rejected");
    cs = rwd_json_string(doc, ch);
    rs = rwd_json_string(doc, rj);
    if (!cs || !rs) return moe_err_set(err, MOE_ERR_FORMAT, "line %d: expected an object with string fields \"chosen\" and \"rejected\"", line_no);
    oc = rwd_hh_response_offset(cs, ch->str_len);
    orj = rwd_hh_response_offset(rs, rj->str_len);
    if (!oc || !orj) return moe_err_set(err, MOE_ERR_FORMAT, "line %d: a dialogue has no \"\\n\\nAssistant:\" turn", line_no);
    return rwd_text_pairs_add(p, cs, oc, cs + oc, ch->str_len - oc, rs + orj, rj->str_len - orj, err);
}

#ifndef MOE_NO_STDIO
RWD__IMPL moe_status rwd_read_all(FILE *f, char **text, size_t *len, moe_err *err) {
    char *buf = NULL;
    size_t n = 0, cap = 0, got;
    *text = NULL;
    *len = 0;
    if (!f) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_read_all: no stream");
    do {
        if (!rwd__grow((void **)&buf, &cap, n + 65536 + 1, 1)) {
            MOE_FREE(buf);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory after reading %zu bytes", n);
        }
        got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
    } while (got > 0);
    if (ferror(f)) {
        MOE_FREE(buf);
        return moe_err_set(err, MOE_ERR_IO, "read error after %zu bytes", n);
    }
    buf[n] = 0;
    *text = buf;
    *len = n;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_hh_read(rwd_text_pairs *p, FILE *f, moe_err *err) {
    char *text;
    size_t len, start = 0;
    int line_no = 1;
    rwd_json doc;
    moe_status st = rwd_read_all(f, &text, &len, err);
    if (st != MOE_OK) return st;
    memset(&doc, 0, sizeof doc);
    while (start < len && st == MOE_OK) {
        const char *nl = (const char *)memchr(text + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - text) : len, e = end;
        while (e > start && (text[e - 1] == '\r' || text[e - 1] == ' ' || text[e - 1] == '\t')) e--;
        if (e > start) st = rwd_hh_parse_line(p, &doc, text + start, e - start, line_no, err);
        start = end + 1;
        line_no++;
    }
    rwd_json_free(&doc);
    MOE_FREE(text);
    if (st == MOE_OK && p->n == 0) st = moe_err_set(err, MOE_ERR_FORMAT, "no preference pairs in the input (empty file?)");
    return st;
}
#endif

