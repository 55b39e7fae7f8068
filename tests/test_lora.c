/* test_lora.c - named selections of the model's matrices (keys, values, attention) and LoRA
   adapters in weight space (moe.h >>moe:select, >>moe:lora): merge and unmerge, gradients by
   finite differences, adapter-only training, adapter files, bad input. */
#include "moe.h"  /* defines: moe_model_*, moe_lora_*, moe_mask_*, moe_model_select */
#include "test.h" /* defines: CHECK, check_grad_tol, test_summary */

static moe_model_config tiny_config(int moe, moe_pos_kind pos) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 12;
    c.d = 16;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 24;
    c.pos = pos;
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

static void test_select(void) {
    moe_model m;
    moe_model_config c = tiny_config(0, MOE_POS_LEARNED);
    moe_mask k;
    int ids[64], n, i;
    TEST_BEGIN("select: keys, values and attention of dense and expert FFNs");
    CHECK(moe_model_init(&m, &c, 1, 4) == MOE_OK, "init: %s", m.err.msg);
    n = moe_model_select(&m, MOE_SEL_KEYS, ids, 64);
    CHECK(n == 4, "dense keys: gate and up of 2 layers, got %d", n);
    for (i = 0; i < n; i++) CHECK(strstr(m.S.tensors[ids[i]].name, "gate") || strstr(m.S.tensors[ids[i]].name, "up"), "key %s", m.S.tensors[ids[i]].name);
    n = moe_model_select(&m, MOE_SEL_VALUES, ids, 64);
    CHECK(n == 2 && strstr(m.S.tensors[ids[0]].name, "down"), "dense values: down of 2 layers");
    CHECK(moe_model_select(&m, MOE_SEL_ATTN, NULL, 0) == 4, "attention: qkv and o of 2 layers");
    CHECK(moe_model_select_numel(&m, MOE_SEL_UP) == moe_model_select_numel(&m, MOE_SEL_DOWN), "up alone matches down alone");
    CHECK(moe_model_select_numel(&m, MOE_SEL_KEYS) == 2 * moe_model_select_numel(&m, MOE_SEL_VALUES), "SwiGLU keys are twice the values");
    moe_mask_init(&k, &m.S, MOE_MASK_UPDATE);
    CHECK(moe_mask_select(&k, &m, MOE_SEL_VALUES) == MOE_OK, "mask values only");
    CHECK(moe_mask_count(&k, &m.S, -1) == moe_model_select_numel(&m, MOE_SEL_VALUES), "only the values kept");
    moe_mask_free(&k);
    moe_model_free(&m);

    c = tiny_config(1, MOE_POS_ROPE);
    c.moe.n_shared = 1;
    CHECK(moe_model_init(&m, &c, 1, 4) == MOE_OK, "init: %s", m.err.msg);
    n = moe_model_select(&m, MOE_SEL_FFN, ids, 64);
    CHECK(n == 12, "MoE: gate, up, down of routed and shared banks in 2 layers, got %d", n);
    CHECK(moe_model_select_numel(&m, MOE_SEL_UP) == moe_model_select_numel(&m, MOE_SEL_DOWN), "experts: up matches down");
    for (i = 0; i < m.S.count; i++)
        if (strstr(m.S.tensors[i].name, "router")) {
            int j, hit = 0;
            for (j = 0; j < moe_model_select(&m, MOE_SEL_LINEAR, ids, 64); j++) hit |= ids[j] == i;
            CHECK(!hit, "router %s is not selected", m.S.tensors[i].name);
        }
    moe_model_free(&m);

    c = tiny_config(1, MOE_POS_LEARNED);
    c.moe.expert = MOE_EXPERT_FFN;
    CHECK(moe_model_init(&m, &c, 1, 4) == MOE_OK, "init: %s", m.err.msg);
    n = moe_model_select(&m, MOE_SEL_KEYS, ids, 64);
    CHECK(n == 2 && strstr(m.S.tensors[ids[0]].name, "w_up"), "two-matrix experts: keys = the first matrix");
    moe_mask_init(&k, &m.S, MOE_MASK_GRAD);
    CHECK(moe_mask_select(&k, &m, MOE_SEL_GATE) == MOE_ERR_INVALID_ARG && moe_mask_count(&k, &m.S, -1) == k.numel,
          "no gate to select: %s; mask unchanged", k.err.msg);
    moe_mask_free(&k);
    moe_model_free(&m);
}

static void setup(moe_model *m, moe_model_config *c, int *inputs, int *targets, int N) {
    moe_rng r;
    CHECK(moe_model_init(m, c, 2, N / 2) == MOE_OK, "init: %s", m->err.msg);
    moe_model_init_weights(m, 3);
    moe_rng_seed(&r, 5);
    random_tokens(inputs, N, c->vocab, &r);
    random_tokens(targets, N, c->vocab, &r);
}

static void test_merge(void) {
    moe_model m;
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_lora L;
    moe_lora_config lc;
    moe_rng r;
    int ids[16], n, inputs[16], targets[16], i;
    float *p0;
    double want;
    TEST_BEGIN("lora: attach changes nothing, merge = W0 + s B A, unmerge restores W0");
    setup(&m, &c, inputs, targets, 16);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    n = moe_model_select(&m, MOE_SEL_LINEAR, ids, 16);
    lc.rank = 3; lc.alpha = 6.0f;
    CHECK(moe_lora_attach(&L, &m.S, ids, n, &lc, 9) == MOE_OK, "attach: %s", L.err.msg);
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "B = 0: weights unchanged");
    CHECK(L.S.count == 2 * n && L.scale == 2.0f, "an A and a B per matrix");
    moe_rng_seed(&r, 4);
    for (i = 0; i < (int)L.S.numel; i++) L.S.params[i] = moe_rng_normal(&r);
    CHECK(moe_lora_merge(&L, &m.S) == MOE_OK, "merge");
    { /* element (e=1, o=2, j=5) of the first expert bank's up matrix */
        int t = -1, a, b, q, in, out, rr = 3;
        for (i = 0; i < n; i++)
            if (m.S.tensors[ids[i]].ndim == 3 && t < 0) t = i;
        a = L.id_a[t]; b = L.id_b[t];
        out = m.S.tensors[ids[t]].shape[1]; in = m.S.tensors[ids[t]].shape[2];
        want = p0[m.S.tensors[ids[t]].offset + (size_t)1 * out * in + 2 * in + 5];
        for (q = 0; q < rr; q++)
            want += 2.0 * moe_store_param(&L.S, b)[(size_t)1 * out * rr + 2 * rr + q] * moe_store_param(&L.S, a)[(size_t)1 * rr * in + q * in + 5];
        CHECK(fabs(m.S.params[m.S.tensors[ids[t]].offset + (size_t)1 * out * in + 2 * in + 5] - want) < 1e-5, "expert 1's merged element");
    }
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) != 0, "merged weights differ");
    CHECK(moe_lora_unmerge(&L, &m.S) == MOE_OK && memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "unmerge restores W0 exactly");
    CHECK(moe_lora_backward(&L, &m.S) == MOE_ERR_STATE, "no adapter gradients while unmerged: %s", L.err.msg);
    moe_lora_merge(&L, &m.S);
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    CHECK(moe_lora_fold(&L, &m.S, 11) == MOE_OK, "fold");
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "fold keeps the function");
    moe_lora_unmerge(&L, &m.S);
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "after fold the merged weights are the new W0");
    moe_lora_detach(&L, &m.S);
    free(p0);
    moe_model_free(&m);
}

/* the adapter gradients of the whole model by directional finite differences, one check per
   adapter tensor (as tests/test_model.c does for the model's tensors) */
static void gradcheck(const char *label, moe_model_config *c, int parts) {
    moe_model m;
    moe_lora L;
    moe_lora_config lc;
    moe_rng r;
    int ids[32], n, inputs[20], targets[20], id, skipped = 0;
    unsigned h0;
    float *a0;
    size_t i;
    setup(&m, c, inputs, targets, 20);
    for (i = 0; i < m.S.numel; i++) m.S.params[i] *= 2.0f;
    n = moe_model_select(&m, parts, ids, 32);
    lc.rank = 2; lc.alpha = 4.0f;
    CHECK(moe_lora_attach(&L, &m.S, ids, n, &lc, 2) == MOE_OK, "attach: %s", L.err.msg);
    moe_rng_seed(&r, 6);
    for (i = 0; i < L.S.numel; i++) L.S.params[i] = 0.3f * moe_rng_normal(&r); /* B != 0: both paths matter */
    moe_lora_merge(&L, &m.S);
    a0 = (float *)malloc(L.S.numel * sizeof(float));
    memcpy(a0, L.S.params, L.S.numel * sizeof(float));
    moe_store_zero_grad(&m.S);
    moe_store_zero_grad(&L.S);
    CHECK(moe_model_forward(&m, inputs, targets, 2, 10, NULL) == MOE_OK, "forward");
    h0 = routing_hash(&m);
    CHECK(moe_model_backward(&m, 1.0f) == MOE_OK, "backward");
    CHECK(moe_lora_backward(&L, &m.S) == MOE_OK, "adapter backward: %s", L.err.msg);
    for (id = 0; id < L.S.count; id++) {
        const moe_tensor *t = &L.S.tensors[id];
        float *p = L.S.params + t->offset, *v = (float *)malloc(t->numel * sizeof(float));
        double analytic = 0.0, jp, jm, eps = 1e-3;
        int same;
        char name[160];
        for (i = 0; i < t->numel; i++) {
            v[i] = 0.1f * moe_rng_normal(&r); /* small: the loss is far from linear in the adapters */
            analytic += (double)L.S.grads[t->offset + i] * v[i];
        }
        for (i = 0; i < t->numel; i++) p[i] = a0[t->offset + i] + (float)eps * v[i];
        moe_lora_merge(&L, &m.S);
        moe_model_forward(&m, inputs, targets, 2, 10, NULL);
        jp = m.loss + m.aux_loss;
        same = routing_hash(&m) == h0;
        for (i = 0; i < t->numel; i++) p[i] = a0[t->offset + i] - (float)eps * v[i];
        moe_lora_merge(&L, &m.S);
        moe_model_forward(&m, inputs, targets, 2, 10, NULL);
        jm = m.loss + m.aux_loss;
        same &= routing_hash(&m) == h0;
        memcpy(p, a0 + t->offset, t->numel * sizeof(float));
        free(v);
        if (!same) { skipped++; continue; }
        snprintf(name, sizeof name, "%s: %s", label, t->name);
        check_grad_tol(name, analytic, (jp - jm) / (2 * eps), 1e-2, 3e-4);
    }
    CHECK(skipped * 4 <= L.S.count, "%s: %d of %d adapter tensors flipped a routing decision", label, skipped, L.S.count);
    free(a0);
    moe_lora_detach(&L, &m.S);
    moe_model_free(&m);
}

static void test_gradients(void) {
    moe_model_config c;
    TEST_BEGIN("lora: adapter gradients by directional finite differences");
    c = tiny_config(0, MOE_POS_LEARNED);
    gradcheck("dense, every linear", &c, MOE_SEL_LINEAR);
    c = tiny_config(1, MOE_POS_ROPE);
    c.moe.n_shared = 1;
    gradcheck("MoE + shared expert, every linear", &c, MOE_SEL_LINEAR);
}

static void test_training_and_files(void) {
    moe_model m, m2, other;
    moe_model_config c = tiny_config(0, MOE_POS_LEARNED), c2;
    moe_lora L, L2, L3;
    moe_lora_config lc;
    moe_adamw_config ac = moe_adamw_config_default();
    moe_err err;
    int ids[16], n, inputs[16], targets[16], step;
    float *p0, *a_saved;
    double first = 0, last = 0;
    long long at = 0;
    char path[64];
    TEST_BEGIN("lora: adapter-only training, adapter files, another layout refused");
    snprintf(path, sizeof path, "build/test_lora_%ld.ckpt", (long)time(NULL) ^ (long)clock());
    setup(&m, &c, inputs, targets, 16);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    n = moe_model_select(&m, MOE_SEL_KEYS, ids, 16);
    lc.rank = 4; lc.alpha = 8.0f;
    CHECK(moe_lora_attach(&L, &m.S, ids, n, &lc, 1) == MOE_OK, "attach");
    for (step = 1; step <= 30; step++) {
        moe_store_zero_grad(&m.S);
        moe_store_zero_grad(&L.S);
        moe_model_forward(&m, inputs, targets, 2, 8, NULL);
        if (step == 1) first = m.loss;
        last = m.loss;
        moe_model_backward(&m, 1.0f);
        moe_lora_backward(&L, &m.S);
        CHECK(moe_lora_step(&L, &m.S, NULL, &ac, 1e-2f, step, 1.0f) == MOE_OK, "step: %s", L.err.msg);
    }
    CHECK(last < first - 0.05, "adapters learn the batch: loss %.3f -> %.3f", first, last);
    {
        int id, moved = 0, others_same = 1;
        for (id = 0; id < m.S.count; id++) {
            const moe_tensor *t = &m.S.tensors[id];
            int diff = memcmp(p0 + t->offset, m.S.params + t->offset, t->numel * sizeof(float)) != 0, sel = 0, j;
            for (j = 0; j < n; j++) sel |= ids[j] == id;
            if (sel) moved += diff;
            else others_same &= !diff;
        }
        CHECK(moved == n && others_same, "only the adapted matrices changed (%d of %d)", moved, n);
    }
    moe_lora_unmerge(&L, &m.S);
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "the base weights never moved");
    moe_lora_merge(&L, &m.S);
    CHECK(moe_lora_save(path, &L, 30, &err) == MOE_OK, "save: %s", err.msg);

    /* the same model built again: the file restores the adapters and the merged weights */
    setup(&m2, &c, inputs, targets, 16);
    CHECK(moe_lora_attach(&L2, &m2.S, ids, n, &lc, 99) == MOE_OK, "attach 2");
    CHECK(moe_lora_load(path, &L2, &m2.S, &at, &err) == MOE_OK && at == 30, "load: %s", err.msg);
    CHECK(memcmp(L.S.params, L2.S.params, L.S.numel * sizeof(float)) == 0 && memcmp(m.S.params, m2.S.params, m.S.numel * sizeof(float)) == 0,
          "adapters and merged weights restored");

    /* another layout: d_ff 20 instead of 24 */
    c2 = c;
    c2.d_ff = 20;
    setup(&other, &c2, inputs, targets, 16);
    CHECK(moe_lora_attach(&L3, &other.S, ids, n, &lc, 99) == MOE_OK, "attach 3");
    a_saved = (float *)malloc(L3.S.numel * sizeof(float));
    memcpy(a_saved, L3.S.params, L3.S.numel * sizeof(float));
    memcpy(p0, other.S.params, other.S.numel * sizeof(float));
    CHECK(moe_lora_load(path, &L3, &other.S, NULL, &err) == MOE_ERR_SHAPE && strstr(err.msg, "layout"), "another layout: %s", err.msg);
    CHECK(memcmp(a_saved, L3.S.params, L3.S.numel * sizeof(float)) == 0 && memcmp(p0, other.S.params, other.S.numel * sizeof(float)) == 0,
          "nothing loaded");
    moe_lora_detach(&L3, &other.S);
    remove(path);
    free(a_saved); free(p0);
    moe_lora_detach(&L, &m.S); moe_lora_detach(&L2, &m2.S);
    moe_model_free(&m); moe_model_free(&m2); moe_model_free(&other);
}

static void test_bad_input(void) {
    moe_model m;
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_lora L;
    moe_lora_config lc;
    int ids[4], inputs[16], targets[16];
    float *p0;
    TEST_BEGIN("lora: bad input gets a status and a sentence; nothing attached");
    setup(&m, &c, inputs, targets, 16);
    p0 = (float *)malloc(m.S.numel * sizeof(float));
    memcpy(p0, m.S.params, m.S.numel * sizeof(float));
    lc.rank = 13; lc.alpha = 1.0f; /* expert up is (4, 12, 16) */
    moe_model_select(&m, MOE_SEL_UP, ids, 4);
    CHECK(moe_lora_attach(&L, &m.S, ids, 1, &lc, 1) == MOE_ERR_INVALID_ARG && strstr(L.err.msg, "larger"), "rank 13 > 12: %s", L.err.msg);
    lc.rank = 0;
    CHECK(moe_lora_attach(&L, &m.S, ids, 1, &lc, 1) == MOE_ERR_INVALID_ARG, "rank 0: %s", L.err.msg);
    lc.rank = 2;
    ids[1] = 999;
    CHECK(moe_lora_attach(&L, &m.S, ids, 2, &lc, 1) == MOE_ERR_INVALID_ARG && strstr(L.err.msg, "999"), "no tensor 999: %s", L.err.msg);
    ids[1] = ids[0];
    CHECK(moe_lora_attach(&L, &m.S, ids, 2, &lc, 1) == MOE_ERR_INVALID_ARG, "twice: %s", L.err.msg);
    ids[1] = moe_store_find(&m.S, "lnf.w");
    CHECK(moe_lora_attach(&L, &m.S, ids, 2, &lc, 1) == MOE_ERR_SHAPE, "a norm's vector: %s", L.err.msg);
    lc.alpha = -1.0f;
    CHECK(moe_lora_attach(&L, &m.S, ids, 1, &lc, 1) == MOE_ERR_INVALID_ARG, "alpha < 0: %s", L.err.msg);
    CHECK(L.S.params == NULL && L.n == 0, "nothing attached");
    CHECK(memcmp(p0, m.S.params, m.S.numel * sizeof(float)) == 0, "model untouched");
    CHECK(moe_lora_merge(&L, &m.S) == MOE_ERR_STATE, "merge without adapters: %s", L.err.msg);
    free(p0);
    moe_model_free(&m);
}

int main(void) {
    test_select();
    test_merge();
    test_gradients();
    test_training_and_files();
    test_bad_input();
    return test_summary();
}
