/* bench/matmul.c - GFLOP/s of moe.h's GEMM on the expert GEMM shapes of the benchmark MoE
   layers (bench/moe_layer.c) and on 1024^3.

   For a config with T tokens, width d, expert width D, E experts and top-k, an expert sees
   n = T k / E tokens on average, and its SwiGLU products are
     fwd_gate_up  h (n, D)    = x (n, d) . W^T        M=n K=d N=D   (twice: gate and up)
     fwd_down     y (n, d)    = h (n, D) . W2^T       M=n K=D N=d
     bwd_dh       dh (n, D)   = dy (n, d) . W2        M=n K=d N=D
     bwd_dx       dx (n, d)   = dh (n, D) . W         M=n K=D N=d   (twice: gate and up)
     bwd_dw_down  dW2 (d, D) += dy^T . h              M=d K=n N=D   (A transposed)
     bwd_dw_up    dW (D, d)  += dh^T . x              M=D K=n N=d   (A transposed, twice)
   bwd_dh and bwd_dx have the forward shapes, so they are not repeated.

   Lines (medians of 7 repetitions, each at least ~20 ms):
     bench=matmul config=C op=O m= n= k= a_trans= threads=1 gflops=    moe_gemm, one thread
     bench=matmul config=C op=O m= n= k= a_trans= threads=P gflops=    moe_matmul_forward
                                                                        (a_trans=0) on P threads
   With -DMOE_BENCH_BLAS (make bench BLAS=1), OpenBLAS sgemm on the same problem (same
   transposition, 1 and P threads) and the ratio:
     bench=openblas_sgemm config=C op=O m= n= k= a_trans= threads= gflops= coretype=
     ratio=ours_vs_openblas config=C op=O threads= value=
   Debian's OpenBLAS 0.3.21 may not recognise newer CPUs: set OPENBLAS_CORETYPE (SkylakeX on
   AVX-512 machines); the first line says which kernels are in effect. */
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "flags.h" /* defines: flags_program_make, flags_parse */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MOE_BENCH_BLAS
#include <cblas.h>
char *openblas_get_corename(void);
void openblas_set_num_threads(int n);
#endif

#define REPS 7

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct problem {
    int M, N, K, a_trans;
    const float *A, *B;
    float *C;
} problem;

typedef void (*runner)(const problem *p, int threads);

static void run_ours(const problem *p, int threads) {
    if (threads == 1) {
        moe_gemm(p->M, p->N, p->K, p->A, p->a_trans ? p->M : p->K, p->a_trans, p->B, p->N, p->C, p->N, 0, NULL);
    } else {
        /* the threaded entry: out (M, N) = inp (M, K) . weight (N, K)^T; B read as (N, K) */
        moe_matmul_forward(p->C, p->A, p->B, NULL, p->M, p->K, p->N, NULL);
    }
}

#ifdef MOE_BENCH_BLAS
static void run_blas(const problem *p, int threads) {
    if (threads == 1) {
        cblas_sgemm(CblasRowMajor, p->a_trans ? CblasTrans : CblasNoTrans, CblasNoTrans, p->M, p->N, p->K, 1.0f,
                    p->A, p->a_trans ? p->M : p->K, p->B, p->N, 0.0f, p->C, p->N);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, p->M, p->N, p->K, 1.0f, p->A, p->K, p->B, p->K, 0.0f,
                    p->C, p->N);
    }
}
#endif

/* median GFLOP/s over REPS repetitions of enough calls to take >= ~20 ms each */
static double measure(runner f, const problem *p, int threads) {
    double flops = 2.0 * p->M * p->N * p->K, t, times[REPS];
    int iters = 1, r, i;
    f(p, threads); /* warm-up: caches, page faults, thread pool */
    for (;;) {
        t = moe_time_seconds();
        for (i = 0; i < iters; i++) f(p, threads);
        t = moe_time_seconds() - t;
        if (t >= 0.02 || iters >= 1 << 20) break;
        iters *= t > 0.002 ? 2 : 8;
    }
    for (r = 0; r < REPS; r++) {
        t = moe_time_seconds();
        for (i = 0; i < iters; i++) f(p, threads);
        times[r] = (moe_time_seconds() - t) / iters;
    }
    qsort(times, REPS, sizeof(double), cmp_double);
    return flops / times[REPS / 2] * 1e-9;
}

static void bench_shape(const char *config, const char *op, int M, int N, int K, int a_trans, int nthreads) {
    size_t na = (size_t)M * K, nb = (size_t)K * N, nc = (size_t)M * N, i;
    float *A = (float *)malloc(na * sizeof(float)), *B = (float *)malloc(nb * sizeof(float));
    float *C = (float *)malloc(nc * sizeof(float));
    moe_rng rng;
    problem p;
    int ti, th[2];
    if (!A || !B || !C) {
        printf("bench=matmul error=out_of_memory\n");
        exit(1);
    }
    moe_rng_seed(&rng, 1);
    for (i = 0; i < na; i++) A[i] = moe_rng_uniform(&rng) - 0.5f;
    for (i = 0; i < nb; i++) B[i] = moe_rng_uniform(&rng) - 0.5f;
    p.M = M; p.N = N; p.K = K; p.a_trans = a_trans; p.A = A; p.B = B; p.C = C;
    th[0] = 1;
    th[1] = nthreads;
    for (ti = 0; ti < (nthreads > 1 ? 2 : 1); ti++) {
        int threads = th[ti], at = threads == 1 ? a_trans : 0;
        double ours, theirs;
        p.a_trans = at;
        ours = measure(run_ours, &p, threads);
        printf("bench=matmul config=%s op=%s m=%d n=%d k=%d a_trans=%d threads=%d gflops=%.1f\n", config, op, M, N, K,
               at, threads, ours);
        fflush(stdout);
#ifdef MOE_BENCH_BLAS
        openblas_set_num_threads(threads);
        theirs = measure(run_blas, &p, threads);
        printf("bench=openblas_sgemm config=%s op=%s m=%d n=%d k=%d a_trans=%d threads=%d gflops=%.1f coretype=%s\n",
               config, op, M, N, K, at, threads, theirs, openblas_get_corename());
        printf("ratio=ours_vs_openblas config=%s op=%s threads=%d value=%.3f\n", config, op, threads, ours / theirs);
        fflush(stdout);
#else
        (void)theirs;
#endif
    }
    free(A);
    free(B);
    free(C);
}

int main(int argc, char **argv) {
    /* name, T, d, D, E, k (as in bench/moe_layer.c) */
    static const struct { const char *name; int T, d, D, E, k; } cfg[] = {
        {"small", 4096, 256, 512, 8, 2}, {"medium", 8192, 512, 1024, 16, 2}, {"fine", 4096, 512, 256, 64, 8}};
    int nthreads = moe_num_threads(), c, rc;
    const char *only = NULL; /* optional: one config name, or "square" */
    const char *ct = getenv("OPENBLAS_CORETYPE");
    flags_program p = flags_program_make("matmul", "GFLOP/s of moe.h's GEMM on the MoE layers' expert GEMM shapes and on 1024^3",
                                         "No input. One line per shape: bench=matmul config=C op=O m= n= k= a_trans= threads= gflops=\n"
                                         "(medians of 7 repetitions); built with BLAS=1 also OpenBLAS sgemm and the ratio.\n"
                                         "CONFIG: small, medium, fine or square (default: all).",
                                         NULL, 0);
    flags_positional(&p, &only, 1, "[CONFIG]");
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
    if (only && strcmp(only, "small") != 0 && strcmp(only, "medium") != 0 && strcmp(only, "fine") != 0 && strcmp(only, "square") != 0) {
        fprintf(stderr, "matmul: unknown config '%s' (small, medium, fine, square)\n", only);
        return 2;
    }
    printf("bench=matmul_info threads=%d mr=%d nr=%d kc=%d mc=%d nc=%d openblas_coretype_env=%s", nthreads,
           MOE_GEMM_MR, MOE_GEMM_NR, MOE_GEMM_KC, MOE_GEMM_MC, MOE_GEMM_NC, ct && *ct ? ct : "unset");
#ifdef MOE_BENCH_BLAS
    printf(" openblas_corename=%s", openblas_get_corename());
#endif
    printf("\n");
    for (c = 0; c < 3; c++) {
        int n = cfg[c].T * cfg[c].k / cfg[c].E, d = cfg[c].d, D = cfg[c].D;
        if (only && strcmp(only, cfg[c].name) != 0) continue;
        bench_shape(cfg[c].name, "fwd_gate_up", n, D, d, 0, nthreads);
        bench_shape(cfg[c].name, "fwd_down", n, d, D, 0, nthreads);
        bench_shape(cfg[c].name, "bwd_dw_down", d, D, n, 1, nthreads);
        bench_shape(cfg[c].name, "bwd_dw_up", D, d, n, 1, nthreads);
    }
    if (!only || strcmp(only, "square") == 0) bench_shape("square", "1024", 1024, 1024, 1024, 0, nthreads);
    return 0;
}
