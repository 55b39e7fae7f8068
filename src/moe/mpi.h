/* ============================================================================================
   >>moe:mpi  training on several processes: data and expert parallelism over MPI
   ============================================================================================
   Compiled only under MOE_MPI (build with mpicc); without it this part is empty. Everything
   goes through the system's MPI (OpenMPI on Debian): the same program runs on the ranks of one
   machine or of a cluster, mpirun decides which.

   Data parallel. Every rank holds the whole model and takes its share of the global batch
   (moe_mpi_share: rank r the rows [r B/n, (r+1) B/n) of the batch every rank draws from the
   same loader, so the split is disjoint, reproducible and independent of timing). After the
   backward, moe_mpi_allreduce_grads sums the one flat gradient buffer in RANK ORDER,
       g = ((g_0 + g_1) + g_2) + ... + g_{n-1},
   with the same rounding on every rank whatever the timing: MPI_Allreduce's order of
   summation is the implementation's (it may change with the message size, the algorithm
   chosen or the network), so we do not use it for floats. The reduction is a reduce-scatter
   by hand over MPI collectives: MPI_Alltoallv gives rank j slice j of every rank's buffer, rank j
   adds the slices in rank order, MPI_Allgatherv returns the sums (the bandwidth of a ring
   all-reduce, 2 (n-1)/n of the buffer per rank; the arithmetic is ours, the transport MPI's).
   Equal to one process: a single process that computes each micro-batch's gradient into a
   zeroed buffer and adds the buffers in micro-batch order gets the same bits. One that lets
   backward accumulate (+=) every micro-batch into one buffer differs in the last bits only
   where a parameter receives several additions within a micro-batch (a matmul's partial sums
   over depth blocks, an embedding row used by several tokens), which makes the two sums
   associate differently: equal to float tolerance (relative 1e-5 in our tests).
   The optimizer then runs on every rank on the same gradients, so the parameters stay equal
   bit for bit without being sent. Checkpoints are one file written by rank 0 through the
   usual atomic writer; moe_mpi_root_status tells every rank how the write went. A
   single-process run loads it, and a run on any rank count loads a single-process file.

   Expert parallel. The routed experts of a layer are split across the ranks (rank r owns
   experts [r E/n, (r+1) E/n)); each rank routes its own tokens exactly as one process does
   (capacity, drops and every router family that fills the assignment list), then sends
   each gathered row to the rank of its expert and gets the expert's output back: per-expert
   counts first (MPI_Alltoall), then the rows (MPI_Alltoallv); backward sends the output
   gradients the same way and gets the input gradients back. The owner's weight gradients are
   complete (they saw every rank's rows), the other ranks' are zero, so the data-parallel
   reduction above finishes the job for every tensor at once (x + 0 = x exactly). Every rank
   still stores every expert's weights and Adam moments (the flat buffer and the checkpoint
   stay those of one process); what is split is the experts' compute and activations.
   (GShard, arXiv 2006.16668 §2.2-2.3: experts across devices, tokens exchanged all-to-all.)
   AoE's routers, whose experts read the router's low-rank caches, are refused.

   Errors. The communicator is duplicated with MPI_ERRORS_RETURN, so an MPI failure is a status
   with MPI's own sentence. Ranks that disagree on the config (moe_mpi_check_same compares a hash
   of every rank's bytes) or a world size that does not divide the experts give a status on
   EVERY rank, never a hang. A rank that dies: OpenMPI's mpirun ends the whole job. After a
   failed collective the ranks may be out of step: end the program (MPI_Abort), do not retry. */

#ifdef MOE_MPI
#ifdef __cplusplus /* mpi.h brings C++ headers along: outside the declarations' extern "C" */
}
#endif
#ifndef OMPI_SKIP_MPICXX /* the C API only: not OpenMPI's (or MPICH's) old C++ bindings */
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <limits.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_mpi {
    MPI_Comm comm;     /* a duplicate of the caller's communicator, errors returned          */
    int rank, size;
    float *scratch;    /* (n ceil(max_floats / n)) the rank's slice of every rank's buffer  */
    size_t max_floats; /* the largest buffer moe_mpi_allreduce_sum takes                    */
    double *dscratch;  /* (n MOE_MPI_MAX_DOUBLES) moe_mpi_sum_doubles                        */
    unsigned long long *hashes; /* (n) moe_mpi_check_same                                     */
    int *counts;       /* (4 n) the reduction's Alltoallv / Allgatherv counts and offsets      */
    moe_err err;
} moe_mpi;

#define MOE_MPI_MAX_DOUBLES 64

/* Collective over comm (MPI must be initialised). max_floats: the largest buffer to be reduced
   (a store's numel for data parallelism). On failure nothing stays allocated. */
MOEDEF moe_status moe_mpi_init(moe_mpi *ctx, MPI_Comm comm, size_t max_floats);
MOEDEF void moe_mpi_free(moe_mpi *ctx); /* collective (frees the duplicated communicator) */
/* Collective. MOE_OK when every rank passed the same n bytes; else MOE_ERR_INVALID_ARG on every
   rank, naming the first rank that differs from rank 0 and `what`. */
MOEDEF moe_status moe_mpi_check_same(moe_mpi *ctx, const void *bytes, size_t n, const char *what);
/* Collective: the model's config (as its record) and its parameter table on every rank. */
MOEDEF moe_status moe_mpi_check_model(moe_mpi *ctx, const moe_model *m);
/* The rank's contiguous share of n items: [*first, *first + *count). n must be a multiple of
   the rank count (equal shares keep the micro-batches' weights equal). Local, no message. */
MOEDEF moe_status moe_mpi_share(moe_mpi *ctx, int n, int *first, int *count);
/* Collective: buf (n floats, n <= max_floats) = the rank-order sum of every rank's buf, the
   same bits on every rank. */
MOEDEF moe_status moe_mpi_allreduce_sum(moe_mpi *ctx, float *buf, size_t n);
/* Collective: s->grads summed across ranks in rank order (data parallelism's one exchange). */
MOEDEF moe_status moe_mpi_allreduce_grads(moe_mpi *ctx, moe_store *s);
/* Collective: v (n <= MOE_MPI_MAX_DOUBLES) = the rank-order sum of every rank's v (losses). */
MOEDEF moe_status moe_mpi_sum_doubles(moe_mpi *ctx, double *v, int n);
/* Collective: rank 0's status and sentence (in its *err, may be NULL = MOE_OK) on every rank:
   after rank 0 alone wrote a checkpoint. Returns that status; err (may be NULL) gets the
   sentence on the other ranks. */
MOEDEF moe_status moe_mpi_root_status(moe_mpi *ctx, moe_status root_st, moe_err *err);

/* Expert parallelism of one MoE layer. */
typedef struct moe_mpi_experts {
    moe_mpi *mpi;
    moe_layer *L;
    moe_experts_runner runner; /* L->runner points here while attached                      */
    int e_first, e_count;      /* the experts this rank owns                                 */
    int max_rows;              /* rows this rank can receive: n min(L->cap, max_tokens e_count) */
    int *send_rows;            /* (E) rows this rank sends to each expert (the counts sent)    */
    int *recv_rows;            /* (n e_count) rows from source s for owned expert j, [s e_count + j] */
    int *scount, *sdispl, *rcount, *rdispl; /* (n) each: Alltoallv counts in floats          */
    int *offset;               /* (e_count + 1) the owned experts' rows in expert-major order  */
    float *rbuf;               /* (max_rows, d) rows in source-major order, as MPI moves them  */
    float *xg, *eout, *dout, *dxg; /* (max_rows, d) the owned experts' rows, expert-major      */
    float *hg, *hu, *scratch1, *scratch2; /* (max_rows, D) caches and backward scratch        */
    moe_work work;
    int rows_out, rows_in;     /* the last forward's rows to / from OTHER ranks per exchange  */
    long long rows_sent, rows_received; /* rows sent to / received from OTHER ranks over every
                                           exchange: rows there and outputs back (forward),
                                           output gradients there, input gradients back    */
    moe_err err;
} moe_mpi_experts;

/* Collective. Splits L's routed experts over the ranks and attaches (L->runner): from now on
   L's forward and backward exchange rows with the other ranks, so every rank must call them
   the same number of times in the same order. L must be initialised (moe_layer_init or a
   model's block) for the tokens of one rank. MOE_ERR_INVALID_ARG on every rank when the rank
   count does not divide the experts, the ranks' layers differ, or the router is AoE. */
MOEDEF moe_status moe_mpi_experts_init(moe_mpi_experts *ep, moe_mpi *ctx, moe_layer *L);
MOEDEF void moe_mpi_experts_free(moe_mpi_experts *ep); /* detaches L->runner */
/* Every MoE layer of the model: eps (n_layers entries, the dense blocks' left zeroed). */
MOEDEF moe_status moe_mpi_experts_model_init(moe_mpi_experts *eps, moe_mpi *ctx, moe_model *m);
MOEDEF void moe_mpi_experts_model_free(moe_mpi_experts *eps, moe_model *m);
#endif /* MOE_MPI */

/* @implementation */
/* ============================================================================================
   >>moe:mpi
   ============================================================================================ */
#ifdef MOE_MPI

static moe_status moe__mpi_fail(moe_err *err, int code, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(code, msg, &len) != MPI_SUCCESS) len = 0;
    msg[len < MPI_MAX_ERROR_STRING ? len : MPI_MAX_ERROR_STRING - 1] = '\0';
    return moe_err_set(err, MOE_ERR_IO, "%s failed: %s", what, len ? msg : "unknown MPI error");
}
#define MOE__MPI(err, call) do { int moe__rc = (call); if (moe__rc != MPI_SUCCESS) return moe__mpi_fail(err, moe__rc, #call); } while (0)

MOE__IMPL void moe_mpi_free(moe_mpi *ctx) {
    MOE_FREE(ctx->scratch);
    MOE_FREE(ctx->dscratch);
    MOE_FREE(ctx->hashes);
    MOE_FREE(ctx->counts);
    ctx->scratch = NULL;
    ctx->dscratch = NULL;
    ctx->hashes = NULL;
    ctx->counts = NULL;
    if (ctx->comm != MPI_COMM_NULL) MPI_Comm_free(&ctx->comm);
    ctx->comm = MPI_COMM_NULL;
}

MOE__IMPL moe_status moe_mpi_init(moe_mpi *ctx, MPI_Comm comm, size_t max_floats) {
    size_t slice;
    int ok;
    memset(ctx, 0, sizeof *ctx);
    ctx->comm = MPI_COMM_NULL;
    MOE__MPI(&ctx->err, MPI_Comm_dup(comm, &ctx->comm));
    MOE__MPI(&ctx->err, MPI_Comm_set_errhandler(ctx->comm, MPI_ERRORS_RETURN));
    MOE__MPI(&ctx->err, MPI_Comm_rank(ctx->comm, &ctx->rank));
    MOE__MPI(&ctx->err, MPI_Comm_size(ctx->comm, &ctx->size));
    slice = (max_floats + (size_t)ctx->size - 1) / (size_t)ctx->size;
    if (slice > (size_t)INT_MAX) {
        moe_mpi_free(ctx);
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "a buffer of %zu floats over %d ranks makes slices beyond MPI's int counts", max_floats, ctx->size);
    }
    ctx->max_floats = max_floats;
    ok = MOE__ALLOC(ctx->scratch, slice * (size_t)ctx->size + 1, float) &&
         MOE__ALLOC(ctx->dscratch, (size_t)ctx->size * MOE_MPI_MAX_DOUBLES, double) &&
         MOE__ALLOC(ctx->hashes, ctx->size, unsigned long long) && MOE__ALLOC(ctx->counts, (size_t)ctx->size * 4, int);
    if (!ok) {
        moe_mpi_free(ctx);
        return moe_err_set(&ctx->err, MOE_ERR_NOMEM, "out of memory for the reduction buffer (%zu floats)", max_floats);
    }
    return MOE_OK;
}

/* FNV-1a, 64 bits, over the length and the bytes */
static uint64_t moe__mpi_hash(const void *bytes, size_t n) {
    const unsigned char *p = (const unsigned char *)bytes;
    uint64_t h = 1469598103934665603ull, len = (uint64_t)n;
    size_t i;
    for (i = 0; i < 8; i++) h = (h ^ ((len >> (8 * i)) & 0xff)) * 1099511628211ull;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

MOE__IMPL moe_status moe_mpi_check_same(moe_mpi *ctx, const void *bytes, size_t n, const char *what) {
    unsigned long long mine = (unsigned long long)moe__mpi_hash(bytes, n), *all = ctx->hashes;
    int r;
    MOE__MPI(&ctx->err, MPI_Allgather(&mine, 1, MPI_UNSIGNED_LONG_LONG, all, 1, MPI_UNSIGNED_LONG_LONG, ctx->comm));
    for (r = 1; r < ctx->size; r++)
        if (all[r] != all[0])
            return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "rank %d's %s differs from rank 0's: every rank must run with the same settings",
                               r, what ? what : "data");
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_check_model(moe_mpi *ctx, const moe_model *m) {
    unsigned char rec[8192];
    size_t len = 0;
    int nf = 0;
    uint64_t fp = moe_store_fingerprint(&m->S);
    const moe_field *f = moe_model_config_fields(&nf);
    moe_status st = moe_record_write(rec, sizeof rec, &len, &m->cfg, NULL, f, nf, &ctx->err);
    if (st != MOE_OK) len = 0; /* still take part in the collectives below */
    if (moe_mpi_check_same(ctx, rec, len, "model config") != MOE_OK) return ctx->err.status;
    if (moe_mpi_check_same(ctx, &fp, sizeof fp, "parameter table") != MOE_OK) return ctx->err.status;
    return st;
}

MOE__IMPL moe_status moe_mpi_share(moe_mpi *ctx, int n, int *first, int *count) {
    *first = *count = 0;
    if (n <= 0 || n % ctx->size != 0)
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "%d items do not split evenly over %d ranks (give a multiple of the rank count)", n, ctx->size);
    *count = n / ctx->size;
    *first = ctx->rank * *count;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_allreduce_sum(moe_mpi *ctx, float *buf, size_t n) {
    int P = ctx->size, me = ctx->rank, r, *cnt, *dsp;
    size_t slice, i, mine;
    float *acc;
    if (n > ctx->max_floats)
        return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "allreduce of %zu floats, the context was sized for %zu", n, ctx->max_floats);
    if (P == 1 || n == 0) return MOE_OK;
    /* rank r owns the slice [r slice, (r+1) slice) of the buffer */
    slice = (n + (size_t)P - 1) / (size_t)P;
    cnt = ctx->counts;
    dsp = cnt + P;
    for (r = 0; r < P; r++) {
        size_t lo = (size_t)r * slice, hi = lo + slice;
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        cnt[r] = (int)(hi - lo);
        dsp[r] = (int)lo;
    }
    mine = (size_t)cnt[me];
    {
        int *rcnt = cnt + 2 * P, *rdsp = cnt + 3 * P, rc;
        for (r = 0; r < P; r++) { rcnt[r] = (int)mine; rdsp[r] = (int)(mine * (size_t)r); }
        /* rank r's slice `me` lands at scratch[r * mine] */
        rc = MPI_Alltoallv(buf, cnt, dsp, MPI_FLOAT, ctx->scratch, rcnt, rdsp, MPI_FLOAT, ctx->comm);
        if (rc != MPI_SUCCESS) return moe__mpi_fail(&ctx->err, rc, "MPI_Alltoallv (gradient slices)");
        /* the fixed order: ((g_0 + g_1) + g_2) + ..., element by element */
        acc = ctx->scratch;
        for (r = 1; r < P; r++) {
            const float *g = ctx->scratch + (size_t)r * mine;
            for (i = 0; i < mine; i++) acc[i] += g[i];
        }
        rc = MPI_Allgatherv(acc, (int)mine, MPI_FLOAT, buf, cnt, dsp, MPI_FLOAT, ctx->comm);
        if (rc != MPI_SUCCESS) return moe__mpi_fail(&ctx->err, rc, "MPI_Allgatherv (summed slices)");
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_allreduce_grads(moe_mpi *ctx, moe_store *s) {
    if (!s || !s->allocated || !s->grads) return moe_err_set(&ctx->err, MOE_ERR_STATE, "allreduce_grads needs an allocated store");
    return moe_mpi_allreduce_sum(ctx, s->grads, s->numel);
}

MOE__IMPL moe_status moe_mpi_sum_doubles(moe_mpi *ctx, double *v, int n) {
    int r, i;
    if (n < 0 || n > MOE_MPI_MAX_DOUBLES) return moe_err_set(&ctx->err, MOE_ERR_INVALID_ARG, "sum_doubles takes 0..%d values, got %d", MOE_MPI_MAX_DOUBLES, n);
    if (n == 0) return MOE_OK;
    MOE__MPI(&ctx->err, MPI_Allgather(v, n, MPI_DOUBLE, ctx->dscratch, n, MPI_DOUBLE, ctx->comm));
    for (i = 0; i < n; i++) {
        double acc = ctx->dscratch[i];
        for (r = 1; r < ctx->size; r++) acc += ctx->dscratch[(size_t)r * n + i];
        v[i] = acc;
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_root_status(moe_mpi *ctx, moe_status root_st, moe_err *err) {
    struct { int status; char msg[sizeof ((moe_err *)0)->msg]; } pkt;
    memset(&pkt, 0, sizeof pkt);
    if (ctx->rank == 0) {
        pkt.status = (int)root_st;
        if (root_st != MOE_OK && err) memcpy(pkt.msg, err->msg, sizeof pkt.msg);
    }
    MOE__MPI(&ctx->err, MPI_Bcast(&pkt, (int)sizeof pkt, MPI_BYTE, 0, ctx->comm));
    pkt.msg[sizeof pkt.msg - 1] = '\0';
    if (ctx->rank != 0 && err) {
        err->status = (moe_status)pkt.status;
        memcpy(err->msg, pkt.msg, sizeof pkt.msg);
    }
    return (moe_status)pkt.status;
}

/* ---- expert parallelism ---- */

MOE__IMPL void moe_mpi_experts_free(moe_mpi_experts *ep) {
    int **ip[] = {&ep->send_rows, &ep->recv_rows, &ep->scount, &ep->sdispl, &ep->rcount, &ep->rdispl, &ep->offset};
    float **fp[] = {&ep->rbuf, &ep->xg, &ep->eout, &ep->dout, &ep->dxg, &ep->hg, &ep->hu, &ep->scratch1, &ep->scratch2};
    size_t i;
    if (ep->L && ep->L->runner == &ep->runner) ep->L->runner = NULL;
    for (i = 0; i < sizeof ip / sizeof ip[0]; i++) { MOE_FREE(*ip[i]); *ip[i] = NULL; }
    for (i = 0; i < sizeof fp / sizeof fp[0]; i++) { MOE_FREE(*fp[i]); *fp[i] = NULL; }
    moe_work_free(&ep->work);
    ep->L = NULL;
}

/* the Alltoallv counts (in floats) of the rows this rank sends (send_rows by owner) and
   receives (recv_rows by source), and the owned experts' expert-major offsets */
static moe_status moe__ep_counts(moe_mpi_experts *ep, int d) {
    int P = ep->mpi->size, Ec = ep->e_count, q, j, s, acc = 0;
    long long rows = 0;
    ep->rows_out = ep->rows_in = 0;
    for (q = 0; q < P; q++) {
        int n = 0;
        for (j = 0; j < Ec; j++) n += ep->send_rows[q * Ec + j];
        ep->scount[q] = n * d;
        ep->sdispl[q] = acc * d;
        acc += n;
        if (q != ep->mpi->rank) ep->rows_out += n;
    }
    acc = 0;
    for (s = 0; s < P; s++) {
        int n = 0;
        for (j = 0; j < Ec; j++) n += ep->recv_rows[s * Ec + j];
        ep->rcount[s] = n * d;
        ep->rdispl[s] = acc * d;
        acc += n;
        if (s != ep->mpi->rank) ep->rows_in += n;
    }
    rows = acc;
    if (rows > ep->max_rows) /* cannot happen for a router that sends a token to an expert once */
        return moe_err_set(&ep->err, MOE_ERR_SHAPE, "expert parallelism: %lld rows arrived, the buffers hold %d", rows, ep->max_rows);
    ep->offset[0] = 0;
    for (j = 0; j < Ec; j++) {
        int n = 0;
        for (s = 0; s < P; s++) n += ep->recv_rows[s * Ec + j];
        ep->offset[j + 1] = ep->offset[j] + n;
    }
    return MOE_OK;
}

/* MPI delivers the rows source-major (source s, then owned expert j: each source's block in
   rank order); the experts read them expert-major (expert j, then source s). to_expert = 1
   copies source_major into expert_major, 0 the other way. */
static void moe__ep_permute(moe_mpi_experts *ep, float *expert_major, float *source_major, int d, int to_expert) {
    int P = ep->mpi->size, Ec = ep->e_count, s, j, s2;
    for (s = 0; s < P; s++) {
        int at_source = ep->rdispl[s] / d;
        for (j = 0; j < Ec; j++) {
            int n = ep->recv_rows[s * Ec + j], at_expert = ep->offset[j];
            for (s2 = 0; s2 < s; s2++) at_expert += ep->recv_rows[s2 * Ec + j];
            if (n > 0) {
                float *e = expert_major + (size_t)at_expert * d, *r = source_major + (size_t)at_source * d;
                size_t bytes = sizeof(float) * (size_t)n * d;
                if (to_expert) memcpy(e, r, bytes);
                else memcpy(r, e, bytes);
            }
            at_source += n;
        }
    }
}

static moe_expert_weights moe__ep_weights(moe_mpi_experts *ep, const moe_store *s, int grads) {
    const moe_layer_config *c = &ep->L->cfg;
    moe_expert_weights w = moe_layer_experts(ep->L, s, 0, grads);
    size_t e0 = (size_t)ep->e_first, d = (size_t)c->d, D = (size_t)c->d_ff;
    if (w.gate) w.gate += e0 * D * d;
    w.up += e0 * D * d;
    w.down += e0 * d * D;
    if (w.b_up) w.b_up += e0 * D;
    if (w.b_down) w.b_down += e0 * d;
    return w;
}

static moe_status moe__ep_forward(moe_layer *L, const moe_store *s, void *user) {
    moe_mpi_experts *ep = (moe_mpi_experts *)user;
    const moe_layer_config *c = &L->cfg;
    int E = c->n_experts, e, rc;
    moe_expert_weights w = moe__ep_weights(ep, s, 0);
    moe_status st;
    for (e = 0; e < E; e++) ep->send_rows[e] = L->routed.offset[e + 1] - L->routed.offset[e];
    /* counts first: rank q learns how many rows of each of its experts every rank sends */
    rc = MPI_Alltoall(ep->send_rows, ep->e_count, MPI_INT, ep->recv_rows, ep->e_count, MPI_INT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    if ((st = moe__ep_counts(ep, c->d)) != MOE_OK) goto fail;
    /* then the rows: the list is sorted by expert and each rank owns a run of experts, so the
       rows for rank q are one contiguous block of L->xg */
    rc = MPI_Alltoallv(L->xg, ep->scount, ep->sdispl, MPI_FLOAT, ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    moe__ep_permute(ep, ep->xg, ep->rbuf, c->d, 1);
    st = moe_experts_forward(ep->eout, ep->hg, ep->hu, ep->xg, &w, ep->offset, ep->e_count, c->d, c->d_ff, c->expert, c->activation, &ep->work);
    if (st != MOE_OK) { moe_err_set(&ep->err, st, "expert parallelism: the experts' forward failed (%s)", moe_status_string(st)); goto fail; }
    moe__ep_permute(ep, ep->eout, ep->rbuf, c->d, 0);
    rc = MPI_Alltoallv(ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, L->eout, ep->scount, ep->sdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    ep->rows_sent += (long long)ep->rows_out + ep->rows_in; /* the rows there, the outputs back */
    ep->rows_received += (long long)ep->rows_in + ep->rows_out;
    return MOE_OK;
mpi_fail:
    st = moe__mpi_fail(&ep->err, rc, "expert parallelism's all-to-all (forward)");
fail:
    L->err = ep->err;
    return st;
}

static moe_status moe__ep_backward(moe_layer *L, moe_store *s, void *user) {
    moe_mpi_experts *ep = (moe_mpi_experts *)user;
    const moe_layer_config *c = &L->cfg;
    moe_expert_weights w = moe__ep_weights(ep, s, 0), gw = moe__ep_weights(ep, s, 1);
    moe_status st;
    int rc;
    /* the forward's counts still hold: the output gradients go where the rows went */
    rc = MPI_Alltoallv(L->deout, ep->scount, ep->sdispl, MPI_FLOAT, ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    moe__ep_permute(ep, ep->dout, ep->rbuf, c->d, 1);
    st = moe_experts_backward(ep->dxg, &gw, ep->dout, ep->xg, ep->hg, ep->hu, &w, ep->offset, ep->e_count, c->d, c->d_ff,
                              c->expert, c->activation, ep->scratch1, ep->scratch2, &ep->work);
    if (st != MOE_OK) { moe_err_set(&ep->err, st, "expert parallelism: the experts' backward failed (%s)", moe_status_string(st)); goto fail; }
    moe__ep_permute(ep, ep->dxg, ep->rbuf, c->d, 0);
    rc = MPI_Alltoallv(ep->rbuf, ep->rcount, ep->rdispl, MPI_FLOAT, L->dxg, ep->scount, ep->sdispl, MPI_FLOAT, ep->mpi->comm);
    if (rc != MPI_SUCCESS) goto mpi_fail;
    ep->rows_sent += (long long)ep->rows_out + ep->rows_in; /* the forward's rows again */
    ep->rows_received += (long long)ep->rows_in + ep->rows_out;
    return MOE_OK;
mpi_fail:
    st = moe__mpi_fail(&ep->err, rc, "expert parallelism's all-to-all (backward)");
fail:
    L->err = ep->err;
    return st;
}

MOE__IMPL moe_status moe_mpi_experts_init(moe_mpi_experts *ep, moe_mpi *ctx, moe_layer *L) {
    const moe_layer_config *c = &L->cfg;
    int P = ctx->size, E = c->n_experts, d = c->d, D = c->d_ff, shape[6], ok, per_src;
    size_t rows;
    memset(ep, 0, sizeof *ep);
    ep->mpi = ctx;
    /* every rank's layer must have the same experts before anything is split (an
       uninitialised layer takes part with shape -1, so no rank waits alone) */
    shape[0] = E; shape[1] = d; shape[2] = D; shape[3] = (int)c->expert; shape[4] = (int)c->router; shape[5] = L->max_tokens;
    if (!L->logits) shape[0] = shape[1] = shape[2] = shape[3] = shape[4] = shape[5] = -1;
    if (moe_mpi_check_same(ctx, shape, sizeof shape, "MoE layer (experts, d, d_ff, expert kind, router, max tokens)") != MOE_OK) {
        ep->err = ctx->err;
        return ep->err.status;
    }
    if (!L->logits) return moe_err_set(&ep->err, MOE_ERR_STATE, "expert parallelism needs an initialised layer");
    if (E % P != 0)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: %d ranks do not divide the %d experts of a layer (run on a divisor of %d ranks)", P, E, E);
    if (c->router == MOE_ROUTER_AOE)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: AoE's experts read the router's low-rank caches on the token's rank; use another router or data parallelism");
    ep->L = L;
    ep->e_count = E / P;
    ep->e_first = ctx->rank * ep->e_count;
    /* a source sends at most its list's rows, and at most max_tokens per expert */
    per_src = L->cap < L->max_tokens * ep->e_count ? L->cap : L->max_tokens * ep->e_count;
    rows = (size_t)per_src * (size_t)P;
    if (rows * (size_t)(d > D ? d : D) > (size_t)INT_MAX)
        return moe_err_set(&ep->err, MOE_ERR_INVALID_ARG, "expert parallelism: %zu rows of %d floats exceed MPI's int counts", rows, d > D ? d : D);
    ep->max_rows = (int)rows;
    ok = MOE__ALLOC(ep->send_rows, E, int) && MOE__ALLOC(ep->recv_rows, (size_t)P * ep->e_count, int) &&
         MOE__ALLOC(ep->scount, P, int) && MOE__ALLOC(ep->sdispl, P, int) && MOE__ALLOC(ep->rcount, P, int) &&
         MOE__ALLOC(ep->rdispl, P, int) && MOE__ALLOC(ep->offset, ep->e_count + 1, int) &&
         MOE__ALLOC(ep->rbuf, rows * d + 1, float) && MOE__ALLOC(ep->xg, rows * d + 1, float) &&
         MOE__ALLOC(ep->eout, rows * d + 1, float) && MOE__ALLOC(ep->dout, rows * d + 1, float) &&
         MOE__ALLOC(ep->dxg, rows * d + 1, float) && MOE__ALLOC(ep->hg, rows * D + 1, float) &&
         MOE__ALLOC(ep->hu, rows * D + 1, float) && MOE__ALLOC(ep->scratch1, rows * D + 1, float) &&
         MOE__ALLOC(ep->scratch2, rows * D + 1, float) &&
         moe_work_alloc(&ep->work, moe_experts_work_floats(L->max_tokens * P, ep->e_count, d, D, c->expert, moe_num_threads()),
                        moe_num_threads()) == MOE_OK;
    /* the allocation's outcome must be the same everywhere, or one rank would wait alone */
    {
        int mine = ok ? 1 : 0, all = 0, rc = MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, ctx->comm);
        if (rc != MPI_SUCCESS) { moe_mpi_experts_free(ep); return moe__mpi_fail(&ep->err, rc, "MPI_Allreduce (allocation outcome)"); }
        if (!all) {
            moe_mpi_experts_free(ep);
            return moe_err_set(&ep->err, MOE_ERR_NOMEM, mine ? "expert parallelism: another rank ran out of memory for its buffers"
                                                             : "expert parallelism: out of memory for %zu rows of received tokens", rows);
        }
    }
    ep->runner.forward = moe__ep_forward;
    ep->runner.backward = moe__ep_backward;
    ep->runner.user = ep;
    L->runner = &ep->runner;
    return MOE_OK;
}

MOE__IMPL moe_status moe_mpi_experts_model_init(moe_mpi_experts *eps, moe_mpi *ctx, moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++) memset(&eps[l], 0, sizeof eps[l]);
    for (l = 0; l < m->cfg.n_layers; l++) {
        if (!m->blocks[l].is_moe) continue;
        if (moe_mpi_experts_init(&eps[l], ctx, &m->blocks[l].moe) != MOE_OK) {
            moe_status st = eps[l].err.status;
            m->err = eps[l].err;
            moe_mpi_experts_model_free(eps, m);
            return st;
        }
    }
    return MOE_OK;
}

MOE__IMPL void moe_mpi_experts_model_free(moe_mpi_experts *eps, moe_model *m) {
    int l;
    for (l = 0; l < m->cfg.n_layers; l++)
        if (m->blocks[l].is_moe) moe_mpi_experts_free(&eps[l]);
}

#endif /* MOE_MPI */
