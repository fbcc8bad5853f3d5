/* lora_fill.h - test adapters with their B matrices away from zero (a
 * fresh adapter's B is zero, so its LoRA path would add nothing to a loss
 * or a gradient of A): uniform in [-0.1, 0.1) from a fixed LCG, the same
 * values on every run. */
#ifndef GF_TEST_LORA_FILL_H
#define GF_TEST_LORA_FILL_H

#include <stdint.h>

#include "lora.h"

static inline void lora_fill_b(LoraAdapter *a) {
    uint64_t r = 99;
    for (size_t i = 0; i < a->n_pairs; i++)
        for (int64_t j = 0; j < a->pairs[i].out * a->pairs[i].rank; j++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            a->pairs[i].B[j] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) * 0.2f;
        }
}

#endif
