/* convert.c - bf16 / f16 <-> f32 on the host. */
#include "convert.h"

#include <math.h>
#include <string.h>

float kn_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t kn_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float kn_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, u;
    if (exp == 31) u = sign | 0x7F800000u | (man << 13);
    else if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    } else u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void kn_convert_to_f32(float *out, const void *src, KnDtype dtype, int64_t start, int64_t n) {
    if (dtype == KN_F32) {
        memcpy(out, (const float *)src + start, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)src + start;
    if (dtype == KN_BF16) {
        for (int64_t i = 0; i < n; i++) out[i] = kn_bf16_to_f32(h[i]);
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = kn_f16_to_f32(h[i]);
    }
}
