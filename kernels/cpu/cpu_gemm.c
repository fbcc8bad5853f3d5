/* cpu_gemm.c - the CPU kinds' matmul and its input gradient (ops.h matmul
 * and matmul_dx), and the dot product every CPU kernel sums in the same
 * order (cpu_dot).
 *
 * Written once over F8, eight floats, and compiled three times on x86-64:
 * as it stands (SSE: two registers a F8; NEON elsewhere), by
 * cpu_gemm_avx2.c with AVX2 (one register a F8) and by cpu_gemm_avx512.c
 * with AVX-512 (two F8 in one register: two input rows against one weight
 * vector, or sixteen elements of a row of dx), whose tasks the plain
 * build's entries hand the pool when the CPU has the instructions and
 * GF_CPU_SIMD does not hold the build back ("avx2": not beyond AVX2;
 * "baseline": the plain build). No build fuses a multiply and an add (the
 * kernels are compiled with -ffp-contract=off, the AVX2 build also without
 * FMA): a product is rounded before it is added, every lane sums what the
 * same loop over floats sums, so all builds give the same bits (test_ops
 * compares them). */
#include <stdlib.h>
#include <string.h>

#include "../convert.h"
#include "../nf4.h"
#include "../pool.h"
#include "cpu_impl.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

#if defined(CPU_GEMM_AVX2)
#define GEMM(name) name##_avx2
#elif defined(CPU_GEMM_AVX512)
#define GEMM(name) name##_avx512
#else
#define GEMM(name) name
#define CPU_GEMM_PLAIN
#endif

/* ---- F8 ------------------------------------------------------------------- */

#ifdef __AVX2__
typedef float F8 __attribute__((vector_size(32)));
static inline F8 f8_load(const float *p) {
    F8 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void f8_store(float *p, F8 v) { memcpy(p, &v, sizeof v); }
static inline F8 f8_zero(void) { return (F8){0}; }
static inline F8 f8_splat(float g) { return (F8){g, g, g, g, g, g, g, g}; }
/* s + a b, the product rounded first */
static inline F8 f8_madd(F8 s, F8 a, F8 b) { return s + a * b; }
static inline float f8_lane(F8 v, int k) { return v[k]; }
#else
typedef struct {
    V4 lo, hi;
} F8;
static inline F8 f8_load(const float *p) { return (F8){cpu_load4(p), cpu_load4(p + 4)}; }
static inline void f8_store(float *p, F8 v) {
    cpu_store4(p, v.lo);
    cpu_store4(p + 4, v.hi);
}
static inline F8 f8_zero(void) { return (F8){{0}, {0}}; }
static inline F8 f8_splat(float g) { return (F8){{g, g, g, g}, {g, g, g, g}}; }
static inline F8 f8_madd(F8 s, F8 a, F8 b) { return (F8){s.lo + a.lo * b.lo, s.hi + a.hi * b.hi}; }
static inline float f8_lane(F8 v, int k) { return k < 4 ? v.lo[k] : v.hi[k - 4]; }
#endif

/* Whether the kernels take two rows of x (or dx) at a time: with AVX2's
 * sixteen registers of eight floats the eight sums fit; with SSE's sixteen
 * of four they do not, and spill. */
#ifdef __AVX2__
enum { ROW_PAIRS = 1 };
#else
enum { ROW_PAIRS = 0 };
#endif

/* The order every dot product of the CPU kinds is summed in: eight partial
 * sums s[k] over strides of 8, added in pairs, then the tail in order. */
static inline float f8_pairs(F8 s) {
    return ((f8_lane(s, 0) + f8_lane(s, 1)) + (f8_lane(s, 2) + f8_lane(s, 3))) +
           ((f8_lane(s, 4) + f8_lane(s, 5)) + (f8_lane(s, 6) + f8_lane(s, 7)));
}

#ifdef __AVX512F__
/* Sixteen floats: two F8 side by side. */
typedef float F16 __attribute__((vector_size(64)));
static inline F16 f16_load(const float *p) {
    F16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void f16_store(float *p, F16 v) { memcpy(p, &v, sizeof v); }
static inline F16 f16_splat(float g) { return (F16){g, g, g, g, g, g, g, g, g, g, g, g, g, g, g, g}; }
/* a[0, 8) in the low eight lanes, b[0, 8) in the high eight */
static inline F16 f16_halves(const float *a, const float *b) {
    __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a)));
    return (F16)_mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm256_loadu_ps(b)), 1));
}
/* a[0, 8) in both halves */
static inline F16 f16_twice(const float *a) {
    return (F16)_mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(a))));
}
/* f8_pairs of half h (0 low, 1 high) */
static inline float f16_pairs(F16 s, int h) {
    int k = 8 * h;
    return ((s[k] + s[k + 1]) + (s[k + 2] + s[k + 3])) + ((s[k + 4] + s[k + 5]) + (s[k + 6] + s[k + 7]));
}
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
    F8 s = f8_zero();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = f8_madd(s, f8_load(a + i), f8_load(b + i));
    float t = f8_pairs(s);
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* dot(a, b[j], n) for four rows b[0..3] at once, each summed exactly as
 * dot sums it, with a's values loaded once for the four and every partial
 * sum kept in a register. */
static inline void dot4(const float *a, const float *const b[4], int64_t n, float out[4]) {
    F8 s0 = f8_zero(), s1 = f8_zero(), s2 = f8_zero(), s3 = f8_zero();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        F8 x = f8_load(a + i);
        s0 = f8_madd(s0, x, f8_load(b[0] + i));
        s1 = f8_madd(s1, x, f8_load(b[1] + i));
        s2 = f8_madd(s2, x, f8_load(b[2] + i));
        s3 = f8_madd(s3, x, f8_load(b[3] + i));
    }
    float t[4] = {f8_pairs(s0), f8_pairs(s1), f8_pairs(s2), f8_pairs(s3)};
    for (int j = 0; j < 4; j++)
        for (int64_t e = i; e < n; e++) t[j] += a[e] * b[j][e];
    memcpy(out, t, sizeof t);
}

float GEMM(cpu_dot)(const float *a, const float *b, int64_t n) { return dot(a, b, n); }
void GEMM(cpu_dot4)(const float *a, const float *const b[4], int64_t n, float out[4]) { dot4(a, b, n, out); }

/* dot4 for two rows a0 and a1 at once: each of the eight sums exactly as
 * dot sums it, every weight vector loaded once for both rows. */
static inline void dot4x2(const float *a0, const float *a1, const float *const b[4], int64_t n, float out0[4],
                          float out1[4]) {
    int64_t i = 0;
#ifdef __AVX512F__
    /* lanes 0-7 a0's sums, 8-15 a1's: each weight vector loaded into both */
    F16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    for (; i + 8 <= n; i += 8) {
        F16 x = f16_halves(a0 + i, a1 + i);
        s0 = s0 + x * f16_twice(b[0] + i);
        s1 = s1 + x * f16_twice(b[1] + i);
        s2 = s2 + x * f16_twice(b[2] + i);
        s3 = s3 + x * f16_twice(b[3] + i);
    }
    float u0[4] = {f16_pairs(s0, 0), f16_pairs(s1, 0), f16_pairs(s2, 0), f16_pairs(s3, 0)};
    float u1[4] = {f16_pairs(s0, 1), f16_pairs(s1, 1), f16_pairs(s2, 1), f16_pairs(s3, 1)};
#else
    F8 s0 = f8_zero(), s1 = f8_zero(), s2 = f8_zero(), s3 = f8_zero();
    F8 t0 = f8_zero(), t1 = f8_zero(), t2 = f8_zero(), t3 = f8_zero();
    for (; i + 8 <= n; i += 8) {
        F8 x = f8_load(a0 + i), y = f8_load(a1 + i), w;
        w = f8_load(b[0] + i);
        s0 = f8_madd(s0, x, w);
        t0 = f8_madd(t0, y, w);
        w = f8_load(b[1] + i);
        s1 = f8_madd(s1, x, w);
        t1 = f8_madd(t1, y, w);
        w = f8_load(b[2] + i);
        s2 = f8_madd(s2, x, w);
        t2 = f8_madd(t2, y, w);
        w = f8_load(b[3] + i);
        s3 = f8_madd(s3, x, w);
        t3 = f8_madd(t3, y, w);
    }
    float u0[4] = {f8_pairs(s0), f8_pairs(s1), f8_pairs(s2), f8_pairs(s3)};
    float u1[4] = {f8_pairs(t0), f8_pairs(t1), f8_pairs(t2), f8_pairs(t3)};
#endif
    for (int j = 0; j < 4; j++)
        for (int64_t e = i; e < n; e++) {
            u0[j] += a0[e] * b[j][e];
            u1[j] += a1[e] * b[j][e];
        }
    memcpy(out0, u0, sizeof u0);
    memcpy(out1, u1, sizeof u1);
}

#ifdef __AVX512F__
/* dot4x2 for rows a[0..3], two pairs: each sum exactly as dot sums it,
 * every weight vector loaded once for the four rows. */
static inline void dot4x4(const float *const a[4], const float *const b[4], int64_t n, float out[4][4]) {
    F16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, t0 = {0}, t1 = {0}, t2 = {0}, t3 = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        F16 x = f16_halves(a[0] + i, a[1] + i), y = f16_halves(a[2] + i, a[3] + i), w;
        w = f16_twice(b[0] + i);
        s0 = s0 + x * w;
        t0 = t0 + y * w;
        w = f16_twice(b[1] + i);
        s1 = s1 + x * w;
        t1 = t1 + y * w;
        w = f16_twice(b[2] + i);
        s2 = s2 + x * w;
        t2 = t2 + y * w;
        w = f16_twice(b[3] + i);
        s3 = s3 + x * w;
        t3 = t3 + y * w;
    }
    const F16 s[4] = {s0, s1, s2, s3}, t[4] = {t0, t1, t2, t3};
    for (int j = 0; j < 4; j++) {
        float u[4] = {f16_pairs(s[j], 0), f16_pairs(s[j], 1), f16_pairs(t[j], 0), f16_pairs(t[j], 1)};
        for (int r = 0; r < 4; r++) {
            for (int64_t e = i; e < n; e++) u[r] += a[r][e] * b[j][e];
            out[r][j] = u[r];
        }
    }
}
#endif

#ifdef __AVX2__
/* How far ahead of the weight being widened a BF16 row is prefetched (4 KB;
 * measured when a one-row matmul still widened: 18.6 GB/s of weights
 * without, 29 with 2 KB and 33 with 4 KB ahead on the development machine).
 * Matmuls of few rows now read the weights in fused_dot8, with their own
 * prefetch (PREFETCH_FUSED); this one serves the rows beyond fused_rows. */
enum { PREFETCH_BF16 = 2048 };

/* Eight bfloat16 weights widened in a register (their bits into the high
 * half: what cpu_load_span writes). */
static inline F8 f8_load_bf16(const uint16_t *p) {
    typedef uint16_t U16x8 __attribute__((vector_size(16)));
    typedef uint32_t U32x8 __attribute__((vector_size(32)));
    U16x8 h;
    memcpy(&h, p, sizeof h);
    U32x8 bits = __builtin_convertvector(h, U32x8) << 16;
    F8 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* len NF4 weights from element e of q into out, kn_nf4_dequantize's values
 * (the code times its block's absmax, one rounding), eight at a time: the
 * eight codes of four bytes looked up in the two halves of the table. */
static inline float nf4_code(const KnNf4 *q, int64_t e) {
    uint8_t byte = q->codes[e / 2];
    return KN_NF4_CODE[e % 2 ? byte >> 4 : byte & 15];
}

static void nf4_widen(float *out, const KnNf4 *q, int64_t e, int64_t len) {
    const __m256 lo = _mm256_loadu_ps(KN_NF4_CODE), hi = _mm256_loadu_ps(KN_NF4_CODE + 8);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), fifteen = _mm256_set1_epi32(15);
    const __m256i seven = _mm256_set1_epi32(7);
    int64_t end = e + len;
    while (e < end) {
        int64_t b = e / KN_NF4_BLOCK, stop = (b + 1) * KN_NF4_BLOCK < end ? (b + 1) * KN_NF4_BLOCK : end;
        float a = kn_nf4_absmax(q, b);
        __m256 av = _mm256_set1_ps(a);
        for (; e < stop && (e & 7); e++) *out++ = nf4_code(q, e) * a;
        for (; e + 8 <= stop; e += 8, out += 8) {
            uint32_t bytes;
            memcpy(&bytes, q->codes + e / 2, sizeof bytes); /* element e + k in bits 4k .. 4k + 3 */
            __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)bytes), shifts), fifteen);
            __m256 code = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                           _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven)));
            _mm256_storeu_ps(out, _mm256_mul_ps(code, av));
        }
        for (; e < stop; e++) *out++ = nf4_code(q, e) * a;
    }
}
#endif

/* len weights of row r of w from column c0, widened to float32: what
 * cpu_load_span writes, BF16 and NF4 eight at a time in the AVX2 build. */
static inline void widen(float *out, KnMatrix w, int64_t r, int64_t c0, int64_t len) {
#ifdef __AVX2__
    int64_t e = r * w.cols + c0;
    if (w.dtype == KN_NF4) {
        nf4_widen(out, w.data, w.offset + e, len);
        return;
    }
    if (w.dtype == KN_BF16) {
        const uint16_t *h = (const uint16_t *)w.data + e;
        int64_t i = 0;
        for (; i + 8 <= len; i += 8) {
            if ((i & 31) == 0) __builtin_prefetch(h + i + PREFETCH_BF16);
            f8_store(out + i, f8_load_bf16(h + i));
        }
        for (; i < len; i++) out[i] = kn_bf16_to_f32(h[i]);
        return;
    }
#endif
    cpu_load_span(out, w, r, c0, len);
}

/* ---- matmul ------------------------------------------------------------- */

enum { MM_CHUNK = 4096, MM_OUTS = 4 };

#ifdef __AVX2__
/* ---- matmul of a few rows, weights read as they are summed ----------------
 * A decode step's matmul has one input row per sequence: widening each
 * weight into a buffer and reading it back (matmul_block) cost more than
 * the multiply.
 * fused_dot8 sums BF16 (and with AVX-512, NF4) weights straight from their
 * bytes, eight output features at a time (eight chains of additions in
 * flight; with AVX-512 two features share a register, as dot4x2's two input
 * rows do), each output's sum in dot's order over the same MM_CHUNK chunks,
 * so the bits are matmul_block's. BF16 weights are prefetched: rows of more
 * than a chunk PREFETCH_FUSED weights (1 KB) ahead in the row (one thread
 * over 8192 x 8192 read 15-16 GB/s without, 20-22 with 256 to 1,024 weights
 * ahead, 15 with 2,048, before the loops were unrolled); shorter rows at
 * the same column of the next block's rows, so that the next block's eight
 * short rows do not each start with a miss (bench_matmul --copies, the
 * weights from memory, 2 threads: 1024 to 32768 x 1024 and 1024 x 4096
 * 23-32 -> 28-38 GB/s). NF4 is bound by its decoding. */
enum { FR_OUTS = 8, PREFETCH_FUSED = 512 };

/* The most input rows fused_dot8 takes for w (0: none); beyond them, and
 * for other dtypes, widening each weight once for every row is the
 * faster. bench_matmul on the development machine (2 threads, weights from
 * memory: 8192 x 8192 --copies 3 and 4096 x 1024 --copies 48, widening ->
 * fused): AVX-512, three rows a pass, BF16 one to six rows 7.5-10.4 ->
 * 2.7-5.6 ms and 297-543 -> 154-354 us, NF4 6.6-8.8 -> 3.1-7.2 ms and
 * 320-547 -> 221-552 us (the same from four rows on the small matrix);
 * AVX2, a row a pass, BF16 one row 6.1 -> 3.6 ms and 284 -> 216 us, two
 * rows no faster. NF4 also needs its blocks to start on a multiple of 64
 * in every row, so that a block never straddles an eight-element step;
 * AVX2 decodes NF4 at the widening path's speed, so that build leaves it
 * there. */
static inline int64_t fused_rows(KnMatrix w) {
#ifdef __AVX512F__
    if (w.dtype == KN_BF16) return 6;
    if (w.dtype == KN_NF4 && w.offset % KN_NF4_BLOCK == 0 && w.cols % KN_NF4_BLOCK == 0) return 6;
#else
    if (w.dtype == KN_BF16) return 1;
#endif
    return 0;
}

#ifdef __AVX512F__
/* Sixteen BF16 weights widened: eight of row a in the low half, eight of
 * row b in the high. */
static inline F16 f16_bf16_halves(const uint16_t *a, const uint16_t *b) {
    __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)a)),
                                        _mm_loadu_si128((const __m128i *)b), 1);
    return (F16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Sixteen NF4 weights: the eight codes from element ea (low half) and eb
 * (high half), each times its block's absmax (one rounding, as nf4_widen). */
static inline F16 f16_nf4_halves(const uint8_t *codes, int64_t ea, int64_t eb, __m512 table, __m512 absmax) {
    uint32_t ba, bb;
    memcpy(&ba, codes + (uint64_t)ea / 2, sizeof ba); /* element e + k in bits 4k .. 4k + 3; e >= 0 */
    memcpy(&bb, codes + (uint64_t)eb / 2, sizeof bb);
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    __m512i bytes = _mm512_inserti64x4(_mm512_set1_epi32((int)ba), _mm256_set1_epi32((int)bb), 1);
    __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(bytes, shifts), _mm512_set1_epi32(15));
    return (F16)_mm512_mul_ps(_mm512_permutexvar_ps(idx, table), absmax);
}

/* a in the low half, b in the high */
static inline __m512 f16_two(float a, float b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)), _mm256_castps_pd(_mm256_set1_ps(b)), 1));
}
#endif

/* How many input rows fused_dot8 sums in one pass over the weights: with
 * AVX-512's 32 registers, three rows' 4 sums each beside the 4 weight
 * vectors; AVX2's 16 hold one row's 8 sums. */
#ifdef __AVX512F__
enum { FR_JOINT = 3 };
#else
enum { FR_JOINT = 1 };
#endif

/* out[r][j] = the dot product of x[r][0, len) with row o + j of w from
 * column c0 (r < nx <= FR_JOINT, j < FR_OUTS), summed as dot sums it, for
 * weights fused_rows accepts: each weight is decoded once for the nx rows.
 * Inlined where nx is a constant, so that the loops over rows and features
 * unroll and the sums stay in registers (rolled, they went through memory
 * at half the speed). */
static inline __attribute__((always_inline)) void fused_dot8(KnMatrix w, int64_t o, int64_t c0, const float *const *x,
                                                             int nx, int64_t len, float out[][FR_OUTS]) {
    int64_t i = 0, e[FR_OUTS];
    for (int j = 0; j < FR_OUTS; j++) e[j] = (o + j) * w.cols + c0;
    const uint16_t *h = w.data;
    /* BF16 prefetches: a row of one chunk, the same column of the next
     * block's rows, so that its short rows start in cache; a longer row,
     * PREFETCH_FUSED weights on in the same row */
    int64_t ahead = w.cols <= MM_CHUNK ? FR_OUTS * w.cols : PREFETCH_FUSED;
#ifdef __AVX512F__
    F16 s[FR_JOINT][FR_OUTS / 2] = {{{0}}};
    if (w.dtype == KN_BF16) {
        for (; i + 8 <= len; i += 8) {
            if ((i & 31) == 0)
                for (int j = 0; j < FR_OUTS; j++) __builtin_prefetch(h + e[j] + ahead + i);
            F16 wv[FR_OUTS / 2];
#pragma GCC unroll 8
            for (int p = 0; p < FR_OUTS / 2; p++) wv[p] = f16_bf16_halves(h + e[2 * p] + i, h + e[2 * p + 1] + i);
#pragma GCC unroll 8
            for (int r = 0; r < nx; r++) {
                F16 xv = f16_twice(x[r] + i);
#pragma GCC unroll 8
                for (int p = 0; p < FR_OUTS / 2; p++) s[r][p] = s[r][p] + xv * wv[p];
            }
        }
    } else { /* NF4: every chunk a whole number of blocks, so no tail */
        const KnNf4 *q = w.data;
        const __m512 table = _mm512_loadu_ps(KN_NF4_CODE);
        __m512 a[FR_OUTS / 2] = {0};
        int64_t f[FR_OUTS];
        for (int j = 0; j < FR_OUTS; j++) f[j] = w.offset + e[j];
        for (; i + 8 <= len; i += 8) {
            if ((i & (KN_NF4_BLOCK - 1)) == 0)
                for (int p = 0; p < FR_OUTS / 2; p++)
                    a[p] = f16_two(kn_nf4_absmax(q, (f[2 * p] + i) / KN_NF4_BLOCK), kn_nf4_absmax(q, (f[2 * p + 1] + i) / KN_NF4_BLOCK));
            F16 wv[FR_OUTS / 2];
#pragma GCC unroll 8
            for (int p = 0; p < FR_OUTS / 2; p++) wv[p] = f16_nf4_halves(q->codes, f[2 * p] + i, f[2 * p + 1] + i, table, a[p]);
#pragma GCC unroll 8
            for (int r = 0; r < nx; r++) {
                F16 xv = f16_twice(x[r] + i);
#pragma GCC unroll 8
                for (int p = 0; p < FR_OUTS / 2; p++) s[r][p] = s[r][p] + xv * wv[p];
            }
        }
    }
    for (int r = 0; r < nx; r++)
        for (int p = 0; p < FR_OUTS / 2; p++) {
            out[r][2 * p] = f16_pairs(s[r][p], 0);
            out[r][2 * p + 1] = f16_pairs(s[r][p], 1);
        }
#else
    F8 s[FR_OUTS];
    for (int j = 0; j < FR_OUTS; j++) s[j] = f8_zero();
    for (; i + 8 <= len; i += 8) { /* BF16 */
        F8 xv = f8_load(x[0] + i);
        if ((i & 31) == 0)
            for (int j = 0; j < FR_OUTS; j++) __builtin_prefetch(h + e[j] + ahead + i);
#pragma GCC unroll 8
        for (int j = 0; j < FR_OUTS; j++) s[j] = f8_madd(s[j], xv, f8_load_bf16(h + e[j] + i));
    }
    for (int j = 0; j < FR_OUTS; j++) out[0][j] = f8_pairs(s[j]);
#endif
    for (int r = 0; r < nx; r++) /* the tail, BF16 only */
        for (int j = 0; j < FR_OUTS; j++)
            for (int64_t k = i; k < len; k++) out[r][j] += x[r][k] * kn_bf16_to_f32(h[e[j] + k]);
}

/* fused_dot8 for nx = 1 .. FR_JOINT rows, each a constant in its copy */
static void fused_dot8_rows(KnMatrix w, int64_t o, int64_t c0, const float *const *x, int nx, int64_t len,
                            float out[][FR_OUTS]) {
#ifdef __AVX512F__
    if (nx == 3) fused_dot8(w, o, c0, x, 3, len, out);
    else if (nx == 2) fused_dot8(w, o, c0, x, 2, len, out);
    else
#else
    (void)nx; /* FR_JOINT is 1 */
#endif
        fused_dot8(w, o, c0, x, 1, len, out);
}

/* Outputs [o0, o0 + FR_OUTS) of every input row from the weights' bytes,
 * FR_JOINT rows a pass: each 0 plus the chunks' dot products in order, as
 * matmul_block sums it. */
static void fused_block(const CpuMatmul *t, long o0) {
    for (int64_t i = 0; i < t->n; i++)
        for (int j = 0; j < FR_OUTS; j++) t->out[i * t->w.rows + o0 + j] = 0.0f;
    for (int64_t c0 = 0; c0 < t->w.cols; c0 += MM_CHUNK) {
        int64_t len = t->w.cols - c0 < MM_CHUNK ? t->w.cols - c0 : MM_CHUNK;
        for (int64_t i0 = 0; i0 < t->n; i0 += FR_JOINT) {
            int nx = t->n - i0 < FR_JOINT ? (int)(t->n - i0) : FR_JOINT;
            const float *x[FR_JOINT];
            float d[FR_JOINT][FR_OUTS];
            for (int r = 0; r < nx; r++) x[r] = t->in + (i0 + r) * t->w.cols + c0;
            fused_dot8_rows(t->w, o0, c0, x, nx, len, d);
            for (int r = 0; r < nx; r++)
                for (int j = 0; j < FR_OUTS; j++) t->out[(i0 + r) * t->w.rows + o0 + j] += d[r][j];
        }
    }
}
#endif

/* Outputs [o0, o0 + nb) (nb <= MM_OUTS) of every input row, their weight
 * rows widened MM_CHUNK columns at a time into row[] (rows: the same
 * buffers, for dot4): each output is 0 plus the chunks' dot products in
 * order, whatever block it is in, so a result depends on its input row and
 * weight row alone. */
static inline void matmul_block(const CpuMatmul *t, long o0, int nb, float (*row)[MM_CHUNK], const float *const *rows) {
    static const float zero[MM_OUTS];
    /* a fixed-size copy is one store; the loop it replaces became a call
     * of memset per input row, 3% of a training step */
    for (int64_t i = 0; i < t->n; i++)
        if (nb == MM_OUTS) memcpy(t->out + i * t->w.rows + o0, zero, sizeof zero);
        else memcpy(t->out + i * t->w.rows + o0, zero, (size_t)nb * sizeof(float));
    for (int64_t c0 = 0; c0 < t->w.cols; c0 += MM_CHUNK) {
        int64_t len = t->w.cols - c0 < MM_CHUNK ? t->w.cols - c0 : MM_CHUNK;
        for (int j = 0; j < nb; j++) widen(row[j], t->w, o0 + j, c0, len);
        int64_t i = 0;
#ifdef __AVX512F__
        if (nb == MM_OUTS)
            for (; i + 4 <= t->n; i += 4) { /* four input rows at a time */
                const float *xi = t->in + i * t->w.cols + c0;
                const float *const x4[4] = {xi, xi + t->w.cols, xi + 2 * t->w.cols, xi + 3 * t->w.cols};
                float *yi = t->out + i * t->w.rows + o0, d[4][MM_OUTS];
                dot4x4(x4, rows, len, d);
                for (int r = 0; r < 4; r++)
                    for (int j = 0; j < MM_OUTS; j++) yi[r * t->w.rows + j] += d[r][j];
            }
#endif
        if (ROW_PAIRS && nb == MM_OUTS)
            for (; i + 2 <= t->n; i += 2) { /* two input rows at a time */
                const float *xi = t->in + i * t->w.cols + c0;
                float *yi = t->out + i * t->w.rows + o0, d0[MM_OUTS], d1[MM_OUTS];
                dot4x2(xi, xi + t->w.cols, rows, len, d0, d1);
                for (int j = 0; j < MM_OUTS; j++) {
                    yi[j] += d0[j];
                    yi[t->w.rows + j] += d1[j];
                }
            }
        for (; i < t->n; i++) {
            const float *xi = t->in + i * t->w.cols + c0;
            float *yi = t->out + i * t->w.rows + o0;
            if (nb == MM_OUTS) {
                float d[MM_OUTS];
                dot4(xi, rows, len, d);
                for (int j = 0; j < MM_OUTS; j++) yi[j] += d[j];
            } else {
                for (int j = 0; j < nb; j++) yi[j] += dot(xi, row[j], len);
            }
        }
    }
}

/* Each thread owns a range of output features, MM_OUTS at a time: the
 * block's weight rows are widened once, and each input row is read once
 * for the block instead of once per output. */
void GEMM(cpu_matmul_task)(void *p, int ith, int nth) {
    const CpuMatmul *t = p;
    long lo, hi;
    kn_split((long)t->w.rows, ith, nth, &lo, &hi);
#ifdef __AVX2__
    if (t->n <= fused_rows(t->w)) {
        for (; lo + FR_OUTS <= hi; lo += FR_OUTS) fused_block(t, lo);
        if (lo == hi) return;
    }
#endif
    float row[MM_OUTS][MM_CHUNK];
    const float *const rows[MM_OUTS] = {row[0], row[1], row[2], row[3]};
    for (long o = lo; o < hi; o += MM_OUTS) matmul_block(t, o, hi - o < MM_OUTS ? (int)(hi - o) : MM_OUTS, row, rows);
}

/* ---- matmul_dx ------------------------------------------------------------ */

enum { DX_CHUNK = 256, DX_TOKENS = 128, DX_ROWS = 4 };

/* d[0..n) += g[k] w[k][0..n) for the k in order whose g is not 0, in one
 * pass over d: each element takes the same additions, in the same order,
 * as axpy row after row would give it. Four rows: two vectors of d at a
 * time, so that their chains of additions overlap. */
static inline void axpy_rows(float *restrict d, const float *const w[DX_ROWS], const float g[DX_ROWS], int nb, int64_t n) {
    const float *wk[DX_ROWS];
    float gk[DX_ROWS];
    int m = 0;
    for (int k = 0; k < nb; k++)
        if (g[k] != 0.0f) {
            wk[m] = w[k];
            gk[m++] = g[k];
        }
    if (m <= 1) {
        if (m == 1) cpu_axpy(d, gk[0], wk[0], n);
        return;
    }
    int64_t c = 0;
#ifdef __AVX512F__
    if (m == DX_ROWS) {
        F16 g0 = f16_splat(gk[0]), g1 = f16_splat(gk[1]), g2 = f16_splat(gk[2]), g3 = f16_splat(gk[3]);
        for (; c + 32 <= n; c += 32) {
            F16 a = f16_load(d + c), b = f16_load(d + c + 16);
            a = a + g0 * f16_load(wk[0] + c);
            b = b + g0 * f16_load(wk[0] + c + 16);
            a = a + g1 * f16_load(wk[1] + c);
            b = b + g1 * f16_load(wk[1] + c + 16);
            a = a + g2 * f16_load(wk[2] + c);
            b = b + g2 * f16_load(wk[2] + c + 16);
            a = a + g3 * f16_load(wk[3] + c);
            b = b + g3 * f16_load(wk[3] + c + 16);
            f16_store(d + c, a);
            f16_store(d + c + 16, b);
        }
    }
#endif
    if (m == DX_ROWS) {
        F8 g0 = f8_splat(gk[0]), g1 = f8_splat(gk[1]), g2 = f8_splat(gk[2]), g3 = f8_splat(gk[3]);
        for (; c + 16 <= n; c += 16) {
            F8 a = f8_load(d + c), b = f8_load(d + c + 8);
            a = f8_madd(a, g0, f8_load(wk[0] + c));
            b = f8_madd(b, g0, f8_load(wk[0] + c + 8));
            a = f8_madd(a, g1, f8_load(wk[1] + c));
            b = f8_madd(b, g1, f8_load(wk[1] + c + 8));
            a = f8_madd(a, g2, f8_load(wk[2] + c));
            b = f8_madd(b, g2, f8_load(wk[2] + c + 8));
            a = f8_madd(a, g3, f8_load(wk[3] + c));
            b = f8_madd(b, g3, f8_load(wk[3] + c + 8));
            f8_store(d + c, a);
            f8_store(d + c + 8, b);
        }
    }
    for (; c + 8 <= n; c += 8) {
        F8 v = f8_load(d + c);
        for (int k = 0; k < m; k++) v = f8_madd(v, f8_splat(gk[k]), f8_load(wk[k] + c));
        f8_store(d + c, v);
    }
    for (; c < n; c++) {
        float v = d[c];
        for (int k = 0; k < m; k++) v += gk[k] * wk[k][c];
        d[c] = v;
    }
}

/* axpy_rows of four rows with every g nonzero for two rows of dx, d0 with
 * g0 and d1 with g1, each weight vector loaded once for both: each element
 * takes the additions axpy_rows gives it. */
static inline void axpy_rows2(float *restrict d0, float *restrict d1, const float *const w[DX_ROWS],
                              const float g0[DX_ROWS], const float g1[DX_ROWS], int64_t n) {
    int64_t c = 0;
#ifdef __AVX512F__
    {
        F16 a0 = f16_splat(g0[0]), a1 = f16_splat(g0[1]), a2 = f16_splat(g0[2]), a3 = f16_splat(g0[3]);
        F16 b0 = f16_splat(g1[0]), b1 = f16_splat(g1[1]), b2 = f16_splat(g1[2]), b3 = f16_splat(g1[3]);
        for (; c + 16 <= n; c += 16) {
            F16 u = f16_load(d0 + c), v = f16_load(d1 + c), x;
            x = f16_load(w[0] + c);
            u = u + a0 * x;
            v = v + b0 * x;
            x = f16_load(w[1] + c);
            u = u + a1 * x;
            v = v + b1 * x;
            x = f16_load(w[2] + c);
            u = u + a2 * x;
            v = v + b2 * x;
            x = f16_load(w[3] + c);
            u = u + a3 * x;
            v = v + b3 * x;
            f16_store(d0 + c, u);
            f16_store(d1 + c, v);
        }
    }
#endif
    F8 a0 = f8_splat(g0[0]), a1 = f8_splat(g0[1]), a2 = f8_splat(g0[2]), a3 = f8_splat(g0[3]);
    F8 b0 = f8_splat(g1[0]), b1 = f8_splat(g1[1]), b2 = f8_splat(g1[2]), b3 = f8_splat(g1[3]);
    for (; c + 8 <= n; c += 8) {
        F8 u = f8_load(d0 + c), v = f8_load(d1 + c), x;
        x = f8_load(w[0] + c);
        u = f8_madd(u, a0, x);
        v = f8_madd(v, b0, x);
        x = f8_load(w[1] + c);
        u = f8_madd(u, a1, x);
        v = f8_madd(v, b1, x);
        x = f8_load(w[2] + c);
        u = f8_madd(u, a2, x);
        v = f8_madd(v, b2, x);
        x = f8_load(w[3] + c);
        u = f8_madd(u, a3, x);
        v = f8_madd(v, b3, x);
        f8_store(d0 + c, u);
        f8_store(d1 + c, v);
    }
    for (; c < n; c++) {
        float u = d0[c], v = d1[c];
        for (int k = 0; k < DX_ROWS; k++) {
            u += g0[k] * w[k][c];
            v += g1[k] * w[k][c];
        }
        d0[c] = u;
        d1[c] = v;
    }
}

static inline int all_nonzero(const float g[DX_ROWS]) { return g[0] != 0.0f && g[1] != 0.0f && g[2] != 0.0f && g[3] != 0.0f; }

/* Each thread owns a range of input features (columns of W), so no two
 * threads write the same dx element. The range is cut in chunks of
 * DX_CHUNK columns and the tokens in blocks of DX_TOKENS, so the block of
 * dx being accumulated (128 KB; blocks of 256 KB ran at half the speed
 * on the development machine where a thread's range was one chunk) stays
 * in cache while the rows of W pass over it, DX_ROWS rows at a time (each
 * dx element read and written once for them; each weight row widened once
 * a block); each dx element still sums over the rows of W in order. */
void GEMM(cpu_matmul_dx_task)(void *p, int ith, int nth) {
    const CpuMatmul *t = p;
    long lo, hi;
    kn_split((long)t->w.cols, ith, nth, &lo, &hi);
    float row[DX_ROWS][DX_CHUNK];
    const float *const rows[DX_ROWS] = {row[0], row[1], row[2], row[3]};
    for (long c0 = lo; c0 < hi; c0 += DX_CHUNK) {
        int64_t len = hi - c0 < DX_CHUNK ? hi - c0 : DX_CHUNK;
        for (int64_t i0 = 0; i0 < t->n; i0 += DX_TOKENS) {
            int64_t i1 = i0 + DX_TOKENS < t->n ? i0 + DX_TOKENS : t->n;
            for (int64_t o = 0; o < t->w.rows; o += DX_ROWS) {
                int nb = t->w.rows - o < DX_ROWS ? (int)(t->w.rows - o) : DX_ROWS;
                for (int k = 0; k < nb; k++) widen(row[k], t->w, o + k, c0, len);
                for (int64_t i = i0; i < i1;) {
                    const float *g = t->in + i * t->w.rows + o, *g1 = g + t->w.rows;
                    float *d = t->out + i * t->w.cols + c0;
                    if (ROW_PAIRS && nb == DX_ROWS && i + 1 < i1 && all_nonzero(g) && all_nonzero(g1)) {
                        axpy_rows2(d, d + t->w.cols, rows, g, g1, len);
                        i += 2;
                    } else {
                        axpy_rows(d, rows, g, nb, len);
                        i++;
                    }
                }
            }
        }
    }
}

/* ---- entries (the plain build) --------------------------------------------- */

#ifdef CPU_GEMM_PLAIN
/* The widest build that runs: AVX-512 (2) when the CPU has AVX512F, AVX2
 * (1) when it has AVX2, and GF_CPU_SIMD ("avx2", "baseline") does not hold
 * it back; else the plain build (0). Read at each call: test_ops compares
 * the builds. */
static int simd_level(void) {
#if defined(__x86_64__) && defined(__linux__)
    const char *e = getenv("GF_CPU_SIMD");
    if (e && strcmp(e, "baseline") == 0) return 0;
    if (!(e && strcmp(e, "avx2") == 0) && __builtin_cpu_supports("avx512f")) return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

CpuDots cpu_dots(void) {
#if defined(__x86_64__) && defined(__linux__)
    static const CpuDots builds[3] = {{cpu_dot, cpu_dot4}, {cpu_dot_avx2, cpu_dot4_avx2}, {cpu_dot_avx512, cpu_dot4_avx512}};
    return builds[simd_level()];
#else
    return (CpuDots){cpu_dot, cpu_dot4};
#endif
}

/* A task's three builds, where this platform compiles the wider ones
 * (cpu_gemm_avx2.c, cpu_gemm_avx512.c). */
#if defined(__x86_64__) && defined(__linux__)
#define TASKS(name) {name, name##_avx2, name##_avx512}
#else
#define TASKS(name) {name, NULL, NULL}
#endif

typedef void (*GemmTask)(void *, int, int);

static void run(const KnCtx *ctx, CpuMatmul *t, const GemmTask builds[3]) {
    int level = simd_level();
    while (level > 0 && !builds[level]) level--;
    GemmTask task = builds[level];
    if (t->w.rows * t->w.cols * t->n < CPU_PARALLEL_MIN_WORK || !ctx->pool) task(t, 0, 1);
    else kn_pool_run(ctx->pool, task, t);
}

void cpu_matmul_forward(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n) {
    CpuMatmul t = {y, x, w, n};
    static const GemmTask builds[3] = TASKS(cpu_matmul_task);
    run(ctx, &t, builds);
}

void cpu_matmul_backward(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n) {
    CpuMatmul t = {dx, dy, w, n};
    static const GemmTask builds[3] = TASKS(cpu_matmul_dx_task);
    run(ctx, &t, builds);
}
#endif
