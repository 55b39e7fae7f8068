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

       // x, y, dx, dy: (T, c.d) floats, T <= 1024 tokens a call; x is your input
       moe_store S;                       // THE parameter store: params/grads/Adam m,v
       moe_layer L;                       // one MoE layer: config, tensor ids, activations
       moe_rng rng;
       moe_layer_config c = moe_layer_config_default();
       moe_adamw_config opt = moe_adamw_config_default();
       long long step;
       c.d = 64; c.d_ff = 128; c.n_experts = 8; c.top_k = 2;
       moe_rng_seed(&rng, 1);
       moe_store_init(&S);
       if (moe_layer_init(&L, &c, &S, "moe.", 1024) != MOE_OK) return 1;  // L.err.msg: why
       if (moe_store_alloc(&S, 1) != MOE_OK) return 1;   // params + grads + Adam moments
       moe_layer_init_weights(&L, &S, &rng);
       for (step = 1; step <= n_steps; step++) {
           moe_layer_forward(&L, &S, y, x, T, NULL);     // y = MoE(x); NULL: no per-call
                                                         // inputs (see moe_layer_args)
           your_loss_gradient(dy, y, T);                 // dy = dLoss/dy
           moe_store_zero_grad(&S);
           memset(dx, 0, sizeof(float) * T * c.d);
           moe_layer_backward(&L, &S, dx, dy, x, NULL);  // S.grads += (aux losses too), dx +=
           moe_adamw_step(&S, &opt, lr, step);
       }
       moe_layer_free(&L);  moe_store_free(&S);

   The QUICK START is tests/test_quickstart.c, which compiles it, trains, and checks that
   these lines are still its own.

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
       MOE_MPI              data and expert parallelism over MPI (>>moe:mpi);
                            build with mpicc, run under mpirun                   (everywhere)
       MOE_CUDA             the CUDA twins (>>moe:cuda_core ...): the implementation file is
                            a .cu compiled by nvcc, linked with -lcublas          (everywhere)
       MOE_CUDA_BODIES      the CUDA kernels' per-thread bodies as plain C functions, without
                            CUDA (the CPU test of their indexing and arithmetic)  (impl. file)
     The blocking of the GEMM under every matmul, expert and attention product
     (>>moe:matmul), all (impl. file):
       MOE_GEMM_MR, MOE_GEMM_NR  the register tile: MR x NR floats of C stay in registers
                            through the whole depth loop. Default 8 x 32 with gcc and AVX-512,
                            6 x 16 with AVX/AVX2 (and with clang, which keeps 256-bit vectors:
                            build with -mprefer-vector-width=512 and set 8 x 32 for AVX-512),
                            4 x 16 otherwise. Larger tiles load less per FMA until the
                            accumulators no longer fit the vector registers and spill.
       MOE_GEMM_KC          depth of a packed panel pair, 256: a KC x NR panel of B stays in
                            L1 while the A panels stream past it
       MOE_GEMM_MC          rows of A packed per block, 192, a multiple of MR: the MC x KC
                            block stays in L2
       MOE_GEMM_NC          columns of B packed per block, 2048, a multiple of NR: the
                            KC x NC block stays in L2 / L3
     MR, NR, MC and NC change speed only. KC is where a product's partial sums meet C, so
     another KC changes the last bits of every result (never their independence of the
     thread count).
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
       1. core           >>moe:core         status codes, errors, allocator, RNG, timer
       2. store          >>moe:store        THE tensor table over flat params/grads/m/v, fingerprint
       3. optim          >>moe:optim        AdamW, global gradient-norm clipping, warm-up + cosine
       4. mask           >>moe:mask         update masks over the tensor table: freeze tensors, rows,
                                            columns; mask the gradient or the update
       5. ckpt           >>moe:ckpt         checkpoint file: one versioned format, atomic, CRC-32
       6. matmul         >>moe:matmul       packed, register-tiled GEMM; matmul forward/backward
                                            (+ naive references); weights packed ahead for few-row products
       7. kernels        >>moe:kernels      softmax, SiLU, GELU, ReLU, SwiGLU, RMSNorm, LayerNorm,
                                            cross-entropy: forward/backward pairs
       8. experts        >>moe:experts      SwiGLU and two-matrix FFN experts on gathered tokens
       9. dispatch       >>moe:dispatch     the assignment list: counting sort, gather, combine
      10. router         >>moe:router       the router interface: config, routing statistics, the
                                            hooks and ONE dispatcher; balance losses (Switch /
                                            HF-Mixtral / DeepSeek), z-loss
      11. router_topk    >>moe:router_topk  token choice: the linear router, softmax top-k (Switch,
                                            Mixtral, DeepSeek), sigmoid top-k, capacity
      12. router_noisy   >>moe:router_noisy Shazeer noisy top-k and its CV^2 losses
      13. router_ec      >>moe:router_ec    expert choice
      14. router_aoe     >>moe:router_aoe   Autonomy-of-Experts: experts choose by their cache norms
      15. router_gw      >>moe:router_gw    GW-MoE: uncertain tokens broadcast to every expert
      16. router_hyper   >>moe:router_hyper HyperMoE: a hyper-expert from the unselected experts
      17. layer          >>moe:layer        the MoE layer: routed and shared experts around the router
      18. attention      >>moe:attention    causal multi-head self-attention, rotary positions
      19. gru            >>moe:gru          the GRU cell of RMoE's layerwise recurrent router
      20. router_input   >>moe:router_input what the routers read: x, RMoE's GRU state, an MLP
      21. model          >>moe:model        tiny decoder-only (MoE) transformer over bytes: forward,
                                            backward, generation; CQIL's concurrent layer groups
      22. select         >>moe:select       named selections of the model's linear matrices: FFN keys
                                            (gate, up) and values (down), attention projections
      23. lora           >>moe:lora         low-rank adapters on any matrix or expert bank, in weight
                                            space: merge, unmerge, gradients, adapter-only steps, files
      24. migu           >>moe:migu         MIGU: output-magnitude statistics of every linear layer over a
                                            step, top (1 - T) units updated, the random control
      25. model_io       >>moe:model_io     model files: the config as a record of named fields, save and
                                            load (checked before anything is allocated, older files)
      26. generate       >>moe:generate     a KV cache (keys transposed), incremental decoding on the weights
                                            packed once per generation, batched generation with a sampler
                                            and a stop token per sequence
      27. growth         >>moe:growth       model growth (G_stack): depth and width growth operators G_direct,
                                            G_zero, G_random, G_learn; the paper's growth formulas
      28. safetensors    >>moe:safetensors  safetensors files of any store (F32, F16, BF16), bounded reading;
                                            the model under Hugging Face Llama/Mixtral names, config.json
      29. gguf           >>moe:gguf         GGUF files of the model that llama.cpp runs (llama architecture,
                                            dense or Mixtral-style MoE, byte vocabulary)
      30. closer_look    >>moe:closer_look  diagnostics of "A Closer Look into MoE": two-pass expert outputs,
                                            norm-vs-score ranks, expert similarities, gate-neuron R^2, Kendall
                                            tau; routing balance and MI; adjacent layers' input similarity
      31. data           >>moe:data         byte-window batches from one or several sources
      32. mpi            >>moe:mpi          data and expert parallelism over MPI (compiled under MOE_MPI):
                                            fixed-order gradient reduction, experts split across ranks
      33. cuda_core      >>moe:cuda_core    MOE_CUDA: the device context, the store's device copy, AdamW
                                            and clipping on the device (the CPU twins' names + _cuda)
      34. cuda_kernels   >>moe:cuda_kernels MOE_CUDA: cuBLAS GEMMs, elementwise kernels, RMSNorm, softmax,
                                            cross-entropy, attention, dispatch, softmax top-k routing
      35. cuda_layer     >>moe:cuda_layer   MOE_CUDA: the MoE layer with the standard softmax top-k router,
                                            experts grouped per expert, forward and backward
      36. cuda_model     >>moe:cuda_model   MOE_CUDA: the tiny transformer's forward and backward on the
                                            device (dense and standard top-k MoE blocks)

   Where each router family lives. >>moe:router holds the hooks every family implements and
   the ONE dispatcher that chooses by cfg.router; a family's anchor opens its section, forward
   and backward side by side. Tests are in tests/test_layer.c unless named otherwise; goldens
   (PyTorch) layer_* in tests/test_golden.c, family_* and rmoe_* in tests/test_family_golden.c.
     softmax top-k (Switch, Mixtral, DeepSeek), capacity                   >>moe:router_topk
         forward   moe__linear_router_logits, moe__topk_select, moe__topk_assign,
                   moe__topk_passthrough_forward (HF Switch's dropped tokens)
         backward  moe__topk_backward_token, moe__softmax_backward_token,
                   moe__topk_passthrough_backward, moe__linear_router_backward
         tests     test_gradients, test_topk_semantics, test_capacity; goldens layer_switch,
                   layer_mixtral, layer_deepseek, layer_capacity*, layer_topk_ties
     sigmoid top-k                                                         >>moe:router_topk
         forward   moe__sigmoid_probs, moe__topk_select, moe__topk_assign
         backward  moe__sigmoid_backward_token, moe__sigmoid_mean_prob_backward
         tests     test_gradients, test_aux_gradients; goldens layer_sigmoid*
     noisy top-k (Shazeer) and its CV^2 losses                            >>moe:router_noisy
         forward   moe__noisy_scores, moe__noisy_select, moe__noisy_aux
         backward  moe__noisy_aux_backward, moe__noisy_backward_token, moe__noisy_backward
         tests     test_gradients, test_aux_gradients; goldens layer_noisy*
     expert choice                                                           >>moe:router_ec
         forward   moe__ec_assign          backward  moe__softmax_backward_token
         tests     test_expert_choice; goldens layer_expert_choice*
     AoE (router-free)                                                      >>moe:router_aoe
         forward   moe__aoe_logits, moe__topk_select, moe__aoe_gate_forward
         backward  moe__aoe_gate_backward, moe__topk_backward_token, moe__aoe_backward
         tests     test_aoe; goldens family_aoe_*
     GW-MoE broadcast (extension of softmax top-k)                           >>moe:router_gw
         forward   moe__gw_mark, moe__gw_assign_token, moe__gw_output_forward
         backward  moe__gw_output_backward, moe__gw_backward_token
         tests     test_gw; goldens family_gw_*
     HyperMoE hyper-expert (extension)                                    >>moe:router_hyper
         forward   moe__hyper_forward      backward  moe__hyper_backward
         tests     test_hyper; goldens family_hyper_*
     RMoE's GRU state, MLP router (what a model's routers read)           >>moe:router_input
         forward   moe__router_input_forward        backward  moe__router_input_backward
         tests     test_recurrent_router in tests/test_model.c; goldens rmoe_*
     every family: a non-finite logit is MOE_ERR_NUMERIC (moe__router_scores); test_non_finite
     the field's conventions as options (moe_layer_config's last fields; the model's
     balance_all_layers): capacity_order, drop_passthrough, routed_scale / shared_scale,
     selection_bias (moe_layer_update_selection_bias), hyper_head_bias, cv_unbiased,
     ec_capacity_factor; the raw aux terms in moe_routing_stats. Tests: test_capacity,
     test_output_scales, test_selection_bias, test_hyper, test_aux_gradients, test_expert_choice,
     test_raw_aux_terms; test_balance_all_layers (test_model.c); goldens layer_capacity_token,
     layer_capacity_switch_hf, layer_deepseek_scaled, layer_sigmoid_v3, layer_noisy_unbiased,
     layer_expert_choice_cf, family_hyper_bias, rmoe_gru_balance_all

   Tests: tests/test_core.c (core to ckpt), tests/test_kernels.c and tests/test_gemm.c (matmul,
   kernels, experts, attention), tests/test_layer.c (dispatch to layer), tests/test_model.c
   (router_input, model, data), tests/test_model_io.c (model_io), tests/test_interchange.c
   (safetensors, gguf; make interop: llama.cpp runs the GGUF files), tests/test_generate.c
   (generate: decoding = the full forward, batched = one by one); PyTorch goldens:
   tests/test_golden.c (kernels, layer), tests/test_model_golden.c (model),
   tests/test_family_golden.c (AoE, GW-MoE, HyperMoE, RMoE). Benchmarks: bench/.

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
   >>moe:mask  update masks over the tensor table
   ============================================================================================
   One byte per parameter, in the store's flat order (the table gives the layout; the mask
   holds no copy of it): 1 = the parameter may change this step, 0 = masked. Freeze a tensor,
   one slice of it along any axis (a row = an output unit of a (..., out, in) weight, a column
   = an input, an expert of an (E, out, in) bank), or set a weight's rows from a per-unit
   vector (MIGU). Two modes, because they differ under AdamW (MIGU, arXiv 2406.17245 §3 vs its
   official code):
     MOE_MASK_GRAD    masked gradients are zeroed before the optimizer; the first moment and
                      the decoupled weight decay still move a masked parameter (the code);
     MOE_MASK_UPDATE  a masked parameter, its moments included, does not change at all (the
                      paper's W <- W - lr (M . grad)).
   In both modes the masked gradients are zeroed before clipping, so the clipping norm is the
   norm of the gradient that may be applied. A checkpoint carries a mask that persists (a
   frozen tensor) in its state blob: moe_mask_pack / moe_mask_unpack. */

typedef enum moe_mask_mode {
    MOE_MASK_GRAD = 0,  /* zero masked gradients before AdamW (moments, decay still act) */
    MOE_MASK_UPDATE = 1 /* masked parameters and their moments stay as they are          */
} moe_mask_mode;

typedef struct moe_mask {
    unsigned char *keep;  /* (numel) 1 = may change                                       */
    size_t numel;         /* the store's                                                  */
    uint64_t fingerprint; /* moe_store_fingerprint of the store it was made for           */
    moe_mask_mode mode;
    moe_err err;
} moe_mask;

/* Everything kept. The store's table must be complete (allocated or declared). */
MOEDEF moe_status moe_mask_init(moe_mask *k, const moe_store *s, moe_mask_mode mode);
MOEDEF void moe_mask_free(moe_mask *k);
MOEDEF void moe_mask_fill(moe_mask *k, int keep);
/* The whole tensor `name` kept (1) or masked (0). Unknown name: MOE_ERR_INVALID_ARG, mask
   unchanged (as for every call below that fails). */
MOEDEF moe_status moe_mask_set_tensor(moe_mask *k, const moe_store *s, const char *name, int keep);
/* Every element of `name` whose index along `axis` (0 = outermost) is `index`. A row of a
   (out, in) weight is axis 0, a column axis 1; for an (E, out, in) bank axis 0 is an expert. */
MOEDEF moe_status moe_mask_set_slice(moe_mask *k, const moe_store *s, const char *name, int axis,
                                     int index, int keep);
/* Rows of tensor `id` (a row = the last dimension: one output unit of a (..., out, in)
   weight) from row_keep (numel / last dim entries, nonzero = keep). */
MOEDEF moe_status moe_mask_set_rows(moe_mask *k, const moe_store *s, int id, const unsigned char *row_keep);
/* kept parameters, of the whole store (id < 0) or of tensor id */
MOEDEF size_t moe_mask_count(const moe_mask *k, const moe_store *s, int id);
/* zeroes the masked gradients */
MOEDEF moe_status moe_mask_grads(const moe_mask *k, moe_store *s);
/* One training step under the mask: masked gradients zeroed, then global-norm clipping
   (max_norm <= 0: none; *norm, if not NULL, gets the norm before clipping), then AdamW in the
   mask's mode. With everything kept the result equals moe_clip_grad_norm + moe_adamw_step
   bit for bit. */
MOEDEF moe_status moe_mask_step(moe_mask *k, moe_store *s, const moe_adamw_config *c, float lr,
                                long long step, float max_norm, float *norm);
/* The mask as bytes for a checkpoint's state blob: 24 bytes of header (magic, mode, numel,
   fingerprint) then one bit per parameter. unpack checks the header against k (made for the
   same layout) and changes nothing on a mismatch. */
MOEDEF size_t moe_mask_pack_bytes(const moe_mask *k);
MOEDEF moe_status moe_mask_pack(const moe_mask *k, void *buf, size_t bytes);
MOEDEF moe_status moe_mask_unpack(moe_mask *k, const void *buf, size_t bytes);

/* ============================================================================================
   >>moe:ckpt  checkpoints
   ============================================================================================
   One format for every model in moe.h and reward.h. Little-endian:
     "MOECKPT\0", u32 version, u32 flags (1 = Adam moments present), u64 layout fingerprint,
     u64 numel, i64 step, u64 config bytes, u64 state bytes,
     config blob, state blob (caller's: RNG, data position, ...), params, [adam_m, adam_v],
     u32 CRC-32 (zlib polynomial) of everything before it.
   Saving writes a temporary file beside <path> whose name no other writer holds (POSIX:
   "<path>.<pid>-<n>.tmp", created exclusively; elsewhere "<path>.tmp"), flushes and fsyncs it,
   renames it onto <path> and fsyncs the directory: an existing checkpoint is never left
   half-written, and two runs saving to one path each rename a whole file. Loading reads and
   verifies the whole file before it touches the store: on any error the store is unchanged.
   The parameters must be finite and below MOE_CKPT_MAX_ABS in magnitude, the moments finite
   (v >= 0): a CRC protects against damage, not against a run that diverged before it saved.

   I/O HOOKS (SQLite's VFS in miniature). A save does its file operations through a
   moe_ckpt_io: moe_ckpt_io_default() holds the real calls, moe_checkpoint_save_ex (and
   moe_model_save_ex) take another one per call; nothing global. A test fails the n-th write,
   sync or rename and checks that the previous checkpoint survives; a program may route
   checkpoints through its own storage layer. Each hook returns 0 (create: a handle) on success
   and -1 (create: NULL) with errno set on failure. A failed create, write, sync, close or rename
   leaves <path> as it was and removes the temporary file; a failed directory sync after the
   rename is not an error (the new file is already in place, and some file systems refuse to
   sync directories: SQLite ignores that failure too). */

#define MOE_CKPT_VERSION 1
/* A parameter's square must stay a float: above ~1.8e19 a norm overflows to inf and the next
   step turns it into NaN. Trained weights stay many orders of magnitude below this. */
#define MOE_CKPT_MAX_ABS 1e15f

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
typedef struct moe_ckpt_io {
    /* creates `path` for writing, failing with errno EEXIST when it exists (POSIX: O_EXCL) */
    void *(*create)(void *ctx, const char *path);
    int (*write)(void *ctx, void *file, const void *buf, size_t n); /* all n bytes, or -1  */
    int (*sync)(void *ctx, void *file);                             /* to stable storage    */
    int (*close)(void *ctx, void *file);                            /* once per create      */
    int (*rename)(void *ctx, const char *from, const char *to);     /* replaces `to`        */
    int (*remove)(void *ctx, const char *path);                     /* the temporary file   */
    int (*sync_dir)(void *ctx, const char *dir);                    /* after the rename     */
    void *ctx;                                                      /* every hook's first argument */
} moe_ckpt_io;

/* the real calls (POSIX: open(O_EXCL), write, fsync, close, rename, remove, fsync of the
   directory; elsewhere stdio, without the syncs), ctx NULL */
MOEDEF moe_ckpt_io moe_ckpt_io_default(void);
MOEDEF moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                      long long step, const void *config, size_t config_bytes,
                                      const void *state, size_t state_bytes, moe_err *err);
/* the same through io (NULL: moe_ckpt_io_default()); every hook must be set */
MOEDEF moe_status moe_checkpoint_save_ex(const char *path, const moe_store *s, int with_moments,
                                         long long step, const void *config, size_t config_bytes,
                                         const void *state, size_t state_bytes,
                                         const moe_ckpt_io *io, moe_err *err);
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
   >>moe:router  the router interface: config, routing statistics, the hooks, ONE dispatcher
   ============================================================================================
   A router turns the layer's input into routing data (DESIGN: "routing is data"): per token
   the chosen experts (topk) and their mixing weights (gates), and ONE assignment list
   (token, expert, slot, weight) that the experts consume (>>moe:dispatch). Every family
   implements the same few hooks, each family in its own section with forward and backward
   side by side:
     declare    its tensors in the store; its buffers, sized for max_tokens at init
     scores     logits (T, E) and probabilities (T, E)
     select     each token's choice: topk ids and dense gates
     assign     the raw assignment list and the picks each expert was asked for
     backward   gate gradients -> logit gradients (per token) -> router parameters and input
     aux        auxiliary losses and their gradients (balance and z-loss are shared by all)
   Three extensions compose with the families: GW-MoE broadcasts uncertain tokens after
   select (>>moe:router_gw); HyperMoE adds a hyper-expert to the output (>>moe:router_hyper);
   the router input (RMoE's GRU state, an MLP router) replaces what the linear router reads
   (>>moe:router_input). The dispatcher in this section's implementation is the only code that
   looks at cfg.router. A non-finite router logit is an error: moe_layer_forward returns
   MOE_ERR_NUMERIC with a sentence naming the token and expert, before any selection. */

typedef enum moe_router_kind {
    MOE_ROUTER_TOPK = 0,          /* softmax over E, keep the top k (Switch, DeepSeekMoE;
                                     renormalize = 1 gives Mixtral)                          */
    MOE_ROUTER_SIGMOID = 1,       /* independent sigmoid scores, top k (renormalize optional) */
    MOE_ROUTER_NOISY_TOPK = 2,    /* Shazeer 2017: H = z + noise * (softplus(x Wn) + eps),
                                     weights = softmax over the k kept H                      */
    MOE_ROUTER_EXPERT_CHOICE = 3, /* arXiv 2202.09368: expert e takes its ceil(k*T/E) best tokens.
                                     NOT CAUSAL: a token's routing depends on later tokens    */
    MOE_ROUTER_AOE = 4            /* Autonomy-of-Experts (arXiv 2501.13074): no router. Every
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

/* Which assignments capacity (capacity_factor > 0) admits first. */
typedef enum moe_capacity_order {
    MOE_CAPACITY_SLOT_MAJOR = 0, /* every token's first choice before any second choice, tokens
                                    in index order (GShard, arXiv 2006.16668; the default)  */
    MOE_CAPACITY_TOKEN_MAJOR = 1 /* token by token, each token's choices in slot order (a
                                    running count over the flattened (token, choice) list) */
} moe_capacity_order;

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
       call's gw_active flag is set (moe_layer_args), a token whose routing entropy
       u = -sum p ln(p + 1e-5) (the released code's form; divided by ln E when gw_normalized)
       is >= gw_threshold is sent to ALL experts with the full softmax weights. gw_slots > 0
       keeps only the first gw_slots uncertain tokens of each sequence (seq_len tokens each).
       Broadcast assignments are not subject to capacity. gw_released = 1 reproduces the
       released code instead: an uncertain token skips the experts and outputs p_{E-1} * x. */
    float gw_threshold;       /* 0 = off                                                 */
    int gw_normalized;
    int gw_slots;
    int gw_released;
    int aoe_rank;             /* AoE: rank r of the factorised gate (paper: about d/3)   */
    /* HyperMoE (arXiv 2402.12656): hyper = 1 adds a per-token hyper-expert whose weights a
       hypernetwork generates from the embeddings of the experts the token did NOT choose.
       Sizes (official code / tiny): expert embedding e 128/32, processor hidden 128/32,
       condition q 128/32, layer embedding 10/4, hypernetwork b 128/32, adapter a 64/16. */
    int hyper;
    int hyper_embed, hyper_hidden, hyper_cond, hyper_layer_dim, hyper_width, hyper_adapter;
    int hyper_layers;         /* rows of the shared layer embedding (a model: its layers) */
    int hyper_layer;          /* this layer's row                                       */
    int router_dim;           /* width of the router's input; 0 = d (the router reads x).
                                 Another width means the caller supplies router_input
                                 (moe_layer_args): RMoE's GRU state, an MLP router's hidden */
    /* Conventions of the field, as options; the defaults keep this library's own choices. */
    float ec_capacity_factor; /* expert choice: each expert takes ceil(cf T / E) tokens (the
                                 paper's capacity factor c); 0 = top_k, ceil(k T / E)      */
    moe_capacity_order capacity_order; /* which assignments capacity admits first         */
    int drop_passthrough;     /* a dropped assignment outputs weight * x, as HF's Switch
                                 Transformers do (the dropped token passes through its
                                 expert's place), instead of nothing                      */
    float routed_scale;       /* multiplies every routed assignment's weight (DeepSeek-V3's
                                 routed_scaling_factor, arXiv 2412.19437 §2.1.2); 1        */
    float shared_scale;       /* multiplies the shared experts' output; 1                 */
    int hyper_head_bias;      /* HyperMoE: the hypernetwork's output heads carry biases, as
                                 the official code's nn.Linear heads: the generated W_dn,
                                 b_dn, W_up, b_up each get a learned constant             */
    int selection_bias;       /* DeepSeek-V3's auxiliary-loss-free balancing (arXiv
                                 2412.19437 §2.1.2): the top-k choice ranks p + b, the
                                 weights stay p; b (E) = the tensor router.selection_bias,
                                 no gradient, moved by moe_layer_update_selection_bias
                                 (softmax and sigmoid top-k)                              */
    int cv_unbiased;          /* noisy top-k's CV^2 with the unbiased variance (divided by
                                 E - 1), as torch.var in the HyperMoE code; 0 = the
                                 population variance (divided by E), Shazeer's definition */
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
    /* each auxiliary term on its own, before its coefficient (computed whatever the
       coefficient, 0 included, so a run can watch a loss it does not train on) */
    float raw_balance;    /* E sum_i f_i P_i (DeepSeek: sum_i f_i P_i); 0 for MOE_BALANCE_NONE */
    float raw_z;          /* mean over tokens of logsumexp(z)^2                              */
    float raw_importance; /* noisy top-k: CV^2 of Importance (0 for other routers)           */
    float raw_load;       /* noisy top-k: CV^2 of Load (0 for other routers)                 */
} moe_routing_stats;

/* The per-expert pieces of the auxiliary losses every family shares (balance, z-loss), in
   the layer, sized at init. */
typedef struct moe_router_aux {
    float *picks;        /* (E) assignments the router asked of each expert, before capacity */
    float *balance_f;    /* (E) f_i of the balance loss (its form: moe_balance_loss)         */
    float *mean_prob;    /* (E) P_i: mean over tokens of the normalised probabilities        */
    float *token_probs;  /* (E) one token's normalised probabilities, while P is summed      */
    float *d_mean_prob;  /* (E) backward: dLoss/dP_i of the balance loss                     */
} moe_router_aux;

MOEDEF moe_layer_config moe_layer_config_default(void);
/* Checks a config; a sentence in err on failure. */
MOEDEF moe_status moe_layer_config_validate(const moe_layer_config *c, moe_err *err);

/* ============================================================================================
   >>moe:router_topk  token choice: the linear router, softmax and sigmoid top-k, capacity
   ============================================================================================
   The linear router (every family but AoE): logits z = r . Wr^T (+ b), r = the router input
   (x, or what the caller supplies: RMoE's GRU state, an MLP router's hidden layer).
   Softmax top-k: p = softmax(z); token t takes the k largest p (ties to the lower index) with
   the weights p (Switch, arXiv 2101.03961; DeepSeekMoE, arXiv 2401.06066) or, renormalize = 1,
   p / sum of the k = the softmax over the k chosen logits (Mixtral, arXiv 2401.04088).
   Sigmoid top-k: p = sigmoid(z), the same choice, weights p or p / sum of the k (>= 1e-20);
   its balance loss reads the normalised scores p / sum_j p_j.
   Capacity (capacity_factor > 0; GShard, arXiv 2006.16668): each expert keeps at most
   C = ceil(cf k T / E) assignments, admitted slot by slot (every token's first choice before
   any second choice), tokens in index order, or with MOE_CAPACITY_TOKEN_MAJOR token by token;
   a dropped assignment contributes nothing (the token keeps its residual; with
   drop_passthrough it contributes weight * x instead, as HF's Switch Transformers, whose
   dropped token keeps its input as its expert output) and the kept weights are not
   renormalised. */

/* ============================================================================================
   >>moe:router_noisy  Shazeer's noisy top-k gating and its CV^2 losses (arXiv 1701.06538 §2.1)
   ============================================================================================
   H = z + xi * (softplus(r . Wn^T) + noise_eps), xi ~ N(0, 1) drawn by the caller (training;
   none at evaluation: H = z); token t keeps the k largest H, weights = softmax over the k kept
   H. Auxiliary losses (§4, Appendix A): importance_coef * CV^2(Importance), Importance_i = sum over
   tokens of the gates; load_coef * CV^2(Load), Load_i = sum_t Phi((z_ti - thr_ti) / sd_ti),
   the smooth probability that expert i stays chosen under fresh noise, thr = the k-th largest
   H of the other experts (the (k+1)-th for a chosen one, the k-th otherwise). Without noise
   Load is the count of picks. CV^2 = var / (mean^2 + 1e-10), var the population variance
   (Shazeer), or with cv_unbiased the unbiased one (torch.var, the HyperMoE code's). */

typedef struct moe_router_noisy {
    int id_w_noise;        /* (E, router_dim) the noise projection Wn                       */
    int has_noise;         /* the last forward was given noise (training)                   */
    float *noise;          /* (T, E) the N(0,1) draws used (0 at evaluation)                */
    float *noise_logits;   /* (T, E) r . Wn^T                                                */
    float *H;              /* (T, E) the noisy logits                                        */
    int *threshold;        /* (T, E) the expert whose H each expert's load compares with    */
    float *d_noise_logits; /* (T, E) backward                                                */
    float *importance;     /* (E) sum over tokens of the gates                               */
    float *load;           /* (E) the smooth load (with noise), the pick counts (without)    */
    float *d_importance;   /* (E) backward: importance_coef * dCV^2 / dImportance            */
    float *d_load;         /* (E) backward: load_coef * dCV^2 / dLoad                        */
} moe_router_noisy;

/* ============================================================================================
   >>moe:router_ec  expert choice (Zhou et al. 2022, arXiv 2202.09368)
   ============================================================================================
   The experts choose: p = softmax(z) over the experts; expert e takes the C = ceil(c T / E)
   tokens (capacity factor c = ec_capacity_factor, or top_k when 0) with the largest p_te (ties to the lower token index), weight p_te. Every expert is
   full, a token may get any number of experts (none, too). NOT CAUSAL: a token's experts
   depend on the other tokens of the batch, so a model with it cannot generate. The forward
   is the linear router's; the backward is the full softmax's (>>moe:router_topk). */

typedef struct moe_scored_token {
    float score;
    int index;
} moe_scored_token;

typedef struct moe_router_ec {
    moe_scored_token *ranked; /* (T) one expert's tokens, ranked by probability        */
    int *chosen;              /* (T) the C tokens it keeps, back in token order        */
} moe_router_ec;

/* ============================================================================================
   >>moe:router_aoe  Autonomy-of-Experts: router-free, experts choose by their own activation
                     norms (Lv et al. 2025, arXiv 2501.13074)
   ============================================================================================
   Every expert factorises its gate, W_gate_e = W_out_e . W_in_e (rank r = aoe_rank), and
   computes its low-rank cache C_e = x . W_in_e^T (T, r) for every token; the logits are the
   norms ||C_e||, the choice is softmax top-k over them (renormalize = 1: the
   softmax over the k chosen norms, the paper's; 0: the softmax over all norms read at the
   chosen, the official code's). The chosen experts reuse their cache for the gate:
   h_gate = C_e . W_out_e^T, then SwiGLU as usual. Tensors experts.w_gate_in (E, r, d)
   and experts.w_gate_out (E, D, r) replace the router and the experts' w_gate. */

typedef struct moe_router_aoe {
    int id_w_in;           /* (E, r, d) W_in of every expert                                 */
    int id_w_out;          /* (E, D, r) W_out                                                */
    float *cache;          /* (T, E r) C_e = x . W_in_e^T of every expert                    */
    float *d_cache;        /* (T, E r) backward                                              */
    float *cache_chosen;   /* (cap, r) the chosen experts' caches, in the assignment order   */
    float *d_cache_chosen; /* (cap, r) backward                                              */
} moe_router_aoe;

/* AoE's parameter matching (paper Eq. 5): the expert width D' that gives a rank-r AoE layer the
   parameters of a SwiGLU MoE layer of width D: (3 d D - r d) / (r + 2 d), rounded up. */
MOEDEF int moe_aoe_matched_width(int d, int D, int r);

/* ============================================================================================
   >>moe:router_gw  GW-MoE: uncertain tokens broadcast to every expert while fine-tuning
                    (Wu et al. 2024, "GW-MoE: Resolving Uncertainty in MoE Router with Global
                    Workspace Theory", arXiv 2406.12375)
   ============================================================================================
   An extension of softmax top-k. While the call's gw_active flag is set (moe_layer_args;
   fine-tuning), a token whose routing entropy u = -sum_i p_i ln(p_i + 1e-5) (the released
   code's form; divided by ln E when gw_normalized) is >= gw_threshold is uncertain: it goes to
   ALL experts with the full softmax as weights, outside capacity and outside the drop
   accounting. gw_slots > 0 keeps only the first gw_slots uncertain tokens of each sequence
   (seq_len tokens each). gw_released = 1 reproduces the released code instead: an uncertain
   token skips the experts and outputs p_{E-1} * x (its "bypass"). Off (evaluation and
   inference), the layer is its plain top-k. */

typedef struct moe_router_gw {
    int *uncertain;   /* (T) 1 when the token was broadcast to every expert                   */
    float *bypass;    /* (T) released-code emulation: y += bypass * x, bypass = p_{E-1}       */
    float *d_bypass;  /* (T) backward: dLoss/d bypass, a gradient of the gate p_{E-1}         */
} moe_router_gw;

/* ============================================================================================
   >>moe:router_hyper  HyperMoE: a hyper-expert generated from the experts a token did NOT
                       choose (Zhao et al. 2024, arXiv 2402.12656)
   ============================================================================================
   An extension of any family (it reads the gates). For token t:
     sig_t = sum of the expert embeddings Q_j of the experts t did not choose;
     c_t = proc(sig_t) (Linear-ReLU-Linear); z_t = [c_t ; layer_emb[l]]; hb_t = ReLU(net(z_t));
     u_t[j] = sum_k (M_t[j][k] + head_down_b[j][k]) hb_t[k]   with M = x . head_down^T, (T, a b);
     act = ReLU(u);  out_t = ([act_t ; 1] (x) hb_t) . head_up^T   (the "1" row is the up bias head);
     y_t += out_t.
   hyper_head_bias (the official code's heads are nn.Linear with biases): each generated
   matrix and vector also gets a learned constant, W_dn += head_down.bias (a, d), b_dn +=
   head_down_b.bias (a), [W_up | b_up] += head_up.bias (d, a + 1):
     u_t += x_t . head_down.bias^T + head_down_b.bias;  out_t += [act_t ; 1] . head_up.bias^T.
   The generated adapter weights W_dn(t) = sum_k hb_k head_down[:, k] are never materialised:
   both products are single GEMMs over all tokens. net and the heads are shared by every layer
   (found by name in the store), the embeddings and the processor are per layer. The selection
   is discrete: no gradient reaches the router through the hyper-expert. */

/* indices into moe_router_hyper.id */
enum {
    MOE_HYPER_EXPERT_EMB = 0, MOE_HYPER_PROC1_W, MOE_HYPER_PROC1_B, MOE_HYPER_PROC2_W, MOE_HYPER_PROC2_B, /* this layer */
    MOE_HYPER_LAYER_EMB, MOE_HYPER_NET_W, MOE_HYPER_NET_B, MOE_HYPER_HEAD_DOWN, MOE_HYPER_HEAD_DOWN_B,   /* shared */
    MOE_HYPER_HEAD_UP, MOE_HYPER_HEAD_DOWN_BIAS, MOE_HYPER_HEAD_DOWN_B_BIAS, MOE_HYPER_HEAD_UP_BIAS, /* shared, */
    MOE_HYPER_TENSORS                                                                                 /* with hyper_head_bias */
};

typedef struct moe_router_hyper {
    int id[MOE_HYPER_TENSORS]; /* tensor ids, in the order of the enum above                   */
    /* forward caches (T rows each) */
    float *sig;       /* (T, e) the unchosen experts' embeddings, summed                      */
    float *h1;        /* (T, h) ReLU(proc1(sig))                                               */
    float *cond;      /* (T, q) c = proc2(h1)                                                   */
    float *z;         /* (T, q + lam) [c ; layer embedding]                                    */
    float *hb;        /* (T, b) ReLU(net(z))                                                    */
    float *m;         /* (T, a b) x . head_down^T                                               */
    float *u;         /* (T, a) the adapter's pre-activation                                    */
    float *o;         /* (T, (a + 1) b) [ReLU(u) ; 1] (x) hb                                     */
    float *out;       /* (T, d) the hyper-expert's output                                        */
    float *emb_sum;   /* (e) the sum of all expert embeddings                                    */
    float *act1;      /* (T, a + 1) hyper_head_bias: [ReLU(u) ; 1]                               */
    float *bias_out;  /* (T, d) hyper_head_bias: [ReLU(u) ; 1] . head_up.bias^T                  */
    /* backward (T rows each) */
    float *d_o, *d_m, *d_hb, *d_z, *d_cond, *d_h1, *d_sig;
    float *d_act1;    /* (T, a + 1) hyper_head_bias: d [ReLU(u) ; 1] from head_up.bias          */
    float *d_u;       /* (T, a) hyper_head_bias: d u                                             */
} moe_router_hyper;

/* ============================================================================================
   >>moe:layer  the MoE layer: router, routed experts, shared experts
   ============================================================================================
   y = sum over the token's assignments of weight * expert(x)  (+ the shared experts, weight
     shared_scale, 1 by default)
     (+ what a router extension adds: GW-MoE's bypass, HyperMoE's hyper-expert).
   Forward: the router fills the assignment list (>>moe:router); the experts run on the
   gathered tokens (>>moe:experts); combine scatters back in a fixed order (>>moe:dispatch).
   Backward in reverse, ending with the router's backward from the gradients of the
   assignment weights. moe_layer_init allocates every buffer for up to max_tokens tokens:
   forward and backward allocate nothing. */

/* Per-call inputs of moe_layer_forward and moe_layer_backward. NULL means
   moe_layer_args_default(): no noise, the router reads x, the T tokens are one sequence, no
   GW broadcast, aux gradient scale 1. Give backward the args of the forward before it. */
typedef struct moe_layer_args {
    const float *noise;        /* forward: (T, E) N(0,1) draws for the noisy top-k router
                                  (training); NULL = evaluation (H = z)                        */
    const float *router_input; /* (T, router_dim) what the router reads when it is not x: RMoE's
                                  GRU state, an MLP router's hidden layer (required when
                                  router_dim != d); NULL = x. Backward checks it is the
                                  forward's pointer                                            */
    float *d_router_input;     /* backward: (T, router_dim) += the router input's gradient
                                  (required with router_input; dx receives none of it)         */
    int seq_len;               /* forward: tokens per sequence (GW-MoE's gw_slots count per
                                  sequence); 0 = the T tokens are one sequence                 */
    int gw_active;             /* forward: GW-MoE broadcast on (fine-tuning); 0 = sparse top-k */
    int dropless;              /* forward: capacity (capacity_factor) admits every choice on this
                                  call. Generation sets it: with a capacity, a token's experts
                                  would depend on the other sequences of the batch             */
    float aux_grad_scale;      /* backward: multiplies the aux losses' gradients; 1 in the
                                  defaults (1/n for n micro-batches whose dy carries 1/n);
                                  a zeroed struct has 0: no aux gradient                        */
    const float *balance_f;    /* backward: (E) the f_i the balance loss's gradient uses instead
                                  of this layer's own: one loss over several layers' tokens
                                  gives each layer mean_l f_l / L (moe_model_config's
                                  balance_all_layers); NULL = the layer's own loss             */
} moe_layer_args;

/* Who runs the routed bank's experts. NULL (the default) = this process, on every expert.
   Set, forward takes the gathered rows L->xg grouped by expert (L->routed.offset) and fills
   L->eout; backward takes L->deout, fills L->dxg and accumulates the experts' weight
   gradients. Expert parallelism (>>moe:mpi) runs them on the ranks that own the experts. */
struct moe_layer;
typedef struct moe_experts_runner {
    moe_status (*forward)(struct moe_layer *L, const moe_store *s, void *user);
    moe_status (*backward)(struct moe_layer *L, moe_store *s, void *user);
    void *user;
} moe_experts_runner;

typedef struct moe_layer {
    moe_layer_config cfg;
    int max_tokens;
    int cap;                /* rows of the routed assignment list: T K + E, T E with GW        */
    /* ---- the router (>>moe:router): its decisions in the last forward, T = its tokens ---- */
    int id_router_w;        /* (E, router_dim) the linear router, -1 for AoE                   */
    int id_router_b;        /* (E) its bias, -1 when absent                                    */
    int id_selection_bias;  /* (E) DeepSeek-V3's selection-only bias, -1 when absent           */
    float *logits;          /* (T, E) router logits r . Wr^T + b (AoE: the norms ||C_e||)      */
    float *probs;           /* (T, E) softmax (sigmoid) of logits                              */
    float *lse;             /* (T) logsumexp of logits (z-loss)                                */
    int *topk;              /* (T, K) chosen experts, descending score; -1 for expert choice   */
    float *gates;           /* (T, E) mixing weight of each (token, expert), 0 when not chosen
                               (the assignments' weights are these times routed_scale)       */
    float *selection_scores;/* (T, E) with selection_bias: what top-k ranked, probs + b       */
    float *d_gates;         /* (T, E) backward: dLoss/dgates                                   */
    float *d_logits;        /* (T, E) backward: dLoss/dlogits                                  */
    moe_router_aux aux;     /* (E) each: the pieces of the balance loss                        */
    moe_router_noisy noisy; /* noisy top-k: noise logits, H, load thresholds, CV^2 pieces      */
    moe_router_ec ec;       /* expert choice: its ranking buffers                              */
    moe_router_aoe aoe;     /* AoE: the gate factors and the low-rank caches                   */
    moe_router_gw gw;       /* GW-MoE: the uncertain tokens (all 0 while broadcast is off)     */
    moe_router_hyper hyper; /* HyperMoE: the hypernetwork's tensors and caches                 */
    /* ---- the experts ---- */
    int id_gate, id_up, id_down, id_b_up, id_b_down;           /* routed bank, -1 when absent */
    int id_s_gate, id_s_up, id_s_down, id_s_b_up, id_s_b_down; /* shared bank                 */
    moe_assign routed;      /* assignment list of the routed bank                              */
    moe_assign shared;      /* assignment list of the shared bank (every token, shared_scale)  */
    float *xg, *hg, *hu, *eout;         /* routed bank caches: (cap,d) (cap,D) (cap,D) (cap,d)  */
    float *s_xg, *s_hg, *s_hu, *s_eout; /* shared bank caches, (S*T, ...)                      */
    /* the raw list a router (or the shared bank) fills before dispatch; rows = max(cap, S T) */
    int *raw_token, *raw_expert, *raw_slot;
    float *raw_weight;
    int *admitted;          /* (T, K) capacity: 1 when the token's s-th choice got a place     */
    int *capacity_count;    /* (E) capacity: places taken per expert                           */
    float *passthrough;     /* (T) drop_passthrough: y += passthrough * x, the dropped weights */
    float *d_passthrough;   /* (T) backward: dLoss/d passthrough                               */
    /* backward scratch; rows = max(cap, S T) */
    float *d_weight;        /* (cap) dLoss/d(assignment weight), from combine's backward       */
    float *dxg, *deout;     /* (rows, d) gradients of the gathered inputs and expert outputs   */
    float *experts_dh_gate; /* (rows, max(D, Ds)) the experts' first backward scratch; it ends
                               holding d h_gate, which AoE's gate backward reads               */
    float *experts_scratch; /* (rows, max(D, Ds)) the experts' second backward scratch         */
    int T;                  /* tokens of the last forward, 0 = none                            */
    const float *fwd_router_input; /* the router input of the last forward                     */
    moe_work work;          /* scratch of the layer's matmuls and experts, sized at init; a
                               model's layers share the model's (>>moe:model)                 */
    moe_routing_stats stats;
    float *stat_load, *stat_prob; /* (E) backing for stats                                     */
    const moe_experts_runner *runner; /* NULL = the experts run here (see moe_experts_runner) */
    moe_err err;
} moe_layer;

/* Validates cfg, declares the layer's tensors in s under `prefix` (s must not be allocated
   yet) and allocates every buffer for up to max_tokens tokens. On failure (a sentence in
   L->err; out of memory is MOE_ERR_NOMEM) nothing stays allocated and moe_layer_free is safe. */
MOEDEF moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                 const char *prefix, int max_tokens);
MOEDEF void moe_layer_free(moe_layer *L);
/* Router N(0, router_init_std); expert matrices U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear;
   biases 0. */
MOEDEF void moe_layer_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
/* Pointers to the layer's weights in the params (grads = 0) or grads (grads = 1) buffer. */
MOEDEF moe_expert_weights moe_layer_experts(const moe_layer *L, const moe_store *s, int shared, int grads);
MOEDEF moe_layer_args moe_layer_args_default(void);
/* DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437 §2.1.2), for a layer with
   selection_bias: after a step, b_i += gamma * sign(mean_j c_j - c_i), c_i = the tokens that
   chose expert i in the last forward: an overloaded expert's bias goes down by gamma, an
   underloaded one's up (the paper: gamma 0.001 for most of training). */
MOEDEF moe_status moe_layer_update_selection_bias(moe_layer *L, moe_store *s, float gamma);
/* y (T, d) = MoE(x (T, d)); args may be NULL (see moe_layer_args). Fills L->stats.
   Capacity: assignments are admitted slot by slot (every token's first choice before any
   second choice), tokens in index order (token by token with capacity_order); a dropped
   assignment contributes nothing (the token keeps its residual), weights are not
   renormalised afterwards. A non-finite router logit returns MOE_ERR_NUMERIC naming the
   token and expert, and leaves no forward to differentiate. */
MOEDEF moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                    int T, const moe_layer_args *args);
/* dx (T, d) += dLoss/dx; parameter gradients += into s->grads. The auxiliary losses of the
   last forward (L->stats.aux_total, times args->aux_grad_scale) are part of the
   differentiated objective. x and args must be the forward's. */
MOEDEF moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                     const float *x, const moe_layer_args *args);

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
   >>moe:router_input  what the routers of a model read: x, RMoE's recurrent GRU state, or an
                       MLP router's hidden layer (Qiu et al., ICLR 2025, arXiv 2408.06793)
   ============================================================================================
   In MoE block l the router reads r_l instead of the block's normalised hidden state x_l:
     RMoE:      x'_l = x_l . P_l^T (a projector per layer, width p = router_dim, Eq. 4);
                h_l = GRU(x'_l, h_{l-1}) with ONE GRU shared by all MoE layers, h_0 = 0 (Eq. 5);
                r_l = h_l (Eq. 6). The state passes through dense blocks unchanged and carries
                full gradients back through depth.
     ablations: "NP" h_l = GRU(x'_l, 0); "detach" h_{l-1} enters without a gradient back.
     MLP:       r_l = GELU(x'_l), no recurrence (the paper's SMoE-MLP baseline).
   The layer sees r_l as moe_layer_args.router_input and returns its gradient in
   d_router_input (>>moe:layer); this section runs the GRU or the MLP around it. */

typedef enum moe_router_input {
    MOE_RIN_DIRECT = 0,     /* the layer's normalised hidden state x (a linear router)        */
    MOE_RIN_GRU = 1,        /* RMoE: h_l = GRU(x_l P_l, h_{l-1}), one GRU shared by all MoE
                               layers, state carried through depth with full gradients       */
    MOE_RIN_GRU_NP = 2,     /* ablation "no previous state": h_l = GRU(x_l P_l, 0)            */
    MOE_RIN_GRU_DETACH = 3, /* ablation: h_{l-1} enters layer l without a gradient back      */
    MOE_RIN_MLP = 4         /* baseline SMoE-MLP: router on GELU(x_l P_l), no recurrence      */
} moe_router_input;

/* ============================================================================================
   >>moe:model  a tiny decoder-only MoE transformer over bytes
   ============================================================================================
   x = wte[token] (+ wpe[pos]);  for each layer:  x += Attn(RMSNorm(x));  x += FFN(RMSNorm(x))
   where FFN is a dense SwiGLU (a bank of one expert that every token visits) or an MoE layer;
   logits = RMSNorm(x) . wte^T (tied head). Loss: mean cross-entropy + every MoE layer's aux.
   Layer l is MoE when moe_every > 0, l >= dense_first and (l - dense_first) % moe_every == 0.
   Parameters: one moe_store; tensor names "wte", "wpe", "l3.attn.wqkv", "l3.moe.experts.w_up",
   "lnf.w", ... Per-layer tensors (not stacked on L) because layers differ in kind.
   CQIL (moe_model_set_groups): the layer loop reads a per-model group table and runs each
   group's layers concurrently on one common input, summing their residual updates. */

typedef enum moe_pos_kind {
    MOE_POS_LEARNED = 0, /* wpe (max_seq, d) added to the embeddings */
    MOE_POS_ROPE = 1     /* rotary q/k, no position parameters        */
} moe_pos_kind;

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
    moe_router_input router_input; /* what the routers read (>>moe:router_input)      */
    int router_dim;         /* p: GRU / MLP width of the router input (RMoE: 128)     */
    float init_std;         /* 0.02; residual outputs get init_std / sqrt(2 L)        */
    int balance_all_layers; /* 1: the MoE layers' balance loss is ONE loss over all their
                               tokens at once, f and P averaged over the layers (RMoE's
                               official code: HF's load_balancing_loss_func over the
                               concatenated router logits); 0: the sum of per-layer losses */
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

/* The buffers one member of a CQIL group runs on, so that members run concurrently. */
typedef struct moe_group_lane {
    float *att;              /* (N, d) the member's attention output a_q                      */
    float *da;               /* (N, d) backward: dL/da_q                                       */
    float *g;                /* (N, d) backward: dL/dr_q through the member's FFN               */
    float *d_ln, *d_atty;    /* (N, d)                                                          */
    float *d_qkv;            /* (N, 3d)                                                         */
    float *scratch1, *scratch2; /* (N, d_ff) dense FFN backward                                 */
    moe_work work;           /* the member's kernel scratch, planned for one thread            */
    moe_err err;             /* a failing member's sentence                                     */
} moe_group_lane;

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
    float *routing_noise;   /* (N, E) noisy top-k routers: this forward's N(0,1) draws     */
    int gw_broadcast;       /* GW-MoE broadcast on in every MoE layer (set_broadcast)  */
    float *gen_probs;       /* (2 V) generation: probabilities and their sorted copy    */
    moe_work work;          /* scratch of every kernel call of the model, its MoE layers'
                               included (calls never overlap), sized at init            */
    double loss;            /* mean cross-entropy of the last forward (nats)          */
    double aux_loss;        /* sum of the MoE layers' aux losses (balance_all_layers:
                               their balance terms replaced by the one over all layers) */
    float *balance_f_all;   /* (E) balance_all_layers: mean over layers of f / L_moe, the
                               f every layer's backward differentiates with          */
    /* Interventions for evaluation: moe_model_forward calls ffn_hook(m, l, ffn_hook_user)
       once block l's FFN output is in blocks[l].ffn and before it joins the residual stream
       (swap a token's expert, ablate a layer). Backward does not see what it changes.
       NULL (the default after moe_model_init) = none. */
    void (*ffn_hook)(struct moe_model *m, int layer, void *user);
    void *ffn_hook_user;
    /* CQIL groups (moe_model_set_groups): group_size[l] = P > 0 when layers l..l+P-1 run as one
       group on a common input, 0 inside a group and for sequential layers; NULL = none */
    int *group_size;        /* (n_layers)                                                  */
    int group_bypass;       /* d: each member's MLP also reads up to d earlier attention outputs */
    int group_double_count; /* the official training code's bypass (see moe_model_set_groups) */
    int n_lanes;            /* the largest group: one lane of buffers per member            */
    moe_group_lane *lanes;   /* (n_lanes)                                             */
    /* (n_layers) the multiplier of each block's two residual updates, x += s_l Attn(..) and
       x += s_l FFN(..), forward and backward; 1 after init. Masked growth (G_random, arXiv
       2405.15319 §2) ramps a new layer's s_l from 0 to 1 (moe_grow_set_mask). Decoding honours it;
       a CQIL group's members must keep 1 (the forward refuses otherwise). */
    float *layer_scale;
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
/* The parameter table alone: declares every tensor c implies into m->S (names, shapes,
   m->S.numel, moe_store_fingerprint) and allocates no buffer, so a file loader can compare a
   config with a file before reserving memory. Stops with MOE_ERR_INVALID_ARG once more than
   max_numel parameters are declared (0 = no limit). Only moe_model_free may follow. */
MOEDEF moe_status moe_model_declare(moe_model *m, const moe_model_config *c, size_t max_numel);
MOEDEF void moe_model_free(moe_model *m);
/* The parameter count of a model of this config (a checkpoint's numel), through
   moe_model_declare: a loader compares it with the file before it builds the model. */
MOEDEF moe_status moe_model_param_count(const moe_model_config *c, size_t *numel, moe_err *err);
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
/* DeepSeek-V3's auxiliary-loss-free balancing: moe_layer_update_selection_bias on every MoE
   layer (their config needs selection_bias), from the last forward's loads. */
MOEDEF moe_status moe_model_update_selection_bias(moe_model *m, float gamma);
/* total parameters, and those one token uses (routers + its k experts + everything dense) */
MOEDEF size_t moe_model_params_total(const moe_model *m);
MOEDEF size_t moe_model_params_active(const moe_model *m);
/* Appends n_new sampled bytes to prompt (n_prompt >= 1); out must hold n_prompt + n_new.
   Uses the last max_T tokens as context. Refused for expert-choice routers (not causal). */
MOEDEF moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                     const moe_sampler *sampler, moe_rng *rng);
/* Gradients of a loss of the last forward's logits whose gradient the caller gives, plus
   aux_loss * scale, ACCUMULATED into m->S.grads; d_logits (B T, V) already holds any scale (a
   distillation loss: softmax(student) - softmax(teacher), divided by the tokens). The forward
   may be without targets. */
MOEDEF moe_status moe_model_backward_logits(moe_model *m, const float *d_logits, float scale);
/* CQIL (Zou et al., arXiv 2404.06709, §3): n_groups groups of consecutive layers
   [first[i], first[i] + size[i]), in increasing order and disjoint, each run on ONE common
   input h with their residual updates summed; the other layers stay sequential. Member q of a
   group (q = 0..P-1, layer j_q) computes a_q = Attn_q(RMSNorm(h)) and, with bypass distance d,
   its FFN reads r_q = h + a_q + beta_q, beta_q = sum of a_u for max(0, q - d) <= u < q:
     clean (double_count 0, the default):  h_out = h + sum_q (a_q + FFN_q(r_q))
     official training code (double_count 1): h_out = h + sum_q (a_q + beta_q + FFN_q(r_q)),
       the bypass added in place to the saved residual, so an earlier member's attention
       output is counted again in every later member it reaches.
   d = 0: every member reads h alone (the multi-GPU inference code; it never uses its bypass).
   A group of size 1 computes what the sequential layer does. The members run concurrently
   (OpenMP over members, each on one thread and its own lane of buffers, allocated here) and
   are summed in member order, so results do not depend on the thread count. Forward and
   backward both follow the groups (fine-tuning in CQIL form). n_groups = 0 restores the
   sequential model. Refused: ranges outside the model, overlapping or unordered groups, a
   negative d, MoE members whose routers read a GRU state or an MLP (RMoE carries a state
   from layer to layer), HyperMoE members (one hypernetwork shared by the layers, whose
   gradients concurrent members would race on), and (at forward) routing noise for grouped
   MoE layers. The groups are a run-time option: model files do not record them. */
MOEDEF moe_status moe_model_set_groups(moe_model *m, const int *first, const int *size, int n_groups, int bypass,
                                       int double_count);
/* Sequential steps of a forward with the current groups: n_layers minus (P - 1) for every
   group (the latency proxy when the members of a group run in parallel). */
MOEDEF int moe_model_depth(const moe_model *m);

/* ============================================================================================
   >>moe:select  named selections of the model's linear matrices
   ============================================================================================
   Which weights a mask, LoRA or MIGU acts on, by role instead of by name. An FFN is a
   key-value memory (Geva et al., arXiv 2012.14913 §2): its first layer's rows are keys matched
   against the input, its second layer's rows values written to the residual stream. So
     keys   = SwiGLU gate and up (A, B), or the first matrix of a two-matrix FFN;
     values = down (O), the second matrix;
   for the dense FFNs and for every expert bank (routed and shared) of the MoE layers alike.
   Parameter-matched pairs (keys vs values, arXiv 2402.12233): MOE_SEL_UP alone and
   MOE_SEL_DOWN alone have the same size (D d each per expert); MOE_SEL_KEYS of a SwiGLU FFN
   is twice MOE_SEL_VALUES. Routers, AoE's factorised gate, embeddings and norms are never
   selected. The attention projections: the fused q/k/v matrix and the output matrix. */

enum {
    MOE_SEL_GATE = 1,   /* SwiGLU gate (dense FFN and expert banks)        */
    MOE_SEL_UP = 2,     /* SwiGLU up, or a two-matrix FFN's first matrix   */
    MOE_SEL_DOWN = 4,   /* the FFN's output matrix                         */
    MOE_SEL_QKV = 8,    /* attention's fused q, k, v projection            */
    MOE_SEL_ATTN_O = 16,/* attention's output projection                   */
    MOE_SEL_KEYS = MOE_SEL_GATE | MOE_SEL_UP,
    MOE_SEL_VALUES = MOE_SEL_DOWN,
    MOE_SEL_FFN = MOE_SEL_KEYS | MOE_SEL_VALUES,
    MOE_SEL_ATTN = MOE_SEL_QKV | MOE_SEL_ATTN_O,
    MOE_SEL_LINEAR = MOE_SEL_FFN | MOE_SEL_ATTN /* every linear layer MIGU watches */
};

/* The ids of the tensors `parts` selects, in table order, into ids (at most max_ids written;
   ids may be NULL to count). Returns how many the selection has. */
MOEDEF int moe_model_select(const moe_model *m, int parts, int *ids, int max_ids);
/* The parameters of a selection (a parameter-matched pair has equal counts). */
MOEDEF size_t moe_model_select_numel(const moe_model *m, int parts);
/* k keeps exactly the selected tensors of m (everything else masked): train keys only,
   values only, attention only. parts without any tensor in m: MOE_ERR_INVALID_ARG, k unchanged. */
MOEDEF moe_status moe_mask_select(moe_mask *k, const moe_model *m, int parts);

/* ============================================================================================
   >>moe:lora  low-rank adapters on any linear matrix of a store
   ============================================================================================
   LoRA (Hu et al., arXiv 2106.09685 §4.1): W = W0 + (alpha / r) B A, with A (r, in) and
   B (out, r) per adapted matrix; for an expert bank (E, out, in) one pair per expert. A
   starts U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform(a = sqrt 5)), B at zero, so an
   attached adapter changes nothing until trained.
   The adapters are applied in weight space: while merged, the model's tensor holds
   W0 + s B A (the base W0 is kept aside), so every forward and backward of the model works
   unchanged on any matrix it has, dense, per expert or attention. The model's backward
   leaves dL/dW in the store's gradients, and since W depends on A and B only through s B A,
     dL/dA = s B^T dL/dW,  dL/dB = s dL/dW A^T
   exactly (moe_lora_backward). The adapters live in their own store (names
   "<matrix>.lora_a", "<matrix>.lora_b"), so the optimizer, masks (MIGU on adapters) and
   checkpoints work on them as on any store; moe_lora_step updates the adapters only and
   re-merges. Adapter dropout (the paper's optional regulariser on the adapter's input) has
   no weight-space form and is not offered.
   Cost: one (out x in x r) product per adapted matrix per merge and per backward; the
   model's own dW is computed anyway. */

typedef struct moe_lora_config {
    int rank;    /* r >= 1, at most min(out, in) of every adapted matrix */
    float alpha; /* scale s = alpha / r (peft's lora_alpha)             */
} moe_lora_config;

typedef struct moe_lora {
    moe_store S;          /* the adapters: params, grads, AdamW moments                  */
    int n;                /* adapted matrices                                             */
    int *target;          /* (n) their ids in the model's store                            */
    int *id_a, *id_b;     /* (n) their adapters' ids in S                                  */
    float *base;          /* W0 of every target, concatenated in target order             */
    size_t *base_off;     /* (n)                                                           */
    float scale;          /* alpha / rank                                                  */
    moe_lora_config cfg;
    uint64_t base_fingerprint; /* layout of the store the adapters were made for           */
    int merged;           /* 1: the targets hold W0 + s B A, 0: they hold W0                */
    moe_err err;
} moe_lora;

/* Adapters on the tensors ids[0..n) of base (each (out, in) or (E, out, in), no repeats;
   typically moe_model_select's). Snapshots W0 and merges (a no-op while B = 0). On failure
   nothing is attached, base is untouched and the sentence is in L->err. */
MOEDEF moe_status moe_lora_attach(moe_lora *L, moe_store *base, const int *ids, int n,
                                  const moe_lora_config *c, uint64_t seed);
/* Puts W0 back into the targets (unless unmerged) and frees the adapters. */
MOEDEF void moe_lora_detach(moe_lora *L, moe_store *base);
/* Targets := W0 + s B A (merge) or W0 (unmerge: the model runs without its adapters). */
MOEDEF moe_status moe_lora_merge(moe_lora *L, moe_store *base);
MOEDEF moe_status moe_lora_unmerge(moe_lora *L, moe_store *base);
/* Makes the merged weights the new W0 and the adapters start again (A redrawn from seed,
   B = 0): PEFT's merge_and_unload followed by a fresh adapter. */
MOEDEF moe_status moe_lora_fold(moe_lora *L, moe_store *base, uint64_t seed);
/* Adapter gradients from the model's weight gradients (accumulated into L->S.grads). The
   model's forward must have run merged. */
MOEDEF moe_status moe_lora_backward(moe_lora *L, const moe_store *base);
/* One step of the adapters alone: optional mask on the adapter store (NULL = none) and
   clipping, AdamW, re-merge. The model's own parameters change only through the merge. */
MOEDEF moe_status moe_lora_step(moe_lora *L, moe_store *base, moe_mask *mask,
                                const moe_adamw_config *c, float lr, long long step, float max_norm);
#ifndef MOE_NO_STDIO
/* The adapters (with their moments and the step) in a checkpoint file beside the model's;
   its config blob records rank, alpha and the base layout. Loading checks the file was made
   for this base layout and these targets; on any error L and base are unchanged. */
MOEDEF moe_status moe_lora_save(const char *path, const moe_lora *L, long long step, moe_err *err);
MOEDEF moe_status moe_lora_load(const char *path, moe_lora *L, moe_store *base, long long *step, moe_err *err);
#endif

/* ============================================================================================
   >>moe:migu  MIGU: update only the output units with large magnitudes
   ============================================================================================
   MIGU (Du et al., arXiv 2406.17245 §3): per linear layer y = x W^T, the magnitude of each
   output unit j over the tokens of one optimisation step decides whether row j of W may be
   updated in that step; the top (1 - T) of the units are, the rest are masked. The statistic:
     MOE_MIGU_L1   a_j = sum_tokens |y_j| / ||y||_1   the paper's per-token L1-normalised form,
                                                       summed instead of averaged
                                                       (the quantile does not care);
     MOE_MIGU_SUM  a_j = sum_tokens |y_j|             the official code's raw sum.
   Units kept: a_j >= the T-quantile of the layer's a (torch.quantile's linear interpolation:
   ties keep more, as the code); with distinct values that is n - ceil(T (n - 1)) units. The
   random control (the code's random_update) keeps n - floor(T n) units drawn uniformly.
   A "linear layer" is one matrix of the model: the q, k and v thirds of the fused attention
   projection separately (they are three nn.Linear in the paper's T5), the attention output,
   the dense FFN's gate, up and down, and every expert's gate, up and down separately (an
   expert sees only its tokens). moe_migu_accumulate reads the outputs the forward left in the
   model's caches after each micro-batch; moe_migu_mask turns the step's statistics into a
   moe_mask (either mode of >>moe:mask) and resets them: statistics never span steps. Whether
   a task is masked at all (the paper trains the first task normally) is the caller's loop.
   Under rotary positions q and k are read after the rotation (the model caches them so); a
   rotation mixes unit pairs, so their magnitudes differ slightly from x W_q^T's. */

typedef enum moe_migu_stat {
    MOE_MIGU_L1 = 0, /* per-token L1-normalised magnitudes (the paper) */
    MOE_MIGU_SUM = 1 /* raw sum of magnitudes (the official code)      */
} moe_migu_stat;

typedef struct moe_migu_config {
    float threshold;    /* T in [0, 1): the fraction of units masked per layer; 0.7     */
    moe_migu_stat stat;
    int random;         /* 1: the random control, same ratio, statistics ignored        */
    int parts;          /* MOE_SEL_* of the matrices watched; MOE_SEL_LINEAR (all)      */
    uint64_t seed;      /* the random control's                                          */
} moe_migu_config;

typedef struct moe_migu {
    moe_migu_config cfg;
    int n_tensors;        /* watched matrices                                             */
    long long *off;       /* (S.count) start of a tensor's units in stat, -1 = not watched */
    int *group;           /* (S.count) units per linear layer of the tensor               */
    double *stat;         /* (units) this step's statistic, a row of the tensor per unit   */
    unsigned char *keep;  /* (units) the last mask                                         */
    double *sorted;       /* (largest group) quantile scratch                              */
    size_t units;
    int micro_batches;    /* accumulated since the last mask                               */
    uint64_t fingerprint; /* the model's layout                                            */
    moe_rng rng;
    moe_err err;
} moe_migu;

MOEDEF moe_migu_config moe_migu_config_default(void);
/* The model must be initialised. T outside [0, 1), an unknown statistic or a selection
   naming no matrix: MOE_ERR_INVALID_ARG and nothing allocated. */
MOEDEF moe_status moe_migu_init(moe_migu *g, const moe_model *m, const moe_migu_config *c);
MOEDEF void moe_migu_free(moe_migu *g);
/* Adds the last forward's output magnitudes (call after each micro-batch's forward). */
MOEDEF moe_status moe_migu_accumulate(moe_migu *g, const moe_model *m);
/* Rows of every watched matrix kept or masked from this step's statistics (or at random),
   written into k (other tensors untouched); then the statistics reset. A step without any
   accumulated forward is an error for the statistic (not for the random control). */
MOEDEF moe_status moe_migu_mask(moe_migu *g, const moe_model *m, moe_mask *k);
MOEDEF void moe_migu_reset(moe_migu *g);

/* ============================================================================================
   >>moe:model_io  model files: the config as a record of named fields, save/load with checks
   ============================================================================================
   A model file is one moe.h checkpoint (>>moe:ckpt: versioned, atomic, CRC-32) whose config
   blob is the MODEL RECORD below; its state blob is the caller's (RNG, data position, ...),
   its step the caller's, then the parameters and, optionally, the Adam moments.

   RECORD (a struct as named, typed values; all integers little-endian)
       u32 count, then count entries:
         u8 name length n (1..255), n bytes of name (no NUL), u8 type, u8 flags, the value:
           type 'i': i64, the member's integer sign-extended (int, enum, long long, uint64_t bits)
           type 'f': f64 bits (float members widen exactly, and narrow back exactly)
           type 's': u32 length, that many bytes (a NUL-terminated char array, without its NUL)
         flags: 1 = the value equals the writer's default
   A struct is described ONCE, by a table of moe_field (name, type, offsetof, sizeof): the
   record never depends on the struct's layout, padding, enum size or compiler. Reading:
   a field the record lacks keeps the value the caller put there (its default); a name the
   table does not know (a newer writer's field) is ignored when flagged default (new options
   default to the old behaviour), else refused with a sentence; a duplicate name, a type other
   than the table's, an integer that fits the member's width neither signed nor unsigned, or
   text longer than the array are refused.

   MODEL RECORD (the checkpoint's config blob)
       "MOEMODEL", u32 version (MOE_MODEL_RECORD_VERSION; bumped only when this encoding
       changes, never for a new field: new fields are new names),
       record of moe_model_config (moe_model_config_fields(): nested layer fields are named
       "moe.top_k", ...; flagged default against moe_model_config_default(), whose values
       the fields a file lacks take),
       u32 tensor count, then per tensor: u8 name length, name, u8 ndim, u32 flags, ndim x u32
       shape: the file's own tensor table (>>moe:store), so a loader checks what a config
       implies against what the file holds before it reserves memory.

   Loading checks, in this order, before anything the size of the model is allocated: the
   checkpoint (magic, version, size, CRC), the record, the tensor table against the
   checkpoint's parameter count and layout fingerprint, the config (moe_model_config_validate)
   and the table the config implies (moe_model_declare, within twice the file's count)
   against the file's. Then it builds the model, loads parameters (and moments) and refuses any
   non-finite value, naming the tensor. Earlier files: checkpoints that hold a raw
   moe_model_config (moe_checkpoint_save(..., &m.cfg, sizeof m.cfg, ...), as train_lm wrote
   them) load while this build's moe_model_config has the layout they were written with;
   otherwise, and for checkpoints of other objects, the sentence says what the file is and
   what to do. */

#define MOE_MODEL_RECORD_VERSION 1

typedef enum moe_field_type {
    MOE_FIELD_INT = 'i',   /* a signed or unsigned integer or an enum of 1, 2, 4 or 8 bytes  */
    MOE_FIELD_FLOAT = 'f', /* float or double                                                 */
    MOE_FIELD_TEXT = 's'   /* char array holding a NUL-terminated string                       */
} moe_field_type;

typedef struct moe_field {
    const char *name;    /* stable: a name is never reused with another meaning         */
    moe_field_type type;
    size_t offset;       /* offsetof(struct, member)                                     */
    size_t size;         /* sizeof the member                                            */
} moe_field;

/* One table line: MOE_FIELD(MOE_FIELD_INT, moe_model_config, moe.top_k) names the field
   "moe.top_k" (the member path). */
#define MOE_FIELD(type, st, member) {#member, type, offsetof(st, member), sizeof(((st *)0)->member)}

/* Encodes obj's fields into out (cap bytes); *len = the record's size. out = NULL sizes it.
   defaults (may be NULL): a struct of the same type; fields equal to it are flagged default.
   MOE_ERR_INVALID_ARG for a bad table (name of 0 or > 255 bytes, a size the type cannot have)
   or cap < *len. */
MOEDEF moe_status moe_record_write(void *out, size_t cap, size_t *len, const void *obj,
                                   const void *defaults, const moe_field *fields, int n_fields,
                                   moe_err *err);
/* Decodes a record into obj, as described above; *used (may be NULL) = bytes read. obj is
   changed only on success. MOE_ERR_FORMAT with a sentence for anything it refuses. */
MOEDEF moe_status moe_record_read(void *obj, size_t *used, const void *in, size_t len,
                                  const moe_field *fields, int n_fields, moe_err *err);

/* THE table of moe_model_config's fields (with the nested moe_layer_config's), *count set. */
MOEDEF const moe_field *moe_model_config_fields(int *count);

#ifndef MOE_NO_STDIO
/* Writes m as a model file (atomically: an existing file is replaced whole or not at all).
   with_moments: also the Adam moments; step and user (user_bytes, may be NULL/0) are the
   caller's, returned by moe_model_load. Refuses a model holding a non-finite parameter (or
   moment, when saved), naming the tensor, and leaves the file on disk as it was. */
MOEDEF moe_status moe_model_save(const moe_model *m, const char *path, int with_moments, long long step,
                                 const void *user, size_t user_bytes, moe_err *err);
/* the same through the checkpoint I/O hooks io (NULL: the real calls; >>moe:ckpt) */
MOEDEF moe_status moe_model_save_ex(const moe_model *m, const char *path, int with_moments, long long step,
                                    const void *user, size_t user_bytes, const moe_ckpt_io *io, moe_err *err);
/* The config of a model file alone (checked as moe_model_load checks it, nothing large
   allocated), to compare with a program's flags or size its buffers. info (may be NULL): the
   checkpoint header: step, has_moments, state_bytes = the size of the user blob. */
MOEDEF moe_status moe_model_load_config(const char *path, moe_model_config *c, moe_ckpt_info *info,
                                        moe_err *err);
/* Builds m (not holding a model: it is overwritten) from the file (moe_model_init with
   batches of max_B x max_T; 0 = 1 sequence of the file's max_seq) and loads the parameters, the moments when the file has them (else
   zeros), *step (may be NULL) and the user blob (user may be NULL; else user_bytes must be
   the stored size, see moe_model_load_config). On failure m is freed (moe_model_free) and err
   holds the sentence. */
MOEDEF moe_status moe_model_load(moe_model *m, const char *path, int max_B, int max_T, long long *step,
                                 void *user, size_t user_bytes, moe_err *err);
#endif

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

/* ============================================================================================
   >>moe:growth  model growth: G_stack and the growth operators (arXiv 2405.15319)
   ============================================================================================
   Grows a trained small model (depth l, FFN width f) into a larger one (depth L >= l, FFN
   width F >= f) of the same d, heads, vocabulary and router, by copying through the two
   stores' tensor tables: no second copy of the model layout. Depth (arXiv 2405.15319 §2, §3):
   target layer j copies small layer map[j]; G_stack is map[j] = j mod l (block order
   0..l-1, 0..l-1, ...), layer interpolation is map[j] = j / g (f0 f0 f1 f1 ...), partial
   stacking repeats a sub-block (moe_grow_partial_map). A later copy of a source layer is a
   "new" layer. MoE layers carry their experts and routers with them.
     G_direct: copy (depth = G_stack);  width: Net2Net split, a new neuron copies neuron
               n mod f's fan-in and the fan-out of every copy is divided by its copies
               (function kept exactly for the FFN's hidden neurons).
     G_zero:   new layers' output projections (attn.wo, w_down, b_down) zero, so they start as
               the identity; width: new neurons keep the target's own random fan-in and get a
               zero fan-out.
     G_random: new layers keep the target's own random initialisation and are masked: their
               residual updates are multiplied by c, ramped 0 -> 1 (moe_grow_set_mask; the
               model reads moe_model.layer_scale). Depth only.
     G_learn:  LiGO-style (arXiv 2303.00980) learned depth map: target layer j's tensors are
               sum_i D[j,i] * small layer i's, D trained briefly on the LM loss
               (moe_grow_learner). One D for all of a layer's tensors (LiGO learns one per
               module kind); depth only.
   The optimizer state restarts (the official code starts the grown run at iteration 0 with
   fresh AdamW moments): moe_model_grow zeroes the target's gradients and moments; the caller
   restarts its step counter and learning-rate schedule. The model width d is not grown:
   RMSNorm cannot keep the function there (§2) and the paper finds width growth worse. */

typedef enum moe_grow_op {
    MOE_GROW_DIRECT = 0, /* copy: G_stack in depth, neuron split in width             */
    MOE_GROW_ZERO = 1,   /* new outputs zero: function-preserving                     */
    MOE_GROW_RANDOM = 2, /* new layers random, masked by a ramp                       */
    MOE_GROW_LEARN = 3   /* copies as G_direct; moe_grow_learner then fits the maps    */
} moe_grow_op;

typedef enum moe_grow_order {
    MOE_GROW_STACK = 0,      /* map[j] = j mod l  (f1 f0 f1 f0: block stacking)        */
    MOE_GROW_INTERPOLATE = 1 /* map[j] = j / (L/l) (f1 f1 f0 f0: layer interpolation)  */
} moe_grow_order;

typedef struct moe_grow_spec {
    moe_grow_op op;
    moe_grow_order order;  /* the depth map when layer_map is NULL; both need L % l == 0   */
    const int *layer_map;  /* (target n_layers) source layer of every target layer, or NULL */
    float noise;           /* alpha of W <- (1-alpha) W + alpha eps on every grown matrix
                              (§5 ablation, 0.2): eps ~ N(0, 1/(d L^2)) for output
                              projections, N(0, 2/(5d)) otherwise; 0 = none              */
    uint64_t seed;         /* the noise draws                                            */
} moe_grow_spec;

MOEDEF moe_grow_spec moe_grow_spec_default(void); /* G_direct, stacking, no noise */
/* The source layer of every target layer (map: L ints) for growing depth l to L; a status
   with a sentence for L < l, a depth the order cannot reach, or a layer_map entry outside. */
MOEDEF moe_status moe_grow_layer_map(int *map, int L, int l, const moe_grow_spec *spec, moe_err *err);
/* Partial stacking: layers [0, first) once, the block [first, first+count) repeated until the
   depth is L, then [first+count, l) once; (L - l) % count must be 0. */
MOEDEF moe_status moe_grow_partial_map(int *map, int L, int l, int first, int count, moe_err *err);
/* 1 when target layer j repeats a source layer that an earlier target layer already copies */
MOEDEF int moe_grow_is_new(const int *map, int j);
/* Fills big (built by moe_model_init for the target config, its weights initialised: G_zero
   and G_random take their new parameters from there) from small. Everything is checked before
   the first write: on a status big is unchanged. Zeroes big's gradients and AdamW moments and
   sets its layer_scale (0 for G_random's new layers, else 1). */
MOEDEF moe_status moe_model_grow(moe_model *big, const moe_model *small, const moe_grow_spec *spec);
/* G_random's mask c = min(1, step / ramp_steps) on the new layers (1 on the others); call
   before each training step of the grown model. ramp_steps <= 0: c = 1. */
MOEDEF float moe_grow_mask_value(long long step, long long ramp_steps);
MOEDEF moe_status moe_grow_set_mask(moe_model *big, int small_layers, const moe_grow_spec *spec, long long step,
                                    long long ramp_steps);

/* G_learn: the depth map D (L, l), initialised to the spec's map (D[j, map[j]] = 1). Loop:
   moe_grow_learner_apply (big's layer tensors = D . small's), zero big's gradients, forward +
   backward of big on the LM loss, moe_grow_learner_backward, moe_grow_learner_step. The
   small model and the non-layer tensors (embeddings, final norm) stay fixed. */
typedef struct moe_grow_learner {
    int L, l, count;      /* target and small depth; big's tensor count                   */
    float *D;             /* (L, l)                                                        */
    float *gD, *mD, *vD;  /* (L, l) gradient, AdamW moments                                */
    int *src;             /* (count, l) small's tensor id for big tensor t from layer i, -1 */
    int *layer;           /* (count) big tensor t's layer, -1 for the non-layer tensors    */
    long long step;
    moe_err err;
} moe_grow_learner;
MOEDEF moe_status moe_grow_learner_init(moe_grow_learner *g, const moe_model *big, const moe_model *small,
                                        const moe_grow_spec *spec);
MOEDEF void moe_grow_learner_apply(const moe_grow_learner *g, moe_model *big, const moe_model *small);
MOEDEF void moe_grow_learner_backward(moe_grow_learner *g, const moe_model *big, const moe_model *small);
MOEDEF void moe_grow_learner_step(moe_grow_learner *g, float lr); /* Adam (0.9, 0.999); zeroes gD */
MOEDEF void moe_grow_learner_free(moe_grow_learner *g);

/* The paper's fits (§4, N = target non-embedding parameters, C = training FLOPs ~ 6 N D):
   growth timing log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 (d: tokens for the small
   model), growth factor log10(g) = 1.01 log10(N) - 29.88 / log10(C) - 7.36. */
MOEDEF double moe_grow_timing_tokens(double N, double C);
MOEDEF double moe_grow_factor_fit(double N, double C);
/* Connection rate R_c (§5): the share of the L-1 adjacent target pairs (j, j+1) that were
   adjacent in the small model (map[j+1] == map[j] + 1); 8 -> 24: stack 91.3%, interpolate 30.4%. */
MOEDEF double moe_grow_connection_rate(const int *map, int L);
/* FLOPs at which a loss curve first reaches `loss` (linear between points; curves of n
   (flops, loss) points in order); MOE_ERR_INVALID_ARG with a sentence when it never does. */
MOEDEF moe_status moe_grow_flops_at_loss(const double *flops, const double *losses, int n, double loss, double *at,
                                         moe_err *err);
/* Speed-up sp = FLOPs_scratch / FLOPs_grown - 1 at equal loss (§3; grown counts the small model's FLOPs). */
MOEDEF double moe_grow_speedup(double flops_scratch, double flops_grown);

/* ============================================================================================
   >>moe:safetensors  safetensors files: any store, and the model under Hugging Face names
   ============================================================================================
   The interchange format of the field (github.com/huggingface/safetensors, "Format"):
       u64 N (little-endian), N bytes of UTF-8 JSON (the header), then the data.
       The header is one object. Per tensor: "name": {"dtype": "F32", "shape": [2, 3],
       "data_offsets": [begin, end]}, byte offsets into the data (relative to its start),
       row-major, little-endian; and optionally "__metadata__": {"key": "text", ...}.
   Our own checkpoint (>>moe:ckpt) stays the training format (moments, RNG, data position);
   safetensors carries weights only (and, beside a model, its config.json).

   WRITING: tensors in store order, contiguous, header padded with spaces to a multiple of 8
   bytes, "__metadata__": {"format": "pt"} (what transformers looks for). F32 as stored;
   F16 and BF16 rounded to nearest, ties to even (the float->half rule of IEEE 754 and of
   torch's .to(torch.float16 / torch.bfloat16)). Atomic: a temporary file beside the target,
   flushed, fsynced, renamed (the checkpoint writer's mechanism).

   READING is bounded and runs no code (the format's promise): the file's size is measured
   first; the header length must fit in the file (and be at most 100 MB, the reference
   implementation's limit); the header is parsed by a small JSON reader (depth <= 64, strings
   and numbers checked); every tensor needs a dtype moe.h reads (F32, F16, BF16; any other,
   or an unknown one, is refused naming it), a shape of at most 8 dimensions whose bytes equal
   end - begin, and the tensors' ranges, sorted, must tile the data exactly (no overlap, no
   hole, nothing past the end: the reference's "InvalidOffset" / "MetadataIncompleteBuffer").
   Duplicate names, duplicate fields and text after the header object are refused. Only
   then is a byte of data read, in 64 KiB chunks, converted to float. What is allocated: the
   header (its checked length, at most the file's size), a table of one ~100-byte entry per
   tensor it lists (each listing takes at least 50 of its bytes), a 64 KiB chunk, and for
   moe_safetensors_load a copy of the store's parameters, so that a failed load leaves the
   store unchanged: never a size the file merely claims.

   HUGGING FACE NAMES (moe_model_export_hf / moe_model_import_hf): the tiny model as
   LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) names it:
       wte                      model.embed_tokens.weight                        (V, d)
       l{N}.ln1.w               model.layers.{N}.input_layernorm.weight          (d)
       l{N}.attn.wqkv rows 0..d      model.layers.{N}.self_attn.q_proj.weight    (d, d)
                      rows d..2d                              k_proj.weight
                      rows 2d..3d                             v_proj.weight
       l{N}.attn.wo             model.layers.{N}.self_attn.o_proj.weight         (d, d)
       l{N}.ln2.w               model.layers.{N}.post_attention_layernorm.weight (d)
       dense layer:  l{N}.ffn.w_gate / w_up / w_down [0]
                                model.layers.{N}.mlp.gate_proj / up_proj / down_proj.weight
       MoE layer:    l{N}.moe.router.w   model.layers.{N}.block_sparse_moe.gate.weight  (E, d)
                     l{N}.moe.experts.w_gate[e] / w_up[e] / w_down[e]
                                model.layers.{N}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight
                     (Mixtral: w1 the gate, silu'd; w3 the up projection; w2 down)
                     l{N}.moe.shared.* (S shared experts of width Ds, weight 1, no gate):
                                model.layers.{N}.block_sparse_moe.shared_expert.gate_proj /
                                up_proj / down_proj.weight, ONE SwiGLU MLP of width S * Ds:
                                the S experts' gate and up rows stacked, their down columns
                                side by side (sum of S SwiGLU experts = one of S times the
                                width; DeepSeekMoE's shared_experts, arXiv:2401.06066 s3.2;
                                unlike Qwen2-MoE's shared_expert there is no sigmoid gate)
       lnf.w                    model.norm.weight                                (d)
   The head is tied to the embedding: no lm_head.weight is written and config.json says
   "tie_word_embeddings": true, as transformers' save_pretrained writes a tied model. On
   reading, an lm_head.weight is accepted only if it equals model.embed_tokens.weight.
   Attention and positions match HF Llama as they are: per head, q and k are rotated in the
   rotate-half pairing (i, i + hd/2) with angle t * theta^(-2i/hd) (>>moe:attention), scores
   scaled by 1/sqrt(hd); RMSNorm is x / sqrt(mean(x^2) + eps) * w (LlamaRMSNorm): the same
   weights give the same logits, no permutation (llama.cpp needs one: >>moe:gguf).

   config.json ("the familiar form"): for a dense model LlamaForCausalLM / "llama" with
   vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
   num_key_value_heads (= heads), head_dim, hidden_act "silu", max_position_embeddings,
   rms_norm_eps, rope_theta, rope_scaling null, attention_bias false, mlp_bias false,
   tie_word_embeddings true, torch_dtype. An MoE model that is exactly Mixtral (every layer
   MoE, no shared expert, top-k weights renormalised) is MixtralForCausalLM / "mixtral" with
   intermediate_size = the expert width, num_local_experts, num_experts_per_tok. Other MoE
   models say "architectures": ["MoeHForCausalLM"], "model_type": "moe_h": the Mixtral keys
   and names, with Qwen2-MoE's keys for what Mixtral lacks: intermediate_size = the dense
   layers' width, moe_intermediate_size = the expert width, norm_topk_prob (renormalise the
   top-k weights), mlp_only_layers (the dense layers) with decoder_sparse_step 1, and
   shared_expert_intermediate_size (S * Ds) with n_shared_experts (S, DeepSeek's key).
   tests/ref/hf_ref.py implements all three in plain PyTorch.

   Only configurations that map are written: RoPE positions, SwiGLU experts, the softmax
   top-k router without bias or capacity limit, routers reading x (no RMoE/MLP router input),
   no HyperMoE. Any other gets a sentence naming what does not map. Training-only settings
   (balance and z-loss coefficients, GW-MoE's fine-tuning broadcast) are not carried: an
   imported model has moe.h's defaults for them. */

typedef enum moe_dtype {
    MOE_DTYPE_F32 = 0,
    MOE_DTYPE_F16 = 1, /* IEEE binary16                               */
    MOE_DTYPE_BF16 = 2 /* bfloat16: float32's upper 16 bits, rounded  */
} moe_dtype;

/* float32 <-> 16-bit floats, round to nearest, ties to even; NaN stays NaN, overflow gives
   infinity (f16: |x| >= 65520). */
MOEDEF uint16_t moe_f32_to_f16(float x);
MOEDEF float moe_f16_to_f32(uint16_t h);
MOEDEF uint16_t moe_f32_to_bf16(float x);
MOEDEF float moe_bf16_to_f32(uint16_t h);

#ifndef MOE_NO_STDIO
/* Every tensor of s (its own names and shapes) as a safetensors file of dtype. */
MOEDEF moe_status moe_safetensors_save(const char *path, const moe_store *s, moe_dtype dtype, moe_err *err);
/* Fills every tensor of s (allocated) from the file, by name; shapes must be equal, F32, F16
   or BF16 is converted. A tensor of s the file lacks, or one the file holds that s lacks, is
   refused naming it. On any error s is unchanged. */
MOEDEF moe_status moe_safetensors_load(const char *path, moe_store *s, moe_err *err);
/* MOE_OK when c maps onto the Hugging Face names above, else a sentence saying what does not. */
MOEDEF moe_status moe_model_hf_check(const moe_model_config *c, moe_err *err);
/* Writes dir/model.safetensors (weights as dtype, HF names) and dir/config.json; dir must
   exist. Each file is replaced atomically. */
MOEDEF moe_status moe_model_export_hf(const moe_model *m, const char *dir, moe_dtype dtype, moe_err *err);
/* Builds m (overwritten) from dir/config.json and dir/model.safetensors: the config is read
   and checked (and the parameter count it implies compared with the weights file's size)
   before the model is allocated, then every tensor is loaded by its HF name and checked
   finite. Batches of max_B x max_T (0 = 1 x the config's max_position_embeddings). On failure
   m is freed and err holds the sentence. */
MOEDEF moe_status moe_model_import_hf(moe_model *m, const char *dir, int max_B, int max_T, moe_err *err);
#endif

/* ============================================================================================
   >>moe:gguf  GGUF files that llama.cpp runs
   ============================================================================================
   GGUF version 3 (ggml's docs/gguf.md), little-endian:
       "GGUF", u32 version (3), u64 tensor count, u64 metadata count,
       metadata: per entry a string key, u32 value type, the value
           (strings: u64 byte count + bytes, no NUL; arrays: u32 item type, u64 count, items),
       tensor infos: per tensor a string name, u32 n_dims, u64 ne[n_dims] (INNERMOST first: a
           PyTorch (out, in) weight is ne = [in, out], experts (E, out, in) ne = [in, out, E]),
           u32 ggml type (F32 0, F16 1, BF16 30), u64 offset into the data (a multiple of 32),
       zero padding to a multiple of general.alignment (32), then the data.

   The tiny model as llama.cpp's "llama" architecture (its llm_build_llama): token_embd,
   blk.N.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm, dense blk.N.ffn_gate /
   ffn_up / ffn_down, or MoE blk.N.ffn_gate_inp (the router, kept F32) with the experts
   stacked as ffn_gate_exps / ffn_up_exps / ffn_down_exps ([d, D, E], [d, D, E], [D, d, E]:
   exactly moe.h's (E, D, d) / (E, d, D) banks), output_norm; no "output" tensor, so llama.cpp
   ties the head to token_embd as moe.h does. Norms are always F32 (as llama.cpp's converter
   writes them); the other matrices take the dtype asked for.
   llama.cpp's llama architecture rotates ADJACENT pairs (2i, 2i + 1) of each head (its
   LLAMA_ROPE_TYPE_NORM); moe.h (like HF Llama) rotates the halves (i, i + hd/2). As
   llama.cpp's convert_hf_to_gguf.py does, the rows of attn_q and attn_k are permuted per head
   so that row 2i + j holds moe.h's row j * hd/2 + i (j = 0, 1): the same frequency then meets
   the same pair, and q . k is unchanged because q and k move together. v and the output
   projection are not permuted.
   The llama architecture has one FFN kind for all layers and a Mixtral router (softmax over
   all experts, top-k, weights renormalised): exported are the models all dense, or all MoE
   with no shared experts and renormalize = 1, plus what moe_model_hf_check asks; others get
   a sentence.
   Vocabulary: the byte model's 256 tokens as a GPT-2 byte-level BPE vocabulary with NO merges
   (tokenizer.ggml.model "gpt2", pre-tokenizer "default"): token b is byte b written as GPT-2's
   bytes_to_unicode character, so llama.cpp's BPE tokenizer maps every byte of any text to
   its own token and detokenizes back to the bytes. (A SentencePiece "llama" vocabulary of
   <0xNN> byte tokens does not fit 256 tokens: it rewrites spaces as U+2581, which then has
   no token.) bos = eos = token 0 (NUL, absent from text), add_bos_token false. */

#ifndef MOE_NO_STDIO
/* MOE_OK when c exports as llama.cpp's llama architecture (above), else a sentence. */
MOEDEF moe_status moe_model_gguf_check(const moe_model_config *c, moe_err *err);
/* Writes m as a GGUF file (atomically); matrices as dtype, norms and the router as F32. */
MOEDEF moe_status moe_model_export_gguf(const moe_model *m, const char *path, moe_dtype dtype, moe_err *err);
#endif

/* ============================================================================================
   >>moe:closer_look  diagnostics of "A Closer Look into MoE in LLMs" and routing statistics
   ============================================================================================
   Lo et al., arXiv 2406.18219 (§3-§5), in this library's convention: neuron i of a SwiGLU
   expert is row i of its gate matrix A (w_gate, (D, d)) and of its up matrix B (w_up), and
   column i of its down matrix O (w_down, (d, D)); the router's gate embedding of expert e is
   row e of router.w (E, d).
     two-pass protocol (§3): pass 1 is an ordinary moe_model_forward, which keeps every
       layer's FFN input (blocks[l].ln2) and the gate scores of every expert (the router's
       softmax, moe_layer.probs); pass 2, moe_expert_outputs, runs EVERY expert of layer l on
       those inputs (top-k = E) before gate weighting.
     norm-vs-score ranks (§4.2): per token, rank the experts by output L2 norm and by gate
       score; counts[rank_norm][rank_score] += 1 (ties: the lower expert index ranks first).
     similarities (§4.1, §5): cosine of flattened expert matrices, or of "neuron-averaged"
       vectors (the mean of an expert's neurons: order-invariant), the angular similarity
       1 - arccos(cos) / pi for averaging; mean output similarity over tokens.
     gate-vs-neuron regression (§4.3): over expert pairs m < n, X = cos of the gate embeddings,
       Y = cos of the neuron-averaged A (or B, or O) vectors; Pearson R and R^2.
     Kendall's tau (tau-b, with ties, as scipy.stats.kendalltau) for orders, e.g. a neuron
       permutation found by matching (§4.1).
   Also here: the routing statistics of the RMoE paper (arXiv 2408.06793 §4.3: inner and outer
   balance, the cross-layer mutual information of routing vectors) and the cosine similarity
   of adjacent layers' inputs that CQIL groups layers by (arXiv 2404.06709 §3.1).
   Diagnostics allocate what they need (they are not on the training path); anything asked
   of a dense layer, a layer without a linear router or experts without a gate matrix is a
   status with a sentence in m->err (or err). */

typedef enum moe_expert_matrix {
    MOE_MATRIX_ROUTER = 0, /* the gate embedding, router.w row e (E, d)         */
    MOE_MATRIX_GATE = 1,   /* A, w_gate (D, d) per expert: neurons are rows      */
    MOE_MATRIX_UP = 2,     /* B, w_up (D, d): neurons are rows                   */
    MOE_MATRIX_DOWN = 3    /* O, w_down (d, D): neurons are columns              */
} moe_expert_matrix;

/* cos(a, b) of two n-vectors in double; 0 when either is zero */
MOEDEF double moe_cosine(const float *a, const float *b, size_t n);
/* 1 - arccos(cos) / pi, cos clamped to [-1, 1] (arXiv 2406.18219 §5) */
MOEDEF double moe_angular_similarity(double cos);
/* Pearson correlation of n pairs; NaN when n < 2 or a side is constant */
MOEDEF double moe_pearson(const double *x, const double *y, size_t n);
/* Kendall's tau-b of n pairs (ties in x or y corrected as scipy.stats.kendalltau does); NaN
   when n < 2, a side is constant or memory runs out. O(n log n), 3n doubles of scratch. */
MOEDEF double moe_kendall_tau(const double *x, const double *y, size_t n);

/* Inner and outer balance of n tokens' routing probabilities probs (n, E): inner[t] =
   p_top1 / p_top2 (the denominator at least 1e-30), outer[t] = the sum of the k largest
   (arXiv 2408.06793 §4.3). E >= 2, 1 <= k <= E. */
MOEDEF moe_status moe_routing_balance(float *inner, float *outer, const float *probs, int n, int E, int k, moe_err *err);
/* The RMoE paper's cross-layer mutual information of n tokens, mi (n) in nats: token t's two
   routing vectors p, q (n, E) become labels a_e = bin of p_e, b_e = bin of q_e (bins equal-
   width on [0, 1], the last closed); the plug-in MI of the E label pairs (as sklearn's
   mutual_info_score): (1/E) sum_e ln(E n(a_e, b_e) / (n(a_e) n(b_e))). */
MOEDEF moe_status moe_routing_mi(double *mi, const float *p, const float *q, int n, int E, int bins, moe_err *err);

/* Pass 2 of the two-pass protocol on the last forward of m (B T tokens): out (B T, E, d) =
   every routed expert's output on layer l's stored FFN input, before gate weighting (shared
   experts are not among them); scores (B T, E) = the router's probabilities of that forward
   (softmax; sigmoid scores for sigmoid routers). Either may be NULL. AoE experts (no gate
   matrix of their own) are refused. */
MOEDEF moe_status moe_expert_outputs(float *out, float *scores, moe_model *m, int l);
/* counts (E, E) += per token, [rank of the expert by output norm][its rank by score] */
MOEDEF void moe_rank_count(int64_t *counts, const float *out, const float *scores, int n, int E, int d);
/* sim (E, E): mean over n tokens of cos (angular = 0) or the angular similarity (1) of the
   experts' outputs out (n, E, d) */
MOEDEF void moe_output_similarity(double *sim, const float *out, int n, int E, int d, int angular);
/* v (E, d): each expert's mean neuron of matrix `which` of layer l (ROUTER: its gate
   embedding row itself) */
MOEDEF moe_status moe_neuron_means(float *v, moe_model *m, int l, moe_expert_matrix which);
/* sim (E, E): cosine (angular: the angular similarity) of layer l's experts' matrix `which`,
   flattened (neuron_mean 0) or neuron-averaged (1); the router's rows either way */
MOEDEF moe_status moe_expert_similarity(double *sim, moe_model *m, int l, moe_expert_matrix which, int neuron_mean, int angular);
/* Pearson R (and R^2) over the E (E-1)/2 expert pairs of layer l between the gate embeddings'
   cosine and the neuron-averaged `which` vectors' cosine (arXiv 2406.18219 §4.3, Table 1) */
MOEDEF moe_status moe_gate_neuron_regression(double *R, double *R2, moe_model *m, int l, moe_expert_matrix which);
/* Similarity by depth: mean[l] = the mean over expert pairs m < n of moe_expert_similarity's
   cosine for every MoE layer, NaN for dense layers. (n_layers) values. */
MOEDEF moe_status moe_similarity_by_depth(double *mean, moe_model *m, moe_expert_matrix which, int neuron_mean);
/* cos (n_layers - 1): cos[l] = mean over the last forward's tokens of cos(x_l, x_{l+1}), x_l
   the residual stream entering layer l (CQIL, arXiv 2404.06709 §3.1, Figure 2). Run on the
   sequential model (inside a CQIL group every member's input is the group's). Dense models
   too. */
MOEDEF moe_status moe_layer_input_similarity(double *cos, moe_model *m);

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

/* ============================================================================================
   >>moe:mpi  training on several processes: data and expert parallelism over MPI
   ============================================================================================
   Compiled only under MOE_MPI (build with mpicc); without it this part is empty. Everything
   goes through the system's MPI (OpenMPI on Debian): the same program runs on the ranks of one
   machine or of a cluster, mpirun decides which.

   Data parallel. Every rank holds the whole model and takes its share of the global batch
   (moe_mpi_share: rank r the rows [r B/n, (r+1) B/n) of the batch every rank draws from the
   same loader, so the split is disjoint, reproducible and independent of timing). After the
   backward, moe_mpi_allreduce_grads sums the one flat gradient buffer in RANK ORDER,
       g = ((g_0 + g_1) + g_2) + ... + g_{n-1},
   with the same rounding on every rank whatever the timing: MPI_Allreduce's order of
   summation is the implementation's (it may change with the message size, the algorithm
   chosen or the network), so we do not use it for floats. The reduction is a reduce-scatter
   by hand over MPI collectives: MPI_Alltoallv gives rank j slice j of every rank's buffer, rank j
   adds the slices in rank order, MPI_Allgatherv returns the sums (the bandwidth of a ring
   all-reduce, 2 (n-1)/n of the buffer per rank; the arithmetic is ours, the transport MPI's).
   Equal to one process: a single process that computes each micro-batch's gradient into a
   zeroed buffer and adds the buffers in micro-batch order gets the same bits. One that lets
   backward accumulate (+=) every micro-batch into one buffer differs in the last bits only
   where a parameter receives several additions within a micro-batch (a matmul's partial sums
   over depth blocks, an embedding row used by several tokens), which makes the two sums
   associate differently: equal to float tolerance (relative 1e-5 in our tests).
   The optimizer then runs on every rank on the same gradients, so the parameters stay equal
   bit for bit without being sent. Checkpoints are one file written by rank 0 through the
   usual atomic writer; moe_mpi_root_status tells every rank how the write went. A
   single-process run loads it, and a run on any rank count loads a single-process file.

   Expert parallel. The routed experts of a layer are split across the ranks (rank r owns
   experts [r E/n, (r+1) E/n)); each rank routes its own tokens exactly as one process does
   (capacity, drops and every router family that fills the assignment list), then sends
   each gathered row to the rank of its expert and gets the expert's output back: per-expert
   counts first (MPI_Alltoall), then the rows (MPI_Alltoallv); backward sends the output
   gradients the same way and gets the input gradients back. The owner's weight gradients are
   complete (they saw every rank's rows), the other ranks' are zero, so the data-parallel
   reduction above finishes the job for every tensor at once (x + 0 = x exactly). Every rank
   still stores every expert's weights and Adam moments (the flat buffer and the checkpoint
   stay those of one process); what is split is the experts' compute and activations.
   (GShard, arXiv 2006.16668 §2.2-2.3: experts across devices, tokens exchanged all-to-all.)
   AoE's routers, whose experts read the router's low-rank caches, are refused.

   Errors. The communicator is duplicated with MPI_ERRORS_RETURN, so an MPI failure is a status
   with MPI's own sentence. Ranks that disagree on the config (moe_mpi_check_same compares a hash
   of every rank's bytes) or a world size that does not divide the experts give a status on
   EVERY rank, never a hang. A rank that dies: OpenMPI's mpirun ends the whole job. After a
   failed collective the ranks may be out of step: end the program (MPI_Abort), do not retry. */

#ifdef MOE_MPI
#ifdef __cplusplus /* mpi.h brings C++ headers along: outside the declarations' extern "C" */
}
#endif
#ifndef OMPI_SKIP_MPICXX /* the C API only: not OpenMPI's (or MPICH's) old C++ bindings */
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <limits.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_mpi {
    MPI_Comm comm;     /* a duplicate of the caller's communicator, errors returned          */
    int rank, size;
    float *scratch;    /* (n ceil(max_floats / n)) the rank's slice of every rank's buffer  */
    size_t max_floats; /* the largest buffer moe_mpi_allreduce_sum takes                    */
    double *dscratch;  /* (n MOE_MPI_MAX_DOUBLES) moe_mpi_sum_doubles                        */
    unsigned long long *hashes; /* (n) moe_mpi_check_same                                     */
    int *counts;       /* (4 n) the reduction's Alltoallv / Allgatherv counts and offsets      */
    moe_err err;
} moe_mpi;

#define MOE_MPI_MAX_DOUBLES 64

/* Collective over comm (MPI must be initialised). max_floats: the largest buffer to be reduced
   (a store's numel for data parallelism). On failure nothing stays allocated. */
MOEDEF moe_status moe_mpi_init(moe_mpi *ctx, MPI_Comm comm, size_t max_floats);
MOEDEF void moe_mpi_free(moe_mpi *ctx); /* collective (frees the duplicated communicator) */
/* Collective. MOE_OK when every rank passed the same n bytes; else MOE_ERR_INVALID_ARG on every
   rank, naming the first rank that differs from rank 0 and `what`. */
MOEDEF moe_status moe_mpi_check_same(moe_mpi *ctx, const void *bytes, size_t n, const char *what);
/* Collective: the model's config (as its record) and its parameter table on every rank. */
MOEDEF moe_status moe_mpi_check_model(moe_mpi *ctx, const moe_model *m);
/* The rank's contiguous share of n items: [*first, *first + *count). n must be a multiple of
   the rank count (equal shares keep the micro-batches' weights equal). Local, no message. */
MOEDEF moe_status moe_mpi_share(moe_mpi *ctx, int n, int *first, int *count);
/* Collective: buf (n floats, n <= max_floats) = the rank-order sum of every rank's buf, the
   same bits on every rank. */
MOEDEF moe_status moe_mpi_allreduce_sum(moe_mpi *ctx, float *buf, size_t n);
/* Collective: s->grads summed across ranks in rank order (data parallelism's one exchange). */
MOEDEF moe_status moe_mpi_allreduce_grads(moe_mpi *ctx, moe_store *s);
/* Collective: v (n <= MOE_MPI_MAX_DOUBLES) = the rank-order sum of every rank's v (losses). */
MOEDEF moe_status moe_mpi_sum_doubles(moe_mpi *ctx, double *v, int n);
/* Collective: rank 0's status and sentence (in its *err, may be NULL = MOE_OK) on every rank:
   after rank 0 alone wrote a checkpoint. Returns that status; err (may be NULL) gets the
   sentence on the other ranks. */
MOEDEF moe_status moe_mpi_root_status(moe_mpi *ctx, moe_status root_st, moe_err *err);

/* Expert parallelism of one MoE layer. */
typedef struct moe_mpi_experts {
    moe_mpi *mpi;
    moe_layer *L;
    moe_experts_runner runner; /* L->runner points here while attached                      */
    int e_first, e_count;      /* the experts this rank owns                                 */
    int max_rows;              /* rows this rank can receive: n min(L->cap, max_tokens e_count) */
    int *send_rows;            /* (E) rows this rank sends to each expert (the counts sent)    */
    int *recv_rows;            /* (n e_count) rows from source s for owned expert j, [s e_count + j] */
    int *scount, *sdispl, *rcount, *rdispl; /* (n) each: Alltoallv counts in floats          */
    int *offset;               /* (e_count + 1) the owned experts' rows in expert-major order  */
    float *rbuf;               /* (max_rows, d) rows in source-major order, as MPI moves them  */
    float *xg, *eout, *dout, *dxg; /* (max_rows, d) the owned experts' rows, expert-major      */
    float *hg, *hu, *scratch1, *scratch2; /* (max_rows, D) caches and backward scratch        */
    moe_work work;
    int rows_out, rows_in;     /* the last forward's rows to / from OTHER ranks per exchange  */
    long long rows_sent, rows_received; /* rows sent to / received from OTHER ranks over every
                                           exchange: rows there and outputs back (forward),
                                           output gradients there, input gradients back    */
    moe_err err;
} moe_mpi_experts;

/* Collective. Splits L's routed experts over the ranks and attaches (L->runner): from now on
   L's forward and backward exchange rows with the other ranks, so every rank must call them
   the same number of times in the same order. L must be initialised (moe_layer_init or a
   model's block) for the tokens of one rank. MOE_ERR_INVALID_ARG on every rank when the rank
   count does not divide the experts, the ranks' layers differ, or the router is AoE. */
MOEDEF moe_status moe_mpi_experts_init(moe_mpi_experts *ep, moe_mpi *ctx, moe_layer *L);
MOEDEF void moe_mpi_experts_free(moe_mpi_experts *ep); /* detaches L->runner */
/* Every MoE layer of the model: eps (n_layers entries, the dense blocks' left zeroed). */
MOEDEF moe_status moe_mpi_experts_model_init(moe_mpi_experts *eps, moe_mpi *ctx, moe_model *m);
MOEDEF void moe_mpi_experts_model_free(moe_mpi_experts *eps, moe_model *m);
#endif /* MOE_MPI */

/* ============================================================================================
   >>moe:cuda_core  the CUDA twins of core, store and optim (MOE_CUDA)
   ============================================================================================
   Compiled only when MOE_CUDA is defined, and then the MOE_IMPLEMENTATION file must be a .cu
   file compiled by nvcc (link -lcublas). The CPU path stays the reference; every device
   function is named after its CPU twin with _cuda and takes device pointers. A build without
   MOE_CUDA is unchanged.
   Modes: MOE_CUDA_DETERMINISTIC (the default) sums every reduction in a fixed order without
   atomics (two runs are bit-identical); MOE_CUDA_FAST lets combine, gather and weight
   gradients accumulate with atomics and lets cuBLAS use its atomic kernels.
   TF32 stays off (cuBLAS's default math), so GEMMs stay comparable with the CPU's float32. */
#ifdef MOE_CUDA

typedef enum moe_cuda_mode { MOE_CUDA_DETERMINISTIC = 0, MOE_CUDA_FAST = 1 } moe_cuda_mode;

typedef struct moe_cuda {
    int device;         /* CUDA device ordinal                                          */
    moe_cuda_mode mode;
    void *cublas;       /* cublasHandle_t                                               */
    double *scalars;    /* (8) device scratch for single numbers (a loss mean, a norm)   */
    moe_err err;
} moe_cuda;

/* Selects `device`, creates the cuBLAS handle. No driver, no device or an old driver:
   MOE_ERR_NO_DEVICE with the runtime's own sentence in c->err (nothing else is touched, the
   CPU path keeps working). */
MOEDEF moe_status moe_cuda_init(moe_cuda *c, int device, moe_cuda_mode mode);
MOEDEF void moe_cuda_free(moe_cuda *c); /* safe on a zeroed or failed context */
/* Waits for the device; a failed kernel shows here as a status. */
MOEDEF moe_status moe_cuda_sync(moe_cuda *c);
MOEDEF moe_status moe_cuda_malloc(moe_cuda *c, void **dev, size_t bytes); /* zero-filled */
MOEDEF void moe_cuda_mfree(void *dev);
MOEDEF moe_status moe_cuda_upload(moe_cuda *c, void *dev, const void *host, size_t bytes);
MOEDEF moe_status moe_cuda_download(moe_cuda *c, void *host, const void *dev, size_t bytes);

/* The device copy of a store: the same flat buffers in the same order, laid out by the host
   store's tensor table (which stays on the host and must outlive this). */
typedef struct moe_store_cuda {
    const moe_store *host; /* the layout                                                  */
    size_t numel;
    float *params, *grads; /* (numel) device                                              */
    float *adam_m, *adam_v;/* (numel) device, NULL when the host store has no moments      */
    double *clip_part;     /* (chunks) the clipping's per-chunk sums                        */
} moe_store_cuda;

/* Allocates the device buffers for an allocated host store and uploads it (params and
   moments; gradients zero). */
MOEDEF moe_status moe_store_alloc_cuda(moe_store_cuda *d, moe_cuda *c, const moe_store *host);
MOEDEF void moe_store_free_cuda(moe_store_cuda *d);
/* host -> device: params and moments (after loading a checkpoint) */
MOEDEF moe_status moe_store_upload_cuda(moe_cuda *c, moe_store_cuda *d, const moe_store *host);
/* device -> host: params, grads and moments (before saving a checkpoint: the CPU writes the
   one checkpoint format, so a device run and a CPU run read each other's files) */
MOEDEF moe_status moe_store_download_cuda(moe_cuda *c, const moe_store_cuda *d, moe_store *host);
MOEDEF moe_status moe_store_zero_grad_cuda(moe_cuda *c, moe_store_cuda *d);
/* moe_adamw_step on the device: the same arithmetic per element */
MOEDEF moe_status moe_adamw_step_cuda(moe_cuda *c, moe_store_cuda *d, const moe_adamw_config *cfg, float lr,
                                      long long step);
/* moe_clip_grad_norm on the device: the same chunks of 2^14 summed in double in the same
   order, so the norm is the CPU's bit for bit. *norm (may be NULL) gets the norm before
   clipping. */
MOEDEF moe_status moe_clip_grad_norm_cuda(moe_cuda *c, moe_store_cuda *d, float max_norm, float *norm);

#endif /* MOE_CUDA */

/* ============================================================================================
   >>moe:cuda_kernels  the CUDA twins of matmul, kernels, attention, dispatch, router_topk
   ============================================================================================
   Device pointers everywhere; shapes and contracts as the CPU twin's (same name without
   _cuda). Every call only queues work on the default stream: a failed launch returns a status
   at once, a fault inside a kernel shows at the next moe_cuda_sync. */
#ifdef MOE_CUDA

/* GEMMs through cuBLAS (float32, no TF32) */
MOEDEF moe_status moe_matmul_forward_cuda(moe_cuda *c, float *out, const float *inp, const float *weight,
                                          const float *bias, int M, int K, int N);
MOEDEF moe_status moe_matmul_backward_cuda(moe_cuda *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                           const float *inp, const float *weight, int M, int K, int N);
MOEDEF moe_status moe_softmax_forward_cuda(moe_cuda *c, float *out, const float *inp, int rows, int n);
MOEDEF moe_status moe_softmax_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *out, int rows, int n);
MOEDEF moe_status moe_activation_forward_cuda(moe_cuda *c, float *out, const float *inp, size_t n, moe_activation act);
MOEDEF moe_status moe_activation_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *inp, size_t n,
                                               moe_activation act);
MOEDEF moe_status moe_swiglu_forward_cuda(moe_cuda *c, float *out, const float *gate, const float *up, size_t n);
MOEDEF moe_status moe_swiglu_backward_cuda(moe_cuda *c, float *dgate, float *dup, const float *dout, const float *gate,
                                           const float *up, size_t n);
MOEDEF moe_status moe_rmsnorm_forward_cuda(moe_cuda *c, float *out, float *rstd, const float *inp, const float *weight,
                                           int rows, int n, float eps);
MOEDEF moe_status moe_rmsnorm_backward_cuda(moe_cuda *c, float *dinp, float *dweight, const float *dout,
                                            const float *inp, const float *weight, const float *rstd, int rows, int n);
/* mean (host, may be NULL: then no wait) = the CPU twin's return value */
MOEDEF moe_status moe_crossentropy_forward_cuda(moe_cuda *c, float *losses, const float *logits, const int *targets,
                                                int rows, int V, double *mean);
MOEDEF moe_status moe_crossentropy_backward_cuda(moe_cuda *c, float *dlogits, const float *logits, const int *targets,
                                                 int rows, int V, float dloss);
/* the naive pair's arithmetic, one thread per (sequence, head, query row) */
MOEDEF moe_status moe_attention_forward_cuda(moe_cuda *c, float *out, float *att, const float *qkv, int B, int T, int d,
                                             int NH);
/* dqkv OVERWRITTEN, as the CPU's; dot: (B * NH * T) doubles of device scratch */
MOEDEF moe_status moe_attention_backward_cuda(moe_cuda *c, float *dqkv, const float *dout, const float *qkv,
                                              const float *att, int B, int T, int d, int NH, double *dot);
MOEDEF moe_status moe_rope_apply_cuda(moe_cuda *c, float *qkv, const float *cos_sin, int B, int T, int d, int NH,
                                      int inverse);

/* The assignment list on the device: the same arrays as moe_assign, each (cap), plus the
   offsets; a->n, T, E are mirrored on the host. */
MOEDEF moe_status moe_assign_alloc_cuda(moe_cuda *c, moe_assign *a, int cap, int T, int E);
MOEDEF void moe_assign_free_cuda(moe_assign *a);
/* moe_dispatch on the device (a stable counting sort without atomics). The raw list comes
   from a device router, so its ids are trusted: ids outside [0,T) / [0,E) are skipped. */
MOEDEF moe_status moe_dispatch_cuda(moe_cuda *c, moe_assign *a, const int *token, const int *expert, const int *slot,
                                    const float *weight, int n, int T, int E);
MOEDEF moe_status moe_gather_cuda(moe_cuda *c, float *xg, const float *x, const moe_assign *a, int d);
MOEDEF moe_status moe_gather_backward_cuda(moe_cuda *c, float *dx, const float *dxg, const moe_assign *a, int d);
MOEDEF moe_status moe_combine_forward_cuda(moe_cuda *c, float *y, const float *eout, const moe_assign *a, int d,
                                           int accumulate);
MOEDEF moe_status moe_combine_backward_cuda(moe_cuda *c, float *deout, float *dweight, const float *dy,
                                            const float *eout, const moe_assign *a, int d);
/* Softmax top-k routing of the standard router (no selection bias, capacity or noise):
   probs (T, E) -> topk (T, K) experts in rank order, gates (T, E) (zero off the chosen), and
   the raw list token-major (t, slot): raw_* (T * K). */
MOEDEF moe_status moe_topk_select_cuda(moe_cuda *c, int *topk, float *gates, int *raw_token, int *raw_expert,
                                       int *raw_slot, float *raw_weight, const float *probs, int T, int E, int K,
                                       int renormalize, float routed_scale);
/* d_gates (T, E) = the combine's dweight times routed_scale at each (token, expert), 0 elsewhere */
MOEDEF moe_status moe_gate_grads_cuda(moe_cuda *c, float *d_gates, const float *dweight, const moe_assign *a,
                                      float routed_scale);
/* d_logits (T, E) += the softmax top-k backward (the CPU's moe__topk_backward_token) */
MOEDEF moe_status moe_topk_backward_cuda(moe_cuda *c, float *d_logits, const float *d_gates, const float *gates,
                                         const float *probs, const int *topk, int T, int E, int K, int renormalize);

#endif /* MOE_CUDA */

/* ============================================================================================
   >>moe:cuda_layer  the CUDA twin of the MoE layer (MOE_CUDA): standard softmax top-k
   ============================================================================================
   The CPU layer (>>moe:layer) with the standard router family on the device: the linear
   router, softmax, top-k (renormalised or not, routed_scale), the counting sort, gather,
   SwiGLU or FFN experts grouped per expert (one cuBLAS GEMM per expert and matrix; the
   experts' row counts come back to the host once per forward), combine; backward in reverse.
   The host layer gives the config and the tensor ids; its store's device copy holds the
   weights. What the twin does not cover returns MOE_ERR_UNSUPPORTED at init: other router
   families, shared experts, capacity, selection bias, GW-MoE, HyperMoE, a separate router
   input, and the auxiliary losses (balance, z-loss): configure balance = MOE_BALANCE_NONE
   and z_coef = 0 for a device layer. */
#ifdef MOE_CUDA

typedef struct moe_layer_cuda {
    const moe_layer *host;        /* config and tensor ids                                   */
    int max_tokens, T;            /* capacity; tokens of the last forward                    */
    float *logits, *probs, *gates, *d_gates, *d_logits; /* (max_tokens, E) device            */
    int *topk;                    /* (max_tokens, K)                                         */
    int *raw_token, *raw_expert, *raw_slot; /* (max_tokens * K) the router's raw list        */
    float *raw_weight;
    moe_assign routed;            /* device arrays; n, T, E on the host                      */
    int *offset_host;             /* (E + 1) the experts' rows, copied back each forward     */
    float *xg, *hg, *hu, *h, *eout;         /* (cap, d) (cap, D) x3 (cap, d)                 */
    float *d_weight, *dxg, *deout, *dh, *dhg, *dhu; /* backward scratch, same shapes         */
    moe_err err;
} moe_layer_cuda;

/* Device buffers for up to max_tokens tokens of the host layer L (initialised, its store
   allocated). */
MOEDEF moe_status moe_layer_init_cuda(moe_layer_cuda *Lc, moe_cuda *c, const moe_layer *L, int max_tokens);
MOEDEF void moe_layer_free_cuda(moe_layer_cuda *Lc);
/* y (T, d) = MoE(x (T, d)), device pointers; weights from the device store d */
MOEDEF moe_status moe_layer_forward_cuda(moe_cuda *c, moe_layer_cuda *Lc, const moe_store_cuda *d, float *y,
                                         const float *x, int T);
/* dx (T, d) += dLoss/dx; gradients += into d->grads; x must be the forward's */
MOEDEF moe_status moe_layer_backward_cuda(moe_cuda *c, moe_layer_cuda *Lc, moe_store_cuda *d, float *dx,
                                          const float *dy, const float *x);

#endif /* MOE_CUDA */

/* ============================================================================================
   >>moe:cuda_model  the CUDA twin of the tiny transformer (MOE_CUDA)
   ============================================================================================
   moe_model_forward / moe_model_backward on the device for the models the CUDA layer covers:
   learned or rotary positions, dense SwiGLU blocks and MoE blocks with the standard softmax
   top-k router, no auxiliary losses (moe.balance = MOE_BALANCE_NONE, z_coef = 0), no router
   input (GRU / MLP), no GW-MoE, no HyperMoE. The host model gives the config and the tensor
   table; its parameters are copied to the device at init. A training step on the device:
     moe_model_forward_cuda, moe_model_backward_cuda, moe_clip_grad_norm_cuda(&mc.S),
     moe_adamw_step_cuda(&mc.S), moe_store_zero_grad_cuda(&mc.S);
   before a checkpoint or a CPU evaluation, moe_store_download_cuda(cu, &mc.S, &m.S). */
#ifdef MOE_CUDA

typedef struct moe_block_cuda {
    float *x, *ln1, *rstd1, *qkv, *att, *atty, *x2, *ln2, *rstd2, *hg, *hu, *h, *ffn; /* as moe_block's */
} moe_block_cuda;

typedef struct moe_model_cuda {
    const moe_model *host;   /* config, tensor table                                     */
    moe_store_cuda S;        /* the parameters, gradients and moments on the device        */
    moe_block_cuda *blocks;  /* (n_layers) host array of device pointers                  */
    moe_layer_cuda *layers;  /* (n_layers) the MoE blocks' device layers                  */
    int max_B, max_T, B, T, count; /* count: targets >= 0 in the last forward            */
    int *inputs, *targets;   /* (N) device                                                */
    float *x_final, *lnf, *rstd_f, *logits, *losses, *rope;
    float *d_res, *d_res2, *d_ln, *d_qkv, *d_atty, *d_logits, *dh, *dhg, *dhu;
    double *att_dot;         /* (B NH T) attention backward scratch                       */
    double loss;             /* mean cross-entropy of the last forward                    */
} moe_model_cuda;

/* Device buffers for batches of up to max_B x max_T of the host model m (initialised, with
   its weights), its store copied to the device. MOE_ERR_UNSUPPORTED names what the twin does
   not cover. */
MOEDEF moe_status moe_model_init_cuda(moe_model_cuda *mc, moe_cuda *c, const moe_model *m, int max_B, int max_T);
MOEDEF void moe_model_free_cuda(moe_model_cuda *mc);
/* inputs, targets: HOST arrays (B, T) as moe_model_forward's (targets may be NULL); sets
   mc->loss (waits for the device when there are targets) */
MOEDEF moe_status moe_model_forward_cuda(moe_cuda *c, moe_model_cuda *mc, const int *inputs, const int *targets, int B,
                                         int T);
/* gradients of loss * scale, accumulated into mc->S.grads */
MOEDEF moe_status moe_model_backward_cuda(moe_cuda *c, moe_model_cuda *mc, float scale);

#endif /* MOE_CUDA */

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
/* still reads its condition (a variable computed only for it is then not "set but unused") and
   keeps the block after it a block */
#define MOE__OMP_PARALLEL_IF(cond) if ((void)(cond), 1)
#define MOE__OMP_FOR_INNER
#define MOE__OMP_FOR_NOWAIT
#define MOE__OMP_FOR_N(n)
#define MOE__OMP_FOR_DYNAMIC_N(n) if ((void)(n), 1) /* reads n too; the loop after it is its body */
#define MOE__OMP_PARALLEL_IF_N(cond, n)
#endif

#if defined(__linux__)
#include <sys/mman.h> /* madvise: transparent huge pages for the large streamed buffers */
#define MOE__HAVE_MADVISE 1
#define MOE__MADV_HUGEPAGE 14 /* MADV_HUGEPAGE, which strict -std=c99 headers hide */
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int madvise(void *, size_t, int);
#endif
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h> /* fsync, for atomic checkpoint writes */
#define MOE__HAVE_FSYNC 1
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int fileno(FILE *); /* POSIX; hidden by strict -std=c99 headers */
#endif
#endif

/* a readable reference kept beside its fast twin: only the tests call it */
#if defined(__GNUC__) || defined(__clang__)
#define MOE__REF static __attribute__((unused))
#else
#define MOE__REF static
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

/* ============================================================================================
   >>moe:mask
   ============================================================================================ */

static moe_status moe__mask_check(moe_mask *k, const moe_store *s) {
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_STATE, "mask used before moe_mask_init");
    if (s->numel != k->numel || moe_store_fingerprint(s) != k->fingerprint)
        return moe_err_set(&k->err, MOE_ERR_SHAPE, "mask made for another parameter layout (%zu parameters, this store %zu)", k->numel, s->numel);
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_init(moe_mask *k, const moe_store *s, moe_mask_mode mode) {
    memset(k, 0, sizeof *k);
    if (mode != MOE_MASK_GRAD && mode != MOE_MASK_UPDATE) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "unknown mask mode %d", (int)mode);
    if (s->numel == 0) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "mask over an empty store");
    k->keep = (unsigned char *)moe__calloc(s->numel, 1);
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_NOMEM, "out of memory for a mask of %zu parameters", s->numel);
    memset(k->keep, 1, s->numel);
    k->numel = s->numel;
    k->fingerprint = moe_store_fingerprint(s);
    k->mode = mode;
    return MOE_OK;
}

MOE__IMPL void moe_mask_free(moe_mask *k) {
    MOE_FREE(k->keep);
    memset(k, 0, sizeof *k);
}

MOE__IMPL void moe_mask_fill(moe_mask *k, int keep) {
    if (k->keep) memset(k->keep, keep ? 1 : 0, k->numel);
}

static int moe__mask_find(moe_mask *k, const moe_store *s, const char *name) {
    int id = name ? moe_store_find(s, name) : -1;
    if (id < 0) moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "no tensor named '%s' to mask", name ? name : "(null)");
    return id;
}

MOE__IMPL moe_status moe_mask_set_tensor(moe_mask *k, const moe_store *s, const char *name, int keep) {
    int id;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if ((id = moe__mask_find(k, s, name)) < 0) return k->err.status;
    memset(k->keep + s->tensors[id].offset, keep ? 1 : 0, s->tensors[id].numel);
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_set_slice(moe_mask *k, const moe_store *s, const char *name, int axis,
                                        int index, int keep) {
    const moe_tensor *t;
    size_t inner = 1, outer = 1, o, i;
    int id, a;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if ((id = moe__mask_find(k, s, name)) < 0) return k->err.status;
    t = &s->tensors[id];
    if (axis < 0 || axis >= t->ndim)
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "tensor '%s' has %d dimensions, no axis %d", name, t->ndim, axis);
    if (index < 0 || index >= t->shape[axis])
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "index %d outside axis %d of tensor '%s' (size %d)", index, axis, name, t->shape[axis]);
    for (a = 0; a < axis; a++) outer *= (size_t)t->shape[a];
    for (a = axis + 1; a < t->ndim; a++) inner *= (size_t)t->shape[a];
    for (o = 0; o < outer; o++) {
        unsigned char *p = k->keep + t->offset + (o * (size_t)t->shape[axis] + (size_t)index) * inner;
        for (i = 0; i < inner; i++) p[i] = (unsigned char)(keep ? 1 : 0);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_set_rows(moe_mask *k, const moe_store *s, int id, const unsigned char *row_keep) {
    const moe_tensor *t;
    size_t cols, rows, r;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if (id < 0 || id >= s->count) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "no tensor with id %d to mask", id);
    t = &s->tensors[id];
    cols = (size_t)t->shape[t->ndim - 1];
    rows = cols ? t->numel / cols : 0;
    for (r = 0; r < rows; r++) memset(k->keep + t->offset + r * cols, row_keep[r] ? 1 : 0, cols);
    return MOE_OK;
}

MOE__IMPL size_t moe_mask_count(const moe_mask *k, const moe_store *s, int id) {
    size_t lo = 0, hi = k->numel, i, n = 0;
    if (!k->keep) return 0;
    if (id >= 0 && id < s->count) {
        lo = s->tensors[id].offset;
        hi = lo + s->tensors[id].numel;
    }
    for (i = lo; i < hi && i < k->numel; i++) n += k->keep[i];
    return n;
}

MOE__IMPL moe_status moe_mask_grads(const moe_mask *k, moe_store *s) {
    long long i, n = (long long)s->numel;
    if (!k->keep || s->numel != k->numel) return moe_err_set(&s->err, MOE_ERR_SHAPE, "mask made for another parameter layout");
    if (!s->grads) return moe_err_set(&s->err, MOE_ERR_STATE, "store has no gradients");
    MOE_OMP_FOR_IF(n > 32768)
    for (i = 0; i < n; i++)
        if (!k->keep[i]) s->grads[i] = 0.0f;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_step(moe_mask *k, moe_store *s, const moe_adamw_config *c, float lr,
                                   long long step, float max_norm, float *norm) {
    moe__adamw_consts kc;
    float nrm;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if (moe__adamw_prepare(s, c, lr, step, &kc) != MOE_OK) return moe_err_set(&k->err, s->err.status, "%s", s->err.msg);
    if (moe_mask_grads(k, s) != MOE_OK) return moe_err_set(&k->err, s->err.status, "%s", s->err.msg);
    nrm = moe_clip_grad_norm(s, max_norm);
    if (norm) *norm = nrm;
    /* MOE_MASK_GRAD: the plain step on the masked gradients (moments and decay still move a
       masked row); MOE_MASK_UPDATE: masked parameters and their moments stay */
    moe__adamw_apply(s, c, lr, &kc, k->mode == MOE_MASK_UPDATE ? k->keep : NULL);
    return MOE_OK;
}

#define MOE__MASK_MAGIC 0x4B53414Du /* "MASK" */
#define MOE__MASK_HEADER 24

MOE__IMPL size_t moe_mask_pack_bytes(const moe_mask *k) { return MOE__MASK_HEADER + (k->numel + 7) / 8; }

static void moe__mask_put(unsigned char *p, uint64_t v, int n) {
    int i;
    for (i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t moe__mask_get(const unsigned char *p, int n) {
    uint64_t v = 0;
    int i;
    for (i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

MOE__IMPL moe_status moe_mask_pack(const moe_mask *k, void *buf, size_t bytes) {
    unsigned char *p = (unsigned char *)buf;
    size_t i;
    if (!k->keep || !buf || bytes != moe_mask_pack_bytes(k)) return MOE_ERR_INVALID_ARG;
    memset(p, 0, bytes);
    moe__mask_put(p, MOE__MASK_MAGIC, 4);
    moe__mask_put(p + 4, (uint64_t)k->mode, 4);
    moe__mask_put(p + 8, (uint64_t)k->numel, 8);
    moe__mask_put(p + 16, k->fingerprint, 8);
    for (i = 0; i < k->numel; i++)
        if (k->keep[i]) p[MOE__MASK_HEADER + i / 8] |= (unsigned char)(1u << (i % 8));
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_unpack(moe_mask *k, const void *buf, size_t bytes) {
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t mode;
    size_t i;
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_STATE, "mask unpacked before moe_mask_init");
    if (!buf || bytes < MOE__MASK_HEADER || moe__mask_get(p, 4) != MOE__MASK_MAGIC)
        return moe_err_set(&k->err, MOE_ERR_FORMAT, "not a packed mask");
    mode = moe__mask_get(p + 4, 4);
    if (moe__mask_get(p + 8, 8) != (uint64_t)k->numel || moe__mask_get(p + 16, 8) != k->fingerprint)
        return moe_err_set(&k->err, MOE_ERR_SHAPE, "packed mask made for another parameter layout");
    if (bytes != moe_mask_pack_bytes(k)) return moe_err_set(&k->err, MOE_ERR_FORMAT, "packed mask of %zu bytes, expected %zu", bytes, moe_mask_pack_bytes(k));
    if (mode != MOE_MASK_GRAD && mode != MOE_MASK_UPDATE) return moe_err_set(&k->err, MOE_ERR_FORMAT, "packed mask with unknown mode %u", (unsigned)mode);
    k->mode = (moe_mask_mode)mode;
    for (i = 0; i < k->numel; i++) k->keep[i] = (unsigned char)((p[MOE__MASK_HEADER + i / 8] >> (i % 8)) & 1u);
    return MOE_OK;
}
/* ============================================================================================
   >>moe:ckpt
   ============================================================================================ */

MOE__IMPL uint32_t moe_crc32(uint32_t crc, const void *data, size_t n) {
    /* slicing-by-8 (Kounavis and Berry, 2008): eight independent lookups per 8 bytes instead of
       a chain of eight dependent ones. The tables are built per call (8 KB, about 4K steps): no
       global state to race on. Byte order is explicit, so the result is the same on any host. */
    const unsigned char *p = (const unsigned char *)data;
    uint32_t t[8][256];
    size_t i;
    int k;
    for (i = 0; i < 256; i++) {
        uint32_t c = (uint32_t)i;
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        t[0][i] = c;
    }
    for (i = 0; i < 256; i++)
        for (k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        crc = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
              t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    }
    for (; n > 0; n--, p++) crc = t[0][(crc ^ *p) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

#ifndef MOE_NO_STDIO
#include <errno.h>
#ifdef MOE__HAVE_FSYNC
#include <fcntl.h>    /* open(O_EXCL): a temporary name no other writer holds */
#include <sys/stat.h> /* fstat: a directory is not a checkpoint */
#endif
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

/* ---- the real calls behind moe_ckpt_io_default() ---- */
#ifdef MOE__HAVE_FSYNC
/* a descriptor travels as a handle shifted by one, so descriptor 0 is not NULL */
#define MOE__FD(file) ((int)((intptr_t)(file) - 1))
static void *moe__io_create(void *ctx, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0666);
    (void)ctx;
    return fd < 0 ? NULL : (void *)((intptr_t)fd + 1);
}
static int moe__io_write(void *ctx, void *file, const void *buf, size_t n) {
    const char *p = (const char *)buf;
    (void)ctx;
    while (n > 0) { /* write(2) may write less than asked */
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t k = write(MOE__FD(file), p, chunk);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            if (k == 0) errno = EIO;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}
static int moe__io_sync(void *ctx, void *file) { (void)ctx; return fsync(MOE__FD(file)) == 0 ? 0 : -1; }
static int moe__io_close(void *ctx, void *file) { (void)ctx; return close(MOE__FD(file)) == 0 ? 0 : -1; }
static int moe__io_sync_dir(void *ctx, const char *dir) {
    int fd = open(dir, O_RDONLY), rc;
    (void)ctx;
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc == 0 ? 0 : -1;
}
#else
static void *moe__io_create(void *ctx, const char *path) { (void)ctx; return fopen(path, "wb"); }
static int moe__io_write(void *ctx, void *file, const void *buf, size_t n) {
    (void)ctx;
    return fwrite(buf, 1, n, (FILE *)file) == n ? 0 : -1;
}
static int moe__io_sync(void *ctx, void *file) { (void)ctx; return fflush((FILE *)file) == 0 ? 0 : -1; }
static int moe__io_close(void *ctx, void *file) { (void)ctx; return fclose((FILE *)file) == 0 ? 0 : -1; }
static int moe__io_sync_dir(void *ctx, const char *dir) { (void)ctx; (void)dir; return 0; }
#endif
static int moe__io_rename(void *ctx, const char *from, const char *to) {
    (void)ctx;
#ifdef _WIN32
    remove(to); /* rename() does not replace files there */
#endif
    return rename(from, to) == 0 ? 0 : -1;
}
static int moe__io_remove(void *ctx, const char *path) { (void)ctx; return remove(path) == 0 ? 0 : -1; }

MOE__IMPL moe_ckpt_io moe_ckpt_io_default(void) {
    moe_ckpt_io io;
    io.create = moe__io_create;
    io.write = moe__io_write;
    io.sync = moe__io_sync;
    io.close = moe__io_close;
    io.rename = moe__io_rename;
    io.remove = moe__io_remove;
    io.sync_dir = moe__io_sync_dir;
    io.ctx = NULL;
    return io;
}

/* a save in progress: the temporary file, the running CRC, the first error */
typedef struct moe__ckpt_out {
    const moe_ckpt_io *io;
    moe_ckpt_io own;    /* moe__atomic_open: the real calls, io points here */
    void *file;
    uint32_t crc;
    int failed; /* 0, or the errno of the first failure (EIO when the hook left none) */
} moe__ckpt_out;

static void moe__ckpt_fail(moe__ckpt_out *o) {
    if (!o->failed) o->failed = errno ? errno : EIO;
}

/* writes n bytes and folds them into the running CRC; nothing after a failure */
static void moe__write(moe__ckpt_out *o, const void *p, size_t n) {
    if (o->failed || n == 0) return;
    o->crc = moe_crc32(o->crc, p, n);
    errno = 0;
    if (o->io->write(o->io->ctx, o->file, p, n) != 0) moe__ckpt_fail(o);
}

/* Creates the temporary file for `path`: its name goes to tmp (cap bytes); NULL with errno. */
static void *moe__ckpt_create_tmp(const moe_ckpt_io *io, const char *path, char *tmp, size_t cap) {
#ifdef MOE__HAVE_FSYNC
    /* exclusive creation of a name with our process id (and a counter for several stores of
       one process); mkstemp would do the same but ignores the umask (mode 0600) */
    int k;
    for (k = 0; k < 1000; k++) {
        void *f;
        snprintf(tmp, cap, "%s.%ld-%d.tmp", path, (long)getpid(), k);
        errno = 0;
        f = io->create(io->ctx, tmp);
        if (f) return f;
        if (errno != EEXIST) return NULL;
    }
    return NULL;
#else
    snprintf(tmp, cap, "%s.tmp", path);
    return io->create(io->ctx, tmp);
#endif
}

/* the directory holding `path` ("." for a bare name) */
static void moe__ckpt_dir_of(const char *path, char *dir, size_t cap) {
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, cap, ".");
    else snprintf(dir, cap, "%.*s", (int)(slash - path) + (slash == path), path);
}

/* Atomic replacement of a file, for every writer in moe.h (checkpoints, safetensors, GGUF):
   a temporary file of a name no other writer holds beside path, through io (NULL: the real
   calls); moe__atomic_write appends (0 once anything failed); moe__atomic_close syncs, closes,
   renames over path and syncs the directory when ok, else removes it. */
static moe_status moe__atomic_open(moe__ckpt_out *o, const moe_ckpt_io *io, const char *path, char *tmp, size_t cap,
                                   moe_err *err) {
    memset(o, 0, sizeof *o);
    o->own = moe_ckpt_io_default();
    o->io = io ? io : &o->own;
    if (strlen(path) + 32 > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "path '%.64s...' is too long", path);
    o->file = moe__ckpt_create_tmp(o->io, path, tmp, cap);
    return o->file ? MOE_OK : moe_err_set(err, MOE_ERR_IO, "cannot create a temporary file beside '%s' (%s)", path, strerror(errno ? errno : EIO));
}

static int moe__atomic_write(moe__ckpt_out *o, const void *p, size_t n) {
    moe__write(o, p, n);
    return !o->failed;
}

static moe_status moe__atomic_close(moe__ckpt_out *o, int ok, const char *tmp, const char *path, moe_err *err) {
    char dir[4096];
    const moe_ckpt_io *io = o->io;
    if (!ok && !o->failed) o->failed = EIO;
    errno = 0;
    if (!o->failed && io->sync(io->ctx, o->file) != 0) moe__ckpt_fail(o);
    errno = 0;
    if (io->close(io->ctx, o->file) != 0) moe__ckpt_fail(o);
    if (o->failed) {
        io->remove(io->ctx, tmp);
        return moe_err_set(err, MOE_ERR_IO, "writing '%s' failed (%s; disk full?); '%s' is unchanged", tmp, strerror(o->failed), path);
    }
    errno = 0;
    if (io->rename(io->ctx, tmp, path) != 0) {
        int e = errno ? errno : EIO;
        io->remove(io->ctx, tmp);
        return moe_err_set(err, MOE_ERR_IO, "cannot rename '%s' to '%s' (%s); '%s' is unchanged", tmp, path, strerror(e), path);
    }
    /* the rename is durable only once the directory is synced; a failure there is no error:
       the new file is already in place (SQLite does the same) */
    moe__ckpt_dir_of(path, dir, sizeof dir);
    io->sync_dir(io->ctx, dir);
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                         long long step, const void *config, size_t config_bytes,
                                         const void *state, size_t state_bytes, moe_err *err) {
    return moe_checkpoint_save_ex(path, s, with_moments, step, config, config_bytes, state, state_bytes, NULL, err);
}

MOE__IMPL moe_status moe_checkpoint_save_ex(const char *path, const moe_store *s, int with_moments,
                                            long long step, const void *config, size_t config_bytes,
                                            const void *state, size_t state_bytes,
                                            const moe_ckpt_io *io, moe_err *err) {
    unsigned char h[MOE__CKPT_HEADER], tail[4];
    char tmp[4096];
    moe__ckpt_out o;
    moe_status st;
    if (!moe__little_endian()) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (!path || !s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint save needs a path and an allocated store");
    if (with_moments && (!s->adam_m || !s->adam_v)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint with moments asked for, but the store has no optimizer moments");
    if ((config_bytes && !config) || (state_bytes && !state)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint blob size given without data");
    if (strlen(path) + 32 > sizeof tmp) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint path is too long");
    if (io && (!io->create || !io->write || !io->sync || !io->close || !io->rename || !io->remove || !io->sync_dir))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint I/O hooks: every function must be set (start from moe_ckpt_io_default())");
    memset(h, 0, sizeof h);
    memcpy(h, MOE__CKPT_MAGIC, 8);
    moe__put_u32(h + 8, MOE_CKPT_VERSION);
    moe__put_u32(h + 12, with_moments ? 1u : 0u);
    moe__put_u64(h + 16, moe_store_fingerprint(s));
    moe__put_u64(h + 24, (uint64_t)s->numel);
    moe__put_u64(h + 32, (uint64_t)step);
    moe__put_u64(h + 40, (uint64_t)config_bytes);
    moe__put_u64(h + 48, (uint64_t)state_bytes);
    if ((st = moe__atomic_open(&o, io, path, tmp, sizeof tmp, err)) != MOE_OK) return st;
    moe__write(&o, h, sizeof h);
    moe__write(&o, config, config_bytes);
    moe__write(&o, state, state_bytes);
    moe__write(&o, s->params, s->numel * sizeof(float));
    if (with_moments) {
        moe__write(&o, s->adam_m, s->numel * sizeof(float));
        moe__write(&o, s->adam_v, s->numel * sizeof(float));
    }
    moe__put_u32(tail, o.crc);
    moe__write(&o, tail, 4);
    return moe__atomic_close(&o, 1, tmp, path, err);
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
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open checkpoint '%s' (%s)", path, strerror(errno));
#ifdef MOE__HAVE_FSYNC
    {
        struct stat st;
        if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
            fclose(f);
            return moe_err_set(err, MOE_ERR_IO, "'%s' is a directory, not a checkpoint file", path);
        }
    }
#endif
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

/* The stored floats (params, then m and v when present) as a model may use them: parameters
   finite and within MOE_CKPT_MAX_ABS, moments finite, v >= 0. Names the first bad value. */
static moe_status moe__ckpt_check_values(const char *path, const moe_store *s, const unsigned char *p, int has_moments, moe_err *err) {
    static const char *const what[3] = {"parameter", "first Adam moment", "second Adam moment"};
    size_t i, n = s->numel;
    int k, t;
    for (k = 0; k < (has_moments ? 3 : 1); k++)
        for (i = 0; i < n; i++) {
            float v;
            char shown[32];
            memcpy(&v, p + ((size_t)k * n + i) * sizeof(float), sizeof v); /* the blob need not be aligned */
            if (k == 0 ? (v == v && v >= -MOE_CKPT_MAX_ABS && v <= MOE_CKPT_MAX_ABS) : k == 1 ? isfinite(v) : (isfinite(v) && v >= 0.0f)) continue;
            if (v != v) snprintf(shown, sizeof shown, "NaN");
            else snprintf(shown, sizeof shown, "%g", (double)v);
            for (t = 0; t + 1 < s->count && s->tensors[t + 1].offset <= i; t++) {}
            return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds the %s %s in '%s' (element %zu): a diverged run or a damaged file; it is not loaded",
                               path, what[k], shown, s->count ? s->tensors[t].name : "?", s->count ? i - s->tensors[t].offset : i);
        }
    return MOE_OK;
}

/* The load behind moe_checkpoint_load, on a file already read and verified by moe__ckpt_read
   (b, info): a model file's loader checks the record and loads the values from one read. */
static moe_status moe__ckpt_load_bytes(const char *path, moe_store *s, long long *step, const unsigned char *b,
                                       const moe_ckpt_info *info, const void *expect_config, void *config_out,
                                       size_t config_bytes, void *state_out, size_t state_bytes, moe_err *err) {
    const unsigned char *p;
    size_t nb;
    moe_status st = MOE_ERR_FORMAT;
    if (info->fingerprint != moe_store_fingerprint(s) || info->numel != (uint64_t)s->numel)
        moe_err_set(err, st, "'%s' holds a different model layout (fingerprint or size differs from this store)", path);
    else if ((expect_config || config_out) && info->config_bytes != (uint64_t)config_bytes)
        moe_err_set(err, st, "'%s' has a %llu-byte config, expected %zu", path, (unsigned long long)info->config_bytes, config_bytes);
    else if (expect_config && config_bytes && memcmp(b + MOE__CKPT_HEADER, expect_config, config_bytes) != 0)
        moe_err_set(err, st, "'%s' was saved with a different config", path);
    else if (state_out && info->state_bytes != (uint64_t)state_bytes)
        moe_err_set(err, st, "'%s' has %llu bytes of state, expected %zu", path, (unsigned long long)info->state_bytes, state_bytes);
    else
        st = MOE_OK;
    if (st == MOE_OK) st = moe__ckpt_check_values(path, s, b + MOE__CKPT_HEADER + info->config_bytes + info->state_bytes, info->has_moments, err);
    if (st != MOE_OK) return st;
    p = b + MOE__CKPT_HEADER;
    if (config_out && config_bytes) memcpy(config_out, p, config_bytes);
    p += info->config_bytes;
    if (state_out && state_bytes) memcpy(state_out, p, state_bytes);
    p += info->state_bytes;
    nb = s->numel * sizeof(float);
    memcpy(s->params, p, nb);
    p += nb;
    if (info->has_moments && s->adam_m && s->adam_v) {
        memcpy(s->adam_m, p, nb);
        memcpy(s->adam_v, p + nb, nb);
    } else if (s->adam_m && s->adam_v) { /* fresh moments for a store that has them */
        memset(s->adam_m, 0, nb);
        memset(s->adam_v, 0, nb);
    }
    if (step) *step = info->step;
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_load(const char *path, moe_store *s, long long *step,
                                         const void *expect_config, void *config_out,
                                         size_t config_bytes, void *state_out, size_t state_bytes,
                                         moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_ckpt_info info;
    moe_status st;
    if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint load needs an allocated store");
    st = moe__ckpt_read(path, &b, &len, &info, err);
    if (st != MOE_OK) return st;
    st = moe__ckpt_load_bytes(path, s, step, b, &info, expect_config, config_out, config_bytes, state_out, state_bytes, err);
    MOE_FREE(b);
    return st;
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

/* the MOE__LANES partial sums of one dot product, added by halving */
static float moe__lanes_sum(float *acc) {
    int h, k;
    for (h = MOE__LANES / 2; h >= 1; h /= 2)
        for (k = 0; k < h; k++) acc[k] += acc[k + h];
    return acc[0];
}

/* one dot product in MOE__LANES lanes (the router's combine backward; decoding's one-column
   reference of moe__dot_lanes4 and its last N % 4 columns) */
static float moe__dot_lanes(const float *x, const float *w, int K) {
    float acc[MOE__LANES];
    int u, k;
    for (k = 0; k < MOE__LANES; k++) acc[k] = 0.0f;
    for (u = 0; u + MOE__LANES <= K; u += MOE__LANES)
        for (k = 0; k < MOE__LANES; k++) acc[k] += x[u + k] * w[u + k];
    for (k = 0; u + k < K; k++) acc[k] += x[u + k] * w[u + k];
    return moe__lanes_sum(acc);
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
        float *o = deout + (size_t)i * d, w = a->weight[i];
        int j;
        for (j = 0; j < d; j++) o[j] = w * g[j];
        if (dweight) dweight[i] = moe__dot_lanes(g, e, d); /* lanes: a single running sum would not vectorize */
    }
}

/* ============================================================================================
   >>moe:router
   ============================================================================================
   THE HOOKS, family by family (each defined in its own section below this one). A hook
   takes the layer; T is the forward's token count; t a token. */
/* the linear router, read by every family but AoE (>>moe:router_topk) */
static void moe__linear_router_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__linear_router_logits(moe_layer *L, const moe_store *s, const float *rin, int T);
static void moe__linear_router_backward(moe_layer *L, moe_store *s, float *drin, const float *rin);
/* softmax / sigmoid top-k (>>moe:router_topk) */
static void moe__topk_select(moe_layer *L, const moe_store *s, int t);
static int moe__topk_assign(moe_layer *L, int T, int dropless);
static void moe__topk_backward_token(moe_layer *L, int t);
static void moe__softmax_backward_token(moe_layer *L, int t);
static void moe__sigmoid_probs(moe_layer *L, int T);
static void moe__topk_passthrough_forward(moe_layer *L, float *y, const float *x, int T);
static void moe__topk_passthrough_backward(moe_layer *L, float *dx, const float *dy, const float *x);
static void moe__topk_passthrough_gates_backward(moe_layer *L);
static void moe__sigmoid_backward_token(moe_layer *L, int t);
static void moe__sigmoid_norm_probs(const moe_layer *L, int t, float *out);
static void moe__sigmoid_mean_prob_backward(moe_layer *L, int t);
/* noisy top-k (>>moe:router_noisy) */
static int moe__noisy_alloc(moe_layer *L);
static void moe__noisy_free(moe_layer *L);
static void moe__noisy_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__noisy_scores(moe_layer *L, const moe_store *s, const float *rin, const float *noise, int T);
static void moe__noisy_select(moe_layer *L, int t);
static void moe__noisy_aux(moe_layer *L, int T);
static void moe__noisy_aux_backward(moe_layer *L, float scale);
static void moe__noisy_backward_token(moe_layer *L, int t);
static void moe__noisy_backward(moe_layer *L, moe_store *s, float *drin, const float *rin);
/* expert choice (>>moe:router_ec) */
static int moe__ec_alloc(moe_layer *L);
static void moe__ec_free(moe_layer *L);
static int moe__ec_assign(moe_layer *L, int T);
/* AoE (>>moe:router_aoe) */
static int moe__aoe_alloc(moe_layer *L);
static void moe__aoe_free(moe_layer *L);
static void moe__aoe_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__aoe_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T);
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s);
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s);
static void moe__aoe_backward(moe_layer *L, moe_store *s, float *dx, const float *x);
/* GW-MoE broadcast, an extension of softmax top-k (>>moe:router_gw) */
static int moe__gw_alloc(moe_layer *L);
static void moe__gw_free(moe_layer *L);
static void moe__gw_mark(moe_layer *L, int T, const moe_layer_args *a);
static int moe__gw_assign_token(moe_layer *L, int t, int n);
static void moe__gw_output_forward(moe_layer *L, float *y, const float *x, int T);
static void moe__gw_output_backward(moe_layer *L, float *dx, const float *dy, const float *x);
static void moe__gw_backward_token(moe_layer *L, int t);
/* HyperMoE, an extension of any family (>>moe:router_hyper) */
static int moe__hyper_alloc(moe_layer *L);
static void moe__hyper_free(moe_layer *L);
static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix);
static void moe__hyper_init_weights(moe_layer *L, moe_store *s, moe_rng *rng);
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T);
static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x);

/* ---- helpers the families share ---- */

/* ptr = count zeroed objects of type; 1 when it worked (chains with &&: after a failure the
   remaining pointers stay NULL, so a free function can free them all) */
#define MOE__ALLOC(ptr, count, type) (((ptr) = (type *)moe__calloc((size_t)(count), sizeof(type))) != NULL)

/* declares one of the layer's tensors, `prefix` + name; the first failure stays in L->err */
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

static float moe__softplus(float x) { return (x > 0.0f ? x : 0.0f) + log1pf(expf(-fabsf(x))); }

/* 1 when score a (index ia) ranks above score b (index ib): larger first, ties to the lower
   index, NaN below every number, so the order is total and a pick is always an index */
static int moe__ranks_above(float a, int ia, float b, int ib) {
    if (a != a || b != b) return (b != b) && (a == a || ia < ib);
    return a > b || (a == b && ia < ib);
}

/* idx[0..k) = indices of the k largest scores, descending; ties go to the lower index (k <= E).
   The readable reference: each pick is the best entry that ranks below the previous pick
   (k passes over the row). The forward refuses non-finite logits before any selection; the
   total order keeps both versions in bounds even so. */
MOE__REF void moe__topk_row_naive(const float *score, int E, int k, int *idx) {
    int s, j;
    for (s = 0; s < k; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0 && !moe__ranks_above(score[idx[s - 1]], idx[s - 1], score[j], j)) continue;
            if (best < 0 || moe__ranks_above(score[j], j, score[best], best)) best = j;
        }
        idx[s] = best;
    }
}

/* The same picks in one pass: idx holds the best so far in order, and an entry that ranks
   below the k-th costs one comparison (E = 64, k = 8: a layer's selection for 4096 tokens
   took 2.8 ms instead of 8.1). The order is total, so the result is the reference's exactly. */
static void moe__topk_row(const float *score, int E, int k, int *idx) {
    int n = 0, j, s;
    for (j = 0; j < E; j++) {
        if (n == k && !moe__ranks_above(score[j], j, score[idx[k - 1]], idx[k - 1])) continue;
        s = n < k ? n++ : k - 1;
        for (; s > 0 && moe__ranks_above(score[j], j, score[idx[s - 1]], idx[s - 1]); s--) idx[s] = idx[s - 1];
        idx[s] = j;
    }
}

static int moe__float_desc(const void *pa, const void *pb) {
    float a = *(const float *)pa, b = *(const float *)pb;
    return a > b ? -1 : a < b;
}

static int moe__int_cmp(const void *pa, const void *pb) {
    int a = *(const int *)pa, b = *(const int *)pb;
    return a < b ? -1 : a > b;
}

/* CV^2 = var / (mean^2 + 1e-10) of x (n >= 2), var the population variance (divided by n)
   or the unbiased one (by n - 1); times coef, and its gradient dx (n) */
static float moe__cv2(const float *x, int n, float coef, float *dx, int unbiased) {
    double m = 0.0, var = 0.0, den, div = unbiased ? (double)(n - 1) : (double)n;
    int i;
    for (i = 0; i < n; i++) m += x[i];
    m /= n;
    for (i = 0; i < n; i++) var += (x[i] - m) * (x[i] - m);
    var /= div;
    den = m * m + 1e-10;
    if (dx)
        for (i = 0; i < n; i++)
            dx[i] = (float)(coef * ((2.0 * (x[i] - m) / div) * den - var * 2.0 * m / n) / (den * den));
    return (float)(coef * var / den);
}

static double moe__entropy(const float *p, int n) {
    double h = 0.0;
    int i;
    for (i = 0; i < n; i++)
        if (p[i] > 0.0f) h -= (double)p[i] * log((double)p[i]);
    return h;
}

/* ---- THE DISPATCHER: one switch per hook, the only code that reads cfg.router ----------------
   A switch rather than a table of function pointers: the families share most hooks (the linear
   router serves four of them, softmax top-k's selection serves sigmoid and AoE, its backward
   serves expert choice), a case list says so in one line, and the extensions (GW-MoE,
   HyperMoE, the router input) combine with any kind, which a table indexed by the kind cannot
   express. */

static moe_status moe__router_validate(const moe_layer_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    switch (c->router) {
    case MOE_ROUTER_AOE:
        if (c->aoe_rank <= 0 || c->expert != MOE_EXPERT_SWIGLU || c->router_bias || c->router_dim > 0)
            return moe_err_set(err, bad, "AoE needs aoe_rank > 0 and SwiGLU experts, and has no router (no router_bias, no router_input)");
        if ((double)c->n_experts * c->aoe_rank * (c->d > c->d_ff ? c->d : c->d_ff) > 4e9)
            return moe_err_set(err, bad, "aoe_rank %d is too large for %d experts", c->aoe_rank, c->n_experts);
        break;
    case MOE_ROUTER_NOISY_TOPK:
        if (c->top_k >= c->n_experts)
            return moe_err_set(err, bad, "noisy top-k needs top_k < n_experts (its load estimate compares with the (k+1)-th logit); got k=%d, E=%d", c->top_k, c->n_experts);
        break;
    case MOE_ROUTER_EXPERT_CHOICE:
        if (c->capacity_factor != 0.0f)
            return moe_err_set(err, bad, "expert-choice takes its capacity from ec_capacity_factor (or top_k): each expert keeps ceil(cf*T/E) tokens; leave capacity_factor at 0");
        break;
    default: break;
    }
    if (c->drop_passthrough && (c->capacity_factor <= 0.0f || c->router == MOE_ROUTER_EXPERT_CHOICE))
        return moe_err_set(err, bad, "drop_passthrough needs a token-choice router with capacity (capacity_factor > 0)");
    if (c->selection_bias && c->router != MOE_ROUTER_TOPK && c->router != MOE_ROUTER_SIGMOID)
        return moe_err_set(err, bad, "selection_bias applies to the softmax and sigmoid top-k routers");
    if (c->ec_capacity_factor != 0.0f && c->router != MOE_ROUTER_EXPERT_CHOICE)
        return moe_err_set(err, bad, "ec_capacity_factor applies to the expert-choice router only (token-choice routers use capacity_factor)");
    if (c->gw_threshold > 0.0f && c->router != MOE_ROUTER_TOPK)
        return moe_err_set(err, bad, "GW-MoE broadcast needs the softmax top-k router (MOE_ROUTER_TOPK)");
    return MOE_OK;
}

/* a token's routing depends on that token alone (expert choice ranks tokens against each other) */
static int moe__router_is_causal(const moe_layer_config *c) { return c->router != MOE_ROUTER_EXPERT_CHOICE; }
/* training draws N(0, 1) routing noise (moe_layer_args.noise) */
static int moe__router_draws_noise(const moe_layer_config *c) { return c->router == MOE_ROUTER_NOISY_TOPK; }
/* the router declares the routed experts' gate (AoE's factorised w_gate_in, w_gate_out) */
static int moe__router_owns_expert_gate(const moe_layer_config *c) { return c->router == MOE_ROUTER_AOE; }
/* parameters of one routed expert that a token leaves idle when it does not choose the expert
   (AoE: every expert's W_in runs for every token) */
static size_t moe__router_idle_expert_params(const moe_layer_config *c) {
    if (c->router == MOE_ROUTER_AOE) return 2 * (size_t)c->d * c->d_ff + (size_t)c->d_ff * c->aoe_rank;
    return (size_t)(c->expert == MOE_EXPERT_SWIGLU ? 3 : 2) * c->d * c->d_ff + (c->expert_bias ? (size_t)c->d_ff + c->d : 0);
}

/* rows of the routed assignment list: token choice needs T K; expert choice
   E ceil(cf T / E) <= ceil(cf) T + E (cf = top_k by default); GW broadcast T E */
static int moe__router_list_rows(const moe_layer_config *c, int max_tokens) {
    int per_token = c->top_k;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && c->ec_capacity_factor > 0.0f) per_token = (int)ceil(c->ec_capacity_factor);
    /* an expert takes a token at most once (expert choice caps C at T) */
    if (c->gw_threshold > 0.0f || per_token > c->n_experts) per_token = c->n_experts;
    return max_tokens * per_token + c->n_experts;
}

/* the router's tensors: they come first in the layer's part of the store */
static void moe__router_declare(moe_layer *L, moe_store *s, const char *prefix) {
    switch (L->cfg.router) {
    case MOE_ROUTER_AOE: moe__aoe_declare(L, s, prefix); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe__linear_router_declare(L, s, prefix);
        moe__noisy_declare(L, s, prefix);
        break;
    default: moe__linear_router_declare(L, s, prefix); break;
    }
}

/* the extensions' tensors: after the experts' (the store's order is the checkpoint layout) */
static void moe__router_declare_extensions(moe_layer *L, moe_store *s, const char *prefix) {
    if (L->cfg.hyper) moe__hyper_declare(L, s, prefix);
}

/* the families' and extensions' buffers, sized for max_tokens; 0 when out of memory */
static int moe__router_alloc(moe_layer *L) {
    int ok = moe__gw_alloc(L) && /* GW's per-token flags are read by every token-choice family */
             (!L->cfg.selection_bias || MOE__ALLOC(L->selection_scores, (size_t)L->max_tokens * L->cfg.n_experts, float)) &&
             (!L->cfg.drop_passthrough || (MOE__ALLOC(L->passthrough, L->max_tokens, float) &&
                                           MOE__ALLOC(L->d_passthrough, L->max_tokens, float)));
    switch (L->cfg.router) {
    case MOE_ROUTER_NOISY_TOPK: ok = ok && moe__noisy_alloc(L); break;
    case MOE_ROUTER_EXPERT_CHOICE: ok = ok && moe__ec_alloc(L); break;
    case MOE_ROUTER_AOE: ok = ok && moe__aoe_alloc(L); break;
    default: break;
    }
    return ok && (!L->cfg.hyper || moe__hyper_alloc(L));
}

static void moe__router_free(moe_layer *L) {
    MOE_FREE(L->selection_scores); MOE_FREE(L->passthrough); MOE_FREE(L->d_passthrough);
    L->selection_scores = L->passthrough = L->d_passthrough = NULL;
    moe__gw_free(L);
    moe__noisy_free(L);
    moe__ec_free(L);
    moe__aoe_free(L);
    moe__hyper_free(L);
}

/* draws in a fixed order: HyperMoE's tensors, then the router (a linear router's weight or
   AoE's gate factors); biases and the noise projection start at zero */
static void moe__router_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    float *w = moe_store_param(s, L->id_router_w), *b = moe_store_param(s, L->id_router_b);
    size_t i;
    if (L->cfg.hyper) moe__hyper_init_weights(L, s, rng);
    if (w)
        for (i = 0; i < s->tensors[L->id_router_w].numel; i++) w[i] = L->cfg.router_init_std * moe_rng_normal(rng);
    if (b) memset(b, 0, s->tensors[L->id_router_b].numel * sizeof(float));
    if (L->id_selection_bias >= 0) memset(moe_store_param(s, L->id_selection_bias), 0, sizeof(float) * (size_t)L->cfg.n_experts);
    switch (L->cfg.router) {
    case MOE_ROUTER_AOE: moe__aoe_init_weights(L, s, rng); break;
    case MOE_ROUTER_NOISY_TOPK: {
        float *wn = moe_store_param(s, L->noisy.id_w_noise);
        memset(wn, 0, s->tensors[L->noisy.id_w_noise].numel * sizeof(float)); /* Shazeer: zero */
        break;
    }
    default: break;
    }
}

/* logits, lse, probabilities (and noisy top-k's H); a non-finite logit (or H) is an error */
static moe_status moe__router_scores(moe_layer *L, const moe_store *s, const float *x, const float *rin,
                                     const moe_layer_args *a, int T) {
    int E = L->cfg.n_experts, t;
    size_t i, TE = (size_t)T * E;
    if (L->cfg.router == MOE_ROUTER_AOE)
        moe__aoe_logits(L, s, x, T);
    else
        moe__linear_router_logits(L, s, rin, T);
    for (i = 0; i < TE; i++)
        if (!isfinite(L->logits[i]))
            return moe_err_set(&L->err, MOE_ERR_NUMERIC, "router logit of token %d for expert %d is %g: the router's parameters "
                               "or its input are not finite (a diverged run?); nothing was routed",
                               (int)(i / (size_t)E), (int)(i % (size_t)E), (double)L->logits[i]);
    MOE_OMP_FOR_IF((double)T * E > 1e5) /* per token: the same bits for any thread count */
    for (t = 0; t < T; t++) {
        const float *z = L->logits + (size_t)t * E;
        float mx = -FLT_MAX;
        double sum = 0.0;
        int e;
        for (e = 0; e < E; e++) mx = z[e] > mx ? z[e] : mx;
        for (e = 0; e < E; e++) sum += exp((double)(z[e] - mx));
        L->lse[t] = (float)(log(sum) + mx);
    }
    switch (L->cfg.router) {
    case MOE_ROUTER_SIGMOID: moe__sigmoid_probs(L, T); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe_softmax_forward(L->probs, L->logits, T, E);
        moe__noisy_scores(L, s, rin, a->noise, T);
        for (i = 0; i < TE; i++)
            if (!isfinite(L->noisy.H[i]))
                return moe_err_set(&L->err, MOE_ERR_NUMERIC, "noisy router score H of token %d for expert %d is %g: the noise "
                                   "projection, the noise or the input is not finite; nothing was routed",
                                   (int)(i / (size_t)E), (int)(i % (size_t)E), (double)L->noisy.H[i]);
        break;
    default: moe_softmax_forward(L->probs, L->logits, T, E); break;
    }
    return MOE_OK;
}

/* token t's choice: topk ids and dense gates (gates were zeroed) */
static void moe__router_select_token(moe_layer *L, const moe_store *st, int t) {
    int K = L->cfg.top_k, s;
    switch (L->cfg.router) {
    case MOE_ROUTER_NOISY_TOPK: moe__noisy_select(L, t); break;
    case MOE_ROUTER_EXPERT_CHOICE: /* the experts choose in assign: no per-token choice */
        for (s = 0; s < K; s++) L->topk[(size_t)t * K + s] = -1;
        break;
    default: moe__topk_select(L, st, t); break; /* softmax, sigmoid, AoE (softmax of the norms) */
    }
}

/* the raw assignment list and the requested picks; returns its length */
static int moe__router_assign(moe_layer *L, int T, const moe_layer_args *a) {
    switch (L->cfg.router) {
    case MOE_ROUTER_EXPERT_CHOICE: return moe__ec_assign(L, T);
    default: return moe__topk_assign(L, T, a->dropless); /* token choice, capacity, GW broadcast */
    }
}

/* The router's forward: scores, each token's choice, GW-MoE's broadcast, the raw assignment
   list (L->raw_*, *n entries) whose weights carry routed_scale. */
static moe_status moe__router_forward(moe_layer *L, const moe_store *s, const float *x, int T, const moe_layer_args *a,
                                      int *n) {
    const float *rin = a->router_input ? a->router_input : x;
    moe_status st;
    int t;
    if ((st = moe__router_scores(L, s, x, rin, a, T)) != MOE_OK) return st;
    memset(L->gates, 0, (size_t)T * L->cfg.n_experts * sizeof(float));
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_select_token(L, s, t);
    moe__gw_mark(L, T, a);
    *n = moe__router_assign(L, T, a);
    if (L->cfg.routed_scale != 1.0f)
        for (t = 0; t < *n; t++) L->raw_weight[t] *= L->cfg.routed_scale;
    return MOE_OK;
}

/* the routed experts' gate pre-activation from the router (AoE reuses its low-rank cache),
   before the routed experts run; and its backward (d h_gate in L->experts_dh_gate) */
static void moe__router_expert_gate_forward(moe_layer *L, const moe_store *s) {
    if (moe__router_owns_expert_gate(&L->cfg)) moe__aoe_gate_forward(L, s);
}
static void moe__router_expert_gate_backward(moe_layer *L, moe_store *s) {
    if (moe__router_owns_expert_gate(&L->cfg)) moe__aoe_gate_backward(L, s);
}

/* what else reaches y after the experts: dropped assignments passed through (HF Switch),
   GW's released-code bypass, HyperMoE's hyper-expert; and their backward (dx +=; the
   pass-through and the bypass keep the gradient of their weight for the router) */
static void moe__router_output_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    if (L->cfg.drop_passthrough) moe__topk_passthrough_forward(L, y, x, T);
    if (L->cfg.gw_released) moe__gw_output_forward(L, y, x, T);
    if (L->cfg.hyper) moe__hyper_forward(L, s, y, x, T);
}
static void moe__router_output_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    if (L->cfg.hyper) moe__hyper_backward(L, s, dx, dy, x); /* no gradient to the router: the set is discrete */
    if (L->cfg.gw_released) moe__gw_output_backward(L, dx, dy, x);
    if (L->cfg.drop_passthrough) moe__topk_passthrough_backward(L, dx, dy, x);
}

/* Auxiliary losses of the last forward and the routing statistics. P_i (the balance loss's
   mean probability) averages the normalised probabilities: the softmax itself, or for the
   sigmoid router the scores divided by their sum. */
static void moe__router_aux(moe_layer *L, int T) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, t, e;
    float *f = L->aux.balance_f, *P = L->aux.mean_prob, *pn = L->aux.token_probs, *picks = L->aux.picks;
    double gate_h = 0.0, acc, z = 0.0;
    moe_routing_stats *st = &L->stats;
    for (e = 0; e < E; e++) P[e] = f[e] = 0.0f;
    for (t = 0; t < T; t++) { /* P_i, summed in token order */
        if (c->router == MOE_ROUTER_SIGMOID) moe__sigmoid_norm_probs(L, t, pn);
        else memcpy(pn, L->probs + (size_t)t * E, sizeof(float) * (size_t)E);
        for (e = 0; e < E; e++) P[e] += pn[e];
        gate_h += moe__entropy(pn, E);
    }
    for (e = 0; e < E; e++) P[e] /= (float)T;
    if (c->balance == MOE_BALANCE_SWITCH) { /* f_i: share of tokens whose top-1 is i */
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
    st->raw_balance = c->balance == MOE_BALANCE_NONE ? 0.0f : (float)((c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc);
    for (t = 0; t < T; t++) z += (double)L->lse[t] * L->lse[t];
    st->aux_z = (float)(c->z_coef * z / T);
    st->raw_z = (float)(z / T);
    st->aux_cv = st->raw_importance = st->raw_load = 0.0f;
    if (c->router == MOE_ROUTER_NOISY_TOPK) moe__noisy_aux(L, T); /* sets aux_cv, raw_importance, raw_load */
    st->aux_total = st->aux_balance + st->aux_z + st->aux_cv;
    /* statistics; broadcast (GW) tokens are outside the requested/kept/dropped accounting */
    st->tokens = T;
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
}

/* dlogits of token t from its gate gradients, the balance loss through P and the z-loss */
static void moe__router_backward_token(moe_layer *L, int t, float aux_scale) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *z = L->logits + r;
    float *dz = L->d_logits + r;
    if (L->gw.uncertain[t]) moe__gw_backward_token(L, t); /* broadcast: gates are the full softmax */
    else switch (c->router) {
    case MOE_ROUTER_SIGMOID: moe__sigmoid_backward_token(L, t); break;
    case MOE_ROUTER_NOISY_TOPK: moe__noisy_backward_token(L, t); break;
    case MOE_ROUTER_EXPERT_CHOICE: moe__softmax_backward_token(L, t); break; /* g = p at the chosen */
    default: moe__topk_backward_token(L, t); break; /* softmax top-k, AoE */
    }
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) { /* the balance loss through P */
        if (c->router == MOE_ROUTER_SIGMOID) {
            moe__sigmoid_mean_prob_backward(L, t);
        } else {
            const float *dP = L->aux.d_mean_prob;
            float dot = 0.0f;
            for (e = 0; e < E; e++) dot += dP[e] * p[e];
            for (e = 0; e < E; e++) dz[e] += p[e] * (dP[e] - dot);
        }
    }
    if (c->z_coef > 0.0f) { /* z-loss: d/dz_j of c/T * lse^2 = 2c/T * lse * softmax(z)_j */
        float g = 2.0f * c->z_coef * aux_scale / (float)L->T * L->lse[t];
        for (e = 0; e < E; e++) dz[e] += g * expf(z[e] - L->lse[t]);
    }
}

/* The router's backward, after the experts': d(assignment weight) in L->d_weight -> gate
   gradients -> logit gradients -> the router's parameters, and its input's gradient into drin
   (the router input's when the router reads one, else dx). aux_scale multiplies the aux
   losses' gradients; balance_f, when given, replaces the layer's own f of the balance loss. */
static void moe__router_backward(moe_layer *L, moe_store *s, float *dx, const float *x, const float *rin, float *drin,
                                 float aux_scale, const float *balance_f) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, T = L->T, t, e, i;
    size_t TE = (size_t)T * E;
    memset(L->d_gates, 0, TE * sizeof(float));
    memset(L->d_logits, 0, TE * sizeof(float));
    for (i = 0; i < L->routed.n; i++) /* weight = gate * routed_scale */
        L->d_gates[(size_t)L->routed.token[i] * E + L->routed.expert[i]] = L->d_weight[i] * c->routed_scale;
    if (c->gw_released)
        for (t = 0; t < T; t++)
            if (L->gw.uncertain[t]) L->d_gates[(size_t)t * E + E - 1] = L->gw.d_bypass[t];
    if (c->drop_passthrough) moe__topk_passthrough_gates_backward(L);
    if (c->router == MOE_ROUTER_NOISY_TOPK) moe__noisy_aux_backward(L, aux_scale);
    if (c->balance != MOE_BALANCE_NONE && c->balance_coef > 0.0f) {
        float scale = c->balance_coef * aux_scale * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0f : (float)E) / (float)T;
        const float *f = balance_f ? balance_f : L->aux.balance_f;
        for (e = 0; e < E; e++) L->aux.d_mean_prob[e] = scale * f[e]; /* f is a constant */
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) moe__router_backward_token(L, t, aux_scale);
    switch (c->router) {
    case MOE_ROUTER_AOE: moe__aoe_backward(L, s, dx, x); break;
    case MOE_ROUTER_NOISY_TOPK:
        moe__linear_router_backward(L, s, drin, rin);
        moe__noisy_backward(L, s, drin, rin);
        break;
    default: moe__linear_router_backward(L, s, drin, rin); break;
    }
}

/* ---- the config ---- */

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
    c.routed_scale = c.shared_scale = 1.0f;
    return c;
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
    if ((int)c->expert < 0 || (int)c->expert > MOE_EXPERT_FFN) return moe_err_set(err, bad, "unknown expert kind %d", (int)c->expert);
    if ((int)c->activation < 0 || (int)c->activation > MOE_ACT_RELU) return moe_err_set(err, bad, "unknown activation %d", (int)c->activation);
    if (c->expert_bias && c->expert != MOE_EXPERT_FFN) return moe_err_set(err, bad, "expert_bias applies to MOE_EXPERT_FFN experts only");
    if ((int)c->balance < 0 || (int)c->balance > MOE_BALANCE_DEEPSEEK) return moe_err_set(err, bad, "unknown balance loss %d", (int)c->balance);
    if (c->n_shared < 0 || c->d_ff_shared < 0) return moe_err_set(err, bad, "n_shared (%d) and d_ff_shared (%d) must not be negative", c->n_shared, c->d_ff_shared);
    if (!(c->capacity_factor >= 0.0f) || c->capacity_factor > 1e6f)
        return moe_err_set(err, bad, "capacity_factor must be 0 (dropless) or positive, got %g", (double)c->capacity_factor);
    if (moe__bad_coef(c->balance_coef) || moe__bad_coef(c->z_coef) || moe__bad_coef(c->importance_coef) ||
        moe__bad_coef(c->load_coef) || moe__bad_coef(c->noise_eps) || moe__bad_coef(c->router_init_std))
        return moe_err_set(err, bad, "loss coefficients, noise_eps and router_init_std must be finite and >= 0");
    if (!(c->gw_threshold >= 0.0f) || c->gw_slots < 0) return moe_err_set(err, bad, "gw_threshold and gw_slots must not be negative");
    if (!(c->routed_scale > 0.0f) || c->routed_scale > 1e6f || !(c->shared_scale > 0.0f) || c->shared_scale > 1e6f)
        return moe_err_set(err, bad, "routed_scale (%g) and shared_scale (%g) must be positive and finite (1 = unscaled)",
                           (double)c->routed_scale, (double)c->shared_scale);
    if ((int)c->capacity_order < 0 || (int)c->capacity_order > MOE_CAPACITY_TOKEN_MAJOR)
        return moe_err_set(err, bad, "unknown capacity_order %d", (int)c->capacity_order);
    if (!(c->ec_capacity_factor >= 0.0f) || c->ec_capacity_factor > 1e6f)
        return moe_err_set(err, bad, "ec_capacity_factor must be 0 (top_k) or positive, got %g", (double)c->ec_capacity_factor);
    if (c->router_dim < 0) return moe_err_set(err, bad, "router_dim must not be negative");
    if (c->hyper && (c->hyper_embed <= 0 || c->hyper_hidden <= 0 || c->hyper_cond <= 0 || c->hyper_layer_dim <= 0 ||
                     c->hyper_width <= 0 || c->hyper_adapter <= 0 || c->hyper_layers <= 0 || c->hyper_layer < 0 ||
                     c->hyper_layer >= c->hyper_layers))
        return moe_err_set(err, bad, "HyperMoE needs positive hyper sizes and 0 <= hyper_layer < hyper_layers");
    if (c->hyper && ((double)c->hyper_adapter * c->hyper_width + c->hyper_width > 1e8 || (double)c->hyper_cond + c->hyper_layer_dim > 1e8 ||
                     (double)c->hyper_adapter * c->hyper_width * c->d > 4e9 || (double)c->hyper_embed * c->hyper_hidden > 4e9 ||
                     (double)c->hyper_hidden * c->hyper_cond > 4e9))
        return moe_err_set(err, bad, "HyperMoE's sizes are too large (hyper_adapter %d x hyper_width %d)", c->hyper_adapter, c->hyper_width);
    if (c->n_shared > 0 && (double)c->n_shared * (c->d_ff_shared > 0 ? c->d_ff_shared : c->d_ff) * c->d > 4e9)
        return moe_err_set(err, bad, "shared experts too large (n_shared*d_ff_shared*d = %.3g floats)", (double)c->n_shared * c->d_ff_shared * c->d);
    if (moe__router_validate(c, err) != MOE_OK) return bad;
    if ((double)c->n_experts * c->d_ff * c->d > 4e9) return moe_err_set(err, bad, "layer too large (E*d_ff*d = %.3g floats)", (double)c->n_experts * c->d_ff * c->d);
    return MOE_OK;
}
/* ============================================================================================
   >>moe:router_topk
   ============================================================================================ */

static void moe__linear_router_declare(moe_layer *L, moe_store *s, const char *prefix) {
    L->id_router_w = moe__declare(L, s, prefix, "router.w", MOE_TENSOR_DECAY, L->cfg.n_experts, L->cfg.router_dim, 0);
    if (L->cfg.router_bias) L->id_router_b = moe__declare(L, s, prefix, "router.b", 0, L->cfg.n_experts, 0, 0);
    /* no decay and never a gradient: AdamW leaves it alone, the balancing rule moves it */
    if (L->cfg.selection_bias) L->id_selection_bias = moe__declare(L, s, prefix, "router.selection_bias", 0, L->cfg.n_experts, 0, 0);
}

/* logits (T, E) = rin (T, router_dim) . Wr^T + b */
static void moe__linear_router_logits(moe_layer *L, const moe_store *s, const float *rin, int T) {
    moe_matmul_forward(L->logits, rin, moe_store_param(s, L->id_router_w), moe_store_param(s, L->id_router_b), T,
                       L->cfg.router_dim, L->cfg.n_experts, &L->work);
}

/* d_logits -> dWr, db, and drin += (the router input's gradient) */
static void moe__linear_router_backward(moe_layer *L, moe_store *s, float *drin, const float *rin) {
    moe_matmul_backward(drin, moe_store_grad(s, L->id_router_w), moe_store_grad(s, L->id_router_b), L->d_logits, rin,
                        moe_store_param(s, L->id_router_w), L->T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
}

/* token t: the k largest probabilities (plus the selection bias, when there is one) and
   their weights (softmax or sigmoid scores) */
static void moe__topk_select(moe_layer *L, const moe_store *st, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s;
    const float *p = L->probs + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K;
    float *g = L->gates + (size_t)t * E;
    if (L->cfg.selection_bias) {
        const float *b = moe_store_param(st, L->id_selection_bias);
        float *score = L->selection_scores + (size_t)t * E;
        for (s = 0; s < E; s++) score[s] = p[s] + b[s];
        moe__topk_row(score, E, K, idx);
    } else {
        moe__topk_row(p, E, K, idx);
    }
    if (L->cfg.renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
}

/* The raw assignment list of a token-choice router: each token's k choices in slot order,
   less the drops of capacity; GW-MoE's broadcast tokens bring every expert instead. The
   picks per expert count every choice (capacity or not). Returns the list's length.
   dropless (moe_layer_args): capacity admits every choice on this call. */
static int moe__topk_assign(moe_layer *L, int T, int dropless) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, K = c->top_k, n = 0, t, s, e;
    const int *topk = L->topk;
    float *picks = L->aux.picks;
    for (e = 0; e < E; e++) picks[e] = 0.0f;
    for (t = 0; t < T; t++)
        for (s = 0; s < K; s++) picks[topk[(size_t)t * K + s]] += 1.0f;
    if (c->capacity_factor > 0.0f && dropless) {
        for (t = 0; t < T * K; t++) L->admitted[t] = 1;
    } else if (c->capacity_factor > 0.0f) { /* admission, in slot-major or token-major order */
        int C = (int)ceil((double)c->capacity_factor * K * T / E), token_major = c->capacity_order == MOE_CAPACITY_TOKEN_MAJOR;
        int outer = token_major ? T : K, inner = token_major ? K : T, i, j;
        int *count = L->capacity_count;
        for (e = 0; e < E; e++) count[e] = 0;
        for (i = 0; i < outer; i++)
            for (j = 0; j < inner; j++) {
                t = token_major ? i : j;
                s = token_major ? j : i;
                if (L->gw.uncertain[t]) continue; /* broadcast tokens bypass capacity */
                e = topk[(size_t)t * K + s];
                L->admitted[(size_t)t * K + s] = count[e] < C;
                if (count[e] < C) count[e]++;
            }
    }
    for (t = 0; t < T; t++) {
        if (c->drop_passthrough) L->passthrough[t] = 0.0f;
        if (L->gw.uncertain[t]) {
            n = moe__gw_assign_token(L, t, n);
            continue;
        }
        for (s = 0; s < K; s++) {
            if (c->capacity_factor > 0.0f && !L->admitted[(size_t)t * K + s]) {
                if (c->drop_passthrough) L->passthrough[t] += L->gates[(size_t)t * E + topk[(size_t)t * K + s]] * c->routed_scale;
                continue;
            }
            e = topk[(size_t)t * K + s];
            L->raw_token[n] = t; L->raw_expert[n] = e; L->raw_slot[n] = s; L->raw_weight[n] = L->gates[(size_t)t * E + e];
            n++;
        }
    }
    return n;
}

/* drop_passthrough: y += (the dropped weights) * x, and its backward: dx += w dy, and
   d w = <dy, x> for the router (each dropped assignment's gate gets it, times routed_scale) */
static void moe__topk_passthrough_forward(moe_layer *L, float *y, const float *x, int T) {
    int d = L->cfg.d, t, j;
    for (t = 0; t < T; t++)
        if (L->passthrough[t] != 0.0f)
            for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->passthrough[t] * x[(size_t)t * d + j];
}

static void moe__topk_passthrough_backward(moe_layer *L, float *dx, const float *dy, const float *x) {
    int d = L->cfg.d, t, j;
    for (t = 0; t < L->T; t++) {
        const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
        float dot = 0.0f;
        for (j = 0; j < d; j++) {
            dot += g[j] * xt[j];
            dx[(size_t)t * d + j] += L->passthrough[t] * g[j];
        }
        L->d_passthrough[t] = dot;
    }
}

static void moe__topk_passthrough_gates_backward(moe_layer *L) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, t, s;
    for (t = 0; t < L->T; t++)
        for (s = 0; s < K; s++)
            if (!L->gw.uncertain[t] && !L->admitted[(size_t)t * K + s])
                L->d_gates[(size_t)t * E + L->topk[(size_t)t * K + s]] = L->d_passthrough[t] * L->cfg.routed_scale;
}

/* g = softmax over all E read at the chosen experts (Switch, expert choice):
   dz = p * (dg - <dg, p>) */
static void moe__softmax_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *dg = L->d_gates + r;
    float *dz = L->d_logits + r, dot = 0.0f;
    for (e = 0; e < E; e++) dot += dg[e] * p[e];
    for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
}

/* softmax top-k (and AoE's top-k of the norms): renormalised, g = softmax over the chosen
   logits, dz_i = g_i (dg_i - <dg, g>) on the chosen; else the full softmax's backward */
static void moe__topk_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s;
    size_t r = (size_t)t * E;
    const float *g = L->gates + r, *dg = L->d_gates + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dz = L->d_logits + r, dot = 0.0f;
    if (!L->cfg.renormalize) {
        moe__softmax_backward_token(L, t);
        return;
    }
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
}

/* sigmoid gating: independent scores p = sigmoid(z) */
static void moe__sigmoid_probs(moe_layer *L, int T) {
    size_t i, TE = (size_t)T * L->cfg.n_experts;
    for (i = 0; i < TE; i++) L->probs[i] = moe__sigmoid(L->logits[i]);
}

static void moe__sigmoid_backward_token(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *g = L->gates + r, *dg = L->d_gates + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dz = L->d_logits + r;
    if (L->cfg.renormalize) { /* g = p / sum over the chosen */
        float sum = 0.0f, dot = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
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
}

/* the normalised scores p / sum_j p_j of token t, which the balance loss averages into P */
static void moe__sigmoid_norm_probs(const moe_layer *L, int t, float *out) {
    int E = L->cfg.n_experts, j;
    const float *p = L->probs + (size_t)t * E;
    float s = 0.0f;
    for (j = 0; j < E; j++) s += p[j];
    for (j = 0; j < E; j++) out[j] = p[j] / s;
}

/* the balance loss's gradient dP through the normalised scores of token t */
static void moe__sigmoid_mean_prob_backward(moe_layer *L, int t) {
    int E = L->cfg.n_experts, e;
    size_t r = (size_t)t * E;
    const float *p = L->probs + r, *dP = L->aux.d_mean_prob;
    float *dz = L->d_logits + r, sum = 0.0f, dot = 0.0f;
    for (e = 0; e < E; e++) sum += p[e];
    for (e = 0; e < E; e++) dot += dP[e] * p[e] / sum;
    for (e = 0; e < E; e++) dz[e] += (dP[e] - dot) / sum * p[e] * (1.0f - p[e]);
}
/* ============================================================================================
   >>moe:router_noisy
   ============================================================================================ */

static int moe__noisy_alloc(moe_layer *L) {
    moe_router_noisy *n = &L->noisy;
    size_t TE = (size_t)L->max_tokens * L->cfg.n_experts, E = (size_t)L->cfg.n_experts;
    return MOE__ALLOC(n->noise, TE, float) && MOE__ALLOC(n->noise_logits, TE, float) && MOE__ALLOC(n->H, TE, float) &&
           MOE__ALLOC(n->threshold, TE, int) && MOE__ALLOC(n->d_noise_logits, TE, float) &&
           MOE__ALLOC(n->importance, E, float) && MOE__ALLOC(n->load, E, float) && MOE__ALLOC(n->d_importance, E, float) &&
           MOE__ALLOC(n->d_load, E, float);
}

static void moe__noisy_free(moe_layer *L) {
    moe_router_noisy *n = &L->noisy;
    MOE_FREE(n->noise); MOE_FREE(n->noise_logits); MOE_FREE(n->H); MOE_FREE(n->threshold); MOE_FREE(n->d_noise_logits);
    MOE_FREE(n->importance); MOE_FREE(n->load); MOE_FREE(n->d_importance); MOE_FREE(n->d_load);
    n->noise = n->noise_logits = n->H = n->d_noise_logits = n->importance = n->load = n->d_importance = n->d_load = NULL;
    n->threshold = NULL;
}

static void moe__noisy_declare(moe_layer *L, moe_store *s, const char *prefix) {
    L->noisy.id_w_noise = moe__declare(L, s, prefix, "router.w_noise", MOE_TENSOR_DECAY, L->cfg.n_experts, L->cfg.router_dim, 0);
}

/* noise logits and H (the softmax probabilities of z are the dispatcher's) */
static void moe__noisy_scores(moe_layer *L, const moe_store *s, const float *rin, const float *noise, int T) {
    moe_router_noisy *n = &L->noisy;
    size_t i, TE = (size_t)T * L->cfg.n_experts;
    moe_matmul_forward(n->noise_logits, rin, moe_store_param(s, n->id_w_noise), NULL, T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
    n->has_noise = noise != NULL;
    for (i = 0; i < TE; i++) {
        n->noise[i] = noise ? noise[i] : 0.0f;
        n->H[i] = L->logits[i] + n->noise[i] * (moe__softplus(n->noise_logits[i]) + L->cfg.noise_eps);
    }
}

/* token t: the k largest H, softmax over them; each expert's load threshold */
static void moe__noisy_select(moe_layer *L, int t) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, j, kth, k1th;
    const float *H = L->noisy.H + (size_t)t * E;
    int *idx = L->topk + (size_t)t * K, *th = L->noisy.threshold + (size_t)t * E;
    float *g = L->gates + (size_t)t * E, mx, sum = 0.0f;
    moe__topk_row(H, E, K + 1, th); /* th is scratch here: the k+1 best */
    for (s = 0; s < K; s++) idx[s] = th[s];
    kth = th[K - 1];
    k1th = th[K];
    for (j = 0; j < E; j++) th[j] = kth;
    for (s = 0; s < K; s++) th[idx[s]] = k1th; /* selected: compare with the (k+1)-th */
    mx = H[idx[0]];
    for (s = 0; s < K; s++) sum += expf(H[idx[s]] - mx);
    for (s = 0; s < K; s++) g[idx[s]] = expf(H[idx[s]] - mx) / sum;
}

/* Importance and Load; stats.aux_cv and the two raw CV^2 */
static void moe__noisy_aux(moe_layer *L, int T) {
    moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts, ub = L->cfg.cv_unbiased, t, e;
    for (e = 0; e < E; e++) n->importance[e] = n->load[e] = 0.0f;
    for (t = 0; t < T; t++)
        for (e = 0; e < E; e++) n->importance[e] += L->gates[(size_t)t * E + e];
    if (n->has_noise) {
        for (t = 0; t < T; t++)
            for (e = 0; e < E; e++) {
                size_t i = (size_t)t * E + e;
                float sd = moe__softplus(n->noise_logits[i]) + L->cfg.noise_eps;
                float u = (L->logits[i] - n->H[(size_t)t * E + n->threshold[i]]) / sd;
                n->load[e] += 0.5f * erfcf(-u * 0.70710678118654752f);
            }
    } else {
        for (e = 0; e < E; e++) n->load[e] = L->aux.picks[e];
    }
    L->stats.aux_cv = moe__cv2(n->importance, E, L->cfg.importance_coef, NULL, ub) + moe__cv2(n->load, E, L->cfg.load_coef, NULL, ub);
    L->stats.raw_importance = moe__cv2(n->importance, E, 1.0f, NULL, ub);
    L->stats.raw_load = moe__cv2(n->load, E, 1.0f, NULL, ub);
}

/* the CV^2 losses' gradients (scale: the call's aux gradient scale); zeroes d_noise_logits */
static void moe__noisy_aux_backward(moe_layer *L, float scale) {
    moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts;
    memset(n->d_noise_logits, 0, sizeof(float) * (size_t)L->T * E);
    moe__cv2(n->importance, E, L->cfg.importance_coef * scale, n->d_importance, L->cfg.cv_unbiased);
    if (n->has_noise) moe__cv2(n->load, E, L->cfg.load_coef * scale, n->d_load, L->cfg.cv_unbiased);
}

/* token t: importance's gradient joins dgate; softmax over the kept H; the smooth load */
static void moe__noisy_backward_token(moe_layer *L, int t) {
    const moe_router_noisy *n = &L->noisy;
    int E = L->cfg.n_experts, K = L->cfg.top_k, s, e;
    size_t r = (size_t)t * E;
    const float *g = L->gates + r, *z = L->logits + r, *xi = n->noise + r, *zn = n->noise_logits + r;
    const int *idx = L->topk + (size_t)t * K;
    float *dg = L->d_gates + r, *dz = L->d_logits + r, *dzn = n->d_noise_logits + r, dot = 0.0f;
    for (s = 0; s < K; s++) dg[idx[s]] += n->d_importance[idx[s]]; /* importance = sum_t gates */
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) {
        float dH;
        e = idx[s];
        dH = g[e] * (dg[e] - dot);
        dz[e] += dH;
        dzn[e] += dH * xi[e] * moe__sigmoid(zn[e]);
    }
    if (n->has_noise) { /* smooth load: Phi((z_i - thr_i) / sd_i) */
        const float *H = n->H + r;
        const int *th = n->threshold + r;
        for (e = 0; e < E; e++) {
            float sd = moe__softplus(zn[e]) + L->cfg.noise_eps;
            int m = th[e];
            float u = (z[e] - H[m]) / sd;
            float du = n->d_load[e] * 0.3989422804014327f * expf(-0.5f * u * u);
            float dthr = -du / sd, dsd = -du * u / sd;
            dz[e] += du / sd;
            dz[m] += dthr; /* H_m = z_m + xi_m * sd_m */
            dzn[m] += dthr * xi[m] * moe__sigmoid(zn[m]);
            dzn[e] += dsd * moe__sigmoid(zn[e]);
        }
    }
}

/* d_noise_logits -> dWn, drin += */
static void moe__noisy_backward(moe_layer *L, moe_store *s, float *drin, const float *rin) {
    moe_matmul_backward(drin, moe_store_grad(s, L->noisy.id_w_noise), NULL, L->noisy.d_noise_logits, rin,
                        moe_store_param(s, L->noisy.id_w_noise), L->T, L->cfg.router_dim, L->cfg.n_experts, &L->work);
}
/* ============================================================================================
   >>moe:router_ec
   ============================================================================================ */

static int moe__ec_alloc(moe_layer *L) {
    return MOE__ALLOC(L->ec.ranked, L->max_tokens, moe_scored_token) && MOE__ALLOC(L->ec.chosen, L->max_tokens, int);
}

static void moe__ec_free(moe_layer *L) {
    MOE_FREE(L->ec.ranked);
    MOE_FREE(L->ec.chosen);
    L->ec.ranked = NULL;
    L->ec.chosen = NULL;
}

/* larger score first, ties to the lower token index (the probabilities are finite: the
   forward refused non-finite logits) */
static int moe__scored_cmp(const void *pa, const void *pb) {
    const moe_scored_token *a = (const moe_scored_token *)pa, *b = (const moe_scored_token *)pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

/* each expert's C best tokens, in token order; gates and picks (C per expert) */
static int moe__ec_assign(moe_layer *L, int T) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, n = 0, t, s, e;
    int C = L->cfg.ec_capacity_factor > 0.0f ? (int)ceil((double)L->cfg.ec_capacity_factor * T / E)
                                             : (int)(((long long)K * T + E - 1) / E);
    moe_scored_token *sc = L->ec.ranked;
    int *chosen = L->ec.chosen;
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
            L->raw_token[n] = chosen[s]; L->raw_expert[n] = e; L->raw_slot[n] = e; L->raw_weight[n] = p;
            L->gates[(size_t)chosen[s] * E + e] = p;
            n++;
        }
        L->aux.picks[e] = (float)C;
    }
    return n;
}
/* ============================================================================================
   >>moe:router_aoe
   ============================================================================================ */

MOE__IMPL int moe_aoe_matched_width(int d, int D, int r) {
    /* rounded up, as the paper's 6469.2 -> 6470 (the 1e-9 keeps exact integers exact) */
    return (int)ceil((3.0 * d * D - (double)r * d) / ((double)r + 2.0 * d) - 1e-9);
}

static int moe__aoe_alloc(moe_layer *L) {
    moe_router_aoe *a = &L->aoe;
    size_t TEr = (size_t)L->max_tokens * L->cfg.n_experts * L->cfg.aoe_rank, capr = (size_t)L->cap * L->cfg.aoe_rank;
    return MOE__ALLOC(a->cache, TEr, float) && MOE__ALLOC(a->d_cache, TEr, float) && MOE__ALLOC(a->cache_chosen, capr, float) &&
           MOE__ALLOC(a->d_cache_chosen, capr, float);
}

static void moe__aoe_free(moe_layer *L) {
    moe_router_aoe *a = &L->aoe;
    MOE_FREE(a->cache); MOE_FREE(a->d_cache); MOE_FREE(a->cache_chosen); MOE_FREE(a->d_cache_chosen);
    a->cache = a->d_cache = a->cache_chosen = a->d_cache_chosen = NULL;
}

static void moe__aoe_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    L->aoe.id_w_in = moe__declare(L, s, prefix, "experts.w_gate_in", MOE_TENSOR_DECAY, c->n_experts, c->aoe_rank, c->d);
    L->aoe.id_w_out = moe__declare(L, s, prefix, "experts.w_gate_out", MOE_TENSOR_DECAY, c->n_experts, c->d_ff, c->aoe_rank);
}

/* nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) for both factors, as the experts' matrices */
static void moe__aoe_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int ids[2], k;
    size_t i;
    ids[0] = L->aoe.id_w_in;
    ids[1] = L->aoe.id_w_out;
    for (k = 0; k < 2; k++) {
        const moe_tensor *t = &s->tensors[ids[k]];
        float *p = moe_store_param(s, ids[k]), bound = 1.0f / sqrtf((float)t->shape[2]);
        for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
    }
}

/* C = x . W_in^T (T, E r) for every expert; logits (T, E) = ||C_e|| */
static void moe__aoe_logits(moe_layer *L, const moe_store *s, const float *x, int T) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, t;
    moe_matmul_forward(L->aoe.cache, x, moe_store_param(s, L->aoe.id_w_in), NULL, T, L->cfg.d, E * r, &L->work);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            const float *c = L->aoe.cache + ((size_t)t * E + e) * r;
            double ss = 0.0;
            for (j = 0; j < r; j++) ss += (double)c[j] * c[j];
            L->logits[(size_t)t * E + e] = (float)sqrt(ss);
        }
    }
}

/* the chosen experts' caches, gathered, then h_gate = C_e . W_out_e^T per expert: the routed
   experts' forward takes it as its gate pre-activation */
static void moe__aoe_gate_forward(moe_layer *L, const moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, i, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->aoe.id_w_out);
    for (i = 0; i < a->n; i++)
        memcpy(L->aoe.cache_chosen + (size_t)i * r, L->aoe.cache + ((size_t)a->token[i] * E + a->expert[i]) * r, sizeof(float) * (size_t)r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_forward(L->hg + (size_t)lo * D, L->aoe.cache_chosen + (size_t)lo * r, wout + (size_t)e * D * r, NULL, n, r, D, &L->work);
    }
}

/* d h_gate (left by the experts' backward in experts_dh_gate) -> d W_out and d_cache_chosen */
static void moe__aoe_gate_backward(moe_layer *L, moe_store *s) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, D = L->cfg.d_ff, e;
    const moe_assign *a = &L->routed;
    const float *wout = moe_store_param(s, L->aoe.id_w_out);
    float *gout = moe_store_grad(s, L->aoe.id_w_out);
    memset(L->aoe.d_cache_chosen, 0, sizeof(float) * (size_t)a->n * r);
    for (e = 0; e < E; e++) {
        int lo = a->offset[e], n = a->offset[e + 1] - lo;
        if (n > 0)
            moe_matmul_backward(L->aoe.d_cache_chosen + (size_t)lo * r, gout + (size_t)e * D * r, NULL, L->experts_dh_gate + (size_t)lo * D,
                                L->aoe.cache_chosen + (size_t)lo * r, wout + (size_t)e * D * r, n, r, D, &L->work);
    }
}

/* the router's backward: dC = the chosen experts' cache gradients + dlogit * C / ||C||;
   then dW_in and dx */
static void moe__aoe_backward(moe_layer *L, moe_store *s, float *dx, const float *x) {
    int E = L->cfg.n_experts, r = L->cfg.aoe_rank, T = L->T, i, t;
    const moe_assign *a = &L->routed;
    size_t n = (size_t)T * E * r;
    memset(L->aoe.d_cache, 0, sizeof(float) * n);
    for (i = 0; i < a->n; i++) /* each (token, expert) appears once: plain copies */
        memcpy(L->aoe.d_cache + ((size_t)a->token[i] * E + a->expert[i]) * r, L->aoe.d_cache_chosen + (size_t)i * r, sizeof(float) * (size_t)r);
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) {
        int e, j;
        for (e = 0; e < E; e++) {
            size_t k = (size_t)t * E + e;
            const float *c = L->aoe.cache + k * r;
            float *dc = L->aoe.d_cache + k * r, norm = L->logits[k];
            float g = L->d_logits[k] / (norm > 1e-12f ? norm : 1e-12f);
            for (j = 0; j < r; j++) dc[j] += g * c[j];
        }
    }
    moe_matmul_backward(dx, moe_store_grad(s, L->aoe.id_w_in), NULL, L->aoe.d_cache, x, moe_store_param(s, L->aoe.id_w_in), T,
                        L->cfg.d, E * r, &L->work);
}
/* ============================================================================================
   >>moe:router_gw
   ============================================================================================ */

static int moe__gw_alloc(moe_layer *L) {
    return MOE__ALLOC(L->gw.uncertain, L->max_tokens, int) && MOE__ALLOC(L->gw.bypass, L->max_tokens, float) &&
           MOE__ALLOC(L->gw.d_bypass, L->max_tokens, float);
}

static void moe__gw_free(moe_layer *L) {
    MOE_FREE(L->gw.uncertain); MOE_FREE(L->gw.bypass); MOE_FREE(L->gw.d_bypass);
    L->gw.uncertain = NULL;
    L->gw.bypass = L->gw.d_bypass = NULL;
}

/* marks the uncertain tokens (serial: the slot cap counts in sequence order) and gives them
   the full softmax as gates (paper) or a bypass weight (released code) */
static void moe__gw_mark(moe_layer *L, int T, const moe_layer_args *a) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, t, e, used = 0, seq = a->seq_len > 0 ? a->seq_len : T;
    double norm = c->gw_normalized ? log((double)E) : 1.0;
    L->stats.broadcast = 0;
    for (t = 0; t < T; t++) {
        const float *p = L->probs + (size_t)t * E;
        double u = 0.0;
        L->gw.uncertain[t] = 0;
        L->gw.bypass[t] = 0.0f;
        if (!a->gw_active || c->gw_threshold <= 0.0f) continue;
        if (t % seq == 0) used = 0;
        for (e = 0; e < E; e++) u -= (double)p[e] * log((double)p[e] + 1e-5);
        if (u / norm < c->gw_threshold || (c->gw_slots > 0 && used >= c->gw_slots)) continue;
        used++;
        L->gw.uncertain[t] = 1;
        L->stats.broadcast++;
        if (c->gw_released) {
            memset(L->gates + (size_t)t * E, 0, sizeof(float) * (size_t)E);
            L->gw.bypass[t] = p[E - 1];
        } else {
            memcpy(L->gates + (size_t)t * E, p, sizeof(float) * (size_t)E);
        }
    }
}

/* an uncertain token's assignments: every expert, in expert order, slot = expert (none for
   the released code's bypass); returns the list's new length */
static int moe__gw_assign_token(moe_layer *L, int t, int n) {
    int E = L->cfg.n_experts, e;
    if (L->cfg.gw_released) return n;
    for (e = 0; e < E; e++) {
        L->raw_token[n] = t; L->raw_expert[n] = e; L->raw_slot[n] = e; L->raw_weight[n] = L->gates[(size_t)t * E + e];
        n++;
    }
    return n;
}

/* released code: y += p_{E-1} x for the uncertain tokens */
static void moe__gw_output_forward(moe_layer *L, float *y, const float *x, int T) {
    int d = L->cfg.d, t, j;
    if (L->stats.broadcast == 0) return;
    for (t = 0; t < T; t++)
        if (L->gw.bypass[t] != 0.0f)
            for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->gw.bypass[t] * x[(size_t)t * d + j];
}

/* its backward: dx += bypass * dy; d_bypass = <dy, x> */
static void moe__gw_output_backward(moe_layer *L, float *dx, const float *dy, const float *x) {
    int d = L->cfg.d, t, j;
    if (L->stats.broadcast == 0) return;
    for (t = 0; t < L->T; t++)
        if (L->gw.uncertain[t]) {
            const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
            float dot = 0.0f;
            for (j = 0; j < d; j++) {
                dot += g[j] * xt[j];
                dx[(size_t)t * d + j] += L->gw.bypass[t] * g[j];
            }
            L->gw.d_bypass[t] = dot;
        }
}

/* an uncertain token's gates are the full softmax (or p_{E-1} alone): its backward */
static void moe__gw_backward_token(moe_layer *L, int t) { moe__softmax_backward_token(L, t); }
/* ============================================================================================
   >>moe:router_hyper
   ============================================================================================ */

static int moe__hyper_alloc(moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *h = &L->hyper;
    size_t T = (size_t)L->max_tokens, ab = (size_t)c->hyper_adapter * c->hyper_width;
    size_t zq = (size_t)c->hyper_cond + c->hyper_layer_dim, ob = ab + (size_t)c->hyper_width;
    return MOE__ALLOC(h->sig, T * c->hyper_embed, float) && MOE__ALLOC(h->h1, T * c->hyper_hidden, float) &&
           MOE__ALLOC(h->cond, T * c->hyper_cond, float) && MOE__ALLOC(h->z, T * zq, float) &&
           MOE__ALLOC(h->hb, T * c->hyper_width, float) && MOE__ALLOC(h->m, T * ab, float) &&
           MOE__ALLOC(h->u, T * c->hyper_adapter, float) && MOE__ALLOC(h->o, T * ob, float) &&
           MOE__ALLOC(h->out, T * c->d, float) && MOE__ALLOC(h->emb_sum, c->hyper_embed, float) &&
           MOE__ALLOC(h->d_o, T * ob, float) && MOE__ALLOC(h->d_m, T * ab, float) &&
           MOE__ALLOC(h->d_hb, T * c->hyper_width, float) && MOE__ALLOC(h->d_z, T * zq, float) &&
           MOE__ALLOC(h->d_cond, T * c->hyper_cond, float) && MOE__ALLOC(h->d_h1, T * c->hyper_hidden, float) &&
           MOE__ALLOC(h->d_sig, T * c->hyper_embed, float) &&
           (!c->hyper_head_bias || (MOE__ALLOC(h->act1, T * (c->hyper_adapter + 1), float) &&
                                    MOE__ALLOC(h->bias_out, T * c->d, float) &&
                                    MOE__ALLOC(h->d_act1, T * (c->hyper_adapter + 1), float) &&
                                    MOE__ALLOC(h->d_u, T * c->hyper_adapter, float)));
}

static void moe__hyper_free(moe_layer *L) {
    moe_router_hyper *h = &L->hyper;
    float **bufs[] = {&h->sig, &h->h1, &h->cond, &h->z, &h->hb, &h->m, &h->u, &h->o, &h->out, &h->emb_sum,
                      &h->d_o, &h->d_m, &h->d_hb, &h->d_z, &h->d_cond, &h->d_h1, &h->d_sig,
                      &h->act1, &h->bias_out, &h->d_act1, &h->d_u};
    size_t i;
    for (i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        MOE_FREE(*bufs[i]);
        *bufs[i] = NULL;
    }
}

static void moe__hyper_declare(moe_layer *L, moe_store *s, const char *prefix) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter;
    const char *shared[9] = {"hyper.layer_emb", "hyper.net.w", "hyper.net.b", "hyper.head_down", "hyper.head_down_b", "hyper.head_up",
                             "hyper.head_down.bias", "hyper.head_down_b.bias", "hyper.head_up.bias"};
    int dims[9][2], k, n_shared = c->hyper_head_bias ? 9 : 6;
    int *id = L->hyper.id;
    dims[0][0] = c->hyper_layers; dims[0][1] = lam;
    dims[1][0] = b; dims[1][1] = q + lam;
    dims[2][0] = b; dims[2][1] = 0;
    dims[3][0] = a * b; dims[3][1] = d;
    dims[4][0] = a; dims[4][1] = b;
    dims[5][0] = d; dims[5][1] = (a + 1) * b;
    dims[6][0] = a; dims[6][1] = d;
    dims[7][0] = a; dims[7][1] = 0;
    dims[8][0] = d; dims[8][1] = a + 1;
    id[MOE_HYPER_EXPERT_EMB] = moe__declare(L, s, prefix, "hyper.expert_emb", MOE_TENSOR_DECAY, E, e, 0);
    id[MOE_HYPER_PROC1_W] = moe__declare(L, s, prefix, "hyper.proc1.w", MOE_TENSOR_DECAY, h, e, 0);
    id[MOE_HYPER_PROC1_B] = moe__declare(L, s, prefix, "hyper.proc1.b", 0, h, 0, 0);
    id[MOE_HYPER_PROC2_W] = moe__declare(L, s, prefix, "hyper.proc2.w", MOE_TENSOR_DECAY, q, h, 0);
    id[MOE_HYPER_PROC2_B] = moe__declare(L, s, prefix, "hyper.proc2.b", 0, q, 0, 0);
    for (k = 0; k < n_shared && L->err.status == MOE_OK; k++) { /* shared: reuse the first layer's */
        int t = moe_store_find(s, shared[k]);
        if (t < 0) {
            t = moe__declare(L, s, "", shared[k], (k == 2 || k == 4 || k >= 6) ? 0 : MOE_TENSOR_DECAY, dims[k][0], dims[k][1], 0);
        } else if (s->tensors[t].shape[0] != dims[k][0] || (dims[k][1] && s->tensors[t].shape[1] != dims[k][1])) {
            moe_err_set(&L->err, MOE_ERR_SHAPE, "shared HyperMoE tensor '%s' exists with another shape (layers must agree on the hyper sizes)", shared[k]);
            t = -1;
        }
        id[MOE_HYPER_LAYER_EMB + k] = t;
    }
}

/* the HyperMoE tensors' initialisation; returns 0 for other tensors (the model's weight init
   asks by name) */
static int moe__hyper_init_tensor(const moe_tensor *t, float *p, moe_rng *r) {
    size_t i;
    float bound;
    const char *name = strstr(t->name, "hyper.");
    if (!name) return 0;
    if (moe__ends_with(name, ".b") || moe__ends_with(name, ".bias") || strcmp(name, "hyper.head_down_b") == 0) bound = 0.0f;
    else if (strstr(name, "hyper.head_")) bound = 1e-3f * sqrtf(3.0f / (float)t->shape[1]); /* near-zero adapter */
    else if (moe__ends_with(name, "emb")) bound = sqrtf(3.0f); /* unit variance, as nn.Embedding */
    else bound = 1.0f / sqrtf((float)t->shape[1]); /* nn.Linear */
    for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(r) - 1.0f);
    return 1;
}

/* (the shared tensors are re-drawn by every layer: harmless) */
static void moe__hyper_init_weights(moe_layer *L, moe_store *s, moe_rng *rng) {
    int k;
    for (k = 0; k < MOE_HYPER_TENSORS; k++)
        if (L->hyper.id[k] >= 0) moe__hyper_init_tensor(&s->tensors[L->hyper.id[k]], moe_store_param(s, L->hyper.id[k]), rng);
}

/* y (T, d) += the hyper-expert's output */
static void moe__hyper_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *hy = &L->hyper;
    const int *id = hy->id;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j;
    const float *Q = moe_store_param(s, id[MOE_HYPER_EXPERT_EMB]);
    const float *lemb = moe_store_param(s, id[MOE_HYPER_LAYER_EMB]) + (size_t)c->hyper_layer * lam;
    const float *bdn = moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B]);
    float *sum = hy->emb_sum, *out = hy->out;
    memset(sum, 0, sizeof(float) * (size_t)e);
    for (j = 0; j < E; j++) { /* sum of all embeddings, in expert order */
        int i;
        for (i = 0; i < e; i++) sum[i] += Q[(size_t)j * e + i];
    }
    MOE_OMP_FOR_IF(T > 256)
    for (t = 0; t < T; t++) { /* sig_t = sum - the chosen ones */
        float *sg = hy->sig + (size_t)t * e;
        int i, k;
        memcpy(sg, sum, sizeof(float) * (size_t)e);
        for (k = 0; k < E; k++)
            if (L->gates[(size_t)t * E + k] != 0.0f)
                for (i = 0; i < e; i++) sg[i] -= Q[(size_t)k * e + i];
    }
    moe_matmul_forward(hy->h1, hy->sig, moe_store_param(s, id[MOE_HYPER_PROC1_W]), moe_store_param(s, id[MOE_HYPER_PROC1_B]), T, e, h, &L->work);
    for (t = 0; t < T * h; t++) hy->h1[t] = hy->h1[t] > 0.0f ? hy->h1[t] : 0.0f;
    moe_matmul_forward(hy->cond, hy->h1, moe_store_param(s, id[MOE_HYPER_PROC2_W]), moe_store_param(s, id[MOE_HYPER_PROC2_B]), T, h, q, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(hy->z + (size_t)t * (q + lam), hy->cond + (size_t)t * q, sizeof(float) * (size_t)q);
        memcpy(hy->z + (size_t)t * (q + lam) + q, lemb, sizeof(float) * (size_t)lam);
    }
    moe_matmul_forward(hy->hb, hy->z, moe_store_param(s, id[MOE_HYPER_NET_W]), moe_store_param(s, id[MOE_HYPER_NET_B]), T, q + lam, b, &L->work);
    for (t = 0; t < T * b; t++) hy->hb[t] = hy->hb[t] > 0.0f ? hy->hb[t] : 0.0f;
    moe_matmul_forward(hy->m, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN]), NULL, T, d, ab, &L->work);
    if (c->hyper_head_bias) /* u starts at x . head_down.bias^T + head_down_b.bias */
        moe_matmul_forward(hy->u, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B_BIAS]),
                           T, d, a, &L->work);
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) { /* u = (M_t + B) hb_t, act = ReLU(u), O_t = [act ; 1] (x) hb_t */
        const float *M = hy->m + (size_t)t * ab, *hb = hy->hb + (size_t)t * b;
        float *u = hy->u + (size_t)t * a, *o = hy->o + (size_t)t * (ab + b);
        int i, k;
        for (i = 0; i < a; i++) {
            float acc = 0.0f;
            for (k = 0; k < b; k++) acc += (M[i * b + k] + bdn[i * b + k]) * hb[k];
            u[i] = c->hyper_head_bias ? u[i] + acc : acc;
        }
        if (c->hyper_head_bias) {
            float *a1 = hy->act1 + (size_t)t * (a + 1);
            for (i = 0; i < a; i++) a1[i] = u[i] > 0.0f ? u[i] : 0.0f;
            a1[a] = 1.0f;
        }
        for (i = 0; i <= a; i++) {
            float act = i < a ? (u[i] > 0.0f ? u[i] : 0.0f) : 1.0f;
            for (k = 0; k < b; k++) o[i * b + k] = act * hb[k];
        }
    }
    moe_matmul_forward(out, hy->o, moe_store_param(s, id[MOE_HYPER_HEAD_UP]), NULL, T, ab + b, d, &L->work);
    if (c->hyper_head_bias) { /* out += [act ; 1] . head_up.bias^T */
        moe_matmul_forward(hy->bias_out, hy->act1, moe_store_param(s, id[MOE_HYPER_HEAD_UP_BIAS]), NULL, T, a + 1, d, &L->work);
        for (t = 0; t < T * d; t++) out[t] += hy->bias_out[t];
    }
    for (t = 0; t < T * d; t++) y[t] += out[t];
}

/* dx += the hyper-expert's input gradient; its tensors' gradients += */
static void moe__hyper_backward(moe_layer *L, moe_store *s, float *dx, const float *dy, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_router_hyper *hy = &L->hyper;
    const int *id = hy->id;
    int E = c->n_experts, d = c->d, e = c->hyper_embed, h = c->hyper_hidden, q = c->hyper_cond, T = L->T;
    int lam = c->hyper_layer_dim, b = c->hyper_width, a = c->hyper_adapter, ab = a * b, t, j, i;
    const float *bdn = moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_B]);
    float *dO = hy->d_o, *dM = hy->d_m, *dhb = hy->d_hb, *dz = hy->d_z, *dc = hy->d_cond, *dh1 = hy->d_h1, *dsig = hy->d_sig;
    float *gQ = moe_store_grad(s, id[MOE_HYPER_EXPERT_EMB]);
    float *glemb = moe_store_grad(s, id[MOE_HYPER_LAYER_EMB]) + (size_t)c->hyper_layer * lam;
    memset(dO, 0, sizeof(float) * (size_t)T * (ab + b));
    moe_matmul_backward(dO, moe_store_grad(s, id[MOE_HYPER_HEAD_UP]), NULL, dy, hy->o, moe_store_param(s, id[MOE_HYPER_HEAD_UP]), T, ab + b, d, &L->work);
    if (c->hyper_head_bias) { /* out += act1 . head_up.bias^T */
        memset(hy->d_act1, 0, sizeof(float) * (size_t)T * (a + 1));
        moe_matmul_backward(hy->d_act1, moe_store_grad(s, id[MOE_HYPER_HEAD_UP_BIAS]), NULL, dy, hy->act1,
                            moe_store_param(s, id[MOE_HYPER_HEAD_UP_BIAS]), T, a + 1, d, &L->work);
    }
    MOE_OMP_FOR_IF(T > 64)
    for (t = 0; t < T; t++) {
        const float *M = hy->m + (size_t)t * ab, *hb = hy->hb + (size_t)t * b, *u = hy->u + (size_t)t * a;
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
            if (c->hyper_head_bias) {
                dact += hy->d_act1[(size_t)t * (a + 1) + ii];
                hy->d_u[(size_t)t * a + ii] = u[ii] > 0.0f ? dact : 0.0f;
            }
            du = u[ii] > 0.0f ? dact : 0.0f;
            for (k = 0; k < b; k++) {
                gm[ii * b + k] = du * hb[k];
                ghb[k] += du * (M[ii * b + k] + bdn[ii * b + k]);
            }
        }
        for (k = 0; k < b; k++) ghb[k] = hb[k] > 0.0f ? ghb[k] : 0.0f; /* through hb's ReLU */
    }
    moe__colsum_acc(moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_B]), dM, T, ab); /* d head_down_b = sum_t du (x) hb */
    moe_matmul_backward(dx, moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN]), NULL, dM, x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN]), T, d, ab, &L->work);
    if (c->hyper_head_bias)
        moe_matmul_backward(dx, moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), moe_store_grad(s, id[MOE_HYPER_HEAD_DOWN_B_BIAS]), hy->d_u,
                            x, moe_store_param(s, id[MOE_HYPER_HEAD_DOWN_BIAS]), T, d, a, &L->work);
    memset(dz, 0, sizeof(float) * (size_t)T * (q + lam));
    moe_matmul_backward(dz, moe_store_grad(s, id[MOE_HYPER_NET_W]), moe_store_grad(s, id[MOE_HYPER_NET_B]), dhb, hy->z,
                        moe_store_param(s, id[MOE_HYPER_NET_W]), T, q + lam, b, &L->work);
    for (t = 0; t < T; t++) {
        memcpy(dc + (size_t)t * q, dz + (size_t)t * (q + lam), sizeof(float) * (size_t)q);
        for (i = 0; i < lam; i++) glemb[i] += dz[(size_t)t * (q + lam) + q + i];
    }
    memset(dh1, 0, sizeof(float) * (size_t)T * h);
    moe_matmul_backward(dh1, moe_store_grad(s, id[MOE_HYPER_PROC2_W]), moe_store_grad(s, id[MOE_HYPER_PROC2_B]), dc, hy->h1,
                        moe_store_param(s, id[MOE_HYPER_PROC2_W]), T, h, q, &L->work);
    for (t = 0; t < T * h; t++) dh1[t] = hy->h1[t] > 0.0f ? dh1[t] : 0.0f;
    memset(dsig, 0, sizeof(float) * (size_t)T * e);
    moe_matmul_backward(dsig, moe_store_grad(s, id[MOE_HYPER_PROC1_W]), moe_store_grad(s, id[MOE_HYPER_PROC1_B]), dh1, hy->sig,
                        moe_store_param(s, id[MOE_HYPER_PROC1_W]), T, e, h, &L->work);
    /* sig_t = sum_{j not chosen by t} Q_j: dQ_j += sum over the tokens that did not choose j */
    for (j = 0; j < E; j++)
        for (t = 0; t < T; t++)
            if (L->gates[(size_t)t * E + j] == 0.0f)
                for (i = 0; i < e; i++) gQ[(size_t)j * e + i] += dsig[(size_t)t * e + i];
}
/* ============================================================================================
   >>moe:layer
   ============================================================================================ */

MOE__IMPL moe_layer_args moe_layer_args_default(void) {
    moe_layer_args a;
    memset(&a, 0, sizeof a);
    a.aux_grad_scale = 1.0f;
    return a;
}

static void moe__declare_bank(moe_layer *L, moe_store *s, const char *prefix, const char *bank, int E,
                              int D, int *id_gate, int *id_up, int *id_down, int *id_b_up, int *id_b_down) {
    const moe_layer_config *c = &L->cfg;
    char name[48];
    int d = c->d;
    *id_gate = *id_b_up = *id_b_down = -1;
    /* AoE's routed experts factorise their gate (w_gate_in, w_gate_out), declared by the router */
    if (c->expert == MOE_EXPERT_SWIGLU && !(moe__router_owns_expert_gate(c) && strcmp(bank, "experts") == 0)) {
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

static int moe__assign_alloc(moe_assign *a, int cap, int T, int E) {
    return MOE__ALLOC(a->token, cap, int) && MOE__ALLOC(a->expert, cap, int) && MOE__ALLOC(a->slot, cap, int) &&
           MOE__ALLOC(a->weight, cap, float) && MOE__ALLOC(a->offset, E + 1, int) && MOE__ALLOC(a->tok_offset, T + 1, int) &&
           MOE__ALLOC(a->tok_index, cap > E ? cap : E, int);
}

static void moe__assign_free(moe_assign *a) {
    MOE_FREE(a->token); MOE_FREE(a->expert); MOE_FREE(a->slot); MOE_FREE(a->weight);
    MOE_FREE(a->offset); MOE_FREE(a->tok_offset); MOE_FREE(a->tok_index);
    memset(a, 0, sizeof *a);
}

/* declare_only: the tensors without any buffer (a model's parameter table alone) */
static moe_status moe__layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                  const char *prefix, int max_tokens, int declare_only) {
    int E, K, d, D, S, Ds, cap, rows, wide, k, ok;
    size_t TE;
    memset(L, 0, sizeof *L);
    L->id_router_w = L->id_router_b = L->id_selection_bias = L->noisy.id_w_noise = L->aoe.id_w_in = L->aoe.id_w_out = -1;
    L->id_gate = L->id_up = L->id_down = L->id_b_up = L->id_b_down = -1;
    L->id_s_gate = L->id_s_up = L->id_s_down = L->id_s_b_up = L->id_s_b_down = -1;
    for (k = 0; k < MOE_HYPER_TENSORS; k++) L->hyper.id[k] = -1;
    if (moe_layer_config_validate(cfg, &L->err) != MOE_OK) return L->err.status;
    if (!s || s->allocated) return moe_err_set(&L->err, MOE_ERR_STATE, "moe_layer_init needs a store that is not allocated yet (declare every layer, then moe_store_alloc)");
    if (declare_only) max_tokens = 1;
    if (max_tokens <= 0 || max_tokens > (1 << 24)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "max_tokens must be in [1, 2^24], got %d", max_tokens);
    if (!prefix) prefix = "";
    L->cfg = *cfg;
    E = cfg->n_experts; K = cfg->top_k; d = cfg->d; D = cfg->d_ff;
    S = cfg->n_shared; Ds = S > 0 && cfg->d_ff_shared > 0 ? cfg->d_ff_shared : D; /* unused without shared experts */
    L->cfg.d_ff_shared = Ds;
    L->cfg.router_dim = cfg->router_dim > 0 ? cfg->router_dim : d;
    L->max_tokens = max_tokens;
    cap = L->cap = moe__router_list_rows(cfg, max_tokens);
    moe__router_declare(L, s, prefix);
    moe__declare_bank(L, s, prefix, "experts", E, D, &L->id_gate, &L->id_up, &L->id_down, &L->id_b_up, &L->id_b_down);
    if (S > 0) moe__declare_bank(L, s, prefix, "shared", S, Ds, &L->id_s_gate, &L->id_s_up, &L->id_s_down, &L->id_s_b_up, &L->id_s_b_down);
    moe__router_declare_extensions(L, s, prefix);
    if (L->err.status != MOE_OK || declare_only) return L->err.status;
    TE = (size_t)max_tokens * E;
    rows = cap > S * max_tokens ? cap : S * max_tokens;
    wide = D > Ds ? D : Ds;
    ok = MOE__ALLOC(L->logits, TE, float) && MOE__ALLOC(L->probs, TE, float) && MOE__ALLOC(L->lse, max_tokens, float) &&
         MOE__ALLOC(L->topk, (size_t)max_tokens * K, int) && MOE__ALLOC(L->gates, TE, float) &&
         MOE__ALLOC(L->d_gates, TE, float) && MOE__ALLOC(L->d_logits, TE, float) &&
         MOE__ALLOC(L->aux.picks, E, float) && MOE__ALLOC(L->aux.balance_f, E, float) && MOE__ALLOC(L->aux.mean_prob, E, float) &&
         MOE__ALLOC(L->aux.token_probs, E, float) && MOE__ALLOC(L->aux.d_mean_prob, E, float) &&
         MOE__ALLOC(L->xg, (size_t)cap * d, float) && MOE__ALLOC(L->eout, (size_t)cap * d, float) &&
         MOE__ALLOC(L->hg, (size_t)cap * D, float) && MOE__ALLOC(L->hu, (size_t)cap * D, float) &&
         MOE__ALLOC(L->raw_token, rows, int) && MOE__ALLOC(L->raw_expert, rows, int) && MOE__ALLOC(L->raw_slot, rows, int) &&
         MOE__ALLOC(L->raw_weight, rows, float) && MOE__ALLOC(L->admitted, (size_t)max_tokens * K, int) &&
         MOE__ALLOC(L->capacity_count, E, int) && MOE__ALLOC(L->d_weight, cap, float) &&
         MOE__ALLOC(L->dxg, (size_t)rows * d, float) && MOE__ALLOC(L->deout, (size_t)rows * d, float) &&
         MOE__ALLOC(L->experts_dh_gate, (size_t)rows * wide, float) && MOE__ALLOC(L->experts_scratch, (size_t)rows * wide, float) &&
         MOE__ALLOC(L->stat_load, E, float) && MOE__ALLOC(L->stat_prob, E, float) &&
         moe__assign_alloc(&L->routed, cap, max_tokens, E) && moe__router_alloc(L);
    if (ok && S > 0)
        ok = moe__assign_alloc(&L->shared, S * max_tokens, max_tokens, S) && MOE__ALLOC(L->s_xg, (size_t)S * max_tokens * d, float) &&
             MOE__ALLOC(L->s_eout, (size_t)S * max_tokens * d, float) && MOE__ALLOC(L->s_hg, (size_t)S * max_tokens * Ds, float) &&
             MOE__ALLOC(L->s_hu, (size_t)S * max_tokens * Ds, float);
    { /* the work buffer: the largest of the kernel calls' scratch; every router sends a token
         to an expert at most once, so an expert gets at most max_tokens rows. (K, N) of the
         matmuls: the linear (and noise) router, AoE's, HyperMoE's */
        int nt = moe_num_threads(), r = cfg->router == MOE_ROUTER_AOE ? cfg->aoe_rank : 0, a = cfg->hyper ? cfg->hyper_adapter : 0;
        /* HyperMoE's sizes mean nothing without it (and are bounded by the validation with it) */
        int hw = cfg->hyper ? cfg->hyper_width : 0, ab = a * hw, he = cfg->hyper ? cfg->hyper_embed : 0;
        int hh = cfg->hyper ? cfg->hyper_hidden : 0, hc = cfg->hyper ? cfg->hyper_cond : 0, hl = cfg->hyper ? cfg->hyper_layer_dim : 0;
        int mm[10][2] = {{L->cfg.router_dim, E}, {d, E * r}, {r, D}, {he, hh}, {hh, hc}, {hc + hl, hw}, {d, ab}, {ab + hw, d},
                         {d, a}, {a + 1, d}};
        size_t need = moe_experts_work_floats(max_tokens, E, d, D, cfg->expert, nt), w;
        if (S > 0 && (w = moe_experts_work_floats(max_tokens, S, d, Ds, cfg->expert, nt)) > need) need = w;
        for (k = 0; k < (cfg->hyper ? 10 : 3); k++)
            if ((w = moe_matmul_work_floats(max_tokens, mm[k][0], mm[k][1], nt)) > need) need = w;
        ok = ok && moe_work_alloc(&L->work, need, nt) == MOE_OK;
    }
    if (!ok) {
        moe_layer_free(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the buffers of a layer of %d tokens (E = %d, d = %d, d_ff = %d)",
                           max_tokens, E, d, D);
    }
    L->stats.load = L->stat_load;
    L->stats.mean_prob = L->stat_prob;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_init(moe_layer *L, const moe_layer_config *cfg, moe_store *s,
                                    const char *prefix, int max_tokens) {
    return moe__layer_init(L, cfg, s, prefix, max_tokens, 0);
}

MOE__IMPL void moe_layer_free(moe_layer *L) {
    float **fp[] = {&L->logits, &L->probs, &L->lse, &L->gates, &L->d_gates, &L->d_logits, &L->aux.picks, &L->aux.balance_f,
                    &L->aux.mean_prob, &L->aux.token_probs, &L->aux.d_mean_prob, &L->xg, &L->eout, &L->hg, &L->hu,
                    &L->s_xg, &L->s_hg, &L->s_hu, &L->s_eout, &L->raw_weight, &L->d_weight, &L->dxg, &L->deout,
                    &L->experts_dh_gate, &L->experts_scratch, &L->stat_load, &L->stat_prob};
    int **ip[] = {&L->topk, &L->raw_token, &L->raw_expert, &L->raw_slot, &L->admitted, &L->capacity_count};
    size_t i;
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) {
        MOE_FREE(*fp[i]);
        *fp[i] = NULL;
    }
    for (i = 0; i < sizeof ip / sizeof ip[0]; i++) {
        MOE_FREE(*ip[i]);
        *ip[i] = NULL;
    }
    moe__router_free(L);
    moe__assign_free(&L->routed);
    moe__assign_free(&L->shared);
    moe_work_free(&L->work);
    L->stats.load = L->stats.mean_prob = NULL;
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
    int ids[] = {L->id_gate, L->id_up, L->id_down, L->id_b_up, L->id_b_down, L->id_s_gate, L->id_s_up, L->id_s_down,
                 L->id_s_b_up, L->id_s_b_down};
    size_t k, i;
    moe__router_init_weights(L, s, rng); /* first: the draws' order is part of the results */
    for (k = 0; k < sizeof ids / sizeof ids[0]; k++) {
        const moe_tensor *t;
        float *p = moe_store_param(s, ids[k]);
        if (!p) continue;
        t = &s->tensors[ids[k]];
        if (t->ndim == 3) { /* (E, out, in): nn.Linear's U(-1/sqrt(in), 1/sqrt(in)) */
            float bound = 1.0f / sqrtf((float)t->shape[2]);
            for (i = 0; i < t->numel; i++) p[i] = bound * (2.0f * moe_rng_uniform(rng) - 1.0f);
        } else {
            memset(p, 0, t->numel * sizeof(float)); /* biases */
        }
    }
}

static moe_status moe__layer_check(moe_layer *L, const moe_store *s) {
    if (!L->logits) return moe_err_set(&L->err, MOE_ERR_STATE, "layer is not initialised (moe_layer_init failed or was not called)");
    if (!s || !s->allocated || L->id_down >= s->count) return moe_err_set(&L->err, MOE_ERR_STATE, "the store is not allocated or does not hold this layer's tensors");
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_update_selection_bias(moe_layer *L, moe_store *s, float gamma) {
    const float *c = L->aux.picks;
    float *b;
    double mean = 0.0;
    int E = L->cfg.n_experts, e;
    if (moe__layer_check(L, s) != MOE_OK) return L->err.status;
    if (L->id_selection_bias < 0) return moe_err_set(&L->err, MOE_ERR_STATE, "the layer has no selection bias (set selection_bias in its config)");
    if (L->T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "update_selection_bias needs a forward before it (it reads that forward's expert loads)");
    if (!(gamma >= 0.0f) || gamma > 1e6f) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "gamma must be finite and >= 0, got %g", (double)gamma);
    b = moe_store_param(s, L->id_selection_bias);
    for (e = 0; e < E; e++) mean += c[e];
    mean /= E;
    for (e = 0; e < E; e++) b[e] += c[e] > mean ? -gamma : c[e] < mean ? gamma : 0.0f;
    return MOE_OK;
}

/* the shared bank: every token to every shared expert, weight 1; y is overwritten */
static moe_status moe__shared_forward(moe_layer *L, const moe_store *s, float *y, const float *x, int T) {
    const moe_layer_config *c = &L->cfg;
    int S = c->n_shared, t, j, k;
    moe_expert_weights w = moe_layer_experts(L, s, 1, 0);
    moe_status st;
    for (t = 0, k = 0; t < T; t++)
        for (j = 0; j < S; j++, k++) {
            L->raw_token[k] = t; L->raw_expert[k] = j; L->raw_slot[k] = j; L->raw_weight[k] = c->shared_scale;
        }
    st = moe_dispatch(&L->shared, L->raw_token, L->raw_expert, L->raw_slot, L->raw_weight, S * T, T, S, &L->err);
    if (st != MOE_OK) return st;
    moe_gather(L->s_xg, x, &L->shared, c->d);
    moe_experts_forward(L->s_eout, L->s_hg, L->s_hu, L->s_xg, &w, L->shared.offset, S, c->d, c->d_ff_shared, c->expert, c->activation, &L->work);
    moe_combine_forward(y, L->s_eout, &L->shared, c->d, 0);
    return MOE_OK;
}

static void moe__shared_backward(moe_layer *L, moe_store *s, float *dx, const float *dy) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 1, 0), gw = moe_layer_experts(L, s, 1, 1);
    moe_combine_backward(L->deout, NULL, dy, L->s_eout, &L->shared, c->d);
    moe_experts_backward(L->dxg, &gw, L->deout, L->s_xg, L->s_hg, L->s_hu, &w, L->shared.offset, c->n_shared, c->d,
                         c->d_ff_shared, c->expert, c->activation, L->experts_dh_gate, L->experts_scratch, &L->work);
    moe_gather_backward(dx, L->dxg, &L->shared, c->d);
}

/* the routed bank: gather, the router's gate pre-activation (AoE), experts, combine (onto the
   shared experts' output when there are any) */
static moe_status moe__routed_forward(moe_layer *L, const moe_store *s, float *y, const float *x) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 0, 0);
    moe_status st;
    moe_gather(L->xg, x, &L->routed, c->d);
    moe__router_expert_gate_forward(L, s);
    if (L->runner) {
        if ((st = L->runner->forward(L, s, L->runner->user)) != MOE_OK) return st;
    } else {
        moe_experts_forward(L->eout, L->hg, L->hu, L->xg, &w, L->routed.offset, c->n_experts, c->d, c->d_ff, c->expert, c->activation, &L->work);
    }
    moe_combine_forward(y, L->eout, &L->routed, c->d, c->n_shared > 0);
    return MOE_OK;
}

/* after combine's backward (deout, d_weight) */
static moe_status moe__routed_backward(moe_layer *L, moe_store *s, float *dx) {
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe_layer_experts(L, s, 0, 0), gw = moe_layer_experts(L, s, 0, 1);
    moe_status st;
    if (L->runner) {
        if ((st = L->runner->backward(L, s, L->runner->user)) != MOE_OK) return st;
    } else {
        moe_experts_backward(L->dxg, &gw, L->deout, L->xg, L->hg, L->hu, &w, L->routed.offset, c->n_experts, c->d, c->d_ff,
                             c->expert, c->activation, L->experts_dh_gate, L->experts_scratch, &L->work);
    }
    moe_gather_backward(dx, L->dxg, &L->routed, c->d);
    moe__router_expert_gate_backward(L, s);
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_forward(moe_layer *L, const moe_store *s, float *y, const float *x,
                                       int T, const moe_layer_args *args) {
    moe_layer_args a = args ? *args : moe_layer_args_default();
    moe_status st;
    int n;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (!y || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer forward: x and y must not be NULL");
    if (T <= 0 || T > L->max_tokens) return moe_err_set(&L->err, MOE_ERR_SHAPE, "layer forward: T = %d tokens, the layer was sized for 1..%d", T, L->max_tokens);
    if (L->cfg.router_dim != L->cfg.d && !a.router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "router_dim %d differs from d %d: give the router's input in moe_layer_args.router_input", L->cfg.router_dim, L->cfg.d);
    L->T = 0;
    if ((st = moe__router_forward(L, s, x, T, &a, &n)) != MOE_OK) return st;
    st = moe_dispatch(&L->routed, L->raw_token, L->raw_expert, L->raw_slot, L->raw_weight, n, T, L->cfg.n_experts, &L->err);
    if (st != MOE_OK) return st;
    if (L->cfg.n_shared > 0 && (st = moe__shared_forward(L, s, y, x, T)) != MOE_OK) return st;
    if ((st = moe__routed_forward(L, s, y, x)) != MOE_OK) return st;
    moe__router_output_forward(L, s, y, x, T);
    moe__router_aux(L, T);
    L->fwd_router_input = a.router_input;
    L->T = T;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_backward(moe_layer *L, moe_store *s, float *dx, const float *dy,
                                        const float *x, const moe_layer_args *args) {
    moe_layer_args a = args ? *args : moe_layer_args_default();
    moe_status st;
    if ((st = moe__layer_check(L, s)) != MOE_OK) return st;
    if (L->T == 0) return moe_err_set(&L->err, MOE_ERR_STATE, "layer backward called without a forward before it");
    if (!dx || !dy || !x) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: dx, dy and x must not be NULL");
    if (a.router_input != L->fwd_router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: give it the router_input of the forward before it");
    if (a.router_input && !a.d_router_input)
        return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "layer backward: router_input is set, so d_router_input must be too");
    moe_combine_backward(L->deout, L->d_weight, dy, L->eout, &L->routed, L->cfg.d);
    moe__router_output_backward(L, s, dx, dy, x);
    if ((st = moe__routed_backward(L, s, dx)) != MOE_OK) return st;
    if (L->cfg.n_shared > 0) moe__shared_backward(L, s, dx, dy);
    moe__router_backward(L, s, dx, x, a.router_input ? a.router_input : x, a.router_input ? a.d_router_input : dx,
                         a.aux_grad_scale, a.balance_f);
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
   >>moe:router_input
   ============================================================================================
   The model's fields it uses (>>moe:model): the GRU's ids (id_gru_*), per MoE block the
   projector id_rproj and the caches rxp (N, p), rh (N, p) = r_l, rgi, rgh (N, 3p), rh_prev;
   the model's r_zero (h_0), r_drin (dL/dr_l), r_carry (dL/dh through depth), r_dxp, r_scratch. */

static int moe__model_add(moe_model *m, const char *name, int flags, int n0, int n1, int n2); /* >>moe:model */

static int moe__router_input_is_gru(const moe_model_config *c) {
    return c->router_input >= MOE_RIN_GRU && c->router_input <= MOE_RIN_GRU_DETACH;
}

/* the shared GRU, declared after the embeddings */
static void moe__router_input_declare(moe_model *m) {
    int P = m->cfg.router_dim;
    if (!moe__router_input_is_gru(&m->cfg)) return;
    m->id_gru_wih = moe__model_add(m, "rmoe.gru.w_ih", MOE_TENSOR_DECAY, 3 * P, P, 0);
    m->id_gru_whh = moe__model_add(m, "rmoe.gru.w_hh", MOE_TENSOR_DECAY, 3 * P, P, 0);
    m->id_gru_bih = moe__model_add(m, "rmoe.gru.b_ih", 0, 3 * P, 0, 0);
    m->id_gru_bhh = moe__model_add(m, "rmoe.gru.b_hh", 0, 3 * P, 0, 0);
}

/* block l's projector P_l (p, d), declared before the block's MoE layer */
static void moe__router_input_declare_block(moe_model *m, moe_block *b, int l) {
    char name[MOE_NAME_LEN];
    if (!b->is_moe || m->cfg.router_input == MOE_RIN_DIRECT) return;
    sprintf(name, "l%d.rmoe.proj", l);
    b->id_rproj = moe__model_add(m, name, MOE_TENSOR_DECAY, m->cfg.router_dim, m->cfg.d, 0);
}

/* buffers for N tokens: the block's caches; 0 when out of memory */
static int moe__router_input_alloc_block(moe_model *m, moe_block *b, int N) {
    size_t Np = (size_t)N * m->cfg.router_dim;
    if (b->id_rproj < 0) return 1;
    return MOE__ALLOC(b->rxp, Np, float) && MOE__ALLOC(b->rh, Np, float) && MOE__ALLOC(b->rgi, Np * 3, float) &&
           MOE__ALLOC(b->rgh, Np * 3, float);
}

/* the model's: h_0, the gradients through depth, the GRU's backward scratch */
static int moe__router_input_alloc(moe_model *m, int N) {
    size_t Np = (size_t)N * m->cfg.router_dim;
    if (m->cfg.router_input == MOE_RIN_DIRECT) return 1;
    return MOE__ALLOC(m->r_zero, Np, float) && MOE__ALLOC(m->r_drin, Np, float) && MOE__ALLOC(m->r_carry, Np, float) &&
           MOE__ALLOC(m->r_dxp, Np, float) && MOE__ALLOC(m->r_scratch, Np * 6, float);
}

static void moe__router_input_free_block(moe_block *b) {
    MOE_FREE(b->rxp); MOE_FREE(b->rh); MOE_FREE(b->rgi); MOE_FREE(b->rgh);
    b->rxp = b->rh = b->rgi = b->rgh = NULL;
}

static void moe__router_input_free(moe_model *m) {
    MOE_FREE(m->r_zero); MOE_FREE(m->r_drin); MOE_FREE(m->r_carry); MOE_FREE(m->r_dxp); MOE_FREE(m->r_scratch);
    m->r_zero = m->r_drin = m->r_carry = m->r_dxp = m->r_scratch = NULL;
}

/* the init std of this section's tensors (1 for them, 0 for other tensors): the GRU at torch's
   scale 1/sqrt(p), the projector so that x' has about unit scale */
static int moe__router_input_init_std(const moe_model *m, const char *name, float *sd) {
    if (strncmp(name, "rmoe.gru.w", 10) == 0) *sd = 1.0f / sqrtf((float)m->cfg.router_dim);
    else if (moe__ends_with(name, "rmoe.proj")) *sd = 1.0f / sqrtf((float)m->cfg.d);
    else return 0;
    return 1;
}

/* a kernel call of block l's router input that failed (only a workspace that does not fit
   its call can): the status, with what failed, in m->err */
static moe_status moe__router_input_err(moe_model *m, moe_status st, int l, const char *what) {
    return moe_err_set(&m->err, st, "layer %d, %s: %s", l, what, moe_status_string(st));
}

/* block b's (layer l's) router input r_l (b->rh) from its normalised hidden state b->ln2;
   *h_prev = the state of the MoE layer below (m->r_zero before the first), replaced by the
   state for the next. The kernels run on the model's workspace m->work. */
static moe_status moe__router_input_forward(moe_model *m, moe_block *b, const float **h_prev, int N, int l) {
    const moe_model_config *c = &m->cfg;
    size_t Np = (size_t)N * c->router_dim;
    moe_status st = moe_matmul_forward(b->rxp, b->ln2, moe_store_param(&m->S, b->id_rproj), NULL, N, c->d, c->router_dim, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router-input projector");
    if (c->router_input == MOE_RIN_MLP) {
        moe_activation_forward(b->rh, b->rxp, Np, MOE_ACT_GELU);
        return MOE_OK;
    }
    b->rh_prev = c->router_input == MOE_RIN_GRU_NP ? m->r_zero : *h_prev;
    st = moe_gru_forward(b->rh, b->rgi, b->rgh, b->rxp, b->rh_prev, moe_store_param(&m->S, m->id_gru_wih),
                         moe_store_param(&m->S, m->id_gru_whh), moe_store_param(&m->S, m->id_gru_bih),
                         moe_store_param(&m->S, m->id_gru_bhh), N, c->router_dim, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router GRU");
    *h_prev = b->rh;
    return MOE_OK;
}

/* Backward of block b's router input. On entry r_drin holds dL/dr_l from the layer and, for
   the GRU kinds, r_carry holds dL/dh_l from the MoE layer above; on exit r_carry holds
   dL/dh_{l-1} (0 for the NP and detach ablations) and d_ln has received the projector's input
   gradient. l: the block's index, for the error. */
static moe_status moe__router_input_backward(moe_model *m, const moe_block *b, int l) {
    const moe_model_config *c = &m->cfg;
    int N = m->B * m->T, P = c->router_dim;
    size_t i, Np = (size_t)N * P;
    moe_store *S = &m->S;
    moe_status st;
    memset(m->r_dxp, 0, sizeof(float) * Np);
    if (c->router_input == MOE_RIN_MLP) {
        moe_activation_backward(m->r_dxp, m->r_drin, b->rxp, Np, MOE_ACT_GELU);
    } else {
        for (i = 0; i < Np; i++) m->r_drin[i] += m->r_carry[i]; /* dL/dh_l: own router + layers above */
        memset(m->r_carry, 0, sizeof(float) * Np);
        st = moe_gru_backward(m->r_dxp, m->r_carry, moe_store_grad(S, m->id_gru_wih), moe_store_grad(S, m->id_gru_whh),
                              moe_store_grad(S, m->id_gru_bih), moe_store_grad(S, m->id_gru_bhh), m->r_drin, b->rxp,
                              b->rh_prev, b->rgi, b->rgh, moe_store_param(S, m->id_gru_wih),
                              moe_store_param(S, m->id_gru_whh), N, P, m->r_scratch, &m->work);
        if (st != MOE_OK) return moe__router_input_err(m, st, l, "router GRU backward");
        if (c->router_input != MOE_RIN_GRU) memset(m->r_carry, 0, sizeof(float) * Np);
    }
    st = moe_matmul_backward(m->d_ln, moe_store_grad(S, b->id_rproj), NULL, m->r_dxp, b->ln2,
                             moe_store_param(S, b->id_rproj), N, c->d, P, &m->work);
    if (st != MOE_OK) return moe__router_input_err(m, st, l, "router-input projector backward");
    return MOE_OK;
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

#define MOE__MAX_WIDTH (1 << 24)

MOE__IMPL moe_status moe_model_config_validate(const moe_model_config *c, moe_err *err) {
    const moe_status bad = MOE_ERR_INVALID_ARG;
    int any;
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
    /* the declarations multiply widths by small constants in int (3 d for QKV, 3 router_dim for
       the GRU) before the store can weigh the tensor, so every width is bounded first */
    if (c->vocab > MOE__MAX_WIDTH || c->d > MOE__MAX_WIDTH || c->router_dim > MOE__MAX_WIDTH)
        return moe_err_set(err, bad, "vocab (%d), d (%d) and router_dim (%d) must be at most %d", c->vocab, c->d, c->router_dim, MOE__MAX_WIDTH);
    any = c->moe_every > 0 && c->dense_first < c->n_layers; /* layer dense_first is MoE */
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

/* d_ff where some block is dense, else 0: an all-MoE model stores a d_ff it never uses, which
   must size no buffer (a model file's d_ff is then bounded by nothing it holds) */
static size_t moe__dense_width(const moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (!m->blocks[l].is_moe) return (size_t)m->cfg.d_ff;
    return 0;
}

/* max_numel > 0 (moe_model_declare): declare the tensors only, within that budget */
static moe_status moe__model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T, size_t max_numel) {
    int l, d, N, L, NH, V, F;
    char name[MOE_NAME_LEN];
    size_t Nd;
    int ok = 1, declare_only = max_numel > 0;
    moe_block one; /* declare_only: every layer's ids go here, no (n_layers) array */
    memset(m, 0, sizeof *m);
    if (moe_model_config_validate(c, &m->err) != MOE_OK) return m->err.status;
    if (declare_only) max_B = max_T = 1;
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
    m->blocks = declare_only ? NULL : (moe_block *)moe__calloc((size_t)L, sizeof(moe_block));
    if (!m->blocks && !declare_only) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory");
    m->id_wte = moe__model_add(m, "wte", MOE_TENSOR_DECAY, V, d, 0);
    m->id_wpe = c->pos == MOE_POS_LEARNED ? moe__model_add(m, "wpe", MOE_TENSOR_DECAY, c->max_seq, d, 0) : -1;
    moe__router_input_declare(m);
    for (l = 0; l < L; l++) {
        moe_block *b = declare_only ? &one : &m->blocks[l];
        if (declare_only && m->err.status == MOE_OK && m->S.numel > max_numel)
            moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "the config implies more than %zu parameters (%zu by layer %d of %d)", max_numel, m->S.numel, l, L);
        if (m->err.status != MOE_OK) break;
        if (declare_only) memset(b, 0, sizeof *b);
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
        moe__router_input_declare_block(m, b, l);
        if (b->is_moe) {
            if (m->err.status == MOE_OK) {
                sprintf(name, "l%d.moe.", l);
                moe_layer_config lc = m->cfg.moe;
                lc.hyper_layers = L; /* the shared layer embedding has a row per layer */
                lc.hyper_layer = l;
                if (moe__layer_init(&b->moe, &lc, &m->S, name, N, declare_only) != MOE_OK)
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
    if (declare_only && m->err.status == MOE_OK && m->S.numel > max_numel)
        moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "the config implies %zu parameters, more than %zu", m->S.numel, max_numel);
    if (m->err.status != MOE_OK) { moe_model_free(m); return m->err.status; }
    if (declare_only) return MOE_OK;
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
        ok = ok && moe__router_input_alloc_block(m, b, N);
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
    m->scratch1 = (float *)moe__calloc((size_t)N * moe__dense_width(m), sizeof(float));
    m->scratch2 = (float *)moe__calloc((size_t)N * moe__dense_width(m), sizeof(float));
    ok = ok && moe__router_input_alloc(m, N);
    if (ok && c->moe_every > 0 && moe__router_draws_noise(&c->moe)) ok = MOE__ALLOC(m->routing_noise, (size_t)N * c->moe.n_experts, float);
    if (ok && c->balance_all_layers) ok = MOE__ALLOC(m->balance_f_all, c->moe.n_experts, float);
    ok = ok && m->inputs && m->targets && m->x_final && m->lnf && m->rstd_f && m->logits && m->losses &&
         m->rope && m->d_res && m->d_res2 && m->d_ln && m->d_qkv && m->d_atty && m->d_logits && m->scratch1 && m->scratch2;
    { /* ONE work buffer: the largest scratch of the model's kernel calls and its layers' */
        int nt = moe_num_threads(), dense = 0, P = c->router_dim;
        size_t need = moe_attention_work_floats(max_T, d, NH, nt), w, k;
        size_t mm[4];
        mm[0] = moe_matmul_work_floats(N, d, 3 * d, nt); /* qkv */
        mm[1] = moe_matmul_work_floats(N, d, d, nt);     /* attention output */
        mm[2] = moe_matmul_work_floats(N, d, V, nt);     /* tied head */
        mm[3] = c->router_input != MOE_RIN_DIRECT ? moe_matmul_work_floats(N, d, P, nt) : 0; /* router-input projector */
        for (k = 0; k < 4; k++) need = mm[k] > need ? mm[k] : need;
        for (l = 0; l < L; l++) dense |= !m->blocks[l].is_moe;
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
        ok = ok && MOE__ALLOC(m->gen_probs, (size_t)V * 2, float);
        ok = ok && MOE__ALLOC(m->layer_scale, L, float);
        for (l = 0; ok && l < L; l++) m->layer_scale[l] = 1.0f;
    }
    if (!ok) {
        moe_model_free(m);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the activations of %d x %d tokens", max_B, max_T);
    }
    if (c->pos == MOE_POS_ROPE) moe_rope_table(m->rope, max_T, d / NH, c->rope_theta);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_init(moe_model *m, const moe_model_config *c, int max_B, int max_T) {
    return moe__model_init(m, c, max_B, max_T, 0);
}

MOE__IMPL moe_status moe_model_declare(moe_model *m, const moe_model_config *c, size_t max_numel) {
    return moe__model_init(m, c, 1, 1, max_numel > 0 ? max_numel : (size_t)-1);
}

MOE__IMPL moe_status moe_model_param_count(const moe_model_config *c, size_t *numel, moe_err *err) {
    moe_model m;
    moe_status st = moe_model_declare(&m, c, 0);
    if (st == MOE_OK) *numel = m.S.numel;
    else if (err) *err = m.err;
    moe_model_free(&m);
    return st;
}

static void moe__groups_free(moe_model *m) {
    int q;
    for (q = 0; q < m->n_lanes; q++) {
        moe_group_lane *ln = &m->lanes[q];
        MOE_FREE(ln->att); MOE_FREE(ln->da); MOE_FREE(ln->g); MOE_FREE(ln->d_ln); MOE_FREE(ln->d_atty);
        MOE_FREE(ln->d_qkv); MOE_FREE(ln->scratch1); MOE_FREE(ln->scratch2);
        moe_work_free(&ln->work);
    }
    MOE_FREE(m->lanes);
    MOE_FREE(m->group_size);
    m->lanes = NULL;
    m->group_size = NULL;
    m->n_lanes = 0;
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
            moe__router_input_free_block(b);
        }
        MOE_FREE(m->blocks);
    }
    MOE_FREE(m->inputs); MOE_FREE(m->targets); MOE_FREE(m->x_final); MOE_FREE(m->lnf); MOE_FREE(m->rstd_f);
    MOE_FREE(m->logits); MOE_FREE(m->losses); MOE_FREE(m->rope); MOE_FREE(m->d_res); MOE_FREE(m->d_res2);
    MOE_FREE(m->d_ln); MOE_FREE(m->d_qkv); MOE_FREE(m->d_atty); MOE_FREE(m->d_logits);
    MOE_FREE(m->scratch1); MOE_FREE(m->scratch2);
    moe__router_input_free(m);
    moe__groups_free(m);
    MOE_FREE(m->routing_noise);
    MOE_FREE(m->balance_f_all);
    MOE_FREE(m->gen_probs);
    MOE_FREE(m->layer_scale);
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
        if (moe__router_input_init_std(m, t->name, &sd)) { /* the GRU, the projectors */
        } else if (moe__ends_with(t->name, "router.w")) sd = m->cfg.moe.router_init_std;
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

/* balance_all_layers: one balance loss over all MoE layers' tokens, f_all = mean_l f_l and
   P_all = mean_l P_l (every layer sees the same T tokens); it replaces the layers' own
   balance terms in aux_loss, and each layer's backward differentiates it through its P_l with
   f_all / L_moe */
static void moe__model_balance_all_layers(moe_model *m) {
    const moe_layer_config *c = &m->cfg.moe;
    int E = c->n_experts, l, e, n = 0;
    double acc = 0.0, own = 0.0;
    float *f = m->balance_f_all;
    for (e = 0; e < E; e++) f[e] = 0.0f;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_layer *L = &m->blocks[l].moe;
        if (!m->blocks[l].is_moe) continue;
        for (e = 0; e < E; e++) f[e] += L->aux.balance_f[e];
        own += L->stats.aux_balance;
        n++;
    }
    if (n == 0 || c->balance == MOE_BALANCE_NONE) return;
    for (e = 0; e < E; e++) {
        double P = 0.0;
        for (l = 0; l < m->cfg.n_layers; l++)
            if (m->blocks[l].is_moe) P += m->blocks[l].moe.aux.mean_prob[e];
        f[e] /= (float)n;
        acc += (double)f[e] * (P / n);
        f[e] /= (float)n; /* the gradient through each P_l carries 1 / L_moe */
    }
    m->aux_loss += c->balance_coef * (c->balance == MOE_BALANCE_DEEPSEEK ? 1.0 : (double)E) * acc - own;
}

/* A kernel call that fails (only a workspace that does not fit its call can) ends the pass
   with the kernel's status and what failed (layer l, or the model's own parts for l < 0). */
static moe_status moe__model_kernel_err(moe_err *err, moe_status st, int l, const char *what) {
    if (l < 0) return moe_err_set(err, st, "%s: %s", what, moe_status_string(st));
    return moe_err_set(err, st, "layer %d, %s: %s", l, what, moe_status_string(st));
}
#define MOE__ERR_TRY(err, call, l, what)                                                 \
    do {                                                                                 \
        moe_status st_ = (call);                                                         \
        if (st_ != MOE_OK) return moe__model_kernel_err(err, st_, l, what);              \
    } while (0)
#define MOE__MODEL_TRY(call, l, what) MOE__ERR_TRY(&m->err, call, l, what)

/* Block l's halves, forward and backward, on the given workspace, errors into err: the layer
   loop runs them one layer at a time on the model's buffers, a CQIL group runs its members'
   halves concurrently, each on its lane (>>moe:model, moe_model_set_groups). */

/* x2 = x + Attn(RMSNorm(x)); the projection lands in att (a CQIL member's a_q, which its
   bypass reads) or, att NULL, in x2 itself */
static moe_status moe__block_attention_forward(moe_model *m, int l, int B, int T, float *att, moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    int d = c->d, N = B * T, i;
    moe_rmsnorm_forward(b->ln1, b->rstd1, b->x, moe_store_param(&m->S, b->id_ln1), N, d, c->norm_eps);
    MOE__ERR_TRY(err, moe_matmul_forward(b->qkv, b->ln1, moe_store_param(&m->S, b->id_qkv), NULL, N, d, 3 * d, work), l, "qkv");
    if (c->pos == MOE_POS_ROPE) moe_rope_apply(b->qkv, m->rope, B, T, d, c->n_heads, 0);
    MOE__ERR_TRY(err, moe_attention_forward(b->atty, b->att, b->qkv, B, T, d, c->n_heads, work), l, "attention");
    MOE__ERR_TRY(err, moe_matmul_forward(att ? att : b->x2, b->atty, moe_store_param(&m->S, b->id_wo), NULL, N, d, d, work), l,
                 "attention output");
    if (att)
        for (i = 0; i < N * d; i++) b->x2[i] = att[i] + b->x[i];
    else if (m->layer_scale[l] != 1.0f) { /* masked growth: x2 = x + s_l Attn(..) */
        float s = m->layer_scale[l];
        for (i = 0; i < N * d; i++) b->x2[i] = s * b->x2[i] + b->x[i];
    } else
        for (i = 0; i < N * d; i++) b->x2[i] += b->x[i];
    return MOE_OK;
}

/* an MoE block's per-call args in a forward over sequences of T tokens (noise: its draws or NULL) */
static moe_layer_args moe__block_args(const moe_model *m, int T, const float *noise) {
    moe_layer_args a = moe_layer_args_default();
    a.seq_len = T;
    a.gw_active = m->gw_broadcast;
    a.noise = noise;
    return a;
}

/* ffn = FFN(RMSNorm(x2)) on N tokens; a: the MoE layer's per-call args (seq_len, gw_active,
   noise, dropless: the caller's; router_input is set here); rh_prev: RMoE's state chain (NULL in
   a CQIL group, where such routers are refused). The full forward, a CQIL group and the cached
   decoding (>>moe:generate) share it, so all run the same arithmetic per token. */
static moe_status moe__block_ffn_forward(moe_model *m, int l, int N, moe_layer_args a, const float **rh_prev, moe_work *work,
                                         moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    int d = c->d;
    moe_rmsnorm_forward(b->ln2, b->rstd2, b->x2, moe_store_param(&m->S, b->id_ln2), N, d, c->norm_eps);
    if (b->is_moe) {
        moe_work keep = b->moe.work; /* the model's, or a lane's for this call */
        moe_status st;
        if (b->id_rproj >= 0) { /* the router's input: GRU state or MLP hidden layer */
            st = moe__router_input_forward(m, b, rh_prev, N, l);
            if (st != MOE_OK) return st;
            a.router_input = b->rh;
        }
        b->moe.work = *work;
        st = moe_layer_forward(&b->moe, &m->S, b->ffn, b->ln2, N, &a);
        b->moe.work = keep;
        if (st != MOE_OK) return moe_err_set(err, st, "layer %d: %s", l, b->moe.err.msg);
    } else {
        moe_expert_weights w = moe__dense_ffn(m, b, 0);
        int offset[2];
        offset[0] = 0;
        offset[1] = N;
        MOE__ERR_TRY(err, moe_experts_forward(b->ffn, b->hg, b->hu, b->ln2, &w, offset, 1, d, c->d_ff, MOE_EXPERT_SWIGLU, MOE_ACT_SILU, work),
                     l, "dense FFN");
    }
    return MOE_OK;
}

/* the FFN half backward from dout = dL/d(ffn): acc += RMSNorm2'(d ffn input) (dL/dx2 through
   the FFN); d_ln, scratch1, scratch2 are the call's scratch */
static moe_status moe__block_ffn_backward(moe_model *m, int l, const float *dout, float *acc, float scale, float *d_ln,
                                          float *scratch1, float *scratch2, moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    moe_store *S = &m->S;
    int N = m->B * m->T, d = c->d;
    memset(d_ln, 0, sizeof(float) * (size_t)N * d);
    if (b->is_moe) {
        moe_layer_args a = moe_layer_args_default();
        moe_work keep = b->moe.work;
        moe_status st;
        a.aux_grad_scale = scale; /* dout already carries the scale from d_logits */
        a.balance_f = m->balance_f_all; /* NULL: each layer's own balance loss */
        if (b->id_rproj >= 0) {
            a.router_input = b->rh;
            a.d_router_input = m->r_drin;
            memset(m->r_drin, 0, sizeof(float) * (size_t)N * c->router_dim);
        }
        b->moe.work = *work;
        st = moe_layer_backward(&b->moe, S, d_ln, dout, b->ln2, &a);
        b->moe.work = keep;
        if (st != MOE_OK) return moe_err_set(err, st, "layer %d: %s", l, b->moe.err.msg);
        if (b->id_rproj >= 0 && (st = moe__router_input_backward(m, b, l)) != MOE_OK) return st;
    } else {
        moe_expert_weights w = moe__dense_ffn(m, b, 0), gw = moe__dense_ffn(m, b, 1);
        int offset[2];
        offset[0] = 0;
        offset[1] = N;
        MOE__ERR_TRY(err, moe_experts_backward(d_ln, &gw, dout, b->ln2, b->hg, b->hu, &w, offset, 1, d, c->d_ff, MOE_EXPERT_SWIGLU,
                                               MOE_ACT_SILU, scratch1, scratch2, work),
                     l, "dense FFN backward");
    }
    moe_rmsnorm_backward(acc, moe_store_grad(S, b->id_ln2), d_ln, b->x2, moe_store_param(S, b->id_ln2), b->rstd2, N, d);
    return MOE_OK;
}

/* the attention half backward from da = dL/d(attention output): d_ln = dL/d RMSNorm1(x) (the
   caller adds RMSNorm1' of it to dL/dx); d_atty, d_qkv scratch */
static moe_status moe__block_attention_backward(moe_model *m, int l, const float *da, float *d_ln, float *d_atty, float *d_qkv,
                                                moe_work *work, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    moe_block *b = &m->blocks[l];
    moe_store *S = &m->S;
    int B = m->B, T = m->T, N = B * T, d = c->d;
    memset(d_atty, 0, sizeof(float) * (size_t)N * d);
    MOE__ERR_TRY(err, moe_matmul_backward(d_atty, moe_store_grad(S, b->id_wo), NULL, da, b->atty, moe_store_param(S, b->id_wo), N, d, d, work),
                 l, "attention output backward");
    MOE__ERR_TRY(err, moe_attention_backward(d_qkv, d_atty, b->qkv, b->att, B, T, d, c->n_heads, work), l, "attention backward");
    if (c->pos == MOE_POS_ROPE) moe_rope_apply(d_qkv, m->rope, B, T, d, c->n_heads, 1);
    memset(d_ln, 0, sizeof(float) * (size_t)N * d);
    MOE__ERR_TRY(err, moe_matmul_backward(d_ln, moe_store_grad(S, b->id_qkv), NULL, d_qkv, b->ln1, moe_store_param(S, b->id_qkv), N, d, 3 * d, work),
                 l, "qkv backward");
    return MOE_OK;
}

/* the first failing member's sentence becomes the model's */
static moe_status moe__group_status(moe_model *m, int P) {
    int q;
    for (q = 0; q < P; q++)
        if (m->lanes[q].err.status != MOE_OK) {
            m->err = m->lanes[q].err;
            return m->err.status;
        }
    return MOE_OK;
}

/* CQIL group forward, layers l0..l0+P-1 on the common input h = blocks[l0].x (arXiv
   2404.06709 §3; the formulas at moe_model_set_groups). Each member's block caches hold what
   the sequential block would for input h and FFN input r_q, so backward reuses them. */
static moe_status moe__group_forward(moe_model *m, int l0, int P, int B, int T) {
    const moe_model_config *c = &m->cfg;
    int q, dist = m->group_bypass;
    size_t i, Nd = (size_t)B * T * c->d;
    const float *h = m->blocks[l0].x;
    float *out = l0 + P < c->n_layers ? m->blocks[l0 + P].x : m->x_final;
    for (q = 1; q < P; q++) memcpy(m->blocks[l0 + q].x, h, sizeof(float) * Nd);
    for (q = 0; q < P; q++) m->lanes[q].err.status = MOE_OK;
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) moe__block_attention_forward(m, l0 + q, B, T, m->lanes[q].att, &m->lanes[q].work, &m->lanes[q].err);
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 1; dist > 0 && q < P; q++) { /* r_q = h + a_q + beta_q */
        float *x2 = m->blocks[l0 + q].x2;
        int u;
        for (u = q - dist < 0 ? 0 : q - dist; u < q; u++) {
            const float *a = m->lanes[u].att;
            for (i = 0; i < Nd; i++) x2[i] += a[i];
        }
    }
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) moe__block_ffn_forward(m, l0 + q, B * T, moe__block_args(m, T, NULL), NULL, &m->lanes[q].work, &m->lanes[q].err);
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 0; q < P; q++) {
        if (m->blocks[l0 + q].is_moe) m->aux_loss += m->blocks[l0 + q].moe.stats.aux_total;
        if (m->ffn_hook) m->ffn_hook(m, l0 + q, m->ffn_hook_user);
    }
    /* h_out = (h + a_0 + FFN_0) + sum_{q>=1} (a_q [+ beta_q] + FFN_q), in member order */
    {
        const float *x2 = m->blocks[l0].x2, *f = m->blocks[l0].ffn;
        for (i = 0; i < Nd; i++) out[i] = x2[i] + f[i];
    }
    for (q = 1; q < P; q++) {
        const float *a = m->lanes[q].att, *f = m->blocks[l0 + q].ffn;
        int u;
        for (i = 0; i < Nd; i++) out[i] += a[i];
        for (u = q - dist < 0 ? 0 : q - dist; m->group_double_count && u < q; u++) {
            const float *b = m->lanes[u].att;
            for (i = 0; i < Nd; i++) out[i] += b[i];
        }
        for (i = 0; i < Nd; i++) out[i] += f[i];
    }
    return MOE_OK;
}

/* CQIL group backward: d_res holds dL/dh_out on entry, dL/dh on return. With D = dL/dh_out,
   G_q = dL/dr_q through member q's FFN and R_q = G_q (+ D when double counting):
     dL/da_q = D + G_q + sum of R_u over the later members u whose bypass reads a_q
               (double counting: D + G_q ... with every R_u carrying a D)
     dL/dh   = D + sum_q G_q + sum_q RMSNorm1_q'(attention_q'(dL/da_q)) */
static moe_status moe__group_backward(moe_model *m, int l0, int P, float scale) {
    const moe_model_config *c = &m->cfg;
    int q, dist = m->group_bypass, N = m->B * m->T;
    size_t i, Nd = (size_t)N * c->d;
    const float *D = m->d_res;
    float *dh = m->d_res2;
    for (q = 0; q < P; q++) m->lanes[q].err.status = MOE_OK;
    memcpy(m->lanes[0].da, D, sizeof(float) * Nd); /* member 0 accumulates onto D, as a sequential block */
    for (q = 1; q < P; q++) memset(m->lanes[q].g, 0, sizeof(float) * Nd);
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        moe__block_ffn_backward(m, l0 + q, D, q == 0 ? ln->da : ln->g, scale, ln->d_ln, ln->scratch1, ln->scratch2, &ln->work, &ln->err);
    }
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    memcpy(dh, m->lanes[0].da, sizeof(float) * Nd);
    for (q = 1; q < P; q++) {
        const float *g = m->lanes[q].g;
        float *da = m->lanes[q].da;
        for (i = 0; i < Nd; i++) dh[i] += g[i];
        for (i = 0; i < Nd; i++) da[i] = D[i] + g[i];
    }
    for (q = 0; dist > 0 && q + 1 < P; q++) { /* a_q reaches members q+1 .. q+dist */
        float *da = m->lanes[q].da;
        int u;
        for (u = q + 1; u < P && u <= q + dist; u++) {
            const float *g = m->lanes[u].g;
            for (i = 0; i < Nd; i++) da[i] += g[i];
            if (m->group_double_count)
                for (i = 0; i < Nd; i++) da[i] += D[i];
        }
    }
    MOE_OMP_FOR_IF(P > 1)
    for (q = 0; q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        moe__block_attention_backward(m, l0 + q, ln->da, ln->d_ln, ln->d_atty, ln->d_qkv, &ln->work, &ln->err);
    }
    if (moe__group_status(m, P) != MOE_OK) return m->err.status;
    for (q = 0; q < P; q++) {
        const moe_block *b = &m->blocks[l0 + q];
        moe_rmsnorm_backward(dh, moe_store_grad(&m->S, b->id_ln1), m->lanes[q].d_ln, b->x, moe_store_param(&m->S, b->id_ln1), b->rstd1, N,
                             c->d);
    }
    memcpy(m->d_res, dh, sizeof(float) * Nd);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_forward(moe_model *m, const int *inputs, const int *targets, int B, int T,
                                       moe_rng *noise) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, V = c->vocab, N = B * T, l, i, t, P;
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
    for (l = 0; l < c->n_layers; l += P) {
        moe_block *b = &m->blocks[l];
        float *out = l + 1 < c->n_layers ? m->blocks[l + 1].x : m->x_final;
        const float *draws = NULL;
        moe_status st;
        P = m->group_size ? m->group_size[l] : 0;
        if (P > 0) { /* a CQIL group */
            for (i = l; i < l + P; i++)
                if (noise && m->routing_noise && m->blocks[i].is_moe)
                    return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layers %d..%d run as a CQIL group: their MoE layers cannot draw routing noise (pass no noise RNG)", l, l + P - 1);
            for (i = l; i < l + P; i++)
                if (m->layer_scale[i] != 1.0f)
                    return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d runs in a CQIL group (layers %d..%d) with a residual scale of %g: grouped layers run unscaled (set it to 1 or ungroup)", i, l, l + P - 1, (double)m->layer_scale[i]);
            if ((st = moe__group_forward(m, l, P, B, T)) != MOE_OK) return st;
            continue;
        }
        P = 1;
        if ((st = moe__block_attention_forward(m, l, B, T, NULL, &m->work, &m->err)) != MOE_OK) return st;
        if (b->is_moe && noise && m->routing_noise) {
            size_t n = (size_t)N * c->moe.n_experts, k;
            for (k = 0; k < n; k++) m->routing_noise[k] = moe_rng_normal(noise);
            draws = m->routing_noise;
        }
        if ((st = moe__block_ffn_forward(m, l, N, moe__block_args(m, T, draws), &rh_prev, &m->work, &m->err)) != MOE_OK) return st;
        if (b->is_moe) m->aux_loss += b->moe.stats.aux_total;
        if (m->ffn_hook) m->ffn_hook(m, l, m->ffn_hook_user);
        if (m->layer_scale[l] != 1.0f) {
            float s = m->layer_scale[l];
            for (i = 0; i < N * d; i++) out[i] = b->x2[i] + s * b->ffn[i];
        } else
            for (i = 0; i < N * d; i++) out[i] = b->x2[i] + b->ffn[i];
    }
    if (c->balance_all_layers) moe__model_balance_all_layers(m);
    moe_rmsnorm_forward(m->lnf, m->rstd_f, m->x_final, moe_store_param(&m->S, m->id_lnf), N, d, c->norm_eps);
    MOE__MODEL_TRY(moe_matmul_forward(m->logits, m->lnf, wte, NULL, N, d, V, &m->work), -1, "tied head");
    m->loss = targets ? moe_crossentropy_forward(m->losses, m->logits, targets, N, V) : 0.0;
    m->B = B;
    m->T = T;
    m->has_targets = targets != NULL;
    return MOE_OK;
}

/* the size of the CQIL group whose last member is layer l, 0 when l ends none */
static int moe__group_ending_at(const moe_model *m, int l) {
    int s;
    for (s = l; m->group_size && s >= 0; s--)
        if (m->group_size[s] > 0) return s + m->group_size[s] - 1 == l ? m->group_size[s] : 0;
    return 0;
}

/* everything below the logits, from m->d_logits */
static moe_status moe__model_backward_from_logits(moe_model *m, float scale) {
    const moe_model_config *c = &m->cfg;
    int B = m->B, T = m->T, N = B * T, d = c->d, V = c->vocab, l, i, P;
    float *d_res = m->d_res, *d_res2 = m->d_res2, s;
    moe_store *S = &m->S;
    moe_status st;
    (void)B;
    /* tied head: logits = lnf . wte^T */
    memset(m->d_ln, 0, sizeof(float) * (size_t)N * d);
    MOE__MODEL_TRY(moe_matmul_backward(m->d_ln, moe_store_grad(S, m->id_wte), NULL, m->d_logits, m->lnf, moe_store_param(S, m->id_wte),
                                       N, d, V, &m->work),
                   -1, "tied head backward");
    memset(d_res, 0, sizeof(float) * (size_t)N * d);
    moe_rmsnorm_backward(d_res, moe_store_grad(S, m->id_lnf), m->d_ln, m->x_final, moe_store_param(S, m->id_lnf), m->rstd_f, N, d);
    if (m->r_carry) memset(m->r_carry, 0, sizeof(float) * (size_t)N * c->router_dim); /* dL/dh of the layer above */
    for (l = c->n_layers - 1; l >= 0; l -= P) {
        moe_block *b;
        if ((P = moe__group_ending_at(m, l)) > 0) {
            if ((st = moe__group_backward(m, l - P + 1, P, scale)) != MOE_OK) return st;
            continue;
        }
        P = 1;
        b = &m->blocks[l];
        s = m->layer_scale[l];
        /* d_res = dL/d(block output). FFN branch: d x2 = d_res + RMSNorm2'(dFFN input) */
        memcpy(d_res2, d_res, sizeof(float) * (size_t)N * d);
        if (s != 1.0f) /* masked growth: dL/d ffn = s_l d_res (d_res is rewritten below) */
            for (i = 0; i < N * d; i++) d_res[i] *= s;
        st = moe__block_ffn_backward(m, l, d_res, d_res2, scale, m->d_ln, m->scratch1, m->scratch2, &m->work, &m->err);
        if (st != MOE_OK) return st;
        /* attention branch: d x = d x2 + RMSNorm1'(d qkv-projection input) */
        memcpy(d_res, d_res2, sizeof(float) * (size_t)N * d);
        if (s != 1.0f) /* dL/d Attn = s_l dL/dx2; d_res2 is read only by the attention backward */
            for (i = 0; i < N * d; i++) d_res2[i] *= s;
        if ((st = moe__block_attention_backward(m, l, d_res2, m->d_ln, m->d_atty, m->d_qkv, &m->work, &m->err)) != MOE_OK) return st;
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

MOE__IMPL moe_status moe_model_backward(moe_model *m, float scale) {
    int N = m->B * m->T, V = m->cfg.vocab, i, count = 0;
    if (!m->has_targets) return moe_err_set(&m->err, MOE_ERR_STATE, "backward needs a forward with targets before it");
    for (i = 0; i < N; i++) count += m->targets[i] >= 0;
    memset(m->d_logits, 0, sizeof(float) * (size_t)N * V);
    if (count > 0) moe_crossentropy_backward(m->d_logits, m->logits, m->targets, N, V, scale / (float)count);
    return moe__model_backward_from_logits(m, scale);
}

MOE__IMPL moe_status moe_model_backward_logits(moe_model *m, const float *d_logits, float scale) {
    if (!m->blocks || m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "backward needs a forward before it");
    if (!d_logits) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "d_logits must not be NULL");
    memcpy(m->d_logits, d_logits, sizeof(float) * (size_t)m->B * m->T * m->cfg.vocab);
    return moe__model_backward_from_logits(m, scale);
}

MOE__IMPL moe_status moe_model_set_groups(moe_model *m, const int *first, const int *size, int n_groups, int bypass,
                                          int double_count) {
    const moe_model_config *c = &m->cfg;
    int g, l, P = 0, end = 0, q, ok = 1;
    size_t Nd, NF;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (n_groups < 0 || (n_groups > 0 && (!first || !size)))
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL groups: n_groups must be >= 0, with first and size given");
    if (bypass < 0) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL bypass distance %d must not be negative", bypass);
    for (g = 0; g < n_groups; g++) {
        if (size[g] < 1 || first[g] < 0 || first[g] > c->n_layers - size[g])
            return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL group %d: layers [%d, %d) are not inside the model's %d layers", g, first[g],
                               first[g] + size[g], c->n_layers);
        if (first[g] < end)
            return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "CQIL group %d starts at layer %d, inside or before the group before it (which ends at %d): give disjoint groups in increasing order",
                               g, first[g], end);
        end = first[g] + size[g];
        P = size[g] > P ? size[g] : P;
        for (l = first[g]; l < end; l++) {
            const moe_block *b = &m->blocks[l];
            if (b->is_moe && b->id_rproj >= 0)
                return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "CQIL group %d: MoE layer %d's router reads a GRU state or an MLP, which runs layer after layer; group only layers with linear routers", g, l);
            if (b->is_moe && c->moe.hyper)
                return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "CQIL group %d: HyperMoE layers share one hypernetwork, whose gradients concurrent members would race on", g);
        }
    }
    moe__groups_free(m);
    m->group_bypass = bypass;
    m->group_double_count = double_count != 0;
    if (n_groups == 0) return MOE_OK;
    Nd = (size_t)m->max_B * m->max_T * c->d;
    NF = (size_t)m->max_B * m->max_T * moe__dense_width(m);
    m->group_size = (int *)moe__calloc((size_t)c->n_layers, sizeof(int));
    m->lanes = (moe_group_lane *)moe__calloc((size_t)P, sizeof(moe_group_lane));
    ok = m->group_size && m->lanes;
    if (ok) m->n_lanes = P;
    for (q = 0; ok && q < P; q++) {
        moe_group_lane *ln = &m->lanes[q];
        ok = MOE__ALLOC(ln->att, Nd, float) && MOE__ALLOC(ln->da, Nd, float) && MOE__ALLOC(ln->g, Nd, float) &&
             MOE__ALLOC(ln->d_ln, Nd, float) && MOE__ALLOC(ln->d_atty, Nd, float) && MOE__ALLOC(ln->d_qkv, 3 * Nd, float) &&
             MOE__ALLOC(ln->scratch1, NF, float) && MOE__ALLOC(ln->scratch2, NF, float) &&
             moe_work_alloc(&ln->work, m->work.floats, 1) == MOE_OK; /* one thread: the members are the parallel loop */
    }
    if (!ok) {
        moe__groups_free(m);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the CQIL groups' buffers");
    }
    for (g = 0; g < n_groups; g++) m->group_size[first[g]] = size[g];
    return MOE_OK;
}

MOE__IMPL int moe_model_depth(const moe_model *m) {
    int l, depth = m->cfg.n_layers;
    for (l = 0; m->group_size && l < m->cfg.n_layers; l++)
        if (m->group_size[l] > 1) depth -= m->group_size[l] - 1;
    return depth;
}

MOE__IMPL void moe_model_set_broadcast(moe_model *m, int on) { m->gw_broadcast = on != 0; }

MOE__IMPL moe_status moe_model_update_selection_bias(moe_model *m, float gamma) {
    int l;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    for (l = 0; l < m->cfg.n_layers; l++) {
        moe_block *b = &m->blocks[l];
        if (b->is_moe && moe_layer_update_selection_bias(&b->moe, &m->S, gamma) != MOE_OK)
            return moe_err_set(&m->err, b->moe.err.status, "layer %d: %s", l, b->moe.err.msg);
    }
    return MOE_OK;
}

MOE__IMPL size_t moe_model_params_total(const moe_model *m) { return m->S.numel; }

MOE__IMPL size_t moe_model_params_active(const moe_model *m) {
    size_t total = m->S.numel;
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        const moe_layer_config *c = &b->moe.cfg;
        if (!b->is_moe) continue;
        total -= (size_t)(c->n_experts - c->top_k) * moe__router_idle_expert_params(c);
    }
    return total;
}

/* sampler's settings are usable */
static moe_status moe__sampler_check(moe_err *err, const moe_sampler *sampler) {
    if (!(sampler->temperature >= 0.0f) || sampler->top_k < 0 || !(sampler->top_p > 0.0f && sampler->top_p <= 1.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "sampler: temperature >= 0, top_k >= 0, 0 < top_p <= 1");
    return MOE_OK;
}

/* The next token from logits z (V): greedy at temperature 0 (no draw), else softmax at the
   temperature, keep the top-k and the top-p mass, one uniform draw from rng. p: (2 V) scratch. */
static int moe__sample_token(const float *z, int V, const moe_sampler *sampler, moe_rng *rng, float *p) {
    int i, next = 0;
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
    return next;
}

MOE__IMPL moe_status moe_model_generate(moe_model *m, const int *prompt, int n_prompt, int n_new, int *out,
                                        const moe_sampler *sampler, moe_rng *rng) {
    int V = m->cfg.vocab, n = n_prompt, step;
    moe_status st;
    if (!m->blocks) return moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised");
    if (!prompt || !out || n_prompt < 1 || n_new < 0 || !sampler || !rng)
        return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "generate needs a prompt of at least one token, an output buffer, a sampler and an RNG");
    if (m->cfg.moe_every > 0 && !moe__router_is_causal(&m->cfg.moe))
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "expert-choice routing is not causal (a token's experts depend on later tokens): it cannot generate");
    if (moe__sampler_check(&m->err, sampler) != MOE_OK) return m->err.status;
    memcpy(out, prompt, sizeof(int) * (size_t)n_prompt);
    for (step = 0; step < n_new; step++) {
        int ctx = n < m->max_T ? n : m->max_T;
        st = moe_model_forward(m, out + n - ctx, NULL, 1, ctx, NULL);
        if (st != MOE_OK) return st;
        out[n++] = moe__sample_token(m->logits + (size_t)(ctx - 1) * V, V, sampler, rng, m->gen_probs);
    }
    m->B = m->T = 0; /* the generation forwards leave no batch to differentiate */
    m->has_targets = 0;
    return MOE_OK;
}

/* ============================================================================================
   >>moe:select
   ============================================================================================ */

static int moe__select_role(const moe_model *m, int id) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        if (id == b->id_qkv) return MOE_SEL_QKV;
        if (id == b->id_wo) return MOE_SEL_ATTN_O;
        if (!b->is_moe) {
            if (id == b->id_gate) return MOE_SEL_GATE;
            if (id == b->id_up) return MOE_SEL_UP;
            if (id == b->id_down) return MOE_SEL_DOWN;
        } else {
            const moe_layer *L = &b->moe;
            if (id == L->id_gate || id == L->id_s_gate) return MOE_SEL_GATE;
            if (id == L->id_up || id == L->id_s_up) return MOE_SEL_UP;
            if (id == L->id_down || id == L->id_s_down) return MOE_SEL_DOWN;
        }
    }
    return 0;
}

MOE__IMPL int moe_model_select(const moe_model *m, int parts, int *ids, int max_ids) {
    int id, n = 0;
    if (!m->blocks) return 0;
    for (id = 0; id < m->S.count; id++)
        if (moe__select_role(m, id) & parts) {
            if (ids && n < max_ids) ids[n] = id;
            n++;
        }
    return n;
}

MOE__IMPL size_t moe_model_select_numel(const moe_model *m, int parts) {
    int id;
    size_t n = 0;
    if (!m->blocks) return 0;
    for (id = 0; id < m->S.count; id++)
        if (moe__select_role(m, id) & parts) n += m->S.tensors[id].numel;
    return n;
}

MOE__IMPL moe_status moe_mask_select(moe_mask *k, const moe_model *m, int parts) {
    int id;
    if (moe__mask_check(k, &m->S) != MOE_OK) return k->err.status;
    if (moe_model_select(m, parts, NULL, 0) == 0)
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "the selection %d names no tensor of this model", parts);
    for (id = 0; id < m->S.count; id++)
        memset(k->keep + m->S.tensors[id].offset, (moe__select_role(m, id) & parts) ? 1 : 0, m->S.tensors[id].numel);
    return MOE_OK;
}
/* ============================================================================================
   >>moe:lora
   ============================================================================================ */

static void moe__lora_dims(const moe_tensor *t, int *E, int *out, int *in) {
    *E = t->ndim == 3 ? t->shape[0] : 1;
    *out = t->shape[t->ndim - 2];
    *in = t->shape[t->ndim - 1];
}

static void moe__lora_init_adapters(moe_lora *L, uint64_t seed) {
    moe_rng r;
    int i;
    size_t j;
    moe_rng_seed(&r, seed);
    for (i = 0; i < L->n; i++) {
        const moe_tensor *a = &L->S.tensors[L->id_a[i]];
        float bound = 1.0f / sqrtf((float)a->shape[a->ndim - 1]);
        float *pa = moe_store_param(&L->S, L->id_a[i]);
        for (j = 0; j < a->numel; j++) pa[j] = bound * (2.0f * moe_rng_uniform(&r) - 1.0f);
        memset(moe_store_param(&L->S, L->id_b[i]), 0, L->S.tensors[L->id_b[i]].numel * sizeof(float));
    }
}

static void moe__lora_clear(moe_lora *L) {
    moe_store_free(&L->S);
    MOE_FREE(L->target); MOE_FREE(L->id_a); MOE_FREE(L->id_b); MOE_FREE(L->base); MOE_FREE(L->base_off);
    memset(L, 0, sizeof *L);
}

MOE__IMPL moe_status moe_lora_attach(moe_lora *L, moe_store *base, const int *ids, int n,
                                     const moe_lora_config *c, uint64_t seed) {
    int i, j;
    size_t total = 0;
    moe_err e;
    memset(L, 0, sizeof *L);
    memset(&e, 0, sizeof e);
    if (!base->params) return moe_err_set(&L->err, MOE_ERR_STATE, "LoRA attached to a store without parameters");
    if (!ids || n <= 0) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA needs at least one matrix to adapt");
    if (c->rank < 1) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA rank must be >= 1, got %d", c->rank);
    if (!(c->alpha > 0.0f) || !(c->alpha < 1e6f)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA alpha must be positive and finite");
    for (i = 0; i < n; i++) {
        const moe_tensor *t;
        int E, out, in;
        if (ids[i] < 0 || ids[i] >= base->count) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA on tensor id %d, which the store does not have", ids[i]);
        t = &base->tensors[ids[i]];
        if (t->ndim != 2 && t->ndim != 3) return moe_err_set(&L->err, MOE_ERR_SHAPE, "LoRA on '%s', which is not a matrix or a bank of matrices", t->name);
        moe__lora_dims(t, &E, &out, &in);
        if (c->rank > out || c->rank > in)
            return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA rank %d is larger than the %d x %d matrix '%s'", c->rank, out, in, t->name);
        if (strlen(t->name) + 8 >= MOE_NAME_LEN) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "tensor name '%s' too long for its adapter's", t->name);
        for (j = 0; j < i; j++)
            if (ids[j] == ids[i]) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA on '%s' twice", t->name);
        total += t->numel;
    }
    L->n = n;
    L->cfg = *c;
    L->scale = c->alpha / (float)c->rank;
    L->base_fingerprint = moe_store_fingerprint(base);
    L->target = (int *)moe__calloc((size_t)n, sizeof(int));
    L->id_a = (int *)moe__calloc((size_t)n, sizeof(int));
    L->id_b = (int *)moe__calloc((size_t)n, sizeof(int));
    L->base_off = (size_t *)moe__calloc((size_t)n, sizeof(size_t));
    L->base = (float *)moe__calloc(total, sizeof(float));
    if (!L->target || !L->id_a || !L->id_b || !L->base_off || !L->base) {
        moe__lora_clear(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the adapters");
    }
    moe_store_init(&L->S);
    total = 0;
    for (i = 0; i < n; i++) {
        const moe_tensor *t = &base->tensors[ids[i]];
        char name[MOE_NAME_LEN];
        int E, out, in, d0, d1;
        moe__lora_dims(t, &E, &out, &in);
        L->target[i] = ids[i];
        L->base_off[i] = total;
        memcpy(L->base + total, base->params + t->offset, t->numel * sizeof(float));
        total += t->numel;
        /* an (E, out, in) bank gets (E, r, in) and (E, out, r); a matrix (r, in) and (out, r) */
        d0 = t->ndim == 3 ? E : c->rank;
        d1 = t->ndim == 3 ? c->rank : in;
        snprintf(name, sizeof name, "%.*s.lora_a", MOE_NAME_LEN - 9, t->name);
        L->id_a[i] = moe_store_add(&L->S, name, 0, d0, d1, t->ndim == 3 ? in : 0, 0);
        d0 = t->ndim == 3 ? E : out;
        d1 = t->ndim == 3 ? out : c->rank;
        snprintf(name, sizeof name, "%.*s.lora_b", MOE_NAME_LEN - 9, t->name);
        L->id_b[i] = moe_store_add(&L->S, name, 0, d0, d1, t->ndim == 3 ? c->rank : 0, 0);
    }
    if (L->S.err.status != MOE_OK || moe_store_alloc(&L->S, 1) != MOE_OK) {
        e = L->S.err;
        moe__lora_clear(L);
        L->err = e;
        return e.status;
    }
    moe__lora_init_adapters(L, seed);
    return moe_lora_merge(L, base);
}

MOE__IMPL void moe_lora_detach(moe_lora *L, moe_store *base) {
    if (L->S.params && L->merged && base) moe_lora_unmerge(L, base);
    moe__lora_clear(L);
}

static moe_status moe__lora_check(moe_lora *L, const moe_store *base) {
    if (!L->S.params) return moe_err_set(&L->err, MOE_ERR_STATE, "no adapters attached");
    if (moe_store_fingerprint(base) != L->base_fingerprint)
        return moe_err_set(&L->err, MOE_ERR_SHAPE, "the adapters were made for another model layout");
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_merge(moe_lora *L, moe_store *base) {
    int i, e, o, j, q;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        int E, out, in, r = L->cfg.rank;
        moe__lora_dims(t, &E, &out, &in);
        for (e = 0; e < E; e++) {
            const float *A = moe_store_param(&L->S, L->id_a[i]) + (size_t)e * r * in;
            const float *B = moe_store_param(&L->S, L->id_b[i]) + (size_t)e * out * r;
            const float *W0 = L->base + L->base_off[i] + (size_t)e * out * in;
            float *W = base->params + t->offset + (size_t)e * out * in;
            for (o = 0; o < out; o++)
                for (j = 0; j < in; j++) {
                    float acc = 0.0f;
                    for (q = 0; q < r; q++) acc += B[(size_t)o * r + q] * A[(size_t)q * in + j];
                    W[(size_t)o * in + j] = W0[(size_t)o * in + j] + L->scale * acc;
                }
        }
    }
    L->merged = 1;
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_unmerge(moe_lora *L, moe_store *base) {
    int i;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        memcpy(base->params + t->offset, L->base + L->base_off[i], t->numel * sizeof(float));
    }
    L->merged = 0;
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_fold(moe_lora *L, moe_store *base, uint64_t seed) {
    int i;
    if (moe_lora_merge(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        memcpy(L->base + L->base_off[i], base->params + t->offset, t->numel * sizeof(float));
    }
    moe__lora_init_adapters(L, seed);
    if (L->S.adam_m) memset(L->S.adam_m, 0, L->S.numel * sizeof(float));
    if (L->S.adam_v) memset(L->S.adam_v, 0, L->S.numel * sizeof(float));
    return moe_lora_merge(L, base);
}

MOE__IMPL moe_status moe_lora_backward(moe_lora *L, const moe_store *base) {
    int i, e, o, j, q;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    if (!L->merged) return moe_err_set(&L->err, MOE_ERR_STATE, "adapter gradients need a forward with the adapters merged");
    if (!base->grads) return moe_err_set(&L->err, MOE_ERR_STATE, "the model's store has no gradients");
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        int E, out, in, r = L->cfg.rank;
        moe__lora_dims(t, &E, &out, &in);
        for (e = 0; e < E; e++) {
            const float *A = moe_store_param(&L->S, L->id_a[i]) + (size_t)e * r * in;
            const float *B = moe_store_param(&L->S, L->id_b[i]) + (size_t)e * out * r;
            float *dA = moe_store_grad(&L->S, L->id_a[i]) + (size_t)e * r * in;
            float *dB = moe_store_grad(&L->S, L->id_b[i]) + (size_t)e * out * r;
            const float *dW = base->grads + t->offset + (size_t)e * out * in;
            for (o = 0; o < out; o++) {
                const float *g = dW + (size_t)o * in;
                for (q = 0; q < r; q++) {
                    /* dB[o,q] = s sum_j dW[o,j] A[q,j];  dA[q,j] += s B[o,q] dW[o,j] */
                    const float *a = A + (size_t)q * in;
                    float *da = dA + (size_t)q * in, bq = L->scale * B[(size_t)o * r + q];
                    double acc = 0.0;
                    for (j = 0; j < in; j++) {
                        acc += (double)g[j] * a[j];
                        da[j] += bq * g[j];
                    }
                    dB[(size_t)o * r + q] += L->scale * (float)acc;
                }
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_step(moe_lora *L, moe_store *base, moe_mask *mask,
                                   const moe_adamw_config *c, float lr, long long step, float max_norm) {
    moe_status st;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    if (mask) {
        st = moe_mask_step(mask, &L->S, c, lr, step, max_norm, NULL);
        if (st != MOE_OK) return moe_err_set(&L->err, st, "%s", mask->err.msg);
    } else {
        moe_clip_grad_norm(&L->S, max_norm);
        if ((st = moe_adamw_step(&L->S, c, lr, step)) != MOE_OK) return moe_err_set(&L->err, st, "%s", L->S.err.msg);
    }
    return moe_lora_merge(L, base);
}

#ifndef MOE_NO_STDIO
#define MOE__LORA_BLOB 24 /* "LORA", rank, alpha bits, 4 reserved, base fingerprint */

static void moe__lora_blob(const moe_lora *L, unsigned char *p) {
    uint32_t a;
    memset(p, 0, MOE__LORA_BLOB);
    memcpy(&a, &L->cfg.alpha, 4);
    moe__mask_put(p, 0x41524F4Cu, 4);
    moe__mask_put(p + 4, (uint64_t)L->cfg.rank, 4);
    moe__mask_put(p + 8, a, 4);
    moe__mask_put(p + 16, L->base_fingerprint, 8);
}

MOE__IMPL moe_status moe_lora_save(const char *path, const moe_lora *L, long long step, moe_err *err) {
    unsigned char blob[MOE__LORA_BLOB];
    if (!L->S.params) return moe_err_set(err, MOE_ERR_STATE, "no adapters to save");
    moe__lora_blob(L, blob);
    return moe_checkpoint_save(path, &L->S, 1, step, blob, sizeof blob, NULL, 0, err);
}

MOE__IMPL moe_status moe_lora_load(const char *path, moe_lora *L, moe_store *base, long long *step, moe_err *err) {
    unsigned char want[MOE__LORA_BLOB], got[MOE__LORA_BLOB];
    moe_ckpt_info info;
    moe_status st;
    if (moe__lora_check(L, base) != MOE_OK) return moe_err_set(err, L->err.status, "%s", L->err.msg);
    if ((st = moe_checkpoint_info(path, &info, err)) != MOE_OK) return st;
    if (info.config_bytes != MOE__LORA_BLOB) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not an adapter file", path);
    if ((st = moe_checkpoint_blobs(path, got, sizeof got, NULL, 0, err)) != MOE_OK) return st;
    moe__lora_blob(L, want);
    if (moe__mask_get(got, 4) != 0x41524F4Cu) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not an adapter file", path);
    if (memcmp(got + 16, want + 16, 8) != 0)
        return moe_err_set(err, MOE_ERR_SHAPE, "'%s' holds adapters of another model layout", path);
    if (memcmp(got, want, MOE__LORA_BLOB) != 0)
        return moe_err_set(err, MOE_ERR_SHAPE, "'%s' holds adapters of another rank or alpha (rank %u)", path, (unsigned)moe__mask_get(got + 4, 4));
    /* the adapter store's fingerprint (target names and shapes) is checked by the load */
    if ((st = moe_checkpoint_load(path, &L->S, step, want, NULL, sizeof want, NULL, 0, err)) != MOE_OK) return st;
    return moe_lora_merge(L, base) == MOE_OK ? MOE_OK : moe_err_set(err, L->err.status, "%s", L->err.msg);
}
#endif
/* ============================================================================================
   >>moe:migu
   ============================================================================================ */

MOE__IMPL moe_migu_config moe_migu_config_default(void) {
    moe_migu_config c;
    c.threshold = 0.7f;
    c.stat = MOE_MIGU_L1;
    c.random = 0;
    c.parts = MOE_SEL_LINEAR;
    c.seed = 1;
    return c;
}

MOE__IMPL void moe_migu_free(moe_migu *g) {
    MOE_FREE(g->off); MOE_FREE(g->group); MOE_FREE(g->stat); MOE_FREE(g->keep); MOE_FREE(g->sorted);
    memset(g, 0, sizeof *g);
}

MOE__IMPL moe_status moe_migu_init(moe_migu *g, const moe_model *m, const moe_migu_config *c) {
    int id, widest = 1;
    memset(g, 0, sizeof *g);
    if (!(c->threshold >= 0.0f && c->threshold < 1.0f))
        return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "MIGU threshold T = %g is outside [0, 1)", (double)c->threshold);
    if (c->stat != MOE_MIGU_L1 && c->stat != MOE_MIGU_SUM) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "unknown MIGU statistic %d", (int)c->stat);
    if (!m->blocks || !m->S.params) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU on a model that is not initialised");
    if (moe_model_select(m, c->parts, NULL, 0) == 0) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "the MIGU selection %d names no matrix of this model", c->parts);
    g->cfg = *c;
    g->off = (long long *)moe__calloc((size_t)m->S.count, sizeof(long long));
    g->group = (int *)moe__calloc((size_t)m->S.count, sizeof(int));
    if (!g->off || !g->group) {
        moe_migu_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory");
    }
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        int role = moe__select_role(m, id) & c->parts, rows = (int)(t->numel / (size_t)t->shape[t->ndim - 1]);
        g->off[id] = -1;
        if (!role) continue;
        g->off[id] = (long long)g->units;
        g->group[id] = role == MOE_SEL_QKV ? rows / 3 : t->ndim == 3 ? t->shape[1] : rows;
        if (g->group[id] > widest) widest = g->group[id];
        g->units += (size_t)rows;
        g->n_tensors++;
    }
    g->stat = (double *)moe__calloc(g->units, sizeof(double));
    g->keep = (unsigned char *)moe__calloc(g->units, 1);
    g->sorted = (double *)moe__calloc((size_t)widest, sizeof(double));
    if (!g->stat || !g->keep || !g->sorted) {
        moe_migu_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory for MIGU statistics");
    }
    g->fingerprint = moe_store_fingerprint(&m->S);
    moe_rng_seed(&g->rng, c->seed);
    return MOE_OK;
}

MOE__IMPL void moe_migu_reset(moe_migu *g) {
    if (g->stat) memset(g->stat, 0, g->units * sizeof(double));
    g->micro_batches = 0;
}

/* rows [r0, r1) of outputs h (leading dimension ld, `units` wide; minus `sub` when not NULL)
   into stat */
static void moe__migu_add(double *stat, const float *h, const float *sub, size_t ld, int r0, int r1, int units, int l1) {
    int r, j;
    for (r = r0; r < r1; r++) {
        const float *y = h + (size_t)r * ld, *s = sub ? sub + (size_t)r * ld : NULL;
        double norm = 1.0;
        if (l1) {
            norm = 0.0;
            for (j = 0; j < units; j++) norm += fabs((double)y[j] - (s ? s[j] : 0.0f));
            if (norm <= 0.0) continue;
        }
        for (j = 0; j < units; j++) stat[j] += fabs((double)y[j] - (s ? s[j] : 0.0f)) / norm;
    }
}

/* every expert of a bank: its rows of the grouped caches */
static void moe__migu_bank(moe_migu *g, const moe_store *S, int id, const float *h, const moe_assign *a, int l1) {
    const moe_tensor *t;
    int e, units;
    if (id < 0 || g->off[id] < 0 || !h) return;
    t = &S->tensors[id];
    units = t->shape[1];
    for (e = 0; e < t->shape[0] && e < a->E; e++)
        moe__migu_add(g->stat + g->off[id] + (size_t)e * units, h, NULL, (size_t)units, a->offset[e], a->offset[e + 1], units, l1);
}

MOE__IMPL moe_status moe_migu_accumulate(moe_migu *g, const moe_model *m) {
    int l, N = m->B * m->T, d = m->cfg.d, l1 = g->cfg.stat == MOE_MIGU_L1, k;
    if (!g->stat) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU used before moe_migu_init");
    if (moe_store_fingerprint(&m->S) != g->fingerprint) return moe_err_set(&g->err, MOE_ERR_SHAPE, "MIGU made for another model layout");
    if (N == 0) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU statistics need a forward first");
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        if (g->off[b->id_qkv] >= 0)
            for (k = 0; k < 3; k++) moe__migu_add(g->stat + g->off[b->id_qkv] + (size_t)k * d, b->qkv + (size_t)k * d, NULL, (size_t)3 * d, 0, N, d, l1);
        /* the output projection's output is x2 - x (the residual was added in place) */
        if (g->off[b->id_wo] >= 0) moe__migu_add(g->stat + g->off[b->id_wo], b->x2, b->x, (size_t)d, 0, N, d, l1);
        if (!b->is_moe) {
            int F = m->cfg.d_ff;
            if (g->off[b->id_gate] >= 0) moe__migu_add(g->stat + g->off[b->id_gate], b->hg, NULL, (size_t)F, 0, N, F, l1);
            if (g->off[b->id_up] >= 0) moe__migu_add(g->stat + g->off[b->id_up], b->hu, NULL, (size_t)F, 0, N, F, l1);
            if (g->off[b->id_down] >= 0) moe__migu_add(g->stat + g->off[b->id_down], b->ffn, NULL, (size_t)d, 0, N, d, l1);
        } else {
            const moe_layer *L = &b->moe;
            moe__migu_bank(g, &m->S, L->id_gate, L->hg, &L->routed, l1);
            moe__migu_bank(g, &m->S, L->id_up, L->hu, &L->routed, l1);
            moe__migu_bank(g, &m->S, L->id_down, L->eout, &L->routed, l1);
            if (L->cfg.n_shared > 0) {
                moe__migu_bank(g, &m->S, L->id_s_gate, L->s_hg, &L->shared, l1);
                moe__migu_bank(g, &m->S, L->id_s_up, L->s_hu, &L->shared, l1);
                moe__migu_bank(g, &m->S, L->id_s_down, L->s_eout, &L->shared, l1);
            }
        }
    }
    g->micro_batches++;
    return MOE_OK;
}

static int moe__migu_cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* one linear layer's keep vector from its statistics (or at random) */
static void moe__migu_group(moe_migu *g, const double *a, unsigned char *keep, int n) {
    double T = (double)g->cfg.threshold;
    int j;
    if (g->cfg.random) {
        int want = n - (int)floor(T * n), i;
        int *idx = (int *)g->sorted; /* n ints fit in n doubles */
        for (j = 0; j < n; j++) { idx[j] = j; keep[j] = 0; }
        for (i = 0; i < want; i++) { /* partial Fisher-Yates: the first `want` of a shuffle */
            int r = i + moe_rng_below(&g->rng, n - i), tmp = idx[i];
            idx[i] = idx[r]; idx[r] = tmp;
            keep[idx[i]] = 1;
        }
    } else {
        double pos, q;
        int lo;
        memcpy(g->sorted, a, (size_t)n * sizeof(double));
        qsort(g->sorted, (size_t)n, sizeof(double), moe__migu_cmp);
        pos = T * (n - 1);
        lo = (int)floor(pos);
        q = g->sorted[lo] + (lo + 1 < n ? (pos - lo) * (g->sorted[lo + 1] - g->sorted[lo]) : 0.0);
        for (j = 0; j < n; j++) keep[j] = (unsigned char)(a[j] >= q);
    }
}

MOE__IMPL moe_status moe_migu_mask(moe_migu *g, const moe_model *m, moe_mask *k) {
    int id;
    if (!g->stat) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU used before moe_migu_init");
    if (moe_store_fingerprint(&m->S) != g->fingerprint) return moe_err_set(&g->err, MOE_ERR_SHAPE, "MIGU made for another model layout");
    if (moe__mask_check(k, &m->S) != MOE_OK) return moe_err_set(&g->err, k->err.status, "%s", k->err.msg);
    if (!g->cfg.random && g->micro_batches == 0) return moe_err_set(&g->err, MOE_ERR_STATE, "MIGU mask without statistics: accumulate after each forward");
    for (id = 0; id < m->S.count; id++) {
        const moe_tensor *t = &m->S.tensors[id];
        size_t rows, r;
        if (g->off[id] < 0) continue;
        rows = t->numel / (size_t)t->shape[t->ndim - 1];
        for (r = 0; r < rows; r += (size_t)g->group[id])
            moe__migu_group(g, g->stat + g->off[id] + r, g->keep + g->off[id] + r, g->group[id]);
        moe_mask_set_rows(k, &m->S, id, g->keep + g->off[id]);
    }
    moe_migu_reset(g);
    return MOE_OK;
}
/* ============================================================================================
   >>moe:model_io
   ============================================================================================ */

/* THE description of moe_model_config: adding a config field is one line here (the test
   test_fields_cover_struct fails while a member has no line). */
#define MOE__MF(type, member) MOE_FIELD(type, moe_model_config, member)
static const moe_field moe__model_fields[] = {
    MOE__MF(MOE_FIELD_INT, vocab),
    MOE__MF(MOE_FIELD_INT, max_seq),
    MOE__MF(MOE_FIELD_INT, d),
    MOE__MF(MOE_FIELD_INT, n_layers),
    MOE__MF(MOE_FIELD_INT, n_heads),
    MOE__MF(MOE_FIELD_INT, d_ff),
    MOE__MF(MOE_FIELD_INT, pos),
    MOE__MF(MOE_FIELD_FLOAT, rope_theta),
    MOE__MF(MOE_FIELD_FLOAT, norm_eps),
    MOE__MF(MOE_FIELD_INT, moe_every),
    MOE__MF(MOE_FIELD_INT, dense_first),
    MOE__MF(MOE_FIELD_INT, moe.d),
    MOE__MF(MOE_FIELD_INT, moe.d_ff),
    MOE__MF(MOE_FIELD_INT, moe.n_experts),
    MOE__MF(MOE_FIELD_INT, moe.top_k),
    MOE__MF(MOE_FIELD_INT, moe.n_shared),
    MOE__MF(MOE_FIELD_INT, moe.d_ff_shared),
    MOE__MF(MOE_FIELD_INT, moe.expert),
    MOE__MF(MOE_FIELD_INT, moe.activation),
    MOE__MF(MOE_FIELD_INT, moe.expert_bias),
    MOE__MF(MOE_FIELD_INT, moe.router),
    MOE__MF(MOE_FIELD_INT, moe.renormalize),
    MOE__MF(MOE_FIELD_INT, moe.router_bias),
    MOE__MF(MOE_FIELD_FLOAT, moe.capacity_factor),
    MOE__MF(MOE_FIELD_INT, moe.balance),
    MOE__MF(MOE_FIELD_FLOAT, moe.balance_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.z_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.importance_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.load_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.noise_eps),
    MOE__MF(MOE_FIELD_FLOAT, moe.router_init_std),
    MOE__MF(MOE_FIELD_FLOAT, moe.gw_threshold),
    MOE__MF(MOE_FIELD_INT, moe.gw_normalized),
    MOE__MF(MOE_FIELD_INT, moe.gw_slots),
    MOE__MF(MOE_FIELD_INT, moe.gw_released),
    MOE__MF(MOE_FIELD_INT, moe.aoe_rank),
    MOE__MF(MOE_FIELD_INT, moe.hyper),
    MOE__MF(MOE_FIELD_INT, moe.hyper_embed),
    MOE__MF(MOE_FIELD_INT, moe.hyper_hidden),
    MOE__MF(MOE_FIELD_INT, moe.hyper_cond),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layer_dim),
    MOE__MF(MOE_FIELD_INT, moe.hyper_width),
    MOE__MF(MOE_FIELD_INT, moe.hyper_adapter),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layers),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layer),
    MOE__MF(MOE_FIELD_INT, moe.router_dim),
    MOE__MF(MOE_FIELD_FLOAT, moe.ec_capacity_factor),
    MOE__MF(MOE_FIELD_INT, moe.capacity_order),
    MOE__MF(MOE_FIELD_INT, moe.drop_passthrough),
    MOE__MF(MOE_FIELD_FLOAT, moe.routed_scale),
    MOE__MF(MOE_FIELD_FLOAT, moe.shared_scale),
    MOE__MF(MOE_FIELD_INT, moe.hyper_head_bias),
    MOE__MF(MOE_FIELD_INT, moe.selection_bias),
    MOE__MF(MOE_FIELD_INT, moe.cv_unbiased),
    MOE__MF(MOE_FIELD_INT, router_input),
    MOE__MF(MOE_FIELD_INT, router_dim),
    MOE__MF(MOE_FIELD_FLOAT, init_std),
    MOE__MF(MOE_FIELD_INT, balance_all_layers),
};
#undef MOE__MF

MOE__IMPL const moe_field *moe_model_config_fields(int *count) {
    if (count) *count = (int)(sizeof moe__model_fields / sizeof moe__model_fields[0]);
    return moe__model_fields;
}

/* Byte cursors with bounds: a writer that only counts past its end (out = NULL sizes a
   record), a reader that stops at its end. Little-endian by value, so hosts of either
   byte order write the same bytes. */
typedef struct moe__wcur {
    unsigned char *p;
    size_t cap, pos;
} moe__wcur;

typedef struct moe__rcur {
    const unsigned char *p;
    size_t len, pos;
    int short_read;
} moe__rcur;

static void moe__wbytes(moe__wcur *w, const void *src, size_t n) {
    if (w->p && w->pos + n <= w->cap && n) memcpy(w->p + w->pos, src, n);
    w->pos += n;
}

static void moe__wuint(moe__wcur *w, uint64_t v, int nbytes) {
    unsigned char b[8];
    int i;
    for (i = 0; i < nbytes; i++) b[i] = (unsigned char)(v >> (8 * i));
    moe__wbytes(w, b, (size_t)nbytes);
}

static const unsigned char *moe__rbytes(moe__rcur *r, size_t n) {
    const unsigned char *at = r->p + r->pos;
    if (r->short_read || n > r->len - r->pos) {
        r->short_read = 1;
        return NULL;
    }
    r->pos += n;
    return at;
}

static uint64_t moe__ruint(moe__rcur *r, int nbytes) {
    const unsigned char *b = moe__rbytes(r, (size_t)nbytes);
    uint64_t v = 0;
    int i;
    if (!b) return 0;
    for (i = nbytes - 1; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

static int64_t moe__field_int(const unsigned char *p, size_t size) {
    if (size == 1) { int8_t v; memcpy(&v, p, 1); return v; }
    if (size == 2) { int16_t v; memcpy(&v, p, 2); return v; }
    if (size == 4) { int32_t v; memcpy(&v, p, 4); return v; }
    { int64_t v; memcpy(&v, p, 8); return v; }
}

/* 1 when v fits the member (as the signed or the unsigned integer of its width) */
static int moe__field_set_int(unsigned char *p, size_t size, int64_t v) {
    if (size == 1 && v >= -128 && v <= 255) { int8_t x = (int8_t)(v > 127 ? v - 256 : v); memcpy(p, &x, 1); return 1; }
    if (size == 2 && v >= -32768 && v <= 65535) { int16_t x = (int16_t)(v > 32767 ? v - 65536 : v); memcpy(p, &x, 2); return 1; }
    if (size == 4 && v >= -2147483647LL - 1 && v <= 4294967295LL) {
        int32_t x = (int32_t)(v > 2147483647LL ? v - 4294967296LL : v);
        memcpy(p, &x, 4);
        return 1;
    }
    if (size == 8) { memcpy(p, &v, 8); return 1; }
    return 0;
}

static int moe__field_ok(const moe_field *f) {
    size_t n = f->name ? strlen(f->name) : 0;
    if (n == 0 || n > 255) return 0;
    if (f->type == MOE_FIELD_INT) return f->size == 1 || f->size == 2 || f->size == 4 || f->size == 8;
    if (f->type == MOE_FIELD_FLOAT) return f->size == sizeof(float) || f->size == sizeof(double);
    return f->type == MOE_FIELD_TEXT && f->size >= 1;
}

MOE__IMPL moe_status moe_record_write(void *out, size_t cap, size_t *len, const void *obj,
                                      const void *defaults, const moe_field *fields, int n_fields,
                                      moe_err *err) {
    moe__wcur w;
    int i;
    w.p = (unsigned char *)out; w.cap = cap; w.pos = 0;
    *len = 0;
    if (!obj || (n_fields > 0 && !fields) || n_fields < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record write needs an object and a field table");
    moe__wuint(&w, (uint64_t)n_fields, 4);
    for (i = 0; i < n_fields; i++) {
        const moe_field *f = &fields[i];
        const unsigned char *v = (const unsigned char *)obj + f->offset;
        int is_default;
        if (!moe__field_ok(f))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "field %d ('%s') of the table: name of 1..255 bytes and a size its type can have needed", i, f->name ? f->name : "");
        is_default = defaults && memcmp(v, (const unsigned char *)defaults + f->offset, f->size) == 0;
        if (f->type == MOE_FIELD_TEXT) /* up to the NUL, or the array's end */
            is_default = defaults && strncmp((const char *)v, (const char *)defaults + f->offset, f->size) == 0;
        moe__wuint(&w, (uint64_t)strlen(f->name), 1);
        moe__wbytes(&w, f->name, strlen(f->name));
        moe__wuint(&w, (uint64_t)f->type, 1);
        moe__wuint(&w, is_default ? 1u : 0u, 1);
        if (f->type == MOE_FIELD_INT) {
            moe__wuint(&w, (uint64_t)moe__field_int(v, f->size), 8);
        } else if (f->type == MOE_FIELD_FLOAT) {
            double x;
            uint64_t bits;
            if (f->size == sizeof(float)) { float y; memcpy(&y, v, sizeof y); x = y; }
            else memcpy(&x, v, sizeof x);
            memcpy(&bits, &x, 8);
            moe__wuint(&w, bits, 8);
        } else {
            size_t n = 0;
            while (n < f->size && v[n]) n++;
            moe__wuint(&w, (uint64_t)n, 4);
            moe__wbytes(&w, v, n);
        }
    }
    *len = w.pos;
    if (out && w.pos > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record needs %zu bytes, the buffer has %zu", w.pos, cap);
    return MOE_OK;
}

/* One pass over a record: checks everything; stores into obj only when `store`. */
static moe_status moe__record_pass(unsigned char *obj, size_t *used, const void *in, size_t len,
                                   const moe_field *fields, int n_fields, unsigned char *seen, int store, moe_err *err) {
    moe__rcur r;
    uint32_t count, e;
    const moe_status bad = MOE_ERR_FORMAT;
    r.p = (const unsigned char *)in; r.len = in ? len : 0; r.pos = 0; r.short_read = 0;
    count = (uint32_t)moe__ruint(&r, 4);
    if (!r.short_read && count > (r.len - r.pos) / 4) return moe_err_set(err, bad, "record claims %u fields in %zu bytes (corrupt)", count, len);
    memset(seen, 0, (size_t)n_fields + 1);
    for (e = 0; e < count && !r.short_read; e++) {
        char name[256];
        size_t nlen = (size_t)moe__ruint(&r, 1);
        const unsigned char *nm = moe__rbytes(&r, nlen);
        int type = (int)moe__ruint(&r, 1), flags = (int)moe__ruint(&r, 1), i, k = -1;
        const unsigned char *val;
        uint64_t raw;
        if (!nm || r.short_read) break;
        if (nlen == 0) return moe_err_set(err, bad, "record field %u has an empty name (corrupt)", e);
        memcpy(name, nm, nlen);
        name[nlen] = 0;
        if (type != MOE_FIELD_INT && type != MOE_FIELD_FLOAT && type != MOE_FIELD_TEXT)
            return moe_err_set(err, bad, "record field '%s' has unknown type %d (corrupt, or written by a newer version)", name, type);
        if (type == MOE_FIELD_TEXT) {
            size_t n = (size_t)moe__ruint(&r, 4);
            val = moe__rbytes(&r, n);
            raw = n;
        } else {
            val = NULL;
            raw = moe__ruint(&r, 8);
        }
        if (r.short_read) break;
        for (i = 0; i < n_fields && k < 0; i++)
            if (strlen(fields[i].name) == nlen && memcmp(fields[i].name, name, nlen) == 0) k = i;
        if (k < 0) {
            if (flags & 1) continue; /* a newer writer's option at its default: the old behaviour */
            return moe_err_set(err, bad, "record field '%s' is unknown to this version and not at its default (written by a newer version?)", name);
        }
        if (seen[k]) return moe_err_set(err, bad, "record field '%s' appears twice (corrupt)", name);
        seen[k] = 1;
        if (type != (int)fields[k].type)
            return moe_err_set(err, bad, "record field '%s' has type '%c', expected '%c'", name, type, (int)fields[k].type);
        {
            unsigned char *dst = obj + fields[k].offset;
            if (type == MOE_FIELD_INT) {
                unsigned char tmp[8];
                if (!moe__field_set_int(store ? dst : tmp, fields[k].size, (int64_t)raw))
                    return moe_err_set(err, bad, "record field '%s' = %lld does not fit its %zu-byte member", name, (long long)(int64_t)raw, fields[k].size);
            } else if (type == MOE_FIELD_FLOAT) {
                double x;
                memcpy(&x, &raw, 8);
                if (store && fields[k].size == sizeof(float)) { float y = (float)x; memcpy(dst, &y, sizeof y); }
                else if (store) memcpy(dst, &x, sizeof x);
            } else {
                if (raw >= fields[k].size) return moe_err_set(err, bad, "record field '%s' holds %llu bytes of text; its member holds %zu with the NUL", name, (unsigned long long)raw, fields[k].size);
                if (store) {
                    memset(dst, 0, fields[k].size);
                    if (raw) memcpy(dst, val, (size_t)raw);
                }
            }
        }
    }
    if (r.short_read) return moe_err_set(err, bad, "record ends inside field %u of %u (truncated or corrupt)", e, count);
    if (used) *used = r.pos;
    return MOE_OK;
}

MOE__IMPL moe_status moe_record_read(void *obj, size_t *used, const void *in, size_t len,
                                     const moe_field *fields, int n_fields, moe_err *err) {
    unsigned char *seen;
    moe_status st;
    int i;
    if (!obj || (n_fields > 0 && !fields) || n_fields < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record read needs an object and a field table");
    for (i = 0; i < n_fields; i++)
        if (!moe__field_ok(&fields[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "field %d ('%s') of the table: name of 1..255 bytes and a size its type can have needed", i, fields[i].name ? fields[i].name : "");
    seen = (unsigned char *)moe__calloc((size_t)n_fields + 1, 1);
    if (!seen) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory reading a record");
    /* check everything first, so a refused record leaves obj as it was */
    st = moe__record_pass((unsigned char *)obj, used, in, len, fields, n_fields, seen, 0, err);
    if (st == MOE_OK) st = moe__record_pass((unsigned char *)obj, used, in, len, fields, n_fields, seen, 1, err);
    MOE_FREE(seen);
    return st;
}

#ifndef MOE_NO_STDIO
#define MOE__MODEL_MAGIC "MOEMODEL"

/* FNV-1a of moe_model_config's layout as the field table sees it (size, then every name,
   offset and size). Checkpoints written before model files held moe_model_config's raw bytes;
   they are read only while this matches the layout of that time: every field 4 bytes, in
   declaration order, the same on every common ABI. */
#define MOE__MODEL_RAW_LAYOUT_V0 0x285067bc168b2a8bULL
static uint64_t moe__model_raw_layout(void) {
    uint64_t h = 14695981039346656037ULL;
    unsigned char b[4];
    int i, n;
    const moe_field *f = moe_model_config_fields(&n);
    moe__put_u32(b, (uint32_t)sizeof(moe_model_config));
    h = moe__fnv1a(h, b, 4);
    for (i = 0; i < n; i++) {
        h = moe__fnv1a(h, f[i].name, strlen(f[i].name) + 1);
        moe__put_u32(b, (uint32_t)f[i].offset);
        h = moe__fnv1a(h, b, 4);
        moe__put_u32(b, (uint32_t)f[i].size);
        h = moe__fnv1a(h, b, 4);
    }
    return h;
}

/* index of a non-finite value in buf (numel floats), tensor by tensor; 0 when all finite */
static int moe__first_nonfinite(const moe_store *s, const float *buf, int *tensor, size_t *index) {
    int t;
    size_t i;
    for (t = 0; t < s->count; t++) {
        const float *p = buf + s->tensors[t].offset;
        for (i = 0; i < s->tensors[t].numel; i++)
            if (!(p[i] - p[i] == 0.0f)) { /* NaN and +-inf give NaN */
                *tensor = t;
                *index = i;
                return 1;
            }
    }
    return 0;
}

/* A sentence naming the first tensor with a non-finite value in params or (moments) Adam m, v. */
static moe_status moe__check_finite(const moe_store *s, int moments, const char *what, moe_err *err) {
    const float *bufs[3];
    const char *names[3] = {"parameter", "Adam first moment", "Adam second moment"};
    int b, t;
    size_t i;
    bufs[0] = s->params; bufs[1] = s->adam_m; bufs[2] = s->adam_v;
    for (b = 0; b < (moments ? 3 : 1); b++)
        if (bufs[b] && moe__first_nonfinite(s, bufs[b], &t, &i))
            return moe_err_set(err, MOE_ERR_FORMAT, "%s: tensor '%s' holds a non-finite %s (element %zu, %g)", what,
                               s->tensors[t].name, names[b], i, (double)bufs[b][s->tensors[t].offset + i]);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_save(const moe_model *m, const char *path, int with_moments, long long step,
                                    const void *user, size_t user_bytes, moe_err *err) {
    return moe_model_save_ex(m, path, with_moments, step, user, user_bytes, NULL, err);
}

MOE__IMPL moe_status moe_model_save_ex(const moe_model *m, const char *path, int with_moments, long long step,
                                       const void *user, size_t user_bytes, const moe_ckpt_io *io, moe_err *err) {
    moe_model_config defaults = moe_model_config_default();
    moe__wcur w;
    size_t rec_len;
    int n, t, pass;
    moe_status st;
    const moe_field *fields = moe_model_config_fields(&n);
    moe_err why;
    if (!m || !m->S.params || !path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "model save needs an initialised model and a path");
    if (moe__check_finite(&m->S, with_moments, "not saved", &why) != MOE_OK)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s; '%s' is unchanged", why.msg, path);
    /* pass 0 sizes the model record, pass 1 writes it */
    w.p = NULL; w.cap = 0;
    for (pass = 0; pass < 2; pass++) {
        w.pos = 0;
        moe__wbytes(&w, MOE__MODEL_MAGIC, 8);
        moe__wuint(&w, MOE_MODEL_RECORD_VERSION, 4);
        st = moe_record_write(w.p ? w.p + w.pos : NULL, w.p ? w.cap - w.pos : 0, &rec_len, &m->cfg, &defaults, fields, n, err);
        if (st != MOE_OK) { MOE_FREE(w.p); return st; }
        w.pos += rec_len;
        moe__wuint(&w, (uint64_t)m->S.count, 4);
        for (t = 0; t < m->S.count; t++) {
            const moe_tensor *x = &m->S.tensors[t];
            int k;
            moe__wuint(&w, (uint64_t)strlen(x->name), 1);
            moe__wbytes(&w, x->name, strlen(x->name));
            moe__wuint(&w, (uint64_t)x->ndim, 1);
            moe__wuint(&w, (uint64_t)(uint32_t)x->flags, 4);
            for (k = 0; k < x->ndim; k++) moe__wuint(&w, (uint64_t)(uint32_t)x->shape[k], 4);
        }
        if (pass == 0) {
            w.cap = w.pos;
            w.p = (unsigned char *)MOE_MALLOC(w.cap);
            if (!w.p) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the model record");
        }
    }
    st = moe_checkpoint_save_ex(path, &m->S, with_moments, step, w.p, w.pos, user, user_bytes, io, err);
    MOE_FREE(w.p);
    return st;
}

/* A model file read once: its verified bytes (the values are loaded from these, so the file is
   read and checksummed once per load), the checkpoint header, the config, the record within the
   bytes and the tensor table (declared, never allocated; count 0 for a raw-config file). */
typedef struct moe__model_file {
    moe_model_config cfg;
    moe_ckpt_info info;
    unsigned char *bytes;
    const unsigned char *record;
    moe_store table;
} moe__model_file;

static void moe__model_file_free(moe__model_file *f) {
    MOE_FREE(f->bytes);
    f->bytes = NULL;
    f->record = NULL;
    moe_store_free(&f->table);
}

static moe_status moe__model_file_read(moe__model_file *f, const char *path, moe_err *err) {
    const moe_status bad = MOE_ERR_FORMAT;
    moe_status st;
    moe__rcur r;
    moe_err why;
    size_t used, len;
    uint32_t version, count, t;
    int n;
    const moe_field *fields = moe_model_config_fields(&n);
    memset(f, 0, sizeof *f);
    moe_store_init(&f->table);
    st = moe__ckpt_read(path, &f->bytes, &len, &f->info, err);
    if (st != MOE_OK) return st;
    f->record = f->bytes + MOE__CKPT_HEADER;
    if (f->info.config_bytes < 12 || memcmp(f->record, MOE__MODEL_MAGIC, 8) != 0) {
        /* an earlier file: the raw bytes of a moe_model_config, or another object's checkpoint */
        if (f->info.config_bytes == sizeof(moe_model_config) && moe__model_raw_layout() == MOE__MODEL_RAW_LAYOUT_V0) {
            memcpy(&f->cfg, f->record, sizeof f->cfg);
            return MOE_OK;
        }
        st = f->info.config_bytes == sizeof(moe_model_config)
                 ? moe_err_set(err, bad, "'%s' holds a raw moe_model_config of an older layout (a checkpoint from before model files): load it with the moe.h that wrote it, save it with moe_model_save", path)
                 : moe_err_set(err, bad, "'%s' is a checkpoint, not a model file (its %llu-byte config is no model record): load it with moe_checkpoint_load into what wrote it", path, (unsigned long long)f->info.config_bytes);
        moe__model_file_free(f);
        return st;
    }
    r.p = f->record; r.len = (size_t)f->info.config_bytes; r.pos = 8; r.short_read = 0;
    version = (uint32_t)moe__ruint(&r, 4);
    if (version != MOE_MODEL_RECORD_VERSION) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s' holds a model record of version %u; this moe.h reads version %d (written by another version of moe.h)", path, version, MOE_MODEL_RECORD_VERSION);
    }
    f->cfg = moe_model_config_default(); /* the fields a file lacks */
    if (moe_record_read(&f->cfg, &used, f->record + r.pos, r.len - r.pos, fields, n, &why) != MOE_OK) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': model config: %s", path, why.msg);
    }
    r.pos += used;
    /* the tensor table: declared into a store that is never allocated */
    count = (uint32_t)moe__ruint(&r, 4);
    if (!r.short_read && count > (r.len - r.pos) / 6) r.short_read = 1;
    for (t = 0; t < count && !r.short_read; t++) {
        char name[256];
        int dims[MOE_MAX_DIMS] = {0, 0, 0, 0}, nd, k, flags;
        size_t nlen = (size_t)moe__ruint(&r, 1);
        const unsigned char *nm = moe__rbytes(&r, nlen);
        nd = (int)moe__ruint(&r, 1);
        flags = (int)(int32_t)(uint32_t)moe__ruint(&r, 4);
        if (!nm || r.short_read || nd < 1 || nd > MOE_MAX_DIMS) { r.short_read = 1; break; }
        for (k = 0; k < nd; k++) {
            uint64_t v = moe__ruint(&r, 4);
            dims[k] = v > 0x7fffffffu ? -1 : (int)v;
        }
        memcpy(name, nm, nlen);
        name[nlen] = 0;
        if (r.short_read || moe_store_add(&f->table, name, flags, dims[0], dims[1], dims[2], dims[3]) < 0) {
            if (!r.short_read) {
                why = f->table.err;
                moe__model_file_free(f);
                return moe_err_set(err, bad, "'%s': tensor table: %s (corrupt)", path, why.msg);
            }
            break;
        }
    }
    if (r.short_read || r.pos != r.len) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': the model record's tensor table is truncated or has trailing bytes (corrupt)", path);
    }
    if ((uint64_t)f->table.numel != f->info.numel || moe_store_fingerprint(&f->table) != f->info.fingerprint) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': the tensor table (%zu parameters) does not describe the %llu parameters that follow (corrupt)", path, f->table.numel, (unsigned long long)f->info.numel);
    }
    return MOE_OK;
}

static void moe__shape_text(char *out, size_t n, const moe_tensor *t) {
    int k;
    size_t at = (size_t)snprintf(out, n, "(%d", t->shape[0]);
    for (k = 1; k < t->ndim && at < n; k++) at += (size_t)snprintf(out + at, n - at, ", %d", t->shape[k]);
    if (at < n) snprintf(out + at, n - at, ")");
}

/* The config must validate and imply exactly the file's tensors: checked on the table alone
   (moe_model_declare, within the file's count), before anything that large is allocated. */
static moe_status moe__model_file_check(const moe__model_file *f, const char *path, moe_err *err) {
    moe_model plan;
    moe_status st = MOE_OK;
    moe_err why;
    int t;
    if (moe_model_config_validate(&f->cfg, &why) != MOE_OK)
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds an invalid model config: %s", path, why.msg);
    if (f->info.numel == 0) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds no parameters", path);
    /* within twice the file's count (plus a little): a config a few tensors off still gets a
       sentence naming the first one that differs */
    if (moe_model_declare(&plan, &f->cfg, 2 * (size_t)f->info.numel + 4096) != MOE_OK)
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds %llu parameters and a config that does not fit them: %s", path, (unsigned long long)f->info.numel, plan.err.msg);
    for (t = 0; t < plan.S.count && t < f->table.count; t++) {
        const moe_tensor *a = &plan.S.tensors[t], *b = &f->table.tensors[t];
        if (strcmp(a->name, b->name) != 0 || a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape) != 0 || a->flags != b->flags) {
            char sa[64], sb[64];
            moe__shape_text(sa, sizeof sa, a);
            moe__shape_text(sb, sizeof sb, b);
            st = moe_err_set(err, MOE_ERR_FORMAT, "'%s': its config implies tensor %d '%s' %s, the file holds '%s' %s", path, t, a->name, sa, b->name, sb);
            break;
        }
    }
    if (st == MOE_OK && ((uint64_t)plan.S.numel != f->info.numel || moe_store_fingerprint(&plan.S) != f->info.fingerprint))
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s': its config implies %d tensors of %zu parameters, the file holds %llu parameters of another layout", path,
                         plan.S.count, plan.S.numel, (unsigned long long)f->info.numel);
    moe_model_free(&plan);
    return st;
}

MOE__IMPL moe_status moe_model_load_config(const char *path, moe_model_config *c, moe_ckpt_info *info,
                                           moe_err *err) {
    moe__model_file f;
    moe_status st;
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "moe_model_load_config needs a config to fill");
    st = moe__model_file_read(&f, path, err);
    if (st != MOE_OK) return st;
    st = moe__model_file_check(&f, path, err);
    if (st == MOE_OK) {
        *c = f.cfg;
        if (info) *info = f.info;
    }
    moe__model_file_free(&f);
    return st;
}

MOE__IMPL moe_status moe_model_load(moe_model *m, const char *path, int max_B, int max_T, long long *step,
                                    void *user, size_t user_bytes, moe_err *err) {
    moe__model_file f;
    moe_status st;
    moe_err local;
    if (!err) err = &local;
    if (!m) return moe_err_set(err, MOE_ERR_INVALID_ARG, "moe_model_load needs a model to fill");
    memset(m, 0, sizeof *m);
    st = moe__model_file_read(&f, path, err);
    if (st == MOE_OK) st = moe__model_file_check(&f, path, err);
    if (st == MOE_OK && user && f.info.state_bytes != (uint64_t)user_bytes)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds a %llu-byte user blob, the caller expects %zu (see moe_model_load_config)", path,
                         (unsigned long long)f.info.state_bytes, user_bytes);
    if (st == MOE_OK && moe_model_init(m, &f.cfg, max_B > 0 ? max_B : 1, max_T > 0 ? max_T : f.cfg.max_seq) != MOE_OK)
        st = moe_err_set(err, m->err.status, "%s", m->err.msg);
    /* the values from the bytes checked above; non-finite ones are refused, naming the tensor */
    if (st == MOE_OK)
        st = moe__ckpt_load_bytes(path, &m->S, step, f.bytes, &f.info, NULL, NULL, 0, user, user ? user_bytes : 0, err);
    moe__model_file_free(&f);
    if (st != MOE_OK) {
        moe_model_free(m);
        m->err = *err;
    }
    return st;
}
#endif /* MOE_NO_STDIO */
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

/* ============================================================================================
   >>moe:growth
   ============================================================================================ */

MOE__IMPL moe_grow_spec moe_grow_spec_default(void) {
    moe_grow_spec s;
    memset(&s, 0, sizeof s);
    s.op = MOE_GROW_DIRECT;
    s.order = MOE_GROW_STACK;
    return s;
}

MOE__IMPL moe_status moe_grow_layer_map(int *map, int L, int l, const moe_grow_spec *spec, moe_err *err) {
    int j;
    if (!map || !spec) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a map buffer and a spec");
    if (l <= 0 || L < l)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "cannot grow %d layers into %d: the target must have at least as many layers", l, L);
    if (spec->layer_map) {
        for (j = 0; j < L; j++) {
            if (spec->layer_map[j] < 0 || spec->layer_map[j] >= l)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "layer_map[%d] = %d is not a layer of the %d-layer model", j, spec->layer_map[j], l);
            map[j] = spec->layer_map[j];
        }
        return MOE_OK;
    }
    if (spec->order != MOE_GROW_STACK && spec->order != MOE_GROW_INTERPOLATE)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown growth order %d", (int)spec->order);
    if (L % l != 0)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s %d layers into %d needs a whole growth factor: %d is not a multiple of %d",
                           spec->order == MOE_GROW_STACK ? "stacking" : "interpolating", l, L, L, l);
    for (j = 0; j < L; j++) map[j] = spec->order == MOE_GROW_STACK ? j % l : j / (L / l);
    return MOE_OK;
}

MOE__IMPL moe_status moe_grow_partial_map(int *map, int L, int l, int first, int count, moe_err *err) {
    int j = 0, i, r;
    if (!map) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a map buffer");
    if (l <= 0 || L < l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "cannot grow %d layers into %d: the target must have at least as many layers", l, L);
    if (first < 0 || count <= 0 || first + count > l)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the stacked block [%d, %d) is not inside the %d layers", first, first + count, l);
    if ((L - l) % count != 0)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "repeating a block of %d layers cannot add the %d layers from %d to %d", count, L - l, l, L);
    for (i = 0; i < first; i++) map[j++] = i;
    for (r = 0; r < (L - l) / count + 1; r++)
        for (i = first; i < first + count; i++) map[j++] = i;
    for (i = first + count; i < l; i++) map[j++] = i;
    return MOE_OK;
}

MOE__IMPL int moe_grow_is_new(const int *map, int j) {
    int k;
    for (k = 0; k < j; k++)
        if (map[k] == map[j]) return 1;
    return 0;
}

/* "l12.attn.wo" -> 12 and the suffix "attn.wo"; -1 for the model's non-layer tensors */
static int moe__grow_layer_of(const char *name, const char **suffix) {
    int n = 0, digits = 0;
    const char *p = name + 1;
    *suffix = name;
    if (name[0] != 'l') return -1;
    while (*p >= '0' && *p <= '9' && digits < 6) { n = 10 * n + (*p - '0'); p++; digits++; }
    if (digits == 0 || *p != '.') return -1;
    *suffix = p + 1;
    return n;
}

/* the tensor of small that big tensor t copies: same name, or layer map[j]'s */
static int moe__grow_source(const moe_store *big, int t, const moe_store *small, const int *map, int *layer) {
    const char *suffix;
    char name[MOE_NAME_LEN + 16];
    int j = moe__grow_layer_of(big->tensors[t].name, &suffix);
    *layer = j;
    if (j < 0) return moe_store_find(small, big->tensors[t].name);
    sprintf(name, "l%d.%s", map[j], suffix);
    return strlen(name) < MOE_NAME_LEN ? moe_store_find(small, name) : -1;
}

static int moe__grow_is_output(const char *suffix) {
    return moe__ends_with(suffix, "attn.wo") || moe__ends_with(suffix, "w_down") || moe__ends_with(suffix, "b_down");
}
/* the FFN's hidden neurons: rows of w_gate / w_up / b_up (fan-in), columns of w_down (fan-out) */
static int moe__grow_is_fan_in(const char *suffix) {
    return moe__ends_with(suffix, "w_gate") || moe__ends_with(suffix, "w_up") || moe__ends_with(suffix, "b_up");
}

/* -1: equal shapes; k >= 0: only dimension k differs and may grow (FFN neurons); -2: neither */
static int moe__grow_width_dim(const moe_tensor *b, const moe_tensor *s, const char *suffix) {
    int k, diff = -1;
    if (b->ndim != s->ndim) return -2;
    for (k = 0; k < b->ndim; k++)
        if (b->shape[k] != s->shape[k]) {
            if (diff >= 0 || b->shape[k] < s->shape[k]) return -2;
            diff = k;
        }
    if (diff < 0) return -1;
    if (moe__grow_is_fan_in(suffix) && diff == 1) return diff;                        /* (E, F, d), (E, F) */
    if (moe__ends_with(suffix, "w_down") && diff == b->ndim - 1 && b->ndim == 3) return diff; /* (E, d, F) */
    return -2;
}

static moe_status moe__grow_check_config(const moe_model *big, const moe_model *small, moe_err *err) {
    const moe_model_config *a = &big->cfg, *b = &small->cfg;
    const moe_layer_config *x = &a->moe, *y = &b->moe;
    if (a->vocab != b->vocab || a->max_seq != b->max_seq || a->d != b->d || a->n_heads != b->n_heads || a->pos != b->pos ||
        a->rope_theta != b->rope_theta || a->norm_eps != b->norm_eps)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth keeps vocab, max_seq, d, n_heads and positions: the two configs differ there (width d does not grow)");
    if (a->moe_every != b->moe_every || a->dense_first != b->dense_first || a->router_input != b->router_input || a->router_dim != b->router_dim)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the two models differ in which layers are MoE or in the routers' input");
    if (a->moe_every > 0 && (x->n_experts != y->n_experts || x->top_k != y->top_k || x->n_shared != y->n_shared || x->expert != y->expert ||
                             x->activation != y->activation || x->expert_bias != y->expert_bias || x->router != y->router ||
                             x->renormalize != y->renormalize || x->router_bias != y->router_bias))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the two models' MoE layers differ in experts, top-k or router");
    if (a->moe_every > 0 && (x->hyper || y->hyper))
        return moe_err_set(err, MOE_ERR_UNSUPPORTED, "HyperMoE's layer embedding has one row per layer: growing its depth is not defined");
    return MOE_OK;
}

/* Everything moe_model_grow checks, before it writes: the map, the configs, each target
   tensor's source and shapes. */
static moe_status moe__grow_check(const moe_model *big, const moe_model *small, const moe_grow_spec *spec, int *map,
                                  moe_err *err) {
    int L, l, t, j;
    if (!big || !small || !spec) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth needs a target, a small model and a spec");
    if (!big->blocks || !small->blocks || !big->S.params || !small->S.params)
        return moe_err_set(err, MOE_ERR_STATE, "growth needs two initialised models (moe_model_init)");
    if ((int)spec->op < 0 || (int)spec->op > MOE_GROW_LEARN) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown growth operator %d", (int)spec->op);
    if (!(spec->noise >= 0.0f && spec->noise < 1.0f)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "growth noise must be in [0, 1), got %g", (double)spec->noise);
    L = big->cfg.n_layers;
    l = small->cfg.n_layers;
    if (moe_grow_layer_map(map, L, l, spec, err) != MOE_OK) return err->status;
    if (moe__grow_check_config(big, small, err) != MOE_OK) return err->status;
    for (j = 0; j < L; j++)
        if (big->blocks[j].is_moe != small->blocks[map[j]].is_moe)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "target layer %d is %s but copies layer %d, which is %s", j,
                               big->blocks[j].is_moe ? "MoE" : "dense", map[j], small->blocks[map[j]].is_moe ? "MoE" : "dense");
    for (t = 0; t < big->S.count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        const char *suffix;
        int layer, s = moe__grow_source(&big->S, t, &small->S, map, &layer), k;
        moe__grow_layer_of(bt->name, &suffix);
        if (s < 0) return moe_err_set(err, MOE_ERR_SHAPE, "target tensor '%s' has no counterpart in the small model", bt->name);
        k = moe__grow_width_dim(bt, &small->S.tensors[s], suffix);
        if (k == -2) return moe_err_set(err, MOE_ERR_SHAPE, "tensor '%s' has a shape the small model's '%s' cannot grow into", bt->name, small->S.tensors[s].name);
        if (k >= 0 && (spec->op == MOE_GROW_RANDOM || spec->op == MOE_GROW_LEARN))
            return moe_err_set(err, MOE_ERR_UNSUPPORTED, "%s grows depth only: the FFN widths of the two models must match ('%s')",
                               spec->op == MOE_GROW_RANDOM ? "G_random" : "G_learn", bt->name);
    }
    return MOE_OK;
}

/* big tensor (outer, nb, inner) from small (outer, ns, inner) along the neuron dimension k */
static void moe__grow_width_copy(float *dst, const moe_tensor *bt, const float *src, const moe_tensor *st, int k,
                                 int fan_out, moe_grow_op op) {
    size_t outer = 1, inner = 1, o, in;
    int nb = bt->shape[k], ns = st->shape[k], n, i;
    for (i = 0; i < k; i++) outer *= (size_t)bt->shape[i];
    for (i = k + 1; i < bt->ndim; i++) inner *= (size_t)bt->shape[i];
    for (o = 0; o < outer; o++)
        for (n = 0; n < nb; n++) {
            int from = n % ns, copies = (nb - 1 - from) / ns + 1; /* the neurons that repeat `from` */
            float *y = dst + (o * (size_t)nb + (size_t)n) * inner;
            const float *x = src + (o * (size_t)ns + (size_t)from) * inner;
            if (op == MOE_GROW_ZERO) { /* old neurons as they were; new: own fan-in, zero fan-out */
                if (n < ns) memcpy(y, x, inner * sizeof(float));
                else if (fan_out) memset(y, 0, inner * sizeof(float));
            } else if (fan_out) {      /* Net2Net: the copies share the fan-out */
                for (in = 0; in < inner; in++) y[in] = x[in] / (float)copies;
            } else
                memcpy(y, x, inner * sizeof(float));
        }
}

MOE__IMPL moe_status moe_model_grow(moe_model *big, const moe_model *small, const moe_grow_spec *spec) {
    moe_err scratch, *err = big ? &big->err : &scratch;
    int *map, L, t, j;
    moe_status st;
    memset(&scratch, 0, sizeof scratch);
    if (!big) return MOE_ERR_INVALID_ARG;
    if (big->cfg.n_layers <= 0 || !(map = (int *)moe__calloc((size_t)big->cfg.n_layers, sizeof(int))))
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the layer map");
    st = moe__grow_check(big, small, spec, map, err);
    if (st != MOE_OK) { MOE_FREE(map); return st; }
    L = big->cfg.n_layers;
    for (t = 0; t < big->S.count; t++) {
        const moe_tensor *bt = &big->S.tensors[t], *stt;
        const char *suffix;
        int layer, s = moe__grow_source(&big->S, t, &small->S, map, &layer), k, is_new;
        float *dst = big->S.params + bt->offset;
        const float *src;
        moe__grow_layer_of(bt->name, &suffix);
        stt = &small->S.tensors[s];
        src = small->S.params + stt->offset;
        is_new = layer >= 0 && moe_grow_is_new(map, layer);
        if (is_new && spec->op == MOE_GROW_RANDOM) continue; /* the target's own initialisation */
        if (is_new && spec->op == MOE_GROW_ZERO && moe__grow_is_output(suffix)) {
            memset(dst, 0, bt->numel * sizeof(float));
            continue;
        }
        k = moe__grow_width_dim(bt, stt, suffix);
        if (k < 0) memcpy(dst, src, bt->numel * sizeof(float));
        else moe__grow_width_copy(dst, bt, src, stt, k, !moe__grow_is_fan_in(suffix), spec->op);
    }
    if (spec->noise > 0.0f) { /* §5: break the function preservation a little */
        moe_rng r;
        float a = spec->noise, d = (float)big->cfg.d;
        moe_rng_seed(&r, spec->seed);
        for (t = 0; t < big->S.count; t++) {
            const moe_tensor *bt = &big->S.tensors[t];
            const char *suffix;
            float *p = big->S.params + bt->offset, sd;
            size_t i;
            if (moe__grow_layer_of(bt->name, &suffix) < 0 || bt->ndim < 2) continue;
            sd = moe__grow_is_output(suffix) ? sqrtf(1.0f / (d * (float)L * (float)L)) : sqrtf(2.0f / (5.0f * d));
            for (i = 0; i < bt->numel; i++) p[i] = (1.0f - a) * p[i] + a * sd * moe_rng_normal(&r);
        }
    }
    for (j = 0; j < L; j++) big->layer_scale[j] = spec->op == MOE_GROW_RANDOM && moe_grow_is_new(map, j) ? 0.0f : 1.0f;
    memset(big->S.grads, 0, big->S.numel * sizeof(float));
    if (big->S.adam_m) memset(big->S.adam_m, 0, big->S.numel * sizeof(float));
    if (big->S.adam_v) memset(big->S.adam_v, 0, big->S.numel * sizeof(float));
    MOE_FREE(map);
    return MOE_OK;
}

MOE__IMPL float moe_grow_mask_value(long long step, long long ramp_steps) {
    if (ramp_steps <= 0 || step >= ramp_steps) return 1.0f;
    return step <= 0 ? 0.0f : (float)((double)step / (double)ramp_steps);
}

MOE__IMPL moe_status moe_grow_set_mask(moe_model *big, int small_layers, const moe_grow_spec *spec, long long step,
                                       long long ramp_steps) {
    int j, k, L;
    float c = moe_grow_mask_value(step, ramp_steps);
    if (!big || !big->layer_scale || !spec) return MOE_ERR_INVALID_ARG;
    L = big->cfg.n_layers;
    if (small_layers <= 0 || small_layers > L || (!spec->layer_map && L % small_layers != 0))
        return moe_err_set(&big->err, MOE_ERR_INVALID_ARG, "a %d-layer model is not grown from %d layers", L, small_layers);
    for (j = 0; j < L; j++) { /* is j a later copy? (no map buffer: this runs every step) */
        int src = spec->layer_map ? spec->layer_map[j] : spec->order == MOE_GROW_STACK ? j % small_layers : j / (L / small_layers);
        int is_new = 0;
        for (k = 0; k < j && !is_new; k++)
            is_new = src == (spec->layer_map ? spec->layer_map[k] : spec->order == MOE_GROW_STACK ? k % small_layers : k / (L / small_layers));
        big->layer_scale[j] = is_new ? c : 1.0f;
    }
    return MOE_OK;
}

/* ---- G_learn ---------------------------------------------------------------------------- */

MOE__IMPL moe_status moe_grow_learner_init(moe_grow_learner *g, const moe_model *big, const moe_model *small,
                                           const moe_grow_spec *spec) {
    int *map = NULL, t, i, L, l;
    char name[MOE_NAME_LEN + 16];
    moe_grow_spec direct;
    memset(g, 0, sizeof *g);
    if (!spec) return moe_err_set(&g->err, MOE_ERR_INVALID_ARG, "G_learn needs a spec");
    direct = *spec;
    direct.op = MOE_GROW_LEARN;
    if (!big || big->cfg.n_layers <= 0 || !(map = (int *)moe__calloc((size_t)big->cfg.n_layers, sizeof(int))))
        return moe_err_set(&g->err, big ? MOE_ERR_NOMEM : MOE_ERR_INVALID_ARG, "G_learn needs a target model");
    if (moe__grow_check(big, small, &direct, map, &g->err) != MOE_OK) { MOE_FREE(map); return g->err.status; }
    L = g->L = big->cfg.n_layers;
    l = g->l = small->cfg.n_layers;
    g->count = big->S.count;
    if (!MOE__ALLOC(g->D, (size_t)L * l, float) || !MOE__ALLOC(g->gD, (size_t)L * l, float) || !MOE__ALLOC(g->mD, (size_t)L * l, float) ||
        !MOE__ALLOC(g->vD, (size_t)L * l, float) || !MOE__ALLOC(g->src, (size_t)g->count * l, int) || !MOE__ALLOC(g->layer, g->count, int)) {
        MOE_FREE(map);
        moe_grow_learner_free(g);
        return moe_err_set(&g->err, MOE_ERR_NOMEM, "out of memory for the growth maps");
    }
    for (i = 0; i < L; i++) g->D[(size_t)i * l + map[i]] = 1.0f;
    for (t = 0; t < g->count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        const char *suffix;
        g->layer[t] = moe__grow_layer_of(bt->name, &suffix);
        for (i = 0; i < l; i++) {
            int s = -1;
            if (g->layer[t] >= 0) {
                sprintf(name, "l%d.%s", i, suffix);
                s = strlen(name) < MOE_NAME_LEN ? moe_store_find(&small->S, name) : -1;
                if (s >= 0 && small->S.tensors[s].numel != bt->numel) s = -1;
            }
            g->src[(size_t)t * l + i] = s; /* a source layer without this tensor adds nothing */
        }
    }
    MOE_FREE(map);
    return MOE_OK;
}

MOE__IMPL void moe_grow_learner_apply(const moe_grow_learner *g, moe_model *big, const moe_model *small) {
    int t, i;
    for (t = 0; t < g->count; t++) {
        const moe_tensor *bt = &big->S.tensors[t];
        float *dst = big->S.params + bt->offset;
        size_t n;
        if (g->layer[t] < 0) { /* embeddings, final norm: copied once, kept */
            int s = moe_store_find(&small->S, bt->name);
            memcpy(dst, small->S.params + small->S.tensors[s].offset, bt->numel * sizeof(float));
            continue;
        }
        memset(dst, 0, bt->numel * sizeof(float));
        for (i = 0; i < g->l; i++) {
            int s = g->src[(size_t)t * g->l + i];
            float w = g->D[(size_t)g->layer[t] * g->l + i];
            const float *x;
            if (s < 0 || w == 0.0f) continue;
            x = small->S.params + small->S.tensors[s].offset;
            for (n = 0; n < bt->numel; n++) dst[n] += w * x[n];
        }
    }
}

MOE__IMPL void moe_grow_learner_backward(moe_grow_learner *g, const moe_model *big, const moe_model *small) {
    int t, i;
    for (t = 0; t < g->count; t++) { /* dL/dD[j,i] = sum over layer j's tensors <dL/dW_j, W_i> */
        const moe_tensor *bt = &big->S.tensors[t];
        const float *gw = big->S.grads + bt->offset;
        size_t n;
        if (g->layer[t] < 0) continue;
        for (i = 0; i < g->l; i++) {
            int s = g->src[(size_t)t * g->l + i];
            const float *x;
            double acc = 0.0;
            if (s < 0) continue;
            x = small->S.params + small->S.tensors[s].offset;
            for (n = 0; n < bt->numel; n++) acc += (double)gw[n] * x[n];
            g->gD[(size_t)g->layer[t] * g->l + i] += (float)acc;
        }
    }
}

MOE__IMPL void moe_grow_learner_step(moe_grow_learner *g, float lr) {
    int k, n = g->L * g->l;
    double b1 = 0.9, b2 = 0.999, c1, c2;
    g->step++;
    c1 = 1.0 - pow(b1, (double)g->step);
    c2 = 1.0 - pow(b2, (double)g->step);
    for (k = 0; k < n; k++) {
        g->mD[k] = (float)(b1 * g->mD[k] + (1.0 - b1) * g->gD[k]);
        g->vD[k] = (float)(b2 * g->vD[k] + (1.0 - b2) * (double)g->gD[k] * g->gD[k]);
        g->D[k] -= (float)(lr * (g->mD[k] / c1) / (sqrt(g->vD[k] / c2) + 1e-8));
        g->gD[k] = 0.0f;
    }
}

MOE__IMPL void moe_grow_learner_free(moe_grow_learner *g) {
    MOE_FREE(g->D); MOE_FREE(g->gD); MOE_FREE(g->mD); MOE_FREE(g->vD); MOE_FREE(g->src); MOE_FREE(g->layer);
    g->D = g->gD = g->mD = g->vD = NULL;
    g->src = g->layer = NULL;
}

/* ---- the paper's formulas ------------------------------------------------------------- */

MOE__IMPL double moe_grow_timing_tokens(double N, double C) {
    return pow(10.0, 0.88 * log10(N) + 163.27 / log10(C) - 5.74);
}

MOE__IMPL double moe_grow_factor_fit(double N, double C) {
    return pow(10.0, 1.01 * log10(N) - 29.88 / log10(C) - 7.36);
}

MOE__IMPL double moe_grow_connection_rate(const int *map, int L) {
    int j, kept = 0;
    if (L < 2) return 1.0;
    for (j = 0; j + 1 < L; j++) kept += map[j + 1] == map[j] + 1;
    return (double)kept / (double)(L - 1);
}

MOE__IMPL moe_status moe_grow_flops_at_loss(const double *flops, const double *losses, int n, double loss, double *at,
                                            moe_err *err) {
    int i;
    if (!flops || !losses || !at || n <= 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a loss curve needs at least one point");
    if (losses[0] <= loss) { *at = flops[0]; return MOE_OK; }
    for (i = 1; i < n; i++)
        if (losses[i] <= loss) {
            double f = (losses[i - 1] - loss) / (losses[i - 1] - losses[i]);
            *at = flops[i - 1] + f * (flops[i] - flops[i - 1]);
            return MOE_OK;
        }
    return moe_err_set(err, MOE_ERR_INVALID_ARG, "the curve never reaches the loss %.4f (its lowest point is above)", loss);
}

MOE__IMPL double moe_grow_speedup(double flops_scratch, double flops_grown) { return flops_scratch / flops_grown - 1.0; }
/* ============================================================================================
   >>moe:safetensors
   ============================================================================================ */

MOE__IMPL uint16_t moe_f32_to_f16(float x) {
    /* integer rounding on the bits (numpy's npy_floatbits_to_halfbits): exact for every input,
       no dependence on the FPU's rounding mode or excess precision */
    uint32_t f, f_exp, f_sig;
    uint16_t sign;
    memcpy(&f, &x, 4);
    sign = (uint16_t)((f & 0x80000000u) >> 16);
    f_exp = f & 0x7f800000u;
    if (f_exp >= 0x47800000u) { /* |x| >= 65536, infinity or NaN */
        f_sig = f & 0x007fffffu;
        if (f_exp == 0x7f800000u && f_sig != 0) return (uint16_t)(sign | 0x7e00u | (f_sig >> 13)); /* quiet NaN */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (f_exp <= 0x38000000u) { /* |x| < 2^-14: a half subnormal or zero */
        uint32_t shift;
        if (f_exp < 0x33000000u) return sign; /* below half the smallest subnormal */
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        shift = 113u - f_exp; /* 1 .. 11 */
        /* round to nearest even at bit 13 of the shifted significand; the bits shifted out
           below it decide a tie */
        {
            uint32_t lost = f_sig & ((1u << shift) - 1u);
            f_sig >>= shift;
            if ((f_sig & 0x3fffu) != 0x1000u || lost) f_sig += 0x1000u;
        }
        return (uint16_t)(sign + (f_sig >> 13)); /* a carry into the exponent is correct */
    }
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x3fffu) != 0x1000u) f_sig += 0x1000u; /* ties (exactly 0x1000) stay even */
    /* a carry of the significand into the exponent (and up to infinity) is correct */
    return (uint16_t)(sign + (((f_exp - 0x38000000u) >> 13) + (f_sig >> 13)));
}

MOE__IMPL float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float x;
    if (e == 0) { /* zero or subnormal: man * 2^-24 is exact in float */
        x = (float)man * 5.9604644775390625e-8f;
        return sign ? -x : x;
    }
    if (e == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((e + 112u) << 23) | (man << 13);
    memcpy(&x, &u, 4);
    return x;
}

MOE__IMPL uint16_t moe_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; overflow becomes infinity */
    return (uint16_t)(u >> 16);
}

MOE__IMPL float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

#ifndef MOE_NO_STDIO

/* ---- a small bounded JSON reader -------------------------------------------------------------
   Reads a value at a time from a buffer it owns (strings are decoded in place, so it never
   allocates), depth-limited; the first problem is kept as a sentence in why. */
#define MOE__JSON_DEPTH 64

typedef struct moe__json {
    char *p;           /* the text; decoded strings overwrite it in place */
    size_t len, pos;
    int depth;
    char why[160];     /* "" while all is well */
} moe__json;

static int moe__js_fail(moe__json *j, const char *what) {
    if (!j->why[0]) snprintf(j->why, sizeof j->why, "%s at byte %zu", what, j->pos);
    return 0;
}

static int moe__js_ws(moe__json *j) { /* skips white space; returns the next byte or -1 */
    while (j->pos < j->len && (j->p[j->pos] == ' ' || j->p[j->pos] == '\t' || j->p[j->pos] == '\n' || j->p[j->pos] == '\r'))
        j->pos++;
    return j->pos < j->len ? (unsigned char)j->p[j->pos] : -1;
}

static int moe__js_eat(moe__json *j, char c) {
    if (moe__js_ws(j) != (unsigned char)c) {
        char what[32];
        sprintf(what, "expected '%c'", c);
        return moe__js_fail(j, what);
    }
    j->pos++;
    return 1;
}

static int moe__js_hex4(moe__json *j, size_t at, uint32_t *v) {
    int i;
    *v = 0;
    if (at + 4 > j->len) return 0;
    for (i = 0; i < 4; i++) {
        char c = j->p[at + (size_t)i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        *v = (*v << 4) | (uint32_t)d;
    }
    return 1;
}

/* A string: *out points at its decoded bytes (NUL-terminated in place), *n their count. */
static int moe__js_string(moe__json *j, char **out, size_t *n) {
    size_t r, w;
    if (!moe__js_eat(j, '"')) return 0;
    r = w = j->pos;
    for (;;) {
        unsigned char c;
        if (r >= j->len) return moe__js_fail(j, "unterminated string");
        c = (unsigned char)j->p[r];
        if (c == '"') break;
        if (c < 0x20) { j->pos = r; return moe__js_fail(j, "control character in a string"); }
        if (c != '\\') { j->p[w++] = (char)c; r++; continue; }
        if (r + 1 >= j->len) return moe__js_fail(j, "unterminated string");
        c = (unsigned char)j->p[r + 1];
        r += 2;
        switch (c) {
        case '"': case '\\': case '/': j->p[w++] = (char)c; break;
        case 'b': j->p[w++] = '\b'; break;
        case 'f': j->p[w++] = '\f'; break;
        case 'n': j->p[w++] = '\n'; break;
        case 'r': j->p[w++] = '\r'; break;
        case 't': j->p[w++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (!moe__js_hex4(j, r, &cp)) { j->pos = r; return moe__js_fail(j, "bad \\u escape"); }
            r += 4;
            if (cp >= 0xd800u && cp < 0xdc00u) { /* a surrogate pair: 12 bytes of text give 4 */
                if (r + 6 > j->len || j->p[r] != '\\' || j->p[r + 1] != 'u' || !moe__js_hex4(j, r + 2, &lo) || lo < 0xdc00u || lo >= 0xe000u) {
                    j->pos = r;
                    return moe__js_fail(j, "unpaired surrogate in a \\u escape");
                }
                r += 6;
                cp = 0x10000u + ((cp - 0xd800u) << 10) + (lo - 0xdc00u);
            } else if (cp >= 0xdc00u && cp < 0xe000u) {
                j->pos = r;
                return moe__js_fail(j, "unpaired surrogate in a \\u escape");
            }
            /* UTF-8 is never longer than the escape it came from, so w stays behind r */
            if (cp < 0x80u) j->p[w++] = (char)cp;
            else if (cp < 0x800u) { j->p[w++] = (char)(0xc0u | (cp >> 6)); j->p[w++] = (char)(0x80u | (cp & 0x3fu)); }
            else if (cp < 0x10000u) {
                j->p[w++] = (char)(0xe0u | (cp >> 12)); j->p[w++] = (char)(0x80u | ((cp >> 6) & 0x3fu));
                j->p[w++] = (char)(0x80u | (cp & 0x3fu));
            } else {
                j->p[w++] = (char)(0xf0u | (cp >> 18)); j->p[w++] = (char)(0x80u | ((cp >> 12) & 0x3fu));
                j->p[w++] = (char)(0x80u | ((cp >> 6) & 0x3fu)); j->p[w++] = (char)(0x80u | (cp & 0x3fu));
            }
            break;
        }
        default: j->pos = r - 2; return moe__js_fail(j, "unknown escape in a string");
        }
    }
    j->p[w] = '\0'; /* w <= r, the closing quote's place */
    *out = j->p + j->pos;
    *n = w - j->pos;
    j->pos = r + 1;
    return 1;
}

/* 10^k, exact for k <= 22 (every such power is a double) */
static double moe__pow10(long k) {
    double p = 1.0;
    long i;
    if (k > 22) return pow(10.0, (double)k);
    for (i = 0; i < k; i++) p *= 10.0;
    return p;
}

/* A number. *is_uint: it is a non-negative integer that fits in u64 (then *u holds it). The
   double is built from the decimal digits without strtod (no locale): one correctly rounded
   product or quotient for up to 19 significant digits and exponents within 10^+-22, which
   covers the numbers a config.json holds (1e-05, 10000.0, 500000). */
static int moe__js_number(moe__json *j, double *v, int *is_uint, uint64_t *u) {
    size_t at;
    int neg = 0, integer = 1, overflow = 0, sig = 0, exp_neg = 0;
    long exp10 = 0, e = 0;
    uint64_t mant = 0, whole = 0;
    double x;
    moe__js_ws(j);
    at = j->pos;
    if (at < j->len && j->p[at] == '-') { neg = 1; at++; }
    if (at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected a value"); }
    if (j->p[at] == '0' && at + 1 < j->len && j->p[at + 1] >= '0' && j->p[at + 1] <= '9') { j->pos = at; return moe__js_fail(j, "number with a leading zero"); }
    for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++) {
        unsigned dg = (unsigned)(j->p[at] - '0');
        if (whole > (UINT64_MAX - dg) / 10u) overflow = 1;
        else whole = whole * 10u + dg;
        if (sig < 19) { mant = mant * 10u + dg; sig += mant != 0; }
        else exp10++; /* digits past the 19th only scale */
    }
    if (at < j->len && j->p[at] == '.') {
        integer = 0;
        if (++at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected digits after '.'"); }
        for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++)
            if (sig < 19) { mant = mant * 10u + (unsigned)(j->p[at] - '0'); sig += mant != 0; exp10--; }
    }
    if (at < j->len && (j->p[at] == 'e' || j->p[at] == 'E')) {
        integer = 0;
        at++;
        if (at < j->len && (j->p[at] == '+' || j->p[at] == '-')) exp_neg = j->p[at++] == '-';
        if (at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected digits in an exponent"); }
        for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++)
            if (e < 100000) e = e * 10 + (j->p[at] - '0');
    }
    exp10 += exp_neg ? -e : e;
    x = (double)mant;
    if (mant != 0 && exp10 != 0) x = exp10 < 0 ? x / moe__pow10(-exp10) : x * moe__pow10(exp10);
    *v = neg ? -x : x;
    *is_uint = !neg && integer && !overflow;
    *u = whole;
    j->pos = at;
    return 1;
}

static int moe__js_literal(moe__json *j, const char *word) {
    size_t n = strlen(word);
    moe__js_ws(j);
    if (j->pos + n > j->len || memcmp(j->p + j->pos, word, n) != 0) return moe__js_fail(j, "expected a value");
    j->pos += n;
    return 1;
}

/* Iterates an object's members or an array's items: call with *first = 1 after the opening
   bracket was eaten; returns 1 while there is another (for an object, *key is its name),
   0 at the closing bracket (eaten) or on an error (why set). */
static int moe__js_next(moe__json *j, int object, int *first, char **key) {
    int close = object ? '}' : ']';
    size_t n;
    if (moe__js_ws(j) == close) { j->pos++; return 0; }
    if (!*first && !moe__js_eat(j, ',')) return 0;
    *first = 0;
    if (object && !(moe__js_string(j, key, &n) && moe__js_eat(j, ':'))) return 0;
    return 1;
}

static int moe__js_open(moe__json *j, char c) {
    if (!moe__js_eat(j, c)) return 0;
    if (++j->depth > MOE__JSON_DEPTH) return moe__js_fail(j, "nested deeper than 64 levels");
    return 1;
}

static int moe__js_skip(moe__json *j) { /* any value */
    int c = moe__js_ws(j), first = 1;
    char *s;
    size_t n;
    double v;
    int iu;
    uint64_t u;
    if (c == '"') return moe__js_string(j, &s, &n);
    if (c == 't') return moe__js_literal(j, "true");
    if (c == 'f') return moe__js_literal(j, "false");
    if (c == 'n') return moe__js_literal(j, "null");
    if (c != '{' && c != '[') return moe__js_number(j, &v, &iu, &u);
    if (!moe__js_open(j, (char)c)) return 0;
    while (moe__js_next(j, c == '{', &first, &s))
        if (!moe__js_skip(j)) return 0;
    if (j->why[0]) return 0;
    j->depth--;
    return 1;
}

static int moe__js_uint(moe__json *j, uint64_t *u) {
    double v;
    int iu;
    size_t at = j->pos;
    if (!moe__js_number(j, &v, &iu, u)) return 0;
    if (!iu) { j->pos = at; return moe__js_fail(j, "expected a non-negative integer"); }
    return 1;
}

/* ---- a growable text buffer for the JSON we write ---- */
typedef struct moe__text {
    char *p;
    size_t len, cap;
    int oom;
} moe__text;

static void moe__text_add(moe__text *t, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void moe__text_add(moe__text *t, const char *fmt, ...) {
    va_list ap;
    int n;
    if (t->oom) return;
    for (;;) {
        size_t room = t->cap - t->len;
        va_start(ap, fmt);
        n = vsnprintf(t->p ? t->p + t->len : NULL, t->p ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) { t->oom = 1; return; }
        if (t->p && (size_t)n < room) { t->len += (size_t)n; return; }
        {
            size_t cap = (t->cap ? 2 * t->cap : 1024) + (size_t)n + 1;
            char *np = (char *)MOE_MALLOC(cap);
            if (!np) { t->oom = 1; return; }
            if (t->p) memcpy(np, t->p, t->len);
            MOE_FREE(t->p);
            t->p = np;
            t->cap = cap;
        }
    }
}

/* a float32 as the shortest decimal that reads back to it (1e-05, not 9.99999975e-06), with a
   '.' whatever the C locale, and a '.0' on integers so that Python reads a float */
static void moe__text_float(moe__text *t, float v) {
    char b[40], *c;
    int prec;
    for (prec = 6; prec <= 9; prec++) {
        moe__json j;
        double back;
        int iu;
        uint64_t u;
        snprintf(b, sizeof b, "%.*g", prec, (double)v);
        for (c = b; *c; c++)
            if (*c == ',') *c = '.';
        memset(&j, 0, sizeof j);
        j.p = b;
        j.len = strlen(b);
        if (moe__js_number(&j, &back, &iu, &u) && j.pos == j.len && (float)back == v) break;
    }
    if (!strpbrk(b, ".eEn")) strcat(b, ".0");
    moe__text_add(t, "%s", b);
}

/* ---- safetensors files ------------------------------------------------------------------- */
#define MOE__ST_MAX_HEADER 100000000u
#define MOE__ST_MAX_DIMS 8
#define MOE__ST_CHUNK 65536

/* One file tensor as a strided view of a float buffer: element (i0, i1, i2, i3) of the file's
   row-major order is base[i0 st[0] + i1 st[1] + i2 st[2] + i3 st[3]], n[0] n[1] n[2] n[3] = its
   numel. This one description writes a store tensor as it is, a slice of it (q of wqkv,
   expert e of a bank), a transposed stack (the shared experts' down columns side by side) or
   a row permutation (llama.cpp's q and k, >>moe:gguf), and reads it back the same way. */
typedef struct moe__st_view {
    char name[96];
    int ndim;
    uint64_t shape[MOE_MAX_DIMS];
    float *base;
    size_t n[4], st[4];
} moe__st_view;

static const char *moe__st_dtype_name(moe_dtype t) {
    return t == MOE_DTYPE_F16 ? "F16" : t == MOE_DTYPE_BF16 ? "BF16" : "F32";
}

static size_t moe__st_dtype_size(moe_dtype t) { return t == MOE_DTYPE_F32 ? 4u : 2u; }

static void moe__st_encode(unsigned char *o, float x, moe_dtype t) {
    uint32_t u;
    if (t == MOE_DTYPE_F32) memcpy(&u, &x, 4);
    else u = t == MOE_DTYPE_F16 ? moe_f32_to_f16(x) : moe_f32_to_bf16(x);
    o[0] = (unsigned char)u; o[1] = (unsigned char)(u >> 8);
    if (t == MOE_DTYPE_F32) { o[2] = (unsigned char)(u >> 16); o[3] = (unsigned char)(u >> 24); }
}

static float moe__st_decode(const unsigned char *b, moe_dtype t) {
    uint32_t u;
    float x;
    if (t == MOE_DTYPE_F16) return moe_f16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
    if (t == MOE_DTYPE_BF16) return moe_bf16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
    u = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
    memcpy(&x, &u, 4);
    return x;
}

static size_t moe__view_numel(const moe__st_view *v) { return v->n[0] * v->n[1] * v->n[2] * v->n[3]; }

/* idx (4 counters, zero at the start) -> the next element in file order */
static void moe__view_step(const moe__st_view *v, size_t idx[4]) {
    int d;
    for (d = 3; d > 0; d--) {
        if (++idx[d] < v->n[d]) return;
        idx[d] = 0;
    }
    idx[0]++;
}

static float *moe__view_at(const moe__st_view *v, const size_t idx[4]) {
    return v->base + idx[0] * v->st[0] + idx[1] * v->st[1] + idx[2] * v->st[2] + idx[3] * v->st[3];
}

/* views[k] as one file: header, then the data in view order, converted to dtype */
static moe_status moe__st_write(const char *path, const moe__st_view *views, int count, moe_dtype dtype, moe_err *err) {
    moe__text h;
    char tmp[4096];
    moe__ckpt_out f;
    unsigned char *chunk = NULL, len8[8];
    uint64_t off = 0, hlen;
    size_t es = moe__st_dtype_size(dtype), fill = 0;
    int k, d, ok = 1;
    moe_status st;
    memset(&h, 0, sizeof h);
    moe__text_add(&h, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (k = 0; k < count; k++) {
        uint64_t bytes = (uint64_t)moe__view_numel(&views[k]) * es;
        moe__text_add(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", views[k].name, moe__st_dtype_name(dtype));
        for (d = 0; d < views[k].ndim; d++) moe__text_add(&h, "%s%llu", d ? "," : "", (unsigned long long)views[k].shape[d]);
        moe__text_add(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + bytes));
        off += bytes;
    }
    moe__text_add(&h, "}");
    while (!h.oom && h.len % 8 != 0) moe__text_add(&h, " "); /* the data starts 8-aligned */
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (h.oom || !chunk) {
        MOE_FREE(h.p); MOE_FREE(chunk);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory writing '%s'", path);
    }
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(h.p); MOE_FREE(chunk); return st; }
    hlen = h.len;
    for (d = 0; d < 8; d++) len8[d] = (unsigned char)(hlen >> (8 * d));
    ok = moe__atomic_write(&f, len8, 8) && moe__atomic_write(&f, h.p, h.len);
    for (k = 0; k < count && ok; k++) {
        const moe__st_view *v = &views[k];
        size_t idx[4] = {0, 0, 0, 0}, e, numel = moe__view_numel(v);
        for (e = 0; e < numel; e++, moe__view_step(v, idx)) {
            moe__st_encode(chunk + fill, *moe__view_at(v, idx), dtype);
            fill += es;
            if (fill == MOE__ST_CHUNK) {
                ok = moe__atomic_write(&f, chunk, fill);
                fill = 0;
                if (!ok) break;
            }
        }
    }
    if (ok && fill) ok = moe__atomic_write(&f, chunk, fill);
    MOE_FREE(h.p);
    MOE_FREE(chunk);
    return moe__atomic_close(&f, ok, tmp, path, err);
}

typedef struct moe__st_entry {
    const char *name;        /* in the reader's header buffer                 */
    moe_dtype dtype;
    int ndim;
    uint64_t shape[MOE__ST_MAX_DIMS];
    uint64_t begin, end;     /* byte range in the data                        */
    int used;                /* a view has claimed it                         */
} moe__st_entry;

typedef struct moe__st_file {
    FILE *f;
    const char *path;
    char *header;            /* (header_len + 1) bytes, strings decoded in place */
    uint64_t header_len, data_start, file_size;
    moe__st_entry *e;        /* (count)                                         */
    int count, cap;
} moe__st_file;

static void moe__st_close(moe__st_file *sf) {
    if (sf->f) fclose(sf->f);
    MOE_FREE(sf->header);
    MOE_FREE(sf->e);
    memset(sf, 0, sizeof *sf);
}

static int moe__st_cmp_begin(const void *a, const void *b) {
    const moe__st_entry *x = *(const moe__st_entry *const *)a, *y = *(const moe__st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int moe__st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const moe__st_entry *const *)a)->name, (*(const moe__st_entry *const *)b)->name);
}

/* one tensor's description: {"dtype": .., "shape": [..], "data_offsets": [b, e]} */
static int moe__st_parse_entry(moe__json *j, moe__st_entry *t, char *why, size_t why_n) {
    int first = 1, have_dtype = 0, have_shape = 0, have_off = 0;
    char *key, *s;
    size_t n;
    if (!moe__js_open(j, '{')) return 0;
    while (moe__js_next(j, 1, &first, &key)) {
        if (strcmp(key, "dtype") == 0 && !have_dtype) {
            if (!moe__js_string(j, &s, &n)) return 0;
            have_dtype = 1;
            if (strcmp(s, "F32") == 0) t->dtype = MOE_DTYPE_F32;
            else if (strcmp(s, "F16") == 0) t->dtype = MOE_DTYPE_F16;
            else if (strcmp(s, "BF16") == 0) t->dtype = MOE_DTYPE_BF16;
            else {
                snprintf(why, why_n, "tensor '%.80s' has dtype '%.24s'; moe.h reads F32, F16 and BF16", t->name, s);
                return 0;
            }
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            int f2 = 1;
            have_shape = 1;
            if (!moe__js_open(j, '[')) return 0;
            while (moe__js_next(j, 0, &f2, NULL)) {
                uint64_t dim;
                if (t->ndim == MOE__ST_MAX_DIMS) {
                    snprintf(why, why_n, "tensor '%.80s' has more than %d dimensions", t->name, MOE__ST_MAX_DIMS);
                    return 0;
                }
                if (!moe__js_uint(j, &dim)) return 0;
                t->shape[t->ndim++] = dim;
            }
            j->depth--;
        } else if (strcmp(key, "data_offsets") == 0 && !have_off) {
            int f2 = 1, k = 0;
            uint64_t v[2];
            have_off = 1;
            if (!moe__js_open(j, '[')) return 0;
            while (moe__js_next(j, 0, &f2, NULL)) {
                if (k == 2 || !moe__js_uint(j, &v[k])) {
                    if (!j->why[0]) snprintf(why, why_n, "tensor '%.80s': data_offsets must be two integers", t->name);
                    return 0;
                }
                k++;
            }
            j->depth--;
            if (k != 2) {
                snprintf(why, why_n, "tensor '%.80s': data_offsets must be two integers", t->name);
                return 0;
            }
            t->begin = v[0];
            t->end = v[1];
        } else {
            snprintf(why, why_n, "tensor '%.80s' has an unknown or repeated field '%.40s'", t->name, key);
            return 0;
        }
    }
    if (j->why[0]) return 0;
    j->depth--;
    if (!have_dtype || !have_shape || !have_off) {
        snprintf(why, why_n, "tensor '%.80s' lacks its %s", t->name, !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
        return 0;
    }
    return 1;
}

/* Opens and checks a file as the top of this section says; nothing of the data is read. */
static moe_status moe__st_open(moe__st_file *sf, const char *path, moe_err *err) {
    unsigned char len8[8];
    long size;
    moe__json j;
    moe__st_entry **order = NULL;
    char why[256], *key;
    int first = 1, i, have_meta = 0;
    uint64_t data_len, at;
    size_t es;
    memset(sf, 0, sizeof *sf);
    why[0] = '\0';
    sf->path = path;
    if (!path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors path is NULL");
    sf->f = fopen(path, "rb");
    if (!sf->f) return moe_err_set(err, MOE_ERR_IO, "cannot open '%s'", path);
    if (fseek(sf->f, 0, SEEK_END) != 0 || (size = ftell(sf->f)) < 0 || fseek(sf->f, 0, SEEK_SET) != 0) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path);
    }
    sf->file_size = (uint64_t)size;
    if (sf->file_size < 8 || fread(len8, 1, 8, sf->f) != 8) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes, too short for a safetensors file (truncated?)", path, size);
    }
    for (i = 7; i >= 0; i--) sf->header_len = (sf->header_len << 8) | len8[i];
    if (sf->header_len > sf->file_size - 8 || sf->header_len > MOE__ST_MAX_HEADER || sf->header_len < 2) {
        uint64_t hl = sf->header_len;
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' declares a %llu-byte header in a %ld-byte file (not safetensors, or truncated)", path,
                           (unsigned long long)hl, size);
    }
    sf->data_start = 8 + sf->header_len;
    data_len = sf->file_size - sf->data_start;
    sf->header = (char *)MOE_MALLOC((size_t)sf->header_len + 1);
    if (!sf->header) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the header of '%s'", path); }
    if (fread(sf->header, 1, (size_t)sf->header_len, sf->f) != (size_t)sf->header_len) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path);
    }
    sf->header[sf->header_len] = '\0';
    memset(&j, 0, sizeof j);
    j.p = sf->header;
    j.len = (size_t)sf->header_len;
    if (moe__js_open(&j, '{')) {
        while (!why[0] && moe__js_next(&j, 1, &first, &key)) {
            if (strcmp(key, "__metadata__") == 0) { /* text to text; read and not kept */
                int f2 = 1;
                char *s, *k2;
                size_t n;
                if (have_meta++) { snprintf(why, sizeof why, "two __metadata__ entries"); break; }
                if (!moe__js_open(&j, '{')) break;
                while (moe__js_next(&j, 1, &f2, &k2))
                    if (!moe__js_string(&j, &s, &n)) break;
                if (j.why[0]) break;
                j.depth--;
                continue;
            }
            if (sf->count == sf->cap) {
                int cap = sf->cap ? 2 * sf->cap : 64;
                moe__st_entry *ne = (moe__st_entry *)moe__calloc((size_t)cap, sizeof *ne);
                if (!ne) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the tensor table of '%s'", path); }
                if (sf->e) memcpy(ne, sf->e, (size_t)sf->count * sizeof *ne);
                MOE_FREE(sf->e);
                sf->e = ne;
                sf->cap = cap;
            }
            memset(&sf->e[sf->count], 0, sizeof sf->e[0]);
            sf->e[sf->count].name = key;
            if (!moe__st_parse_entry(&j, &sf->e[sf->count], why, sizeof why)) break;
            sf->count++;
        }
        if (!why[0] && !j.why[0] && moe__js_ws(&j) != -1) moe__js_fail(&j, "text after the header object");
    }
    if (!why[0] && j.why[0]) snprintf(why, sizeof why, "its header is not valid JSON (%s)", j.why);
    /* each tensor: its shape's bytes equal its range; the ranges, sorted, tile the data */
    for (i = 0; i < sf->count && !why[0]; i++) {
        moe__st_entry *t = &sf->e[i];
        uint64_t numel = 1;
        int d;
        es = moe__st_dtype_size(t->dtype);
        for (d = 0; d < t->ndim; d++) {
            if (t->shape[d] != 0 && numel > data_len / t->shape[d]) { numel = UINT64_MAX; break; }
            numel *= t->shape[d];
        }
        if (t->begin > t->end || t->end > data_len)
            snprintf(why, sizeof why, "tensor '%.80s' has data_offsets [%llu, %llu] outside the %llu bytes of data", t->name,
                     (unsigned long long)t->begin, (unsigned long long)t->end, (unsigned long long)data_len);
        else if (numel == UINT64_MAX || numel * es != t->end - t->begin)
            snprintf(why, sizeof why, "tensor '%.80s': its shape needs %s bytes but data_offsets give %llu", t->name,
                     numel == UINT64_MAX ? "more than the file's" : "another number of", (unsigned long long)(t->end - t->begin));
    }
    if (!why[0] && sf->count > 0) {
        order = (moe__st_entry **)moe__calloc((size_t)sf->count, sizeof *order);
        if (!order) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the tensor table of '%s'", path); }
        for (i = 0; i < sf->count; i++) order[i] = &sf->e[i];
        qsort(order, (size_t)sf->count, sizeof *order, moe__st_cmp_name);
        for (i = 1; i < sf->count && !why[0]; i++)
            if (strcmp(order[i - 1]->name, order[i]->name) == 0) snprintf(why, sizeof why, "tensor '%.80s' is listed twice", order[i]->name);
        qsort(order, (size_t)sf->count, sizeof *order, moe__st_cmp_begin);
        for (i = 0, at = 0; i < sf->count && !why[0]; i++) {
            if (order[i]->begin != at)
                snprintf(why, sizeof why, "tensor '%.80s' starts at byte %llu of the data, expected %llu (%s)", order[i]->name,
                         (unsigned long long)order[i]->begin, (unsigned long long)at, order[i]->begin < at ? "overlapping tensors" : "a hole in the data");
            at = order[i]->end;
        }
        if (!why[0] && at != data_len)
            snprintf(why, sizeof why, "the tensors cover %llu of the %llu bytes of data (truncated, or bytes after the last tensor)",
                     (unsigned long long)at, (unsigned long long)data_len);
        MOE_FREE(order);
    } else if (!why[0] && data_len != 0) {
        snprintf(why, sizeof why, "it lists no tensor but holds %llu bytes of data", (unsigned long long)data_len);
    }
    if (why[0]) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s': %s", path, why);
    }
    return MOE_OK;
}

static int moe__st_find(const moe__st_file *sf, const char *name) {
    int i;
    for (i = 0; i < sf->count; i++)
        if (strcmp(sf->e[i].name, name) == 0) return i;
    return -1;
}

/* Entry i's values into the view (shapes already compared), in 64 KiB chunks. */
static moe_status moe__st_read(moe__st_file *sf, int i, const moe__st_view *v, unsigned char *chunk, moe_err *err) {
    const moe__st_entry *t = &sf->e[i];
    size_t es = moe__st_dtype_size(t->dtype), left = (size_t)(t->end - t->begin), have = 0, pos = 0;
    size_t idx[4] = {0, 0, 0, 0};
    if (fseek(sf->f, (long)(sf->data_start + t->begin), SEEK_SET) != 0)
        return moe_err_set(err, MOE_ERR_IO, "cannot seek in '%s'", sf->path);
    while (left > 0 || pos < have) {
        if (pos == have) {
            size_t want = left < MOE__ST_CHUNK ? left : MOE__ST_CHUNK;
            if (fread(chunk, 1, want, sf->f) != want)
                return moe_err_set(err, MOE_ERR_IO, "'%s' ended inside tensor '%s' (changed while reading?)", sf->path, t->name);
            left -= want;
            have = want;
            pos = 0;
        }
        *moe__view_at(v, idx) = moe__st_decode(chunk + pos, t->dtype);
        pos += es;
        moe__view_step(v, idx);
    }
    return MOE_OK;
}

/* The file's entry for a view, checked for shape; -1 (err set) when absent or different. */
static int moe__st_match(moe__st_file *sf, const moe__st_view *v, moe_err *err) {
    int i = moe__st_find(sf, v->name), d, same;
    char a[96], b[96];
    size_t la = 0, lb = 0;
    if (i < 0) {
        moe_err_set(err, MOE_ERR_FORMAT, "'%s' lacks tensor '%s'", sf->path, v->name);
        return -1;
    }
    same = sf->e[i].ndim == v->ndim;
    for (d = 0; same && d < v->ndim; d++) same = sf->e[i].shape[d] == v->shape[d];
    if (!same) {
        a[0] = b[0] = '\0';
        for (d = 0; d < v->ndim && la < 60; d++) la += (size_t)snprintf(a + la, sizeof a - la, "%s%llu", d ? ", " : "", (unsigned long long)v->shape[d]);
        for (d = 0; d < sf->e[i].ndim && lb < 60; d++) lb += (size_t)snprintf(b + lb, sizeof b - lb, "%s%llu", d ? ", " : "", (unsigned long long)sf->e[i].shape[d]);
        moe_err_set(err, MOE_ERR_SHAPE, "'%s': tensor '%s' has shape (%s), expected (%s)", sf->path, v->name, b, a);
        return -1;
    }
    return i;
}

/* Reads every view from the file, every entry of the file claimed by one view (an entry no
   view claims is refused unless allow_extra names it). */
static moe_status moe__st_read_views(moe__st_file *sf, const moe__st_view *views, int count, moe_err *err) {
    unsigned char *chunk;
    int k, i;
    moe_status st = MOE_OK;
    for (k = 0; k < count; k++) {
        i = moe__st_match(sf, &views[k], err);
        if (i < 0) return err ? err->status : MOE_ERR_FORMAT;
        sf->e[i].used = 1;
    }
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (!chunk) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory reading '%s'", sf->path);
    for (k = 0; k < count && st == MOE_OK; k++) st = moe__st_read(sf, moe__st_find(sf, views[k].name), &views[k], chunk, err);
    MOE_FREE(chunk);
    return st;
}

static moe__st_view moe__view_plain(const char *name, float *base, const moe_tensor *t) {
    moe__st_view v;
    int d;
    memset(&v, 0, sizeof v);
    snprintf(v.name, sizeof v.name, "%s", name);
    v.ndim = t->ndim;
    for (d = 0; d < t->ndim; d++) v.shape[d] = (uint64_t)t->shape[d];
    v.base = base;
    v.n[0] = v.n[1] = v.n[2] = 1;
    v.n[3] = t->numel;
    v.st[3] = 1;
    return v;
}

MOE__IMPL moe_status moe_safetensors_save(const char *path, const moe_store *s, moe_dtype dtype, moe_err *err) {
    moe__st_view *views;
    int k;
    moe_status st;
    if (!path || !s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors save needs a path and an allocated store");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    views = (moe__st_view *)moe__calloc((size_t)s->count, sizeof *views);
    if (!views) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (k = 0; k < s->count; k++) views[k] = moe__view_plain(s->tensors[k].name, s->params + s->tensors[k].offset, &s->tensors[k]);
    st = moe__st_write(path, views, s->count, dtype, err);
    MOE_FREE(views);
    return st;
}

MOE__IMPL moe_status moe_safetensors_load(const char *path, moe_store *s, moe_err *err) {
    moe__st_file sf;
    moe__st_view *views;
    float *copy;
    int k;
    moe_status st;
    if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors load needs an allocated store");
    st = moe__st_open(&sf, path, err);
    if (st != MOE_OK) return st;
    views = (moe__st_view *)moe__calloc((size_t)s->count, sizeof *views);
    copy = (float *)moe__calloc(s->numel, sizeof(float)); /* the store stays as it is until all is read */
    if (!views || !copy) {
        MOE_FREE(views); MOE_FREE(copy); moe__st_close(&sf);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    }
    for (k = 0; k < s->count; k++) views[k] = moe__view_plain(s->tensors[k].name, copy + s->tensors[k].offset, &s->tensors[k]);
    st = moe__st_read_views(&sf, views, s->count, err);
    for (k = 0; k < sf.count && st == MOE_OK; k++)
        if (!sf.e[k].used) st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds tensor '%s', which the store does not have", path, sf.e[k].name);
    if (st == MOE_OK) memcpy(s->params, copy, s->numel * sizeof(float));
    MOE_FREE(views); MOE_FREE(copy);
    moe__st_close(&sf);
    return st;
}

/* ---- the model under Hugging Face names ---------------------------------------------------- */

MOE__IMPL moe_status moe_model_hf_check(const moe_model_config *c, moe_err *err) {
    const moe_status no = MOE_ERR_UNSUPPORTED;
    int any_moe;
    if (moe_model_config_validate(c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (c->pos != MOE_POS_ROPE) return moe_err_set(err, no, "learned positions (wpe) have no place in Llama/Mixtral: use pos = MOE_POS_ROPE");
    if (!(c->rope_theta <= FLT_MAX) || !(c->norm_eps <= FLT_MAX)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rope_theta and norm_eps must be finite");
    any_moe = c->moe_every > 0 && c->dense_first < c->n_layers;
    if (!any_moe) return MOE_OK;
    if (c->moe.router != MOE_ROUTER_TOPK) return moe_err_set(err, no, "only the softmax top-k router maps onto Mixtral's gate (router kind %d)", (int)c->moe.router);
    if (c->moe.expert != MOE_EXPERT_SWIGLU) return moe_err_set(err, no, "only SwiGLU experts map onto Mixtral's w1/w2/w3");
    if (c->moe.router_bias) return moe_err_set(err, no, "Mixtral's gate has no bias (router_bias = 1 does not map)");
    if (c->moe.capacity_factor > 0.0f) return moe_err_set(err, no, "a capacity limit (capacity_factor %g) drops tokens that Hugging Face models keep", (double)c->moe.capacity_factor);
    if (c->router_input != MOE_RIN_DIRECT) return moe_err_set(err, no, "routers reading a GRU state or an MLP (router_input %d) do not map", (int)c->router_input);
    if (c->moe.hyper) return moe_err_set(err, no, "HyperMoE's hyper-expert does not map");
    return MOE_OK;
}

static int moe__hf_is_mixtral(const moe_model_config *c) {
    return c->moe_every == 1 && c->dense_first == 0 && c->moe.n_shared == 0 && c->moe.renormalize;
}

static int moe__hf_any_moe(const moe_model_config *c) { return c->moe_every > 0 && c->dense_first < c->n_layers; }

/* adds a view of store tensor `store_name`: elements [first, first + n0 n1 n2) by the strides */
static int moe__hf_view(const moe_model *m, moe__st_view *v, int *count, const char *hf_name, const char *store_name,
                        size_t first, int ndim, uint64_t s0, uint64_t s1, size_t n0, size_t n1, size_t n2,
                        size_t st0, size_t st1, size_t st2, size_t *covered, moe_err *err) {
    int id = moe_store_find(&m->S, store_name);
    moe__st_view *w;
    if (id < 0) {
        moe_err_set(err, MOE_ERR_STATE, "the model has no tensor '%s' (its layout is not one this exporter knows)", store_name);
        return 0;
    }
    if (n0 * n1 * n2 == 0 || first + (n0 - 1) * st0 + (n1 - 1) * st1 + (n2 - 1) * st2 >= m->S.tensors[id].numel) {
        moe_err_set(err, MOE_ERR_STATE, "tensor '%s' is smaller than its Hugging Face pieces", store_name);
        return 0;
    }
    w = &v[(*count)++];
    memset(w, 0, sizeof *w);
    snprintf(w->name, sizeof w->name, "%s", hf_name);
    w->ndim = ndim;
    w->shape[0] = s0;
    w->shape[1] = s1;
    w->base = m->S.params + m->S.tensors[id].offset + first;
    w->n[0] = 1; w->n[1] = n0; w->n[2] = n1; w->n[3] = n2;
    w->st[1] = st0; w->st[2] = st1; w->st[3] = st2;
    covered[id] += n0 * n1 * n2;
    return 1;
}

/* THE name map: every HF tensor of m as a view of its store; every store tensor covered once */
static moe_status moe__hf_views(const moe_model *m, moe__st_view **out, int *count, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, l, e, n = 0, cap, ok = 1, id;
    char hf[96], sn[MOE_NAME_LEN];
    size_t *covered;
    moe__st_view *v;
    *out = NULL;
    *count = 0;
    if (moe_model_hf_check(c, err) != MOE_OK) return err ? err->status : MOE_ERR_UNSUPPORTED;
    cap = 3 + c->n_layers * (9 + 3 * (c->moe.n_experts + 2));
    v = (moe__st_view *)moe__calloc((size_t)cap, sizeof *v);
    covered = (size_t *)moe__calloc((size_t)m->S.count, sizeof *covered);
    if (!v || !covered) {
        MOE_FREE(v); MOE_FREE(covered);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    }
#define MOE__HF_PLAIN(hfname, store, s0, s1, nd)                                                                      \
    ok = ok && moe__hf_view(m, v, &n, hfname, store, 0, nd, (uint64_t)(s0), (uint64_t)(s1), 1, 1, (size_t)(s0) * (size_t)((nd) > 1 ? (s1) : 1), 0, 0, 1, covered, err)
    MOE__HF_PLAIN("model.embed_tokens.weight", "wte", c->vocab, d, 2);
    for (l = 0; l < c->n_layers && ok; l++) {
        const moe_block *b = &m->blocks[l];
        const char *proj[3] = {"q_proj", "k_proj", "v_proj"};
        int p;
        sprintf(hf, "model.layers.%d.input_layernorm.weight", l);
        sprintf(sn, "l%d.ln1.w", l);
        MOE__HF_PLAIN(hf, sn, d, 0, 1);
        sprintf(sn, "l%d.attn.wqkv", l);
        for (p = 0; p < 3; p++) {
            sprintf(hf, "model.layers.%d.self_attn.%s.weight", l, proj[p]);
            ok = ok && moe__hf_view(m, v, &n, hf, sn, (size_t)p * d * d, 2, (uint64_t)d, (uint64_t)d, 1, 1, (size_t)d * d, 0, 0, 1, covered, err);
        }
        sprintf(hf, "model.layers.%d.self_attn.o_proj.weight", l);
        sprintf(sn, "l%d.attn.wo", l);
        MOE__HF_PLAIN(hf, sn, d, d, 2);
        sprintf(hf, "model.layers.%d.post_attention_layernorm.weight", l);
        sprintf(sn, "l%d.ln2.w", l);
        MOE__HF_PLAIN(hf, sn, d, 0, 1);
        if (!b->is_moe) {
            int F = c->d_ff;
            sprintf(hf, "model.layers.%d.mlp.gate_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_gate", l);
            MOE__HF_PLAIN(hf, sn, F, d, 2);
            sprintf(hf, "model.layers.%d.mlp.up_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_up", l);
            MOE__HF_PLAIN(hf, sn, F, d, 2);
            sprintf(hf, "model.layers.%d.mlp.down_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_down", l);
            MOE__HF_PLAIN(hf, sn, d, F, 2);
        } else {
            int E = c->moe.n_experts, D = c->moe.d_ff;
            const char *w_hf[3] = {"w1", "w3", "w2"}, *w_st[3] = {"w_gate", "w_up", "w_down"};
            sprintf(hf, "model.layers.%d.block_sparse_moe.gate.weight", l);
            sprintf(sn, "l%d.moe.router.w", l);
            MOE__HF_PLAIN(hf, sn, E, d, 2);
            for (e = 0; e < E && ok; e++)
                for (p = 0; p < 3; p++) {
                    int rows = p == 2 ? d : D, cols = p == 2 ? D : d;
                    sprintf(hf, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, w_hf[p]);
                    sprintf(sn, "l%d.moe.experts.%s", l, w_st[p]);
                    ok = ok && moe__hf_view(m, v, &n, hf, sn, (size_t)e * D * d, 2, (uint64_t)rows, (uint64_t)cols, 1, 1, (size_t)D * d, 0, 0, 1, covered, err);
                }
            if (ok && c->moe.n_shared > 0) {
                int S = c->moe.n_shared;
                size_t Ds;
                sprintf(sn, "l%d.moe.shared.w_gate", l);
                id = moe_store_find(&m->S, sn);
                Ds = id >= 0 ? (size_t)m->S.tensors[id].shape[1] : 1;
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.gate_proj.weight", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)(S * Ds), (uint64_t)d, 1, 1, S * Ds * d, 0, 0, 1, covered, err);
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.up_proj.weight", l);
                sprintf(sn, "l%d.moe.shared.w_up", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)(S * Ds), (uint64_t)d, 1, 1, S * Ds * d, 0, 0, 1, covered, err);
                /* down (S, d, Ds) -> (d, S Ds): row i is expert 0's row i, then expert 1's, ... */
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.down_proj.weight", l);
                sprintf(sn, "l%d.moe.shared.w_down", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)d, (uint64_t)(S * Ds), (size_t)d, (size_t)S, Ds, Ds, (size_t)d * Ds, 1, covered, err);
            }
        }
    }
    MOE__HF_PLAIN("model.norm.weight", "lnf.w", d, 0, 1);
#undef MOE__HF_PLAIN
    for (id = 0; id < m->S.count && ok; id++)
        if (covered[id] != m->S.tensors[id].numel) {
            ok = 0;
            moe_err_set(err, MOE_ERR_UNSUPPORTED, "tensor '%s' has no Hugging Face name (%s)", m->S.tensors[id].name,
                        covered[id] ? "only partly covered" : "its configuration does not map onto Llama/Mixtral");
        }
    MOE_FREE(covered);
    if (!ok) { MOE_FREE(v); return err ? err->status : MOE_ERR_STATE; }
    *out = v;
    *count = n;
    return MOE_OK;
}

/* dir + "/" + file into out (cap bytes); 0 when too long */
static int moe__path_join(char *out, size_t cap, const char *dir, const char *file) {
    size_t n = strlen(dir);
    int sep = n > 0 && dir[n - 1] != '/' && dir[n - 1] != '\\';
    if (n + (size_t)sep + strlen(file) + 1 > cap) return 0;
    sprintf(out, "%s%s%s", dir, sep ? "/" : "", file);
    return 1;
}

static moe_status moe__hf_config_text(const moe_model_config *c, moe_dtype dtype, moe__text *t) {
    int mixtral = moe__hf_is_mixtral(c), any_moe = moe__hf_any_moe(c), l, first = 1;
    const char *arch = !any_moe ? "LlamaForCausalLM" : mixtral ? "MixtralForCausalLM" : "MoeHForCausalLM";
    const char *type = !any_moe ? "llama" : mixtral ? "mixtral" : "moe_h";
    moe__text_add(t, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", arch, type);
    moe__text_add(t, "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n", c->vocab, c->d);
    moe__text_add(t, "  \"intermediate_size\": %d,\n", any_moe && mixtral ? c->moe.d_ff : c->d_ff);
    moe__text_add(t, "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n", c->n_layers,
                  c->n_heads, c->n_heads);
    moe__text_add(t, "  \"head_dim\": %d,\n  \"hidden_act\": \"silu\",\n  \"max_position_embeddings\": %d,\n", c->d / c->n_heads, c->max_seq);
    moe__text_add(t, "  \"rms_norm_eps\": ");
    moe__text_float(t, c->norm_eps);
    moe__text_add(t, ",\n  \"rope_theta\": ");
    moe__text_float(t, c->rope_theta);
    moe__text_add(t, ",\n  \"rope_scaling\": null,\n  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
    moe__text_add(t, "  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"%s\"", dtype == MOE_DTYPE_F16 ? "float16" : dtype == MOE_DTYPE_BF16 ? "bfloat16" : "float32");
    if (any_moe) {
        moe__text_add(t, ",\n  \"num_local_experts\": %d,\n  \"num_experts_per_tok\": %d", c->moe.n_experts, c->moe.top_k);
        if (!mixtral) {
            moe__text_add(t, ",\n  \"moe_intermediate_size\": %d,\n  \"norm_topk_prob\": %s", c->moe.d_ff, c->moe.renormalize ? "true" : "false");
            moe__text_add(t, ",\n  \"decoder_sparse_step\": 1,\n  \"mlp_only_layers\": [");
            for (l = 0; l < c->n_layers; l++)
                if (!moe__block_is_moe(c, l)) { moe__text_add(t, "%s%d", first ? "" : ", ", l); first = 0; }
            moe__text_add(t, "],\n  \"n_shared_experts\": %d,\n  \"shared_expert_intermediate_size\": %d", c->moe.n_shared,
                          c->moe.n_shared * (c->moe.d_ff_shared > 0 ? c->moe.d_ff_shared : c->moe.d_ff));
        }
    }
    moe__text_add(t, "\n}\n");
    return t->oom ? MOE_ERR_NOMEM : MOE_OK;
}

MOE__IMPL moe_status moe_model_export_hf(const moe_model *m, const char *dir, moe_dtype dtype, moe_err *err) {
    char path[4096], tmp[4200];
    moe__st_view *views;
    moe__text t;
    moe__ckpt_out f;
    int count, ok;
    moe_status st;
    if (!m || !m->S.params || !dir) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HF export needs an initialised model and a directory");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    st = moe__hf_views(m, &views, &count, err);
    if (st != MOE_OK) return st;
    if (!moe__path_join(path, sizeof path, dir, "model.safetensors")) { MOE_FREE(views); return moe_err_set(err, MOE_ERR_INVALID_ARG, "directory name too long"); }
    st = moe__st_write(path, views, count, dtype, err);
    MOE_FREE(views);
    if (st != MOE_OK) return st;
    memset(&t, 0, sizeof t);
    if (moe__hf_config_text(&m->cfg, dtype, &t) != MOE_OK) { MOE_FREE(t.p); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    moe__path_join(path, sizeof path, dir, "config.json");
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(t.p); return st; }
    ok = moe__atomic_write(&f, t.p, t.len);
    MOE_FREE(t.p);
    return moe__atomic_close(&f, ok, tmp, path, err);
}

/* config.json -> c. Keys it does not know are ignored (transformers writes many); the ones
   that change the computation and have no moe.h meaning are refused. */
static moe_status moe__hf_config_read(const char *path, moe_model_config *c, moe_err *err) {
    FILE *f;
    long size;
    moe__json j;
    char *key, *s, why[200], type[16] = "";
    int first = 1, heads = 0, kv_heads = -1, head_dim = -1, dense_ff = -1, moe_ff = -1, n_exp = 0, n_shared = 0, shared_ff = 0, tie = 1;
    int have_layers_list = 0, sparse_step = 1, norm_topk = -1, l, n_mlp_only = 0, ok;
    int mlp_only[1024];
    size_t n;
    double v;
    uint64_t u;
    int iu;
    why[0] = '\0';
    f = fopen(path, "rb");
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open '%s'", path);
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path); }
    if (size > (1L << 20)) { fclose(f); return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes: too large for a config.json", path, size); }
    memset(&j, 0, sizeof j);
    j.p = (char *)MOE_MALLOC((size_t)size + 1);
    if (!j.p) { fclose(f); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    ok = fread(j.p, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) { MOE_FREE(j.p); return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path); }
    j.len = (size_t)size;
    *c = moe_model_config_default();
    c->pos = MOE_POS_ROPE;
    c->moe_every = 0;
    c->moe.renormalize = 1;
    if (moe__js_open(&j, '{')) {
        while (!why[0] && moe__js_next(&j, 1, &first, &key)) {
            int ch = moe__js_ws(&j);
            /* integers */
            int *ip = strcmp(key, "vocab_size") == 0 ? &c->vocab : strcmp(key, "hidden_size") == 0 ? &c->d
                    : strcmp(key, "num_hidden_layers") == 0 ? &c->n_layers : strcmp(key, "num_attention_heads") == 0 ? &heads
                    : strcmp(key, "num_key_value_heads") == 0 ? &kv_heads : strcmp(key, "head_dim") == 0 ? &head_dim
                    : strcmp(key, "intermediate_size") == 0 ? &dense_ff : strcmp(key, "moe_intermediate_size") == 0 ? &moe_ff
                    : strcmp(key, "max_position_embeddings") == 0 ? &c->max_seq : strcmp(key, "num_local_experts") == 0 ? &n_exp
                    : strcmp(key, "num_experts_per_tok") == 0 ? &c->moe.top_k : strcmp(key, "n_shared_experts") == 0 ? &n_shared
                    : strcmp(key, "shared_expert_intermediate_size") == 0 ? &shared_ff
                    : strcmp(key, "decoder_sparse_step") == 0 ? &sparse_step : NULL;
            if (ip) {
                if (ch == 'n') { /* null: as if absent */
                    if (!moe__js_literal(&j, "null")) break;
                    continue;
                }
                if (!moe__js_uint(&j, &u)) break;
                if (u > 1u << 30) { snprintf(why, sizeof why, "\"%s\" is %llu, too large", key, (unsigned long long)u); break; }
                *ip = (int)u;
            } else if (strcmp(key, "rms_norm_eps") == 0 || strcmp(key, "rope_theta") == 0) {
                if (!moe__js_number(&j, &v, &iu, &u)) break;
                if (key[1] == 'm') c->norm_eps = (float)v;
                else c->rope_theta = (float)v;
            } else if (strcmp(key, "model_type") == 0 || strcmp(key, "hidden_act") == 0) {
                if (!moe__js_string(&j, &s, &n)) break;
                if (key[0] == 'm') snprintf(type, sizeof type, "%s", s);
                else if (strcmp(s, "silu") != 0) snprintf(why, sizeof why, "hidden_act \"%.32s\": moe.h's SwiGLU uses silu", s);
            } else if (strcmp(key, "tie_word_embeddings") == 0 || strcmp(key, "attention_bias") == 0 || strcmp(key, "mlp_bias") == 0 ||
                       strcmp(key, "norm_topk_prob") == 0) {
                int t = ch == 't';
                if (!moe__js_literal(&j, t ? "true" : "false")) break;
                if (key[0] == 't') tie = t;
                else if (key[0] == 'n') norm_topk = t;
                else if (t) snprintf(why, sizeof why, "\"%s\": true (biases) does not map onto moe.h's model", key);
            } else if (strcmp(key, "rope_scaling") == 0) {
                if (ch != 'n') { snprintf(why, sizeof why, "rope_scaling is set: moe.h implements plain RoPE only"); break; }
                if (!moe__js_literal(&j, "null")) break;
            } else if (strcmp(key, "mlp_only_layers") == 0) {
                int f2 = 1;
                have_layers_list = 1;
                if (!moe__js_open(&j, '[')) break;
                while (moe__js_next(&j, 0, &f2, NULL)) {
                    if (!moe__js_uint(&j, &u)) break;
                    if (n_mlp_only == 1024 || u >= 1024) { snprintf(why, sizeof why, "mlp_only_layers is too long"); break; }
                    mlp_only[n_mlp_only++] = (int)u;
                }
                if (j.why[0] || why[0]) break;
                j.depth--;
            } else if (strcmp(key, "sliding_window") == 0 && ch != 'n') {
                snprintf(why, sizeof why, "sliding_window attention is set: moe.h attends to the whole context");
            } else if (!moe__js_skip(&j)) {
                break;
            }
        }
        if (!why[0] && !j.why[0] && moe__js_ws(&j) != -1) moe__js_fail(&j, "text after the object");
    }
    if (!why[0] && j.why[0]) snprintf(why, sizeof why, "not valid JSON (%s)", j.why);
    MOE_FREE(j.p);
    if (!why[0]) {
        int mixtral = strcmp(type, "mixtral") == 0, moe_h = strcmp(type, "moe_h") == 0;
        if (!mixtral && !moe_h && strcmp(type, "llama") != 0)
            snprintf(why, sizeof why, "model_type \"%s\": moe.h imports llama, mixtral and moe_h", type);
        else if (heads <= 0 || c->d <= 0 || c->d % heads != 0 || (head_dim >= 0 && head_dim * heads != c->d))
            snprintf(why, sizeof why, "hidden_size %d, %d heads and head_dim %d do not fit moe.h's attention (d = heads x head_dim)", c->d, heads, head_dim);
        else if (kv_heads >= 0 && kv_heads != heads)
            snprintf(why, sizeof why, "grouped-query attention (%d key/value heads for %d heads) does not map", kv_heads, heads);
        else if (!tie)
            snprintf(why, sizeof why, "an untied head (tie_word_embeddings false) does not map: moe.h's head is the embedding");
        else if (sparse_step != 1)
            snprintf(why, sizeof why, "decoder_sparse_step %d does not map (moe.h: the first layers dense, then every n-th MoE)", sparse_step);
        else if (dense_ff <= 0 && !mixtral)
            snprintf(why, sizeof why, "intermediate_size is missing");
        else {
            c->n_heads = heads;
            c->d_ff = dense_ff > 0 ? dense_ff : moe_ff;
            if (mixtral || moe_h) {
                c->moe.n_experts = n_exp;
                c->moe.d_ff = mixtral ? (moe_ff > 0 ? moe_ff : dense_ff) : moe_ff;
                c->moe.renormalize = mixtral ? 1 : norm_topk != 0;
                c->moe.n_shared = n_shared;
                if (n_shared > 0 && shared_ff % n_shared != 0)
                    snprintf(why, sizeof why, "shared_expert_intermediate_size %d is not a multiple of n_shared_experts %d", shared_ff, n_shared);
                c->moe.d_ff_shared = n_shared > 0 ? shared_ff / n_shared : 0;
                if (shared_ff > 0 && n_shared <= 0)
                    snprintf(why, sizeof why, "a shared expert without n_shared_experts: its split into experts is unknown");
                /* mlp_only_layers -> the first dense_first layers dense, then every moe_every-th MoE */
                c->dense_first = 0;
                c->moe_every = 1;
                if (have_layers_list && n_mlp_only > 0) {
                    int is_dense[1024], first_moe = -1, second = -1;
                    memset(is_dense, 0, sizeof is_dense);
                    for (l = 0; l < n_mlp_only; l++)
                        if (mlp_only[l] < c->n_layers) is_dense[mlp_only[l]] = 1;
                    for (l = 0; l < c->n_layers && l < 1024; l++)
                        if (!is_dense[l]) { if (first_moe < 0) first_moe = l; else if (second < 0) second = l; }
                    if (first_moe < 0) c->moe_every = 0;
                    else {
                        c->dense_first = first_moe;
                        c->moe_every = second > 0 ? second - first_moe : c->n_layers;
                        for (l = 0; l < c->n_layers && l < 1024 && !why[0]; l++)
                            if (moe__block_is_moe(c, l) == is_dense[l])
                                snprintf(why, sizeof why, "mlp_only_layers is not a pattern moe.h builds (the first layers dense, then every n-th layer MoE)");
                    }
                }
            }
        }
    }
    if (why[0]) return moe_err_set(err, MOE_ERR_FORMAT, "'%s': %s", path, why);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_import_hf(moe_model *m, const char *dir, int max_B, int max_T, moe_err *err) {
    char path[4096];
    moe_model_config c;
    moe__st_file sf;
    moe__st_view *views = NULL;
    moe_model probe;
    int count = 0, k, lm;
    moe_status st;
    moe_err local, why;
    if (!err) err = &local;
    if (!m || !dir) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HF import needs a model to fill and a directory");
    memset(m, 0, sizeof *m);
    if (!moe__path_join(path, sizeof path, dir, "config.json")) st = moe_err_set(err, MOE_ERR_INVALID_ARG, "directory name too long");
    else st = moe__hf_config_read(path, &c, err);
    if (st == MOE_OK) st = moe_model_hf_check(&c, err);
    if (st == MOE_OK) {
        moe__path_join(path, sizeof path, dir, "model.safetensors");
        st = moe__st_open(&sf, path, err);
    }
    if (st != MOE_OK) {
        m->err = *err;
        return st;
    }
    /* the config may not promise more parameters than the file holds (2 bytes each at least),
       so a lying config.json cannot make us reserve memory */
    if (moe_model_declare(&probe, &c, (size_t)((sf.file_size - sf.data_start) / 2) + 1) != MOE_OK)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s/config.json' does not fit '%s': %s", dir, path, probe.err.msg);
    moe_model_free(&probe);
    if (st == MOE_OK && moe_model_init(m, &c, max_B > 0 ? max_B : 1, max_T > 0 ? max_T : c.max_seq) != MOE_OK)
        st = moe_err_set(err, m->err.status, "%s", m->err.msg);
    if (st == MOE_OK) st = moe__hf_views(m, &views, &count, err);
    if (st == MOE_OK) st = moe__st_read_views(&sf, views, count, err);
    /* a tied head written out (some writers do): accepted when it is the embedding */
    lm = moe__st_find(&sf, "lm_head.weight");
    if (st == MOE_OK && lm >= 0) {
        moe__st_view hv = views[0];
        float *tmp = (float *)moe__calloc((size_t)c.vocab * c.d, sizeof(float));
        unsigned char *chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
        snprintf(hv.name, sizeof hv.name, "lm_head.weight");
        hv.base = tmp;
        if (!tmp || !chunk) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
        else if (moe__st_match(&sf, &hv, err) < 0) st = err->status;
        else st = moe__st_read(&sf, lm, &hv, chunk, err);
        if (st == MOE_OK && memcmp(tmp, moe_store_param(&m->S, m->id_wte), sizeof(float) * (size_t)c.vocab * c.d) != 0)
            st = moe_err_set(err, MOE_ERR_UNSUPPORTED, "'%s': lm_head.weight differs from model.embed_tokens.weight; moe.h's head is tied to the embedding", path);
        sf.e[lm].used = 1;
        MOE_FREE(tmp); MOE_FREE(chunk);
    }
    for (k = 0; k < sf.count && st == MOE_OK; k++)
        if (!sf.e[k].used) st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds tensor '%s', which this model has no place for", path, sf.e[k].name);
    if (st == MOE_OK && moe__check_finite(&m->S, 0, "", &why) != MOE_OK)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s'%s", path, why.msg);
    MOE_FREE(views);
    moe__st_close(&sf);
    if (st != MOE_OK) {
        moe_model_free(m);
        m->err = *err;
    }
    return st;
}
#endif /* MOE_NO_STDIO */
/* ============================================================================================
   >>moe:gguf
   ============================================================================================ */

#ifndef MOE_NO_STDIO
#define MOE__GGUF_ALIGN 32

enum { MOE__GGUF_U32 = 4, MOE__GGUF_I32 = 5, MOE__GGUF_F32 = 6, MOE__GGUF_BOOL = 7, MOE__GGUF_STRING = 8, MOE__GGUF_ARRAY = 9 };

MOE__IMPL moe_status moe_model_gguf_check(const moe_model_config *c, moe_err *err) {
    if (moe_model_hf_check(c, err) != MOE_OK) return err ? err->status : MOE_ERR_UNSUPPORTED;
    if (c->vocab != 256) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "the GGUF vocabulary is the 256 bytes; vocab is %d", c->vocab);
    if (moe__hf_any_moe(c) && !moe__hf_is_mixtral(c))
        return moe_err_set(err, MOE_ERR_UNSUPPORTED, "llama.cpp's llama architecture runs all-dense or all-MoE (Mixtral) models: "
                                                     "no dense layers among MoE ones, no shared experts, top-k weights renormalised");
    return MOE_OK;
}

/* the header under construction: a bounded byte cursor (p = NULL only counts) and the number
   of metadata entries written so far */
typedef struct moe__gguf_w {
    moe__wcur w;
    uint64_t n_kv;
} moe__gguf_w;

static void moe__gguf_str(moe__gguf_w *g, const char *s, size_t n) {
    moe__wuint(&g->w, (uint64_t)n, 8);
    moe__wbytes(&g->w, s, n);
}

static void moe__gguf_key(moe__gguf_w *g, const char *key, int type) {
    moe__gguf_str(g, key, strlen(key));
    moe__wuint(&g->w, (uint64_t)type, 4);
    g->n_kv++;
}

static void moe__gguf_u32(moe__gguf_w *g, const char *key, uint32_t v) {
    moe__gguf_key(g, key, MOE__GGUF_U32);
    moe__wuint(&g->w, v, 4);
}

static void moe__gguf_f32(moe__gguf_w *g, const char *key, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    moe__gguf_key(g, key, MOE__GGUF_F32);
    moe__wuint(&g->w, u, 4);
}

static void moe__gguf_string(moe__gguf_w *g, const char *key, const char *v) {
    moe__gguf_key(g, key, MOE__GGUF_STRING);
    moe__gguf_str(g, v, strlen(v));
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 take
   the code points 256, 257, ... in byte order. out: the UTF-8 of byte b's character. */
static size_t moe__gpt2_byte_utf8(int b, char *out) {
    int k, extra = 0;
    uint32_t cp;
#define MOE__GPT2_PRINTABLE(x) (((x) >= 33 && (x) <= 126) || ((x) >= 161 && (x) <= 172) || ((x) >= 174 && (x) <= 255))
    for (k = 0; k < b; k++) extra += !MOE__GPT2_PRINTABLE(k);
    cp = MOE__GPT2_PRINTABLE(b) ? (uint32_t)b : 256u + (uint32_t)extra;
#undef MOE__GPT2_PRINTABLE
    if (cp < 0x80u) { out[0] = (char)cp; return 1; }
    out[0] = (char)(0xc0u | (cp >> 6));
    out[1] = (char)(0x80u | (cp & 0x3fu));
    return 2;
}

typedef struct moe__gguf_tensor {
    moe__st_view v;   /* the data, in ggml order (v.shape holds ne, innermost first) */
    moe_dtype dtype;
} moe__gguf_tensor;

/* The header (metadata and tensor infos, unpadded) into g (g->w.p = NULL sizes it and counts
   the metadata entries); n_kv: the count to write, from a sizing pass. */
static void moe__gguf_header(moe__gguf_w *g, uint64_t n_kv, const moe_model_config *c, const moe__gguf_tensor *t, int count,
                             uint32_t file_type) {
    int any_moe = moe__hf_any_moe(c), k, d;
    char tok[4];
    uint64_t off = 0;
    moe__wcur *w = &g->w;
    moe__wbytes(w, "GGUF", 4);
    moe__wuint(w, 3, 4);
    moe__wuint(w, (uint64_t)count, 8);
    moe__wuint(w, n_kv, 8);
    moe__gguf_string(g, "general.architecture", "llama");
    moe__gguf_string(g, "general.name", "moe.h tiny model");
    moe__gguf_u32(g, "general.alignment", MOE__GGUF_ALIGN);
    moe__gguf_u32(g, "general.file_type", file_type);
    moe__gguf_u32(g, "llama.vocab_size", (uint32_t)c->vocab);
    moe__gguf_u32(g, "llama.context_length", (uint32_t)c->max_seq);
    moe__gguf_u32(g, "llama.embedding_length", (uint32_t)c->d);
    moe__gguf_u32(g, "llama.block_count", (uint32_t)c->n_layers);
    moe__gguf_u32(g, "llama.feed_forward_length", (uint32_t)(any_moe ? c->moe.d_ff : c->d_ff));
    moe__gguf_u32(g, "llama.attention.head_count", (uint32_t)c->n_heads);
    moe__gguf_u32(g, "llama.attention.head_count_kv", (uint32_t)c->n_heads);
    moe__gguf_u32(g, "llama.rope.dimension_count", (uint32_t)(c->d / c->n_heads));
    moe__gguf_f32(g, "llama.rope.freq_base", c->rope_theta);
    moe__gguf_f32(g, "llama.attention.layer_norm_rms_epsilon", c->norm_eps);
    if (any_moe) {
        moe__gguf_u32(g, "llama.expert_count", (uint32_t)c->moe.n_experts);
        moe__gguf_u32(g, "llama.expert_used_count", (uint32_t)c->moe.top_k);
    }
    moe__gguf_string(g, "tokenizer.ggml.model", "gpt2");
    moe__gguf_string(g, "tokenizer.ggml.pre", "default");
    moe__gguf_key(g, "tokenizer.ggml.tokens", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_STRING, 4);
    moe__wuint(w, 256, 8);
    for (k = 0; k < 256; k++) moe__gguf_str(g, tok, moe__gpt2_byte_utf8(k, tok));
    moe__gguf_key(g, "tokenizer.ggml.token_type", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_I32, 4);
    moe__wuint(w, 256, 8);
    for (k = 0; k < 256; k++) moe__wuint(w, 1, 4); /* LLAMA_TOKEN_TYPE_NORMAL */
    moe__gguf_key(g, "tokenizer.ggml.merges", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_STRING, 4);
    moe__wuint(w, 0, 8);
    moe__gguf_u32(g, "tokenizer.ggml.bos_token_id", 0);
    moe__gguf_u32(g, "tokenizer.ggml.eos_token_id", 0);
    moe__gguf_key(g, "tokenizer.ggml.add_bos_token", MOE__GGUF_BOOL);
    moe__wuint(w, 0, 1);
    moe__gguf_key(g, "tokenizer.ggml.add_eos_token", MOE__GGUF_BOOL);
    moe__wuint(w, 0, 1);
    for (k = 0; k < count; k++) {
        moe__gguf_str(g, t[k].v.name, strlen(t[k].v.name));
        moe__wuint(w, (uint64_t)t[k].v.ndim, 4);
        for (d = 0; d < t[k].v.ndim; d++) moe__wuint(w, t[k].v.shape[d], 8);
        moe__wuint(w, t[k].dtype == MOE_DTYPE_F32 ? 0u : t[k].dtype == MOE_DTYPE_F16 ? 1u : 30u, 4);
        moe__wuint(w, off, 8);
        off += ((uint64_t)moe__view_numel(&t[k].v) * moe__st_dtype_size(t[k].dtype) + MOE__GGUF_ALIGN - 1) / MOE__GGUF_ALIGN * MOE__GGUF_ALIGN;
    }
}

/* a plain view of store tensor `store` as GGUF tensor `name` with ne = ne0, ne1, ne2 */
static int moe__gguf_add(const moe_model *m, moe__gguf_tensor *t, int *count, const char *name, const char *store, int ndim,
                         uint64_t ne0, uint64_t ne1, uint64_t ne2, moe_dtype dtype, moe_err *err) {
    int id = moe_store_find(&m->S, store);
    moe__gguf_tensor *g;
    if (id < 0) {
        moe_err_set(err, MOE_ERR_STATE, "the model has no tensor '%s'", store);
        return 0;
    }
    g = &t[(*count)++];
    g->v = moe__view_plain(name, moe_store_param(&m->S, id), &m->S.tensors[id]);
    g->v.ndim = ndim;
    g->v.shape[0] = ne0; g->v.shape[1] = ne1; g->v.shape[2] = ne2;
    g->dtype = ndim == 1 ? MOE_DTYPE_F32 : dtype;
    return 1;
}

MOE__IMPL moe_status moe_model_export_gguf(const moe_model *m, const char *path, moe_dtype dtype, moe_err *err) {
    const moe_model_config *c;
    moe__gguf_tensor *t;
    moe__gguf_w g;
    unsigned char *head = NULL, *chunk = NULL, pad[MOE__GGUF_ALIGN];
    char tmp[4096], name[64], sn[MOE_NAME_LEN];
    moe__ckpt_out f;
    int count = 0, l, k, ok = 1, d, hd, half, p;
    uint32_t file_type;
    moe_status st;
    if (!m || !m->S.params || !path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "GGUF export needs an initialised model and a path");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    c = &m->cfg;
    st = moe_model_gguf_check(c, err);
    if (st != MOE_OK) return st;
    d = c->d;
    hd = d / c->n_heads;
    half = hd / 2;
    file_type = dtype == MOE_DTYPE_F32 ? 0u : dtype == MOE_DTYPE_F16 ? 1u : 32u; /* LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_BF16 */
    t = (moe__gguf_tensor *)moe__calloc((size_t)(2 + 10 * c->n_layers), sizeof *t);
    if (!t) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    ok = moe__gguf_add(m, t, &count, "token_embd.weight", "wte", 2, (uint64_t)d, (uint64_t)c->vocab, 0, dtype, err);
    for (l = 0; l < c->n_layers && ok; l++) {
        const char *qkv[3] = {"attn_q", "attn_k", "attn_v"};
        sprintf(name, "blk.%d.attn_norm.weight", l);
        sprintf(sn, "l%d.ln1.w", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 1, (uint64_t)d, 0, 0, dtype, err);
        sprintf(sn, "l%d.attn.wqkv", l);
        for (p = 0; p < 3 && ok; p++) {
            moe__st_view *v;
            sprintf(name, "blk.%d.%s.weight", l, qkv[p]);
            ok = moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)d, 0, dtype, err);
            if (!ok) break;
            v = &t[count - 1].v;
            v->base += (size_t)p * d * d;
            if (p < 2) { /* file row h hd + 2i + j <- row h hd + j half + i: loops (h, i, j, column) */
                v->n[0] = (size_t)c->n_heads; v->st[0] = (size_t)hd * d;
                v->n[1] = (size_t)half;       v->st[1] = (size_t)d;
                v->n[2] = 2;                  v->st[2] = (size_t)half * d;
                v->n[3] = (size_t)d;          v->st[3] = 1;
            } else {
                v->n[3] = (size_t)d * d;
            }
        }
        sprintf(name, "blk.%d.attn_output.weight", l);
        sprintf(sn, "l%d.attn.wo", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)d, 0, dtype, err);
        sprintf(name, "blk.%d.ffn_norm.weight", l);
        sprintf(sn, "l%d.ln2.w", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 1, (uint64_t)d, 0, 0, dtype, err);
        if (!m->blocks[l].is_moe) {
            const char *gn[3] = {"ffn_gate", "ffn_up", "ffn_down"}, *sw[3] = {"w_gate", "w_up", "w_down"};
            for (p = 0; p < 3 && ok; p++) {
                sprintf(name, "blk.%d.%s.weight", l, gn[p]);
                sprintf(sn, "l%d.ffn.%s", l, sw[p]);
                ok = moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)(p < 2 ? d : c->d_ff), (uint64_t)(p < 2 ? c->d_ff : d), 0, dtype, err);
            }
        } else {
            const char *gn[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}, *sw[3] = {"w_gate", "w_up", "w_down"};
            int D = c->moe.d_ff;
            sprintf(name, "blk.%d.ffn_gate_inp.weight", l);
            sprintf(sn, "l%d.moe.router.w", l);
            ok = ok && moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)c->moe.n_experts, 0, MOE_DTYPE_F32, err);
            for (p = 0; p < 3 && ok; p++) {
                sprintf(name, "blk.%d.%s.weight", l, gn[p]);
                sprintf(sn, "l%d.moe.experts.%s", l, sw[p]);
                ok = moe__gguf_add(m, t, &count, name, sn, 3, (uint64_t)(p < 2 ? d : D), (uint64_t)(p < 2 ? D : d), (uint64_t)c->moe.n_experts, dtype, err);
            }
        }
    }
    ok = ok && moe__gguf_add(m, t, &count, "output_norm.weight", "lnf.w", 1, (uint64_t)d, 0, 0, dtype, err);
    /* every tensor of the store is written once (the config check above makes it so) */
    for (k = 0; k < count && ok; k++) {
        uint64_t ne = 1;
        for (p = 0; p < t[k].v.ndim; p++) ne *= t[k].v.shape[p];
        if (ne != (uint64_t)moe__view_numel(&t[k].v)) ok = 0, moe_err_set(err, MOE_ERR_STATE, "GGUF tensor '%s' has %llu elements but its source %zu", t[k].v.name, (unsigned long long)ne, moe__view_numel(&t[k].v));
    }
    if (!ok) { MOE_FREE(t); return err ? err->status : MOE_ERR_STATE; }
    memset(&g, 0, sizeof g);
    moe__gguf_header(&g, 0, c, t, count, file_type); /* sizing pass */
    g.w.cap = g.w.pos;
    head = (unsigned char *)MOE_MALLOC(g.w.cap);
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (!head || !chunk) { MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    g.w.p = head;
    g.w.pos = 0;
    moe__gguf_header(&g, g.n_kv, c, t, count, file_type);
    memset(pad, 0, sizeof pad);
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk); return st; }
    ok = moe__atomic_write(&f, head, g.w.pos);
    ok = ok && moe__atomic_write(&f, pad, (MOE__GGUF_ALIGN - g.w.pos % MOE__GGUF_ALIGN) % MOE__GGUF_ALIGN);
    for (k = 0; k < count && ok; k++) {
        const moe__st_view *v = &t[k].v;
        size_t idx[4] = {0, 0, 0, 0}, e, numel = moe__view_numel(v), es = moe__st_dtype_size(t[k].dtype), fill = 0, bytes;
        for (e = 0; e < numel && ok; e++, moe__view_step(v, idx)) {
            moe__st_encode(chunk + fill, *moe__view_at(v, idx), t[k].dtype);
            fill += es;
            if (fill == MOE__ST_CHUNK) { ok = moe__atomic_write(&f, chunk, fill); fill = 0; }
        }
        if (ok && fill) ok = moe__atomic_write(&f, chunk, fill);
        bytes = numel * es;
        ok = ok && moe__atomic_write(&f, pad, (MOE__GGUF_ALIGN - bytes % MOE__GGUF_ALIGN) % MOE__GGUF_ALIGN);
    }
    MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk);
    return moe__atomic_close(&f, ok, tmp, path, err);
}
#endif /* MOE_NO_STDIO */
/* ============================================================================================
   >>moe:closer_look
   ============================================================================================ */

MOE__IMPL double moe_cosine(const float *a, const float *b, size_t n) {
    double ab = 0.0, aa = 0.0, bb = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return aa > 0.0 && bb > 0.0 ? ab / sqrt(aa * bb) : 0.0;
}

MOE__IMPL double moe_angular_similarity(double cos) {
    cos = cos > 1.0 ? 1.0 : cos < -1.0 ? -1.0 : cos;
    return 1.0 - acos(cos) / 3.14159265358979323846;
}

MOE__IMPL double moe_pearson(const double *x, const double *y, size_t n) {
    double mx = 0.0, my = 0.0, sxy = 0.0, sxx = 0.0, syy = 0.0;
    size_t i;
    if (n < 2) return NAN;
    for (i = 0; i < n; i++) { mx += x[i]; my += y[i]; }
    mx /= (double)n;
    my /= (double)n;
    for (i = 0; i < n; i++) {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
        syy += (y[i] - my) * (y[i] - my);
    }
    return sxx > 0.0 && syy > 0.0 ? sxy / sqrt(sxx * syy) : NAN;
}

typedef struct moe__xy { double x, y; } moe__xy;

static int moe__cmp_xy(const void *p, const void *q) {
    const moe__xy *a = (const moe__xy *)p, *b = (const moe__xy *)q;
    if (a->x != b->x) return a->x < b->x ? -1 : 1;
    return (a->y > b->y) - (a->y < b->y);
}

/* merge sort of y counting strict inversions (pairs i < j with y_i > y_j) */
static uint64_t moe__inversions(double *y, double *tmp, size_t n) {
    size_t width, i;
    uint64_t inv = 0;
    for (width = 1; width < n; width *= 2) {
        for (i = 0; i < n; i += 2 * width) {
            size_t mid = i + width < n ? i + width : n, hi = i + 2 * width < n ? i + 2 * width : n;
            size_t p = i, q = mid, o = i;
            while (p < mid && q < hi) {
                if (y[q] < y[p]) { inv += mid - p; tmp[o++] = y[q++]; }
                else tmp[o++] = y[p++];
            }
            while (p < mid) tmp[o++] = y[p++];
            while (q < hi) tmp[o++] = y[q++];
        }
        memcpy(y, tmp, n * sizeof(double));
    }
    return inv;
}

/* tied pairs within runs of equal values of a sorted array */
static double moe__tied_pairs(const double *v, size_t n) {
    size_t i = 0, j;
    double t = 0.0;
    while (i < n) {
        for (j = i + 1; j < n && v[j] == v[i]; j++) {}
        t += 0.5 * (double)(j - i) * (double)(j - i - 1);
        i = j;
    }
    return t;
}

MOE__IMPL double moe_kendall_tau(const double *a, const double *b, size_t n) {
    /* Knight's O(n log n) tau-b, the algorithm of scipy.stats.kendalltau */
    moe__xy *p;
    double *y, *tmp, tot, xt, yt, jt = 0.0, dis, tau;
    size_t i = 0, j;
    if (n < 2) return NAN;
    p = (moe__xy *)MOE_MALLOC(n * sizeof *p);
    y = (double *)MOE_MALLOC(2 * n * sizeof(double));
    if (!p || !y) { MOE_FREE(p); MOE_FREE(y); return NAN; }
    tmp = y + n;
    for (i = 0; i < n; i++) { p[i].x = a[i]; p[i].y = b[i]; }
    qsort(p, n, sizeof *p, moe__cmp_xy);
    for (i = 0; i < n; i++) { y[i] = p[i].x; }
    xt = moe__tied_pairs(y, n);
    for (i = 0; i < n; i = j) { /* joint ties: equal (x, y) */
        for (j = i + 1; j < n && p[j].x == p[i].x && p[j].y == p[i].y; j++) {}
        jt += 0.5 * (double)(j - i) * (double)(j - i - 1);
    }
    for (i = 0; i < n; i++) y[i] = p[i].y;
    dis = (double)moe__inversions(y, tmp, n); /* y is now sorted */
    yt = moe__tied_pairs(y, n);
    tot = 0.5 * (double)n * (double)(n - 1);
    MOE_FREE(p);
    MOE_FREE(y);
    if (tot - xt <= 0.0 || tot - yt <= 0.0) return NAN;
    tau = (tot - xt - yt + jt - 2.0 * dis) / sqrt((tot - xt) * (tot - yt)); /* exactly +-1 at the ends */
    return tau;
}

MOE__IMPL moe_status moe_routing_balance(float *inner, float *outer, const float *probs, int n, int E, int k, moe_err *err) {
    int t;
    if (!inner || !outer || !probs || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing balance: NULL buffer or negative token count");
    if (E < 2 || k < 1 || k > E) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing balance needs E >= 2 and 1 <= k <= E, got E = %d, k = %d", E, k);
    for (t = 0; t < n; t++) {
        const float *p = probs + (size_t)t * E;
        float top1 = -1.0f, top2 = -1.0f, sum = 0.0f, prev = 0.0f;
        int j, i, prev_i = -1;
        for (i = 0; i < E; i++) {
            if (p[i] > top1) { top2 = top1; top1 = p[i]; }
            else if (p[i] > top2) top2 = p[i];
        }
        inner[t] = top1 / (top2 > 1e-30f ? top2 : 1e-30f);
        /* the k largest in descending order (ties: lower index first), summed in that order */
        for (j = 0; j < k; j++) {
            int best = -1;
            for (i = 0; i < E; i++) {
                int after = prev_i < 0 || p[i] < prev || (p[i] == prev && i > prev_i); /* not yet taken */
                if (after && (best < 0 || p[i] > p[best])) best = i;
            }
            if (best < 0) break; /* NaN scores */
            sum += p[best];
            prev = p[best];
            prev_i = best;
        }
        outer[t] = sum;
    }
    return MOE_OK;
}

static int moe__bin_of(float v, int bins) {
    int b = (int)(v * bins);
    return b < 0 ? 0 : b >= bins ? bins - 1 : b;
}

MOE__IMPL moe_status moe_routing_mi(double *mi, const float *p, const float *q, int n, int E, int bins, moe_err *err) {
    int t, i, j;
    if (!mi || !p || !q || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing MI: NULL buffer or negative token count");
    if (E < 1 || bins < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "routing MI needs E >= 1 and bins >= 1, got E = %d, bins = %d", E, bins);
    for (t = 0; t < n; t++) {
        const float *pt = p + (size_t)t * E, *qt = q + (size_t)t * E;
        double acc = 0.0;
        for (i = 0; i < E; i++) {
            int ai = moe__bin_of(pt[i], bins), bi = moe__bin_of(qt[i], bins), nab = 0, na = 0, nb = 0;
            for (j = 0; j < E; j++) {
                int aj = moe__bin_of(pt[j], bins), bj = moe__bin_of(qt[j], bins);
                na += aj == ai;
                nb += bj == bi;
                nab += aj == ai && bj == bi;
            }
            acc += log((double)E * nab / ((double)na * nb));
        }
        mi[t] = acc / E;
    }
    return MOE_OK;
}

/* layer l of m is an MoE layer whose experts (and router, when asked) can be read */
static moe_status moe__closer_check(moe_model *m, int l, int need_router) {
    const moe_layer *L;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    if (l < 0 || l >= m->cfg.n_layers) return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "layer %d is outside the model's %d layers", l, m->cfg.n_layers);
    if (!m->blocks[l].is_moe)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d is a dense FFN: the expert diagnostics need an MoE layer (moe_every, dense_first)", l);
    L = &m->blocks[l].moe;
    if (need_router && L->id_router_w < 0)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d has no linear router (AoE): no gate embeddings to compare", l);
    if (need_router && L->cfg.router_dim != 0 && L->cfg.router_dim != m->cfg.d)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d's router reads a %d-wide GRU state or MLP, not x: its gate embeddings live in another space", l, L->cfg.router_dim);
    return MOE_OK;
}

MOE__IMPL moe_status moe_expert_outputs(float *out, float *scores, moe_model *m, int l) {
    moe_status st = moe__closer_check(m, l, 0);
    const moe_layer *L;
    moe_expert_weights w, we;
    int N, E, d, D, e, t, offset[2];
    float *y = NULL, *hg = NULL, *hu = NULL;
    if (st != MOE_OK) return st;
    if (m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "the two-pass protocol needs a forward first (pass 1 stores each layer's input)");
    L = &m->blocks[l].moe;
    N = m->B * m->T;
    E = L->cfg.n_experts;
    d = L->cfg.d;
    D = L->cfg.d_ff;
    if (scores) memcpy(scores, L->probs, sizeof(float) * (size_t)N * E);
    if (!out) return MOE_OK;
    w = moe_layer_experts(L, &m->S, 0, 0);
    if (L->cfg.expert == MOE_EXPERT_SWIGLU && !w.gate)
        return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d: AoE experts take their gate from the router's low-rank cache; their outputs are not separable from routing", l);
    if (!MOE__ALLOC(y, (size_t)N * d, float) || !MOE__ALLOC(hg, (size_t)N * D, float) || !MOE__ALLOC(hu, (size_t)N * D, float)) {
        MOE_FREE(y); MOE_FREE(hg); MOE_FREE(hu);
        return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for the expert outputs of %d tokens", N);
    }
    offset[0] = 0;
    offset[1] = N;
    for (e = 0; e < E && st == MOE_OK; e++) { /* expert e as a bank of one on every token */
        we.gate = w.gate ? w.gate + (size_t)e * D * d : NULL;
        we.up = w.up + (size_t)e * D * d;
        we.down = w.down + (size_t)e * d * D;
        we.b_up = w.b_up ? w.b_up + (size_t)e * D : NULL;
        we.b_down = w.b_down ? w.b_down + (size_t)e * d : NULL;
        st = moe_experts_forward(y, hg, hu, m->blocks[l].ln2, &we, offset, 1, d, D, L->cfg.expert, L->cfg.activation, NULL);
        for (t = 0; st == MOE_OK && t < N; t++) memcpy(out + ((size_t)t * E + e) * d, y + (size_t)t * d, sizeof(float) * d);
    }
    MOE_FREE(y); MOE_FREE(hg); MOE_FREE(hu);
    if (st != MOE_OK) return moe_err_set(&m->err, st, "layer %d, expert outputs: %s", l, moe_status_string(st));
    return MOE_OK;
}

MOE__IMPL void moe_rank_count(int64_t *counts, const float *out, const float *scores, int n, int E, int d) {
    int t, e, j;
    for (t = 0; t < n; t++) {
        const float *o = out + (size_t)t * E * d, *s = scores + (size_t)t * E;
        for (e = 0; e < E; e++) {
            double ne = 0.0;
            int rn = 0, rs = 0, k;
            for (k = 0; k < d; k++) ne += (double)o[(size_t)e * d + k] * o[(size_t)e * d + k];
            for (j = 0; j < E; j++) {
                double nj = 0.0;
                if (j == e) continue;
                for (k = 0; k < d; k++) nj += (double)o[(size_t)j * d + k] * o[(size_t)j * d + k];
                rn += nj > ne || (nj == ne && j < e);
                rs += s[j] > s[e] || (s[j] == s[e] && j < e);
            }
            counts[(size_t)rn * E + rs] += 1;
        }
    }
}

MOE__IMPL void moe_output_similarity(double *sim, const float *out, int n, int E, int d, int angular) {
    int t, a, b;
    for (a = 0; a < E * E; a++) sim[a] = 0.0;
    for (t = 0; t < n; t++) {
        const float *o = out + (size_t)t * E * d;
        for (a = 0; a < E; a++)
            for (b = 0; b < E; b++) {
                double c = moe_cosine(o + (size_t)a * d, o + (size_t)b * d, (size_t)d);
                sim[a * E + b] += angular ? moe_angular_similarity(c) : c;
            }
    }
    for (a = 0; n > 0 && a < E * E; a++) sim[a] /= n;
}

/* the matrix `which` of layer l: its base, per-expert stride and shape (rows, cols, neuron
   axis: 0 = neurons are rows, 1 = columns) */
static moe_status moe__closer_matrix(moe_model *m, int l, moe_expert_matrix which, const float **base, size_t *stride, int *rows,
                                     int *cols, int *neuron_cols) {
    const moe_layer *L;
    moe_expert_weights w;
    moe_status st = moe__closer_check(m, l, which == MOE_MATRIX_ROUTER);
    int d = m ? m->cfg.d : 0, D;
    if (st != MOE_OK) return st;
    L = &m->blocks[l].moe;
    D = L->cfg.d_ff;
    w = moe_layer_experts(L, &m->S, 0, 0);
    *neuron_cols = 0;
    switch (which) {
    case MOE_MATRIX_ROUTER: *base = moe_store_param(&m->S, L->id_router_w); *rows = 1; *cols = d; break;
    case MOE_MATRIX_GATE:
        if (!w.gate) return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "layer %d's experts have no gate matrix (two-matrix FFN or AoE)", l);
        *base = w.gate; *rows = D; *cols = d; break;
    case MOE_MATRIX_UP: *base = w.up; *rows = D; *cols = d; break;
    case MOE_MATRIX_DOWN: *base = w.down; *rows = d; *cols = D; *neuron_cols = 1; break;
    default: return moe_err_set(&m->err, MOE_ERR_INVALID_ARG, "unknown expert matrix %d", (int)which);
    }
    *stride = (size_t)*rows * *cols;
    return MOE_OK;
}

MOE__IMPL moe_status moe_neuron_means(float *v, moe_model *m, int l, moe_expert_matrix which) {
    const float *W;
    size_t stride;
    int rows, cols, ncols, e, i, j, E;
    moe_status st = moe__closer_matrix(m, l, which, &W, &stride, &rows, &cols, &ncols);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    for (e = 0; e < E; e++) {
        const float *M = W + (size_t)e * stride;
        float *o = v + (size_t)e * m->cfg.d;
        if (!ncols) { /* neurons are rows: the mean row */
            for (j = 0; j < cols; j++) {
                double acc = 0.0;
                for (i = 0; i < rows; i++) acc += M[(size_t)i * cols + j];
                o[j] = (float)(acc / rows);
            }
        } else { /* neurons are columns: the mean column */
            for (i = 0; i < rows; i++) {
                double acc = 0.0;
                for (j = 0; j < cols; j++) acc += M[(size_t)i * cols + j];
                o[i] = (float)(acc / cols);
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_expert_similarity(double *sim, moe_model *m, int l, moe_expert_matrix which, int neuron_mean, int angular) {
    const float *W;
    size_t stride;
    int rows, cols, ncols, a, b, E, d;
    float *v = NULL;
    moe_status st = moe__closer_matrix(m, l, which, &W, &stride, &rows, &cols, &ncols);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    d = m->cfg.d;
    if (neuron_mean && which != MOE_MATRIX_ROUTER) {
        if (!MOE__ALLOC(v, (size_t)E * d, float)) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d neuron means", E);
        moe_neuron_means(v, m, l, which);
        W = v;
        stride = (size_t)d;
    }
    for (a = 0; a < E; a++)
        for (b = 0; b < E; b++) {
            double c = moe_cosine(W + (size_t)a * stride, W + (size_t)b * stride, stride);
            sim[a * E + b] = angular ? moe_angular_similarity(c) : c;
        }
    MOE_FREE(v);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gate_neuron_regression(double *R, double *R2, moe_model *m, int l, moe_expert_matrix which) {
    double *gs = NULL, *ns = NULL, *x = NULL, *y = NULL, r;
    int E, a, b, n = 0;
    moe_status st = moe__closer_check(m, l, 1);
    if (st != MOE_OK) return st;
    E = m->blocks[l].moe.cfg.n_experts;
    if (!MOE__ALLOC(gs, (size_t)E * E, double) || !MOE__ALLOC(ns, (size_t)E * E, double) || !MOE__ALLOC(x, (size_t)E * E, double) ||
        !MOE__ALLOC(y, (size_t)E * E, double))
        st = moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d experts' similarities", E);
    if (st == MOE_OK) st = moe_expert_similarity(gs, m, l, MOE_MATRIX_ROUTER, 0, 0);
    if (st == MOE_OK) st = moe_expert_similarity(ns, m, l, which, 1, 0);
    if (st == MOE_OK) {
        for (a = 0; a < E; a++)
            for (b = a + 1; b < E; b++) {
                x[n] = gs[a * E + b];
                y[n++] = ns[a * E + b];
            }
        r = moe_pearson(x, y, (size_t)n);
        if (R) *R = r;
        if (R2) *R2 = r * r;
    }
    MOE_FREE(gs); MOE_FREE(ns); MOE_FREE(x); MOE_FREE(y);
    return st;
}

MOE__IMPL moe_status moe_similarity_by_depth(double *mean, moe_model *m, moe_expert_matrix which, int neuron_mean) {
    int l, a, b, E, any = 0;
    double *sim = NULL;
    moe_status st = MOE_OK;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    E = m->cfg.moe.n_experts;
    for (l = 0; l < m->cfg.n_layers; l++) any |= m->blocks[l].is_moe;
    if (!any) return moe_err_set(&m->err, MOE_ERR_UNSUPPORTED, "the model is dense (moe_every = 0): there are no experts to compare");
    if (!MOE__ALLOC(sim, (size_t)E * E, double)) return moe_err_set(&m->err, MOE_ERR_NOMEM, "out of memory for %d experts' similarities", E);
    for (l = 0; l < m->cfg.n_layers && st == MOE_OK; l++) {
        double acc = 0.0;
        mean[l] = NAN;
        if (!m->blocks[l].is_moe) continue;
        if ((st = moe_expert_similarity(sim, m, l, which, neuron_mean, 0)) != MOE_OK) break;
        for (a = 0; a < E; a++)
            for (b = a + 1; b < E; b++) acc += sim[a * E + b];
        mean[l] = E > 1 ? acc / (0.5 * E * (E - 1)) : NAN;
    }
    MOE_FREE(sim);
    return st;
}

MOE__IMPL moe_status moe_layer_input_similarity(double *cos, moe_model *m) {
    int l, t, N, d;
    if (!m || !m->blocks) return m ? moe_err_set(&m->err, MOE_ERR_STATE, "model is not initialised") : MOE_ERR_INVALID_ARG;
    if (m->B == 0) return moe_err_set(&m->err, MOE_ERR_STATE, "layer input similarity needs a forward first");
    N = m->B * m->T;
    d = m->cfg.d;
    for (l = 0; l + 1 < m->cfg.n_layers; l++) {
        double acc = 0.0;
        for (t = 0; t < N; t++) acc += moe_cosine(m->blocks[l].x + (size_t)t * d, m->blocks[l + 1].x + (size_t)t * d, (size_t)d);
        cos[l] = acc / N;
    }
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

/* ============================================================================================
   >>moe:mpi
   ============================================================================================ */
#ifdef MOE_MPI

static moe_status moe__mpi_fail(moe_err *err, int code, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) len = 0;
    msg[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
    return moe_err_set(err, MOE_ERR_IO, "%s failed: %s", what, len ? msg : "unknown MPI error");
}
#define MOE__MPI(err, call) do { int moe__rc = (call); if (moe__rc != MPI_SUCCESS) return moe__mpi_fail(err, moe__rc, #call); } while (0)

MOE__IMPL void moe_mpi_free(moe_mpi *ctx) {
    MOE_FREE(ctx->scratch);
    MOE_FREE(ctx->dscratch);
    MOE_FREE(ctx->hashes);
    MOE_FREE(ctx->counts);
    ctx->scratch = NULL;
    ctx->dscratch = NULL;
    ctx->hashes = NULL;
    ctx->counts = NULL;
    if (ctx->comm != MPI_COMM_NULL) MPI_Comm_free(&ctx->comm);
    ctx->comm = MPI_COMM_NULL;
}

MOE__IMPL moe_status moe_mpi_init(moe_mpi *ctx, MPI_Comm comm, size_t max_floats) {
    size_t slice;
    int ok;
    memset(ctx, 0, sizeof *ctx);
    ctx->comm = MPI_COMM_NULL;
    MOE__MPI(&ctx->err, MPI_Comm_dup(comm, &ctx->comm));
    MOE__MPI(&ctx->err, MPI_Comm_set_errhandler(ctx->comm, MPI_ERRORS_RETURN));
    MOE__MPI(&ctx->err, MPI_Comm_rank(ctx->comm, &ctx->rank));
    MOE__MPI(&ctx->err, MPI_Comm_size(ctx->comm, &ctx->size));
    slice = (max_floats + (size_t)ctx->size - 1) / (size_t)ctx->size;
    if (slice > (size_t)INT_MAX) {
        moe_mpi_free(ctx);
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "a buffer of %zu floats over %d ranks makes slices beyond MPI's int counts", max_floats, ctx->size);
    }
    ctx->max_floats = max_floats;
    ok = MOE__ALLOC(ctx->scratch, slice * (size_t)ctx->size + 1, float) &&
         MOE__ALLOC(ctx->dscratch, (size_t)ctx->size * MOE_MPI_MAX_DOUBLES, double) &&
         MOE__ALLOC(ctx->hashes, ctx->size, unsigned long long) && MOE__ALLOC(ctx->counts, (size_t)ctx->size * 4, int);
    if (!ok) {
        moe_mpi_free(ctx);
        return moe_err_set(&ctx->err, MOE_ERR_NOMEM, "out of memory for the reduction buffer (%zu floats)", max_floats);
    }
    return MOE_OK;
}

/* FNV-1a, 64 bits, over the length and the bytes */
static uint64_t moe__mpi_hash(const void *bytes, size_t n) {
    const unsigned char *p = (const unsigned char *)bytes;
    uint64_t h = 1469598103934665603ull, len = (uint64_t)n;
    size_t i;
    for (i = 0; i < 8; i++) h = (h ^ ((len >> (8 * i)) & 0xff)) * 1099511628211ull;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

MOE__IMPL moe_status moe_mpi_check_same(moe_mpi *ctx, const void *bytes, size_t n, const char *what) {
    unsigned long long mine = (unsigned long long)moe__mpi_hash(bytes, n), *all = ctx->hashes;
    int r;
    MOE__MPI(&ctx->err, MPI_Allgather(&mine, 1, MPI_UNSIGNED_LONG_LONG, all, 1, MPI_UNSIGNED_LONG_LONG, ctx->comm));
    for (r = 1; r < ctx->size; r++)
        if (all[r] != all[0])
            return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "rank %d's %s differs from rank 0's: every rank must run with the same settings",
                               r, what ? what : "data");
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_check_model(moe_mpi *ctx, const moe_model *m) {
    unsigned char rec[8192];
    size_t len = 0;
    int nf = 0;
    uint64_t fp = moe_store_fingerprint(&m->S);
    const moe_field *f = moe_model_config_fields(&nf);
    moe_status st = moe_record_write(rec, sizeof rec, &len, &m->cfg, NULL, f, nf, &ctx->err);
    if (st != MOE_OK) len = 0; /* still take part in the collectives below */
    if (moe_mpi_check_same(ctx, rec, len, "model config") != MOE_OK) return ctx->err.status;
    if (moe_mpi_check_same(ctx, &fp, sizeof fp, "parameter table") != MOE_OK) return ctx->err.status;
    return st;
}

MOE__IMPL moe_status moe_mpi_share(moe_mpi *ctx, int n, int *first, int *count) {
    *first = *count = 0;
    if (n <= 0 || n % ctx->size != 0)
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "%d items do not split evenly over %d ranks (give a multiple of the rank count)", n, ctx->size);
    *count = n / ctx->size;
    *first = ctx->rank * *count;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_allreduce_sum(moe_mpi *ctx, float *buf, size_t n) {
    int P = ctx->size, me = ctx->rank, r, *cnt, *dsp;
    size_t slice, i, mine;
    float *acc;
    if (n > ctx->max_floats)
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "allreduce of %zu floats, the context was sized for %zu", n, ctx->max_floats);
    if (P == 1 || n == 0) return MOE_OK;
    /* rank r owns the slice [r slice, (r+1) slice) of the buffer */
    slice = (n + (size_t)P - 1) / (size_t)P;
    cnt = ctx->counts;
    dsp = cnt + P;
    for (r = 0; r < P; r++) {
        size_t lo = (size_t)r * slice, hi = lo + slice;
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        cnt[r] = (int)(hi - lo);
        dsp[r] = (int)lo;
    }
    mine = (size_t)cnt[me];
    {
        int *rcnt = cnt + 2 * P, *rdsp = cnt + 3 * P, rc;
        for (r = 0; r < P; r++) { rcnt[r] = (int)mine; rdsp[r] = (int)(mine * (size_t)r); }
        /* rank r's slice `me` lands at scratch[r * mine] */
        rc = MPI_Alltoallv(buf, cnt, dsp, MPI_FLOAT, ctx->scratch, rcnt, rdsp, MPI_FLOAT, ctx->comm);
        if (rc != MPI_SUCCESS) return moe__mpi_fail(&ctx->err, rc, "MPI_Alltoallv (gradient slices)");
        /* the fixed order: ((g_0 + g_1) + g_2) + ..., element by element */
        acc = ctx->scratch;
        for (r = 1; r < P; r++) {
            const float *g = ctx->scratch + (size_t)r * mine;
            for (i = 0; i < mine; i++) acc[i] += g[i];
        }
        rc = MPI_Allgatherv(acc, (int)mine, MPI_FLOAT, buf, cnt, dsp, MPI_FLOAT, ctx->comm);
        if (rc != MPI_SUCCESS) return moe__mpi_fail(&ctx->err, rc, "MPI_Allgatherv (summed slices)");
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_allreduce_grads(moe_mpi *ctx, moe_store *s) {
    if (!s || !s->allocated || !s->grads) return moe_err_set(&ctx->err, MOE_ERR_STATE, "allreduce_grads needs an allocated store");
    return moe_mpi_allreduce_sum(ctx, s->grads, s->numel);
}

MOE__IMPL moe_status moe_mpi_sum_doubles(moe_mpi *ctx, double *v, int n) {
    int r, i;
    if (n < 0 || n > MOE_MPI_MAX_DOUBLES) return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "sum_doubles takes 0..%d values, got %d", MOE_MPI_MAX_DOUBLES, n);
    if (n == 0) return MOE_OK;
    MOE__MPI(&ctx->err, MPI_Allgather(v, n, MPI_DOUBLE, ctx->dscratch, n, MPI_DOUBLE, ctx->comm));
    for (i = 0; i < n; i++) {
        double acc = ctx->dscratch[i];
        for (r = 1; r < ctx->size; r++) acc += ctx->dscratch[(size_t)r * n + i];
        v[i] = acc;
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_root_status(moe_mpi *ctx, moe_status root_st, moe_err *err) {
    struct { int status; char msg[sizeof ((moe_err *)0)->msg]; } pkt;
    memset(&pkt, 0, sizeof pkt);
    if (ctx->rank == 0) {
        pkt.status = (int)root_st;
        if (root_st != MOE_OK && err) memcpy(pkt.msg, err->msg, sizeof pkt.msg);
    }
    MOE__MPI(&ctx->err, MPI_Bcast(&pkt, (int)sizeof pkt, MPI_BYTE, 0, ctx->comm));
    pkt.msg[sizeof pkt.msg - 1] = '\0';
    if (ctx->rank != 0 && err) {
        err->status = (moe_status)pkt.status;
        memcpy(err->msg, pkt.msg, sizeof pkt.msg);
    }
    return (moe_status)pkt.status;
}

/* ---- expert parallelism ---- */

MOE__IMPL void moe_mpi_experts_free(moe_mpi_experts *ep) {
    int **ip[] = {&ep->send_rows, &ep->recv_rows, &ep->scount, &ep->sdispl, &ep->rcount, &ep->rdispl, &ep->offset};
    float **fp[] = {&ep->rbuf, &ep->xg, &ep->eout, &ep->dout, &ep->dxg, &ep->hg, &ep->hu, &ep->scratch1, &ep->scratch2};
    size_t i;
    if (ep->L && ep->L->runner == &ep->runner) ep->L->runner = NULL;
    for (i = 0; i < sizeof ip / sizeof ip[0]; i++) { MOE_FREE(*ip[i]); *ip[i] = NULL; }
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) { MOE_FREE(*fp[i]); *fp[i] = NULL; }
    moe_work_free(&ep->work);
    ep->L = NULL;
}

/* the Alltoallv counts (in floats) of the rows this rank sends (send_rows by owner) and
   receives (recv_rows by source), and the owned experts' expert-major offsets */
static moe_status moe__ep_counts(moe_mpi_experts *ep, int d) {
    int P = ep->mpi->size, Ec = ep->e_count, q, j, s, acc = 0;
    long long rows = 0;
    ep->rows_out = ep->rows_in = 0;
    for (q = 0; q < P; q++) {
        int n = 0;
        for (j = 0; j < Ec; j++) n += ep->send_rows[q * Ec + j];
        ep->scount[q] = n * d;
        ep->sdispl[q] = acc * d;
        acc += n;
        if (q != ep->mpi->rank) ep->rows_out += n;
    }
    acc = 0;
    for (s = 0; s < P; s++) {
        int n = 0;
        for (j = 0; j < Ec; j++) n += ep->recv_rows[s * Ec + j];
        ep->rcount[s] = n * d;
        ep->rdispl[s] = acc * d;
        acc += n;
        if (s != ep->mpi->rank) ep->rows_in += n;
    }
    rows = acc;
    if (rows > ep->max_rows) /* cannot happen for a router that sends a token to an expert once */
        return moe_err_set(&ep->err, MOE_ERR_SHAPE, "expert parallelism: %lld rows arrived, the buffers hold %d", rows, ep->max_rows);
    ep->offset[0] = 0;
    for (j = 0; j < Ec; j++) {
        int n = 0;
        for (s = 0; s < P; s++) n += ep->recv_rows[s * Ec + j];
        ep->offset[j + 1] = ep->offset[j] + n;
    }
    return MOE_OK;
}

/* MPI delivers the rows source-major (source s, then owned expert j: each source's block in
   rank order); the experts read them expert-major (expert j, then source s). to_expert = 1
   copies source_major into expert_major, 0 the other way. */
static void moe__ep_permute(moe_mpi_experts *ep, float *expert_major, float *source_major, int d, int to_expert) {
    int P = ep->mpi->size, Ec = ep->e_count, s, j, s2;
    for (s = 0; s < P; s++) {
        int at_source = ep->rdispl[s] / d;
        for (j = 0; j < Ec; j++) {
            int n = ep->recv_rows[s * Ec + j], at_expert = ep->offset[j];
            for (s2 = 0; s2 < s; s2++) at_expert += ep->recv_rows[s2 * Ec + j];
            if (n > 0) {
                float *e = expert_major + (size_t)at_expert * d, *r = source_major + (size_t)at_source * d;
                size_t bytes = sizeof(float) * (size_t)n * d;
                if (to_expert) memcpy(e, r, bytes);
                else memcpy(r, e, bytes);
            }
            at_source += n;
        }
    }
}

static moe_expert_weights moe__ep_weights(moe_mpi_experts *ep, const moe_store *s, int grads) {
    const moe_layer_config *c = &ep->L->cfg;
    moe_expert_weights w = moe_layer_experts(ep->L, s, 0, grads);
    size_t e0 = (size_t)ep->e_first, d = (size_t)c->d, D = (size_t)c->d_ff;
    if (w.gate) w.gate += e0 * D * d;
    w.up += e0 * D * d;
    w.down += e0 * d * D;
    if (w.b_up) w.b_up += e0 * D;
    if (w.b_down) w.b_down += e0 * d;
    return w;
}

static moe_status moe__ep_forward(moe_layer *L, const moe_store *s, void *user) {
    moe_mpi_experts *ep = (moe_mpi_experts *)user;
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, e, rc;
    moe_expert_weights w = moe__ep_weights(ep, s, 0);
    moe_status st;
    for (e = 0; e < E; e++) ep->send_rows[e] = L->routed.offset[e + 1] - L->routed.offset[e];
    /* counts first: rank q learns how many rows of each of its experts every rank sends */
    rc = MPI_Alltoall(ep->send_rows, ep->e_count, MPI_INT, ep->recv_rows, ep->e_count, MPI_INT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    if ((st = moe__ep_counts(ep, c->d)) != MOE_OK) goto fail;
    /* then the rows: the list is sorted by expert and each rank owns a run of experts, so the
       rows for rank q are one contiguous block of L->xg */
    rc = MPI_Alltoallv(L->xg, ep->scount, ep->sdispl, MPI_FLOAT, ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    moe__ep_permute(ep, ep->xg, ep->rbuf, c->d, 1);
    st = moe_experts_forward(ep->eout, ep->hg, ep->hu, ep->xg, &w, ep->offset, ep->e_count, c->d, c->d_ff, c->expert, c->activation, &ep->work);
    if (st != MOE_OK) { moe_err_set(&ep->err, st, "expert parallelism: the experts' forward failed (%s)", moe_status_string(st)); goto fail; }
    moe__ep_permute(ep, ep->eout, ep->rbuf, c->d, 0);
    rc = MPI_Alltoallv(ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, L->eout, ep->scount, ep->sdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    ep->rows_sent += (long long)ep->rows_out + ep->rows_in; /* the rows there, the outputs back */
    ep->rows_received += (long long)ep->rows_in + ep->rows_out;
    return MOE_OK;
mpi_fail:
    st = moe__mpi_fail(&ep->err, rc, "expert parallelism's all-to-all (forward)");
fail:
    L->err = ep->err;
    return st;
}

static moe_status moe__ep_backward(moe_layer *L, moe_store *s, void *user) {
    moe_mpi_experts *ep = (moe_mpi_experts *)user;
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe__ep_weights(ep, s, 0), gw = moe__ep_weights(ep, s, 1);
    moe_status st;
    int rc;
    /* the forward's counts still hold: the output gradients go where the rows went */
    rc = MPI_Alltoallv(L->deout, ep->scount, ep->sdispl, MPI_FLOAT, ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    moe__ep_permute(ep, ep->dout, ep->rbuf, c->d, 1);
    st = moe_experts_backward(ep->dxg, &gw, ep->dout, ep->xg, ep->hg, ep->hu, &w, ep->offset, ep->e_count, c->d, c->d_ff,
                              c->expert, c->activation, ep->scratch1, ep->scratch2, &ep->work);
    if (st != MOE_OK) { moe_err_set(&ep->err, st, "expert parallelism: the experts' backward failed (%s)", moe_status_string(st)); goto fail; }
    moe__ep_permute(ep, ep->dxg, ep->rbuf, c->d, 0);
    rc = MPI_Alltoallv(ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, L->dxg, ep->scount, ep->sdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    ep->rows_sent += (long long)ep->rows_out + ep->rows_in; /* the forward's rows again */
    ep->rows_received += (long long)ep->rows_in + ep->rows_out;
    return MOE_OK;
mpi_fail:
    st = moe__mpi_fail(&ep->err, rc, "expert parallelism's all-to-all (backward)");
fail:
    L->err = ep->err;
    return st;
}

MOE__IMPL moe_status moe_mpi_experts_init(moe_mpi_experts *ep, moe_mpi *ctx, moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    int P = ctx->size, E = c->n_experts, d = c->d, D = c->d_ff, shape[6], ok, per_src;
    size_t rows;
    memset(ep, 0, sizeof *ep);
    ep->mpi = ctx;
    /* every rank's layer must have the same experts before anything is split (an
       uninitialised layer takes part with shape -1, so no rank waits alone) */
    shape[0] = E; shape[1] = d; shape[2] = D; shape[3] = (int)c->expert; shape[4] = (int)c->router; shape[5] = L->max_tokens;
    if (!L->logits) shape[0] = shape[1] = shape[2] = shape[3] = shape[4] = shape[5] = -1;
    if (moe_mpi_check_same(ctx, shape, sizeof shape, "MoE layer (experts, d, d_ff, expert kind, router, max tokens)") != MOE_OK) {
        ep->err = ctx->err;
        return ep->err.status;
    }
    if (!L->logits) return moe_err_set(&ep->err, MOE_ERR_STATE, "expert parallelism needs an initialised layer");
    if (E % P != 0)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: %d ranks do not divide the %d experts of a layer (run on a divisor of %d ranks)", P, E, E);
    if (c->router == MOE_ROUTER_AOE)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: AoE's experts read the router's low-rank caches on the token's rank; use another router or data parallelism");
    ep->L = L;
    ep->e_count = E / P;
    ep->e_first = ctx->rank * ep->e_count;
    /* a source sends at most its list's rows, and at most max_tokens per expert */
    per_src = L->cap < L->max_tokens * ep->e_count ? L->cap : L->max_tokens * ep->e_count;
    rows = (size_t)per_src * (size_t)P;
    if (rows * (size_t)(d > D ? d : D) > (size_t)INT_MAX)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: %zu rows of %d floats exceed MPI's int counts", rows, d > D ? d : D);
    ep->max_rows = (int)rows;
    ok = MOE__ALLOC(ep->send_rows, E, int) && MOE__ALLOC(ep->recv_rows, (size_t)P * ep->e_count, int) &&
         MOE__ALLOC(ep->scount, P, int) && MOE__ALLOC(ep->sdispl, P, int) && MOE__ALLOC(ep->rcount, P, int) &&
         MOE__ALLOC(ep->rdispl, P, int) && MOE__ALLOC(ep->offset, ep->e_count + 1, int) &&
         MOE__ALLOC(ep->rbuf, rows * d + 1, float) && MOE__ALLOC(ep->xg, rows * d + 1, float) &&
         MOE__ALLOC(ep->eout, rows * d + 1, float) && MOE__ALLOC(ep->dout, rows * d + 1, float) &&
         MOE__ALLOC(ep->dxg, rows * d + 1, float) && MOE__ALLOC(ep->hg, rows * D + 1, float) &&
         MOE__ALLOC(ep->hu, rows * D + 1, float) && MOE__ALLOC(ep->scratch1, rows * D + 1, float) &&
         MOE__ALLOC(ep->scratch2, rows * D + 1, float) &&
         moe_work_alloc(&ep->work, moe_experts_work_floats(L->max_tokens * P, ep->e_count, d, D, c->expert, moe_num_threads()),
                        moe_num_threads()) == MOE_OK;
    /* the allocation's outcome must be the same everywhere, or one rank would wait alone */
    {
        int mine = ok ? 1 : 0, all = 0, rc = MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, ctx->comm);
        if (rc != MPI_SUCCESS) { moe_mpi_experts_free(ep); return moe__mpi_fail(&ep->err, rc, "MPI_Allreduce (allocation outcome)"); }
        if (!all) {
            moe_mpi_experts_free(ep);
            return moe_err_set(&ep->err, MOE_ERR_NOMEM, mine ? "expert parallelism: another rank ran out of memory for its buffers"
                                                             : "expert parallelism: out of memory for %zu rows of received tokens", rows);
        }
    }
    ep->runner.forward = moe__ep_forward;
    ep->runner.backward = moe__ep_backward;
    ep->runner.user = ep;
    L->runner = &ep->runner;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_experts_model_init(moe_mpi_experts *eps, moe_mpi *ctx, moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) memset(&eps[l], 0, sizeof eps[l]);
    for (l = 0; l < m->cfg.n_layers; l++) {
        if (!m->blocks[l].is_moe) continue;
        if (moe_mpi_experts_init(&eps[l], ctx, &m->blocks[l].moe) != MOE_OK) {
            moe_status st = eps[l].err.status;
            m->err = eps[l].err;
            moe_mpi_experts_model_free(eps, m);
            return st;
        }
    }
    return MOE_OK;
}

MOE__IMPL void moe_mpi_experts_model_free(moe_mpi_experts *eps, moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) moe_mpi_experts_free(&eps[l]);
}

#endif /* MOE_MPI */
/* ============================================================================================
   >>moe:cuda_core
   ============================================================================================
   Each kernel's per-thread work is a plain function (a "body") that takes its block and
   thread index; the __global__ kernel only passes blockIdx.x, threadIdx.x and blockDim.x.
   Without nvcc the bodies are ordinary static functions, so tests/test_cuda_bodies.c runs
   them over the same grid on the CPU (MOE_CUDA_BODIES) and compares them with the CPU path.
   The reference kernels use no shared memory and no warp intrinsics for that reason. */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

#if defined(MOE_CUDA) && !defined(__CUDACC__)
#error "moe.h: MOE_CUDA with MOE_IMPLEMENTATION needs nvcc (a .cu translation unit)"
#endif

#ifdef __CUDACC__
#define MOE__HD __host__ __device__
#else
#define MOE__HD
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MOE__BODY static MOE__HD __attribute__((unused))
#else
#define MOE__BODY static MOE__HD
#endif

#define MOE__CUDA_BLOCK 256 /* threads per block of the elementwise and per-row kernels */
#define MOE__CLIP_CHUNK (1 << 14) /* the CPU clipping's chunk */

MOE__BODY int moe__cuda_blocks(long long n, int block) { return (int)((n + block - 1) / block); }
MOE__BODY long long moe__cuda_index(int bx, int tx, int bdx) { return (long long)bx * bdx + tx; }

/* AdamW, one element; moe__adamw_span's scalar loop */
MOE__BODY void moe__cuda_adamw_body(int bx, int tx, int bdx, float *p, const float *g, float *m, float *v,
                                    long long n, moe__adamw_consts k) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float gi, denom;
    if (i >= n) return;
    gi = g[i];
    p[i] *= k.decay;
    m[i] += (gi - m[i]) * k.one_m_b1;
    v[i] = v[i] * k.b2 + k.one_m_b2 * gi * gi;
    denom = sqrtf(v[i]) / k.bc2_sqrt + k.eps;
    p[i] -= k.step_size * (m[i] / denom);
}

/* clipping: chunk c's sum of squares in double, in index order */
MOE__BODY void moe__cuda_clip_part_body(int bx, int tx, int bdx, double *part, const float *g, long long numel) {
    long long c = moe__cuda_index(bx, tx, bdx), i, lo, hi, nchunk = (numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    double acc = 0.0;
    if (c >= nchunk) return;
    lo = c * MOE__CLIP_CHUNK;
    hi = lo + MOE__CLIP_CHUNK < numel ? lo + MOE__CLIP_CHUNK : numel;
    for (i = lo; i < hi; i++) acc += (double)g[i] * g[i];
    part[c] = acc;
}

/* one thread: the chunks' sums in order; out[0] = the norm (as the CPU's float, in double) */
MOE__BODY void moe__cuda_clip_total_body(int bx, int tx, int bdx, double *out, const double *part, long long nchunk) {
    long long c;
    double total = 0.0;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    for (c = 0; c < nchunk; c++) total += part[c];
    out[0] = (double)(float)sqrt(total);
}

MOE__BODY void moe__cuda_clip_scale_body(int bx, int tx, int bdx, float *g, long long numel, const double *norm_d,
                                         float max_norm) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float norm = (float)norm_d[0];
    if (i >= numel || !(max_norm > 0.0f && norm > max_norm)) return;
    g[i] *= max_norm / (norm + 1e-6f);
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA
#include <cublas_v2.h>

/* the runtime's sentence for a failed call; returns MOE_ERR_NO_DEVICE for the errors that
   mean "no usable device here" and MOE_ERR_STATE for the rest */
static moe_status moe__cuda_fail(moe_cuda *c, cudaError_t e, const char *what) {
    moe_status s = (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
                    e == cudaErrorInitializationError || e == cudaErrorSystemDriverMismatch ||
                    e == cudaErrorCompatNotSupportedOnDevice || e == cudaErrorDevicesUnavailable)
                       ? MOE_ERR_NO_DEVICE
                       : (e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_STATE);
    return moe_err_set(c ? &c->err : NULL, s, "CUDA: %s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}
#define MOE__CUDA_TRY(c, call, what)                               \
    do {                                                           \
        cudaError_t moe__e = (call);                               \
        if (moe__e != cudaSuccess) return moe__cuda_fail(c, moe__e, what); \
    } while (0)
/* after a launch: a bad configuration shows at once, a fault at the next sync */
#define MOE__CUDA_LAUNCHED(c, what) MOE__CUDA_TRY(c, cudaGetLastError(), what)

static moe_status moe__cublas_check(moe_cuda *c, cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return MOE_OK;
    return moe_err_set(&c->err, s == CUBLAS_STATUS_ALLOC_FAILED ? MOE_ERR_NOMEM : MOE_ERR_STATE,
                       "cuBLAS: %s failed with status %d", what, (int)s);
}

MOE__IMPL moe_status moe_cuda_init(moe_cuda *c, int device, moe_cuda_mode mode) {
    int count = 0;
    cudaError_t e;
    cublasHandle_t h;
    cublasStatus_t bs;
    memset(c, 0, sizeof *c);
    c->device = device;
    c->mode = mode;
    e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) return moe__cuda_fail(c, e, "cudaGetDeviceCount");
    if (count <= 0) return moe_err_set(&c->err, MOE_ERR_NO_DEVICE, "CUDA: no CUDA device found");
    if (device < 0 || device >= count)
        return moe_err_set(&c->err, MOE_ERR_NO_DEVICE, "CUDA: device %d asked for, %d present", device, count);
    MOE__CUDA_TRY(c, cudaSetDevice(device), "cudaSetDevice");
    MOE__CUDA_TRY(c, cudaMalloc((void **)&c->scalars, 8 * sizeof(double)), "cudaMalloc");
    bs = cublasCreate(&h);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        cudaFree(c->scalars);
        c->scalars = NULL;
        return moe__cublas_check(c, bs, "cublasCreate");
    }
    c->cublas = (void *)h;
    /* float32 arithmetic (no TF32 tensor cores): comparable with the CPU path */
    bs = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    if (bs == CUBLAS_STATUS_SUCCESS)
        bs = cublasSetAtomicsMode(h, mode == MOE_CUDA_FAST ? CUBLAS_ATOMICS_ALLOWED : CUBLAS_ATOMICS_NOT_ALLOWED);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        moe_status s = moe__cublas_check(c, bs, "cublasSetMathMode/AtomicsMode");
        moe_cuda_free(c);
        return s;
    }
    return MOE_OK;
}

MOE__IMPL void moe_cuda_free(moe_cuda *c) {
    if (c->cublas) cublasDestroy((cublasHandle_t)c->cublas);
    if (c->scalars) cudaFree(c->scalars);
    c->cublas = NULL;
    c->scalars = NULL;
}

MOE__IMPL moe_status moe_cuda_sync(moe_cuda *c) {
    MOE__CUDA_TRY(c, cudaDeviceSynchronize(), "a kernel (seen at cudaDeviceSynchronize)");
    return MOE_OK;
}

MOE__IMPL moe_status moe_cuda_malloc(moe_cuda *c, void **dev, size_t bytes) {
    *dev = NULL;
    if (bytes == 0) return MOE_OK;
    MOE__CUDA_TRY(c, cudaMalloc(dev, bytes), "cudaMalloc");
    MOE__CUDA_TRY(c, cudaMemset(*dev, 0, bytes), "cudaMemset");
    return MOE_OK;
}

MOE__IMPL void moe_cuda_mfree(void *dev) {
    if (dev) cudaFree(dev);
}

MOE__IMPL moe_status moe_cuda_upload(moe_cuda *c, void *dev, const void *host, size_t bytes) {
    if (bytes) MOE__CUDA_TRY(c, cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
    return MOE_OK;
}

MOE__IMPL moe_status moe_cuda_download(moe_cuda *c, void *host, const void *dev, size_t bytes) {
    if (bytes) MOE__CUDA_TRY(c, cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_alloc_cuda(moe_store_cuda *d, moe_cuda *c, const moe_store *host) {
    size_t bytes = sizeof(float) * host->numel, nchunk = (host->numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    moe_status s;
    memset(d, 0, sizeof *d);
    if (!host->allocated) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_store_alloc_cuda: the host store is not allocated");
    d->host = host;
    d->numel = host->numel;
    if ((s = moe_cuda_malloc(c, (void **)&d->params, bytes)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&d->grads, bytes)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&d->clip_part, sizeof(double) * (nchunk ? nchunk : 1))) != MOE_OK)
        goto fail;
    if (host->adam_m && host->adam_v)
        if ((s = moe_cuda_malloc(c, (void **)&d->adam_m, bytes)) != MOE_OK ||
            (s = moe_cuda_malloc(c, (void **)&d->adam_v, bytes)) != MOE_OK)
            goto fail;
    if ((s = moe_store_upload_cuda(c, d, host)) != MOE_OK) goto fail;
    return MOE_OK;
fail:
    moe_store_free_cuda(d);
    return s;
}

MOE__IMPL void moe_store_free_cuda(moe_store_cuda *d) {
    moe_cuda_mfree(d->params);
    moe_cuda_mfree(d->grads);
    moe_cuda_mfree(d->adam_m);
    moe_cuda_mfree(d->adam_v);
    moe_cuda_mfree(d->clip_part);
    memset(d, 0, sizeof *d);
}

MOE__IMPL moe_status moe_store_upload_cuda(moe_cuda *c, moe_store_cuda *d, const moe_store *host) {
    size_t bytes = sizeof(float) * d->numel;
    moe_status s;
    if (host->numel != d->numel || moe_store_fingerprint(host) != moe_store_fingerprint(d->host))
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "moe_store_upload_cuda: the host store's layout differs from the device copy's");
    if ((s = moe_cuda_upload(c, d->params, host->params, bytes)) != MOE_OK) return s;
    if (d->adam_m && host->adam_m && (s = moe_cuda_upload(c, d->adam_m, host->adam_m, bytes)) != MOE_OK) return s;
    if (d->adam_v && host->adam_v && (s = moe_cuda_upload(c, d->adam_v, host->adam_v, bytes)) != MOE_OK) return s;
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_download_cuda(moe_cuda *c, const moe_store_cuda *d, moe_store *host) {
    size_t bytes = sizeof(float) * d->numel;
    moe_status s;
    if (host->numel != d->numel || moe_store_fingerprint(host) != moe_store_fingerprint(d->host))
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "moe_store_download_cuda: the host store's layout differs from the device copy's");
    if ((s = moe_cuda_download(c, host->params, d->params, bytes)) != MOE_OK) return s;
    if ((s = moe_cuda_download(c, host->grads, d->grads, bytes)) != MOE_OK) return s;
    if (d->adam_m && host->adam_m && (s = moe_cuda_download(c, host->adam_m, d->adam_m, bytes)) != MOE_OK) return s;
    if (d->adam_v && host->adam_v && (s = moe_cuda_download(c, host->adam_v, d->adam_v, bytes)) != MOE_OK) return s;
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_zero_grad_cuda(moe_cuda *c, moe_store_cuda *d) {
    if (d->numel) MOE__CUDA_TRY(c, cudaMemset(d->grads, 0, sizeof(float) * d->numel), "cudaMemset");
    return MOE_OK;
}

__global__ void moe__k_adamw(float *p, const float *g, float *m, float *v, long long n, moe__adamw_consts k) {
    moe__cuda_adamw_body(blockIdx.x, threadIdx.x, blockDim.x, p, g, m, v, n, k);
}
__global__ void moe__k_clip_part(double *part, const float *g, long long numel) {
    moe__cuda_clip_part_body(blockIdx.x, threadIdx.x, blockDim.x, part, g, numel);
}
__global__ void moe__k_clip_total(double *out, const double *part, long long nchunk) {
    moe__cuda_clip_total_body(blockIdx.x, threadIdx.x, blockDim.x, out, part, nchunk);
}
__global__ void moe__k_clip_scale(float *g, long long numel, const double *norm, float max_norm) {
    moe__cuda_clip_scale_body(blockIdx.x, threadIdx.x, blockDim.x, g, numel, norm, max_norm);
}

MOE__IMPL moe_status moe_adamw_step_cuda(moe_cuda *c, moe_store_cuda *d, const moe_adamw_config *cfg, float lr,
                                         long long step) {
    moe__adamw_consts k;
    int ti;
    if (!d->adam_m || !d->adam_v) return moe_err_set(&c->err, MOE_ERR_STATE, "AdamW step on a device store without optimizer moments");
    if (step < 1) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "AdamW step counts from 1, got %lld", step);
    k = moe__adamw_consts_for(cfg, lr, step);
    for (ti = 0; ti < d->host->count; ti++) {
        const moe_tensor *t = &d->host->tensors[ti];
        moe__adamw_consts kt = k;
        long long n = (long long)t->numel;
        if (n == 0) continue;
        kt.decay = (t->flags & MOE_TENSOR_DECAY) ? 1.0f - lr * cfg->weight_decay : 1.0f;
        moe__k_adamw<<<moe__cuda_blocks(n, MOE__CUDA_BLOCK), MOE__CUDA_BLOCK>>>(
            d->params + t->offset, d->grads + t->offset, d->adam_m + t->offset, d->adam_v + t->offset, n, kt);
        MOE__CUDA_LAUNCHED(c, "the AdamW kernel");
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_clip_grad_norm_cuda(moe_cuda *c, moe_store_cuda *d, float max_norm, float *norm) {
    long long numel = (long long)d->numel, nchunk = (numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    double host_norm = 0.0;
    if (nchunk > 0) {
        moe__k_clip_part<<<moe__cuda_blocks(nchunk, 64), 64>>>(d->clip_part, d->grads, numel);
        MOE__CUDA_LAUNCHED(c, "the clipping's sum kernel");
    }
    moe__k_clip_total<<<1, 1>>>(c->scalars, d->clip_part, nchunk);
    MOE__CUDA_LAUNCHED(c, "the clipping's total kernel");
    if (max_norm > 0.0f && numel > 0) {
        moe__k_clip_scale<<<moe__cuda_blocks(numel, MOE__CUDA_BLOCK), MOE__CUDA_BLOCK>>>(d->grads, numel, c->scalars, max_norm);
        MOE__CUDA_LAUNCHED(c, "the clipping's scale kernel");
    }
    if (norm) {
        moe_status s = moe_cuda_download(c, &host_norm, c->scalars, sizeof host_norm);
        if (s != MOE_OK) return s;
        *norm = (float)host_norm;
    }
    return MOE_OK;
}

#endif /* MOE_CUDA */
/* ============================================================================================
   >>moe:cuda_kernels
   ============================================================================================ */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

/* ---- matmul: the bias and its gradient (the products are cuBLAS's) ---- */

/* out (M, N): row r = bias (the GEMM then adds the product) */
MOE__BODY void moe__cuda_bias_fill_body(int bx, int tx, int bdx, float *out, const float *bias, long long M, int N) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i >= M * N) return;
    out[i] = bias ? bias[i % N] : 0.0f;
}

/* dbias[j] += sum over rows in order of dout[r][j] (moe_matmul_backward_naive's order) */
MOE__BODY void moe__cuda_bias_grad_body(int bx, int tx, int bdx, float *dbias, const float *dout, int M, int N) {
    long long j = moe__cuda_index(bx, tx, bdx);
    float acc = 0.0f;
    int r;
    if (j >= N) return;
    for (r = 0; r < M; r++) acc += dout[(size_t)r * N + j];
    dbias[j] += acc;
}

/* ---- kernels ---- */

MOE__BODY void moe__cuda_softmax_forward_body(int bx, int tx, int bdx, float *out, const float *inp, int rows, int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x;
    float *y, mx = -FLT_MAX, sum = 0.0f, inv;
    int i;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    y = out + (size_t)r * n;
    for (i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (i = 0; i < n; i++) { y[i] = expf(x[i] - mx); sum += y[i]; }
    inv = 1.0f / sum;
    for (i = 0; i < n; i++) y[i] *= inv;
}

MOE__BODY void moe__cuda_softmax_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                               const float *out, int rows, int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *dy, *y;
    float *dx, dot = 0.0f;
    int i;
    if (r >= rows) return;
    dy = dout + (size_t)r * n;
    y = out + (size_t)r * n;
    dx = dinp + (size_t)r * n;
    for (i = 0; i < n; i++) dot += dy[i] * y[i];
    for (i = 0; i < n; i++) dx[i] += y[i] * (dy[i] - dot);
}

/* moe__sigmoid, moe__act and moe__act_grad, callable on the device */
MOE__BODY float moe__cuda_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

MOE__BODY float moe__cuda_act(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: return x * moe__cuda_sigmoid(x);
    case MOE_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    case MOE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

MOE__BODY float moe__cuda_act_grad(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: {
        float s = moe__cuda_sigmoid(x);
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

MOE__BODY void moe__cuda_activation_forward_body(int bx, int tx, int bdx, float *out, const float *inp, long long n,
                                                 moe_activation act) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = moe__cuda_act(inp[i], act);
}

MOE__BODY void moe__cuda_activation_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                                  const float *inp, long long n, moe_activation act) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) dinp[i] += dout[i] * moe__cuda_act_grad(inp[i], act);
}

MOE__BODY void moe__cuda_swiglu_forward_body(int bx, int tx, int bdx, float *out, const float *gate, const float *up,
                                             long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = gate[i] * moe__cuda_sigmoid(gate[i]) * up[i];
}

MOE__BODY void moe__cuda_swiglu_backward_body(int bx, int tx, int bdx, float *dgate, float *dup, const float *dout,
                                              const float *gate, const float *up, long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float s, silu;
    if (i >= n) return;
    s = moe__cuda_sigmoid(gate[i]);
    silu = gate[i] * s;
    dgate[i] += dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
    dup[i] += dout[i] * silu;
}

MOE__BODY void moe__cuda_rmsnorm_forward_body(int bx, int tx, int bdx, float *out, float *rstd, const float *inp,
                                              const float *weight, int rows, int n, float eps) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x;
    float *y, ss = 0.0f, rs;
    int i;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    y = out + (size_t)r * n;
    for (i = 0; i < n; i++) ss += x[i] * x[i];
    rs = 1.0f / sqrtf(ss / (float)n + eps);
    rstd[r] = rs;
    for (i = 0; i < n; i++) y[i] = x[i] * rs * weight[i];
}

/* dx of one row */
MOE__BODY void moe__cuda_rmsnorm_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                               const float *inp, const float *weight, const float *rstd, int rows,
                                               int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x, *dy;
    float *dx, rs, dot = 0.0f;
    int j;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    dy = dout + (size_t)r * n;
    dx = dinp + (size_t)r * n;
    rs = rstd[r];
    for (j = 0; j < n; j++) dot += weight[j] * dy[j] * x[j];
    dot /= (float)n;
    for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - x[j] * rs * rs * dot);
}

/* dweight of one column, rows in order (deterministic mode) */
MOE__BODY void moe__cuda_rmsnorm_dweight_body(int bx, int tx, int bdx, float *dweight, const float *dout,
                                              const float *inp, const float *rstd, int rows, int n) {
    long long j = moe__cuda_index(bx, tx, bdx);
    float acc = 0.0f;
    int r;
    if (j >= n) return;
    for (r = 0; r < rows; r++) acc += dout[(size_t)r * n + j] * inp[(size_t)r * n + j] * rstd[r];
    dweight[j] += acc;
}

/* moe__expf_poly, callable on the device */
MOE__BODY float moe__cuda_expf_poly(float z) {
    float zc = z > -87.0f ? (z < 87.0f ? z : 87.0f) : -87.0f;
    float k = (zc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (zc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return z == z ? p * scale : z;
}

/* moe__max_lanes and moe__sum_exp_lanes: the same 16 lanes in the same order */
MOE__BODY float moe__cuda_max_lanes(const float *x, int n) {
    float m[16], mx;
    int u, j, n16 = n / 16 * 16;
    for (j = 0; j < 16; j++) m[j] = -FLT_MAX;
    for (u = 0; u < n16; u += 16)
        for (j = 0; j < 16; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    for (j = 0; u + j < n; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    mx = m[0];
    for (j = 1; j < 16; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

MOE__BODY float moe__cuda_sum_exp_lanes(const float *x, int n, float mx) {
    float acc[16], sum = 0.0f;
    int u, j, n16 = n / 16 * 16;
    for (j = 0; j < 16; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += 16)
        for (j = 0; j < 16; j++) acc[j] += moe__cuda_expf_poly(x[u + j] - mx);
    for (j = 0; u + j < n; j++) acc[j] += moe__cuda_expf_poly(x[u + j] - mx);
    for (j = 0; j < 16; j++) sum += acc[j];
    return sum;
}

MOE__BODY void moe__cuda_crossentropy_forward_body(int bx, int tx, int bdx, float *losses, const float *logits,
                                                   const int *targets, int rows, int V) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *z;
    float mx;
    int t;
    if (r >= rows) return;
    z = logits + (size_t)r * V;
    t = targets[r];
    if (t < 0 || t >= V) { losses[r] = 0.0f; return; }
    mx = moe__cuda_max_lanes(z, V);
    losses[r] = (float)(log((double)moe__cuda_sum_exp_lanes(z, V, mx)) + mx - z[t]);
}

/* one thread: the mean over counted rows, in row order (the CPU's double sum) */
MOE__BODY void moe__cuda_crossentropy_mean_body(int bx, int tx, int bdx, double *mean, const float *losses,
                                                const int *targets, int rows, int V) {
    double total = 0.0;
    int r, count = 0;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    for (r = 0; r < rows; r++)
        if (targets[r] >= 0 && targets[r] < V) { total += losses[r]; count++; }
    mean[0] = count ? total / count : 0.0;
}

MOE__BODY void moe__cuda_crossentropy_backward_body(int bx, int tx, int bdx, float *dlogits, const float *logits,
                                                    const int *targets, int rows, int V, float dloss) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *z;
    float *dz, mx, inv;
    int t, i;
    if (r >= rows) return;
    z = logits + (size_t)r * V;
    dz = dlogits + (size_t)r * V;
    t = targets[r];
    if (t < 0 || t >= V) return;
    mx = moe__cuda_max_lanes(z, V);
    inv = 1.0f / moe__cuda_sum_exp_lanes(z, V, mx);
    for (i = 0; i < V; i++) dz[i] += dloss * (moe__cuda_expf_poly(z[i] - mx) * inv - (i == t ? 1.0f : 0.0f));
}

/* ---- attention: moe_attention_forward_naive / backward_naive, one (b, h, t) per thread ---- */

MOE__BODY void moe__cuda_attention_forward_body(int bx, int tx, int bdx, float *out, float *att, const float *qkv,
                                                int B, int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    const float *q;
    float *P, *o;
    double maxv = -HUGE_VAL, sum = 0.0;
    if (id >= (long long)B * NH * T) return;
    t = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    q = qkv + ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
    P = att + (((size_t)b * NH + h) * T + t) * T;
    o = out + ((size_t)b * T + t) * d + (size_t)h * hd;
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
    for (i = 0; i < hd; i++) {
        double s = 0.0;
        for (u = 0; u <= t; u++) s += (double)P[u] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
        o[i] = (float)s;
    }
}

/* query row (b, h, t): dot[row] = sum_u P[u] dP[u], and dq[t] = sum_u dS[u] k[u] summed in u
   order as the naive loop does (dq[t] is owned by this row alone) */
MOE__BODY void moe__cuda_attention_backward_q_body(int bx, int tx, int bdx, float *dqkv, double *dot_out,
                                                   const float *dout, const float *qkv, const float *att, int B,
                                                   int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    size_t qt;
    const float *P, *dy;
    double dot = 0.0;
    if (id >= (long long)B * NH * T) return;
    t = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    qt = ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
    P = att + (((size_t)b * NH + h) * T + t) * T;
    dy = dout + ((size_t)b * T + t) * d + (size_t)h * hd;
    for (u = 0; u <= t; u++) {
        double dp = 0.0;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
        dot += P[u] * dp;
    }
    dot_out[id] = dot;
    for (i = 0; i < hd; i++) dqkv[qt + i] = 0.0f;
    for (u = 0; u <= t; u++) {
        size_t ku = ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd, vu = ku + d;
        double dp = 0.0, ds;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[vu + i];
        ds = P[u] * (dp - dot) * scale;
        for (i = 0; i < hd; i++) dqkv[qt + i] += (float)(ds * qkv[ku + i]);
    }
}

/* key row (b, h, u): dk[u] = sum over t >= u of dS[t][u] q[t], dv[u] = sum of P[t][u] dy[t],
   in t order as the naive loop adds them */
MOE__BODY void moe__cuda_attention_backward_kv_body(int bx, int tx, int bdx, float *dqkv, const double *dot_in,
                                                    const float *dout, const float *qkv, const float *att, int B,
                                                    int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    size_t ku, vu;
    if (id >= (long long)B * NH * T) return;
    u = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    ku = ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd;
    vu = ku + d;
    for (i = 0; i < hd; i++) dqkv[ku + i] = dqkv[vu + i] = 0.0f;
    for (t = u; t < T; t++) {
        size_t qt = ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
        const float *dy = dout + ((size_t)b * T + t) * d + (size_t)h * hd;
        float Pu = att[(((size_t)b * NH + h) * T + t) * T + u];
        double dp = 0.0, ds;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[vu + i];
        ds = Pu * (dp - dot_in[((size_t)b * NH + h) * T + t]) * scale;
        for (i = 0; i < hd; i++) {
            dqkv[ku + i] += (float)(ds * qkv[qt + i]);
            dqkv[vu + i] += Pu * dy[i];
        }
    }
}

/* one (row, head, q or k) per thread */
MOE__BODY void moe__cuda_rope_body(int bx, int tx, int bdx, float *qkv, const float *cos_sin, int B, int T, int d,
                                   int NH, int inverse) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, half = hd / 2, row, part, h, t, i;
    const float *cs;
    float *x;
    if (id >= (long long)B * T * 2 * NH) return;
    h = (int)(id % NH);
    part = (int)(id / NH % 2);
    row = (int)(id / NH / 2);
    t = row % T;
    cs = cos_sin + (size_t)t * half * 2;
    x = qkv + (size_t)row * 3 * d + (size_t)part * d + (size_t)h * hd;
    for (i = 0; i < half; i++) {
        float c = cs[2 * i], s = inverse ? -cs[2 * i + 1] : cs[2 * i + 1];
        float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/* ---- dispatch: the stable counting sort as per-expert and per-token threads ---- */

/* expert e: its count (offset[e + 1]; the scan makes offsets of the counts) */
MOE__BODY void moe__cuda_dispatch_count_body(int bx, int tx, int bdx, int *offset, const int *token, const int *expert,
                                             int n, int T, int E) {
    long long e = moe__cuda_index(bx, tx, bdx);
    int i, count = 0;
    if (e > E) return;
    if (e == E) { offset[0] = 0; return; }
    for (i = 0; i < n; i++) count += expert[i] == e && token[i] >= 0 && token[i] < T;
    offset[e + 1] = count;
}

/* one thread: counts (v[1..m]) to offsets (v[0] = 0) */
MOE__BODY void moe__cuda_scan_body(int bx, int tx, int bdx, int *v, int m) {
    int i;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    v[0] = 0;
    for (i = 0; i < m; i++) v[i + 1] += v[i];
}

/* expert e: its assignments in input order (stable) */
MOE__BODY void moe__cuda_dispatch_place_body(int bx, int tx, int bdx, int *a_token, int *a_expert, int *a_slot,
                                             float *a_weight, const int *offset, const int *token, const int *expert,
                                             const int *slot, const float *weight, int n, int T, int E) {
    long long e = moe__cuda_index(bx, tx, bdx);
    int i, pos;
    if (e >= E) return;
    pos = offset[e];
    for (i = 0; i < n; i++)
        if (expert[i] == e && token[i] >= 0 && token[i] < T) {
            a_token[pos] = token[i];
            a_expert[pos] = (int)e;
            a_slot[pos] = slot[i];
            a_weight[pos] = weight[i];
            pos++;
        }
}

/* token t: how many assignments it has (tok_offset[t + 1]) */
MOE__BODY void moe__cuda_dispatch_token_count_body(int bx, int tx, int bdx, int *tok_offset, const int *a_token,
                                                   int n, int T) {
    long long t = moe__cuda_index(bx, tx, bdx);
    int i, count = 0;
    if (t > T) return;
    if (t == T) { tok_offset[0] = 0; return; }
    for (i = 0; i < n; i++) count += a_token[i] == t;
    tok_offset[t + 1] = count;
}

/* token t: its positions in the grouped list, then sorted by slot (insertion sort, as the CPU) */
MOE__BODY void moe__cuda_dispatch_token_fill_body(int bx, int tx, int bdx, int *tok_index, const int *tok_offset,
                                                  const int *a_token, const int *a_slot, int n, int T) {
    long long t = moe__cuda_index(bx, tx, bdx);
    int i, j, lo, hi, fill;
    if (t >= T) return;
    lo = tok_offset[t];
    hi = tok_offset[t + 1];
    fill = lo;
    for (i = 0; i < n && fill < hi; i++)
        if (a_token[i] == t) tok_index[fill++] = i;
    for (i = lo + 1; i < hi; i++) {
        int v = tok_index[i];
        for (j = i - 1; j >= lo && a_slot[tok_index[j]] > a_slot[v]; j--) tok_index[j + 1] = tok_index[j];
        tok_index[j + 1] = v;
    }
}

/* xg element (i, j) = x[token[i]][j] */
MOE__BODY void moe__cuda_gather_body(int bx, int tx, int bdx, float *xg, const float *x, const int *a_token, int n, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    if (id >= (long long)n * d) return;
    xg[id] = x[(size_t)a_token[id / d] * d + id % d];
}

/* dx element (t, j) += the token's dxg rows in slot order (deterministic) */
MOE__BODY void moe__cuda_gather_backward_body(int bx, int tx, int bdx, float *dx, const float *dxg,
                                              const int *tok_offset, const int *tok_index, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, k;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = dx[id];
    for (k = tok_offset[t]; k < tok_offset[t + 1]; k++) o += dxg[(size_t)tok_index[k] * d + j];
    dx[id] = o;
}

/* y element (t, j) (+)= the token's weighted expert outputs in slot order (deterministic) */
MOE__BODY void moe__cuda_combine_forward_body(int bx, int tx, int bdx, float *y, const float *eout, const float *a_weight,
                                              const int *tok_offset, const int *tok_index, int T, int d,
                                              int accumulate) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, k;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = accumulate ? y[id] : 0.0f;
    for (k = tok_offset[t]; k < tok_offset[t + 1]; k++) {
        int pos = tok_index[k];
        o += a_weight[pos] * eout[(size_t)pos * d + j];
    }
    y[id] = o;
}

/* assignment i: deout row and the weight's gradient */
MOE__BODY void moe__cuda_combine_backward_body(int bx, int tx, int bdx, float *deout, float *dweight, const float *dy,
                                               const float *eout, const int *a_token, const float *a_weight, int n,
                                               int d) {
    long long i = moe__cuda_index(bx, tx, bdx);
    const float *g, *e;
    float *o, w, acc[MOE__LANES];
    int j, u, h;
    if (i >= n) return;
    g = dy + (size_t)a_token[i] * d;
    e = eout + (size_t)i * d;
    o = deout + (size_t)i * d;
    w = a_weight[i];
    for (j = 0; j < d; j++) o[j] = w * g[j];
    /* moe__dot_lanes's lanes and order, so the CPU's bits; constant lane indices once the
       inner loops unroll, so acc stays in registers */
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u + MOE__LANES <= d; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += g[u + j] * e[u + j];
    for (j = 0; u + j < d; j++) acc[j] += g[u + j] * e[u + j];
    for (h = MOE__LANES / 2; h >= 1; h /= 2)
        for (j = 0; j < h; j++) acc[j] += acc[j + h];
    if (dweight) dweight[i] = acc[0];
}

/* ---- routing: softmax top-k ---- */

/* moe__ranks_above: a ranks above b (NaN lowest, ties to the lower index) */
MOE__BODY int moe__cuda_ranks_above(float a, int ia, float b, int ib) {
    if (a != a || b != b) return (b != b) && (a == a || ia < ib);
    return a > b || (a == b && ia < ib);
}

/* token t: moe__topk_row then moe__topk_select's weights; the raw list at t * K + slot */
MOE__BODY void moe__cuda_topk_select_body(int bx, int tx, int bdx, int *topk, float *gates, int *raw_token,
                                          int *raw_expert, int *raw_slot, float *raw_weight, const float *probs,
                                          int T, int E, int K, int renormalize, float routed_scale) {
    long long t = moe__cuda_index(bx, tx, bdx);
    const float *p;
    int *idx, s, j;
    float *g;
    if (t >= T) return;
    p = probs + (size_t)t * E;
    idx = topk + (size_t)t * K;
    g = gates + (size_t)t * E;
    for (s = 0; s < K; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0 && !moe__cuda_ranks_above(p[idx[s - 1]], idx[s - 1], p[j], j)) continue;
            if (best < 0 || moe__cuda_ranks_above(p[j], j, p[best], best)) best = j;
        }
        idx[s] = best;
    }
    for (j = 0; j < E; j++) g[j] = 0.0f;
    if (renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
    for (s = 0; s < K; s++) {
        size_t o = (size_t)t * K + s;
        raw_token[o] = (int)t;
        raw_expert[o] = idx[s];
        raw_slot[o] = s;
        raw_weight[o] = g[idx[s]] * routed_scale;
    }
}

/* assignment i: its weight's gradient into d_gates (each (token, expert) pair occurs once) */
MOE__BODY void moe__cuda_gate_grads_body(int bx, int tx, int bdx, float *d_gates, const float *dweight,
                                         const int *a_token, const int *a_expert, int n, int E, float routed_scale) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i >= n) return;
    d_gates[(size_t)a_token[i] * E + a_expert[i]] = dweight[i] * routed_scale;
}

/* token t: moe__topk_backward_token (renormalised) or the full softmax's backward */
MOE__BODY void moe__cuda_topk_backward_body(int bx, int tx, int bdx, float *d_logits, const float *d_gates,
                                            const float *gates, const float *probs, const int *topk, int T, int E,
                                            int K, int renormalize) {
    long long t = moe__cuda_index(bx, tx, bdx);
    size_t r;
    const float *g, *dg, *p;
    const int *idx;
    float *dz, dot = 0.0f;
    int s, e;
    if (t >= T) return;
    r = (size_t)t * E;
    g = gates + r;
    dg = d_gates + r;
    p = probs + r;
    idx = topk + (size_t)t * K;
    dz = d_logits + r;
    if (!renormalize) {
        for (e = 0; e < E; e++) dot += dg[e] * p[e];
        for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
        return;
    }
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA

/* one __global__ per body: the kernel passes its indices and nothing else */
#define MOE__KERNEL(name, params, args) \
    __global__ void moe__k_##name params { moe__cuda_##name##_body(blockIdx.x, threadIdx.x, blockDim.x, args); }
#define MOE__A(...) __VA_ARGS__
MOE__KERNEL(bias_fill, (float *out, const float *bias, long long M, int N), MOE__A(out, bias, M, N))
MOE__KERNEL(bias_grad, (float *dbias, const float *dout, int M, int N), MOE__A(dbias, dout, M, N))
MOE__KERNEL(softmax_forward, (float *out, const float *inp, int rows, int n), MOE__A(out, inp, rows, n))
MOE__KERNEL(softmax_backward, (float *dinp, const float *dout, const float *out, int rows, int n),
            MOE__A(dinp, dout, out, rows, n))
MOE__KERNEL(activation_forward, (float *out, const float *inp, long long n, moe_activation act), MOE__A(out, inp, n, act))
MOE__KERNEL(activation_backward, (float *dinp, const float *dout, const float *inp, long long n, moe_activation act),
            MOE__A(dinp, dout, inp, n, act))
MOE__KERNEL(swiglu_forward, (float *out, const float *gate, const float *up, long long n), MOE__A(out, gate, up, n))
MOE__KERNEL(swiglu_backward, (float *dgate, float *dup, const float *dout, const float *gate, const float *up, long long n),
            MOE__A(dgate, dup, dout, gate, up, n))
MOE__KERNEL(rmsnorm_forward, (float *out, float *rstd, const float *inp, const float *weight, int rows, int n, float eps),
            MOE__A(out, rstd, inp, weight, rows, n, eps))
MOE__KERNEL(rmsnorm_backward, (float *dinp, const float *dout, const float *inp, const float *weight, const float *rstd,
                               int rows, int n),
            MOE__A(dinp, dout, inp, weight, rstd, rows, n))
MOE__KERNEL(rmsnorm_dweight, (float *dweight, const float *dout, const float *inp, const float *rstd, int rows, int n),
            MOE__A(dweight, dout, inp, rstd, rows, n))
MOE__KERNEL(crossentropy_forward, (float *losses, const float *logits, const int *targets, int rows, int V),
            MOE__A(losses, logits, targets, rows, V))
MOE__KERNEL(crossentropy_mean, (double *mean, const float *losses, const int *targets, int rows, int V),
            MOE__A(mean, losses, targets, rows, V))
MOE__KERNEL(crossentropy_backward, (float *dlogits, const float *logits, const int *targets, int rows, int V, float dloss),
            MOE__A(dlogits, logits, targets, rows, V, dloss))
MOE__KERNEL(attention_forward, (float *out, float *att, const float *qkv, int B, int T, int d, int NH),
            MOE__A(out, att, qkv, B, T, d, NH))
MOE__KERNEL(attention_backward_q, (float *dqkv, double *dot, const float *dout, const float *qkv, const float *att, int B,
                                   int T, int d, int NH),
            MOE__A(dqkv, dot, dout, qkv, att, B, T, d, NH))
MOE__KERNEL(attention_backward_kv, (float *dqkv, const double *dot, const float *dout, const float *qkv, const float *att,
                                    int B, int T, int d, int NH),
            MOE__A(dqkv, dot, dout, qkv, att, B, T, d, NH))
MOE__KERNEL(rope, (float *qkv, const float *cos_sin, int B, int T, int d, int NH, int inverse),
            MOE__A(qkv, cos_sin, B, T, d, NH, inverse))
MOE__KERNEL(dispatch_count, (int *offset, const int *token, const int *expert, int n, int T, int E),
            MOE__A(offset, token, expert, n, T, E))
MOE__KERNEL(scan, (int *v, int m), MOE__A(v, m))
MOE__KERNEL(dispatch_place, (int *a_token, int *a_expert, int *a_slot, float *a_weight, const int *offset, const int *token,
                             const int *expert, const int *slot, const float *weight, int n, int T, int E),
            MOE__A(a_token, a_expert, a_slot, a_weight, offset, token, expert, slot, weight, n, T, E))
MOE__KERNEL(dispatch_token_count, (int *tok_offset, const int *a_token, int n, int T), MOE__A(tok_offset, a_token, n, T))
MOE__KERNEL(dispatch_token_fill, (int *tok_index, const int *tok_offset, const int *a_token, const int *a_slot, int n, int T),
            MOE__A(tok_index, tok_offset, a_token, a_slot, n, T))
MOE__KERNEL(gather, (float *xg, const float *x, const int *a_token, int n, int d), MOE__A(xg, x, a_token, n, d))
MOE__KERNEL(gather_backward, (float *dx, const float *dxg, const int *tok_offset, const int *tok_index, int T, int d),
            MOE__A(dx, dxg, tok_offset, tok_index, T, d))
MOE__KERNEL(combine_forward, (float *y, const float *eout, const float *a_weight, const int *tok_offset,
                              const int *tok_index, int T, int d, int accumulate),
            MOE__A(y, eout, a_weight, tok_offset, tok_index, T, d, accumulate))
MOE__KERNEL(combine_backward, (float *deout, float *dweight, const float *dy, const float *eout, const int *a_token,
                               const float *a_weight, int n, int d),
            MOE__A(deout, dweight, dy, eout, a_token, a_weight, n, d))
MOE__KERNEL(topk_select, (int *topk, float *gates, int *raw_token, int *raw_expert, int *raw_slot, float *raw_weight,
                          const float *probs, int T, int E, int K, int renormalize, float routed_scale),
            MOE__A(topk, gates, raw_token, raw_expert, raw_slot, raw_weight, probs, T, E, K, renormalize, routed_scale))
MOE__KERNEL(gate_grads, (float *d_gates, const float *dweight, const int *a_token, const int *a_expert, int n, int E,
                         float routed_scale),
            MOE__A(d_gates, dweight, a_token, a_expert, n, E, routed_scale))
MOE__KERNEL(topk_backward, (float *d_logits, const float *d_gates, const float *gates, const float *probs, const int *topk,
                            int T, int E, int K, int renormalize),
            MOE__A(d_logits, d_gates, gates, probs, topk, T, E, K, renormalize))

/* The fast mode's scatters: one thread per element, atomics into the shared rows. */
__global__ void moe__k_gather_backward_atomic(float *dx, const float *dxg, const int *a_token, int n, int d) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)n * d) atomicAdd(&dx[(size_t)a_token[id / d] * d + id % d], dxg[id]);
}
__global__ void moe__k_combine_forward_atomic(float *y, const float *eout, const int *a_token, const float *a_weight, int n,
                                              int d) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)n * d) atomicAdd(&y[(size_t)a_token[id / d] * d + id % d], a_weight[id / d] * eout[id]);
}
__global__ void moe__k_rmsnorm_dweight_atomic(float *dweight, const float *dout, const float *inp, const float *rstd,
                                              int rows, int n) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)rows * n) atomicAdd(&dweight[id % n], dout[id] * inp[id] * rstd[id / n]);
}

/* launch over `count` threads in blocks of `block`; nothing to do for count 0 */
#define MOE__LAUNCH(c, name, count, block, ...)                                                   \
    do {                                                                                          \
        long long moe__n = (long long)(count);                                                    \
        if (moe__n > 0) {                                                                         \
            moe__k_##name<<<moe__cuda_blocks(moe__n, (block)), (block)>>>(__VA_ARGS__);           \
            MOE__CUDA_LAUNCHED(c, "the " #name " kernel");                                        \
        }                                                                                         \
    } while (0)
#define MOE__ROWS 128 /* threads per block of the per-row kernels */

MOE__IMPL moe_status moe_matmul_forward_cuda(moe_cuda *c, float *out, const float *inp, const float *weight,
                                             const float *bias, int M, int K, int N) {
    const float one = 1.0f, zero = 0.0f;
    if (M <= 0 || N <= 0) return MOE_OK;
    if (bias) MOE__LAUNCH(c, bias_fill, (long long)M * N, MOE__CUDA_BLOCK, out, bias, (long long)M, N);
    /* row-major out (M,N) = inp (M,K) W(N,K)^T is column-major out^T (N,M) = W^T... : op(W) = T */
    return moe__cublas_check(c, cublasSgemm((cublasHandle_t)c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, weight, K,
                                            inp, K, bias ? &one : &zero, out, N),
                             "cublasSgemm (matmul forward)");
}

MOE__IMPL moe_status moe_matmul_backward_cuda(moe_cuda *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                              const float *inp, const float *weight, int M, int K, int N) {
    const float one = 1.0f;
    cublasHandle_t h = (cublasHandle_t)c->cublas;
    moe_status s;
    if (M <= 0 || N <= 0 || K <= 0) return MOE_OK;
    /* dinp (M,K) += dout (M,N) W (N,K): column-major dinp^T (K,M) = W^T (K,N) dout^T (N,M) */
    if (dinp && (s = moe__cublas_check(c, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, &one, weight, K, dout, N, &one,
                                                      dinp, K), "cublasSgemm (matmul backward, input)")) != MOE_OK)
        return s;
    /* dW (N,K) += dout^T (N,M) inp (M,K): column-major dW^T (K,N) = inp^T (K,M) dout (M,N) */
    if (dweight && (s = moe__cublas_check(c, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, &one, inp, K, dout, N, &one,
                                                         dweight, K), "cublasSgemm (matmul backward, weight)")) != MOE_OK)
        return s;
    if (dbias) MOE__LAUNCH(c, bias_grad, N, MOE__ROWS, dbias, dout, M, N);
    return MOE_OK;
}

MOE__IMPL moe_status moe_softmax_forward_cuda(moe_cuda *c, float *out, const float *inp, int rows, int n) {
    MOE__LAUNCH(c, softmax_forward, rows, MOE__ROWS, out, inp, rows, n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_softmax_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *out, int rows, int n) {
    MOE__LAUNCH(c, softmax_backward, rows, MOE__ROWS, dinp, dout, out, rows, n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_activation_forward_cuda(moe_cuda *c, float *out, const float *inp, size_t n, moe_activation act) {
    MOE__LAUNCH(c, activation_forward, n, MOE__CUDA_BLOCK, out, inp, (long long)n, act);
    return MOE_OK;
}

MOE__IMPL moe_status moe_activation_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *inp, size_t n,
                                                  moe_activation act) {
    MOE__LAUNCH(c, activation_backward, n, MOE__CUDA_BLOCK, dinp, dout, inp, (long long)n, act);
    return MOE_OK;
}

MOE__IMPL moe_status moe_swiglu_forward_cuda(moe_cuda *c, float *out, const float *gate, const float *up, size_t n) {
    MOE__LAUNCH(c, swiglu_forward, n, MOE__CUDA_BLOCK, out, gate, up, (long long)n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_swiglu_backward_cuda(moe_cuda *c, float *dgate, float *dup, const float *dout, const float *gate,
                                              const float *up, size_t n) {
    MOE__LAUNCH(c, swiglu_backward, n, MOE__CUDA_BLOCK, dgate, dup, dout, gate, up, (long long)n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rmsnorm_forward_cuda(moe_cuda *c, float *out, float *rstd, const float *inp, const float *weight,
                                              int rows, int n, float eps) {
    MOE__LAUNCH(c, rmsnorm_forward, rows, MOE__ROWS, out, rstd, inp, weight, rows, n, eps);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rmsnorm_backward_cuda(moe_cuda *c, float *dinp, float *dweight, const float *dout,
                                               const float *inp, const float *weight, const float *rstd, int rows, int n) {
    MOE__LAUNCH(c, rmsnorm_backward, rows, MOE__ROWS, dinp, dout, inp, weight, rstd, rows, n);
    if (dweight) {
        if (c->mode == MOE_CUDA_FAST)
            MOE__LAUNCH(c, rmsnorm_dweight_atomic, (long long)rows * n, MOE__CUDA_BLOCK, dweight, dout, inp, rstd, rows, n);
        else
            MOE__LAUNCH(c, rmsnorm_dweight, n, MOE__ROWS, dweight, dout, inp, rstd, rows, n);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_crossentropy_forward_cuda(moe_cuda *c, float *losses, const float *logits, const int *targets,
                                                   int rows, int V, double *mean) {
    MOE__LAUNCH(c, crossentropy_forward, rows, MOE__ROWS, losses, logits, targets, rows, V);
    if (mean) {
        MOE__LAUNCH(c, crossentropy_mean, 1, 1, c->scalars, losses, targets, rows, V);
        return moe_cuda_download(c, mean, c->scalars, sizeof *mean);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_crossentropy_backward_cuda(moe_cuda *c, float *dlogits, const float *logits, const int *targets,
                                                    int rows, int V, float dloss) {
    MOE__LAUNCH(c, crossentropy_backward, rows, MOE__ROWS, dlogits, logits, targets, rows, V, dloss);
    return MOE_OK;
}

MOE__IMPL moe_status moe_attention_forward_cuda(moe_cuda *c, float *out, float *att, const float *qkv, int B, int T, int d,
                                                int NH) {
    if (NH <= 0 || d % NH) return moe_err_set(&c->err, MOE_ERR_SHAPE, "attention: d = %d is not a multiple of %d heads", d, NH);
    MOE__LAUNCH(c, attention_forward, (long long)B * NH * T, 64, out, att, qkv, B, T, d, NH);
    return MOE_OK;
}

MOE__IMPL moe_status moe_attention_backward_cuda(moe_cuda *c, float *dqkv, const float *dout, const float *qkv,
                                                 const float *att, int B, int T, int d, int NH, double *dot) {
    long long rows = (long long)B * NH * T;
    if (NH <= 0 || d % NH) return moe_err_set(&c->err, MOE_ERR_SHAPE, "attention: d = %d is not a multiple of %d heads", d, NH);
    /* the q rows first (they write dot), then the k and v rows that read it */
    MOE__LAUNCH(c, attention_backward_q, rows, 64, dqkv, dot, dout, qkv, att, B, T, d, NH);
    MOE__LAUNCH(c, attention_backward_kv, rows, 64, dqkv, dot, dout, qkv, att, B, T, d, NH);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rope_apply_cuda(moe_cuda *c, float *qkv, const float *cos_sin, int B, int T, int d, int NH,
                                         int inverse) {
    MOE__LAUNCH(c, rope, (long long)B * T * 2 * NH, MOE__ROWS, qkv, cos_sin, B, T, d, NH, inverse);
    return MOE_OK;
}

MOE__IMPL moe_status moe_assign_alloc_cuda(moe_cuda *c, moe_assign *a, int cap, int T, int E) {
    moe_status s;
    size_t ci = sizeof(int) * (size_t)(cap > 0 ? cap : 1);
    memset(a, 0, sizeof *a);
    a->T = T;
    a->E = E;
    if ((s = moe_cuda_malloc(c, (void **)&a->token, ci)) != MOE_OK || (s = moe_cuda_malloc(c, (void **)&a->expert, ci)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->slot, ci)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->weight, sizeof(float) * (size_t)(cap > 0 ? cap : 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->offset, sizeof(int) * (size_t)(E + 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->tok_offset, sizeof(int) * (size_t)(T + 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->tok_index, ci)) != MOE_OK) {
        moe_assign_free_cuda(a);
        return s;
    }
    return MOE_OK;
}

MOE__IMPL void moe_assign_free_cuda(moe_assign *a) {
    moe_cuda_mfree(a->token);
    moe_cuda_mfree(a->expert);
    moe_cuda_mfree(a->slot);
    moe_cuda_mfree(a->weight);
    moe_cuda_mfree(a->offset);
    moe_cuda_mfree(a->tok_offset);
    moe_cuda_mfree(a->tok_index);
    memset(a, 0, sizeof *a);
}

MOE__IMPL moe_status moe_dispatch_cuda(moe_cuda *c, moe_assign *a, const int *token, const int *expert, const int *slot,
                                       const float *weight, int n, int T, int E) {
    a->n = n;
    a->T = T;
    a->E = E;
    MOE__LAUNCH(c, dispatch_count, E + 1, MOE__ROWS, a->offset, token, expert, n, T, E);
    MOE__LAUNCH(c, scan, 1, 1, a->offset, E);
    MOE__LAUNCH(c, dispatch_place, E, MOE__ROWS, a->token, a->expert, a->slot, a->weight, a->offset, token, expert, slot,
                weight, n, T, E);
    MOE__LAUNCH(c, dispatch_token_count, T + 1, MOE__ROWS, a->tok_offset, a->token, n, T);
    MOE__LAUNCH(c, scan, 1, 1, a->tok_offset, T);
    MOE__LAUNCH(c, dispatch_token_fill, T, MOE__ROWS, a->tok_index, a->tok_offset, a->token, a->slot, n, T);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gather_cuda(moe_cuda *c, float *xg, const float *x, const moe_assign *a, int d) {
    MOE__LAUNCH(c, gather, (long long)a->n * d, MOE__CUDA_BLOCK, xg, x, a->token, a->n, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gather_backward_cuda(moe_cuda *c, float *dx, const float *dxg, const moe_assign *a, int d) {
    if (c->mode == MOE_CUDA_FAST)
        MOE__LAUNCH(c, gather_backward_atomic, (long long)a->n * d, MOE__CUDA_BLOCK, dx, dxg, a->token, a->n, d);
    else
        MOE__LAUNCH(c, gather_backward, (long long)a->T * d, MOE__CUDA_BLOCK, dx, dxg, a->tok_offset, a->tok_index, a->T, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_combine_forward_cuda(moe_cuda *c, float *y, const float *eout, const moe_assign *a, int d,
                                              int accumulate) {
    if (c->mode == MOE_CUDA_FAST) {
        if (!accumulate && a->T > 0) MOE__CUDA_TRY(c, cudaMemset(y, 0, sizeof(float) * (size_t)a->T * d), "cudaMemset");
        MOE__LAUNCH(c, combine_forward_atomic, (long long)a->n * d, MOE__CUDA_BLOCK, y, eout, a->token, a->weight, a->n, d);
    } else {
        MOE__LAUNCH(c, combine_forward, (long long)a->T * d, MOE__CUDA_BLOCK, y, eout, a->weight, a->tok_offset, a->tok_index,
                    a->T, d, accumulate);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_combine_backward_cuda(moe_cuda *c, float *deout, float *dweight, const float *dy,
                                               const float *eout, const moe_assign *a, int d) {
    MOE__LAUNCH(c, combine_backward, a->n, MOE__ROWS, deout, dweight, dy, eout, a->token, a->weight, a->n, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_topk_select_cuda(moe_cuda *c, int *topk, float *gates, int *raw_token, int *raw_expert,
                                          int *raw_slot, float *raw_weight, const float *probs, int T, int E, int K,
                                          int renormalize, float routed_scale) {
    if (K < 1 || K > E) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "top-k: k = %d outside [1, %d]", K, E);
    MOE__LAUNCH(c, topk_select, T, MOE__ROWS, topk, gates, raw_token, raw_expert, raw_slot, raw_weight, probs, T, E, K,
                renormalize, routed_scale);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gate_grads_cuda(moe_cuda *c, float *d_gates, const float *dweight, const moe_assign *a,
                                         float routed_scale) {
    if (a->T > 0) MOE__CUDA_TRY(c, cudaMemset(d_gates, 0, sizeof(float) * (size_t)a->T * a->E), "cudaMemset");
    MOE__LAUNCH(c, gate_grads, a->n, MOE__CUDA_BLOCK, d_gates, dweight, a->token, a->expert, a->n, a->E, routed_scale);
    return MOE_OK;
}

MOE__IMPL moe_status moe_topk_backward_cuda(moe_cuda *c, float *d_logits, const float *d_gates, const float *gates,
                                            const float *probs, const int *topk, int T, int E, int K, int renormalize) {
    MOE__LAUNCH(c, topk_backward, T, MOE__ROWS, d_logits, d_gates, gates, probs, topk, T, E, K, renormalize);
    return MOE_OK;
}

#endif /* MOE_CUDA */
/* ============================================================================================
   >>moe:cuda_layer
   ============================================================================================ */
#ifdef MOE_CUDA

MOE__IMPL void moe_layer_free_cuda(moe_layer_cuda *Lc) {
    void *p[] = {Lc->logits, Lc->probs, Lc->gates, Lc->d_gates, Lc->d_logits, Lc->topk, Lc->raw_token, Lc->raw_expert,
                 Lc->raw_slot, Lc->raw_weight, Lc->xg, Lc->hg, Lc->hu, Lc->h, Lc->eout, Lc->d_weight, Lc->dxg,
                 Lc->deout, Lc->dh, Lc->dhg, Lc->dhu};
    size_t i;
    for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
    moe_assign_free_cuda(&Lc->routed);
    MOE_FREE(Lc->offset_host);
    memset(Lc, 0, sizeof *Lc);
}

MOE__IMPL moe_status moe_layer_init_cuda(moe_layer_cuda *Lc, moe_cuda *c, const moe_layer *L, int max_tokens) {
    const moe_layer_config *g = &L->cfg;
    size_t TE, TK, cap, d, D;
    moe_status s;
    memset(Lc, 0, sizeof *Lc);
    if (g->router != MOE_ROUTER_TOPK || g->n_shared || g->capacity_factor > 0.0f || g->selection_bias ||
        g->gw_threshold > 0.0f || g->hyper || (g->router_dim && g->router_dim != g->d) ||
        (g->balance != MOE_BALANCE_NONE && g->balance_coef > 0.0f) || g->z_coef > 0.0f)
        return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED,
                           "the CUDA layer covers the standard softmax top-k router without shared experts, capacity, "
                           "selection bias, GW-MoE, HyperMoE or auxiliary losses");
    if (max_tokens <= 0 || max_tokens > L->max_tokens)
        return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "max_tokens %d outside [1, %d] (the host layer's)", max_tokens, L->max_tokens);
    Lc->host = L;
    Lc->max_tokens = max_tokens;
    TE = (size_t)max_tokens * g->n_experts;
    TK = (size_t)max_tokens * g->top_k;
    cap = TK;
    d = (size_t)g->d;
    D = (size_t)g->d_ff;
#define MOE__DEV(ptr, count, type) (s = moe_cuda_malloc(c, (void **)&(ptr), sizeof(type) * (count))) == MOE_OK
    if (!(MOE__DEV(Lc->logits, TE, float) && MOE__DEV(Lc->probs, TE, float) && MOE__DEV(Lc->gates, TE, float) &&
          MOE__DEV(Lc->d_gates, TE, float) && MOE__DEV(Lc->d_logits, TE, float) && MOE__DEV(Lc->topk, TK, int) &&
          MOE__DEV(Lc->raw_token, TK, int) && MOE__DEV(Lc->raw_expert, TK, int) && MOE__DEV(Lc->raw_slot, TK, int) &&
          MOE__DEV(Lc->raw_weight, TK, float) && MOE__DEV(Lc->xg, cap * d, float) && MOE__DEV(Lc->hg, cap * D, float) &&
          MOE__DEV(Lc->hu, cap * D, float) && MOE__DEV(Lc->h, cap * D, float) && MOE__DEV(Lc->eout, cap * d, float) &&
          MOE__DEV(Lc->d_weight, cap, float) && MOE__DEV(Lc->dxg, cap * d, float) && MOE__DEV(Lc->deout, cap * d, float) &&
          MOE__DEV(Lc->dh, cap * D, float) && MOE__DEV(Lc->dhg, cap * D, float) && MOE__DEV(Lc->dhu, cap * D, float) &&
          (s = moe_assign_alloc_cuda(c, &Lc->routed, (int)cap, max_tokens, g->n_experts)) == MOE_OK)) {
        moe_layer_free_cuda(Lc);
        return s;
    }
#undef MOE__DEV
    Lc->offset_host = (int *)MOE_MALLOC(sizeof(int) * (size_t)(g->n_experts + 1));
    if (!Lc->offset_host) {
        moe_layer_free_cuda(Lc);
        return moe_err_set(&c->err, MOE_ERR_NOMEM, "out of memory for the CUDA layer's expert offsets");
    }
    return MOE_OK;
}

/* a tensor of the host layer in one of the device store's buffers (NULL for id < 0) */
static float *moe__cuda_tensor(const moe_store_cuda *d, float *buf, int id) {
    return id < 0 ? NULL : buf + d->host->tensors[id].offset;
}

MOE__IMPL moe_status moe_layer_forward_cuda(moe_cuda *c, moe_layer_cuda *Lc, const moe_store_cuda *d, float *y,
                                            const float *x, int T) {
    const moe_layer *L = Lc->host;
    const moe_layer_config *g = &L->cfg;
    int E = g->n_experts, K = g->top_k, dm = g->d, D = g->d_ff, e, ffn = g->expert == MOE_EXPERT_FFN;
    float *Wg = moe__cuda_tensor(d, d->params, L->id_gate), *Wu = moe__cuda_tensor(d, d->params, L->id_up);
    float *Wd = moe__cuda_tensor(d, d->params, L->id_down), *bu = moe__cuda_tensor(d, d->params, L->id_b_up);
    float *bd = moe__cuda_tensor(d, d->params, L->id_b_down);
    moe_status s;
    if (T <= 0 || T > Lc->max_tokens) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "T = %d outside [1, %d]", T, Lc->max_tokens);
    Lc->T = 0;
    if ((s = moe_matmul_forward_cuda(c, Lc->logits, x, moe__cuda_tensor(d, d->params, L->id_router_w),
                                     moe__cuda_tensor(d, d->params, L->id_router_b), T, dm, E)) != MOE_OK ||
        (s = moe_softmax_forward_cuda(c, Lc->probs, Lc->logits, T, E)) != MOE_OK ||
        (s = moe_topk_select_cuda(c, Lc->topk, Lc->gates, Lc->raw_token, Lc->raw_expert, Lc->raw_slot, Lc->raw_weight,
                                  Lc->probs, T, E, K, g->renormalize, g->routed_scale)) != MOE_OK ||
        (s = moe_dispatch_cuda(c, &Lc->routed, Lc->raw_token, Lc->raw_expert, Lc->raw_slot, Lc->raw_weight, T * K, T, E)) != MOE_OK ||
        (s = moe_gather_cuda(c, Lc->xg, x, &Lc->routed, dm)) != MOE_OK ||
        (s = moe_cuda_download(c, Lc->offset_host, Lc->routed.offset, sizeof(int) * (size_t)(E + 1))) != MOE_OK)
        return s;
    for (e = 0; e < E; e++) { /* the experts, one GEMM per matrix on their rows */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        size_t eD = (size_t)e * D * dm;
        if (m == 0) continue;
        if (!ffn && (s = moe_matmul_forward_cuda(c, Lc->hg + (size_t)o * D, Lc->xg + (size_t)o * dm, Wg + eD, NULL, m, dm, D)) != MOE_OK)
            return s;
        if ((s = moe_matmul_forward_cuda(c, Lc->hu + (size_t)o * D, Lc->xg + (size_t)o * dm, Wu + eD,
                                         bu ? bu + (size_t)e * D : NULL, m, dm, D)) != MOE_OK)
            return s;
    }
    {
        size_t nD = (size_t)T * K * D;
        s = ffn ? moe_activation_forward_cuda(c, Lc->h, Lc->hu, nD, g->activation) : moe_swiglu_forward_cuda(c, Lc->h, Lc->hg, Lc->hu, nD);
        if (s != MOE_OK) return s;
    }
    for (e = 0; e < E; e++) {
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        if (m == 0) continue;
        if ((s = moe_matmul_forward_cuda(c, Lc->eout + (size_t)o * dm, Lc->h + (size_t)o * D, Wd + (size_t)e * dm * D,
                                         bd ? bd + (size_t)e * dm : NULL, m, D, dm)) != MOE_OK)
            return s;
    }
    if ((s = moe_combine_forward_cuda(c, y, Lc->eout, &Lc->routed, dm, 0)) != MOE_OK) return s;
    Lc->T = T;
    return MOE_OK;
}

MOE__IMPL moe_status moe_layer_backward_cuda(moe_cuda *c, moe_layer_cuda *Lc, moe_store_cuda *d, float *dx,
                                             const float *dy, const float *x) {
    const moe_layer *L = Lc->host;
    const moe_layer_config *g = &L->cfg;
    int E = g->n_experts, K = g->top_k, dm = g->d, D = g->d_ff, T = Lc->T, e, ffn = g->expert == MOE_EXPERT_FFN;
    size_t nD = (size_t)T * K * D, nd = (size_t)T * K * dm;
    float *Wg = moe__cuda_tensor(d, d->params, L->id_gate), *Wu = moe__cuda_tensor(d, d->params, L->id_up);
    float *Wd = moe__cuda_tensor(d, d->params, L->id_down);
    float *gWg = moe__cuda_tensor(d, d->grads, L->id_gate), *gWu = moe__cuda_tensor(d, d->grads, L->id_up);
    float *gWd = moe__cuda_tensor(d, d->grads, L->id_down), *gbu = moe__cuda_tensor(d, d->grads, L->id_b_up);
    float *gbd = moe__cuda_tensor(d, d->grads, L->id_b_down);
    moe_status s;
    if (T <= 0) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_layer_backward_cuda without a forward");
    if ((s = moe_combine_backward_cuda(c, Lc->deout, Lc->d_weight, dy, Lc->eout, &Lc->routed, dm)) != MOE_OK) return s;
    MOE__CUDA_TRY(c, cudaMemset(Lc->dh, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dhg, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dhu, 0, sizeof(float) * nD), "cudaMemset");
    MOE__CUDA_TRY(c, cudaMemset(Lc->dxg, 0, sizeof(float) * nd), "cudaMemset");
    for (e = 0; e < E; e++) { /* dh = deout . Wd_e; dWd_e += deout^T h */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        if (m == 0) continue;
        if ((s = moe_matmul_backward_cuda(c, Lc->dh + (size_t)o * D, gWd + (size_t)e * dm * D, gbd ? gbd + (size_t)e * dm : NULL,
                                          Lc->deout + (size_t)o * dm, Lc->h + (size_t)o * D, Wd + (size_t)e * dm * D, m, D,
                                          dm)) != MOE_OK)
            return s;
    }
    s = ffn ? moe_activation_backward_cuda(c, Lc->dhu, Lc->dh, Lc->hu, nD, g->activation)
            : moe_swiglu_backward_cuda(c, Lc->dhg, Lc->dhu, Lc->dh, Lc->hg, Lc->hu, nD);
    if (s != MOE_OK) return s;
    for (e = 0; e < E; e++) { /* dxg = dhg . Wg_e + dhu . Wu_e and the two weight gradients */
        int o = Lc->offset_host[e], m = Lc->offset_host[e + 1] - o;
        size_t eD = (size_t)e * D * dm;
        if (m == 0) continue;
        if (!ffn && (s = moe_matmul_backward_cuda(c, Lc->dxg + (size_t)o * dm, gWg + eD, NULL, Lc->dhg + (size_t)o * D,
                                                  Lc->xg + (size_t)o * dm, Wg + eD, m, dm, D)) != MOE_OK)
            return s;
        if ((s = moe_matmul_backward_cuda(c, Lc->dxg + (size_t)o * dm, gWu + eD, gbu ? gbu + (size_t)e * D : NULL,
                                          Lc->dhu + (size_t)o * D, Lc->xg + (size_t)o * dm, Wu + eD, m, dm, D)) != MOE_OK)
            return s;
    }
    if ((s = moe_gather_backward_cuda(c, dx, Lc->dxg, &Lc->routed, dm)) != MOE_OK ||
        (s = moe_gate_grads_cuda(c, Lc->d_gates, Lc->d_weight, &Lc->routed, g->routed_scale)) != MOE_OK)
        return s;
    MOE__CUDA_TRY(c, cudaMemset(Lc->d_logits, 0, sizeof(float) * (size_t)T * E), "cudaMemset");
    if ((s = moe_topk_backward_cuda(c, Lc->d_logits, Lc->d_gates, Lc->gates, Lc->probs, Lc->topk, T, E, K, g->renormalize)) != MOE_OK)
        return s;
    return moe_matmul_backward_cuda(c, dx, moe__cuda_tensor(d, d->grads, L->id_router_w),
                                    moe__cuda_tensor(d, d->grads, L->id_router_b), Lc->d_logits, x,
                                    moe__cuda_tensor(d, d->params, L->id_router_w), T, dm, E);
}

#endif /* MOE_CUDA */
/* ============================================================================================
   >>moe:cuda_model
   ============================================================================================ */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

/* x (N, d) element (i, j) = wte[inputs[i]][j] (+ wpe[i % T][j]) */
MOE__BODY void moe__cuda_embed_forward_body(int bx, int tx, int bdx, float *x, const int *inputs, const float *wte,
                                            const float *wpe, int N, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int i, j;
    if (id >= (long long)N * d) return;
    i = (int)(id / d);
    j = (int)(id % d);
    x[id] = wte[(size_t)inputs[i] * d + j] + (wpe ? wpe[(size_t)(i % T) * d + j] : 0.0f);
}

/* gwte element (v, j) += the gradient rows of the tokens whose id is v, in token order (the
   CPU's serial scatter, as a gather) */
MOE__BODY void moe__cuda_embed_backward_wte_body(int bx, int tx, int bdx, float *gwte, const float *g, const int *inputs,
                                                 int N, int V, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int v, j, i;
    float o;
    if (id >= (long long)V * d) return;
    v = (int)(id / d);
    j = (int)(id % d);
    o = gwte[id];
    for (i = 0; i < N; i++)
        if (inputs[i] == v) o += g[(size_t)i * d + j];
    gwte[id] = o;
}

/* gwpe element (t, j) += the gradient rows at position t, sequences in order */
MOE__BODY void moe__cuda_embed_backward_wpe_body(int bx, int tx, int bdx, float *gwpe, const float *g, int B, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, b;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = gwpe[id];
    for (b = 0; b < B; b++) o += g[((size_t)b * T + t) * d + j];
    gwpe[id] = o;
}

/* out = a + b, elementwise (out may be a) */
MOE__BODY void moe__cuda_add_body(int bx, int tx, int bdx, float *out, const float *a, const float *b, long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = a[i] + b[i];
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA

MOE__KERNEL(embed_forward, (float *x, const int *inputs, const float *wte, const float *wpe, int N, int T, int d),
            MOE__A(x, inputs, wte, wpe, N, T, d))
MOE__KERNEL(embed_backward_wte, (float *gwte, const float *g, const int *inputs, int N, int V, int d),
            MOE__A(gwte, g, inputs, N, V, d))
MOE__KERNEL(embed_backward_wpe, (float *gwpe, const float *g, int B, int T, int d), MOE__A(gwpe, g, B, T, d))
MOE__KERNEL(add, (float *out, const float *a, const float *b, long long n), MOE__A(out, a, b, n))

MOE__IMPL void moe_model_free_cuda(moe_model_cuda *mc) {
    int l;
    if (mc->blocks) {
        for (l = 0; l < mc->host->cfg.n_layers; l++) {
            moe_block_cuda *b = &mc->blocks[l];
            void *p[] = {b->x, b->ln1, b->rstd1, b->qkv, b->att, b->atty, b->x2, b->ln2, b->rstd2, b->hg, b->hu, b->h, b->ffn};
            size_t i;
            for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
        }
        MOE_FREE(mc->blocks);
    }
    if (mc->layers) {
        for (l = 0; l < mc->host->cfg.n_layers; l++) moe_layer_free_cuda(&mc->layers[l]);
        MOE_FREE(mc->layers);
    }
    {
        void *p[] = {mc->inputs, mc->targets, mc->x_final, mc->lnf, mc->rstd_f, mc->logits, mc->losses, mc->rope,
                     mc->d_res, mc->d_res2, mc->d_ln, mc->d_qkv, mc->d_atty, mc->d_logits, mc->dh, mc->dhg, mc->dhu,
                     mc->att_dot};
        size_t i;
        for (i = 0; i < sizeof p / sizeof p[0]; i++) moe_cuda_mfree(p[i]);
    }
    moe_store_free_cuda(&mc->S);
    memset(mc, 0, sizeof *mc);
}

/* what the twin runs of the host model as it is now (checked at init and at every forward) */
static moe_status moe__model_cuda_covers(moe_cuda *c, const moe_model *m) {
    int l;
    if (m->cfg.router_input != MOE_RIN_DIRECT || m->cfg.balance_all_layers)
        return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "the CUDA model covers routers that read x, each layer its own loss");
    if (m->group_size) return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "the CUDA model runs its layers in sequence, not as CQIL groups");
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->layer_scale[l] != 1.0f)
            return moe_err_set(&c->err, MOE_ERR_UNSUPPORTED, "layer %d's residual scale is %g: the CUDA model runs unscaled residuals (masked growth is CPU-only)", l, (double)m->layer_scale[l]);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_init_cuda(moe_model_cuda *mc, moe_cuda *c, const moe_model *m, int max_B, int max_T) {
    const moe_model_config *g = &m->cfg;
    size_t N = (size_t)max_B * max_T, d = (size_t)g->d, V = (size_t)g->vocab, F, NH = (size_t)g->n_heads;
    moe_status s = MOE_OK;
    int l;
    memset(mc, 0, sizeof *mc);
    if (!m->blocks) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_model_init_cuda: the host model is not initialised");
    if (max_B <= 0 || max_T <= 0 || max_B > m->max_B || max_T > m->max_T)
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the host model's (%d x %d)", max_B, max_T, m->max_B, m->max_T);
    if ((s = moe__model_cuda_covers(c, m)) != MOE_OK) return s;
    mc->host = m;
    mc->max_B = max_B;
    mc->max_T = max_T;
    F = moe__dense_width(m) > (size_t)g->moe.d_ff ? moe__dense_width(m) : (size_t)g->moe.d_ff;
    mc->blocks = (moe_block_cuda *)MOE_MALLOC(sizeof(moe_block_cuda) * (size_t)g->n_layers);
    mc->layers = (moe_layer_cuda *)MOE_MALLOC(sizeof(moe_layer_cuda) * (size_t)g->n_layers);
    if (!mc->blocks || !mc->layers) {
        MOE_FREE(mc->blocks);
        MOE_FREE(mc->layers);
        mc->blocks = NULL;
        mc->layers = NULL;
        return moe_err_set(&c->err, MOE_ERR_NOMEM, "out of memory for the CUDA model's block table");
    }
    memset(mc->blocks, 0, sizeof(moe_block_cuda) * (size_t)g->n_layers);
    memset(mc->layers, 0, sizeof(moe_layer_cuda) * (size_t)g->n_layers);
#define MOE__DEV(ptr, count, type) (s = moe_cuda_malloc(c, (void **)&(ptr), sizeof(type) * (count))) == MOE_OK
    for (l = 0; l < g->n_layers && s == MOE_OK; l++) {
        moe_block_cuda *b = &mc->blocks[l];
        if (!(MOE__DEV(b->x, N * d, float) && MOE__DEV(b->ln1, N * d, float) && MOE__DEV(b->rstd1, N, float) &&
              MOE__DEV(b->qkv, N * 3 * d, float) && MOE__DEV(b->att, N * NH * max_T, float) && MOE__DEV(b->atty, N * d, float) &&
              MOE__DEV(b->x2, N * d, float) && MOE__DEV(b->ln2, N * d, float) && MOE__DEV(b->rstd2, N, float) &&
              MOE__DEV(b->ffn, N * d, float)))
            break;
        if (m->blocks[l].is_moe) {
            s = moe_layer_init_cuda(&mc->layers[l], c, &m->blocks[l].moe, (int)N);
        } else if (!(MOE__DEV(b->hg, N * g->d_ff, float) && MOE__DEV(b->hu, N * g->d_ff, float) && MOE__DEV(b->h, N * g->d_ff, float))) {
            break;
        }
    }
    if (s == MOE_OK &&
        !(MOE__DEV(mc->inputs, N, int) && MOE__DEV(mc->targets, N, int) && MOE__DEV(mc->x_final, N * d, float) &&
          MOE__DEV(mc->lnf, N * d, float) && MOE__DEV(mc->rstd_f, N, float) && MOE__DEV(mc->logits, N * V, float) &&
          MOE__DEV(mc->losses, N, float) && MOE__DEV(mc->rope, (size_t)m->max_T * (d / NH), float) &&
          MOE__DEV(mc->d_res, N * d, float) && MOE__DEV(mc->d_res2, N * d, float) && MOE__DEV(mc->d_ln, N * d, float) &&
          MOE__DEV(mc->d_qkv, N * 3 * d, float) && MOE__DEV(mc->d_atty, N * d, float) && MOE__DEV(mc->d_logits, N * V, float) &&
          MOE__DEV(mc->dh, N * F, float) && MOE__DEV(mc->dhg, N * F, float) && MOE__DEV(mc->dhu, N * F, float) &&
          MOE__DEV(mc->att_dot, N * NH, double)))
        ;
#undef MOE__DEV
    if (s == MOE_OK && g->pos == MOE_POS_ROPE)
        s = moe_cuda_upload(c, mc->rope, m->rope, sizeof(float) * (size_t)m->max_T * (d / NH));
    if (s == MOE_OK) s = moe_store_alloc_cuda(&mc->S, c, &m->S);
    if (s != MOE_OK) moe_model_free_cuda(mc);
    return s;
}

#define MOE__P(mc, id) ((mc)->S.params + (mc)->host->S.tensors[id].offset)
#define MOE__G(mc, id) ((mc)->S.grads + (mc)->host->S.tensors[id].offset)
#define MOE__TRY(call)                     \
    do {                                   \
        moe_status moe__s = (call);        \
        if (moe__s != MOE_OK) return moe__s; \
    } while (0)

MOE__IMPL moe_status moe_model_forward_cuda(moe_cuda *c, moe_model_cuda *mc, const int *inputs, const int *targets, int B,
                                            int T) {
    const moe_model *m = mc->host;
    const moe_model_config *g = &m->cfg;
    int d = g->d, NH = g->n_heads, V = g->vocab, N = B * T, l, i, F = g->d_ff;
    moe_status s0 = moe__model_cuda_covers(c, m);
    if (s0 != MOE_OK) return s0;
    if (B <= 0 || T <= 0 || B > mc->max_B || T > mc->max_T)
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "batch %d x %d does not fit the device activations (%d x %d)", B, T, mc->max_B, mc->max_T);
    for (i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "input token %d at position %d is outside [0, %d)", inputs[i], i, V);
        if (targets && (targets[i] < -1 || targets[i] >= V)) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "target %d at position %d is outside [-1, %d)", targets[i], i, V);
    }
    mc->B = mc->T = 0;
    mc->count = 0;
    MOE__TRY(moe_cuda_upload(c, mc->inputs, inputs, sizeof(int) * (size_t)N));
    if (targets) {
        MOE__TRY(moe_cuda_upload(c, mc->targets, targets, sizeof(int) * (size_t)N));
        for (i = 0; i < N; i++) mc->count += targets[i] >= 0;
    }
    MOE__LAUNCH(c, embed_forward, (long long)N * d, MOE__CUDA_BLOCK, mc->blocks[0].x, mc->inputs, MOE__P(mc, m->id_wte),
                m->id_wpe >= 0 ? MOE__P(mc, m->id_wpe) : (const float *)NULL, N, T, d);
    for (l = 0; l < g->n_layers; l++) {
        const moe_block *hb = &m->blocks[l];
        moe_block_cuda *b = &mc->blocks[l];
        float *out = l + 1 < g->n_layers ? mc->blocks[l + 1].x : mc->x_final;
        MOE__TRY(moe_rmsnorm_forward_cuda(c, b->ln1, b->rstd1, b->x, MOE__P(mc, hb->id_ln1), N, d, g->norm_eps));
        MOE__TRY(moe_matmul_forward_cuda(c, b->qkv, b->ln1, MOE__P(mc, hb->id_qkv), NULL, N, d, 3 * d));
        if (g->pos == MOE_POS_ROPE) MOE__TRY(moe_rope_apply_cuda(c, b->qkv, mc->rope, B, T, d, NH, 0));
        MOE__TRY(moe_attention_forward_cuda(c, b->atty, b->att, b->qkv, B, T, d, NH));
        MOE__TRY(moe_matmul_forward_cuda(c, b->x2, b->atty, MOE__P(mc, hb->id_wo), NULL, N, d, d));
        MOE__LAUNCH(c, add, (long long)N * d, MOE__CUDA_BLOCK, b->x2, b->x2, b->x, (long long)N * d);
        MOE__TRY(moe_rmsnorm_forward_cuda(c, b->ln2, b->rstd2, b->x2, MOE__P(mc, hb->id_ln2), N, d, g->norm_eps));
        if (hb->is_moe) {
            MOE__TRY(moe_layer_forward_cuda(c, &mc->layers[l], &mc->S, b->ffn, b->ln2, N));
        } else {
            MOE__TRY(moe_matmul_forward_cuda(c, b->hg, b->ln2, MOE__P(mc, hb->id_gate), NULL, N, d, F));
            MOE__TRY(moe_matmul_forward_cuda(c, b->hu, b->ln2, MOE__P(mc, hb->id_up), NULL, N, d, F));
            MOE__TRY(moe_swiglu_forward_cuda(c, b->h, b->hg, b->hu, (size_t)N * F));
            MOE__TRY(moe_matmul_forward_cuda(c, b->ffn, b->h, MOE__P(mc, hb->id_down), NULL, N, F, d));
        }
        MOE__LAUNCH(c, add, (long long)N * d, MOE__CUDA_BLOCK, out, b->x2, b->ffn, (long long)N * d);
    }
    MOE__TRY(moe_rmsnorm_forward_cuda(c, mc->lnf, mc->rstd_f, mc->x_final, MOE__P(mc, m->id_lnf), N, d, g->norm_eps));
    MOE__TRY(moe_matmul_forward_cuda(c, mc->logits, mc->lnf, MOE__P(mc, m->id_wte), NULL, N, d, V));
    mc->loss = 0.0;
    if (targets) MOE__TRY(moe_crossentropy_forward_cuda(c, mc->losses, mc->logits, mc->targets, N, V, &mc->loss));
    mc->B = B;
    mc->T = T;
    mc->count = targets ? (mc->count > 0 ? mc->count : -1) : 0; /* -1: targets, none counted */
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_backward_cuda(moe_cuda *c, moe_model_cuda *mc, float scale) {
    const moe_model *m = mc->host;
    const moe_model_config *g = &m->cfg;
    int B = mc->B, T = mc->T, N = B * T, d = g->d, NH = g->n_heads, V = g->vocab, F = g->d_ff, l;
    size_t Nd = (size_t)N * d * sizeof(float);
    if (mc->count == 0 || N == 0) return moe_err_set(&c->err, MOE_ERR_STATE, "backward needs a forward with targets before it");
    MOE__CUDA_TRY(c, cudaMemset(mc->d_logits, 0, sizeof(float) * (size_t)N * V), "cudaMemset");
    if (mc->count > 0) MOE__TRY(moe_crossentropy_backward_cuda(c, mc->d_logits, mc->logits, mc->targets, N, V, scale / (float)mc->count));
    MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
    MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, m->id_wte), NULL, mc->d_logits, mc->lnf, MOE__P(mc, m->id_wte), N, d, V));
    MOE__CUDA_TRY(c, cudaMemset(mc->d_res, 0, Nd), "cudaMemset");
    MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res, MOE__G(mc, m->id_lnf), mc->d_ln, mc->x_final, MOE__P(mc, m->id_lnf), mc->rstd_f, N, d));
    for (l = g->n_layers - 1; l >= 0; l--) {
        const moe_block *hb = &m->blocks[l];
        moe_block_cuda *b = &mc->blocks[l];
        MOE__CUDA_TRY(c, cudaMemcpy(mc->d_res2, mc->d_res, Nd, cudaMemcpyDeviceToDevice), "cudaMemcpy");
        MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
        if (hb->is_moe) {
            MOE__TRY(moe_layer_backward_cuda(c, &mc->layers[l], &mc->S, mc->d_ln, mc->d_res, b->ln2));
        } else { /* the dense SwiGLU: moe_experts_backward with one expert */
            size_t NF = sizeof(float) * (size_t)N * F;
            MOE__CUDA_TRY(c, cudaMemset(mc->dh, 0, NF), "cudaMemset");
            MOE__CUDA_TRY(c, cudaMemset(mc->dhg, 0, NF), "cudaMemset");
            MOE__CUDA_TRY(c, cudaMemset(mc->dhu, 0, NF), "cudaMemset");
            MOE__TRY(moe_matmul_backward_cuda(c, mc->dh, MOE__G(mc, hb->id_down), NULL, mc->d_res, b->h, MOE__P(mc, hb->id_down), N, F, d));
            MOE__TRY(moe_swiglu_backward_cuda(c, mc->dhg, mc->dhu, mc->dh, b->hg, b->hu, (size_t)N * F));
            MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_gate), NULL, mc->dhg, b->ln2, MOE__P(mc, hb->id_gate), N, d, F));
            MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_up), NULL, mc->dhu, b->ln2, MOE__P(mc, hb->id_up), N, d, F));
        }
        MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res2, MOE__G(mc, hb->id_ln2), mc->d_ln, b->x2, MOE__P(mc, hb->id_ln2), b->rstd2, N, d));
        MOE__CUDA_TRY(c, cudaMemcpy(mc->d_res, mc->d_res2, Nd, cudaMemcpyDeviceToDevice), "cudaMemcpy");
        MOE__CUDA_TRY(c, cudaMemset(mc->d_atty, 0, Nd), "cudaMemset");
        MOE__TRY(moe_matmul_backward_cuda(c, mc->d_atty, MOE__G(mc, hb->id_wo), NULL, mc->d_res2, b->atty, MOE__P(mc, hb->id_wo), N, d, d));
        MOE__TRY(moe_attention_backward_cuda(c, mc->d_qkv, mc->d_atty, b->qkv, b->att, B, T, d, NH, mc->att_dot));
        if (g->pos == MOE_POS_ROPE) MOE__TRY(moe_rope_apply_cuda(c, mc->d_qkv, mc->rope, B, T, d, NH, 1));
        MOE__CUDA_TRY(c, cudaMemset(mc->d_ln, 0, Nd), "cudaMemset");
        MOE__TRY(moe_matmul_backward_cuda(c, mc->d_ln, MOE__G(mc, hb->id_qkv), NULL, mc->d_qkv, b->ln1, MOE__P(mc, hb->id_qkv), N, d, 3 * d));
        MOE__TRY(moe_rmsnorm_backward_cuda(c, mc->d_res, MOE__G(mc, hb->id_ln1), mc->d_ln, b->x, MOE__P(mc, hb->id_ln1), b->rstd1, N, d));
    }
    MOE__LAUNCH(c, embed_backward_wte, (long long)V * d, MOE__CUDA_BLOCK, MOE__G(mc, m->id_wte), mc->d_res, mc->inputs, N, V, d);
    if (m->id_wpe >= 0) MOE__LAUNCH(c, embed_backward_wpe, (long long)T * d, MOE__CUDA_BLOCK, MOE__G(mc, m->id_wpe), mc->d_res, B, T, d);
    return MOE_OK;
}

#undef MOE__P
#undef MOE__G
#undef MOE__TRY

#endif /* MOE_CUDA */
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
