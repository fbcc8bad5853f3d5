/* test_nf4.c - NF4 quantization: the code book, the round-trip error within
 * the bound the code book and the double-quantized absmax imply (element by
 * element), and matmuls on NF4 weights equal to matmuls on the dequantized
 * matrix (forward, input gradient, a row slice as for one expert). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "nf4.h"
#include "convert.h"
#include "kernels.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static double urand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
}
static float gauss(void) { return (float)(sqrt(-2 * log(urand())) * cos(2 * M_PI * urand())); }

static double half_gap(void) {
    double g = 0;
    for (int i = 0; i + 1 < 16; i++) g = fmax(g, (KN_NF4_CODE[i + 1] - KN_NF4_CODE[i]) / 2.0);
    return g;
}

static void test_code_book(void) {
    int sorted = 1;
    for (int i = 0; i + 1 < 16; i++) sorted &= KN_NF4_CODE[i] < KN_NF4_CODE[i + 1];
    CHECK(sorted && KN_NF4_CODE[0] == -1.0f && KN_NF4_CODE[7] == 0.0f && KN_NF4_CODE[15] == 1.0f,
          "NF4 code book: 16 increasing values from -1 to 1 with an exact zero");
    CHECK(fabs(half_gap() - (1.0 - 0.6961928009986877) / 2) < 1e-7, "widest gap is between -1 and the next code");
}

/* Round trip of a rows x cols matrix (blocks straddle rows; several absmax groups). */
static void test_round_trip(int rows, int cols, int outliers) {
    int64_t n = (int64_t)rows * cols;
    float *w = malloc((size_t)n * sizeof *w), *back = malloc((size_t)n * sizeof *back);
    for (int64_t i = 0; i < n; i++) w[i] = 0.02f * gauss();
    if (outliers)
        for (int64_t i = 0; i < n; i += 97) w[i] *= 40.0f;
    KnNf4 q;
    GfError err;
    KnMatrix m = {w, KN_F32, rows, cols, 0, 0};
    CHECK(kn_nf4_quantize(&q, m, &err) == GF_OK, "quantize %dx%d", rows, cols);
    CHECK(q.n_blocks == (n + 63) / 64 && q.n_groups == (q.n_blocks + 255) / 256, "block and group counts");
    kn_nf4_dequantize(&q, 0, n, back);
    double hg = half_gap(), worst = 0, sum_err = 0, sum_abs = 0;
    int64_t bad = -1;
    for (int64_t b = 0; b < q.n_blocks; b++) {
        float exact = 0;
        for (int64_t i = b * 64; i < n && i < (b + 1) * 64; i++) exact = fmaxf(exact, fabsf(w[i]));
        float a = kn_nf4_absmax(&q, b), da = fabsf(a - exact);
        if (da > q.group_scale[b / 256] * 0.5f * 1.0001f + 1e-12f) bad = b;
        for (int64_t i = b * 64; i < n && i < (b + 1) * 64; i++) {
            double e = fabs((double)w[i] - back[i]), bound = fabs(a) * hg + da + 1e-7 * exact;
            if (e > bound && bad < 0) bad = b;
            worst = fmax(worst, e / (fabs(a) * hg + da));
            sum_err += e;
            sum_abs += fabs(w[i]);
        }
    }
    double total = 0; /* the mean as nf4.h defines it: each group's absmax in order, then the groups */
    for (int64_t g = 0; g < q.n_groups; g++) {
        double gs = 0;
        for (int64_t b = g * 256; b < q.n_blocks && b < (g + 1) * 256; b++) {
            float exact = 0;
            for (int64_t i = b * 64; i < n && i < (b + 1) * 64; i++) exact = fmaxf(exact, fabsf(w[i]));
            gs += exact;
        }
        total += gs;
    }
    float mean = (float)(total / (double)q.n_blocks);
    CHECK(!memcmp(&mean, &q.offset, sizeof mean), "the mean absmax summed per group, then over the groups (%dx%d)",
          rows, cols);
    CHECK(bad < 0, "round trip within |absmax'| * half gap + |absmax - absmax'| (%dx%d, outliers %d): first bad block %lld",
          rows, cols, outliers, (long long)bad);
    printf("  nf4 %dx%d%s: mean |error| / mean |w| = %.4f, worst error / bound = %.3f\n", rows, cols,
           outliers ? " with outliers" : "", sum_err / sum_abs, worst);
    kn_nf4_free(&q);
    free(w);
    free(back);
}

/* The nearest code as defined: the first of the 16 at the least distance. */
static uint8_t nearest_ref(float w, float a) {
    if (a == 0.0f) return 7;
    float v = fmaxf(-1.0f, fminf(1.0f, w / a));
    uint8_t best = 0;
    float bd = fabsf(v - KN_NF4_CODE[0]);
    for (uint8_t c = 1; c < 16; c++) {
        float d = fabsf(v - KN_NF4_CODE[c]);
        if (d < bd) { bd = d; best = c; }
    }
    return best;
}

/* kn_nf4_nearest (a threshold count) against the search over the 16 codes:
 * every float within 2^16 ulps of each midpoint between two codes, at the
 * codes themselves and at +-1, random quotients, NaN, infinities and a
 * zero absmax. (The same comparison over every float of [-1, 1] agreed
 * when the thresholds were found; it takes too long for each test run.) */
static void test_nearest(void) {
    long bad = 0, n = 0;
    for (int i = 0; i < 15; i++) {
        float mid = (KN_NF4_CODE[i] + KN_NF4_CODE[i + 1]) / 2, v = mid;
        for (int k = 0; k < 65536; k++) v = nextafterf(v, -2.0f);
        for (int k = 0; k < 2 * 65536; k++, n++, v = nextafterf(v, 2.0f)) bad += kn_nf4_nearest(v, 1.0f) != nearest_ref(v, 1.0f);
    }
    for (int c = 0; c < 16; c++, n++) bad += kn_nf4_nearest(KN_NF4_CODE[c], 1.0f) != c;
    for (int k = 0; k < 1000000; k++, n++) {
        float w = gauss(), a = 0.01f + 2.0f * (float)urand();
        bad += kn_nf4_nearest(w, a) != nearest_ref(w, a);
    }
    const float odd[] = {NAN, -NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1.0f, -1.0f, 3.0f, -3.0f, 1e-30f, -1e-30f};
    for (size_t k = 0; k < sizeof odd / sizeof *odd; k++, n += 3)
        bad += (kn_nf4_nearest(odd[k], 1.0f) != nearest_ref(odd[k], 1.0f)) + (kn_nf4_nearest(odd[k], -0.5f) != nearest_ref(odd[k], -0.5f)) +
               (kn_nf4_nearest(odd[k], 0.0f) != 7);
    CHECK(bad == 0, "nearest code by thresholds equals the search over the code book (%ld of %ld differ)", bad, n);
}

/* Every packed code of a rows x cols quantization (odd widths: rows start
 * in mid-byte) equals the nearest code of its weight under its block's
 * dequantized absmax; NaN weights and an all-zero block included. */
static void test_codes(int rows, int cols) {
    int64_t n = (int64_t)rows * cols;
    float *w = malloc((size_t)n * sizeof *w);
    for (int64_t i = 0; i < n; i++) w[i] = 0.05f * gauss();
    for (int64_t i = 0; i < n && i < 64; i++) w[i] = 0.0f; /* block 0: zero */
    if (n > 200) w[200] = NAN;
    KnNf4 q;
    GfError err;
    CHECK(kn_nf4_quantize(&q, (KnMatrix){w, KN_F32, rows, cols, 0, 0}, &err) == GF_OK, "quantize %dx%d", rows, cols);
    int64_t bad = -1;
    for (int64_t e = 0; e < n && bad < 0; e++) {
        uint8_t byte = q.codes[e / 2], got = e % 2 ? byte >> 4 : byte & 15;
        if (got != nearest_ref(w[e], kn_nf4_absmax(&q, e / 64))) bad = e;
    }
    CHECK(bad < 0, "%dx%d: every code is the nearest (first wrong element %lld)", rows, cols, (long long)bad);
    CHECK(n % 2 == 0 || (q.codes[n / 2] >> 4) == 0, "%dx%d: the last byte's unused nibble is zero", rows, cols);
    kn_nf4_free(&q);
    free(w);
}

static double max_rel(const float *a, const float *b, size_t n) {
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) { e = fmax(e, fabs(a[i] - b[i])); m = fmax(m, fabs(b[i])); }
    return m > 0 ? e / m : e;
}

static void test_matmul(const KnOps *ops, KnCtx *ctx) {
    int rows = 96, cols = 200, n = 5; /* 200 columns: rows start mid-block */
    float *w = malloc((size_t)rows * cols * sizeof *w), *deq = malloc((size_t)rows * cols * sizeof *deq);
    for (int i = 0; i < rows * cols; i++) w[i] = gauss();
    KnNf4 q;
    GfError err;
    CHECK(kn_nf4_quantize(&q, (KnMatrix){w, KN_F32, rows, cols, 0, 0}, &err) == GF_OK, "quantize");
    kn_nf4_dequantize(&q, 0, (int64_t)rows * cols, deq);
    float *x = malloc((size_t)n * cols * sizeof *x), *dy = malloc((size_t)n * rows * sizeof *dy);
    for (int i = 0; i < n * cols; i++) x[i] = gauss();
    for (int i = 0; i < n * rows; i++) dy[i] = gauss();
    float *y4 = malloc((size_t)n * rows * sizeof *y4), *yf = malloc((size_t)n * rows * sizeof *yf);
    KnMatrix m4 = kn_nf4_matrix(&q, 0, rows, cols), mf = {deq, KN_F32, rows, cols, 0, 0};
    ops->matmul(ctx, y4, x, m4, n);
    ops->matmul(ctx, yf, x, mf, n);
    CHECK(max_rel(y4, yf, (size_t)n * rows) < 1e-6, "NF4 matmul equals dequantize-then-matmul");
    float *dx4 = calloc((size_t)n * cols, sizeof *dx4), *dxf = calloc((size_t)n * cols, sizeof *dxf);
    ops->matmul_dx(ctx, dx4, dy, m4, n);
    ops->matmul_dx(ctx, dxf, dy, mf, n);
    CHECK(max_rel(dx4, dxf, (size_t)n * cols) < 1e-6, "NF4 matmul input gradient equals the dequantized one");
    /* rows 32..63 as their own matrix (one expert of a stacked tensor) */
    KnMatrix s4 = kn_matrix_rows(m4, 32, 32), sf = kn_matrix_rows(mf, 32, 32);
    ops->matmul(ctx, y4, x, s4, n);
    ops->matmul(ctx, yf, x, sf, n);
    CHECK(max_rel(y4, yf, (size_t)n * 32) < 1e-6, "a row slice of an NF4 matrix");
    kn_nf4_free(&q);
    free(w); free(deq); free(x); free(dy); free(y4); free(yf); free(dx4); free(dxf);
}

int main(void) {
    test_code_book();
    test_nearest();
    test_codes(70, 300);
    test_codes(13, 77);
    test_codes(5, 3);
    test_codes(1, 1);
    test_round_trip(70, 300, 0);
    test_round_trip(70, 300, 1);
    test_round_trip(3, 7, 0);
    GfError err;
    for (int threads = 1; threads <= 3; threads += 2) {
        KnBackend be;
        KnBackendOptions o = {.n_threads = threads};
        if (kn_backend_open(KN_DEVICE_CPU, 0, &o, &be, &err)) return 1;
        test_matmul(be.ops, &be.ctx);
        kn_backend_close(&be);
    }
    return check_done("test_nf4");
}
