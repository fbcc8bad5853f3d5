/* convert.h - element conversions between the stored dtypes and float32, on
 * host memory: used by loaders (widening a checkpoint's vectors), NF4
 * quantization and the CPU kernels alike. Backend-neutral; a GPU backend
 * converts on its device with its own kernels, bit for bit the same.
 *
 * Threading: pure functions, any thread.
 */
#ifndef GF_CONVERT_H
#define GF_CONVERT_H

#include <stddef.h>
#include <stdint.h>

#include "tensor.h"

float kn_bf16_to_f32(uint16_t h);
uint16_t kn_f32_to_bf16(float f);   /* round to nearest even; NaN stays NaN */
float kn_f16_to_f32(uint16_t h);
uint16_t kn_f32_to_f16(float f);    /* round to nearest even; beyond 65504 -> inf; NaN stays NaN */

/* out[0..n) = the elements src[start..start + n) of a host array of dtype
 * F32, BF16 or F16, widened to float32. */
void kn_convert_to_f32(float *out, const void *src, KnDtype dtype, int64_t start, int64_t n);

#endif
