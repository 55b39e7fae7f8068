/* test_model.c - moe.h sections >>moe:attention, >>moe:model, >>moe:data: gradients of the
   whole tiny transformer (dense and MoE, learned and rotary positions), 1-vs-2-thread
   bit-identity, gradient accumulation, a learning test, checkpoint resume bit-exactness,
   generation, the loader. PyTorch goldens of the same model: tests/test_golden.c. */
#include "moe.h" /* defines: moe_model_*, moe_loader_*, moe_checkpoint_*, moe_adamw_step */
#include "test.h"
#ifdef _OPENMP
#include <omp.h>
#endif

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
    c.moe.z_coef = 1e-2f;
    c.moe.router_init_std = 1.0f; /* clear top-k margins for finite differences */
    return c;
}

static void random_tokens(int *x, int n, int V, moe_rng *r) {
    int i;
    for (i = 0; i < n; i++) x[i] = moe_rng_below(r, V);
}

/* routing of every MoE block, to skip directions that flip a decision */
static unsigned routing_hash(const moe_model *m) {
    unsigned h = 17u;
    int l, i;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe)
            for (i = 0; i < m->blocks[l].moe.routed.n; i++)
                h = h * 31u + (unsigned)m->blocks[l].moe.routed.token[i] * 7u + (unsigned)m->blocks[l].moe.routed.expert[i];
    return h;
}

/* One directional check per tensor (direction scaled to the tensor's RMS), so a wrong
   gradient of any single tensor stands out instead of drowning in the sum. */
static void gradcheck_model(const char *name, const moe_model_config *c) {
    moe_model m;
    moe_rng r;
    int B = 2, T = 10, inputs[20], targets[20], id, skipped = 0;
    unsigned h0;
    float *p0;
    size_t i, n;
    if (moe_model_init(&m, c, B, T) != MOE_OK) {
        CHECK(0, "%s: init: %s", name, m.err.msg);
        return;
    }
    moe_model_init_weights(&m, 3);
    moe_rng_seed(&r, 8);
    n = m.S.numel;
    for (i = 0; i < n; i++) m.S.params[i] *= 2.0f; /* larger than the init: every path matters */
    for (id = 0; id < m.S.count; id++) /* the hyper-expert starts near zero by design: wake it up */
        if (strstr(m.S.tensors[id].name, "hyper.head"))
            for (i = 0; i < m.S.tensors[id].numel; i++) m.S.params[m.S.tensors[id].offset + i] = 0.3f * moe_rng_normal(&r);
    moe_rng_seed(&r, 8);
    random_tokens(inputs, B * T, c->vocab, &r);
    random_tokens(targets, B * T, c->vocab, &r);
    targets[3] = -1; /* ignored position */
    p0 = (float *)malloc(n * sizeof(float));
    memcpy(p0, m.S.params, n * sizeof(float));
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
        /* float forward passes: J ~ 4 carries ~3e-7 of rounding, i.e. ~3e-4 after / 2eps */
        check_grad_tol(label, analytic, (jp - jm) / (2 * eps), 1e-2, 3e-4);
    }
    CHECK(skipped * 4 <= m.S.count, "%s: %d of %d tensors flipped a routing decision", name, skipped, m.S.count);
    free(p0);
    moe_model_free(&m);
}

static void test_gradients(void) {
    moe_model_config c;
    TEST_BEGIN("model gradients by directional finite differences");
    c = tiny_config(0, MOE_POS_LEARNED);
    gradcheck_model("dense, learned positions", &c);
    c = tiny_config(1, MOE_POS_ROPE);
    gradcheck_model("MoE every layer, rotary positions", &c);
    c = tiny_config(1, MOE_POS_LEARNED);
    c.n_layers = 3;
    c.dense_first = 1;
    c.moe_every = 2;
    c.moe.n_shared = 1;
    c.moe.router = MOE_ROUTER_NOISY_TOPK; /* evaluated without noise here */
    gradcheck_model("dense first, MoE every 2nd, shared expert, noisy router", &c);
    c = tiny_config(1, MOE_POS_ROPE);
    c.moe.router = MOE_ROUTER_AOE;
    c.moe.aoe_rank = 4;
    gradcheck_model("AoE in every layer", &c);
    c = tiny_config(1, MOE_POS_LEARNED);
    c.n_layers = 3;
    c.moe.top_k = 1;
    c.moe.renormalize = 0;
    c.moe.hyper = 1;
    c.moe.hyper_embed = c.moe.hyper_hidden = c.moe.hyper_cond = c.moe.hyper_width = 6;
    c.moe.hyper_adapter = 4;
    c.moe.hyper_layer_dim = 3;
    gradcheck_model("HyperMoE, hypernetwork shared by 3 layers", &c);
    c.moe.hyper_head_bias = 1;
    c.moe.z_coef = 0.0f; /* with the biases the z-loss of the doubled router grows J to ~20:
                            its float rounding would exceed the tolerance at eps 1e-3 */
    gradcheck_model("HyperMoE with head biases, shared by 3 layers", &c);
    c = tiny_config(1, MOE_POS_LEARNED);
    c.n_layers = 3;
    c.moe.balance_coef = 0.5f; /* large enough to matter in the sum */
    c.balance_all_layers = 1;
    gradcheck_model("one balance loss over all MoE layers' tokens (RMoE's code)", &c);
}

static void test_recurrent_router(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model full, det;
    moe_rng r;
    int x[20], y[20], id, top, low;
    size_t i;
    TEST_BEGIN("RMoE: GRU router state through depth, its ablations, the MLP router");
    c.n_layers = 3;
    c.router_dim = 8;
    c.router_input = MOE_RIN_GRU;
    gradcheck_model("RMoE (GRU through depth)", &c);
    c.router_input = MOE_RIN_GRU_NP;
    gradcheck_model("RMoE-NP (no previous state)", &c);
    c.router_input = MOE_RIN_MLP;
    gradcheck_model("MLP router", &c);
    c.dense_first = 1; /* a dense layer between MoE layers passes the state on */
    c.moe_every = 1;
    c.n_layers = 4;
    c.router_input = MOE_RIN_GRU;
    c.dense_first = 0;
    c.moe_every = 2;
    gradcheck_model("RMoE with a dense layer between MoE layers", &c);
    /* detach: same forward; the top MoE layer's projector sees the same gradient, a lower
       one misses the path through the layers above */
    c = tiny_config(1, MOE_POS_LEARNED);
    c.n_layers = 3;
    c.router_dim = 8;
    c.router_input = MOE_RIN_GRU;
    moe_model_init(&full, &c, 2, 10);
    c.router_input = MOE_RIN_GRU_DETACH;
    moe_model_init(&det, &c, 2, 10);
    moe_model_init_weights(&full, 4);
    memcpy(det.S.params, full.S.params, sizeof(float) * full.S.numel);
    moe_rng_seed(&r, 2);
    random_tokens(x, 20, c.vocab, &r);
    random_tokens(y, 20, c.vocab, &r);
    moe_store_zero_grad(&full.S);
    moe_store_zero_grad(&det.S);
    moe_model_forward(&full, x, y, 2, 10, NULL);
    moe_model_backward(&full, 1.0f);
    moe_model_forward(&det, x, y, 2, 10, NULL);
    moe_model_backward(&det, 1.0f);
    CHECK(full.loss == det.loss && full.aux_loss == det.aux_loss, "detach leaves the forward unchanged");
    top = moe_store_find(&full.S, "l2.rmoe.proj");
    low = moe_store_find(&full.S, "l0.rmoe.proj");
    CHECK(top >= 0 && low >= 0, "projector tensors exist");
    CHECK(memcmp(moe_store_grad(&full.S, top), moe_store_grad(&det.S, top), sizeof(float) * full.S.tensors[top].numel) == 0,
          "top MoE layer: identical projector gradient");
    {
        double diff = 0.0;
        for (i = 0; i < full.S.tensors[low].numel; i++)
            diff += fabs(moe_store_grad(&full.S, low)[i] - moe_store_grad(&det.S, low)[i]);
        CHECK(diff > 1e-6, "lowest MoE layer: detach removes the gradient through depth (|diff| %.3g)", diff);
    }
    id = moe_store_find(&full.S, "rmoe.gru.w_hh");
    CHECK(id >= 0 && full.S.tensors[id].shape[0] == 24 && full.S.tensors[id].shape[1] == 8, "one shared GRU (3p, p)");
    moe_model_free(&full);
    moe_model_free(&det);
}

/* one training step; returns the loss */
static double train_step(moe_model *m, const int *x, const int *y, int B, int T, const moe_adamw_config *opt,
                         float lr, long long step, moe_rng *noise) {
    moe_store_zero_grad(&m->S);
    moe_model_forward(m, x, y, B, T, noise);
    moe_model_backward(m, 1.0f);
    moe_clip_grad_norm(&m->S, 1.0f);
    moe_adamw_step(&m->S, opt, lr, step);
    return m->loss;
}

static void test_determinism_and_accumulation(void) {
    moe_model_config c = tiny_config(1, MOE_POS_ROPE);
    moe_model a, b;
    moe_rng r;
    int x[4 * 12], y[4 * 12];
    size_t i;
    double worst = 0.0;
    TEST_BEGIN("model: 1 vs 2 threads bit-identical; 2 micro-batches = 1 batch");
    c.d = 32;
    c.max_seq = 12;
    moe_rng_seed(&r, 4);
    random_tokens(x, 48, c.vocab, &r);
    random_tokens(y, 48, c.vocab, &r);
#ifdef _OPENMP
    {
        int nt = omp_get_max_threads(), k;
        moe_model *ms[2];
        ms[0] = &a;
        ms[1] = &b;
        for (k = 0; k < 2; k++) {
            omp_set_num_threads(k + 1);
            moe_model_init(ms[k], &c, 4, 12);
            moe_model_init_weights(ms[k], 1);
            moe_store_zero_grad(&ms[k]->S);
            moe_model_forward(ms[k], x, y, 4, 12, NULL);
            moe_model_backward(ms[k], 1.0f);
        }
        omp_set_num_threads(nt);
        CHECK(a.loss == b.loss && memcmp(a.logits, b.logits, sizeof(float) * 48 * c.vocab) == 0, "logits and loss identical");
        CHECK(memcmp(a.S.grads, b.S.grads, sizeof(float) * a.S.numel) == 0, "gradients identical");
        moe_model_free(&a);
        moe_model_free(&b);
    }
#endif
    /* dense model: mean over 4 rows == average of two means over 2 rows */
    c = tiny_config(0, MOE_POS_LEARNED);
    moe_model_init(&a, &c, 4, 12);
    moe_model_init(&b, &c, 4, 12);
    moe_model_init_weights(&a, 2);
    memcpy(b.S.params, a.S.params, sizeof(float) * a.S.numel);
    moe_store_zero_grad(&a.S);
    moe_model_forward(&a, x, y, 4, 12, NULL);
    moe_model_backward(&a, 1.0f);
    moe_store_zero_grad(&b.S);
    moe_model_forward(&b, x, y, 2, 12, NULL);
    moe_model_backward(&b, 0.5f);
    moe_model_forward(&b, x + 24, y + 24, 2, 12, NULL);
    moe_model_backward(&b, 0.5f);
    for (i = 0; i < a.S.numel; i++) {
        double e = fabs(a.S.grads[i] - b.S.grads[i]) / (1e-4 + fabs(a.S.grads[i]));
        worst = e > worst ? e : worst;
    }
    CHECK(worst < 1e-3, "accumulated gradients match the full batch (worst rel %.2g)", worst);
    moe_model_free(&a);
    moe_model_free(&b);
}

/* x[t] = x[t - 4]: the model must learn to copy from 4 positions back */
static void make_copy_batch(int *x, int *y, int B, int T, int V, moe_rng *r) {
    int b, t, seq[32];
    for (b = 0; b < B; b++) {
        for (t = 0; t < 4; t++) seq[t] = moe_rng_below(r, V);
        for (t = 4; t <= T; t++) seq[t] = seq[t - 4];
        for (t = 0; t < T; t++) {
            x[b * T + t] = seq[t];
            y[b * T + t] = t >= 3 ? seq[t + 1] : -1; /* the first 4 are unpredictable */
        }
    }
}

static void test_learning(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_rng r;
    int x[32 * 12], y[32 * 12], step;
    double first = 0.0, last = 0.0;
    TEST_BEGIN("learning: an MoE transformer learns to copy from 4 tokens back");
    c.vocab = 16;
    c.d = 32;
    c.moe.router_init_std = 0.02f;
    c.moe.d_ff = 32;
    opt.weight_decay = 0.0f;
    opt.beta2 = 0.99f;
    moe_model_init(&m, &c, 32, 12);
    moe_model_init_weights(&m, 5);
    moe_rng_seed(&r, 6);
    for (step = 1; step <= 300; step++) {
        make_copy_batch(x, y, 32, 12, c.vocab, &r);
        last = train_step(&m, x, y, 32, 12, &opt, moe_lr_cosine(step - 1, 20, 300, 1e-2f, 1e-3f), step, NULL);
        if (step == 1) first = last;
    }
    /* chance is ln 16 = 2.77 nats */
    CHECK(first > 2.5 && last < 0.3, "loss %.3f -> %.3f (chance 2.77) in 300 steps", first, last);
    moe_model_free(&m);
}

typedef struct train_state {
    moe_loader_state loader;
    moe_rng noise;
} train_state;

static void test_resume(void) {
    moe_model_config c = tiny_config(1, MOE_POS_ROPE);
    moe_model a, b;
    moe_loader ld;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_rng noise;
    unsigned char text[600];
    const unsigned char *src[1];
    size_t len[1];
    int x[4 * 12], y[4 * 12], i, step;
    double losses_a[10], losses_b[10];
    train_state st;
    moe_err err;
    char path[256];
    long long saved_step;
    TEST_BEGIN("checkpoint resume: bit-identical to an uninterrupted run");
    c.moe.router = MOE_ROUTER_NOISY_TOPK; /* the routing noise RNG is part of the state */
    c.moe.top_k = 2;
    for (i = 0; i < 600; i++) text[i] = (unsigned char)("the quick brown fox jumps over the lazy dog "[i % 44] % 32);
    src[0] = text;
    len[0] = sizeof text;
    snprintf(path, sizeof path, "build/tmp_model_%ld.ckpt", (long)clock());
    moe_model_init(&a, &c, 4, 12);
    moe_model_init_weights(&a, 9);
    moe_loader_init(&ld, src, len, 1, 12, 77, &err);
    moe_rng_seed(&noise, 55);
    for (step = 1; step <= 20; step++) {
        if (step == 11) { /* save before step 11 */
            st.loader.rng = ld.rng;
            st.loader.batches = ld.batches;
            st.noise = noise;
            CHECK(moe_checkpoint_save(path, &a.S, 1, step - 1, &a.cfg, sizeof a.cfg, &st, sizeof st, &err) == MOE_OK, "save: %s", err.msg);
        }
        moe_loader_next(&ld, x, y, NULL, 4, 12);
        if (step > 10) losses_a[step - 11] = train_step(&a, x, y, 4, 12, &opt, 1e-2f, step, &noise);
        else train_step(&a, x, y, 4, 12, &opt, 1e-2f, step, &noise);
    }
    /* a fresh process would do exactly this */
    moe_model_init(&b, &c, 4, 12);
    CHECK(moe_checkpoint_load(path, &b.S, &saved_step, &b.cfg, NULL, sizeof b.cfg, &st, sizeof st, &err) == MOE_OK, "load: %s", err.msg);
    moe_loader_init(&ld, src, len, 1, 12, 0, &err);
    ld.rng = st.loader.rng;
    ld.batches = st.loader.batches;
    noise = st.noise;
    for (step = (int)saved_step + 1; step <= 20; step++) {
        moe_loader_next(&ld, x, y, NULL, 4, 12);
        losses_b[step - 11] = train_step(&b, x, y, 4, 12, &opt, 1e-2f, step, &noise);
    }
    CHECK(saved_step == 10, "saved step %lld", saved_step);
    CHECK(memcmp(losses_a, losses_b, sizeof losses_a) == 0, "losses of steps 11-20 bit-identical (%.9g vs %.9g)", losses_a[9], losses_b[9]);
    CHECK(memcmp(a.S.params, b.S.params, sizeof(float) * a.S.numel) == 0, "parameters bit-identical after step 20");
    {
        moe_model_config other = c;
        other.moe.top_k = 1; /* same layout, other config */
        CHECK(moe_checkpoint_load(path, &b.S, NULL, &other, NULL, sizeof other, NULL, 0, &err) == MOE_ERR_FORMAT, "other config rejected: %s", err.msg);
    }
    remove(path);
    moe_model_free(&a);
    moe_model_free(&b);
}

static void test_generate_and_loader(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_sampler s;
    moe_rng r1, r2;
    int prompt[3] = {1, 2, 3}, o1[23], o2[23], i, ok = 1, x[24], y[24], src[2];
    moe_loader ld;
    moe_err err;
    unsigned char a[50], b[100];
    const unsigned char *srcs[2];
    size_t lens[2], start = 0;
    TEST_BEGIN("generation (seeded, in range; expert choice refused) and the loader");
    moe_model_init(&m, &c, 2, 12);
    moe_model_init_weights(&m, 1);
    s.temperature = 0.8f;
    s.top_k = 5;
    s.top_p = 0.9f;
    moe_rng_seed(&r1, 3);
    moe_rng_seed(&r2, 3);
    CHECK(moe_model_generate(&m, prompt, 3, 20, o1, &s, &r1) == MOE_OK, "generate: %s", m.err.msg);
    moe_model_generate(&m, prompt, 3, 20, o2, &s, &r2);
    for (i = 0; i < 23; i++) ok &= o1[i] >= 0 && o1[i] < c.vocab;
    CHECK(ok && memcmp(o1, o2, sizeof o1) == 0 && o1[0] == 1 && o1[2] == 3, "same seed, same text; bytes in range");
    s.temperature = 0.0f;
    moe_model_generate(&m, prompt, 3, 20, o1, &s, &r1);
    moe_model_generate(&m, prompt, 3, 20, o2, &s, &r2);
    CHECK(memcmp(o1, o2, sizeof o1) == 0, "greedy decoding ignores the RNG");
    s.top_p = 1.5f;
    CHECK(moe_model_generate(&m, prompt, 3, 5, o1, &s, &r1) == MOE_ERR_INVALID_ARG, "bad top_p: %s", m.err.msg);
    moe_model_free(&m);
    c.moe.router = MOE_ROUTER_EXPERT_CHOICE;
    moe_model_init(&m, &c, 2, 12);
    s.top_p = 1.0f;
    CHECK(moe_model_generate(&m, prompt, 3, 5, o1, &s, &r1) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "causal"), "expert choice cannot generate: %s", m.err.msg);
    CHECK(moe_model_forward(&m, prompt, NULL, 1, 13, NULL) == MOE_ERR_SHAPE, "sequence longer than the buffers: %s", m.err.msg);
    o1[0] = 40;
    CHECK(moe_model_forward(&m, o1, NULL, 1, 1, NULL) == MOE_ERR_INVALID_ARG, "token outside the vocabulary: %s", m.err.msg);
    CHECK(moe_model_backward(&m, 1.0f) == MOE_ERR_STATE, "backward without targets: %s", m.err.msg);
    moe_model_free(&m);
    /* loader: windows inside their source, targets shifted by one, proportional sampling */
    for (i = 0; i < 50; i++) a[i] = (unsigned char)i;
    for (i = 0; i < 100; i++) b[i] = (unsigned char)(100 + i);
    srcs[0] = a; srcs[1] = b; lens[0] = 50; lens[1] = 100;
    CHECK(moe_loader_init(&ld, srcs, lens, 2, 12, 1, &err) == MOE_OK, "loader init");
    ok = 1;
    for (i = 0; i < 200; i++) {
        int t;
        moe_loader_next(&ld, x, y, src, 2, 12);
        for (t = 0; t < 24; t++) {
            int s0 = src[t / 12];
            ok &= y[t] == x[t] + 1 && (s0 == 0 ? x[t] < 50 : x[t] >= 100);
        }
    }
    CHECK(ok && ld.batches == 200, "windows are contiguous and come from the named source");
    CHECK(moe_loader_init(&ld, srcs, lens, 2, 60, 1, &err) == MOE_ERR_INVALID_ARG, "a source shorter than a window: %s", err.msg);
    CHECK(moe_loader_sequential(b, 100, &start, x, y, 2, 12) == 2 && start == 24 && x[12] == 112, "sequential windows");
}

/* the FFN hook: called once per block in order, before the FFN output joins the residual
   stream; a no-op hook leaves the forward bit-identical, zeroing one layer's FFN changes it
   exactly as a model whose FFN output is zero would */
typedef struct hook_log { int calls[8], n, zero_layer; } hook_log;

static void log_hook(moe_model *m, int layer, void *user) {
    hook_log *h = (hook_log *)user;
    size_t N = (size_t)8 * 12;
    if (h->n < 8) h->calls[h->n] = layer;
    h->n++;
    if (layer == h->zero_layer) memset(m->blocks[layer].ffn, 0, sizeof(float) * N * (size_t)m->cfg.d);
}

static void test_ffn_hook(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_rng r;
    int x[8 * 12], y[8 * 12], l, in_order = 1;
    float *ref;
    double clean;
    hook_log h;
    TEST_BEGIN("model: FFN hook (interventions) called per block in order; no-op leaves the forward unchanged");
    c.max_seq = 12;
    moe_rng_seed(&r, 11);
    random_tokens(x, 96, c.vocab, &r);
    random_tokens(y, 96, c.vocab, &r);
    if (!CHECK(moe_model_init(&m, &c, 8, 12) == MOE_OK, "init: %s", m.err.msg)) return;
    CHECK(m.ffn_hook == NULL, "no hook after init");
    moe_model_init_weights(&m, 5);
    moe_model_forward(&m, x, y, 8, 12, NULL);
    clean = m.loss;
    ref = (float *)malloc(sizeof(float) * 96 * (size_t)c.vocab);
    memcpy(ref, m.logits, sizeof(float) * 96 * (size_t)c.vocab);
    memset(&h, 0, sizeof h);
    h.zero_layer = -1;
    m.ffn_hook = log_hook;
    m.ffn_hook_user = &h;
    moe_model_forward(&m, x, y, 8, 12, NULL);
    for (l = 0; l < c.n_layers && l < 8; l++) in_order &= h.calls[l] == l;
    CHECK(h.n == c.n_layers && in_order, "%d calls for %d blocks, in order: %d", h.n, c.n_layers, in_order);
    CHECK(memcmp(ref, m.logits, sizeof(float) * 96 * (size_t)c.vocab) == 0, "no-op hook: logits bit-identical");
    h.n = 0;
    h.zero_layer = c.n_layers - 1;
    moe_model_forward(&m, x, y, 8, 12, NULL);
    CHECK(m.loss != clean, "zeroing the last block's FFN changes the loss (%g vs %g)", m.loss, clean);
    m.ffn_hook = NULL;
    moe_model_forward(&m, x, y, 8, 12, NULL);
    CHECK(m.loss == clean, "hook removed: the clean loss again");
    free(ref);
    moe_model_free(&m);
}

/* a diverged model (or a checkpoint of NaNs): the forward refuses with the layer's sentence */
static void test_non_finite_router(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_rng r;
    int x[20], y[20], k;
    TEST_BEGIN("model: a NaN router parameter is MOE_ERR_NUMERIC naming the layer and the token; no backward after it");
    for (k = 0; k < 2; k++) {
        int id;
        if (k == 1) { c.router_input = MOE_RIN_GRU; c.router_dim = 6; }
        if (moe_model_init(&m, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
        moe_model_init_weights(&m, 3);
        moe_rng_seed(&r, 8);
        random_tokens(x, 20, c.vocab, &r);
        random_tokens(y, 20, c.vocab, &r);
        id = moe_store_find(&m.S, k == 0 ? "l1.moe.router.w" : "rmoe.gru.w_hh");
        moe_store_param(&m.S, id)[0] = NAN;
        CHECK(moe_model_forward(&m, x, y, 2, 10, NULL) == MOE_ERR_NUMERIC && strstr(m.err.msg, k == 0 ? "layer 1" : "layer 0") &&
              strstr(m.err.msg, "token"), "%s: refused with a sentence: %s", k == 0 ? "router weight" : "RMoE GRU weight", m.err.msg);
        CHECK(moe_model_backward(&m, 1.0f) == MOE_ERR_STATE, "no backward after a refused forward: %s", m.err.msg);
        moe_model_free(&m);
    }
}

/* DeepSeek-V3's balancing rule on every MoE layer of a model */
static void test_selection_bias_model(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_rng r;
    int x[20], y[20], l, moved = 1;
    TEST_BEGIN("model: selection-only bias (DeepSeek-V3) moved by moe_model_update_selection_bias in every MoE layer");
    c.moe.router = MOE_ROUTER_SIGMOID;
    c.moe.selection_bias = 1;
    if (moe_model_init(&m, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
    moe_model_init_weights(&m, 3);
    moe_rng_seed(&r, 8);
    random_tokens(x, 20, c.vocab, &r);
    random_tokens(y, 20, c.vocab, &r);
    CHECK(moe_model_forward(&m, x, y, 2, 10, NULL) == MOE_OK, "forward: %s", m.err.msg);
    CHECK(moe_model_update_selection_bias(&m, 0.01f) == MOE_OK, "update: %s", m.err.msg);
    for (l = 0; l < c.n_layers; l++) {
        const float *b = moe_store_param(&m.S, m.blocks[l].moe.id_selection_bias);
        int e, any = 0;
        for (e = 0; e < c.moe.n_experts; e++) any |= b[e] != 0.0f;
        moved &= any;
    }
    CHECK(moved, "every layer's bias moved off zero");
    moe_model_free(&m);
    c.moe.selection_bias = 0;
    if (moe_model_init(&m, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
    moe_model_init_weights(&m, 3);
    CHECK(moe_model_forward(&m, x, y, 2, 10, NULL) == MOE_OK && moe_model_update_selection_bias(&m, 0.01f) == MOE_ERR_STATE &&
          strstr(m.err.msg, "layer 0"), "a model without the bias refuses: %s", m.err.msg);
    moe_model_free(&m);
}

/* balance_all_layers: aux_loss holds one balance loss over every MoE layer's tokens */
static void test_balance_all_layers(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m, m1;
    moe_rng r;
    int x[20], y[20], l, e, E = c.moe.n_experts;
    double f[8] = {0}, P[8] = {0}, own = 0.0, rest = 0.0, want = 0.0;
    TEST_BEGIN("model: balance_all_layers = one balance loss over all MoE layers' tokens (f and P averaged over the layers)");
    c.n_layers = 3;
    c.moe.balance_coef = 0.1f;
    c.balance_all_layers = 1;
    if (moe_model_init(&m, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
    moe_model_init_weights(&m, 5);
    moe_rng_seed(&r, 8);
    random_tokens(x, 20, c.vocab, &r);
    random_tokens(y, 20, c.vocab, &r);
    CHECK(moe_model_forward(&m, x, y, 2, 10, NULL) == MOE_OK, "forward: %s", m.err.msg);
    for (l = 0; l < 3; l++) {
        const moe_layer *L = &m.blocks[l].moe;
        for (e = 0; e < E; e++) { f[e] += L->aux.picks[e] / 20.0 / 3; P[e] += L->stats.mean_prob[e] / 3.0; }
        own += L->stats.aux_balance;
        rest += L->stats.aux_total - L->stats.aux_balance;
    }
    for (e = 0; e < E; e++) want += f[e] * P[e];
    want *= 0.1 * E; /* Mixtral form: coef * E * sum f P, f = picks over all 60 tokens */
    CHECK(fabs(m.aux_loss - (rest + want)) <= 1e-6 * (rest + want), "aux_loss = z-losses + one balance loss (%g vs %g)", m.aux_loss, rest + want);
    CHECK(fabs(want - own) > 1e-7, "it differs from the sum of the per-layer losses here (%g vs %g)", want, own);
    moe_model_free(&m);
    c.n_layers = 1; /* one MoE layer: the same as its own loss */
    if (moe_model_init(&m, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
    c.balance_all_layers = 0;
    if (moe_model_init(&m1, &c, 2, 10) != MOE_OK) { CHECK(0, "init: %s", m1.err.msg); moe_model_free(&m); return; }
    moe_model_init_weights(&m, 5);
    moe_model_init_weights(&m1, 5);
    moe_model_forward(&m, x, y, 2, 10, NULL);
    moe_model_forward(&m1, x, y, 2, 10, NULL);
    moe_store_zero_grad(&m.S);
    moe_store_zero_grad(&m1.S);
    moe_model_backward(&m, 1.0f);
    moe_model_backward(&m1, 1.0f);
    CHECK(fabs(m.aux_loss - m1.aux_loss) <= 1e-7 && memcmp(m.S.grads, m1.S.grads, sizeof(float) * m.S.numel) == 0,
          "one MoE layer: the same loss and bit-identical gradients as the per-layer form");
    moe_model_free(&m);
    moe_model_free(&m1);
}

/* An all-MoE model never runs the dense FFN, so its d_ff sizes nothing: a model file with a huge
   d_ff (found by fuzzing the loader) once made init allocate (B T d_ff) floats of dense scratch. */
static void test_unused_dense_width(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    size_t small;
    int x[8] = {1, 2, 3, 4, 5, 6, 7, 0};
    TEST_BEGIN("model: an all-MoE model's unused d_ff sizes no allocation");
    c.dense_first = 0;
    if (moe_model_init(&m, &c, 1, 8) != MOE_OK) { CHECK(0, "init: %s", m.err.msg); return; }
    small = m.S.numel;
    moe_model_free(&m);
    c.d_ff = 1 << 30; /* dense scratch would be 2 x 32 GiB */
    if (moe_model_init(&m, &c, 1, 8) != MOE_OK) { CHECK(0, "init with d_ff 2^30: %s", m.err.msg); return; }
    CHECK(m.S.numel == small, "the same parameters (%zu vs %zu)", m.S.numel, small);
    moe_model_init_weights(&m, 1);
    CHECK(moe_model_forward(&m, x, x, 1, 8, NULL) == MOE_OK && moe_model_backward(&m, 1.0f) == MOE_OK, "forward and backward run: %s", m.err.msg);
    moe_model_free(&m);
}

/* a GRU router input of width 2^30 + ... made the GRU's 3 * router_dim rows overflow int while
   declaring (the model fuzz target's fifth finding): the config is refused with a sentence */
static void test_huge_router_dim(void) {
    moe_model_config c = tiny_config(1, MOE_POS_LEARNED);
    moe_model m;
    moe_err err;
    TEST_BEGIN("model: a router_dim too wide for the declarations is refused");
    c.router_input = MOE_RIN_GRU;
    c.router_dim = 1090519031;
    err.msg[0] = 0;
    CHECK(moe_model_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "router_dim") != NULL, "validate: '%s'", err.msg);
    CHECK(moe_model_init(&m, &c, 1, 8) != MOE_OK && strstr(m.err.msg, "router_dim") != NULL, "init: '%s'", m.err.msg);
    moe_model_free(&m);
}

int main(void) {
    test_gradients();
    test_recurrent_router();
    test_determinism_and_accumulation();
    test_learning();
    test_resume();
    test_generate_and_loader();
    test_ffn_hook();
    test_non_finite_router();
    test_selection_bias_model();
    test_balance_all_layers();
    test_unused_dense_width();
    test_huge_router_dim();
    return test_summary();
}
