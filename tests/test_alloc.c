/* test_alloc.c - memory planned at init (moe.h >>moe:core's moe_work and the kernels' work
   queries; the layer, the model and the reward head size their buffers at init):
   (a) a counting allocator sees no call during training steps (forward, backward, clipping,
       AdamW) and generation once the model is built;
   (b) an allocator that fails at the n-th call, for every n an init makes, gets a status and
       a sentence back, no leak (the count of live blocks returns to zero; the ASan build also
       checks) and an object that its free function takes;
   and the kernels' own side: a planned workspace gives the bits a call without one gives,
   a workspace planned for fewer threads caps the call's threads, one too small is refused,
   and a call without one reports a failed allocation as MOE_ERR_NOMEM. */
#include <stdlib.h>

static long long alloc_calls;   /* MOE_MALLOC calls so far                        */
static long long alloc_fail_at; /* the call number that returns NULL, 0 = none    */
static long long alloc_live;    /* blocks allocated and not yet freed             */

static void *counting_malloc(size_t n) {
    void *p;
    if (++alloc_calls == alloc_fail_at) return NULL;
    p = malloc(n);
    if (p) alloc_live++;
    return p;
}

static void counting_free(void *p) {
    if (!p) return;
    alloc_live--;
    free(p);
}

#define MOE_MALLOC(n) counting_malloc(n)
#define MOE_FREE(p) counting_free(p)
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* includes moe.h */
#include "test.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Allocations the MoE layer's own code makes per call: none, every router family included
   (the layer plans its buffers at init). Kept as named counts so that a layer which ever
   needs one again says so here. */
#define LAYER_ALLOCS_FWD 0
#define LAYER_ALLOCS_BWD 0

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static moe_model_config tiny(int moe, moe_router_kind router, moe_router_input rin) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 16;
    c.d = 16;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 24;
    c.moe_every = moe ? 1 : 0;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 12;
    c.moe.router = router;
    c.router_input = rin;
    c.router_dim = rin != MOE_RIN_DIRECT ? 8 : 0;
    return c;
}

static void random_tokens(int *x, int n, int V, moe_rng *r) {
    int i;
    for (i = 0; i < n; i++) x[i] = moe_rng_below(r, V);
}

/* ---- (a) no allocation after init ---- */

static void test_training_allocates_nothing(void) {
    struct {
        const char *name;
        int moe;
        moe_router_kind router;
        moe_router_input rin;
        int extra; /* 1: capacity 1.0 (drops tokens), 2: HyperMoE */
    } cases[] = {{"dense", 0, MOE_ROUTER_TOPK, MOE_RIN_DIRECT, 0},
                 {"MoE, softmax top-k", 1, MOE_ROUTER_TOPK, MOE_RIN_DIRECT, 0},
                 {"MoE, noisy top-k with noise", 1, MOE_ROUTER_NOISY_TOPK, MOE_RIN_DIRECT, 0},
                 {"MoE, RMoE GRU router input", 1, MOE_ROUTER_TOPK, MOE_RIN_GRU, 0},
                 {"MoE, expert choice", 1, MOE_ROUTER_EXPERT_CHOICE, MOE_RIN_DIRECT, 0},
                 {"MoE, top-k with capacity", 1, MOE_ROUTER_TOPK, MOE_RIN_DIRECT, 1},
                 {"MoE, HyperMoE", 1, MOE_ROUTER_TOPK, MOE_RIN_DIRECT, 2}};
    int ci;
    TEST_BEGIN("training steps (forward, backward, clipping, AdamW) allocate nothing after init");
    for (ci = 0; ci < (int)(sizeof cases / sizeof cases[0]); ci++) {
        moe_model_config c = tiny(cases[ci].moe, cases[ci].router, cases[ci].rin);
        moe_adamw_config opt = moe_adamw_config_default();
        moe_model m;
        moe_rng r, noise;
        int x[3 * 16], y[3 * 16], step, nmoe = cases[ci].moe ? c.n_layers : 0;
        long long before, per_step_layer = (long long)nmoe * (LAYER_ALLOCS_FWD + LAYER_ALLOCS_BWD);
        if (cases[ci].extra == 1) c.moe.capacity_factor = 1.0f;
        if (cases[ci].extra == 2) c.moe.hyper = 1;
        moe_rng_seed(&r, 3);
        moe_rng_seed(&noise, 4);
        random_tokens(x, 48, c.vocab, &r);
        random_tokens(y, 48, c.vocab, &r);
        if (!CHECK(moe_model_init(&m, &c, 3, 16) == MOE_OK, "%s: init: %s", cases[ci].name, m.err.msg)) continue;
        moe_model_init_weights(&m, 1);
        for (step = 1; step <= 3; step++) {
            int B = step == 2 ? 2 : 3, T = step == 3 ? 9 : 16; /* smaller batches fit the plan too */
            moe_status st;
            before = alloc_calls;
            moe_store_zero_grad(&m.S);
            st = moe_model_forward(&m, x, y, B, T, cases[ci].router == MOE_ROUTER_NOISY_TOPK ? &noise : NULL);
            if (st == MOE_OK) st = moe_model_backward(&m, 1.0f);
            moe_clip_grad_norm(&m.S, 0.5f);
            if (st == MOE_OK) st = moe_adamw_step(&m.S, &opt, 1e-3f, step);
            CHECK(st == MOE_OK, "%s: step %d: %s", cases[ci].name, step, m.err.msg);
            CHECK(alloc_calls - before == per_step_layer, "%s: step %d (B %d, T %d) made %lld allocator calls, expected %lld (the MoE layers' own)",
                  cases[ci].name, step, B, T, alloc_calls - before, per_step_layer);
        }
        CHECK(isfinite(m.loss) && m.loss > 0.0, "%s: loss %g", cases[ci].name, m.loss);
        moe_model_free(&m);
        CHECK(alloc_live == 0, "%s: %lld blocks still allocated after free", cases[ci].name, alloc_live);
    }
}

static void test_generation_allocates_nothing(void) {
    moe_sampler greedy = {0.0f, 0, 1.0f}, sampled = {0.8f, 5, 0.9f};
    int moe;
    TEST_BEGIN("generation (greedy, top-k/top-p sampling; with the KV cache, batched) and LM features allocate nothing after init");
    for (moe = 0; moe < 2; moe++) {
        moe_model_config c = tiny(moe, MOE_ROUTER_TOPK, MOE_RIN_DIRECT);
        moe_model m;
        moe_rng r;
        int prompt[3] = {1, 2, 3}, out[3 + 20], k;
        long long before, layer = moe ? (long long)c.n_layers * LAYER_ALLOCS_FWD * 20 : 0;
        c.vocab = 256; /* bytes, for rwd_lm_features */
        if (!CHECK(moe_model_init(&m, &c, 1, 8) == MOE_OK, "init: %s", m.err.msg)) continue;
        moe_model_init_weights(&m, 2);
        moe_rng_seed(&r, 5);
        for (k = 0; k < 2; k++) {
            before = alloc_calls;
            CHECK(moe_model_generate(&m, prompt, 3, 20, out, k ? &sampled : &greedy, &r) == MOE_OK, "generate: %s", m.err.msg);
            CHECK(alloc_calls - before == layer, "%s, %s: %lld allocator calls for 20 tokens, expected %lld (the MoE layers' own)",
                  moe ? "MoE" : "dense", k ? "sampled" : "greedy", alloc_calls - before, layer);
        }
        { /* the KV cache's path: incremental decoding and batched generation */
            moe_kv_cache kc;
            moe_gen_seq q[3];
            int outs[3][12], seqs[3] = {0, 1, 2}, i;
            long long live = alloc_live;
            CHECK(moe_kv_cache_init(&kc, &m, 3, 8) == MOE_OK, "cache: %s", kc.err.msg);
            memset(q, 0, sizeof q);
            for (i = 0; i < 3; i++) {
                q[i].prompt = prompt; q[i].n_prompt = 1 + i; q[i].max_new = 6; q[i].stop = -1; q[i].out = outs[i];
                q[i].sampler = i ? sampled : greedy;
                moe_rng_seed(&q[i].rng, (uint64_t)i);
            }
            before = alloc_calls;
            CHECK(moe_model_decode(&m, &kc, prompt, seqs, 3) == MOE_OK, "decode: %s", m.err.msg);
            CHECK(moe_model_generate_batch(&m, &kc, q, 3) == MOE_OK, "generate_batch: %s", m.err.msg);
            CHECK(alloc_calls == before, "%s: decoding and batched generation made %lld allocator calls", moe ? "MoE" : "dense", alloc_calls - before);
            moe_kv_cache_free(&kc);
            CHECK(alloc_live == live, "the cache's free leaves %lld blocks", alloc_live - live);
            for (i = 1; i < 100; i++) { /* the cache's init failing at each of its allocations */
                moe_status st;
                alloc_fail_at = alloc_calls + i;
                st = moe_kv_cache_init(&kc, &m, 3, 8);
                alloc_fail_at = 0;
                moe_kv_cache_free(&kc);
                if (st == MOE_OK) break;
                CHECK(st == MOE_ERR_NOMEM && strstr(kc.err.msg, "out of memory"), "cache init, allocation %d fails: %s", i, kc.err.msg);
                CHECK(alloc_live == live, "cache init, allocation %d fails: %lld blocks left", i, alloc_live - live);
            }
            CHECK(i > 5 && i < 100, "the cache's init made %d allocations", i - 1);
        }
        if (!moe) { /* reward.h's features of a language model run its forward the same way */
            float feat[16];
            moe_err err;
            before = alloc_calls;
            CHECK(rwd_lm_features(feat, &m, "Q: why? ", "because", &err) == MOE_OK, "rwd_lm_features: %s", err.msg);
            CHECK(alloc_calls == before, "rwd_lm_features: %lld allocator calls", alloc_calls - before);
        }
        moe_model_free(&m);
    }
    CHECK(alloc_live == 0, "%lld blocks still allocated after free", alloc_live);
}

/* a model planned for one thread runs on two: the calls cap their threads at the plan (an
   overrun of the per-thread regions is what the ASan build would catch) and the bits match
   a model planned and run on two */
static void test_thread_cap(void) {
#ifdef _OPENMP
    moe_model_config c = tiny(1, MOE_ROUTER_TOPK, MOE_RIN_DIRECT);
    moe_model a, b;
    moe_rng r;
    int x[4 * 16], y[4 * 16], nt = omp_get_max_threads();
    TEST_BEGIN("a model planned for 1 thread, run with 2: same bits as one planned for 2");
    c.d = 64; /* big enough products to take the threaded paths */
    c.n_heads = 4;
    c.d_ff = 128;
    c.moe.d_ff = 96;
    moe_rng_seed(&r, 6);
    random_tokens(x, 64, c.vocab, &r);
    random_tokens(y, 64, c.vocab, &r);
    set_threads(1);
    moe_model_init(&a, &c, 4, 16);
    set_threads(2);
    moe_model_init(&b, &c, 4, 16);
    CHECK(a.work.nthreads == 1 && b.work.nthreads == 2 && a.blocks[0].moe.work.nthreads == 1,
          "planned threads: %d and %d", a.work.nthreads, b.work.nthreads);
    CHECK(a.blocks[0].moe.work.buf == a.work.buf && a.blocks[1].moe.work.buf == a.work.buf, "the MoE layers run on the model's one work buffer");
    moe_model_init_weights(&a, 7);
    moe_model_init_weights(&b, 7);
    moe_store_zero_grad(&a.S);
    moe_store_zero_grad(&b.S);
    CHECK(moe_model_forward(&a, x, y, 4, 16, NULL) == MOE_OK && moe_model_backward(&a, 1.0f) == MOE_OK, "%s", a.err.msg);
    CHECK(moe_model_forward(&b, x, y, 4, 16, NULL) == MOE_OK && moe_model_backward(&b, 1.0f) == MOE_OK, "%s", b.err.msg);
    CHECK(a.loss == b.loss && memcmp(a.S.grads, b.S.grads, sizeof(float) * a.S.numel) == 0, "loss or gradients differ");
    moe_model_free(&a);
    moe_model_free(&b);
    set_threads(nt);
#else
    TEST_BEGIN("thread cap: built without OpenMP (skipped)");
#endif
}

/* ---- (b) every failing allocation of an init is a status, no leak, a freeable object ---- */

/* every n from 1 to the calls a successful init makes; prep (may be NULL) sets the object up
   without failures, init returns the status and leaves its sentence in msg, release frees
   everything */
typedef void (*prep_fn)(void *obj);
typedef moe_status (*init_fn)(void *obj, char *msg, size_t cap);
typedef void (*free_fn)(void *obj);

static void fail_every_allocation(const char *what, prep_fn prep, init_fn init, free_fn release, void *obj) {
    long long calls, n, bad_status = 0, no_msg = 0, leaks = 0;
    char msg[256];
    alloc_fail_at = 0;
    if (prep) prep(obj);
    calls = alloc_calls;
    CHECK(init(obj, msg, sizeof msg) == MOE_OK, "%s: init without failures: %s", what, msg);
    calls = alloc_calls - calls;
    release(obj);
    CHECK(calls > 0 && alloc_live == 0, "%s: %lld allocations, %lld left after free", what, calls, alloc_live);
    for (n = 1; n <= calls; n++) {
        moe_status st;
        msg[0] = '\0';
        if (prep) prep(obj);
        alloc_fail_at = alloc_calls + n;
        st = init(obj, msg, sizeof msg);
        alloc_fail_at = 0;
        if (st == MOE_OK) bad_status++;
        if (strlen(msg) < 10) no_msg++;
        if (n == calls / 2) printf("   %s, allocation %lld of %lld fails: \"%s\"\n", what, n, calls, msg);
        release(obj);
        release(obj); /* twice: free leaves an object free takes again */
        if (alloc_live != 0) leaks++;
        alloc_live = 0;
    }
    CHECK(bad_status == 0, "%s: %lld of %lld failed allocations returned MOE_OK", what, bad_status, calls);
    CHECK(no_msg == 0, "%s: %lld failures left no sentence", what, no_msg);
    CHECK(leaks == 0, "%s: %lld failures leaked blocks", what, leaks);
}

typedef struct store_case {
    moe_store S;
} store_case;

static void store_prep(void *obj) { /* the table, outside the call under test */
    store_case *s = (store_case *)obj;
    moe_store_init(&s->S);
    moe_store_add(&s->S, "a", MOE_TENSOR_DECAY, 3, 4, 0, 0);
    moe_store_add(&s->S, "b", 0, 5, 0, 0, 0);
}
static moe_status store_init(void *obj, char *msg, size_t cap) {
    store_case *s = (store_case *)obj;
    moe_status st = moe_store_alloc(&s->S, 1);
    snprintf(msg, cap, "%s", s->S.err.msg);
    return st;
}
static void store_release(void *obj) { moe_store_free(&((store_case *)obj)->S); }

typedef struct layer_case {
    moe_layer_config c;
    moe_store S;
    moe_layer L;
} layer_case;

static moe_status layer_init(void *obj, char *msg, size_t cap) {
    layer_case *l = (layer_case *)obj;
    moe_status st;
    moe_store_init(&l->S);
    st = moe_layer_init(&l->L, &l->c, &l->S, "moe.", 24);
    if (st == MOE_OK && (st = moe_store_alloc(&l->S, 1)) != MOE_OK) moe_err_set(&l->L.err, st, "%s", l->S.err.msg);
    snprintf(msg, cap, "%s", l->L.err.msg);
    return st;
}
static void layer_release(void *obj) {
    layer_case *l = (layer_case *)obj;
    moe_layer_free(&l->L);
    moe_store_free(&l->S);
}

typedef struct model_case {
    moe_model_config c;
    moe_model m;
} model_case;

static moe_status model_init(void *obj, char *msg, size_t cap) {
    model_case *mc = (model_case *)obj;
    moe_status st = moe_model_init(&mc->m, &mc->c, 2, 12);
    snprintf(msg, cap, "%s", mc->m.err.msg);
    return st;
}
static void model_release(void *obj) { moe_model_free(&((model_case *)obj)->m); }

typedef struct head_case {
    rwd_head_config c;
    moe_store S;
    rwd_head h;
} head_case;

static moe_status head_init(void *obj, char *msg, size_t cap) {
    head_case *hc = (head_case *)obj;
    moe_err err;
    moe_status st;
    memset(&err, 0, sizeof err);
    moe_store_init(&hc->S);
    st = rwd_head_init(&hc->h, &hc->c, &hc->S, "rm.", &err);
    if (st == MOE_OK && (st = moe_store_alloc(&hc->S, 1)) != MOE_OK) moe_err_set(&err, st, "%s", hc->S.err.msg);
    snprintf(msg, cap, "%s", err.msg);
    return st;
}
static void head_release(void *obj) {
    head_case *hc = (head_case *)obj;
    rwd_head_free(&hc->h);
    moe_store_free(&hc->S);
}

static void test_init_failures(void) {
    store_case sc;
    layer_case lc;
    model_case mc;
    head_case hc;
    char name[96];
    int k;
    TEST_BEGIN("every failing allocation of an init: a status with a sentence, no leak, a freeable object");
    memset(&sc, 0, sizeof sc);
    fail_every_allocation("moe_store_alloc", store_prep, store_init, store_release, &sc);
    for (k = 0; k < 4; k++) {
        memset(&lc, 0, sizeof lc);
        lc.c = moe_layer_config_default();
        lc.c.d = 16; lc.c.d_ff = 12; lc.c.n_experts = 4; lc.c.top_k = 2;
        if (k == 1) { lc.c.router = MOE_ROUTER_NOISY_TOPK; lc.c.n_shared = 1; }
        if (k == 2) { lc.c.hyper = 1; }
        if (k == 3) { lc.c.router = MOE_ROUTER_AOE; lc.c.aoe_rank = 4; }
        snprintf(name, sizeof name, "moe_layer_init (%s)", k == 0 ? "top-k" : k == 1 ? "noisy, shared" : k == 2 ? "HyperMoE" : "AoE");
        fail_every_allocation(name, NULL, layer_init, layer_release, &lc);
    }
    for (k = 0; k < 4; k++) {
        memset(&mc, 0, sizeof mc);
        mc.c = tiny(k > 0, k == 2 ? MOE_ROUTER_NOISY_TOPK : MOE_ROUTER_TOPK, k == 3 ? MOE_RIN_GRU : MOE_RIN_DIRECT);
        mc.c.dense_first = k == 3; /* a dense block before the MoE one */
        snprintf(name, sizeof name, "moe_model_init (%s)", k == 0 ? "dense" : k == 1 ? "MoE" : k == 2 ? "noisy MoE" : "RMoE, dense first");
        fail_every_allocation(name, NULL, model_init, model_release, &mc);
    }
    for (k = 0; k < 2; k++) {
        memset(&hc, 0, sizeof hc);
        hc.c = rwd_head_config_default();
        hc.c.kind = k ? RWD_HEAD_MLP : RWD_HEAD_LINEAR;
        hc.c.d_in = 10;
        hc.c.d_hidden = 6;
        hc.c.max_rows = 16;
        fail_every_allocation(k ? "rwd_head_init (MLP)" : "rwd_head_init (linear)", NULL, head_init, head_release, &hc);
    }
}

/* ---- the kernels' workspaces ---- */

static float *frand(size_t n, moe_rng *r) {
    float *p = (float *)malloc((n ? n : 1) * sizeof(float));
    size_t i;
    for (i = 0; i < n; i++) p[i] = moe_rng_normal(r);
    return p;
}

static float *fzero(size_t n) { return (float *)calloc(n ? n : 1, sizeof(float)); }

static int same(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void test_matmul_and_attention_workspaces(void) {
    int M = 300, K = 70, N = 90, B = 2, T = 40, d = 32, NH = 4, nt = max_threads();
    moe_rng r;
    moe_work w, w1, small;
    float *x, *wt, *dy, *y0, *y1, *dx0, *dx1, *dw0, *dw1, *qkv, *att0, *att1, *o0, *o1, *dq0, *dq1;
    TEST_BEGIN("matmul and attention: a planned workspace gives the bits of a call without one; too small is refused");
    moe_rng_seed(&r, 8);
    x = frand((size_t)M * K, &r); wt = frand((size_t)N * K, &r); dy = frand((size_t)M * N, &r);
    y0 = fzero((size_t)M * N); y1 = fzero((size_t)M * N);
    dx0 = fzero((size_t)M * K); dx1 = fzero((size_t)M * K); dw0 = fzero((size_t)N * K); dw1 = fzero((size_t)N * K);
    CHECK(moe_work_alloc(&w, moe_matmul_work_floats(M, K, N, nt), nt) == MOE_OK, "workspace");
    CHECK(moe_work_alloc(&w1, moe_matmul_work_floats(M, K, N, 1), 1) == MOE_OK, "workspace for one thread");
    CHECK(moe_matmul_forward(y0, x, wt, NULL, M, K, N, NULL) == MOE_OK, "forward without a workspace");
    CHECK(moe_matmul_backward(dx0, dw0, NULL, dy, x, wt, M, K, N, NULL) == MOE_OK, "backward without a workspace");
    CHECK(moe_matmul_forward(y1, x, wt, NULL, M, K, N, &w) == MOE_OK, "forward with one");
    CHECK(moe_matmul_backward(dx1, dw1, NULL, dy, x, wt, M, K, N, &w) == MOE_OK, "backward with one");
    CHECK(same(y0, y1, (size_t)M * N) && same(dx0, dx1, (size_t)M * K) && same(dw0, dw1, (size_t)N * K), "bits differ with a workspace");
    memset(y1, 0, sizeof(float) * (size_t)M * N);
    memset(dx1, 0, sizeof(float) * (size_t)M * K);
    memset(dw1, 0, sizeof(float) * (size_t)N * K);
    set_threads(2);
    CHECK(moe_matmul_forward(y1, x, wt, NULL, M, K, N, &w1) == MOE_OK, "forward, 1-thread workspace, 2 threads");
    CHECK(moe_matmul_backward(dx1, dw1, NULL, dy, x, wt, M, K, N, &w1) == MOE_OK, "backward, 1-thread workspace, 2 threads");
    set_threads(nt);
    CHECK(same(y0, y1, (size_t)M * N) && same(dx0, dx1, (size_t)M * K) && same(dw0, dw1, (size_t)N * K), "bits differ with a 1-thread plan");
    /* too small: refused, output untouched */
    small = w1;
    small.floats = moe_matmul_work_floats(M, K, N, 1) / 2;
    memset(y1, 0, sizeof(float) * (size_t)M * N);
    CHECK(moe_matmul_forward(y1, x, wt, NULL, M, K, N, &small) == MOE_ERR_INVALID_ARG, "a workspace too small is refused");
    CHECK(y1[0] == 0.0f && y1[(size_t)M * N - 1] == 0.0f, "output untouched after a refusal");
    /* without a workspace, a failed allocation is MOE_ERR_NOMEM (no assert, no fallback) */
    alloc_fail_at = alloc_calls + 1;
    CHECK(moe_matmul_forward(y1, x, wt, NULL, M, K, N, NULL) == MOE_ERR_NOMEM, "forward: MOE_ERR_NOMEM");
    alloc_fail_at = alloc_calls + 1;
    CHECK(moe_matmul_backward(dx1, dw1, NULL, dy, x, wt, M, K, N, NULL) == MOE_ERR_NOMEM, "backward: MOE_ERR_NOMEM");
    alloc_fail_at = alloc_calls + 1;
    CHECK(moe_gemm(M, N, K, x, K, 0, dy, N, y1, N, 0, NULL) == MOE_ERR_NOMEM, "moe_gemm: MOE_ERR_NOMEM");
    alloc_fail_at = 0;
    moe_work_free(&w);
    moe_work_free(&w1);
    /* attention: planned for T, run on T and on a shorter T */
    qkv = frand((size_t)B * T * 3 * d, &r);
    att0 = fzero((size_t)B * NH * T * T); att1 = fzero((size_t)B * NH * T * T);
    o0 = frand((size_t)B * T * d, &r); o1 = fzero((size_t)B * T * d);
    dq0 = fzero((size_t)B * T * 3 * d); dq1 = fzero((size_t)B * T * 3 * d);
    CHECK(moe_work_alloc(&w, moe_attention_work_floats(T, d, NH, nt), nt) == MOE_OK, "attention workspace");
    CHECK(moe_attention_forward(o0, att0, qkv, B, T, d, NH, NULL) == MOE_OK, "attention forward without a workspace");
    CHECK(moe_attention_backward(dq0, o0, qkv, att0, B, T, d, NH, NULL) == MOE_OK, "attention backward without one");
    CHECK(moe_attention_forward(o1, att1, qkv, B, T, d, NH, &w) == MOE_OK, "attention forward with one");
    CHECK(moe_attention_backward(dq1, o0, qkv, att1, B, T, d, NH, &w) == MOE_OK, "attention backward with one");
    CHECK(same(o0, o1, (size_t)B * T * d) && same(dq0, dq1, (size_t)B * T * 3 * d), "attention bits differ with a workspace");
    CHECK(moe_attention_forward(o1, att1, qkv, B, T / 2, d, NH, &w) == MOE_OK, "a shorter sequence fits the plan");
    CHECK(moe_attention_forward(o1, att1, qkv, 1, T + 8, d, NH, &w) == MOE_ERR_INVALID_ARG, "a longer one is refused");
    alloc_fail_at = alloc_calls + 1;
    CHECK(moe_attention_backward(dq1, o0, qkv, att1, B, T, d, NH, NULL) == MOE_ERR_NOMEM, "attention: MOE_ERR_NOMEM");
    alloc_fail_at = 0;
    moe_work_free(&w);
    free(x); free(wt); free(dy); free(y0); free(y1); free(dx0); free(dx1); free(dw0); free(dw1);
    free(qkv); free(att0); free(att1); free(o0); free(o1); free(dq0); free(dq1);
}

/* experts: the query covers any split of the rows with at most max_rows per expert, the
   worst case (every row to one expert) included; SwiGLU with and without its own gate, FFN */
static void test_experts_workspace(void) {
    enum { E = 5, d = 24, D = 40, ROWS = 200 };
    int splits[3][E] = {{40, 40, 40, 40, 40}, {0, ROWS, 0, 0, 0}, {7, 0, 120, 60, 13}};
    int nt = max_threads(), kind, s, e;
    moe_rng r;
    TEST_BEGIN("experts: the work query covers every split (all rows to one expert too); the bits match a call without one");
    moe_rng_seed(&r, 9);
    for (kind = 0; kind < 3; kind++) { /* SwiGLU, SwiGLU with the gate as an input (AoE), FFN */
        moe_expert_kind ek = kind == 2 ? MOE_EXPERT_FFN : MOE_EXPERT_SWIGLU;
        size_t wsz = (size_t)E * D * d, need = moe_experts_work_floats(ROWS, E, d, D, ek, nt);
        float *wbuf = frand(3 * wsz, &r), *xg = frand((size_t)ROWS * d, &r), *dy = frand((size_t)ROWS * d, &r);
        moe_expert_weights w, gw0, gw1;
        moe_work ws;
        w.gate = kind == 0 ? wbuf : NULL;
        w.up = wbuf + wsz;
        w.down = wbuf + 2 * wsz;
        w.b_up = w.b_down = NULL;
        gw0 = w; gw1 = w;
        CHECK(moe_work_alloc(&ws, need, nt) == MOE_OK, "experts workspace");
        for (s = 0; s < 3; s++) {
            int offset[E + 1];
            float *out[2], *hg[2], *hu[2], *dx[2], *g[2], *s1 = fzero((size_t)ROWS * D), *s2 = fzero((size_t)ROWS * D);
            int t;
            offset[0] = 0;
            for (e = 0; e < E; e++) offset[e + 1] = offset[e] + splits[s][e];
            for (t = 0; t < 2; t++) {
                out[t] = fzero((size_t)ROWS * d); dx[t] = fzero((size_t)ROWS * d); g[t] = fzero(3 * wsz);
                hg[t] = fzero((size_t)ROWS * D); hu[t] = fzero((size_t)ROWS * D);
                if (kind == 1) memcpy(hg[t], xg, sizeof(float) * (size_t)ROWS * (d < D ? d : D)); /* the gate input */
            }
            gw0.gate = kind == 0 ? g[0] : NULL; gw0.up = g[0] + wsz; gw0.down = g[0] + 2 * wsz;
            gw1.gate = kind == 0 ? g[1] : NULL; gw1.up = g[1] + wsz; gw1.down = g[1] + 2 * wsz;
            CHECK(moe_experts_forward(out[0], hg[0], hu[0], xg, &w, offset, E, d, D, ek, MOE_ACT_GELU, NULL) == MOE_OK &&
                  moe_experts_backward(dx[0], &gw0, dy, xg, hg[0], hu[0], &w, offset, E, d, D, ek, MOE_ACT_GELU, s1, s2, NULL) == MOE_OK,
                  "kind %d split %d without a workspace", kind, s);
            CHECK(moe_experts_forward(out[1], hg[1], hu[1], xg, &w, offset, E, d, D, ek, MOE_ACT_GELU, &ws) == MOE_OK &&
                  moe_experts_backward(dx[1], &gw1, dy, xg, hg[1], hu[1], &w, offset, E, d, D, ek, MOE_ACT_GELU, s1, s2, &ws) == MOE_OK,
                  "kind %d split %d with the planned workspace", kind, s);
            CHECK(same(out[0], out[1], (size_t)ROWS * d) && same(dx[0], dx[1], (size_t)ROWS * d) && same(g[0], g[1], 3 * wsz),
                  "kind %d split %d: bits differ with a workspace", kind, s);
            for (t = 0; t < 2; t++) { free(out[t]); free(dx[t]); free(g[t]); free(hg[t]); free(hu[t]); }
            free(s1); free(s2);
        }
        { /* twice the planned rows in every expert: refused, not overrun */
            size_t n2 = (size_t)2 * ROWS * E;
            int offset[E + 1];
            float *hg = fzero(n2 * D), *hu = fzero(n2 * D), *x2 = fzero(n2 * d), *s1 = fzero(n2 * D), *s2 = fzero(n2 * D), *o = fzero(n2 * d);
            for (e = 0; e <= E; e++) offset[e] = 2 * ROWS * e;
            gw0.gate = kind == 0 ? wbuf : NULL; /* never written: the call is refused first */
            CHECK(moe_experts_backward(o, &gw0, x2, x2, hg, hu, &w, offset, E, d, D, ek, MOE_ACT_GELU, s1, s2, &ws) == MOE_ERR_INVALID_ARG,
                  "kind %d: twice the planned rows per expert is refused", kind);
            alloc_fail_at = alloc_calls + 1;
            CHECK(moe_experts_forward(o, hg, hu, x2, &w, offset, E, d, D, ek, MOE_ACT_GELU, NULL) == MOE_ERR_NOMEM,
                  "kind %d: MOE_ERR_NOMEM without a workspace", kind);
            alloc_fail_at = 0;
            free(hg); free(hu); free(x2); free(s1); free(s2); free(o);
        }
        moe_work_free(&ws);
        free(wbuf); free(xg); free(dy);
    }
}

/* the GRU and the reward head run on planned scratch: no call after init */
static void test_gru_and_head(void) {
    enum { N = 33, p = 8, D = 6, B = 8 };
    moe_rng r;
    moe_work w;
    float *a[6], *h, *gi, *gh, *dh, *g[6], *scratch;
    rwd_head_config hc = rwd_head_config_default();
    rwd_head hd;
    moe_store S;
    moe_err err;
    float X[2 * B * D], rr[2 * B], dr[2 * B], dX[2 * B * D];
    long long before;
    int i, kind;
    TEST_BEGIN("GRU with a planned workspace, reward heads after init: no allocator call");
    moe_rng_seed(&r, 10);
    a[0] = frand((size_t)N * p, &r); a[1] = frand((size_t)N * p, &r);
    for (i = 2; i < 6; i++) a[i] = frand((size_t)3 * p * (i < 4 ? p : 1), &r);
    h = fzero((size_t)N * p); gi = fzero((size_t)N * 3 * p); gh = fzero((size_t)N * 3 * p); dh = frand((size_t)N * p, &r);
    for (i = 0; i < 6; i++) g[i] = fzero((size_t)3 * p * p + (size_t)N * p);
    scratch = fzero((size_t)N * 6 * p);
    CHECK(moe_work_alloc(&w, moe_gru_work_floats(N, p, max_threads()), max_threads()) == MOE_OK, "GRU workspace");
    before = alloc_calls;
    CHECK(moe_gru_forward(h, gi, gh, a[0], a[1], a[2], a[3], a[4], a[5], N, p, &w) == MOE_OK, "GRU forward");
    CHECK(moe_gru_backward(g[0], g[1], g[2], g[3], g[4], g[5], dh, a[0], a[1], gi, gh, a[2], a[3], N, p, scratch, &w) == MOE_OK,
          "GRU backward");
    CHECK(alloc_calls == before, "GRU: %lld allocator calls with a workspace", alloc_calls - before);
    moe_work_free(&w);
    for (i = 0; i < 6; i++) { free(a[i]); free(g[i]); }
    free(h); free(gi); free(gh); free(dh); free(scratch);
    for (i = 0; i < 2 * B * D; i++) X[i] = moe_rng_normal(&r);
    for (i = 0; i < 2 * B; i++) dr[i] = moe_rng_normal(&r);
    for (kind = 0; kind < 2; kind++) {
        hc.kind = kind ? RWD_HEAD_MLP : RWD_HEAD_LINEAR;
        hc.d_in = D; hc.d_hidden = 5; hc.max_rows = 2 * B;
        moe_store_init(&S);
        CHECK(rwd_head_init(&hd, &hc, &S, "rm.", &err) == MOE_OK, "head init: %s", err.msg);
        moe_store_alloc(&S, 1);
        moe_rng_seed(&r, 11);
        rwd_head_init_weights(&hd, &S, &r);
        before = alloc_calls;
        memset(dX, 0, sizeof dX);
        rwd_head_forward(&hd, &S, rr, X, 2 * B);
        rwd_head_backward(&hd, &S, dX, dr, X, 2 * B);
        CHECK(alloc_calls == before, "head kind %d: %lld allocator calls in forward and backward", kind, alloc_calls - before);
        CHECK(isfinite(rr[0]) && isfinite(dX[0]), "head kind %d: finite outputs", kind);
        rwd_head_free(&hd);
        moe_store_free(&S);
    }
    CHECK(alloc_live == 0, "%lld blocks still allocated", alloc_live);
}

int main(void) {
    test_training_allocates_nothing();
    test_generation_allocates_nothing();
    test_thread_cap();
    test_init_failures();
    test_matmul_and_attention_workspaces();
    test_experts_workspace();
    test_gru_and_head();
    return test_summary();
}
