/* test_reward_examples.c - the reward examples as a user runs them: examples/calibrate on a
 * generated score CSV (numbers agree with the library, output rows, bad input gives a line
 * number and a non-zero exit) and examples/length_bias --quick (simulator; HH-RLHF when the
 * shared data is there). Skips with a message when the example binaries are not built
 * (make test builds them; make test-asan their sanitized builds, tests/proc.h's proc_example). */
#define _POSIX_C_SOURCE 200809L
#include "reward.h" /* defines: rwd_pair_accuracy, rwd_calibrate_pairs, rwd_rewardbench_scores */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, test_summary, test_shared_data */
#include "proc.h"   /* defines: proc_run_out, proc_example */

#define END ((const char *)NULL)

/* the value after "key=" on the first line that contains `line_has` */
static double value(const char *text, const char *line_has, const char *key) {
    const char *l = strstr(text, line_has), *k;
    char pat[64];
    if (!l) return NAN;
    snprintf(pat, sizeof pat, " %s=", key);
    k = strstr(l, pat);
    if (!k || (strchr(l, '\n') && k > strchr(l, '\n'))) return NAN;
    return atof(k + strlen(pat));
}

static int have(const char *bin) {
    if (access(bin, X_OK) == 0) return 1;
    printf("SKIP %s: not built (run make test, or make test-asan for the sanitized builds)\n", bin);
    return 0;
}

static void test_calibrate(void) {
    enum { N = 400 };
    static const char *const subsets[4] = {"alpacaeval-easy", "llmbar-natural", "donotanswer", "hep-go"};
    static char out[1 << 16];
    double sw[N], sl[N], lw[N], ll[N], cw[N], cl[N], acc_b[4], acc_a[4], sec[2][4], overall[2];
    const char *names[4], *cal = proc_example("calibrate");
    char dir[64], path[128], in[128], outp[128], bad[128], badout[128], log[128];
    rwd_cal_config cfg = rwd_cal_config_default();
    moe_rng rng;
    moe_err err;
    FILE *f;
    int i, s;
    TEST_BEGIN("examples/calibrate: sections and overall = the library's, output rows, bad input");
    if (!have(cal)) return;
    snprintf(dir, sizeof dir, "/tmp/rwd_cal_%d", (int)getpid());
    CHECK(mkdir(dir, 0777) == 0, "mkdir %s", dir);
    snprintf(path, sizeof path, "%s/scores.csv", dir);
    snprintf(in, sizeof in, "%s/scores.csv", dir);
    snprintf(outp, sizeof outp, "%s/cal.csv", dir);
    snprintf(bad, sizeof bad, "%s/bad.csv", dir);
    snprintf(badout, sizeof badout, "%s/b.csv", dir);
    snprintf(log, sizeof log, "%s/log.txt", dir);
    f = fopen(path, "w");
    CHECK(f != NULL, "cannot write %s", path);
    if (!f) return;
    moe_rng_seed(&rng, 4);
    fprintf(f, "len_rejected,subset,id,score_chosen,extra,score_rejected,len_chosen\n"); /* any order, extra column */
    for (i = 0; i < N; i++) {
        lw[i] = (double)(20 + moe_rng_below(&rng, 1500)) + 0.5; /* real-valued lengths */
        ll[i] = (double)(20 + moe_rng_below(&rng, 1500));
        sw[i] = 0.5 + 0.002 * lw[i] + moe_rng_normal(&rng);
        sl[i] = 0.002 * ll[i] + moe_rng_normal(&rng);
        fprintf(f, "%.17g,%s,%d,%.17g,\"x, \"\"y\"\"\",%.17g,%.17g\n", ll[i], subsets[i % 4], i, sw[i], sl[i], lw[i]);
    }
    fclose(f);
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, in, "--out", outp, END) == 0, "calibrate failed: %s", out);
    CHECK(rwd_calibrate_pairs(cw, cl, sw, sl, lw, ll, NULL, NULL, N, &cfg, &err) == MOE_OK, "%s", err.msg);
    for (s = 0; s < 4; s++) {
        int n = 0, b = 0, a = 0;
        for (i = s; i < N; i += 4) { n++; b += sw[i] > sl[i]; a += cw[i] > cl[i]; }
        acc_b[s] = (double)b / n;
        acc_a[s] = (double)a / n;
        names[s] = subsets[s];
    }
    rwd_rewardbench_scores(sec[0], &overall[0], names, acc_b, 4);
    rwd_rewardbench_scores(sec[1], &overall[1], names, acc_a, 4);
    CHECK(fabs(value(out, "subset=donotanswer", "acc_after") - acc_a[2]) < 1e-6, "subset line: %s", out);
    CHECK(fabs(value(out, "section=chat_hard", "after") - sec[1][1]) < 1e-6, "section line");
    CHECK(fabs(value(out, "overall", "before") - overall[0]) < 1e-6 && fabs(value(out, "overall", "after") - overall[1]) < 1e-6,
          "overall %g %g vs %g %g", value(out, "overall", "before"), value(out, "overall", "after"), overall[0], overall[1]);
    CHECK(value(out, "length_spearman", "after") < 0.5 * value(out, "length_spearman", "before"), "RC-LWR removes most of the length correlation");
    snprintf(path, sizeof path, "%s/cal.csv", dir);
    f = fopen(path, "r");
    CHECK(f != NULL, "no output rows");
    if (f) {
        char line[512];
        double last_w = NAN;
        int rows = 0;
        CHECK(fgets(line, sizeof line, f) && strstr(line, "len_chosen,cal_chosen,cal_rejected"), "output header: %s", line);
        while (fgets(line, sizeof line, f)) {
            char *c = strrchr(line, ','), *b;
            *c = 0;
            b = strrchr(line, ',');
            last_w = atof(b + 1);
            rows++;
        }
        fclose(f);
        CHECK(rows == N && fabs(last_w - cw[N - 1]) < 1e-12, "%d rows; the last cal_chosen %.17g vs %.17g", rows, last_w, cw[N - 1]);
    }
    snprintf(path, sizeof path, "%s/m.csv", dir);
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, in, "--method", "mean", "--seed", "7", "--out", path, END) == 0 &&
          strstr(out, "overall before="), "RC-Mean run: %s", out);
    remove(path);
    /* bad input */
    snprintf(path, sizeof path, "%s/bad.csv", dir);
    f = fopen(path, "w");
    if (f) {
        fprintf(f, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,4\n2,a,nan,2,3,4\n");
        fclose(f);
    }
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, bad, "--out", badout, END) != 0 && strstr(out, "line 3") &&
          strstr(out, "score_chosen"), "NaN score names line 3: %s", out);
    f = fopen(path, "w");
    if (f) { fprintf(f, "id,subset,score_chosen,score_rejected,len_chosen\n1,a,1,2,3\n"); fclose(f); }
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, bad, "--out", badout, END) != 0 && strstr(out, "len_rejected"), "missing column: %s", out);
    f = fopen(path, "w");
    if (f) { fprintf(f, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n"); fclose(f); }
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, bad, "--out", badout, END) != 0 && strstr(out, "no rows"), "empty input: %s", out);
    f = fopen(path, "w");
    if (f) { fprintf(f, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,4\n2,a,1,2\n"); fclose(f); }
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, bad, "--out", badout, END) != 0 && strstr(out, "line 3"), "short row: %s", out);
    CHECK(proc_run_out(NULL, log, out, sizeof out, cal, in, "--frac", "1.5", "--out", badout, END) != 0 && strstr(out, "frac"), "frac 1.5: %s", out);
    remove(in); remove(outp); remove(bad); remove(badout); remove(log);
    CHECK(rmdir(dir) == 0, "cleanup: %s holds no other file", dir);
}

static void test_length_bias(void) {
    static char out[1 << 16];
    char hh[1200];
    const char *root = test_shared_data(), *log = "build/length_bias_test.log";
    TEST_BEGIN("examples/length_bias --quick: PoE and calibration reduce the length correlation");
    if (!have(proc_example("length_bias"))) return;
    if (root) {
        snprintf(hh, sizeof hh, "%s/preferences/hh-rlhf/helpful-base/test.jsonl.gz", root);
        CHECK(proc_run_out(NULL, log, out, sizeof out, proc_example("length_bias"), "--quick", "--hh", hh, END) == 0, "length_bias failed: %s", out);
    } else {
        printf("SKIP length_bias on HH-RLHF: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n");
        CHECK(proc_run_out(NULL, log, out, sizeof out, proc_example("length_bias"), "--quick", END) == 0, "length_bias failed: %s", out);
    }
    printf("%s", strstr(out, "data=sim method=") ? strstr(out, "data=sim method=") : out);
    CHECK(value(out, "data=sim method=vanilla", "acc") > 0.65, "the vanilla RM learns the simulator");
    CHECK(value(out, "data=sim method=poe ", "length_spearman") < value(out, "data=sim method=vanilla", "length_spearman") - 0.05, "PoE lowers the length correlation");
    CHECK(value(out, "data=sim method=rc_lwr", "length_spearman") < 0.3, "RC-LWR removes most of it");
    CHECK(value(out, "data=sim method=rc_lwr", "true_quality_agreement") > value(out, "data=sim method=vanilla", "true_quality_agreement"),
          "calibration brings the RM closer to the true quality");
    if (root) CHECK(value(out, "data=hh method=vanilla", "acc") > 0.55 && value(out, "data=hh method=poe ", "length_spearman") < value(out, "data=hh method=vanilla", "length_spearman"),
                    "HH-RLHF: vanilla learns; PoE lowers the length correlation");
}

int main(void) {
    test_calibrate();
    test_length_bias();
    return test_summary();
}
