/* test_ops.c - every KnOps entry of the CPU backend against a plain
 * double-precision reference written from the definitions, on random and odd
 * shapes, single- and multi-threaded. Reports the max error relative to
 * max |ref| and the worst index. (The CUDA backend joins this test when it
 * lands: same inputs, compared with the CPU results.) */
#include <math.h>
#include <stdlib.h>

#include "../unit/check.h"
#include "ops.h"

static uint64_t rng = 0x243F6A8885A308D3ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static float *rand_vec(size_t n) {
    float *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = frand();
    return v;
}

static double rel_err(const float *got, const double *ref, size_t n, size_t *worst) {
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - ref[i]);
        if (d > e || isnan(d)) { e = isnan(d) ? INFINITY : d; *worst = i; }
        if (fabs(ref[i]) > m) m = fabs(ref[i]);
    }
    return m > 0 ? e / m : e;
}

#define EXPECT_CLOSE(got, ref, n, limit, what, ...)                                              \
    do {                                                                                         \
        size_t w_ = 0;                                                                           \
        double r_ = rel_err(got, ref, n, &w_);                                                   \
        CHECK(r_ <= (limit), what ": rel err %.3g at #%zu (got %g, ref %g)", __VA_ARGS__, r_, w_, \
              (double)(got)[w_], (ref)[w_]);                                                     \
    } while (0)

static void test_matmul(const KnOps *ops, KnCtx *ctx) {
    int shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {17, 33, 9}, {64, 128, 4}, {5, 5000, 3}, {300, 64, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        float *wf = rand_vec((size_t)rows * cols), *x = rand_vec((size_t)n * cols);
        uint16_t *wb = malloc((size_t)rows * cols * 2);
        for (int i = 0; i < rows * cols; i++) { wb[i] = kn_f32_to_bf16(wf[i]); wf[i] = kn_bf16_to_f32(wb[i]); }
        double *ref = malloc((size_t)n * rows * sizeof *ref);
        for (int i = 0; i < n; i++)
            for (int o = 0; o < rows; o++) {
                double acc = 0;
                for (int k = 0; k < cols; k++) acc += (double)x[i * cols + k] * wf[o * cols + k];
                ref[i * rows + o] = acc;
            }
        float *y = malloc((size_t)n * rows * sizeof *y);
        KnMatrix mf = {wf, KN_F32, rows, cols}, mb = {wb, KN_BF16, rows, cols};
        ops->matmul(ctx, y, x, mf, n);
        EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "matmul f32 %dx%d n=%d", rows, cols, n);
        ops->matmul(ctx, y, x, mb, n);
        EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "matmul bf16 %dx%d n=%d", rows, cols, n);
        free(wf); free(wb); free(x); free(ref); free(y);
    }
}

static void test_rmsnorm_gelu_softcap(const KnOps *ops, KnCtx *ctx) {
    int n = 7, dim = 33;
    float *x = rand_vec((size_t)n * dim), *w = rand_vec((size_t)dim), *y = malloc((size_t)n * dim * sizeof *y);
    double *ref = malloc((size_t)n * dim * sizeof *ref);
    for (int r = 0; r < n; r++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        double inv = 1.0 / sqrt(ss / dim + 1e-6);
        for (int i = 0; i < dim; i++) ref[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
    ops->rmsnorm(ctx, y, x, w, n, dim, 1e-6f);
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "rmsnorm%s", " (weight used as is)");
    for (int i = 0; i < n * dim; i++) ref[i] /= w[i % dim];
    ops->rmsnorm(ctx, y, x, NULL, n, dim, 1e-6f);
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "rmsnorm%s", " without weight");
    for (int i = 0; i < n * dim; i++) {
        double v = 3.0 * x[i];
        y[i] = (float)v;
        ref[i] = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    }
    ops->gelu_tanh(y, (size_t)(n * dim));
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "gelu%s", "");
    for (int i = 0; i < n * dim; i++) { y[i] = 80 * x[i]; ref[i] = 30 * tanh(80.0 * x[i] / 30); }
    ops->softcap(y, (size_t)(n * dim), 30.0f);
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "softcap%s", "");
    free(x); free(w); free(y); free(ref);
}

/* Half-split rotation; the inverse frequencies carry the proportional zeros. */
static void test_rope(const KnOps *ops) {
    int heads = 3, dim = 32;
    float inv[16];
    for (int i = 0; i < 16; i++) inv[i] = i < 4 ? (float)pow(1e6, -2.0 * i / dim) : 0.0f;
    float *x = rand_vec((size_t)heads * dim), *y = malloc((size_t)heads * dim * sizeof *y);
    double ref[96];
    int64_t pos = 1234;
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < dim / 2; i++) {
            double th = (double)((float)pos * inv[i]), a = x[h * dim + i], b = x[h * dim + i + dim / 2];
            ref[h * dim + i] = a * cos(th) - b * sin(th);
            ref[h * dim + i + dim / 2] = b * cos(th) + a * sin(th);
        }
    memcpy(y, x, (size_t)heads * dim * sizeof *y);
    ops->rope(y, heads, dim, inv, pos);
    EXPECT_CLOSE(y, ref, (size_t)heads * dim, 1e-4, "rope%s", " proportional");
    CHECK(y[10] == x[10] && y[dim / 2 + 10] == x[dim / 2 + 10], "dimensions with zero frequency pass through");
    free(x); free(y);
}

/* Attention with GQA, a window, padding and one bidirectional block. */
static void test_attention(const KnOps *ops, KnCtx *ctx) {
    int nq = 9, pos0 = 3, nk = 12, H = 4, KVH = 2, D = 8, W = 4;
    float *q = rand_vec((size_t)nq * H * D), *k = rand_vec((size_t)nk * KVH * D), *v = rand_vec((size_t)nk * KVH * D);
    uint8_t valid[12] = {1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1};
    int32_t group[12] = {-1, -1, -1, -1, 0, 0, 0, 0, 0, -1, -1, -1};
    for (int variant = 0; variant < 3; variant++) {
        KnMask m = {valid, variant == 2 ? group : NULL, variant == 0 ? 0 : W};
        double *ref = calloc((size_t)nq * H * D, sizeof *ref);
        for (int i = 0; i < nq; i++)
            for (int h = 0; h < H; h++) {
                int qp = pos0 + i, g = h / (H / KVH);
                double s[12], mx = -INFINITY, sum = 0;
                for (int t = 0; t < nk; t++) {
                    int causal = t <= qp || (m.group && group[qp] >= 0 && group[qp] == group[t]);
                    int ok = valid[t] && causal && (!m.window || t > qp - m.window);
                    s[t] = -INFINITY;
                    if (!ok) continue;
                    s[t] = 0;
                    for (int d = 0; d < D; d++) s[t] += (double)q[(i * H + h) * D + d] * k[(t * KVH + g) * D + d];
                    s[t] *= 0.5;
                    if (s[t] > mx) mx = s[t];
                }
                for (int t = 0; t < nk; t++) sum += s[t] == -INFINITY ? 0 : exp(s[t] - mx);
                for (int t = 0; t < nk; t++)
                    if (s[t] != -INFINITY)
                        for (int d = 0; d < D; d++) ref[(i * H + h) * D + d] += exp(s[t] - mx) / sum * v[(t * KVH + g) * D + d];
            }
        float *out = malloc((size_t)nq * H * D * sizeof *out);
        ops->attention(ctx, out, q, k, v, nq, pos0, nk, H, KVH, D, 0.5f, &m);
        EXPECT_CLOSE(out, ref, (size_t)nq * H * D, 1e-5, "attention variant %d (0 causal, 1 window, 2 window+block)", variant);
        free(out);
        free(ref);
    }
    free(q); free(k); free(v);
}

static void test_conversions(void) {
    CHECK(kn_f32_to_bf16(1.0f) == 0x3F80 && kn_bf16_to_f32(0x3F80) == 1.0f, "bf16 one");
    CHECK(kn_f32_to_bf16(1.00390625f) == 0x3F80, "round to nearest even (tie down)");
    CHECK(kn_f32_to_bf16(1.01171875f) == 0x3F82, "round to nearest even (tie up)");
    CHECK(kn_f16_to_f32(0x3C00) == 1.0f && kn_f16_to_f32(0xC000) == -2.0f && kn_f16_to_f32(0x0001) == ldexpf(1, -24), "f16");
    CHECK(isnan(kn_bf16_to_f32(kn_f32_to_bf16(NAN))), "NaN stays NaN");
}

int main(void) {
    const KnOps *ops = kn_cpu_ops();
    test_conversions();
    GfError err;
    for (int threads = 1; threads <= 3; threads += 2) {
        KnCtx ctx = {KN_DEVICE_CPU, kn_pool_new(threads, &err)};
        test_matmul(ops, &ctx);
        test_rmsnorm_gelu_softcap(ops, &ctx);
        test_attention(ops, &ctx);
        kn_pool_free(ctx.pool);
    }
    test_rope(ops);
    return check_done("test_ops");
}
