/* test_closer_look.c - moe.h >>moe:closer_look (arXiv 2406.18219's diagnostics, the RMoE
   routing statistics, CQIL's layer input similarity): hand-computable cases, Kendall tau-b and
   Pearson R against scipy (tests/ref/closer_look_ref.py), the two-pass expert outputs against
   the layer's own forward, similarities of experts set by hand, dense models refused. */
#include "moe.h"
#include "test.h"

/* a comma-separated list or a number after "key=" in tests/ref/closer_look_ref.txt */
static int ref_values(const char *key, double *v, int cap) {
    FILE *f = fopen("tests/ref/closer_look_ref.txt", "r");
    char line[8192];
    int n = 0;
    size_t kl = strlen(key);
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, kl) == 0 && line[kl] == '=') {
            char *p = line + kl + 1, *end;
            while (n < cap) {
                v[n] = strtod(p, &end);
                if (end == p) break;
                n++;
                p = *end == ',' ? end + 1 : end;
            }
            break;
        }
    fclose(f);
    return n;
}

static void test_scalars(void) {
    float a[2] = {1, 0}, b[2] = {1, 1}, z[2] = {0, 0};
    double x[4] = {1, 2, 3, 4}, y[4] = {1, 3, 2, 4}, r[4] = {4, 3, 2, 1}, k[4] = {5, 5, 5, 5};
    double rx[64], ry[64], rz[64], want;
    int n;
    TEST_BEGIN("closer look: cosine, angular similarity, Pearson, Kendall tau-b (by hand and against scipy)");
    CHECK(fabs(moe_cosine(a, b, 2) - sqrt(0.5)) < 1e-15, "cos((1,0),(1,1)) = 1/sqrt 2");
    CHECK(moe_cosine(a, z, 2) == 0.0, "cosine with a zero vector is 0");
    CHECK(moe_angular_similarity(1.0) == 1.0 && fabs(moe_angular_similarity(0.0) - 0.5) < 1e-15 && moe_angular_similarity(-1.0) == 0.0,
          "angular similarity 1, 0.5, 0 at cos 1, 0, -1");
    CHECK(moe_angular_similarity(1.0000001) == 1.0, "cos past 1 (rounding) is clamped");
    CHECK(fabs(moe_pearson(x, x, 4) - 1.0) < 1e-15 && fabs(moe_pearson(x, r, 4) + 1.0) < 1e-15, "Pearson +1, -1");
    CHECK(isnan(moe_pearson(x, k, 4)) && isnan(moe_pearson(x, y, 1)), "Pearson of a constant or of one pair is NaN");
    CHECK(moe_kendall_tau(x, x, 4) == 1.0 && moe_kendall_tau(x, r, 4) == -1.0, "tau +1, -1");
    CHECK(fabs(moe_kendall_tau(x, y, 4) - 4.0 / 6.0) < 1e-15, "one swapped pair of four: (5 - 1) / 6");
    CHECK(isnan(moe_kendall_tau(x, k, 4)), "tau of a constant is NaN");
    n = ref_values("x", rx, 64);
    CHECK(n == 40 && ref_values("y", ry, 64) == 40 && ref_values("z", rz, 64) == 40, "reference series read (%d)", n);
    if (n != 40) return;
    ref_values("kendall_xy", &want, 1);
    CHECK(fabs(moe_kendall_tau(rx, ry, n) - want) < 1e-12, "tau-b with ties in both = scipy's %.17g (got %.17g)", want, moe_kendall_tau(rx, ry, n));
    ref_values("kendall_xz", &want, 1);
    CHECK(fabs(moe_kendall_tau(rx, rz, n) - want) < 1e-12, "tau-b with ties in x = scipy's %.17g", want);
    ref_values("kendall_yz", &want, 1);
    CHECK(fabs(moe_kendall_tau(ry, rz, n) - want) < 1e-12, "tau-b with ties in y = scipy's %.17g", want);
    ref_values("pearson_xy", &want, 1);
    CHECK(fabs(moe_pearson(rx, ry, n) - want) < 1e-12, "Pearson = scipy's %.17g", want);
    ref_values("pearson_xz", &want, 1);
    CHECK(fabs(moe_pearson(rx, rz, n) - want) < 1e-12, "Pearson = scipy's %.17g", want);
}

static void test_routing_statistics(void) {
    float p[2 * 3] = {0.5f, 0.3f, 0.2f, 0.25f, 0.5f, 0.25f}, inner[2], outer[2];
    float q[4] = {0.05f, 0.3f, 0.55f, 0.95f}, same[4] = {0.1f, 0.1f, 0.1f, 0.1f};
    double mi[2];
    moe_err e;
    TEST_BEGIN("routing statistics: inner and outer balance, cross-layer MI (by hand)");
    memset(&e, 0, sizeof e);
    CHECK(moe_routing_balance(inner, outer, p, 2, 3, 2, &e) == MOE_OK, "balance");
    CHECK(inner[0] == 0.5f / 0.3f && outer[0] == 0.5f + 0.3f, "token 0: 0.5/0.3 and 0.5+0.3");
    CHECK(inner[1] == 2.0f && outer[1] == 0.75f, "token 1 (a tie for second): 2 and 0.75");
    moe_routing_balance(inner, outer, p, 2, 3, 3, &e);
    CHECK(outer[0] == (0.5f + 0.3f) + 0.2f, "k = E: the whole mass, summed in descending order");
    CHECK(moe_routing_balance(inner, outer, p, 2, 3, 4, &e) == MOE_ERR_INVALID_ARG && strstr(e.msg, "k <= E"), "k > E: %s", e.msg);
    CHECK(moe_routing_balance(inner, outer, p, 2, 1, 1, &e) == MOE_ERR_INVALID_ARG, "E = 1: %s", e.msg);
    /* four distinct bins on both sides: every label unique, MI = ln 4; one bin: MI = 0 */
    CHECK(moe_routing_mi(mi, q, q, 1, 4, 100, &e) == MOE_OK && fabs(mi[0] - log(4.0)) < 1e-12, "distinct labels: ln 4 (%.6f)", mi[0]);
    moe_routing_mi(mi, same, q, 1, 4, 100, &e);
    CHECK(fabs(mi[0]) < 1e-12, "a constant side carries no information (%.3g)", mi[0]);
    moe_routing_mi(mi, q, q, 1, 4, 2, &e); /* bins of 0.5: labels 0,0,1,1 on both: ln 2 */
    CHECK(fabs(mi[0] - log(2.0)) < 1e-12, "two bins: ln 2 (%.6f)", mi[0]);
    CHECK(moe_routing_mi(mi, q, q, 1, 4, 0, &e) == MOE_ERR_INVALID_ARG, "no bins: %s", e.msg);
}

static void test_rank_count(void) {
    /* 2 tokens, 3 experts, d = 2: token 0's norms order = its scores' order (diagonal);
       token 1's norms reverse its scores (anti-diagonal) */
    float out[2 * 3 * 2] = {3, 0, 0, 2, 1, 0, /* norms 3, 2, 1 */ 1, 0, 0, 2, 0, 3};
    float sc[2 * 3] = {0.6f, 0.3f, 0.1f, 0.6f, 0.3f, 0.1f};
    int64_t c[9];
    TEST_BEGIN("norm-vs-score rank counts (by hand)");
    memset(c, 0, sizeof c);
    moe_rank_count(c, out, sc, 1, 3, 2);
    CHECK(c[0] == 1 && c[4] == 1 && c[8] == 1 && c[1] + c[2] + c[3] + c[5] + c[6] + c[7] == 0, "diagonal");
    memset(c, 0, sizeof c);
    moe_rank_count(c, out + 6, sc + 3, 1, 3, 2);
    CHECK(c[2] == 1 && c[4] == 1 && c[6] == 1, "anti-diagonal");
    moe_rank_count(c, out, sc, 2, 3, 2); /* accumulates */
    CHECK(c[0] == 1 && c[2] == 2 && c[4] == 3 && c[6] == 2 && c[8] == 1, "counts accumulate over calls");
}

static moe_model_config tiny_moe(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 8;
    c.d = 8;
    c.n_layers = 3;
    c.n_heads = 2;
    c.d_ff = 12;
    c.dense_first = 1; /* layer 0 dense, 1 and 2 MoE */
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 6;
    return c;
}

static void test_model_diagnostics(void) {
    moe_model_config c = tiny_moe();
    moe_model m;
    moe_rng r;
    int x[16], t, e, j, l = 1, N = 16, E = 4, d = 8, D = 6, i;
    float *out, *sc, *v;
    double sim[16], depth[3], R, R2, worst = 0.0;
    const moe_layer *L;
    moe_expert_weights w;
    float *router;
    TEST_BEGIN("closer look on a model: two-pass outputs = the layer's forward, similarities of experts set by hand, R = 1");
    moe_rng_seed(&r, 3);
    for (t = 0; t < N; t++) x[t] = moe_rng_below(&r, 32);
    CHECK(moe_model_init(&m, &c, 2, 8) == MOE_OK, "init");
    moe_model_init_weights(&m, 7);
    out = (float *)malloc(sizeof(float) * N * E * d);
    sc = (float *)malloc(sizeof(float) * N * E);
    v = (float *)malloc(sizeof(float) * E * d);
    CHECK(moe_expert_outputs(out, sc, &m, l) == MOE_ERR_STATE && strstr(m.err.msg, "forward"), "before a forward: %s", m.err.msg);
    moe_model_forward(&m, x, NULL, 2, 8, NULL);
    L = &m.blocks[l].moe;
    CHECK(moe_expert_outputs(out, sc, &m, l) == MOE_OK, "expert outputs: %s", m.err.msg);
    /* the layer's output is the gate-weighted sum of the chosen experts' outputs */
    for (t = 0; t < N; t++)
        for (j = 0; j < d; j++) {
            double y = 0.0;
            for (e = 0; e < E; e++) y += (double)L->gates[t * E + e] * out[((size_t)t * E + e) * d + j];
            y = fabs(y - m.blocks[l].ffn[t * d + j]);
            worst = y > worst ? y : worst;
        }
    CHECK(worst < 1e-5, "sum_e gate * E_e(x) = the MoE layer's output (worst %.2g)", worst);
    CHECK(memcmp(sc, L->probs, sizeof(float) * N * E) == 0, "scores = the router's probabilities");
    CHECK(moe_expert_outputs(out, sc, &m, 0) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "dense"), "dense layer: %s", m.err.msg);
    /* expert 1 := expert 0: similarity 1 for every matrix, flattened or neuron-averaged */
    w = moe_layer_experts(L, &m.S, 0, 0);
    memcpy(w.gate + D * d, w.gate, sizeof(float) * D * d);
    memcpy(w.up + D * d, w.up, sizeof(float) * D * d);
    memcpy(w.down + d * D, w.down, sizeof(float) * d * D);
    CHECK(moe_expert_similarity(sim, &m, l, MOE_MATRIX_GATE, 0, 0) == MOE_OK && fabs(sim[1] - 1.0) < 1e-12 && fabs(sim[0] - 1.0) < 1e-12,
          "copied expert: cos 1 (gate, flattened)");
    CHECK(fabs(sim[2]) < 0.5, "random experts: |cos| small (%.3f)", sim[2]);
    moe_expert_similarity(sim, &m, l, MOE_MATRIX_DOWN, 1, 1);
    CHECK(fabs(sim[1] - 1.0) < 1e-6 && sim[4 * 1 + 0] == sim[1], "copied expert: angular 1 (down, neuron means), symmetric");
    /* neuron means by hand: gate of expert 2 with A[i][j] = i + j: mean row = j + (D-1)/2;
       down of expert 2 with O[j][i] = i * j: mean column = j (D-1)/2 */
    for (i = 0; i < D; i++)
        for (j = 0; j < d; j++) {
            w.gate[2 * D * d + i * d + j] = (float)(i + j);
            w.down[2 * d * D + j * D + i] = (float)(i * j);
        }
    moe_neuron_means(v, &m, l, MOE_MATRIX_GATE);
    CHECK(v[2 * d + 0] == 2.5f && v[2 * d + 7] == 9.5f, "gate neuron mean: row mean (%g, %g)", v[2 * d], v[2 * d + 7]);
    moe_neuron_means(v, &m, l, MOE_MATRIX_DOWN);
    CHECK(v[2 * d + 0] == 0.0f && v[2 * d + 3] == 7.5f, "down neuron mean: column mean (%g, %g)", v[2 * d], v[2 * d + 3]);
    /* every neuron of A_e = the gate embedding r_e: the neuron-averaged A is r_e, R = 1 */
    router = moe_store_param(&m.S, L->id_router_w);
    for (e = 0; e < E; e++)
        for (i = 0; i < D; i++) memcpy(w.gate + (size_t)e * D * d + i * d, router + e * d, sizeof(float) * d);
    CHECK(moe_gate_neuron_regression(&R, &R2, &m, l, MOE_MATRIX_GATE) == MOE_OK && fabs(R - 1.0) < 1e-9 && fabs(R2 - 1.0) < 1e-9,
          "A's neurons = the gate embedding: R = %.12f", R);
    CHECK(moe_gate_neuron_regression(&R, &R2, &m, l, MOE_MATRIX_UP) == MOE_OK && fabs(R) < 1.0 && fabs(R2 - R * R) < 1e-15,
          "the up matrix: R = %.3f, R^2 = R * R", R);
    CHECK(moe_similarity_by_depth(depth, &m, MOE_MATRIX_GATE, 1) == MOE_OK && isnan(depth[0]) && !isnan(depth[1]) && !isnan(depth[2]),
          "similarity by depth: NaN for the dense layer 0, values for 1 and 2");
    CHECK(moe_expert_similarity(sim, &m, 5, MOE_MATRIX_GATE, 0, 0) == MOE_ERR_INVALID_ARG, "layer 5 of 3: %s", m.err.msg);
    moe_model_free(&m);
    free(out);
    free(sc);
    free(v);
}

static void test_dense_and_inputs(void) {
    moe_model_config c = tiny_moe();
    moe_model m;
    int x[16], t, l, id;
    double cos[2], depth[3];
    moe_rng r;
    TEST_BEGIN("closer look: a dense model is a status; adjacent layers' inputs (1 when the blocks add nothing)");
    c.moe_every = 0;
    moe_rng_seed(&r, 4);
    for (t = 0; t < 16; t++) x[t] = moe_rng_below(&r, 32);
    moe_model_init(&m, &c, 2, 8);
    moe_model_init_weights(&m, 2);
    CHECK(moe_similarity_by_depth(depth, &m, MOE_MATRIX_GATE, 0) == MOE_ERR_UNSUPPORTED && strstr(m.err.msg, "dense"), "dense: %s", m.err.msg);
    CHECK(moe_layer_input_similarity(cos, &m) == MOE_ERR_STATE, "input similarity before a forward: %s", m.err.msg);
    moe_model_forward(&m, x, NULL, 2, 8, NULL);
    CHECK(moe_layer_input_similarity(cos, &m) == MOE_OK && cos[0] > 0.0 && cos[0] <= 1.0 + 1e-12 && cos[1] <= 1.0 + 1e-12,
          "cosines in (0, 1]: %.4f %.4f", cos[0], cos[1]);
    for (l = 0; l < 3; l++) { /* no residual updates: every layer's input is the embedding */
        id = m.blocks[l].id_wo;
        memset(moe_store_param(&m.S, id), 0, sizeof(float) * m.S.tensors[id].numel);
        id = m.blocks[l].id_down;
        memset(moe_store_param(&m.S, id), 0, sizeof(float) * m.S.tensors[id].numel);
    }
    moe_model_forward(&m, x, NULL, 2, 8, NULL);
    moe_layer_input_similarity(cos, &m);
    CHECK(fabs(cos[0] - 1.0) < 1e-12 && fabs(cos[1] - 1.0) < 1e-12, "identical inputs: cos 1 (%.15f)", cos[0]);
    moe_model_free(&m);
}

int main(void) {
    test_scalars();
    test_routing_statistics();
    test_rank_count();
    test_model_diagnostics();
    test_dense_and_inputs();
    return test_summary();
}
