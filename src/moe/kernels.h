/* ============================================================================================
   >>moe:kernels  elementwise, normalisation, loss
   ============================================================================================
   Rows are contiguous. These loops are already the fast form, so each is its own reference;
   tests/test_kernels.c checks every pair by finite differences and against PyTorch. */

typedef enum moe_activation {
    MOE_ACT_SILU = 0,      /* x * sigmoid(x)                                */
    MOE_ACT_GELU = 1,      /* exact, erf form (PyTorch's default)           */
    MOE_ACT_GELU_TANH = 2, /* tanh approximation (GPT-2)                    */
    MOE_ACT_RELU = 3
} moe_activation;

/* softmax over the last dim of (rows, n) */
MOEDEF void moe_softmax_forward(float *out, const float *inp, int rows, int n);
MOEDEF void moe_softmax_backward(float *dinp, const float *dout, const float *out, int rows, int n);
MOEDEF void moe_activation_forward(float *out, const float *inp, size_t n, moe_activation act);
MOEDEF void moe_activation_backward(float *dinp, const float *dout, const float *inp, size_t n,
                                    moe_activation act);
/* SwiGLU: out = silu(gate) * up, elementwise */
MOEDEF void moe_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
MOEDEF void moe_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, size_t n);
/* RMSNorm over (rows, n): out = x * rstd * weight, rstd = 1/sqrt(mean(x^2) + eps) */
MOEDEF void moe_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                                int rows, int n, float eps);
MOEDEF void moe_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                 const float *weight, const float *rstd, int rows, int n);
/* LayerNorm over (rows, n): out = (x - mean) * rstd * weight + bias */
MOEDEF void moe_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                  const float *weight, const float *bias, int rows, int n, float eps);
MOEDEF void moe_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                   const float *inp, const float *weight, const float *mean,
                                   const float *rstd, int rows, int n);
/* Cross-entropy of (rows, V) logits against int targets; targets < 0 are ignored (as
   PyTorch's ignore_index). losses (rows) gets -log p[target] (0 when ignored); returns the
   mean over counted rows (double accumulation). */
MOEDEF double moe_crossentropy_forward(float *losses, const float *logits, const int *targets,
                                       int rows, int V);
/* dlogits += dloss * (softmax(logits) - onehot(target)) for each counted row; dloss is the
   gradient of the loss with respect to each counted row's loss (1/count for a mean). */
MOEDEF void moe_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                      int rows, int V, float dloss);

/* @implementation */
/* ============================================================================================
   >>moe:kernels
   ============================================================================================ */

/* exp for vectorized loops. exp(z) = 2^k exp(r), k = round(z / ln 2), |r| <= ln 2 / 2, exp(r) by
   its degree-6 Taylor polynomial; the relative error is below 3e-7 (a few ulp). z is clamped to
   [-87, 87]; NaN passes through (a diverged run must show in its loss). Used by the SwiGLU
   sigmoid, the attention softmax and the cross-entropy. */
static float moe__expf_poly(float z) {
    float zc = z > -87.0f ? (z < 87.0f ? z : 87.0f) : -87.0f;
    float k = (zc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = (zc - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return z == z ? p * scale : z;
}

/* Row maxima and sums of exponentials in MOE__LANES lanes combined in a fixed order, so the
   loops vectorize and every row gets the same arithmetic wherever it is computed. */
#define MOE__LANES 16

MOE__GEMM_FN float moe__max_lanes(const float *MOE_RESTRICT x, int n) {
    float m[MOE__LANES], mx;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) m[j] = -FLT_MAX;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    for (j = 0; u + j < n; j++) m[j] = x[u + j] > m[j] ? x[u + j] : m[j];
    mx = m[0];
    for (j = 1; j < MOE__LANES; j++) mx = m[j] > mx ? m[j] : mx;
    return mx;
}

/* sum over i < n of exp(scale (x[i] - mx)) */
MOE__GEMM_FN float moe__sum_exp_lanes(const float *MOE_RESTRICT x, int n, float mx, float scale) {
    float acc[MOE__LANES], sum = 0.0f;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; u + j < n; j++) acc[j] += moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; j < MOE__LANES; j++) sum += acc[j];
    return sum;
}

/* the same sum, each term also replacing x[i] */
MOE__GEMM_FN float moe__exp_lanes_inplace(float *MOE_RESTRICT x, int n, float mx, float scale) {
    float acc[MOE__LANES], sum = 0.0f;
    int u, j, n16 = n / MOE__LANES * MOE__LANES;
    for (j = 0; j < MOE__LANES; j++) acc[j] = 0.0f;
    for (u = 0; u < n16; u += MOE__LANES)
        for (j = 0; j < MOE__LANES; j++) acc[j] += x[u + j] = moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; u + j < n; j++) acc[j] += x[u + j] = moe__expf_poly((x[u + j] - mx) * scale);
    for (j = 0; j < MOE__LANES; j++) sum += acc[j];
    return sum;
}

/* the MOE__LANES partial sums of one dot product, added by halving */
static float moe__lanes_sum(float *acc) {
    int h, k;
    for (h = MOE__LANES / 2; h >= 1; h /= 2)
        for (k = 0; k < h; k++) acc[k] += acc[k + h];
    return acc[0];
}

/* one dot product in MOE__LANES lanes (the router's combine backward; decoding's one-column
   reference of moe__dot_lanes4 and its last N % 4 columns) */
static float moe__dot_lanes(const float *x, const float *w, int K) {
    float acc[MOE__LANES];
    int u, k;
    for (k = 0; k < MOE__LANES; k++) acc[k] = 0.0f;
    for (u = 0; u + MOE__LANES <= K; u += MOE__LANES)
        for (k = 0; k < MOE__LANES; k++) acc[k] += x[u + k] * w[u + k];
    for (k = 0; u + k < K; k++) acc[k] += x[u + k] * w[u + k];
    return moe__lanes_sum(acc);
}

MOE__IMPL void moe_softmax_forward(float *out, const float *inp, int rows, int n) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, mx = -FLT_MAX, sum = 0.0f, inv;
        int i;
        for (i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
        for (i = 0; i < n; i++) { y[i] = expf(x[i] - mx); sum += y[i]; }
        inv = 1.0f / sum;
        for (i = 0; i < n; i++) y[i] *= inv;
    }
}

MOE__IMPL void moe_softmax_backward(float *dinp, const float *dout, const float *out, int rows, int n) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *dy = dout + (size_t)r * n, *y = out + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, dot = 0.0f;
        int i;
        for (i = 0; i < n; i++) dot += dy[i] * y[i];
        for (i = 0; i < n; i++) dx[i] += y[i] * (dy[i] - dot);
    }
}

static float moe__sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static float moe__act(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: return x * moe__sigmoid(x);
    case MOE_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case MOE_ACT_GELU_TANH: {
        float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    case MOE_ACT_RELU: return x > 0.0f ? x : 0.0f;
    }
    return x;
}

static float moe__act_grad(float x, moe_activation act) {
    switch (act) {
    case MOE_ACT_SILU: {
        float s = moe__sigmoid(x);
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

MOE__IMPL void moe_activation_forward(float *out, const float *inp, size_t n, moe_activation act) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) out[i] = moe__act(inp[i], act);
}

MOE__IMPL void moe_activation_backward(float *dinp, const float *dout, const float *inp, size_t n,
                                       moe_activation act) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) dinp[i] += dout[i] * moe__act_grad(inp[i], act);
}

MOE__IMPL void moe_swiglu_forward(float *out, const float *gate, const float *up, size_t n) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) out[i] = gate[i] * moe__sigmoid(gate[i]) * up[i];
}

MOE__IMPL void moe_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                                   const float *up, size_t n) {
    long long i, nn = (long long)n;
    MOE_OMP_FOR_IF(nn > 65536)
    for (i = 0; i < nn; i++) {
        float s = moe__sigmoid(gate[i]), silu = gate[i] * s;
        dgate[i] += dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
        dup[i] += dout[i] * silu;
    }
}

MOE__IMPL void moe_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                                   int rows, int n, float eps) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, ss = 0.0f, rs;
        int i;
        for (i = 0; i < n; i++) ss += x[i] * x[i];
        rs = 1.0f / sqrtf(ss / (float)n + eps);
        rstd[r] = rs;
        for (i = 0; i < n; i++) y[i] = x[i] * rs * weight[i];
    }
}

MOE__IMPL void moe_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                                    const float *weight, const float *rstd, int rows, int n) {
    int r, i;
    /* dx = rstd * (w*dy - x * rstd^2 * mean(w*dy*x)); dweight owned per column, serial rows */
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n, *dy = dout + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, rs = rstd[r], dot = 0.0f;
        int j;
        for (j = 0; j < n; j++) dot += weight[j] * dy[j] * x[j];
        dot /= (float)n;
        for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - x[j] * rs * rs * dot);
    }
    if (dweight) { /* blocks of 64 columns, rows streamed: each column still sums in row order */
        int nb = (n + 63) / 64;
        MOE_OMP_FOR_IF((double)rows * n > 1e5)
        for (i = 0; i < nb; i++) {
            int c0 = i * 64, cols = n - c0 < 64 ? n - c0 : 64, j, rr;
            float acc[64];
            for (j = 0; j < cols; j++) acc[j] = 0.0f;
            for (rr = 0; rr < rows; rr++) {
                const float *dy = dout + (size_t)rr * n + c0, *x = inp + (size_t)rr * n + c0;
                float rs = rstd[rr];
                for (j = 0; j < cols; j++) acc[j] += dy[j] * x[j] * rs;
            }
            for (j = 0; j < cols; j++) dweight[c0 + j] += acc[j];
        }
    }
}

MOE__IMPL void moe_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                                     const float *weight, const float *bias, int rows, int n, float eps) {
    int r;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n;
        float *y = out + (size_t)r * n, m = 0.0f, v = 0.0f, rs;
        int i;
        for (i = 0; i < n; i++) m += x[i];
        m /= (float)n;
        for (i = 0; i < n; i++) v += (x[i] - m) * (x[i] - m);
        v /= (float)n;
        rs = 1.0f / sqrtf(v + eps);
        mean[r] = m;
        rstd[r] = rs;
        for (i = 0; i < n; i++) y[i] = (x[i] - m) * rs * weight[i] + (bias ? bias[i] : 0.0f);
    }
}

MOE__IMPL void moe_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                                      const float *inp, const float *weight, const float *mean,
                                      const float *rstd, int rows, int n) {
    int r, i;
    MOE_OMP_FOR_IF((double)rows * n > 1e5)
    for (r = 0; r < rows; r++) {
        const float *x = inp + (size_t)r * n, *dy = dout + (size_t)r * n;
        float *dx = dinp + (size_t)r * n, m = mean[r], rs = rstd[r], mdn = 0.0f, mdnx = 0.0f;
        int j;
        for (j = 0; j < n; j++) {
            float dn = weight[j] * dy[j];
            mdn += dn;
            mdnx += dn * (x[j] - m) * rs;
        }
        mdn /= (float)n;
        mdnx /= (float)n;
        for (j = 0; j < n; j++) dx[j] += rs * (weight[j] * dy[j] - mdn - (x[j] - m) * rs * mdnx);
    }
    for (i = 0; i < n; i++) {
        float aw = 0.0f, ab = 0.0f;
        for (r = 0; r < rows; r++) {
            float dy = dout[(size_t)r * n + i];
            aw += dy * (inp[(size_t)r * n + i] - mean[r]) * rstd[r];
            ab += dy;
        }
        if (dweight) dweight[i] += aw;
        if (dbias) dbias[i] += ab;
    }
}

MOE__IMPL double moe_crossentropy_forward(float *losses, const float *logits, const int *targets,
                                          int rows, int V) {
    int r, count = 0;
    double total = 0.0;
    MOE_OMP_FOR_IF((double)rows * V > 1e5)
    for (r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * V;
        int t = targets[r];
        float mx;
        if (t < 0 || t >= V) { losses[r] = 0.0f; continue; }
        mx = moe__max_lanes(z, V);
        losses[r] = (float)(log((double)moe__sum_exp_lanes(z, V, mx, 1.0f)) + mx - z[t]);
    }
    for (r = 0; r < rows; r++)
        if (targets[r] >= 0 && targets[r] < V) { total += losses[r]; count++; }
    return count ? total / count : 0.0;
}

MOE__IMPL void moe_crossentropy_backward(float *dlogits, const float *logits, const int *targets,
                                         int rows, int V, float dloss) {
    int r;
    MOE_OMP_FOR_IF((double)rows * V > 1e5)
    for (r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * V;
        float *dz = dlogits + (size_t)r * V, mx, inv;
        int t = targets[r], i;
        if (t < 0 || t >= V) continue;
        mx = moe__max_lanes(z, V);
        inv = 1.0f / moe__sum_exp_lanes(z, V, mx, 1.0f);
        for (i = 0; i < V; i++) dz[i] += dloss * (moe__expf_poly(z[i] - mx) * inv - (i == t ? 1.0f : 0.0f));
    }
}

