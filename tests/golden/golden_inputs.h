/* golden_inputs.h - reading the golden input files the engine tests feed to
 * the model: I64 ids and the image of forward_image.safetensors as the
 * vision tower takes it. */
#ifndef GF_GOLDEN_INPUTS_H
#define GF_GOLDEN_INPUTS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

/* Element i of an I64 tensor. */
static inline int64_t golden_i64(const StTensor *t, uint64_t i) {
    int64_t v;
    memcpy(&v, t->data + 8 * i, 8);
    return v;
}

/* The first n entries of input_ids and mm_token_type_ids of st. */
static inline void golden_prompt(const SafeTensors *st, int64_t n, int32_t *ids, uint8_t *types) {
    const StTensor *t = safetensors_find(st, "input_ids"), *mm = safetensors_find(st, "mm_token_type_ids");
    for (int64_t i = 0; i < n; i++) {
        ids[i] = (int32_t)golden_i64(t, (uint64_t)i);
        if (types) types[i] = (uint8_t)golden_i64(mm, (uint64_t)i);
    }
}

/* The image of st: pixels [N, 3 p^2] in [0, 1] and positions [N, 2]
 * (malloc'd, the caller frees them). Returns N. */
static inline int64_t golden_image(const SafeTensors *st, float **pixels, int32_t **positions) {
    const StTensor *px = safetensors_find(st, "pixel_values_u8"), *pos = safetensors_find(st, "image_position_ids");
    int64_t N = (int64_t)px->shape[1], P = (int64_t)px->shape[2];
    *pixels = malloc((size_t)(N * P) * sizeof(float));
    *positions = malloc((size_t)(2 * N) * sizeof(int32_t));
    for (int64_t i = 0; i < N * P; i++) (*pixels)[i] = (float)px->data[i] / 255.0f;
    for (int64_t i = 0; i < 2 * N; i++) (*positions)[i] = (int32_t)golden_i64(pos, (uint64_t)i);
    return N;
}

#endif
