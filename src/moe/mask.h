/* ============================================================================================
   >>moe:mask  update masks over the tensor table
   ============================================================================================
   One byte per parameter, in the store's flat order (the table gives the layout; the mask
   holds no copy of it): 1 = the parameter may change this step, 0 = masked. Freeze a tensor,
   one slice of it along any axis (a row = an output unit of a (..., out, in) weight, a column
   = an input, an expert of an (E, out, in) bank), or set a weight's rows from a per-unit
   vector (MIGU). Two modes, because they differ under AdamW (MIGU, arXiv 2406.17245 §3 vs its
   official code):
     MOE_MASK_GRAD    masked gradients are zeroed before the optimizer; the first moment and
                      the decoupled weight decay still move a masked parameter (the code);
     MOE_MASK_UPDATE  a masked parameter, its moments included, does not change at all (the
                      paper's W <- W - lr (M . grad)).
   In both modes the masked gradients are zeroed before clipping, so the clipping norm is the
   norm of the gradient that may be applied. A checkpoint carries a mask that persists (a
   frozen tensor) in its state blob: moe_mask_pack / moe_mask_unpack. */

typedef enum moe_mask_mode {
    MOE_MASK_GRAD = 0,  /* zero masked gradients before AdamW (moments, decay still act) */
    MOE_MASK_UPDATE = 1 /* masked parameters and their moments stay as they are          */
} moe_mask_mode;

typedef struct moe_mask {
    unsigned char *keep;  /* (numel) 1 = may change                                       */
    size_t numel;         /* the store's                                                  */
    uint64_t fingerprint; /* moe_store_fingerprint of the store it was made for           */
    moe_mask_mode mode;
    moe_err err;
} moe_mask;

/* Everything kept. The store's table must be complete (allocated or declared). */
MOEDEF moe_status moe_mask_init(moe_mask *k, const moe_store *s, moe_mask_mode mode);
MOEDEF void moe_mask_free(moe_mask *k);
MOEDEF void moe_mask_fill(moe_mask *k, int keep);
/* The whole tensor `name` kept (1) or masked (0). Unknown name: MOE_ERR_INVALID_ARG, mask
   unchanged (as for every call below that fails). */
MOEDEF moe_status moe_mask_set_tensor(moe_mask *k, const moe_store *s, const char *name, int keep);
/* Every element of `name` whose index along `axis` (0 = outermost) is `index`. A row of a
   (out, in) weight is axis 0, a column axis 1; for an (E, out, in) bank axis 0 is an expert. */
MOEDEF moe_status moe_mask_set_slice(moe_mask *k, const moe_store *s, const char *name, int axis,
                                     int index, int keep);
/* Rows of tensor `id` (a row = the last dimension: one output unit of a (..., out, in)
   weight) from row_keep (numel / last dim entries, nonzero = keep). */
MOEDEF moe_status moe_mask_set_rows(moe_mask *k, const moe_store *s, int id, const unsigned char *row_keep);
/* kept parameters, of the whole store (id < 0) or of tensor id */
MOEDEF size_t moe_mask_count(const moe_mask *k, const moe_store *s, int id);
/* zeroes the masked gradients */
MOEDEF moe_status moe_mask_grads(const moe_mask *k, moe_store *s);
/* One training step under the mask: masked gradients zeroed, then global-norm clipping
   (max_norm <= 0: none; *norm, if not NULL, gets the norm before clipping), then AdamW in the
   mask's mode. With everything kept the result equals moe_clip_grad_norm + moe_adamw_step
   bit for bit. */
MOEDEF moe_status moe_mask_step(moe_mask *k, moe_store *s, const moe_adamw_config *c, float lr,
                                long long step, float max_norm, float *norm);
/* The mask as bytes for a checkpoint's state blob: 24 bytes of header (magic, mode, numel,
   fingerprint) then one bit per parameter. unpack checks the header against k (made for the
   same layout) and changes nothing on a mismatch. */
MOEDEF size_t moe_mask_pack_bytes(const moe_mask *k);
MOEDEF moe_status moe_mask_pack(const moe_mask *k, void *buf, size_t bytes);
MOEDEF moe_status moe_mask_unpack(moe_mask *k, const void *buf, size_t bytes);

/* @implementation */
/* ============================================================================================
   >>moe:mask
   ============================================================================================ */

static moe_status moe__mask_check(moe_mask *k, const moe_store *s) {
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_STATE, "mask used before moe_mask_init");
    if (s->numel != k->numel || moe_store_fingerprint(s) != k->fingerprint)
        return moe_err_set(&k->err, MOE_ERR_SHAPE, "mask made for another parameter layout (%zu parameters, this store %zu)", k->numel, s->numel);
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_init(moe_mask *k, const moe_store *s, moe_mask_mode mode) {
    memset(k, 0, sizeof *k);
    if (mode != MOE_MASK_GRAD && mode != MOE_MASK_UPDATE) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "unknown mask mode %d", (int)mode);
    if (s->numel == 0) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "mask over an empty store");
    k->keep = (unsigned char *)moe__calloc(s->numel, 1);
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_NOMEM, "out of memory for a mask of %zu parameters", s->numel);
    memset(k->keep, 1, s->numel);
    k->numel = s->numel;
    k->fingerprint = moe_store_fingerprint(s);
    k->mode = mode;
    return MOE_OK;
}

MOE__IMPL void moe_mask_free(moe_mask *k) {
    MOE_FREE(k->keep);
    memset(k, 0, sizeof *k);
}

MOE__IMPL void moe_mask_fill(moe_mask *k, int keep) {
    if (k->keep) memset(k->keep, keep ? 1 : 0, k->numel);
}

static int moe__mask_find(moe_mask *k, const moe_store *s, const char *name) {
    int id = name ? moe_store_find(s, name) : -1;
    if (id < 0) moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "no tensor named '%s' to mask", name ? name : "(null)");
    return id;
}

MOE__IMPL moe_status moe_mask_set_tensor(moe_mask *k, const moe_store *s, const char *name, int keep) {
    int id;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if ((id = moe__mask_find(k, s, name)) < 0) return k->err.status;
    memset(k->keep + s->tensors[id].offset, keep ? 1 : 0, s->tensors[id].numel);
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_set_slice(moe_mask *k, const moe_store *s, const char *name, int axis,
                                        int index, int keep) {
    const moe_tensor *t;
    size_t inner = 1, outer = 1, o, i;
    int id, a;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if ((id = moe__mask_find(k, s, name)) < 0) return k->err.status;
    t = &s->tensors[id];
    if (axis < 0 || axis >= t->ndim)
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "tensor '%s' has %d dimensions, no axis %d", name, t->ndim, axis);
    if (index < 0 || index >= t->shape[axis])
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "index %d outside axis %d of tensor '%s' (size %d)", index, axis, name, t->shape[axis]);
    for (a = 0; a < axis; a++) outer *= (size_t)t->shape[a];
    for (a = axis + 1; a < t->ndim; a++) inner *= (size_t)t->shape[a];
    for (o = 0; o < outer; o++) {
        unsigned char *p = k->keep + t->offset + (o * (size_t)t->shape[axis] + (size_t)index) * inner;
        for (i = 0; i < inner; i++) p[i] = (unsigned char)(keep ? 1 : 0);
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_set_rows(moe_mask *k, const moe_store *s, int id, const unsigned char *row_keep) {
    const moe_tensor *t;
    size_t cols, rows, r;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if (id < 0 || id >= s->count) return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "no tensor with id %d to mask", id);
    t = &s->tensors[id];
    cols = (size_t)t->shape[t->ndim - 1];
    rows = cols ? t->numel / cols : 0;
    for (r = 0; r < rows; r++) memset(k->keep + t->offset + r * cols, row_keep[r] ? 1 : 0, cols);
    return MOE_OK;
}

MOE__IMPL size_t moe_mask_count(const moe_mask *k, const moe_store *s, int id) {
    size_t lo = 0, hi = k->numel, i, n = 0;
    if (!k->keep) return 0;
    if (id >= 0 && id < s->count) {
        lo = s->tensors[id].offset;
        hi = lo + s->tensors[id].numel;
    }
    for (i = lo; i < hi && i < k->numel; i++) n += k->keep[i];
    return n;
}

MOE__IMPL moe_status moe_mask_grads(const moe_mask *k, moe_store *s) {
    long long i, n = (long long)s->numel;
    if (!k->keep || s->numel != k->numel) return moe_err_set(&s->err, MOE_ERR_SHAPE, "mask made for another parameter layout");
    if (!s->grads) return moe_err_set(&s->err, MOE_ERR_STATE, "store has no gradients");
    MOE_OMP_FOR_IF(n > 32768)
    for (i = 0; i < n; i++)
        if (!k->keep[i]) s->grads[i] = 0.0f;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_step(moe_mask *k, moe_store *s, const moe_adamw_config *c, float lr,
                                   long long step, float max_norm, float *norm) {
    moe__adamw_consts kc;
    float nrm;
    if (moe__mask_check(k, s) != MOE_OK) return k->err.status;
    if (moe__adamw_prepare(s, c, lr, step, &kc) != MOE_OK) return moe_err_set(&k->err, s->err.status, "%s", s->err.msg);
    if (moe_mask_grads(k, s) != MOE_OK) return moe_err_set(&k->err, s->err.status, "%s", s->err.msg);
    nrm = moe_clip_grad_norm(s, max_norm);
    if (norm) *norm = nrm;
    /* MOE_MASK_GRAD: the plain step on the masked gradients (moments and decay still move a
       masked row); MOE_MASK_UPDATE: masked parameters and their moments stay */
    moe__adamw_apply(s, c, lr, &kc, k->mode == MOE_MASK_UPDATE ? k->keep : NULL);
    return MOE_OK;
}

#define MOE__MASK_MAGIC 0x4B53414Du /* "MASK" */
#define MOE__MASK_HEADER 24

MOE__IMPL size_t moe_mask_pack_bytes(const moe_mask *k) { return MOE__MASK_HEADER + (k->numel + 7) / 8; }

static void moe__mask_put(unsigned char *p, uint64_t v, int n) {
    int i;
    for (i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t moe__mask_get(const unsigned char *p, int n) {
    uint64_t v = 0;
    int i;
    for (i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

MOE__IMPL moe_status moe_mask_pack(const moe_mask *k, void *buf, size_t bytes) {
    unsigned char *p = (unsigned char *)buf;
    size_t i;
    if (!k->keep || !buf || bytes != moe_mask_pack_bytes(k)) return MOE_ERR_INVALID_ARG;
    memset(p, 0, bytes);
    moe__mask_put(p, MOE__MASK_MAGIC, 4);
    moe__mask_put(p + 4, (uint64_t)k->mode, 4);
    moe__mask_put(p + 8, (uint64_t)k->numel, 8);
    moe__mask_put(p + 16, k->fingerprint, 8);
    for (i = 0; i < k->numel; i++)
        if (k->keep[i]) p[MOE__MASK_HEADER + i / 8] |= (unsigned char)(1u << (i % 8));
    return MOE_OK;
}

MOE__IMPL moe_status moe_mask_unpack(moe_mask *k, const void *buf, size_t bytes) {
    const unsigned char *p = (const unsigned char *)buf;
    uint64_t mode;
    size_t i;
    if (!k->keep) return moe_err_set(&k->err, MOE_ERR_STATE, "mask unpacked before moe_mask_init");
    if (!buf || bytes < MOE__MASK_HEADER || moe__mask_get(p, 4) != MOE__MASK_MAGIC)
        return moe_err_set(&k->err, MOE_ERR_FORMAT, "not a packed mask");
    mode = moe__mask_get(p + 4, 4);
    if (moe__mask_get(p + 8, 8) != (uint64_t)k->numel || moe__mask_get(p + 16, 8) != k->fingerprint)
        return moe_err_set(&k->err, MOE_ERR_SHAPE, "packed mask made for another parameter layout");
    if (bytes != moe_mask_pack_bytes(k)) return moe_err_set(&k->err, MOE_ERR_FORMAT, "packed mask of %zu bytes, expected %zu", bytes, moe_mask_pack_bytes(k));
    if (mode != MOE_MASK_GRAD && mode != MOE_MASK_UPDATE) return moe_err_set(&k->err, MOE_ERR_FORMAT, "packed mask with unknown mode %u", (unsigned)mode);
    k->mode = (moe_mask_mode)mode;
    for (i = 0; i < k->numel; i++) k->keep[i] = (unsigned char)((p[MOE__MASK_HEADER + i / 8] >> (i % 8)) & 1u);
    return MOE_OK;
}
