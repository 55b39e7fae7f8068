/* ============================================================================================
   >>moe:generate  a KV cache, incremental decoding and batched generation for the model
   ============================================================================================
   moe_model_generate (>>moe:model) runs the whole forward over the context for every new
   token. Here each new token runs through the model once: its keys and values join a cache,
   its query attends over the cached ones (the KV cache of every decoder-only LM; HF
   transformers' past_key_values). Everything but attention acts on one token at a time, so a
   step costs the model's per-token work plus attention over the context, linear in its length.
     moe_kv_cache       keys and values of up to max_batch sequences of up to max_len
                        positions, planned at init with every buffer decoding needs
     moe_model_decode   appends tokens to cached sequences (any mix of sequences and of
                        prompt and generated tokens) and leaves their logits in m->logits
     moe_model_generate_batch  many sequences at once (own prompt, length, sampler and RNG,
                        stop byte); n candidates for one prompt cost one batched pass per token
   Decoding agrees with moe_model_forward on the same tokens to float rounding (attention sums
   in another order) and gives every token the same bits whatever else shares its batch and
   whatever the thread count, so a batch generates what its sequences generate one by one.
   Conditions: a causal router (expert choice ranks a token against later ones: refused);
   capacity (capacity_factor) is not applied while decoding, every choice is kept (with it a
   token's experts would depend on the other sequences of the batch); GW-MoE's broadcast runs
   as the model's set_broadcast says, but not with gw_slots (a count per sequence); routing
   noise is off; ffn_hook is not called; decoding leaves no batch for backward. */

typedef struct moe_kv_cache {
    int n_layers, d, n_heads; /* of the model it was built for                               */
    moe_pos_kind pos;
    int max_batch;            /* sequences ("slots") it holds                                */
    int max_len;              /* positions per sequence (learned positions: <= max_seq)       */
    int chunk;                /* most tokens one moe_model_decode call takes: the model's
                                 max_B * max_T activation rows                                */
    int nthreads;             /* threads the attention scratch is planned for                */
    int *len;                 /* (max_batch) positions each sequence holds                   */
    float *k, *v;             /* (n_layers, max_batch, n_heads, d / n_heads, max_len) keys
                                 (rotated under RoPE), stored transposed: a key dimension's
                                 row over the positions; (n_layers, max_batch, n_heads,
                                 max_len, d / n_heads) values: a head's rows contiguous       */
    void *kv_raw;             /* the one allocation under k and v (huge pages)               */
    float *rope;              /* (max_len, hd/2, 2) rotary cos, sin; NULL for learned         */
    float *scores;            /* (nthreads, max_len) one attention row per thread             */
    int *tok_seq, *tok_pos;   /* (chunk) the decode call's tokens: sequence and position      */
    int *gen_tok, *gen_seq;   /* (chunk) generation: the tokens of the next decode call       */
    int *gen_fed, *gen_row;   /* (max_batch) generation: tokens fed per sequence, and the row
                                 of its last token in the current call (-1 = none)           */
    moe_wpack pack;           /* the matrices decoding multiplies, in the GEMM's panels: a
                                 copy of the weights (about the model's size) made by
                                 moe_kv_cache_pack and each moe_model_generate_batch          */
    moe_err err;              /* why init failed                                            */
} moe_kv_cache;

/* One sequence of moe_model_generate_batch: inputs, then what the call sets. */
typedef struct moe_gen_seq {
    const int *prompt;   /* (n_prompt) tokens in [0, vocab), n_prompt >= 1                    */
    int n_prompt;
    int max_new;         /* at most this many new tokens (>= 0)                               */
    int stop;            /* generation ends after this token is emitted; -1 = none            */
    moe_sampler sampler; /* temperature, top-k, top-p of this sequence                        */
    moe_rng rng;         /* its sampler's state (seed with moe_rng_seed); the call advances it */
    int *out;            /* (max_new) the new tokens, prompt not included                     */
    int n_out;           /* set: tokens written to out                                         */
    int stopped;         /* set: 1 when the stop token ended the sequence                      */
} moe_gen_seq;

/* A cache for m (its config and activation plan; m must stay alive and keep its shape) of
   max_batch sequences of up to max_len positions, with every buffer decoding and generation
   use, for the thread count of this moment (moe_num_threads; later calls use at most that
   many). Learned positions need max_len <= max_seq. On failure c->err says why and
   moe_kv_cache_free is safe. */
MOEDEF moe_status moe_kv_cache_init(moe_kv_cache *c, const moe_model *m, int max_batch, int max_len);
MOEDEF void moe_kv_cache_free(moe_kv_cache *c);
/* Empties every sequence (their positions restart at 0) and drops the packed weights
   (moe_kv_cache_pack); the buffers stay. */
MOEDEF void moe_kv_cache_reset(moe_kv_cache *c);
/* Copies the model's weights, as they are now, into the cache's panels (the GEMM's layout) for
   moe_model_decode to multiply, as moe_model_generate_batch does for its own calls: the
   products then take the GEMM's operations and no packing per call. The copy is used until
   moe_kv_cache_reset or the end of the next moe_model_generate_batch: pack again after the
   weights change (a step, a load, a merge), else decoding uses the old ones. */
MOEDEF void moe_kv_cache_pack(moe_kv_cache *c);
/* Runs n tokens (1 <= n <= c->chunk) through the model on top of the cache: token i joins
   sequence seqs[i] at its next position (c->len[seqs[i]], which then grows; tokens of one
   sequence go in their order in the call). Their keys and values enter the cache; their logits
   are left in m->logits (n, vocab), row i for token i. Nothing changes when the call fails
   (bad tokens or sequences, a sequence beyond max_len: a sentence in m->err). */
MOEDEF moe_status moe_model_decode(moe_model *m, moe_kv_cache *c, const int *tokens, const int *seqs, int n);
/* Generates for n_seqs <= c->max_batch sequences at once; sequence i uses cache slot i
   (emptied first). Each step feeds every unfinished sequence's newest token in one decode call
   (prompts go in calls of up to c->chunk tokens) and samples each sequence's next token from its
   own sampler and RNG. A sequence ends after max_new tokens or after its stop token. Every
   sequence must fit the cache: n_prompt + max_new - 1 <= max_len (the last token is never fed),
   else a status and a sentence before anything runs. The tokens of a sequence do not depend on
   the others in the batch or on the thread count. */
MOEDEF moe_status moe_model_generate_batch(moe_model *m, moe_kv_cache *c, moe_gen_seq *seqs, int n_seqs);

/* @implementation */
/* ============================================================================================
   >>moe:generate
   ============================================================================================ */

/* every matrix decoding multiplies, into pk (moe__wpack_put's two passes): per block the QKV
   and output projections, the linear router, the FFN's (dense, or each routed and shared
   expert's up, gate and down), and the LM head. A matrix left out is multiplied as it is. */
static void moe__decode_matrices(const moe_model *m, moe_wpack *pk) {
    const moe_model_config *mc = &m->cfg;
    int d = mc->d, l, e, bank;
    for (l = 0; l < mc->n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        moe__wpack_put(pk, moe_store_param(&m->S, b->id_qkv), 3 * d, d);
        moe__wpack_put(pk, moe_store_param(&m->S, b->id_wo), d, d);
        for (bank = 0; bank < 2; bank++) {
            moe_expert_weights w;
            int E, D;
            if (!b->is_moe) {
                if (bank) break;
                w = moe__dense_ffn(m, b, 0); E = 1; D = mc->d_ff;
            } else {
                if (b->moe.runner) break; /* another process runs the routed experts */
                E = bank ? b->moe.cfg.n_shared : b->moe.cfg.n_experts;
                D = bank ? b->moe.cfg.d_ff_shared : b->moe.cfg.d_ff;
                if (E <= 0) continue;
                if (!bank && b->moe.id_router_w >= 0) /* the linear router */
                    moe__wpack_put(pk, moe_store_param(&m->S, b->moe.id_router_w), E, b->moe.cfg.router_dim);
                w = moe_layer_experts(&b->moe, &m->S, bank, 0);
            }
            for (e = 0; e < E; e++) {
                size_t at = (size_t)e * D * d;
                if (w.up) moe__wpack_put(pk, w.up + at, D, d);
                if (w.gate) moe__wpack_put(pk, w.gate + at, D, d);
                if (w.down) moe__wpack_put(pk, w.down + at, d, D);
            }
        }
    }
    moe__wpack_put(pk, moe_store_param(&m->S, m->id_wte), mc->vocab, d);
}

MOE__IMPL moe_status moe_kv_cache_init(moe_kv_cache *c, const moe_model *m, int max_batch, int max_len) {
    const moe_model_config *mc;
    size_t kv;
    int ok, hd;
    memset(c, 0, sizeof *c);
    if (!m || !m->blocks) return moe_err_set(&c->err, MOE_ERR_STATE, "the model is not initialised");
    mc = &m->cfg;
    if (max_batch < 1 || max_len < 1)
        return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "a KV cache needs max_batch >= 1 and max_len >= 1, got %d and %d", max_batch, max_len);
    if (mc->pos == MOE_POS_LEARNED && max_len > mc->max_seq)
        return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "max_len %d is beyond the learned position table (max_seq %d)", max_len, mc->max_seq);
    kv = (size_t)mc->n_layers * max_batch * max_len * mc->d;
    if ((double)mc->n_layers * max_batch * max_len * mc->d > 1e10 || max_len > (1 << 24))
        return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "a KV cache of %d x %d positions is too large", max_batch, max_len);
    c->n_layers = mc->n_layers; c->d = mc->d; c->n_heads = mc->n_heads; c->pos = mc->pos;
    c->max_batch = max_batch; c->max_len = max_len;
    c->chunk = m->max_B * m->max_T;
    c->nthreads = moe_num_threads();
    hd = mc->d / mc->n_heads;
    c->k = (float *)moe__calloc_huge(2 * kv, sizeof(float), &c->kv_raw);
    c->v = c->k ? c->k + kv : NULL;
    ok = c->k && MOE__ALLOC(c->len, max_batch, int) &&
         MOE__ALLOC(c->scores, (size_t)c->nthreads * max_len, float) && MOE__ALLOC(c->tok_seq, c->chunk, int) &&
         MOE__ALLOC(c->tok_pos, c->chunk, int) && MOE__ALLOC(c->gen_tok, c->chunk, int) &&
         MOE__ALLOC(c->gen_seq, c->chunk, int) && MOE__ALLOC(c->gen_fed, max_batch, int) &&
         MOE__ALLOC(c->gen_row, max_batch, int);
    if (ok && mc->pos == MOE_POS_ROPE) ok = MOE__ALLOC(c->rope, (size_t)max_len * hd, float);
    if (ok) {
        moe__decode_matrices(m, &c->pack); /* counts */
        ok = moe__wpack_alloc(&c->pack, c->nthreads);
        if (ok) {
            moe__decode_matrices(m, &c->pack);
            moe__wpack_sort(&c->pack);
            moe__wpack_fill(&c->pack, c->nthreads); /* touches its pages now, not in a generation */
        }
    }
    if (!ok) {
        moe_kv_cache_free(c);
        return moe_err_set(&c->err, MOE_ERR_NOMEM, "out of memory for a KV cache of %d x %d positions", max_batch, max_len);
    }
    if (c->rope) moe_rope_table(c->rope, max_len, hd, mc->rope_theta);
    return MOE_OK;
}

MOE__IMPL void moe_kv_cache_free(moe_kv_cache *c) {
    moe_err keep = c->err;
    MOE_FREE(c->len); MOE_FREE(c->kv_raw); MOE_FREE(c->rope); MOE_FREE(c->scores);
    MOE_FREE(c->tok_seq); MOE_FREE(c->tok_pos); MOE_FREE(c->gen_tok); MOE_FREE(c->gen_seq);
    MOE_FREE(c->gen_fed); MOE_FREE(c->gen_row);
    moe__wpack_free(&c->pack);
    memset(c, 0, sizeof *c);
    c->err = keep;
}

MOE__IMPL void moe_kv_cache_reset(moe_kv_cache *c) {
    if (c->len) memset(c->len, 0, sizeof(int) * (size_t)c->max_batch);
    c->pack.live = 0;
}

MOE__IMPL void moe_kv_cache_pack(moe_kv_cache *c) {
    if (!c->pack.panels) return;
    moe__wpack_fill(&c->pack, moe_num_threads() < c->nthreads ? moe_num_threads() : c->nthreads);
    c->pack.live = 1;
}

/* flops below which the attention of a decode call runs on one thread: waking a sleeping
   thread (OMP_WAIT_POLICY=PASSIVE) costs tens of microseconds */
#ifndef MOE__KV_THREAD_FLOPS
#define MOE__KV_THREAD_FLOPS 4e6
#endif

/* threads for the attention of n new tokens: one below MOE__KV_THREAD_FLOPS, else up to the
   cache's per-thread score rows */
static int moe__kv_attention_threads(const moe_kv_cache *c, int n) {
    double flops = 0.0;
    int i, nt = moe_num_threads();
    for (i = 0; i < n; i++) flops += (double)(c->tok_pos[i] + 1) * c->d * 4;
    return flops <= MOE__KV_THREAD_FLOPS ? 1 : nt < c->nthreads ? nt : c->nthreads;
}

/* o[0, nk) = sum_{u <= p} w_u V[u][k] over nk <= 64 columns in registers. The positions go
   to four (32 columns) or two (64) partial sums by u mod 4 or 2, added at the end, so that
   eight independent chains keep the FMA units busy; a fixed order whatever the thread. */
static void moe__kv_weighted_sum(float *o, const float *w, const float *V, int hd, int p, int nk) {
    int u, k;
    if (nk == 32) {
        float a0[32], a1[32], a2[32], a3[32];
        for (k = 0; k < 32; k++) a0[k] = a1[k] = a2[k] = a3[k] = 0.0f;
        for (u = 0; u + 3 <= p; u += 4) {
            const float *v0 = V + (size_t)u * hd;
            for (k = 0; k < 32; k++) {
                a0[k] += w[u] * v0[k];
                a1[k] += w[u + 1] * v0[hd + k];
                a2[k] += w[u + 2] * v0[2 * hd + k];
                a3[k] += w[u + 3] * v0[3 * hd + k];
            }
        }
        for (k = 0; k < 32; k++) { /* the last p + 1 - u (< 4) positions, each to its own sum */
            if (u <= p) a0[k] += w[u] * V[(size_t)u * hd + k];
            if (u + 1 <= p) a1[k] += w[u + 1] * V[(size_t)(u + 1) * hd + k];
            if (u + 2 <= p) a2[k] += w[u + 2] * V[(size_t)(u + 2) * hd + k];
            o[k] = (a0[k] + a1[k]) + (a2[k] + a3[k]);
        }
    } else if (nk == 64) {
        float a0[64], a1[64];
        for (k = 0; k < 64; k++) a0[k] = a1[k] = 0.0f;
        for (u = 0; u + 1 <= p; u += 2) {
            const float *v0 = V + (size_t)u * hd;
            for (k = 0; k < 64; k++) {
                a0[k] += w[u] * v0[k];
                a1[k] += w[u + 1] * v0[hd + k];
            }
        }
        for (k = 0; k < 64; k++) {
            if (u <= p) a0[k] += w[u] * V[(size_t)u * hd + k];
            o[k] = a0[k] + a1[k];
        }
    } else {
        float acc[64];
        for (k = 0; k < nk; k++) acc[k] = 0.0f;
        for (u = 0; u <= p; u++)
            for (k = 0; k < nk; k++) acc[k] += w[u] * V[(size_t)u * hd + k];
        for (k = 0; k < nk; k++) o[k] = acc[k];
    }
}

/* scores sc[u0, u0 + nu) of q against the transposed keys Kt (rows of stride L), nb (64 or
   128, a constant at each call) positions in registers: all nb lanes when the cache has room
   past u0 (the extra ones unused), else nu */
static void moe__kv_scores(float *sc, const float *q, const float *Kt, int hd, int L, int u0, int nu, int nb) {
    float acc[128];
    int u, j, n = u0 + nb <= L ? nb : nu;
    for (u = 0; u < nb; u++) acc[u] = 0.0f;
    for (j = 0; j < hd; j++) {
        const float *kt = Kt + (size_t)j * L + u0;
        float qj = q[j];
        for (u = 0; u < n; u++) acc[u] += qj * kt[u];
    }
    for (u = 0; u < nu; u++) sc[u0 + u] = acc[u];
}

/* task = (token, head) of the call: its attention into its slice of out, with score row sc.
   Scores: the keys are stored transposed (a key dimension's row over the positions), so each
   dimension j adds q_j K^T[j][u] to 64 or 128 positions' scores at once, in registers; every
   score is the sum over j in order whatever the blocking (positions past p, read where the
   cache has room, are never used). The weighted sum: up to 64 columns of V at a time. */
static void moe__kv_attention_task(moe_kv_cache *c, int l, float *out, const float *qkv, int task, float *sc) {
    int d = c->d, NH = c->n_heads, hd = d / NH, L = c->max_len;
    int i = task / NH, h = task % NH, s = c->tok_seq[i], p = c->tok_pos[i], u0, j;
    size_t base = ((((size_t)l * c->max_batch + s) * NH + h) * c->max_len) * hd;
    const float *q = qkv + (size_t)i * 3 * d + (size_t)h * hd, *Kt = c->k + base, *V = c->v + base;
    float *o = out + (size_t)i * d + (size_t)h * hd;
    for (u0 = 0; u0 <= p; u0 += 128) { /* 128 positions at a time (eight chains), 64 for a short rest */
        int nu = p + 1 - u0 < 128 ? p + 1 - u0 : 128;
        if (nu > 64) moe__kv_scores(sc, q, Kt, hd, L, u0, nu, 128);
        else moe__kv_scores(sc, q, Kt, hd, L, u0, nu, 64);
    }
    moe__att_softmax_row(sc, p + 1, 1.0f / sqrtf((float)hd)); /* the full forward's softmax of one row */
    for (j = 0; j < hd;) {
        int nk = hd - j >= 64 ? 64 : hd - j >= 32 ? 32 : hd - j;
        moe__kv_weighted_sum(o + j, sc, V + j, hd, p, nk);
        j += nk;
    }
}

/* Attention of the call's n tokens over their sequences' cached keys and values in layer l
   (the call's own keys and values are in the cache already): out (n, d). One task per
   (token, head) owns its slice of out and runs the same loop whatever the thread. */
static void moe__kv_attention(moe_kv_cache *c, int l, float *out, const float *qkv, int n) {
    int task, nt = moe__kv_attention_threads(c, n);
    if (nt > 1) {
        MOE__OMP_FOR_DYNAMIC_N(nt)
        for (task = 0; task < n * c->n_heads; task++)
            moe__kv_attention_task(c, l, out, qkv, task, c->scores + (size_t)moe__thread_index() * c->max_len);
    } else { /* no OpenMP region for one thread (see moe__decode_linear) */
        for (task = 0; task < n * c->n_heads; task++) moe__kv_attention_task(c, l, out, qkv, task, c->scores);
    }
}

/* what decoding and generation need of the model and the cache */
static moe_status moe__decode_check(moe_model *m, const moe_kv_cache *c) {
    const moe_model_config *mc = &m->cfg;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!c || !c->k) return moe_err_set(&m->err, MOE_ERR_STATE, "the KV cache is not initialised");
    if (c->d != mc->d || c->n_layers != mc->n_layers || c->n_heads != mc->n_heads || c->pos != mc->pos ||
        c->chunk > m->max_B * m->max_T)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "the KV cache was built for another model (d %d, %d layers, %d heads)", c->d, c->n_layers, c->n_heads);
    if (mc->moe_every > 0 && !moe__router_is_causal(&mc->moe))
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "expert-choice routing is not causal (a token's experts depend on later tokens): it cannot generate");
    if (mc->moe_every > 0 && m->gw_broadcast && mc->moe.gw_slots > 0)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "GW-MoE's broadcast with gw_slots counts uncertain tokens per sequence: switch the broadcast off (moe_model_set_broadcast) to decode");
    if (m->group_size)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "the model runs CQIL layer groups, which the KV-cached decoding does not: generate with moe_model_generate, or ungroup (moe_model_set_groups with no groups)");
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_decode(moe_model *m, moe_kv_cache *c, const int *tokens, const int *seqs, int n) {
    const moe_model_config *mc = &m->cfg;
    int d = mc->d, NH = mc->n_heads, V = mc->vocab, hd, half, l, i, j;
    const float *wte, *wpe, *rh_prev;
    moe_status st = moe__decode_check(m, c);
    if (st != MOE_OK) return st;
    if (!tokens || !seqs || n < 1 || n > c->chunk)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "decode needs 1 to %d tokens (the model's max_B * max_T) and their sequences, got %d", c->chunk, n);
    for (i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "token %d at %d is outside [0, %d)", tokens[i], i, V);
        if (seqs[i] < 0 || seqs[i] >= c->max_batch) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "sequence %d at %d is outside the cache's [0, %d)", seqs[i], i, c->max_batch);
    }
    for (i = 0; i < n; i++) { /* positions; undone when one runs past the cache */
        c->tok_seq[i] = seqs[i];
        c->tok_pos[i] = c->len[seqs[i]]++;
        if (c->tok_pos[i] >= c->max_len) {
            for (j = 0; j <= i; j++) c->len[seqs[j]]--;
            return moe_err_set(&m->err, MOE_ERR_SHAPE, "sequence %d would pass the cache's %d positions", seqs[i], c->max_len);
        }
    }
    m->B = m->T = 0; /* decoding leaves no batch to differentiate */
    m->has_targets = 0;
    m->aux_loss = 0.0;
    m->loss = 0.0;
    hd = d / NH;
    half = hd / 2;
    wte = moe_store_param(&m->S, m->id_wte);
    wpe = moe_store_param(&m->S, m->id_wpe);
    for (i = 0; i < n; i++) {
        const float *e = wte + (size_t)tokens[i] * d;
        float *o = m->blocks[0].x + (size_t)i * d;
        for (j = 0; j < d; j++) o[j] = e[j] + (wpe ? wpe[(size_t)c->tok_pos[i] * d + j] : 0.0f);
    }
    rh_prev = m->r_zero;
    for (l = 0; l < mc->n_layers; l++) {
        moe_block *b = &m->blocks[l];
        float *out = l + 1 < mc->n_layers ? m->blocks[l + 1].x : m->x_final;
        moe_layer_args a = moe__block_args(m, 1, NULL);
        float s = m->layer_scale[l];
        a.dropless = 1;
        moe_rmsnorm_forward(b->ln1, b->rstd1, b->x, moe_store_param(&m->S, b->id_ln1), n, d, mc->norm_eps);
        moe__decode_linear(b->qkv, b->ln1, moe_store_param(&m->S, b->id_qkv), n, d, 3 * d, moe_num_threads(), &c->pack);
        for (i = 0; i < n; i++) {
            float *row = b->qkv + (size_t)i * 3 * d;
            int h;
            /* the row's own position: B = T = 1 with the table moved to it */
            if (c->rope) moe_rope_apply(row, c->rope + (size_t)c->tok_pos[i] * half * 2, 1, 1, d, NH, 0);
            for (h = 0; h < NH; h++) {
                /* the head's block of the cache (max_len x hd), as moe__kv_attention_task finds it */
                size_t head = (((size_t)l * c->max_batch + c->tok_seq[i]) * NH + h) * c->max_len * hd, p = (size_t)c->tok_pos[i];
                int j2;
                for (j2 = 0; j2 < hd; j2++) c->k[head + (size_t)j2 * c->max_len + p] = row[d + h * hd + j2]; /* transposed */
                memcpy(c->v + head + p * hd, row + 2 * d + (size_t)h * hd, sizeof(float) * (size_t)hd);
            }
        }
        moe__kv_attention(c, l, b->atty, b->qkv, n);
        moe__decode_linear(b->x2, b->atty, moe_store_param(&m->S, b->id_wo), n, d, d, moe_num_threads(), &c->pack);
        for (i = 0; i < n * d; i++) b->x2[i] = s * b->x2[i] + b->x[i]; /* s_l: masked growth's residual scale */
        m->work.pack = &c->pack; /* the FFN's products (found only while the pack is live) */
        st = moe__block_ffn_forward(m, l, n, a, &rh_prev, &m->work, &m->err);
        m->work.pack = NULL;
        if (st != MOE_OK) return st;
        for (i = 0; i < n * d; i++) out[i] = b->x2[i] + s * b->ffn[i];
    }
    moe_rmsnorm_forward(m->lnf, m->rstd_f, m->x_final, moe_store_param(&m->S, m->id_lnf), n, d, mc->norm_eps);
    moe__decode_linear(m->logits, m->lnf, wte, n, d, V, moe_num_threads(), &c->pack);
    return MOE_OK;
}

/* the decode-and-sample loop of moe_model_generate_batch */
static moe_status moe__generate_steps(moe_model *m, moe_kv_cache *c, moe_gen_seq *seqs, int n_seqs) {
    int V = m->cfg.vocab, i;
    moe_status st;
    for (;;) {
        /* the next call: each unfinished sequence's tokens not yet fed (prompt, then its newest
           token), sequence by sequence, up to the chunk */
        int n = 0;
        for (i = 0; i < n_seqs; i++) {
            moe_gen_seq *q = &seqs[i];
            c->gen_row[i] = -1;
            if (q->stopped || q->n_out >= q->max_new) continue;
            while (n < c->chunk && c->gen_fed[i] < q->n_prompt + q->n_out) {
                int f = c->gen_fed[i]++;
                c->gen_tok[n] = f < q->n_prompt ? q->prompt[f] : q->out[f - q->n_prompt];
                c->gen_seq[n] = i;
                c->gen_row[i] = n++;
            }
        }
        if (n == 0) break;
        if ((st = moe_model_decode(m, c, c->gen_tok, c->gen_seq, n)) != MOE_OK) return st;
        for (i = 0; i < n_seqs; i++) { /* a sequence whose input is all in samples its next token */
            moe_gen_seq *q = &seqs[i];
            int next;
            if (c->gen_row[i] < 0 || c->gen_fed[i] < q->n_prompt + q->n_out) continue;
            next = moe__sample_token(m->logits + (size_t)c->gen_row[i] * V, V, &q->sampler, &q->rng, m->gen_probs);
            q->out[q->n_out++] = next;
            if (next == q->stop) q->stopped = 1;
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_generate_batch(moe_model *m, moe_kv_cache *c, moe_gen_seq *seqs, int n_seqs) {
    int V = m->cfg.vocab, i, t;
    moe_err e;
    moe_status st = moe__decode_check(m, c);
    if (st != MOE_OK) return st;
    if (!seqs || n_seqs < 1 || n_seqs > c->max_batch)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "generate_batch needs 1 to %d sequences (the cache's max_batch), got %d", c->max_batch, n_seqs);
    for (i = 0; i < n_seqs; i++) {
        const moe_gen_seq *q = &seqs[i];
        if (!q->prompt || q->n_prompt < 1 || q->max_new < 0 || (q->max_new > 0 && !q->out))
            return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "sequence %d: a prompt of at least one token, max_new >= 0 and an output buffer are needed", i);
        if (q->stop < -1 || q->stop >= V) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "sequence %d: stop token %d is outside [-1, %d)", i, q->stop, V);
        if (moe__sampler_check(&e, &q->sampler) != MOE_OK) return moe_err_set(&m->err, e.status, "sequence %d: %s", i, e.msg);
        if ((double)q->n_prompt + q->max_new - 1 > c->max_len)
            return moe_err_set(&m->err, MOE_ERR_SHAPE, "sequence %d: a prompt of %d and %d new tokens need %d positions, beyond the cache's %d", i, q->n_prompt,
                               q->max_new, q->n_prompt + q->max_new - 1, c->max_len);
        for (t = 0; t < q->n_prompt; t++)
            if (q->prompt[t] < 0 || q->prompt[t] >= V) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "sequence %d: prompt token %d at %d is outside [0, %d)", i, q->prompt[t], t, V);
    }
    for (i = 0; i < n_seqs; i++) {
        c->len[i] = 0;
        c->gen_fed[i] = 0;
        seqs[i].n_out = 0;
        seqs[i].stopped = 0;
    }
    /* the weights cannot change during this call: pack them once for all its decode calls */
    moe_kv_cache_pack(c);
    st = moe__generate_steps(m, c, seqs, n_seqs);
    c->pack.live = 0;
    return st;
}

