/* proc.h - runs a program as a user would, without a shell, for the tests that drive the
 * examples: argv in, exit status out, stdout and stderr together in a log file.
 *
 *   proc_opts o = proc_opts_default();
 *   o.env[0] = "OMP_NUM_THREADS=1";
 *   rc = proc_run(&o, "build/t/x.log", "build/examples/train_lm", "--quick", (const char *)NULL);
 *   if (rc == 0 && proc_log_has("build/t/x.log", "result")) ...
 *
 * proc_run returns the exit status, 128 + the signal that ended the program, or -1 when it
 * could not be started. proc_start / proc_wait do the same in two steps (a test that kills the
 * program in between). Options: extra environment variables; a file-size limit (RLIMIT_FSIZE:
 * writes past it fail with EFBIG, SIGXFSZ ignored; how a test injects a write error, like a full
 * disk); and running as the unprivileged user 65534 when the test runs as root, so that read-only
 * directories refuse writes there too. POSIX; the test file defines _POSIX_C_SOURCE 200809L
 * before any include.
 *
 * Which binary: proc_example("train_lm") is build/examples/train_lm, or MOE_EXAMPLES_DIR/train_lm
 * when that is set (make test-asan: the examples built with ASan and UBSan); proc_bench("matmul")
 * the same for the benchmarks with MOE_BENCH_DIR. proc_sanitized() says whether the examples are
 * the sanitized ones (a test may then give a slow run a smaller configuration).
 * Folders: proc_mkdirs (files_mkdirs of examples/files.h, "mkdir -p") and proc_rmtree ("rm -rf"),
 * both without a shell. proc_file_lines counts a file's lines.
 */
#ifndef MOE_TEST_PROC_H
#define MOE_TEST_PROC_H

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#include "examples/files.h" /* defines: files_mkdirs */

#if defined(__GNUC__) || defined(__clang__)
#define PROC_FN static __attribute__((unused))
#else
#define PROC_FN static
#endif

typedef struct proc_opts {
    const char *env[4]; /* "NAME=value" put in the child's environment; NULL ends the list */
    long fsize_limit;   /* > 0: the largest file the child may write, in bytes               */
    int as_nobody;      /* 1: drop to uid/gid 65534 when running as root                      */
} proc_opts;

PROC_FN proc_opts proc_opts_default(void) {
    proc_opts o;
    memset(&o, 0, sizeof o);
    return o;
}

/* 1 when the tests run as root (file permissions do not stop root) */
PROC_FN int proc_is_root(void) { return geteuid() == 0; }

/* starts argv (argv[0] is a path, not looked up), output to `log` ("/dev/null" to drop it);
   the child's process id, or -1. proc_wait collects it. */
PROC_FN pid_t proc_start(const proc_opts *o, const char *log, const char *const *argv) {
    pid_t pid;
    int k;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd < 0) _exit(126);
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
        if (o) {
            for (k = 0; k < 4 && o->env[k]; k++) {
                char name[128];
                const char *eq = strchr(o->env[k], '=');
                if (!eq || eq - o->env[k] >= (long)sizeof name) _exit(126);
                memcpy(name, o->env[k], (size_t)(eq - o->env[k]));
                name[eq - o->env[k]] = 0;
                setenv(name, eq + 1, 1);
            }
            if (o->fsize_limit > 0) {
                struct rlimit rl;
                rl.rlim_cur = rl.rlim_max = (rlim_t)o->fsize_limit;
                signal(SIGXFSZ, SIG_IGN); /* a write past the limit fails with EFBIG instead */
                if (setrlimit(RLIMIT_FSIZE, &rl) != 0) _exit(126);
            }
            if (o->as_nobody && geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) _exit(126);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

/* waits for a child of proc_start: its exit status, 128 + the signal that ended it, or -1 */
PROC_FN int proc_wait(pid_t pid) {
    int status;
    if (pid < 0) return -1;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return -1;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
}

/* runs argv to its end: proc_start, then proc_wait */
PROC_FN int proc_runv(const proc_opts *o, const char *log, const char *const *argv) { return proc_wait(proc_start(o, log, argv)); }

/* the same with the arguments listed, ending with (const char *)NULL */
PROC_FN int proc_run(const proc_opts *o, const char *log, const char *arg0, ...) {
    const char *argv[64];
    int n = 0;
    va_list ap;
    argv[n++] = arg0;
    va_start(ap, arg0);
    while (n < 63 && (argv[n] = va_arg(ap, const char *)) != NULL) n++;
    va_end(ap);
    argv[n] = NULL;
    return proc_runv(o, log, argv);
}

/* the whole file in a malloc'ed, NUL-terminated buffer ("" when it cannot be read) */
PROC_FN char *proc_slurp(const char *path, long *len) {
    FILE *f = fopen(path, "rb");
    long n = 0;
    char *b;
    if (f && fseek(f, 0, SEEK_END) == 0) n = ftell(f);
    if (n < 0) n = 0;
    b = (char *)malloc((size_t)n + 1);
    if (!b) {
        if (f) fclose(f);
        return NULL;
    }
    if (f) {
        fseek(f, 0, SEEK_SET);
        n = (long)fread(b, 1, (size_t)n, f);
        fclose(f);
    }
    b[n] = 0;
    if (len) *len = n;
    return b;
}

/* proc_run, and then the log's text in out (cap bytes, cut there) */
PROC_FN int proc_run_out(const proc_opts *o, const char *log, char *out, size_t cap, const char *arg0, ...) {
    const char *argv[64];
    char *text;
    int n = 0, rc;
    va_list ap;
    argv[n++] = arg0;
    va_start(ap, arg0);
    while (n < 63 && (argv[n] = va_arg(ap, const char *)) != NULL) n++;
    va_end(ap);
    argv[n] = NULL;
    rc = proc_runv(o, log, argv);
    text = proc_slurp(log, NULL);
    snprintf(out, cap, "%s", text ? text : "");
    free(text);
    return rc;
}

/* does the file contain `needle`? */
/* the number of line ends in a file, -1 when it cannot be read (a CSV's rows + header) */
PROC_FN long proc_file_lines(const char *path) {
    FILE *f = fopen(path, "r");
    long n = 0;
    int ch;
    if (!f) return -1;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

PROC_FN int proc_log_has(const char *path, const char *needle) {
    char *b = proc_slurp(path, NULL);
    int found = b && strstr(b, needle) != NULL;
    free(b);
    return found;
}

/* 1 when the examples come from MOE_EXAMPLES_DIR (make test-asan) */
PROC_FN int proc_sanitized(void) {
    const char *d = getenv("MOE_EXAMPLES_DIR");
    return d && d[0];
}

/* `dflt`/<name>, or $env/<name> when that variable is set; a rotating set of buffers, so a few
   such paths can be held at once */
PROC_FN const char *proc__program(const char *env, const char *dflt, const char *name) {
    static char buf[16][512];
    static int next;
    const char *d = getenv(env);
    char *b = buf[next++ % 16];
    snprintf(b, sizeof buf[0], "%s/%s", d && d[0] ? d : dflt, name);
    return b;
}

/* an example's program: build/examples/<name>, or MOE_EXAMPLES_DIR/<name> */
PROC_FN const char *proc_example(const char *name) { return proc__program("MOE_EXAMPLES_DIR", "build/examples", name); }

/* a benchmark's program: build/bench/<name>, or MOE_BENCH_DIR/<name> */
PROC_FN const char *proc_bench(const char *name) { return proc__program("MOE_BENCH_DIR", "build/bench", name); }

/* mkdir -p `path`: 0, or -1 with the reason printed */
PROC_FN int proc_mkdirs(const char *path) {
    files_err e;
    if (files_mkdirs(path, &e) == 0) return 0;
    printf("%s\n", e.msg);
    return -1;
}

/* rm -rf `path`: the file, or the folder and everything under it (links removed, not followed);
   0 when nothing of it is left (a missing path included), else -1 */
PROC_FN int proc_rmtree(const char *path) {
    struct stat st;
    if (lstat(path, &st) != 0) return errno == ENOENT ? 0 : -1;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        int rc = 0;
        size_t n = strlen(path);
        if (!d) return -1;
        while ((e = readdir(d)) != NULL) {
            char *sub;
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
            sub = (char *)malloc(n + strlen(e->d_name) + 2);
            if (!sub) {
                rc = -1;
                continue;
            }
            sprintf(sub, "%s/%s", path, e->d_name);
            if (proc_rmtree(sub) != 0) rc = -1;
            free(sub);
        }
        closedir(d);
        return rmdir(path) == 0 && rc == 0 ? 0 : -1;
    }
    return unlink(path) == 0 ? 0 : -1;
}

#endif /* MOE_TEST_PROC_H */
