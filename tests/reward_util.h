/* reward_util.h - helpers shared by the tests/test_reward_*.c programs: numeric CSV tables
 * and reading compressed data files from the shared data folder. Include after reward.h and
 * test.h, with _POSIX_C_SOURCE defined first (examples/files.h starts gzip and xz).
 *
 *   csv_table t;  csv_read(&t, "tests/ref/lowess_ref.csv");  csv_col(&t, "x")  (rows doubles)
 *   read_data(&text, &len, "preferences/hh-rlhf/helpful-base/test.jsonl.gz")
 *       (.gz/.xz through files_open_read: a gzip/xz child with an argument vector, no shell)
 */
#ifndef REWARD_UTIL_H
#define REWARD_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "examples/files.h" /* defines: files_open_read, files_close_read */

typedef struct csv_table {
    int cols, rows;
    char names[32][64];
    double *data; /* (cols, rows): column-major, so csv_col returns a contiguous array */
} csv_table;

/* a header line of names, then rows of numbers; returns 0 on success */
TEST_FN int csv_read(csv_table *t, const char *path) {
    FILE *f = fopen(path, "rb");
    char line[8192];
    int cap = 1024, r = 0;
    double *rowbuf;
    memset(t, 0, sizeof *t);
    if (!f) return -1;
    if (!fgets(line, sizeof line, f)) { fclose(f); return -1; }
    {
        char *tok = strtok(line, ",\r\n");
        while (tok && t->cols < 32) { snprintf(t->names[t->cols++], 64, "%s", tok); tok = strtok(NULL, ",\r\n"); }
    }
    rowbuf = (double *)malloc((size_t)cap * (size_t)t->cols * sizeof(double));
    while (rowbuf && fgets(line, sizeof line, f)) {
        char *p = line, *end;
        int c;
        if (r == cap) {
            cap *= 2;
            rowbuf = (double *)realloc(rowbuf, (size_t)cap * (size_t)t->cols * sizeof(double));
            if (!rowbuf) break;
        }
        for (c = 0; c < t->cols; c++) {
            rowbuf[(size_t)r * (size_t)t->cols + (size_t)c] = strtod(p, &end);
            p = end + (*end == ',');
        }
        r++;
    }
    fclose(f);
    if (!rowbuf) return -1;
    t->rows = r;
    t->data = (double *)malloc((size_t)r * (size_t)t->cols * sizeof(double) + 1);
    if (t->data) {
        int c, i;
        for (c = 0; c < t->cols; c++)
            for (i = 0; i < r; i++) t->data[(size_t)c * (size_t)r + (size_t)i] = rowbuf[(size_t)i * (size_t)t->cols + (size_t)c];
    }
    free(rowbuf);
    return t->data ? 0 : -1;
}

TEST_FN double *csv_col(const csv_table *t, const char *name) {
    int c;
    for (c = 0; c < t->cols; c++)
        if (strcmp(t->names[c], name) == 0) return t->data + (size_t)c * (size_t)t->rows;
    return NULL;
}

TEST_FN void csv_free(csv_table *t) { free(t->data); memset(t, 0, sizeof *t); }

/* The whole of <shared data>/rel, decompressed with gzip/xz by suffix. 0 on success;
 * 1 (and a SKIP line) when the shared data folder is absent; -1 on error. */
TEST_FN int read_data(char **text, size_t *len, const char *rel) {
    const char *root = test_shared_data();
    char path[2048];
    files_reader r;
    files_err fe;
    FILE *f;
    moe_err err;
    int rc;
    *text = NULL;
    *len = 0;
    if (!root) {
        printf("SKIP %s: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n", rel);
        return 1;
    }
    snprintf(path, sizeof path, "%s/%s", root, rel);
    f = files_open_read(&r, path, &fe);
    if (!f) { printf("%s\n", fe.msg); return -1; }
    rc = rwd_read_all(f, text, len, &err) == MOE_OK ? 0 : -1;
    if (rc) printf("reading %s failed: %s\n", path, err.msg);
    if (files_close_read(&r, &fe) != 0) { printf("%s\n", fe.msg); rc = -1; }
    return rc;
}

#endif
