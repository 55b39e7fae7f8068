#ifdef __cplusplus
}
#endif
#endif /* RWD_H_INCLUDED */

/* ############################################################################################
   IMPLEMENTATION
   ############################################################################################ */
#if defined(RWD_IMPLEMENTATION) && !defined(RWD_IMPLEMENTATION_INCLUDED)
#define RWD_IMPLEMENTATION_INCLUDED

#ifndef MOE_IMPLEMENTATION_INCLUDED
#error "reward.h: define MOE_IMPLEMENTATION in the file that defines RWD_IMPLEMENTATION"
#endif

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef RWD_STATIC /* a static copy need not use every function */
#if defined(__GNUC__) || defined(__clang__)
#define RWD__IMPL static __attribute__((unused))
#else
#define RWD__IMPL static
#endif
#else
#define RWD__IMPL
#endif

