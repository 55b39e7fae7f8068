/* ============================================================================================
   >>moe:lora  low-rank adapters on any linear matrix of a store
   ============================================================================================
   LoRA (Hu et al., arXiv 2106.09685 §4.1): W = W0 + (alpha / r) B A, with A (r, in) and
   B (out, r) per adapted matrix; for an expert bank (E, out, in) one pair per expert. A
   starts U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming_uniform(a = sqrt 5)), B at zero, so an
   attached adapter changes nothing until trained.
   The adapters are applied in weight space: while merged, the model's tensor holds
   W0 + s B A (the base W0 is kept aside), so every forward and backward of the model works
   unchanged on any matrix it has, dense, per expert or attention. The model's backward
   leaves dL/dW in the store's gradients, and since W depends on A and B only through s B A,
     dL/dA = s B^T dL/dW,  dL/dB = s dL/dW A^T
   exactly (moe_lora_backward). The adapters live in their own store (names
   "<matrix>.lora_a", "<matrix>.lora_b"), so the optimizer, masks (MIGU on adapters) and
   checkpoints work on them as on any store; moe_lora_step updates the adapters only and
   re-merges. Adapter dropout (the paper's optional regulariser on the adapter's input) has
   no weight-space form and is not offered.
   Cost: one (out x in x r) product per adapted matrix per merge and per backward; the
   model's own dW is computed anyway. */

typedef struct moe_lora_config {
    int rank;    /* r >= 1, at most min(out, in) of every adapted matrix */
    float alpha; /* scale s = alpha / r (peft's lora_alpha)             */
} moe_lora_config;

typedef struct moe_lora {
    moe_store S;          /* the adapters: params, grads, AdamW moments                  */
    int n;                /* adapted matrices                                             */
    int *target;          /* (n) their ids in the model's store                            */
    int *id_a, *id_b;     /* (n) their adapters' ids in S                                  */
    float *base;          /* W0 of every target, concatenated in target order             */
    size_t *base_off;     /* (n)                                                           */
    float scale;          /* alpha / rank                                                  */
    moe_lora_config cfg;
    uint64_t base_fingerprint; /* layout of the store the adapters were made for           */
    int merged;           /* 1: the targets hold W0 + s B A, 0: they hold W0                */
    moe_err err;
} moe_lora;

/* Adapters on the tensors ids[0..n) of base (each (out, in) or (E, out, in), no repeats;
   typically moe_model_select's). Snapshots W0 and merges (a no-op while B = 0). On failure
   nothing is attached, base is untouched and the sentence is in L->err. */
MOEDEF moe_status moe_lora_attach(moe_lora *L, moe_store *base, const int *ids, int n,
                                  const moe_lora_config *c, uint64_t seed);
/* Puts W0 back into the targets (unless unmerged) and frees the adapters. */
MOEDEF void moe_lora_detach(moe_lora *L, moe_store *base);
/* Targets := W0 + s B A (merge) or W0 (unmerge: the model runs without its adapters). */
MOEDEF moe_status moe_lora_merge(moe_lora *L, moe_store *base);
MOEDEF moe_status moe_lora_unmerge(moe_lora *L, moe_store *base);
/* Makes the merged weights the new W0 and the adapters start again (A redrawn from seed,
   B = 0): PEFT's merge_and_unload followed by a fresh adapter. */
MOEDEF moe_status moe_lora_fold(moe_lora *L, moe_store *base, uint64_t seed);
/* Adapter gradients from the model's weight gradients (accumulated into L->S.grads). The
   model's forward must have run merged. */
MOEDEF moe_status moe_lora_backward(moe_lora *L, const moe_store *base);
/* One step of the adapters alone: optional mask on the adapter store (NULL = none) and
   clipping, AdamW, re-merge. The model's own parameters change only through the merge. */
MOEDEF moe_status moe_lora_step(moe_lora *L, moe_store *base, moe_mask *mask,
                                const moe_adamw_config *c, float lr, long long step, float max_norm);
#ifndef MOE_NO_STDIO
/* The adapters (with their moments and the step) in a checkpoint file beside the model's;
   its config blob records rank, alpha and the base layout. Loading checks the file was made
   for this base layout and these targets; on any error L and base are unchanged. */
MOEDEF moe_status moe_lora_save(const char *path, const moe_lora *L, long long step, moe_err *err);
MOEDEF moe_status moe_lora_load(const char *path, moe_lora *L, moe_store *base, long long *step, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>moe:lora
   ============================================================================================ */

static void moe__lora_dims(const moe_tensor *t, int *E, int *out, int *in) {
    *E = t->ndim == 3 ? t->shape[0] : 1;
    *out = t->shape[t->ndim - 2];
    *in = t->shape[t->ndim - 1];
}

static void moe__lora_init_adapters(moe_lora *L, uint64_t seed) {
    moe_rng r;
    int i;
    size_t j;
    moe_rng_seed(&r, seed);
    for (i = 0; i < L->n; i++) {
        const moe_tensor *a = &L->S.tensors[L->id_a[i]];
        float bound = 1.0f / sqrtf((float)a->shape[a->ndim - 1]);
        float *pa = moe_store_param(&L->S, L->id_a[i]);
        for (j = 0; j < a->numel; j++) pa[j] = bound * (2.0f * moe_rng_uniform(&r) - 1.0f);
        memset(moe_store_param(&L->S, L->id_b[i]), 0, L->S.tensors[L->id_b[i]].numel * sizeof(float));
    }
}

static void moe__lora_clear(moe_lora *L) {
    moe_store_free(&L->S);
    MOE_FREE(L->target); MOE_FREE(L->id_a); MOE_FREE(L->id_b); MOE_FREE(L->base); MOE_FREE(L->base_off);
    memset(L, 0, sizeof *L);
}

MOE__IMPL moe_status moe_lora_attach(moe_lora *L, moe_store *base, const int *ids, int n,
                                     const moe_lora_config *c, uint64_t seed) {
    int i, j;
    size_t total = 0;
    moe_err e;
    memset(L, 0, sizeof *L);
    memset(&e, 0, sizeof e);
    if (!base->params) return moe_err_set(&L->err, MOE_ERR_STATE, "LoRA attached to a store without parameters");
    if (!ids || n <= 0) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA needs at least one matrix to adapt");
    if (c->rank < 1) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA rank must be >= 1, got %d", c->rank);
    if (!(c->alpha > 0.0f) || !(c->alpha < 1e6f)) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA alpha must be positive and finite");
    for (i = 0; i < n; i++) {
        const moe_tensor *t;
        int E, out, in;
        if (ids[i] < 0 || ids[i] >= base->count) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA on tensor id %d, which the store does not have", ids[i]);
        t = &base->tensors[ids[i]];
        if (t->ndim != 2 && t->ndim != 3) return moe_err_set(&L->err, MOE_ERR_SHAPE, "LoRA on '%s', which is not a matrix or a bank of matrices", t->name);
        moe__lora_dims(t, &E, &out, &in);
        if (c->rank > out || c->rank > in)
            return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA rank %d is larger than the %d x %d matrix '%s'", c->rank, out, in, t->name);
        if (strlen(t->name) + 8 >= MOE_NAME_LEN) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "tensor name '%s' too long for its adapter's", t->name);
        for (j = 0; j < i; j++)
            if (ids[j] == ids[i]) return moe_err_set(&L->err, MOE_ERR_INVALID_ARG, "LoRA on '%s' twice", t->name);
        total += t->numel;
    }
    L->n = n;
    L->cfg = *c;
    L->scale = c->alpha / (float)c->rank;
    L->base_fingerprint = moe_store_fingerprint(base);
    L->target = (int *)moe__calloc((size_t)n, sizeof(int));
    L->id_a = (int *)moe__calloc((size_t)n, sizeof(int));
    L->id_b = (int *)moe__calloc((size_t)n, sizeof(int));
    L->base_off = (size_t *)moe__calloc((size_t)n, sizeof(size_t));
    L->base = (float *)moe__calloc(total, sizeof(float));
    if (!L->target || !L->id_a || !L->id_b || !L->base_off || !L->base) {
        moe__lora_clear(L);
        return moe_err_set(&L->err, MOE_ERR_NOMEM, "out of memory for the adapters");
    }
    moe_store_init(&L->S);
    total = 0;
    for (i = 0; i < n; i++) {
        const moe_tensor *t = &base->tensors[ids[i]];
        char name[MOE_NAME_LEN];
        int E, out, in, d0, d1;
        moe__lora_dims(t, &E, &out, &in);
        L->target[i] = ids[i];
        L->base_off[i] = total;
        memcpy(L->base + total, base->params + t->offset, t->numel * sizeof(float));
        total += t->numel;
        /* an (E, out, in) bank gets (E, r, in) and (E, out, r); a matrix (r, in) and (out, r) */
        d0 = t->ndim == 3 ? E : c->rank;
        d1 = t->ndim == 3 ? c->rank : in;
        snprintf(name, sizeof name, "%.*s.lora_a", MOE_NAME_LEN - 9, t->name);
        L->id_a[i] = moe_store_add(&L->S, name, 0, d0, d1, t->ndim == 3 ? in : 0, 0);
        d0 = t->ndim == 3 ? E : out;
        d1 = t->ndim == 3 ? out : c->rank;
        snprintf(name, sizeof name, "%.*s.lora_b", MOE_NAME_LEN - 9, t->name);
        L->id_b[i] = moe_store_add(&L->S, name, 0, d0, d1, t->ndim == 3 ? c->rank : 0, 0);
    }
    if (L->S.err.status != MOE_OK || moe_store_alloc(&L->S, 1) != MOE_OK) {
        e = L->S.err;
        moe__lora_clear(L);
        L->err = e;
        return e.status;
    }
    moe__lora_init_adapters(L, seed);
    return moe_lora_merge(L, base);
}

MOE__IMPL void moe_lora_detach(moe_lora *L, moe_store *base) {
    if (L->S.params && L->merged && base) moe_lora_unmerge(L, base);
    moe__lora_clear(L);
}

static moe_status moe__lora_check(moe_lora *L, const moe_store *base) {
    if (!L->S.params) return moe_err_set(&L->err, MOE_ERR_STATE, "no adapters attached");
    if (moe_store_fingerprint(base) != L->base_fingerprint)
        return moe_err_set(&L->err, MOE_ERR_SHAPE, "the adapters were made for another model layout");
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_merge(moe_lora *L, moe_store *base) {
    int i, e, o, j, q;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        int E, out, in, r = L->cfg.rank;
        moe__lora_dims(t, &E, &out, &in);
        for (e = 0; e < E; e++) {
            const float *A = moe_store_param(&L->S, L->id_a[i]) + (size_t)e * r * in;
            const float *B = moe_store_param(&L->S, L->id_b[i]) + (size_t)e * out * r;
            const float *W0 = L->base + L->base_off[i] + (size_t)e * out * in;
            float *W = base->params + t->offset + (size_t)e * out * in;
            for (o = 0; o < out; o++)
                for (j = 0; j < in; j++) {
                    float acc = 0.0f;
                    for (q = 0; q < r; q++) acc += B[(size_t)o * r + q] * A[(size_t)q * in + j];
                    W[(size_t)o * in + j] = W0[(size_t)o * in + j] + L->scale * acc;
                }
        }
    }
    L->merged = 1;
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_unmerge(moe_lora *L, moe_store *base) {
    int i;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        memcpy(base->params + t->offset, L->base + L->base_off[i], t->numel * sizeof(float));
    }
    L->merged = 0;
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_fold(moe_lora *L, moe_store *base, uint64_t seed) {
    int i;
    if (moe_lora_merge(L, base) != MOE_OK) return L->err.status;
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        memcpy(L->base + L->base_off[i], base->params + t->offset, t->numel * sizeof(float));
    }
    moe__lora_init_adapters(L, seed);
    if (L->S.adam_m) memset(L->S.adam_m, 0, L->S.numel * sizeof(float));
    if (L->S.adam_v) memset(L->S.adam_v, 0, L->S.numel * sizeof(float));
    return moe_lora_merge(L, base);
}

MOE__IMPL moe_status moe_lora_backward(moe_lora *L, const moe_store *base) {
    int i, e, o, j, q;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    if (!L->merged) return moe_err_set(&L->err, MOE_ERR_STATE, "adapter gradients need a forward with the adapters merged");
    if (!base->grads) return moe_err_set(&L->err, MOE_ERR_STATE, "the model's store has no gradients");
    for (i = 0; i < L->n; i++) {
        const moe_tensor *t = &base->tensors[L->target[i]];
        int E, out, in, r = L->cfg.rank;
        moe__lora_dims(t, &E, &out, &in);
        for (e = 0; e < E; e++) {
            const float *A = moe_store_param(&L->S, L->id_a[i]) + (size_t)e * r * in;
            const float *B = moe_store_param(&L->S, L->id_b[i]) + (size_t)e * out * r;
            float *dA = moe_store_grad(&L->S, L->id_a[i]) + (size_t)e * r * in;
            float *dB = moe_store_grad(&L->S, L->id_b[i]) + (size_t)e * out * r;
            const float *dW = base->grads + t->offset + (size_t)e * out * in;
            for (o = 0; o < out; o++) {
                const float *g = dW + (size_t)o * in;
                for (q = 0; q < r; q++) {
                    /* dB[o,q] = s sum_j dW[o,j] A[q,j];  dA[q,j] += s B[o,q] dW[o,j] */
                    const float *a = A + (size_t)q * in;
                    float *da = dA + (size_t)q * in, bq = L->scale * B[(size_t)o * r + q];
                    double acc = 0.0;
                    for (j = 0; j < in; j++) {
                        acc += (double)g[j] * a[j];
                        da[j] += bq * g[j];
                    }
                    dB[(size_t)o * r + q] += L->scale * (float)acc;
                }
            }
        }
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_lora_step(moe_lora *L, moe_store *base, moe_mask *mask,
                                   const moe_adamw_config *c, float lr, long long step, float max_norm) {
    moe_status st;
    if (moe__lora_check(L, base) != MOE_OK) return L->err.status;
    if (mask) {
        st = moe_mask_step(mask, &L->S, c, lr, step, max_norm, NULL);
        if (st != MOE_OK) return moe_err_set(&L->err, st, "%s", mask->err.msg);
    } else {
        moe_clip_grad_norm(&L->S, max_norm);
        if ((st = moe_adamw_step(&L->S, c, lr, step)) != MOE_OK) return moe_err_set(&L->err, st, "%s", L->S.err.msg);
    }
    return moe_lora_merge(L, base);
}

#ifndef MOE_NO_STDIO
#define MOE__LORA_BLOB 24 /* "LORA", rank, alpha bits, 4 reserved, base fingerprint */

static void moe__lora_blob(const moe_lora *L, unsigned char *p) {
    uint32_t a;
    memset(p, 0, MOE__LORA_BLOB);
    memcpy(&a, &L->cfg.alpha, 4);
    moe__mask_put(p, 0x41524F4Cu, 4);
    moe__mask_put(p + 4, (uint64_t)L->cfg.rank, 4);
    moe__mask_put(p + 8, a, 4);
    moe__mask_put(p + 16, L->base_fingerprint, 8);
}

MOE__IMPL moe_status moe_lora_save(const char *path, const moe_lora *L, long long step, moe_err *err) {
    unsigned char blob[MOE__LORA_BLOB];
    if (!L->S.params) return moe_err_set(err, MOE_ERR_STATE, "no adapters to save");
    moe__lora_blob(L, blob);
    return moe_checkpoint_save(path, &L->S, 1, step, blob, sizeof blob, NULL, 0, err);
}

MOE__IMPL moe_status moe_lora_load(const char *path, moe_lora *L, moe_store *base, long long *step, moe_err *err) {
    unsigned char want[MOE__LORA_BLOB], got[MOE__LORA_BLOB];
    moe_ckpt_info info;
    moe_status st;
    if (moe__lora_check(L, base) != MOE_OK) return moe_err_set(err, L->err.status, "%s", L->err.msg);
    if ((st = moe_checkpoint_info(path, &info, err)) != MOE_OK) return st;
    if (info.config_bytes != MOE__LORA_BLOB) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not an adapter file", path);
    if ((st = moe_checkpoint_blobs(path, got, sizeof got, NULL, 0, err)) != MOE_OK) return st;
    moe__lora_blob(L, want);
    if (moe__mask_get(got, 4) != 0x41524F4Cu) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not an adapter file", path);
    if (memcmp(got + 16, want + 16, 8) != 0)
        return moe_err_set(err, MOE_ERR_SHAPE, "'%s' holds adapters of another model layout", path);
    if (memcmp(got, want, MOE__LORA_BLOB) != 0)
        return moe_err_set(err, MOE_ERR_SHAPE, "'%s' holds adapters of another rank or alpha (rank %u)", path, (unsigned)moe__mask_get(got + 4, 4));
    /* the adapter store's fingerprint (target names and shapes) is checked by the load */
    if ((st = moe_checkpoint_load(path, &L->S, step, want, NULL, sizeof want, NULL, 0, err)) != MOE_OK) return st;
    return moe_lora_merge(L, base) == MOE_OK ? MOE_OK : moe_err_set(err, L->err.status, "%s", L->err.msg);
}
#endif
