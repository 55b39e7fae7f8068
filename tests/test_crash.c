/* test_crash.c - crash safety of a checkpointing run: examples/train_lm, saving every step, is
 * killed with SIGKILL at random moments (a seeded draw over the length of a whole run: while it
 * reads the corpus, trains, writes its log or a checkpoint) and restarted as a user would, with
 * --resume from its checkpoint when there is one. After every kill the newest complete
 * checkpoint must load (moe_model_load: CRC, config, state, finite values) and hold a step no
 * earlier than before the run, and --resume from a copy of it must finish with the checkpoint
 * and log of the uninterrupted run, byte for byte; at the end the chain of killed runs itself
 * finishes with them. Programs start without a shell (tests/proc.h). Needs the Brown corpus
 * (make data): skipped without it. Under make test-asan it runs the sanitized train_lm
 * (tests/proc.h's proc_example): the kill moments scale with the measured length of a run, and
 * the model is already the small one test_examples gives the sanitized builds; 10 kills there. */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"  /* defines: moe_model_load, moe_model_load_config, moe_rng_* */
#include "test.h" /* defines: CHECK, TEST_BEGIN, test_summary */
#include "proc.h" /* defines: proc_start, proc_wait, proc_run, proc_slurp, proc_example, proc_rmtree */

#include <dirent.h>
#include <time.h>

#define END ((const char *)NULL)
#define LM proc_example("train_lm")

static char D[64]; /* the test folder */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void sleep_seconds(double s) {
    struct timespec t;
    t.tv_sec = (time_t)s;
    t.tv_nsec = (long)((s - (double)t.tv_sec) * 1e9);
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

static void path_of(char *out, size_t cap, const char *name, const char *ext) { snprintf(out, cap, "%s/%s%s", D, name, ext); }

static int exists(const char *path) { return access(path, F_OK) == 0; }

static int files_equal(const char *a, const char *b) {
    long na = 0, nb = 0;
    char *x = proc_slurp(a, &na), *y = proc_slurp(b, &nb);
    int same = x && y && exists(a) && exists(b) && na == nb && memcmp(x, y, (size_t)na) == 0;
    free(x);
    free(y);
    return same;
}

static int copy_file(const char *src, const char *dst) {
    long n = 0;
    char *b = proc_slurp(src, &n);
    FILE *f = fopen(dst, "wb");
    int ok = b && f && fwrite(b, 1, (size_t)n, f) == (size_t)n;
    if (f && fclose(f) != 0) ok = 0;
    free(b);
    return ok;
}

/* A train_lm run of --quick size (30 steps of a model of ~15k parameters) with a checkpoint
   every step, named `name` in D, resumed from D/name.ckpt when `resume`; one thread unless
   `threads` says otherwise. kill_after >= 0: SIGKILL after that many seconds. The exit status
   (128 + 9 when the kill ended it). */
static int run_lm(const char *name, int resume, double kill_after, const char *threads) {
    char ckpt[128], log[128];
    const char *argv[32];
    int n = 0;
    pid_t pid;
    proc_opts o = proc_opts_default();
    o.env[0] = threads;
    path_of(ckpt, sizeof ckpt, name, ".ckpt");
    path_of(log, sizeof log, name, ".log");
    argv[n++] = LM;
    argv[n++] = "--quick"; argv[n++] = "--d"; argv[n++] = "16"; argv[n++] = "--heads"; argv[n++] = "1";
    argv[n++] = "--layers"; argv[n++] = "2"; argv[n++] = "--experts"; argv[n++] = "4"; argv[n++] = "--expert-ff"; argv[n++] = "16";
    argv[n++] = "--d-ff"; argv[n++] = "32"; argv[n++] = "--sample"; argv[n++] = "0"; argv[n++] = "--save-every"; argv[n++] = "1";
    argv[n++] = "--out"; argv[n++] = D; argv[n++] = "--name"; argv[n++] = name;
    if (resume) { argv[n++] = "--resume"; argv[n++] = ckpt; }
    argv[n] = NULL;
    pid = proc_start(&o, log, argv);
    if (pid > 0 && kill_after >= 0.0) {
        sleep_seconds(kill_after);
        kill(pid, SIGKILL); /* a child that already ended is a zombie until waited for: the pid is still ours */
    }
    return proc_wait(pid);
}

/* The checkpoint loads as a program would load it: config, then model, parameters, moments
   and train_lm's state blob. Its step in *step; 0 with a sentence in why when it does not. */
static int ckpt_loads(const char *path, long long *step, char *why, size_t cap) {
    moe_model_config c;
    moe_ckpt_info info;
    moe_model m;
    moe_err err;
    unsigned char *blob;
    int ok;
    if (moe_model_load_config(path, &c, &info, &err) != MOE_OK) {
        snprintf(why, cap, "%s", err.msg);
        return 0;
    }
    blob = (unsigned char *)malloc((size_t)info.state_bytes + 1);
    if (!blob) {
        snprintf(why, cap, "out of memory");
        return 0;
    }
    ok = moe_model_load(&m, path, 1, 0, step, blob, (size_t)info.state_bytes, &err) == MOE_OK;
    if (!ok) snprintf(why, cap, "%s", err.msg);
    else if (info.state_bytes < 8 || memcmp(blob, "train_lm", 8) != 0) {
        snprintf(why, cap, "its state blob is not train_lm's");
        ok = 0;
    }
    if (ok) moe_model_free(&m);
    free(blob);
    return ok;
}

/* removes the temporary files killed writers left in D (<name>.<pid>-<n>.tmp): their count */
static int remove_leftovers(void) {
    DIR *d = opendir(D);
    struct dirent *e;
    int n = 0;
    while (d && (e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        char p[400];
        if (len > 4 && strcmp(e->d_name + len - 4, ".tmp") == 0) {
            snprintf(p, sizeof p, "%s/%.300s", D, e->d_name);
            n += remove(p) == 0;
        }
    }
    if (d) closedir(d);
    return n;
}

static void remove_run(const char *name) {
    static const char *const ext[] = {".ckpt", ".csv", ".log", "_loss.png", "_load.png"};
    char p[128];
    int i;
    for (i = 0; i < 5; i++) {
        path_of(p, sizeof p, name, ext[i]);
        remove(p);
    }
}

static void test_kills(void) {
    char ref_ckpt[128], ref_csv[128], ckpt[128], csv[128], v_ckpt[128], v_csv[128], why[1200];
    double t0, t_run, start = now();
    moe_rng rng;
    int k, killed = 0, finished = 0, fresh = 0, with_ckpt = 0, verified = 0, leftovers, chain = 0, longest = 0;
    long long step = -1, before;
    /* a sanitized run takes 5-15x as long (30 kills took 3.5 min on 2 busy cores): 10 kills there */
    const int kills = proc_sanitized() ? 10 : 30;
    TEST_BEGIN("train_lm killed with SIGKILL at random moments (30 times; 10 under the sanitizers): the newest checkpoint loads, --resume ends as the "
               "uninterrupted run");
    path_of(ref_ckpt, sizeof ref_ckpt, "ref", ".ckpt");
    path_of(ref_csv, sizeof ref_csv, "ref", ".csv");
    path_of(ckpt, sizeof ckpt, "crash", ".ckpt");
    path_of(csv, sizeof csv, "crash", ".csv");
    path_of(v_ckpt, sizeof v_ckpt, "verify", ".ckpt");
    path_of(v_csv, sizeof v_csv, "verify", ".csv");
    t0 = now();
    CHECK(run_lm("ref", 0, -1.0, "OMP_NUM_THREADS=1") == 0 && exists(ref_ckpt), "the uninterrupted run (see %s/ref.log)", D);
    t_run = now() - t0;
    if (!exists(ref_ckpt)) return;
    moe_rng_seed(&rng, 20240607);
    for (k = 0; k < kills; k++) {
        /* a moment in the first 80% of a whole run's time: a resumed run has less to do and may
           finish first, so a chain of runs gets further with every kill */
        double at = 0.8 * t_run * moe_rng_uniform(&rng);
        int resume = exists(ckpt), rc;
        before = step;
        rc = run_lm("crash", resume, at, "OMP_NUM_THREADS=1");
        if (rc == 128 + SIGKILL) killed++;
        else CHECK(rc == 0, "kill %d: the run ended by itself with status %d (see %s/crash.log)", k, rc, D);
        fresh += !resume;
        chain = resume ? chain + 1 : 1;
        longest = chain > longest ? chain : longest;
        if (!exists(ckpt)) { /* killed before its first checkpoint: the next run starts afresh */
            CHECK(!resume, "kill %d: the checkpoint the run resumed from is gone", k);
            step = -1;
            continue;
        }
        with_ckpt++;
        CHECK(ckpt_loads(ckpt, &step, why, sizeof why), "kill %d after %.3f s: the newest checkpoint loads: %s", k, at, why);
        CHECK(step >= before && step >= 1 && step <= 30, "kill %d: the checkpoint holds step %lld (before the run: %lld)", k, step, before);
        /* --resume from a copy of it runs to the end of the uninterrupted run, byte for byte */
        if (copy_file(ckpt, v_ckpt) && copy_file(csv, v_csv)) {
            rc = run_lm("verify", 1, -1.0, "OMP_NUM_THREADS=1");
            CHECK(rc == 0 && files_equal(v_ckpt, ref_ckpt) && files_equal(v_csv, ref_csv),
                  "kill %d: --resume from step %lld ends with the uninterrupted run's checkpoint and log (status %d; see %s/verify.log)", k, step,
                  rc, D);
            verified += rc == 0;
        } else {
            CHECK(0, "kill %d: the checkpoint and the log can be copied", k);
        }
        if (step == 30) { /* the chain's run had saved its last step: start another */
            finished++;
            remove_run("crash");
            step = -1;
        }
    }
    /* the chain of killed runs, resumed once more (with two threads), finishes as the
       uninterrupted run */
    if (exists(ckpt)) {
        CHECK(run_lm("crash", 1, -1.0, "OMP_NUM_THREADS=2") == 0 && files_equal(ckpt, ref_ckpt) && files_equal(csv, ref_csv),
              "the chain of killed runs, resumed with two threads, ends with the uninterrupted run's checkpoint and log (see %s/crash.log)", D);
    }
    leftovers = remove_leftovers();
    printf("   %d kills (%d runs killed, %d ended first; %d started afresh, %d chains finished, the longest of %d runs), %d left a checkpoint, %d resumed to the same "
           "bytes; %d temporary files left by killed writers; one run %.2f s, %.1f s in all\n",
           kills, killed, kills - killed, fresh, finished, longest, with_ckpt, verified, leftovers, t_run, now() - start);
    CHECK(killed >= kills / 2 && with_ckpt >= kills / 3, "the kills fell inside runs (%d killed) and after checkpoints (%d)", killed, with_ckpt);
}

int main(void) {
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    if (!f) {
        printf("SKIP test_crash: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return test_summary();
    }
    fclose(f);
    if (access(LM, X_OK) != 0) {
        printf("SKIP test_crash: %s is not built (make test builds it)\n", LM);
        return test_summary();
    }
    snprintf(D, sizeof D, "/tmp/moe_crash_%d", (int)getpid());
    if (mkdir(D, 0755) != 0) {
        printf("cannot create %s: %s\n", D, strerror(errno));
        return 1;
    }
    test_kills();
    /* clean up on success; a failure keeps the folder to look at */
    if (test_failed_count == 0 && proc_rmtree(D) != 0) printf("could not remove %s\n", D);
    return test_summary();
}
