/* test_layer.c - the MoE layer (moe.h sections 7-10): dispatch, routers, gradients of every
   router variant, capacity drops, determinism across thread counts, bad input. */
#include "moe.h" /* defines: moe_layer_*, moe_dispatch, moe_store_*, moe_rng_* */
#include "test.h" /* defines: CHECK, check_close, check_grad, test_summary */
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct fixture {
    moe_store S;
    moe_layer L;
    moe_layer_args args; /* the per-call inputs: GW-MoE's flag and sequence length, the noise */
    int T;
    float *x, *y, *dy, *dx, *noise;
} fixture;

static void fill_normal(float *p, size_t n, float scale, moe_rng *r) {
    size_t i;
    for (i = 0; i < n; i++) p[i] = scale * moe_rng_normal(r);
}

static int fixture_gw_active = 0; /* GW-MoE broadcast for the next fixtures */

static int fixture_init(fixture *f, const moe_layer_config *c, int T, uint64_t seed) {
    moe_rng r;
    size_t TE = (size_t)T * c->n_experts, Td = (size_t)T * c->d;
    memset(f, 0, sizeof *f);
    moe_store_init(&f->S);
    if (moe_layer_init(&f->L, c, &f->S, "moe.", T) != MOE_OK) {
        printf("layer init failed: %s\n", f->L.err.msg);
        return 0;
    }
    if (moe_store_alloc(&f->S, 1) != MOE_OK) return 0;
    f->args = moe_layer_args_default();
    f->args.gw_active = fixture_gw_active;
    f->args.seq_len = T / 2;
    moe_rng_seed(&r, seed);
    moe_layer_init_weights(&f->L, &f->S, &r);
    /* noise projection and biases start at zero; give them values so their gradients matter */
    {
        int id;
        for (id = 0; id < f->S.count; id++)
            if (f->S.tensors[id].ndim < 3 && strstr(f->S.tensors[id].name, "router.w") == NULL)
                fill_normal(moe_store_param(&f->S, id), f->S.tensors[id].numel, 0.3f, &r);
    }
    f->T = T;
    f->x = (float *)calloc(Td, sizeof(float));
    f->y = (float *)calloc(Td, sizeof(float));
    f->dy = (float *)calloc(Td, sizeof(float));
    f->dx = (float *)calloc(Td, sizeof(float));
    f->noise = (float *)calloc(TE, sizeof(float));
    fill_normal(f->x, Td, 1.0f, &r);
    fill_normal(f->dy, Td, 1.0f, &r);
    fill_normal(f->noise, TE, 1.0f, &r);
    return 1;
}

static void fixture_free(fixture *f) {
    moe_layer_free(&f->L);
    moe_store_free(&f->S);
    free(f->x); free(f->y); free(f->dy); free(f->dx); free(f->noise);
}

/* J = sum(y * dy) + aux_total, in double */
static double objective(fixture *f, const float *noise) {
    double J = 0.0;
    size_t i, n = (size_t)f->T * f->L.cfg.d;
    f->args.noise = noise;
    if (moe_layer_forward(&f->L, &f->S, f->y, f->x, f->T, &f->args) != MOE_OK) return NAN;
    for (i = 0; i < n; i++) J += (double)f->y[i] * f->dy[i];
    return J + f->L.stats.aux_total;
}

/* routing decisions of the last forward, to detect a perturbation that flips a choice */
static void routing_snapshot(const fixture *f, int *ids) {
    const moe_layer *L = &f->L;
    int i, E = L->cfg.n_experts;
    for (i = 0; i < L->routed.n; i++) ids[i] = L->routed.token[i] * E + L->routed.expert[i];
    ids[L->cap] = L->routed.n;
    if (L->cfg.router == MOE_ROUTER_NOISY_TOPK)
        for (i = 0; i < f->T * E; i++) ids[L->cap + 1 + i] = L->noisy.threshold[i];
}

/* Directional finite differences over all parameters and the input at once. */
static void gradcheck_layer_mode(const char *name, const moe_layer_config *c, int T, int with_noise, int aux_only) {
    fixture f;
    moe_rng r;
    const float *noise;
    size_t np, nx, i;
    float *v, *vx, *p0, *x0;
    int *ids0, *ids1, trial, checked = 0;
    if (!fixture_init(&f, c, T, 1234)) {
        CHECK(0, "%s: fixture", name);
        return;
    }
    noise = with_noise ? f.noise : NULL;
    if (aux_only) memset(f.dy, 0, sizeof(float) * (size_t)T * c->d); /* J = aux_total alone */
    np = f.S.numel;
    nx = (size_t)T * c->d;
    v = (float *)calloc(np, sizeof(float));
    vx = (float *)calloc(nx, sizeof(float));
    p0 = (float *)malloc(np * sizeof(float));
    x0 = (float *)malloc(nx * sizeof(float));
    ids0 = (int *)calloc((size_t)f.L.cap + 1 + (size_t)T * c->n_experts, sizeof(int));
    ids1 = (int *)calloc((size_t)f.L.cap + 1 + (size_t)T * c->n_experts, sizeof(int));
    memcpy(p0, f.S.params, np * sizeof(float));
    memcpy(x0, f.x, nx * sizeof(float));
    /* analytic gradient */
    objective(&f, noise);
    routing_snapshot(&f, ids0);
    if (fixture_gw_active) CHECK(f.L.stats.broadcast > 0, "%s: some tokens are broadcast (%d)", name, f.L.stats.broadcast);
    moe_store_zero_grad(&f.S);
    memset(f.dx, 0, nx * sizeof(float));
    CHECK(moe_layer_backward(&f.L, &f.S, f.dx, f.dy, f.x, &f.args) == MOE_OK, "%s: backward: %s", name, f.L.err.msg);
    moe_rng_seed(&r, 99);
    for (trial = 0; trial < 6 && checked < 3; trial++) {
        const double eps = 5e-4; // small: the central difference error is O(eps^2)
        double analytic = 0.0, jp, jm;
        int same = 1;
        fill_normal(v, np, 1.0f, &r);
        fill_normal(vx, nx, 1.0f, &r);
        for (i = 0; i < np; i++) analytic += (double)f.S.grads[i] * v[i];
        for (i = 0; i < nx; i++) analytic += (double)f.dx[i] * vx[i];
        for (i = 0; i < np; i++) f.S.params[i] = p0[i] + (float)eps * v[i];
        for (i = 0; i < nx; i++) f.x[i] = x0[i] + (float)eps * vx[i];
        jp = objective(&f, noise);
        routing_snapshot(&f, ids1);
        same &= memcmp(ids0, ids1, ((size_t)f.L.cap + 1 + (size_t)T * c->n_experts) * sizeof(int)) == 0;
        for (i = 0; i < np; i++) f.S.params[i] = p0[i] - (float)eps * v[i];
        for (i = 0; i < nx; i++) f.x[i] = x0[i] - (float)eps * vx[i];
        jm = objective(&f, noise);
        routing_snapshot(&f, ids1);
        same &= memcmp(ids0, ids1, ((size_t)f.L.cap + 1 + (size_t)T * c->n_experts) * sizeof(int)) == 0;
        memcpy(f.S.params, p0, np * sizeof(float));
        memcpy(f.x, x0, nx * sizeof(float));
        if (!same) continue; /* the nudge changed a routing decision: not differentiable there */
        /* J ~ 10 in float: ~1e-6 of rounding, ~1e-3 after / 2eps, hence the absolute floor */
        check_grad_tol(name, analytic, (jp - jm) / (2 * eps), 3e-3, 1e-3);
        checked++;
    }
    CHECK(checked >= 2, "%s: only %d of 6 directions kept the routing fixed", name, checked);
    free(v); free(vx); free(p0); free(x0); free(ids0); free(ids1);
    fixture_free(&f);
}

static void gradcheck_layer(const char *name, const moe_layer_config *c, int T, int with_noise) {
    gradcheck_layer_mode(name, c, T, with_noise, 0);
}

static moe_layer_config small_config(void) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 12;
    c.d_ff = 16;
    c.n_experts = 6;
    c.top_k = 2;
    c.router_init_std = 1.0f; /* large logits: clear margins at the top-k boundary */
    c.z_coef = 1e-2f;
    return c;
}

static void test_gradients(void) {
    moe_layer_config c;
    TEST_BEGIN("gradients of every router variant (directional finite differences)");
    c = small_config();
    c.renormalize = 0;
    c.balance = MOE_BALANCE_SWITCH;
    gradcheck_layer("topk softmax (Switch/DeepSeek), switch loss", &c, 20, 0);
    c = small_config();
    gradcheck_layer("topk renormalised (Mixtral), mixtral loss", &c, 20, 0);
    c = small_config();
    c.balance = MOE_BALANCE_DEEPSEEK;
    c.n_shared = 2;
    c.d_ff_shared = 8;
    c.router_bias = 1;
    gradcheck_layer("topk + shared experts, deepseek loss, router bias", &c, 20, 0);
    c.top_k = 1;
    c.n_shared = 3; /* more shared assignments (S T) than routed ones (k T + E) */
    gradcheck_layer("top-1 + 3 shared experts", &c, 20, 0);
    c = small_config();
    c.router = MOE_ROUTER_SIGMOID;
    c.renormalize = 0;
    gradcheck_layer("sigmoid top-k", &c, 20, 0);
    c.renormalize = 1;
    gradcheck_layer("sigmoid top-k renormalised", &c, 20, 0);
    c = small_config();
    c.router = MOE_ROUTER_NOISY_TOPK;
    c.balance = MOE_BALANCE_NONE;
    c.importance_coef = 0.5f;
    c.load_coef = 0.5f;
    gradcheck_layer("noisy top-k with CV^2 losses", &c, 20, 1);
    gradcheck_layer("noisy top-k at evaluation (no noise)", &c, 20, 0);
    c = small_config();
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.balance = MOE_BALANCE_NONE;
    gradcheck_layer("expert choice", &c, 20, 0);
    c = small_config();
    c.capacity_factor = 0.6f;
    gradcheck_layer("capacity factor 0.6 (drops)", &c, 20, 0);
    c = small_config();
    c.expert = MOE_EXPERT_FFN;
    c.activation = MOE_ACT_GELU;
    c.expert_bias = 1;
    gradcheck_layer("FFN experts (GELU, biases)", &c, 20, 0);
    c.activation = MOE_ACT_GELU_TANH; /* (ReLU's kink defeats finite differences) */
    c.top_k = 1;
    c.balance = MOE_BALANCE_SWITCH;
    gradcheck_layer("FFN experts (GELU tanh), top-1", &c, 20, 0);
}

static void test_aoe(void) {
    moe_layer_config c = small_config();
    fixture f;
    int t, e, ok = 1;
    TEST_BEGIN("AoE: router-free, logits = norms of each expert's low-rank cache");
    CHECK(moe_aoe_matched_width(768, 3072, 256) == 3840 && moe_aoe_matched_width(1280, 5120, 400) == 6470,
          "parameter matching (paper Eq. 5): 3840 and 6470");
    c.router = MOE_ROUTER_AOE;
    c.aoe_rank = 4;
    c.renormalize = 1;
    if (!fixture_init(&f, &c, 16, 31)) { CHECK(0, "fixture: %s", f.L.err.msg); return; }
    CHECK(moe_store_find(&f.S, "moe.router.w") < 0 && moe_store_find(&f.S, "moe.experts.w_gate") < 0 &&
          moe_store_find(&f.S, "moe.experts.w_gate_in") >= 0, "no router, no full gate matrix, the two gate factors");
    objective(&f, NULL);
    for (t = 0; t < 16; t++)
        for (e = 0; e < c.n_experts; e++) {
            const float *w = moe_store_param(&f.S, f.L.aoe.id_w_in) + (size_t)e * 4 * c.d, *x = f.x + (size_t)t * c.d;
            double ss = 0.0;
            int j, k;
            for (j = 0; j < 4; j++) {
                double cj = 0.0;
                for (k = 0; k < c.d; k++) cj += (double)w[j * c.d + k] * x[k];
                ss += cj * cj;
            }
            if (fabs(sqrt(ss) - f.L.logits[(size_t)t * c.n_experts + e]) > 1e-5 * (1.0 + sqrt(ss))) ok = 0;
        }
    CHECK(ok, "logit of expert e = ||x . W_in_e^T||");
    fixture_free(&f);
    gradcheck_layer("AoE, paper weights (softmax over the chosen norms)", &c, 20, 0);
    c.renormalize = 0;
    gradcheck_layer("AoE, official-code weights (softmax over all norms)", &c, 20, 0);
    c.balance_coef = 1.0f;
    gradcheck_layer_mode("aux only: AoE norm-based balance loss + z-loss", &c, 20, 0, 1);
    c.expert = MOE_EXPERT_FFN;
    {
        moe_err err;
        CHECK(moe_layer_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "AoE"), "AoE needs SwiGLU experts: %s", err.msg);
    }
}

static moe_layer_config hyper_config(void) {
    moe_layer_config c = small_config();
    c.hyper = 1;
    c.hyper_embed = 6; c.hyper_hidden = 5; c.hyper_cond = 4; c.hyper_layer_dim = 3;
    c.hyper_width = 5; c.hyper_adapter = 4;
    c.hyper_layers = 2; c.hyper_layer = 1;
    return c;
}

static void test_hyper(void) {
    moe_layer_config c = hyper_config();
    fixture f;
    float *y0;
    size_t i, n;
    int id;
    TEST_BEGIN("HyperMoE: hyper-expert generated from the unselected experts");
    c.top_k = 1;
    c.renormalize = 0;
    gradcheck_layer("HyperMoE top-1 (Switch weights)", &c, 20, 0);
    c.top_k = 2;
    c.renormalize = 1;
    gradcheck_layer("HyperMoE top-2 (renormalised)", &c, 20, 0);
    c.router = MOE_ROUTER_NOISY_TOPK; /* the code's gating */
    c.balance = MOE_BALANCE_NONE;
    gradcheck_layer("HyperMoE with noisy top-k", &c, 20, 1);
    c = hyper_config();
    c.hyper_head_bias = 1;
    gradcheck_layer("HyperMoE with head biases (the official code's)", &c, 20, 0);
    {   /* zero head biases: exactly the output without them */
        fixture a, b0;
        moe_layer_config c0 = hyper_config();
        if (fixture_init(&a, &c, 12, 43) && fixture_init(&b0, &c0, 12, 43)) {
            int k;
            const char *bias[3] = {"hyper.head_down.bias", "hyper.head_down_b.bias", "hyper.head_up.bias"};
            for (k = 0; k < b0.S.count; k++) {
                int j = moe_store_find(&a.S, b0.S.tensors[k].name);
                memcpy(moe_store_param(&a.S, j), moe_store_param(&b0.S, k), b0.S.tensors[k].numel * sizeof(float));
            }
            for (k = 0; k < 3; k++) {
                int j = moe_store_find(&a.S, bias[k]);
                CHECK(j >= 0 && a.S.tensors[j].flags == 0, "%s declared, without weight decay", bias[k]);
                if (j >= 0) memset(moe_store_param(&a.S, j), 0, a.S.tensors[j].numel * sizeof(float));
            }
            memcpy(a.x, b0.x, sizeof(float) * 12 * (size_t)c.d);
            objective(&a, NULL);
            objective(&b0, NULL);
            CHECK(memcmp(a.y, b0.y, sizeof(float) * 12 * (size_t)c.d) == 0, "zero head biases: the output without them, bit for bit");
            fixture_free(&a);
            fixture_free(&b0);
        }
    }
    /* with a zero up head the hyper-expert adds nothing */
    c = hyper_config();
    if (!fixture_init(&f, &c, 12, 41)) { CHECK(0, "fixture: %s", f.L.err.msg); return; }
    n = (size_t)12 * c.d;
    y0 = (float *)malloc(n * sizeof(float));
    objective(&f, NULL);
    memcpy(y0, f.y, n * sizeof(float));
    id = moe_store_find(&f.S, "hyper.head_up");
    CHECK(id >= 0 && moe_store_find(&f.S, "moe.hyper.expert_emb") >= 0, "shared head, per-layer embeddings");
    memset(moe_store_param(&f.S, id), 0, f.S.tensors[id].numel * sizeof(float));
    objective(&f, NULL);
    {
        double diff = 0.0;
        for (i = 0; i < n; i++) diff += fabs(y0[i] - f.y[i]);
        CHECK(diff > 1e-3, "the hyper-expert changes the output (|diff| %.3g)", diff);
    }
    /* the same layer without hyper = the output with a zero head */
    {
        fixture g;
        moe_layer_config c2 = c;
        c2.hyper = 0;
        if (fixture_init(&g, &c2, 12, 41)) {
            int k;
            for (k = 0; k < g.S.count; k++) { /* copy the common tensors by name */
                int j = moe_store_find(&f.S, g.S.tensors[k].name);
                if (j >= 0) memcpy(moe_store_param(&g.S, k), moe_store_param(&f.S, j), g.S.tensors[k].numel * sizeof(float));
            }
            memcpy(g.x, f.x, n * sizeof(float));
            objective(&g, NULL);
            CHECK(memcmp(g.y, f.y, n * sizeof(float)) == 0, "zero up head: exactly the plain MoE output");
            fixture_free(&g);
        }
    }
    free(y0);
    fixture_free(&f);
    c = hyper_config();
    c.hyper_layer = 2;
    {
        moe_err err;
        CHECK(moe_layer_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "hyper_layer"), "layer row out of range: %s", err.msg);
    }
}

static void test_gw(void) {
    moe_layer_config c = small_config();
    fixture f;
    int t, sparse_ok = 1, e;
    TEST_BEGIN("GW-MoE: uncertain tokens broadcast while fine-tuning, sparse otherwise");
    c.router_init_std = 0.15f; /* flat-ish routing: some tokens have high entropy */
    c.gw_threshold = 0.9f;
    c.gw_normalized = 1;
    fixture_gw_active = 1;
    if (!fixture_init(&f, &c, 20, 21)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    CHECK(f.L.stats.broadcast > 0 && f.L.stats.broadcast < 20, "some but not all tokens are uncertain (%d of 20)", f.L.stats.broadcast);
    for (t = 0; t < 20; t++) {
        const float *p = f.L.probs + (size_t)t * c.n_experts;
        double u = 0.0;
        int n = f.L.routed.tok_offset[t + 1] - f.L.routed.tok_offset[t];
        for (e = 0; e < c.n_experts; e++) u -= p[e] * log(p[e] + 1e-5);
        if ((u / log((double)c.n_experts) >= 0.9) != f.L.gw.uncertain[t]) sparse_ok = 0;
        if (n != (f.L.gw.uncertain[t] ? c.n_experts : c.top_k)) sparse_ok = 0;
    }
    CHECK(sparse_ok, "uncertain = normalised entropy >= threshold; they reach all experts, others top-k");
    CHECK(f.L.stats.dropped == 0 && f.L.stats.requested == (20 - f.L.stats.broadcast) * 2, "broadcast tokens are outside the drop accounting");
    f.args.gw_active = 0;
    objective(&f, NULL);
    CHECK(f.L.stats.broadcast == 0 && f.L.routed.n == 40, "inference: sparse top-k only");
    fixture_free(&f);
    c.gw_slots = 1; /* one uncertain token per sequence of 10 */
    if (!fixture_init(&f, &c, 20, 21)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    {
        int a = 0, b = 0;
        for (t = 0; t < 10; t++) a += f.L.gw.uncertain[t];
        for (t = 10; t < 20; t++) b += f.L.gw.uncertain[t];
        CHECK(a <= 1 && b <= 1 && a + b == f.L.stats.broadcast && a + b > 0, "slot cap: at most one per sequence (%d, %d)", a, b);
    }
    fixture_free(&f);
    c.gw_slots = 0;
    gradcheck_layer("GW-MoE broadcast (paper)", &c, 20, 0);
    c.gw_released = 1;
    gradcheck_layer("GW-MoE released-code emulation (p_last * x)", &c, 20, 0);
    c.gw_released = 0;
    c.renormalize = 0;
    c.capacity_factor = 0.8f;
    gradcheck_layer("GW-MoE with softmax top-k and capacity", &c, 20, 0);
    fixture_gw_active = 0;
    c = small_config();
    c.router = MOE_ROUTER_SIGMOID;
    c.gw_threshold = 0.5f;
    {
        moe_err err;
        CHECK(moe_layer_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "GW-MoE"), "GW needs the softmax router: %s", err.msg);
    }
}

/* J = aux_total alone: the auxiliary losses' gradients are not hidden under the main term */
static void test_aux_gradients(void) {
    moe_layer_config c;
    int b;
    const char *names[] = {"aux only: switch balance + z-loss", "aux only: mixtral balance + z-loss",
                           "aux only: deepseek balance + z-loss"};
    TEST_BEGIN("gradients of the auxiliary losses alone");
    for (b = 0; b < 3; b++) {
        c = small_config();
        c.balance = (moe_balance_loss)(MOE_BALANCE_SWITCH + b);
        c.balance_coef = 1.0f;
        c.z_coef = 0.1f;
        gradcheck_layer_mode(names[b], &c, 20, 0, 1);
    }
    c = small_config();
    c.router = MOE_ROUTER_SIGMOID;
    c.balance_coef = 1.0f;
    gradcheck_layer_mode("aux only: sigmoid router, balance on normalised scores", &c, 20, 0, 1);
    c = small_config();
    c.router = MOE_ROUTER_NOISY_TOPK;
    c.balance = MOE_BALANCE_NONE;
    c.z_coef = 0.0f;
    c.importance_coef = 1.0f;
    c.load_coef = 0.0f;
    gradcheck_layer_mode("aux only: noisy top-k importance CV^2", &c, 20, 1, 1);
    c.importance_coef = 0.0f;
    c.load_coef = 1.0f;
    gradcheck_layer_mode("aux only: noisy top-k smooth-load CV^2", &c, 20, 1, 1);
    c.importance_coef = 1.0f;
    c.cv_unbiased = 1;
    gradcheck_layer_mode("aux only: noisy top-k CV^2 with the unbiased variance", &c, 20, 1, 1);
    {   /* the unbiased CV^2 is the population one times E / (E - 1), nothing else changes */
        fixture f1, f2;
        c.cv_unbiased = 0;
        if (fixture_init(&f1, &c, 20, 9)) {
            c.cv_unbiased = 1;
            if (fixture_init(&f2, &c, 20, 9)) {
                double r = (double)c.n_experts / (c.n_experts - 1);
                objective(&f1, f1.noise);
                objective(&f2, f2.noise);
                CHECK(fabs(f2.L.stats.raw_importance - r * f1.L.stats.raw_importance) <= 1e-6 * r * f1.L.stats.raw_importance &&
                      fabs(f2.L.stats.raw_load - r * f1.L.stats.raw_load) <= 1e-6 * r * f1.L.stats.raw_load &&
                      memcmp(f1.y, f2.y, sizeof(float) * 20 * (size_t)c.d) == 0,
                      "cv_unbiased: CV^2 times E/(E-1) (%g vs %g), the same output", (double)f2.L.stats.raw_importance,
                      (double)f1.L.stats.raw_importance);
                fixture_free(&f2);
            }
            fixture_free(&f1);
        }
    }
    c = small_config();
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.balance = MOE_BALANCE_NONE;
    c.z_coef = 0.5f;
    gradcheck_layer_mode("aux only: expert choice z-loss", &c, 20, 0, 1);
}

/* issue: NaN router parameters (a diverged run, a CRC-valid checkpoint of NaNs) made top-k
   return expert -1 and write before its arrays. Every family refuses a non-finite logit with
   MOE_ERR_NUMERIC and a sentence naming the token and the expert, before any selection; huge
   but finite scores route normally. Under ASan (make test-asan) any stray index shows. */
static void test_non_finite(void) {
    const char *names[8] = {"softmax top-k", "softmax top-k (Switch weights) + capacity", "sigmoid top-k", "noisy top-k",
                            "expert choice", "AoE", "GW-MoE", "HyperMoE"};
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    int which;
    TEST_BEGIN("non-finite router logits: MOE_ERR_NUMERIC with a sentence, never an index out of range (every family)");
    for (which = 0; which < 8; which++) {
        moe_layer_config c = small_config();
        fixture f;
        int id, b, t, ok_idx = 1;
        float *w, keep;
        size_t i, n;
        if (which == 1) { c.renormalize = 0; c.capacity_factor = 1.0f; }
        if (which == 2) c.router = MOE_ROUTER_SIGMOID;
        if (which == 3) { c.router = MOE_ROUTER_NOISY_TOPK; c.balance = MOE_BALANCE_NONE; }
        if (which == 4) c.router = MOE_ROUTER_EXPERT_CHOICE;
        if (which == 5) { c.router = MOE_ROUTER_AOE; c.aoe_rank = 3; }
        if (which == 6) { c.gw_threshold = 0.5f; c.gw_normalized = 1; fixture_gw_active = 1; }
        if (which == 7) { c.hyper = 1; c.hyper_embed = c.hyper_hidden = c.hyper_cond = c.hyper_width = 4; c.hyper_adapter = 3; }
        if (!fixture_init(&f, &c, 12, 77)) { CHECK(0, "%s: fixture", names[which]); fixture_gw_active = 0; continue; }
        fixture_gw_active = 0;
        id = moe_store_find(&f.S, which == 5 ? "moe.experts.w_gate_in" : "moe.router.w");
        w = moe_store_param(&f.S, id);
        n = f.S.tensors[id].numel;
        for (b = 0; b < 3; b++) { /* one router parameter NaN, +inf, -inf */
            keep = w[5];
            w[5] = bad[b];
            CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 12, &f.args) == MOE_ERR_NUMERIC && strstr(f.L.err.msg, "token") &&
                  strstr(f.L.err.msg, "expert"), "%s, router parameter %g: MOE_ERR_NUMERIC naming token and expert: %s",
                  names[which], (double)bad[b], f.L.err.msg);
            CHECK(moe_layer_backward(&f.L, &f.S, f.dx, f.dy, f.x, &f.args) == MOE_ERR_STATE,
                  "%s: no backward after a refused forward: %s", names[which], f.L.err.msg);
            w[5] = keep;
        }
        f.x[3 * c.d + 1] = NAN; /* a NaN input of token 3 */
        CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 12, &f.args) == MOE_ERR_NUMERIC && strstr(f.L.err.msg, "token 3 "),
              "%s, NaN input: the sentence names token 3: %s", names[which], f.L.err.msg);
        f.x[3 * c.d + 1] = 0.5f;
        if (which == 3) { /* finite logits, non-finite H: the noise projection */
            float *wn = moe_store_param(&f.S, f.L.noisy.id_w_noise);
            wn[2] = NAN;
            f.args.noise = f.noise;
            CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 12, &f.args) == MOE_ERR_NUMERIC && strstr(f.L.err.msg, "H of token"),
                  "noisy top-k, NaN noise projection: refused: %s", f.L.err.msg);
            wn[2] = 0.0f;
            f.args.noise = NULL;
        }
        for (i = 0; i < n; i++) w[i] *= 1e17f; /* huge but finite: routes, indices in range */
        CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 12, &f.args) == MOE_OK, "%s, huge finite router: %s", names[which], f.L.err.msg);
        for (t = 0; t < 12 * c.top_k; t++)
            if (c.router != MOE_ROUTER_EXPERT_CHOICE && (f.L.topk[t] < 0 || f.L.topk[t] >= c.n_experts)) ok_idx = 0;
        for (i = 0; i < (size_t)f.L.routed.n; i++)
            if (f.L.routed.expert[i] < 0 || f.L.routed.expert[i] >= c.n_experts || f.L.routed.token[i] < 0 || f.L.routed.token[i] >= 12) ok_idx = 0;
        CHECK(ok_idx, "%s, huge finite router: every chosen expert and token in range", names[which]);
        for (i = 0; i < n; i++) w[i] /= 1e17f;
        CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 12, &f.args) == MOE_OK &&
              moe_layer_backward(&f.L, &f.S, f.dx, f.dy, f.x, &f.args) == MOE_OK, "%s: works again once the parameters are finite: %s",
              names[which], f.L.err.msg);
        fixture_free(&f);
    }
}

/* every auxiliary term is readable before its coefficient, also when the coefficient is 0 */
static void test_raw_aux_terms(void) {
    int which;
    TEST_BEGIN("raw aux terms: balance, z-loss and the CV^2 losses before their coefficients");
    for (which = 0; which < 4; which++) {
        moe_layer_config c = small_config();
        fixture f;
        int pass, t, e;
        if (which == 1) { c.router = MOE_ROUTER_SIGMOID; c.balance = MOE_BALANCE_DEEPSEEK; }
        if (which == 2) { c.router = MOE_ROUTER_NOISY_TOPK; c.importance_coef = 0.3f; c.load_coef = 0.2f; }
        if (which == 3) { c.router = MOE_ROUTER_EXPERT_CHOICE; c.balance = MOE_BALANCE_SWITCH; }
        c.balance_coef = 0.05f;
        for (pass = 0; pass < 2; pass++) {
            double z2 = 0.0;
            moe_routing_stats st;
            if (pass == 1) c.balance_coef = c.z_coef = c.importance_coef = c.load_coef = 0.0f; /* watched, not trained */
            if (!fixture_init(&f, &c, 20, 13)) { CHECK(0, "fixture"); return; }
            objective(&f, which == 2 ? f.noise : NULL);
            st = f.L.stats;
            for (t = 0; t < 20; t++) {
                const float *z = f.L.logits + (size_t)t * c.n_experts;
                double mx = z[0], sum = 0.0;
                for (e = 1; e < c.n_experts; e++) mx = z[e] > mx ? z[e] : mx;
                for (e = 0; e < c.n_experts; e++) sum += exp(z[e] - mx);
                z2 += (log(sum) + mx) * (log(sum) + mx);
            }
            CHECK(st.raw_balance > 0.0f && st.raw_z > 0.0f, "router %d pass %d: raw balance %g, raw z %g", which, pass, (double)st.raw_balance, (double)st.raw_z);
            CHECK(fabs(st.raw_z - z2 / 20) <= 1e-5 * z2 / 20, "router %d: raw z = mean lse^2 (%g vs %g)", which, (double)st.raw_z, z2 / 20);
            CHECK(fabsf(st.aux_balance - c.balance_coef * st.raw_balance) <= 1e-6f * st.raw_balance &&
                  fabsf(st.aux_z - c.z_coef * st.raw_z) <= 1e-6f * st.raw_z, "router %d pass %d: aux = coef * raw", which, pass);
            if (which == 2) {
                CHECK(st.raw_importance > 0.0f && st.raw_load > 0.0f &&
                      fabsf(st.aux_cv - (c.importance_coef * st.raw_importance + c.load_coef * st.raw_load)) <= 1e-6f * (st.raw_importance + st.raw_load),
                      "noisy pass %d: aux_cv = coefs * raw CV^2 (%g, %g)", pass, (double)st.raw_importance, (double)st.raw_load);
            } else {
                CHECK(st.raw_importance == 0.0f && st.raw_load == 0.0f, "router %d: no CV^2 terms", which);
            }
            if (pass == 1) CHECK(st.aux_total == 0.0f, "router %d: zero coefficients, zero aux_total (%g)", which, (double)st.aux_total);
            fixture_free(&f);
        }
    }
}

/* routed_scale multiplies every routed weight, shared_scale the shared experts' output */
static void test_output_scales(void) {
    moe_layer_config c = small_config();
    fixture f1, f2;
    size_t i, n;
    int exact = 1;
    TEST_BEGIN("routed and shared output scales (DeepSeek-V3's routed_scaling_factor)");
    c.n_shared = 2;
    c.d_ff_shared = 8;
    if (!fixture_init(&f1, &c, 16, 23)) { CHECK(0, "fixture"); return; }
    c.routed_scale = c.shared_scale = 2.0f;
    if (!fixture_init(&f2, &c, 16, 23)) { CHECK(0, "fixture"); fixture_free(&f1); return; }
    objective(&f1, NULL);
    objective(&f2, NULL);
    n = (size_t)16 * c.d;
    for (i = 0; i < n; i++) exact &= f2.y[i] == 2.0f * f1.y[i];
    CHECK(exact, "both scales 2: y doubles exactly");
    CHECK(memcmp(f1.L.gates, f2.L.gates, sizeof(float) * 16 * (size_t)c.n_experts) == 0 && f1.L.stats.aux_total == f2.L.stats.aux_total,
          "the gates and the aux losses are the router's, before the scale");
    fixture_free(&f1);
    fixture_free(&f2);
    c.routed_scale = 1.7f;
    c.shared_scale = 0.6f;
    gradcheck_layer("routed_scale 1.7, shared_scale 0.6", &c, 20, 0);
    c.n_shared = 0;
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    gradcheck_layer("expert choice, routed_scale 1.7", &c, 20, 0);
}

/* DeepSeek-V3: the selection bias moves the choice, not the weights, gets no gradient, and
   the balancing rule moves it against the load */
static void test_selection_bias(void) {
    int which;
    TEST_BEGIN("selection-only bias (DeepSeek-V3): choice by p + b, weights p, no gradient, the balancing rule");
    for (which = 0; which < 2; which++) {
        moe_layer_config c = small_config();
        fixture f;
        float *b, old[6];
        int id, t, s, e, ok_choice = 1, ok_weight = 1, nz = 0;
        c.router = which ? MOE_ROUTER_SIGMOID : MOE_ROUTER_TOPK;
        c.selection_bias = 1;
        c.routed_scale = 2.5f;
        if (!fixture_init(&f, &c, 20, 29)) { CHECK(0, "fixture"); return; }
        id = moe_store_find(&f.S, "moe.router.selection_bias");
        CHECK(id == f.L.id_selection_bias && id >= 0 && f.S.tensors[id].flags == 0, "the bias is a tensor without weight decay");
        b = moe_store_param(&f.S, id);
        for (e = 0; e < 6; e++) b[e] = e == 4 ? 10.0f : 0.0f; /* expert 4 wins every choice */
        objective(&f, NULL);
        for (t = 0; t < 20; t++) {
            const float *p = f.L.probs + (size_t)t * 6;
            const int *idx = f.L.topk + (size_t)t * 2;
            float sum = p[idx[0]] + p[idx[1]];
            if (idx[0] != 4) ok_choice = 0;
            for (s = 0; s < 2; s++)
                if (fabsf(f.L.gates[(size_t)t * 6 + idx[s]] - p[idx[s]] / sum) > 1e-6f) ok_weight = 0;
        }
        CHECK(ok_choice, "router %d: the bias puts expert 4 first for every token", which);
        CHECK(ok_weight, "router %d: the weights are the renormalised scores, without the bias", which);
        moe_store_zero_grad(&f.S);
        CHECK(moe_layer_backward(&f.L, &f.S, f.dx, f.dy, f.x, &f.args) == MOE_OK, "backward");
        for (e = 0; e < 6; e++) nz += moe_store_grad(&f.S, id)[e] != 0.0f;
        CHECK(nz == 0, "router %d: no gradient reaches the selection bias", which);
        for (e = 0; e < 6; e++) b[e] = 0.1f * (float)e; /* the rule: down where overloaded, up where underloaded */
        objective(&f, NULL);
        memcpy(old, b, sizeof old);
        CHECK(moe_layer_update_selection_bias(&f.L, &f.S, 0.01f) == MOE_OK, "update: %s", f.L.err.msg);
        {
            int ok = 1;
            for (e = 0; e < 6; e++) {
                float want = f.L.aux.picks[e] > 20.0f * 2 / 6 ? -0.01f : f.L.aux.picks[e] < 20.0f * 2 / 6 ? 0.01f : 0.0f;
                if (fabsf((b[e] - old[e]) - want) > 1e-7f) ok = 0;
            }
            CHECK(ok, "router %d: b_i += gamma * sign(mean load - load_i)", which);
        }
        CHECK(moe_layer_update_selection_bias(&f.L, &f.S, -1.0f) == MOE_ERR_INVALID_ARG, "negative gamma refused");
        fixture_free(&f);
        c.routed_scale = 1.0f;
        gradcheck_layer(which ? "sigmoid top-k with a selection bias" : "softmax top-k with a selection bias", &c, 20, 0);
    }
    {
        moe_layer_config c = small_config();
        fixture f;
        moe_err err;
        if (fixture_init(&f, &c, 4, 1)) {
            objective(&f, NULL);
            CHECK(moe_layer_update_selection_bias(&f.L, &f.S, 0.01f) == MOE_ERR_STATE && strstr(f.L.err.msg, "selection bias"),
                  "a layer without the bias refuses the update: %s", f.L.err.msg);
            fixture_free(&f);
        }
        c.router = MOE_ROUTER_NOISY_TOPK;
        c.selection_bias = 1;
        CHECK(moe_layer_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "selection_bias"), "noisy top-k has none: %s", err.msg);
    }
}

static void test_dispatch(void) {
    /* raw list in token order; expert 1 gets tokens 0, 2, 3 (in that order) */
    int tok[] = {0, 0, 1, 2, 2, 3}, exp_[] = {1, 2, 0, 2, 1, 1}, slot[] = {0, 1, 0, 1, 0, 0};
    float w[] = {0.6f, 0.4f, 1.0f, 0.3f, 0.7f, 1.0f};
    int cap = 6, T = 4, E = 3;
    moe_assign a;
    moe_err err;
    float x[4 * 2] = {1, 2, 3, 4, 5, 6, 7, 8}, xg[6 * 2], y[4 * 2], eout[6 * 2], dx[4 * 2];
    int i;
    TEST_BEGIN("dispatch: stable counting sort, per-token slot order, gather/combine");
    memset(&a, 0, sizeof a);
    a.token = (int *)calloc((size_t)cap, sizeof(int));
    a.expert = (int *)calloc((size_t)cap, sizeof(int));
    a.slot = (int *)calloc((size_t)cap, sizeof(int));
    a.weight = (float *)calloc((size_t)cap, sizeof(float));
    a.offset = (int *)calloc((size_t)E + 1, sizeof(int));
    a.tok_offset = (int *)calloc((size_t)T + 1, sizeof(int));
    a.tok_index = (int *)calloc((size_t)cap, sizeof(int));
    CHECK(moe_dispatch(&a, tok, exp_, slot, w, 6, T, E, &err) == MOE_OK, "dispatch ok");
    CHECK(a.offset[0] == 0 && a.offset[1] == 1 && a.offset[2] == 4 && a.offset[3] == 6, "offsets %d %d %d %d", a.offset[0], a.offset[1], a.offset[2], a.offset[3]);
    CHECK(a.token[1] == 0 && a.token[2] == 2 && a.token[3] == 3, "expert 1 keeps token order: %d %d %d", a.token[1], a.token[2], a.token[3]);
    CHECK(a.token[4] == 0 && a.token[5] == 2, "expert 2 keeps token order");
    /* token 2 has slot 0 -> expert 1 (position 2), slot 1 -> expert 2 (position 5) */
    CHECK(a.tok_index[a.tok_offset[2]] == 2 && a.tok_index[a.tok_offset[2] + 1] == 5, "token 2 in slot order");
    moe_gather(xg, x, &a, 2);
    CHECK(xg[2 * 2] == 5.0f && xg[5 * 2 + 1] == 6.0f, "gather copies token rows");
    for (i = 0; i < 12; i++) eout[i] = (float)(i + 1);
    moe_combine_forward(y, eout, &a, 2, 0);
    /* token 2: 0.7 * eout[2] + 0.3 * eout[5] */
    CHECK(fabsf(y[4] - (0.7f * 5.0f + 0.3f * 11.0f)) < 1e-6f, "combine weights: %g", (double)y[4]);
    memset(dx, 0, sizeof dx);
    moe_gather_backward(dx, eout, &a, 2);
    CHECK(dx[0] == eout[2] + eout[8], "gather backward sums a token's rows: %g", (double)dx[0]);
    exp_[3] = 7;
    CHECK(moe_dispatch(&a, tok, exp_, slot, w, 6, T, E, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "expert 7"), "bad expert id rejected: %s", err.msg);
    free(a.token); free(a.expert); free(a.slot); free(a.weight); free(a.offset); free(a.tok_offset); free(a.tok_index);
}

static void test_topk_semantics(void) {
    fixture f;
    moe_layer_config c = small_config();
    int t, s, ok_renorm = 1, ok_ties = 1;
    TEST_BEGIN("top-k: ties to the lower index; renormalised = softmax over the chosen logits");
    c.n_experts = 5;
    c.top_k = 3;
    c.n_shared = 0;
    if (!fixture_init(&f, &c, 8, 7)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    for (t = 0; t < 8; t++) {
        const float *z = f.L.logits + (size_t)t * 5;
        const int *idx = f.L.topk + (size_t)t * 3;
        double mx = z[idx[0]], sum = 0.0;
        for (s = 0; s < 3; s++) sum += exp(z[idx[s]] - mx);
        for (s = 0; s < 3; s++)
            if (fabs(f.L.gates[(size_t)t * 5 + idx[s]] - exp(z[idx[s]] - mx) / sum) > 1e-6) ok_renorm = 0;
        for (s = 1; s < 3; s++)
            if (z[idx[s]] > z[idx[s - 1]]) ok_ties = 0;
    }
    CHECK(ok_renorm, "renormalised top-k equals the softmax of the chosen logits");
    CHECK(ok_ties, "top-k ids in descending score order");
    /* all-zero router: every score ties; the chosen experts must be 0, 1, 2 in that order */
    memset(moe_store_param(&f.S, f.L.id_router_w), 0, sizeof(float) * 5 * (size_t)c.d);
    objective(&f, NULL);
    for (t = 0; t < 8; t++)
        if (f.L.topk[t * 3] != 0 || f.L.topk[t * 3 + 1] != 1 || f.L.topk[t * 3 + 2] != 2) ok_ties = 0;
    CHECK(ok_ties, "tied scores go to the lower expert index");
    fixture_free(&f);
}

static void test_capacity(void) {
    fixture f;
    moe_layer_config c = small_config();
    float *wr;
    int t, e, dropped_zero = 1;
    TEST_BEGIN("capacity: admission order, drop counter, dropped tokens keep only the residual");
    c.n_experts = 4;
    c.top_k = 1;
    c.capacity_factor = 1.0f; /* C = ceil(1 * 1 * 8 / 4) = 2 */
    c.router_bias = 1;
    if (!fixture_init(&f, &c, 8, 3)) { CHECK(0, "fixture"); return; }
    /* every token prefers expert 0 */
    wr = moe_store_param(&f.S, f.L.id_router_w);
    memset(wr, 0, sizeof(float) * 4 * (size_t)c.d);
    for (e = 0; e < 4; e++) moe_store_param(&f.S, f.L.id_router_b)[e] = e == 0 ? 5.0f : 0.0f;
    objective(&f, NULL);
    CHECK(f.L.stats.requested == 8 && f.L.stats.kept == 2 && f.L.stats.dropped == 6, "requested %d kept %d dropped %d", f.L.stats.requested, f.L.stats.kept, f.L.stats.dropped);
    CHECK(fabsf(f.L.stats.drop_rate - 0.75f) < 1e-6f, "drop rate %g", (double)f.L.stats.drop_rate);
    CHECK(f.L.routed.token[0] == 0 && f.L.routed.token[1] == 1, "the first tokens in index order are admitted");
    for (t = 2; t < 8; t++)
        for (e = 0; e < c.d; e++)
            if (f.y[(size_t)t * c.d + e] != 0.0f) dropped_zero = 0;
    CHECK(dropped_zero, "a dropped token's MoE output is zero");
    CHECK(f.L.stats.load[0] == 1.0f && f.L.stats.load_entropy == 0.0f, "load statistics see only kept tokens");
    fixture_free(&f);
    /* HF's Switch Transformers: a dropped token outputs its router probability times x */
    c.renormalize = 0;
    c.drop_passthrough = 1;
    if (!fixture_init(&f, &c, 8, 3)) { CHECK(0, "fixture"); return; }
    memset(moe_store_param(&f.S, f.L.id_router_w), 0, sizeof(float) * 4 * (size_t)c.d);
    for (e = 0; e < 4; e++) moe_store_param(&f.S, f.L.id_router_b)[e] = e == 0 ? 5.0f : 0.0f;
    objective(&f, NULL);
    dropped_zero = 1;
    for (t = 2; t < 8; t++)
        for (e = 0; e < c.d; e++)
            if (f.y[(size_t)t * c.d + e] != f.L.probs[(size_t)t * 4] * f.x[(size_t)t * c.d + e]) dropped_zero = 0;
    CHECK(dropped_zero && f.L.stats.dropped == 6, "drop_passthrough: a dropped token's output is p_top1 * x (dropped %d)", f.L.stats.dropped);
    fixture_free(&f);
    c.drop_passthrough = 0;
    c.renormalize = 1;
    /* top-2: first choices are admitted before second choices */
    c.top_k = 2;
    c.capacity_factor = 0.5f; /* C = ceil(0.5 * 2 * 8 / 4) = 2 */
    if (!fixture_init(&f, &c, 8, 3)) { CHECK(0, "fixture"); return; }
    memset(moe_store_param(&f.S, f.L.id_router_w), 0, sizeof(float) * 4 * (size_t)c.d);
    for (e = 0; e < 4; e++) moe_store_param(&f.S, f.L.id_router_b)[e] = (float)(4 - e); /* 0 > 1 > 2 > 3 */
    objective(&f, NULL);
    CHECK(f.L.stats.kept == 4 && f.L.routed.offset[1] == 2 && f.L.routed.offset[2] == 4, "experts 0 and 1 keep 2 each (kept %d)", f.L.stats.kept);
    fixture_free(&f);
    /* admission order: slot-major (GShard, the default) and token-major keep other sets; each
       equals a count replayed here from the chosen experts */
    {
        int order, kept[2][20 * 2];
        c = small_config();
        c.n_experts = 4;
        c.capacity_factor = 0.5f; /* C = ceil(0.5 * 2 * 20 / 4) = 5 */
        for (order = 0; order < 2; order++) {
            int count[4] = {0, 0, 0, 0}, i, j, same = 1;
            c.capacity_order = (moe_capacity_order)order;
            if (!fixture_init(&f, &c, 20, 17)) { CHECK(0, "fixture"); return; }
            objective(&f, NULL);
            memset(kept[order], 0, sizeof kept[order]);
            for (i = 0; i < (order ? 20 : 2); i++)
                for (j = 0; j < (order ? 2 : 20); j++) {
                    int tk = order ? i : j, s = order ? j : i, ex = f.L.topk[tk * 2 + s];
                    if (count[ex] < 5) { count[ex]++; kept[order][tk * 2 + s] = 1; }
                }
            for (i = 0, j = 0; i < 40; i++) j += kept[order][i];
            for (i = 0; i < f.L.routed.n; i++) {
                int tk = f.L.routed.token[i], ex = f.L.routed.expert[i];
                if (!(f.L.topk[tk * 2] == ex ? kept[order][tk * 2] : kept[order][tk * 2 + 1])) same = 0;
            }
            CHECK(same && j == f.L.routed.n, "order %d: the kept assignments are the replayed ones (%d of 40 kept)", order, j);
            fixture_free(&f);
        }
        CHECK(memcmp(kept[0], kept[1], sizeof kept[0]) != 0, "the two orders keep different assignments here");
        c.capacity_order = MOE_CAPACITY_TOKEN_MAJOR;
        gradcheck_layer("capacity 0.5, token-major admission (drops)", &c, 20, 0);
        c.capacity_order = MOE_CAPACITY_SLOT_MAJOR;
        c.drop_passthrough = 1;
        c.routed_scale = 1.3f;
        gradcheck_layer("capacity 0.5, dropped assignments pass x through (HF Switch), routed_scale 1.3", &c, 20, 0);
    }
}

static void test_expert_choice(void) {
    fixture f;
    moe_layer_config c = small_config();
    int e, ok = 1;
    TEST_BEGIN("expert choice: each expert takes ceil(k*T/E) tokens, ascending token order");
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.n_experts = 4;
    c.top_k = 2;
    if (!fixture_init(&f, &c, 10, 5)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    for (e = 0; e < 4; e++) {
        int i;
        if (f.L.routed.offset[e + 1] - f.L.routed.offset[e] != 5) ok = 0;
        for (i = f.L.routed.offset[e] + 1; i < f.L.routed.offset[e + 1]; i++)
            if (f.L.routed.token[i] <= f.L.routed.token[i - 1]) ok = 0;
    }
    CHECK(ok, "5 tokens per expert, sorted");
    CHECK(f.L.stats.kept == 20 && f.L.stats.dropped == 0, "kept %d", f.L.stats.kept);
    fixture_free(&f);
    /* the paper's capacity factor as its own field: C = ceil(1.5 * 10 / 4) = 4, whatever k is */
    c.ec_capacity_factor = 1.5f;
    c.top_k = 1;
    if (!fixture_init(&f, &c, 10, 5)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    for (e = 0, ok = 1; e < 4; e++)
        if (f.L.routed.offset[e + 1] - f.L.routed.offset[e] != 4) ok = 0;
    CHECK(ok && f.L.stats.kept == 16 && f.L.stats.requested == 16, "ec_capacity_factor 1.5: 4 tokens per expert (kept %d)", f.L.stats.kept);
    fixture_free(&f);
    c.ec_capacity_factor = 3.7f; /* more than k per token: the list is sized for it (ASan) */
    if (!fixture_init(&f, &c, 10, 5)) { CHECK(0, "fixture"); return; }
    objective(&f, NULL);
    CHECK(f.L.stats.kept == 40, "ec_capacity_factor 3.7: ceil(9.25) = 10 tokens per expert (kept %d)", f.L.stats.kept);
    fixture_free(&f);
    c = small_config();
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.balance = MOE_BALANCE_NONE;
    c.ec_capacity_factor = 2.5f;
    gradcheck_layer("expert choice, ec_capacity_factor 2.5", &c, 20, 0);
}

static void test_determinism(void) {
#ifdef _OPENMP
    moe_layer_config c = moe_layer_config_default();
    fixture f1, f2;
    int nt = omp_get_max_threads();
    int variants, v;
    TEST_BEGIN("determinism: 1 and 2 threads give bit-identical outputs and gradients");
    for (variants = 0; variants < 5; variants++) {
        c = moe_layer_config_default();
        c.d = 64; c.d_ff = 96; c.n_experts = 8; c.top_k = 2; c.z_coef = 1e-3f;
        if (variants == 1) { c.router = MOE_ROUTER_NOISY_TOPK; c.n_shared = 1; c.cv_unbiased = 1; }
        if (variants == 2) { c.router = MOE_ROUTER_EXPERT_CHOICE; c.expert = MOE_EXPERT_FFN; c.expert_bias = 1; c.ec_capacity_factor = 1.5f; }
        if (variants == 3) { /* the conventions: DeepSeek-V3 gating, token-major capacity, HF Switch drops, scales */
            c.router = MOE_ROUTER_SIGMOID; c.selection_bias = 1; c.routed_scale = 2.5f; c.n_shared = 1; c.shared_scale = 0.5f;
            c.capacity_factor = 0.8f; c.capacity_order = MOE_CAPACITY_TOKEN_MAJOR; c.drop_passthrough = 1;
        }
        if (variants == 4) { c.hyper = 1; c.hyper_head_bias = 1; }
        for (v = 0; v < 2; v++) {
            fixture *f = v == 0 ? &f1 : &f2;
            omp_set_num_threads(v == 0 ? 1 : 2);
            if (!fixture_init(f, &c, 600, 11)) { CHECK(0, "fixture"); return; }
            f->args.noise = f->noise;
            moe_layer_forward(&f->L, &f->S, f->y, f->x, f->T, &f->args);
            moe_store_zero_grad(&f->S);
            moe_layer_backward(&f->L, &f->S, f->dx, f->dy, f->x, &f->args);
        }
        omp_set_num_threads(nt);
        CHECK(memcmp(f1.y, f2.y, sizeof(float) * 600 * 64) == 0, "variant %d: y differs between 1 and 2 threads", variants);
        CHECK(memcmp(f1.dx, f2.dx, sizeof(float) * 600 * 64) == 0, "variant %d: dx differs", variants);
        CHECK(memcmp(f1.S.grads, f2.S.grads, sizeof(float) * f1.S.numel) == 0, "variant %d: parameter gradients differ", variants);
        CHECK(f1.L.stats.aux_total == f2.L.stats.aux_total, "variant %d: aux loss differs", variants);
        fixture_free(&f1);
        fixture_free(&f2);
    }
#else
    TEST_BEGIN("determinism: built without OpenMP, one thread only (skipped)");
#endif
}

static void test_bad_input(void) {
    moe_layer_config c;
    moe_store S;
    moe_layer L;
    moe_err err;
    fixture f;
    float x[4], y[4];
    TEST_BEGIN("bad input: a status and a sentence, no crash");
#define EXPECT_BAD(mutate, word)                                                                     \
    do {                                                                                             \
        c = small_config();                                                                          \
        mutate;                                                                                      \
        memset(&err, 0, sizeof err);                                                                 \
        CHECK(moe_layer_config_validate(&c, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, word),   \
              "%s rejected with a sentence naming '%s': got '%s'", #mutate, word, err.msg);           \
    } while (0)
    EXPECT_BAD(c.top_k = 7, "top_k");
    EXPECT_BAD(c.top_k = 0, "top_k");
    EXPECT_BAD(c.d = 0, "d (0)");
    EXPECT_BAD(c.d_ff = -3, "d_ff");
    EXPECT_BAD(c.n_experts = 0, "n_experts");
    EXPECT_BAD(c.capacity_factor = -1.0f, "capacity_factor");
    EXPECT_BAD(c.capacity_factor = NAN, "capacity_factor");
    EXPECT_BAD((c.router = MOE_ROUTER_NOISY_TOPK, c.top_k = 6), "noisy top-k");
    EXPECT_BAD((c.router = MOE_ROUTER_EXPERT_CHOICE, c.capacity_factor = 1.0f), "expert-choice");
    EXPECT_BAD(c.expert_bias = 1, "expert_bias");
    EXPECT_BAD(c.balance_coef = -0.1f, "coefficients");
    EXPECT_BAD(c.n_shared = -1, "n_shared");
    EXPECT_BAD(c.ec_capacity_factor = 1.0f, "expert-choice router only");
    EXPECT_BAD(c.capacity_order = (moe_capacity_order)2, "capacity_order");
    EXPECT_BAD(c.routed_scale = 0.0f, "routed_scale");
    EXPECT_BAD(c.drop_passthrough = 1, "drop_passthrough");
    EXPECT_BAD(c.shared_scale = NAN, "shared_scale");
    EXPECT_BAD((c.router = MOE_ROUTER_EXPERT_CHOICE, c.ec_capacity_factor = -1.0f), "ec_capacity_factor");
#undef EXPECT_BAD
    /* init errors */
    c = small_config();
    moe_store_init(&S);
    CHECK(moe_layer_init(&L, &c, &S, "a.", 0) == MOE_ERR_INVALID_ARG, "max_tokens 0 rejected: %s", L.err.msg);
    moe_store_add(&S, "dummy", 0, 3, 0, 0, 0);
    moe_store_alloc(&S, 0);
    CHECK(moe_layer_init(&L, &c, &S, "a.", 8) == MOE_ERR_STATE && strstr(L.err.msg, "store"), "init on an allocated store rejected: %s", L.err.msg);
    moe_store_free(&S);
    moe_store_init(&S);
    CHECK(moe_store_add(&S, "t", 0, 2, -1, 0, 0) < 0 && S.err.status == MOE_ERR_SHAPE, "negative dimension rejected: %s", S.err.msg);
    CHECK(moe_store_add(&S, "t", 0, 0, 0, 0, 0) < 0, "no dimensions rejected");
    CHECK(moe_store_add(&S, "t", 0, 2, 0, 3, 0) < 0, "a gap in the dimensions rejected");
    CHECK(moe_store_add(&S, "t", 0, 2, 0, 0, 0) == 0 && moe_store_add(&S, "t", 0, 2, 0, 0, 0) < 0, "duplicate names rejected: %s", S.err.msg);
    moe_store_free(&S);
    /* forward/backward errors */
    if (!fixture_init(&f, &c, 4, 1)) { CHECK(0, "fixture"); return; }
    CHECK(moe_layer_backward(&f.L, &f.S, f.dx, f.dy, f.x, NULL) == MOE_ERR_STATE && strstr(f.L.err.msg, "without a forward"), "backward before forward: %s", f.L.err.msg);
    CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 5, NULL) == MOE_ERR_SHAPE && strstr(f.L.err.msg, "T = 5"), "too many tokens: %s", f.L.err.msg);
    CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 0, NULL) == MOE_ERR_SHAPE, "zero tokens: %s", f.L.err.msg);
    CHECK(moe_layer_forward(&f.L, &f.S, NULL, f.x, 2, NULL) == MOE_ERR_INVALID_ARG, "NULL output: %s", f.L.err.msg);
    CHECK(moe_layer_forward(&f.L, &f.S, f.y, f.x, 4, NULL) == MOE_OK, "valid call after errors works");
    (void)x; (void)y;
    fixture_free(&f);
}

int main(void) {
    test_dispatch();
    test_topk_semantics();
    test_capacity();
    test_expert_choice();
    test_gradients();
    test_aux_gradients();
    test_raw_aux_terms();
    test_output_scales();
    test_selection_bias();
    test_gw();
    test_aoe();
    test_hyper();
    test_determinism();
    test_bad_input();
    test_non_finite();
    return test_summary();
}
