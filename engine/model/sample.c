/* sample.c - a request's random state from its seed. */
#include "sample.h"

uint64_t sample_seed(uint64_t seed) {
    uint64_t s = seed;
    return gf_splitmix64(&s);
}
