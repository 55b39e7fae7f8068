/* ============================================================================================
   >>moe:store  THE tensor table over flat buffers
   ============================================================================================
   Parameters, gradients and the AdamW moments are each ONE flat float buffer in the same order.
   The table lists every tensor (name, shape, offset); optimizer, clipping, checkpoints and
   (later) averaging, growth and masking all walk these flat buffers through this one table. */

#define MOE_MAX_DIMS 4
#define MOE_NAME_LEN 64

enum { MOE_TENSOR_DECAY = 1 }; /* flags: apply AdamW weight decay to this tensor */

typedef struct moe_tensor {
    char name[MOE_NAME_LEN]; /* e.g. "layer0.moe.w_gate"                          */
    int ndim;                /* 1..MOE_MAX_DIMS                                   */
    int shape[MOE_MAX_DIMS]; /* outermost first                                    */
    size_t offset;           /* in floats, into params/grads/adam_m/adam_v        */
    size_t numel;
    int flags;               /* MOE_TENSOR_DECAY                                  */
} moe_tensor;

typedef struct moe_store {
    moe_tensor *tensors; /* (count) the table                                        */
    int count, capacity;
    size_t numel;        /* total floats per buffer                                   */
    float *params;       /* (numel)                                                   */
    float *grads;        /* (numel) backward passes accumulate here                   */
    float *adam_m;       /* (numel) NULL unless allocated with the optimizer          */
    float *adam_v;       /* (numel)                                                   */
    int allocated;       /* 1 after moe_store_alloc: the table is frozen               */
    moe_err err;
} moe_store;

MOEDEF void moe_store_init(moe_store *s);
/* Declares a tensor; dims after the last used one are 0. Returns its id (>= 0) or -1. */
MOEDEF int moe_store_add(moe_store *s, const char *name, int flags, int n0, int n1, int n2, int n3);
MOEDEF moe_status moe_store_alloc(moe_store *s, int with_optimizer); /* zero-filled buffers */
MOEDEF void moe_store_free(moe_store *s);
MOEDEF int moe_store_find(const moe_store *s, const char *name); /* id or -1 */
MOEDEF float *moe_store_param(const moe_store *s, int id);      /* NULL for id < 0 */
MOEDEF float *moe_store_grad(const moe_store *s, int id);
MOEDEF void moe_store_zero_grad(moe_store *s);
/* FNV-1a 64 over every (name, shape, flags): two stores with equal fingerprints have the
   same layout, so their flat buffers can be copied, averaged or loaded into each other. */
MOEDEF uint64_t moe_store_fingerprint(const moe_store *s);

/* @implementation */
/* ============================================================================================
   >>moe:store
   ============================================================================================ */

MOE__IMPL void moe_store_init(moe_store *s) { memset(s, 0, sizeof *s); }

MOE__IMPL int moe_store_add(moe_store *s, const char *name, int flags, int n0, int n1, int n2, int n3) {
    int dims[MOE_MAX_DIMS], nd = 0, i;
    size_t numel = 1;
    moe_tensor *t;
    dims[0] = n0; dims[1] = n1; dims[2] = n2; dims[3] = n3;
    if (s->allocated) {
        moe_err_set(&s->err, MOE_ERR_STATE, "tensor '%s' declared after moe_store_alloc", name);
        return -1;
    }
    if (!name || strlen(name) >= MOE_NAME_LEN) {
        moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "tensor name missing or longer than %d bytes", MOE_NAME_LEN - 1);
        return -1;
    }
    if (moe_store_find(s, name) >= 0) {
        moe_err_set(&s->err, MOE_ERR_INVALID_ARG, "tensor '%s' declared twice", name);
        return -1;
    }
    while (nd < MOE_MAX_DIMS && dims[nd] != 0) nd++;
    for (i = nd; i < MOE_MAX_DIMS; i++)
        if (dims[i] != 0) nd = -1;
    if (nd <= 0) {
        moe_err_set(&s->err, MOE_ERR_SHAPE, "tensor '%s' needs 1 to 4 dimensions, listed first", name);
        return -1;
    }
    for (i = 0; i < nd; i++) {
        if (dims[i] < 0 || (size_t)dims[i] > ((size_t)1 << 40) / numel) {
            moe_err_set(&s->err, MOE_ERR_SHAPE, "tensor '%s': dimension %d is %d (negative or too large)", name, i, dims[i]);
            return -1;
        }
        numel *= (size_t)dims[i];
    }
    if (s->count == s->capacity) {
        int cap = s->capacity ? 2 * s->capacity : 16;
        moe_tensor *nt = (moe_tensor *)moe__calloc((size_t)cap, sizeof *nt);
        if (!nt) {
            moe_err_set(&s->err, MOE_ERR_NOMEM, "out of memory growing the tensor table");
            return -1;
        }
        if (s->tensors) memcpy(nt, s->tensors, (size_t)s->count * sizeof *nt);
        MOE_FREE(s->tensors);
        s->tensors = nt;
        s->capacity = cap;
    }
    t = &s->tensors[s->count];
    memset(t, 0, sizeof *t);
    strcpy(t->name, name);
    t->ndim = nd;
    for (i = 0; i < nd; i++) t->shape[i] = dims[i];
    t->offset = s->numel;
    t->numel = numel;
    t->flags = flags;
    s->numel += numel;
    return s->count++;
}

MOE__IMPL moe_status moe_store_alloc(moe_store *s, int with_optimizer) {
    if (s->allocated) return moe_err_set(&s->err, MOE_ERR_STATE, "store already allocated");
    s->params = (float *)moe__calloc(s->numel, sizeof(float));
    s->grads = (float *)moe__calloc(s->numel, sizeof(float));
    if (with_optimizer) {
        s->adam_m = (float *)moe__calloc(s->numel, sizeof(float));
        s->adam_v = (float *)moe__calloc(s->numel, sizeof(float));
    }
    if (!s->params || !s->grads || (with_optimizer && (!s->adam_m || !s->adam_v))) {
        MOE_FREE(s->params); MOE_FREE(s->grads); MOE_FREE(s->adam_m); MOE_FREE(s->adam_v);
        s->params = s->grads = s->adam_m = s->adam_v = NULL;
        return moe_err_set(&s->err, MOE_ERR_NOMEM, "out of memory for %zu parameters", s->numel);
    }
    s->allocated = 1;
    return MOE_OK;
}

MOE__IMPL void moe_store_free(moe_store *s) {
    MOE_FREE(s->tensors); MOE_FREE(s->params); MOE_FREE(s->grads);
    MOE_FREE(s->adam_m); MOE_FREE(s->adam_v);
    memset(s, 0, sizeof *s);
}

MOE__IMPL int moe_store_find(const moe_store *s, const char *name) {
    int i;
    for (i = 0; i < s->count; i++)
        if (strcmp(s->tensors[i].name, name) == 0) return i;
    return -1;
}

MOE__IMPL float *moe_store_param(const moe_store *s, int id) {
    return (id >= 0 && id < s->count && s->params) ? s->params + s->tensors[id].offset : NULL;
}

MOE__IMPL float *moe_store_grad(const moe_store *s, int id) {
    return (id >= 0 && id < s->count && s->grads) ? s->grads + s->tensors[id].offset : NULL;
}

MOE__IMPL void moe_store_zero_grad(moe_store *s) {
    if (s->grads) memset(s->grads, 0, s->numel * sizeof(float));
}

static uint64_t moe__fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

MOE__IMPL uint64_t moe_store_fingerprint(const moe_store *s) {
    uint64_t h = 14695981039346656037ULL;
    int i, j;
    for (i = 0; i < s->count; i++) {
        const moe_tensor *t = &s->tensors[i];
        unsigned char dims[4 * (MOE_MAX_DIMS + 2)];
        h = moe__fnv1a(h, t->name, strlen(t->name) + 1);
        /* integers as little-endian bytes so the fingerprint is the same on every host */
        for (j = 0; j < MOE_MAX_DIMS + 2; j++) {
            uint32_t v = j < MOE_MAX_DIMS ? (uint32_t)t->shape[j] : j == MOE_MAX_DIMS ? (uint32_t)t->ndim : (uint32_t)t->flags;
            dims[4 * j] = (unsigned char)v; dims[4 * j + 1] = (unsigned char)(v >> 8);
            dims[4 * j + 2] = (unsigned char)(v >> 16); dims[4 * j + 3] = (unsigned char)(v >> 24);
        }
        h = moe__fnv1a(h, dims, sizeof dims);
    }
    return h;
}

