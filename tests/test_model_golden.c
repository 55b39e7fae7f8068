/* test_model_golden.c - the whole tiny model of moe.h against PyTorch: tests/ref/model_<case>.bin,
 * written by tests/ref/model_ref.py (`make goldens`) and committed, so this test needs no PyTorch.
 *
 * For each case: the initial weights are copied by tensor name into a fresh moe_model, then
 *   1. moe_model_forward: logits, mean cross-entropy, aux loss, each MoE layer's router logits,
 *      aux loss and top-k ids (exactly);
 *   2. moe_model_backward(1.0): every parameter gradient of cross-entropy + aux; the same
 *      gradients accumulated from backward(0.25) and backward(0.75);
 *   3. 10 AdamW steps on the same batch (moe_store_zero_grad, forward, backward, moe_adamw_step
 *      with lr 1e-2, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on MOE_TENSOR_DECAY tensors):
 *      the objective, cross-entropy and aux loss of each of the 11 forwards, the top-k ids of
 *      every MoE layer at every forward (exactly), and the parameters after step 10.
 * Cases: dense with learned positions; MoE in every layer (renormalised top-2, Mixtral balance,
 * z-loss) with RoPE; dense / MoE / dense (Switch top-1 + a shared expert) with learned positions.
 *
 * Each tensor passes when |got - ref| <= atol + rtol*|ref| elementwise. One summary line per
 * group of tensors gives its largest absolute and relative error; TEST_VERBOSE=1 (or -v) adds
 * a line per tensor. Golden folder: $MOE_GOLDEN_DIR, default tests/ref (run from the repo root).
 */
#define _POSIX_C_SOURCE 200809L
#include "../moe.h"
#include "test.h"
#include "golden.h"

/* ---- error bookkeeping per group of tensors ------------------------------------------------ */

enum { G_FWD, G_LOSS, G_ROUTER, G_GEMB, G_GATTN, G_GNORM, G_GFFN, G_GROUTER, G_GEXPERT, G_TRAJ, G_FINAL, G_COUNT };
static const char *group_name[G_COUNT] = {
    "logits", "loss/aux (first forward)", "router logits", "grad embeddings", "grad attention",
    "grad norms", "grad dense FFN", "grad routers", "grad experts", "loss trajectory", "final params"};

static int grad_group(const char *name) {
    if (strcmp(name, "wte") == 0 || strcmp(name, "wpe") == 0) return G_GEMB;
    if (strstr(name, ".attn.")) return G_GATTN;
    if (strstr(name, "ln1.w") || strstr(name, "ln2.w") || strcmp(name, "lnf.w") == 0) return G_GNORM;
    if (strstr(name, ".ffn.")) return G_GFFN;
    if (strstr(name, ".moe.router.")) return G_GROUTER;
    return G_GEXPERT;
}

/* ---- tolerances ---------------------------------------------------------------------------------
   float32 throughout on both sides; the sums that differ in order are at most a few hundred
   terms long (d = 32, N = 32 tokens, V = 64), so forward values agree to a few ulps of their
   magnitude and gradients (sums over the batch, through up to 3 blocks) to ~1e-5 relative. */
#define TOL_FWD_ATOL 5e-6
#define TOL_FWD_RTOL 1e-5
#define TOL_LOSS_ATOL 1e-7
#define TOL_LOSS_RTOL 1e-6
#define TOL_GRAD_ATOL 2e-7
#define TOL_GRAD_RTOL 1e-4
/* after 10 AdamW steps: each step moves a weight by about lr = 1e-2; where a gradient element is
   tiny, Adam's m / sqrt(v) turns its relative float32 error into an absolute one of order lr *
   (relative error), so the final parameters get an absolute tolerance in units of lr */
#define TOL_TRAJ_ATOL 1e-6
#define TOL_TRAJ_RTOL 2e-6
#define TOL_FINAL_ATOL 2e-6
#define TOL_FINAL_RTOL 5e-5
static const golden_tol MODEL_TOL = {TOL_FWD_ATOL, TOL_FWD_RTOL, TOL_LOSS_ATOL, TOL_LOSS_RTOL, TOL_GRAD_ATOL,
                                      TOL_GRAD_RTOL, TOL_TRAJ_ATOL, TOL_TRAJ_RTOL, TOL_FINAL_ATOL, TOL_FINAL_RTOL};

static void test_model(const char *which, const char *what) {
    char file[64], title[256];
    golden_file g;
    moe_model_config c = moe_model_config_default();
    moe_adamw_config opt = moe_adamw_config_default();
    moe_model m;
    moe_status st;
    int ok = 1, B, T, N, steps, i, *inputs = NULL, *targets = NULL;
    float lr;
    const int32_t *in32, *tg32;
    snprintf(file, sizeof file, "model_%s.bin", which);
    snprintf(title, sizeof title, "golden model %s: %s", which, what);
    TEST_BEGIN(title);
    golden_groups_begin(group_name, G_COUNT);
    if (!golden_open(&g, file)) return;
    c.vocab = golden_cfg_int(&g, "vocab", &ok);
    c.max_seq = golden_cfg_int(&g, "max_seq", &ok);
    c.d = golden_cfg_int(&g, "d", &ok);
    c.n_layers = golden_cfg_int(&g, "n_layers", &ok);
    c.n_heads = golden_cfg_int(&g, "n_heads", &ok);
    c.d_ff = golden_cfg_int(&g, "d_ff", &ok);
    c.pos = (moe_pos_kind)golden_cfg_int(&g, "pos", &ok);
    c.rope_theta = golden_cfg_float(&g, "rope_theta", &ok);
    c.norm_eps = golden_cfg_float(&g, "norm_eps", &ok);
    c.moe_every = golden_cfg_int(&g, "moe_every", &ok);
    c.dense_first = golden_cfg_int(&g, "dense_first", &ok);
    c.moe.d_ff = golden_cfg_int(&g, "moe.d_ff", &ok);
    c.moe.n_experts = golden_cfg_int(&g, "moe.n_experts", &ok);
    c.moe.top_k = golden_cfg_int(&g, "moe.top_k", &ok);
    c.moe.n_shared = golden_cfg_int(&g, "moe.n_shared", &ok);
    c.moe.d_ff_shared = golden_cfg_int(&g, "moe.d_ff_shared", &ok);
    c.moe.expert = (moe_expert_kind)golden_cfg_int(&g, "moe.expert", &ok);
    c.moe.activation = (moe_activation)golden_cfg_int(&g, "moe.activation", &ok);
    c.moe.expert_bias = golden_cfg_int(&g, "moe.expert_bias", &ok);
    c.moe.router = (moe_router_kind)golden_cfg_int(&g, "moe.router", &ok);
    c.moe.renormalize = golden_cfg_int(&g, "moe.renormalize", &ok);
    c.moe.router_bias = golden_cfg_int(&g, "moe.router_bias", &ok);
    c.moe.balance = (moe_balance_loss)golden_cfg_int(&g, "moe.balance", &ok);
    c.moe.capacity_factor = golden_cfg_float(&g, "moe.capacity_factor", &ok);
    c.moe.balance_coef = golden_cfg_float(&g, "moe.balance_coef", &ok);
    c.moe.z_coef = golden_cfg_float(&g, "moe.z_coef", &ok);
    c.moe.importance_coef = golden_cfg_float(&g, "moe.importance_coef", &ok);
    c.moe.load_coef = golden_cfg_float(&g, "moe.load_coef", &ok);
    c.moe.noise_eps = golden_cfg_float(&g, "moe.noise_eps", &ok);
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

    /* room for one more sequence than used: strides must follow B, not max_B */
    st = moe_model_init(&m, &c, B + 1, T);
    if (!CHECK(st == MOE_OK, "moe_model_init: %s", m.err.msg)) { golden_free(&g); return; }

    /* the initial weights, by name */
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

    /* 2. backward: every parameter gradient; the same accumulated from 1/4 + 3/4 */
    if (!golden_model_grads(&g, &m, inputs, targets, B, T, grad_group, &MODEL_TOL)) goto done;

    /* 3. AdamW on the same batch, then the final parameters */
    golden_model_trajectory(&g, &m, inputs, targets, B, T, steps, lr, &opt, G_TRAJ, G_FINAL, &MODEL_TOL);
    golden_groups_print();
done:
    free(inputs);
    free(targets);
    moe_model_free(&m);
    golden_free(&g);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) setenv("TEST_VERBOSE", "1", 1);
    test_model("dense", "2 dense layers, learned positions, SwiGLU FFN, tied head, one ignored target");
    test_model("moe_rope", "2 MoE layers (renormalised top-2 of 4, Mixtral balance, z-loss), RoPE");
    test_model("switch_shared", "dense / MoE / dense (Switch top-1 + shared expert, Switch balance, z-loss), learned positions");
    return test_summary();
}
