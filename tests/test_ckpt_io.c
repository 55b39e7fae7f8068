/* test_ckpt_io.c - checkpoint files under stress: two processes saving to one path while a
   third loads it (every load sees a whole file; no temporary file is left), a write error in
   the middle of a save (the previous checkpoint survives byte for byte, nothing is left
   behind), CRC-valid files holding NaN, huge or negative-variance values (refused with a
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
