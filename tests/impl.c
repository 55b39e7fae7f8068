/* impl.c - the one translation unit of the test programs that holds the implementation of both
   headers, compiled once per build flavour (tests, sanitizers, -march=native) and linked into
   every tests/test_*.c that does not define MOE_IMPLEMENTATION itself. The test programs include
   the headers for their declarations only, as a user's other files do. */
#define MOE_IMPLEMENTATION
#define RWD_IMPLEMENTATION
#include "reward.h"
