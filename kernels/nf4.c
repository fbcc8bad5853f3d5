/* nf4.c - NF4 quantization with double-quantized absmax (see nf4.h). */
#include "nf4.h"

#include "convert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


/* The NF4 data type of the QLoRA paper (as bitsandbytes ships it). */
const float KN_NF4_CODE[16] = KN_NF4_CODE_VALUES;

/* The least float t_i for which code i + 1 is nearer than code i, as
 * nearest is computed: fabsf(t - code[i + 1]) < fabsf(t - code[i]). Each
 * comparison is monotone in v over the floats, so the nearest code of a v
 * in [-1, 1] is the number of t_i <= v (ties between two codes going to
 * the lower one). Found by bisection over the floats between the two
 * codes; test_nf4 checks each against that definition and the count
 * against the search over all 16 codes. */
static const float NEAREST_FROM[15] = {
    -0x1.b239bp-1f,  -0x1.38a4ep-1f,  -0x1.d708fep-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,
    -0x1.1a7176p-3f, -0x1.74f0ep-5f,  0x1.45f6p-5f,    0x1.ec90c6p-4f,  0x1.a0cfc2p-3f,
    0x1.2b05aap-2f,  0x1.8ea7f4p-2f,  0x1.00da08p-1f,  0x1.491b6p-1f,   0x1.b913b4p-1f};

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

/* The codes of x[0..n) (n <= KN_NF4_BLOCK), one block's share, whose
 * dequantized absmax is a, into code[0..n). Loops of a whole block's
 * fixed length without branches, which the compiler vectorizes. */
static void block_codes(const float *x, int64_t n, float a, uint8_t *code) {
    if (a == 0.0f) {
        memset(code, 7, (size_t)n); /* 7: zero */
        return;
    }
    float v[KN_NF4_BLOCK] = {0};
    uint8_t c[KN_NF4_BLOCK];
    memcpy(v, x, (size_t)n * sizeof *v);
    for (int k = 0; k < KN_NF4_BLOCK; k++) c[k] = nearest_code(v[k], a);
    memcpy(code, c, (size_t)n);
}

float kn_nf4_absmax(const KnNf4 *q, int64_t b) {
    return q->offset + (float)q->absmax_q[b] * q->group_scale[b / KN_NF4_GROUP];
}

void kn_nf4_free(KnNf4 *q) {
    if (!q) return;
    free(q->codes);
    free(q->absmax_q);
    free(q->group_scale);
    memset(q, 0, sizeof *q);
}

/* Where the share of row r that lies in one block ends: the column after
 * it, for the segment starting at column c. */
static int64_t segment_end(KnMatrix w, int64_t r, int64_t c) {
    int64_t b = (r * w.cols + c) / KN_NF4_BLOCK, end = (b + 1) * KN_NF4_BLOCK - r * w.cols;
    return end < w.cols ? end : w.cols;
}

/* Exact absmax of every block, from the source matrix. */
static void block_absmax(KnMatrix w, float *absmax, int64_t n_blocks, float *row) {
    for (int64_t b = 0; b < n_blocks; b++) absmax[b] = 0.0f;
    for (int64_t r = 0; r < w.rows; r++) {
        kn_convert_to_f32(row, w.data, w.dtype, r * w.cols, w.cols);
        for (int64_t c = 0, end; c < w.cols; c = end) {
            end = segment_end(w, r, c);
            float m = absmax[(r * w.cols + c) / KN_NF4_BLOCK];
            for (int64_t k = c; k < end; k++) {
                float a = fabsf(row[k]);
                m = a > m ? a : m; /* a NaN is passed over */
            }
            absmax[(r * w.cols + c) / KN_NF4_BLOCK] = m;
        }
    }
}

/* Row r's codes (code[0..cols)) into the packed codes: two a byte, the
 * even element low, the row starting at element r * cols. */
static void pack_row(uint8_t *codes, const uint8_t *code, int64_t r, int64_t cols) {
    int64_t e = r * cols, c = 0;
    if (e % 2 && cols > 0) codes[e++ / 2] |= (uint8_t)(code[c++] << 4);
    for (; c + 1 < cols; c += 2, e += 2) codes[e / 2] = (uint8_t)(code[c] | code[c + 1] << 4);
    if (c < cols) codes[e / 2] |= code[c]; /* its high nibble is the next row's */
}

/* Double quantization: mean offset, int8 per group of 256 with a scale. */
static void quantize_absmax(KnNf4 *q, const float *absmax) {
    double sum = 0.0;
    for (int64_t b = 0; b < q->n_blocks; b++) sum += absmax[b];
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

GfStatus kn_nf4_quantize(KnNf4 *q, KnMatrix w, GfError *err) {
    memset(q, 0, sizeof *q);
    if (w.dtype == KN_NF4 || w.rows <= 0 || w.cols <= 0)
        return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "cannot quantize this matrix to NF4");
    q->n = w.rows * w.cols;
    q->n_blocks = (q->n + KN_NF4_BLOCK - 1) / KN_NF4_BLOCK;
    q->n_groups = (q->n_blocks + KN_NF4_GROUP - 1) / KN_NF4_GROUP;
    q->codes = gf_calloc((size_t)(q->n + 1) / 2, 1, err);
    q->absmax_q = gf_malloc((size_t)q->n_blocks, err);
    q->group_scale = gf_malloc((size_t)q->n_groups * sizeof(float), err);
    float *absmax = gf_malloc((size_t)q->n_blocks * sizeof(float), err), *row = gf_malloc((size_t)w.cols * sizeof(float), err);
    uint8_t *code = gf_malloc((size_t)w.cols, err);
    if (!q->codes || !q->absmax_q || !q->group_scale || !absmax || !row || !code) {
        free(absmax);
        free(row);
        free(code);
        kn_nf4_free(q);
        return GF_NO_MEMORY;
    }
    block_absmax(w, absmax, q->n_blocks, row);
    quantize_absmax(q, absmax);
    for (int64_t r = 0; r < w.rows; r++) {
        kn_convert_to_f32(row, w.data, w.dtype, r * w.cols, w.cols);
        for (int64_t c = 0, end; c < w.cols; c = end) { /* the row's share of one block at a time */
            end = segment_end(w, r, c);
            block_codes(row + c, end - c, kn_nf4_absmax(q, (r * w.cols + c) / KN_NF4_BLOCK), code + c);
        }
        pack_row(q->codes, code, r, w.cols);
    }
    free(absmax);
    free(row);
    free(code);
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
