/* rand.h - the kernel tests' random inputs: xorshift64 from a fixed seed
 * (RAND_SEED when defined before the include), uniform in [-1, 1), so that
 * every run of a test sees the same values. rng is the file's own state. */
#ifndef GF_TEST_RAND_H
#define GF_TEST_RAND_H

#include <stdint.h>
#include <stdlib.h>

#ifndef RAND_SEED
#define RAND_SEED 0x9E3779B97F4A7C15ull
#endif

static uint64_t rng = RAND_SEED;

static inline float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* n values of frand(), malloc'ed (the caller frees). */
static inline float *rand_vec(size_t n) {
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = frand();
    return v;
}

#endif
