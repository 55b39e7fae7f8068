/* ============================================================================================
   >>moe:router_ec  expert choice (Zhou et al. 2022, arXiv 2202.09368)
   ============================================================================================
   The experts choose: p = softmax(z) over the experts; expert e takes the C = ceil(c T / E)
   tokens (capacity factor c = ec_capacity_factor, or top_k when 0) with the largest p_te (ties to the lower token index), weight p_te. Every expert is
   full, a token may get any number of experts (none, too). NOT CAUSAL: a token's experts
   depend on the other tokens of the batch, so a model with it cannot generate. The forward
   is the linear router's; the backward is the full softmax's (>>moe:router_topk). */

typedef struct moe_scored_token {
    float score;
    int index;
} moe_scored_token;

typedef struct moe_router_ec {
    moe_scored_token *ranked; /* (T) one expert's tokens, ranked by probability        */
    int *chosen;              /* (T) the C tokens it keeps, back in token order        */
} moe_router_ec;

/* @implementation */
/* ============================================================================================
   >>moe:router_ec
   ============================================================================================ */

static int moe__ec_alloc(moe_layer *L) {
    return MOE__ALLOC(L->ec.ranked, L->max_tokens, moe_scored_token) && MOE__ALLOC(L->ec.chosen, L->max_tokens, int);
}

static void moe__ec_free(moe_layer *L) {
    MOE_FREE(L->ec.ranked);
    MOE_FREE(L->ec.chosen);
    L->ec.ranked = NULL;
    L->ec.chosen = NULL;
}

/* larger score first, ties to the lower token index (the probabilities are finite: the
   forward refused non-finite logits) */
static int moe__scored_cmp(const void *pa, const void *pb) {
    const moe_scored_token *a = (const moe_scored_token *)pa, *b = (const moe_scored_token *)pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

/* each expert's C best tokens, in token order; gates and picks (C per expert) */
static int moe__ec_assign(moe_layer *L, int T) {
    int E = L->cfg.n_experts, K = L->cfg.top_k, n = 0, t, s, e;
    int C = L->cfg.ec_capacity_factor > 0.0f ? (int)ceil((double)L->cfg.ec_capacity_factor * T / E)
                                             : (int)(((long long)K * T + E - 1) / E);
    moe_scored_token *sc = L->ec.ranked;
    int *chosen = L->ec.chosen;
    if (C > T) C = T;
    for (e = 0; e < E; e++) {
        for (t = 0; t < T; t++) {
            sc[t].score = L->probs[(size_t)t * E + e];
            sc[t].index = t;
        }
        qsort(sc, (size_t)T, sizeof *sc, moe__scored_cmp);
        for (s = 0; s < C; s++) chosen[s] = sc[s].index;
        qsort(chosen, (size_t)C, sizeof(int), moe__int_cmp);
        for (s = 0; s < C; s++) {
            float p = L->probs[(size_t)chosen[s] * E + e];
            L->raw_token[n] = chosen[s]; L->raw_expert[n] = e; L->raw_slot[n] = e; L->raw_weight[n] = p;
            L->gates[(size_t)chosen[s] * E + e] = p;
            n++;
        }
        L->aux.picks[e] = (float)C;
    }
    return n;
}
