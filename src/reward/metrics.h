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


/* @implementation */
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

