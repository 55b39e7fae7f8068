/* test_cqil_example.c - examples/cqil --quick as a user runs it: it trains, measures the
 * adjacent layers' input similarity, every CQIL configuration and its layer-dropping twin at
 * the same depth, distils one configuration, and writes its CSVs and PNGs. One thread: the
 * concurrency of the groups is tested bit for bit in tests/test_cqil.c. Skips without the
 * Brown corpus or without the example binary (make test builds it; make test-asan too). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"
#include "test.h" /* defines: CHECK, TEST_BEGIN, test_summary */
#include <sys/wait.h>
#include <unistd.h>

static char out[1 << 18];

/* runs cmd, captures stdout+stderr into out; returns the exit status */
static int run(const char *cmd) {
    FILE *p = popen(cmd, "r");
    size_t n;
    if (!p) return -1;
    n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    n = (size_t)pclose(p);
    return WIFEXITED((int)n) ? WEXITSTATUS((int)n) : -1;
}

/* the value after " key=" on the first line that starts with `line` */
static double value(const char *line, const char *key) {
    const char *l = strstr(out, line), *k, *nl;
    char pat[96];
    if (!l) return NAN;
    nl = strchr(l, '\n');
    snprintf(pat, sizeof pat, " %s=", key);
    k = strstr(l, pat);
    if (!k || (nl && k > nl)) return NAN;
    return atof(k + strlen(pat));
}

int main(void) {
    const char *dir = getenv("MOE_EXAMPLES_DIR") ? getenv("MOE_EXAMPLES_DIR") : "build/examples";
    char bin[512], cmd[1024];
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    TEST_BEGIN("examples/cqil --quick: CQIL groups against dropping the same layers, distillation, CSV and PNG");
    snprintf(bin, sizeof bin, "%s/cqil", dir);
    if (!f) {
        printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return test_summary();
    }
    fclose(f);
    if (access(bin, X_OK) != 0) {
        printf("   skipped: %s is not built (run make)\n", bin);
        return test_summary();
    }
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=1 %s --quick --out build/tmp_examples/cqil 2>&1", bin);
    CHECK(run(cmd) == 0, "cqil --quick exits 0: %s", out);
    CHECK(value("result", "seq_bpb") > 3.0 && value("result", "seq_bpb") < 7.0, "trained: %.3f bits/byte (uniform: 8)", value("result", "seq_bpb"));
    CHECK(value("result", "sim_upper") > value("result", "sim_lower") && value("result", "sim_upper") <= 1.0,
          "upper layers' inputs are more alike than lower layers' (%.4f > %.4f)", value("result", "sim_upper"), value("result", "sim_lower"));
    CHECK(value("config kind=cqil P=2 start=10 bypass=0", "depth") == 11 && value("config kind=drop P=2 start=10", "depth") == 11,
          "one pair at the top: depth 11 for CQIL and for dropping");
    CHECK(value("config kind=cqil P=4 start=4 bypass=1 double=1", "depth") == 6 && value("config kind=drop P=4 start=4", "depth") == 6,
          "two quads from layer 4: depth 6");
    CHECK(value("config kind=cqil P=4 start=4 bypass=0", "val_bpb") < 8.0 && value("config kind=cqil P=4 start=4 bypass=0", "latency_us") > 0.0,
          "CQIL: bits/byte and a measured latency");
    CHECK(!isnan(value("kd P=2", "val_kl_after")) && value("kd P=2", "depth") == 9, "distillation into P=2 from layer 6 (depth 9)");
    CHECK(access("build/tmp_examples/cqil/cqil.csv", R_OK) == 0 && access("build/tmp_examples/cqil/cqil_similarity.csv", R_OK) == 0 &&
          access("build/tmp_examples/cqil/cqil_depth.png", R_OK) == 0 && access("build/tmp_examples/cqil/cqil_latency.png", R_OK) == 0 &&
          access("build/tmp_examples/cqil/cqil_similarity.png", R_OK) == 0,
          "CSVs and PNGs written");
    snprintf(cmd, sizeof cmd, "%s --kd-start 5 2>&1", bin);
    CHECK(run(cmd) == 2 && strstr(out, "must tile"), "a distillation range that the groups cannot tile: exit 2 with a sentence");
    return test_summary();
}
