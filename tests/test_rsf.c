/* test_rsf.c - reward.h >>rwd:rsf: rejection-sampling fine-tuning of the byte LM under a
   direction.
   (a) the kept candidate is the argmax of v . r over the candidates, for directions around the
       circle, and the candidates are what the scorer saw;
   (b) the prompt encodings (DPA's system prompt, the short weights prefix) carry round(100 v);
   (c) fine-tuning on a kept set lowers the policy's loss on it;
   (d) a reward for one byte ('a') shifts what a tiny policy generates within a few rounds;
   (e) the head scorer equals the head on the featurizer's features, plus verbosity;
   (f) bad input: n = 0, a response longer than the window, a direction off the unit circle,
       an empty kept set, an empty prompt: a status and a sentence. */
#include "reward.h"
#include "test.h"

static moe_model_config tiny_lm(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 256;
    c.max_seq = 48;
    c.d = 32;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 64;
    return c;
}

/* objectives: the share of 'a' bytes, and the length over 16 (verbosity) */
static moe_status score_a(double *r, const char *prompt, const char *const *resp, const int *len, int n, void *user,
                          moe_err *err) {
    int i, j;
    int *calls = (int *)user;
    (void)prompt;
    (void)err;
    for (i = 0; i < n; i++) {
        int a = 0;
        for (j = 0; j < len[i]; j++) a += resp[i][j] == 'a';
        r[2 * i] = len[i] > 0 ? (double)a / len[i] : 0.0;
        r[2 * i + 1] = len[i] / 16.0;
    }
    if (calls) (*calls)++;
    return MOE_OK;
}

static moe_status score_fail(double *r, const char *prompt, const char *const *resp, const int *len, int n, void *user,
                             moe_err *err) {
    (void)r; (void)prompt; (void)resp; (void)len; (void)n; (void)user;
    return moe_err_set(err, MOE_ERR_INVALID_ARG, "this scorer refuses");
}

/* the mean share of 'a' over n fresh candidates for each of the prompts */
static double share_a(rwd_rsf *r, const char *const *prompts, int np, const double *v) {
    double s = 0.0;
    int p, i;
    for (p = 0; p < np; p++) {
        if (rwd_rsf_sample(r, prompts[p], v, score_a, NULL) != MOE_OK) return -1.0;
        for (i = 0; i < r->cfg.n_candidates; i++) s += r->r[2 * i];
    }
    return s / (np * r->cfg.n_candidates);
}

int main(void) {
    moe_model m;
    moe_model_config mc = tiny_lm();
    rwd_rsf_config c = rwd_rsf_config_default();
    rwd_rsf r;
    const char *prompts[6] = {"the ", "she said ", "in 1961 ", "it was ", "a man ", "they "};
    double v[2];
    int calls = 0;
    CHECK(moe_model_init(&m, &mc, 8, 48) == MOE_OK, "model init: %s", m.err.msg);
    moe_model_init_weights(&m, 7);
    c.n_candidates = 8;
    c.max_new = 16;
    c.max_prompts = 16;
    c.max_prompt_bytes = 16;
    c.lr = 1e-2f;
    c.seed = 3;

    TEST_BEGIN("the kept candidate is the argmax of v . r; the scorer saw the candidates");
    CHECK(rwd_rsf_init(&r, &m, &c) == MOE_OK, "rsf init: %s", r.err.msg);
    {
        int t, ok = 1, ok_r = 1;
        for (t = 0; t < 8; t++) {
            double theta = -1.5 + 3.0 * t / 7.0, best_s = -1e300, chk[16];
            int i, best = -1;
            rwd_dpa_direction_angle(v, theta);
            if (rwd_rsf_sample(&r, prompts[t % 6], v, score_a, &calls) != MOE_OK) { ok = 0; break; }
            score_a(chk, prompts[t % 6], r.resp, r.resp_len, 8, NULL, NULL);
            for (i = 0; i < 8; i++) {
                double s = v[0] * chk[2 * i] + v[1] * chk[2 * i + 1];
                ok_r &= chk[2 * i] == r.r[2 * i] && chk[2 * i + 1] == r.r[2 * i + 1] && (int)strlen(r.resp[i]) <= r.resp_len[i];
                if (s > best_s) { best_s = s; best = i; }
            }
            ok &= best == r.best;
        }
        CHECK(ok, "best-of-n under v picked another candidate than the argmax");
        CHECK(ok_r, "the stored objectives differ from the scorer's on the stored responses");
        CHECK(calls == 8, "one scorer call per prompt expected, got %d", calls);
    }

    TEST_BEGIN("prompt encodings carry DPA's integer weights");
    {
        rwd_rsf r2;
        rwd_rsf_config c2 = c;
        char buf[512];
        int n = 0;
        v[0] = v[1] = sqrt(0.5);
        c2.prompt_kind = RWD_RSF_PROMPT_WEIGHTS;
        CHECK(rwd_rsf_init(&r2, &m, &c2) == MOE_OK, "init: %s", r2.err.msg);
        CHECK(rwd_rsf_encode_prompt(&r2, buf, sizeof buf, &n, "hi", v) == MOE_OK && strcmp(buf, "[71,71] hi") == 0 && n == 10,
              "short encoding: '%s'", buf);
        rwd_rsf_free(&r2);
        c2.prompt_kind = RWD_RSF_PROMPT_DPA;
        CHECK(rwd_rsf_init(&r2, &m, &c2) != MOE_OK && strstr(r2.err.msg, "window"), "DPA's long prompt in a 48-token window: %s", r2.err.msg);
        rwd_rsf_free(&r2);
    }

    TEST_BEGIN("fine-tuning on the kept set lowers the loss on it");
    {
        double before = 0, after = 0;
        int p;
        rwd_dpa_direction_angle(v, 0.3);
        rwd_rsf_clear(&r);
        for (p = 0; p < 6; p++) {
            CHECK(rwd_rsf_sample(&r, prompts[p], v, score_a, NULL) == MOE_OK, "sample: %s", r.err.msg);
            CHECK(rwd_rsf_keep(&r, r.best) == MOE_OK, "keep: %s", r.err.msg);
        }
        CHECK(r.n_kept == 6, "6 kept, got %d", r.n_kept);
        CHECK(rwd_rsf_kept_loss(&r, &before) == MOE_OK, "loss: %s", r.err.msg);
        CHECK(rwd_rsf_finetune(&r, 5) == MOE_OK, "finetune: %s", r.err.msg);
        CHECK(rwd_rsf_kept_loss(&r, &after) == MOE_OK, "loss: %s", r.err.msg);
        CHECK(before > 4.0 && after < before - 0.5, "loss on the kept set %.3f -> %.3f", before, after);
    }
    rwd_rsf_free(&r);

    TEST_BEGIN("a reward for 'a' shifts the generations within a few rounds");
    {
        double dirs[12], s0, s1;
        int i, t;
        rwd_rsf_stats st;
        rwd_rsf_config ca = c;
        ca.epochs = 8;
        moe_model_init_weights(&m, 11);
        CHECK(rwd_rsf_init(&r, &m, &ca) == MOE_OK, "rsf init: %s", r.err.msg);
        v[0] = 1.0; v[1] = 0.0;
        for (i = 0; i < 6; i++) { dirs[2 * i] = 1.0; dirs[2 * i + 1] = 0.0; }
        s0 = share_a(&r, prompts, 6, v);
        memset(&st, 0, sizeof st);
        for (t = 0; t < 6; t++) CHECK(rwd_rsf_round(&r, prompts, dirs, 6, score_a, NULL, &st) == MOE_OK, "round %d: %s", t, r.err.msg);
        CHECK(st.n_prompts == 6 && st.mean_kept >= st.mean_all && st.loss_after < st.loss_before,
              "round stats: kept %.3f all %.3f loss %.3f -> %.3f", st.mean_kept, st.mean_all, st.loss_before, st.loss_after);
        s1 = share_a(&r, prompts, 6, v);
        printf("share of 'a' in fresh generations: %.4f -> %.4f\n", s0, s1);
        CHECK(s1 > 0.05 && s1 > 5.0 * s0, "the share of 'a' moved from %.4f to %.4f only", s0, s1);
        rwd_rsf_free(&r);
    }

    TEST_BEGIN("the head scorer: the head on the features, plus verbosity");
    {
        rwd_featurizer f = rwd_featurizer_default();
        rwd_head_config hc = rwd_head_config_default();
        rwd_head h;
        moe_store s;
        moe_rng rng;
        moe_err e;
        rwd_rsf_head_scorer sc;
        const char *resp[2] = {"good words here", "\xc3\xa9t\xc3\xa9"};
        int len[2] = {15, 6};
        double out[4], ref;
        float *x;
        f.dim = 64;
        hc.d_in = rwd_featurizer_width(&f);
        moe_store_init(&s);
        CHECK(rwd_head_init(&h, &hc, &s, "h.", &e) == MOE_OK && moe_store_alloc(&s, 0) == MOE_OK, "head: %s", e.msg);
        moe_rng_seed(&rng, 5);
        hc.init_std = 1.0f;
        h.cfg.init_std = 1.0f;
        rwd_head_init_weights(&h, &s, &rng);
        CHECK(rwd_rsf_head_scorer_init(&sc, &f, &h, 1, &s, 10.0, &e) == MOE_OK, "scorer: %s", e.msg);
        CHECK(rwd_rsf_head_score(out, "p", resp, len, 2, &sc, &e) == MOE_OK, "score: %s", e.msg);
        x = (float *)malloc(sizeof(float) * (size_t)hc.d_in);
        rwd_featurize(x, &f, "p", resp[1]);
        rwd_head_score(&h, &s, &ref, x, 1);
        CHECK(out[2] == ref && ref != 0.0, "head objective %g, direct %g", out[2], ref);
        CHECK(out[1] == 1.5 && out[3] == 0.4, "verbosity in code points / 10: %g %g", out[1], out[3]);
        rwd_rsf_head_scorer_free(&sc);
        CHECK(rwd_rsf_head_scorer_init(&sc, &f, &h, 0, &s, 0.0, &e) != MOE_OK && strstr(e.msg, "at least one objective"), "no objective must be refused: %s", e.msg);
        free(x);
        rwd_head_free(&h);
        moe_store_free(&s);
    }

    TEST_BEGIN("bad input: a status and a sentence");
    {
        rwd_rsf_config b = c;
        double loss;
        b.n_candidates = 0;
        CHECK(rwd_rsf_init(&r, &m, &b) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "n >= 1"), "n = 0: %s", r.err.msg);
        rwd_rsf_free(&r);
        b = c;
        b.max_new = 40;
        CHECK(rwd_rsf_init(&r, &m, &b) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "window"), "too long: %s", r.err.msg);
        rwd_rsf_free(&r);
        b = c;
        b.k = 3;
        b.prompt_kind = RWD_RSF_PROMPT_WEIGHTS;
        CHECK(rwd_rsf_init(&r, &m, &b) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "k must be 2"), "k = 3 encoded: %s", r.err.msg);
        rwd_rsf_free(&r);
        CHECK(rwd_rsf_init(&r, &m, &c) == MOE_OK, "init: %s", r.err.msg);
        v[0] = 1.0; v[1] = 0.5;
        CHECK(rwd_rsf_sample(&r, "the ", v, score_a, NULL) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "unit circle"), "off the circle: %s", r.err.msg);
        v[0] = NAN; v[1] = 0.0;
        CHECK(rwd_rsf_sample(&r, "the ", v, score_a, NULL) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "not finite"), "NaN: %s", r.err.msg);
        v[0] = 1.0; v[1] = 0.0;
        CHECK(rwd_rsf_sample(&r, "", v, score_a, NULL) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "empty prompt"), "empty prompt: %s", r.err.msg);
        CHECK(rwd_rsf_sample(&r, "this prompt is far too long", v, score_a, NULL) == MOE_ERR_INVALID_ARG, "long prompt: %s", r.err.msg);
        CHECK(rwd_rsf_keep(&r, 0) == MOE_ERR_STATE, "keep before a sample: %s", r.err.msg);
        CHECK(rwd_rsf_finetune(&r, 1) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "empty"), "empty kept set: %s", r.err.msg);
        CHECK(rwd_rsf_kept_loss(&r, &loss) == MOE_ERR_INVALID_ARG, "empty kept set loss: %s", r.err.msg);
        CHECK(rwd_rsf_sample(&r, "the ", v, score_fail, NULL) == MOE_ERR_INVALID_ARG && strstr(r.err.msg, "refuses"), "scorer failing: %s", r.err.msg);
        CHECK(rwd_rsf_round(&r, prompts, v, 0, score_a, NULL, NULL) == MOE_ERR_INVALID_ARG, "no prompts: %s", r.err.msg);
        CHECK(rwd_rsf_round(&r, prompts, v, 17, score_a, NULL, NULL) == MOE_ERR_INVALID_ARG, "too many prompts: %s", r.err.msg);
        rwd_rsf_free(&r);
    }
    moe_model_free(&m);
    return test_summary();
}
