/* brown.h - the Brown corpus as `make data` writes it: data/brown/{train,val}/<genre>.txt.
 * Shared by the examples that train language models (static functions; include it in the one
 * .c file that uses it).
 *
 *   brown_corpus cp;
 *   if (!brown_load(&cp, "data/brown", "news,fiction")) return 1;   (NULL or "": all 15)
 *   ... cp.train[g], cp.train_len[g], cp.val[g], cp.names[g] for g < cp.n ...
 *   brown_free(&cp);
 */
#ifndef BROWN_H
#define BROWN_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define BROWN_FN static __attribute__((unused)) /* an example may use only some of them */
#else
#define BROWN_FN static
#endif

#define BROWN_GENRES 15
/* the 15 categories a..r in corpus order */
static const char *const brown_genres[BROWN_GENRES] = {
    "news", "editorial", "reviews", "religion", "hobbies", "lore", "belles-lettres", "government",
    "learned", "fiction", "mystery", "science-fiction", "adventure", "romance", "humor"};

typedef struct brown_corpus {
    int n;                                         /* genres loaded             */
    const char *names[BROWN_GENRES];
    unsigned char *train[BROWN_GENRES], *val[BROWN_GENRES];
    size_t train_len[BROWN_GENRES], val_len[BROWN_GENRES];
} brown_corpus;

/* the whole file in a malloc'ed buffer, NULL when it cannot be read */
BROWN_FN unsigned char *brown_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    long n;
    unsigned char *b;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return NULL; }
    b = (unsigned char *)malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    fclose(f);
    if (b) *len = (size_t)n;
    return b;
}

/* is `name` an item of the comma-separated list? */
BROWN_FN int brown_listed(const char *list, const char *name) {
    const char *p = strstr(list, name);
    size_t k = strlen(name);
    while (p) {
        if ((p == list || p[-1] == ',') && (p[k] == ',' || p[k] == 0)) return 1;
        p = strstr(p + 1, name);
    }
    return 0;
}

BROWN_FN void brown_free(brown_corpus *cp) {
    int g;
    for (g = 0; g < cp->n; g++) { free(cp->train[g]); free(cp->val[g]); }
    memset(cp, 0, sizeof *cp);
}

/* loads the listed genres (NULL or "": all) in corpus order; prints why and returns 0 on failure */
BROWN_FN int brown_load(brown_corpus *cp, const char *dir, const char *genres) {
    int g;
    char path[1024];
    memset(cp, 0, sizeof *cp);
    for (g = 0; g < BROWN_GENRES; g++) {
        const char *name = brown_genres[g];
        if (genres && genres[0] && !brown_listed(genres, name)) continue;
        snprintf(path, sizeof path, "%s/train/%s.txt", dir, name);
        cp->train[cp->n] = brown_read_file(path, &cp->train_len[cp->n]);
        snprintf(path, sizeof path, "%s/val/%s.txt", dir, name);
        cp->val[cp->n] = brown_read_file(path, &cp->val_len[cp->n]);
        cp->names[cp->n] = name;
        if (!cp->train[cp->n++] || !cp->val[cp->n - 1]) {
            fprintf(stderr, "cannot read %s/{train,val}/%s.txt: run `make data` first (it fetches the Brown corpus)\n", dir, name);
            brown_free(cp);
            return 0;
        }
    }
    if (cp->n == 0) { fprintf(stderr, "no genre matches '%s'\n", genres ? genres : ""); return 0; }
    return 1;
}

#endif /* BROWN_H */
