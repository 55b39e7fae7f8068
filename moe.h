/* moe.h - v0.1.0 - MIT licence - Mixture-of-Experts in one C99 header: numeric core, experts, routers.

   Define MOE_IMPLEMENTATION in exactly ONE .c (or .cpp / .cu) file before including this header:

       #define MOE_IMPLEMENTATION
       #include "moe.h"

   Other files include "moe.h" for the declarations only.

   ABOUT
   A reference implementation, small enough to read, of the Mixture-of-Experts research line:
   a numeric core (kernels with their backward passes, AdamW, one flat parameter store,
   checkpoints), experts stacked per layer, and the router families: softmax top-k with and
   without renormalisation, sigmoid gating, Shazeer noisy top-k, expert-choice, capacity factor,
   shared and fine-grained experts, the standard auxiliary losses, Autonomy-of-Experts,
   the layerwise recurrent (GRU) router, Global-Workspace broadcast and HyperMoE; and a tiny
   decoder-only MoE transformer that trains on a laptop. Everything is float32, every parallel
   loop owns its outputs, so results are bit-identical for any number of threads.

   QUICK START (one MoE layer, trained on your own data)

       moe_store S;                       // THE parameter store: params/grads/Adam m,v
       moe_layer L;                       // one MoE layer: config, tensor ids, activations
       moe_layer_config c = moe_layer_config_default();
       c.d = 64; c.d_ff = 128; c.n_experts = 8; c.top_k = 2;
       moe_store_init(&S);
       moe_layer_init(&L, &c, &S, "moe.", 1024);    // declares tensors, sizes activations
       moe_store_alloc(&S, 1);                        // params + grads + Adam moments
       moe_layer_init_weights(&L, &S, &rng);
       moe_layer_forward(&L, &S, y, x, T, NULL);      // y = MoE(x), T <= 1024 tokens
       ... dy = dLoss/dy ...
       moe_store_zero_grad(&S);
       moe_layer_backward(&L, &S, dx, dy);            // ACCUMULATES into S.grads (+ aux losses)
       moe_adamw_step(&S, &opt, lr, step);
       moe_layer_free(&L); moe_store_free(&S);

   Every function that can fail on user input returns a moe_status (0 = MOE_OK, negative =
   error) and leaves a sentence in the caller's moe_err (a field of the object it works on, or
   an argument). The library never prints, never exits.

   BUILD OPTIONS (define before including; "everywhere" = in every file that includes moe.h)
       MOE_IMPLEMENTATION   this file holds the implementation                    (one file)
       MOE_STATIC           all functions static (private copy per file)          (everywhere)
       MOEDEF               override the declaration qualifier                    (everywhere)
       MOE_ASSERT(x)        internal invariant check, default assert()            (impl. file)
       MOE_MALLOC(n), MOE_FREE(p)  allocator, both or neither, default malloc/free (impl. file)
       MOE_NO_STDIO         drop file I/O (checkpoints)                           (everywhere)
       MOE_NO_OPENMP        ignore OpenMP even when the compiler enables it       (impl. file)
       MOE_NO_SIMD          no AVX intrinsics (the AdamW loop), portable C only   (impl. file)
   OpenMP is used when the compiler defines _OPENMP (-fopenmp). Thread count: OMP_NUM_THREADS.

   CONVENTIONS
   - Shapes are written outermost-first, (T, d) = T rows of d contiguous floats.
     Letters: T tokens, d model width, D expert hidden width, E experts, K experts per token,
     S shared experts, N assignments (token, expert) pairs, V vocabulary.
   - Weights are (out, in) as in PyTorch's nn.Linear; experts stack as (E, out, in).
   - Forward functions: outputs, caches, inputs, weights, sizes. Backward functions: input
     gradients, weight gradients, output gradient, forward inputs/caches, sizes.
   - BACKWARD FUNCTIONS ACCUMULATE (+=) INTO EVERY GRADIENT. Zero the gradients once per
     optimizer step (moe_store_zero_grad); micro-batch accumulation is then free.
   - Routing is data: every router fills the same assignment list (token, expert, weight),
     grouped by expert with a stable counting sort; experts consume it; combine sums each
     token's contributions in a fixed order. Top-k ties go to the lower expert index.

   TABLE OF CONTENTS (search for the anchor; it opens the section in both halves)
       1. core        >>moe:core      status codes, errors, allocator, RNG, timer
       2. store       >>moe:store     THE tensor table over flat params/grads/m/v, fingerprint
       3. optim       >>moe:optim     AdamW, global gradient-norm clipping, warm-up + cosine
       4. ckpt        >>moe:ckpt      checkpoint file: one versioned format, atomic, CRC-32
       5. matmul      >>moe:matmul    packed, register-tiled GEMM; matmul forward/backward
                                      (+ naive references)
       6. kernels     >>moe:kernels   softmax, SiLU, GELU, ReLU, SwiGLU, RMSNorm, LayerNorm,
                                      cross-entropy: forward/backward pairs
       7. experts     >>moe:experts   SwiGLU and two-matrix FFN experts on gathered tokens
       8. dispatch    >>moe:dispatch  the assignment list: counting sort, gather, combine
       9. router      >>moe:router    softmax top-k (Switch / Mixtral), sigmoid, Shazeer noisy
                                      top-k, expert-choice, AoE; GW-MoE broadcast; capacity;
                                      balance losses (Switch / HF-Mixtral / DeepSeek), z-loss
      10. layer       >>moe:layer     the MoE layer: forward, backward, routing statistics;
                                      shared experts; AoE's cache; HyperMoE's hyper-expert
      11. attention   >>moe:attention causal multi-head self-attention, rotary positions
      12. gru         >>moe:gru       the GRU cell of RMoE's layerwise recurrent router
      13. model       >>moe:model     tiny decoder-only (MoE) transformer over bytes: forward,
                                      backward, generation; RMoE / MLP router inputs
      14. data        >>moe:data      byte-window batches from one or several sources

   Where each router family lives (forward, backward, test):
       top-k, sigmoid, noisy, expert-choice   moe__route_token / moe__build_assignments,
                                              moe__router_backward_token; tests/test_layer.c
       AoE                                    moe__aoe_logits, moe__aoe_gate_forward/backward,
                                              moe__aoe_logits_backward; test_aoe in test_layer.c
       GW-MoE                                 moe__gw_mark; test_gw in test_layer.c
       HyperMoE                               moe__hyper_forward/backward; test_hyper
       RMoE (GRU through depth), MLP router   moe_gru_*, moe_model_forward, moe__router_input_
                                              backward; test_recurrent_router in test_model.c

   Tests: tests/test_core.c (1-4), tests/test_kernels.c and tests/test_gemm.c (5, 6, 12),
   tests/test_layer.c (7-10), tests/test_model.c (11-14); PyTorch goldens: tests/test_golden.c
   (5-10), tests/test_model_golden.c (11-13), tests/test_family_golden.c (AoE, GW-MoE,
   HyperMoE, RMoE). Benchmarks: bench/.

   LICENCE: MIT, at the end of the file.
*/
#ifndef MOE_H_INCLUDED
#define MOE_H_INCLUDED

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
#define MOE_VERSION_STRING "0.1.0"

#include <stddef.h>
#include <stdint.h>

#ifndef MOEDEF
#ifdef MOE_STATIC
#define MOEDEF static
#else
#define MOEDEF extern
#endif
#endif

#if defined(__cplusplus) || defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define MOE_RESTRICT __restrict
#else
#define MOE_RESTRICT restrict
#endif

#ifdef __cplusplus
extern "C" {
#endif

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
    X(MOE_ERR_UNSUPPORTED, -8, "unsupported on this platform")

#define MOE__STATUS_ENUM(name, value, text) name = value,
typedef enum moe_status { MOE__STATUS_LIST(MOE__STATUS_ENUM) MOE__STATUS_LAST = -9 } moe_status;
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
} moe_work;

/* buf for `floats` floats (none when 0) and per-thread regions for nthreads (< 1: 1) */
MOEDEF moe_status moe_work_alloc(moe_work *w, size_t floats, int nthreads);
MOEDEF void moe_work_free(moe_work *w); /* safe on a zeroed or freed workspace */
MOEDEF double moe_time_seconds(void); /* monotonic wall clock (seconds), for benchmarks       */

/* ============================================================================================
   >>moe:store  THE tensor table over flat buffers
   ============================================================================================
   Parameters, gradients and the AdamW moments are each ONE flat float buffer in the same order.
   The table lists every tensor (name, shape, offset); optimizer, clipping, checkpoints and
   (later) averaging, growth and masking all walk these flat buffers through this one table. */

#define MOE_MAX_DIMS 4
#define MOE_NAME_LEN 64

enum { MOE_TENSOR_DECAY = 1 }; /* flags: apply AdamW weight decay to this tensor */

typedef struct moe_tensor {
    char name[MOE_NAME_LEN]; /* e.g. "layer0.moe.w_gate"                          */
    int ndim;                /* 1..MOE_MAX_DIMS                                   */
    int shape[MOE_MAX_DIMS]; /* outermost first                                    */
    size_t offset;           /* in floats, into params/grads/adam_m/adam_v        */
    size_t numel;
    int flags;               /* MOE_TENSOR_DECAY                                  */
} moe_tensor;

typedef struct moe_store {
    moe_tensor *tensors; /* (count) the table                                        */
    int count, capacity;
    size_t numel;        /* total floats per buffer                                   */
    float *params;       /* (numel)                                                   */
    float *grads;        /* (numel) backward passes accumulate here                   */
    float *adam_m;       /* (numel) NULL unless allocated with the optimizer          */
    float *adam_v;       /* (numel)                                                   */
    int allocated;       /* 1 after moe_store_alloc: the table is frozen               */
    moe_err err;
} moe_store;

MOEDEF void moe_store_init(moe_store *s);
/* Declares a tensor; dims after the last used one are 0. Returns its id (>= 0) or -1. */
MOEDEF int moe_store_add(moe_store *s, const char *name, int flags, int n0, int n1, int n2, int n3);
MOEDEF moe_status moe_store_alloc(moe_store *s, int with_optimizer); /* zero-filled buffers */
MOEDEF void moe_store_free(moe_store *s);
MOEDEF int moe_store_find(const moe_store *s, const char *name); /* id or -1 */
MOEDEF float *moe_store_param(const moe_store *s, int id);      /* NULL for id < 0 */
MOEDEF float *moe_store_grad(const moe_store *s, int id);
MOEDEF void moe_store_zero_grad(moe_store *s);
/* FNV-1a 64 over every (name, shape, flags): two stores with equal fingerprints have the
   same layout, so their flat buffers can be copied, averaged or loaded into each other. */
MOEDEF uint64_t moe_store_fingerprint(const moe_store *s);

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

/* ============================================================================================
   >>moe:ckpt  checkpoints
   ============================================================================================
   One format for every model in moe.h and reward.h. Little-endian:
     "MOECKPT\0", u32 version, u32 flags (1 = Adam moments present), u64 layout fingerprint,
     u64 numel, i64 step, u64 config bytes, u64 state bytes,
     config blob, state blob (caller's: RNG, data position, ...), params, [adam_m, adam_v],
     u32 CRC-32 (zlib polynomial) of everything before it.
   Saving writes "<path>.tmp", flushes, fsyncs (POSIX), renames: an existing checkpoint is
   never left half-written. Loading reads and verifies the whole file before it touches the
   store: on any error the store is unchanged. */

#define MOE_CKPT_VERSION 1

typedef struct moe_ckpt_info {
    int version;
    int has_moments;
    uint64_t fingerprint;
    uint64_t numel;
    long long step;
    uint64_t config_bytes;
    uint64_t state_bytes;
} moe_ckpt_info;

#ifndef MOE_NO_STDIO
MOEDEF moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                      long long step, const void *config, size_t config_bytes,
                                      const void *state, size_t state_bytes, moe_err *err);
/* Verifies magic, version, CRC, fingerprint, sizes; config_bytes/state_bytes must equal the
   stored sizes (pass 0 / NULL to skip). If `expect_config` is non-NULL the stored config blob
   must equal it byte for byte. step/config_out/state_out may be NULL. */
MOEDEF moe_status moe_checkpoint_load(const char *path, moe_store *s, long long *step,
                                      const void *expect_config, void *config_out,
                                      size_t config_bytes, void *state_out, size_t state_bytes,
                                      moe_err *err);
/* Reads only the header (after checking the CRC), to learn sizes before loading. */
MOEDEF moe_status moe_checkpoint_info(const char *path, moe_ckpt_info *info, moe_err *err);
/* Copies the config and state blobs (exact sizes; NULL/0 skips one) out of a verified
   checkpoint, so a program can rebuild its model and options before loading parameters. */
MOEDEF moe_status moe_checkpoint_blobs(const char *path, void *config_out, size_t config_bytes,
                                       void *state_out, size_t state_bytes, moe_err *err);
#endif
MOEDEF uint32_t moe_crc32(uint32_t crc, const void *data, size_t n); /* crc = 0 to start */

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

/* ============================================================================================
   >>moe:kernels  elementwise, normalisation, loss
   ============================================================================================
   Rows are contiguous. These loops are already the fast form, so each is its own reference;
   tests/test_kernels.c checks every pair by finite differences and against PyTorch. */

typedef enum moe_activation {
    MOE_ACT_SILU = 0,      /* x * sigmoid(x)                                */
    MOE_ACT_GELU = 1,      /* exact, erf form (PyTorch's default)           */
    MOE_ACT_GELU_TANH = 2, /* tanh approximation (GPT-2)                    */
    MOE_ACT_RELU = 3
} moe_activation;

/* softmax over the last dim of (rows, n) */
MOEDEF void moe_softmax_forward(float *out, const float *inp, int rows, int n);
MOEDEF void moe_softmax_backward(float *dinp, const float *dout, const float *out, int rows, int n);
MOEDEF void moe_activation_forward(float *out, const float *inp, size_t n, moe_activation act);
MOEDEF void moe_activation_backward(float *dinp, const float *dout, const float *inp, size_t n,
                                    moe_activation act);
/* SwiGLU: out = silu(gate) * up, elementwise */
MOEDEF void moe_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
MOEDEF void moe_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, size_t n);
/* RMSNorm over (rows, n): out = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps) */
MOEDEF void moe_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                                int rows, int n, float eps);
MOEDEF void moe_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                 const float *weight, const float *rstd, int rows, int n);
/* LayerNorm over (rows, n): out = (x - mean) * rstd * weight + bias */
MOEDEF void moe_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                  const float *weight, const float *bias, int rows, int n, float eps);
MOEDEF void moe_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                   const float *inp, const float *weight, const float *mean,
                                   const float *rstd, int rows, int n);
/* Cross-entropy of (rows, V) logits against int targets; targets < 0 are ignored (as
   PyTorch's ignore_index). losses (rows) gets -log p[target] (0 when ignored); returns the
   mean over counted rows (double accumulation). */
MOEDEF double moe_crossentropy_forward(float *losses, const float *logits, const int *targets,
                                       int rows, int V);
/* dlogits += dloss * (softmax(logits) - onehot(target)) for each counted row; dloss is the
   gradient of the loss with respect to each counted row's loss (1/count for a mean). */
MOEDEF void moe_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                      int rows, int V, float dloss);

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

/* ============================================================================================
   >>moe:dispatch  the assignment list
   ============================================================================================
   Every router fills one of these. After moe_dispatch the list is grouped by expert (a stable
   counting sort: within an expert, the order of the input list is kept) and each token knows
   its assignments in slot order, so combine sums them in a fixed order. */

typedef struct moe_assign {
    int n;           /* assignments in the list                                        */
    int T, E;        /* tokens, experts                                                */
    int *token;      /* (cap) token of each assignment, grouped by expert               */
    int *expert;     /* (cap) expert                                                   */
    int *slot;       /* (cap) position in its token's combine order                    */
    float *weight;   /* (cap) mixing weight                                            */
    int *offset;     /* (E+1) expert e owns [offset[e], offset[e+1])                   */
    int *tok_offset; /* (T+1) token t owns tok_index[tok_offset[t] .. tok_offset[t+1]) */
    int *tok_index;  /* (cap) positions in the grouped list, in slot order              */
} moe_assign;

/* Groups n raw assignments (token[i], expert[i], slot[i], weight[i]) into `a`.
   The raw arrays must not alias a's arrays. Invalid ids return MOE_ERR_INVALID_ARG. */
MOEDEF moe_status moe_dispatch(moe_assign *a, const int *token, const int *expert, const int *slot,
                               const float *weight, int n, int T, int E, moe_err *err);
/* xg (N, d): row i = x[token[i]] */
MOEDEF void moe_gather(float *xg, const float *x, const moe_assign *a, int d);
/* dx (T, d) += sum over the token's assignments of dxg rows, in slot order */
MOEDEF void moe_gather_backward(float *dx, const float *dxg, const moe_assign *a, int d);
/* y (T, d) (+)= sum over each token's assignments of weight * eout, in slot order.
   accumulate = 0 overwrites y. */
MOEDEF void moe_combine_forward(float *y, const float *eout, const moe_assign *a, int d, int accumulate);
/* deout (N, d) = weight * dy[token] (overwritten); dweight (N) = <dy[token], eout> (overwritten,
   may be NULL). */
MOEDEF void moe_combine_backward(float *deout, float *dweight, const float *dy, const float *eout,
                                 const moe_assign *a, int d);

/* ============================================================================================
   >>moe:router  routers and their auxiliary losses
   ============================================================================================ */

typedef enum moe_router_kind {
    MOE_ROUTER_TOPK = 0,          /* softmax over E, keep the top k (Switch, DeepSeekMoE;
                                     renormalize = 1 gives Mixtral)                          */
    MOE_ROUTER_SIGMOID = 1,       /* independent sigmoid scores, top k (renormalize optional) */
    MOE_ROUTER_NOISY_TOPK = 2,    /* Shazeer 2017: H = z + noise * (softplus(x Wn) + eps),
                                     weights = softmax over the k kept H                      */
    MOE_ROUTER_EXPERT_CHOICE = 3, /* Zhou 2022: expert e takes its ceil(k*T/E) best tokens.
                                     NOT CAUSAL: a token's routing depends on later tokens    */
    MOE_ROUTER_AOE = 4            /* Autonomy-of-Experts (Lv et al. 2025): no router. Every
                                     expert computes C_e = x . W_in_e^T (rank aoe_rank), the
                                     logits are the norms ||C_e||, top-k by norm; the chosen
                                     experts reuse C_e for their gate: h_gate = C_e . W_out_e^T.
                                     renormalize = 1: softmax over the k chosen norms (paper);
                                     0: softmax over all norms, unrenormalised (official code) */
} moe_router_kind;

typedef enum moe_balance_loss {
    MOE_BALANCE_NONE = 0,
    MOE_BALANCE_SWITCH = 1,   /* coef * E * sum_i f_i P_i, f_i = share of tokens whose top-1 is i */
    MOE_BALANCE_MIXTRAL = 2,  /* coef * E * sum_i f_i P_i, f_i = (top-k picks of i) / T  (= k at
                                 perfect balance; HF transformers' load_balancing_loss_func)     */
    MOE_BALANCE_DEEPSEEK = 3  /* coef * sum_i f_i P_i, f_i = E/(k T) (picks of i)  (= 1 at balance) */
} moe_balance_loss;

typedef struct moe_layer_config {
    int d;                    /* model width                                             */
    int d_ff;                 /* expert hidden width D                                   */
    int n_experts;            /* routed experts E                                        */
    int top_k;                /* k, experts per token (per-expert capacity factor for EC) */
    int n_shared;             /* DeepSeekMoE shared experts: always on, weight 1; 0 = none */
    int d_ff_shared;          /* hidden width of a shared expert; 0 = d_ff               */
    moe_expert_kind expert;   /* SwiGLU (default) or two-matrix FFN                      */
    moe_activation activation;/* FFN experts' activation (GELU default)                  */
    int expert_bias;          /* FFN experts carry b_up, b_down                           */
    moe_router_kind router;
    int renormalize;          /* divide the k weights by their sum (>= 1e-20). With k = 1
                                 the weight is always 1: the router then learns only from
                                 the auxiliary losses (use Switch's unnormalised form)   */
    int router_bias;          /* router logits get a bias (E)                             */
    float capacity_factor;    /* 0 = dropless (default); else each expert keeps at most
                                 ceil(cf * k * T / E) assignments, see moe_layer_forward   */
    moe_balance_loss balance; /* load-balancing loss form                                */
    float balance_coef;       /* 0.01                                                    */
    float z_coef;             /* ST-MoE router z-loss coefficient; 0 (1e-3 typical)       */
    float importance_coef;    /* noisy top-k: CV^2 of importance; 0.01 (HyperMoE code)     */
    float load_coef;          /* noisy top-k: CV^2 of smooth load; 0.01                    */
    float noise_eps;          /* noisy top-k: added to softplus(x Wn); 1e-2                */
    float router_init_std;    /* router init N(0, std); 0 = zeros (Shazeer); 0.02         */
    /* GW-MoE (Global Workspace broadcast, fine-tuning only; softmax top-k routers): while the
       layer's gw_active flag is set, a token whose routing entropy u = -sum p ln(p + 1e-5)
       (the released code's form; divided by ln E when gw_normalized) is >= gw_threshold is
       sent to ALL experts with the full softmax weights. gw_slots > 0 keeps only the first
       gw_slots uncertain tokens of each sequence (seq_len tokens each). Broadcast
       assignments are not subject to capacity. gw_released = 1 reproduces the released
       code instead: an uncertain token skips the experts and outputs p_{E-1} * x.        */
    float gw_threshold;       /* 0 = off                                                 */
    int gw_normalized;
    int gw_slots;
    int gw_released;
    int aoe_rank;             /* AoE: rank r of the factorised gate (paper: about d/3)   */
    /* HyperMoE (Zhao et al. 2024): hyper = 1 adds a per-token hyper-expert whose weights a
       hypernetwork generates from the embeddings of the experts the token did NOT choose.
       Sizes (official code / tiny): expert embedding e 128/32, processor hidden 128/32,
       condition q 128/32, layer embedding 10/4, hypernetwork b 128/32, adapter a 64/16. */
    int hyper;
    int hyper_embed, hyper_hidden, hyper_cond, hyper_layer_dim, hyper_width, hyper_adapter;
    int hyper_layers;         /* rows of the shared layer embedding (a model: its layers) */
    int hyper_layer;          /* this layer's row                                       */
    int router_dim;           /* width of the router's input; 0 = d (the router reads x).
                                 Another width means the caller supplies router_input:
                                 RMoE's GRU state, an MLP router's hidden layer          */
} moe_layer_config;

/* Routing statistics of the last forward, per layer. */
typedef struct moe_routing_stats {
    int tokens;           /* T                                                               */
    int requested;        /* assignments the router asked for                                */
    int kept;             /* assignments the experts computed                                */
    int dropped;          /* requested - kept (capacity)                                     */
    float drop_rate;      /* dropped / requested                                             */
    int broadcast;        /* GW-MoE: tokens sent to every expert                             */
    float *load;          /* (E) share of kept assignments per expert, sums to 1            */
    float *mean_prob;     /* (E) P_i: mean router probability (normalised scores)           */
    float load_entropy;   /* H(load), nats; ln E = perfectly balanced                       */
    float gate_entropy;   /* mean over tokens of H(probabilities), nats                      */
    float aux_balance;    /* balance loss, coefficient included                              */
    float aux_z;          /* router z-loss, coefficient included                             */
    float aux_cv;         /* noisy top-k CV^2 losses, coefficients included                  */
    float aux_total;      /* the sum: what backward differentiates besides dy              */
} moe_routing_stats;

MOEDEF moe_layer_config moe_layer_config_default(void);
/* AoE's parameter matching (paper Eq. 5): the expert width D' that gives a rank-r AoE layer the
   parameters of a SwiGLU MoE layer of width D: (3 d D - r d) / (r + 2 d), rounded up. */
MOEDEF int moe_aoe_matched_width(int d, int D, int r);
/* Checks a config; a sentence in err on failure. */
MOEDEF moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err);

/* ============================================================================================
   >>moe:layer  the MoE layer
   ============================================================================================ */

typedef struct moe_layer {
    moe_layer_config cfg;
    int max_tokens;
    int cap;              /* capacity of the routed assignment list                          */
    /* tensor ids in the store, -1 when absent */
    int id_router_w;      /* (E, router_dim)                                                 */
    int id_router_b;      /* (E)                                                             */
    int id_noise_w;       /* (E, router_dim) noisy top-k                                     */
    int id_gate, id_up, id_down, id_b_up, id_b_down;        /* routed bank                 */
    int id_s_gate, id_s_up, id_s_down, id_s_b_up, id_s_b_down; /* shared bank             */
    int id_aoe_in, id_aoe_out;     /* AoE: gate factors (E, r, d) and (E, D, r)            */
    float *aoe_c, *aoe_dc;         /* AoE: (T, E r) every expert's cache and its gradient   */
    float *aoe_cg, *aoe_dcg;       /* AoE: (cap, r) the chosen experts' caches, gathered    */
    int id_hyper[11];     /* HyperMoE: expert_emb, proc1.w/b, proc2.w/b (this layer);
                             layer_emb, net.w/b, head_down, head_down_b, head_up (shared)  */
    float *hy_sig, *hy_h1, *hy_c, *hy_z, *hy_hb, *hy_m, *hy_u, *hy_o, *hy_out; /* caches       */
    float *hy_do, *hy_dm, *hy_dhb, *hy_dz, *hy_dc, *hy_dh1, *hy_dsig;          /* backward     */
    /* forward caches (sized for max_tokens) */
    int T;                /* tokens of the last forward, 0 = none                           */
    int has_noise;        /* last forward was given noise                                    */
    float *logits;        /* (T, E) x . Wr^T + b                                             */
    float *probs;         /* (T, E) softmax (or sigmoid) of logits                           */
    float *gates;         /* (T, E) mixing weight of each (token, expert), 0 when not chosen */
    float *noise;         /* (T, E) noisy top-k: the N(0,1) draws used                      */
    float *noise_logits;  /* (T, E) noisy top-k: x . Wn^T                                    */
    float *noisy;         /* (T, E) noisy top-k: H                                           */
    float *lse;           /* (T) logsumexp of logits (z-loss)                                */
    int *topk;            /* (T, K) chosen experts, descending score, -1 = none              */
    int *thresh;          /* (T, E) noisy top-k: index of the threshold logit for Load       */
    moe_assign routed;    /* assignment list of the routed bank                              */
    moe_assign shared;    /* assignment list of the shared bank (every token, weight 1)      */
    float *xg, *hg, *hu, *eout;     /* routed bank caches: (cap,d) (cap,D) (cap,D) (cap,d)  */
    float *s_xg, *s_hg, *s_hu, *s_eout; /* shared bank caches, (S*T, ...)                   */
    /* scratch */
    int *raw_i;           /* (4 * cap) raw token/expert/slot lists before dispatch          */
    float *raw_w;         /* (cap)                                                           */
    float *work_a, *work_b; /* (max(cap, S*T), max(D, Ds))                                  */
    float *dxg;           /* (max(cap, S*T), d)                                             */
    float *deout;         /* (max(cap, S*T), d)                                             */
    float *dgate;         /* (T, E)                                                          */
    float *dlogits;       /* (T, E)                                                          */
    float *dnoise_logits; /* (T, E)                                                          */
    moe_work work;        /* scratch of the layer's matmuls and experts, sized at init         */
    float *aux_tmp;       /* (5 * E) loss pieces: f, P, importance, load, requested picks     */
    float *stat_load, *stat_prob; /* (E) backing for stats                                  */
    int *uncertain;       /* (T) GW-MoE: 1 when the token was broadcast to every expert      */
    float *bypass;        /* (T) GW-MoE released-code emulation: y += bypass * x             */
    int gw_active;        /* GW-MoE broadcast on (set while fine-tuning; off = sparse)       */
    int seq_len;          /* tokens per sequence, for gw_slots (0: the batch is one sequence) */
    /* THE extension point for routers that read something other than x (RMoE, MLP router):
       when router_input is set, logits = router_input (T, router_dim) . Wr^T, and backward
       accumulates the router's input gradient into d_router_input instead of dx. */
    const float *router_input;
    float *d_router_input;
    moe_routing_stats stats;
    float aux_grad_scale; /* multiplies the aux losses' gradients in backward; 1 after init
                             (set 1/n for gradient accumulation over n micro-batches)     */
    moe_err err;
} moe_layer;

/* Validates cfg, declares the layer's tensors in s under `prefix` (s must not be allocated
   yet) and allocates activations for up to max_tokens tokens. */
MOEDEF moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                 const char *prefix, int max_tokens);
MOEDEF void moe_layer_free(moe_layer *L);
/* Router N(0, router_init_std); expert matrices U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear;
   biases 0. */
MOEDEF void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
/* Pointers to the layer's weights in the params (grads = 0) or grads (grads = 1) buffer. */
MOEDEF moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads);
/* y (T, d) = MoE(x (T, d)). noise (T, E): N(0,1) draws for the noisy top-k router during
   training, NULL at evaluation (then H = z). Fills L->stats. Capacity: assignments are admitted
   slot by slot (every token's first choice before any second choice), tokens in index order;
   a dropped assignment contributes nothing (the token keeps its residual), weights are not
   renormalised afterwards. */
MOEDEF moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                    int T, const float *noise);
/* dx (T, d) += dLoss/dx; parameter gradients += into s->grads. The auxiliary losses of the
   last forward (L->stats.aux_total) are part of the differentiated objective. x must be the
   forward's input. */
MOEDEF moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                     const float *x);

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
/* Rotary positions (rotate-half pairing i, i + hd/2, as GPT-NeoX / HF LLaMA) applied in place
   to the q and k parts of qkv; inverse = 1 rotates backwards (the backward pass). cos_sin
   (T, hd/2, 2) from moe_rope_table. */
MOEDEF void moe_rope_apply(float *qkv, const float *cos_sin, int B, int T, int d, int NH, int inverse);
MOEDEF void moe_rope_table(float *cos_sin, int T, int hd, float theta);

/* ============================================================================================
   >>moe:gru  a GRU cell (PyTorch's gate order r, z, n), for the layerwise recurrent router
   ============================================================================================
   gi = x . w_ih^T + b_ih, gh = h_prev . w_hh^T + b_hh  (N, 3p), split r | z | n;
   r = sig(gi_r + gh_r), z = sig(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
   h = (1 - z) * n + z * h_prev.  gi and gh are the caches backward needs. */

/* work: the two products' scratch, moe_gru_work_floats(N, p, threads) floats, or NULL (they
   allocate their own; MOE_ERR_NOMEM when they cannot). */
MOEDEF moe_status moe_gru_forward(float *h, float *gi, float *gh, const float *x, const float *h_prev,
                                  const float *w_ih, const float *w_hh, const float *b_ih, const float *b_hh,
                                  int N, int p, moe_work *work);
/* dx, dh_prev (N, p) and the weight gradients ACCUMULATE; dh (N, p) is dL/dh; scratch (N, 6p). */
MOEDEF moe_status moe_gru_backward(float *dx, float *dh_prev, float *dw_ih, float *dw_hh, float *db_ih, float *db_hh,
                                   const float *dh, const float *x, const float *h_prev, const float *gi,
                                   const float *gh, const float *w_ih, const float *w_hh, int N, int p, float *scratch,
                                   moe_work *work);
MOEDEF size_t moe_gru_work_floats(int N, int p, int nthreads);

/* ============================================================================================
   >>moe:model  a tiny decoder-only MoE transformer over bytes
   ============================================================================================
   x = wte[token] (+ wpe[pos]);  for each layer:  x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))
   where FFN is a dense SwiGLU (a bank of one expert that every token visits) or an MoE layer;
   logits = RMSNorm(x) . wte^T (tied head). Loss: mean cross-entropy + every MoE layer's aux.
   Layer l is MoE when moe_every > 0, l >= dense_first and (l - dense_first) % moe_every == 0.
   Parameters: one moe_store; tensor names "wte", "wpe", "l3.attn.wqkv", "l3.moe.experts.w_up",
   "lnf.w", ... Per-layer tensors (not stacked on L) because layers differ in kind. */

typedef enum moe_pos_kind {
    MOE_POS_LEARNED = 0, /* wpe (max_seq, d) added to the embeddings */
    MOE_POS_ROPE = 1     /* rotary q/k, no position parameters        */
} moe_pos_kind;

/* What the MoE layers' routers read (RMoE, Qiu et al. ICLR 2025, and its ablations). */
typedef enum moe_router_input {
    MOE_RIN_DIRECT = 0,     /* the layer's normalised hidden state x (a linear router)        */
    MOE_RIN_GRU = 1,        /* RMoE: h_l = GRU(x_l P_l, h_{l-1}), one GRU shared by all MoE
                               layers, state carried through depth with full gradients       */
    MOE_RIN_GRU_NP = 2,     /* ablation "no previous state": h_l = GRU(x_l P_l, 0)            */
    MOE_RIN_GRU_DETACH = 3, /* ablation: h_{l-1} enters layer l without a gradient back      */
    MOE_RIN_MLP = 4         /* baseline SMoE-MLP: router on GELU(x_l P_l), no recurrence      */
} moe_router_input;

typedef struct moe_model_config {
    int vocab;              /* 256 (bytes)                                            */
    int max_seq;            /* longest sequence (and learned position table)          */
    int d;                  /* model width                                            */
    int n_layers;
    int n_heads;            /* d % n_heads == 0                                       */
    int d_ff;               /* dense SwiGLU FFN width                                 */
    moe_pos_kind pos;
    float rope_theta;       /* 10000                                                  */
    float norm_eps;         /* RMSNorm epsilon, 1e-5                                  */
    int moe_every;          /* 0 = dense model; 1 = every layer MoE; 2 = every other  */
    int dense_first;        /* that many first layers stay dense                      */
    moe_layer_config moe;   /* the MoE FFN; its d is set to the model's d             */
    moe_router_input router_input; /* linear router, RMoE's GRU state, an MLP router  */
    int router_dim;         /* p: GRU / MLP width of the router input (RMoE: 128)     */
    float init_std;         /* 0.02; residual outputs get init_std / sqrt(2 L)        */
} moe_model_config;

typedef struct moe_block {
    int is_moe;
    int id_ln1, id_qkv, id_wo, id_ln2;    /* tensor ids                              */
    int id_gate, id_up, id_down;          /* dense FFN (-1 for MoE blocks)           */
    moe_layer moe;                        /* MoE FFN (is_moe)                        */
    float *x;        /* (N, d) block input: the residual stream                     */
    float *ln1;      /* (N, d) RMSNorm(x)                                            */
    float *rstd1;    /* (N)                                                          */
    float *qkv;      /* (N, 3d) q, k (rotated under RoPE), v                         */
    float *att;      /* (B, NH, T, T) attention probabilities                        */
    float *atty;     /* (N, d) attention output before the projection               */
    float *x2;       /* (N, d) x + attention                                         */
    float *ln2;      /* (N, d) RMSNorm(x2)                                           */
    float *rstd2;    /* (N)                                                          */
    float *hg, *hu;  /* (N, d_ff) dense FFN caches                                   */
    float *ffn;      /* (N, d) FFN output                                            */
    int id_rproj;    /* (p, d) router-input projector (RMoE, MLP router), else -1      */
    float *rxp;      /* (N, p) projector output                                       */
    float *rh;       /* (N, p) the router's input: GRU state h_l or GELU(rxp)          */
    float *rgi, *rgh;/* (N, 3p) GRU caches                                             */
    const float *rh_prev; /* (N, p) the state this layer's GRU step read               */
} moe_block;

typedef struct moe_model {
    moe_model_config cfg;
    moe_store S;            /* every parameter, gradient and Adam moment              */
    moe_block *blocks;      /* (n_layers)                                             */
    int id_wte, id_wpe, id_lnf;
    int id_gru_wih, id_gru_whh, id_gru_bih, id_gru_bhh; /* RMoE's shared GRU, else -1      */
    int max_B, max_T;       /* activation buffers are sized for these                 */
    int B, T;               /* the last forward's batch shape, 0 = none              */
    int has_targets;        /* the last forward had targets: backward is allowed      */
    int *inputs, *targets;  /* (N) copies of the last forward's tokens; a forward
                               without targets leaves targets alone (rwd_lm_features
                               builds its input window there)                         */
    float *x_final;         /* (N, d) residual stream after the last block            */
    float *lnf, *rstd_f;    /* (N, d), (N)                                            */
    float *logits;          /* (N, V)                                                 */
    float *losses;          /* (N) per-token cross-entropy                            */
    float *rope;            /* (max_T, hd/2, 2) cos, sin                              */
    float *d_res, *d_res2, *d_ln, *d_qkv, *d_atty, *d_logits, *scratch1, *scratch2; /* backward */
    float *r_zero, *r_drin, *r_carry, *r_dxp, *r_scratch; /* router-input buffers (N p), (N 6p) */
    float *route_noise;     /* (N, E) noisy top-k: the draws of one forward, else NULL   */
    float *gen_probs;       /* (2 V) generation: probabilities and their sorted copy    */
    moe_work work;          /* scratch of every kernel call of the model, its MoE layers'
                               included (calls never overlap), sized at init            */
    double loss;            /* mean cross-entropy of the last forward (nats)          */
    double aux_loss;        /* sum of the MoE layers' aux losses                      */
    /* Interventions for evaluation: moe_model_forward calls ffn_hook(m, l, ffn_hook_user)
       once block l's FFN output is in blocks[l].ffn and before it joins the residual stream
       (swap a token's expert, ablate a layer). Backward does not see what it changes.
       NULL (the default after moe_model_init) = none. */
    void (*ffn_hook)(struct moe_model *m, int layer, void *user);
    void *ffn_hook_user;
    moe_err err;
} moe_model;

typedef struct moe_sampler {
    float temperature; /* 0 = greedy                         */
    int top_k;         /* 0 = off                            */
    float top_p;       /* 1 = off (nucleus sampling)         */
} moe_sampler;

MOEDEF moe_model_config moe_model_config_default(void);
MOEDEF moe_status moe_model_config_validate(const moe_model_config *c, moe_err *err);
/* Declares every tensor, allocates parameters, gradients, Adam moments, the activations for
   batches of up to max_B sequences of up to max_T tokens and the kernels' scratch for the
   thread count of this moment (moe_num_threads; later calls use at most that many): forward,
   backward, the optimizer step and generation allocate nothing. Weights are zero until
   moe_model_init_weights or a checkpoint load. On failure m holds only the error (free is safe). */
MOEDEF moe_status moe_model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T);
MOEDEF void moe_model_free(moe_model *m);
/* GPT-2 style: N(0, init_std), residual projections N(0, init_std/sqrt(2L)), norms 1,
   routers N(0, moe.router_init_std), noise projections and biases 0. */
MOEDEF void moe_model_init_weights(moe_model *m, uint64_t seed);
/* inputs, targets: (B, T) bytes in [0, vocab). targets may be NULL (logits only). noise: NULL,
   or for noisy top-k routers an RNG that draws the routing noise (training). Sets m->loss and
   m->aux_loss. */
MOEDEF moe_status moe_model_forward(moe_model *m, const int *inputs, const int *targets, int B, int T,
                                    moe_rng *noise);
/* Gradients of (loss + aux_loss) * scale, ACCUMULATED into m->S.grads (scale = 1/n for n
   micro-batches of gradient accumulation). */
MOEDEF moe_status moe_model_backward(moe_model *m, float scale);
/* GW-MoE: switch the broadcast of uncertain tokens on (fine-tuning) or off (evaluation and
   inference) in every MoE layer; the layers' gw_threshold decides which tokens qualify. */
MOEDEF void moe_model_set_broadcast(moe_model *m, int on);
/* total parameters, and those one token uses (routers + its k experts + everything dense) */
MOEDEF size_t moe_model_params_total(const moe_model *m);
MOEDEF size_t moe_model_params_active(const moe_model *m);
/* Appends n_new sampled bytes to prompt (n_prompt >= 1); out must hold n_prompt + n_new.
   Uses the last max_T tokens as context. Refused for expert-choice routers (not causal). */
MOEDEF moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                     const moe_sampler *sampler, moe_rng *rng);

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

#ifdef __cplusplus
}
#endif
#endif /* MOE_H_INCLUDED */

/* ############################################################################################
   IMPLEMENTATION
   ############################################################################################ */
#if defined(MOE_IMPLEMENTATION) && !defined(MOE_IMPLEMENTATION_INCLUDED)
#define MOE_IMPLEMENTATION_INCLUDED

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef MOE_ASSERT
#include <assert.h>
#define MOE_ASSERT(x) assert(x)
#endif

#if defined(MOE_MALLOC) && defined(MOE_FREE)
#elif !defined(MOE_MALLOC) && !defined(MOE_FREE)
#define MOE_MALLOC(n) malloc(n)
#define MOE_FREE(p) free(p)
#else
#error "moe.h: define both MOE_MALLOC and MOE_FREE, or neither"
#endif

#if defined(_OPENMP) && !defined(MOE_NO_OPENMP)
#include <omp.h>
#define MOE__OMP 1
#define MOE__PRAGMA(x) _Pragma(#x)
/* A parallel loop; each iteration owns its outputs (no reductions, no atomics). */
#define MOE_OMP_FOR MOE__PRAGMA(omp parallel for schedule(static))
/* The same, only when the loop has enough work to pay for waking the threads. */
#define MOE_OMP_FOR_IF(cond) MOE__PRAGMA(omp parallel for schedule(static) if (cond))
/* Uneven tasks (experts with different token counts): hand them out one at a time. */
#define MOE_OMP_FOR_DYNAMIC MOE__PRAGMA(omp parallel for schedule(dynamic, 1))
/* One parallel region whose phases share the threads (fewer fork/joins and barriers: under
   load each waits for the slowest thread); inside it, tasks handed out one at a time with a
   barrier at the end, or fixed spans with none (for loops whose outputs are disjoint). */
#define MOE__OMP_PARALLEL_IF(cond) MOE__PRAGMA(omp parallel if (cond))
#define MOE__OMP_FOR_INNER MOE__PRAGMA(omp for schedule(dynamic, 1))
#define MOE__OMP_FOR_NOWAIT MOE__PRAGMA(omp for schedule(static) nowait)
/* The same with at most n threads: loops that index per-thread regions of a workspace sized
   for n threads (moe_work.nthreads). */
#define MOE__OMP_FOR_N(n) MOE__PRAGMA(omp parallel for schedule(static) num_threads(n))
#define MOE__OMP_FOR_DYNAMIC_N(n) MOE__PRAGMA(omp parallel for schedule(dynamic, 1) num_threads(n))
#define MOE__OMP_PARALLEL_IF_N(cond, n) MOE__PRAGMA(omp parallel if (cond) num_threads(n))
#else
#define MOE__OMP 0
#define MOE_OMP_FOR
#define MOE_OMP_FOR_IF(cond)
#define MOE_OMP_FOR_DYNAMIC
#define MOE__OMP_PARALLEL_IF(cond)
#define MOE__OMP_FOR_INNER
#define MOE__OMP_FOR_NOWAIT
#define MOE__OMP_FOR_N(n)
#define MOE__OMP_FOR_DYNAMIC_N(n)
#define MOE__OMP_PARALLEL_IF_N(cond, n)
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h> /* fsync, for atomic checkpoint writes */
#define MOE__HAVE_FSYNC 1
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int fileno(FILE *); /* POSIX; hidden by strict -std=c99 headers */
#endif
#endif

#ifdef MOE_STATIC /* a static copy need not use every function */
#if defined(__GNUC__) || defined(__clang__)
#define MOE__IMPL static __attribute__((unused))
#else
#define MOE__IMPL static
#endif
#else
#define MOE__IMPL
#endif

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

/* ============================================================================================
   >>moe:store
   ============================================================================================ */

MOE__IMPL void moe_store_init(moe_store *s) { memset(s, 0, sizeof *s); }

MOE__IMPL int moe_store_add(moe_store *s, const char *name, int flags, int n0, int n1, int n2, int n3) {
    int dims[MOE_MAX_DIMS], nd = 0, i;
    size_t numel = 1;
    moe_tensor *t;
    dims[0] = n0; dims[1] = n1; dims[2] = n2; dims[3] = n3;
    if (s->allocated) {
        moe_err_set(&s->err, MOE_ERR_STATE, "tensor '%s' declared after moe_store_alloc", name);
        return -1;
    }
    if (!name || strlen(name) >= MOE_NAME_LEN) {
        moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "tensor name missing or longer than %d bytes", MOE_NAME_LEN - 1);
        return -1;
    }
    if (moe_store_find(s, name) >= 0) {
        moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "tensor '%s' declared twice", name);
        return -1;
    }
    while (nd < MOE_MAX_DIMS && dims[nd] != 0) nd++;
    for (i = nd; i < MOE_MAX_DIMS; i++)
        if (dims[i] != 0) nd = -1;
    if (nd <= 0) {
        moe_err_set(&s->err, MOE_ERR_SHAPE, "tensor '%s' needs 1 to 4 dimensions, listed first", name);
        return -1;
    }
    for (i = 0; i < nd; i++) {
        if (dims[i] < 0 || (size_t)dims[i] > ((size_t)1 << 40) / numel) {
            moe_err_set(&s->err, MOE_ERR_SHAPE, "tensor '%s': dimension %d is %d (negative or too large)", name, i, dims[i]);
            return -1;
        }
        numel *= (size_t)dims[i];
    }
    if (s->count == s->capacity) {
        int cap = s->capacity ? 2 * s->capacity : 16;
        moe_tensor *nt = (moe_tensor *)moe__calloc((size_t)cap, sizeof *nt);
        if (!nt) {
            moe_err_set(&s->err, MOE_ERR_NOMEM, "out of memory growing the tensor table");
            return -1;
        }
        if (s->tensors) memcpy(nt, s->tensors, (size_t)s->count * sizeof *nt);
        MOE_FREE(s->tensors);
        s->tensors = nt;
        s->capacity = cap;
    }
    t = &s->tensors[s->count];
    memset(t, 0, sizeof *t);
    strcpy(t->name, name);
    t->ndim = nd;
    for (i = 0; i < nd; i++) t->shape[i] = dims[i];
    t->offset = s->numel;
    t->numel = numel;
    t->flags = flags;
    s->numel += numel;
    return s->count++;
}

MOE__IMPL moe_status moe_store_alloc(moe_store *s, int with_optimizer) {
    if (s->allocated) return moe_err_set(&s->err, MOE_ERR_STATE, "store already allocated");
    s->params = (float *)moe__calloc(s->numel, sizeof(float));
    s->grads = (float *)moe__calloc(s->numel, sizeof(float));
    if (with_optimizer) {
        s->adam_m = (float *)moe__calloc(s->numel, sizeof(float));
        s->adam_v = (float *)moe__calloc(s->numel, sizeof(float));
    }
    if (!s->params || !s->grads || (with_optimizer && (!s->adam_m || !s->adam_v))) {
        MOE_FREE(s->params); MOE_FREE(s->grads); MOE_FREE(s->adam_m); MOE_FREE(s->adam_v);
        s->params = s->grads = s->adam_m = s->adam_v = NULL;
        return moe_err_set(&s->err, MOE_ERR_NOMEM, "out of memory for %zu parameters", s->numel);
    }
    s->allocated = 1;
    return MOE_OK;
}

MOE__IMPL void moe_store_free(moe_store *s) {
    MOE_FREE(s->tensors); MOE_FREE(s->params); MOE_FREE(s->grads);
    MOE_FREE(s->adam_m); MOE_FREE(s->adam_v);
    memset(s, 0, sizeof *s);
}

MOE__IMPL int moe_store_find(const moe_store *s, const char *name) {
    int i;
    for (i = 0; i < s->count; i++)
        if (strcmp(s->tensors[i].name, name) == 0) return i;
    return -1;
}

MOE__IMPL float *moe_store_param(const moe_store *s, int id) {
    return (id >= 0 && id < s->count && s->params) ? s->params + s->tensors[id].offset : NULL;
}

MOE__IMPL float *moe_store_grad(const moe_store *s, int id) {
    return (id >= 0 && id < s->count && s->grads) ? s->grads + s->tensors[id].offset : NULL;
}

MOE__IMPL void moe_store_zero_grad(moe_store *s) {
    if (s->grads) memset(s->grads, 0, s->numel * sizeof(float));
}

static uint64_t moe__fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

MOE__IMPL uint64_t moe_store_fingerprint(const moe_store *s) {
    uint64_t h = 14695981039346656037ULL;
    int i, j;
    for (i = 0; i < s->count; i++) {
        const moe_tensor *t = &s->tensors[i];
        unsigned char dims[4 * (MOE_MAX_DIMS + 2)];
        h = moe__fnv1a(h, t->name, strlen(t->name) + 1);
        /* integers as little-endian bytes so the fingerprint is the same on every host */
        for (j = 0; j < MOE_MAX_DIMS + 2; j++) {
            uint32_t v = j < MOE_MAX_DIMS ? (uint32_t)t->shape[j] : j == MOE_MAX_DIMS ? (uint32_t)t->ndim : (uint32_t)t->flags;
            dims[4 * j] = (unsigned char)v; dims[4 * j + 1] = (unsigned char)(v >> 8);
            dims[4 * j + 2] = (unsigned char)(v >> 16); dims[4 * j + 3] = (unsigned char)(v >> 24);
        }
        h = moe__fnv1a(h, dims, sizeof dims);
    }
    return h;
}

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

MOE__IMPL moe_status moe_adamw_step(moe_store *s, const moe_adamw_config *c, float lr, long long step) {
    moe__adamw_consts k;
    double bc1;
    if (!s->adam_m || !s->adam_v) return moe_err_set(&s->err, MOE_ERR_STATE, "AdamW step on a store allocated without optimizer moments");
    if (step < 1) return moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "AdamW step counts from 1, got %lld", step);
    /* torch computes the corrections in double (Python floats) then uses them as scalars */
    bc1 = (double)(float)(1.0 - pow((double)c->beta1, (double)step));
    k.bc2_sqrt = (float)sqrt(1.0 - pow((double)c->beta2, (double)step));
    k.step_size = (float)((double)lr / bc1);
    k.one_m_b1 = 1.0f - c->beta1;
    k.b2 = c->beta2;
    k.one_m_b2 = 1.0f - c->beta2;
    k.eps = c->eps;
    /* one parallel region for all tensors, no barrier between them (their spans are disjoint) */
    MOE__OMP_PARALLEL_IF(s->numel > 32768)
    {
        int ti;
        for (ti = 0; ti < s->count; ti++) {
            const moe_tensor *t = &s->tensors[ti];
            moe__adamw_consts kt = k;
            long long b, nb = ((long long)t->numel + MOE__ADAMW_SPAN - 1) / MOE__ADAMW_SPAN;
            kt.decay = (t->flags & MOE_TENSOR_DECAY) ? 1.0f - lr * c->weight_decay : 1.0f;
            MOE__OMP_FOR_NOWAIT
            for (b = 0; b < nb; b++) {
                size_t o = t->offset + (size_t)b * MOE__ADAMW_SPAN, left = t->numel - (size_t)b * MOE__ADAMW_SPAN;
                moe__adamw_span(s->params + o, s->grads + o, s->adam_m + o, s->adam_v + o,
                                left < MOE__ADAMW_SPAN ? left : MOE__ADAMW_SPAN, &kt);
            }
        }
    }
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

/* ============================================================================================
   >>moe:ckpt
   ============================================================================================ */

MOE__IMPL uint32_t moe_crc32(uint32_t crc, const void *data, size_t n) {
    /* byte-at-a-time table, built per call (1 KB, 2048 steps): no global state to race on */
    const unsigned char *p = (const unsigned char *)data;
    uint32_t table[256];
    size_t i;
    int k;
    for (i = 0; i < 256; i++) {
        uint32_t c = (uint32_t)i;
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        table[i] = c;
    }
    crc = ~crc;
    for (i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

#ifndef MOE_NO_STDIO
#define MOE__CKPT_MAGIC "MOECKPT"
#define MOE__CKPT_HEADER 56 /* 8 magic + 4 version + 4 flags + 5 * 8 */

static int moe__little_endian(void) {
    const uint32_t one = 1;
    return *(const unsigned char *)&one == 1;
}

static void moe__put_u32(unsigned char *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void moe__put_u64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t moe__get_u32(const unsigned char *p) {
    uint32_t v = 0;
    int i;
    for (i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t moe__get_u64(const unsigned char *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* writes n bytes and folds them into the running CRC */
static int moe__write(FILE *f, const void *p, size_t n, uint32_t *crc) {
    if (n == 0) return 1;
    *crc = moe_crc32(*crc, p, n);
    return fwrite(p, 1, n, f) == n;
}

MOE__IMPL moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                         long long step, const void *config, size_t config_bytes,
                                         const void *state, size_t state_bytes, moe_err *err) {
    unsigned char h[MOE__CKPT_HEADER], tail[4];
    char tmp[4096];
    uint32_t crc = 0;
    FILE *f;
    int ok;
    if (!moe__little_endian()) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (!path || !s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint save needs a path and an allocated store");
    if (with_moments && (!s->adam_m || !s->adam_v)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint with moments asked for, but the store has no optimizer moments");
    if ((config_bytes && !config) || (state_bytes && !state)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint blob size given without data");
    if (strlen(path) + 5 > sizeof tmp) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint path is too long");
    sprintf(tmp, "%s.tmp", path);
    memset(h, 0, sizeof h);
    memcpy(h, MOE__CKPT_MAGIC, 8);
    moe__put_u32(h + 8, MOE_CKPT_VERSION);
    moe__put_u32(h + 12, with_moments ? 1u : 0u);
    moe__put_u64(h + 16, moe_store_fingerprint(s));
    moe__put_u64(h + 24, (uint64_t)s->numel);
    moe__put_u64(h + 32, (uint64_t)step);
    moe__put_u64(h + 40, (uint64_t)config_bytes);
    moe__put_u64(h + 48, (uint64_t)state_bytes);
    f = fopen(tmp, "wb");
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open '%s' for writing", tmp);
    ok = moe__write(f, h, sizeof h, &crc) && moe__write(f, config, config_bytes, &crc) &&
         moe__write(f, state, state_bytes, &crc) &&
         moe__write(f, s->params, s->numel * sizeof(float), &crc);
    if (ok && with_moments)
        ok = moe__write(f, s->adam_m, s->numel * sizeof(float), &crc) &&
             moe__write(f, s->adam_v, s->numel * sizeof(float), &crc);
    moe__put_u32(tail, crc);
    ok = ok && fwrite(tail, 1, 4, f) == 4 && fflush(f) == 0;
#ifdef MOE__HAVE_FSYNC
    ok = ok && fsync(fileno(f)) == 0;
#endif
    if (fclose(f) != 0) ok = 0;
    if (!ok) {
        remove(tmp);
        return moe_err_set(err, MOE_ERR_IO, "writing '%s' failed (disk full?); '%s' is unchanged", tmp, path);
    }
    if (rename(tmp, path) != 0) {
        remove(tmp);
        return moe_err_set(err, MOE_ERR_IO, "cannot rename '%s' to '%s'", tmp, path);
    }
    return MOE_OK;
}

/* Reads the whole file, checks magic, version and CRC; *buf owns the bytes on success. */
static moe_status moe__ckpt_read(const char *path, unsigned char **buf, size_t *len, moe_ckpt_info *info, moe_err *err) {
    FILE *f;
    long size;
    unsigned char *b;
    uint64_t need;
    *buf = NULL;
    if (!moe__little_endian()) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (!path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint path is NULL");
    f = fopen(path, "rb");
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open checkpoint '%s'", path);
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path);
    }
    if ((size_t)size < MOE__CKPT_HEADER + 4) {
        fclose(f);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes, too short for a checkpoint (truncated?)", path, size);
    }
    b = (unsigned char *)MOE_MALLOC((size_t)size);
    if (!b) { fclose(f); return moe_err_set(err, MOE_ERR_NOMEM, "no memory to read '%s'", path); }
    if (fread(b, 1, (size_t)size, f) != (size_t)size) {
        fclose(f); MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path);
    }
    fclose(f);
    if (memcmp(b, MOE__CKPT_MAGIC, 8) != 0) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not a moe.h checkpoint (bad magic)", path);
    }
    info->version = (int)moe__get_u32(b + 8);
    if (info->version != MOE_CKPT_VERSION) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' has checkpoint format version %d; this moe.h reads version %d", path, info->version, MOE_CKPT_VERSION);
    }
    info->has_moments = (int)(moe__get_u32(b + 12) & 1u);
    info->fingerprint = moe__get_u64(b + 16);
    info->numel = moe__get_u64(b + 24);
    info->step = (long long)moe__get_u64(b + 32);
    info->config_bytes = moe__get_u64(b + 40);
    info->state_bytes = moe__get_u64(b + 48);
    /* sizes are checked before any multiplication can overflow */
    if (info->numel > ((uint64_t)1 << 40) || info->config_bytes > ((uint64_t)1 << 30) || info->state_bytes > ((uint64_t)1 << 30)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' has an implausible header (corrupt?)", path);
    }
    need = MOE__CKPT_HEADER + info->config_bytes + info->state_bytes + info->numel * 4u * (info->has_moments ? 3u : 1u) + 4u;
    if (need != (uint64_t)size) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes but its header describes %llu (truncated or corrupt)", path, size, (unsigned long long)need);
    }
    if (moe_crc32(0, b, (size_t)size - 4) != moe__get_u32(b + size - 4)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' fails its CRC-32 check (corrupt file)", path);
    }
    *buf = b;
    *len = (size_t)size;
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_info(const char *path, moe_ckpt_info *info, moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_status st = moe__ckpt_read(path, &b, &len, info, err);
    if (st == MOE_OK) MOE_FREE(b);
    return st;
}

MOE__IMPL moe_status moe_checkpoint_blobs(const char *path, void *config_out, size_t config_bytes,
                                          void *state_out, size_t state_bytes, moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_ckpt_info info;
    moe_status st = moe__ckpt_read(path, &b, &len, &info, err);
    if (st != MOE_OK) return st;
    if ((config_out && info.config_bytes != (uint64_t)config_bytes) || (state_out && info.state_bytes != (uint64_t)state_bytes)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds %llu config and %llu state bytes, expected %zu and %zu (another program or version?)",
                           path, (unsigned long long)info.config_bytes, (unsigned long long)info.state_bytes, config_bytes, state_bytes);
    }
    if (config_out) memcpy(config_out, b + MOE__CKPT_HEADER, config_bytes);
    if (state_out) memcpy(state_out, b + MOE__CKPT_HEADER + info.config_bytes, state_bytes);
    MOE_FREE(b);
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_load(const char *path, moe_store *s, long long *step,
                                         const void *expect_config, void *config_out,
                                         size_t config_bytes, void *state_out, size_t state_bytes,
                                         moe_err *err) {
    unsigned char *b, *p;
    size_t len, nb;
    moe_ckpt_info info;
    moe_status st;
    if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint load needs an allocated store");
    st = moe__ckpt_read(path, &b, &len, &info, err);
    if (st != MOE_OK) return st;
    st = MOE_ERR_FORMAT;
    if (info.fingerprint != moe_store_fingerprint(s) || info.numel != (uint64_t)s->numel)
        moe_err_set(err, st, "'%s' holds a different model layout (fingerprint or size differs from this store)", path);
    else if ((expect_config || config_out) && info.config_bytes != (uint64_t)config_bytes)
        moe_err_set(err, st, "'%s' has a %llu-byte config, expected %zu", path, (unsigned long long)info.config_bytes, config_bytes);
    else if (expect_config && config_bytes && memcmp(b + MOE__CKPT_HEADER, expect_config, config_bytes) != 0)
        moe_err_set(err, st, "'%s' was saved with a different config", path);
    else if (state_out && info.state_bytes != (uint64_t)state_bytes)
        moe_err_set(err, st, "'%s' has %llu bytes of state, expected %zu", path, (unsigned long long)info.state_bytes, state_bytes);
    else
        st = MOE_OK;
    if (st != MOE_OK) { MOE_FREE(b); return st; }
    p = b + MOE__CKPT_HEADER;
    if (config_out && config_bytes) memcpy(config_out, p, config_bytes);
    p += info.config_bytes;
    if (state_out && state_bytes) memcpy(state_out, p, state_bytes);
    p += info.state_bytes;
    nb = s->numel * sizeof(float);
    memcpy(s->params, p, nb);
    p += nb;
    if (info.has_moments && s->adam_m && s->adam_v) {
        memcpy(s->adam_m, p, nb);
        memcpy(s->adam_v, p + nb, nb);
    } else if (s->adam_m && s->adam_v) { /* fresh moments for a store that has them */
        memset(s->adam_m, 0, nb);
        memset(s->adam_v, 0, nb);
    }
    if (step) *step = info.step;
    MOE_FREE(b);
    return MOE_OK;
}
#endif /* MOE_NO_STDIO */

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
            } else { /* row j of the stored matrix is column j of B */
                for (j = 0; j < nr; j++) {
                    const float *b = B + (size_t)(j0 + j) * ldb + pc;
                    for (p = 0; p < kc; p++) dst[(size_t)p * MOE_GEMM_NR + j] = b[p];
                }
                for (; j < MOE_GEMM_NR; j++)
                    for (p = 0; p < kc; p++) dst[(size_t)p * MOE_GEMM_NR + j] = 0.0f;
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

/* ============================================================================================
   >>moe:kernels
   ============================================================================================ */

/* exp for vectorized loops. exp(z) = 2^k exp(r), k = round(z / ln 2), |r| <= ln 2 / 2, exp(r) by
   its degree-6 Taylor polynomial; the relative error is below 3e-7 (a few ulp). z is clamped to
   [-87, 87]; NaN passes through (a diverged run must show in its loss). Used by the SwiGLU
   sigmoid, the attention softmax and the cross-entropy. */
static float moe__expf_poly(float z) {
    float zc = z > -87.0f ? (z < 87.0f ? z : 87.0f) : -87.0f;
    float k = (zc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = (zc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return z == z ? p * scale : z;
}

/* Row maxima and sums of exponentials in MOE__LANES lanes combined in a fixed order, so the
   loops vectorize and every row gets the same arithmetic wherever it is computed. */
#define MOE__LANES 16

MOE__GEMM_FN float moe__max_lanes(const float *MOE_RESTRICT x, int n) {
    float m[MOE__LANES], mx;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) m[j] = -FLT_MAX;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    for (j = 0; u + j < n; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    mx = m[0];
    for (j = 1; j < MOE__LANES; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

/* sum over i < n of exp(scale (x[i] - mx)) */
MOE__GEMM_FN float moe__sum_exp_lanes(const float *MOE_RESTRICT x, int n, float mx, float scale) {
    float acc[MOE__LANES], sum = 0.0f;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; u + j < n; j++) acc[j] += moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; j < MOE__LANES; j++) sum += acc[j];
    return sum;
}

/* the same sum, each term also replacing x[i] */
MOE__GEMM_FN float moe__exp_lanes_inplace(float *MOE_RESTRICT x, int n, float mx, float scale) {
    float acc[MOE__LANES], sum = 0.0f;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += x[u + j] = moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; u + j < n; j++) acc[j] += x[u + j] = moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; j < MOE__LANES; j++) sum += acc[j];
    return sum;
}

MOE__IMPL void moe_softmax_forward(float *out, const float *inp, int rows, int n) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, mx = -FLT_MAX, sum = 0.0f, inv;
        int i;
        for (i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
        for (i = 0; i < n; i++) { y[i] = expf(x[i] - mx); sum += y[i]; }
        inv = 1.0f / sum;
        for (i = 0; i < n; i++) y[i] *= inv;
    }
}

MOE__IMPL void moe_softmax_backward(float *dinp, const float *dout, const float *out, int rows, int n) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *dy = dout + (size_t)r * n, *y = out + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, dot = 0.0f;
        int i;
        for (i = 0; i < n; i++) dot += dy[i] * y[i];
        for (i = 0; i < n; i++) dx[i] += y[i] * (dy[i] - dot);
    }
}

static float moe__sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static float moe__act(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: return x * moe__sigmoid(x);
    case MOE_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    case MOE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

static float moe__act_grad(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: {
        float s = moe__sigmoid(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case MOE_ACT_GELU: {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case MOE_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    }
    return 1.0f;
}

MOE__IMPL void moe_activation_forward(float *out, const float *inp, size_t n, moe_activation act) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) out[i] = moe__act(inp[i], act);
}

MOE__IMPL void moe_activation_backward(float *dinp, const float *dout, const float *inp, size_t n,
                                       moe_activation act) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) dinp[i] += dout[i] * moe__act_grad(inp[i], act);
}

MOE__IMPL void moe_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) out[i] = gate[i] * moe__sigmoid(gate[i]) * up[i];
}

MOE__IMPL void moe_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                   const float *up, size_t n) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) {
        float s = moe__sigmoid(gate[i]), silu = gate[i] * s;
        dgate[i] += dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
        dup[i] += dout[i] * silu;
    }
}

MOE__IMPL void moe_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                                   int rows, int n, float eps) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, ss = 0.0f, rs;
        int i;
        for (i = 0; i < n; i++) ss += x[i] * x[i];
        rs = 1.0f / sqrtf(ss / (float)n + eps);
        rstd[r] = rs;
        for (i = 0; i < n; i++) y[i] = x[i] * rs * weight[i];
    }
}

MOE__IMPL void moe_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                    const float *weight, const float *rstd, int rows, int n) {
    int r, i;
    /* dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x)); dweight owned per column, serial rows */
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n, *dy = dout + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, rs = rstd[r], dot = 0.0f;
        int j;
        for (j = 0; j < n; j++) dot += weight[j] * dy[j] * x[j];
        dot /= (float)n;
        for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - x[j] * rs * rs * dot);
    }
    if (dweight) { /* blocks of 64 columns, rows streamed: each column still sums in row order */
        int nb = (n + 63) / 64;
        MOE_OMP_FOR_IF((double)rows * n > 1e5)
        for (i = 0; i < nb; i++) {
            int c0 = i * 64, cols = n - c0 < 64 ? n - c0 : 64, j, rr;
            float acc[64];
            for (j = 0; j < cols; j++) acc[j] = 0.0f;
            for (rr = 0; rr < rows; rr++) {
                const float *dy = dout + (size_t)rr * n + c0, *x = inp + (size_t)rr * n + c0;
                float rs = rstd[rr];
                for (j = 0; j < cols; j++) acc[j] += dy[j] * x[j] * rs;
            }
            for (j = 0; j < cols; j++) dweight[c0 + j] += acc[j];
        }
    }
}

MOE__IMPL void moe_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                     const float *weight, const float *bias, int rows, int n, float eps) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, m = 0.0f, v = 0.0f, rs;
        int i;
        for (i = 0; i < n; i++) m += x[i];
        m /= (float)n;
        for (i = 0; i < n; i++) v += (x[i] - m) * (x[i] - m);
        v /= (float)n;
        rs = 1.0f / sqrtf(v + eps);
        mean[r] = m;
        rstd[r] = rs;
        for (i = 0; i < n; i++) y[i] = (x[i] - m) * rs * weight[i] + (bias ? bias[i] : 0.0f);
    }
}

MOE__IMPL void moe_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                      const float *inp, const float *weight, const float *mean,
                                      const float *rstd, int rows, int n) {
    int r, i;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n, *dy = dout + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, m = mean[r], rs = rstd[r], mdn = 0.0f, mdnx = 0.0f;
        int j;
        for (j = 0; j < n; j++) {
            float dn = weight[j] * dy[j];
            mdn += dn;
            mdnx += dn * (x[j] - m) * rs;
        }
        mdn /= (float)n;
        mdnx /= (float)n;
        for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - mdn - (x[j] - m) * rs * mdnx);
    }
    for (i = 0; i < n; i++) {
        float aw = 0.0f, ab = 0.0f;
        for (r = 0; r < rows; r++) {
            float dy = dout[(size_t)r * n + i];
            aw += dy * (inp[(size_t)r * n + i] - mean[r]) * rstd[r];
            ab += dy;
        }
        if (dweight) dweight[i] += aw;
        if (dbias) dbias[i] += ab;
    }
}

MOE__IMPL double moe_crossentropy_forward(float *losses, const float *logits, const int *targets,
                                          int rows, int V) {
    int r, count = 0;
    double total = 0.0;
    MOE_OMP_FOR_IF((double)rows * V > 1e5)
    for (r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * V;
        int t = targets[r];
        float mx;
        if (t < 0 || t >= V) { losses[r] = 0.0f; continue; }
        mx = moe__max_lanes(z, V);
        losses[r] = (float)(log((double)moe__sum_exp_lanes(z, V, mx, 1.0f)) + mx - z[t]);
    }
    for (r = 0; r < rows; r++)
        if (targets[r] >= 0 && targets[r] < V) { total += losses[r]; count++; }
    return count ? total / count : 0.0;
}

MOE__IMPL void moe_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                         int rows, int V, float dloss) {
    int r;
    MOE_OMP_FOR_IF((double)rows * V > 1e5)
    for (r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * V;
        float *dz = dlogits + (size_t)r * V, mx, inv;
        int t = targets[r], i;
        if (t < 0 || t >= V) continue;
        mx = moe__max_lanes(z, V);
        inv = 1.0f / moe__sum_exp_lanes(z, V, mx, 1.0f);
        for (i = 0; i < V; i++) dz[i] += dloss * (moe__expf_poly(z[i] - mx) * inv - (i == t ? 1.0f : 0.0f));
    }
}

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

static int moe__bank_max_rows(const int *offset, int E) {
    int e, m = 0;
    for (e = 0; e < E; e++)
        if (offset[e + 1] - offset[e] > m) m = offset[e + 1] - offset[e];
    return m;
}

/* Experts go in chunks (as many as MOE__EXPERT_CHUNK_FLOATS of packed weights and per-expert
   buffers allow, at least one); a chunk is ONE parallel region whose phases are separated by
   barriers, not one region per expert and phase: under load every fork/join and barrier
   waits for the slowest thread, so the fewer the better. */
#ifndef MOE__EXPERT_CHUNK_FLOATS
#define MOE__EXPERT_CHUNK_FLOATS ((size_t)1 << 20) /* 4 MB: a chunk stays about L2-sized */
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
    if (moe__bank_max_rows(offset, E) == 0) return MOE_OK;
    need = moe__experts_fwd_floats(E, d, D, own_gate, nthreads, &chunk);
    buf = moe__work_get(work_ws, need, &own, &st);
    if (st != MOE_OK) return st;
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

/* ============================================================================================
   >>moe:dispatch
   ============================================================================================ */

MOE__IMPL moe_status moe_dispatch(moe_assign *a, const int *token, const int *expert, const int *slot,
                                  const float *weight, int n, int T, int E, moe_err *err) {
    int i, e, t;
    int *fill = a->tok_index; /* reused as a cursor array before it is filled */
    for (i = 0; i < n; i++)
        if (token[i] < 0 || token[i] >= T || expert[i] < 0 || expert[i] >= E)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "assignment %d has token %d / expert %d outside [0,%d) / [0,%d)", i, token[i], expert[i], T, E);
    a->n = n;
    a->T = T;
    a->E = E;
    /* counting sort by expert; stable because the input is walked in order */
    for (e = 0; e <= E; e++) a->offset[e] = 0;
    for (i = 0; i < n; i++) a->offset[expert[i] + 1]++;
    for (e = 0; e < E; e++) a->offset[e + 1] += a->offset[e];
    for (e = 0; e < E; e++) fill[e] = a->offset[e];
    for (i = 0; i < n; i++) {
        int pos = fill[expert[i]]++;
        a->token[pos] = token[i];
        a->expert[pos] = expert[i];
        a->slot[pos] = slot[i];
        a->weight[pos] = weight[i];
    }
    /* per-token lists, then each token's few entries sorted by slot (insertion sort) */
    for (t = 0; t <= T; t++) a->tok_offset[t] = 0;
    for (i = 0; i < n; i++) a->tok_offset[a->token[i] + 1]++;
    for (t = 0; t < T; t++) a->tok_offset[t + 1] += a->tok_offset[t];
    /* tok_offset[t] is token t's fill cursor; filled, it holds t's end = (t+1)'s start, so one
       shift back restores the starts (no cursor array to allocate) */
    for (i = 0; i < n; i++) a->tok_index[a->tok_offset[a->token[i]]++] = i;
    for (t = T; t > 0; t--) a->tok_offset[t] = a->tok_offset[t - 1];
    a->tok_offset[0] = 0;
    for (t = 0; t < T; t++) {
        int lo = a->tok_offset[t], hi = a->tok_offset[t + 1], j;
        for (i = lo + 1; i < hi; i++) {
            int v = a->tok_index[i];
            for (j = i - 1; j >= lo && a->slot[a->tok_index[j]] > a->slot[v]; j--) a->tok_index[j + 1] = a->tok_index[j];
            a->tok_index[j + 1] = v;
        }
    }
    return MOE_OK;
}

MOE__IMPL void moe_gather(float *xg, const float *x, const moe_assign *a, int d) {
    int i;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (i = 0; i < a->n; i++) memcpy(xg + (size_t)i * d, x + (size_t)a->token[i] * d, sizeof(float) * (size_t)d);
}

MOE__IMPL void moe_gather_backward(float *dx, const float *dxg, const moe_assign *a, int d) {
    int t;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (t = 0; t < a->T; t++) {
        float *o = dx + (size_t)t * d;
        int k, j;
        for (k = a->tok_offset[t]; k < a->tok_offset[t + 1]; k++) {
            const float *g = dxg + (size_t)a->tok_index[k] * d;
            for (j = 0; j < d; j++) o[j] += g[j];
        }
    }
}

MOE__IMPL void moe_combine_forward(float *y, const float *eout, const moe_assign *a, int d, int accumulate) {
    int t;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (t = 0; t < a->T; t++) {
        float *o = y + (size_t)t * d;
        int k, j;
        if (!accumulate) memset(o, 0, sizeof(float) * (size_t)d);
        for (k = a->tok_offset[t]; k < a->tok_offset[t + 1]; k++) {
            int pos = a->tok_index[k];
            const float *src = eout + (size_t)pos * d;
            float w = a->weight[pos];
            for (j = 0; j < d; j++) o[j] += w * src[j];
        }
    }
}

MOE__IMPL void moe_combine_backward(float *deout, float *dweight, const float *dy, const float *eout,
                                    const moe_assign *a, int d) {
    int i;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (i = 0; i < a->n; i++) {
        const float *g = dy + (size_t)a->token[i] * d, *e = eout + (size_t)i * d;
        float *o = deout + (size_t)i * d, w = a->weight[i], dot = 0.0f;
        int j;
        for (j = 0; j < d; j++) {
            o[j] = w * g[j];
            dot += g[j] * e[j];
        }
        if (dweight) dweight[i] = dot;
    }
}

/* ============================================================================================
   >>moe:router
   ============================================================================================ */

MOE__IMPL moe_layer_config moe_layer_config_default(void) {
    moe_layer_config c;
    memset(&c, 0, sizeof c);
    c.d = 64;
    c.d_ff = 128;
    c.n_experts = 8;
    c.top_k = 2;
    c.expert = MOE_EXPERT_SWIGLU;
    c.activation = MOE_ACT_GELU;
    c.router = MOE_ROUTER_TOPK;
    c.renormalize = 1;
    c.balance = MOE_BALANCE_MIXTRAL;
    c.balance_coef = 0.01f;
    c.importance_coef = 0.01f;
    c.load_coef = 0.01f;
    c.noise_eps = 1e-2f;
    c.router_init_std = 0.02f;
    c.hyper_embed = c.hyper_hidden = c.hyper_cond = c.hyper_width = 32; /* used when hyper = 1 */
    c.hyper_layer_dim = 4;
    c.hyper_adapter = 16;
    c.hyper_layers = 1;
    return c;
}

MOE__IMPL int moe_aoe_matched_width(int d, int D, int r) {
    /* rounded up, as the paper's 6469.2 -> 6470 (the 1e-9 keeps exact integers exact) */
    return (int)ceil((3.0 * d * D - (double)r * d) / ((double)r + 2.0 * d) - 1e-9);
}

static int moe__bad_coef(float x) { return !(x >= 0.0f) || x > 1e30f; } /* negative, NaN, inf */

MOE__IMPL moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    if (!c) return moe_err_set(err, bad, "layer config is NULL");
    if (c->d <= 0 || c->d_ff <= 0) return moe_err_set(err, bad, "d (%d) and d_ff (%d) must be positive", c->d, c->d_ff);
    if (c->n_experts <= 0) return moe_err_set(err, bad, "n_experts must be positive, got %d", c->n_experts);
    if (c->top_k <= 0) return moe_err_set(err, bad, "top_k must be at least 1, got %d", c->top_k);
    if (c->top_k > c->n_experts) return moe_err_set(err, bad, "top_k (%d) exceeds n_experts (%d)", c->top_k, c->n_experts);
    if ((int)c->router < 0 || (int)c->router > MOE_ROUTER_AOE) return moe_err_set(err, bad, "unknown router kind %d", (int)c->router);
    if (c->router == MOE_ROUTER_AOE && (c->aoe_rank <= 0 || c->expert != MOE_EXPERT_SWIGLU || c->router_bias || c->router_dim > 0))
        return moe_err_set(err, bad, "AoE needs aoe_rank > 0 and SwiGLU experts, and has no router (no router_bias, no router_input)");
    if (c->router == MOE_ROUTER_NOISY_TOPK && c->top_k >= c->n_experts)
        return moe_err_set(err, bad, "noisy top-k needs top_k < n_experts (its load estimate compares with the (k+1)-th logit); got k=%d, E=%d", c->top_k, c->n_experts);
    if ((int)c->expert < 0 || (int)c->expert > MOE_EXPERT_FFN) return moe_err_set(err, bad, "unknown expert kind %d", (int)c->expert);
    if ((int)c->activation < 0 || (int)c->activation > MOE_ACT_RELU) return moe_err_set(err, bad, "unknown activation %d", (int)c->activation);
    if (c->expert_bias && c->expert != MOE_EXPERT_FFN) return moe_err_set(err, bad, "expert_bias applies to MOE_EXPERT_FFN experts only");
    if ((int)c->balance < 0 || (int)c->balance > MOE_BALANCE_DEEPSEEK) return moe_err_set(err, bad, "unknown balance loss %d", (int)c->balance);
    if (c->n_shared < 0 || c->d_ff_shared < 0) return moe_err_set(err, bad, "n_shared (%d) and d_ff_shared (%d) must not be negative", c->n_shared, c->d_ff_shared);
    if (!(c->capacity_factor >= 0.0f) || c->capacity_factor > 1e6f)
        return moe_err_set(err, bad, "capacity_factor must be 0 (dropless) or positive, got %g", (double)c->capacity_factor);
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->capacity_factor != 0.0f)
        return moe_err_set(err, bad, "expert-choice takes its capacity from top_k (each expert keeps ceil(k*T/E) tokens); leave capacity_factor at 0");
    if (moe__bad_coef(c->balance_coef) || moe__bad_coef(c->z_coef) || moe__bad_coef(c->importance_coef) ||
        moe__bad_coef(c->load_coef) || moe__bad_coef(c->noise_eps) || moe__bad_coef(c->router_init_std))
        return moe_err_set(err, bad, "loss coefficients, noise_eps and router_init_std must be finite and >= 0");
    if (!(c->gw_threshold >= 0.0f) || c->gw_slots < 0) return moe_err_set(err, bad, "gw_threshold and gw_slots must not be negative");
    if (c->gw_threshold > 0.0f && c->router != MOE_ROUTER_TOPK)
        return moe_err_set(err, bad, "GW-MoE broadcast needs the softmax top-k router (MOE_ROUTER_TOPK)");
    if (c->router_dim < 0) return moe_err_set(err, bad, "router_dim must not be negative");
    if (c->hyper && (c->hyper_embed <= 0 || c->hyper_hidden <= 0 || c->hyper_cond <= 0 || c->hyper_layer_dim <= 0 ||
                     c->hyper_width <= 0 || c->hyper_adapter <= 0 || c->hyper_layers <= 0 || c->hyper_layer < 0 ||
                     c->hyper_layer >= c->hyper_layers))
        return moe_err_set(err, bad, "HyperMoE needs positive hyper sizes and 0 <= hyper_layer < hyper_layers");
    if ((double)c->n_experts * c->d_ff * c->d > 4e9) return moe_err_set(err, bad, "layer too large (E*d_ff*d = %.3g floats)", (double)c->n_experts * c->d_ff * c->d);
    return MOE_OK;
}

static float moe__softplus(float x) { return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x))); }

/* idx[0..k) = indices of the k largest scores, descending; ties go to the lower index.
   Each pick is the best entry that ranks below the previous pick in (score desc, index asc). */
static void moe__topk_row(const float *score, int E, int k, int *idx) {
    int s, j;
    for (s = 0; s < k; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0) {
                float ps = score[idx[s - 1]];
                if (!(score[j] < ps || (score[j] == ps && j > idx[s - 1]))) continue;
            }
            if (best < 0 || score[j] > score[best]) best = j;
        }
        idx[s] = best;
    }
}

typedef struct moe__scored {
    float score;
    int index;
} moe__scored;

static int moe__scored_cmp(const void *pa, const void *pb) {
    const moe__scored *a = (const moe__scored *)pa, *b = (const moe__scored *)pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

static int moe__float_desc(const void *pa, const void *pb) {
    float a = *(const float *)pa, b = *(const float *)pb;
    return a > b ? -1 : a < b;
}

static int moe__int_cmp(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    return a < b ? -1 : a > b;
}

/* population CV^2 = var / (mean^2 + 1e-10) of x (n), and its gradient dx (n) times coef */
static float moe__cv2(const float *x, int n, float coef, float *dx) {
    double m = 0.0, var = 0.0, den;
    int i;
    for (i = 0; i < n; i++) m += x[i];
    m /= n;
    for (i = 0; i < n; i++) var += (x[i] - m) * (x[i] - m);
    var /= n;
    den = m * m + 1e-10;
    if (dx)
        for (i = 0; i < n; i++)
            dx[i] = (float)(coef * ((2.0 * (x[i] - m) / n) * den - var * 2.0 * m / n) / (den * den));
    return (float)(coef * var / den);
}

static double moe__entropy(const float *p, int n) {
    double h = 0.0;
    int i;
    for (i = 0; i < n; i++)
        if (p[i] > 0.0f) h -= (double)p[i] * log((double)p[i]);
    return h;
}

/* Normalised routing probabilities of token t: the softmax itself, or sigmoid / sum. */
static void moe__norm_probs(const moe_layer *L, int t, float *out) {
    int E = L->cfg.n_experts, j;
    const float *p = L->probs + (size_t)t * E;
    if (L->cfg.router == MOE_ROUTER_SIGMOID) {
        float s = 0.0f;
        for (j = 0; j < E; j++) s += p[j];
        for (j = 0; j < E; j++) out[j] = p[j] / s;
    } else {
        for (j = 0; j < E; j++) out[j] = p[j];
    }
}

/* ============================================================================================
   >>moe:layer
   ============================================================================================ */

static int moe__declare(moe_layer *L, moe_store *s, const char *prefix, const char *name, int flags,
                        int n0, int n1, int n2) {
    char full[MOE_NAME_LEN + 64];
    int id;
    if (L->err.status != MOE_OK) return -1;
    if (strlen(prefix) + strlen(name) >= MOE_NAME_LEN) {
        moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "tensor name '%s%s' is longer than %d bytes", prefix, name, MOE_NAME_LEN - 1);
        return -1;
    }
    sprintf(full, "%s%s", prefix, name);
    id = moe_store_add(s, full, flags, n0, n1, n2, 0);
    if (id < 0) moe_err_set(&L->err, s->err.status, "%s", s->err.msg);
    return id;
}

static void moe__declare_bank(moe_layer *L, moe_store *s, const char *prefix, const char *bank, int E,
                              int D, int *id_gate, int *id_up, int *id_down, int *id_b_up, int *id_b_down) {
    const moe_layer_config *c = &L->cfg;
    char name[48];
    int d = c->d;
    *id_gate = *id_b_up = *id_b_down = -1;
    /* AoE's routed experts factorise their gate (w_gate_in, w_gate_out), declared by the router */
    if (c->expert == MOE_EXPERT_SWIGLU && !(c->router == MOE_ROUTER_AOE && strcmp(bank, "experts") == 0)) {
        sprintf(name, "%s.w_gate", bank);
        *id_gate = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, D, d);
    }
    sprintf(name, "%s.w_up", bank);
    *id_up = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, D, d);
    sprintf(name, "%s.w_down", bank);
    *id_down = moe__declare(L, s, prefix, name, MOE_TENSOR_DECAY, E, d, D);
    if (c->expert == MOE_EXPERT_FFN && c->expert_bias) {
        sprintf(name, "%s.b_up", bank);
        *id_b_up = moe__declare(L, s, prefix, name, 0, E, D, 0);
        sprintf(name, "%s.b_down", bank);
        *id_b_down = moe__declare(L, s, prefix, name, 0, E, d, 0);
    }
}

/* ---- HyperMoE: a per-token hyper-expert generated from the UNselected experts ----
   sig_t = sum of the expert embeddings Q_j of the experts t did not choose;
   c_t = proc(sig_t) (Linear-ReLU-Linear); z_t = [c_t ; layer_emb[l]]; hb_t = ReLU(net(z_t));
   u_t[j] = sum_k (M_t[j][k] + head_down_b[j][k]) hb_t[k]   with M = x . head_down^T, (T, a b);
   act = ReLU(u);  out_t = ([act_t ; 1] (x) hb_t) . head_up^T   (the "1" row is the up bias head).
   The generated adapter weights W_dn(t) = sum_k hb_k head_down[:, k] are never materialised:
   both products are single GEMMs over all tokens. net and the heads are shared by every
   layer (found by name in the store), the embeddings and processor are per layer. */

/* the HyperMoE tensors' initialisation; returns 0 for other tensors */
static int moe__hyper_init_tensor(const moe_tensor *t, float *p, moe_rng *r) {
    size_t i;
    float bound;
    const char *name = strstr(t->name, "hyper.");
    if (!name) return 0;
    if (moe__ends_with(name, ".b") || strcmp(name, "hyper.head_down_b") == 0) bound = 0.0f;
    else if (strstr(name, "hyper.head_")) bound = 1e-3f * sqrtf(3.0f / (float)t->shape[1]); /* near-zero adapter */
    else if (moe__ends_with(name, "emb")) bound = sqrtf(3.0f); /* unit variance, as nn.Embedding */
    else bound = 1.0f / sqrtf((float)t->shape[1]); /* nn.Linear */
    for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(r) - 1.0f);
    return 1;
}

static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter;
    const char *shared[6] = {"hyper.layer_emb", "hyper.net.w", "hyper.net.b", "hyper.head_down", "hyper.head_down_b", "hyper.head_up"};
    int dims[6][2], k;
    dims[0][0] = c->hyper_layers; dims[0][1] = lam;
    dims[1][0] = b; dims[1][1] = q + lam;
    dims[2][0] = b; dims[2][1] = 0;
    dims[3][0] = a * b; dims[3][1] = d;
    dims[4][0] = a; dims[4][1] = b;
    dims[5][0] = d; dims[5][1] = (a + 1) * b;
    L->id_hyper[0] = moe__declare(L, s, prefix, "hyper.expert_emb", MOE_TENSOR_DECAY, E, e, 0);
    L->id_hyper[1] = moe__declare(L, s, prefix, "hyper.proc1.w", MOE_TENSOR_DECAY, h, e, 0);
    L->id_hyper[2] = moe__declare(L, s, prefix, "hyper.proc1.b", 0, h, 0, 0);
    L->id_hyper[3] = moe__declare(L, s, prefix, "hyper.proc2.w", MOE_TENSOR_DECAY, q, h, 0);
    L->id_hyper[4] = moe__declare(L, s, prefix, "hyper.proc2.b", 0, q, 0, 0);
    for (k = 0; k < 6 && L->err.status == MOE_OK; k++) { /* shared: reuse the first layer's */
        int id = moe_store_find(s, shared[k]);
        if (id < 0) {
            id = moe__declare(L, s, "", shared[k], (k == 2 || k == 4) ? 0 : MOE_TENSOR_DECAY, dims[k][0], dims[k][1], 0);
        } else if (s->tensors[id].shape[0] != dims[k][0] || (dims[k][1] && s->tensors[id].shape[1] != dims[k][1])) {
            moe_err_set(&L->err, MOE_ERR_SHAPE, "shared HyperMoE tensor '%s' exists with another shape (layers must agree on the hyper sizes)", shared[k]);
            id = -1;
        }
        L->id_hyper[5 + k] = id;
    }
}

/* y (T, d) += the hyper-expert's output */
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j;
    const float *Q = moe_store_param(s, L->id_hyper[0]), *lemb = moe_store_param(s, L->id_hyper[5]) + (size_t)c->hyper_layer * lam;
    const float *bdn = moe_store_param(s, L->id_hyper[9]);
    float *sum = (float *)moe__calloc((size_t)e, sizeof(float)), *out = L->hy_out;
    MOE_ASSERT(sum);
    for (j = 0; j < E; j++) { /* sum of all embeddings, in expert order */
        int i;
        for (i = 0; i < e; i++) sum[i] += Q[(size_t)j * e + i];
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) { /* sig_t = sum - the chosen ones */
        float *sg = L->hy_sig + (size_t)t * e;
        int i, k;
        memcpy(sg, sum, sizeof(float) * (size_t)e);
        for (k = 0; k < E; k++)
            if (L->gates[(size_t)t * E + k] != 0.0f)
                for (i = 0; i < e; i++) sg[i] -= Q[(size_t)k * e + i];
    }
    MOE_FREE(sum);
    moe_matmul_forward(L->hy_h1, L->hy_sig, moe_store_param(s, L->id_hyper[1]), moe_store_param(s, L->id_hyper[2]), T, e, h, &L->work);
    for (t = 0; t < T * h; t++) L->hy_h1[t] = L->hy_h1[t] > 0.0f ? L->hy_h1[t] : 0.0f;
    moe_matmul_forward(L->hy_c, L->hy_h1, moe_store_param(s, L->id_hyper[3]), moe_store_param(s, L->id_hyper[4]), T, h, q, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(L->hy_z + (size_t)t * (q + lam), L->hy_c + (size_t)t * q, sizeof(float) * (size_t)q);
        memcpy(L->hy_z + (size_t)t * (q + lam) + q, lemb, sizeof(float) * (size_t)lam);
    }
    moe_matmul_forward(L->hy_hb, L->hy_z, moe_store_param(s, L->id_hyper[6]), moe_store_param(s, L->id_hyper[7]), T, q + lam, b, &L->work);
    for (t = 0; t < T * b; t++) L->hy_hb[t] = L->hy_hb[t] > 0.0f ? L->hy_hb[t] : 0.0f;
    moe_matmul_forward(L->hy_m, x, moe_store_param(s, L->id_hyper[8]), NULL, T, d, ab, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) { /* u = (M_t + B) hb_t, act = ReLU(u), O_t = [act ; 1] (x) hb_t */
        const float *M = L->hy_m + (size_t)t * ab, *hb = L->hy_hb + (size_t)t * b;
        float *u = L->hy_u + (size_t)t * a, *o = L->hy_o + (size_t)t * (ab + b);
        int i, k;
        for (i = 0; i < a; i++) {
            float acc = 0.0f;
            for (k = 0; k < b; k++) acc += (M[i * b + k] + bdn[i * b + k]) * hb[k];
            u[i] = acc;
        }
        for (i = 0; i <= a; i++) {
            float act = i < a ? (u[i] > 0.0f ? u[i] : 0.0f) : 1.0f;
            for (k = 0; k < b; k++) o[i * b + k] = act * hb[k];
        }
    }
    moe_matmul_forward(out, L->hy_o, moe_store_param(s, L->id_hyper[10]), NULL, T, ab + b, d, &L->work);
    for (t = 0; t < T * d; t++) y[t] += out[t];
}

static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond, T = L->T;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j, i;
    const float *bdn = moe_store_param(s, L->id_hyper[9]);
    float *dO = L->hy_do, *dM = L->hy_dm, *dhb = L->hy_dhb, *dz = L->hy_dz, *dc = L->hy_dc, *dh1 = L->hy_dh1, *dsig = L->hy_dsig;
    float *gQ = moe_store_grad(s, L->id_hyper[0]), *glemb = moe_store_grad(s, L->id_hyper[5]) + (size_t)c->hyper_layer * lam;
    memset(dO, 0, sizeof(float) * (size_t)T * (ab + b));
    moe_matmul_backward(dO, moe_store_grad(s, L->id_hyper[10]), NULL, dy, L->hy_o, moe_store_param(s, L->id_hyper[10]), T, ab + b, d, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) {
        const float *M = L->hy_m + (size_t)t * ab, *hb = L->hy_hb + (size_t)t * b, *u = L->hy_u + (size_t)t * a;
        const float *g = dO + (size_t)t * (ab + b);
        float *gm = dM + (size_t)t * ab, *ghb = dhb + (size_t)t * b;
        int ii, k;
        for (k = 0; k < b; k++) ghb[k] = g[ab + k]; /* the bias row: act = 1 */
        for (ii = 0; ii < a; ii++) {
            float act = u[ii] > 0.0f ? u[ii] : 0.0f, dact = 0.0f, du;
            for (k = 0; k < b; k++) {
                dact += g[ii * b + k] * hb[k];
                ghb[k] += g[ii * b + k] * act;
            }
            du = u[ii] > 0.0f ? dact : 0.0f;
            for (k = 0; k < b; k++) {
                gm[ii * b + k] = du * hb[k];
                ghb[k] += du * (M[ii * b + k] + bdn[ii * b + k]);
            }
        }
        for (k = 0; k < b; k++) ghb[k] = hb[k] > 0.0f ? ghb[k] : 0.0f; /* through hb's ReLU */
    }
    moe__colsum_acc(moe_store_grad(s, L->id_hyper[9]), dM, T, ab); /* d head_down_b = sum_t du (x) hb */
    moe_matmul_backward(dx, moe_store_grad(s, L->id_hyper[8]), NULL, dM, x, moe_store_param(s, L->id_hyper[8]), T, d, ab, &L->work);
    memset(dz, 0, sizeof(float) * (size_t)T * (q + lam));
    moe_matmul_backward(dz, moe_store_grad(s, L->id_hyper[6]), moe_store_grad(s, L->id_hyper[7]), dhb, L->hy_z,
                        moe_store_param(s, L->id_hyper[6]), T, q + lam, b, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(dc + (size_t)t * q, dz + (size_t)t * (q + lam), sizeof(float) * (size_t)q);
        for (i = 0; i < lam; i++) glemb[i] += dz[(size_t)t * (q + lam) + q + i];
    }
    memset(dh1, 0, sizeof(float) * (size_t)T * h);
    moe_matmul_backward(dh1, moe_store_grad(s, L->id_hyper[3]), moe_store_grad(s, L->id_hyper[4]), dc, L->hy_h1,
                        moe_store_param(s, L->id_hyper[3]), T, h, q, &L->work);
    for (t = 0; t < T * h; t++) dh1[t] = L->hy_h1[t] > 0.0f ? dh1[t] : 0.0f;
    memset(dsig, 0, sizeof(float) * (size_t)T * e);
    moe_matmul_backward(dsig, moe_store_grad(s, L->id_hyper[1]), moe_store_grad(s, L->id_hyper[2]), dh1, L->hy_sig,
                        moe_store_param(s, L->id_hyper[1]), T, e, h, &L->work);
    /* sig_t = sum_{j not chosen by t} Q_j: dQ_j += sum over the tokens that did not choose j */
    for (j = 0; j < E; j++)
        for (t = 0; t < T; t++)
            if (L->gates[(size_t)t * E + j] == 0.0f)
                for (i = 0; i < e; i++) gQ[(size_t)j * e + i] += dsig[(size_t)t * e + i];
}

static int moe__assign_alloc(moe_assign *a, int cap, int T, int E) {
    a->token = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->expert = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->slot = (int *)moe__calloc((size_t)cap, sizeof(int));
    a->weight = (float *)moe__calloc((size_t)cap, sizeof(float));
    a->offset = (int *)moe__calloc((size_t)E + 1, sizeof(int));
    a->tok_offset = (int *)moe__calloc((size_t)T + 1, sizeof(int));
    a->tok_index = (int *)moe__calloc((size_t)(cap > E ? cap : E), sizeof(int));
    return a->token && a->expert && a->slot && a->weight && a->offset && a->tok_offset && a->tok_index;
}

static void moe__assign_free(moe_assign *a) {
    MOE_FREE(a->token); MOE_FREE(a->expert); MOE_FREE(a->slot); MOE_FREE(a->weight);
    MOE_FREE(a->offset); MOE_FREE(a->tok_offset); MOE_FREE(a->tok_index);
    memset(a, 0, sizeof *a);
}

MOE__IMPL moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                    const char *prefix, int max_tokens) {
    int E, K, d, D, S, Ds, cap, rows_b, wide, ok;
    size_t TE;
    memset(L, 0, sizeof *L);
    L->id_router_b = L->id_noise_w = L->id_s_gate = L->id_s_up = L->id_s_down = L->id_s_b_up = L->id_s_b_down = -1;
    L->id_router_w = L->id_aoe_in = L->id_aoe_out = -1;
    if (moe_layer_config_validate(cfg, &L->err) != MOE_OK) return L->err.status;
    if (!s || s->allocated) return moe_err_set(&L->err, MOE_ERR_STATE, "moe_layer_init needs a store that is not allocated yet (declare every layer, then moe_store_alloc)");
    if (max_tokens <= 0 || max_tokens > (1 << 24)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "max_tokens must be in [1, 2^24], got %d", max_tokens);
    if (!prefix) prefix = "";
    L->cfg = *cfg;
    E = cfg->n_experts; K = cfg->top_k; d = cfg->d; D = cfg->d_ff;
    S = cfg->n_shared; Ds = cfg->d_ff_shared > 0 ? cfg->d_ff_shared : D;
    L->cfg.d_ff_shared = Ds;
    L->max_tokens = max_tokens;
    /* token choice needs T*K rows; expert choice E*ceil(K*T/E) <= K*T + E; GW broadcast T*E */
    cap = max_tokens * (cfg->gw_threshold > 0.0f ? E : K) + E;
    L->cap = cap;
    L->cfg.router_dim = cfg->router_dim > 0 ? cfg->router_dim : d;
    if (cfg->router == MOE_ROUTER_AOE) { /* router-free: the gate factors replace router and w_gate */
        L->id_aoe_in = moe__declare(L, s, prefix, "experts.w_gate_in", MOE_TENSOR_DECAY, E, cfg->aoe_rank, d);
        L->id_aoe_out = moe__declare(L, s, prefix, "experts.w_gate_out", MOE_TENSOR_DECAY, E, D, cfg->aoe_rank);
    } else {
        L->id_router_w = moe__declare(L, s, prefix, "router.w", MOE_TENSOR_DECAY, E, L->cfg.router_dim, 0);
    }
    if (cfg->router_bias) L->id_router_b = moe__declare(L, s, prefix, "router.b", 0, E, 0, 0);
    if (cfg->router == MOE_ROUTER_NOISY_TOPK) L->id_noise_w = moe__declare(L, s, prefix, "router.w_noise", MOE_TENSOR_DECAY, E, L->cfg.router_dim, 0);
    moe__declare_bank(L, s, prefix, "experts", E, D, &L->id_gate, &L->id_up, &L->id_down, &L->id_b_up, &L->id_b_down);
    if (S > 0) moe__declare_bank(L, s, prefix, "shared", S, Ds, &L->id_s_gate, &L->id_s_up, &L->id_s_down, &L->id_s_b_up, &L->id_s_b_down);
    {
        int k;
        for (k = 0; k < 11; k++) L->id_hyper[k] = -1;
    }
    if (cfg->hyper) moe__hyper_declare(L, s, prefix);
    if (L->err.status != MOE_OK) return L->err.status;
    TE = (size_t)max_tokens * E;
    rows_b = cap > S * max_tokens ? cap : S * max_tokens;
    wide = D > Ds ? D : Ds;
    L->logits = (float *)moe__calloc(TE, sizeof(float));
    L->probs = (float *)moe__calloc(TE, sizeof(float));
    L->gates = (float *)moe__calloc(TE, sizeof(float));
    L->noise = (float *)moe__calloc(TE, sizeof(float));
    L->noise_logits = (float *)moe__calloc(TE, sizeof(float));
    L->noisy = (float *)moe__calloc(TE, sizeof(float));
    L->lse = (float *)moe__calloc((size_t)max_tokens, sizeof(float));
    L->topk = (int *)moe__calloc((size_t)max_tokens * K, sizeof(int));
    L->thresh = (int *)moe__calloc(TE, sizeof(int));
    L->xg = (float *)moe__calloc((size_t)cap * d, sizeof(float));
    L->eout = (float *)moe__calloc((size_t)cap * d, sizeof(float));
    L->hg = (float *)moe__calloc((size_t)cap * D, sizeof(float));
    L->hu = (float *)moe__calloc((size_t)cap * D, sizeof(float));
    L->raw_i = (int *)moe__calloc((size_t)cap * 4, sizeof(int));
    L->raw_w = (float *)moe__calloc((size_t)cap, sizeof(float));
    L->work_a = (float *)moe__calloc((size_t)rows_b * wide, sizeof(float));
    L->work_b = (float *)moe__calloc((size_t)rows_b * wide, sizeof(float));
    L->dxg = (float *)moe__calloc((size_t)rows_b * d, sizeof(float));
    L->deout = (float *)moe__calloc((size_t)rows_b * d, sizeof(float));
    L->dgate = (float *)moe__calloc(TE, sizeof(float));
    L->dlogits = (float *)moe__calloc(TE, sizeof(float));
    L->dnoise_logits = (float *)moe__calloc(TE, sizeof(float));
    L->aux_tmp = (float *)moe__calloc((size_t)E * 5, sizeof(float));
    L->stat_load = (float *)moe__calloc((size_t)E, sizeof(float));
    L->stat_prob = (float *)moe__calloc((size_t)E, sizeof(float));
    L->uncertain = (int *)moe__calloc((size_t)max_tokens, sizeof(int));
    if (cfg->hyper) {
        size_t T = (size_t)max_tokens, ab = (size_t)cfg->hyper_adapter * cfg->hyper_width;
        size_t zq = (size_t)cfg->hyper_cond + cfg->hyper_layer_dim, ob = ab + (size_t)cfg->hyper_width;
        float **hb[16];
        size_t hn[16];
        int k, nb = 0;
#define MOE__HY(ptr, n) (hb[nb] = &(ptr), hn[nb++] = (n))
        MOE__HY(L->hy_sig, T * cfg->hyper_embed); MOE__HY(L->hy_h1, T * cfg->hyper_hidden); MOE__HY(L->hy_c, T * cfg->hyper_cond);
        MOE__HY(L->hy_z, T * zq); MOE__HY(L->hy_hb, T * cfg->hyper_width); MOE__HY(L->hy_m, T * ab);
        MOE__HY(L->hy_u, T * cfg->hyper_adapter); MOE__HY(L->hy_o, T * ob); MOE__HY(L->hy_out, T * d);
        MOE__HY(L->hy_do, T * ob); MOE__HY(L->hy_dm, T * ab); MOE__HY(L->hy_dhb, T * cfg->hyper_width);
        MOE__HY(L->hy_dz, T * zq); MOE__HY(L->hy_dc, T * cfg->hyper_cond); MOE__HY(L->hy_dh1, T * cfg->hyper_hidden);
        MOE__HY(L->hy_dsig, T * cfg->hyper_embed);
#undef MOE__HY
        for (k = 0; k < nb; k++) *hb[k] = (float *)moe__calloc(hn[k], sizeof(float));
    }
    if (cfg->router == MOE_ROUTER_AOE) {
        size_t r = (size_t)cfg->aoe_rank;
        L->aoe_c = (float *)moe__calloc(TE * r, sizeof(float));
        L->aoe_dc = (float *)moe__calloc(TE * r, sizeof(float));
        L->aoe_cg = (float *)moe__calloc((size_t)cap * r, sizeof(float));
        L->aoe_dcg = (float *)moe__calloc((size_t)cap * r, sizeof(float));
    }
    L->bypass = (float *)moe__calloc((size_t)max_tokens, sizeof(float));
    ok = L->uncertain && L->bypass && (!cfg->hyper || (L->hy_sig && L->hy_h1 && L->hy_c && L->hy_z && L->hy_hb && L->hy_m &&
         L->hy_u && L->hy_o && L->hy_out && L->hy_do && L->hy_dm && L->hy_dhb && L->hy_dz && L->hy_dc && L->hy_dh1 && L->hy_dsig)) && (cfg->router != MOE_ROUTER_AOE || (L->aoe_c && L->aoe_dc && L->aoe_cg && L->aoe_dcg)) && L->logits && L->probs && L->gates && L->noise && L->noise_logits && L->noisy && L->lse &&
         L->topk && L->thresh && L->xg && L->eout && L->hg && L->hu && L->raw_i && L->raw_w &&
         L->work_a && L->work_b && L->dxg && L->deout && L->dgate && L->dlogits && L->dnoise_logits &&
         L->aux_tmp && L->stat_load && L->stat_prob && moe__assign_alloc(&L->routed, cap, max_tokens, E);
    if (ok && S > 0) {
        ok = moe__assign_alloc(&L->shared, S * max_tokens, max_tokens, S);
        L->s_xg = (float *)moe__calloc((size_t)S * max_tokens * d, sizeof(float));
        L->s_eout = (float *)moe__calloc((size_t)S * max_tokens * d, sizeof(float));
        L->s_hg = (float *)moe__calloc((size_t)S * max_tokens * Ds, sizeof(float));
        L->s_hu = (float *)moe__calloc((size_t)S * max_tokens * Ds, sizeof(float));
        ok = ok && L->s_xg && L->s_eout && L->s_hg && L->s_hu;
    }
    { /* the work buffer: the largest of the kernel calls' scratch; an expert gets each token
         at most once, so at most max_tokens rows. (K, N) of the matmuls (AoE, HyperMoE last): */
        int nt = moe_num_threads(), r = cfg->router == MOE_ROUTER_AOE ? cfg->aoe_rank : 0, k;
        int hw = cfg->hyper_width, ab = cfg->hyper_adapter * hw;
        int mm[8][2] = {{L->cfg.router_dim, E}, {d, E * r}, {r, D}, {cfg->hyper_embed, cfg->hyper_hidden},
                        {cfg->hyper_hidden, cfg->hyper_cond}, {cfg->hyper_cond + cfg->hyper_layer_dim, hw}, {d, ab}, {ab + hw, d}};
        size_t need = moe_experts_work_floats(max_tokens, E, d, D, cfg->expert, nt), w;
        if (S > 0 && (w = moe_experts_work_floats(max_tokens, S, d, Ds, cfg->expert, nt)) > need) need = w;
        for (k = 0; k < (cfg->hyper ? 8 : 3); k++)
            if ((w = moe_matmul_work_floats(max_tokens, mm[k][0], mm[k][1], nt)) > need) need = w;
        ok = ok && moe_work_alloc(&L->work, need, nt) == MOE_OK;
    }
    if (!ok) {
        moe_layer_free(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the activations of %d tokens", max_tokens);
    }
    L->stats.load = L->stat_load;
    L->stats.mean_prob = L->stat_prob;
    L->aux_grad_scale = 1.0f;
    return MOE_OK;
}

MOE__IMPL void moe_layer_free(moe_layer *L) {
    float **fp[] = {&L->logits, &L->probs, &L->gates, &L->noise, &L->noise_logits, &L->noisy, &L->lse,
                    &L->xg, &L->eout, &L->hg, &L->hu, &L->s_xg, &L->s_hg, &L->s_hu, &L->s_eout,
                    &L->raw_w, &L->work_a, &L->work_b, &L->dxg, &L->deout, &L->dgate, &L->dlogits,
                    &L->dnoise_logits, &L->aux_tmp, &L->stat_load, &L->stat_prob, &L->bypass,
                    &L->aoe_c, &L->aoe_dc, &L->aoe_cg, &L->aoe_dcg, &L->hy_sig, &L->hy_h1, &L->hy_c, &L->hy_z,
                    &L->hy_hb, &L->hy_m, &L->hy_u, &L->hy_o, &L->hy_out, &L->hy_do, &L->hy_dm, &L->hy_dhb,
                    &L->hy_dz, &L->hy_dc, &L->hy_dh1, &L->hy_dsig};
    size_t i;
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) {
        MOE_FREE(*fp[i]);
        *fp[i] = NULL;
    }
    MOE_FREE(L->topk); MOE_FREE(L->thresh); MOE_FREE(L->raw_i); MOE_FREE(L->uncertain);
    L->topk = L->thresh = L->raw_i = L->uncertain = NULL;
    moe__assign_free(&L->routed);
    moe__assign_free(&L->shared);
    moe_work_free(&L->work);
    L->T = 0;
}

MOE__IMPL moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads) {
    moe_expert_weights w;
    float *(*get)(const moe_store *, int) = grads ? moe_store_grad : moe_store_param;
    w.gate = get(s, shared ? L->id_s_gate : L->id_gate);
    w.up = get(s, shared ? L->id_s_up : L->id_up);
    w.down = get(s, shared ? L->id_s_down : L->id_down);
    w.b_up = get(s, shared ? L->id_s_b_up : L->id_b_up);
    w.b_down = get(s, shared ? L->id_s_b_down : L->id_b_down);
    return w;
}

MOE__IMPL void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int ids[] = {L->id_router_w, L->id_router_b, L->id_noise_w, L->id_aoe_in, L->id_aoe_out, L->id_gate, L->id_up, L->id_down,
                 L->id_b_up, L->id_b_down, L->id_s_gate, L->id_s_up, L->id_s_down, L->id_s_b_up, L->id_s_b_down};
    size_t k, i;
    for (k = 0; k < 11; k++) /* HyperMoE tensors (shared ones are re-drawn per layer: harmless) */
        if (L->id_hyper[k] >= 0) moe__hyper_init_tensor(&s->tensors[L->id_hyper[k]], moe_store_param(s, L->id_hyper[k]), rng);
    for (k = 0; k < sizeof ids / sizeof ids[0]; k++) {
        const moe_tensor *t;
        float *p = moe_store_param(s, ids[k]);
        if (!p) continue;
        t = &s->tensors[ids[k]];
        if (ids[k] == L->id_router_w) {
            for (i = 0; i < t->numel; i++) p[i] = L->cfg.router_init_std * moe_rng_normal(rng);
        } else if (t->ndim == 3) { /* (E, out, in): nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) */
            float bound = 1.0f / sqrtf((float)t->shape[2]);
            for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
        } else {
            memset(p, 0, t->numel * sizeof(float)); /* biases, noise projection (Shazeer: zero) */
        }
    }
}

/* token-choice routers: top-k ids and dense gates of token t */
static void moe__route_token(moe_layer *L, int t) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, s;
    const float *p = L->probs + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K;
    float *g = L->gates + (size_t)t * E;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        const float *H = L->noisy + (size_t)t * E;
        int *th = L->thresh + (size_t)t * E, j;
        float mx, sum = 0.0f;
        moe__topk_row(H, E, K + 1, th); /* th is scratch here: the k+1 best */
        for (s = 0; s < K; s++) idx[s] = th[s];
        {
            int kth = th[K - 1], k1th = th[K];
            for (j = 0; j < E; j++) th[j] = kth;
            for (s = 0; s < K; s++) th[idx[s]] = k1th; /* selected: compare with the (k+1)-th */
        }
        mx = H[idx[0]];
        for (s = 0; s < K; s++) sum += expf(H[idx[s]] - mx);
        for (s = 0; s < K; s++) g[idx[s]] = expf(H[idx[s]] - mx) / sum;
        return;
    }
    moe__topk_row(p, E, K, idx);
    if (c->renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
}

/* GW-MoE: marks the uncertain tokens (serial: the slot cap counts in sequence order) and
   gives them the full softmax as gates (paper) or a bypass weight (released code). */
static void moe__gw_mark(moe_layer *L, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, t, e, used = 0, seq = L->seq_len > 0 ? L->seq_len : T;
    double norm = c->gw_normalized ? log((double)E) : 1.0;
    L->stats.broadcast = 0;
    for (t = 0; t < T; t++) {
        const float *p = L->probs + (size_t)t * E;
        double u = 0.0;
        L->uncertain[t] = 0;
        L->bypass[t] = 0.0f;
        if (!L->gw_active || c->gw_threshold <= 0.0f) continue;
        if (t % seq == 0) used = 0;
        for (e = 0; e < E; e++) u -= (double)p[e] * log((double)p[e] + 1e-5);
        if (u / norm < c->gw_threshold || (c->gw_slots > 0 && used >= c->gw_slots)) continue;
        used++;
        L->uncertain[t] = 1;
        L->stats.broadcast++;
        if (c->gw_released) {
            memset(L->gates + (size_t)t * E, 0, sizeof(float) * (size_t)E);
            L->bypass[t] = p[E - 1];
        } else {
            memcpy(L->gates + (size_t)t * E, p, sizeof(float) * (size_t)E);
        }
    }
}

/* Builds the raw (token, expert, slot, weight) list of the routed bank; returns its length.
   Counts requested picks per expert into `picks` (E). */
static int moe__build_assignments(moe_layer *L, int T, float *picks) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, n = 0, t, s, e;
    int *rt = L->raw_i, *re = rt + L->cap, *rs = re + L->cap, *keep = rs + L->cap;
    float *rw = L->raw_w;
    for (e = 0; e < E; e++) picks[e] = 0.0f;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        int C = (int)(((long long)K * T + E - 1) / E);
        moe__scored *sc = (moe__scored *)moe__calloc((size_t)T, sizeof *sc);
        int *chosen = (int *)moe__calloc((size_t)C, sizeof(int));
        MOE_ASSERT(sc && chosen);
        if (C > T) C = T;
        for (e = 0; e < E; e++) {
            for (t = 0; t < T; t++) {
                sc[t].score = L->probs[(size_t)t * E + e];
                sc[t].index = t;
            }
            qsort(sc, (size_t)T, sizeof *sc, moe__scored_cmp);
            for (s = 0; s < C; s++) chosen[s] = sc[s].index;
            qsort(chosen, (size_t)C, sizeof(int), moe__int_cmp);
            for (s = 0; s < C; s++) {
                float p = L->probs[(size_t)chosen[s] * E + e];
                rt[n] = chosen[s]; re[n] = e; rs[n] = e; rw[n] = p;
                L->gates[(size_t)chosen[s] * E + e] = p;
                n++;
            }
            picks[e] = (float)C;
        }
        MOE_FREE(sc);
        MOE_FREE(chosen);
        return n;
    }
    for (t = 0; t < T; t++)
        for (s = 0; s < K; s++) picks[L->topk[(size_t)t * K + s]] += 1.0f;
    if (c->capacity_factor > 0.0f) {
        /* admission: every first choice before any second choice, tokens in index order */
        int C = (int)ceil((double)c->capacity_factor * K * T / E);
        int *count = (int *)moe__calloc((size_t)E, sizeof(int));
        MOE_ASSERT(count);
        for (s = 0; s < K; s++)
            for (t = 0; t < T; t++) {
                if (L->uncertain[t]) continue; /* broadcast tokens bypass capacity */
                e = L->topk[(size_t)t * K + s];
                keep[(size_t)t * K + s] = count[e] < C;
                if (count[e] < C) count[e]++;
            }
        MOE_FREE(count);
    }
    for (t = 0; t < T; t++) {
        if (L->uncertain[t]) { /* GW-MoE broadcast: every expert, in expert order */
            if (!c->gw_released)
                for (e = 0; e < E; e++) {
                    rt[n] = t; re[n] = e; rs[n] = e; rw[n] = L->gates[(size_t)t * E + e];
                    n++;
                }
            continue;
        }
        for (s = 0; s < K; s++) {
            if (c->capacity_factor > 0.0f && !keep[(size_t)t * K + s]) continue;
            e = L->topk[(size_t)t * K + s];
            rt[n] = t; re[n] = e; rs[n] = s; rw[n] = L->gates[(size_t)t * E + e];
            n++;
        }
    }
    return n;
}

/* auxiliary losses of the last forward and the routing statistics */
static void moe__layer_aux(moe_layer *L, int T, const float *picks) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, t, e;
    float *f = L->aux_tmp, *P = f + E, *imp = P + E, *load = imp + E;
    float *pn = (float *)moe__calloc((size_t)E, sizeof(float));
    double gate_h = 0.0, acc, z = 0.0;
    moe_routing_stats *st = &L->stats;
    MOE_ASSERT(pn);
    for (e = 0; e < E; e++) P[e] = imp[e] = load[e] = f[e] = 0.0f;
    /* P_i: mean normalised probability, summed in token order */
    for (t = 0; t < T; t++) {
        moe__norm_probs(L, t, pn);
        for (e = 0; e < E; e++) P[e] += pn[e];
        gate_h += moe__entropy(pn, E);
    }
    for (e = 0; e < E; e++) P[e] /= (float)T;
    /* f_i for the balance loss */
    if (c->balance == MOE_BALANCE_SWITCH) {
        for (t = 0; t < T; t++) {
            const float *p = L->probs + (size_t)t * E;
            int best = 0;
            for (e = 1; e < E; e++)
                if (p[e] > p[best]) best = e;
            f[best] += 1.0f;
        }
        for (e = 0; e < E; e++) f[e] /= (float)T;
    } else if (c->balance == MOE_BALANCE_MIXTRAL) {
        for (e = 0; e < E; e++) f[e] = picks[e] / (float)T;
    } else if (c->balance == MOE_BALANCE_DEEPSEEK) {
        for (e = 0; e < E; e++) f[e] = picks[e] * (float)E / ((float)K * (float)T);
    }
    acc = 0.0;
    for (e = 0; e < E; e++) acc += (double)f[e] * P[e];
    st->aux_balance = c->balance == MOE_BALANCE_NONE ? 0.0f : (float)(c->balance_coef * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc);
    for (t = 0; t < T; t++) z += (double)L->lse[t] * L->lse[t];
    st->aux_z = (float)(c->z_coef * z / T);
    st->aux_cv = 0.0f;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) imp[e] += L->gates[(size_t)t * E + e];
        if (L->has_noise) {
            for (t = 0; t < T; t++)
                for (e = 0; e < E; e++) {
                    size_t i = (size_t)t * E + e;
                    float sd = moe__softplus(L->noise_logits[i]) + c->noise_eps;
                    float u = (L->logits[i] - L->noisy[(size_t)t * E + L->thresh[i]]) / sd;
                    load[e] += 0.5f * erfcf(-u * 0.70710678118654752f);
                }
        } else {
            for (e = 0; e < E; e++) load[e] = picks[e];
        }
        st->aux_cv = moe__cv2(imp, E, c->importance_coef, NULL) + moe__cv2(load, E, c->load_coef, NULL);
    }
    st->aux_total = st->aux_balance + st->aux_z + st->aux_cv;
    /* statistics */
    st->tokens = T;
    /* broadcast (GW) tokens are outside the requested/kept/dropped accounting */
    st->kept = L->routed.n - (c->gw_released ? 0 : E * st->broadcast);
    st->requested = -K * st->broadcast;
    for (e = 0; e < E; e++) st->requested += (int)picks[e];
    st->dropped = st->requested - st->kept;
    st->drop_rate = st->requested ? (float)st->dropped / (float)st->requested : 0.0f;
    for (e = 0; e < E; e++) { /* a broadcast token adds one assignment to every expert: not kept ones */
        int n_e = L->routed.offset[e + 1] - L->routed.offset[e] - (c->gw_released ? 0 : st->broadcast);
        st->load[e] = st->kept ? (float)n_e / (float)st->kept : 0.0f;
        st->mean_prob[e] = P[e];
    }
    st->load_entropy = (float)moe__entropy(st->load, E);
    st->gate_entropy = (float)(gate_h / T);
    MOE_FREE(pn);
}

/* ---- AoE: the router-free path (logits are norms of each expert's low-rank cache) ---- */

/* C = x . W_in^T (T, E r) for every expert; logits (T, E) = ||C_e|| */
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, t;
    moe_matmul_forward(L->aoe_c, x, moe_store_param(s, L->id_aoe_in), NULL, T, L->cfg.d, E * r, &L->work);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            const float *c = L->aoe_c + ((size_t)t * E + e) * r;
            double ss = 0.0;
            for (j = 0; j < r; j++) ss += (double)c[j] * c[j];
            L->logits[(size_t)t * E + e] = (float)sqrt(ss);
        }
    }
}

/* the chosen experts' caches, gathered, then h_gate = C_e . W_out_e^T per expert */
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, i, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->id_aoe_out);
    for (i = 0; i < a->n; i++)
        memcpy(L->aoe_cg + (size_t)i * r, L->aoe_c + ((size_t)a->token[i] * E + a->expert[i]) * r, sizeof(float) * (size_t)r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_forward(L->hg + (size_t)lo * D, L->aoe_cg + (size_t)lo * r, wout + (size_t)e * D * r, NULL, n, r, D, &L->work);
    }
}

/* d h_gate (in work_a) -> d W_out and the gathered caches' gradient aoe_dcg */
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->id_aoe_out);
    float *gout = moe_store_grad(s, L->id_aoe_out);
    memset(L->aoe_dcg, 0, sizeof(float) * (size_t)a->n * r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_backward(L->aoe_dcg + (size_t)lo * r, gout + (size_t)e * D * r, NULL, L->work_a + (size_t)lo * D,
                                L->aoe_cg + (size_t)lo * r, wout + (size_t)e * D * r, n, r, D, &L->work);
    }
}

/* dC = the chosen experts' cache gradients + dlogit * C / ||C||; then dW_in and dx */
static void moe__aoe_logits_backward(moe_layer *L, moe_store *s, float *dx, const float *x) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, T = L->T, i, t;
    const moe_assign *a = &L->routed;
    size_t n = (size_t)T * E * r;
    memset(L->aoe_dc, 0, sizeof(float) * n);
    for (i = 0; i < a->n; i++) /* each (token, expert) appears once: plain copies */
        memcpy(L->aoe_dc + ((size_t)a->token[i] * E + a->expert[i]) * r, L->aoe_dcg + (size_t)i * r, sizeof(float) * (size_t)r);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            size_t k = (size_t)t * E + e;
            const float *c = L->aoe_c + k * r;
            float *dc = L->aoe_dc + k * r, norm = L->logits[k];
            float g = L->dlogits[k] / (norm > 1e-12f ? norm : 1e-12f);
            for (j = 0; j < r; j++) dc[j] += g * c[j];
        }
    }
    moe_matmul_backward(dx, moe_store_grad(s, L->id_aoe_in), NULL, L->aoe_dc, x, moe_store_param(s, L->id_aoe_in), T,
                        L->cfg.d, E * r, &L->work);
}

static moe_status moe__layer_check(moe_layer *L, const moe_store *s) {
    if (!L->logits) return moe_err_set(&L->err, MOE_ERR_STATE, "layer is not initialised (moe_layer_init failed or was not called)");
    if (!s || !s->allocated || L->id_down >= s->count) return moe_err_set(&L->err, MOE_ERR_STATE, "the store is not allocated or does not hold this layer's tensors");
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                       int T, const float *noise) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, d = c->d, S = c->n_shared, t, n;
    size_t TE = (size_t)T * E, i;
    moe_expert_weights w;
    float *picks = L->aux_tmp + 4 * E; /* requested picks per expert */
    const float *rin;
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (!y || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer forward: x and y must not be NULL");
    if (T <= 0 || T > L->max_tokens) return moe_err_set(&L->err, MOE_ERR_SHAPE, "layer forward: T = %d tokens, the layer was sized for 1..%d", T, L->max_tokens);
    L->T = 0;
    /* 1. router logits and probabilities */
    if (c->router_dim != d && !L->router_input)
        return moe_err_set(&L->err, MOE_ERR_STATE, "router_dim %d differs from d %d: set router_input before forward", c->router_dim, d);
    rin = L->router_input ? L->router_input : x;
    if (c->router == MOE_ROUTER_AOE)
        moe__aoe_logits(L, s, x, T);
    else
        moe_matmul_forward(L->logits, rin, moe_store_param(s, L->id_router_w), moe_store_param(s, L->id_router_b), T, c->router_dim, E, &L->work);
    for (t = 0; t < T; t++) {
        const float *z = L->logits + (size_t)t * E;
        float mx = -FLT_MAX;
        double sum = 0.0;
        int e;
        for (e = 0; e < E; e++) mx = z[e] > mx ? z[e] : mx;
        for (e = 0; e < E; e++) sum += exp((double)(z[e] - mx));
        L->lse[t] = (float)(log(sum) + mx);
    }
    if (c->router == MOE_ROUTER_SIGMOID)
        for (i = 0; i < TE; i++) L->probs[i] = moe__sigmoid(L->logits[i]);
    else
        moe_softmax_forward(L->probs, L->logits, T, E);
    L->has_noise = 0;
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        moe_matmul_forward(L->noise_logits, rin, moe_store_param(s, L->id_noise_w), NULL, T, c->router_dim, E, &L->work);
        L->has_noise = noise != NULL;
        for (i = 0; i < TE; i++) {
            L->noise[i] = noise ? noise[i] : 0.0f;
            L->noisy[i] = L->logits[i] + L->noise[i] * (moe__softplus(L->noise_logits[i]) + c->noise_eps);
        }
    }
    /* 2. selection: dense gates, then the assignment list */
    memset(L->gates, 0, TE * sizeof(float));
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        for (i = 0; i < (size_t)T * K; i++) L->topk[i] = -1;
    } else {
        MOE_OMP_FOR_IF(T > 256)
        for (t = 0; t < T; t++) moe__route_token(L, t);
    }
    moe__gw_mark(L, T);
    n = moe__build_assignments(L, T, picks);
    st = moe_dispatch(&L->routed, L->raw_i, L->raw_i + L->cap, L->raw_i + 2 * L->cap, L->raw_w, n, T, E, &L->err);
    if (st != MOE_OK) return st;
    /* 3. experts on gathered tokens, then combine (shared experts first, then slots 0..k-1) */
    if (S > 0) {
        int *rt = L->raw_i, *re = rt + L->cap, *rs = re + L->cap, k;
        float *rw = L->raw_w;
        for (t = 0, k = 0; t < T; t++) {
            int j;
            for (j = 0; j < S; j++, k++) { rt[k] = t; re[k] = j; rs[k] = j; rw[k] = 1.0f; }
        }
        st = moe_dispatch(&L->shared, rt, re, rs, rw, S * T, T, S, &L->err);
        if (st != MOE_OK) return st;
        w = moe_layer_experts(L, s, 1, 0);
        moe_gather(L->s_xg, x, &L->shared, d);
        moe_experts_forward(L->s_eout, L->s_hg, L->s_hu, L->s_xg, &w, L->shared.offset, S, d, c->d_ff_shared, c->expert, c->activation, &L->work);
        moe_combine_forward(y, L->s_eout, &L->shared, d, 0);
    }
    w = moe_layer_experts(L, s, 0, 0);
    moe_gather(L->xg, x, &L->routed, d);
    if (c->router == MOE_ROUTER_AOE) moe__aoe_gate_forward(L, s); /* h_gate from the caches */
    moe_experts_forward(L->eout, L->hg, L->hu, L->xg, &w, L->routed.offset, E, d, c->d_ff, c->expert, c->activation, &L->work);
    moe_combine_forward(y, L->eout, &L->routed, d, S > 0);
    if (c->gw_released && L->stats.broadcast > 0)
        for (t = 0; t < T; t++)
            if (L->bypass[t] != 0.0f) {
                int j;
                for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->bypass[t] * x[(size_t)t * d + j];
            }
    if (c->hyper) moe__hyper_forward(L, s, y, x, T);
    moe__layer_aux(L, T, picks);
    L->T = T;
    return MOE_OK;
}

/* dlogits (and dnoise_logits) of token t from dgate, the router kind and the aux losses */
static void moe__router_backward_token(moe_layer *L, int t, const float *dimp, const float *dload,
                                       const float *dP) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, e, s;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *g = L->gates + r, *z = L->logits + r;
    float *dg = L->dgate + r, *dz = L->dlogits + r, *dzn = L->dnoise_logits + r;
    const int *idx = L->topk + (size_t)t * K;
    float dot;
    /* importance = sum_t gates: its gradient joins dgate on the selected experts */
    if (dimp)
        for (s = 0; s < K; s++) dg[idx[s]] += dimp[idx[s]];
    if (L->uncertain[t]) { /* GW broadcast: gates are the full softmax (or p_{E-1} bypass) */
        dot = 0.0f;
        for (e = 0; e < E; e++) dot += dg[e] * p[e];
        for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
    } else switch (c->router) {
    case MOE_ROUTER_TOPK:
    case MOE_ROUTER_EXPERT_CHOICE:
    case MOE_ROUTER_AOE: /* top-k on the norm logits: the same two weightings */
        if ((c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_AOE) && c->renormalize) { /* g = softmax over the selected logits */
            dot = 0.0f;
            for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
            for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
        } else { /* g = softmax over all E, read at the selected experts */
            dot = 0.0f;
            for (e = 0; e < E; e++) dot += dg[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
        }
        break;
    case MOE_ROUTER_SIGMOID:
        if (c->renormalize) {
            float sum = 0.0f;
            for (s = 0; s < K; s++) sum += p[idx[s]];
            if (sum < 1e-20f) sum = 1e-20f;
            dot = 0.0f;
            for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
            for (s = 0; s < K; s++) {
                e = idx[s];
                dz[e] += (dg[e] - dot) / sum * p[e] * (1.0f - p[e]);
            }
        } else {
            for (s = 0; s < K; s++) {
                e = idx[s];
                dz[e] += dg[e] * p[e] * (1.0f - p[e]);
            }
        }
        break;
    case MOE_ROUTER_NOISY_TOPK: {
        const float *xi = L->noise + r, *zn = L->noise_logits + r;
        dot = 0.0f;
        for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
        for (s = 0; s < K; s++) {
            float dH;
            e = idx[s];
            dH = g[e] * (dg[e] - dot);
            dz[e] += dH;
            dzn[e] += dH * xi[e] * moe__sigmoid(zn[e]);
        }
        if (dload && L->has_noise) { /* smooth load: Phi((z_i - thr_i) / sd_i) */
            const float *H = L->noisy + r;
            const int *th = L->thresh + r;
            for (e = 0; e < E; e++) {
                float sd = moe__softplus(zn[e]) + c->noise_eps;
                int m = th[e];
                float u = (z[e] - H[m]) / sd;
                float du = dload[e] * 0.3989422804014327f * expf(-0.5f * u * u);
                float dthr = -du / sd, dsd = -du * u / sd;
                dz[e] += du / sd;
                dz[m] += dthr; /* H_m = z_m + xi_m * sd_m */
                dzn[m] += dthr * xi[m] * moe__sigmoid(zn[m]);
                dzn[e] += dsd * moe__sigmoid(zn[e]);
            }
        }
        break;
    }
    }
    /* balance loss through P (normalised probabilities) */
    if (dP) {
        if (c->router == MOE_ROUTER_SIGMOID) {
            float sum = 0.0f;
            dot = 0.0f;
            for (e = 0; e < E; e++) sum += p[e];
            for (e = 0; e < E; e++) dot += dP[e] * p[e] / sum;
            for (e = 0; e < E; e++) dz[e] += (dP[e] - dot) / sum * p[e] * (1.0f - p[e]);
        } else {
            dot = 0.0f;
            for (e = 0; e < E; e++) dot += dP[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dP[e] - dot);
        }
    }
    /* z-loss: d/dz_j of c/T * lse^2 = 2c/T * lse * softmax(z)_j */
    if (c->z_coef > 0.0f) {
        float a = 2.0f * c->z_coef * L->aux_grad_scale / (float)L->T * L->lse[t];
        for (e = 0; e < E; e++) dz[e] += a * expf(z[e] - L->lse[t]);
    }
}

MOE__IMPL moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                        const float *x) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, S = c->n_shared, T = L->T, t, i, e;
    size_t TE = (size_t)T * E;
    moe_expert_weights w, gw;
    float *f = L->aux_tmp, *imp = f + 2 * E, *load = f + 3 * E;
    float *dimp = NULL, *dload = NULL, *dP = NULL, *buf, *drin;
    const float *rin;
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "layer backward called without a forward before it");
    if (!dx || !dy || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: dx, dy and x must not be NULL");
    if (L->router_input && !L->d_router_input) return moe_err_set(&L->err, MOE_ERR_STATE, "router_input is set: set d_router_input too before backward");
    /* 1. routed bank: combine -> experts -> gather; the combine yields dL/dweight */
    memset(L->dgate, 0, TE * sizeof(float));
    memset(L->dlogits, 0, TE * sizeof(float));
    memset(L->dnoise_logits, 0, TE * sizeof(float));
    moe_combine_backward(L->deout, L->raw_w, dy, L->eout, &L->routed, d);
    for (i = 0; i < L->routed.n; i++) L->dgate[(size_t)L->routed.token[i] * E + L->routed.expert[i]] = L->raw_w[i];
    if (c->hyper) moe__hyper_backward(L, s, dx, dy, x); /* no gradient to the router: the set is discrete */
    if (c->gw_released && L->stats.broadcast > 0) /* y += p_{E-1} x for broadcast tokens */
        for (t = 0; t < T; t++)
            if (L->uncertain[t]) {
                const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
                float dot = 0.0f;
                int j;
                for (j = 0; j < d; j++) {
                    dot += g[j] * xt[j];
                    dx[(size_t)t * d + j] += L->bypass[t] * g[j];
                }
                L->dgate[(size_t)t * E + E - 1] = dot;
            }
    w = moe_layer_experts(L, s, 0, 0);
    gw = moe_layer_experts(L, s, 0, 1);
    moe_experts_backward(L->dxg, &gw, L->deout, L->xg, L->hg, L->hu, &w, L->routed.offset, E, d, c->d_ff,
                         c->expert, c->activation, L->work_a, L->work_b, &L->work);
    moe_gather_backward(dx, L->dxg, &L->routed, d);
    if (c->router == MOE_ROUTER_AOE) moe__aoe_gate_backward(L, s); /* work_a holds d h_gate */
    if (S > 0) {
        w = moe_layer_experts(L, s, 1, 0);
        gw = moe_layer_experts(L, s, 1, 1);
        moe_combine_backward(L->deout, NULL, dy, L->s_eout, &L->shared, d);
        moe_experts_backward(L->dxg, &gw, L->deout, L->s_xg, L->s_hg, L->s_hu, &w, L->shared.offset, S, d,
                             c->d_ff_shared, c->expert, c->activation, L->work_a, L->work_b, &L->work);
        moe_gather_backward(dx, L->dxg, &L->shared, d);
    }
    /* 2. auxiliary-loss gradients with respect to their per-expert pieces */
    buf = (float *)moe__calloc((size_t)E * 3, sizeof(float));
    if (!buf) return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory in layer backward");
    if (c->router == MOE_ROUTER_NOISY_TOPK) {
        dimp = buf;
        moe__cv2(imp, E, c->importance_coef * L->aux_grad_scale, dimp);
        if (L->has_noise) {
            dload = buf + E;
            moe__cv2(load, E, c->load_coef * L->aux_grad_scale, dload);
        }
    }
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) {
        float scale = c->balance_coef * L->aux_grad_scale * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0f : (float)E) / (float)T;
        dP = buf + 2 * E;
        for (e = 0; e < E; e++) dP[e] = scale * f[e]; /* f is a constant */
    }
    /* 3. router: per token (owner computes), then the two small matmuls */
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_backward_token(L, t, dimp, dload, dP);
    MOE_FREE(buf);
    rin = L->router_input ? L->router_input : x;
    drin = L->router_input ? L->d_router_input : dx;
    if (c->router == MOE_ROUTER_AOE)
        moe__aoe_logits_backward(L, s, dx, x);
    else
        moe_matmul_backward(drin, moe_store_grad(s, L->id_router_w), moe_store_grad(s, L->id_router_b), L->dlogits, rin,
                            moe_store_param(s, L->id_router_w), T, c->router_dim, E, &L->work);
    if (c->router == MOE_ROUTER_NOISY_TOPK)
        moe_matmul_backward(drin, moe_store_grad(s, L->id_noise_w), NULL, L->dnoise_logits, rin,
                            moe_store_param(s, L->id_noise_w), T, c->router_dim, E, &L->work);
    return MOE_OK;
}

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

/* ============================================================================================
   >>moe:gru
   ============================================================================================ */

MOE__IMPL size_t moe_gru_work_floats(int N, int p, int nthreads) { return moe_matmul_work_floats(N, p, 3 * p, nthreads); }

MOE__IMPL moe_status moe_gru_forward(float *h, float *gi, float *gh, const float *x, const float *h_prev,
                                     const float *w_ih, const float *w_hh, const float *b_ih, const float *b_hh,
                                     int N, int p, moe_work *work) {
    int i;
    moe_status st;
    if ((st = moe_matmul_forward(gi, x, w_ih, b_ih, N, p, 3 * p, work)) != MOE_OK) return st;
    if ((st = moe_matmul_forward(gh, h_prev, w_hh, b_hh, N, p, 3 * p, work)) != MOE_OK) return st;
    MOE_OMP_FOR_IF((double)N * p > 1e5)
    for (i = 0; i < N; i++) {
        const float *a = gi + (size_t)i * 3 * p, *b = gh + (size_t)i * 3 * p, *hp = h_prev + (size_t)i * p;
        float *o = h + (size_t)i * p;
        int j;
        for (j = 0; j < p; j++) {
            float r = moe__sigmoid(a[j] + b[j]), z = moe__sigmoid(a[p + j] + b[p + j]);
            float n = tanhf(a[2 * p + j] + r * b[2 * p + j]);
            o[j] = (1.0f - z) * n + z * hp[j];
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_gru_backward(float *dx, float *dh_prev, float *dw_ih, float *dw_hh, float *db_ih, float *db_hh,
                                      const float *dh, const float *x, const float *h_prev, const float *gi,
                                      const float *gh, const float *w_ih, const float *w_hh, int N, int p, float *scratch,
                                      moe_work *work) {
    float *dgi = scratch, *dgh = scratch + (size_t)N * 3 * p;
    moe_status st;
    int i;
    MOE_OMP_FOR_IF((double)N * p > 1e5)
    for (i = 0; i < N; i++) {
        const float *a = gi + (size_t)i * 3 * p, *b = gh + (size_t)i * 3 * p, *hp = h_prev + (size_t)i * p;
        const float *g = dh + (size_t)i * p;
        float *da = dgi + (size_t)i * 3 * p, *db = dgh + (size_t)i * 3 * p, *dhp = dh_prev + (size_t)i * p;
        int j;
        for (j = 0; j < p; j++) {
            float r = moe__sigmoid(a[j] + b[j]), z = moe__sigmoid(a[p + j] + b[p + j]);
            float n = tanhf(a[2 * p + j] + r * b[2 * p + j]);
            float dn = g[j] * (1.0f - z) * (1.0f - n * n); /* through tanh */
            float dz = g[j] * (hp[j] - n) * z * (1.0f - z);
            float dr = dn * b[2 * p + j] * r * (1.0f - r);
            da[j] = dr; da[p + j] = dz; da[2 * p + j] = dn;
            db[j] = dr; db[p + j] = dz; db[2 * p + j] = dn * r;
            dhp[j] += g[j] * z;
        }
    }
    if ((st = moe_matmul_backward(dx, dw_ih, db_ih, dgi, x, w_ih, N, p, 3 * p, work)) != MOE_OK) return st;
    return moe_matmul_backward(dh_prev, dw_hh, db_hh, dgh, h_prev, w_hh, N, p, 3 * p, work);
}

/* ============================================================================================
   >>moe:model
   ============================================================================================ */

MOE__IMPL moe_model_config moe_model_config_default(void) {
    moe_model_config c;
    memset(&c, 0, sizeof c);
    c.vocab = 256;
    c.max_seq = 256;
    c.d = 128;
    c.n_layers = 4;
    c.n_heads = 4;
    c.d_ff = 256;
    c.pos = MOE_POS_LEARNED;
    c.rope_theta = 10000.0f;
    c.norm_eps = 1e-5f;
    c.moe_every = 1;
    c.dense_first = 0;
    c.moe = moe_layer_config_default();
    c.moe.d_ff = 128;
    c.init_std = 0.02f;
    return c;
}

static int moe__block_is_moe(const moe_model_config *c, int l) {
    return c->moe_every > 0 && l >= c->dense_first && (l - c->dense_first) % c->moe_every == 0;
}

MOE__IMPL moe_status moe_model_config_validate(const moe_model_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    int l, any = 0;
    if (!c) return moe_err_set(err, bad, "model config is NULL");
    if (c->vocab <= 0 || c->max_seq <= 0 || c->d <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->d_ff <= 0)
        return moe_err_set(err, bad, "vocab, max_seq, d, n_layers, n_heads and d_ff must be positive");
    if (c->d % c->n_heads != 0) return moe_err_set(err, bad, "d (%d) must be a multiple of n_heads (%d)", c->d, c->n_heads);
    if (c->pos != MOE_POS_LEARNED && c->pos != MOE_POS_ROPE) return moe_err_set(err, bad, "unknown position kind %d", (int)c->pos);
    if (c->pos == MOE_POS_ROPE && (c->d / c->n_heads) % 2 != 0) return moe_err_set(err, bad, "rotary positions need an even head width, got %d", c->d / c->n_heads);
    if (c->pos == MOE_POS_ROPE && !(c->rope_theta > 1.0f)) return moe_err_set(err, bad, "rope_theta must be > 1");
    if (!(c->norm_eps > 0.0f) || !(c->init_std >= 0.0f)) return moe_err_set(err, bad, "norm_eps must be > 0 and init_std >= 0");
    if (c->moe_every < 0 || c->dense_first < 0) return moe_err_set(err, bad, "moe_every and dense_first must not be negative");
    if ((int)c->router_input < 0 || (int)c->router_input > MOE_RIN_MLP) return moe_err_set(err, bad, "unknown router input %d", (int)c->router_input);
    if (c->router_input != MOE_RIN_DIRECT && c->router_dim <= 0) return moe_err_set(err, bad, "a GRU or MLP router needs router_dim > 0");
    for (l = 0; l < c->n_layers; l++) any |= moe__block_is_moe(c, l);
    if (any) {
        moe_layer_config mc = c->moe;
        mc.d = c->d;
        mc.router_dim = 0;
        if (moe_layer_config_validate(&mc, err) != MOE_OK) return err ? err->status : bad;
    }
    if ((double)c->max_seq * c->max_seq * c->n_heads > 1e9) return moe_err_set(err, bad, "max_seq %d is too long for the stored attention matrices", c->max_seq);
    return MOE_OK;
}

static int moe__model_add(moe_model *m, const char *name, int flags, int n0, int n1, int n2) {
    int id;
    if (m->err.status != MOE_OK) return -1;
    id = moe_store_add(&m->S, name, flags, n0, n1, n2, 0);
    if (id < 0) moe_err_set(&m->err, m->S.err.status, "%s", m->S.err.msg);
    return id;
}

MOE__IMPL moe_status moe_model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T) {
    int l, d, N, L, NH, V, F;
    char name[MOE_NAME_LEN];
    size_t Nd;
    int ok = 1;
    memset(m, 0, sizeof *m);
    if (moe_model_config_validate(c, &m->err) != MOE_OK) return m->err.status;
    if (max_B <= 0 || max_T <= 0 || max_T > c->max_seq)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "batch shape %d x %d: need B >= 1 and 1 <= T <= max_seq (%d)", max_B, max_T, c->max_seq);
    if ((double)max_B * max_T > (1 << 24)) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "batch of %d x %d tokens is too large", max_B, max_T);
    m->cfg = *c;
    m->cfg.moe.d = c->d;
    m->cfg.moe.router_dim = c->router_input != MOE_RIN_DIRECT ? c->router_dim : 0;
    m->id_gru_wih = m->id_gru_whh = m->id_gru_bih = m->id_gru_bhh = -1;
    d = c->d; L = c->n_layers; NH = c->n_heads; V = c->vocab; F = c->d_ff;
    m->max_B = max_B; m->max_T = max_T;
    N = max_B * max_T;
    Nd = (size_t)N * d;
    moe_store_init(&m->S);
    m->blocks = (moe_block *)moe__calloc((size_t)L, sizeof(moe_block));
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory");
    m->id_wte = moe__model_add(m, "wte", MOE_TENSOR_DECAY, V, d, 0);
    m->id_wpe = c->pos == MOE_POS_LEARNED ? moe__model_add(m, "wpe", MOE_TENSOR_DECAY, c->max_seq, d, 0) : -1;
    if (c->router_input >= MOE_RIN_GRU && c->router_input <= MOE_RIN_GRU_DETACH) {
        int P = c->router_dim;
        m->id_gru_wih = moe__model_add(m, "rmoe.gru.w_ih", MOE_TENSOR_DECAY, 3 * P, P, 0);
        m->id_gru_whh = moe__model_add(m, "rmoe.gru.w_hh", MOE_TENSOR_DECAY, 3 * P, P, 0);
        m->id_gru_bih = moe__model_add(m, "rmoe.gru.b_ih", 0, 3 * P, 0, 0);
        m->id_gru_bhh = moe__model_add(m, "rmoe.gru.b_hh", 0, 3 * P, 0, 0);
    }
    for (l = 0; l < L; l++) {
        moe_block *b = &m->blocks[l];
        b->is_moe = moe__block_is_moe(c, l);
        sprintf(name, "l%d.ln1.w", l);
        b->id_ln1 = moe__model_add(m, name, 0, d, 0, 0);
        sprintf(name, "l%d.attn.wqkv", l);
        b->id_qkv = moe__model_add(m, name, MOE_TENSOR_DECAY, 3 * d, d, 0);
        sprintf(name, "l%d.attn.wo", l);
        b->id_wo = moe__model_add(m, name, MOE_TENSOR_DECAY, d, d, 0);
        sprintf(name, "l%d.ln2.w", l);
        b->id_ln2 = moe__model_add(m, name, 0, d, 0, 0);
        b->id_gate = b->id_up = b->id_down = b->id_rproj = -1;
        if (b->is_moe && c->router_input != MOE_RIN_DIRECT) {
            sprintf(name, "l%d.rmoe.proj", l);
            b->id_rproj = moe__model_add(m, name, MOE_TENSOR_DECAY, c->router_dim, d, 0);
        }
        if (b->is_moe) {
            if (m->err.status == MOE_OK) {
                sprintf(name, "l%d.moe.", l);
                moe_layer_config lc = m->cfg.moe;
                lc.hyper_layers = L; /* the shared layer embedding has a row per layer */
                lc.hyper_layer = l;
                if (moe_layer_init(&b->moe, &lc, &m->S, name, N) != MOE_OK)
                    moe_err_set(&m->err, b->moe.err.status, "layer %d: %s", l, b->moe.err.msg);
            }
        } else if (m->err.status == MOE_OK) { /* a dense FFN is a bank of one SwiGLU expert */
            sprintf(name, "l%d.ffn.w_gate", l);
            b->id_gate = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, F, d);
            sprintf(name, "l%d.ffn.w_up", l);
            b->id_up = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, F, d);
            sprintf(name, "l%d.ffn.w_down", l);
            b->id_down = moe__model_add(m, name, MOE_TENSOR_DECAY, 1, d, F);
        }
    }
    m->id_lnf = moe__model_add(m, "lnf.w", 0, d, 0, 0);
    if (m->err.status != MOE_OK) { moe_model_free(m); return m->err.status; }
    if (moe_store_alloc(&m->S, 1) != MOE_OK) {
        moe_err_set(&m->err, m->S.err.status, "%s", m->S.err.msg);
        moe_model_free(m);
        return m->err.status;
    }
    for (l = 0; l < L; l++) {
        moe_block *b = &m->blocks[l];
        b->x = (float *)moe__calloc(Nd, sizeof(float));
        b->ln1 = (float *)moe__calloc(Nd, sizeof(float));
        b->rstd1 = (float *)moe__calloc((size_t)N, sizeof(float));
        b->qkv = (float *)moe__calloc(Nd * 3, sizeof(float));
        b->att = (float *)moe__calloc((size_t)max_B * NH * max_T * max_T, sizeof(float));
        b->atty = (float *)moe__calloc(Nd, sizeof(float));
        b->x2 = (float *)moe__calloc(Nd, sizeof(float));
        b->ln2 = (float *)moe__calloc(Nd, sizeof(float));
        b->rstd2 = (float *)moe__calloc((size_t)N, sizeof(float));
        b->ffn = (float *)moe__calloc(Nd, sizeof(float));
        if (!b->is_moe) {
            b->hg = (float *)moe__calloc((size_t)N * F, sizeof(float));
            b->hu = (float *)moe__calloc((size_t)N * F, sizeof(float));
        }
        if (b->id_rproj >= 0) {
            size_t Np = (size_t)N * c->router_dim;
            b->rxp = (float *)moe__calloc(Np, sizeof(float));
            b->rh = (float *)moe__calloc(Np, sizeof(float));
            b->rgi = (float *)moe__calloc(Np * 3, sizeof(float));
            b->rgh = (float *)moe__calloc(Np * 3, sizeof(float));
            ok = ok && b->rxp && b->rh && b->rgi && b->rgh;
            b->moe.router_input = b->rh;
        }
        ok = ok && b->x && b->ln1 && b->rstd1 && b->qkv && b->att && b->atty && b->x2 && b->ln2 &&
             b->rstd2 && b->ffn && (b->is_moe || (b->hg && b->hu));
    }
    m->inputs = (int *)moe__calloc((size_t)N, sizeof(int));
    m->targets = (int *)moe__calloc((size_t)N, sizeof(int));
    m->x_final = (float *)moe__calloc(Nd, sizeof(float));
    m->lnf = (float *)moe__calloc(Nd, sizeof(float));
    m->rstd_f = (float *)moe__calloc((size_t)N, sizeof(float));
    m->logits = (float *)moe__calloc((size_t)N * V, sizeof(float));
    m->losses = (float *)moe__calloc((size_t)N, sizeof(float));
    m->rope = (float *)moe__calloc((size_t)max_T * (d / NH), sizeof(float));
    m->d_res = (float *)moe__calloc(Nd, sizeof(float));
    m->d_res2 = (float *)moe__calloc(Nd, sizeof(float));
    m->d_ln = (float *)moe__calloc(Nd, sizeof(float));
    m->d_qkv = (float *)moe__calloc(Nd * 3, sizeof(float));
    m->d_atty = (float *)moe__calloc(Nd, sizeof(float));
    m->d_logits = (float *)moe__calloc((size_t)N * V, sizeof(float));
    m->scratch1 = (float *)moe__calloc((size_t)N * F, sizeof(float));
    m->scratch2 = (float *)moe__calloc((size_t)N * F, sizeof(float));
    if (c->router_input != MOE_RIN_DIRECT) {
        size_t Np = (size_t)N * c->router_dim;
        m->r_zero = (float *)moe__calloc(Np, sizeof(float));
        m->r_drin = (float *)moe__calloc(Np, sizeof(float));
        m->r_carry = (float *)moe__calloc(Np, sizeof(float));
        m->r_dxp = (float *)moe__calloc(Np, sizeof(float));
        m->r_scratch = (float *)moe__calloc(Np * 6, sizeof(float));
        ok = ok && m->r_zero && m->r_drin && m->r_carry && m->r_dxp && m->r_scratch;
        for (l = 0; l < L; l++) m->blocks[l].moe.d_router_input = m->r_drin;
    }
    ok = ok && m->inputs && m->targets && m->x_final && m->lnf && m->rstd_f && m->logits && m->losses &&
         m->rope && m->d_res && m->d_res2 && m->d_ln && m->d_qkv && m->d_atty && m->d_logits && m->scratch1 && m->scratch2;
    { /* ONE work buffer: the largest scratch of the model's kernel calls and its layers' */
        int nt = moe_num_threads(), dense = 0, noisy = 0, P = c->router_dim;
        size_t need = moe_attention_work_floats(max_T, d, NH, nt), w, k;
        size_t mm[4];
        mm[0] = moe_matmul_work_floats(N, d, 3 * d, nt); /* qkv */
        mm[1] = moe_matmul_work_floats(N, d, d, nt);     /* attention output */
        mm[2] = moe_matmul_work_floats(N, d, V, nt);     /* tied head */
        mm[3] = c->router_input != MOE_RIN_DIRECT ? moe_matmul_work_floats(N, d, P, nt) : 0; /* router-input projector */
        for (k = 0; k < 4; k++) need = mm[k] > need ? mm[k] : need;
        for (l = 0; l < L; l++) {
            dense |= !m->blocks[l].is_moe;
            noisy |= m->blocks[l].is_moe && c->moe.router == MOE_ROUTER_NOISY_TOPK;
        }
        if (dense && (w = moe_experts_work_floats(N, 1, d, F, MOE_EXPERT_SWIGLU, nt)) > need) need = w;
        if (m->id_gru_wih >= 0 && (w = moe_gru_work_floats(N, P, nt)) > need) need = w;
        for (l = 0; l < L; l++)
            if (m->blocks[l].is_moe && m->blocks[l].moe.work.floats > need) need = m->blocks[l].moe.work.floats;
        ok = ok && moe_work_alloc(&m->work, need, nt) == MOE_OK;
        for (l = 0; ok && l < L; l++) /* the layers give theirs back and run on the model's */
            if (m->blocks[l].is_moe) {
                moe_work_free(&m->blocks[l].moe.work);
                m->blocks[l].moe.work = m->work;
            }
        m->gen_probs = (float *)moe__calloc((size_t)V * 2, sizeof(float));
        if (noisy) m->route_noise = (float *)moe__calloc((size_t)N * c->moe.n_experts, sizeof(float));
        ok = ok && m->gen_probs && (!noisy || m->route_noise);
    }
    if (!ok) {
        moe_model_free(m);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the activations of %d x %d tokens", max_B, max_T);
    }
    if (c->pos == MOE_POS_ROPE) moe_rope_table(m->rope, max_T, d / NH, c->rope_theta);
    return MOE_OK;
}

MOE__IMPL void moe_model_free(moe_model *m) {
    int l;
    if (m->blocks) {
        for (l = 0; l < m->cfg.n_layers; l++) {
            moe_block *b = &m->blocks[l];
            if (b->is_moe) {
                if (b->moe.work.buf == m->work.buf) memset(&b->moe.work, 0, sizeof b->moe.work); /* the model's */
                moe_layer_free(&b->moe);
            }
            MOE_FREE(b->x); MOE_FREE(b->ln1); MOE_FREE(b->rstd1); MOE_FREE(b->qkv); MOE_FREE(b->att);
            MOE_FREE(b->atty); MOE_FREE(b->x2); MOE_FREE(b->ln2); MOE_FREE(b->rstd2); MOE_FREE(b->ffn);
            MOE_FREE(b->hg); MOE_FREE(b->hu);
            MOE_FREE(b->rxp); MOE_FREE(b->rh); MOE_FREE(b->rgi); MOE_FREE(b->rgh);
        }
        MOE_FREE(m->blocks);
    }
    MOE_FREE(m->inputs); MOE_FREE(m->targets); MOE_FREE(m->x_final); MOE_FREE(m->lnf); MOE_FREE(m->rstd_f);
    MOE_FREE(m->logits); MOE_FREE(m->losses); MOE_FREE(m->rope); MOE_FREE(m->d_res); MOE_FREE(m->d_res2);
    MOE_FREE(m->d_ln); MOE_FREE(m->d_qkv); MOE_FREE(m->d_atty); MOE_FREE(m->d_logits);
    MOE_FREE(m->scratch1); MOE_FREE(m->scratch2);
    MOE_FREE(m->r_zero); MOE_FREE(m->r_drin); MOE_FREE(m->r_carry); MOE_FREE(m->r_dxp); MOE_FREE(m->r_scratch);
    MOE_FREE(m->route_noise); MOE_FREE(m->gen_probs);
    moe_work_free(&m->work);
    moe_store_free(&m->S);
    {
        moe_err keep = m->err;
        memset(m, 0, sizeof *m);
        m->err = keep;
    }
}

MOE__IMPL void moe_model_init_weights(moe_model *m, uint64_t seed) {
    moe_rng r;
    int id;
    size_t i;
    float std = m->cfg.init_std, res_std = std / sqrtf(2.0f * (float)m->cfg.n_layers);
    moe_rng_seed(&r, seed);
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        float *p = m->S.params + t->offset, sd;
        if (moe__hyper_init_tensor(t, p, &r)) continue;
        if (moe__ends_with(t->name, "ln1.w") || moe__ends_with(t->name, "ln2.w") || strcmp(t->name, "lnf.w") == 0) {
            for (i = 0; i < t->numel; i++) p[i] = 1.0f;
            continue;
        }
        if (strncmp(t->name, "rmoe.gru.w", 10) == 0) sd = 1.0f / sqrtf((float)m->cfg.router_dim); /* torch's scale */
        else if (moe__ends_with(t->name, "rmoe.proj")) sd = 1.0f / sqrtf((float)m->cfg.d); /* x' ~ unit scale */
        else if (moe__ends_with(t->name, "router.w")) sd = m->cfg.moe.router_init_std;
        else if (t->ndim == 1 || moe__ends_with(t->name, "router.w_noise") || moe__ends_with(t->name, ".b") ||
                 moe__ends_with(t->name, "b_up") || moe__ends_with(t->name, "b_down")) sd = 0.0f;
        else if (moe__ends_with(t->name, "attn.wo") || moe__ends_with(t->name, "w_down")) sd = res_std;
        else sd = std;
        for (i = 0; i < t->numel; i++) p[i] = sd * moe_rng_normal(&r);
    }
}

static moe_expert_weights moe__dense_ffn(const moe_model *m, const moe_block *b, int grads) {
    moe_expert_weights w;
    float *(*get)(const moe_store *, int) = grads ? moe_store_grad : moe_store_param;
    w.gate = get(&m->S, b->id_gate);
    w.up = get(&m->S, b->id_up);
    w.down = get(&m->S, b->id_down);
    w.b_up = w.b_down = NULL;
    return w;
}

/* A kernel call that fails (only a workspace that does not fit its call can) ends the pass
   with the kernel's status and what failed (layer l, or the model's own parts for l < 0). */
static moe_status moe__model_kernel_err(moe_model *m, moe_status st, int l, const char *what) {
    if (l < 0) return moe_err_set(&m->err, st, "%s: %s", what, moe_status_string(st));
    return moe_err_set(&m->err, st, "layer %d, %s: %s", l, what, moe_status_string(st));
}
#define MOE__MODEL_TRY(call, l, what)                                                    \
    do {                                                                                 \
        moe_status st_ = (call);                                                         \
        if (st_ != MOE_OK) return moe__model_kernel_err(m, st_, l, what);                \
    } while (0)

MOE__IMPL moe_status moe_model_forward(moe_model *m, const int *inputs, const int *targets, int B, int T,
                                       moe_rng *noise) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, NH = c->n_heads, V = c->vocab, N = B * T, l, i, t;
    const float *wte, *wpe, *rh_prev;
    float *x;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!inputs) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "inputs must not be NULL");
    if (B <= 0 || T <= 0 || B > m->max_B || T > m->max_T)
        return moe_err_set(&m->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the activations (%d x %d)", B, T, m->max_B, m->max_T);
    for (i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "input token %d at position %d is outside [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < -1 || targets[i] >= V)) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "target %d at position %d is outside [-1, %d)", targets[i], i, V);
    }
    m->B = m->T = 0;
    m->has_targets = 0;
    memcpy(m->inputs, inputs, sizeof(int) * (size_t)N);
    if (targets) memcpy(m->targets, targets, sizeof(int) * (size_t)N);
    /* embeddings */
    wte = moe_store_param(&m->S, m->id_wte);
    wpe = moe_store_param(&m->S, m->id_wpe);
    x = m->blocks[0].x;
    for (i = 0; i < N; i++) {
        const float *e = wte + (size_t)inputs[i] * d;
        float *o = x + (size_t)i * d;
        int j;
        t = i % T;
        for (j = 0; j < d; j++) o[j] = e[j] + (wpe ? wpe[(size_t)t * d + j] : 0.0f);
    }
    m->aux_loss = 0.0;
    rh_prev = m->r_zero; /* RMoE: h_0 = 0 before the first MoE layer; dense layers pass h on */
    for (l = 0; l < c->n_layers; l++) {
        moe_block *b = &m->blocks[l];
        float *out = l + 1 < c->n_layers ? m->blocks[l + 1].x : m->x_final;
        moe_rmsnorm_forward(b->ln1, b->rstd1, b->x, moe_store_param(&m->S, b->id_ln1), N, d, c->norm_eps);
        MOE__MODEL_TRY(moe_matmul_forward(b->qkv, b->ln1, moe_store_param(&m->S, b->id_qkv), NULL, N, d, 3 * d, &m->work), l, "qkv");
        if (c->pos == MOE_POS_ROPE) moe_rope_apply(b->qkv, m->rope, B, T, d, NH, 0);
        MOE__MODEL_TRY(moe_attention_forward(b->atty, b->att, b->qkv, B, T, d, NH, &m->work), l, "attention");
        MOE__MODEL_TRY(moe_matmul_forward(b->x2, b->atty, moe_store_param(&m->S, b->id_wo), NULL, N, d, d, &m->work), l, "attention output");
        for (i = 0; i < N * d; i++) b->x2[i] += b->x[i];
        moe_rmsnorm_forward(b->ln2, b->rstd2, b->x2, moe_store_param(&m->S, b->id_ln2), N, d, c->norm_eps);
        if (b->is_moe) {
            moe_status st;
            if (b->id_rproj >= 0) { /* the router's input: GRU state or MLP hidden layer */
                size_t Np = (size_t)N * c->router_dim;
                MOE__MODEL_TRY(moe_matmul_forward(b->rxp, b->ln2, moe_store_param(&m->S, b->id_rproj), NULL, N, d, c->router_dim, &m->work),
                               l, "router-input projector");
                if (c->router_input == MOE_RIN_MLP) {
                    moe_activation_forward(b->rh, b->rxp, Np, MOE_ACT_GELU);
                } else {
                    b->rh_prev = c->router_input == MOE_RIN_GRU_NP ? m->r_zero : rh_prev;
                    MOE__MODEL_TRY(moe_gru_forward(b->rh, b->rgi, b->rgh, b->rxp, b->rh_prev, moe_store_param(&m->S, m->id_gru_wih),
                                                   moe_store_param(&m->S, m->id_gru_whh), moe_store_param(&m->S, m->id_gru_bih),
                                                   moe_store_param(&m->S, m->id_gru_bhh), N, c->router_dim, &m->work),
                                   l, "router GRU");
                    rh_prev = b->rh;
                }
            }
            b->moe.seq_len = T;
            if (noise && m->route_noise) { /* fresh draws per layer, into the buffer planned at init */
                size_t n = (size_t)N * c->moe.n_experts, k;
                for (k = 0; k < n; k++) m->route_noise[k] = moe_rng_normal(noise);
            }
            st = moe_layer_forward(&b->moe, &m->S, b->ffn, b->ln2, N, noise && m->route_noise ? m->route_noise : NULL);
            if (st != MOE_OK) return moe_err_set(&m->err, st, "layer %d: %s", l, b->moe.err.msg);
            m->aux_loss += b->moe.stats.aux_total;
        } else {
            moe_expert_weights w = moe__dense_ffn(m, b, 0);
            int offset[2];
            offset[0] = 0;
            offset[1] = N;
            MOE__MODEL_TRY(moe_experts_forward(b->ffn, b->hg, b->hu, b->ln2, &w, offset, 1, d, c->d_ff, MOE_EXPERT_SWIGLU,
                                               MOE_ACT_SILU, &m->work),
                           l, "dense FFN");
        }
        if (m->ffn_hook) m->ffn_hook(m, l, m->ffn_hook_user);
        for (i = 0; i < N * d; i++) out[i] = b->x2[i] + b->ffn[i];
    }
    moe_rmsnorm_forward(m->lnf, m->rstd_f, m->x_final, moe_store_param(&m->S, m->id_lnf), N, d, c->norm_eps);
    MOE__MODEL_TRY(moe_matmul_forward(m->logits, m->lnf, wte, NULL, N, d, V, &m->work), -1, "tied head");
    m->loss = targets ? moe_crossentropy_forward(m->losses, m->logits, targets, N, V) : 0.0;
    m->B = B;
    m->T = T;
    m->has_targets = targets != NULL;
    return MOE_OK;
}

/* Backward of one MoE block's router input (RMoE GRU step or MLP router). On entry r_drin
   holds dL/d(router input) from the layer and, for the GRU kinds, r_carry holds dL/dh_l from
   the MoE layer above; on exit r_carry holds dL/dh_{l-1} (0 for the NP and detach
   ablations) and d_ln has received the projector's input gradient. */
static moe_status moe__router_input_backward(moe_model *m, const moe_block *b, int l) {
    const moe_model_config *c = &m->cfg;
    int N = m->B * m->T, P = c->router_dim;
    size_t i, Np = (size_t)N * P;
    moe_store *S = &m->S;
    memset(m->r_dxp, 0, sizeof(float) * Np);
    if (c->router_input == MOE_RIN_MLP) {
        moe_activation_backward(m->r_dxp, m->r_drin, b->rxp, Np, MOE_ACT_GELU);
    } else {
        for (i = 0; i < Np; i++) m->r_drin[i] += m->r_carry[i]; /* dL/dh_l: own router + layers above */
        memset(m->r_carry, 0, sizeof(float) * Np);
        MOE__MODEL_TRY(moe_gru_backward(m->r_dxp, m->r_carry, moe_store_grad(S, m->id_gru_wih), moe_store_grad(S, m->id_gru_whh),
                                        moe_store_grad(S, m->id_gru_bih), moe_store_grad(S, m->id_gru_bhh), m->r_drin, b->rxp,
                                        b->rh_prev, b->rgi, b->rgh, moe_store_param(S, m->id_gru_wih),
                                        moe_store_param(S, m->id_gru_whh), N, P, m->r_scratch, &m->work),
                       l, "router GRU backward");
        if (c->router_input != MOE_RIN_GRU) memset(m->r_carry, 0, sizeof(float) * Np);
    }
    MOE__MODEL_TRY(moe_matmul_backward(m->d_ln, moe_store_grad(S, b->id_rproj), NULL, m->r_dxp, b->ln2,
                                       moe_store_param(S, b->id_rproj), N, c->d, P, &m->work),
                   l, "router-input projector backward");
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_backward(moe_model *m, float scale) {
    const moe_model_config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, d = c->d, NH = c->n_heads, V = c->vocab, l, i, count = 0;
    float *d_res = m->d_res, *d_res2 = m->d_res2;
    moe_store *S = &m->S;
    if (!m->has_targets) return moe_err_set(&m->err, MOE_ERR_STATE, "backward needs a forward with targets before it");
    for (i = 0; i < N; i++) count += m->targets[i] >= 0;
    memset(m->d_logits, 0, sizeof(float) * (size_t)N * V);
    if (count > 0) moe_crossentropy_backward(m->d_logits, m->logits, m->targets, N, V, scale / (float)count);
    /* tied head: logits = lnf . wte^T */
    memset(m->d_ln, 0, sizeof(float) * (size_t)N * d);
    MOE__MODEL_TRY(moe_matmul_backward(m->d_ln, moe_store_grad(S, m->id_wte), NULL, m->d_logits, m->lnf, moe_store_param(S, m->id_wte),
                                       N, d, V, &m->work),
                   -1, "tied head backward");
    memset(d_res, 0, sizeof(float) * (size_t)N * d);
    moe_rmsnorm_backward(d_res, moe_store_grad(S, m->id_lnf), m->d_ln, m->x_final, moe_store_param(S, m->id_lnf), m->rstd_f, N, d);
    if (m->r_carry) memset(m->r_carry, 0, sizeof(float) * (size_t)N * c->router_dim); /* dL/dh of the layer above */
    for (l = c->n_layers - 1; l >= 0; l--) {
        moe_block *b = &m->blocks[l];
        /* d_res = dL/d(block output). FFN branch: d x2 = d_res + RMSNorm2'(dFFN input) */
        memcpy(d_res2, d_res, sizeof(float) * (size_t)N * d);
        memset(m->d_ln, 0, sizeof(float) * (size_t)N * d);
        if (b->is_moe) {
            moe_status st;
            b->moe.aux_grad_scale = scale; /* d_res already carries the scale from d_logits */
            if (b->id_rproj >= 0) memset(m->r_drin, 0, sizeof(float) * (size_t)N * c->router_dim);
            st = moe_layer_backward(&b->moe, S, m->d_ln, d_res, b->ln2);
            if (st != MOE_OK) return moe_err_set(&m->err, st, "layer %d: %s", l, b->moe.err.msg);
            if (b->id_rproj >= 0 && (st = moe__router_input_backward(m, b, l)) != MOE_OK) return st;
        } else {
            moe_expert_weights w = moe__dense_ffn(m, b, 0), gw = moe__dense_ffn(m, b, 1);
            int offset[2];
            offset[0] = 0;
            offset[1] = N;
            MOE__MODEL_TRY(moe_experts_backward(m->d_ln, &gw, d_res, b->ln2, b->hg, b->hu, &w, offset, 1, d, c->d_ff,
                                                MOE_EXPERT_SWIGLU, MOE_ACT_SILU, m->scratch1, m->scratch2, &m->work),
                           l, "dense FFN backward");
        }
        moe_rmsnorm_backward(d_res2, moe_store_grad(S, b->id_ln2), m->d_ln, b->x2, moe_store_param(S, b->id_ln2), b->rstd2, N, d);
        /* attention branch: d x = d x2 + RMSNorm1'(d qkv-projection input) */
        memcpy(d_res, d_res2, sizeof(float) * (size_t)N * d);
        memset(m->d_atty, 0, sizeof(float) * (size_t)N * d);
        MOE__MODEL_TRY(moe_matmul_backward(m->d_atty, moe_store_grad(S, b->id_wo), NULL, d_res2, b->atty, moe_store_param(S, b->id_wo),
                                           N, d, d, &m->work),
                       l, "attention output backward");
        MOE__MODEL_TRY(moe_attention_backward(m->d_qkv, m->d_atty, b->qkv, b->att, B, T, d, NH, &m->work), l, "attention backward");
        if (c->pos == MOE_POS_ROPE) moe_rope_apply(m->d_qkv, m->rope, B, T, d, NH, 1);
        memset(m->d_ln, 0, sizeof(float) * (size_t)N * d);
        MOE__MODEL_TRY(moe_matmul_backward(m->d_ln, moe_store_grad(S, b->id_qkv), NULL, m->d_qkv, b->ln1, moe_store_param(S, b->id_qkv),
                                           N, d, 3 * d, &m->work),
                       l, "qkv backward");
        /* d_res now holds dL/dx of this block: the output gradient of the block below */
        moe_rmsnorm_backward(d_res, moe_store_grad(S, b->id_ln1), m->d_ln, b->x, moe_store_param(S, b->id_ln1), b->rstd1, N, d);
    }
    /* embeddings: a scatter by token id, serial so the sum order is fixed */
    {
        float *gwte = moe_store_grad(S, m->id_wte), *gwpe = moe_store_grad(S, m->id_wpe);
        int j;
        for (i = 0; i < N; i++) {
            const float *g = d_res + (size_t)i * d;
            float *o = gwte + (size_t)m->inputs[i] * d;
            for (j = 0; j < d; j++) o[j] += g[j];
            if (gwpe) {
                float *p = gwpe + (size_t)(i % T) * d;
                for (j = 0; j < d; j++) p[j] += g[j];
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL void moe_model_set_broadcast(moe_model *m, int on) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) m->blocks[l].moe.gw_active = on;
}

MOE__IMPL size_t moe_model_params_total(const moe_model *m) { return m->S.numel; }

MOE__IMPL size_t moe_model_params_active(const moe_model *m) {
    size_t total = m->S.numel;
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        const moe_layer_config *c = &b->moe.cfg;
        size_t per_expert;
        if (!b->is_moe) continue;
        per_expert = (size_t)(c->expert == MOE_EXPERT_SWIGLU ? 3 : 2) * c->d * c->d_ff +
                     (c->expert_bias ? (size_t)c->d_ff + c->d : 0);
        if (c->router == MOE_ROUTER_AOE) /* every expert's W_in runs for every token; W_out only if chosen */
            per_expert = 2 * (size_t)c->d * c->d_ff + (size_t)c->d_ff * c->aoe_rank;
        total -= (size_t)(c->n_experts - c->top_k) * per_expert;
    }
    return total;
}

MOE__IMPL moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                        const moe_sampler *sampler, moe_rng *rng) {
    int V = m->cfg.vocab, n = n_prompt, step, i;
    float *p = m->gen_probs; /* (2 V) planned at init */
    moe_status st;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!prompt || !out || n_prompt < 1 || n_new < 0 || !sampler || !rng)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "generate needs a prompt of at least one token, an output buffer, a sampler and an RNG");
    if (m->cfg.moe_every > 0 && m->cfg.moe.router == MOE_ROUTER_EXPERT_CHOICE)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "expert-choice routing is not causal (a token's experts depend on later tokens): it cannot generate");
    if (!(sampler->temperature >= 0.0f) || sampler->top_k < 0 || !(sampler->top_p > 0.0f && sampler->top_p <= 1.0f))
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "sampler: temperature >= 0, top_k >= 0, 0 < top_p <= 1");
    memcpy(out, prompt, sizeof(int) * (size_t)n_prompt);
    for (step = 0; step < n_new; step++) {
        int ctx = n < m->max_T ? n : m->max_T, next = 0;
        const float *z;
        st = moe_model_forward(m, out + n - ctx, NULL, 1, ctx, NULL);
        if (st != MOE_OK) return st;
        z = m->logits + (size_t)(ctx - 1) * V;
        if (sampler->temperature == 0.0f) {
            for (i = 1; i < V; i++)
                if (z[i] > z[next]) next = i;
        } else {
            /* softmax at temperature, then keep the top-k and the top-p mass, sample */
            float mx = -FLT_MAX, *order = p + V, cut = -FLT_MAX;
            double sum = 0.0, acc = 0.0, u;
            for (i = 0; i < V; i++) mx = z[i] > mx ? z[i] : mx;
            for (i = 0; i < V; i++) { p[i] = expf((z[i] - mx) / sampler->temperature); sum += p[i]; }
            for (i = 0; i < V; i++) { p[i] = (float)(p[i] / sum); order[i] = p[i]; }
            if (sampler->top_k > 0 || sampler->top_p < 1.0f) {
                /* threshold = the smallest probability kept by both rules */
                int kept = 0;
                qsort(order, (size_t)V, sizeof(float), moe__float_desc);
                for (i = 0; i < V; i++) {
                    if (sampler->top_k > 0 && kept >= sampler->top_k) break;
                    if (acc >= sampler->top_p) break;
                    acc += order[i];
                    cut = order[i];
                    kept++;
                }
                for (i = 0; i < V; i++)
                    if (p[i] < cut) p[i] = 0.0f;
            }
            sum = 0.0;
            for (i = 0; i < V; i++) sum += p[i];
            u = moe_rng_uniform(rng) * sum;
            acc = 0.0;
            next = -1;
            for (i = 0; i < V; i++) {
                if (p[i] <= 0.0f) continue;
                acc += p[i];
                next = i;
                if (u < acc) break;
            }
        }
        out[n++] = next;
    }
    m->B = m->T = 0; /* the generation forwards leave no batch to differentiate */
    m->has_targets = 0;
    return MOE_OK;
}

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

#endif /* MOE_IMPLEMENTATION */

/*
   REVISION HISTORY
   0.1.0  numeric core, experts, the router families (standard, AoE, RMoE, GW-MoE, HyperMoE),
          the MoE layer, a tiny decoder-only MoE transformer, byte loader.

   ------------------------------------------------------------------------------------------
   MIT License. Copyright (c) 2026 The moe.h authors.
   Permission is hereby granted, free of charge, to any person obtaining a copy of this software
   and associated documentation files (the "Software"), to deal in the Software without
   restriction, including without limitation the rights to use, copy, modify, merge, publish,
   distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
   Software is furnished to do so, subject to the following conditions: The above copyright
   notice and this permission notice shall be included in all copies or substantial portions of
   the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
   IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A
   PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE
   LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
   OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
   DEALINGS IN THE SOFTWARE.
*/
