/* align.c - alignment of the tiny byte LM end to end, against the alignment tax: rejection-sampling
 * fine-tuning (RSF) under preference directions (DPA, arXiv 2402.18571), model averaging,
 * part-wise averaging and HMA (arXiv 2309.06256), and merging two policies aligned to different
 * directions (linear, SLERP, TIES arXiv 2306.01708, DARE arXiv 2311.03099).
 *
 *   make data                                   # once: data/brown/{train,val}/<genre>.txt
 *   build/examples/align [--quick] [--seed N] [--out DIR]
 *
 * Per run (one seed):
 *  1. pre-train the LM on some Brown genres; the "pre-trained abilities" are its bits/byte on
 *     the validation text of the genres other than the target: their rise is the TAX;
 *  2. a reward with a real, learnable signal: a linear Bradley-Terry head on hashed word
 *     features trained to tell the target genre's sentences (romance) from the other genres'
 *     (held-out accuracy printed), scaled to unit spread on text; the second objective is
 *     verbosity (response code points / max_new); responses stop after a '.';
 *  3. RSF (arXiv 2304.06767, Algorithm 1) from the pre-trained model for directions
 *     v = (cos t, sin t) (--angles: by default -45 = style and brevity, 0 = style only, 45, and
 *     90 = verbosity only), one policy per direction (plain prompts), every round evaluated:
 *     style, verbosity, tax;
 *  4. for the style policy (t = 0, reward = style): model averaging over lambda, part-wise
 *     averaging of the early or the late half of the layers, HMA at fixed mean ratios (the
 *     gradient search on the policy's own selected samples, one block per layer, the official
 *     choice of tensors) against uniform averaging at the same mean with the same tensors, and
 *     HMA with every tensor following (FOLLOW_ALL) against plain averaging at the same mean;
 *  5. merging the policies of the smallest and the largest angle with linear, SLERP, TIES and
 *     DARE, at weights (1 - w, w) (SLERP: t = w; TIES and DARE: task vectors from the
 *     pre-trained model, density 0.5).
 * Every model is evaluated the same way: fixed validation windows for the tax and the same
 * sampler seeds on fixed validation prompts for the rewards (common random numbers).
 * Fronts: hypervolumes (rwd_hypervolume), normalised by the box from the pre-trained model's
 * reward and the aligned model's tax to the aligned reward and the pre-trained tax (0.5 = the
 * straight line between the two models); merge fronts in (style, verbosity), normalised by the
 * box of all the run's points. The tax gap of an arm: the mean over its points of their tax minus
 * the averaging curve's tax at the same reward (< 0: a better trade-off than averaging).
 * Outputs: a settings table, key=value lines, <out>/align_s<seed>.csv (every evaluated model),
 * <out>/align_tax_s<seed>.png (reward against tax) and <out>/align_dirs_s<seed>.png (style
 * against verbosity: the direction sweep and the merges), a closing "summary" line. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: moe_model_*, rwd_rsf_*, rwd_average*, rwd_hma_*, rwd_merge, rwd_hypervolume, rwd_bt_train */
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

#define MAX_DIRS 9
#define MAX_PROMPTS 128
#define PROMPT_BYTES 24
#define MAX_ROWS 512
#define MAX_LAYERS 16
#define PI 3.14159265358979323846

typedef struct options {
    int quick, threads, seed, d, layers, experts, pre_steps, B, T, dirs, rounds, prompts, cands, max_new, epochs;
    int eval_prompts, eval_cands, eval_windows, head_pairs, hma_steps;
    float pre_lr, lr;
    const char *genres, *target, *angles, *data_dir, *out;
} options;

/* one evaluated model */
typedef struct row {
    char exp[16], label[32];
    double param, style, verb, tax;
} row;

typedef struct point {
    double style, verb, tax;
} point;

typedef struct ctx {
    const options *o;
    const brown_corpus *cp;
    int target;                    /* index of the target genre in cp                          */
    moe_model pol, ev;             /* the policy being aligned; the evaluation copy            */
    rwd_rsf tr, evr;               /* RSF on pol; sampling for evaluation on ev                */
    rwd_featurizer fz;
    rwd_head head;
    moe_store hs;                  /* the head's parameters                                   */
    rwd_rsf_head_scorer sc;        /* (style, verbosity)                                       */
    char train_prompts[MAX_PROMPTS][PROMPT_BYTES + 1], eval_prompts[MAX_PROMPTS][PROMPT_BYTES + 1];
    const char *train_ptr[MAX_PROMPTS], *eval_ptr[MAX_PROMPTS];
    int *tok;                      /* (2, B, T) batches                                        */
    row rows[MAX_ROWS];
    int n_rows;
} ctx;

static void die(const char *what, const char *msg) {
    fprintf(stderr, "align: %s: %s\n", what, msg);
    exit(1);
}
#define CK(call, what, errp)                                                                                           \
    do {                                                                                                               \
        if ((call) != MOE_OK) die(what, (errp)->msg);                                                                  \
    } while (0)

/* dst: an allocated store with src's table (names, shapes, flags), no optimizer moments */
static moe_status store_like(moe_store *dst, const moe_store *src) {
    int i;
    moe_store_init(dst);
    for (i = 0; i < src->count; i++) {
        const moe_tensor *t = &src->tensors[i];
        if (moe_store_add(dst, t->name, t->flags, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, t->ndim > 2 ? t->shape[2] : 0,
                          t->ndim > 3 ? t->shape[3] : 0) < 0)
            return MOE_ERR_INVALID_ARG;
    }
    return moe_store_alloc(dst, 0);
}

/* one (B, T) batch of windows of genre g (val or train): inputs tok[0..BT), targets tok[BT..2BT) */
static void batch(const brown_corpus *cp, int g, int val, int B, int T, moe_rng *r, int *tok) {
    const unsigned char *text = val ? cp->val[g] : cp->train[g];
    size_t len = val ? cp->val_len[g] : cp->train_len[g];
    int b, t;
    for (b = 0; b < B; b++) {
        size_t p = (size_t)moe_rng_below(r, (int)(len - (size_t)T - 1));
        for (t = 0; t < T; t++) {
            tok[b * T + t] = text[p + (size_t)t];
            tok[B * T + b * T + t] = text[p + (size_t)t + 1];
        }
    }
}

/* the tax: mean bits/byte over the non-target genres' fixed validation windows */
static double tax_bpb(ctx *c, moe_model *m) {
    const options *o = c->o;
    double sum = 0.0;
    int g, w, n = 0;
    for (g = 0; g < c->cp->n; g++) {
        moe_rng r;
        if (g == c->target) continue;
        moe_rng_seed(&r, 12345 + (uint64_t)g);
        for (w = 0; w < o->eval_windows; w += o->B) {
            batch(c->cp, g, 1, o->B, o->T, &r, c->tok);
            if (moe_model_forward(m, c->tok, c->tok + o->B * o->T, o->B, o->T, NULL) != MOE_OK) die("forward", m->err.msg);
            sum += m->loss;
            n++;
        }
    }
    return sum / n / log(2.0);
}

/* style and verbosity of fresh responses to the evaluation prompts (same sampler seeds for every
   model), and the tax */
static point evaluate(ctx *c, const float *params) {
    point p = {0, 0, 0};
    double v[2] = {1.0, 0.0};
    int i, j;
    memcpy(c->ev.S.params, params, c->ev.S.numel * sizeof(float));
    moe_rng_seed(&c->evr.rng, 999);
    for (i = 0; i < c->o->eval_prompts; i++) {
        if (rwd_rsf_sample(&c->evr, c->eval_ptr[i], v, rwd_rsf_head_score, &c->sc) != MOE_OK) die("evaluation sample", c->evr.err.msg);
        for (j = 0; j < c->o->eval_cands; j++) {
            p.style += c->evr.r[2 * j];
            p.verb += c->evr.r[2 * j + 1];
        }
    }
    p.style /= (double)c->o->eval_prompts * c->o->eval_cands;
    p.verb /= (double)c->o->eval_prompts * c->o->eval_cands;
    p.tax = tax_bpb(c, &c->ev);
    return p;
}

/* evaluates params, records a row and prints its key=value line */
static point record(ctx *c, const char *exp, const char *label, double param, const float *params, const char *extra) {
    point p = evaluate(c, params);
    row *r;
    if (c->n_rows >= MAX_ROWS) die("rows", "more evaluations than the table holds");
    r = &c->rows[c->n_rows++];
    snprintf(r->exp, sizeof r->exp, "%s", exp);
    snprintf(r->label, sizeof r->label, "%s", label);
    r->param = param;
    r->style = p.style;
    r->verb = p.verb;
    r->tax = p.tax;
    printf("seed=%d exp=%s label=%s param=%.3f style=%.4f verbosity=%.4f tax_bpb=%.4f%s%s\n", c->o->seed, exp, label, param,
           p.style, p.verb, p.tax, extra ? " " : "", extra ? extra : "");
    fflush(stdout);
    return p;
}

/* is byte ch plain ASCII text a prompt may hold? */
static int plain(int ch) { return ch >= 32 && ch < 127; }

/* out = 2 to 4 words from a random word start of genre g, with a trailing space, within one
   sentence: the rest of the sentence (the response until its '.') has any length */
static void make_prompt(char *out, const brown_corpus *cp, int g, int val, moe_rng *r) {
    const unsigned char *text = val ? cp->val[g] : cp->train[g];
    size_t len = val ? cp->val_len[g] : cp->train_len[g];
    int tries;
    for (tries = 0; tries < 1000; tries++) {
        size_t p = (size_t)moe_rng_below(r, (int)(len - 200));
        int words = 2 + moe_rng_below(r, 3), n = 0, ok = 1;
        while (p < len - 100 && text[p] != ' ') p++;
        p++;
        if (p >= len - 100 || !((text[p] >= 'A' && text[p] <= 'Z') || (text[p] >= 'a' && text[p] <= 'z'))) continue;
        while (words > 0 && ok) {
            int ch = text[p++];
            if (!plain(ch) || ch == '.' || n >= PROMPT_BYTES) ok = 0;
            else {
                out[n++] = (char)ch;
                words -= ch == ' ';
            }
        }
        if (!ok) continue;
        out[n] = 0;
        return;
    }
    snprintf(out, PROMPT_BYTES + 1, "The ");
}

/* out = a sentence piece of genre g as the policy's responses are: from a word start, 8 to max
   bytes, ending after a '.' if one comes */
static void snippet(char *out, const brown_corpus *cp, int g, int val, moe_rng *r, int max) {
    const unsigned char *text = val ? cp->val[g] : cp->train[g];
    size_t len = val ? cp->val_len[g] : cp->train_len[g];
    size_t p = (size_t)moe_rng_below(r, (int)(len - (size_t)max - 100));
    int L = 8 + moe_rng_below(r, max - 7), n = 0;
    while (text[p] != ' ') p++;
    p++;
    while (n < L) {
        int ch = text[p++];
        if (ch == '\n') break;
        out[n++] = (char)ch;
        if (ch == '.') break;
    }
    out[n] = 0;
}

/* the style reward: a linear BT head on hashed words, target genre (chosen) against the others
   (rejected); scaled so its scores have unit standard deviation on the training pieces.
   Returns the held-out pair accuracy. */
static double train_head(ctx *c, uint64_t seed) {
    const options *o = c->o;
    int d, i, n = o->head_pairs, nt = o->head_pairs / 4 + 1;
    float *xw, *xl, *w1;
    double *sw, *sl, acc, mean = 0.0, var = 0.0;
    char buf[256];
    moe_rng r;
    moe_err e;
    rwd_head_config hc = rwd_head_config_default();
    rwd_train_config tc = rwd_train_config_default();
    c->fz = rwd_featurizer_default();
    c->fz.dim = 1024;
    c->fz.length_features = 0; /* verbosity is the other objective: the style head sees words only */
    d = rwd_featurizer_width(&c->fz);
    hc.d_in = d;
    moe_store_init(&c->hs);
    if (rwd_head_init(&c->head, &hc, &c->hs, "style.", &e) != MOE_OK || moe_store_alloc(&c->hs, 1) != MOE_OK) die("head", e.msg);
    moe_rng_seed(&r, seed);
    rwd_head_init_weights(&c->head, &c->hs, &r);
    xw = (float *)malloc(sizeof(float) * (size_t)(n + nt) * (size_t)d);
    xl = (float *)malloc(sizeof(float) * (size_t)(n + nt) * (size_t)d);
    sw = (double *)malloc(sizeof(double) * (size_t)(n + nt));
    sl = (double *)malloc(sizeof(double) * (size_t)(n + nt));
    if (!xw || !xl || !sw || !sl) die("head", "out of memory");
    for (i = 0; i < n + nt; i++) {
        int val = i >= n, other = moe_rng_below(&r, c->cp->n - 1);
        if (other >= c->target) other++;
        snippet(buf, c->cp, c->target, val, &r, o->max_new);
        rwd_featurize(xw + (size_t)i * (size_t)d, &c->fz, NULL, buf);
        snippet(buf, c->cp, other, val, &r, o->max_new);
        rwd_featurize(xl + (size_t)i * (size_t)d, &c->fz, NULL, buf);
    }
    tc.seed = seed;
    if (rwd_bt_train(&c->head, &c->hs, xw, xl, NULL, (size_t)n, &tc, NULL, &e) != MOE_OK) die("head training", e.msg);
    rwd_head_score(&c->head, &c->hs, sw, xw, (size_t)(n + nt));
    rwd_head_score(&c->head, &c->hs, sl, xl, (size_t)(n + nt));
    acc = rwd_pair_accuracy(sw + n, sl + n, (size_t)nt);
    for (i = 0; i < n; i++) mean += (sw[i] + sl[i]) / (2.0 * n);
    for (i = 0; i < n; i++) var += ((sw[i] - mean) * (sw[i] - mean) + (sl[i] - mean) * (sl[i] - mean)) / (2.0 * n);
    w1 = moe_store_param(&c->hs, c->head.id_w1);
    for (i = 0; i < d; i++) w1[i] /= (float)sqrt(var > 1e-12 ? var : 1.0);
    if (rwd_rsf_head_scorer_init(&c->sc, &c->fz, &c->head, 1, &c->hs, (double)o->max_new, &e) != MOE_OK) die("scorer", e.msg);
    free(xw); free(xl); free(sw); free(sl);
    return acc;
}

static void pretrain(ctx *c, uint64_t seed) {
    const options *o = c->o;
    moe_adamw_config ac = moe_adamw_config_default();
    moe_rng r;
    int s;
    moe_rng_seed(&r, seed);
    for (s = 0; s < o->pre_steps; s++) {
        float lr = moe_lr_cosine(s, o->pre_steps / 20, o->pre_steps, o->pre_lr, 0.1f * o->pre_lr);
        batch(c->cp, moe_rng_below(&r, c->cp->n), 0, o->B, o->T, &r, c->tok);
        moe_store_zero_grad(&c->pol.S);
        if (moe_model_forward(&c->pol, c->tok, c->tok + o->B * o->T, o->B, o->T, NULL) != MOE_OK) die("forward", c->pol.err.msg);
        moe_model_backward(&c->pol, 1.0f);
        moe_clip_grad_norm(&c->pol.S, 1.0f);
        moe_adamw_step(&c->pol.S, &ac, lr, s + 1);
        if ((s + 1) % 250 == 0 || s + 1 == o->pre_steps) {
            printf("seed=%d pretrain step=%d loss_bpb=%.4f\n", o->seed, s + 1, c->pol.loss / log(2.0));
            fflush(stdout);
        }
    }
}

/* HMA's loss: the merged model's mean cross-entropy on the kept responses (prompt bytes carry no
   loss), and its gradient; the policy model computes it (its parameters are overwritten) */
static moe_status hma_loss(double *loss, float *grad, const moe_store *merged, void *user) {
    ctx *c = (ctx *)user;
    rwd_rsf *r = &c->tr;
    moe_model *m = &c->pol;
    int i, b, t, total = 0, B = m->max_B;
    double sum = 0.0;
    for (i = 0; i < r->n_kept; i++) total += r->kept_len[i] - r->kept_prompt[i];
    if (total < 1) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "HMA needs kept responses");
    memcpy(m->S.params, merged->params, m->S.numel * sizeof(float));
    moe_store_zero_grad(&m->S);
    for (i = 0; i < r->n_kept; i += B) {
        int nb = r->n_kept - i < B ? r->n_kept - i : B, T = 1, cnt = 0;
        moe_status st;
        for (b = 0; b < nb; b++)
            if (r->kept_len[i + b] - 1 > T) T = r->kept_len[i + b] - 1;
        for (b = 0; b < nb; b++) {
            const int *s = r->kept_tok + (size_t)(i + b) * (size_t)r->seq_cap;
            int len = r->kept_len[i + b], np = r->kept_prompt[i + b];
            for (t = 0; t < T; t++) {
                int in_seq = t + 1 < len;
                c->tok[b * T + t] = in_seq ? s[t] : 0;
                c->tok[nb * T + b * T + t] = in_seq && t + 1 >= np ? s[t + 1] : -1;
                cnt += in_seq && t + 1 >= np;
            }
        }
        if (cnt == 0) continue;
        if ((st = moe_model_forward(m, c->tok, c->tok + nb * T, nb, T, NULL)) != MOE_OK) return st;
        sum += m->loss * cnt;
        if ((st = moe_model_backward(m, (float)cnt / (float)total)) != MOE_OK) return st;
    }
    *loss = sum / total;
    memcpy(grad, m->S.grads, m->S.numel * sizeof(float));
    return MOE_OK;
}

/* normalised hypervolume of n points (x, y), both maximised, above ref within the box of size
   (sx, sy); NaN for an empty box */
static double hv(const double *pts, int n, const double *ref, double sx, double sy) {
    double h = 0.0;
    moe_err e;
    if (!(sx > 0.0) || !(sy > 0.0)) return NAN;
    if (rwd_hypervolume(&h, pts, (size_t)n, 2, ref, &e) != MOE_OK) die("hypervolume", e.msg);
    return h / (sx * sy);
}

/* hypervolume of the tax front of the rows of experiment exp (label NULL: any): (style, -tax) */
static double hv_tax(const ctx *c, const char *exp, const char *label, const point *pre, const point *post, int with_ends) {
    double pts[2 * (MAX_ROWS + 2)], ref[2];
    int i, n = 0;
    for (i = 0; i < c->n_rows; i++)
        if (!strcmp(c->rows[i].exp, exp) && (!label || !strcmp(c->rows[i].label, label))) {
            pts[2 * n] = c->rows[i].style;
            pts[2 * n + 1] = -c->rows[i].tax;
            n++;
        }
    if (with_ends) {
        pts[2 * n] = pre->style; pts[2 * n + 1] = -pre->tax; n++;
        pts[2 * n] = post->style; pts[2 * n + 1] = -post->tax; n++;
    }
    ref[0] = pre->style;
    ref[1] = -post->tax;
    return hv(pts, n, ref, post->style - pre->style, post->tax - pre->tax);
}

/* mean over the rows of experiment exp (label NULL: any) of (their tax - the tax of the averaging curve at their
   reward, linear between its lambdas): < 0 = below the averaging front (better); NaN if none
   falls within the curve's reward range */
static double tax_gap(const ctx *c, const char *exp, const char *label) {
    double sum = 0.0;
    int i, j, n = 0;
    for (i = 0; i < c->n_rows; i++) {
        const row *h = &c->rows[i];
        const row *prev = NULL;
        if (strcmp(h->exp, exp) || (label && strcmp(h->label, label))) continue;
        for (j = 0; j < c->n_rows; j++) { /* the averaging rows come in increasing lambda */
            const row *u = &c->rows[j];
            if (strcmp(u->exp, "ma")) continue;
            if (prev && ((prev->style <= h->style && h->style <= u->style) || (u->style <= h->style && h->style <= prev->style)) &&
                prev->style != u->style) {
                double f = (h->style - prev->style) / (u->style - prev->style);
                sum += h->tax - (prev->tax + f * (u->tax - prev->tax));
                n++;
                break;
            }
            prev = u;
        }
    }
    return n ? sum / n : NAN;
}

/* the rows of experiment exp (label NULL: any) as plot arrays */
static int series_of(const ctx *c, const char *exp, const char *label, float *x, float *y, int tax_x) {
    int i, n = 0;
    for (i = 0; i < c->n_rows; i++)
        if (!strcmp(c->rows[i].exp, exp) && (!label || !strcmp(c->rows[i].label, label))) {
            x[n] = (float)(tax_x ? c->rows[i].tax : c->rows[i].verb);
            y[n] = (float)c->rows[i].style;
            n++;
        }
    return n;
}

int main(int argc, char **argv) {
    static ctx C;
    ctx *c = &C;
    static const char default_angles[] = "0,-45,45,90";
    options o;
    brown_corpus cp;
    files_err fe;
    files_atomic fa;
    FILE *csv;
    moe_model_config mc = moe_model_config_default();
    rwd_rsf_config rc = rwd_rsf_config_default(), ec;
    moe_store S_pre, S_post[MAX_DIRS], S_tmp;
    moe_err e;
    point pre, post, fin[MAX_DIRS];
    double head_acc, t0 = moe_time_seconds(), theta[MAX_DIRS];
    double lam_grid[11], part_grid[4], hma_means[3], merge_t[3];
    int n_lam, n_part, n_hma, n_merge, rcode, i, j, g, dd, main_dir, lo_dir, hi_dir;
    int block[256], n_blocks, pivots[MAX_LAYERS];
    char path[1024], extra[256];
    flag fl[] = {
        flag_switch("--quick", &o.quick, "a smoke run: a tiny model, few steps, few points"),
        flag_int("--seed", &o.seed, 0, 1000000, "the run's seed (initialisation, data, sampling)"),
        flag_int("--d", &o.d, 8, 512, "model width"),
        flag_int("--layers", &o.layers, 2, MAX_LAYERS, "layers (part-wise averaging splits them in halves; HMA: one block each)"),
        flag_int("--experts", &o.experts, 0, 64, "experts of every layer's MoE FFN (top-2, width 2d each); 0 = a dense SwiGLU FFN of width 3d"),
        flag_int("--pre-steps", &o.pre_steps, 1, 1000000, "pre-training steps"),
        flag_float("--pre-lr", &o.pre_lr, 0, 1, "pre-training peak learning rate (warm-up, cosine to a tenth)"),
        flag_string("--angles", &o.angles, "LIST", "directions t in degrees, v = (cos t, sin t) over (style, verbosity): 0 (style only; the averaging experiments' policy) among them; the smallest and largest are merged"),
        flag_int("--rounds", &o.rounds, 1, 100, "RSF rounds per direction"),
        flag_int("--prompts", &o.prompts, 1, MAX_PROMPTS, "prompts per RSF round (a fresh draw each round)"),
        flag_int("--cands", &o.cands, 1, 64, "candidates per prompt (best-of-n under the direction)"),
        flag_int("--max-new", &o.max_new, 8, 64, "response bytes at most (a response stops after a '.')"),
        flag_int("--epochs", &o.epochs, 1, 100, "fine-tuning passes over the kept set per round"),
        flag_float("--lr", &o.lr, 0, 1, "RSF fine-tuning learning rate"),
        flag_int("--eval-prompts", &o.eval_prompts, 1, MAX_PROMPTS, "validation prompts per evaluation"),
        flag_int("--eval-cands", &o.eval_cands, 1, 16, "responses per validation prompt"),
        flag_int("--eval-windows", &o.eval_windows, 1, 4096, "validation windows per tax genre"),
        flag_int("--head-pairs", &o.head_pairs, 16, 100000, "training pairs of the style head"),
        flag_int("--hma-steps", &o.hma_steps, 1, 10000, "AdamW steps of the HMA search"),
        flag_int("--threads", &o.threads, 1, 256, "OpenMP threads"),
        flag_string("--genres", &o.genres, "LIST", "pre-training genres (the target among them)"),
        flag_string("--target", &o.target, "GENRE", "the genre whose style the reward head prefers"),
        flag_string("--data", &o.data_dir, "DIR", "the Brown corpus folder"),
        flag_string("--out", &o.out, "DIR", "output folder"),
    };
    flags_program p;
    memset(&o, 0, sizeof o);
    o.seed = 1; o.d = 64; o.layers = 4; o.experts = 4; o.pre_steps = 1500; o.pre_lr = 3e-3f; o.angles = default_angles; o.rounds = 6; o.prompts = 48;
    o.cands = 8; o.max_new = 48; o.epochs = 2; o.lr = 1e-3f; o.eval_prompts = 24; o.eval_cands = 8; o.eval_windows = 32;
    o.head_pairs = 3000; o.hma_steps = 40; o.threads = 1; o.B = 16; o.T = 96;
    o.genres = "news,hobbies,learned,fiction,romance"; o.target = "romance"; o.data_dir = "data/brown"; o.out = "out";
    p = flags_program_make("align", "alignment of the tiny LM under preference directions (RSF, DPA) against the alignment tax: model averaging, part-wise averaging, HMA, merging",
                           "reads <data>/{train,val}/<genre>.txt; writes <out>/align_s<seed>.csv, <out>/align_tax_s<seed>.png, <out>/align_dirs_s<seed>.png",
                           fl, FLAGS_COUNT(fl));
    if ((rcode = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rcode;
#ifdef _OPENMP
    omp_set_num_threads(o.threads);
#endif
    if (o.quick) {
        o.d = 32; o.layers = 2; o.pre_steps = 30; o.B = 8; o.T = 48; o.rounds = 2; o.prompts = 6; o.cands = 4; o.max_new = 24;
        o.eval_prompts = 4; o.eval_cands = 4; o.eval_windows = 8; o.head_pairs = 200; o.hma_steps = 3; o.epochs = 1;
        if (o.angles == default_angles) o.angles = "0,90";
    }
    c->o = &o;
    if (!brown_load(&cp, o.data_dir, o.genres)) return 1;
    c->cp = &cp;
    c->target = -1;
    for (g = 0; g < cp.n; g++)
        if (!strcmp(cp.names[g], o.target)) c->target = g;
    if (c->target < 0 || cp.n < 2) {
        fprintf(stderr, "align: the target genre '%s' must be one of at least 2 pre-training genres '%s'\n", o.target, o.genres);
        brown_free(&cp);
        return 2;
    }
    if (files_mkdirs(o.out, &fe) != 0) {
        fprintf(stderr, "align: %s\n", fe.msg);
        brown_free(&cp);
        return 1;
    }
    /* the points of each sweep */
    if (o.quick) {
        lam_grid[0] = 0.0; lam_grid[1] = 0.6; lam_grid[2] = 1.0; n_lam = 3; /* 0.6: HMA's mean */
        part_grid[0] = 0.5; n_part = 1;
        hma_means[0] = 0.6; n_hma = 1;
        merge_t[0] = 0.5; n_merge = 1;
    } else {
        for (i = 0; i <= 10; i++) lam_grid[i] = 0.1 * i;
        n_lam = 11;
        for (i = 0; i < 4; i++) part_grid[i] = 0.25 * i;
        n_part = 4;
        hma_means[0] = 0.4; hma_means[1] = 0.6; hma_means[2] = 0.8; n_hma = 3;
        merge_t[0] = 0.25; merge_t[1] = 0.5; merge_t[2] = 0.75; n_merge = 3;
    }
    /* the directions: 0 among them (the main policy), the two extremes merged */
    {
        const char *a = o.angles;
        char *end;
        main_dir = lo_dir = hi_dir = -1;
        for (o.dirs = 0; *a && o.dirs < MAX_DIRS; o.dirs++) {
            double deg = strtod(a, &end);
            if (end == a || deg < -90.0 || deg > 90.0 || (*end && *end != ',')) break;
            theta[o.dirs] = deg * PI / 180.0;
            if (deg == 0.0) main_dir = o.dirs;
            a = *end ? end + 1 : end;
        }
        if (*a || o.dirs < 2 || main_dir < 0) {
            fprintf(stderr, "align: --angles '%s': 2 to %d angles in [-90, 90] degrees, 0 among them\n", o.angles, MAX_DIRS);
            brown_free(&cp);
            return 2;
        }
        for (dd = 0; dd < o.dirs; dd++) {
            if (lo_dir < 0 || theta[dd] < theta[lo_dir]) lo_dir = dd;
            if (hi_dir < 0 || theta[dd] > theta[hi_dir]) hi_dir = dd;
        }
    }

    /* the models: policy (training batches) and evaluation copy, one layout */
    mc.vocab = 256; mc.max_seq = o.T; mc.d = o.d; mc.n_layers = o.layers; mc.n_heads = 4; mc.d_ff = 3 * o.d; mc.pos = MOE_POS_ROPE;
    mc.moe_every = o.experts > 0;
    mc.moe.n_experts = o.experts > 0 ? o.experts : 2;
    mc.moe.top_k = 2;
    mc.moe.d_ff = 2 * o.d;
    if (moe_model_init(&c->pol, &mc, o.B, o.T) != MOE_OK) die("model", c->pol.err.msg);
    if (moe_model_init(&c->ev, &mc, o.B, o.T) != MOE_OK) die("model", c->ev.err.msg);
    c->tok = (int *)malloc(sizeof(int) * 2 * (size_t)(o.B * o.T));
    CK(store_like(&S_pre, &c->pol.S), "store", &c->pol.S.err);
    CK(store_like(&S_tmp, &c->pol.S), "store", &c->pol.S.err);
    for (dd = 0; dd < o.dirs; dd++) CK(store_like(&S_post[dd], &c->pol.S), "store", &c->pol.S.err);

    rc.k = 2;
    rc.n_candidates = o.cands;
    rc.max_new = o.max_new;
    rc.stop = '.';
    rc.max_prompts = o.prompts;
    rc.max_prompt_bytes = PROMPT_BYTES;
    rc.epochs = o.epochs;
    rc.lr = o.lr;
    ec = rc;
    ec.n_candidates = o.eval_cands;
    ec.max_prompts = 1;
    ec.seed = 999;
    if (rwd_rsf_init(&c->evr, &c->ev, &ec) != MOE_OK) die("evaluation sampler", c->evr.err.msg);

    printf("alignment against the tax: RSF under directions (DPA, arXiv 2402.18571), averaging and HMA (arXiv 2309.06256), merging\n");
    if (o.experts > 0)
        printf("  model            d %d, %d MoE layers (%d experts, top-2, width %d), 4 heads, RoPE, bytes, window %d (%zu parameters)\n", o.d,
               o.layers, o.experts, 2 * o.d, o.T, c->pol.S.numel);
    else
        printf("  model            d %d, %d dense layers (d_ff %d), 4 heads, RoPE, bytes, window %d (%zu parameters)\n", o.d, o.layers, 3 * o.d,
               o.T, c->pol.S.numel);
    printf("  pre-training     %s: %d steps of %d x %d bytes, lr %g (cosine), AdamW, clip 1\n", o.genres, o.pre_steps, o.B, o.T,
           (double)o.pre_lr);
    printf("  tax              bits/byte on %d validation windows of each genre but %s\n", o.eval_windows, o.target);
    printf("  reward           style: linear BT head on hashed words (1024 buckets, bigrams), %s vs the others, %d pairs;\n", o.target,
           o.head_pairs);
    printf("                   verbosity: response code points / %d; responses stop after '.'\n", o.max_new);
    printf("  RSF              directions %s deg, %d rounds of %d prompts x %d candidates, %d epochs at lr %g per round\n", o.angles,
           o.rounds, o.prompts, o.cands, o.epochs, (double)o.lr);
    printf("  evaluation       %d validation prompts x %d responses (the same sampler seeds for every model)\n", o.eval_prompts,
           o.eval_cands);
    printf("  averaging        MA over %d lambdas; part-wise early/late half at %d lambdas; HMA (one block per layer, %d steps) at %d means\n",
           n_lam, n_part, o.hma_steps, n_hma);
    printf("  merging          the smallest and largest angle's policies: linear, SLERP, TIES (density 0.5), DARE linear (density 0.5) at %d weights\n",
           n_merge);
    printf("  seed             %d; threads %d\n", o.seed, o.threads);
    fflush(stdout);

    /* 1. pre-training */
    moe_model_init_weights(&c->pol, 100 + (uint64_t)o.seed);
    pretrain(c, 200 + (uint64_t)o.seed);
    memcpy(S_pre.params, c->pol.S.params, S_pre.numel * sizeof(float));

    /* 2. the reward and the prompts */
    head_acc = train_head(c, 300 + (uint64_t)o.seed);
    printf("seed=%d style_head heldout_accuracy=%.4f\n", o.seed, head_acc);
    {
        moe_rng r;
        moe_rng_seed(&r, 400 + (uint64_t)o.seed);
        for (i = 0; i < MAX_PROMPTS; i++) {
            make_prompt(c->eval_prompts[i], &cp, i % cp.n, 1, &r);
            c->eval_ptr[i] = c->eval_prompts[i];
        }
    }
    pre = record(c, "pre", "pre", 0.0, S_pre.params, NULL);

    /* 3. RSF per direction; 4. the averaging experiments on the style policy */
    for (dd = 0; dd < o.dirs; dd++) {
        double v[2], dirs[2 * MAX_PROMPTS];
        moe_rng pr;
        int t;
        rwd_rsf_config rcd = rc;
        rwd_dpa_direction_angle(v, theta[dd]);
        for (i = 0; i < o.prompts; i++) { dirs[2 * i] = v[0]; dirs[2 * i + 1] = v[1]; }
        memcpy(c->pol.S.params, S_pre.params, S_pre.numel * sizeof(float));
        memset(c->pol.S.adam_m, 0, S_pre.numel * sizeof(float));
        memset(c->pol.S.adam_v, 0, S_pre.numel * sizeof(float));
        rcd.seed = 500 + 10 * (uint64_t)o.seed + (uint64_t)dd;
        if (rwd_rsf_init(&c->tr, &c->pol, &rcd) != MOE_OK) die("RSF", c->tr.err.msg);
        moe_rng_seed(&pr, 600 + (uint64_t)o.seed); /* the same prompts for every direction */
        for (t = 0; t < o.rounds; t++) {
            rwd_rsf_stats st;
            memset(&st, 0, sizeof st);
            char lab[32];
            for (i = 0; i < o.prompts; i++) {
                make_prompt(c->train_prompts[i], &cp, moe_rng_below(&pr, cp.n), 0, &pr);
                c->train_ptr[i] = c->train_prompts[i];
            }
            if (rwd_rsf_round(&c->tr, c->train_ptr, dirs, o.prompts, rwd_rsf_head_score, &c->sc, &st) != MOE_OK) die("RSF round", c->tr.err.msg);
            snprintf(lab, sizeof lab, "theta%.0f", theta[dd] * 180.0 / PI);
            snprintf(extra, sizeof extra, "round=%d kept_reward=%.4f all_reward=%.4f kept_loss_before=%.4f kept_loss_after=%.4f", t + 1,
                     st.mean_kept, st.mean_all, st.loss_before, st.loss_after);
            fin[dd] = record(c, "rsf", lab, t + 1, c->pol.S.params, extra);
        }
        memcpy(S_post[dd].params, c->pol.S.params, S_pre.numel * sizeof(float));
        if (dd == main_dir) {
            int lp, K = o.layers;
            double a[MAX_LAYERS], lam[MAX_LAYERS], trace[10000];
            rwd_hma_config hc = rwd_hma_config_default();
            post = fin[dd];
            /* model averaging over lambda */
            for (i = 0; i < n_lam; i++) {
                CK(rwd_average(&S_tmp, &S_pre, &S_post[dd], lam_grid[i], &e), "average", &e);
                record(c, "ma", "ma", lam_grid[i], S_tmp.params, NULL);
            }
            /* part-wise: the early or the late half averaged, the other half and everything
               outside the layers (embedding, final norm) from the aligned model */
            pivots[0] = o.layers / 2 - 1;
            for (lp = 0; lp < 2; lp++)
                for (i = 0; i < n_part; i++) {
                    double lb[2];
                    lb[0] = lp == 0 ? part_grid[i] : 1.0;
                    lb[1] = lp == 0 ? 1.0 : part_grid[i];
                    CK(rwd_average_partwise(&S_tmp, &S_pre, &S_post[dd], pivots, 1, lb, 1.0, &e), "part-wise average", &e);
                    record(c, "part", lp == 0 ? "early" : "late", part_grid[i], S_tmp.params, NULL);
                }
            /* HMA: the style policy's own selected samples (best of n under v on a fresh draw of
               prompts), one block per layer, against uniform ratios with the same tensors */
            rwd_rsf_clear(&c->tr);
            for (i = 0; i < o.prompts; i++) {
                make_prompt(c->train_prompts[i], &cp, moe_rng_below(&pr, cp.n), 0, &pr);
                if (rwd_rsf_sample(&c->tr, c->train_prompts[i], v, rwd_rsf_head_score, &c->sc) != MOE_OK) die("HMA samples", c->tr.err.msg);
                if (c->tr.resp_len[c->tr.best] > 0 && rwd_rsf_keep(&c->tr, c->tr.best) != MOE_OK) die("HMA samples", c->tr.err.msg);
            }
            CK(rwd_pivots_equal(pivots, o.layers, K, &e), "pivots", &e);
            CK(rwd_block_map(block, &n_blocks, &S_pre, pivots, K - 1, &e), "blocks", &e);
            hc.steps = o.hma_steps;
            for (i = 0; i < n_hma; i++) {
                char lams[160];
                int n = 0;
                hc.mean = hma_means[i];
                if (rwd_hma_search(a, lam, trace, &S_tmp, &S_pre, &S_post[dd], block, K, &hc, hma_loss, c, &e) != MOE_OK) die("HMA search", e.msg);
                for (j = 0; j < K; j++) n += snprintf(lams + n, sizeof lams - (size_t)n, "%s%.3f", j ? "/" : "", lam[j]);
                snprintf(extra, sizeof extra, "lambdas=%s objective_first=%.4f objective_last=%.4f", lams, trace[0], trace[o.hma_steps - 1]);
                record(c, "hma", "hma", hma_means[i], S_tmp.params, extra);
                for (j = 0; j < K; j++) lam[j] = hma_means[i];
                CK(rwd_hma_merge(&S_tmp, &S_pre, &S_post[dd], block, K, lam, &hc, &e), "uniform merge", &e);
                record(c, "uniform", "uniform", hma_means[i], S_tmp.params, NULL);
                /* the alternative: every tensor of a layer follows its block, the rest the mean;
                   its uniform twin is plain averaging at lambda = the mean */
                hc.follow = RWD_HMA_FOLLOW_ALL;
                if (rwd_hma_search(a, lam, trace, &S_tmp, &S_pre, &S_post[dd], block, K, &hc, hma_loss, c, &e) != MOE_OK) die("HMA search", e.msg);
                for (n = 0, j = 0; j < K; j++) n += snprintf(lams + n, sizeof lams - (size_t)n, "%s%.3f", j ? "/" : "", lam[j]);
                snprintf(extra, sizeof extra, "lambdas=%s objective_first=%.4f objective_last=%.4f", lams, trace[0], trace[o.hma_steps - 1]);
                record(c, "hma_all", "hma_all", hma_means[i], S_tmp.params, extra);
                hc.follow = RWD_HMA_FOLLOW_LINEAR;
            }
        }
        rwd_rsf_free(&c->tr);
    }

    /* 5. merging the two extreme policies */
    {
        const moe_store *models[2];
        static const char *const names[4] = {"linear", "slerp", "ties", "dare_linear"};
        static const rwd_merge_method meth[4] = {RWD_MERGE_LINEAR, RWD_MERGE_SLERP, RWD_MERGE_TIES, RWD_MERGE_DARE_LINEAR};
        int mth;
        models[0] = &S_post[lo_dir];
        models[1] = &S_post[hi_dir];
        for (mth = 0; mth < 4; mth++)
            for (i = 0; i < n_merge; i++) {
                rwd_merge_config mg = rwd_merge_config_default(meth[mth]);
                double w[2];
                w[0] = 1.0 - merge_t[i];
                w[1] = merge_t[i];
                if (meth[mth] == RWD_MERGE_SLERP) w[0] = merge_t[i];
                if (meth[mth] == RWD_MERGE_TIES || meth[mth] == RWD_MERGE_DARE_LINEAR) mg.density = 0.5;
                mg.seed = 700 + (uint64_t)o.seed;
                CK(rwd_merge(&S_tmp, mg.method == RWD_MERGE_LINEAR || mg.method == RWD_MERGE_SLERP ? NULL : &S_pre, models, 2, w, &mg, &e),
                   "merge", &e);
                record(c, "merge", names[mth], merge_t[i], S_tmp.params, NULL);
            }
    }

    /* the CSV */
    snprintf(path, sizeof path, "%s/align_s%d.csv", o.out, o.seed);
    if (!(csv = files_atomic_open(&fa, path, &fe))) die("csv", fe.msg);
    fprintf(csv, "seed,experiment,label,param,style,verbosity,tax_bpb\n");
    for (i = 0; i < c->n_rows; i++)
        fprintf(csv, "%d,%s,%s,%.4f,%.6f,%.6f,%.6f\n", o.seed, c->rows[i].exp, c->rows[i].label, c->rows[i].param, c->rows[i].style,
                c->rows[i].verb, c->rows[i].tax);
    if (files_atomic_commit(&fa, !ferror(csv), &fe) != 0) die("csv", fe.msg);

    /* fronts and hypervolumes */
    {
        double hv_rounds, hv_ma, hv_early, hv_late, hv_hma, hv_uni, hv_hma_all, hv_dirs, hv_m[4], rho_v, rho_s;
        double pts[2 * MAX_ROWS], ref[2], lo[2] = {1e300, 1e300}, hi[2] = {-1e300, -1e300}, th[MAX_DIRS], sv[MAX_DIRS], ss[MAX_DIRS];
        int hma_better = 0, hma_all_better = 0, n_all_pairs = 0, n, mth;
        static const char *const names[4] = {"linear", "slerp", "ties", "dare_linear"};
        char lab0[32];
        snprintf(lab0, sizeof lab0, "theta0");
        hv_rounds = hv_tax(c, "rsf", lab0, &pre, &post, 1);
        hv_ma = hv_tax(c, "ma", NULL, &pre, &post, 1);
        hv_early = hv_tax(c, "part", "early", &pre, &post, 1);
        hv_late = hv_tax(c, "part", "late", &pre, &post, 1);
        hv_hma = hv_tax(c, "hma", NULL, &pre, &post, 1);
        hv_uni = hv_tax(c, "uniform", NULL, &pre, &post, 1);
        hv_hma_all = hv_tax(c, "hma_all", NULL, &pre, &post, 1);
        for (i = 0; i < c->n_rows; i++)
            if (!strcmp(c->rows[i].exp, "hma")) {
                const row *h = &c->rows[i], *u = &c->rows[i + 1]; /* its uniform twin follows it */
                hma_better += h->style >= u->style && h->tax <= u->tax && (h->style > u->style || h->tax < u->tax);
            } else if (!strcmp(c->rows[i].exp, "hma_all")) {
                const row *h = &c->rows[i];
                for (j = 0; j < c->n_rows; j++) {
                    const row *u = &c->rows[j]; /* averaging at the same lambda */
                    if (strcmp(u->exp, "ma") || fabs(u->param - h->param) > 1e-9) continue;
                    n_all_pairs++;
                    hma_all_better += h->style >= u->style && h->tax <= u->tax && (h->style > u->style || h->tax < u->tax);
                }
            }
        /* (style, verbosity) fronts: normalised by the box of every point of the run */
        for (i = 0; i < c->n_rows; i++) {
            lo[0] = c->rows[i].style < lo[0] ? c->rows[i].style : lo[0];
            lo[1] = c->rows[i].verb < lo[1] ? c->rows[i].verb : lo[1];
            hi[0] = c->rows[i].style > hi[0] ? c->rows[i].style : hi[0];
            hi[1] = c->rows[i].verb > hi[1] ? c->rows[i].verb : hi[1];
        }
        ref[0] = lo[0];
        ref[1] = lo[1];
        for (dd = 0; dd < o.dirs; dd++) {
            pts[2 * dd] = fin[dd].style;
            pts[2 * dd + 1] = fin[dd].verb;
            th[dd] = theta[dd];
            sv[dd] = fin[dd].verb;
            ss[dd] = fin[dd].style;
        }
        hv_dirs = hv(pts, o.dirs, ref, hi[0] - lo[0], hi[1] - lo[1]);
        rho_v = rwd_spearman(th, sv, (size_t)o.dirs);
        rho_s = rwd_spearman(th, ss, (size_t)o.dirs);
        for (mth = 0; mth < 4; mth++) {
            n = 0;
            pts[2 * n] = fin[lo_dir].style; pts[2 * n + 1] = fin[lo_dir].verb; n++;
            pts[2 * n] = fin[hi_dir].style; pts[2 * n + 1] = fin[hi_dir].verb; n++;
            for (i = 0; i < c->n_rows; i++)
                if (!strcmp(c->rows[i].exp, "merge") && !strcmp(c->rows[i].label, names[mth])) {
                    pts[2 * n] = c->rows[i].style;
                    pts[2 * n + 1] = c->rows[i].verb;
                    n++;
                }
            hv_m[mth] = hv(pts, n, ref, hi[0] - lo[0], hi[1] - lo[1]);
        }
        printf("summary seed=%d head_acc=%.4f pre_style=%.4f post_style=%.4f pre_tax=%.4f post_tax=%.4f hv_rounds=%.4f hv_ma=%.4f "
               "hv_early=%.4f hv_late=%.4f hv_hma=%.4f hv_uniform=%.4f hma_dominates=%d of=%d hv_hma_all=%.4f hma_all_dominates_ma=%d of=%d "
               "tax_gap_rounds=%.4f tax_gap_early=%.4f tax_gap_late=%.4f tax_gap_hma=%.4f tax_gap_uniform=%.4f tax_gap_hma_all=%.4f "
               "hv_dirs=%.4f hv_linear=%.4f hv_slerp=%.4f hv_ties=%.4f hv_dare=%.4f rho_theta_verbosity=%.3f rho_theta_style=%.3f seconds=%.1f\n",
               o.seed, head_acc, pre.style, post.style, pre.tax, post.tax, hv_rounds, hv_ma, hv_early, hv_late, hv_hma, hv_uni, hma_better,
               n_hma, hv_hma_all, hma_all_better, n_all_pairs, tax_gap(c, "rsf", lab0), tax_gap(c, "part", "early"),
               tax_gap(c, "part", "late"), tax_gap(c, "hma", NULL), tax_gap(c, "uniform", NULL), tax_gap(c, "hma_all", NULL), hv_dirs, hv_m[0], hv_m[1], hv_m[2], hv_m[3], rho_v, rho_s, moe_time_seconds() - t0);
    }

    /* the plots */
    {
        static float x[8][MAX_ROWS], y[8][MAX_ROWS];
        plot_series s[8];
        plot_chart ch;
        char lab0[32], title[128];
        int ns = 0, k;
        static const char *const exps[7] = {"rsf", "ma", "part", "part", "hma", "uniform", "hma_all"};
        static const char *const labs[7] = {NULL, NULL, "early", "late", NULL, NULL, NULL};
        static const char *const legend[7] = {"RSF rounds (t=0)", "averaging (lambda)", "early half averaged", "late half averaged", "HMA",
                                              "uniform (HMA's tensors)", "HMA, all tensors"};
        memset(s, 0, sizeof s);
        snprintf(lab0, sizeof lab0, "theta0");
        x[0][0] = (float)pre.tax; y[0][0] = (float)pre.style;
        for (k = 0; k < 7; k++) {
            int off = k == 0, n = series_of(c, exps[k], k == 0 ? lab0 : labs[k], x[ns] + off, y[ns] + off, 1) + off;
            if (n == 0) continue;
            s[ns].name = legend[k]; s[ns].x = x[ns]; s[ns].y = y[ns]; s[ns].n = n;
            s[ns].style = k >= 4 ? PLOT_POINTS : PLOT_LINE_POINTS;
            ns++;
        }
        memset(&ch, 0, sizeof ch);
        snprintf(title, sizeof title, "style reward vs alignment tax (seed %d)", o.seed);
        ch.title = title; ch.xlabel = "tax: bits/byte on the other genres"; ch.ylabel = "style reward";
        snprintf(path, sizeof path, "%s/align_tax_s%d.png", o.out, o.seed);
        if (plot_lines(path, &ch, s, ns) != PLOT_OK) fprintf(stderr, "align: cannot write %s\n", path);
        /* style against verbosity */
        ns = 0;
        memset(s, 0, sizeof s);
        for (dd = 0; dd < o.dirs; dd++) { /* in the order of the angle */
            int rank = 0;
            for (j = 0; j < o.dirs; j++) rank += theta[j] < theta[dd];
            x[0][rank] = (float)fin[dd].verb;
            y[0][rank] = (float)fin[dd].style;
        }
        s[0].name = "RSF policies by angle"; s[0].x = x[0]; s[0].y = y[0]; s[0].n = o.dirs; s[0].style = PLOT_LINE_POINTS;
        ns = 1;
        {
            static const char *const names[4] = {"linear", "slerp", "ties", "dare_linear"};
            for (k = 0; k < 4; k++) {
                int n = series_of(c, "merge", names[k], x[ns], y[ns], 0);
                s[ns].name = names[k]; s[ns].x = x[ns]; s[ns].y = y[ns]; s[ns].n = n; s[ns].style = PLOT_POINTS;
                ns++;
            }
        }
        x[ns][0] = (float)pre.verb; y[ns][0] = (float)pre.style;
        s[ns].name = "pre-trained"; s[ns].x = x[ns]; s[ns].y = y[ns]; s[ns].n = 1; s[ns].style = PLOT_POINTS;
        ns++;
        memset(&ch, 0, sizeof ch);
        snprintf(title, sizeof title, "directions and merges (seed %d)", o.seed);
        ch.title = title; ch.xlabel = "verbosity"; ch.ylabel = "style reward";
        snprintf(path, sizeof path, "%s/align_dirs_s%d.png", o.out, o.seed);
        if (plot_lines(path, &ch, s, ns) != PLOT_OK) fprintf(stderr, "align: cannot write %s\n", path);
    }
    printf("csv=%s/align_s%d.csv\n", o.out, o.seed);

    rwd_rsf_free(&c->evr);
    rwd_rsf_head_scorer_free(&c->sc);
    rwd_head_free(&c->head);
    moe_store_free(&c->hs);
    moe_store_free(&S_pre);
    moe_store_free(&S_tmp);
    for (dd = 0; dd < o.dirs; dd++) moe_store_free(&S_post[dd]);
    moe_model_free(&c->pol);
    moe_model_free(&c->ev);
    free(c->tok);
    brown_free(&cp);
    return 0;
}
