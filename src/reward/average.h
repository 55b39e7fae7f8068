/* ============================================================================================
   >>rwd:average  model averaging against the alignment tax: MA, part-wise, HMA
   ============================================================================================
   Lin et al., "Mitigating the Alignment Tax of RLHF", arXiv 2309.06256 (EMNLP 2024); official
   code github.com/avalonstrel/Mitigating-the-Alignment-Tax-of-RLHF (scripts/postprocess/
   weight_interpolation.py, weight_mask_merge.py; src/lmflow/pipeline/utils/mask_trainer.py).
   Interpolation between the model before alignment (pre) and after it (post), as WiSE-FT
   (Wortsman et al., arXiv 2109.01903) interpolates a fine-tuned model with its start:

       theta(lambda) = (1 - lambda) theta_pre + lambda theta_post,   lambda in [0, 1]

   lambda = 0 is the pre-alignment model, 1 the aligned one. The official code's ratio is the
   weight of the PRE model, 1 - lambda here (its init_val 0.2 is lambda = 0.8).

   Part-wise averaging (the paper's analysis): blocks of layers split at pivots
   (rwd_block_map: a pivot layer closes its block) each with its own lambda. The official
   script gives layers their block's ratio (norms inside a layer too), the token embedding the
   first block's, the final norm and lm_head the global one; here every tensor outside the
   layers gets lambda_outside (moe.h's model ties its head to the embedding "wte"). For another
   assignment, rwd_average_tensors takes one lambda per tensor.

   HMA, heterogeneous model averaging: K blocks, free parameters a_k, a floor eps, and the
   pre-model share rho_k given by a normalised sigmoid whose mean is held EXACTLY at
   rho = 1 - mean, so only the distribution of averaging over depth is learned:

       rho_k = rho K (sigmoid(a_k) + eps) / S,   S = sum_j (sigmoid(a_j) + eps),
       lambda_k = 1 - rho_k,   (1/K) sum_k lambda_k = mean for every a.

   As the official code, the sigmoid parametrises the share of the pre model (its ratio); with
   K blocks a ratio can exceed 1 (rho K (1 + eps) / (1 + eps + (K - 1) eps) at most): the
   formula is kept exact, no clamp, as there.
   dlambda_k/da_j = -rho K sigmoid'(a_j) (delta_kj S - (sigmoid(a_k) + eps)) / S^2.
   Search: minimise J(a) = L(theta(a)) + gamma sum_k c_k |lambda_k - mean| (or squared), L the
   merged model's loss on the aligned model's own selected samples (a callback; the official
   code trains only the a_k with AdamW, both models frozen, for one epoch of next-token
   cross-entropy on the samples RSF kept), c_k = the number of tensors following block k (the
   official regulariser sums over linear modules, so each block counts once per module).
   Defaults of the official run script: ratio 0.2 (mean 0.8 here), eps 0.2, gamma 1e-4, lr 2e-5.
   Which tensors follow a block's ratio (rwd_hma_follow):
     FOLLOW_LINEAR (official): the linear maps of the layers (weights and biases: attention,
       FFN, routers, experts); norms and embeddings (rwd_tensor_is_norm_or_embedding) and every
       tensor outside the layers are taken from the pre-alignment model unchanged. The official
       lm_head (untied there) gets the mean ratio; moe.h's head is the embedding wte, so here it
       comes from pre.
     FOLLOW_ALL: every tensor of a layer follows its block, everything else the mean.
   Where the official code differs from the parametrisation implemented here: its training
   wrapper puts a bf16 copy of a_k, taken when the model is wrapped, in the numerator, so only
   the denominator S follows the training (its final merge uses the trained a_k in both); its
   default regulariser also weighs module m by 25 / (|layer(m) - 13| + 1), a choice for a
   26-layer model (pass reg_weight for that); its "block3" with <= 30 layers cuts at layers 8
   and 16 (2 blocks for L <= 16): give pivots instead.
   Black-box alternative for tiny models: a grid of lambda vectors with the mean fixed, each
   merged model scored by two callbacks (reward: higher is better; tax: lower is better, e.g.
   bits per byte on the pre-training text), and the Pareto front of the two.

   The destination is a store of its own (never pre or post); on bad input it is unchanged. */

/* dst = (1 - lambda) pre + lambda post, every tensor; lambda in [0, 1] */
RWDDEF moe_status rwd_average(moe_store *dst, const moe_store *pre, const moe_store *post, double lambda,
                              moe_err *err);
/* lambdas (n_pivots + 1): block b's lambda; tensors outside every layer use lambda_outside */
RWDDEF moe_status rwd_average_partwise(moe_store *dst, const moe_store *pre, const moe_store *post,
                                       const int *pivots, int n_pivots, const double *lambdas,
                                       double lambda_outside, moe_err *err);
/* lambda (table count): one lambda per tensor, each in [0, 1] */
RWDDEF moe_status rwd_average_tensors(moe_store *dst, const moe_store *pre, const moe_store *post,
                                      const double *lambda, moe_err *err);

typedef enum rwd_hma_follow { RWD_HMA_FOLLOW_LINEAR = 0, RWD_HMA_FOLLOW_ALL = 1 } rwd_hma_follow;
typedef enum rwd_hma_reg { RWD_HMA_REG_ABS = 0, RWD_HMA_REG_SQUARED = 1 } rwd_hma_reg;

typedef struct rwd_hma_config {
    double mean;               /* mean lambda over the blocks, in [0, 1]; 0.8 (official ratio 0.2) */
    double eps;                /* floor inside the normalised sigmoid, >= 0; 0.2                 */
    double gamma;              /* regulariser weight, >= 0; 1e-4                                 */
    rwd_hma_reg reg;           /* |lambda_k - mean| (official default) or its square; ABS        */
    const double *reg_weight;  /* (K) c_k, or NULL: tensors following block k                    */
    rwd_hma_follow follow;     /* FOLLOW_LINEAR                                                  */
    int steps;                 /* search: AdamW steps (one loss callback each); 50               */
    float lr;                  /* search: learning rate; 0.05 (the official 2e-5 is for a 3B
                                  model's thousands of steps)                                    */
    double grid_step;          /* grid search: spacing of the lambda values; 0.1                 */
} rwd_hma_config;

/* The merged model's loss and its gradient: *loss = L(merged); grad (numel, zeroed before the
   call) = dL/dparams in the table's layout. A status other than MOE_OK stops the search. */
typedef moe_status (*rwd_loss_fn)(double *loss, float *grad, const moe_store *merged, void *user);
/* One number about a merged model (reward, tax) */
typedef moe_status (*rwd_score_fn)(double *score, const moe_store *merged, void *user);

RWDDEF rwd_hma_config rwd_hma_config_default(void);
/* lambdas (K) from a (K) */
RWDDEF void rwd_hma_ratios(double *lambdas, const double *a, int K, double mean, double eps);
/* da (K) += dlambdas . dlambda/da */
RWDDEF void rwd_hma_ratios_backward(double *da, const double *dlambdas, const double *a, int K,
                                    double mean, double eps);
/* gamma sum_k c_k |lambda_k - mean| (or squared); dlambdas (K, may be NULL) += its gradient
   (the gradient of |x| at 0 is 0); weight NULL: c_k = 1 */
RWDDEF double rwd_hma_regularizer(double *dlambdas, const double *lambdas, const double *weight, int K,
                                  double mean, double gamma, rwd_hma_reg reg);
/* lam (table count): the lambda each tensor gets from the block lambdas (K) */
RWDDEF void rwd_hma_tensor_lambdas(double *lam, const moe_store *s, const int *block, const double *lambdas,
                                   double mean, rwd_hma_follow follow);
/* dst = the HMA merge of block lambdas (K) (any real values: HMA's may leave [0, 1]) */
RWDDEF moe_status rwd_hma_merge(moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                int K, const double *lambdas, const rwd_hma_config *c, moe_err *err);
/* dlambdas (K) += dL/dlambda_k = sum over the tensors following block k of grad . (post - pre) */
RWDDEF void rwd_hma_lambda_grad(double *dlambdas, const moe_store *pre, const moe_store *post, const int *block,
                                int K, rwd_hma_follow follow, const float *grad);
/* J(a) and, if grad_a (K) != NULL, dJ/da: merges into dst, calls loss with grad_buf (numel). */
RWDDEF moe_status rwd_hma_objective(double *objective, double *grad_a, moe_store *dst, float *grad_buf,
                                    const double *a, const moe_store *pre, const moe_store *post,
                                    const int *block, int K, const rwd_hma_config *c, rwd_loss_fn loss,
                                    void *user, moe_err *err);
/* The search: a_k start at logit(1 - mean) (every lambda_k = mean), c->steps AdamW steps on
   J(a); a, lambdas (K) out; trace (c->steps) = J before each step, or NULL. dst = the merge of
   the final lambdas. */
RWDDEF moe_status rwd_hma_search(double *a, double *lambdas, double *trace, moe_store *dst,
                                 const moe_store *pre, const moe_store *post, const int *block, int K,
                                 const rwd_hma_config *c, rwd_loss_fn loss, void *user, moe_err *err);
/* Points of the grid: lambda_k = mean + j_k step in [0, 1], integers j_k summing to 0 (so the
   mean is held); -1 for bad arguments or more than 10^7 points. */
RWDDEF long rwd_hma_grid_size(int K, double mean, double step);
/* Scores every grid point (first block slowest): lambdas (cap, K), reward, tax, on_front
   (cap): 1 where no other point has reward >= and tax <= with one strict. *n_points = the
   grid size; cap must hold it (checked before anything is evaluated). dst: the last merge. */
RWDDEF moe_status rwd_hma_grid(double *lambdas, double *reward, double *tax, int *on_front, long *n_points,
                               long cap, moe_store *dst, const moe_store *pre, const moe_store *post,
                               const int *block, int K, const rwd_hma_config *c, rwd_score_fn reward_fn,
                               void *reward_user, rwd_score_fn tax_fn, void *tax_user, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:average
   ============================================================================================ */

static moe_status rwd__average_check(const moe_store *dst, const moe_store *pre, const moe_store *post, moe_err *err) {
    if (!dst || !dst->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the destination is missing or not allocated");
    if (!pre || !pre->params || !post || !post->params)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the pre- or post-alignment model is missing or not allocated");
    if (pre == dst || post == dst || pre->params == dst->params || post->params == dst->params)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: the destination is the %s-alignment model; average into a store of its own",
                           (pre == dst || pre->params == dst->params) ? "pre" : "post");
    if (rwd_store_same_layout(dst, pre, "the pre-alignment model", err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    if (rwd_store_same_layout(dst, post, "the post-alignment model", err) != MOE_OK) return err ? err->status : MOE_ERR_SHAPE;
    return MOE_OK;
}

/* dst = (1 - lam_t) pre + lam_t post per tensor (checked before) */
static void rwd__interpolate(moe_store *dst, const moe_store *pre, const moe_store *post, const double *lam) {
    int t;
    for (t = 0; t < dst->count; t++) {
        size_t i, off = dst->tensors[t].offset, n = dst->tensors[t].numel;
        double l = lam[t], k = 1.0 - l;
        float *o = dst->params + off;
        const float *a = pre->params + off, *b = post->params + off;
        if (l == 0.0) memcpy(o, a, n * sizeof(float));
        else if (l == 1.0) memcpy(o, b, n * sizeof(float));
        else
            for (i = 0; i < n; i++) o[i] = (float)(k * a[i] + l * b[i]);
    }
}

static int rwd__in_unit(double x) { return x >= 0.0 && x <= 1.0; } /* false for NaN */

RWD__IMPL moe_status rwd_average_tensors(moe_store *dst, const moe_store *pre, const moe_store *post,
                                         const double *lambda, moe_err *err) {
    int t;
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambda) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: no lambdas");
    for (t = 0; t < dst->count; t++)
        if (!rwd__in_unit(lambda[t]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: lambda %g of tensor '%s' is outside [0, 1]", lambda[t], dst->tensors[t].name);
    rwd__interpolate(dst, pre, post, lambda);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_average(moe_store *dst, const moe_store *pre, const moe_store *post, double lambda,
                                 moe_err *err) {
    double *lam;
    int t;
    moe_status st;
    if (!rwd__in_unit(lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "averaging: lambda %g is outside [0, 1]", lambda);
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "averaging: out of memory");
    for (t = 0; t < dst->count; t++) lam[t] = lambda;
    st = rwd_average_tensors(dst, pre, post, lam, err);
    MOE_FREE(lam);
    return st;
}

RWD__IMPL moe_status rwd_average_partwise(moe_store *dst, const moe_store *pre, const moe_store *post,
                                          const int *pivots, int n_pivots, const double *lambdas,
                                          double lambda_outside, moe_err *err) {
    int *block, t, K = 0, b;
    double *lam;
    moe_status st;
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas || n_pivots < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: no lambdas");
    for (b = 0; b <= n_pivots; b++)
        if (!rwd__in_unit(lambdas[b])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: lambda %g of block %d is outside [0, 1]", lambdas[b], b);
    if (!rwd__in_unit(lambda_outside)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "part-wise averaging: lambda %g outside the layers is outside [0, 1]", lambda_outside);
    block = (int *)moe__calloc((size_t)dst->count, sizeof(int));
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!block || !lam) {
        MOE_FREE(block); MOE_FREE(lam);
        return moe_err_set(err, MOE_ERR_NOMEM, "part-wise averaging: out of memory");
    }
    st = rwd_block_map(block, &K, dst, pivots, n_pivots, err);
    if (st == MOE_OK) {
        for (t = 0; t < dst->count; t++) lam[t] = block[t] < 0 ? lambda_outside : lambdas[block[t]];
        rwd__interpolate(dst, pre, post, lam);
    }
    MOE_FREE(block); MOE_FREE(lam);
    return st;
}

RWD__IMPL rwd_hma_config rwd_hma_config_default(void) {
    rwd_hma_config c;
    memset(&c, 0, sizeof c);
    c.mean = 0.8;
    c.eps = 0.2;
    c.gamma = 1e-4;
    c.reg = RWD_HMA_REG_ABS;
    c.reg_weight = NULL;
    c.follow = RWD_HMA_FOLLOW_LINEAR;
    c.steps = 50;
    c.lr = 0.05f;
    c.grid_step = 0.1;
    return c;
}

static double rwd__sigmoid(double a) { return a >= 0 ? 1.0 / (1.0 + exp(-a)) : exp(a) / (1.0 + exp(a)); }

RWD__IMPL void rwd_hma_ratios(double *lambdas, const double *a, int K, double mean, double eps) {
    double S = 0.0, rho = 1.0 - mean;
    int k;
    for (k = 0; k < K; k++) S += rwd__sigmoid(a[k]) + eps;
    for (k = 0; k < K; k++) lambdas[k] = 1.0 - rho * K * (rwd__sigmoid(a[k]) + eps) / S;
}

RWD__IMPL void rwd_hma_ratios_backward(double *da, const double *dlambdas, const double *a, int K,
                                       double mean, double eps) {
    double S = 0.0, dot = 0.0, rho = 1.0 - mean;
    int k;
    for (k = 0; k < K; k++) {
        double u = rwd__sigmoid(a[k]) + eps;
        S += u;
        dot += dlambdas[k] * u;
    }
    for (k = 0; k < K; k++) {
        double s = rwd__sigmoid(a[k]);
        da[k] += -rho * K * s * (1.0 - s) / S * (dlambdas[k] - dot / S);
    }
}

RWD__IMPL double rwd_hma_regularizer(double *dlambdas, const double *lambdas, const double *weight, int K,
                                     double mean, double gamma, rwd_hma_reg reg) {
    double r = 0.0;
    int k;
    for (k = 0; k < K; k++) {
        double c = weight ? weight[k] : 1.0, x = lambdas[k] - mean;
        if (reg == RWD_HMA_REG_SQUARED) {
            r += gamma * c * x * x;
            if (dlambdas) dlambdas[k] += 2.0 * gamma * c * x;
        } else {
            r += gamma * c * fabs(x);
            if (dlambdas) dlambdas[k] += gamma * c * (double)((x > 0) - (x < 0));
        }
    }
    return r;
}

/* the block whose lambda tensor t follows, -1 = none (pre under FOLLOW_LINEAR, mean under ALL) */
static int rwd__hma_follows(const moe_store *s, const int *block, int t, rwd_hma_follow follow) {
    if (block[t] < 0) return -1;
    if (follow == RWD_HMA_FOLLOW_LINEAR && rwd_tensor_is_norm_or_embedding(s->tensors[t].name)) return -1;
    return block[t];
}

RWD__IMPL void rwd_hma_tensor_lambdas(double *lam, const moe_store *s, const int *block, const double *lambdas,
                                      double mean, rwd_hma_follow follow) {
    int t;
    for (t = 0; t < s->count; t++) {
        int b = rwd__hma_follows(s, block, t, follow);
        lam[t] = b >= 0 ? lambdas[b] : follow == RWD_HMA_FOLLOW_ALL ? mean : 0.0;
    }
}

static moe_status rwd__hma_check(const moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                 int K, const rwd_hma_config *c, moe_err *err) {
    int t;
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: no config");
    if (rwd__average_check(dst, pre, post, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!rwd__in_unit(c->mean)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: mean lambda %g is outside [0, 1]", c->mean);
    if (!(c->eps >= 0.0) || !(c->gamma >= 0.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: eps %g and gamma %g must be >= 0", c->eps, c->gamma);
    if (c->follow != RWD_HMA_FOLLOW_LINEAR && c->follow != RWD_HMA_FOLLOW_ALL) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: unknown follow rule %d", (int)c->follow);
    if (K < 1 || !block) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: %d blocks or no block map", K);
    for (t = 0; t < dst->count; t++)
        if (block[t] < -1 || block[t] >= K)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: tensor '%s' is in block %d, not in [-1, %d)", dst->tensors[t].name, block[t], K);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_hma_merge(moe_store *dst, const moe_store *pre, const moe_store *post, const int *block,
                                   int K, const double *lambdas, const rwd_hma_config *c, moe_err *err) {
    double *lam;
    int k;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: no lambdas");
    for (k = 0; k < K; k++)
        if (!(fabs(lambdas[k]) < 1e300)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA: lambda %d is not finite", k);
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "HMA: out of memory");
    rwd_hma_tensor_lambdas(lam, dst, block, lambdas, c->mean, c->follow);
    rwd__interpolate(dst, pre, post, lam);
    MOE_FREE(lam);
    return MOE_OK;
}

RWD__IMPL void rwd_hma_lambda_grad(double *dlambdas, const moe_store *pre, const moe_store *post, const int *block,
                                   int K, rwd_hma_follow follow, const float *grad) {
    int t;
    (void)K;
    for (t = 0; t < pre->count; t++) {
        int b = rwd__hma_follows(pre, block, t, follow);
        size_t i, off = pre->tensors[t].offset, n = pre->tensors[t].numel;
        double acc = 0.0;
        if (b < 0) continue;
        for (i = 0; i < n; i++) acc += (double)grad[off + i] * ((double)post->params[off + i] - (double)pre->params[off + i]);
        dlambdas[b] += acc;
    }
}

/* c_k: the caller's, or the number of tensors following block k */
static void rwd__hma_reg_weight(double *w, const moe_store *s, const int *block, int K, const rwd_hma_config *c) {
    int t, k;
    for (k = 0; k < K; k++) w[k] = c->reg_weight ? c->reg_weight[k] : 0.0;
    if (!c->reg_weight)
        for (t = 0; t < s->count; t++) {
            int b = rwd__hma_follows(s, block, t, c->follow);
            if (b >= 0) w[b] += 1.0;
        }
}

RWD__IMPL moe_status rwd_hma_objective(double *objective, double *grad_a, moe_store *dst, float *grad_buf,
                                       const double *a, const moe_store *pre, const moe_store *post,
                                       const int *block, int K, const rwd_hma_config *c, rwd_loss_fn loss,
                                       void *user, moe_err *err) {
    double *lam, *dlam, *cw, L = 0.0;
    moe_status st;
    int k;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!objective || !a || !loss || !grad_buf) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA objective: missing argument");
    lam = (double *)moe__calloc(3 * (size_t)K, sizeof(double));
    if (!lam) return moe_err_set(err, MOE_ERR_NOMEM, "HMA: out of memory");
    dlam = lam + K; cw = dlam + K;
    rwd_hma_ratios(lam, a, K, c->mean, c->eps);
    st = rwd_hma_merge(dst, pre, post, block, K, lam, c, err);
    if (st == MOE_OK) {
        memset(grad_buf, 0, dst->numel * sizeof(float));
        st = loss(&L, grad_buf, dst, user);
        if (st != MOE_OK) moe_err_set(err, st, "HMA: the loss callback failed (%s)", moe_status_string(st));
    }
    if (st == MOE_OK) {
        rwd__hma_reg_weight(cw, dst, block, K, c);
        *objective = L + rwd_hma_regularizer(dlam, lam, cw, K, c->mean, c->gamma, c->reg);
        if (grad_a) {
            rwd_hma_lambda_grad(dlam, pre, post, block, K, c->follow, grad_buf);
            for (k = 0; k < K; k++) grad_a[k] = 0.0;
            rwd_hma_ratios_backward(grad_a, dlam, a, K, c->mean, c->eps);
        }
    }
    MOE_FREE(lam);
    return st;
}

RWD__IMPL moe_status rwd_hma_search(double *a, double *lambdas, double *trace, moe_store *dst,
                                    const moe_store *pre, const moe_store *post, const int *block, int K,
                                    const rwd_hma_config *c, rwd_loss_fn loss, void *user, moe_err *err) {
    moe_store A; /* the K parameters with their AdamW moments: moe.h's one optimizer */
    moe_adamw_config ac = moe_adamw_config_default();
    float *grad_buf;
    double *ad, *ga, J = 0.0, rho;
    moe_status st = MOE_OK;
    int k, step;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!a || !lambdas || !loss || c->steps < 0 || !(c->lr >= 0.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA search: missing output or callback, or negative steps / learning rate");
    moe_store_init(&A);
    if (moe_store_add(&A, "hma.a", 0, K, 0, 0, 0) < 0 || moe_store_alloc(&A, 1) != MOE_OK) {
        moe_store_free(&A);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA search: out of memory");
    }
    grad_buf = (float *)moe__calloc(dst->numel, sizeof(float));
    ad = (double *)moe__calloc(2 * (size_t)K, sizeof(double));
    if (!grad_buf || !ad) {
        MOE_FREE(grad_buf); MOE_FREE(ad); moe_store_free(&A);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA search: out of memory for %zu gradients", dst->numel);
    }
    ga = ad + K;
    ac.weight_decay = 0.0f;
    /* every a_k equal gives lambda_k = mean; logit(rho) is the official starting value */
    rho = 1.0 - c->mean;
    rho = rho < 1e-6 ? 1e-6 : rho > 1.0 - 1e-6 ? 1.0 - 1e-6 : rho;
    for (k = 0; k < K; k++) A.params[k] = (float)log(rho / (1.0 - rho));
    for (step = 1; step <= c->steps && st == MOE_OK; step++) {
        for (k = 0; k < K; k++) ad[k] = A.params[k];
        st = rwd_hma_objective(&J, ga, dst, grad_buf, ad, pre, post, block, K, c, loss, user, err);
        if (st != MOE_OK) break;
        if (trace) trace[step - 1] = J;
        for (k = 0; k < K; k++) A.grads[k] = (float)ga[k];
        st = moe_adamw_step(&A, &ac, c->lr, step);
        if (st != MOE_OK) moe_err_set(err, st, "HMA search: %s", A.err.msg);
    }
    if (st == MOE_OK) {
        for (k = 0; k < K; k++) a[k] = ad[k] = A.params[k];
        rwd_hma_ratios(lambdas, ad, K, c->mean, c->eps);
        st = rwd_hma_merge(dst, pre, post, block, K, lambdas, c, err);
    }
    MOE_FREE(grad_buf); MOE_FREE(ad); moe_store_free(&A);
    return st;
}

/* j range of the grid values mean + j step inside [0, 1] */
static void rwd__grid_range(long *jmin, long *jmax, double mean, double step) {
    *jmin = (long)ceil(-mean / step - 1e-9);
    *jmax = (long)floor((1.0 - mean) / step + 1e-9);
}

/* visits the grid (first block slowest); visit NULL counts; returns the count or -1 */
static long rwd__grid_walk(int K, double mean, double step, long *j, long limit,
                          int (*visit)(const long *j, void *u), void *u) {
    long jmin, jmax, n = 0, last;
    int k;
    if (K < 1 || !rwd__in_unit(mean) || !(step > 0.0) || step > 1.0) return -1;
    rwd__grid_range(&jmin, &jmax, mean, step);
    {   /* the walk visits (jmax - jmin + 1)^(K - 1) candidates: refuse an endless one */
        double visits = 1.0;
        for (k = 0; k + 1 < K; k++) visits *= (double)(jmax - jmin + 1);
        if (visits > 1e8) return -1;
    }
    for (k = 0; k < K; k++) j[k] = jmin;
    for (;;) {
        last = 0;
        for (k = 0; k + 1 < K; k++) last -= j[k];
        if (last >= jmin && last <= jmax) {
            j[K - 1] = last;
            if (++n > limit) return -1;
            if (visit && visit(j, u)) return -1;
        }
        for (k = K - 2; k >= 0; k--) { /* odometer over the first K - 1 blocks */
            if (++j[k] <= jmax) break;
            j[k] = jmin;
        }
        if (k < 0) break;
    }
    return n;
}

RWD__IMPL long rwd_hma_grid_size(int K, double mean, double step) {
    long *j, n;
    if (K < 1 || K > 64) return -1;
    j = (long *)moe__calloc((size_t)K, sizeof(long));
    if (!j) return -1;
    n = rwd__grid_walk(K, mean, step, j, 10000000L, NULL, NULL);
    MOE_FREE(j);
    return n;
}

/* on_front (n) = 1 for the points no other point dominates (higher reward, lower tax):
   rwd_pareto_front (>>rwd:dpa) on the points (reward, -tax) */
static moe_status rwd__reward_tax_front(int *on_front, const double *reward, const double *tax, long n, moe_err *err) {
    double *pts = (double *)moe__calloc((size_t)n * 2, sizeof(double));
    size_t *idx = (size_t *)moe__calloc((size_t)n, sizeof(size_t)), m = 0, i;
    moe_status st;
    if (!pts || !idx) {
        MOE_FREE(pts); MOE_FREE(idx);
        return moe_err_set(err, MOE_ERR_NOMEM, "HMA grid: out of memory for the Pareto front");
    }
    for (i = 0; i < (size_t)n; i++) {
        pts[2 * i] = reward[i];
        pts[2 * i + 1] = -tax[i];
        on_front[i] = 0;
    }
    st = rwd_pareto_front(idx, &m, pts, (size_t)n, 2, err);
    for (i = 0; st == MOE_OK && i < m; i++) on_front[idx[i]] = 1;
    MOE_FREE(pts); MOE_FREE(idx);
    return st;
}

typedef struct {
    double *lambdas, *lam_t, mean, step;
    int K;
    long n;
} rwd__grid_fill;

static int rwd__grid_store(const long *j, void *u) {
    rwd__grid_fill *g = (rwd__grid_fill *)u;
    int k;
    for (k = 0; k < g->K; k++) g->lambdas[(size_t)g->n * g->K + k] = g->mean + (double)j[k] * g->step;
    g->n++;
    return 0;
}

RWD__IMPL moe_status rwd_hma_grid(double *lambdas, double *reward, double *tax, int *on_front, long *n_points,
                                  long cap, moe_store *dst, const moe_store *pre, const moe_store *post,
                                  const int *block, int K, const rwd_hma_config *c, rwd_score_fn reward_fn,
                                  void *reward_user, rwd_score_fn tax_fn, void *tax_user, moe_err *err) {
    long n, p, *j;
    double *lam;
    rwd__grid_fill g;
    moe_status st = MOE_OK;
    if (rwd__hma_check(dst, pre, post, block, K, c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (!lambdas || !reward || !tax || !on_front || !n_points || !reward_fn || !tax_fn)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: missing output array or callback");
    n = rwd_hma_grid_size(K, c->mean, c->grid_step);
    *n_points = n;
    if (n < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: step %g for %d blocks gives no grid or more than 10^7 points", c->grid_step, K);
    if (n > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HMA grid: %ld points, room for %ld", n, cap);
    j = (long *)moe__calloc((size_t)K, sizeof(long));
    lam = (double *)moe__calloc((size_t)dst->count, sizeof(double));
    if (!j || !lam) { MOE_FREE(j); MOE_FREE(lam); return moe_err_set(err, MOE_ERR_NOMEM, "HMA grid: out of memory"); }
    g.lambdas = lambdas; g.lam_t = lam; g.mean = c->mean; g.step = c->grid_step; g.K = K; g.n = 0;
    rwd__grid_walk(K, c->mean, c->grid_step, j, n, rwd__grid_store, &g);
    for (p = 0; p < n && st == MOE_OK; p++) {
        rwd_hma_tensor_lambdas(lam, dst, block, lambdas + (size_t)p * K, c->mean, c->follow);
        rwd__interpolate(dst, pre, post, lam);
        st = reward_fn(&reward[p], dst, reward_user);
        if (st == MOE_OK) st = tax_fn(&tax[p], dst, tax_user);
        if (st != MOE_OK) moe_err_set(err, st, "HMA grid: a score callback failed at point %ld (%s)", p, moe_status_string(st));
    }
    if (st == MOE_OK) st = rwd__reward_tax_front(on_front, reward, tax, n, err);
    MOE_FREE(j); MOE_FREE(lam);
    return st;
}
