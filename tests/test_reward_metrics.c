/* test_reward_metrics.c - reward.h section 4 (metrics) on real data and references:
 * correlations against scipy (tests/ref/metrics_ref.*), accuracy rules, RewardBench sections,
 * the AlpacaEval leaderboard recomputed from the judge annotations, and the HH-RLHF length
 * statistics of the data README (shared data; skipped when absent). */
#define _POSIX_C_SOURCE 200809L
#include "reward.h"      /* defines: rwd_pair_accuracy, rwd_spearman, rwd_winrate_*, rwd_hh_read ... */
#include "test.h"        /* defines: CHECK, TEST_BEGIN, test_summary, test_shared_data */
#include "reward_util.h" /* defines: csv_read, csv_col, read_data */

static double ref_value(const char *path, const char *key) {
    char line[256], k[64];
    double v = NAN, x;
    FILE *f = fopen(path, "r");
    if (!f) return NAN;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%63[^=]=%lf", k, &x) == 2 && strcmp(k, key) == 0) v = x;
    fclose(f);
    return v;
}

static void test_correlations(void) {
    csv_table t;
    const double *a, *b;
    double c[4] = {1, 2, 3, 4}, d[4] = {2, 2, 2, 2};
    TEST_BEGIN("Pearson, Spearman, Kendall tau-b = scipy (ties)");
    if (csv_read(&t, "tests/ref/metrics_ref.csv") != 0) { CHECK(0, "cannot read tests/ref/metrics_ref.csv"); return; }
    a = csv_col(&t, "a");
    b = csv_col(&t, "b");
    CHECK(fabs(moe_pearson(a, b, (size_t)t.rows) - ref_value("tests/ref/metrics_ref.txt", "pearson")) < 1e-12, "Pearson");
    CHECK(fabs(rwd_spearman(a, b, (size_t)t.rows) - ref_value("tests/ref/metrics_ref.txt", "spearman")) < 1e-12, "Spearman");
    CHECK(fabs(moe_kendall_tau(a, b, (size_t)t.rows) - ref_value("tests/ref/metrics_ref.txt", "kendall")) < 1e-12, "Kendall: %.17g vs %.17g",
          moe_kendall_tau(a, b, (size_t)t.rows), ref_value("tests/ref/metrics_ref.txt", "kendall"));
    csv_free(&t);
    CHECK(isnan(rwd_spearman(c, d, 4)) && isnan(moe_pearson(c, d, 4)) && isnan(moe_kendall_tau(c, d, 4)), "constant input: NaN");
    CHECK(isnan(moe_pearson(c, d, 1)) && isnan(rwd_pair_accuracy(c, d, 0)), "too few points: NaN");
    CHECK(fabs(moe_kendall_tau(c, c, 4) - 1.0) < 1e-15 && fabs(rwd_spearman(c, c, 4) - 1.0) < 1e-15, "identical series: 1");
}

static void test_accuracy_rules(void) {
    double sw[4] = {1, 2, 3, 4}, sl[4] = {0, 2, 5, 1}, lw[4] = {10, 20, 30, 40}, ll[4] = {20, 20, 10, 50};
    double bw[4] = {1, 3, 3, 0}, bl[4] = {0, 2, 5, 1};
    size_t m;
    TEST_BEGIN("accuracy (ties wrong), longer-wins, shorter-chosen, preference changed, per subset");
    CHECK(rwd_pair_accuracy(sw, sl, 4) == 0.5, "2 of 4 right, the tie counts as wrong");
    CHECK(rwd_longer_wins_accuracy(lw, ll, 4) == 0.25, "only pair 2 has a longer chosen");
    CHECK(rwd_shorter_chosen_accuracy(sw, sl, lw, ll, 4, &m) == 1.0 && m == 2, "pairs 0 and 3, both right");
    CHECK(rwd_shorter_chosen_accuracy(sl, sw, lw, ll, 4, &m) == 0.0 && m == 2, "swapped scores: both wrong");
    CHECK(rwd_preference_changed(sw, sl, bw, bl, 4) == 0.5, "pairs 1 and 3 flip");
    {
        int sub[4] = {1, 0, 1, 1};
        double acc[3];
        size_t cnt[3];
        moe_err err;
        CHECK(rwd_subset_accuracy(acc, cnt, sub, sw, sl, 4, 3, &err) == MOE_OK && acc[0] == 0.0 && fabs(acc[1] - 2.0 / 3.0) < 1e-15 &&
              isnan(acc[2]) && cnt[1] == 3 && cnt[2] == 0, "per-subset accuracy");
        sub[2] = 3;
        CHECK(rwd_subset_accuracy(acc, cnt, sub, sw, sl, 4, 3, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "pair 2"), "bad subset id: %s", err.msg);
    }
}

static void test_rewardbench_sections(void) {
    const char *names[5] = {"alpacaeval-easy", "mt-bench-med", "math-prm", "hep-go", "not-a-subset"};
    double acc[5] = {1.0, 0.5, 0.0, 1.0, 0.3}, sec[4], overall, w;
    TEST_BEGIN("RewardBench weighted sections");
    CHECK(rwd_rewardbench_subset("xstest-should-refuse", &w) == RWD_SECTION_SAFETY && w == 250, "the table's weight (not the split size)");
    CHECK(rwd_rewardbench_subset("prior-sets", &w) == -1 && w == 0, "unknown subsets have no section");
    rwd_rewardbench_scores(sec, &overall, names, acc, 5);
    CHECK(fabs(sec[RWD_SECTION_CHAT] - (100 * 1.0 + 40 * 0.5) / 140) < 1e-15, "chat = weighted mean");
    CHECK(fabs(sec[RWD_SECTION_REASONING] - 164.0 / (984 + 164)) < 1e-15, "math-prm weight 984");
    CHECK(isnan(sec[RWD_SECTION_SAFETY]) && fabs(overall - (sec[0] + sec[3]) / 2) < 1e-15, "absent sections are NaN, overall over the present");
}

/* a field of a CSV line (no quoted commas in the leaderboard) */
static double csv_field(const char *line, int col) {
    int c = 0;
    while (c < col && *line) c += *line++ == ',';
    return strtod(line, NULL);
}

static void test_alpacaeval_leaderboard(void) {
    const char *root = test_shared_data();
    char path[1200], line[1024];
    FILE *f;
    int k;
    TEST_BEGIN("AlpacaEval: win rate, s.e., counts, length of sets 0-10 = merged_leaderboard.csv");
    if (!root) { printf("SKIP AlpacaEval: shared data folder not found (set MOE_SHARED_DATA or put it at ../shared/data)\n"); return; }
    snprintf(path, sizeof path, "%s/preferences/alpacaeval-bon-tulu2-13b/merged_leaderboard.csv", root);
    f = fopen(path, "r");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f) return;
    CHECK(fgets(line, sizeof line, f) && strstr(line, "win_rate,standard_error,mode,avg_length,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate"), "leaderboard header");
    for (k = 0; k <= 10 && fgets(line, sizeof line, f); k++) {
        char rel[128], *text;
        size_t len;
        rwd_winrate w;
        moe_err err;
        snprintf(rel, sizeof rel, "preferences/alpacaeval-bon-tulu2-13b/tulu-2-dpo-13b.%d.annotations.json.xz", k);
        if (read_data(&text, &len, rel) != 0) { CHECK(0, "cannot read %s", rel); continue; }
        CHECK(rwd_winrate_from_annotations(&w, text, len, &err) == MOE_OK, "set %d: %s", k, err.msg);
        free(text);
        /* The files store each preference rounded to 10 decimals (pandas to_json), so the mean
           can move by 5e-11 and the percentage by 5e-9; the s.e. by 100 * 5e-11 / sqrt(805) * (1 + 1e-3). */
        CHECK(fabs(w.win_rate - csv_field(line, 1)) <= 5e-9, "set %d win_rate %.17g vs %.17g", k, w.win_rate, csv_field(line, 1));
        CHECK(fabs(w.standard_error - csv_field(line, 2)) <= 1.8e-10, "set %d standard_error %.17g vs %.17g", k, w.standard_error, csv_field(line, 2));
        CHECK(w.avg_length == csv_field(line, 4) && w.n_wins == (int)csv_field(line, 5) && w.n_wins_base == (int)csv_field(line, 6) &&
              w.n_draws == (int)csv_field(line, 7) && w.n_total == (int)csv_field(line, 8),
              "set %d: length %g wins %d/%d/%d of %d", k, w.avg_length, w.n_wins, w.n_wins_base, w.n_draws, w.n_total);
        CHECK(w.discrete_win_rate == csv_field(line, 9), "set %d discrete_win_rate %.17g vs %.17g", k, w.discrete_win_rate, csv_field(line, 9));
        printf("   set %d: win_rate %.12f (|diff| %.1e) se %.12f (|diff| %.1e) avg_length %g wins %d/%d/%d\n", k, w.win_rate,
               fabs(w.win_rate - csv_field(line, 1)), w.standard_error, fabs(w.standard_error - csv_field(line, 2)), w.avg_length,
               w.n_wins, w.n_wins_base, w.n_draws);
    }
    fclose(f);
    {
        rwd_winrate w;
        moe_err err;
        double bad[3] = {1.2, 2.5, 1.0};
        CHECK(rwd_winrate_compute(&w, bad, NULL, 3, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "preference 1"), "out of range: %s", err.msg);
        CHECK(rwd_winrate_from_annotations(&w, "[{\"preference\": 1.5}]", 21, &err) == MOE_ERR_FORMAT && strstr(err.msg, "line 1"), "missing output_2: %s", err.msg);
    }
}

static void test_hh_length_statistics(void) {
    /* the table of preferences/README.md (published values) */
    static const struct { const char *split; int longer, shorter, equal; double sum_w, sum_l; size_t n; } ref[4] = {
        {"harmless-base", 1023, 1278, 11, 387774, 487271, 2312},
        {"helpful-base", 1402, 935, 17, 579422, 436707, 2354},
        {"helpful-online", 484, 646, 7, 743968, 793854, 1137},
        {"helpful-rejection-sampled", 1534, 1163, 52, 991178, 866750, 2749}};
    int s;
    TEST_BEGIN("HH-RLHF final-turn length statistics = the data README");
    for (s = 0; s < 4; s++) {
        char rel[256], *text;
        size_t len, i;
        int longer = 0, shorter = 0, equal = 0;
        double sw = 0, sl = 0;
        rwd_text_pairs p;
        moe_err err;
        FILE *f;
        snprintf(rel, sizeof rel, "preferences/hh-rlhf/%s/test.jsonl.gz", ref[s].split);
        if ((i = (size_t)read_data(&text, &len, rel)) != 0) { CHECK(i == 1, "cannot read %s", rel); return; }
        memset(&p, 0, sizeof p);
        f = tmpfile();
        CHECK(f && fwrite(text, 1, len, f) == len, "tmpfile");
        free(text);
        if (!f) return;
        rewind(f);
        CHECK(rwd_hh_read(&p, f, &err) == MOE_OK, "%s: %s", ref[s].split, err.msg);
        fclose(f);
        for (i = 0; i < p.n; i++) {
            size_t a = rwd_utf8_length(p.chosen[i], strlen(p.chosen[i])), b = rwd_utf8_length(p.rejected[i], strlen(p.rejected[i]));
            longer += a > b; shorter += a < b; equal += a == b;
            sw += (double)a; sl += (double)b;
        }
        printf("   %s: %zu pairs, chosen longer %d, rejected longer %d, equal %d, sums %.0f %.0f\n", ref[s].split, p.n, longer, shorter, equal, sw, sl);
        CHECK(p.n == ref[s].n && longer == ref[s].longer && shorter == ref[s].shorter && equal == ref[s].equal &&
              sw == ref[s].sum_w && sl == ref[s].sum_l, "%s statistics differ from the README", ref[s].split);
        rwd_text_pairs_free(&p);
    }
}

int main(void) {
    test_correlations();
    test_accuracy_rules();
    test_rewardbench_sections();
    test_alpacaeval_leaderboard();
    test_hh_length_statistics();
    return test_summary();
}
