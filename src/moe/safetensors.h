/* ============================================================================================
   >>moe:safetensors  safetensors files: any store, and the model under Hugging Face names
   ============================================================================================
   The interchange format of the field (github.com/huggingface/safetensors, "Format"):
       u64 N (little-endian), N bytes of UTF-8 JSON (the header), then the data.
       The header is one object. Per tensor: "name": {"dtype": "F32", "shape": [2, 3],
       "data_offsets": [begin, end]}, byte offsets into the data (relative to its start),
       row-major, little-endian; and optionally "__metadata__": {"key": "text", ...}.
   Our own checkpoint (>>moe:ckpt) stays the training format (moments, RNG, data position);
   safetensors carries weights only (and, beside a model, its config.json).

   WRITING: tensors in store order, contiguous, header padded with spaces to a multiple of 8
   bytes, "__metadata__": {"format": "pt"} (what transformers looks for). F32 as stored;
   F16 and BF16 rounded to nearest, ties to even (the float->half rule of IEEE 754 and of
   torch's .to(torch.float16 / torch.bfloat16)). Atomic: a temporary file beside the target,
   flushed, fsynced, renamed (the checkpoint writer's mechanism).

   READING is bounded and runs no code (the format's promise): the file's size is measured
   first; the header length must fit in the file (and be at most 100 MB, the reference
   implementation's limit); the header is parsed by a small JSON reader (depth <= 64, strings
   and numbers checked); every tensor needs a dtype moe.h reads (F32, F16, BF16; any other,
   or an unknown one, is refused naming it), a shape of at most 8 dimensions whose bytes equal
   end - begin, and the tensors' ranges, sorted, must tile the data exactly (no overlap, no
   hole, nothing past the end: the reference's "InvalidOffset" / "MetadataIncompleteBuffer").
   Duplicate names, duplicate fields and text after the header object are refused. Only
   then is a byte of data read, in 64 KiB chunks, converted to float. What is allocated: the
   header (its checked length, at most the file's size), a table of one ~100-byte entry per
   tensor it lists (each listing takes at least 50 of its bytes), a 64 KiB chunk, and for
   moe_safetensors_load a copy of the store's parameters, so that a failed load leaves the
   store unchanged: never a size the file merely claims.

   HUGGING FACE NAMES (moe_model_export_hf / moe_model_import_hf): the tiny model as
   LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) names it:
       wte                      model.embed_tokens.weight                        (V, d)
       l{N}.ln1.w               model.layers.{N}.input_layernorm.weight          (d)
       l{N}.attn.wqkv rows 0..d      model.layers.{N}.self_attn.q_proj.weight    (d, d)
                      rows d..2d                              k_proj.weight
                      rows 2d..3d                             v_proj.weight
       l{N}.attn.wo             model.layers.{N}.self_attn.o_proj.weight         (d, d)
       l{N}.ln2.w               model.layers.{N}.post_attention_layernorm.weight (d)
       dense layer:  l{N}.ffn.w_gate / w_up / w_down [0]
                                model.layers.{N}.mlp.gate_proj / up_proj / down_proj.weight
       MoE layer:    l{N}.moe.router.w   model.layers.{N}.block_sparse_moe.gate.weight  (E, d)
                     l{N}.moe.experts.w_gate[e] / w_up[e] / w_down[e]
                                model.layers.{N}.block_sparse_moe.experts.{e}.w1 / w3 / w2.weight
                     (Mixtral: w1 the gate, silu'd; w3 the up projection; w2 down)
                     l{N}.moe.shared.* (S shared experts of width Ds, weight 1, no gate):
                                model.layers.{N}.block_sparse_moe.shared_expert.gate_proj /
                                up_proj / down_proj.weight, ONE SwiGLU MLP of width S * Ds:
                                the S experts' gate and up rows stacked, their down columns
                                side by side (sum of S SwiGLU experts = one of S times the
                                width; DeepSeekMoE's shared_experts, arXiv:2401.06066 s3.2;
                                unlike Qwen2-MoE's shared_expert there is no sigmoid gate)
       lnf.w                    model.norm.weight                                (d)
   The head is tied to the embedding: no lm_head.weight is written and config.json says
   "tie_word_embeddings": true, as transformers' save_pretrained writes a tied model. On
   reading, an lm_head.weight is accepted only if it equals model.embed_tokens.weight.
   Attention and positions match HF Llama as they are: per head, q and k are rotated in the
   rotate-half pairing (i, i + hd/2) with angle t * theta^(-2i/hd) (>>moe:attention), scores
   scaled by 1/sqrt(hd); RMSNorm is x / sqrt(mean(x^2) + eps) * w (LlamaRMSNorm): the same
   weights give the same logits, no permutation (llama.cpp needs one: >>moe:gguf).

   config.json ("the familiar form"): for a dense model LlamaForCausalLM / "llama" with
   vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
   num_key_value_heads (= heads), head_dim, hidden_act "silu", max_position_embeddings,
   rms_norm_eps, rope_theta, rope_scaling null, attention_bias false, mlp_bias false,
   tie_word_embeddings true, torch_dtype. An MoE model that is exactly Mixtral (every layer
   MoE, no shared expert, top-k weights renormalised) is MixtralForCausalLM / "mixtral" with
   intermediate_size = the expert width, num_local_experts, num_experts_per_tok. Other MoE
   models say "architectures": ["MoeHForCausalLM"], "model_type": "moe_h": the Mixtral keys
   and names, with Qwen2-MoE's keys for what Mixtral lacks: intermediate_size = the dense
   layers' width, moe_intermediate_size = the expert width, norm_topk_prob (renormalise the
   top-k weights), mlp_only_layers (the dense layers) with decoder_sparse_step 1, and
   shared_expert_intermediate_size (S * Ds) with n_shared_experts (S, DeepSeek's key).
   tests/ref/hf_ref.py implements all three in plain PyTorch.

   Only configurations that map are written: RoPE positions, SwiGLU experts, the softmax
   top-k router without bias or capacity limit, routers reading x (no RMoE/MLP router input),
   no HyperMoE. Any other gets a sentence naming what does not map. Training-only settings
   (balance and z-loss coefficients, GW-MoE's fine-tuning broadcast) are not carried: an
   imported model has moe.h's defaults for them. */

typedef enum moe_dtype {
    MOE_DTYPE_F32 = 0,
    MOE_DTYPE_F16 = 1, /* IEEE binary16                               */
    MOE_DTYPE_BF16 = 2 /* bfloat16: float32's upper 16 bits, rounded  */
} moe_dtype;

/* float32 <-> 16-bit floats, round to nearest, ties to even; NaN stays NaN, overflow gives
   infinity (f16: |x| >= 65520). */
MOEDEF uint16_t moe_f32_to_f16(float x);
MOEDEF float moe_f16_to_f32(uint16_t h);
MOEDEF uint16_t moe_f32_to_bf16(float x);
MOEDEF float moe_bf16_to_f32(uint16_t h);

#ifndef MOE_NO_STDIO
/* Every tensor of s (its own names and shapes) as a safetensors file of dtype. */
MOEDEF moe_status moe_safetensors_save(const char *path, const moe_store *s, moe_dtype dtype, moe_err *err);
/* Fills every tensor of s (allocated) from the file, by name; shapes must be equal, F32, F16
   or BF16 is converted. A tensor of s the file lacks, or one the file holds that s lacks, is
   refused naming it. On any error s is unchanged. */
MOEDEF moe_status moe_safetensors_load(const char *path, moe_store *s, moe_err *err);
/* MOE_OK when c maps onto the Hugging Face names above, else a sentence saying what does not. */
MOEDEF moe_status moe_model_hf_check(const moe_model_config *c, moe_err *err);
/* Writes dir/model.safetensors (weights as dtype, HF names) and dir/config.json; dir must
   exist. Each file is replaced atomically. */
MOEDEF moe_status moe_model_export_hf(const moe_model *m, const char *dir, moe_dtype dtype, moe_err *err);
/* Builds m (overwritten) from dir/config.json and dir/model.safetensors: the config is read
   and checked (and the parameter count it implies compared with the weights file's size)
   before the model is allocated, then every tensor is loaded by its HF name and checked
   finite. Batches of max_B x max_T (0 = 1 x the config's max_position_embeddings). On failure
   m is freed and err holds the sentence. */
MOEDEF moe_status moe_model_import_hf(moe_model *m, const char *dir, int max_B, int max_T, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>moe:safetensors
   ============================================================================================ */

MOE__IMPL uint16_t moe_f32_to_f16(float x) {
    /* integer rounding on the bits (numpy's npy_floatbits_to_halfbits): exact for every input,
       no dependence on the FPU's rounding mode or excess precision */
    uint32_t f, f_exp, f_sig;
    uint16_t sign;
    memcpy(&f, &x, 4);
    sign = (uint16_t)((f & 0x80000000u) >> 16);
    f_exp = f & 0x7f800000u;
    if (f_exp >= 0x47800000u) { /* |x| >= 65536, infinity or NaN */
        f_sig = f & 0x007fffffu;
        if (f_exp == 0x7f800000u && f_sig != 0) return (uint16_t)(sign | 0x7e00u | (f_sig >> 13)); /* quiet NaN */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (f_exp <= 0x38000000u) { /* |x| < 2^-14: a half subnormal or zero */
        uint32_t shift;
        if (f_exp < 0x33000000u) return sign; /* below half the smallest subnormal */
        f_exp >>= 23;
        f_sig = 0x00800000u + (f & 0x007fffffu);
        shift = 113u - f_exp; /* 1 .. 11 */
        /* round to nearest even at bit 13 of the shifted significand; the bits shifted out
           below it decide a tie */
        {
            uint32_t lost = f_sig & ((1u << shift) - 1u);
            f_sig >>= shift;
            if ((f_sig & 0x3fffu) != 0x1000u || lost) f_sig += 0x1000u;
        }
        return (uint16_t)(sign + (f_sig >> 13)); /* a carry into the exponent is correct */
    }
    f_sig = f & 0x007fffffu;
    if ((f_sig & 0x3fffu) != 0x1000u) f_sig += 0x1000u; /* ties (exactly 0x1000) stay even */
    /* a carry of the significand into the exponent (and up to infinity) is correct */
    return (uint16_t)(sign + (((f_exp - 0x38000000u) >> 13) + (f_sig >> 13)));
}

MOE__IMPL float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float x;
    if (e == 0) { /* zero or subnormal: man * 2^-24 is exact in float */
        x = (float)man * 5.9604644775390625e-8f;
        return sign ? -x : x;
    }
    if (e == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((e + 112u) << 23) | (man << 13);
    memcpy(&x, &u, 4);
    return x;
}

MOE__IMPL uint16_t moe_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; overflow becomes infinity */
    return (uint16_t)(u >> 16);
}

MOE__IMPL float moe_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

#ifndef MOE_NO_STDIO

/* ---- a small bounded JSON reader -------------------------------------------------------------
   Reads a value at a time from a buffer it owns (strings are decoded in place, so it never
   allocates), depth-limited; the first problem is kept as a sentence in why. */
#define MOE__JSON_DEPTH 64

typedef struct moe__json {
    char *p;           /* the text; decoded strings overwrite it in place */
    size_t len, pos;
    int depth;
    char why[160];     /* "" while all is well */
} moe__json;

static int moe__js_fail(moe__json *j, const char *what) {
    if (!j->why[0]) snprintf(j->why, sizeof j->why, "%s at byte %zu", what, j->pos);
    return 0;
}

static int moe__js_ws(moe__json *j) { /* skips white space; returns the next byte or -1 */
    while (j->pos < j->len && (j->p[j->pos] == ' ' || j->p[j->pos] == '\t' || j->p[j->pos] == '\n' || j->p[j->pos] == '\r'))
        j->pos++;
    return j->pos < j->len ? (unsigned char)j->p[j->pos] : -1;
}

static int moe__js_eat(moe__json *j, char c) {
    if (moe__js_ws(j) != (unsigned char)c) {
        char what[32];
        sprintf(what, "expected '%c'", c);
        return moe__js_fail(j, what);
    }
    j->pos++;
    return 1;
}

static int moe__js_hex4(moe__json *j, size_t at, uint32_t *v) {
    int i;
    *v = 0;
    if (at + 4 > j->len) return 0;
    for (i = 0; i < 4; i++) {
        char c = j->p[at + (size_t)i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return 0;
        *v = (*v << 4) | (uint32_t)d;
    }
    return 1;
}

/* A string: *out points at its decoded bytes (NUL-terminated in place), *n their count. */
static int moe__js_string(moe__json *j, char **out, size_t *n) {
    size_t r, w;
    if (!moe__js_eat(j, '"')) return 0;
    r = w = j->pos;
    for (;;) {
        unsigned char c;
        if (r >= j->len) return moe__js_fail(j, "unterminated string");
        c = (unsigned char)j->p[r];
        if (c == '"') break;
        if (c < 0x20) { j->pos = r; return moe__js_fail(j, "control character in a string"); }
        if (c != '\\') { j->p[w++] = (char)c; r++; continue; }
        if (r + 1 >= j->len) return moe__js_fail(j, "unterminated string");
        c = (unsigned char)j->p[r + 1];
        r += 2;
        switch (c) {
        case '"': case '\\': case '/': j->p[w++] = (char)c; break;
        case 'b': j->p[w++] = '\b'; break;
        case 'f': j->p[w++] = '\f'; break;
        case 'n': j->p[w++] = '\n'; break;
        case 'r': j->p[w++] = '\r'; break;
        case 't': j->p[w++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (!moe__js_hex4(j, r, &cp)) { j->pos = r; return moe__js_fail(j, "bad \\u escape"); }
            r += 4;
            if (cp >= 0xd800u && cp < 0xdc00u) { /* a surrogate pair: 12 bytes of text give 4 */
                if (r + 6 > j->len || j->p[r] != '\\' || j->p[r + 1] != 'u' || !moe__js_hex4(j, r + 2, &lo) || lo < 0xdc00u || lo >= 0xe000u) {
                    j->pos = r;
                    return moe__js_fail(j, "unpaired surrogate in a \\u escape");
                }
                r += 6;
                cp = 0x10000u + ((cp - 0xd800u) << 10) + (lo - 0xdc00u);
            } else if (cp >= 0xdc00u && cp < 0xe000u) {
                j->pos = r;
                return moe__js_fail(j, "unpaired surrogate in a \\u escape");
            }
            /* UTF-8 is never longer than the escape it came from, so w stays behind r */
            if (cp < 0x80u) j->p[w++] = (char)cp;
            else if (cp < 0x800u) { j->p[w++] = (char)(0xc0u | (cp >> 6)); j->p[w++] = (char)(0x80u | (cp & 0x3fu)); }
            else if (cp < 0x10000u) {
                j->p[w++] = (char)(0xe0u | (cp >> 12)); j->p[w++] = (char)(0x80u | ((cp >> 6) & 0x3fu));
                j->p[w++] = (char)(0x80u | (cp & 0x3fu));
            } else {
                j->p[w++] = (char)(0xf0u | (cp >> 18)); j->p[w++] = (char)(0x80u | ((cp >> 12) & 0x3fu));
                j->p[w++] = (char)(0x80u | ((cp >> 6) & 0x3fu)); j->p[w++] = (char)(0x80u | (cp & 0x3fu));
            }
            break;
        }
        default: j->pos = r - 2; return moe__js_fail(j, "unknown escape in a string");
        }
    }
    j->p[w] = '\0'; /* w <= r, the closing quote's place */
    *out = j->p + j->pos;
    *n = w - j->pos;
    j->pos = r + 1;
    return 1;
}

/* 10^k, exact for k <= 22 (every such power is a double) */
static double moe__pow10(long k) {
    double p = 1.0;
    long i;
    if (k > 22) return pow(10.0, (double)k);
    for (i = 0; i < k; i++) p *= 10.0;
    return p;
}

/* A number. *is_uint: it is a non-negative integer that fits in u64 (then *u holds it). The
   double is built from the decimal digits without strtod (no locale): one correctly rounded
   product or quotient for up to 19 significant digits and exponents within 10^+-22, which
   covers the numbers a config.json holds (1e-05, 10000.0, 500000). */
static int moe__js_number(moe__json *j, double *v, int *is_uint, uint64_t *u) {
    size_t at;
    int neg = 0, integer = 1, overflow = 0, sig = 0, exp_neg = 0;
    long exp10 = 0, e = 0;
    uint64_t mant = 0, whole = 0;
    double x;
    moe__js_ws(j);
    at = j->pos;
    if (at < j->len && j->p[at] == '-') { neg = 1; at++; }
    if (at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected a value"); }
    if (j->p[at] == '0' && at + 1 < j->len && j->p[at + 1] >= '0' && j->p[at + 1] <= '9') { j->pos = at; return moe__js_fail(j, "number with a leading zero"); }
    for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++) {
        unsigned dg = (unsigned)(j->p[at] - '0');
        if (whole > (UINT64_MAX - dg) / 10u) overflow = 1;
        else whole = whole * 10u + dg;
        if (sig < 19) { mant = mant * 10u + dg; sig += mant != 0; }
        else exp10++; /* digits past the 19th only scale */
    }
    if (at < j->len && j->p[at] == '.') {
        integer = 0;
        if (++at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected digits after '.'"); }
        for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++)
            if (sig < 19) { mant = mant * 10u + (unsigned)(j->p[at] - '0'); sig += mant != 0; exp10--; }
    }
    if (at < j->len && (j->p[at] == 'e' || j->p[at] == 'E')) {
        integer = 0;
        at++;
        if (at < j->len && (j->p[at] == '+' || j->p[at] == '-')) exp_neg = j->p[at++] == '-';
        if (at >= j->len || j->p[at] < '0' || j->p[at] > '9') { j->pos = at; return moe__js_fail(j, "expected digits in an exponent"); }
        for (; at < j->len && j->p[at] >= '0' && j->p[at] <= '9'; at++)
            if (e < 100000) e = e * 10 + (j->p[at] - '0');
    }
    exp10 += exp_neg ? -e : e;
    x = (double)mant;
    if (mant != 0 && exp10 != 0) x = exp10 < 0 ? x / moe__pow10(-exp10) : x * moe__pow10(exp10);
    *v = neg ? -x : x;
    *is_uint = !neg && integer && !overflow;
    *u = whole;
    j->pos = at;
    return 1;
}

static int moe__js_literal(moe__json *j, const char *word) {
    size_t n = strlen(word);
    moe__js_ws(j);
    if (j->pos + n > j->len || memcmp(j->p + j->pos, word, n) != 0) return moe__js_fail(j, "expected a value");
    j->pos += n;
    return 1;
}

/* Iterates an object's members or an array's items: call with *first = 1 after the opening
   bracket was eaten; returns 1 while there is another (for an object, *key is its name),
   0 at the closing bracket (eaten) or on an error (why set). */
static int moe__js_next(moe__json *j, int object, int *first, char **key) {
    int close = object ? '}' : ']';
    size_t n;
    if (moe__js_ws(j) == close) { j->pos++; return 0; }
    if (!*first && !moe__js_eat(j, ',')) return 0;
    *first = 0;
    if (object && !(moe__js_string(j, key, &n) && moe__js_eat(j, ':'))) return 0;
    return 1;
}

static int moe__js_open(moe__json *j, char c) {
    if (!moe__js_eat(j, c)) return 0;
    if (++j->depth > MOE__JSON_DEPTH) return moe__js_fail(j, "nested deeper than 64 levels");
    return 1;
}

static int moe__js_skip(moe__json *j) { /* any value */
    int c = moe__js_ws(j), first = 1;
    char *s;
    size_t n;
    double v;
    int iu;
    uint64_t u;
    if (c == '"') return moe__js_string(j, &s, &n);
    if (c == 't') return moe__js_literal(j, "true");
    if (c == 'f') return moe__js_literal(j, "false");
    if (c == 'n') return moe__js_literal(j, "null");
    if (c != '{' && c != '[') return moe__js_number(j, &v, &iu, &u);
    if (!moe__js_open(j, (char)c)) return 0;
    while (moe__js_next(j, c == '{', &first, &s))
        if (!moe__js_skip(j)) return 0;
    if (j->why[0]) return 0;
    j->depth--;
    return 1;
}

static int moe__js_uint(moe__json *j, uint64_t *u) {
    double v;
    int iu;
    size_t at = j->pos;
    if (!moe__js_number(j, &v, &iu, u)) return 0;
    if (!iu) { j->pos = at; return moe__js_fail(j, "expected a non-negative integer"); }
    return 1;
}

/* ---- a growable text buffer for the JSON we write ---- */
typedef struct moe__text {
    char *p;
    size_t len, cap;
    int oom;
} moe__text;

static void moe__text_add(moe__text *t, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
static void moe__text_add(moe__text *t, const char *fmt, ...) {
    va_list ap;
    int n;
    if (t->oom) return;
    for (;;) {
        size_t room = t->cap - t->len;
        va_start(ap, fmt);
        n = vsnprintf(t->p ? t->p + t->len : NULL, t->p ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) { t->oom = 1; return; }
        if (t->p && (size_t)n < room) { t->len += (size_t)n; return; }
        {
            size_t cap = (t->cap ? 2 * t->cap : 1024) + (size_t)n + 1;
            char *np = (char *)MOE_MALLOC(cap);
            if (!np) { t->oom = 1; return; }
            if (t->p) memcpy(np, t->p, t->len);
            MOE_FREE(t->p);
            t->p = np;
            t->cap = cap;
        }
    }
}

/* a float32 as the shortest decimal that reads back to it (1e-05, not 9.99999975e-06), with a
   '.' whatever the C locale, and a '.0' on integers so that Python reads a float */
static void moe__text_float(moe__text *t, float v) {
    char b[40], *c;
    int prec;
    for (prec = 6; prec <= 9; prec++) {
        moe__json j;
        double back;
        int iu;
        uint64_t u;
        snprintf(b, sizeof b, "%.*g", prec, (double)v);
        for (c = b; *c; c++)
            if (*c == ',') *c = '.';
        memset(&j, 0, sizeof j);
        j.p = b;
        j.len = strlen(b);
        if (moe__js_number(&j, &back, &iu, &u) && j.pos == j.len && (float)back == v) break;
    }
    if (!strpbrk(b, ".eEn")) strcat(b, ".0");
    moe__text_add(t, "%s", b);
}

/* ---- safetensors files ------------------------------------------------------------------- */
#define MOE__ST_MAX_HEADER 100000000u
#define MOE__ST_MAX_DIMS 8
#define MOE__ST_CHUNK 65536

/* One file tensor as a strided view of a float buffer: element (i0, i1, i2, i3) of the file's
   row-major order is base[i0 st[0] + i1 st[1] + i2 st[2] + i3 st[3]], n[0] n[1] n[2] n[3] = its
   numel. This one description writes a store tensor as it is, a slice of it (q of wqkv,
   expert e of a bank), a transposed stack (the shared experts' down columns side by side) or
   a row permutation (llama.cpp's q and k, >>moe:gguf), and reads it back the same way. */
typedef struct moe__st_view {
    char name[96];
    int ndim;
    uint64_t shape[MOE_MAX_DIMS];
    float *base;
    size_t n[4], st[4];
} moe__st_view;

static const char *moe__st_dtype_name(moe_dtype t) {
    return t == MOE_DTYPE_F16 ? "F16" : t == MOE_DTYPE_BF16 ? "BF16" : "F32";
}

static size_t moe__st_dtype_size(moe_dtype t) { return t == MOE_DTYPE_F32 ? 4u : 2u; }

static void moe__st_encode(unsigned char *o, float x, moe_dtype t) {
    uint32_t u;
    if (t == MOE_DTYPE_F32) memcpy(&u, &x, 4);
    else u = t == MOE_DTYPE_F16 ? moe_f32_to_f16(x) : moe_f32_to_bf16(x);
    o[0] = (unsigned char)u; o[1] = (unsigned char)(u >> 8);
    if (t == MOE_DTYPE_F32) { o[2] = (unsigned char)(u >> 16); o[3] = (unsigned char)(u >> 24); }
}

static float moe__st_decode(const unsigned char *b, moe_dtype t) {
    uint32_t u;
    float x;
    if (t == MOE_DTYPE_F16) return moe_f16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
    if (t == MOE_DTYPE_BF16) return moe_bf16_to_f32((uint16_t)(b[0] | (b[1] << 8)));
    u = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
    memcpy(&x, &u, 4);
    return x;
}

static size_t moe__view_numel(const moe__st_view *v) { return v->n[0] * v->n[1] * v->n[2] * v->n[3]; }

/* idx (4 counters, zero at the start) -> the next element in file order */
static void moe__view_step(const moe__st_view *v, size_t idx[4]) {
    int d;
    for (d = 3; d > 0; d--) {
        if (++idx[d] < v->n[d]) return;
        idx[d] = 0;
    }
    idx[0]++;
}

static float *moe__view_at(const moe__st_view *v, const size_t idx[4]) {
    return v->base + idx[0] * v->st[0] + idx[1] * v->st[1] + idx[2] * v->st[2] + idx[3] * v->st[3];
}

/* views[k] as one file: header, then the data in view order, converted to dtype */
static moe_status moe__st_write(const char *path, const moe__st_view *views, int count, moe_dtype dtype, moe_err *err) {
    moe__text h;
    char tmp[4096];
    moe__ckpt_out f;
    unsigned char *chunk = NULL, len8[8];
    uint64_t off = 0, hlen;
    size_t es = moe__st_dtype_size(dtype), fill = 0;
    int k, d, ok = 1;
    moe_status st;
    memset(&h, 0, sizeof h);
    moe__text_add(&h, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (k = 0; k < count; k++) {
        uint64_t bytes = (uint64_t)moe__view_numel(&views[k]) * es;
        moe__text_add(&h, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[", views[k].name, moe__st_dtype_name(dtype));
        for (d = 0; d < views[k].ndim; d++) moe__text_add(&h, "%s%llu", d ? "," : "", (unsigned long long)views[k].shape[d]);
        moe__text_add(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + bytes));
        off += bytes;
    }
    moe__text_add(&h, "}");
    while (!h.oom && h.len % 8 != 0) moe__text_add(&h, " "); /* the data starts 8-aligned */
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (h.oom || !chunk) {
        MOE_FREE(h.p); MOE_FREE(chunk);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory writing '%s'", path);
    }
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(h.p); MOE_FREE(chunk); return st; }
    hlen = h.len;
    for (d = 0; d < 8; d++) len8[d] = (unsigned char)(hlen >> (8 * d));
    ok = moe__atomic_write(&f, len8, 8) && moe__atomic_write(&f, h.p, h.len);
    for (k = 0; k < count && ok; k++) {
        const moe__st_view *v = &views[k];
        size_t idx[4] = {0, 0, 0, 0}, e, numel = moe__view_numel(v);
        for (e = 0; e < numel; e++, moe__view_step(v, idx)) {
            moe__st_encode(chunk + fill, *moe__view_at(v, idx), dtype);
            fill += es;
            if (fill == MOE__ST_CHUNK) {
                ok = moe__atomic_write(&f, chunk, fill);
                fill = 0;
                if (!ok) break;
            }
        }
    }
    if (ok && fill) ok = moe__atomic_write(&f, chunk, fill);
    MOE_FREE(h.p);
    MOE_FREE(chunk);
    return moe__atomic_close(&f, ok, tmp, path, err);
}

typedef struct moe__st_entry {
    const char *name;        /* in the reader's header buffer                 */
    moe_dtype dtype;
    int ndim;
    uint64_t shape[MOE__ST_MAX_DIMS];
    uint64_t begin, end;     /* byte range in the data                        */
    int used;                /* a view has claimed it                         */
} moe__st_entry;

typedef struct moe__st_file {
    FILE *f;
    const char *path;
    char *header;            /* (header_len + 1) bytes, strings decoded in place */
    uint64_t header_len, data_start, file_size;
    moe__st_entry *e;        /* (count)                                         */
    int count, cap;
} moe__st_file;

static void moe__st_close(moe__st_file *sf) {
    if (sf->f) fclose(sf->f);
    MOE_FREE(sf->header);
    MOE_FREE(sf->e);
    memset(sf, 0, sizeof *sf);
}

static int moe__st_cmp_begin(const void *a, const void *b) {
    const moe__st_entry *x = *(const moe__st_entry *const *)a, *y = *(const moe__st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int moe__st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const moe__st_entry *const *)a)->name, (*(const moe__st_entry *const *)b)->name);
}

/* one tensor's description: {"dtype": .., "shape": [..], "data_offsets": [b, e]} */
static int moe__st_parse_entry(moe__json *j, moe__st_entry *t, char *why, size_t why_n) {
    int first = 1, have_dtype = 0, have_shape = 0, have_off = 0;
    char *key, *s;
    size_t n;
    if (!moe__js_open(j, '{')) return 0;
    while (moe__js_next(j, 1, &first, &key)) {
        if (strcmp(key, "dtype") == 0 && !have_dtype) {
            if (!moe__js_string(j, &s, &n)) return 0;
            have_dtype = 1;
            if (strcmp(s, "F32") == 0) t->dtype = MOE_DTYPE_F32;
            else if (strcmp(s, "F16") == 0) t->dtype = MOE_DTYPE_F16;
            else if (strcmp(s, "BF16") == 0) t->dtype = MOE_DTYPE_BF16;
            else {
                snprintf(why, why_n, "tensor '%.80s' has dtype '%.24s'; moe.h reads F32, F16 and BF16", t->name, s);
                return 0;
            }
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            int f2 = 1;
            have_shape = 1;
            if (!moe__js_open(j, '[')) return 0;
            while (moe__js_next(j, 0, &f2, NULL)) {
                uint64_t dim;
                if (t->ndim == MOE__ST_MAX_DIMS) {
                    snprintf(why, why_n, "tensor '%.80s' has more than %d dimensions", t->name, MOE__ST_MAX_DIMS);
                    return 0;
                }
                if (!moe__js_uint(j, &dim)) return 0;
                t->shape[t->ndim++] = dim;
            }
            j->depth--;
        } else if (strcmp(key, "data_offsets") == 0 && !have_off) {
            int f2 = 1, k = 0;
            uint64_t v[2];
            have_off = 1;
            if (!moe__js_open(j, '[')) return 0;
            while (moe__js_next(j, 0, &f2, NULL)) {
                if (k == 2 || !moe__js_uint(j, &v[k])) {
                    if (!j->why[0]) snprintf(why, why_n, "tensor '%.80s': data_offsets must be two integers", t->name);
                    return 0;
                }
                k++;
            }
            j->depth--;
            if (k != 2) {
                snprintf(why, why_n, "tensor '%.80s': data_offsets must be two integers", t->name);
                return 0;
            }
            t->begin = v[0];
            t->end = v[1];
        } else {
            snprintf(why, why_n, "tensor '%.80s' has an unknown or repeated field '%.40s'", t->name, key);
            return 0;
        }
    }
    if (j->why[0]) return 0;
    j->depth--;
    if (!have_dtype || !have_shape || !have_off) {
        snprintf(why, why_n, "tensor '%.80s' lacks its %s", t->name, !have_dtype ? "dtype" : !have_shape ? "shape" : "data_offsets");
        return 0;
    }
    return 1;
}

/* Opens and checks a file as the top of this section says; nothing of the data is read. */
static moe_status moe__st_open(moe__st_file *sf, const char *path, moe_err *err) {
    unsigned char len8[8];
    long size;
    moe__json j;
    moe__st_entry **order = NULL;
    char why[256], *key;
    int first = 1, i, have_meta = 0;
    uint64_t data_len, at;
    size_t es;
    memset(sf, 0, sizeof *sf);
    why[0] = '\0';
    sf->path = path;
    if (!path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors path is NULL");
    sf->f = fopen(path, "rb");
    if (!sf->f) return moe_err_set(err, MOE_ERR_IO, "cannot open '%s'", path);
    if (fseek(sf->f, 0, SEEK_END) != 0 || (size = ftell(sf->f)) < 0 || fseek(sf->f, 0, SEEK_SET) != 0) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path);
    }
    sf->file_size = (uint64_t)size;
    if (sf->file_size < 8 || fread(len8, 1, 8, sf->f) != 8) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes, too short for a safetensors file (truncated?)", path, size);
    }
    for (i = 7; i >= 0; i--) sf->header_len = (sf->header_len << 8) | len8[i];
    if (sf->header_len > sf->file_size - 8 || sf->header_len > MOE__ST_MAX_HEADER || sf->header_len < 2) {
        uint64_t hl = sf->header_len;
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' declares a %llu-byte header in a %ld-byte file (not safetensors, or truncated)", path,
                           (unsigned long long)hl, size);
    }
    sf->data_start = 8 + sf->header_len;
    data_len = sf->file_size - sf->data_start;
    sf->header = (char *)MOE_MALLOC((size_t)sf->header_len + 1);
    if (!sf->header) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the header of '%s'", path); }
    if (fread(sf->header, 1, (size_t)sf->header_len, sf->f) != (size_t)sf->header_len) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path);
    }
    sf->header[sf->header_len] = '\0';
    memset(&j, 0, sizeof j);
    j.p = sf->header;
    j.len = (size_t)sf->header_len;
    if (moe__js_open(&j, '{')) {
        while (!why[0] && moe__js_next(&j, 1, &first, &key)) {
            if (strcmp(key, "__metadata__") == 0) { /* text to text; read and not kept */
                int f2 = 1;
                char *s, *k2;
                size_t n;
                if (have_meta++) { snprintf(why, sizeof why, "two __metadata__ entries"); break; }
                if (!moe__js_open(&j, '{')) break;
                while (moe__js_next(&j, 1, &f2, &k2))
                    if (!moe__js_string(&j, &s, &n)) break;
                if (j.why[0]) break;
                j.depth--;
                continue;
            }
            if (sf->count == sf->cap) {
                int cap = sf->cap ? 2 * sf->cap : 64;
                moe__st_entry *ne = (moe__st_entry *)moe__calloc((size_t)cap, sizeof *ne);
                if (!ne) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the tensor table of '%s'", path); }
                if (sf->e) memcpy(ne, sf->e, (size_t)sf->count * sizeof *ne);
                MOE_FREE(sf->e);
                sf->e = ne;
                sf->cap = cap;
            }
            memset(&sf->e[sf->count], 0, sizeof sf->e[0]);
            sf->e[sf->count].name = key;
            if (!moe__st_parse_entry(&j, &sf->e[sf->count], why, sizeof why)) break;
            sf->count++;
        }
        if (!why[0] && !j.why[0] && moe__js_ws(&j) != -1) moe__js_fail(&j, "text after the header object");
    }
    if (!why[0] && j.why[0]) snprintf(why, sizeof why, "its header is not valid JSON (%s)", j.why);
    /* each tensor: its shape's bytes equal its range; the ranges, sorted, tile the data */
    for (i = 0; i < sf->count && !why[0]; i++) {
        moe__st_entry *t = &sf->e[i];
        uint64_t numel = 1;
        int d;
        es = moe__st_dtype_size(t->dtype);
        for (d = 0; d < t->ndim; d++) {
            if (t->shape[d] != 0 && numel > data_len / t->shape[d]) { numel = UINT64_MAX; break; }
            numel *= t->shape[d];
        }
        if (t->begin > t->end || t->end > data_len)
            snprintf(why, sizeof why, "tensor '%.80s' has data_offsets [%llu, %llu] outside the %llu bytes of data", t->name,
                     (unsigned long long)t->begin, (unsigned long long)t->end, (unsigned long long)data_len);
        else if (numel == UINT64_MAX || numel * es != t->end - t->begin)
            snprintf(why, sizeof why, "tensor '%.80s': its shape needs %s bytes but data_offsets give %llu", t->name,
                     numel == UINT64_MAX ? "more than the file's" : "another number of", (unsigned long long)(t->end - t->begin));
    }
    if (!why[0] && sf->count > 0) {
        order = (moe__st_entry **)moe__calloc((size_t)sf->count, sizeof *order);
        if (!order) { moe__st_close(sf); return moe_err_set(err, MOE_ERR_NOMEM, "no memory for the tensor table of '%s'", path); }
        for (i = 0; i < sf->count; i++) order[i] = &sf->e[i];
        qsort(order, (size_t)sf->count, sizeof *order, moe__st_cmp_name);
        for (i = 1; i < sf->count && !why[0]; i++)
            if (strcmp(order[i - 1]->name, order[i]->name) == 0) snprintf(why, sizeof why, "tensor '%.80s' is listed twice", order[i]->name);
        qsort(order, (size_t)sf->count, sizeof *order, moe__st_cmp_begin);
        for (i = 0, at = 0; i < sf->count && !why[0]; i++) {
            if (order[i]->begin != at)
                snprintf(why, sizeof why, "tensor '%.80s' starts at byte %llu of the data, expected %llu (%s)", order[i]->name,
                         (unsigned long long)order[i]->begin, (unsigned long long)at, order[i]->begin < at ? "overlapping tensors" : "a hole in the data");
            at = order[i]->end;
        }
        if (!why[0] && at != data_len)
            snprintf(why, sizeof why, "the tensors cover %llu of the %llu bytes of data (truncated, or bytes after the last tensor)",
                     (unsigned long long)at, (unsigned long long)data_len);
        MOE_FREE(order);
    } else if (!why[0] && data_len != 0) {
        snprintf(why, sizeof why, "it lists no tensor but holds %llu bytes of data", (unsigned long long)data_len);
    }
    if (why[0]) {
        moe__st_close(sf);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s': %s", path, why);
    }
    return MOE_OK;
}

static int moe__st_find(const moe__st_file *sf, const char *name) {
    int i;
    for (i = 0; i < sf->count; i++)
        if (strcmp(sf->e[i].name, name) == 0) return i;
    return -1;
}

/* Entry i's values into the view (shapes already compared), in 64 KiB chunks. */
static moe_status moe__st_read(moe__st_file *sf, int i, const moe__st_view *v, unsigned char *chunk, moe_err *err) {
    const moe__st_entry *t = &sf->e[i];
    size_t es = moe__st_dtype_size(t->dtype), left = (size_t)(t->end - t->begin), have = 0, pos = 0;
    size_t idx[4] = {0, 0, 0, 0};
    if (fseek(sf->f, (long)(sf->data_start + t->begin), SEEK_SET) != 0)
        return moe_err_set(err, MOE_ERR_IO, "cannot seek in '%s'", sf->path);
    while (left > 0 || pos < have) {
        if (pos == have) {
            size_t want = left < MOE__ST_CHUNK ? left : MOE__ST_CHUNK;
            if (fread(chunk, 1, want, sf->f) != want)
                return moe_err_set(err, MOE_ERR_IO, "'%s' ended inside tensor '%s' (changed while reading?)", sf->path, t->name);
            left -= want;
            have = want;
            pos = 0;
        }
        *moe__view_at(v, idx) = moe__st_decode(chunk + pos, t->dtype);
        pos += es;
        moe__view_step(v, idx);
    }
    return MOE_OK;
}

/* The file's entry for a view, checked for shape; -1 (err set) when absent or different. */
static int moe__st_match(moe__st_file *sf, const moe__st_view *v, moe_err *err) {
    int i = moe__st_find(sf, v->name), d, same;
    char a[96], b[96];
    size_t la = 0, lb = 0;
    if (i < 0) {
        moe_err_set(err, MOE_ERR_FORMAT, "'%s' lacks tensor '%s'", sf->path, v->name);
        return -1;
    }
    same = sf->e[i].ndim == v->ndim;
    for (d = 0; same && d < v->ndim; d++) same = sf->e[i].shape[d] == v->shape[d];
    if (!same) {
        a[0] = b[0] = '\0';
        for (d = 0; d < v->ndim && la < 60; d++) la += (size_t)snprintf(a + la, sizeof a - la, "%s%llu", d ? ", " : "", (unsigned long long)v->shape[d]);
        for (d = 0; d < sf->e[i].ndim && lb < 60; d++) lb += (size_t)snprintf(b + lb, sizeof b - lb, "%s%llu", d ? ", " : "", (unsigned long long)sf->e[i].shape[d]);
        moe_err_set(err, MOE_ERR_SHAPE, "'%s': tensor '%s' has shape (%s), expected (%s)", sf->path, v->name, b, a);
        return -1;
    }
    return i;
}

/* Reads every view from the file, every entry of the file claimed by one view (an entry no
   view claims is refused unless allow_extra names it). */
static moe_status moe__st_read_views(moe__st_file *sf, const moe__st_view *views, int count, moe_err *err) {
    unsigned char *chunk;
    int k, i;
    moe_status st = MOE_OK;
    for (k = 0; k < count; k++) {
        i = moe__st_match(sf, &views[k], err);
        if (i < 0) return err ? err->status : MOE_ERR_FORMAT;
        sf->e[i].used = 1;
    }
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (!chunk) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory reading '%s'", sf->path);
    for (k = 0; k < count && st == MOE_OK; k++) st = moe__st_read(sf, moe__st_find(sf, views[k].name), &views[k], chunk, err);
    MOE_FREE(chunk);
    return st;
}

static moe__st_view moe__view_plain(const char *name, float *base, const moe_tensor *t) {
    moe__st_view v;
    int d;
    memset(&v, 0, sizeof v);
    snprintf(v.name, sizeof v.name, "%s", name);
    v.ndim = t->ndim;
    for (d = 0; d < t->ndim; d++) v.shape[d] = (uint64_t)t->shape[d];
    v.base = base;
    v.n[0] = v.n[1] = v.n[2] = 1;
    v.n[3] = t->numel;
    v.st[3] = 1;
    return v;
}

MOE__IMPL moe_status moe_safetensors_save(const char *path, const moe_store *s, moe_dtype dtype, moe_err *err) {
    moe__st_view *views;
    int k;
    moe_status st;
    if (!path || !s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors save needs a path and an allocated store");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    views = (moe__st_view *)moe__calloc((size_t)s->count, sizeof *views);
    if (!views) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    for (k = 0; k < s->count; k++) views[k] = moe__view_plain(s->tensors[k].name, s->params + s->tensors[k].offset, &s->tensors[k]);
    st = moe__st_write(path, views, s->count, dtype, err);
    MOE_FREE(views);
    return st;
}

MOE__IMPL moe_status moe_safetensors_load(const char *path, moe_store *s, moe_err *err) {
    moe__st_file sf;
    moe__st_view *views;
    float *copy;
    int k;
    moe_status st;
    if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "safetensors load needs an allocated store");
    st = moe__st_open(&sf, path, err);
    if (st != MOE_OK) return st;
    views = (moe__st_view *)moe__calloc((size_t)s->count, sizeof *views);
    copy = (float *)moe__calloc(s->numel, sizeof(float)); /* the store stays as it is until all is read */
    if (!views || !copy) {
        MOE_FREE(views); MOE_FREE(copy); moe__st_close(&sf);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    }
    for (k = 0; k < s->count; k++) views[k] = moe__view_plain(s->tensors[k].name, copy + s->tensors[k].offset, &s->tensors[k]);
    st = moe__st_read_views(&sf, views, s->count, err);
    for (k = 0; k < sf.count && st == MOE_OK; k++)
        if (!sf.e[k].used) st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds tensor '%s', which the store does not have", path, sf.e[k].name);
    if (st == MOE_OK) memcpy(s->params, copy, s->numel * sizeof(float));
    MOE_FREE(views); MOE_FREE(copy);
    moe__st_close(&sf);
    return st;
}

/* ---- the model under Hugging Face names ---------------------------------------------------- */

MOE__IMPL moe_status moe_model_hf_check(const moe_model_config *c, moe_err *err) {
    const moe_status no = MOE_ERR_UNSUPPORTED;
    int any_moe;
    if (moe_model_config_validate(c, err) != MOE_OK) return err ? err->status : MOE_ERR_INVALID_ARG;
    if (c->pos != MOE_POS_ROPE) return moe_err_set(err, no, "learned positions (wpe) have no place in Llama/Mixtral: use pos = MOE_POS_ROPE");
    if (!(c->rope_theta <= FLT_MAX) || !(c->norm_eps <= FLT_MAX)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "rope_theta and norm_eps must be finite");
    any_moe = c->moe_every > 0 && c->dense_first < c->n_layers;
    if (!any_moe) return MOE_OK;
    if (c->moe.router != MOE_ROUTER_TOPK) return moe_err_set(err, no, "only the softmax top-k router maps onto Mixtral's gate (router kind %d)", (int)c->moe.router);
    if (c->moe.expert != MOE_EXPERT_SWIGLU) return moe_err_set(err, no, "only SwiGLU experts map onto Mixtral's w1/w2/w3");
    if (c->moe.router_bias) return moe_err_set(err, no, "Mixtral's gate has no bias (router_bias = 1 does not map)");
    if (c->moe.capacity_factor > 0.0f) return moe_err_set(err, no, "a capacity limit (capacity_factor %g) drops tokens that Hugging Face models keep", (double)c->moe.capacity_factor);
    if (c->router_input != MOE_RIN_DIRECT) return moe_err_set(err, no, "routers reading a GRU state or an MLP (router_input %d) do not map", (int)c->router_input);
    if (c->moe.hyper) return moe_err_set(err, no, "HyperMoE's hyper-expert does not map");
    return MOE_OK;
}

static int moe__hf_is_mixtral(const moe_model_config *c) {
    return c->moe_every == 1 && c->dense_first == 0 && c->moe.n_shared == 0 && c->moe.renormalize;
}

static int moe__hf_any_moe(const moe_model_config *c) { return c->moe_every > 0 && c->dense_first < c->n_layers; }

/* adds a view of store tensor `store_name`: elements [first, first + n0 n1 n2) by the strides */
static int moe__hf_view(const moe_model *m, moe__st_view *v, int *count, const char *hf_name, const char *store_name,
                        size_t first, int ndim, uint64_t s0, uint64_t s1, size_t n0, size_t n1, size_t n2,
                        size_t st0, size_t st1, size_t st2, size_t *covered, moe_err *err) {
    int id = moe_store_find(&m->S, store_name);
    moe__st_view *w;
    if (id < 0) {
        moe_err_set(err, MOE_ERR_STATE, "the model has no tensor '%s' (its layout is not one this exporter knows)", store_name);
        return 0;
    }
    if (n0 * n1 * n2 == 0 || first + (n0 - 1) * st0 + (n1 - 1) * st1 + (n2 - 1) * st2 >= m->S.tensors[id].numel) {
        moe_err_set(err, MOE_ERR_STATE, "tensor '%s' is smaller than its Hugging Face pieces", store_name);
        return 0;
    }
    w = &v[(*count)++];
    memset(w, 0, sizeof *w);
    snprintf(w->name, sizeof w->name, "%s", hf_name);
    w->ndim = ndim;
    w->shape[0] = s0;
    w->shape[1] = s1;
    w->base = m->S.params + m->S.tensors[id].offset + first;
    w->n[0] = 1; w->n[1] = n0; w->n[2] = n1; w->n[3] = n2;
    w->st[1] = st0; w->st[2] = st1; w->st[3] = st2;
    covered[id] += n0 * n1 * n2;
    return 1;
}

/* THE name map: every HF tensor of m as a view of its store; every store tensor covered once */
static moe_status moe__hf_views(const moe_model *m, moe__st_view **out, int *count, moe_err *err) {
    const moe_model_config *c = &m->cfg;
    int d = c->d, l, e, n = 0, cap, ok = 1, id;
    char hf[96], sn[MOE_NAME_LEN];
    size_t *covered;
    moe__st_view *v;
    *out = NULL;
    *count = 0;
    if (moe_model_hf_check(c, err) != MOE_OK) return err ? err->status : MOE_ERR_UNSUPPORTED;
    cap = 3 + c->n_layers * (9 + 3 * (c->moe.n_experts + 2));
    v = (moe__st_view *)moe__calloc((size_t)cap, sizeof *v);
    covered = (size_t *)moe__calloc((size_t)m->S.count, sizeof *covered);
    if (!v || !covered) {
        MOE_FREE(v); MOE_FREE(covered);
        return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    }
#define MOE__HF_PLAIN(hfname, store, s0, s1, nd)                                                                      \
    ok = ok && moe__hf_view(m, v, &n, hfname, store, 0, nd, (uint64_t)(s0), (uint64_t)(s1), 1, 1, (size_t)(s0) * (size_t)((nd) > 1 ? (s1) : 1), 0, 0, 1, covered, err)
    MOE__HF_PLAIN("model.embed_tokens.weight", "wte", c->vocab, d, 2);
    for (l = 0; l < c->n_layers && ok; l++) {
        const moe_block *b = &m->blocks[l];
        const char *proj[3] = {"q_proj", "k_proj", "v_proj"};
        int p;
        sprintf(hf, "model.layers.%d.input_layernorm.weight", l);
        sprintf(sn, "l%d.ln1.w", l);
        MOE__HF_PLAIN(hf, sn, d, 0, 1);
        sprintf(sn, "l%d.attn.wqkv", l);
        for (p = 0; p < 3; p++) {
            sprintf(hf, "model.layers.%d.self_attn.%s.weight", l, proj[p]);
            ok = ok && moe__hf_view(m, v, &n, hf, sn, (size_t)p * d * d, 2, (uint64_t)d, (uint64_t)d, 1, 1, (size_t)d * d, 0, 0, 1, covered, err);
        }
        sprintf(hf, "model.layers.%d.self_attn.o_proj.weight", l);
        sprintf(sn, "l%d.attn.wo", l);
        MOE__HF_PLAIN(hf, sn, d, d, 2);
        sprintf(hf, "model.layers.%d.post_attention_layernorm.weight", l);
        sprintf(sn, "l%d.ln2.w", l);
        MOE__HF_PLAIN(hf, sn, d, 0, 1);
        if (!b->is_moe) {
            int F = c->d_ff;
            sprintf(hf, "model.layers.%d.mlp.gate_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_gate", l);
            MOE__HF_PLAIN(hf, sn, F, d, 2);
            sprintf(hf, "model.layers.%d.mlp.up_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_up", l);
            MOE__HF_PLAIN(hf, sn, F, d, 2);
            sprintf(hf, "model.layers.%d.mlp.down_proj.weight", l);
            sprintf(sn, "l%d.ffn.w_down", l);
            MOE__HF_PLAIN(hf, sn, d, F, 2);
        } else {
            int E = c->moe.n_experts, D = c->moe.d_ff;
            const char *w_hf[3] = {"w1", "w3", "w2"}, *w_st[3] = {"w_gate", "w_up", "w_down"};
            sprintf(hf, "model.layers.%d.block_sparse_moe.gate.weight", l);
            sprintf(sn, "l%d.moe.router.w", l);
            MOE__HF_PLAIN(hf, sn, E, d, 2);
            for (e = 0; e < E && ok; e++)
                for (p = 0; p < 3; p++) {
                    int rows = p == 2 ? d : D, cols = p == 2 ? D : d;
                    sprintf(hf, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, w_hf[p]);
                    sprintf(sn, "l%d.moe.experts.%s", l, w_st[p]);
                    ok = ok && moe__hf_view(m, v, &n, hf, sn, (size_t)e * D * d, 2, (uint64_t)rows, (uint64_t)cols, 1, 1, (size_t)D * d, 0, 0, 1, covered, err);
                }
            if (ok && c->moe.n_shared > 0) {
                int S = c->moe.n_shared;
                size_t Ds;
                sprintf(sn, "l%d.moe.shared.w_gate", l);
                id = moe_store_find(&m->S, sn);
                Ds = id >= 0 ? (size_t)m->S.tensors[id].shape[1] : 1;
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.gate_proj.weight", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)(S * Ds), (uint64_t)d, 1, 1, S * Ds * d, 0, 0, 1, covered, err);
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.up_proj.weight", l);
                sprintf(sn, "l%d.moe.shared.w_up", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)(S * Ds), (uint64_t)d, 1, 1, S * Ds * d, 0, 0, 1, covered, err);
                /* down (S, d, Ds) -> (d, S Ds): row i is expert 0's row i, then expert 1's, ... */
                sprintf(hf, "model.layers.%d.block_sparse_moe.shared_expert.down_proj.weight", l);
                sprintf(sn, "l%d.moe.shared.w_down", l);
                ok = ok && moe__hf_view(m, v, &n, hf, sn, 0, 2, (uint64_t)d, (uint64_t)(S * Ds), (size_t)d, (size_t)S, Ds, Ds, (size_t)d * Ds, 1, covered, err);
            }
        }
    }
    MOE__HF_PLAIN("model.norm.weight", "lnf.w", d, 0, 1);
#undef MOE__HF_PLAIN
    for (id = 0; id < m->S.count && ok; id++)
        if (covered[id] != m->S.tensors[id].numel) {
            ok = 0;
            moe_err_set(err, MOE_ERR_UNSUPPORTED, "tensor '%s' has no Hugging Face name (%s)", m->S.tensors[id].name,
                        covered[id] ? "only partly covered" : "its configuration does not map onto Llama/Mixtral");
        }
    MOE_FREE(covered);
    if (!ok) { MOE_FREE(v); return err ? err->status : MOE_ERR_STATE; }
    *out = v;
    *count = n;
    return MOE_OK;
}

/* dir + "/" + file into out (cap bytes); 0 when too long */
static int moe__path_join(char *out, size_t cap, const char *dir, const char *file) {
    size_t n = strlen(dir);
    int sep = n > 0 && dir[n - 1] != '/' && dir[n - 1] != '\\';
    if (n + (size_t)sep + strlen(file) + 1 > cap) return 0;
    sprintf(out, "%s%s%s", dir, sep ? "/" : "", file);
    return 1;
}

static moe_status moe__hf_config_text(const moe_model_config *c, moe_dtype dtype, moe__text *t) {
    int mixtral = moe__hf_is_mixtral(c), any_moe = moe__hf_any_moe(c), l, first = 1;
    const char *arch = !any_moe ? "LlamaForCausalLM" : mixtral ? "MixtralForCausalLM" : "MoeHForCausalLM";
    const char *type = !any_moe ? "llama" : mixtral ? "mixtral" : "moe_h";
    moe__text_add(t, "{\n  \"architectures\": [\"%s\"],\n  \"model_type\": \"%s\",\n", arch, type);
    moe__text_add(t, "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n", c->vocab, c->d);
    moe__text_add(t, "  \"intermediate_size\": %d,\n", any_moe && mixtral ? c->moe.d_ff : c->d_ff);
    moe__text_add(t, "  \"num_hidden_layers\": %d,\n  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n", c->n_layers,
                  c->n_heads, c->n_heads);
    moe__text_add(t, "  \"head_dim\": %d,\n  \"hidden_act\": \"silu\",\n  \"max_position_embeddings\": %d,\n", c->d / c->n_heads, c->max_seq);
    moe__text_add(t, "  \"rms_norm_eps\": ");
    moe__text_float(t, c->norm_eps);
    moe__text_add(t, ",\n  \"rope_theta\": ");
    moe__text_float(t, c->rope_theta);
    moe__text_add(t, ",\n  \"rope_scaling\": null,\n  \"attention_bias\": false,\n  \"mlp_bias\": false,\n");
    moe__text_add(t, "  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"%s\"", dtype == MOE_DTYPE_F16 ? "float16" : dtype == MOE_DTYPE_BF16 ? "bfloat16" : "float32");
    if (any_moe) {
        moe__text_add(t, ",\n  \"num_local_experts\": %d,\n  \"num_experts_per_tok\": %d", c->moe.n_experts, c->moe.top_k);
        if (!mixtral) {
            moe__text_add(t, ",\n  \"moe_intermediate_size\": %d,\n  \"norm_topk_prob\": %s", c->moe.d_ff, c->moe.renormalize ? "true" : "false");
            moe__text_add(t, ",\n  \"decoder_sparse_step\": 1,\n  \"mlp_only_layers\": [");
            for (l = 0; l < c->n_layers; l++)
                if (!moe__block_is_moe(c, l)) { moe__text_add(t, "%s%d", first ? "" : ", ", l); first = 0; }
            moe__text_add(t, "],\n  \"n_shared_experts\": %d,\n  \"shared_expert_intermediate_size\": %d", c->moe.n_shared,
                          c->moe.n_shared * (c->moe.d_ff_shared > 0 ? c->moe.d_ff_shared : c->moe.d_ff));
        }
    }
    moe__text_add(t, "\n}\n");
    return t->oom ? MOE_ERR_NOMEM : MOE_OK;
}

MOE__IMPL moe_status moe_model_export_hf(const moe_model *m, const char *dir, moe_dtype dtype, moe_err *err) {
    char path[4096], tmp[4200];
    moe__st_view *views;
    moe__text t;
    moe__ckpt_out f;
    int count, ok;
    moe_status st;
    if (!m || !m->S.params || !dir) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HF export needs an initialised model and a directory");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    st = moe__hf_views(m, &views, &count, err);
    if (st != MOE_OK) return st;
    if (!moe__path_join(path, sizeof path, dir, "model.safetensors")) { MOE_FREE(views); return moe_err_set(err, MOE_ERR_INVALID_ARG, "directory name too long"); }
    st = moe__st_write(path, views, count, dtype, err);
    MOE_FREE(views);
    if (st != MOE_OK) return st;
    memset(&t, 0, sizeof t);
    if (moe__hf_config_text(&m->cfg, dtype, &t) != MOE_OK) { MOE_FREE(t.p); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    moe__path_join(path, sizeof path, dir, "config.json");
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(t.p); return st; }
    ok = moe__atomic_write(&f, t.p, t.len);
    MOE_FREE(t.p);
    return moe__atomic_close(&f, ok, tmp, path, err);
}

/* config.json -> c. Keys it does not know are ignored (transformers writes many); the ones
   that change the computation and have no moe.h meaning are refused. */
static moe_status moe__hf_config_read(const char *path, moe_model_config *c, moe_err *err) {
    FILE *f;
    long size;
    moe__json j;
    char *key, *s, why[200], type[16] = "";
    int first = 1, heads = 0, kv_heads = -1, head_dim = -1, dense_ff = -1, moe_ff = -1, n_exp = 0, n_shared = 0, shared_ff = 0, tie = 1;
    int have_layers_list = 0, sparse_step = 1, norm_topk = -1, l, n_mlp_only = 0, ok;
    int mlp_only[1024];
    size_t n;
    double v;
    uint64_t u;
    int iu;
    why[0] = '\0';
    f = fopen(path, "rb");
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open '%s'", path);
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path); }
    if (size > (1L << 20)) { fclose(f); return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes: too large for a config.json", path, size); }
    memset(&j, 0, sizeof j);
    j.p = (char *)MOE_MALLOC((size_t)size + 1);
    if (!j.p) { fclose(f); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    ok = fread(j.p, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    if (!ok) { MOE_FREE(j.p); return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path); }
    j.len = (size_t)size;
    *c = moe_model_config_default();
    c->pos = MOE_POS_ROPE;
    c->moe_every = 0;
    c->moe.renormalize = 1;
    if (moe__js_open(&j, '{')) {
        while (!why[0] && moe__js_next(&j, 1, &first, &key)) {
            int ch = moe__js_ws(&j);
            /* integers */
            int *ip = strcmp(key, "vocab_size") == 0 ? &c->vocab : strcmp(key, "hidden_size") == 0 ? &c->d
                    : strcmp(key, "num_hidden_layers") == 0 ? &c->n_layers : strcmp(key, "num_attention_heads") == 0 ? &heads
                    : strcmp(key, "num_key_value_heads") == 0 ? &kv_heads : strcmp(key, "head_dim") == 0 ? &head_dim
                    : strcmp(key, "intermediate_size") == 0 ? &dense_ff : strcmp(key, "moe_intermediate_size") == 0 ? &moe_ff
                    : strcmp(key, "max_position_embeddings") == 0 ? &c->max_seq : strcmp(key, "num_local_experts") == 0 ? &n_exp
                    : strcmp(key, "num_experts_per_tok") == 0 ? &c->moe.top_k : strcmp(key, "n_shared_experts") == 0 ? &n_shared
                    : strcmp(key, "shared_expert_intermediate_size") == 0 ? &shared_ff
                    : strcmp(key, "decoder_sparse_step") == 0 ? &sparse_step : NULL;
            if (ip) {
                if (ch == 'n') { /* null: as if absent */
                    if (!moe__js_literal(&j, "null")) break;
                    continue;
                }
                if (!moe__js_uint(&j, &u)) break;
                if (u > 1u << 30) { snprintf(why, sizeof why, "\"%s\" is %llu, too large", key, (unsigned long long)u); break; }
                *ip = (int)u;
            } else if (strcmp(key, "rms_norm_eps") == 0 || strcmp(key, "rope_theta") == 0) {
                if (!moe__js_number(&j, &v, &iu, &u)) break;
                if (key[1] == 'm') c->norm_eps = (float)v;
                else c->rope_theta = (float)v;
            } else if (strcmp(key, "model_type") == 0 || strcmp(key, "hidden_act") == 0) {
                if (!moe__js_string(&j, &s, &n)) break;
                if (key[0] == 'm') snprintf(type, sizeof type, "%s", s);
                else if (strcmp(s, "silu") != 0) snprintf(why, sizeof why, "hidden_act \"%.32s\": moe.h's SwiGLU uses silu", s);
            } else if (strcmp(key, "tie_word_embeddings") == 0 || strcmp(key, "attention_bias") == 0 || strcmp(key, "mlp_bias") == 0 ||
                       strcmp(key, "norm_topk_prob") == 0) {
                int t = ch == 't';
                if (!moe__js_literal(&j, t ? "true" : "false")) break;
                if (key[0] == 't') tie = t;
                else if (key[0] == 'n') norm_topk = t;
                else if (t) snprintf(why, sizeof why, "\"%s\": true (biases) does not map onto moe.h's model", key);
            } else if (strcmp(key, "rope_scaling") == 0) {
                if (ch != 'n') { snprintf(why, sizeof why, "rope_scaling is set: moe.h implements plain RoPE only"); break; }
                if (!moe__js_literal(&j, "null")) break;
            } else if (strcmp(key, "mlp_only_layers") == 0) {
                int f2 = 1;
                have_layers_list = 1;
                if (!moe__js_open(&j, '[')) break;
                while (moe__js_next(&j, 0, &f2, NULL)) {
                    if (!moe__js_uint(&j, &u)) break;
                    if (n_mlp_only == 1024 || u >= 1024) { snprintf(why, sizeof why, "mlp_only_layers is too long"); break; }
                    mlp_only[n_mlp_only++] = (int)u;
                }
                if (j.why[0] || why[0]) break;
                j.depth--;
            } else if (strcmp(key, "sliding_window") == 0 && ch != 'n') {
                snprintf(why, sizeof why, "sliding_window attention is set: moe.h attends to the whole context");
            } else if (!moe__js_skip(&j)) {
                break;
            }
        }
        if (!why[0] && !j.why[0] && moe__js_ws(&j) != -1) moe__js_fail(&j, "text after the object");
    }
    if (!why[0] && j.why[0]) snprintf(why, sizeof why, "not valid JSON (%s)", j.why);
    MOE_FREE(j.p);
    if (!why[0]) {
        int mixtral = strcmp(type, "mixtral") == 0, moe_h = strcmp(type, "moe_h") == 0;
        if (!mixtral && !moe_h && strcmp(type, "llama") != 0)
            snprintf(why, sizeof why, "model_type \"%s\": moe.h imports llama, mixtral and moe_h", type);
        else if (heads <= 0 || c->d <= 0 || c->d % heads != 0 || (head_dim >= 0 && head_dim * heads != c->d))
            snprintf(why, sizeof why, "hidden_size %d, %d heads and head_dim %d do not fit moe.h's attention (d = heads x head_dim)", c->d, heads, head_dim);
        else if (kv_heads >= 0 && kv_heads != heads)
            snprintf(why, sizeof why, "grouped-query attention (%d key/value heads for %d heads) does not map", kv_heads, heads);
        else if (!tie)
            snprintf(why, sizeof why, "an untied head (tie_word_embeddings false) does not map: moe.h's head is the embedding");
        else if (sparse_step != 1)
            snprintf(why, sizeof why, "decoder_sparse_step %d does not map (moe.h: the first layers dense, then every n-th MoE)", sparse_step);
        else if (dense_ff <= 0 && !mixtral)
            snprintf(why, sizeof why, "intermediate_size is missing");
        else {
            c->n_heads = heads;
            c->d_ff = dense_ff > 0 ? dense_ff : moe_ff;
            if (mixtral || moe_h) {
                c->moe.n_experts = n_exp;
                c->moe.d_ff = mixtral ? (moe_ff > 0 ? moe_ff : dense_ff) : moe_ff;
                c->moe.renormalize = mixtral ? 1 : norm_topk != 0;
                c->moe.n_shared = n_shared;
                if (n_shared > 0 && shared_ff % n_shared != 0)
                    snprintf(why, sizeof why, "shared_expert_intermediate_size %d is not a multiple of n_shared_experts %d", shared_ff, n_shared);
                c->moe.d_ff_shared = n_shared > 0 ? shared_ff / n_shared : 0;
                if (shared_ff > 0 && n_shared <= 0)
                    snprintf(why, sizeof why, "a shared expert without n_shared_experts: its split into experts is unknown");
                /* mlp_only_layers -> the first dense_first layers dense, then every moe_every-th MoE */
                c->dense_first = 0;
                c->moe_every = 1;
                if (have_layers_list && n_mlp_only > 0) {
                    int is_dense[1024], first_moe = -1, second = -1;
                    memset(is_dense, 0, sizeof is_dense);
                    for (l = 0; l < n_mlp_only; l++)
                        if (mlp_only[l] < c->n_layers) is_dense[mlp_only[l]] = 1;
                    for (l = 0; l < c->n_layers && l < 1024; l++)
                        if (!is_dense[l]) { if (first_moe < 0) first_moe = l; else if (second < 0) second = l; }
                    if (first_moe < 0) c->moe_every = 0;
                    else {
                        c->dense_first = first_moe;
                        c->moe_every = second > 0 ? second - first_moe : c->n_layers;
                        for (l = 0; l < c->n_layers && l < 1024 && !why[0]; l++)
                            if (moe__block_is_moe(c, l) == is_dense[l])
                                snprintf(why, sizeof why, "mlp_only_layers is not a pattern moe.h builds (the first layers dense, then every n-th layer MoE)");
                    }
                }
            }
        }
    }
    if (why[0]) return moe_err_set(err, MOE_ERR_FORMAT, "'%s': %s", path, why);
    return MOE_OK;
}

MOE__IMPL moe_status moe_model_import_hf(moe_model *m, const char *dir, int max_B, int max_T, moe_err *err) {
    char path[4096];
    moe_model_config c;
    moe__st_file sf;
    moe__st_view *views = NULL;
    moe_model probe;
    int count = 0, k, lm;
    moe_status st;
    moe_err local, why;
    if (!err) err = &local;
    if (!m || !dir) return moe_err_set(err, MOE_ERR_INVALID_ARG, "HF import needs a model to fill and a directory");
    memset(m, 0, sizeof *m);
    if (!moe__path_join(path, sizeof path, dir, "config.json")) st = moe_err_set(err, MOE_ERR_INVALID_ARG, "directory name too long");
    else st = moe__hf_config_read(path, &c, err);
    if (st == MOE_OK) st = moe_model_hf_check(&c, err);
    if (st == MOE_OK) {
        moe__path_join(path, sizeof path, dir, "model.safetensors");
        st = moe__st_open(&sf, path, err);
    }
    if (st != MOE_OK) {
        m->err = *err;
        return st;
    }
    /* the config may not promise more parameters than the file holds (2 bytes each at least),
       so a lying config.json cannot make us reserve memory */
    if (moe_model_declare(&probe, &c, (size_t)((sf.file_size - sf.data_start) / 2) + 1) != MOE_OK)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s/config.json' does not fit '%s': %s", dir, path, probe.err.msg);
    moe_model_free(&probe);
    if (st == MOE_OK && moe_model_init(m, &c, max_B > 0 ? max_B : 1, max_T > 0 ? max_T : c.max_seq) != MOE_OK)
        st = moe_err_set(err, m->err.status, "%s", m->err.msg);
    if (st == MOE_OK) st = moe__hf_views(m, &views, &count, err);
    if (st == MOE_OK) st = moe__st_read_views(&sf, views, count, err);
    /* a tied head written out (some writers do): accepted when it is the embedding */
    lm = moe__st_find(&sf, "lm_head.weight");
    if (st == MOE_OK && lm >= 0) {
        moe__st_view hv = views[0];
        float *tmp = (float *)moe__calloc((size_t)c.vocab * c.d, sizeof(float));
        unsigned char *chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
        snprintf(hv.name, sizeof hv.name, "lm_head.weight");
        hv.base = tmp;
        if (!tmp || !chunk) st = moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
        else if (moe__st_match(&sf, &hv, err) < 0) st = err->status;
        else st = moe__st_read(&sf, lm, &hv, chunk, err);
        if (st == MOE_OK && memcmp(tmp, moe_store_param(&m->S, m->id_wte), sizeof(float) * (size_t)c.vocab * c.d) != 0)
            st = moe_err_set(err, MOE_ERR_UNSUPPORTED, "'%s': lm_head.weight differs from model.embed_tokens.weight; moe.h's head is tied to the embedding", path);
        sf.e[lm].used = 1;
        MOE_FREE(tmp); MOE_FREE(chunk);
    }
    for (k = 0; k < sf.count && st == MOE_OK; k++)
        if (!sf.e[k].used) st = moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds tensor '%s', which this model has no place for", path, sf.e[k].name);
    if (st == MOE_OK && moe__check_finite(&m->S, 0, "", &why) != MOE_OK)
        st = moe_err_set(err, MOE_ERR_FORMAT, "'%s'%s", path, why.msg);
    MOE_FREE(views);
    moe__st_close(&sf);
    if (st != MOE_OK) {
        moe_model_free(m);
        m->err = *err;
    }
    return st;
}
#endif /* MOE_NO_STDIO */
