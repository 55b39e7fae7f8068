/* ============================================================================================
   >>moe:optim  AdamW, gradient clipping, learning-rate schedule
   ============================================================================================ */

typedef struct moe_adamw_config {
    float beta1;        /* 0.9                                                            */
    float beta2;        /* 0.999                                                          */
    float eps;          /* 1e-8                                                           */
    float weight_decay; /* 0.01, decoupled (Loshchilov & Hutter), only MOE_TENSOR_DECAY    */
} moe_adamw_config;

MOEDEF moe_adamw_config moe_adamw_config_default(void);
/* One AdamW update of every parameter, PyTorch's torch.optim.AdamW arithmetic (bias-corrected,
   decay applied as p *= 1 - lr*wd before the Adam step). step counts from 1. */
MOEDEF moe_status moe_adamw_step(moe_store *s, const moe_adamw_config *c, float lr, long long step);
/* Global L2 norm of all gradients (double sum in a fixed order); if max_norm > 0 and the norm
   exceeds it, scales every gradient by max_norm / (norm + 1e-6) as torch's clip_grad_norm_.
   Returns the norm before clipping. */
MOEDEF float moe_clip_grad_norm(moe_store *s, float max_norm);
/* Linear warm-up over `warmup` steps to lr_max, then cosine decay to lr_min at `total`. */
MOEDEF float moe_lr_cosine(long long step, long long warmup, long long total, float lr_max, float lr_min);

/* @implementation */
/* ============================================================================================
   >>moe:optim
   ============================================================================================ */

MOE__IMPL moe_adamw_config moe_adamw_config_default(void) {
    moe_adamw_config c;
    c.beta1 = 0.9f; c.beta2 = 0.999f; c.eps = 1e-8f; c.weight_decay = 0.01f;
    return c;
}

/* AdamW over n consecutive elements of one tensor. sqrtf may set errno, so C compilers keep
   a loop that calls it scalar (a square root and two divisions per element: the whole step
   of a 14M-parameter model then took 9% of a training step). With AVX-512 or AVX the same
   operations, in the same order, run on whole vectors (MOE_NO_SIMD turns that off); the
   remainder runs the portable loop. Callers hand out fixed spans, so which elements take
   which path never depends on the thread count. */
typedef struct { float decay, one_m_b1, b2, one_m_b2, bc2_sqrt, eps, step_size; } moe__adamw_consts;

#if !defined(MOE_NO_SIMD) && (defined(__AVX512F__) || defined(__AVX__))
#include <immintrin.h>
#if defined(__AVX512F__)
#define MOE__VW 16
#define MOE__VF __m512
#define MOE__V(op) _mm512_##op##_ps
/* the masked form: g++ 12 flags the unmasked one's internal undefined vector (-Wmaybe-uninitialized) */
#define MOE__VSQRT(x) _mm512_maskz_sqrt_ps((__mmask16)0xFFFF, x)
#else
#define MOE__VW 8
#define MOE__VF __m256
#define MOE__V(op) _mm256_##op##_ps
#define MOE__VSQRT(x) _mm256_sqrt_ps(x)
#endif
#endif

static void moe__adamw_span(float *MOE_RESTRICT p, const float *MOE_RESTRICT g, float *MOE_RESTRICT m,
                            float *MOE_RESTRICT v, size_t n, const moe__adamw_consts *k) {
    size_t i = 0;
#ifdef MOE__VW
    MOE__VF decay = MOE__V(set1)(k->decay), one_m_b1 = MOE__V(set1)(k->one_m_b1), b2 = MOE__V(set1)(k->b2);
    MOE__VF one_m_b2 = MOE__V(set1)(k->one_m_b2), bc2 = MOE__V(set1)(k->bc2_sqrt), eps = MOE__V(set1)(k->eps);
    MOE__VF ss = MOE__V(set1)(k->step_size);
    for (; i + MOE__VW <= n; i += MOE__VW) {
        MOE__VF gi = MOE__V(loadu)(g + i), mi = MOE__V(loadu)(m + i), vi = MOE__V(loadu)(v + i);
        MOE__VF pi = MOE__V(mul)(MOE__V(loadu)(p + i), decay), denom;
        mi = MOE__V(add)(mi, MOE__V(mul)(MOE__V(sub)(gi, mi), one_m_b1)); /* torch's lerp */
        vi = MOE__V(add)(MOE__V(mul)(vi, b2), MOE__V(mul)(MOE__V(mul)(one_m_b2, gi), gi));
        denom = MOE__V(add)(MOE__V(div)(MOE__VSQRT(vi), bc2), eps);
        pi = MOE__V(sub)(pi, MOE__V(mul)(ss, MOE__V(div)(mi, denom)));
        MOE__V(storeu)(m + i, mi);
        MOE__V(storeu)(v + i, vi);
        MOE__V(storeu)(p + i, pi);
    }
#endif
    for (; i < n; i++) {
        float gi = g[i], denom;
        p[i] *= k->decay;
        m[i] += (gi - m[i]) * k->one_m_b1; /* torch's lerp */
        v[i] = v[i] * k->b2 + k->one_m_b2 * gi * gi;
        denom = sqrtf(v[i]) / k->bc2_sqrt + k->eps;
        p[i] -= k->step_size * (m[i] / denom);
    }
}

/* the spans the step hands out: whole vectors, a few per thread for the smallest tensors */
#define MOE__ADAMW_SPAN 4096

/* the step's constants (decay is set per tensor); the device step uses the same */
static moe__adamw_consts moe__adamw_consts_for(const moe_adamw_config *c, float lr, long long step) {
    moe__adamw_consts k;
    /* torch computes the corrections in double (Python floats) then uses them as scalars */
    double bc1 = (double)(float)(1.0 - pow((double)c->beta1, (double)step));
    k.decay = 1.0f;
    k.bc2_sqrt = (float)sqrt(1.0 - pow((double)c->beta2, (double)step));
    k.step_size = (float)((double)lr / bc1);
    k.one_m_b1 = 1.0f - c->beta1;
    k.b2 = c->beta2;
    k.one_m_b2 = 1.0f - c->beta2;
    k.eps = c->eps;
    return k;
}

/* checks the store and step, then the step's constants; the masked step (>>moe:mask) shares it */
static moe_status moe__adamw_prepare(moe_store *s, const moe_adamw_config *c, float lr, long long step,
                                     moe__adamw_consts *k) {
    if (!s->adam_m || !s->adam_v) return moe_err_set(&s->err, MOE_ERR_STATE, "AdamW step on a store allocated without optimizer moments");
    if (step < 1) return moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "AdamW step counts from 1, got %lld", step);
    *k = moe__adamw_consts_for(c, lr, step);
    return MOE_OK;
}

/* The step over the store's spans with prepared constants; keep (numel) or NULL: a span is cut
   into its runs of kept parameters (the masked step, >>moe:mask), each run getting the same
   per-element arithmetic as the unmasked step */
static void moe__adamw_apply(moe_store *s, const moe_adamw_config *c, float lr, const moe__adamw_consts *k,
                             const unsigned char *keep) {
    /* one parallel region for all tensors, no barrier between them (their spans are disjoint) */
    MOE__OMP_PARALLEL_IF(s->numel > 32768)
    {
        int ti;
        for (ti = 0; ti < s->count; ti++) {
            const moe_tensor *t = &s->tensors[ti];
            moe__adamw_consts kt = *k;
            long long b, nb = ((long long)t->numel + MOE__ADAMW_SPAN - 1) / MOE__ADAMW_SPAN;
            kt.decay = (t->flags & MOE_TENSOR_DECAY) ? 1.0f - lr * c->weight_decay : 1.0f;
            MOE__OMP_FOR_NOWAIT
            for (b = 0; b < nb; b++) {
                size_t o = t->offset + (size_t)b * MOE__ADAMW_SPAN, left = t->numel - (size_t)b * MOE__ADAMW_SPAN;
                size_t end = o + (left < MOE__ADAMW_SPAN ? left : MOE__ADAMW_SPAN), i = o, j;
                if (!keep) {
                    moe__adamw_span(s->params + o, s->grads + o, s->adam_m + o, s->adam_v + o, end - o, &kt);
                    continue;
                }
                while (i < end) {
                    while (i < end && !keep[i]) i++;
                    for (j = i; j < end && keep[j]; j++) {}
                    if (j > i) moe__adamw_span(s->params + i, s->grads + i, s->adam_m + i, s->adam_v + i, j - i, &kt);
                    i = j;
                }
            }
        }
    }
}

MOE__IMPL moe_status moe_adamw_step(moe_store *s, const moe_adamw_config *c, float lr, long long step) {
    moe__adamw_consts k;
    moe_status st = moe__adamw_prepare(s, c, lr, step, &k);
    if (st != MOE_OK) return st;
    moe__adamw_apply(s, c, lr, &k, NULL);
    return MOE_OK;
}

MOE__IMPL float moe_clip_grad_norm(moe_store *s, float max_norm) {
    /* fixed chunks summed in order: the same norm for any thread count. The chunks' sums go
       through a partial-sum array on the stack, ROUND chunks at a time (no allocation). */
    enum { CHUNK = 1 << 14, ROUND = 256 };
    long long nchunk = (long long)((s->numel + CHUNK - 1) / CHUNK), c0;
    double part[ROUND], total = 0.0;
    float norm;
    for (c0 = 0; c0 < nchunk; c0 += ROUND) {
        long long n = nchunk - c0 < (long long)ROUND ? nchunk - c0 : (long long)ROUND, c;
        MOE_OMP_FOR_IF(n > 4)
        for (c = 0; c < n; c++) {
            size_t i, lo = (size_t)(c0 + c) * CHUNK, hi = lo + CHUNK < s->numel ? lo + CHUNK : s->numel;
            double acc = 0.0;
            for (i = lo; i < hi; i++) acc += (double)s->grads[i] * s->grads[i];
            part[c] = acc;
        }
        for (c = 0; c < n; c++) total += part[c];
    }
    norm = (float)sqrt(total);
    if (max_norm > 0.0f && norm > max_norm) {
        float scale = max_norm / (norm + 1e-6f);
        long long i, n = (long long)s->numel;
        MOE_OMP_FOR_IF(n > 32768)
        for (i = 0; i < n; i++) s->grads[i] *= scale;
    }
    return norm;
}

MOE__IMPL float moe_lr_cosine(long long step, long long warmup, long long total, float lr_max, float lr_min) {
    double progress;
    if (warmup > 0 && step < warmup) return lr_max * (float)(step + 1) / (float)warmup;
    if (total <= warmup || step >= total) return lr_min;
    progress = (double)(step - warmup) / (double)(total - warmup);
    return (float)(lr_min + 0.5 * (lr_max - lr_min) * (1.0 + cos(3.141592653589793 * progress)));
}

