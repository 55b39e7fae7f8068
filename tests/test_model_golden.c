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
#define MOE_IMPLEMENTATION
#include "../moe.h"
#include "test.h"
#include "golden.h"

/* ---- error bookkeeping per group of tensors ------------------------------------------------ */

enum { G_FWD, G_LOSS, G_ROUTER, G_GEMB, G_GATTN, G_GNORM, G_GFFN, G_GROUTER, G_GEXPERT, G_TRAJ, G_FINAL, G_COUNT };
static const char *group_name[G_COUNT] = {
    "logits", "loss/aux (first forward)", "router logits", "grad embeddings", "grad attention",
    "grad norms", "grad dense FFN", "grad routers", "grad experts", "loss trajectory", "final params"};

typedef struct group_err {
    int tensors;
    double max_abs, max_rel; /* rel over elements with |ref| >= 1e-3 */
    double max_use;          /* max |got - ref| / (atol + rtol |ref|): 1 = at the tolerance */
    char worst_abs[64], worst_rel[64];
} group_err;

static group_err groups[G_COUNT];

static int grad_group(const char *name) {
    if (strcmp(name, "wte") == 0 || strcmp(name, "wpe") == 0) return G_GEMB;
    if (strstr(name, ".attn.")) return G_GATTN;
    if (strstr(name, "ln1.w") || strstr(name, "ln2.w") || strcmp(name, "lnf.w") == 0) return G_GNORM;
    if (strstr(name, ".ffn.")) return G_GFFN;
    if (strstr(name, ".moe.router.")) return G_GROUTER;
    return G_GEXPERT;
}

static int cmp(int group, const char *name, const float *got, const float *ref, size_t n, double atol, double rtol) {
    size_t i;
    double ma = 0.0, mr = 0.0, mu = 0.0;
    int ok, verbose = test_verbose;
    group_err *g = &groups[group];
    if (!got || !ref) return CHECK(0, "%s: missing data", name);
    for (i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]), r = fabs((double)ref[i]);
        if (d != d) d = HUGE_VAL;
        if (d > ma) ma = d;
        if (r >= 1e-3 && d / r > mr) mr = d / r;
        if (d / (atol + rtol * r) > mu) mu = d / (atol + rtol * r);
    }
    test_verbose = 0;
    ok = check_close(name, got, ref, n, atol, rtol);
    test_verbose = verbose;
    if (verbose)
        printf("   %-4s %-32s n=%-6zu max_abs=%-10.3g max_rel=%-10.3g (atol %.0e, rtol %.0e: %.2f of it)\n",
               ok ? "ok" : "BAD", name, n, ma, mr, atol, rtol, mu);
    g->tensors++;
    if (mu > g->max_use) g->max_use = mu;
    if (ma > g->max_abs) { g->max_abs = ma; snprintf(g->worst_abs, sizeof g->worst_abs, "%s", name); }
    if (mr > g->max_rel) { g->max_rel = mr; snprintf(g->worst_rel, sizeof g->worst_rel, "%s", name); }
    return ok;
}

static int cmp_scalar(int group, const char *name, double got, float ref, double atol, double rtol) {
    float g = (float)got;
    return cmp(group, name, &g, &ref, 1, atol, rtol);
}

static int cmp_ints(const char *name, const int *got, const int32_t *ref, size_t n) {
    size_t i, bad = 0, first = 0;
    if (!got || !ref) return CHECK(0, "%s: missing data", name);
    for (i = 0; i < n; i++)
        if (got[i] != (int)ref[i]) {
            if (!bad) first = i;
            bad++;
        }
    if (test_verbose) printf("   %-4s %-32s n=%-6zu exact, %zu differ\n", bad ? "BAD" : "ok", name, n, bad);
    return CHECK(bad == 0, "%s: %zu of %zu integers differ, first at [%zu]: got %d, PyTorch %d", name, bad, n,
                 first, got[first], (int)ref[first]);
}

/* ---- golden access ----------------------------------------------------------------------------- */





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

static void test_model(const char *which, const char *what) {
    char file[200], title[256], nm[128];
    golden_file g;
    moe_model_config c = moe_model_config_default();
    moe_adamw_config opt = moe_adamw_config_default();
    moe_model m;
    moe_status st;
    int ok = 1, B, T, N, V, K, steps, i, l, step, nparam = 0, *inputs = NULL, *targets = NULL;
    float lr;
    const int32_t *in32, *tg32;
    const float *traj_loss, *traj_ce, *traj_aux;
    const char *dir = getenv("MOE_GOLDEN_DIR");
    snprintf(file, sizeof file, "%s/model_%s.bin", dir ? dir : "tests/ref", which);
    snprintf(title, sizeof title, "golden model %s: %s", which, what);
    TEST_BEGIN(title);
    memset(groups, 0, sizeof groups);
    if (golden_load(&g, file) != 0) {
        CHECK(0, "%s", g.err);
        return;
    }
    if (test_verbose) printf("   %s: %d records, %s\n", file, g.count, g.note);
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
    N = B * T; V = c.vocab; K = c.moe.top_k;

    /* room for one more sequence than used: strides must follow B, not max_B */
    st = moe_model_init(&m, &c, B + 1, T);
    if (!CHECK(st == MOE_OK, "moe_model_init: %s", m.err.msg)) { golden_free(&g); return; }

    /* the initial weights, by name: the file and the store must list the same tensors with the
       same shapes; decay exactly on the 2-d and 3-d weights */
    for (i = 0; i < g.count; i++) nparam += strncmp(g.t[i].name, "param.", 6) == 0;
    CHECK(nparam == m.S.count, "%s holds %d parameter tensors, the model declares %d", file, nparam, m.S.count);
    for (i = 0; i < m.S.count; i++) {
        const moe_tensor *tn = &m.S.tensors[i];
        const golden_tensor *gt;
        int k, same = 1;
        snprintf(nm, sizeof nm, "param.%s", tn->name);
        gt = golden_find(&g, nm);
        if (!CHECK(gt && gt->dtype == GOLDEN_F32 && gt->numel == tn->numel, "%s: no float32 record of %zu elements",
                   nm, tn->numel)) { ok = 0; continue; }
        same = gt->ndim == tn->ndim;
        for (k = 0; same && k < tn->ndim; k++) same = gt->shape[k] == tn->shape[k];
        CHECK(same, "%s: shape differs between the golden file and the store", tn->name);
        CHECK(((tn->flags & MOE_TENSOR_DECAY) != 0) == (tn->ndim >= 2), "%s: weight decay flag %d for a %d-d tensor",
              tn->name, tn->flags, tn->ndim);
        memcpy(moe_store_param(&m.S, i), gt->f32, tn->numel * sizeof(float));
    }
    in32 = golden_need_i32(&g, "inputs", (size_t)N);
    tg32 = golden_need_i32(&g, "targets", (size_t)N);
    traj_loss = golden_need(&g, "traj.loss", (size_t)steps + 1);
    traj_ce = golden_need(&g, "traj.ce", (size_t)steps + 1);
    traj_aux = golden_need(&g, "traj.aux", (size_t)steps + 1);
    if (!ok || !in32 || !tg32 || !traj_loss || !traj_ce || !traj_aux) goto done;
    inputs = (int *)malloc(sizeof(int) * (size_t)N);
    targets = (int *)malloc(sizeof(int) * (size_t)N);
    if (!CHECK(inputs && targets, "out of memory")) goto done;
    for (i = 0; i < N; i++) { inputs[i] = in32[i]; targets[i] = tg32[i]; }

    /* 1. forward */
    st = moe_model_forward(&m, inputs, targets, B, T, NULL);
    if (!CHECK(st == MOE_OK, "moe_model_forward: %s", m.err.msg)) goto done;
    cmp(G_FWD, "logits", m.logits, golden_need(&g, "logits", (size_t)N * V), (size_t)N * V, TOL_FWD_ATOL, TOL_FWD_RTOL);
    {
        const float *ce = golden_need(&g, "ce", 1), *aux = golden_need(&g, "aux", 1);
        if (ce) cmp_scalar(G_LOSS, "cross-entropy", m.loss, ce[0], TOL_LOSS_ATOL, TOL_LOSS_RTOL);
        if (aux) cmp_scalar(G_LOSS, "aux loss", m.aux_loss, aux[0], TOL_LOSS_ATOL, TOL_LOSS_RTOL);
    }
    for (l = 0; l < c.n_layers; l++) {
        moe_layer *L = &m.blocks[l].moe;
        const float *ref;
        char label[64];
        snprintf(nm, sizeof nm, "l%d.router_logits", l);
        CHECK((golden_find(&g, nm) != NULL) == (m.blocks[l].is_moe != 0), "layer %d: MoE in one model, dense in the other", l);
        if (!m.blocks[l].is_moe) continue;
        cmp(G_ROUTER, nm, L->logits, golden_need(&g, nm, (size_t)N * c.moe.n_experts), (size_t)N * c.moe.n_experts,
            TOL_FWD_ATOL, TOL_FWD_RTOL);
        snprintf(nm, sizeof nm, "l%d.topk", l);
        cmp_ints(nm, L->topk, golden_need_i32(&g, nm, (size_t)N * K), (size_t)N * K);
        snprintf(nm, sizeof nm, "l%d.aux", l);
        snprintf(label, sizeof label, "l%d aux loss", l);
        if ((ref = golden_need(&g, nm, 1)) != NULL) cmp_scalar(G_LOSS, label, L->stats.aux_total, ref[0], TOL_LOSS_ATOL, TOL_LOSS_RTOL);
    }

    /* 2. backward: every parameter gradient (the store starts with zero gradients) */
    moe_store_zero_grad(&m.S);
    st = moe_model_backward(&m, 1.0f);
    if (!CHECK(st == MOE_OK, "moe_model_backward: %s", m.err.msg)) goto done;
    for (i = 0; i < m.S.count; i++) {
        const moe_tensor *tn = &m.S.tensors[i];
        snprintf(nm, sizeof nm, "grad.%s", tn->name);
        cmp(grad_group(tn->name), nm, moe_store_grad(&m.S, i), golden_need(&g, nm, tn->numel), tn->numel, TOL_GRAD_ATOL,
            TOL_GRAD_RTOL);
    }

    /* the same gradients accumulated from two passes of scale 1/4 and 3/4 (micro-batches) */
    moe_store_zero_grad(&m.S);
    st = moe_model_backward(&m, 0.25f);
    if (st == MOE_OK) st = moe_model_forward(&m, inputs, targets, B, T, NULL);
    if (st == MOE_OK) st = moe_model_backward(&m, 0.75f);
    if (!CHECK(st == MOE_OK, "accumulating backward: %s", m.err.msg)) goto done;
    for (i = 0; i < m.S.count; i++) {
        const moe_tensor *tn = &m.S.tensors[i];
        const float *ref;
        snprintf(nm, sizeof nm, "grad.%s", tn->name);
        ref = golden_need(&g, nm, tn->numel);
        snprintf(nm, sizeof nm, "grad.%s (1/4 + 3/4)", tn->name);
        if (ref && !check_close(nm, moe_store_grad(&m.S, i), ref, tn->numel, TOL_GRAD_ATOL, TOL_GRAD_RTOL)) break;
    }

    /* 3. AdamW on the same batch: forward k sees the parameters after k steps */
    for (step = 0; step <= steps; step++) {
        moe_store_zero_grad(&m.S);
        st = moe_model_forward(&m, inputs, targets, B, T, NULL);
        if (!CHECK(st == MOE_OK, "step %d: moe_model_forward: %s", step, m.err.msg)) goto done;
        snprintf(nm, sizeof nm, "objective after %d steps", step);
        cmp_scalar(G_TRAJ, nm, m.loss + m.aux_loss, traj_loss[step], TOL_TRAJ_ATOL, TOL_TRAJ_RTOL);
        snprintf(nm, sizeof nm, "cross-entropy after %d steps", step);
        cmp_scalar(G_TRAJ, nm, m.loss, traj_ce[step], TOL_TRAJ_ATOL, TOL_TRAJ_RTOL);
        snprintf(nm, sizeof nm, "aux loss after %d steps", step);
        cmp_scalar(G_TRAJ, nm, m.aux_loss, traj_aux[step], TOL_TRAJ_ATOL, TOL_TRAJ_RTOL);
        for (l = 0; l < c.n_layers; l++) {
            const int32_t *ids;
            char rec[64];
            if (!m.blocks[l].is_moe) continue;
            snprintf(rec, sizeof rec, "traj.l%d.topk", l);
            ids = golden_need_i32(&g, rec, (size_t)(steps + 1) * N * K);
            snprintf(nm, sizeof nm, "l%d top-k ids after %d steps", l, step);
            if (ids) cmp_ints(nm, m.blocks[l].moe.topk, ids + (size_t)step * N * K, (size_t)N * K);
        }
        if (step == steps) break;
        st = moe_model_backward(&m, 1.0f);
        if (!CHECK(st == MOE_OK, "step %d: moe_model_backward: %s", step, m.err.msg)) goto done;
        st = moe_adamw_step(&m.S, &opt, lr, step + 1);
        if (!CHECK(st == MOE_OK, "moe_adamw_step: %s", m.S.err.msg)) goto done;
    }
    {
        int nfinal = 0, found = 0;
        for (i = 0; i < g.count; i++) nfinal += strncmp(g.t[i].name, "final.", 6) == 0;
        for (i = 0; i < m.S.count; i++) {
            const moe_tensor *tn = &m.S.tensors[i];
            snprintf(nm, sizeof nm, "final.%s", tn->name);
            if (!golden_find(&g, nm)) continue;
            found++;
            cmp(G_FINAL, nm, moe_store_param(&m.S, i), golden_need(&g, nm, tn->numel), tn->numel, TOL_FINAL_ATOL, TOL_FINAL_RTOL);
        }
        CHECK(nfinal > 0 && found == nfinal, "%s: %d final parameter records, %d of them match a tensor", file, nfinal, found);
    }
    for (i = 0; i < G_COUNT; i++)
        if (groups[i].tensors)
            printf("   %-25s %3d tensors: max abs err %-9.3g (%s), max rel err %-9.3g (%s), %.2f of the tolerance\n",
                   group_name[i], groups[i].tensors, groups[i].max_abs, groups[i].max_abs > 0 ? groups[i].worst_abs : "-",
                   groups[i].max_rel, groups[i].max_rel > 0 ? groups[i].worst_rel : "-", groups[i].max_use);
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
