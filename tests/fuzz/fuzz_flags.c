/* fuzz_flags.c - the examples' command-line parser (examples/flags.h) on arbitrary argument
 * vectors: the input is split at NUL bytes into arguments. Every vector is run, shown help for
 * (0) or refused with a message (2); when it runs, every number flag holds a value inside its
 * range, so flags_check (what a program uses on options restored from a checkpoint) accepts
 * the parsed values as they are, a choice holds a valid index and positional arguments fit. */
#include "fuzz.h"
#include "flags.h"
#include <string.h>

#define MAX_ARGS 64

static char msgbuf[1 << 16];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char text[4096 + 1];
    char *argv[MAX_ARGS + 1];
    const char *pos[2] = {NULL, NULL};
    int argc = 1, steps = 600, seed = 7, quick = 0, router = 1, rc;
    float lr = 2e-3f, frac = 0.1f, big = 1.0f;
    double temp = 0.8, margin = -1.0;
    const char *out = "out";
    size_t i, n = size < sizeof text - 1 ? size : sizeof text - 1;
    FILE *sink;
    flag fl[] = {
        flag_heading("training"),
        flag_int("--steps", &steps, 1, 1e9, "optimizer steps"),
        flag_int("--seed", &seed, 0, 4294967295.0, "seed (range wider than an int)"),
        flag_float("--lr", &lr, 0, 1e3, "learning rate"),
        flag_float("--frac", &frac, 0, 0.1, "a float whose bound is not a float"),
        flag_float("--big", &big, -1e300, 1e300, "a float flag with a range no float holds"),
        flag_double("--temp", &temp, 1e-6, 100, "temperature"),
        flag_double("--margin", &margin, -1e308, 1e308, "any finite number"),
        flag_choice("--router", &router, "topk|mixtral|ec|aoe", "router family"),
        flag_string("--out", &out, "DIR", "output folder"),
        flag_switch("--quick", &quick, "a smoke run"),
    };
    flags_program p = flags_program_make("fuzz", "the flag parser under a fuzzer", NULL, fl, FLAGS_COUNT(fl));
    flags_positional(&p, pos, 2, "FILE...");

    memcpy(text, data, n);
    text[n] = 0;
    argv[0] = (char *)"fuzz";
    for (i = 0; i <= n && argc < MAX_ARGS; i++) { /* every NUL-terminated piece is an argument */
        argv[argc++] = text + i;
        i += strlen(text + i);
    }
    argv[argc] = NULL;

    sink = fmemopen(msgbuf, sizeof msgbuf, "w");
    if (!sink) return 0;
    p.out = p.err = sink;
    rc = flags_parse(&p, argc, argv);
    if (rc == 2 && ftell(sink) == 0) abort(); /* refused without saying why */
    fclose(sink);
    if (rc != FLAGS_RUN && rc != 0 && rc != 2) abort();
    if (rc == FLAGS_RUN) {
        char why[512];
        if (flags_check(&p, why, sizeof why) != 0) {
            fprintf(stderr, "parsed values fail their own check: %s\n", why);
            abort();
        }
        if (router < 0 || router > 3 || p.n_args < 0 || p.n_args > 2 || !out) abort();
        for (i = 0; i < (size_t)p.n_args; i++)
            if (!pos[i]) abort();
    }
    (void)quick;
    return 0;
}
