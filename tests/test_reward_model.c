/* test_reward_model.c - reward.h sections 5 (features), 6 (head: BT) and 7 (poe):
 * the featurizer, BT and PoE gradients by directional finite differences and against PyTorch
 * (tests/ref/bt_ref.txt from tests/ref/reward_ref.py), AdamW training against torch, learning,
 * determinism (twice, 1 vs 2 threads), save/load, bad input. */
#define _POSIX_C_SOURCE 200809L
#include "reward.h" /* defines: rwd_featurize, rwd_head_*, rwd_bt_*, rwd_poe_* */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, check_close, check_grad, test_summary */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <unistd.h>

/* ---- reference arrays: "name count v0 v1 ..." per line ---- */
static float *ref_get(const char *name, int *count) {
    FILE *f = fopen("tests/ref/bt_ref.txt", "r");
    char key[64];
    int n, i;
    float *out = NULL;
    if (!f) return NULL;
    while (fscanf(f, "%63s %d", key, &n) == 2) {
        int want = strcmp(key, name) == 0;
        float *a = want ? (float *)malloc((size_t)n * sizeof(float)) : NULL;
        for (i = 0; i < n; i++) {
            double v;
            if (fscanf(f, "%lf", &v) != 1) break;
            if (a) a[i] = (float)v;
        }
        if (want) { out = a; if (count) *count = n; break; }
    }
    fclose(f);
    return out;
}

static void test_features(void) {
    rwd_featurizer f = rwd_featurizer_default();
    float *a, *b;
    int w, i, nz = 0;
    double norm = 0.0;
    TEST_BEGIN("hashed features: case, determinism, length features, width");
    f.dim = 64;
    w = rwd_featurizer_width(&f);
    CHECK(w == 66, "width = dim + 2 length features");
    a = (float *)calloc(2 * (size_t)w, sizeof(float));
    b = a + w;
    rwd_featurize(a, &f, NULL, "The cat sat. \xc3\xa9t\xc3\xa9!");
    rwd_featurize(b, &f, "ignored prompt", "the CAT sat \xc3\xa9t\xc3\xa9");
    CHECK(memcmp(a, b, (size_t)w * sizeof(float)) != 0, "punctuation changes the code-point length");
    for (i = 0; i < 64; i++) CHECK(a[i] == b[i], "bucket %d: words are case-insensitive and split at punctuation", i);
    CHECK(fabsf(a[64] - (float)log1p(17.0)) < 1e-6f && fabsf(a[65] - 0.017f) < 1e-7f, "length features of 17 code points: %g %g", a[64], a[65]);
    for (i = 0; i < 64; i++) { nz += a[i] != 0.0f; norm += (double)a[i] * a[i]; }
    CHECK(nz >= 5 && norm > 0.5 && norm < 3.0, "4 words + 3 bigrams scaled by 1/sqrt(4): %d buckets, norm^2 %g", nz, norm);
    f.prompt_words = 1;
    rwd_featurize(b, &f, "ignored prompt", "the CAT sat \xc3\xa9t\xc3\xa9");
    CHECK(memcmp(a, b, 64 * sizeof(float)) != 0, "prompt words are hashed when asked");
    free(a);
}

/* the loss of one BT batch through a head, for finite differences (double) */
static double head_bt_loss(rwd_head *h, moe_store *s, const float *X, int B, const float *m, float c) {
    float r[64];
    rwd_head_forward(h, s, r, X, 2 * B);
    return rwd_bt_loss_forward(r, r + B, m, B, c, NULL);
}

static void test_bt_gradients(int kind) {
    enum { B = 6, D = 9 };
    rwd_head_config hc = rwd_head_config_default();
    rwd_head h;
    moe_store s;
    moe_rng rng;
    moe_err err;
    float X[2 * B * D], dX[2 * B * D], m[B], r[2 * B], dr[2 * B], *v, *p0;
    int i, t;
    TEST_BEGIN(kind ? "BT gradients, MLP head (directional finite differences)" : "BT gradients, linear head (directional finite differences)");
    hc.kind = kind; hc.d_in = D; hc.d_hidden = 5; hc.max_rows = 2 * B; hc.init_std = 0.5f;
    moe_store_init(&s);
    CHECK(rwd_head_init(&h, &hc, &s, "rm.", &err) == MOE_OK, "%s", err.msg);
    moe_store_alloc(&s, 1);
    moe_rng_seed(&rng, 5 + (uint64_t)kind);
    rwd_head_init_weights(&h, &s, &rng);
    for (i = 0; i < 2 * B * D; i++) X[i] = moe_rng_normal(&rng);
    for (i = 0; i < B; i++) m[i] = 0.3f * moe_rng_uniform(&rng);
    rwd_head_forward(&h, &s, r, X, 2 * B);
    memset(dr, 0, sizeof dr);
    memset(dX, 0, sizeof dX);
    moe_store_zero_grad(&s);
    rwd_bt_loss_backward(dr, dr + B, r, r + B, m, B, 0.05f);
    rwd_head_backward(&h, &s, dX, dr, X, 2 * B);
    v = (float *)malloc(s.numel * sizeof(float));
    p0 = (float *)malloc(s.numel * sizeof(float));
    memcpy(p0, s.params, s.numel * sizeof(float));
    for (t = 0; t < 3; t++) { /* parameters */
        double ana = 0.0, lp, lm, eps = 3e-3;
        size_t j;
        for (j = 0; j < s.numel; j++) { v[j] = moe_rng_normal(&rng); ana += (double)v[j] * s.grads[j]; }
        for (j = 0; j < s.numel; j++) s.params[j] = p0[j] + (float)eps * v[j];
        lp = head_bt_loss(&h, &s, X, B, m, 0.05f);
        for (j = 0; j < s.numel; j++) s.params[j] = p0[j] - (float)eps * v[j];
        lm = head_bt_loss(&h, &s, X, B, m, 0.05f);
        memcpy(s.params, p0, s.numel * sizeof(float));
        check_grad("dL/dparams", ana, (lp - lm) / (2 * eps), 1e-2);
    }
    { /* inputs */
        float Xp[2 * B * D], vx[2 * B * D];
        double ana = 0.0, lp, lm, eps = 1e-2;
        for (i = 0; i < 2 * B * D; i++) { vx[i] = moe_rng_normal(&rng); ana += (double)vx[i] * dX[i]; }
        for (i = 0; i < 2 * B * D; i++) Xp[i] = X[i] + (float)eps * vx[i];
        lp = head_bt_loss(&h, &s, Xp, B, m, 0.05f);
        for (i = 0; i < 2 * B * D; i++) Xp[i] = X[i] - (float)eps * vx[i];
        lm = head_bt_loss(&h, &s, Xp, B, m, 0.05f);
        check_grad("dL/dx", ana, (lp - lm) / (2 * eps), 1e-2);
    }
    free(v); free(p0);
    rwd_head_free(&h);
    moe_store_free(&s);
}

static void test_poe_gradients(void) {
    enum { B = 5 };
    float rm[2 * B], rb[2 * B], dm[2 * B], db[2 * B], v[4 * B];
    moe_rng rng;
    double ana = 0.0, lp, lm, eps = 1e-3;
    int i;
    TEST_BEGIN("PoE loss gradients (directional finite differences)");
    moe_rng_seed(&rng, 9);
    for (i = 0; i < 2 * B; i++) { rm[i] = moe_rng_normal(&rng); rb[i] = 2.0f * moe_rng_normal(&rng); }
    memset(dm, 0, sizeof dm);
    memset(db, 0, sizeof db);
    rwd_poe_loss_backward(dm, dm + B, db, db + B, rm, rm + B, rb, rb + B, B);
    for (i = 0; i < 4 * B; i++) v[i] = moe_rng_normal(&rng);
    for (i = 0; i < 2 * B; i++) ana += (double)v[i] * dm[i] + (double)v[2 * B + i] * db[i];
    for (i = 0; i < 2 * B; i++) { rm[i] += (float)eps * v[i]; rb[i] += (float)eps * v[2 * B + i]; }
    lp = rwd_poe_loss_forward(rm, rm + B, rb, rb + B, B, NULL);
    for (i = 0; i < 2 * B; i++) { rm[i] -= 2 * (float)eps * v[i]; rb[i] -= 2 * (float)eps * v[2 * B + i]; }
    lm = rwd_poe_loss_forward(rm, rm + B, rb, rb + B, B, NULL);
    check_grad("dL_PoE/dr", ana, (lp - lm) / (2 * eps), 1e-2);
    for (i = 0; i < 2 * B; i++) CHECK(dm[i] == db[i], "both experts get the same gradient (%d)", i);
}

/* sets a head's tensors from the reference arrays */
static void load_params(moe_store *s, const rwd_head *h, const char *w1, const char *b1, const char *w2) {
    const char *names[3];
    int ids[3], k, n;
    names[0] = w1; names[1] = b1; names[2] = w2;
    ids[0] = h->id_w1; ids[1] = h->id_b1; ids[2] = h->id_w2;
    for (k = 0; k < 3; k++) {
        float *a;
        if (!names[k]) continue;
        a = ref_get(names[k], &n);
        CHECK(a && (size_t)n == s->tensors[ids[k]].numel, "reference %s", names[k]);
        if (a) memcpy(moe_store_param(s, ids[k]), a, (size_t)n * sizeof(float));
        free(a);
    }
}

static void check_ref(const char *label, const float *got, const char *name, double atol) {
    int n;
    float *ref = ref_get(name, &n);
    CHECK(ref != NULL, "reference %s missing", name);
    if (ref) check_close(label, got, ref, n, atol, 1e-4);
    free(ref);
}

static void test_against_pytorch(void) {
    enum { B = 5, D = 7 };
    rwd_head_config hc = rwd_head_config_default();
    rwd_head h, hm, hb;
    moe_store s, sm, sb;
    moe_err err;
    float *xw = ref_get("xw", NULL), *xl = ref_get("xl", NULL), *mg = ref_get("margin", NULL);
    float *xbw = ref_get("xbw", NULL), *xbl = ref_get("xbl", NULL), X[2 * B * D], XB[2 * B * 3], r[2 * B], rb[2 * B], dr[2 * B], drb[2 * B];
    float *loss_ref;
    double loss;
    TEST_BEGIN("BT (MLP, margin, centering) and PoE losses and gradients = PyTorch");
    if (!xw || !xl || !mg || !xbw || !xbl) { CHECK(0, "cannot read tests/ref/bt_ref.txt"); return; }
    memcpy(X, xw, sizeof(float) * B * D);
    memcpy(X + B * D, xl, sizeof(float) * B * D);
    hc.kind = RWD_HEAD_MLP; hc.d_in = D; hc.d_hidden = 6; hc.max_rows = 2 * B; hc.activation = MOE_ACT_GELU;
    moe_store_init(&s);
    rwd_head_init(&h, &hc, &s, "", &err);
    moe_store_alloc(&s, 1);
    load_params(&s, &h, "w1", "b1", "w2");
    rwd_head_forward(&h, &s, r, X, 2 * B);
    loss = rwd_bt_loss_forward(r, r + B, mg, B, 0.05f, NULL);
    loss_ref = ref_get("mlp_loss", NULL);
    CHECK(loss_ref && fabs(loss - loss_ref[0]) < 1e-5, "BT loss %.8g vs torch %.8g", loss, loss_ref ? loss_ref[0] : 0.0f);
    free(loss_ref);
    memset(dr, 0, sizeof dr);
    moe_store_zero_grad(&s);
    rwd_bt_loss_backward(dr, dr + B, r, r + B, mg, B, 0.05f);
    rwd_head_backward(&h, &s, NULL, dr, X, 2 * B);
    check_ref("grad w1", moe_store_grad(&s, h.id_w1), "mlp_gw1", 1e-6);
    check_ref("grad b1", moe_store_grad(&s, h.id_b1), "mlp_gb1", 1e-6);
    check_ref("grad w2", moe_store_grad(&s, h.id_w2), "mlp_gw2", 1e-6);
    rwd_head_free(&h);
    moe_store_free(&s);
    /* PoE: linear main expert on X, linear bias expert on XB */
    hc.kind = RWD_HEAD_LINEAR;
    moe_store_init(&sm); moe_store_init(&sb);
    rwd_head_init(&hm, &hc, &sm, "main.", &err);
    hc.d_in = 3;
    rwd_head_init(&hb, &hc, &sb, "bias.", &err);
    moe_store_alloc(&sm, 1); moe_store_alloc(&sb, 1);
    load_params(&sm, &hm, "poe_mw", NULL, NULL);
    load_params(&sb, &hb, "poe_bw", NULL, NULL);
    memcpy(XB, xbw, sizeof(float) * B * 3);
    memcpy(XB + B * 3, xbl, sizeof(float) * B * 3);
    rwd_head_forward(&hm, &sm, r, X, 2 * B);
    rwd_head_forward(&hb, &sb, rb, XB, 2 * B);
    loss = rwd_poe_loss_forward(r, r + B, rb, rb + B, B, NULL);
    loss_ref = ref_get("poe_loss", NULL);
    CHECK(loss_ref && fabs(loss - loss_ref[0]) < 1e-5, "PoE loss %.8g vs torch %.8g", loss, loss_ref ? loss_ref[0] : 0.0f);
    free(loss_ref);
    memset(dr, 0, sizeof dr); memset(drb, 0, sizeof drb);
    moe_store_zero_grad(&sm); moe_store_zero_grad(&sb);
    rwd_poe_loss_backward(dr, dr + B, drb, drb + B, r, r + B, rb, rb + B, B);
    rwd_head_backward(&hm, &sm, NULL, dr, X, 2 * B);
    rwd_head_backward(&hb, &sb, NULL, drb, XB, 2 * B);
    check_ref("PoE grad main w", moe_store_grad(&sm, hm.id_w1), "poe_gmw", 1e-6);
    check_ref("PoE grad bias w", moe_store_grad(&sb, hb.id_w1), "poe_gbw", 1e-6);
    rwd_head_free(&hm); rwd_head_free(&hb);
    moe_store_free(&sm); moe_store_free(&sb);
    /* 3 full-batch AdamW steps (lr 0.01 constant, decay 0.1 on the weight) = torch.optim.AdamW */
    {
        rwd_train_config tc = rwd_train_config_default();
        rwd_train_stats st;
        float *w0 = ref_get("train_w0", NULL);
        hc.d_in = D;
        moe_store_init(&s);
        rwd_head_init(&h, &hc, &s, "", &err);
        moe_store_alloc(&s, 1);
        if (w0) memcpy(moe_store_param(&s, h.id_w1), w0, D * sizeof(float));
        tc.epochs = 3; tc.batch = B; tc.lr = tc.lr_min = 0.01f; tc.weight_decay = 0.1f;
        CHECK(rwd_bt_train(&h, &s, xw, xl, NULL, B, &tc, &st, &err) == MOE_OK && st.steps == 3, "%s", err.msg);
        check_ref("AdamW w after 3 steps", moe_store_param(&s, h.id_w1), "train_w3", 1e-6);
        rwd_head_free(&h);
        moe_store_free(&s);
        free(w0);
    }
    free(xw); free(xl); free(mg); free(xbw); free(xbl);
}

/* synthetic pairs: D-1 small "semantic" features (std 0.2) of which the first 4 carry the
   quality q = sum / 0.2, and a length feature (std 1) in column D-1. Utility u = q + beta * len.
   noisy: the label is drawn as Bradley-Terry says, P(a wins) = sigmoid(u_a - u_b); else it is
   the sign of u_a - u_b. Rows are swapped so that x_w holds the preferred response. */
static void make_pairs(float *xw, float *xl, int n, int D, float beta, int noisy, uint64_t seed) {
    moe_rng rng;
    int i, j;
    moe_rng_seed(&rng, seed);
    for (i = 0; i < n; i++) {
        double ua = 0.0, ub = 0.0;
        float *a = xw + (size_t)i * D, *b = xl + (size_t)i * D;
        for (j = 0; j < D - 1; j++) {
            a[j] = 0.2f * moe_rng_normal(&rng); b[j] = 0.2f * moe_rng_normal(&rng);
            if (j < 4) { ua += a[j] / 0.2; ub += b[j] / 0.2; }
        }
        a[D - 1] = moe_rng_normal(&rng); b[D - 1] = moe_rng_normal(&rng);
        ua += beta * a[D - 1]; ub += beta * b[D - 1];
        if (noisy ? moe_rng_uniform(&rng) >= 1.0 / (1.0 + exp(ub - ua)) : ua < ub)
            for (j = 0; j < D; j++) { float t = a[j]; a[j] = b[j]; b[j] = t; }
    }
}

static void test_learning_and_determinism(void) {
    enum { N = 600, D = 12 };
    float *xw = (float *)malloc(2 * N * D * sizeof(float)), *xl = xw + N * D, *p1;
    rwd_head_config hc = rwd_head_config_default();
    rwd_train_config tc = rwd_train_config_default();
    rwd_train_stats st;
    rwd_head h;
    moe_store s;
    moe_rng rng;
    moe_err err;
    double *sw = (double *)malloc(2 * N * sizeof(double)), *sl = sw + N;
    int kind, threads;
    TEST_BEGIN("BT heads learn a synthetic preference; runs are bit-identical (twice, 1 and 2 threads)");
    make_pairs(xw, xl, N, D, 0.0f, 0, 21);
    for (kind = 0; kind < 2; kind++) {
        float *first = NULL;
        for (threads = 1; threads <= 2; threads++) {
#ifdef _OPENMP
            omp_set_num_threads(threads);
#endif
            hc.kind = kind; hc.d_in = D; hc.d_hidden = 16; hc.max_rows = 64;
            tc.epochs = 15; tc.lr = 0.03f; tc.lr_min = 0.003f;
            moe_store_init(&s);
            rwd_head_init(&h, &hc, &s, "rm.", &err);
            moe_store_alloc(&s, 1);
            moe_rng_seed(&rng, 1);
            rwd_head_init_weights(&h, &s, &rng);
            CHECK(rwd_bt_train(&h, &s, xw, xl, NULL, N, &tc, &st, &err) == MOE_OK, "%s", err.msg);
            rwd_head_score(&h, &s, sw, xw, N);
            rwd_head_score(&h, &s, sl, xl, N);
            CHECK(rwd_pair_accuracy(sw, sl, N) > 0.9, "kind %d: training accuracy %.3f", kind, rwd_pair_accuracy(sw, sl, N));
            p1 = (float *)malloc(s.numel * sizeof(float));
            memcpy(p1, s.params, s.numel * sizeof(float));
            if (first) CHECK(memcmp(first, p1, s.numel * sizeof(float)) == 0, "kind %d: 1 and 2 threads give the same parameters", kind);
            free(first);
            first = p1;
            rwd_head_free(&h);
            moe_store_free(&s);
        }
        free(first);
    }
#ifdef _OPENMP
    omp_set_num_threads(2);
#endif
    free(xw); free(sw);
}

static void test_poe_debiases(void) {
    /* Labels follow quality + length (Bradley-Terry draws). Variants: vanilla BT; PoE with a
       full-feature bias expert whose semantic columns get noise (length stays clean, as token
       counts survive embedding noise in the paper); PoE with a length-only bias expert; and
       the same with noise on the length feature too, which hands length to the main expert. */
    enum { N = 2000, D = 10 };
    static const char *const names[4] = {"vanilla BT", "PoE, noise on semantic columns", "PoE, length-only bias expert",
                                         "PoE, length-only + noise (ridge effect)"};
    float *xw = (float *)malloc(2 * N * D * sizeof(float)), *xl = xw + N * D;
    float *lw = (float *)malloc(2 * N * sizeof(float)), *ll = lw + N;
    rwd_head_config hc = rwd_head_config_default();
    rwd_train_config tc = rwd_train_config_default();
    rwd_head h, hb;
    moe_store s, sb;
    moe_err err;
    float rel[4];
    int v, i;
    TEST_BEGIN("PoE: the main expert leans on length less than vanilla BT");
    make_pairs(xw, xl, N, D, 1.0f, 1, 33);
    for (i = 0; i < N; i++) { lw[i] = xw[i * D + D - 1]; ll[i] = xl[i * D + D - 1]; }
    hc.d_in = D; hc.max_rows = 64;
    tc.epochs = 8; tc.lr = 0.02f; tc.lr_min = 0.002f; tc.bias_lr = 0.05f; tc.noise_std = 0.5f;
    for (v = 0; v < 4; v++) {
        const float *w;
        moe_store_init(&s);
        rwd_head_init(&h, &hc, &s, "main.", &err);
        moe_store_alloc(&s, 1);
        if (v == 0) CHECK(rwd_bt_train(&h, &s, xw, xl, NULL, N, &tc, NULL, &err) == MOE_OK, "%s", err.msg);
        else {
            rwd_head_config bc = hc;
            bc.d_in = v == 1 ? D : 1;
            tc.noise_cols = v == 1 ? D - 1 : v == 2 ? 0 : -1;
            moe_store_init(&sb);
            rwd_head_init(&hb, &bc, &sb, "bias.", &err);
            moe_store_alloc(&sb, 1);
            CHECK(rwd_poe_train(&h, &s, &hb, &sb, xw, xl, v == 1 ? xw : lw, v == 1 ? xl : ll, N, &tc, NULL, &err) == MOE_OK, "%s", err.msg);
            rwd_head_free(&hb);
            moe_store_free(&sb);
        }
        w = moe_store_param(&s, h.id_w1); /* length weight relative to the mean quality weight */
        rel[v] = w[D - 1] / ((w[0] + w[1] + w[2] + w[3]) / 4.0f);
        printf("   %-42s main expert: length weight / quality weight = %.3f (truth 0.2)\n", names[v], rel[v]);
        rwd_head_free(&h);
        moe_store_free(&s);
    }
    CHECK(rel[1] < 0.5f * rel[0] && rel[2] < 0.5f * rel[0], "PoE main experts %.3f, %.3f are not well below vanilla %.3f", rel[1], rel[2], rel[0]);
    CHECK(rel[3] > 0.8f * rel[0], "noise on the length feature should hand length back to the main expert (%.3f vs %.3f)", rel[3], rel[0]);
    free(xw); free(lw);
}

static void test_save_load_and_bad_input(void) {
    enum { D = 5 };
    rwd_head_config hc = rwd_head_config_default();
    rwd_train_config tc = rwd_train_config_default();
    rwd_head h, h2;
    moe_store s, s2;
    moe_rng rng;
    moe_err err;
    float x[4 * D], r1[4], r2[4], nanx[4 * D];
    char path[64];
    int i;
    TEST_BEGIN("head save/load round trip; mismatches and bad input give a status");
    hc.kind = RWD_HEAD_MLP; hc.d_in = D; hc.d_hidden = 3; hc.max_rows = 8;
    moe_rng_seed(&rng, 2);
    for (i = 0; i < 4 * D; i++) x[i] = moe_rng_normal(&rng);
    moe_store_init(&s);
    rwd_head_init(&h, &hc, &s, "rm.", &err);
    moe_store_alloc(&s, 1);
    rwd_head_init_weights(&h, &s, &rng);
    rwd_head_forward(&h, &s, r1, x, 4);
    snprintf(path, sizeof path, "/tmp/rwd_head_%d.ckpt", (int)getpid());
    CHECK(rwd_head_save(&h, &s, path, &err) == MOE_OK, "%s", err.msg);
    moe_store_init(&s2);
    rwd_head_init(&h2, &hc, &s2, "rm.", &err);
    moe_store_alloc(&s2, 0);
    CHECK(rwd_head_load(&h2, &s2, path, &err) == MOE_OK, "%s", err.msg);
    rwd_head_forward(&h2, &s2, r2, x, 4);
    CHECK(memcmp(r1, r2, sizeof r1) == 0, "loaded head scores identically");
    rwd_head_free(&h2);
    moe_store_free(&s2);
    hc.activation = MOE_ACT_RELU; /* same tensors, other activation: the config blob catches it */
    moe_store_init(&s2);
    rwd_head_init(&h2, &hc, &s2, "rm.", &err);
    moe_store_alloc(&s2, 0);
    CHECK(rwd_head_load(&h2, &s2, path, &err) == MOE_ERR_FORMAT, "another activation is refused: %s", err.msg);
    rwd_head_free(&h2);
    moe_store_free(&s2);
    hc.d_hidden = 4;
    moe_store_init(&s2);
    rwd_head_init(&h2, &hc, &s2, "rm.", &err);
    moe_store_alloc(&s2, 0);
    CHECK(rwd_head_load(&h2, &s2, path, &err) == MOE_ERR_FORMAT && strstr(err.msg, "layout"), "another width is refused: %s", err.msg);
    rwd_head_free(&h2);
    moe_store_free(&s2);
    remove(path);
    /* bad input */
    memcpy(nanx, x, sizeof x);
    nanx[7] = NAN;
    tc.batch = 2;
    CHECK(rwd_bt_train(&h, &s, nanx, x + 2 * D, NULL, 2, &tc, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "pair 1, feature 2"), "NaN feature: %s", err.msg);
    tc.batch = 5;
    CHECK(rwd_bt_train(&h, &s, x, x + 2 * D, NULL, 2, &tc, NULL, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "max_rows"), "batch too large: %s", err.msg);
    tc.batch = 2;
    CHECK(rwd_bt_train(&h, &s, x, x + 2 * D, NULL, 0, &tc, NULL, &err) == MOE_ERR_INVALID_ARG, "no pairs: %s", err.msg);
    tc.lr = -1.0f;
    CHECK(rwd_bt_train(&h, &s, x, x + 2 * D, NULL, 2, &tc, NULL, &err) == MOE_ERR_INVALID_ARG, "negative lr: %s", err.msg);
    tc.lr = 0.01f;
    CHECK(rwd_poe_train(&h, &s, &h, &s, x, x + 2 * D, x, x + 2 * D, 2, &tc, NULL, &err) == MOE_ERR_INVALID_ARG, "PoE in one store: %s", err.msg);
    hc.d_in = 0;
    CHECK(rwd_head_init(&h2, &hc, &s2, "x.", &err) == MOE_ERR_INVALID_ARG, "d_in 0: %s", err.msg);
    rwd_head_free(&h);
    moe_store_free(&s);
}

/* the bridge: pooled hidden states of a moe.h language model as reward features */
static void test_lm_features(void) {
    moe_model_config c = moe_model_config_default();
    moe_model m;
    moe_err err;
    float f1[16], f2[16], ref[16];
    char longp[64], resp[40];
    int tok[12], t, j, i, ok = 1;
    TEST_BEGIN("LM bridge: mean of the model's final hidden states over the response bytes");
    c.vocab = 256; c.max_seq = 12; c.d = 16; c.n_layers = 2; c.n_heads = 2; c.d_ff = 24;
    c.moe.n_experts = 4; c.moe.top_k = 2; c.moe.d_ff = 8;
    CHECK(moe_model_init(&m, &c, 1, 12) == MOE_OK, "model: %s", m.err.msg);
    moe_model_init_weights(&m, 1);
    CHECK(rwd_lm_features(f1, &m, "Q: ", "yes", &err) == MOE_OK, "%s", err.msg);
    for (t = 0; t < 6; t++) tok[t] = (unsigned char)"Q: yes"[t];
    moe_model_forward(&m, tok, NULL, 1, 6, NULL);
    for (j = 0; j < 16; j++) {
        double acc = 0.0;
        for (t = 3; t < 6; t++) acc += m.lnf[t * 16 + j];
        ref[j] = (float)(acc / 3.0);
        ok &= fabsf(ref[j] - f1[j]) < 1e-6f;
    }
    CHECK(ok, "equals the mean of lnf over the 3 response bytes, with the prompt as context");
    /* a prompt longer than the window is cut from the left */
    for (i = 0; i < 40; i++) longp[i] = (char)('a' + i % 26);
    longp[40] = 0;
    CHECK(rwd_lm_features(f1, &m, longp, "ok", &err) == MOE_OK && rwd_lm_features(f2, &m, longp + 30, "ok", &err) == MOE_OK &&
          memcmp(f1, f2, sizeof f1) == 0, "only the last max_T bytes count");
    for (i = 0; i < 30; i++) resp[i] = (char)('0' + i % 10);
    resp[30] = 0;
    CHECK(rwd_lm_features(f1, &m, "ignored", resp, &err) == MOE_OK && rwd_lm_features(f2, &m, NULL, resp + 18, &err) == MOE_OK &&
          memcmp(f1, f2, sizeof f1) == 0, "a long response keeps its last max_T bytes");
    CHECK(rwd_lm_features(f1, &m, "x", "", &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "empty"), "empty response: %s", err.msg);
    {   /* a BT head on LM features separates letters (chosen) from digits (rejected) */
        enum { N = 200 };
        rwd_text_pairs p;
        rwd_head_config hc = rwd_head_config_default();
        rwd_train_config tc = rwd_train_config_default();
        rwd_head h;
        moe_store s;
        moe_rng rng;
        float *xw = (float *)malloc(2 * N * 16 * sizeof(float)), *xl = xw + N * 16;
        double sw[N], sl[N];
        char a[8], b[8];
        memset(&p, 0, sizeof p);
        moe_rng_seed(&rng, 4);
        for (i = 0; i < N; i++) {
            for (j = 0; j < 5; j++) {
                a[j] = (char)('a' + moe_rng_below(&rng, 26));
                b[j] = (char)('0' + moe_rng_below(&rng, 10));
            }
            a[5] = b[5] = 0;
            rwd_text_pairs_add(&p, "say: ", 5, a, 5, b, 5, &err);
        }
        CHECK(rwd_lm_featurize_pairs(xw, xl, &m, &p, &err) == MOE_OK, "%s", err.msg);
        hc.d_in = 16; hc.max_rows = 2 * tc.batch;
        tc.epochs = 30; tc.lr = 0.05f;
        moe_store_init(&s);
        rwd_head_init(&h, &hc, &s, "rm.", &err);
        moe_store_alloc(&s, 1);
        rwd_head_init_weights(&h, &s, &rng);
        CHECK(rwd_bt_train(&h, &s, xw, xl, NULL, N / 2, &tc, NULL, &err) == MOE_OK, "%s", err.msg);
        rwd_head_score(&h, &s, sw, xw + (N / 2) * 16, N / 2);
        rwd_head_score(&h, &s, sl, xl + (N / 2) * 16, N / 2);
        CHECK(rwd_pair_accuracy(sw, sl, N / 2) > 0.95, "held-out accuracy %.3f on LM features", rwd_pair_accuracy(sw, sl, N / 2));
        rwd_head_free(&h);
        moe_store_free(&s);
        rwd_text_pairs_free(&p);
        free(xw);
    }
    c.vocab = 64;
    moe_model_free(&m);
    moe_model_init(&m, &c, 1, 12);
    CHECK(rwd_lm_features(f1, &m, NULL, "x", &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "256"), "non-byte vocabulary: %s", err.msg);
    moe_model_free(&m);
}

int main(void) {
    test_features();
    test_lm_features();
    test_bt_gradients(RWD_HEAD_LINEAR);
    test_bt_gradients(RWD_HEAD_MLP);
    test_poe_gradients();
    test_against_pytorch();
    test_learning_and_determinism();
    test_poe_debiases();
    test_save_load_and_bad_input();
    return test_summary();
}
