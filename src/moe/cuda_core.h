/* ============================================================================================
   >>moe:cuda_core  the CUDA twins of core, store and optim (MOE_CUDA)
   ============================================================================================
   Compiled only when MOE_CUDA is defined, and then the MOE_IMPLEMENTATION file must be a .cu
   file compiled by nvcc (link -lcublas). The CPU path stays the reference; every device
   function is named after its CPU twin with _cuda and takes device pointers. A build without
   MOE_CUDA is unchanged.
   Modes: MOE_CUDA_DETERMINISTIC (the default) sums every reduction in a fixed order without
   atomics (two runs are bit-identical); MOE_CUDA_FAST lets combine, gather and weight
   gradients accumulate with atomics and lets cuBLAS use its atomic kernels.
   TF32 stays off (cuBLAS's default math), so GEMMs stay comparable with the CPU's float32. */
#ifdef MOE_CUDA

typedef enum moe_cuda_mode { MOE_CUDA_DETERMINISTIC = 0, MOE_CUDA_FAST = 1 } moe_cuda_mode;

typedef struct moe_cuda {
    int device;         /* CUDA device ordinal                                          */
    moe_cuda_mode mode;
    void *cublas;       /* cublasHandle_t                                               */
    double *scalars;    /* (8) device scratch for single numbers (a loss mean, a norm)   */
    moe_err err;
} moe_cuda;

/* Selects `device`, creates the cuBLAS handle. No driver, no device or an old driver:
   MOE_ERR_NO_DEVICE with the runtime's own sentence in c->err (nothing else is touched, the
   CPU path keeps working). */
MOEDEF moe_status moe_cuda_init(moe_cuda *c, int device, moe_cuda_mode mode);
MOEDEF void moe_cuda_free(moe_cuda *c); /* safe on a zeroed or failed context */
/* Waits for the device; a failed kernel shows here as a status. */
MOEDEF moe_status moe_cuda_sync(moe_cuda *c);
MOEDEF moe_status moe_cuda_malloc(moe_cuda *c, void **dev, size_t bytes); /* zero-filled */
MOEDEF void moe_cuda_mfree(void *dev);
MOEDEF moe_status moe_cuda_upload(moe_cuda *c, void *dev, const void *host, size_t bytes);
MOEDEF moe_status moe_cuda_download(moe_cuda *c, void *host, const void *dev, size_t bytes);

/* The device copy of a store: the same flat buffers in the same order, laid out by the host
   store's tensor table (which stays on the host and must outlive this). */
typedef struct moe_store_cuda {
    const moe_store *host; /* the layout                                                  */
    size_t numel;
    float *params, *grads; /* (numel) device                                              */
    float *adam_m, *adam_v;/* (numel) device, NULL when the host store has no moments      */
    double *clip_part;     /* (chunks) the clipping's per-chunk sums                        */
} moe_store_cuda;

/* Allocates the device buffers for an allocated host store and uploads it (params and
   moments; gradients zero). */
MOEDEF moe_status moe_store_alloc_cuda(moe_store_cuda *d, moe_cuda *c, const moe_store *host);
MOEDEF void moe_store_free_cuda(moe_store_cuda *d);
/* host -> device: params and moments (after loading a checkpoint) */
MOEDEF moe_status moe_store_upload_cuda(moe_cuda *c, moe_store_cuda *d, const moe_store *host);
/* device -> host: params, grads and moments (before saving a checkpoint: the CPU writes the
   one checkpoint format, so a device run and a CPU run read each other's files) */
MOEDEF moe_status moe_store_download_cuda(moe_cuda *c, const moe_store_cuda *d, moe_store *host);
MOEDEF moe_status moe_store_zero_grad_cuda(moe_cuda *c, moe_store_cuda *d);
/* moe_adamw_step on the device: the same arithmetic per element */
MOEDEF moe_status moe_adamw_step_cuda(moe_cuda *c, moe_store_cuda *d, const moe_adamw_config *cfg, float lr,
                                      long long step);
/* moe_clip_grad_norm on the device: the same chunks of 2^14 summed in double in the same
   order, so the norm is the CPU's bit for bit. *norm (may be NULL) gets the norm before
   clipping. */
MOEDEF moe_status moe_clip_grad_norm_cuda(moe_cuda *c, moe_store_cuda *d, float max_norm, float *norm);

#endif /* MOE_CUDA */

/* @implementation */
/* ============================================================================================
   >>moe:cuda_core
   ============================================================================================
   Each kernel's per-thread work is a plain function (a "body") that takes its block and
   thread index; the __global__ kernel only passes blockIdx.x, threadIdx.x and blockDim.x.
   Without nvcc the bodies are ordinary static functions, so tests/test_cuda_bodies.c runs
   them over the same grid on the CPU (MOE_CUDA_BODIES) and compares them with the CPU path.
   The reference kernels use no shared memory and no warp intrinsics for that reason. */
#if defined(MOE_CUDA) || defined(MOE_CUDA_BODIES)

#if defined(MOE_CUDA) && !defined(__CUDACC__)
#error "moe.h: MOE_CUDA with MOE_IMPLEMENTATION needs nvcc (a .cu translation unit)"
#endif

#ifdef __CUDACC__
#define MOE__HD __host__ __device__
#else
#define MOE__HD
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MOE__BODY static MOE__HD __attribute__((unused))
#else
#define MOE__BODY static MOE__HD
#endif

#define MOE__CUDA_BLOCK 256 /* threads per block of the elementwise and per-row kernels */
#define MOE__CLIP_CHUNK (1 << 14) /* the CPU clipping's chunk */

MOE__BODY int moe__cuda_blocks(long long n, int block) { return (int)((n + block - 1) / block); }
MOE__BODY long long moe__cuda_index(int bx, int tx, int bdx) { return (long long)bx * bdx + tx; }

/* AdamW, one element; moe__adamw_span's scalar loop */
MOE__BODY void moe__cuda_adamw_body(int bx, int tx, int bdx, float *p, const float *g, float *m, float *v,
                                    long long n, moe__adamw_consts k) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float gi, denom;
    if (i >= n) return;
    gi = g[i];
    p[i] *= k.decay;
    m[i] += (gi - m[i]) * k.one_m_b1;
    v[i] = v[i] * k.b2 + k.one_m_b2 * gi * gi;
    denom = sqrtf(v[i]) / k.bc2_sqrt + k.eps;
    p[i] -= k.step_size * (m[i] / denom);
}

/* clipping: chunk c's sum of squares in double, in index order */
MOE__BODY void moe__cuda_clip_part_body(int bx, int tx, int bdx, double *part, const float *g, long long numel) {
    long long c = moe__cuda_index(bx, tx, bdx), i, lo, hi, nchunk = (numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    double acc = 0.0;
    if (c >= nchunk) return;
    lo = c * MOE__CLIP_CHUNK;
    hi = lo + MOE__CLIP_CHUNK < numel ? lo + MOE__CLIP_CHUNK : numel;
    for (i = lo; i < hi; i++) acc += (double)g[i] * g[i];
    part[c] = acc;
}

/* one thread: the chunks' sums in order; out[0] = the norm (as the CPU's float, in double) */
MOE__BODY void moe__cuda_clip_total_body(int bx, int tx, int bdx, double *out, const double *part, long long nchunk) {
    long long c;
    double total = 0.0;
    if (moe__cuda_index(bx, tx, bdx) != 0) return;
    for (c = 0; c < nchunk; c++) total += part[c];
    out[0] = (double)(float)sqrt(total);
}

MOE__BODY void moe__cuda_clip_scale_body(int bx, int tx, int bdx, float *g, long long numel, const double *norm_d,
                                         float max_norm) {
    long long i = moe__cuda_index(bx, tx, bdx);
    float norm = (float)norm_d[0];
    if (i >= numel || !(max_norm > 0.0f && norm > max_norm)) return;
    g[i] *= max_norm / (norm + 1e-6f);
}

#endif /* MOE_CUDA || MOE_CUDA_BODIES */

#ifdef MOE_CUDA
#include <cublas_v2.h>

/* the runtime's sentence for a failed call; returns MOE_ERR_NO_DEVICE for the errors that
   mean "no usable device here" and MOE_ERR_STATE for the rest */
static moe_status moe__cuda_fail(moe_cuda *c, cudaError_t e, const char *what) {
    moe_status s = (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver || e == cudaErrorInvalidDevice ||
                    e == cudaErrorInitializationError || e == cudaErrorSystemDriverMismatch ||
                    e == cudaErrorCompatNotSupportedOnDevice || e == cudaErrorDevicesUnavailable)
                       ? MOE_ERR_NO_DEVICE
                       : (e == cudaErrorMemoryAllocation ? MOE_ERR_NOMEM : MOE_ERR_STATE);
    return moe_err_set(c ? &c->err : NULL, s, "CUDA: %s failed: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}
#define MOE__CUDA_TRY(c, call, what)                               \
    do {                                                           \
        cudaError_t moe__e = (call);                               \
        if (moe__e != cudaSuccess) return moe__cuda_fail(c, moe__e, what); \
    } while (0)
/* after a launch: a bad configuration shows at once, a fault at the next sync */
#define MOE__CUDA_LAUNCHED(c, what) MOE__CUDA_TRY(c, cudaGetLastError(), what)

static moe_status moe__cublas_check(moe_cuda *c, cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return MOE_OK;
    return moe_err_set(&c->err, s == CUBLAS_STATUS_ALLOC_FAILED ? MOE_ERR_NOMEM : MOE_ERR_STATE,
                       "cuBLAS: %s failed with status %d", what, (int)s);
}

MOE__IMPL moe_status moe_cuda_init(moe_cuda *c, int device, moe_cuda_mode mode) {
    int count = 0;
    cudaError_t e;
    cublasHandle_t h;
    cublasStatus_t bs;
    memset(c, 0, sizeof *c);
    c->device = device;
    c->mode = mode;
    e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) return moe__cuda_fail(c, e, "cudaGetDeviceCount");
    if (count <= 0) return moe_err_set(&c->err, MOE_ERR_NO_DEVICE, "CUDA: no CUDA device found");
    if (device < 0 || device >= count)
        return moe_err_set(&c->err, MOE_ERR_NO_DEVICE, "CUDA: device %d asked for, %d present", device, count);
    MOE__CUDA_TRY(c, cudaSetDevice(device), "cudaSetDevice");
    MOE__CUDA_TRY(c, cudaMalloc((void **)&c->scalars, 8 * sizeof(double)), "cudaMalloc");
    bs = cublasCreate(&h);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        cudaFree(c->scalars);
        c->scalars = NULL;
        return moe__cublas_check(c, bs, "cublasCreate");
    }
    c->cublas = (void *)h;
    /* float32 arithmetic (no TF32 tensor cores): comparable with the CPU path */
    bs = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    if (bs == CUBLAS_STATUS_SUCCESS)
        bs = cublasSetAtomicsMode(h, mode == MOE_CUDA_FAST ? CUBLAS_ATOMICS_ALLOWED : CUBLAS_ATOMICS_NOT_ALLOWED);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        moe_status s = moe__cublas_check(c, bs, "cublasSetMathMode/AtomicsMode");
        moe_cuda_free(c);
        return s;
    }
    return MOE_OK;
}

MOE__IMPL void moe_cuda_free(moe_cuda *c) {
    if (c->cublas) cublasDestroy((cublasHandle_t)c->cublas);
    if (c->scalars) cudaFree(c->scalars);
    c->cublas = NULL;
    c->scalars = NULL;
}

MOE__IMPL moe_status moe_cuda_sync(moe_cuda *c) {
    MOE__CUDA_TRY(c, cudaDeviceSynchronize(), "a kernel (seen at cudaDeviceSynchronize)");
    return MOE_OK;
}

MOE__IMPL moe_status moe_cuda_malloc(moe_cuda *c, void **dev, size_t bytes) {
    *dev = NULL;
    if (bytes == 0) return MOE_OK;
    MOE__CUDA_TRY(c, cudaMalloc(dev, bytes), "cudaMalloc");
    MOE__CUDA_TRY(c, cudaMemset(*dev, 0, bytes), "cudaMemset");
    return MOE_OK;
}

MOE__IMPL void moe_cuda_mfree(void *dev) {
    if (dev) cudaFree(dev);
}

MOE__IMPL moe_status moe_cuda_upload(moe_cuda *c, void *dev, const void *host, size_t bytes) {
    if (bytes) MOE__CUDA_TRY(c, cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
    return MOE_OK;
}

MOE__IMPL moe_status moe_cuda_download(moe_cuda *c, void *host, const void *dev, size_t bytes) {
    if (bytes) MOE__CUDA_TRY(c, cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_alloc_cuda(moe_store_cuda *d, moe_cuda *c, const moe_store *host) {
    size_t bytes = sizeof(float) * host->numel, nchunk = (host->numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    moe_status s;
    memset(d, 0, sizeof *d);
    if (!host->allocated) return moe_err_set(&c->err, MOE_ERR_STATE, "moe_store_alloc_cuda: the host store is not allocated");
    d->host = host;
    d->numel = host->numel;
    if ((s = moe_cuda_malloc(c, (void **)&d->params, bytes)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&d->grads, bytes)) != MOE_OK ||
        (s = moe_cuda_malloc(c, (void **)&d->clip_part, sizeof(double) * (nchunk ? nchunk : 1))) != MOE_OK)
        goto fail;
    if (host->adam_m && host->adam_v)
        if ((s = moe_cuda_malloc(c, (void **)&d->adam_m, bytes)) != MOE_OK ||
            (s = moe_cuda_malloc(c, (void **)&d->adam_v, bytes)) != MOE_OK)
            goto fail;
    if ((s = moe_store_upload_cuda(c, d, host)) != MOE_OK) goto fail;
    return MOE_OK;
fail:
    moe_store_free_cuda(d);
    return s;
}

MOE__IMPL void moe_store_free_cuda(moe_store_cuda *d) {
    moe_cuda_mfree(d->params);
    moe_cuda_mfree(d->grads);
    moe_cuda_mfree(d->adam_m);
    moe_cuda_mfree(d->adam_v);
    moe_cuda_mfree(d->clip_part);
    memset(d, 0, sizeof *d);
}

MOE__IMPL moe_status moe_store_upload_cuda(moe_cuda *c, moe_store_cuda *d, const moe_store *host) {
    size_t bytes = sizeof(float) * d->numel;
    moe_status s;
    if (host->numel != d->numel || moe_store_fingerprint(host) != moe_store_fingerprint(d->host))
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "moe_store_upload_cuda: the host store's layout differs from the device copy's");
    if ((s = moe_cuda_upload(c, d->params, host->params, bytes)) != MOE_OK) return s;
    if (d->adam_m && host->adam_m && (s = moe_cuda_upload(c, d->adam_m, host->adam_m, bytes)) != MOE_OK) return s;
    if (d->adam_v && host->adam_v && (s = moe_cuda_upload(c, d->adam_v, host->adam_v, bytes)) != MOE_OK) return s;
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_download_cuda(moe_cuda *c, const moe_store_cuda *d, moe_store *host) {
    size_t bytes = sizeof(float) * d->numel;
    moe_status s;
    if (host->numel != d->numel || moe_store_fingerprint(host) != moe_store_fingerprint(d->host))
        return moe_err_set(&c->err, MOE_ERR_SHAPE, "moe_store_download_cuda: the host store's layout differs from the device copy's");
    if ((s = moe_cuda_download(c, host->params, d->params, bytes)) != MOE_OK) return s;
    if ((s = moe_cuda_download(c, host->grads, d->grads, bytes)) != MOE_OK) return s;
    if (d->adam_m && host->adam_m && (s = moe_cuda_download(c, host->adam_m, d->adam_m, bytes)) != MOE_OK) return s;
    if (d->adam_v && host->adam_v && (s = moe_cuda_download(c, host->adam_v, d->adam_v, bytes)) != MOE_OK) return s;
    return MOE_OK;
}

MOE__IMPL moe_status moe_store_zero_grad_cuda(moe_cuda *c, moe_store_cuda *d) {
    if (d->numel) MOE__CUDA_TRY(c, cudaMemset(d->grads, 0, sizeof(float) * d->numel), "cudaMemset");
    return MOE_OK;
}

__global__ void moe__k_adamw(float *p, const float *g, float *m, float *v, long long n, moe__adamw_consts k) {
    moe__cuda_adamw_body(blockIdx.x, threadIdx.x, blockDim.x, p, g, m, v, n, k);
}
__global__ void moe__k_clip_part(double *part, const float *g, long long numel) {
    moe__cuda_clip_part_body(blockIdx.x, threadIdx.x, blockDim.x, part, g, numel);
}
__global__ void moe__k_clip_total(double *out, const double *part, long long nchunk) {
    moe__cuda_clip_total_body(blockIdx.x, threadIdx.x, blockDim.x, out, part, nchunk);
}
__global__ void moe__k_clip_scale(float *g, long long numel, const double *norm, float max_norm) {
    moe__cuda_clip_scale_body(blockIdx.x, threadIdx.x, blockDim.x, g, numel, norm, max_norm);
}

MOE__IMPL moe_status moe_adamw_step_cuda(moe_cuda *c, moe_store_cuda *d, const moe_adamw_config *cfg, float lr,
                                         long long step) {
    moe__adamw_consts k;
    int ti;
    if (!d->adam_m || !d->adam_v) return moe_err_set(&c->err, MOE_ERR_STATE, "AdamW step on a device store without optimizer moments");
    if (step < 1) return moe_err_set(&c->err, MOE_ERR_INVALID_ARG, "AdamW step counts from 1, got %lld", step);
    k = moe__adamw_consts_for(cfg, lr, step);
    for (ti = 0; ti < d->host->count; ti++) {
        const moe_tensor *t = &d->host->tensors[ti];
        moe__adamw_consts kt = k;
        long long n = (long long)t->numel;
        if (n == 0) continue;
        kt.decay = (t->flags & MOE_TENSOR_DECAY) ? 1.0f - lr * cfg->weight_decay : 1.0f;
        moe__k_adamw<<<moe__cuda_blocks(n, MOE__CUDA_BLOCK), MOE__CUDA_BLOCK>>>(
            d->params + t->offset, d->grads + t->offset, d->adam_m + t->offset, d->adam_v + t->offset, n, kt);
        MOE__CUDA_LAUNCHED(c, "the AdamW kernel");
    }
    return MOE_OK;
}

MOE__IMPL moe_status moe_clip_grad_norm_cuda(moe_cuda *c, moe_store_cuda *d, float max_norm, float *norm) {
    long long numel = (long long)d->numel, nchunk = (numel + MOE__CLIP_CHUNK - 1) / MOE__CLIP_CHUNK;
    double host_norm = 0.0;
    if (nchunk > 0) {
        moe__k_clip_part<<<moe__cuda_blocks(nchunk, 64), 64>>>(d->clip_part, d->grads, numel);
        MOE__CUDA_LAUNCHED(c, "the clipping's sum kernel");
    }
    moe__k_clip_total<<<1, 1>>>(c->scalars, d->clip_part, nchunk);
    MOE__CUDA_LAUNCHED(c, "the clipping's total kernel");
    if (max_norm > 0.0f && numel > 0) {
        moe__k_clip_scale<<<moe__cuda_blocks(numel, MOE__CUDA_BLOCK), MOE__CUDA_BLOCK>>>(d->grads, numel, c->scalars, max_norm);
        MOE__CUDA_LAUNCHED(c, "the clipping's scale kernel");
    }
    if (norm) {
        moe_status s = moe_cuda_download(c, &host_norm, c->scalars, sizeof host_norm);
        if (s != MOE_OK) return s;
        *norm = (float)host_norm;
    }
    return MOE_OK;
}

#endif /* MOE_CUDA */
