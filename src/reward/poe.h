/* ============================================================================================
   >>rwd:poe  Product-of-Experts length debiasing
   ============================================================================================
   Shen et al., "Loose lips sink ships: Mitigating Length Bias in Reinforcement Learning from
   Human Feedback", arXiv 2310.05199 (Findings of EMNLP 2023); no official code was found.
   The paper's experts are language models (the bias expert a small one with noise on its
   token embeddings); here both are reward heads on feature rows (>>rwd:head).
   A main expert r_m and a bias expert r_b trained jointly on the product's BT probability:
     L = -(1/B) sum log sigmoid((r_m(w) + r_b(w)) - (r_m(l) + r_b(l)))
   Both get the same gradient per pair, -sigmoid(-(D_m + D_b)) / B, so pairs the bias expert
   already explains (length) teach the main expert little. The bias expert sees its inputs plus
   fresh N(0, s^2) noise every step and learns with its own, larger rate; at inference only the
   main expert is used. Which columns get noise matters: in the paper the noise is on token
   embeddings, and length survives it structurally (the token count). Noise on a length
   FEATURE instead acts as a ridge penalty on the bias expert's length weight, which then moves
   to the noise-free main expert: the opposite of debiasing (tests/test_reward_model.c shows
   it). So with featurizer rows [hashed words | length], set noise_cols = the hashed width. */

RWDDEF double rwd_poe_loss_forward(const float *rm_w, const float *rm_l, const float *rb_w,
                                   const float *rb_l, int B, int *n_correct);
/* drm_*, drb_* (B) += dL/dr of each expert */
RWDDEF void rwd_poe_loss_backward(float *drm_w, float *drm_l, float *drb_w, float *drb_l,
                                  const float *rm_w, const float *rm_l, const float *rb_w,
                                  const float *rb_l, int B);
/* xb_w, xb_l (n, bias->cfg.d_in): the bias expert's features (may be x_w, x_l). Each store
   has its own AdamW step: lr for the main expert, bias_lr for the bias expert. */
RWDDEF moe_status rwd_poe_train(rwd_head *main_head, moe_store *sm, rwd_head *bias_head,
                                moe_store *sb, const float *x_w, const float *x_l,
                                const float *xb_w, const float *xb_l, size_t n,
                                const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err);


/* @implementation */
/* ============================================================================================
   >>rwd:poe
   ============================================================================================ */

RWD__IMPL double rwd_poe_loss_forward(const float *rm_w, const float *rm_l, const float *rb_w,
                                      const float *rb_l, int B, int *n_correct) {
    double loss = 0.0;
    int i, ok = 0;
    for (i = 0; i < B; i++) {
        double z = ((double)rm_w[i] - (double)rm_l[i]) + ((double)rb_w[i] - (double)rb_l[i]);
        loss += rwd__nll_sigmoid(z);
        ok += z > 0.0;
    }
    if (n_correct) *n_correct = ok;
    return B > 0 ? loss / B : 0.0;
}

RWD__IMPL void rwd_poe_loss_backward(float *drm_w, float *drm_l, float *drb_w, float *drb_l,
                                     const float *rm_w, const float *rm_l, const float *rb_w,
                                     const float *rb_l, int B) {
    int i;
    for (i = 0; i < B; i++) {
        double z = ((double)rm_w[i] - (double)rm_l[i]) + ((double)rb_w[i] - (double)rb_l[i]);
        float g = (float)(-rwd__sigmoid_neg(z) / B);
        drm_w[i] += g; drm_l[i] -= g;
        drb_w[i] += g; drb_l[i] -= g;
    }
}

RWD__IMPL moe_status rwd_poe_train(rwd_head *main_head, moe_store *sm, rwd_head *bias_head,
                                   moe_store *sb, const float *x_w, const float *x_l,
                                   const float *xb_w, const float *xb_l, size_t n,
                                   const rwd_train_config *tc, rwd_train_stats *stats, moe_err *err) {
    if (!bias_head || !sb || sm == sb) return moe_err_set(err, MOE_ERR_INVALID_ARG, "PoE needs a bias expert in a store of its own (it has its own learning rate)");
    return rwd__train(main_head, sm, bias_head, sb, x_w, x_l, xb_w, xb_l, NULL, n, tc, stats, err);
}

