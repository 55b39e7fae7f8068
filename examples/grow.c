/* grow.c - G_stack (arXiv 2405.15319) at laptop scale: grow a trained small byte-level LM into
 * a deeper one and compare it with training the deep one from scratch at equal FLOPs.
 *
 *   make data                      # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/grow [--budget STEPS] [--seeds N] [--quick] [--out DIR] ...
 *
 * The target: an 8-layer decoder (the model of moe.h, dense SwiGLU FFNs, or --moe). A base of
 * 8/g layers (g = 4: 2 layers) is trained for a share d of the FLOP budget, grown to 8
 * layers, then trained with a fresh AdamW (warm-up and cosine restart) for the rest of the
 * budget. Every run spends the same FLOPs: 6 x (parameters a token uses, without the
 * position table, with the tied head) x tokens, the base's FLOPs included. Runs per seed:
 *   scratch            the 8-layer model from its initialisation
 *   stack_d<k>         G_stack (layer j = base layer j mod l) from bases trained on each d
 *   zero, random, learn, interp, noise   the other operators at the operator d (G_zero,
 *                      G_random with a mask ramp, G_learn's learned depth map, layer
 *                      interpolation, G_stack + 20% noise)
 *   g2, g8             G_stack from a 4-layer and a 1-layer base at the operator d
 * Speed-up (the paper's): sp = FLOPs_scratch / FLOPs_grown - 1 at equal validation loss (the
 * scratch run's final loss; a run that never reaches it gets the negative figure at its own
 * final loss). Prints a settings table, key=value lines per evaluation and a results table
 * (mean +- std over seeds); writes DIR/grow.csv (every evaluation), grow_results.csv,
 * grow.md, grow_loss.png (loss against FLOPs, mean over seeds).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_*, moe_model_grow, moe_grow_*, moe_adamw_step, moe_loader_* */
#define PLOT_IMPLEMENTATION
#include "plot.h"  /* defines: plot_lines */
#include "files.h" /* defines: files_mkdirs, files_atomic_* */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SEEDS 8
#define MAX_RUNS 16

typedef struct options {
    int d, layers, heads, d_ff, moe, seq, batch, budget, warmup, eval_every, eval_batches, seeds, ramp, learn_steps, g, g_sweep, quick;
    float lr, min_lr, wd, clip, d_small, d_medium, d_op, noise, learn_lr;
    const char *data_dir, *out_dir;
} options;

/* one run of the comparison: which base, how grown */
typedef struct run_spec {
    char name[24];
    int g;          /* 0: from scratch */
    float d_frac;   /* the base's share of the FLOP budget                       */
    moe_grow_op op;
    moe_grow_order order;
    float noise;
    char what[96];
} run_spec;

typedef struct curve {
    int n;
    double flops[512], loss[512];
} curve;

typedef struct result {
    curve c;
    double final_loss, speedup, base_loss, grown_loss0, seconds;
} result;

static const char *const about =
    "Data: the Brown corpus as `make data` writes it, DIR/{train,val}/<genre>.txt (all 15 genres). Each\n"
    "seed trains the 8-layer model from scratch and grown from small bases (see the run list printed\n"
    "with the settings), all at the same FLOP budget, the base's FLOPs counted. Validation: the same\n"
    "fixed windows of the validation text for every run. Prints a settings table, key=value lines and\n"
    "the results (mean +- std over seeds); writes DIR/grow.csv, grow_results.csv, grow.md, grow_loss.png.";

static int parse(options *o, int argc, char **argv) {
    flag fl[40];
    flags_program p;
    int n = 0, rc;
    memset(o, 0, sizeof *o);
    o->d = 32; o->layers = 8; o->heads = 2; o->d_ff = 96; o->seq = 64; o->batch = 4; o->budget = 500; o->warmup = 20;
    o->eval_every = 20; o->eval_batches = 8; o->seeds = 3; o->ramp = 50; o->learn_steps = 10; o->g = 4; o->g_sweep = 1;
    o->lr = 3e-3f; o->min_lr = 3e-4f; o->wd = 0.1f; o->clip = 1.0f; o->d_small = 0.05f; o->d_medium = 0.2f; o->d_op = 0.2f;
    o->noise = 0.2f; o->learn_lr = 0.01f;
    o->data_dir = "data/brown"; o->out_dir = "out";
    fl[n++] = flag_heading("the target model");
    fl[n++] = flag_int("--d", &o->d, 8, 4096, "model width");
    fl[n++] = flag_int("--layers", &o->layers, 2, 64, "target depth (a multiple of g and of every swept g)");
    fl[n++] = flag_int("--heads", &o->heads, 1, 64, "attention heads (divides --d)");
    fl[n++] = flag_int("--d-ff", &o->d_ff, 1, 1 << 16, "dense SwiGLU width (MoE: the width of one expert)");
    fl[n++] = flag_switch("--moe", &o->moe, "MoE FFNs in every layer (8 experts, top-2) instead of dense");
    fl[n++] = flag_heading("growth");
    fl[n++] = flag_int("--g", &o->g, 1, 64, "growth factor of the main runs (base depth = layers / g)");
    fl[n++] = flag_int("--g-sweep", &o->g_sweep, 0, 1, "1: also G_stack with g = 2 and g = 8 at the operator d");
    fl[n++] = flag_float("--d-small", &o->d_small, 0, 0.9, "small growth timing: the base's share of the FLOP budget");
    fl[n++] = flag_float("--d-medium", &o->d_medium, 0, 0.9, "medium growth timing");
    fl[n++] = flag_float("--d-op", &o->d_op, 0, 0.9, "the growth timing of the operator comparison and the g sweep");
    fl[n++] = flag_int("--ramp", &o->ramp, 0, 1e8, "G_random: steps of the mask ramp 0 -> 1");
    fl[n++] = flag_int("--learn-steps", &o->learn_steps, 0, 1e6, "G_learn: steps fitting the depth map (their FLOPs count)");
    fl[n++] = flag_float("--learn-lr", &o->learn_lr, 0, 10, "G_learn: Adam learning rate of the depth map");
    fl[n++] = flag_float("--noise", &o->noise, 0, 0.99, "the noise run's share alpha of W <- (1-alpha) W + alpha eps");
    fl[n++] = flag_heading("training");
    fl[n++] = flag_int("--budget", &o->budget, 10, 1e8, "FLOP budget in steps of the target model");
    fl[n++] = flag_int("--batch", &o->batch, 1, 4096, "sequences per batch");
    fl[n++] = flag_int("--seq", &o->seq, 2, 4096, "bytes per sequence");
    fl[n++] = flag_float("--lr", &o->lr, 0, 10, "peak learning rate (every run, warm-up + cosine)");
    fl[n++] = flag_float("--min-lr", &o->min_lr, 0, 10, "final learning rate");
    fl[n++] = flag_int("--warmup", &o->warmup, 0, 1e8, "warm-up steps of every run (the grown runs' restart too)");
    fl[n++] = flag_float("--wd", &o->wd, 0, 100, "weight decay");
    fl[n++] = flag_float("--clip", &o->clip, 0, 1e6, "gradient-norm clip; 0 = off");
    fl[n++] = flag_int("--eval-every", &o->eval_every, 1, 1e8, "validation every n target-model steps of FLOPs");
    fl[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1e5, "validation batches (fixed windows)");
    fl[n++] = flag_int("--seeds", &o->seeds, 1, MAX_SEEDS, "seeds (init and data order)");
    fl[n++] = flag_heading("files");
    fl[n++] = flag_string("--data", &o->data_dir, "DIR", "the Brown corpus (make data)");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "a smoke run: a tiny model, a short budget, two seeds");
    p = flags_program_make("grow", "G_stack and the growth operators against training from scratch at equal FLOPs", about, fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (o->quick) {
        o->d = 16; o->heads = 2; o->d_ff = 32; o->seq = 16; o->batch = 2; o->budget = 30; o->warmup = 5; o->eval_every = 10;
        o->eval_batches = 1; o->seeds = 2; o->ramp = 10; o->learn_steps = 3;
    }
    if (o->d % o->heads != 0) { fprintf(stderr, "grow: --heads must divide --d\n"); return 2; }
    if (o->layers % o->g != 0 || (o->g_sweep && (o->layers % 2 != 0 || o->layers % 8 != 0))) {
        fprintf(stderr, "grow: --layers (%d) must be a multiple of --g (%d) and, with --g-sweep 1, of 2 and 8\n", o->layers, o->g);
        return 2;
    }
    if (o->budget / o->eval_every + 2 > 500) { fprintf(stderr, "grow: --budget / --eval-every gives too many evaluations (500 at most)\n"); return 2; }
    return FLAGS_RUN;
}

static moe_model_config model_config(const options *o, int layers) {
    moe_model_config c = moe_model_config_default();
    c.max_seq = o->seq;
    c.d = o->d;
    c.n_layers = layers;
    c.n_heads = o->heads;
    c.d_ff = o->d_ff;
    c.moe_every = o->moe ? 1 : 0;
    c.moe.n_experts = 8;
    c.moe.top_k = 2;
    c.moe.d_ff = o->d_ff;
    return c;
}

/* training FLOPs of one step: 6 x (parameters a token uses, the tied head included, the
   position table not: it is a lookup) x tokens, plus the attention scores (6 T d per token
   and layer: QK^T and AV, forward and backward) */
static double step_flops(const options *o, const moe_model *m) {
    double n = (double)moe_model_params_active(m) - (double)o->seq * o->d;
    return 6.0 * (double)o->batch * o->seq * (n + (double)m->cfg.n_layers * o->seq * o->d);
}

typedef struct evalset {
    int n;       /* batches */
    int *x, *y;  /* (n, B, T) */
} evalset;

static double evaluate(const options *o, moe_model *m, const evalset *ev) {
    double s = 0.0;
    int i;
    for (i = 0; i < ev->n; i++) {
        moe_model_forward(m, ev->x + (size_t)i * o->batch * o->seq, ev->y + (size_t)i * o->batch * o->seq, o->batch, o->seq, NULL);
        s += m->loss;
    }
    return s / ev->n;
}

/* One training phase of `steps` AdamW steps with its own warm-up and cosine (a grown model's
   optimizer restarts). flops0: FLOPs spent before; the curve gets a point every eval_every
   target-step equivalents. mask: G_random's spec (NULL = none), base_layers its depth. */
static int train_phase(const options *o, moe_model *m, moe_loader *ld, long long steps, double flops0, double target_flops,
                       const evalset *ev, curve *c, const moe_grow_spec *mask, int base_layers, const char *name, int seed) {
    moe_adamw_config ac = moe_adamw_config_default();
    double fs = step_flops(o, m), next = c && c->n > 0 ? c->flops[c->n - 1] + o->eval_every * target_flops : flops0;
    int *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    long long s;
    ac.weight_decay = o->wd;
    ac.beta2 = 0.99f;
    if (!x || !y) { free(x); free(y); return 0; }
    for (s = 0; s <= steps; s++) {
        double flops = flops0 + (double)s * fs;
        if (c && (flops >= next - 1e-6 * target_flops || s == steps) && c->n < 500) {
            c->flops[c->n] = flops;
            c->loss[c->n] = evaluate(o, m, ev);
            printf("run=%s seed=%d step=%lld flops=%.4g val_loss=%.4f\n", name, seed, s, flops, c->loss[c->n]);
            c->n++;
            while (next <= flops + 1e-6 * target_flops) next += o->eval_every * target_flops;
            fflush(stdout);
        }
        if (s == steps) break;
        if (mask) moe_grow_set_mask(m, base_layers, mask, s, o->ramp);
        moe_loader_next(ld, x, y, NULL, o->batch, o->seq);
        moe_store_zero_grad(&m->S);
        if (moe_model_forward(m, x, y, o->batch, o->seq, NULL) != MOE_OK || moe_model_backward(m, 1.0f) != MOE_OK) {
            fprintf(stderr, "grow: %s: %s\n", name, m->err.msg);
            free(x); free(y);
            return 0;
        }
        if (o->clip > 0) moe_clip_grad_norm(&m->S, o->clip);
        moe_adamw_step(&m->S, &ac, moe_lr_cosine(s, o->warmup, steps, o->lr, o->min_lr), s + 1);
    }
    free(x);
    free(y);
    return 1;
}

/* G_learn: fit the depth map D on the LM loss for learn_steps batches; big = D . small after */
static int fit_learned_map(const options *o, moe_model *big, const moe_model *small, const moe_grow_spec *spec, moe_loader *ld) {
    moe_grow_learner g;
    int i, *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    if (!x || !y || moe_grow_learner_init(&g, big, small, spec) != MOE_OK) {
        fprintf(stderr, "grow: G_learn: %s\n", x && y ? g.err.msg : "out of memory");
        free(x); free(y);
        return 0;
    }
    for (i = 0; i < o->learn_steps; i++) {
        moe_grow_learner_apply(&g, big, small);
        moe_loader_next(ld, x, y, NULL, o->batch, o->seq);
        moe_store_zero_grad(&big->S);
        moe_model_forward(big, x, y, o->batch, o->seq, NULL);
        moe_model_backward(big, 1.0f);
        moe_grow_learner_backward(&g, big, small);
        moe_grow_learner_step(&g, o->learn_lr);
    }
    moe_grow_learner_apply(&g, big, small);
    moe_store_zero_grad(&big->S);
    moe_grow_learner_free(&g);
    free(x);
    free(y);
    return 1;
}

static int build(moe_model *m, const options *o, int layers, uint64_t seed) {
    moe_model_config c = model_config(o, layers);
    if (moe_model_init(m, &c, o->batch, o->seq) != MOE_OK) {
        fprintf(stderr, "grow: %s\n", m->err.msg);
        return 0;
    }
    moe_model_init_weights(m, seed);
    return 1;
}

/* one run: scratch, or train a base on d of the budget, grow, train on */
static int run_one(const options *o, const brown_corpus *cp, const run_spec *r, int seed, const evalset *ev, result *res) {
    moe_model big, small;
    moe_loader ld;
    moe_err err;
    double t0 = moe_time_seconds(), F, C, spent = 0.0;
    long long steps;
    moe_grow_spec spec = moe_grow_spec_default();
    int ok = 1, is_random = r->op == MOE_GROW_RANDOM;
    memset(res, 0, sizeof *res);
    memset(&err, 0, sizeof err);
    if (!build(&big, o, o->layers, 1000 + (uint64_t)seed)) return 0;
    F = step_flops(o, &big);
    C = F * o->budget;
    /* the same data order for every run of a seed: the base reads the first batches and the
       grown model goes on from there (it never sees the base's batches again) */
    if (moe_loader_init(&ld, (const unsigned char *const *)cp->train, cp->train_len, cp->n, o->seq, 77 + (uint64_t)seed, &err) != MOE_OK) {
        fprintf(stderr, "grow: %s\n", err.msg);
        moe_model_free(&big);
        return 0;
    }
    if (r->g > 0) {
        int l = o->layers / r->g;
        long long base_steps;
        char bname[40];
        if (!build(&small, o, l, 2000 + (uint64_t)seed)) { moe_model_free(&big); return 0; }
        base_steps = (long long)floor(r->d_frac * C / step_flops(o, &small) + 0.5);
        snprintf(bname, sizeof bname, "%.23s.base", r->name);
        if (base_steps > 0) ok = train_phase(o, &small, &ld, base_steps, 0.0, F, ev, NULL, NULL, 0, bname, seed);
        spent = base_steps * step_flops(o, &small);
        res->base_loss = evaluate(o, &small, ev);
        spec.op = r->op;
        spec.order = r->order;
        spec.noise = r->noise;
        spec.seed = 3000 + (uint64_t)seed;
        if (ok && moe_model_grow(&big, &small, &spec) != MOE_OK) {
            fprintf(stderr, "grow: %s: %s\n", r->name, big.err.msg);
            ok = 0;
        }
        if (ok && r->op == MOE_GROW_LEARN) {
            ok = fit_learned_map(o, &big, &small, &spec, &ld);
            spent += o->learn_steps * F;
        }
        if (is_random) moe_grow_set_mask(&big, l, &spec, 0, o->ramp);
        res->grown_loss0 = evaluate(o, &big, ev);
        printf("run=%s seed=%d base_layers=%d base_steps=%lld base_val_loss=%.4f grown_val_loss=%.4f\n", r->name, seed, l, base_steps,
               res->base_loss, res->grown_loss0);
        moe_model_free(&small);
    }
    steps = (long long)floor((C - spent) / F + 0.5);
    if (ok) ok = train_phase(o, &big, &ld, steps, spent, F, ev, &res->c, is_random ? &spec : NULL, o->layers / (r->g > 0 ? r->g : 1), r->name, seed);
    res->final_loss = res->c.n > 0 ? res->c.loss[res->c.n - 1] : NAN;
    res->seconds = moe_time_seconds() - t0;
    moe_model_free(&big);
    return ok;
}

static void mean_std(const double *v, int n, double *mean, double *sd) {
    double m = 0.0, s = 0.0;
    int i;
    for (i = 0; i < n; i++) m += v[i] / n;
    for (i = 0; i < n; i++) s += (v[i] - m) * (v[i] - m);
    *mean = m;
    *sd = n > 1 ? sqrt(s / (n - 1)) : 0.0;
}

/* the paper's speed-up at the scratch run's final loss; a run that ends above it: the
   FLOPs scratch needed for the run's own final loss, over the budget, minus 1 (negative) */
static double speedup(const curve *scratch, const curve *run) {
    moe_err e;
    double target = scratch->loss[scratch->n - 1], C = scratch->flops[scratch->n - 1], at;
    if (run->loss[run->n - 1] <= target) {
        if (moe_grow_flops_at_loss(run->flops, run->loss, run->n, target, &at, &e) == MOE_OK) return moe_grow_speedup(C, at);
        return NAN;
    }
    if (moe_grow_flops_at_loss(scratch->flops, scratch->loss, scratch->n, run->loss[run->n - 1], &at, &e) == MOE_OK)
        return moe_grow_speedup(at, C);
    return NAN;
}

static int write_outputs(const options *o, const run_spec *runs, int nr, result res[][MAX_SEEDS]) {
    char path[1024];
    files_atomic a;
    files_err fe;
    FILE *f;
    int r, s, i, ok = 1;
    snprintf(path, sizeof path, "%s/grow.csv", o->out_dir);
    if (!(f = files_atomic_open(&a, path, &fe))) { fprintf(stderr, "grow: %s\n", fe.msg); return 0; }
    fprintf(f, "run,seed,flops,val_loss\n");
    for (r = 0; r < nr; r++)
        for (s = 0; s < o->seeds; s++)
            for (i = 0; i < res[r][s].c.n; i++) fprintf(f, "%s,%d,%.6g,%.5f\n", runs[r].name, s + 1, res[r][s].c.flops[i], res[r][s].c.loss[i]);
    if (files_atomic_commit(&a, 1, &fe) != 0) { fprintf(stderr, "grow: %s\n", fe.msg); return 0; }
    snprintf(path, sizeof path, "%s/grow_results.csv", o->out_dir);
    if (!(f = files_atomic_open(&a, path, &fe))) { fprintf(stderr, "grow: %s\n", fe.msg); return 0; }
    fprintf(f, "run,seed,g,d_frac,base_val_loss,grown_val_loss0,final_val_loss,speedup,seconds\n");
    for (r = 0; r < nr; r++)
        for (s = 0; s < o->seeds; s++)
            fprintf(f, "%s,%d,%d,%.3f,%.5f,%.5f,%.5f,%.4f,%.1f\n", runs[r].name, s + 1, runs[r].g, (double)runs[r].d_frac, res[r][s].base_loss,
                    res[r][s].grown_loss0, res[r][s].final_loss, res[r][s].speedup, res[r][s].seconds);
    if (files_atomic_commit(&a, 1, &fe) != 0) { fprintf(stderr, "grow: %s\n", fe.msg); return 0; }
    { /* loss against FLOPs, mean over seeds (the seeds share the evaluation points) */
        plot_series ser[MAX_RUNS];
        plot_chart ch;
        static float xs[MAX_RUNS][512], ys[MAX_RUNS][512];
        memset(ser, 0, sizeof ser);
        memset(&ch, 0, sizeof ch);
        for (r = 0; r < nr; r++) {
            int n = res[r][0].c.n;
            for (s = 1; s < o->seeds; s++) n = res[r][s].c.n < n ? res[r][s].c.n : n;
            for (i = 0; i < n; i++) {
                double m = 0.0;
                for (s = 0; s < o->seeds; s++) m += res[r][s].c.loss[i] / o->seeds;
                xs[r][i] = (float)(res[r][0].c.flops[i] / 1e12);
                ys[r][i] = (float)m;
            }
            ser[r].name = runs[r].name; ser[r].x = xs[r]; ser[r].y = ys[r]; ser[r].n = n; ser[r].style = PLOT_LINE;
        }
        ch.title = "validation loss against training FLOPs (base included), mean over seeds";
        ch.xlabel = "TFLOPs";
        ch.ylabel = "nats per byte";
        ch.width = 900;
        ch.height = 560;
        ch.y_max = (float)(res[0][0].c.loss[0] < 3.0 ? res[0][0].c.loss[0] : 3.0);
        ch.y_min = (float)(res[0][0].c.loss[res[0][0].c.n - 1] - 0.15);
        snprintf(path, sizeof path, "%s/grow_loss.png", o->out_dir);
        if (plot_lines(path, &ch, ser, nr) != 0) { fprintf(stderr, "grow: could not write %s\n", path); ok = 0; }
    }
    return ok;
}

int main(int argc, char **argv) {
    options o;
    brown_corpus cp;
    static run_spec runs[MAX_RUNS];
    static result res[MAX_RUNS][MAX_SEEDS];
    evalset ev;
    int nr = 0, r, s, rc;
    double t_start = moe_time_seconds();
    char path[1024];
    files_err fe;
    if ((rc = parse(&o, argc, argv)) != FLAGS_RUN) return rc;
    if (!brown_load(&cp, o.data_dir, NULL)) return 1;
    if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "grow: %s\n", fe.msg); return 1; }
#define RUN(nm, g_, d_, op_, order_, noise_, ...)                                                     \
    do {                                                                                             \
        run_spec *q = &runs[nr++];                                                                   \
        snprintf(q->name, sizeof q->name, "%s", nm);                                                 \
        q->g = g_; q->d_frac = d_; q->op = op_; q->order = order_; q->noise = noise_;                \
        snprintf(q->what, sizeof q->what, __VA_ARGS__);                                             \
    } while (0)
    RUN("scratch", 0, 0.0f, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "%d layers from their initialisation", o.layers);
    RUN("stack_d0", o.g, 0.0f, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "G_stack of an untrained %d-layer base", o.layers / o.g);
    RUN("stack_small", o.g, o.d_small, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "G_stack, base trained on %.0f%% of the FLOPs", 100.0 * o.d_small);
    RUN("stack_medium", o.g, o.d_medium, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "G_stack, base trained on %.0f%% of the FLOPs", 100.0 * o.d_medium);
    RUN("zero", o.g, o.d_op, MOE_GROW_ZERO, MOE_GROW_STACK, 0.0f, "G_zero: copies with zero output projections, d %.0f%%", 100.0 * o.d_op);
    RUN("random", o.g, o.d_op, MOE_GROW_RANDOM, MOE_GROW_STACK, 0.0f, "G_random: new layers random, mask ramp of %d steps", o.ramp);
    RUN("learn", o.g, o.d_op, MOE_GROW_LEARN, MOE_GROW_STACK, 0.0f, "G_learn: depth map fitted %d steps (counted), Adam lr %g", o.learn_steps,
        (double)o.learn_lr);
    RUN("interp", o.g, o.d_op, MOE_GROW_DIRECT, MOE_GROW_INTERPOLATE, 0.0f, "layer interpolation (f0 f0 f0 f0 f1 ...), d %.0f%%", 100.0 * o.d_op);
    RUN("noise", o.g, o.d_op, MOE_GROW_DIRECT, MOE_GROW_STACK, o.noise, "G_stack + %.0f%% noise (W <- (1-a) W + a eps)", 100.0 * o.noise);
    if (o.g_sweep) {
        RUN("g2", 2, o.d_op, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "G_stack of a %d-layer base (g = 2), d %.0f%%", o.layers / 2, 100.0 * o.d_op);
        RUN("g8", 8, o.d_op, MOE_GROW_DIRECT, MOE_GROW_STACK, 0.0f, "G_stack of a %d-layer base (g = 8), d %.0f%%", o.layers / 8, 100.0 * o.d_op);
    }
#undef RUN
    { /* settings */
        moe_model probe;
        moe_model_config c = model_config(&o, o.layers);
        double F = 0.0;
        if (moe_model_init(&probe, &c, o.batch, o.seq) == MOE_OK) F = step_flops(&o, &probe);
        char v[8][128];
        const char *k[8];
        int n = 0, i;
#define ROW(key, ...) do { k[n] = key; snprintf(v[n], sizeof v[n], __VA_ARGS__); n++; } while (0)
        ROW("target", "d %d, %d layers, %d heads, %s %d, learned positions, bytes", o.d, o.layers, o.heads,
            o.moe ? "MoE: 8 experts top-2 of width" : "SwiGLU width", o.d_ff);
        ROW("params", "%zu; %.3g FLOPs per step (6 N tokens + attention)", probe.S.numel, F);
        ROW("budget", "%d target steps x %d x %d bytes = %.4g FLOPs per run", o.budget, o.batch, o.seq, F * o.budget);
        ROW("optimizer", "AdamW lr %.2g -> %.2g cosine, warm-up %d (restarted), wd %.2g, clip %.2g", (double)o.lr, (double)o.min_lr, o.warmup,
            (double)o.wd, (double)o.clip);
        ROW("validation", "every %d target steps of FLOPs: %d fixed batches, all genres", o.eval_every, o.eval_batches);
        ROW("seeds", "%d (init and data order); threads %d", o.seeds, moe_num_threads());
#undef ROW
        printf("+--------------+----------------------------------------------------------------------------+\n");
        for (i = 0; i < n; i++) printf("| %-12s | %-74.74s |\n", k[i], v[i]);
        printf("+--------------+----------------------------------------------------------------------------+\n");
        for (r = 0; r < nr; r++) printf("| %-12s | %-74.74s |\n", runs[r].name, runs[r].what);
        printf("+--------------+----------------------------------------------------------------------------+\n");
        moe_model_free(&probe);
        fflush(stdout);
    }
    { /* the validation windows: consecutive windows of every genre's validation text, in turn */
        int b, g = 0, row;
        size_t start[BROWN_GENRES] = {0};
        ev.n = o.eval_batches;
        ev.x = (int *)malloc(sizeof(int) * (size_t)ev.n * o.batch * o.seq);
        ev.y = (int *)malloc(sizeof(int) * (size_t)ev.n * o.batch * o.seq);
        if (!ev.x || !ev.y) { fprintf(stderr, "grow: out of memory\n"); return 1; }
        for (b = 0; b < ev.n; b++)
            for (row = 0; row < o.batch; row++, g = (g + 1) % cp.n) {
                int *x = ev.x + ((size_t)b * o.batch + row) * o.seq, *y = ev.y + ((size_t)b * o.batch + row) * o.seq;
                if (moe_loader_sequential(cp.val[g], cp.val_len[g], &start[g], x, y, 1, o.seq) != 1) {
                    start[g] = 0;
                    moe_loader_sequential(cp.val[g], cp.val_len[g], &start[g], x, y, 1, o.seq);
                }
            }
    }
    for (s = 0; s < o.seeds; s++)
        for (r = 0; r < nr; r++)
            if (!run_one(&o, &cp, &runs[r], s + 1, &ev, &res[r][s])) return 1;
    for (s = 0; s < o.seeds; s++)
        for (r = 0; r < nr; r++) res[r][s].speedup = r == 0 ? 0.0 : speedup(&res[0][s].c, &res[r][s].c);
    {
        files_atomic a;
        FILE *md;
        snprintf(path, sizeof path, "%s/grow.md", o.out_dir);
        if (!(md = files_atomic_open(&a, path, &fe))) { fprintf(stderr, "grow: %s\n", fe.msg); return 1; }
        printf("\nresults (%d seeds; mean +- std; speed-up = FLOPs_scratch / FLOPs_run - 1 at the scratch run's final loss)\n", o.seeds);
        printf("%-13s %-6s %-22s %-18s %-18s %s\n", "run", "g, d", "base -> grown loss", "final val loss", "speed-up %", "s/run");
        fprintf(md, "| run | g, d | base -> grown val loss | final val loss | speed-up %% |\n|---|---|---|---|---|\n");
        for (r = 0; r < nr; r++) {
            double v[5][MAX_SEEDS], m[5], sd[5];
            char gd[24], bg[48];
            int k;
            for (s = 0; s < o.seeds; s++) {
                v[0][s] = res[r][s].base_loss; v[1][s] = res[r][s].grown_loss0; v[2][s] = res[r][s].final_loss;
                v[3][s] = 100.0 * res[r][s].speedup; v[4][s] = res[r][s].seconds;
            }
            for (k = 0; k < 5; k++) mean_std(v[k], o.seeds, &m[k], &sd[k]);
            if (runs[r].g > 0) {
                snprintf(gd, sizeof gd, "%d, %.0f%%", runs[r].g, 100.0 * runs[r].d_frac);
                snprintf(bg, sizeof bg, "%.3f -> %.3f", m[0], m[1]);
            } else {
                snprintf(gd, sizeof gd, "-");
                snprintf(bg, sizeof bg, "-");
            }
            printf("%-13s %-6s %-22s %.4f ± %.4f   %+6.1f ± %-8.1f %.1f\n", runs[r].name, gd, bg, m[2], sd[2], m[3], sd[3], m[4]);
            printf("result run=%s final_val_loss=%.4f final_sd=%.4f speedup_pct=%.1f speedup_sd=%.1f\n", runs[r].name, m[2], sd[2], m[3], sd[3]);
            fprintf(md, "| %s | %s | %s | %.4f ± %.4f | %+.1f ± %.1f |\n", runs[r].name, gd, bg, m[2], sd[2], m[3], sd[3]);
        }
        if (files_atomic_commit(&a, 1, &fe) != 0) { fprintf(stderr, "grow: %s\n", fe.msg); return 1; }
    }
    if (!write_outputs(&o, runs, nr, res)) return 1;
    printf("\nwrote %s/grow.csv, grow_results.csv, grow.md, grow_loss.png\ntotal_seconds=%.1f\n", o.out_dir, moe_time_seconds() - t_start);
    free(ev.x);
    free(ev.y);
    brown_free(&cp);
    return 0;
}
