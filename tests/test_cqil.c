/* test_cqil.c - moe.h >>moe:model's CQIL groups (arXiv 2404.06709): groups of one equal the
   sequential model bit for bit; a group of two equals the sum of its layers' residual updates
   on the common input (computed by two one-layer models); the bypass adds the earlier
   members' attention outputs to the FFN input (clean) and to the output too (double
   counting); gradients of the CQIL form by finite differences; 1 vs 2 threads; the latency
   proxy; bad group tables; backward from given logit gradients equals the cross-entropy's. */
#include "moe.h"
#include "test.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static moe_model_config tiny_config(int moe) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 10;
    c.d = 16;
    c.n_layers = 4;
    c.n_heads = 2;
    c.d_ff = 24;
    c.pos = MOE_POS_ROPE;
    c.moe_every = moe ? 1 : 0;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 12;
    c.moe.router_init_std = 1.0f; /* clear top-k margins for finite differences */
    return c;
}

static void random_tokens(int *x, int n, int V, moe_rng *r) {
    int i;
    for (i = 0; i < n; i++) x[i] = moe_rng_below(r, V);
}

static unsigned routing_hash(const moe_model *m) {
    unsigned h = 17u;
    int l, i;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe)
            for (i = 0; i < m->blocks[l].moe.routed.n; i++)
                h = h * 31u + (unsigned)m->blocks[l].moe.routed.token[i] * 7u + (unsigned)m->blocks[l].moe.routed.expert[i];
    return h;
}

/* a model of config c with weights of seed 3 scaled by 2 (every path matters), groups set */
static int make_model(moe_model *m, const moe_model_config *c, int B, int T, const int *first, const int *size, int n, int bypass,
                      int dbl) {
    size_t i;
    if (moe_model_init(m, c, B, T) != MOE_OK) return 0;
    moe_model_init_weights(m, 3);
    for (i = 0; i < m->S.numel; i++) m->S.params[i] *= 2.0f;
    return moe_model_set_groups(m, first, size, n, bypass, dbl) == MOE_OK;
}

static void test_groups_of_one(void) {
    int moe, i, B = 2, T = 8, x[16], y[16], first[4], size[4];
    moe_rng r;
    TEST_BEGIN("CQIL: every layer a group of one = the sequential model, bit for bit (forward and gradients)");
    moe_rng_seed(&r, 5);
    random_tokens(x, 16, 32, &r);
    random_tokens(y, 16, 32, &r);
    for (i = 0; i < 4; i++) { first[i] = i; size[i] = 1; }
    for (moe = 0; moe < 2; moe++) {
        moe_model_config c = tiny_config(moe);
        moe_model a, b;
        int ok = make_model(&a, &c, B, T, NULL, NULL, 0, 0, 0) && make_model(&b, &c, B, T, first, size, 4, 1, 1);
        CHECK(ok, "init and set_groups: %s %s", a.err.msg, b.err.msg);
        if (!ok) continue;
        CHECK(moe_model_depth(&b) == 4, "depth of groups of one = 4, got %d", moe_model_depth(&b));
        moe_store_zero_grad(&a.S);
        moe_store_zero_grad(&b.S);
        CHECK(moe_model_forward(&a, x, y, B, T, NULL) == MOE_OK && moe_model_forward(&b, x, y, B, T, NULL) == MOE_OK, "forwards");
        CHECK(moe_model_backward(&a, 1.0f) == MOE_OK && moe_model_backward(&b, 1.0f) == MOE_OK, "backwards");
        CHECK(a.loss == b.loss && a.aux_loss == b.aux_loss && memcmp(a.logits, b.logits, sizeof(float) * 16 * 32) == 0,
              "%s: logits and loss identical", moe ? "MoE" : "dense");
        CHECK(memcmp(a.S.grads, b.S.grads, sizeof(float) * a.S.numel) == 0, "%s: gradients identical", moe ? "MoE" : "dense");
        /* n_groups = 0 restores the sequential model */
        CHECK(moe_model_set_groups(&b, NULL, NULL, 0, 0, 0) == MOE_OK && moe_model_depth(&b) == 4, "groups cleared");
        moe_model_forward(&b, x, y, B, T, NULL);
        CHECK(memcmp(a.logits, b.logits, sizeof(float) * 16 * 32) == 0, "cleared groups: the sequential logits");
        moe_model_free(&a);
        moe_model_free(&b);
    }
}

/* copies layer `from` of src into layer `to` of dst (every tensor "l<from>.*"), and the
   embeddings and final norm */
static void copy_layer(moe_model *dst, const moe_model *src, int from, int to) {
    int id;
    char pre[16], name[MOE_NAME_LEN];
    snprintf(pre, sizeof pre, "l%d.", from);
    for (id = 0; id < src->S.count; id++) {
        const moe_tensor *t = &src->S.tensors[id];
        int j;
        if (strncmp(t->name, pre, strlen(pre)) == 0)
            snprintf(name, sizeof name, "l%d.%s", to, t->name + strlen(pre));
        else if (t->name[0] == 'l' && t->name[1] >= '0' && t->name[1] <= '9')
            continue;
        else
            snprintf(name, sizeof name, "%s", t->name);
        j = moe_store_find(&dst->S, name);
        if (j >= 0) memcpy(moe_store_param(&dst->S, j), src->S.params + t->offset, sizeof(float) * t->numel);
    }
}

static void test_group_semantics(void) {
    moe_model_config c = tiny_config(0), c1;
    moe_model g, s0, s1, clean, dbl;
    int B = 2, T = 8, x[16], first = 0, size = 2, ok;
    size_t i, Nd = (size_t)16 * 16;
    double worst = 0.0, w2 = 0.0, w3 = 0.0;
    moe_rng r;
    TEST_BEGIN("CQIL: a group of two = h + (f_0(h) - h) + (f_1(h) - h); the bypass, clean and double-counted");
    moe_rng_seed(&r, 6);
    random_tokens(x, 16, 32, &r);
    c.n_layers = 2;
    c1 = c;
    c1.n_layers = 1;
    ok = make_model(&g, &c, B, T, &first, &size, 1, 0, 0) && moe_model_init(&s0, &c1, B, T) == MOE_OK &&
         moe_model_init(&s1, &c1, B, T) == MOE_OK && make_model(&clean, &c, B, T, &first, &size, 1, 1, 0) &&
         make_model(&dbl, &c, B, T, &first, &size, 1, 1, 1);
    CHECK(ok, "models");
    if (!ok) return;
    CHECK(moe_model_depth(&g) == 1, "a group of two layers has depth 1, got %d", moe_model_depth(&g));
    copy_layer(&s0, &g, 0, 0);
    copy_layer(&s1, &g, 1, 0);
    moe_model_forward(&g, x, NULL, B, T, NULL);
    moe_model_forward(&s0, x, NULL, B, T, NULL);
    moe_model_forward(&s1, x, NULL, B, T, NULL);
    for (i = 0; i < Nd; i++) { /* h = the embedding, the same in all three */
        double want = (double)s0.x_final[i] + s1.x_final[i] - g.blocks[0].x[i];
        double e = fabs(want - g.x_final[i]);
        worst = e > worst ? e : worst;
    }
    CHECK(worst < 1e-5, "group output = f_0(h) + f_1(h) - h (worst %.2g)", worst);
    /* bypass d = 1: member 1's FFN input gains a_0; double counting adds a_0 to the output */
    moe_model_forward(&clean, x, NULL, B, T, NULL);
    moe_model_forward(&dbl, x, NULL, B, T, NULL);
    worst = 0.0;
    for (i = 0; i < Nd; i++) {
        double a0 = (double)g.blocks[0].x2[i] - g.blocks[0].x[i];
        double e = fabs((double)clean.blocks[1].x2[i] - (g.blocks[1].x2[i] + a0));
        double e2 = fabs(((double)dbl.x_final[i] - clean.x_final[i]) - a0);
        worst = e > worst ? e : worst;
        w2 = e2 > w2 ? e2 : w2;
        w3 += fabs((double)dbl.x_final[i] - clean.x_final[i]);
    }
    CHECK(worst < 1e-5, "clean bypass: r_1 = h + a_1 + a_0 (worst %.2g)", worst);
    CHECK(w2 < 1e-5 && w3 > 1e-3, "double counting: h_out gains a_0 once more (worst %.2g, total %.3g)", w2, w3);
    CHECK(memcmp(clean.blocks[1].x2, dbl.blocks[1].x2, sizeof(float) * Nd) == 0, "both bypass forms feed member 1's FFN the same r_1");
    moe_model_free(&g);
    moe_model_free(&s0);
    moe_model_free(&s1);
    moe_model_free(&clean);
    moe_model_free(&dbl);
}

/* one directional check per tensor, as tests/test_model.c does for the sequential model */
static void gradcheck(const char *name, const moe_model_config *c, const int *first, const int *size, int n, int bypass, int dbl) {
    moe_model m;
    moe_rng r;
    int B = 2, T = 8, inputs[16], targets[16], id, skipped = 0;
    unsigned h0;
    float *p0;
    size_t i;
    if (!make_model(&m, c, B, T, first, size, n, bypass, dbl)) {
        CHECK(0, "%s: init: %s", name, m.err.msg);
        moe_model_free(&m);
        return;
    }
    moe_rng_seed(&r, 8);
    random_tokens(inputs, 16, c->vocab, &r);
    random_tokens(targets, 16, c->vocab, &r);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    moe_store_zero_grad(&m.S);
    CHECK(moe_model_forward(&m, inputs, targets, B, T, NULL) == MOE_OK, "%s: forward", name);
    h0 = routing_hash(&m);
    CHECK(moe_model_backward(&m, 1.0f) == MOE_OK, "%s: backward", name);
    for (id = 0; id < m.S.count; id++) {
        const moe_tensor *t = &m.S.tensors[id];
        float *p = m.S.params + t->offset;
        const float *g = m.S.grads + t->offset;
        double rms = 0.0, analytic = 0.0, jp, jm, eps = 1e-3;
        float *v = (float *)malloc(t->numel * sizeof(float));
        int same;
        char label[160];
        for (i = 0; i < t->numel; i++) rms += (double)p0[t->offset + i] * p0[t->offset + i];
        rms = sqrt(rms / t->numel);
        if (rms < 1e-3) rms = 1e-3;
        for (i = 0; i < t->numel; i++) {
            v[i] = (float)rms * moe_rng_normal(&r);
            analytic += (double)g[i] * v[i];
        }
        for (i = 0; i < t->numel; i++) p[i] = p0[t->offset + i] + (float)eps * v[i];
        moe_model_forward(&m, inputs, targets, B, T, NULL);
        jp = m.loss + m.aux_loss;
        same = routing_hash(&m) == h0;
        for (i = 0; i < t->numel; i++) p[i] = p0[t->offset + i] - (float)eps * v[i];
        moe_model_forward(&m, inputs, targets, B, T, NULL);
        jm = m.loss + m.aux_loss;
        same &= routing_hash(&m) == h0;
        memcpy(p, p0 + t->offset, t->numel * sizeof(float));
        free(v);
        if (!same) { skipped++; continue; }
        snprintf(label, sizeof label, "%s: %s", name, t->name);
        check_grad_tol(label, analytic, (jp - jm) / (2 * eps), 1e-2, 3e-4);
    }
    CHECK(skipped * 4 <= m.S.count, "%s: %d of %d tensors flipped a routing decision", name, skipped, m.S.count);
    free(p0);
    moe_model_free(&m);
}

static void test_gradients(void) {
    moe_model_config dense = tiny_config(0), moe = tiny_config(1);
    int f1[1] = {1}, s1[1] = {2}, f2[1] = {0}, s2[1] = {4}, f3[2] = {0, 2}, s3[2] = {2, 2};
    TEST_BEGIN("CQIL gradients by directional finite differences");
    gradcheck("dense, group [1,3), no bypass", &dense, f1, s1, 1, 0, 0);
    gradcheck("dense, group [0,4), bypass 1, clean", &dense, f2, s2, 1, 1, 0);
    gradcheck("dense, group [0,4), bypass 2, double counted", &dense, f2, s2, 1, 2, 1);
    gradcheck("MoE, groups [0,2) [2,4), bypass 1, clean", &moe, f3, s3, 2, 1, 0);
    gradcheck("MoE, group [0,4), bypass 3, double counted", &moe, f2, s2, 1, 3, 1);
}

static void test_threads_and_logits(void) {
    moe_model_config c = tiny_config(1);
    int B = 2, T = 8, x[16], y[16], first[2] = {0, 2}, size[2] = {2, 2}, N = 16, V = 32;
    moe_model a, b;
    moe_rng r;
    float *dl;
    TEST_BEGIN("CQIL: 1 vs 2 threads bit-identical; backward from given logit gradients = the cross-entropy's");
    moe_rng_seed(&r, 9);
    random_tokens(x, 16, 32, &r);
    random_tokens(y, 16, 32, &r);
#ifdef _OPENMP
    {
        int nt = omp_get_max_threads(), k;
        moe_model *ms[2];
        ms[0] = &a;
        ms[1] = &b;
        for (k = 0; k < 2; k++) {
            omp_set_num_threads(k + 1);
            make_model(ms[k], &c, B, T, first, size, 2, 1, 0);
            moe_store_zero_grad(&ms[k]->S);
            moe_model_forward(ms[k], x, y, B, T, NULL);
            moe_model_backward(ms[k], 1.0f);
        }
        omp_set_num_threads(nt);
        CHECK(a.loss == b.loss && memcmp(a.logits, b.logits, sizeof(float) * N * V) == 0, "logits identical");
        CHECK(memcmp(a.S.grads, b.S.grads, sizeof(float) * a.S.numel) == 0, "gradients identical");
        moe_model_free(&a);
        moe_model_free(&b);
    }
#endif
    make_model(&a, &c, B, T, first, size, 2, 0, 0);
    make_model(&b, &c, B, T, first, size, 2, 0, 0);
    moe_store_zero_grad(&a.S);
    moe_store_zero_grad(&b.S);
    moe_model_forward(&a, x, y, B, T, NULL);
    moe_model_backward(&a, 0.5f);
    dl = (float *)calloc((size_t)N * V, sizeof(float));
    moe_model_forward(&b, x, NULL, B, T, NULL);
    CHECK(moe_model_backward(&b, 1.0f) != MOE_OK, "plain backward after a forward without targets is refused");
    moe_crossentropy_backward(dl, b.logits, y, N, V, 0.5f / (float)N);
    CHECK(moe_model_backward_logits(&b, dl, 0.5f) == MOE_OK, "backward from logits: %s", b.err.msg);
    CHECK(memcmp(a.S.grads, b.S.grads, sizeof(float) * a.S.numel) == 0, "the same gradients, bit for bit");
    free(dl);
    moe_model_free(&a);
    moe_model_free(&b);
}

static void test_bad_groups(void) {
    moe_model_config c = tiny_config(0), cn = tiny_config(1), cg = tiny_config(1);
    moe_model m;
    moe_rng r;
    int x[16], f[2], s[2];
    TEST_BEGIN("CQIL: bad group tables are a status with a sentence");
    moe_rng_seed(&r, 2);
    random_tokens(x, 16, 32, &r);
    moe_model_init(&m, &c, 2, 8);
    moe_model_init_weights(&m, 1);
    f[0] = 3; s[0] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 1, 0, 0) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "inside the model"), "past the end: %s", m.err.msg);
    f[0] = -1; s[0] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 1, 0, 0) == MOE_ERR_INVALID_ARG, "negative first layer: %s", m.err.msg);
    f[0] = 0; s[0] = 0;
    CHECK(moe_model_set_groups(&m, f, s, 1, 0, 0) == MOE_ERR_INVALID_ARG, "empty group: %s", m.err.msg);
    f[0] = 0; s[0] = 3; f[1] = 2; s[1] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 2, 0, 0) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "disjoint"), "overlap: %s", m.err.msg);
    f[0] = 2; s[0] = 2; f[1] = 0; s[1] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 2, 0, 0) == MOE_ERR_INVALID_ARG, "decreasing order: %s", m.err.msg);
    f[0] = 0; s[0] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 1, -1, 0) == MOE_ERR_INVALID_ARG, "negative bypass: %s", m.err.msg);
    CHECK(moe_model_set_groups(&m, NULL, s, 1, 0, 0) == MOE_ERR_INVALID_ARG, "NULL table: %s", m.err.msg);
    CHECK(moe_model_depth(&m) == 4 && moe_model_forward(&m, x, NULL, 2, 8, NULL) == MOE_OK, "a refused table leaves the model sequential");
    f[0] = 0; s[0] = 2; f[1] = 2; s[1] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 2, 1, 0) == MOE_OK && moe_model_depth(&m) == 2, "two pairs: depth 2");
    moe_model_free(&m);
    cg.router_input = MOE_RIN_GRU;
    cg.router_dim = 8;
    moe_model_init(&m, &cg, 2, 8);
    f[0] = 0; s[0] = 2;
    CHECK(moe_model_set_groups(&m, f, s, 1, 0, 0) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "GRU"), "RMoE router in a group: %s", m.err.msg);
    moe_model_free(&m);
    cn.moe.router = MOE_ROUTER_NOISY_TOPK;
    moe_model_init(&m, &cn, 2, 8);
    moe_model_init_weights(&m, 1);
    CHECK(moe_model_set_groups(&m, f, s, 1, 0, 0) == MOE_OK, "noisy MoE layers may be grouped");
    CHECK(moe_model_forward(&m, x, NULL, 2, 8, &r) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "noise"), "with noise: %s", m.err.msg);
    CHECK(moe_model_forward(&m, x, NULL, 2, 8, NULL) == MOE_OK, "without noise: runs");
    m.layer_scale[1] = 0.5f; /* masked growth's residual scale: grouped members run unscaled */
    CHECK(moe_model_forward(&m, x, NULL, 2, 8, NULL) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "residual scale"), "a scaled member: %s", m.err.msg);
    moe_model_free(&m);
}

int main(void) {
    test_groups_of_one();
    test_group_semantics();
    test_gradients();
    test_threads_and_logits();
    test_bad_groups();
    return test_summary();
}
