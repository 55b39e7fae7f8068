/* test_family_golden.c - moe.h's newer router families against PyTorch: the golden files
 * tests/ref/family_<case>.bin and tests/ref/rmoe_<case>.bin, written by tests/ref/family_ref.py
 * (`make goldens`) and committed, so this test needs no PyTorch.
 *
 *   family_<case>.bin  one MoE layer: AoE (paper and official-code weights), GW-MoE (paper
 *                      broadcast, slot cap with capacity, released-code emulation), HyperMoE
 *                      (top-1 and top-2). moe_layer_forward: router logits (AoE: expert norms),
 *                      probabilities, gates, top-k ids and uncertain flags (exactly), y, the
 *                      hyper-expert's output, routing counts (exactly), load, aux losses;
 *                      moe_layer_backward: every gradient of sum(y*dy) + aux_total, the same
 *                      accumulated twice, and the gradient of aux_total alone (dy = 0; a tensor
 *                      the aux losses do not reach must get exactly zero).
 *   rmoe_<case>.bin    the tiny model with RMoE's GRU router through depth, a dense layer
 *                      between MoE layers, the NP and detach ablations and the MLP router:
 *                      logits, loss, aux, each MoE layer's router input (GRU state), router
 *                      logits, top-k ids and aux; every parameter gradient (also accumulated
 *                      as 1/4 + 3/4); for the GRU case 5 AdamW steps (objective, top-k ids at
 *                      each forward, final parameters).
 *
 * Each tensor passes when |got - ref| <= atol + rtol*|ref| elementwise. One summary line per
 * case (per group for the models) gives the largest absolute and relative errors and how much
 * of the tolerance they use; TEST_VERBOSE=1 (or -v) adds a line per tensor.
 * Golden folder: $MOE_GOLDEN_DIR, default tests/ref (run from the repository root).
 */
#define _POSIX_C_SOURCE 200809L
#include "../moe.h"
#include "test.h"
#include "golden.h"

/* ---- error bookkeeping per group of tensors ------------------------------------------------- */

enum { G_FWD, G_LOSS, G_ROUTER, G_GRAD, G_GRAD_RIN, G_AUXGRAD, G_TRAJ, G_FINAL, G_COUNT };
static const char *group_name[G_COUNT] = {"forward", "losses", "router logits / input", "gradients",
                                          "grad router input path", "grad of aux alone", "loss trajectory",
                                          "final params"};


/* ---- one layer ----------------------------------------------------------------------------------
   Tolerances. Forward: float32 on both sides, sums of at most d + D + a b ~ 60 terms in a
   different order, results of order 1: a few ulps. Gradients: sums over T = 40..48 tokens and
   through two softmaxes (or a norm), results up to ~10. */
#define L_FWD_ATOL 1e-6
#define L_FWD_RTOL 1e-5
#define L_GRAD_ATOL 2e-6
#define L_GRAD_RTOL 4e-5
#define L_LOSS_ATOL 1e-7
#define L_LOSS_RTOL 1e-6
#define L_AUX_ATOL 1e-8
#define L_AUX_RTOL 1e-5

static void test_layer(const char *which, const char *what) {
    char file[128], title[256], nm[128];
    golden_file g;
    moe_layer_config c = moe_layer_config_default();
    moe_store S;
    moe_layer L;
    moe_layer_args args = moe_layer_args_default();
    int ok = 1, T, E, K, d, i, pass, gw_active, seq_len;
    const float *x, *dy, *ref;
    float *y = NULL, *dx = NULL, *zero_dy = NULL;
    moe_status st;
    snprintf(file, sizeof file, "family_%s.bin", which);
    snprintf(title, sizeof title, "golden family %s: %s", which, what);
    TEST_BEGIN(title);
    golden_groups_begin(group_name, G_COUNT);
    if (!golden_open(&g, file)) return;
    c.d = golden_cfg_int(&g, "d", &ok);
    c.d_ff = golden_cfg_int(&g, "d_ff", &ok);
    c.n_experts = golden_cfg_int(&g, "n_experts", &ok);
    c.top_k = golden_cfg_int(&g, "top_k", &ok);
    c.router = (moe_router_kind)golden_cfg_int(&g, "router", &ok);
    c.renormalize = golden_cfg_int(&g, "renormalize", &ok);
    c.router_bias = golden_cfg_int(&g, "router_bias", &ok);
    c.balance = (moe_balance_loss)golden_cfg_int(&g, "balance", &ok);
    c.aoe_rank = golden_cfg_int(&g, "aoe_rank", &ok);
    c.gw_normalized = golden_cfg_int(&g, "gw_normalized", &ok);
    c.gw_slots = golden_cfg_int(&g, "gw_slots", &ok);
    c.gw_released = golden_cfg_int(&g, "gw_released", &ok);
    c.hyper = golden_cfg_int(&g, "hyper", &ok);
    c.hyper_embed = golden_cfg_int(&g, "hyper_embed", &ok);
    c.hyper_hidden = golden_cfg_int(&g, "hyper_hidden", &ok);
    c.hyper_cond = golden_cfg_int(&g, "hyper_cond", &ok);
    c.hyper_layer_dim = golden_cfg_int(&g, "hyper_layer_dim", &ok);
    c.hyper_width = golden_cfg_int(&g, "hyper_width", &ok);
    c.hyper_adapter = golden_cfg_int(&g, "hyper_adapter", &ok);
    c.hyper_layers = golden_cfg_int(&g, "hyper_layers", &ok);
    c.hyper_layer = golden_cfg_int(&g, "hyper_layer", &ok);
    c.hyper_head_bias = golden_int(&g, "cfg.hyper_head_bias", 0); /* only where a case sets it */
    c.capacity_factor = golden_cfg_float(&g, "capacity_factor", &ok);
    c.balance_coef = golden_cfg_float(&g, "balance_coef", &ok);
    c.z_coef = golden_cfg_float(&g, "z_coef", &ok);
    c.gw_threshold = golden_cfg_float(&g, "gw_threshold", &ok);
    gw_active = golden_cfg_int(&g, "gw_active", &ok);
    seq_len = golden_cfg_int(&g, "seq_len", &ok);
    T = golden_cfg_int(&g, "tokens", &ok);
    if (!ok) { golden_free(&g); return; }
    E = c.n_experts; K = c.top_k; d = c.d;

    moe_store_init(&S);
    /* sized for more tokens than used: strides must follow T, not max_tokens */
    st = moe_layer_init(&L, &c, &S, "moe.", T + 5);
    if (!CHECK(st == MOE_OK, "moe_layer_init: %s", L.err.msg)) { moe_store_free(&S); golden_free(&g); return; }
    st = moe_store_alloc(&S, 0);
    if (!CHECK(st == MOE_OK, "moe_store_alloc: %s", S.err.msg)) goto done;
    args.gw_active = gw_active;
    args.seq_len = seq_len;
    if (!golden_store_params(&g, &S, 0)) goto done;
    x = golden_need(&g, "x", (size_t)T * d);
    dy = golden_need(&g, "dy", (size_t)T * d);
    if (!x || !dy) goto done;
    y = golden_zeros((size_t)T * d);
    dx = golden_zeros((size_t)T * d);
    zero_dy = golden_zeros((size_t)T * d);

    for (i = 0; i < T * d; i++) y[i] = 1e3f; /* forward overwrites y */
    st = moe_layer_forward(&L, &S, y, x, T, &args);
    if (!CHECK(st == MOE_OK, "moe_layer_forward: %s", L.err.msg)) goto done;
    golden_cmp(G_ROUTER, c.router == MOE_ROUTER_AOE ? "logits (expert norms)" : "logits", L.logits,
        golden_need(&g, "logits", (size_t)T * E), (size_t)T * E, L_FWD_ATOL, L_FWD_RTOL);
    golden_cmp(G_ROUTER, "probs", L.probs, golden_need(&g, "probs", (size_t)T * E), (size_t)T * E, L_FWD_ATOL, L_FWD_RTOL);
    golden_cmp_ints("top-k ids", L.topk, golden_need_i32(&g, "topk", (size_t)T * K), (size_t)T * K);
    golden_cmp_ints("uncertain (broadcast) tokens", L.gw.uncertain, golden_need_i32(&g, "uncertain", (size_t)T), (size_t)T);
    golden_cmp(G_FWD, "gates", L.gates, golden_need(&g, "gates", (size_t)T * E), (size_t)T * E, L_FWD_ATOL, L_FWD_RTOL);
    golden_cmp(G_FWD, "y", y, golden_need(&g, "y", (size_t)T * d), (size_t)T * d, L_FWD_ATOL, L_FWD_RTOL);
    if (c.hyper) golden_cmp(G_FWD, "hyper-expert output", L.hyper.out, golden_need(&g, "hyper_out", (size_t)T * d), (size_t)T * d, L_FWD_ATOL, L_FWD_RTOL);
    {
        int counts[4];
        int32_t refc[4];
        counts[0] = L.stats.broadcast; counts[1] = L.stats.requested; counts[2] = L.stats.kept; counts[3] = L.stats.dropped;
        refc[0] = golden_int(&g, "stats.broadcast", -1);
        refc[1] = golden_int(&g, "stats.requested", -1);
        refc[2] = golden_int(&g, "stats.kept", -1);
        refc[3] = golden_int(&g, "stats.dropped", -1);
        golden_cmp_ints("stats broadcast/requested/kept/dropped", counts, refc, 4);
    }
    golden_cmp(G_FWD, "stats.load", L.stats.load, golden_need(&g, "stats.load", E), E, L_FWD_ATOL, L_FWD_RTOL);
    golden_cmp(G_FWD, "stats.mean_prob", L.stats.mean_prob, golden_need(&g, "stats.mean_prob", E), E, L_FWD_ATOL, L_FWD_RTOL);
    if ((ref = golden_need(&g, "stats.gate_entropy", 1)) != NULL)
        golden_cmp_scalar(G_FWD, "stats.gate_entropy", L.stats.gate_entropy, ref[0], L_FWD_ATOL, L_FWD_RTOL);
    if ((ref = golden_need(&g, "aux_balance", 1)) != NULL) golden_cmp_scalar(G_LOSS, "aux_balance", L.stats.aux_balance, ref[0], L_LOSS_ATOL, L_LOSS_RTOL);
    if ((ref = golden_need(&g, "aux_z", 1)) != NULL) golden_cmp_scalar(G_LOSS, "aux_z", L.stats.aux_z, ref[0], L_LOSS_ATOL, L_LOSS_RTOL);
    if ((ref = golden_need(&g, "aux_total", 1)) != NULL) golden_cmp_scalar(G_LOSS, "aux_total", L.stats.aux_total, ref[0], L_LOSS_ATOL, L_LOSS_RTOL);

    /* backward. pass 0: sum(y*dy) + aux_total; pass 1: forward and backward once more without
       zeroing (every gradient, dx included, must double); pass 2: aux_total alone (dy = 0) */
    for (pass = 0; pass < 3; pass++) {
        const char *pre = pass == 2 ? "aux_grad." : "grad.";
        int grp = pass == 2 ? G_AUXGRAD : G_GRAD;
        double atol = pass == 2 ? L_AUX_ATOL : L_GRAD_ATOL, rtol = pass == 2 ? L_AUX_RTOL : L_GRAD_RTOL;
        float scale = pass == 1 ? 2.0f : 1.0f;
        golden_record = pass != 1;
        if (pass > 0) {
            st = moe_layer_forward(&L, &S, y, x, T, &args);
            if (!CHECK(st == MOE_OK, "moe_layer_forward: %s", L.err.msg)) goto done;
        }
        if (pass != 1) {
            moe_store_zero_grad(&S);
            memset(dx, 0, sizeof(float) * (size_t)T * d);
        }
        st = moe_layer_backward(&L, &S, dx, pass == 2 ? zero_dy : dy, x, &args);
        if (!CHECK(st == MOE_OK, "moe_layer_backward: %s", L.err.msg)) goto done;
        snprintf(nm, sizeof nm, "%sdx", pre);
        golden_cmp_scaled(grp, pass == 1 ? "2x grad.dx (accumulated)" : nm, dx, golden_need(&g, nm, (size_t)T * d), scale, (size_t)T * d, atol, rtol);
        for (i = 0; i < S.count; i++) {
            const moe_tensor *tn = &S.tensors[i];
            char label[160];
            snprintf(nm, sizeof nm, "%s%s", pre, tn->name);
            snprintf(label, sizeof label, "2x %s (accumulated)", nm);
            if (pass == 2 && !golden_find(&g, nm)) { /* a tensor the aux losses do not reach */
                size_t j, nz = 0;
                const float *gr = moe_store_grad(&S, i);
                for (j = 0; j < tn->numel; j++) nz += gr[j] != 0.0f;
                CHECK(nz == 0, "%s: %zu non-zero gradients from the auxiliary losses alone", nm, nz);
                continue;
            }
            golden_cmp_scaled(grp, pass == 1 ? label : nm, moe_store_grad(&S, i), golden_need(&g, nm, tn->numel), scale, tn->numel, atol, rtol);
        }
    }
    golden_record = 1;
    golden_groups_print();
done:
    golden_record = 1;
    free(y); free(dx); free(zero_dy);
    moe_layer_free(&L);
    moe_store_free(&S);
    golden_free(&g);
}

/* ---- the tiny model with a recurrent / MLP router input -----------------------------------------
   Tolerances as tests/test_model_golden.c (float32 on both sides, sums of at most a few hundred
   terms; N = 24 tokens, d = 16, V = 32), the trajectory after 5 AdamW steps of lr 1e-2. */
#define M_FWD_ATOL 5e-6
#define M_FWD_RTOL 1e-5
#define M_LOSS_ATOL 1e-7
#define M_LOSS_RTOL 1e-6
#define M_GRAD_ATOL 2e-7
#define M_GRAD_RTOL 1e-4
#define M_TRAJ_ATOL 1e-6
#define M_TRAJ_RTOL 2e-6
#define M_FINAL_ATOL 2e-6
#define M_FINAL_RTOL 5e-5
static const golden_tol MODEL_TOL = {M_FWD_ATOL, M_FWD_RTOL, M_LOSS_ATOL, M_LOSS_RTOL, M_GRAD_ATOL,
                                      M_GRAD_RTOL, M_TRAJ_ATOL, M_TRAJ_RTOL, M_FINAL_ATOL, M_FINAL_RTOL};

static int rin_group(const char *name) {
    return (strstr(name, "rmoe.") || strstr(name, "router.")) ? G_GRAD_RIN : G_GRAD;
}

static void test_model(const char *which, const char *what) {
    char file[200], title[256];
    golden_file g;
    moe_model_config c = moe_model_config_default();
    moe_adamw_config opt = moe_adamw_config_default();
    moe_model m;
    moe_status st;
    int ok = 1, B, T, N, steps, i, *inputs = NULL, *targets = NULL;
    float lr;
    const int32_t *in32, *tg32;
    snprintf(file, sizeof file, "rmoe_%s.bin", which);
    snprintf(title, sizeof title, "golden rmoe %s: %s", which, what);
    TEST_BEGIN(title);
    golden_groups_begin(group_name, G_COUNT);
    if (!golden_open(&g, file)) return;
    c.vocab = golden_cfg_int(&g, "vocab", &ok);
    c.max_seq = golden_cfg_int(&g, "max_seq", &ok);
    c.d = golden_cfg_int(&g, "d", &ok);
    c.n_layers = golden_cfg_int(&g, "n_layers", &ok);
    c.n_heads = golden_cfg_int(&g, "n_heads", &ok);
    c.d_ff = golden_cfg_int(&g, "d_ff", &ok);
    c.pos = MOE_POS_LEARNED;
    c.norm_eps = golden_cfg_float(&g, "norm_eps", &ok);
    c.moe_every = golden_cfg_int(&g, "moe_every", &ok);
    c.dense_first = golden_cfg_int(&g, "dense_first", &ok);
    c.router_input = (moe_router_input)golden_cfg_int(&g, "router_input", &ok);
    c.router_dim = golden_cfg_int(&g, "router_dim", &ok);
    c.balance_all_layers = golden_int(&g, "cfg.balance_all_layers", 0); /* only where a case sets it */
    c.moe.d_ff = golden_cfg_int(&g, "moe.d_ff", &ok);
    c.moe.n_experts = golden_cfg_int(&g, "moe.n_experts", &ok);
    c.moe.top_k = golden_cfg_int(&g, "moe.top_k", &ok);
    c.moe.renormalize = golden_cfg_int(&g, "moe.renormalize", &ok);
    c.moe.balance = (moe_balance_loss)golden_cfg_int(&g, "moe.balance", &ok);
    c.moe.balance_coef = golden_cfg_float(&g, "moe.balance_coef", &ok);
    c.moe.z_coef = golden_cfg_float(&g, "moe.z_coef", &ok);
    B = golden_cfg_int(&g, "B", &ok);
    T = golden_cfg_int(&g, "T", &ok);
    steps = golden_cfg_int(&g, "steps", &ok);
    lr = golden_cfg_float(&g, "lr", &ok);
    opt.beta1 = golden_cfg_float(&g, "beta1", &ok);
    opt.beta2 = golden_cfg_float(&g, "beta2", &ok);
    opt.eps = golden_cfg_float(&g, "eps", &ok);
    opt.weight_decay = golden_cfg_float(&g, "weight_decay", &ok);
    if (!ok) { golden_free(&g); return; }
    N = B * T;

    st = moe_model_init(&m, &c, B + 1, T); /* one sequence more than used */
    if (!CHECK(st == MOE_OK, "moe_model_init: %s", m.err.msg)) { golden_free(&g); return; }
    ok = golden_store_params(&g, &m.S, 1) && ok;
    in32 = golden_need_i32(&g, "inputs", (size_t)N);
    tg32 = golden_need_i32(&g, "targets", (size_t)N);
    if (!ok || !in32 || !tg32) goto done;
    inputs = (int *)malloc(sizeof(int) * (size_t)N);
    targets = (int *)malloc(sizeof(int) * (size_t)N);
    if (!CHECK(inputs && targets, "out of memory")) goto done;
    for (i = 0; i < N; i++) { inputs[i] = in32[i]; targets[i] = tg32[i]; }

    /* 1. forward */
    if (!golden_model_forward(&g, &m, inputs, targets, B, T, G_FWD, G_LOSS, G_ROUTER, &MODEL_TOL)) goto done;

    /* 2. backward: every parameter gradient; then the same accumulated as 1/4 + 3/4 */
    if (!golden_model_grads(&g, &m, inputs, targets, B, T, rin_group, &MODEL_TOL)) goto done;

    /* 3. AdamW on the same batch (GRU case): forward k sees the parameters after k steps */
    if (steps > 0)
        golden_model_trajectory(&g, &m, inputs, targets, B, T, steps, lr, &opt, G_TRAJ, G_FINAL, &MODEL_TOL);
    golden_groups_print();
done:
    golden_record = 1;
    free(inputs);
    free(targets);
    moe_model_free(&m);
    golden_free(&g);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) setenv("TEST_VERBOSE", "1", 1);
    test_layer("aoe_paper", "AoE, expert norms of rank-4 caches, top-2, softmax over the chosen norms (paper), Mixtral balance, z-loss");
    test_layer("aoe_code", "AoE, rank 5, top-2 of 6, softmax over all norms unrenormalised (official code), capacity 1.0 with drops, Mixtral balance, z-loss");
    test_layer("gw_paper", "GW-MoE, Switch top-1, normalised entropy, uncertain tokens broadcast with the full softmax, Switch balance, z-loss");
    test_layer("gw_slots", "GW-MoE, renormalised top-2, raw entropy, 2 slots per sequence of 12, capacity 1.0 with drops, router bias");
    test_layer("gw_released", "GW-MoE released-code emulation: uncertain tokens output p_{E-1} x, Switch top-1");
    test_layer("hyper_switch", "HyperMoE, Switch top-1, hyper-expert from the unselected experts (layer row 1 of 2), Switch balance, z-loss");
    test_layer("hyper_top2", "HyperMoE, renormalised top-2 of 6 (layer row 1 of 3), Mixtral balance");
    test_layer("hyper_bias", "HyperMoE as hyper_top2 with the official code's head biases (W_dn, b_dn, W_up, b_up each plus a learned constant)");
    test_model("gru", "RMoE: 3 MoE layers, one GRU (p = 8) through depth, top-2 of 4, Mixtral balance, z-loss, 5 AdamW steps");
    test_model("gru_dense", "RMoE: MoE / dense / MoE / dense, the dense layers pass the GRU state on");
    test_model("gru_np", "RMoE ablation NP: h_{l-1} = 0 in every layer");
    test_model("gru_detach", "RMoE ablation detach: h_{l-1} enters layer l without a gradient");
    test_model("mlp", "SMoE-MLP: router on GELU(x P^T), 3 MoE layers");
    test_model("gru_balance_all", "RMoE with its code's balance loss: one over all 3 layers' tokens at once, 5 AdamW steps");
    return test_summary();
}
