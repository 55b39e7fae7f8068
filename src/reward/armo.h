/* ============================================================================================
   >>rwd:armo  ArmoRM: multi-objective ridge regression, verbosity de-correlation, gating network
   ============================================================================================
   Absolute-Rating Multi-Objective Reward Model (Wang et al., arXiv 2406.12845), on feature rows
   h(x, y) (d) of responses and h_x (d_prompt) of prompts: any float rows (the hashed featurizer,
   moe.h's LM bridge, a user's embeddings).

   Stage 1 (section 3.1): one ridge regression per objective k, no intercept, on the rows whose
     target k is present (NaN = missing):  w_k = argmin sum (w.h_n - t_nk)^2 + lambda_k |w|^2.
     lambda_k as the official code chooses it: one random 80/20 split of all rows, every lambda of
     the grid {1e-4 .. 1e4} fitted on the 80%, the lowest validation MSE wins (the first on ties),
     and the final w_k is that fit (on the 80% only, as the code; not refitted on all rows).
     Rewards r(x, y) = W h (K). With fewer rows than features the ridge solution is still unique
     for lambda > 0; it is computed in the dual, w = H^T (H H^T + lambda I)^-1 t.
   Verbosity de-correlation (official stage-2 code): on the rewards V (M, K) of reference
     responses, every objective j != v starts open with p_j = 1; for each penalty of the grid
     {0, .01, .025, .05, .075, .1, .125, .15, .2, .25, ..., .95} in order, an open j whose
     Spearman(V_j - p V_v, V_v) <= 0.03 closes with p_j = p. Never closed: p_j = 1 (and p_v = 1).
     r~_j = r_j - p_j r_v, so r~_v = 0.
   Stage 2 (section 3.2): gate g(x) = beta softmax(z(h_x) / tau), z an MLP (Linear-ReLU-dropout
     x n_hidden, then Linear with bias) on the prompt's features, tau = 10, beta a learned scalar
     (1 at start); score s = g . r~. Trained with the Bradley-Terry loss -log sigmoid(s_w - s_l)
     on preference pairs: batches drawn with replacement, AdamW, cosine annealing to 0.
   Where the official code differs from the paper: its stage-2 script takes the softmax over
   dim 1 of (batch, 2, d) prompt embeddings, i.e. over the chosen/rejected pair, so every gate
   is beta/2 and only beta learns; we take it over the objectives, as the paper says. The same
   script builds r~ but trains on the raw rewards r; the released model applies r~ at
   inference. Default here: train and infer on r~ (gate_on_raw = 1 selects the script's r). */

#define RWD_RIDGE_MAX_LAMBDAS 16
#define RWD_GATE_MAX_HIDDEN 8
#define RWD_ARMO_CORR_THRESHOLD 0.03 /* stage-2 script's command-line default (its function: 0.028) */

typedef struct rwd_ridge_config {
    int n_lambdas;                          /* grid size; 9                                      */
    double lambdas[RWD_RIDGE_MAX_LAMBDAS];  /* tried in order; 1e-4, 1e-3, ..., 1e4             */
    double val_frac;                        /* validation share of the rows (ceil); 0.2          */
    uint64_t seed;                          /* the split's shuffle; 42                            */
    const unsigned char *val_mask;          /* (n) optional: 1 = validation row; overrides the
                                               random split (e.g. to use someone else's split)  */
    double fixed_lambda;                    /* > 0: no search, fit every labelled row at this
                                               lambda; 0                                         */
} rwd_ridge_config;

typedef struct rwd_ridge_report {           /* one objective of rwd_armo_regress                 */
    double lambda;                          /* the lambda used                                   */
    size_t n_train, n_val;                  /* labelled rows fitted / validated                  */
    double val_mse;                         /* at lambda (NaN with fixed_lambda)                  */
    double grid_mse[RWD_RIDGE_MAX_LAMBDAS]; /* validation MSE of every lambda of the grid        */
    int underdetermined;                    /* n_train < d: ridge still unique, solved in dual    */
    char note[192];                         /* a sentence when underdetermined, else ""          */
} rwd_ridge_report;

RWDDEF rwd_ridge_config rwd_ridge_config_default(void);
/* w (d) = argmin sum_i (x_i . w - t_i)^2 + lambda |w|^2 over the rows with a finite t_i, no
   intercept; x (n, d). Primal Cholesky when rows >= d, dual otherwise; double throughout. */
RWDDEF moe_status rwd_ridge_solve(double *w, const float *x, const double *t, size_t n, int d, double lambda,
                                  moe_err *err);
/* Stage 1: W (K, d) and one report per objective (rep may be NULL) from x (n, d) and targets
   y (n, K) with NaN for missing ratings. */
RWDDEF moe_status rwd_armo_regress(float *W, rwd_ridge_report *rep, const float *x, const double *y, size_t n,
                                   int d, int K, const rwd_ridge_config *c, moe_err *err);
/* r (rows, K) = x (rows, d) . W^T, in double */
RWDDEF void rwd_armo_rewards(double *r, const float *W, const float *x, size_t rows, int d, int K);
/* penalty (K) and corr (K, may be NULL: each objective's Spearman when it closed, else the
   lowest seen, 1 for v) from reference rewards V (M, K); v = the verbosity objective. */
RWDDEF moe_status rwd_armo_verbosity_penalties(double *penalty, double *corr, const double *V, size_t M, int K,
                                               int v, double threshold, moe_err *err);
/* out (rows, K) = r~: out_j = r_j - penalty_j r_v (out may be r); v < 0 copies */
RWDDEF void rwd_armo_transform(double *out, const double *r, const double *penalty, size_t rows, int K, int v);

/* ---- the gating network ---- */
typedef struct rwd_gate_config {
    int d_in;          /* prompt feature width (required)                                    */
    int K;             /* objectives (required)                                              */
    int n_hidden;      /* Linear-ReLU(-dropout) layers before the output layer; 3            */
    int d_hidden;      /* their width; 1024                                                  */
    float temperature; /* tau; 10                                                            */
    float logit_scale; /* beta's initial value; 1                                           */
    float dropout;     /* after every ReLU, in training only; 0.2                              */
    int max_rows;      /* rows one forward may take (activations are sized for it); 1024       */
} rwd_gate_config;

typedef struct rwd_gate {
    rwd_gate_config cfg;
    int id_w[RWD_GATE_MAX_HIDDEN + 1], id_b[RWD_GATE_MAX_HIDDEN + 1]; /* layer tensors in the store */
    int id_scale;  /* beta (1)                                                               */
    float *pre;    /* (n_hidden, max_rows, H) pre-activations                                 */
    float *post;   /* (n_hidden, max_rows, H) layer outputs after ReLU and dropout             */
    float *mask;   /* (n_hidden, max_rows, H) dropout scale (0 or 1/(1-p)) of the last forward */
    float *probs;  /* (max_rows, K) softmax(z / tau)                                          */
    float *dz;     /* (max_rows, max(H, K)) each, dz and dh: backward scratch                 */
    float *dh;
    moe_work work;    /* the matmuls' scratch for max_rows, sized at init                      */
    int last_dropout; /* the last forward used dropout                                        */
} rwd_gate;

RWDDEF rwd_gate_config rwd_gate_config_default(void);
/* declares the gate's tensors in s (prefix + "l0.w", ..., "out.w", "out.b", "logit_scale")
   before moe_store_alloc, and allocates its activations */
RWDDEF moe_status rwd_gate_init(rwd_gate *g, const rwd_gate_config *c, moe_store *s, const char *prefix, moe_err *err);
/* PyTorch nn.Linear's default: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); beta */
RWDDEF void rwd_gate_init_weights(rwd_gate *g, moe_store *s, moe_rng *rng);
RWDDEF void rwd_gate_free(rwd_gate *g);
/* gates (rows, K) = g(x (rows, d_in)), rows <= max_rows; dropout_rng NULL = evaluation */
RWDDEF void rwd_gate_forward(rwd_gate *g, const moe_store *s, float *gates, const float *x, int rows, moe_rng *dropout_rng);
/* ACCUMULATES parameter gradients into s->grads and dx (may be NULL) given dgates (rows, K);
   uses the caches of the last forward (same x, same rows) */
RWDDEF void rwd_gate_backward(rwd_gate *g, moe_store *s, float *dx, const float *dgates, const float *x, int rows);

typedef struct rwd_gate_train_config {
    int steps;          /* optimizer steps; 2000                                             */
    int batch;          /* pairs per step, drawn with replacement (<= max_rows); 1024          */
    float lr;           /* AdamW; 1e-3                                                       */
    float lr_min;       /* cosine annealing floor; 0                                         */
    float weight_decay; /* 0                                                                 */
    uint64_t seed;      /* batches and dropout; 0                                            */
} rwd_gate_train_config;

RWDDEF rwd_gate_train_config rwd_gate_train_config_default(void);
/* BT loss of the margins g(x_i) . (r_w_i - r_l_i) over pairs i: x (n, d_in) prompt rows,
   r_w, r_l (n, K) the (transformed) rewards of the chosen and rejected responses. stats: loss
   and accuracy over the last 100 steps' batches (may be NULL). */
RWDDEF moe_status rwd_gate_train(rwd_gate *g, moe_store *s, const float *x, const double *r_w, const double *r_l,
                                 size_t n, const rwd_gate_train_config *tc, rwd_train_stats *stats, moe_err *err);
/* the BT loss and its gradient dgates (B, K) (overwritten) of B pairs given their gates */
RWDDEF double rwd_gate_bt_loss(float *dgates, const float *gates, const double *r_w, const double *r_l, int B, int K,
                               int *n_correct);

/* ---- the whole model ---- */
typedef struct rwd_armo {
    int K, d, verbosity; /* objectives, response feature width, verbosity objective (-1: none) */
    float *W;            /* (K, d) stage-1 regression weights                                 */
    double *penalty;     /* (K) verbosity penalties (all 0 until fitted: r~ = r)                */
    int gate_on_raw;     /* the gate was trained on r, not r~ (the stage-2 script's variant)    */
    rwd_gate gate;       /* stage 2, in its own store                                          */
    moe_store store;
    double *scratch;     /* (max_rows, 2K) inference scratch                                  */
    float *gscratch;     /* (max_rows, K)                                                     */
} rwd_armo;

/* K objectives, d response features; gc->d_in = prompt features, gc->K is set to K */
RWDDEF moe_status rwd_armo_init(rwd_armo *m, int K, int d, int verbosity, const rwd_gate_config *gc, uint64_t seed,
                                moe_err *err);
RWDDEF void rwd_armo_free(rwd_armo *m);
RWDDEF moe_status rwd_armo_fit_regression(rwd_armo *m, rwd_ridge_report *rep, const float *x, const double *y,
                                          size_t n, const rwd_ridge_config *c, moe_err *err);
/* penalties from the rewards of M reference responses x_ref (M, d) (the paper: every chosen
   and rejected response of a preference set); corr (K) may be NULL */
RWDDEF moe_status rwd_armo_fit_verbosity(rwd_armo *m, double *corr, const float *x_ref, size_t M, double threshold,
                                         moe_err *err);
/* stage 2 on n pairs: prompt rows xp (n, d_in), responses x_w, x_l (n, d); on_raw = 1 trains
   on r as the stage-2 script does (inference then uses r too) */
RWDDEF moe_status rwd_armo_fit_gate(rwd_armo *m, const float *xp, const float *x_w, const float *x_l, size_t n,
                                    const rwd_gate_train_config *tc, int on_raw, rwd_train_stats *stats, moe_err *err);
/* per response: score (rows), rewards (rows, K) = r (raw, may be NULL), gates (rows, K) (may be
   NULL); x (rows, d) responses, xp (rows, d_in) their prompts */
RWDDEF moe_status rwd_armo_infer(rwd_armo *m, double *score, double *rewards, double *gates, const float *x,
                                 const float *xp, size_t rows, moe_err *err);
/* the rewards the gate mixes: r~ (or r with gate_on_raw), (rows, K) */
RWDDEF void rwd_armo_mixed_rewards(const rwd_armo *m, double *out, const float *x, size_t rows);

/* @implementation */
/* ============================================================================================
   >>rwd:armo
   ============================================================================================ */

RWD__IMPL rwd_ridge_config rwd_ridge_config_default(void) {
    rwd_ridge_config c;
    int i;
    memset(&c, 0, sizeof c);
    c.n_lambdas = 9;
    for (i = 0; i < 9; i++) c.lambdas[i] = pow(10.0, (double)(i - 4)); /* the official grid */
    c.val_frac = 0.2;
    c.seed = 42;
    c.val_mask = NULL;
    c.fixed_lambda = 0.0;
    return c;
}

/* dot products in double with 8 independent partial sums, added in a fixed order: the
   compiler may vectorize the lanes (no reassociation needed), and the result does not depend
   on the thread count */
static double rwd__dot(const double *a, const double *b, int n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int q = 0, l;
    for (; q + 8 <= n; q += 8)
        for (l = 0; l < 8; l++) acc[l] += a[q + l] * b[q + l];
    for (; q < n; q++) acc[0] += a[q] * b[q];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static double rwd__dotf(const float *a, const float *b, int n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int q = 0, l;
    for (; q + 8 <= n; q += 8)
        for (l = 0; l < 8; l++) acc[l] += (double)a[q + l] * (double)b[q + l];
    for (; q < n; q++) acc[0] += (double)a[q] * (double)b[q];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* In-place Cholesky A = L L^T of an (n, n) row-major SPD matrix (lower triangle used), left-
   looking in column blocks of 64: L_ij = (A_ij - sum_{k<j} L_ik L_jk) / L_jj, the sum split into
   the columns of earlier blocks (one long dot product, all rows in parallel) and those of the
   block itself. Two parallel regions per block, every element owned by one thread: the same bits
   for any thread count. Returns 0, or -1 on a non-positive pivot. */
static int rwd__cholesky(double *A, int n) {
    const int nb = 64;
    int J0;
    for (J0 = 0; J0 < n; J0 += nb) {
        int J1 = J0 + nb < n ? J0 + nb : n, i, j, bad = 0;
        if (J0 > 0) { /* (a) the earlier blocks' share, rows J0..n-1 */
            MOE_OMP_FOR_IF((double)(n - J0) * nb * J0 > 1e6)
            for (i = J0; i < n; i++) {
                double *ai = A + (size_t)i * n;
                int jj, top = i < J1 - 1 ? i : J1 - 1;
                for (jj = J0; jj <= top; jj++) ai[jj] -= rwd__dot(ai, A + (size_t)jj * n, J0);
            }
        }
        for (j = J0; j < J1 && !bad; j++) { /* (b) the diagonal block, serially */
            double *aj = A + (size_t)j * n, d = aj[j] - rwd__dot(aj + J0, aj + J0, j - J0);
            if (!(d > 0.0) || !isfinite(d)) { bad = 1; break; }
            aj[j] = sqrt(d);
            for (i = j + 1; i < J1; i++) {
                double *ai = A + (size_t)i * n;
                ai[j] = (ai[j] - rwd__dot(ai + J0, aj + J0, j - J0)) / aj[j];
            }
        }
        if (bad) return -1;
        MOE_OMP_FOR_IF((double)(n - J1) * nb * nb > 1e6)
        for (i = J1; i < n; i++) { /* (c) the rows below, within the block */
            double *ai = A + (size_t)i * n;
            int jj;
            for (jj = J0; jj < J1; jj++) {
                const double *aj = A + (size_t)jj * n;
                ai[jj] = (ai[jj] - rwd__dot(ai + J0, aj + J0, jj - J0)) / aj[jj];
            }
        }
    }
    return 0;
}

static void rwd__cholesky_solve(const double *L, int n, double *b) {
    int i, k;
    for (i = 0; i < n; i++) {
        double s = b[i];
        for (k = 0; k < i; k++) s -= L[(size_t)i * n + k] * b[k];
        b[i] = s / L[(size_t)i * n + i];
    }
    for (i = n - 1; i >= 0; i--) {
        double s = b[i];
        for (k = i + 1; k < n; k++) s -= L[(size_t)k * n + i] * b[k];
        b[i] = s / L[(size_t)i * n + i];
    }
}

/* The ridge problem of the rows idx (m) of x (., d) with targets t (stride ts), set up once
   for many lambdas: G = X^T X (d, d) and b = X^T t in the primal (m >= d), or G = X X^T (m, m)
   and b = t in the dual. Parallel over G's rows, each owned by one thread. */
typedef struct rwd__ridge {
    int dual, n;       /* the system's size: d (primal) or m (dual) */
    double *G, *b, *A, *sol, *xt; /* xt: (d, m) transposed rows for the primal Gram */
} rwd__ridge;

static void rwd__ridge_free(rwd__ridge *R) { MOE_FREE(R->G); memset(R, 0, sizeof *R); }

static moe_status rwd__ridge_setup(rwd__ridge *R, const float *x, int d, const double *t, size_t ts,
                                   const size_t *idx, size_t m, moe_err *err) {
    long long i;
    size_t n2;
    memset(R, 0, sizeof *R);
    R->dual = m < (size_t)d;
    R->n = R->dual ? (int)m : d;
    n2 = (size_t)R->n * (size_t)R->n;
    R->G = (double *)MOE_MALLOC((2 * n2 + 2 * (size_t)R->n + (R->dual ? 0 : (size_t)d * m)) * sizeof(double) + 1);
    if (!R->G) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for a ridge system of size %d", R->n);
    R->A = R->G + n2;
    R->b = R->A + n2;
    R->sol = R->b + R->n;
    R->xt = R->sol + R->n;
    if (R->dual) {
        MOE_OMP_FOR_IF(m > 64)
        for (i = 0; i < (long long)m; i++) {
            const float *xi = x + idx[i] * (size_t)d;
            size_t j;
            for (j = 0; j <= (size_t)i; j++) R->G[(size_t)i * m + j] = rwd__dotf(xi, x + idx[j] * (size_t)d, d);
            R->b[i] = t[idx[i] * ts];
        }
    } else {
        size_t r;
        for (r = 0; r < m; r++) {
            const float *xr = x + idx[r] * (size_t)d;
            int k;
            for (k = 0; k < d; k++) R->xt[(size_t)k * m + r] = (double)xr[k];
        }
        MOE_OMP_FOR_IF((double)d * d * (double)m > 1e6)
        for (i = 0; i < d; i++) {
            const double *a = R->xt + (size_t)i * m;
            size_t j, q;
            double s = 0.0;
            for (j = 0; j <= (size_t)i; j++) R->G[(size_t)i * (size_t)d + j] = rwd__dot(a, R->xt + j * m, (int)m);
            for (q = 0; q < m; q++) s += a[q] * t[idx[q] * ts];
            R->b[i] = s;
        }
    }
    return MOE_OK;
}

/* w (d) at lambda; returns -1 if the system is not positive definite in double */
static int rwd__ridge_at(rwd__ridge *R, double *w, const float *x, int d, const size_t *idx, double lambda) {
    int i, n = R->n;
    for (i = 0; i < n; i++) {
        memcpy(R->A + (size_t)i * n, R->G + (size_t)i * n, (size_t)(i + 1) * sizeof(double));
        R->A[(size_t)i * n + i] += lambda;
    }
    if (rwd__cholesky(R->A, n) != 0) return -1;
    memcpy(R->sol, R->b, (size_t)n * sizeof(double));
    rwd__cholesky_solve(R->A, n, R->sol);
    if (!R->dual) {
        memcpy(w, R->sol, (size_t)d * sizeof(double));
    } else { /* w = X^T alpha */
        int k;
        memset(w, 0, (size_t)d * sizeof(double));
        for (i = 0; i < n; i++) {
            const float *xi = x + idx[i] * (size_t)d;
            for (k = 0; k < d; k++) w[k] += R->sol[i] * (double)xi[k];
        }
    }
    return 0;
}

static moe_status rwd__check_floats(const float *x, size_t count, int d, const char *what, moe_err *err) {
    size_t i;
    for (i = 0; i < count; i++)
        if (!isfinite(x[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: row %zu, feature %zu is not finite", what, i / (size_t)d, i % (size_t)d);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_ridge_solve(double *w, const float *x, const double *t, size_t n, int d, double lambda,
                                     moe_err *err) {
    size_t *idx, m = 0, i;
    rwd__ridge R;
    moe_status st;
    if (!w || !x || !t || d < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_ridge_solve needs w, x, t and d >= 1");
    if (!(lambda > 0.0) || !isfinite(lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge needs a finite lambda > 0, got %g", lambda);
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "ridge", err)) != MOE_OK) return st;
    idx = (size_t *)MOE_MALLOC((n ? n : 1) * sizeof(size_t));
    if (!idx) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < n; i++)
        if (isfinite(t[i])) idx[m++] = i;
    if (m == 0) { MOE_FREE(idx); return moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge: no row has a target (all %zu are NaN)", n); }
    st = rwd__ridge_setup(&R, x, d, t, 1, idx, m, err);
    if (st == MOE_OK && rwd__ridge_at(&R, w, x, d, idx, lambda) != 0)
        st = moe_err_set(err, MOE_ERR_INVALID_ARG, "ridge: the system at lambda %g is not positive definite in double precision (features of huge scale?)", lambda);
    rwd__ridge_free(&R);
    MOE_FREE(idx);
    return st;
}

RWD__IMPL moe_status rwd_armo_regress(float *W, rwd_ridge_report *rep, const float *x, const double *y, size_t n,
                                      int d, int K, const rwd_ridge_config *c, moe_err *err) {
    unsigned char *val;
    size_t *tr, *va, i;
    double *w, *best;
    int k, q;
    moe_status st = MOE_OK;
    rwd_ridge_config def = rwd_ridge_config_default();
    if (!c) c = &def;
    if (!W || !x || !y || n == 0 || d < 1 || K < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_regress needs W, x (n >= 1 rows, d >= 1) and targets for K >= 1 objectives");
    if (c->fixed_lambda < 0.0 || !isfinite(c->fixed_lambda)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "fixed_lambda must be >= 0 and finite, got %g", c->fixed_lambda);
    if (c->fixed_lambda == 0.0) {
        if (c->n_lambdas < 1 || c->n_lambdas > RWD_RIDGE_MAX_LAMBDAS) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the lambda grid needs 1 .. %d values, got %d", RWD_RIDGE_MAX_LAMBDAS, c->n_lambdas);
        for (q = 0; q < c->n_lambdas; q++)
            if (!(c->lambdas[q] > 0.0) || !isfinite(c->lambdas[q])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "lambda %d of the grid is %g; every lambda must be > 0", q, c->lambdas[q]);
        if (!c->val_mask && !(c->val_frac > 0.0 && c->val_frac < 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "val_frac must be in (0, 1) to choose lambda, got %g", c->val_frac);
    }
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "stage-1 features", err)) != MOE_OK) return st;
    for (i = 0; i < n * (size_t)K; i++)
        if (isinf(y[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "target row %zu, objective %zu is infinite (NaN marks a missing rating)", i / (size_t)K, i % (size_t)K);
    val = (unsigned char *)MOE_MALLOC(n);
    tr = (size_t *)MOE_MALLOC(2 * n * sizeof(size_t));
    w = (double *)MOE_MALLOC(2 * (size_t)d * sizeof(double));
    if (!val || !tr || !w) { MOE_FREE(val); MOE_FREE(tr); MOE_FREE(w); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    va = tr + n;
    best = w + d;
    /* the one split of all rows (sklearn's train_test_split: ceil(val_frac n) validation rows) */
    memset(val, 0, n);
    if (c->fixed_lambda == 0.0) {
        if (c->val_mask) {
            for (i = 0; i < n; i++) val[i] = c->val_mask[i] != 0;
        } else {
            size_t n_test = (size_t)ceil(c->val_frac * (double)n);
            moe_rng rng;
            moe_rng_seed(&rng, c->seed);
            for (i = 0; i < n; i++) tr[i] = i;
            for (i = n - 1; i > 0; i--) {
                size_t j = (size_t)moe_rng_below(&rng, (int)(i + 1)), t = tr[i];
                tr[i] = tr[j]; tr[j] = t;
            }
            for (i = 0; i < n_test && i < n; i++) val[tr[i]] = 1;
        }
    }
    for (k = 0; k < K && st == MOE_OK; k++) {
        size_t m_tr = 0, m_va = 0;
        rwd__ridge R;
        rwd_ridge_report r;
        memset(&r, 0, sizeof r);
        for (q = 0; q < RWD_RIDGE_MAX_LAMBDAS; q++) r.grid_mse[q] = NAN;
        for (i = 0; i < n; i++) {
            if (!isfinite(y[i * (size_t)K + (size_t)k])) continue;
            if (val[i]) va[m_va++] = i;
            else tr[m_tr++] = i;
        }
        if (m_tr + m_va == 0) { st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d has no labelled rows (every one of its %zu targets is NaN)", k, n); break; }
        if (c->fixed_lambda == 0.0 && (m_tr == 0 || m_va == 0)) {
            st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: %zu labelled rows, %zu of them in the validation part: lambda cannot be chosen; give more rows or a fixed_lambda", k, m_tr + m_va, m_va);
            break;
        }
        r.n_train = m_tr;
        r.n_val = m_va;
        r.underdetermined = m_tr < (size_t)d;
        if ((st = rwd__ridge_setup(&R, x, d, y + k, (size_t)K, tr, m_tr, err)) != MOE_OK) break;
        if (c->fixed_lambda > 0.0) {
            r.lambda = c->fixed_lambda;
            r.val_mse = NAN;
            if (rwd__ridge_at(&R, best, x, d, tr, r.lambda) != 0)
                st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: the ridge system at lambda %g is not positive definite in double precision", k, r.lambda);
        } else {
            r.val_mse = INFINITY;
            for (q = 0; q < c->n_lambdas; q++) {
                double se = 0.0;
                size_t j;
                int f;
                if (rwd__ridge_at(&R, w, x, d, tr, c->lambdas[q]) != 0) { r.grid_mse[q] = INFINITY; continue; }
                for (j = 0; j < m_va; j++) {
                    const float *xr = x + va[j] * (size_t)d;
                    double p = 0.0;
                    for (f = 0; f < d; f++) p += w[f] * (double)xr[f];
                    p -= y[va[j] * (size_t)K + (size_t)k];
                    se += p * p;
                }
                r.grid_mse[q] = se / (double)m_va;
                if (r.grid_mse[q] < r.val_mse) { /* strict: the first lambda wins ties (pandas idxmin) */
                    r.val_mse = r.grid_mse[q];
                    r.lambda = c->lambdas[q];
                    memcpy(best, w, (size_t)d * sizeof(double));
                }
            }
            if (!isfinite(r.val_mse))
                st = moe_err_set(err, MOE_ERR_INVALID_ARG, "objective %d: no lambda of the grid gives a positive definite system in double precision", k);
        }
        rwd__ridge_free(&R);
        if (st != MOE_OK) break;
        for (q = 0; q < d; q++) W[(size_t)k * (size_t)d + (size_t)q] = (float)best[q];
        if (r.underdetermined)
            snprintf(r.note, sizeof r.note, "objective %d: %zu labelled training rows for %d features; ridge is still unique at lambda %g (%s)",
                     k, m_tr, d, r.lambda, c->fixed_lambda > 0.0 ? "fixed" : "chosen by validation MSE");
        if (rep) rep[k] = r;
    }
    MOE_FREE(val); MOE_FREE(tr); MOE_FREE(w);
    return st;
}

RWD__IMPL void rwd_armo_rewards(double *r, const float *W, const float *x, size_t rows, int d, int K) {
    long long i;
    MOE_OMP_FOR_IF((double)rows * d * K > 1e5)
    for (i = 0; i < (long long)rows; i++) {
        const float *xi = x + (size_t)i * (size_t)d;
        int k, f;
        for (k = 0; k < K; k++) {
            const float *wk = W + (size_t)k * (size_t)d;
            double s = 0.0;
            for (f = 0; f < d; f++) s += (double)wk[f] * (double)xi[f];
            r[(size_t)i * (size_t)K + (size_t)k] = s;
        }
    }
}

RWD__IMPL moe_status rwd_armo_verbosity_penalties(double *penalty, double *corr, const double *V, size_t M, int K,
                                                  int v, double threshold, moe_err *err) {
    static const double grid[] = {0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4,
                                  0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95};
    const int n_grid = (int)(sizeof grid / sizeof grid[0]);
    double *vv, *adj, *cr;
    unsigned char *open;
    size_t i;
    int j, q, n_open;
    if (!penalty || !V || K < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs penalties, rewards and K >= 2 objectives");
    if (v < 0 || v >= K) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the verbosity objective %d is not one of the %d objectives", v, K);
    if (M < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs >= 2 reference responses, got %zu", M);
    if (!isfinite(threshold)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the correlation threshold must be finite");
    for (i = 0; i < M * (size_t)K; i++)
        if (!isfinite(V[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "reference reward %zu, objective %zu is not finite", i / (size_t)K, i % (size_t)K);
    vv = (double *)MOE_MALLOC((2 * M + (size_t)K) * sizeof(double));
    open = (unsigned char *)MOE_MALLOC((size_t)K);
    if (!vv || !open) { MOE_FREE(vv); MOE_FREE(open); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    adj = vv + M;
    cr = adj + M;
    for (i = 0; i < M; i++) vv[i] = V[i * (size_t)K + (size_t)v];
    for (j = 0; j < K; j++) { penalty[j] = 1.0; cr[j] = 1.0; open[j] = j != v; }
    n_open = K - 1;
    for (q = 0; q < n_grid && n_open > 0; q++) {
        for (j = 0; j < K; j++) {
            double rho;
            if (!open[j]) continue;
            for (i = 0; i < M; i++) adj[i] = V[i * (size_t)K + (size_t)j] - grid[q] * vv[i];
            rho = rwd_spearman(adj, vv, M); /* NaN (a constant column) never closes, as in scipy */
            if (rho <= threshold) {
                open[j] = 0;
                n_open--;
                penalty[j] = grid[q];
                cr[j] = rho;
            } else if (rho < cr[j]) {
                cr[j] = rho;
            }
        }
    }
    if (corr) memcpy(corr, cr, (size_t)K * sizeof(double));
    MOE_FREE(vv);
    MOE_FREE(open);
    return MOE_OK;
}

RWD__IMPL void rwd_armo_transform(double *out, const double *r, const double *penalty, size_t rows, int K, int v) {
    size_t i;
    int j;
    for (i = 0; i < rows; i++) {
        const double *ri = r + i * (size_t)K;
        double *oi = out + i * (size_t)K, rv = v >= 0 ? ri[v] : 0.0;
        for (j = 0; j < K; j++) oi[j] = v >= 0 ? ri[j] - penalty[j] * rv : ri[j];
    }
}

/* ---- the gate ---- */

RWD__IMPL rwd_gate_config rwd_gate_config_default(void) {
    rwd_gate_config c;
    c.d_in = 0;
    c.K = 0;
    c.n_hidden = 3;
    c.d_hidden = 1024;
    c.temperature = 10.0f;
    c.logit_scale = 1.0f;
    c.dropout = 0.2f;
    c.max_rows = 1024;
    return c;
}

RWD__IMPL moe_status rwd_gate_init(rwd_gate *g, const rwd_gate_config *c, moe_store *s, const char *prefix, moe_err *err) {
    char name[MOE_NAME_LEN];
    int l, L, H, in;
    size_t rh, wide;
    memset(g, 0, sizeof *g);
    for (l = 0; l <= RWD_GATE_MAX_HIDDEN; l++) g->id_w[l] = g->id_b[l] = -1;
    g->id_scale = -1;
    if (!c || !s || !prefix) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_gate_init needs a config, a store and a prefix");
    if (c->d_in < 1 || c->K < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate needs d_in >= 1 and K >= 1 (got %d, %d)", c->d_in, c->K);
    if (c->n_hidden < 0 || c->n_hidden > RWD_GATE_MAX_HIDDEN || (c->n_hidden > 0 && c->d_hidden < 1))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate needs 0 .. %d hidden layers of width >= 1 (got %d of %d)", RWD_GATE_MAX_HIDDEN, c->n_hidden, c->d_hidden);
    if (!(c->temperature > 0.0f) || !isfinite(c->temperature) || !isfinite(c->logit_scale))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the gate's temperature must be > 0 and its logit scale finite (got %g, %g)", (double)c->temperature, (double)c->logit_scale);
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "dropout must be in [0, 1), got %g", (double)c->dropout);
    if (c->max_rows < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "max_rows must be >= 1, got %d", c->max_rows);
    if (strlen(prefix) + 16 > sizeof name) return moe_err_set(err, MOE_ERR_INVALID_ARG, "tensor prefix '%s' is too long", prefix);
    g->cfg = *c;
    L = c->n_hidden;
    H = L > 0 ? c->d_hidden : 0;
    if (L == 0) g->cfg.d_hidden = 0;
    in = c->d_in;
    for (l = 0; l <= L; l++) {
        int out = l < L ? H : c->K;
        if (l < L) sprintf(name, "%sl%d.w", prefix, l);
        else sprintf(name, "%sout.w", prefix);
        g->id_w[l] = moe_store_add(s, name, MOE_TENSOR_DECAY, out, in, 0, 0);
        if (l < L) sprintf(name, "%sl%d.b", prefix, l);
        else sprintf(name, "%sout.b", prefix);
        g->id_b[l] = moe_store_add(s, name, 0, out, 0, 0, 0);
        if (g->id_w[l] < 0 || g->id_b[l] < 0) return moe_err_set(err, MOE_ERR_STATE, "declaring the gate's tensors failed: %s", s->err.msg);
        in = out;
    }
    sprintf(name, "%slogit_scale", prefix);
    if ((g->id_scale = moe_store_add(s, name, 0, 1, 0, 0, 0)) < 0) return moe_err_set(err, MOE_ERR_STATE, "declaring the gate's tensors failed: %s", s->err.msg);
    rh = (size_t)c->max_rows * (size_t)H;
    wide = (size_t)c->max_rows * (size_t)(H > c->K ? H : c->K);
    g->pre = (float *)moe__calloc(3 * (size_t)L * rh + (size_t)c->max_rows * (size_t)c->K + 2 * wide, sizeof(float));
    if (!g->pre) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's activations");
    g->post = g->pre + (size_t)L * rh;
    g->mask = g->post + (size_t)L * rh;
    g->probs = g->mask + (size_t)L * rh;
    g->dz = g->probs + (size_t)c->max_rows * (size_t)c->K;
    g->dh = g->dz + wide;
    { /* one workspace for the largest of the layers' matmuls */
        int nt = moe_num_threads(), w_in = c->d_in;
        size_t need = 0, w;
        for (l = 0; l <= L; l++) {
            int out = l < L ? H : c->K;
            if ((w = moe_matmul_work_floats(c->max_rows, w_in, out, nt)) > need) need = w;
            w_in = out;
        }
        if (moe_work_alloc(&g->work, need, nt) != MOE_OK) {
            rwd_gate_free(g);
            return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's matmul scratch");
        }
    }
    return MOE_OK;
}

RWD__IMPL void rwd_gate_init_weights(rwd_gate *g, moe_store *s, moe_rng *rng) {
    int l;
    for (l = 0; l <= g->cfg.n_hidden; l++) {
        const moe_tensor *tw = &s->tensors[g->id_w[l]];
        float *w = moe_store_param(s, g->id_w[l]), *b = moe_store_param(s, g->id_b[l]);
        double bound = 1.0 / sqrt((double)tw->shape[1]);
        size_t i;
        for (i = 0; i < tw->numel; i++) w[i] = (float)(bound * (2.0 * moe_rng_uniform(rng) - 1.0));
        for (i = 0; i < (size_t)tw->shape[0]; i++) b[i] = (float)(bound * (2.0 * moe_rng_uniform(rng) - 1.0));
    }
    moe_store_param(s, g->id_scale)[0] = g->cfg.logit_scale;
}

RWD__IMPL void rwd_gate_free(rwd_gate *g) {
    MOE_FREE(g->pre);
    moe_work_free(&g->work);
    memset(g, 0, sizeof *g);
}

RWD__IMPL void rwd_gate_forward(rwd_gate *g, const moe_store *s, float *gates, const float *x, int rows, moe_rng *dropout_rng) {
    int L = g->cfg.n_hidden, H = g->cfg.d_hidden, K = g->cfg.K, l;
    size_t rh = (size_t)rows * (size_t)H, stride = (size_t)g->cfg.max_rows * (size_t)H, i;
    const float *in = x;
    int in_w = g->cfg.d_in;
    float p = g->cfg.dropout, keep = 1.0f / (1.0f - p), beta = moe_store_param(s, g->id_scale)[0];
    float inv_t = 1.0f / g->cfg.temperature;
    MOE_ASSERT(rows <= g->cfg.max_rows);
    g->last_dropout = dropout_rng != NULL && p > 0.0f;
    for (l = 0; l < L; l++) {
        float *pre = g->pre + (size_t)l * stride, *post = g->post + (size_t)l * stride, *mask = g->mask + (size_t)l * stride;
        moe_matmul_forward(pre, in, moe_store_param(s, g->id_w[l]), moe_store_param(s, g->id_b[l]), rows, in_w, H, &g->work);
        for (i = 0; i < rh; i++) {
            float m = 1.0f;
            if (g->last_dropout) m = moe_rng_uniform(dropout_rng) < p ? 0.0f : keep; /* serial: one stream */
            mask[i] = m;
            post[i] = (pre[i] > 0.0f ? pre[i] : 0.0f) * m;
        }
        in = post;
        in_w = H;
    }
    moe_matmul_forward(g->dz, in, moe_store_param(s, g->id_w[L]), moe_store_param(s, g->id_b[L]), rows, in_w, K, &g->work);
    for (i = 0; i < (size_t)rows * (size_t)K; i++) g->dz[i] *= inv_t; /* z / tau */
    moe_softmax_forward(g->probs, g->dz, rows, K);
    for (i = 0; i < (size_t)rows * (size_t)K; i++) gates[i] = beta * g->probs[i];
}

RWD__IMPL void rwd_gate_backward(rwd_gate *g, moe_store *s, float *dx, const float *dgates, const float *x, int rows) {
    int L = g->cfg.n_hidden, H = g->cfg.d_hidden, K = g->cfg.K, l;
    size_t stride = (size_t)g->cfg.max_rows * (size_t)H, rk = (size_t)rows * (size_t)K, rh = (size_t)rows * (size_t)H, i;
    float beta = moe_store_param(s, g->id_scale)[0], inv_t = 1.0f / g->cfg.temperature;
    float *dp = g->dh; /* (rows, K) beta * dgates; dh is free until the layer loop */
    double dbeta = 0.0;
    float *dz = g->dz;
    for (i = 0; i < rk; i++) {
        dbeta += (double)dgates[i] * (double)g->probs[i];
        dp[i] = beta * dgates[i];
    }
    moe_store_grad(s, g->id_scale)[0] += (float)dbeta;
    memset(dz, 0, rk * sizeof(float));
    moe_softmax_backward(dz, dp, g->probs, rows, K);
    for (i = 0; i < rk; i++) dz[i] *= inv_t;
    for (l = L; l >= 0; l--) {
        const float *in = l == 0 ? x : g->post + (size_t)(l - 1) * stride;
        int in_w = l == 0 ? g->cfg.d_in : H, out_w = l == L ? K : H;
        float *din = NULL;
        if (l > 0) {
            din = g->dh;
            memset(din, 0, rh * sizeof(float));
        } else {
            din = dx;
        }
        moe_matmul_backward(din, moe_store_grad(s, g->id_w[l]), moe_store_grad(s, g->id_b[l]), dz, in,
                            moe_store_param(s, g->id_w[l]), rows, in_w, out_w, &g->work);
        if (l > 0) { /* through dropout and ReLU of layer l-1: dz <- d pre_{l-1} */
            const float *pre = g->pre + (size_t)(l - 1) * stride, *mask = g->mask + (size_t)(l - 1) * stride;
            for (i = 0; i < rh; i++) dz[i] = pre[i] > 0.0f ? g->dh[i] * mask[i] : 0.0f;
        }
    }
}

RWD__IMPL rwd_gate_train_config rwd_gate_train_config_default(void) {
    rwd_gate_train_config c;
    c.steps = 2000;
    c.batch = 1024;
    c.lr = 1e-3f;
    c.lr_min = 0.0f;
    c.weight_decay = 0.0f;
    c.seed = 0;
    return c;
}

RWD__IMPL double rwd_gate_bt_loss(float *dgates, const float *gates, const double *r_w, const double *r_l, int B, int K,
                                  int *n_correct) {
    double loss = 0.0;
    int i, k, ok = 0;
    for (i = 0; i < B; i++) {
        const float *gi = gates + (size_t)i * (size_t)K;
        const double *a = r_w + (size_t)i * (size_t)K, *b = r_l + (size_t)i * (size_t)K;
        double m = 0.0, gs;
        for (k = 0; k < K; k++) m += (double)gi[k] * (a[k] - b[k]);
        loss += rwd__nll_sigmoid(m);
        ok += m > 0.0;
        gs = -rwd__sigmoid_neg(m) / B;
        if (dgates)
            for (k = 0; k < K; k++) dgates[(size_t)i * (size_t)K + (size_t)k] = (float)(gs * (a[k] - b[k]));
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL moe_status rwd_gate_train(rwd_gate *g, moe_store *s, const float *x, const double *r_w, const double *r_l,
                                    size_t n, const rwd_gate_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    int d = g->cfg.d_in, K = g->cfg.K, B, step, b;
    float *X, *G, *dG;
    double *RW, *RL, loss_sum = 0.0;
    long long correct = 0, counted = 0;
    size_t i;
    moe_rng rng;
    moe_adamw_config opt = moe_adamw_config_default();
    moe_status st = MOE_OK;
    if (stats) memset(stats, 0, sizeof *stats);
    if (!tc || !x || !r_w || !r_l || n == 0 || n > (size_t)INT_MAX) return moe_err_set(err, MOE_ERR_INVALID_ARG, "gate training needs a config, prompt rows, rewards and 1 .. %d pairs (got %zu)", INT_MAX, n);
    if (tc->steps < 1 || tc->batch < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "steps and batch must be >= 1 (got %d, %d)", tc->steps, tc->batch);
    if (tc->batch > g->cfg.max_rows) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a batch of %d pairs is more than the gate's max_rows %d", tc->batch, g->cfg.max_rows);
    if (!(tc->lr > 0.0f) || !isfinite(tc->lr) || !(tc->lr_min >= 0.0f) || !isfinite(tc->lr_min) || !(tc->weight_decay >= 0.0f))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "the learning rate must be > 0 and finite; lr_min and weight decay >= 0");
    if (!s->adam_m) return moe_err_set(err, MOE_ERR_STATE, "allocate the store with optimizer moments (moe_store_alloc(s, 1)) before training");
    if ((st = rwd__check_floats(x, n * (size_t)d, d, "gate prompt rows", err)) != MOE_OK) return st;
    for (i = 0; i < n * (size_t)K; i++)
        if (!isfinite(r_w[i]) || !isfinite(r_l[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "pair %zu, objective %zu: a reward is not finite", i / (size_t)K, i % (size_t)K);
    B = tc->batch;
    X = (float *)MOE_MALLOC(((size_t)B * (size_t)d + 2 * (size_t)B * (size_t)K) * sizeof(float));
    RW = (double *)MOE_MALLOC(2 * (size_t)B * (size_t)K * sizeof(double));
    if (!X || !RW) { MOE_FREE(X); MOE_FREE(RW); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for gate batches"); }
    G = X + (size_t)B * (size_t)d;
    dG = G + (size_t)B * (size_t)K;
    RL = RW + (size_t)B * (size_t)K;
    opt.weight_decay = tc->weight_decay;
    moe_rng_seed(&rng, tc->seed);
    for (step = 0; step < tc->steps && st == MOE_OK; step++) {
        int ok = 0;
        double loss;
        float lr = moe_lr_cosine(step, 0, tc->steps, tc->lr, tc->lr_min);
        for (b = 0; b < B; b++) { /* uniformly with replacement, as the stage-2 script */
            size_t j = (size_t)moe_rng_below(&rng, (int)n);
            memcpy(X + (size_t)b * (size_t)d, x + j * (size_t)d, (size_t)d * sizeof(float));
            memcpy(RW + (size_t)b * (size_t)K, r_w + j * (size_t)K, (size_t)K * sizeof(double));
            memcpy(RL + (size_t)b * (size_t)K, r_l + j * (size_t)K, (size_t)K * sizeof(double));
        }
        rwd_gate_forward(g, s, G, X, B, &rng);
        loss = rwd_gate_bt_loss(dG, G, RW, RL, B, K, &ok);
        moe_store_zero_grad(s);
        rwd_gate_backward(g, s, NULL, dG, X, B);
        st = moe_adamw_step(s, &opt, lr, step + 1);
        if (step >= tc->steps - 100) {
            loss_sum += loss * B;
            correct += ok;
            counted += B;
        }
    }
    if (st != MOE_OK) moe_err_set(err, st, "optimizer step failed: %s", s->err.msg);
    else if (stats) {
        stats->loss = loss_sum / (double)counted;
        stats->accuracy = (double)correct / (double)counted;
        stats->steps = tc->steps;
    }
    MOE_FREE(X);
    MOE_FREE(RW);
    return st;
}

/* ---- the whole model ---- */

RWD__IMPL moe_status rwd_armo_init(rwd_armo *m, int K, int d, int verbosity, const rwd_gate_config *gc, uint64_t seed,
                                   moe_err *err) {
    rwd_gate_config c;
    moe_rng rng;
    moe_status st;
    memset(m, 0, sizeof *m);
    if (K < 1 || d < 1 || !gc) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_init needs K >= 1 objectives, d >= 1 features and a gate config");
    if (verbosity < -1 || verbosity >= K) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the verbosity objective %d is not one of the %d objectives (-1: none)", verbosity, K);
    c = *gc;
    c.K = K;
    m->K = K;
    m->d = d;
    m->verbosity = verbosity;
    moe_store_init(&m->store);
    if ((st = rwd_gate_init(&m->gate, &c, &m->store, "gate.", err)) != MOE_OK) { moe_store_free(&m->store); return st; }
    if (moe_store_alloc(&m->store, 1) != MOE_OK) { rwd_armo_free(m); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the gate's parameters"); }
    m->W = (float *)moe__calloc((size_t)K * (size_t)d, sizeof(float));
    m->penalty = (double *)moe__calloc((size_t)K + 2 * (size_t)c.max_rows * (size_t)K, sizeof(double));
    m->gscratch = (float *)moe__calloc((size_t)c.max_rows * (size_t)K, sizeof(float));
    if (!m->W || !m->penalty || !m->gscratch) { rwd_armo_free(m); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the ArmoRM model"); }
    m->scratch = m->penalty + K;
    moe_rng_seed(&rng, seed);
    rwd_gate_init_weights(&m->gate, &m->store, &rng);
    return MOE_OK;
}

RWD__IMPL void rwd_armo_free(rwd_armo *m) {
    rwd_gate_free(&m->gate);
    moe_store_free(&m->store);
    MOE_FREE(m->W);
    MOE_FREE(m->penalty);
    MOE_FREE(m->gscratch);
    memset(m, 0, sizeof *m);
}

RWD__IMPL moe_status rwd_armo_fit_regression(rwd_armo *m, rwd_ridge_report *rep, const float *x, const double *y,
                                             size_t n, const rwd_ridge_config *c, moe_err *err) {
    return rwd_armo_regress(m->W, rep, x, y, n, m->d, m->K, c, err);
}

RWD__IMPL moe_status rwd_armo_fit_verbosity(rwd_armo *m, double *corr, const float *x_ref, size_t M, double threshold,
                                            moe_err *err) {
    double *V;
    moe_status st;
    if (m->verbosity < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the model has no verbosity objective (verbosity = -1)");
    if (!x_ref || M < 2) return moe_err_set(err, MOE_ERR_INVALID_ARG, "verbosity de-correlation needs >= 2 reference responses, got %zu", x_ref ? M : 0);
    if ((st = rwd__check_floats(x_ref, M * (size_t)m->d, m->d, "reference responses", err)) != MOE_OK) return st;
    V = (double *)MOE_MALLOC(M * (size_t)m->K * sizeof(double));
    if (!V) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    rwd_armo_rewards(V, m->W, x_ref, M, m->d, m->K);
    st = rwd_armo_verbosity_penalties(m->penalty, corr, V, M, m->K, m->verbosity, threshold, err);
    MOE_FREE(V);
    return st;
}

RWD__IMPL void rwd_armo_mixed_rewards(const rwd_armo *m, double *out, const float *x, size_t rows) {
    rwd_armo_rewards(out, m->W, x, rows, m->d, m->K);
    if (!m->gate_on_raw) rwd_armo_transform(out, out, m->penalty, rows, m->K, m->verbosity);
}

RWD__IMPL moe_status rwd_armo_fit_gate(rwd_armo *m, const float *xp, const float *x_w, const float *x_l, size_t n,
                                       const rwd_gate_train_config *tc, int on_raw, rwd_train_stats *stats, moe_err *err) {
    double *R;
    moe_status st;
    if (!xp || !x_w || !x_l || n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "stage 2 needs prompt rows and the responses of >= 1 pairs");
    if ((st = rwd__check_floats(x_w, n * (size_t)m->d, m->d, "chosen responses", err)) != MOE_OK ||
        (st = rwd__check_floats(x_l, n * (size_t)m->d, m->d, "rejected responses", err)) != MOE_OK)
        return st;
    R = (double *)MOE_MALLOC(2 * n * (size_t)m->K * sizeof(double));
    if (!R) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the pairs' rewards");
    m->gate_on_raw = on_raw != 0;
    rwd_armo_mixed_rewards(m, R, x_w, n);
    rwd_armo_mixed_rewards(m, R + n * (size_t)m->K, x_l, n);
    st = rwd_gate_train(&m->gate, &m->store, xp, R, R + n * (size_t)m->K, n, tc, stats, err);
    MOE_FREE(R);
    return st;
}

RWD__IMPL moe_status rwd_armo_infer(rwd_armo *m, double *score, double *rewards, double *gates, const float *x,
                                    const float *xp, size_t rows, moe_err *err) {
    int K = m->K, k;
    size_t start = 0, i;
    if (!x || !xp || (!score && !rewards && !gates)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_armo_infer needs responses, prompts and at least one output");
    while (start < rows) {
        int b = (int)(rows - start < (size_t)m->gate.cfg.max_rows ? rows - start : (size_t)m->gate.cfg.max_rows);
        double *r = m->scratch, *rt = m->scratch + (size_t)b * (size_t)K;
        rwd_armo_rewards(r, m->W, x + start * (size_t)m->d, (size_t)b, m->d, K);
        if (m->gate_on_raw) memcpy(rt, r, (size_t)b * (size_t)K * sizeof(double));
        else rwd_armo_transform(rt, r, m->penalty, (size_t)b, K, m->verbosity);
        rwd_gate_forward(&m->gate, &m->store, m->gscratch, xp + start * (size_t)m->gate.cfg.d_in, b, NULL);
        for (i = 0; i < (size_t)b; i++) {
            double s = 0.0;
            for (k = 0; k < K; k++) s += (double)m->gscratch[i * (size_t)K + (size_t)k] * rt[i * (size_t)K + (size_t)k];
            if (score) score[start + i] = s;
        }
        if (rewards) memcpy(rewards + start * (size_t)K, r, (size_t)b * (size_t)K * sizeof(double));
        if (gates)
            for (i = 0; i < (size_t)b * (size_t)K; i++) gates[start * (size_t)K + i] = m->gscratch[i];
        start += (size_t)b;
    }
    return MOE_OK;
}
