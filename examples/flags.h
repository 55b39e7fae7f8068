/* flags.h - the one command-line parser of the examples and benchmarks.
 *
 *   int steps = 600, quick = 0, router = 0;
 *   float lr = 2e-3f;
 *   const char *out = "out";
 *   flag fl[] = {
 *       flag_heading("training"),
 *       flag_int("--steps", &steps, 1, 1e9, "optimizer steps"),
 *       flag_float("--lr", &lr, 0, 1e3, "peak learning rate"),
 *       flag_choice("--router", &router, "topk|mixtral|ec", "the router family"),
 *       flag_string("--out", &out, "DIR", "output folder"),
 *       flag_switch("--quick", &quick, "a smoke run"),
 *   };
 *   flags_program p = flags_program_make("train_lm", "one line: what it does", "input format, outputs ...",
 *                                        fl, FLAGS_COUNT(fl));
 *   int rc = flags_parse(&p, argc, argv);
 *   if (rc != FLAGS_RUN) return rc;  -- 0 after --help, 2 after a bad flag (it said why)
 *
 * Strict: an integer flag takes only a decimal integer ("3abc", "abc", "1e3" are refused), a
 * number flag only a finite number (no nan, no inf), both within the flag's range; a choice
 * only one of its names. "--flag value" and "--flag=value" both work. --help (or -h) anywhere
 * prints what the program does, its input format and every flag with its default, to stdout,
 * and returns 0; an unknown flag prints the usage to stderr and returns 2. The defaults shown
 * are the values before parsing (or a flag's own text, flag_default). flags_check re-checks the
 * current values against the same ranges: a program that restores its options from a file
 * validates them like flags. Static functions: include it in the one .c file that uses it.
 */
#ifndef FLAGS_H
#define FLAGS_H

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define FLAGS_FN static __attribute__((unused)) /* a program may use only some of them */
#else
#define FLAGS_FN static
#endif

#define FLAGS_RUN (-1) /* flags_parse: go on and run */
#define FLAGS_COUNT(array) ((int)(sizeof(array) / sizeof((array)[0])))

typedef enum flag_kind {
    FLAG_HEADING, /* a section title in the help, not a flag              */
    FLAG_INT,     /* int *                                                 */
    FLAG_FLOAT,   /* float *                                               */
    FLAG_DOUBLE,  /* double *                                              */
    FLAG_STRING,  /* const char ** (points into argv)                      */
    FLAG_SWITCH,  /* int *: set to 1 when given; takes no value            */
    FLAG_CHOICE   /* int *: the index of the value among meta's names      */
} flag_kind;

typedef struct flag {
    const char *name; /* "--steps"; a heading's title                                 */
    flag_kind kind;
    void *value;      /* where the value goes (see flag_kind)                          */
    double min, max;  /* numbers: the accepted range, inclusive                        */
    const char *meta; /* the value's placeholder in the help ("DIR"); choice: "a|b|c"  */
    const char *help; /* one line                                                      */
    const char *dflt; /* the default as the help says it; NULL: the value before parsing */
    int seen;         /* set by flags_parse: given on the command line                  */
} flag;

typedef struct flags_program {
    const char *name;     /* "train_lm"                                               */
    const char *summary;  /* one line: what it does                                   */
    const char *about;    /* input format, outputs, examples (several lines, or NULL)  */
    flag *flags;
    int n_flags;
    const char **args;    /* positional arguments go here (NULL: none accepted)       */
    int max_args;
    int n_args;           /* set by flags_parse                                       */
    const char *args_meta;/* their placeholder in the usage line ("scores.csv")       */
    char shown[64][48];   /* the defaults, formatted before parsing (first 64 flags)  */
    FILE *out, *err;      /* where --help and the complaints go (NULL: stdout, stderr) */
} flags_program;

static flag flags__make(const char *name, flag_kind kind, void *value, double min, double max, const char *meta,
                        const char *help) {
    flag f;
    memset(&f, 0, sizeof f);
    f.name = name;
    f.kind = kind;
    f.value = value;
    f.min = min;
    f.max = max;
    f.meta = meta;
    f.help = help;
    return f;
}

FLAGS_FN flag flag_heading(const char *title) { return flags__make(title, FLAG_HEADING, NULL, 0, 0, NULL, NULL); }
FLAGS_FN flag flag_int(const char *name, int *v, double min, double max, const char *help) {
    if (max > 2147483647.0) max = 2147483647.0; /* an int holds no more */
    if (min < -2147483647.0) min = -2147483647.0;
    return flags__make(name, FLAG_INT, v, min, max, "N", help);
}
/* the range as floats, so a value is checked as the float it is stored as ("0.1" is inside
   [0, 0.1]; flags_check then agrees with the parse) and no value overflows a float */
static double flags__as_float(double x) {
    if (x > FLT_MAX) return FLT_MAX;
    if (x < -FLT_MAX) return -FLT_MAX;
    return (double)(float)x;
}
FLAGS_FN flag flag_float(const char *name, float *v, double min, double max, const char *help) {
    return flags__make(name, FLAG_FLOAT, v, flags__as_float(min), flags__as_float(max), "X", help);
}
/* a number flag's range as the help and the messages print it (a float's own digits) */
static void flags__bounds(const flag *f, char lo[32], char hi[32]) {
    int digits = f->kind == FLAG_FLOAT ? 7 : 10;
    snprintf(lo, 32, "%.*g", digits, f->min);
    snprintf(hi, 32, "%.*g", digits, f->max);
}
FLAGS_FN flag flag_double(const char *name, double *v, double min, double max, const char *help) {
    return flags__make(name, FLAG_DOUBLE, v, min, max, "X", help);
}
FLAGS_FN flag flag_string(const char *name, const char **v, const char *meta, const char *help) {
    return flags__make(name, FLAG_STRING, (void *)v, 0, 0, meta, help);
}
FLAGS_FN flag flag_switch(const char *name, int *v, const char *help) {
    return flags__make(name, FLAG_SWITCH, v, 0, 1, NULL, help);
}
FLAGS_FN flag flag_choice(const char *name, int *v, const char *names, const char *help) {
    return flags__make(name, FLAG_CHOICE, v, 0, 0, names, help);
}
/* the same flag with its default spelled out (when the value before parsing is not it) */
FLAGS_FN flag flag_default(flag f, const char *text) {
    f.dflt = text;
    return f;
}

FLAGS_FN flags_program flags_program_make(const char *name, const char *summary, const char *about, flag *flags, int n) {
    flags_program p;
    memset(&p, 0, sizeof p);
    p.name = name;
    p.summary = summary;
    p.about = about;
    p.flags = flags;
    p.n_flags = n;
    return p;
}

/* accepts up to max positional arguments into args; meta names them in the usage line */
FLAGS_FN void flags_positional(flags_program *p, const char **args, int max, const char *meta) {
    p->args = args;
    p->max_args = max;
    p->args_meta = meta;
}

/* the k-th name of "a|b|c" into buf; 0 when there is none */
static int flags__choice_name(const char *names, int k, char *buf, size_t cap) {
    const char *s = names;
    while (k-- > 0) {
        s = strchr(s, '|');
        if (!s) return 0;
        s++;
    }
    snprintf(buf, cap, "%.*s", (int)(strchr(s, '|') ? (size_t)(strchr(s, '|') - s) : strlen(s)), s);
    return 1;
}

/* a value of the flag's kind, stored at `value` (the flag's own or a copy's), as text */
FLAGS_FN void flags_format_value(const flag *f, const void *value, char *buf, size_t cap) {
    buf[0] = 0;
    switch (f->kind) {
    case FLAG_INT: snprintf(buf, cap, "%d", *(const int *)value); break;
    case FLAG_FLOAT: snprintf(buf, cap, "%g", (double)*(const float *)value); break;
    case FLAG_DOUBLE: snprintf(buf, cap, "%g", *(const double *)value); break;
    case FLAG_STRING: {
        const char *v = *(const char *const *)value;
        if (!v) snprintf(buf, cap, "none");
        else if (!v[0] || strchr(v, ' ')) snprintf(buf, cap, "'%s'", v); /* where the text starts and ends */
        else snprintf(buf, cap, "%s", v);
        break;
    }
    case FLAG_CHOICE:
        if (!flags__choice_name(f->meta, *(const int *)value, buf, cap)) snprintf(buf, cap, "none");
        break;
    default: break;
    }
}

static void flags__usage_line(const flags_program *p, FILE *out) {
    fprintf(out, "usage: %s [flags]%s%s\n", p->name, p->args_meta ? " " : "", p->args_meta ? p->args_meta : "");
}

static void flags__list(const flags_program *p, FILE *out) {
    int i;
    for (i = 0; i < p->n_flags; i++) {
        const flag *f = &p->flags[i];
        char left[96];
        if (f->kind == FLAG_HEADING) {
            fprintf(out, "\n%s:\n", f->name);
            continue;
        }
        if (i == 0) fprintf(out, "\nflags:\n");
        snprintf(left, sizeof left, "%s%s%s", f->name, f->kind == FLAG_SWITCH ? "" : " ", f->kind == FLAG_SWITCH ? "" : f->meta);
        if (strlen(left) <= 24) fprintf(out, "  %-24s %s", left, f->help ? f->help : "");
        else fprintf(out, "  %s\n  %-24s %s", left, "", f->help ? f->help : "");
        if (f->kind != FLAG_SWITCH) {
            const char *d = f->dflt ? f->dflt : i < 64 ? p->shown[i] : "";
            if (f->kind == FLAG_INT || f->kind == FLAG_FLOAT || f->kind == FLAG_DOUBLE) {
                char lo[32], hi[32];
                flags__bounds(f, lo, hi);
                fprintf(out, " (default %s; %s..%s)", d, lo, hi);
            } else {
                fprintf(out, " (default %s)", d);
            }
        }
        fprintf(out, "\n");
    }
    if (p->n_flags == 0) fprintf(out, "\nflags:\n");
    fprintf(out, "  %-24s %s\n", "--help, -h", "this text");
}

/* --help: what the program does, its input, every flag with its default */
FLAGS_FN void flags_print_help(const flags_program *p, FILE *out) {
    fprintf(out, "%s - %s\n", p->name, p->summary);
    if (p->about) fprintf(out, "\n%s\n", p->about);
    fprintf(out, "\n");
    flags__usage_line(p, out);
    flags__list(p, out);
}

static FILE *flags__err(const flags_program *p) { return p->err ? p->err : stderr; }

static int flags__fail_usage(const flags_program *p, const char *fmt, const char *what) {
    FILE *err = flags__err(p);
    fprintf(err, "%s: ", p->name);
    fprintf(err, fmt, what);
    fprintf(err, "\n\n");
    flags__usage_line(p, err);
    flags__list(p, err);
    return 2;
}

/* Checks one number against its flag's range; 0, or -1 with a sentence in msg. `given` is the
   text the value came from (NULL: the value itself, e.g. restored from a checkpoint). */
static int flags__range(const flag *f, double v, const char *given, char *msg, size_t cap) {
    char lo[32], hi[32];
    if (v >= f->min && v <= f->max) return 0;
    flags__bounds(f, lo, hi);
    if (given) snprintf(msg, cap, "%s must be between %s and %s, not %.60s", f->name, lo, hi, given);
    else snprintf(msg, cap, "%s must be between %s and %s, not %.17g", f->name, lo, hi, v);
    return -1;
}

/* Parses `text` into the flag's value; 0, or -1 with a sentence in msg. */
static int flags__set(flag *f, const char *text, char *msg, size_t cap) {
    char *end = NULL;
    if (f->kind == FLAG_INT) {
        long v;
        errno = 0;
        v = (text[0] == ' ' || text[0] == '\t' || text[0] == 0) ? 0 : strtol(text, &end, 10);
        if (!end || end == text || *end != 0) {
            snprintf(msg, cap, "%s needs a whole number, not '%.60s'", f->name, text);
            return -1;
        }
        if (errno == ERANGE || flags__range(f, (double)v, text, msg, cap) != 0) {
            if (errno == ERANGE) flags__range(f, v < 0 ? -HUGE_VAL : HUGE_VAL, text, msg, cap);
            return -1;
        }
        *(int *)f->value = (int)v;
        return 0;
    }
    if (f->kind == FLAG_FLOAT || f->kind == FLAG_DOUBLE) {
        double v;
        errno = 0;
        v = (text[0] == ' ' || text[0] == '\t' || text[0] == 0) ? 0.0 : strtod(text, &end);
        if (!end || end == text || *end != 0) {
            snprintf(msg, cap, "%s needs a number, not '%.60s'", f->name, text);
            return -1;
        }
        if (!isfinite(v) || (errno == ERANGE && fabs(v) > 1.0)) {
            snprintf(msg, cap, "%s needs a finite number, not '%.60s'", f->name, text);
            return -1;
        }
        if (f->kind == FLAG_FLOAT && fabs(v) <= FLT_MAX) v = (double)(float)v; /* checked as stored */
        if (flags__range(f, v, text, msg, cap) != 0) return -1;
        if (f->kind == FLAG_FLOAT) *(float *)f->value = (float)v;
        else *(double *)f->value = v;
        return 0;
    }
    if (f->kind == FLAG_STRING) {
        *(const char **)f->value = text;
        return 0;
    }
    if (f->kind == FLAG_CHOICE) {
        char name[64], list[256];
        int k;
        for (k = 0; flags__choice_name(f->meta, k, name, sizeof name); k++)
            if (strcmp(name, text) == 0) {
                *(int *)f->value = k;
                return 0;
            }
        snprintf(list, sizeof list, "%s", f->meta);
        for (k = 0; list[k]; k++)
            if (list[k] == '|') list[k] = '/';
        snprintf(msg, cap, "%s must be one of %s, not '%.60s'", f->name, list, text);
        return -1;
    }
    return -1;
}

/* Parses argv. FLAGS_RUN: go on; 0: --help was printed; 2: a bad flag or value was reported on
   stderr (with the usage for an unknown flag). */
FLAGS_FN int flags_parse(flags_program *p, int argc, char **argv) {
    int i, only_args = 0;
    char msg[512];
    for (i = 0; i < p->n_flags && i < 64; i++) flags_format_value(&p->flags[i], p->flags[i].value, p->shown[i], sizeof p->shown[i]);
    for (i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            flags_print_help(p, p->out ? p->out : stdout);
            return 0;
        }
    p->n_args = 0;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *eq, *value = NULL;
        size_t len;
        int k;
        flag *f = NULL;
        if (only_args || a[0] != '-' || a[1] == 0) { /* a positional argument ("-" too) */
            if (!p->args) return flags__fail_usage(p, "unexpected argument '%.200s'", a);
            if (p->n_args >= p->max_args) return flags__fail_usage(p, "one argument too many: '%.200s'", a);
            p->args[p->n_args++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) { only_args = 1; continue; }
        eq = strchr(a, '=');
        len = eq ? (size_t)(eq - a) : strlen(a);
        for (k = 0; k < p->n_flags; k++)
            if (p->flags[k].kind != FLAG_HEADING && strlen(p->flags[k].name) == len && strncmp(p->flags[k].name, a, len) == 0) {
                f = &p->flags[k];
                break;
            }
        if (!f) return flags__fail_usage(p, "unknown flag '%.200s'", a);
        f->seen = 1;
        if (f->kind == FLAG_SWITCH) {
            if (eq) {
                fprintf(flags__err(p), "%s: %s takes no value\n", p->name, f->name);
                return 2;
            }
            *(int *)f->value = 1;
            continue;
        }
        if (eq) value = eq + 1;
        else if (i + 1 < argc) value = argv[++i];
        else {
            fprintf(flags__err(p), "%s: %s needs a value (%s)\n", p->name, f->name, f->meta);
            return 2;
        }
        if (flags__set(f, value, msg, sizeof msg) != 0) {
            fprintf(flags__err(p), "%s: %s\n", p->name, msg);
            return 2;
        }
    }
    return FLAGS_RUN;
}

/* the flag whose value lives at `value`, or NULL */
FLAGS_FN flag *flags_find(flags_program *p, const void *value) {
    int i;
    for (i = 0; i < p->n_flags; i++)
        if (p->flags[i].value == value && p->flags[i].kind != FLAG_HEADING) return &p->flags[i];
    return NULL;
}

/* Checks every number flag's current value against its range (values restored from a file are
   input like any other). 0, or -1 with the first problem in msg. */
FLAGS_FN int flags_check(const flags_program *p, char *msg, size_t cap) {
    int i;
    for (i = 0; i < p->n_flags; i++) {
        const flag *f = &p->flags[i];
        double v;
        if (f->kind == FLAG_INT) v = *(const int *)f->value;
        else if (f->kind == FLAG_FLOAT) v = *(const float *)f->value;
        else if (f->kind == FLAG_DOUBLE) v = *(const double *)f->value;
        else continue;
        if (!(v == v) || flags__range(f, v, NULL, msg, cap) != 0) {
            if (!(v == v)) snprintf(msg, cap, "%s is not a number", f->name);
            return -1;
        }
    }
    return 0;
}

#endif /* FLAGS_H */
