/* bench/moe_layer.c - forward and forward+backward time of one MoE layer (moe_layer_* API):
   softmax top-k router with renormalised weights (Mixtral), SwiGLU experts, no shared experts.

     small   T=4096 d=256 D=512  E=8  k=2
     medium  T=8192 d=512 D=1024 E=16 k=2
     fine    T=4096 d=512 D=256  E=64 k=8

   Inputs x ~ N(0, 1), the router N(0, 0.02) (the library's default init), so routing is close to
   uniform and every expert gets about T k / E tokens (the load line shows max/mean).
   One line per shape and pass (medians of REPS timed runs after one warm-up):
     bench=moe_layer config=C pass=fwd|fwd_bwd threads=P median_ms= tokens_per_s= gflops=
   gflops counts the expert and router matmuls only: forward 2 T k (3 d D) + 2 T d E, backward
   twice the forward; fwd_bwd = 3x forward. bench/torch_moe_layer.py is the PyTorch peer.
   Optional argument: one config name.
   With -DMOE_BENCH_BLAS (make bench BLAS=1) also the expert GEMMs alone through OpenBLAS sgemm
   on the layer's last routing (each expert's 3 forward and 6 backward products on its rows; no
   gather, activation, combine or router):
     bench=moe_layer_blas config=C pass=fwd_bwd threads=P median_ms= layer_over_gemms=

   `moe_layer --routers [config]` times the router families against top-k at the same shapes
   (issue 4). Each family's layer is timed in alternation with a top-k layer, rep by rep, so
   the overhead compares runs made moments apart:
     topk   the layer above (softmax top-k, renormalised, Mixtral balance loss)
     aoe    Autonomy-of-Experts: rank r = d/3, expert width moe_aoe_matched_width(d, D, r)
            (same parameters as top-k), paper weighting (softmax over the k chosen norms)
     hyper  top-k + HyperMoE with the official code's sizes: expert embedding 128, processor
            hidden 128, condition 128, layer embedding 10, hypernetwork b = 128, adapter a = 64
            (its adapter products are T x d x (a b) GEMMs: 2 T d a b flops each way, several
            times the experts' own 6 T k d D at these shapes)
     hyper_tiny  the same with the library's default tiny sizes (32, 32, 32, 4, b = 32, a = 16)
     gw     top-k + GW-MoE broadcast, gw_active = 1, normalised entropy threshold set to the
            90th percentile of the tokens' routing entropy (about 10% of tokens broadcast;
            broadcast_share reports the measured share)
     rmoe   top-k whose router reads a GRU state of width p = 128 (router_dim = 128): the
            timed pass includes one router step through the public API: projection
            x . P^T (d -> p), moe_gru_forward from a given previous state, the layer with
            router_input = h; backward: the layer (d_router_input), moe_gru_backward, the
            projection's backward
   Lines (medians of REPS): bench=moe_layer_router config=C router=R pass=fwd|fwd_bwd
     median_ms= tokens_per_s= topk_median_ms= overhead_pct= (time over top-k's, in percent;
     the throughput cost is 1 - 1/(1 + overhead)) [broadcast_share=] */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "flags.h" /* defines: flag_switch, flags_parse */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_BENCH_BLAS
#include <cblas.h>
#endif

#define REPS 7

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *t, int n) {
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    return t[n / 2];
}

#ifdef MOE_BENCH_BLAS
/* the layer's expert products alone through sgemm on its routing (L->routed.offset): forward
   hg = x Wg^T, hu = x Wu^T, out = h Wd^T; backward dh = dout Wd, gWd += dout^T h,
   dxg = dg Wg + du Wu, gWg += dg^T x, gWu += du^T x. Buffers hold the layer's gathered rows. */
static double blas_expert_gemms(const moe_layer *L, const moe_expert_weights *w, moe_expert_weights *gw, float *xg,
                                float *h1, float *h2, float *h3, float *o, float *dxg) {
    int E = L->cfg.n_experts, d = L->cfg.d, D = L->cfg.d_ff, e;
    size_t wsz = (size_t)D * d;
    double t0 = moe_time_seconds();
    for (e = 0; e < E; e++) {
        int b = L->routed.offset[e], n = L->routed.offset[e + 1] - b;
        float *x = xg + (size_t)b * d, *a = h1 + (size_t)b * D, *u = h2 + (size_t)b * D, *h = h3 + (size_t)b * D;
        float *oo = o + (size_t)b * d, *dx = dxg + (size_t)b * d;
        if (n == 0) continue;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, d, 1.0f, x, d, w->gate + wsz * e, d, 0.0f, a, D);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, D, d, 1.0f, x, d, w->up + wsz * e, d, 0.0f, u, D);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, d, D, 1.0f, h, D, w->down + wsz * e, D, 0.0f, oo, d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, D, d, 1.0f, oo, d, w->down + wsz * e, D, 0.0f, h, D);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d, D, n, 1.0f, oo, d, h, D, 1.0f, gw->down + wsz * e, D);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, D, 1.0f, a, D, w->gate + wsz * e, d, 0.0f, dx, d);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d, D, 1.0f, u, D, w->up + wsz * e, d, 1.0f, dx, d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, d, n, 1.0f, a, D, x, d, 1.0f, gw->gate + wsz * e, d);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, D, d, n, 1.0f, u, D, x, d, 1.0f, gw->up + wsz * e, d);
    }
    return moe_time_seconds() - t0;
}
#endif

static int bench_config(const char *name, int T, int d, int D, int E, int k) {
    moe_layer_config c = moe_layer_config_default();
    moe_store S;
    moe_layer L;
    moe_rng rng;
    float *x, *y, *dy, *dx, mx = 0.0f;
    double tf[REPS], tb[REPS], flops_fwd, ms;
    size_t n = (size_t)T * d, i;
    int r, e, threads = moe_num_threads();
    c.d = d;
    c.d_ff = D;
    c.n_experts = E;
    c.top_k = k;
    c.expert = MOE_EXPERT_SWIGLU;
    c.router = MOE_ROUTER_TOPK;
    c.renormalize = 1;
    moe_store_init(&S);
    if (moe_layer_init(&L, &c, &S, "moe.", T) != MOE_OK || moe_store_alloc(&S, 0) != MOE_OK) {
        printf("bench=moe_layer config=%s error=\"%s%s\"\n", name, L.err.msg, S.err.msg);
        return 1;
    }
    moe_rng_seed(&rng, 1234);
    moe_layer_init_weights(&L, &S, &rng);
    x = (float *)malloc(n * sizeof(float));
    y = (float *)malloc(n * sizeof(float));
    dy = (float *)malloc(n * sizeof(float));
    dx = (float *)malloc(n * sizeof(float));
    if (!x || !y || !dy || !dx) {
        printf("bench=moe_layer config=%s error=out_of_memory\n", name);
        return 1;
    }
    for (i = 0; i < n; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < n; i++) dy[i] = moe_rng_normal(&rng) / (float)T;
    memset(dx, 0, n * sizeof(float));
    /* warm-up: page faults of the activations, thread pool, caches */
    moe_layer_forward(&L, &S, y, x, T, NULL);
    moe_layer_backward(&L, &S, dx, dy, x, NULL);
    for (e = 0; e < E; e++) mx = L.stats.load[e] > mx ? L.stats.load[e] : mx;
    for (r = 0; r < REPS; r++) {
        double t0 = moe_time_seconds();
        moe_layer_forward(&L, &S, y, x, T, NULL);
        tf[r] = moe_time_seconds() - t0;
    }
    for (r = 0; r < REPS; r++) {
        double t0 = moe_time_seconds();
        moe_layer_forward(&L, &S, y, x, T, NULL);
        moe_layer_backward(&L, &S, dx, dy, x, NULL);
        tb[r] = moe_time_seconds() - t0;
    }
    flops_fwd = 2.0 * T * k * 3.0 * d * D + 2.0 * T * d * E;
    printf("bench=moe_layer_info config=%s T=%d d=%d d_ff=%d E=%d k=%d threads=%d load_max_over_mean=%.3f\n", name, T,
           d, D, E, k, threads, mx * E);
    ms = median(tf, REPS) * 1e3;
    printf("bench=moe_layer config=%s pass=fwd threads=%d median_ms=%.2f tokens_per_s=%.0f gflops=%.1f\n", name,
           threads, ms, T / ms * 1e3, flops_fwd / ms * 1e-6);
    ms = median(tb, REPS) * 1e3;
    printf("bench=moe_layer config=%s pass=fwd_bwd threads=%d median_ms=%.2f tokens_per_s=%.0f gflops=%.1f\n", name,
           threads, ms, T / ms * 1e3, 3.0 * flops_fwd / ms * 1e-6);
#ifdef MOE_BENCH_BLAS
    {
        size_t N = (size_t)L.routed.offset[E], nh = N * D;
        float *h1 = (float *)calloc(nh, sizeof(float)), *h2 = (float *)calloc(nh, sizeof(float));
        float *h3 = (float *)calloc(nh, sizeof(float)), *o = (float *)calloc(N * d, sizeof(float));
        float *dxg = (float *)calloc(N * d, sizeof(float));
        moe_expert_weights w = moe_layer_experts(&L, &S, 0, 0), gw = moe_layer_experts(&L, &S, 0, 1);
        double tg[REPS];
        if (h1 && h2 && h3 && o && dxg) {
            blas_expert_gemms(&L, &w, &gw, L.xg, h1, h2, h3, o, dxg); /* warm-up */
            for (r = 0; r < REPS; r++) tg[r] = blas_expert_gemms(&L, &w, &gw, L.xg, h1, h2, h3, o, dxg);
            printf("bench=moe_layer_blas config=%s pass=fwd_bwd threads=%d median_ms=%.2f layer_over_gemms=%.3f\n", name, threads,
                   median(tg, REPS) * 1e3, ms / (median(tg, REPS) * 1e3));
        }
        free(h1); free(h2); free(h3); free(o); free(dxg);
    }
#endif
    fflush(stdout);
    free(x);
    free(y);
    free(dy);
    free(dx);
    moe_layer_free(&L);
    moe_store_free(&S);
    return 0;
}

/* ---- the CUDA layer (--device cuda, a build with MOE_CUDA) -------------------------------------
   The same shapes on the device: the layer twin (softmax top-k, renormalised, SwiGLU experts;
   no balance loss, which the device layer does not compute: balance=none in the line), and the
   cuBLAS-only time of the same GEMMs (router and each expert's three products on its rows, the
   rows this routing gave), which bounds what the rest of the layer costs. Lines:
     bench=moe_layer_cuda config=C mode=deterministic|fast pass=fwd|fwd_bwd median_ms= tokens_per_s= gflops=
     bench=moe_layer_cuda config=C mode=M pass=gemm_fwd median_ms= gflops= */
#ifdef MOE_CUDA
static double cuda_seconds(moe_cuda *cu) {
    moe_cuda_sync(cu);
    return moe_time_seconds();
}

static int bench_config_cuda(const char *name, int T, int d, int D, int E, int k, moe_cuda_mode mode) {
    moe_layer_config c = moe_layer_config_default();
    moe_store S;
    moe_layer L;
    moe_layer_cuda Lc;
    moe_store_cuda ds;
    moe_cuda cu;
    moe_rng rng;
    float *x, *dy, *Dx, *Dy, *Ddy, *Ddx;
    double tf[REPS], tb[REPS], tg[REPS], flops_fwd, ms;
    size_t n = (size_t)T * d, i;
    int r, e;
    const char *mname = mode == MOE_CUDA_FAST ? "fast" : "deterministic";
    if (moe_cuda_init(&cu, 0, mode) != MOE_OK) {
        printf("bench=moe_layer_cuda config=%s error=\"%s\"\n", name, cu.err.msg);
        return 1;
    }
    c.d = d; c.d_ff = D; c.n_experts = E; c.top_k = k;
    c.expert = MOE_EXPERT_SWIGLU; c.router = MOE_ROUTER_TOPK; c.renormalize = 1;
    c.balance = MOE_BALANCE_NONE;
    moe_store_init(&S);
    if (moe_layer_init(&L, &c, &S, "moe.", T) != MOE_OK || moe_store_alloc(&S, 0) != MOE_OK) {
        printf("bench=moe_layer_cuda config=%s error=\"%s%s\"\n", name, L.err.msg, S.err.msg);
        return 1;
    }
    moe_rng_seed(&rng, 1234);
    moe_layer_init_weights(&L, &S, &rng);
    x = (float *)malloc(n * sizeof(float));
    dy = (float *)malloc(n * sizeof(float));
    for (i = 0; i < n; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < n; i++) dy[i] = moe_rng_normal(&rng) / (float)T;
    if (moe_store_alloc_cuda(&ds, &cu, &S) != MOE_OK || moe_layer_init_cuda(&Lc, &cu, &L, T) != MOE_OK ||
        moe_cuda_malloc(&cu, (void **)&Dx, n * 4) != MOE_OK || moe_cuda_malloc(&cu, (void **)&Dy, n * 4) != MOE_OK ||
        moe_cuda_malloc(&cu, (void **)&Ddy, n * 4) != MOE_OK || moe_cuda_malloc(&cu, (void **)&Ddx, n * 4) != MOE_OK ||
        moe_cuda_upload(&cu, Dx, x, n * 4) != MOE_OK || moe_cuda_upload(&cu, Ddy, dy, n * 4) != MOE_OK ||
        moe_layer_forward_cuda(&cu, &Lc, &ds, Dy, Dx, T) != MOE_OK || moe_layer_backward_cuda(&cu, &Lc, &ds, Ddx, Ddy, Dx) != MOE_OK ||
        moe_cuda_sync(&cu) != MOE_OK) {
        printf("bench=moe_layer_cuda config=%s error=\"%s\"\n", name, cu.err.msg);
        return 1;
    }
    for (r = 0; r < REPS; r++) {
        double t0 = cuda_seconds(&cu);
        moe_layer_forward_cuda(&cu, &Lc, &ds, Dy, Dx, T);
        tf[r] = cuda_seconds(&cu) - t0;
    }
    for (r = 0; r < REPS; r++) {
        double t0 = cuda_seconds(&cu);
        moe_layer_forward_cuda(&cu, &Lc, &ds, Dy, Dx, T);
        moe_layer_backward_cuda(&cu, &Lc, &ds, Ddx, Ddy, Dx);
        tb[r] = cuda_seconds(&cu) - t0;
    }
    for (r = 0; r < REPS; r++) { /* the forward's GEMMs alone, on the rows of the last routing */
        double t0 = cuda_seconds(&cu);
        const float *W = ds.params;
        moe_matmul_forward_cuda(&cu, Lc.logits, Dx, W + S.tensors[L.id_router_w].offset, NULL, T, d, E);
        for (e = 0; e < E; e++) {
            int o = Lc.offset_host[e], m = Lc.offset_host[e + 1] - o;
            size_t eD = (size_t)e * D * d;
            if (m == 0) continue;
            moe_matmul_forward_cuda(&cu, Lc.hg + (size_t)o * D, Lc.xg + (size_t)o * d, W + S.tensors[L.id_gate].offset + eD, NULL, m, d, D);
            moe_matmul_forward_cuda(&cu, Lc.hu + (size_t)o * D, Lc.xg + (size_t)o * d, W + S.tensors[L.id_up].offset + eD, NULL, m, d, D);
            moe_matmul_forward_cuda(&cu, Lc.eout + (size_t)o * d, Lc.h + (size_t)o * D, W + S.tensors[L.id_down].offset + eD, NULL, m, D, d);
        }
        tg[r] = cuda_seconds(&cu) - t0;
    }
    flops_fwd = 2.0 * T * k * 3.0 * d * D + 2.0 * T * d * E;
    ms = median(tf, REPS) * 1e3;
    printf("bench=moe_layer_cuda config=%s mode=%s balance=none pass=fwd median_ms=%.3f tokens_per_s=%.0f gflops=%.1f\n", name, mname,
           ms, T / ms * 1e3, flops_fwd / ms * 1e-6);
    ms = median(tb, REPS) * 1e3;
    printf("bench=moe_layer_cuda config=%s mode=%s balance=none pass=fwd_bwd median_ms=%.3f tokens_per_s=%.0f gflops=%.1f\n", name,
           mname, ms, T / ms * 1e3, 3.0 * flops_fwd / ms * 1e-6);
    ms = median(tg, REPS) * 1e3;
    printf("bench=moe_layer_cuda config=%s mode=%s pass=gemm_fwd median_ms=%.3f gflops=%.1f\n", name, mname, ms, flops_fwd / ms * 1e-6);
    fflush(stdout);
    moe_cuda_mfree(Dx); moe_cuda_mfree(Dy); moe_cuda_mfree(Ddy); moe_cuda_mfree(Ddx);
    moe_layer_free_cuda(&Lc);
    moe_store_free_cuda(&ds);
    moe_cuda_free(&cu);
    free(x);
    free(dy);
    moe_layer_free(&L);
    moe_store_free(&S);
    return 0;
}
#endif

/* ---- router families (--routers) ---------------------------------------------------------- */

typedef struct family {
    moe_store S;
    moe_layer L;
    moe_layer_args args;                       /* router input, GW broadcast flag          */
    int rmoe;                                  /* router input from one GRU step          */
    int p, id_proj, id_wih, id_whh, id_bih, id_bhh;
    float *xp, *h_prev, *h, *gi, *gh, *dh, *dxp, *dh_prev, *scratch;
    moe_work work;                             /* the projection's and the GRU's scratch  */
    float broadcast_share;
} family;

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static float *falloc(size_t n) { return (float *)calloc(n, sizeof(float)); }

static int family_init(family *f, const char *router, int T, int d, int D, int E, int k, const float *x, moe_rng *rng) {
    moe_layer_config c = moe_layer_config_default();
    memset(f, 0, sizeof *f);
    f->args = moe_layer_args_default();
    c.d = d;
    c.d_ff = D;
    c.n_experts = E;
    c.top_k = k;
    c.expert = MOE_EXPERT_SWIGLU;
    c.router = MOE_ROUTER_TOPK;
    c.renormalize = 1;
    if (strcmp(router, "aoe") == 0) {
        c.router = MOE_ROUTER_AOE;
        c.aoe_rank = d / 3;
        c.d_ff = moe_aoe_matched_width(d, D, c.aoe_rank);
    } else if (strcmp(router, "hyper") == 0) {
        c.hyper = 1;
        c.hyper_embed = c.hyper_hidden = c.hyper_cond = 128;
        c.hyper_layer_dim = 10;
        c.hyper_width = 128;
        c.hyper_adapter = 64;
    } else if (strcmp(router, "hyper_tiny") == 0) {
        c.hyper = 1; /* moe_layer_config_default's tiny sizes */
    } else if (strcmp(router, "gw") == 0) {
        c.gw_threshold = 1.0f; /* > 0 sizes the assignment list for broadcasts; set below */
        c.gw_normalized = 1;
    } else if (strcmp(router, "rmoe") == 0) {
        f->rmoe = 1;
        f->p = 128;
        c.router_dim = f->p;
    }
    moe_store_init(&f->S);
    if (moe_layer_init(&f->L, &c, &f->S, "moe.", T) != MOE_OK) {
        printf("bench=moe_layer_router router=%s error=\"%s\"\n", router, f->L.err.msg);
        return 1;
    }
    if (f->rmoe) {
        int p = f->p;
        size_t Tp = (size_t)T * p;
        f->id_proj = moe_store_add(&f->S, "rmoe.proj", MOE_TENSOR_DECAY, p, d, 0, 0);
        f->id_wih = moe_store_add(&f->S, "rmoe.gru.w_ih", MOE_TENSOR_DECAY, 3 * p, p, 0, 0);
        f->id_whh = moe_store_add(&f->S, "rmoe.gru.w_hh", MOE_TENSOR_DECAY, 3 * p, p, 0, 0);
        f->id_bih = moe_store_add(&f->S, "rmoe.gru.b_ih", 0, 3 * p, 0, 0, 0);
        f->id_bhh = moe_store_add(&f->S, "rmoe.gru.b_hh", 0, 3 * p, 0, 0, 0);
        f->xp = falloc(Tp); f->h_prev = falloc(Tp); f->h = falloc(Tp); f->gi = falloc(3 * Tp); f->gh = falloc(3 * Tp);
        f->dh = falloc(Tp); f->dxp = falloc(Tp); f->dh_prev = falloc(Tp); f->scratch = falloc(6 * Tp);
        {
            int nt = moe_num_threads();
            size_t a = moe_matmul_work_floats(T, d, p, nt), b = moe_gru_work_floats(T, p, nt);
            moe_work_alloc(&f->work, a > b ? a : b, nt);
        }
        if (!f->xp || !f->h_prev || !f->h || !f->gi || !f->gh || !f->dh || !f->dxp || !f->dh_prev || !f->scratch || !f->work.buf) {
            printf("bench=moe_layer_router router=%s error=out_of_memory\n", router);
            return 1;
        }
        f->args.router_input = f->h;
        f->args.d_router_input = f->dh;
    }
    if (moe_store_alloc(&f->S, 0) != MOE_OK) {
        printf("bench=moe_layer_router router=%s error=\"%s\"\n", router, f->S.err.msg);
        return 1;
    }
    moe_layer_init_weights(&f->L, &f->S, rng);
    if (f->rmoe) { /* torch-like scales: projection 1/sqrt(d), GRU 1/sqrt(p); a previous state */
        int id;
        size_t i;
        for (id = 0; id < f->S.count; id++) {
            const moe_tensor *t = &f->S.tensors[id];
            float sd = id == f->id_proj ? 1.0f / sqrtf((float)d) : (id == f->id_wih || id == f->id_whh) ? 1.0f / sqrtf((float)f->p) : 0.0f;
            if (strncmp(t->name, "rmoe.", 5) != 0) continue;
            for (i = 0; i < t->numel; i++) f->S.params[t->offset + i] = sd * moe_rng_normal(rng);
        }
        for (i = 0; i < (size_t)T * f->p; i++) f->h_prev[i] = 0.5f * moe_rng_normal(rng);
    }
    if (c.gw_threshold > 0.0f) { /* threshold: the 90th percentile of the normalised entropy */
        float *u = falloc((size_t)T), *y = falloc((size_t)T * d);
        int t, e;
        if (!u || !y) return 1;
        f->args.gw_active = 0;
        moe_layer_forward(&f->L, &f->S, y, x, T, &f->args); /* the probabilities without broadcast */
        for (t = 0; t < T; t++) {
            const float *pr = f->L.probs + (size_t)t * E;
            double h = 0.0;
            for (e = 0; e < E; e++) h -= (double)pr[e] * log((double)pr[e] + 1e-5);
            u[t] = (float)(h / log((double)E));
        }
        qsort(u, (size_t)T, sizeof(float), cmp_float);
        f->L.cfg.gw_threshold = u[(int)(0.9 * T)];
        f->args.gw_active = 1;
        free(u);
        free(y);
    }
    return 0;
}

static void family_free(family *f) {
    free(f->xp); free(f->h_prev); free(f->h); free(f->gi); free(f->gh);
    free(f->dh); free(f->dxp); free(f->dh_prev); free(f->scratch);
    moe_work_free(&f->work);
    moe_layer_free(&f->L);
    moe_store_free(&f->S);
}

static void family_forward(family *f, float *y, const float *x, int T, int d) {
    if (f->rmoe) {
        moe_store *S = &f->S;
        moe_matmul_forward(f->xp, x, moe_store_param(S, f->id_proj), NULL, T, d, f->p, &f->work);
        moe_gru_forward(f->h, f->gi, f->gh, f->xp, f->h_prev, moe_store_param(S, f->id_wih), moe_store_param(S, f->id_whh),
                        moe_store_param(S, f->id_bih), moe_store_param(S, f->id_bhh), T, f->p, &f->work);
    }
    moe_layer_forward(&f->L, &f->S, y, x, T, &f->args);
}

static void family_backward(family *f, float *dx, const float *dy, const float *x, int T, int d) {
    moe_store *S = &f->S;
    if (f->rmoe) memset(f->dh, 0, sizeof(float) * (size_t)T * f->p);
    moe_layer_backward(&f->L, S, dx, dy, x, &f->args);
    if (f->rmoe) {
        memset(f->dxp, 0, sizeof(float) * (size_t)T * f->p);
        memset(f->dh_prev, 0, sizeof(float) * (size_t)T * f->p);
        moe_gru_backward(f->dxp, f->dh_prev, moe_store_grad(S, f->id_wih), moe_store_grad(S, f->id_whh),
                         moe_store_grad(S, f->id_bih), moe_store_grad(S, f->id_bhh), f->dh, f->xp, f->h_prev, f->gi, f->gh,
                         moe_store_param(S, f->id_wih), moe_store_param(S, f->id_whh), T, f->p, f->scratch, &f->work);
        moe_matmul_backward(dx, moe_store_grad(S, f->id_proj), NULL, f->dxp, x, moe_store_param(S, f->id_proj), T, d, f->p, &f->work);
    }
}

static int bench_routers(const char *name, int T, int d, int D, int E, int k) {
    static const char *routers[] = {"aoe", "hyper", "hyper_tiny", "gw", "rmoe"};
    family base, fam;
    moe_rng rng;
    size_t n = (size_t)T * d, i;
    float *x = falloc(n), *y = falloc(n), *dy = falloc(n), *dx = falloc(n);
    int ri, r, pass;
    if (!x || !y || !dy || !dx) return 1;
    moe_rng_seed(&rng, 99);
    for (i = 0; i < n; i++) x[i] = moe_rng_normal(&rng);
    for (i = 0; i < n; i++) dy[i] = moe_rng_normal(&rng) / (float)T;
    if (family_init(&base, "topk", T, d, D, E, k, x, &rng)) return 1;
    for (ri = 0; ri < 5; ri++) {
        double tb[2][REPS], tf[2][REPS], mb, mf;
        if (family_init(&fam, routers[ri], T, d, D, E, k, x, &rng)) return 1;
        /* warm-up both */
        family_forward(&base, y, x, T, d); family_backward(&base, dx, dy, x, T, d);
        family_forward(&fam, y, x, T, d); family_backward(&fam, dx, dy, x, T, d);
        fam.broadcast_share = (float)fam.L.stats.broadcast / (float)T;
        for (pass = 0; pass < 2; pass++)
            for (r = 0; r < REPS; r++) {
                int which;
                for (which = 0; which < 2; which++) { /* top-k, then the family: moments apart */
                    family *f = which ? &fam : &base;
                    double t0 = moe_time_seconds();
                    family_forward(f, y, x, T, d);
                    if (pass) family_backward(f, dx, dy, x, T, d);
                    (which ? tf : tb)[pass][r] = moe_time_seconds() - t0;
                }
            }
        for (pass = 0; pass < 2; pass++) {
            mb = median(tb[pass], REPS) * 1e3;
            mf = median(tf[pass], REPS) * 1e3;
            printf("bench=moe_layer_router config=%s router=%s pass=%s median_ms=%.2f tokens_per_s=%.0f topk_median_ms=%.2f "
                   "overhead_pct=%.1f",
                   name, routers[ri], pass ? "fwd_bwd" : "fwd", mf, T / mf * 1e3, mb, (mf / mb - 1.0) * 100.0);
            if (strcmp(routers[ri], "gw") == 0) printf(" broadcast_share=%.3f", fam.broadcast_share);
            if (strcmp(routers[ri], "aoe") == 0) printf(" aoe_rank=%d d_ff=%d", fam.L.cfg.aoe_rank, fam.L.cfg.d_ff);
            printf("\n");
        }
        fflush(stdout);
        family_free(&fam);
    }
    family_free(&base);
    free(x); free(y); free(dy); free(dx);
    return 0;
}

int main(int argc, char **argv) {
    static const struct { const char *name; int T, d, D, E, k; } cfg[] = {
        {"small", 4096, 256, 512, 8, 2}, {"medium", 8192, 512, 1024, 16, 2}, {"fine", 4096, 512, 256, 64, 8}};
    int c, rc = 0, routers = 0, device = 0, fast = 0;
    const char *only = NULL;
    flag fl[3];
    flags_program p;
    fl[0] = flag_switch("--routers", &routers, "time the router families against top-k at the same shapes");
    fl[1] = flag_choice("--device", &device, "cpu|cuda", "cuda: the CUDA layer (a build with MOE_CUDA: make cuda)");
    fl[2] = flag_switch("--fast", &fast, "with --device cuda: the fast mode (atomics) instead of the deterministic one");
    p = flags_program_make("moe_layer", "forward and forward+backward time of one MoE layer (softmax top-k, SwiGLU experts)",
                           "No input. One line per shape and pass: bench=moe_layer config=C pass=fwd|fwd_bwd threads= median_ms=\n"
                           "tokens_per_s= gflops=; with --routers bench=moe_layer_router lines with overhead_pct=.\n"
                           "CONFIG: small (T=4096 d=256 D=512 E=8 k=2), medium (T=8192 d=512 D=1024 E=16 k=2) or\n"
                           "fine (T=4096 d=512 D=256 E=64 k=8); default: all. --device cuda: bench=moe_layer_cuda lines.",
                           fl, 3);
    flags_positional(&p, &only, 1, "[CONFIG]");
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    rc = 0;
    if (only && strcmp(only, "small") != 0 && strcmp(only, "medium") != 0 && strcmp(only, "fine") != 0) {
        fprintf(stderr, "moe_layer: unknown config '%s' (small, medium, fine)\n", only);
        return 2;
    }
    if (device == 1) {
#ifdef MOE_CUDA
        for (c = 0; c < 3; c++)
            if (!only || strcmp(only, cfg[c].name) == 0)
                rc |= bench_config_cuda(cfg[c].name, cfg[c].T, cfg[c].d, cfg[c].D, cfg[c].E, cfg[c].k,
                                        fast ? MOE_CUDA_FAST : MOE_CUDA_DETERMINISTIC);
        return rc;
#else
        fprintf(stderr, "moe_layer: --device cuda: this program was built without the CUDA path (MOE_CUDA); "
                        "`make cuda` builds build/cuda/moe_layer with nvcc\n");
        return 2;
#endif
    }
    for (c = 0; c < 3; c++) {
        if (only && strcmp(only, cfg[c].name) != 0) continue;
        if (routers) rc |= bench_routers(cfg[c].name, cfg[c].T, cfg[c].d, cfg[c].D, cfg[c].E, cfg[c].k);
        else rc |= bench_config(cfg[c].name, cfg[c].T, cfg[c].d, cfg[c].D, cfg[c].E, cfg[c].k);
    }
    return rc;
}
