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
       1. text       >>rwd:text      UTF-8 code points, JSON parser, HH-RLHF pair reader
       2. lowess     >>rwd:lowess    LOWESS exactly as statsmodels (Cleveland 1979), fast + naive
       3. calib      >>rwd:calib     RC-LWR, RC-Mean, length penalty, pairs, sequences
                                     (arXiv 2409.17407)
       4. metrics    >>rwd:metrics   accuracy, RewardBench sections (arXiv 2403.13787),
                                     Spearman (Pearson, Kendall: moe.h), length diagnostics,
                                     AlpacaEval win rates
       5. features   >>rwd:features  hashed word/bigram features + length features of text;
                                     a trained moe.h language model's pooled hidden states
       6. head       >>rwd:head      linear/MLP reward head, Bradley-Terry loss, training,
                                     save/load
       7. poe        >>rwd:poe       Product-of-Experts length debiasing (arXiv 2310.05199)
       8. rows       >>rwd:rows      multi-objective rows from CSV / JSON Lines, NaN = missing
       9. armo       >>rwd:armo      ArmoRM: ridge per objective (official lambda choice),
                                     verbosity de-correlation, gating network (BT-trained)
      10. dpa        >>rwd:dpa       DPA directions, integer-weight prompts, best-of-n,
                                     Pareto front, hypervolume
      11. ssrm       >>rwd:ssrm      SSRM self-training loop over any pair model; head and
                                     gate adapters
      12. merge      >>rwd:merge     merging stores of one layout: linear, SLERP, task arithmetic,
                                     TIES, DARE, breadcrumbs (mergekit's formulas); per-tensor
                                     or per-block weights
      13. average    >>rwd:average   model averaging against the alignment tax: MA, part-wise,
                                     HMA and its searches (arXiv 2309.06256)
      14. rsf        >>rwd:rsf       rejection-sampling fine-tuning of moe.h's LM under a DPA
                                     direction (arXiv 2304.06767, 2402.18571)

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

/* ============================================================================================
   >>rwd:text  UTF-8 code points, JSON, HH-RLHF pairs
   ============================================================================================ */

/* Unicode code points in n bytes of UTF-8 (bytes that do not continue a sequence), which is
   Python's len(str) for valid UTF-8 and for the WTF-8 that rwd_json writes for lone surrogates. */
RWDDEF size_t rwd_utf8_length(const char *s, size_t n);

typedef enum rwd_json_type {
    RWD_JSON_NULL = 0, RWD_JSON_FALSE, RWD_JSON_TRUE, RWD_JSON_NUMBER, RWD_JSON_STRING,
    RWD_JSON_ARRAY, RWD_JSON_OBJECT
} rwd_json_type;

/* One value of a parsed document. Nodes live in one array; links are indices into it. */
typedef struct rwd_json_node {
    int type;       /* rwd_json_type                                                        */
    int line;       /* input line where the value starts, 1-based (for messages)            */
    double number;  /* RWD_JSON_NUMBER                                                      */
    size_t str;     /* RWD_JSON_STRING: offset of its decoded, NUL-terminated UTF-8 text     */
    size_t str_len; /*   in rwd_json.strings, and its length in bytes                        */
    size_t key;     /* member of an object: offset of its decoded key; (size_t)-1 otherwise  */
    size_t count;   /* ARRAY, OBJECT: number of children                                     */
    size_t first;   /* ARRAY, OBJECT: index of the first child; 0 = none (0 is the root)     */
    size_t next;    /* index of the next sibling; 0 = none                                  */
} rwd_json_node;

/* A parsed document; reuse one across many lines to keep its buffers. Zero it to start. */
typedef struct rwd_json {
    rwd_json_node *nodes; /* (n_nodes) nodes[0] is the root                                 */
    size_t n_nodes, cap_nodes;
    char *strings;        /* (n_strings) decoded strings and keys, each NUL-terminated       */
    size_t n_strings, cap_strings;
} rwd_json;

/* Parses one JSON value (RFC 8259, strict: no trailing commas, no comments, control bytes in
   strings rejected). Strings are decoded fully: every escape, \uXXXX with surrogate pairs to
   UTF-8; a lone surrogate is kept as its 3-byte WTF-8 form so code-point counts match Python.
   first_line: the line number of text[0] in the caller's file (errors cite it). */
RWDDEF moe_status rwd_json_parse(rwd_json *doc, const char *text, size_t len, int first_line, moe_err *err);
RWDDEF void rwd_json_free(rwd_json *doc);
RWDDEF const rwd_json_node *rwd_json_root(const rwd_json *doc);
RWDDEF const rwd_json_node *rwd_json_child(const rwd_json *doc, const rwd_json_node *n); /* or NULL */
RWDDEF const rwd_json_node *rwd_json_next(const rwd_json *doc, const rwd_json_node *n);  /* or NULL */
/* the member `key` of an object (the last one if repeated, as Python), or NULL */
RWDDEF const rwd_json_node *rwd_json_member(const rwd_json *doc, const rwd_json_node *obj, const char *key);
RWDDEF const char *rwd_json_string(const rwd_json *doc, const rwd_json_node *n); /* NULL unless STRING */

/* Preference pairs as text: a shared prompt (conversation so far) and two final responses. */
typedef struct rwd_text_pairs {
    char **prompt;   /* (n) NUL-terminated UTF-8, owned                          */
    char **chosen;   /* (n) the preferred final response                         */
    char **rejected; /* (n) the other final response                             */
    size_t n, cap;
} rwd_text_pairs; /* zero it to start */

RWDDEF moe_status rwd_text_pairs_add(rwd_text_pairs *p, const char *prompt, size_t prompt_len,
                                     const char *chosen, size_t chosen_len, const char *rejected,
                                     size_t rejected_len, moe_err *err); /* copies the texts */
RWDDEF void rwd_text_pairs_free(rwd_text_pairs *p);
/* HH-RLHF dialogue: offset of the final response, the text after the last "\n\nAssistant:"
   (its leading space included, as the data README counts it); 0 if there is no marker. */
RWDDEF size_t rwd_hh_response_offset(const char *dialogue, size_t len);
/* One HH-RLHF JSON line {"chosen": dialogue, "rejected": dialogue} appended to p: prompt = the
   chosen dialogue up to its final response. line_no is used in error messages. */
RWDDEF moe_status rwd_hh_parse_line(rwd_text_pairs *p, rwd_json *doc, const char *line, size_t len,
                                    int line_no, moe_err *err);
#ifndef MOE_NO_STDIO
/* Reads a whole (decompressed) HH-RLHF .jsonl stream; errors name the line. */
RWDDEF moe_status rwd_hh_read(rwd_text_pairs *p, FILE *f, moe_err *err);
/* Reads a whole stream into a NUL-terminated buffer the caller frees with free()/MOE_FREE. */
RWDDEF moe_status rwd_read_all(FILE *f, char **text, size_t *len, moe_err *err);
#endif

/* ============================================================================================
   >>rwd:lowess  LOWESS exactly as statsmodels computes it
   ============================================================================================
   Cleveland's robust locally weighted regression (W. S. Cleveland, "Robust Locally Weighted
   Regression and Smoothing Scatterplots", JASA 74(368), 1979): tricube weights, local lines,
   bisquare robustness passes. The calibration paper's RC-LWR (arXiv 2409.17407) calls
   statsmodels' implementation (statsmodels/nonparametric/_smoothers_lowess.pyx), whose window
   sliding, tie handling and stopping rule change the numbers; this follows that code.
   fit (n) = statsmodels.nonparametric.lowess(y, x, frac, it=iters, delta=0,
   return_sorted=False): the fitted value of every point, in input order. frac in (0, 1],
   iters >= 0 robustness passes after the first. Tied x values share one fit.
   Degenerate window (all k points at the query's x): the fit is the y of the first of those
   points in stable sorted order (statsmodels gets there through NaN weights and uses the first
   point of its own, unstable, argsort order).
   rwd_lowess works on distinct x values (tied points aggregated), in parallel over queries:
   O(distinct * window) per pass. rwd_lowess_naive is the line-by-line transcription, kept as
   the reference. Agreement with statsmodels: tests/test_reward_calib.c, bench/lowess.c. */

RWDDEF moe_status rwd_lowess(double *fit, const double *x, const double *y, size_t n, double frac,
                             int iters, moe_err *err);
RWDDEF moe_status rwd_lowess_naive(double *fit, const double *x, const double *y, size_t n,
                                   double frac, int iters, moe_err *err);

/* ============================================================================================
   >>rwd:calib  post-hoc reward calibration (Huang et al., arXiv 2409.17407, ICLR 2025)
   ============================================================================================
   r_cal = r - alpha * b(c): b is the average reward of responses with a similar
   characteristic c (length), estimated on the pooled chosen + rejected responses. RC-Mean is
   the paper's uniform local average, RC-LWR its locally weighted regression (>>rwd:lowess).
   Settings and lookups follow the official code (github.com/ZeroYuHuang/Reward-Calibration,
   src/calibrate_rewardbench.py and src/calibrate_alpacaeval.py); where this header departs
   from that code, the function's comment says so. */

/* RC-LWR curve for out-of-sample queries (the paper's AlpacaEval setting: the baseline's
   outputs are scored against a fit made without them). */
typedef struct rwd_lwr {
    double *x;   /* (n) distinct fitted x values, ascending */
    double *fit; /* (n) LOWESS fit at x[i]                  */
    size_t n;
} rwd_lwr;

RWDDEF moe_status rwd_lwr_fit(rwd_lwr *m, const double *x, const double *y, size_t n, double frac,
                              int iters, moe_err *err);
/* b(c): the fit at the smallest fitted x >= c (the official code's bisect_left step lookup);
   above the largest x, the last fit (the official code would index past its array).
   interpolate != 0: linear interpolation between the neighbours instead, constant outside the
   range. */
RWDDEF double rwd_lwr_predict(const rwd_lwr *m, double c, int interpolate);
RWDDEF void rwd_lwr_free(rwd_lwr *m);

/* RC-LWR in-sample (RewardBench setting): out[i] = r[i] - alpha * lowess(c, r)[i], n points
   (pool chosen then rejected). out may equal r. */
RWDDEF moe_status rwd_calibrate_lwr(double *out, const double *c, const double *r, size_t n,
                                    double frac, int iters, double alpha, moe_err *err);

/* RC-Mean (the paper's uniform local average) on N pairs: T = mean |c_w - c_l| / ratio;
   points pooled interleaved (w0, l0, w1, ...), shuffled with moe_rng(seed) if shuffle (the
   official code's shuffle is unseeded), stable-sorted by c. The window of c0 holds the points
   with |c - c0| <= T minus the last one in sorted order (the official code's slice end).
   A pair is calibrated only if both windows hold >= min_count points: r - alpha * mean(window).
   out_w/out_l may equal s_w/s_l. */
RWDDEF moe_status rwd_calibrate_mean(double *out_w, double *out_l, const double *s_w,
                                     const double *s_l, const double *c_w, const double *c_l,
                                     size_t n, double ratio, int min_count, double alpha,
                                     int shuffle, uint64_t seed, moe_err *err);

typedef enum rwd_cal_method {
    RWD_CAL_LWR = 0,     /* RC-LWR                                                         */
    RWD_CAL_MEAN,        /* RC-Mean                                                        */
    RWD_CAL_PENALTY,     /* r - penalty * text length (the paper's length-penalty baseline) */
    RWD_CAL_PENALTY_LWR, /* penalty, then RC-LWR on the penalised scores                    */
    RWD_CAL_PENALTY_MEAN /* penalty, then RC-Mean                                           */
} rwd_cal_method;

typedef struct rwd_cal_config {
    int method;      /* rwd_cal_method; RWD_CAL_LWR                                       */
    double frac;     /* LOWESS span, (0, 1]; 1.0 (RewardBench script)                       */
    int iters;       /* LOWESS robustness passes; 3 (statsmodels default)                   */
    double alpha;    /* strength; 1.0                                                      */
    double ratio;    /* RC-Mean threshold divisor; 4 (RewardBench)                          */
    int min_count;   /* RC-Mean minimum window; 20 (RewardBench)                            */
    int shuffle;     /* RC-Mean: shuffle before the stable sort; 1                          */
    uint64_t seed;   /* RC-Mean shuffle seed; 0                                            */
    double penalty;  /* length penalty per code point; 0.001                               */
} rwd_cal_config;

RWDDEF rwd_cal_config rwd_cal_config_default(void);
RWDDEF moe_status rwd_cal_config_check(const rwd_cal_config *c, moe_err *err);
/* Calibrates N pairs by c->method. c_w/c_l: characteristic (response length); t_w/t_l: the
   length the penalty uses (full chat-formatted text, as the official code), or NULL for c.
   Outputs may equal the score arrays. */
RWDDEF moe_status rwd_calibrate_pairs(double *out_w, double *out_l, const double *s_w,
                                      const double *s_l, const double *c_w, const double *c_l,
                                      const double *t_w, const double *t_l, size_t n,
                                      const rwd_cal_config *c, moe_err *err);
/* Several characteristics in sequence (the official code's feature list, e.g. length then
   markdown count, each with its alpha): feature f re-estimates b on the scores
   already calibrated for features 0..f-1, with alpha[f]. c_w[f], c_l[f]: (n) each. The
   penalty (if the method has one) is applied once, before the first feature. Unlike the
   paper's RC-Mean code, which re-reads the uncalibrated scores, RC-Mean chains too. */
RWDDEF moe_status rwd_calibrate_sequence(double *out_w, double *out_l, const double *s_w,
                                         const double *s_l, const double *const *c_w,
                                         const double *const *c_l, const double *alpha,
                                         int n_features, const double *t_w, const double *t_l,
                                         size_t n, const rwd_cal_config *c, moe_err *err);

/* ============================================================================================
   >>rwd:metrics  accuracy, RewardBench sections, correlations, length diagnostics, win rates
   ============================================================================================
   All return NaN where undefined (no pairs; a constant input for a correlation). */

RWDDEF double rwd_pair_accuracy(const double *s_w, const double *s_l, size_t n); /* ties wrong */
/* fraction with len_w > len_l: the "longer answer wins" baseline (ties wrong) */
RWDDEF double rwd_longer_wins_accuracy(const double *len_w, const double *len_l, size_t n);
/* accuracy on the pairs whose chosen response is strictly shorter; *n_sub gets their number */
RWDDEF double rwd_shorter_chosen_accuracy(const double *s_w, const double *s_l,
                                          const double *len_w, const double *len_l, size_t n,
                                          size_t *n_sub);
/* fraction of pairs whose correctness differs between two scorings (the paper's
   "preference changed") */
RWDDEF double rwd_preference_changed(const double *a_w, const double *a_l, const double *b_w,
                                     const double *b_l, size_t n);
/* Spearman's rho (average ranks for ties); Pearson and Kendall's tau-b are moe.h's moe_pearson
   and moe_kendall_tau (>>moe:closer_look) */
RWDDEF double rwd_spearman(const double *a, const double *b, size_t n);
/* Spearman between the lengths and the scores of all 2N responses (the paper's diagnostic) */
RWDDEF double rwd_length_correlation(const double *s_w, const double *s_l, const double *len_w,
                                     const double *len_l, size_t n);

/* RewardBench (Lambert et al., arXiv 2403.13787): four sections, each a weighted mean of
   subset accuracies with the leaderboard's fixed weights; overall = mean of the sections
   present, as the calibration paper's released notebook scores it (arXiv 2409.17407). The 2024 leaderboard also
   reported a score with the "prior sets" at weight 0.5 (divided by 4.5); that is not this. */
enum { RWD_SECTION_CHAT = 0, RWD_SECTION_CHAT_HARD, RWD_SECTION_SAFETY, RWD_SECTION_REASONING,
       RWD_N_SECTIONS };
RWDDEF const char *rwd_section_name(int section); /* "chat", "chat_hard", "safety", "reasoning" */
/* section of a RewardBench subset and its weight; returns -1 (weight 0) for other names */
RWDDEF int rwd_rewardbench_subset(const char *name, double *weight);
/* per-subset accuracy: subset[i] in [0, n_subsets) names pair i's subset; acc (n_subsets) gets
   each subset's accuracy (NaN if empty), count (may be NULL) its number of pairs */
RWDDEF moe_status rwd_subset_accuracy(double *acc, size_t *count, const int *subset, const double *s_w,
                                      const double *s_l, size_t n, int n_subsets, moe_err *err);
/* section[4] (NaN where no subset of it is present) and *overall from per-subset accuracies */
RWDDEF void rwd_rewardbench_scores(double *section, double *overall, const char *const *names,
                                   const double *acc, size_t n_subsets);

/* AlpacaEval raw metrics of one model against the reference, as AlpacaEval's get_winrate
   computes them (github.com/tatsu-lab/alpaca_eval, src/alpaca_eval/metrics/winrate.py); its
   length-controlled win rate (Dubois et al., arXiv 2404.04475) needs fitted weights that are
   not part of the annotations, so it is not here. */
typedef struct rwd_winrate {
    double win_rate;          /* 100 * mean(p), p = preference - 1 (a stored 0 is a draw)     */
    double standard_error;    /* 100 * std(p, ddof=1) / sqrt(n)                                */
    double discrete_win_rate; /* (wins + draws/2) / n * 100                                    */
    double avg_length;        /* floor(mean code points of the model's outputs)                */
    int n_wins, n_wins_base, n_draws, n_total;
} rwd_winrate;

/* preference (n) in [1, 2] or 0; length (n) of the model's outputs (may be NULL) */
RWDDEF moe_status rwd_winrate_compute(rwd_winrate *w, const double *preference, const double *length,
                                      size_t n, moe_err *err);
/* the same from an AlpacaEval annotations.json text (array of objects with "preference" and
   "output_2"); errors name the line */
RWDDEF moe_status rwd_winrate_from_annotations(rwd_winrate *w, const char *json, size_t len,
                                               moe_err *err);


/* ============================================================================================
   >>rwd:features  hashed word/bigram features of text + explicit length features
   ============================================================================================
   out = [ hashed bag of words and word bigrams of the response (and optionally of the prompt,
   in its own hash namespace), scaled by 1/sqrt(#tokens) so its norm does not grow with length |
   log(1 + len), len / 1000 ] with len = code points of the response: this header's stand-in
   for a language model's input, so that the PoE bias expert of Shen et al. (arXiv 2310.05199),
   which sees token embeddings there, can see length here (>>rwd:poe). Words are
   maximal runs of ASCII letters/digits (lower-cased) and non-ASCII bytes. Signed hashing:
   each feature adds +1 or -1 by a hash bit, so collisions cancel on average. */

typedef struct rwd_featurizer {
    int dim;             /* hashed buckets; 4096                                        */
    int bigrams;         /* also hash word bigrams; 1                                   */
    int prompt_words;    /* also hash the prompt's words; 0 (a linear head cancels them) */
    int signed_hash;     /* +-1 by a hash bit; 1                                        */
    int length_features; /* append the 2 length features; 1                             */
    uint32_t seed;       /* hash seed; 0                                                */
} rwd_featurizer;

RWDDEF rwd_featurizer rwd_featurizer_default(void);
RWDDEF int rwd_featurizer_width(const rwd_featurizer *f); /* dim + 2 * length_features */
RWDDEF void rwd_length_features(float *out2, double len); /* log(1 + len), len / 1000   */
/* out (width) = features of (prompt, response); prompt may be NULL */
RWDDEF void rwd_featurize(float *out, const rwd_featurizer *f, const char *prompt, const char *response);
/* x_w, x_l (n, width) for every pair; len_w, len_l (n) code points (either may be NULL).
   Parallel over pairs. */
RWDDEF moe_status rwd_featurize_pairs(float *x_w, float *x_l, double *len_w, double *len_l,
                                      const rwd_featurizer *f, const rwd_text_pairs *p, moe_err *err);
/* The bridge to moe.h's language model: out (d) = the mean over the response's bytes of the
   model's final normalised hidden states (m->lnf), the prompt's bytes read as context before
   them; only the last max_T bytes fit the window, so a long prompt is cut from the left and a
   response longer than max_T keeps its last max_T bytes. The model must have max_B >= 1 and a
   byte vocabulary (256). Calls moe_model_forward: the model's last batch is overwritten. */
RWDDEF moe_status rwd_lm_features(float *out, moe_model *m, const char *prompt, const char *response, moe_err *err);
/* x_w, x_l (n, d): rwd_lm_features of every pair (serial: one model, one forward at a time) */
RWDDEF moe_status rwd_lm_featurize_pairs(float *x_w, float *x_l, moe_model *m, const rwd_text_pairs *p, moe_err *err);

/* ============================================================================================
   >>rwd:head  reward heads on feature rows, Bradley-Terry loss and training
   ============================================================================================
   linear: r = x . w1^T                             w1 (1, d_in)
   MLP:    r = act(x . w1^T + b1) . w2^T            w1 (H, d_in), b1 (H), w2 (1, H)
   No output bias (as Hugging Face's reward score head): it cancels in every BT margin, and
   Adam would only amplify the rounding noise of its ~0 gradient.
   The tensors live in a caller's moe_store (prefix + "w1" ...); weights decay, biases do not.
   BT loss of B pairs with margins m and centering coefficient c: the reward-model loss of
   InstructGPT (Ouyang et al., arXiv 2203.02155) as TRL's RewardTrainer computes it
   (github.com/huggingface/trl, trl/trainer/reward_trainer.py), whose centering term is from
   Eisenstein et al. (arXiv 2312.09244); note it squares the SUM of a pair's two rewards:
     L = -(1/B) sum log sigmoid(r_w - r_l - m) + c (1/B) sum (r_w + r_l)^2
   Pairs are batched as 2B rows: B chosen rows, then B rejected rows. */

typedef enum rwd_head_kind { RWD_HEAD_LINEAR = 0, RWD_HEAD_MLP = 1 } rwd_head_kind;

typedef struct rwd_head_config {
    int kind;       /* rwd_head_kind; RWD_HEAD_LINEAR                                      */
    int d_in;       /* feature width (required)                                           */
    int d_hidden;   /* MLP hidden width H; 64                                              */
    int activation; /* moe_activation of the MLP; MOE_ACT_GELU                              */
    int max_rows;   /* rows one forward may take (activations are sized for it); 512        */
    float init_std; /* weights ~ N(0, init_std^2), biases 0; 0.02                          */
} rwd_head_config;

typedef struct rwd_head {
    rwd_head_config cfg;
    int id_w1, id_b1, id_w2;        /* tensor ids in the store (-1 where absent)              */
    float *pre;                     /* (max_rows, H) MLP pre-activation, cached by forward     */
    float *hid;                     /* (max_rows, H) MLP activation, cached by forward         */
    float *dhid;                    /* (max_rows, 2H) backward scratch                         */
    moe_work work;                  /* the matmuls' scratch for max_rows, sized at init        */
} rwd_head;

RWDDEF rwd_head_config rwd_head_config_default(void);
/* declares the head's tensors in s (before moe_store_alloc) and allocates its activations and
   scratch (forward and backward then allocate nothing); on failure h is freeable */
RWDDEF moe_status rwd_head_init(rwd_head *h, const rwd_head_config *c, moe_store *s, const char *prefix, moe_err *err);
RWDDEF void rwd_head_init_weights(rwd_head *h, moe_store *s, moe_rng *rng);
RWDDEF void rwd_head_free(rwd_head *h);
/* r (rows) = head(x (rows, d_in)), rows <= max_rows; caches activations for backward */
RWDDEF void rwd_head_forward(rwd_head *h, const moe_store *s, float *r, const float *x, int rows);
/* ACCUMULATES parameter gradients into s->grads and, if dx != NULL, dx (rows, d_in) += dL/dx,
   given dr (rows) = dL/dr; uses the caches of the last forward (same x, same rows). */
RWDDEF void rwd_head_backward(rwd_head *h, moe_store *s, float *dx, const float *dr, const float *x, int rows);
/* scores of any number of rows (chunks of max_rows), as doubles for the metrics */
RWDDEF void rwd_head_score(rwd_head *h, const moe_store *s, double *r, const float *x, size_t rows);

/* L of B pairs (margin may be NULL: 0); *n_correct (may be NULL) counts r_w > r_l */
RWDDEF double rwd_bt_loss_forward(const float *r_w, const float *r_l, const float *margin, int B,
                                  float center, int *n_correct);
/* dr_w, dr_l (B) += dL/dr_w, dL/dr_l */
RWDDEF void rwd_bt_loss_backward(float *dr_w, float *dr_l, const float *r_w, const float *r_l,
                                 const float *margin, int B, float center);

typedef struct rwd_train_config {
    int epochs;         /* passes over the pairs; 10                                         */
    int batch;          /* pairs per step (2 * batch <= the head's max_rows); 32               */
    float lr;           /* peak learning rate (main expert for PoE); 3e-3                      */
    float lr_min;       /* cosine floor at the last step; 3e-4                                 */
    int warmup;         /* linear warm-up steps; 0                                             */
    float weight_decay; /* AdamW decoupled decay of the weights; 0.01                          */
    float center;       /* centering coefficient c (TRL recommends 0.01); 0                     */
    float clip;         /* global gradient-norm clip, 0 = off; 0                               */
    uint64_t seed;      /* shuffling and PoE noise; 1                                          */
    float bias_lr;      /* PoE: the bias expert's peak learning rate (larger, as the paper); 1e-2 */
    float noise_std;    /* PoE: s of the N(0, s^2) noise on the bias expert's inputs; 0.1, about
                           one hashed word feature (rwd_featurize scales them by 1/sqrt(words)) */
    int noise_cols;     /* PoE: noise goes to the first noise_cols input columns (the hashed
                           words), < 0 = all; -1. See the PoE section for why length stays clean */
} rwd_train_config;

typedef struct rwd_train_stats {
    double loss;      /* mean loss over the last epoch (PoE: of the product)                  */
    double accuracy;  /* training accuracy over the last epoch (PoE: of the product)          */
    long long steps;  /* optimizer steps taken                                                */
} rwd_train_stats;

RWDDEF rwd_train_config rwd_train_config_default(void);
/* Trains h (its store s allocated with optimizer moments) on n pairs of feature rows x_w, x_l
   (n, d_in) with optional margins (n): shuffled mini-batches, AdamW, warm-up + cosine. */
RWDDEF moe_status rwd_bt_train(rwd_head *h, moe_store *s, const float *x_w, const float *x_l,
                               const float *margin, size_t n, const rwd_train_config *tc,
                               rwd_train_stats *stats, moe_err *err);
#ifndef MOE_NO_STDIO
/* one checkpoint format (moe.h): a head's parameters with its shape (kind, d_in, d_hidden,
   activation) as the config blob. Load needs a head set up with the same shape; it checks. */
RWDDEF moe_status rwd_head_save(const rwd_head *h, const moe_store *s, const char *path, moe_err *err);
RWDDEF moe_status rwd_head_load(rwd_head *h, moe_store *s, const char *path, moe_err *err);
#endif

/* ============================================================================================
   >>rwd:poe  Product-of-Experts length debiasing
   ============================================================================================
   Shen et al., "Loose lips sink ships: Mitigating Length Bias in Reinforcement Learning from
   Human Feedback", arXiv 2310.05199 (Findings of EMNLP 2023); no official code was found.
   The paper's experts are language models (the bias expert a small one with noise on its
   token embeddings); here both are reward heads on feature rows (>>rwd:head).
   A main expert r_m and a bias expert r_b trained jointly on the product's BT probability:
     L = -(1/B) sum log sigmoid((r_m(w) + r_b(w)) - (r_m(l) + r_b(l)))
   Both get the same gradient per pair, -sigmoid(-(D_m + D_b)) / B, so pairs the bias expert
   already explains (length) teach the main expert little. The bias expert sees its inputs plus
   fresh N(0, s^2) noise every step and learns with its own, larger rate; at inference only the
   main expert is used. Which columns get noise matters: in the paper the noise is on token
   embeddings, and length survives it structurally (the token count). Noise on a length
   FEATURE instead acts as a ridge penalty on the bias expert's length weight, which then moves
   to the noise-free main expert: the opposite of debiasing (tests/test_reward_model.c shows
   it). So with featurizer rows [hashed words | length], set noise_cols = the hashed width. */

RWDDEF double rwd_poe_loss_forward(const float *rm_w, const float *rm_l, const float *rb_w,
                                   const float *rb_l, int B, int *n_correct);
/* drm_*, drb_* (B) += dL/dr of each expert */
RWDDEF void rwd_poe_loss_backward(float *drm_w, float *drm_l, float *drb_w, float *drb_l,
                                  const float *rm_w, const float *rm_l, const float *rb_w,
                                  const float *rb_l, int B);
/* xb_w, xb_l (n, bias->cfg.d_in): the bias expert's features (may be x_w, x_l). Each store
   has its own AdamW step: lr for the main expert, bias_lr for the bias expert. */
RWDDEF moe_status rwd_poe_train(rwd_head *main_head, moe_store *sm, rwd_head *bias_head,
                                moe_store *sb, const float *x_w, const float *x_l,
                                const float *xb_w, const float *xb_l, size_t n,
                                const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err);


/* ============================================================================================
   >>rwd:rows  multi-objective rows from CSV or JSON Lines; missing values are NaN
   ============================================================================================
   Absolute-rating data sets rate each response on only some objectives (ArmoRM's mix, arXiv
   2406.12845 section 3: HelpSteer rates five, BeaverTails only safety), so a missing value is
   data, not an error. The caller names the columns it wants: numbers (NaN where missing) and
   texts. Missing number: an empty CSV field, NA, NaN, nan, null; in JSON null or an absent
   key (true/false read as 1/0, as is_safe labels are). Anything else that is not a finite
   number fails with its line, column number and column name. */

typedef struct rwd_rows {
    int n_num, n_text; /* columns read as numbers, as texts                                   */
    double *num;       /* (n, n_num) row-major; NaN where a value is missing                   */
    char **text;       /* (n, n_text) owned NUL-terminated UTF-8 (NULL when n_text == 0)        */
    int *line;         /* (n) the input line where each row starts                             */
    size_t n, cap;
} rwd_rows; /* zero it to start; rows are appended, so one rwd_rows can gather several files */

/* CSV (RFC 4180: comma separated, double quotes, "" inside quotes, quoted newlines; \r\n or \n;
   blank lines skipped) with a header line naming the columns; extra columns are ignored. */
RWDDEF moe_status rwd_rows_parse_csv(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                     int n_num, const char *const *text_cols, int n_text, moe_err *err);
/* JSON Lines: one object per line; a text column must be a string member of every object. */
RWDDEF moe_status rwd_rows_parse_jsonl(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                       int n_num, const char *const *text_cols, int n_text, moe_err *err);
RWDDEF void rwd_rows_free(rwd_rows *r);

/* ============================================================================================
   >>rwd:armo  ArmoRM: multi-objective ridge regression, verbosity de-correlation, gating network
   ============================================================================================
   Absolute-Rating Multi-Objective Reward Model (Wang et al., arXiv 2406.12845), on feature rows
   h(x, y) (d) of responses and h_x (d_prompt) of prompts: any float rows (the hashed featurizer,
   moe.h's LM bridge, a user's embeddings).

   Stage 1 (section 3.1): one ridge regression per objective k, no intercept, on the rows whose
     target k is present (NaN = missing):  w_k = argmin sum (w.h_n - t_nk)^2 + lambda_k |w|^2.
     lambda_k as the official code chooses it: one random 80/20 split of all rows, every lambda of
     the grid {1e-4 .. 1e4} fitted on the 80%, the lowest validation MSE wins (the first on ties),
     and the final w_k is that fit (on the 80% only, as the code; not refitted on all rows).
     Rewards r(x, y) = W h (K). With fewer rows than features the ridge solution is still unique
     for lambda > 0; it is computed in the dual, w = H^T (H H^T + lambda I)^-1 t.
   Verbosity de-correlation (official stage-2 code): on the rewards V (M, K) of reference
     responses, every objective j != v starts open with p_j = 1; for each penalty of the grid
     {0, .01, .025, .05, .075, .1, .125, .15, .2, .25, ..., .95} in order, an open j whose
     Spearman(V_j - p V_v, V_v) <= 0.03 closes with p_j = p. Never closed: p_j = 1 (and p_v = 1).
     r~_j = r_j - p_j r_v, so r~_v = 0.
   Stage 2 (section 3.2): gate g(x) = beta softmax(z(h_x) / tau), z an MLP (Linear-ReLU-dropout
     x n_hidden, then Linear with bias) on the prompt's features, tau = 10, beta a learned scalar
     (1 at start); score s = g . r~. Trained with the Bradley-Terry loss -log sigmoid(s_w - s_l)
     on preference pairs: batches drawn with replacement, AdamW, cosine annealing to 0.
   Where the official code differs from the paper: its stage-2 script takes the softmax over
   dim 1 of (batch, 2, d) prompt embeddings, i.e. over the chosen/rejected pair, so every gate
   is beta/2 and only beta learns; we take it over the objectives, as the paper says. The same
   script builds r~ but trains on the raw rewards r; the released model applies r~ at
   inference. Default here: train and infer on r~ (gate_on_raw = 1 selects the script's r). */

#define RWD_RIDGE_MAX_LAMBDAS 16
#define RWD_GATE_MAX_HIDDEN 8
#define RWD_ARMO_CORR_THRESHOLD 0.03 /* stage-2 script's command-line default (its function: 0.028) */

typedef struct rwd_ridge_config {
    int n_lambdas;                          /* grid size; 9                                      */
    double lambdas[RWD_RIDGE_MAX_LAMBDAS];  /* tried in order; 1e-4, 1e-3, ..., 1e4             */
    double val_frac;                        /* validation share of the rows (ceil); 0.2          */
    uint64_t seed;                          /* the split's shuffle; 42                            */
    const unsigned char *val_mask;          /* (n) optional: 1 = validation row; overrides the
                                               random split (e.g. to use someone else's split)  */
    double fixed_lambda;                    /* > 0: no search, fit every labelled row at this
                                               lambda; 0                                         */
} rwd_ridge_config;

typedef struct rwd_ridge_report {           /* one objective of rwd_armo_regress                 */
    double lambda;                          /* the lambda used                                   */
    size_t n_train, n_val;                  /* labelled rows fitted / validated                  */
    double val_mse;                         /* at lambda (NaN with fixed_lambda)                  */
    double grid_mse[RWD_RIDGE_MAX_LAMBDAS]; /* validation MSE of every lambda of the grid        */
    int underdetermined;                    /* n_train < d: ridge still unique, solved in dual    */
    char note[192];                         /* a sentence when underdetermined, else ""          */
} rwd_ridge_report;

RWDDEF rwd_ridge_config rwd_ridge_config_default(void);
/* w (d) = argmin sum_i (x_i . w - t_i)^2 + lambda |w|^2 over the rows with a finite t_i, no
   intercept; x (n, d). Primal Cholesky when rows >= d, dual otherwise; double throughout. */
RWDDEF moe_status rwd_ridge_solve(double *w, const float *x, const double *t, size_t n, int d, double lambda,
                                  moe_err *err);
/* Stage 1: W (K, d) and one report per objective (rep may be NULL) from x (n, d) and targets
   y (n, K) with NaN for missing ratings. */
RWDDEF moe_status rwd_armo_regress(float *W, rwd_ridge_report *rep, const float *x, const double *y, size_t n,
                                   int d, int K, const rwd_ridge_config *c, moe_err *err);
/* r (rows, K) = x (rows, d) . W^T, in double */
RWDDEF void rwd_armo_rewards(double *r, const float *W, const float *x, size_t rows, int d, int K);
/* penalty (K) and corr (K, may be NULL: each objective's Spearman when it closed, else the
   lowest seen, 1 for v) from reference rewards V (M, K); v = the verbosity objective. */
RWDDEF moe_status rwd_armo_verbosity_penalties(double *penalty, double *corr, const double *V, size_t M, int K,
                                               int v, double threshold, moe_err *err);
/* out (rows, K) = r~: out_j = r_j - penalty_j r_v (out may be r); v < 0 copies */
RWDDEF void rwd_armo_transform(double *out, const double *r, const double *penalty, size_t rows, int K, int v);

/* ---- the gating network ---- */
typedef struct rwd_gate_config {
    int d_in;          /* prompt feature width (required)                                    */
    int K;             /* objectives (required)                                              */
    int n_hidden;      /* Linear-ReLU(-dropout) layers before the output layer; 3            */
    int d_hidden;      /* their width; 1024                                                  */
    float temperature; /* tau; 10                                                            */
    float logit_scale; /* beta's initial value; 1                                           */
    float dropout;     /* after every ReLU, in training only; 0.2                              */
    int max_rows;      /* rows one forward may take (activations are sized for it); 1024       */
} rwd_gate_config;

typedef struct rwd_gate {
    rwd_gate_config cfg;
    int id_w[RWD_GATE_MAX_HIDDEN + 1], id_b[RWD_GATE_MAX_HIDDEN + 1]; /* layer tensors in the store */
    int id_scale;  /* beta (1)                                                               */
    float *pre;    /* (n_hidden, max_rows, H) pre-activations                                 */
    float *post;   /* (n_hidden, max_rows, H) layer outputs after ReLU and dropout             */
    float *mask;   /* (n_hidden, max_rows, H) dropout scale (0 or 1/(1-p)) of the last forward */
    float *probs;  /* (max_rows, K) softmax(z / tau)                                          */
    float *dz;     /* (max_rows, max(H, K)) each, dz and dh: backward scratch                 */
    float *dh;
    moe_work work;    /* the matmuls' scratch for max_rows, sized at init                      */
    int last_dropout; /* the last forward used dropout                                        */
} rwd_gate;

RWDDEF rwd_gate_config rwd_gate_config_default(void);
/* declares the gate's tensors in s (prefix + "l0.w", ..., "out.w", "out.b", "logit_scale")
   before moe_store_alloc, and allocates its activations */
RWDDEF moe_status rwd_gate_init(rwd_gate *g, const rwd_gate_config *c, moe_store *s, const char *prefix, moe_err *err);
/* PyTorch nn.Linear's default: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); beta */
RWDDEF void rwd_gate_init_weights(rwd_gate *g, moe_store *s, moe_rng *rng);
RWDDEF void rwd_gate_free(rwd_gate *g);
/* gates (rows, K) = g(x (rows, d_in)), rows <= max_rows; dropout_rng NULL = evaluation */
RWDDEF void rwd_gate_forward(rwd_gate *g, const moe_store *s, float *gates, const float *x, int rows, moe_rng *dropout_rng);
/* ACCUMULATES parameter gradients into s->grads and dx (may be NULL) given dgates (rows, K);
   uses the caches of the last forward (same x, same rows) */
RWDDEF void rwd_gate_backward(rwd_gate *g, moe_store *s, float *dx, const float *dgates, const float *x, int rows);

typedef struct rwd_gate_train_config {
    int steps;          /* optimizer steps; 2000                                             */
    int batch;          /* pairs per step, drawn with replacement (<= max_rows); 1024          */
    float lr;           /* AdamW; 1e-3                                                       */
    float lr_min;       /* cosine annealing floor; 0                                         */
    float weight_decay; /* 0                                                                 */
    uint64_t seed;      /* batches and dropout; 0                                            */
} rwd_gate_train_config;

RWDDEF rwd_gate_train_config rwd_gate_train_config_default(void);
/* BT loss of the margins g(x_i) . (r_w_i - r_l_i) over pairs i: x (n, d_in) prompt rows,
   r_w, r_l (n, K) the (transformed) rewards of the chosen and rejected responses. stats: loss
   and accuracy over the last 100 steps' batches (may be NULL). */
RWDDEF moe_status rwd_gate_train(rwd_gate *g, moe_store *s, const float *x, const double *r_w, const double *r_l,
                                 size_t n, const rwd_gate_train_config *tc, rwd_train_stats *stats, moe_err *err);
/* the BT loss and its gradient dgates (B, K) (overwritten) of B pairs given their gates */
RWDDEF double rwd_gate_bt_loss(float *dgates, const float *gates, const double *r_w, const double *r_l, int B, int K,
                               int *n_correct);

/* ---- the whole model ---- */
typedef struct rwd_armo {
    int K, d, verbosity; /* objectives, response feature width, verbosity objective (-1: none) */
    float *W;            /* (K, d) stage-1 regression weights                                 */
    double *penalty;     /* (K) verbosity penalties (all 0 until fitted: r~ = r)                */
    int gate_on_raw;     /* the gate was trained on r, not r~ (the stage-2 script's variant)    */
    rwd_gate gate;       /* stage 2, in its own store                                          */
    moe_store store;
    double *scratch;     /* (max_rows, 2K) inference scratch                                  */
    float *gscratch;     /* (max_rows, K)                                                     */
} rwd_armo;

/* K objectives, d response features; gc->d_in = prompt features, gc->K is set to K */
RWDDEF moe_status rwd_armo_init(rwd_armo *m, int K, int d, int verbosity, const rwd_gate_config *gc, uint64_t seed,
                                moe_err *err);
RWDDEF void rwd_armo_free(rwd_armo *m);
RWDDEF moe_status rwd_armo_fit_regression(rwd_armo *m, rwd_ridge_report *rep, const float *x, const double *y,
                                          size_t n, const rwd_ridge_config *c, moe_err *err);
/* penalties from the rewards of M reference responses x_ref (M, d) (the paper: every chosen
   and rejected response of a preference set); corr (K) may be NULL */
RWDDEF moe_status rwd_armo_fit_verbosity(rwd_armo *m, double *corr, const float *x_ref, size_t M, double threshold,
                                         moe_err *err);
/* stage 2 on n pairs: prompt rows xp (n, d_in), responses x_w, x_l (n, d); on_raw = 1 trains
   on r as the stage-2 script does (inference then uses r too) */
RWDDEF moe_status rwd_armo_fit_gate(rwd_armo *m, const float *xp, const float *x_w, const float *x_l, size_t n,
                                    const rwd_gate_train_config *tc, int on_raw, rwd_train_stats *stats, moe_err *err);
/* per response: score (rows), rewards (rows, K) = r (raw, may be NULL), gates (rows, K) (may be
   NULL); x (rows, d) responses, xp (rows, d_in) their prompts */
RWDDEF moe_status rwd_armo_infer(rwd_armo *m, double *score, double *rewards, double *gates, const float *x,
                                 const float *xp, size_t rows, moe_err *err);
/* the rewards the gate mixes: r~ (or r with gate_on_raw), (rows, K) */
RWDDEF void rwd_armo_mixed_rewards(const rwd_armo *m, double *out, const float *x, size_t rows);

/* ============================================================================================
   >>rwd:dpa  directional preferences (DPA), best-of-n, Pareto fronts, hypervolume
   ============================================================================================
   Directional Preference Alignment (Wang et al., arXiv 2402.18571, section 3): a user's
   preference is a unit vector v in the space of K reward objectives and the user's reward is
   the projection R_v = v . r. With two objectives (helpfulness, verbosity) v = (cos t, sin t).
   The released DPA model reads v from its system prompt as integers, round(100 v_k) with numpy's
   rounding (half to even), "... maximize weighted rating = helpfulness*{W_h} + verbosity*{W_b}".
   Rejection sampling under a direction keeps the best of n responses by v . r. Fronts and the
   hypervolume compare what a set of directions can reach: every objective is maximised. */

/* v (k) = u / |u|; a zero (or non-finite) u is an error: it states no preference */
RWDDEF moe_status rwd_dpa_direction(double *v, const double *u, int k, moe_err *err);
RWDDEF void rwd_dpa_direction_angle(double v[2], double theta); /* (cos theta, sin theta), radians */
RWDDEF double rwd_dpa_scalarize(const double *v, const double *r, int k); /* v . r */
/* w (k) = round-half-even(100 v_k) of v as given (not renormalised: the caller's v is the
   direction; the official prompts use v = (cos t, sin t)) */
RWDDEF moe_status rwd_dpa_weights(int *w, const double *v, int k, moe_err *err);
/* the direction an integer-weight prompt states: w / |w| */
RWDDEF moe_status rwd_dpa_weights_direction(double *v, const int *w, int k, moe_err *err);
/* the official DPA system prompt for (W_h, W_b); returns MOE_ERR_INVALID_ARG if cap is short */
RWDDEF moe_status rwd_dpa_system_prompt(char *out, size_t cap, int w_helpfulness, int w_verbosity, moe_err *err);
/* *best = argmax_j v . r_j over n candidates r (n, k) (ties to the lower index) */
RWDDEF moe_status rwd_dpa_best_of_n(size_t *best, const double *v, const double *r, size_t n, int k, moe_err *err);
/* idx gets the non-dominated points of pts (n, k) in increasing index order, *n_front their
   number: p dominates q when p >= q everywhere and p > q somewhere, so equal points all stay */
RWDDEF moe_status rwd_pareto_front(size_t *idx, size_t *n_front, const double *pts, size_t n, int k, moe_err *err);
/* *hv = the volume dominated by pts (n, k) and dominating ref (k): the union of the boxes
   [ref, p]. Points not above ref in every objective add nothing. Exact, by slicing along the
   last objective (a sweep for k = 2): O(n^(k-1) log n), for k <= 4 and fronts of thousands. */
RWDDEF moe_status rwd_hypervolume(double *hv, const double *pts, size_t n, int k, const double *ref, moe_err *err);

/* ============================================================================================
   >>rwd:ssrm  semi-supervised reward modelling by iterative self-training (SSRM)
   ============================================================================================
   SSRM (He et al., arXiv 2409.06903, section 3): train on the labelled pairs D_l; then each
   round (1) pseudo-label every unlabelled pair (a, b) with the current model, (2) keep it if its
   confidence max(P, 1 - P) is above the threshold (0.8 in the released script, strictly
   greater), (3) fine-tune on D_l plus the kept pairs, continuing from the current model.
   With a scalar reward model P(a > b) = sigmoid(r(a) - r(b)). The loop drives any model through
   rwd_pair_model: the linear and MLP heads and ArmoRM's gate have ready-made adapters below.
   Where the released script differs: it keeps the confident pairs but trains them in the data
   set's own chosen/rejected order, i.e. with the true label even when the pseudo-label is wrong
   (which is not semi-supervised). The default trains on the pseudo-labels, as the paper says;
   keep_true_order = 1 reproduces the script (it needs the true labels). */

typedef struct rwd_pair_model {
    void *ctx;
    /* p (count) = P(side a of pair idx[i] is preferred), i < count */
    moe_status (*prob)(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err);
    /* train (round 0: from the start; later rounds: continue) on pairs idx with a_wins[i] = 1
       when side a is the preferred one */
    moe_status (*train)(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err);
    /* optional: a number recorded after every round (e.g. held-out accuracy); NULL = none */
    double (*evaluate)(void *eval_ctx);
    void *eval_ctx;
} rwd_pair_model;

typedef struct rwd_ssrm_config {
    int rounds;          /* self-training rounds after the supervised start; 3                */
    double threshold;    /* keep a pseudo-label when max(P, 1-P) > threshold, in (0.5, 1]; 0.8 */
    int keep_true_order; /* 1: the released script's variant (needs the true labels); 0        */
} rwd_ssrm_config;

typedef struct rwd_ssrm_round {
    int round;              /* 0 = supervised on the labelled pairs only                      */
    size_t trained;         /* pairs trained on this round (labelled + kept)                   */
    size_t kept;            /* confident pseudo-labelled pairs (0 in round 0)                   */
    double kept_fraction;   /* kept / unlabelled                                              */
    double mean_confidence; /* mean max(P, 1-P) over the unlabelled pairs                      */
    double pseudo_accuracy; /* pseudo-labels that match the true label, all unlabelled (NaN if
                               the truth is not given)                                          */
    double kept_accuracy;   /* the same over the kept pairs (NaN if none or no truth)           */
    double eval;            /* evaluate() after this round's training (NaN without one)         */
} rwd_ssrm_round;

RWDDEF rwd_ssrm_config rwd_ssrm_config_default(void);
/* Runs round 0 and c->rounds rounds; stats (rounds + 1, may be NULL). lab (n_lab) pair ids with
   labels lab_a_wins; unl (n_unl) pair ids, unl_truth (n_unl) their hidden labels or NULL. */
RWDDEF moe_status rwd_ssrm_run(rwd_pair_model *m, const size_t *lab, const unsigned char *lab_a_wins, size_t n_lab,
                               const size_t *unl, const unsigned char *unl_truth, size_t n_unl,
                               const rwd_ssrm_config *c, rwd_ssrm_round *stats, moe_err *err);

/* Adapter: a reward head (linear or MLP) on pairs of feature rows x_a, x_b (n, d_in). Each
   training call runs rwd_bt_train on the gathered pairs (its own cosine schedule, continuing
   from the current weights). */
typedef struct rwd_ssrm_head {
    rwd_head *head;
    moe_store *store;
    const float *x_a, *x_b;  /* (n, head->cfg.d_in) the two sides of every pair in the pool */
    size_t n;
    rwd_train_config tc;     /* per-round training */
    int min_steps;           /* > 0: more epochs when a round's pairs make fewer optimizer
                                steps than this (a small labelled set still converges)       */
    float *buf;              /* owned gather buffer; rwd_ssrm_head_free releases it          */
    size_t buf_pairs;
} rwd_ssrm_head;
RWDDEF rwd_pair_model rwd_ssrm_head_model(rwd_ssrm_head *h);
RWDDEF void rwd_ssrm_head_free(rwd_ssrm_head *h);

/* Adapter: ArmoRM's gate (stage 2) on prompt rows x (n, d_in) and the rewards it mixes of the
   two sides r_a, r_b (n, K) (rwd_armo_mixed_rewards). */
typedef struct rwd_ssrm_gate {
    rwd_gate *gate;
    moe_store *store;
    const float *x;
    const double *r_a, *r_b;
    size_t n;
    rwd_gate_train_config tc;
    float *xbuf;             /* owned gather buffers; rwd_ssrm_gate_free releases them       */
    double *rbuf;
    size_t buf_pairs;
} rwd_ssrm_gate;
RWDDEF rwd_pair_model rwd_ssrm_gate_model(rwd_ssrm_gate *g);
RWDDEF void rwd_ssrm_gate_free(rwd_ssrm_gate *g);

/* ============================================================================================
   >>rwd:merge  merging models of the same layout: linear, SLERP, task arithmetic, TIES, DARE,
                breadcrumbs
   ============================================================================================
   Works on moe.h's one tensor table (moe_store): every input store has the destination's
   layout (same names, shapes and flags, the fingerprint of moe_store_fingerprint), and each
   method runs tensor by tensor on the flat params, as mergekit does
   (github.com/arcee-ai/mergekit: merge_methods/linear.py, slerp.py,
   generalized_task_arithmetic.py, sparsify.py; its names for the methods are used below).
   With n models theta_m, their weights w_m and (task-vector methods) a base model theta_b:

   linear (model soups, Wortsman et al., arXiv 2203.05482):
       theta = sum_m w_m theta_m,  divided by sum_m w_m when normalize (mergekit's default).
   SLERP (Shoemake 1985; exactly two models; t = 0 gives models[0], t = 1 models[1]): with
       unit directions v_m / |v_m| (a norm <= 1e-8 is left undivided) and d = their dot product,
       theta = sin((1-t) O)/sin O v_0 + sin(t O)/sin O v_1,  O = acos d,
       applied to the UNNORMALISED tensors; where |d| > 0.9995 (near-parallel or
       near-antiparallel, as mergekit) it falls back to (1-t) v_0 + t v_1.
   task arithmetic (Ilharco et al., arXiv 2212.04089) and its generalisations: task vectors
       tau_m = theta_m - theta_b, then per model
         sparsify (keep a share `density` of tau_m):
           MAGNITUDE  TIES's trim (Yadav et al., arXiv 2306.01708): the k = floor(density n)
                      entries of largest |tau| (ties to the lower index);
           RANDOM     DARE (Yu et al., arXiv 2311.03099): each entry kept with probability
                      density, drawn with a moe_rng seeded from (seed, model, tensor);
           OUTLIERS   Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795): drop the
                      floor(gamma n) largest |tau| and then the smallest, so that
                      floor(density n) stay (fewer large ones dropped when they do not fit);
         rescale the kept entries:
           DENSITY    divide by density (the DARE paper; older mergekit versions);
           L1, L2, LINF  match that norm of the unmasked tau_m (current mergekit's rescale,
                      L1 there); left unscaled when either norm is below 1e-7;
       u_m = w_m tau_m', and elementwise
         no consensus:  delta = sum_m u_m,  divisor = sum_m w_m
         TIES's sign election: s = +1 where sum_m u_m >= 0 (SUM; the paper) or where
                      sum_m sign(u_m) >= 0 (COUNT), else -1; only u_m of sign s enter (a zero
                      never does): delta = sum_m u_m [sign u_m = s], divisor = sum_m w_m [.]
                      (the disjoint mean), a divisor of 0 read as 1;
       theta = theta_b + delta, or theta_b + delta / divisor with normalize.
   rwd_merge_config_default(method) sets mergekit's defaults of each named method; every field
   can then be changed (DARE with TIES's trim, TIES with a norm rescale, ...).

   Where this departs from mergekit, on purpose:
   - TIES keeps at least one entry per tensor where floor(density n) = 0 (mergekit stops with
     an assertion there).
   - Breadcrumbs with floor(gamma n) = 0 drops no large entry. mergekit's slice [n_bot:-n_top]
     is then empty and keeps nothing: with its default gamma 0.01 every tensor under 100
     entries lost its whole task vector.
   - Weights that sum to (almost) 0 with normalize (linear; task arithmetic without consensus)
     are refused with a status; mergekit divides by 0 (linear) or by 1 (|sum| < 1e-8).
   - Everything accumulates in double and rounds once to float; mergekit computes in the
     tensors' dtype (float32 on CPU).
   - density >= 1 leaves a task vector as it is (no mask, no rescale), as mergekit.

   Weights come in one of three layouts (rwd_merge_per), n_w values per slot, n_w = n_models
   (SLERP: n_w = 1, the slot's t):
     RWD_PER_MODEL   weights[m]                            one weight per model everywhere
     RWD_PER_TENSOR  weights[t * n_w + m]                  per tensor t of the table
     RWD_PER_BLOCK   weights[b * n_w + m], b = block[t];   per block of layers (rwd_block_map);
                     tensors outside every layer (b = -1) use row b = n_blocks
   A block is the tensors of one or several transformer layers, found by the name prefix
   "l<N>." of moe.h's model ("l3.attn.wqkv" is in layer 3; "wte", "lnf.w" in none).

   Nothing is half-merged: every input is checked before the destination is written, the
   destination must be a store of its own (not an input), and on any error it is unchanged. */

typedef enum rwd_merge_method {
    RWD_MERGE_LINEAR = 0,
    RWD_MERGE_SLERP,
    RWD_MERGE_TASK_ARITHMETIC,  /* no sparsification, no consensus, no normalisation        */
    RWD_MERGE_TIES,             /* MAGNITUDE + SUM election + normalize                        */
    RWD_MERGE_DARE_LINEAR,      /* RANDOM + rescale, no consensus, no normalisation            */
    RWD_MERGE_DARE_TIES,        /* RANDOM + rescale + SUM election, no normalisation           */
    RWD_MERGE_BREADCRUMBS,      /* OUTLIERS, no consensus                                      */
    RWD_MERGE_BREADCRUMBS_TIES, /* OUTLIERS + SUM election                                     */
    RWD_MERGE_METHOD_COUNT
} rwd_merge_method;

typedef enum rwd_sparsify {
    RWD_SPARSIFY_NONE = 0,
    RWD_SPARSIFY_MAGNITUDE, /* top-k by |tau| (TIES)                 */
    RWD_SPARSIFY_RANDOM,    /* Bernoulli(density) (DARE)             */
    RWD_SPARSIFY_OUTLIERS   /* drop largest gamma, then the smallest (breadcrumbs) */
} rwd_sparsify;

typedef enum rwd_consensus {
    RWD_CONSENSUS_NONE = 0,
    RWD_CONSENSUS_SUM,  /* sign of sum_m u_m (TIES paper)   */
    RWD_CONSENSUS_COUNT /* majority of the signs            */
} rwd_consensus;

typedef enum rwd_rescale {
    RWD_RESCALE_NONE = 0,
    RWD_RESCALE_DENSITY, /* / density (DARE paper)            */
    RWD_RESCALE_L1,      /* match the L1 norm (mergekit now)  */
    RWD_RESCALE_L2,
    RWD_RESCALE_LINF
} rwd_rescale;

typedef enum rwd_merge_per { RWD_PER_MODEL = 0, RWD_PER_TENSOR, RWD_PER_BLOCK } rwd_merge_per;

typedef struct rwd_merge_config {
    rwd_merge_method method;
    /* task-vector methods (TASK_ARITHMETIC .. BREADCRUMBS_TIES) read these four: */
    rwd_sparsify sparsify;
    rwd_consensus consensus;
    int normalize;           /* divide by the (masked) sum of weights; see above              */
    rwd_rescale rescale;
    double density;          /* share kept by the sparsification, in (0, 1]; 1                */
    const double *densities; /* (n_models) per-model densities, or NULL: density for all     */
    double gamma;            /* breadcrumbs: share of the largest |tau| dropped, [0, 1); 0.01  */
    uint64_t seed;           /* DARE's draws; 1                                                */
    /* DARE's masks given instead of drawn (tests compare with another language's RNG this
       way): keep_masks[m] (numel of the table) 1 = keep entry, 0 = drop; NULL = draw */
    const unsigned char *const *keep_masks;
    rwd_merge_per per;       /* layout of the weights; RWD_PER_MODEL                          */
    const int *block;        /* (table count) block of each tensor (-1 = none), RWD_PER_BLOCK */
    int n_blocks;
} rwd_merge_config;

/* mergekit's defaults for the method (normalize: linear and TIES yes, others no; DARE
   rescales by 1/density as its paper; set rescale = RWD_RESCALE_L1 for current mergekit). */
RWDDEF rwd_merge_config rwd_merge_config_default(rwd_merge_method method);

/* dst = the merge of models[0..n_models) (and base, NULL for LINEAR and SLERP), weights in the
   layout of c->per. dst, every model and base: allocated stores of one layout; dst none of
   them. On error dst is unchanged and err says why. */
RWDDEF moe_status rwd_merge(moe_store *dst, const moe_store *base, const moe_store *const *models,
                            int n_models, const double *weights, const rwd_merge_config *c,
                            moe_err *err);

/* MOE_OK when b has a's layout; else MOE_ERR_SHAPE and a sentence naming the first tensor
   that differs ("what" names b in it, e.g. "model 2"). */
RWDDEF moe_status rwd_store_same_layout(const moe_store *a, const moe_store *b, const char *what,
                                        moe_err *err);
/* N from a name "l<N>.<...>" (moe.h's per-layer tensors), else -1 */
RWDDEF int rwd_tensor_layer(const char *name);
/* 1 for a normalisation or embedding tensor: a name part ('.'-separated) that starts with
   "ln" or contains "norm" or "emb", or is "wte" / "wpe"; 0 for everything else (linear maps,
   their biases, routers, experts). */
RWDDEF int rwd_tensor_is_norm_or_embedding(const char *name);
/* block (s->count): the block of every tensor, -1 outside every layer. Pivots split the
   layers as the alignment-tax code's part-wise averaging (arXiv 2309.06256): layer l is in
   block b = the number of pivots below l, so a pivot layer closes its block; *n_blocks =
   n_pivots + 1. Pivots: strictly increasing, in [0, n_layers - 1). */
RWDDEF moe_status rwd_block_map(int *block, int *n_blocks, const moe_store *s, const int *pivots,
                                int n_pivots, moe_err *err);
/* pivots (n_blocks - 1) of n_blocks equal blocks of floor(n_layers / n_blocks) layers, the last
   taking the remainder (the official code's "blockN"; n_blocks = n_layers: one per layer) */
RWDDEF moe_status rwd_pivots_equal(int *pivots, int n_layers, int n_blocks, moe_err *err);
/* 1 + the largest layer index of s's tensor names (0: no per-layer tensors) */
RWDDEF int rwd_store_layers(const moe_store *s);

/* ============================================================================================
   >>rwd:average  model averaging against the alignment tax: MA, part-wise, HMA
   ============================================================================================
   Lin et al., "Mitigating the Alignment Tax of RLHF", arXiv 2309.06256 (EMNLP 2024); official
   code github.com/avalonstrel/Mitigating-the-Alignment-Tax-of-RLHF (scripts/postprocess/
   weight_interpolation.py, weight_mask_merge.py; src/lmflow/pipeline/utils/mask_trainer.py).
   Interpolation between the model before alignment (pre) and after it (post), as WiSE-FT
   (Wortsman et al., arXiv 2109.01903) interpolates a fine-tuned model with its start:

       theta(lambda) = (1 - lambda) theta_pre + lambda theta_post,   lambda in [0, 1]

   lambda = 0 is the pre-alignment model, 1 the aligned one. The official code's ratio is the
   weight of the PRE model, 1 - lambda here (its init_val 0.2 is lambda = 0.8).

   Part-wise averaging (the paper's analysis): blocks of layers split at pivots
   (rwd_block_map: a pivot layer closes its block) each with its own lambda. The official
   script gives layers their block's ratio (norms inside a layer too), the token embedding the
   first block's, the final norm and lm_head the global one; here every tensor outside the
   layers gets lambda_outside (moe.h's model ties its head to the embedding "wte"). For another
   assignment, rwd_average_tensors takes one lambda per tensor.

   HMA, heterogeneous model averaging: K blocks, free parameters a_k, a floor eps, and the
   pre-model share rho_k given by a normalised sigmoid whose mean is held EXACTLY at
   rho = 1 - mean, so only the distribution of averaging over depth is learned:

       rho_k = rho K (sigmoid(a_k) + eps) / S,   S = sum_j (sigmoid(a_j) + eps),
       lambda_k = 1 - rho_k,   (1/K) sum_k lambda_k = mean for every a.

   As the official code, the sigmoid parametrises the share of the pre model (its ratio); with
   K blocks a ratio can exceed 1 (rho K (1 + eps) / (1 + eps + (K - 1) eps) at most): the
   formula is kept exact, no clamp, as there.
   dlambda_k/da_j = -rho K sigmoid'(a_j) (delta_kj S - (sigmoid(a_k) + eps)) / S^2.
   Search: minimise J(a) = L(theta(a)) + gamma sum_k c_k |lambda_k - mean| (or squared), L the
   merged model's loss on the aligned model's own selected samples (a callback; the official
   code trains only the a_k with AdamW, both models frozen, for one epoch of next-token
   cross-entropy on the samples RSF kept), c_k = the number of tensors following block k (the
   official regulariser sums over linear modules, so each block counts once per module).
   Defaults of the official run script: ratio 0.2 (mean 0.8 here), eps 0.2, gamma 1e-4, lr 2e-5.
   Which tensors follow a block's ratio (rwd_hma_follow):
     FOLLOW_LINEAR (official): the linear maps of the layers (weights and biases: attention,
       FFN, routers, experts); norms and embeddings (rwd_tensor_is_norm_or_embedding) and every
       tensor outside the layers are taken from the pre-alignment model unchanged. The official
       lm_head (untied there) gets the mean ratio; moe.h's head is the embedding wte, so here it
       comes from pre.
     FOLLOW_ALL: every tensor of a layer follows its block, everything else the mean.
   Where the official code differs from the parametrisation implemented here: its training
   wrapper puts a bf16 copy of a_k, taken when the model is wrapped, in the numerator, so only
   the denominator S follows the training (its final merge uses the trained a_k in both); its
   default regulariser also weighs module m by 25 / (|layer(m) - 13| + 1), a choice for a
   26-layer model (pass reg_weight for that); its "block3" with <= 30 layers cuts at layers 8
   and 16 (2 blocks for L <= 16): give pivots instead.
   Black-box alternative for tiny models: a grid of lambda vectors with the mean fixed, each
   merged model scored by two callbacks (reward: higher is better; tax: lower is better, e.g.
   bits per byte on the pre-training text), and the Pareto front of the two.

   The destination is a store of its own (never pre or post); on bad input it is unchanged. */

/* dst = (1 - lambda) pre + lambda post, every tensor; lambda in [0, 1] */
RWDDEF moe_status rwd_average(moe_store *dst, const moe_store *pre, const moe_store *post, double lambda,
                              moe_err *err);
/* lambdas (n_pivots + 1): block b's lambda; tensors outside every layer use lambda_outside */
RWDDEF moe_status rwd_average_partwise(moe_store *dst, const moe_store *pre, const moe_store *post,
                                       const int *pivots, int n_pivots, const double *lambdas,
                                       double lambda_outside, moe_err *err);
/* lambda (table count): one lambda per tensor, each in [0, 1] */
RWDDEF moe_status rwd_average_tensors(moe_store *dst, const moe_store *pre, const moe_store *post,
                                      const double *lambda, moe_err *err);

typedef enum rwd_hma_follow { RWD_HMA_FOLLOW_LINEAR = 0, RWD_HMA_FOLLOW_ALL = 1 } rwd_hma_follow;
typedef enum rwd_hma_reg { RWD_HMA_REG_ABS = 0, RWD_HMA_REG_SQUARED = 1 } rwd_hma_reg;

typedef struct rwd_hma_config {
    double mean;               /* mean lambda over the blocks, in [0, 1]; 0.8 (official ratio 0.2) */
    double eps;                /* floor inside the normalised sigmoid, >= 0; 0.2                 */
    double gamma;              /* regulariser weight, >= 0; 1e-4                                 */
    rwd_hma_reg reg;           /* |lambda_k - mean| (official default) or its square; ABS        */
    const double *reg_weight;  /* (K) c_k, or NULL: tensors following block k                    */
    rwd_hma_follow follow;     /* FOLLOW_LINEAR                                                  */
    int steps;                 /* search: AdamW steps (one loss callback each); 50               */
    float lr;                  /* search: learning rate; 0.05 (the official 2e-5 is for a 3B
                                  model's thousands of steps)                                    */
    double grid_step;          /* grid search: spacing of the lambda values; 0.1                 */
} rwd_hma_config;

/* The merged model's loss and its gradient: *loss = L(merged); grad (numel, zeroed before the
   call) = dL/dparams in the table's layout. A status other than MOE_OK stops the search. */
typedef moe_status (*rwd_loss_fn)(double *loss, float *grad, const moe_store *merged, void *user);
/* One number about a merged model (reward, tax) */
typedef moe_status (*rwd_score_fn)(double *score, const moe_store *merged, void *user);

RWDDEF rwd_hma_config rwd_hma_config_default(void);
/* lambdas (K) from a (K) */
RWDDEF void rwd_hma_ratios(double *lambdas, const double *a, int K, double mean, double eps);
/* da (K) += dlambdas . dlambda/da */
RWDDEF void rwd_hma_ratios_backward(double *da, const double *dlambdas, const double *a, int K,
                                    double mean, double eps);
/* gamma sum_k c_k |lambda_k - mean| (or squared); dlambdas (K, may be NULL) += its gradient
   (the gradient of |x| at 0 is 0); weight NULL: c_k = 1 */
RWDDEF double rwd_hma_regularizer(double *dlambdas, const double *lambdas, const double *weight, int K,
                                  double mean, double gamma, rwd_hma_reg reg);
/* lam (table count): the lambda each tensor gets from the block lambdas (K) */
RWDDEF void rwd_hma_tensor_lambdas(double *lam, const moe_store *s, const int *block, const double *lambdas,
                                   double mean, rwd_hma_follow follow);
/* dst = the HMA merge of block lambdas (K) (any real values: HMA's may leave [0, 1]) */
RWDDEF moe_status rwd_hma_merge(moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                int K, const double *lambdas, const rwd_hma_config *c, moe_err *err);
/* dlambdas (K) += dL/dlambda_k = sum over the tensors following block k of grad . (post - pre) */
RWDDEF void rwd_hma_lambda_grad(double *dlambdas, const moe_store *pre, const moe_store *post, const int *block,
                                int K, rwd_hma_follow follow, const float *grad);
/* J(a) and, if grad_a (K) != NULL, dJ/da: merges into dst, calls loss with grad_buf (numel). */
RWDDEF moe_status rwd_hma_objective(double *objective, double *grad_a, moe_store *dst, float *grad_buf,
                                    const double *a, const moe_store *pre, const moe_store *post,
                                    const int *block, int K, const rwd_hma_config *c, rwd_loss_fn loss,
                                    void *user, moe_err *err);
/* The search: a_k start at logit(1 - mean) (every lambda_k = mean), c->steps AdamW steps on
   J(a); a, lambdas (K) out; trace (c->steps) = J before each step, or NULL. dst = the merge of
   the final lambdas. */
RWDDEF moe_status rwd_hma_search(double *a, double *lambdas, double *trace, moe_store *dst,
                                 const moe_store *pre, const moe_store *post, const int *block, int K,
                                 const rwd_hma_config *c, rwd_loss_fn loss, void *user, moe_err *err);
/* Points of the grid: lambda_k = mean + j_k step in [0, 1], integers j_k summing to 0 (so the
   mean is held); -1 for bad arguments or more than 10^7 points. */
RWDDEF long rwd_hma_grid_size(int K, double mean, double step);
/* Scores every grid point (first block slowest): lambdas (cap, K), reward, tax, on_front
   (cap): 1 where no other point has reward >= and tax <= with one strict. *n_points = the
   grid size; cap must hold it (checked before anything is evaluated). dst: the last merge. */
RWDDEF moe_status rwd_hma_grid(double *lambdas, double *reward, double *tax, int *on_front, long *n_points,
                               long cap, moe_store *dst, const moe_store *pre, const moe_store *post,
                               const int *block, int K, const rwd_hma_config *c, rwd_score_fn reward_fn,
                               void *reward_user, rwd_score_fn tax_fn, void *tax_user, moe_err *err);

/* ============================================================================================
   >>rwd:rsf  rejection-sampling fine-tuning (RSF) of moe.h's byte LM under a direction (DPA)
   ============================================================================================
   RAFT / rejection-sampling fine-tuning (Dong et al., arXiv 2304.06767, Algorithm 1), with the
   preference of Directional Preference Alignment (Wang et al., arXiv 2402.18571, section 3.2):
   per prompt, sample n responses from the policy, score each with k reward objectives, keep
   the best by v . r for the prompt's direction v, then fine-tune the policy on the kept
   (prompt, response) pairs with the loss on the response bytes only (targets -1 elsewhere);
   repeat for T rounds. With prompt encoding on, the direction is written into the prompt as
   DPA's integer weights round(100 v) (section 3.1), so one policy learns many directions.
   The scorer is any callback; rwd_rsf_head_score wraps reward heads on hashed text features
   (>>rwd:features, >>rwd:head), optionally with verbosity (length) as one more objective.
   Every buffer (KV cache, candidates, kept set, batches) is planned at init: sampling, scoring
   with the head scorer and fine-tuning allocate nothing. Bytes are tokens (vocab 256). */

/* r (n, k): the k objectives of each of the n responses to prompt (response i: resp[i], of
   len[i] bytes, NUL-terminated). Return MOE_OK, or a status with a sentence in err. */
typedef moe_status (*rwd_rsf_score_fn)(double *r, const char *prompt, const char *const *resp, const int *len,
                                       int n, void *user, moe_err *err);

typedef enum rwd_rsf_prompt_kind {
    RWD_RSF_PROMPT_PLAIN = 0, /* the prompt as given                                            */
    RWD_RSF_PROMPT_DPA = 1,   /* DPA's system prompt with round(100 v) (rwd_dpa_system_prompt),
                                 a space, the prompt; k = 2                                      */
    RWD_RSF_PROMPT_WEIGHTS = 2 /* the same integers in a short prefix "[W_1,W_2] " for models
                                 whose window cannot hold the system prompt; k = 2               */
} rwd_rsf_prompt_kind;

typedef struct rwd_rsf_config {
    int k;                 /* reward objectives the scorer gives; 2                            */
    int n_candidates;      /* n responses per prompt; 8                                        */
    int max_new;           /* bytes per response at most; 32                                   */
    int stop;              /* a response ends after this byte; -1 = none (the default)          */
    moe_sampler sampler;   /* temperature 1, no top-k, no top-p                                 */
    int prompt_kind;       /* rwd_rsf_prompt_kind; PLAIN                                        */
    int max_prompts;       /* prompts one round takes (the kept set's size); 64                 */
    int max_prompt_bytes;  /* longest prompt before encoding; 64                                */
    int epochs;            /* passes over the kept set per round; 1                             */
    float lr;              /* AdamW learning rate of fine-tuning; 1e-3                          */
    float grad_clip;       /* global gradient norm clip; 1 (0 = none)                           */
    moe_adamw_config adamw;
    uint64_t seed;         /* candidates' samplers and the kept set's order                     */
} rwd_rsf_config;

typedef struct rwd_rsf_stats {
    int n_prompts;         /* prompts of the round                                            */
    double mean_kept;      /* mean v . r of the kept responses                                */
    double mean_all;       /* mean v . r of every candidate                                   */
    double loss_before;    /* mean cross-entropy (nats/byte) on the kept responses before and */
    double loss_after;     /* after the round's fine-tuning                                   */
} rwd_rsf_stats;

typedef struct rwd_rsf {
    rwd_rsf_config cfg;
    moe_model *m;          /* the policy (not owned; must outlive this)                       */
    moe_kv_cache cache;    /* n_candidates sequences of the longest prompt + max_new           */
    moe_gen_seq *seqs;     /* (n_candidates)                                                  */
    int *gen_out;          /* (n_candidates, max_new)                                          */
    int max_prompt_tokens; /* encoded prompt bytes at most                                     */
    char *prompt_text;     /* (max_prompt_tokens + 1) the last encoded prompt                  */
    int *prompt_tok;       /* (max_prompt_tokens)                                              */
    int n_prompt;          /* bytes of the last encoded prompt                                 */
    char *resp_text;       /* (n_candidates, max_new + 1) the last candidates, NUL-terminated  */
    const char **resp;     /* (n_candidates) pointers into resp_text                           */
    int *resp_len;         /* (n_candidates)                                                   */
    double *r;             /* (n_candidates, k) the last candidates' objectives                */
    int best;              /* the last sample's kept candidate                                 */
    int seq_cap;           /* max_prompt_tokens + max_new: a kept sequence's room              */
    int *kept_tok;         /* (max_prompts, seq_cap) prompt + response bytes                   */
    int *kept_len, *kept_prompt; /* (max_prompts) bytes in all, of them prompt                 */
    double *kept_r;        /* (max_prompts, k)                                                 */
    int n_kept;
    int *order;            /* (max_prompts) the fine-tuning order                              */
    int *in, *tg;          /* (max_B, max_T) one fine-tuning batch                             */
    long long step;        /* AdamW steps taken                                                */
    moe_rng rng;
    moe_err err;
} rwd_rsf;

RWDDEF rwd_rsf_config rwd_rsf_config_default(void);
/* Plans everything for policy m (byte vocabulary, a causal router, max_B >= 1). An encoded
   prompt plus max_new - 1 bytes must fit the model's window max_T (fine-tuning reads the kept
   sequence whole): else a status and a sentence. On failure r->err says why; free is safe. */
RWDDEF moe_status rwd_rsf_init(rwd_rsf *r, moe_model *m, const rwd_rsf_config *c);
RWDDEF void rwd_rsf_free(rwd_rsf *r);
/* out (cap) = prompt as the policy reads it under direction v (k values, |v| = 1): the
   encoding of cfg.prompt_kind. *n = its bytes (may be NULL). */
RWDDEF moe_status rwd_rsf_encode_prompt(rwd_rsf *r, char *out, size_t cap, int *n, const char *prompt,
                                        const double *v);
/* n_candidates responses to prompt (encoded under v) in one batched generation, scored by
   score; r->resp, r->resp_len, r->r hold them and r->best = argmax_j v . r_j (ties to the lower
   index; rwd_dpa_best_of_n). v must be a finite unit vector (|v| within 1e-6 of 1). */
RWDDEF moe_status rwd_rsf_sample(rwd_rsf *r, const char *prompt, const double *v, rwd_rsf_score_fn score,
                                 void *user);
/* Empties the kept set. */
RWDDEF void rwd_rsf_clear(rwd_rsf *r);
/* Appends candidate i of the last rwd_rsf_sample (its encoded prompt and its response) to
   the kept set; a response of 0 bytes or a full kept set is refused with a sentence. */
RWDDEF moe_status rwd_rsf_keep(rwd_rsf *r, int i);
/* *loss = mean cross-entropy (nats per byte) of the policy on the kept responses given their
   prompts. */
RWDDEF moe_status rwd_rsf_kept_loss(rwd_rsf *r, double *loss);
/* epochs passes of AdamW over the kept set (shuffled by r->rng; batches of up to max_B
   sequences; loss on the response bytes only). An empty kept set is refused. */
RWDDEF moe_status rwd_rsf_finetune(rwd_rsf *r, int epochs);
/* One RSF round: for each of the n_prompts prompts (direction dirs + i k; 1 <= n_prompts <=
   max_prompts) sample, keep the best (unless it is empty: a stop byte first), then fine-tune
   cfg.epochs passes on the kept set; stats (may be NULL) gets the round's means. */
RWDDEF moe_status rwd_rsf_round(rwd_rsf *r, const char *const *prompts, const double *dirs, int n_prompts,
                                rwd_rsf_score_fn score, void *user, rwd_rsf_stats *stats);

/* The scorer of reward heads on text features: objective j < n_heads is heads[j] (in store)
   on rwd_featurize(f, prompt, response); with length_scale > 0 one more objective, the
   response's code points / length_scale (verbosity). k = n_heads + (length_scale > 0). */
typedef struct rwd_rsf_head_scorer {
    const rwd_featurizer *f;
    rwd_head *heads;
    int n_heads;
    const moe_store *store;
    double length_scale;
    float *x; /* (width) scratch planned at init */
} rwd_rsf_head_scorer;

RWDDEF moe_status rwd_rsf_head_scorer_init(rwd_rsf_head_scorer *s, const rwd_featurizer *f, rwd_head *heads,
                                           int n_heads, const moe_store *store, double length_scale, moe_err *err);
RWDDEF void rwd_rsf_head_scorer_free(rwd_rsf_head_scorer *s);
/* an rwd_rsf_score_fn; user = the rwd_rsf_head_scorer */
RWDDEF moe_status rwd_rsf_head_score(double *r, const char *prompt, const char *const *resp, const int *len, int n,
                                     void *user, moe_err *err);

#ifdef __cplusplus
}
#endif
#endif /* RWD_H_INCLUDED */

/* ############################################################################################
   IMPLEMENTATION
   ############################################################################################ */
#if defined(RWD_IMPLEMENTATION) && !defined(RWD_IMPLEMENTATION_INCLUDED)
#define RWD_IMPLEMENTATION_INCLUDED

#ifndef MOE_IMPLEMENTATION_INCLUDED
#error "reward.h: define MOE_IMPLEMENTATION in the file that defines RWD_IMPLEMENTATION"
#endif

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef RWD_STATIC /* a static copy need not use every function */
#if defined(__GNUC__) || defined(__clang__)
#define RWD__IMPL static __attribute__((unused))
#else
#define RWD__IMPL static
#endif
#else
#define RWD__IMPL
#endif

/* ============================================================================================
   >>rwd:text
   ============================================================================================ */

RWD__IMPL size_t rwd_utf8_length(const char *s, size_t n) {
    size_t i, count = 0;
    for (i = 0; i < n; i++) count += ((unsigned char)s[i] & 0xC0u) != 0x80u;
    return count;
}

/* Recursive-descent parser state. Depth is bounded so hostile input cannot exhaust the stack. */
typedef struct rwd__jp {
    const char *s;
    size_t len, pos;
    int line;
    rwd_json *doc;
    moe_err *err;
} rwd__jp;

enum { RWD__JSON_MAX_DEPTH = 256 };

static moe_status rwd__jerr(rwd__jp *p, const char *what) {
    return moe_err_set(p->err, MOE_ERR_FORMAT, "JSON line %d: %s", p->line, what);
}

static void rwd__jskip(rwd__jp *p) {
    while (p->pos < p->len) {
        char c = p->s[p->pos];
        if (c == '\n') p->line++;
        else if (c != ' ' && c != '\t' && c != '\r') break;
        p->pos++;
    }
}

static int rwd__grow(void **buf, size_t *cap, size_t need, size_t elem) {
    size_t ncap;
    void *nb;
    if (need <= *cap) return 1;
    ncap = *cap ? *cap : 64;
    while (ncap < need) ncap *= 2;
    nb = MOE_MALLOC(ncap * elem);
    if (!nb) return 0;
    if (*buf) {
        memcpy(nb, *buf, *cap * elem);
        MOE_FREE(*buf);
    }
    *buf = nb;
    *cap = ncap;
    return 1;
}

static int rwd__jput(rwd_json *d, const char *bytes, size_t n) {
    if (n == 0) return 1; /* an empty run: d->strings may still be NULL, and NULL + 0 is undefined */
    if (!rwd__grow((void **)&d->strings, &d->cap_strings, d->n_strings + n, 1)) return 0;
    memcpy(d->strings + d->n_strings, bytes, n);
    d->n_strings += n;
    return 1;
}

static int rwd__jput_utf8(rwd_json *d, unsigned long cp) {
    char b[4];
    size_t n;
    if (cp < 0x80) { b[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { b[0] = (char)(0xC0 | (cp >> 6)); b[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
    else if (cp < 0x10000) {
        b[0] = (char)(0xE0 | (cp >> 12)); b[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
    } else {
        b[0] = (char)(0xF0 | (cp >> 18)); b[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); b[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
    }
    return rwd__jput(d, b, n);
}

static int rwd__jhex4(const char *s, unsigned long *v) {
    int i;
    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = s[i];
        int h = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
        if (h < 0) return 0;
        *v = (*v << 4) | (unsigned long)h;
    }
    return 1;
}

/* Decodes the string at p->pos (at the opening quote) into doc->strings; *off, *n get it. */
static moe_status rwd__jstring(rwd__jp *p, size_t *off, size_t *n) {
    rwd_json *d = p->doc;
    size_t start = d->n_strings;
    p->pos++; /* opening quote */
    for (;;) {
        size_t run = p->pos;
        unsigned char c;
        while (run < p->len && (unsigned char)p->s[run] >= 0x20 && p->s[run] != '"' && p->s[run] != '\\') run++;
        if (!rwd__jput(d, p->s + p->pos, run - p->pos)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        p->pos = run;
        if (p->pos >= p->len) return rwd__jerr(p, "unterminated string");
        c = (unsigned char)p->s[p->pos];
        if (c == '"') { p->pos++; break; }
        if (c < 0x20) return rwd__jerr(p, "control character inside a string (must be escaped)");
        /* backslash escape */
        if (p->pos + 1 >= p->len) return rwd__jerr(p, "unterminated escape");
        c = (unsigned char)p->s[p->pos + 1];
        p->pos += 2;
        if (c == 'u') {
            unsigned long cp, lo;
            if (p->pos + 4 > p->len || !rwd__jhex4(p->s + p->pos, &cp)) return rwd__jerr(p, "bad \\u escape (needs 4 hex digits)");
            p->pos += 4;
            /* a high surrogate followed by an escaped low one is one code point */
            if (cp >= 0xD800 && cp <= 0xDBFF && p->pos + 6 <= p->len && p->s[p->pos] == '\\' &&
                p->s[p->pos + 1] == 'u' && rwd__jhex4(p->s + p->pos + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p->pos += 6;
            }
            if (!rwd__jput_utf8(d, cp)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        } else {
            char e;
            switch (c) {
            case '"': e = '"'; break;
            case '\\': e = '\\'; break;
            case '/': e = '/'; break;
            case 'b': e = '\b'; break;
            case 'f': e = '\f'; break;
            case 'n': e = '\n'; break;
            case 'r': e = '\r'; break;
            case 't': e = '\t'; break;
            default: return rwd__jerr(p, "unknown escape in a string");
            }
            if (!rwd__jput(d, &e, 1)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
        }
    }
    *off = start;
    *n = d->n_strings - start;
    if (!rwd__jput(d, "", 1)) return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
    return MOE_OK;
}

static moe_status rwd__jnumber(rwd__jp *p, double *v) {
    char buf[512];
    size_t i = p->pos, n;
    const char *s = p->s;
    if (i < p->len && s[i] == '-') i++;
    if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "unexpected character (not a JSON value)");
    if (s[i] == '0') i++;
    else while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    if (i < p->len && s[i] == '.') {
        i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "a digit must follow the decimal point");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < p->len && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < p->len && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= p->len || s[i] < '0' || s[i] > '9') return rwd__jerr(p, "a digit must follow the exponent");
        while (i < p->len && s[i] >= '0' && s[i] <= '9') i++;
    }
    n = i - p->pos;
    if (n >= sizeof buf) return rwd__jerr(p, "number longer than 511 characters");
    memcpy(buf, s + p->pos, n); /* strtod needs a terminated copy: the input need not be */
    buf[n] = 0;
    *v = strtod(buf, NULL);
    p->pos = i;
    return MOE_OK;
}

static moe_status rwd__jvalue(rwd__jp *p, size_t *out, int depth);

static moe_status rwd__jnode(rwd__jp *p, size_t *out, int type) {
    rwd_json *d = p->doc;
    rwd_json_node *n;
    if (!rwd__grow((void **)&d->nodes, &d->cap_nodes, d->n_nodes + 1, sizeof *d->nodes))
        return moe_err_set(p->err, MOE_ERR_NOMEM, "JSON line %d: out of memory", p->line);
    n = &d->nodes[d->n_nodes];
    memset(n, 0, sizeof *n);
    n->type = type;
    n->line = p->line;
    n->key = (size_t)-1;
    *out = d->n_nodes++;
    return MOE_OK;
}

/* array or object: children are linked in order through `next` */
static moe_status rwd__jcontainer(rwd__jp *p, size_t self, int depth) {
    int is_obj = p->doc->nodes[self].type == RWD_JSON_OBJECT;
    char close = is_obj ? '}' : ']';
    size_t prev = 0, count = 0;
    moe_status st;
    p->pos++;
    rwd__jskip(p);
    if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; return MOE_OK; }
    for (;;) {
        size_t child, key = (size_t)-1, key_len;
        rwd__jskip(p);
        if (is_obj) {
            if (p->pos >= p->len || p->s[p->pos] != '"') return rwd__jerr(p, "expected a string key in an object");
            if ((st = rwd__jstring(p, &key, &key_len)) != MOE_OK) return st;
            rwd__jskip(p);
            if (p->pos >= p->len || p->s[p->pos] != ':') return rwd__jerr(p, "expected ':' after an object key");
            p->pos++;
        }
        if ((st = rwd__jvalue(p, &child, depth + 1)) != MOE_OK) return st;
        p->doc->nodes[child].key = key;
        if (prev) p->doc->nodes[prev].next = child;
        else p->doc->nodes[self].first = child;
        prev = child;
        count++;
        rwd__jskip(p);
        if (p->pos < p->len && p->s[p->pos] == ',') { p->pos++; continue; }
        if (p->pos < p->len && p->s[p->pos] == close) { p->pos++; break; }
        return rwd__jerr(p, is_obj ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
    }
    p->doc->nodes[self].count = count;
    return MOE_OK;
}

static moe_status rwd__jvalue(rwd__jp *p, size_t *out, int depth) {
    moe_status st;
    char c;
    if (depth > RWD__JSON_MAX_DEPTH) return rwd__jerr(p, "nesting deeper than 256 levels");
    rwd__jskip(p);
    if (p->pos >= p->len) return rwd__jerr(p, "unexpected end of input (empty or truncated)");
    c = p->s[p->pos];
    if (c == '{' || c == '[') {
        if ((st = rwd__jnode(p, out, c == '{' ? RWD_JSON_OBJECT : RWD_JSON_ARRAY)) != MOE_OK) return st;
        return rwd__jcontainer(p, *out, depth);
    }
    if (c == '"') {
        size_t off, n;
        if ((st = rwd__jnode(p, out, RWD_JSON_STRING)) != MOE_OK) return st;
        if ((st = rwd__jstring(p, &off, &n)) != MOE_OK) return st;
        p->doc->nodes[*out].str = off;
        p->doc->nodes[*out].str_len = n;
        return MOE_OK;
    }
    {
        static const char *const words[3] = {"null", "false", "true"};
        int w;
        for (w = 0; w < 3; w++) {
            size_t wl = strlen(words[w]);
            if (p->len - p->pos >= wl && memcmp(p->s + p->pos, words[w], wl) == 0) {
                p->pos += wl;
                return rwd__jnode(p, out, RWD_JSON_NULL + w);
            }
        }
    }
    if ((st = rwd__jnode(p, out, RWD_JSON_NUMBER)) != MOE_OK) return st;
    return rwd__jnumber(p, &p->doc->nodes[*out].number);
}

RWD__IMPL moe_status rwd_json_parse(rwd_json *doc, const char *text, size_t len, int first_line, moe_err *err) {
    rwd__jp p;
    size_t root;
    moe_status st;
    if (!doc || (!text && len)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_json_parse needs a document and a text");
    doc->n_nodes = 0;
    doc->n_strings = 0;
    p.s = text; p.len = len; p.pos = 0; p.line = first_line; p.doc = doc; p.err = err;
    if ((st = rwd__jvalue(&p, &root, 0)) != MOE_OK) return st;
    rwd__jskip(&p);
    if (p.pos != p.len) return rwd__jerr(&p, "extra characters after the JSON value");
    return MOE_OK;
}

RWD__IMPL void rwd_json_free(rwd_json *doc) {
    MOE_FREE(doc->nodes);
    MOE_FREE(doc->strings);
    memset(doc, 0, sizeof *doc);
}

RWD__IMPL const rwd_json_node *rwd_json_root(const rwd_json *doc) { return doc->n_nodes ? &doc->nodes[0] : NULL; }

RWD__IMPL const rwd_json_node *rwd_json_child(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->first) ? &doc->nodes[n->first] : NULL;
}

RWD__IMPL const rwd_json_node *rwd_json_next(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->next) ? &doc->nodes[n->next] : NULL;
}

RWD__IMPL const rwd_json_node *rwd_json_member(const rwd_json *doc, const rwd_json_node *obj, const char *key) {
    const rwd_json_node *c, *found = NULL;
    if (!obj || obj->type != RWD_JSON_OBJECT) return NULL;
    for (c = rwd_json_child(doc, obj); c; c = rwd_json_next(doc, c))
        if (strcmp(doc->strings + c->key, key) == 0) found = c;
    return found;
}

RWD__IMPL const char *rwd_json_string(const rwd_json *doc, const rwd_json_node *n) {
    return (n && n->type == RWD_JSON_STRING) ? doc->strings + n->str : NULL;
}

static char *rwd__strndup(const char *s, size_t n) {
    char *d = (char *)MOE_MALLOC(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

RWD__IMPL moe_status rwd_text_pairs_add(rwd_text_pairs *p, const char *prompt, size_t prompt_len,
                                        const char *chosen, size_t chosen_len, const char *rejected,
                                        size_t rejected_len, moe_err *err) {
    char *a, *b, *c;
    if (p->n == p->cap) { /* the three arrays grow together */
        size_t cap = p->cap ? 2 * p->cap : 256;
        char **np = (char **)MOE_MALLOC(3 * cap * sizeof(char *));
        if (!np) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu text pairs", cap);
        if (p->n) {
            memcpy(np, p->prompt, p->n * sizeof(char *));
            memcpy(np + cap, p->chosen, p->n * sizeof(char *));
            memcpy(np + 2 * cap, p->rejected, p->n * sizeof(char *));
        }
        MOE_FREE(p->prompt);
        p->prompt = np; p->chosen = np + cap; p->rejected = np + 2 * cap;
        p->cap = cap;
    }
    a = rwd__strndup(prompt, prompt_len);
    b = rwd__strndup(chosen, chosen_len);
    c = rwd__strndup(rejected, rejected_len);
    if (!a || !b || !c) {
        MOE_FREE(a); MOE_FREE(b); MOE_FREE(c);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for a text pair");
    }
    p->prompt[p->n] = a; p->chosen[p->n] = b; p->rejected[p->n] = c;
    p->n++;
    return MOE_OK;
}

RWD__IMPL void rwd_text_pairs_free(rwd_text_pairs *p) {
    size_t i;
    for (i = 0; i < p->n; i++) {
        MOE_FREE(p->prompt[i]); MOE_FREE(p->chosen[i]); MOE_FREE(p->rejected[i]);
    }
    MOE_FREE(p->prompt); /* one block holds the three pointer arrays */
    memset(p, 0, sizeof *p);
}

RWD__IMPL size_t rwd_hh_response_offset(const char *dialogue, size_t len) {
    static const char marker[] = "\n\nAssistant:";
    const size_t m = sizeof marker - 1;
    size_t i;
    if (len < m) return 0;
    for (i = len - m + 1; i-- > 0;)
        if (memcmp(dialogue + i, marker, m) == 0) return i + m;
    return 0;
}

RWD__IMPL moe_status rwd_hh_parse_line(rwd_text_pairs *p, rwd_json *doc, const char *line, size_t len,
                                       int line_no, moe_err *err) {
    const rwd_json_node *root, *ch, *rj;
    const char *cs, *rs;
    size_t oc, orj;
    moe_status st = rwd_json_parse(doc, line, len, line_no, err);
    if (st != MOE_OK) return st;
    root = rwd_json_root(doc);
    ch = rwd_json_member(doc, root, "chosen");
    rj = rwd_json_member(doc, root, "rejected");
    cs = rwd_json_string(doc, ch);
    rs = rwd_json_string(doc, rj);
    if (!cs || !rs) return moe_err_set(err, MOE_ERR_FORMAT, "line %d: expected an object with string fields \"chosen\" and \"rejected\"", line_no);
    oc = rwd_hh_response_offset(cs, ch->str_len);
    orj = rwd_hh_response_offset(rs, rj->str_len);
    if (!oc || !orj) return moe_err_set(err, MOE_ERR_FORMAT, "line %d: a dialogue has no \"\\n\\nAssistant:\" turn", line_no);
    return rwd_text_pairs_add(p, cs, oc, cs + oc, ch->str_len - oc, rs + orj, rj->str_len - orj, err);
}

#ifndef MOE_NO_STDIO
RWD__IMPL moe_status rwd_read_all(FILE *f, char **text, size_t *len, moe_err *err) {
    char *buf = NULL;
    size_t n = 0, cap = 0, got;
    *text = NULL;
    *len = 0;
    if (!f) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_read_all: no stream");
    do {
        if (!rwd__grow((void **)&buf, &cap, n + 65536 + 1, 1)) {
            MOE_FREE(buf);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory after reading %zu bytes", n);
        }
        got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
    } while (got > 0);
    if (ferror(f)) {
        MOE_FREE(buf);
        return moe_err_set(err, MOE_ERR_IO, "read error after %zu bytes", n);
    }
    buf[n] = 0;
    *text = buf;
    *len = n;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_hh_read(rwd_text_pairs *p, FILE *f, moe_err *err) {
    char *text;
    size_t len, start = 0;
    int line_no = 1;
    rwd_json doc;
    moe_status st = rwd_read_all(f, &text, &len, err);
    if (st != MOE_OK) return st;
    memset(&doc, 0, sizeof doc);
    while (start < len && st == MOE_OK) {
        const char *nl = (const char *)memchr(text + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - text) : len, e = end;
        while (e > start && (text[e - 1] == '\r' || text[e - 1] == ' ' || text[e - 1] == '\t')) e--;
        if (e > start) st = rwd_hh_parse_line(p, &doc, text + start, e - start, line_no, err);
        start = end + 1;
        line_no++;
    }
    rwd_json_free(&doc);
    MOE_FREE(text);
    if (st == MOE_OK && p->n == 0) st = moe_err_set(err, MOE_ERR_FORMAT, "no preference pairs in the input (empty file?)");
    return st;
}
#endif

/* ============================================================================================
   >>rwd:lowess
   ============================================================================================ */

typedef struct rwd__xi {
    double x;
    size_t i;
} rwd__xi;

static int rwd__cmp_xi(const void *a, const void *b) {
    const rwd__xi *p = (const rwd__xi *)a, *q = (const rwd__xi *)b;
    if (p->x < q->x) return -1;
    if (p->x > q->x) return 1;
    return (p->i > q->i) - (p->i < q->i); /* index breaks ties: a stable sort */
}

/* order (n) = the permutation that sorts x stably */
static moe_status rwd__argsort(size_t *order, const double *x, size_t n, moe_err *err) {
    size_t i;
    rwd__xi *t = (rwd__xi *)MOE_MALLOC((n ? n : 1) * sizeof *t);
    if (!t) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory sorting %zu values", n);
    for (i = 0; i < n; i++) { t[i].x = x[i]; t[i].i = i; }
    qsort(t, n, sizeof *t, rwd__cmp_xi);
    for (i = 0; i < n; i++) order[i] = t[i].i;
    MOE_FREE(t);
    return MOE_OK;
}

/* k-th smallest of a[0..n) (a is reordered): Hoare selection, median-of-three pivots */
static double rwd__select(double *a, size_t n, size_t k) {
    size_t lo = 0, hi = n - 1;
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2, i = lo, j = hi;
        double pv, t;
        if (a[mid] < a[lo]) { t = a[mid]; a[mid] = a[lo]; a[lo] = t; }
        if (a[hi] < a[lo]) { t = a[hi]; a[hi] = a[lo]; a[lo] = t; }
        if (a[hi] < a[mid]) { t = a[hi]; a[hi] = a[mid]; a[mid] = t; }
        pv = a[mid];
        while (i <= j) {
            while (a[i] < pv) i++;
            while (a[j] > pv) j--;
            if (i <= j) {
                t = a[i]; a[i] = a[j]; a[j] = t;
                i++;
                if (j == 0) break;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* numpy's median: the middle value, or the mean of the two middle values */
static double rwd__median(double *a, size_t n) {
    double hi = rwd__select(a, n, n / 2), lo;
    size_t i;
    if (n % 2) return hi;
    lo = a[0]; /* after selection, a[0 .. n/2) holds the smaller half */
    for (i = 1; i < n / 2; i++)
        if (a[i] > lo) lo = a[i];
    return (lo + hi) / 2.0;
}

static moe_status rwd__lowess_check(const double *x, const double *y, size_t n, double frac, int iters, moe_err *err) {
    size_t i;
    if (!x || !y || n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs at least one point (got n = %zu)", n);
    if (!(frac > 0.0 && frac <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS frac must be in (0, 1], got %g", frac);
    if (iters < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS iterations must be >= 0, got %d", iters);
    for (i = 0; i < n; i++)
        if (!isfinite(x[i]) || !isfinite(y[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS point %zu is not finite (x = %g, y = %g)", i, x[i], y[i]);
    return MOE_OK;
}

/* statsmodels' neighbourhood size: floor(frac n + 1e-10) clamped to [2, n] */
static size_t rwd__lowess_k(size_t n, double frac) {
    size_t k = (size_t)(frac * (double)n + 1e-10);
    if (k < 2) k = 2;
    if (k > n) k = n;
    return k;
}

/* tricube weight exactly as statsmodels computes it: u = |xj - x0| / h; (1 - u^3)^3 */
static double rwd__tricube(double xj, double x0, double h) {
    double u = fabs(xj - x0) / h, t;
    u = u * u * u;
    t = 1.0 - u;
    return t * t * t;
}

/* Robustness weights from the residuals of the pass just made; returns 0 when statsmodels
   stops iterating (median absolute residual <= 1e-7). resid: (n) scratch. */
static int rwd__lowess_robust(double *rho, double *resid, const double *ys, const double *fs, size_t n) {
    double m, scale;
    size_t j;
    for (j = 0; j < n; j++) resid[j] = fabs(ys[j] - fs[j]);
    m = rwd__median(resid, n);
    if (m <= 1e-7) return 0;
    scale = 6.0 * m;
    for (j = 0; j < n; j++) {
        double u = fabs(ys[j] - fs[j]) / scale, t;
        if (u > 1.0) u = 1.0;
        t = 1.0 - u * u;
        rho[j] = t * t;
    }
    return 1;
}

/* Sorted copies xs, ys of the input and the sort order; one allocation, freed by the caller. */
static moe_status rwd__lowess_sorted(double **mem, size_t **order, double **xs, double **ys, const double *x,
                                     const double *y, size_t n, size_t extra_doubles, moe_err *err) {
    size_t i;
    moe_status st;
    *mem = (double *)MOE_MALLOC((2 * n + extra_doubles) * sizeof(double) + n * sizeof(size_t));
    if (!*mem) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for LOWESS on %zu points", n);
    *xs = *mem;
    *ys = *xs + n;
    *order = (size_t *)(void *)(*ys + n + extra_doubles);
    if ((st = rwd__argsort(*order, x, n, err)) != MOE_OK) { MOE_FREE(*mem); return st; }
    for (i = 0; i < n; i++) { (*xs)[i] = x[(*order)[i]]; (*ys)[i] = y[(*order)[i]]; }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lowess_naive(double *fit, const double *x, const double *y, size_t n,
                                      double frac, int iters, moe_err *err) {
    double *mem, *xs, *ys, *fs, *rho, *w, *resid;
    size_t *order, k, i, j;
    int pass;
    moe_status st = rwd__lowess_check(x, y, n, frac, iters, err);
    if (st != MOE_OK) return st;
    if (!fit) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs an output array");
    if ((st = rwd__lowess_sorted(&mem, &order, &xs, &ys, x, y, n, 4 * n, err)) != MOE_OK) return st;
    fs = ys + n; rho = fs + n; w = rho + n; resid = w + n;
    k = rwd__lowess_k(n, frac);
    for (j = 0; j < n; j++) rho[j] = 1.0;
    for (pass = 0; pass <= iters; pass++) {
        size_t L = 0, R = k;
        i = 0;
        while (i < n) {
            double x0 = xs[i], h, sw = 0.0, xbar = 0.0, var = 0.0, f = 0.0;
            int nonzero = 0;
            while (R < n && x0 > (xs[L] + xs[R]) / 2.0) { L++; R++; }
            h = fmax(x0 - xs[L], xs[R - 1] - x0);
            for (j = L; j < R; j++) {
                w[j] = rwd__tricube(xs[j], x0, h) * rho[j]; /* NaN when h == 0 */
                sw += w[j];
                nonzero += w[j] > 1e-12;
            }
            if (nonzero < 2) f = ys[i];
            else {
                for (j = L; j < R; j++) w[j] /= sw;
                for (j = L; j < R; j++) xbar += w[j] * xs[j];
                for (j = L; j < R; j++) var += w[j] * (xs[j] - xbar) * (xs[j] - xbar);
                var = fmax(var, 1e-12);
                for (j = L; j < R; j++) f += w[j] * (1.0 + (x0 - xbar) * (xs[j] - xbar) / var) * ys[j];
            }
            fs[i++] = f;
            while (i < n && xs[i] == x0) fs[i++] = f; /* ties share the fit */
        }
        if (pass < iters && !rwd__lowess_robust(rho, resid, ys, fs, n)) break;
    }
    for (i = 0; i < n; i++) fit[order[i]] = fs[i];
    MOE_FREE(mem);
    return MOE_OK;
}

/* The fast LOWESS. Points with equal x get equal tricube weights, so within a tie group only
   S_rho = sum rho_j and S_rhoy = sum rho_j y_j matter: a query costs O(distinct x in its
   window), not O(window). Window edges may cut a tie group; the cut part is summed point by
   point (it almost always has weight 0 anyway). statsmodels' "at least two weights > 1e-12"
   test needs only the two largest rho of a group. Queries (one per distinct x) are
   independent once the windows are known, so they run in parallel, each summing in a fixed
   order (4 interleaved partial sums, so the loop vectorizes): any thread count, same bits. */
typedef struct rwd__lw {
    const double *xs, *ys, *rho;   /* (n) sorted points, robustness weights             */
    const size_t *gstart, *gof;    /* (G+1) first point of each distinct x; (n) group of a point */
    const double *gx;              /* (G) the distinct x values                          */
    const double *srho, *srhoy;    /* (G) group sums                                     */
    const double *r1, *r2;         /* (G) largest, second largest rho in the group (or -1) */
} rwd__lw;

/* what a window holds for the local fit at x0: S0 = sum w, S1 = sum w x (pass 1, with the
   count of weights > 1e-12); then V = sum w (x - xbar)^2, Ty = sum w y, Txy = sum w y (x - xbar)
   (pass 2, xbar = S1 / S0). w = tricube * rho, unnormalised. */
typedef struct rwd__wsum { double s0, s1, v, ty, txy; int nonzero; } rwd__wsum;

static void rwd__lowess_group(rwd__wsum *w, int pass, double xg, double t, double sr, double sry, double xbar) {
    if (pass == 1) {
        w->s0 += t * sr;
        w->s1 += t * sr * xg;
    } else {
        double dx = xg - xbar;
        w->v += t * sr * dx * dx;
        w->ty += t * sry;
        w->txy += t * sry * dx;
    }
}

static void rwd__lowess_window(const rwd__lw *a, rwd__wsum *w, int pass, size_t L, size_t R, double x0, double h, double xbar) {
    size_t gl = a->gof[L], gr = a->gof[R - 1], g0 = gl, g1 = gr + 1, g, j, e;
    double acc[3][4], nzl[4];
    int k, nz = 0;
    for (e = 0; e < 2; e++) { /* a group cut by the left (e = 0) or right edge: point by point */
        size_t g_edge = e ? gr : gl, lo = a->gstart[g_edge], hi = a->gstart[g_edge + 1];
        double t, sr = 0.0, sry = 0.0;
        if ((lo >= L && hi <= R) || (e == 1 && gr < g0)) continue;
        t = rwd__tricube(a->gx[g_edge], x0, h);
        for (j = lo < L ? L : lo; j < (hi > R ? R : hi); j++) {
            sr += a->rho[j];
            sry += a->rho[j] * a->ys[j];
            nz += t * a->rho[j] > 1e-12;
        }
        rwd__lowess_group(w, pass, a->gx[g_edge], t, sr, sry, xbar);
        if (e == 0) g0 = gl + 1;
        else g1 = gr;
    }
    memset(acc, 0, sizeof acc);
    memset(nzl, 0, sizeof nzl);
    g = g0;
    if (pass == 1) /* whole groups, 4 lanes, no branches: the compiler vectorizes this */
        for (; g + 4 <= g1; g += 4)
            for (k = 0; k < 4; k++) {
                double t = rwd__tricube(a->gx[g + k], x0, h), ts = t * a->srho[g + k];
                acc[0][k] += ts;
                acc[1][k] += ts * a->gx[g + k];
                nzl[k] += (double)(t * a->r1[g + k] > 1e-12) + (double)(t * a->r2[g + k] > 1e-12);
            }
    else
        for (; g + 4 <= g1; g += 4)
            for (k = 0; k < 4; k++) {
                double t = rwd__tricube(a->gx[g + k], x0, h), dx = a->gx[g + k] - xbar, ty = t * a->srhoy[g + k];
                acc[0][k] += t * a->srho[g + k] * dx * dx;
                acc[1][k] += ty;
                acc[2][k] += ty * dx;
            }
    nz += (int)((nzl[0] + nzl[1]) + (nzl[2] + nzl[3]));
    for (; g < g1; g++) { /* the last 0-3 groups */
        double t = rwd__tricube(a->gx[g], x0, h);
        if (pass == 1) nz += (t * a->r1[g] > 1e-12) + (t * a->r2[g] > 1e-12);
        rwd__lowess_group(w, pass, a->gx[g], t, a->srho[g], a->srhoy[g], xbar);
    }
    if (pass == 1) {
        w->s0 += (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
        w->s1 += (acc[1][0] + acc[1][1]) + (acc[1][2] + acc[1][3]);
        w->nonzero = nz;
    } else {
        w->v += (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
        w->ty += (acc[1][0] + acc[1][1]) + (acc[1][2] + acc[1][3]);
        w->txy += (acc[2][0] + acc[2][1]) + (acc[2][2] + acc[2][3]);
    }
}

RWD__IMPL moe_status rwd_lowess(double *fit, const double *x, const double *y, size_t n, double frac,
                                int iters, moe_err *err) {
    double *mem, *xs, *ys, *rho, *fs, *resid, *gx, *srho, *srhoy, *r1, *r2, *gfit;
    size_t *order, *gstart, *gof, *wl, *wr, k, G = 0, i, j, g;
    long long gq, ng;
    int pass;
    rwd__lw a;
    moe_status st = rwd__lowess_check(x, y, n, frac, iters, err);
    if (st != MOE_OK) return st;
    if (!fit) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs an output array");
    /* doubles after xs, ys: rho, fs, resid (n each); gx, srho, srhoy, r1, r2, gfit (G <= n each) */
    if ((st = rwd__lowess_sorted(&mem, &order, &xs, &ys, x, y, n, 9 * n, err)) != MOE_OK) return st;
    rho = ys + n; fs = rho + n; resid = fs + n;
    gx = resid + n; srho = gx + n; srhoy = srho + n; r1 = srhoy + n; r2 = r1 + n; gfit = r2 + n;
    gstart = (size_t *)MOE_MALLOC((4 * n + 1) * sizeof(size_t));
    if (!gstart) { MOE_FREE(mem); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for LOWESS on %zu points", n); }
    gof = gstart + n + 1; wl = gof + n; wr = wl + n;
    for (i = 0; i < n; i++) {
        if (i == 0 || xs[i] != xs[i - 1]) { gx[G] = xs[i]; gstart[G++] = i; }
        gof[i] = G - 1;
    }
    gstart[G] = n;
    /* statsmodels' sliding window, evaluated once per distinct x (its tie skip does the same) */
    k = rwd__lowess_k(n, frac);
    {
        size_t L = 0, R = k;
        for (g = 0; g < G; g++) {
            double x0 = gx[g];
            while (R < n && x0 > (xs[L] + xs[R]) / 2.0) { L++; R++; }
            wl[g] = L; wr[g] = R;
        }
    }
    for (j = 0; j < n; j++) rho[j] = 1.0;
    a.xs = xs; a.ys = ys; a.rho = rho; a.gstart = gstart; a.gof = gof; a.gx = gx;
    a.srho = srho; a.srhoy = srhoy; a.r1 = r1; a.r2 = r2;
    ng = (long long)G;
    for (pass = 0; pass <= iters; pass++) {
        double work = 0.0;
        for (g = 0; g < G; g++) {
            double s = 0.0, sy = 0.0, m1 = -1.0, m2 = -1.0;
            for (j = gstart[g]; j < gstart[g + 1]; j++) {
                s += rho[j];
                sy += rho[j] * ys[j];
                if (rho[j] > m1) { m2 = m1; m1 = rho[j]; }
                else if (rho[j] > m2) m2 = rho[j];
            }
            srho[g] = s; srhoy[g] = sy; r1[g] = m1; r2[g] = m2;
            work += (double)(gof[wr[g] - 1] - gof[wl[g]] + 1);
        }
        (void)work; /* read only by the OpenMP clause */
        MOE_OMP_FOR_IF(work > 1e6)
        for (gq = 0; gq < ng; gq++) {
            size_t L = wl[gq], R = wr[gq];
            double x0 = gx[gq], h = fmax(x0 - xs[L], xs[R - 1] - x0), xbar, v;
            rwd__wsum w;
            memset(&w, 0, sizeof w);
            if (h > 0.0) rwd__lowess_window(&a, &w, 1, L, R, x0, h, 0.0);
            if (w.nonzero < 2) { gfit[gq] = ys[gstart[gq]]; continue; } /* also h == 0 */
            xbar = w.s1 / w.s0;
            rwd__lowess_window(&a, &w, 2, L, R, x0, h, xbar);
            v = fmax(w.v / w.s0, 1e-12);
            gfit[gq] = w.ty / w.s0 + (x0 - xbar) * (w.txy / w.s0) / v;
        }
        for (j = 0; j < n; j++) fs[j] = gfit[gof[j]];
        if (pass < iters && !rwd__lowess_robust(rho, resid, ys, fs, n)) break;
    }
    for (i = 0; i < n; i++) fit[order[i]] = fs[i];
    MOE_FREE(gstart);
    MOE_FREE(mem);
    return MOE_OK;
}

/* ============================================================================================
   >>rwd:calib
   ============================================================================================ */

static moe_status rwd__check_finite(const double *a, size_t n, const char *what, moe_err *err) {
    size_t i;
    if (!a) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: missing array", what);
    for (i = 0; i < n; i++)
        if (!isfinite(a[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s[%zu] is not a finite number (%g)", what, i, a[i]);
    return MOE_OK;
}

/* Scores and characteristics enter sums, means and squares: beyond this magnitude the
   arithmetic overflows (a score of 1e308 calibrated to inf, or to 0 through inf - inf). */
#define RWD__CAL_MAX_ABS 1e150

static moe_status rwd__check_magnitude(const double *a, size_t n, const char *what, moe_err *err) {
    size_t i;
    moe_status st = rwd__check_finite(a, n, what, err);
    if (st != MOE_OK) return st;
    for (i = 0; i < n; i++)
        if (fabs(a[i]) > RWD__CAL_MAX_ABS)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s[%zu] is %g: calibration takes magnitudes up to %g (rescale the values)", what, i,
                               a[i], RWD__CAL_MAX_ABS);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lwr_fit(rwd_lwr *m, const double *x, const double *y, size_t n, double frac,
                                 int iters, moe_err *err) {
    double *fit;
    size_t *order, i, u = 0;
    moe_status st;
    memset(m, 0, sizeof *m);
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR needs at least one point to fit");
    fit = (double *)MOE_MALLOC(n * sizeof(double));
    order = (size_t *)MOE_MALLOC(n * sizeof(size_t));
    m->x = (double *)MOE_MALLOC(n * sizeof(double));
    m->fit = (double *)MOE_MALLOC(n * sizeof(double));
    if (!fit || !order || !m->x || !m->fit) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu points", n);
    else if ((st = rwd_lowess(fit, x, y, n, frac, iters, err)) == MOE_OK && (st = rwd__argsort(order, x, n, err)) == MOE_OK) {
        for (i = 0; i < n; i++) /* ties share one fitted value: keep one entry per x */
            if (u == 0 || x[order[i]] != m->x[u - 1]) {
                m->x[u] = x[order[i]];
                m->fit[u++] = fit[order[i]];
            }
        m->n = u;
    }
    MOE_FREE(fit);
    MOE_FREE(order);
    if (st != MOE_OK) rwd_lwr_free(m);
    return st;
}

RWD__IMPL double rwd_lwr_predict(const rwd_lwr *m, double c, int interpolate) {
    size_t lo = 0, hi = m->n;
    if (m->n == 0) return NAN;
    while (lo < hi) { /* bisect_left: first x >= c */
        size_t mid = lo + (hi - lo) / 2;
        if (m->x[mid] < c) lo = mid + 1;
        else hi = mid;
    }
    if (lo == m->n) return m->fit[m->n - 1];
    if (!interpolate || lo == 0 || m->x[lo] == c) return m->fit[lo];
    {
        double t = (c - m->x[lo - 1]) / (m->x[lo] - m->x[lo - 1]);
        return m->fit[lo - 1] + t * (m->fit[lo] - m->fit[lo - 1]);
    }
}

RWD__IMPL void rwd_lwr_free(rwd_lwr *m) {
    MOE_FREE(m->x);
    MOE_FREE(m->fit);
    memset(m, 0, sizeof *m);
}

RWD__IMPL moe_status rwd_calibrate_lwr(double *out, const double *c, const double *r, size_t n,
                                       double frac, int iters, double alpha, moe_err *err) {
    size_t i;
    double *fit;
    moe_status st;
    if (!out) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR needs an output array");
    if (!isfinite(alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-LWR alpha must be finite, got %g", alpha);
    fit = (double *)MOE_MALLOC((n ? n : 1) * sizeof(double));
    if (!fit) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu points", n);
    /* every query is a fitted point, so the official code's bisect_left lookup is the point's own fit */
    st = rwd_lowess(fit, c, r, n, frac, iters, err);
    if (st == MOE_OK)
        for (i = 0; i < n; i++) out[i] = r[i] - alpha * fit[i];
    MOE_FREE(fit);
    return st;
}

static size_t rwd__lower_bound(const double *a, size_t n, double v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static size_t rwd__upper_bound(const double *a, size_t n, double v) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] <= v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

RWD__IMPL moe_status rwd_calibrate_mean(double *out_w, double *out_l, const double *s_w,
                                        const double *s_l, const double *c_w, const double *c_l,
                                        size_t n, double ratio, int min_count, double alpha,
                                        int shuffle, uint64_t seed, moe_err *err) {
    size_t m = 2 * n, i, *perm, *order;
    double *pc, *pr, *sc, *sr, T = 0.0;
    moe_status st;
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean needs at least one pair");
    if (!out_w || !out_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean needs output arrays");
    if (!(ratio > 0.0) || !isfinite(ratio)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean ratio must be a positive number, got %g", ratio);
    if (min_count < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean min_count must be >= 0, got %d", min_count);
    if (!isfinite(alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean alpha must be finite, got %g", alpha);
    if (m > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "RC-Mean takes at most %d responses", INT_MAX);
    if ((st = rwd__check_finite(s_w, n, "chosen scores", err)) || (st = rwd__check_finite(s_l, n, "rejected scores", err)) ||
        (st = rwd__check_finite(c_w, n, "chosen characteristic", err)) || (st = rwd__check_finite(c_l, n, "rejected characteristic", err)))
        return st;
    pc = (double *)moe__calloc(4 * m, sizeof(double)); /* zeroed: quiets gcc -Wmaybe-uninitialized */
    perm = (size_t *)MOE_MALLOC(2 * m * sizeof(size_t));
    if (!pc || !perm) {
        MOE_FREE(pc); MOE_FREE(perm);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-Mean on %zu pairs", n);
    }
    pr = pc + m; sc = pr + m; sr = sc + m; order = perm + m;
    for (i = 0; i < m; i++) perm[i] = i;
    if (shuffle) { /* Fisher-Yates as Python's random.shuffle, but seeded */
        moe_rng rng;
        moe_rng_seed(&rng, seed);
        for (i = m - 1; i > 0; i--) {
            size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
    }
    for (i = 0; i < m; i++) { /* pooled interleaved: point 2p is pair p's chosen, 2p+1 its rejected */
        size_t q = perm[i] / 2;
        pc[i] = (perm[i] % 2) ? c_l[q] : c_w[q];
        pr[i] = (perm[i] % 2) ? s_l[q] : s_w[q];
    }
    if ((st = rwd__argsort(order, pc, m, err)) == MOE_OK) {
        for (i = 0; i < m; i++) { sc[i] = pc[order[i]]; sr[i] = pr[order[i]]; }
        for (i = 0; i < n; i++) T += fabs(c_w[i] - c_l[i]);
        T = T / (double)n / ratio;
        for (i = 0; i < n; i++) {
            double mean[2], cq[2], sq[2];
            size_t cnt[2];
            int side;
            cq[0] = c_w[i]; cq[1] = c_l[i]; sq[0] = s_w[i]; sq[1] = s_l[i];
            for (side = 0; side < 2; side++) {
                /* Python's all_scores[bisect_left(c0 - T) : bisect_right(c0 + T) - 1] */
                size_t a = rwd__lower_bound(sc, m, cq[side] - T), b = rwd__upper_bound(sc, m, cq[side] + T) - 1, j;
                double sum = 0.0;
                cnt[side] = b > a ? b - a : 0;
                for (j = a; j < b; j++) sum += sr[j];
                mean[side] = cnt[side] ? sum / (double)cnt[side] : 0.0;
            }
            if (cnt[0] >= (size_t)min_count && cnt[1] >= (size_t)min_count && cnt[0] > 0 && cnt[1] > 0) {
                out_w[i] = sq[0] - alpha * mean[0];
                out_l[i] = sq[1] - alpha * mean[1];
            } else {
                out_w[i] = sq[0];
                out_l[i] = sq[1];
            }
        }
    }
    MOE_FREE(pc);
    MOE_FREE(perm);
    return st;
}

RWD__IMPL rwd_cal_config rwd_cal_config_default(void) {
    rwd_cal_config c;
    memset(&c, 0, sizeof c);
    c.method = RWD_CAL_LWR;
    c.frac = 1.0;
    c.iters = 3;
    c.alpha = 1.0;
    c.ratio = 4.0;
    c.min_count = 20;
    c.shuffle = 1;
    c.seed = 0;
    c.penalty = 0.001;
    return c;
}

RWD__IMPL moe_status rwd_cal_config_check(const rwd_cal_config *c, moe_err *err) {
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "no calibration config");
    if (c->method < RWD_CAL_LWR || c->method > RWD_CAL_PENALTY_MEAN) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown calibration method %d", c->method);
    if (!(c->frac > 0.0 && c->frac <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "frac must be in (0, 1], got %g", c->frac);
    if (c->iters < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "iters must be >= 0, got %d", c->iters);
    if (!isfinite(c->alpha)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "alpha must be finite, got %g", c->alpha);
    if (!(c->ratio > 0.0) || !isfinite(c->ratio)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "ratio must be a positive number, got %g", c->ratio);
    if (c->min_count < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "min_count must be >= 0, got %d", c->min_count);
    if (!isfinite(c->penalty)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "penalty must be finite, got %g", c->penalty);
    return MOE_OK;
}

/* one characteristic with the method's calibrator (LWR or Mean), inputs may alias outputs */
static moe_status rwd__calibrate_feature(double *out_w, double *out_l, const double *s_w, const double *s_l,
                                         const double *c_w, const double *c_l, size_t n, double alpha,
                                         const rwd_cal_config *c, moe_err *err) {
    double *pool;
    moe_status st;
    if (c->method == RWD_CAL_MEAN || c->method == RWD_CAL_PENALTY_MEAN)
        return rwd_calibrate_mean(out_w, out_l, s_w, s_l, c_w, c_l, n, c->ratio, c->min_count, alpha, c->shuffle, c->seed, err);
    /* RC-LWR pools all chosen, then all rejected (the official code's x_train) */
    pool = (double *)MOE_MALLOC((4 * n + 1) * sizeof(double));
    if (!pool) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for RC-LWR on %zu pairs", n);
    memcpy(pool, c_w, n * sizeof(double));
    memcpy(pool + n, c_l, n * sizeof(double));
    memcpy(pool + 2 * n, s_w, n * sizeof(double));
    memcpy(pool + 3 * n, s_l, n * sizeof(double));
    st = rwd_calibrate_lwr(pool + 2 * n, pool, pool + 2 * n, 2 * n, c->frac, c->iters, alpha, err);
    if (st == MOE_OK) {
        memcpy(out_w, pool + 2 * n, n * sizeof(double));
        memcpy(out_l, pool + 3 * n, n * sizeof(double));
    }
    MOE_FREE(pool);
    return st;
}

RWD__IMPL moe_status rwd_calibrate_sequence(double *out_w, double *out_l, const double *s_w,
                                            const double *s_l, const double *const *c_w,
                                            const double *const *c_l, const double *alpha,
                                            int n_features, const double *t_w, const double *t_l,
                                            size_t n, const rwd_cal_config *c, moe_err *err) {
    size_t i;
    int f, pen;
    moe_status st;
    if ((st = rwd_cal_config_check(c, err)) != MOE_OK) return st;
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs at least one pair");
    if (!out_w || !out_l || n_features < 0 || (n_features > 0 && (!c_w || !c_l || !alpha)))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs outputs and, per feature, characteristics and an alpha");
    if ((st = rwd__check_magnitude(s_w, n, "chosen scores", err)) || (st = rwd__check_magnitude(s_l, n, "rejected scores", err))) return st;
    for (f = 0; f < n_features; f++)
        if ((st = rwd__check_magnitude(c_w[f], n, "chosen characteristic", err)) || (st = rwd__check_magnitude(c_l[f], n, "rejected characteristic", err)))
            return st;
    pen = c->method == RWD_CAL_PENALTY || c->method == RWD_CAL_PENALTY_LWR || c->method == RWD_CAL_PENALTY_MEAN;
    if (pen) { /* the paper's baseline: r - penalty * length of the full chat-formatted text.
                  Each response uses its own length; the official calibrate_alpacaeval.py
                  penalises the baseline's score with the evaluated model's length instead. */
        const double *lw = t_w ? t_w : (n_features > 0 ? c_w[0] : NULL), *ll = t_l ? t_l : (n_features > 0 ? c_l[0] : NULL);
        if (!lw || !ll) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the length penalty needs text lengths");
        if ((st = rwd__check_magnitude(lw, n, "chosen text length", err)) || (st = rwd__check_magnitude(ll, n, "rejected text length", err))) return st;
        for (i = 0; i < n; i++) {
            out_w[i] = s_w[i] - c->penalty * lw[i];
            out_l[i] = s_l[i] - c->penalty * ll[i];
        }
    } else {
        memmove(out_w, s_w, n * sizeof(double));
        memmove(out_l, s_l, n * sizeof(double));
    }
    if (c->method != RWD_CAL_PENALTY)
        for (f = 0; f < n_features; f++)
            if ((st = rwd__calibrate_feature(out_w, out_l, out_w, out_l, c_w[f], c_l[f], n, alpha[f], c, err)) != MOE_OK) return st;
    for (i = 0; i < n; i++) /* a calibrated score is a number, or the call says why not */
        if (!isfinite(out_w[i]) || !isfinite(out_l[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibrating pair %zu gave %g, %g: the scores, lengths or alpha are too large (rescale them)", i,
                               out_w[i], out_l[i]);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_calibrate_pairs(double *out_w, double *out_l, const double *s_w,
                                         const double *s_l, const double *c_w, const double *c_l,
                                         const double *t_w, const double *t_l, size_t n,
                                         const rwd_cal_config *c, moe_err *err) {
    const double *cw[1], *cl[1];
    double alpha[1];
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "no calibration config");
    cw[0] = c_w; cl[0] = c_l; alpha[0] = c->alpha;
    if (!c_w || !c_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "calibration needs the responses' characteristic (length)");
    return rwd_calibrate_sequence(out_w, out_l, s_w, s_l, cw, cl, alpha, 1, t_w, t_l, n, c, err);
}

/* ============================================================================================
   >>rwd:metrics
   ============================================================================================ */

RWD__IMPL double rwd_pair_accuracy(const double *s_w, const double *s_l, size_t n) {
    size_t i, ok = 0;
    if (n == 0) return NAN;
    for (i = 0; i < n; i++) ok += s_w[i] > s_l[i];
    return (double)ok / (double)n;
}

RWD__IMPL double rwd_longer_wins_accuracy(const double *len_w, const double *len_l, size_t n) {
    return rwd_pair_accuracy(len_w, len_l, n);
}

RWD__IMPL double rwd_shorter_chosen_accuracy(const double *s_w, const double *s_l,
                                             const double *len_w, const double *len_l, size_t n,
                                             size_t *n_sub) {
    size_t i, m = 0, ok = 0;
    for (i = 0; i < n; i++)
        if (len_w[i] < len_l[i]) {
            m++;
            ok += s_w[i] > s_l[i];
        }
    if (n_sub) *n_sub = m;
    return m ? (double)ok / (double)m : NAN;
}

RWD__IMPL double rwd_preference_changed(const double *a_w, const double *a_l, const double *b_w,
                                        const double *b_l, size_t n) {
    size_t i, changed = 0;
    if (n == 0) return NAN;
    for (i = 0; i < n; i++) changed += (a_w[i] > a_l[i]) != (b_w[i] > b_l[i]);
    return (double)changed / (double)n;
}

/* average ranks (1-based, ties share the mean rank), as scipy.stats.rankdata */
static moe_status rwd__ranks(double *rank, const double *a, size_t n) {
    size_t *order = (size_t *)MOE_MALLOC((n ? n : 1) * sizeof(size_t)), i = 0, j;
    if (!order || rwd__argsort(order, a, n, NULL) != MOE_OK) { MOE_FREE(order); return MOE_ERR_NOMEM; }
    while (i < n) {
        for (j = i + 1; j < n && a[order[j]] == a[order[i]]; j++) {}
        {
            double r = 0.5 * (double)(i + 1 + j); /* mean of ranks i+1 .. j */
            size_t t;
            for (t = i; t < j; t++) rank[order[t]] = r;
        }
        i = j;
    }
    MOE_FREE(order);
    return MOE_OK;
}

RWD__IMPL double rwd_spearman(const double *a, const double *b, size_t n) {
    double *r, rho;
    if (n < 2) return NAN;
    r = (double *)MOE_MALLOC(2 * n * sizeof(double));
    if (!r || rwd__ranks(r, a, n) != MOE_OK || rwd__ranks(r + n, b, n) != MOE_OK) { MOE_FREE(r); return NAN; }
    rho = moe_pearson(r, r + n, n);
    MOE_FREE(r);
    return rho;
}

RWD__IMPL double rwd_length_correlation(const double *s_w, const double *s_l, const double *len_w,
                                        const double *len_l, size_t n) {
    double *buf, rho;
    if (n == 0) return NAN;
    buf = (double *)MOE_MALLOC(4 * n * sizeof(double));
    if (!buf) return NAN;
    memcpy(buf, len_w, n * sizeof(double));
    memcpy(buf + n, len_l, n * sizeof(double));
    memcpy(buf + 2 * n, s_w, n * sizeof(double));
    memcpy(buf + 3 * n, s_l, n * sizeof(double));
    rho = rwd_spearman(buf, buf + 2 * n, 2 * n);
    MOE_FREE(buf);
    return rho;
}

/* The RewardBench leaderboard's EXAMPLE_COUNTS (github.com/allenai/reward-bench,
   rewardbench/constants.py): weights, not always pair counts (math-prm has 447 pairs, weight
   984; xstest-should-refuse has 154 pairs and weight 250, xstest-should-respond the other way
   round). */
static const struct rwd__rb_subset {
    const char *name;
    int section;
    double weight;
} rwd__rb_subsets[] = {
    {"alpacaeval-easy", RWD_SECTION_CHAT, 100}, {"alpacaeval-length", RWD_SECTION_CHAT, 95},
    {"alpacaeval-hard", RWD_SECTION_CHAT, 95}, {"mt-bench-easy", RWD_SECTION_CHAT, 28},
    {"mt-bench-med", RWD_SECTION_CHAT, 40},
    {"mt-bench-hard", RWD_SECTION_CHAT_HARD, 37}, {"llmbar-natural", RWD_SECTION_CHAT_HARD, 100},
    {"llmbar-adver-neighbor", RWD_SECTION_CHAT_HARD, 134}, {"llmbar-adver-GPTInst", RWD_SECTION_CHAT_HARD, 92},
    {"llmbar-adver-GPTOut", RWD_SECTION_CHAT_HARD, 47}, {"llmbar-adver-manual", RWD_SECTION_CHAT_HARD, 46},
    {"refusals-dangerous", RWD_SECTION_SAFETY, 100}, {"refusals-offensive", RWD_SECTION_SAFETY, 100},
    {"xstest-should-refuse", RWD_SECTION_SAFETY, 250}, {"xstest-should-respond", RWD_SECTION_SAFETY, 154},
    {"donotanswer", RWD_SECTION_SAFETY, 136},
    {"math-prm", RWD_SECTION_REASONING, 984}, {"hep-cpp", RWD_SECTION_REASONING, 164},
    {"hep-go", RWD_SECTION_REASONING, 164}, {"hep-java", RWD_SECTION_REASONING, 164},
    {"hep-js", RWD_SECTION_REASONING, 164}, {"hep-python", RWD_SECTION_REASONING, 164},
    {"hep-rust", RWD_SECTION_REASONING, 164},
};

RWD__IMPL const char *rwd_section_name(int section) {
    static const char *const names[RWD_N_SECTIONS] = {"chat", "chat_hard", "safety", "reasoning"};
    return (section >= 0 && section < RWD_N_SECTIONS) ? names[section] : "unknown";
}

RWD__IMPL int rwd_rewardbench_subset(const char *name, double *weight) {
    size_t i;
    for (i = 0; i < sizeof rwd__rb_subsets / sizeof rwd__rb_subsets[0]; i++)
        if (strcmp(name, rwd__rb_subsets[i].name) == 0) {
            if (weight) *weight = rwd__rb_subsets[i].weight;
            return rwd__rb_subsets[i].section;
        }
    if (weight) *weight = 0.0;
    return -1;
}

RWD__IMPL moe_status rwd_subset_accuracy(double *acc, size_t *count, const int *subset, const double *s_w,
                                         const double *s_l, size_t n, int n_subsets, moe_err *err) {
    size_t i;
    int k;
    if (!acc || !subset || !s_w || !s_l || n_subsets < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_subset_accuracy needs arrays and n_subsets >= 1");
    for (i = 0; i < n; i++)
        if (subset[i] < 0 || subset[i] >= n_subsets) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair %zu has subset %d, outside [0, %d)", i, subset[i], n_subsets);
    for (k = 0; k < n_subsets; k++) acc[k] = 0.0;
    if (count) memset(count, 0, (size_t)n_subsets * sizeof(size_t));
    { /* counts go to the caller's array, or to a scratch one */
        size_t *c = count ? count : (size_t *)moe__calloc((size_t)n_subsets, sizeof(size_t));
        if (!c) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %d subsets", n_subsets);
        for (i = 0; i < n; i++) {
            c[subset[i]]++;
            acc[subset[i]] += s_w[i] > s_l[i];
        }
        for (k = 0; k < n_subsets; k++) acc[k] = c[k] ? acc[k] / (double)c[k] : NAN;
        if (!count) MOE_FREE(c);
    }
    return MOE_OK;
}

RWD__IMPL void rwd_rewardbench_scores(double *section, double *overall, const char *const *names,
                                      const double *acc, size_t n_subsets) {
    double num[RWD_N_SECTIONS], den[RWD_N_SECTIONS], total = 0.0;
    size_t i;
    int s, present = 0;
    for (s = 0; s < RWD_N_SECTIONS; s++) num[s] = den[s] = 0.0;
    for (i = 0; i < n_subsets; i++) {
        double w;
        s = rwd_rewardbench_subset(names[i], &w);
        if (s >= 0 && !isnan(acc[i])) { num[s] += w * acc[i]; den[s] += w; }
    }
    for (s = 0; s < RWD_N_SECTIONS; s++) {
        section[s] = den[s] > 0.0 ? num[s] / den[s] : NAN;
        if (den[s] > 0.0) { total += section[s]; present++; }
    }
    if (overall) *overall = present ? total / present : NAN;
}

RWD__IMPL moe_status rwd_winrate_compute(rwd_winrate *w, const double *preference, const double *length,
                                         size_t n, moe_err *err) {
    double sum = 0.0, mean, ss = 0.0, lsum = 0.0;
    size_t i;
    memset(w, 0, sizeof *w);
    if (n < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a win rate needs at least 2 annotations, got %zu", n);
    for (i = 0; i < n; i++) {
        double v = preference[i];
        if (!(v == 0.0 || (v >= 1.0 && v <= 2.0))) return moe_err_set(err, MOE_ERR_INVALID_ARG, "preference %zu is %g, outside [1, 2] (or 0 for a draw)", i, v);
    }
    for (i = 0; i < n; i++) {
        double p = (preference[i] == 0.0 ? 1.5 : preference[i]) - 1.0;
        sum += p;
        w->n_wins += p > 0.5;
        w->n_wins_base += p < 0.5;
        w->n_draws += p == 0.5;
    }
    mean = sum / (double)n;
    for (i = 0; i < n; i++) {
        double p = (preference[i] == 0.0 ? 1.5 : preference[i]) - 1.0;
        ss += (p - mean) * (p - mean);
        if (length) lsum += length[i];
    }
    w->n_total = (int)n;
    w->win_rate = 100.0 * mean;
    w->standard_error = 100.0 * sqrt(ss / (double)(n - 1)) / sqrt((double)n);
    /* divide, then scale: AlpacaEval's order, which the leaderboard's last digit shows */
    w->discrete_win_rate = ((double)w->n_wins + 0.5 * (double)w->n_draws) / (double)n * 100.0;
    w->avg_length = length ? floor(lsum / (double)n) : NAN;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_winrate_from_annotations(rwd_winrate *w, const char *json, size_t len,
                                                  moe_err *err) {
    rwd_json doc;
    const rwd_json_node *root, *a;
    double *pref = NULL, *length = NULL;
    size_t n = 0;
    moe_status st;
    memset(&doc, 0, sizeof doc);
    memset(w, 0, sizeof *w);
    if ((st = rwd_json_parse(&doc, json, len, 1, err)) != MOE_OK) goto done;
    root = rwd_json_root(&doc);
    if (root->type != RWD_JSON_ARRAY || root->count == 0) {
        st = moe_err_set(err, MOE_ERR_FORMAT, "AlpacaEval annotations must be a non-empty JSON array");
        goto done;
    }
    pref = (double *)MOE_MALLOC(root->count * sizeof(double));
    length = (double *)MOE_MALLOC(root->count * sizeof(double));
    if (!pref || !length) { st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu annotations", root->count); goto done; }
    for (a = rwd_json_child(&doc, root); a; a = rwd_json_next(&doc, a), n++) {
        const rwd_json_node *p = rwd_json_member(&doc, a, "preference"), *o = rwd_json_member(&doc, a, "output_2");
        if (!p || p->type != RWD_JSON_NUMBER || !o || o->type != RWD_JSON_STRING) {
            st = moe_err_set(err, MOE_ERR_FORMAT, "line %d: annotation %zu needs a number \"preference\" and a string \"output_2\"", a->line, n);
            goto done;
        }
        pref[n] = p->number;
        length[n] = (double)rwd_utf8_length(rwd_json_string(&doc, o), o->str_len);
    }
    st = rwd_winrate_compute(w, pref, length, n, err);
done:
    MOE_FREE(pref);
    MOE_FREE(length);
    rwd_json_free(&doc);
    return st;
}

/* ============================================================================================
   >>rwd:features
   ============================================================================================ */

RWD__IMPL rwd_featurizer rwd_featurizer_default(void) {
    rwd_featurizer f;
    f.dim = 4096;
    f.bigrams = 1;
    f.prompt_words = 0;
    f.signed_hash = 1;
    f.length_features = 1;
    f.seed = 0;
    return f;
}

RWD__IMPL int rwd_featurizer_width(const rwd_featurizer *f) { return f->dim + (f->length_features ? 2 : 0); }

RWD__IMPL void rwd_length_features(float *out2, double len) {
    out2[0] = (float)log1p(len);
    out2[1] = (float)(len / 1000.0);
}

/* murmur3's finaliser: spreads the FNV hash so bucket (low bits) and sign (top bit) are independent */
static uint32_t rwd__mix32(uint32_t h) {
    h ^= h >> 16; h *= 0x85ebca6bu;
    h ^= h >> 13; h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

static int rwd__word_byte(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c >= 0x80;
}

/* adds +-1 per word (and bigram) of text to out[0, dim); returns the number of words */
static size_t rwd__hash_words(float *out, const rwd_featurizer *f, const char *text, uint32_t space) {
    const unsigned char *s = (const unsigned char *)text;
    uint32_t prev = 0;
    size_t words = 0;
    int have_prev = 0;
    while (*s) {
        uint32_t h = 2166136261u ^ space, keys[2];
        int k, nk = 0;
        if (!rwd__word_byte(*s)) { s++; continue; }
        for (; *s && rwd__word_byte(*s); s++) { /* FNV-1a of the lower-cased word */
            unsigned char c = (*s >= 'A' && *s <= 'Z') ? (unsigned char)(*s + 32) : *s;
            h = (h ^ c) * 16777619u;
        }
        keys[nk++] = h;
        if (f->bigrams && have_prev) keys[nk++] = (prev * 0x9E3779B1u) ^ rwd__mix32(h + 0x632BE5ABu);
        for (k = 0; k < nk; k++) {
            uint32_t m = rwd__mix32(keys[k]);
            out[m % (uint32_t)f->dim] += (f->signed_hash && (m >> 31)) ? -1.0f : 1.0f;
        }
        prev = h;
        have_prev = 1;
        words++;
    }
    return words;
}

RWD__IMPL void rwd_featurize(float *out, const rwd_featurizer *f, const char *prompt, const char *response) {
    size_t words, i;
    memset(out, 0, (size_t)rwd_featurizer_width(f) * sizeof(float));
    words = rwd__hash_words(out, f, response, f->seed);
    if (f->prompt_words && prompt) words += rwd__hash_words(out, f, prompt, f->seed ^ 0x5bd1e995u);
    if (words > 0) {
        float scale = (float)(1.0 / sqrt((double)words));
        for (i = 0; i < (size_t)f->dim; i++) out[i] *= scale;
    }
    if (f->length_features) rwd_length_features(out + f->dim, (double)rwd_utf8_length(response, strlen(response)));
}

RWD__IMPL moe_status rwd_featurize_pairs(float *x_w, float *x_l, double *len_w, double *len_l,
                                         const rwd_featurizer *f, const rwd_text_pairs *p, moe_err *err) {
    long long i, n = (long long)p->n;
    size_t w;
    if (!f || f->dim < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the featurizer needs dim >= 1");
    if (!x_w || !x_l) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_featurize_pairs needs output rows");
    w = (size_t)rwd_featurizer_width(f);
    MOE_OMP_FOR_IF(n > 64)
    for (i = 0; i < n; i++) {
        rwd_featurize(x_w + (size_t)i * w, f, p->prompt[i], p->chosen[i]);
        rwd_featurize(x_l + (size_t)i * w, f, p->prompt[i], p->rejected[i]);
        if (len_w) len_w[i] = (double)rwd_utf8_length(p->chosen[i], strlen(p->chosen[i]));
        if (len_l) len_l[i] = (double)rwd_utf8_length(p->rejected[i], strlen(p->rejected[i]));
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lm_features(float *out, moe_model *m, const char *prompt, const char *response, moe_err *err) {
    size_t lp = prompt ? strlen(prompt) : 0, lr, n, start, i, first;
    int T, d, *tok, t, j;
    moe_status st;
    if (!out || !m || !m->blocks || !response) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features needs an initialised model, a response and an output row");
    if (m->cfg.vocab < 256) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features reads bytes: the model's vocabulary is %d, not 256", m->cfg.vocab);
    lr = strlen(response);
    if (lr == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_features: the response is empty");
    d = m->cfg.d;
    n = lp + lr;
    T = n < (size_t)m->max_T ? (int)n : m->max_T;
    start = n - (size_t)T;                          /* first byte inside the window      */
    first = lp > start ? lp - start : 0;            /* the response's first row in it    */
    tok = m->targets; /* (max_B max_T) ints that a forward without targets leaves alone: no allocation */
    for (t = 0; t < T; t++) {
        size_t k = start + (size_t)t;
        tok[t] = (unsigned char)(k < lp ? prompt[k] : response[k - lp]);
    }
    st = moe_model_forward(m, tok, NULL, 1, T, NULL);
    if (st != MOE_OK) return moe_err_set(err, st, "rwd_lm_features: %s", m->err.msg);
    for (j = 0; j < d; j++) {
        double acc = 0.0;
        for (i = first; i < (size_t)T; i++) acc += m->lnf[i * (size_t)d + (size_t)j];
        out[j] = (float)(acc / (double)((size_t)T - first));
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lm_featurize_pairs(float *x_w, float *x_l, moe_model *m, const rwd_text_pairs *p, moe_err *err) {
    size_t i;
    moe_status st;
    if (!x_w || !x_l || !p || !m) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_lm_featurize_pairs needs output rows, a model and pairs");
    for (i = 0; i < p->n; i++) {
        if ((st = rwd_lm_features(x_w + i * (size_t)m->cfg.d, m, p->prompt[i], p->chosen[i], err)) != MOE_OK ||
            (st = rwd_lm_features(x_l + i * (size_t)m->cfg.d, m, p->prompt[i], p->rejected[i], err)) != MOE_OK)
            return moe_err_set(err, st, "pair %zu: %s", i, err ? err->msg : "");
    }
    return MOE_OK;
}

/* ============================================================================================
   >>rwd:head
   ============================================================================================ */

RWD__IMPL rwd_head_config rwd_head_config_default(void) {
    rwd_head_config c;
    c.kind = RWD_HEAD_LINEAR;
    c.d_in = 0;
    c.d_hidden = 64;
    c.activation = MOE_ACT_GELU;
    c.max_rows = 512;
    c.init_std = 0.02f;
    return c;
}

RWD__IMPL moe_status rwd_head_init(rwd_head *h, const rwd_head_config *c, moe_store *s, const char *prefix, moe_err *err) {
    char name[MOE_NAME_LEN];
    int mlp, H;
    memset(h, 0, sizeof *h);
    h->id_w1 = h->id_b1 = h->id_w2 = -1;
    if (!c || !s || !prefix) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_head_init needs a config, a store and a prefix");
    mlp = c->kind == RWD_HEAD_MLP;
    if (c->kind != RWD_HEAD_LINEAR && !mlp) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown head kind %d", c->kind);
    if (c->d_in < 1 || (mlp && c->d_hidden < 1)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "head widths must be >= 1 (d_in %d, d_hidden %d)", c->d_in, c->d_hidden);
    if (c->max_rows < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "max_rows must be >= 2, got %d", c->max_rows);
    if (c->activation < MOE_ACT_SILU || c->activation > MOE_ACT_RELU) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown activation %d", c->activation);
    if (!(c->init_std >= 0.0f) || !isfinite(c->init_std)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "init_std must be >= 0, got %g", (double)c->init_std);
    if (strlen(prefix) + 3 > sizeof name) return moe_err_set(err, MOE_ERR_INVALID_ARG, "tensor prefix '%s' is too long", prefix);
    h->cfg = *c;
    if (!mlp) h->cfg.d_hidden = 0; /* canonical, so equal heads have equal configs */
    H = mlp ? c->d_hidden : 1;
    sprintf(name, "%sw1", prefix);
    h->id_w1 = moe_store_add(s, name, MOE_TENSOR_DECAY, H, c->d_in, 0, 0);
    if (mlp) {
        sprintf(name, "%sb1", prefix);
        h->id_b1 = moe_store_add(s, name, 0, H, 0, 0, 0);
        sprintf(name, "%sw2", prefix);
        h->id_w2 = moe_store_add(s, name, MOE_TENSOR_DECAY, 1, H, 0, 0);
    }
    if (h->id_w1 < 0 || (mlp && (h->id_b1 < 0 || h->id_w2 < 0)))
        return moe_err_set(err, s->err.status != MOE_OK ? s->err.status : MOE_ERR_STATE, "declaring the head's tensors failed: %s", s->err.msg);
    if (mlp) {
        size_t rh = (size_t)c->max_rows * (size_t)H;
        h->pre = (float *)moe__calloc(4 * rh, sizeof(float)); /* pre, hid, dhid (2 rh) in one block */
        if (!h->pre) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the head's activations");
        h->hid = h->pre + rh;
        h->dhid = h->hid + rh;
    }
    { /* linear: (d_in -> 1); MLP: (d_in -> H), (H -> 1) */
        int nt = moe_num_threads();
        size_t need = moe_matmul_work_floats(c->max_rows, c->d_in, H, nt), w2 = moe_matmul_work_floats(c->max_rows, H, 1, nt);
        if (mlp && w2 > need) need = w2;
        if (moe_work_alloc(&h->work, need, nt) != MOE_OK) {
            rwd_head_free(h);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the head's matmul scratch");
        }
    }
    return MOE_OK;
}

RWD__IMPL void rwd_head_init_weights(rwd_head *h, moe_store *s, moe_rng *rng) {
    int ids[2], k;
    ids[0] = h->id_w1;
    ids[1] = h->id_w2;
    for (k = 0; k < 2; k++) {
        float *w = moe_store_param(s, ids[k]);
        size_t i;
        if (!w) continue;
        for (i = 0; i < s->tensors[ids[k]].numel; i++) w[i] = h->cfg.init_std * moe_rng_normal(rng);
    }
}

RWD__IMPL void rwd_head_free(rwd_head *h) {
    MOE_FREE(h->pre);
    moe_work_free(&h->work);
    memset(h, 0, sizeof *h);
}

RWD__IMPL void rwd_head_forward(rwd_head *h, const moe_store *s, float *r, const float *x, int rows) {
    int d = h->cfg.d_in, H = h->cfg.d_hidden;
    MOE_ASSERT(rows <= h->cfg.max_rows);
    if (h->cfg.kind == RWD_HEAD_LINEAR) {
        moe_matmul_forward(r, x, moe_store_param(s, h->id_w1), NULL, rows, d, 1, &h->work);
        return;
    }
    moe_matmul_forward(h->pre, x, moe_store_param(s, h->id_w1), moe_store_param(s, h->id_b1), rows, d, H, &h->work);
    moe_activation_forward(h->hid, h->pre, (size_t)rows * (size_t)H, (moe_activation)h->cfg.activation);
    moe_matmul_forward(r, h->hid, moe_store_param(s, h->id_w2), NULL, rows, H, 1, &h->work);
}

RWD__IMPL void rwd_head_backward(rwd_head *h, moe_store *s, float *dx, const float *dr, const float *x, int rows) {
    int d = h->cfg.d_in, H = h->cfg.d_hidden;
    size_t rh = (size_t)rows * (size_t)H;
    float *dhid, *dpre;
    if (h->cfg.kind == RWD_HEAD_LINEAR) { /* no hidden buffers: h->dhid is NULL */
        moe_matmul_backward(dx, moe_store_grad(s, h->id_w1), NULL, dr, x, moe_store_param(s, h->id_w1), rows, d, 1, &h->work);
        return;
    }
    dhid = h->dhid;
    dpre = h->dhid + (size_t)h->cfg.max_rows * (size_t)H;
    memset(dhid, 0, rh * sizeof(float)); /* activation gradients are per call, not accumulated */
    memset(dpre, 0, rh * sizeof(float));
    moe_matmul_backward(dhid, moe_store_grad(s, h->id_w2), NULL, dr, h->hid, moe_store_param(s, h->id_w2), rows, H, 1, &h->work);
    moe_activation_backward(dpre, dhid, h->pre, rh, (moe_activation)h->cfg.activation);
    moe_matmul_backward(dx, moe_store_grad(s, h->id_w1), moe_store_grad(s, h->id_b1), dpre, x,
                        moe_store_param(s, h->id_w1), rows, d, H, &h->work);
}

RWD__IMPL void rwd_head_score(rwd_head *h, const moe_store *s, double *r, const float *x, size_t rows) {
    float buf[256];
    size_t i = 0, j;
    while (i < rows) {
        int m = (int)(rows - i < 256 ? rows - i : 256);
        if (m > h->cfg.max_rows) m = h->cfg.max_rows;
        rwd_head_forward(h, s, buf, x + i * (size_t)h->cfg.d_in, m);
        for (j = 0; j < (size_t)m; j++) r[i + j] = buf[j];
        i += (size_t)m;
    }
}

/* -log sigmoid(z) = softplus(-z), and sigmoid(-z), both without overflow */
static double rwd__nll_sigmoid(double z) { return (z > 0 ? 0.0 : -z) + log1p(exp(-fabs(z))); }
static double rwd__sigmoid_neg(double z) {
    double e = exp(-fabs(z));
    return z >= 0 ? e / (1.0 + e) : 1.0 / (1.0 + e);
}

RWD__IMPL double rwd_bt_loss_forward(const float *r_w, const float *r_l, const float *margin, int B,
                                     float center, int *n_correct) {
    double loss = 0.0;
    int i, ok = 0;
    for (i = 0; i < B; i++) {
        double z = (double)r_w[i] - (double)r_l[i] - (margin ? (double)margin[i] : 0.0), sum = (double)r_w[i] + (double)r_l[i];
        loss += rwd__nll_sigmoid(z) + (double)center * sum * sum;
        ok += r_w[i] > r_l[i];
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL void rwd_bt_loss_backward(float *dr_w, float *dr_l, const float *r_w, const float *r_l,
                                    const float *margin, int B, float center) {
    int i;
    for (i = 0; i < B; i++) {
        double z = (double)r_w[i] - (double)r_l[i] - (margin ? (double)margin[i] : 0.0);
        double g = -rwd__sigmoid_neg(z) / B, gc = 2.0 * (double)center * ((double)r_w[i] + (double)r_l[i]) / B;
        dr_w[i] += (float)(g + gc);
        dr_l[i] += (float)(-g + gc);
    }
}

RWD__IMPL rwd_train_config rwd_train_config_default(void) {
    rwd_train_config c;
    c.epochs = 10;
    c.batch = 32;
    c.lr = 3e-3f;
    c.lr_min = 3e-4f;
    c.warmup = 0;
    c.weight_decay = 0.01f;
    c.center = 0.0f;
    c.clip = 0.0f;
    c.seed = 1;
    c.bias_lr = 1e-2f;
    c.noise_std = 0.1f;
    c.noise_cols = -1;
    return c;
}

static moe_status rwd__check_rows(const float *x, size_t n, int d, const char *what, moe_err *err) {
    size_t i, m = n * (size_t)d;
    if (!x) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: missing feature rows", what);
    for (i = 0; i < m; i++)
        if (!isfinite(x[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: pair %zu, feature %zu is not finite", what, i / (size_t)d, i % (size_t)d);
    return MOE_OK;
}

/* gathers pairs idx[0..B) as 2B rows: B chosen, then B rejected */
static void rwd__gather(float *X, const float *x_w, const float *x_l, const size_t *idx, int B, int d) {
    int i;
    for (i = 0; i < B; i++) {
        memcpy(X + (size_t)i * d, x_w + idx[i] * (size_t)d, (size_t)d * sizeof(float));
        memcpy(X + (size_t)(B + i) * d, x_l + idx[i] * (size_t)d, (size_t)d * sizeof(float));
    }
}

/* The one training loop: Bradley-Terry when bias == NULL, Product of Experts otherwise. */
static moe_status rwd__train(rwd_head *mh, moe_store *sm, rwd_head *bh, moe_store *sb, const float *x_w,
                             const float *x_l, const float *xb_w, const float *xb_l, const float *margin,
                             size_t n, const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    int d = mh->cfg.d_in, db = bh ? bh->cfg.d_in : 0, B, e;
    size_t i, *perm;
    float *X, *XB, *r, *rb, *dr, *drb, *mg;
    long long steps_per_epoch, total, step = 0;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_rng rng;
    moe_status st = MOE_OK;
    if (stats) memset(stats, 0, sizeof *stats);
    if (!tc || n == 0 || n > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "training needs a config and 1 .. %d pairs (got %zu)", INT_MAX, n);
    if (tc->epochs < 1 || tc->batch < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "epochs and batch must be >= 1 (got %d, %d)", tc->epochs, tc->batch);
    if (2 * tc->batch > mh->cfg.max_rows || (bh && 2 * tc->batch > bh->cfg.max_rows))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "a batch of %d pairs is %d rows, more than the head's max_rows", tc->batch, 2 * tc->batch);
    if (!(tc->lr > 0.0f) || !(tc->lr_min >= 0.0f) || !isfinite(tc->lr) || !isfinite(tc->lr_min) || tc->warmup < 0 || !(tc->weight_decay >= 0.0f) ||
        !isfinite(tc->center) || !(tc->clip >= 0.0f) || (bh && (!(tc->bias_lr > 0.0f) || !isfinite(tc->bias_lr) || !(tc->noise_std >= 0.0f) || !isfinite(tc->noise_std))))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "learning rates must be > 0 and finite; warm-up, decay, clip and noise >= 0");
    if (!sm->adam_m || (bh && !sb->adam_m)) return moe_err_set(err, MOE_ERR_STATE, "allocate the store with optimizer moments (moe_store_alloc(s, 1)) before training");
    if ((st = rwd__check_rows(x_w, n, d, "chosen", err)) || (st = rwd__check_rows(x_l, n, d, "rejected", err))) return st;
    if (bh && ((st = rwd__check_rows(xb_w, n, db, "bias chosen", err)) || (st = rwd__check_rows(xb_l, n, db, "bias rejected", err)))) return st;
    if (margin && (st = rwd__check_rows(margin, n, 1, "margin", err))) return st;
    B = tc->batch < (int)n ? tc->batch : (int)n;
    perm = (size_t *)MOE_MALLOC(n * sizeof(size_t));
    X = (float *)moe__calloc((size_t)2 * B * (size_t)(d + db) + (size_t)9 * B, sizeof(float));
    if (!perm || !X) { MOE_FREE(perm); MOE_FREE(X); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for training batches"); }
    XB = X + (size_t)2 * B * d;
    r = XB + (size_t)2 * B * db; rb = r + 2 * B; dr = rb + 2 * B; drb = dr + 2 * B; mg = drb + 2 * B;
    opt.weight_decay = tc->weight_decay;
    moe_rng_seed(&rng, tc->seed);
    for (i = 0; i < n; i++) perm[i] = i;
    steps_per_epoch = ((long long)n + B - 1) / B;
    total = steps_per_epoch * tc->epochs;
    for (e = 0; e < tc->epochs && st == MOE_OK; e++) {
        double loss_sum = 0.0;
        long long correct = 0;
        size_t start;
        for (i = n - 1; i > 0; i--) { /* Fisher-Yates, seeded */
            size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (start = 0; start < n && st == MOE_OK; start += (size_t)B, step++) {
            int b = (int)(n - start < (size_t)B ? n - start : (size_t)B), k, ok = 0;
            float lr = moe_lr_cosine(step, tc->warmup, total, tc->lr, tc->lr_min);
            rwd__gather(X, x_w, x_l, perm + start, b, d);
            rwd_head_forward(mh, sm, r, X, 2 * b);
            memset(dr, 0, (size_t)2 * b * sizeof(float));
            memset(drb, 0, (size_t)2 * b * sizeof(float));
            moe_store_zero_grad(sm);
            if (bh) {
                rwd__gather(XB, xb_w, xb_l, perm + start, b, db);
                for (k = 0; k < 2 * b * db; k++)
                    if (tc->noise_cols < 0 || k % db < tc->noise_cols) XB[k] += tc->noise_std * moe_rng_normal(&rng);
                rwd_head_forward(bh, sb, rb, XB, 2 * b);
                loss_sum += b * rwd_poe_loss_forward(r, r + b, rb, rb + b, b, &ok);
                rwd_poe_loss_backward(dr, dr + b, drb, drb + b, r, r + b, rb, rb + b, b);
                moe_store_zero_grad(sb);
                rwd_head_backward(bh, sb, NULL, drb, XB, 2 * b);
            } else {
                if (margin)
                    for (k = 0; k < b; k++) mg[k] = margin[perm[start + (size_t)k]];
                loss_sum += b * rwd_bt_loss_forward(r, r + b, margin ? mg : NULL, b, tc->center, &ok);
                rwd_bt_loss_backward(dr, dr + b, r, r + b, margin ? mg : NULL, b, tc->center);
            }
            rwd_head_backward(mh, sm, NULL, dr, X, 2 * b);
            correct += ok;
            if (tc->clip > 0.0f) moe_clip_grad_norm(sm, tc->clip);
            st = moe_adamw_step(sm, &opt, lr, step + 1);
            if (bh && st == MOE_OK) { /* same schedule, scaled to the bias expert's peak rate */
                if (tc->clip > 0.0f) moe_clip_grad_norm(sb, tc->clip);
                st = moe_adamw_step(sb, &opt, lr * (tc->bias_lr / tc->lr), step + 1);
            }
        }
        if (stats) {
            stats->loss = loss_sum / (double)n;
            stats->accuracy = (double)correct / (double)n;
            stats->steps = step;
        }
    }
    if (st != MOE_OK) moe_err_set(err, st, "optimizer step failed: %s", bh && sb->err.status ? sb->err.msg : sm->err.msg);
    MOE_FREE(perm);
    MOE_FREE(X);
    return st;
}

RWD__IMPL moe_status rwd_bt_train(rwd_head *h, moe_store *s, const float *x_w, const float *x_l,
                                  const float *margin, size_t n, const rwd_train_config *tc,
                                  rwd_train_stats *stats, moe_err *err) {
    return rwd__train(h, s, NULL, NULL, x_w, x_l, NULL, NULL, margin, n, tc, stats, err);
}

#ifndef MOE_NO_STDIO
/* the checkpoint's config blob: what a head's shape is, as little-endian int32 */
static void rwd__head_blob(int32_t blob[6], const rwd_head *h) {
    blob[0] = 0x48445752; /* "RWDH" */
    blob[1] = 1;          /* blob version */
    blob[2] = h->cfg.kind;
    blob[3] = h->cfg.d_in;
    blob[4] = h->cfg.d_hidden;
    blob[5] = h->cfg.activation;
}

RWD__IMPL moe_status rwd_head_save(const rwd_head *h, const moe_store *s, const char *path, moe_err *err) {
    int32_t blob[6];
    rwd__head_blob(blob, h);
    return moe_checkpoint_save(path, s, 0, 0, blob, sizeof blob, NULL, 0, err);
}

RWD__IMPL moe_status rwd_head_load(rwd_head *h, moe_store *s, const char *path, moe_err *err) {
    int32_t blob[6];
    rwd__head_blob(blob, h);
    /* the store's fingerprint checks the tensor shapes; the blob also checks the activation */
    return moe_checkpoint_load(path, s, NULL, blob, NULL, sizeof blob, NULL, 0, err);
}
#endif

/* ============================================================================================
   >>rwd:poe
   ============================================================================================ */

RWD__IMPL double rwd_poe_loss_forward(const float *rm_w, const float *rm_l, const float *rb_w,
                                      const float *rb_l, int B, int *n_correct) {
    double loss = 0.0;
    int i, ok = 0;
    for (i = 0; i < B; i++) {
        double z = ((double)rm_w[i] - (double)rm_l[i]) + ((double)rb_w[i] - (double)rb_l[i]);
        loss += rwd__nll_sigmoid(z);
        ok += z > 0.0;
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL void rwd_poe_loss_backward(float *drm_w, float *drm_l, float *drb_w, float *drb_l,
                                     const float *rm_w, const float *rm_l, const float *rb_w,
                                     const float *rb_l, int B) {
    int i;
    for (i = 0; i < B; i++) {
        double z = ((double)rm_w[i] - (double)rm_l[i]) + ((double)rb_w[i] - (double)rb_l[i]);
        float g = (float)(-rwd__sigmoid_neg(z) / B);
        drm_w[i] += g; drm_l[i] -= g;
        drb_w[i] += g; drb_l[i] -= g;
    }
}

RWD__IMPL moe_status rwd_poe_train(rwd_head *main_head, moe_store *sm, rwd_head *bias_head,
                                   moe_store *sb, const float *x_w, const float *x_l,
                                   const float *xb_w, const float *xb_l, size_t n,
                                   const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    if (!bias_head || !sb || sm == sb) return moe_err_set(err, MOE_ERR_INVALID_ARG, "PoE needs a bias expert in a store of its own (it has its own learning rate)");
    return rwd__train(main_head, sm, bias_head, sb, x_w, x_l, xb_w, xb_l, NULL, n, tc, stats, err);
}

/* ============================================================================================
   >>rwd:rows
   ============================================================================================ */

static moe_status rwd__rows_begin(rwd_rows *r, int n_num, int n_text, const char *const *num_cols,
                                  const char *const *text_cols, moe_err *err) {
    int k;
    if (!r || n_num < 0 || n_text < 0 || n_num + n_text < 1 || (n_num && !num_cols) || (n_text && !text_cols))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: name at least one column to read");
    for (k = 0; k < n_num + n_text; k++)
        if (!(k < n_num ? num_cols[k] : text_cols[k - n_num]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: column name %d is NULL", k);
    if (r->n > 0 && (r->n_num != n_num || r->n_text != n_text))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: appending %d + %d columns to rows of %d + %d", n_num, n_text, r->n_num, r->n_text);
    r->n_num = n_num;
    r->n_text = n_text;
    return MOE_OK;
}

/* room for one more row; its texts start NULL */
static moe_status rwd__rows_push(rwd_rows *r, int line, moe_err *err) {
    size_t k;
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        double *num = (double *)MOE_MALLOC(cap * (size_t)(r->n_num ? r->n_num : 1) * sizeof(double));
        char **text = r->n_text ? (char **)MOE_MALLOC(cap * (size_t)r->n_text * sizeof(char *)) : NULL;
        int *lines = (int *)MOE_MALLOC(cap * sizeof(int));
        if (!num || !lines || (r->n_text && !text)) {
            MOE_FREE(num); MOE_FREE(text); MOE_FREE(lines);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu rows", cap);
        }
        if (r->n) {
            memcpy(num, r->num, r->n * (size_t)r->n_num * sizeof(double));
            if (r->n_text) memcpy(text, r->text, r->n * (size_t)r->n_text * sizeof(char *));
            memcpy(lines, r->line, r->n * sizeof(int));
        }
        MOE_FREE(r->num); MOE_FREE(r->text); MOE_FREE(r->line);
        r->num = num; r->text = text; r->line = lines;
        r->cap = cap;
    }
    for (k = 0; k < (size_t)r->n_text; k++) r->text[r->n * (size_t)r->n_text + k] = NULL;
    r->line[r->n] = line;
    r->n++;
    return MOE_OK;
}

static void rwd__rows_drop_last(rwd_rows *r) { /* a row that failed half-way */
    size_t k;
    r->n--;
    for (k = 0; k < (size_t)r->n_text; k++) MOE_FREE(r->text[r->n * (size_t)r->n_text + k]);
}

RWD__IMPL void rwd_rows_free(rwd_rows *r) {
    size_t i;
    if (!r) return;
    for (i = 0; i < r->n * (size_t)r->n_text; i++) MOE_FREE(r->text[i]);
    MOE_FREE(r->num); MOE_FREE(r->text); MOE_FREE(r->line);
    memset(r, 0, sizeof *r);
}

/* a number field: 1 = value, 0 = missing, -1 = not a finite number */
static int rwd__rows_number(const char *s, size_t n, double *v) {
    char buf[64], *end;
    while (n > 0 && (*s == ' ' || *s == '\t')) { s++; n--; }
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
    if (n == 0 || (n == 2 && memcmp(s, "NA", 2) == 0) || (n == 3 && (memcmp(s, "NaN", 3) == 0 || memcmp(s, "nan", 3) == 0)) ||
        (n == 4 && memcmp(s, "null", 4) == 0)) {
        *v = NAN;
        return 0;
    }
    if (n >= sizeof buf) { *v = NAN; return -1; }
    memcpy(buf, s, n);
    buf[n] = 0;
    *v = strtod(buf, &end);
    return (*end == 0 && isfinite(*v)) ? 1 : -1;
}

/* One CSV record from text[*pos]: fields unquoted into *scratch (each NUL-terminated), their
   offsets in *fields. *line advances over the newlines inside. Returns the field count, or -1
   for a quote that never closes or a stray character after a closing quote. */
static int rwd__csv_record(const char *text, size_t len, size_t *pos, int *line, char **scratch, size_t *scap,
                           size_t **fields, size_t *fcap, int *bad_field) {
    size_t p = *pos, out = 0;
    int nf = 0;
    for (;;) {
        int quoted = p < len && text[p] == '"';
        if (!rwd__grow((void **)fields, fcap, (size_t)nf + 1, sizeof(size_t))) return -2;
        (*fields)[nf] = out;
        if (quoted) p++;
        for (;;) {
            char c;
            if (p >= len) {
                if (quoted) { *bad_field = nf; return -1; }
                break;
            }
            c = text[p];
            if (quoted) {
                if (c == '"') {
                    if (p + 1 < len && text[p + 1] == '"') { p += 2; c = '"'; }
                    else {
                        p++;
                        if (p < len && text[p] != ',' && text[p] != '\n' && text[p] != '\r') { *bad_field = nf; return -1; }
                        break;
                    }
                } else {
                    if (c == '\n') (*line)++;
                    p++;
                }
            } else {
                if (c == ',' || c == '\n' || c == '\r') break;
                p++;
            }
            if (!rwd__grow((void **)scratch, scap, out + 2, 1)) return -2;
            (*scratch)[out++] = c;
        }
        if (!rwd__grow((void **)scratch, scap, out + 1, 1)) return -2;
        (*scratch)[out++] = 0;
        nf++;
        if (p < len && text[p] == ',') { p++; continue; }
        if (p < len && text[p] == '\r') p++;
        if (p < len && text[p] == '\n') p++;
        break;
    }
    *pos = p;
    return nf;
}

static char *rwd__rows_strdup(const char *s) {
    size_t n = strlen(s);
    char *d = (char *)MOE_MALLOC(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

RWD__IMPL moe_status rwd_rows_parse_csv(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                        int n_num, const char *const *text_cols, int n_text, moe_err *err) {
    char *scratch = NULL;
    size_t scap = 0, fcap = 0, *fields = NULL, pos = 0;
    int *col = NULL, line = 1, header_line, nf_header = 0, k, bad = 0, rows_before;
    moe_status st = rwd__rows_begin(r, n_num, n_text, num_cols, text_cols, err);
    if (st != MOE_OK) return st;
    if (!text) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: no CSV text");
    rows_before = (int)r->n;
    col = (int *)MOE_MALLOC((size_t)(n_num + n_text) * sizeof(int));
    if (!col) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    while (pos < len && (text[pos] == '\n' || text[pos] == '\r')) { line += text[pos] == '\n'; pos++; }
    if (pos >= len) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV: no header line (empty input)"); goto done; }
    header_line = line;
    nf_header = rwd__csv_record(text, len, &pos, &line, &scratch, &scap, &fields, &fcap, &bad);
    if (nf_header < 0) {
        st = nf_header == -2 ? moe_err_set(err, MOE_ERR_NOMEM, "out of memory") : moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d: unbalanced quotes", header_line, bad + 1);
        goto done;
    }
    for (k = 0; k < n_num + n_text; k++) { /* the first header field of each requested name */
        const char *want = k < n_num ? num_cols[k] : text_cols[k - n_num];
        int j;
        col[k] = -1;
        for (j = 0; j < nf_header && col[k] < 0; j++)
            if (strcmp(scratch + fields[j], want) == 0) col[k] = j;
        if (col[k] < 0) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d: no column '%s' in the header", header_line, want); goto done; }
    }
    line++;
    while (pos < len && st == MOE_OK) {
        int start = line, nf;
        if (text[pos] == '\n' || text[pos] == '\r') { line += text[pos] == '\n'; pos++; continue; } /* blank line */
        nf = rwd__csv_record(text, len, &pos, &line, &scratch, &scap, &fields, &fcap, &bad);
        if (nf == -2) { st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); break; }
        if (nf < 0) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d: unbalanced quotes", start, bad + 1); break; }
        if (nf != nf_header) { st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d: %d fields, the header has %d", start, nf, nf_header); break; }
        if ((st = rwd__rows_push(r, start, err)) != MOE_OK) break;
        for (k = 0; k < n_num + n_text && st == MOE_OK; k++) {
            const char *f = scratch + fields[col[k]];
            if (k < n_num) {
                double v = NAN;
                if (rwd__rows_number(f, strlen(f), &v) < 0)
                    st = moe_err_set(err, MOE_ERR_FORMAT, "CSV line %d, column %d ('%s'): '%.40s' is not a number (leave it empty or NA when missing)", start, col[k] + 1, num_cols[k], f);
                r->num[(r->n - 1) * (size_t)n_num + (size_t)k] = v;
            } else {
                char *s = rwd__rows_strdup(f);
                if (!s) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
                r->text[(r->n - 1) * (size_t)n_text + (size_t)(k - n_num)] = s;
            }
        }
        if (st != MOE_OK) rwd__rows_drop_last(r);
        line++;
    }
    if (st == MOE_OK && (int)r->n == rows_before) st = moe_err_set(err, MOE_ERR_FORMAT, "CSV: a header but no rows");
done:
    MOE_FREE(scratch);
    MOE_FREE(fields);
    MOE_FREE(col);
    return st;
}

RWD__IMPL moe_status rwd_rows_parse_jsonl(rwd_rows *r, const char *text, size_t len, const char *const *num_cols,
                                          int n_num, const char *const *text_cols, int n_text, moe_err *err) {
    rwd_json doc;
    size_t start = 0, rows_before;
    int line = 1, k;
    moe_status st = rwd__rows_begin(r, n_num, n_text, num_cols, text_cols, err);
    if (st != MOE_OK) return st;
    if (!text) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rows: no JSON Lines text");
    rows_before = r->n;
    memset(&doc, 0, sizeof doc);
    while (start < len && st == MOE_OK) {
        const char *nl = (const char *)memchr(text + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - text) : len, e = end, b = start;
        const rwd_json_node *root;
        while (e > b && (text[e - 1] == '\r' || text[e - 1] == ' ' || text[e - 1] == '\t')) e--;
        while (b < e && (text[b] == ' ' || text[b] == '\t')) b++;
        if (e > b) {
            if ((st = rwd_json_parse(&doc, text + b, e - b, line, err)) != MOE_OK) break;
            root = rwd_json_root(&doc);
            if (root->type != RWD_JSON_OBJECT) { st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d: expected an object", line); break; }
            if ((st = rwd__rows_push(r, line, err)) != MOE_OK) break;
            for (k = 0; k < n_num + n_text && st == MOE_OK; k++) {
                const char *name = k < n_num ? num_cols[k] : text_cols[k - n_num];
                const rwd_json_node *m = rwd_json_member(&doc, root, name);
                if (k < n_num) {
                    double v = NAN;
                    if (m && m->type == RWD_JSON_NUMBER) v = m->number;
                    else if (m && (m->type == RWD_JSON_TRUE || m->type == RWD_JSON_FALSE)) v = m->type == RWD_JSON_TRUE;
                    else if (m && m->type != RWD_JSON_NULL)
                        st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d, column %d ('%s'): %s is not a number (use null or leave the key out when missing)",
                                         m->line, k + 1, name, m->type == RWD_JSON_STRING ? "a string" : m->type == RWD_JSON_ARRAY ? "an array" : "an object");
                    r->num[(r->n - 1) * (size_t)n_num + (size_t)k] = v;
                } else {
                    const char *s = rwd_json_string(&doc, m);
                    char *c;
                    if (!s) { st = moe_err_set(err, MOE_ERR_FORMAT, "JSON line %d, column %d ('%s'): %s", line, k + 1, name, m ? "not a string" : "missing (text columns are required)"); break; }
                    c = rwd__strndup(s, m->str_len);
                    if (!c) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
                    r->text[(r->n - 1) * (size_t)n_text + (size_t)(k - n_num)] = c;
                }
            }
            if (st != MOE_OK) rwd__rows_drop_last(r);
        }
        start = end + 1;
        line++;
    }
    rwd_json_free(&doc);
    if (st == MOE_OK && r->n == rows_before) st = moe_err_set(err, MOE_ERR_FORMAT, "JSON Lines: no rows (empty input?)");
    return st;
}
/* ============================================================================================
   >>rwd:armo
   ============================================================================================ */

RWD__IMPL rwd_ridge_config rwd_ridge_config_default(void) {
    rwd_ridge_config c;
    int i;
    memset(&c, 0, sizeof c);
    c.n_lambdas = 9;
    for (i = 0; i < 9; i++) c.lambdas[i] = pow(10.0, (double)(i - 4)); /* the official grid */
    c.val_frac = 0.2;
    c.seed = 42;
    c.val_mask = NULL;
    c.fixed_lambda = 0.0;
    return c;
}

/* dot products in double with 8 independent partial sums, added in a fixed order: the
   compiler may vectorize the lanes (no reassociation needed), and the result does not depend
   on the thread count */
static double rwd__dot(const double *a, const double *b, int n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int q = 0, l;
    for (; q + 8 <= n; q += 8)
        for (l = 0; l < 8; l++) acc[l] += a[q + l] * b[q + l];
    for (; q < n; q++) acc[0] += a[q] * b[q];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static double rwd__dotf(const float *a, const float *b, int n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int q = 0, l;
    for (; q + 8 <= n; q += 8)
        for (l = 0; l < 8; l++) acc[l] += (double)a[q + l] * (double)b[q + l];
    for (; q < n; q++) acc[0] += (double)a[q] * (double)b[q];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* In-place Cholesky A = L L^T of an (n, n) row-major SPD matrix (lower triangle used), left-
   looking in column blocks of 64: L_ij = (A_ij - sum_{k<j} L_ik L_jk) / L_jj, the sum split into
   the columns of earlier blocks (one long dot product, all rows in parallel) and those of the
   block itself. Two parallel regions per block, every element owned by one thread: the same bits
   for any thread count. Returns 0, or -1 on a non-positive pivot. */
static int rwd__cholesky(double *A, int n) {
    const int nb = 64;
    int J0;
    for (J0 = 0; J0 < n; J0 += nb) {
        int J1 = J0 + nb < n ? J0 + nb : n, i, j, bad = 0;
        if (J0 > 0) { /* (a) the earlier blocks' share, rows J0..n-1 */
            MOE_OMP_FOR_IF((double)(n - J0) * nb * J0 > 1e6)
            for (i = J0; i < n; i++) {
                double *ai = A + (size_t)i * n;
                int jj, top = i < J1 - 1 ? i : J1 - 1;
                for (jj = J0; jj <= top; jj++) ai[jj] -= rwd__dot(ai, A + (size_t)jj * n, J0);
            }
        }
        for (j = J0; j < J1 && !bad; j++) { /* (b) the diagonal block, serially */
            double *aj = A + (size_t)j * n, d = aj[j] - rwd__dot(aj + J0, aj + J0, j - J0);
            if (!(d > 0.0) || !isfinite(d)) { bad = 1; break; }
            aj[j] = sqrt(d);
            for (i = j + 1; i < J1; i++) {
                double *ai = A + (size_t)i * n;
                ai[j] = (ai[j] - rwd__dot(ai + J0, aj + J0, j - J0)) / aj[j];
            }
        }
        if (bad) return -1;
        MOE_OMP_FOR_IF((double)(n - J1) * nb * nb > 1e6)
        for (i = J1; i < n; i++) { /* (c) the rows below, within the block */
            double *ai = A + (size_t)i * n;
            int jj;
            for (jj = J0; jj < J1; jj++) {
                const double *aj = A + (size_t)jj * n;
                ai[jj] = (ai[jj] - rwd__dot(ai + J0, aj + J0, jj - J0)) / aj[jj];
            }
        }
    }
    return 0;
}

static void rwd__cholesky_solve(const double *L, int n, double *b) {
    int i, k;
    for (i = 0; i < n; i++) {
        double s = b[i];
        for (k = 0; k < i; k++) s -= L[(size_t)i * n + k] * b[k];
        b[i] = s / L[(size_t)i * n + i];
    }
    for (i = n - 1; i >= 0; i--) {
        double s = b[i];
        for (k = i + 1; k < n; k++) s -= L[(size_t)k * n + i] * b[k];
        b[i] = s / L[(size_t)i * n + i];
    }
}

/* The ridge problem of the rows idx (m) of x (., d) with targets t (stride ts), set up once
   for many lambdas: G = X^T X (d, d) and b = X^T t in the primal (m >= d), or G = X X^T (m, m)
   and b = t in the dual. Parallel over G's rows, each owned by one thread. */
typedef struct rwd__ridge {
    int dual, n;       /* the system's size: d (primal) or m (dual) */
    double *G, *b, *A, *sol, *xt; /* xt: (d, m) transposed rows for the primal Gram */
} rwd__ridge;

static void rwd__ridge_free(rwd__ridge *R) { MOE_FREE(R->G); memset(R, 0, sizeof *R); }

static moe_status rwd__ridge_setup(rwd__ridge *R, const float *x, int d, const double *t, size_t ts,
                                   const size_t *idx, size_t m, moe_err *err) {
    long long i;
    size_t n2;
    memset(R, 0, sizeof *R);
    R->dual = m < (size_t)d;
    R->n = R->dual ? (int)m : d;
    n2 = (size_t)R->n * (size_t)R->n;
    R->G = (double *)MOE_MALLOC((2 * n2 + 2 * (size_t)R->n + (R->dual ? 0 : (size_t)d * m)) * sizeof(double) + 1);
    if (!R->G) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for a ridge system of size %d", R->n);
    R->A = R->G + n2;
    R->b = R->A + n2;
    R->sol = R->b + R->n;
    R->xt = R->sol + R->n;
    if (R->dual) {
        MOE_OMP_FOR_IF(m > 64)
        for (i = 0; i < (long long)m; i++) {
            const float *xi = x + idx[i] * (size_t)d;
            size_t j;
            for (j = 0; j <= (size_t)i; j++) R->G[(size_t)i * m + j] = rwd__dotf(xi, x + idx[j] * (size_t)d, d);
            R->b[i] = t[idx[i] * ts];
        }
    } else {
        size_t r;
        for (r = 0; r < m; r++) {
            const float *xr = x + idx[r] * (size_t)d;
            int k;
            for (k = 0; k < d; k++) R->xt[(size_t)k * m + r] = (double)xr[k];
        }
        MOE_OMP_FOR_IF((double)d * d * (double)m > 1e6)
        for (i = 0; i < d; i++) {
            const double *a = R->xt + (size_t)i * m;
            size_t j, q;
            double s = 0.0;
            for (j = 0; j <= (size_t)i; j++) R->G[(size_t)i * (size_t)d + j] = rwd__dot(a, R->xt + j * m, (int)m);
            for (q = 0; q < m; q++) s += a[q] * t[idx[q] * ts];
            R->b[i] = s;
        }
    }
    return MOE_OK;
}

/* w (d) at lambda; returns -1 if the system is not positive definite in double */
static int rwd__ridge_at(rwd__ridge *R, double *w, const float *x, int d, const size_t *idx, double lambda) {
    int i, n = R->n;
    for (i = 0; i < n; i++) {
        memcpy(R->A + (size_t)i * n, R->G + (size_t)i * n, (size_t)(i + 1) * sizeof(double));
        R->A[(size_t)i * n + i] += lambda;
    }
    if (rwd__cholesky(R->A, n) != 0) return -1;
    memcpy(R->sol, R->b, (size_t)n * sizeof(double));
    rwd__cholesky_solve(R->A, n, R->sol);
    if (!R->dual) {
        memcpy(w, R->sol, (size_t)d * sizeof(double));
    } else { /* w = X^T alpha */
        int k;
        memset(w, 0, (size_t)d * sizeof(double));
        for (i = 0; i < n; i++) {
            const float *xi = x + idx[i] * (size_t)d;
            for (k = 0; k < d; k++) w[k] += R->sol[i] * (double)xi[k];
        }
    }
    return 0;
}

static moe_status rwd__check_floats(const float *x, size_t count, int d, const char *what, moe_err *err) {
    size_t i;
    for (i = 0; i < count; i++)
        if (!isfinite(x[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: row %zu, feature %zu is not finite", what, i / (size_t)d, i % (size_t)d);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_ridge_solve(double *w, const float *x, const double *t, size_t n, int d, double lambda,
                                     moe_err *err) {
    size_t *idx, m = 0, i;
    rwd__ridge R;
    moe_status st;
    if (!w || !x || !t || d < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_ridge_solve needs w, x, t and d >= 1");
    if (!(lambda > 0.0) || !isfinite(lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge needs a finite lambda > 0, got %g", lambda);
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "ridge", err)) != MOE_OK) return st;
    idx = (size_t *)MOE_MALLOC((n ? n : 1) * sizeof(size_t));
    if (!idx) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < n; i++)
        if (isfinite(t[i])) idx[m++] = i;
    if (m == 0) { MOE_FREE(idx); return moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge: no row has a target (all %zu are NaN)", n); }
    st = rwd__ridge_setup(&R, x, d, t, 1, idx, m, err);
    if (st == MOE_OK && rwd__ridge_at(&R, w, x, d, idx, lambda) != 0)
        st = moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge: the system at lambda %g is not positive definite in double precision (features of huge scale?)", lambda);
    rwd__ridge_free(&R);
    MOE_FREE(idx);
    return st;
}

RWD__IMPL moe_status rwd_armo_regress(float *W, rwd_ridge_report *rep, const float *x, const double *y, size_t n,
                                      int d, int K, const rwd_ridge_config *c, moe_err *err) {
    unsigned char *val;
    size_t *tr, *va, i;
    double *w, *best;
    int k, q;
    moe_status st = MOE_OK;
    rwd_ridge_config def = rwd_ridge_config_default();
    if (!c) c = &def;
    if (!W || !x || !y || n == 0 || d < 1 || K < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_regress needs W, x (n >= 1 rows, d >= 1) and targets for K >= 1 objectives");
    if (c->fixed_lambda < 0.0 || !isfinite(c->fixed_lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "fixed_lambda must be >= 0 and finite, got %g", c->fixed_lambda);
    if (c->fixed_lambda == 0.0) {
        if (c->n_lambdas < 1 || c->n_lambdas > RWD_RIDGE_MAX_LAMBDAS) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the lambda grid needs 1 .. %d values, got %d", RWD_RIDGE_MAX_LAMBDAS, c->n_lambdas);
        for (q = 0; q < c->n_lambdas; q++)
            if (!(c->lambdas[q] > 0.0) || !isfinite(c->lambdas[q])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "lambda %d of the grid is %g; every lambda must be > 0", q, c->lambdas[q]);
        if (!c->val_mask && !(c->val_frac > 0.0 && c->val_frac < 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "val_frac must be in (0, 1) to choose lambda, got %g", c->val_frac);
    }
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "stage-1 features", err)) != MOE_OK) return st;
    for (i = 0; i < n * (size_t)K; i++)
        if (isinf(y[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "target row %zu, objective %zu is infinite (NaN marks a missing rating)", i / (size_t)K, i % (size_t)K);
    val = (unsigned char *)MOE_MALLOC(n);
    tr = (size_t *)MOE_MALLOC(2 * n * sizeof(size_t));
    w = (double *)MOE_MALLOC(2 * (size_t)d * sizeof(double));
    if (!val || !tr || !w) { MOE_FREE(val); MOE_FREE(tr); MOE_FREE(w); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    va = tr + n;
    best = w + d;
    /* the one split of all rows (sklearn's train_test_split: ceil(val_frac n) validation rows) */
    memset(val, 0, n);
    if (c->fixed_lambda == 0.0) {
        if (c->val_mask) {
            for (i = 0; i < n; i++) val[i] = c->val_mask[i] != 0;
        } else {
            size_t n_test = (size_t)ceil(c->val_frac * (double)n);
            moe_rng rng;
            moe_rng_seed(&rng, c->seed);
            for (i = 0; i < n; i++) tr[i] = i;
            for (i = n - 1; i > 0; i--) {
                size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = tr[i];
                tr[i] = tr[j]; tr[j] = t;
            }
            for (i = 0; i < n_test && i < n; i++) val[tr[i]] = 1;
        }
    }
    for (k = 0; k < K && st == MOE_OK; k++) {
        size_t m_tr = 0, m_va = 0;
        rwd__ridge R;
        rwd_ridge_report r;
        memset(&r, 0, sizeof r);
        for (q = 0; q < RWD_RIDGE_MAX_LAMBDAS; q++) r.grid_mse[q] = NAN;
        for (i = 0; i < n; i++) {
            if (!isfinite(y[i * (size_t)K + (size_t)k])) continue;
            if (val[i]) va[m_va++] = i;
            else tr[m_tr++] = i;
        }
        if (m_tr + m_va == 0) { st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d has no labelled rows (every one of its %zu targets is NaN)", k, n); break; }
        if (c->fixed_lambda == 0.0 && (m_tr == 0 || m_va == 0)) {
            st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: %zu labelled rows, %zu of them in the validation part: lambda cannot be chosen; give more rows or a fixed_lambda", k, m_tr + m_va, m_va);
            break;
        }
        r.n_train = m_tr;
        r.n_val = m_va;
        r.underdetermined = m_tr < (size_t)d;
        if ((st = rwd__ridge_setup(&R, x, d, y + k, (size_t)K, tr, m_tr, err)) != MOE_OK) break;
        if (c->fixed_lambda > 0.0) {
            r.lambda = c->fixed_lambda;
            r.val_mse = NAN;
            if (rwd__ridge_at(&R, best, x, d, tr, r.lambda) != 0)
                st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: the ridge system at lambda %g is not positive definite in double precision", k, r.lambda);
        } else {
            r.val_mse = INFINITY;
            for (q = 0; q < c->n_lambdas; q++) {
                double se = 0.0;
                size_t j;
                int f;
                if (rwd__ridge_at(&R, w, x, d, tr, c->lambdas[q]) != 0) { r.grid_mse[q] = INFINITY; continue; }
                for (j = 0; j < m_va; j++) {
                    const float *xr = x + va[j] * (size_t)d;
                    double p = 0.0;
                    for (f = 0; f < d; f++) p += w[f] * (double)xr[f];
                    p -= y[va[j] * (size_t)K + (size_t)k];
                    se += p * p;
                }
                r.grid_mse[q] = se / (double)m_va;
                if (r.grid_mse[q] < r.val_mse) { /* strict: the first lambda wins ties (pandas idxmin) */
                    r.val_mse = r.grid_mse[q];
                    r.lambda = c->lambdas[q];
                    memcpy(best, w, (size_t)d * sizeof(double));
                }
            }
            if (!isfinite(r.val_mse))
                st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: no lambda of the grid gives a positive definite system in double precision", k);
        }
        rwd__ridge_free(&R);
        if (st != MOE_OK) break;
        for (q = 0; q < d; q++) W[(size_t)k * (size_t)d + (size_t)q] = (float)best[q];
        if (r.underdetermined)
            snprintf(r.note, sizeof r.note, "objective %d: %zu labelled training rows for %d features; ridge is still unique at lambda %g (%s)",
                     k, m_tr, d, r.lambda, c->fixed_lambda > 0.0 ? "fixed" : "chosen by validation MSE");
        if (rep) rep[k] = r;
    }
    MOE_FREE(val); MOE_FREE(tr); MOE_FREE(w);
    return st;
}

RWD__IMPL void rwd_armo_rewards(double *r, const float *W, const float *x, size_t rows, int d, int K) {
    long long i;
    MOE_OMP_FOR_IF((double)rows * d * K > 1e5)
    for (i = 0; i < (long long)rows; i++) {
        const float *xi = x + (size_t)i * (size_t)d;
        int k, f;
        for (k = 0; k < K; k++) {
            const float *wk = W + (size_t)k * (size_t)d;
            double s = 0.0;
            for (f = 0; f < d; f++) s += (double)wk[f] * (double)xi[f];
            r[(size_t)i * (size_t)K + (size_t)k] = s;
        }
    }
}

RWD__IMPL moe_status rwd_armo_verbosity_penalties(double *penalty, double *corr, const double *V, size_t M, int K,
                                                  int v, double threshold, moe_err *err) {
    static const double grid[] = {0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4,
                                  0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95};
    const int n_grid = (int)(sizeof grid / sizeof grid[0]);
    double *vv, *adj, *cr;
    unsigned char *open;
    size_t i;
    int j, q, n_open;
    if (!penalty || !V || K < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs penalties, rewards and K >= 2 objectives");
    if (v < 0 || v >= K) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the verbosity objective %d is not one of the %d objectives", v, K);
    if (M < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs >= 2 reference responses, got %zu", M);
    if (!isfinite(threshold)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the correlation threshold must be finite");
    for (i = 0; i < M * (size_t)K; i++)
        if (!isfinite(V[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "reference reward %zu, objective %zu is not finite", i / (size_t)K, i % (size_t)K);
    vv = (double *)MOE_MALLOC((2 * M + (size_t)K) * sizeof(double));
    open = (unsigned char *)MOE_MALLOC((size_t)K);
    if (!vv || !open) { MOE_FREE(vv); MOE_FREE(open); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    adj = vv + M;
    cr = adj + M;
    for (i = 0; i < M; i++) vv[i] = V[i * (size_t)K + (size_t)v];
    for (j = 0; j < K; j++) { penalty[j] = 1.0; cr[j] = 1.0; open[j] = j != v; }
    n_open = K - 1;
    for (q = 0; q < n_grid && n_open > 0; q++) {
        for (j = 0; j < K; j++) {
            double rho;
            if (!open[j]) continue;
            for (i = 0; i < M; i++) adj[i] = V[i * (size_t)K + (size_t)j] - grid[q] * vv[i];
            rho = rwd_spearman(adj, vv, M); /* NaN (a constant column) never closes, as in scipy */
            if (rho <= threshold) {
                open[j] = 0;
                n_open--;
                penalty[j] = grid[q];
                cr[j] = rho;
            } else if (rho < cr[j]) {
                cr[j] = rho;
            }
        }
    }
    if (corr) memcpy(corr, cr, (size_t)K * sizeof(double));
    MOE_FREE(vv);
    MOE_FREE(open);
    return MOE_OK;
}

RWD__IMPL void rwd_armo_transform(double *out, const double *r, const double *penalty, size_t rows, int K, int v) {
    size_t i;
    int j;
    for (i = 0; i < rows; i++) {
        const double *ri = r + i * (size_t)K;
        double *oi = out + i * (size_t)K, rv = v >= 0 ? ri[v] : 0.0;
        for (j = 0; j < K; j++) oi[j] = v >= 0 ? ri[j] - penalty[j] * rv : ri[j];
    }
}

/* ---- the gate ---- */

RWD__IMPL rwd_gate_config rwd_gate_config_default(void) {
    rwd_gate_config c;
    c.d_in = 0;
    c.K = 0;
    c.n_hidden = 3;
    c.d_hidden = 1024;
    c.temperature = 10.0f;
    c.logit_scale = 1.0f;
    c.dropout = 0.2f;
    c.max_rows = 1024;
    return c;
}

RWD__IMPL moe_status rwd_gate_init(rwd_gate *g, const rwd_gate_config *c, moe_store *s, const char *prefix, moe_err *err) {
    char name[MOE_NAME_LEN];
    int l, L, H, in;
    size_t rh, wide;
    memset(g, 0, sizeof *g);
    for (l = 0; l <= RWD_GATE_MAX_HIDDEN; l++) g->id_w[l] = g->id_b[l] = -1;
    g->id_scale = -1;
    if (!c || !s || !prefix) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_gate_init needs a config, a store and a prefix");
    if (c->d_in < 1 || c->K < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate needs d_in >= 1 and K >= 1 (got %d, %d)", c->d_in, c->K);
    if (c->n_hidden < 0 || c->n_hidden > RWD_GATE_MAX_HIDDEN || (c->n_hidden > 0 && c->d_hidden < 1))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate needs 0 .. %d hidden layers of width >= 1 (got %d of %d)", RWD_GATE_MAX_HIDDEN, c->n_hidden, c->d_hidden);
    if (!(c->temperature > 0.0f) || !isfinite(c->temperature) || !isfinite(c->logit_scale))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate's temperature must be > 0 and its logit scale finite (got %g, %g)", (double)c->temperature, (double)c->logit_scale);
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "dropout must be in [0, 1), got %g", (double)c->dropout);
    if (c->max_rows < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "max_rows must be >= 1, got %d", c->max_rows);
    if (strlen(prefix) + 16 > sizeof name) return moe_err_set(err, MOE_ERR_INVALID_ARG, "tensor prefix '%s' is too long", prefix);
    g->cfg = *c;
    L = c->n_hidden;
    H = L > 0 ? c->d_hidden : 0;
    if (L == 0) g->cfg.d_hidden = 0;
    in = c->d_in;
    for (l = 0; l <= L; l++) {
        int out = l < L ? H : c->K;
        if (l < L) sprintf(name, "%sl%d.w", prefix, l);
        else sprintf(name, "%sout.w", prefix);
        g->id_w[l] = moe_store_add(s, name, MOE_TENSOR_DECAY, out, in, 0, 0);
        if (l < L) sprintf(name, "%sl%d.b", prefix, l);
        else sprintf(name, "%sout.b", prefix);
        g->id_b[l] = moe_store_add(s, name, 0, out, 0, 0, 0);
        if (g->id_w[l] < 0 || g->id_b[l] < 0) return moe_err_set(err, MOE_ERR_STATE, "declaring the gate's tensors failed: %s", s->err.msg);
        in = out;
    }
    sprintf(name, "%slogit_scale", prefix);
    if ((g->id_scale = moe_store_add(s, name, 0, 1, 0, 0, 0)) < 0) return moe_err_set(err, MOE_ERR_STATE, "declaring the gate's tensors failed: %s", s->err.msg);
    rh = (size_t)c->max_rows * (size_t)H;
    wide = (size_t)c->max_rows * (size_t)(H > c->K ? H : c->K);
    g->pre = (float *)moe__calloc(3 * (size_t)L * rh + (size_t)c->max_rows * (size_t)c->K + 2 * wide, sizeof(float));
    if (!g->pre) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's activations");
    g->post = g->pre + (size_t)L * rh;
    g->mask = g->post + (size_t)L * rh;
    g->probs = g->mask + (size_t)L * rh;
    g->dz = g->probs + (size_t)c->max_rows * (size_t)c->K;
    g->dh = g->dz + wide;
    { /* one workspace for the largest of the layers' matmuls */
        int nt = moe_num_threads(), w_in = c->d_in;
        size_t need = 0, w;
        for (l = 0; l <= L; l++) {
            int out = l < L ? H : c->K;
            if ((w = moe_matmul_work_floats(c->max_rows, w_in, out, nt)) > need) need = w;
            w_in = out;
        }
        if (moe_work_alloc(&g->work, need, nt) != MOE_OK) {
            rwd_gate_free(g);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's matmul scratch");
        }
    }
    return MOE_OK;
}

RWD__IMPL void rwd_gate_init_weights(rwd_gate *g, moe_store *s, moe_rng *rng) {
    int l;
    for (l = 0; l <= g->cfg.n_hidden; l++) {
        const moe_tensor *tw = &s->tensors[g->id_w[l]];
        float *w = moe_store_param(s, g->id_w[l]), *b = moe_store_param(s, g->id_b[l]);
        double bound = 1.0 / sqrt((double)tw->shape[1]);
        size_t i;
        for (i = 0; i < tw->numel; i++) w[i] = (float)(bound * (2.0 * moe_rng_uniform(rng) - 1.0));
        for (i = 0; i < (size_t)tw->shape[0]; i++) b[i] = (float)(bound * (2.0 * moe_rng_uniform(rng) - 1.0));
    }
    moe_store_param(s, g->id_scale)[0] = g->cfg.logit_scale;
}

RWD__IMPL void rwd_gate_free(rwd_gate *g) {
    MOE_FREE(g->pre);
    moe_work_free(&g->work);
    memset(g, 0, sizeof *g);
}

RWD__IMPL void rwd_gate_forward(rwd_gate *g, const moe_store *s, float *gates, const float *x, int rows, moe_rng *dropout_rng) {
    int L = g->cfg.n_hidden, H = g->cfg.d_hidden, K = g->cfg.K, l;
    size_t rh = (size_t)rows * (size_t)H, stride = (size_t)g->cfg.max_rows * (size_t)H, i;
    const float *in = x;
    int in_w = g->cfg.d_in;
    float p = g->cfg.dropout, keep = 1.0f / (1.0f - p), beta = moe_store_param(s, g->id_scale)[0];
    float inv_t = 1.0f / g->cfg.temperature;
    MOE_ASSERT(rows <= g->cfg.max_rows);
    g->last_dropout = dropout_rng != NULL && p > 0.0f;
    for (l = 0; l < L; l++) {
        float *pre = g->pre + (size_t)l * stride, *post = g->post + (size_t)l * stride, *mask = g->mask + (size_t)l * stride;
        moe_matmul_forward(pre, in, moe_store_param(s, g->id_w[l]), moe_store_param(s, g->id_b[l]), rows, in_w, H, &g->work);
        for (i = 0; i < rh; i++) {
            float m = 1.0f;
            if (g->last_dropout) m = moe_rng_uniform(dropout_rng) < p ? 0.0f : keep; /* serial: one stream */
            mask[i] = m;
            post[i] = (pre[i] > 0.0f ? pre[i] : 0.0f) * m;
        }
        in = post;
        in_w = H;
    }
    moe_matmul_forward(g->dz, in, moe_store_param(s, g->id_w[L]), moe_store_param(s, g->id_b[L]), rows, in_w, K, &g->work);
    for (i = 0; i < (size_t)rows * (size_t)K; i++) g->dz[i] *= inv_t; /* z / tau */
    moe_softmax_forward(g->probs, g->dz, rows, K);
    for (i = 0; i < (size_t)rows * (size_t)K; i++) gates[i] = beta * g->probs[i];
}

RWD__IMPL void rwd_gate_backward(rwd_gate *g, moe_store *s, float *dx, const float *dgates, const float *x, int rows) {
    int L = g->cfg.n_hidden, H = g->cfg.d_hidden, K = g->cfg.K, l;
    size_t stride = (size_t)g->cfg.max_rows * (size_t)H, rk = (size_t)rows * (size_t)K, rh = (size_t)rows * (size_t)H, i;
    float beta = moe_store_param(s, g->id_scale)[0], inv_t = 1.0f / g->cfg.temperature;
    float *dp = g->dh; /* (rows, K) beta * dgates; dh is free until the layer loop */
    double dbeta = 0.0;
    float *dz = g->dz;
    for (i = 0; i < rk; i++) {
        dbeta += (double)dgates[i] * (double)g->probs[i];
        dp[i] = beta * dgates[i];
    }
    moe_store_grad(s, g->id_scale)[0] += (float)dbeta;
    memset(dz, 0, rk * sizeof(float));
    moe_softmax_backward(dz, dp, g->probs, rows, K);
    for (i = 0; i < rk; i++) dz[i] *= inv_t;
    for (l = L; l >= 0; l--) {
        const float *in = l == 0 ? x : g->post + (size_t)(l - 1) * stride;
        int in_w = l == 0 ? g->cfg.d_in : H, out_w = l == L ? K : H;
        float *din = NULL;
        if (l > 0) {
            din = g->dh;
            memset(din, 0, rh * sizeof(float));
        } else {
            din = dx;
        }
        moe_matmul_backward(din, moe_store_grad(s, g->id_w[l]), moe_store_grad(s, g->id_b[l]), dz, in,
                            moe_store_param(s, g->id_w[l]), rows, in_w, out_w, &g->work);
        if (l > 0) { /* through dropout and ReLU of layer l-1: dz <- d pre_{l-1} */
            const float *pre = g->pre + (size_t)(l - 1) * stride, *mask = g->mask + (size_t)(l - 1) * stride;
            for (i = 0; i < rh; i++) dz[i] = pre[i] > 0.0f ? g->dh[i] * mask[i] : 0.0f;
        }
    }
}

RWD__IMPL rwd_gate_train_config rwd_gate_train_config_default(void) {
    rwd_gate_train_config c;
    c.steps = 2000;
    c.batch = 1024;
    c.lr = 1e-3f;
    c.lr_min = 0.0f;
    c.weight_decay = 0.0f;
    c.seed = 0;
    return c;
}

RWD__IMPL double rwd_gate_bt_loss(float *dgates, const float *gates, const double *r_w, const double *r_l, int B, int K,
                                  int *n_correct) {
    double loss = 0.0;
    int i, k, ok = 0;
    for (i = 0; i < B; i++) {
        const float *gi = gates + (size_t)i * (size_t)K;
        const double *a = r_w + (size_t)i * (size_t)K, *b = r_l + (size_t)i * (size_t)K;
        double m = 0.0, gs;
        for (k = 0; k < K; k++) m += (double)gi[k] * (a[k] - b[k]);
        loss += rwd__nll_sigmoid(m);
        ok += m > 0.0;
        gs = -rwd__sigmoid_neg(m) / B;
        if (dgates)
            for (k = 0; k < K; k++) dgates[(size_t)i * (size_t)K + (size_t)k] = (float)(gs * (a[k] - b[k]));
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL moe_status rwd_gate_train(rwd_gate *g, moe_store *s, const float *x, const double *r_w, const double *r_l,
                                    size_t n, const rwd_gate_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    int d = g->cfg.d_in, K = g->cfg.K, B, step, b;
    float *X, *G, *dG;
    double *RW, *RL, loss_sum = 0.0;
    long long correct = 0, counted = 0;
    size_t i;
    moe_rng rng;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_status st = MOE_OK;
    if (stats) memset(stats, 0, sizeof *stats);
    if (!tc || !x || !r_w || !r_l || n == 0 || n > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "gate training needs a config, prompt rows, rewards and 1 .. %d pairs (got %zu)", INT_MAX, n);
    if (tc->steps < 1 || tc->batch < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "steps and batch must be >= 1 (got %d, %d)", tc->steps, tc->batch);
    if (tc->batch > g->cfg.max_rows) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a batch of %d pairs is more than the gate's max_rows %d", tc->batch, g->cfg.max_rows);
    if (!(tc->lr > 0.0f) || !isfinite(tc->lr) || !(tc->lr_min >= 0.0f) || !isfinite(tc->lr_min) || !(tc->weight_decay >= 0.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the learning rate must be > 0 and finite; lr_min and weight decay >= 0");
    if (!s->adam_m) return moe_err_set(err, MOE_ERR_STATE, "allocate the store with optimizer moments (moe_store_alloc(s, 1)) before training");
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "gate prompt rows", err)) != MOE_OK) return st;
    for (i = 0; i < n * (size_t)K; i++)
        if (!isfinite(r_w[i]) || !isfinite(r_l[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair %zu, objective %zu: a reward is not finite", i / (size_t)K, i % (size_t)K);
    B = tc->batch;
    X = (float *)MOE_MALLOC(((size_t)B * (size_t)d + 2 * (size_t)B * (size_t)K) * sizeof(float));
    RW = (double *)MOE_MALLOC(2 * (size_t)B * (size_t)K * sizeof(double));
    if (!X || !RW) { MOE_FREE(X); MOE_FREE(RW); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for gate batches"); }
    G = X + (size_t)B * (size_t)d;
    dG = G + (size_t)B * (size_t)K;
    RL = RW + (size_t)B * (size_t)K;
    opt.weight_decay = tc->weight_decay;
    moe_rng_seed(&rng, tc->seed);
    for (step = 0; step < tc->steps && st == MOE_OK; step++) {
        int ok = 0;
        double loss;
        float lr = moe_lr_cosine(step, 0, tc->steps, tc->lr, tc->lr_min);
        for (b = 0; b < B; b++) { /* uniformly with replacement, as the stage-2 script */
            size_t j = (size_t)moe_rng_below(&rng, (int)n);
            memcpy(X + (size_t)b * (size_t)d, x + j * (size_t)d, (size_t)d * sizeof(float));
            memcpy(RW + (size_t)b * (size_t)K, r_w + j * (size_t)K, (size_t)K * sizeof(double));
            memcpy(RL + (size_t)b * (size_t)K, r_l + j * (size_t)K, (size_t)K * sizeof(double));
        }
        rwd_gate_forward(g, s, G, X, B, &rng);
        loss = rwd_gate_bt_loss(dG, G, RW, RL, B, K, &ok);
        moe_store_zero_grad(s);
        rwd_gate_backward(g, s, NULL, dG, X, B);
        st = moe_adamw_step(s, &opt, lr, step + 1);
        if (step >= tc->steps - 100) {
            loss_sum += loss * B;
            correct += ok;
            counted += B;
        }
    }
    if (st != MOE_OK) moe_err_set(err, st, "optimizer step failed: %s", s->err.msg);
    else if (stats) {
        stats->loss = loss_sum / (double)counted;
        stats->accuracy = (double)correct / (double)counted;
        stats->steps = tc->steps;
    }
    MOE_FREE(X);
    MOE_FREE(RW);
    return st;
}

/* ---- the whole model ---- */

RWD__IMPL moe_status rwd_armo_init(rwd_armo *m, int K, int d, int verbosity, const rwd_gate_config *gc, uint64_t seed,
                                   moe_err *err) {
    rwd_gate_config c;
    moe_rng rng;
    moe_status st;
    memset(m, 0, sizeof *m);
    if (K < 1 || d < 1 || !gc) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_init needs K >= 1 objectives, d >= 1 features and a gate config");
    if (verbosity < -1 || verbosity >= K) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the verbosity objective %d is not one of the %d objectives (-1: none)", verbosity, K);
    c = *gc;
    c.K = K;
    m->K = K;
    m->d = d;
    m->verbosity = verbosity;
    moe_store_init(&m->store);
    if ((st = rwd_gate_init(&m->gate, &c, &m->store, "gate.", err)) != MOE_OK) { moe_store_free(&m->store); return st; }
    if (moe_store_alloc(&m->store, 1) != MOE_OK) { rwd_armo_free(m); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's parameters"); }
    m->W = (float *)moe__calloc((size_t)K * (size_t)d, sizeof(float));
    m->penalty = (double *)moe__calloc((size_t)K + 2 * (size_t)c.max_rows * (size_t)K, sizeof(double));
    m->gscratch = (float *)moe__calloc((size_t)c.max_rows * (size_t)K, sizeof(float));
    if (!m->W || !m->penalty || !m->gscratch) { rwd_armo_free(m); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the ArmoRM model"); }
    m->scratch = m->penalty + K;
    moe_rng_seed(&rng, seed);
    rwd_gate_init_weights(&m->gate, &m->store, &rng);
    return MOE_OK;
}

RWD__IMPL void rwd_armo_free(rwd_armo *m) {
    rwd_gate_free(&m->gate);
    moe_store_free(&m->store);
    MOE_FREE(m->W);
    MOE_FREE(m->penalty);
    MOE_FREE(m->gscratch);
    memset(m, 0, sizeof *m);
}

RWD__IMPL moe_status rwd_armo_fit_regression(rwd_armo *m, rwd_ridge_report *rep, const float *x, const double *y,
                                             size_t n, const rwd_ridge_config *c, moe_err *err) {
    return rwd_armo_regress(m->W, rep, x, y, n, m->d, m->K, c, err);
}

RWD__IMPL moe_status rwd_armo_fit_verbosity(rwd_armo *m, double *corr, const float *x_ref, size_t M, double threshold,
                                            moe_err *err) {
    double *V;
    moe_status st;
    if (m->verbosity < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the model has no verbosity objective (verbosity = -1)");
    if (!x_ref || M < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs >= 2 reference responses, got %zu", x_ref ? M : 0);
    if ((st = rwd__check_floats(x_ref, M * (size_t)m->d, m->d, "reference responses", err)) != MOE_OK) return st;
    V = (double *)MOE_MALLOC(M * (size_t)m->K * sizeof(double));
    if (!V) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    rwd_armo_rewards(V, m->W, x_ref, M, m->d, m->K);
    st = rwd_armo_verbosity_penalties(m->penalty, corr, V, M, m->K, m->verbosity, threshold, err);
    MOE_FREE(V);
    return st;
}

RWD__IMPL void rwd_armo_mixed_rewards(const rwd_armo *m, double *out, const float *x, size_t rows) {
    rwd_armo_rewards(out, m->W, x, rows, m->d, m->K);
    if (!m->gate_on_raw) rwd_armo_transform(out, out, m->penalty, rows, m->K, m->verbosity);
}

RWD__IMPL moe_status rwd_armo_fit_gate(rwd_armo *m, const float *xp, const float *x_w, const float *x_l, size_t n,
                                       const rwd_gate_train_config *tc, int on_raw, rwd_train_stats *stats, moe_err *err) {
    double *R;
    moe_status st;
    if (!xp || !x_w || !x_l || n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "stage 2 needs prompt rows and the responses of >= 1 pairs");
    if ((st = rwd__check_floats(x_w, n * (size_t)m->d, m->d, "chosen responses", err)) != MOE_OK ||
        (st = rwd__check_floats(x_l, n * (size_t)m->d, m->d, "rejected responses", err)) != MOE_OK)
        return st;
    R = (double *)MOE_MALLOC(2 * n * (size_t)m->K * sizeof(double));
    if (!R) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the pairs' rewards");
    m->gate_on_raw = on_raw != 0;
    rwd_armo_mixed_rewards(m, R, x_w, n);
    rwd_armo_mixed_rewards(m, R + n * (size_t)m->K, x_l, n);
    st = rwd_gate_train(&m->gate, &m->store, xp, R, R + n * (size_t)m->K, n, tc, stats, err);
    MOE_FREE(R);
    return st;
}

RWD__IMPL moe_status rwd_armo_infer(rwd_armo *m, double *score, double *rewards, double *gates, const float *x,
                                    const float *xp, size_t rows, moe_err *err) {
    int K = m->K, k;
    size_t start = 0, i;
    if (!x || !xp || (!score && !rewards && !gates)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_infer needs responses, prompts and at least one output");
    while (start < rows) {
        int b = (int)(rows - start < (size_t)m->gate.cfg.max_rows ? rows - start : (size_t)m->gate.cfg.max_rows);
        double *r = m->scratch, *rt = m->scratch + (size_t)b * (size_t)K;
        rwd_armo_rewards(r, m->W, x + start * (size_t)m->d, (size_t)b, m->d, K);
        if (m->gate_on_raw) memcpy(rt, r, (size_t)b * (size_t)K * sizeof(double));
        else rwd_armo_transform(rt, r, m->penalty, (size_t)b, K, m->verbosity);
        rwd_gate_forward(&m->gate, &m->store, m->gscratch, xp + start * (size_t)m->gate.cfg.d_in, b, NULL);
        for (i = 0; i < (size_t)b; i++) {
            double s = 0.0;
            for (k = 0; k < K; k++) s += (double)m->gscratch[i * (size_t)K + (size_t)k] * rt[i * (size_t)K + (size_t)k];
            if (score) score[start + i] = s;
        }
        if (rewards) memcpy(rewards + start * (size_t)K, r, (size_t)b * (size_t)K * sizeof(double));
        if (gates)
            for (i = 0; i < (size_t)b * (size_t)K; i++) gates[start * (size_t)K + i] = m->gscratch[i];
        start += (size_t)b;
    }
    return MOE_OK;
}
/* ============================================================================================
   >>rwd:dpa
   ============================================================================================ */

static moe_status rwd__unit(double *v, const double *u, int k, const char *what, moe_err *err) {
    double s = 0.0;
    int i;
    if (!v || !u || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s needs a vector of k >= 1 values", what);
    for (i = 0; i < k; i++) {
        if (!isfinite(u[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: component %d is not finite", what, i);
        s += u[i] * u[i];
    }
    if (!(s > 0.0) || !isfinite(s)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: a direction of length 0 states no preference; give at least one non-zero weight", what);
    s = sqrt(s);
    for (i = 0; i < k; i++) v[i] = u[i] / s;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_direction(double *v, const double *u, int k, moe_err *err) {
    return rwd__unit(v, u, k, "direction", err);
}

RWD__IMPL void rwd_dpa_direction_angle(double v[2], double theta) {
    v[0] = cos(theta);
    v[1] = sin(theta);
}

RWD__IMPL double rwd_dpa_scalarize(const double *v, const double *r, int k) {
    double s = 0.0;
    int i;
    for (i = 0; i < k; i++) s += v[i] * r[i];
    return s;
}

/* numpy's round: to the nearest integer, halves to the even one */
static double rwd__round_half_even(double x) {
    double f = floor(x), d = x - f;
    if (d > 0.5) return f + 1.0;
    if (d < 0.5) return f;
    return fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}

RWD__IMPL moe_status rwd_dpa_weights(int *w, const double *v, int k, moe_err *err) {
    double s = 0.0;
    int i;
    if (!w || !v || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_weights needs k >= 1 weights");
    for (i = 0; i < k; i++) {
        if (!isfinite(v[i]) || fabs(v[i]) > 1e6) return moe_err_set(err, MOE_ERR_INVALID_ARG, "direction component %d is not a finite unit-scale number", i);
        s += v[i] * v[i];
    }
    if (!(s > 0.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a direction of length 0 states no preference; give at least one non-zero weight");
    for (i = 0; i < k; i++) w[i] = (int)rwd__round_half_even(100.0 * v[i]);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_weights_direction(double *v, const int *w, int k, moe_err *err) {
    double u[64];
    int i;
    if (!w || k < 1 || k > 64) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_weights_direction needs 1 .. 64 weights");
    for (i = 0; i < k; i++) u[i] = (double)w[i];
    return rwd__unit(v, u, k, "integer weights", err);
}

RWD__IMPL moe_status rwd_dpa_system_prompt(char *out, size_t cap, int w_helpfulness, int w_verbosity, moe_err *err) {
    int n;
    if (!out || cap == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_system_prompt needs an output buffer");
    n = snprintf(out, cap,
                 "You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way. "
                 "Your response should maximize weighted rating = helpfulness*%d + verbosity*%d",
                 w_helpfulness, w_verbosity);
    if (n < 0 || (size_t)n >= cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the system prompt needs %d bytes, the buffer has %zu", n + 1, cap);
    return MOE_OK;
}

static moe_status rwd__check_points(const double *pts, size_t n, int k, const char *what, moe_err *err) {
    size_t i;
    if (!pts || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s needs points with k >= 1 objectives", what);
    for (i = 0; i < n * (size_t)k; i++)
        if (!isfinite(pts[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: point %zu, objective %zu is not finite", what, i / (size_t)k, i % (size_t)k);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_best_of_n(size_t *best, const double *v, const double *r, size_t n, int k, moe_err *err) {
    size_t j;
    double top = 0.0;
    moe_status st;
    if (!best || !v) return moe_err_set(err, MOE_ERR_INVALID_ARG, "best-of-n needs an output and a direction");
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "best-of-n needs at least one candidate");
    if ((st = rwd__check_points(r, n, k, "best-of-n", err)) != MOE_OK) return st;
    for (j = 0; j < n; j++) {
        double s = rwd_dpa_scalarize(v, r + j * (size_t)k, k);
        if (j == 0 || s > top) { top = s; *best = j; }
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_pareto_front(size_t *idx, size_t *n_front, const double *pts, size_t n, int k, moe_err *err) {
    size_t i, j, m = 0;
    moe_status st;
    if (!idx || !n_front) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_pareto_front needs idx and n_front");
    *n_front = 0;
    if ((st = rwd__check_points(pts, n, k, "Pareto front", err)) != MOE_OK) return st;
    for (i = 0; i < n; i++) {
        const double *p = pts + i * (size_t)k;
        int dominated = 0;
        for (j = 0; j < n && !dominated; j++) {
            const double *q = pts + j * (size_t)k;
            int ge = 1, gt = 0, c;
            if (j == i) continue;
            for (c = 0; c < k && ge; c++) {
                ge = q[c] >= p[c];
                gt |= q[c] > p[c];
            }
            dominated = ge && gt;
        }
        if (!dominated) idx[m++] = i;
    }
    *n_front = m;
    return MOE_OK;
}

/* stable merge sort of idx (n) by key[idx] descending; tmp (n) scratch */
static void rwd__sort_desc(size_t *idx, size_t *tmp, size_t n, const double *key, int stride) {
    size_t w, i;
    for (w = 1; w < n; w *= 2) {
        for (i = 0; i < n; i += 2 * w) {
            size_t a = i, mid = i + w < n ? i + w : n, b = mid, end = i + 2 * w < n ? i + 2 * w : n, o = i;
            while (a < mid && b < end) tmp[o++] = key[idx[b] * (size_t)stride] > key[idx[a] * (size_t)stride] ? idx[b++] : idx[a++];
            while (a < mid) tmp[o++] = idx[a++];
            while (b < end) tmp[o++] = idx[b++];
        }
        memcpy(idx, tmp, n * sizeof(size_t));
    }
}

/* hypervolume of the points idx (m) of pts (., stride) in their first k objectives; work holds
   (k + 1) * m indices for the recursion's own lists */
static double rwd__hv(const double *pts, int stride, const size_t *idx, size_t m, int k, const double *ref, size_t *work) {
    size_t *own = work, *tmp = work + m, i;
    double vol = 0.0;
    if (m == 0) return 0.0;
    memcpy(own, idx, m * sizeof(size_t));
    rwd__sort_desc(own, tmp, m, pts + (k - 1), stride);
    if (k == 1) return pts[own[0] * (size_t)stride] - ref[0];
    if (k == 2) { /* sweep: going down in y, the widest x so far bounds each slab */
        double xmax = ref[0];
        for (i = 0; i < m; i++) {
            const double *p = pts + own[i] * (size_t)stride;
            double below = i + 1 < m ? pts[own[i + 1] * (size_t)stride + 1] : ref[1];
            if (p[0] > xmax) xmax = p[0];
            vol += (p[1] - below) * (xmax - ref[0]);
        }
        return vol;
    }
    for (i = 0; i < m; i++) { /* slab between this point's level and the next one down */
        double top = pts[own[i] * (size_t)stride + (size_t)(k - 1)];
        double below = i + 1 < m ? pts[own[i + 1] * (size_t)stride + (size_t)(k - 1)] : ref[k - 1];
        if (top > below) vol += (top - below) * rwd__hv(pts, stride, own, i + 1, k - 1, ref, work + 2 * m);
    }
    return vol;
}

RWD__IMPL moe_status rwd_hypervolume(double *hv, const double *pts, size_t n, int k, const double *ref, moe_err *err) {
    size_t *work, i, m = 0;
    int c;
    moe_status st;
    if (!hv || !ref) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_hypervolume needs an output and a reference point");
    *hv = 0.0;
    if ((st = rwd__check_points(pts, n, k, "hypervolume", err)) != MOE_OK) return st;
    if ((st = rwd__check_points(ref, 1, k, "hypervolume reference", err)) != MOE_OK) return st;
    if (n == 0) return MOE_OK;
    work = (size_t *)MOE_MALLOC((size_t)(2 * k + 2) * n * sizeof(size_t));
    if (!work) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < n; i++) { /* only points above ref in every objective span a box */
        const double *p = pts + i * (size_t)k;
        int above = 1;
        for (c = 0; c < k; c++) above &= p[c] > ref[c];
        if (above) work[m++] = i;
    }
    *hv = rwd__hv(pts, k, work, m, k, ref, work + n);
    MOE_FREE(work);
    return MOE_OK;
}
/* ============================================================================================
   >>rwd:ssrm
   ============================================================================================ */

RWD__IMPL rwd_ssrm_config rwd_ssrm_config_default(void) {
    rwd_ssrm_config c;
    c.rounds = 3;
    c.threshold = 0.8;
    c.keep_true_order = 0;
    return c;
}

RWD__IMPL moe_status rwd_ssrm_run(rwd_pair_model *m, const size_t *lab, const unsigned char *lab_a_wins, size_t n_lab,
                                  const size_t *unl, const unsigned char *unl_truth, size_t n_unl,
                                  const rwd_ssrm_config *c, rwd_ssrm_round *stats, moe_err *err) {
    size_t *idx, i, total;
    unsigned char *wins;
    double *p;
    int t;
    moe_status st = MOE_OK;
    rwd_ssrm_config def = rwd_ssrm_config_default();
    if (!c) c = &def;
    if (!m || !m->prob || !m->train) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM needs a pair model with prob and train");
    if (!(c->threshold > 0.5 && c->threshold <= 1.0))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the confidence threshold must be in (0.5, 1]: max(P, 1-P) is never below 0.5, so %g would keep every pair", c->threshold);
    if (c->rounds < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rounds must be >= 0, got %d", c->rounds);
    if (n_lab == 0 || !lab || !lab_a_wins) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM starts from labelled pairs: none given");
    if (n_unl == 0 || !unl) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SSRM needs unlabelled pairs to pseudo-label: none given (train on the labelled pairs alone instead)");
    if (c->keep_true_order && !unl_truth) return moe_err_set(err, MOE_ERR_INVALID_ARG, "keep_true_order (the released script's variant) needs the unlabelled pairs' true labels");
    total = n_lab + n_unl;
    idx = (size_t *)MOE_MALLOC(total * sizeof(size_t));
    wins = (unsigned char *)MOE_MALLOC(total);
    p = (double *)MOE_MALLOC(n_unl * sizeof(double));
    if (!idx || !wins || !p) { MOE_FREE(idx); MOE_FREE(wins); MOE_FREE(p); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    memcpy(idx, lab, n_lab * sizeof(size_t));
    for (i = 0; i < n_lab; i++) wins[i] = lab_a_wins[i] != 0;
    for (t = 0; t <= c->rounds && st == MOE_OK; t++) {
        rwd_ssrm_round r;
        size_t kept = 0, right = 0, kept_right = 0;
        double conf_sum = 0.0;
        memset(&r, 0, sizeof r);
        r.round = t;
        r.pseudo_accuracy = r.kept_accuracy = r.mean_confidence = NAN;
        if (t > 0) {
            if ((st = m->prob(m->ctx, p, unl, n_unl, err)) != MOE_OK) break;
            for (i = 0; i < n_unl; i++) {
                double q = p[i], conf = q > 0.5 ? q : 1.0 - q;
                unsigned char a_wins = q > 0.5; /* P = 0.5 is a tie: confidence 0.5, never kept */
                if (!isfinite(q) || q < 0.0 || q > 1.0) { st = moe_err_set(err, MOE_ERR_INVALID_ARG, "the model's probability for unlabelled pair %zu is %g, not in [0, 1]", unl[i], q); break; }
                conf_sum += conf;
                if (unl_truth) right += a_wins == (unl_truth[i] != 0);
                if (conf > c->threshold) {
                    idx[n_lab + kept] = unl[i];
                    wins[n_lab + kept] = c->keep_true_order ? (unl_truth[i] != 0) : a_wins;
                    if (unl_truth) kept_right += a_wins == (unl_truth[i] != 0);
                    kept++;
                }
            }
            if (st != MOE_OK) break;
            r.kept = kept;
            r.kept_fraction = (double)kept / (double)n_unl;
            r.mean_confidence = conf_sum / (double)n_unl;
            if (unl_truth) {
                r.pseudo_accuracy = (double)right / (double)n_unl;
                r.kept_accuracy = kept ? (double)kept_right / (double)kept : NAN;
            }
        }
        r.trained = n_lab + kept;
        if ((st = m->train(m->ctx, idx, wins, n_lab + kept, t, err)) != MOE_OK) break;
        r.eval = m->evaluate ? m->evaluate(m->eval_ctx) : NAN;
        if (stats) stats[t] = r;
    }
    MOE_FREE(idx);
    MOE_FREE(wins);
    MOE_FREE(p);
    return st;
}

/* ---- the head adapter ---- */

static moe_status rwd__ssrm_head_prob(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err) {
    rwd_ssrm_head *h = (rwd_ssrm_head *)ctx;
    size_t d = (size_t)h->head->cfg.d_in, i;
    float buf[2 * 128], *X;
    int chunk = h->head->cfg.max_rows / 2 < 128 ? h->head->cfg.max_rows / 2 : 128;
    if (chunk < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head's max_rows is below 2");
    X = (float *)MOE_MALLOC(2 * (size_t)chunk * d * sizeof(float));
    if (!X) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < count; i += (size_t)chunk) {
        int b = (int)(count - i < (size_t)chunk ? count - i : (size_t)chunk), j;
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            if (q >= h->n) { MOE_FREE(X); return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, h->n); }
            memcpy(X + (size_t)j * d, h->x_a + q * d, d * sizeof(float));
            memcpy(X + (size_t)(b + j) * d, h->x_b + q * d, d * sizeof(float));
        }
        rwd_head_forward(h->head, h->store, buf, X, 2 * b);
        for (j = 0; j < b; j++) p[i + (size_t)j] = 1.0 / (1.0 + exp(-((double)buf[j] - (double)buf[b + j])));
    }
    MOE_FREE(X);
    return MOE_OK;
}

static moe_status rwd__ssrm_head_train(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err) {
    rwd_ssrm_head *h = (rwd_ssrm_head *)ctx;
    size_t d = (size_t)h->head->cfg.d_in, i;
    float *xw, *xl;
    rwd_train_config tc = h->tc;
    if (count > h->buf_pairs) {
        MOE_FREE(h->buf);
        h->buf = (float *)MOE_MALLOC(2 * count * d * sizeof(float));
        h->buf_pairs = h->buf ? count : 0;
        if (!h->buf) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu training pairs", count);
    }
    xw = h->buf;
    xl = h->buf + count * d;
    for (i = 0; i < count; i++) {
        size_t q = idx[i];
        if (q >= h->n) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, h->n);
        memcpy(xw + i * d, (a_wins[i] ? h->x_a : h->x_b) + q * d, d * sizeof(float));
        memcpy(xl + i * d, (a_wins[i] ? h->x_b : h->x_a) + q * d, d * sizeof(float));
    }
    tc.seed = h->tc.seed + (uint64_t)round; /* a fresh shuffle each round */
    if (h->min_steps > 0 && tc.batch > 0) {
        long long per_epoch = ((long long)count + tc.batch - 1) / tc.batch;
        if (per_epoch * tc.epochs < h->min_steps) tc.epochs = (int)((h->min_steps + per_epoch - 1) / per_epoch);
    }
    return rwd_bt_train(h->head, h->store, xw, xl, NULL, count, &tc, NULL, err);
}

RWD__IMPL rwd_pair_model rwd_ssrm_head_model(rwd_ssrm_head *h) {
    rwd_pair_model m;
    memset(&m, 0, sizeof m);
    m.ctx = h;
    m.prob = rwd__ssrm_head_prob;
    m.train = rwd__ssrm_head_train;
    return m;
}

RWD__IMPL void rwd_ssrm_head_free(rwd_ssrm_head *h) {
    MOE_FREE(h->buf);
    h->buf = NULL;
    h->buf_pairs = 0;
}

/* ---- the gate adapter ---- */

static moe_status rwd__ssrm_gate_prob(void *ctx, double *p, const size_t *idx, size_t count, moe_err *err) {
    rwd_ssrm_gate *g = (rwd_ssrm_gate *)ctx;
    int K = g->gate->cfg.K, d = g->gate->cfg.d_in, chunk = g->gate->cfg.max_rows, k;
    size_t i;
    float *X = (float *)MOE_MALLOC((size_t)chunk * ((size_t)d + (size_t)K) * sizeof(float));
    if (!X) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < count; i += (size_t)chunk) {
        int b = (int)(count - i < (size_t)chunk ? count - i : (size_t)chunk), j;
        float *G = X + (size_t)chunk * (size_t)d;
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            if (q >= g->n) { MOE_FREE(X); return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, g->n); }
            memcpy(X + (size_t)j * (size_t)d, g->x + q * (size_t)d, (size_t)d * sizeof(float));
        }
        rwd_gate_forward(g->gate, g->store, G, X, b, NULL);
        for (j = 0; j < b; j++) {
            size_t q = idx[i + (size_t)j];
            double m = 0.0;
            for (k = 0; k < K; k++) m += (double)G[(size_t)j * (size_t)K + (size_t)k] * (g->r_a[q * (size_t)K + (size_t)k] - g->r_b[q * (size_t)K + (size_t)k]);
            p[i + (size_t)j] = 1.0 / (1.0 + exp(-m));
        }
    }
    MOE_FREE(X);
    return MOE_OK;
}

static moe_status rwd__ssrm_gate_train(void *ctx, const size_t *idx, const unsigned char *a_wins, size_t count, int round, moe_err *err) {
    rwd_ssrm_gate *g = (rwd_ssrm_gate *)ctx;
    size_t K = (size_t)g->gate->cfg.K, d = (size_t)g->gate->cfg.d_in, i;
    rwd_gate_train_config tc = g->tc;
    if (count > g->buf_pairs) {
        MOE_FREE(g->xbuf);
        MOE_FREE(g->rbuf);
        g->xbuf = (float *)MOE_MALLOC(count * d * sizeof(float));
        g->rbuf = (double *)MOE_MALLOC(2 * count * K * sizeof(double));
        g->buf_pairs = g->xbuf && g->rbuf ? count : 0;
        if (!g->buf_pairs) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for %zu training pairs", count);
    }
    for (i = 0; i < count; i++) {
        size_t q = idx[i];
        if (q >= g->n) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair id %zu is outside the pool of %zu", q, g->n);
        memcpy(g->xbuf + i * d, g->x + q * d, d * sizeof(float));
        memcpy(g->rbuf + i * K, (a_wins[i] ? g->r_a : g->r_b) + q * K, K * sizeof(double));
        memcpy(g->rbuf + (count + i) * K, (a_wins[i] ? g->r_b : g->r_a) + q * K, K * sizeof(double));
    }
    tc.seed = g->tc.seed + (uint64_t)round;
    return rwd_gate_train(g->gate, g->store, g->xbuf, g->rbuf, g->rbuf + count * K, count, &tc, NULL, err);
}

RWD__IMPL rwd_pair_model rwd_ssrm_gate_model(rwd_ssrm_gate *g) {
    rwd_pair_model m;
    memset(&m, 0, sizeof m);
    m.ctx = g;
    m.prob = rwd__ssrm_gate_prob;
    m.train = rwd__ssrm_gate_train;
    return m;
}

RWD__IMPL void rwd_ssrm_gate_free(rwd_ssrm_gate *g) {
    MOE_FREE(g->xbuf);
    MOE_FREE(g->rbuf);
    g->xbuf = NULL;
    g->rbuf = NULL;
    g->buf_pairs = 0;
}
/* ============================================================================================
   >>rwd:merge
   ============================================================================================ */

RWD__IMPL rwd_merge_config rwd_merge_config_default(rwd_merge_method method) {
    rwd_merge_config c;
    memset(&c, 0, sizeof c);
    c.method = method;
    c.density = 1.0;
    c.gamma = 0.01;
    c.seed = 1;
    c.per = RWD_PER_MODEL;
    switch (method) {
    case RWD_MERGE_LINEAR: c.normalize = 1; break;
    case RWD_MERGE_TIES: c.sparsify = RWD_SPARSIFY_MAGNITUDE; c.consensus = RWD_CONSENSUS_SUM; c.normalize = 1; break;
    case RWD_MERGE_DARE_LINEAR: c.sparsify = RWD_SPARSIFY_RANDOM; c.rescale = RWD_RESCALE_DENSITY; break;
    case RWD_MERGE_DARE_TIES: c.sparsify = RWD_SPARSIFY_RANDOM; c.rescale = RWD_RESCALE_DENSITY; c.consensus = RWD_CONSENSUS_SUM; break;
    case RWD_MERGE_BREADCRUMBS: c.sparsify = RWD_SPARSIFY_OUTLIERS; break;
    case RWD_MERGE_BREADCRUMBS_TIES: c.sparsify = RWD_SPARSIFY_OUTLIERS; c.consensus = RWD_CONSENSUS_SUM; break;
    default: break;
    }
    return c;
}

static void rwd__shape_str(char *buf, size_t cap, const moe_tensor *t) {
    int i;
    size_t len = 0;
    buf[0] = 0;
    for (i = 0; i < t->ndim && len + 16 < cap; i++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%d", i ? ", " : "(", t->shape[i]);
    snprintf(buf + len, cap - len, ")");
}

RWD__IMPL moe_status rwd_store_same_layout(const moe_store *a, const moe_store *b, const char *what,
                                           moe_err *err) {
    int i, n;
    if (!a || !b) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: a store is missing (NULL)", what);
    n = a->count < b->count ? a->count : b->count;
    for (i = 0; i < n; i++) {
        const moe_tensor *p = &a->tensors[i], *q = &b->tensors[i];
        int same = strcmp(p->name, q->name) == 0 && p->ndim == q->ndim && p->flags == q->flags;
        int d;
        for (d = 0; same && d < p->ndim; d++) same = p->shape[d] == q->shape[d];
        if (!same) {
            char sp[64], sq[64];
            rwd__shape_str(sp, sizeof sp, p);
            rwd__shape_str(sq, sizeof sq, q);
            return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout: tensor %d is '%s' %s flags %d there, '%s' %s flags %d in the destination",
                               what, i, q->name, sq, q->flags, p->name, sp, p->flags);
        }
    }
    if (a->count != b->count)
        return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout: %d tensors, the destination %d (first extra: '%s')", what,
                           b->count, a->count, b->count > n ? b->tensors[n].name : a->tensors[n].name);
    if (moe_store_fingerprint(a) != moe_store_fingerprint(b))
        return moe_err_set(err, MOE_ERR_SHAPE, "%s has a different layout fingerprint", what); /* unreachable: same table */
    return MOE_OK;
}

RWD__IMPL int rwd_tensor_layer(const char *name) {
    long v = 0;
    const char *p = name;
    if (!p || p[0] != 'l' || p[1] < '0' || p[1] > '9') return -1;
    for (p++; *p >= '0' && *p <= '9'; p++) {
        v = 10 * v + (*p - '0');
        if (v > 1000000) return -1;
    }
    return *p == '.' ? (int)v : -1;
}

RWD__IMPL int rwd_tensor_is_norm_or_embedding(const char *name) {
    const char *p = name;
    while (*p) {
        char part[MOE_NAME_LEN];
        size_t n = 0;
        while (p[n] && p[n] != '.' && n + 1 < sizeof part) { part[n] = p[n]; n++; }
        part[n] = 0;
        if (strncmp(part, "ln", 2) == 0 || strstr(part, "norm") || strstr(part, "emb") ||
            strcmp(part, "wte") == 0 || strcmp(part, "wpe") == 0)
            return 1;
        p += n;
        while (*p && *p != '.') p++; /* a part longer than the buffer */
        if (*p == '.') p++;
    }
    return 0;
}

RWD__IMPL int rwd_store_layers(const moe_store *s) {
    int i, L = 0;
    for (i = 0; i < s->count; i++) {
        int l = rwd_tensor_layer(s->tensors[i].name);
        if (l + 1 > L) L = l + 1;
    }
    return L;
}

RWD__IMPL moe_status rwd_block_map(int *block, int *n_blocks, const moe_store *s, const int *pivots,
                                   int n_pivots, moe_err *err) {
    int i, j, L;
    if (!block || !n_blocks || !s || n_pivots < 0 || (n_pivots > 0 && !pivots))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "block map: missing argument or negative pivot count");
    L = rwd_store_layers(s);
    for (j = 0; j < n_pivots; j++)
        if (pivots[j] < 0 || pivots[j] >= L - 1 || (j > 0 && pivots[j] <= pivots[j - 1]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "pivot %d is %d: pivots must increase strictly within [0, %d) for %d layers", j, pivots[j], L - 1, L);
    for (i = 0; i < s->count; i++) {
        int l = rwd_tensor_layer(s->tensors[i].name), b = 0;
        if (l < 0) { block[i] = -1; continue; }
        for (j = 0; j < n_pivots; j++) b += l > pivots[j];
        block[i] = b;
    }
    *n_blocks = n_pivots + 1;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_pivots_equal(int *pivots, int n_layers, int n_blocks, moe_err *err) {
    int b, q;
    if (n_blocks < 1 || n_blocks > n_layers)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%d equal blocks of %d layers: need 1 <= blocks <= layers", n_blocks, n_layers);
    q = n_layers / n_blocks;
    for (b = 0; b + 1 < n_blocks; b++) pivots[b] = (b + 1) * q - 1;
    return MOE_OK;
}

/* the weight of model m (or SLERP's t, m = 0) for tensor t */
static double rwd__merge_weight(const rwd_merge_config *c, const double *w, int n_w, int t, int m) {
    if (c->per == RWD_PER_TENSOR) return w[(size_t)t * n_w + m];
    if (c->per == RWD_PER_BLOCK) return w[(size_t)(c->block[t] < 0 ? c->n_blocks : c->block[t]) * n_w + m];
    return w[m];
}

/* splitmix64 finaliser: independent DARE streams per (seed, model, tensor) */
static uint64_t rwd__mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static int rwd__sign(double x) { return (x > 0.0) - (x < 0.0); }

static moe_status rwd__merge_check(const moe_store *dst, const moe_store *base, const moe_store *const *models,
                                   int nm, const double *weights, const rwd_merge_config *c, int *n_w_out, moe_err *err) {
    int m, t, n_w, slots, is_ta;
    char what[32];
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: no config");
    if ((int)c->method < 0 || c->method >= RWD_MERGE_METHOD_COUNT) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown method %d", (int)c->method);
    is_ta = c->method >= RWD_MERGE_TASK_ARITHMETIC;
    if (!dst || !dst->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the destination is missing or not allocated");
    if (nm < 1 || !models) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: %d models (need at least one)", nm);
    if (c->method == RWD_MERGE_SLERP && nm != 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "SLERP merges exactly 2 models, not %d", nm);
    if (is_ta && !base) return moe_err_set(err, MOE_ERR_INVALID_ARG, "task-vector merges need a base model");
    for (m = -1; m < nm; m++) {
        const moe_store *s = m < 0 ? base : models[m];
        if (m < 0 && !s) continue;
        if (m < 0) snprintf(what, sizeof what, "the base model");
        else snprintf(what, sizeof what, "model %d", m);
        if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: %s is missing or not allocated", what);
        if (s == dst || s->params == dst->params)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the destination is %s; merge into a store of its own (nothing is merged in place)", what);
        if (rwd_store_same_layout(dst, s, what, err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    }
    if ((int)c->sparsify < 0 || c->sparsify > RWD_SPARSIFY_OUTLIERS || (int)c->consensus < 0 || c->consensus > RWD_CONSENSUS_COUNT ||
        (int)c->rescale < 0 || c->rescale > RWD_RESCALE_LINF)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown sparsify, consensus or rescale value");
    n_w = c->method == RWD_MERGE_SLERP ? 1 : nm;
    switch (c->per) {
    case RWD_PER_MODEL: slots = 1; break;
    case RWD_PER_TENSOR: slots = dst->count; break;
    case RWD_PER_BLOCK:
        if (!c->block || c->n_blocks < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "per-block weights need the block map and n_blocks >= 1");
        for (t = 0; t < dst->count; t++)
            if (c->block[t] < -1 || c->block[t] >= c->n_blocks)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "block map: tensor '%s' is in block %d, not in [-1, %d)", dst->tensors[t].name, c->block[t], c->n_blocks);
        slots = c->n_blocks + 1;
        break;
    default: return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: unknown weight layout %d", (int)c->per);
    }
    if (!weights) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: no weights");
    for (t = 0; t < slots * n_w; t++) {
        double v = weights[t];
        if (!(v == v) || v > 1e300 || v < -1e300) return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: weight %d is not finite", t);
        if (c->method == RWD_MERGE_SLERP && !(v >= 0.0 && v <= 1.0))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "SLERP: t = %g (slot %d) is outside [0, 1]", v, t);
    }
    if (c->normalize && (c->method == RWD_MERGE_LINEAR || (is_ta && c->consensus == RWD_CONSENSUS_NONE)))
        for (t = 0; t < dst->count; t++) {
            double sw = 0.0;
            for (m = 0; m < nm; m++) sw += rwd__merge_weight(c, weights, n_w, t, m);
            if (fabs(sw) < 1e-8)
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "merge: the weights of tensor '%s' sum to %g; normalize would divide by 0", dst->tensors[t].name, sw);
        }
    if (is_ta && c->sparsify != RWD_SPARSIFY_NONE) {
        for (m = 0; m < nm; m++) {
            double d = c->densities ? c->densities[m] : c->density;
            if (!(d > 0.0 && d <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "density %g of model %d is outside (0, 1]", d, m);
            if (c->sparsify == RWD_SPARSIFY_RANDOM && c->keep_masks && !c->keep_masks[m])
                return moe_err_set(err, MOE_ERR_INVALID_ARG, "DARE: keep_masks given without a mask for model %d", m);
        }
        if (c->sparsify == RWD_SPARSIFY_OUTLIERS && !(c->gamma >= 0.0 && c->gamma < 1.0))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "breadcrumbs: gamma %g is outside [0, 1)", c->gamma);
    }
    *n_w_out = n_w;
    return MOE_OK;
}

/* sparsify and rescale one task vector tau (n) in place; order: scratch of n entries */
static void rwd__sparsify(float *tau, size_t n, const rwd_merge_config *c, double d, const unsigned char *keep,
                          uint64_t stream, rwd__xi *order) {
    size_t i, lo = 0, hi = n; /* OUTLIERS / MAGNITUDE keep ranks [lo, hi) of the sort */
    double before = 0.0, after = 0.0, scale = 1.0;
    if (c->sparsify == RWD_SPARSIFY_NONE || d >= 1.0 || n == 0) return;
    if (c->rescale == RWD_RESCALE_L1 || c->rescale == RWD_RESCALE_L2 || c->rescale == RWD_RESCALE_LINF)
        for (i = 0; i < n; i++) {
            double a = fabs((double)tau[i]);
            if (c->rescale == RWD_RESCALE_L1) before += a;
            else if (c->rescale == RWD_RESCALE_L2) before += a * a;
            else if (a > before) before = a;
        }
    if (c->sparsify == RWD_SPARSIFY_RANDOM) {
        moe_rng r;
        moe_rng_seed(&r, stream);
        for (i = 0; i < n; i++) {
            int k = keep ? keep[i] != 0 : (double)moe_rng_uniform(&r) < d;
            if (!k) tau[i] = 0.0f;
        }
    } else {
        size_t keep_n = (size_t)(d * (double)n);
        int magnitude = c->sparsify == RWD_SPARSIFY_MAGNITUDE;
        /* MAGNITUDE: descending |tau| is ascending -|tau|; the index breaks ties either way */
        for (i = 0; i < n; i++) { order[i].x = magnitude ? -fabs((double)tau[i]) : fabs((double)tau[i]); order[i].i = i; }
        qsort(order, n, sizeof *order, rwd__cmp_xi);
        if (magnitude) {
            hi = keep_n > 0 ? keep_n : 1; /* mergekit asserts k > 0; one entry survives here */
        } else {
            size_t n_top = (size_t)(c->gamma * (double)n), n_bot;
            if (keep_n + n_top > n) n_top = n - keep_n;
            n_bot = n - keep_n - n_top;
            lo = n_bot; hi = n - n_top;
        }
        for (i = 0; i < n; i++)
            if (i < lo || i >= hi) tau[order[i].i] = 0.0f;
    }
    if (c->rescale == RWD_RESCALE_DENSITY) {
        for (i = 0; i < n; i++) tau[i] = (float)((double)tau[i] / d);
    } else if (c->rescale != RWD_RESCALE_NONE) {
        for (i = 0; i < n; i++) {
            double a = fabs((double)tau[i]);
            if (c->rescale == RWD_RESCALE_L1) after += a;
            else if (c->rescale == RWD_RESCALE_L2) after += a * a;
            else if (a > after) after = a;
        }
        if (c->rescale == RWD_RESCALE_L2) { before = sqrt(before); after = sqrt(after); }
        scale = (before < 1e-7 || after < 1e-7) ? 1.0 : before / after;
    }
    if (scale != 1.0)
        for (i = 0; i < n; i++) tau[i] = (float)((double)tau[i] * scale);
}

static void rwd__merge_slerp(float *out, const float *v0, const float *v1, size_t n, double t) {
    double n0 = 0.0, n1 = 0.0, dot = 0.0, s0, s1;
    size_t i;
    for (i = 0; i < n; i++) {
        n0 += (double)v0[i] * v0[i];
        n1 += (double)v1[i] * v1[i];
        dot += (double)v0[i] * v1[i];
    }
    n0 = sqrt(n0); n1 = sqrt(n1);
    dot /= (n0 > 1e-8 ? n0 : 1.0) * (n1 > 1e-8 ? n1 : 1.0);
    if (fabs(dot) > 0.9995) {
        s0 = 1.0 - t; s1 = t;
    } else {
        double om = acos(dot), so = sin(om);
        s0 = sin((1.0 - t) * om) / so;
        s1 = sin(t * om) / so;
    }
    for (i = 0; i < n; i++) out[i] = (float)(s0 * v0[i] + s1 * v1[i]);
}

RWD__IMPL moe_status rwd_merge(moe_store *dst, const moe_store *base, const moe_store *const *models,
                               int n_models, const double *weights, const rwd_merge_config *c, moe_err *err) {
    int t, m, n_w = 0, nm = n_models;
    size_t maxn = 0;
    float *tau = NULL;
    rwd__xi *order = NULL;
    double *wt = NULL;
    if (rwd__merge_check(dst, base, models, nm, weights, c, &n_w, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    for (t = 0; t < dst->count; t++)
        if (dst->tensors[t].numel > maxn) maxn = dst->tensors[t].numel;
    wt = (double *)moe__calloc((size_t)nm, sizeof(double));
    if (c->method >= RWD_MERGE_TASK_ARITHMETIC) {
        tau = (float *)moe__calloc((size_t)nm * maxn, sizeof(float));
        if (c->sparsify == RWD_SPARSIFY_MAGNITUDE || c->sparsify == RWD_SPARSIFY_OUTLIERS)
            order = (rwd__xi *)moe__calloc(maxn, sizeof(rwd__xi));
    }
    if (!wt || (c->method >= RWD_MERGE_TASK_ARITHMETIC && !tau) ||
        ((c->sparsify == RWD_SPARSIFY_MAGNITUDE || c->sparsify == RWD_SPARSIFY_OUTLIERS) && c->method >= RWD_MERGE_TASK_ARITHMETIC && !order)) {
        MOE_FREE(wt); MOE_FREE(tau); MOE_FREE(order);
        return moe_err_set(err, MOE_ERR_NOMEM, "merge: out of memory for the scratch of %d models x %zu entries", nm, maxn);
    }
    for (t = 0; t < dst->count; t++) {
        const moe_tensor *T = &dst->tensors[t];
        size_t i, n = T->numel, off = T->offset;
        float *out = dst->params + off;
        for (m = 0; m < n_w; m++) wt[m] = rwd__merge_weight(c, weights, n_w, t, m); /* SLERP: wt[0] = t */
        if (c->method == RWD_MERGE_LINEAR) {
            double sw = 0.0;
            for (m = 0; m < nm; m++) sw += wt[m];
            for (i = 0; i < n; i++) {
                double acc = 0.0;
                for (m = 0; m < nm; m++) acc += wt[m] * models[m]->params[off + i];
                out[i] = (float)(c->normalize ? acc / sw : acc);
            }
        } else if (c->method == RWD_MERGE_SLERP) {
            rwd__merge_slerp(out, models[0]->params + off, models[1]->params + off, n, wt[0]);
        } else {
            const float *b = base->params + off;
            double sw = 0.0;
            for (m = 0; m < nm; m++) {
                float *tm = tau + (size_t)m * maxn;
                const float *x = models[m]->params + off;
                double d = c->densities ? c->densities[m] : c->density;
                for (i = 0; i < n; i++) tm[i] = x[i] - b[i];
                rwd__sparsify(tm, n, c, d, c->keep_masks ? c->keep_masks[m] + off : NULL,
                              rwd__mix64(c->seed ^ rwd__mix64(((uint64_t)(unsigned)m << 32) | (uint64_t)(unsigned)t)), order);
                sw += wt[m];
            }
            for (i = 0; i < n; i++) {
                double delta = 0.0, div = sw;
                if (c->consensus == RWD_CONSENSUS_NONE) {
                    for (m = 0; m < nm; m++) delta += wt[m] * tau[(size_t)m * maxn + i];
                } else {
                    double vote = 0.0;
                    int s;
                    for (m = 0; m < nm; m++) {
                        double u = wt[m] * tau[(size_t)m * maxn + i];
                        vote += c->consensus == RWD_CONSENSUS_SUM ? u : (double)rwd__sign(u);
                    }
                    s = vote >= 0.0 ? 1 : -1;
                    div = 0.0;
                    for (m = 0; m < nm; m++) {
                        double u = wt[m] * tau[(size_t)m * maxn + i];
                        if (rwd__sign(u) == s) { delta += u; div += wt[m]; }
                    }
                    if (div == 0.0) div = 1.0;
                }
                out[i] = (float)((double)b[i] + (c->normalize ? delta / div : delta));
            }
        }
    }
    MOE_FREE(wt); MOE_FREE(tau); MOE_FREE(order);
    return MOE_OK;
}
/* ============================================================================================
   >>rwd:average
   ============================================================================================ */

static moe_status rwd__average_check(const moe_store *dst, const moe_store *pre, const moe_store *post, moe_err *err) {
    if (!dst || !dst->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the destination is missing or not allocated");
    if (!pre || !pre->params || !post || !post->params)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the pre- or post-alignment model is missing or not allocated");
    if (pre == dst || post == dst || pre->params == dst->params || post->params == dst->params)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the destination is the %s-alignment model; average into a store of its own",
                           (pre == dst || pre->params == dst->params) ? "pre" : "post");
    if (rwd_store_same_layout(dst, pre, "the pre-alignment model", err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    if (rwd_store_same_layout(dst, post, "the post-alignment model", err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    return MOE_OK;
}

/* dst = (1 - lam_t) pre + lam_t post per tensor (checked before) */
static void rwd__interpolate(moe_store *dst, const moe_store *pre, const moe_store *post, const double *lam) {
    int t;
    for (t = 0; t < dst->count; t++) {
        size_t i, off = dst->tensors[t].offset, n = dst->tensors[t].numel;
        double l = lam[t], k = 1.0 - l;
        float *o = dst->params + off;
        const float *a = pre->params + off, *b = post->params + off;
        if (l == 0.0) memcpy(o, a, n * sizeof(float));
        else if (l == 1.0) memcpy(o, b, n * sizeof(float));
        else
            for (i = 0; i < n; i++) o[i] = (float)(k * a[i] + l * b[i]);
    }
}

static int rwd__in_unit(double x) { return x >= 0.0 && x <= 1.0; } /* false for NaN */

RWD__IMPL moe_status rwd_average_tensors(moe_store *dst, const moe_store *pre, const moe_store *post,
                                         const double *lambda, moe_err *err) {
    int t;
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambda) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: no lambdas");
    for (t = 0; t < dst->count; t++)
        if (!rwd__in_unit(lambda[t]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: lambda %g of tensor '%s' is outside [0, 1]", lambda[t], dst->tensors[t].name);
    rwd__interpolate(dst, pre, post, lambda);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_average(moe_store *dst, const moe_store *pre, const moe_store *post, double lambda,
                                 moe_err *err) {
    double *lam;
    int t;
    moe_status st;
    if (!rwd__in_unit(lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: lambda %g is outside [0, 1]", lambda);
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "averaging: out of memory");
    for (t = 0; t < dst->count; t++) lam[t] = lambda;
    st = rwd_average_tensors(dst, pre, post, lam, err);
    MOE_FREE(lam);
    return st;
}

RWD__IMPL moe_status rwd_average_partwise(moe_store *dst, const moe_store *pre, const moe_store *post,
                                          const int *pivots, int n_pivots, const double *lambdas,
                                          double lambda_outside, moe_err *err) {
    int *block, t, K = 0, b;
    double *lam;
    moe_status st;
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas || n_pivots < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: no lambdas");
    for (b = 0; b <= n_pivots; b++)
        if (!rwd__in_unit(lambdas[b])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: lambda %g of block %d is outside [0, 1]", lambdas[b], b);
    if (!rwd__in_unit(lambda_outside)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: lambda %g outside the layers is outside [0, 1]", lambda_outside);
    block = (int *)moe__calloc((size_t)dst->count, sizeof(int));
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!block || !lam) {
        MOE_FREE(block); MOE_FREE(lam);
        return moe_err_set(err, MOE_ERR_NOMEM, "part-wise averaging: out of memory");
    }
    st = rwd_block_map(block, &K, dst, pivots, n_pivots, err);
    if (st == MOE_OK) {
        for (t = 0; t < dst->count; t++) lam[t] = block[t] < 0 ? lambda_outside : lambdas[block[t]];
        rwd__interpolate(dst, pre, post, lam);
    }
    MOE_FREE(block); MOE_FREE(lam);
    return st;
}

RWD__IMPL rwd_hma_config rwd_hma_config_default(void) {
    rwd_hma_config c;
    memset(&c, 0, sizeof c);
    c.mean = 0.8;
    c.eps = 0.2;
    c.gamma = 1e-4;
    c.reg = RWD_HMA_REG_ABS;
    c.reg_weight = NULL;
    c.follow = RWD_HMA_FOLLOW_LINEAR;
    c.steps = 50;
    c.lr = 0.05f;
    c.grid_step = 0.1;
    return c;
}

static double rwd__sigmoid(double a) { return a >= 0 ? 1.0 / (1.0 + exp(-a)) : exp(a) / (1.0 + exp(a)); }

RWD__IMPL void rwd_hma_ratios(double *lambdas, const double *a, int K, double mean, double eps) {
    double S = 0.0, rho = 1.0 - mean;
    int k;
    for (k = 0; k < K; k++) S += rwd__sigmoid(a[k]) + eps;
    for (k = 0; k < K; k++) lambdas[k] = 1.0 - rho * K * (rwd__sigmoid(a[k]) + eps) / S;
}

RWD__IMPL void rwd_hma_ratios_backward(double *da, const double *dlambdas, const double *a, int K,
                                       double mean, double eps) {
    double S = 0.0, dot = 0.0, rho = 1.0 - mean;
    int k;
    for (k = 0; k < K; k++) {
        double u = rwd__sigmoid(a[k]) + eps;
        S += u;
        dot += dlambdas[k] * u;
    }
    for (k = 0; k < K; k++) {
        double s = rwd__sigmoid(a[k]);
        da[k] += -rho * K * s * (1.0 - s) / S * (dlambdas[k] - dot / S);
    }
}

RWD__IMPL double rwd_hma_regularizer(double *dlambdas, const double *lambdas, const double *weight, int K,
                                     double mean, double gamma, rwd_hma_reg reg) {
    double r = 0.0;
    int k;
    for (k = 0; k < K; k++) {
        double c = weight ? weight[k] : 1.0, x = lambdas[k] - mean;
        if (reg == RWD_HMA_REG_SQUARED) {
            r += gamma * c * x * x;
            if (dlambdas) dlambdas[k] += 2.0 * gamma * c * x;
        } else {
            r += gamma * c * fabs(x);
            if (dlambdas) dlambdas[k] += gamma * c * (double)((x > 0) - (x < 0));
        }
    }
    return r;
}

/* the block whose lambda tensor t follows, -1 = none (pre under FOLLOW_LINEAR, mean under ALL) */
static int rwd__hma_follows(const moe_store *s, const int *block, int t, rwd_hma_follow follow) {
    if (block[t] < 0) return -1;
    if (follow == RWD_HMA_FOLLOW_LINEAR && rwd_tensor_is_norm_or_embedding(s->tensors[t].name)) return -1;
    return block[t];
}

RWD__IMPL void rwd_hma_tensor_lambdas(double *lam, const moe_store *s, const int *block, const double *lambdas,
                                      double mean, rwd_hma_follow follow) {
    int t;
    for (t = 0; t < s->count; t++) {
        int b = rwd__hma_follows(s, block, t, follow);
        lam[t] = b >= 0 ? lambdas[b] : follow == RWD_HMA_FOLLOW_ALL ? mean : 0.0;
    }
}

static moe_status rwd__hma_check(const moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                 int K, const rwd_hma_config *c, moe_err *err) {
    int t;
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: no config");
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!rwd__in_unit(c->mean)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: mean lambda %g is outside [0, 1]", c->mean);
    if (!(c->eps >= 0.0) || !(c->gamma >= 0.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: eps %g and gamma %g must be >= 0", c->eps, c->gamma);
    if (c->follow != RWD_HMA_FOLLOW_LINEAR && c->follow != RWD_HMA_FOLLOW_ALL) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: unknown follow rule %d", (int)c->follow);
    if (K < 1 || !block) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: %d blocks or no block map", K);
    for (t = 0; t < dst->count; t++)
        if (block[t] < -1 || block[t] >= K)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: tensor '%s' is in block %d, not in [-1, %d)", dst->tensors[t].name, block[t], K);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_hma_merge(moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                   int K, const double *lambdas, const rwd_hma_config *c, moe_err *err) {
    double *lam;
    int k;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: no lambdas");
    for (k = 0; k < K; k++)
        if (!(fabs(lambdas[k]) < 1e300)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: lambda %d is not finite", k);
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "HMA: out of memory");
    rwd_hma_tensor_lambdas(lam, dst, block, lambdas, c->mean, c->follow);
    rwd__interpolate(dst, pre, post, lam);
    MOE_FREE(lam);
    return MOE_OK;
}

RWD__IMPL void rwd_hma_lambda_grad(double *dlambdas, const moe_store *pre, const moe_store *post, const int *block,
                                   int K, rwd_hma_follow follow, const float *grad) {
    int t;
    (void)K;
    for (t = 0; t < pre->count; t++) {
        int b = rwd__hma_follows(pre, block, t, follow);
        size_t i, off = pre->tensors[t].offset, n = pre->tensors[t].numel;
        double acc = 0.0;
        if (b < 0) continue;
        for (i = 0; i < n; i++) acc += (double)grad[off + i] * ((double)post->params[off + i] - (double)pre->params[off + i]);
        dlambdas[b] += acc;
    }
}

/* c_k: the caller's, or the number of tensors following block k */
static void rwd__hma_reg_weight(double *w, const moe_store *s, const int *block, int K, const rwd_hma_config *c) {
    int t, k;
    for (k = 0; k < K; k++) w[k] = c->reg_weight ? c->reg_weight[k] : 0.0;
    if (!c->reg_weight)
        for (t = 0; t < s->count; t++) {
            int b = rwd__hma_follows(s, block, t, c->follow);
            if (b >= 0) w[b] += 1.0;
        }
}

RWD__IMPL moe_status rwd_hma_objective(double *objective, double *grad_a, moe_store *dst, float *grad_buf,
                                       const double *a, const moe_store *pre, const moe_store *post,
                                       const int *block, int K, const rwd_hma_config *c, rwd_loss_fn loss,
                                       void *user, moe_err *err) {
    double *lam, *dlam, *cw, L = 0.0;
    moe_status st;
    int k;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!objective || !a || !loss || !grad_buf) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA objective: missing argument");
    lam = (double *)moe__calloc(3 * (size_t)K, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "HMA: out of memory");
    dlam = lam + K; cw = dlam + K;
    rwd_hma_ratios(lam, a, K, c->mean, c->eps);
    st = rwd_hma_merge(dst, pre, post, block, K, lam, c, err);
    if (st == MOE_OK) {
        memset(grad_buf, 0, dst->numel * sizeof(float));
        st = loss(&L, grad_buf, dst, user);
        if (st != MOE_OK) moe_err_set(err, st, "HMA: the loss callback failed (%s)", moe_status_string(st));
    }
    if (st == MOE_OK) {
        rwd__hma_reg_weight(cw, dst, block, K, c);
        *objective = L + rwd_hma_regularizer(dlam, lam, cw, K, c->mean, c->gamma, c->reg);
        if (grad_a) {
            rwd_hma_lambda_grad(dlam, pre, post, block, K, c->follow, grad_buf);
            for (k = 0; k < K; k++) grad_a[k] = 0.0;
            rwd_hma_ratios_backward(grad_a, dlam, a, K, c->mean, c->eps);
        }
    }
    MOE_FREE(lam);
    return st;
}

RWD__IMPL moe_status rwd_hma_search(double *a, double *lambdas, double *trace, moe_store *dst,
                                    const moe_store *pre, const moe_store *post, const int *block, int K,
                                    const rwd_hma_config *c, rwd_loss_fn loss, void *user, moe_err *err) {
    moe_store A; /* the K parameters with their AdamW moments: moe.h's one optimizer */
    moe_adamw_config ac = moe_adamw_config_default();
    float *grad_buf;
    double *ad, *ga, J = 0.0, rho;
    moe_status st = MOE_OK;
    int k, step;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!a || !lambdas || !loss || c->steps < 0 || !(c->lr >= 0.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA search: missing output or callback, or negative steps / learning rate");
    moe_store_init(&A);
    if (moe_store_add(&A, "hma.a", 0, K, 0, 0, 0) < 0 || moe_store_alloc(&A, 1) != MOE_OK) {
        moe_store_free(&A);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA search: out of memory");
    }
    grad_buf = (float *)moe__calloc(dst->numel, sizeof(float));
    ad = (double *)moe__calloc(2 * (size_t)K, sizeof(double));
    if (!grad_buf || !ad) {
        MOE_FREE(grad_buf); MOE_FREE(ad); moe_store_free(&A);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA search: out of memory for %zu gradients", dst->numel);
    }
    ga = ad + K;
    ac.weight_decay = 0.0f;
    /* every a_k equal gives lambda_k = mean; logit(rho) is the official starting value */
    rho = 1.0 - c->mean;
    rho = rho < 1e-6 ? 1e-6 : rho > 1.0 - 1e-6 ? 1.0 - 1e-6 : rho;
    for (k = 0; k < K; k++) A.params[k] = (float)log(rho / (1.0 - rho));
    for (step = 1; step <= c->steps && st == MOE_OK; step++) {
        for (k = 0; k < K; k++) ad[k] = A.params[k];
        st = rwd_hma_objective(&J, ga, dst, grad_buf, ad, pre, post, block, K, c, loss, user, err);
        if (st != MOE_OK) break;
        if (trace) trace[step - 1] = J;
        for (k = 0; k < K; k++) A.grads[k] = (float)ga[k];
        st = moe_adamw_step(&A, &ac, c->lr, step);
        if (st != MOE_OK) moe_err_set(err, st, "HMA search: %s", A.err.msg);
    }
    if (st == MOE_OK) {
        for (k = 0; k < K; k++) a[k] = ad[k] = A.params[k];
        rwd_hma_ratios(lambdas, ad, K, c->mean, c->eps);
        st = rwd_hma_merge(dst, pre, post, block, K, lambdas, c, err);
    }
    MOE_FREE(grad_buf); MOE_FREE(ad); moe_store_free(&A);
    return st;
}

/* j range of the grid values mean + j step inside [0, 1] */
static void rwd__grid_range(long *jmin, long *jmax, double mean, double step) {
    *jmin = (long)ceil(-mean / step - 1e-9);
    *jmax = (long)floor((1.0 - mean) / step + 1e-9);
}

/* visits the grid (first block slowest); visit NULL counts; returns the count or -1 */
static long rwd__grid_walk(int K, double mean, double step, long *j, long limit,
                          int (*visit)(const long *j, void *u), void *u) {
    long jmin, jmax, n = 0, last;
    int k;
    if (K < 1 || !rwd__in_unit(mean) || !(step > 0.0) || step > 1.0) return -1;
    rwd__grid_range(&jmin, &jmax, mean, step);
    {   /* the walk visits (jmax - jmin + 1)^(K - 1) candidates: refuse an endless one */
        double visits = 1.0;
        for (k = 0; k + 1 < K; k++) visits *= (double)(jmax - jmin + 1);
        if (visits > 1e8) return -1;
    }
    for (k = 0; k < K; k++) j[k] = jmin;
    for (;;) {
        last = 0;
        for (k = 0; k + 1 < K; k++) last -= j[k];
        if (last >= jmin && last <= jmax) {
            j[K - 1] = last;
            if (++n > limit) return -1;
            if (visit && visit(j, u)) return -1;
        }
        for (k = K - 2; k >= 0; k--) { /* odometer over the first K - 1 blocks */
            if (++j[k] <= jmax) break;
            j[k] = jmin;
        }
        if (k < 0) break;
    }
    return n;
}

RWD__IMPL long rwd_hma_grid_size(int K, double mean, double step) {
    long *j, n;
    if (K < 1 || K > 64) return -1;
    j = (long *)moe__calloc((size_t)K, sizeof(long));
    if (!j) return -1;
    n = rwd__grid_walk(K, mean, step, j, 10000000L, NULL, NULL);
    MOE_FREE(j);
    return n;
}

/* on_front (n) = 1 for the points no other point dominates (higher reward, lower tax):
   rwd_pareto_front (>>rwd:dpa) on the points (reward, -tax) */
static moe_status rwd__reward_tax_front(int *on_front, const double *reward, const double *tax, long n, moe_err *err) {
    double *pts = (double *)moe__calloc((size_t)n * 2, sizeof(double));
    size_t *idx = (size_t *)moe__calloc((size_t)n, sizeof(size_t)), m = 0, i;
    moe_status st;
    if (!pts || !idx) {
        MOE_FREE(pts); MOE_FREE(idx);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA grid: out of memory for the Pareto front");
    }
    for (i = 0; i < (size_t)n; i++) {
        pts[2 * i] = reward[i];
        pts[2 * i + 1] = -tax[i];
        on_front[i] = 0;
    }
    st = rwd_pareto_front(idx, &m, pts, (size_t)n, 2, err);
    for (i = 0; st == MOE_OK && i < m; i++) on_front[idx[i]] = 1;
    MOE_FREE(pts); MOE_FREE(idx);
    return st;
}

typedef struct {
    double *lambdas, *lam_t, mean, step;
    int K;
    long n;
} rwd__grid_fill;

static int rwd__grid_store(const long *j, void *u) {
    rwd__grid_fill *g = (rwd__grid_fill *)u;
    int k;
    for (k = 0; k < g->K; k++) g->lambdas[(size_t)g->n * g->K + k] = g->mean + (double)j[k] * g->step;
    g->n++;
    return 0;
}

RWD__IMPL moe_status rwd_hma_grid(double *lambdas, double *reward, double *tax, int *on_front, long *n_points,
                                  long cap, moe_store *dst, const moe_store *pre, const moe_store *post,
                                  const int *block, int K, const rwd_hma_config *c, rwd_score_fn reward_fn,
                                  void *reward_user, rwd_score_fn tax_fn, void *tax_user, moe_err *err) {
    long n, p, *j;
    double *lam;
    rwd__grid_fill g;
    moe_status st = MOE_OK;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas || !reward || !tax || !on_front || !n_points || !reward_fn || !tax_fn)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: missing output array or callback");
    n = rwd_hma_grid_size(K, c->mean, c->grid_step);
    *n_points = n;
    if (n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: step %g for %d blocks gives no grid or more than 10^7 points", c->grid_step, K);
    if (n > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: %ld points, room for %ld", n, cap);
    j = (long *)moe__calloc((size_t)K, sizeof(long));
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!j || !lam) { MOE_FREE(j); MOE_FREE(lam); return moe_err_set(err, MOE_ERR_NOMEM, "HMA grid: out of memory"); }
    g.lambdas = lambdas; g.lam_t = lam; g.mean = c->mean; g.step = c->grid_step; g.K = K; g.n = 0;
    rwd__grid_walk(K, c->mean, c->grid_step, j, n, rwd__grid_store, &g);
    for (p = 0; p < n && st == MOE_OK; p++) {
        rwd_hma_tensor_lambdas(lam, dst, block, lambdas + (size_t)p * K, c->mean, c->follow);
        rwd__interpolate(dst, pre, post, lam);
        st = reward_fn(&reward[p], dst, reward_user);
        if (st == MOE_OK) st = tax_fn(&tax[p], dst, tax_user);
        if (st != MOE_OK) moe_err_set(err, st, "HMA grid: a score callback failed at point %ld (%s)", p, moe_status_string(st));
    }
    if (st == MOE_OK) st = rwd__reward_tax_front(on_front, reward, tax, n, err);
    MOE_FREE(j); MOE_FREE(lam);
    return st;
}
/* ============================================================================================
   >>rwd:rsf
   ============================================================================================ */

RWD__IMPL rwd_rsf_config rwd_rsf_config_default(void) {
    rwd_rsf_config c;
    memset(&c, 0, sizeof c);
    c.k = 2;
    c.n_candidates = 8;
    c.max_new = 32;
    c.stop = -1;
    c.sampler.temperature = 1.0f;
    c.sampler.top_k = 0;
    c.sampler.top_p = 1.0f;
    c.prompt_kind = RWD_RSF_PROMPT_PLAIN;
    c.max_prompts = 64;
    c.max_prompt_bytes = 64;
    c.epochs = 1;
    c.lr = 1e-3f;
    c.grad_clip = 1.0f;
    c.adamw = moe_adamw_config_default();
    c.seed = 1;
    return c;
}

/* bytes the encoding adds to a prompt at most */
static int rwd__rsf_prefix_bytes(int kind) {
    char buf[512];
    moe_err e;
    if (kind == RWD_RSF_PROMPT_DPA) {
        if (rwd_dpa_system_prompt(buf, sizeof buf, -100, -100, &e) != MOE_OK) return -1;
        return (int)strlen(buf) + 1; /* + the space */
    }
    if (kind == RWD_RSF_PROMPT_WEIGHTS) return (int)strlen("[-100,-100] ");
    return 0;
}

RWD__IMPL void rwd_rsf_free(rwd_rsf *r) {
    if (!r) return;
    moe_kv_cache_free(&r->cache);
    MOE_FREE(r->seqs); MOE_FREE(r->gen_out); MOE_FREE(r->prompt_text); MOE_FREE(r->prompt_tok);
    MOE_FREE(r->resp_text); MOE_FREE(r->resp); MOE_FREE(r->resp_len); MOE_FREE(r->r);
    MOE_FREE(r->kept_tok); MOE_FREE(r->kept_len); MOE_FREE(r->kept_prompt); MOE_FREE(r->kept_r);
    MOE_FREE(r->order); MOE_FREE(r->in); MOE_FREE(r->tg);
    r->m = NULL;
}

RWD__IMPL moe_status rwd_rsf_init(rwd_rsf *r, moe_model *m, const rwd_rsf_config *c) {
    int n, pre, i;
    size_t N;
    moe_status st;
    if (!r) return MOE_ERR_INVALID_ARG;
    memset(r, 0, sizeof *r);
    if (!m || !c) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_init needs a model and a config");
    r->cfg = *c;
    if (m->cfg.vocab != 256) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "RSF reads text as bytes: the model's vocabulary must be 256, not %d", m->cfg.vocab);
    if (m->max_B < 1 || m->max_T < 2) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the model needs activations for at least one sequence of 2 tokens");
    if (c->k < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the scorer must give k >= 1 objectives, not %d", c->k);
    if (c->n_candidates < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rejection sampling needs n >= 1 candidates per prompt, not %d", c->n_candidates);
    if (c->max_new < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "responses need max_new >= 1 bytes, not %d", c->max_new);
    if (c->stop < -1 || c->stop > 255) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the stop byte %d is neither -1 nor a byte", c->stop);
    if (c->max_prompts < 1 || c->max_prompt_bytes < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "max_prompts and max_prompt_bytes must be >= 1");
    if (c->epochs < 0 || !(c->lr >= 0.0f) || !(c->grad_clip >= 0.0f)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "epochs, lr and grad_clip must be >= 0");
    if (c->prompt_kind < RWD_RSF_PROMPT_PLAIN || c->prompt_kind > RWD_RSF_PROMPT_WEIGHTS) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "unknown prompt encoding %d", c->prompt_kind);
    if (c->prompt_kind != RWD_RSF_PROMPT_PLAIN && c->k != 2) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "DPA's prompt states two weights (helpfulness, verbosity): k must be 2, not %d", c->k);
    if (!(c->sampler.temperature >= 0.0f) || c->sampler.top_k < 0 || !(c->sampler.top_p > 0.0f && c->sampler.top_p <= 1.0f)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the sampler needs temperature >= 0, top_k >= 0, top_p in (0, 1]");
    pre = rwd__rsf_prefix_bytes(c->prompt_kind);
    r->max_prompt_tokens = c->max_prompt_bytes + pre;
    r->seq_cap = r->max_prompt_tokens + c->max_new;
    if (r->seq_cap - 1 > m->max_T) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an encoded prompt of up to %d bytes and a response of %d bytes need a window of %d tokens; the model's is %d (shorten max_new or max_prompt_bytes)", r->max_prompt_tokens, c->max_new, r->seq_cap - 1, m->max_T);
    r->m = m;
    n = c->n_candidates;
    st = moe_kv_cache_init(&r->cache, m, n, r->seq_cap - 1);
    if (st != MOE_OK) {
        r->err = r->cache.err;
        rwd_rsf_free(r);
        return st;
    }
    N = (size_t)m->max_B * (size_t)m->max_T;
    r->seqs = (moe_gen_seq *)moe__calloc((size_t)n, sizeof(moe_gen_seq));
    r->gen_out = (int *)moe__calloc((size_t)n * (size_t)c->max_new, sizeof(int));
    r->prompt_text = (char *)moe__calloc((size_t)r->max_prompt_tokens + 1, 1);
    r->prompt_tok = (int *)moe__calloc((size_t)r->max_prompt_tokens, sizeof(int));
    r->resp_text = (char *)moe__calloc((size_t)n * ((size_t)c->max_new + 1), 1);
    r->resp = (const char **)moe__calloc((size_t)n, sizeof(char *));
    r->resp_len = (int *)moe__calloc((size_t)n, sizeof(int));
    r->r = (double *)moe__calloc((size_t)n * (size_t)c->k, sizeof(double));
    r->kept_tok = (int *)moe__calloc((size_t)c->max_prompts * (size_t)r->seq_cap, sizeof(int));
    r->kept_len = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->kept_prompt = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->kept_r = (double *)moe__calloc((size_t)c->max_prompts * (size_t)c->k, sizeof(double));
    r->order = (int *)moe__calloc((size_t)c->max_prompts, sizeof(int));
    r->in = (int *)moe__calloc(N, sizeof(int));
    r->tg = (int *)moe__calloc(N, sizeof(int));
    if (!r->seqs || !r->gen_out || !r->prompt_text || !r->prompt_tok || !r->resp_text || !r->resp || !r->resp_len ||
        !r->r || !r->kept_tok || !r->kept_len || !r->kept_prompt || !r->kept_r || !r->order || !r->in || !r->tg) {
        rwd_rsf_free(r);
        return moe_err_set(&r->err, MOE_ERR_NOMEM, "out of memory planning rejection sampling");
    }
    for (i = 0; i < n; i++) {
        r->resp[i] = r->resp_text + (size_t)i * ((size_t)c->max_new + 1);
        r->seqs[i].out = r->gen_out + (size_t)i * (size_t)c->max_new;
    }
    r->best = -1;
    moe_rng_seed(&r->rng, c->seed);
    return MOE_OK;
}

static moe_status rwd__rsf_check_dir(rwd_rsf *r, const double *v) {
    double s = 0.0;
    int i;
    if (!v) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "a direction v of %d values is needed", r->cfg.k);
    for (i = 0; i < r->cfg.k; i++) {
        if (!isfinite(v[i])) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "direction component %d is not finite", i);
        s += v[i] * v[i];
    }
    if (!(fabs(sqrt(s) - 1.0) <= 1e-6)) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the direction has length %g, not 1: DPA's directions lie on the unit circle (normalise it with rwd_dpa_direction)", sqrt(s));
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_encode_prompt(rwd_rsf *r, char *out, size_t cap, int *n, const char *prompt,
                                           const double *v) {
    int w[2], len = 0;
    size_t pl;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (!out || cap == 0 || !prompt) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_encode_prompt needs a prompt and an output buffer");
    if ((st = rwd__rsf_check_dir(r, v)) != MOE_OK) return st;
    pl = strlen(prompt);
    if (pl > (size_t)r->cfg.max_prompt_bytes) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the prompt has %zu bytes, more than max_prompt_bytes = %d", pl, r->cfg.max_prompt_bytes);
    if (r->cfg.prompt_kind != RWD_RSF_PROMPT_PLAIN) {
        if ((st = rwd_dpa_weights(w, v, 2, &r->err)) != MOE_OK) return st;
        if (r->cfg.prompt_kind == RWD_RSF_PROMPT_DPA) {
            if ((st = rwd_dpa_system_prompt(out, cap, w[0], w[1], &r->err)) != MOE_OK) return st;
            len = (int)strlen(out);
            if ((size_t)len + 1 >= cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
            out[len++] = ' ';
            out[len] = 0;
        } else {
            int k = snprintf(out, cap, "[%d,%d] ", w[0], w[1]);
            if (k < 0 || (size_t)k >= cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
            len = k;
        }
    }
    if ((size_t)len + pl + 1 > cap) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the output buffer is too short for the encoded prompt");
    memcpy(out + len, prompt, pl + 1);
    if (n) *n = len + (int)pl;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_sample(rwd_rsf *r, const char *prompt, const double *v, rwd_rsf_score_fn score,
                                    void *user) {
    const rwd_rsf_config *c;
    int i, j;
    size_t best;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    c = &r->cfg;
    if (!score) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_sample needs a scorer");
    r->best = -1;
    st = rwd_rsf_encode_prompt(r, r->prompt_text, (size_t)r->max_prompt_tokens + 1, &r->n_prompt, prompt, v);
    if (st != MOE_OK) return st;
    if (r->n_prompt < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an empty prompt gives the policy nothing to continue");
    for (i = 0; i < r->n_prompt; i++) r->prompt_tok[i] = (unsigned char)r->prompt_text[i];
    for (i = 0; i < c->n_candidates; i++) {
        moe_gen_seq *s = &r->seqs[i];
        s->prompt = r->prompt_tok;
        s->n_prompt = r->n_prompt;
        s->max_new = c->max_new;
        s->stop = c->stop;
        s->sampler = c->sampler;
        moe_rng_seed(&s->rng, ((uint64_t)moe_rng_u32(&r->rng) << 32) | moe_rng_u32(&r->rng));
    }
    st = moe_model_generate_batch(r->m, &r->cache, r->seqs, c->n_candidates);
    if (st != MOE_OK) {
        r->err = r->m->err;
        return st;
    }
    for (i = 0; i < c->n_candidates; i++) {
        char *t = r->resp_text + (size_t)i * ((size_t)c->max_new + 1);
        for (j = 0; j < r->seqs[i].n_out; j++) t[j] = (char)r->seqs[i].out[j];
        t[r->seqs[i].n_out] = 0;
        r->resp_len[i] = r->seqs[i].n_out;
    }
    st = score(r->r, prompt, r->resp, r->resp_len, c->n_candidates, user, &r->err);
    if (st != MOE_OK) return st;
    for (i = 0; i < c->n_candidates * c->k; i++)
        if (!isfinite(r->r[i])) return moe_err_set(&r->err, MOE_ERR_NUMERIC, "the scorer gave candidate %d a non-finite objective %d", i / c->k, i % c->k);
    st = rwd_dpa_best_of_n(&best, v, r->r, (size_t)c->n_candidates, c->k, &r->err);
    if (st != MOE_OK) return st;
    r->best = (int)best;
    return MOE_OK;
}

RWD__IMPL void rwd_rsf_clear(rwd_rsf *r) {
    if (r) r->n_kept = 0;
}

RWD__IMPL moe_status rwd_rsf_keep(rwd_rsf *r, int i) {
    int *t, j, len;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (r->best < 0) return moe_err_set(&r->err, MOE_ERR_STATE, "no candidates to keep: call rwd_rsf_sample first");
    if (i < 0 || i >= r->cfg.n_candidates) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "candidate %d is outside [0, %d)", i, r->cfg.n_candidates);
    if (r->resp_len[i] < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "candidate %d is empty: there is no response byte to learn from", i);
    if (r->n_kept >= r->cfg.max_prompts) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is full (max_prompts = %d)", r->cfg.max_prompts);
    t = r->kept_tok + (size_t)r->n_kept * (size_t)r->seq_cap;
    len = r->n_prompt + r->resp_len[i];
    memcpy(t, r->prompt_tok, sizeof(int) * (size_t)r->n_prompt);
    for (j = 0; j < r->resp_len[i]; j++) t[r->n_prompt + j] = (unsigned char)r->resp[i][j];
    r->kept_len[r->n_kept] = len;
    r->kept_prompt[r->n_kept] = r->n_prompt;
    memcpy(r->kept_r + (size_t)r->n_kept * (size_t)r->cfg.k, r->r + (size_t)i * (size_t)r->cfg.k, sizeof(double) * (size_t)r->cfg.k);
    r->n_kept++;
    return MOE_OK;
}

/* the batch of kept sequences idx[0..B): inputs t[0..len-1), targets t[1..len) with -1 on the
   prompt's bytes (no loss there) and on padding; returns T, the longest input */
static int rwd__rsf_batch(rwd_rsf *r, const int *idx, int B, int *targets_count) {
    int b, t, T = 1, cnt = 0;
    for (b = 0; b < B; b++)
        if (r->kept_len[idx[b]] - 1 > T) T = r->kept_len[idx[b]] - 1;
    for (b = 0; b < B; b++) {
        const int *s = r->kept_tok + (size_t)idx[b] * (size_t)r->seq_cap;
        int len = r->kept_len[idx[b]], np = r->kept_prompt[idx[b]];
        for (t = 0; t < T; t++) {
            int in_seq = t + 1 < len;
            r->in[b * T + t] = in_seq ? s[t] : 0;
            r->tg[b * T + t] = in_seq && t + 1 >= np ? s[t + 1] : -1;
            cnt += in_seq && t + 1 >= np;
        }
    }
    *targets_count = cnt;
    return T;
}

RWD__IMPL moe_status rwd_rsf_kept_loss(rwd_rsf *r, double *loss) {
    double sum = 0.0;
    long long count = 0;
    int i, b;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (!loss) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "rwd_rsf_kept_loss needs an output");
    if (r->n_kept < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is empty: no response to measure");
    for (i = 0; i < r->n_kept; i += r->m->max_B) {
        int B = r->n_kept - i < r->m->max_B ? r->n_kept - i : r->m->max_B, cnt, T;
        for (b = 0; b < B; b++) r->order[b] = i + b; /* order is scratch here */
        T = rwd__rsf_batch(r, r->order, B, &cnt);
        st = moe_model_forward(r->m, r->in, r->tg, B, T, NULL);
        if (st != MOE_OK) {
            r->err = r->m->err;
            return st;
        }
        sum += r->m->loss * cnt; /* the forward's mean over its counted targets */
        count += cnt;
    }
    *loss = count > 0 ? sum / (double)count : 0.0;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_finetune(rwd_rsf *r, int epochs) {
    int e, i;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    if (epochs < 0) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "epochs must be >= 0, not %d", epochs);
    if (r->n_kept < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "the kept set is empty: nothing to fine-tune on");
    for (e = 0; e < epochs; e++) {
        for (i = 0; i < r->n_kept; i++) r->order[i] = i;
        for (i = r->n_kept - 1; i > 0; i--) { /* Fisher-Yates */
            int j = moe_rng_below(&r->rng, i + 1), t = r->order[i];
            r->order[i] = r->order[j];
            r->order[j] = t;
        }
        for (i = 0; i < r->n_kept; i += r->m->max_B) {
            int B = r->n_kept - i < r->m->max_B ? r->n_kept - i : r->m->max_B, cnt, T;
            T = rwd__rsf_batch(r, r->order + i, B, &cnt);
            if (cnt == 0) continue;
            moe_store_zero_grad(&r->m->S);
            if ((st = moe_model_forward(r->m, r->in, r->tg, B, T, NULL)) != MOE_OK ||
                (st = moe_model_backward(r->m, 1.0f)) != MOE_OK) {
                r->err = r->m->err;
                return st;
            }
            if (r->cfg.grad_clip > 0.0f) moe_clip_grad_norm(&r->m->S, r->cfg.grad_clip);
            if ((st = moe_adamw_step(&r->m->S, &r->cfg.adamw, r->cfg.lr, ++r->step)) != MOE_OK)
                return moe_err_set(&r->err, st, "the AdamW step failed");
        }
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_round(rwd_rsf *r, const char *const *prompts, const double *dirs, int n_prompts,
                                   rwd_rsf_score_fn score, void *user, rwd_rsf_stats *stats) {
    rwd_rsf_stats s;
    int i, j, k;
    moe_status st;
    if (!r || !r->m) return MOE_ERR_STATE;
    k = r->cfg.k;
    memset(&s, 0, sizeof s);
    if (!prompts || !dirs || n_prompts < 1) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "an RSF round needs at least one prompt with its direction");
    if (n_prompts > r->cfg.max_prompts) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "%d prompts are more than max_prompts = %d", n_prompts, r->cfg.max_prompts);
    for (i = 0; i < n_prompts; i++) {
        if (!prompts[i]) return moe_err_set(&r->err, MOE_ERR_INVALID_ARG, "prompt %d is NULL", i);
        if ((st = rwd__rsf_check_dir(r, dirs + (size_t)i * (size_t)k)) != MOE_OK) return st;
    }
    rwd_rsf_clear(r);
    for (i = 0; i < n_prompts; i++) {
        const double *v = dirs + (size_t)i * (size_t)k;
        if ((st = rwd_rsf_sample(r, prompts[i], v, score, user)) != MOE_OK) return st;
        for (j = 0; j < r->cfg.n_candidates; j++) s.mean_all += rwd_dpa_scalarize(v, r->r + (size_t)j * (size_t)k, k);
        s.mean_kept += rwd_dpa_scalarize(v, r->r + (size_t)r->best * (size_t)k, k);
        if (r->resp_len[r->best] > 0 && (st = rwd_rsf_keep(r, r->best)) != MOE_OK) return st;
    }
    s.n_prompts = n_prompts;
    s.mean_all /= (double)n_prompts * r->cfg.n_candidates;
    s.mean_kept /= (double)n_prompts;
    if (r->n_kept > 0) {
        if ((st = rwd_rsf_kept_loss(r, &s.loss_before)) != MOE_OK) return st;
        if ((st = rwd_rsf_finetune(r, r->cfg.epochs)) != MOE_OK) return st;
        if ((st = rwd_rsf_kept_loss(r, &s.loss_after)) != MOE_OK) return st;
    }
    if (stats) *stats = s;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_rsf_head_scorer_init(rwd_rsf_head_scorer *s, const rwd_featurizer *f, rwd_head *heads,
                                              int n_heads, const moe_store *store, double length_scale,
                                              moe_err *err) {
    int j;
    if (!s) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_rsf_head_scorer_init needs a scorer");
    memset(s, 0, sizeof *s);
    if (!f || n_heads < 0 || (n_heads > 0 && (!heads || !store))) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head scorer needs a featurizer and, for n_heads > 0, heads in a store");
    if (!(length_scale >= 0.0) || !isfinite(length_scale)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "length_scale must be finite and >= 0");
    if (n_heads + (length_scale > 0.0) < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the head scorer needs at least one objective: a head or length_scale > 0");
    for (j = 0; j < n_heads; j++)
        if (heads[j].cfg.d_in != rwd_featurizer_width(f)) return moe_err_set(err, MOE_ERR_SHAPE, "head %d reads %d features, the featurizer gives %d", j, heads[j].cfg.d_in, rwd_featurizer_width(f));
    s->x = (float *)moe__calloc((size_t)rwd_featurizer_width(f), sizeof(float));
    if (!s->x) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the scorer's features");
    s->f = f;
    s->heads = heads;
    s->n_heads = n_heads;
    s->store = store;
    s->length_scale = length_scale;
    return MOE_OK;
}

RWD__IMPL void rwd_rsf_head_scorer_free(rwd_rsf_head_scorer *s) {
    if (s) MOE_FREE(s->x);
}

RWD__IMPL moe_status rwd_rsf_head_score(double *r, const char *prompt, const char *const *resp, const int *len, int n,
                                        void *user, moe_err *err) {
    rwd_rsf_head_scorer *s = (rwd_rsf_head_scorer *)user;
    int i, j, k;
    if (!s || !s->x || !r || !resp || !len || n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_rsf_head_score needs its scorer, outputs and responses");
    k = s->n_heads + (s->length_scale > 0.0);
    for (i = 0; i < n; i++) {
        if (s->n_heads > 0) rwd_featurize(s->x, s->f, prompt, resp[i]);
        for (j = 0; j < s->n_heads; j++) rwd_head_score(&s->heads[j], s->store, r + (size_t)i * (size_t)k + j, s->x, 1);
        if (s->length_scale > 0.0) r[(size_t)i * (size_t)k + s->n_heads] = (double)rwd_utf8_length(resp[i], (size_t)len[i]) / s->length_scale;
    }
    return MOE_OK;
}
#endif /* RWD_IMPLEMENTATION */

/*
------------------------------------------------------------------------------------------------
MIT License

Copyright (c) 2026 The moe.h authors

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES
OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN
CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
------------------------------------------------------------------------------------------------
*/
