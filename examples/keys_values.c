/* keys_values.c - tuning the keys or the values of the FFNs to teach facts (arXiv 2402.12233):
 * a tiny byte-level LM pre-trained on Brown text is taught synthetic facts ("<name> lives in
 * <city>.") through its FFN keys only or its FFN values only, parameter-matched.
 *
 *   make data                                      # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/keys_values [--quick] [--seeds N] [--out DIR]
 *
 * Arms (every one from the same pre-trained model, same steps, same learning rate):
 *   keys         the SwiGLU up matrices only (a key matrix: the half of the keys that matches
 *                the values' size; gate + up would be twice the values)
 *   values       the down matrices only (same parameter count as keys)
 *   lora_keys    LoRA of rank r on the up matrices; lora_values: on the down matrices (equal
 *                adapter sizes r (d + d_ff) per matrix)
 * Measured per seed: the accuracy of ranking the right city first among all cities after the
 * training templates (efficacy) and after held-out paraphrase templates (generalisation), and
 * the change of bits/byte on the pre-training genres' validation text (locality: lower is
 * better). Prints a settings table and key=value lines (mean and sd over seeds), writes
 * <out>/keys_values.csv and <out>/keys_values.png (fact loss during training, per arm). */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h"   /* defines: moe_model_*, moe_mask_*, moe_lora_*, moe_model_select */
#define PLOT_IMPLEMENTATION
#define PLOT_STATIC
#include "plot.h"  /* defines: plot_lines */
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

enum { ARM_KEYS, ARM_VALUES, ARM_LORA_KEYS, ARM_LORA_VALUES, N_ARMS };
static const char *const arm_names[N_ARMS] = {"keys", "values", "lora_keys", "lora_values"};
static const char *const cities[] = {"Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Dakar"};
#define N_CITIES 10
static const char *const train_templates[] = {"%s lives in %s.", "%s is a resident of %s.", "The home of %s is %s."};
static const char *const test_templates[] = {"%s resides in %s.", "%s has a house in %s."};
#define N_TRAIN_T 3
#define N_TEST_T 2
#define MAX_FACTS 256
#define T_MAX 48

typedef struct options {
    int quick, threads, seeds, pre_steps, steps, facts, lora_rank, B;
    float pre_lr, lr, lora_lr;
    const char *genres, *data_dir, *out;
} options;

typedef struct fact { char name[24]; int city; } fact;

static void make_name(char *out, moe_rng *r) {
    static const char *const syl[] = {"ba", "ko", "ti", "rel", "mu", "sa", "den", "lo", "vi", "nar", "qu", "ze", "po", "lin", "ha", "ru"};
    int i, n = 2 + moe_rng_below(r, 2);
    out[0] = 0;
    for (i = 0; i < n; i++) strcat(out, syl[moe_rng_below(r, 16)]);
    out[0] = (char)(out[0] - 'a' + 'A');
}

/* the sentence of fact f with city c in template t, left in s; *city_at = where the city starts */
static int sentence(char *s, const char *tmpl, const fact *f, int c, int *city_at) {
    const char *p = strstr(tmpl, "%s") + 2, *q = strstr(p, "%s");
    int n = snprintf(s, T_MAX + 2, "%.*s%s%.*s", (int)(p - 2 - tmpl), tmpl, f->name, (int)(q - p), p);
    *city_at = n;
    return n + snprintf(s + n, (size_t)(T_MAX + 2 - n), "%s%s", cities[c], q + 2);
}

/* training batch: B sentences of random facts and training templates, left-aligned, targets
   only inside the sentence (the rest -1, ignored) */
static void fact_batch(const fact *fs, int nf, int B, moe_rng *r, int *tok) {
    int b, t;
    for (b = 0; b < B; b++) {
        char s[T_MAX + 2];
        const fact *f = &fs[moe_rng_below(r, nf)];
        int at, n = sentence(s, train_templates[moe_rng_below(r, N_TRAIN_T)], f, f->city, &at);
        for (t = 0; t < T_MAX; t++) {
            tok[b * T_MAX + t] = t < n ? (unsigned char)s[t] : ' ';
            tok[B * T_MAX + b * T_MAX + t] = t + 1 < n ? (unsigned char)s[t + 1] : -1;
        }
    }
}

/* fraction of (fact, template) pairs whose true city has the highest log-probability of its
   bytes among all cities; also the mean loss of the true city's bytes */
static double fact_accuracy(moe_model *m, const fact *fs, int nf, const char *const *tmpls, int nt, int B, int *tok) {
    int f, t, c, right = 0, total = 0;
    for (f = 0; f < nf; f++)
        for (t = 0; t < nt; t++) {
            double score[N_CITIES];
            int best = 0, c0;
            for (c0 = 0; c0 < N_CITIES; c0 += B) {
                int at[64], len[64], b, nb = N_CITIES - c0 < B ? N_CITIES - c0 : B, i;
                for (b = 0; b < B; b++) {
                    char s[T_MAX + 2];
                    int n = sentence(s, tmpls[t], &fs[f], c0 + (b < nb ? b : 0), &at[b]);
                    len[b] = n;
                    for (i = 0; i < T_MAX; i++) {
                        tok[b * T_MAX + i] = i < n ? (unsigned char)s[i] : ' ';
                        tok[B * T_MAX + b * T_MAX + i] = i + 1 < n ? (unsigned char)s[i + 1] : -1;
                    }
                }
                moe_model_forward(m, tok, tok + B * T_MAX, B, T_MAX, NULL);
                for (b = 0; b < nb; b++) {
                    double lp = 0.0;
                    /* the city's bytes are predicted at positions at-1 .. at+len(city)-2 */
                    for (i = at[b] - 1; i < at[b] - 1 + (int)strlen(cities[c0 + b]) && i < len[b] - 1; i++) lp -= m->losses[b * T_MAX + i];
                    score[c0 + b] = lp;
                }
            }
            for (c = 1; c < N_CITIES; c++)
                if (score[c] > score[best]) best = c;
            right += best == fs[f].city;
            total++;
        }
    return (double)right / total;
}

static void text_batch(const unsigned char *text, size_t len, int B, moe_rng *r, int *tok) {
    int b, t;
    for (b = 0; b < B; b++) {
        size_t p = (size_t)moe_rng_below(r, (int)(len - T_MAX - 1));
        for (t = 0; t < T_MAX; t++) {
            tok[b * T_MAX + t] = text[p + (size_t)t];
            tok[B * T_MAX + b * T_MAX + t] = text[p + (size_t)t + 1];
        }
    }
}

static double corpus_bpb(moe_model *m, const brown_corpus *cp, int B, int *tok) {
    moe_rng r;
    double s = 0;
    int g, w, n = 0;
    moe_rng_seed(&r, 4242);
    for (g = 0; g < cp->n; g++)
        for (w = 0; w < 4; w++) {
            text_batch(cp->val[g], cp->val_len[g], B, &r, tok);
            moe_model_forward(m, tok, tok + B * T_MAX, B, T_MAX, NULL);
            s += m->loss;
            n++;
        }
    return s / n / log(2.0);
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
    int rc, seed, arm, *tok;
    char path[1024];
    static double acc_train[N_ARMS][16], acc_test[N_ARMS][16], loc[N_ARMS][16], before_train[16], before_test[16];
    static float curve[N_ARMS][4096];
    size_t tuned[N_ARMS];
    flag fl[] = {
        flag_switch("--quick", &o.quick, "a smoke run: few steps, 1 seed, 16 facts"),
        flag_int("--seeds", &o.seeds, 1, 16, "seeds (model initialisation, facts, data order)"),
        flag_int("--pre-steps", &o.pre_steps, 1, 1e6, "pre-training steps on the Brown genres"),
        flag_int("--steps", &o.steps, 1, 4096, "fact-training steps per arm"),
        flag_int("--facts", &o.facts, 4, MAX_FACTS, "synthetic facts taught"),
        flag_float("--pre-lr", &o.pre_lr, 0, 1, "pre-training learning rate"),
        flag_float("--lr", &o.lr, 0, 1, "learning rate of the keys and values arms"),
        flag_float("--lora-lr", &o.lora_lr, 0, 1, "learning rate of the LoRA arms"),
        flag_int("--lora-rank", &o.lora_rank, 1, 64, "LoRA rank (alpha = 2 rank)"),
        flag_int("--threads", &o.threads, 1, 256, "OpenMP threads (the model is tiny: more threads only add waiting)"),
        flag_string("--genres", &o.genres, "LIST", "pre-training genres (the locality text)"),
        flag_string("--data", &o.data_dir, "DIR", "the Brown corpus folder"),
        flag_string("--out", &o.out, "DIR", "output folder"),
    };
    flags_program p;
    memset(&o, 0, sizeof o);
    o.seeds = 3; o.pre_steps = 600; o.steps = 300; o.facts = 32; o.lora_rank = 4; o.B = 16; o.threads = 1;
    o.pre_lr = 3e-3f; o.lr = 1e-3f; o.lora_lr = 3e-3f;
    o.genres = "news,fiction"; o.data_dir = "data/brown"; o.out = "out";
    p = flags_program_make("keys_values", "teaching synthetic facts through FFN keys only vs values only (parameter-matched, and LoRA of equal rank)",
                           "reads <data>/{train,val}/<genre>.txt; writes <out>/keys_values.csv and <out>/keys_values.png", fl, FLAGS_COUNT(fl));
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    if (o.quick) { o.seeds = 1; o.pre_steps = 30; o.steps = 15; o.facts = 16; o.B = 10; }
    if (!brown_load(&cp, o.data_dir, o.genres)) return 1;
    if (files_mkdirs(o.out, &fe) != 0) {
        fprintf(stderr, "keys_values: %s\n", fe.msg);
        return 1;
    }
    tok = (int *)malloc(sizeof(int) * 2 * (size_t)(o.B * T_MAX));
    printf("keys vs values: teaching facts through the FFN's keys or values (arXiv 2402.12233)\n");
    printf("  model            dense SwiGLU, d 64, 2 layers, d_ff 192, bytes, pre-trained on %s for %d steps (lr %g)\n", o.genres,
           o.pre_steps, (double)o.pre_lr);
    printf("  facts            %d '<name> lives in <city>' over %d cities; %d training templates, %d held-out paraphrases\n", o.facts,
           N_CITIES, N_TRAIN_T, N_TEST_T);
    printf("  training         %d steps of %d sentences per arm, AdamW (update mask), lr %g; LoRA rank %d lr %g\n", o.steps, o.B,
           (double)o.lr, o.lora_rank, (double)o.lora_lr);
    printf("  seeds            %d\n", o.seeds);
    for (seed = 0; seed < o.seeds; seed++) {
        moe_model m;
        moe_model_config c = moe_model_config_default();
        moe_adamw_config ac = moe_adamw_config_default();
        moe_rng r;
        fact fs[MAX_FACTS];
        float *p0;
        double bpb0;
        int s, f;
        c.vocab = 256; c.max_seq = T_MAX; c.d = 64; c.n_layers = 2; c.n_heads = 4; c.d_ff = 192; c.pos = MOE_POS_ROPE; c.moe_every = 0;
        if (moe_model_init(&m, &c, o.B, T_MAX) != MOE_OK) {
            fprintf(stderr, "keys_values: %s\n", m.err.msg);
            return 1;
        }
        moe_model_init_weights(&m, 10 + (uint64_t)seed);
        moe_rng_seed(&r, 20 + (uint64_t)seed);
        for (s = 1; s <= o.pre_steps; s++) {
            int g = moe_rng_below(&r, cp.n);
            text_batch(cp.train[g], cp.train_len[g], o.B, &r, tok);
            moe_store_zero_grad(&m.S);
            moe_model_forward(&m, tok, tok + o.B * T_MAX, o.B, T_MAX, NULL);
            moe_model_backward(&m, 1.0f);
            moe_clip_grad_norm(&m.S, 1.0f);
            moe_adamw_step(&m.S, &ac, moe_lr_cosine(s - 1, o.pre_steps / 10, o.pre_steps, o.pre_lr, o.pre_lr / 10), s);
        }
        for (f = 0; f < o.facts; f++) {
            make_name(fs[f].name, &r);
            fs[f].city = moe_rng_below(&r, N_CITIES);
        }
        bpb0 = corpus_bpb(&m, &cp, o.B, tok);
        before_train[seed] = fact_accuracy(&m, fs, o.facts, train_templates, N_TRAIN_T, o.B, tok);
        before_test[seed] = fact_accuracy(&m, fs, o.facts, test_templates, N_TEST_T, o.B, tok);
        p0 = (float *)malloc(m.S.numel * sizeof(float));
        memcpy(p0, m.S.params, m.S.numel * sizeof(float));
        for (arm = 0; arm < N_ARMS; arm++) {
            moe_mask k;
            moe_lora L;
            moe_rng rt;
            int part = (arm == ARM_KEYS || arm == ARM_LORA_KEYS) ? MOE_SEL_UP : MOE_SEL_DOWN, lora = arm >= ARM_LORA_KEYS;
            memcpy(m.S.params, p0, m.S.numel * sizeof(float));
            memset(m.S.adam_m, 0, m.S.numel * sizeof(float));
            memset(m.S.adam_v, 0, m.S.numel * sizeof(float));
            if (lora) {
                int ids[16], n = moe_model_select(&m, part, ids, 16);
                moe_lora_config lc;
                lc.rank = o.lora_rank;
                lc.alpha = 2.0f * (float)o.lora_rank;
                if (moe_lora_attach(&L, &m.S, ids, n, &lc, 30 + (uint64_t)seed) != MOE_OK) {
                    fprintf(stderr, "keys_values: %s\n", L.err.msg);
                    return 1;
                }
                tuned[arm] = L.S.numel;
            } else {
                if (moe_mask_init(&k, &m.S, MOE_MASK_UPDATE) != MOE_OK || moe_mask_select(&k, &m, part) != MOE_OK) {
                    fprintf(stderr, "keys_values: %s\n", k.err.msg);
                    return 1;
                }
                tuned[arm] = moe_mask_count(&k, &m.S, -1);
            }
            moe_rng_seed(&rt, 40 + (uint64_t)seed); /* the same fact batches for every arm */
            for (s = 1; s <= o.steps; s++) {
                fact_batch(fs, o.facts, o.B, &rt, tok);
                moe_store_zero_grad(&m.S);
                moe_model_forward(&m, tok, tok + o.B * T_MAX, o.B, T_MAX, NULL);
                curve[arm][s - 1] += (float)(m.loss / o.seeds);
                moe_model_backward(&m, 1.0f);
                if (lora) {
                    moe_store_zero_grad(&L.S);
                    moe_lora_backward(&L, &m.S);
                    moe_lora_step(&L, &m.S, NULL, &ac, o.lora_lr, s, 1.0f);
                } else {
                    moe_mask_step(&k, &m.S, &ac, o.lr, s, 1.0f, NULL);
                }
            }
            acc_train[arm][seed] = fact_accuracy(&m, fs, o.facts, train_templates, N_TRAIN_T, o.B, tok);
            acc_test[arm][seed] = fact_accuracy(&m, fs, o.facts, test_templates, N_TEST_T, o.B, tok);
            loc[arm][seed] = corpus_bpb(&m, &cp, o.B, tok) - bpb0;
            if (lora) moe_lora_detach(&L, &m.S);
            else moe_mask_free(&k);
        }
        free(p0);
        moe_model_free(&m);
    }
    snprintf(path, sizeof path, "%s/keys_values.csv", o.out);
    if (!(csv = files_atomic_open(&fa, path, &fe))) {
        fprintf(stderr, "keys_values: %s\n", fe.msg);
        return 1;
    }
    fprintf(csv, "arm,seed,tuned_params,train_fact_acc,heldout_fact_acc,locality_delta_bpb\n");
    for (arm = 0; arm < N_ARMS; arm++)
        for (seed = 0; seed < o.seeds; seed++)
            fprintf(csv, "%s,%d,%zu,%.4f,%.4f,%.5f\n", arm_names[arm], seed, tuned[arm], acc_train[arm][seed], acc_test[arm][seed], loc[arm][seed]);
    if (files_atomic_commit(&fa, !ferror(csv), &fe) != 0) {
        fprintf(stderr, "keys_values: %s\n", fe.msg);
        return 1;
    }
    {
        double a, b;
        mean_sd(before_train, o.seeds, &a, &b);
        printf("before train_fact_acc=%.3f", a);
        mean_sd(before_test, o.seeds, &a, &b);
        printf(" heldout_fact_acc=%.3f chance=%.3f\n", a, 1.0 / N_CITIES);
    }
    for (arm = 0; arm < N_ARMS; arm++) {
        double m1, s1, m2, s2, m3, s3;
        mean_sd(acc_train[arm], o.seeds, &m1, &s1);
        mean_sd(acc_test[arm], o.seeds, &m2, &s2);
        mean_sd(loc[arm], o.seeds, &m3, &s3);
        printf("arm=%s tuned_params=%zu train_fact_acc=%.3f train_sd=%.3f heldout_fact_acc=%.3f heldout_sd=%.3f locality_delta_bpb=%.4f locality_sd=%.4f\n",
               arm_names[arm], tuned[arm], m1, s1, m2, s2, m3, s3);
    }
    {
        plot_series sr[N_ARMS];
        plot_chart ch;
        memset(sr, 0, sizeof sr);
        memset(&ch, 0, sizeof ch);
        for (arm = 0; arm < N_ARMS; arm++) {
            sr[arm].name = arm_names[arm];
            sr[arm].y = curve[arm];
            sr[arm].n = o.steps;
        }
        ch.title = "fact-training loss (mean over seeds)";
        ch.xlabel = "step";
        ch.ylabel = "nats/byte";
        snprintf(path, sizeof path, "%s/keys_values.png", o.out);
        if (plot_lines(path, &ch, sr, N_ARMS) != PLOT_OK) fprintf(stderr, "keys_values: cannot write %s\n", path);
    }
    printf("csv=%s/keys_values.csv\n", o.out);
    free(tok);
    brown_free(&cp);
    return 0;
}
