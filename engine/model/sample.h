/* sample.h - a request's sampling parameters (the OpenAI / transformers
 * ones: temperature, top-k, top-p) and its random state. The draw itself is
 * the backend's sample op (ops.h, KnSampleRow): greedy, or a draw within the
 * top-k tokens and the nucleus, from the request's own splitmix64 state,
 * advanced once per sampled token, so the same seed and the same logits give
 * the same tokens whatever else shares the batch.
 *
 * Threading: plain data and a pure function.
 */
#ifndef GF_SAMPLE_H
#define GF_SAMPLE_H

#include <stdint.h>

#include "base.h"

typedef struct {
    float temperature;        /* 0 = greedy (argmax) */
    float top_p;              /* (0, 1]; 1 = no nucleus cut */
    int top_k;                /* 0 = no cut */
} SampleParams;

/* A random state from a seed (the same seed, the same stream). */
uint64_t sample_seed(uint64_t seed);

#endif
