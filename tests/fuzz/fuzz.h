/* fuzz.h - shared by the libFuzzer harnesses in tests/fuzz/ (see tests/fuzz/README).
 *
 * Each harness defines LLVMFuzzerTestOneInput. Built with clang -fsanitize=fuzzer it is a
 * libFuzzer target (`make fuzz`); built with FUZZ_REPLAY defined it is a plain program that
 * runs the inputs named on its command line once each, so the committed seed corpus also runs
 * under gcc and the sanitizers in `make test` (a regression suite of every past finding). */
#ifndef MOE_FUZZ_H
#define MOE_FUZZ_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C"
#endif
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#include <sys/stat.h>
#include <unistd.h>
/* the per-process file a loader target reads its input from: in memory (/dev/shm) where the
   system has it, since the loaders take paths and the disk would bound the exec rate */
#if defined(__GNUC__) || defined(__clang__)
__attribute__((unused)) /* only the loader targets use it */
#endif
static void fuzz_temp_path(char *buf, size_t cap, const char *name) {
    struct stat st;
    const char *dir = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(buf, cap, "%s/moe_fuzz_%ld_%s", dir, (long)getpid(), name);
}

#ifdef FUZZ_REPLAY
#include <dirent.h>
#include <string.h>
/* runs one file; 0 when it could not be read */
static int fuzz_replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!f) return 0;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return 0;
    }
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        fclose(f);
        return 0;
    }
    fclose(f);
    LLVMFuzzerTestOneInput(buf, (size_t)n);
    free(buf);
    return 1;
}

/* with no arguments: every file of the target's committed corpus (FUZZ_CORPUS, a directory) */
int main(int argc, char **argv) {
    int i, runs = 0;
    if (argc == 1) {
        DIR *d = opendir(FUZZ_CORPUS);
        struct dirent *e;
        char path[1024];
        if (!d) {
            printf("cannot open the corpus %s (run from the repository root)\n0 passed, 1 failed\n", FUZZ_CORPUS);
            return 1;
        }
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", FUZZ_CORPUS, e->d_name);
            if (!fuzz_replay_file(path)) {
                printf("cannot read %s\n0 passed, 1 failed\n", path);
                closedir(d);
                return 1;
            }
            runs++;
        }
        closedir(d);
        printf("%s: %d inputs replayed without a crash or a sanitizer report\n", FUZZ_CORPUS, runs);
        printf("%d passed, 0 failed\n", runs);
        return runs > 0 ? 0 : 1;
    }
    for (i = 1; i < argc; i++) {
        if (!fuzz_replay_file(argv[i])) {
            fprintf(stderr, "replay: cannot read %s\n", argv[i]);
            return 1;
        }
        runs++;
    }
    /* the suite's closing line: reaching it means no input crashed or tripped a sanitizer */
    printf("%d passed, 0 failed\n", runs);
    return 0;
}
#endif
#endif
