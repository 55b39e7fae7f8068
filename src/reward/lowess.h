/* ============================================================================================
   >>rwd:lowess  LOWESS exactly as statsmodels computes it
   ============================================================================================
   Cleveland's robust locally weighted regression (W. S. Cleveland, "Robust Locally Weighted
   Regression and Smoothing Scatterplots", JASA 74(368), 1979): tricube weights, local lines,
   bisquare robustness passes. The calibration paper's RC-LWR (arXiv 2409.17407) calls
   statsmodels' implementation (statsmodels/nonparametric/_smoothers_lowess.pyx), whose window
   sliding, tie handling and stopping rule change the numbers; this follows that code.
   fit (n) = statsmodels.nonparametric.lowess(y, x, frac, it=iters, delta=0,
   return_sorted=False): the fitted value of every point, in input order. frac in (0, 1],
   iters >= 0 robustness passes after the first. Tied x values share one fit.
   Degenerate window (all k points at the query's x): the fit is the y of the first of those
   points in stable sorted order (statsmodels gets there through NaN weights and uses the first
   point of its own, unstable, argsort order).
   rwd_lowess works on distinct x values (tied points aggregated), in parallel over queries:
   O(distinct * window) per pass. rwd_lowess_naive is the line-by-line transcription, kept as
   the reference. Agreement with statsmodels: tests/test_reward_calib.c, bench/lowess.c. */

RWDDEF moe_status rwd_lowess(double *fit, const double *x, const double *y, size_t n, double frac,
                             int iters, moe_err *err);
RWDDEF moe_status rwd_lowess_naive(double *fit, const double *x, const double *y, size_t n,
                                   double frac, int iters, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:lowess
   ============================================================================================ */

typedef struct rwd__xi {
    double x;
    size_t i;
} rwd__xi;

static int rwd__cmp_xi(const void *a, const void *b) {
    const rwd__xi *p = (const rwd__xi *)a, *q = (const rwd__xi *)b;
    if (p->x < q->x) return -1;
    if (p->x > q->x) return 1;
    return (p->i > q->i) - (p->i < q->i); /* index breaks ties: a stable sort */
}

/* order (n) = the permutation that sorts x stably */
static moe_status rwd__argsort(size_t *order, const double *x, size_t n, moe_err *err) {
    size_t i;
    rwd__xi *t = (rwd__xi *)MOE_MALLOC((n ? n : 1) * sizeof *t);
    if (!t) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory sorting %zu values", n);
    for (i = 0; i < n; i++) { t[i].x = x[i]; t[i].i = i; }
    qsort(t, n, sizeof *t, rwd__cmp_xi);
    for (i = 0; i < n; i++) order[i] = t[i].i;
    MOE_FREE(t);
    return MOE_OK;
}

/* k-th smallest of a[0..n) (a is reordered): Hoare selection, median-of-three pivots */
static double rwd__select(double *a, size_t n, size_t k) {
    size_t lo = 0, hi = n - 1;
    while (hi > lo) {
        size_t mid = lo + (hi - lo) / 2, i = lo, j = hi;
        double pv, t;
        if (a[mid] < a[lo]) { t = a[mid]; a[mid] = a[lo]; a[lo] = t; }
        if (a[hi] < a[lo]) { t = a[hi]; a[hi] = a[lo]; a[lo] = t; }
        if (a[hi] < a[mid]) { t = a[hi]; a[hi] = a[mid]; a[mid] = t; }
        pv = a[mid];
        while (i <= j) {
            while (a[i] < pv) i++;
            while (a[j] > pv) j--;
            if (i <= j) {
                t = a[i]; a[i] = a[j]; a[j] = t;
                i++;
                if (j == 0) break;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* numpy's median: the middle value, or the mean of the two middle values */
static double rwd__median(double *a, size_t n) {
    double hi = rwd__select(a, n, n / 2), lo;
    size_t i;
    if (n % 2) return hi;
    lo = a[0]; /* after selection, a[0 .. n/2) holds the smaller half */
    for (i = 1; i < n / 2; i++)
        if (a[i] > lo) lo = a[i];
    return (lo + hi) / 2.0;
}

static moe_status rwd__lowess_check(const double *x, const double *y, size_t n, double frac, int iters, moe_err *err) {
    size_t i;
    if (!x || !y || n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs at least one point (got n = %zu)", n);
    if (!(frac > 0.0 && frac <= 1.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS frac must be in (0, 1], got %g", frac);
    if (iters < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS iterations must be >= 0, got %d", iters);
    for (i = 0; i < n; i++)
        if (!isfinite(x[i]) || !isfinite(y[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS point %zu is not finite (x = %g, y = %g)", i, x[i], y[i]);
    return MOE_OK;
}

/* statsmodels' neighbourhood size: floor(frac n + 1e-10) clamped to [2, n] */
static size_t rwd__lowess_k(size_t n, double frac) {
    size_t k = (size_t)(frac * (double)n + 1e-10);
    if (k < 2) k = 2;
    if (k > n) k = n;
    return k;
}

/* tricube weight exactly as statsmodels computes it: u = |xj - x0| / h; (1 - u^3)^3 */
static double rwd__tricube(double xj, double x0, double h) {
    double u = fabs(xj - x0) / h, t;
    u = u * u * u;
    t = 1.0 - u;
    return t * t * t;
}

/* Robustness weights from the residuals of the pass just made; returns 0 when statsmodels
   stops iterating (median absolute residual <= 1e-7). resid: (n) scratch. */
static int rwd__lowess_robust(double *rho, double *resid, const double *ys, const double *fs, size_t n) {
    double m, scale;
    size_t j;
    for (j = 0; j < n; j++) resid[j] = fabs(ys[j] - fs[j]);
    m = rwd__median(resid, n);
    if (m <= 1e-7) return 0;
    scale = 6.0 * m;
    for (j = 0; j < n; j++) {
        double u = fabs(ys[j] - fs[j]) / scale, t;
        if (u > 1.0) u = 1.0;
        t = 1.0 - u * u;
        rho[j] = t * t;
    }
    return 1;
}

/* Sorted copies xs, ys of the input and the sort order; one allocation, freed by the caller. */
static moe_status rwd__lowess_sorted(double **mem, size_t **order, double **xs, double **ys, const double *x,
                                     const double *y, size_t n, size_t extra_doubles, moe_err *err) {
    size_t i;
    moe_status st;
    *mem = (double *)MOE_MALLOC((2 * n + extra_doubles) * sizeof(double) + n * sizeof(size_t));
    if (!*mem) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for LOWESS on %zu points", n);
    *xs = *mem;
    *ys = *xs + n;
    *order = (size_t *)(void *)(*ys + n + extra_doubles);
    if ((st = rwd__argsort(*order, x, n, err)) != MOE_OK) { MOE_FREE(*mem); return st; }
    for (i = 0; i < n; i++) { (*xs)[i] = x[(*order)[i]]; (*ys)[i] = y[(*order)[i]]; }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_lowess_naive(double *fit, const double *x, const double *y, size_t n,
                                      double frac, int iters, moe_err *err) {
    double *mem, *xs, *ys, *fs, *rho, *w, *resid;
    size_t *order, k, i, j;
    int pass;
    moe_status st = rwd__lowess_check(x, y, n, frac, iters, err);
    if (st != MOE_OK) return st;
    if (!fit) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs an output array");
    if ((st = rwd__lowess_sorted(&mem, &order, &xs, &ys, x, y, n, 4 * n, err)) != MOE_OK) return st;
    fs = ys + n; rho = fs + n; w = rho + n; resid = w + n;
    k = rwd__lowess_k(n, frac);
    for (j = 0; j < n; j++) rho[j] = 1.0;
    for (pass = 0; pass <= iters; pass++) {
        size_t L = 0, R = k;
        i = 0;
        while (i < n) {
            double x0 = xs[i], h, sw = 0.0, xbar = 0.0, var = 0.0, f = 0.0;
            int nonzero = 0;
            while (R < n && x0 > (xs[L] + xs[R]) / 2.0) { L++; R++; }
            h = fmax(x0 - xs[L], xs[R - 1] - x0);
            for (j = L; j < R; j++) {
                w[j] = rwd__tricube(xs[j], x0, h) * rho[j]; /* NaN when h == 0 */
                sw += w[j];
                nonzero += w[j] > 1e-12;
            }
            if (nonzero < 2) f = ys[i];
            else {
                for (j = L; j < R; j++) w[j] /= sw;
                for (j = L; j < R; j++) xbar += w[j] * xs[j];
                for (j = L; j < R; j++) var += w[j] * (xs[j] - xbar) * (xs[j] - xbar);
                var = fmax(var, 1e-12);
                for (j = L; j < R; j++) f += w[j] * (1.0 + (x0 - xbar) * (xs[j] - xbar) / var) * ys[j];
            }
            fs[i++] = f;
            while (i < n && xs[i] == x0) fs[i++] = f; /* ties share the fit */
        }
        if (pass < iters && !rwd__lowess_robust(rho, resid, ys, fs, n)) break;
    }
    for (i = 0; i < n; i++) fit[order[i]] = fs[i];
    MOE_FREE(mem);
    return MOE_OK;
}

/* The fast LOWESS. Points with equal x get equal tricube weights, so within a tie group only
   S_rho = sum rho_j and S_rhoy = sum rho_j y_j matter: a query costs O(distinct x in its
   window), not O(window). Window edges may cut a tie group; the cut part is summed point by
   point (it almost always has weight 0 anyway). statsmodels' "at least two weights > 1e-12"
   test needs only the two largest rho of a group. Queries (one per distinct x) are
   independent once the windows are known, so they run in parallel, each summing in a fixed
   order (4 interleaved partial sums, so the loop vectorizes): any thread count, same bits. */
typedef struct rwd__lw {
    const double *xs, *ys, *rho;   /* (n) sorted points, robustness weights             */
    const size_t *gstart, *gof;    /* (G+1) first point of each distinct x; (n) group of a point */
    const double *gx;              /* (G) the distinct x values                          */
    const double *srho, *srhoy;    /* (G) group sums                                     */
    const double *r1, *r2;         /* (G) largest, second largest rho in the group (or -1) */
} rwd__lw;

/* what a window holds for the local fit at x0: S0 = sum w, S1 = sum w x (pass 1, with the
   count of weights > 1e-12); then V = sum w (x - xbar)^2, Ty = sum w y, Txy = sum w y (x - xbar)
   (pass 2, xbar = S1 / S0). w = tricube * rho, unnormalised. */
typedef struct rwd__wsum { double s0, s1, v, ty, txy; int nonzero; } rwd__wsum;

static void rwd__lowess_group(rwd__wsum *w, int pass, double xg, double t, double sr, double sry, double xbar) {
    if (pass == 1) {
        w->s0 += t * sr;
        w->s1 += t * sr * xg;
    } else {
        double dx = xg - xbar;
        w->v += t * sr * dx * dx;
        w->ty += t * sry;
        w->txy += t * sry * dx;
    }
}

static void rwd__lowess_window(const rwd__lw *a, rwd__wsum *w, int pass, size_t L, size_t R, double x0, double h, double xbar) {
    size_t gl = a->gof[L], gr = a->gof[R - 1], g0 = gl, g1 = gr + 1, g, j, e;
    double acc[3][4], nzl[4];
    int k, nz = 0;
    for (e = 0; e < 2; e++) { /* a group cut by the left (e = 0) or right edge: point by point */
        size_t g_edge = e ? gr : gl, lo = a->gstart[g_edge], hi = a->gstart[g_edge + 1];
        double t, sr = 0.0, sry = 0.0;
        if ((lo >= L && hi <= R) || (e == 1 && gr < g0)) continue;
        t = rwd__tricube(a->gx[g_edge], x0, h);
        for (j = lo < L ? L : lo; j < (hi > R ? R : hi); j++) {
            sr += a->rho[j];
            sry += a->rho[j] * a->ys[j];
            nz += t * a->rho[j] > 1e-12;
        }
        rwd__lowess_group(w, pass, a->gx[g_edge], t, sr, sry, xbar);
        if (e == 0) g0 = gl + 1;
        else g1 = gr;
    }
    memset(acc, 0, sizeof acc);
    memset(nzl, 0, sizeof nzl);
    g = g0;
    if (pass == 1) /* whole groups, 4 lanes, no branches: the compiler vectorizes this */
        for (; g + 4 <= g1; g += 4)
            for (k = 0; k < 4; k++) {
                double t = rwd__tricube(a->gx[g + k], x0, h), ts = t * a->srho[g + k];
                acc[0][k] += ts;
                acc[1][k] += ts * a->gx[g + k];
                nzl[k] += (double)(t * a->r1[g + k] > 1e-12) + (double)(t * a->r2[g + k] > 1e-12);
            }
    else
        for (; g + 4 <= g1; g += 4)
            for (k = 0; k < 4; k++) {
                double t = rwd__tricube(a->gx[g + k], x0, h), dx = a->gx[g + k] - xbar, ty = t * a->srhoy[g + k];
                acc[0][k] += t * a->srho[g + k] * dx * dx;
                acc[1][k] += ty;
                acc[2][k] += ty * dx;
            }
    nz += (int)((nzl[0] + nzl[1]) + (nzl[2] + nzl[3]));
    for (; g < g1; g++) { /* the last 0-3 groups */
        double t = rwd__tricube(a->gx[g], x0, h);
        if (pass == 1) nz += (t * a->r1[g] > 1e-12) + (t * a->r2[g] > 1e-12);
        rwd__lowess_group(w, pass, a->gx[g], t, a->srho[g], a->srhoy[g], xbar);
    }
    if (pass == 1) {
        w->s0 += (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
        w->s1 += (acc[1][0] + acc[1][1]) + (acc[1][2] + acc[1][3]);
        w->nonzero = nz;
    } else {
        w->v += (acc[0][0] + acc[0][1]) + (acc[0][2] + acc[0][3]);
        w->ty += (acc[1][0] + acc[1][1]) + (acc[1][2] + acc[1][3]);
        w->txy += (acc[2][0] + acc[2][1]) + (acc[2][2] + acc[2][3]);
    }
}

RWD__IMPL moe_status rwd_lowess(double *fit, const double *x, const double *y, size_t n, double frac,
                                int iters, moe_err *err) {
    double *mem, *xs, *ys, *rho, *fs, *resid, *gx, *srho, *srhoy, *r1, *r2, *gfit;
    size_t *order, *gstart, *gof, *wl, *wr, k, G = 0, i, j, g;
    long long gq, ng;
    int pass;
    rwd__lw a;
    moe_status st = rwd__lowess_check(x, y, n, frac, iters, err);
    if (st != MOE_OK) return st;
    if (!fit) return moe_err_set(err, MOE_ERR_INVALID_ARG, "LOWESS needs an output array");
    /* doubles after xs, ys: rho, fs, resid (n each); gx, srho, srhoy, r1, r2, gfit (G <= n each) */
    if ((st = rwd__lowess_sorted(&mem, &order, &xs, &ys, x, y, n, 9 * n, err)) != MOE_OK) return st;
    rho = ys + n; fs = rho + n; resid = fs + n;
    gx = resid + n; srho = gx + n; srhoy = srho + n; r1 = srhoy + n; r2 = r1 + n; gfit = r2 + n;
    gstart = (size_t *)MOE_MALLOC((4 * n + 1) * sizeof(size_t));
    if (!gstart) { MOE_FREE(mem); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for LOWESS on %zu points", n); }
    gof = gstart + n + 1; wl = gof + n; wr = wl + n;
    for (i = 0; i < n; i++) {
        if (i == 0 || xs[i] != xs[i - 1]) { gx[G] = xs[i]; gstart[G++] = i; }
        gof[i] = G - 1;
    }
    gstart[G] = n;
    /* statsmodels' sliding window, evaluated once per distinct x (its tie skip does the same) */
    k = rwd__lowess_k(n, frac);
    {
        size_t L = 0, R = k;
        for (g = 0; g < G; g++) {
            double x0 = gx[g];
            while (R < n && x0 > (xs[L] + xs[R]) / 2.0) { L++; R++; }
            wl[g] = L; wr[g] = R;
        }
    }
    for (j = 0; j < n; j++) rho[j] = 1.0;
    a.xs = xs; a.ys = ys; a.rho = rho; a.gstart = gstart; a.gof = gof; a.gx = gx;
    a.srho = srho; a.srhoy = srhoy; a.r1 = r1; a.r2 = r2;
    ng = (long long)G;
    for (pass = 0; pass <= iters; pass++) {
        double work = 0.0;
        for (g = 0; g < G; g++) {
            double s = 0.0, sy = 0.0, m1 = -1.0, m2 = -1.0;
            for (j = gstart[g]; j < gstart[g + 1]; j++) {
                s += rho[j];
                sy += rho[j] * ys[j];
                if (rho[j] > m1) { m2 = m1; m1 = rho[j]; }
                else if (rho[j] > m2) m2 = rho[j];
            }
            srho[g] = s; srhoy[g] = sy; r1[g] = m1; r2[g] = m2;
            work += (double)(gof[wr[g] - 1] - gof[wl[g]] + 1);
        }
        (void)work; /* read only by the OpenMP clause */
        MOE_OMP_FOR_IF(work > 1e6)
        for (gq = 0; gq < ng; gq++) {
            size_t L = wl[gq], R = wr[gq];
            double x0 = gx[gq], h = fmax(x0 - xs[L], xs[R - 1] - x0), xbar, v;
            rwd__wsum w;
            memset(&w, 0, sizeof w);
            if (h > 0.0) rwd__lowess_window(&a, &w, 1, L, R, x0, h, 0.0);
            if (w.nonzero < 2) { gfit[gq] = ys[gstart[gq]]; continue; } /* also h == 0 */
            xbar = w.s1 / w.s0;
            rwd__lowess_window(&a, &w, 2, L, R, x0, h, xbar);
            v = fmax(w.v / w.s0, 1e-12);
            gfit[gq] = w.ty / w.s0 + (x0 - xbar) * (w.txy / w.s0) / v;
        }
        for (j = 0; j < n; j++) fs[j] = gfit[gof[j]];
        if (pass < iters && !rwd__lowess_robust(rho, resid, ys, fs, n)) break;
    }
    for (i = 0; i < n; i++) fit[order[i]] = fs[i];
    MOE_FREE(gstart);
    MOE_FREE(mem);
    return MOE_OK;
}

