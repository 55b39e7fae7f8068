/* test.h - the tiny test harness shared by every tests/test_*.c program.
 *
 * Each test program calls the CHECK macros, then returns test_summary(), which
 * prints the plain line "N passed, N failed" and returns non-zero on any
 * failure. tests/run.sh adds the lines of all programs into the suite total.
 *
 *   TEST_BEGIN("name")            prints the test's name
 *   CHECK(cond, fmt, ...)         one assertion; prints the sentence on failure
 *   check_close(name, got, ref, n, atol, rtol)
 *                                 |got-ref| <= atol + rtol*|ref| elementwise,
 *                                 prints the worst element and an NMSE summary
 *   check_grad(name, analytic, numeric, rtol)
 *                                 directional finite-difference agreement
 *   check_grad_tol(name, analytic, numeric, rtol, atol)   the same with an absolute floor
 *
 * This header's functions are static. The headers' implementation is compiled once
 * (tests/impl.c) and linked in; a test that needs the implementation's internals
 * (test_gemm.c: the GEMM block sizes) defines MOE_IMPLEMENTATION itself.
 */
#ifndef MOE_TEST_H
#define MOE_TEST_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <time.h>

#if defined(__GNUC__) || defined(__clang__)
#define TEST_FN static __attribute__((unused))
#else
#define TEST_FN static
#endif

static int test_passed_count = 0;
static int test_failed_count = 0;
static int test_verbose = 0;

TEST_FN void test_begin(const char *name) {
    if (getenv("TEST_VERBOSE")) test_verbose = 1;
    printf("-- %s\n", name);
    fflush(stdout);
}
#define TEST_BEGIN(name) test_begin(name)

TEST_FN int test_check(int ok, const char *file, int line, const char *fmt, ...) {
    if (ok) {
        test_passed_count++;
        return 1;
    }
    test_failed_count++;
    printf("FAIL %s:%d: ", file, line);
    {
        va_list ap;
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
    }
    printf("\n");
    fflush(stdout);
    return 0;
}
#define CHECK(cond, ...) test_check((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/* elementwise |got - ref| <= atol + rtol * |ref|; NaN anywhere fails */
TEST_FN int test_close(const char *file, int line, const char *name, const float *got,
                      const float *ref, size_t n, double atol, double rtol) {
    size_t i, worst = 0, bad = 0;
    double worst_excess = -1e300, se = 0.0, sr = 0.0;
    for (i = 0; i < n; i++) {
        double g = got[i], r = ref[i], d = fabs(g - r), lim = atol + rtol * fabs(r);
        if (!(d <= lim)) bad++; /* NaN-safe */
        if (d - lim > worst_excess || d != d) {
            worst_excess = (d != d) ? 1e300 : d - lim;
            worst = i;
        }
        se += (g - r) * (g - r);
        sr += r * r;
    }
    if (bad == 0) {
        test_passed_count++;
        if (test_verbose) printf("   ok %-28s n=%zu nmse=%.3g\n", name, n, sr > 0 ? se / sr : se);
        return 1;
    }
    test_failed_count++;
    printf("FAIL %s:%d: %s: %zu of %zu elements out of tolerance (atol %.2g rtol %.2g); "
           "worst [%zu] got %.9g ref %.9g; nmse %.3g\n",
           file, line, name, bad, n, atol, rtol, worst, (double)got[worst], (double)ref[worst],
           sr > 0 ? se / sr : se);
    fflush(stdout);
    return 0;
}
#define check_close(name, got, ref, n, atol, rtol) \
    test_close(__FILE__, __LINE__, name, got, ref, (size_t)(n), atol, rtol)

/* analytic <g, v> against the central difference (L(p+eps v) - L(p-eps v)) / 2eps */
TEST_FN int test_grad(const char *file, int line, const char *name, double analytic,
                     double numeric, double rtol, double atol) {
    double scale = fabs(analytic) > fabs(numeric) ? fabs(analytic) : fabs(numeric);
    double err = fabs(analytic - numeric);
    int ok = err <= rtol * scale + atol;
    if (ok) {
        test_passed_count++;
        if (test_verbose) printf("   ok %-28s analytic %.8g numeric %.8g\n", name, analytic, numeric);
        return 1;
    }
    test_failed_count++;
    printf("FAIL %s:%d: gradient %s: analytic %.8g numeric %.8g (rel err %.3g > %.3g)\n", file,
           line, name, analytic, numeric, scale > 0 ? err / scale : err, rtol);
    fflush(stdout);
    return 0;
}
#define check_grad(name, analytic, numeric, rtol) \
    test_grad(__FILE__, __LINE__, name, analytic, numeric, rtol, 1e-6)
/* the same with an absolute floor, for small derivatives of float computations */
#define check_grad_tol(name, analytic, numeric, rtol, atol) \
    test_grad(__FILE__, __LINE__, name, analytic, numeric, rtol, atol)

TEST_FN int test_summary(void) {
    printf("%d passed, %d failed\n", test_passed_count, test_failed_count);
    return test_failed_count == 0 ? 0 : 1;
}

/* path of the shared data folder: $MOE_SHARED_DATA or ../shared/data; NULL if absent */
TEST_FN const char *test_shared_data(void) {
    static char path[1024];
    const char *env = getenv("MOE_SHARED_DATA");
    FILE *f;
    char probe[1100];
    snprintf(path, sizeof path, "%s", env ? env : "../shared/data");
    snprintf(probe, sizeof probe, "%s/preferences/README.md", path);
    f = fopen(probe, "rb");
    if (!f) return NULL;
    fclose(f);
    return path;
}

#endif /* MOE_TEST_H */
