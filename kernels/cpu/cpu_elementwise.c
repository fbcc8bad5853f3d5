/* cpu_elementwise.c - the small ops between the big ones: residual adds,
 * products, scales, RoPE over many rows, the paged KV store and embedding
 * gathers. Plain loops; every element is computed exactly as the engine's
 * loops computed it before they moved here. */
#include <math.h>
#include <string.h>

#include "../convert.h"
#include "cpu_impl.h"

/* ---- tanh ----------------------------------------------------------------- */

/* Two doubles, and their bits (one SSE2 register). The bits are unsigned,
 * so that their shifts and sums wrap (a NaN's too) rather than overflow. */
typedef double D2 __attribute__((vector_size(16)));
typedef uint64_t U2 __attribute__((vector_size(16)));

static inline D2 d2_splat(double v) { return (D2){v, v}; }
static inline U2 d2_bits(D2 v) {
    U2 b;
    memcpy(&b, &v, sizeof b);
    return b;
}
static inline D2 d2_from_bits(U2 b) {
    D2 v;
    memcpy(&v, &b, sizeof v);
    return v;
}
/* lanes of a where the comparison m holds (all ones), else of b */
static inline D2 d2_select(__typeof__(d2_splat(0) < d2_splat(0)) m, D2 a, D2 b) {
    U2 mu = (U2)m;
    return d2_from_bits((d2_bits(a) & mu) | (d2_bits(b) & ~mu));
}

/* 1 / k! for k <= 12 */
static const double INV_FACT[13] = {1.0,          1.0,           1.0 / 2,         1.0 / 6,        1.0 / 24,
                                    1.0 / 120,    1.0 / 720,     1.0 / 5040,      1.0 / 40320,    1.0 / 362880,
                                    1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600};

/* tanh of two lanes in double:
 *   |x| < 2^-10: x - x^3 / 3 (the next term, 2 x^5 / 15, is below 2^-42 of x);
 *   else 1 - 2 / (e^2|x| + 1), with e^z = 2^n e^r, n = round(z / ln 2),
 *   r = z - n ln 2 (ln 2 in two parts, the first exact times n), e^r by
 *   its Taylor series to r^12 (|r| <= ln 2 / 2: the rest is below 2^-47);
 *   |x| is held to 9.5, where tanh rounds to 1 in float; the sign of x is
 *   put back last, so -0 stays -0 and NaN stays NaN. Only +, -, * and /
 *   on doubles and bit operations: the same bits on every machine. */
static D2 tanh2(D2 x) {
    const U2 sign = {1ull << 63, 1ull << 63};
    D2 a = d2_from_bits(d2_bits(x) & ~sign);
    a = d2_select(a > d2_splat(9.5), d2_splat(9.5), a);
    D2 z = a + a;
    const D2 shifter = d2_splat(0x1.8p52); /* adding it rounds to an integer, kept in the low bits */
    D2 t = z * d2_splat(1.4426950408889634) + shifter;
    D2 n = t - shifter;
    U2 ni = d2_bits(t) - d2_bits(shifter);
    D2 r = (z - n * d2_splat(6.93147180369123816490e-01)) - n * d2_splat(1.90821492927058770002e-10);
    D2 p = d2_splat(INV_FACT[12]);
    for (int k = 11; k >= 0; k--) p = p * r + d2_splat(INV_FACT[k]);
    D2 e = d2_from_bits(d2_bits(p) + (ni << 52));
    D2 big = d2_splat(1.0) - d2_splat(2.0) / (e + d2_splat(1.0));
    D2 small = a - a * a * a / d2_splat(3.0);
    D2 th = d2_select(a < d2_splat(0x1p-10), small, big);
    return d2_from_bits(d2_bits(th) | (d2_bits(x) & sign));
}

void cpu_tanh_block(float *th, const float *x, int n) {
    int i = 0;
    for (; i + 2 <= n; i += 2) {
        D2 t = tanh2((D2){x[i], x[i + 1]});
        th[i] = (float)t[0];
        th[i + 1] = (float)t[1];
    }
    if (i < n) th[i] = (float)tanh2((D2){x[i], 0.0})[0];
}

/* ---- splitting over the pool -------------------------------------------- */

typedef struct {
    CpuRangeFn fn;
    void *arg;
    int64_t n;
} RangeTask;

static void range_task(void *p, int ith, int nth) {
    const RangeTask *t = p;
    long lo, hi;
    kn_split((long)t->n, ith, nth, &lo, &hi);
    if (hi > lo) t->fn(t->arg, lo, hi);
}

void cpu_for_range(const KnCtx *ctx, int64_t n, int64_t cost, CpuRangeFn fn, void *arg) {
    if (n <= 0) return;
    if (!ctx || !ctx->pool || n < 2 || n * cost < CPU_PARALLEL_MIN_WORK) {
        fn(arg, 0, n);
        return;
    }
    RangeTask t = {fn, arg, n};
    kn_pool_run(ctx->pool, range_task, &t);
}

typedef struct {
    float *y;
    const float *a, *b;
} AddArgs;

static void add_span(void *p, int64_t lo, int64_t hi) {
    const AddArgs *e = p;
    for (int64_t i = lo; i < hi; i++) e->y[i] = e->a[i] + e->b[i];
}

void cpu_add_forward(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n) {
    AddArgs e = {y, a, b};
    cpu_for_range(ctx, (int64_t)n, 1, add_span, &e);
}

void cpu_mul_forward(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                     int64_t ld_b) {
    (void)ctx;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) y[r * cols + c] = a[r * cols + c] * b[r * ld_b + c];
}

void cpu_scale_forward(const KnCtx *ctx, float *x, size_t n, float s) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

void cpu_round_bf16_forward(const KnCtx *ctx, uint16_t *kept, float *x, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        kept[i] = kn_f32_to_bf16(x[i]);
        x[i] = kn_bf16_to_f32(kept[i]);
    }
}

void cpu_widen_bf16_forward(const KnCtx *ctx, float *y, const uint16_t *x, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) y[i] = kn_bf16_to_f32(x[i]);
}

/* One head's half-split rotation at position pos. */
static void rope_head(float *xh, int dim, const float *inv_freq, int32_t pos) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        if (inv_freq[i] == 0.0f) continue; /* cos 1, sin 0 */
        float theta = (float)pos * inv_freq[i];
        float c = cosf(theta), s = sinf(theta);
        float a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
    }
}

typedef struct {
    float *x;
    int n_heads, dim;
    int64_t ld_head, pos_stride;
    const float *inv_freq;
    const int32_t *pos;
} RopeArgs;

static void rope_span(void *p, int64_t lo, int64_t hi) {
    const RopeArgs *e = p;
    for (int64_t r = lo; r < hi; r++)
        for (int h = 0; h < e->n_heads; h++)
            rope_head(e->x + (r * e->n_heads + h) * e->ld_head, e->dim, e->inv_freq, e->pos[r * e->pos_stride]);
}

void cpu_rope_rows_forward(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                           const float *inv_freq, const int32_t *pos, int64_t pos_stride) {
    RopeArgs e = {x, n_heads, dim, ld_head, pos_stride, inv_freq, pos};
    cpu_for_range(ctx, n_rows, (int64_t)n_heads * dim * 16, rope_span, &e); /* a sine and a cosine a pair */
}

void cpu_embed_rows_forward(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) {
        float *o = out + i * table.cols;
        cpu_load_span(o, table, ids[i], 0, table.cols);
        for (int64_t c = 0; c < table.cols; c++) o[c] *= scale;
    }
}

void cpu_mul_acc_forward(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                         int64_t ld_y) {
    (void)ctx;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) y[r * ld_y + c] += a[r * cols + c] * b[r * cols + c];
}

void cpu_rows_gather_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++)
        if (idx[i] >= 0) memcpy(out + i * dim, src + (int64_t)idx[i] * dim, (size_t)dim * sizeof(float));
}

void cpu_rows_scatter_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++)
        if (idx[i] >= 0) memcpy(out + (int64_t)idx[i] * dim, src + i * dim, (size_t)dim * sizeof(float));
}

void cpu_rows_scatter_bf16_forward(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                                   int64_t dim) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0) continue;
        uint16_t *o = out + (int64_t)idx[i] * dim;
        for (int64_t j = 0; j < dim; j++) o[j] = kn_f32_to_bf16(src[i * dim + j]);
    }
}

void cpu_rows_sum_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] < 0) continue;
        float *o = out + (int64_t)idx[i] * dim;
        for (int64_t j = 0; j < dim; j++) o[j] += src[i * dim + j];
    }
}

void cpu_embed_rows_add_forward(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n,
                                float *row) {
    (void)ctx;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0) continue;
        cpu_load_span(row, table, ids[i], 0, table.cols);
        for (int64_t c = 0; c < table.cols; c++) out[i * table.cols + c] += row[c];
    }
}

void cpu_clamp_forward(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) y[i] = x[i] < lo ? lo : x[i] > hi ? hi : x[i];
}

void cpu_clamp_backward(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                        int accumulate) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        float g = x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
        if (accumulate) dx[i] += g;
        else dx[i] = g;
    }
}

void cpu_scale_shift_forward(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) y[i] = (x[i] + shift) * s;
}

void cpu_standardize_forward(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias,
                             const float *scale) {
    (void)ctx;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) x[r * cols + c] = (x[r * cols + c] - bias[c]) * scale[c];
}
