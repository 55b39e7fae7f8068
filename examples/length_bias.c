/* length_bias.c - length bias in reward models, and three ways to reduce it (reward.h, spec 1-2).

   Trains a vanilla Bradley-Terry reward model and a Product-of-Experts (PoE) reward model on
   hashed word features, calibrates the vanilla model's scores post hoc (RC-Mean, RC-LWR, the
   length penalty), and reports for each on held-out pairs: accuracy, accuracy on the pairs
   whose chosen answer is the shorter one, and the Spearman correlation of reward and length;
   on the simulator also the agreement with the true quality.

   Data:
   - the built-in simulator (default, no download): responses are strings of pseudo-words;
     each has a hidden true quality z that tilts its words toward "good" or "bad" ones, and a
     length. Simulated humans prefer a over b with probability
     sigmoid(z_a - z_b + bias * (log len_a - log len_b)); --bias sets the length bias.
   - real HH-RLHF pairs: --hh FILE (.jsonl or .jsonl.gz, e.g. the helpful-base test split;
     see README: github.com/anthropics/hh-rlhf, or the project's shared/data/preferences),
     split 80/20 with a fixed seed.

       build/examples/length_bias [--quick] [--bias 1.5] [--pairs 8000] [--hh FILE] [--seed 1]

   Prints a settings table, then one key=value line per (data, method); writes
   out/length_bias_<data>.csv (per held-out response) and out/length_bias_<data>.png (reward
   against length with LOWESS curves: vanilla, RC-LWR calibrated, PoE). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_featurize_pairs, rwd_head_*, rwd_bt_train, rwd_poe_train, rwd_calibrate_pairs, metrics */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines */
#include "files.h" /* defines: files_open_read, files_close_read */
#include "flags.h" /* defines: flag_*, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

typedef struct settings {
    int quick, pairs, dim, epochs;
    double bias;
    uint64_t seed;
    const char *hh;
} settings;

/* ---- the simulator ------------------------------------------------------------------------ */

enum { SIM_GOOD = 150, SIM_BAD = 150, SIM_NEUTRAL = 400 };

static void sim_word(char *out, int id) { /* a pronounceable pseudo-word per id */
    static const char *const syl[16] = {"ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "je", "pu", "ze"};
    int k = 0;
    out[0] = 0;
    do {
        strcat(out, syl[(id + 7 * k) % 16]);
        id /= 16;
        k++;
    } while (id > 0 || k < 2);
}

/* a response of n words whose true quality z tilts it toward good words */
static char *sim_response(moe_rng *rng, double z, int n) {
    char *s = (char *)malloc((size_t)n * 16 + 1), w[16];
    int i;
    s[0] = 0;
    for (i = 0; i < n; i++) {
        double u = moe_rng_uniform(rng);
        int id;
        if (u < 0.5) id = SIM_GOOD + SIM_BAD + moe_rng_below(rng, SIM_NEUTRAL); /* filler */
        else if (moe_rng_uniform(rng) < 1.0 / (1.0 + exp(-1.5 * z))) id = moe_rng_below(rng, SIM_GOOD);
        else id = SIM_GOOD + moe_rng_below(rng, SIM_BAD);
        sim_word(w, id);
        if (i) strcat(s, " ");
        strcat(s, w);
    }
    return s;
}

/* n simulated pairs, labelled by biased humans; zw, zl get the true qualities */
static void sim_pairs(rwd_text_pairs *p, double *zw, double *zl, int n, double bias, moe_rng *rng) {
    int i;
    moe_err err;
    for (i = 0; i < n; i++) {
        double za = moe_rng_normal(rng), zb = moe_rng_normal(rng);
        int la = 4 + (int)floor(exp(3.0 + 0.6 * moe_rng_normal(rng))), lb = 4 + (int)floor(exp(3.0 + 0.6 * moe_rng_normal(rng)));
        char *a = sim_response(rng, za, la), *b = sim_response(rng, zb, lb), prompt[32];
        double pa = 1.0 / (1.0 + exp(-((za - zb) + bias * (log((double)la) - log((double)lb)))));
        int a_wins = moe_rng_uniform(rng) < pa;
        snprintf(prompt, sizeof prompt, "question %d", i);
        rwd_text_pairs_add(p, prompt, strlen(prompt), a_wins ? a : b, strlen(a_wins ? a : b), a_wins ? b : a, strlen(a_wins ? b : a), &err);
        zw[i] = a_wins ? za : zb;
        zl[i] = a_wins ? zb : za;
        free(a);
        free(b);
    }
}

/* ---- HH-RLHF ------------------------------------------------------------------------------ */

static int read_hh(rwd_text_pairs *p, const char *path) {
    files_reader r;
    files_err fe;
    moe_err err;
    moe_status st;
    FILE *f = files_open_read(&r, path, &fe); /* .gz through a gzip child, no shell */
    if (!f) { fprintf(stderr, "length_bias: %s\n", fe.msg); return 1; }
    st = rwd_hh_read(p, f, &err);
    /* gzip's exit status: a truncated archive must not pass as a shorter data set */
    if (files_close_read(&r, &fe) != 0) { fprintf(stderr, "length_bias: %s\n", fe.msg); return 1; }
    if (st != MOE_OK) { fprintf(stderr, "length_bias: %s: %s\n", path, err.msg); return 1; }
    return 0;
}

/* ---- one experiment ----------------------------------------------------------------------- */

typedef struct result { double acc, acc_short, rho_len, agree; } result;

static result evaluate(const double *sw, const double *sl, const double *lw, const double *ll, const double *zw, const double *zl, size_t n) {
    result r;
    size_t m, i, ok = 0;
    r.acc = rwd_pair_accuracy(sw, sl, n);
    r.acc_short = rwd_shorter_chosen_accuracy(sw, sl, lw, ll, n, &m);
    r.rho_len = rwd_length_correlation(sw, sl, lw, ll, n);
    r.agree = NAN;
    if (zw) { /* does the model rank the truly better response higher? */
        for (i = 0; i < n; i++) ok += (sw[i] > sl[i]) == (zw[i] > zl[i]);
        r.agree = (double)ok / (double)n;
    }
    return r;
}

/* a linear head with a fresh store (zero weights: BT on a linear head is convex) */
static void new_head(rwd_head *h, moe_store *s, int d) {
    rwd_head_config hc = rwd_head_config_default();
    moe_err err;
    hc.d_in = d;
    hc.max_rows = 128;
    moe_store_init(s);
    if (rwd_head_init(h, &hc, s, "rm.", &err) != MOE_OK || moe_store_alloc(s, 1) != MOE_OK) {
        fprintf(stderr, "length_bias: %s\n", err.msg);
        exit(1);
    }
}

/* reward against length for three scorers, standardised so they share one axis, each with
   its LOWESS curve (rwd_lwr_fit: the fit at every distinct length, in order) */
static void plot_three(const char *path, const char *title, const double *len, const double *const *r, const char *const *names, size_t m) {
    static const unsigned colors[3] = {0xd62728, 0x1f77b4, 0x2ca02c};
    plot_series s[6];
    plot_chart c;
    float *buf = (float *)malloc(12 * m * sizeof(float) + 1);
    double *lx = (double *)malloc(m * sizeof(double));
    size_t i;
    moe_err err;
    int k;
    if (!buf || !lx) { free(buf); free(lx); return; }
    memset(s, 0, sizeof s);
    memset(&c, 0, sizeof c);
    for (i = 0; i < m; i++) lx[i] = len[i];
    for (k = 0; k < 3; k++) {
        float *x = buf + (size_t)4 * k * m, *y = x + m, *fx = y + m, *fy = fx + m;
        double mean = 0.0, sd = 0.0;
        rwd_lwr curve;
        for (i = 0; i < m; i++) mean += r[k][i];
        mean /= (double)m;
        for (i = 0; i < m; i++) sd += (r[k][i] - mean) * (r[k][i] - mean);
        sd = sqrt(sd / (double)m) + 1e-12;
        for (i = 0; i < m; i++) { x[i] = (float)lx[i]; y[i] = (float)((r[k][i] - mean) / sd); }
        s[2 * k].name = names[k]; s[2 * k].x = x; s[2 * k].y = y; s[2 * k].n = (int)m;
        s[2 * k].style = PLOT_POINTS; s[2 * k].color = colors[k];
        if (rwd_lwr_fit(&curve, lx, r[k], m, 0.3, 3, &err) != MOE_OK) continue;
        for (i = 0; i < curve.n; i++) { fx[i] = (float)curve.x[i]; fy[i] = (float)((curve.fit[i] - mean) / sd); }
        s[2 * k + 1].x = fx; s[2 * k + 1].y = fy; s[2 * k + 1].n = (int)curve.n; s[2 * k + 1].color = colors[k];
        rwd_lwr_free(&curve);
    }
    c.title = title;
    c.xlabel = "length (code points)";
    c.ylabel = "reward (standardised) and LOWESS";
    if (plot_lines(path, &c, s, 6) != PLOT_OK) fprintf(stderr, "length_bias: could not write %s\n", path);
    free(buf);
    free(lx);
}

static void experiment(const char *name, rwd_text_pairs *train, rwd_text_pairs *test, const double *zw, const double *zl, const settings *st) {
    rwd_featurizer fz = rwd_featurizer_default();
    rwd_train_config tc = rwd_train_config_default();
    rwd_cal_config cc = rwd_cal_config_default();
    size_t ntr = train->n, nte = test->n, i;
    int d, k;
    float *xtr_w, *xtr_l, *xte_w, *xte_l, *ltr_w, *ltr_l;
    double *len = (double *)malloc(2 * nte * sizeof(double)), *lw = len, *ll = len + nte;
    double *sc = (double *)malloc(14 * nte * sizeof(double));
    static const char *const methods[7] = {"vanilla", "poe", "poe_length_only", "rc_mean", "rc_lwr", "penalty", "penalty_lwr"};
    rwd_head hv, hm, hb;
    moe_store sv, sm, sb;
    rwd_train_stats ts;
    moe_err err;
    char path[256];
    FILE *csv;
    fz.dim = st->dim;
    d = rwd_featurizer_width(&fz);
    xtr_w = (float *)malloc(2 * ntr * (size_t)d * sizeof(float));
    xtr_l = xtr_w + ntr * (size_t)d;
    xte_w = (float *)malloc(2 * nte * (size_t)d * sizeof(float));
    xte_l = xte_w + nte * (size_t)d;
    ltr_w = (float *)malloc(4 * ntr * sizeof(float));
    ltr_l = ltr_w + 2 * ntr;
    if (!xtr_w || !xte_w || !ltr_w || !len || !sc) { fprintf(stderr, "length_bias: out of memory\n"); exit(1); }
    rwd_featurize_pairs(xtr_w, xtr_l, NULL, NULL, &fz, train, &err);
    rwd_featurize_pairs(xte_w, xte_l, lw, ll, &fz, test, &err);
    for (i = 0; i < ntr; i++) { /* the length features alone, for the length-only bias expert */
        memcpy(ltr_w + 2 * i, xtr_w + (i + 1) * (size_t)d - 2, 2 * sizeof(float));
        memcpy(ltr_l + 2 * i, xtr_l + (i + 1) * (size_t)d - 2, 2 * sizeof(float));
    }
    tc.epochs = st->epochs;
    tc.seed = st->seed;
    tc.noise_cols = fz.dim; /* noise on the hashed words; the length features stay clean */
    /* vanilla BT */
    new_head(&hv, &sv, d);
    if (rwd_bt_train(&hv, &sv, xtr_w, xtr_l, NULL, ntr, &tc, &ts, &err) != MOE_OK) { fprintf(stderr, "length_bias: %s\n", err.msg); exit(1); }
    printf("data=%s model=vanilla train_loss=%.4f train_acc=%.4f steps=%lld\n", name, ts.loss, ts.accuracy, ts.steps);
    rwd_head_score(&hv, &sv, sc, xte_w, nte);
    rwd_head_score(&hv, &sv, sc + nte, xte_l, nte);
    /* PoE, bias expert on the same (noisy) features, and the length-only ablation */
    for (k = 0; k < 2; k++) {
        rwd_head_config bc = rwd_head_config_default();
        new_head(&hm, &sm, d);
        bc.d_in = k ? 2 : d;
        bc.max_rows = 128;
        moe_store_init(&sb);
        rwd_head_init(&hb, &bc, &sb, "bias.", &err);
        moe_store_alloc(&sb, 1);
        if (rwd_poe_train(&hm, &sm, &hb, &sb, xtr_w, xtr_l, k ? ltr_w : xtr_w, k ? ltr_l : xtr_l, ntr, &tc, &ts, &err) != MOE_OK) {
            fprintf(stderr, "length_bias: %s\n", err.msg);
            exit(1);
        }
        printf("data=%s model=%s train_loss=%.4f train_acc=%.4f (product of experts)\n", name, methods[1 + k], ts.loss, ts.accuracy);
        rwd_head_score(&hm, &sm, sc + (size_t)(2 + 2 * k) * nte, xte_w, nte);
        rwd_head_score(&hm, &sm, sc + (size_t)(3 + 2 * k) * nte, xte_l, nte);
        rwd_head_free(&hm); moe_store_free(&sm);
        rwd_head_free(&hb); moe_store_free(&sb);
    }
    /* post-hoc calibration of the vanilla scores on the held-out pairs (pooled) */
    {
        static const int cal[4] = {RWD_CAL_MEAN, RWD_CAL_LWR, RWD_CAL_PENALTY, RWD_CAL_PENALTY_LWR};
        for (k = 0; k < 4; k++) {
            cc.method = cal[k];
            cc.seed = st->seed;
            if (rwd_calibrate_pairs(sc + (size_t)(6 + 2 * k) * nte, sc + (size_t)(7 + 2 * k) * nte, sc, sc + nte, lw, ll, NULL, NULL, nte, &cc, &err) != MOE_OK) {
                fprintf(stderr, "length_bias: %s\n", err.msg);
                exit(1);
            }
        }
    }
    for (k = 0; k < 7; k++) {
        result r = evaluate(sc + (size_t)2 * k * nte, sc + (size_t)(2 * k + 1) * nte, lw, ll, zw, zl, nte);
        printf("data=%s method=%s acc=%.4f acc_shorter_chosen=%.4f length_spearman=%.4f", name, methods[k], r.acc, r.acc_short, r.rho_len);
        if (zw) printf(" true_quality_agreement=%.4f", r.agree);
        printf(" preference_changed=%.4f\n", rwd_preference_changed(sc, sc + nte, sc + (size_t)2 * k * nte, sc + (size_t)(2 * k + 1) * nte, nte));
    }
    {
        double base = rwd_longer_wins_accuracy(lw, ll, nte);
        printf("data=%s method=longer_wins acc=%.4f test_pairs=%zu train_pairs=%zu\n", name, base, nte, ntr);
    }
    /* CSV per held-out response, PNG of reward vs length */
    snprintf(path, sizeof path, "out/length_bias_%s.csv", name);
    csv = fopen(path, "w");
    if (csv) {
        fprintf(csv, "pair,side,length,vanilla,poe,rc_lwr%s\n", zw ? ",true_quality" : "");
        for (i = 0; i < 2 * nte; i++) {
            fprintf(csv, "%zu,%s,%.0f,%.6g,%.6g,%.6g", i % nte, i < nte ? "chosen" : "rejected", len[i], sc[i], sc[2 * nte + i], sc[8 * nte + i]);
            if (zw) fprintf(csv, ",%.6g", i < nte ? zw[i] : zl[i - nte]);
            fprintf(csv, "\n");
        }
        fclose(csv);
    }
    {
        const double *r3[3];
        static const char *const names[3] = {"vanilla BT", "vanilla + RC-LWR", "PoE main expert"};
        char title[128];
        r3[0] = sc; r3[1] = sc + 8 * nte; r3[2] = sc + 2 * nte;
        snprintf(path, sizeof path, "out/length_bias_%s.png", name);
        snprintf(title, sizeof title, "reward vs length, %s (held-out responses)", name);
        plot_three(path, title, len, r3, names, 2 * nte);
    }
    printf("data=%s wrote=out/length_bias_%s.csv,out/length_bias_%s.png\n", name, name, name);
    rwd_head_free(&hv); moe_store_free(&sv);
    free(xtr_w); free(xte_w); free(ltr_w); free(len); free(sc);
}

/* the first `first` pairs of a shuffled copy go to a, the rest to b */
static void split_pairs(const rwd_text_pairs *p, rwd_text_pairs *a, rwd_text_pairs *b, size_t first, uint64_t seed) {
    size_t *perm = (size_t *)malloc(p->n * sizeof(size_t)), i;
    moe_rng rng;
    moe_err err;
    moe_rng_seed(&rng, seed);
    for (i = 0; i < p->n; i++) perm[i] = i;
    for (i = p->n - 1; i > 0; i--) {
        size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
        perm[i] = perm[j]; perm[j] = t;
    }
    for (i = 0; i < p->n; i++) {
        size_t q = perm[i];
        rwd_text_pairs_add(i < first ? a : b, p->prompt[q], strlen(p->prompt[q]), p->chosen[q], strlen(p->chosen[q]), p->rejected[q], strlen(p->rejected[q]), &err);
    }
    free(perm);
}

static const char *const about =
    "Trains a vanilla Bradley-Terry reward model and a Product-of-Experts reward model on hashed word\n"
    "features, calibrates the vanilla scores post hoc (RC-Mean, RC-LWR, length penalty), and reports\n"
    "accuracy, accuracy where the chosen answer is shorter, and the reward-length Spearman correlation\n"
    "on held-out pairs. Data: a built-in simulator (no download; --bias sets its length bias), and with\n"
    "--hh real HH-RLHF pairs: JSON lines {\"chosen\": \"...\", \"rejected\": \"...\"} whose strings are dialogues\n"
    "(\"\\n\\nHuman: ...\\n\\nAssistant: ...\"), at least 10 (.gz is read through gzip). Writes\n"
    "out/length_bias_<data>.csv and out/length_bias_<data>.png.";

int main(int argc, char **argv) {
    settings st;
    rwd_text_pairs hh;
    int seed = 1;
    memset(&st, 0, sizeof st);
    st.bias = 1.5;
    st.seed = 1;
    st.pairs = -1;
    {
        flag fl[5];
        flags_program p;
        int rc;
        fl[0] = flag_double("--bias", &st.bias, -100, 100, "the simulated humans' length bias (log-length coefficient)");
        fl[1] = flag_default(flag_int("--pairs", &st.pairs, 50, 1e7, "simulated pairs"), "10000; 3000 with --quick");
        fl[2] = flag_int("--seed", &seed, 0, 2147483647, "simulator, training and split");
        fl[3] = flag_string("--hh", &st.hh, "FILE", "HH-RLHF pairs, .jsonl or .jsonl.gz (split 80/20)");
        fl[4] = flag_switch("--quick", &st.quick, "fewer pairs, features and epochs");
        p = flags_program_make("length_bias", "length bias in reward models, and three ways to reduce it", about, fl, 5);
        rc = flags_parse(&p, argc, argv);
        if (rc != FLAGS_RUN) return rc;
        st.seed = (uint64_t)seed;
    }
    if (st.pairs < 0) st.pairs = st.quick ? 3000 : 10000;
    st.dim = st.quick ? 2048 : 4096;
    st.epochs = st.quick ? 4 : 8;
    printf("%-22s %s\n%-22s %d (80%% train, 20%% held out)\n%-22s %g\n%-22s %d hashed + 2 length\n%-22s %d\n%-22s %llu\n%-22s %d\n%-22s %s\n",
           "mode", st.quick ? "quick" : "full", "simulated pairs", st.pairs, "length bias", st.bias, "features", st.dim, "epochs", st.epochs,
           "seed", (unsigned long long)st.seed, "threads", moe_num_threads(), "hh-rlhf", st.hh ? st.hh : "(not given: --hh FILE)");
    printf("%-22s %s\n", "models", "linear BT head; PoE: linear main + linear bias expert (noise 0.1 on the hashed words, length clean; bias lr 1e-2)");
    {
        files_err fe;
        if (files_mkdirs("out", &fe) != 0) { fprintf(stderr, "length_bias: %s\n", fe.msg); return 1; }
    }
    memset(&hh, 0, sizeof hh);
    if (st.hh) { /* read before the simulator runs: a bad file fails at once */
        if (read_hh(&hh, st.hh)) return 1;
        if (hh.n < 10) {
            fprintf(stderr, "length_bias: '%s' holds %zu preference pairs; the 80/20 split needs at least 10\n", st.hh, hh.n);
            rwd_text_pairs_free(&hh);
            return 1;
        }
    }
    {
        rwd_text_pairs all, tr, te;
        double *zw = (double *)malloc(2 * (size_t)st.pairs * sizeof(double)), *zl = zw + st.pairs;
        moe_rng rng;
        int ntr = st.pairs * 4 / 5;
        memset(&all, 0, sizeof all);
        moe_rng_seed(&rng, st.seed);
        sim_pairs(&all, zw, zl, st.pairs, st.bias, &rng);
        /* the simulator's pairs are i.i.d.: the first 80% train, the rest are held out */
        memset(&tr, 0, sizeof tr);
        memset(&te, 0, sizeof te);
        tr = all;
        tr.n = (size_t)ntr;
        te.prompt = all.prompt + ntr; te.chosen = all.chosen + ntr; te.rejected = all.rejected + ntr;
        te.n = all.n - (size_t)ntr;
        experiment("sim", &tr, &te, zw + ntr, zl + ntr, &st);
        rwd_text_pairs_free(&all);
        free(zw);
    }
    if (st.hh) {
        rwd_text_pairs tr, te;
        memset(&tr, 0, sizeof tr);
        memset(&te, 0, sizeof te);
        split_pairs(&hh, &tr, &te, hh.n * 4 / 5, st.seed);
        experiment("hh", &tr, &te, NULL, NULL, &st);
        rwd_text_pairs_free(&hh); rwd_text_pairs_free(&tr); rwd_text_pairs_free(&te);
    }
    return 0;
}
