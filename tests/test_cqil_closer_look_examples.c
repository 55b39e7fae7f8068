/* test_cqil_closer_look_examples.c - examples/cqil --quick and examples/closer_look --quick as a
 * user runs them. cqil: it trains, measures the adjacent layers' input similarity, every CQIL
 * configuration and its layer-dropping twin at the same depth, distils one configuration, and
 * writes its CSVs and PNGs (one thread: the concurrency of the groups is tested bit for bit in
 * tests/test_cqil.c). closer_look: a scratch and an upcycled MoE, every diagnostic per layer,
 * the upcycled experts more alike than the scratch ones. Skips without the Brown corpus or
 * without the example binaries (make test builds them; make test-asan too). */
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

static const char *binary(const char *name) {
    static char bin[512];
    const char *dir = getenv("MOE_EXAMPLES_DIR") ? getenv("MOE_EXAMPLES_DIR") : "build/examples";
    snprintf(bin, sizeof bin, "%s/%s", dir, name);
    if (access(bin, X_OK) != 0) {
        printf("   skipped: %s is not built (run make)\n", bin);
        return NULL;
    }
    return bin;
}

static int have_corpus(void) {
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    if (!f) printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
    else fclose(f);
    return f != NULL;
}

static void test_cqil(void) {
    const char *bin;
    char cmd[1024];
    TEST_BEGIN("examples/cqil --quick: CQIL groups against dropping the same layers, distillation, CSV and PNG");
    if (!have_corpus() || !(bin = binary("cqil"))) return;
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
}

static void test_closer_look(void) {
    const char *bin;
    char cmd[1024];
    TEST_BEGIN("examples/closer_look --quick: the diagnostics per layer on a scratch and an upcycled MoE");
    if (!have_corpus() || !(bin = binary("closer_look"))) return;
    snprintf(cmd, sizeof cmd, "OMP_NUM_THREADS=1 %s --quick --out build/tmp_examples/closer_look 2>&1", bin);
    CHECK(run(cmd) == 0, "closer_look --quick exits 0: %s", out);
    CHECK(value("result model=scratch", "val_bpb") < 7.5 && value("result model=upcycled", "val_bpb") < 7.5, "both models trained");
    CHECK(value("layer model=upcycled layer=0", "cos_up") > value("layer model=scratch layer=0", "cos_up") + 0.3,
          "upcycled experts stay alike (cos %.3f), scratch experts do not (%.3f)", value("layer model=upcycled layer=0", "cos_up"),
          value("layer model=scratch layer=0", "cos_up"));
    CHECK(value("layer model=scratch layer=3", "diag") >= 0.0 && value("layer model=scratch layer=3", "diag") <= 1.0 &&
          fabs(value("layer model=scratch layer=3", "R_gate")) <= 1.0, "rank agreement is a share, R in [-1, 1]");
    CHECK(access("build/tmp_examples/closer_look/closer_look.csv", R_OK) == 0 &&
          access("build/tmp_examples/closer_look/closer_look_ranks_scratch.png", R_OK) == 0 &&
          access("build/tmp_examples/closer_look/closer_look_depth.png", R_OK) == 0, "CSV and PNGs written");
    snprintf(cmd, sizeof cmd, "%s --model /nonexistent/model.bin --quick --out build/tmp_examples/closer_look 2>&1", bin);
    CHECK(run(cmd) == 1 && strstr(out, "closer_look: "), "a missing model file: exit 1 with a sentence");
}

int main(void) {
    test_cqil();
    test_closer_look();
    return test_summary();
}
