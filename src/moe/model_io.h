/* ============================================================================================
   >>moe:model_io  model files: the config as a record of named fields, save/load with checks
   ============================================================================================
   A model file is one moe.h checkpoint (>>moe:ckpt: versioned, atomic, CRC-32) whose config
   blob is the MODEL RECORD below; its state blob is the caller's (RNG, data position, ...),
   its step the caller's, then the parameters and, optionally, the Adam moments.

   RECORD (a struct as named, typed values; all integers little-endian)
       u32 count, then count entries:
         u8 name length n (1..255), n bytes of name (no NUL), u8 type, u8 flags, the value:
           type 'i': i64, the member's integer sign-extended (int, enum, long long, uint64_t bits)
           type 'f': f64 bits (float members widen exactly, and narrow back exactly)
           type 's': u32 length, that many bytes (a NUL-terminated char array, without its NUL)
         flags: 1 = the value equals the writer's default
   A struct is described ONCE, by a table of moe_field (name, type, offsetof, sizeof): the
   record never depends on the struct's layout, padding, enum size or compiler. Reading:
   a field the record lacks keeps the value the caller put there (its default); a name the
   table does not know (a newer writer's field) is ignored when flagged default (new options
   default to the old behaviour), else refused with a sentence; a duplicate name, a type other
   than the table's, an integer that fits the member's width neither signed nor unsigned, or
   text longer than the array are refused.

   MODEL RECORD (the checkpoint's config blob)
       "MOEMODEL", u32 version (MOE_MODEL_RECORD_VERSION; bumped only when this encoding
       changes, never for a new field: new fields are new names),
       record of moe_model_config (moe_model_config_fields(): nested layer fields are named
       "moe.top_k", ...; flagged default against moe_model_config_default(), whose values
       the fields a file lacks take),
       u32 tensor count, then per tensor: u8 name length, name, u8 ndim, u32 flags, ndim x u32
       shape: the file's own tensor table (>>moe:store), so a loader checks what a config
       implies against what the file holds before it reserves memory.

   Loading checks, in this order, before anything the size of the model is allocated: the
   checkpoint (magic, version, size, CRC), the record, the tensor table against the
   checkpoint's parameter count and layout fingerprint, the config (moe_model_config_validate)
   and the table the config implies (moe_model_declare, within twice the file's count)
   against the file's. Then it builds the model, loads parameters (and moments) and refuses any
   non-finite value, naming the tensor. Earlier files: checkpoints that hold a raw
   moe_model_config (moe_checkpoint_save(..., &m.cfg, sizeof m.cfg, ...), as train_lm wrote
   them) load while this build's moe_model_config has the layout they were written with;
   otherwise, and for checkpoints of other objects, the sentence says what the file is and
   what to do. */

#define MOE_MODEL_RECORD_VERSION 1

typedef enum moe_field_type {
    MOE_FIELD_INT = 'i',   /* a signed or unsigned integer or an enum of 1, 2, 4 or 8 bytes  */
    MOE_FIELD_FLOAT = 'f', /* float or double                                                 */
    MOE_FIELD_TEXT = 's'   /* char array holding a NUL-terminated string                       */
} moe_field_type;

typedef struct moe_field {
    const char *name;    /* stable: a name is never reused with another meaning         */
    moe_field_type type;
    size_t offset;       /* offsetof(struct, member)                                     */
    size_t size;         /* sizeof the member                                            */
} moe_field;

/* One table line: MOE_FIELD(MOE_FIELD_INT, moe_model_config, moe.top_k) names the field
   "moe.top_k" (the member path). */
#define MOE_FIELD(type, st, member) {#member, type, offsetof(st, member), sizeof(((st *)0)->member)}

/* Encodes obj's fields into out (cap bytes); *len = the record's size. out = NULL sizes it.
   defaults (may be NULL): a struct of the same type; fields equal to it are flagged default.
   MOE_ERR_INVALID_ARG for a bad table (name of 0 or > 255 bytes, a size the type cannot have)
   or cap < *len. */
MOEDEF moe_status moe_record_write(void *out, size_t cap, size_t *len, const void *obj,
                                   const void *defaults, const moe_field *fields, int n_fields,
                                   moe_err *err);
/* Decodes a record into obj, as described above; *used (may be NULL) = bytes read. obj is
   changed only on success. MOE_ERR_FORMAT with a sentence for anything it refuses. */
MOEDEF moe_status moe_record_read(void *obj, size_t *used, const void *in, size_t len,
                                  const moe_field *fields, int n_fields, moe_err *err);

/* THE table of moe_model_config's fields (with the nested moe_layer_config's), *count set. */
MOEDEF const moe_field *moe_model_config_fields(int *count);

#ifndef MOE_NO_STDIO
/* Writes m as a model file (atomically: an existing file is replaced whole or not at all).
   with_moments: also the Adam moments; step and user (user_bytes, may be NULL/0) are the
   caller's, returned by moe_model_load. Refuses a model holding a non-finite parameter (or
   moment, when saved), naming the tensor, and leaves the file on disk as it was. */
MOEDEF moe_status moe_model_save(const moe_model *m, const char *path, int with_moments, long long step,
                                 const void *user, size_t user_bytes, moe_err *err);
/* the same through the checkpoint I/O hooks io (NULL: the real calls; >>moe:ckpt) */
MOEDEF moe_status moe_model_save_ex(const moe_model *m, const char *path, int with_moments, long long step,
                                    const void *user, size_t user_bytes, const moe_ckpt_io *io, moe_err *err);
/* The config of a model file alone (checked as moe_model_load checks it, nothing large
   allocated), to compare with a program's flags or size its buffers. info (may be NULL): the
   checkpoint header: step, has_moments, state_bytes = the size of the user blob. */
MOEDEF moe_status moe_model_load_config(const char *path, moe_model_config *c, moe_ckpt_info *info,
                                        moe_err *err);
/* Builds m (not holding a model: it is overwritten) from the file (moe_model_init with
   batches of max_B x max_T; 0 = 1 sequence of the file's max_seq) and loads the parameters, the moments when the file has them (else
   zeros), *step (may be NULL) and the user blob (user may be NULL; else user_bytes must be
   the stored size, see moe_model_load_config). On failure m is freed (moe_model_free) and err
   holds the sentence. */
MOEDEF moe_status moe_model_load(moe_model *m, const char *path, int max_B, int max_T, long long *step,
                                 void *user, size_t user_bytes, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>moe:model_io
   ============================================================================================ */

/* THE description of moe_model_config: adding a config field is one line here (the test
   test_fields_cover_struct fails while a member has no line). */
#define MOE__MF(type, member) MOE_FIELD(type, moe_model_config, member)
static const moe_field moe__model_fields[] = {
    MOE__MF(MOE_FIELD_INT, vocab),
    MOE__MF(MOE_FIELD_INT, max_seq),
    MOE__MF(MOE_FIELD_INT, d),
    MOE__MF(MOE_FIELD_INT, n_layers),
    MOE__MF(MOE_FIELD_INT, n_heads),
    MOE__MF(MOE_FIELD_INT, d_ff),
    MOE__MF(MOE_FIELD_INT, pos),
    MOE__MF(MOE_FIELD_FLOAT, rope_theta),
    MOE__MF(MOE_FIELD_FLOAT, norm_eps),
    MOE__MF(MOE_FIELD_INT, moe_every),
    MOE__MF(MOE_FIELD_INT, dense_first),
    MOE__MF(MOE_FIELD_INT, moe.d),
    MOE__MF(MOE_FIELD_INT, moe.d_ff),
    MOE__MF(MOE_FIELD_INT, moe.n_experts),
    MOE__MF(MOE_FIELD_INT, moe.top_k),
    MOE__MF(MOE_FIELD_INT, moe.n_shared),
    MOE__MF(MOE_FIELD_INT, moe.d_ff_shared),
    MOE__MF(MOE_FIELD_INT, moe.expert),
    MOE__MF(MOE_FIELD_INT, moe.activation),
    MOE__MF(MOE_FIELD_INT, moe.expert_bias),
    MOE__MF(MOE_FIELD_INT, moe.router),
    MOE__MF(MOE_FIELD_INT, moe.renormalize),
    MOE__MF(MOE_FIELD_INT, moe.router_bias),
    MOE__MF(MOE_FIELD_FLOAT, moe.capacity_factor),
    MOE__MF(MOE_FIELD_INT, moe.balance),
    MOE__MF(MOE_FIELD_FLOAT, moe.balance_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.z_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.importance_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.load_coef),
    MOE__MF(MOE_FIELD_FLOAT, moe.noise_eps),
    MOE__MF(MOE_FIELD_FLOAT, moe.router_init_std),
    MOE__MF(MOE_FIELD_FLOAT, moe.gw_threshold),
    MOE__MF(MOE_FIELD_INT, moe.gw_normalized),
    MOE__MF(MOE_FIELD_INT, moe.gw_slots),
    MOE__MF(MOE_FIELD_INT, moe.gw_released),
    MOE__MF(MOE_FIELD_INT, moe.aoe_rank),
    MOE__MF(MOE_FIELD_INT, moe.hyper),
    MOE__MF(MOE_FIELD_INT, moe.hyper_embed),
    MOE__MF(MOE_FIELD_INT, moe.hyper_hidden),
    MOE__MF(MOE_FIELD_INT, moe.hyper_cond),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layer_dim),
    MOE__MF(MOE_FIELD_INT, moe.hyper_width),
    MOE__MF(MOE_FIELD_INT, moe.hyper_adapter),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layers),
    MOE__MF(MOE_FIELD_INT, moe.hyper_layer),
    MOE__MF(MOE_FIELD_INT, moe.router_dim),
    MOE__MF(MOE_FIELD_FLOAT, moe.ec_capacity_factor),
    MOE__MF(MOE_FIELD_INT, moe.capacity_order),
    MOE__MF(MOE_FIELD_INT, moe.drop_passthrough),
    MOE__MF(MOE_FIELD_FLOAT, moe.routed_scale),
    MOE__MF(MOE_FIELD_FLOAT, moe.shared_scale),
    MOE__MF(MOE_FIELD_INT, moe.hyper_head_bias),
    MOE__MF(MOE_FIELD_INT, moe.selection_bias),
    MOE__MF(MOE_FIELD_INT, moe.cv_unbiased),
    MOE__MF(MOE_FIELD_INT, router_input),
    MOE__MF(MOE_FIELD_INT, router_dim),
    MOE__MF(MOE_FIELD_FLOAT, init_std),
    MOE__MF(MOE_FIELD_INT, balance_all_layers),
};
#undef MOE__MF

MOE__IMPL const moe_field *moe_model_config_fields(int *count) {
    if (count) *count = (int)(sizeof moe__model_fields / sizeof moe__model_fields[0]);
    return moe__model_fields;
}

/* Byte cursors with bounds: a writer that only counts past its end (out = NULL sizes a
   record), a reader that stops at its end. Little-endian by value, so hosts of either
   byte order write the same bytes. */
typedef struct moe__wcur {
    unsigned char *p;
    size_t cap, pos;
} moe__wcur;

typedef struct moe__rcur {
    const unsigned char *p;
    size_t len, pos;
    int short_read;
} moe__rcur;

static void moe__wbytes(moe__wcur *w, const void *src, size_t n) {
    if (w->p && w->pos + n <= w->cap && n) memcpy(w->p + w->pos, src, n);
    w->pos += n;
}

static void moe__wuint(moe__wcur *w, uint64_t v, int nbytes) {
    unsigned char b[8];
    int i;
    for (i = 0; i < nbytes; i++) b[i] = (unsigned char)(v >> (8 * i));
    moe__wbytes(w, b, (size_t)nbytes);
}

static const unsigned char *moe__rbytes(moe__rcur *r, size_t n) {
    const unsigned char *at = r->p + r->pos;
    if (r->short_read || n > r->len - r->pos) {
        r->short_read = 1;
        return NULL;
    }
    r->pos += n;
    return at;
}

static uint64_t moe__ruint(moe__rcur *r, int nbytes) {
    const unsigned char *b = moe__rbytes(r, (size_t)nbytes);
    uint64_t v = 0;
    int i;
    if (!b) return 0;
    for (i = nbytes - 1; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

static int64_t moe__field_int(const unsigned char *p, size_t size) {
    if (size == 1) { int8_t v; memcpy(&v, p, 1); return v; }
    if (size == 2) { int16_t v; memcpy(&v, p, 2); return v; }
    if (size == 4) { int32_t v; memcpy(&v, p, 4); return v; }
    { int64_t v; memcpy(&v, p, 8); return v; }
}

/* 1 when v fits the member (as the signed or the unsigned integer of its width) */
static int moe__field_set_int(unsigned char *p, size_t size, int64_t v) {
    if (size == 1 && v >= -128 && v <= 255) { int8_t x = (int8_t)(v > 127 ? v - 256 : v); memcpy(p, &x, 1); return 1; }
    if (size == 2 && v >= -32768 && v <= 65535) { int16_t x = (int16_t)(v > 32767 ? v - 65536 : v); memcpy(p, &x, 2); return 1; }
    if (size == 4 && v >= -2147483647LL - 1 && v <= 4294967295LL) {
        int32_t x = (int32_t)(v > 2147483647LL ? v - 4294967296LL : v);
        memcpy(p, &x, 4);
        return 1;
    }
    if (size == 8) { memcpy(p, &v, 8); return 1; }
    return 0;
}

static int moe__field_ok(const moe_field *f) {
    size_t n = f->name ? strlen(f->name) : 0;
    if (n == 0 || n > 255) return 0;
    if (f->type == MOE_FIELD_INT) return f->size == 1 || f->size == 2 || f->size == 4 || f->size == 8;
    if (f->type == MOE_FIELD_FLOAT) return f->size == sizeof(float) || f->size == sizeof(double);
    return f->type == MOE_FIELD_TEXT && f->size >= 1;
}

MOE__IMPL moe_status moe_record_write(void *out, size_t cap, size_t *len, const void *obj,
                                      const void *defaults, const moe_field *fields, int n_fields,
                                      moe_err *err) {
    moe__wcur w;
    int i;
    w.p = (unsigned char *)out; w.cap = cap; w.pos = 0;
    *len = 0;
    if (!obj || (n_fields > 0 && !fields) || n_fields < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record write needs an object and a field table");
    moe__wuint(&w, (uint64_t)n_fields, 4);
    for (i = 0; i < n_fields; i++) {
        const moe_field *f = &fields[i];
        const unsigned char *v = (const unsigned char *)obj + f->offset;
        int is_default;
        if (!moe__field_ok(f))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "field %d ('%s') of the table: name of 1..255 bytes and a size its type can have needed", i, f->name ? f->name : "");
        is_default = defaults && memcmp(v, (const unsigned char *)defaults + f->offset, f->size) == 0;
        if (f->type == MOE_FIELD_TEXT) /* up to the NUL, or the array's end */
            is_default = defaults && strncmp((const char *)v, (const char *)defaults + f->offset, f->size) == 0;
        moe__wuint(&w, (uint64_t)strlen(f->name), 1);
        moe__wbytes(&w, f->name, strlen(f->name));
        moe__wuint(&w, (uint64_t)f->type, 1);
        moe__wuint(&w, is_default ? 1u : 0u, 1);
        if (f->type == MOE_FIELD_INT) {
            moe__wuint(&w, (uint64_t)moe__field_int(v, f->size), 8);
        } else if (f->type == MOE_FIELD_FLOAT) {
            double x;
            uint64_t bits;
            if (f->size == sizeof(float)) { float y; memcpy(&y, v, sizeof y); x = y; }
            else memcpy(&x, v, sizeof x);
            memcpy(&bits, &x, 8);
            moe__wuint(&w, bits, 8);
        } else {
            size_t n = 0;
            while (n < f->size && v[n]) n++;
            moe__wuint(&w, (uint64_t)n, 4);
            moe__wbytes(&w, v, n);
        }
    }
    *len = w.pos;
    if (out && w.pos > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record needs %zu bytes, the buffer has %zu", w.pos, cap);
    return MOE_OK;
}

/* One pass over a record: checks everything; stores into obj only when `store`. */
static moe_status moe__record_pass(unsigned char *obj, size_t *used, const void *in, size_t len,
                                   const moe_field *fields, int n_fields, unsigned char *seen, int store, moe_err *err) {
    moe__rcur r;
    uint32_t count, e;
    const moe_status bad = MOE_ERR_FORMAT;
    r.p = (const unsigned char *)in; r.len = in ? len : 0; r.pos = 0; r.short_read = 0;
    count = (uint32_t)moe__ruint(&r, 4);
    if (!r.short_read && count > (r.len - r.pos) / 4) return moe_err_set(err, bad, "record claims %u fields in %zu bytes (corrupt)", count, len);
    memset(seen, 0, (size_t)n_fields + 1);
    for (e = 0; e < count && !r.short_read; e++) {
        char name[256];
        size_t nlen = (size_t)moe__ruint(&r, 1);
        const unsigned char *nm = moe__rbytes(&r, nlen);
        int type = (int)moe__ruint(&r, 1), flags = (int)moe__ruint(&r, 1), i, k = -1;
        const unsigned char *val;
        uint64_t raw;
        if (!nm || r.short_read) break;
        if (nlen == 0) return moe_err_set(err, bad, "record field %u has an empty name (corrupt)", e);
        memcpy(name, nm, nlen);
        name[nlen] = 0;
        if (type != MOE_FIELD_INT && type != MOE_FIELD_FLOAT && type != MOE_FIELD_TEXT)
            return moe_err_set(err, bad, "record field '%s' has unknown type %d (corrupt, or written by a newer version)", name, type);
        if (type == MOE_FIELD_TEXT) {
            size_t n = (size_t)moe__ruint(&r, 4);
            val = moe__rbytes(&r, n);
            raw = n;
        } else {
            val = NULL;
            raw = moe__ruint(&r, 8);
        }
        if (r.short_read) break;
        for (i = 0; i < n_fields && k < 0; i++)
            if (strlen(fields[i].name) == nlen && memcmp(fields[i].name, name, nlen) == 0) k = i;
        if (k < 0) {
            if (flags & 1) continue; /* a newer writer's option at its default: the old behaviour */
            return moe_err_set(err, bad, "record field '%s' is unknown to this version and not at its default (written by a newer version?)", name);
        }
        if (seen[k]) return moe_err_set(err, bad, "record field '%s' appears twice (corrupt)", name);
        seen[k] = 1;
        if (type != (int)fields[k].type)
            return moe_err_set(err, bad, "record field '%s' has type '%c', expected '%c'", name, type, (int)fields[k].type);
        {
            unsigned char *dst = obj + fields[k].offset;
            if (type == MOE_FIELD_INT) {
                unsigned char tmp[8];
                if (!moe__field_set_int(store ? dst : tmp, fields[k].size, (int64_t)raw))
                    return moe_err_set(err, bad, "record field '%s' = %lld does not fit its %zu-byte member", name, (long long)(int64_t)raw, fields[k].size);
            } else if (type == MOE_FIELD_FLOAT) {
                double x;
                memcpy(&x, &raw, 8);
                if (store && fields[k].size == sizeof(float)) { float y = (float)x; memcpy(dst, &y, sizeof y); }
                else if (store) memcpy(dst, &x, sizeof x);
            } else {
                if (raw >= fields[k].size) return moe_err_set(err, bad, "record field '%s' holds %llu bytes of text; its member holds %zu with the NUL", name, (unsigned long long)raw, fields[k].size);
                if (store) {
                    memset(dst, 0, fields[k].size);
                    if (raw) memcpy(dst, val, (size_t)raw);
                }
            }
        }
    }
    if (r.short_read) return moe_err_set(err, bad, "record ends inside field %u of %u (truncated or corrupt)", e, count);
    if (used) *used = r.pos;
    return MOE_OK;
}

MOE__IMPL moe_status moe_record_read(void *obj, size_t *used, const void *in, size_t len,
                                     const moe_field *fields, int n_fields, moe_err *err) {
    unsigned char *seen;
    moe_status st;
    int i;
    if (!obj || (n_fields > 0 && !fields) || n_fields < 0) return moe_err_set(err, MOE_ERR_INVALID_ARG, "record read needs an object and a field table");
    for (i = 0; i < n_fields; i++)
        if (!moe__field_ok(&fields[i]))
            return moe_err_set(err, MOE_ERR_INVALID_ARG, "field %d ('%s') of the table: name of 1..255 bytes and a size its type can have needed", i, fields[i].name ? fields[i].name : "");
    seen = (unsigned char *)moe__calloc((size_t)n_fields + 1, 1);
    if (!seen) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory reading a record");
    /* check everything first, so a refused record leaves obj as it was */
    st = moe__record_pass((unsigned char *)obj, used, in, len, fields, n_fields, seen, 0, err);
    if (st == MOE_OK) st = moe__record_pass((unsigned char *)obj, used, in, len, fields, n_fields, seen, 1, err);
    MOE_FREE(seen);
    return st;
}

#ifndef MOE_NO_STDIO
#define MOE__MODEL_MAGIC "MOEMODEL"

/* FNV-1a of moe_model_config's layout as the field table sees it (size, then every name,
   offset and size). Checkpoints written before model files held moe_model_config's raw bytes;
   they are read only while this matches the layout of that time: every field 4 bytes, in
   declaration order, the same on every common ABI. */
#define MOE__MODEL_RAW_LAYOUT_V0 0x285067bc168b2a8bULL
static uint64_t moe__model_raw_layout(void) {
    uint64_t h = 14695981039346656037ULL;
    unsigned char b[4];
    int i, n;
    const moe_field *f = moe_model_config_fields(&n);
    moe__put_u32(b, (uint32_t)sizeof(moe_model_config));
    h = moe__fnv1a(h, b, 4);
    for (i = 0; i < n; i++) {
        h = moe__fnv1a(h, f[i].name, strlen(f[i].name) + 1);
        moe__put_u32(b, (uint32_t)f[i].offset);
        h = moe__fnv1a(h, b, 4);
        moe__put_u32(b, (uint32_t)f[i].size);
        h = moe__fnv1a(h, b, 4);
    }
    return h;
}

/* index of a non-finite value in buf (numel floats), tensor by tensor; 0 when all finite */
static int moe__first_nonfinite(const moe_store *s, const float *buf, int *tensor, size_t *index) {
    int t;
    size_t i;
    for (t = 0; t < s->count; t++) {
        const float *p = buf + s->tensors[t].offset;
        for (i = 0; i < s->tensors[t].numel; i++)
            if (!(p[i] - p[i] == 0.0f)) { /* NaN and +-inf give NaN */
                *tensor = t;
                *index = i;
                return 1;
            }
    }
    return 0;
}

/* A sentence naming the first tensor with a non-finite value in params or (moments) Adam m, v. */
static moe_status moe__check_finite(const moe_store *s, int moments, const char *what, moe_err *err) {
    const float *bufs[3];
    const char *names[3] = {"parameter", "Adam first moment", "Adam second moment"};
    int b, t;
    size_t i;
    bufs[0] = s->params; bufs[1] = s->adam_m; bufs[2] = s->adam_v;
    for (b = 0; b < (moments ? 3 : 1); b++)
        if (bufs[b] && moe__first_nonfinite(s, bufs[b], &t, &i))
            return moe_err_set(err, MOE_ERR_FORMAT, "%s: tensor '%s' holds a non-finite %s (element %zu, %g)", what,
                               s->tensors[t].name, names[b], i, (double)bufs[b][s->tensors[t].offset + i]);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_save(const moe_model *m, const char *path, int with_moments, long long step,
                                    const void *user, size_t user_bytes, moe_err *err) {
    return moe_model_save_ex(m, path, with_moments, step, user, user_bytes, NULL, err);
}

MOE__IMPL moe_status moe_model_save_ex(const moe_model *m, const char *path, int with_moments, long long step,
                                       const void *user, size_t user_bytes, const moe_ckpt_io *io, moe_err *err) {
    moe_model_config defaults = moe_model_config_default();
    moe__wcur w;
    size_t rec_len;
    int n, t, pass;
    moe_status st;
    const moe_field *fields = moe_model_config_fields(&n);
    moe_err why;
    if (!m || !m->S.params || !path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "model save needs an initialised model and a path");
    if (moe__check_finite(&m->S, with_moments, "not saved", &why) != MOE_OK)
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "%s; '%s' is unchanged", why.msg, path);
    /* pass 0 sizes the model record, pass 1 writes it */
    w.p = NULL; w.cap = 0;
    for (pass = 0; pass < 2; pass++) {
        w.pos = 0;
        moe__wbytes(&w, MOE__MODEL_MAGIC, 8);
        moe__wuint(&w, MOE_MODEL_RECORD_VERSION, 4);
        st = moe_record_write(w.p ? w.p + w.pos : NULL, w.p ? w.cap - w.pos : 0, &rec_len, &m->cfg, &defaults, fields, n, err);
        if (st != MOE_OK) { MOE_FREE(w.p); return st; }
        w.pos += rec_len;
        moe__wuint(&w, (uint64_t)m->S.count, 4);
        for (t = 0; t < m->S.count; t++) {
            const moe_tensor *x = &m->S.tensors[t];
            int k;
            moe__wuint(&w, (uint64_t)strlen(x->name), 1);
            moe__wbytes(&w, x->name, strlen(x->name));
            moe__wuint(&w, (uint64_t)x->ndim, 1);
            moe__wuint(&w, (uint64_t)(uint32_t)x->flags, 4);
            for (k = 0; k < x->ndim; k++) moe__wuint(&w, (uint64_t)(uint32_t)x->shape[k], 4);
        }
        if (pass == 0) {
            w.cap = w.pos;
            w.p = (unsigned char *)MOE_MALLOC(w.cap);
            if (!w.p) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory for the model record");
        }
    }
    st = moe_checkpoint_save_ex(path, &m->S, with_moments, step, w.p, w.pos, user, user_bytes, io, err);
    MOE_FREE(w.p);
    return st;
}

/* A model file read once: its verified bytes (the values are loaded from these, so the file is
   read and checksummed once per load), the checkpoint header, the config, the record within the
   bytes and the tensor table (declared, never allocated; count 0 for a raw-config file). */
typedef struct moe__model_file {
    moe_model_config cfg;
    moe_ckpt_info info;
    unsigned char *bytes;
    const unsigned char *record;
    moe_store table;
} moe__model_file;

static void moe__model_file_free(moe__model_file *f) {
    MOE_FREE(f->bytes);
    f->bytes = NULL;
    f->record = NULL;
    moe_store_free(&f->table);
}

static moe_status moe__model_file_read(moe__model_file *f, const char *path, moe_err *err) {
    const moe_status bad = MOE_ERR_FORMAT;
    moe_status st;
    moe__rcur r;
    moe_err why;
    size_t used, len;
    uint32_t version, count, t;
    int n;
    const moe_field *fields = moe_model_config_fields(&n);
    memset(f, 0, sizeof *f);
    moe_store_init(&f->table);
    st = moe__ckpt_read(path, &f->bytes, &len, &f->info, err);
    if (st != MOE_OK) return st;
    f->record = f->bytes + MOE__CKPT_HEADER;
    if (f->info.config_bytes < 12 || memcmp(f->record, MOE__MODEL_MAGIC, 8) != 0) {
        /* an earlier file: the raw bytes of a moe_model_config, or another object's checkpoint */
        if (f->info.config_bytes == sizeof(moe_model_config) && moe__model_raw_layout() == MOE__MODEL_RAW_LAYOUT_V0) {
            memcpy(&f->cfg, f->record, sizeof f->cfg);
            return MOE_OK;
        }
        st = f->info.config_bytes == sizeof(moe_model_config)
                 ? moe_err_set(err, bad, "'%s' holds a raw moe_model_config of an older layout (a checkpoint from before model files): load it with the moe.h that wrote it, save it with moe_model_save", path)
                 : moe_err_set(err, bad, "'%s' is a checkpoint, not a model file (its %llu-byte config is no model record): load it with moe_checkpoint_load into what wrote it", path, (unsigned long long)f->info.config_bytes);
        moe__model_file_free(f);
        return st;
    }
    r.p = f->record; r.len = (size_t)f->info.config_bytes; r.pos = 8; r.short_read = 0;
    version = (uint32_t)moe__ruint(&r, 4);
    if (version != MOE_MODEL_RECORD_VERSION) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s' holds a model record of version %u; this moe.h reads version %d (written by another version of moe.h)", path, version, MOE_MODEL_RECORD_VERSION);
    }
    f->cfg = moe_model_config_default(); /* the fields a file lacks */
    if (moe_record_read(&f->cfg, &used, f->record + r.pos, r.len - r.pos, fields, n, &why) != MOE_OK) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': model config: %s", path, why.msg);
    }
    r.pos += used;
    /* the tensor table: declared into a store that is never allocated */
    count = (uint32_t)moe__ruint(&r, 4);
    if (!r.short_read && count > (r.len - r.pos) / 6) r.short_read = 1;
    for (t = 0; t < count && !r.short_read; t++) {
        char name[256];
        int dims[MOE_MAX_DIMS] = {0, 0, 0, 0}, nd, k, flags;
        size_t nlen = (size_t)moe__ruint(&r, 1);
        const unsigned char *nm = moe__rbytes(&r, nlen);
        nd = (int)moe__ruint(&r, 1);
        flags = (int)(int32_t)(uint32_t)moe__ruint(&r, 4);
        if (!nm || r.short_read || nd < 1 || nd > MOE_MAX_DIMS) { r.short_read = 1; break; }
        for (k = 0; k < nd; k++) {
            uint64_t v = moe__ruint(&r, 4);
            dims[k] = v > 0x7fffffffu ? -1 : (int)v;
        }
        memcpy(name, nm, nlen);
        name[nlen] = 0;
        if (r.short_read || moe_store_add(&f->table, name, flags, dims[0], dims[1], dims[2], dims[3]) < 0) {
            if (!r.short_read) {
                why = f->table.err;
                moe__model_file_free(f);
                return moe_err_set(err, bad, "'%s': tensor table: %s (corrupt)", path, why.msg);
            }
            break;
        }
    }
    if (r.short_read || r.pos != r.len) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': the model record's tensor table is truncated or has trailing bytes (corrupt)", path);
    }
    if ((uint64_t)f->table.numel != f->info.numel || moe_store_fingerprint(&f->table) != f->info.fingerprint) {
        moe__model_file_free(f);
        return moe_err_set(err, bad, "'%s': the tensor table (%zu parameters) does not describe the %llu parameters that follow (corrupt)", path, f->table.numel, (unsigned long long)f->info.numel);
    }
    return MOE_OK;
}

static void moe__shape_text(char *out, size_t n, const moe_tensor *t) {
    int k;
    size_t at = (size_t)snprintf(out, n, "(%d", t->shape[0]);
    for (k = 1; k < t->ndim && at < n; k++) at += (size_t)snprintf(out + at, n - at, ", %d", t->shape[k]);
    if (at < n) snprintf(out + at, n - at, ")");
}

/* The config must validate and imply exactly the file's tensors: checked on the table alone
   (moe_model_declare, within the file's count), before anything that large is allocated. */
static moe_status moe__model_file_check(const moe__model_file *f, const char *path, moe_err *err) {
    moe_model plan;
    moe_status st = MOE_OK;
    moe_err why;
    int t;
    if (moe_model_config_validate(&f->cfg, &why) != MOE_OK)
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds an invalid model config: %s", path, why.msg);
    if (f->info.numel == 0) return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds no parameters", path);
    /* within twice the file's count (plus a little): a config a few tensors off still gets a
       sentence naming the first one that differs */
    if (moe_model_declare(&plan, &f->cfg, 2 * (size_t)f->info.numel + 4096) != MOE_OK)
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds %llu parameters and a config that does not fit them: %s", path, (unsigned long long)f->info.numel, plan.err.msg);
    for (t = 0; t < plan.S.count && t < f->table.count; t++) {
        const moe_tensor *a = &plan.S.tensors[t], *b = &f->table.tensors[t];
        if (strcmp(a->name, b->name) != 0 || a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape) != 0 || a->flags != b->flags) {
            char sa[64], sb[64];
            moe__shape_text(sa, sizeof sa, a);
            moe__shape_text(sb, sizeof sb, b);
            st = moe_err_set(err, MOE_ERR_FORMAT, "'%s': its config implies tensor %d '%s' %s, the file holds '%s' %s", path, t, a->name, sa, b->name, sb);
            break;
        }
    }
    if (st == MOE_OK && ((uint64_t)plan.S.numel != f->info.numel || moe_store_fingerprint(&plan.S) != f->info.fingerprint))
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s': its config implies %d tensors of %zu parameters, the file holds %llu parameters of another layout", path,
                         plan.S.count, plan.S.numel, (unsigned long long)f->info.numel);
    moe_model_free(&plan);
    return st;
}

MOE__IMPL moe_status moe_model_load_config(const char *path, moe_model_config *c, moe_ckpt_info *info,
                                           moe_err *err) {
    moe__model_file f;
    moe_status st;
    if (!c) return moe_err_set(err, MOE_ERR_INVALID_ARG, "moe_model_load_config needs a config to fill");
    st = moe__model_file_read(&f, path, err);
    if (st != MOE_OK) return st;
    st = moe__model_file_check(&f, path, err);
    if (st == MOE_OK) {
        *c = f.cfg;
        if (info) *info = f.info;
    }
    moe__model_file_free(&f);
    return st;
}

MOE__IMPL moe_status moe_model_load(moe_model *m, const char *path, int max_B, int max_T, long long *step,
                                    void *user, size_t user_bytes, moe_err *err) {
    moe__model_file f;
    moe_status st;
    moe_err local;
    if (!err) err = &local;
    if (!m) return moe_err_set(err, MOE_ERR_INVALID_ARG, "moe_model_load needs a model to fill");
    memset(m, 0, sizeof *m);
    st = moe__model_file_read(&f, path, err);
    if (st == MOE_OK) st = moe__model_file_check(&f, path, err);
    if (st == MOE_OK && user && f.info.state_bytes != (uint64_t)user_bytes)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds a %llu-byte user blob, the caller expects %zu (see moe_model_load_config)", path,
                         (unsigned long long)f.info.state_bytes, user_bytes);
    if (st == MOE_OK && moe_model_init(m, &f.cfg, max_B > 0 ? max_B : 1, max_T > 0 ? max_T : f.cfg.max_seq) != MOE_OK)
        st = moe_err_set(err, m->err.status, "%s", m->err.msg);
    /* the values from the bytes checked above; non-finite ones are refused, naming the tensor */
    if (st == MOE_OK)
        st = moe__ckpt_load_bytes(path, &m->S, step, f.bytes, &f.info, NULL, NULL, 0, user, user ? user_bytes : 0, err);
    moe__model_file_free(&f);
    if (st != MOE_OK) {
        moe_model_free(m);
        m->err = *err;
    }
    return st;
}
#endif /* MOE_NO_STDIO */
