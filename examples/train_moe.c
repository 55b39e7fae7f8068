/* train_moe.c - one MoE layer learns a task where experts must specialise.
 *
 * The data: tokens come from C clusters (Gaussian blobs in d dimensions); each cluster has its
 * own random linear map, and the target of a token is its cluster's map applied to it. One
 * expert per cluster can fit its map exactly, while a dense FFN with the same active
 * parameters has to share its units between all maps. The program trains an MoE layer and
 * that dense baseline on the same batches, prints key=value progress, a comparison table and
 * how the clusters ended up spread over the experts, and writes:
 *   out/train_moe.csv           step, loss of both models, aux loss, load entropy, drop rate
 *   out/train_moe_loss.png      loss curves
 *   out/train_moe_load.png      cluster x expert routing shares (a diagonal-like pattern
 *                               means each cluster found its own expert)
 *
 *   build/examples/train_moe [--steps N] [--experts E] [--top-k K] [--router NAME]
 *                            [--capacity CF] [--seed S] [--out DIR] [--quick]
 *   NAME: topk (softmax, no renormalisation), mixtral (renormalised), sigmoid, noisy, ec
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_layer_*, moe_store_*, moe_adamw_step, moe_lr_cosine, moe_rng_* */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines, plot_heatmap */
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef struct options {
    int steps, experts, top_k, batch, d, d_ff, clusters, seed, quick;
    float capacity, lr;
    moe_router_kind router;
    int renormalize;
    const char *out_dir, *router_name;
} options;

typedef struct task {
    int C, d;
    float *centers; /* (C, d) */
    float *maps;    /* (C, d, d) */
} task;

typedef struct model {
    moe_store S;
    moe_layer L;
    moe_adamw_config opt;
} model;

static const char *const about =
    "The data: tokens from C clusters (Gaussian blobs in d dimensions); each cluster has its own\n"
    "random linear map, and a token's target is its cluster's map applied to it (no input file).\n"
    "Trains an MoE layer and a dense baseline with the same active parameters on the same batches;\n"
    "prints key=value progress, a comparison table and the routing share of each cluster per\n"
    "expert; writes DIR/train_moe.csv, train_moe_loss.png and train_moe_load.png.";

/* FLAGS_RUN = run, else the exit status */
static int parse(options *o, int argc, char **argv) {
    static const char *const router_names[5] = {"topk", "mixtral", "sigmoid", "noisy", "ec"};
    int rc, router = 0;
    flag fl[8];
    flags_program p;
    int n = 0;
    o->steps = 600; o->experts = 8; o->top_k = 1; o->batch = 512; o->d = 32; o->d_ff = 64;
    o->clusters = 8; o->seed = 1; o->quick = 0; o->capacity = 0.0f; o->lr = 3e-3f;
    /* Switch-style top-1: with renormalisation a single weight is always 1 and the router
       would learn from the balance loss alone */
    o->router = MOE_ROUTER_TOPK; o->renormalize = 0; o->out_dir = "out"; o->router_name = "topk";
    fl[n++] = flag_int("--steps", &o->steps, 1, 1e8, "optimizer steps");
    fl[n++] = flag_int("--experts", &o->experts, 1, 1024, "experts E");
    fl[n++] = flag_int("--top-k", &o->top_k, 1, 1024, "experts per token");
    fl[n++] = flag_choice("--router", &router, "topk|mixtral|sigmoid|noisy|ec",
                          "topk (softmax, no renormalisation), mixtral (renormalised), sigmoid, noisy, ec (expert choice)");
    fl[n++] = flag_float("--capacity", &o->capacity, 0, 1000, "capacity factor; 0 = dropless");
    fl[n++] = flag_int("--seed", &o->seed, 0, 2147483647, "data and initialisation");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "at most 200 steps");
    p = flags_program_make("train_moe", "one MoE layer learns a task where experts must specialise", about, fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    o->router_name = router_names[router];
    if (router == 0) { o->router = MOE_ROUTER_TOPK; o->renormalize = 0; }
    else if (router == 1) { o->router = MOE_ROUTER_TOPK; o->renormalize = 1; }
    else if (router == 2) { o->router = MOE_ROUTER_SIGMOID; o->renormalize = 1; }
    else if (router == 3) o->router = MOE_ROUTER_NOISY_TOPK;
    else o->router = MOE_ROUTER_EXPERT_CHOICE;
    if (o->quick) o->steps = o->steps < 200 ? o->steps : 200;
    return FLAGS_RUN;
}

static void task_init(task *t, int C, int d, moe_rng *r) {
    int i;
    t->C = C;
    t->d = d;
    t->centers = (float *)malloc(sizeof(float) * (size_t)C * d);
    t->maps = (float *)malloc(sizeof(float) * (size_t)C * d * d);
    for (i = 0; i < C * d; i++) t->centers[i] = 1.5f * moe_rng_normal(r);
    for (i = 0; i < C * d * d; i++) t->maps[i] = moe_rng_normal(r) / sqrtf((float)d);
}

/* a batch: x (B, d), targets (B, d), cluster ids (B) */
static void task_batch(const task *t, int B, float *x, float *y, int *cls, moe_rng *r) {
    int b, i, j, d = t->d;
    for (b = 0; b < B; b++) {
        int c = moe_rng_below(r, t->C);
        const float *m = t->maps + (size_t)c * d * d;
        cls[b] = c;
        for (i = 0; i < d; i++) x[b * d + i] = t->centers[c * d + i] + 0.5f * moe_rng_normal(r);
        for (i = 0; i < d; i++) {
            float acc = 0.0f;
            for (j = 0; j < d; j++) acc += m[i * d + j] * x[b * d + j];
            y[b * d + i] = acc;
        }
    }
}

static int model_init(model *m, const moe_layer_config *c, int max_tokens, moe_rng *r) {
    moe_store_init(&m->S);
    if (moe_layer_init(&m->L, c, &m->S, "moe.", max_tokens) != MOE_OK) {
        fprintf(stderr, "layer: %s\n", m->L.err.msg);
        return 0;
    }
    if (moe_store_alloc(&m->S, 1) != MOE_OK) {
        fprintf(stderr, "store: %s\n", m->S.err.msg);
        return 0;
    }
    moe_layer_init_weights(&m->L, &m->S, r);
    m->opt = moe_adamw_config_default();
    m->opt.weight_decay = 0.0f;
    return 1;
}

/* one optimizer step on (x, y); returns the mean squared error */
static double model_step(model *m, const float *x, const float *y, int B, int d, const float *noise,
                         float lr, long long step, float *out, float *dy, float *dx) {
    double loss = 0.0;
    int i, n = B * d;
    moe_layer_args args = moe_layer_args_default();
    args.noise = noise;
    moe_layer_forward(&m->L, &m->S, out, x, B, &args);
    for (i = 0; i < n; i++) {
        float e = out[i] - y[i];
        loss += (double)e * e;
        dy[i] = 2.0f * e / (float)n;
    }
    moe_store_zero_grad(&m->S);
    memset(dx, 0, sizeof(float) * (size_t)n);
    moe_layer_backward(&m->L, &m->S, dx, dy, x, &args);
    moe_clip_grad_norm(&m->S, 1.0f);
    moe_adamw_step(&m->S, &m->opt, lr, step);
    return loss / n;
}

int main(int argc, char **argv) {
    options o;
    task t;
    model moe, dense;
    moe_layer_config cm, cd;
    moe_rng rng_data, rng_init, rng_noise;
    float *x, *y, *out, *dy, *dx, *noise, *share, *curve_moe, *curve_dense, *steps_x;
    int *cls, step, i, e, c, log_every, rc;
    double t0, loss_m = 0.0, loss_d = 0.0, spec = 0.0;
    char path[1024];
    FILE *csv;
    rc = parse(&o, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    cm = moe_layer_config_default();
    cm.d = o.d; cm.d_ff = o.d_ff; cm.n_experts = o.experts; cm.top_k = o.top_k;
    cm.router = o.router; cm.renormalize = o.renormalize; cm.capacity_factor = o.capacity;
    cm.balance = o.router == MOE_ROUTER_EXPERT_CHOICE || o.router == MOE_ROUTER_NOISY_TOPK ? MOE_BALANCE_NONE : MOE_BALANCE_MIXTRAL;
    cm.balance_coef = 0.01f;
    cd = cm; /* dense baseline with the same active parameters: one expert, k times wider */
    cd.n_experts = 1; cd.top_k = 1; cd.d_ff = o.d_ff * o.top_k; cd.router = MOE_ROUTER_TOPK;
    cd.balance = MOE_BALANCE_NONE; cd.capacity_factor = 0.0f;
    {
        moe_err err;
        if (moe_layer_config_validate(&cm, &err) != MOE_OK) { fprintf(stderr, "config: %s\n", err.msg); return 2; }
    }
    moe_rng_seed(&rng_data, (uint64_t)o.seed);
    moe_rng_seed(&rng_init, (uint64_t)o.seed + 1000);
    moe_rng_seed(&rng_noise, (uint64_t)o.seed + 2000);
    task_init(&t, o.clusters, o.d, &rng_data);
    if (!model_init(&moe, &cm, o.batch, &rng_init) || !model_init(&dense, &cd, o.batch, &rng_init)) return 1;
    x = (float *)malloc(sizeof(float) * (size_t)o.batch * o.d);
    y = (float *)malloc(sizeof(float) * (size_t)o.batch * o.d);
    out = (float *)malloc(sizeof(float) * (size_t)o.batch * o.d);
    dy = (float *)malloc(sizeof(float) * (size_t)o.batch * o.d);
    dx = (float *)malloc(sizeof(float) * (size_t)o.batch * o.d);
    noise = (float *)malloc(sizeof(float) * (size_t)o.batch * o.experts);
    cls = (int *)malloc(sizeof(int) * (size_t)o.batch);
    share = (float *)calloc((size_t)o.clusters * o.experts, sizeof(float));
    curve_moe = (float *)malloc(sizeof(float) * (size_t)o.steps);
    curve_dense = (float *)malloc(sizeof(float) * (size_t)o.steps);
    steps_x = (float *)malloc(sizeof(float) * (size_t)o.steps);

    {
        char v[10][64];
        const char *k[10] = {"router", "experts E, top-k", "d, d_ff", "capacity factor",
                             "clusters", "batch tokens", "steps", "MoE parameters",
                             "dense parameters", "threads"};
        snprintf(v[0], 64, "%s", o.router_name);
        snprintf(v[1], 64, "%d, %d", o.experts, o.top_k);
        snprintf(v[2], 64, "%d, %d", o.d, o.d_ff);
        snprintf(v[3], 64, "%s", o.capacity > 0.0f ? "" : "dropless");
        if (o.capacity > 0.0f) snprintf(v[3], 64, "%g", (double)o.capacity);
        snprintf(v[4], 64, "%d", o.clusters);
        snprintf(v[5], 64, "%d", o.batch);
        snprintf(v[6], 64, "%d", o.steps);
        snprintf(v[7], 64, "%zu", moe.S.numel);
        snprintf(v[8], 64, "%zu (d_ff %d)", dense.S.numel, cd.d_ff);
        snprintf(v[9], 64, "%d", moe_num_threads());
        printf("+------------------+--------------------------+\n");
        for (i = 0; i < 10; i++) printf("| %-16s | %-24s |\n", k[i], v[i]);
        printf("+------------------+--------------------------+\n");
    }
    {
        files_err fe;
        if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "train_moe: %s\n", fe.msg); return 1; }
    }
    snprintf(path, sizeof path, "%s/train_moe.csv", o.out_dir);
    csv = fopen(path, "w");
    if (!csv) { fprintf(stderr, "cannot write %s\n", path); return 1; }
    fprintf(csv, "step,loss_moe,loss_dense,aux,load_entropy,drop_rate\n");
    log_every = o.steps >= 20 ? o.steps / 20 : 1;
    t0 = moe_time_seconds();
    for (step = 0; step < o.steps; step++) {
        float lr = moe_lr_cosine(step, o.steps / 20, o.steps, o.lr, o.lr * 0.05f);
        task_batch(&t, o.batch, x, y, cls, &rng_data);
        for (i = 0; i < o.batch * o.experts; i++) noise[i] = moe_rng_normal(&rng_noise);
        loss_m = model_step(&moe, x, y, o.batch, o.d, o.router == MOE_ROUTER_NOISY_TOPK ? noise : NULL, lr, step + 1, out, dy, dx);
        loss_d = model_step(&dense, x, y, o.batch, o.d, NULL, lr, step + 1, out, dy, dx);
        curve_moe[step] = (float)loss_m;
        curve_dense[step] = (float)loss_d;
        steps_x[step] = (float)(step + 1);
        fprintf(csv, "%d,%.6g,%.6g,%.6g,%.6g,%.6g\n", step + 1, loss_m, loss_d, (double)moe.L.stats.aux_total,
                (double)moe.L.stats.load_entropy, (double)moe.L.stats.drop_rate);
        if ((step + 1) % log_every == 0 || step == 0) {
            double el = moe_time_seconds() - t0;
            printf("step=%d loss_moe=%.5f loss_dense=%.5f aux=%.5f lr=%.2e load_entropy=%.3f drop_rate=%.3f tok_s=%.0f\n",
                   step + 1, loss_m, loss_d, (double)moe.L.stats.aux_total, (double)lr,
                   (double)moe.L.stats.load_entropy, (double)moe.L.stats.drop_rate, 2.0 * o.batch * (step + 1) / el);
        }
    }
    fclose(csv);
    /* routing shares per cluster on a fresh evaluation batch */
    task_batch(&t, o.batch, x, y, cls, &rng_data);
    moe_layer_forward(&moe.L, &moe.S, out, x, o.batch, NULL);
    {
        int *count = (int *)calloc((size_t)o.clusters, sizeof(int));
        for (i = 0; i < moe.L.routed.n; i++) {
            share[cls[moe.L.routed.token[i]] * o.experts + moe.L.routed.expert[i]] += 1.0f;
        }
        for (i = 0; i < o.batch; i++) count[cls[i]]++;
        for (c = 0; c < o.clusters; c++) {
            float best = 0.0f;
            for (e = 0; e < o.experts; e++) {
                share[c * o.experts + e] /= (float)(count[c] ? count[c] * o.top_k : 1);
                if (share[c * o.experts + e] > best) best = share[c * o.experts + e];
            }
            spec += best;
        }
        spec /= o.clusters;
        free(count);
    }
    printf("\n%-8s %-14s %-12s %-12s\n", "model", "final_mse", "params", "active/token");
    printf("%-8s %-14.5f %-12zu %-12d\n", "moe", loss_m, moe.S.numel, o.d * o.experts + 3 * o.d * o.d_ff * o.top_k);
    printf("%-8s %-14.5f %-12zu %-12d\n", "dense", loss_d, dense.S.numel, o.d + 3 * o.d * o.d_ff * o.top_k);
    printf("\nshare of each cluster's tokens per expert (rows: clusters)\n");
    for (c = 0; c < o.clusters; c++) {
        printf("cluster %d:", c);
        for (e = 0; e < o.experts; e++) printf(" %.2f", (double)share[c * o.experts + e]);
        printf("\n");
    }
    printf("\nresult final_mse_moe=%.5f final_mse_dense=%.5f ratio=%.3f specialisation=%.3f load_entropy=%.3f\n",
           loss_m, loss_d, loss_m / loss_d, spec, (double)moe.L.stats.load_entropy);
    {
        plot_series s[2];
        plot_chart ch;
        plot_heatmap_opts h;
        memset(s, 0, sizeof s);
        memset(&ch, 0, sizeof ch);
        memset(&h, 0, sizeof h);
        s[0].name = "MoE"; s[0].x = steps_x; s[0].y = curve_moe; s[0].n = o.steps;
        s[1].name = "dense (same active params)"; s[1].x = steps_x; s[1].y = curve_dense; s[1].n = o.steps;
        ch.title = "training loss (MSE)"; ch.xlabel = "step"; ch.ylabel = "loss"; ch.log_y = 1;
        snprintf(path, sizeof path, "%s/train_moe_loss.png", o.out_dir);
        if (plot_lines(path, &ch, s, 2) != 0) fprintf(stderr, "could not write %s\n", path);
        h.title = "share of each cluster's tokens per expert"; h.xlabel = "expert"; h.ylabel = "cluster";
        h.annotate = 1; h.v_min = 0.0f; h.v_max = 1.0f;
        snprintf(path, sizeof path, "%s/train_moe_load.png", o.out_dir);
        if (plot_heatmap(path, &h, share, o.clusters, o.experts) != 0) fprintf(stderr, "could not write %s\n", path);
        printf("wrote %s/train_moe.csv, %s/train_moe_loss.png, %s/train_moe_load.png\n", o.out_dir, o.out_dir, o.out_dir);
    }
    moe_layer_free(&moe.L); moe_store_free(&moe.S);
    moe_layer_free(&dense.L); moe_store_free(&dense.S);
    free(t.centers); free(t.maps); free(x); free(y); free(out); free(dy); free(dx); free(noise); free(cls);
    free(share); free(curve_moe); free(curve_dense); free(steps_x);
    return 0;
}
