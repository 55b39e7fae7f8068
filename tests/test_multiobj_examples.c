/* test_multiobj_examples.c - examples/ssrm --quick and examples/armo_dpa --quick as a user runs
 * them: the simulators' findings hold (SSRM's loop and its control run, kept pseudo-labels are
 * the more accurate ones; the ArmoRM gate beats a fixed mix and follows the prompt type; verbosity
 * de-correlation lowers the reward-length correlation; DPA directions move along a front), the
 * real-data parts run when the shared data is there (HH-RLHF, AlpacaEval), bad flags fail with
 * a sentence. Skips with a message when the example binaries are not built (make test builds
 * them; make test-asan their sanitized builds, tests/proc.h's proc_example). Programs start
 * without a shell (tests/proc.h). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"  /* defines: moe_status (test.h's shared-data helper needs nothing else) */
#include "test.h" /* defines: CHECK, TEST_BEGIN, test_summary, test_shared_data */
#include "proc.h" /* defines: proc_run_out, proc_example */

#define END ((const char *)NULL)
#define LOG "build/tmp_multiobj_examples.log"

/* the value after " key=" on the first line that contains `line_has` */
static double value(const char *text, const char *line_has, const char *key) {
    const char *l = strstr(text, line_has), *k, *nl;
    char pat[96];
    if (!l) return NAN;
    nl = strchr(l, '\n');
    snprintf(pat, sizeof pat, " %s=", key);
    k = strstr(l, pat);
    if (!k || (nl && k > nl)) return NAN;
    return atof(k + strlen(pat));
}

static int have(const char *bin) {
    if (access(bin, X_OK) == 0) return 1;
    printf("SKIP %s: not built (run make test, or make test-asan for the sanitized builds)\n", bin);
    return 0;
}

static char out[1 << 18];

static void test_ssrm(void) {
    const char *root = test_shared_data(), *ssrm = proc_example("ssrm");
    TEST_BEGIN("examples/ssrm --quick: SSRM against its control on the simulator; HH-RLHF runs; bad flags");
    if (!have(ssrm)) return;
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, ssrm, "--quick", "--data", root ? root : "/nonexistent", END) == 0, "ssrm failed: %s", out);
    printf("%s", strstr(out, "summary") ? strstr(out, "summary") : out);
    CHECK(value(out, "summary data=sim fraction=0.02", "supervised") > 0.55, "round 0 learns from 2%% of the labels");
    CHECK(fabs(value(out, "summary data=sim fraction=0.02", "gain_r3") -
               (value(out, "summary data=sim fraction=0.02", "ssrm_r3") - value(out, "summary data=sim fraction=0.02", "control"))) < 2e-4,
          "the gain is SSRM's accuracy minus the control's (the same rounds on the labelled pairs alone)");
    CHECK(value(out, "summary data=sim full_labels", "full_labels") > value(out, "summary data=sim fraction=0.02", "ssrm_r3"), "all labels stay ahead");
    CHECK(value(out, "data=sim seed=1 fraction=0.02 labelled=32 round=1", "kept") > 0 &&
          value(out, "data=sim seed=1 fraction=0.02 labelled=32 round=1", "kept_acc") > value(out, "data=sim seed=1 fraction=0.02 labelled=32 round=1", "pseudo_acc"),
          "pseudo-labels pass the threshold, and the kept ones are more accurate than all of them");
    CHECK(strstr(out, "paper_claim=") != NULL && access("out/ssrm.csv", R_OK) == 0 && access("out/ssrm_sim.png", R_OK) == 0, "claim line, CSV and PNG");
    if (root) CHECK(value(out, "summary data=hh full_labels", "full_labels") > 0.55 && access("out/ssrm_hh.png", R_OK) == 0, "HH-RLHF: a BT head beats chance with all labels");
    else printf("SKIP ssrm on HH-RLHF: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n");
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, ssrm, "--quick", "--threshold", "0.5", END) != 0 && strstr(out, "(0.5, 1]"), "threshold 0.5: %s", out);
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, ssrm, "--fractions", "0,1", END) != 0 && strstr(out, "(0, 1]"), "fraction 0: %s", out);
}

static void test_armo_dpa(void) {
    const char *root = test_shared_data(), *armo = proc_example("armo_dpa");
    int t;
    static const char *const types[3] = {"chat", "factual", "sensitive"};
    static const char *const own[3] = {"helpfulness", "correctness", "safety"};
    TEST_BEGIN("examples/armo_dpa --quick: gate > fixed mix, gates follow the prompt type, de-correlation, DPA front; real data");
    if (!have(armo)) return;
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, armo, "--quick", "--data", root ? root : "/nonexistent", END) == 0, "armo_dpa failed: %s", out);
    printf("%s", strstr(out, "summary") ? strstr(out, "summary") : out);
    CHECK(value(out, "summary data=sim stage1_recovery", "helpfulness") > 0.8 && value(out, "summary data=sim stage1_recovery", "correctness") > 0.8 &&
          value(out, "summary data=sim stage1_recovery", "verbosity") > 0.8, "stage 1 recovers the rated objectives");
    CHECK(fabs(value(out, "summary data=sim length_spearman_debiased", "helpfulness")) < value(out, "summary data=sim length_spearman_raw", "helpfulness") - 0.2,
          "verbosity de-correlation removes the helpfulness reward's length correlation");
    CHECK(value(out, "summary data=sim accuracy", "armo_gate") > value(out, "summary data=sim accuracy", "fixed_mix") + 0.02 &&
          value(out, "summary data=sim accuracy", "armo_gate") > value(out, "summary data=sim accuracy", "uniform_mix") + 0.02,
          "the prompt-conditioned gate beats a fixed mix and the uniform mix");
    CHECK(value(out, "summary data=sim accuracy", "armo_gate") <= value(out, "summary data=sim accuracy", "true_utility") + 0.02, "and stays under the labels' ceiling");
    for (t = 0; t < 3; t++) {
        char line[96];
        int k;
        static const char *const objs[4] = {"helpfulness", "correctness", "verbosity", "safety"};
        double mine;
        snprintf(line, sizeof line, "summary data=sim gate prompt_type=%s", types[t]);
        mine = value(out, line, own[t]);
        for (k = 0; k < 4; k++)
            if (strcmp(objs[k], own[t]) != 0) CHECK(mine > value(out, line, objs[k]), "%s prompts weigh %s above %s", types[t], own[t], objs[k]);
    }
    CHECK(value(out, "summary data=sim dpa theta=-45", "length") < value(out, "summary data=sim dpa theta=0", "length") &&
          value(out, "summary data=sim dpa theta=0", "length") < value(out, "summary data=sim dpa theta=75", "length"), "turning toward verbosity lengthens the picks");
    CHECK(value(out, "summary data=sim dpa hv_directions", "hv_directions") > value(out, "summary data=sim dpa hv_directions", "hv_scalar"), "the directions' front covers more than the scalar picks");
    CHECK(strstr(out, "helpfulness*97 + verbosity*-26") != NULL, "the -15 degree prompt's integer weights");
    CHECK(access("out/armo_dpa.csv", R_OK) == 0 && access("out/armo_dpa_gates.png", R_OK) == 0 && access("out/armo_dpa_front.png", R_OK) == 0, "CSV and PNGs");
    if (root) {
        CHECK(value(out, "summary data=hh", "length_rho_after") < value(out, "summary data=hh", "length_rho_before") - 0.2, "HH-RLHF: de-correlation lowers the length correlation");
        CHECK(value(out, "summary data=alpacaeval dpa theta=75", "avg_length") > value(out, "summary data=alpacaeval dpa theta=-45", "avg_length"),
              "AlpacaEval: the verbosity weight lengthens the picks");
    } else {
        printf("SKIP armo_dpa on HH-RLHF and AlpacaEval: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n");
    }
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, armo, "--seeds", "99", END) != 0 && strstr(out, "between 1 and 16"), "too many seeds: %s", out);
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, armo, "--bogus", END) != 0 && strstr(out, "unknown flag '--bogus'"), "unknown flag: %s", out);
}

int main(void) {
    test_ssrm();
    test_armo_dpa();
    return test_summary();
}
