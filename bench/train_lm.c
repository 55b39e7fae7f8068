/* bench/train_lm.c - training throughput of the tiny byte-level transformer (moe_model_* API):
   one training step = forward with targets + zero-grad + backward + AdamW, on random bytes.

     dense  d=256 L=4 heads=4 seq=256 batch=8, learned positions, dense SwiGLU d_ff=1024
     moe    the same with every FFN an MoE layer: 8 SwiGLU experts of width 512, top-2,
            softmax router renormalised (Mixtral), Mixtral balance loss 0.01
            (active FFN parameters per token equal the dense model's)

   One line per config (median of --reps timed steps, default 7, after WARMUP steps):
     bench=train_lm config=C threads=P tokens=N median_ms= tokens_per_s= params= active_params=
         steps_s=   (wall seconds of all WARMUP + REPS steps, for bench/profile.sh)
   bench/torch_train_lm.py is the PyTorch peer. Optional argument: one config name. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "flags.h" /* defines: flags_program_make, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WARMUP 2
#define REPS_MAX 1000

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int bench_config(const char *name, int moe, int reps) {
    const int B = 8, T = 256, N = B * T;
    moe_model_config c = moe_model_config_default();
    moe_adamw_config opt = moe_adamw_config_default();
    moe_model m;
    moe_rng rng;
    int *inp, *tgt, r, i, threads = moe_num_threads();
    static double t[REPS_MAX];
    double ms, steps_s = 0.0;
    c.vocab = 256;
    c.max_seq = T;
    c.d = 256;
    c.n_layers = 4;
    c.n_heads = 4;
    c.d_ff = 1024;
    c.pos = MOE_POS_LEARNED;
    c.moe_every = moe ? 1 : 0;
    c.moe.n_experts = 8;
    c.moe.top_k = 2;
    c.moe.d_ff = 512;
    c.moe.router = MOE_ROUTER_TOPK;
    c.moe.renormalize = 1;
    c.moe.balance = MOE_BALANCE_MIXTRAL;
    c.moe.balance_coef = 0.01f;
    if (moe_model_init(&m, &c, B, T) != MOE_OK) {
        printf("bench=train_lm config=%s error=\"%s\"\n", name, m.err.msg);
        return 1;
    }
    moe_model_init_weights(&m, 1234);
    inp = (int *)malloc(sizeof(int) * (N + 1));
    tgt = (int *)malloc(sizeof(int) * N);
    moe_rng_seed(&rng, 42);
    for (r = -WARMUP; r < reps; r++) {
        double t0, dt;
        moe_status st;
        for (i = 0; i <= N; i++) inp[i] = (int)(moe_rng_u32(&rng) & 255);
        for (i = 0; i < N; i++) tgt[i] = inp[i + 1];
        t0 = moe_time_seconds();
        st = moe_model_forward(&m, inp, tgt, B, T, NULL);
        moe_store_zero_grad(&m.S);
        if (st == MOE_OK) st = moe_model_backward(&m, 1.0f);
        if (st == MOE_OK) st = moe_adamw_step(&m.S, &opt, 3e-4f, (long long)(r + WARMUP + 1));
        if (st != MOE_OK) {
            printf("bench=train_lm config=%s error=\"%s%s\"\n", name, m.err.msg, m.S.err.msg);
            return 1;
        }
        dt = moe_time_seconds() - t0;
        steps_s += dt;
        if (r >= 0) t[r] = dt;
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    ms = t[reps / 2] * 1e3;
    printf("bench=train_lm config=%s threads=%d tokens=%d median_ms=%.2f tokens_per_s=%.0f loss=%.4f params=%zu "
           "active_params=%zu steps_s=%.3f\n",
           name, threads, N, ms, N / ms * 1e3, m.loss, moe_model_params_total(&m), moe_model_params_active(&m), steps_s);
    fflush(stdout);
    free(inp);
    free(tgt);
    moe_model_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    int rc = 0, reps = 7;
    const char *only = NULL;
    flag fl[1];
    flags_program p;
    fl[0] = flag_int("--reps", &reps, 1, REPS_MAX, "timed steps (bench/profile.sh runs many, so that the warm-up steps' first touch of memory is a small share)");
    p = flags_program_make("train_lm", "training throughput of the tiny byte-level transformer (bench)",
                                         "No input (random bytes). One line per config: bench=train_lm config=C threads= tokens=\n"
                                         "median_ms= tokens_per_s= params= active_params= steps_s=. CONFIG: dense or moe (default: both).",
                                         fl, 1);
    flags_positional(&p, &only, 1, "[CONFIG]");
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    rc = 0;
    if (only && strcmp(only, "dense") != 0 && strcmp(only, "moe") != 0) {
        fprintf(stderr, "train_lm: unknown config '%s' (dense, moe)\n", only);
        return 2;
    }
    if (!only || strcmp(only, "dense") == 0) rc |= bench_config("dense", 0, reps);
    if (!only || strcmp(only, "moe") == 0) rc |= bench_config("moe", 1, reps);
    return rc;
}
