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
@toc

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

