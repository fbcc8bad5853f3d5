/* nf4.c - NF4 quantization with double-quantized absmax (see nf4.h). */
#include "nf4.h"

#include "convert.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


/* The NF4 data type of the QLoRA paper (as bitsandbytes ships it). */
const float KN_NF4_CODE[16] = KN_NF4_CODE_VALUES;

/* The code nearest to v (v in [-1, 1] or clamped to it). */
static uint8_t nearest_code(float v) {
    uint8_t best = 0;
    float bd = fabsf(v - KN_NF4_CODE[0]);
    for (uint8_t c = 1; c < 16; c++) {
        float d = fabsf(v - KN_NF4_CODE[c]);
        if (d < bd) { bd = d; best = c; }
    }
    return best;
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

/* Exact absmax of every block, from the source matrix. */
static void block_absmax(KnMatrix w, float *absmax, int64_t n_blocks, float *row) {
    for (int64_t b = 0; b < n_blocks; b++) absmax[b] = 0.0f;
    for (int64_t r = 0; r < w.rows; r++) {
        kn_convert_to_f32(row, w.data, w.dtype, r * w.cols, w.cols);
        for (int64_t c = 0; c < w.cols; c++) {
            int64_t b = (r * w.cols + c) / KN_NF4_BLOCK;
            float a = fabsf(row[c]);
            if (a > absmax[b]) absmax[b] = a;
        }
    }
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
    if (!q->codes || !q->absmax_q || !q->group_scale || !absmax || !row) {
        free(absmax);
        free(row);
        kn_nf4_free(q);
        return GF_NO_MEMORY;
    }
    block_absmax(w, absmax, q->n_blocks, row);
    quantize_absmax(q, absmax);
    for (int64_t r = 0; r < w.rows; r++) {
        kn_convert_to_f32(row, w.data, w.dtype, r * w.cols, w.cols);
        for (int64_t c = 0; c < w.cols; c++) {
            int64_t e = r * w.cols + c;
            float a = kn_nf4_absmax(q, e / KN_NF4_BLOCK);
            uint8_t code = a != 0.0f ? nearest_code(fmaxf(-1.0f, fminf(1.0f, row[c] / a))) : 7; /* 7: zero */
            q->codes[e / 2] |= (uint8_t)(e % 2 ? code << 4 : code);
        }
    }
    free(absmax);
    free(row);
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
