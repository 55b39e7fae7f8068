/* ============================================================================================
   >>moe:core  status codes, errors, allocator, RNG
   ============================================================================================ */

/* One X-macro list gives the enum and its strings. */
#define MOE__STATUS_LIST(X)                                                   \
    X(MOE_OK, 0, "ok")                                                        \
    X(MOE_ERR_INVALID_ARG, -1, "invalid argument")                            \
    X(MOE_ERR_SHAPE, -2, "shape mismatch")                                    \
    X(MOE_ERR_NOMEM, -3, "out of memory")                                     \
    X(MOE_ERR_IO, -4, "file input/output error")                              \
    X(MOE_ERR_FORMAT, -5, "bad file format")                                  \
    X(MOE_ERR_STATE, -6, "call out of order")                                 \
    X(MOE_ERR_NO_DEVICE, -7, "no compute device")                             \
    X(MOE_ERR_UNSUPPORTED, -8, "unsupported on this platform")                \
    X(MOE_ERR_NUMERIC, -9, "non-finite number")

#define MOE__STATUS_ENUM(name, value, text) name = value,
typedef enum moe_status { MOE__STATUS_LIST(MOE__STATUS_ENUM) MOE__STATUS_LAST = -10 } moe_status;
#undef MOE__STATUS_ENUM

/* The sentence that goes with a status. Lives in the caller's object, never in a global. */
typedef struct moe_err {
    moe_status status; /* last status set                                   */
    char msg[256];     /* human sentence, "" when status == MOE_OK           */
} moe_err;

MOEDEF const char *moe_status_string(moe_status s);
/* sets e->status and e->msg (printf format); returns s; e may be NULL */
MOEDEF moe_status moe_err_set(moe_err *e, moe_status s, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* PCG32 random numbers; the whole state is two integers, so checkpoints can store it. */
typedef struct moe_rng {
    uint64_t state;
    uint64_t inc;
} moe_rng;

MOEDEF void moe_rng_seed(moe_rng *r, uint64_t seed);
MOEDEF uint32_t moe_rng_u32(moe_rng *r);
MOEDEF float moe_rng_uniform(moe_rng *r);  /* [0, 1), 24 random bits                 */
MOEDEF float moe_rng_normal(moe_rng *r);   /* N(0,1), Box-Muller in double, no cache  */
MOEDEF int moe_rng_below(moe_rng *r, int n); /* uniform integer in [0, n), unbiased    */

MOEDEF int moe_num_threads(void); /* threads an OpenMP loop would use here, 1 without OpenMP */

/* Scratch memory planned once (ggml's work buffer, miniaudio's heap-size queries). The kernels
   that need scratch (GEMM packing, experts, attention, the GRU) take a moe_work as their last
   argument and say how much with a query, e.g. moe_matmul_work_floats(M, K, N, nthreads).
   Size one workspace as the largest of the calls it will serve, allocate it at init, pass it
   to every call: they then never allocate. NULL instead: the kernel allocates and frees its
   own for that call and returns MOE_ERR_NOMEM when it cannot. A workspace smaller than a call
   needs makes the call return MOE_ERR_INVALID_ARG (its outputs untouched). */
typedef struct moe_work {
    float *buf;    /* (floats) scratch; each call overwrites it from the start              */
    size_t floats; /* capacity of buf                                                       */
    int nthreads;  /* threads the per-thread regions are sized for: a call given this
                      workspace runs at most that many (results never depend on the count) */
    const struct moe_wpack *pack; /* weights packed ahead for products of few rows (cached
                      decoding sets it for its calls, >>moe:generate); NULL = none           */
} moe_work;

/* buf for `floats` floats (none when 0) and per-thread regions for nthreads (< 1: 1) */
MOEDEF moe_status moe_work_alloc(moe_work *w, size_t floats, int nthreads);
MOEDEF void moe_work_free(moe_work *w); /* safe on a zeroed or freed workspace */
MOEDEF double moe_time_seconds(void); /* monotonic wall clock (seconds), for benchmarks       */

/* @implementation */
/* ============================================================================================
   >>moe:core
   ============================================================================================ */

MOE__IMPL const char *moe_status_string(moe_status s) {
#define MOE__STATUS_CASE(name, value, text) \
    case name: return text;
    switch (s) {
        MOE__STATUS_LIST(MOE__STATUS_CASE)
    default: return "unknown status";
    }
#undef MOE__STATUS_CASE
}

MOE__IMPL moe_status moe_err_set(moe_err *e, moe_status s, const char *fmt, ...) {
    if (e) {
        va_list ap;
        e->status = s;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return s;
}

static void *moe__calloc(size_t count, size_t size) {
    void *p;
    if (count == 0 || size == 0) count = size = 1;
    if (count > (size_t)-1 / size) return NULL;
    p = MOE_MALLOC(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

/* count * size zeroed bytes; from 2 MB up, aligned to 2 MB and, on Linux, marked for
   transparent huge pages (MADV_HUGEPAGE; the system's default is often "madvise"): a buffer
   streamed on every token (decoding's packed weights, the KV cache) then costs one TLB entry
   per 2 MB, not per 4 KB (batch-1 generation of the demo model about 1.25x faster). *raw is
   what MOE_FREE takes. */
#define MOE__HUGE_PAGE ((size_t)1 << 21)
static void *moe__calloc_huge(size_t count, size_t size, void **raw) {
    size_t n;
    unsigned char *p;
    *raw = NULL;
    if (count == 0 || size == 0) count = size = 1;
    if (count > ((size_t)-1 - MOE__HUGE_PAGE) / size) return NULL;
    n = count * size;
    if (n < MOE__HUGE_PAGE) return *raw = moe__calloc(n, 1);
    *raw = MOE_MALLOC(n + MOE__HUGE_PAGE);
    if (!*raw) return NULL;
    p = (unsigned char *)*raw + (MOE__HUGE_PAGE - (uintptr_t)*raw % MOE__HUGE_PAGE) % MOE__HUGE_PAGE;
#ifdef MOE__HAVE_MADVISE
    (void)madvise(p, n / MOE__HUGE_PAGE * MOE__HUGE_PAGE, MOE__MADV_HUGEPAGE); /* advice: failure is harmless */
#endif
    memset(p, 0, n); /* before first use, so the pages come in huge */
    return p;
}

static int moe__ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

MOE__IMPL void moe_rng_seed(moe_rng *r, uint64_t seed) {
    /* PCG32 seeding as in pcg32_srandom_r with a fixed stream */
    r->state = 0u;
    r->inc = (0xda3e39cb94b95bdbULL << 1u) | 1u;
    (void)moe_rng_u32(r);
    r->state += seed;
    (void)moe_rng_u32(r);
}

MOE__IMPL uint32_t moe_rng_u32(moe_rng *r) {
    uint64_t old = r->state;
    uint32_t xorshifted, rot;
    r->state = old * 6364136223846793005ULL + r->inc;
    xorshifted = (uint32_t)(((old >> 18u) ^ old) >> 27u);
    rot = (uint32_t)(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((32u - rot) & 31u));
}

MOE__IMPL float moe_rng_uniform(moe_rng *r) {
    return (float)(moe_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

MOE__IMPL float moe_rng_normal(moe_rng *r) {
    /* u1 in (0, 1] so the log is finite; 53-bit-free but deterministic and plenty for init */
    double u1 = ((double)(moe_rng_u32(r) >> 8) + 1.0) / 16777216.0;
    double u2 = (double)(moe_rng_u32(r) >> 8) / 16777216.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

MOE__IMPL int moe_rng_below(moe_rng *r, int n) {
    uint32_t bound, x;
    if (n <= 1) return 0;
    bound = (uint32_t)(-(uint32_t)n) % (uint32_t)n; /* rejection threshold: 2^32 mod n */
    do x = moe_rng_u32(r);
    while (x < bound);
    return (int)(x % (uint32_t)n);
}

MOE__IMPL int moe_num_threads(void) {
#if MOE__OMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

MOE__IMPL moe_status moe_work_alloc(moe_work *w, size_t floats, int nthreads) {
    w->buf = NULL;
    w->floats = 0;
    w->nthreads = nthreads < 1 ? 1 : nthreads;
    w->pack = NULL;
    if (floats == 0) return MOE_OK;
    if (floats > (size_t)-1 / sizeof(float)) return MOE_ERR_NOMEM;
    w->buf = (float *)MOE_MALLOC(floats * sizeof(float));
    if (!w->buf) return MOE_ERR_NOMEM;
    w->floats = floats;
    return MOE_OK;
}

MOE__IMPL void moe_work_free(moe_work *w) {
    MOE_FREE(w->buf);
    w->buf = NULL;
    w->floats = 0;
}

/* Threads a call may use: this machine's, at most the workspace's plan. */
static int moe__work_threads(const moe_work *w) {
    int n = moe_num_threads();
    return w && w->nthreads < n ? (w->nthreads < 1 ? 1 : w->nthreads) : n;
}

/* The scratch a call runs on: the caller's workspace when it holds `need` floats, else (no
   workspace given) a fresh allocation in *own that the call frees. NULL with *st set when
   neither works. */
static float *moe__work_get(moe_work *w, size_t need, float **own, moe_status *st) {
    *own = NULL;
    *st = MOE_OK;
    if (w) {
        if (need <= w->floats) return w->buf;
        *st = MOE_ERR_INVALID_ARG;
        return NULL;
    }
    *own = need ? (float *)MOE_MALLOC(need * sizeof(float)) : NULL;
    if (need && !*own) *st = MOE_ERR_NOMEM;
    return *own;
}

MOE__IMPL double moe_time_seconds(void) {
#if MOE__OMP
    return omp_get_wtime();
#elif defined(CLOCK_MONOTONIC) && defined(_POSIX_C_SOURCE)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

