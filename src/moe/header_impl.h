#ifdef __cplusplus
}
#endif
#endif /* MOE_H_INCLUDED */

/* ############################################################################################
   IMPLEMENTATION
   ############################################################################################ */
#if defined(MOE_IMPLEMENTATION) && !defined(MOE_IMPLEMENTATION_INCLUDED)
#define MOE_IMPLEMENTATION_INCLUDED

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef MOE_ASSERT
#include <assert.h>
#define MOE_ASSERT(x) assert(x)
#endif

#if defined(MOE_MALLOC) && defined(MOE_FREE)
#elif !defined(MOE_MALLOC) && !defined(MOE_FREE)
#define MOE_MALLOC(n) malloc(n)
#define MOE_FREE(p) free(p)
#else
#error "moe.h: define both MOE_MALLOC and MOE_FREE, or neither"
#endif

#if defined(_OPENMP) && !defined(MOE_NO_OPENMP)
#include <omp.h>
#define MOE__OMP 1
#define MOE__PRAGMA(x) _Pragma(#x)
/* A parallel loop; each iteration owns its outputs (no reductions, no atomics). */
#define MOE_OMP_FOR MOE__PRAGMA(omp parallel for schedule(static))
/* The same, only when the loop has enough work to pay for waking the threads. */
#define MOE_OMP_FOR_IF(cond) MOE__PRAGMA(omp parallel for schedule(static) if (cond))
/* Uneven tasks (experts with different token counts): hand them out one at a time. */
#define MOE_OMP_FOR_DYNAMIC MOE__PRAGMA(omp parallel for schedule(dynamic, 1))
/* One parallel region whose phases share the threads (fewer fork/joins and barriers: under
   load each waits for the slowest thread); inside it, tasks handed out one at a time with a
   barrier at the end, or fixed spans with none (for loops whose outputs are disjoint). */
#define MOE__OMP_PARALLEL_IF(cond) MOE__PRAGMA(omp parallel if (cond))
#define MOE__OMP_FOR_INNER MOE__PRAGMA(omp for schedule(dynamic, 1))
#define MOE__OMP_FOR_NOWAIT MOE__PRAGMA(omp for schedule(static) nowait)
/* The same with at most n threads: loops that index per-thread regions of a workspace sized
   for n threads (moe_work.nthreads). */
#define MOE__OMP_FOR_N(n) MOE__PRAGMA(omp parallel for schedule(static) num_threads(n))
#define MOE__OMP_FOR_DYNAMIC_N(n) MOE__PRAGMA(omp parallel for schedule(dynamic, 1) num_threads(n))
#define MOE__OMP_PARALLEL_IF_N(cond, n) MOE__PRAGMA(omp parallel if (cond) num_threads(n))
#else
#define MOE__OMP 0
#define MOE_OMP_FOR
#define MOE_OMP_FOR_IF(cond)
#define MOE_OMP_FOR_DYNAMIC
/* still reads its condition (a variable computed only for it is then not "set but unused") and
   keeps the block after it a block */
#define MOE__OMP_PARALLEL_IF(cond) if ((void)(cond), 1)
#define MOE__OMP_FOR_INNER
#define MOE__OMP_FOR_NOWAIT
#define MOE__OMP_FOR_N(n)
#define MOE__OMP_FOR_DYNAMIC_N(n) if ((void)(n), 1) /* reads n too; the loop after it is its body */
#define MOE__OMP_PARALLEL_IF_N(cond, n)
#endif

#if defined(__linux__)
#include <sys/mman.h> /* madvise: transparent huge pages for the large streamed buffers */
#define MOE__HAVE_MADVISE 1
#define MOE__MADV_HUGEPAGE 14 /* MADV_HUGEPAGE, which strict -std=c99 headers hide */
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int madvise(void *, size_t, int);
#endif
#endif

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h> /* fsync, for atomic checkpoint writes */
#define MOE__HAVE_FSYNC 1
#if !defined(__cplusplus) && defined(__STRICT_ANSI__)
extern int fileno(FILE *); /* POSIX; hidden by strict -std=c99 headers */
#endif
#endif

/* a readable reference kept beside its fast twin: only the tests call it */
#if defined(__GNUC__) || defined(__clang__)
#define MOE__REF static __attribute__((unused))
#else
#define MOE__REF static
#endif

#ifdef MOE_STATIC /* a static copy need not use every function */
#if defined(__GNUC__) || defined(__clang__)
#define MOE__IMPL static __attribute__((unused))
#else
#define MOE__IMPL static
#endif
#else
#define MOE__IMPL
#endif

