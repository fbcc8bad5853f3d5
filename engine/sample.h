/* sample.h - choosing the next token from a row of logits: greedy, or a
 * draw at a temperature restricted to the top-k tokens and to the nucleus
 * of probability top_p (the OpenAI / transformers parameters).
 *
 * The draw uses the request's own random state (splitmix64), advanced once
 * per sampled token, so the same seed and the same logits give the same
 * tokens whatever else shares the batch. Candidates are ordered by
 * probability, ties by token id, so the choice never depends on sort
 * stability. Tokens whose probability is below e^-40 of the best are left
 * out before sorting (they cannot be drawn at float precision anyway).
 *
 * Ownership: SampleWork is scratch for one vocabulary, owned by its caller;
 * used by one thread at a time (the engine thread).
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

typedef struct {
    float p;                  /* unnormalized probability */
    int32_t id;
} SampleCand;

typedef struct {
    int64_t vocab;
    SampleCand *c;            /* [vocab] candidates */
} SampleWork;

GfStatus sample_work_init(SampleWork *w, int64_t vocab, GfError *err);
void sample_work_free(SampleWork *w);

/* A random state from a seed (the same seed, the same stream). */
uint64_t sample_seed(uint64_t seed);

/* The next token of logits[vocab] under p; *rng advances when sampling. */
int32_t sample_next(const float *logits, const SampleParams *p, uint64_t *rng, SampleWork *w);

#endif
