/* preprocess.h - image preprocessing identical to transformers'
 * Gemma4ImageProcessorPil (GEMMA4.md §6.1): the aspect-preserving target
 * size for a soft-token budget, PIL's bicubic resize reproduced in its
 * integer pipeline (separable, horizontal pass first, 22-bit fixed-point
 * weights, uint8 between passes), and 16x16 patches flattened as (row, col,
 * channel) with (x, y) positions and (-1, -1) padding.
 *
 * Pure functions of their inputs; thread-safe. Errors (GF_INVALID, code
 * invalid_image) say why an image cannot be processed (too small or too
 * thin for the budget, unsupported budget).
 */
#ifndef GF_PREPROCESS_H
#define GF_PREPROCESS_H

#include <stdint.h>

#include "image.h"

typedef struct {
    int max_soft_tokens;      /* 70, 140, 280, 560 or 1120 */
    int patch_size;           /* 16 */
    int pooling_kernel;       /* 3 */
} PreprocessConfig;

/* Target width and height (multiples of patch * pooling) for a w x h image. */
GfStatus preprocess_target_size(const PreprocessConfig *cfg, int w, int h, int *tw, int *th, GfError *err);

/* PIL Image.resize((tw, th), BICUBIC) of an RGB image, bit-exact. */
GfStatus preprocess_resize_bicubic(const Image *in, int tw, int th, Image *out, GfError *err);

/* Patches of an image whose sides are multiples of the patch size:
 * pixels [max_patches, 3 p^2] uint8, positions [max_patches][2] (x, y),
 * padding rows zero with (-1, -1). Returns the number of real patches. */
int64_t preprocess_patchify(const Image *img, int patch, int64_t max_patches, uint8_t *pixels, int32_t *positions);

/* All of it: decode-independent. Fills *n_real and *n_soft; buffers as in
 * preprocess_patchify with max_patches = 9 x budget (pooling_kernel^2 x budget). */
GfStatus preprocess_image(const PreprocessConfig *cfg, const Image *img, uint8_t *pixels, int32_t *positions,
                          int64_t *n_real, int64_t *n_soft, GfError *err);

/* Patches of every image at the budget: pooling_kernel^2 x max_soft_tokens. */
int64_t preprocess_max_patches(const PreprocessConfig *cfg);

/* preprocess_image with the pixels as the vision tower takes them: float32
 * in [0, 1], [max_patches, 3 p^2]. */
GfStatus preprocess_image_f32(const PreprocessConfig *cfg, const Image *img, float *pixels, int32_t *positions,
                              int64_t *n_real, int64_t *n_soft, GfError *err);

#endif
