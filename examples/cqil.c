/* cqil.c - CQIL (Zou et al., arXiv 2404.06709) on a 12-layer byte-level LM: groups of
 * consecutive upper layers run concurrently on one common input, against dropping the same
 * layers, with measured latency.
 *
 *   make data                        # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/cqil              # the default: a few minutes on 2 cores
 *   build/examples/cqil --quick      # a smoke run (seconds), used by the tests
 *
 * Steps: (1) trains a dense 12-layer model on the Brown corpus (all genres); (2) measures the
 * cosine similarity of adjacent layers' inputs on the validation text (§3.1: upper layers'
 * inputs are nearly the same, which makes them quasi-independent); (3) for groups of P = 2
 * and 4 layers from layer s to the end, bypass d = 0 and 1 (and the official training code's
 * double-counted bypass), measures validation bits per byte, the sequential depth (the
 * latency proxy) and the wall-clock latency per token of a (1, seq) forward, the members of a
 * group running concurrently on the OpenMP threads; (4) compares with DROPPING the later
 * members of every group (a shallower model of the same depth, measured the same way);
 * (5) recovers one CQIL configuration by a short self-distillation (the post-paper README's
 * recipe): the sequential model is the teacher, KL(softmax(teacher) || softmax(student)) at
 * temperature 1, all weights tuned (the README uses LoRA) in CQIL form.
 * Writes DIR/cqil.csv (one row per configuration), cqil_similarity.csv, cqil_kd.csv,
 * cqil_similarity.png, cqil_depth.png (bits/byte vs depth) and cqil_latency.png (bits/byte vs
 * measured latency).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_*, moe_model_set_groups, moe_layer_input_similarity */
#define PLOT_IMPLEMENTATION
#include "plot.h"  /* defines: plot_lines */
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LAYERS 64
#define MAX_CONFIGS 64

typedef struct options {
    int d, layers, heads, d_ff, seq, batch, steps, warmup, eval_batches, lat_reps, kd_steps, kd_group, kd_start, seed, quick;
    float lr, min_lr, wd, kd_lr;
    const char *data_dir, *out_dir;
} options;

typedef struct config {
    char kind[8];        /* "seq", "cqil", "drop" */
    int P, start, bypass, dbl, depth;
    double bpb, lat_us;  /* validation bits per byte; median microseconds per token */
    double lat_min_us;   /* the fastest repetition                                   */
} config;

static int parse(options *o, int argc, char **argv) {
    flag fl[24];
    flags_program p;
    int n = 0, rc;
    memset(o, 0, sizeof *o);
    o->d = 64; o->layers = 12; o->heads = 4; o->d_ff = 128; o->seq = 64; o->batch = 16; o->steps = 1500; o->warmup = 50;
    o->eval_batches = 4; o->lat_reps = 21; o->kd_steps = 200; o->kd_group = 2; o->kd_start = 6; o->seed = 1;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->wd = 0.1f; o->kd_lr = 1e-4f;
    o->data_dir = "data/brown"; o->out_dir = "out";
    fl[n++] = flag_heading("model and training");
    fl[n++] = flag_int("--d", &o->d, 8, 4096, "model width");
    fl[n++] = flag_int("--layers", &o->layers, 4, MAX_LAYERS, "layers (the paper's setting is 12 here)");
    fl[n++] = flag_int("--heads", &o->heads, 1, 64, "attention heads");
    fl[n++] = flag_int("--d-ff", &o->d_ff, 1, 65536, "SwiGLU FFN width");
    fl[n++] = flag_int("--seq", &o->seq, 2, 4096, "bytes per sequence");
    fl[n++] = flag_int("--batch", &o->batch, 1, 4096, "sequences per batch");
    fl[n++] = flag_int("--steps", &o->steps, 1, 1e8, "training steps");
    fl[n++] = flag_float("--lr", &o->lr, 0, 1, "peak learning rate (cosine to --min-lr)");
    fl[n++] = flag_int("--seed", &o->seed, 0, 2147483647, "initialisation and data order");
    fl[n++] = flag_heading("measurements");
    fl[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1000, "validation batches per genre");
    fl[n++] = flag_int("--lat-reps", &o->lat_reps, 1, 10000, "timed (1, seq) forwards per configuration (the median counts)");
    fl[n++] = flag_heading("self-distillation");
    fl[n++] = flag_int("--kd-steps", &o->kd_steps, 0, 1e7, "steps of distillation into one CQIL configuration");
    fl[n++] = flag_int("--kd-group", &o->kd_group, 2, MAX_LAYERS, "its group size P");
    fl[n++] = flag_int("--kd-start", &o->kd_start, 0, MAX_LAYERS, "its first grouped layer s (groups of P from s to the end)");
    fl[n++] = flag_float("--kd-lr", &o->kd_lr, 0, 1, "its learning rate");
    fl[n++] = flag_string("--data", &o->data_dir, "DIR", "the Brown corpus (make data)");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "a smoke run in seconds: d 32, seq 32, batch 4, 40 steps, two starts per P, 10 distillation steps");
    p = flags_program_make("cqil", "CQIL: groups of upper layers run concurrently on one input, against dropping them",
                           "Trains a dense byte-level LM on the Brown corpus (data/brown, `make data`), then measures validation\n"
                           "bits per byte, sequential depth and wall-clock latency per token for CQIL groups (P = 2, 4 from layer s\n"
                           "to the end; bypass 0, 1, and the official code's double-counted bypass) and for dropping the same\n"
                           "layers; distils one configuration from the sequential model. Writes DIR/cqil.csv, cqil_similarity.csv,\n"
                           "cqil_kd.csv, cqil_similarity.png, cqil_depth.png, cqil_latency.png.",
                           fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (o->quick) {
        o->d = 32; o->d_ff = 64; o->heads = 2; o->seq = 32; o->batch = 4; o->steps = 40; o->warmup = 4;
        o->eval_batches = 1; o->lat_reps = 5; o->kd_steps = 10; o->lr = 3e-3f;
    }
    if (o->d % o->heads != 0) { fprintf(stderr, "cqil: --d %d must be a multiple of --heads %d\n", o->d, o->heads); return 2; }
    if (o->kd_start + o->kd_group > o->layers || (o->layers - o->kd_start) % o->kd_group != 0) {
        fprintf(stderr, "cqil: --kd-start %d and --kd-group %d must tile layers %d..%d\n", o->kd_start, o->kd_group, o->kd_start, o->layers - 1);
        return 2;
    }
    return FLAGS_RUN;
}

static moe_model_config model_config(const options *o, int layers) {
    moe_model_config c = moe_model_config_default();
    c.max_seq = o->seq;
    c.d = o->d;
    c.n_layers = layers;
    c.n_heads = o->heads;
    c.d_ff = o->d_ff;
    c.pos = MOE_POS_ROPE;
    c.moe_every = 0; /* dense, as the paper's LLaMA */
    return c;
}

/* validation bits per byte over eval_batches batches of every genre; sim (n_layers - 1), when
   not NULL, gets the adjacent-layer input similarity averaged over the batches */
static double evaluate(moe_model *m, const brown_corpus *cp, const options *o, int *x, int *y, double *sim) {
    double nats = 0.0, tokens = 0.0;
    int g, b, l, nb = 0, L = m->cfg.n_layers;
    double s[MAX_LAYERS];
    if (sim)
        for (l = 0; l + 1 < L; l++) sim[l] = 0.0;
    for (g = 0; g < cp->n; g++) {
        size_t start = 0;
        for (b = 0; b < o->eval_batches; b++) {
            int rows = moe_loader_sequential(cp->val[g], cp->val_len[g], &start, x, y, o->batch, o->seq);
            if (rows == 0) break;
            if (moe_model_forward(m, x, y, rows, o->seq, NULL) != MOE_OK) { fprintf(stderr, "cqil: %s\n", m->err.msg); exit(1); }
            nats += m->loss * rows * o->seq;
            tokens += rows * o->seq;
            if (sim && moe_layer_input_similarity(s, m) == MOE_OK) {
                for (l = 0; l + 1 < L; l++) sim[l] += s[l];
                nb++;
            }
        }
    }
    if (sim)
        for (l = 0; l + 1 < L; l++) sim[l] /= nb > 0 ? nb : 1;
    return nats / tokens / log(2.0);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* median wall-clock microseconds per token of a (1, seq) forward (a single-sequence request);
   *best gets the fastest repetition (on a shared machine the least disturbed one) */
static double latency_us(moe_model *m, const options *o, const int *x, double *best) {
    double t[1024];
    int r, n = o->lat_reps < 1024 ? o->lat_reps : 1024;
    moe_model_forward(m, x, NULL, 1, o->seq, NULL); /* warm caches */
    for (r = 0; r < n; r++) {
        double t0 = moe_time_seconds();
        moe_model_forward(m, x, NULL, 1, o->seq, NULL);
        t[r] = (moe_time_seconds() - t0) * 1e6 / o->seq;
    }
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    *best = t[0];
    return t[n / 2];
}

/* groups of P consecutive layers from `start` to the end */
static int set_groups(moe_model *m, int P, int start, int bypass, int dbl) {
    int first[MAX_LAYERS], size[MAX_LAYERS], n = 0, l;
    for (l = start; l + P <= m->cfg.n_layers; l += P) {
        first[n] = l;
        size[n++] = P;
    }
    if (moe_model_set_groups(m, first, size, n, bypass, dbl) != MOE_OK) {
        fprintf(stderr, "cqil: %s\n", m->err.msg);
        return 0;
    }
    return 1;
}

/* dst := src without the later members of every group of P from `start` (layer dropping at
   the same depth): a shallower model whose layer j holds src's layer keep[j] */
static int build_dropped(moe_model *dst, const moe_model *src, const options *o, int P, int start) {
    int keep[MAX_LAYERS], n = 0, l, j, id;
    char pre[32], name[MOE_NAME_LEN];
    moe_model_config c;
    for (l = 0; l < src->cfg.n_layers; l++)
        if (l < start || (l - start) % P == 0) keep[n++] = l;
    c = model_config(o, n);
    if (moe_model_init(dst, &c, o->batch, o->seq) != MOE_OK) { fprintf(stderr, "cqil: %s\n", dst->err.msg); return 0; }
    for (id = 0; id < dst->S.count; id++) {
        const moe_tensor *t = &dst->S.tensors[id];
        int from = -1;
        if (sscanf(t->name, "l%d.", &j) == 1) {
            snprintf(pre, sizeof pre, "l%d.", j);
            snprintf(name, sizeof name, "l%d.%s", keep[j], t->name + strlen(pre));
        } else
            snprintf(name, sizeof name, "%s", t->name);
        from = moe_store_find(&src->S, name);
        if (from < 0 || src->S.tensors[from].numel != t->numel) { fprintf(stderr, "cqil: no tensor %s to copy\n", name); return 0; }
        memcpy(dst->S.params + t->offset, moe_store_param(&src->S, from), sizeof(float) * t->numel);
    }
    return 1;
}

/* KL(softmax(t) || softmax(s)) summed over the vocabulary, mean over n rows; d (n, V) gets its
   gradient with respect to s (softmax(s) - softmax(t)) / n when not NULL */
static double kd_loss(const float *s, const float *t, int n, int V, float *d) {
    double kl = 0.0;
    int i, v;
    for (i = 0; i < n; i++) {
        const float *a = s + (size_t)i * V, *b = t + (size_t)i * V;
        double ma = a[0], mb = b[0], za = 0.0, zb = 0.0;
        for (v = 1; v < V; v++) { ma = a[v] > ma ? a[v] : ma; mb = b[v] > mb ? b[v] : mb; }
        for (v = 0; v < V; v++) { za += exp(a[v] - ma); zb += exp(b[v] - mb); }
        for (v = 0; v < V; v++) {
            double lps = a[v] - ma - log(za), lpt = b[v] - mb - log(zb), pt = exp(lpt);
            kl += pt * (lpt - lps);
            if (d) d[(size_t)i * V + v] = (float)((exp(lps) - pt) / n);
        }
    }
    return kl / n;
}

/* KL of the student from the teacher on the first validation batch of every genre */
static double kd_eval(moe_model *st, moe_model *te, const brown_corpus *cp, const options *o, int *x, int *y) {
    double kl = 0.0;
    int g, n = 0;
    for (g = 0; g < cp->n; g++) {
        size_t start = 0;
        int rows = moe_loader_sequential(cp->val[g], cp->val_len[g], &start, x, y, o->batch, o->seq);
        if (rows == 0) continue;
        moe_model_forward(te, x, NULL, rows, o->seq, NULL);
        moe_model_forward(st, x, NULL, rows, o->seq, NULL);
        kl += kd_loss(st->logits, te->logits, rows * o->seq, st->cfg.vocab, NULL);
        n++;
    }
    return kl / (n > 0 ? n : 1);
}

static FILE *open_out(const options *o, const char *name) {
    char path[1024];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", o->out_dir, name);
    f = fopen(path, "w");
    if (!f) fprintf(stderr, "cqil: cannot write %s\n", path);
    return f;
}

int main(int argc, char **argv) {
    options o;
    brown_corpus cp;
    moe_model m, teacher;
    moe_model_config c;
    moe_loader ld;
    moe_adamw_config adam = moe_adamw_config_default();
    moe_err err;
    const unsigned char *srcs[BROWN_GENRES];
    config cf[MAX_CONFIGS];
    double sim[MAX_LAYERS], t0 = moe_time_seconds(), recent = 0.0, kl_before, kl_after, bpb_before, bpb_after;
    int *x, *y, step, g, i, l, nc = 0, rc, P, s, b, recent_n = 0;
    float *dl;
    FILE *f;
    if ((rc = parse(&o, argc, argv)) != FLAGS_RUN) return rc;
    if (!brown_load(&cp, o.data_dir, NULL)) return 1;
    {
        files_err fe;
        if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "cqil: %s\n", fe.msg); return 1; }
    }
    c = model_config(&o, o.layers);
    if (moe_model_init(&m, &c, o.batch, o.seq) != MOE_OK) { fprintf(stderr, "cqil: %s\n", m.err.msg); return 1; }
    moe_model_init_weights(&m, (uint64_t)o.seed);
    x = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq);
    y = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq);
    dl = (float *)malloc(sizeof(float) * (size_t)o.batch * o.seq * c.vocab);
    {
        char v[6][64];
        const char *k[6] = {"paper", "model (dense)", "parameters", "training", "threads", "self-distillation"};
        snprintf(v[0], 64, "CQIL, arXiv 2404.06709 (ACL 2024)");
        snprintf(v[1], 64, "d %d, %d layers, %d heads, d_ff %d", o.d, o.layers, o.heads, o.d_ff);
        snprintf(v[2], 64, "%zu", moe_model_params_total(&m));
        snprintf(v[3], 64, "%d steps x %d x %d bytes, lr %g", o.steps, o.batch, o.seq, (double)o.lr);
        snprintf(v[4], 64, "%d", moe_num_threads());
        snprintf(v[5], 64, "%d steps, P %d from layer %d, lr %g", o.kd_steps, o.kd_group, o.kd_start, (double)o.kd_lr);
        printf("+----------------------+------------------------------------------+\n");
        for (i = 0; i < 6; i++) printf("| %-20s | %-40s |\n", k[i], v[i]);
        printf("+----------------------+------------------------------------------+\n");
    }
    fflush(stdout);
    /* (1) train the sequential model */
    for (g = 0; g < cp.n; g++) srcs[g] = cp.train[g];
    if (moe_loader_init(&ld, srcs, cp.train_len, cp.n, o.seq, (uint64_t)o.seed, &err) != MOE_OK) { fprintf(stderr, "cqil: %s\n", err.msg); return 1; }
    adam.weight_decay = o.wd;
    for (step = 1; step <= o.steps; step++) {
        float lr = moe_lr_cosine(step - 1, o.warmup, o.steps, o.lr, o.min_lr);
        moe_store_zero_grad(&m.S);
        moe_loader_next(&ld, x, y, NULL, o.batch, o.seq);
        moe_model_forward(&m, x, y, o.batch, o.seq, NULL);
        moe_model_backward(&m, 1.0f);
        moe_clip_grad_norm(&m.S, 1.0f);
        moe_adamw_step(&m.S, &adam, lr, step);
        recent += m.loss;
        recent_n++;
        if (step % (o.steps / 10 > 0 ? o.steps / 10 : 1) == 0 || step == o.steps) {
            printf("train step=%d bpb=%.4f lr=%.2e seconds=%.1f\n", step, recent / recent_n / log(2.0), (double)lr, moe_time_seconds() - t0);
            fflush(stdout);
            recent = 0.0;
            recent_n = 0;
        }
    }
    /* (2) the sequential baseline and the similarity of adjacent layers' inputs */
    memset(cf, 0, sizeof cf);
    strcpy(cf[0].kind, "seq");
    cf[0].P = 1;
    cf[0].start = o.layers;
    cf[0].depth = o.layers;
    cf[0].bpb = evaluate(&m, &cp, &o, x, y, sim);
    cf[0].lat_us = latency_us(&m, &o, x, &cf[0].lat_min_us);
    nc = 1;
    printf("config kind=seq P=1 start=%d bypass=0 double=0 depth=%d val_bpb=%.4f latency_us=%.2f latency_min_us=%.2f\n", o.layers, o.layers, cf[0].bpb,
           cf[0].lat_us, cf[0].lat_min_us);
    for (l = 0; l + 1 < o.layers; l++) printf("similarity layer=%d next=%d cos=%.4f\n", l, l + 1, sim[l]);
    /* (3) CQIL groups and (4) dropping the same layers */
    for (P = 2; P <= 4; P += 2)
        for (s = o.layers - P; s >= o.layers / 3 && s >= 1 && (!o.quick || s >= o.layers - 2 * P); s -= P) {
            moe_model dropped;
            for (b = 0; b < 3; b++) { /* bypass 0, 1 (clean), 1 (double counted) */
                config *k = &cf[nc++];
                strcpy(k->kind, "cqil");
                k->P = P;
                k->start = s;
                k->bypass = b > 0;
                k->dbl = b == 2;
                if (!set_groups(&m, P, s, k->bypass, k->dbl)) return 1;
                k->depth = moe_model_depth(&m);
                k->bpb = evaluate(&m, &cp, &o, x, y, NULL);
                k->lat_us = latency_us(&m, &o, x, &k->lat_min_us);
                printf("config kind=cqil P=%d start=%d bypass=%d double=%d depth=%d val_bpb=%.4f latency_us=%.2f latency_min_us=%.2f\n", P, s,
                       k->bypass, k->dbl, k->depth, k->bpb, k->lat_us, k->lat_min_us);
            }
            moe_model_set_groups(&m, NULL, NULL, 0, 0, 0);
            if (!build_dropped(&dropped, &m, &o, P, s)) return 1;
            {
                config *k = &cf[nc++];
                strcpy(k->kind, "drop");
                k->P = P;
                k->start = s;
                k->depth = dropped.cfg.n_layers;
                k->bpb = evaluate(&dropped, &cp, &o, x, y, NULL);
                k->lat_us = latency_us(&dropped, &o, x, &k->lat_min_us);
                printf("config kind=drop P=%d start=%d bypass=0 double=0 depth=%d val_bpb=%.4f latency_us=%.2f latency_min_us=%.2f\n", P, s, k->depth,
                       k->bpb, k->lat_us, k->lat_min_us);
            }
            moe_model_free(&dropped);
            fflush(stdout);
            if (nc + 4 > MAX_CONFIGS) break;
        }
    /* (5) self-distillation of one configuration from the sequential model */
    if (moe_model_init(&teacher, &c, o.batch, o.seq) != MOE_OK) { fprintf(stderr, "cqil: %s\n", teacher.err.msg); return 1; }
    memcpy(teacher.S.params, m.S.params, sizeof(float) * m.S.numel);
    if (!set_groups(&m, o.kd_group, o.kd_start, 0, 0)) return 1;
    bpb_before = evaluate(&m, &cp, &o, x, y, NULL);
    kl_before = kd_eval(&m, &teacher, &cp, &o, x, y);
    if (!(f = open_out(&o, "cqil_kd.csv"))) return 1;
    fprintf(f, "step,train_kl\n");
    {
        moe_adamw_config kd = moe_adamw_config_default();
        moe_store_zero_grad(&m.S); /* fresh moments: a new optimizer for the fine-tune */
        memset(m.S.adam_m, 0, sizeof(float) * m.S.numel);
        memset(m.S.adam_v, 0, sizeof(float) * m.S.numel);
        kd.weight_decay = o.wd;
        for (step = 1; step <= o.kd_steps; step++) {
            double kl;
            int n = o.batch * o.seq;
            moe_store_zero_grad(&m.S);
            moe_loader_next(&ld, x, y, NULL, o.batch, o.seq);
            moe_model_forward(&teacher, x, NULL, o.batch, o.seq, NULL);
            moe_model_forward(&m, x, NULL, o.batch, o.seq, NULL);
            kl = kd_loss(m.logits, teacher.logits, n, c.vocab, dl);
            if (moe_model_backward_logits(&m, dl, 1.0f) != MOE_OK) { fprintf(stderr, "cqil: %s\n", m.err.msg); return 1; }
            moe_clip_grad_norm(&m.S, 1.0f);
            moe_adamw_step(&m.S, &kd, moe_lr_cosine(step - 1, o.kd_steps / 10, o.kd_steps, o.kd_lr, o.kd_lr * 0.1f), step);
            fprintf(f, "%d,%.6f\n", step, kl);
            if (step % (o.kd_steps / 5 > 0 ? o.kd_steps / 5 : 1) == 0) printf("kd step=%d train_kl=%.5f\n", step, kl);
        }
    }
    fclose(f);
    bpb_after = evaluate(&m, &cp, &o, x, y, NULL);
    kl_after = kd_eval(&m, &teacher, &cp, &o, x, y);
    printf("kd P=%d start=%d depth=%d val_bpb_before=%.4f val_bpb_after=%.4f val_kl_before=%.5f val_kl_after=%.5f\n", o.kd_group, o.kd_start,
           moe_model_depth(&m), bpb_before, bpb_after, kl_before, kl_after);
    /* files */
    if (!(f = open_out(&o, "cqil.csv"))) return 1;
    fprintf(f, "kind,P,start,bypass,double,depth,val_bpb,latency_us_per_token,latency_min_us_per_token,latency_min_ratio\n");
    for (i = 0; i < nc; i++)
        fprintf(f, "%s,%d,%d,%d,%d,%d,%.5f,%.3f,%.3f,%.4f\n", cf[i].kind, cf[i].P, cf[i].start, cf[i].bypass, cf[i].dbl, cf[i].depth, cf[i].bpb,
                cf[i].lat_us, cf[i].lat_min_us, cf[i].lat_min_us / cf[0].lat_min_us);
    fclose(f);
    if (!(f = open_out(&o, "cqil_similarity.csv"))) return 1;
    fprintf(f, "layer,next,cos\n");
    for (l = 0; l + 1 < o.layers; l++) fprintf(f, "%d,%d,%.5f\n", l, l + 1, sim[l]);
    fclose(f);
    {
        /* series: CQIL P/bypass (clean), drop P; each over its starts, plus the sequential point */
        static const char *names[7] = {"CQIL P=2 d=0", "CQIL P=2 d=1", "CQIL P=2 d=1 doubled", "drop, P=2 depth",
                                       "CQIL P=4 d=0", "CQIL P=4 d=1", "drop, P=4 depth"};
        float xs[2][8][MAX_CONFIGS], ys[8][MAX_CONFIGS], sx[MAX_LAYERS], sy[MAX_LAYERS];
        int cnt[8], k, axis;
        plot_series ser[9];
        plot_chart ch;
        char path[1024];
        memset(cnt, 0, sizeof cnt);
        for (i = 1; i < nc; i++) {
            int sidx = cf[i].P == 2 ? (strcmp(cf[i].kind, "drop") == 0 ? 3 : cf[i].dbl ? 2 : cf[i].bypass) :
                                      (strcmp(cf[i].kind, "drop") == 0 ? 6 : cf[i].dbl ? -1 : 4 + cf[i].bypass);
            if (sidx < 0) continue;
            xs[0][sidx][cnt[sidx]] = (float)cf[i].depth;
            xs[1][sidx][cnt[sidx]] = (float)cf[i].lat_min_us;
            ys[sidx][cnt[sidx]++] = (float)cf[i].bpb;
        }
        for (axis = 0; axis < 2; axis++) {
            float seqx = axis ? (float)cf[0].lat_min_us : (float)cf[0].depth, seqy = (float)cf[0].bpb;
            int ns = 0;
            memset(ser, 0, sizeof ser);
            memset(&ch, 0, sizeof ch);
            for (k = 0; k < 7; k++) {
                if (cnt[k] == 0) continue;
                ser[ns].name = names[k];
                ser[ns].x = xs[axis][k];
                ser[ns].y = ys[k];
                ser[ns].n = cnt[k];
                ser[ns++].style = PLOT_LINE_POINTS;
            }
            ser[ns].name = "sequential";
            ser[ns].x = &seqx;
            ser[ns].y = &seqy;
            ser[ns].n = 1;
            ser[ns++].style = PLOT_POINTS;
            ch.title = axis ? "validation bits/byte vs measured latency" : "validation bits/byte vs sequential depth";
            ch.xlabel = axis ? "microseconds per token, (1, seq) forward, fastest of the repetitions" : "sequential steps (latency proxy)";
            ch.ylabel = "bits per byte";
            snprintf(path, sizeof path, "%s/%s", o.out_dir, axis ? "cqil_latency.png" : "cqil_depth.png");
            if (plot_lines(path, &ch, ser, ns) != 0) fprintf(stderr, "cqil: could not write %s\n", path);
        }
        for (l = 0; l + 1 < o.layers; l++) { sx[l] = (float)l; sy[l] = (float)sim[l]; }
        memset(ser, 0, sizeof ser);
        memset(&ch, 0, sizeof ch);
        ser[0].name = "cos(input of l, input of l+1)";
        ser[0].x = sx;
        ser[0].y = sy;
        ser[0].n = o.layers - 1;
        ser[0].style = PLOT_LINE_POINTS;
        ch.title = "adjacent layers' inputs (validation tokens)";
        ch.xlabel = "layer l";
        ch.ylabel = "mean cosine";
        snprintf(path, sizeof path, "%s/cqil_similarity.png", o.out_dir);
        if (plot_lines(path, &ch, ser, 1) != 0) fprintf(stderr, "cqil: could not write %s\n", path);
    }
    {
        double upper = 0.0, lower = 0.0;
        int nu = 0, nl = 0;
        for (l = 0; l + 1 < o.layers; l++) {
            if (l + 1 >= o.layers / 2) { upper += sim[l]; nu++; }
            else { lower += sim[l]; nl++; }
        }
        printf("result seq_bpb=%.4f seq_latency_min_us=%.2f sim_lower=%.4f sim_upper=%.4f kd_bpb_before=%.4f kd_bpb_after=%.4f kd_kl_before=%.5f "
               "kd_kl_after=%.5f seconds=%.1f\n",
               cf[0].bpb, cf[0].lat_min_us, lower / (nl ? nl : 1), upper / (nu ? nu : 1), bpb_before, bpb_after, kl_before, kl_after,
               moe_time_seconds() - t0);
    }
    printf("wrote %s/cqil.csv, cqil_similarity.csv, cqil_kd.csv, cqil_similarity.png, cqil_depth.png, cqil_latency.png\n", o.out_dir);
    moe_model_free(&teacher);
    moe_model_free(&m);
    brown_free(&cp);
    free(x);
    free(y);
    free(dl);
    return 0;
}
