/* calibrate.c - post-hoc reward calibration of your own reward model's scores (reward.h, spec 2).

   Input: a CSV whose header names at least
       id,subset,score_chosen,score_rejected,len_chosen,len_rejected
   in any order; extra columns are kept. Optional: text_len_chosen,text_len_rejected (code
   points of the full chat-formatted text, which the length penalty uses, as the paper's code).
   Lengths are read as real numbers. Quoted fields (with commas or doubled quotes) are fine.

       build/examples/calibrate scores.csv [--method lwr|mean|penalty|penalty+lwr|penalty+mean]
           [--frac 1.0] [--iters 3] [--alpha 1.0] [--ratio 4] [--min-count 20]
           [--seed N | --no-shuffle] [--penalty 0.001] [--out out/calibrated.csv]

   Output: the rows with cal_chosen,cal_rejected appended (written atomically); a PNG of score
   against length before and after (out/calibrate.png); on stdout, after the settings, one
   key=value line per subset, per RewardBench section and overall (weights of spec 2.6).
   Exit status 0 on success, 1 with a sentence on stderr on bad input. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_calibrate_pairs, rwd_pair_accuracy, rwd_rewardbench_*, rwd_lowess */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "files.h" /* defines: files_atomic_*, files_check_input */

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { COL_ID, COL_SUBSET, COL_SW, COL_SL, COL_LW, COL_LL, COL_TW, COL_TL, N_COLS };
static const char *const col_names[N_COLS] = {"id", "subset", "score_chosen", "score_rejected", "len_chosen",
                                              "len_rejected", "text_len_chosen", "text_len_rejected"};

typedef struct table {
    char **record;  /* (n) raw text of each data record, without its line end */
    int *line;      /* (n) line where the record starts */
    char **subset;  /* (n) subset of each row */
    double *v[N_COLS]; /* numeric columns (COL_SW..COL_TL), (n) each */
    char *header;   /* raw text of the header record (without a byte-order mark or line end) */
    size_t n;
    int has_text_len;
} table;

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "calibrate: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return 1;
}

/* Splits one CSV record starting at *p into fields (unquoted, in place in `buf`); advances *p
   past the record's line end and counts the lines it spans. Returns the number of fields. */
static int split_record(const char **p, char *buf, char **field, int max_fields, int *lines) {
    const char *s = *p;
    char *o = buf;
    int nf = 0, quoted = 0;
    field[nf++] = o;
    for (; *s; s++) {
        if (quoted) {
            if (*s == '"' && s[1] == '"') { *o++ = '"'; s++; }
            else if (*s == '"') quoted = 0;
            else { if (*s == '\n') (*lines)++; *o++ = *s; }
        } else if (*s == '"') quoted = 1;
        else if (*s == ',') {
            *o++ = 0;
            if (nf < max_fields) field[nf] = o;
            nf++;
        } else if (*s == '\n' || *s == '\r') break;
        else *o++ = *s;
    }
    *o = 0;
    if (*s == '\r') s++;
    if (*s == '\n') { s++; (*lines)++; }
    *p = s;
    return nf;
}

static int parse_number(const char *s, double *v) {
    char *end;
    errno = 0;
    *v = strtod(s, &end);
    while (*end == ' ' || *end == '\t') end++;
    return end != s && *end == 0 && errno != ERANGE && isfinite(*v);
}

static void table_free(table *t) {
    size_t i;
    int k;
    for (i = 0; i < t->n; i++) { free(t->record[i]); free(t->subset[i]); }
    free(t->record); free(t->subset); free(t->line); free(t->header);
    for (k = COL_SW; k < N_COLS; k++) free(t->v[k]);
    memset(t, 0, sizeof *t);
}

/* every per-row array at least `cap` long; 0 when out of memory (the table stays valid) */
static int table_grow(table *t, size_t cap) {
    void *p;
    int k;
    if (!(p = realloc(t->record, cap * sizeof(char *)))) return 0;
    t->record = (char **)p;
    if (!(p = realloc(t->subset, cap * sizeof(char *)))) return 0;
    t->subset = (char **)p;
    if (!(p = realloc(t->line, cap * sizeof(int)))) return 0;
    t->line = (int *)p;
    for (k = COL_SW; k < N_COLS; k++) {
        if (!(p = realloc(t->v[k], cap * sizeof(double)))) return 0;
        t->v[k] = (double *)p;
    }
    return 1;
}

/* a copy of the raw text of the record that starts at rec and ends before end, line end dropped */
static char *raw_record(const char *rec, const char *end) {
    size_t n = (size_t)(end - rec);
    char *r;
    while (n > 0 && (rec[n - 1] == '\n' || rec[n - 1] == '\r')) n--;
    r = (char *)malloc(n + 1);
    if (r) {
        memcpy(r, rec, n);
        r[n] = 0;
    }
    return r;
}

/* Reads the CSV (.gz through gzip) into t; 0, or 1 after saying why (t is then empty). */
static int read_table(table *t, const char *path) {
    files_reader r;
    files_err fe;
    FILE *f;
    char *text = NULL, *buf = NULL, *field[256], why[600];
    const char *p, *rec;
    size_t len, cap = 0;
    int col[N_COLS], nf, i, line = 1, header_fields;
    moe_err err;
    moe_status st;
    memset(t, 0, sizeof *t);
    why[0] = 0;
    if (!(f = files_open_read(&r, path, &fe))) return fail("%s", fe.msg);
    st = rwd_read_all(f, &text, &len, &err);
    if (files_close_read(&r, &fe) != 0) { free(st == MOE_OK ? text : NULL); return fail("%s", fe.msg); }
    if (st != MOE_OK) return fail("%s: %s", path, err.msg);
    if (len == 0) { free(text); return fail("'%s' is empty: it needs a header line and rows", path); }
    buf = (char *)malloc(len + 1);
    if (!buf) { free(text); return fail("out of memory reading '%s'", path); }
    p = text;
    if (strncmp(p, "\xef\xbb\xbf", 3) == 0) p += 3; /* a UTF-8 byte-order mark */
    rec = p;
    header_fields = split_record(&p, buf, field, 256, &line);
    t->header = raw_record(rec, p); /* written back whole, however long, quoted line breaks and all */
    if (!t->header) { snprintf(why, sizeof why, "out of memory reading '%.400s'", path); goto bad; }
    for (i = 0; i < N_COLS; i++) {
        int j;
        col[i] = -1;
        for (j = 0; j < header_fields && j < 256; j++) {
            const char *h = field[j];
            while (*h == ' ') h++;
            if (strcmp(h, col_names[i]) == 0) col[i] = j;
        }
        if (col[i] < 0 && i < COL_TW) { snprintf(why, sizeof why, "line 1: the header has no column '%s'", col_names[i]); goto bad; }
    }
    t->has_text_len = col[COL_TW] >= 0 && col[COL_TL] >= 0;
    while (*p) {
        int start = line;
        rec = p;
        nf = split_record(&p, buf, field, 256, &line);
        if (nf == 1 && field[0][0] == 0) continue; /* blank line */
        if (nf != header_fields) { snprintf(why, sizeof why, "line %d: %d fields, the header has %d", start, nf, header_fields); goto bad; }
        if (t->n == cap) {
            cap = cap ? 2 * cap : 1024;
            if (!table_grow(t, cap)) { snprintf(why, sizeof why, "out of memory at line %d", start); goto bad; }
        }
        for (i = COL_SW; i < N_COLS; i++) {
            if (col[i] < 0) continue;
            if (!parse_number(field[col[i]], &t->v[i][t->n])) {
                snprintf(why, sizeof why, "line %d: column '%s' is not a finite number", start, col_names[i]);
                goto bad;
            }
        }
        t->record[t->n] = raw_record(rec, p);
        t->subset[t->n] = (char *)malloc(strlen(field[col[COL_SUBSET]]) + 1);
        t->line[t->n] = start;
        t->n++; /* table_free frees both, whatever happened */
        if (!t->record[t->n - 1] || !t->subset[t->n - 1]) { snprintf(why, sizeof why, "out of memory at line %d", start); goto bad; }
        strcpy(t->subset[t->n - 1], field[col[COL_SUBSET]]);
    }
    free(buf);
    free(text);
    if (t->n == 0) {
        table_free(t);
        return fail("'%s' has a header but no rows", path);
    }
    return 0;
bad:
    free(buf);
    free(text);
    table_free(t);
    return fail("%s", why);
}

/* the rows with the calibrated scores appended, through a temporary file that is synced and
   renamed onto path (files.h): a failed write leaves an existing file as it was */
static int write_rows(const table *t, const char *path, const char *header, const double *cw, const double *cl) {
    files_atomic a;
    files_err fe;
    FILE *f = files_atomic_open(&a, path, &fe);
    size_t i;
    int ok;
    if (!f) return fail("%s", fe.msg);
    ok = fprintf(f, "%s,cal_chosen,cal_rejected\n", header) > 0;
    for (i = 0; ok && i < t->n; i++) ok = fprintf(f, "%s,%.17g,%.17g\n", t->record[i], cw[i], cl[i]) > 0;
    if (files_atomic_commit(&a, ok, &fe) != 0) return fail("%s", fe.msg);
    return 0;
}

typedef struct point { float x, y, fit; } point;

static int by_x(const void *a, const void *b) {
    float p = ((const point *)a)->x, q = ((const point *)b)->x;
    return (p > q) - (p < q);
}

/* score against length: points before (grey) and after, with their LOWESS curves */
/* 0, or 1 after saying why the plot could not be written */
static int plot_scores(const char *path, const table *t, const double *cw, const double *cl, double frac) {
    size_t n = t->n, m = 2 * n, i;
    point *pt = (point *)malloc(2 * m * sizeof(point));
    float *buf = (float *)malloc(6 * m * sizeof(float));
    double *x = (double *)malloc(3 * m * sizeof(double)), *y = x + m, *fit = y + m;
    plot_series s[4];
    plot_chart c;
    moe_err err;
    int k, rc;
    if (!pt || !buf || !x) { free(pt); free(buf); free(x); return fail("out of memory for the plot"); }
    memset(s, 0, sizeof s);
    memset(&c, 0, sizeof c);
    for (i = 0; i < n; i++) { x[i] = t->v[COL_LW][i]; x[n + i] = t->v[COL_LL][i]; }
    for (k = 0; k < 2; k++) {
        float *px = buf + 3 * (size_t)k * m, *py = px + m, *pf = py + m;
        for (i = 0; i < n; i++) {
            y[i] = k ? cw[i] : t->v[COL_SW][i];
            y[n + i] = k ? cl[i] : t->v[COL_SL][i];
        }
        if (rwd_lowess(fit, x, y, m, frac, 3, &err) != MOE_OK) break;
        for (i = 0; i < m; i++) { pt[i].x = (float)x[i]; pt[i].y = (float)y[i]; pt[i].fit = (float)fit[i]; }
        qsort(pt, m, sizeof *pt, by_x); /* the curve is drawn as a line, left to right */
        for (i = 0; i < m; i++) { px[i] = pt[i].x; py[i] = pt[i].y; pf[i] = pt[i].fit; }
        s[2 * k].name = k ? "calibrated" : "original";
        s[2 * k].x = px; s[2 * k].y = py; s[2 * k].n = (int)m; s[2 * k].style = PLOT_POINTS;
        s[2 * k].color = k ? 0x1f77b4 : 0xbbbbbb;
        s[2 * k + 1].name = k ? "LOWESS after" : "LOWESS before";
        s[2 * k + 1].x = px; s[2 * k + 1].y = pf; s[2 * k + 1].n = (int)m;
        s[2 * k + 1].color = k ? 0x2ca02c : 0xd62728;
    }
    c.title = "reward vs response length";
    c.xlabel = "length (code points)";
    c.ylabel = "reward";
    rc = k < 2 ? fail("the LOWESS curves of the plot failed: %s", err.msg) : plot_lines(path, &c, s, 4) != PLOT_OK ? fail("could not write %s", path) : 0;
    free(pt); free(buf); free(x);
    return rc;
}

static const char *const about =
    "Input: a CSV whose header names at least id,subset,score_chosen,score_rejected,len_chosen,\n"
    "len_rejected in any order; extra columns are kept. Optional: text_len_chosen,text_len_rejected\n"
    "(code points of the full chat-formatted text, for the length penalty). Lengths are real numbers;\n"
    "quoted fields (commas, doubled quotes, line breaks) are fine.\n"
    "Output: the rows with cal_chosen,cal_rejected appended (--out, written atomically); a PNG of\n"
    "score against length before and after (out/calibrate.png); on stdout, after the settings, one\n"
    "key=value line per subset, per RewardBench section and overall. Exit status 0 on success, 1\n"
    "with a sentence on stderr on bad input, 2 on a bad flag.";

int main(int argc, char **argv) {
    const char *in = NULL, *out = "out/calibrated.csv", *method = "lwr";
    rwd_cal_config cfg = rwd_cal_config_default();
    table t;
    double *cw, *cl;
    moe_err err;
    size_t i, j;
    int rc;
    {
        static const int methods[5] = {RWD_CAL_LWR, RWD_CAL_MEAN, RWD_CAL_PENALTY, RWD_CAL_PENALTY_LWR, RWD_CAL_PENALTY_MEAN};
        static const char *const method_names[5] = {"lwr", "mean", "penalty", "penalty+lwr", "penalty+mean"};
        flag fl[10];
        flags_program p;
        const char *args[1];
        int n = 0, m = 0, seed = 0, no_shuffle = 0;
        fl[n++] = flag_choice("--method", &m, "lwr|mean|penalty|penalty+lwr|penalty+mean",
                              "RC-LWR, RC-Mean, the length penalty, or the penalty then RC-LWR / RC-Mean");
        fl[n++] = flag_double("--frac", &cfg.frac, 1e-9, 1, "LOWESS span (RC-LWR)");
        fl[n++] = flag_int("--iters", &cfg.iters, 0, 100, "LOWESS robustness passes");
        fl[n++] = flag_double("--alpha", &cfg.alpha, -1e6, 1e6, "calibration strength");
        fl[n++] = flag_double("--ratio", &cfg.ratio, 1e-9, 1e9, "RC-Mean threshold divisor");
        fl[n++] = flag_int("--min-count", &cfg.min_count, 0, 1e9, "RC-Mean minimum window");
        fl[n++] = flag_int("--seed", &seed, 0, 2147483647, "RC-Mean shuffle seed");
        fl[n++] = flag_switch("--no-shuffle", &no_shuffle, "RC-Mean: no shuffle before the stable sort");
        fl[n++] = flag_double("--penalty", &cfg.penalty, -1e6, 1e6, "length penalty per code point");
        fl[n++] = flag_string("--out", &out, "FILE", "the calibrated rows (written atomically)");
        p = flags_program_make("calibrate", "post-hoc reward calibration of your own reward model's scores", about, fl, n);
        flags_positional(&p, args, 1, "scores.csv");
        if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
        if (p.n_args != 1) {
            fprintf(stderr, "calibrate: give one input CSV (--help describes it)\n");
            return 2;
        }
        in = args[0];
        method = method_names[m];
        cfg.method = methods[m];
        if (flags_find(&p, &seed)->seen) { cfg.seed = (uint64_t)seed; cfg.shuffle = 1; }
        if (no_shuffle) cfg.shuffle = 0;
    }
    if (rwd_cal_config_check(&cfg, &err) != MOE_OK) return fail("%s", err.msg);
    {
        files_atomic probe; /* an output that cannot be written fails before the work */
        files_err fe;
        if (!files_atomic_open(&probe, out, &fe)) return fail("%s", fe.msg);
        files_atomic_abort(&probe);
    }
    if (read_table(&t, in)) return 1;

    printf("%-22s %s\n%-22s %s\n%-22s %zu\n%-22s %g\n%-22s %d\n%-22s %g\n%-22s %g\n%-22s %d\n%-22s %s\n%-22s %g (%s)\n%-22s %s\n",
           "input", in, "method", method, "pairs", t.n, "frac", cfg.frac, "iters", cfg.iters, "alpha", cfg.alpha, "ratio", cfg.ratio,
           "min_count", cfg.min_count, "shuffle", cfg.shuffle ? "seeded" : "off", "penalty", cfg.penalty,
           t.has_text_len ? "text_len columns" : "len columns", "output", out);

    cw = (double *)malloc(2 * t.n * sizeof(double));
    cl = cw + t.n;
    if (!cw) { table_free(&t); return fail("out of memory"); }
    if (rwd_calibrate_pairs(cw, cl, t.v[COL_SW], t.v[COL_SL], t.v[COL_LW], t.v[COL_LL], t.has_text_len ? t.v[COL_TW] : NULL,
                            t.has_text_len ? t.v[COL_TL] : NULL, t.n, &cfg, &err) != MOE_OK) {
        table_free(&t);
        free(cw);
        return fail("%s", err.msg);
    }

    { /* per subset, in order of first appearance; then sections and overall */
        const char **names = (const char **)malloc(t.n * sizeof(char *));
        double *acc = (double *)malloc(2 * t.n * sizeof(double)), sec[2][RWD_N_SECTIONS], overall[2];
        size_t ns = 0, *count = (size_t *)malloc(t.n * sizeof(size_t));
        int s, *sid = (int *)malloc(t.n * sizeof(int));
        if (!names || !acc || !count || !sid) return fail("out of memory");
        for (i = 0; i < t.n; i++) {
            for (j = 0; j < ns && strcmp(names[j], t.subset[i]) != 0; j++) {}
            if (j == ns) names[ns++] = t.subset[i];
            sid[i] = (int)j;
        }
        if (rwd_subset_accuracy(acc, count, sid, t.v[COL_SW], t.v[COL_SL], t.n, (int)ns, &err) != MOE_OK ||
            rwd_subset_accuracy(acc + ns, NULL, sid, cw, cl, t.n, (int)ns, &err) != MOE_OK)
            return fail("%s", err.msg);
        for (j = 0; j < ns; j++) printf("subset=%s n=%zu acc_before=%.6f acc_after=%.6f\n", names[j], count[j], acc[j], acc[ns + j]);
        rwd_rewardbench_scores(sec[0], &overall[0], names, acc, ns);
        rwd_rewardbench_scores(sec[1], &overall[1], names, acc + ns, ns);
        for (s = 0; s < RWD_N_SECTIONS; s++)
            if (!isnan(sec[0][s])) printf("section=%s before=%.6f after=%.6f\n", rwd_section_name(s), sec[0][s], sec[1][s]);
        printf("overall before=%.6f after=%.6f\n", overall[0], overall[1]);
        printf("all_pairs acc_before=%.6f acc_after=%.6f preference_changed=%.6f\n", rwd_pair_accuracy(t.v[COL_SW], t.v[COL_SL], t.n),
               rwd_pair_accuracy(cw, cl, t.n), rwd_preference_changed(t.v[COL_SW], t.v[COL_SL], cw, cl, t.n));
        printf("length_spearman before=%.6f after=%.6f\n", rwd_length_correlation(t.v[COL_SW], t.v[COL_SL], t.v[COL_LW], t.v[COL_LL], t.n),
               rwd_length_correlation(cw, cl, t.v[COL_LW], t.v[COL_LL], t.n));
        free(names);
        free(acc);
        free(count);
        free(sid);
    }
    {
        files_err fe;
        if (files_mkdirs("out", &fe) != 0) fprintf(stderr, "calibrate: %s\n", fe.msg);
        rc = write_rows(&t, out, t.header, cw, cl);
        rc |= plot_scores("out/calibrate.png", &t, cw, cl, cfg.frac);
        if (!rc) printf("wrote=%s plot=out/calibrate.png\n", out);
    }
    table_free(&t);
    free(cw);
    return rc;
}
