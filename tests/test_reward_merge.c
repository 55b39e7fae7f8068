/* test_reward_merge.c - reward.h's merge and average sections: every merging method and the
 * averaging against the alignment tax against the numpy transcription of mergekit's formulas
 * (tests/ref/merge.bin from tests/ref/merge_ref.py); DARE's own Bernoulli draws by their
 * statistics (numpy's draws reach the C code through rwd_merge_config.keep_masks); SLERP's
 * end points; HMA's ratios, regulariser and objective gradient by finite differences, its
 * search on a quadratic and on the tiny LM's loss, the grid search and the Pareto front; bad
 * input (different layouts, density, lambda, weights summing to 0, aliasing): a status with
 * a sentence and the destination unchanged. */
#include "reward.h" /* defines: rwd_merge, rwd_average*, rwd_hma_* */
#include "test.h"   /* defines: CHECK, TEST_BEGIN, check_close, check_grad, test_summary */
#include "golden.h" /* defines: golden_load, golden_f32, golden_i32 */

#define NM 3

static golden_file G;
static moe_store S_base, S_m[NM], S_dst;
static unsigned char *MASK[NM];

/* declares the golden's tensor table in s and allocates it */
static int layout_store(moe_store *s) {
    const int32_t *cnt = golden_i32(&G, "layout.count", 1);
    int t, i;
    moe_store_init(s);
    if (!cnt) return -1;
    for (t = 0; t < cnt[0]; t++) {
        char key[64], name[MOE_NAME_LEN];
        const golden_tensor *gn, *gs;
        int d[4] = {0, 0, 0, 0};
        snprintf(key, sizeof key, "layout.%d.name", t);
        gn = golden_find(&G, key);
        snprintf(key, sizeof key, "layout.%d.shape", t);
        gs = golden_find(&G, key);
        if (!gn || !gs || gn->numel >= MOE_NAME_LEN || gs->numel > 4) return -1;
        for (i = 0; i < (int)gn->numel; i++) name[i] = (char)gn->i32[i];
        name[gn->numel] = 0;
        for (i = 0; i < (int)gs->numel; i++) d[i] = gs->i32[i];
        if (moe_store_add(s, name, 0, d[0], d[1], d[2], d[3]) < 0) return -1;
    }
    return moe_store_alloc(s, 0) == MOE_OK ? 0 : -1;
}

static int setup(void) {
    const float *v;
    int m;
    size_t i;
    if (golden_load(&G, "tests/ref/merge.bin") != 0) { printf("%s\n", G.err); return -1; }
    if (layout_store(&S_base) || layout_store(&S_dst)) return -1;
    v = golden_f32(&G, "base", S_base.numel);
    if (!v) return -1;
    memcpy(S_base.params, v, S_base.numel * sizeof(float));
    for (m = 0; m < NM; m++) {
        char key[32];
        const int32_t *mk;
        if (layout_store(&S_m[m])) return -1;
        snprintf(key, sizeof key, "model%d", m);
        if (!(v = golden_f32(&G, key, S_base.numel))) return -1;
        memcpy(S_m[m].params, v, S_base.numel * sizeof(float));
        snprintf(key, sizeof key, "mask%d", m);
        if (!(mk = golden_i32(&G, key, S_base.numel))) return -1;
        MASK[m] = (unsigned char *)malloc(S_base.numel);
        for (i = 0; i < S_base.numel; i++) MASK[m][i] = (unsigned char)(mk[i] != 0);
    }
    return 0;
}

static void teardown(void) {
    int m;
    for (m = 0; m < NM; m++) { moe_store_free(&S_m[m]); free(MASK[m]); }
    moe_store_free(&S_base);
    moe_store_free(&S_dst);
    golden_free(&G);
}

static void test_golden_cases(void) {
    const int32_t *nc = golden_i32(&G, "cases", 1);
    const moe_store *models[NM];
    const unsigned char *masks[NM];
    int i, m, *block = (int *)malloc((size_t)S_dst.count * sizeof(int));
    TEST_BEGIN("every merge and averaging method = numpy's transcription of mergekit (tests/ref/merge.bin)");
    CHECK(nc && nc[0] >= 20, "the golden lists its cases");
    for (m = 0; m < NM; m++) { models[m] = &S_m[m]; masks[m] = MASK[m]; }
    for (i = 0; nc && i < nc[0]; i++) {
        char key[64], name[64];
        const golden_tensor *gn, *gw, *gp;
        const int32_t *cfg;
        const float *fl, *out;
        double w[64], dens[NM];
        int nw, np_, pv[8], K = 0, j;
        moe_err err;
        moe_status st = MOE_ERR_STATE;
        snprintf(key, sizeof key, "case%d.name", i);
        gn = golden_find(&G, key);
        for (j = 0; gn && j < (int)gn->numel && j < 63; j++) name[j] = (char)gn->i32[j];
        name[gn ? j : 0] = 0;
        snprintf(key, sizeof key, "case%d.cfg", i);
        cfg = golden_i32(&G, key, 9);
        snprintf(key, sizeof key, "case%d.f", i);
        fl = golden_f32(&G, key, 8);
        snprintf(key, sizeof key, "case%d.w", i);
        gw = golden_find(&G, key);
        snprintf(key, sizeof key, "case%d.pivots", i);
        gp = golden_find(&G, key);
        snprintf(key, sizeof key, "case%d.out", i);
        out = golden_f32(&G, key, S_dst.numel);
        if (!cfg || !fl || !gw || !gp || !out || gw->numel > 64 || gp->numel > 8) { CHECK(0, "case %d: incomplete record", i); continue; }
        nw = (int)gw->numel;
        for (j = 0; j < nw; j++) w[j] = gw->f32[j];
        np_ = gp->i32[0] < 0 ? 0 : (int)gp->numel;
        for (j = 0; j < np_; j++) pv[j] = gp->i32[j];
        memset(S_dst.params, 0, S_dst.numel * sizeof(float));
        if (np_ > 0) CHECK(rwd_block_map(block, &K, &S_dst, pv, np_, &err) == MOE_OK, "%s: block map: %s", name, err.msg);
        if (cfg[0] == 0) {
            rwd_merge_config c = rwd_merge_config_default((rwd_merge_method)cfg[1]);
            c.sparsify = (rwd_sparsify)cfg[2];
            c.consensus = (rwd_consensus)cfg[3];
            c.normalize = cfg[4];
            c.rescale = (rwd_rescale)cfg[5];
            c.per = (rwd_merge_per)cfg[6];
            c.keep_masks = cfg[7] ? masks : NULL;
            c.density = fl[0];
            c.gamma = fl[1];
            if (fl[2] >= 0) {
                for (m = 0; m < NM; m++) dens[m] = fl[2 + m];
                c.densities = dens;
            }
            c.block = block;
            c.n_blocks = K;
            st = rwd_merge(&S_dst, c.method == RWD_MERGE_LINEAR || c.method == RWD_MERGE_SLERP ? NULL : &S_base,
                           models, c.method == RWD_MERGE_SLERP ? 2 : NM, w, &c, &err);
        } else if (cfg[0] == 1) {
            st = rwd_average(&S_dst, &S_base, &S_m[0], fl[5], &err);
        } else if (cfg[0] == 2) {
            st = rwd_average_partwise(&S_dst, &S_base, &S_m[0], pv, np_, w, w[np_ + 1], &err);
        } else {
            rwd_hma_config hc = rwd_hma_config_default();
            double lam[8], lsum = 0.0;
            const float *ref;
            hc.mean = fl[6];
            hc.eps = fl[7];
            hc.follow = (rwd_hma_follow)cfg[8];
            rwd_hma_ratios(lam, w, K, hc.mean, hc.eps);
            snprintf(key, sizeof key, "case%d.lambdas", i);
            ref = golden_f32(&G, key, (size_t)K);
            for (j = 0; ref && j < K; j++) {
                CHECK(fabs(lam[j] - ref[j]) < 1e-6, "%s: lambda_%d %.9g, numpy %.9g", name, j, lam[j], (double)ref[j]);
                lsum += lam[j];
            }
            CHECK(ref && fabs(lsum / K - hc.mean) < 1e-15, "%s: the mean ratio is held exactly (%.17g vs %.17g)", name, lsum / K, hc.mean);
            st = rwd_hma_merge(&S_dst, &S_base, &S_m[0], block, K, lam, &hc, &err);
        }
        CHECK(st == MOE_OK, "%s: status %d: %s", name, (int)st, err.msg);
        if (st == MOE_OK) {
            char label[96];
            snprintf(label, sizeof label, "case %s", name);
            check_close(label, S_dst.params, out, S_dst.numel, 2e-6, 2e-6);
        }
    }
    free(block);
}

/* one model, weight 1: out - base is the sparsified task vector itself */
static void test_dare_statistics(void) {
    moe_store base, x, d1, d2;
    const moe_store *one[1];
    rwd_merge_config c = rwd_merge_config_default(RWD_MERGE_DARE_LINEAR);
    double w = 1.0, p = 0.3, kept = 0, n, l1_in = 0, l1_out = 0, sum_in = 0, sum_out = 0;
    size_t i, N = 100000, exact = 0, same_mask = 0;
    moe_rng r;
    moe_err err;
    TEST_BEGIN("DARE's own draws: kept share, 1/density rescale, norm matching, seeds, streams");
    moe_store_init(&base); moe_store_init(&x); moe_store_init(&d1); moe_store_init(&d2);
    moe_store_add(&base, "l0.a", 0, (int)N, 0, 0, 0); moe_store_add(&base, "l0.b", 0, 1000, 0, 0, 0);
    moe_store_add(&x, "l0.a", 0, (int)N, 0, 0, 0); moe_store_add(&x, "l0.b", 0, 1000, 0, 0, 0);
    moe_store_add(&d1, "l0.a", 0, (int)N, 0, 0, 0); moe_store_add(&d1, "l0.b", 0, 1000, 0, 0, 0);
    moe_store_add(&d2, "l0.a", 0, (int)N, 0, 0, 0); moe_store_add(&d2, "l0.b", 0, 1000, 0, 0, 0);
    moe_store_alloc(&base, 0); moe_store_alloc(&x, 0); moe_store_alloc(&d1, 0); moe_store_alloc(&d2, 0);
    moe_rng_seed(&r, 7);
    for (i = 0; i < base.numel; i++) {
        base.params[i] = moe_rng_normal(&r);
        /* the second tensor's task vector copies the first's start: its mask must differ */
        x.params[i] = i < N ? base.params[i] + 1.0f + moe_rng_uniform(&r) : base.params[i] + (x.params[i - N] - base.params[i - N]);
    }
    one[0] = &x;
    c.density = p;
    c.seed = 11;
    CHECK(rwd_merge(&d1, &base, one, 1, &w, &c, &err) == MOE_OK, "DARE: %s", err.msg);
    for (i = 0; i < N; i++) {
        float tau = x.params[i] - base.params[i], got = d1.params[i] - base.params[i];
        if (d1.params[i] != base.params[i]) {
            kept++;
            exact += fabsf(d1.params[i] - (float)((double)base.params[i] + (double)(float)((double)tau / p))) == 0.0f;
        }
        sum_in += tau;
        sum_out += got;
    }
    n = (double)N;
    CHECK(fabs(kept / n - p) < 5.0 * sqrt(p * (1 - p) / n), "kept share %.4f, density %.2f (5 sigma %.4f)", kept / n, p, 5.0 * sqrt(p * (1 - p) / n));
    CHECK(exact == (size_t)kept, "every kept entry is tau / density (%zu of %.0f)", exact, kept);
    CHECK(fabs(sum_out / sum_in - 1.0) < 0.02, "the 1/density rescale keeps the sum in expectation: %.4f", sum_out / sum_in);
    for (i = 0; i < 1000; i++) same_mask += (d1.params[N + i] != base.params[N + i]) == (d1.params[i] != base.params[i]);
    CHECK(same_mask < 800, "each tensor draws its own mask (%zu of 1000 entries agree, ~580 expected)", same_mask);
    CHECK(rwd_merge(&d2, &base, one, 1, &w, &c, &err) == MOE_OK && memcmp(d1.params, d2.params, d1.numel * sizeof(float)) == 0,
          "the same seed gives the same merge");
    c.seed = 12;
    CHECK(rwd_merge(&d2, &base, one, 1, &w, &c, &err) == MOE_OK && memcmp(d1.params, d2.params, d1.numel * sizeof(float)) != 0,
          "another seed, another mask");
    c.rescale = RWD_RESCALE_L1;
    CHECK(rwd_merge(&d2, &base, one, 1, &w, &c, &err) == MOE_OK, "DARE L1: %s", err.msg);
    for (i = 0; i < N; i++) {
        l1_in += fabs((double)x.params[i] - base.params[i]);
        l1_out += fabs((double)d2.params[i] - base.params[i]);
    }
    CHECK(fabs(l1_out / l1_in - 1.0) < 1e-5, "L1 rescale (current mergekit) matches the unmasked L1 norm: %.8f", l1_out / l1_in);
    c.rescale = RWD_RESCALE_NONE;
    c.density = 1.0;
    CHECK(rwd_merge(&d2, &base, one, 1, &w, &c, &err) == MOE_OK, "DARE density 1: %s", err.msg);
    for (i = 0, exact = 0; i < base.numel; i++) exact += d2.params[i] == (float)((double)base.params[i] + (double)(x.params[i] - base.params[i]));
    CHECK(exact == base.numel, "density 1 keeps the task vector whole: base + tau (%zu of %zu)", exact, base.numel);
    moe_store_free(&base); moe_store_free(&x); moe_store_free(&d1); moe_store_free(&d2);
}

static void test_slerp_ends(void) {
    const moe_store *two[2];
    rwd_merge_config c = rwd_merge_config_default(RWD_MERGE_SLERP);
    double t;
    moe_err err;
    TEST_BEGIN("SLERP: t = 0 and t = 1 give the end models exactly");
    two[0] = &S_m[0]; two[1] = &S_m[2];
    t = 0.0;
    CHECK(rwd_merge(&S_dst, NULL, two, 2, &t, &c, &err) == MOE_OK && memcmp(S_dst.params, S_m[0].params, S_dst.numel * sizeof(float)) == 0, "t = 0");
    t = 1.0;
    CHECK(rwd_merge(&S_dst, NULL, two, 2, &t, &c, &err) == MOE_OK && memcmp(S_dst.params, S_m[2].params, S_dst.numel * sizeof(float)) == 0, "t = 1");
}

/* one bad call: a status, a sentence that contains `word`, the destination untouched */
static void expect_refused_in(moe_status st, const moe_err *err, const char *word, const moe_store *dst, const float *snapshot, const char *what) {
    CHECK(st != MOE_OK && strstr(err->msg, word) != NULL, "%s: refused with a sentence naming '%s' (status %d: %s)", what, word, (int)st, err->msg);
    CHECK(memcmp(dst->params, snapshot, dst->numel * sizeof(float)) == 0, "%s: the destination is unchanged", what);
}
#define expect_refused(st, err, word, snapshot, what) expect_refused_in(st, err, word, &S_dst, snapshot, what)

static void test_bad_input(void) {
    moe_store other;
    const moe_store *models[NM], *bad[2];
    rwd_merge_config c = rwd_merge_config_default(RWD_MERGE_TIES);
    double w[NM] = {0.5, 0.3, 0.2}, wz[NM] = {0.5, -0.5, 0.0}, lam2[2] = {0.2, 0.3}, lam3[3] = {0.2, 0.3, 0.4};
    float *snap = (float *)malloc(S_dst.numel * sizeof(float));
    int t, m, pv[2] = {1, 0}, block[16], K = 0;
    moe_err err;
    TEST_BEGIN("bad input: layouts, density, lambda, zero weight sums, aliasing: a sentence, nothing written");
    for (m = 0; m < NM; m++) models[m] = &S_m[m];
    for (t = 0; t < (int)S_dst.numel; t++) S_dst.params[t] = 0.25f;
    memcpy(snap, S_dst.params, S_dst.numel * sizeof(float));
    /* a store whose l1.attn.wqkv is (24, 4) instead of (24, 8) */
    moe_store_init(&other);
    for (t = 0; t < S_dst.count; t++) {
        const moe_tensor *T = &S_dst.tensors[t];
        int d1 = strcmp(T->name, "l1.attn.wqkv") == 0 ? 4 : T->shape[1];
        moe_store_add(&other, T->name, T->flags, T->shape[0], T->ndim > 1 ? d1 : 0, T->ndim > 2 ? T->shape[2] : 0, 0);
    }
    moe_store_alloc(&other, 0);
    bad[0] = &S_m[0]; bad[1] = &other;
    c.density = 0.5;
    expect_refused(rwd_merge(&S_dst, &S_base, bad, 2, w, &c, &err), &err, "l1.attn.wqkv", snap, "a model of another layout");
    CHECK(strstr(err.msg, "model 1") != NULL && err.status == MOE_ERR_SHAPE, "the sentence names the model: %s", err.msg);
    expect_refused(rwd_average(&S_dst, &S_base, &other, 0.5, &err), &err, "l1.attn.wqkv", snap, "averaging with another layout");
    moe_store_free(&other);
    c.density = 0.0;
    expect_refused(rwd_merge(&S_dst, &S_base, models, NM, w, &c, &err), &err, "density", snap, "density 0");
    c.density = 1.5;
    expect_refused(rwd_merge(&S_dst, &S_base, models, NM, w, &c, &err), &err, "density", snap, "density 1.5");
    c = rwd_merge_config_default(RWD_MERGE_DARE_TIES);
    c.density = -0.1;
    expect_refused(rwd_merge(&S_dst, &S_base, models, NM, w, &c, &err), &err, "density", snap, "DARE density -0.1");
    c = rwd_merge_config_default(RWD_MERGE_LINEAR);
    expect_refused(rwd_merge(&S_dst, NULL, models, NM, wz, &c, &err), &err, "sum to 0", snap, "linear weights summing to 0 with normalize");
    c = rwd_merge_config_default(RWD_MERGE_TASK_ARITHMETIC);
    c.normalize = 1;
    expect_refused(rwd_merge(&S_dst, &S_base, models, NM, wz, &c, &err), &err, "sum to 0", snap, "task arithmetic weights summing to 0 with normalize");
    c.normalize = 0;
    CHECK(rwd_merge(&S_dst, &S_base, models, NM, wz, &c, &err) == MOE_OK, "without normalize such weights are fine: %s", err.msg);
    memcpy(S_dst.params, snap, S_dst.numel * sizeof(float));
    expect_refused_in(rwd_merge(&S_m[1], &S_base, models, NM, w, &c, &err), &err, "destination", &S_m[1], golden_f32(&G, "model1", S_dst.numel), "destination = model 1");
    expect_refused(rwd_merge(&S_dst, NULL, models, NM, w, &c, &err), &err, "base", snap, "task arithmetic without a base");
    c = rwd_merge_config_default(RWD_MERGE_SLERP);
    expect_refused(rwd_merge(&S_dst, NULL, models, NM, w, &c, &err), &err, "exactly 2", snap, "SLERP of 3 models");
    w[0] = 1.2;
    expect_refused(rwd_merge(&S_dst, NULL, models, 2, w, &c, &err), &err, "outside [0, 1]", snap, "SLERP t = 1.2");
    w[0] = 0.5;
    c = rwd_merge_config_default(RWD_MERGE_LINEAR);
    c.per = RWD_PER_BLOCK;
    expect_refused(rwd_merge(&S_dst, NULL, models, NM, w, &c, &err), &err, "block", snap, "per-block weights without a block map");
    c = rwd_merge_config_default(RWD_MERGE_BREADCRUMBS);
    c.density = 0.5; c.gamma = 1.0;
    expect_refused(rwd_merge(&S_dst, &S_base, models, NM, w, &c, &err), &err, "gamma", snap, "breadcrumbs gamma 1");
    expect_refused(rwd_average(&S_dst, &S_base, &S_m[0], -0.1, &err), &err, "outside [0, 1]", snap, "lambda -0.1");
    expect_refused(rwd_average(&S_dst, &S_base, &S_m[0], 1.1, &err), &err, "outside [0, 1]", snap, "lambda 1.1");
    expect_refused(rwd_average(&S_dst, &S_base, &S_m[0], (double)NAN, &err), &err, "outside [0, 1]", snap, "lambda NaN");
    expect_refused_in(rwd_average(&S_base, &S_base, &S_m[0], 0.5, &err), &err, "pre-alignment", &S_base, golden_f32(&G, "base", S_dst.numel), "destination = the pre model");
    lam2[1] = 1.3;
    expect_refused(rwd_average_partwise(&S_dst, &S_base, &S_m[0], pv + 1, 1, lam2, 0.5, &err), &err, "block 1", snap, "part-wise lambda 1.3");
    lam2[1] = 0.3;
    expect_refused(rwd_average_partwise(&S_dst, &S_base, &S_m[0], pv, 2, lam3, 0.5, &err), &err, "pivot", snap, "decreasing pivots");
    CHECK(rwd_block_map(block, &K, &S_dst, pv, 2, &err) != MOE_OK, "rwd_block_map refuses decreasing pivots");
    pv[0] = 2;
    CHECK(rwd_block_map(block, &K, &S_dst, pv, 1, &err) != MOE_OK && strstr(err.msg, "3 layers"), "a pivot at the last layer leaves an empty block: %s", err.msg);
    {
        rwd_hma_config hc = rwd_hma_config_default();
        double lam[3] = {0.5, 0.5, 0.5};
        pv[0] = 0; pv[1] = 1;
        rwd_block_map(block, &K, &S_dst, pv, 2, &err);
        hc.mean = 1.5;
        expect_refused(rwd_hma_merge(&S_dst, &S_base, &S_m[0], block, K, lam, &hc, &err), &err, "outside [0, 1]", snap, "HMA mean 1.5");
    }
    free(snap);
}

static void test_layers_and_blocks(void) {
    int pv[4], block[16], K = 0, t, ok = 1;
    moe_err err;
    TEST_BEGIN("layer prefixes, block maps, equal blocks (the official blockN)");
    CHECK(rwd_tensor_layer("l12.attn.wo") == 12 && rwd_tensor_layer("lnf.w") == -1 && rwd_tensor_layer("wte") == -1 &&
          rwd_tensor_layer("l3") == -1 && rwd_tensor_layer("l0.x") == 0, "l<N>. prefixes");
    CHECK(rwd_tensor_is_norm_or_embedding("l0.ln1.w") && rwd_tensor_is_norm_or_embedding("wte") &&
          rwd_tensor_is_norm_or_embedding("l1.moe.hyper.expert_emb") && !rwd_tensor_is_norm_or_embedding("l0.attn.wqkv") &&
          !rwd_tensor_is_norm_or_embedding("l2.moe.router.w"), "norms and embeddings by name");
    CHECK(rwd_pivots_equal(pv, 26, 3, &err) == MOE_OK && pv[0] == 7 && pv[1] == 15, "26 layers in 3 blocks: 0-7, 8-15, 16-25 (%d %d)", pv[0], pv[1]);
    CHECK(rwd_pivots_equal(pv, 3, 3, &err) == MOE_OK && pv[0] == 0 && pv[1] == 1, "one block per layer");
    CHECK(rwd_pivots_equal(pv, 3, 4, &err) != MOE_OK, "more blocks than layers is refused");
    CHECK(rwd_block_map(block, &K, &S_dst, pv, 2, &err) == MOE_OK && K == 3, "3 blocks");
    for (t = 0; t < S_dst.count; t++) ok &= block[t] == rwd_tensor_layer(S_dst.tensors[t].name);
    CHECK(ok, "one block per layer, -1 outside");
    pv[0] = 0;
    CHECK(rwd_block_map(block, &K, &S_dst, pv, 1, &err) == MOE_OK && K == 2, "pivot 0: 2 blocks");
    for (t = 0, ok = 1; t < S_dst.count; t++) {
        int l = rwd_tensor_layer(S_dst.tensors[t].name);
        ok &= block[t] == (l < 0 ? -1 : l > 0);
    }
    CHECK(ok, "the pivot layer closes its block (layer 0 | layers 1-2)");
}

/* ---- HMA ---- */

typedef struct {
    const float *target; /* (numel) */
    const float *c;      /* (numel) curvature */
    int calls;
} quad;

/* L = 1/2 sum c_i (theta_i - target_i)^2 */
static moe_status quad_loss(double *loss, float *grad, const moe_store *merged, void *user) {
    quad *q = (quad *)user;
    double L = 0.0;
    size_t i;
    for (i = 0; i < merged->numel; i++) {
        double d = (double)merged->params[i] - q->target[i];
        L += 0.5 * q->c[i] * d * d;
        grad[i] = (float)(q->c[i] * d);
    }
    q->calls++;
    *loss = L;
    return MOE_OK;
}

static void test_hma_gradients(void) {
    double a[3] = {0.4, -1.1, 1.7}, dl[3] = {0.3, -0.7, 1.1}, da[3] = {0, 0, 0}, lp[3], lm[3], ap[3], am[3];
    double v[3] = {0.6, -0.2, 0.75}, num = 0.0, ana = 0.0, h = 1e-5, mean = 0.35, eps = 0.2;
    double lam[3], g[3], cw[3] = {2.0, 5.0, 1.0}, Jp, Jm, J;
    int k, K = 0, pv[2] = {0, 1}, *block = (int *)malloc((size_t)S_dst.count * sizeof(int));
    float *target = (float *)malloc(S_dst.numel * sizeof(float)), *curv = (float *)malloc(S_dst.numel * sizeof(float));
    float *gbuf = (float *)malloc(S_dst.numel * sizeof(float));
    rwd_hma_config hc = rwd_hma_config_default();
    quad q;
    moe_rng r;
    moe_err err;
    size_t i;
    TEST_BEGIN("HMA: ratios hold the mean exactly; ratio, regulariser and objective gradients (finite differences)");
    rwd_hma_ratios(lam, a, 3, mean, eps);
    CHECK(fabs((lam[0] + lam[1] + lam[2]) / 3 - mean) < 1e-15, "mean %.17g", (lam[0] + lam[1] + lam[2]) / 3);
    CHECK(lam[2] < lam[0] && lam[0] < lam[1], "a larger a_k gives more of the pre model (a smaller lambda_k)");
    for (k = 0; k < 3; k++) ap[k] = am[k] = -0.3;
    rwd_hma_ratios(lp, ap, 3, mean, eps);
    CHECK(fabs(lp[0] - mean) < 1e-15 && fabs(lp[2] - mean) < 1e-15, "equal a: every lambda is the mean");
    rwd_hma_ratios_backward(da, dl, a, 3, mean, eps);
    for (k = 0; k < 3; k++) { ap[k] = a[k] + h * v[k]; am[k] = a[k] - h * v[k]; ana += da[k] * v[k]; }
    rwd_hma_ratios(lp, ap, 3, mean, eps);
    rwd_hma_ratios(lm, am, 3, mean, eps);
    for (k = 0; k < 3; k++) num += dl[k] * (lp[k] - lm[k]) / (2 * h);
    check_grad("d lambda / d a", ana, num, 1e-7);
    for (k = 0; k < 3; k++) g[k] = 0.0;
    for (k = 0; k < 2; k++) {
        rwd_hma_reg reg = k ? RWD_HMA_REG_SQUARED : RWD_HMA_REG_ABS;
        double gv = 0.0, rp, rm;
        for (i = 0; i < 3; i++) { g[i] = 0.0; lp[i] = lam[i] + h * v[i]; lm[i] = lam[i] - h * v[i]; }
        rwd_hma_regularizer(g, lam, cw, 3, mean, 0.01, reg);
        for (i = 0; i < 3; i++) gv += g[i] * v[i];
        rp = rwd_hma_regularizer(NULL, lp, cw, 3, mean, 0.01, reg);
        rm = rwd_hma_regularizer(NULL, lm, cw, 3, mean, 0.01, reg);
        check_grad(k ? "squared regulariser" : "absolute regulariser", gv, (rp - rm) / (2 * h), 1e-6);
    }
    /* the whole objective through the merged model, on a quadratic loss */
    rwd_block_map(block, &K, &S_dst, pv, 2, &err);
    moe_rng_seed(&r, 3);
    for (i = 0; i < S_dst.numel; i++) { target[i] = moe_rng_normal(&r); curv[i] = 0.5f + moe_rng_uniform(&r); }
    q.target = target; q.c = curv; q.calls = 0;
    for (k = 0; k < 2; k++) {
        double ga[3], gv = 0.0;
        hc.mean = mean; hc.gamma = 0.05; hc.follow = k ? RWD_HMA_FOLLOW_ALL : RWD_HMA_FOLLOW_LINEAR;
        hc.reg = RWD_HMA_REG_SQUARED;
        CHECK(rwd_hma_objective(&J, ga, &S_dst, gbuf, a, &S_base, &S_m[0], block, K, &hc, quad_loss, &q, &err) == MOE_OK, "objective: %s", err.msg);
        for (i = 0; i < 3; i++) { gv += ga[i] * v[i]; ap[i] = a[i] + 1e-3 * v[i]; am[i] = a[i] - 1e-3 * v[i]; }
        rwd_hma_objective(&Jp, NULL, &S_dst, gbuf, ap, &S_base, &S_m[0], block, K, &hc, quad_loss, &q, &err);
        rwd_hma_objective(&Jm, NULL, &S_dst, gbuf, am, &S_base, &S_m[0], block, K, &hc, quad_loss, &q, &err);
        check_grad_tol(k ? "dJ/da, every layer tensor follows" : "dJ/da, linear maps follow (official)", gv, (Jp - Jm) / 2e-3, 2e-3, 1e-5);
    }
    free(block); free(target); free(curv); free(gbuf);
}

static void test_hma_follow_and_search(void) {
    rwd_hma_config hc = rwd_hma_config_default();
    double lam[3] = {0.1, 0.9, 0.5}, a[3], found[3], trace[80], star[3] = {0.2, 0.9, 0.4}, m;
    int t, K = 0, pv[2] = {0, 1}, *block = (int *)malloc((size_t)S_dst.count * sizeof(int)), ok_pre = 1, ok_lin = 1, n_pre = 0;
    float *target = (float *)malloc(S_dst.numel * sizeof(float)), *curv = (float *)malloc(S_dst.numel * sizeof(float));
    moe_store tgt;
    quad q;
    moe_err err;
    size_t i;
    TEST_BEGIN("HMA: which tensors follow; the search on a quadratic finds the ratios of its minimum");
    rwd_block_map(block, &K, &S_dst, pv, 2, &err);
    hc.mean = 0.5;
    CHECK(rwd_hma_merge(&S_dst, &S_base, &S_m[0], block, K, lam, &hc, &err) == MOE_OK, "HMA merge: %s", err.msg);
    for (t = 0; t < S_dst.count; t++) {
        const moe_tensor *T = &S_dst.tensors[t];
        int from_pre = block[t] < 0 || rwd_tensor_is_norm_or_embedding(T->name);
        for (i = T->offset; i < T->offset + T->numel; i++) {
            float want = (float)((1.0 - lam[block[t] < 0 ? 0 : block[t]]) * S_base.params[i] + lam[block[t] < 0 ? 0 : block[t]] * S_m[0].params[i]);
            if (from_pre) ok_pre &= S_dst.params[i] == S_base.params[i];
            else ok_lin &= S_dst.params[i] == want;
        }
        n_pre += from_pre;
    }
    CHECK(ok_pre && n_pre == 4, "official rule: norms, embeddings and tensors outside the layers (%d) are the pre model's", n_pre);
    CHECK(ok_lin, "official rule: the layers' linear maps follow their block's lambda");
    /* the quadratic's minimum is the FOLLOW_ALL merge at lambda* (mean 0.5): the search recovers it */
    hc.follow = RWD_HMA_FOLLOW_ALL;
    moe_store_init(&tgt);
    CHECK(layout_store(&tgt) == 0, "target store");
    rwd_hma_merge(&tgt, &S_base, &S_m[0], block, K, star, &hc, &err);
    for (i = 0; i < S_dst.numel; i++) { target[i] = tgt.params[i]; curv[i] = 1.0f; }
    q.target = target; q.c = curv; q.calls = 0;
    hc.gamma = 0.0; hc.steps = 80; hc.lr = 0.1f; hc.eps = 0.05; /* eps 0.2 cannot reach a ratio of 8 between blocks */
    CHECK(rwd_hma_search(a, found, trace, &S_dst, &S_base, &S_m[0], block, K, &hc, quad_loss, &q, &err) == MOE_OK, "search: %s", err.msg);
    m = (found[0] + found[1] + found[2]) / 3;
    CHECK(q.calls == 80, "one loss call per step (%d)", q.calls);
    CHECK(fabs(m - 0.5) < 1e-12, "the mean is held through the search: %.15g", m);
    CHECK(trace[79] < 0.05 * trace[0], "the objective falls: %.5g -> %.5g", trace[0], trace[79]);
    CHECK(fabs(found[0] - star[0]) < 0.05 && fabs(found[1] - star[1]) < 0.05 && fabs(found[2] - star[2]) < 0.05,
          "lambdas %.3f %.3f %.3f near the optimum %.1f %.1f %.1f", found[0], found[1], found[2], star[0], star[1], star[2]);
    rwd_hma_merge(&tgt, &S_base, &S_m[0], block, K, found, &hc, &err);
    CHECK(memcmp(tgt.params, S_dst.params, S_dst.numel * sizeof(float)) == 0, "the destination holds the merge of the returned lambdas");
    moe_store_free(&tgt);
    free(block); free(target); free(curv);
}

/* ---- HMA on the tiny LM: the merged model's loss on the aligned model's own text ---- */

typedef struct {
    moe_model *m; /* its store is the merge destination */
    const int *x, *y;
    int B, T;
} lm_loss_ctx;

static moe_status lm_loss(double *loss, float *grad, const moe_store *merged, void *user) {
    lm_loss_ctx *c = (lm_loss_ctx *)user;
    moe_status st;
    if (merged != &c->m->S) return MOE_ERR_INVALID_ARG;
    moe_store_zero_grad(&c->m->S);
    st = moe_model_forward(c->m, c->x, c->y, c->B, c->T, NULL);
    if (st == MOE_OK) st = moe_model_backward(c->m, 1.0f);
    if (st != MOE_OK) return st;
    memcpy(grad, c->m->S.grads, c->m->S.numel * sizeof(float));
    *loss = c->m->loss + c->m->aux_loss;
    return MOE_OK;
}

static void windows(int *x, int *y, const char *text, int B, int T) {
    int b, t, n = (int)strlen(text);
    for (b = 0; b < B; b++)
        for (t = 0; t < T; t++) {
            x[b * T + t] = (unsigned char)text[(b * 7 + t) % n];
            y[b * T + t] = (unsigned char)text[(b * 7 + t + 1) % n];
        }
}

static void train(moe_model *m, const int *x, const int *y, int B, int T, int steps) {
    moe_adamw_config ac = moe_adamw_config_default();
    int s;
    for (s = 1; s <= steps; s++) {
        moe_store_zero_grad(&m->S);
        moe_model_forward(m, x, y, B, T, NULL);
        moe_model_backward(m, 1.0f);
        moe_adamw_step(&m->S, &ac, 3e-3f, s);
    }
}

static void test_hma_tiny_lm(void) {
    moe_model_config mc = moe_model_config_default();
    moe_model pre, post, mix;
    rwd_hma_config hc = rwd_hma_config_default();
    enum { B = 4, T = 16 };
    int xa[B * T], ya[B * T], xb[B * T], yb[B * T], pv[2], block[64], K = 0;
    double a[3], lam[3], trace[30], post_loss, pre_loss;
    lm_loss_ctx ctx;
    moe_err err;
    TEST_BEGIN("HMA search on the tiny LM: the merged model's loss on the aligned model's text falls, mean held");
    mc.max_seq = T; mc.d = 16; mc.n_layers = 3; mc.n_heads = 2; mc.d_ff = 32;
    mc.moe_every = 1; mc.dense_first = 1; mc.moe.n_experts = 4; mc.moe.top_k = 2; mc.moe.d_ff = 16;
    if (moe_model_init(&pre, &mc, B, T) || moe_model_init(&post, &mc, B, T) || moe_model_init(&mix, &mc, B, T)) {
        CHECK(0, "model init: %s", pre.err.msg);
        return;
    }
    windows(xa, ya, "the cat sat on the mat and the dog sat on the log. ", B, T);
    windows(xb, yb, "GOOD ANSWER: YES, HAPPY TO HELP! ", B, T);
    moe_model_init_weights(&pre, 5);
    train(&pre, xa, ya, B, T, 60);                      /* "pre-training" */
    memcpy(post.S.params, pre.S.params, pre.S.numel * sizeof(float));
    train(&post, xb, yb, B, T, 60);                     /* "alignment" on its own samples */
    moe_model_forward(&post, xb, yb, B, T, NULL); post_loss = post.loss;
    moe_model_forward(&pre, xb, yb, B, T, NULL); pre_loss = pre.loss;
    CHECK(post_loss < pre_loss - 0.5, "alignment lowered the loss on its samples: %.3f -> %.3f", pre_loss, post_loss);
    CHECK(rwd_pivots_equal(pv, 3, 3, &err) == MOE_OK && rwd_block_map(block, &K, &mix.S, pv, 2, &err) == MOE_OK && K == 3, "blocks");
    ctx.m = &mix; ctx.x = xb; ctx.y = yb; ctx.B = B; ctx.T = T;
    hc.mean = 0.5; hc.steps = 30; hc.lr = 0.2f;
    CHECK(rwd_hma_search(a, lam, trace, &mix.S, &pre.S, &post.S, block, K, &hc, lm_loss, &ctx, &err) == MOE_OK, "search: %s", err.msg);
    CHECK(trace[29] < trace[0] - 0.02, "merged loss %.4f -> %.4f over 30 steps", trace[0], trace[29]);
    CHECK(fabs((lam[0] + lam[1] + lam[2]) / 3 - 0.5) < 1e-12, "mean ratio held: %.3f %.3f %.3f", lam[0], lam[1], lam[2]);
    moe_model_free(&pre); moe_model_free(&post); moe_model_free(&mix);
}

/* ---- grid search ---- */

typedef struct { const moe_store *ref; int calls; } dist_ctx;

/* minus the squared distance to ref */
static moe_status neg_dist(double *score, const moe_store *merged, void *user) {
    dist_ctx *c = (dist_ctx *)user;
    double s = 0.0;
    size_t i;
    for (i = 0; i < merged->numel; i++) { double d = (double)merged->params[i] - c->ref->params[i]; s += d * d; }
    c->calls++;
    *score = -s;
    return MOE_OK;
}

static moe_status pos_dist(double *score, const moe_store *merged, void *user) {
    moe_status st = neg_dist(score, merged, user);
    *score = -*score;
    return st;
}

static void test_hma_grid(void) {
    rwd_hma_config hc = rwd_hma_config_default();
    double lam[64 * 3], rew[64], tax[64], rr[4] = {1, 2, 3, 2}, tt[4] = {1, 1, 2, 3};
    int front[64], f4[4], K = 0, pv[2] = {0, 1}, block[16], p, ok = 1, n_front = 0;
    long n;
    dist_ctx rc, tc;
    moe_err err;
    TEST_BEGIN("HMA grid: points at the fixed mean, two callbacks, the Pareto front");
    { /* the grid's front: rwd_pareto_front on (reward, -tax) */
        double pts[8];
        size_t idx[4], m = 0;
        for (p = 0; p < 4; p++) { pts[2 * p] = rr[p]; pts[2 * p + 1] = -tt[p]; f4[p] = 0; }
        CHECK(rwd_pareto_front(idx, &m, pts, 4, 2, &err) == MOE_OK, "front of 4 hand points: %s", err.msg);
        while (m > 0) f4[idx[--m]] = 1;
    }
    CHECK(!f4[0] && f4[1] && f4[2] && !f4[3], "front of 4 hand points: %d %d %d %d", f4[0], f4[1], f4[2], f4[3]);
    CHECK(rwd_hma_grid_size(2, 0.5, 0.25) == 5 && rwd_hma_grid_size(1, 0.3, 0.1) == 1, "grid sizes");
    CHECK(rwd_hma_grid_size(3, 0.5, 0.25) == 19, "3 blocks, step 1/4: 19 points (%ld)", rwd_hma_grid_size(3, 0.5, 0.25));
    CHECK(rwd_hma_grid_size(40, 0.5, 0.01) == -1, "an endless grid is refused");
    rwd_block_map(block, &K, &S_dst, pv, 2, &err);
    hc.mean = 0.5; hc.grid_step = 0.25; hc.follow = RWD_HMA_FOLLOW_ALL;
    rc.ref = &S_m[0]; rc.calls = 0; tc.ref = &S_base; tc.calls = 0;
    CHECK(rwd_hma_grid(lam, rew, tax, front, &n, 5, &S_dst, &S_base, &S_m[0], block, K, &hc, neg_dist, &rc, pos_dist, &tc, &err) != MOE_OK &&
          n == 19 && rc.calls == 0, "room for 5 of 19 points: refused before any call (%s)", err.msg);
    CHECK(rwd_hma_grid(lam, rew, tax, front, &n, 64, &S_dst, &S_base, &S_m[0], block, K, &hc, neg_dist, &rc, pos_dist, &tc, &err) == MOE_OK, "grid: %s", err.msg);
    CHECK(n == 19 && rc.calls == 19 && tc.calls == 19, "19 points, each scored once by each callback");
    for (p = 0; p < n; p++) {
        double m = (lam[3 * p] + lam[3 * p + 1] + lam[3 * p + 2]) / 3;
        ok &= fabs(m - 0.5) < 1e-12 && lam[3 * p] >= -1e-12 && lam[3 * p + 2] <= 1 + 1e-12;
        n_front += front[p];
    }
    CHECK(ok, "every point keeps the mean and stays in [0, 1]");
    CHECK(n_front >= 1 && n_front < 19, "a front of %d of 19 points", n_front);
    CHECK(lam[0] == 0.0 && lam[1] == 0.5 && lam[2] == 1.0, "first point (first block slowest): %g %g %g", lam[0], lam[1], lam[2]);
}

int main(void) {
    if (setup() != 0) {
        CHECK(0, "cannot set up from tests/ref/merge.bin (%s)", G.err);
        return test_summary();
    }
    test_golden_cases();
    test_dare_statistics();
    test_slerp_ends();
    test_layers_and_blocks();
    test_bad_input();
    test_hma_gradients();
    test_hma_follow_and_search();
    test_hma_tiny_lm();
    test_hma_grid();
    teardown();
    return test_summary();
}
