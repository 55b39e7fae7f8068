/* test_bad_input.c - a catalogue of bad input, given to the examples and loaders as a careless
 * or hostile user would: missing, empty, binary, truncated and oversized files, NaN and
 * infinite numbers, negative or absurd sizes and flags, damaged or crafted checkpoints, a
 * checkpoint of another program, missing and read-only output folders, and a write error in the
 * middle of a save (a file-size limit, as a full disk). Every case asserts the exit status,
 * that the message names the problem, and that every file already in the test folder is
 * byte-for-byte what it was (size and CRC-32). Programs are started without a shell
 * (tests/proc.h). The train_lm cases need the Brown corpus (make data) and are skipped
 * without it; the read-only cases run as an unprivileged user when the test runs as root. */
#define _POSIX_C_SOURCE 200809L
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h" /* defines: moe_crc32, moe_checkpoint_save, rwd_hh_read */
#include "test.h"
#include "proc.h" /* defines: proc_runv, proc_slurp, proc_is_root, proc_example, proc_bench, proc_rmtree */

#include <dirent.h>
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#define END ((const char *)NULL)
enum { MAX_FILES = 128 };
enum { OPT_FSIZE = 1, OPT_NOBODY = 2, OPT_ONE_THREAD = 4 };

static char D[64];  /* the test folder */
static int n_cases; /* cases run */

/* ---- the folder's files before and after a case -------------------------------------------- */

typedef struct snapshot {
    int n;
    char name[MAX_FILES][96];
    long size[MAX_FILES];
    uint32_t crc[MAX_FILES];
} snapshot;

static void snap_dir(snapshot *s, const char *dir, const char *prefix) {
    DIR *d = opendir(dir);
    struct dirent *e;
    if (!d) return;
    while ((e = readdir(d)) != NULL && s->n < MAX_FILES) {
        char path[640];
        struct stat st;
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%.300s/%.300s", dir, e->d_name);
        if (stat(path, &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            char sub[96];
            snprintf(sub, sizeof sub, "%.40s%.50s/", prefix, e->d_name);
            snap_dir(s, path, sub);
        } else {
            long n = 0;
            char *b = proc_slurp(path, &n);
            snprintf(s->name[s->n], sizeof s->name[0], "%.40s%.50s", prefix, e->d_name);
            s->size[s->n] = n;
            s->crc[s->n] = b ? moe_crc32(0, b, (size_t)n) : 0;
            s->n++;
            free(b);
        }
    }
    closedir(d);
}

static void snap(snapshot *s) {
    s->n = 0;
    snap_dir(s, D, "");
}

/* every file of `before` is still there, with the same bytes; names the first that is not */
static int unchanged(const snapshot *before, char *which, size_t cap) {
    snapshot now;
    int i, j;
    snap(&now);
    for (i = 0; i < before->n; i++) {
        for (j = 0; j < now.n && strcmp(now.name[j], before->name[i]) != 0; j++) {}
        if (j == now.n || now.size[j] != before->size[i] || now.crc[j] != before->crc[i]) {
            snprintf(which, cap, "%s", before->name[i]);
            return 0;
        }
    }
    return 1;
}

/* ---- one case ------------------------------------------------------------------------------ */

/* "@x" in an argument means the file x of the test folder */
static const char *at(char *buf, size_t cap, const char *a) {
    if (a && a[0] == '@') {
        snprintf(buf, cap, "%s/%s", D, a + 1);
        return buf;
    }
    return a;
}

/* Runs the program with the arguments (up to END); checks the exit status, that the output
   says `says` (and `says2` when not NULL) and that no file of the folder changed. */
static void bad(const char *what, int expect_rc, const char *says, const char *says2, int opts, const char *prog, ...) {
    static char argbuf[32][300];
    const char *argv[32];
    char log[128], which[128] = "";
    char *out;
    snapshot before;
    proc_opts o = proc_opts_default();
    int n = 0, rc, same;
    va_list ap;
    argv[n++] = prog;
    va_start(ap, prog);
    for (;;) {
        const char *a = va_arg(ap, const char *);
        if (!a || n == 31) break;
        argv[n] = at(argbuf[n], sizeof argbuf[n], a);
        n++;
    }
    va_end(ap);
    argv[n] = NULL;
    if (opts & OPT_FSIZE) o.fsize_limit = 4096;
    if (opts & OPT_NOBODY) o.as_nobody = 1;
    o.env[0] = opts & OPT_ONE_THREAD ? "OMP_NUM_THREADS=1" : "OMP_NUM_THREADS=2";
    snprintf(log, sizeof log, "%s.log", D); /* beside the folder: the snapshot does not see it */
    snap(&before);
    rc = proc_runv(&o, log, argv);
    out = proc_slurp(log, NULL);
    same = unchanged(&before, which, sizeof which);
    n_cases++;
    CHECK(rc == expect_rc && out && strstr(out, says) && (!says2 || strstr(out, says2)) && same,
          "%s: exit %d (expected %d), said \"%s\"%s%s%s; expected it to say \"%s\"%s%s", what, rc, expect_rc, out ? out : "",
          same ? "" : "; CHANGED ", which, same ? "" : " (files on disk must stay as they were)", says, says2 ? " and " : "", says2 ? says2 : "");
    free(out);
}

/* ---- fixtures ------------------------------------------------------------------------------ */

static void write_file(const char *name, const char *text, size_t n) {
    char path[256];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", D, name);
    f = fopen(path, "wb");
    if (f) {
        fwrite(text, 1, n, f);
        fclose(f);
    }
}
static void write_text(const char *name, const char *text) { write_file(name, text, strlen(text)); }

/* the first `keep` bytes of src into dst (keep < 0: all but -keep; more than the file: all) */
static void truncate_copy(const char *src, const char *dst, long keep) {
    char path[256];
    long n = 0;
    char *b;
    snprintf(path, sizeof path, "%s/%s", D, src);
    b = proc_slurp(path, &n);
    if (keep < 0) keep += n;
    if (keep > n) keep = n;
    if (b && keep >= 0) write_file(dst, b, (size_t)keep);
    free(b);
}

static void gzip_to(const char *src, const char *dst) {
    char in[256], out[256];
    snprintf(in, sizeof in, "%s/%s", D, src);
    snprintf(out, sizeof out, "%s/%s", D, dst);
    proc_run(NULL, out, "/bin/gzip", "-c", in, END);
}

static void binary_file(const char *name, size_t n) {
    char *b = (char *)malloc(n);
    moe_rng r;
    size_t i;
    moe_rng_seed(&r, 11);
    for (i = 0; i < n; i++) b[i] = (char)moe_rng_below(&r, 256);
    write_file(name, b, n);
    free(b);
}

static void make_csv_fixtures(void) {
    char *big = (char *)malloc(1 << 16);
    size_t len = 0;
    int i;
    moe_rng r;
    moe_rng_seed(&r, 5);
    len += (size_t)sprintf(big + len, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n");
    for (i = 0; i < 120; i++)
        len += (size_t)sprintf(big + len, "%d,%s,%.6f,%.6f,%d,%d\n", i, i % 2 ? "chat" : "hep-go", moe_rng_normal(&r) + 0.5, moe_rng_normal(&r),
                               20 + moe_rng_below(&r, 800), 20 + moe_rng_below(&r, 800));
    write_file("scores.csv", big, len);
    gzip_to("scores.csv", "scores.csv.gz");
    truncate_copy("scores.csv.gz", "trunc.csv.gz", -200);
    write_text("header_only.csv", "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n");
    write_text("empty.csv", "");
    write_text("nan.csv", "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,4\n2,a,nan,2,3,4\n");
    write_text("inf.csv", "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,4\n2,a,1,-inf,3,4\n");
    write_text("short.csv", "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,4\n2,a,1,2\n");
    write_text("nocol.csv", "id,subset,score_chosen,score_rejected,len_chosen\n1,a,1,2,3\n");
    write_text("quote.csv", "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n1,a,1,2,3,\"4\n");
    len = (size_t)sprintf(big, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected\n");
    for (i = 0; i < 60; i++) len += (size_t)sprintf(big + len, "%d,a,%s,1,%d,%d\n", i, i % 2 ? "1e308" : "-1e308", 10 + i, 80 - i);
    write_file("huge.csv", big, len);
    binary_file("binary.bin", 4096);
    write_text("existing_out.csv", "an earlier result that a failed run must leave alone\n");
    /* HH-RLHF JSON lines */
    len = 0;
    for (i = 0; i < 400; i++)
        len += (size_t)sprintf(big + len, "{\"chosen\": \"\\n\\nHuman: question %d\\n\\nAssistant: a good answer\", "
                                          "\"rejected\": \"\\n\\nHuman: question %d\\n\\nAssistant: no\"}\n", i, i);
    write_file("pairs.jsonl", big, len);
    gzip_to("pairs.jsonl", "pairs.jsonl.gz");
    truncate_copy("pairs.jsonl.gz", "trunc.jsonl.gz", -40);
    write_text("few.jsonl", "{\"chosen\": \"\\n\\nHuman: a\\n\\nAssistant: b\", \"rejected\": \"\\n\\nHuman: a\\n\\nAssistant: c\"}\n"
                            "{\"chosen\": \"\\n\\nHuman: d\\n\\nAssistant: e\", \"rejected\": \"\\n\\nHuman: d\\n\\nAssistant: f\"}\n"
                            "{\"chosen\": \"\\n\\nHuman: g\\n\\nAssistant: h\", \"rejected\": \"\\n\\nHuman: g\\n\\nAssistant: i\"}\n");
    write_text("nodialogue.jsonl", "{\"chosen\": \"yes\", \"rejected\": \"no\"}\n");
    write_text("empty.jsonl", "");
    free(big);
}

/* ---- checkpoints of train_lm ---------------------------------------------------------------- */

/* A train_lm checkpoint is a model file: the config blob is "MOEMODEL", u32 version, then a
   record of named fields; the state blob is the tag "train_lm", then a record. A record is u32
   count, then per field: u8 name length, name, u8 type, u8 flags, the value (i, f: 8 bytes;
   s: u32 length and the text). */
enum { MODEL_RECORD_AT = 12, STATE_RECORD_AT = 8 };

static long get_u64(const unsigned char *p) {
    long v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void put_u64(unsigned char *p, long v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)((unsigned long)v >> (8 * i));
}

/* where field `name`'s value starts in the record rec (len bytes), and its encoded length; -1
   when the record lacks it */
static long record_value_at(const unsigned char *rec, long len, const char *name, long *vlen) {
    long at = 4, count = rec[0] | rec[1] << 8 | (long)rec[2] << 16 | (long)rec[3] << 24, e;
    for (e = 0; e < count && at < len; e++) {
        long nlen = rec[at], type = rec[at + 1 + nlen], v = at + 3 + nlen;
        long n = type == 's' ? 4 + (rec[v] | rec[v + 1] << 8 | (long)rec[v + 2] << 16 | (long)rec[v + 3] << 24) : 8;
        if (nlen == (long)strlen(name) && memcmp(rec + at + 1, name, (size_t)nlen) == 0) {
            *vlen = n;
            return v;
        }
        at = v + n;
    }
    return -1;
}

/* copies base.ckpt to dst with `n` bytes at `off` of the header (where 'h') or the parameters
   ('p') replaced, or the value of the config's ('c') or state's ('s') record field `name`
   replaced by the encoded value `bytes` (any length: the blob's size in the header follows);
   the CRC made valid again */
static void craft_at(const char *dst, char where, long off, const char *name, const void *bytes, size_t n) {
    char path[256];
    long len = 0, base, vlen = (long)n, at;
    unsigned char *b, *out;
    uint32_t crc;
    int i;
    snprintf(path, sizeof path, "%s/base.ckpt", D);
    b = (unsigned char *)proc_slurp(path, &len);
    if (!b || len < 100) { free(b); return; }
    base = where == 'h' ? 0 : where == 'c' ? 56 : where == 's' ? 56 + get_u64(b + 40) : 56 + get_u64(b + 40) + get_u64(b + 48);
    if (name) {
        long rec = base + (where == 'c' ? MODEL_RECORD_AT : STATE_RECORD_AT), blob = get_u64(b + (where == 'c' ? 40 : 48));
        at = record_value_at(b + rec, blob - (rec - base), name, &vlen);
        if (at < 0) { free(b); return; } /* no fixture: its case fails */
        off = rec - base + at;
        put_u64(b + (where == 'c' ? 40 : 48), blob + (long)n - vlen);
    }
    out = (unsigned char *)malloc((size_t)(len + (long)n - vlen));
    memcpy(out, b, (size_t)(base + off));
    memcpy(out + base + off, bytes, n);
    memcpy(out + base + off + (long)n, b + base + off + vlen, (size_t)(len - base - off - vlen));
    len += (long)n - vlen;
    crc = moe_crc32(0, out, (size_t)len - 4);
    for (i = 0; i < 4; i++) out[len - 4 + i] = (unsigned char)(crc >> (8 * i));
    write_file(dst, (const char *)out, (size_t)len);
    free(b);
    free(out);
}
static void craft(const char *dst, char where, long off, const void *bytes, size_t n) { craft_at(dst, where, off, NULL, bytes, n); }
static void craft_field(const char *dst, char where, const char *name, const void *bytes, size_t n) { craft_at(dst, where, 0, name, bytes, n); }

#define LM proc_example("train_lm")
#define SMALL "--quick", "--d", "16", "--heads", "1", "--layers", "2", "--experts", "4", "--expert-ff", "16", "--d-ff", "32", "--sample", "0"

static int make_ckpt_fixtures(void) {
    char log[128];
    int neg_step[2] = {-5, -1};
    unsigned char zero[8] = {0}, big_d[8] = {0}, nan_v[8], genres[4 + 256];
    float nan_f = NAN, huge_v = 1e30f;
    double nan_d = NAN;
    moe_store s;
    moe_err err;
    char path[256];
    snprintf(log, sizeof log, "%s.log", D);
    if (proc_run(NULL, log, LM, SMALL, "--out", D, "--name", "base", "--stop-at", "2", END) != 0) return 0;
    truncate_copy("base.ckpt", "keep.ckpt", 1L << 40); /* an existing checkpoint a failing save must not touch */
    truncate_copy("base.ckpt", "half.ckpt", 2000);
    truncate_copy("base.ckpt", "empty.ckpt", 0);
    {
        char p2[256];
        long n = 0;
        char *b;
        snprintf(p2, sizeof p2, "%s/base.ckpt", D);
        b = proc_slurp(p2, &n);
        if (b && n > 5000) {
            b[n / 2] ^= 0x10; /* one bit flipped, the CRC left as it was */
            write_file("flip.ckpt", b, (size_t)n);
        }
        free(b);
    }
    craft_field("log0.ckpt", 's', "opt.log_every", zero, 8);
    craft("negstep.ckpt", 'h', 32, neg_step, sizeof neg_step);
    memset(genres, 'x', sizeof genres); /* 256 bytes of text for a 256-byte array: no room for its NUL */
    genres[0] = 0; genres[1] = 1; genres[2] = 0; genres[3] = 0;
    craft_field("genres.ckpt", 's', "opt.genres", genres, sizeof genres);
    big_d[1] = 0x10; /* 4096 */
    craft_field("bigcfg.ckpt", 'c', "d", big_d, 8);
    memcpy(nan_v, &nan_d, 8); /* f64 bits, little-endian hosts */
    craft_field("nanlr.ckpt", 's', "opt.lr", nan_v, 8);
    craft("nanparam.ckpt", 'p', 40, &nan_f, sizeof nan_f);
    craft("hugeparam.ckpt", 'p', 40, &huge_v, sizeof huge_v);
    /* a checkpoint of another program: a store with no config or state blobs */
    moe_store_init(&s);
    moe_store_add(&s, "w", 0, 16, 16, 0, 0);
    moe_store_alloc(&s, 1);
    snprintf(path, sizeof path, "%s/foreign.ckpt", D);
    moe_checkpoint_save(path, &s, 1, 3, NULL, 0, NULL, 0, &err);
    moe_store_free(&s);
    return 1;
}

/* ---- the catalogue -------------------------------------------------------------------------- */

static void test_flags(void) {
    char long_genres[400];
    TEST_BEGIN("flags: malformed, out of range, NaN, unknown, missing values");
    memset(long_genres, 'a', sizeof long_genres - 1);
    long_genres[sizeof long_genres - 1] = 0;
    bad("train_lm --steps 3abc", 2, "--steps needs a whole number", "3abc", 0, LM, "--steps", "3abc", END);
    bad("train_lm --d abc", 2, "--d needs a whole number", NULL, 0, LM, "--d", "abc", END);
    bad("train_lm --seed -1", 2, "--seed must be between 0 and", NULL, 0, LM, "--seed", "-1", END);
    bad("train_lm --lr nan", 2, "--lr needs a finite number", NULL, 0, LM, "--lr", "nan", END);
    bad("train_lm --lr inf", 2, "--lr needs a finite number", NULL, 0, LM, "--lr", "inf", END);
    bad("train_lm --steps 99999999999", 2, "--steps must be between", NULL, 0, LM, "--steps", "99999999999", END);
    bad("train_lm --batch 0", 2, "--batch must be between 1", NULL, 0, LM, "--batch", "0", END);
    bad("train_lm --router nonsense", 2, "--router must be one of", NULL, 0, LM, "--router", "nonsense", END);
    bad("train_lm --steps (no value)", 2, "--steps needs a value", NULL, 0, LM, "--steps", END);
    bad("train_lm --quick=1", 2, "--quick takes no value", NULL, 0, LM, "--quick=1", END);
    bad("train_lm --genres of 399 bytes", 2, "--genres is too long", NULL, 0, LM, "--genres", long_genres, END);
    bad("train_lm --frobnicate", 2, "unknown flag '--frobnicate'", "usage: train_lm", 0, LM, "--frobnicate", END);
    bad("calibrate --iters 1e10", 2, "--iters needs a whole number", NULL, 0, proc_example("calibrate"), "@scores.csv", "--iters", "1e10", END);
    bad("calibrate --min-count 1e12", 2, "--min-count needs a whole number", NULL, 0, proc_example("calibrate"), "@scores.csv", "--min-count", "1e12", END);
    bad("calibrate --frac 0", 2, "--frac must be between", NULL, 0, proc_example("calibrate"), "@scores.csv", "--frac", "0", END);
    bad("calibrate without an input", 2, "give one input CSV", NULL, 0, proc_example("calibrate"), END);
    bad("calibrate with two inputs", 2, "one argument too many", NULL, 0, proc_example("calibrate"), "@scores.csv", "@scores.csv", END);
    bad("length_bias --pairs 10", 2, "--pairs must be between 50", NULL, 0, proc_example("length_bias"), "--pairs", "10", END);
    bad("length_bias --bias nan", 2, "--bias needs a finite number", NULL, 0, proc_example("length_bias"), "--bias", "nan", END);
    bad("train_moe --experts 0", 2, "--experts must be between 1", NULL, 0, proc_example("train_moe"), "--experts", "0", END);
    bad("aoe_toy --d 2", 2, "--d must be between 4", NULL, 0, proc_example("aoe_toy"), "--d", "2", END);
    bad("router_compare --variants nope", 2, "unknown variant 'nope'", NULL, 0, proc_example("router_compare"), "--variants", "nope", END);
    bad("gw_finetune --share 1", 2, "--share must be between", NULL, 0, proc_example("gw_finetune"), "--share", "1", END);
    bad("plot_csv without --y", 2, "give --y COL", NULL, 0, proc_example("plot_csv"), "@x.png", "@scores.csv", END);
    bad("bench/matmul nonsense", 2, "unknown config 'nonsense'", NULL, 0, proc_bench("matmul"), "nonsense", END);
}

static void test_calibrate_input(void) {
    const char *C = proc_example("calibrate");
    TEST_BEGIN("calibrate: missing, empty, binary, truncated, NaN/Inf/1e308 input; unwritable output");
    bad("missing input", 1, "cannot open", "No such file", 0, C, "@missing.csv", "--out", "@o.csv", END);
    bad("a directory as input", 1, "is a directory, not a file", NULL, 0, C, "@ro", "--out", "@o.csv", END);
    bad("empty input", 1, "is empty", NULL, 0, C, "@empty.csv", "--out", "@o.csv", END);
    bad("binary input", 1, "the header has no column 'id'", NULL, 0, C, "@binary.bin", "--out", "@o.csv", END);
    bad("header only", 1, "has a header but no rows", NULL, 0, C, "@header_only.csv", "--out", "@o.csv", END);
    bad("NaN score", 1, "line 3: column 'score_chosen' is not a finite number", NULL, 0, C, "@nan.csv", "--out", "@o.csv", END);
    bad("-inf score", 1, "line 3: column 'score_rejected' is not a finite number", NULL, 0, C, "@inf.csv", "--out", "@o.csv", END);
    bad("scores of 1e308", 1, "magnitudes up to", NULL, 0, C, "@huge.csv", "--out", "@o.csv", END);
    bad("a short row", 1, "line 3: 4 fields, the header has 6", NULL, 0, C, "@short.csv", "--out", "@o.csv", END);
    bad("a missing column", 1, "the header has no column 'len_rejected'", NULL, 0, C, "@nocol.csv", "--out", "@o.csv", END);
    bad("an unterminated quote", 1, "line 2", NULL, 0, C, "@quote.csv", "--out", "@o.csv", END);
    bad("a truncated .gz", 1, "could not be decompressed to its end", "truncated", 0, C, "@trunc.csv.gz", "--out", "@o.csv", END);
    bad("a missing .gz", 1, "cannot open", "No such file", 0, C, "@missing.csv.gz", "--out", "@o.csv", END);
    bad("output in a missing folder", 1, "cannot write", "No such file", 0, C, "@scores.csv", "--out", "@nodir/o.csv", END);
    bad("output under a file", 1, "cannot write", "Not a directory", 0, C, "@scores.csv", "--out", "@scores.csv/o.csv", END);
    bad("output in a read-only folder", 1, "cannot write", "Permission denied", OPT_NOBODY, C, "@scores.csv", "--out", "@ro/o.csv", END);
    bad("a write error over an existing output", 1, "existing_out.csv", "unchanged", OPT_FSIZE, C, "@scores.csv", "--out", "@existing_out.csv", END);
    { /* not bad, but once cut: a header record of more than 8 KB with a quoted line break is written back whole */
        char *text = (char *)malloc(1 << 16), *out, in[128], outp[128], log[128];
        size_t len = 0, hl;
        int i;
        len += (size_t)sprintf(text, "id,subset,score_chosen,score_rejected,len_chosen,len_rejected");
        for (i = 0; i < 400; i++) len += (size_t)sprintf(text + len, ",extra_column_number_%04d", i);
        len += (size_t)sprintf(text + len, ",\"a note\nover two lines\"");
        hl = len;
        len += (size_t)sprintf(text + len, "\n");
        for (i = 0; i < 40; i++) {
            int k;
            len += (size_t)sprintf(text + len, "%d,a,%d,%d,%d,%d", i, i % 3, i % 5, 10 + i, 90 - i);
            for (k = 0; k < 400; k++) len += (size_t)sprintf(text + len, ",0");
            len += (size_t)sprintf(text + len, ",x\n");
        }
        write_file("long_header.csv", text, len);
        snprintf(in, sizeof in, "%s/long_header.csv", D);
        snprintf(outp, sizeof outp, "%s/long_header_out.csv", D);
        snprintf(log, sizeof log, "%s.log", D);
        CHECK(hl > 8191 && proc_run(NULL, log, C, in, "--out", outp, END) == 0, "calibrate on a %zu-byte header record", hl);
        out = proc_slurp(outp, NULL);
        CHECK(out && strncmp(out, text, hl) == 0 && strncmp(out + hl, ",cal_chosen,cal_rejected\n", 25) == 0,
              "the %zu-byte header record (a quoted line break in it) is written back whole", hl);
        free(out);
        free(text);
    }
}

static void test_length_bias_input(void) {
    const char *L = proc_example("length_bias");
    TEST_BEGIN("length_bias --hh: missing, directory, truncated .gz, empty, not dialogues, too few pairs");
    bad("--hh missing", 1, "cannot open", "No such file", 0, L, "--hh", "@missing.jsonl", END);
    bad("--hh missing .gz", 1, "cannot open", "No such file", 0, L, "--hh", "@missing.jsonl.gz", END);
    bad("--hh a directory", 1, "is a directory, not a file", NULL, 0, L, "--hh", "@ro", END);
    bad("--hh truncated .gz", 1, "could not be decompressed to its end", NULL, 0, L, "--hh", "@trunc.jsonl.gz", END);
    bad("--hh empty", 1, "no preference pairs", NULL, 0, L, "--hh", "@empty.jsonl", END);
    bad("--hh binary", 1, "JSON line 1", NULL, 0, L, "--hh", "@binary.bin", END);
    bad("--hh not dialogues", 1, "has no \"\\n\\nAssistant:\" turn", NULL, 0, L, "--hh", "@nodialogue.jsonl", END);
    bad("--hh with 3 pairs", 1, "holds 3 preference pairs", "at least 10", 0, L, "--hh", "@few.jsonl", END);
}

static void test_train_lm_input(void) {
    TEST_BEGIN("train_lm: damaged, crafted and foreign checkpoints, conflicts, missing data, unwritable output, a write error, divergence");
    bad("--resume missing", 1, "cannot open checkpoint", "No such file", 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@missing.ckpt", END);
    bad("--resume a directory", 1, "is a directory, not a checkpoint", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@ro", END);
    bad("--resume empty", 1, "too short for a checkpoint", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@empty.ckpt", END);
    bad("--resume truncated", 1, "truncated or corrupt", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@half.ckpt", END);
    bad("--resume a flipped bit", 1, "fails its CRC-32 check", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@flip.ckpt", END);
    bad("--resume binary", 1, "not a moe.h checkpoint", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@binary.bin", END);
    bad("--resume log_every 0", 1, "--log-every must be between 1", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@log0.ckpt", END);
    bad("--resume step -5", 1, "holds step -5", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@negstep.ckpt", END);
    bad("--resume a genre list without room for its end", 1, "'opt.genres' holds 256 bytes of text", NULL, 0, LM, SMALL, "--out", D, "--name", "r",
        "--resume", "@genres.ckpt", END);
    bad("--resume a config of another size", 1, "a config that does not fit them", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume",
        "@bigcfg.ckpt", END);
    bad("--resume lr NaN", 1, "--lr is not a number", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@nanlr.ckpt", END);
    bad("--resume a NaN parameter", 1, "NaN", "not loaded", 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@nanparam.ckpt", END);
    bad("--resume a parameter of 1e30", 1, "1e+30", "not loaded", 0, LM, SMALL, "--out", D, "--name", "r", "--resume", "@hugeparam.ckpt", END);
    bad("--resume another program's checkpoint", 1, "is a checkpoint, not a model file", NULL, 0, LM, SMALL, "--out", D, "--name", "r", "--resume",
        "@foreign.ckpt", END);
    bad("--resume with --d 64", 2, "--d 64 conflicts with", "saved with --d 16", 0, LM, SMALL, "--d", "64", "--out", D, "--name", "r", "--resume",
        "@base.ckpt", END);
    bad("--resume with --experts 8", 2, "--experts 8 conflicts with", NULL, 0, LM, SMALL, "--experts", "8", "--out", D, "--name", "r", "--resume",
        "@base.ckpt", END);
    bad("--data missing", 1, "run `make data` first", NULL, 0, LM, SMALL, "--data", "@nodata", "--out", D, "--name", "r", END);
    bad("--out under a file", 1, "train_lm: cannot create directory", "is not a directory", 0, LM, SMALL, "--out", "@scores.csv/sub", "--name", "r", END);
    bad("--out read-only", 1, "cannot write the log", "Permission denied", OPT_NOBODY, LM, SMALL, "--out", "@ro", "--name", "r", END);
    bad("a write error in the final checkpoint", 1, "disk full?", "keep.ckpt' is unchanged", OPT_FSIZE, LM, SMALL, "--steps", "2", "--out", D,
        "--name", "keep", END);
    bad("divergence (--lr 1000 --clip 0)", 1, "training diverged", "stopped without saving", 0, LM, SMALL, "--lr", "1000", "--clip", "0", "--out", D,
        "--name", "div", END);
}

static void test_plot_csv_input(void) {
    const char *P = proc_example("plot_csv");
    TEST_BEGIN("plot_csv: missing, directory, empty input, a missing column, an unwritable output");
    bad("missing input", 1, "cannot open", "No such file", 0, P, "@p.png", "--y", "score_chosen", "@missing.csv", END);
    bad("a directory as input", 1, "is a directory", NULL, 0, P, "@p.png", "--y", "score_chosen", "@ro", END);
    bad("empty input", 1, "is empty", NULL, 0, P, "@p.png", "--y", "score_chosen", "@empty.csv", END);
    bad("a missing column", 1, "has no column 'step'", NULL, 0, P, "@p.png", "--y", "score_chosen", "@scores.csv", END);
    bad("binary input", 1, "binary.bin", NULL, 0, P, "@p.png", "--x", "id", "--y", "score_chosen", "@binary.bin", END);
    bad("output in a missing folder", 1, "could not write", NULL, 0, P, "@nodir/p.png", "--x", "id", "--y", "score_chosen", "@scores.csv", END);
}

/* the loaders in-process: an empty JSON string (the reader once appended it to a NULL buffer:
   undefined behaviour the sanitizer build checks) and an empty key */
static void test_loaders(void) {
    const char *line = "{\"\": \"\", \"chosen\": \"\\n\\nHuman: \\n\\nAssistant:\", \"rejected\": \"\\n\\nHuman: \\n\\nAssistant: x\"}\n";
    rwd_text_pairs p;
    moe_err err;
    FILE *f = tmpfile();
    TEST_BEGIN("loaders in-process: empty JSON strings and keys");
    memset(&p, 0, sizeof p);
    CHECK(f != NULL, "tmpfile");
    if (!f) return;
    fputs(line, f);
    rewind(f);
    CHECK(rwd_hh_read(&p, f, &err) == MOE_OK && p.n == 1 && strcmp(p.chosen[0], "") == 0 && strcmp(p.rejected[0], " x") == 0,
          "one pair with an empty chosen answer: %s", err.msg);
    fclose(f);
    rwd_text_pairs_free(&p);
}

int main(void) {
    char path[128], sub[160];
    int have_examples = access(proc_example("calibrate"), X_OK) == 0 && access(LM, X_OK) == 0 && access(proc_bench("matmul"), X_OK) == 0;
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    snprintf(D, sizeof D, "/tmp/moe_bad_input_%d", (int)getpid());
    test_loaders();
    if (!have_examples) {
        printf("SKIP the example cases: %s, %s or %s is not built (make test builds them; make test-asan their sanitized builds)\n",
               proc_example("calibrate"), LM, proc_bench("matmul"));
        return test_summary();
    }
    if (mkdir(D, 0755) != 0) {
        printf("cannot create %s: %s\n", D, strerror(errno));
        return 1;
    }
    snprintf(sub, sizeof sub, "%s/ro", D);
    mkdir(sub, 0555);
    chmod(sub, 0555); /* read-only, whatever the umask */
    make_csv_fixtures();
    test_flags();
    test_calibrate_input();
    test_length_bias_input();
    test_plot_csv_input();
    if (f) {
        fclose(f);
        if (make_ckpt_fixtures()) test_train_lm_input();
        else CHECK(0, "train_lm could not make the checkpoint the cases start from (see %s.log)", D);
    } else {
        printf("SKIP the train_lm cases: data/brown is absent (make data)\n");
    }
    printf("%d bad-input cases\n", n_cases);
    CHECK(n_cases >= 50 || !f, "at least 50 cases ran (%d)", n_cases);
    /* clean up: the folder holds only what the fixtures and the cases wrote */
    snprintf(path, sizeof path, "%s.log", D);
    remove(path);
    if (proc_rmtree(D) != 0) printf("could not remove %s\n", D);
    return test_summary();
}
