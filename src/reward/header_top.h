/* reward.h - v0.1.0 - MIT licence - reward models in one C99 header, built on moe.h:
   Bradley-Terry reward heads, Product-of-Experts length debiasing, post-hoc reward
   calibration (statsmodels-exact LOWESS, RC-LWR, RC-Mean, length penalty) and the metrics.

   Define MOE_IMPLEMENTATION and RWD_IMPLEMENTATION in exactly ONE .c (or .cpp) file:

       #define MOE_IMPLEMENTATION
       #define RWD_IMPLEMENTATION
       #include "reward.h"          // includes moe.h

   Other files include "reward.h" for the declarations only.

   ABOUT
   A teaching and reproduction library for the reward-modelling papers of the research line.
   The math, defaults and every code-vs-paper detail are in the project's
   methods/reward-methods.md (sections 0-2); this header cites those sections as "spec 2.4".
   Everything works on plain arrays that a user already has (scores, lengths, feature rows), so
   calibration and metrics need no model at all. The reward heads reuse moe.h's core: one
   moe_store per model (params, grads, AdamW moments), moe_adamw_step, moe_matmul_*,
   moe_activation_*, moe_rng and the one checkpoint format.

   QUICK START (calibrate your own reward model's scores, spec 2.3)

       double cal[2 * N];                 // pooled: chosen scores then rejected scores
       moe_err err;
       if (rwd_calibrate_lwr(cal, len, score, 2 * N, 1.0, 3, 1.0, &err) != MOE_OK)
           fprintf(stderr, "%s\n", err.msg);
       acc = rwd_pair_accuracy(cal, cal + N, N);

   QUICK START (train a Bradley-Terry reward head on feature rows, spec 0.1)

       rwd_head_config hc = rwd_head_config_default();  hc.d_in = D;
       rwd_train_config tc = rwd_train_config_default();
       moe_store S;  rwd_head H;
       moe_store_init(&S);
       rwd_head_init(&H, &hc, &S, "rm.", &err);      // declares tensors, sizes activations
       moe_store_alloc(&S, 1);
       rwd_head_init_weights(&H, &S, &rng);
       rwd_bt_train(&H, &S, x_chosen, x_rejected, NULL, n_pairs, &tc, &stats, &err);
       rwd_head_score(&H, &S, scores, x, n);

   Every function that can fail on user input returns a moe_status (0 = MOE_OK) and leaves a
   sentence, with the line number where there is one, in a moe_err the caller passes. The
   library never prints, never exits, never opens a pipe. Metrics return NaN where they are
   undefined (no pairs, constant input).

   BUILD OPTIONS (as moe.h's; "everywhere" = in every file that includes reward.h)
       RWD_IMPLEMENTATION   this file holds the implementation (with MOE_IMPLEMENTATION) (one file)
       RWD_STATIC           all reward.h functions static (use with MOE_STATIC)          (everywhere)
       RWDDEF               override the declaration qualifier                           (everywhere)
       MOE_NO_STDIO         also drops reward.h's FILE* readers and head save/load         (everywhere)
   Threads: OpenMP as in moe.h; every parallel loop owns its outputs (bit-identical results).

   CONVENTIONS
   - Scores, lengths and metrics are double; model parameters and features are float32
     (moe.h's store). Losses and metrics accumulate in double.
   - A pair set of N pairs is given as parallel arrays: chosen (w, "winner") and rejected
     (l, "loser"). Pooled arrays of 2N responses hold all chosen first, then all rejected.
   - Lengths are Unicode code points of the response (Python len(str)), spec 0.
   - Accuracy counts a tie (equal scores) as wrong, as RewardBench and the paper's code do.
   - BACKWARD FUNCTIONS ACCUMULATE (+=) INTO GRADIENTS, as in moe.h.

   TABLE OF CONTENTS (search for the anchor; it opens the section in both halves)
@toc

   Tests: tests/test_reward_text.c (1), tests/test_reward_calib.c (2-3),
   tests/test_reward_metrics.c (4, AlpacaEval and HH-RLHF data), tests/test_reward_model.c
   (5-7, finite differences and PyTorch goldens from tests/ref/reward_ref.py),
   tests/test_reward_examples.c (examples --quick). Benchmark: bench/lowess.c.

   LICENCE: MIT, at the end of the file.
*/
#ifndef RWD_H_INCLUDED
#define RWD_H_INCLUDED

#define RWD_VERSION_STRING "0.1.0"

#include "moe.h"
#ifndef MOE_NO_STDIO
#include <stdio.h>
#endif

#ifndef RWDDEF
#ifdef RWD_STATIC
#define RWDDEF static
#else
#define RWDDEF extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

