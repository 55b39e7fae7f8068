/* gw_finetune.c - GW-MoE (methods §4.7): broadcast uncertain tokens to every expert while
 * fine-tuning, route sparsely at evaluation (issue 4).
 *
 *   make data                                  # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/gw_finetune                 # the default: well under 15 minutes on 2 cores
 *   build/examples/gw_finetune --quick         # a smoke run (under a minute), used by the tests
 *   build/examples/gw_finetune --ft-genre romance --share 0.05 --seeds 5
 *
 * Per seed: pre-train a byte-level MoE LM (Switch top-1, softmax weight, no renormalisation,
 * 8 experts, Switch balance loss) on some genres; then fine-tune copies of it on a held-out
 * genre, one per row of the variant table: plain fine-tuning, GW fine-tuning (uncertain tokens
 * broadcast, with and without a per-sequence slot cap), broadcast-all, and the released code's
 * behaviour (uncertain tokens skip the experts). Every copy reads the same fine-tuning batches.
 * All are evaluated with sparse routing (broadcast off): bits per byte on the fine-tuning
 * genre's validation text and on the pre-training genres' (forgetting), and routing
 * sensitivity (below).
 *
 * Threshold: after pre-training, the normalised routing entropy u = -sum p ln(p + 1e-5) / ln E
 * (moe.h's GW definition) of the pre-trained model on fine-tuning batches, pooled over MoE
 * layers; tau = its (1 - share) quantile, so about `share` of the tokens are uncertain at the
 * start of fine-tuning. The share actually broadcast during fine-tuning is measured and printed.
 *
 * Routing sensitivity: on the fine-tuning genre's validation text, per MoE layer l, the tokens
 * whose routing entropy at layer l is in the top decile (of that layer, that model) get a
 * different expert at layer l only - the 2nd-best, or a uniformly random other one - and we
 * record the increase of those tokens' loss (bits). See forward_swapped for how.
 *
 * Prints a settings table, key=value progress, a results table (mean +- std over seeds);
 * writes out/gw_finetune.csv, out/gw_finetune_layers.csv, out/gw_finetune_curve.csv,
 * out/gw_finetune.md, out/gw_finetune_bpb.png (fine-tuning genre bpb over fine-tuning steps)
 * and out/gw_finetune_sensitivity.png (loss increase per layer).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h"
#define PLOT_IMPLEMENTATION
#include "plot.h"
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "brown.h" /* defines: brown_genres, brown_read_file */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the fine-tuning variants: ONE ROW EACH ------------------------------------------------ */
typedef enum { BC_NONE = 0, BC_UNCERTAIN = 1, BC_ALL = 2 } broadcast_kind;

typedef struct ft_variant {
    const char *name;
    const char *what;
    int finetune;            /* 0: the pre-trained model itself (reference row)            */
    broadcast_kind bc;       /* which tokens are broadcast while fine-tuning               */
    int slots;               /* 1: cap uncertain tokens per sequence at --gw-slots          */
    int released;            /* 1: gw_released (the official code's behaviour)              */
} ft_variant;

static const ft_variant variants[] = {
    /* name            what                                                          ft  broadcast     slots rel */
    {"pretrained",    "no fine-tuning (reference)",                                  0, BC_NONE,      0, 0},
    {"ft",            "plain fine-tuning, sparse top-1",                              1, BC_NONE,      0, 0},
    {"gw",            "GW: uncertain tokens (u >= tau) to all experts",              1, BC_UNCERTAIN, 0, 0},
    {"gw-slots",      "GW with at most --gw-slots uncertain tokens per sequence",    1, BC_UNCERTAIN, 1, 0},
    {"broadcast-all", "every token to all experts (dense fine-tuning)",              1, BC_ALL,       0, 0},
    {"gw-released",   "released code: uncertain tokens skip experts, p_{E-1} x",     1, BC_UNCERTAIN, 0, 1},
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

#define MAX_GENRES BROWN_GENRES
#define MAX_SEEDS 16
#define MAX_LAYERS 16

typedef struct options {
    int d, layers, heads, experts, expert_ff, seq, batch, seeds, quick;
    int pre_steps, ft_steps, warmup, ft_warmup, ft_eval_every, eval_batches, sens_batches, calib_batches, log_every, gw_slots;
    float lr, min_lr, ft_lr, ft_min_lr, wd, clip, beta2, balance_coef, share;
    char pre_genres[256], ft_genre[64];
    const char *data_dir, *out_dir;
} options;

/* ---- corpus ---------------------------------------------------------------------------------- */

typedef struct text {
    const char *name;
    unsigned char *train, *val;
    size_t train_len, val_len;
} text;

static int load_text(text *t, const char *dir, const char *genre) {
    char path[1024];
    int g;
    memset(t, 0, sizeof *t);
    for (g = 0; g < MAX_GENRES; g++)
        if (strcmp(genre, brown_genres[g]) == 0) t->name = brown_genres[g];
    if (!t->name) { fprintf(stderr, "unknown genre '%s'\n", genre); return 0; }
    snprintf(path, sizeof path, "%s/train/%s.txt", dir, genre);
    t->train = brown_read_file(path, &t->train_len);
    snprintf(path, sizeof path, "%s/val/%s.txt", dir, genre);
    t->val = brown_read_file(path, &t->val_len);
    if (!t->train || !t->val) {
        fprintf(stderr, "cannot read %s/{train,val}/%s.txt: run `make data` first (it fetches the Brown corpus)\n", dir, genre);
        return 0;
    }
    return 1;
}

/* ---- small helpers --------------------------------------------------------------------------- */

/* moe.h's GW uncertainty of one routing vector, divided by ln E */
static double norm_entropy(const float *p, int E) {
    double u = 0.0;
    int e;
    for (e = 0; e < E; e++) u -= (double)p[e] * log((double)p[e] + 1e-5);
    return u / log((double)E);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* the q-quantile of v (n > 0), nearest rank; sorts v */
static float quantile(float *v, int n, double q) {
    int i = (int)(q * n);
    qsort(v, (size_t)n, sizeof(float), cmp_float);
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static void mean_std(const double *v, int n, double *mean, double *sd) {
    double s = 0.0, q = 0.0;
    int i;
    for (i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0.0;
}

static int moe_layers_of(const moe_model *m, int *ids) {
    int l, n = 0;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) ids[n++] = l;
    return n;
}

/* bits per byte of m (sparse routing) on up to max_batches batches of consecutive windows */
static double eval_bpb(moe_model *m, const unsigned char *data, size_t len, const options *o, int max_batches, double *tokens_out) {
    int *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    size_t start = 0;
    double nats = 0.0, tokens = 0.0;
    int bi;
    for (bi = 0; bi < max_batches; bi++) {
        int rows = moe_loader_sequential(data, len, &start, x, y, o->batch, o->seq);
        if (rows == 0) break;
        moe_model_forward(m, x, y, rows, o->seq, NULL);
        nats += m->loss * rows * o->seq;
        tokens += (double)rows * o->seq;
    }
    free(x);
    free(y);
    if (tokens_out) *tokens_out = tokens;
    return nats / tokens / log(2.0);
}

/* ---- routing sensitivity -------------------------------------------------------------------------
   To give chosen tokens a different expert in ONE layer, moe_model_forward runs with an FFN
   hook (moe.h's intervention point): after the swapped layer's MoE output is computed, the
   hook recomputes the FFN output of each chosen token t as  g_t * E_alt(x_t)  where g_t is the
   router's weight of its top-1 expert (Switch top-1: y_t = g_t E_top1(x_t), so exactly the
   expert is replaced and the weight kept - a pure "which expert" intervention; using the new
   expert's own, smaller probability would mix in a change of scale). Later layers see the
   changed residual stream as they would had the router chosen alt. Only top-1 routers (K = 1). */

typedef struct swap_buf {
    int layer, N;               /* the swapped layer, tokens in the batch                  */
    const int *alt;             /* (N) the new expert of each token, -1 = keep             */
    float *xg, *hg, *hu, *out;  /* (N, d) (N, D) (N, D) (N, d) gathered rows of chosen tokens */
    int *tok;                   /* (N) token of each gathered row                          */
    int offset[65];
} swap_buf;

static void swap_hook(moe_model *m, int l, void *user) {
    swap_buf *sb = (swap_buf *)user;
    moe_block *b = &m->blocks[l];
    moe_layer *L = &b->moe;
    int d = m->cfg.d, E = m->cfg.moe.n_experts, N = sb->N, n = 0, i, j, e;
    moe_expert_weights w;
    if (l != sb->layer || !b->is_moe) return;
    w = moe_layer_experts(L, &m->S, 0, 0);
    for (e = 0; e <= E; e++) sb->offset[e] = 0;
    for (i = 0; i < N; i++)
        if (sb->alt[i] >= 0) sb->offset[sb->alt[i] + 1]++;
    for (e = 0; e < E; e++) sb->offset[e + 1] += sb->offset[e];
    for (e = 0; e < E; e++) /* rows grouped by their new expert, tokens in order */
        for (i = 0; i < N; i++)
            if (sb->alt[i] == e) {
                memcpy(sb->xg + (size_t)n * d, b->ln2 + (size_t)i * d, sizeof(float) * (size_t)d);
                sb->tok[n++] = i;
            }
    moe_experts_forward(sb->out, sb->hg, sb->hu, sb->xg, &w, sb->offset, E, d, L->cfg.d_ff, L->cfg.expert, L->cfg.activation, NULL);
    for (j = 0; j < n; j++) {
        int t = sb->tok[j];
        float g = L->gates[(size_t)t * E + L->topk[(size_t)t * L->cfg.top_k]];
        for (i = 0; i < d; i++) b->ffn[(size_t)t * d + i] = g * sb->out[(size_t)j * d + i];
    }
}

/* the model's forward with the tokens of alt (-1 = keep) sent to another expert in layer swap_l */
static void forward_swapped(moe_model *m, const int *inputs, const int *targets, int B, int T, int swap_l,
                            const int *alt, swap_buf *sb) {
    sb->layer = swap_l;
    sb->N = B * T;
    sb->alt = alt;
    m->ffn_hook = swap_hook;
    m->ffn_hook_user = sb;
    moe_model_forward(m, inputs, targets, B, T, NULL);
    m->ffn_hook = NULL;
    m->ffn_hook_user = NULL;
}

typedef struct sensitivity {
    double second[MAX_LAYERS], random[MAX_LAYERS]; /* mean loss increase, bits, per MoE layer */
    double second_mean, random_mean;               /* mean over MoE layers                   */
    int n_moe;
} sensitivity;

static void routing_sensitivity(moe_model *m, const text *ft, const options *o, sensitivity *out) {
    int B = o->batch, T = o->seq, N = B * T, E = m->cfg.moe.n_experts, d = m->cfg.d, D = m->cfg.moe.d_ff;
    int ids[MAX_LAYERS], nm = moe_layers_of(m, ids), k, t, bi, n_batches = 0, cap = o->sens_batches * N;
    int *x = (int *)malloc(sizeof(int) * (size_t)N), *y = (int *)malloc(sizeof(int) * (size_t)N);
    int *alt2 = (int *)malloc(sizeof(int) * (size_t)N * nm), *altr = (int *)malloc(sizeof(int) * (size_t)N * nm);
    float *ent = (float *)malloc(sizeof(float) * (size_t)cap * nm), *tmp = (float *)malloc(sizeof(float) * (size_t)cap);
    float *clean = (float *)malloc(sizeof(float) * (size_t)N), thr[MAX_LAYERS];
    double sum2[MAX_LAYERS], sumr[MAX_LAYERS], cnt[MAX_LAYERS];
    swap_buf sb;
    size_t start = 0;
    moe_rng rng;
    int n_tok = 0;
    sb.xg = (float *)malloc(sizeof(float) * (size_t)N * d);
    sb.out = (float *)malloc(sizeof(float) * (size_t)N * d);
    sb.hg = (float *)malloc(sizeof(float) * (size_t)N * D);
    sb.hu = (float *)malloc(sizeof(float) * (size_t)N * D);
    sb.tok = (int *)malloc(sizeof(int) * (size_t)N);
    memset(sum2, 0, sizeof sum2); memset(sumr, 0, sizeof sumr); memset(cnt, 0, sizeof cnt);
    moe_model_set_broadcast(m, 0);
    /* pass 1: every layer's routing entropies, for its top-decile threshold */
    for (bi = 0; bi < o->sens_batches; bi++) {
        int rows = moe_loader_sequential(ft->val, ft->val_len, &start, x, y, B, T);
        if (rows < B) break; /* full batches only */
        moe_model_forward(m, x, y, B, T, NULL);
        for (k = 0; k < nm; k++)
            for (t = 0; t < N; t++) ent[(size_t)k * cap + n_tok + t] = (float)norm_entropy(m->blocks[ids[k]].moe.probs + (size_t)t * E, E);
        n_tok += N;
        n_batches++;
    }
    for (k = 0; k < nm; k++) {
        memcpy(tmp, ent + (size_t)k * cap, sizeof(float) * (size_t)n_tok);
        thr[k] = quantile(tmp, n_tok, 0.9);
    }
    /* pass 2: per batch, the clean losses, then one swapped forward per layer and kind */
    start = 0;
    moe_rng_seed(&rng, 4242);
    for (bi = 0; bi < n_batches; bi++) {
        moe_loader_sequential(ft->val, ft->val_len, &start, x, y, B, T);
        moe_model_forward(m, x, y, B, T, NULL);
        memcpy(clean, m->losses, sizeof(float) * (size_t)N);
        for (k = 0; k < nm; k++) {
            const moe_layer *L = &m->blocks[ids[k]].moe;
            for (t = 0; t < N; t++) {
                const float *p = L->probs + (size_t)t * E;
                int top = L->topk[(size_t)t * L->cfg.top_k], second = -1, e;
                alt2[(size_t)k * N + t] = altr[(size_t)k * N + t] = -1;
                if (ent[(size_t)k * cap + (size_t)bi * N + t] < thr[k]) continue;
                for (e = 0; e < E; e++) /* the 2nd-best: the largest below the top, lower index on ties */
                    if (e != top && (second < 0 || p[e] > p[second])) second = e;
                alt2[(size_t)k * N + t] = second;
                e = moe_rng_below(&rng, E - 1);
                altr[(size_t)k * N + t] = e >= top ? e + 1 : e;
            }
        }
        for (k = 0; k < nm; k++) {
            forward_swapped(m, x, y, B, T, ids[k], alt2 + (size_t)k * N, &sb);
            for (t = 0; t < N; t++)
                if (alt2[(size_t)k * N + t] >= 0) { sum2[k] += m->losses[t] - clean[t]; cnt[k] += 1.0; }
            forward_swapped(m, x, y, B, T, ids[k], altr + (size_t)k * N, &sb);
            for (t = 0; t < N; t++)
                if (altr[(size_t)k * N + t] >= 0) sumr[k] += m->losses[t] - clean[t];
        }
    }
    out->n_moe = nm;
    out->second_mean = out->random_mean = 0.0;
    for (k = 0; k < nm; k++) {
        out->second[k] = cnt[k] > 0 ? sum2[k] / cnt[k] / log(2.0) : NAN;
        out->random[k] = cnt[k] > 0 ? sumr[k] / cnt[k] / log(2.0) : NAN;
        out->second_mean += out->second[k] / nm;
        out->random_mean += out->random[k] / nm;
    }
    free(x); free(y); free(alt2); free(altr); free(ent); free(tmp); free(clean);
    free(sb.xg); free(sb.out); free(sb.hg); free(sb.hu); free(sb.tok);
}

/* ---- runs ---------------------------------------------------------------------------------------- */

typedef struct row_result {
    double ft_bpb, pre_bpb, forgetting, share, seconds;
    double share_layer[MAX_LAYERS];
    sensitivity sens;
    float *curve; /* (n_curve) fine-tuning genre bpb during fine-tuning */
} row_result;

static moe_model_config model_config(const options *o) {
    moe_model_config c = moe_model_config_default();
    c.max_seq = o->seq;
    c.d = o->d;
    c.n_layers = o->layers;
    c.n_heads = o->heads;
    c.moe.n_experts = o->experts;
    c.moe.top_k = 1;
    c.moe.d_ff = o->expert_ff;
    c.moe.router = MOE_ROUTER_TOPK;
    c.moe.renormalize = 0;                 /* Switch: the weight is the softmax probability */
    c.moe.balance = MOE_BALANCE_SWITCH;
    c.moe.balance_coef = o->balance_coef;
    c.moe_every = 1;
    return c;
}

static int n_curve(const options *o) { return o->ft_steps / o->ft_eval_every + 1; }

/* pre-training genres' validation bpb, token-weighted over the genres */
static double eval_pre(moe_model *m, const text *pre, int n_pre, const options *o) {
    double nats = 0.0, tokens = 0.0, tk;
    int g;
    for (g = 0; g < n_pre; g++) {
        double b = eval_bpb(m, pre[g].val, pre[g].val_len, o, o->eval_batches, &tk);
        nats += b * tk;
        tokens += tk;
    }
    return nats / tokens;
}

static int train_steps(moe_model *m, moe_loader *ld, const options *o, int steps, int warmup, float lr_max, float lr_min,
                       const char *label, int seed, const text *ft, float *curve, double *share_layer) {
    moe_adamw_config adam = moe_adamw_config_default();
    int *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    int step, ids[MAX_LAYERS], nm = moe_layers_of(m, ids), k, ev = 0;
    double t0 = moe_time_seconds(), recent = 0.0, bc[MAX_LAYERS], tok = 0.0;
    int recent_n = 0;
    memset(bc, 0, sizeof bc);
    adam.beta2 = o->beta2;
    adam.weight_decay = o->wd;
    if (curve) {
        moe_model_set_broadcast(m, 0);
        curve[ev++] = (float)eval_bpb(m, ft->val, ft->val_len, o, o->eval_batches, NULL);
    }
    for (step = 1; step <= steps; step++) {
        float lr = moe_lr_cosine(step - 1, warmup, steps, lr_max, lr_min), norm;
        if (curve) moe_model_set_broadcast(m, 1); /* fine-tuning: on (a no-op when gw_threshold = 0) */
        moe_store_zero_grad(&m->S);
        moe_loader_next(ld, x, y, NULL, o->batch, o->seq);
        if (moe_model_forward(m, x, y, o->batch, o->seq, NULL) != MOE_OK || moe_model_backward(m, 1.0f) != MOE_OK) {
            fprintf(stderr, "%s seed %d step %d: %s\n", label, seed, step, m->err.msg);
            return 0;
        }
        for (k = 0; k < nm; k++) bc[k] += m->blocks[ids[k]].moe.stats.broadcast;
        tok += (double)o->batch * o->seq;
        norm = moe_clip_grad_norm(&m->S, o->clip);
        moe_adamw_step(&m->S, &adam, lr, step);
        recent += m->loss;
        recent_n++;
        if (step % o->log_every == 0 || step == steps) {
            double el = moe_time_seconds() - t0, sh = 0.0;
            for (k = 0; k < nm; k++) sh += bc[k] / tok / nm;
            printf("train run=%s seed=%d step=%d loss=%.4f bpb=%.4f aux=%.4f lr=%.2e grad_norm=%.3f broadcast_share=%.3f tok_s=%.0f\n", label,
                   seed, step, recent / recent_n, recent / recent_n / log(2.0), m->aux_loss, (double)lr, (double)norm, sh,
                   (double)step * o->batch * o->seq / el);
            fflush(stdout);
            recent = 0.0;
            recent_n = 0;
        }
        if (curve && step % o->ft_eval_every == 0) {
            moe_model_set_broadcast(m, 0);
            curve[ev] = (float)eval_bpb(m, ft->val, ft->val_len, o, o->eval_batches, NULL);
            printf("eval run=%s seed=%d step=%d ft_val_bpb=%.4f\n", label, seed, step, (double)curve[ev]);
            ev++;
        }
    }
    moe_model_set_broadcast(m, 0);
    if (share_layer)
        for (k = 0; k < nm; k++) share_layer[k] = bc[k] / tok;
    free(x);
    free(y);
    return 1;
}

/* ---- arguments, settings ---------------------------------------------------------------------------- */

/* FLAGS_RUN = run, else the exit status */
static int parse_args(int argc, char **argv, options *o) {
    static char about[4096];
    const char *pre_genres = NULL, *ft_genre = NULL;
    flag fl[40];
    flags_program p;
    int i, n = 0, rc, len;
    memset(o, 0, sizeof *o);
    o->d = 64; o->layers = 4; o->heads = 4; o->experts = 8; o->expert_ff = 128; o->seq = 64; o->batch = 16; o->seeds = 3;
    o->pre_steps = 1000; o->ft_steps = 300; o->warmup = 50; o->ft_warmup = 20; o->ft_eval_every = 50;
    o->eval_batches = 8; o->sens_batches = 16; o->calib_batches = 8; o->log_every = 100; o->gw_slots = 4;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->ft_lr = 5e-4f; o->ft_min_lr = 5e-5f; o->wd = 0.1f; o->clip = 1.0f; o->beta2 = 0.99f;
    o->balance_coef = 0.01f; o->share = 0.10f;
    strcpy(o->pre_genres, "news,editorial,reviews,government,learned");
    strcpy(o->ft_genre, "fiction");
    o->data_dir = "data/brown"; o->out_dir = "out";
    fl[n++] = flag_default(flag_string("--pre-genres", &pre_genres, "a,b,c", "pre-training genres"), o->pre_genres);
    fl[n++] = flag_default(flag_string("--ft-genre", &ft_genre, "G", "the fine-tuning genre"), o->ft_genre);
    fl[n++] = flag_float("--share", &o->share, 1e-6, 0.999999, "the share of uncertain tokens tau is set for");
    fl[n++] = flag_int("--gw-slots", &o->gw_slots, 0, 1 << 20, "uncertain tokens per sequence in the gw-slots row");
    fl[n++] = flag_int("--seeds", &o->seeds, 1, MAX_SEEDS, "seeds");
    fl[n++] = flag_int("--pre-steps", &o->pre_steps, 1, 1e8, "pre-training steps");
    fl[n++] = flag_int("--ft-steps", &o->ft_steps, 1, 1e8, "fine-tuning steps");
    fl[n++] = flag_float("--lr", &o->lr, 0, 1e6, "pre-training peak learning rate");
    fl[n++] = flag_float("--min-lr", &o->min_lr, 0, 1e6, "pre-training final learning rate");
    fl[n++] = flag_float("--ft-lr", &o->ft_lr, 0, 1e6, "fine-tuning peak learning rate");
    fl[n++] = flag_float("--ft-min-lr", &o->ft_min_lr, 0, 1e6, "fine-tuning final learning rate");
    fl[n++] = flag_int("--warmup", &o->warmup, 0, 1e8, "pre-training warm-up steps");
    fl[n++] = flag_int("--ft-warmup", &o->ft_warmup, 0, 1e8, "fine-tuning warm-up steps");
    fl[n++] = flag_int("--batch", &o->batch, 1, 4096, "sequences per batch");
    fl[n++] = flag_int("--seq", &o->seq, 2, 4096, "bytes per sequence");
    fl[n++] = flag_int("--d", &o->d, 1, 4096, "model width");
    fl[n++] = flag_int("--layers", &o->layers, 1, MAX_LAYERS, "blocks (every one MoE)");
    fl[n++] = flag_int("--heads", &o->heads, 1, 256, "attention heads (divides --d)");
    fl[n++] = flag_int("--experts", &o->experts, 2, 64, "experts per MoE layer");
    fl[n++] = flag_int("--expert-ff", &o->expert_ff, 1, 1 << 20, "width of one expert");
    fl[n++] = flag_float("--wd", &o->wd, 0, 1000, "weight decay");
    fl[n++] = flag_float("--clip", &o->clip, 0, 1e9, "gradient-norm clip; 0 = off");
    fl[n++] = flag_float("--beta2", &o->beta2, 0, 0.9999999, "AdamW beta2");
    fl[n++] = flag_float("--balance-coef", &o->balance_coef, 0, 1000, "Switch balance loss coefficient");
    fl[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1e6, "validation batches per genre");
    fl[n++] = flag_int("--sens-batches", &o->sens_batches, 1, 1e6, "routing-sensitivity batches");
    fl[n++] = flag_int("--calib-batches", &o->calib_batches, 1, 1e6, "batches that set the threshold");
    fl[n++] = flag_int("--ft-eval-every", &o->ft_eval_every, 1, 1e8, "validation every n fine-tuning steps");
    fl[n++] = flag_int("--log-every", &o->log_every, 1, 1e8, "a progress line every n steps");
    fl[n++] = flag_string("--data", &o->data_dir, "DIR", "the Brown corpus (make data)");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "a smoke run (under a minute)");
    len = snprintf(about, sizeof about,
                   "Data: the Brown corpus as `make data` writes it, DIR/{train,val}/<genre>.txt. Per seed: pre-train a\n"
                   "byte-level MoE LM (Switch top-1) on some genres, then fine-tune copies of it on a held-out genre,\n"
                   "one per variant; evaluate all with sparse routing (fine-tuning genre, forgetting, routing\n"
                   "sensitivity). Prints a settings table, progress and a results table; writes DIR/gw_finetune.csv,\n"
                   "_layers.csv, _curve.csv, .md, _bpb.png, _sensitivity.png.\nvariants:");
    for (i = 0; i < N_VARIANTS && len > 0 && len < (int)sizeof about; i++)
        len += snprintf(about + len, sizeof about - (size_t)len, "\n  %-14s %s", variants[i].name, variants[i].what);
    p = flags_program_make("gw_finetune", "GW-MoE fine-tuning (broadcast uncertain tokens) vs plain fine-tuning on the Brown corpus",
                           about, fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (pre_genres) {
        if (strlen(pre_genres) >= sizeof o->pre_genres) { fprintf(stderr, "gw_finetune: --pre-genres is too long\n"); return 2; }
        strcpy(o->pre_genres, pre_genres);
    }
    if (ft_genre) {
        if (strlen(ft_genre) >= sizeof o->ft_genre) { fprintf(stderr, "gw_finetune: --ft-genre is too long\n"); return 2; }
        strcpy(o->ft_genre, ft_genre);
    }
    if (o->quick) {
        o->d = 32; o->layers = 2; o->heads = 2; o->expert_ff = 32; o->seq = 32; o->batch = 4; o->seeds = 2;
        o->pre_steps = 40; o->ft_steps = 20; o->warmup = 5; o->ft_warmup = 2; o->ft_eval_every = 10;
        o->eval_batches = 2; o->sens_batches = 4; o->calib_batches = 4; o->log_every = 20;
    }
    return FLAGS_RUN;
}

static void print_settings(const options *o, int n_pre) {
    char v[20][128];
    const char *k[20];
    int n = 0, i;
#define ROW(key, ...) do { k[n] = key; snprintf(v[n], sizeof v[n], __VA_ARGS__); n++; } while (0)
    ROW("model", "d %d, %d layers, %d heads, learned positions, bytes", o->d, o->layers, o->heads);
    ROW("MoE layers", "every layer: %d SwiGLU experts of width %d, Switch top-1", o->experts, o->expert_ff);
    ROW("router", "softmax, weight = p_top1 (no renorm), Switch balance %.3g", (double)o->balance_coef);
    ROW("pre-train", "%.100s (%d genres)", o->pre_genres, n_pre);
    ROW("", "%d steps x %d x %d bytes, lr %.2g -> %.2g, warm-up %d", o->pre_steps, o->batch, o->seq, (double)o->lr, (double)o->min_lr, o->warmup);
    ROW("fine-tune", "%s: %d steps x %d x %d bytes, lr %.2g -> %.2g, warm-up %d", o->ft_genre, o->ft_steps, o->batch, o->seq,
        (double)o->ft_lr, (double)o->ft_min_lr, o->ft_warmup);
    ROW("optimizer", "AdamW wd %.2g, beta2 %.3g, clip %.2g; fresh moments for fine-tuning", (double)o->wd, (double)o->beta2, (double)o->clip);
    ROW("GW threshold", "tau = %.0f%% quantile of normalised entropy (pre-trained)", 100.0 * (1.0 - o->share));
    ROW("GW slots", "%d per %d-byte sequence (gw-slots row)", o->gw_slots, o->seq);
    ROW("evaluation", "sparse routing; %d batches per genre; sensitivity %d", o->eval_batches, o->sens_batches);
    ROW("seeds", "%d (pre-training and fine-tuning data order per seed)", o->seeds);
    ROW("threads", "%d", moe_num_threads());
#undef ROW
    printf("+--------------+----------------------------------------------------------------------+\n");
    for (i = 0; i < n; i++) printf("| %-12s | %-68s |\n", k[i], v[i]);
    printf("+--------------+----------------------------------------------------------------------+\n");
    for (i = 0; i < N_VARIANTS; i++) printf("| %-13s| %-68s |\n", variants[i].name, variants[i].what);
    printf("+--------------+----------------------------------------------------------------------+\n");
    fflush(stdout);
}

static FILE *open_out(const options *o, const char *name) {
    char path[1024];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", o->out_dir, name);
    f = fopen(path, "w");
    if (!f) fprintf(stderr, "cannot write %s\n", path);
    return f;
}

static const char *pm(char *buf, size_t n, double m, double s, int dec) {
    if (m != m) snprintf(buf, n, "-");
    else snprintf(buf, n, "%.*f ± %.*f", dec, m, dec, s);
    return buf;
}

int main(int argc, char **argv) {
    options o;
    text pre[MAX_GENRES], ft;
    static row_result res[N_VARIANTS][MAX_SEEDS];
    double tau_seed[MAX_SEEDS];
    int n_pre = 0, s, vi, k, i, nc, ids[MAX_LAYERS], nm = 0, rc;
    double t_start = moe_time_seconds();
    char path[1024], buf[256], *tok;
    FILE *f, *md;
    if ((rc = parse_args(argc, argv, &o)) != FLAGS_RUN) return rc;
    snprintf(buf, sizeof buf, "%s", o.pre_genres);
    for (tok = strtok(buf, ","); tok && n_pre < MAX_GENRES; tok = strtok(NULL, ",")) {
        if (strcmp(tok, o.ft_genre) == 0) { fprintf(stderr, "the fine-tuning genre must not be a pre-training genre\n"); return 2; }
        if (!load_text(&pre[n_pre++], o.data_dir, tok)) return 1;
    }
    if (n_pre == 0 || !load_text(&ft, o.data_dir, o.ft_genre)) return 1;
    {
        files_err fe;
        if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "gw_finetune: %s\n", fe.msg); return 1; }
    }
    print_settings(&o, n_pre);
    nc = n_curve(&o);
    for (s = 0; s < o.seeds; s++) {
        int seed = s + 1;
        moe_model_config c = model_config(&o);
        moe_model m0;
        moe_loader ld;
        moe_err err;
        const unsigned char *srcs[MAX_GENRES];
        size_t lens[MAX_GENRES];
        float *ent, tau;
        int n_ent = 0, bi, t;
        double t0 = moe_time_seconds();
        /* 1. pre-train */
        if (moe_model_init(&m0, &c, o.batch, o.seq) != MOE_OK) { fprintf(stderr, "model: %s\n", m0.err.msg); return 2; }
        moe_model_init_weights(&m0, (uint64_t)seed);
        for (i = 0; i < n_pre; i++) { srcs[i] = pre[i].train; lens[i] = pre[i].train_len; }
        if (moe_loader_init(&ld, srcs, lens, n_pre, o.seq, (uint64_t)seed, &err) != MOE_OK) { fprintf(stderr, "data: %s\n", err.msg); return 1; }
        if (!train_steps(&m0, &ld, &o, o.pre_steps, o.warmup, o.lr, o.min_lr, "pretrain", seed, NULL, NULL, NULL)) return 1;
        nm = moe_layers_of(&m0, ids);
        printf("pretrained seed=%d seconds=%.1f\n", seed, moe_time_seconds() - t0);
        /* 2. the threshold: routing entropies of the pre-trained model on fine-tuning batches */
        srcs[0] = ft.train;
        lens[0] = ft.train_len;
        moe_loader_init(&ld, srcs, lens, 1, o.seq, (uint64_t)(1000 + seed), &err);
        ent = (float *)malloc(sizeof(float) * (size_t)o.calib_batches * o.batch * o.seq * nm);
        {
            int *x = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq), *y = (int *)malloc(sizeof(int) * (size_t)o.batch * o.seq);
            for (bi = 0; bi < o.calib_batches; bi++) {
                moe_loader_next(&ld, x, y, NULL, o.batch, o.seq);
                moe_model_forward(&m0, x, y, o.batch, o.seq, NULL);
                for (k = 0; k < nm; k++)
                    for (t = 0; t < o.batch * o.seq; t++) ent[n_ent++] = (float)norm_entropy(m0.blocks[ids[k]].moe.probs + (size_t)t * o.experts, o.experts);
            }
            free(x);
            free(y);
        }
        tau = quantile(ent, n_ent, 1.0 - o.share);
        tau_seed[s] = tau;
        printf("threshold seed=%d tau_normalised=%.4f tau_nats=%.4f entropy_median=%.4f entropy_min=%.4f entropy_max=%.4f (ln E = %.4f nats)\n", seed,
               (double)tau, tau * log((double)o.experts), (double)ent[n_ent / 2], (double)ent[0], (double)ent[n_ent - 1], log((double)o.experts));
        free(ent);
        /* 3. fine-tune a copy per row; every copy reads the same batches */
        for (vi = 0; vi < N_VARIANTS; vi++) {
            const ft_variant *v = &variants[vi];
            row_result *r = &res[vi][s];
            moe_model_config fc = c;
            moe_model m;
            double t1 = moe_time_seconds();
            memset(r, 0, sizeof *r);
            r->curve = (float *)malloc(sizeof(float) * (size_t)nc);
            for (i = 0; i < nc; i++) r->curve[i] = NAN;
            fc.moe.gw_normalized = 1;
            fc.moe.gw_threshold = v->bc == BC_ALL ? 1e-6f : v->bc == BC_UNCERTAIN ? tau : 0.0f;
            fc.moe.gw_slots = v->slots ? o.gw_slots : 0;
            fc.moe.gw_released = v->released;
            if (moe_model_init(&m, &fc, o.batch, o.seq) != MOE_OK) { fprintf(stderr, "model: %s\n", m.err.msg); return 2; }
            if (moe_store_fingerprint(&m.S) != moe_store_fingerprint(&m0.S)) { fprintf(stderr, "layouts differ\n"); return 2; }
            memcpy(m.S.params, m0.S.params, sizeof(float) * m.S.numel);
            if (v->finetune) {
                moe_loader_init(&ld, srcs, lens, 1, o.seq, (uint64_t)(2000 + seed), &err);
                if (!train_steps(&m, &ld, &o, o.ft_steps, o.ft_warmup, o.ft_lr, o.ft_min_lr, v->name, seed, &ft, r->curve, r->share_layer)) return 1;
                for (k = 0; k < nm; k++) r->share += r->share_layer[k] / nm;
            } else {
                r->curve[0] = (float)eval_bpb(&m, ft.val, ft.val_len, &o, o.eval_batches, NULL);
                for (i = 1; i < nc; i++) r->curve[i] = r->curve[0];
            }
            /* 4. sparse evaluation: the fine-tuning genre (all of its validation text is small:
               the same batches as the sensitivity), the pre-training genres, sensitivity */
            moe_model_set_broadcast(&m, 0);
            r->ft_bpb = eval_bpb(&m, ft.val, ft.val_len, &o, o.sens_batches, NULL);
            r->pre_bpb = eval_pre(&m, pre, n_pre, &o);
            routing_sensitivity(&m, &ft, &o, &r->sens);
            r->seconds = moe_time_seconds() - t1;
            r->forgetting = r->pre_bpb - res[0][s].pre_bpb; /* row 0 is the pre-trained model */
            printf("run variant=%s seed=%d ft_bpb=%.4f pre_bpb=%.4f forgetting=%.4f broadcast_share=%.4f sens_2nd=%.4f sens_random=%.4f seconds=%.1f\n",
                   v->name, seed, r->ft_bpb, r->pre_bpb, r->forgetting, r->share, r->sens.second_mean, r->sens.random_mean, r->seconds);
            fflush(stdout);
            moe_model_free(&m);
        }
        moe_model_free(&m0);
    }
    /* outputs */
    if (!(f = open_out(&o, "gw_finetune.csv"))) return 1;
    fprintf(f, "variant,seed,pre_steps,ft_steps,tau,ft_bpb,pre_bpb,forgetting,broadcast_share,sens_2nd,sens_random,seconds\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; s < o.seeds; s++) {
            const row_result *r = &res[vi][s];
            fprintf(f, "%s,%d,%d,%d,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.2f\n", variants[vi].name, s + 1, o.pre_steps, variants[vi].finetune ? o.ft_steps : 0,
                    tau_seed[s], r->ft_bpb, r->pre_bpb, r->forgetting, r->share, r->sens.second_mean, r->sens.random_mean, r->seconds);
        }
    fclose(f);
    if (!(f = open_out(&o, "gw_finetune_layers.csv"))) return 1;
    fprintf(f, "variant,seed,moe_layer,broadcast_share,sens_2nd,sens_random\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; s < o.seeds; s++)
            for (k = 0; k < nm; k++)
                fprintf(f, "%s,%d,%d,%.5f,%.5f,%.5f\n", variants[vi].name, s + 1, k, res[vi][s].share_layer[k], res[vi][s].sens.second[k], res[vi][s].sens.random[k]);
    fclose(f);
    if (!(f = open_out(&o, "gw_finetune_curve.csv"))) return 1;
    fprintf(f, "variant,seed,ft_step,ft_val_bpb\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; s < o.seeds; s++)
            for (i = 0; i < nc; i++) fprintf(f, "%s,%d,%d,%.5f\n", variants[vi].name, s + 1, i * o.ft_eval_every, res[vi][s].curve[i]);
    fclose(f);
    if (!(md = open_out(&o, "gw_finetune.md"))) return 1;
    {
        double tm, tsd;
        mean_std(tau_seed, o.seeds, &tm, &tsd);
        fprintf(md, "GW-MoE fine-tuning on the Brown corpus: %d seeds; pre-training %d steps x %d x %d bytes (%.0f tokens) on %s; fine-tuning "
                    "%d steps (%.0f tokens) on %s; d %d, %d layers, %d experts of width %d, Switch top-1. Threshold tau (normalised entropy) = "
                    "%.4f ± %.4f, the %.0f%% quantile on fine-tuning data under the pre-trained model. Evaluation with sparse routing; "
                    "bits per byte; forgetting = pre-training genres' bpb minus the pre-trained model's; sensitivity = loss increase (bits) of "
                    "the top-entropy-decile tokens when one layer gives them the 2nd-best / a random expert (mean over layers). "
                    "Mean ± std over seeds.\n\n",
                o.seeds, o.pre_steps, o.batch, o.seq, (double)o.pre_steps * o.batch * o.seq, o.pre_genres, o.ft_steps,
                (double)o.ft_steps * o.batch * o.seq, o.ft_genre, o.d, o.layers, o.experts, o.expert_ff, tm, tsd, 100.0 * (1.0 - o.share));
    }
    fprintf(md, "| variant | %s bpb | pre-training genres bpb | forgetting | broadcast share | sensitivity 2nd-best | sensitivity random | "
                "bpb - ft (paired) | sens. 2nd - ft (paired) | sens. random - ft (paired) | s/run |\n", o.ft_genre);
    fprintf(md, "|---|---|---|---|---|---|---|---|---|---|---|\n");
    printf("\nresults (%d seeds; pre-train %d steps, fine-tune %d steps of %d x %d bytes; sparse evaluation; mean +- std)\n", o.seeds, o.pre_steps,
           o.ft_steps, o.batch, o.seq);
    printf("%-14s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %s\n", "variant", "ft_bpb", "pre_bpb", "forgetting", "broadcast_share",
           "sens_2nd", "sens_random", "bpb-ft(paired)", "sens2-ft(paired)", "sensr-ft(paired)", "s/run");
    for (vi = 0; vi < N_VARIANTS; vi++) {
        double v[10][MAX_SEEDS], mean[10], sd[10];
        char b[10][48];
        for (s = 0; s < o.seeds; s++) {
            const row_result *r = &res[vi][s];
            v[0][s] = r->ft_bpb; v[1][s] = r->pre_bpb; v[2][s] = r->forgetting; v[3][s] = r->share;
            v[4][s] = r->sens.second_mean; v[5][s] = r->sens.random_mean; v[6][s] = r->seconds;
            /* paired with the plain fine-tuning of the same seed (row 1): same pre-trained
               model, same batches, so seed-to-seed spread of pre-training cancels */
            v[7][s] = r->ft_bpb - res[1][s].ft_bpb;
            v[8][s] = r->sens.second_mean - res[1][s].sens.second_mean;
            v[9][s] = r->sens.random_mean - res[1][s].sens.random_mean;
        }
        for (k = 0; k < 10; k++) mean_std(v[k], o.seeds, &mean[k], &sd[k]);
        for (k = 0; k < 10; k++) pm(b[k], sizeof b[k], mean[k], sd[k], k == 3 ? 3 : 4);
        printf("%-14s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %-17s %.1f\n", variants[vi].name, b[0], b[1], b[2], b[3], b[4], b[5], b[7],
               b[8], b[9], mean[6]);
        fprintf(md, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f |\n", variants[vi].name, b[0], b[1], b[2], b[3], b[4], b[5], b[7], b[8],
                b[9], mean[6]);
    }
    fclose(md);
    /* plots */
    {
        plot_series ser[N_VARIANTS];
        plot_chart ch;
        float *xs = (float *)malloc(sizeof(float) * (size_t)nc), ys[N_VARIANTS][64 + 1], lx[MAX_LAYERS], ly[N_VARIANTS][MAX_LAYERS];
        int np = 0, nci = nc < 65 ? nc : 65;
        memset(ser, 0, sizeof ser);
        memset(&ch, 0, sizeof ch);
        for (i = 0; i < nci; i++) xs[i] = (float)(i * o.ft_eval_every);
        for (vi = 0; vi < N_VARIANTS; vi++) {
            for (i = 0; i < nci; i++) {
                double mm = 0.0;
                for (s = 0; s < o.seeds; s++) mm += res[vi][s].curve[i] / o.seeds;
                ys[vi][i] = (float)mm;
            }
            ser[np].name = variants[vi].name; ser[np].x = xs; ser[np].y = ys[vi]; ser[np].n = nci; ser[np].style = PLOT_LINE_POINTS;
            np++;
        }
        ch.title = "fine-tuning genre: validation bits per byte (sparse routing, mean over seeds)";
        ch.xlabel = "fine-tuning step";
        ch.ylabel = "bits per byte";
        snprintf(path, sizeof path, "%s/gw_finetune_bpb.png", o.out_dir);
        if (plot_lines(path, &ch, ser, np) != 0) fprintf(stderr, "could not write %s\n", path);
        np = 0;
        memset(ser, 0, sizeof ser);
        for (k = 0; k < nm; k++) lx[k] = (float)k;
        for (vi = 0; vi < N_VARIANTS; vi++) {
            for (k = 0; k < nm; k++) {
                double mm = 0.0;
                for (s = 0; s < o.seeds; s++) mm += res[vi][s].sens.second[k] / o.seeds;
                ly[vi][k] = (float)mm;
            }
            ser[np].name = variants[vi].name; ser[np].x = lx; ser[np].y = ly[vi]; ser[np].n = nm; ser[np].style = PLOT_LINE_POINTS;
            np++;
        }
        ch.title = "routing sensitivity: loss increase of top-decile-entropy tokens, 2nd-best expert";
        ch.xlabel = "MoE layer";
        ch.ylabel = "bits";
        snprintf(path, sizeof path, "%s/gw_finetune_sensitivity.png", o.out_dir);
        if (plot_lines(path, &ch, ser, np) != 0) fprintf(stderr, "could not write %s\n", path);
        free(xs);
    }
    printf("\nwrote %s/gw_finetune.{csv,md}, gw_finetune_layers.csv, gw_finetune_curve.csv, gw_finetune_bpb.png, gw_finetune_sensitivity.png\n"
           "total_seconds=%.1f\n", o.out_dir, moe_time_seconds() - t_start);
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; s < o.seeds; s++) free(res[vi][s].curve);
    for (i = 0; i < n_pre; i++) { free(pre[i].train); free(pre[i].val); }
    free(ft.train);
    free(ft.val);
    return 0;
}
