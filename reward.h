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
       1. text       >>rwd:text      UTF-8 code points, JSON parser, HH-RLHF pair reader
       2. lowess     >>rwd:lowess    LOWESS exactly as statsmodels (spec 2.4), fast + naive
       3. calib      >>rwd:calib     RC-LWR, RC-Mean, length penalty, pairs, sequences (spec 2)
       4. metrics    >>rwd:metrics   accuracy, RewardBench sections, Spearman/Kendall/Pearson,
                                     length diagnostics, AlpacaEval win rates (spec 2.6)
       5. features   >>rwd:features  hashed word/bigram features + length features of text;
                                     a trained moe.h language model's pooled hidden states
       6. head       >>rwd:head      linear/MLP reward head, Bradley-Terry loss, training,
                                     save/load (spec 0.1)
       7. poe        >>rwd:poe       Product-of-Experts length debiasing (spec 1)

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
   >>rwd:lowess  LOWESS exactly as statsmodels computes it (spec 2.4)
   ============================================================================================
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
   >>rwd:calib  post-hoc reward calibration (spec 2)
   ============================================================================================
   r_cal = r - alpha * b(c): b is the average reward of responses with a similar
   characteristic c (length), estimated on the pooled chosen + rejected responses. */

/* RC-LWR curve for out-of-sample queries (spec 2.3, AlpacaEval setting). */
typedef struct rwd_lwr {
    double *x;   /* (n) distinct fitted x values, ascending */
    double *fit; /* (n) LOWESS fit at x[i]                  */
    size_t n;
} rwd_lwr;

RWDDEF moe_status rwd_lwr_fit(rwd_lwr *m, const double *x, const double *y, size_t n, double frac,
                              int iters, moe_err *err);
/* b(c): the fit at the smallest fitted x >= c (the paper's bisect_left step lookup); above the
   largest x, the last fit (the paper's code would index past its array). interpolate != 0:
   linear interpolation between the neighbours instead, constant outside the range. */
RWDDEF double rwd_lwr_predict(const rwd_lwr *m, double c, int interpolate);
RWDDEF void rwd_lwr_free(rwd_lwr *m);

/* RC-LWR in-sample (RewardBench setting): out[i] = r[i] - alpha * lowess(c, r)[i], n points
   (pool chosen then rejected). out may equal r. */
RWDDEF moe_status rwd_calibrate_lwr(double *out, const double *c, const double *r, size_t n,
                                    double frac, int iters, double alpha, moe_err *err);

/* RC-Mean (spec 2.2) on N pairs: T = mean |c_w - c_l| / ratio; points pooled interleaved
   (w0, l0, w1, ...), shuffled with moe_rng(seed) if shuffle, stable-sorted by c. The window of
   c0 holds the points with |c - c0| <= T minus the last one in sorted order (the paper's code).
   A pair is calibrated only if both windows hold >= min_count points: r - alpha * mean(window).
   out_w/out_l may equal s_w/s_l. */
RWDDEF moe_status rwd_calibrate_mean(double *out_w, double *out_l, const double *s_w,
                                     const double *s_l, const double *c_w, const double *c_l,
                                     size_t n, double ratio, int min_count, double alpha,
                                     int shuffle, uint64_t seed, moe_err *err);

typedef enum rwd_cal_method {
    RWD_CAL_LWR = 0,     /* RC-LWR                                                       */
    RWD_CAL_MEAN,        /* RC-Mean                                                      */
    RWD_CAL_PENALTY,     /* r - penalty * text length (baseline, spec 2.5)                */
    RWD_CAL_PENALTY_LWR, /* penalty, then RC-LWR on the penalised scores                  */
    RWD_CAL_PENALTY_MEAN /* penalty, then RC-Mean                                         */
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
   length the penalty uses (full chat-formatted text, as the paper's code), or NULL for c.
   Outputs may equal the score arrays. */
RWDDEF moe_status rwd_calibrate_pairs(double *out_w, double *out_l, const double *s_w,
                                      const double *s_l, const double *c_w, const double *c_l,
                                      const double *t_w, const double *t_l, size_t n,
                                      const rwd_cal_config *c, moe_err *err);
/* Several characteristics in sequence (spec 2.1): feature f re-estimates b on the scores
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
RWDDEF double rwd_pearson(const double *a, const double *b, size_t n);
RWDDEF double rwd_spearman(const double *a, const double *b, size_t n); /* average ranks for ties */
RWDDEF double rwd_kendall(const double *a, const double *b, size_t n);  /* tau-b, O(n log n)    */
/* Spearman between the lengths and the scores of all 2N responses (the paper's diagnostic) */
RWDDEF double rwd_length_correlation(const double *s_w, const double *s_l, const double *len_w,
                                     const double *len_l, size_t n);

/* RewardBench (spec 2.6): four sections, each a weighted mean of subset accuracies with the
   leaderboard's fixed weights; overall = mean of the sections present. */
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

/* AlpacaEval raw metrics of one model against the reference (data README). */
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
   log(1 + len), len / 1000 ] with len = code points of the response (spec 1.4). Words are
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
   >>rwd:head  reward heads on feature rows, Bradley-Terry loss and training (spec 0.1)
   ============================================================================================
   linear: r = x . w1^T                             w1 (1, d_in)
   MLP:    r = act(x . w1^T + b1) . w2^T            w1 (H, d_in), b1 (H), w2 (1, H)
   No output bias (as Hugging Face's reward score head): it cancels in every BT margin, and
   Adam would only amplify the rounding noise of its ~0 gradient.
   The tensors live in a caller's moe_store (prefix + "w1" ...); weights decay, biases do not.
   BT loss of B pairs with margins m and centering coefficient c (TRL's RewardTrainer):
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
    float bias_lr;      /* PoE: the bias expert's peak learning rate (larger, spec 1.2); 1e-2    */
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
   >>rwd:poe  Product-of-Experts length debiasing (spec 1)
   ============================================================================================
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
    /* every query is a fitted point, so the paper's bisect_left lookup is the point's own fit */
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
    /* RC-LWR pools all chosen, then all rejected (the paper's x_train) */
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
    if ((st = rwd__check_finite(s_w, n, "chosen scores", err)) || (st = rwd__check_finite(s_l, n, "rejected scores", err))) return st;
    pen = c->method == RWD_CAL_PENALTY || c->method == RWD_CAL_PENALTY_LWR || c->method == RWD_CAL_PENALTY_MEAN;
    if (pen) { /* the baseline: r - penalty * length of the full text (spec 2.5) */
        const double *lw = t_w ? t_w : (n_features > 0 ? c_w[0] : NULL), *ll = t_l ? t_l : (n_features > 0 ? c_l[0] : NULL);
        if (!lw || !ll) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the length penalty needs text lengths");
        if ((st = rwd__check_finite(lw, n, "chosen text length", err)) || (st = rwd__check_finite(ll, n, "rejected text length", err))) return st;
        for (i = 0; i < n; i++) {
            out_w[i] = s_w[i] - c->penalty * lw[i];
            out_l[i] = s_l[i] - c->penalty * ll[i];
        }
    } else {
        memmove(out_w, s_w, n * sizeof(double));
        memmove(out_l, s_l, n * sizeof(double));
    }
    if (c->method == RWD_CAL_PENALTY) return MOE_OK;
    for (f = 0; f < n_features; f++)
        if ((st = rwd__calibrate_feature(out_w, out_l, out_w, out_l, c_w[f], c_l[f], n, alpha[f], c, err)) != MOE_OK) return st;
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

RWD__IMPL double rwd_pearson(const double *a, const double *b, size_t n) {
    double ma = 0.0, mb = 0.0, sab = 0.0, saa = 0.0, sbb = 0.0;
    size_t i;
    if (n < 2) return NAN;
    for (i = 0; i < n; i++) { ma += a[i]; mb += b[i]; }
    ma /= (double)n;
    mb /= (double)n;
    for (i = 0; i < n; i++) {
        double da = a[i] - ma, db = b[i] - mb;
        sab += da * db; saa += da * da; sbb += db * db;
    }
    if (saa == 0.0 || sbb == 0.0) return NAN;
    return sab / sqrt(saa * sbb);
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
    rho = rwd_pearson(r, r + n, n);
    MOE_FREE(r);
    return rho;
}

typedef struct rwd__xy { double x, y; } rwd__xy;

static int rwd__cmp_xy(const void *p, const void *q) {
    const rwd__xy *a = (const rwd__xy *)p, *b = (const rwd__xy *)q;
    if (a->x != b->x) return a->x < b->x ? -1 : 1;
    return (a->y > b->y) - (a->y < b->y);
}

/* merge sort of y counting strict inversions (pairs i < j with y_i > y_j) */
static uint64_t rwd__inversions(double *y, double *tmp, size_t n) {
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
static double rwd__tied_pairs(const double *v, size_t n) {
    size_t i = 0, j;
    double t = 0.0;
    while (i < n) {
        for (j = i + 1; j < n && v[j] == v[i]; j++) {}
        t += 0.5 * (double)(j - i) * (double)(j - i - 1);
        i = j;
    }
    return t;
}

RWD__IMPL double rwd_kendall(const double *a, const double *b, size_t n) {
    /* Knight's O(n log n) tau-b, the algorithm of scipy.stats.kendalltau */
    rwd__xy *p;
    double *y, *tmp, tot, xt, yt, jt = 0.0, dis, tau;
    size_t i = 0, j;
    if (n < 2) return NAN;
    p = (rwd__xy *)MOE_MALLOC(n * sizeof *p);
    y = (double *)MOE_MALLOC(2 * n * sizeof(double));
    if (!p || !y) { MOE_FREE(p); MOE_FREE(y); return NAN; }
    tmp = y + n;
    for (i = 0; i < n; i++) { p[i].x = a[i]; p[i].y = b[i]; }
    qsort(p, n, sizeof *p, rwd__cmp_xy);
    for (i = 0; i < n; i++) { y[i] = p[i].x; }
    xt = rwd__tied_pairs(y, n);
    for (i = 0; i < n; i = j) { /* joint ties: equal (x, y) */
        for (j = i + 1; j < n && p[j].x == p[i].x && p[j].y == p[i].y; j++) {}
        jt += 0.5 * (double)(j - i) * (double)(j - i - 1);
    }
    for (i = 0; i < n; i++) y[i] = p[i].y;
    dis = (double)rwd__inversions(y, tmp, n); /* y is now sorted */
    yt = rwd__tied_pairs(y, n);
    tot = 0.5 * (double)n * (double)(n - 1);
    MOE_FREE(p);
    MOE_FREE(y);
    if (tot - xt <= 0.0 || tot - yt <= 0.0) return NAN;
    tau = (tot - xt - yt + jt - 2.0 * dis) / sqrt(tot - xt) / sqrt(tot - yt);
    return tau;
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

/* The RewardBench leaderboard's EXAMPLE_COUNTS (spec 2.6): weights, not always pair counts. */
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
    float *dhid = h->dhid, *dpre = h->dhid + (size_t)h->cfg.max_rows * (size_t)H;
    if (h->cfg.kind == RWD_HEAD_LINEAR) {
        moe_matmul_backward(dx, moe_store_grad(s, h->id_w1), NULL, dr, x, moe_store_param(s, h->id_w1), rows, d, 1, &h->work);
        return;
    }
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
