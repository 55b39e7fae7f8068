/* ============================================================================================
   >>moe:router_gw  GW-MoE: uncertain tokens broadcast to every expert while fine-tuning
                    (Wu et al. 2024, "GW-MoE: Resolving Uncertainty in MoE Router with Global
                    Workspace Theory", arXiv 2406.12375)
   ============================================================================================
   An extension of softmax top-k. While the call's gw_active flag is set (moe_layer_args;
   fine-tuning), a token whose routing entropy u = -sum_i p_i ln(p_i + 1e-5) (the released
   code's form; divided by ln E when gw_normalized) is >= gw_threshold is uncertain: it goes to
   ALL experts with the full softmax as weights, outside capacity and outside the drop
   accounting. gw_slots > 0 keeps only the first gw_slots uncertain tokens of each sequence
   (seq_len tokens each). gw_released = 1 reproduces the released code instead: an uncertain
   token skips the experts and outputs p_{E-1} * x (its "bypass"). Off (evaluation and
   inference), the layer is its plain top-k. */

typedef struct moe_router_gw {
    int *uncertain;   /* (T) 1 when the token was broadcast to every expert                   */
    float *bypass;    /* (T) released-code emulation: y += bypass * x, bypass = p_{E-1}       */
    float *d_bypass;  /* (T) backward: dLoss/d bypass, a gradient of the gate p_{E-1}         */
} moe_router_gw;

/* @implementation */
/* ============================================================================================
   >>moe:router_gw
   ============================================================================================ */

static int moe__gw_alloc(moe_layer *L) {
    return MOE__ALLOC(L->gw.uncertain, L->max_tokens, int) && MOE__ALLOC(L->gw.bypass, L->max_tokens, float) &&
           MOE__ALLOC(L->gw.d_bypass, L->max_tokens, float);
}

static void moe__gw_free(moe_layer *L) {
    MOE_FREE(L->gw.uncertain); MOE_FREE(L->gw.bypass); MOE_FREE(L->gw.d_bypass);
    L->gw.uncertain = NULL;
    L->gw.bypass = L->gw.d_bypass = NULL;
}

/* marks the uncertain tokens (serial: the slot cap counts in sequence order) and gives them
   the full softmax as gates (paper) or a bypass weight (released code) */
static void moe__gw_mark(moe_layer *L, int T, const moe_layer_args *a) {
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, t, e, used = 0, seq = a->seq_len > 0 ? a->seq_len : T;
    double norm = c->gw_normalized ? log((double)E) : 1.0;
    L->stats.broadcast = 0;
    for (t = 0; t < T; t++) {
        const float *p = L->probs + (size_t)t * E;
        double u = 0.0;
        L->gw.uncertain[t] = 0;
        L->gw.bypass[t] = 0.0f;
        if (!a->gw_active || c->gw_threshold <= 0.0f) continue;
        if (t % seq == 0) used = 0;
        for (e = 0; e < E; e++) u -= (double)p[e] * log((double)p[e] + 1e-5);
        if (u / norm < c->gw_threshold || (c->gw_slots > 0 && used >= c->gw_slots)) continue;
        used++;
        L->gw.uncertain[t] = 1;
        L->stats.broadcast++;
        if (c->gw_released) {
            memset(L->gates + (size_t)t * E, 0, sizeof(float) * (size_t)E);
            L->gw.bypass[t] = p[E - 1];
        } else {
            memcpy(L->gates + (size_t)t * E, p, sizeof(float) * (size_t)E);
        }
    }
}

/* an uncertain token's assignments: every expert, in expert order, slot = expert (none for
   the released code's bypass); returns the list's new length */
static int moe__gw_assign_token(moe_layer *L, int t, int n) {
    int E = L->cfg.n_experts, e;
    if (L->cfg.gw_released) return n;
    for (e = 0; e < E; e++) {
        L->raw_token[n] = t; L->raw_expert[n] = e; L->raw_slot[n] = e; L->raw_weight[n] = L->gates[(size_t)t * E + e];
        n++;
    }
    return n;
}

/* released code: y += p_{E-1} x for the uncertain tokens */
static void moe__gw_output_forward(moe_layer *L, float *y, const float *x, int T) {
    int d = L->cfg.d, t, j;
    if (L->stats.broadcast == 0) return;
    for (t = 0; t < T; t++)
        if (L->gw.bypass[t] != 0.0f)
            for (j = 0; j < d; j++) y[(size_t)t * d + j] += L->gw.bypass[t] * x[(size_t)t * d + j];
}

/* its backward: dx += bypass * dy; d_bypass = <dy, x> */
static void moe__gw_output_backward(moe_layer *L, float *dx, const float *dy, const float *x) {
    int d = L->cfg.d, t, j;
    if (L->stats.broadcast == 0) return;
    for (t = 0; t < L->T; t++)
        if (L->gw.uncertain[t]) {
            const float *g = dy + (size_t)t * d, *xt = x + (size_t)t * d;
            float dot = 0.0f;
            for (j = 0; j < d; j++) {
                dot += g[j] * xt[j];
                dx[(size_t)t * d + j] += L->gw.bypass[t] * g[j];
            }
            L->gw.d_bypass[t] = dot;
        }
}

/* an uncertain token's gates are the full softmax (or p_{E-1} alone): its backward */
static void moe__gw_backward_token(moe_layer *L, int t) { moe__softmax_backward_token(L, t); }
