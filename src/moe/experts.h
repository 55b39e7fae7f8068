/* ============================================================================================
   >>moe:experts  experts on gathered tokens
   ============================================================================================
   A bank of E experts with stacked weights. Rows of xg (N, d) are the tokens routed to the
   bank, grouped by expert: rows [offset[e], offset[e+1]) belong to expert e.
     SwiGLU expert:  h = silu(xg . gate_e^T) * (xg . up_e^T);  out = h . down_e^T
     FFN expert:     h = act(xg . up_e^T + b_up_e);            out = h . down_e^T + b_down_e
   gate, up: (E, D, d); down: (E, d, D); b_up: (E, D); b_down: (E, d). */

typedef enum moe_expert_kind {
    MOE_EXPERT_SWIGLU = 0, /* A gate, B up, O down (Mixtral, DeepSeekMoE)   */
    MOE_EXPERT_FFN = 1     /* two matrices and an activation (Switch, GPT-2) */
} moe_expert_kind;

typedef struct moe_expert_weights {
    float *gate;   /* (E, D, d) SwiGLU only, else NULL  */
    float *up;     /* (E, D, d)                         */
    float *down;   /* (E, d, D)                         */
    float *b_up;   /* (E, D) FFN with biases, else NULL */
    float *b_down; /* (E, d) FFN with biases, else NULL */
} moe_expert_weights;

/* out (N,d); h_gate, h_up (N,D) are caches (h_gate unused for FFN). A SwiGLU bank whose
   w->gate is NULL takes h_gate as an INPUT: the gate pre-activation computed elsewhere (AoE
   builds it from its low-rank cache); backward then leaves d h_gate in scratch1.
   work: moe_experts_work_floats(...) floats for the packed weights and tiles, or NULL (the
   call allocates its own; MOE_ERR_NOMEM when it cannot). */
MOEDEF moe_status moe_experts_forward(float *out, float *h_gate, float *h_up, const float *xg,
                                      const moe_expert_weights *w, const int *offset, int E, int d, int D,
                                      moe_expert_kind kind, moe_activation act, moe_work *work);
/* dxg (N,d) is OVERWRITTEN (it is a per-assignment buffer, not a gradient of a parameter);
   weight gradients accumulate. scratch1, scratch2: (N, D) each. */
MOEDEF moe_status moe_experts_backward(float *dxg, moe_expert_weights *gw, const float *dout,
                                       const float *xg, const float *h_gate, const float *h_up,
                                       const moe_expert_weights *w, const int *offset, int E, int d,
                                       int D, moe_expert_kind kind, moe_activation act, float *scratch1,
                                       float *scratch2, moe_work *work);
/* scratch (floats) of moe_experts_forward and of moe_experts_backward for a bank of E experts
   when no expert gets more than max_rows rows (a router that sends each token at most once to
   an expert: the tokens of one call), with per-thread regions for nthreads */
MOEDEF size_t moe_experts_work_floats(int max_rows, int E, int d, int D, moe_expert_kind kind, int nthreads);

/* The readable references of the two above (plain loops, one token and one expert at a time,
   double accumulators, no threads, no allocation), with the same arguments and the same
   contract: caches and scratch hold what the fast pair leaves there. tests/test_gemm.c
   compares the fast pair against them. */
MOEDEF void moe_experts_forward_naive(float *out, float *h_gate, float *h_up, const float *xg,
                                      const moe_expert_weights *w, const int *offset, int E, int d,
                                      int D, moe_expert_kind kind, moe_activation act);
MOEDEF void moe_experts_backward_naive(float *dxg, moe_expert_weights *gw, const float *dout,
                                       const float *xg, const float *h_gate, const float *h_up,
                                       const moe_expert_weights *w, const int *offset, int E, int d,
                                       int D, moe_expert_kind kind, moe_activation act,
                                       float *scratch1, float *scratch2);

/* @implementation */
/* ============================================================================================
   >>moe:experts
   ============================================================================================
   Experts are processed in chunks (see MOE__EXPERT_CHUNK_FLOATS); inside a chunk the threads
   share the work: first they pack the chunk's weight matrices for the GEMM (panels split over
   threads, so each matrix is packed once per call, not once per task), then they take tasks
   of rows (tokens) or of weight-gradient rows of any expert of the chunk, handed out
   dynamically. Every task owns what it
   writes and the GEMM gives each element the same arithmetic whatever the split, so the
   results do not depend on the thread count. */

/* sigmoid for the SwiGLU experts with moe__expf_poly (see >>moe:kernels), which the compiler
   vectorizes: libm's expf is a call per element, and the experts do three per hidden unit and
   token. The argument is clamped inside (sigmoid's value is then 0 or 1 to float precision);
   NaN passes through. */
static float moe__expert_sigmoid(float x) { return x == x ? 1.0f / (1.0f + moe__expf_poly(-x)) : x; }

/* h = silu(g) * u over n elements */
MOE__GEMM_FN void moe__swiglu_rows(float *MOE_RESTRICT h, const float *MOE_RESTRICT g, const float *MOE_RESTRICT u,
                                   size_t n) {
    size_t i;
    for (i = 0; i < n; i++) h[i] = g[i] * moe__expert_sigmoid(g[i]) * u[i];
}

/* SwiGLU backward over n elements: in dhu the gradient of h, out the gradient of u; dg gets
   the gradient of the gate pre-activation and h the forward value (for the down gradient) */
MOE__GEMM_FN void moe__swiglu_rows_backward(float *MOE_RESTRICT h, float *MOE_RESTRICT dg, float *MOE_RESTRICT dhu,
                                            const float *MOE_RESTRICT g, const float *MOE_RESTRICT u, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        float gi = g[i], ui = u[i], s = moe__expert_sigmoid(gi), dh = dhu[i];
        h[i] = gi * s * ui;
        dg[i] = dh * ui * s * (1.0f + gi * (1.0f - s));
        dhu[i] = dh * gi * s;
    }
}

/* four columns, each summed exactly as moe__dot_lanes sums it (same bits); four named
   accumulators, not an array indexed by a variable column count, so that they stay in
   registers instead of a store and a reload on every step */
static void moe__dot_lanes4(float *out, const float *x, const float *w, int K) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * (size_t)K, *w3 = w + 3 * (size_t)K;
    float a0[MOE__LANES], a1[MOE__LANES], a2[MOE__LANES], a3[MOE__LANES];
    int u, k;
    for (k = 0; k < MOE__LANES; k++) a0[k] = a1[k] = a2[k] = a3[k] = 0.0f;
    for (u = 0; u + MOE__LANES <= K; u += MOE__LANES)
        for (k = 0; k < MOE__LANES; k++) {
            float xk = x[u + k];
            a0[k] += xk * w0[u + k];
            a1[k] += xk * w1[u + k];
            a2[k] += xk * w2[u + k];
            a3[k] += xk * w3[u + k];
        }
    for (k = 0; u + k < K; k++) {
        a0[k] += x[u + k] * w0[u + k];
        a1[k] += x[u + k] * w1[u + k];
        a2[k] += x[u + k] * w2[u + k];
        a3[k] += x[u + k] * w3[u + k];
    }
    out[0] = moe__lanes_sum(a0);
    out[1] = moe__lanes_sum(a1);
    out[2] = moe__lanes_sum(a2);
    out[3] = moe__lanes_sum(a3);
}

/* block blk of out: columns 4 (blk / M) to 4 (blk / M) + 3 of row blk % M. Consecutive blocks
   are the rows of one group of columns, so those 4 rows of W are read from memory once for
   all the rows of the call, then from L1 */
static void moe__decode_block(float *out, const float *inp, const float *W, int M, int K, int N, int blk) {
    int i = blk % M, j0 = blk / M * 4, c;
    const float *x = inp + (size_t)i * K;
    if (N - j0 >= 4) {
        moe__dot_lanes4(out + (size_t)i * N + j0, x, W + (size_t)j0 * K, K);
    } else {
        for (c = j0; c < N; c++) out[(size_t)i * N + c] = moe__dot_lanes(x, W + (size_t)c * K, K);
    }
}

/* out (M, N) = inp (M, K) . W (N, K)^T for few rows (decoding), the same operations for every
   row whatever M, the thread count or the other rows. When pk holds W's panels (packed once
   for a whole generation, >>moe:generate), the GEMM's own operations on them
   (moe__gemm_panels: the full forward's bits), threads splitting the panels. Else each element
   is a dot product in MOE__LANES lanes summed by halving: a few rows per call would spend more
   time packing W into panels than multiplying; four columns share each load of a row. */
static void moe__decode_linear(float *out, const float *inp, const float *W, int M, int K, int N, int nthreads,
                               const moe_wpack *pk) {
    int blk, n = M * ((N + 3) / 4);
    if (moe__wpack_product(out, inp, W, M, K, N, nthreads, pk)) return;
    /* a plain loop below the threshold: an OpenMP region of one thread would still take a
       scheduler call per block, a fifth of a batch-1 token */
    if (nthreads > 1 && (double)M * K * N > MOE__DECODE_THREAD_MACS) {
        MOE__OMP_FOR_DYNAMIC_N(nthreads)
        for (blk = 0; blk < n; blk++) moe__decode_block(out, inp, W, M, K, N, blk);
    } else {
        for (blk = 0; blk < n; blk++) moe__decode_block(out, inp, W, M, K, N, blk);
    }
}

static int moe__bank_max_rows(const int *offset, int E) {
    int e, m = 0;
    for (e = 0; e < E; e++)
        if (offset[e + 1] - offset[e] > m) m = offset[e + 1] - offset[e];
    return m;
}

/* Experts go in chunks (as many as MOE__EXPERT_CHUNK_FLOATS of packed weights and per-expert
   buffers allow, at least one); a chunk is ONE parallel region whose phases are separated by
   barriers, not one region per expert and phase: under load every fork/join and barrier
   waits for the slowest thread, so the fewer the better. The cap bounds the scratch (64 MB)
   more than it keeps a chunk in cache: on 2 threads the fine-grained benchmark layer (E = 64,
   1.5 MB of weights per expert) ran fwd+bwd in 290 ms with this cap, 300 ms with a quarter of
   it and 320 ms with a sixteenth (bench/moe_layer.c's shape, in alternation); 1 thread saw no
   difference. */
#ifndef MOE__EXPERT_CHUNK_FLOATS
#define MOE__EXPERT_CHUNK_FLOATS ((size_t)1 << 24)
#endif

/* floats that hold n items of `size` bytes placed after floats, aligned to `size` */
static size_t moe__floats_holding(size_t n, size_t size) {
    return (n * size + size - 1 + sizeof(float) - 1) / sizeof(float);
}

/* p rounded up to a multiple of `align` bytes: integer arrays that follow floats in a workspace */
static void *moe__align_up(void *p, size_t align) {
    uintptr_t u = (uintptr_t)p;
    return (void *)((u + align - 1) / align * align);
}

/* Forward scratch: the packed weights of one chunk of experts, one tile workspace per thread
   (an A block and an (MC, D) block of h), the chunk's task starts. Chunks never depend on the
   rows, so neither does the size. */
static size_t moe__experts_fwd_floats(int E, int d, int D, int two_in, int nthreads, int *chunk_out) {
    size_t per_e = (size_t)(two_in ? 2 : 1) * moe__packed_b_floats(d, D) + moe__packed_b_floats(D, d);
    size_t work = (size_t)MOE_GEMM_MC * MOE_GEMM_KC + (size_t)MOE_GEMM_MC * D;
    size_t chunk = MOE__EXPERT_CHUNK_FLOATS / per_e;
    if (chunk < 1) chunk = 1;
    if (chunk > (size_t)E) chunk = (size_t)E;
    if (chunk_out) *chunk_out = (int)chunk;
    return per_e * chunk + work * (size_t)nthreads + moe__floats_holding(chunk + 1, sizeof(int));
}

/* Backward: per expert its packed weights, packed x (n, d), H (n, D) and packed H */
static size_t moe__experts_bwd_expert_floats(int n, int d, int D, int own_gate) {
    return moe__packed_b_floats(d, D) + (size_t)(own_gate ? 2 : 1) * moe__packed_b_floats(D, d) +
           moe__packed_b_floats(n, d) + (size_t)n * D + moe__packed_b_floats(n, D);
}

/* the rest of the backward scratch beyond the largest chunk: tile workspaces, chunk offsets
   (size_t) and three task prefix arrays (int) */
static size_t moe__experts_bwd_extra_floats(int E, int nthreads) {
    return (size_t)MOE_GEMM_MC * MOE_GEMM_KC * (size_t)nthreads + moe__floats_holding((size_t)E + 1, sizeof(size_t)) +
           moe__floats_holding(3 * ((size_t)E + 1), sizeof(int));
}

MOE__IMPL size_t moe_experts_work_floats(int max_rows, int E, int d, int D, moe_expert_kind kind, int nthreads) {
    int swiglu = kind == MOE_EXPERT_SWIGLU, nt = nthreads > 1 ? nthreads : 1;
    size_t fwd, f0, one, all, chunk, bwd;
    if (E <= 0 || max_rows <= 0) return 0; /* no rows: the calls return at once */
    /* the forward's chunks are larger without a gate of its own (AoE): take both */
    fwd = moe__experts_fwd_floats(E, d, D, swiglu, nt, NULL);
    f0 = moe__experts_fwd_floats(E, d, D, 0, nt, NULL);
    /* a backward chunk is one expert (at most max_rows rows), or several within the chunk size */
    one = moe__experts_bwd_expert_floats(max_rows, d, D, swiglu);
    all = one * (size_t)E;
    chunk = all < MOE__EXPERT_CHUNK_FLOATS ? all : MOE__EXPERT_CHUNK_FLOATS;
    bwd = (one > chunk ? one : chunk) + moe__experts_bwd_extra_floats(E, nt);
    fwd = fwd > f0 ? fwd : f0;
    return fwd > bwd ? fwd : bwd;
}

/* the expert that owns item i when expert j of a chunk owns [start[j], start[j + 1]) */
static int moe__chunk_owner(const int *start, int nexp, int i) {
    int j = 0;
    while (j + 1 < nexp && start[j + 1] <= i) j++;
    return j;
}

/* Banks whose experts get at most this many rows (cached decoding: a few tokens per call)
   skip the GEMM: packing an expert's three matrices costs about as much as multiplying them
   by one row, so the products go through moe__decode_linear instead, which reads each group
   of four weight rows once for all the expert's rows (16: batch-16 decoding of the demo model
   22% faster than with 4, batch 1 unchanged). The switch depends on the rows alone, never on
   the thread count. */
#ifndef MOE__EXPERT_DOT_ROWS
#define MOE__EXPERT_DOT_ROWS 16
#endif

/* moe_experts_forward for few rows per expert: expert by expert, the products as dot
   products; hbuf holds (rows, D) */
static void moe__experts_forward_few_rows(float *out, float *h_gate, float *h_up, const float *xg,
                                          const moe_expert_weights *w, const int *offset, int E, int d, int D,
                                          moe_expert_kind kind, moe_activation act, float *hbuf, int nthreads,
                                          const moe_wpack *pk) {
    int swiglu = kind == MOE_EXPERT_SWIGLU, own_gate = swiglu && w->gate != NULL, e, j;
    size_t wsz = (size_t)D * d, i;
    for (e = 0; e < E; e++) {
        int base = offset[e], n = offset[e + 1] - base;
        const float *x = xg + (size_t)base * d;
        float *hu = h_up + (size_t)base * D, *o = out + (size_t)base * d;
        size_t nh = (size_t)n * D;
        if (n == 0) continue;
        moe__decode_linear(hu, x, w->up + wsz * e, n, d, D, nthreads, pk);
        if (swiglu) {
            float *hg = h_gate + (size_t)base * D;
            if (own_gate) moe__decode_linear(hg, x, w->gate + wsz * e, n, d, D, nthreads, pk);
            moe__swiglu_rows(hbuf, hg, hu, nh);
        } else {
            if (w->b_up)
                for (i = 0; i < (size_t)n; i++)
                    for (j = 0; j < D; j++) hu[i * D + j] += w->b_up[(size_t)e * D + j];
            for (i = 0; i < nh; i++) hbuf[i] = moe__act(hu[i], act);
        }
        moe__decode_linear(o, hbuf, w->down + wsz * e, n, D, d, nthreads, pk);
        if (!swiglu && w->b_down)
            for (i = 0; i < (size_t)n; i++)
                for (j = 0; j < d; j++) o[i * d + j] += w->b_down[(size_t)e * d + j];
    }
}

MOE__IMPL moe_status moe_experts_forward(float *out, float *h_gate, float *h_up, const float *xg,
                                         const moe_expert_weights *w, const int *offset, int E, int d, int D,
                                         moe_expert_kind kind, moe_activation act, moe_work *work_ws) {
    int nthreads = moe__work_threads(work_ws), swiglu = kind == MOE_EXPERT_SWIGLU, e0, e1;
    int own_gate = swiglu && w->gate != NULL; /* else h_gate is an input (AoE's cache) */
    int Dpad = moe__round_up(D, MOE_GEMM_NR), dpad = moe__round_up(d, MOE_GEMM_NR);
    int qD = Dpad / MOE_GEMM_NR, qd = dpad / MOE_GEMM_NR, nq = (own_gate ? 2 : 1) * qD + qd;
    size_t szin = moe__packed_b_floats(d, D), szout = moe__packed_b_floats(D, d), wsz = (size_t)D * d;
    size_t per_e = (own_gate ? 2 : 1) * szin + szout;
    size_t work = (size_t)MOE_GEMM_MC * MOE_GEMM_KC + (size_t)MOE_GEMM_MC * D, need;
    int chunk, *tstart;
    float *buf, *thr, *own;
    moe_status st;
    int max_rows = moe__bank_max_rows(offset, E);
    if (max_rows == 0) return MOE_OK;
    need = moe__experts_fwd_floats(E, d, D, own_gate, nthreads, &chunk);
    buf = moe__work_get(work_ws, need, &own, &st);
    if (st != MOE_OK) return st;
    /* decoding: no packing (buf holds >= MC rows of h); with the weights packed ahead
       (work_ws->pack) the products are the GEMM's on those panels, for up to MC rows */
    if (max_rows <= MOE__EXPERT_DOT_ROWS || (work_ws && moe__wpack_live(work_ws->pack) && max_rows <= MOE_GEMM_MC)) {
        moe__experts_forward_few_rows(out, h_gate, h_up, xg, w, offset, E, d, D, kind, act, buf, nthreads,
                                      work_ws ? work_ws->pack : NULL);
        MOE_FREE(own);
        return MOE_OK;
    }
    thr = buf + per_e * (size_t)chunk;
    tstart = (int *)moe__align_up(thr + work * (size_t)nthreads, sizeof(int));
    for (e0 = 0; e0 < E; e0 = e1) {
        int ntask = 0, j;
        double flops = 0.0;
        e1 = e0 + chunk < E ? e0 + chunk : E;
        for (j = 0; j < e1 - e0; j++) { /* row tasks of each expert */
            int n = offset[e0 + j + 1] - offset[e0 + j], rb = moe__task_rows(n, nthreads);
            tstart[j] = ntask;
            ntask += n > 0 ? (n + rb - 1) / rb : 0;
            flops += (double)n * d * D;
        }
        tstart[e1 - e0] = ntask;
        if (ntask == 0) continue;
        (void)flops; /* only the OpenMP build reads it */
        MOE__OMP_PARALLEL_IF_N(flops > 1e6, nthreads)
        {
            int q, b;
            /* 1. B panels of every expert with tokens: up^T and gate^T (d -> D), down^T (D -> d) */
            MOE__OMP_FOR_INNER
            for (q = 0; q < (e1 - e0) * nq; q++) {
                int je = q / nq, qq = q % nq, e = e0 + je;
                float *pu = buf + per_e * (size_t)je, *pd = pu + szin, *pg = pd + szout;
                if (offset[e + 1] == offset[e]) continue;
                if (qq < qD) moe__pack_b_panels(pu, w->up + wsz * e, d, 1, d, D, qq, qq + 1);
                else if (qq < qD + qd) moe__pack_b_panels(pd, w->down + wsz * e, D, 1, D, d, qq - qD, qq - qD + 1);
                else moe__pack_b_panels(pg, w->gate + wsz * e, d, 1, d, D, qq - qD - qd, qq - qD - qd + 1);
            }
            /* 2. row tasks: h = act(x . W1^T) (SwiGLU: silu(x . Wg^T) * (x . Wu^T)), out = h . W2^T */
            MOE__OMP_FOR_INNER
            for (b = 0; b < ntask; b++) {
                int je = moe__chunk_owner(tstart, e1 - e0, b), e = e0 + je, base = offset[e], n = offset[e + 1] - base;
                int rb = moe__task_rows(n, nthreads), r0 = base + (b - tstart[je]) * rb;
                int rows = base + n - r0 < rb ? base + n - r0 : rb, jj;
                const float *pu = buf + per_e * (size_t)je, *pd = pu + szin, *pg = pd + szout;
                float *Ap = thr + work * (size_t)moe__thread_index(), *hbuf = Ap + (size_t)MOE_GEMM_MC * MOE_GEMM_KC;
                const float *x = xg + (size_t)r0 * d;
                float *hu = h_up + (size_t)r0 * D, *o = out + (size_t)r0 * d;
                size_t i, nh = (size_t)rows * D;
                moe__gemm_packed(rows, D, d, x, d, 0, pu, Dpad, 0, hu, D, 0, Ap);
                if (swiglu) {
                    float *hg = h_gate + (size_t)r0 * D;
                    if (own_gate) moe__gemm_packed(rows, D, d, x, d, 0, pg, Dpad, 0, hg, D, 0, Ap);
                    moe__swiglu_rows(hbuf, hg, hu, nh);
                } else {
                    if (w->b_up)
                        for (i = 0; i < (size_t)rows; i++)
                            for (jj = 0; jj < D; jj++) hu[i * D + jj] += w->b_up[(size_t)e * D + jj];
                    for (i = 0; i < nh; i++) hbuf[i] = moe__act(hu[i], act);
                }
                moe__gemm_packed(rows, d, D, hbuf, D, 0, pd, dpad, 0, o, d, 0, Ap);
                if (!swiglu && w->b_down)
                    for (i = 0; i < (size_t)rows; i++)
                        for (jj = 0; jj < d; jj++) o[i * d + jj] += w->b_down[(size_t)e * d + jj];
            }
        }
    }
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL moe_status moe_experts_backward(float *dxg, moe_expert_weights *gw, const float *dout,
                                          const float *xg, const float *h_gate, const float *h_up,
                                          const moe_expert_weights *w, const int *offset, int E, int d,
                                          int D, moe_expert_kind kind, moe_activation act, float *scratch1,
                                          float *scratch2, moe_work *work_ws) {
    int nthreads = moe__work_threads(work_ws), swiglu = kind == MOE_EXPERT_SWIGLU, e0, e1;
    int own_gate = swiglu && w->gate != NULL; /* else scratch1 returns d h_gate to the caller */
    int Dpad = moe__round_up(D, MOE_GEMM_NR), dpad = moe__round_up(d, MOE_GEMM_NR);
    int qD = Dpad / MOE_GEMM_NR, qd = dpad / MOE_GEMM_NR, nmax = moe__bank_max_rows(offset, E);
    int nq = qD + (own_gate ? 3 : 2) * qd; /* down, up, x (, gate) */
    size_t szdown = moe__packed_b_floats(d, D), szup = moe__packed_b_floats(D, d), wsz = (size_t)D * d;
    size_t szw = szdown + (own_gate ? 2 : 1) * szup; /* packed weights of one expert */
    size_t work = (size_t)MOE_GEMM_MC * MOE_GEMM_KC, cap = 0;
    /* weight-gradient tasks: blocks of wb rows over down (d rows), up and gate (D rows each) */
    int wb = moe__task_rows(d + (own_gate ? 2 : 1) * D, nthreads);
    int nbd = (d + wb - 1) / wb, nbD = (D + wb - 1) / wb;
    int has_bias = !swiglu && (gw->b_down || gw->b_up);
    int nwt = nbd + (own_gate ? 2 : 1) * nbD + has_bias, *ts;
    float *buf, *thr, *own;
    size_t *dstart;
    moe_status st;
    if (nmax == 0) return MOE_OK;
    /* per expert: packed weights, packed x (n, d), H (n, D), packed H; the largest chunk decides the buffer */
#define MOE__BWD_EXPERT_FLOATS(n) moe__experts_bwd_expert_floats((n), d, D, own_gate)
    for (e0 = 0; e0 < E; e0 = e1) {
        size_t sz = 0;
        for (e1 = e0; e1 < E; e1++) {
            size_t s1 = MOE__BWD_EXPERT_FLOATS(offset[e1 + 1] - offset[e1]);
            if (e1 > e0 && sz + s1 > MOE__EXPERT_CHUNK_FLOATS) break;
            sz += s1;
        }
        cap = sz > cap ? sz : cap;
    }
    buf = moe__work_get(work_ws, cap + moe__experts_bwd_extra_floats(E, nthreads), &own, &st);
    if (st != MOE_OK) return st;
    thr = buf + cap;
    /* integer arrays after the floats, each at its own alignment (cap may be odd) */
    dstart = (size_t *)moe__align_up(thr + work * (size_t)nthreads, sizeof(size_t));
    ts = (int *)moe__align_up(dstart + E + 1, sizeof(int)); /* three prefix arrays: row tasks, H panels, weight tasks */
    for (e0 = 0; e0 < E; e0 = e1) {
        size_t sz = 0;
        int nrow = 0, nph = 0, nw = 0, nexp, j;
        double flops = 0.0;
        int *trow, *tph, *tw;
        for (e1 = e0; e1 < E; e1++) {
            size_t s1 = MOE__BWD_EXPERT_FLOATS(offset[e1 + 1] - offset[e1]);
            if (e1 > e0 && sz + s1 > MOE__EXPERT_CHUNK_FLOATS) break;
            sz += s1;
        }
        nexp = e1 - e0;
        trow = ts;
        tph = ts + nexp + 1;
        tw = ts + 2 * (nexp + 1);
        sz = 0;
        for (j = 0; j < nexp; j++) {
            int n = offset[e0 + j + 1] - offset[e0 + j], rb = moe__task_rows(n, nthreads);
            dstart[j] = sz;
            sz += MOE__BWD_EXPERT_FLOATS(n);
            trow[j] = nrow;
            tph[j] = nph;
            tw[j] = nw;
            if (n > 0) {
                nrow += (n + rb - 1) / rb;
                nph += qD;
                nw += nwt;
            }
            flops += (double)n * d * D;
        }
        trow[nexp] = nrow;
        tph[nexp] = nph;
        tw[nexp] = nw;
        if (nrow == 0) continue;
        (void)flops; /* only the OpenMP build reads it */
        MOE__OMP_PARALLEL_IF_N(flops > 1e6, nthreads)
        {
            int q, b, t;
            /* 1. B panels: down (d -> D) for dh, up and gate (D -> d) for dx, the expert's x for dW */
            MOE__OMP_FOR_INNER
            for (q = 0; q < nexp * nq; q++) {
                int je = q / nq, qq = q % nq, ee = e0 + je, n = offset[ee + 1] - offset[ee];
                float *pdown = buf + dstart[je], *pup = pdown + szdown, *px = pup + (own_gate ? 2 : 1) * szup;
                float *pgate = pup + szup;
                const float *xe = xg + (size_t)offset[ee] * d;
                if (n == 0) continue;
                if (qq < qD) moe__pack_b_panels(pdown, w->down + wsz * ee, D, 0, d, D, qq, qq + 1);
                else if (qq < qD + qd) moe__pack_b_panels(pup, w->up + wsz * ee, d, 0, D, d, qq - qD, qq - qD + 1);
                else if (qq < qD + 2 * qd) moe__pack_b_panels(px, xe, d, 0, n, d, qq - qD - qd, qq - qD - qd + 1);
                else moe__pack_b_panels(pgate, w->gate + wsz * ee, d, 0, D, d, qq - qD - 2 * qd, qq - qD - 2 * qd + 1);
            }
            /* 2. row tasks: dh = dout . W2; h (kept in H for dW2) and the pre-activation gradients
                  (SwiGLU: scratch1 = d gate, scratch2 = d up; FFN: scratch2); dx = dup . Wu + dgate . Wg */
            MOE__OMP_FOR_INNER
            for (b = 0; b < nrow; b++) {
                int je = moe__chunk_owner(trow, nexp, b), ee = e0 + je, base = offset[ee], n = offset[ee + 1] - base;
                int rb = moe__task_rows(n, nthreads), r0 = base + (b - trow[je]) * rb;
                int rows = base + n - r0 < rb ? base + n - r0 : rb;
                const float *pdown = buf + dstart[je], *pup = pdown + szdown, *pgate = pup + szup;
                float *H = buf + dstart[je] + szw + moe__packed_b_floats(n, d);
                float *Ap = thr + work * (size_t)moe__thread_index();
                size_t i, lo = (size_t)r0 * D, nh = (size_t)rows * D;
                float *he = H + (size_t)(r0 - base) * D;
                const float *hg = h_gate + lo, *hu = h_up + lo;
                float *s1 = scratch1 + lo, *s2 = scratch2 + lo;
                moe__gemm_packed(rows, D, d, dout + (size_t)r0 * d, d, 0, pdown, Dpad, 0, s2, D, 0, Ap);
                if (swiglu) {
                    moe__swiglu_rows_backward(he, s1, s2, hg, hu, nh);
                } else {
                    for (i = 0; i < nh; i++) {
                        he[i] = moe__act(hu[i], act);
                        s2[i] *= moe__act_grad(hu[i], act);
                    }
                }
                moe__gemm_packed(rows, d, D, s2, D, 0, pup, dpad, 0, dxg + (size_t)r0 * d, d, 0, Ap);
                if (own_gate) moe__gemm_packed(rows, d, D, s1, D, 0, pgate, dpad, 0, dxg + (size_t)r0 * d, d, 1, Ap);
            }
            /* 3. H as B panels for dW2 */
            MOE__OMP_FOR_INNER
            for (q = 0; q < nph; q++) {
                int je = moe__chunk_owner(tph, nexp, q), ee = e0 + je, n = offset[ee + 1] - offset[ee];
                float *H = buf + dstart[je] + szw + moe__packed_b_floats(n, d), *pH = H + (size_t)n * D;
                int qq = q - tph[je];
                moe__pack_b_panels(pH, H, D, 0, n, D, qq, qq + 1);
            }
            /* 4. weight gradients, blocks of rows: dW2 (d, D) += dout_e^T . h_e;
                  dWu (D, d) += dup_e^T . x_e; dWg (D, d) += dgate_e^T . x_e; the biases last */
            MOE__OMP_FOR_INNER
            for (t = 0; t < nw; t++) {
                int je = moe__chunk_owner(tw, nexp, t), ee = e0 + je, base = offset[ee], n = offset[ee + 1] - base;
                int k = t - tw[je];
                float *Ap = thr + work * (size_t)moe__thread_index();
                const float *px = buf + dstart[je] + szw, *pH = px + moe__packed_b_floats(n, d) + (size_t)n * D;
                const float *dye = dout + (size_t)base * d;
                if (k < nbd) {
                    int r = k * wb, rows = d - r < wb ? d - r : wb;
                    moe__gemm_packed(rows, D, n, dye + r, d, 1, pH, Dpad, 0, gw->down + wsz * ee + (size_t)r * D, D, 1, Ap);
                } else if (k < nbd + (own_gate ? 2 : 1) * nbD) {
                    int kk = k - nbd, gate = kk >= nbD, r = (kk % nbD) * wb, rows = D - r < wb ? D - r : wb;
                    const float *a = (gate ? scratch1 : scratch2) + (size_t)base * D + r;
                    float *dw = (gate ? gw->gate : gw->up) + wsz * ee + (size_t)r * d;
                    moe__gemm_packed(rows, d, n, a, D, 1, px, dpad, 0, dw, d, 1, Ap);
                } else {
                    if (gw->b_down) moe__colsum_acc_serial(gw->b_down + (size_t)ee * d, dye, n, d);
                    if (gw->b_up) moe__colsum_acc_serial(gw->b_up + (size_t)ee * D, scratch2 + (size_t)base * D, n, D);
                }
            }
        }
    }
#undef MOE__BWD_EXPERT_FLOATS
    MOE_FREE(own);
    return MOE_OK;
}

/* The expert's hidden value at one unit from the forward caches: silu(g) * u or act(u). */
static float moe__expert_hidden_naive(float g, float u, moe_expert_kind kind, moe_activation act) {
    return kind == MOE_EXPERT_SWIGLU ? g * moe__sigmoid(g) * u : moe__act(u, act);
}

MOE__IMPL void moe_experts_forward_naive(float *out, float *h_gate, float *h_up, const float *xg,
                                         const moe_expert_weights *w, const int *offset, int E, int d,
                                         int D, moe_expert_kind kind, moe_activation act) {
    int swiglu = kind == MOE_EXPERT_SWIGLU, own_gate = swiglu && w->gate != NULL, e, i, j, c, p;
    for (e = 0; e < E; e++) {
        const float *up = w->up + (size_t)e * D * d, *gate = own_gate ? w->gate + (size_t)e * D * d : NULL;
        const float *down = w->down + (size_t)e * d * D;
        for (i = offset[e]; i < offset[e + 1]; i++) {
            const float *x = xg + (size_t)i * d;
            float *hu = h_up + (size_t)i * D, *hg = swiglu ? h_gate + (size_t)i * D : NULL;
            for (j = 0; j < D; j++) { /* pre-activations: u = x . up_e[j] (+ b_up), g = x . gate_e[j] */
                double su = !swiglu && w->b_up ? w->b_up[(size_t)e * D + j] : 0.0, sg = 0.0;
                for (p = 0; p < d; p++) {
                    su += (double)x[p] * up[(size_t)j * d + p];
                    if (own_gate) sg += (double)x[p] * gate[(size_t)j * d + p];
                }
                hu[j] = (float)su;
                if (own_gate) hg[j] = (float)sg;
            }
            for (c = 0; c < d; c++) { /* out = h . down_e[c] (+ b_down) */
                double s = !swiglu && w->b_down ? w->b_down[(size_t)e * d + c] : 0.0;
                for (j = 0; j < D; j++)
                    s += (double)moe__expert_hidden_naive(swiglu ? hg[j] : 0.0f, hu[j], kind, act) * down[(size_t)c * D + j];
                out[(size_t)i * d + c] = (float)s;
            }
        }
    }
}

MOE__IMPL void moe_experts_backward_naive(float *dxg, moe_expert_weights *gw, const float *dout,
                                          const float *xg, const float *h_gate, const float *h_up,
                                          const moe_expert_weights *w, const int *offset, int E, int d,
                                          int D, moe_expert_kind kind, moe_activation act,
                                          float *scratch1, float *scratch2) {
    int swiglu = kind == MOE_EXPERT_SWIGLU, own_gate = swiglu && w->gate != NULL, e, i, j, c, p;
    for (e = 0; e < E; e++) {
        size_t wo = (size_t)e * D * d; /* offset of expert e's matrices */
        int r0 = offset[e], r1 = offset[e + 1];
        /* per token: dh = dout . down_e, then the pre-activation gradients (scratch2: d up,
           SwiGLU's scratch1: d gate), then dx = d up . up_e + d gate . gate_e */
        for (i = r0; i < r1; i++) {
            const float *dy = dout + (size_t)i * d, *hu = h_up + (size_t)i * D;
            const float *hg = swiglu ? h_gate + (size_t)i * D : NULL;
            float *dg = swiglu ? scratch1 + (size_t)i * D : NULL, *du = scratch2 + (size_t)i * D;
            for (j = 0; j < D; j++) {
                double dh = 0.0;
                for (c = 0; c < d; c++) dh += (double)dy[c] * w->down[wo + (size_t)c * D + j];
                if (swiglu) { /* h = g s u, s = sigmoid(g): dh/dg = u s (1 + g (1 - s)), dh/du = g s */
                    float g = hg[j], s = moe__sigmoid(g);
                    dg[j] = (float)(dh * hu[j] * s * (1.0f + g * (1.0f - s)));
                    du[j] = (float)(dh * g * s);
                } else {
                    du[j] = (float)(dh * moe__act_grad(hu[j], act));
                }
            }
            for (p = 0; p < d; p++) {
                double s = 0.0;
                for (j = 0; j < D; j++) {
                    s += (double)du[j] * w->up[wo + (size_t)j * d + p];
                    if (own_gate) s += (double)dg[j] * w->gate[wo + (size_t)j * d + p];
                }
                dxg[(size_t)i * d + p] = (float)s;
            }
        }
        /* weight gradients, summed over the expert's tokens: d down_e[c][j] += dout[.][c] h[.][j],
           d up_e[j][p] += d up[.][j] x[.][p], d gate_e likewise; the biases sum the rows */
        for (c = 0; c < d; c++)
            for (j = 0; j < D; j++) {
                double s = 0.0;
                for (i = r0; i < r1; i++)
                    s += (double)dout[(size_t)i * d + c] *
                         moe__expert_hidden_naive(swiglu ? h_gate[(size_t)i * D + j] : 0.0f, h_up[(size_t)i * D + j], kind, act);
                gw->down[wo + (size_t)c * D + j] += (float)s;
            }
        for (j = 0; j < D; j++)
            for (p = 0; p < d; p++) {
                double su = 0.0, sg = 0.0;
                for (i = r0; i < r1; i++) {
                    su += (double)scratch2[(size_t)i * D + j] * xg[(size_t)i * d + p];
                    if (own_gate) sg += (double)scratch1[(size_t)i * D + j] * xg[(size_t)i * d + p];
                }
                gw->up[wo + (size_t)j * d + p] += (float)su;
                if (own_gate) gw->gate[wo + (size_t)j * d + p] += (float)sg;
            }
        if (!swiglu && gw->b_down)
            for (c = 0; c < d; c++) {
                double s = 0.0;
                for (i = r0; i < r1; i++) s += dout[(size_t)i * d + c];
                gw->b_down[(size_t)e * d + c] += (float)s;
            }
        if (!swiglu && gw->b_up)
            for (j = 0; j < D; j++) {
                double s = 0.0;
                for (i = r0; i < r1; i++) s += scratch2[(size_t)i * D + j];
                gw->b_up[(size_t)e * D + j] += (float)s;
            }
    }
}
