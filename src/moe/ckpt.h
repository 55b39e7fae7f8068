/* ============================================================================================
   >>moe:ckpt  checkpoints
   ============================================================================================
   One format for every model in moe.h and reward.h. Little-endian:
     "MOECKPT\0", u32 version, u32 flags (1 = Adam moments present), u64 layout fingerprint,
     u64 numel, i64 step, u64 config bytes, u64 state bytes,
     config blob, state blob (caller's: RNG, data position, ...), params, [adam_m, adam_v],
     u32 CRC-32 (zlib polynomial) of everything before it.
   Saving writes a temporary file beside <path> whose name no other writer holds (POSIX:
   "<path>.<pid>-<n>.tmp", created exclusively; elsewhere "<path>.tmp"), flushes and fsyncs it,
   renames it onto <path> and fsyncs the directory: an existing checkpoint is never left
   half-written, and two runs saving to one path each rename a whole file. Loading reads and
   verifies the whole file before it touches the store: on any error the store is unchanged.
   The parameters must be finite and below MOE_CKPT_MAX_ABS in magnitude, the moments finite
   (v >= 0): a CRC protects against damage, not against a run that diverged before it saved.

   I/O HOOKS (SQLite's VFS in miniature). A save does its file operations through a
   moe_ckpt_io: moe_ckpt_io_default() holds the real calls, moe_checkpoint_save_ex (and
   moe_model_save_ex) take another one per call; nothing global. A test fails the n-th write,
   sync or rename and checks that the previous checkpoint survives; a program may route
   checkpoints through its own storage layer. Each hook returns 0 (create: a handle) on success
   and -1 (create: NULL) with errno set on failure. A failed create, write, sync, close or rename
   leaves <path> as it was and removes the temporary file; a failed directory sync after the
   rename is not an error (the new file is already in place, and some file systems refuse to
   sync directories: SQLite ignores that failure too). */

#define MOE_CKPT_VERSION 1
/* A parameter's square must stay a float: above ~1.8e19 a norm overflows to inf and the next
   step turns it into NaN. Trained weights stay many orders of magnitude below this. */
#define MOE_CKPT_MAX_ABS 1e15f

typedef struct moe_ckpt_info {
    int version;
    int has_moments;
    uint64_t fingerprint;
    uint64_t numel;
    long long step;
    uint64_t config_bytes;
    uint64_t state_bytes;
} moe_ckpt_info;

#ifndef MOE_NO_STDIO
typedef struct moe_ckpt_io {
    /* creates `path` for writing, failing with errno EEXIST when it exists (POSIX: O_EXCL) */
    void *(*create)(void *ctx, const char *path);
    int (*write)(void *ctx, void *file, const void *buf, size_t n); /* all n bytes, or -1  */
    int (*sync)(void *ctx, void *file);                             /* to stable storage    */
    int (*close)(void *ctx, void *file);                            /* once per create      */
    int (*rename)(void *ctx, const char *from, const char *to);     /* replaces `to`        */
    int (*remove)(void *ctx, const char *path);                     /* the temporary file   */
    int (*sync_dir)(void *ctx, const char *dir);                    /* after the rename     */
    void *ctx;                                                      /* every hook's first argument */
} moe_ckpt_io;

/* the real calls (POSIX: open(O_EXCL), write, fsync, close, rename, remove, fsync of the
   directory; elsewhere stdio, without the syncs), ctx NULL */
MOEDEF moe_ckpt_io moe_ckpt_io_default(void);
MOEDEF moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                      long long step, const void *config, size_t config_bytes,
                                      const void *state, size_t state_bytes, moe_err *err);
/* the same through io (NULL: moe_ckpt_io_default()); every hook must be set */
MOEDEF moe_status moe_checkpoint_save_ex(const char *path, const moe_store *s, int with_moments,
                                         long long step, const void *config, size_t config_bytes,
                                         const void *state, size_t state_bytes,
                                         const moe_ckpt_io *io, moe_err *err);
/* Verifies magic, version, CRC, fingerprint, sizes; config_bytes/state_bytes must equal the
   stored sizes (pass 0 / NULL to skip). If `expect_config` is non-NULL the stored config blob
   must equal it byte for byte. step/config_out/state_out may be NULL. */
MOEDEF moe_status moe_checkpoint_load(const char *path, moe_store *s, long long *step,
                                      const void *expect_config, void *config_out,
                                      size_t config_bytes, void *state_out, size_t state_bytes,
                                      moe_err *err);
/* Reads only the header (after checking the CRC), to learn sizes before loading. */
MOEDEF moe_status moe_checkpoint_info(const char *path, moe_ckpt_info *info, moe_err *err);
/* Copies the config and state blobs (exact sizes; NULL/0 skips one) out of a verified
   checkpoint, so a program can rebuild its model and options before loading parameters. */
MOEDEF moe_status moe_checkpoint_blobs(const char *path, void *config_out, size_t config_bytes,
                                       void *state_out, size_t state_bytes, moe_err *err);
#endif
MOEDEF uint32_t moe_crc32(uint32_t crc, const void *data, size_t n); /* crc = 0 to start */

/* @implementation */
/* ============================================================================================
   >>moe:ckpt
   ============================================================================================ */

MOE__IMPL uint32_t moe_crc32(uint32_t crc, const void *data, size_t n) {
    /* slicing-by-8 (Kounavis and Berry, 2008): eight independent lookups per 8 bytes instead of
       a chain of eight dependent ones. The tables are built per call (8 KB, about 4K steps): no
       global state to race on. Byte order is explicit, so the result is the same on any host. */
    const unsigned char *p = (const unsigned char *)data;
    uint32_t t[8][256];
    size_t i;
    int k;
    for (i = 0; i < 256; i++) {
        uint32_t c = (uint32_t)i;
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        t[0][i] = c;
    }
    for (i = 0; i < 256; i++)
        for (k = 1; k < 8; k++) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        crc = t[7][lo & 0xFFu] ^ t[6][(lo >> 8) & 0xFFu] ^ t[5][(lo >> 16) & 0xFFu] ^ t[4][lo >> 24] ^
              t[3][hi & 0xFFu] ^ t[2][(hi >> 8) & 0xFFu] ^ t[1][(hi >> 16) & 0xFFu] ^ t[0][hi >> 24];
    }
    for (; n > 0; n--, p++) crc = t[0][(crc ^ *p) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

#ifndef MOE_NO_STDIO
#include <errno.h>
#ifdef MOE__HAVE_FSYNC
#include <fcntl.h>    /* open(O_EXCL): a temporary name no other writer holds */
#include <sys/stat.h> /* fstat: a directory is not a checkpoint */
#endif
#define MOE__CKPT_MAGIC "MOECKPT"
#define MOE__CKPT_HEADER 56 /* 8 magic + 4 version + 4 flags + 5 * 8 */

static int moe__little_endian(void) {
    const uint32_t one = 1;
    return *(const unsigned char *)&one == 1;
}

static void moe__put_u32(unsigned char *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void moe__put_u64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t moe__get_u32(const unsigned char *p) {
    uint32_t v = 0;
    int i;
    for (i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t moe__get_u64(const unsigned char *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* ---- the real calls behind moe_ckpt_io_default() ---- */
#ifdef MOE__HAVE_FSYNC
/* a descriptor travels as a handle shifted by one, so descriptor 0 is not NULL */
#define MOE__FD(file) ((int)((intptr_t)(file) - 1))
static void *moe__io_create(void *ctx, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0666);
    (void)ctx;
    return fd < 0 ? NULL : (void *)((intptr_t)fd + 1);
}
static int moe__io_write(void *ctx, void *file, const void *buf, size_t n) {
    const char *p = (const char *)buf;
    (void)ctx;
    while (n > 0) { /* write(2) may write less than asked */
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t k = write(MOE__FD(file), p, chunk);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            if (k == 0) errno = EIO;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}
static int moe__io_sync(void *ctx, void *file) { (void)ctx; return fsync(MOE__FD(file)) == 0 ? 0 : -1; }
static int moe__io_close(void *ctx, void *file) { (void)ctx; return close(MOE__FD(file)) == 0 ? 0 : -1; }
static int moe__io_sync_dir(void *ctx, const char *dir) {
    int fd = open(dir, O_RDONLY), rc;
    (void)ctx;
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc == 0 ? 0 : -1;
}
#else
static void *moe__io_create(void *ctx, const char *path) { (void)ctx; return fopen(path, "wb"); }
static int moe__io_write(void *ctx, void *file, const void *buf, size_t n) {
    (void)ctx;
    return fwrite(buf, 1, n, (FILE *)file) == n ? 0 : -1;
}
static int moe__io_sync(void *ctx, void *file) { (void)ctx; return fflush((FILE *)file) == 0 ? 0 : -1; }
static int moe__io_close(void *ctx, void *file) { (void)ctx; return fclose((FILE *)file) == 0 ? 0 : -1; }
static int moe__io_sync_dir(void *ctx, const char *dir) { (void)ctx; (void)dir; return 0; }
#endif
static int moe__io_rename(void *ctx, const char *from, const char *to) {
    (void)ctx;
#ifdef _WIN32
    remove(to); /* rename() does not replace files there */
#endif
    return rename(from, to) == 0 ? 0 : -1;
}
static int moe__io_remove(void *ctx, const char *path) { (void)ctx; return remove(path) == 0 ? 0 : -1; }

MOE__IMPL moe_ckpt_io moe_ckpt_io_default(void) {
    moe_ckpt_io io;
    io.create = moe__io_create;
    io.write = moe__io_write;
    io.sync = moe__io_sync;
    io.close = moe__io_close;
    io.rename = moe__io_rename;
    io.remove = moe__io_remove;
    io.sync_dir = moe__io_sync_dir;
    io.ctx = NULL;
    return io;
}

/* a save in progress: the temporary file, the running CRC, the first error */
typedef struct moe__ckpt_out {
    const moe_ckpt_io *io;
    moe_ckpt_io own;    /* moe__atomic_open: the real calls, io points here */
    void *file;
    uint32_t crc;
    int failed; /* 0, or the errno of the first failure (EIO when the hook left none) */
} moe__ckpt_out;

static void moe__ckpt_fail(moe__ckpt_out *o) {
    if (!o->failed) o->failed = errno ? errno : EIO;
}

/* writes n bytes and folds them into the running CRC; nothing after a failure */
static void moe__write(moe__ckpt_out *o, const void *p, size_t n) {
    if (o->failed || n == 0) return;
    o->crc = moe_crc32(o->crc, p, n);
    errno = 0;
    if (o->io->write(o->io->ctx, o->file, p, n) != 0) moe__ckpt_fail(o);
}

/* Creates the temporary file for `path`: its name goes to tmp (cap bytes); NULL with errno. */
static void *moe__ckpt_create_tmp(const moe_ckpt_io *io, const char *path, char *tmp, size_t cap) {
#ifdef MOE__HAVE_FSYNC
    /* exclusive creation of a name with our process id (and a counter for several stores of
       one process); mkstemp would do the same but ignores the umask (mode 0600) */
    int k;
    for (k = 0; k < 1000; k++) {
        void *f;
        snprintf(tmp, cap, "%s.%ld-%d.tmp", path, (long)getpid(), k);
        errno = 0;
        f = io->create(io->ctx, tmp);
        if (f) return f;
        if (errno != EEXIST) return NULL;
    }
    return NULL;
#else
    snprintf(tmp, cap, "%s.tmp", path);
    return io->create(io->ctx, tmp);
#endif
}

/* the directory holding `path` ("." for a bare name) */
static void moe__ckpt_dir_of(const char *path, char *dir, size_t cap) {
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, cap, ".");
    else snprintf(dir, cap, "%.*s", (int)(slash - path) + (slash == path), path);
}

/* Atomic replacement of a file, for every writer in moe.h (checkpoints, safetensors, GGUF):
   a temporary file of a name no other writer holds beside path, through io (NULL: the real
   calls); moe__atomic_write appends (0 once anything failed); moe__atomic_close syncs, closes,
   renames over path and syncs the directory when ok, else removes it. */
static moe_status moe__atomic_open(moe__ckpt_out *o, const moe_ckpt_io *io, const char *path, char *tmp, size_t cap,
                                   moe_err *err) {
    memset(o, 0, sizeof *o);
    o->own = moe_ckpt_io_default();
    o->io = io ? io : &o->own;
    if (strlen(path) + 32 > cap) return moe_err_set(err, MOE_ERR_INVALID_ARG, "path '%.64s...' is too long", path);
    o->file = moe__ckpt_create_tmp(o->io, path, tmp, cap);
    return o->file ? MOE_OK : moe_err_set(err, MOE_ERR_IO, "cannot create a temporary file beside '%s' (%s)", path, strerror(errno ? errno : EIO));
}

static int moe__atomic_write(moe__ckpt_out *o, const void *p, size_t n) {
    moe__write(o, p, n);
    return !o->failed;
}

static moe_status moe__atomic_close(moe__ckpt_out *o, int ok, const char *tmp, const char *path, moe_err *err) {
    char dir[4096];
    const moe_ckpt_io *io = o->io;
    if (!ok && !o->failed) o->failed = EIO;
    errno = 0;
    if (!o->failed && io->sync(io->ctx, o->file) != 0) moe__ckpt_fail(o);
    errno = 0;
    if (io->close(io->ctx, o->file) != 0) moe__ckpt_fail(o);
    if (o->failed) {
        io->remove(io->ctx, tmp);
        return moe_err_set(err, MOE_ERR_IO, "writing '%s' failed (%s; disk full?); '%s' is unchanged", tmp, strerror(o->failed), path);
    }
    errno = 0;
    if (io->rename(io->ctx, tmp, path) != 0) {
        int e = errno ? errno : EIO;
        io->remove(io->ctx, tmp);
        return moe_err_set(err, MOE_ERR_IO, "cannot rename '%s' to '%s' (%s); '%s' is unchanged", tmp, path, strerror(e), path);
    }
    /* the rename is durable only once the directory is synced; a failure there is no error:
       the new file is already in place (SQLite does the same) */
    moe__ckpt_dir_of(path, dir, sizeof dir);
    io->sync_dir(io->ctx, dir);
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_save(const char *path, const moe_store *s, int with_moments,
                                         long long step, const void *config, size_t config_bytes,
                                         const void *state, size_t state_bytes, moe_err *err) {
    return moe_checkpoint_save_ex(path, s, with_moments, step, config, config_bytes, state, state_bytes, NULL, err);
}

MOE__IMPL moe_status moe_checkpoint_save_ex(const char *path, const moe_store *s, int with_moments,
                                            long long step, const void *config, size_t config_bytes,
                                            const void *state, size_t state_bytes,
                                            const moe_ckpt_io *io, moe_err *err) {
    unsigned char h[MOE__CKPT_HEADER], tail[4];
    char tmp[4096];
    moe__ckpt_out o;
    moe_status st;
    if (!moe__little_endian()) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (!path || !s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint save needs a path and an allocated store");
    if (with_moments && (!s->adam_m || !s->adam_v)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint with moments asked for, but the store has no optimizer moments");
    if ((config_bytes && !config) || (state_bytes && !state)) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint blob size given without data");
    if (strlen(path) + 32 > sizeof tmp) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint path is too long");
    if (io && (!io->create || !io->write || !io->sync || !io->close || !io->rename || !io->remove || !io->sync_dir))
        return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint I/O hooks: every function must be set (start from moe_ckpt_io_default())");
    memset(h, 0, sizeof h);
    memcpy(h, MOE__CKPT_MAGIC, 8);
    moe__put_u32(h + 8, MOE_CKPT_VERSION);
    moe__put_u32(h + 12, with_moments ? 1u : 0u);
    moe__put_u64(h + 16, moe_store_fingerprint(s));
    moe__put_u64(h + 24, (uint64_t)s->numel);
    moe__put_u64(h + 32, (uint64_t)step);
    moe__put_u64(h + 40, (uint64_t)config_bytes);
    moe__put_u64(h + 48, (uint64_t)state_bytes);
    if ((st = moe__atomic_open(&o, io, path, tmp, sizeof tmp, err)) != MOE_OK) return st;
    moe__write(&o, h, sizeof h);
    moe__write(&o, config, config_bytes);
    moe__write(&o, state, state_bytes);
    moe__write(&o, s->params, s->numel * sizeof(float));
    if (with_moments) {
        moe__write(&o, s->adam_m, s->numel * sizeof(float));
        moe__write(&o, s->adam_v, s->numel * sizeof(float));
    }
    moe__put_u32(tail, o.crc);
    moe__write(&o, tail, 4);
    return moe__atomic_close(&o, 1, tmp, path, err);
}

/* Reads the whole file, checks magic, version and CRC; *buf owns the bytes on success. */
static moe_status moe__ckpt_read(const char *path, unsigned char **buf, size_t *len, moe_ckpt_info *info, moe_err *err) {
    FILE *f;
    long size;
    unsigned char *b;
    uint64_t need;
    *buf = NULL;
    if (!moe__little_endian()) return moe_err_set(err, MOE_ERR_UNSUPPORTED, "checkpoints are little-endian; this host is not");
    if (!path) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint path is NULL");
    f = fopen(path, "rb");
    if (!f) return moe_err_set(err, MOE_ERR_IO, "cannot open checkpoint '%s' (%s)", path, strerror(errno));
#ifdef MOE__HAVE_FSYNC
    {
        struct stat st;
        if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
            fclose(f);
            return moe_err_set(err, MOE_ERR_IO, "'%s' is a directory, not a checkpoint file", path);
        }
    }
#endif
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return moe_err_set(err, MOE_ERR_IO, "cannot determine the size of '%s'", path);
    }
    if ((size_t)size < MOE__CKPT_HEADER + 4) {
        fclose(f);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes, too short for a checkpoint (truncated?)", path, size);
    }
    b = (unsigned char *)MOE_MALLOC((size_t)size);
    if (!b) { fclose(f); return moe_err_set(err, MOE_ERR_NOMEM, "no memory to read '%s'", path); }
    if (fread(b, 1, (size_t)size, f) != (size_t)size) {
        fclose(f); MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_IO, "read error on '%s'", path);
    }
    fclose(f);
    if (memcmp(b, MOE__CKPT_MAGIC, 8) != 0) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is not a moe.h checkpoint (bad magic)", path);
    }
    info->version = (int)moe__get_u32(b + 8);
    if (info->version != MOE_CKPT_VERSION) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' has checkpoint format version %d; this moe.h reads version %d", path, info->version, MOE_CKPT_VERSION);
    }
    info->has_moments = (int)(moe__get_u32(b + 12) & 1u);
    info->fingerprint = moe__get_u64(b + 16);
    info->numel = moe__get_u64(b + 24);
    info->step = (long long)moe__get_u64(b + 32);
    info->config_bytes = moe__get_u64(b + 40);
    info->state_bytes = moe__get_u64(b + 48);
    /* sizes are checked before any multiplication can overflow */
    if (info->numel > ((uint64_t)1 << 40) || info->config_bytes > ((uint64_t)1 << 30) || info->state_bytes > ((uint64_t)1 << 30)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' has an implausible header (corrupt?)", path);
    }
    need = MOE__CKPT_HEADER + info->config_bytes + info->state_bytes + info->numel * 4u * (info->has_moments ? 3u : 1u) + 4u;
    if (need != (uint64_t)size) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' is %ld bytes but its header describes %llu (truncated or corrupt)", path, size, (unsigned long long)need);
    }
    if (moe_crc32(0, b, (size_t)size - 4) != moe__get_u32(b + size - 4)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' fails its CRC-32 check (corrupt file)", path);
    }
    *buf = b;
    *len = (size_t)size;
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_info(const char *path, moe_ckpt_info *info, moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_status st = moe__ckpt_read(path, &b, &len, info, err);
    if (st == MOE_OK) MOE_FREE(b);
    return st;
}

MOE__IMPL moe_status moe_checkpoint_blobs(const char *path, void *config_out, size_t config_bytes,
                                          void *state_out, size_t state_bytes, moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_ckpt_info info;
    moe_status st = moe__ckpt_read(path, &b, &len, &info, err);
    if (st != MOE_OK) return st;
    if ((config_out && info.config_bytes != (uint64_t)config_bytes) || (state_out && info.state_bytes != (uint64_t)state_bytes)) {
        MOE_FREE(b);
        return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds %llu config and %llu state bytes, expected %zu and %zu (another program or version?)",
                           path, (unsigned long long)info.config_bytes, (unsigned long long)info.state_bytes, config_bytes, state_bytes);
    }
    if (config_out) memcpy(config_out, b + MOE__CKPT_HEADER, config_bytes);
    if (state_out) memcpy(state_out, b + MOE__CKPT_HEADER + info.config_bytes, state_bytes);
    MOE_FREE(b);
    return MOE_OK;
}

/* The stored floats (params, then m and v when present) as a model may use them: parameters
   finite and within MOE_CKPT_MAX_ABS, moments finite, v >= 0. Names the first bad value. */
static moe_status moe__ckpt_check_values(const char *path, const moe_store *s, const unsigned char *p, int has_moments, moe_err *err) {
    static const char *const what[3] = {"parameter", "first Adam moment", "second Adam moment"};
    size_t i, n = s->numel;
    int k, t;
    for (k = 0; k < (has_moments ? 3 : 1); k++)
        for (i = 0; i < n; i++) {
            float v;
            char shown[32];
            memcpy(&v, p + ((size_t)k * n + i) * sizeof(float), sizeof v); /* the blob need not be aligned */
            if (k == 0 ? (v == v && v >= -MOE_CKPT_MAX_ABS && v <= MOE_CKPT_MAX_ABS) : k == 1 ? isfinite(v) : (isfinite(v) && v >= 0.0f)) continue;
            if (v != v) snprintf(shown, sizeof shown, "NaN");
            else snprintf(shown, sizeof shown, "%g", (double)v);
            for (t = 0; t + 1 < s->count && s->tensors[t + 1].offset <= i; t++) {}
            return moe_err_set(err, MOE_ERR_FORMAT, "'%s' holds the %s %s in '%s' (element %zu): a diverged run or a damaged file; it is not loaded",
                               path, what[k], shown, s->count ? s->tensors[t].name : "?", s->count ? i - s->tensors[t].offset : i);
        }
    return MOE_OK;
}

/* The load behind moe_checkpoint_load, on a file already read and verified by moe__ckpt_read
   (b, info): a model file's loader checks the record and loads the values from one read. */
static moe_status moe__ckpt_load_bytes(const char *path, moe_store *s, long long *step, const unsigned char *b,
                                       const moe_ckpt_info *info, const void *expect_config, void *config_out,
                                       size_t config_bytes, void *state_out, size_t state_bytes, moe_err *err) {
    const unsigned char *p;
    size_t nb;
    moe_status st = MOE_ERR_FORMAT;
    if (info->fingerprint != moe_store_fingerprint(s) || info->numel != (uint64_t)s->numel)
        moe_err_set(err, st, "'%s' holds a different model layout (fingerprint or size differs from this store)", path);
    else if ((expect_config || config_out) && info->config_bytes != (uint64_t)config_bytes)
        moe_err_set(err, st, "'%s' has a %llu-byte config, expected %zu", path, (unsigned long long)info->config_bytes, config_bytes);
    else if (expect_config && config_bytes && memcmp(b + MOE__CKPT_HEADER, expect_config, config_bytes) != 0)
        moe_err_set(err, st, "'%s' was saved with a different config", path);
    else if (state_out && info->state_bytes != (uint64_t)state_bytes)
        moe_err_set(err, st, "'%s' has %llu bytes of state, expected %zu", path, (unsigned long long)info->state_bytes, state_bytes);
    else
        st = MOE_OK;
    if (st == MOE_OK) st = moe__ckpt_check_values(path, s, b + MOE__CKPT_HEADER + info->config_bytes + info->state_bytes, info->has_moments, err);
    if (st != MOE_OK) return st;
    p = b + MOE__CKPT_HEADER;
    if (config_out && config_bytes) memcpy(config_out, p, config_bytes);
    p += info->config_bytes;
    if (state_out && state_bytes) memcpy(state_out, p, state_bytes);
    p += info->state_bytes;
    nb = s->numel * sizeof(float);
    memcpy(s->params, p, nb);
    p += nb;
    if (info->has_moments && s->adam_m && s->adam_v) {
        memcpy(s->adam_m, p, nb);
        memcpy(s->adam_v, p + nb, nb);
    } else if (s->adam_m && s->adam_v) { /* fresh moments for a store that has them */
        memset(s->adam_m, 0, nb);
        memset(s->adam_v, 0, nb);
    }
    if (step) *step = info->step;
    return MOE_OK;
}

MOE__IMPL moe_status moe_checkpoint_load(const char *path, moe_store *s, long long *step,
                                         const void *expect_config, void *config_out,
                                         size_t config_bytes, void *state_out, size_t state_bytes,
                                         moe_err *err) {
    unsigned char *b;
    size_t len;
    moe_ckpt_info info;
    moe_status st;
    if (!s || !s->params) return moe_err_set(err, MOE_ERR_INVALID_ARG, "checkpoint load needs an allocated store");
    st = moe__ckpt_read(path, &b, &len, &info, err);
    if (st != MOE_OK) return st;
    st = moe__ckpt_load_bytes(path, s, step, b, &info, expect_config, config_out, config_bytes, state_out, state_bytes, err);
    MOE_FREE(b);
    return st;
}
#endif /* MOE_NO_STDIO */

