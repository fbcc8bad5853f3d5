/* nf4.c - NF4 quantization with double-quantized absmax (see nf4.h). */
#include "nf4.h"

#include "convert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


/* The NF4 data type of the QLoRA paper (as bitsandbytes ships it). */
const float KN_NF4_CODE[16] = KN_NF4_CODE_VALUES;

static const float NEAREST_FROM[15] = KN_NF4_NEAREST_FROM_VALUES;

/* The code nearest to w / a, the quotient clamped to [-1, 1] (NaN to 1). */
static inline uint8_t nearest_code(float w, float a) {
    float v = w / a;
    v = v < -1.0f ? -1.0f : v;
    v = v <= 1.0f ? v : 1.0f; /* NaN too */
    const float *t = NEAREST_FROM; /* the 15 comparisons written out: one straight line to vectorize */
    return (uint8_t)((v >= t[0]) + (v >= t[1]) + (v >= t[2]) + (v >= t[3]) + (v >= t[4]) + (v >= t[5]) + (v >= t[6]) +
                     (v >= t[7]) + (v >= t[8]) + (v >= t[9]) + (v >= t[10]) + (v >= t[11]) + (v >= t[12]) +
                     (v >= t[13]) + (v >= t[14]));
}

uint8_t kn_nf4_nearest(float w, float a) { return a != 0.0f ? nearest_code(w, a) : 7; /* 7: zero */ }

/* The codes of a block's values x (zero past its end), whose dequantized
 * absmax is a: a loop of the block's fixed length without branches, which
 * the compiler vectorizes. */
static void block_codes(const float x[KN_NF4_BLOCK], float a, uint8_t code[KN_NF4_BLOCK]) {
    if (a == 0.0f) {
        memset(code, 7, KN_NF4_BLOCK); /* 7: zero */
        return;
    }
    for (int k = 0; k < KN_NF4_BLOCK; k++) code[k] = nearest_code(x[k], a);
}

void kn_nf4_free(KnNf4 *q) {
    if (!q) return;
    free(q->codes);
    free(q->absmax_q);
    free(q->group_scale);
    memset(q, 0, sizeof *q);
}

void kn_nf4_shape(KnNf4 *q, int64_t n) {
    q->n = n;
    q->n_blocks = (n + KN_NF4_BLOCK - 1) / KN_NF4_BLOCK;
    q->n_groups = (q->n_blocks + KN_NF4_GROUP - 1) / KN_NF4_GROUP;
}

size_t kn_nf4_scratch_bytes(int64_t n) {
    KnNf4 q;
    kn_nf4_shape(&q, n);
    return kn_nf4_scratch_sums(q.n_blocks) + (size_t)(q.n_groups + 1) * sizeof(double);
}

/* Block b of w's n elements widened into x, zeros past the end of w; the
 * count of its elements. */
static int64_t block_load(KnMatrix w, int64_t n, int64_t b, float x[KN_NF4_BLOCK]) {
    int64_t e = b * KN_NF4_BLOCK, len = n - e < KN_NF4_BLOCK ? n - e : KN_NF4_BLOCK;
    kn_convert_to_f32(x, w.data, w.dtype, e, len);
    memset(x + len, 0, (size_t)(KN_NF4_BLOCK - len) * sizeof *x);
    return len;
}

/* Exact absmax of every block, from the source matrix. */
static void block_absmax(KnMatrix w, int64_t n, int64_t n_blocks, float *absmax) {
    float x[KN_NF4_BLOCK];
    for (int64_t b = 0; b < n_blocks; b++) {
        block_load(w, n, b, x);
        float m = 0.0f;
        for (int k = 0; k < KN_NF4_BLOCK; k++) {
            float a = fabsf(x[k]);
            m = a > m ? a : m; /* a NaN is passed over */
        }
        absmax[b] = m;
    }
}

/* Double quantization: mean offset (summed per group, then over the
 * groups, in double), int8 per group of 256 with a scale. */
static void quantize_absmax(KnNf4 *q, const float *absmax, double *sums) {
    for (int64_t g = 0; g < q->n_groups; g++) {
        int64_t lo = g * KN_NF4_GROUP, hi = lo + KN_NF4_GROUP < q->n_blocks ? lo + KN_NF4_GROUP : q->n_blocks;
        double s = 0.0;
        for (int64_t b = lo; b < hi; b++) s += absmax[b];
        sums[g] = s;
    }
    double sum = 0.0;
    for (int64_t g = 0; g < q->n_groups; g++) sum += sums[g];
    q->offset = (float)(sum / (double)q->n_blocks);
    for (int64_t g = 0; g < q->n_groups; g++) {
        int64_t lo = g * KN_NF4_GROUP, hi = lo + KN_NF4_GROUP < q->n_blocks ? lo + KN_NF4_GROUP : q->n_blocks;
        float mx = 0.0f;
        for (int64_t b = lo; b < hi; b++) mx = fmaxf(mx, fabsf(absmax[b] - q->offset));
        q->group_scale[g] = mx / 127.0f;
        for (int64_t b = lo; b < hi; b++) {
            float v = q->group_scale[g] > 0 ? (absmax[b] - q->offset) / q->group_scale[g] : 0.0f;
            q->absmax_q[b] = (int8_t)lrintf(fmaxf(-127.0f, fminf(127.0f, v)));
        }
    }
}

void kn_nf4_quantize_into(KnNf4 *q, KnMatrix w, void *scratch) {
    float *absmax = scratch, x[KN_NF4_BLOCK];
    block_absmax(w, q->n, q->n_blocks, absmax);
    quantize_absmax(q, absmax, (double *)((char *)scratch + kn_nf4_scratch_sums(q->n_blocks)));
    uint8_t code[KN_NF4_BLOCK];
    for (int64_t b = 0; b < q->n_blocks; b++) { /* blocks start at even elements: two codes a byte */
        int64_t len = block_load(w, q->n, b, x);
        block_codes(x, kn_nf4_absmax(q, b), code);
        uint8_t *out = q->codes + b * (KN_NF4_BLOCK / 2);
        for (int64_t k = 0; k < len; k += 2) out[k / 2] = (uint8_t)(code[k] | (k + 1 < len ? code[k + 1] << 4 : 0));
    }
}

GfStatus kn_nf4_quantize(KnNf4 *q, KnMatrix w, GfError *err) {
    memset(q, 0, sizeof *q);
    if (w.dtype == KN_NF4 || w.rows <= 0 || w.cols <= 0)
        return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "cannot quantize this matrix to NF4");
    kn_nf4_shape(q, w.rows * w.cols);
    q->codes = gf_malloc((size_t)(q->n + 1) / 2, err);
    q->absmax_q = gf_malloc((size_t)q->n_blocks, err);
    q->group_scale = gf_malloc((size_t)q->n_groups * sizeof(float), err);
    void *scratch = gf_malloc(kn_nf4_scratch_bytes(q->n), err);
    if (!q->codes || !q->absmax_q || !q->group_scale || !scratch) {
        free(scratch);
        kn_nf4_free(q);
        return GF_NO_MEMORY;
    }
    kn_nf4_quantize_into(q, w, scratch);
    free(scratch);
    return GF_OK;
}

void kn_nf4_dequantize(const KnNf4 *q, int64_t start, int64_t len, float *out) {
    int64_t e = start, end = start + len;
    while (e < end) {
        int64_t b = e / KN_NF4_BLOCK, stop = (b + 1) * KN_NF4_BLOCK < end ? (b + 1) * KN_NF4_BLOCK : end;
        float a = kn_nf4_absmax(q, b);
        for (; e < stop; e++) {
            uint8_t byte = q->codes[e / 2];
            *out++ = KN_NF4_CODE[e % 2 ? byte >> 4 : byte & 15] * a;
        }
    }
}

KnMatrix kn_nf4_matrix(const KnNf4 *q, int64_t offset, int64_t rows, int64_t cols) {
    return (KnMatrix){.data = q, .dtype = KN_NF4, .rows = rows, .cols = cols, .offset = offset};
}
