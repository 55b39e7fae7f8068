/* ============================================================================================
   >>rwd:rsf  rejection-sampling fine-tuning (RSF) of moe.h's byte LM under a direction (DPA)
   ============================================================================================
   RAFT / rejection-sampling fine-tuning (Dong et al., arXiv 2304.06767, Algorithm 1), with the
   preference of Directional Preference Alignment (Wang et al., arXiv 2402.18571, section 3.2):
   per prompt, sample n responses from the policy, score each with k reward objectives, keep
   the best by v . r for the prompt's direction v, then fine-tune the policy on the kept
   (prompt, response) pairs with the loss on the response bytes only (targets -1 elsewhere);
   repeat for T rounds. With prompt encoding on, the direction is written into the prompt as
   DPA's integer weights round(100 v) (section 3.1), so one policy learns many directions.
   The scorer is any callback; rwd_rsf_head_score wraps reward heads on hashed text features
   (>>rwd:features, >>rwd:head), optionally with verbosity (length) as one more objective.
   Every buffer (KV cache, candidates, kept set, batches) is planned at init: sampling, scoring
   with the head scorer and fine-tuning allocate nothing. Bytes are tokens (vocab 256). */

/* r (n, k): the k objectives of each of the n responses to prompt (response i: resp[i], of
   len[i] bytes, NUL-terminated). Return MOE_OK, or a status with a sentence in err. */
typedef moe_status (*rwd_rsf_score_fn)(double *r, const char *prompt, const char *const *resp, const int *len,
                                       int n, void *user, moe_err *err);

typedef enum rwd_rsf_prompt_kind {
    RWD_RSF_PROMPT_PLAIN = 0, /* the prompt as given                                            */
    RWD_RSF_PROMPT_DPA = 1,   /* DPA's system prompt with round(100 v) (rwd_dpa_system_prompt),
                                 a space, the prompt; k = 2                                      */
    RWD_RSF_PROMPT_WEIGHTS = 2 /* the same integers in a short prefix "[W_1,W_2] " for models
                                 whose window cannot hold the system prompt; k = 2               */
} rwd_rsf_prompt_kind;

typedef struct rwd_rsf_config {
    int k;                 /* reward objectives the scorer gives; 2                            */
    int n_candidates;      /* n responses per prompt; 8                                        */
    int max_new;           /* bytes per response at most; 32                                   */
    int stop;              /* a response ends after this byte; -1 = none (the default)          */
    moe_sampler sampler;   /* temperature 1, no top-k, no top-p                                 */
    int prompt_kind;       /* rwd_rsf_prompt_kind; PLAIN                                        */
    int max_prompts;       /* prompts one round takes (the kept set's size); 64                 */
    int max_prompt_bytes;  /* longest prompt before encoding; 64                                */
    int epochs;            /* passes over the kept set per round; 1                             */
    float lr;              /* AdamW learning rate of fine-tuning; 1e-3                          */
    float grad_clip;       /* global gradient norm clip; 1 (0 = none)                           */
    moe_adamw_config adamw;
    uint64_t seed;         /* candidates' samplers and the kept set's order                     */
} rwd_rsf_config;

typedef struct rwd_rsf_stats {
    int n_prompts;         /* prompts of the round                                            */
    double mean_kept;      /* mean v . r of the kept responses                                */
    double mean_all;       /* mean v . r of every candidate                                   */
    double loss_before;    /* mean cross-entropy (nats/byte) on the kept responses before and */
    double loss_after;     /* after the round's fine-tuning                                   */
} rwd_rsf_stats;

typedef struct rwd_rsf {
    rwd_rsf_config cfg;
    moe_model *m;          /* the policy (not owned; must outlive this)                       */
    moe_kv_cache cache;    /* n_candidates sequences of the longest prompt + max_new           */
    moe_gen_seq *seqs;     /* (n_candidates)                                                  */
    int *gen_out;          /* (n_candidates, max_new)                                          */
    int max_prompt_tokens; /* encoded prompt bytes at most                                     */
    char *prompt_text;     /* (max_prompt_tokens + 1) the last encoded prompt                  */
    int *prompt_tok;       /* (max_prompt_tokens)                                              */
    int n_prompt;          /* bytes of the last encoded prompt                                 */
    char *resp_text;       /* (n_candidates, max_new + 1) the last candidates, NUL-terminated  */
    const char **resp;     /* (n_candidates) pointers into resp_text                           */
    int *resp_len;         /* (n_candidates)                                                   */
    double *r;             /* (n_candidates, k) the last candidates' objectives                */
    int best;              /* the last sample's kept candidate                                 */
    int seq_cap;           /* max_prompt_tokens + max_new: a kept sequence's room              */
    int *kept_tok;         /* (max_prompts, seq_cap) prompt + response bytes                   */
    int *kept_len, *kept_prompt; /* (max_prompts) bytes in all, of them prompt                 */
    double *kept_r;        /* (max_prompts, k)                                                 */
    int n_kept;
    int *order;            /* (max_prompts) the fine-tuning order                              */
    int *in, *tg;          /* (max_B, max_T) one fine-tuning batch                             */
    long long step;        /* AdamW steps taken                                                */
    moe_rng rng;
    moe_err err;
} rwd_rsf;

RWDDEF rwd_rsf_config rwd_rsf_config_default(void);
/* Plans everything for policy m (byte vocabulary, a causal router, max_B >= 1). An encoded
   prompt plus max_new - 1 bytes must fit the model's window max_T (fine-tuning reads the kept
   sequence whole): else a status and a sentence. On failure r->err says why; free is safe. */
RWDDEF moe_status rwd_rsf_init(rwd_rsf *r, moe_model *m, const rwd_rsf_config *c);
RWDDEF void rwd_rsf_free(rwd_rsf *r);
/* out (cap) = prompt as the policy reads it under direction v (k values, |v| = 1): the
   encoding of cfg.prompt_kind. *n = its bytes (may be NULL). */
RWDDEF moe_status rwd_rsf_encode_prompt(rwd_rsf *r, char *out, size_t cap, int *n, const char *prompt,
                                        const double *v);
/* n_candidates responses to prompt (encoded under v) in one batched generation, scored by
   score; r->resp, r->resp_len, r->r hold them and r->best = argmax_j v . r_j (ties to the lower
   index; rwd_dpa_best_of_n). v must be a finite unit vector (|v| within 1e-6 of 1). */
RWDDEF moe_status rwd_rsf_sample(rwd_rsf *r, const char *prompt, const double *v, rwd_rsf_score_fn score,
                                 void *user);
/* Empties the kept set. */
RWDDEF void rwd_rsf_clear(rwd_rsf *r);
/* Appends candidate i of the last rwd_rsf_sample (its encoded prompt and its response) to
   the kept set; a response of 0 bytes or a full kept set is refused with a sentence. */
RWDDEF moe_status rwd_rsf_keep(rwd_rsf *r, int i);
/* *loss = mean cross-entropy (nats per byte) of the policy on the kept responses given their
   prompts. */
RWDDEF moe_status rwd_rsf_kept_loss(rwd_rsf *r, double *loss);
/* epochs passes of AdamW over the kept set (shuffled by r->rng; batches of up to max_B
   sequences; loss on the response bytes only). An empty kept set is refused. */
RWDDEF moe_status rwd_rsf_finetune(rwd_rsf *r, int epochs);
/* One RSF round: for each of the n_prompts prompts (direction dirs + i k; 1 <= n_prompts <=
   max_prompts) sample, keep the best (unless it is empty: a stop byte first), then fine-tune
   cfg.epochs passes on the kept set; stats (may be NULL) gets the round's means. */
RWDDEF moe_status rwd_rsf_round(rwd_rsf *r, const char *const *prompts, const double *dirs, int n_prompts,
                                rwd_rsf_score_fn score, void *user, rwd_rsf_stats *stats);

/* The scorer of reward heads on text features: objective j < n_heads is heads[j] (in store)
   on rwd_featurize(f, prompt, response); with length_scale > 0 one more objective, the
   response's code points / length_scale (verbosity). k = n_heads + (length_scale > 0). */
typedef struct rwd_rsf_head_scorer {
    const rwd_featurizer *f;
    rwd_head *heads;
    int n_heads;
    const moe_store *store;
    double length_scale;
    float *x; /* (width) scratch planned at init */
} rwd_rsf_head_scorer;

RWDDEF moe_status rwd_rsf_head_scorer_init(rwd_rsf_head_scorer *s, const rwd_featurizer *f, rwd_head *heads,
                                           int n_heads, const moe_store *store, double length_scale, moe_err *err);
RWDDEF void rwd_rsf_head_scorer_free(rwd_rsf_head_scorer *s);
/* an rwd_rsf_score_fn; user = the rwd_rsf_head_scorer */
RWDDEF moe_status rwd_rsf_head_score(double *r, const char *prompt, const char *const *resp, const int *len, int n,
                                     void *user, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:rsf
   ============================================================================================ */

RWD__IMPL rwd_rsf_config rwd_rsf_config_default(void) {
    rwd_rsf_config c;
    memset(&c, 0, sizeof c);
    c.k = 2;
    c.n_candidates = 8;
    c.max_new = 32;
    c.stop = -1;
    c.sampler.temperature = 1.0f;
    c.sampler.top_k = 0;
    c.sampler.top_p = 1.0f;
    c.prompt_kind = RWD_RSF_PROMPT_PLAIN;
    c.max_prompts = 64;
    c.max_prompt_bytes = 64;
    c.epochs = 1;
    c.lr = 1e-3f;
    c.grad_clip = 1.0f;
    c.adamw = moe_adamw_config_default();
    c.seed = 1;
    return c;
}

/* bytes the encoding adds to a prompt at most */
static int rwd__rsf_prefix_bytes(int kind) {
    char buf[512];
    moe_err e;
    if (kind == RWD_RSF_PROMPT_DPA) {
        if (rwd_dpa_system_prompt(buf, sizeof buf, -100, -100, &e) != MOE_OK) return -1;
        return (int)strlen(buf) + 1; /* + the space */
    }
    if (kind == RWD_RSF_PROMPT_WEIGHTS) return (int)strlen("[-100,-100] ");
    return 0;
}

RWD__IMPL void rwd_rsf_free(rwd_rsf *r) {
    if (!r) return;
    moe_kv_cache_free(&r->cache);
    MOE_FREE(r->seqs); MOE_FREE(r->gen_out); MOE_FREE(r->prompt_text); MOE_FREE(r->prompt_tok);
    MOE_FREE(r->resp_text); MOE_FREE(r->resp); MOE_FREE(r->resp_len); MOE_FREE(r->r);
    MOE_FREE(r->kept_tok); MOE_FREE(r->kept_len); MOE_FREE(r->kept_prompt); MOE_FREE(r->kept_r);
    MOE_FREE(r->order); MOE_FREE(r->in); MOE_FREE(r->tg);
    r->m = NULL;
}

RWD__IMPL moe_status rwd_rsf_init(rwd_rsf *r, moe_model *m, const rwd_rsf_config *c) {
    int n, pre, i;
    size_t N;
    moe_status st;
    if (!r) return MOE_ERR_INVALID_ARG;
    memset(r, 0, sizeof *r);
    if (!m || !c) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_init needs a model and a config");
    r->cfg = *c;
    if (m->cfg.vocab != 256) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "RSF reads text as bytes: the model's vocabulary must be 256, not %d", m->cfg.vocab);
    if (m->max_B < 1 || m->max_T < 2) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the model needs activations for at least one sequence of 2 tokens");
    if (c->k < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the scorer must give k >= 1 objectives, not %d", c->k);
    if (c->n_candidates < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rejection sampling needs n >= 1 candidates per prompt, not %d", c->n_candidates);
    if (c->max_new < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "responses need max_new >= 1 bytes, not %d", c->max_new);
    if (c->stop < -1 || c->stop > 255) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the stop byte %d is neither -1 nor a byte", c->stop);
    if (c->max_prompts < 1 || c->max_prompt_bytes < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "max_prompts and max_prompt_bytes must be >= 1");
    if (c->epochs < 0 || !(c->lr >= 0.0f) || !(c->grad_clip >= 0.0f)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "epochs, lr and grad_clip must be >= 0");
    if (c->prompt_kind < RWD_RSF_PROMPT_PLAIN || c->prompt_kind > RWD_RSF_PROMPT_WEIGHTS) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "unknown prompt encoding %d", c->prompt_kind);
    if (c->prompt_kind != RWD_RSF_PROMPT_PLAIN && c->k != 2) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "DPA's prompt states two weights (helpfulness, verbosity): k must be 2, not %d", c->k);
    if (!(c->sampler.temperature >= 0.0f) || c->sampler.top_k < 0 || !(c->sampler.top_p > 0.0f && c->sampler.top_p <= 1.0f)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the sampler needs temperature >= 0, top_k >= 0, top_p in (0, 1]");
    pre = rwd__rsf_prefix_bytes(c->prompt_kind);
    r->max_prompt_tokens = c->max_prompt_bytes + pre;
    r->seq_cap = r->max_prompt_tokens + c->max_new;
    if (r->seq_cap - 1 > m->max_T) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an encoded prompt of up to %d bytes and a response of %d bytes need a window of %d tokens; the model's is %d (shorten max_new or max_prompt_bytes)", r->max_prompt_tokens, c->max_new, r->seq_cap - 1, m->max_T);
    r->m = m;
    n = c->n_candidates;
    st = moe_kv_cache_init(&r->cache, m, n, r->seq_cap - 1);
    if (st != MOE_OK) {
        r->err = r->cache.err;
        rwd_rsf_free(r);
        return st;
    }
    N = (size_t)m->max_B * (size_t)m->max_T;
    r->seqs = (moe_gen_seq *)moe__calloc((size_t)n, sizeof(moe_gen_seq));
    r->gen_out = (int *)moe__calloc((size_t)n * (size_t)c->max_new, sizeof(int));
    r->prompt_text = (char *)moe__calloc((size_t)r->max_prompt_tokens + 1, 1);
    r->prompt_tok = (int *)moe__calloc((size_t)r->max_prompt_tokens, sizeof(int));
    r->resp_text = (char *)moe__calloc((size_t)n * ((size_t)c->max_new + 1), 1);
    r->resp = (const char **)moe__calloc((size_t)n, sizeof(char *));
    r->resp_len = (int *)moe__calloc((size_t)n, sizeof(int));
    r->r = (double *)moe__calloc((size_t)n * (size_t)c->k, sizeof(double));
    r->kept_tok = (int *)moe__calloc((size_t)c->max_prompts * (size_t)r->seq_cap, sizeof(int));
    r->kept_len = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->kept_prompt = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->kept_r = (double *)moe__calloc((size_t)c->max_prompts * (size_t)c->k, sizeof(double));
    r->order = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->in = (int *)moe__calloc(N, sizeof(int));
    r->tg = (int *)moe__calloc(N, sizeof(int));
    if (!r->seqs || !r->gen_out || !r->prompt_text || !r->prompt_tok || !r->resp_text || !r->resp || !r->resp_len ||
        !r->r || !r->kept_tok || !r->kept_len || !r->kept_prompt || !r->kept_r || !r->order || !r->in || !r->tg) {
        rwd_rsf_free(r);
        return moe_err_set(&r->err, MOE_ERR_NOMEM, "out of memory planning rejection sampling");
    }
    for (i = 0; i < n; i++) {
        r->resp[i] = r->resp_text + (size_t)i * ((size_t)c->max_new + 1);
        r->seqs[i].out = r->gen_out + (size_t)i * (size_t)c->max_new;
    }
    r->best = -1;
    moe_rng_seed(&r->rng, c->seed);
    return MOE_OK;
}

static moe_status rwd__rsf_check_dir(rwd_rsf *r, const double *v) {
    double s = 0.0;
    int i;
    if (!v) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "a direction v of %d values is needed", r->cfg.k);
    for (i = 0; i < r->cfg.k; i++) {
        if (!isfinite(v[i])) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "direction component %d is not finite", i);
        s += v[i] * v[i];
    }
    if (!(fabs(sqrt(s) - 1.0) <= 1e-6)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the direction has length %g, not 1: DPA's directions lie on the unit circle (normalise it with rwd_dpa_direction)", sqrt(s));
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_encode_prompt(rwd_rsf *r, char *out, size_t cap, int *n, const char *prompt,
                                           const double *v) {
    int w[2], len = 0;
    size_t pl;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (!out || cap == 0 || !prompt) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_encode_prompt needs a prompt and an output buffer");
    if ((st = rwd__rsf_check_dir(r, v)) != MOE_OK) return st;
    pl = strlen(prompt);
    if (pl > (size_t)r->cfg.max_prompt_bytes) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the prompt has %zu bytes, more than max_prompt_bytes = %d", pl, r->cfg.max_prompt_bytes);
    if (r->cfg.prompt_kind != RWD_RSF_PROMPT_PLAIN) {
        if ((st = rwd_dpa_weights(w, v, 2, &r->err)) != MOE_OK) return st;
        if (r->cfg.prompt_kind == RWD_RSF_PROMPT_DPA) {
            if ((st = rwd_dpa_system_prompt(out, cap, w[0], w[1], &r->err)) != MOE_OK) return st;
            len = (int)strlen(out);
            if ((size_t)len + 1 >= cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
            out[len++] = ' ';
            out[len] = 0;
        } else {
            int k = snprintf(out, cap, "[%d,%d] ", w[0], w[1]);
            if (k < 0 || (size_t)k >= cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
            len = k;
        }
    }
    if ((size_t)len + pl + 1 > cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
    memcpy(out + len, prompt, pl + 1);
    if (n) *n = len + (int)pl;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_sample(rwd_rsf *r, const char *prompt, const double *v, rwd_rsf_score_fn score,
                                    void *user) {
    const rwd_rsf_config *c;
    int i, j;
    size_t best;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    c = &r->cfg;
    if (!score) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_sample needs a scorer");
    r->best = -1;
    st = rwd_rsf_encode_prompt(r, r->prompt_text, (size_t)r->max_prompt_tokens + 1, &r->n_prompt, prompt, v);
    if (st != MOE_OK) return st;
    if (r->n_prompt < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an empty prompt gives the policy nothing to continue");
    for (i = 0; i < r->n_prompt; i++) r->prompt_tok[i] = (unsigned char)r->prompt_text[i];
    for (i = 0; i < c->n_candidates; i++) {
        moe_gen_seq *s = &r->seqs[i];
        s->prompt = r->prompt_tok;
        s->n_prompt = r->n_prompt;
        s->max_new = c->max_new;
        s->stop = c->stop;
        s->sampler = c->sampler;
        moe_rng_seed(&s->rng, ((uint64_t)moe_rng_u32(&r->rng) << 32) | moe_rng_u32(&r->rng));
    }
    st = moe_model_generate_batch(r->m, &r->cache, r->seqs, c->n_candidates);
    if (st != MOE_OK) {
        r->err = r->m->err;
        return st;
    }
    for (i = 0; i < c->n_candidates; i++) {
        char *t = r->resp_text + (size_t)i * ((size_t)c->max_new + 1);
        for (j = 0; j < r->seqs[i].n_out; j++) t[j] = (char)r->seqs[i].out[j];
        t[r->seqs[i].n_out] = 0;
        r->resp_len[i] = r->seqs[i].n_out;
    }
    st = score(r->r, prompt, r->resp, r->resp_len, c->n_candidates, user, &r->err);
    if (st != MOE_OK) return st;
    for (i = 0; i < c->n_candidates * c->k; i++)
        if (!isfinite(r->r[i])) return moe_err_set(&r->err, MOE_ERR_NUMERIC, "the scorer gave candidate %d a non-finite objective %d", i / c->k, i % c->k);
    st = rwd_dpa_best_of_n(&best, v, r->r, (size_t)c->n_candidates, c->k, &r->err);
    if (st != MOE_OK) return st;
    r->best = (int)best;
    return MOE_OK;
}

RWD__IMPL void rwd_rsf_clear(rwd_rsf *r) {
    if (r) r->n_kept = 0;
}

RWD__IMPL moe_status rwd_rsf_keep(rwd_rsf *r, int i) {
    int *t, j, len;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (r->best < 0) return moe_err_set(&r->err, MOE_ERR_STATE, "no candidates to keep: call rwd_rsf_sample first");
    if (i < 0 || i >= r->cfg.n_candidates) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "candidate %d is outside [0, %d)", i, r->cfg.n_candidates);
    if (r->resp_len[i] < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "candidate %d is empty: there is no response byte to learn from", i);
    if (r->n_kept >= r->cfg.max_prompts) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is full (max_prompts = %d)", r->cfg.max_prompts);
    t = r->kept_tok + (size_t)r->n_kept * (size_t)r->seq_cap;
    len = r->n_prompt + r->resp_len[i];
    memcpy(t, r->prompt_tok, sizeof(int) * (size_t)r->n_prompt);
    for (j = 0; j < r->resp_len[i]; j++) t[r->n_prompt + j] = (unsigned char)r->resp[i][j];
    r->kept_len[r->n_kept] = len;
    r->kept_prompt[r->n_kept] = r->n_prompt;
    memcpy(r->kept_r + (size_t)r->n_kept * (size_t)r->cfg.k, r->r + (size_t)i * (size_t)r->cfg.k, sizeof(double) * (size_t)r->cfg.k);
    r->n_kept++;
    return MOE_OK;
}

/* the batch of kept sequences idx[0..B): inputs t[0..len-1), targets t[1..len) with -1 on the
   prompt's bytes (no loss there) and on padding; returns T, the longest input */
static int rwd__rsf_batch(rwd_rsf *r, const int *idx, int B, int *targets_count) {
    int b, t, T = 1, cnt = 0;
    for (b = 0; b < B; b++)
        if (r->kept_len[idx[b]] - 1 > T) T = r->kept_len[idx[b]] - 1;
    for (b = 0; b < B; b++) {
        const int *s = r->kept_tok + (size_t)idx[b] * (size_t)r->seq_cap;
        int len = r->kept_len[idx[b]], np = r->kept_prompt[idx[b]];
        for (t = 0; t < T; t++) {
            int in_seq = t + 1 < len;
            r->in[b * T + t] = in_seq ? s[t] : 0;
            r->tg[b * T + t] = in_seq && t + 1 >= np ? s[t + 1] : -1;
            cnt += in_seq && t + 1 >= np;
        }
    }
    *targets_count = cnt;
    return T;
}

RWD__IMPL moe_status rwd_rsf_kept_loss(rwd_rsf *r, double *loss) {
    double sum = 0.0;
    long long count = 0;
    int i, b;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (!loss) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_kept_loss needs an output");
    if (r->n_kept < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is empty: no response to measure");
    for (i = 0; i < r->n_kept; i += r->m->max_B) {
        int B = r->n_kept - i < r->m->max_B ? r->n_kept - i : r->m->max_B, cnt, T;
        for (b = 0; b < B; b++) r->order[b] = i + b; /* order is scratch here */
        T = rwd__rsf_batch(r, r->order, B, &cnt);
        st = moe_model_forward(r->m, r->in, r->tg, B, T, NULL);
        if (st != MOE_OK) {
            r->err = r->m->err;
            return st;
        }
        sum += r->m->loss * cnt; /* the forward's mean over its counted targets */
        count += cnt;
    }
    *loss = count > 0 ? sum / (double)count : 0.0;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_finetune(rwd_rsf *r, int epochs) {
    int e, i;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (epochs < 0) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "epochs must be >= 0, not %d", epochs);
    if (r->n_kept < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is empty: nothing to fine-tune on");
    for (e = 0; e < epochs; e++) {
        for (i = 0; i < r->n_kept; i++) r->order[i] = i;
        for (i = r->n_kept - 1; i > 0; i--) { /* Fisher-Yates */
            int j = moe_rng_below(&r->rng, i + 1), t = r->order[i];
            r->order[i] = r->order[j];
            r->order[j] = t;
        }
        for (i = 0; i < r->n_kept; i += r->m->max_B) {
            int B = r->n_kept - i < r->m->max_B ? r->n_kept - i : r->m->max_B, cnt, T;
            T = rwd__rsf_batch(r, r->order + i, B, &cnt);
            if (cnt == 0) continue;
            moe_store_zero_grad(&r->m->S);
            if ((st = moe_model_forward(r->m, r->in, r->tg, B, T, NULL)) != MOE_OK ||
                (st = moe_model_backward(r->m, 1.0f)) != MOE_OK) {
                r->err = r->m->err;
                return st;
            }
            if (r->cfg.grad_clip > 0.0f) moe_clip_grad_norm(&r->m->S, r->cfg.grad_clip);
            if ((st = moe_adamw_step(&r->m->S, &r->cfg.adamw, r->cfg.lr, ++r->step)) != MOE_OK)
                return moe_err_set(&r->err, st, "the AdamW step failed");
        }
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_round(rwd_rsf *r, const char *const *prompts, const double *dirs, int n_prompts,
                                   rwd_rsf_score_fn score, void *user, rwd_rsf_stats *stats) {
    rwd_rsf_stats s;
    int i, j, k;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    k = r->cfg.k;
    memset(&s, 0, sizeof s);
    if (!prompts || !dirs || n_prompts < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an RSF round needs at least one prompt with its direction");
    if (n_prompts > r->cfg.max_prompts) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "%d prompts are more than max_prompts = %d", n_prompts, r->cfg.max_prompts);
    for (i = 0; i < n_prompts; i++) {
        if (!prompts[i]) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "prompt %d is NULL", i);
        if ((st = rwd__rsf_check_dir(r, dirs + (size_t)i * (size_t)k)) != MOE_OK) return st;
    }
    rwd_rsf_clear(r);
    for (i = 0; i < n_prompts; i++) {
        const double *v = dirs + (size_t)i * (size_t)k;
        if ((st = rwd_rsf_sample(r, prompts[i], v, score, user)) != MOE_OK) return st;
        for (j = 0; j < r->cfg.n_candidates; j++) s.mean_all += rwd_dpa_scalarize(v, r->r + (size_t)j * (size_t)k, k);
        s.mean_kept += rwd_dpa_scalarize(v, r->r + (size_t)r->best * (size_t)k, k);
        if (r->resp_len[r->best] > 0 && (st = rwd_rsf_keep(r, r->best)) != MOE_OK) return st;
    }
    s.n_prompts = n_prompts;
    s.mean_all /= (double)n_prompts * r->cfg.n_candidates;
    s.mean_kept /= (double)n_prompts;
    if (r->n_kept > 0) {
        if ((st = rwd_rsf_kept_loss(r, &s.loss_before)) != MOE_OK) return st;
        if ((st = rwd_rsf_finetune(r, r->cfg.epochs)) != MOE_OK) return st;
        if ((st = rwd_rsf_kept_loss(r, &s.loss_after)) != MOE_OK) return st;
    }
    if (stats) *stats = s;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_head_scorer_init(rwd_rsf_head_scorer *s, const rwd_featurizer *f, rwd_head *heads,
                                              int n_heads, const moe_store *store, double length_scale,
                                              moe_err *err) {
    int j;
    if (!s) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_rsf_head_scorer_init needs a scorer");
    memset(s, 0, sizeof *s);
    if (!f || n_heads < 0 || (n_heads > 0 && (!heads || !store))) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head scorer needs a featurizer and, for n_heads > 0, heads in a store");
    if (!(length_scale >= 0.0) || !isfinite(length_scale)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "length_scale must be finite and >= 0");
    if (n_heads + (length_scale > 0.0) < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head scorer needs at least one objective: a head or length_scale > 0");
    for (j = 0; j < n_heads; j++)
        if (heads[j].cfg.d_in != rwd_featurizer_width(f)) return moe_err_set(err, MOE_ERR_SHAPE, "head %d reads %d features, the featurizer gives %d", j, heads[j].cfg.d_in, rwd_featurizer_width(f));
    s->x = (float *)moe__calloc((size_t)rwd_featurizer_width(f), sizeof(float));
    if (!s->x) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the scorer's features");
    s->f = f;
    s->heads = heads;
    s->n_heads = n_heads;
    s->store = store;
    s->length_scale = length_scale;
    return MOE_OK;
}

RWD__IMPL void rwd_rsf_head_scorer_free(rwd_rsf_head_scorer *s) {
    if (s) MOE_FREE(s->x);
}

RWD__IMPL moe_status rwd_rsf_head_score(double *r, const char *prompt, const char *const *resp, const int *len, int n,
                                        void *user, moe_err *err) {
    rwd_rsf_head_scorer *s = (rwd_rsf_head_scorer *)user;
    int i, j, k;
    if (!s || !s->x || !r || !resp || !len || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_rsf_head_score needs its scorer, outputs and responses");
    k = s->n_heads + (s->length_scale > 0.0);
    for (i = 0; i < n; i++) {
        if (s->n_heads > 0) rwd_featurize(s->x, s->f, prompt, resp[i]);
        for (j = 0; j < s->n_heads; j++) rwd_head_score(&s->heads[j], s->store, r + (size_t)i * (size_t)k + j, s->x, 1);
        if (s->length_scale > 0.0) r[(size_t)i * (size_t)k + s->n_heads] = (double)rwd_utf8_length(resp[i], (size_t)len[i]) / s->length_scale;
    }
    return MOE_OK;
}
