/* bench/mpi.c - training on several processes (>>moe:mpi): tokens/s of data-parallel training
   of the bench/train_lm moe config (d=256 L=4, 8 SwiGLU experts of 512, top-2, global batch
   8 x 256 random bytes) at 1 and 2 ranks of one thread each, against one process with 2
   threads; and the bytes expert parallelism sends per step against the analytical count.

   Run plainly, it is the driver: it starts itself under mpirun (--bind-to none, so a rank's
   threads are not pinned to one core; --allow-run-as-root as root) and prints the workers'
   lines:
     bench=mpi mode=dp ranks=R threads=P tokens=N median_ms= tokens_per_s=   (median of REPS steps)
     bench=mpi mode=ep ranks=R rows_per_step= bytes_per_step= analytic_bytes= ratio=
   ratio=mpi_dp2_vs_threads2 value=V: 2 ranks x 1 thread over 1 process x 2 threads.
   Bytes: every row of d floats that crosses ranks, both ways, forward and backward, summed over
   the ranks and the MoE layers (counts are extra: E ints per rank per layer and pass). The
   analytical count for uniform routing: each of the N k assignments of a layer lands on another
   rank with probability (R-1)/R and moves 4 times (rows there, outputs back, output gradients
   there, input gradients back): 4 N k (R-1)/R d 4 bytes per layer. Built without MPI it only
   says so. */
#define _POSIX_C_SOURCE 200809L
#ifdef MOE_MPI
#define MOE_IMPLEMENTATION
#endif
#include "moe.h"
#include "flags.h" /* defines: flags_program_make, flags_parse */
#include "../tests/proc.h" /* proc_run: the driver starts mpirun without a shell */

#define WARMUP 2
#define REPS 7
#define B 8
#define T 256

#ifdef MOE_MPI
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static moe_model_config bench_config(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 256;
    c.max_seq = T;
    c.d = 256;
    c.n_layers = 4;
    c.n_heads = 4;
    c.d_ff = 1024;
    c.moe_every = 1;
    c.moe.n_experts = 8;
    c.moe.top_k = 2;
    c.moe.d_ff = 512;
    c.moe.renormalize = 1;
    c.moe.balance = MOE_BALANCE_MIXTRAL;
    c.moe.balance_coef = 0.01f;
    return c;
}

/* expert_parallel = 0: data parallel timing; 1: expert parallel, bytes counted */
static int worker(int expert_parallel) {
    moe_model_config c = bench_config();
    moe_adamw_config opt = moe_adamw_config_default();
    moe_model m;
    moe_mpi ctx;
    moe_mpi_experts eps[4];
    moe_rng rng;
    int inp[B * T + 1], tgt[B * T], first = 0, rows = 0, r, i, l, rc = 0;
    double t[REPS];
    long long moved0 = 0, moved1 = 0;
    MPI_Init(NULL, NULL);
    if (moe_model_init(&m, &c, B, T) != MOE_OK) { printf("bench=mpi error=\"%s\"\n", m.err.msg); MPI_Abort(MPI_COMM_WORLD, 1); }
    moe_model_init_weights(&m, 1234);
    if (moe_mpi_init(&ctx, MPI_COMM_WORLD, m.S.numel) != MOE_OK || moe_mpi_share(&ctx, B, &first, &rows) != MOE_OK ||
        (expert_parallel && moe_mpi_experts_model_init(eps, &ctx, &m) != MOE_OK)) {
        printf("bench=mpi error=\"%s%s\"\n", ctx.err.msg, m.err.msg);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    moe_rng_seed(&rng, 42);
    for (r = -WARMUP; r < REPS; r++) {
        double t0;
        moe_status st;
        for (i = 0; i <= B * T; i++) inp[i] = (int)(moe_rng_u32(&rng) & 255);
        for (i = 0; i < B * T; i++) tgt[i] = inp[i + 1];
        if (r == 0 && expert_parallel)
            for (l = 0; l < c.n_layers; l++) moved0 += eps[l].rows_sent + eps[l].rows_received;
        MPI_Barrier(MPI_COMM_WORLD);
        t0 = moe_time_seconds();
        moe_store_zero_grad(&m.S);
        st = moe_model_forward(&m, inp + first * T, tgt + first * T, rows, T, NULL);
        if (st == MOE_OK) st = moe_model_backward(&m, 1.0f / (float)ctx.size);
        if (st == MOE_OK) st = moe_mpi_allreduce_grads(&ctx, &m.S);
        if (st == MOE_OK) st = moe_adamw_step(&m.S, &opt, 3e-4f, (long long)(r + WARMUP + 1));
        if (st != MOE_OK) {
            printf("bench=mpi error=\"%s%s\"\n", m.err.msg, ctx.err.msg);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        MPI_Barrier(MPI_COMM_WORLD);
        if (r >= 0) t[r] = moe_time_seconds() - t0;
    }
    if (expert_parallel) {
        /* rows this rank sent and received over the timed steps, summed over the ranks: a row
           sent is a row received, so half the sum is what crossed */
        double mine, all, analytic;
        int d = c.d, n = ctx.size;
        for (l = 0; l < c.n_layers; l++) moved1 += eps[l].rows_sent + eps[l].rows_received;
        mine = (double)(moved1 - moved0);
        MPI_Allreduce(&mine, &all, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        all = all / 2.0 / REPS;
        analytic = 4.0 * B * T * c.moe.top_k * (double)(n - 1) / n * c.n_layers;
        if (ctx.rank == 0)
            printf("bench=mpi mode=ep ranks=%d rows_per_step=%.0f bytes_per_step=%.0f analytic_rows=%.0f analytic_bytes=%.0f ratio=%.3f\n", n, all,
                   all * d * 4.0, analytic, analytic * d * 4.0, all / analytic);
        moe_mpi_experts_model_free(eps, &m);
    } else {
        qsort(t, REPS, sizeof(double), cmp_double);
        if (ctx.rank == 0)
            printf("bench=mpi mode=dp ranks=%d threads=%d tokens=%d median_ms=%.2f tokens_per_s=%.0f\n", ctx.size, moe_num_threads(), B * T,
                   t[REPS / 2] * 1e3, B * T / t[REPS / 2]);
    }
    fflush(stdout);
    moe_mpi_free(&ctx);
    moe_model_free(&m);
    MPI_Finalize();
    return rc;
}

static const char *find_mpirun(void) {
    static char buf[1024];
    const char *env = getenv("MPIRUN"), *path = getenv("PATH");
    if (env && *env) return env;
    while (path && *path) {
        const char *end = strchr(path, ':');
        size_t n = end ? (size_t)(end - path) : strlen(path);
        if (n > 0 && n < sizeof buf - 8) {
            memcpy(buf, path, n);
            strcpy(buf + n, "/mpirun");
            if (access(buf, X_OK) == 0) return buf;
        }
        path = end ? end + 1 : NULL;
    }
    return NULL;
}

/* mpirun -np np self --worker mode, OMP_NUM_THREADS=threads; its lines on stdout; tokens/s back */
static double launch(const char *mpirun, const char *self, int np, int threads, const char *mode) {
    char nps[8], omp[32], line[512];
    const char *argv[12], *log = "build/bench_mpi.log";
    int k = 0, rc;
    double tps = 0.0;
    FILE *f;
    proc_opts o = proc_opts_default();
    snprintf(omp, sizeof omp, "OMP_NUM_THREADS=%d", threads);
    o.env[0] = omp;
    snprintf(nps, sizeof nps, "%d", np);
    argv[k++] = mpirun;
    if (proc_is_root()) argv[k++] = "--allow-run-as-root";
    if (np > 2) argv[k++] = "--oversubscribe";
    argv[k++] = "--bind-to";
    argv[k++] = "none";
    argv[k++] = "-np";
    argv[k++] = nps;
    argv[k++] = self;
    argv[k++] = "--worker";
    argv[k++] = mode;
    argv[k] = NULL;
    rc = proc_runv(&o, log, (const char *const *)argv);
    f = fopen(log, "r");
    while (f && fgets(line, sizeof line, f)) {
        const char *p = strstr(line, "tokens_per_s=");
        if (strncmp(line, "bench=", 6) == 0 || rc != 0) fputs(line, stdout);
        if (p) tps = atof(p + 13);
    }
    if (f) fclose(f);
    if (rc != 0) printf("bench=mpi mode=%s ranks=%d error=\"mpirun exited with status %d\"\n", mode, np, rc);
    fflush(stdout);
    return tps;
}
#endif

int main(int argc, char **argv) {
    int rc;
    flags_program p = flags_program_make("mpi", "data- and expert-parallel training over MPI (bench)",
                                         "No input (random bytes). Starts itself under mpirun. Lines: bench=mpi mode=dp ranks= threads=\n"
                                         "tokens= median_ms= tokens_per_s=; bench=mpi mode=ep ranks= rows_per_step= bytes_per_step=\n"
                                         "analytic_bytes= ratio=; ratio=mpi_dp2_vs_threads2 value=.",
                                         NULL, 0);
#ifdef MOE_MPI
    if (argc == 3 && strcmp(argv[1], "--worker") == 0) return worker(strcmp(argv[2], "ep") == 0);
#endif
    if ((rc = flags_parse(&p, argc, argv)) != FLAGS_RUN) return rc;
#ifdef MOE_MPI
    {
        const char *mpirun = find_mpirun();
        double threads2, ranks2;
        if (!mpirun) {
            printf("bench=mpi skipped=\"mpirun not found\"\n");
            return 0;
        }
        threads2 = launch(mpirun, argv[0], 1, 2, "dp");
        launch(mpirun, argv[0], 1, 1, "dp");
        ranks2 = launch(mpirun, argv[0], 2, 1, "dp");
        if (threads2 > 0 && ranks2 > 0) printf("ratio=mpi_dp2_vs_threads2 value=%.3f\n", ranks2 / threads2);
        launch(mpirun, argv[0], 2, 1, "ep");
        launch(mpirun, argv[0], 4, 1, "ep");
    }
#else
    printf("bench=mpi skipped=\"built without MPI (no mpicc)\"\n");
#endif
    return 0;
}
