/* ============================================================================================
   >>moe:gru  a GRU cell (PyTorch's gate order r, z, n), for the layerwise recurrent router
   ============================================================================================
   gi = x . w_ih^T + b_ih, gh = h_prev . w_hh^T + b_hh  (N, 3p), split r | z | n;
   r = sig(gi_r + gh_r), z = sig(gi_z + gh_z), n = tanh(gi_n + r * gh_n),
   h = (1 - z) * n + z * h_prev.  gi and gh are the caches backward needs. */

/* work: the two products' scratch, moe_gru_work_floats(N, p, threads) floats, or NULL (they
   allocate their own; MOE_ERR_NOMEM when they cannot). */
MOEDEF moe_status moe_gru_forward(float *h, float *gi, float *gh, const float *x, const float *h_prev,
                                  const float *w_ih, const float *w_hh, const float *b_ih, const float *b_hh,
                                  int N, int p, moe_work *work);
/* dx, dh_prev (N, p) and the weight gradients ACCUMULATE; dh (N, p) is dL/dh; scratch (N, 6p). */
MOEDEF moe_status moe_gru_backward(float *dx, float *dh_prev, float *dw_ih, float *dw_hh, float *db_ih, float *db_hh,
                                   const float *dh, const float *x, const float *h_prev, const float *gi,
                                   const float *gh, const float *w_ih, const float *w_hh, int N, int p, float *scratch,
                                   moe_work *work);
MOEDEF size_t moe_gru_work_floats(int N, int p, int nthreads);

/* @implementation */
/* ============================================================================================
   >>moe:gru
   ============================================================================================ */

MOE__IMPL size_t moe_gru_work_floats(int N, int p, int nthreads) { return moe_matmul_work_floats(N, p, 3 * p, nthreads); }

MOE__IMPL moe_status moe_gru_forward(float *h, float *gi, float *gh, const float *x, const float *h_prev,
                                     const float *w_ih, const float *w_hh, const float *b_ih, const float *b_hh,
                                     int N, int p, moe_work *work) {
    int i;
    moe_status st;
    if ((st = moe_matmul_forward(gi, x, w_ih, b_ih, N, p, 3 * p, work)) != MOE_OK) return st;
    if ((st = moe_matmul_forward(gh, h_prev, w_hh, b_hh, N, p, 3 * p, work)) != MOE_OK) return st;
    MOE_OMP_FOR_IF((double)N * p > 1e5)
    for (i = 0; i < N; i++) {
        const float *a = gi + (size_t)i * 3 * p, *b = gh + (size_t)i * 3 * p, *hp = h_prev + (size_t)i * p;
        float *o = h + (size_t)i * p;
        int j;
        for (j = 0; j < p; j++) {
            float r = moe__sigmoid(a[j] + b[j]), z = moe__sigmoid(a[p + j] + b[p + j]);
            float n = tanhf(a[2 * p + j] + r * b[2 * p + j]);
            o[j] = (1.0f - z) * n + z * hp[j];
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_gru_backward(float *dx, float *dh_prev, float *dw_ih, float *dw_hh, float *db_ih, float *db_hh,
                                      const float *dh, const float *x, const float *h_prev, const float *gi,
                                      const float *gh, const float *w_ih, const float *w_hh, int N, int p, float *scratch,
                                      moe_work *work) {
    float *dgi = scratch, *dgh = scratch + (size_t)N * 3 * p;
    moe_status st;
    int i;
    MOE_OMP_FOR_IF((double)N * p > 1e5)
    for (i = 0; i < N; i++) {
        const float *a = gi + (size_t)i * 3 * p, *b = gh + (size_t)i * 3 * p, *hp = h_prev + (size_t)i * p;
        const float *g = dh + (size_t)i * p;
        float *da = dgi + (size_t)i * 3 * p, *db = dgh + (size_t)i * 3 * p, *dhp = dh_prev + (size_t)i * p;
        int j;
        for (j = 0; j < p; j++) {
            float r = moe__sigmoid(a[j] + b[j]), z = moe__sigmoid(a[p + j] + b[p + j]);
            float n = tanhf(a[2 * p + j] + r * b[2 * p + j]);
            float dn = g[j] * (1.0f - z) * (1.0f - n * n); /* through tanh */
            float dz = g[j] * (hp[j] - n) * z * (1.0f - z);
            float dr = dn * b[2 * p + j] * r * (1.0f - r);
            da[j] = dr; da[p + j] = dz; da[2 * p + j] = dn;
            db[j] = dr; db[p + j] = dz; db[2 * p + j] = dn * r;
            dhp[j] += g[j] * z;
        }
    }
    if ((st = moe_matmul_backward(dx, dw_ih, db_ih, dgi, x, w_ih, N, p, 3 * p, work)) != MOE_OK) return st;
    return moe_matmul_backward(dh_prev, dw_hh, db_hh, dgh, h_prev, w_hh, N, p, 3 * p, work);
}

