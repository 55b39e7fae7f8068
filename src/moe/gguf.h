/* ============================================================================================
   >>moe:gguf  GGUF files that llama.cpp runs
   ============================================================================================
   GGUF version 3 (ggml's docs/gguf.md), little-endian:
       "GGUF", u32 version (3), u64 tensor count, u64 metadata count,
       metadata: per entry a string key, u32 value type, the value
           (strings: u64 byte count + bytes, no NUL; arrays: u32 item type, u64 count, items),
       tensor infos: per tensor a string name, u32 n_dims, u64 ne[n_dims] (INNERMOST first: a
           PyTorch (out, in) weight is ne = [in, out], experts (E, out, in) ne = [in, out, E]),
           u32 ggml type (F32 0, F16 1, BF16 30), u64 offset into the data (a multiple of 32),
       zero padding to a multiple of general.alignment (32), then the data.

   The tiny model as llama.cpp's "llama" architecture (its llm_build_llama): token_embd,
   blk.N.attn_norm / attn_q / attn_k / attn_v / attn_output / ffn_norm, dense blk.N.ffn_gate /
   ffn_up / ffn_down, or MoE blk.N.ffn_gate_inp (the router, kept F32) with the experts
   stacked as ffn_gate_exps / ffn_up_exps / ffn_down_exps ([d, D, E], [d, D, E], [D, d, E]:
   exactly moe.h's (E, D, d) / (E, d, D) banks), output_norm; no "output" tensor, so llama.cpp
   ties the head to token_embd as moe.h does. Norms are always F32 (as llama.cpp's converter
   writes them); the other matrices take the dtype asked for.
   llama.cpp's llama architecture rotates ADJACENT pairs (2i, 2i + 1) of each head (its
   LLAMA_ROPE_TYPE_NORM); moe.h (like HF Llama) rotates the halves (i, i + hd/2). As
   llama.cpp's convert_hf_to_gguf.py does, the rows of attn_q and attn_k are permuted per head
   so that row 2i + j holds moe.h's row j * hd/2 + i (j = 0, 1): the same frequency then meets
   the same pair, and q . k is unchanged because q and k move together. v and the output
   projection are not permuted.
   The llama architecture has one FFN kind for all layers and a Mixtral router (softmax over
   all experts, top-k, weights renormalised): exported are the models all dense, or all MoE
   with no shared experts and renormalize = 1, plus what moe_model_hf_check asks; others get
   a sentence.
   Vocabulary: the byte model's 256 tokens as a GPT-2 byte-level BPE vocabulary with NO merges
   (tokenizer.ggml.model "gpt2", pre-tokenizer "default"): token b is byte b written as GPT-2's
   bytes_to_unicode character, so llama.cpp's BPE tokenizer maps every byte of any text to
   its own token and detokenizes back to the bytes. (A SentencePiece "llama" vocabulary of
   <0xNN> byte tokens does not fit 256 tokens: it rewrites spaces as U+2581, which then has
   no token.) bos = eos = token 0 (NUL, absent from text), add_bos_token false. */

#ifndef MOE_NO_STDIO
/* MOE_OK when c exports as llama.cpp's llama architecture (above), else a sentence. */
MOEDEF moe_status moe_model_gguf_check(const moe_model_config *c, moe_err *err);
/* Writes m as a GGUF file (atomically); matrices as dtype, norms and the router as F32. */
MOEDEF moe_status moe_model_export_gguf(const moe_model *m, const char *path, moe_dtype dtype, moe_err *err);
#endif

/* @implementation */
/* ============================================================================================
   >>moe:gguf
   ============================================================================================ */

#ifndef MOE_NO_STDIO
#define MOE__GGUF_ALIGN 32

enum { MOE__GGUF_U32 = 4, MOE__GGUF_I32 = 5, MOE__GGUF_F32 = 6, MOE__GGUF_BOOL = 7, MOE__GGUF_STRING = 8, MOE__GGUF_ARRAY = 9 };

MOE__IMPL moe_status moe_model_gguf_check(const moe_model_config *c, moe_err *err) {
    if (moe_model_hf_check(c, err) != MOE_OK) return err ? err->status : MOE_ERR_UNSUPPORTED;
    if (c->vocab != 256) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "the GGUF vocabulary is the 256 bytes; vocab is %d", c->vocab);
    if (moe__hf_any_moe(c) && !moe__hf_is_mixtral(c))
        return moe_err_set(err, MOE_ERR_UNSUPPORTED, "llama.cpp's llama architecture runs all-dense or all-MoE (Mixtral) models: "
                                                     "no dense layers among MoE ones, no shared experts, top-k weights renormalised");
    return MOE_OK;
}

/* the header under construction: a bounded byte cursor (p = NULL only counts) and the number
   of metadata entries written so far */
typedef struct moe__gguf_w {
    moe__wcur w;
    uint64_t n_kv;
} moe__gguf_w;

static void moe__gguf_str(moe__gguf_w *g, const char *s, size_t n) {
    moe__wuint(&g->w, (uint64_t)n, 8);
    moe__wbytes(&g->w, s, n);
}

static void moe__gguf_key(moe__gguf_w *g, const char *key, int type) {
    moe__gguf_str(g, key, strlen(key));
    moe__wuint(&g->w, (uint64_t)type, 4);
    g->n_kv++;
}

static void moe__gguf_u32(moe__gguf_w *g, const char *key, uint32_t v) {
    moe__gguf_key(g, key, MOE__GGUF_U32);
    moe__wuint(&g->w, v, 4);
}

static void moe__gguf_f32(moe__gguf_w *g, const char *key, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    moe__gguf_key(g, key, MOE__GGUF_F32);
    moe__wuint(&g->w, u, 4);
}

static void moe__gguf_string(moe__gguf_w *g, const char *key, const char *v) {
    moe__gguf_key(g, key, MOE__GGUF_STRING);
    moe__gguf_str(g, v, strlen(v));
}

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 take
   the code points 256, 257, ... in byte order. out: the UTF-8 of byte b's character. */
static size_t moe__gpt2_byte_utf8(int b, char *out) {
    int k, extra = 0;
    uint32_t cp;
#define MOE__GPT2_PRINTABLE(x) (((x) >= 33 && (x) <= 126) || ((x) >= 161 && (x) <= 172) || ((x) >= 174 && (x) <= 255))
    for (k = 0; k < b; k++) extra += !MOE__GPT2_PRINTABLE(k);
    cp = MOE__GPT2_PRINTABLE(b) ? (uint32_t)b : 256u + (uint32_t)extra;
#undef MOE__GPT2_PRINTABLE
    if (cp < 0x80u) { out[0] = (char)cp; return 1; }
    out[0] = (char)(0xc0u | (cp >> 6));
    out[1] = (char)(0x80u | (cp & 0x3fu));
    return 2;
}

typedef struct moe__gguf_tensor {
    moe__st_view v;   /* the data, in ggml order (v.shape holds ne, innermost first) */
    moe_dtype dtype;
} moe__gguf_tensor;

/* The header (metadata and tensor infos, unpadded) into g (g->w.p = NULL sizes it and counts
   the metadata entries); n_kv: the count to write, from a sizing pass. */
static void moe__gguf_header(moe__gguf_w *g, uint64_t n_kv, const moe_model_config *c, const moe__gguf_tensor *t, int count,
                             uint32_t file_type) {
    int any_moe = moe__hf_any_moe(c), k, d;
    char tok[4];
    uint64_t off = 0;
    moe__wcur *w = &g->w;
    moe__wbytes(w, "GGUF", 4);
    moe__wuint(w, 3, 4);
    moe__wuint(w, (uint64_t)count, 8);
    moe__wuint(w, n_kv, 8);
    moe__gguf_string(g, "general.architecture", "llama");
    moe__gguf_string(g, "general.name", "moe.h tiny model");
    moe__gguf_u32(g, "general.alignment", MOE__GGUF_ALIGN);
    moe__gguf_u32(g, "general.file_type", file_type);
    moe__gguf_u32(g, "llama.vocab_size", (uint32_t)c->vocab);
    moe__gguf_u32(g, "llama.context_length", (uint32_t)c->max_seq);
    moe__gguf_u32(g, "llama.embedding_length", (uint32_t)c->d);
    moe__gguf_u32(g, "llama.block_count", (uint32_t)c->n_layers);
    moe__gguf_u32(g, "llama.feed_forward_length", (uint32_t)(any_moe ? c->moe.d_ff : c->d_ff));
    moe__gguf_u32(g, "llama.attention.head_count", (uint32_t)c->n_heads);
    moe__gguf_u32(g, "llama.attention.head_count_kv", (uint32_t)c->n_heads);
    moe__gguf_u32(g, "llama.rope.dimension_count", (uint32_t)(c->d / c->n_heads));
    moe__gguf_f32(g, "llama.rope.freq_base", c->rope_theta);
    moe__gguf_f32(g, "llama.attention.layer_norm_rms_epsilon", c->norm_eps);
    if (any_moe) {
        moe__gguf_u32(g, "llama.expert_count", (uint32_t)c->moe.n_experts);
        moe__gguf_u32(g, "llama.expert_used_count", (uint32_t)c->moe.top_k);
    }
    moe__gguf_string(g, "tokenizer.ggml.model", "gpt2");
    moe__gguf_string(g, "tokenizer.ggml.pre", "default");
    moe__gguf_key(g, "tokenizer.ggml.tokens", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_STRING, 4);
    moe__wuint(w, 256, 8);
    for (k = 0; k < 256; k++) moe__gguf_str(g, tok, moe__gpt2_byte_utf8(k, tok));
    moe__gguf_key(g, "tokenizer.ggml.token_type", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_I32, 4);
    moe__wuint(w, 256, 8);
    for (k = 0; k < 256; k++) moe__wuint(w, 1, 4); /* LLAMA_TOKEN_TYPE_NORMAL */
    moe__gguf_key(g, "tokenizer.ggml.merges", MOE__GGUF_ARRAY);
    moe__wuint(w, MOE__GGUF_STRING, 4);
    moe__wuint(w, 0, 8);
    moe__gguf_u32(g, "tokenizer.ggml.bos_token_id", 0);
    moe__gguf_u32(g, "tokenizer.ggml.eos_token_id", 0);
    moe__gguf_key(g, "tokenizer.ggml.add_bos_token", MOE__GGUF_BOOL);
    moe__wuint(w, 0, 1);
    moe__gguf_key(g, "tokenizer.ggml.add_eos_token", MOE__GGUF_BOOL);
    moe__wuint(w, 0, 1);
    for (k = 0; k < count; k++) {
        moe__gguf_str(g, t[k].v.name, strlen(t[k].v.name));
        moe__wuint(w, (uint64_t)t[k].v.ndim, 4);
        for (d = 0; d < t[k].v.ndim; d++) moe__wuint(w, t[k].v.shape[d], 8);
        moe__wuint(w, t[k].dtype == MOE_DTYPE_F32 ? 0u : t[k].dtype == MOE_DTYPE_F16 ? 1u : 30u, 4);
        moe__wuint(w, off, 8);
        off += ((uint64_t)moe__view_numel(&t[k].v) * moe__st_dtype_size(t[k].dtype) + MOE__GGUF_ALIGN - 1) / MOE__GGUF_ALIGN * MOE__GGUF_ALIGN;
    }
}

/* a plain view of store tensor `store` as GGUF tensor `name` with ne = ne0, ne1, ne2 */
static int moe__gguf_add(const moe_model *m, moe__gguf_tensor *t, int *count, const char *name, const char *store, int ndim,
                         uint64_t ne0, uint64_t ne1, uint64_t ne2, moe_dtype dtype, moe_err *err) {
    int id = moe_store_find(&m->S, store);
    moe__gguf_tensor *g;
    if (id < 0) {
        moe_err_set(err, MOE_ERR_STATE, "the model has no tensor '%s'", store);
        return 0;
    }
    g = &t[(*count)++];
    g->v = moe__view_plain(name, moe_store_param(&m->S, id), &m->S.tensors[id]);
    g->v.ndim = ndim;
    g->v.shape[0] = ne0; g->v.shape[1] = ne1; g->v.shape[2] = ne2;
    g->dtype = ndim == 1 ? MOE_DTYPE_F32 : dtype;
    return 1;
}

MOE__IMPL moe_status moe_model_export_gguf(const moe_model *m, const char *path, moe_dtype dtype, moe_err *err) {
    const moe_model_config *c;
    moe__gguf_tensor *t;
    moe__gguf_w g;
    unsigned char *head = NULL, *chunk = NULL, pad[MOE__GGUF_ALIGN];
    char tmp[4096], name[64], sn[MOE_NAME_LEN];
    moe__ckpt_out f;
    int count = 0, l, k, ok = 1, d, hd, half, p;
    uint32_t file_type;
    moe_status st;
    if (!m || !m->S.params || !path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "GGUF export needs an initialised model and a path");
    if (dtype != MOE_DTYPE_F32 && dtype != MOE_DTYPE_F16 && dtype != MOE_DTYPE_BF16) return moe_err_set(err, MOE_ERR_INVALID_ARG, "unknown dtype %d", (int)dtype);
    c = &m->cfg;
    st = moe_model_gguf_check(c, err);
    if (st != MOE_OK) return st;
    d = c->d;
    hd = d / c->n_heads;
    half = hd / 2;
    file_type = dtype == MOE_DTYPE_F32 ? 0u : dtype == MOE_DTYPE_F16 ? 1u : 32u; /* LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_BF16 */
    t = (moe__gguf_tensor *)moe__calloc((size_t)(2 + 10 * c->n_layers), sizeof *t);
    if (!t) return moe_err_set(err, MOE_ERR_NOMEM, "out of memory");
    ok = moe__gguf_add(m, t, &count, "token_embd.weight", "wte", 2, (uint64_t)d, (uint64_t)c->vocab, 0, dtype, err);
    for (l = 0; l < c->n_layers && ok; l++) {
        const char *qkv[3] = {"attn_q", "attn_k", "attn_v"};
        sprintf(name, "blk.%d.attn_norm.weight", l);
        sprintf(sn, "l%d.ln1.w", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 1, (uint64_t)d, 0, 0, dtype, err);
        sprintf(sn, "l%d.attn.wqkv", l);
        for (p = 0; p < 3 && ok; p++) {
            moe__st_view *v;
            sprintf(name, "blk.%d.%s.weight", l, qkv[p]);
            ok = moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)d, 0, dtype, err);
            if (!ok) break;
            v = &t[count - 1].v;
            v->base += (size_t)p * d * d;
            if (p < 2) { /* file row h hd + 2i + j <- row h hd + j half + i: loops (h, i, j, column) */
                v->n[0] = (size_t)c->n_heads; v->st[0] = (size_t)hd * d;
                v->n[1] = (size_t)half;       v->st[1] = (size_t)d;
                v->n[2] = 2;                  v->st[2] = (size_t)half * d;
                v->n[3] = (size_t)d;          v->st[3] = 1;
            } else {
                v->n[3] = (size_t)d * d;
            }
        }
        sprintf(name, "blk.%d.attn_output.weight", l);
        sprintf(sn, "l%d.attn.wo", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)d, 0, dtype, err);
        sprintf(name, "blk.%d.ffn_norm.weight", l);
        sprintf(sn, "l%d.ln2.w", l);
        ok = ok && moe__gguf_add(m, t, &count, name, sn, 1, (uint64_t)d, 0, 0, dtype, err);
        if (!m->blocks[l].is_moe) {
            const char *gn[3] = {"ffn_gate", "ffn_up", "ffn_down"}, *sw[3] = {"w_gate", "w_up", "w_down"};
            for (p = 0; p < 3 && ok; p++) {
                sprintf(name, "blk.%d.%s.weight", l, gn[p]);
                sprintf(sn, "l%d.ffn.%s", l, sw[p]);
                ok = moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)(p < 2 ? d : c->d_ff), (uint64_t)(p < 2 ? c->d_ff : d), 0, dtype, err);
            }
        } else {
            const char *gn[3] = {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}, *sw[3] = {"w_gate", "w_up", "w_down"};
            int D = c->moe.d_ff;
            sprintf(name, "blk.%d.ffn_gate_inp.weight", l);
            sprintf(sn, "l%d.moe.router.w", l);
            ok = ok && moe__gguf_add(m, t, &count, name, sn, 2, (uint64_t)d, (uint64_t)c->moe.n_experts, 0, MOE_DTYPE_F32, err);
            for (p = 0; p < 3 && ok; p++) {
                sprintf(name, "blk.%d.%s.weight", l, gn[p]);
                sprintf(sn, "l%d.moe.experts.%s", l, sw[p]);
                ok = moe__gguf_add(m, t, &count, name, sn, 3, (uint64_t)(p < 2 ? d : D), (uint64_t)(p < 2 ? D : d), (uint64_t)c->moe.n_experts, dtype, err);
            }
        }
    }
    ok = ok && moe__gguf_add(m, t, &count, "output_norm.weight", "lnf.w", 1, (uint64_t)d, 0, 0, dtype, err);
    /* every tensor of the store is written once (the config check above makes it so) */
    for (k = 0; k < count && ok; k++) {
        uint64_t ne = 1;
        for (p = 0; p < t[k].v.ndim; p++) ne *= t[k].v.shape[p];
        if (ne != (uint64_t)moe__view_numel(&t[k].v)) ok = 0, moe_err_set(err, MOE_ERR_STATE, "GGUF tensor '%s' has %llu elements but its source %zu", t[k].v.name, (unsigned long long)ne, moe__view_numel(&t[k].v));
    }
    if (!ok) { MOE_FREE(t); return err ? err->status : MOE_ERR_STATE; }
    memset(&g, 0, sizeof g);
    moe__gguf_header(&g, 0, c, t, count, file_type); /* sizing pass */
    g.w.cap = g.w.pos;
    head = (unsigned char *)MOE_MALLOC(g.w.cap);
    chunk = (unsigned char *)MOE_MALLOC(MOE__ST_CHUNK);
    if (!head || !chunk) { MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk); return moe_err_set(err, MOE_ERR_NOMEM, "out of memory"); }
    g.w.p = head;
    g.w.pos = 0;
    moe__gguf_header(&g, g.n_kv, c, t, count, file_type);
    memset(pad, 0, sizeof pad);
    st = moe__atomic_open(&f, NULL, path, tmp, sizeof tmp, err);
    if (st != MOE_OK) { MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk); return st; }
    ok = moe__atomic_write(&f, head, g.w.pos);
    ok = ok && moe__atomic_write(&f, pad, (MOE__GGUF_ALIGN - g.w.pos % MOE__GGUF_ALIGN) % MOE__GGUF_ALIGN);
    for (k = 0; k < count && ok; k++) {
        const moe__st_view *v = &t[k].v;
        size_t idx[4] = {0, 0, 0, 0}, e, numel = moe__view_numel(v), es = moe__st_dtype_size(t[k].dtype), fill = 0, bytes;
        for (e = 0; e < numel && ok; e++, moe__view_step(v, idx)) {
            moe__st_encode(chunk + fill, *moe__view_at(v, idx), t[k].dtype);
            fill += es;
            if (fill == MOE__ST_CHUNK) { ok = moe__atomic_write(&f, chunk, fill); fill = 0; }
        }
        if (ok && fill) ok = moe__atomic_write(&f, chunk, fill);
        bytes = numel * es;
        ok = ok && moe__atomic_write(&f, pad, (MOE__GGUF_ALIGN - bytes % MOE__GGUF_ALIGN) % MOE__GGUF_ALIGN);
    }
    MOE_FREE(t); MOE_FREE(head); MOE_FREE(chunk);
    return moe__atomic_close(&f, ok, tmp, path, err);
}
#endif /* MOE_NO_STDIO */
