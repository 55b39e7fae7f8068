/* test_ckpt_io.c - checkpoint files under stress: two processes saving to one path while a
   third loads it (every load sees a whole file; no temporary file is left), a write error in
   the middle of a save (the previous checkpoint survives byte for byte, nothing is left
   behind), the n-th create, write, sync, close or rename failing through the I/O hooks for
   every n, in a checkpoint save and in a model save (the same), CRC-valid files holding NaN, huge or negative-variance values (refused with a
   sentence naming the tensor, the store unchanged), a directory given as a checkpoint, and
   moe_model_param_count against the allocated model. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_checkpoint_*, moe_store_*, moe_model_param_count */
#include "test.h"
#include "proc.h" /* defines: proc_slurp, proc_is_root */

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* a store of two tensors, allocated with moments, every value `v` */
static void make_store(moe_store *s, float v) {
    size_t i;
    moe_store_init(s);
    moe_store_add(s, "alpha", 0, 1000, 0, 0, 0);
    moe_store_add(s, "beta", MOE_TENSOR_DECAY, 30, 70, 0, 0);
    moe_store_alloc(s, 1);
    for (i = 0; i < s->numel; i++) {
        s->params[i] = v;
        s->adam_m[i] = 0.5f * v;
        s->adam_v[i] = 0.25f;
    }
}

/* entries of dir whose name starts with prefix */
static int count_entries(const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    if (!d) return -1;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    closedir(d);
    return n;
}

static void test_concurrent_writers(const char *dir) {
    enum { SAVES = 40, LOADS = 200 };
    char path[256];
    pid_t w[2];
    int k, status, whole = 0, format_errors = 0, mixed = 0, ok_writers = 0;
    moe_store r;
    moe_err err;
    TEST_BEGIN("two processes save to one checkpoint path while a third loads it");
    snprintf(path, sizeof path, "%s/shared.ckpt", dir);
    make_store(&r, 0.0f);
    for (k = 0; k < 2; k++) {
        w[k] = fork();
        if (w[k] == 0) { /* writer k: every value k + 1 */
            moe_store s;
            int i, fails = 0;
            make_store(&s, (float)(k + 1));
            for (i = 0; i < SAVES; i++) fails += moe_checkpoint_save(path, &s, 1, i, NULL, 0, NULL, 0, &err) != MOE_OK;
            moe_store_free(&s);
            _exit(fails ? 1 : 0);
        }
    }
    for (k = 0; k < LOADS; k++) {
        moe_status st = moe_checkpoint_load(path, &r, NULL, NULL, NULL, 0, NULL, 0, &err);
        if (st == MOE_OK) {
            size_t i;
            whole++;
            for (i = 1; i < r.numel; i++)
                if (r.params[i] != r.params[0]) { mixed++; break; }
        } else if (st == MOE_ERR_FORMAT) {
            format_errors++;
        }
    }
    for (k = 0; k < 2; k++)
        if (waitpid(w[k], &status, 0) == w[k] && WIFEXITED(status) && WEXITSTATUS(status) == 0) ok_writers++;
    CHECK(ok_writers == 2, "both writers saved %d times without an error", SAVES);
    CHECK(format_errors == 0 && mixed == 0, "every load saw one writer's whole file (%d loads ok, %d CRC/format errors, %d mixed)", whole,
          format_errors, mixed);
    CHECK(moe_checkpoint_load(path, &r, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_OK && (r.params[0] == 1.0f || r.params[0] == 2.0f),
          "the final file is one writer's: %s", err.msg);
    CHECK(count_entries(dir, "shared.ckpt.") == 0, "no temporary file is left beside the checkpoint");
    moe_store_free(&r);
}

static void test_write_error(const char *dir) {
    char path[256];
    char *before, *after;
    long n_before = 0, n_after = 0;
    pid_t pid;
    int status = 0;
    moe_store s;
    moe_err err;
    TEST_BEGIN("a write error in the middle of a save leaves the previous checkpoint byte for byte, and no temporary file");
    snprintf(path, sizeof path, "%s/keep.ckpt", dir);
    make_store(&s, 3.0f);
    CHECK(moe_checkpoint_save(path, &s, 0, 7, NULL, 0, NULL, 0, &err) == MOE_OK, "first save: %s", err.msg);
    before = proc_slurp(path, &n_before);
    pid = fork();
    if (pid == 0) { /* files may not grow past 1 KB here: the save's write fails with EFBIG */
        struct rlimit rl;
        rl.rlim_cur = rl.rlim_max = 1024;
        signal(SIGXFSZ, SIG_IGN);
        setrlimit(RLIMIT_FSIZE, &rl);
        s.params[0] = 9.0f;
        _exit(moe_checkpoint_save(path, &s, 1, 8, NULL, 0, NULL, 0, &err) == MOE_ERR_IO && strstr(err.msg, "unchanged") ? 0 : 1);
    }
    CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0, "the save reports MOE_ERR_IO, 'unchanged'");
    after = proc_slurp(path, &n_after);
    CHECK(before && after && n_before == n_after && n_before > 1024 && memcmp(before, after, (size_t)n_before) == 0,
          "the previous checkpoint is byte-identical (%ld bytes)", n_before);
    CHECK(count_entries(dir, "keep.ckpt.") == 0, "no temporary file is left");
    free(before);
    free(after);
    moe_store_free(&s);
}

/* ---- an I/O failure shim (SQLite's way): the real calls, except that the n-th call of one
   kind fails, as a full disk, a failing device or a refused rename would ---- */
enum { OP_CREATE, OP_WRITE, OP_SYNC, OP_CLOSE, OP_RENAME, OP_SYNC_DIR, OP_KINDS };
static const char *const op_name[OP_KINDS] = {"create", "write", "sync", "close", "rename", "directory sync"};

typedef struct shim {
    moe_ckpt_io real;
    int fail_op, fail_at, fail_errno; /* the fail_at-th call (from 1) of fail_op fails with fail_errno; 0: none */
    int calls[OP_KINDS];
} shim;

static int shim_fails(shim *s, int op) {
    if (++s->calls[op] != s->fail_at || op != s->fail_op) return 0;
    errno = s->fail_errno;
    return 1;
}
static void *shim_create(void *ctx, const char *path) {
    shim *s = (shim *)ctx;
    return shim_fails(s, OP_CREATE) ? NULL : s->real.create(s->real.ctx, path);
}
static int shim_write(void *ctx, void *file, const void *buf, size_t n) {
    shim *s = (shim *)ctx;
    if (shim_fails(s, OP_WRITE)) { /* half of it reaches the file, as when the disk fills */
        int e = errno;
        s->real.write(s->real.ctx, file, buf, n / 2);
        errno = e;
        return -1;
    }
    return s->real.write(s->real.ctx, file, buf, n);
}
static int shim_sync(void *ctx, void *file) {
    shim *s = (shim *)ctx;
    return shim_fails(s, OP_SYNC) ? -1 : s->real.sync(s->real.ctx, file);
}
static int shim_close(void *ctx, void *file) { /* the descriptor is released even when close fails (POSIX) */
    shim *s = (shim *)ctx;
    int rc = s->real.close(s->real.ctx, file);
    return shim_fails(s, OP_CLOSE) ? -1 : rc;
}
static int shim_rename(void *ctx, const char *from, const char *to) {
    shim *s = (shim *)ctx;
    return shim_fails(s, OP_RENAME) ? -1 : s->real.rename(s->real.ctx, from, to);
}
static int shim_remove(void *ctx, const char *path) {
    shim *s = (shim *)ctx;
    return s->real.remove(s->real.ctx, path);
}
static int shim_sync_dir(void *ctx, const char *dir) {
    shim *s = (shim *)ctx;
    return shim_fails(s, OP_SYNC_DIR) ? -1 : s->real.sync_dir(s->real.ctx, dir);
}

static moe_ckpt_io shim_io(shim *s, int op, int at, int e) {
    moe_ckpt_io io;
    memset(s, 0, sizeof *s);
    s->real = moe_ckpt_io_default();
    s->fail_op = op;
    s->fail_at = at;
    s->fail_errno = e;
    io.create = shim_create; io.write = shim_write; io.sync = shim_sync; io.close = shim_close;
    io.rename = shim_rename; io.remove = shim_remove; io.sync_dir = shim_sync_dir;
    io.ctx = s;
    return io;
}

/* what is saved: a store of 3.0s (old) or 5.0s (new), or a small model of seed 1 or 2 */
typedef struct saver {
    int model;
    moe_store s_old, s_new;
    moe_model m_old, m_new;
} saver;

static moe_status save_with(saver *v, int newer, const char *path, const moe_ckpt_io *io, moe_err *err) {
    static const char user[] = "the caller's state";
    if (v->model) return moe_model_save_ex(newer ? &v->m_new : &v->m_old, path, 1, newer ? 9 : 8, user, sizeof user, io, err);
    return moe_checkpoint_save_ex(path, newer ? &v->s_new : &v->s_old, 1, newer ? 9 : 8, NULL, 0, user, sizeof user, io, err);
}

static void test_io_failures(const char *dir, int model) {
    char path[256], count_path[256], prefix[64];
    char *before = NULL, *now = NULL;
    long n_before = 0, n_now = 0;
    saver v;
    shim sh;
    moe_ckpt_io io;
    moe_err err;
    moe_status st;
    int op, n, calls[OP_KINDS], injected = 0, ok_cases = 0;
    TEST_BEGIN(model ? "the n-th create, write, sync, close or rename fails in a model save, for every n: the previous file survives, nothing is left"
                     : "the n-th create, write, sync, close or rename fails in a checkpoint save, for every n: the previous file survives, nothing is left");
    memset(&v, 0, sizeof v);
    v.model = model;
    if (model) {
        moe_model_config c = moe_model_config_default();
        c.d = 16; c.n_heads = 2; c.n_layers = 2; c.max_seq = 8; c.d_ff = 24; c.moe.d_ff = 8; c.moe.n_experts = 4;
        CHECK(moe_model_init(&v.m_old, &c, 1, 8) == MOE_OK && moe_model_init(&v.m_new, &c, 1, 8) == MOE_OK, "two small models");
        moe_model_init_weights(&v.m_old, 1);
        moe_model_init_weights(&v.m_new, 2);
    } else {
        make_store(&v.s_old, 3.0f);
        make_store(&v.s_new, 5.0f);
    }
    snprintf(prefix, sizeof prefix, "%s.", model ? "model.bin" : "io.ckpt");
    snprintf(path, sizeof path, "%s/%s", dir, model ? "model.bin" : "io.ckpt");
    snprintf(count_path, sizeof count_path, "%s/count.ckpt", dir);
    /* the calls one save makes, counted on a save elsewhere */
    io = shim_io(&sh, -1, 0, 0);
    CHECK(save_with(&v, 1, count_path, &io, &err) == MOE_OK, "a save through the shim that fails nothing: %s", err.msg);
    memcpy(calls, sh.calls, sizeof calls);
    remove(count_path);
    CHECK(calls[OP_CREATE] == 1 && calls[OP_WRITE] >= 6 && calls[OP_SYNC] == 1 && calls[OP_CLOSE] == 1 && calls[OP_RENAME] == 1 &&
          calls[OP_SYNC_DIR] == 1, "one save: %d creates, %d writes, %d syncs, %d closes, %d renames, %d directory syncs", calls[OP_CREATE],
          calls[OP_WRITE], calls[OP_SYNC], calls[OP_CLOSE], calls[OP_RENAME], calls[OP_SYNC_DIR]);
    CHECK(save_with(&v, 0, path, NULL, &err) == MOE_OK, "the previous file: %s", err.msg);
    before = proc_slurp(path, &n_before);
    for (op = OP_CREATE; op <= OP_RENAME; op++)
        for (n = 1; n <= calls[op]; n++) {
            int e = op == OP_WRITE ? ENOSPC : EIO, same, left;
            io = shim_io(&sh, op, n, e);
            st = save_with(&v, 1, path, &io, &err);
            now = proc_slurp(path, &n_now);
            same = before && now && n_now == n_before && memcmp(before, now, (size_t)n_before) == 0;
            left = count_entries(dir, prefix);
            injected++;
            ok_cases += st == MOE_ERR_IO && same && left == 0 && strstr(err.msg, strerror(e)) != NULL;
            CHECK(st == MOE_ERR_IO && same && left == 0 && strstr(err.msg, strerror(e)) && (op == OP_CREATE || strstr(err.msg, "is unchanged")),
                  "%s %d of %d fails: status %d, '%s', the previous file %s, %d temporary files left", op_name[op], n, calls[op], (int)st, err.msg,
                  same ? "byte-identical" : "CHANGED", left);
            free(now);
        }
    printf("   %d failures injected, %d left the previous file byte-identical and nothing beside it\n", injected, ok_cases);
    /* a name another writer holds: the next one is taken */
    io = shim_io(&sh, OP_CREATE, 1, EEXIST);
    CHECK(save_with(&v, 0, path, &io, &err) == MOE_OK && sh.calls[OP_CREATE] == 2 && count_entries(dir, prefix) == 0,
          "a temporary name that exists: the save takes the next one: %s", err.msg);
    /* after the rename: a directory that cannot be synced is no error, the new file is whole */
    io = shim_io(&sh, OP_SYNC_DIR, 1, EINVAL);
    st = save_with(&v, 1, path, &io, &err);
    now = proc_slurp(path, &n_now);
    CHECK(st == MOE_OK && now && !(n_now == n_before && memcmp(before, now, (size_t)n_before) == 0) && count_entries(dir, prefix) == 0,
          "a failing directory sync after the rename: the save succeeds with the new file in place: %s", err.msg);
    free(now);
    if (model) {
        moe_model loaded;
        long long step = 0;
        char user[32];
        CHECK(moe_model_load(&loaded, path, 1, 8, &step, user, sizeof "the caller's state", &err) == MOE_OK && step == 9 &&
              memcmp(loaded.S.params, v.m_new.S.params, v.m_new.S.numel * sizeof(float)) == 0, "the new model file loads: %s", err.msg);
        if (loaded.S.params) moe_model_free(&loaded);
    }
    io = moe_ckpt_io_default();
    io.sync = NULL;
    CHECK(save_with(&v, 0, path, &io, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "moe_ckpt_io_default"), "a hook left unset: %s", err.msg);
    free(before);
    remove(path);
    if (model) {
        moe_model_free(&v.m_old);
        moe_model_free(&v.m_new);
    } else {
        moe_store_free(&v.s_old);
        moe_store_free(&v.s_new);
    }
}

/* saves s, then loads it into a fresh store of 4.0s: the status, the message, and whether the
   target kept every value */
static moe_status load_into_fresh(const char *path, moe_store *s, int moments, moe_err *err, int *unchanged) {
    moe_store t;
    moe_status st;
    size_t i;
    moe_checkpoint_save(path, s, moments, 1, NULL, 0, NULL, 0, err);
    make_store(&t, 4.0f);
    st = moe_checkpoint_load(path, &t, NULL, NULL, NULL, 0, NULL, 0, err);
    *unchanged = 1;
    for (i = 0; i < t.numel; i++)
        if (t.params[i] != 4.0f || t.adam_m[i] != 2.0f || t.adam_v[i] != 0.25f) *unchanged = 0;
    moe_store_free(&t);
    return st;
}

static void test_values(const char *dir) {
    char path[256];
    moe_store s;
    moe_err err;
    int same;
    TEST_BEGIN("a CRC-valid checkpoint holding NaN, huge or negative-variance values is refused with a sentence; the store is unchanged");
    snprintf(path, sizeof path, "%s/values.ckpt", dir);
    make_store(&s, 0.5f);
    s.params[1000 + 5] = NAN; /* beta, element 5 */
    CHECK(load_into_fresh(path, &s, 1, &err, &same) == MOE_ERR_FORMAT && strstr(err.msg, "NaN") && strstr(err.msg, "'beta'") &&
          strstr(err.msg, "element 5") && same, "NaN parameter: %s", err.msg);
    s.params[1000 + 5] = 1e30f;
    CHECK(load_into_fresh(path, &s, 1, &err, &same) == MOE_ERR_FORMAT && strstr(err.msg, "1e+30") && same, "huge parameter: %s", err.msg);
    s.params[1000 + 5] = -INFINITY;
    CHECK(load_into_fresh(path, &s, 0, &err, &same) == MOE_ERR_FORMAT && strstr(err.msg, "-inf") && same, "infinite parameter: %s", err.msg);
    s.params[1000 + 5] = 0.5f;
    s.adam_v[3] = -1.0f;
    CHECK(load_into_fresh(path, &s, 1, &err, &same) == MOE_ERR_FORMAT && strstr(err.msg, "second Adam moment") && strstr(err.msg, "'alpha'") && same,
          "negative variance: %s", err.msg);
    s.adam_v[3] = 0.25f;
    s.adam_m[7] = NAN;
    CHECK(load_into_fresh(path, &s, 1, &err, &same) == MOE_ERR_FORMAT && strstr(err.msg, "first Adam moment") && same, "NaN moment: %s", err.msg);
    s.adam_m[7] = 0.25f;
    s.params[0] = 1e14f; /* large but within MOE_CKPT_MAX_ABS */
    CHECK(load_into_fresh(path, &s, 1, &err, &same) == MOE_OK && !same, "finite values load: %s", err.msg);
    moe_store_free(&s);
    make_store(&s, 1.0f);
    CHECK(moe_checkpoint_load(dir, &s, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_IO && strstr(err.msg, "is a directory"),
          "a directory given as a checkpoint: %s", err.msg);
    CHECK(moe_checkpoint_load("/no/such/dir/x.ckpt", &s, NULL, NULL, NULL, 0, NULL, 0, &err) == MOE_ERR_IO &&
          strstr(err.msg, "No such file"), "a missing file says why: %s", err.msg);
    moe_store_free(&s);
}

static void test_param_count(void) {
    moe_model_config c = moe_model_config_default();
    moe_model m;
    moe_err err;
    size_t n = 0;
    int k;
    TEST_BEGIN("moe_model_param_count equals the allocated model's parameter count, and refuses a bad config");
    for (k = 0; k < 4; k++) {
        c = moe_model_config_default();
        c.d = 32; c.n_heads = 2; c.n_layers = 2; c.max_seq = 16; c.d_ff = 48; c.moe.d_ff = 24;
        if (k == 1) c.moe_every = 0;
        if (k == 2) { c.moe.n_shared = 1; c.pos = MOE_POS_ROPE; }
        if (k == 3) { c.router_input = MOE_RIN_GRU; c.router_dim = 8; c.dense_first = 1; }
        CHECK(moe_model_param_count(&c, &n, &err) == MOE_OK, "count %d: %s", k, err.msg);
        CHECK(moe_model_init(&m, &c, 2, 8) == MOE_OK && m.S.numel == n, "config %d: %zu counted, %zu allocated", k, n, m.S.numel);
        moe_model_free(&m);
    }
    c.n_heads = 5;
    CHECK(moe_model_param_count(&c, &n, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "n_heads"), "bad config: %s", err.msg);
}

int main(void) {
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/moe_ckpt_io_%d", (int)getpid());
    if (mkdir(dir, 0777) != 0) {
        printf("cannot create %s: %s\n", dir, strerror(errno));
        return 1;
    }
    test_concurrent_writers(dir);
    test_write_error(dir);
    test_io_failures(dir, 0);
    test_io_failures(dir, 1);
    test_values(dir);
    test_param_count();
    {
        char p[300];
        const char *names[3] = {"shared.ckpt", "keep.ckpt", "values.ckpt"};
        int i;
        for (i = 0; i < 3; i++) {
            snprintf(p, sizeof p, "%s/%s", dir, names[i]);
            remove(p);
        }
        CHECK(rmdir(dir) == 0, "the test folder held only the checkpoints");
    }
    return test_summary();
}
