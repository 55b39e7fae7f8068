/* test_model_io.c - moe.h section >>moe:model_io: records of named fields, model files.
   Round trips of dense and MoE models of every router family (bit-identical logits), the
   field table against moe_model_config's layout, files from before model files (train_lm's
   raw config bytes, plain checkpoints), and refused files: truncated, corrupted, wrong
   versions, unknown fields, absurd sizes, non-finite values.

   Across languages (tests/run.sh, build matrix): the C build writes model files that the C++
   build of this same program (c++ -x c++) reads, and back:
       test_model_io --write DIR      writes one file per test config into DIR
       test_model_io --read DIR       loads them and checks config, parameters, moments,
                                      user record and logits against its own rebuild */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>

/* every allocation of the library passes here: a crafted file must not make it reserve much */
static size_t io_alloc_largest = 0;
static void *io_malloc(size_t n) {
    if (n > io_alloc_largest) io_alloc_largest = n;
    return malloc(n);
}
#define MOE_MALLOC(n) io_malloc(n)
#define MOE_FREE(p) free(p)
#define MOE_IMPLEMENTATION
#include "moe.h" /* defines: moe_model_save/load/load_config/declare, moe_record_*, moe_checkpoint_* */
#include "test.h"
#include "proc.h" /* defines: proc_mkdirs, proc_rmtree */
#include <time.h>

#define IO_CONFIGS 7
#define IO_B 2
#define IO_T 8

static char tmpdir[256];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "build/tmp_model_io_%ld", (long)time(NULL) ^ (long)clock());
    proc_mkdirs(tmpdir); /* says why when it cannot */
}

/* Tiny models of every kind the file must describe. */
static moe_model_config io_config(int k) {
    moe_model_config c = moe_model_config_default();
    c.vocab = 32;
    c.max_seq = 12;
    c.d = 16;
    c.n_layers = 2;
    c.n_heads = 2;
    c.d_ff = 24;
    c.moe.n_experts = 4;
    c.moe.top_k = 2;
    c.moe.d_ff = 12;
    c.moe.router_init_std = 0.5f;
    switch (k) {
    case 0: /* dense, learned positions */
        c.moe_every = 0;
        break;
    case 1: /* MoE, rotary, Mixtral routing, a shared expert of its own width, a dense first layer */
        c.pos = MOE_POS_ROPE;
        c.rope_theta = 500.0f;
        c.n_layers = 3;
        c.dense_first = 1;
        c.moe.n_shared = 1;
        c.moe.d_ff_shared = 8;
        break;
    case 2: /* sigmoid router with bias, capacity, DeepSeek balance, z-loss, every other layer */
        c.n_layers = 3;
        c.moe_every = 2;
        c.moe.router = MOE_ROUTER_SIGMOID;
        c.moe.router_bias = 1;
        c.moe.renormalize = 0;
        c.moe.capacity_factor = 1.25f;
        c.moe.balance = MOE_BALANCE_DEEPSEEK;
        c.moe.balance_coef = 3e-3f;
        c.moe.z_coef = 1e-3f;
        c.moe.n_shared = 2;
        c.norm_eps = 1e-6f;
        break;
    case 3: /* Shazeer noisy top-k reading RMoE's GRU state, rotary */
        c.pos = MOE_POS_ROPE;
        c.moe.router = MOE_ROUTER_NOISY_TOPK;
        c.moe.noise_eps = 0.05f;
        c.moe.importance_coef = 0.02f;
        c.router_input = MOE_RIN_GRU;
        c.router_dim = 8;
        break;
    case 4: /* expert-choice over two-matrix ReLU experts with biases */
        c.moe.router = MOE_ROUTER_EXPERT_CHOICE;
        c.moe.expert = MOE_EXPERT_FFN;
        c.moe.activation = MOE_ACT_RELU;
        c.moe.expert_bias = 1;
        c.moe.balance = MOE_BALANCE_NONE;
        break;
    case 5: /* Autonomy-of-Experts */
        c.moe.router = MOE_ROUTER_AOE;
        c.moe.aoe_rank = 4;
        c.init_std = 0.05f;
        break;
    default: /* HyperMoE with an MLP router input and GW-MoE's threshold set */
        c.moe.hyper = 1;
        c.moe.gw_threshold = 0.5f;
        c.moe.gw_normalized = 1;
        c.router_input = MOE_RIN_MLP;
        c.router_dim = 8;
        break;
    }
    return c;
}

/* what a caller keeps in the user blob, as a record of its own (train_lm's options, ...) */
typedef struct io_user {
    int batch;
    double tokens;
    uint64_t rng_state;
    char genres[24];
    unsigned char flag; /* a 1-byte integer member */
    moe_balance_loss balance;
} io_user;

static const moe_field io_user_fields[] = {
    MOE_FIELD(MOE_FIELD_INT, io_user, batch),
    MOE_FIELD(MOE_FIELD_FLOAT, io_user, tokens),
    MOE_FIELD(MOE_FIELD_INT, io_user, rng_state),
    MOE_FIELD(MOE_FIELD_TEXT, io_user, genres),
    MOE_FIELD(MOE_FIELD_INT, io_user, flag),
    MOE_FIELD(MOE_FIELD_INT, io_user, balance),
};
#define IO_USER_FIELDS ((int)(sizeof io_user_fields / sizeof io_user_fields[0]))

static io_user io_user_value(int k) {
    io_user u;
    memset(&u, 0, sizeof u);
    u.batch = 16 + k;
    u.tokens = 1.5e9 + k;
    u.rng_state = 0xfedcba9876543210ULL + (uint64_t)k;
    snprintf(u.genres, sizeof u.genres, "news,fiction,%d", k);
    u.flag = (unsigned char)(200 + k);
    u.balance = MOE_BALANCE_SWITCH;
    return u;
}

static int io_user_equal(const io_user *a, const io_user *b) {
    return a->batch == b->batch && a->tokens == b->tokens && a->rng_state == b->rng_state &&
           strcmp(a->genres, b->genres) == 0 && a->flag == b->flag && a->balance == b->balance;
}

/* Model k with weights from seed k and made-up Adam moments, as every build makes it. */
static int io_build(moe_model *m, int k) {
    moe_model_config c = io_config(k);
    moe_rng r;
    size_t i;
    if (moe_model_init(m, &c, IO_B, IO_T) != MOE_OK) {
        CHECK(0, "config %d: init: %s", k, m->err.msg);
        return 0;
    }
    moe_model_init_weights(m, (uint64_t)(100 + k));
    moe_rng_seed(&r, (uint64_t)(200 + k));
    for (i = 0; i < m->S.numel; i++) {
        m->S.adam_m[i] = moe_rng_uniform(&r) - 0.5f;
        m->S.adam_v[i] = moe_rng_uniform(&r) * 1e-3f;
    }
    return 1;
}

/* logits of a fixed batch, into out (IO_B * IO_T * vocab) */
static int io_logits(moe_model *m, float *out) {
    int x[IO_B * IO_T], i;
    for (i = 0; i < IO_B * IO_T; i++) x[i] = (i * 7 + 3) % m->cfg.vocab;
    if (moe_model_forward(m, x, NULL, IO_B, IO_T, NULL) != MOE_OK) {
        CHECK(0, "forward: %s", m->err.msg);
        return 0;
    }
    memcpy(out, m->logits, sizeof(float) * IO_B * IO_T * (size_t)m->cfg.vocab);
    return 1;
}

/* ---- file helpers: whole-file bytes, patches with the CRC fixed, the record walked ---- */

static unsigned char *file_read(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    unsigned char *b;
    long size;
    *n = 0;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = (unsigned char *)malloc((size_t)size + 1);
    if (b && fread(b, 1, (size_t)size, f) != (size_t)size) { free(b); b = NULL; }
    fclose(f);
    if (b) *n = (size_t)size;
    return b;
}

static void file_write(const char *path, const unsigned char *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    if (fwrite(b, 1, n, f) != n) printf("short write to %s\n", path);
    fclose(f);
}

static uint64_t le_get(const unsigned char *p, int n) {
    uint64_t v = 0;
    int i;
    for (i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void le_put(unsigned char *p, uint64_t v, int n) {
    int i;
    for (i = 0; i < n; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* writes b to path with the checkpoint's trailing CRC-32 recomputed: a patch that only the
   model record's own checks can catch */
static void file_write_crc(const char *path, unsigned char *b, size_t n) {
    le_put(b + n - 4, moe_crc32(0, b, n - 4), 4);
    file_write(path, b, n);
}

/* offset of the named config entry's type byte in a model file (the record starts after the
   56-byte checkpoint header, "MOEMODEL" and the u32 version), or 0 */
static size_t record_entry(const unsigned char *b, size_t n, const char *name) {
    size_t p = 56 + 12, e, count;
    if (n < p + 4) return 0;
    count = (size_t)le_get(b + p, 4);
    p += 4;
    for (e = 0; e < count && p + 2 < n; e++) {
        size_t len = b[p];
        int hit = len == strlen(name) && memcmp(b + p + 1, name, len) == 0;
        p += 1 + len;
        if (hit) return p;
        p += 2 + (b[p] == 's' ? 4 + (size_t)le_get(b + p + 2, 4) : 8);
    }
    return 0;
}

static int same_file(const char *path, const unsigned char *b, size_t n) {
    size_t m;
    unsigned char *now = file_read(path, &m);
    int same = now && m == n && memcmp(now, b, n) == 0;
    free(now);
    return same;
}

/* ---------------------------------------------------------------------------------------- */

static void test_fields_cover_struct(void) {
    int n, i, j, tiles = 1, distinct = 1;
    const moe_field *f = moe_model_config_fields(&n);
    size_t covered = 0, end = 0;
    unsigned char used[sizeof(moe_model_config)];
    TEST_BEGIN("the field table describes every member of moe_model_config once");
    memset(used, 0, sizeof used);
    for (i = 0; i < n; i++) {
        for (j = 0; j < (int)f[i].size && f[i].offset + f[i].size <= sizeof used; j++) {
            if (used[f[i].offset + j]) tiles = 0;
            used[f[i].offset + j] = 1;
        }
        covered += f[i].size;
        if (f[i].offset + f[i].size > end) end = f[i].offset + f[i].size;
        for (j = 0; j < i; j++)
            if (strcmp(f[i].name, f[j].name) == 0) distinct = 0;
    }
    CHECK(tiles && end <= sizeof(moe_model_config), "fields overlap or run past the struct");
    CHECK(distinct, "every field name once");
    /* the members are all 4 bytes today, so no padding: every byte belongs to a field. A new
       member without a line in the table leaves bytes uncovered */
    for (i = 0; i < (int)sizeof used; i++)
        if (!used[i]) break;
    CHECK(covered == sizeof(moe_model_config), "fields cover %zu of moe_model_config's %zu bytes (first uncovered byte %d): add the new member's line to moe__model_fields",
          covered, sizeof(moe_model_config), i);
    {
        int types = 0;
        for (i = 0; i < n; i++) {
            types += strcmp(f[i].name, "rope_theta") == 0 && f[i].type == MOE_FIELD_FLOAT;
            types += strcmp(f[i].name, "moe.capacity_factor") == 0 && f[i].type == MOE_FIELD_FLOAT;
            types += strcmp(f[i].name, "n_layers") == 0 && f[i].type == MOE_FIELD_INT;
            types += strcmp(f[i].name, "moe.router") == 0 && f[i].type == MOE_FIELD_INT && f[i].size == sizeof(moe_router_kind);
        }
        CHECK(types == 4, "names and types of a float, an int and an enum field");
    }
    CHECK(moe__model_raw_layout() == MOE__MODEL_RAW_LAYOUT_V0 || covered != 196,
          "the layout checksum of raw configs is the one of the 196-byte moe_model_config they were written with");
}

static void test_record(void) {
    io_user a = io_user_value(3), b, keep;
    unsigned char buf[512], bad[512];
    size_t len = 0, used = 0, cut;
    moe_err err;
    int refused = 1, kept = 1;
    TEST_BEGIN("records: round trip, missing fields keep defaults, unknown/duplicate/mistyped/oversized/truncated refused");
    CHECK(moe_record_write(NULL, 0, &len, &a, NULL, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK && len > 0 && len < sizeof buf, "size query: %zu", len);
    CHECK(moe_record_write(buf, sizeof buf, &len, &a, NULL, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK, "write: %s", err.msg);
    CHECK(moe_record_write(buf, len - 1, &used, &a, NULL, io_user_fields, IO_USER_FIELDS, &err) == MOE_ERR_INVALID_ARG && err.msg[0], "short buffer: %s", err.msg);
    memset(&b, 0, sizeof b);
    CHECK(moe_record_read(&b, &used, buf, len, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK && used == len, "read: %s", err.msg);
    CHECK(io_user_equal(&a, &b), "text, double, uint64 above 2^63, 1-byte and enum members round trip");
    /* missing: a record of the first two fields leaves the others as the caller set them */
    {
        io_user d = io_user_value(9);
        CHECK(moe_record_write(buf, sizeof buf, &len, &a, NULL, io_user_fields, 2, &err) == MOE_OK, "partial write");
        CHECK(moe_record_read(&d, NULL, buf, len, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK, "partial read: %s", err.msg);
        CHECK(d.batch == a.batch && d.tokens == a.tokens && d.rng_state == io_user_value(9).rng_state && strcmp(d.genres, io_user_value(9).genres) == 0,
              "fields the record lacks keep their values");
    }
    /* unknown names: ignored when flagged default, else refused; obj unchanged on refusal */
    {
        moe_field more[IO_USER_FIELDS + 1];
        io_user dflt = a;
        memcpy(more, io_user_fields, sizeof io_user_fields);
        more[IO_USER_FIELDS] = more[0];
        more[IO_USER_FIELDS].name = "batch_v2"; /* a newer writer's field */
        CHECK(moe_record_write(buf, sizeof buf, &len, &a, &dflt, more, IO_USER_FIELDS + 1, &err) == MOE_OK, "write with a new field at its default");
        memset(&b, 0, sizeof b);
        CHECK(moe_record_read(&b, NULL, buf, len, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK && io_user_equal(&a, &b),
              "an unknown field at its default is ignored: %s", err.msg);
        dflt.batch = 0;
        CHECK(moe_record_write(buf, sizeof buf, &len, &a, &dflt, more, IO_USER_FIELDS + 1, &err) == MOE_OK, "write with a new field set");
        keep = b;
        CHECK(moe_record_read(&b, NULL, buf, len, io_user_fields, IO_USER_FIELDS, &err) == MOE_ERR_FORMAT && strstr(err.msg, "'batch_v2'") &&
              strstr(err.msg, "newer"), "an unknown field off its default: %s", err.msg);
        CHECK(memcmp(&keep, &b, sizeof b) == 0, "a refused record leaves the struct as it was");
        /* the same name twice */
        more[IO_USER_FIELDS].name = "batch";
        CHECK(moe_record_write(buf, sizeof buf, &len, &a, NULL, more, IO_USER_FIELDS + 1, &err) == MOE_OK, "write a duplicate");
        CHECK(moe_record_read(&b, NULL, buf, len, io_user_fields, IO_USER_FIELDS, &err) == MOE_ERR_FORMAT && strstr(err.msg, "twice"), "duplicate: %s", err.msg);
    }
    /* types and sizes: a double where the reader has an int; an int that does not fit */
    {
        moe_field other[1];
        double x = 2.5;
        long long big = 1LL << 40;
        int small = 0;
        other[0].name = "v"; other[0].type = MOE_FIELD_FLOAT; other[0].offset = 0; other[0].size = sizeof x;
        CHECK(moe_record_write(buf, sizeof buf, &len, &x, NULL, other, 1, &err) == MOE_OK, "write a double");
        other[0].type = MOE_FIELD_INT; other[0].size = sizeof small;
        CHECK(moe_record_read(&small, NULL, buf, len, other, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "type"), "type mismatch: %s", err.msg);
        other[0].size = sizeof big;
        CHECK(moe_record_write(buf, sizeof buf, &len, &big, NULL, other, 1, &err) == MOE_OK, "write 2^40");
        other[0].size = sizeof small;
        CHECK(moe_record_read(&small, NULL, buf, len, other, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "fit"), "2^40 into an int: %s", err.msg);
        big = -5;
        other[0].size = sizeof big;
        CHECK(moe_record_write(buf, sizeof buf, &len, &big, NULL, other, 1, &err) == MOE_OK, "write -5 from 8 bytes");
        other[0].size = sizeof small;
        CHECK(moe_record_read(&small, NULL, buf, len, other, 1, &err) == MOE_OK && small == -5, "-5 into a 4-byte member: %d", small);
        other[0].size = 3;
        CHECK(moe_record_read(&small, NULL, buf, len, other, 1, &err) == MOE_ERR_INVALID_ARG, "a 3-byte integer member is a bad table: %s", err.msg);
    }
    /* text longer than the reader's array */
    {
        moe_field t[1];
        char longer[24] = "twelve chars", shorter[8];
        t[0].name = "s"; t[0].type = MOE_FIELD_TEXT; t[0].offset = 0; t[0].size = sizeof longer;
        CHECK(moe_record_write(buf, sizeof buf, &len, longer, NULL, t, 1, &err) == MOE_OK, "write text");
        t[0].size = sizeof shorter;
        CHECK(moe_record_read(shorter, NULL, buf, len, t, 1, &err) == MOE_ERR_FORMAT && strstr(err.msg, "text"), "text too long: %s", err.msg);
    }
    /* every truncation of a record is refused with a sentence and changes nothing */
    CHECK(moe_record_write(buf, sizeof buf, &len, &a, NULL, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK, "write");
    for (cut = 0; cut < len; cut++) {
        memcpy(bad, buf, cut);
        b = io_user_value(1);
        keep = b;
        err.msg[0] = 0;
        if (moe_record_read(&b, NULL, bad, cut, io_user_fields, IO_USER_FIELDS, &err) != MOE_ERR_FORMAT || !err.msg[0]) refused = 0;
        if (memcmp(&keep, &b, sizeof b) != 0) kept = 0;
    }
    CHECK(refused && kept, "all %zu truncations refused, struct untouched", len);
}

/* moe_model_declare must imply exactly the table moe_model_init builds, allocating nothing */
static void test_declare(void) {
    int k, ok = 1;
    TEST_BEGIN("moe_model_declare: the same table as moe_model_init, no buffers, bounded");
    for (k = 0; k < IO_CONFIGS; k++) {
        moe_model a, p;
        moe_model_config c = io_config(k);
        if (moe_model_init(&a, &c, IO_B, IO_T) != MOE_OK) { CHECK(0, "init %d: %s", k, a.err.msg); continue; }
        io_alloc_largest = 0;
        if (moe_model_declare(&p, &c, 0) != MOE_OK) { CHECK(0, "declare %d: %s", k, p.err.msg); moe_model_free(&a); continue; }
        if (p.S.numel != a.S.numel || moe_store_fingerprint(&p.S) != moe_store_fingerprint(&a.S) || p.S.params || p.blocks) ok = 0;
        if (io_alloc_largest > 128 * sizeof(moe_tensor)) ok = 0;
        moe_model_free(&p);
        CHECK(moe_model_declare(&p, &c, a.S.numel - 1) == MOE_ERR_INVALID_ARG && strstr(p.err.msg, "parameters"), "budget one short: %s", p.err.msg);
        moe_model_free(&p);
        moe_model_free(&a);
    }
    CHECK(ok, "numel and fingerprint agree for all %d configs, no parameter buffers", IO_CONFIGS);
    {
        moe_model p;
        moe_model_config c = io_config(0);
        c.n_layers = 1 << 30; /* a billion tiny layers: refused once past the budget */
        io_alloc_largest = 0;
        CHECK(moe_model_declare(&p, &c, 100000) == MOE_ERR_INVALID_ARG, "a billion layers past a budget of 1e5: %s", p.err.msg);
        CHECK(io_alloc_largest < ((size_t)1 << 24), "largest allocation %zu bytes", io_alloc_largest);
        moe_model_free(&p);
    }
}

static void test_round_trip(void) {
    int k;
    TEST_BEGIN("model files: every config round trips, bit-identical logits, moments, step, user blob");
    for (k = 0; k < IO_CONFIGS; k++) {
        moe_model a, b;
        moe_model_config c;
        moe_ckpt_info info;
        moe_err err;
        char path[300];
        unsigned char user[5] = {'h', 'e', 'l', 'l', 'o'}, user_back[5] = {0, 0, 0, 0, 0};
        long long step = -1;
        size_t nl;
        float *la, *lb;
        if (!io_build(&a, k)) continue;
        nl = (size_t)IO_B * IO_T * a.cfg.vocab;
        la = (float *)malloc(nl * sizeof(float));
        lb = (float *)malloc(nl * sizeof(float));
        snprintf(path, sizeof path, "%s/rt%d.moe", tmpdir, k);
        CHECK(moe_model_save(&a, path, 1, 4000 + k, user, sizeof user, &err) == MOE_OK, "config %d: save: %s", k, err.msg);
        CHECK(moe_model_load_config(path, &c, &info, &err) == MOE_OK && memcmp(&c, &a.cfg, sizeof c) == 0 && info.step == 4000 + k &&
              info.has_moments && info.state_bytes == sizeof user, "config %d: the config alone: %s", k, err.msg);
        CHECK(moe_model_load(&b, path, IO_B, IO_T, &step, user_back, sizeof user_back, &err) == MOE_OK, "config %d: load: %s", k, err.msg);
        if (b.S.params) {
            CHECK(memcmp(&a.cfg, &b.cfg, sizeof a.cfg) == 0, "config %d: config identical", k);
            CHECK(b.S.numel == a.S.numel && memcmp(a.S.params, b.S.params, a.S.numel * sizeof(float)) == 0 &&
                  memcmp(a.S.adam_m, b.S.adam_m, a.S.numel * sizeof(float)) == 0 && memcmp(a.S.adam_v, b.S.adam_v, a.S.numel * sizeof(float)) == 0,
                  "config %d: parameters and moments bit-identical", k);
            CHECK(step == 4000 + k && memcmp(user, user_back, sizeof user) == 0, "config %d: step %lld and user blob", k, step);
            if (io_logits(&a, la) && io_logits(&b, lb))
                CHECK(memcmp(la, lb, nl * sizeof(float)) == 0, "config %d: logits bit-identical after load", k);
        }
        moe_model_free(&b);
        /* without moments; max_B, max_T = 0: one sequence of max_seq */
        CHECK(moe_model_save(&a, path, 0, 7, NULL, 0, &err) == MOE_OK, "save without moments: %s", err.msg);
        CHECK(moe_model_load(&b, path, 0, 0, NULL, NULL, 0, &err) == MOE_OK && b.max_B == 1 && b.max_T == a.cfg.max_seq &&
              b.S.adam_m[0] == 0.0f && memcmp(a.S.params, b.S.params, a.S.numel * sizeof(float)) == 0, "config %d: no moments, default batch: %s", k, err.msg);
        moe_model_free(&b);
        remove(path);
        free(la);
        free(lb);
        moe_model_free(&a);
    }
}

/* Each bad file: a status, a sentence with `word`, the file on disk unchanged, m freed. */
static void expect_refused(const char *what, const char *path, const char *word, moe_status want) {
    moe_model m;
    moe_model_config c;
    moe_err err;
    size_t n;
    unsigned char *before = file_read(path, &n);
    moe_status st;
    err.msg[0] = 0;
    io_alloc_largest = 0;
    st = moe_model_load(&m, path, IO_B, IO_T, NULL, NULL, 0, &err);
    if (test_verbose) printf("   %s: %s\n", what, err.msg);
    CHECK(st == want && (want == MOE_OK || (err.msg[0] && strstr(err.msg, word))), "%s: status %d (want %d): %s", what, (int)st, (int)want, err.msg);
    if (want != MOE_OK) {
        CHECK(!m.S.params && !m.blocks && m.err.status == st, "%s: the model is left freed, its err set", what);
        size_t largest = io_alloc_largest, bound = n + 4096;
        if (strstr(word, "NaN") || strstr(word, " inf ")) {
            /* a file sound up to its values builds the model before they are read: its one
               planned kernel workspace may exceed the file of a tiny model */
            moe_model r;
            moe_err e2;
            memset(&r, 0, sizeof r);
            if (moe_model_load_config(path, &c, NULL, &e2) == MOE_OK && moe_model_init(&r, &c, IO_B, IO_T) == MOE_OK)
                bound += r.work.floats * sizeof(float);
            moe_model_free(&r);
        }
        CHECK(largest <= bound, "%s: largest allocation %zu bytes for a %zu-byte file (bound %zu)", what, largest, n, bound);
        CHECK(moe_model_load_config(path, &c, NULL, &err) != MOE_OK || strstr(word, "NaN") || strstr(word, " inf "), "%s: the config alone is refused too", what);
    }
    CHECK(before && same_file(path, before, n), "%s: the file is unchanged", what);
    moe_model_free(&m);
    free(before);
}

static void test_refused(void) {
    moe_model a;
    moe_err err;
    char path[300], bad[300];
    unsigned char *b, *w;
    size_t n, at;
    moe_ckpt_info info;
    TEST_BEGIN("model files: truncated, corrupted, wrong versions, unknown fields, absurd sizes, NaN refused");
    if (!io_build(&a, 1)) return;
    snprintf(path, sizeof path, "%s/good.moe", tmpdir);
    snprintf(bad, sizeof bad, "%s/bad.moe", tmpdir);
    CHECK(moe_model_save(&a, path, 1, 3, NULL, 0, &err) == MOE_OK, "save: %s", err.msg);
    CHECK(moe_checkpoint_info(path, &info, &err) == MOE_OK, "info");
    b = file_read(path, &n);
    w = (unsigned char *)malloc(n);
    if (!b || !w) return;

    file_write(bad, b, n - 13);
    expect_refused("truncated", bad, "truncated", MOE_ERR_FORMAT);
    memcpy(w, b, n);
    w[n / 2] ^= 0x10;
    file_write(bad, w, n);
    expect_refused("one bit flipped", bad, "CRC", MOE_ERR_FORMAT);
    memcpy(w, b, n);
    le_put(w + 8, 9, 4);
    file_write_crc(bad, w, n);
    expect_refused("checkpoint version 9", bad, "version 9", MOE_ERR_FORMAT);
    memcpy(w, b, n);
    le_put(w + 56 + 8, 2, 4);
    file_write_crc(bad, w, n);
    expect_refused("model record version 2", bad, "record of version 2", MOE_ERR_FORMAT);

    /* unknown fields: "n_layers" (3, not the default 4) renamed is refused; "vocab" renamed... */
    memcpy(w, b, n);
    at = record_entry(w, n, "n_layers");
    CHECK(at > 0 && w[at + 1] == 0, "n_layers is in the record, not flagged default");
    if (at) w[at - 1] = 'Z';
    file_write_crc(bad, w, n);
    expect_refused("unknown field off its default", bad, "'n_layerZ'", MOE_ERR_FORMAT);
    /* ... while a newer writer's field at its default is ignored: moe.gw_slots (0) renamed
       loads, and the missing moe.gw_slots takes its default, the same 0 */
    memcpy(w, b, n);
    at = record_entry(w, n, "moe.gw_slots");
    CHECK(at > 0 && w[at + 1] == 1, "moe.gw_slots is flagged default");
    if (at) w[at - 1] = 'Z';
    file_write_crc(bad, w, n);
    expect_refused("unknown field at its default", bad, "", MOE_OK);
    /* a config field of the wrong type */
    memcpy(w, b, n);
    at = record_entry(w, n, "d");
    if (at) w[at] = 'f';
    file_write_crc(bad, w, n);
    expect_refused("integer field stored as float", bad, "type", MOE_ERR_FORMAT);

    /* absurd sizes in a small file: the config's d and n_layers patched to giants that pass
       moe_model_config_validate; refused before anything that large is allocated */
    memcpy(w, b, n);
    at = record_entry(w, n, "d");
    if (at) le_put(w + at + 2, 1u << 15, 8);
    at = record_entry(w, n, "n_layers");
    if (at) le_put(w + at + 2, 1u << 12, 8);
    file_write_crc(bad, w, n);
    expect_refused("d = 32768, 4096 layers in a small file", bad, "does not fit", MOE_ERR_FORMAT);
    memcpy(w, b, n);
    at = record_entry(w, n, "n_layers");
    if (at) le_put(w + at + 2, 2000000000u, 8);
    file_write_crc(bad, w, n);
    expect_refused("two billion layers in a small file", bad, "does not fit", MOE_ERR_FORMAT);
    memcpy(w, b, n);
    at = record_entry(w, n, "moe.d_ff_shared");
    if (at) le_put(w + at + 2, 9, 8); /* same count would need luck; the table names the tensor */
    file_write_crc(bad, w, n);
    expect_refused("a config implying another shape", bad, "shared.w_gate", MOE_ERR_FORMAT);
    /* the checkpoint header claims 2^39 parameters */
    memcpy(w, b, n);
    le_put(w + 24, (uint64_t)1 << 39, 8);
    file_write_crc(bad, w, n);
    expect_refused("header claims 2^39 parameters", bad, "bytes but its header describes", MOE_ERR_FORMAT);

    /* non-finite values: a NaN parameter and an infinite second moment, patched in */
    {
        int id = moe_store_find(&a.S, "l2.moe.experts.w_up");
        size_t params = 56 + (size_t)info.config_bytes + (size_t)info.state_bytes;
        float nan_value = NAN, inf_value = INFINITY;
        memcpy(w, b, n);
        memcpy(w + params + 4 * (a.S.tensors[id].offset + 5), &nan_value, 4);
        file_write_crc(bad, w, n);
        expect_refused("a NaN parameter", bad, "the parameter NaN in 'l2.moe.experts.w_up' (element 5)", MOE_ERR_FORMAT);
        memcpy(w, b, n);
        memcpy(w + params + 4 * (2 * a.S.numel + a.S.tensors[0].offset), &inf_value, 4);
        file_write_crc(bad, w, n);
        expect_refused("an infinite moment", bad, "the second Adam moment inf in 'wte'", MOE_ERR_FORMAT);
        /* saving a NaN model is refused and leaves the good file as it was */
        a.S.params[a.S.tensors[id].offset + 2] = NAN;
        CHECK(moe_model_save(&a, path, 1, 4, NULL, 0, &err) == MOE_ERR_INVALID_ARG && strstr(err.msg, "'l2.moe.experts.w_up'") &&
              strstr(err.msg, "unchanged"), "NaN model not saved: %s", err.msg);
        CHECK(same_file(path, b, n), "the good file is unchanged");
        a.S.params[a.S.tensors[id].offset + 2] = 0.0f;
    }
    /* a save that fails (its directory is a file) leaves the existing file as it was */
    {
        char inner[400];
        snprintf(inner, sizeof inner, "%s/inner.moe", path);
        CHECK(moe_model_save(&a, inner, 1, 4, NULL, 0, &err) == MOE_ERR_IO && err.msg[0], "unwritable path: %s", err.msg);
        CHECK(same_file(path, b, n), "the existing file is unchanged");
    }
    /* a user blob of another size */
    {
        moe_model m;
        char user[8];
        CHECK(moe_model_load(&m, path, IO_B, IO_T, NULL, user, sizeof user, &err) == MOE_ERR_FORMAT && strstr(err.msg, "user blob"), "user blob size: %s", err.msg);
        moe_model_free(&m);
    }
    {
        moe_model m;
        CHECK(moe_model_load(&m, "no/such/file.moe", 1, 1, NULL, NULL, 0, &err) == MOE_ERR_IO && err.msg[0], "missing file: %s", err.msg);
    }
    remove(bad);
    remove(path);
    free(b);
    free(w);
    moe_model_free(&a);
}

/* Files written before model files existed: train_lm saved the raw moe_model_config as the
   checkpoint's config blob and its own struct as the state blob. */
static void test_earlier_files(void) {
    typedef struct old_state { /* train_lm's train_state, in miniature */
        int batch, seq;
        moe_rng noise;
        double tokens;
    } old_state;
    moe_model a, b;
    moe_model_config c;
    moe_ckpt_info info;
    moe_err err;
    old_state st, back;
    char path[300];
    long long step = 0;
    float *la, *lb;
    size_t nl;
    TEST_BEGIN("earlier files: train_lm's raw-config checkpoints load, other checkpoints get a sentence");
    if (!io_build(&a, 2)) return;
    snprintf(path, sizeof path, "%s/old.ckpt", tmpdir);
    memset(&st, 0, sizeof st);
    st.batch = 8; st.seq = 64; st.tokens = 12345.0;
    moe_rng_seed(&st.noise, 5);
    /* exactly the call examples/train_lm.c makes */
    CHECK(moe_checkpoint_save(path, &a.S, 1, 77, &a.cfg, sizeof a.cfg, &st, sizeof st, &err) == MOE_OK, "old-style save: %s", err.msg);
    if (moe__model_raw_layout() == MOE__MODEL_RAW_LAYOUT_V0) {
        nl = (size_t)IO_B * IO_T * a.cfg.vocab;
        la = (float *)malloc(nl * sizeof(float));
        lb = (float *)malloc(nl * sizeof(float));
        CHECK(moe_model_load_config(path, &c, &info, &err) == MOE_OK && memcmp(&c, &a.cfg, sizeof c) == 0 && info.state_bytes == sizeof st,
              "the raw config read: %s", err.msg);
        CHECK(moe_model_load(&b, path, IO_B, IO_T, &step, &back, sizeof back, &err) == MOE_OK, "old file loads: %s", err.msg);
        if (b.S.params) {
            CHECK(step == 77 && memcmp(&st, &back, sizeof st) == 0 && memcmp(a.S.adam_v, b.S.adam_v, a.S.numel * 4) == 0, "step, state blob, moments");
            if (io_logits(&a, la) && io_logits(&b, lb)) CHECK(memcmp(la, lb, nl * sizeof(float)) == 0, "logits bit-identical");
        }
        moe_model_free(&b);
        free(la);
        free(lb);
        /* a raw config that does not fit the parameters after it (the crafted kind) */
        c = a.cfg;
        c.d_ff = 1 << 20;
        CHECK(moe_checkpoint_save(path, &a.S, 0, 1, &c, sizeof c, NULL, 0, &err) == MOE_OK, "save");
        expect_refused("raw config implying 2^20-wide FFNs", path, "does not fit", MOE_ERR_FORMAT);
    } else { /* moe_model_config has changed since raw configs were written */
        expect_refused("raw config of an older layout", path, "older layout", MOE_ERR_FORMAT);
    }
    /* a checkpoint of something else: no config, or another object's config blob */
    CHECK(moe_checkpoint_save(path, &a.S, 0, 1, NULL, 0, NULL, 0, &err) == MOE_OK, "plain checkpoint");
    expect_refused("plain checkpoint", path, "not a model file", MOE_ERR_FORMAT);
    {
        unsigned char blob[sizeof(moe_model_config) + 4];
        memset(blob, 7, sizeof blob);
        CHECK(moe_checkpoint_save(path, &a.S, 0, 1, blob, sizeof blob, NULL, 0, &err) == MOE_OK, "other blob");
        expect_refused("another object's config blob", path, "moe_checkpoint_load", MOE_ERR_FORMAT);
    }
    remove(path);
    moe_model_free(&a);
}

/* ---- across builds: --write DIR / --read DIR ---- */

static void cross_write(const char *dir) {
    int k;
    for (k = 0; k < IO_CONFIGS; k++) {
        moe_model m;
        io_user u = io_user_value(k);
        unsigned char rec[512];
        size_t len;
        char path[600];
        moe_err err;
        if (!io_build(&m, k)) continue;
        snprintf(path, sizeof path, "%s/cross%d.moe", dir, k);
        CHECK(moe_record_write(rec, sizeof rec, &len, &u, NULL, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK, "user record: %s", err.msg);
        CHECK(moe_model_save(&m, path, 1, 9000 + k, rec, len, &err) == MOE_OK, "write %s: %s", path, err.msg);
        moe_model_free(&m);
    }
}

static void cross_read(const char *dir) {
    int k;
    for (k = 0; k < IO_CONFIGS; k++) {
        moe_model want, got;
        moe_ckpt_info info;
        moe_model_config c;
        io_user u, expect = io_user_value(k);
        unsigned char rec[512];
        char path[600];
        moe_err err;
        long long step = 0;
        size_t nl;
        float *lw, *lg;
        if (!io_build(&want, k)) continue;
        snprintf(path, sizeof path, "%s/cross%d.moe", dir, k);
        if (moe_model_load_config(path, &c, &info, &err) != MOE_OK || info.state_bytes > sizeof rec) {
            CHECK(0, "read %s: %s", path, err.msg);
            moe_model_free(&want);
            continue;
        }
        CHECK(moe_model_load(&got, path, IO_B, IO_T, &step, rec, (size_t)info.state_bytes, &err) == MOE_OK, "load %s: %s", path, err.msg);
        if (got.S.params) {
            memset(&u, 0, sizeof u);
            CHECK(moe_record_read(&u, NULL, rec, (size_t)info.state_bytes, io_user_fields, IO_USER_FIELDS, &err) == MOE_OK &&
                  io_user_equal(&u, &expect) && step == 9000 + k, "config %d: user record and step: %s", k, err.msg);
            CHECK(memcmp(&got.cfg, &want.cfg, sizeof got.cfg) == 0, "config %d: the config", k);
            CHECK(got.S.numel == want.S.numel && memcmp(got.S.params, want.S.params, want.S.numel * 4) == 0 &&
                  memcmp(got.S.adam_m, want.S.adam_m, want.S.numel * 4) == 0 && memcmp(got.S.adam_v, want.S.adam_v, want.S.numel * 4) == 0,
                  "config %d: parameters and moments bit-identical", k);
            nl = (size_t)IO_B * IO_T * want.cfg.vocab;
            lw = (float *)malloc(nl * sizeof(float));
            lg = (float *)malloc(nl * sizeof(float));
            if (io_logits(&want, lw) && io_logits(&got, lg)) CHECK(memcmp(lw, lg, nl * sizeof(float)) == 0, "config %d: logits bit-identical", k);
            free(lw);
            free(lg);
        }
        moe_model_free(&got);
        moe_model_free(&want);
    }
}

int main(int argc, char **argv) {
#ifdef __cplusplus
    const char *build = "C++";
#else
    const char *build = "C";
#endif
    if (argc == 3 && strcmp(argv[1], "--write") == 0) {
        printf("-- model files written by the %s build\n", build);
        cross_write(argv[2]);
        return test_summary();
    }
    if (argc == 3 && strcmp(argv[1], "--read") == 0) {
        printf("-- model files read by the %s build\n", build);
        cross_read(argv[2]);
        return test_summary();
    }
    make_tmpdir();
    test_fields_cover_struct();
    test_record();
    test_declare();
    test_round_trip();
    test_refused();
    test_earlier_files();
    TEST_BEGIN("--write then --read in one build");
    cross_write(tmpdir);
    cross_read(tmpdir);
    if (proc_rmtree(tmpdir) != 0) printf("cannot remove %s\n", tmpdir);
    return test_summary();
}
