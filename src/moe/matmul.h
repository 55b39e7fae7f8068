/* ============================================================================================
   >>moe:matmul  matrix multiplication
   ============================================================================================
   out (M, N) = inp (M, K) . weight (N, K)^T + bias (N): PyTorch's F.linear.
   The fast path is a cache-blocked, register-tiled GEMM written as plain loops that gcc and
   clang vectorize (-O3 -march=native); each output element is always computed by the same
   sequence of operations, whatever the thread count or its position in the matrix.
   work: scratch for the packed panels, moe_matmul_work_floats(M, K, N, threads) floats, or
   NULL (the call allocates its own; MOE_ERR_NOMEM when it cannot). */
MOEDEF moe_status moe_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                                     int M, int K, int N, moe_work *work);
/* dinp (M,K) += dout . weight;  dweight (N,K) += dout^T . inp;  dbias (N) += colsum(dout).
   Any gradient pointer may be NULL to skip it. */
MOEDEF moe_status moe_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                      const float *inp, const float *weight, int M, int K, int N,
                                      moe_work *work);
/* scratch (floats) of moe_matmul_forward and of moe_matmul_backward at these sizes, with
   per-thread regions for nthreads */
MOEDEF size_t moe_matmul_work_floats(int M, int K, int N, int nthreads);
MOEDEF void moe_matmul_forward_naive(float *out, const float *inp, const float *weight,
                                     const float *bias, int M, int K, int N);
MOEDEF void moe_matmul_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                                      const float *inp, const float *weight, int M, int K, int N);
/* The engine under both: C (M,N) (+)= op(A) (M,K) . B (K,N), row-major with leading dims.
   a_trans: A is stored (K, M). accumulate: 0 overwrites C. Single-threaded; callers split
   C into row or column blocks per thread. work: moe_gemm_work_floats(M, N, K) floats, or NULL. */
MOEDEF moe_status moe_gemm(int M, int N, int K, const float *A, int lda, int a_trans, const float *B,
                           int ldb, float *C, int ldc, int accumulate, moe_work *work);
MOEDEF size_t moe_gemm_work_floats(int M, int N, int K);
MOEDEF void moe_gemm_naive(int M, int N, int K, const float *A, int lda, int a_trans,
                           const float *B, int ldb, float *C, int ldc, int accumulate);

/* Weights packed ahead for many products of few rows (cached decoding, >>moe:generate): each
   registered matrix W (N, K) of out = x . W^T held in the GEMM's panel layout, found by W's
   address. Packing a matrix costs about as much as multiplying it by one row, so a product of
   a few rows packs nothing per call only when the panels are made once for many calls. The
   panels are a copy: they are valid while `live` is set, which their owner does only over
   calls that cannot change the weights. */
typedef struct moe_wpack_entry {
    const float *src; /* W, as the model's tensor table holds it */
    int N, K;
    size_t at;        /* its panels: panels + at, moe__packed_b_floats(K, N) floats */
} moe_wpack_entry;
typedef struct moe_wpack {
    moe_wpack_entry *mats; /* sorted by src */
    int count;
    float *panels;
    void *panels_raw; /* the allocation under panels (2 MB aligned, huge pages) */
    size_t floats;
    float *apack;  /* MOE_GEMM_MR x MOE_GEMM_KC per thread: a tile of rows for the micro-kernel */
    int nthreads;
    int live;
} moe_wpack;

/* @implementation */
/* ============================================================================================
   >>moe:matmul
   ============================================================================================
   GEMM in the GotoBLAS shape: for each (KC x NC) block of B, pack it into NR-wide column
   panels; for each (MC x KC) block of A, pack it into MR-tall row panels; a micro-kernel keeps
   an MR x NR tile of C in registers (a local array the compiler maps to vector registers) and
   runs the whole KC loop over it. Panels are zero-padded, so edge tiles use the same kernel
   and every element of C sees the same operations wherever it lies. */

/* Tile sizes. MR x NR is the block of C a micro-kernel keeps in registers: MR rows times NR
   columns of float accumulators, NR a multiple of the vector width. With AVX-512 (32 zmm
   registers of 16 floats) 8 x 32 takes 16 accumulators + 2 B vectors + 1 broadcast; the inner
   loop is then 2 loads, 8 broadcasts and 16 FMAs. AVX2 (16 ymm): 6 x 16 = 12 accumulators.
   KC: the depth of a packed panel pair; a B micro-panel (KC x NR) stays in L1 while the A
   panels stream past it. MC x KC of packed A and KC x NC of packed B are the L2 blocks.
   The K blocking is fixed (never depends on the thread count or on M, N), and every tile,
   edge tiles included, runs the same kernel on zero-padded panels: each element of C gets
   the same sequence of operations wherever it lies and however the work is split. */
#if defined(__AVX512F__) && !defined(__clang__)
#define MOE__GEMM_MR_DEFAULT 8
#define MOE__GEMM_NR_DEFAULT 32
#elif defined(__AVX2__) || defined(__AVX__) || defined(__AVX512F__) /* clang: 256-bit, see below */
#define MOE__GEMM_MR_DEFAULT 6
#define MOE__GEMM_NR_DEFAULT 16
#else
#define MOE__GEMM_MR_DEFAULT 4
#define MOE__GEMM_NR_DEFAULT 16
#endif
#ifndef MOE_GEMM_MR
#define MOE_GEMM_MR MOE__GEMM_MR_DEFAULT
#endif
#ifndef MOE_GEMM_NR
#define MOE_GEMM_NR MOE__GEMM_NR_DEFAULT
#endif
#ifndef MOE_GEMM_KC
#define MOE_GEMM_KC 256
#endif
#ifndef MOE_GEMM_MC
#define MOE_GEMM_MC 192
#endif
#ifndef MOE_GEMM_NC
#define MOE_GEMM_NC 2048
#endif
#if MOE_GEMM_MC % MOE_GEMM_MR != 0 || MOE_GEMM_NC % MOE_GEMM_NR != 0
#error "moe.h: MOE_GEMM_MC must be a multiple of MOE_GEMM_MR and MOE_GEMM_NC of MOE_GEMM_NR"
#endif

/* gcc and clang tune Skylake-and-later for 256-bit vectors (-mprefer-vector-width=256), which
   halves the FMA rate of the micro-kernel. gcc lifts that per function with this attribute;
   clang has no per-function switch (build with -mprefer-vector-width=512 and define
   MOE_GEMM_MR=8 MOE_GEMM_NR=32 to get it), so clang gets the 256-bit tile above.
   MOE__NO_AUTOVEC keeps clang's loop vectorizer off the k and row loops of the micro-kernel
   (it would vectorize them with gathers); the column loop is then vectorized as intended. */
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER) && __GNUC__ >= 8
#define MOE__GEMM_FN static __attribute__((target("prefer-vector-width=512")))
#else
#define MOE__GEMM_FN static
#endif
#if defined(__clang__)
#define MOE__NO_AUTOVEC _Pragma("clang loop vectorize(disable) interleave(disable)")
#else
#define MOE__NO_AUTOVEC
#endif

static int moe__round_up(int x, int m) { return (x + m - 1) / m * m; }

/* index of the calling thread inside a parallel loop, 0 outside */
static int moe__thread_index(void) {
#if MOE__OMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Ap (kc, MR) = rows [0, mr) of op(A), columns [0, kc), zero rows beyond mr */
MOE__GEMM_FN void moe__pack_a(float *MOE_RESTRICT Ap, const float *MOE_RESTRICT A, int lda, int a_trans,
                              int mr, int kc) {
    int i, p;
    if (!a_trans) {
        if (mr == MOE_GEMM_MR) {
            for (p = 0; p < kc; p++)
                for (i = 0; i < MOE_GEMM_MR; i++) Ap[p * MOE_GEMM_MR + i] = A[(size_t)i * lda + p];
        } else {
            for (p = 0; p < kc; p++)
                for (i = 0; i < MOE_GEMM_MR; i++) Ap[p * MOE_GEMM_MR + i] = i < mr ? A[(size_t)i * lda + p] : 0.0f;
        }
    } else { /* A stored (K, M): element (i, p) at A[p * lda + i] */
        if (mr == MOE_GEMM_MR) { /* constant trip count: vector moves, not a memcpy call */
            for (p = 0; p < kc; p++)
                for (i = 0; i < MOE_GEMM_MR; i++) Ap[p * MOE_GEMM_MR + i] = A[(size_t)p * lda + i];
        } else {
            for (p = 0; p < kc; p++)
                for (i = 0; i < MOE_GEMM_MR; i++) Ap[p * MOE_GEMM_MR + i] = i < mr ? A[(size_t)p * lda + i] : 0.0f;
        }
    }
}

/* Packed B. B (K, N), or with b_trans B stored (N, K) (a PyTorch weight read as its
   transpose). Layout: K in blocks of KC rows; block pc starts at pc * npad (npad = N rounded
   up to NR) and holds npad / NR panels of (kc, NR), zero columns beyond N.
   This packs panels [q0, q1) of every K block; callers split the panels over threads. */
MOE__GEMM_FN void moe__pack_b_panels(float *MOE_RESTRICT Bp, const float *MOE_RESTRICT B, int ldb,
                                     int b_trans, int K, int N, int q0, int q1) {
    int npad = moe__round_up(N, MOE_GEMM_NR), pc, q, p, j;
    for (pc = 0; pc < K; pc += MOE_GEMM_KC) {
        int kc = K - pc < MOE_GEMM_KC ? K - pc : MOE_GEMM_KC;
        for (q = q0; q < q1; q++) {
            int j0 = q * MOE_GEMM_NR, nr = N - j0 < MOE_GEMM_NR ? N - j0 : MOE_GEMM_NR;
            float *dst = Bp + (size_t)pc * npad + (size_t)j0 * kc;
            if (!b_trans) {
                for (p = 0; p < kc; p++) {
                    const float *b = B + (size_t)(pc + p) * ldb + j0;
                    float *o = dst + (size_t)p * MOE_GEMM_NR;
                    if (nr == MOE_GEMM_NR) {
                        for (j = 0; j < MOE_GEMM_NR; j++) o[j] = b[j];
                    } else {
                        for (j = 0; j < nr; j++) o[j] = b[j];
                        for (; j < MOE_GEMM_NR; j++) o[j] = 0.0f;
                    }
                }
            } else { /* row j of the stored matrix is column j of B. Transposed through a
                        (16, NR) tile that stays in L1, so that the panel is written a whole
                        row at a time: 1.4-1.65x faster than writing it column by column. */
                float t[16][MOE_GEMM_NR];
                int p0;
                for (p0 = 0; p0 < kc; p0 += 16) {
                    int np = kc - p0 < 16 ? kc - p0 : 16;
                    const float *b = B + (size_t)j0 * ldb + pc + p0;
                    if (nr == MOE_GEMM_NR && np == 16) { /* constant trip counts: vector loads */
                        for (j = 0; j < MOE_GEMM_NR; j++)
                            for (p = 0; p < 16; p++) t[p][j] = b[(size_t)j * ldb + p];
                    } else {
                        for (j = 0; j < MOE_GEMM_NR; j++)
                            for (p = 0; p < np; p++) t[p][j] = j < nr ? b[(size_t)j * ldb + p] : 0.0f;
                    }
                    memcpy(dst + (size_t)p0 * MOE_GEMM_NR, t, sizeof(float) * MOE_GEMM_NR * (size_t)np);
                }
            }
        }
    }
}

static size_t moe__packed_b_floats(int K, int N) { return (size_t)K * (size_t)moe__round_up(N, MOE_GEMM_NR); }

/* C tile (mr, nr) (+)= Ap . Bp over kc. acc[][] is what the compiler keeps in registers:
   the i and j loops have constant trip counts and unroll completely. */
MOE__GEMM_FN void moe__gemm_micro(int kc, const float *MOE_RESTRICT Ap, const float *MOE_RESTRICT Bp,
                                  float *MOE_RESTRICT C, int ldc, int mr, int nr, int accumulate) {
    float acc[MOE_GEMM_MR][MOE_GEMM_NR];
    int i, j, p;
    for (i = 0; i < MOE_GEMM_MR; i++)
        for (j = 0; j < MOE_GEMM_NR; j++) acc[i][j] = 0.0f;
    MOE__NO_AUTOVEC
    for (p = 0; p < kc; p++) {
        const float *b = Bp + (size_t)p * MOE_GEMM_NR;
        const float *a = Ap + (size_t)p * MOE_GEMM_MR;
        MOE__NO_AUTOVEC
        for (i = 0; i < MOE_GEMM_MR; i++) {
            float ai = a[i];
            for (j = 0; j < MOE_GEMM_NR; j++) acc[i][j] += ai * b[j];
        }
    }
    if (mr == MOE_GEMM_MR && nr == MOE_GEMM_NR) {
        if (accumulate)
            for (i = 0; i < MOE_GEMM_MR; i++)
                for (j = 0; j < MOE_GEMM_NR; j++) C[(size_t)i * ldc + j] += acc[i][j];
        else
            for (i = 0; i < MOE_GEMM_MR; i++)
                for (j = 0; j < MOE_GEMM_NR; j++) C[(size_t)i * ldc + j] = acc[i][j];
    } else {
        for (i = 0; i < mr; i++) {
            float *c = C + (size_t)i * ldc;
            if (accumulate)
                for (j = 0; j < nr; j++) c[j] += acc[i][j];
            else
                for (j = 0; j < nr; j++) c[j] = acc[i][j];
        }
    }
}

/* The driver. C (M, N) (+)= op(A) (M, K) . B[:, j0:j0+N], B packed by moe__pack_b_panels
   with npad columns (j0 a multiple of NR). Ap: MC * KC floats of workspace. */
MOE__GEMM_FN void moe__gemm_packed(int M, int N, int K, const float *A, int lda, int a_trans,
                                   const float *Bp, int npad, int j0, float *C, int ldc,
                                   int accumulate, float *MOE_RESTRICT Ap) {
    int jc, pc, ic, jr, ir;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (ic = 0; ic < M; ic++) memset(C + (size_t)ic * ldc, 0, (size_t)N * sizeof(float));
        return;
    }
    for (jc = 0; jc < N; jc += MOE_GEMM_NC) {
        int nc = N - jc < MOE_GEMM_NC ? N - jc : MOE_GEMM_NC;
        for (pc = 0; pc < K; pc += MOE_GEMM_KC) {
            int kc = K - pc < MOE_GEMM_KC ? K - pc : MOE_GEMM_KC;
            int acc = accumulate || pc > 0;
            const float *bblock = Bp + (size_t)pc * npad + (size_t)(j0 + jc) * kc;
            for (ic = 0; ic < M; ic += MOE_GEMM_MC) {
                int mc = M - ic < MOE_GEMM_MC ? M - ic : MOE_GEMM_MC;
                for (ir = 0; ir < mc; ir += MOE_GEMM_MR) {
                    int mr = mc - ir < MOE_GEMM_MR ? mc - ir : MOE_GEMM_MR;
                    const float *a = a_trans ? A + (size_t)pc * lda + ic + ir : A + (size_t)(ic + ir) * lda + pc;
                    moe__pack_a(Ap + (size_t)ir * kc, a, lda, a_trans, mr, kc);
                }
                for (jr = 0; jr < nc; jr += MOE_GEMM_NR) {
                    int nr = nc - jr < MOE_GEMM_NR ? nc - jr : MOE_GEMM_NR;
                    for (ir = 0; ir < mc; ir += MOE_GEMM_MR) {
                        int mr = mc - ir < MOE_GEMM_MR ? mc - ir : MOE_GEMM_MR;
                        moe__gemm_micro(kc, Ap + (size_t)ir * kc, bblock + (size_t)jr * kc,
                                        C + (size_t)(ic + ir) * ldc + jc + jr, ldc, mr, nr, acc);
                    }
                }
            }
        }
    }
}

/* One row against four panels: the micro-kernel's operations for that row (acc = 0, then
   acc += a . b in k order, then C = or += acc), so the same bits as moe__gemm_packed gives it,
   with eight accumulators instead of the micro-kernel's tile of rows that one row would leave
   empty. nr4: the valid columns of the four panels (at most 4 NR). */
MOE__GEMM_FN void moe__gemm_row4(int kc, const float *MOE_RESTRICT a, const float *MOE_RESTRICT Bp, float *MOE_RESTRICT C,
                                 int nr4, int accumulate) {
    const size_t ps = (size_t)kc * MOE_GEMM_NR;
    const float *b0 = Bp, *b1 = Bp + ps, *b2 = Bp + 2 * ps, *b3 = Bp + 3 * ps;
    float c0[MOE_GEMM_NR], c1[MOE_GEMM_NR], c2[MOE_GEMM_NR], c3[MOE_GEMM_NR];
    int j, p;
    for (j = 0; j < MOE_GEMM_NR; j++) c0[j] = c1[j] = c2[j] = c3[j] = 0.0f;
    MOE__NO_AUTOVEC
    for (p = 0; p < kc; p++) {
        float ap = a[p];
        size_t o = (size_t)p * MOE_GEMM_NR;
        for (j = 0; j < MOE_GEMM_NR; j++) {
            c0[j] += ap * b0[o + j];
            c1[j] += ap * b1[o + j];
            c2[j] += ap * b2[o + j];
            c3[j] += ap * b3[o + j];
        }
    }
    if (nr4 == 4 * MOE_GEMM_NR) {
        if (accumulate)
            for (j = 0; j < MOE_GEMM_NR; j++) {
                C[j] += c0[j]; C[MOE_GEMM_NR + j] += c1[j]; C[2 * MOE_GEMM_NR + j] += c2[j]; C[3 * MOE_GEMM_NR + j] += c3[j];
            }
        else
            for (j = 0; j < MOE_GEMM_NR; j++) {
                C[j] = c0[j]; C[MOE_GEMM_NR + j] = c1[j]; C[2 * MOE_GEMM_NR + j] = c2[j]; C[3 * MOE_GEMM_NR + j] = c3[j];
            }
    } else {
        for (j = 0; j < nr4; j++) {
            float v = j < MOE_GEMM_NR ? c0[j] : j < 2 * MOE_GEMM_NR ? c1[j - MOE_GEMM_NR] : j < 3 * MOE_GEMM_NR ? c2[j - 2 * MOE_GEMM_NR] : c3[j - 3 * MOE_GEMM_NR];
            C[j] = accumulate ? C[j] + v : v;
        }
    }
}

/* out (M, N) columns of panels [q0, q1) = inp (M, K) . W^T from W's panels Bp
   (moe__pack_b_panels with b_trans): moe__gemm_packed's operations for every element, hence
   its bits whatever M or the panel range. One row: four panels at a time (moe__gemm_row4);
   more rows: tiles of MR rows packed into Ap (MR x KC floats) for the micro-kernel. */
MOE__GEMM_FN void moe__gemm_panels(float *out, const float *inp, const float *Bp, int M, int K, int N, int q0, int q1,
                                   float *MOE_RESTRICT Ap) {
    int npad = moe__round_up(N, MOE_GEMM_NR), pc, q, i;
    for (pc = 0; pc < K; pc += MOE_GEMM_KC) {
        int kc = K - pc < MOE_GEMM_KC ? K - pc : MOE_GEMM_KC, acc = pc > 0;
        const float *bblock = Bp + (size_t)pc * npad;
        if (M == 1) {
            for (q = q0; q < q1; q += 4) {
                int j0 = q * MOE_GEMM_NR, nq = q1 - q < 4 ? q1 - q : 4, nr4 = N - j0 < nq * MOE_GEMM_NR ? N - j0 : nq * MOE_GEMM_NR;
                if (nq == 4) {
                    moe__gemm_row4(kc, inp + pc, bblock + (size_t)j0 * kc, out + j0, nr4, acc);
                } else { /* the last one to three panels: one at a time through the micro-kernel */
                    int k;
                    moe__pack_a(Ap, inp + pc, K, 0, 1, kc);
                    for (k = 0; k < nq; k++) {
                        int jk = j0 + k * MOE_GEMM_NR, nr = N - jk < MOE_GEMM_NR ? N - jk : MOE_GEMM_NR;
                        moe__gemm_micro(kc, Ap, bblock + (size_t)jk * kc, out + jk, N, 1, nr, acc);
                    }
                }
            }
        } else {
            for (i = 0; i < M; i += MOE_GEMM_MR) {
                int mr = M - i < MOE_GEMM_MR ? M - i : MOE_GEMM_MR;
                moe__pack_a(Ap, inp + (size_t)i * K + pc, K, 0, mr, kc);
                for (q = q0; q < q1; q++) {
                    int j0 = q * MOE_GEMM_NR, nr = N - j0 < MOE_GEMM_NR ? N - j0 : MOE_GEMM_NR;
                    moe__gemm_micro(kc, Ap, bblock + (size_t)j0 * kc, out + (size_t)i * N + j0, N, mr, nr, acc);
                }
            }
        }
    }
}

static int moe__wpack_live(const moe_wpack *pk) { return pk && pk->live; }

/* the panels of W (N, K) when pk is live and holds them, else NULL */
static const float *moe__wpack_find(const moe_wpack *pk, const float *W, int N, int K) {
    int lo = 0, hi;
    if (!moe__wpack_live(pk)) return NULL;
    hi = pk->count - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        const moe_wpack_entry *e = &pk->mats[mid];
        if (e->src == W) return e->N == N && e->K == K ? pk->panels + e->at : NULL;
        if ((uintptr_t)e->src < (uintptr_t)W) lo = mid + 1;
        else hi = mid - 1;
    }
    return NULL;
}

/* multiply-adds below which a product runs on one thread: waking a sleeping thread
   (OMP_WAIT_POLICY=PASSIVE) costs tens of microseconds, tens of thousands of multiply-adds
   (2e6: batch-16 decoding of the demo model no slower on two threads than on one) */
#ifndef MOE__DECODE_THREAD_MACS
#define MOE__DECODE_THREAD_MACS 2e6
#endif

/* out (M, N) = inp (M, K) . W^T on W's panels when pk is live and holds them (returns 1), with
   the GEMM's bits; threads split the panels above MOE__DECODE_THREAD_MACS. Else returns 0. */
static int moe__wpack_product(float *out, const float *inp, const float *W, int M, int K, int N, int nthreads,
                              const moe_wpack *pk) {
    const float *Bp = moe__wpack_find(pk, W, N, K);
    int nq, nt, t;
    if (!Bp) return 0;
    nq = moe__round_up(N, MOE_GEMM_NR) / MOE_GEMM_NR;
    nt = nthreads < pk->nthreads ? nthreads : pk->nthreads;
    if (nt > nq) nt = nq;
    if (nt > 1 && (double)M * K * N > MOE__DECODE_THREAD_MACS) {
        MOE__OMP_FOR_DYNAMIC_N(nt)
        for (t = 0; t < nt; t++)
            moe__gemm_panels(out, inp, Bp, M, K, N, nq * t / nt, nq * (t + 1) / nt,
                             pk->apack + (size_t)moe__thread_index() * MOE_GEMM_MR * MOE_GEMM_KC);
    } else {
        moe__gemm_panels(out, inp, Bp, M, K, N, 0, nq, pk->apack);
    }
    return 1;
}

/* Building a pack: a first pass of moe__wpack_put over the matrices counts (mats NULL), then
   moe__wpack_alloc, a second pass records them, moe__wpack_sort; moe__wpack_fill packs. */
static void moe__wpack_put(moe_wpack *pk, const float *W, int N, int K) {
    if (pk->mats) {
        moe_wpack_entry *e = &pk->mats[pk->count];
        e->src = W; e->N = N; e->K = K; e->at = pk->floats;
    }
    pk->count++;
    pk->floats += moe__packed_b_floats(K, N);
}

static int moe__wpack_alloc(moe_wpack *pk, int nthreads) {
    pk->nthreads = nthreads < 1 ? 1 : nthreads;
    pk->mats = (moe_wpack_entry *)moe__calloc((size_t)pk->count, sizeof(moe_wpack_entry));
    pk->panels = (float *)moe__calloc_huge(pk->floats, sizeof(float), &pk->panels_raw);
    pk->apack = (float *)moe__calloc((size_t)MOE_GEMM_MR * MOE_GEMM_KC * (size_t)pk->nthreads, sizeof(float));
    pk->count = 0;
    pk->floats = 0;
    return pk->mats && pk->panels && pk->apack;
}

static int moe__wpack_cmp(const void *a, const void *b) {
    uintptr_t x = (uintptr_t)((const moe_wpack_entry *)a)->src, y = (uintptr_t)((const moe_wpack_entry *)b)->src;
    return x < y ? -1 : x > y;
}

static void moe__wpack_sort(moe_wpack *pk) { qsort(pk->mats, (size_t)pk->count, sizeof(moe_wpack_entry), moe__wpack_cmp); }

/* (re)packs every matrix from its current values */
static void moe__wpack_fill(moe_wpack *pk, int nthreads) {
    int i;
    MOE__OMP_FOR_DYNAMIC_N(nthreads)
    for (i = 0; i < pk->count; i++) {
        const moe_wpack_entry *e = &pk->mats[i];
        moe__pack_b_panels(pk->panels + e->at, e->src, e->K, 1, e->K, e->N, 0, moe__round_up(e->N, MOE_GEMM_NR) / MOE_GEMM_NR);
    }
}

static void moe__wpack_free(moe_wpack *pk) {
    MOE_FREE(pk->mats);
    MOE_FREE(pk->panels_raw);
    MOE_FREE(pk->apack);
    memset(pk, 0, sizeof *pk);
}

/* Scratch of the GEMM of a (K, N) B: its packed copy, then one A block (MC x KC) per thread
   (the single-threaded GEMM is the nthreads = 1 case). */
static size_t moe__gemm_work(int K, int N, int nthreads) {
    return moe__packed_b_floats(K > 0 ? K : 0, N > 0 ? N : 0) + (size_t)MOE_GEMM_MC * MOE_GEMM_KC * (size_t)(nthreads > 1 ? nthreads : 1);
}

/* single-threaded GEMM with an optionally transposed B; ws: moe__gemm_work(K, N, 1) floats */
static void moe__gemm_ex(int M, int N, int K, const float *A, int lda, int a_trans, const float *B,
                         int ldb, int b_trans, float *C, int ldc, int accumulate, float *ws) {
    float *Ap = ws, *Bp = ws + (size_t)MOE_GEMM_MC * MOE_GEMM_KC;
    int npad = moe__round_up(N, MOE_GEMM_NR);
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        moe__gemm_packed(M, N, K, A, lda, a_trans, NULL, npad, 0, C, ldc, accumulate, NULL);
        return;
    }
    moe__pack_b_panels(Bp, B, ldb, b_trans, K, N, 0, npad / MOE_GEMM_NR);
    moe__gemm_packed(M, N, K, A, lda, a_trans, Bp, npad, 0, C, ldc, accumulate, Ap);
}

MOE__IMPL size_t moe_gemm_work_floats(int M, int N, int K) {
    (void)M;
    return moe__gemm_work(K, N, 1);
}

MOE__IMPL moe_status moe_gemm(int M, int N, int K, const float *A, int lda, int a_trans, const float *B,
                              int ldb, float *C, int ldc, int accumulate, moe_work *work) {
    float *own, *ws;
    moe_status st;
    if (M <= 0 || N <= 0) return MOE_OK;
    ws = moe__work_get(work, moe__gemm_work(K, N, 1), &own, &st);
    if (st != MOE_OK) return st;
    moe__gemm_ex(M, N, K, A, lda, a_trans, B, ldb, 0, C, ldc, accumulate, ws);
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL void moe_gemm_naive(int M, int N, int K, const float *A, int lda, int a_trans,
                              const float *B, int ldb, float *C, int ldc, int accumulate) {
    int i, j, p;
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++) {
            double acc = accumulate ? (double)C[(size_t)i * ldc + j] : 0.0;
            for (p = 0; p < K; p++) {
                float a = a_trans ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                acc += (double)a * B[(size_t)p * ldb + j];
            }
            C[(size_t)i * ldc + j] = (float)acc;
        }
}

/* Rows per task when n rows are shared by nthreads: whole micro-tiles, at most one A block
   (MC rows), about four tasks per thread or more, and a task count that is a multiple of
   the thread count, so that equal tasks handed out in turn end together (2048 rows in
   blocks of 192 made 11 tasks: one thread ran 6 while the other ran 5 and then waited). */
static int moe__task_rows(int n, int nthreads) {
    int ntask = (n + MOE_GEMM_MC - 1) / MOE_GEMM_MC, rb;
    if (ntask < 4 * nthreads) ntask = 4 * nthreads;
    ntask = moe__round_up(ntask, nthreads);
    rb = moe__round_up((n + ntask - 1) / ntask, MOE_GEMM_MR);
    if (rb < 2 * MOE_GEMM_MR) rb = 2 * MOE_GEMM_MR;
    return rb < MOE_GEMM_MC ? rb : MOE_GEMM_MC;
}

/* C (M, N) (+)= op(A) . op(B) on up to nthreads threads, on ws (moe__gemm_work(K, N, nthreads)
   floats). B is packed once (its panels split over the threads), then each task owns a block
   of rows of C (or of columns when M is small). Blocks are multiples of the micro-tile and K
   is blocked the same way in every task, so the split never changes any element's arithmetic. */
static void moe__gemm_parallel(int M, int N, int K, const float *A, int lda, int a_trans, const float *B,
                               int ldb, int b_trans, float *C, int ldc, int accumulate, float *ws, int nthreads) {
    int npad, npanel, q, nb, b;
    size_t work = (size_t)MOE_GEMM_MC * MOE_GEMM_KC;
    float *Bp = ws, *Ap;
    if (nthreads <= 1 || 2.0 * M * N * K < 4e6 || K <= 0) {
        moe__gemm_ex(M, N, K, A, lda, a_trans, B, ldb, b_trans, C, ldc, accumulate, ws);
        return;
    }
    npad = moe__round_up(N, MOE_GEMM_NR);
    npanel = npad / MOE_GEMM_NR;
    Ap = Bp + moe__packed_b_floats(K, N);
    MOE__OMP_FOR_N(nthreads)
    for (q = 0; q < npanel; q++) moe__pack_b_panels(Bp, B, ldb, b_trans, K, N, q, q + 1);
    if (M >= 4 * MOE_GEMM_MR * nthreads) {
        int rb = moe__task_rows(M, nthreads);
        nb = (M + rb - 1) / rb;
        MOE__OMP_FOR_DYNAMIC_N(nthreads)
        for (b = 0; b < nb; b++) {
            int r0 = b * rb, rows = M - r0 < rb ? M - r0 : rb;
            const float *a = a_trans ? A + r0 : A + (size_t)r0 * lda;
            moe__gemm_packed(rows, N, K, a, lda, a_trans, Bp, npad, 0, C + (size_t)r0 * ldc, ldc, accumulate,
                             Ap + work * (size_t)moe__thread_index());
        }
    } else {
        int cb = (npanel + 2 * nthreads - 1) / (2 * nthreads) * MOE_GEMM_NR;
        nb = (N + cb - 1) / cb;
        MOE__OMP_FOR_DYNAMIC_N(nthreads)
        for (b = 0; b < nb; b++) {
            int c0 = b * cb, cols = N - c0 < cb ? N - c0 : cb;
            moe__gemm_packed(M, cols, K, A, lda, a_trans, Bp, npad, c0, C + c0, ldc, accumulate,
                             Ap + work * (size_t)moe__thread_index());
        }
    }
}

static void moe__add_bias_rows(float *out, const float *bias, int M, int N) {
    int i, j;
    if (!bias) return;
    MOE_OMP_FOR_IF((double)M * N > 1e5)
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++) out[(size_t)i * N + j] += bias[j];
}

/* db (N) += column sums of dout (M, N), each column summed in row order (rows streamed) */
static void moe__colsum_acc_serial(float *db, const float *dout, int M, int N) {
    float acc[256];
    int j0, i, j;
    for (j0 = 0; j0 < N; j0 += 256) {
        int nc = N - j0 < 256 ? N - j0 : 256;
        for (j = 0; j < nc; j++) acc[j] = 0.0f;
        for (i = 0; i < M; i++) {
            const float *r = dout + (size_t)i * N + j0;
            for (j = 0; j < nc; j++) acc[j] += r[j];
        }
        for (j = 0; j < nc; j++) db[j0 + j] += acc[j];
    }
}

/* the same, blocks of 64 columns split over threads */
static void moe__colsum_acc(float *db, const float *dout, int M, int N) {
    int nb = (N + 63) / 64, b;
    MOE_OMP_FOR_IF((double)M * N > 1e5)
    for (b = 0; b < nb; b++) {
        int c0 = b * 64, cols = N - c0 < 64 ? N - c0 : 64;
        float acc[64];
        int i, j;
        for (j = 0; j < cols; j++) acc[j] = 0.0f;
        for (i = 0; i < M; i++) {
            const float *r = dout + (size_t)i * N + c0;
            for (j = 0; j < cols; j++) acc[j] += r[j];
        }
        for (j = 0; j < cols; j++) db[c0 + j] += acc[j];
    }
}

/* forward packs weight (K, N as B), backward's dinp packs weight (N, K), its dweight inp (M, K) */
MOE__IMPL size_t moe_matmul_work_floats(int M, int K, int N, int nthreads) {
    size_t f = moe__gemm_work(K, N, nthreads), di = moe__gemm_work(N, K, nthreads), dw = moe__gemm_work(M, K, nthreads);
    f = f > di ? f : di;
    return f > dw ? f : dw;
}

MOE__IMPL moe_status moe_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                                        int M, int K, int N, moe_work *work) {
    int nt = moe__work_threads(work);
    float *own, *ws;
    moe_status st;
    if (M <= 0 || N <= 0) return MOE_OK;
    if (K > 0 && work && moe__wpack_product(out, inp, weight, M, K, N, nt, work->pack)) { /* packed ahead */
        moe__add_bias_rows(out, bias, M, N);
        return MOE_OK;
    }
    ws = moe__work_get(work, moe__gemm_work(K, N, nt), &own, &st);
    if (st != MOE_OK) return st;
    /* weight (N, K) is B^T: packing reads it directly, no transposed copy */
    moe__gemm_parallel(M, N, K, inp, K, 0, weight, K, 1, out, N, 0, ws, nt);
    moe__add_bias_rows(out, bias, M, N);
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL moe_status moe_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                         const float *inp, const float *weight, int M, int K, int N,
                                         moe_work *work) {
    int nt = moe__work_threads(work);
    size_t need = 0, w;
    float *own, *ws;
    moe_status st;
    if (M <= 0 || N <= 0) return MOE_OK; /* nothing to add */
    if (dinp) need = moe__gemm_work(N, K, nt);
    if (dweight && (w = moe__gemm_work(M, K, nt)) > need) need = w;
    ws = moe__work_get(work, need, &own, &st);
    if (st != MOE_OK) return st;
    if (dinp) moe__gemm_parallel(M, K, N, dout, N, 0, weight, K, 0, dinp, K, 1, ws, nt);    /* dout . W   */
    if (dweight) moe__gemm_parallel(N, K, M, dout, N, 1, inp, K, 0, dweight, K, 1, ws, nt); /* dout^T . x */
    if (dbias) moe__colsum_acc(dbias, dout, M, N);
    MOE_FREE(own);
    return MOE_OK;
}

MOE__IMPL void moe_matmul_forward_naive(float *out, const float *inp, const float *weight,
                                        const float *bias, int M, int K, int N) {
    int i, j, p;
    for (i = 0; i < M; i++)
        for (j = 0; j < N; j++) {
            double acc = bias ? bias[j] : 0.0;
            for (p = 0; p < K; p++) acc += (double)inp[(size_t)i * K + p] * weight[(size_t)j * K + p];
            out[(size_t)i * N + j] = (float)acc;
        }
}

MOE__IMPL void moe_matmul_backward_naive(float *dinp, float *dweight, float *dbias, const float *dout,
                                         const float *inp, const float *weight, int M, int K, int N) {
    int i, j, p;
    if (dinp)
        for (i = 0; i < M; i++)
            for (p = 0; p < K; p++) {
                double acc = 0.0;
                for (j = 0; j < N; j++) acc += (double)dout[(size_t)i * N + j] * weight[(size_t)j * K + p];
                dinp[(size_t)i * K + p] += (float)acc;
            }
    if (dweight)
        for (j = 0; j < N; j++)
            for (p = 0; p < K; p++) {
                double acc = 0.0;
                for (i = 0; i < M; i++) acc += (double)dout[(size_t)i * N + j] * inp[(size_t)i * K + p];
                dweight[(size_t)j * K + p] += (float)acc;
            }
    if (dbias)
        for (j = 0; j < N; j++) {
            double acc = 0.0;
            for (i = 0; i < M; i++) acc += dout[(size_t)i * N + j];
            dbias[j] += (float)acc;
        }
}

