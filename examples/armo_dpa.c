/* armo_dpa.c - ArmoRM (arXiv 2406.12845) and DPA (arXiv 2402.18571) on a simulator with known
   attributes, and on the real signal we have: length, on HH-RLHF and AlpacaEval.

   No public multi-attribute rating data (HelpSteer, UltraFeedback's fine-grained ratings,
   ArmoRM's mix) is reachable from this project's machines, so the multi-objective parts run on
   a simulator whose attributes are known:
     responses  latent helpfulness h, correctness c (0.4 h + noise), verbosity b (a length of
                exp(3.2 + 0.5 b) words, about 5.5 code points each) and safety s (varied only
                for sensitive prompts); the frozen backbone's features of a response are a
                random linear map of (h, c, b, s, 4 nuisance styles) plus its prompt type and
                noise (64 dims), the premise of ArmoRM's linear probe; prompts are of three
                types (chat, factual, sensitive), 16-dim type embeddings plus noise
     ratings    absolute, HelpSteer's 0-4 scale as (q + 0.5) / 5, with the real mix's missing
                labels: "helpsteer" rows rate helpfulness (whose raters also reward length:
                h + 0.4 b), correctness and verbosity; "ultrafeedback" rows helpfulness and
                correctness; "beavertails" rows (sensitive prompts) only is_safe (0/1)
     pairs      two responses to one prompt, the preferred drawn by Bradley-Terry from a hidden
                direction that depends on the prompt type (chat: helpfulness; factual:
                correctness, shorter; sensitive: safety); length itself is never rewarded
   Reported per seed: stage-1 recovery of each objective (Pearson with the raters' latent),
   Spearman(reward, length) before and after verbosity de-correlation, held-out preference
   accuracy of the gate (on r~ and, as the released stage-2 script, on r), a fixed linear mix
   (a BT head on r~), a single BT model on the response features, the uniform mix the released
   script's softmax over the pair gives, and the gate weights per prompt type; DPA: best-of-16
   under directions (cos t, sin t) over (helpfulness, verbosity) rewards, with the prompt's
   integer weights, the Pareto front and its hypervolume against a scalar reward model's
   best-of-16 and a random pick.
   Real signals (--data DIR, $MOE_SHARED_DATA, data/ after make data-preferences, or ../shared/data; skipped with a
   message when absent): on HH-RLHF helpful-base, ArmoRM's verbosity de-correlation between a BT
   reward model and a verbosity reward (stage-1 ridge on length); on AlpacaEval's 11 samples per
   instruction (tulu-2-dpo-13b, GPT-4-turbo judge), DPA's best-of-11 under directions over (that
   BT reward, length): the judge's win rate and the average length per direction.

       build/examples/armo_dpa [--quick] [--seeds 3] [--seed 1] [--data DIR]   (--help: their ranges)

   Prints a settings table, key=value lines per seed and a summary (mean, sd over seeds);
   writes out/armo_dpa.csv (every value by seed) and out/armo_dpa_gates.png (mean gate weight
   per prompt type and objective), out/armo_dpa_front.png (DPA directions on the simulator),
   out/armo_dpa_alpacaeval.png (win rate against length per direction). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_armo_*, rwd_dpa_*, rwd_pareto_front, rwd_hypervolume, rwd_featurize, rwd_bt_train */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines, plot_heatmap */
#include "files.h" /* defines: files_open_read, files_close_read, files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

enum { K = 4, OBJ_HELP = 0, OBJ_CORR = 1, OBJ_VERB = 2, OBJ_SAFE = 3, N_TYPES = 3, N_THETA = 9, MAX_SEEDS = 16 };
static const char *const obj_name[K] = {"helpfulness", "correctness", "verbosity", "safety"};
static const char *const type_name[N_TYPES] = {"chat", "factual", "sensitive"};
/* the hidden preference directions over (h, c, b, s) per prompt type */
static const double pref_dir[N_TYPES][K] = {{1.0, 0.3, 0.0, 0.2}, {0.3, 1.0, -0.2, 0.2}, {0.3, 0.2, 0.0, 1.2}};
static const double theta_deg[N_THETA] = {-45, -30, -15, 0, 15, 30, 45, 60, 75};

typedef struct settings {
    int quick, seeds, n_rated, n_train, n_test, n_dpa, n_cand, dim, gate_steps, gate_batch, gate_hidden;
    uint64_t seed;
    const char *data;
} settings;

static void die(const char *what, const char *detail) {
    fprintf(stderr, "armo_dpa: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}
#define CK(call) do { moe_err e_; if ((call) != MOE_OK) die(#call, e_.msg); } while (0)

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory", NULL);
    return p;
}

/* ---- results: one value per (name, seed), summarised at the end ---- */

#define MAX_KEYS 160
static char key_name[MAX_KEYS][64];
static double key_val[MAX_KEYS][MAX_SEEDS];
static int key_count, key_n[MAX_KEYS];
static FILE *csv_out;

static void record(int seed_i, uint64_t seed, const char *name, double v) {
    int k;
    for (k = 0; k < key_count && strcmp(key_name[k], name) != 0; k++) {}
    if (k == key_count) {
        if (key_count == MAX_KEYS) die("too many result keys", name);
        snprintf(key_name[key_count++], 64, "%s", name);
    }
    key_val[k][seed_i] = v;
    if (seed_i + 1 > key_n[k]) key_n[k] = seed_i + 1;
    if (csv_out) fprintf(csv_out, "%llu,%s,%.6g\n", (unsigned long long)seed, name, v);
}

static double mean_of(const char *name, double *sd) {
    int k, i;
    double m = 0.0, s = 0.0;
    for (k = 0; k < key_count && strcmp(key_name[k], name) != 0; k++) {}
    if (k == key_count || key_n[k] == 0) { if (sd) *sd = NAN; return NAN; }
    for (i = 0; i < key_n[k]; i++) m += key_val[k][i];
    m /= key_n[k];
    for (i = 0; i < key_n[k]; i++) s += (key_val[k][i] - m) * (key_val[k][i] - m);
    if (sd) *sd = key_n[k] > 1 ? sqrt(s / (key_n[k] - 1)) : 0.0;
    return m;
}

/* ---- the simulator: a frozen backbone's features of responses and prompts ---- */

enum { SIM_D = 64, SIM_DP = 16, SIM_NUIS = 4 };

/* h(x, y) = A [a; nuisance] + B e_type + noise: the backbone encodes the attributes linearly,
   the premise of ArmoRM's linear probe; prompts: C e_type + noise */
typedef struct backbone { float A[SIM_D * (K + SIM_NUIS)], B[SIM_D * N_TYPES], C[SIM_DP * N_TYPES]; } backbone;
typedef struct response { double a[K]; double len; } response; /* a = (h, c, b, s); len in code points */

static double sigm(double x) { return 1.0 / (1.0 + exp(-x)); }

static void sim_backbone(backbone *bb, moe_rng *rng) {
    int i;
    for (i = 0; i < SIM_D * (K + SIM_NUIS); i++) bb->A[i] = moe_rng_normal(rng) / sqrtf((float)(K + SIM_NUIS));
    for (i = 0; i < SIM_D * N_TYPES; i++) bb->B[i] = 0.5f * moe_rng_normal(rng);
    for (i = 0; i < SIM_DP * N_TYPES; i++) bb->C[i] = moe_rng_normal(rng);
}

static void sim_response(response *r, float *x, int type, const backbone *bb, moe_rng *rng) {
    double z[K + SIM_NUIS], words;
    int i, k;
    r->a[OBJ_HELP] = moe_rng_normal(rng);
    r->a[OBJ_CORR] = 0.4 * r->a[OBJ_HELP] + 0.9 * moe_rng_normal(rng);
    r->a[OBJ_VERB] = moe_rng_normal(rng);
    r->a[OBJ_SAFE] = type == 2 ? moe_rng_normal(rng) : 1.0 + 0.3 * moe_rng_normal(rng);
    words = floor(exp(3.2 + 0.5 * r->a[OBJ_VERB]) + 0.5);
    r->len = words * (5.0 + moe_rng_uniform(rng)); /* about 5.5 code points a word */
    for (k = 0; k < K; k++) z[k] = r->a[k];
    for (k = K; k < K + SIM_NUIS; k++) z[k] = moe_rng_normal(rng);
    for (i = 0; i < SIM_D; i++) {
        double v = bb->B[i * N_TYPES + type] + 0.3 * moe_rng_normal(rng);
        for (k = 0; k < K + SIM_NUIS; k++) v += bb->A[i * (K + SIM_NUIS) + k] * z[k];
        x[i] = (float)v;
    }
}

static void sim_prompt(float *p, int type, const backbone *bb, moe_rng *rng) {
    int i;
    for (i = 0; i < SIM_DP; i++) p[i] = bb->C[i * N_TYPES + type] + 0.3f * moe_rng_normal(rng);
}

/* absolute rating of a latent z on HelpSteer's 0-4 scale, as (q + 0.5) / 5 */
static double rating(double z, moe_rng *rng) {
    double q = floor(2.0 + 1.1 * z + 0.5 * moe_rng_normal(rng) + 0.5);
    if (q < 0) q = 0;
    if (q > 4) q = 4;
    return (q + 0.5) / 5.0;
}

/* what the raters of each objective judge (helpfulness raters reward length too) */
static double rater_latent(const response *r, int k) { return k == OBJ_HELP ? r->a[OBJ_HELP] + 0.4 * r->a[OBJ_VERB] : r->a[k]; }

static double utility(const response *r, int type) {
    double u = 0.0;
    int k;
    for (k = 0; k < K; k++) u += pref_dir[type][k] * r->a[k];
    return u;
}

/* ---- small helpers ---- */

static void new_linear(rwd_head *h, moe_store *s, int d) {
    rwd_head_config hc = rwd_head_config_default();
    moe_err e_;
    hc.d_in = d;
    hc.max_rows = 128;
    moe_store_init(s);
    if (rwd_head_init(h, &hc, s, "rm.", &e_) != MOE_OK || moe_store_alloc(s, 1) != MOE_OK) die("head", e_.msg);
}

static double acc_of(const double *sw, const double *sl, size_t n) { return rwd_pair_accuracy(sw, sl, n); }

static void zscore(double *v, size_t n, size_t stride, double *mean_out, double *sd_out) {
    double m = 0.0, s = 0.0;
    size_t i;
    for (i = 0; i < n; i++) m += v[i * stride];
    m /= (double)n;
    for (i = 0; i < n; i++) s += (v[i * stride] - m) * (v[i * stride] - m);
    s = sqrt(s / (double)n) + 1e-12;
    for (i = 0; i < n; i++) v[i * stride] = (v[i * stride] - m) / s;
    if (mean_out) *mean_out = m;
    if (sd_out) *sd_out = s;
}

/* ================================ the simulator experiment ================================ */

static float dpa_points[MAX_SEEDS][N_THETA][2], base_points[MAX_SEEDS][3][2]; /* (length, helpfulness) */
static float gate_mean_all[N_TYPES][K];

static void simulator(int si, uint64_t seed, const settings *st) {
    const int d = SIM_D, dp = SIM_DP;
    int i, k, t, j;
    size_t n_pairs = (size_t)(st->n_train + st->n_test), n;
    moe_rng rng;
    backbone bb;
    response *rated, *pw, *pl, *cand;
    int *ptype;
    float *xr, *xw, *xl, *xp, *xc, *xcp;
    double *y;
    rwd_armo m, m_raw;
    rwd_gate_config gc = rwd_gate_config_default();
    rwd_gate_train_config tc = rwd_gate_train_config_default();
    rwd_ridge_report rep[K];
    rwd_train_stats ts;
    char key[64];
    double t0;
    moe_rng_seed(&rng, seed);
    sim_backbone(&bb, &rng);
    /* 1. rated responses with the real mix's missing labels */
    rated = (response *)xmalloc((size_t)st->n_rated * sizeof(response));
    xr = (float *)xmalloc((size_t)st->n_rated * (size_t)d * sizeof(float));
    y = (double *)xmalloc((size_t)st->n_rated * K * sizeof(double));
    for (i = 0; i < st->n_rated; i++) {
        double u = moe_rng_uniform(&rng);
        int source = u < 0.4 ? 0 : u < 0.75 ? 1 : 2, type = source == 2 ? 2 : moe_rng_below(&rng, N_TYPES);
        sim_response(&rated[i], xr + (size_t)i * d, type, &bb, &rng);
        for (k = 0; k < K; k++) y[i * K + k] = NAN;
        if (source == 0) { /* helpsteer */
            y[i * K + OBJ_HELP] = rating(rater_latent(&rated[i], OBJ_HELP), &rng);
            y[i * K + OBJ_CORR] = rating(rated[i].a[OBJ_CORR], &rng);
            y[i * K + OBJ_VERB] = rating(rated[i].a[OBJ_VERB], &rng);
        } else if (source == 1) { /* ultrafeedback */
            y[i * K + OBJ_HELP] = rating(rater_latent(&rated[i], OBJ_HELP), &rng);
            y[i * K + OBJ_CORR] = rating(rated[i].a[OBJ_CORR], &rng);
        } else { /* beavertails: is_safe */
            y[i * K + OBJ_SAFE] = rated[i].a[OBJ_SAFE] + 0.3 * moe_rng_normal(&rng) > -0.3 ? 1.0 : 0.0;
        }
    }
    /* 2. preference pairs */
    pw = (response *)xmalloc(n_pairs * sizeof(response));
    pl = (response *)xmalloc(n_pairs * sizeof(response));
    ptype = (int *)xmalloc(n_pairs * sizeof(int));
    xw = (float *)xmalloc(2 * n_pairs * (size_t)d * sizeof(float));
    xl = xw + n_pairs * (size_t)d;
    xp = (float *)xmalloc(n_pairs * (size_t)dp * sizeof(float));
    for (n = 0; n < n_pairs; n++) {
        response a, b;
        float fa[SIM_D], fb[SIM_D];
        int tp = moe_rng_below(&rng, N_TYPES), a_wins;
        ptype[n] = tp;
        sim_prompt(xp + n * (size_t)dp, tp, &bb, &rng);
        sim_response(&a, fa, tp, &bb, &rng);
        sim_response(&b, fb, tp, &bb, &rng);
        a_wins = moe_rng_uniform(&rng) < sigm(2.0 * (utility(&a, tp) - utility(&b, tp)));
        pw[n] = a_wins ? a : b;
        pl[n] = a_wins ? b : a;
        memcpy(xw + n * (size_t)d, a_wins ? fa : fb, sizeof fa);
        memcpy(xl + n * (size_t)d, a_wins ? fb : fa, sizeof fa);
    }
    /* 3. DPA candidates: chat prompts, n_cand responses each */
    cand = (response *)xmalloc((size_t)st->n_dpa * (size_t)st->n_cand * sizeof(response));
    xc = (float *)xmalloc((size_t)st->n_dpa * (size_t)st->n_cand * (size_t)d * sizeof(float));
    xcp = (float *)xmalloc((size_t)st->n_dpa * (size_t)st->n_cand * (size_t)dp * sizeof(float));
    for (i = 0; i < st->n_dpa; i++) {
        float pr[SIM_DP];
        sim_prompt(pr, 0, &bb, &rng);
        for (j = 0; j < st->n_cand; j++) {
            size_t q = (size_t)i * (size_t)st->n_cand + (size_t)j;
            sim_response(&cand[q], xc + q * (size_t)d, 0, &bb, &rng);
            memcpy(xcp + q * (size_t)dp, pr, sizeof pr);
        }
    }
    printf("data=sim seed=%llu rated=%d train_pairs=%d test_pairs=%d features=%d prompt_features=%d\n", (unsigned long long)seed,
           st->n_rated, st->n_train, st->n_test, d, dp);

    /* ---- stage 1 ---- */
    gc.d_in = dp;
    gc.n_hidden = 3;
    gc.d_hidden = st->gate_hidden;
    gc.max_rows = st->gate_batch;
    CK(rwd_armo_init(&m, K, d, OBJ_VERB, &gc, seed, &e_));
    t0 = moe_time_seconds();
    CK(rwd_armo_fit_regression(&m, rep, xr, y, (size_t)st->n_rated, NULL, &e_));
    {
        size_t nt = (size_t)st->n_test;
        const float *tw = xw + (size_t)st->n_train * (size_t)d;
        double *r = (double *)xmalloc(nt * K * sizeof(double)), *col = (double *)xmalloc(3 * nt * sizeof(double)), *lat = col + nt, *len = lat + nt;
        rwd_armo_rewards(r, m.W, tw, nt, d, K);
        for (n = 0; n < nt; n++) len[n] = pw[st->n_train + n].len;
        for (k = 0; k < K; k++) {
            for (n = 0; n < nt; n++) { col[n] = r[n * K + k]; lat[n] = rater_latent(&pw[st->n_train + n], k); }
            printf("data=sim seed=%llu stage=1 objective=%s lambda=%g n_train=%zu n_val=%zu val_mse=%.5f pearson_with_latent=%.4f length_spearman=%.4f\n",
                   (unsigned long long)seed, obj_name[k], rep[k].lambda, rep[k].n_train, rep[k].n_val, rep[k].val_mse, moe_pearson(col, lat, nt), rwd_spearman(col, len, nt));
            snprintf(key, sizeof key, "sim.recovery.%s", obj_name[k]); record(si, seed, key, moe_pearson(col, lat, nt));
            snprintf(key, sizeof key, "sim.length_rho.raw.%s", obj_name[k]); record(si, seed, key, rwd_spearman(col, len, nt));
        }
        /* ---- verbosity de-correlation on the training pairs' responses ---- */
        {
            double corr[K];
            float *ref = (float *)xmalloc(2 * (size_t)st->n_train * (size_t)d * sizeof(float));
            memcpy(ref, xw, (size_t)st->n_train * (size_t)d * sizeof(float));
            memcpy(ref + (size_t)st->n_train * (size_t)d, xl, (size_t)st->n_train * (size_t)d * sizeof(float));
            CK(rwd_armo_fit_verbosity(&m, corr, ref, 2 * (size_t)st->n_train, RWD_ARMO_CORR_THRESHOLD, &e_));
            free(ref);
            rwd_armo_transform(r, r, m.penalty, nt, K, OBJ_VERB);
            for (k = 0; k < K; k++) {
                if (k == OBJ_VERB) continue;
                for (n = 0; n < nt; n++) col[n] = r[n * K + k];
                printf("data=sim seed=%llu stage=verbosity objective=%s penalty=%g reference_spearman=%.4f length_spearman_after=%.4f\n",
                       (unsigned long long)seed, obj_name[k], m.penalty[k], corr[k], rwd_spearman(col, len, nt));
                snprintf(key, sizeof key, "sim.penalty.%s", obj_name[k]); record(si, seed, key, m.penalty[k]);
                snprintf(key, sizeof key, "sim.length_rho.debiased.%s", obj_name[k]); record(si, seed, key, rwd_spearman(col, len, nt));
            }
        }
        free(r); free(col);
    }
    printf("data=sim seed=%llu stage1_seconds=%.1f\n", (unsigned long long)seed, moe_time_seconds() - t0);
    /* ---- stage 2, and the comparisons, on held-out pairs ---- */
    {
        size_t ntr = (size_t)st->n_train, nt = (size_t)st->n_test;
        const float *tw = xw + ntr * (size_t)d, *tl = xl + ntr * (size_t)d, *tp = xp + ntr * (size_t)dp;
        double *sw = (double *)xmalloc(2 * nt * sizeof(double)), *sl = sw + nt, *gates = (double *)xmalloc(nt * K * sizeof(double));
        double *rr = (double *)xmalloc(2 * n_pairs * K * sizeof(double)), acc, mean_g[N_TYPES][K];
        float *fr_w = (float *)xmalloc(2 * n_pairs * K * sizeof(float)), *fr_l = fr_w + n_pairs * K;
        int cnt[N_TYPES] = {0, 0, 0};
        rwd_head h;
        moe_store s;
        rwd_train_config btc = rwd_train_config_default();
        tc.steps = st->gate_steps;
        tc.batch = st->gate_batch;
        tc.seed = seed;
        t0 = moe_time_seconds();
        CK(rwd_armo_fit_gate(&m, xp, xw, xl, ntr, &tc, 0, &ts, &e_));
        CK(rwd_armo_infer(&m, sw, NULL, gates, tw, tp, nt, &e_));
        CK(rwd_armo_infer(&m, sl, NULL, NULL, tl, tp, nt, &e_));
        acc = acc_of(sw, sl, nt);
        printf("data=sim seed=%llu model=armo_gate acc=%.4f train_loss=%.4f beta=%.3f seconds=%.1f\n", (unsigned long long)seed, acc, ts.loss,
               moe_store_param(&m.store, m.gate.id_scale)[0], moe_time_seconds() - t0);
        record(si, seed, "sim.acc.armo_gate", acc);
        memset(mean_g, 0, sizeof mean_g);
        for (n = 0; n < nt; n++) {
            t = ptype[ntr + n];
            cnt[t]++;
            for (k = 0; k < K; k++) mean_g[t][k] += gates[n * K + k];
        }
        for (t = 0; t < N_TYPES; t++) {
            double sum = 0.0;
            for (k = 0; k < K; k++) sum += mean_g[t][k];
            printf("data=sim seed=%llu gate prompt_type=%s", (unsigned long long)seed, type_name[t]);
            for (k = 0; k < K; k++) {
                double share = mean_g[t][k] / sum; /* share of beta */
                printf(" %s=%.3f", obj_name[k], share);
                snprintf(key, sizeof key, "sim.gate.%s.%s", type_name[t], obj_name[k]); record(si, seed, key, share);
                gate_mean_all[t][k] += (float)(share / st->seeds);
            }
            printf("\n");
        }
        /* the stage-2 script's variant: the gate trained (and used) on the raw rewards */
        CK(rwd_armo_init(&m_raw, K, d, OBJ_VERB, &gc, seed, &e_));
        memcpy(m_raw.W, m.W, (size_t)K * (size_t)d * sizeof(float));
        memcpy(m_raw.penalty, m.penalty, K * sizeof(double));
        CK(rwd_armo_fit_gate(&m_raw, xp, xw, xl, ntr, &tc, 1, &ts, &e_));
        CK(rwd_armo_infer(&m_raw, sw, NULL, NULL, tw, tp, nt, &e_));
        CK(rwd_armo_infer(&m_raw, sl, NULL, NULL, tl, tp, nt, &e_));
        acc = acc_of(sw, sl, nt);
        printf("data=sim seed=%llu model=armo_gate_raw_rewards acc=%.4f (the stage-2 script trains on r, not r~)\n", (unsigned long long)seed, acc);
        record(si, seed, "sim.acc.armo_gate_raw", acc);
        rwd_armo_free(&m_raw);
        /* the released script's effective gate: softmax over the (chosen, rejected) pair makes
           every weight beta/2, i.e. the uniform mix of the raw rewards */
        rwd_armo_rewards(rr, m.W, xw, n_pairs, d, K);
        rwd_armo_rewards(rr + n_pairs * K, m.W, xl, n_pairs, d, K);
        for (n = 0; n < nt; n++) {
            sw[n] = sl[n] = 0.0;
            for (k = 0; k < K; k++) { sw[n] += rr[(ntr + n) * K + k]; sl[n] += rr[(n_pairs + ntr + n) * K + k]; }
        }
        acc = acc_of(sw, sl, nt);
        printf("data=sim seed=%llu model=uniform_mix acc=%.4f (what the released script's softmax over the pair gives)\n", (unsigned long long)seed, acc);
        record(si, seed, "sim.acc.uniform_mix", acc);
        /* a fixed linear mix: one BT-trained weight per objective of r~ for every prompt */
        rwd_armo_transform(rr, rr, m.penalty, 2 * n_pairs, K, OBJ_VERB);
        for (n = 0; n < 2 * n_pairs * K; n++) fr_w[n] = (float)rr[n]; /* fr_l = fr_w + n_pairs K */
        new_linear(&h, &s, K);
        btc.epochs = 20; btc.lr = 0.05f; btc.lr_min = 0.005f; btc.weight_decay = 0.0f; btc.seed = seed;
        CK(rwd_bt_train(&h, &s, fr_w, fr_l, NULL, ntr, &btc, NULL, &e_));
        rwd_head_score(&h, &s, sw, fr_w + ntr * K, nt);
        rwd_head_score(&h, &s, sl, fr_l + ntr * K, nt);
        acc = acc_of(sw, sl, nt);
        printf("data=sim seed=%llu model=fixed_linear_mix acc=%.4f weights=", (unsigned long long)seed, acc);
        for (k = 0; k < K; k++) printf("%s%.3f", k ? "," : "", moe_store_param(&s, h.id_w1)[k]);
        printf("\n");
        record(si, seed, "sim.acc.fixed_mix", acc);
        rwd_head_free(&h); moe_store_free(&s);
        /* a single BT reward model on the response features */
        new_linear(&h, &s, d);
        btc = rwd_train_config_default();
        btc.epochs = 10; btc.seed = seed;
        CK(rwd_bt_train(&h, &s, xw, xl, NULL, ntr, &btc, NULL, &e_));
        rwd_head_score(&h, &s, sw, tw, nt);
        rwd_head_score(&h, &s, sl, tl, nt);
        acc = acc_of(sw, sl, nt);
        printf("data=sim seed=%llu model=single_bt acc=%.4f\n", (unsigned long long)seed, acc);
        record(si, seed, "sim.acc.single_bt", acc);
        { /* the labels' own ceiling: the hidden utility's ordering */
            size_t ok = 0;
            for (n = 0; n < nt; n++) ok += utility(&pw[ntr + n], ptype[ntr + n]) > utility(&pl[ntr + n], ptype[ntr + n]);
            printf("data=sim seed=%llu model=true_utility acc=%.4f (the ceiling under Bradley-Terry label noise)\n", (unsigned long long)seed, (double)ok / (double)nt);
            record(si, seed, "sim.acc.true_utility", (double)ok / (double)nt);
        }

        /* ---- DPA: best-of-n under directions over (helpfulness, verbosity) rewards ---- */
        {
            size_t nc = (size_t)st->n_dpa * (size_t)st->n_cand;
            double *rc = (double *)xmalloc(nc * K * sizeof(double)), *bt = (double *)xmalloc(nc * sizeof(double)), *ar = (double *)xmalloc(nc * sizeof(double));
            double pts[N_THETA + 3][2], rpair[64 * 2], v[2], ref[2], hv_dpa, hv_base;
            size_t front[N_THETA + 3], n_front, best;
            int q, w[2];
            char prompt[256];
            rwd_armo_rewards(rc, m.W, xc, nc, d, K);
            rwd_head_score(&h, &s, bt, xc, nc);
            CK(rwd_armo_infer(&m, ar, NULL, NULL, xc, xcp, nc, &e_));
            for (q = 0; q < N_THETA + 3; q++) {
                double mh = 0.0, mb = 0.0, mlen = 0.0, mrh = 0.0, mrb = 0.0;
                const char *label = q < N_THETA ? NULL : q == N_THETA ? "random" : q == N_THETA + 1 ? "single_bt_best" : "armo_best";
                if (q < N_THETA) rwd_dpa_direction_angle(v, theta_deg[q] * 3.141592653589793 / 180.0);
                for (i = 0; i < st->n_dpa; i++) {
                    size_t base = (size_t)i * (size_t)st->n_cand, c;
                    if (q < N_THETA) {
                        for (j = 0; j < st->n_cand; j++) {
                            rpair[2 * j] = rc[(base + (size_t)j) * K + OBJ_HELP];
                            rpair[2 * j + 1] = rc[(base + (size_t)j) * K + OBJ_VERB];
                        }
                        CK(rwd_dpa_best_of_n(&best, v, rpair, (size_t)st->n_cand, 2, &e_));
                    } else if (q == N_THETA) {
                        best = 0; /* the candidates are i.i.d.: the first is a random pick */
                    } else {
                        const double *sc = q == N_THETA + 1 ? bt : ar;
                        best = 0;
                        for (c = 1; c < (size_t)st->n_cand; c++) if (sc[base + c] > sc[base + best]) best = c;
                    }
                    c = base + best;
                    mh += cand[c].a[OBJ_HELP];
                    mb += cand[c].a[OBJ_VERB];
                    mlen += cand[c].len;
                    mrh += rc[c * K + OBJ_HELP];
                    mrb += rc[c * K + OBJ_VERB];
                }
                mh /= st->n_dpa; mb /= st->n_dpa; mlen /= st->n_dpa; mrh /= st->n_dpa; mrb /= st->n_dpa;
                pts[q][0] = mh;
                pts[q][1] = mb;
                if (q < N_THETA) {
                    CK(rwd_dpa_weights(w, v, 2, &e_));
                    printf("data=sim seed=%llu dpa theta=%g w_helpfulness=%d w_verbosity=%d true_helpfulness=%.3f true_verbosity=%.3f length=%.0f reward_helpfulness=%.4f reward_verbosity=%.4f\n",
                           (unsigned long long)seed, theta_deg[q], w[0], w[1], mh, mb, mlen, mrh, mrb);
                    snprintf(key, sizeof key, "sim.dpa.theta%+03.0f.helpfulness", theta_deg[q]); record(si, seed, key, mh);
                    snprintf(key, sizeof key, "sim.dpa.theta%+03.0f.length", theta_deg[q]); record(si, seed, key, mlen);
                    dpa_points[si][q][0] = (float)mlen;
                    dpa_points[si][q][1] = (float)mh;
                    if (si == 0 && q == 2) {
                        CK(rwd_dpa_system_prompt(prompt, sizeof prompt, w[0], w[1], &e_));
                        printf("data=sim dpa_prompt_example=\"%s\"\n", prompt);
                    }
                } else {
                    printf("data=sim seed=%llu dpa baseline=%s true_helpfulness=%.3f true_verbosity=%.3f length=%.0f\n", (unsigned long long)seed, label, mh, mb, mlen);
                    snprintf(key, sizeof key, "sim.dpa.%s.helpfulness", label); record(si, seed, key, mh);
                    snprintf(key, sizeof key, "sim.dpa.%s.length", label); record(si, seed, key, mlen);
                    base_points[si][q - N_THETA][0] = (float)mlen;
                    base_points[si][q - N_THETA][1] = (float)mh;
                }
            }
            /* fronts in the true (helpfulness, verbosity) plane, both maximised, from one standard
               deviation below the random pick */
            ref[0] = pts[N_THETA][0] - 1.0;
            ref[1] = pts[N_THETA][1] - 1.0;
            CK(rwd_pareto_front(front, &n_front, &pts[0][0], N_THETA, 2, &e_));
            CK(rwd_hypervolume(&hv_dpa, &pts[0][0], N_THETA, 2, ref, &e_));
            CK(rwd_hypervolume(&hv_base, &pts[N_THETA][0], 3, 2, ref, &e_));
            printf("data=sim seed=%llu dpa front_points=%zu of %d hypervolume_directions=%.4f hypervolume_scalar_rm_picks=%.4f\n",
                   (unsigned long long)seed, n_front, N_THETA, hv_dpa, hv_base);
            record(si, seed, "sim.dpa.front_points", (double)n_front);
            record(si, seed, "sim.dpa.hv_directions", hv_dpa);
            record(si, seed, "sim.dpa.hv_scalar", hv_base);
            free(rc); free(bt); free(ar);
        }
        rwd_head_free(&h); moe_store_free(&s);
        free(sw); free(gates); free(rr); free(fr_w);
    }
    rwd_armo_free(&m);
    free(rated); free(xr); free(y); free(pw); free(pl); free(ptype); free(xw); free(xp);
    free(cand); free(xc); free(xcp);
}

/* ================================ real signals ================================ */

/* root/rel for reading (.gz and .xz through a gzip or xz child, no shell); NULL when the file is
   absent (the caller skips that part); any other problem ends the run */
static FILE *open_data(files_reader *r, const char *root, const char *rel, char *path, size_t cap) {
    files_err fe;
    struct stat sb;
    FILE *f;
    snprintf(path, cap, "%s/%s", root, rel);
    if (stat(path, &sb) != 0) return NULL;
    f = files_open_read(r, path, &fe);
    if (!f) die(fe.msg, NULL);
    return f;
}

/* the decompressing child's exit status too: a truncated archive is not a shorter data set */
static void close_data(files_reader *r) {
    files_err fe;
    if (files_close_read(r, &fe) != 0) die(fe.msg, NULL);
}

/* AlpacaEval: per sample set, the preference and the output of each of the 805 instructions */
typedef struct alpaca { int sets, n; double *pref; double *len; float *x; } alpaca;

static int read_alpaca(alpaca *A, const char *dir, int sets, const rwd_featurizer *fz) {
    int s, d = rwd_featurizer_width(fz);
    char **instr = NULL;
    memset(A, 0, sizeof *A);
    for (s = 0; s < sets; s++) {
        char rel[256], path[2400], *text;
        size_t len;
        int i;
        files_reader r;
        FILE *f;
        rwd_json doc;
        const rwd_json_node *root, *it;
        moe_err e_;
        snprintf(rel, sizeof rel, "preferences/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.%d.annotations.json.xz", s);
        f = open_data(&r, dir, rel, path, sizeof path);
        if (!f) return 1;
        if (rwd_read_all(f, &text, &len, &e_) != MOE_OK) die(rel, e_.msg);
        close_data(&r);
        memset(&doc, 0, sizeof doc);
        if (rwd_json_parse(&doc, text, len, 1, &e_) != MOE_OK) die(rel, e_.msg);
        root = rwd_json_root(&doc);
        if (s == 0) {
            A->n = (int)root->count;
            A->pref = (double *)xmalloc((size_t)sets * (size_t)A->n * sizeof(double));
            A->len = (double *)xmalloc((size_t)sets * (size_t)A->n * sizeof(double));
            A->x = (float *)xmalloc((size_t)sets * (size_t)A->n * (size_t)d * sizeof(float));
            instr = (char **)calloc((size_t)A->n, sizeof(char *));
        } else if ((int)root->count != A->n) die("AlpacaEval sets differ in size", rel);
        for (i = 0, it = rwd_json_child(&doc, root); it; it = rwd_json_next(&doc, it), i++) {
            const rwd_json_node *p = rwd_json_member(&doc, it, "preference"), *o = rwd_json_member(&doc, it, "output_2"), *q = rwd_json_member(&doc, it, "instruction");
            const char *os = rwd_json_string(&doc, o), *qs = rwd_json_string(&doc, q);
            size_t at = (size_t)s * (size_t)A->n + (size_t)i;
            if (!p || p->type != RWD_JSON_NUMBER || !os || !qs) die("AlpacaEval: an annotation lacks preference, output_2 or instruction", rel);
            if (s == 0) {
                instr[i] = (char *)xmalloc(strlen(qs) + 1);
                strcpy(instr[i], qs);
            } else if (strcmp(instr[i], qs) != 0) die("AlpacaEval sets list the instructions in different orders", rel);
            A->pref[at] = p->number == 0.0 ? 1.5 : p->number; /* a stored 0 is a draw (data README) */
            A->len[at] = (double)rwd_utf8_length(os, o->str_len);
            rwd_featurize(A->x + at * (size_t)d, fz, qs, os);
        }
        rwd_json_free(&doc);
        free(text);
        A->sets = s + 1;
    }
    for (s = 0; s < A->n; s++) free(instr[s]);
    free(instr);
    return 0;
}

static float alpaca_points[MAX_SEEDS][N_THETA][2];
static int have_alpaca_points;

static void real_signals(int si, uint64_t seed, const settings *st, const rwd_text_pairs *hh, const alpaca *A) {
    rwd_featurizer fz = rwd_featurizer_default();
    size_t n = hh->n, ntr = n * 4 / 5, nt = n - ntr, i, *perm;
    int d, q;
    float *xw, *xl, *xv;
    double *len, *sw, *sl, *V, *yv, pen[2], corr[2], m_help, sd_help, m_len, sd_len;
    float W[1 * 8192];
    rwd_head h;
    moe_store s;
    rwd_train_config tc = rwd_train_config_default();
    rwd_ridge_report rep;
    moe_rng rng;
    rwd_text_pairs tr, te;
    fz.dim = st->dim;
    d = rwd_featurizer_width(&fz);
    if (d > 8192) die("--dim too large for the verbosity regression buffer", NULL);
    /* the seed's 80/20 split of helpful-base */
    perm = (size_t *)xmalloc(n * sizeof(size_t));
    moe_rng_seed(&rng, 500 + seed);
    for (i = 0; i < n; i++) perm[i] = i;
    for (i = n - 1; i > 0; i--) {
        size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
    memset(&tr, 0, sizeof tr);
    memset(&te, 0, sizeof te);
    for (i = 0; i < n; i++) {
        size_t p = perm[i];
        CK(rwd_text_pairs_add(i < ntr ? &tr : &te, hh->prompt[p], strlen(hh->prompt[p]), hh->chosen[p], strlen(hh->chosen[p]), hh->rejected[p], strlen(hh->rejected[p]), &e_));
    }
    xw = (float *)xmalloc(2 * n * (size_t)d * sizeof(float));
    xl = xw + ntr * (size_t)d; /* train: xw[0, ntr) chosen, xl = xw + ntr d rejected; test after 2 ntr d */
    len = (double *)xmalloc(2 * n * sizeof(double));
    CK(rwd_featurize_pairs(xw, xl, len, len + ntr, &fz, &tr, &e_));
    CK(rwd_featurize_pairs(xw + 2 * ntr * (size_t)d, xw + (2 * ntr + nt) * (size_t)d, len + 2 * ntr, len + 2 * ntr + nt, &fz, &te, &e_));
    /* the helpfulness reward: a BT head */
    new_linear(&h, &s, d);
    tc.epochs = 8;
    tc.seed = seed;
    CK(rwd_bt_train(&h, &s, xw, xl, NULL, ntr, &tc, NULL, &e_));
    /* the verbosity reward: stage-1 ridge on every training response, target z(log length) */
    xv = xw; /* the 2 ntr training responses are contiguous */
    yv = (double *)xmalloc(2 * ntr * sizeof(double));
    for (i = 0; i < 2 * ntr; i++) yv[i] = log1p(len[i]);
    zscore(yv, 2 * ntr, 1, &m_len, &sd_len);
    CK(rwd_armo_regress(W, &rep, xv, yv, 2 * ntr, d, 1, NULL, &e_));
    /* V = [z(helpfulness), verbosity] of the training responses (the reference set) */
    V = (double *)xmalloc(2 * 2 * n * sizeof(double));
    sw = (double *)xmalloc(2 * n * sizeof(double));
    rwd_head_score(&h, &s, sw, xw, 2 * n);
    rwd_armo_rewards(yv, W, xw, 2 * ntr, d, 1);
    for (i = 0; i < 2 * ntr; i++) { V[2 * i] = sw[i]; V[2 * i + 1] = yv[i]; }
    zscore(V, 2 * ntr, 2, &m_help, &sd_help);
    CK(rwd_armo_verbosity_penalties(pen, corr, V, 2 * ntr, 2, 1, RWD_ARMO_CORR_THRESHOLD, &e_));
    { /* held out: accuracy and length correlation before and after r~ = r - p r_v */
        double *tv = (double *)xmalloc(2 * nt * sizeof(double)), *a = (double *)xmalloc(2 * nt * sizeof(double)), acc0, acc1, rho0, rho1;
        const float *xt = xw + 2 * ntr * (size_t)d;
        rwd_armo_rewards(tv, W, xt, 2 * nt, d, 1);
        for (i = 0; i < 2 * nt; i++) a[i] = (sw[2 * ntr + i] - m_help) / sd_help;
        sl = sw + 2 * ntr;
        acc0 = acc_of(a, a + nt, nt);
        rho0 = rwd_length_correlation(a, a + nt, len + 2 * ntr, len + 2 * ntr + nt, nt);
        for (i = 0; i < 2 * nt; i++) a[i] -= pen[0] * tv[i];
        acc1 = acc_of(a, a + nt, nt);
        rho1 = rwd_length_correlation(a, a + nt, len + 2 * ntr, len + 2 * ntr + nt, nt);
        printf("data=hh seed=%llu verbosity_reward_lambda=%g verbosity_reward_val_mse=%.4f penalty=%g reference_spearman_after=%.4f acc_before=%.4f acc_after=%.4f length_spearman_before=%.4f length_spearman_after=%.4f longer_wins=%.4f\n",
               (unsigned long long)seed, rep.lambda, rep.val_mse, pen[0], corr[0], acc0, acc1, rho0, rho1,
               rwd_longer_wins_accuracy(len + 2 * ntr, len + 2 * ntr + nt, nt));
        record(si, seed, "hh.penalty", pen[0]);
        record(si, seed, "hh.acc_before", acc0);
        record(si, seed, "hh.acc_after", acc1);
        record(si, seed, "hh.length_rho_before", rho0);
        record(si, seed, "hh.length_rho_after", rho1);
        (void)sl;
        free(tv); free(a);
    }
    /* AlpacaEval: DPA's best-of-11 under directions over (z helpfulness, z log length) */
    if (A && A->n > 0) {
        size_t N = (size_t)A->sets * (size_t)A->n;
        double *rh = (double *)xmalloc(N * sizeof(double)), *sel_p = (double *)xmalloc((size_t)A->n * sizeof(double)), *sel_l = (double *)xmalloc((size_t)A->n * sizeof(double));
        double v[2], rp[2 * 32], pts[N_THETA][2], oracle_p = 0.0, oracle_l = 0.0, rand_wr = 0.0, rand_len = 0.0;
        size_t best, front[N_THETA], n_front;
        int c, w[2];
        rwd_winrate wr;
        rwd_head_score(&h, &s, rh, A->x, N);
        for (i = 0; i < N; i++) rh[i] = (rh[i] - m_help) / sd_help;
        for (q = 0; q < N_THETA; q++) {
            rwd_dpa_direction_angle(v, theta_deg[q] * 3.141592653589793 / 180.0);
            for (i = 0; i < (size_t)A->n; i++) {
                for (c = 0; c < A->sets; c++) {
                    size_t at = (size_t)c * (size_t)A->n + i;
                    rp[2 * c] = rh[at];
                    rp[2 * c + 1] = (log1p(A->len[at]) - m_len) / sd_len;
                }
                CK(rwd_dpa_best_of_n(&best, v, rp, (size_t)A->sets, 2, &e_));
                sel_p[i] = A->pref[best * (size_t)A->n + i];
                sel_l[i] = A->len[best * (size_t)A->n + i];
            }
            CK(rwd_winrate_compute(&wr, sel_p, sel_l, (size_t)A->n, &e_));
            CK(rwd_dpa_weights(w, v, 2, &e_));
            printf("data=alpacaeval seed=%llu dpa theta=%g w_helpfulness=%d w_verbosity=%d win_rate=%.2f standard_error=%.2f avg_length=%.0f\n",
                   (unsigned long long)seed, theta_deg[q], w[0], w[1], wr.win_rate, wr.standard_error, wr.avg_length);
            pts[q][0] = wr.win_rate;
            pts[q][1] = wr.avg_length;
            alpaca_points[si][q][0] = (float)wr.avg_length;
            alpaca_points[si][q][1] = (float)wr.win_rate;
            {
                char key[64];
                snprintf(key, sizeof key, "alpacaeval.theta%+03.0f.win_rate", theta_deg[q]); record(si, seed, key, wr.win_rate);
                snprintf(key, sizeof key, "alpacaeval.theta%+03.0f.avg_length", theta_deg[q]); record(si, seed, key, wr.avg_length);
            }
        }
        have_alpaca_points = 1;
        for (c = 0; c < A->sets; c++) { /* each sample set alone: a random pick */
            CK(rwd_winrate_compute(&wr, A->pref + (size_t)c * (size_t)A->n, A->len + (size_t)c * (size_t)A->n, (size_t)A->n, &e_));
            rand_wr += wr.win_rate / A->sets;
            rand_len += wr.avg_length / A->sets;
        }
        for (i = 0; i < (size_t)A->n; i++) { /* the judge's own best of 11: the ceiling */
            size_t bi = 0;
            for (c = 1; c < A->sets; c++) if (A->pref[(size_t)c * (size_t)A->n + i] > A->pref[bi * (size_t)A->n + i]) bi = (size_t)c;
            oracle_p += A->pref[bi * (size_t)A->n + i] - 1.0;
            oracle_l += A->len[bi * (size_t)A->n + i];
        }
        /* both maximised: when longer also wins more often, one direction dominates the rest */
        CK(rwd_pareto_front(front, &n_front, &pts[0][0], N_THETA, 2, &e_));
        printf("data=alpacaeval seed=%llu random_pick_win_rate=%.2f random_pick_avg_length=%.0f judge_best_of_%d_win_rate=%.2f judge_best_avg_length=%.0f front_points=%zu\n",
               (unsigned long long)seed, rand_wr, rand_len, A->sets, 100.0 * oracle_p / A->n, oracle_l / A->n, n_front);
        record(si, seed, "alpacaeval.random_win_rate", rand_wr);
        record(si, seed, "alpacaeval.random_avg_length", rand_len);
        free(rh); free(sel_p); free(sel_l);
    }
    rwd_head_free(&h);
    moe_store_free(&s);
    rwd_text_pairs_free(&tr);
    rwd_text_pairs_free(&te);
    free(perm); free(xw); free(len); free(yv); free(V); free(sw);
}

/* ================================ main ================================ */

static void summary_line(const char *label, const char *const *keys, int n) {
    int i;
    printf("summary %s", label);
    for (i = 0; i < n; i++) {
        double sd, m = mean_of(keys[i], &sd);
        const char *short_name = strrchr(keys[i], '.');
        printf(" %s=%.4f %s_sd=%.4f", short_name ? short_name + 1 : keys[i], m, short_name ? short_name + 1 : keys[i], sd);
    }
    printf("\n");
}

static const char *const about =
    "ArmoRM: stage-1 ridge probes per objective on ratings with missing labels, verbosity de-correlation,\n"
    "and a gating network trained with Bradley-Terry on preference pairs; DPA: best-of-n under reward\n"
    "directions, the Pareto front and its hypervolume. Data: a built-in simulator with known attributes\n"
    "(helpfulness, correctness, verbosity, safety; no download), and from the shared data folder when it\n"
    "is there (skipped with a message otherwise): <DIR>/preferences/hh-rlhf/helpful-base/test.jsonl.gz\n"
    "(JSON lines {\"chosen\": \"...\", \"rejected\": \"...\"}) for verbosity de-correlation, and\n"
    "<DIR>/preferences/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.<k>.annotations.json.xz (AlpacaEval's\n"
    "judged samples) for DPA's best-of-11. Prints a settings table, key=value lines per seed and summary\n"
    "lines; writes out/armo_dpa.csv, out/armo_dpa_gates.png, out/armo_dpa_front.png and\n"
    "out/armo_dpa_alpacaeval.png.";

int main(int argc, char **argv) {
    settings st;
    rwd_text_pairs hh;
    alpaca A;
    int si, have_hh = 0, have_alpaca = 0, k, t, q;
    char key[64];
    memset(&st, 0, sizeof st);
    st.seeds = -1;
    st.seed = 1;
    st.data = files_data_root();
    {
        flag fl[4];
        flags_program p;
        int rc, seed = 1;
        fl[0] = flag_switch("--quick", &st.quick, "1 seed and smaller sets (simulator, features, gate training; 3 AlpacaEval sample sets)");
        fl[1] = flag_default(flag_int("--seeds", &st.seeds, 1, MAX_SEEDS, "seeds (each: a simulator draw, the splits, the initialisations)"), "3; 1 with --quick");
        fl[2] = flag_int("--seed", &seed, 0, 2147483647, "the first seed");
        fl[3] = flag_default(flag_string("--data", &st.data, "DIR", "the shared data folder (preferences/hh-rlhf, preferences/alpacaeval-bon-tulu2-13b)"),
                             "$MOE_SHARED_DATA, else data/ after make data-preferences, else ../shared/data");
        p = flags_program_make("armo_dpa", "ArmoRM's multi-objective reward and DPA's directions on a simulator, HH-RLHF and AlpacaEval", about, fl, 4);
        rc = flags_parse(&p, argc, argv);
        if (rc != FLAGS_RUN) return rc;
        st.seed = (uint64_t)seed;
    }
    if (st.seeds < 0) st.seeds = st.quick ? 1 : 3;
    st.n_rated = st.quick ? 1500 : 6000;
    st.n_train = st.quick ? 1500 : 6000;
    st.n_test = st.quick ? 500 : 2000;
    st.n_dpa = st.quick ? 100 : 400;
    st.n_cand = 16;
    st.dim = st.quick ? 1024 : 4096;
    st.gate_steps = st.quick ? 300 : 2000;
    st.gate_batch = 256;
    st.gate_hidden = 64;
    printf("%-24s %s\n%-24s %d rated responses (40%% helpsteer-like, 35%% ultrafeedback-like, 25%% beavertails-like)\n", "mode", st.quick ? "quick" : "full",
           "simulator", st.n_rated);
    printf("%-24s %d train, %d held-out pairs; prompt types chat / factual / sensitive\n", "preference pairs", st.n_train, st.n_test);
    printf("%-24s simulator: backbone features %d (responses), %d (prompts); hh/alpacaeval: hashed words+bigrams %d + 2 length\n", "features", SIM_D, SIM_DP, st.dim);
    printf("%-24s ridge per objective, no intercept, lambda grid 1e-4..1e4 by validation MSE (80/20, seed 42)\n", "stage 1");
    printf("%-24s penalties on the training pairs' responses, Spearman threshold %g\n", "verbosity", RWD_ARMO_CORR_THRESHOLD);
    printf("%-24s MLP 3 x %d ReLU (dropout 0.2), softmax over objectives / tau 10, beta learned; %d steps x %d pairs with replacement, AdamW 1e-3 cosine to 0\n",
           "stage 2 (gate)", st.gate_hidden, st.gate_steps, st.gate_batch);
    printf("%-24s the official 3 x 1024, batch 1024 would take hours on 2 cores; widths shrunk, the rest as the stage-2 script\n", "  (official)");
    printf("%-24s best-of-%d for %d chat prompts under theta in -45..75 degrees over (helpfulness, verbosity) stage-1 rewards\n", "dpa", st.n_cand, st.n_dpa);
    printf("%-24s %d (from %llu)\n%-24s %d\n", "seeds", st.seeds, (unsigned long long)st.seed, "threads", moe_num_threads());
    printf("%-24s %s\n", "shared data", st.data);
    fflush(stdout);
    {
        files_err fe;
        if (files_mkdirs("out", &fe) != 0) die(fe.msg, NULL);
    }
    csv_out = fopen("out/armo_dpa.csv", "w");
    if (csv_out) fprintf(csv_out, "seed,name,value\n");
    /* the real data */
    memset(&hh, 0, sizeof hh);
    memset(&A, 0, sizeof A);
    {
        char path[2400];
        files_reader r;
        FILE *f = open_data(&r, st.data, "preferences/hh-rlhf/helpful-base/test.jsonl.gz", path, sizeof path);
        moe_err e_;
        if (f) {
            if (rwd_hh_read(&hh, f, &e_) != MOE_OK) die("HH-RLHF", e_.msg);
            close_data(&r);
            have_hh = 1;
        } else {
            printf("armo_dpa: SKIP hh and alpacaeval: %s/preferences not found (run make data-preferences, or set MOE_SHARED_DATA or --data DIR to a folder holding preferences/)\n", st.data);
        }
    }
    if (have_hh) {
        rwd_featurizer fz = rwd_featurizer_default();
        fz.dim = st.dim;
        if (read_alpaca(&A, st.data, st.quick ? 3 : 11, &fz) == 0) have_alpaca = 1;
        else printf("armo_dpa: SKIP alpacaeval: the annotation files are not in %s/preferences/alpacaeval-bon-tulu2-13b\n", st.data);
    }
    for (si = 0; si < st.seeds; si++) {
        uint64_t seed = st.seed + (uint64_t)si;
        simulator(si, seed, &st);
        if (have_hh) real_signals(si, seed, &st, &hh, have_alpaca ? &A : NULL);
        fflush(stdout);
    }
    /* summary */
    {
        static const char *const acc_keys[6] = {"sim.acc.armo_gate", "sim.acc.armo_gate_raw", "sim.acc.fixed_mix", "sim.acc.single_bt", "sim.acc.uniform_mix", "sim.acc.true_utility"};
        static const char *const rec_keys[4] = {"sim.recovery.helpfulness", "sim.recovery.correctness", "sim.recovery.verbosity", "sim.recovery.safety"};
        static const char *const raw_keys[4] = {"sim.length_rho.raw.helpfulness", "sim.length_rho.raw.correctness", "sim.length_rho.raw.verbosity", "sim.length_rho.raw.safety"};
        static const char *const deb_keys[3] = {"sim.length_rho.debiased.helpfulness", "sim.length_rho.debiased.correctness", "sim.length_rho.debiased.safety"};
        static const char *const hv_keys[3] = {"sim.dpa.hv_directions", "sim.dpa.hv_scalar", "sim.dpa.front_points"};
        static const char *const hh_keys[5] = {"hh.penalty", "hh.acc_before", "hh.acc_after", "hh.length_rho_before", "hh.length_rho_after"};
        summary_line("data=sim accuracy", acc_keys, 6);
        summary_line("data=sim stage1_recovery", rec_keys, 4);
        summary_line("data=sim length_spearman_raw", raw_keys, 4);
        summary_line("data=sim length_spearman_debiased", deb_keys, 3);
        for (t = 0; t < N_TYPES; t++) {
            const char *keys[K];
            char buf[K][64], label[64];
            for (k = 0; k < K; k++) { snprintf(buf[k], 64, "sim.gate.%s.%s", type_name[t], obj_name[k]); keys[k] = buf[k]; }
            snprintf(label, sizeof label, "data=sim gate prompt_type=%s", type_name[t]);
            summary_line(label, keys, K);
        }
        for (q = 0; q < N_THETA; q++) {
            const char *keys[2];
            char buf[2][64], label[64];
            snprintf(buf[0], 64, "sim.dpa.theta%+03.0f.helpfulness", theta_deg[q]);
            snprintf(buf[1], 64, "sim.dpa.theta%+03.0f.length", theta_deg[q]);
            keys[0] = buf[0]; keys[1] = buf[1];
            snprintf(label, sizeof label, "data=sim dpa theta=%g", theta_deg[q]);
            summary_line(label, keys, 2);
        }
        summary_line("data=sim dpa", hv_keys, 3);
        if (have_hh) summary_line("data=hh verbosity_decorrelation", hh_keys, 5);
        if (have_alpaca) {
            for (q = 0; q < N_THETA; q++) {
                const char *keys[2];
                char buf[2][64], label[64];
                snprintf(buf[0], 64, "alpacaeval.theta%+03.0f.win_rate", theta_deg[q]);
                snprintf(buf[1], 64, "alpacaeval.theta%+03.0f.avg_length", theta_deg[q]);
                keys[0] = buf[0]; keys[1] = buf[1];
                snprintf(label, sizeof label, "data=alpacaeval dpa theta=%g", theta_deg[q]);
                summary_line(label, keys, 2);
            }
        }
    }
    if (csv_out) fclose(csv_out);
    /* plots */
    {
        plot_heatmap_opts ho;
        memset(&ho, 0, sizeof ho);
        ho.title = "mean gate weight per prompt type";
        ho.xlabel = "objective";
        ho.ylabel = "prompt type";
        ho.row_labels = type_name;
        ho.col_labels = obj_name;
        ho.annotate = 1;
        ho.cell = 90;
        if (plot_heatmap("out/armo_dpa_gates.png", &ho, &gate_mean_all[0][0], N_TYPES, K) != PLOT_OK) fprintf(stderr, "armo_dpa: could not write out/armo_dpa_gates.png\n");
    }
    for (k = 0; k < 2; k++) {
        static const char *const base_name[3] = {"random pick", "best of 16 by a single BT model", "best of 16 by ArmoRM"};
        static const unsigned base_color[3] = {0x7f7f7f, 0xd62728, 0x2ca02c};
        float xs[N_THETA], ys[N_THETA], bx[3], by[3];
        plot_series ser[4];
        plot_chart c;
        int b;
        int n_seeds = st.seeds;
        if (k == 1 && !have_alpaca_points) break;
        for (q = 0; q < N_THETA; q++) {
            xs[q] = ys[q] = 0.0f;
            for (si = 0; si < n_seeds; si++) {
                xs[q] += (k ? alpaca_points[si][q][0] : dpa_points[si][q][0]) / n_seeds;
                ys[q] += (k ? alpaca_points[si][q][1] : dpa_points[si][q][1]) / n_seeds;
            }
        }
        memset(ser, 0, sizeof ser);
        memset(&c, 0, sizeof c);
        ser[0].name = "best-of-n under theta = -45 .. 75 degrees";
        ser[0].x = xs; ser[0].y = ys; ser[0].n = N_THETA; ser[0].style = PLOT_LINE_POINTS; ser[0].color = 0x1f77b4;
        for (b = 0; b < 3 && k == 0; b++) {
            bx[b] = by[b] = 0.0f;
            for (si = 0; si < n_seeds; si++) { bx[b] += base_points[si][b][0] / n_seeds; by[b] += base_points[si][b][1] / n_seeds; }
            ser[1 + b].name = base_name[b]; ser[1 + b].x = bx + b; ser[1 + b].y = by + b; ser[1 + b].n = 1;
            ser[1 + b].style = PLOT_POINTS; ser[1 + b].color = base_color[b];
        }
        c.title = k ? "DPA directions on AlpacaEval (best of 11, GPT-4-turbo judge)" : "DPA directions on the simulator (best of 16)";
        c.xlabel = k ? "average length (code points)" : "length of the chosen response (code points)";
        c.ylabel = k ? "win rate vs gpt-3.5 reference (%)" : "true helpfulness of the chosen response";
        snprintf(key, sizeof key, "out/armo_dpa_%s.png", k ? "alpacaeval" : "front");
        if (plot_lines(key, &c, ser, k ? 1 : 4) != PLOT_OK) fprintf(stderr, "armo_dpa: could not write %s\n", key);
    }
    printf("wrote=out/armo_dpa.csv,out/armo_dpa_gates.png,out/armo_dpa_front.png%s\n", have_alpaca ? ",out/armo_dpa_alpacaeval.png" : "");
    rwd_text_pairs_free(&hh);
    free(A.pref); free(A.len); free(A.x);
    return 0;
}
