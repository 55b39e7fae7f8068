/* migu.c - the wall-time overhead of MIGU (arXiv 2406.17245; the paper reports 8-13%, Table
   10) in moe.h: training steps of a small byte-level LM with plain fine-tuning (forward,
   backward, clip, AdamW) against the same steps with MIGU (statistics after each
   micro-batch's forward, the mask from them, the masked step), for a dense and an MoE model.
   Prints key=value lines: ms per step of each and the overhead in percent (median of
   repeats), by wall clock and by the process's CPU time (clock(); on a shared machine run it
   with OMP_NUM_THREADS=1 and read the CPU figures, which other processes do not inflate).

       build/bench/migu [--quick] [--steps N]  */
#define MOE_IMPLEMENTATION
#include "moe.h"   /* defines: moe_model_*, moe_migu_*, moe_mask_*, moe_time_seconds */
#include "flags.h" /* defines: flag_int, flag_switch, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int cmp_double(const void *a, const void *b) {
    double p = *(const double *)a, q = *(const double *)b;
    return (p > q) - (p < q);
}

/* ms per step: `migu` 0 = plain steps, 1 = MIGU steps (L1 statistic, update mask) */
static double run(moe_model *m, int migu, int steps, int B, int T, int micro, const int *tok, double *cpu_ms) {
    moe_migu g;
    moe_mask k;
    moe_migu_config mc = moe_migu_config_default();
    moe_adamw_config ac = moe_adamw_config_default();
    double t0;
    clock_t c0;
    int s, u;
    if (migu && (moe_migu_init(&g, m, &mc) != MOE_OK || moe_mask_init(&k, &m->S, MOE_MASK_UPDATE) != MOE_OK)) return -1.0;
    t0 = moe_time_seconds();
    c0 = clock();
    for (s = 1; s <= steps; s++) {
        moe_store_zero_grad(&m->S);
        for (u = 0; u < micro; u++) {
            const int *x = tok + (size_t)((s * micro + u) % 8) * (B * T + 1);
            moe_model_forward(m, x, x + 1, B, T, NULL);
            if (migu) moe_migu_accumulate(&g, m);
            moe_model_backward(m, 1.0f / micro);
        }
        if (migu) {
            moe_migu_mask(&g, m, &k);
            moe_mask_step(&k, &m->S, &ac, 1e-4f, s, 1.0f, NULL);
        } else {
            moe_clip_grad_norm(&m->S, 1.0f);
            moe_adamw_step(&m->S, &ac, 1e-4f, s);
        }
    }
    t0 = moe_time_seconds() - t0;
    *cpu_ms = 1e3 * (double)(clock() - c0) / CLOCKS_PER_SEC / steps;
    if (migu) { moe_migu_free(&g); moe_mask_free(&k); }
    return 1e3 * t0 / steps;
}

int main(int argc, char **argv) {
    int quick = 0, steps = 10, repeats = 5, B = 8, T = 64, micro = 2, rc, kind, i;
    flag fl[] = {
        flag_switch("--quick", &quick, "a smoke run (2 steps, 1 repeat)"),
        flag_int("--steps", &steps, 1, 1e6, "training steps per timing"),
        flag_int("--repeats", &repeats, 1, 1000, "timings per arm (the median is printed)"),
    };
    flags_program p = flags_program_make("migu", "wall-time overhead of MIGU's statistics and masked steps over plain fine-tuning",
                                         "no input; prints key=value lines", fl, FLAGS_COUNT(fl));
    int *tok;
    moe_rng r;
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    if (quick) { steps = 2; repeats = 1; }
    tok = (int *)malloc(sizeof(int) * 8 * (size_t)(B * T + 1));
    if (!tok) return 1;
    moe_rng_seed(&r, 1);
    for (i = 0; i < 8 * (B * T + 1); i++) tok[i] = moe_rng_below(&r, 256);
    printf("bench=migu steps=%d repeats=%d batch=%dx%d micro_batches=%d threads=%d\n", steps, repeats, B, T, micro, moe_num_threads());
    for (kind = 0; kind < 2; kind++) {
        moe_model m;
        moe_model_config c = moe_model_config_default();
        double t[2][1000], cpu[2][1000], ms[2], cms[2];
        int a, rep;
        c.vocab = 256; c.max_seq = T; c.d = 128; c.n_layers = 4; c.n_heads = 4; c.d_ff = 512; c.pos = MOE_POS_ROPE;
        c.moe_every = kind; c.moe.n_experts = 8; c.moe.top_k = 2; c.moe.d_ff = 128;
        if (moe_model_init(&m, &c, B, T) != MOE_OK) {
            fprintf(stderr, "migu: %s\n", m.err.msg);
            return 1;
        }
        moe_model_init_weights(&m, 1);
        for (rep = 0; rep < repeats; rep++)
            for (a = 0; a < 2; a++) t[a][rep] = run(&m, a, steps, B, T, micro, tok, &cpu[a][rep]); /* interleaved: drift hits both */
        for (a = 0; a < 2; a++) {
            qsort(t[a], (size_t)repeats, sizeof(double), cmp_double);
            ms[a] = t[a][repeats / 2];
            qsort(cpu[a], (size_t)repeats, sizeof(double), cmp_double);
            cms[a] = cpu[a][repeats / 2];
        }
        printf("model=%s params=%zu ft_ms_per_step=%.2f migu_ms_per_step=%.2f overhead_pct=%.1f ft_cpu_ms=%.2f migu_cpu_ms=%.2f cpu_overhead_pct=%.1f\n",
               kind ? "moe" : "dense", moe_model_params_total(&m), ms[0], ms[1], 100.0 * (ms[1] - ms[0]) / ms[0], cms[0], cms[1],
               100.0 * (cms[1] - cms[0]) / cms[0]);
        moe_model_free(&m);
    }
    free(tok);
    return 0;
}
