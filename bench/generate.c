/* bench/generate.c - generation throughput of the tiny byte-level MoE transformer on the KV
   cache (moe_kv_cache, moe_model_generate_batch), and the time of one new token against the
   context length.

     demo   d=128 L=4 heads=4, MoE in every layer: 8 SwiGLU experts of width 256, top-2
            (examples/train_lm's default model), learned positions, max_seq 256
     d256   d=256 L=4 heads=4, 8 experts of width 512, top-2 (bench/train_lm's moe)

   Generation: prompts of 16 random bytes, 240 new tokens each (256 positions), temperature 1,
   no stop token; the time includes the prompts. Lines (median of REPS runs after one warm-up):
     bench=generate config=C batch=1|16 threads=P prompt=16 new=240 median_ms= tokens_per_s=
     bench=generate config=C batch=1 path=full_forward ... tokens_per_s=   (moe_model_generate:
         the whole forward over the context for every token, as before the cache; 64 new tokens)
     bench=generate_ctx config=C context=L ms_per_token= full_forward_ms=
         one new token at batch 1 with L tokens in the cache (median of 21; moe_model_decode
         on the weights packed by moe_kv_cache_pack, as generation runs it), beside one
         forward over L + 1 tokens (what moe_model_generate pays for that token)
   bench/torch_generate.py is the PyTorch peer. Optional argument: one config name. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "flags.h" /* defines: flags_program_make, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REPS 5
#define PROMPT 16
#define NEW 240
#define MAXB 16

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *t, int n) {
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    return t[n / 2];
}

static int bench_config(const char *name, int d, int ffe, int batch1) {
    moe_model_config c = moe_model_config_default();
    moe_model m;
    moe_kv_cache kc;
    moe_gen_seq q[MAXB];
    static int prompts[MAXB][PROMPT], outs[MAXB][NEW];
    int threads = moe_num_threads(), b, r, i, batches[2] = {1, 16}, ctxs[5] = {16, 64, 128, 192, 255};
    double t[21];
    moe_rng rng;
    c.vocab = 256;
    c.max_seq = 256;
    c.d = d;
    c.n_layers = 4;
    c.n_heads = 4;
    c.d_ff = 4 * d;
    c.moe_every = 1;
    c.moe.n_experts = 8;
    c.moe.top_k = 2;
    c.moe.d_ff = ffe;
    /* activations for the prompts of a full batch in one decode call, and for the forward of
       the comparison at batch 1 over 256 tokens */
    if (moe_model_init(&m, &c, 1, 256) != MOE_OK || moe_kv_cache_init(&kc, &m, MAXB, 256) != MOE_OK) {
        printf("bench=generate config=%s error=\"%s%s\"\n", name, m.err.msg, kc.err.msg);
        return 1;
    }
    moe_model_init_weights(&m, 1234);
    moe_rng_seed(&rng, 42);
    for (b = 0; b < MAXB; b++)
        for (i = 0; i < PROMPT; i++) prompts[b][i] = (int)(moe_rng_u32(&rng) & 255);
    for (b = 0; b < (batch1 ? 1 : 2); b++) {
        int B = batches[b];
        for (r = -1; r < REPS; r++) {
            double t0;
            for (i = 0; i < B; i++) {
                memset(&q[i], 0, sizeof q[i]);
                q[i].prompt = prompts[i]; q[i].n_prompt = PROMPT; q[i].max_new = NEW; q[i].stop = -1; q[i].out = outs[i];
                q[i].sampler.temperature = 1.0f; q[i].sampler.top_p = 1.0f;
                moe_rng_seed(&q[i].rng, (uint64_t)(r + 10) * 100 + (uint64_t)i);
            }
            t0 = moe_time_seconds();
            if (moe_model_generate_batch(&m, &kc, q, B) != MOE_OK) {
                printf("bench=generate config=%s error=\"%s\"\n", name, m.err.msg);
                return 1;
            }
            if (r >= 0) t[r] = moe_time_seconds() - t0;
        }
        {
            double ms = median(t, REPS) * 1e3;
            printf("bench=generate config=%s batch=%d threads=%d prompt=%d new=%d median_ms=%.2f tokens_per_s=%.0f\n", name, B,
                   threads, PROMPT, NEW, ms, B * NEW / ms * 1e3);
            fflush(stdout);
        }
    }
    if (!batch1) { /* the path before the cache: moe_model_generate, 64 new tokens */
        int out[PROMPT + 64];
        moe_sampler s = {1.0f, 0, 1.0f};
        double ms;
        for (r = 0; r < 3; r++) {
            double t0 = moe_time_seconds();
            moe_model_generate(&m, prompts[0], PROMPT, 64, out, &s, &rng);
            t[r] = moe_time_seconds() - t0;
        }
        ms = median(t, 3) * 1e3;
        printf("bench=generate config=%s batch=1 path=full_forward threads=%d prompt=%d new=64 median_ms=%.2f tokens_per_s=%.0f\n", name,
               threads, PROMPT, ms, 64 / ms * 1e3);
    }
    for (i = 0; i < 5; i++) { /* one token at context L; the cache is set back to L each time */
        int L = ctxs[i], seq0[256], tok = 65, k;
        double ms, full;
        static int ctx_tokens[256];
        for (k = 0; k < 256; k++) { seq0[k] = 0; ctx_tokens[k] = (int)(moe_rng_u32(&rng) & 255); }
        moe_kv_cache_reset(&kc);
        if (moe_model_decode(&m, &kc, ctx_tokens, seq0, L) != MOE_OK) {
            printf("bench=generate config=%s error=\"%s\"\n", name, m.err.msg);
            return 1;
        }
        moe_kv_cache_pack(&kc); /* the products as generation runs them */
        for (r = 0; r < 21; r++) {
            double t0;
            kc.len[0] = L;
            t0 = moe_time_seconds();
            moe_model_decode(&m, &kc, &tok, seq0, 1);
            t[r] = moe_time_seconds() - t0;
        }
        ms = median(t, 21) * 1e3;
        for (r = 0; r < (batch1 ? 0 : 5); r++) {
            double t0 = moe_time_seconds();
            moe_model_forward(&m, ctx_tokens, NULL, 1, L + 1, NULL);
            t[r] = moe_time_seconds() - t0;
        }
        full = batch1 ? 0.0 : median(t, 5) * 1e3;
        printf("bench=generate_ctx config=%s context=%d threads=%d ms_per_token=%.4f full_forward_ms=%.3f\n", name, L, threads, ms, full);
        fflush(stdout);
    }
    moe_kv_cache_free(&kc);
    moe_model_free(&m);
    return 0;
}

int main(int argc, char **argv) {
    int rc = 0, batch1 = 0;
    const char *only = NULL;
    flag fl[1];
    flags_program p;
    fl[0] = flag_switch("--batch1", &batch1, "batch 1 only, no full forward (full_forward_ms=0): the quick A/B of decoding");
    p = flags_program_make("generate", "generation throughput of the tiny byte-level MoE transformer on the KV cache (bench)",
                                         "No input (random weights and prompts). Lines: bench=generate config=C batch=B threads= prompt= new=\n"
                                         "median_ms= tokens_per_s=; bench=generate_ctx config=C context=L ms_per_token= full_forward_ms=.\n"
                                         "CONFIG: demo (d 128) or d256 (default: both).",
                                         fl, 1);
    flags_positional(&p, &only, 1, "[CONFIG]");
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    rc = 0;
    if (only && strcmp(only, "demo") != 0 && strcmp(only, "d256") != 0) {
        fprintf(stderr, "generate: unknown config '%s' (demo, d256)\n", only);
        return 2;
    }
    if (!only || strcmp(only, "demo") == 0) rc |= bench_config("demo", 128, 256, batch1);
    if (!only || strcmp(only, "d256") == 0) rc |= bench_config("d256", 256, 512, batch1);
    return rc;
}
