/* test_quickstart.c - the QUICK STARTs at the top of moe.h and reward.h as programs. Each is
   compiled here verbatim, inside a function that supplies the user's data, run, and checked
   to do what it says; the last test reads both headers and checks that every line of every
   QUICK START is a line of this file, so the headers' text cannot drift from code that
   compiles against the current API. Edit a QUICK START here and in the header together. */
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* includes moe.h */
#include "test.h"

/* ---- moe.h: one MoE layer trained on the user's data ------------------------------------ */

/* the user's loss, mean squared error against a target: dy = dLoss/dy; remembers the loss of
   the first and of the latest call */
static const float *qs_target;
static int qs_width, qs_calls;
static double qs_first_loss, qs_last_loss;

static void your_loss_gradient(float *dy, const float *y, int T) {
    size_t i, n = (size_t)T * qs_width;
    double loss = 0.0;
    for (i = 0; i < n; i++) {
        float e = y[i] - qs_target[i];
        loss += (double)e * e;
        dy[i] = 2.0f * e / (float)n;
    }
    qs_last_loss = loss / (double)n;
    if (qs_calls++ == 0) qs_first_loss = qs_last_loss;
}

static int quickstart_moe(const float *x, float *y, float *dx, float *dy, int T, int n_steps, float lr) {
    // x, y, dx, dy: (T, c.d) floats, T <= 1024 tokens a call; x is your input
    moe_store S;                       // THE parameter store: params/grads/Adam m,v
    moe_layer L;                       // one MoE layer: config, tensor ids, activations
    moe_rng rng;
    moe_layer_config c = moe_layer_config_default();
    moe_adamw_config opt = moe_adamw_config_default();
    long long step;
    c.d = 64; c.d_ff = 128; c.n_experts = 8; c.top_k = 2;
    moe_rng_seed(&rng, 1);
    moe_store_init(&S);
    if (moe_layer_init(&L, &c, &S, "moe.", 1024) != MOE_OK) return 1;  // L.err.msg: why
    if (moe_store_alloc(&S, 1) != MOE_OK) return 1;   // params + grads + Adam moments
    moe_layer_init_weights(&L, &S, &rng);
    for (step = 1; step <= n_steps; step++) {
        moe_layer_forward(&L, &S, y, x, T, NULL);     // y = MoE(x); NULL: no per-call
                                                         // inputs (see moe_layer_args)
        your_loss_gradient(dy, y, T);                 // dy = dLoss/dy
        moe_store_zero_grad(&S);
        memset(dx, 0, sizeof(float) * T * c.d);
        moe_layer_backward(&L, &S, dx, dy, x, NULL);  // S.grads += (aux losses too), dx +=
        moe_adamw_step(&S, &opt, lr, step);
    }
    moe_layer_free(&L);  moe_store_free(&S);
    return 0;
}

static void test_moe_quickstart(void) {
    int T = 96, d = 64, i, j;
    float *x = (float *)malloc(sizeof(float) * (size_t)T * d), *target = (float *)malloc(sizeof(float) * (size_t)T * d);
    float *y = (float *)malloc(sizeof(float) * (size_t)T * d), *dx = (float *)malloc(sizeof(float) * (size_t)T * d);
    float *dy = (float *)malloc(sizeof(float) * (size_t)T * d), *w = (float *)malloc(sizeof(float) * (size_t)d * d);
    moe_rng r;
    TEST_BEGIN("moe.h QUICK START: one MoE layer trains on its own data");
    moe_rng_seed(&r, 7);
    for (i = 0; i < T * d; i++) x[i] = moe_rng_normal(&r);
    for (i = 0; i < d * d; i++) w[i] = moe_rng_normal(&r) / 8.0f;
    for (i = 0; i < T; i++) /* a smooth target the layer can fit: tanh(x . w) */
        for (j = 0; j < d; j++) {
            double s = 0.0;
            int k;
            for (k = 0; k < d; k++) s += (double)x[i * d + k] * w[k * d + j];
            target[i * d + j] = (float)tanh(s);
        }
    qs_target = target;
    qs_width = d;
    qs_calls = 0;
    CHECK(quickstart_moe(x, y, dx, dy, T, 60, 1e-2f) == 0, "the QUICK START failed to set up its layer");
    CHECK(qs_calls == 60, "the loss was taken %d times in 60 steps", qs_calls);
    CHECK(qs_last_loss < 0.5 * qs_first_loss, "training did not halve the loss: %g -> %g", qs_first_loss, qs_last_loss);
    free(x); free(target); free(y); free(dx); free(dy); free(w);
}

/* ---- reward.h: calibration of the user's scores ------------------------------------------ */

#define N 400

static double quickstart_calibrate(const double *score, const double *len) {
    double acc;
    // score[2 * N]: your reward model's scores of N chosen responses, then of the N
    // rejected ones; len[2 * N]: the responses' lengths in code points
    double cal[2 * N];
    moe_err err;
    if (rwd_calibrate_lwr(cal, len, score, 2 * N, 1.0, 3, 1.0, &err) != MOE_OK)
        fprintf(stderr, "%s\n", err.msg);
    acc = rwd_pair_accuracy(cal, cal + N, N);     // calibrated pair accuracy
    return acc;
}

static void test_calibrate_quickstart(void) {
    double score[2 * N], len[2 * N], raw, cal;
    moe_rng r;
    int i;
    TEST_BEGIN("reward.h QUICK START: RC-LWR removes a length bias from the user's scores");
    moe_rng_seed(&r, 11);
    /* chosen responses are better and shorter; the scores reward length */
    for (i = 0; i < 2 * N; i++) {
        int chosen = i < N;
        double quality = (chosen ? 1.0 : 0.0) + moe_rng_normal(&r);
        len[i] = (double)(int)(chosen ? 50.0 + 550.0 * moe_rng_uniform(&r) : 300.0 + 700.0 * moe_rng_uniform(&r));
        score[i] = quality + 0.004 * len[i];
    }
    raw = rwd_pair_accuracy(score, score + N, N);
    cal = quickstart_calibrate(score, len);
    CHECK(cal == cal && cal > raw + 0.05, "calibrated accuracy %.3f is not above the raw %.3f", cal, raw);
}

/* ---- reward.h: a Bradley-Terry head on the user's feature rows ---------------------------- */

static int quickstart_head(const float *x_chosen, const float *x_rejected, size_t n_pairs, int D, double *scores,
                           const float *x, size_t n) {
    // x_chosen, x_rejected: (n_pairs, D) feature rows (rwd_featurize makes them from text)
    rwd_head_config hc = rwd_head_config_default();
    rwd_train_config tc = rwd_train_config_default();
    rwd_train_stats stats;
    moe_store S;  rwd_head H;  moe_rng rng;  moe_err err;
    hc.d_in = D;
    moe_rng_seed(&rng, 1);
    moe_store_init(&S);
    if (rwd_head_init(&H, &hc, &S, "rm.", &err) != MOE_OK) return 1;  // declares tensors
    if (moe_store_alloc(&S, 1) != MOE_OK) return 1;   // params + grads + Adam moments
    rwd_head_init_weights(&H, &S, &rng);
    if (rwd_bt_train(&H, &S, x_chosen, x_rejected, NULL, n_pairs, &tc, &stats, &err) != MOE_OK)
        return 1;                                      // err.msg says why
    rwd_head_score(&H, &S, scores, x, n);             // scores (n, double) of any n rows
    rwd_head_free(&H);  moe_store_free(&S);
    return 0;
}

static void test_head_quickstart(void) {
    enum { P = 512, D = 8 };
    float *rows = (float *)malloc(sizeof(float) * 2 * P * D), w[D];
    double *scores = (double *)malloc(sizeof(double) * 2 * P), acc;
    moe_rng r;
    int i, j;
    TEST_BEGIN("reward.h QUICK START: a Bradley-Terry head learns the preference behind the pairs");
    moe_rng_seed(&r, 13);
    for (j = 0; j < D; j++) w[j] = moe_rng_normal(&r);
    /* rows [0, P) chosen, [P, 2P) rejected: of two random rows, the one a hidden w prefers */
    for (i = 0; i < P; i++) {
        float *a = rows + (size_t)i * D, *b = rows + (size_t)(P + i) * D, t;
        double sa = 0.0, sb = 0.0;
        for (j = 0; j < D; j++) {
            a[j] = moe_rng_normal(&r);
            b[j] = moe_rng_normal(&r);
            sa += (double)w[j] * a[j];
            sb += (double)w[j] * b[j];
        }
        if (sb > sa)
            for (j = 0; j < D; j++) {
                t = a[j];
                a[j] = b[j];
                b[j] = t;
            }
    }
    CHECK(quickstart_head(rows, rows + (size_t)P * D, P, D, scores, rows, 2 * P) == 0, "the QUICK START failed");
    acc = rwd_pair_accuracy(scores, scores + P, P);
    CHECK(acc > 0.85, "training pair accuracy %.3f after the QUICK START's training", acc);
    free(rows);
    free(scores);
}

/* ---- the headers' text is this file's code ------------------------------------------------ */

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    char *s;
    long n;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    s = (char *)malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

/* the line [b, e) without its leading and trailing blanks, as [*ob, *oe) */
static void trim(const char *b, const char *e, const char **ob, const char **oe) {
    while (b < e && (*b == ' ' || *b == '\t')) b++;
    while (e > b && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) e--;
    *ob = b;
    *oe = e;
}

/* 1 when some line of text, trimmed, equals [b, e) */
static int has_line(const char *text, const char *b, const char *e) {
    const char *p = text;
    while (*p) {
        const char *q = strchr(p, '\n'), *tb, *te;
        if (!q) q = p + strlen(p);
        trim(p, q, &tb, &te);
        if (te - tb == e - b && memcmp(tb, b, (size_t)(e - b)) == 0) return 1;
        p = *q ? q + 1 : q;
    }
    return 0;
}

/* Every QUICK START of the header: its title line, then the code, indented by 7 blanks or
   more, up to the first line of prose (indented less). */
static void check_in_sync(const char *header, const char *self, int blocks_expected) {
    char *h = slurp(header), *me = slurp(self);
    const char *p;
    int blocks = 0, in_block = 0, lines = 0, missing = 0;
    CHECK(h && me, "cannot read %s and %s (run from the repository root)", header, self);
    if (!h || !me) {
        free(h);
        free(me);
        return;
    }
    for (p = h; *p;) {
        const char *q = strchr(p, '\n'), *tb, *te;
        int indent = 0;
        if (!q) q = p + strlen(p);
        while (p + indent < q && p[indent] == ' ') indent++;
        trim(p, q, &tb, &te);
        if (strncmp(tb, "QUICK START (", 13) == 0 && tb < q) {
            in_block = 1;
            blocks++;
            lines = 0;
        } else if (in_block && te > tb) {
            if (indent >= 7) {
                lines++;
                if (!has_line(me, tb, te)) {
                    missing++;
                    printf("   %s: QUICK START line not in %s: %.*s\n", header, self, (int)(te - tb), tb);
                }
            } else {
                CHECK(lines >= 5, "%s: a QUICK START of only %d lines (the block was not found whole)", header, lines);
                in_block = 0;
            }
        }
        p = *q ? q + 1 : q;
    }
    CHECK(blocks == blocks_expected, "%s: %d QUICK START blocks, expected %d", header, blocks, blocks_expected);
    CHECK(missing == 0, "%s: %d QUICK START lines are not code in %s", header, missing, self);
    free(h);
    free(me);
}

static void test_in_sync(void) {
    TEST_BEGIN("the QUICK STARTs in moe.h and reward.h are the code compiled here");
    check_in_sync("moe.h", __FILE__, 1);
    check_in_sync("reward.h", __FILE__, 2);
}

int main(void) {
    test_moe_quickstart();
    test_calibrate_quickstart();
    test_head_quickstart();
    test_in_sync();
    return test_summary();
}
