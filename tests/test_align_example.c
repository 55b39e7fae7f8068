/* test_align_example.c - examples/align --quick as a user runs it: pre-training, the style head,
 * RSF under two directions, model averaging, part-wise averaging, HMA against uniform ratios and
 * the four merges all run and print what the README reads; the averaging endpoints are the two
 * models exactly; best-of-n keeps better than the mean; HMA holds its mean ratio; CSV and PNGs
 * are written; a target outside the genres fails with a sentence. Skips the runs when
 * data/brown is absent. Programs start without a shell (tests/proc.h). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"  /* (the test harness links the implementation) */
#include "test.h" /* defines: CHECK, TEST_BEGIN, test_summary */
#include "proc.h" /* defines: proc_run_out, proc_example */

#define END ((const char *)NULL)
#define LOG "build/tmp_align/align.log"

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

static char out[1 << 18];

int main(void) {
    const char *align = proc_example("align");
    proc_opts one = proc_opts_default();
    FILE *f;
    mkdir("build/tmp_align", 0777);
    TEST_BEGIN("examples/align --quick: RSF under directions, averaging, HMA and merging against the tax");
    if (access(align, X_OK) != 0) {
        printf("SKIP %s: not built (run make test, or make test-asan for the sanitized builds)\n", align);
        return test_summary();
    }
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, align, "--help", END) == 0 && strstr(out, "usage: "), "align --help: %s", out);
    if (!(f = fopen("data/brown/train/romance.txt", "rb"))) {
        printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return test_summary();
    }
    fclose(f);
    one.env[0] = "OMP_NUM_THREADS=1";
    CHECK(proc_run_out(&one, LOG, out, sizeof out, align, "--quick", "--out", "build/tmp_align", END) == 0, "align failed: %s", out);
    printf("%s", strstr(out, "summary") ? strstr(out, "summary") : out);
    {
        double tax_pre = value(out, "exp=pre ", "tax_bpb"), style_pre = value(out, "exp=pre ", "style");
        double b0, b1, lam, l1, l2;
        const char *p;
        CHECK(tax_pre > 3.0 && tax_pre < 8.5, "a barely trained byte model's tax %g bits/byte", tax_pre);
        CHECK(value(out, "exp=ma label=ma param=0.000", "tax_bpb") == tax_pre && value(out, "exp=ma label=ma param=0.000", "style") == style_pre,
              "lambda = 0 is the pre-trained model (same tax and rewards under the same sampler seeds)");
        CHECK(value(out, "exp=ma label=ma param=1.000", "tax_bpb") == value(out, "summary", "post_tax") &&
                  value(out, "exp=ma label=ma param=1.000", "style") == value(out, "summary", "post_style"),
              "lambda = 1 is the aligned model");
        CHECK(value(out, "label=theta0 param=1.000", "kept_reward") >= value(out, "label=theta0 param=1.000", "all_reward") &&
                  value(out, "label=theta90 param=2.000", "kept_reward") >= value(out, "label=theta90 param=2.000", "all_reward"),
              "best-of-n keeps responses at least as good as the mean candidate");
        b0 = value(out, "label=theta0 param=1.000", "kept_loss_before");
        b1 = value(out, "label=theta0 param=1.000", "kept_loss_after");
        CHECK(b1 < b0, "fine-tuning lowers the loss on the kept set: %g -> %g", b0, b1);
        lam = value(out, "exp=hma ", "param");
        p = strstr(out, "lambdas=");
        CHECK(p && sscanf(p, "lambdas=%lf/%lf", &l1, &l2) == 2 && fabs(0.5 * (l1 + l2) - lam) < 2e-3,
              "HMA's block ratios keep their mean %g", lam);
        CHECK(value(out, "exp=uniform ", "param") == lam && value(out, "exp=hma_all ", "param") == lam, "a uniform merge at HMA's mean follows it, then HMA on all tensors");
        CHECK(!isnan(value(out, "exp=merge label=linear", "style")) && !isnan(value(out, "exp=merge label=slerp", "style")) &&
                  !isnan(value(out, "exp=merge label=ties", "style")) && !isnan(value(out, "exp=merge label=dare_linear", "style")),
              "every merge method is evaluated");
        CHECK(fabs(value(out, "summary", "rho_theta_verbosity")) <= 1.0 && value(out, "summary", "hv_linear") >= 0.0, "summary line");
    }
    /* pre + 2 directions x 2 rounds + 3 lambdas + 2 part-wise + HMA, uniform, HMA on all tensors + 4 merges, and the header */
    CHECK(proc_file_lines("build/tmp_align/align_s1.csv") == 1 + 1 + 4 + 3 + 2 + 3 + 4, "CSV rows: %ld", proc_file_lines("build/tmp_align/align_s1.csv"));
    CHECK(proc_file_lines("build/tmp_align/align_tax_s1.png") > 0 && proc_file_lines("build/tmp_align/align_dirs_s1.png") > 0, "both plots written");
    CHECK(proc_run_out(NULL, LOG, out, sizeof out, align, "--quick", "--target", "humor", "--out", "build/tmp_align", END) == 2 &&
              strstr(out, "must be one of"),
          "a target outside the pre-training genres is refused: %s", out);
    return test_summary();
}
