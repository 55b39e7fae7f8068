/* ============================================================================================
   >>moe:cuda_kernels  the CUDA twins of matmul, kernels, attention, dispatch, router_topk
   ============================================================================================
   Device pointers everywhere; shapes and contracts as the CPU twin's (same name without
   _cuda). Every call only queues work on the default stream: a failed launch returns a status
   at once, a fault inside a kernel shows at the next moe_cuda_sync. */
#ifdef MOE_CUDA

/* GEMMs through cuBLAS (float32, no TF32) */
MOEDEF moe_status moe_matmul_forward_cuda(moe_cuda *c, float *out, const float *inp, const float *weight,
                                          const float *bias, int M, int K, int N);
MOEDEF moe_status moe_matmul_backward_cuda(moe_cuda *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                           const float *inp, const float *weight, int M, int K, int N);
MOEDEF moe_status moe_softmax_forward_cuda(moe_cuda *c, float *out, const float *inp, int rows, int n);
MOEDEF moe_status moe_softmax_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *out, int rows, int n);
MOEDEF moe_status moe_activation_forward_cuda(moe_cuda *c, float *out, const float *inp, size_t n, moe_activation act);
MOEDEF moe_status moe_activation_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *inp, size_t n,
                                               moe_activation act);
MOEDEF moe_status moe_swiglu_forward_cuda(moe_cuda *c, float *out, const float *gate, const float *up, size_t n);
MOEDEF moe_status moe_swiglu_backward_cuda(moe_cuda *c, float *dgate, float *dup, const float *dout, const float *gate,
                                           const float *up, size_t n);
MOEDEF moe_status moe_rmsnorm_forward_cuda(moe_cuda *c, float *out, float *rstd, const float *inp, const float *weight,
                                           int rows, int n, float eps);
MOEDEF moe_status moe_rmsnorm_backward_cuda(moe_cuda *c, float *dinp, float *dweight, const float *dout,
                                            const float *inp, const float *weight, const float *rstd, int rows, int n);
/* mean (host, may be NULL: then no wait) = the CPU twin's return value */
MOEDEF moe_status moe_crossentropy_forward_cuda(moe_cuda *c, float *losses, const float *logits, const int *targets,
                                                int rows, int V, double *mean);
MOEDEF moe_status moe_crossentropy_backward_cuda(moe_cuda *c, float *dlogits, const float *logits, const int *targets,
                                                 int rows, int V, float dloss);
/* the naive pair's arithmetic, one thread per (sequence, head, query row) */
MOEDEF moe_status moe_attention_forward_cuda(moe_cuda *c, float *out, float *att, const float *qkv, int B, int T, int d,
                                             int NH);
/* dqkv OVERWRITTEN, as the CPU's; dot: (B * NH * T) doubles of device scratch */
MOEDEF moe_status moe_attention_backward_cuda(moe_cuda *c, float *dqkv, const float *dout, const float *qkv,
                                              const float *att, int B, int T, int d, int NH, double *dot);
MOEDEF moe_status moe_rope_apply_cuda(moe_cuda *c, float *qkv, const float *cos_sin, int B, int T, int d, int NH,
                                      int inverse);

/* The assignment list on the device: the same arrays as moe_assign, each (cap), plus the
   offsets; a->n, T, E are mirrored on the host. */
MOEDEF moe_status moe_assign_alloc_cuda(moe_cuda *c, moe_assign *a, int cap, int T, int E);
MOEDEF void moe_assign_free_cuda(moe_assign *a);
/* moe_dispatch on the device (a stable counting sort without atomics). The raw list comes
   from a device router, so its ids are trusted: ids outside [0,T) / [0,E) are skipped. */
MOEDEF moe_status moe_dispatch_cuda(moe_cuda *c, moe_assign *a, const int *token, const int *expert, const int *slot,
                                    const float *weight, int n, int T, int E);
MOEDEF moe_status moe_gather_cuda(moe_cuda *c, float *xg, const float *x, const moe_assign *a, int d);
MOEDEF moe_status moe_gather_backward_cuda(moe_cuda *c, float *dx, const float *dxg, const moe_assign *a, int d);
MOEDEF moe_status moe_combine_forward_cuda(moe_cuda *c, float *y, const float *eout, const moe_assign *a, int d,
                                           int accumulate);
MOEDEF moe_status moe_combine_backward_cuda(moe_cuda *c, float *deout, float *dweight, const float *dy,
                                            const float *eout, const moe_assign *a, int d);
/* Softmax top-k routing of the standard router (no selection bias, capacity or noise):
   probs (T, E) -> topk (T, K) experts in rank order, gates (T, E) (zero off the chosen), and
   the raw list token-major (t, slot): raw_* (T * K). */
MOEDEF moe_status moe_topk_select_cuda(moe_cuda *c, int *topk, float *gates, int *raw_token, int *raw_expert,
                                       int *raw_slot, float *raw_weight, const float *probs, int T, int E, int K,
                                       int renormalize, float routed_scale);
/* d_gates (T, E) = the combine's dweight times routed_scale at each (token, expert), 0 elsewhere */
MOEDEF moe_status moe_gate_grads_cuda(moe_cuda *c, float *d_gates, const float *dweight, const moe_assign *a,
                                      float routed_scale);
/* d_logits (T, E) += the softmax top-k backward (the CPU's moe__topk_backward_token) */
MOEDEF moe_status moe_topk_backward_cuda(moe_cuda *c, float *d_logits, const float *d_gates, const float *gates,
                                         const float *probs, const int *topk, int T, int E, int K, int renormalize);

#endif /* MOE_CUDA */

/* @implementation */
/* ============================================================================================
   >>moe:cuda_kernels
   ============================================================================================ */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

/* ---- matmul: the bias and its gradient (the products are cuBLAS's) ---- */

/* out (M, N): row r = bias (the GEMM then adds the product) */
MOE__BODY void moe__cuda_bias_fill_body(int bx, int tx, int bdx, float *out, const float *bias, long long M, int N) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i >= M * N) return;
    out[i] = bias ? bias[i % N] : 0.0f;
}

/* dbias[j] += sum over rows in order of dout[r][j] (moe_matmul_backward_naive's order) */
MOE__BODY void moe__cuda_bias_grad_body(int bx, int tx, int bdx, float *dbias, const float *dout, int M, int N) {
    long long j = moe__cuda_index(bx, tx, bdx);
    float acc = 0.0f;
    int r;
    if (j >= N) return;
    for (r = 0; r < M; r++) acc += dout[(size_t)r * N + j];
    dbias[j] += acc;
}

/* ---- kernels ---- */

MOE__BODY void moe__cuda_softmax_forward_body(int bx, int tx, int bdx, float *out, const float *inp, int rows, int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x;
    float *y, mx = -FLT_MAX, sum = 0.0f, inv;
    int i;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    y = out + (size_t)r * n;
    for (i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (i = 0; i < n; i++) { y[i] = expf(x[i] - mx); sum += y[i]; }
    inv = 1.0f / sum;
    for (i = 0; i < n; i++) y[i] *= inv;
}

MOE__BODY void moe__cuda_softmax_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                               const float *out, int rows, int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *dy, *y;
    float *dx, dot = 0.0f;
    int i;
    if (r >= rows) return;
    dy = dout + (size_t)r * n;
    y = out + (size_t)r * n;
    dx = dinp + (size_t)r * n;
    for (i = 0; i < n; i++) dot += dy[i] * y[i];
    for (i = 0; i < n; i++) dx[i] += y[i] * (dy[i] - dot);
}

/* moe__sigmoid, moe__act and moe__act_grad, callable on the device */
MOE__BODY float moe__cuda_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

MOE__BODY float moe__cuda_act(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: return x * moe__cuda_sigmoid(x);
    case MOE_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    case MOE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

MOE__BODY float moe__cuda_act_grad(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: {
        float s = moe__cuda_sigmoid(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case MOE_ACT_GELU: {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case MOE_ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
    }
    return 1.0f;
}

MOE__BODY void moe__cuda_activation_forward_body(int bx, int tx, int bdx, float *out, const float *inp, long long n,
                                                 moe_activation act) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = moe__cuda_act(inp[i], act);
}

MOE__BODY void moe__cuda_activation_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                                  const float *inp, long long n, moe_activation act) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) dinp[i] += dout[i] * moe__cuda_act_grad(inp[i], act);
}

MOE__BODY void moe__cuda_swiglu_forward_body(int bx, int tx, int bdx, float *out, const float *gate, const float *up,
                                             long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i < n) out[i] = gate[i] * moe__cuda_sigmoid(gate[i]) * up[i];
}

MOE__BODY void moe__cuda_swiglu_backward_body(int bx, int tx, int bdx, float *dgate, float *dup, const float *dout,
                                              const float *gate, const float *up, long long n) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float s, silu;
    if (i >= n) return;
    s = moe__cuda_sigmoid(gate[i]);
    silu = gate[i] * s;
    dgate[i] += dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
    dup[i] += dout[i] * silu;
}

MOE__BODY void moe__cuda_rmsnorm_forward_body(int bx, int tx, int bdx, float *out, float *rstd, const float *inp,
                                              const float *weight, int rows, int n, float eps) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x;
    float *y, ss = 0.0f, rs;
    int i;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    y = out + (size_t)r * n;
    for (i = 0; i < n; i++) ss += x[i] * x[i];
    rs = 1.0f / sqrtf(ss / (float)n + eps);
    rstd[r] = rs;
    for (i = 0; i < n; i++) y[i] = x[i] * rs * weight[i];
}

/* dx of one row */
MOE__BODY void moe__cuda_rmsnorm_backward_body(int bx, int tx, int bdx, float *dinp, const float *dout,
                                               const float *inp, const float *weight, const float *rstd, int rows,
                                               int n) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *x, *dy;
    float *dx, rs, dot = 0.0f;
    int j;
    if (r >= rows) return;
    x = inp + (size_t)r * n;
    dy = dout + (size_t)r * n;
    dx = dinp + (size_t)r * n;
    rs = rstd[r];
    for (j = 0; j < n; j++) dot += weight[j] * dy[j] * x[j];
    dot /= (float)n;
    for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - x[j] * rs * rs * dot);
}

/* dweight of one column, rows in order (deterministic mode) */
MOE__BODY void moe__cuda_rmsnorm_dweight_body(int bx, int tx, int bdx, float *dweight, const float *dout,
                                              const float *inp, const float *rstd, int rows, int n) {
    long long j = moe__cuda_index(bx, tx, bdx);
    float acc = 0.0f;
    int r;
    if (j >= n) return;
    for (r = 0; r < rows; r++) acc += dout[(size_t)r * n + j] * inp[(size_t)r * n + j] * rstd[r];
    dweight[j] += acc;
}

/* moe__expf_poly, callable on the device */
MOE__BODY float moe__cuda_expf_poly(float z) {
    float zc = z > -87.0f ? (z < 87.0f ? z : 87.0f) : -87.0f;
    float k = (zc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (zc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return z == z ? p * scale : z;
}

/* moe__max_lanes and moe__sum_exp_lanes: the same 16 lanes in the same order */
MOE__BODY float moe__cuda_max_lanes(const float *x, int n) {
    float m[16], mx;
    int u, j, n16 = n / 16 * 16;
    for (j = 0; j < 16; j++) m[j] = -FLT_MAX;
    for (u = 0; u < n16; u += 16)
        for (j = 0; j < 16; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    for (j = 0; u + j < n; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    mx = m[0];
    for (j = 1; j < 16; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

MOE__BODY float moe__cuda_sum_exp_lanes(const float *x, int n, float mx) {
    float acc[16], sum = 0.0f;
    int u, j, n16 = n / 16 * 16;
    for (j = 0; j < 16; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += 16)
        for (j = 0; j < 16; j++) acc[j] += moe__cuda_expf_poly(x[u + j] - mx);
    for (j = 0; u + j < n; j++) acc[j] += moe__cuda_expf_poly(x[u + j] - mx);
    for (j = 0; j < 16; j++) sum += acc[j];
    return sum;
}

MOE__BODY void moe__cuda_crossentropy_forward_body(int bx, int tx, int bdx, float *losses, const float *logits,
                                                   const int *targets, int rows, int V) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *z;
    float mx;
    int t;
    if (r >= rows) return;
    z = logits + (size_t)r * V;
    t = targets[r];
    if (t < 0 || t >= V) { losses[r] = 0.0f; return; }
    mx = moe__cuda_max_lanes(z, V);
    losses[r] = (float)(log((double)moe__cuda_sum_exp_lanes(z, V, mx)) + mx - z[t]);
}

/* one thread: the mean over counted rows, in row order (the CPU's double sum) */
MOE__BODY void moe__cuda_crossentropy_mean_body(int bx, int tx, int bdx, double *mean, const float *losses,
                                                const int *targets, int rows, int V) {
    double total = 0.0;
    int r, count = 0;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    for (r = 0; r < rows; r++)
        if (targets[r] >= 0 && targets[r] < V) { total += losses[r]; count++; }
    mean[0] = count ? total / count : 0.0;
}

MOE__BODY void moe__cuda_crossentropy_backward_body(int bx, int tx, int bdx, float *dlogits, const float *logits,
                                                    const int *targets, int rows, int V, float dloss) {
    long long r = moe__cuda_index(bx, tx, bdx);
    const float *z;
    float *dz, mx, inv;
    int t, i;
    if (r >= rows) return;
    z = logits + (size_t)r * V;
    dz = dlogits + (size_t)r * V;
    t = targets[r];
    if (t < 0 || t >= V) return;
    mx = moe__cuda_max_lanes(z, V);
    inv = 1.0f / moe__cuda_sum_exp_lanes(z, V, mx);
    for (i = 0; i < V; i++) dz[i] += dloss * (moe__cuda_expf_poly(z[i] - mx) * inv - (i == t ? 1.0f : 0.0f));
}

/* ---- attention: moe_attention_forward_naive / backward_naive, one (b, h, t) per thread ---- */

MOE__BODY void moe__cuda_attention_forward_body(int bx, int tx, int bdx, float *out, float *att, const float *qkv,
                                                int B, int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    const float *q;
    float *P, *o;
    double maxv = -HUGE_VAL, sum = 0.0;
    if (id >= (long long)B * NH * T) return;
    t = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    q = qkv + ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
    P = att + (((size_t)b * NH + h) * T + t) * T;
    o = out + ((size_t)b * T + t) * d + (size_t)h * hd;
    for (u = 0; u <= t; u++) {
        const float *k = qkv + ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd;
        double s = 0.0;
        for (i = 0; i < hd; i++) s += (double)q[i] * k[i];
        P[u] = (float)(s * scale);
        if (P[u] > maxv) maxv = P[u];
    }
    for (u = 0; u <= t; u++) sum += exp(P[u] - maxv);
    for (u = 0; u <= t; u++) P[u] = (float)(exp(P[u] - maxv) / sum);
    for (u = t + 1; u < T; u++) P[u] = 0.0f;
    for (i = 0; i < hd; i++) {
        double s = 0.0;
        for (u = 0; u <= t; u++) s += (double)P[u] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
        o[i] = (float)s;
    }
}

/* query row (b, h, t): dot[row] = sum_u P[u] dP[u], and dq[t] = sum_u dS[u] k[u] summed in u
   order as the naive loop does (dq[t] is owned by this row alone) */
MOE__BODY void moe__cuda_attention_backward_q_body(int bx, int tx, int bdx, float *dqkv, double *dot_out,
                                                   const float *dout, const float *qkv, const float *att, int B,
                                                   int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    size_t qt;
    const float *P, *dy;
    double dot = 0.0;
    if (id >= (long long)B * NH * T) return;
    t = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    qt = ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
    P = att + (((size_t)b * NH + h) * T + t) * T;
    dy = dout + ((size_t)b * T + t) * d + (size_t)h * hd;
    for (u = 0; u <= t; u++) {
        double dp = 0.0;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[((size_t)b * T + u) * 3 * d + 2 * d + (size_t)h * hd + i];
        dot += P[u] * dp;
    }
    dot_out[id] = dot;
    for (i = 0; i < hd; i++) dqkv[qt + i] = 0.0f;
    for (u = 0; u <= t; u++) {
        size_t ku = ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd, vu = ku + d;
        double dp = 0.0, ds;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[vu + i];
        ds = P[u] * (dp - dot) * scale;
        for (i = 0; i < hd; i++) dqkv[qt + i] += (float)(ds * qkv[ku + i]);
    }
}

/* key row (b, h, u): dk[u] = sum over t >= u of dS[t][u] q[t], dv[u] = sum of P[t][u] dy[t],
   in t order as the naive loop adds them */
MOE__BODY void moe__cuda_attention_backward_kv_body(int bx, int tx, int bdx, float *dqkv, const double *dot_in,
                                                    const float *dout, const float *qkv, const float *att, int B,
                                                    int T, int d, int NH) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, b, h, t, u, i;
    float scale = 1.0f / sqrtf((float)hd);
    size_t ku, vu;
    if (id >= (long long)B * NH * T) return;
    u = (int)(id % T);
    h = (int)(id / T % NH);
    b = (int)(id / T / NH);
    ku = ((size_t)b * T + u) * 3 * d + d + (size_t)h * hd;
    vu = ku + d;
    for (i = 0; i < hd; i++) dqkv[ku + i] = dqkv[vu + i] = 0.0f;
    for (t = u; t < T; t++) {
        size_t qt = ((size_t)b * T + t) * 3 * d + (size_t)h * hd;
        const float *dy = dout + ((size_t)b * T + t) * d + (size_t)h * hd;
        float Pu = att[(((size_t)b * NH + h) * T + t) * T + u];
        double dp = 0.0, ds;
        for (i = 0; i < hd; i++) dp += (double)dy[i] * qkv[vu + i];
        ds = Pu * (dp - dot_in[((size_t)b * NH + h) * T + t]) * scale;
        for (i = 0; i < hd; i++) {
            dqkv[ku + i] += (float)(ds * qkv[qt + i]);
            dqkv[vu + i] += Pu * dy[i];
        }
    }
}

/* one (row, head, q or k) per thread */
MOE__BODY void moe__cuda_rope_body(int bx, int tx, int bdx, float *qkv, const float *cos_sin, int B, int T, int d,
                                   int NH, int inverse) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int hd = d / NH, half = hd / 2, row, part, h, t, i;
    const float *cs;
    float *x;
    if (id >= (long long)B * T * 2 * NH) return;
    h = (int)(id % NH);
    part = (int)(id / NH % 2);
    row = (int)(id / NH / 2);
    t = row % T;
    cs = cos_sin + (size_t)t * half * 2;
    x = qkv + (size_t)row * 3 * d + (size_t)part * d + (size_t)h * hd;
    for (i = 0; i < half; i++) {
        float c = cs[2 * i], s = inverse ? -cs[2 * i + 1] : cs[2 * i + 1];
        float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/* ---- dispatch: the stable counting sort as per-expert and per-token threads ---- */

/* expert e: its count (offset[e + 1]; the scan makes offsets of the counts) */
MOE__BODY void moe__cuda_dispatch_count_body(int bx, int tx, int bdx, int *offset, const int *token, const int *expert,
                                             int n, int T, int E) {
    long long e = moe__cuda_index(bx, tx, bdx);
    int i, count = 0;
    if (e > E) return;
    if (e == E) { offset[0] = 0; return; }
    for (i = 0; i < n; i++) count += expert[i] == e && token[i] >= 0 && token[i] < T;
    offset[e + 1] = count;
}

/* one thread: counts (v[1..m]) to offsets (v[0] = 0) */
MOE__BODY void moe__cuda_scan_body(int bx, int tx, int bdx, int *v, int m) {
    int i;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    v[0] = 0;
    for (i = 0; i < m; i++) v[i + 1] += v[i];
}

/* expert e: its assignments in input order (stable) */
MOE__BODY void moe__cuda_dispatch_place_body(int bx, int tx, int bdx, int *a_token, int *a_expert, int *a_slot,
                                             float *a_weight, const int *offset, const int *token, const int *expert,
                                             const int *slot, const float *weight, int n, int T, int E) {
    long long e = moe__cuda_index(bx, tx, bdx);
    int i, pos;
    if (e >= E) return;
    pos = offset[e];
    for (i = 0; i < n; i++)
        if (expert[i] == e && token[i] >= 0 && token[i] < T) {
            a_token[pos] = token[i];
            a_expert[pos] = (int)e;
            a_slot[pos] = slot[i];
            a_weight[pos] = weight[i];
            pos++;
        }
}

/* token t: how many assignments it has (tok_offset[t + 1]) */
MOE__BODY void moe__cuda_dispatch_token_count_body(int bx, int tx, int bdx, int *tok_offset, const int *a_token,
                                                   int n, int T) {
    long long t = moe__cuda_index(bx, tx, bdx);
    int i, count = 0;
    if (t > T) return;
    if (t == T) { tok_offset[0] = 0; return; }
    for (i = 0; i < n; i++) count += a_token[i] == t;
    tok_offset[t + 1] = count;
}

/* token t: its positions in the grouped list, then sorted by slot (insertion sort, as the CPU) */
MOE__BODY void moe__cuda_dispatch_token_fill_body(int bx, int tx, int bdx, int *tok_index, const int *tok_offset,
                                                  const int *a_token, const int *a_slot, int n, int T) {
    long long t = moe__cuda_index(bx, tx, bdx);
    int i, j, lo, hi, fill;
    if (t >= T) return;
    lo = tok_offset[t];
    hi = tok_offset[t + 1];
    fill = lo;
    for (i = 0; i < n && fill < hi; i++)
        if (a_token[i] == t) tok_index[fill++] = i;
    for (i = lo + 1; i < hi; i++) {
        int v = tok_index[i];
        for (j = i - 1; j >= lo && a_slot[tok_index[j]] > a_slot[v]; j--) tok_index[j + 1] = tok_index[j];
        tok_index[j + 1] = v;
    }
}

/* xg element (i, j) = x[token[i]][j] */
MOE__BODY void moe__cuda_gather_body(int bx, int tx, int bdx, float *xg, const float *x, const int *a_token, int n, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    if (id >= (long long)n * d) return;
    xg[id] = x[(size_t)a_token[id / d] * d + id % d];
}

/* dx element (t, j) += the token's dxg rows in slot order (deterministic) */
MOE__BODY void moe__cuda_gather_backward_body(int bx, int tx, int bdx, float *dx, const float *dxg,
                                              const int *tok_offset, const int *tok_index, int T, int d) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, k;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = dx[id];
    for (k = tok_offset[t]; k < tok_offset[t + 1]; k++) o += dxg[(size_t)tok_index[k] * d + j];
    dx[id] = o;
}

/* y element (t, j) (+)= the token's weighted expert outputs in slot order (deterministic) */
MOE__BODY void moe__cuda_combine_forward_body(int bx, int tx, int bdx, float *y, const float *eout, const float *a_weight,
                                              const int *tok_offset, const int *tok_index, int T, int d,
                                              int accumulate) {
    long long id = moe__cuda_index(bx, tx, bdx);
    int t, j, k;
    float o;
    if (id >= (long long)T * d) return;
    t = (int)(id / d);
    j = (int)(id % d);
    o = accumulate ? y[id] : 0.0f;
    for (k = tok_offset[t]; k < tok_offset[t + 1]; k++) {
        int pos = tok_index[k];
        o += a_weight[pos] * eout[(size_t)pos * d + j];
    }
    y[id] = o;
}

/* assignment i: deout row and the weight's gradient */
MOE__BODY void moe__cuda_combine_backward_body(int bx, int tx, int bdx, float *deout, float *dweight, const float *dy,
                                               const float *eout, const int *a_token, const float *a_weight, int n,
                                               int d) {
    long long i = moe__cuda_index(bx, tx, bdx);
    const float *g, *e;
    float *o, w, acc[MOE__LANES];
    int j, u, h;
    if (i >= n) return;
    g = dy + (size_t)a_token[i] * d;
    e = eout + (size_t)i * d;
    o = deout + (size_t)i * d;
    w = a_weight[i];
    for (j = 0; j < d; j++) o[j] = w * g[j];
    /* moe__dot_lanes's lanes and order, so the CPU's bits; constant lane indices once the
       inner loops unroll, so acc stays in registers */
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u + MOE__LANES <= d; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += g[u + j] * e[u + j];
    for (j = 0; u + j < d; j++) acc[j] += g[u + j] * e[u + j];
    for (h = MOE__LANES / 2; h >= 1; h /= 2)
        for (j = 0; j < h; j++) acc[j] += acc[j + h];
    if (dweight) dweight[i] = acc[0];
}

/* ---- routing: softmax top-k ---- */

/* moe__ranks_above: a ranks above b (NaN lowest, ties to the lower index) */
MOE__BODY int moe__cuda_ranks_above(float a, int ia, float b, int ib) {
    if (a != a || b != b) return (b != b) && (a == a || ia < ib);
    return a > b || (a == b && ia < ib);
}

/* token t: moe__topk_row then moe__topk_select's weights; the raw list at t * K + slot */
MOE__BODY void moe__cuda_topk_select_body(int bx, int tx, int bdx, int *topk, float *gates, int *raw_token,
                                          int *raw_expert, int *raw_slot, float *raw_weight, const float *probs,
                                          int T, int E, int K, int renormalize, float routed_scale) {
    long long t = moe__cuda_index(bx, tx, bdx);
    const float *p;
    int *idx, s, j;
    float *g;
    if (t >= T) return;
    p = probs + (size_t)t * E;
    idx = topk + (size_t)t * K;
    g = gates + (size_t)t * E;
    for (s = 0; s < K; s++) {
        int best = -1;
        for (j = 0; j < E; j++) {
            if (s > 0 && !moe__cuda_ranks_above(p[idx[s - 1]], idx[s - 1], p[j], j)) continue;
            if (best < 0 || moe__cuda_ranks_above(p[j], j, p[best], best)) best = j;
        }
        idx[s] = best;
    }
    for (j = 0; j < E; j++) g[j] = 0.0f;
    if (renormalize) {
        float sum = 0.0f;
        for (s = 0; s < K; s++) sum += p[idx[s]];
        if (sum < 1e-20f) sum = 1e-20f;
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]] / sum;
    } else {
        for (s = 0; s < K; s++) g[idx[s]] = p[idx[s]];
    }
    for (s = 0; s < K; s++) {
        size_t o = (size_t)t * K + s;
        raw_token[o] = (int)t;
        raw_expert[o] = idx[s];
        raw_slot[o] = s;
        raw_weight[o] = g[idx[s]] * routed_scale;
    }
}

/* assignment i: its weight's gradient into d_gates (each (token, expert) pair occurs once) */
MOE__BODY void moe__cuda_gate_grads_body(int bx, int tx, int bdx, float *d_gates, const float *dweight,
                                         const int *a_token, const int *a_expert, int n, int E, float routed_scale) {
    long long i = moe__cuda_index(bx, tx, bdx);
    if (i >= n) return;
    d_gates[(size_t)a_token[i] * E + a_expert[i]] = dweight[i] * routed_scale;
}

/* token t: moe__topk_backward_token (renormalised) or the full softmax's backward */
MOE__BODY void moe__cuda_topk_backward_body(int bx, int tx, int bdx, float *d_logits, const float *d_gates,
                                            const float *gates, const float *probs, const int *topk, int T, int E,
                                            int K, int renormalize) {
    long long t = moe__cuda_index(bx, tx, bdx);
    size_t r;
    const float *g, *dg, *p;
    const int *idx;
    float *dz, dot = 0.0f;
    int s, e;
    if (t >= T) return;
    r = (size_t)t * E;
    g = gates + r;
    dg = d_gates + r;
    p = probs + r;
    idx = topk + (size_t)t * K;
    dz = d_logits + r;
    if (!renormalize) {
        for (e = 0; e < E; e++) dot += dg[e] * p[e];
        for (e = 0; e < E; e++) dz[e] += p[e] * (dg[e] - dot);
        return;
    }
    for (s = 0; s < K; s++) dot += dg[idx[s]] * g[idx[s]];
    for (s = 0; s < K; s++) dz[idx[s]] += g[idx[s]] * (dg[idx[s]] - dot);
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA

/* one __global__ per body: the kernel passes its indices and nothing else */
#define MOE__KERNEL(name, params, args) \
    __global__ void moe__k_##name params { moe__cuda_##name##_body(blockIdx.x, threadIdx.x, blockDim.x, args); }
#define MOE__A(...) __VA_ARGS__
MOE__KERNEL(bias_fill, (float *out, const float *bias, long long M, int N), MOE__A(out, bias, M, N))
MOE__KERNEL(bias_grad, (float *dbias, const float *dout, int M, int N), MOE__A(dbias, dout, M, N))
MOE__KERNEL(softmax_forward, (float *out, const float *inp, int rows, int n), MOE__A(out, inp, rows, n))
MOE__KERNEL(softmax_backward, (float *dinp, const float *dout, const float *out, int rows, int n),
            MOE__A(dinp, dout, out, rows, n))
MOE__KERNEL(activation_forward, (float *out, const float *inp, long long n, moe_activation act), MOE__A(out, inp, n, act))
MOE__KERNEL(activation_backward, (float *dinp, const float *dout, const float *inp, long long n, moe_activation act),
            MOE__A(dinp, dout, inp, n, act))
MOE__KERNEL(swiglu_forward, (float *out, const float *gate, const float *up, long long n), MOE__A(out, gate, up, n))
MOE__KERNEL(swiglu_backward, (float *dgate, float *dup, const float *dout, const float *gate, const float *up, long long n),
            MOE__A(dgate, dup, dout, gate, up, n))
MOE__KERNEL(rmsnorm_forward, (float *out, float *rstd, const float *inp, const float *weight, int rows, int n, float eps),
            MOE__A(out, rstd, inp, weight, rows, n, eps))
MOE__KERNEL(rmsnorm_backward, (float *dinp, const float *dout, const float *inp, const float *weight, const float *rstd,
                               int rows, int n),
            MOE__A(dinp, dout, inp, weight, rstd, rows, n))
MOE__KERNEL(rmsnorm_dweight, (float *dweight, const float *dout, const float *inp, const float *rstd, int rows, int n),
            MOE__A(dweight, dout, inp, rstd, rows, n))
MOE__KERNEL(crossentropy_forward, (float *losses, const float *logits, const int *targets, int rows, int V),
            MOE__A(losses, logits, targets, rows, V))
MOE__KERNEL(crossentropy_mean, (double *mean, const float *losses, const int *targets, int rows, int V),
            MOE__A(mean, losses, targets, rows, V))
MOE__KERNEL(crossentropy_backward, (float *dlogits, const float *logits, const int *targets, int rows, int V, float dloss),
            MOE__A(dlogits, logits, targets, rows, V, dloss))
MOE__KERNEL(attention_forward, (float *out, float *att, const float *qkv, int B, int T, int d, int NH),
            MOE__A(out, att, qkv, B, T, d, NH))
MOE__KERNEL(attention_backward_q, (float *dqkv, double *dot, const float *dout, const float *qkv, const float *att, int B,
                                   int T, int d, int NH),
            MOE__A(dqkv, dot, dout, qkv, att, B, T, d, NH))
MOE__KERNEL(attention_backward_kv, (float *dqkv, const double *dot, const float *dout, const float *qkv, const float *att,
                                    int B, int T, int d, int NH),
            MOE__A(dqkv, dot, dout, qkv, att, B, T, d, NH))
MOE__KERNEL(rope, (float *qkv, const float *cos_sin, int B, int T, int d, int NH, int inverse),
            MOE__A(qkv, cos_sin, B, T, d, NH, inverse))
MOE__KERNEL(dispatch_count, (int *offset, const int *token, const int *expert, int n, int T, int E),
            MOE__A(offset, token, expert, n, T, E))
MOE__KERNEL(scan, (int *v, int m), MOE__A(v, m))
MOE__KERNEL(dispatch_place, (int *a_token, int *a_expert, int *a_slot, float *a_weight, const int *offset, const int *token,
                             const int *expert, const int *slot, const float *weight, int n, int T, int E),
            MOE__A(a_token, a_expert, a_slot, a_weight, offset, token, expert, slot, weight, n, T, E))
MOE__KERNEL(dispatch_token_count, (int *tok_offset, const int *a_token, int n, int T), MOE__A(tok_offset, a_token, n, T))
MOE__KERNEL(dispatch_token_fill, (int *tok_index, const int *tok_offset, const int *a_token, const int *a_slot, int n, int T),
            MOE__A(tok_index, tok_offset, a_token, a_slot, n, T))
MOE__KERNEL(gather, (float *xg, const float *x, const int *a_token, int n, int d), MOE__A(xg, x, a_token, n, d))
MOE__KERNEL(gather_backward, (float *dx, const float *dxg, const int *tok_offset, const int *tok_index, int T, int d),
            MOE__A(dx, dxg, tok_offset, tok_index, T, d))
MOE__KERNEL(combine_forward, (float *y, const float *eout, const float *a_weight, const int *tok_offset,
                              const int *tok_index, int T, int d, int accumulate),
            MOE__A(y, eout, a_weight, tok_offset, tok_index, T, d, accumulate))
MOE__KERNEL(combine_backward, (float *deout, float *dweight, const float *dy, const float *eout, const int *a_token,
                               const float *a_weight, int n, int d),
            MOE__A(deout, dweight, dy, eout, a_token, a_weight, n, d))
MOE__KERNEL(topk_select, (int *topk, float *gates, int *raw_token, int *raw_expert, int *raw_slot, float *raw_weight,
                          const float *probs, int T, int E, int K, int renormalize, float routed_scale),
            MOE__A(topk, gates, raw_token, raw_expert, raw_slot, raw_weight, probs, T, E, K, renormalize, routed_scale))
MOE__KERNEL(gate_grads, (float *d_gates, const float *dweight, const int *a_token, const int *a_expert, int n, int E,
                         float routed_scale),
            MOE__A(d_gates, dweight, a_token, a_expert, n, E, routed_scale))
MOE__KERNEL(topk_backward, (float *d_logits, const float *d_gates, const float *gates, const float *probs, const int *topk,
                            int T, int E, int K, int renormalize),
            MOE__A(d_logits, d_gates, gates, probs, topk, T, E, K, renormalize))

/* The fast mode's scatters: one thread per element, atomics into the shared rows. */
__global__ void moe__k_gather_backward_atomic(float *dx, const float *dxg, const int *a_token, int n, int d) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)n * d) atomicAdd(&dx[(size_t)a_token[id / d] * d + id % d], dxg[id]);
}
__global__ void moe__k_combine_forward_atomic(float *y, const float *eout, const int *a_token, const float *a_weight, int n,
                                              int d) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)n * d) atomicAdd(&y[(size_t)a_token[id / d] * d + id % d], a_weight[id / d] * eout[id]);
}
__global__ void moe__k_rmsnorm_dweight_atomic(float *dweight, const float *dout, const float *inp, const float *rstd,
                                              int rows, int n) {
    long long id = moe__cuda_index(blockIdx.x, threadIdx.x, blockDim.x);
    if (id < (long long)rows * n) atomicAdd(&dweight[id % n], dout[id] * inp[id] * rstd[id / n]);
}

/* launch over `count` threads in blocks of `block`; nothing to do for count 0 */
#define MOE__LAUNCH(c, name, count, block, ...)                                                   \
    do {                                                                                          \
        long long moe__n = (long long)(count);                                                    \
        if (moe__n > 0) {                                                                         \
            moe__k_##name<<<moe__cuda_blocks(moe__n, (block)), (block)>>>(__VA_ARGS__);           \
            MOE__CUDA_LAUNCHED(c, "the " #name " kernel");                                        \
        }                                                                                         \
    } while (0)
#define MOE__ROWS 128 /* threads per block of the per-row kernels */

MOE__IMPL moe_status moe_matmul_forward_cuda(moe_cuda *c, float *out, const float *inp, const float *weight,
                                             const float *bias, int M, int K, int N) {
    const float one = 1.0f, zero = 0.0f;
    if (M <= 0 || N <= 0) return MOE_OK;
    if (bias) MOE__LAUNCH(c, bias_fill, (long long)M * N, MOE__CUDA_BLOCK, out, bias, (long long)M, N);
    /* row-major out (M,N) = inp (M,K) W(N,K)^T is column-major out^T (N,M) = W^T... : op(W) = T */
    return moe__cublas_check(c, cublasSgemm((cublasHandle_t)c->cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, weight, K,
                                            inp, K, bias ? &one : &zero, out, N),
                             "cublasSgemm (matmul forward)");
}

MOE__IMPL moe_status moe_matmul_backward_cuda(moe_cuda *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                              const float *inp, const float *weight, int M, int K, int N) {
    const float one = 1.0f;
    cublasHandle_t h = (cublasHandle_t)c->cublas;
    moe_status s;
    if (M <= 0 || N <= 0 || K <= 0) return MOE_OK;
    /* dinp (M,K) += dout (M,N) W (N,K): column-major dinp^T (K,M) = W^T (K,N) dout^T (N,M) */
    if (dinp && (s = moe__cublas_check(c, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, K, M, N, &one, weight, K, dout, N, &one,
                                                      dinp, K), "cublasSgemm (matmul backward, input)")) != MOE_OK)
        return s;
    /* dW (N,K) += dout^T (N,M) inp (M,K): column-major dW^T (K,N) = inp^T (K,M) dout (M,N) */
    if (dweight && (s = moe__cublas_check(c, cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, K, N, M, &one, inp, K, dout, N, &one,
                                                         dweight, K), "cublasSgemm (matmul backward, weight)")) != MOE_OK)
        return s;
    if (dbias) MOE__LAUNCH(c, bias_grad, N, MOE__ROWS, dbias, dout, M, N);
    return MOE_OK;
}

MOE__IMPL moe_status moe_softmax_forward_cuda(moe_cuda *c, float *out, const float *inp, int rows, int n) {
    MOE__LAUNCH(c, softmax_forward, rows, MOE__ROWS, out, inp, rows, n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_softmax_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *out, int rows, int n) {
    MOE__LAUNCH(c, softmax_backward, rows, MOE__ROWS, dinp, dout, out, rows, n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_activation_forward_cuda(moe_cuda *c, float *out, const float *inp, size_t n, moe_activation act) {
    MOE__LAUNCH(c, activation_forward, n, MOE__CUDA_BLOCK, out, inp, (long long)n, act);
    return MOE_OK;
}

MOE__IMPL moe_status moe_activation_backward_cuda(moe_cuda *c, float *dinp, const float *dout, const float *inp, size_t n,
                                                  moe_activation act) {
    MOE__LAUNCH(c, activation_backward, n, MOE__CUDA_BLOCK, dinp, dout, inp, (long long)n, act);
    return MOE_OK;
}

MOE__IMPL moe_status moe_swiglu_forward_cuda(moe_cuda *c, float *out, const float *gate, const float *up, size_t n) {
    MOE__LAUNCH(c, swiglu_forward, n, MOE__CUDA_BLOCK, out, gate, up, (long long)n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_swiglu_backward_cuda(moe_cuda *c, float *dgate, float *dup, const float *dout, const float *gate,
                                              const float *up, size_t n) {
    MOE__LAUNCH(c, swiglu_backward, n, MOE__CUDA_BLOCK, dgate, dup, dout, gate, up, (long long)n);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rmsnorm_forward_cuda(moe_cuda *c, float *out, float *rstd, const float *inp, const float *weight,
                                              int rows, int n, float eps) {
    MOE__LAUNCH(c, rmsnorm_forward, rows, MOE__ROWS, out, rstd, inp, weight, rows, n, eps);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rmsnorm_backward_cuda(moe_cuda *c, float *dinp, float *dweight, const float *dout,
                                               const float *inp, const float *weight, const float *rstd, int rows, int n) {
    MOE__LAUNCH(c, rmsnorm_backward, rows, MOE__ROWS, dinp, dout, inp, weight, rstd, rows, n);
    if (dweight) {
        if (c->mode == MOE_CUDA_FAST)
            MOE__LAUNCH(c, rmsnorm_dweight_atomic, (long long)rows * n, MOE__CUDA_BLOCK, dweight, dout, inp, rstd, rows, n);
        else
            MOE__LAUNCH(c, rmsnorm_dweight, n, MOE__ROWS, dweight, dout, inp, rstd, rows, n);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_crossentropy_forward_cuda(moe_cuda *c, float *losses, const float *logits, const int *targets,
                                                   int rows, int V, double *mean) {
    MOE__LAUNCH(c, crossentropy_forward, rows, MOE__ROWS, losses, logits, targets, rows, V);
    if (mean) {
        MOE__LAUNCH(c, crossentropy_mean, 1, 1, c->scalars, losses, targets, rows, V);
        return moe_cuda_download(c, mean, c->scalars, sizeof *mean);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_crossentropy_backward_cuda(moe_cuda *c, float *dlogits, const float *logits, const int *targets,
                                                    int rows, int V, float dloss) {
    MOE__LAUNCH(c, crossentropy_backward, rows, MOE__ROWS, dlogits, logits, targets, rows, V, dloss);
    return MOE_OK;
}

MOE__IMPL moe_status moe_attention_forward_cuda(moe_cuda *c, float *out, float *att, const float *qkv, int B, int T, int d,
                                                int NH) {
    if (NH <= 0 || d % NH) return moe_err_set(&c->err, MOE_ERR_SHAPE, "attention: d = %d is not a multiple of %d heads", d, NH);
    MOE__LAUNCH(c, attention_forward, (long long)B * NH * T, 64, out, att, qkv, B, T, d, NH);
    return MOE_OK;
}

MOE__IMPL moe_status moe_attention_backward_cuda(moe_cuda *c, float *dqkv, const float *dout, const float *qkv,
                                                 const float *att, int B, int T, int d, int NH, double *dot) {
    long long rows = (long long)B * NH * T;
    if (NH <= 0 || d % NH) return moe_err_set(&c->err, MOE_ERR_SHAPE, "attention: d = %d is not a multiple of %d heads", d, NH);
    /* the q rows first (they write dot), then the k and v rows that read it */
    MOE__LAUNCH(c, attention_backward_q, rows, 64, dqkv, dot, dout, qkv, att, B, T, d, NH);
    MOE__LAUNCH(c, attention_backward_kv, rows, 64, dqkv, dot, dout, qkv, att, B, T, d, NH);
    return MOE_OK;
}

MOE__IMPL moe_status moe_rope_apply_cuda(moe_cuda *c, float *qkv, const float *cos_sin, int B, int T, int d, int NH,
                                         int inverse) {
    MOE__LAUNCH(c, rope, (long long)B * T * 2 * NH, MOE__ROWS, qkv, cos_sin, B, T, d, NH, inverse);
    return MOE_OK;
}

MOE__IMPL moe_status moe_assign_alloc_cuda(moe_cuda *c, moe_assign *a, int cap, int T, int E) {
    moe_status s;
    size_t ci = sizeof(int) * (size_t)(cap > 0 ? cap : 1);
    memset(a, 0, sizeof *a);
    a->T = T;
    a->E = E;
    if ((s = moe_cuda_malloc(c, (void **)&a->token, ci)) != MOE_OK || (s = moe_cuda_malloc(c, (void **)&a->expert, ci)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->slot, ci)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->weight, sizeof(float) * (size_t)(cap > 0 ? cap : 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->offset, sizeof(int) * (size_t)(E + 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->tok_offset, sizeof(int) * (size_t)(T + 1))) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&a->tok_index, ci)) != MOE_OK) {
        moe_assign_free_cuda(a);
        return s;
    }
    return MOE_OK;
}

MOE__IMPL void moe_assign_free_cuda(moe_assign *a) {
    moe_cuda_mfree(a->token);
    moe_cuda_mfree(a->expert);
    moe_cuda_mfree(a->slot);
    moe_cuda_mfree(a->weight);
    moe_cuda_mfree(a->offset);
    moe_cuda_mfree(a->tok_offset);
    moe_cuda_mfree(a->tok_index);
    memset(a, 0, sizeof *a);
}

MOE__IMPL moe_status moe_dispatch_cuda(moe_cuda *c, moe_assign *a, const int *token, const int *expert, const int *slot,
                                       const float *weight, int n, int T, int E) {
    a->n = n;
    a->T = T;
    a->E = E;
    MOE__LAUNCH(c, dispatch_count, E + 1, MOE__ROWS, a->offset, token, expert, n, T, E);
    MOE__LAUNCH(c, scan, 1, 1, a->offset, E);
    MOE__LAUNCH(c, dispatch_place, E, MOE__ROWS, a->token, a->expert, a->slot, a->weight, a->offset, token, expert, slot,
                weight, n, T, E);
    MOE__LAUNCH(c, dispatch_token_count, T + 1, MOE__ROWS, a->tok_offset, a->token, n, T);
    MOE__LAUNCH(c, scan, 1, 1, a->tok_offset, T);
    MOE__LAUNCH(c, dispatch_token_fill, T, MOE__ROWS, a->tok_index, a->tok_offset, a->token, a->slot, n, T);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gather_cuda(moe_cuda *c, float *xg, const float *x, const moe_assign *a, int d) {
    MOE__LAUNCH(c, gather, (long long)a->n * d, MOE__CUDA_BLOCK, xg, x, a->token, a->n, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gather_backward_cuda(moe_cuda *c, float *dx, const float *dxg, const moe_assign *a, int d) {
    if (c->mode == MOE_CUDA_FAST)
        MOE__LAUNCH(c, gather_backward_atomic, (long long)a->n * d, MOE__CUDA_BLOCK, dx, dxg, a->token, a->n, d);
    else
        MOE__LAUNCH(c, gather_backward, (long long)a->T * d, MOE__CUDA_BLOCK, dx, dxg, a->tok_offset, a->tok_index, a->T, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_combine_forward_cuda(moe_cuda *c, float *y, const float *eout, const moe_assign *a, int d,
                                              int accumulate) {
    if (c->mode == MOE_CUDA_FAST) {
        if (!accumulate && a->T > 0) MOE__CUDA_TRY(c, cudaMemset(y, 0, sizeof(float) * (size_t)a->T * d), "cudaMemset");
        MOE__LAUNCH(c, combine_forward_atomic, (long long)a->n * d, MOE__CUDA_BLOCK, y, eout, a->token, a->weight, a->n, d);
    } else {
        MOE__LAUNCH(c, combine_forward, (long long)a->T * d, MOE__CUDA_BLOCK, y, eout, a->weight, a->tok_offset, a->tok_index,
                    a->T, d, accumulate);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_combine_backward_cuda(moe_cuda *c, float *deout, float *dweight, const float *dy,
                                               const float *eout, const moe_assign *a, int d) {
    MOE__LAUNCH(c, combine_backward, a->n, MOE__ROWS, deout, dweight, dy, eout, a->token, a->weight, a->n, d);
    return MOE_OK;
}

MOE__IMPL moe_status moe_topk_select_cuda(moe_cuda *c, int *topk, float *gates, int *raw_token, int *raw_expert,
                                          int *raw_slot, float *raw_weight, const float *probs, int T, int E, int K,
                                          int renormalize, float routed_scale) {
    if (K < 1 || K > E) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "top-k: k = %d outside [1, %d]", K, E);
    MOE__LAUNCH(c, topk_select, T, MOE__ROWS, topk, gates, raw_token, raw_expert, raw_slot, raw_weight, probs, T, E, K,
                renormalize, routed_scale);
    return MOE_OK;
}

MOE__IMPL moe_status moe_gate_grads_cuda(moe_cuda *c, float *d_gates, const float *dweight, const moe_assign *a,
                                         float routed_scale) {
    if (a->T > 0) MOE__CUDA_TRY(c, cudaMemset(d_gates, 0, sizeof(float) * (size_t)a->T * a->E), "cudaMemset");
    MOE__LAUNCH(c, gate_grads, a->n, MOE__CUDA_BLOCK, d_gates, dweight, a->token, a->expert, a->n, a->E, routed_scale);
    return MOE_OK;
}

MOE__IMPL moe_status moe_topk_backward_cuda(moe_cuda *c, float *d_logits, const float *d_gates, const float *gates,
                                            const float *probs, const int *topk, int T, int E, int K, int renormalize) {
    MOE__LAUNCH(c, topk_backward, T, MOE__ROWS, d_logits, d_gates, gates, probs, topk, T, E, K, renormalize);
    return MOE_OK;
}

#endif /* MOE_CUDA */
