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
   Optional argument: one config name. */
#define MOE_IMPLEMENTATION
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REPS 7

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *t, int n) {
    qsort(t, (size_t)n, sizeof(double), cmp_double);
    return t[n / 2];
}

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
    moe_layer_backward(&L, &S, dx, dy, x);
    for (e = 0; e < E; e++) mx = L.stats.load[e] > mx ? L.stats.load[e] : mx;
    for (r = 0; r < REPS; r++) {
        double t0 = moe_time_seconds();
        moe_layer_forward(&L, &S, y, x, T, NULL);
        tf[r] = moe_time_seconds() - t0;
    }
    for (r = 0; r < REPS; r++) {
        double t0 = moe_time_seconds();
        moe_layer_forward(&L, &S, y, x, T, NULL);
        moe_layer_backward(&L, &S, dx, dy, x);
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
    fflush(stdout);
    free(x);
    free(y);
    free(dy);
    free(dx);
    moe_layer_free(&L);
    moe_store_free(&S);
    return 0;
}

int main(int argc, char **argv) {
    static const struct { const char *name; int T, d, D, E, k; } cfg[] = {
        {"small", 4096, 256, 512, 8, 2}, {"medium", 8192, 512, 1024, 16, 2}, {"fine", 4096, 512, 256, 64, 8}};
    int c, rc = 0;
    for (c = 0; c < 3; c++) {
        if (argc > 1 && strcmp(argv[1], cfg[c].name) != 0) continue;
        rc |= bench_config(cfg[c].name, cfg[c].T, cfg[c].d, cfg[c].D, cfg[c].E, cfg[c].k);
    }
    return rc;
}
