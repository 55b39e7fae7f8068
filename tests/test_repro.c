/* test_repro.c - the paper reproductions' --quick runs (examples/router_compare.c,
   examples/gw_finetune.c): exit status, every row of the results table, finite numbers in
   plausible ranges, the CSV, markdown and PNG files. Needs the Brown corpus (make data);
   skipped with a line when it is absent. The examples are built by `make test` first (make
   test-asan: their sanitized builds, tests/proc.h's proc_example); started without a shell. */
#define _POSIX_C_SOURCE 200809L
#include "test.h"
#include "proc.h" /* defines: proc_run, proc_example, proc_mkdirs, proc_rmtree */

#define END ((const char *)NULL)
#define DIR "build/tmp_repro"
#define RC DIR "/router_compare" /* each example's files in a folder of their own, emptied first */
#define GW DIR "/gw_finetune"

/* an empty folder `dir` */
static int fresh_dir(const char *dir) { return proc_rmtree(dir) == 0 && proc_mkdirs(dir) == 0; }

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fclose(f);
    return n;
}

static int file_contains(const char *path, const char *needle) {
    FILE *f = fopen(path, "r");
    char line[8192];
    int found = 0;
    if (!f) return 0;
    while (!found && fgets(line, sizeof line, f)) found = strstr(line, needle) != NULL;
    fclose(f);
    return found;
}

/* A CSV file with a header line, read whole: up to 256 rows of up to 32 fields. */
typedef struct csv {
    int rows, cols;
    char head[32][48];
    char cell[256][32][48];
} csv;

static int split(char *line, char out[32][48]) {
    int n = 0;
    char *p = line, *q;
    line[strcspn(line, "\r\n")] = 0;
    while (n < 32) {
        q = strchr(p, ',');
        if (q) *q = 0;
        snprintf(out[n++], 48, "%s", p);
        if (!q) break;
        p = q + 1;
    }
    return n;
}

static int csv_read(csv *c, const char *path) {
    FILE *f = fopen(path, "r");
    char line[4096];
    memset(c, 0, sizeof *c);
    if (!f) return 0;
    if (fgets(line, sizeof line, f)) c->cols = split(line, c->head);
    while (c->rows < 256 && fgets(line, sizeof line, f))
        if (split(line, c->cell[c->rows]) == c->cols) c->rows++;
    fclose(f);
    return c->cols > 0;
}

static int csv_col(const csv *c, const char *name) {
    int i;
    for (i = 0; i < c->cols; i++)
        if (strcmp(c->head[i], name) == 0) return i;
    return -1;
}

/* value of column `name` in the seed-th row (0-based among its rows) of variant `v`; NAN if absent */
static double csv_get(const csv *c, const char *v, int seed, const char *name) {
    int r, k = csv_col(c, name), n = 0;
    if (k < 0) return NAN;
    for (r = 0; r < c->rows; r++)
        if (strcmp(c->cell[r][0], v) == 0 && n++ == seed) return atof(c->cell[r][k]);
    return NAN;
}

static int csv_count(const csv *c, const char *v) {
    int r, n = 0;
    for (r = 0; r < c->rows; r++) n += strcmp(c->cell[r][0], v) == 0;
    return n;
}

static int have_data(void) {
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    if (!f) {
        printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return 0;
    }
    fclose(f);
    return 1;
}

static int have(const char *bin) {
    if (access(bin, X_OK) == 0) return 1;
    printf("   skipped: %s is not built (make test builds it; make test-asan its sanitized build)\n", bin);
    return 0;
}

static csv C; /* large: static */

static void test_router_compare(void) {
    const char *lg = DIR "/router_compare.log", *bin = proc_example("router_compare");
    const char *names[] = {"dense", "moe-top2", "rmoe", "rmoe-np", "rmoe-detach", "mlp-router"};
    char row[64];
    int i, s;
    proc_opts one = proc_opts_default();
    one.env[0] = "OMP_NUM_THREADS=1";
    TEST_BEGIN("examples/router_compare --quick: every variant trained, diagnostics in range, files written");
    if (!have_data() || !have(bin)) return;
    CHECK(fresh_dir(RC), "an empty folder %s", RC);
    CHECK(proc_run(&one, lg, bin, "--quick", "--out", RC, END) == 0, "router_compare exits 0 (see %s)", lg);
    CHECK(file_contains(lg, "results (2 seeds"), "the results table is printed");
    CHECK(csv_read(&C, RC "/router_compare.csv"), "router_compare.csv is written");
    for (i = 0; i < 6; i++) {
        CHECK(csv_count(&C, names[i]) == 2, "%s: one CSV row per seed (2), got %d", names[i], csv_count(&C, names[i]));
        snprintf(row, sizeof row, "| %s |", names[i]);
        CHECK(file_contains(RC "/router_compare.md", row), "%s: a row of the markdown table", names[i]);
        for (s = 0; s < 2; s++) {
            double bpb = csv_get(&C, names[i], s, "val_bpb"), lh = csv_get(&C, names[i], s, "load_entropy");
            double gh = csv_get(&C, names[i], s, "gate_entropy"), ib = csv_get(&C, names[i], s, "ib");
            double ob = csv_get(&C, names[i], s, "ob"), mi = csv_get(&C, names[i], s, "mi"), mis = csv_get(&C, names[i], s, "mi_shuffled");
            /* 30 tiny steps: well below 8 bits (uniform bytes), far above what a trained model reaches */
            CHECK(bpb > 3.0 && bpb < 7.5, "%s seed %d: val bits per byte %.3f in (3, 7.5)", names[i], s + 1, bpb);
            if (i == 0) {
                CHECK(lh != lh && gh != gh && ib != ib, "dense: no routing diagnostics (NaN)");
                continue;
            }
            CHECK(lh > 0.0 && lh <= log(8.0) + 1e-4, "%s: load entropy %.4f in (0, ln 8]", names[i], lh);
            CHECK(gh > 0.0 && gh <= log(8.0) + 1e-4, "%s: gate entropy %.4f in (0, ln 8]", names[i], gh);
            CHECK(ib >= 1.0 && ib < 1e3, "%s: inner balance %.3f >= 1", names[i], ib);
            CHECK(ob > 2.0 / 8 - 1e-3 && ob <= 1.0 + 1e-5, "%s: outer balance %.4f in [k/E, 1]", names[i], ob);
            CHECK(mi >= 0.0 && mi <= log(8.0) + 1e-6 && mis >= 0.0 && mis <= log(8.0) + 1e-6, "%s: MI %.4f and shuffled %.4f in [0, ln 8]", names[i], mi, mis);
        }
    }
    CHECK(file_size(RC "/router_compare_val.png") > 1000 && file_size(RC "/router_compare_gate_entropy.png") > 1000, "PNG files written");
    CHECK(file_size(RC "/router_compare_layers.csv") > 100 && file_size(RC "/router_compare_curve.csv") > 100, "per-layer and curve CSVs written");
    CHECK(proc_run(NULL, lg, bin, "--quick", "--variants", "nonsense", "--out", RC, END) != 0 && file_contains(lg, "unknown variant 'nonsense'"),
          "an unknown variant is refused with a sentence");
}

static void test_gw_finetune(void) {
    const char *lg = DIR "/gw_finetune.log", *bin = proc_example("gw_finetune");
    const char *names[] = {"pretrained", "ft", "gw", "gw-slots", "broadcast-all", "gw-released"};
    char row[64];
    int i, s;
    proc_opts one = proc_opts_default();
    one.env[0] = "OMP_NUM_THREADS=1";
    TEST_BEGIN("examples/gw_finetune --quick: every variant fine-tuned, broadcast shares as configured, files written");
    if (!have_data() || !have(bin)) return;
    CHECK(fresh_dir(GW), "an empty folder %s", GW);
    CHECK(proc_run(&one, lg, bin, "--quick", "--out", GW, END) == 0, "gw_finetune exits 0 (see %s)", lg);
    CHECK(file_contains(lg, "results (2 seeds"), "the results table is printed");
    CHECK(csv_read(&C, GW "/gw_finetune.csv"), "gw_finetune.csv is written");
    for (i = 0; i < 6; i++) {
        CHECK(csv_count(&C, names[i]) == 2, "%s: one CSV row per seed (2), got %d", names[i], csv_count(&C, names[i]));
        snprintf(row, sizeof row, "| %s |", names[i]);
        CHECK(file_contains(GW "/gw_finetune.md", row), "%s: a row of the markdown table", names[i]);
        for (s = 0; s < 2; s++) {
            double ft = csv_get(&C, names[i], s, "ft_bpb"), pre = csv_get(&C, names[i], s, "pre_bpb");
            double sh = csv_get(&C, names[i], s, "broadcast_share"), s2 = csv_get(&C, names[i], s, "sens_2nd");
            double sr = csv_get(&C, names[i], s, "sens_random"), fg = csv_get(&C, names[i], s, "forgetting");
            CHECK(ft > 3.0 && ft < 7.5 && pre > 3.0 && pre < 7.5, "%s seed %d: bits per byte %.3f (fine-tuning genre), %.3f (pre-training genres) in (3, 7.5)",
                  names[i], s + 1, ft, pre);
            CHECK(fabs(s2) < 2.0 && fabs(sr) < 2.0, "%s: sensitivities %.4f, %.4f finite and small", names[i], s2, sr);
            CHECK(fg == fg && fabs(fg) < 2.0, "%s: forgetting %.4f finite", names[i], fg);
            if (i <= 1) CHECK(sh == 0.0, "%s: nothing broadcast (%.4f)", names[i], sh);
            if (i == 0) CHECK(fg == 0.0, "pretrained: forgetting is 0 by definition");
            if (i == 2 || i == 5) CHECK(sh > 0.02 && sh < 0.35, "%s: broadcast share %.3f near the 10%% target", names[i], sh);
            if (i == 3) CHECK(sh > 0.0 && sh <= csv_get(&C, "gw", s, "broadcast_share") + 1e-6, "gw-slots: share %.3f > 0 and <= gw's", sh);
            if (i == 4) CHECK(sh > 0.99, "broadcast-all: share %.3f ~ 1", sh);
        }
    }
    CHECK(file_size(GW "/gw_finetune_bpb.png") > 1000 && file_size(GW "/gw_finetune_sensitivity.png") > 1000, "PNG files written");
    CHECK(file_size(GW "/gw_finetune_layers.csv") > 100 && file_size(GW "/gw_finetune_curve.csv") > 100, "per-layer and curve CSVs written");
    CHECK(proc_run(NULL, lg, bin, "--quick", "--ft-genre", "news", "--out", GW, END) != 0 && file_contains(lg, "must not be a pre-training genre"),
          "a fine-tuning genre among the pre-training genres is refused");
}

int main(void) {
    test_router_compare();
    test_gw_finetune();
    return test_summary();
}
