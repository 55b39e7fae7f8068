/* files.h - the examples' file handling, without a shell.
 *
 *   directories    files_mkdirs: mkdir(2) for each component of a path ("mkdir -p")
 *   reading        files_open_read / files_close_read: a plain file, or a .gz (.xz) file through
 *                  a `gzip -dc` (`xz -dc`) child started with an argument vector (no shell parses the path)
 *                  whose exit status is checked, so a truncated archive is an error and not
 *                  half of the data
 *   child output   files_spawn_read / files_spawn_close: any program's stdout, argv only
 *   atomic writes  files_atomic_open / files_atomic_commit: a temporary file with a name no
 *                  other writer holds, in the same directory; fsync; rename; fsync of the
 *                  directory, so a crash leaves the old file or the new one, never a mix
 *
 * Every function that can fail fills a files_err with a sentence that names the path and the
 * problem ("'x' is a directory, not a file", "cannot open 'x': No such file or directory").
 * Static functions: include it in the one .c file that uses it, and define
 * _POSIX_C_SOURCE 200809L before any include there. Without POSIX (e.g. Windows) reading plain
 * files and writing still work; .gz input, child programs and nested directories say that
 * they need POSIX.
 */
#ifndef FILES_H
#define FILES_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#define FILES_POSIX 1
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FILES_FN static __attribute__((unused)) /* a program may use only some of them */
#else
#define FILES_FN static
#endif

typedef struct files_err {
    char msg[1200]; /* a sentence naming the path and the problem */
} files_err;

/* an open input: a plain file, or the read end of a decompressing child */
typedef struct files_reader {
    FILE *f;
    long pid;         /* the gzip or xz child, or 0 */
    const char *path; /* as given */
    const char *tool; /* "gzip" or "xz" when pid is set */
} files_reader;

typedef struct files_atomic {
    FILE *f;
    char tmp[4200];  /* the temporary file's name */
    char path[4096]; /* the file it becomes */
} files_atomic;

/* fmt has two %s: the path (cut to 1000 bytes in the sentence) and the reason */
static void files__set(files_err *e, const char *fmt, const char *path, const char *why) {
    char p[1001];
    snprintf(p, sizeof p, "%.1000s", path);
    if (e) snprintf(e->msg, sizeof e->msg, fmt, p, why);
}

/* The folder that holds preferences/ (HH-RLHF, AlpacaEval): $MOE_SHARED_DATA when set, else
   data/ when `make data-preferences` has filled it, else ../shared/data. A program's --data
   flag overrides it; the programs skip the real-data parts with a message when it is absent. */
FILES_FN const char *files_data_root(void) {
    const char *env = getenv("MOE_SHARED_DATA");
    FILE *f;
    if (env && env[0]) return env;
    f = fopen("data/preferences/hh-rlhf/LICENSE", "rb"); /* the downloader writes it last */
    if (f) {
        fclose(f);
        return "data";
    }
    return "../shared/data";
}

FILES_FN int files_ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* 0 when `path` is something to read (a regular file, a pipe, a device); -1 with a sentence
   when it is missing, unreadable or a directory */
FILES_FN int files_check_input(const char *path, files_err *e) {
#ifdef FILES_POSIX
    struct stat st;
    if (stat(path, &st) != 0) {
        files__set(e, "cannot open '%s': %s", path, strerror(errno));
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        files__set(e, "'%s' is a directory, not a file%s", path, "");
        return -1;
    }
    if (access(path, R_OK) != 0) {
        files__set(e, "cannot read '%s': %s", path, strerror(errno));
        return -1;
    }
#else
    FILE *f = fopen(path, "rb");
    if (!f) {
        files__set(e, "cannot open '%s': %s", path, strerror(errno));
        return -1;
    }
    fclose(f);
#endif
    return 0;
}

/* mkdir -p: creates every missing component of `path`; an existing directory is fine */
FILES_FN int files_mkdirs(const char *path, files_err *e) {
#ifdef FILES_POSIX
    char buf[4096];
    size_t n = strlen(path), i;
    struct stat st;
    if (n == 0 || n >= sizeof buf) {
        files__set(e, "cannot create directory '%s': %s", path, n ? "the path is too long" : "the path is empty");
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != 0) continue;
        if (buf[i - 1] == '/') continue; /* "a//b" */
        buf[i] = 0;
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) {
            if (e) snprintf(e->msg, sizeof e->msg, "cannot create directory '%.500s': %s (creating '%.500s')", path, strerror(errno), buf);
            return -1;
        }
        if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode)) {
            if (e) snprintf(e->msg, sizeof e->msg, "cannot create directory '%.500s': '%.500s' exists and is not a directory", path, buf);
            return -1;
        }
        buf[i] = path[i];
    }
    return 0;
#else
    (void)path;
    files__set(e, "cannot create directory '%s': %s", path, "creating directories needs POSIX here; create it by hand");
    return -1;
#endif
}

/* Starts argv[0] (looked up in PATH) with argv, no shell; its stdout is the returned stream,
   its stderr ours (or /dev/null with quiet = 1). *pid gets the child for files_spawn_close.
   NULL with a sentence on failure. */
FILES_FN FILE *files_spawn_read(const char *const *argv, int quiet, long *pid, files_err *e) {
#ifdef FILES_POSIX
    int fd[2], rc;
    pid_t child;
    posix_spawn_file_actions_t fa;
    FILE *f;
    *pid = 0;
    if (pipe(fd) != 0) {
        files__set(e, "cannot start '%s': %s", argv[0], strerror(errno));
        return NULL;
    }
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd[1], 1);
    posix_spawn_file_actions_addclose(&fa, fd[0]);
    posix_spawn_file_actions_addclose(&fa, fd[1]);
    if (quiet) posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    rc = posix_spawnp(&child, argv[0], &fa, NULL, (char *const *)argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fd[1]);
    if (rc != 0) {
        close(fd[0]);
        files__set(e, "cannot start '%s': %s", argv[0], strerror(rc));
        return NULL;
    }
    f = fdopen(fd[0], "rb");
    if (!f) {
        close(fd[0]);
        waitpid(child, NULL, 0);
        files__set(e, "cannot read the output of '%s': %s", argv[0], strerror(errno));
        return NULL;
    }
    *pid = (long)child;
    return f;
#else
    (void)pid;
    (void)quiet;
    files__set(e, "cannot start '%s': %s", argv[0], "starting programs needs POSIX here");
    return NULL;
#endif
}

/* Closes the stream and waits for the child: its exit status (0 = success), 128 + the signal
   that ended it, or -1 when it cannot be waited for. */
FILES_FN int files_spawn_close(FILE *f, long pid) {
    if (f) fclose(f);
#ifdef FILES_POSIX
    {
        int status;
        pid_t got;
        do got = waitpid((pid_t)pid, &status, 0);
        while (got < 0 && errno == EINTR);
        if (got < 0) return -1;
        if (WIFEXITED(status)) return WEXITSTATUS(status);
        if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    }
#else
    (void)pid;
#endif
    return -1;
}

/* Opens `path` for reading; names ending in ".gz" (".xz") are decompressed by a `gzip -dc`
   (`xz -dc`) child. NULL with a sentence when the file is missing, a directory, or the child
   cannot start. */
FILES_FN FILE *files_open_read(files_reader *r, const char *path, files_err *e) {
    memset(r, 0, sizeof *r);
    r->path = path;
    if (files_check_input(path, e) != 0) return NULL;
    if (files_ends_with(path, ".gz") || files_ends_with(path, ".xz")) {
        const char *argv[5];
        r->tool = files_ends_with(path, ".gz") ? "gzip" : "xz";
        argv[0] = r->tool; argv[1] = "-dc"; argv[2] = "--"; argv[3] = path; argv[4] = NULL;
        r->f = files_spawn_read(argv, 0, &r->pid, e);
        return r->f;
    }
    r->f = fopen(path, "rb");
    if (!r->f) files__set(e, "cannot open '%s': %s", path, strerror(errno));
    return r->f;
}

/* Closes the input; for a .gz (.xz) file, -1 with a sentence when gzip (xz) did not reach the
   end of a valid archive (truncated, corrupt, not gzip). Call it even after a read error. */
FILES_FN int files_close_read(files_reader *r, files_err *e) {
    int rc = 0;
    if (r->pid) {
        int st = files_spawn_close(r->f, r->pid);
        if (st != 0) {
            char why[150];
            snprintf(why, sizeof why, "%s -dc ended with status %d: the archive is truncated, corrupt or not %s data", r->tool, st, r->tool);
            files__set(e, "'%s' could not be decompressed to its end (%s)", r->path, why);
            rc = -1;
        }
    } else if (r->f && fclose(r->f) != 0) {
        files__set(e, "cannot read '%s': %s", r->path, strerror(errno));
        rc = -1;
    }
    memset(r, 0, sizeof *r);
    return rc;
}

/* Opens a temporary file beside `path` that becomes `path` on files_atomic_commit. */
FILES_FN FILE *files_atomic_open(files_atomic *a, const char *path, files_err *e) {
    memset(a, 0, sizeof *a);
    if (strlen(path) + 1 > sizeof a->path) {
        files__set(e, "cannot write '%s': %s", path, "the path is too long");
        return NULL;
    }
    strcpy(a->path, path);
#ifdef FILES_POSIX
    {
        /* O_EXCL on a name with our process id: two writers never share a temporary file
           (mkstemp would do the same but makes the file 0600 whatever the umask says) */
        int k, fd = -1;
        for (k = 0; k < 1000 && fd < 0; k++) {
            snprintf(a->tmp, sizeof a->tmp, "%s.%ld-%d.tmp", path, (long)getpid(), k);
            fd = open(a->tmp, O_WRONLY | O_CREAT | O_EXCL, 0666);
            if (fd < 0 && errno != EEXIST) break;
        }
        if (fd < 0) {
            files__set(e, "cannot write '%s': %s (creating a temporary file beside it)", path, strerror(errno));
            return NULL;
        }
        a->f = fdopen(fd, "wb");
        if (!a->f) {
            close(fd);
            remove(a->tmp);
        }
    }
#else
    snprintf(a->tmp, sizeof a->tmp, "%s.tmp", path);
    a->f = fopen(a->tmp, "wb");
#endif
    if (!a->f) files__set(e, "cannot write '%s': %s (creating a temporary file beside it)", path, strerror(errno));
    return a->f;
}

/* Removes the temporary file; `path` stays as it was. */
FILES_FN void files_atomic_abort(files_atomic *a) {
    if (a->f) fclose(a->f);
    a->f = NULL;
    if (a->tmp[0]) remove(a->tmp);
}

/* Flushes, syncs and renames the temporary file onto `path`, then syncs the directory. On any
   failure (a full disk shows here) the temporary file is removed, `path` is unchanged, and
   -1 comes back with a sentence. `write_ok` = 0 says an earlier write already failed. */
FILES_FN int files_atomic_commit(files_atomic *a, int write_ok, files_err *e) {
    int ok = write_ok && a->f && fflush(a->f) == 0 && !ferror(a->f);
    int err = errno;
#ifdef FILES_POSIX
    if (ok && fsync(fileno(a->f)) != 0) { ok = 0; err = errno; }
#endif
    if (a->f && fclose(a->f) != 0 && ok) { ok = 0; err = errno; }
    a->f = NULL;
    if (ok && rename(a->tmp, a->path) != 0) { ok = 0; err = errno; }
    if (!ok) {
        remove(a->tmp);
        files__set(e, "writing '%s' failed (%s); the file is unchanged", a->path, err ? strerror(err) : "write error");
        return -1;
    }
#ifdef FILES_POSIX
    { /* the rename itself is durable only once the directory is synced */
        char dir[4096];
        const char *slash = strrchr(a->path, '/');
        int fd;
        if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - a->path) + (slash == a->path), a->path);
        else strcpy(dir, ".");
        fd = open(dir, O_RDONLY);
        if (fd >= 0) {
            fsync(fd);
            close(fd);
        }
    }
#endif
    return 0;
}

#endif /* FILES_H */
