/* ============================================================================================
   >>moe:dispatch  the assignment list
   ============================================================================================
   Every router fills one of these. After moe_dispatch the list is grouped by expert (a stable
   counting sort: within an expert, the order of the input list is kept) and each token knows
   its assignments in slot order, so combine sums them in a fixed order. */

typedef struct moe_assign {
    int n;           /* assignments in the list                                        */
    int T, E;        /* tokens, experts                                                */
    int *token;      /* (cap) token of each assignment, grouped by expert               */
    int *expert;     /* (cap) expert                                                   */
    int *slot;       /* (cap) position in its token's combine order                    */
    float *weight;   /* (cap) mixing weight                                            */
    int *offset;     /* (E+1) expert e owns [offset[e], offset[e+1])                   */
    int *tok_offset; /* (T+1) token t owns tok_index[tok_offset[t] .. tok_offset[t+1]) */
    int *tok_index;  /* (cap) positions in the grouped list, in slot order              */
} moe_assign;

/* Groups n raw assignments (token[i], expert[i], slot[i], weight[i]) into `a`.
   The raw arrays must not alias a's arrays. Invalid ids return MOE_ERR_INVALID_ARG. */
MOEDEF moe_status moe_dispatch(moe_assign *a, const int *token, const int *expert, const int *slot,
                               const float *weight, int n, int T, int E, moe_err *err);
/* xg (N, d): row i = x[token[i]] */
MOEDEF void moe_gather(float *xg, const float *x, const moe_assign *a, int d);
/* dx (T, d) += sum over the token's assignments of dxg rows, in slot order */
MOEDEF void moe_gather_backward(float *dx, const float *dxg, const moe_assign *a, int d);
/* y (T, d) (+)= sum over each token's assignments of weight * eout, in slot order.
   accumulate = 0 overwrites y. */
MOEDEF void moe_combine_forward(float *y, const float *eout, const moe_assign *a, int d, int accumulate);
/* deout (N, d) = weight * dy[token] (overwritten); dweight (N) = <dy[token], eout> (overwritten,
   may be NULL). */
MOEDEF void moe_combine_backward(float *deout, float *dweight, const float *dy, const float *eout,
                                 const moe_assign *a, int d);

/* @implementation */
/* ============================================================================================
   >>moe:dispatch
   ============================================================================================ */

MOE__IMPL moe_status moe_dispatch(moe_assign *a, const int *token, const int *expert, const int *slot,
                                  const float *weight, int n, int T, int E, moe_err *err) {
    int i, e, t;
    int *fill = a->tok_index; /* reused as a cursor array before it is filled */
    for (i = 0; i < n; i++)
        if (token[i] < 0 || token[i] >= T || expert[i] < 0 || expert[i] >= E)
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "assignment %d has token %d / expert %d outside [0,%d) / [0,%d)", i, token[i], expert[i], T, E);
    a->n = n;
    a->T = T;
    a->E = E;
    /* counting sort by expert; stable because the input is walked in order */
    for (e = 0; e <= E; e++) a->offset[e] = 0;
    for (i = 0; i < n; i++) a->offset[expert[i] + 1]++;
    for (e = 0; e < E; e++) a->offset[e + 1] += a->offset[e];
    for (e = 0; e < E; e++) fill[e] = a->offset[e];
    for (i = 0; i < n; i++) {
        int pos = fill[expert[i]]++;
        a->token[pos] = token[i];
        a->expert[pos] = expert[i];
        a->slot[pos] = slot[i];
        a->weight[pos] = weight[i];
    }
    /* per-token lists, then each token's few entries sorted by slot (insertion sort) */
    for (t = 0; t <= T; t++) a->tok_offset[t] = 0;
    for (i = 0; i < n; i++) a->tok_offset[a->token[i] + 1]++;
    for (t = 0; t < T; t++) a->tok_offset[t + 1] += a->tok_offset[t];
    /* tok_offset[t] is token t's fill cursor; filled, it holds t's end = (t+1)'s start, so one
       shift back restores the starts (no cursor array to allocate) */
    for (i = 0; i < n; i++) a->tok_index[a->tok_offset[a->token[i]]++] = i;
    for (t = T; t > 0; t--) a->tok_offset[t] = a->tok_offset[t - 1];
    a->tok_offset[0] = 0;
    for (t = 0; t < T; t++) {
        int lo = a->tok_offset[t], hi = a->tok_offset[t + 1], j;
        for (i = lo + 1; i < hi; i++) {
            int v = a->tok_index[i];
            for (j = i - 1; j >= lo && a->slot[a->tok_index[j]] > a->slot[v]; j--) a->tok_index[j + 1] = a->tok_index[j];
            a->tok_index[j + 1] = v;
        }
    }
    return MOE_OK;
}

MOE__IMPL void moe_gather(float *xg, const float *x, const moe_assign *a, int d) {
    int i;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (i = 0; i < a->n; i++) memcpy(xg + (size_t)i * d, x + (size_t)a->token[i] * d, sizeof(float) * (size_t)d);
}

MOE__IMPL void moe_gather_backward(float *dx, const float *dxg, const moe_assign *a, int d) {
    int t;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (t = 0; t < a->T; t++) {
        float *o = dx + (size_t)t * d;
        int k, j;
        for (k = a->tok_offset[t]; k < a->tok_offset[t + 1]; k++) {
            const float *g = dxg + (size_t)a->tok_index[k] * d;
            for (j = 0; j < d; j++) o[j] += g[j];
        }
    }
}

MOE__IMPL void moe_combine_forward(float *y, const float *eout, const moe_assign *a, int d, int accumulate) {
    int t;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (t = 0; t < a->T; t++) {
        float *o = y + (size_t)t * d;
        int k, j;
        if (!accumulate) memset(o, 0, sizeof(float) * (size_t)d);
        for (k = a->tok_offset[t]; k < a->tok_offset[t + 1]; k++) {
            int pos = a->tok_index[k];
            const float *src = eout + (size_t)pos * d;
            float w = a->weight[pos];
            for (j = 0; j < d; j++) o[j] += w * src[j];
        }
    }
}

MOE__IMPL void moe_combine_backward(float *deout, float *dweight, const float *dy, const float *eout,
                                    const moe_assign *a, int d) {
    int i;
    MOE_OMP_FOR_IF((double)a->n * d > 1e5)
    for (i = 0; i < a->n; i++) {
        const float *g = dy + (size_t)a->token[i] * d, *e = eout + (size_t)i * d;
        float *o = deout + (size_t)i * d, w = a->weight[i];
        int j;
        for (j = 0; j < d; j++) o[j] = w * g[j];
        if (dweight) dweight[i] = moe__dot_lanes(g, e, d); /* lanes: a single running sum would not vectorize */
    }
}

