/* sample.c - a request's random state from its seed. */
#include "sample.h"

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t sample_seed(uint64_t seed) {
    uint64_t s = seed;
    return splitmix(&s);
}
