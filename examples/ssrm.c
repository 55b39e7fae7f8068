/* ssrm.c - semi-supervised reward modelling (SSRM, arXiv 2409.06903): a simulator and real
   human preferences.

   sim: pairs of 32-dim feature rows whose preference follows a hidden linear reward through a
   Bradley-Terry draw (no download): the setting where a linear head is the right model.
   hh:  HH-RLHF test pairs (the helpful splits by default) are pooled, featurized with reward.h's
   hashed word/bigram features, and split per seed 80/20 into a training pool and held-out
   pairs. A fraction of the pool keeps its labels; the rest is unlabelled (its labels are kept
   aside only to measure the pseudo-labels). For each labelled fraction and seed:
     supervised  a Bradley-Terry head trained on the labelled pairs only (SSRM's round 0)
     ssrm r1..R  rounds of: pseudo-label the unlabelled pairs, keep those with confidence
                 max(P, 1 - P) > threshold, continue training on labelled + kept
     control     the same rounds of training on the labelled pairs alone (threshold 1: no
                 pseudo-label passes), so a gain is the pseudo-labels', not the extra training's
     full        the head trained on the whole pool with its true labels (the 100% row)
   Both data sets go through the same loop. The paper's claim: SSRM improves a reward model trained on few labels without more labelling,
   and approaches one trained on the full labelled data.

   Data: --data DIR, else $MOE_SHARED_DATA, else data/ (make data-preferences), else ../shared/data, holding
   preferences/hh-rlhf/<split>/test.jsonl.gz (github.com/anthropics/hh-rlhf); without it the
   program runs the simulator only and says so (SKIP).

       build/examples/ssrm [--quick] [--seeds 10] [--fractions 0.01,0.02,0.05,0.1,1]
           [--rounds 3] [--threshold 0.8] [--head linear|mlp] [--dim 4096] [--epochs 8] [--min-steps 300]
           [--splits helpful-base,helpful-online,helpful-rejection-sampled] [--code-order]
           [--data DIR] [--seed 1] [--sim-pairs 5000]        (--help lists them with their ranges)

   --code-order trains the kept pairs with their true order, as the released script does.
   Prints a settings table, one key=value line per (seed, fraction, round) and a summary line
   per (data, fraction) (mean and standard deviation over seeds); writes out/ssrm.csv and
   out/ssrm_<data>.png (held-out accuracy against the labelled fraction). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: rwd_hh_read, rwd_featurize_pairs, rwd_head_*, rwd_bt_train, rwd_ssrm_* */
#define PLOT_IMPLEMENTATION
#include "plot.h" /* defines: plot_lines */
#include "files.h" /* defines: files_open_read, files_close_read, files_mkdirs */
#include "flags.h" /* defines: flag_*, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_FRACS 16
#define MAX_ROUNDS 8

typedef struct settings {
    int quick, seeds, rounds, dim, epochs, min_steps, mlp, code_order, n_fracs, sim_pairs;
    double threshold, fracs[MAX_FRACS];
    uint64_t seed;
    const char *data, *splits;
} settings;

static int die(const char *msg, const char *detail) {
    fprintf(stderr, "ssrm: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* ---- data ---- */

/* 1 when the split's file is absent (the caller skips HH-RLHF); any other problem ends the run */
static int read_split(rwd_text_pairs *p, const char *root, const char *split) {
    char path[2048];
    files_reader r;
    files_err fe;
    FILE *f;
    moe_err err;
    moe_status st;
    struct stat sb;
    snprintf(path, sizeof path, "%s/preferences/hh-rlhf/%s/test.jsonl.gz", root, split);
    if (stat(path, &sb) != 0) return 1;
    f = files_open_read(&r, path, &fe); /* through a gzip child, no shell */
    if (!f) die(fe.msg, NULL);
    st = rwd_hh_read(p, f, &err);
    /* gzip's exit status: a truncated archive must not pass as a shorter data set */
    if (files_close_read(&r, &fe) != 0) die(fe.msg, NULL);
    if (st != MOE_OK) die(path, err.msg);
    return 0;
}

/* ---- one run ---- */

typedef struct run_ctx {
    rwd_pair_model *pm;
    const size_t *test;
    const unsigned char *truth;
    size_t n;
    double *p;
} run_ctx;

static double held_out_accuracy(void *ctx) {
    run_ctx *e = (run_ctx *)ctx;
    moe_err err;
    size_t i, ok = 0;
    if (e->pm->prob(e->pm->ctx, e->p, e->test, e->n, &err) != MOE_OK) die("scoring failed", err.msg);
    for (i = 0; i < e->n; i++) ok += (e->p[i] > 0.5) == (e->truth[i] != 0); /* a tie (0.5) is wrong */
    return (double)ok / (double)e->n;
}

typedef struct pool {
    const float *xa, *xb;     /* (n, d) the two sides of every pair, side a chosen when a_wins */
    const unsigned char *a_wins;
    size_t n;
    int d;
} pool;

/* supervised (stats[0]) and SSRM rounds (stats[1..]) for one labelled set; rounds = 0: only
   supervised training */
static void run(rwd_ssrm_round *stats, const pool *P, const size_t *lab, size_t n_lab, const size_t *unl, size_t n_unl,
                const size_t *test, size_t n_test, const settings *st, uint64_t seed, double threshold) {
    rwd_head_config hc = rwd_head_config_default();
    rwd_ssrm_config sc = rwd_ssrm_config_default();
    rwd_head h;
    moe_store s;
    rwd_ssrm_head sh;
    rwd_pair_model pm;
    run_ctx ec;
    moe_rng rng;
    moe_err err;
    unsigned char *lab_wins = (unsigned char *)malloc(n_lab + n_unl + n_test + 1), *unl_truth = lab_wins + n_lab, *test_truth = unl_truth + n_unl;
    double *pbuf = (double *)malloc(n_test * sizeof(double));
    size_t i;
    if (!lab_wins || !pbuf) die("out of memory", NULL);
    for (i = 0; i < n_lab; i++) lab_wins[i] = P->a_wins[lab[i]];
    for (i = 0; i < n_unl; i++) unl_truth[i] = P->a_wins[unl[i]];
    for (i = 0; i < n_test; i++) test_truth[i] = P->a_wins[test[i]];
    hc.kind = st->mlp ? RWD_HEAD_MLP : RWD_HEAD_LINEAR;
    hc.d_in = P->d;
    hc.d_hidden = 32;
    hc.max_rows = 256;
    moe_store_init(&s);
    if (rwd_head_init(&h, &hc, &s, "rm.", &err) != MOE_OK || moe_store_alloc(&s, 1) != MOE_OK) die("head", err.msg);
    moe_rng_seed(&rng, seed);
    if (st->mlp) rwd_head_init_weights(&h, &s, &rng); /* linear: from zero (BT on a linear head is convex) */
    memset(&sh, 0, sizeof sh);
    sh.head = &h; sh.store = &s; sh.x_a = P->xa; sh.x_b = P->xb; sh.n = P->n;
    sh.tc = rwd_train_config_default();
    sh.tc.epochs = st->epochs;
    sh.tc.batch = 32;
    sh.tc.seed = seed;
    sh.min_steps = st->min_steps;
    pm = rwd_ssrm_head_model(&sh);
    ec.pm = &pm; ec.test = test; ec.truth = test_truth; ec.n = n_test; ec.p = pbuf;
    pm.evaluate = held_out_accuracy;
    pm.eval_ctx = &ec;
    if (n_unl == 0) { /* every label known: supervised only */
        if (pm.train(pm.ctx, lab, lab_wins, n_lab, 0, &err) != MOE_OK) die("training", err.msg);
        memset(stats, 0, sizeof *stats);
        stats[0].trained = n_lab;
        stats[0].eval = held_out_accuracy(&ec);
        stats[0].pseudo_accuracy = stats[0].kept_accuracy = stats[0].mean_confidence = NAN;
    } else {
        sc.rounds = st->rounds;
        sc.threshold = threshold;
        sc.keep_true_order = st->code_order;
        if (rwd_ssrm_run(&pm, lab, lab_wins, n_lab, unl, unl_truth, n_unl, &sc, stats, &err) != MOE_OK) die("SSRM", err.msg);
    }
    rwd_ssrm_head_free(&sh);
    rwd_head_free(&h);
    moe_store_free(&s);
    free(lab_wins);
    free(pbuf);
}

static void mean_sd(const double *v, int n, double *mean, double *sd) {
    double m = 0.0, s = 0.0;
    int i;
    for (i = 0; i < n; i++) m += v[i];
    m /= n;
    for (i = 0; i < n; i++) s += (v[i] - m) * (v[i] - m);
    *mean = m;
    *sd = n > 1 ? sqrt(s / (n - 1)) : 0.0;
}

/* "0.01,0.02,1": every value a number in (0, 1], at most MAX_FRACS of them; 0, or -1 after
   saying why on stderr */
static int parse_fracs(settings *st, const char *s) {
    char buf[256], *tok;
    if (strlen(s) >= sizeof buf) { fprintf(stderr, "ssrm: --fractions: the list is too long\n"); return -1; }
    snprintf(buf, sizeof buf, "%s", s);
    st->n_fracs = 0;
    for (tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        char *end = NULL;
        double f = strtod(tok, &end);
        if (end == tok || *end != 0 || !(f > 0.0 && f <= 1.0)) {
            fprintf(stderr, "ssrm: every --fractions value must be a number in (0, 1], not '%s'\n", tok);
            return -1;
        }
        if (st->n_fracs == MAX_FRACS) { fprintf(stderr, "ssrm: --fractions takes at most %d values\n", MAX_FRACS); return -1; }
        st->fracs[st->n_fracs++] = f;
    }
    if (st->n_fracs == 0) { fprintf(stderr, "ssrm: --fractions needs at least one value, not '%s'\n", s); return -1; }
    return 0;
}

/* seeds x fractions on one pool of pairs: key=value lines, CSV rows, summary lines, a plot */
static void experiment(const char *name, const float *xa, const float *xb, const unsigned char *a_wins, size_t n, int d,
                       const settings *st, FILE *csv) {
    double (*acc)[MAX_ROUNDS + 1] = (double(*)[MAX_ROUNDS + 1])calloc((size_t)st->seeds * (size_t)st->n_fracs, sizeof *acc);
    double *ctrl = (double *)calloc((size_t)st->seeds * (size_t)st->n_fracs, sizeof(double));
    double *full = (double *)calloc((size_t)st->seeds, sizeof(double));
    size_t *perm = (size_t *)malloc(n * sizeof(size_t)), i;
    int s, f, r, k, have_full = 0;
    char path[128], title[128], label[96];
    if (!acc || !ctrl || !full || !perm) die("out of memory", NULL);
    for (s = 0; s < st->seeds; s++) {
        uint64_t seed = st->seed + (uint64_t)s;
        size_t n_pool = n * 4 / 5, n_test = n - n_pool;
        pool P;
        moe_rng rng;
        P.xa = xa; P.xb = xb; P.a_wins = a_wins; P.n = n; P.d = d;
        moe_rng_seed(&rng, 1000 + seed);
        for (i = 0; i < n; i++) perm[i] = i;
        for (i = n - 1; i > 0; i--) {
            size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), tt = perm[i];
            perm[i] = perm[j]; perm[j] = tt;
        }
        for (f = 0; f < st->n_fracs; f++) {
            size_t n_lab = (size_t)ceil(st->fracs[f] * (double)n_pool);
            rwd_ssrm_round stats[MAX_ROUNDS + 1], control[MAX_ROUNDS + 1];
            int rounds;
            if (n_lab < 2) n_lab = 2;
            if (n_lab > n_pool) n_lab = n_pool;
            rounds = n_lab < n_pool ? st->rounds : 0;
            /* the labelled set is the pool's first n_lab pairs: a larger fraction extends a smaller one */
            run(stats, &P, perm, n_lab, perm + n_lab, n_pool - n_lab, perm + n_pool, n_test, st, seed, st->threshold);
            if (rounds > 0) { /* the control: the same rounds of training, threshold 1 keeps no pseudo-label */
                run(control, &P, perm, n_lab, perm + n_lab, n_pool - n_lab, perm + n_pool, n_test, st, seed, 1.0);
                ctrl[s * st->n_fracs + f] = control[rounds].eval;
            }
            for (r = 0; r <= rounds; r++) {
                acc[s * st->n_fracs + f][r] = stats[r].eval;
                printf("data=%s seed=%llu fraction=%g labelled=%zu round=%d acc=%.4f trained=%zu kept=%zu kept_fraction=%.4f mean_confidence=%.4f pseudo_acc=%.4f kept_acc=%.4f\n",
                       name, (unsigned long long)seed, st->fracs[f], n_lab, r, stats[r].eval, stats[r].trained, stats[r].kept, stats[r].kept_fraction,
                       stats[r].mean_confidence, stats[r].pseudo_accuracy, stats[r].kept_accuracy);
                if (csv) fprintf(csv, "%s,%llu,%g,%zu,%d,%.6f,%zu,%zu,%.6f,%.6f,%.6f,%.6f\n", name, (unsigned long long)seed, st->fracs[f], n_lab, r, stats[r].eval,
                                 stats[r].trained, stats[r].kept, stats[r].kept_fraction, stats[r].mean_confidence, stats[r].pseudo_accuracy, stats[r].kept_accuracy);
            }
            if (rounds > 0)
                printf("data=%s seed=%llu fraction=%g labelled=%zu control=labelled_only_same_rounds acc=%.4f\n", name, (unsigned long long)seed,
                       st->fracs[f], n_lab, control[rounds].eval);
            if (rounds == 0) { full[s] = stats[0].eval; have_full = 1; }
        }
        fflush(stdout);
    }
    {
        float xs[MAX_FRACS], ys[4][MAX_FRACS], yc[MAX_FRACS], fx[2], fy[2];
        plot_series ser[6];
        plot_chart c;
        static const char *const names[4] = {"supervised (labelled only)", "SSRM round 1", "SSRM round 2", "SSRM round 3"};
        double m, sd, v[256];
        int n_series = st->rounds < 3 ? st->rounds + 1 : 4;
        for (f = 0; f < st->n_fracs; f++) {
            int partial = st->fracs[f] < 1.0;
            xs[f] = (float)log10(100.0 * st->fracs[f]);
            printf("summary data=%s fraction=%g", name, st->fracs[f]);
            for (r = 0; r <= (partial ? st->rounds : 0); r++) {
                for (s = 0; s < st->seeds && s < 256; s++) v[s] = acc[s * st->n_fracs + f][r];
                mean_sd(v, st->seeds < 256 ? st->seeds : 256, &m, &sd);
                if (r < 4) ys[r][f] = (float)m;
                if (r == 0) printf(" supervised=%.4f supervised_sd=%.4f", m, sd);
                else printf(" ssrm_r%d=%.4f ssrm_r%d_sd=%.4f", r, m, r, sd);
            }
            if (partial && st->rounds > 0) { /* paired over seeds: the same labelled set and training, with and without pseudo-labels */
                int wins = 0;
                for (s = 0; s < st->seeds && s < 256; s++) v[s] = ctrl[s * st->n_fracs + f];
                mean_sd(v, st->seeds < 256 ? st->seeds : 256, &m, &sd);
                printf(" control=%.4f control_sd=%.4f", m, sd);
                for (s = 0; s < st->seeds && s < 256; s++) {
                    v[s] = acc[s * st->n_fracs + f][st->rounds] - ctrl[s * st->n_fracs + f];
                    wins += v[s] > 0.0;
                }
                mean_sd(v, st->seeds < 256 ? st->seeds : 256, &m, &sd);
                printf(" gain_r%d=%+.4f gain_sd=%.4f ssrm_beats_control=%d/%d", st->rounds, m, sd, wins, st->seeds);
            } else {
                for (r = 1; r < 4; r++) ys[r][f] = NAN;
            }
            printf("\n");
        }
        memset(ser, 0, sizeof ser);
        memset(&c, 0, sizeof c);
        for (k = 0; k < n_series; k++) {
            ser[k].name = names[k]; ser[k].x = xs; ser[k].y = ys[k]; ser[k].n = st->n_fracs; ser[k].style = PLOT_LINE_POINTS;
        }
        if (st->rounds > 0) { /* the control, at the partial fractions */
            for (f = 0; f < st->n_fracs; f++) {
                for (s = 0; s < st->seeds && s < 256; s++) v[s] = ctrl[s * st->n_fracs + f];
                mean_sd(v, st->seeds < 256 ? st->seeds : 256, &m, &sd);
                yc[f] = st->fracs[f] < 1.0 ? (float)m : NAN;
            }
            ser[n_series].name = "control: labelled only, same rounds";
            ser[n_series].x = xs; ser[n_series].y = yc; ser[n_series].n = st->n_fracs; ser[n_series].style = PLOT_LINE_POINTS; ser[n_series].color = 0x8c564b;
            n_series++;
        }
        if (have_full) {
            mean_sd(full, st->seeds, &m, &sd);
            printf("summary data=%s full_labels=%.4f full_labels_sd=%.4f\n", name, m, sd);
            fx[0] = xs[0]; fx[1] = 2.0f; fy[0] = fy[1] = (float)m;
            ser[n_series].name = "all labels"; ser[n_series].x = fx; ser[n_series].y = fy; ser[n_series].n = 2; ser[n_series].color = 0x7f7f7f;
            n_series++;
        }
        snprintf(path, sizeof path, "out/ssrm_%s.png", name);
        snprintf(title, sizeof title, "SSRM, %s: held-out accuracy vs labelled fraction", name);
        snprintf(label, sizeof label, "held-out accuracy (mean of %d seeds)", st->seeds);
        c.title = title;
        c.xlabel = "log10(labelled % of the pool)";
        c.ylabel = label;
        if (plot_lines(path, &c, ser, n_series) != PLOT_OK) fprintf(stderr, "ssrm: could not write %s\n", path);
    }
    printf("data=%s wrote=out/ssrm.csv,%s\n", name, path);
    free(acc); free(ctrl); free(full); free(perm);
}

/* the simulator: x_a, x_b ~ N(0, I) (n, d); side a preferred with probability
   sigmoid(beta w.(x_a - x_b)) for a hidden w */
static void simulate(float *xa, float *xb, unsigned char *a_wins, size_t n, int d, double beta, uint64_t seed) {
    moe_rng rng;
    double w[64], norm = 0.0;
    size_t i;
    int j;
    moe_rng_seed(&rng, seed);
    for (j = 0; j < d; j++) { w[j] = moe_rng_normal(&rng); norm += w[j] * w[j]; }
    for (j = 0; j < d; j++) w[j] /= sqrt(norm);
    for (i = 0; i < n; i++) {
        double m = 0.0;
        for (j = 0; j < d; j++) {
            xa[i * (size_t)d + (size_t)j] = moe_rng_normal(&rng);
            xb[i * (size_t)d + (size_t)j] = moe_rng_normal(&rng);
            m += w[j] * (xa[i * (size_t)d + (size_t)j] - xb[i * (size_t)d + (size_t)j]);
        }
        a_wins[i] = moe_rng_uniform(&rng) < 1.0 / (1.0 + exp(-beta * m));
    }
}

static const char *const about =
    "Trains a Bradley-Terry reward model on a labelled fraction of the pairs (supervised, SSRM's round 0),\n"
    "then rounds of SSRM (pseudo-label the unlabelled pairs, keep the confident ones, train on labelled +\n"
    "kept), and a control trained the same rounds on the labelled pairs alone, over labelled fractions and\n"
    "seeds; held-out accuracy per round. Data: a built-in simulator (32 features, Bradley-Terry labels from\n"
    "a hidden linear reward; no download), and HH-RLHF test pairs from the shared data folder,\n"
    "<DIR>/preferences/hh-rlhf/<split>/test.jsonl.gz: JSON lines {\"chosen\": \"...\", \"rejected\": \"...\"}\n"
    "(read through gzip; skipped with a message when absent). Prints a settings table, key=value lines\n"
    "per (data, seed, fraction, round) and summary lines; writes out/ssrm.csv and out/ssrm_<data>.png.";

int main(int argc, char **argv) {
    settings st;
    rwd_text_pairs all;
    rwd_featurizer fz = rwd_featurizer_default();
    char splits[512], *tok;
    float *xa, *xb;
    unsigned char *a_wins;
    size_t n, i;
    int f, d, have_hh = 1;
    FILE *csv;
    memset(&st, 0, sizeof st);
    st.seeds = -1;
    st.rounds = 3;
    st.threshold = 0.8;
    st.dim = -1;
    st.epochs = 8;
    st.min_steps = 300;
    st.seed = 1;
    st.sim_pairs = -1;
    st.data = files_data_root();
    st.splits = NULL;
    {
        flag fl[24];
        flags_program p;
        int rc, n = 0, seed = 1;
        const char *fractions = NULL;
        fl[n++] = flag_heading("experiment");
        fl[n++] = flag_switch("--quick", &st.quick, "1 seed, fractions 0.02 and 1, fewer simulated pairs and features, helpful-base only");
        fl[n++] = flag_default(flag_int("--seeds", &st.seeds, 1, 256, "seeds (each: a split, a labelled set, an initialisation)"), "10; 1 with --quick");
        fl[n++] = flag_int("--seed", &seed, 0, 2147483647, "the first seed");
        fl[n++] = flag_default(flag_string("--fractions", &fractions, "LIST", "labelled fractions of the pool, comma-separated, each in (0, 1]"),
                               "0.01,0.02,0.05,0.1,1; 0.02,1 with --quick");
        fl[n++] = flag_default(flag_int("--sim-pairs", &st.sim_pairs, 100, 1e8, "simulated pairs"), "5000; 2000 with --quick");
        fl[n++] = flag_heading("SSRM");
        fl[n++] = flag_int("--rounds", &st.rounds, 0, MAX_ROUNDS, "pseudo-labelling rounds");
        fl[n++] = flag_double("--threshold", &st.threshold, 0.5, 1.0, "keep a pseudo-label when its confidence max(P, 1 - P) is above this; in (0.5, 1]");
        fl[n++] = flag_switch("--code-order", &st.code_order, "train the kept pairs in their true order, as the released script does");
        fl[n++] = flag_heading("reward model");
        fl[n++] = flag_choice("--head", &st.mlp, "linear|mlp", "a linear Bradley-Terry head or an MLP (32 GELU)");
        fl[n++] = flag_int("--epochs", &st.epochs, 1, 1e6, "epochs per round");
        fl[n++] = flag_int("--min-steps", &st.min_steps, 0, 1e9, "at least this many optimizer steps per round");
        fl[n++] = flag_default(flag_int("--dim", &st.dim, 16, 1 << 22, "hashed word and bigram features (HH-RLHF)"), "4096; 1024 with --quick");
        fl[n++] = flag_heading("data");
        fl[n++] = flag_default(flag_string("--data", &st.data, "DIR", "the shared data folder (preferences/hh-rlhf/<split>/test.jsonl.gz)"),
                               "$MOE_SHARED_DATA, else data/ after make data-preferences, else ../shared/data");
        fl[n++] = flag_default(flag_string("--splits", &st.splits, "LIST", "HH-RLHF splits, comma-separated"),
                               "helpful-base,helpful-online,helpful-rejection-sampled; helpful-base with --quick");
        p = flags_program_make("ssrm", "semi-supervised reward modelling (SSRM) against supervised training over labelled fractions", about,
                               fl, n);
        rc = flags_parse(&p, argc, argv);
        if (rc != FLAGS_RUN) return rc;
        st.seed = (uint64_t)seed;
        if (!(st.threshold > 0.5)) {
            fprintf(stderr, "ssrm: --threshold must be in (0.5, 1], not %g\n", st.threshold);
            return 2;
        }
        if (parse_fracs(&st, fractions ? fractions : st.quick ? "0.02,1" : "0.01,0.02,0.05,0.1,1") != 0) return 2;
    }
    if (st.seeds < 0) st.seeds = st.quick ? 1 : 10;
    if (st.dim < 0) st.dim = st.quick ? 1024 : 4096;
    if (st.sim_pairs < 0) st.sim_pairs = st.quick ? 2000 : 5000;
    if (!st.splits) st.splits = st.quick ? "helpful-base" : "helpful-base,helpful-online,helpful-rejection-sampled";
    /* the real data, if there */
    memset(&all, 0, sizeof all);
    snprintf(splits, sizeof splits, "%s", st.splits);
    for (tok = strtok(splits, ","); tok && have_hh; tok = strtok(NULL, ","))
        if (read_split(&all, st.data, tok)) {
            printf("ssrm: SKIP hh: %s/preferences/hh-rlhf/%s/test.jsonl.gz not found (run make data-preferences, or set MOE_SHARED_DATA or --data DIR to a folder holding preferences/); the simulator runs alone\n", st.data, tok);
            have_hh = 0;
        }
    printf("%-22s %s\n%-22s %d pairs of 32 features, BT labels from a hidden linear reward (beta 3)\n", "mode", st.quick ? "quick" : "full", "sim", st.sim_pairs);
    if (have_hh) printf("%-22s %s: %zu pairs\n", "hh-rlhf", st.splits, all.n);
    printf("%-22s 80%% pool (labelled fraction + unlabelled rest), 20%% held out, per seed\n%-22s", "splits", "labelled fractions");
    for (f = 0; f < st.n_fracs; f++) printf(" %g", st.fracs[f]);
    printf("\n%-22s %d (confidence strictly above %g; %s)\n%-22s %s; hh features: hashed words+bigrams %d + 2 length; %d epochs per round (at least %d steps), batch 32\n",
           "ssrm rounds", st.rounds, st.threshold, st.code_order ? "kept pairs in their true order, as the released script" : "trained on the pseudo-labels, as the paper",
           "reward model", st.mlp ? "MLP head (32 GELU)" : "linear BT head", st.dim, st.epochs, st.min_steps);
    printf("%-22s the same rounds of training on the labelled pairs alone (threshold 1 keeps no pseudo-label): gain = SSRM - control, paired by seed\n", "control");
    printf("%-22s %d (from %llu)\n%-22s %d\n", "seeds", st.seeds, (unsigned long long)st.seed, "threads", moe_num_threads());
    printf("paper_claim=\"SSRM improves reward models trained on few labels without more labelling and can match models trained on the fully labelled data (arXiv 2409.06903, abstract)\"\n");
    fflush(stdout);
    {
        files_err fe;
        if (files_mkdirs("out", &fe) != 0) die(fe.msg, NULL);
    }
    csv = fopen("out/ssrm.csv", "w");
    if (csv) fprintf(csv, "data,seed,fraction,labelled,round,accuracy,trained,kept,kept_fraction,mean_confidence,pseudo_accuracy,kept_accuracy\n");
    /* simulator */
    n = (size_t)st.sim_pairs;
    xa = (float *)malloc(2 * n * 32 * sizeof(float));
    a_wins = (unsigned char *)malloc(n);
    if (!xa || !a_wins) die("out of memory", NULL);
    simulate(xa, xa + n * 32, a_wins, n, 32, 3.0, 77);
    experiment("sim", xa, xa + n * 32, a_wins, n, 32, &st, csv);
    free(xa); free(a_wins);
    if (have_hh) {
        moe_err err;
        moe_rng rng;
        float *tmp;
        n = all.n;
        fz.dim = st.dim;
        d = rwd_featurizer_width(&fz);
        xa = (float *)malloc(2 * n * (size_t)d * sizeof(float));
        a_wins = (unsigned char *)malloc(n);
        tmp = (float *)malloc((size_t)d * sizeof(float));
        if (!xa || !a_wins || !tmp) die("out of memory for the features", NULL);
        xb = xa + n * (size_t)d;
        if (rwd_featurize_pairs(xa, xb, NULL, NULL, &fz, &all, &err) != MOE_OK) die("features", err.msg);
        moe_rng_seed(&rng, 12345);
        for (i = 0; i < n; i++) { /* random sides, so "a wins" carries no information */
            a_wins[i] = moe_rng_uniform(&rng) < 0.5f;
            if (!a_wins[i]) {
                memcpy(tmp, xa + i * (size_t)d, (size_t)d * sizeof(float));
                memcpy(xa + i * (size_t)d, xb + i * (size_t)d, (size_t)d * sizeof(float));
                memcpy(xb + i * (size_t)d, tmp, (size_t)d * sizeof(float));
            }
        }
        free(tmp);
        experiment("hh", xa, xb, a_wins, n, d, &st, csv);
        free(xa); free(a_wins);
    }
    if (csv) fclose(csv);
    rwd_text_pairs_free(&all);
    return 0;
}
