/* router_compare.c - routers compared on the Brown corpus at equal tokens, equal data order and
 * equal active parameters (issue 4; methods §3.8 and §11.2): a dense FFN, Mixtral top-2, RMoE
 * (a GRU router state carried through depth, Qiu et al. ICLR 2025) and its ablations (no
 * previous state, detached state), and an MLP router.
 *
 *   make data                                   # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/router_compare               # the default: about 15 minutes on 2 cores
 *   build/examples/router_compare --quick       # a smoke run (under a minute), used by the tests
 *   build/examples/router_compare --variants moe-top2,rmoe --seeds 5 --steps 2000
 *
 * For each seed index every variant starts from the same init seed and reads the same batches
 * (the loader is seeded with the seed index), so variants differ only in their FFN/router.
 * Prints a settings table, key=value progress lines, a results table (mean +- std over seeds)
 * and a per-layer table; writes out/router_compare.csv (one row per variant and seed),
 * out/router_compare_layers.csv, out/router_compare_curve.csv, out/router_compare.md (the
 * tables as markdown), out/router_compare_val.png (validation bits per byte over steps) and
 * out/router_compare_gate_entropy.png (gate entropy per layer).
 *
 * Diagnostics on the validation tokens after training (RMoE paper, §3.6 of the methods):
 *   load entropy   H(share of top-k picks per expert), nats; ln E = perfectly balanced
 *   gate entropy   mean over tokens of H(router softmax), nats
 *   IB (inner balance)  median over tokens of p_top1 / p_top2 (router softmax, before renorm)
 *   OB (outer balance)  median over tokens of the sum of the top-k softmax scores
 *   MI             cross-layer mutual information of routing distributions, the paper's recipe:
 *                  per token, its two E-dim softmax vectors of layers i and j are cut into 100
 *                  equal-width bins on [0, 1]; the discrete MI (nats) of the two length-E label
 *                  sequences; averaged over tokens (and, in the summary, over layer pairs).
 */
#define _POSIX_C_SOURCE 200809L /* files.h: mkdir(2) */
#define MOE_IMPLEMENTATION
#include "moe.h"
#define PLOT_IMPLEMENTATION
#include "plot.h"
#include "files.h" /* defines: files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */
#include "brown.h" /* defines: brown_corpus, brown_load, brown_free */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the variants: ONE ROW EACH ---------------------------------------------------------------
   A row says what differs from the shared model (settings table): dense or MoE, k, the gate
   (renormalised or Switch's plain softmax weight), the balance loss, what the router reads.
   Anything the columns cannot say goes into `tweak`, a function that edits the model config.
   The AoE and HyperMoE rows are off by default (the default run keeps to 15 minutes); ask
   for them with --variants, e.g. --variants moe-top1,moe-top2,hyper-top1,aoe,aoe-aux,aoe-code.
   moe-top1 is HyperMoE's baseline, moe-top2 its compute reference. */
typedef struct variant {
    const char *name;          /* --variants and the tables use this                       */
    const char *what;          /* one line for the settings table                          */
    int moe;                   /* 0: dense SwiGLU of width top_k x expert width            */
    int top_k;
    int renormalize;           /* 1: Mixtral's renormalised top-k; 0: softmax weights       */
    moe_balance_loss balance;  /* coefficient: --balance-coef (0.01)                       */
    moe_router_input rin;      /* what the router reads (RMoE and its ablations, MLP)       */
    void (*tweak)(moe_model_config *c); /* anything else, or NULL                          */
    int on;                    /* run when --variants is not given                          */
} variant;

/* AoE: router-free, rank d/3 (the paper's best), expert width matched to the routed MoE's
   parameters (paper Eq. 5) */
static void aoe_tweak(moe_model_config *c) {
    c->moe.router = MOE_ROUTER_AOE;
    c->moe.aoe_rank = c->d / 3 > 0 ? c->d / 3 : 1;
    c->moe.d_ff = moe_aoe_matched_width(c->d, c->moe.d_ff, c->moe.aoe_rank);
}

/* HyperMoE with the library's tiny hyper sizes (a 16, b 32) */
static void hyper_tweak(moe_model_config *c) { c->moe.hyper = 1; }

static const variant variants[] = {
    /* name          what                                                  moe k renorm balance              router input        tweak on */
    {"dense",       "dense SwiGLU FFN, width k x expert width",           0,  2, 0, MOE_BALANCE_NONE,    MOE_RIN_DIRECT,     NULL, 1},
    {"moe-top2",    "Mixtral top-2 (renormalised), linear router",        1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_DIRECT,     NULL, 1},
    {"rmoe",        "RMoE: GRU state through depth, full gradients",      1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_GRU,        NULL, 1},
    {"rmoe-np",     "RMoE-NP: GRU step from h = 0 in every layer",        1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_GRU_NP,     NULL, 1},
    {"rmoe-detach", "RMoE with h_{l-1} detached (no gradient back)",      1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_GRU_DETACH, NULL, 1},
    {"mlp-router",  "SMoE-MLP: router on GELU(x P), no recurrence",       1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_MLP,        NULL, 1},
    {"moe-top1",    "Switch top-1 (softmax weight), switch balance",      1,  1, 0, MOE_BALANCE_SWITCH,  MOE_RIN_DIRECT,     NULL, 0},
    {"hyper-top1",  "HyperMoE top-1: + hyper-expert from unselected",     1,  1, 0, MOE_BALANCE_SWITCH,  MOE_RIN_DIRECT,     hyper_tweak, 0},
    {"aoe",         "AoE (paper weights), no aux loss",                   1,  2, 1, MOE_BALANCE_NONE,    MOE_RIN_DIRECT,     aoe_tweak, 0},
    {"aoe-aux",     "AoE (paper weights) + norm-based balance loss",      1,  2, 1, MOE_BALANCE_MIXTRAL, MOE_RIN_DIRECT,     aoe_tweak, 0},
    {"aoe-code",    "AoE (official code: softmax over all norms) + aux",  1,  2, 0, MOE_BALANCE_MIXTRAL, MOE_RIN_DIRECT,     aoe_tweak, 0},
};
#define N_VARIANTS ((int)(sizeof variants / sizeof variants[0]))

#define MAX_GENRES BROWN_GENRES
#define MAX_SEEDS 16
#define MAX_LAYERS 16

typedef struct options {
    int d, layers, heads, experts, expert_ff, router_dim, seq, batch, steps, warmup, eval_every, eval_batches;
    int log_every, seeds, quick;
    float lr, min_lr, wd, clip, beta2, balance_coef;
    const char *data_dir, *out_dir;
    char chosen[N_VARIANTS]; /* 1 = run this row */
} options;

/* ---- routing diagnostics (inner/outer balance and the cross-layer MI: moe.h's closer_look) -- */

static double entropy_of(const float *p, int n) {
    double h = 0.0;
    int i;
    for (i = 0; i < n; i++)
        if (p[i] > 0.0f) h -= (double)p[i] * log((double)p[i]);
    return h;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* median of v (n > 0); sorts v */
static float median_of(float *v, int n) {
    qsort(v, (size_t)n, sizeof(float), cmp_float);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- one training run ----------------------------------------------------------------------- */

typedef struct run_result {
    double val_bpb, train_bpb, seconds, tokens;
    size_t params_total, params_active;
    int n_moe;                       /* MoE layers (0 for dense)                      */
    double load_h[MAX_LAYERS], gate_h[MAX_LAYERS], ib[MAX_LAYERS], ob[MAX_LAYERS];
    double mi_next[MAX_LAYERS];      /* MI of MoE layer i with MoE layer i + 1         */
    double mi_all;                   /* mean MI over all pairs of MoE layers           */
    double mi_shuffled;              /* the same with layer j's vector taken from another
                                        token: the estimator's chance level              */
    float *curve;                    /* (n_evals) validation bpb at each evaluation    */
} run_result;

static moe_model_config model_config(const options *o, const variant *v) {
    moe_model_config c = moe_model_config_default();
    c.max_seq = o->seq;
    c.d = o->d;
    c.n_layers = o->layers;
    c.n_heads = o->heads;
    c.moe.n_experts = o->experts;
    c.moe.top_k = v->top_k;
    c.moe.d_ff = o->expert_ff;
    c.moe.renormalize = v->renormalize;
    c.moe.balance = v->balance;
    c.moe.balance_coef = o->balance_coef;
    c.d_ff = v->top_k * o->expert_ff; /* the dense FFN: as wide as the k active experts */
    c.moe_every = v->moe ? 1 : 0;
    c.router_input = v->rin;
    c.router_dim = v->rin == MOE_RIN_DIRECT ? 0 : o->router_dim;
    if (v->tweak) v->tweak(&c);
    return c;
}

/* validation bits per byte over eval_batches batches of every genre; with r != NULL also the
   routing diagnostics of every MoE layer */
static double evaluate(moe_model *m, const brown_corpus *cp, const options *o, run_result *r) {
    int B = o->batch, T = o->seq, N = B * T, E = m->cfg.moe.n_experts, K = m->cfg.moe.top_k;
    int *x = (int *)malloc(sizeof(int) * (size_t)N), *y = (int *)malloc(sizeof(int) * (size_t)N);
    int moe_l[MAX_LAYERS], nm = 0, l, i, j, g, t, e, cap = MAX_GENRES * o->eval_batches * N, n_tok = 0;
    double nats = 0.0, tokens = 0.0, gate_h[MAX_LAYERS], mi[MAX_LAYERS][MAX_LAYERS], mi_sh = 0.0;
    double picks[MAX_LAYERS][64];
    float *ibv = NULL, *obv = NULL;
    double *mi_tok = (double *)malloc(sizeof(double) * (size_t)N); /* one batch's per-token MI */
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) moe_l[nm++] = l;
    if (r) {
        memset(gate_h, 0, sizeof gate_h);
        memset(mi, 0, sizeof mi);
        memset(picks, 0, sizeof picks);
        if (nm > 0) {
            ibv = (float *)malloc(sizeof(float) * (size_t)cap * nm);
            obv = (float *)malloc(sizeof(float) * (size_t)cap * nm);
        }
    }
    for (g = 0; g < cp->n; g++) {
        size_t start = 0;
        int bi;
        for (bi = 0; bi < o->eval_batches; bi++) {
            int rows = moe_loader_sequential(cp->val[g], cp->val_len[g], &start, x, y, B, T), n;
            if (rows == 0) break;
            moe_model_forward(m, x, y, rows, T, NULL);
            n = rows * T;
            nats += m->loss * n;
            tokens += n;
            if (!r || nm == 0) continue;
            for (i = 0; i < nm; i++) {
                const moe_layer *L = &m->blocks[moe_l[i]].moe;
                for (t = 0; t < n; t++) {
                    const float *p = L->probs + (size_t)t * E;
                    gate_h[i] += entropy_of(p, E);
                    for (j = 0; j < K; j++) picks[i][L->topk[(size_t)t * K + j]] += 1.0;
                }
                moe_routing_balance(ibv + (size_t)i * cap + n_tok, obv + (size_t)i * cap + n_tok, L->probs, n, E, K, NULL);
                for (j = i + 1; j < nm; j++) {
                    const moe_layer *L2 = &m->blocks[moe_l[j]].moe;
                    int h = n / 2;
                    moe_routing_mi(mi_tok, L->probs, L2->probs, n, E, 100, NULL);
                    for (t = 0; t < n; t++) mi[i][j] += mi_tok[t];
                    /* control: token t of layer i against token t + n/2 (mod n) of layer j */
                    moe_routing_mi(mi_tok, L->probs, L2->probs + (size_t)h * E, n - h, E, 100, NULL);
                    moe_routing_mi(mi_tok + (n - h), L->probs + (size_t)(n - h) * E, L2->probs, h, E, 100, NULL);
                    for (t = 0; t < n; t++) mi_sh += mi_tok[t];
                }
            }
            n_tok += n;
        }
    }
    if (r) {
        double pairs = 0.0;
        r->n_moe = nm;
        r->mi_all = 0.0;
        for (i = 0; i < nm; i++) {
            float share[64];
            double tot = 0.0;
            for (e = 0; e < E; e++) tot += picks[i][e];
            for (e = 0; e < E; e++) share[e] = (float)(picks[i][e] / (tot > 0 ? tot : 1));
            r->load_h[i] = entropy_of(share, E);
            r->gate_h[i] = gate_h[i] / n_tok;
            r->ib[i] = median_of(ibv + (size_t)i * cap, n_tok);
            r->ob[i] = median_of(obv + (size_t)i * cap, n_tok);
            r->mi_next[i] = i + 1 < nm ? mi[i][i + 1] / n_tok : NAN;
            for (j = i + 1; j < nm; j++) { r->mi_all += mi[i][j] / n_tok; pairs += 1.0; }
        }
        r->mi_all = pairs > 0 ? r->mi_all / pairs : NAN;
        r->mi_shuffled = pairs > 0 ? mi_sh / n_tok / pairs : NAN;
    }
    free(ibv); free(obv); free(x); free(y); free(mi_tok);
    return nats / tokens / log(2.0);
}

static int n_evals(const options *o) { return o->steps / o->eval_every + (o->steps % o->eval_every != 0); }

static int train_one(const options *o, const brown_corpus *cp, const variant *v, int seed, run_result *r) {
    moe_model_config c = model_config(o, v);
    moe_model m;
    moe_loader ld;
    moe_adamw_config adam = moe_adamw_config_default();
    moe_err err;
    moe_rng noise;
    const unsigned char *srcs[MAX_GENRES];
    int *x = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq), *y = (int *)malloc(sizeof(int) * (size_t)o->batch * o->seq);
    int step, g, ev = 0;
    double t0 = moe_time_seconds(), recent = 0.0;
    int recent_n = 0;
    memset(r, 0, sizeof *r);
    r->curve = (float *)malloc(sizeof(float) * (size_t)n_evals(o));
    if (moe_model_init(&m, &c, o->batch, o->seq) != MOE_OK) { fprintf(stderr, "%s: model: %s\n", v->name, m.err.msg); return 0; }
    moe_model_init_weights(&m, (uint64_t)seed);
    moe_rng_seed(&noise, (uint64_t)seed + 7);
    for (g = 0; g < cp->n; g++) srcs[g] = cp->train[g];
    /* the same batches for every variant of this seed */
    if (moe_loader_init(&ld, srcs, cp->train_len, cp->n, o->seq, (uint64_t)seed, &err) != MOE_OK) { fprintf(stderr, "data: %s\n", err.msg); return 0; }
    adam.beta2 = o->beta2;
    adam.weight_decay = o->wd;
    r->params_total = moe_model_params_total(&m);
    r->params_active = moe_model_params_active(&m);
    for (step = 1; step <= o->steps; step++) {
        float lr = moe_lr_cosine(step - 1, o->warmup, o->steps, o->lr, o->min_lr), norm;
        moe_store_zero_grad(&m.S);
        moe_loader_next(&ld, x, y, NULL, o->batch, o->seq);
        if (moe_model_forward(&m, x, y, o->batch, o->seq, &noise) != MOE_OK || moe_model_backward(&m, 1.0f) != MOE_OK) {
            fprintf(stderr, "%s seed %d step %d: %s\n", v->name, seed, step, m.err.msg);
            return 0;
        }
        norm = moe_clip_grad_norm(&m.S, o->clip);
        moe_adamw_step(&m.S, &adam, lr, step);
        recent += m.loss;
        recent_n++;
        if (step % o->log_every == 0 || step == o->steps) {
            double el = moe_time_seconds() - t0;
            printf("train variant=%s seed=%d step=%d loss=%.4f bpb=%.4f aux=%.4f lr=%.2e grad_norm=%.3f tok_s=%.0f\n", v->name, seed, step,
                   recent / recent_n, recent / recent_n / log(2.0), m.aux_loss, (double)lr, (double)norm, (double)step * o->batch * o->seq / el);
            fflush(stdout);
            r->train_bpb = recent / recent_n / log(2.0);
            recent = 0.0;
            recent_n = 0;
        }
        if (step % o->eval_every == 0 || step == o->steps) {
            int last = step == o->steps;
            double bpb = evaluate(&m, cp, o, last ? r : NULL);
            r->curve[ev++] = (float)bpb;
            printf("eval variant=%s seed=%d step=%d val_bpb=%.4f\n", v->name, seed, step, bpb);
            fflush(stdout);
            if (last) r->val_bpb = bpb;
        }
    }
    r->seconds = moe_time_seconds() - t0;
    r->tokens = (double)o->steps * o->batch * o->seq;
    printf("run variant=%s seed=%d val_bpb=%.4f train_bpb=%.4f load_entropy=%.3f gate_entropy=%.3f ib=%.3f ob=%.3f mi=%.4f seconds=%.1f\n",
           v->name, seed, r->val_bpb, r->train_bpb, r->n_moe ? r->load_h[0] : NAN, r->n_moe ? r->gate_h[0] : NAN,
           r->n_moe ? r->ib[0] : NAN, r->n_moe ? r->ob[0] : NAN, r->mi_all, r->seconds);
    fflush(stdout);
    moe_model_free(&m);
    free(x);
    free(y);
    return 1;
}

/* ---- statistics over seeds and output ---------------------------------------------------------- */

static void mean_std(const double *v, int n, double *mean, double *sd) {
    double s = 0.0, q = 0.0;
    int i;
    for (i = 0; i < n; i++) s += v[i];
    *mean = s / n;
    for (i = 0; i < n; i++) q += (v[i] - *mean) * (v[i] - *mean);
    *sd = n > 1 ? sqrt(q / (n - 1)) : 0.0;
}

/* mean over layers of one per-layer field of a run */
static double layer_mean(const run_result *r, const double *field) {
    double s = 0.0;
    int i;
    if (r->n_moe == 0) return NAN;
    for (i = 0; i < r->n_moe; i++) s += field[i];
    return s / r->n_moe;
}

/* FLAGS_RUN = run, else the exit status */
static int parse_args(int argc, char **argv, options *o) {
    static char about[4096];
    const char *variant_list = NULL;
    flag fl[32];
    flags_program p;
    int i, n = 0, rc, any = 0, len;
    memset(o, 0, sizeof *o);
    o->d = 64; o->layers = 6; o->heads = 4; o->experts = 8; o->expert_ff = 64; o->router_dim = 32;
    o->seq = 64; o->batch = 16; o->steps = 800; o->warmup = 50; o->eval_every = 100; o->eval_batches = 2;
    o->log_every = 50; o->seeds = 3;
    o->lr = 2e-3f; o->min_lr = 2e-4f; o->wd = 0.1f; o->clip = 1.0f; o->beta2 = 0.99f; o->balance_coef = 0.01f;
    o->data_dir = "data/brown"; o->out_dir = "out";
    for (i = 0; i < N_VARIANTS; i++) o->chosen[i] = (char)variants[i].on;
    fl[n++] = flag_default(flag_string("--variants", &variant_list, "a,b,c", "rows of the variant table (above)"), "those marked on");
    fl[n++] = flag_int("--seeds", &o->seeds, 1, MAX_SEEDS, "seeds per variant");
    fl[n++] = flag_int("--steps", &o->steps, 1, 1e8, "training steps per run");
    fl[n++] = flag_int("--batch", &o->batch, 1, 4096, "sequences per batch");
    fl[n++] = flag_int("--seq", &o->seq, 2, 4096, "bytes per sequence");
    fl[n++] = flag_int("--d", &o->d, 1, 4096, "model width");
    fl[n++] = flag_int("--layers", &o->layers, 1, MAX_LAYERS, "blocks (every one MoE)");
    fl[n++] = flag_int("--heads", &o->heads, 1, 256, "attention heads (divides --d)");
    fl[n++] = flag_int("--experts", &o->experts, 2, 64, "experts per MoE layer");
    fl[n++] = flag_int("--expert-ff", &o->expert_ff, 1, 1 << 20, "width of one expert (k x this = the dense FFN width)");
    fl[n++] = flag_int("--router-dim", &o->router_dim, 1, 4096, "RMoE's p: GRU / MLP router width");
    fl[n++] = flag_float("--lr", &o->lr, 0, 1e6, "peak learning rate");
    fl[n++] = flag_float("--min-lr", &o->min_lr, 0, 1e6, "final learning rate (cosine)");
    fl[n++] = flag_int("--warmup", &o->warmup, 0, 1e8, "warm-up steps");
    fl[n++] = flag_float("--wd", &o->wd, 0, 1000, "weight decay");
    fl[n++] = flag_float("--clip", &o->clip, 0, 1e9, "gradient-norm clip; 0 = off");
    fl[n++] = flag_float("--beta2", &o->beta2, 0, 0.9999999, "AdamW beta2");
    fl[n++] = flag_float("--balance-coef", &o->balance_coef, 0, 1000, "balance loss coefficient");
    fl[n++] = flag_int("--eval-every", &o->eval_every, 1, 1e8, "validation every n steps");
    fl[n++] = flag_int("--eval-batches", &o->eval_batches, 1, 1e6, "validation batches per genre");
    fl[n++] = flag_int("--log-every", &o->log_every, 1, 1e8, "a progress line every n steps");
    fl[n++] = flag_string("--data", &o->data_dir, "DIR", "the Brown corpus (make data)");
    fl[n++] = flag_string("--out", &o->out_dir, "DIR", "output folder (created)");
    fl[n++] = flag_switch("--quick", &o->quick, "a smoke run: every row, two seeds, a few steps of a very small model");
    len = snprintf(about, sizeof about,
                   "Data: the Brown corpus as `make data` writes it, DIR/{train,val}/<genre>.txt. For each seed every\n"
                   "variant starts from the same init and reads the same batches. Prints a settings table, progress,\n"
                   "a results table (mean +- std over seeds) and a per-layer table; writes DIR/router_compare.csv,\n"
                   "_layers.csv, _curve.csv, .md, _val.png, _gate_entropy.png.\nvariants:");
    for (i = 0; i < N_VARIANTS && len > 0 && len < (int)sizeof about; i++)
        len += snprintf(about + len, sizeof about - (size_t)len, "\n  %-12s %s%s", variants[i].name, variants[i].what, variants[i].on ? "" : " (off by default)");
    p = flags_program_make("router_compare", "routers compared on the Brown corpus at equal tokens, data order and active parameters",
                           about, fl, n);
    rc = flags_parse(&p, argc, argv);
    if (rc != FLAGS_RUN) return rc;
    if (variant_list) {
        char buf[512], *tok;
        int k;
        memset(o->chosen, 0, sizeof o->chosen);
        if (strlen(variant_list) >= sizeof buf) { fprintf(stderr, "router_compare: --variants is too long\n"); return 2; }
        snprintf(buf, sizeof buf, "%s", variant_list);
        for (tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
            for (k = 0; k < N_VARIANTS; k++)
                if (strcmp(tok, variants[k].name) == 0) break;
            if (k == N_VARIANTS) { fprintf(stderr, "router_compare: unknown variant '%s' (--help lists them)\n", tok); return 2; }
            o->chosen[k] = 1;
        }
    }
    if (o->quick) { /* a smoke run: every row, two seeds, a few steps of a very small model */
        o->d = 32; o->layers = 3; o->heads = 2; o->expert_ff = 32; o->router_dim = 16;
        o->seq = 32; o->batch = 4; o->steps = 30; o->warmup = 5; o->eval_every = 15; o->eval_batches = 1;
        o->log_every = 15; o->seeds = 2;
    }
    for (i = 0; i < N_VARIANTS; i++) any |= o->chosen[i];
    if (!any) {
        fprintf(stderr, "router_compare: --variants chose no variant\n");
        return 2;
    }
    return FLAGS_RUN;
}

static void print_settings(const options *o) {
    char v[16][120];
    const char *k[16];
    int n = 0, i;
#define ROW(key, ...) do { k[n] = key; snprintf(v[n], sizeof v[n], __VA_ARGS__); n++; } while (0)
    ROW("model", "d %d, %d layers, %d heads, learned positions, bytes", o->d, o->layers, o->heads);
    ROW("MoE layers", "every layer: %d SwiGLU experts of width %d", o->experts, o->expert_ff);
    ROW("dense FFN", "SwiGLU of width k x %d (the k active experts' width)", o->expert_ff);
    ROW("router dim", "p = %d (RMoE GRU state, MLP router hidden layer)", o->router_dim);
    ROW("balance", "coefficient %.3g (Mixtral form for top-2, Switch form for top-1)", (double)o->balance_coef);
    ROW("tokens", "%d steps x %d x %d bytes = %.0f per run", o->steps, o->batch, o->seq, (double)o->steps * o->batch * o->seq);
    ROW("optimizer", "AdamW lr %.2g -> %.2g cosine, warm-up %d, wd %.2g, b2 %.3g, clip %.2g", (double)o->lr, (double)o->min_lr,
        o->warmup, (double)o->wd, (double)o->beta2, (double)o->clip);
    ROW("data", "all 15 Brown genres; validation %d x %d x %d bytes per genre", o->eval_batches, o->batch, o->seq);
    ROW("seeds", "%d: init and loader seed = seed index, same for every variant", o->seeds);
    ROW("threads", "%d", moe_num_threads());
#undef ROW
    printf("+--------------+----------------------------------------------------------------------+\n");
    for (i = 0; i < n; i++) printf("| %-12s | %-68s |\n", k[i], v[i]);
    printf("+--------------+----------------------------------------------------------------------+\n");
    for (i = 0; i < N_VARIANTS; i++)
        if (o->chosen[i]) printf("| %-12s | %-68s |\n", variants[i].name, variants[i].what);
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

/* "m +- s" with a fixed number of decimals, or "-" when m is not finite */
static const char *pm(char *buf, size_t n, double m, double s, int dec) {
    if (m != m) snprintf(buf, n, "-");
    else snprintf(buf, n, "%.*f ± %.*f", dec, m, dec, s);
    return buf;
}

int main(int argc, char **argv) {
    options o;
    brown_corpus cp;
    static run_result res[N_VARIANTS][MAX_SEEDS];
    int vi, s, i, l, ne, n_plot = 0, rc;
    double t_start = moe_time_seconds();
    char path[1024];
    FILE *f, *md;
    if ((rc = parse_args(argc, argv, &o)) != FLAGS_RUN) return rc;
    if (!brown_load(&cp, o.data_dir, NULL)) return 1;
    {
        files_err fe;
        if (files_mkdirs(o.out_dir, &fe) != 0) { fprintf(stderr, "router_compare: %s\n", fe.msg); return 1; }
    }
    print_settings(&o);
    /* seeds outermost: a partial run still compares every variant */
    for (s = 0; s < o.seeds; s++)
        for (vi = 0; vi < N_VARIANTS; vi++)
            if (o.chosen[vi] && !train_one(&o, &cp, &variants[vi], s + 1, &res[vi][s])) return 1;
    ne = n_evals(&o);
    /* CSVs */
    if (!(f = open_out(&o, "router_compare.csv"))) return 1;
    fprintf(f, "variant,seed,steps,tokens,params_total,params_active,val_bpb,train_bpb,load_entropy,gate_entropy,ib,ob,mi,mi_shuffled,seconds\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; o.chosen[vi] && s < o.seeds; s++) {
            const run_result *r = &res[vi][s];
            fprintf(f, "%s,%d,%d,%.0f,%zu,%zu,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.2f\n", variants[vi].name, s + 1, o.steps, r->tokens,
                    r->params_total, r->params_active, r->val_bpb, r->train_bpb, layer_mean(r, r->load_h), layer_mean(r, r->gate_h),
                    layer_mean(r, r->ib), layer_mean(r, r->ob), r->mi_all, r->mi_shuffled, r->seconds);
        }
    fclose(f);
    if (!(f = open_out(&o, "router_compare_layers.csv"))) return 1;
    fprintf(f, "variant,seed,moe_layer,load_entropy,gate_entropy,ib,ob,mi_next\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; o.chosen[vi] && s < o.seeds; s++)
            for (l = 0; l < res[vi][s].n_moe; l++) {
                const run_result *r = &res[vi][s];
                fprintf(f, "%s,%d,%d,%.5f,%.5f,%.5f,%.5f,%.5f\n", variants[vi].name, s + 1, l, r->load_h[l], r->gate_h[l], r->ib[l], r->ob[l], r->mi_next[l]);
            }
    fclose(f);
    if (!(f = open_out(&o, "router_compare_curve.csv"))) return 1;
    fprintf(f, "variant,seed,step,val_bpb\n");
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; o.chosen[vi] && s < o.seeds; s++)
            for (i = 0; i < ne; i++)
                fprintf(f, "%s,%d,%d,%.5f\n", variants[vi].name, s + 1, i + 1 < ne ? (i + 1) * o.eval_every : o.steps, res[vi][s].curve[i]);
    fclose(f);
    /* the results tables, on stdout and as markdown */
    if (!(md = open_out(&o, "router_compare.md"))) return 1;
    fprintf(md, "Router comparison on the Brown corpus: %d seeds, %d steps x %d x %d bytes = %.0f training tokens per run; "
                "d %d, %d layers, %d experts of width %d, RMoE p %d. Mean ± std over seeds; diagnostics are means over MoE layers "
                "of per-layer values on the validation tokens; MI, shuffled tokens pairs a token's layer-i vector with another token's layer-j vector (the estimator's chance level).\n\n",
            o.seeds, o.steps, o.batch, o.seq, (double)o.steps * o.batch * o.seq, o.d, o.layers, o.experts, o.expert_ff, o.router_dim);
    fprintf(md, "| variant | params total / active | val bits/byte | load entropy | gate entropy | IB (median p1/p2) | OB (median sum top-k) | cross-layer MI | MI, shuffled tokens | s/run |\n");
    fprintf(md, "|---|---|---|---|---|---|---|---|---|---|\n");
    printf("\nresults (%d seeds, %d steps, %.0f tokens per run; mean +- std over seeds; diagnostics: mean over MoE layers)\n", o.seeds, o.steps,
           (double)o.steps * o.batch * o.seq);
    printf("%-12s %-15s %-17s %-15s %-15s %-17s %-15s %-17s %-17s %s\n", "variant", "params tot/act", "val_bpb", "load_entropy", "gate_entropy", "IB",
           "OB", "MI", "MI_shuffled", "s/run");
    for (vi = 0; vi < N_VARIANTS; vi++) {
        double v[8][MAX_SEEDS], mean[8], sd[8];
        char b[8][48], pa[48];
        int k;
        if (!o.chosen[vi]) continue;
        for (s = 0; s < o.seeds; s++) {
            const run_result *r = &res[vi][s];
            v[0][s] = r->val_bpb; v[1][s] = layer_mean(r, r->load_h); v[2][s] = layer_mean(r, r->gate_h);
            v[3][s] = layer_mean(r, r->ib); v[4][s] = layer_mean(r, r->ob); v[5][s] = r->mi_all; v[6][s] = r->mi_shuffled; v[7][s] = r->seconds;
        }
        for (k = 0; k < 8; k++) mean_std(v[k], o.seeds, &mean[k], &sd[k]);
        snprintf(pa, sizeof pa, "%zu / %zu", res[vi][0].params_total, res[vi][0].params_active);
        pm(b[0], sizeof b[0], mean[0], sd[0], 4); pm(b[1], sizeof b[1], mean[1], sd[1], 3); pm(b[2], sizeof b[2], mean[2], sd[2], 3);
        pm(b[3], sizeof b[3], mean[3], sd[3], 2); pm(b[4], sizeof b[4], mean[4], sd[4], 3); pm(b[5], sizeof b[5], mean[5], sd[5], 4);
        pm(b[6], sizeof b[6], mean[6], sd[6], 4);
        printf("%-12s %-15s %-17s %-15s %-15s %-17s %-15s %-17s %-17s %.1f\n", variants[vi].name, pa, b[0], b[1], b[2], b[3], b[4], b[5], b[6], mean[7]);
        fprintf(md, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %.1f |\n", variants[vi].name, pa, b[0], b[1], b[2], b[3], b[4], b[5], b[6], mean[7]);
    }
    /* per layer (means over seeds) */
    fprintf(md, "\nPer MoE layer (mean over seeds): load entropy / gate entropy / IB / OB / MI with the next MoE layer.\n\n");
    fprintf(md, "| variant | layer | load entropy | gate entropy | IB | OB | MI(l, l+1) |\n|---|---|---|---|---|---|---|\n");
    printf("\nper MoE layer (mean over seeds)\n%-12s %-5s %-12s %-12s %-9s %-7s %s\n", "variant", "layer", "load_entropy", "gate_entropy", "IB", "OB", "MI(l,l+1)");
    for (vi = 0; vi < N_VARIANTS; vi++) {
        if (!o.chosen[vi]) continue;
        for (l = 0; l < res[vi][0].n_moe; l++) {
            double a[5] = {0, 0, 0, 0, 0};
            for (s = 0; s < o.seeds; s++) {
                const run_result *r = &res[vi][s];
                a[0] += r->load_h[l] / o.seeds; a[1] += r->gate_h[l] / o.seeds; a[2] += r->ib[l] / o.seeds;
                a[3] += r->ob[l] / o.seeds; a[4] += r->mi_next[l] / o.seeds;
            }
            printf("%-12s %-5d %-12.3f %-12.3f %-9.2f %-7.3f %.4f\n", variants[vi].name, l, a[0], a[1], a[2], a[3], a[4]);
            fprintf(md, "| %s | %d | %.3f | %.3f | %.2f | %.3f | %.4f |\n", variants[vi].name, l, a[0], a[1], a[2], a[3], a[4]);
        }
    }
    fclose(md);
    /* plots: validation bpb over steps (mean over seeds), gate entropy per layer */
    {
        plot_series ser[N_VARIANTS];
        plot_chart ch;
        float *xs = (float *)malloc(sizeof(float) * (size_t)ne), *ys = (float *)malloc(sizeof(float) * (size_t)ne * N_VARIANTS);
        float lx[MAX_LAYERS], ly[N_VARIANTS][MAX_LAYERS];
        memset(ser, 0, sizeof ser);
        memset(&ch, 0, sizeof ch);
        for (i = 0; i < ne; i++) xs[i] = (float)(i + 1 < ne ? (i + 1) * o.eval_every : o.steps);
        for (vi = 0; vi < N_VARIANTS; vi++) {
            if (!o.chosen[vi]) continue;
            for (i = 0; i < ne; i++) {
                double m = 0.0;
                for (s = 0; s < o.seeds; s++) m += res[vi][s].curve[i] / o.seeds;
                ys[vi * ne + i] = (float)m;
            }
            ser[n_plot].name = variants[vi].name; ser[n_plot].x = xs; ser[n_plot].y = ys + vi * ne; ser[n_plot].n = ne;
            ser[n_plot].style = PLOT_LINE_POINTS;
            n_plot++;
        }
        ch.title = "validation bits per byte (mean over seeds)"; ch.xlabel = "step"; ch.ylabel = "bits per byte";
        snprintf(path, sizeof path, "%s/router_compare_val.png", o.out_dir);
        if (plot_lines(path, &ch, ser, n_plot) != 0) fprintf(stderr, "could not write %s\n", path);
        n_plot = 0;
        memset(ser, 0, sizeof ser);
        for (l = 0; l < MAX_LAYERS; l++) lx[l] = (float)l;
        for (vi = 0; vi < N_VARIANTS; vi++) {
            int nl = res[vi][0].n_moe;
            if (!o.chosen[vi] || nl == 0) continue;
            for (l = 0; l < nl; l++) {
                double m = 0.0;
                for (s = 0; s < o.seeds; s++) m += res[vi][s].gate_h[l] / o.seeds;
                ly[vi][l] = (float)m;
            }
            ser[n_plot].name = variants[vi].name; ser[n_plot].x = lx; ser[n_plot].y = ly[vi]; ser[n_plot].n = nl;
            ser[n_plot].style = PLOT_LINE_POINTS;
            n_plot++;
        }
        ch.title = "gate entropy per MoE layer (validation, mean over seeds; ln E = uniform)"; ch.xlabel = "MoE layer";
        ch.ylabel = "nats";
        snprintf(path, sizeof path, "%s/router_compare_gate_entropy.png", o.out_dir);
        if (n_plot > 0 && plot_lines(path, &ch, ser, n_plot) != 0) fprintf(stderr, "could not write %s\n", path);
        free(xs);
        free(ys);
    }
    printf("\nwrote %s/router_compare.{csv,md}, router_compare_layers.csv, router_compare_curve.csv, router_compare_val.png, "
           "router_compare_gate_entropy.png\ntotal_seconds=%.1f\n", o.out_dir, moe_time_seconds() - t_start);
    for (vi = 0; vi < N_VARIANTS; vi++)
        for (s = 0; o.chosen[vi] && s < o.seeds; s++) free(res[vi][s].curve);
    brown_free(&cp);
    return 0;
}
