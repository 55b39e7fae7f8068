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
   Each section cites its paper by arXiv id and the official code it follows, and says where
   it departs from that code: Bradley-Terry reward heads (InstructGPT's loss, arXiv 2203.02155,
   in the form of TRL's RewardTrainer), Product-of-Experts length debiasing (Shen et al., arXiv
   2310.05199), post-hoc reward calibration (Huang et al., arXiv 2409.17407, with LOWESS as
   statsmodels computes it), RewardBench scoring (arXiv 2403.13787).
   Everything works on plain arrays that a user already has (scores, lengths, feature rows), so
   calibration and metrics need no model at all. The reward heads reuse moe.h's core: one
   moe_store per model (params, grads, AdamW moments), moe_adamw_step, moe_matmul_*,
   moe_activation_*, moe_rng and the one checkpoint format.

   QUICK START (calibrate your own reward model's scores with RC-LWR, arXiv 2409.17407)

       // score[2 * N]: your reward model's scores of N chosen responses, then of the N
       // rejected ones; len[2 * N]: the responses' lengths in code points
       double cal[2 * N];
       moe_err err;
       if (rwd_calibrate_lwr(cal, len, score, 2 * N, 1.0, 3, 1.0, &err) != MOE_OK)
           fprintf(stderr, "%s\n", err.msg);
       acc = rwd_pair_accuracy(cal, cal + N, N);     // calibrated pair accuracy

   QUICK START (train a Bradley-Terry reward head on feature rows)

       // x_chosen, x_rejected: (n_pairs, D) feature rows (rwd_featurize makes them from text)
       rwd_head_config hc = rwd_head_config_default();
       rwd_train_config tc = rwd_train_config_default();
       rwd_train_stats stats;
       moe_store S;  rwd_head H;  moe_rng rng;  moe_err err;
       hc.d_in = D;
       moe_rng_seed(&rng, 1);
       moe_store_init(&S);
       if (rwd_head_init(&H, &hc, &S, "rm.", &err) != MOE_OK) return 1;  // declares tensors
       if (moe_store_alloc(&S, 1) != MOE_OK) return 1;   // params + grads + Adam moments
       rwd_head_init_weights(&H, &S, &rng);
       if (rwd_bt_train(&H, &S, x_chosen, x_rejected, NULL, n_pairs, &tc, &stats, &err) != MOE_OK)
           return 1;                                      // err.msg says why
       rwd_head_score(&H, &S, scores, x, n);             // scores (n, double) of any n rows
       rwd_head_free(&H);  moe_store_free(&S);

   Both QUICK STARTs are tests/test_quickstart.c, which compiles them and checks that these
   lines are still its own.

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
   - Lengths are Unicode code points of the response (Python len(str)), as the calibration
     paper's official code counts them (its output_len_char).
   - Accuracy counts a tie (equal scores) as wrong, as RewardBench and the calibration code do.
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

