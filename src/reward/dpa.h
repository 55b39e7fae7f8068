/* ============================================================================================
   >>rwd:dpa  directional preferences (DPA), best-of-n, Pareto fronts, hypervolume
   ============================================================================================
   Directional Preference Alignment (Wang et al., arXiv 2402.18571, section 3): a user's
   preference is a unit vector v in the space of K reward objectives and the user's reward is
   the projection R_v = v . r. With two objectives (helpfulness, verbosity) v = (cos t, sin t).
   The released DPA model reads v from its system prompt as integers, round(100 v_k) with numpy's
   rounding (half to even), "... maximize weighted rating = helpfulness*{W_h} + verbosity*{W_b}".
   Rejection sampling under a direction keeps the best of n responses by v . r. Fronts and the
   hypervolume compare what a set of directions can reach: every objective is maximised. */

/* v (k) = u / |u|; a zero (or non-finite) u is an error: it states no preference */
RWDDEF moe_status rwd_dpa_direction(double *v, const double *u, int k, moe_err *err);
RWDDEF void rwd_dpa_direction_angle(double v[2], double theta); /* (cos theta, sin theta), radians */
RWDDEF double rwd_dpa_scalarize(const double *v, const double *r, int k); /* v . r */
/* w (k) = round-half-even(100 v_k) of v as given (not renormalised: the caller's v is the
   direction; the official prompts use v = (cos t, sin t)) */
RWDDEF moe_status rwd_dpa_weights(int *w, const double *v, int k, moe_err *err);
/* the direction an integer-weight prompt states: w / |w| */
RWDDEF moe_status rwd_dpa_weights_direction(double *v, const int *w, int k, moe_err *err);
/* the official DPA system prompt for (W_h, W_b); returns MOE_ERR_INVALID_ARG if cap is short */
RWDDEF moe_status rwd_dpa_system_prompt(char *out, size_t cap, int w_helpfulness, int w_verbosity, moe_err *err);
/* *best = argmax_j v . r_j over n candidates r (n, k) (ties to the lower index) */
RWDDEF moe_status rwd_dpa_best_of_n(size_t *best, const double *v, const double *r, size_t n, int k, moe_err *err);
/* idx gets the non-dominated points of pts (n, k) in increasing index order, *n_front their
   number: p dominates q when p >= q everywhere and p > q somewhere, so equal points all stay */
RWDDEF moe_status rwd_pareto_front(size_t *idx, size_t *n_front, const double *pts, size_t n, int k, moe_err *err);
/* *hv = the volume dominated by pts (n, k) and dominating ref (k): the union of the boxes
   [ref, p]. Points not above ref in every objective add nothing. Exact, by slicing along the
   last objective (a sweep for k = 2): O(n^(k-1) log n), for k <= 4 and fronts of thousands. */
RWDDEF moe_status rwd_hypervolume(double *hv, const double *pts, size_t n, int k, const double *ref, moe_err *err);

/* @implementation */
/* ============================================================================================
   >>rwd:dpa
   ============================================================================================ */

static moe_status rwd__unit(double *v, const double *u, int k, const char *what, moe_err *err) {
    double s = 0.0;
    int i;
    if (!v || !u || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s needs a vector of k >= 1 values", what);
    for (i = 0; i < k; i++) {
        if (!isfinite(u[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: component %d is not finite", what, i);
        s += u[i] * u[i];
    }
    if (!(s > 0.0) || !isfinite(s)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: a direction of length 0 states no preference; give at least one non-zero weight", what);
    s = sqrt(s);
    for (i = 0; i < k; i++) v[i] = u[i] / s;
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_direction(double *v, const double *u, int k, moe_err *err) {
    return rwd__unit(v, u, k, "direction", err);
}

RWD__IMPL void rwd_dpa_direction_angle(double v[2], double theta) {
    v[0] = cos(theta);
    v[1] = sin(theta);
}

RWD__IMPL double rwd_dpa_scalarize(const double *v, const double *r, int k) {
    double s = 0.0;
    int i;
    for (i = 0; i < k; i++) s += v[i] * r[i];
    return s;
}

/* numpy's round: to the nearest integer, halves to the even one */
static double rwd__round_half_even(double x) {
    double f = floor(x), d = x - f;
    if (d > 0.5) return f + 1.0;
    if (d < 0.5) return f;
    return fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}

RWD__IMPL moe_status rwd_dpa_weights(int *w, const double *v, int k, moe_err *err) {
    double s = 0.0;
    int i;
    if (!w || !v || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_weights needs k >= 1 weights");
    for (i = 0; i < k; i++) {
        if (!isfinite(v[i]) || fabs(v[i]) > 1e6) return moe_err_set(err, MOE_ERR_INVALID_ARG, "direction component %d is not a finite unit-scale number", i);
        s += v[i] * v[i];
    }
    if (!(s > 0.0)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "a direction of length 0 states no preference; give at least one non-zero weight");
    for (i = 0; i < k; i++) w[i] = (int)rwd__round_half_even(100.0 * v[i]);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_weights_direction(double *v, const int *w, int k, moe_err *err) {
    double u[64];
    int i;
    if (!w || k < 1 || k > 64) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_weights_direction needs 1 .. 64 weights");
    for (i = 0; i < k; i++) u[i] = (double)w[i];
    return rwd__unit(v, u, k, "integer weights", err);
}

RWD__IMPL moe_status rwd_dpa_system_prompt(char *out, size_t cap, int w_helpfulness, int w_verbosity, moe_err *err) {
    int n;
    if (!out || cap == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_dpa_system_prompt needs an output buffer");
    n = snprintf(out, cap,
                 "You are a helpful, respectful, and honest assistant who always responds to the user in a harmless way. "
                 "Your response should maximize weighted rating = helpfulness*%d + verbosity*%d",
                 w_helpfulness, w_verbosity);
    if (n < 0 || (size_t)n >= cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "the system prompt needs %d bytes, the buffer has %zu", n + 1, cap);
    return MOE_OK;
}

static moe_status rwd__check_points(const double *pts, size_t n, int k, const char *what, moe_err *err) {
    size_t i;
    if (!pts || k < 1) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s needs points with k >= 1 objectives", what);
    for (i = 0; i < n * (size_t)k; i++)
        if (!isfinite(pts[i])) return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s: point %zu, objective %zu is not finite", what, i / (size_t)k, i % (size_t)k);
    return MOE_OK;
}

RWD__IMPL moe_status rwd_dpa_best_of_n(size_t *best, const double *v, const double *r, size_t n, int k, moe_err *err) {
    size_t j;
    double top = 0.0;
    moe_status st;
    if (!best || !v) return moe_err_set(err, MOE_ERR_INVALID_ARG, "best-of-n needs an output and a direction");
    if (n == 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "best-of-n needs at least one candidate");
    if ((st = rwd__check_points(r, n, k, "best-of-n", err)) != MOE_OK) return st;
    for (j = 0; j < n; j++) {
        double s = rwd_dpa_scalarize(v, r + j * (size_t)k, k);
        if (j == 0 || s > top) { top = s; *best = j; }
    }
    return MOE_OK;
}

RWD__IMPL moe_status rwd_pareto_front(size_t *idx, size_t *n_front, const double *pts, size_t n, int k, moe_err *err) {
    size_t i, j, m = 0;
    moe_status st;
    if (!idx || !n_front) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_pareto_front needs idx and n_front");
    *n_front = 0;
    if ((st = rwd__check_points(pts, n, k, "Pareto front", err)) != MOE_OK) return st;
    for (i = 0; i < n; i++) {
        const double *p = pts + i * (size_t)k;
        int dominated = 0;
        for (j = 0; j < n && !dominated; j++) {
            const double *q = pts + j * (size_t)k;
            int ge = 1, gt = 0, c;
            if (j == i) continue;
            for (c = 0; c < k && ge; c++) {
                ge = q[c] >= p[c];
                gt |= q[c] > p[c];
            }
            dominated = ge && gt;
        }
        if (!dominated) idx[m++] = i;
    }
    *n_front = m;
    return MOE_OK;
}

/* stable merge sort of idx (n) by key[idx] descending; tmp (n) scratch */
static void rwd__sort_desc(size_t *idx, size_t *tmp, size_t n, const double *key, int stride) {
    size_t w, i;
    for (w = 1; w < n; w *= 2) {
        for (i = 0; i < n; i += 2 * w) {
            size_t a = i, mid = i + w < n ? i + w : n, b = mid, end = i + 2 * w < n ? i + 2 * w : n, o = i;
            while (a < mid && b < end) tmp[o++] = key[idx[b] * (size_t)stride] > key[idx[a] * (size_t)stride] ? idx[b++] : idx[a++];
            while (a < mid) tmp[o++] = idx[a++];
            while (b < end) tmp[o++] = idx[b++];
        }
        memcpy(idx, tmp, n * sizeof(size_t));
    }
}

/* hypervolume of the points idx (m) of pts (., stride) in their first k objectives; work holds
   (k + 1) * m indices for the recursion's own lists */
static double rwd__hv(const double *pts, int stride, const size_t *idx, size_t m, int k, const double *ref, size_t *work) {
    size_t *own = work, *tmp = work + m, i;
    double vol = 0.0;
    if (m == 0) return 0.0;
    memcpy(own, idx, m * sizeof(size_t));
    rwd__sort_desc(own, tmp, m, pts + (k - 1), stride);
    if (k == 1) return pts[own[0] * (size_t)stride] - ref[0];
    if (k == 2) { /* sweep: going down in y, the widest x so far bounds each slab */
        double xmax = ref[0];
        for (i = 0; i < m; i++) {
            const double *p = pts + own[i] * (size_t)stride;
            double below = i + 1 < m ? pts[own[i + 1] * (size_t)stride + 1] : ref[1];
            if (p[0] > xmax) xmax = p[0];
            vol += (p[1] - below) * (xmax - ref[0]);
        }
        return vol;
    }
    for (i = 0; i < m; i++) { /* slab between this point's level and the next one down */
        double top = pts[own[i] * (size_t)stride + (size_t)(k - 1)];
        double below = i + 1 < m ? pts[own[i + 1] * (size_t)stride + (size_t)(k - 1)] : ref[k - 1];
        if (top > below) vol += (top - below) * rwd__hv(pts, stride, own, i + 1, k - 1, ref, work + 2 * m);
    }
    return vol;
}

RWD__IMPL moe_status rwd_hypervolume(double *hv, const double *pts, size_t n, int k, const double *ref, moe_err *err) {
    size_t *work, i, m = 0;
    int c;
    moe_status st;
    if (!hv || !ref) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rwd_hypervolume needs an output and a reference point");
    *hv = 0.0;
    if ((st = rwd__check_points(pts, n, k, "hypervolume", err)) != MOE_OK) return st;
    if ((st = rwd__check_points(ref, 1, k, "hypervolume reference", err)) != MOE_OK) return st;
    if (n == 0) return MOE_OK;
    work = (size_t *)MOE_MALLOC((size_t)(2 * k + 2) * n * sizeof(size_t));
    if (!work) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (i = 0; i < n; i++) { /* only points above ref in every objective span a box */
        const double *p = pts + i * (size_t)k;
        int above = 1;
        for (c = 0; c < k; c++) above &= p[c] > ref[c];
        if (above) work[m++] = i;
    }
    *hv = rwd__hv(pts, k, work, m, k, ref, work + n);
    MOE_FREE(work);
    return MOE_OK;
}
