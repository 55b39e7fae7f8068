/* test_learning_examples.c - the reproductions of which-parameters-learn methods run as a user
   would: examples/continual --quick (MIGU, random mask, LoRA over Brown genres) and
   examples/keys_values --quick (fact editing through keys or values), and bench/migu answers
   --help. Skips the Brown runs when data/brown is absent. */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"  /* (the test harness links the implementation) */
#include "test.h"
#include "proc.h" /* defines: proc_run, proc_log_has */

#define END ((const char *)NULL)

/* value of ` key=` on the last line of `log` that starts with `prefix` */
static double value_of(const char *log, const char *prefix, const char *key) {
    FILE *f = fopen(log, "r");
    char line[4096], found[4096] = "";
    const char *p;
    char pat[128];
    if (!f) return NAN;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, prefix, strlen(prefix)) == 0) strcpy(found, line);
    fclose(f);
    snprintf(pat, sizeof pat, " %s=", key);
    p = strstr(found, pat);
    return p ? atof(p + strlen(pat)) : NAN;
}

static int has_brown(void) {
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    if (f) fclose(f);
    else printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
    return f != NULL;
}

static void test_continual(void) {
    const char *log = "build/tmp_learning/continual.log";
    proc_opts one = proc_opts_default();
    const char *arms[] = {"ft", "migu_l1_grad", "migu_l1_update", "migu_sum_grad", "migu_sum_update", "random_mask", "lora"};
    int a;
    TEST_BEGIN("examples/continual --quick: every arm on a dense and an MoE model, CSV and heatmaps");
    CHECK(proc_run(NULL, log, proc_example("continual"), "--help", END) == 0 && proc_log_has(log, "usage: "), "continual --help");
    if (!has_brown()) return;
    one.env[0] = "OMP_NUM_THREADS=1";
    CHECK(proc_run(&one, log, proc_example("continual"), "--quick", "--out", "build/tmp_learning", END) == 0, "continual exits 0 (see %s)", log);
    for (a = 0; a < 7; a++) {
        char prefix[64];
        double fin;
        snprintf(prefix, sizeof prefix, "model=moe arm=%s ", arms[a]);
        fin = value_of(log, prefix, "avg_final_bpb");
        CHECK(fin > 2.0 && fin < 8.5, "moe %s: average final bits/byte %g (a barely trained byte model)", arms[a], fin);
    }
    /* the masked arms update less than fine-tuning: on the last task they learn less */
    CHECK(value_of(log, "model=dense arm=migu_l1_update ", "last_task_bpb") >= value_of(log, "model=dense arm=ft ", "last_task_bpb") - 1e-3,
          "MIGU's masked update does not learn the last task faster than full fine-tuning");
    CHECK(proc_file_lines("build/tmp_learning/continual.csv") == 1 + 2 * 7 * 16, "CSV: header + 2 models x 7 arms x 4 x 4 entries");
    CHECK(proc_file_lines("build/tmp_learning/continual_moe_lora.png") > 0, "heatmap written");
    CHECK(proc_run(NULL, log, proc_example("continual"), "--quick", "--genres", "news", "--out", "build/tmp_learning", END) == 2 &&
              proc_log_has(log, "2 to"), "one genre is refused with a sentence");
}

static void test_keys_values(void) {
    const char *log = "build/tmp_learning/keys_values.log";
    proc_opts one = proc_opts_default();
    TEST_BEGIN("examples/keys_values --quick: facts learned through keys only and values only, parameter-matched");
    CHECK(proc_run(NULL, log, proc_example("keys_values"), "--help", END) == 0 && proc_log_has(log, "usage: "), "keys_values --help");
    if (!has_brown()) return;
    one.env[0] = "OMP_NUM_THREADS=1";
    CHECK(proc_run(&one, log, proc_example("keys_values"), "--quick", "--out", "build/tmp_learning", END) == 0, "keys_values exits 0 (see %s)", log);
    CHECK(value_of(log, "arm=keys ", "tuned_params") == value_of(log, "arm=values ", "tuned_params"), "the two arms tune equally many parameters");
    CHECK(value_of(log, "arm=keys ", "train_fact_acc") >= 0.0 && value_of(log, "arm=values ", "heldout_fact_acc") >= 0.0, "accuracies printed");
    CHECK(proc_file_lines("build/tmp_learning/keys_values.csv") > 1, "CSV written");
}

static void test_bench_help(void) {
    const char *log = "build/tmp_learning/bench_migu.log";
    TEST_BEGIN("bench/migu answers --help");
    CHECK(proc_run(NULL, log, "build/bench/migu", "--help", END) == 0 && proc_log_has(log, "usage: "), "bench/migu --help");
}

int main(void) {
    mkdir("build/tmp_learning", 0777);
    test_continual();
    test_keys_values();
    test_bench_help();
    return test_summary();
}
