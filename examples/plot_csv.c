/* plot_csv.c - draw one column of several CSV logs against another, one series per file.
 *
 *   build/examples/plot_csv OUT.png --x step --y val_bpb [--title T] [--ylabel L] [--log]
 *                           run1.csv[=label] run2.csv[=label] ...
 *
 * Rows whose x or y cell is empty or not a number (nan) are skipped, so sparse columns such
 * as train_lm's val_bpb plot as lines through their points.
 */
#define _POSIX_C_SOURCE 200809L /* files.h */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "files.h" /* defines: files_check_input */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FILES 8

/* column index of `name` in a comma-separated header, or -1 */
static int column(char *header, const char *name) {
    int i = 0;
    char *tok = strtok(header, ",\r\n");
    while (tok) {
        if (strcmp(tok, name) == 0) return i;
        tok = strtok(NULL, ",\r\n");
        i++;
    }
    return -1;
}

/* the cell of column `c` in a CSV line (no quoting: these are our own logs) */
static int cell(const char *line, int c, double *out) {
    const char *p = line;
    char *end;
    while (c-- > 0) {
        p = strchr(p, ',');
        if (!p) return 0;
        p++;
    }
    *out = strtod(p, &end);
    return end != p && *out == *out;
}

/* The (x, y) numbers of one CSV file; 0, or 1 after saying why. */
static int read_series(const char *path, const char *xname, const char *yname, float **xs_out, float **ys_out, int *n_out) {
    static char line[1 << 16], header[1 << 16];
    files_err fe;
    FILE *f;
    int cx, cy, cap = 1024, n = 0, line_no = 1;
    float *xs = NULL, *ys = NULL;
    const char *bad = NULL;
    if (files_check_input(path, &fe) != 0) { fprintf(stderr, "plot_csv: %s\n", fe.msg); return 1; }
    f = fopen(path, "r");
    if (!f || !fgets(line, sizeof line, f)) {
        fprintf(stderr, "plot_csv: '%s' is empty: it needs a header line naming its columns\n", path);
        if (f) fclose(f);
        return 1;
    }
    strcpy(header, line);
    cx = column(line, xname);
    cy = column(header, yname);
    if (cx < 0 || cy < 0) {
        fprintf(stderr, "plot_csv: '%s' has no column '%s' in its header line\n", path, cx < 0 ? xname : yname);
        fclose(f);
        return 1;
    }
    xs = (float *)malloc(sizeof(float) * (size_t)cap);
    ys = (float *)malloc(sizeof(float) * (size_t)cap);
    if (!xs || !ys) bad = "out of memory";
    while (!bad && fgets(line, sizeof line, f)) {
        double vx, vy;
        line_no++;
        if (!strchr(line, '\n') && !feof(f)) { bad = "a line is too long"; break; }
        if (!cell(line, cx, &vx) || !cell(line, cy, &vy)) continue;
        if (n == cap) {
            float *nx = (float *)realloc(xs, sizeof(float) * (size_t)cap * 2), *ny;
            if (nx) xs = nx;
            ny = nx ? (float *)realloc(ys, sizeof(float) * (size_t)cap * 2) : NULL;
            if (ny) ys = ny;
            if (!nx || !ny) { bad = "out of memory"; break; }
            cap *= 2;
        }
        xs[n] = (float)vx;
        ys[n++] = (float)vy;
    }
    if (!bad && ferror(f)) bad = "a read error";
    if (!bad && n == 0) bad = "no rows with numbers in both columns";
    fclose(f);
    if (bad) {
        fprintf(stderr, "plot_csv: '%s' (x '%s', y '%s'), line %d: %s\n", path, xname, yname, line_no, bad);
        free(xs);
        free(ys);
        return 1;
    }
    *xs_out = xs;
    *ys_out = ys;
    *n_out = n;
    return 0;
}

static const char *const about =
    "Input: CSV files with a header line naming their columns, e.g. train_lm's logs; no quoting.\n"
    "Rows whose x or y cell is empty or not a number (nan) are skipped, so sparse columns such as\n"
    "train_lm's val_bpb plot as lines through their points. At most 8 files; FILE=label names a\n"
    "series (default: the file name). Writes OUT.png.\n"
    "  plot_csv out/val.png --y val_bpb out/moe.csv=MoE out/dense.csv=dense";

int main(int argc, char **argv) {
    const char *out = NULL, *xname = "step", *yname = NULL, *title = NULL, *ylabel = NULL;
    const char *files[MAX_FILES];
    plot_series s[MAX_FILES];
    plot_chart ch;
    int nf = 0, i, log_y = 0, rc;
    char labels[MAX_FILES][1024];
    {
        flag fl[5];
        flags_program p;
        const char *args[MAX_FILES + 1];
        fl[0] = flag_string("--x", &xname, "COL", "the x column");
        fl[1] = flag_string("--y", &yname, "COL", "the y column (required)");
        fl[2] = flag_default(flag_string("--title", &title, "T", "chart title"), "the y column");
        fl[3] = flag_default(flag_string("--ylabel", &ylabel, "L", "y axis label"), "the y column");
        fl[4] = flag_switch("--log", &log_y, "logarithmic y axis");
        p = flags_program_make("plot_csv", "draw one column of several CSV logs against another, one series per file", about, fl, 5);
        flags_positional(&p, args, MAX_FILES + 1, "OUT.png run1.csv[=label] ...");
        if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
        if (!yname || p.n_args < 2) {
            fprintf(stderr, "plot_csv: give --y COL, the output PNG and at least one CSV file (--help describes them)\n");
            return 2;
        }
        out = args[0];
        for (i = 1; i < p.n_args; i++) files[nf++] = args[i];
    }
    memset(s, 0, sizeof s);
    for (i = 0; i < nf; i++) {
        char path[1024], *eq;
        float *xs, *ys;
        int n;
        snprintf(path, sizeof path, "%s", files[i]);
        eq = strchr(path, '=');
        if (eq) *eq = 0;
        snprintf(labels[i], sizeof labels[i], "%s", eq ? eq + 1 : path);
        if (read_series(path, xname, yname, &xs, &ys, &n) != 0) {
            for (rc = 0; rc < i; rc++) { free((void *)s[rc].x); free((void *)s[rc].y); }
            return 1;
        }
        s[i].name = labels[i];
        s[i].x = xs;
        s[i].y = ys;
        s[i].n = n;
        s[i].style = n < 40 ? PLOT_LINE_POINTS : PLOT_LINE;
    }
    memset(&ch, 0, sizeof ch);
    ch.title = title ? title : yname;
    ch.xlabel = xname;
    ch.ylabel = ylabel ? ylabel : yname;
    ch.log_y = log_y;
    rc = plot_lines(out, &ch, s, nf);
    if (rc != 0) fprintf(stderr, "plot_csv: could not write %s\n", out);
    for (i = 0; i < nf; i++) {
        free((void *)s[i].x);
        free((void *)s[i].y);
    }
    return rc != 0;
}
