/* test_generate.c - moe.h >>moe:generate: the KV cache, incremental decoding and batched
   generation.
   (a) the logits of incremental decoding (token by token, two sequences interleaved, and a
       prompt in one call) equal moe_model_forward's to float tolerance: dense and MoE, learned
       and rotary positions, every causal router family and extension (softmax, sigmoid, noisy
       top-k without noise, AoE, GW-MoE broadcast, HyperMoE, the RMoE GRU and MLP router
       inputs, shared experts, dense-first layers); with a capacity, decoding equals the
       dropless forward;
   (b) batched generation gives each sequence what it generates alone, whatever the chunk the
       model's activations allow; greedy decoding picks what moe_model_generate picks;
   (c) bad input: a status and a sentence, nothing changed;
   (d) 1 and 2 threads give the same bits. */
#include "moe.h"
#include "test.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static moe_model_config tiny(int moe, moe_pos_kind pos) {
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
    c.moe.router_init_std = 1.0f; /* routers that matter */
    return c;
}

static void random_tokens(int *x, int n, int V, moe_rng *r) {
    int i;
    for (i = 0; i < n; i++) x[i] = moe_rng_below(r, V);
}

/* ---- (a) decoding = the full forward ---- */

#define B_SEQ 2
#define T_SEQ 12

/* the model of c, its full-forward logits of two random sequences, then the same tokens
   decoded three ways: (1) step t feeds token t of both sequences in one call; (2) sequence 0's
   first 7 tokens in one call, then the rest token by token with sequence 1's; (3) as (1) on the
   weights packed by moe_kv_cache_pack. */
static float g_scale; /* > 0: the first layer's residual branches scaled by it (masked growth) */

/* way (1): dec gets the logits of both sequences, token t of each in step t; 0 on a failure */
static int decode_step_by_step(const char *name, moe_model *m, moe_kv_cache *kc, const int *x, float *dec) {
    int t, V = m->cfg.vocab;
    for (t = 0; t < T_SEQ; t++) {
        int tok[2], seq[2] = {0, 1};
        tok[0] = x[t];
        tok[1] = x[T_SEQ + t];
        if (!CHECK(moe_model_decode(m, kc, tok, seq, 2) == MOE_OK, "%s: decode step %d: %s", name, t, m->err.msg)) return 0;
        memcpy(dec + (size_t)t * V, m->logits, sizeof(float) * V);
        memcpy(dec + (size_t)(T_SEQ + t) * V, m->logits + V, sizeof(float) * V);
    }
    return 1;
}

static void check_decode_matches_forward(const char *name, moe_model_config c, int broadcast, float capacity) {
    moe_model m;
    moe_kv_cache kc;
    moe_rng r;
    int x[B_SEQ * T_SEQ], t, i, V = c.vocab;
    float *full = (float *)malloc(sizeof(float) * B_SEQ * T_SEQ * V), *dec = (float *)malloc(sizeof(float) * B_SEQ * T_SEQ * V);
    char what[160];
    moe_rng_seed(&r, 11);
    random_tokens(x, B_SEQ * T_SEQ, V, &r);
    if (!CHECK(moe_model_init(&m, &c, B_SEQ, T_SEQ) == MOE_OK, "%s: init: %s", name, m.err.msg)) { free(full); free(dec); return; }
    moe_model_init_weights(&m, 3);
    moe_model_set_broadcast(&m, broadcast);
    if (g_scale > 0.0f) m.layer_scale[0] = g_scale;
    CHECK(moe_model_forward(&m, x, NULL, B_SEQ, T_SEQ, NULL) == MOE_OK, "%s: forward: %s", name, m.err.msg);
    memcpy(full, m.logits, sizeof(float) * B_SEQ * T_SEQ * V);
    if (capacity > 0.0f) /* the model decoded keeps its capacity; the reference above had none */
        for (i = 0; i < c.n_layers; i++) m.blocks[i].moe.cfg.capacity_factor = capacity;
    CHECK(moe_kv_cache_init(&kc, &m, B_SEQ, T_SEQ) == MOE_OK, "%s: cache: %s", name, kc.err.msg);
    decode_step_by_step(name, &m, &kc, x, dec);
    CHECK(kc.len[0] == T_SEQ && kc.len[1] == T_SEQ, "%s: the cache holds %d and %d positions", name, kc.len[0], kc.len[1]);
    sprintf(what, "%s: step by step", name);
    check_close(what, dec, full, B_SEQ * T_SEQ * V, 1e-4, 1e-3);
    moe_kv_cache_reset(&kc);
    { /* a prompt in one call, then both sequences one token at a time */
        int seq0[7] = {0, 0, 0, 0, 0, 0, 0};
        CHECK(moe_model_decode(&m, &kc, x, seq0, 7) == MOE_OK, "%s: prompt: %s", name, m.err.msg);
        for (i = 0; i < 7; i++) memcpy(dec + (size_t)i * V, m.logits + (size_t)i * V, sizeof(float) * V);
        for (t = 0; t < T_SEQ; t++) {
            int tok[2], seq[2], n = 0;
            if (t >= 7) { tok[n] = x[t]; seq[n++] = 0; }
            tok[n] = x[T_SEQ + t]; seq[n++] = 1;
            if (!CHECK(moe_model_decode(&m, &kc, tok, seq, n) == MOE_OK, "%s: decode: %s", name, m.err.msg)) break;
            if (t >= 7) memcpy(dec + (size_t)t * V, m.logits, sizeof(float) * V);
            memcpy(dec + (size_t)(T_SEQ + t) * V, m.logits + (size_t)(n - 1) * V, sizeof(float) * V);
        }
        sprintf(what, "%s: a prompt in one call", name);
        check_close(what, dec, full, B_SEQ * T_SEQ * V, 1e-4, 1e-3);
    }
    moe_kv_cache_reset(&kc);
    moe_kv_cache_pack(&kc); /* the products on the weights packed ahead, as generation runs them */
    decode_step_by_step(name, &m, &kc, x, dec);
    sprintf(what, "%s: step by step on packed weights", name);
    check_close(what, dec, full, B_SEQ * T_SEQ * V, 1e-4, 1e-3);
    moe_kv_cache_reset(&kc);
    CHECK(!kc.pack.live, "%s: a reset drops the packed weights", name);
    moe_kv_cache_free(&kc);
    moe_model_free(&m);
    free(full);
    free(dec);
}

static void test_decode_matches_forward(void) {
    moe_model_config c;
    TEST_BEGIN("incremental decoding = the full forward (dense, MoE, learned, RoPE, every causal router family)");
    check_decode_matches_forward("dense, learned", tiny(0, MOE_POS_LEARNED), 0, 0.0f);
    check_decode_matches_forward("dense, RoPE", tiny(0, MOE_POS_ROPE), 0, 0.0f);
    check_decode_matches_forward("softmax top-k, learned", tiny(1, MOE_POS_LEARNED), 0, 0.0f);
    check_decode_matches_forward("softmax top-k, RoPE", tiny(1, MOE_POS_ROPE), 0, 0.0f);
    c = tiny(1, MOE_POS_ROPE);
    c.moe.router = MOE_ROUTER_SIGMOID;
    check_decode_matches_forward("sigmoid top-k", c, 0, 0.0f);
    c = tiny(1, MOE_POS_LEARNED);
    c.moe.router = MOE_ROUTER_NOISY_TOPK;
    c.moe.n_shared = 1;
    c.n_layers = 3;
    c.dense_first = 1;
    check_decode_matches_forward("noisy top-k (no noise), shared expert, dense first", c, 0, 0.0f);
    c = tiny(1, MOE_POS_ROPE);
    c.moe.router = MOE_ROUTER_AOE;
    c.moe.aoe_rank = 4;
    check_decode_matches_forward("Autonomy-of-Experts", c, 0, 0.0f);
    c = tiny(1, MOE_POS_LEARNED);
    c.moe.gw_threshold = 0.5f;
    check_decode_matches_forward("GW-MoE, broadcast on", c, 1, 0.0f);
    c.moe.gw_released = 1;
    check_decode_matches_forward("GW-MoE, released code's bypass", c, 1, 0.0f);
    c = tiny(1, MOE_POS_LEARNED);
    c.moe.top_k = 1;
    c.moe.hyper = 1;
    c.moe.hyper_embed = c.moe.hyper_hidden = c.moe.hyper_cond = c.moe.hyper_width = 6;
    c.moe.hyper_adapter = 4;
    c.moe.hyper_layer_dim = 3;
    check_decode_matches_forward("HyperMoE", c, 0, 0.0f);
    c = tiny(1, MOE_POS_ROPE);
    c.router_input = MOE_RIN_GRU;
    c.router_dim = 8;
    check_decode_matches_forward("RMoE GRU router input", c, 0, 0.0f);
    c.router_input = MOE_RIN_MLP;
    check_decode_matches_forward("MLP router input", c, 0, 0.0f);
    check_decode_matches_forward("capacity 0.5: decoding is dropless", tiny(1, MOE_POS_LEARNED), 0, 0.5f);
    g_scale = 0.3f;
    check_decode_matches_forward("a residual scale of 0.3 (masked growth), dense", tiny(0, MOE_POS_ROPE), 0, 0.0f);
    check_decode_matches_forward("a residual scale of 0.3 (masked growth), MoE", tiny(1, MOE_POS_LEARNED), 0, 0.0f);
    g_scale = 0.0f;
}

/* ---- (b) batched generation = one by one ---- */

#define N_GEN 6
#define MAX_NEW 9

/* sequence i's request: own prompt (length 1 + i % 4), sampler, seed; sequence 4 stops at a
   token it is likely to emit (its greedy run's third) */
static void fill_requests(moe_gen_seq *q, int (*prompts)[6], int (*outs)[MAX_NEW], int stop4) {
    int i;
    for (i = 0; i < N_GEN; i++) {
        memset(&q[i], 0, sizeof q[i]);
        q[i].prompt = prompts[i];
        q[i].n_prompt = 1 + i % 4;
        q[i].max_new = MAX_NEW - (i == 5 ? 4 : 0);
        q[i].stop = i == 4 ? stop4 : -1;
        q[i].sampler.temperature = i % 3 == 0 ? 0.0f : 0.9f;
        q[i].sampler.top_k = i == 1 ? 5 : 0;
        q[i].sampler.top_p = i == 2 ? 0.8f : 1.0f;
        moe_rng_seed(&q[i].rng, 100 + (uint64_t)i);
        q[i].out = outs[i];
    }
}

static void test_batched_equals_single(void) {
    moe_model_config c = tiny(1, MOE_POS_ROPE);
    moe_model big, small;
    moe_kv_cache kb, ks;
    moe_gen_seq batch[N_GEN], one[N_GEN];
    int prompts[N_GEN][6], out_b[N_GEN][MAX_NEW], out_1[N_GEN][MAX_NEW], out_s[N_GEN][MAX_NEW], i, same = 1, ends = 0;
    moe_rng r;
    TEST_BEGIN("batched generation = each sequence alone (own prompt, length, sampler, stop token); any chunk");
    c.max_seq = 16;
    moe_rng_seed(&r, 5);
    for (i = 0; i < N_GEN; i++) random_tokens(prompts[i], 6, c.vocab, &r);
    CHECK(moe_model_init(&big, &c, 4, 16) == MOE_OK && moe_model_init(&small, &c, 1, 3) == MOE_OK, "init: %s", big.err.msg);
    moe_model_init_weights(&big, 9);
    moe_model_init_weights(&small, 9);
    CHECK(moe_kv_cache_init(&kb, &big, N_GEN, 16) == MOE_OK && moe_kv_cache_init(&ks, &small, N_GEN, 16) == MOE_OK, "cache: %s", kb.err.msg);
    CHECK(ks.chunk == 3, "the small model decodes 3 tokens a call, got %d", ks.chunk);
    fill_requests(one, prompts, out_1, -1);
    CHECK(moe_model_generate_batch(&big, &kb, &one[4], 1) == MOE_OK, "%s", big.err.msg);
    fill_requests(batch, prompts, out_b, out_1[4][2]);
    CHECK(moe_model_generate_batch(&big, &kb, batch, N_GEN) == MOE_OK, "batch: %s", big.err.msg);
    fill_requests(one, prompts, out_1, out_1[4][2]);
    for (i = 0; i < N_GEN; i++) CHECK(moe_model_generate_batch(&big, &kb, &one[i], 1) == MOE_OK, "alone %d: %s", i, big.err.msg);
    for (i = 0; i < N_GEN; i++) {
        same &= batch[i].n_out == one[i].n_out && batch[i].stopped == one[i].stopped &&
                memcmp(out_b[i], out_1[i], sizeof(int) * (size_t)batch[i].n_out) == 0 &&
                memcmp(&batch[i].rng, &one[i].rng, sizeof(moe_rng)) == 0;
        ends += batch[i].n_out == batch[i].max_new;
    }
    CHECK(same, "a sequence generated in the batch differs from the same sequence alone");
    CHECK(batch[4].stopped && batch[4].n_out <= 3 && out_b[4][batch[4].n_out - 1] == batch[4].stop,
          "sequence 4 stops at its stop token: stopped %d after %d tokens", batch[4].stopped, batch[4].n_out);
    CHECK(ends == N_GEN - 1 && batch[5].n_out == MAX_NEW - 4, "the others run to their max_new (%d did)", ends);
    fill_requests(one, prompts, out_s, out_1[4][2]);
    CHECK(moe_model_generate_batch(&small, &ks, one, N_GEN) == MOE_OK, "small: %s", small.err.msg);
    for (i = 0, same = 1; i < N_GEN; i++) same &= one[i].n_out == batch[i].n_out && memcmp(out_s[i], out_b[i], sizeof(int) * (size_t)one[i].n_out) == 0;
    CHECK(same, "a model whose activations take 3 tokens a call generates the same sequences");
    { /* greedy: the tokens moe_model_generate picks with the full forward each step */
        int full[6 + MAX_NEW];
        moe_rng unused;
        moe_sampler greedy = {0.0f, 0, 1.0f};
        moe_rng_seed(&unused, 1);
        CHECK(moe_model_generate(&big, prompts[3], 4, MAX_NEW, full, &greedy, &unused) == MOE_OK, "%s", big.err.msg);
        CHECK(batch[3].sampler.temperature == 0.0f && memcmp(full + 4, out_b[3], sizeof(int) * MAX_NEW) == 0,
              "greedy decoding picks moe_model_generate's tokens");
    }
    moe_kv_cache_free(&kb);
    moe_kv_cache_free(&ks);
    moe_model_free(&big);
    moe_model_free(&small);
}

/* ---- (c) bad input ---- */

static void test_bad_input(void) {
    moe_model_config c = tiny(1, MOE_POS_LEARNED);
    moe_model m, other;
    moe_kv_cache kc, bad;
    moe_gen_seq q;
    int prompt[3] = {1, 2, 3}, out[20], tok[4] = {1, 2, 3, 4}, seq[4] = {0, 0, 0, 0};
    TEST_BEGIN("bad input: a status and a sentence, the cache unchanged");
    moe_model_init(&m, &c, 1, 4);
    moe_model_init_weights(&m, 1);
    CHECK(moe_kv_cache_init(&bad, &m, 2, 13) == MOE_ERR_INVALID_ARG && strstr(bad.err.msg, "max_seq"), "learned positions end at max_seq: %s", bad.err.msg);
    moe_kv_cache_free(&bad);
    CHECK(moe_kv_cache_init(&bad, &m, 0, 4) == MOE_ERR_INVALID_ARG && strstr(bad.err.msg, "max_batch"), "empty cache: %s", bad.err.msg);
    CHECK(moe_kv_cache_init(&kc, &m, 2, 6) == MOE_OK, "%s", kc.err.msg);
    CHECK(moe_model_decode(&m, &kc, tok, seq, 5) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "max_B * max_T"), "more than a chunk: %s", m.err.msg);
    seq[1] = 2;
    CHECK(moe_model_decode(&m, &kc, tok, seq, 2) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "sequence 2"), "sequence outside: %s", m.err.msg);
    seq[1] = 0;
    tok[2] = 32;
    CHECK(moe_model_decode(&m, &kc, tok, seq, 3) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "outside [0, 32)"), "token outside: %s", m.err.msg);
    tok[2] = 3;
    CHECK(moe_model_decode(&m, &kc, tok, seq, 4) == MOE_OK && moe_model_decode(&m, &kc, tok, seq, 2) == MOE_OK, "%s", m.err.msg);
    CHECK(moe_model_decode(&m, &kc, tok, seq, 1) == MOE_ERR_SHAPE && strstr(m.err.msg, "6 positions") && kc.len[0] == 6 && kc.len[1] == 0,
          "past the cache: %s (lengths %d, %d)", m.err.msg, kc.len[0], kc.len[1]);
    memset(&q, 0, sizeof q);
    q.prompt = prompt; q.n_prompt = 3; q.max_new = 5; q.stop = -1; q.out = out;
    q.sampler.temperature = 0.0f; q.sampler.top_p = 1.0f;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 3) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "max_batch"), "too many sequences: %s", m.err.msg);
    q.max_new = 5;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 1) == MOE_ERR_SHAPE && strstr(m.err.msg, "beyond the cache"), "a generation beyond the cache: %s", m.err.msg);
    CHECK(kc.len[0] == 6, "a refused generation leaves the cache alone");
    q.max_new = 4;
    q.stop = 40;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 1) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "stop token"), "stop token: %s", m.err.msg);
    q.stop = -1;
    q.sampler.top_p = 0.0f;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 1) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "sequence 0: sampler"), "sampler: %s", m.err.msg);
    q.sampler.top_p = 1.0f;
    q.out = NULL;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 1) == MOE_ERR_INVALID_ARG && strstr(m.err.msg, "output buffer"), "no output: %s", m.err.msg);
    q.out = out;
    CHECK(moe_model_generate_batch(&m, &kc, &q, 1) == MOE_OK && q.n_out == 4, "a generation that fits (3 + 4 - 1 = 6 positions): %s", m.err.msg);
    c.d = 24;
    c.n_heads = 3;
    moe_model_init(&other, &c, 1, 4);
    CHECK(moe_model_decode(&other, &kc, tok, seq, 1) == MOE_ERR_INVALID_ARG && strstr(other.err.msg, "another model"), "cache of another model: %s", other.err.msg);
    moe_model_free(&other);
    c = tiny(1, MOE_POS_LEARNED);
    c.moe.router = MOE_ROUTER_EXPERT_CHOICE;
    moe_model_init(&other, &c, 1, 4);
    CHECK(moe_model_decode(&other, &kc, tok, seq, 1) == MOE_ERR_UNSUPPORTED && strstr(other.err.msg, "causal"), "expert choice: %s", other.err.msg);
    CHECK(moe_model_generate_batch(&other, &kc, &q, 1) == MOE_ERR_UNSUPPORTED && strstr(other.err.msg, "causal"), "expert choice: %s", other.err.msg);
    moe_model_free(&other);
    c = tiny(1, MOE_POS_LEARNED);
    c.moe.gw_threshold = 0.5f;
    c.moe.gw_slots = 2;
    moe_model_init(&other, &c, 1, 4);
    moe_model_set_broadcast(&other, 1);
    CHECK(moe_model_decode(&other, &kc, tok, seq, 1) == MOE_ERR_UNSUPPORTED && strstr(other.err.msg, "gw_slots"), "GW slots: %s", other.err.msg);
    moe_model_set_broadcast(&other, 0);
    moe_kv_cache_reset(&kc);
    CHECK(moe_model_decode(&other, &kc, tok, seq, 1) == MOE_OK, "GW slots with the broadcast off: %s", other.err.msg);
    moe_model_free(&other);
    { /* CQIL groups run in the full forward only */
        int first = 0, size = 2;
        c = tiny(1, MOE_POS_LEARNED);
        moe_model_init(&other, &c, 1, 4);
        CHECK(moe_model_set_groups(&other, &first, &size, 1, 0, 0) == MOE_OK, "groups: %s", other.err.msg);
        CHECK(moe_model_decode(&other, &kc, tok, seq, 1) == MOE_ERR_UNSUPPORTED && strstr(other.err.msg, "CQIL"), "CQIL groups: %s", other.err.msg);
        moe_model_free(&other);
    }
    moe_kv_cache_free(&kc);
    CHECK(moe_model_decode(&m, &kc, tok, seq, 1) == MOE_ERR_STATE, "a freed cache: %s", m.err.msg);
    moe_model_free(&m);
}

/* ---- (d) threads ---- */

static void test_threads(void) {
    moe_model_config c = tiny(1, MOE_POS_ROPE);
    moe_model m;
    moe_kv_cache kc;
    moe_gen_seq q[16];
    static int prompts[16][40], outs[2][16][24];
    float *logits[2];
    int k, i, n = 40 * 4;
    moe_rng r;
    TEST_BEGIN("1 and 2 threads: the same logits and the same generations");
    c.d = 64;
    c.n_heads = 4;
    c.max_seq = 64;
    c.moe.d_ff = 48;
    moe_rng_seed(&r, 8);
    for (i = 0; i < 16; i++) random_tokens(prompts[i], 40, c.vocab, &r);
    for (k = 0; k < 2; k++) {
        int seqs[160];
        set_threads(k + 1);
        moe_model_init(&m, &c, 4, 64);
        moe_model_init_weights(&m, 4);
        CHECK(moe_kv_cache_init(&kc, &m, 16, 64) == MOE_OK, "%s", kc.err.msg);
        for (i = 0; i < n; i++) seqs[i] = i / 40;
        CHECK(moe_model_decode(&m, &kc, &prompts[0][0], seqs, n) == MOE_OK, "prompts: %s", m.err.msg); /* the threaded attention */
        logits[k] = (float *)malloc(sizeof(float) * (size_t)n * c.vocab);
        memcpy(logits[k], m.logits, sizeof(float) * (size_t)n * c.vocab);
        for (i = 0; i < 16; i++) {
            memset(&q[i], 0, sizeof q[i]);
            q[i].prompt = prompts[i]; q[i].n_prompt = 40; q[i].max_new = 24; q[i].stop = -1; q[i].out = outs[k][i];
            q[i].sampler.temperature = 1.0f; q[i].sampler.top_p = 1.0f;
            moe_rng_seed(&q[i].rng, (uint64_t)i);
        }
        CHECK(moe_model_generate_batch(&m, &kc, q, 16) == MOE_OK, "generate: %s", m.err.msg);
        moe_kv_cache_free(&kc);
        moe_model_free(&m);
    }
    set_threads(2);
    CHECK(memcmp(logits[0], logits[1], sizeof(float) * (size_t)n * c.vocab) == 0, "decode logits differ between 1 and 2 threads");
    CHECK(memcmp(outs[0], outs[1], sizeof outs[0]) == 0, "generations differ between 1 and 2 threads");
    free(logits[0]);
    free(logits[1]);
}

int main(void) {
    test_decode_matches_forward();
    test_batched_equals_single();
    test_bad_input();
    test_threads();
    return test_summary();
}
