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

uint16_t kn_f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffff;
    if (a > 0x7f800000) return (uint16_t)(sign | 0x7e00);          /* NaN */
    if (a >= 0x477ff000) return (uint16_t)(sign | 0x7c00);         /* rounds past 65504: inf */
    if (a < 0x38800000) {                                          /* f16 subnormal (or zero) */
        /* value = a_float; subnormal units of 2^-24, rounded to nearest even */
        if (a < 0x33000000) return sign;                           /* below half the smallest: 0 */
        uint32_t man = (a & 0x7fffff) | 0x800000, shift = 126 - (a >> 23);   /* 14..24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = a + 0xfff + ((a >> 13) & 1);                      /* round to nearest even at bit 13 */
    return (uint16_t)(sign | ((r - 0x38000000) >> 13));
}

/* out[i] = kn_bf16_to_f32(h[i]): the bits shifted into the high half,
 * four at a time in one vector (the decode step of a bf16 model widens
 * every weight it reads). */
static void bf16_widen(float *restrict out, const uint16_t *restrict h, int64_t n) {
    typedef uint16_t U16x4 __attribute__((vector_size(8)));
    typedef uint32_t U32x4 __attribute__((vector_size(16)));
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        U16x4 v;
        memcpy(&v, h + i, sizeof v);
        U32x4 w = __builtin_convertvector(v, U32x4) << 16;
        memcpy(out + i, &w, sizeof w);
    }
    for (; i < n; i++) out[i] = kn_bf16_to_f32(h[i]);
}

void kn_convert_to_f32(float *out, const void *src, KnDtype dtype, int64_t start, int64_t n) {
    if (dtype == KN_F32) {
        memcpy(out, (const float *)src + start, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)src + start;
    if (dtype == KN_BF16) {
        bf16_widen(out, h, n);
    } else {
        for (int64_t i = 0; i < n; i++) out[i] = kn_f16_to_f32(h[i]);
    }
}
