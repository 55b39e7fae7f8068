/* test_mpi.c - moe.h section >>moe:mpi: data parallelism against one process (losses,
   gradients, the checkpoint after 20 steps, bit for bit), resume on another rank count,
   expert parallelism against the single-process layer and model, and the errors (ranks that
   disagree, a rank count that does not divide the experts) as a status on every rank.

   Run plainly, the program is the driver: it starts itself under mpirun (-np 2, then
   --oversubscribe -np 4; --allow-run-as-root as root) with --worker and adds up the workers'
   counts. Built without MOE_MPI (no mpicc on the machine) it only says that it skips. */
#define _POSIX_C_SOURCE 200809L
#ifdef MOE_MPI
#define MOE_IMPLEMENTATION
#endif
#include "moe.h"
#include "test.h"
#include "proc.h"

#ifndef MOE_MPI
int main(void) {
    printf("SKIP test_mpi: built without MPI (no mpicc; Debian: apt-get install libopenmpi-dev openmpi-bin)\n");
    return test_summary();
}
#else

#define OUT_DIR "build/tests/mpi"
#define GLOBAL_B 4
#define SEQ 16
#define STEPS 20

static moe_model_config tiny_config(void) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 64;
    c.max_seq = SEQ;
    c.d = 16;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 24;
    c.moe_every = 1;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 12;
    c.moe.z_coef = 1e-3f;
    return c;
}

/* the corpus every rank builds the same way: a noisy repeating pattern the model can learn */
static unsigned char corpus[4096];
static void make_corpus(void) {
    moe_rng r;
    size_t i;
    moe_rng_seed(&r, 7);
    for (i = 0; i < sizeof corpus; i++)
        corpus[i] = (unsigned char)(moe_rng_uniform(&r) < 0.8f ? (int)((i * 7 + i / 13) % 64) : (int)moe_rng_below(&r, 64));
}

typedef struct run {
    moe_model m;
    moe_loader ld;
    double losses[STEPS];
    float *grads1;    /* the reduced gradients of the first step it ran */
    long long step;
} run;

static const moe_adamw_config *adamw(void) {
    static moe_adamw_config a;
    a = moe_adamw_config_default();
    return &a;
}

static void run_init(run *R) {
    static const unsigned char *src[1] = {corpus}; /* the loader borrows these */
    static size_t len[1] = {sizeof corpus};
    moe_model_config c = tiny_config();
    moe_err err;
    memset(R, 0, sizeof *R);
    if (moe_model_init(&R->m, &c, GLOBAL_B, SEQ) != MOE_OK) { printf("init: %s\n", R->m.err.msg); exit(2); }
    moe_model_init_weights(&R->m, 11);
    moe_loader_init(&R->ld, src, len, 1, SEQ, 5, &err);
    R->grads1 = (float *)malloc(sizeof(float) * R->m.S.numel);
}

static void run_free(run *R) {
    moe_model_free(&R->m);
    free(R->grads1);
}

static void optimizer_step(run *R) {
    moe_clip_grad_norm(&R->m.S, 1.0f);
    moe_adamw_step(&R->m.S, adamw(), 3e-3f, R->step + 1);
    R->step++;
}

/* one process: the global batch as n micro-batches, each gradient computed into a zeroed
   buffer and added in micro-batch order (accumulate = 0), or backward's own += (1) */
static void ref_step(run *R, int n, int accumulate, int idx) {
    int in[GLOBAL_B * SEQ], tg[GLOBAL_B * SEQ], k, b = GLOBAL_B / n;
    size_t i, P = R->m.S.numel;
    float *acc = (float *)malloc(sizeof(float) * P);
    double loss = 0.0;
    moe_loader_next(&R->ld, in, tg, NULL, GLOBAL_B, SEQ);
    moe_store_zero_grad(&R->m.S);
    for (k = 0; k < n; k++) {
        if (!accumulate) moe_store_zero_grad(&R->m.S);
        moe_model_forward(&R->m, in + k * b * SEQ, tg + k * b * SEQ, b, SEQ, NULL);
        moe_model_backward(&R->m, 1.0f / (float)n);
        loss += R->m.loss;
        if (!accumulate) {
            if (k == 0) memcpy(acc, R->m.S.grads, sizeof(float) * P);
            else for (i = 0; i < P; i++) acc[i] += R->m.S.grads[i];
        }
    }
    if (!accumulate) memcpy(R->m.S.grads, acc, sizeof(float) * P);
    if (idx == 0) memcpy(R->grads1, R->m.S.grads, sizeof(float) * P);
    free(acc);
    R->losses[idx] = loss / n;
    optimizer_step(R);
}

/* the same step on the ranks of ctx: each rank its rows of the global batch */
static int dp_step(run *R, moe_mpi *ctx, int idx) {
    int in[GLOBAL_B * SEQ], tg[GLOBAL_B * SEQ], first = 0, count = 0;
    double loss;
    moe_loader_next(&R->ld, in, tg, NULL, GLOBAL_B, SEQ); /* every rank draws the global batch */
    if (moe_mpi_share(ctx, GLOBAL_B, &first, &count) != MOE_OK) return 0;
    moe_store_zero_grad(&R->m.S);
    if (moe_model_forward(&R->m, in + first * SEQ, tg + first * SEQ, count, SEQ, NULL) != MOE_OK) return 0;
    if (moe_model_backward(&R->m, 1.0f / (float)ctx->size) != MOE_OK) return 0;
    if (moe_mpi_allreduce_grads(ctx, &R->m.S) != MOE_OK) return 0;
    loss = R->m.loss;
    if (moe_mpi_sum_doubles(ctx, &loss, 1) != MOE_OK) return 0;
    if (idx == 0) memcpy(R->grads1, R->m.S.grads, sizeof(float) * R->m.S.numel);
    R->losses[idx] = loss / ctx->size;
    optimizer_step(R);
    return 1;
}

static int same_floats(const float *a, const float *b, size_t n) { return memcmp(a, b, sizeof(float) * n) == 0; }

static int files_equal(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int ca, cb, eq = fa && fb;
    while (eq) {
        ca = fgetc(fa);
        cb = fgetc(fb);
        if (ca != cb) eq = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return eq;
}

/* rank 0 of ctx saves, every rank learns the outcome */
static moe_status save_on_root(moe_mpi *ctx, run *R, const char *path) {
    moe_err err;
    moe_status st = MOE_OK;
    moe_loader_state ls;
    memset(&err, 0, sizeof err);
    ls.rng = R->ld.rng;
    ls.batches = R->ld.batches;
    if (ctx->rank == 0) st = moe_model_save(&R->m, path, 1, R->step, &ls, sizeof ls, &err);
    return moe_mpi_root_status(ctx, st, &err);
}

static int load_run(run *R, const char *path) {
    moe_loader_state ls;
    moe_err err;
    moe_model_free(&R->m);
    if (moe_model_load(&R->m, path, GLOBAL_B, SEQ, &R->step, &ls, sizeof ls, &err) != MOE_OK) {
        printf("load %s: %s\n", path, err.msg);
        return 0;
    }
    R->ld.rng = ls.rng;
    R->ld.batches = ls.batches;
    return 1;
}

/* data parallel on ctx (n ranks) against one process with n micro-batches */
static void test_data_parallel(moe_mpi *ctx, int world_rank) {
    run ref, acc, dp;
    char p_dp[256], p_ref[256];
    int s, ok = 1;
    double worst = 0.0;
    size_t i;
    run_init(&ref);
    run_init(&acc);
    run_init(&dp);
    for (s = 0; s < STEPS; s++) {
        ref_step(&ref, ctx->size, 0, s);
        ref_step(&acc, ctx->size, 1, s);
        ok &= dp_step(&dp, ctx, s);
    }
    CHECK(ok, "data parallel on %d ranks: a step failed: %s", ctx->size, ctx->err.msg);
    for (s = 0; s < STEPS; s++) ok &= dp.losses[s] == ref.losses[s];
    CHECK(ok, "%d ranks: every step's loss equals one process's bit for bit (first %.9g vs %.9g)", ctx->size, dp.losses[0], ref.losses[0]);
    CHECK(same_floats(dp.grads1, ref.grads1, dp.m.S.numel), "%d ranks: the reduced gradients equal one process's micro-batch sum bit for bit", ctx->size);
    /* backward's own += over micro-batches: the same sum associated differently */
    for (i = 0; i < dp.m.S.numel; i++) {
        double d = fabs((double)dp.grads1[i] - acc.grads1[i]) / (fabs((double)acc.grads1[i]) + 1e-6);
        if (d > worst) worst = d;
    }
    CHECK(worst < 1e-4, "%d ranks: gradients within 1e-4 (relative, floor 1e-6) of one process accumulating with +=: worst %.3g", ctx->size, worst);
    CHECK(fabs(dp.losses[STEPS - 1] - acc.losses[STEPS - 1]) < 1e-3, "%d ranks: the 20th loss within 1e-3 of the += run (%.6f vs %.6f)", ctx->size,
          dp.losses[STEPS - 1], acc.losses[STEPS - 1]);
    CHECK(dp.losses[STEPS - 1] < dp.losses[0] - 0.1, "%d ranks: it learns (loss %.3f -> %.3f)", ctx->size, dp.losses[0], dp.losses[STEPS - 1]);
    CHECK(same_floats(dp.m.S.params, ref.m.S.params, dp.m.S.numel) && same_floats(dp.m.S.adam_m, ref.m.S.adam_m, dp.m.S.numel) &&
              same_floats(dp.m.S.adam_v, ref.m.S.adam_v, dp.m.S.numel),
          "%d ranks: parameters and Adam moments after %d steps equal one process's bit for bit", ctx->size, STEPS);
    /* checkpoints: rank 0 of ctx writes; a single process writes its own; same bytes. The
       names carry the world rank of ctx's rank 0 (two groups may run this at once) */
    MPI_Bcast(&world_rank, 1, MPI_INT, 0, ctx->comm);
    snprintf(p_dp, sizeof p_dp, OUT_DIR "/dp%d_w%d.ckpt", ctx->size, world_rank);
    snprintf(p_ref, sizeof p_ref, OUT_DIR "/ref%d_w%d.ckpt", ctx->size, world_rank);
    CHECK(save_on_root(ctx, &dp, p_dp) == MOE_OK, "%d ranks: rank 0 saves the checkpoint", ctx->size);
    if (ctx->rank == 0) {
        moe_err err;
        moe_loader_state ls;
        ls.rng = ref.ld.rng;
        ls.batches = ref.ld.batches;
        CHECK(moe_model_save(&ref.m, p_ref, 1, ref.step, &ls, sizeof ls, &err) == MOE_OK, "one process saves: %s", err.msg);
        CHECK(files_equal(p_dp, p_ref), "%d ranks: the checkpoint after %d steps is byte for byte one process's", ctx->size, STEPS);
    }
    MPI_Barrier(ctx->comm);
    {   /* every rank loads rank 0's file as a single process would */
        run back;
        run_init(&back);
        CHECK(load_run(&back, p_dp) && back.step == STEPS && same_floats(back.m.S.params, ref.m.S.params, ref.m.S.numel),
              "%d ranks: a single process loads the checkpoint (step %lld)", ctx->size, back.step);
        run_free(&back);
    }
    run_free(&ref);
    run_free(&acc);
    run_free(&dp);
}

/* 10 steps on `half` (its own rank count), a checkpoint, 10 more on `all`; one process does
   the same with the matching micro-batch counts */
static void test_resume_other_count(moe_mpi *half, moe_mpi *all, int world_rank) {
    run ref, dp;
    char path[256];
    int s, ok = 1;
    run_init(&ref);
    run_init(&dp);
    for (s = 0; s < STEPS; s++) ref_step(&ref, s < STEPS / 2 ? half->size : all->size, 0, s);
    for (s = 0; s < STEPS / 2; s++) ok &= dp_step(&dp, half, s);
    /* each group's rank 0 writes its own file; every rank resumes from group 0's */
    snprintf(path, sizeof path, OUT_DIR "/resume_%d_to_%d_w%d.ckpt", half->size, all->size, world_rank);
    ok &= save_on_root(half, &dp, path) == MOE_OK;
    if (world_rank == 0) printf("   resume: %d ranks wrote %s, %d ranks continue\n", half->size, path, all->size);
    snprintf(path, sizeof path, OUT_DIR "/resume_%d_to_%d_w0.ckpt", half->size, all->size);
    MPI_Barrier(all->comm);
    ok &= load_run(&dp, path);
    for (s = STEPS / 2; s < STEPS && ok; s++) ok &= dp_step(&dp, all, s);
    CHECK(ok, "resume from %d ranks on %d ranks: every step runs", half->size, all->size);
    CHECK(ok && dp.step == STEPS && same_floats(dp.m.S.params, ref.m.S.params, ref.m.S.numel) &&
              same_floats(dp.m.S.adam_v, ref.m.S.adam_v, ref.m.S.numel) && dp.losses[STEPS - 1] == ref.losses[STEPS - 1],
          "%d ranks, checkpoint, %d ranks: parameters, moments and loss of one process bit for bit", half->size, all->size);
    run_free(&ref);
    run_free(&dp);
}

/* expert parallelism of one layer: every rank its own tokens; one process runs every rank's
   tokens through the same layer in rank order */
static void test_expert_parallel_layer(moe_mpi *ctx, moe_router_kind router, float capacity, const char *name) {
    enum { T = 24, D = 16 };
    moe_layer_config c = moe_layer_config_default();
    moe_layer L, R;
    moe_store S, SR;
    moe_mpi_experts ep;
    moe_rng rng;
    float x[T * D], dy[T * D], y[T * D], dx[T * D], yr[T * D], dxr[T * D], noise[T * 8];
    moe_layer_args a = moe_layer_args_default();
    int r, ok, dropped = 0, dropped_ref = 0;
    c.d = D;
    c.d_ff = 20;
    c.n_experts = 8;
    c.top_k = 2;
    c.router = router;
    c.capacity_factor = capacity;
    c.router_init_std = 0.5f;
    c.z_coef = 1e-3f;
    moe_store_init(&S);
    moe_store_init(&SR);
    ok = moe_layer_init(&L, &c, &S, "l.", T) == MOE_OK && moe_store_alloc(&S, 1) == MOE_OK &&
         moe_layer_init(&R, &c, &SR, "l.", T) == MOE_OK && moe_store_alloc(&SR, 1) == MOE_OK;
    CHECK(ok, "%s: layers built", name);
    if (!ok) return;
    moe_rng_seed(&rng, 3);
    moe_layer_init_weights(&L, &S, &rng);
    memcpy(SR.params, S.params, sizeof(float) * S.numel);
    CHECK(moe_mpi_experts_init(&ep, ctx, &L) == MOE_OK, "%s: experts split over %d ranks: %s", name, ctx->size, ep.err.msg);
    if (router == MOE_ROUTER_NOISY_TOPK) a.noise = noise;
    /* one process: every rank's tokens in rank order, gradients accumulated */
    for (r = 0; r < ctx->size; r++) {
        int i;
        moe_rng_seed(&rng, 100 + (uint64_t)r);
        for (i = 0; i < T * D; i++) { x[i] = moe_rng_normal(&rng); dy[i] = 0.1f * moe_rng_normal(&rng); }
        for (i = 0; i < T * 8; i++) noise[i] = moe_rng_normal(&rng);
        moe_layer_forward(&R, &SR, y, x, T, &a);
        memset(dx, 0, sizeof dx);
        moe_layer_backward(&R, &SR, dx, dy, x, &a);
        if (r == ctx->rank) {
            memcpy(yr, y, sizeof y);
            memcpy(dxr, dx, sizeof dx);
            dropped_ref = R.routed.offset[c.n_experts];
        }
    }
    /* the ranks: their own tokens, the experts' rows exchanged */
    moe_rng_seed(&rng, 100 + (uint64_t)ctx->rank);
    for (r = 0; r < T * D; r++) { x[r] = moe_rng_normal(&rng); dy[r] = 0.1f * moe_rng_normal(&rng); }
    for (r = 0; r < T * 8; r++) noise[r] = moe_rng_normal(&rng);
    ok = moe_layer_forward(&L, &S, y, x, T, &a) == MOE_OK;
    memset(dx, 0, sizeof dx);
    ok = ok && moe_layer_backward(&L, &S, dx, dy, x, &a) == MOE_OK;
    ok = ok && moe_mpi_allreduce_grads(ctx, &S) == MOE_OK;
    CHECK(ok, "%s: expert-parallel forward, backward and reduction run: %s", name, L.err.msg);
    dropped = L.routed.offset[c.n_experts];
    CHECK(dropped == dropped_ref, "%s: the same assignments survive capacity (%d vs %d)", name, dropped, dropped_ref);
    check_close("expert-parallel y", y, yr, T * D, 1e-6, 1e-5);
    check_close("expert-parallel dx", dx, dxr, T * D, 1e-6, 1e-5);
    check_close("expert-parallel parameter gradients", S.grads, SR.grads, S.numel, 1e-6, 1e-4);
    {   /* the bytes: this rank's assignments to other ranks' experts, each row moved 4 times
           (there and back, forward and backward); what one rank sends another receives */
        int e, out = 0;
        long long sums[2], all[2];
        for (e = 0; e < c.n_experts; e++)
            if (e < ep.e_first || e >= ep.e_first + ep.e_count) out += L.routed.offset[e + 1] - L.routed.offset[e];
        sums[0] = ep.rows_sent;
        sums[1] = ep.rows_received;
        MPI_Allreduce(sums, all, 2, MPI_LONG_LONG, MPI_SUM, ctx->comm);
        CHECK(out > 0 && ep.rows_out == out && ep.rows_sent == 2 * ((long long)ep.rows_out + ep.rows_in) && all[0] == all[1],
              "%s: rows across ranks as counted from the assignment list (%d out, %d in, %lld sent, %lld received)", name, out, ep.rows_in,
              ep.rows_sent, ep.rows_received);
    }
    moe_mpi_experts_free(&ep);
    CHECK(L.runner == NULL, "%s: free detaches the layer", name);
    moe_layer_free(&L);
    moe_layer_free(&R);
    moe_store_free(&S);
    moe_store_free(&SR);
}

/* the model with expert-parallel MoE layers and data parallelism elsewhere against one process */
static void test_expert_parallel_model(moe_mpi *ctx) {
    run ref, ep;
    moe_mpi_experts eps[2];
    int s, ok = 1;
    double worst = 0.0;
    run_init(&ref);
    run_init(&ep);
    CHECK(moe_mpi_experts_model_init(eps, ctx, &ep.m) == MOE_OK, "model: experts split over %d ranks: %s", ctx->size, ep.m.err.msg);
    for (s = 0; s < 5; s++) {
        ref_step(&ref, ctx->size, 0, s);
        ok &= dp_step(&ep, ctx, s);
        if (fabs(ep.losses[s] - ref.losses[s]) > worst) worst = fabs(ep.losses[s] - ref.losses[s]);
    }
    CHECK(ok, "model: expert-parallel steps run");
    CHECK(worst < 1e-5, "model: 5 expert-parallel steps' losses within 1e-5 of one process (worst %.3g)", worst);
    check_close("model: expert-parallel gradients of the first step", ep.grads1, ref.grads1, ref.m.S.numel, 1e-6, 1e-4);
    moe_mpi_experts_model_free(eps, &ep.m);
    run_free(&ref);
    run_free(&ep);
}

static void test_errors(moe_mpi *ctx) {
    moe_model m;
    moe_model_config c = tiny_config();
    moe_layer L;
    moe_layer_config lc = moe_layer_config_default();
    moe_store S;
    moe_mpi_experts ep;
    int first, count;
    /* rank 1 has another width: every rank hears about it, nobody waits */
    if (ctx->rank == 1) c.d = 24;
    CHECK(moe_model_init(&m, &c, 1, SEQ) == MOE_OK, "errors: model built");
    CHECK(moe_mpi_check_model(ctx, &m) == MOE_ERR_INVALID_ARG && strstr(ctx->err.msg, "rank 1's model config differs"),
          "ranks that disagree on the config: a sentence on every rank (\"%s\")", ctx->err.msg);
    moe_model_free(&m);
    /* experts the rank count does not divide */
    lc.d = 8;
    lc.d_ff = 8;
    lc.n_experts = ctx->size + 1;
    moe_store_init(&S);
    CHECK(moe_layer_init(&L, &lc, &S, "", 4) == MOE_OK && moe_store_alloc(&S, 0) == MOE_OK, "errors: layer built");
    CHECK(moe_mpi_experts_init(&ep, ctx, &L) == MOE_ERR_INVALID_ARG && strstr(ep.err.msg, "do not divide") && L.runner == NULL,
          "%d experts on %d ranks: a sentence on every rank (\"%s\")", lc.n_experts, ctx->size, ep.err.msg);
    moe_layer_free(&L);
    moe_store_free(&S);
    CHECK(moe_mpi_share(ctx, ctx->size + 1, &first, &count) == MOE_ERR_INVALID_ARG, "a batch the ranks cannot share evenly: %s", ctx->err.msg);
    {   /* the communicator returns errors: a bad root is a status, not an abort */
        int eh_ok = 0;
        MPI_Errhandler eh;
        if (MPI_Comm_get_errhandler(ctx->comm, &eh) == MPI_SUCCESS) {
            eh_ok = eh == MPI_ERRORS_RETURN;
            MPI_Errhandler_free(&eh);
        }
        CHECK(eh_ok, "the library's communicator returns MPI errors");
    }
}

static int worker(void) {
    moe_mpi world, half, self;
    MPI_Comm half_comm;
    int wr, ws, failed, passed;
    MPI_Init(NULL, NULL);
    MPI_Comm_rank(MPI_COMM_WORLD, &wr);
    MPI_Comm_size(MPI_COMM_WORLD, &ws);
    make_corpus();
    if (wr == 0) mkdir(OUT_DIR, 0755);
    {
        run probe;
        run_init(&probe);
        CHECK(moe_mpi_init(&world, MPI_COMM_WORLD, probe.m.S.numel) == MOE_OK, "world context");
        MPI_Comm_split(MPI_COMM_WORLD, wr < ws / 2 ? 0 : 1, wr, &half_comm);
        CHECK(moe_mpi_init(&half, half_comm, probe.m.S.numel) == MOE_OK, "half context");
        CHECK(moe_mpi_init(&self, MPI_COMM_SELF, probe.m.S.numel) == MOE_OK, "single-rank context");
        run_free(&probe);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (wr == 0) TEST_BEGIN("data parallel against one process (world, half, one rank)");
    test_data_parallel(&world, wr);
    if (ws > 1) test_data_parallel(&half, wr);
    test_data_parallel(&self, wr);
    if (wr == 0) TEST_BEGIN("resume on another rank count");
    if (ws > 1) test_resume_other_count(&half, &world, wr);
    if (wr == 0) TEST_BEGIN("expert parallel layer against one process");
    test_expert_parallel_layer(&world, MOE_ROUTER_TOPK, 0.0f, "softmax top-k, dropless");
    test_expert_parallel_layer(&world, MOE_ROUTER_TOPK, 1.0f, "softmax top-k, capacity 1.0 (drops)");
    test_expert_parallel_layer(&world, MOE_ROUTER_SIGMOID, 1.25f, "sigmoid top-k, capacity 1.25");
    test_expert_parallel_layer(&world, MOE_ROUTER_NOISY_TOPK, 0.0f, "noisy top-k");
    test_expert_parallel_layer(&world, MOE_ROUTER_EXPERT_CHOICE, 0.0f, "expert choice");
    if (wr == 0) TEST_BEGIN("expert parallel model against one process");
    test_expert_parallel_model(&world);
    if (wr == 0) TEST_BEGIN("errors: a status on every rank, never a hang");
    if (ws > 1) test_errors(&world);
    moe_mpi_free(&self);
    moe_mpi_free(&half);
    moe_mpi_free(&world);
    MPI_Comm_free(&half_comm);
    /* every rank's counts, summed, printed once */
    MPI_Allreduce(&test_failed_count, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&test_passed_count, &passed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Finalize();
    if (wr == 0) printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}

/* mpirun from $MPIRUN or the PATH */
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

static void launch(const char *mpirun, const char *self, int np) {
    char nps[8], log[128];
    const char *argv[12];
    int k = 0, rc, p = 0, f = 0;
    FILE *lf;
    char line[512];
    proc_opts o = proc_opts_default();
    o.env[0] = "OMP_NUM_THREADS=1";
    /* under the sanitizers, LeakSanitizer would report OpenMPI's own allocations (its plugins
       are unloaded by then, so no suppression can name them): the ranks run without it */
    o.env[1] = "ASAN_OPTIONS=detect_leaks=0";
    snprintf(nps, sizeof nps, "%d", np);
    snprintf(log, sizeof log, OUT_DIR "/np%d.log", np);
    argv[k++] = mpirun;
    if (proc_is_root()) argv[k++] = "--allow-run-as-root";
    if (np > 2) argv[k++] = "--oversubscribe"; /* 4 ranks on fewer cores */
    argv[k++] = "-np";
    argv[k++] = nps;
    argv[k++] = self;
    argv[k++] = "--worker";
    argv[k] = NULL;
    printf("-- mpirun -np %d %s --worker (log %s)\n", np, self, log);
    fflush(stdout);
    rc = proc_runv(&o, log, (const char *const *)argv);
    lf = fopen(log, "r");
    while (lf && fgets(line, sizeof line, lf)) {
        if (sscanf(line, "%d passed, %d failed", &p, &f) == 2) continue;
        if (strncmp(line, "FAIL", 4) == 0 || strncmp(line, "   ", 3) == 0 || rc != 0) fputs(line, stdout);
    }
    if (lf) fclose(lf);
    test_passed_count += p;
    test_failed_count += f;
    CHECK(rc == 0 && p > 0, "mpirun -np %d: exit status %d, %d checks passed on the ranks", np, rc, p);
}

/* the CSV's train_loss column (step rows 1..n) */
static int read_losses(const char *path, double *loss, int n) {
    FILE *f = fopen(path, "r");
    char line[256];
    int k = 0;
    if (!f) return 0;
    if (!fgets(line, sizeof line, f)) k = -1; /* the header */
    while (k >= 0 && k < n && fgets(line, sizeof line, f)) {
        long long step;
        if (sscanf(line, "%lld,%lf", &step, &loss[k]) != 2 || step != k + 1) break;
        k++;
    }
    fclose(f);
    return k == n;
}

/* train_lm on 2 ranks (--data-parallel, --expert-parallel, --batch 4) against one process with
   --batch 2 --accum 2: the same rows in the same micro-batches */
static void test_train_lm(const char *mpirun) {
    const char *one = "build/examples/train_lm", *par = "build/examples/train_lm_mpi";
    const char *common[] = {"--steps", "10", "--seq", "32", "--eval-every", "10", "--eval-batches", "1", "--load-every", "0", "--sample", "0",
                            "--d", "32", "--heads", "2", "--layers", "2", "--experts", "4", "--expert-ff", "32", "--d-ff", "64",
                            "--out", OUT_DIR};
    const int nc = (int)(sizeof common / sizeof common[0]);
    const char *argv[64];
    double ref[10], got[10];
    int k, i, mode;
    proc_opts o = proc_opts_default();
    TEST_BEGIN("train_lm on 2 ranks against one process with the same micro-batches");
    if (access(one, X_OK) != 0 || access(par, X_OK) != 0 || access("data/brown/train/news.txt", R_OK) != 0) {
        printf("SKIP train_lm: needs %s, %s and data/brown (make data)\n", one, par);
        return;
    }
    o.env[0] = "OMP_NUM_THREADS=1";
    k = 0;
    argv[k++] = one;
    for (i = 0; i < nc; i++) argv[k++] = common[i];
    argv[k++] = "--batch"; argv[k++] = "2"; argv[k++] = "--accum"; argv[k++] = "2"; argv[k++] = "--name"; argv[k++] = "lm1";
    argv[k] = NULL;
    CHECK(proc_runv(&o, OUT_DIR "/lm1.log", (const char *const *)argv) == 0 && read_losses(OUT_DIR "/lm1.csv", ref, 10),
          "train_lm, one process, --batch 2 --accum 2 (log " OUT_DIR "/lm1.log)");
    for (mode = 0; mode < 2; mode++) {
        const char *name = mode ? "lm_ep" : "lm_dp";
        char log[128], csv[128];
        double worst = 0.0;
        snprintf(log, sizeof log, OUT_DIR "/%s.log", name);
        snprintf(csv, sizeof csv, OUT_DIR "/%s.csv", name);
        k = 0;
        argv[k++] = mpirun;
        if (proc_is_root()) argv[k++] = "--allow-run-as-root";
        argv[k++] = "-np"; argv[k++] = "2"; argv[k++] = par;
        argv[k++] = mode ? "--expert-parallel" : "--data-parallel";
        for (i = 0; i < nc; i++) argv[k++] = common[i];
        argv[k++] = "--batch"; argv[k++] = "4"; argv[k++] = "--name"; argv[k++] = name;
        argv[k] = NULL;
        CHECK(proc_runv(&o, log, (const char *const *)argv) == 0 && read_losses(csv, got, 10) && proc_log_has(log, "| ranks       | 2, "),
              "mpirun -np 2 train_lm_mpi %s: runs, logs, the settings table names the ranks (log %s)", argv[proc_is_root() ? 5 : 4], log);
        for (i = 0; i < 10; i++)
            if (fabs(got[i] - ref[i]) > worst) worst = fabs(got[i] - ref[i]);
        CHECK(worst < 1e-4, "%s: 10 training losses within 1e-4 of one process's (worst %.3g)", name, worst);
    }
}

int main(int argc, char **argv) {
    const char *mpirun;
    if (argc > 1 && strcmp(argv[1], "--worker") == 0) return worker();
    mpirun = find_mpirun();
    if (!mpirun) {
        printf("SKIP test_mpi: mpirun not found (Debian: apt-get install openmpi-bin)\n");
        return test_summary();
    }
    mkdir("build", 0755);
    mkdir("build/tests", 0755);
    mkdir(OUT_DIR, 0755);
    launch(mpirun, argv[0], 2);
    launch(mpirun, argv[0], 4);
    test_train_lm(mpirun);
    return test_summary();
}
#endif
