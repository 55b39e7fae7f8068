/* test_examples.c - runs each example's --quick mode as a user would and checks what it
   prints and writes; every example and benchmark answers --help. The examples and benchmarks
   are built by `make test` before this program runs. With MOE_EXAMPLES_DIR and MOE_BENCH_DIR set
   (make test-asan: the programs built with ASan and UBSan) they come from there (proc_example,
   proc_bench), and train_lm's runs use a model of ~15k parameters (the default --quick model
   takes minutes under the sanitizers; the code paths are the same). */
#define _POSIX_C_SOURCE 200809L
#include "moe.h"  /* defines: moe_model_load_config, moe_checkpoint_blobs, moe_record_read, moe_crc32 */
#include "test.h"
#include "proc.h" /* defines: proc_run, proc_log_has, proc_slurp, proc_example, proc_bench, proc_sanitized */

#define END ((const char *)NULL)

/* value of `key=` on the last line of `log` that starts with `prefix` */
static double value_of(const char *log, const char *prefix, const char *key) {
    FILE *f = fopen(log, "r");
    char line[4096], found[4096] = "";
    const char *p;
    char pat[128];
    if (!f) return NAN;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, prefix, strlen(prefix)) == 0) strcpy(found, line);
    fclose(f);
    snprintf(pat, sizeof pat, " %s=", key);
    p = strstr(found, pat);
    return p ? atof(p + strlen(pat)) : NAN;
}

static int file_contains(const char *path, const char *needle) { return proc_log_has(path, needle); }

/* train_lm with the arguments listed (ending with END); the small model first when sanitized */
static int run_lm(const proc_opts *o, const char *log, ...) {
    static const char *const small[] = {"--d", "16", "--heads", "1", "--layers", "2", "--experts", "4", "--expert-ff", "16", "--d-ff", "32"};
    const char *argv[64];
    int n = 0, k;
    va_list ap;
    argv[n++] = proc_example("train_lm");
    if (proc_sanitized())
        for (k = 0; k < (int)(sizeof small / sizeof small[0]); k++) argv[n++] = small[k];
    va_start(ap, log);
    while (n < 63 && (argv[n] = va_arg(ap, const char *)) != NULL) n++;
    va_end(ap);
    argv[n] = NULL;
    return proc_runv(o, log, argv);
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long n;
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fclose(f);
    return n;
}

static void test_train_moe(void) {
    const char *log = "build/tmp_examples/train_moe.log", *bin = proc_example("train_moe");
    double spec, ratio;
    TEST_BEGIN("examples/train_moe --quick: experts specialise, MoE beats the dense baseline");
    mkdir("build/tmp_examples", 0777);
    CHECK(proc_run(NULL, log, bin, "--quick", "--out", "build/tmp_examples", END) == 0, "train_moe exits 0 (see %s)", log);
    spec = value_of(log, "result", "specialisation");
    ratio = value_of(log, "result", "ratio");
    /* one expert per cluster: on average >= 90% of a cluster's tokens go to its top expert */
    CHECK(spec > 0.9, "specialisation %.3f > 0.9", spec);
    CHECK(ratio < 0.9, "MoE/dense MSE ratio %.3f < 0.9", ratio);
    CHECK(file_size("build/tmp_examples/train_moe_loss.png") > 1000 && file_size("build/tmp_examples/train_moe_load.png") > 1000, "PNG files written");
    CHECK(proc_run(NULL, log, bin, "--router", "nonsense", END) == 2 && file_contains(log, "--router must be one of"), "an unknown router is refused");
    CHECK(proc_run(NULL, log, bin, "--quick", "--top-k", "9", "--out", "build/tmp_examples", END) != 0 &&
          file_contains(log, "top_k (9) exceeds n_experts (8)"), "top_k > experts is refused with a sentence");
}

static int files_equal(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int ca, cb, same = fa && fb;
    while (same) {
        ca = fgetc(fa);
        cb = fgetc(fb);
        if (ca != cb) same = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

/* train_lm's checkpoints before they were model files held the raw moe_model_config and the
   raw train_state below (frozen: the layout of that time). make_legacy rewrites a current
   checkpoint so, reading the state from its record; cut_genres fills the genre list to the
   end of its array (no NUL), as a damaged file might. */
typedef struct legacy_options {
    int batch, seq, accum, steps, warmup, eval_every, eval_batches, log_every, load_every, save_every;
    float lr, min_lr, weight_decay, clip, beta2;
    int seed;
    char genres[256];
} legacy_options;
typedef struct legacy_state {
    legacy_options opt;
    moe_loader_state loader;
    moe_rng noise;
    double tokens;
} legacy_state;
#define LF(type, member) MOE_FIELD(type, legacy_state, member)
static const moe_field legacy_fields[] = {
    LF(MOE_FIELD_INT, opt.batch), LF(MOE_FIELD_INT, opt.seq), LF(MOE_FIELD_INT, opt.accum), LF(MOE_FIELD_INT, opt.steps),
    LF(MOE_FIELD_INT, opt.warmup), LF(MOE_FIELD_INT, opt.eval_every), LF(MOE_FIELD_INT, opt.eval_batches),
    LF(MOE_FIELD_INT, opt.log_every), LF(MOE_FIELD_INT, opt.load_every), LF(MOE_FIELD_INT, opt.save_every),
    LF(MOE_FIELD_FLOAT, opt.lr), LF(MOE_FIELD_FLOAT, opt.min_lr), LF(MOE_FIELD_FLOAT, opt.weight_decay), LF(MOE_FIELD_FLOAT, opt.clip),
    LF(MOE_FIELD_FLOAT, opt.beta2), LF(MOE_FIELD_INT, opt.seed), LF(MOE_FIELD_TEXT, opt.genres),
    LF(MOE_FIELD_INT, loader.rng.state), LF(MOE_FIELD_INT, loader.rng.inc), LF(MOE_FIELD_INT, loader.batches),
    LF(MOE_FIELD_INT, noise.state), LF(MOE_FIELD_INT, noise.inc), LF(MOE_FIELD_FLOAT, tokens),
};
#undef LF

static void put_u64(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static int make_legacy(const char *src, const char *dst, int cut_genres) {
    moe_model_config cfg;
    moe_ckpt_info info;
    moe_err err;
    legacy_state ls;
    unsigned char *blob = NULL, *b = NULL, *out = NULL;
    long len = 0, payload_at, payload;
    size_t at = 0;
    uint32_t crc;
    int i, ok = 0;
    FILE *f;
    memset(&ls, 0, sizeof ls);
    if (moe_model_load_config(src, &cfg, &info, &err) != MOE_OK || info.state_bytes < 8) return 0;
    blob = (unsigned char *)malloc((size_t)info.state_bytes);
    b = (unsigned char *)proc_slurp(src, &len);
    if (blob && b && moe_checkpoint_blobs(src, NULL, 0, blob, (size_t)info.state_bytes, &err) == MOE_OK &&
        moe_record_read(&ls, NULL, blob + 8, (size_t)info.state_bytes - 8, legacy_fields, (int)(sizeof legacy_fields / sizeof legacy_fields[0]),
                        &err) == MOE_OK) {
        if (cut_genres) memset(ls.opt.genres, 'x', sizeof ls.opt.genres);
        payload_at = 56 + (long)info.config_bytes + (long)info.state_bytes;
        payload = len - payload_at - 4;
        out = (unsigned char *)malloc(56 + sizeof cfg + sizeof ls + (size_t)payload + 4);
        if (out) {
            memcpy(out, b, 56);
            put_u64(out + 40, sizeof cfg);
            put_u64(out + 48, sizeof ls);
            at = 56;
            memcpy(out + at, &cfg, sizeof cfg), at += sizeof cfg;
            memcpy(out + at, &ls, sizeof ls), at += sizeof ls;
            memcpy(out + at, b + payload_at, (size_t)payload), at += (size_t)payload;
            crc = moe_crc32(0, out, at);
            for (i = 0; i < 4; i++) out[at++] = (unsigned char)(crc >> (8 * i));
            f = fopen(dst, "wb");
            ok = f && fwrite(out, 1, at, f) == at;
            if (f && fclose(f) != 0) ok = 0;
        }
    }
    free(blob);
    free(b);
    free(out);
    return ok;
}

static void test_train_lm(void) {
    const char *log = "build/tmp_examples/train_lm.log";
    const char *dir = "build/tmp_examples";
    double bpb;
    proc_opts one = proc_opts_default(), two = proc_opts_default();
    FILE *f = fopen("data/brown/train/news.txt", "rb");
    TEST_BEGIN("examples/train_lm --quick: trains, evaluates, resumes bit-identically");
    if (!f) {
        printf("   skipped: data/brown is absent (run `make data` to fetch the Brown corpus)\n");
        return;
    }
    fclose(f);
    one.env[0] = "OMP_NUM_THREADS=1";
    two.env[0] = "OMP_NUM_THREADS=2";
    CHECK(run_lm(&two, log, "--quick", "--name", "full", "--out", dir, "--sample", "30", END) == 0, "train_lm exits 0 (see %s)", log);
    bpb = value_of(log, "result", "val_bpb");
    if (proc_sanitized()) CHECK(bpb > 3.0 && bpb < 7.9, "validation bits per byte of the small model after 30 tiny steps: %.3f (uniform bytes: 8)", bpb);
    else CHECK(bpb > 3.0 && bpb < 6.0, "validation bits per byte after 30 tiny steps: %.3f (uniform bytes: 8)", bpb);
    CHECK(file_contains(log, "sample (temperature"), "a sample is printed");
    CHECK(file_size("build/tmp_examples/full_loss.png") > 1000 && file_size("build/tmp_examples/full_load.png") > 1000, "PNG files written");
    /* interrupted at step 12 with one thread, resumed with two: the same final checkpoint */
    remove("build/tmp_examples/part.csv");
    CHECK(run_lm(&one, log, "--quick", "--name", "part", "--stop-at", "12", "--out", dir, "--sample", "30", END) == 0 &&
          file_contains(log, "stopped at step 12"), "stop at step 12");
    remove("build/tmp_examples/legacy.csv");
    CHECK(make_legacy("build/tmp_examples/part.ckpt", "build/tmp_examples/legacy.ckpt", 0) &&
          make_legacy("build/tmp_examples/part.ckpt", "build/tmp_examples/legacy_cut.ckpt", 1), "an earlier train_lm's checkpoint of step 12 made");
    CHECK(run_lm(&two, log, "--quick", "--name", "part", "--resume", "build/tmp_examples/part.ckpt", "--out", dir, "--sample", "30", END) == 0 &&
          file_contains(log, "resumed"), "resume");
    CHECK(files_equal("build/tmp_examples/full.ckpt", "build/tmp_examples/part.ckpt"), "resumed run's checkpoint is byte-identical to the uninterrupted run's");
    CHECK(files_equal("build/tmp_examples/full.csv", "build/tmp_examples/part.csv"), "resumed run's log is byte-identical to the uninterrupted run's");
    /* an earlier train_lm's checkpoint (raw config and state) resumes while this build's
       moe_model_config has the layout of that time; after a change model_io says so */
    if (run_lm(&two, log, "--quick", "--name", "legacy", "--resume", "build/tmp_examples/legacy.ckpt", "--out", dir, "--sample", "30", END) == 0)
        CHECK(files_equal("build/tmp_examples/full.ckpt", "build/tmp_examples/legacy.ckpt"),
              "an earlier train_lm's checkpoint resumes to the uninterrupted run's final checkpoint, byte for byte");
    else
        CHECK(file_contains(log, "of an older layout"), "an earlier train_lm's checkpoint: resumed, or a sentence on the older layout (see %s)", log);
    CHECK(run_lm(NULL, log, "--quick", "--name", "legacy_cut", "--resume", "build/tmp_examples/legacy_cut.ckpt", "--out", dir, END) == 1 &&
          (file_contains(log, "genre list without its end") || file_contains(log, "of an older layout")),
          "an earlier train_lm's state whose genre list has no end is refused (see %s)", log);
    /* a damaged checkpoint is refused with a sentence */
    f = fopen("build/tmp_examples/bad.ckpt", "wb");
    if (f) { fputs("MOECKPT", f); fclose(f); }
    CHECK(run_lm(NULL, log, "--quick", "--name", "bad", "--resume", "build/tmp_examples/bad.ckpt", "--out", dir, END) != 0 &&
          file_contains(log, "too short for a checkpoint"), "damaged checkpoint refused");
}

/* every example and benchmark: --help (and -h) describes it and exits 0; an unknown flag
   prints the usage and exits 2 */
static void test_help(void) {
    static const char *const programs[] = {
        "aoe_toy", "armo_dpa", "calibrate", "closer_look", "cqil", "gw_finetune", "length_bias", "plot_csv", "router_compare", "ssrm", "train_lm",
        "train_moe", "bench/lowess", "bench/matmul", "bench/moe_layer", "bench/train_lm"};
    const char *log = "build/tmp_examples/help.log";
    int i;
    TEST_BEGIN("every example and benchmark answers --help and -h, and refuses an unknown flag with the usage");
    for (i = 0; i < (int)(sizeof programs / sizeof programs[0]); i++) {
        const char *p = strncmp(programs[i], "bench/", 6) == 0 ? proc_bench(programs[i] + 6) : proc_example(programs[i]);
        CHECK(proc_run(NULL, log, p, "--help", END) == 0 && file_contains(log, "usage: ") && file_contains(log, "--help, -h") &&
              file_contains(log, " - "), "%s --help: exit 0 with a description and the flags", p);
        CHECK(proc_run(NULL, log, p, "-h", END) == 0 && file_contains(log, "usage: "), "%s -h", p);
        CHECK(proc_run(NULL, log, p, "--no-such-flag", END) == 2 && file_contains(log, "unknown flag '--no-such-flag'") &&
              file_contains(log, "usage: "), "%s --no-such-flag: exit 2 with the usage", p);
    }
}

static void test_aoe_toy(void) {
    const char *log = "build/tmp_examples/aoe_toy.log";
    TEST_BEGIN("examples/aoe_toy --quick: AoE serves two classes with one expert, a routed MoE splits them");
    proc_opts one = proc_opts_default();
    one.env[0] = "OMP_NUM_THREADS=1";
    CHECK(proc_run(&one, log, proc_example("aoe_toy"), "--quick", "--out", "build/tmp_examples", END) == 0, "aoe_toy exits 0 (see %s)", log);
    CHECK(value_of(log, "result model=aoe", "one_expert_for_classes_0_1") == 2.0, "AoE: classes 0 and 1 on one expert in both seeds");
    CHECK(value_of(log, "result model=moe", "one_expert_for_classes_0_1") == 0.0, "routed MoE: classes 0 and 1 split over the experts");
    CHECK(file_size("build/tmp_examples/aoe_toy.png") > 1000, "PNG written");
}

int main(void) {
    test_train_moe();
    test_aoe_toy();
    test_train_lm();
    test_help();
    return test_summary();
}
