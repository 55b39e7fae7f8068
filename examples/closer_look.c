/* closer_look.c - "A Closer Look into Mixture-of-Experts in Large Language Models" (Lo et al.,
 * arXiv 2406.18219) on tiny byte-level MoE models: one trained from scratch, one upcycled from
 * a dense model (its trained FFN copied into every expert, then MoE training; Komatsuzaki et
 * al., arXiv 2212.05055), the same total steps.
 *
 *   make data                             # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/closer_look            # the default: a few minutes on 2 cores
 *   build/examples/closer_look --quick    # a smoke run (seconds), used by the tests
 *   build/examples/closer_look --model out/moe.ckpt   # also a saved model (make demo's MoE)
 *
 * On the validation text of every genre, with the library's diagnostics (moe.h closer_look):
 *   ranks     the two-pass protocol (§3): every expert's output on each layer's stored input;
 *             per token the norm-vs-score rank counts (§4.2: "higher norm, higher score"), the
 *             share on the diagonal and the rank-0 agreement
 *   R^2       gate-embedding similarity against neuron-averaged gate / up / down similarity over
 *             expert pairs (§4.3, Table 1: the gate projection pairs best)
 *   depth     mean inter-expert cosine of the flattened matrices and of the outputs (angular,
 *             §5) per layer: similarity by depth (§4.1, §5: diversity grows with depth)
 *   norms     mean expert output norm per layer (§4.2: norms grow with depth)
 * Writes DIR/closer_look.csv (one row per model and layer), closer_look_ranks_<model>.png (rank
 * counts, every layer stacked), closer_look_depth.png (similarity by depth).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_*, moe_expert_outputs, moe_rank_count, moe_*_similarity */
#define PLOT_IMPLEMENTATION
#include "plot.h"  /* defines: plot_lines, plot_heatmap */
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LAYERS 32
#define MAX_E 64

typedef struct options {
    int d, layers, heads, experts, top_k, expert_ff, seq, batch, steps, upcycle_steps, eval_batches, seed, quick;
    float lr, min_lr, wd;
    const char *data_dir, *out_dir, *model_path;
} options;

typedef struct layer_stats {
    int is_moe;
    double diag, top_agree;   /* share of (expert, token) counts on the diagonal; rank-0 agreement */
    double R[3], R2[3];       /* gate embedding vs gate / up / down neuron means */
    double wsim[3];           /* mean inter-expert cos of the flattened gate / up / down */
    double osim;              /* mean inter-expert angular similarity of the outputs */
    double norm;              /* mean expert output norm */
    int64_t counts[MAX_E * MAX_E];
} layer_stats;

static int parse(options *o, int argc, char **argv) {
    flag fl[20];
    flags_program p;
    int n = 0, rc;
    memset(o, 0, sizeof *o);
    o->d = 64; o->layers = 8; o->heads = 4; o->experts = 8; o->top_k = 2; o->expert_ff = 64; o->seq = 64; o->batch = 16;
    o->steps = 800; o->upcycle_steps = 400; o->eval_batches = 2; o->seed = 1;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->wd = 0.1f;
    o->data_dir = "data/brown"; o->out_dir = "out"; o->model_path = NULL;
    fl[n++] = flag_int("--d", &o->d, 8, 4096, "model width");
    fl[n++] = flag_int("--layers", &o->layers, 1, MAX_LAYERS, "layers (all MoE)");
    fl[n++] = flag_int("--experts", &o->experts, 2, MAX_E, "experts E");
    fl[n++] = flag_int("--top-k", &o->top_k, 1, MAX_E, "experts per token (renormalised softmax, Mixtral)");
    fl[n++] = flag_int("--expert-ff", &o->expert_ff, 1, 65536, "expert width (the dense model's FFN width when upcycling)");
    fl[n++] = flag_int("--seq", &o->seq, 2, 4096, "bytes per sequence");
    fl[n++] = flag_int("--batch", &o->batch, 1, 4096, "sequences per batch");
    fl[n++] = flag_int("--steps", &o->steps, 1, 1e8, "training steps of each model (the upcycled one: dense + MoE)");
    fl[n++] = flag_int("--upcycle-steps", &o->upcycle_steps, 0, 1e8, "of those, dense steps before upcycling");
    fl[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1000, "validation batches per genre");
    fl[n++] = flag_int("--seed", &o->seed, 0, 2147483647, "initialisation and data order");
    fl[n++] = flag_default(flag_string("--model", &o->model_path, "FILE", "also analyse this model file (moe_model_save, e.g. train_lm's)"), "none");
    fl[n++] = flag_string("--data", &o->data_dir, "DIR", "the Brown corpus (make data)");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "a smoke run in seconds: d 32, 4 layers, 40 steps");
    p = flags_program_make("closer_look", "the diagnostics of \"A Closer Look into MoE in LLMs\" on a scratch and an upcycled MoE",
                           "Trains a tiny MoE LM from scratch and one upcycled from a dense LM (same total steps) on the Brown corpus\n"
                           "(data/brown, `make data`); on the validation text prints per layer the norm-vs-score rank agreement, the\n"
                           "gate-vs-neuron R^2 (gate, up, down), weight and output similarity and output norms. Writes\n"
                           "DIR/closer_look.csv, closer_look_ranks_<model>.png, closer_look_depth.png.",
                           fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (o->quick) {
        o->d = 32; o->layers = 4; o->heads = 2; o->expert_ff = 32; o->seq = 32; o->batch = 4; o->steps = 40; o->upcycle_steps = 20;
        o->eval_batches = 1;
    }
    if (o->top_k > o->experts || o->upcycle_steps > o->steps || o->d % o->heads) {
        fprintf(stderr, "closer_look: need --top-k <= --experts, --upcycle-steps <= --steps, --d a multiple of --heads\n");
        return 2;
    }
    return FLAGS_RUN;
}

static moe_model_config model_config(const options *o, int moe) {
    moe_model_config c = moe_model_config_default();
    c.max_seq = o->seq;
    c.d = o->d;
    c.n_layers = o->layers;
    c.n_heads = o->heads;
    c.d_ff = o->expert_ff;
    c.pos = MOE_POS_ROPE;
    c.moe_every = moe ? 1 : 0;
    c.moe.n_experts = o->experts;
    c.moe.top_k = o->top_k;
    c.moe.d_ff = o->expert_ff;
    c.moe.renormalize = 1;
    c.moe.balance = MOE_BALANCE_MIXTRAL;
    return c;
}

static void train(moe_model *m, moe_loader *ld, const options *o, int steps, const char *name, int *x, int *y) {
    moe_adamw_config adam = moe_adamw_config_default();
    double recent = 0.0;
    int step, n = 0;
    adam.weight_decay = o->wd;
    for (step = 1; step <= steps; step++) {
        moe_store_zero_grad(&m->S);
        moe_loader_next(ld, x, y, NULL, o->batch, o->seq);
        moe_model_forward(m, x, y, o->batch, o->seq, NULL);
        moe_model_backward(m, 1.0f);
        moe_clip_grad_norm(&m->S, 1.0f);
        moe_adamw_step(&m->S, &adam, moe_lr_cosine(step - 1, steps / 20, steps, o->lr, o->min_lr), step);
        recent += m->loss;
        n++;
        if (step % (steps / 5 > 0 ? steps / 5 : 1) == 0) {
            printf("train model=%s step=%d bpb=%.4f\n", name, step, recent / n / log(2.0));
            fflush(stdout);
            recent = 0.0;
            n = 0;
        }
    }
}

/* dst (MoE) := src (dense) with the FFN of every layer copied into each of its experts; the
   routers keep their initialisation (sparse upcycling, arXiv 2212.05055 §3) */
static int upcycle(moe_model *dst, const moe_model *src) {
    int id, l, e;
    for (id = 0; id < dst->S.count; id++) {
        const moe_tensor *t = &dst->S.tensors[id];
        const char *bank = strstr(t->name, ".moe.experts.");
        char name[MOE_NAME_LEN];
        int from;
        if (bank && sscanf(t->name, "l%d.", &l) == 1) {
            const moe_tensor *s;
            snprintf(name, sizeof name, "l%d.ffn.%s", l, bank + strlen(".moe.experts."));
            if ((from = moe_store_find(&src->S, name)) < 0) return 0;
            s = &src->S.tensors[from];
            for (e = 0; e < t->shape[0]; e++) memcpy(dst->S.params + t->offset + (size_t)e * s->numel, src->S.params + s->offset, sizeof(float) * s->numel);
        } else if ((from = moe_store_find(&src->S, t->name)) >= 0 && src->S.tensors[from].numel == t->numel)
            memcpy(dst->S.params + t->offset, src->S.params + src->S.tensors[from].offset, sizeof(float) * t->numel);
    }
    return 1;
}

/* every diagnostic of every MoE layer on the validation batches; returns bits per byte */
static double analyse(moe_model *m, const brown_corpus *cp, const options *o, int *x, int *y, layer_stats *st) {
    int L = m->cfg.n_layers, E = m->cfg.moe.n_experts, d = m->cfg.d, g, b, l, t, e, k, n_batches = 0;
    int N = m->max_B * m->max_T;
    float *out = (float *)malloc(sizeof(float) * (size_t)N * E * d), *sc = (float *)malloc(sizeof(float) * (size_t)N * E);
    double *sim = (double *)malloc(sizeof(double) * E * E), nats = 0.0, tokens = 0.0, tok_all = 0.0;
    static const moe_expert_matrix mats[3] = {MOE_MATRIX_GATE, MOE_MATRIX_UP, MOE_MATRIX_DOWN};
    memset(st, 0, sizeof(layer_stats) * L);
    for (g = 0; g < cp->n; g++) {
        size_t start = 0;
        for (b = 0; b < o->eval_batches; b++) {
            int rows = moe_loader_sequential(cp->val[g], cp->val_len[g], &start, x, y, m->max_B, m->max_T), n;
            if (rows == 0) break;
            moe_model_forward(m, x, y, rows, m->max_T, NULL); /* pass 1: stores each layer's input */
            n = rows * m->max_T;
            nats += m->loss * n;
            tokens += n;
            n_batches++;
            for (l = 0; l < L; l++) {
                if (!(st[l].is_moe = m->blocks[l].is_moe)) continue;
                if (moe_expert_outputs(out, sc, m, l) != MOE_OK) { fprintf(stderr, "closer_look: %s\n", m->err.msg); exit(1); } /* pass 2 */
                moe_rank_count(st[l].counts, out, sc, n, E, d);
                moe_output_similarity(sim, out, n, E, d, 1);
                for (e = 0; e < E; e++)
                    for (k = e + 1; k < E; k++) st[l].osim += sim[e * E + k] * n / (0.5 * E * (E - 1));
                for (t = 0; t < n * E; t++) {
                    double s2 = 0.0;
                    for (k = 0; k < d; k++) s2 += (double)out[(size_t)t * d + k] * out[(size_t)t * d + k];
                    st[l].norm += sqrt(s2) / E;
                }
            }
            tok_all += n;
        }
    }
    for (l = 0; l < L; l++) {
        double tot = 0.0, on = 0.0, row0 = 0.0;
        int i;
        if (!st[l].is_moe) continue;
        st[l].osim /= tok_all;
        st[l].norm /= tok_all;
        for (i = 0; i < E * E; i++) tot += (double)st[l].counts[i];
        for (i = 0; i < E; i++) { on += (double)st[l].counts[i * E + i]; row0 += (double)st[l].counts[i]; }
        st[l].diag = on / tot;
        st[l].top_agree = (double)st[l].counts[0] / row0; /* of the largest-norm experts, the share ranked first by the router */
        for (k = 0; k < 3; k++) {
            double acc = 0.0;
            if (moe_gate_neuron_regression(&st[l].R[k], &st[l].R2[k], m, l, mats[k]) != MOE_OK) { fprintf(stderr, "closer_look: %s\n", m->err.msg); exit(1); }
            moe_expert_similarity(sim, m, l, mats[k], 0, 0);
            for (e = 0; e < E; e++)
                for (i = e + 1; i < E; i++) acc += sim[e * E + i];
            st[l].wsim[k] = acc / (0.5 * E * (E - 1));
        }
    }
    (void)n_batches;
    free(out); free(sc); free(sim);
    return nats / tokens / log(2.0);
}

static void report(const char *name, const options *o, const moe_model *m, const layer_stats *st, double bpb, FILE *csv, float *depth_series) {
    int l, L = m->cfg.n_layers, E = m->cfg.moe.n_experts, k;
    double mr2[3] = {0, 0, 0};
    int nm = 0;
    float *heat = (float *)malloc(sizeof(float) * (size_t)L * E * E);
    char path[1024];
    printf("\nmodel %s: val_bpb=%.4f (%d layers, %d experts, top-%d)\n", name, bpb, L, E, m->cfg.moe.top_k);
    printf("%-6s %-10s %-10s %-8s %-8s %-8s %-9s %-9s %-9s %-9s %-9s\n", "layer", "diag", "rank0", "R2_gate", "R2_up", "R2_down", "cos_gate",
           "cos_up", "cos_down", "out_ang", "out_norm");
    for (l = 0; l < L; l++) {
        const layer_stats *s = &st[l];
        int i, j;
        if (!s->is_moe) continue;
        printf("%-6d %-10.3f %-10.3f %-8.3f %-8.3f %-8.3f %-9.4f %-9.4f %-9.4f %-9.4f %-9.4f\n", l, s->diag, s->top_agree, s->R2[0], s->R2[1],
               s->R2[2], s->wsim[0], s->wsim[1], s->wsim[2], s->osim, s->norm);
        printf("layer model=%s layer=%d diag=%.4f rank0=%.4f R_gate=%.4f R_up=%.4f R_down=%.4f cos_gate=%.5f cos_up=%.5f cos_down=%.5f out_angular=%.5f out_norm=%.5f\n",
               name, l, s->diag, s->top_agree, s->R[0], s->R[1], s->R[2], s->wsim[0], s->wsim[1], s->wsim[2], s->osim, s->norm);
        fprintf(csv, "%s,%d,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f\n", name, l, bpb, s->diag, s->top_agree, s->R[0], s->R[1],
                s->R[2], s->wsim[0], s->wsim[1], s->wsim[2], s->osim, s->norm, (double)E, (double)m->cfg.moe.top_k);
        for (k = 0; k < 3; k++) mr2[k] += s->R2[k];
        nm++;
        for (i = 0; i < E; i++) { /* each norm rank's row as shares */
            double row = 0.0;
            for (j = 0; j < E; j++) row += (double)s->counts[i * E + j];
            for (j = 0; j < E; j++) heat[((size_t)l * E + i) * E + j] = (float)(row > 0 ? s->counts[i * E + j] / row : 0.0);
        }
        if (depth_series) depth_series[l] = (float)s->wsim[0];
    }
    printf("result model=%s val_bpb=%.4f mean_R2_gate=%.4f mean_R2_up=%.4f mean_R2_down=%.4f\n", name, bpb, mr2[0] / (nm ? nm : 1), mr2[1] / (nm ? nm : 1),
           mr2[2] / (nm ? nm : 1));
    {
        plot_heatmap_opts h;
        memset(&h, 0, sizeof h);
        h.title = "output-norm rank (rows, layers stacked) vs gate-score rank";
        h.xlabel = "gate score rank";
        h.ylabel = "layer x output-norm rank";
        h.v_min = 0.0f;
        h.v_max = 1.0f;
        snprintf(path, sizeof path, "%s/closer_look_ranks_%s.png", o->out_dir, name);
        if (plot_heatmap(path, &h, heat, L * E, E) != 0) fprintf(stderr, "closer_look: could not write %s\n", path);
    }
    free(heat);
}

int main(int argc, char **argv) {
    options o;
    brown_corpus cp;
    moe_model scratch, dense, up, loaded;
    moe_model_config cm, cd;
    moe_loader ld;
    moe_err err;
    const unsigned char *srcs[BROWN_GENRES];
    static layer_stats st[MAX_LAYERS];
    float depth[3][MAX_LAYERS], lx[MAX_LAYERS];
    int *x, *y, g, rc, l, n_series = 2;
    double bpb;
    FILE *csv;
    char path[1024];
    if ((rc = parse(&o, argc, argv)) != FLAGS_RUN) return rc;
    if (!brown_load(&cp, o.data_dir, NULL)) return 1;
    {
        files_err fe;
        if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "closer_look: %s\n", fe.msg); return 1; }
    }
    cm = model_config(&o, 1);
    cd = model_config(&o, 0);
    if (moe_model_init(&scratch, &cm, o.batch, o.seq) != MOE_OK || moe_model_init(&dense, &cd, o.batch, o.seq) != MOE_OK ||
        moe_model_init(&up, &cm, o.batch, o.seq) != MOE_OK) {
        fprintf(stderr, "closer_look: %s%s%s\n", scratch.err.msg, dense.err.msg, up.err.msg);
        return 1;
    }
    printf("+----------------------+------------------------------------------+\n");
    printf("| %-20s | %-40s |\n", "paper", "Closer look into MoE, arXiv 2406.18219");
    {
        char v[64];
        snprintf(v, sizeof v, "d %d, %d layers, %d experts of %d, top-%d", o.d, o.layers, o.experts, o.expert_ff, o.top_k);
        printf("| %-20s | %-40s |\n", "MoE model", v);
        snprintf(v, sizeof v, "%d steps x %d x %d bytes", o.steps, o.batch, o.seq);
        printf("| %-20s | %-40s |\n", "scratch", v);
        snprintf(v, sizeof v, "%d dense + %d MoE steps", o.upcycle_steps, o.steps - o.upcycle_steps);
        printf("| %-20s | %-40s |\n", "upcycled", v);
    }
    printf("+----------------------+------------------------------------------+\n");
    x = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq);
    y = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq);
    for (g = 0; g < cp.n; g++) srcs[g] = cp.train[g];
    snprintf(path, sizeof path, "%s/closer_look.csv", o.out_dir);
    if (!(csv = fopen(path, "w"))) { fprintf(stderr, "closer_look: cannot write %s\n", path); return 1; }
    fprintf(csv, "model,layer,val_bpb,diag_share,rank0_agree,R_gate,R_up,R_down,cos_gate,cos_up,cos_down,out_angular,out_norm,experts,top_k\n");
    /* scratch */
    moe_model_init_weights(&scratch, (uint64_t)o.seed);
    if (moe_loader_init(&ld, srcs, cp.train_len, cp.n, o.seq, (uint64_t)o.seed, &err) != MOE_OK) { fprintf(stderr, "closer_look: %s\n", err.msg); return 1; }
    train(&scratch, &ld, &o, o.steps, "scratch", x, y);
    bpb = analyse(&scratch, &cp, &o, x, y, st);
    report("scratch", &o, &scratch, st, bpb, csv, depth[0]);
    /* upcycled: dense first, then its FFN in every expert, the same data order */
    moe_model_init_weights(&dense, (uint64_t)o.seed);
    moe_model_init_weights(&up, (uint64_t)o.seed);
    moe_loader_init(&ld, srcs, cp.train_len, cp.n, o.seq, (uint64_t)o.seed, &err);
    train(&dense, &ld, &o, o.upcycle_steps, "dense", x, y);
    if (!upcycle(&up, &dense)) { fprintf(stderr, "closer_look: upcycling found no dense FFN\n"); return 1; }
    train(&up, &ld, &o, o.steps - o.upcycle_steps, "upcycled", x, y);
    bpb = analyse(&up, &cp, &o, x, y, st);
    report("upcycled", &o, &up, st, bpb, csv, depth[1]);
    if (o.model_path) {
        long long step = 0;
        if (moe_model_load(&loaded, o.model_path, o.batch, o.seq, &step, NULL, 0, &err) != MOE_OK) {
            fprintf(stderr, "closer_look: %s\n", err.msg);
            return 1;
        }
        if (loaded.cfg.n_layers > MAX_LAYERS || loaded.cfg.moe.n_experts > MAX_E) { fprintf(stderr, "closer_look: the model is larger than this program's tables\n"); return 1; }
        bpb = analyse(&loaded, &cp, &o, x, y, st);
        report("loaded", &o, &loaded, st, bpb, csv, loaded.cfg.n_layers == o.layers ? depth[2] : NULL);
        n_series += loaded.cfg.n_layers == o.layers;
        moe_model_free(&loaded);
    }
    fclose(csv);
    {
        plot_series s[3];
        plot_chart ch;
        static const char *names[3] = {"scratch", "upcycled", "loaded model"};
        int k;
        memset(s, 0, sizeof s);
        memset(&ch, 0, sizeof ch);
        for (l = 0; l < o.layers; l++) lx[l] = (float)l;
        for (k = 0; k < n_series; k++) {
            s[k].name = names[k];
            s[k].x = lx;
            s[k].y = depth[k];
            s[k].n = o.layers;
            s[k].style = PLOT_LINE_POINTS;
        }
        ch.title = "mean inter-expert cosine of the gate matrices by depth";
        ch.xlabel = "layer";
        ch.ylabel = "cosine";
        snprintf(path, sizeof path, "%s/closer_look_depth.png", o.out_dir);
        if (plot_lines(path, &ch, s, n_series) != 0) fprintf(stderr, "closer_look: could not write %s\n", path);
    }
    printf("wrote %s/closer_look.csv, closer_look_ranks_scratch.png, closer_look_ranks_upcycled.png, closer_look_depth.png\n", o.out_dir);
    moe_model_free(&scratch);
    moe_model_free(&dense);
    moe_model_free(&up);
    brown_free(&cp);
    free(x);
    free(y);
    return 0;
}
