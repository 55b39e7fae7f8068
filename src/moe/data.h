/* ============================================================================================
   >>moe:data  batches of byte windows from one or several sources
   ============================================================================================
   Each row of a batch picks a source with probability proportional to its length, then a
   uniformly random window. The whole position is the RNG state plus a batch counter, so a
   checkpoint stores it in a few bytes and resuming replays the same batches. */

typedef struct moe_loader {
    int n_sources;
    const unsigned char *const *data; /* (n_sources) borrowed byte buffers          */
    const size_t *len;                /* (n_sources)                                */
    moe_rng rng;
    long long batches;                /* batches drawn so far                       */
} moe_loader;

typedef struct moe_loader_state { /* what a checkpoint stores */
    moe_rng rng;
    long long batches;
} moe_loader_state;

MOEDEF moe_status moe_loader_init(moe_loader *ld, const unsigned char *const *data, const size_t *len,
                                  int n_sources, int T, uint64_t seed, moe_err *err);
/* inputs, targets (B, T); source (B) which source each row came from (may be NULL) */
MOEDEF void moe_loader_next(moe_loader *ld, int *inputs, int *targets, int *source, int B, int T);
/* Evaluation: consecutive non-overlapping windows of one source. Returns the rows filled
   (< B at the end); start is the byte offset, advanced past what was used. */
MOEDEF int moe_loader_sequential(const unsigned char *data, size_t len, size_t *start, int *inputs,
                                 int *targets, int B, int T);

/* @implementation */
/* ============================================================================================
   >>moe:data
   ============================================================================================ */

MOE__IMPL moe_status moe_loader_init(moe_loader *ld, const unsigned char *const *data, const size_t *len,
                                     int n_sources, int T, uint64_t seed, moe_err *err) {
    int i;
    memset(ld, 0, sizeof *ld);
    if (!data || !len || n_sources <= 0 || T <= 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "loader needs at least one source and T >= 1");
    for (i = 0; i < n_sources; i++)
        if (!data[i] || len[i] < (size_t)T + 1)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "source %d has %zu bytes; a window needs T + 1 = %d", i, data[i] ? len[i] : (size_t)0, T + 1);
    ld->n_sources = n_sources;
    ld->data = data;
    ld->len = len;
    moe_rng_seed(&ld->rng, seed);
    return MOE_OK;
}

MOE__IMPL void moe_loader_next(moe_loader *ld, int *inputs, int *targets, int *source, int B, int T) {
    int b, t, s;
    double total = 0.0;
    for (s = 0; s < ld->n_sources; s++) total += (double)(ld->len[s] - (size_t)T);
    for (b = 0; b < B; b++) {
        /* a source in proportion to its windows, then a window: two draws per row */
        double u = (double)moe_rng_u32(&ld->rng) / 4294967296.0 * total, acc = 0.0;
        size_t off, span;
        const unsigned char *p;
        for (s = 0; s + 1 < ld->n_sources; s++) {
            acc += (double)(ld->len[s] - (size_t)T);
            if (u < acc) break;
        }
        span = ld->len[s] - (size_t)T;
        off = (size_t)(((uint64_t)moe_rng_u32(&ld->rng) << 32 | moe_rng_u32(&ld->rng)) % span);
        p = ld->data[s] + off;
        for (t = 0; t < T; t++) {
            inputs[(size_t)b * T + t] = p[t];
            targets[(size_t)b * T + t] = p[t + 1];
        }
        if (source) source[b] = s;
    }
    ld->batches++;
}

MOE__IMPL int moe_loader_sequential(const unsigned char *data, size_t len, size_t *start, int *inputs,
                                    int *targets, int B, int T) {
    int b, t;
    for (b = 0; b < B; b++) {
        const unsigned char *p = data + *start;
        if (*start + (size_t)T + 1 > len) break;
        for (t = 0; t < T; t++) {
            inputs[(size_t)b * T + t] = p[t];
            targets[(size_t)b * T + t] = p[t + 1];
        }
        *start += (size_t)T;
    }
    return b;
}

