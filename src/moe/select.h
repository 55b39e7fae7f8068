/* ============================================================================================
   >>moe:select  named selections of the model's linear matrices
   ============================================================================================
   Which weights a mask, LoRA or MIGU acts on, by role instead of by name. An FFN is a
   key-value memory (Geva et al., arXiv 2012.14913 §2): its first layer's rows are keys matched
   against the input, its second layer's rows values written to the residual stream. So
     keys   = SwiGLU gate and up (A, B), or the first matrix of a two-matrix FFN;
     values = down (O), the second matrix;
   for the dense FFNs and for every expert bank (routed and shared) of the MoE layers alike.
   Parameter-matched pairs (keys vs values, arXiv 2402.12233): MOE_SEL_UP alone and
   MOE_SEL_DOWN alone have the same size (D d each per expert); MOE_SEL_KEYS of a SwiGLU FFN
   is twice MOE_SEL_VALUES. Routers, AoE's factorised gate, embeddings and norms are never
   selected. The attention projections: the fused q/k/v matrix and the output matrix. */

enum {
    MOE_SEL_GATE = 1,   /* SwiGLU gate (dense FFN and expert banks)        */
    MOE_SEL_UP = 2,     /* SwiGLU up, or a two-matrix FFN's first matrix   */
    MOE_SEL_DOWN = 4,   /* the FFN's output matrix                         */
    MOE_SEL_QKV = 8,    /* attention's fused q, k, v projection            */
    MOE_SEL_ATTN_O = 16,/* attention's output projection                   */
    MOE_SEL_KEYS = MOE_SEL_GATE | MOE_SEL_UP,
    MOE_SEL_VALUES = MOE_SEL_DOWN,
    MOE_SEL_FFN = MOE_SEL_KEYS | MOE_SEL_VALUES,
    MOE_SEL_ATTN = MOE_SEL_QKV | MOE_SEL_ATTN_O,
    MOE_SEL_LINEAR = MOE_SEL_FFN | MOE_SEL_ATTN /* every linear layer MIGU watches */
};

/* The ids of the tensors `parts` selects, in table order, into ids (at most max_ids written;
   ids may be NULL to count). Returns how many the selection has. */
MOEDEF int moe_model_select(const moe_model *m, int parts, int *ids, int max_ids);
/* The parameters of a selection (a parameter-matched pair has equal counts). */
MOEDEF size_t moe_model_select_numel(const moe_model *m, int parts);
/* k keeps exactly the selected tensors of m (everything else masked): train keys only,
   values only, attention only. parts without any tensor in m: MOE_ERR_INVALID_ARG, k unchanged. */
MOEDEF moe_status moe_mask_select(moe_mask *k, const moe_model *m, int parts);

/* @implementation */
/* ============================================================================================
   >>moe:select
   ============================================================================================ */

static int moe__select_role(const moe_model *m, int id) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) {
        const moe_block *b = &m->blocks[l];
        if (id == b->id_qkv) return MOE_SEL_QKV;
        if (id == b->id_wo) return MOE_SEL_ATTN_O;
        if (!b->is_moe) {
            if (id == b->id_gate) return MOE_SEL_GATE;
            if (id == b->id_up) return MOE_SEL_UP;
            if (id == b->id_down) return MOE_SEL_DOWN;
        } else {
            const moe_layer *L = &b->moe;
            if (id == L->id_gate || id == L->id_s_gate) return MOE_SEL_GATE;
            if (id == L->id_up || id == L->id_s_up) return MOE_SEL_UP;
            if (id == L->id_down || id == L->id_s_down) return MOE_SEL_DOWN;
        }
    }
    return 0;
}

MOE__IMPL int moe_model_select(const moe_model *m, int parts, int *ids, int max_ids) {
    int id, n = 0;
    if (!m->blocks) return 0;
    for (id = 0; id < m->S.count; id++)
        if (moe__select_role(m, id) & parts) {
            if (ids && n < max_ids) ids[n] = id;
            n++;
        }
    return n;
}

MOE__IMPL size_t moe_model_select_numel(const moe_model *m, int parts) {
    int id;
    size_t n = 0;
    if (!m->blocks) return 0;
    for (id = 0; id < m->S.count; id++)
        if (moe__select_role(m, id) & parts) n += m->S.tensors[id].numel;
    return n;
}

MOE__IMPL moe_status moe_mask_select(moe_mask *k, const moe_model *m, int parts) {
    int id;
    if (moe__mask_check(k, &m->S) != MOE_OK) return k->err.status;
    if (moe_model_select(m, parts, NULL, 0) == 0)
        return moe_err_set(&k->err, MOE_ERR_INVALID_ARG, "the selection %d names no tensor of this model", parts);
    for (id = 0; id < m->S.count; id++)
        memset(k->keep + m->S.tensors[id].offset, (moe__select_role(m, id) & parts) ? 1 : 0, m->S.tensors[id].numel);
    return MOE_OK;
}
