/* continual.c - continual learning over Brown genres: plain fine-tuning against MIGU
 * (arXiv 2406.17245: both statistics, both mask modes), its random-mask control and LoRA, on a
 * tiny dense and a tiny MoE byte-level LM.
 *
 *   make data                                   # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/continual [--quick] [--seeds N] [--out DIR]
 *
 * Per seed and model: the first task (genre) is trained normally (the paper's is_first_task);
 * every arm then continues from that model through the remaining tasks with the same steps
 * and learning rate. After every task each arm's bits/byte on every task's validation text is
 * measured: the forgetting matrix R[after][on]. Outputs: a settings table, key=value lines
 * (per model and arm: average final bits/byte over the tasks and average forgetting
 * R[last][j] - R[j][j] over j < last, mean and sd over seeds), the pairwise overlap of the
 * units MIGU would update on different tasks (the paper's observation), <out>/continual.csv
 * (every matrix entry) and one heatmap PNG of the seed-mean matrix per model and arm. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"   /* defines: moe_model_*, moe_migu_*, moe_mask_*, moe_lora_*, moe_model_select */
#define PLOT_IMPLEMENTATION
#define PLOT_STATIC
#include "plot.h"  /* defines: plot_heatmap */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */
#include "files.h" /* defines: files_mkdirs, files_atomic_open, files_atomic_commit */
#include "flags.h" /* defines: flag_int, flag_float, flag_string, flag_switch, flags_parse */

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ARM_FT, ARM_MIGU_L1_GRAD, ARM_MIGU_L1_UPDATE, ARM_MIGU_SUM_GRAD, ARM_MIGU_SUM_UPDATE, ARM_RANDOM, ARM_LORA, N_ARMS };
static const char *const arm_names[N_ARMS] = {"ft", "migu_l1_grad", "migu_l1_update", "migu_sum_grad", "migu_sum_update", "random_mask", "lora"};
#define MAX_TASKS 6

typedef struct options {
    int quick, threads, seeds, first_steps, task_steps, micro, B, T, eval_windows, lora_rank;
    float first_lr, lr, lora_lr, threshold;
    const char *genres, *data_dir, *out;
} options;

/* one (B, T) batch of windows from text: inputs tok[0..BT), targets tok[BT..2BT) */
static void batch(const unsigned char *text, size_t len, int B, int T, moe_rng *r, int *tok) {
    int b, t;
    for (b = 0; b < B; b++) {
        size_t p = (size_t)moe_rng_below(r, (int)(len - (size_t)T - 1));
        for (t = 0; t < T; t++) {
            tok[b * T + t] = text[p + (size_t)t];
            tok[B * T + b * T + t] = text[p + (size_t)t + 1];
        }
    }
}

/* bits per byte on fixed validation windows (the same windows for every arm) */
static double bits_per_byte(moe_model *m, const unsigned char *val, size_t len, const options *o, int *tok) {
    moe_rng r;
    double sum = 0.0;
    int w;
    moe_rng_seed(&r, 12345);
    for (w = 0; w < o->eval_windows; w += o->B) {
        batch(val, len, o->B, o->T, &r, tok);
        moe_model_forward(m, tok, tok + o->B * o->T, o->B, o->T, NULL);
        sum += m->loss;
    }
    return sum / ((o->eval_windows + o->B - 1) / o->B) / log(2.0);
}

/* trains m on one task for `steps` steps: the adapters alone (lora), under MIGU's mask (g), or plainly */
static int train_task(moe_model *m, const brown_corpus *cp, int task, int steps, float lr, long long *step,
                      const options *o, moe_rng *r, int *tok, moe_lora *lora, moe_migu *g, moe_mask *k) {
    moe_adamw_config ac = moe_adamw_config_default();
    int s, u;
    for (s = 0; s < steps; s++) {
        moe_store_zero_grad(&m->S);
        if (lora) moe_store_zero_grad(&lora->S);
        for (u = 0; u < o->micro; u++) {
            batch(cp->train[task], cp->train_len[task], o->B, o->T, r, tok);
            if (moe_model_forward(m, tok, tok + o->B * o->T, o->B, o->T, NULL) != MOE_OK) return 0;
            if (g && !g->cfg.random) moe_migu_accumulate(g, m);
            moe_model_backward(m, 1.0f / (float)o->micro);
        }
        ++*step;
        if (lora) {
            moe_lora_backward(lora, &m->S);
            if (moe_lora_step(lora, &m->S, NULL, &ac, lr, *step, 1.0f) != MOE_OK) return 0;
        } else if (g) {
            if (moe_migu_mask(g, m, k) != MOE_OK || moe_mask_step(k, &m->S, &ac, lr, *step, 1.0f, NULL) != MOE_OK) return 0;
        } else {
            moe_clip_grad_norm(&m->S, 1.0f);
            moe_adamw_step(&m->S, &ac, lr, *step);
        }
    }
    return 1;
}

/* the units MIGU keeps on each task's data (from the same model), pairwise overlap |Ki & Kj| / |Ki| */
static double unit_overlap(moe_model *m, const brown_corpus *cp, int n_tasks, const options *o, int *tok) {
    moe_migu g;
    moe_mask k[MAX_TASKS];
    moe_migu_config mc = moe_migu_config_default();
    moe_rng r;
    double total = 0.0;
    int t, u, pairs = 0, j;
    mc.threshold = o->threshold;
    moe_migu_init(&g, m, &mc);
    moe_rng_seed(&r, 777);
    for (t = 0; t < n_tasks; t++) {
        moe_mask_init(&k[t], &m->S, MOE_MASK_UPDATE);
        for (u = 0; u < 4; u++) {
            batch(cp->train[t], cp->train_len[t], o->B, o->T, &r, tok);
            moe_model_forward(m, tok, tok + o->B * o->T, o->B, o->T, NULL);
            moe_migu_accumulate(&g, m);
        }
        moe_migu_mask(&g, m, &k[t]);
    }
    for (t = 0; t < n_tasks; t++)
        for (j = t + 1; j < n_tasks; j++) {
            size_t i, both = 0, ki = 0;
            for (i = 0; i < k[t].numel; i++) {
                ki += k[t].keep[i];
                both += k[t].keep[i] & k[j].keep[i];
            }
            /* unwatched tensors are kept on every task: count only the watched rows */
            {
                size_t unwatched = 0;
                int id;
                for (id = 0; id < m->S.count; id++)
                    if (g.off[id] < 0) unwatched += m->S.tensors[id].numel;
                total += (double)(both - unwatched) / (double)(ki - unwatched);
            }
            pairs++;
        }
    for (t = 0; t < n_tasks; t++) moe_mask_free(&k[t]);
    moe_migu_free(&g);
    return pairs ? total / pairs : 0.0;
}

static void mean_sd(const double *v, int n, double *mean, double *sd) {
    double s = 0, q = 0;
    int i;
    for (i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0.0;
}

int main(int argc, char **argv) {
    options o;
    brown_corpus cp;
    files_err fe;
    files_atomic fa;
    FILE *csv;
    int rc, seed, kind, arm, i, j, n_tasks, *tok;
    char path[1024];
    /* R[kind][arm][seed][after][on] */
    static double R[2][N_ARMS][16][MAX_TASKS][MAX_TASKS];
    double overlap[2][16];
    flag fl[] = {
        flag_switch("--quick", &o.quick, "a smoke run: few steps, 1 seed"),
        flag_int("--seeds", &o.seeds, 1, 16, "seeds (each: its own initialisation and data order)"),
        flag_int("--first-steps", &o.first_steps, 1, 1e6, "steps on the first task (trained normally)"),
        flag_int("--task-steps", &o.task_steps, 1, 1e6, "steps on every later task"),
        flag_float("--first-lr", &o.first_lr, 0, 1, "learning rate of the first task"),
        flag_float("--lr", &o.lr, 0, 1, "learning rate of the later tasks (small: the spec warns FT collapses)"),
        flag_float("--lora-lr", &o.lora_lr, 0, 1, "learning rate of the adapters"),
        flag_int("--lora-rank", &o.lora_rank, 1, 64, "LoRA rank (alpha = 2 rank) on every linear matrix"),
        flag_float("--threshold", &o.threshold, 0, 0.99, "MIGU's T: the fraction of units masked per layer"),
        flag_int("--threads", &o.threads, 1, 256, "OpenMP threads (the models are tiny: more threads only add waiting)"),
        flag_string("--genres", &o.genres, "LIST", "the tasks, in order (2 to 6 Brown genres)"),
        flag_string("--data", &o.data_dir, "DIR", "the Brown corpus folder"),
        flag_string("--out", &o.out, "DIR", "output folder"),
    };
    flags_program p;
    memset(&o, 0, sizeof o);
    o.threads = 1; o.seeds = 3; o.first_steps = 400; o.task_steps = 150; o.micro = 2; o.B = 8; o.T = 64; o.eval_windows = 64;
    o.first_lr = 3e-3f; o.lr = 1e-3f; o.lora_lr = 3e-3f; o.lora_rank = 4; o.threshold = 0.7f;
    o.genres = "news,religion,learned,romance"; o.data_dir = "data/brown"; o.out = "out";
    p = flags_program_make("continual", "continual learning over Brown genres: fine-tuning vs MIGU (both statistics, both masks) vs a random mask vs LoRA",
                           "reads <data>/{train,val}/<genre>.txt; writes <out>/continual.csv and <out>/continual_<model>_<arm>.png",
                           fl, FLAGS_COUNT(fl));
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    if (o.quick) { o.seeds = 1; o.first_steps = 20; o.task_steps = 8; o.eval_windows = 16; o.micro = 1; }
    if (!brown_load(&cp, o.data_dir, o.genres)) return 1;
    n_tasks = cp.n;
    if (n_tasks < 2 || n_tasks > MAX_TASKS) {
        fprintf(stderr, "continual: %d tasks; give 2 to %d genres\n", n_tasks, MAX_TASKS);
        brown_free(&cp);
        return 2;
    }
    if (files_mkdirs(o.out, &fe) != 0) {
        fprintf(stderr, "continual: %s\n", fe.msg);
        brown_free(&cp);
        return 1;
    }
    tok = (int *)malloc(sizeof(int) * 2 * (size_t)(o.B * o.T));
    printf("continual learning over Brown genres (MIGU, arXiv 2406.17245)\n");
    printf("  tasks            %s (%d, in this order)\n", o.genres, n_tasks);
    printf("  steps            first task %d at lr %g, later tasks %d each at lr %g (LoRA %g, rank %d)\n", o.first_steps,
           (double)o.first_lr, o.task_steps, (double)o.lr, (double)o.lora_lr, o.lora_rank);
    printf("  batch            %d micro-batches of %d x %d bytes, AdamW wd 0.01, clip 1\n", o.micro, o.B, o.T);
    printf("  MIGU             T = %g, every linear matrix, first task unmasked\n", (double)o.threshold);
    printf("  seeds            %d; evaluation: %d fixed validation windows per task\n", o.seeds, o.eval_windows);
    for (kind = 0; kind < 2; kind++)
        for (seed = 0; seed < o.seeds; seed++) {
            moe_model base;
            moe_model_config c = moe_model_config_default();
            moe_rng r;
            long long step0 = 0;
            float *p_first;
            c.vocab = 256; c.max_seq = o.T; c.d = 64; c.n_layers = 2; c.n_heads = 4; c.d_ff = 192; c.pos = MOE_POS_ROPE;
            c.moe_every = kind; c.moe.n_experts = 4; c.moe.top_k = 2; c.moe.d_ff = 96;
            if (moe_model_init(&base, &c, o.B, o.T) != MOE_OK) {
                fprintf(stderr, "continual: %s\n", base.err.msg);
                return 1;
            }
            moe_model_init_weights(&base, 100 + (uint64_t)seed);
            moe_rng_seed(&r, 200 + (uint64_t)seed);
            if (!train_task(&base, &cp, 0, o.first_steps, o.first_lr, &step0, &o, &r, tok, NULL, NULL, NULL)) return 1;
            overlap[kind][seed] = unit_overlap(&base, &cp, n_tasks, &o, tok);
            p_first = (float *)malloc(base.S.numel * sizeof(float));
            memcpy(p_first, base.S.params, base.S.numel * sizeof(float));
            for (arm = 0; arm < N_ARMS; arm++) {
                moe_migu g, *gp = NULL;
                moe_mask k;
                moe_lora lora, *lp = NULL;
                long long step = 0;
                int t, on;
                moe_rng rt;
                /* every arm from the same first-task model, fresh moments, the same data order */
                memcpy(base.S.params, p_first, base.S.numel * sizeof(float));
                memset(base.S.adam_m, 0, base.S.numel * sizeof(float));
                memset(base.S.adam_v, 0, base.S.numel * sizeof(float));
                moe_rng_seed(&rt, 300 + (uint64_t)seed);
                if (arm != ARM_FT && arm != ARM_LORA) {
                    moe_migu_config mc = moe_migu_config_default();
                    mc.threshold = o.threshold;
                    mc.stat = (arm == ARM_MIGU_SUM_GRAD || arm == ARM_MIGU_SUM_UPDATE) ? MOE_MIGU_SUM : MOE_MIGU_L1;
                    mc.random = arm == ARM_RANDOM;
                    mc.seed = 400 + (uint64_t)seed;
                    if (moe_migu_init(&g, &base, &mc) != MOE_OK ||
                        moe_mask_init(&k, &base.S, (arm == ARM_MIGU_L1_GRAD || arm == ARM_MIGU_SUM_GRAD) ? MOE_MASK_GRAD : MOE_MASK_UPDATE) != MOE_OK)
                        return 1;
                    gp = &g;
                }
                if (arm == ARM_LORA) {
                    int ids[64], n = moe_model_select(&base, MOE_SEL_LINEAR, ids, 64);
                    moe_lora_config lc;
                    lc.rank = o.lora_rank;
                    lc.alpha = 2.0f * (float)o.lora_rank;
                    if (moe_lora_attach(&lora, &base.S, ids, n, &lc, 500 + (uint64_t)seed) != MOE_OK) {
                        fprintf(stderr, "continual: %s\n", lora.err.msg);
                        return 1;
                    }
                    lp = &lora;
                }
                for (on = 0; on < n_tasks; on++) R[kind][arm][seed][0][on] = bits_per_byte(&base, cp.val[on], cp.val_len[on], &o, tok);
                for (t = 1; t < n_tasks; t++) {
                    if (!train_task(&base, &cp, t, o.task_steps, arm == ARM_LORA ? o.lora_lr : o.lr, &step, &o, &rt, tok, lp, gp, &k)) {
                        fprintf(stderr, "continual: training failed (%s)\n", arm_names[arm]);
                        return 1;
                    }
                    for (on = 0; on < n_tasks; on++) R[kind][arm][seed][t][on] = bits_per_byte(&base, cp.val[on], cp.val_len[on], &o, tok);
                }
                if (gp) { moe_migu_free(&g); moe_mask_free(&k); }
                if (lp) moe_lora_detach(&lora, &base.S);
            }
            free(p_first);
            moe_model_free(&base);
        }
    /* the CSV */
    snprintf(path, sizeof path, "%s/continual.csv", o.out);
    if (!(csv = files_atomic_open(&fa, path, &fe))) {
        fprintf(stderr, "continual: %s\n", fe.msg);
        return 1;
    }
    fprintf(csv, "model,arm,seed,after_task,on_task,bits_per_byte\n");
    for (kind = 0; kind < 2; kind++)
        for (arm = 0; arm < N_ARMS; arm++)
            for (seed = 0; seed < o.seeds; seed++)
                for (i = 0; i < n_tasks; i++)
                    for (j = 0; j < n_tasks; j++)
                        fprintf(csv, "%s,%s,%d,%s,%s,%.5f\n", kind ? "moe" : "dense", arm_names[arm], seed, cp.names[i], cp.names[j],
                                R[kind][arm][seed][i][j]);
    if (files_atomic_commit(&fa, !ferror(csv), &fe) != 0) {
        fprintf(stderr, "continual: %s\n", fe.msg);
        return 1;
    }
    /* summaries and heatmaps */
    for (kind = 0; kind < 2; kind++) {
        double ov, ovs;
        mean_sd(overlap[kind], o.seeds, &ov, &ovs);
        printf("model=%s migu_unit_overlap=%.3f overlap_sd=%.3f chance_overlap=%.3f\n", kind ? "moe" : "dense", ov, ovs,
               1.0 - (double)o.threshold);
        for (arm = 0; arm < N_ARMS; arm++) {
            double fin[16], fgt[16], fm, fs, gm, gs;
            float heat[MAX_TASKS * MAX_TASKS];
            plot_heatmap_opts ho;
            char title[128];
            int last = n_tasks - 1;
            for (seed = 0; seed < o.seeds; seed++) {
                fin[seed] = fgt[seed] = 0.0;
                for (j = 0; j < n_tasks; j++) fin[seed] += R[kind][arm][seed][last][j] / n_tasks;
                /* task 0's own entry is row 0 (the shared first-task model) */
                for (j = 0; j < last; j++) fgt[seed] += (R[kind][arm][seed][last][j] - R[kind][arm][seed][j][j]) / last;
            }
            mean_sd(fin, o.seeds, &fm, &fs);
            mean_sd(fgt, o.seeds, &gm, &gs);
            printf("model=%s arm=%s avg_final_bpb=%.4f final_sd=%.4f avg_forgetting_bpb=%.4f forgetting_sd=%.4f last_task_bpb=%.4f\n",
                   kind ? "moe" : "dense", arm_names[arm], fm, fs, gm, gs, R[kind][arm][0][last][last]);
            for (i = 0; i < n_tasks; i++)
                for (j = 0; j < n_tasks; j++) {
                    double s = 0;
                    for (seed = 0; seed < o.seeds; seed++) s += R[kind][arm][seed][i][j];
                    heat[i * n_tasks + j] = (float)(s / o.seeds);
                }
            memset(&ho, 0, sizeof ho);
            snprintf(title, sizeof title, "%s %s: bits/byte on task (col) after task (row)", kind ? "MoE" : "dense", arm_names[arm]);
            ho.title = title; ho.xlabel = "evaluated on"; ho.ylabel = "after training on";
            ho.row_labels = cp.names; ho.col_labels = cp.names; ho.annotate = 1;
            snprintf(path, sizeof path, "%s/continual_%s_%s.png", o.out, kind ? "moe" : "dense", arm_names[arm]);
            if (plot_heatmap(path, &ho, heat, n_tasks, n_tasks) != PLOT_OK) fprintf(stderr, "continual: cannot write %s\n", path);
        }
    }
    printf("csv=%s/continual.csv\n", o.out);
    free(tok);
    brown_free(&cp);
    return 0;
}
