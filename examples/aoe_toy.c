/* aoe_toy.c - the toy of the Autonomy-of-Experts paper (appendix B): which expert takes which
 * class, for a routed MoE and for AoE.
 *
 * Three Gaussian classes in d dimensions (class 0 around +mu, class 1 around -mu, class 2
 * around 0; well separated). One layer of 2 SwiGLU experts, top-1, then a linear read-out to
 * 3 logits, cross-entropy. Stage 1 trains on classes 0 and 1; stage 2 adds class 2. The paper
 * reports that a routed MoE splits classes 0 and 1 over its two experts (the router does the
 * classifying) and then sends class 2 to both, while AoE serves classes 0 and 1 with ONE
 * expert and gives the idle one class 2. Top-1 AoE uses the official code's weighting
 * (softmax over all norms): with one chosen expert the paper's softmax over the chosen
 * norms is always 1 and would give the norms no gradient.
 *
 *   build/examples/aoe_toy [--steps N] [--d D] [--seeds S] [--quick] [--out DIR]
 *
 * Prints the share of each class's tokens per expert after each stage, per seed and model, a
 * summary line per model, and writes out/aoe_toy.png (the stage-2 shares).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_layer_*, moe_matmul_*, moe_crossentropy_*, moe_adamw_step */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_heatmap */
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { C = 3, E = 2, BATCH = 96 };

typedef struct toy {
    moe_store S;
    moe_layer L;
    int id_out; /* read-out (C, d) */
} toy;

static void make_batch(float *x, int *y, int n, int d, int classes, moe_rng *r) {
    int i, j;
    for (i = 0; i < n; i++) {
        int c = moe_rng_below(r, classes);
        float mu = c == 0 ? 1.0f : c == 1 ? -1.0f : 0.0f;
        y[i] = c;
        for (j = 0; j < d; j++) x[i * d + j] = mu + 0.25f * moe_rng_normal(r); /* > 3 sigma apart */
    }
}

/* one training step; returns the loss */
static double step(toy *t, const float *x, const int *y, int n, int d, long long k, float *h, float *logits, float *dl,
                   float *dh, float *dx) {
    const moe_adamw_config opt = {0.9f, 0.999f, 1e-8f, 0.0f};
    float *losses = (float *)malloc(sizeof(float) * (size_t)n);
    double loss;
    moe_layer_forward(&t->L, &t->S, h, x, n, NULL);
    moe_matmul_forward(logits, h, moe_store_param(&t->S, t->id_out), NULL, n, d, C, NULL);
    loss = moe_crossentropy_forward(losses, logits, y, n, C);
    moe_store_zero_grad(&t->S);
    memset(dl, 0, sizeof(float) * (size_t)n * C);
    memset(dh, 0, sizeof(float) * (size_t)n * d);
    memset(dx, 0, sizeof(float) * (size_t)n * d);
    moe_crossentropy_backward(dl, logits, y, n, C, 1.0f / (float)n);
    moe_matmul_backward(dh, moe_store_grad(&t->S, t->id_out), NULL, dl, h, moe_store_param(&t->S, t->id_out), n, d, C, NULL);
    moe_layer_backward(&t->L, &t->S, dx, dh, x, NULL);
    moe_adamw_step(&t->S, &opt, 3e-3f, k);
    free(losses);
    return loss;
}

/* share[c][e]: fraction of class c's tokens routed to expert e, on a fresh batch */
static void shares(toy *t, float *share, int d, moe_rng *r, float *x, int *y, float *h) {
    int count[C] = {0, 0, 0}, i, c, e;
    make_batch(x, y, BATCH, d, C, r);
    moe_layer_forward(&t->L, &t->S, h, x, BATCH, NULL);
    for (i = 0; i < C * E; i++) share[i] = 0.0f;
    for (i = 0; i < t->L.routed.n; i++) share[y[t->L.routed.token[i]] * E + t->L.routed.expert[i]] += 1.0f;
    for (i = 0; i < BATCH; i++) count[y[i]]++;
    for (c = 0; c < C; c++)
        for (e = 0; e < E; e++) share[c * E + e] /= (float)(count[c] ? count[c] : 1);
}

static const char *const about =
    "Three Gaussian classes in d dimensions (no input file). One layer of 2 SwiGLU experts, top-1,\n"
    "a linear read-out, cross-entropy. Stage 1 trains on classes 0 and 1, stage 2 adds class 2\n"
    "(Autonomy-of-Experts, appendix B). Prints each class's share per expert after each stage,\n"
    "per seed and model, a summary line per model, and writes DIR/aoe_toy.png.";

int main(int argc, char **argv) {
    int steps = 400, d = 32, seeds = 3, quick = 0, seed, kind;
    const char *out = "out";
    /* per model: seeds where stage 1 kept classes 0 and 1 on one expert, and stage 2 then gave
       class 2 mostly to the other one */
    int one_expert[2] = {0, 0}, idle_takes_new[2] = {0, 0};
    float last[2][C * E];
    char path[512];
    {
        flag fl[5];
        flags_program p;
        int rc;
        fl[0] = flag_int("--steps", &steps, 1, 1e8, "training steps per stage");
        fl[1] = flag_int("--d", &d, 4, 4096, "input width");
        fl[2] = flag_int("--seeds", &seeds, 1, 1000, "seeds per model");
        fl[3] = flag_string("--out", &out, "DIR", "output folder (created)");
        fl[4] = flag_switch("--quick", &quick, "150 steps per stage, 2 seeds");
        p = flags_program_make("aoe_toy", "the Autonomy-of-Experts toy: which expert takes which class, routed MoE vs AoE", about, fl, 5);
        rc = flags_parse(&p, argc, argv);
        if (rc != FLAGS_RUN) return rc;
    }
    if (quick) { steps = 150; seeds = 2; }
    {
        files_err fe; /* the output folder first: a bad --out fails before the training */
        if (files_mkdirs(out, &fe) != 0) { fprintf(stderr, "aoe_toy: %s\n", fe.msg); return 1; }
    }
    printf("setting d=%d experts=2 top_k=1 classes=3 batch=%d steps_per_stage=%d seeds=%d threads=%d\n", d, BATCH, steps,
           seeds, moe_num_threads());
    for (kind = 0; kind < 2; kind++)
        for (seed = 1; seed <= seeds; seed++) {
            toy t;
            moe_layer_config c = moe_layer_config_default();
            moe_rng r;
            float *x = (float *)malloc(sizeof(float) * BATCH * (size_t)d), *h = (float *)malloc(sizeof(float) * BATCH * (size_t)d);
            float *dh = (float *)malloc(sizeof(float) * BATCH * (size_t)d), *dx = (float *)malloc(sizeof(float) * BATCH * (size_t)d);
            float logits[BATCH * C], dl[BATCH * C], s1[C * E], s2[C * E];
            int y[BATCH], k, stage;
            long long n = 0;
            double loss = 0.0;
            c.d = d; c.d_ff = 2 * d; c.n_experts = E; c.top_k = 1; c.renormalize = 0;
            c.balance = MOE_BALANCE_NONE; c.router_init_std = 0.02f;
            if (kind == 1) { c.router = MOE_ROUTER_AOE; c.aoe_rank = d / 4; c.d_ff = moe_aoe_matched_width(d, 2 * d, d / 4); }
            moe_store_init(&t.S);
            if (moe_layer_init(&t.L, &c, &t.S, "moe.", BATCH) != MOE_OK) { fprintf(stderr, "%s\n", t.L.err.msg); return 1; }
            t.id_out = moe_store_add(&t.S, "readout", MOE_TENSOR_DECAY, C, d, 0, 0);
            moe_store_alloc(&t.S, 1);
            moe_rng_seed(&r, (uint64_t)seed);
            moe_layer_init_weights(&t.L, &t.S, &r);
            for (k = 0; k < C * d; k++) moe_store_param(&t.S, t.id_out)[k] = 0.1f * moe_rng_normal(&r);
            for (stage = 1; stage <= 2; stage++) {
                for (k = 0; k < steps; k++) {
                    make_batch(x, y, BATCH, d, stage == 1 ? 2 : 3, &r);
                    loss = step(&t, x, y, BATCH, d, ++n, h, logits, dl, dh, dx);
                }
                shares(&t, stage == 1 ? s1 : s2, d, &r, x, y, h);
                printf("model=%s seed=%d stage=%d loss=%.4f", kind ? "aoe" : "moe", seed, stage, loss);
                for (k = 0; k < (stage == 1 ? 2 : 3); k++)
                    printf(" class%d=%.2f/%.2f", k, (double)(stage == 1 ? s1 : s2)[k * E], (double)(stage == 1 ? s1 : s2)[k * E + 1]);
                printf("\n");
            }
            {
                /* stage 1: both old classes mostly on one expert; stage 2: the new class mostly on the other */
                int e1 = s1[0] + s1[E] >= s1[1] + s1[E + 1] ? 0 : 1;
                int same = s1[e1] > 0.8f && s1[E + e1] > 0.8f;
                one_expert[kind] += same;
                idle_takes_new[kind] += same && s2[2 * E + (1 - e1)] > 0.8f;
            }
            memcpy(last[kind], s2, sizeof s2);
            moe_layer_free(&t.L);
            moe_store_free(&t.S);
            free(x); free(h); free(dh); free(dx);
        }
    for (kind = 0; kind < 2; kind++)
        printf("result model=%s seeds=%d one_expert_for_classes_0_1=%d idle_expert_takes_class_2=%d\n", kind ? "aoe" : "moe",
               seeds, one_expert[kind], idle_takes_new[kind]);
    {
        float grid[2 * C * E];
        const char *rows[6] = {"moe class 0", "moe class 1", "moe class 2", "aoe class 0", "aoe class 1", "aoe class 2"};
        plot_heatmap_opts o;
        memset(&o, 0, sizeof o);
        memcpy(grid, last[0], sizeof last[0]);
        memcpy(grid + C * E, last[1], sizeof last[1]);
        o.title = "stage 2: share of each class per expert (last seed)";
        o.xlabel = "expert";
        o.row_labels = rows;
        o.annotate = 1;
        o.v_min = 0.0f;
        o.v_max = 1.0f;
        snprintf(path, sizeof path, "%s/aoe_toy.png", out);
        if (plot_heatmap(path, &o, grid, 2 * C, E) != 0) fprintf(stderr, "could not write %s\n", path);
        else printf("wrote %s\n", path);
    }
    return 0;
}
