/* ============================================================================================
   >>moe:attention  causal multi-head self-attention, rotary positions
   ============================================================================================
   qkv (B, T, 3d) holds q | k | v per token, heads of width hd = d / NH inside each.
   att (B, NH, T, T) keeps the softmax probabilities for backward (tiny models: T <= 1024).
   Probabilities above the diagonal are 0 (causal). Scale 1/sqrt(hd). */

/* work: moe_attention_work_floats(T, d, NH, threads) floats (per-thread tiles), or NULL (the
   call allocates its own; MOE_ERR_NOMEM when it cannot). */
MOEDEF moe_status moe_attention_forward(float *out, float *att, const float *qkv, int B, int T, int d, int NH,
                                        moe_work *work);
/* dqkv (B,T,3d) is OVERWRITTEN; dout (B,T,d) */
MOEDEF moe_status moe_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                         int B, int T, int d, int NH, moe_work *work);
/* scratch (floats) of moe_attention_forward and of moe_attention_backward for sequences of up
   to T tokens (any B), with per-thread regions for nthreads */
MOEDEF size_t moe_attention_work_floats(int T, int d, int NH, int nthreads);
/* The readable references of the two above (llm.c's attention_forward/backward: one query
   row at a time, plain loops, no threads, no allocation), same arguments and contract less the
   workspace; tests/test_kernels.c compares the blocked pair against them. */
MOEDEF void moe_attention_forward_naive(float *out, float *att, const float *qkv, int B, int T, int d,
                                        int NH);
MOEDEF void moe_attention_backward_naive(float *dqkv, const float *dout, const float *qkv,
                                         const float *att, int B, int T, int d, int NH);
/* Rotary positions (rotate-half pairing i, i + hd/2, as GPT-NeoX / HF LLaMA) applied in place
   to the q and k parts of qkv; inverse = 1 rotates backwards (the backward pass). cos_sin
   (T, hd/2, 2) from moe_rope_table. */
MOEDEF void moe_rope_apply(float *qkv, const float *cos_sin, int B, int T, int d, int NH, int inverse);
MOEDEF void moe_rope_table(float *cos_sin, int T, int hd, float theta);

/* @implementation */
/* ============================================================================================
   >>moe:attention
   ============================================================================================
   One task per (sequence, head) owns its slice of out / att / dqkv. Inside a task the rows
   (queries) go in blocks of MOE__ATT_RB and each block only computes the keys up to its last
   row (the causal triangle, rounded up to whole blocks); the keys' gradients go by key blocks
   over the queries at and after them. The products run on the GEMM's packed micro-kernel
   with one workspace region per thread; the block grid never depends on the thread count,
   so every element gets the same arithmetic however the tasks fall. */

#define MOE__ATT_RB 32 /* rows per query / key block: a multiple of MOE_GEMM_MR */

/* C (M, N) = op(A) (M, K) . B (K, N) (b_trans: B stored (N, K)), single-threaded, packing
   into the caller's workspace ws (MOE_GEMM_MC * MOE_GEMM_KC + moe__packed_b_floats(K, N)) */
static void moe__att_gemm(int M, int N, int K, const float *A, int lda, int a_trans, const float *B, int ldb,
                          int b_trans, float *C, int ldc, float *ws) {
    float *Bp = ws + (size_t)MOE_GEMM_MC * MOE_GEMM_KC;
    int npad = moe__round_up(N, MOE_GEMM_NR);
    moe__pack_b_panels(Bp, B, ldb, b_trans, K, N, 0, npad / MOE_GEMM_NR);
    moe__gemm_packed(M, N, K, A, lda, a_trans, Bp, npad, 0, C, ldc, 0, ws);
}

static size_t moe__att_ws_floats(int T, int hd) {
    size_t a = moe__packed_b_floats(hd, T), b = moe__packed_b_floats(T, hd);
    return (size_t)MOE_GEMM_MC * MOE_GEMM_KC + (a > b ? a : b);
}

/* row[0..n) = softmax(scale * row[0..n)) */
MOE__GEMM_FN void moe__att_softmax_row(float *MOE_RESTRICT row, int n, float scale) {
    float inv = 1.0f / moe__exp_lanes_inplace(row, n, moe__max_lanes(row, n), scale);
    int u;
    for (u = 0; u < n; u++) row[u] *= inv;
}

/* g[0..n) = p * (g - <g, p>) * scale: the softmax backward of one row */
MOE__GEMM_FN void moe__att_softmax_row_backward(float *MOE_RESTRICT g, const float *MOE_RESTRICT p, int n, float scale) {
    float acc[MOE__LANES], dot = 0.0f;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += g[u + j] * p[u + j];
    for (j = 0; u + j < n; j++) acc[j] += g[u + j] * p[u + j];
    for (j = 0; j < MOE__LANES; j++) dot += acc[j];
    for (u = 0; u < n; u++) g[u] = p[u] * (g[u] - dot) * scale;
}

/* per thread, forward: A panel, packed k^T, then the P . v product's own workspace;
   backward: dS (T, T), packed v^T, then the other products' workspace */
static size_t moe__att_fwd_thread_floats(int T, int hd) {
    return (size_t)MOE_GEMM_MC * MOE_GEMM_KC + moe__packed_b_floats(hd, T) + moe__att_ws_floats(T, hd);
}
static size_t moe__att_bwd_thread_floats(int T, int hd) {
    return (size_t)T * T + moe__packed_b_floats(hd, T) + moe__att_ws_floats(T, hd);
}

MOE__IMPL size_t moe_attention_work_floats(int T, int d, int NH, int nthreads) {
    int hd = NH > 0 ? d / NH : 0;
    size_t f = moe__att_fwd_thread_floats(T, hd), b = moe__att_bwd_thread_floats(T, hd);
    return (f > b ? f : b) * (size_t)(nthreads > 1 ? nthreads : 1);
}

MOE__IMPL moe_status moe_attention_forward(float *out, float *att, const float *qkv, int B, int T, int d, int NH,
                                           moe_work *work) {
    int hd = d / NH, task, nthreads = moe__work_threads(work);
    float scale = 1.0f / sqrtf((float)hd);
    size_t wsz = moe__att_fwd_thread_floats(T, hd);
    float *own, *ws;
    moe_status st;
    if (B <= 0 || T <= 0) return MOE_OK;
    ws = moe__work_get(work, wsz * (size_t)nthreads, &own, &st);
    if (st != MOE_OK) return st;
    MOE__OMP_FOR_DYNAMIC_N(nthreads)
    for (task = 0; task < B * NH; task++) {
        int b = task / NH, h = task % NH, t0, t;
        const float *q = qkv + (size_t)b * T * 3 * d + (size_t)h * hd;
        const float *k = q + d, *v = q + 2 * d;
        float *P = att + (size_t)task * T * T, *o = out + (size_t)b * T * d + (size_t)h * hd;
        float *w = ws + wsz * (size_t)moe__thread_index(), *kp = w + (size_t)MOE_GEMM_MC * MOE_GEMM_KC;
        float *wv = kp + moe__packed_b_floats(hd, T); /* workspace of the P . v products */
        int Tpad = moe__round_up(T, MOE_GEMM_NR);
        /* k^T (hd, T) packed once; each query block uses its first t1 columns */
        moe__pack_b_panels(kp, k, 3 * d, 1, hd, T, 0, Tpad / MOE_GEMM_NR);
        for (t0 = 0; t0 < T; t0 += MOE__ATT_RB) {
            int t1 = t0 + MOE__ATT_RB < T ? t0 + MOE__ATT_RB : T, rows = t1 - t0;
            /* scores of the block's queries against keys [0, t1): q . k^T */
            moe__gemm_packed(rows, t1, hd, q + (size_t)t0 * 3 * d, 3 * d, 0, kp, Tpad, 0, P + (size_t)t0 * T, T, 0, w);
            for (t = t0; t < t1; t++) {
                float *row = P + (size_t)t * T;
                moe__att_softmax_row(row, t + 1, scale);
                if (t + 1 < T) memset(row + t + 1, 0, sizeof(float) * (size_t)(T - t - 1));
            }
            /* out = P[:, 0:t1] . v[0:t1] */
            moe__att_gemm(rows, hd, t1, P + (size_t)t0 * T, T, 0, v, 3 * d, 0, o + (size_t)t0 * d, d, wv);
        }
    }
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL moe_status moe_attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att,
                                            int B, int T, int d, int NH, moe_work *work) {
    int hd = d / NH, task, nthreads = moe__work_threads(work);
    float scale = 1.0f / sqrtf((float)hd);
    size_t wsz = moe__att_bwd_thread_floats(T, hd);
    float *own, *ws;
    moe_status st;
    if (B <= 0 || T <= 0) return MOE_OK;
    ws = moe__work_get(work, wsz * (size_t)nthreads, &own, &st);
    if (st != MOE_OK) return st;
    MOE__OMP_FOR_DYNAMIC_N(nthreads)
    for (task = 0; task < B * NH; task++) {
        int b = task / NH, h = task % NH, t0, t, u, Tpad = moe__round_up(T, MOE_GEMM_NR);
        size_t base = (size_t)b * T * 3 * d + (size_t)h * hd;
        const float *q = qkv + base, *k = q + d, *v = q + 2 * d;
        const float *dy = dout + (size_t)b * T * d + (size_t)h * hd;
        const float *P = att + (size_t)task * T * T;
        float *dq = dqkv + base, *dk = dq + d, *dv = dq + 2 * d;
        float *dS = ws + wsz * (size_t)moe__thread_index(), *vp = dS + (size_t)T * T;
        float *w = vp + moe__packed_b_floats(hd, T);
        /* v^T (hd, T) packed once; each query block uses its first t1 columns (as k^T forward) */
        moe__pack_b_panels(vp, v, 3 * d, 1, hd, T, 0, Tpad / MOE_GEMM_NR);
        for (t0 = 0; t0 < T; t0 += MOE__ATT_RB) {
            int t1 = t0 + MOE__ATT_RB < T ? t0 + MOE__ATT_RB : T, rows = t1 - t0;
            /* dP = dy . v^T over keys [0, t1), then dS = P * (dP - <dP, P>) * scale */
            moe__gemm_packed(rows, t1, hd, dy + (size_t)t0 * d, d, 0, vp, Tpad, 0, dS + (size_t)t0 * T, T, 0, w);
            for (t = t0; t < t1; t++) {
                float *g = dS + (size_t)t * T;
                moe__att_softmax_row_backward(g, P + (size_t)t * T, t + 1, scale);
                for (u = t + 1; u < t1; u++) g[u] = 0.0f;
            }
            /* dq = dS[:, 0:t1] . k[0:t1] */
            moe__att_gemm(rows, hd, t1, dS + (size_t)t0 * T, T, 0, k, 3 * d, 0, dq + (size_t)t0 * 3 * d, 3 * d, w);
        }
        for (t0 = 0; t0 < T; t0 += MOE__ATT_RB) { /* key blocks: only queries t >= t0 see them */
            int t1 = t0 + MOE__ATT_RB < T ? t0 + MOE__ATT_RB : T, rows = t1 - t0, n = T - t0;
            size_t off = (size_t)t0 * T + t0;
            /* dk = dS[t0:T, t0:t1]^T . q[t0:T];  dv = P[t0:T, t0:t1]^T . dy[t0:T] */
            moe__att_gemm(rows, hd, n, dS + off, T, 1, q + (size_t)t0 * 3 * d, 3 * d, 0, dk + (size_t)t0 * 3 * d, 3 * d, w);
            moe__att_gemm(rows, hd, n, P + off, T, 1, dy + (size_t)t0 * d, d, 0, dv + (size_t)t0 * 3 * d, 3 * d, w);
        }
    }
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL void moe_attention_forward_naive(float *out, float *att, const float *qkv, int B, int T, int d,
                                           int NH) {
    int hd = d / NH, b, t, h, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < T; t++) {
                const float *q = qkv + ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
                float *P = att + (((size_t)b * NH + h) * T + t) * T, *o = out + ((size_t)b * T + t) * d + (size_t)h * hd;
                double maxv = -HUGE_VAL, sum = 0.0;
                /* scores against the keys u <= t, then their softmax; 0 above the diagonal */
                for (u = 0; u <= t; u++) {
                    const float *k = qkv + ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd;
                    double s = 0.0;
                    for (i = 0; i < hd; i++) s += (double)q[i] * k[i];
                    P[u] = (float)(s * scale);
                    if (P[u] > maxv) maxv = P[u];
                }
                for (u = 0; u <= t; u++) sum += exp(P[u] - maxv);
                for (u = 0; u <= t; u++) P[u] = (float)(exp(P[u] - maxv) / sum);
                for (u = t + 1; u < T; u++) P[u] = 0.0f;
                /* out = sum over u <= t of P[u] v[u] */
                for (i = 0; i < hd; i++) {
                    double s = 0.0;
                    for (u = 0; u <= t; u++) s += (double)P[u] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
                    o[i] = (float)s;
                }
            }
}

MOE__IMPL void moe_attention_backward_naive(float *dqkv, const float *dout, const float *qkv,
                                            const float *att, int B, int T, int d, int NH) {
    int hd = d / NH, b, t, h, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    memset(dqkv, 0, sizeof(float) * (size_t)B * T * 3 * d);
    for (b = 0; b < B; b++)
        for (h = 0; h < NH; h++)
            for (t = 0; t < T; t++) {
                size_t qt = ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
                const float *P = att + (((size_t)b * NH + h) * T + t) * T;
                const float *dy = dout + ((size_t)b * T + t) * d + (size_t)h * hd;
                double dot = 0.0;
                /* dP[u] = dy . v[u]; softmax backward dS[u] = P[u] (dP[u] - sum_u' P[u'] dP[u']) */
                for (u = 0; u <= t; u++) {
                    double dp = 0.0;
                    for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
                    dot += P[u] * dp;
                }
                for (u = 0; u <= t; u++) {
                    size_t ku = ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd, vu = ku + d;
                    double dp = 0.0, ds;
                    for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[vu + i];
                    ds = P[u] * (dp - dot) * scale; /* the scores were scale * q . k */
                    for (i = 0; i < hd; i++) {
                        dqkv[qt + i] += (float)(ds * qkv[ku + i]);  /* dq[t] += dS[u] k[u] */
                        dqkv[ku + i] += (float)(ds * qkv[qt + i]);  /* dk[u] += dS[u] q[t] */
                        dqkv[vu + i] += P[u] * dy[i];              /* dv[u] += P[u] dy[t] */
                    }
                }
            }
}

MOE__IMPL void moe_rope_table(float *cos_sin, int T, int hd, float theta) {
    int t, i, half = hd / 2;
    for (t = 0; t < T; t++)
        for (i = 0; i < half; i++) {
            double freq = pow((double)theta, -2.0 * i / hd), a = t * freq;
            cos_sin[((size_t)t * half + i) * 2] = (float)cos(a);
            cos_sin[((size_t)t * half + i) * 2 + 1] = (float)sin(a);
        }
}

MOE__IMPL void moe_rope_apply(float *qkv, const float *cos_sin, int B, int T, int d, int NH, int inverse) {
    int hd = d / NH, half = hd / 2, row;
    MOE_OMP_FOR_IF((double)B * T * d > 1e5)
    for (row = 0; row < B * T; row++) {
        int t = row % T, part, h, i;
        const float *cs = cos_sin + (size_t)t * half * 2;
        for (part = 0; part < 2; part++) /* q, then k */
            for (h = 0; h < NH; h++) {
                float *x = qkv + (size_t)row * 3 * d + (size_t)part * d + (size_t)h * hd;
                for (i = 0; i < half; i++) {
                    float c = cs[2 * i], s = inverse ? -cs[2 * i + 1] : cs[2 * i + 1];
                    float a = x[i], b = x[i + half];
                    x[i] = a * c - b * s;
                    x[i + half] = a * s + b * c;
                }
            }
    }
}

