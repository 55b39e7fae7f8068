/* lowess.c - benchmark of reward.h's LOWESS (rwd_lowess) against statsmodels, the routine the
   post-hoc calibration paper calls (spec 2.3, 2.4).

   Data: n integer-like response lengths with many ties (floor of a log-normal, as real
   lengths) and a bimodal reward that grows with length; frac 0.3 (AlpacaEval setting) and 1.0
   (RewardBench setting), it = 3. For every (n, frac): the median of repeated runs of
   rwd_lowess, the same for statsmodels (bench/statsmodels_lowess.py, run through python3), the
   speed-up and the largest |difference| of the fits. If python3 or statsmodels is missing it
   says so and reports rwd_lowess alone.

       build/bench/lowess [--quick]        (PYTHON=/usr/bin/python3 by default)  */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_lowess, moe_rng, moe_time_seconds */
#include "files.h"  /* defines: files_spawn_read, files_spawn_close */
#include "flags.h"  /* defines: flag_switch, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int cmp_double(const void *a, const void *b) {
    double p = *(const double *)a, q = *(const double *)b;
    return (p > q) - (p < q);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* runs statsmodels on (x, y); fills ref (n) and returns its median ms, or -1 if unavailable */
static double run_statsmodels(const double *x, const double *y, size_t n, double frac, int it, int repeats, double *ref) {
    const char *py = getenv("PYTHON") ? getenv("PYTHON") : "/usr/bin/python3";
    char in[64], out[64], line[512];
    double ms = -1.0;
    size_t i;
    FILE *f, *p;
    snprintf(in, sizeof in, "/tmp/rwd_lowess_in_%d.txt", (int)getpid());
    snprintf(out, sizeof out, "/tmp/rwd_lowess_out_%d.txt", (int)getpid());
    f = fopen(in, "w");
    if (!f) return -1.0;
    for (i = 0; i < n; i++) fprintf(f, "%.17g %.17g\n", x[i], y[i]);
    fclose(f);
    { /* python3 bench/statsmodels_lowess.py IN OUT FRAC IT REPEATS, started without a shell */
        const char *argv[8];
        char a_frac[32], a_it[16], a_rep[16];
        long pid;
        files_err fe;
        snprintf(a_frac, sizeof a_frac, "%.17g", frac);
        snprintf(a_it, sizeof a_it, "%d", it);
        snprintf(a_rep, sizeof a_rep, "%d", repeats);
        argv[0] = py; argv[1] = "bench/statsmodels_lowess.py"; argv[2] = in; argv[3] = out;
        argv[4] = a_frac; argv[5] = a_it; argv[6] = a_rep; argv[7] = NULL;
        p = files_spawn_read(argv, 1, &pid, &fe);
        if (p) {
            while (fgets(line, sizeof line, p)) {
                const char *m = strstr(line, "median_ms=");
                if (m) ms = atof(m + 10);
            }
            if (files_spawn_close(p, pid) != 0) ms = -1.0;
        }
    }
    f = ms >= 0 ? fopen(out, "r") : NULL;
    for (i = 0; f && i < n; i++)
        if (fscanf(f, "%lf", &ref[i]) != 1) ms = -1.0;
    if (f) fclose(f);
    remove(in);
    remove(out);
    return ms;
}

int main(int argc, char **argv) {
    static const size_t sizes[3] = {1000, 10000, 100000};
    static const double fracs[2] = {0.3, 1.0};
    int quick = 0, si, fi, have_python = 1, rc;
    flag fl[1];
    flags_program p;
    fl[0] = flag_switch("--quick", &quick, "n = 1000 and 10000 only");
    p = flags_program_make("lowess", "reward.h's LOWESS (rwd_lowess) against statsmodels",
                           "No input: n integer-like lengths with ties and a bimodal reward, frac 0.3 and 1.0, it = 3.\n"
                           "One line per (n, frac): medians of repeated runs of rwd_lowess and of statsmodels (run as\n"
                           "$PYTHON bench/statsmodels_lowess.py, default /usr/bin/python3; skipped with a note when\n"
                           "missing), the speed-up and the largest |difference| of the fits.",
                           fl, 1);
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    printf("bench=lowess threads=%d data=floor(lognormal(6,0.7)) lengths with ties, bimodal reward\n", moe_num_threads());
    for (si = 0; si < (quick ? 2 : 3); si++) {
        size_t n = sizes[si], i, distinct = 0;
        double *x = (double *)malloc(4 * n * sizeof(double)), *y = x + n, *fit = y + n, *ref = fit + n, t[15];
        moe_rng rng;
        moe_err err;
        moe_rng_seed(&rng, 2024 + n);
        for (i = 0; i < n; i++) {
            x[i] = floor(exp(6.0 + 0.7 * moe_rng_normal(&rng)));
            y[i] = 0.0008 * x[i] + (moe_rng_uniform(&rng) < 0.3 ? 1.5 : 0.0) + 0.4 * moe_rng_normal(&rng);
        }
        memcpy(fit, x, n * sizeof(double));
        qsort(fit, n, sizeof(double), cmp_double);
        for (i = 0; i < n; i++) distinct += i == 0 || fit[i] != fit[i - 1];
        for (fi = 0; fi < 2; fi++) {
            int r, reps = n >= 100000 ? 5 : 15;
            double ms, sm_ms = -1.0, diff = 0.0;
            for (r = 0; r < reps; r++) {
                double t0 = moe_time_seconds();
                if (rwd_lowess(fit, x, y, n, fracs[fi], 3, &err) != MOE_OK) { printf("error: %s\n", err.msg); return 1; }
                t[r] = 1000.0 * (moe_time_seconds() - t0);
            }
            ms = median(t, reps);
            if (have_python) {
                sm_ms = run_statsmodels(x, y, n, fracs[fi], 3, n >= 100000 ? 1 : n >= 10000 ? 3 : 7, ref);
                if (sm_ms < 0) {
                    have_python = 0;
                    printf("note: python3 with statsmodels not found (Debian: python3-statsmodels); comparison skipped\n");
                }
            }
            printf("bench=lowess n=%zu distinct=%zu frac=%g it=3 median_ms=%.3f", n, distinct, fracs[fi], ms);
            if (sm_ms >= 0) {
                for (i = 0; i < n; i++) diff = fmax(diff, fabs(fit[i] - ref[i]));
                printf(" statsmodels_ms=%.1f speedup=%.0f max_abs_diff_vs_statsmodels=%.3g", sm_ms, sm_ms / ms, diff);
            }
            printf("\n");
            fflush(stdout);
        }
        free(x);
    }
    return 0;
}
