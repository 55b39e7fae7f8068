/* test_layer_memory.c - the MoE layer's memory is planned at init: for every router family, an
   allocator that fails at the n-th call, for every n, makes moe_layer_init return
   MOE_ERR_NOMEM with a sentence, hold nothing (every allocation freed: counted here, and ASan
   sees leaks) and stay freeable; a working init then allocates nothing in the router's
   forward and backward (the calls counted here come from the GEMM and expert kernels alone).
   The test has its own allocator, so it holds the implementation itself. */
#include <stddef.h>
static size_t test_alloc_calls;  /* MOE_MALLOC calls since the counter was reset         */
static long test_alloc_live;     /* allocations not yet freed                           */
static long test_alloc_fail_at;  /* the call (0-based) that returns NULL; -1 = none     */
#define TEST_MAX_SITES 256
static int test_site_line[TEST_MAX_SITES]; /* moe.h lines of the calls while recording      */
static int test_sites, test_recording;
static void *test_malloc(size_t n, int line);
static void test_free(void *p);
#define MOE_MALLOC(n) test_malloc(n, __LINE__)
#define MOE_FREE(p) test_free(p)
#define MOE_IMPLEMENTATION
#include "moe.h"
#include "test.h" /* defines: CHECK, test_summary */

static void *test_malloc(size_t n, int line) {
    void *p;
    if (test_recording && test_sites < TEST_MAX_SITES) test_site_line[test_sites++] = line;
    if ((long)test_alloc_calls++ == test_alloc_fail_at) return NULL;
    p = malloc(n);
    if (p) test_alloc_live++;
    return p;
}

static void test_free(void *p) {
    if (!p) return;
    test_alloc_live--;
    free(p);
}

static moe_layer_config family(int which) {
    moe_layer_config c = moe_layer_config_default();
    c.d = 12; c.d_ff = 16; c.n_experts = 6; c.top_k = 2; c.z_coef = 1e-2f;
    switch (which) {
    case 0: break;                                                   /* softmax top-k (Mixtral) */
    case 1: c.router = MOE_ROUTER_SIGMOID; c.capacity_factor = 1.0f; c.n_shared = 2; break;
    case 2: c.router = MOE_ROUTER_NOISY_TOPK; break;
    case 3: c.router = MOE_ROUTER_EXPERT_CHOICE; break;
    case 4: c.router = MOE_ROUTER_AOE; c.aoe_rank = 4; break;
    case 5: c.gw_threshold = 0.5f; c.gw_normalized = 1; break;     /* GW-MoE */
    case 6: c.hyper = 1; c.hyper_embed = c.hyper_hidden = c.hyper_cond = c.hyper_width = 5; c.hyper_adapter = 3; break;
    default: c.router_dim = 7; break;                                /* a router input */
    }
    return c;
}

static const char *family_name[8] = {"softmax top-k", "sigmoid top-k + capacity + shared", "noisy top-k", "expert choice",
                                     "AoE", "GW-MoE", "HyperMoE", "router input"};

static void test_init_failures(void) {
    int which;
    TEST_BEGIN("layer init: out of memory at every allocation is a status, leaks nothing, leaves the layer freeable");
    for (which = 0; which < 8; which++) {
        moe_layer_config c = family(which);
        size_t total, n;
        int all_ok = 1, all_sentences = 1, all_clean = 1;
        moe_store S;
        moe_layer L;
        /* how many allocations a working init makes */
        test_alloc_fail_at = -1;
        moe_store_init(&S);
        test_alloc_calls = 0;
        test_alloc_live = 0;
        CHECK(moe_layer_init(&L, &c, &S, "moe.", 10) == MOE_OK, "%s: init works: %s", family_name[which], L.err.msg);
        total = test_alloc_calls;
        moe_layer_free(&L);
        moe_store_free(&S);
        CHECK(test_alloc_live == 0, "%s: free releases all %zu allocations (%ld left)", family_name[which], total, test_alloc_live);
        for (n = 0; n < total; n++) {
            moe_status st;
            moe_store_init(&S);
            test_alloc_live = 0;
            test_alloc_calls = 0;
            test_alloc_fail_at = (long)n;
            st = moe_layer_init(&L, &c, &S, "moe.", 10);
            if (st == MOE_OK) { /* the store's table grew before the failing call: not ours */
                moe_layer_free(&L);
                moe_store_free(&S);
                continue;
            }
            if (st != MOE_ERR_NOMEM && st != S.err.status) all_ok = 0;
            if (L.err.msg[0] == '\0' || (st == MOE_ERR_NOMEM && !strstr(L.err.msg, "memory"))) all_sentences = 0;
            moe_layer_free(&L); /* freeable after a failure, and a second time */
            moe_layer_free(&L);
            moe_store_free(&S);
            if (test_alloc_live != 0) all_clean = 0;
        }
        test_alloc_fail_at = -1;
        CHECK(all_ok, "%s: every failure of the %zu allocations returns MOE_ERR_NOMEM", family_name[which], total);
        CHECK(all_sentences, "%s: every failure leaves a sentence naming memory", family_name[which]);
        CHECK(all_clean, "%s: nothing stays allocated after a failed init and moe_layer_free", family_name[which]);
    }
}

/* Forward + backward of every family after a working init. MOE_MALLOC records the moe.h line
   of each call; the line's section (the last ">>moe:" anchor above it) says who allocated.
   The GEMM and the experts pack their operands per call (their workspaces are planned in their
   own sections); everything else - the router, its families, the layer, dispatch, the
   allocator helper they would call - must allocate nothing. */

static char test_section_of_line[200000][24]; /* moe.h line -> its section ("" before the first anchor) */
static int test_lines;

static int read_sections(void) {
    FILE *f = fopen("moe.h", "r");
    char buf[4096], cur[24] = "";
    if (!f) return 0;
    test_lines = 0;
    while (fgets(buf, sizeof buf, f) && test_lines < 200000) {
        const char *a = strstr(buf, ">>moe:");
        test_lines++;
        if (a && strncmp(buf, "   >>moe:", 9) == 0) {
            int k = 0;
            a += 6;
            while (k < 23 && (a[k] == '_' || (a[k] >= 'a' && a[k] <= 'z'))) { cur[k] = a[k]; k++; }
            cur[k] = '\0';
        }
        strcpy(test_section_of_line[test_lines], cur);
    }
    fclose(f);
    return test_lines > 0;
}

static size_t count_step(moe_layer *L, moe_store *S, const float *x, const float *dy, float *y, float *dx, int T,
                         const moe_layer_args *a, int *foreign) {
    size_t before = test_alloc_calls;
    int k;
    test_sites = 0;
    test_recording = 1;
    CHECK(moe_layer_forward(L, S, y, x, T, a) == MOE_OK, "forward: %s", L->err.msg);
    CHECK(moe_layer_backward(L, S, dx, dy, x, a) == MOE_OK, "backward: %s", L->err.msg);
    test_recording = 0;
    *foreign = 0;
    for (k = 0; k < test_sites && k < TEST_MAX_SITES; k++) {
        const char *sec = test_site_line[k] > 0 && test_site_line[k] <= test_lines ? test_section_of_line[test_site_line[k]] : "?";
        if (strcmp(sec, "matmul") != 0 && strcmp(sec, "experts") != 0) {
            if (*foreign == 0) printf("   an allocation at moe.h:%d (section %s)\n", test_site_line[k], sec);
            (*foreign)++;
        }
    }
    return test_alloc_calls - before;
}

static void test_no_allocation_in_router(void) {
    int which;
    TEST_BEGIN("layer forward/backward: nothing allocates but the GEMM and expert kernels (sort buffers, capacity counts, aux scratch planned at init)");
    if (!CHECK(read_sections(), "moe.h is readable from the working directory (run from the repository root)")) return;
    for (which = 0; which < 8; which++) {
        moe_layer_config c = family(which);
        moe_store S;
        moe_layer L;
        moe_rng r;
        moe_layer_args a = moe_layer_args_default();
        float x[10 * 12], dy[10 * 12], y[10 * 12], dx[10 * 12], noise[10 * 6], rin[10 * 7], drin[10 * 7];
        size_t calls, i;
        int foreign;
        moe_store_init(&S);
        test_alloc_fail_at = -1;
        if (!CHECK(moe_layer_init(&L, &c, &S, "moe.", 10) == MOE_OK && moe_store_alloc(&S, 0) == MOE_OK, "%s: init", family_name[which]))
            continue;
        moe_rng_seed(&r, 5);
        moe_layer_init_weights(&L, &S, &r);
        for (i = 0; i < 120; i++) { x[i] = moe_rng_normal(&r); dy[i] = moe_rng_normal(&r); dx[i] = 0.0f; }
        for (i = 0; i < 60; i++) noise[i] = moe_rng_normal(&r);
        for (i = 0; i < 70; i++) { rin[i] = moe_rng_normal(&r); drin[i] = 0.0f; }
        a.noise = noise;
        a.gw_active = 1;
        if (c.router_dim > 0) { a.router_input = rin; a.d_router_input = drin; }
        calls = count_step(&L, &S, x, dy, y, dx, 10, &a, &foreign);
        CHECK(foreign == 0, "%s: %d of the %zu allocations of a step come from outside the GEMM and expert kernels", family_name[which], foreign, calls);
        CHECK(calls > 0 || test_sites == 0, "%s: the allocator hook sees the kernels' calls", family_name[which]);
        moe_layer_free(&L);
        moe_store_free(&S);
        CHECK(test_alloc_live == 0, "%s: nothing left after free (%ld)", family_name[which], test_alloc_live);
    }
}

int main(void) {
    test_init_failures();
    test_no_allocation_in_router();
    return test_summary();
}
