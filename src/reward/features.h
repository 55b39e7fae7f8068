/* ============================================================================================
   >>rwd:features  hashed word/bigram features of text + explicit length features
   ============================================================================================
   out = [ hashed bag of words and word bigrams of the response (and optionally of the prompt,
   in its own hash namespace), scaled by 1/sqrt(#tokens) so its norm does not grow with length |
   log(1 + len), len / 1000 ] with len = code points of the response: this header's stand-in
   for a language model's input, so that the PoE bias expert of Shen et al. (arXiv 2310.05199),
   which sees token embeddings there, can see length here (>>rwd:poe). Words are
   maximal runs of ASCII letters/digits (lower-cased) and non-ASCII bytes. Signed hashing:
   each feature adds +1 or -1 by a hash bit, so collisions cancel on average. */

typedef struct rwd_featurizer {
    int dim;             /* hashed buckets; 4096                                        */
    int bigrams;         /* also hash word bigrams; 1                                   */
    int prompt_words;    /* also hash the prompt's words; 0 (a linear head cancels them) */
    int signed_hash;     /* +-1 by a hash bit; 1                                        */
    int length_features; /* append the 2 length features; 1                             */
    uint32_t seed;       /* hash seed; 0                                                */
} rwd_featurizer;

RWDDEF rwd_featurizer rwd_featurizer_default(void);
RWDDEF int rwd_featurizer_width(const rwd_featurizer *f); /* dim + 2 * length_features */
RWDDEF void rwd_length_features(float *out2, double len); /* log(1 + len), len / 1000   */
/* out (width) = features of (prompt, response); prompt may be NULL */
RWDDEF void rwd_featurize(float *out, const rwd_featurizer *f, const char *prompt, const char *response);
/* x_w, x_l (n, width) for every pair; len_w, len_l (n) code points (either may be NULL).
   Parallel over pairs. */
RWDDEF moe_status rwd_featurize_pairs(float *x_w, float *x_l, double *len_w, double *len_l,
                                      const rwd_featurizer *f, const rwd_text_pairs *p, moe_err *err);
/* The bridge to moe.h's language model: out (d) = the mean over the response's bytes of the
   model's final normalised hidden states (m->lnf), the prompt's bytes read as context before
   them; only the last max_T bytes fit the window, so a long prompt is cut from the left and a
   response longer than max_T keeps its last max_T bytes. The model must have max_B >= 1 and a
   byte vocabulary (256). Calls moe_model_forward: the model's last batch is overwritten. */
RWDDEF moe_status rwd_lm_features(float *out, moe_model *m, const char *prompt, const char *response, moe_err *err);
/* x_w, x_l (n, d): rwd_lm_features of every pair (serial: one model, one forward at a time) */
RWDDEF moe_status rwd_lm_featurize_pairs(float *x_w, float *x_l, moe_model *m, const rwd_text_pairs *p, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:features
   ============================================================================================ */

RWD__IMPL rwd_featurizer rwd_featurizer_default(void) {
    rwd_featurizer f;
    f.dim = 4096;
    f.bigrams = 1;
    f.prompt_words = 0;
    f.signed_hash = 1;
    f.length_features = 1;
    f.seed = 0;
    return f;
}

RWD__IMPL int rwd_featurizer_width(const rwd_featurizer *f) { return f->dim + (f->length_features ? 2 : 0); }

RWD__IMPL void rwd_length_features(float *out2, double len) {
    out2[0] = (float)log1p(len);
    out2[1] = (float)(len / 1000.0);
}

/* murmur3's finaliser: spreads the FNV hash so bucket (low bits) and sign (top bit) are independent */
static uint32_t rwd__mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85ebca6bu;
    h ^= h >> 13; h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

static int rwd__word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c >= 0x80;
}

/* adds +-1 per word (and bigram) of text to out[0, dim); returns the number of words */
static size_t rwd__hash_words(float *out, const rwd_featurizer *f, const char *text, uint32_t space) {
    const unsigned char *s = (const unsigned char *)text;
    uint32_t prev = 0;
    size_t words = 0;
    int have_prev = 0;
    while (*s) {
        uint32_t h = 2166136261u ^ space, keys[2];
        int k, nk = 0;
        if (!rwd__word_byte(*s)) { s++; continue; }
        for (; *s && rwd__word_byte(*s); s++) { /* FNV-1a of the lower-cased word */
            unsigned char c = (*s >= 'A' && *s <= 'Z') ? (unsigned char)(*s + 32) : *s;
            h = (h ^ c) * 16777619u;
        }
        keys[nk++] = h;
        if (f->bigrams && have_prev) keys[nk++] = (prev * 0x9E3779B1u) ^ rwd__mix32(h + 0x632BE5ABu);
        for (k = 0; k < nk; k++) {
            uint32_t m = rwd__mix32(keys[k]);
            out[m % (uint32_t)f->dim] += (f->signed_hash && (m >> 31)) ? -1.0f : 1.0f;
        }
        prev = h;
        have_prev = 1;
        words++;
    }
    return words;
}

RWD__IMPL void rwd_featurize(float *out, const rwd_featurizer *f, const char *prompt, const char *response) {
    size_t words, i;
    memset(out, 0, (size_t)rwd_featurizer_width(f) * sizeof(float));
    words = rwd__hash_words(out, f, response, f->seed);
    if (f->prompt_words && prompt) words += rwd__hash_words(out, f, prompt, f->seed ^ 0x5bd1e995u);
    if (words > 0) {
        float scale = (float)(1.0 / sqrt((double)words));
        for (i = 0; i < (size_t)f->dim; i++) out[i] *= scale;
    }
    if (f->length_features) rwd_length_features(out + f->dim, (double)rwd_utf8_length(response, strlen(response)));
}

RWD__IMPL moe_status rwd_featurize_pairs(float *x_w, float *x_l, double *len_w, double *len_l,
                                         const rwd_featurizer *f, const rwd_text_pairs *p, moe_err *err) {
    long long i, n = (long long)p->n;
    size_t w;
    if (!f || f->dim < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the featurizer needs dim >= 1");
    if (!x_w || !x_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_featurize_pairs needs output rows");
    w = (size_t)rwd_featurizer_width(f);
    MOE_OMP_FOR_IF(n > 64)
    for (i = 0; i < n; i++) {
        rwd_featurize(x_w + (size_t)i * w, f, p->prompt[i], p->chosen[i]);
        rwd_featurize(x_l + (size_t)i * w, f, p->prompt[i], p->rejected[i]);
        if (len_w) len_w[i] = (double)rwd_utf8_length(p->chosen[i], strlen(p->chosen[i]));
        if (len_l) len_l[i] = (double)rwd_utf8_length(p->rejected[i], strlen(p->rejected[i]));
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lm_features(float *out, moe_model *m, const char *prompt, const char *response, moe_err *err) {
    size_t lp = prompt ? strlen(prompt) : 0, lr, n, start, i, first;
    int T, d, *tok, t, j;
    moe_status st;
    if (!out || !m || !m->blocks || !response) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features needs an initialised model, a response and an output row");
    if (m->cfg.vocab < 256) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features reads bytes: the model's vocabulary is %d, not 256", m->cfg.vocab);
    lr = strlen(response);
    if (lr == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features: the response is empty");
    d = m->cfg.d;
    n = lp + lr;
    T = n < (size_t)m->max_T ? (int)n : m->max_T;
    start = n - (size_t)T;                          /* first byte inside the window      */
    first = lp > start ? lp - start : 0;            /* the response's first row in it    */
    tok = m->targets; /* (max_B max_T) ints that a forward without targets leaves alone: no allocation */
    for (t = 0; t < T; t++) {
        size_t k = start + (size_t)t;
        tok[t] = (unsigned char)(k < lp ? prompt[k] : response[k - lp]);
    }
    st = moe_model_forward(m, tok, NULL, 1, T, NULL);
    if (st != MOE_OK) return moe_err_set(err, st, "rwd_lm_features: %s", m->err.msg);
    for (j = 0; j < d; j++) {
        double acc = 0.0;
        for (i = first; i < (size_t)T; i++) acc += m->lnf[i * (size_t)d + (size_t)j];
        out[j] = (float)(acc / (double)((size_t)T - first));
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lm_featurize_pairs(float *x_w, float *x_l, moe_model *m, const rwd_text_pairs *p, moe_err *err) {
    size_t i;
    moe_status st;
    if (!x_w || !x_l || !p || !m) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_featurize_pairs needs output rows, a model and pairs");
    for (i = 0; i < p->n; i++) {
        if ((st = rwd_lm_features(x_w + i * (size_t)m->cfg.d, m, p->prompt[i], p->chosen[i], err)) != MOE_OK ||
            (st = rwd_lm_features(x_l + i * (size_t)m->cfg.d, m, p->prompt[i], p->rejected[i], err)) != MOE_OK)
            return moe_err_set(err, st, "pair %zu: %s", i, err ? err->msg : "");
    }
    return MOE_OK;
}

