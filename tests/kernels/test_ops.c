/* test_ops.c - every KnOps entry of every backend this build has (cpu, the
 * guarded cpu, cuda when a device exists) against a plain double-precision
 * reference written from the definitions, on random and odd shapes,
 * single- and multi-threaded. Inputs are uploaded to the backend's device
 * memory, outputs poisoned before each op and downloaded after it. Reports
 * the max error relative to max |ref| and the worst index; backward ops are
 * checked against central differences of a double-precision forward. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../unit/check.h"
#include "convert.h"
#include "dev.h"
#include "nf4.h"
#define RAND_SEED 0x243F6A8885A308D3ull
#include "rand.h"

#define F(n) ((size_t)(n) * sizeof(float))

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

static void test_matmul(Dev *d) {
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
        float *y = malloc(F(n * rows)), *dy = dev_poisoned(d, F(n * rows)), *dx = dev_put(d, x, F(n * cols));
        KnMatrix mf = {dev_put(d, wf, F(rows * cols)), KN_F32, rows, cols, 0, 0};
        KnMatrix mb = {dev_put(d, wb, (size_t)rows * cols * 2), KN_BF16, rows, cols, 0, 0};
        d->be.ops->matmul(&d->be.ctx, dy, dx, mf, n);
        dev_get(d, y, dy, F(n * rows));
        EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "matmul f32 %dx%d n=%d", rows, cols, n);
        d->be.ops->memset(&d->be.ctx, dy, 0xFF, F(n * rows));
        d->be.ops->matmul(&d->be.ctx, dy, dx, mb, n);
        dev_get(d, y, dy, F(n * rows));
        EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "matmul bf16 %dx%d n=%d", rows, cols, n);
        free(wf); free(wb); free(x); free(ref); free(y);
        dev_reset(d);
    }
}

/* The double-precision references of a matmul and its input gradient over
 * the weights wd[rows, cols]: ref[n, rows] = x W^T, refx[n, cols] = g W
 * (not when refx is NULL). */
static void ref_products(const float *x, const float *g, const double *wd, int rows, int cols, int n, double *ref,
                         double *refx) {
    for (int i = 0; i < n; i++) {
        for (int o = 0; o < rows; o++) {
            double acc = 0;
            for (int c = 0; c < cols; c++) acc += (double)x[i * cols + c] * wd[(size_t)o * cols + c];
            ref[i * rows + o] = acc;
        }
        for (int c = 0; refx && c < cols; c++) {
            double acc = 0;
            for (int o = 0; o < rows; o++) acc += (double)g[i * rows + o] * wd[(size_t)o * cols + c];
            refx[i * cols + c] = acc;
        }
    }
}

/* The BF16 precision's matmul and matmul_dx (CUDA only) against the
 * double-precision products of the weights as stored (F32, F16, BF16 and
 * NF4, an NF4 slice at an offset too): within 1e-2 of the largest value,
 * as bf16 operands allow, on the GEMV (n <= 16), tiled (n <= 64) and GEMM
 * paths, with Gemma-sized rows among odd ones. */
static void nf4_on_device(Dev *d, const KnNf4 *host, KnNf4 *dev) {
    *dev = *host;
    dev->codes = dev_put(d, host->codes, (size_t)(host->n + 1) / 2);
    dev->absmax_q = dev_put(d, host->absmax_q, (size_t)host->n_blocks);
    dev->group_scale = dev_put(d, host->group_scale, (size_t)host->n_groups * sizeof(float));
}

/* The CPU kinds' matmul and matmul_dx: each output depends on its input
 * row and weight row alone, bit for bit, whatever rows and outputs share the
 * call (the kernels block both; a prefill and the decode steps it replaces
 * must agree exactly), and dx sums the weight rows in order: the whole call
 * equals one call per input row and weight row. F32, BF16 and NF4 weights,
 * rows not a multiple of the blocks, columns over the widening chunk. */
static void test_matmul_split(Dev *d) {
    if (d->be.ctx.device == KN_DEVICE_CUDA) return;
    const int shapes[][3] = {{7, 4100, 5}, {13, 37, 9}, {4, 8, 1}, {9, 1030, 70}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        size_t nw = (size_t)rows * cols;
        float *wf = rand_vec(nw), *x = rand_vec((size_t)n * cols), *g = rand_vec((size_t)n * rows);
        float *dx0 = rand_vec((size_t)n * cols);
        for (int i = 0; i < n * rows; i += 3) g[i] = 0.0f; /* dx skips a zero gradient */
        uint16_t *wb = malloc(nw * 2);
        for (size_t i = 0; i < nw; i++) wb[i] = kn_f32_to_bf16(wf[i]);
        KnNf4 q, qd;
        CHECK(kn_nf4_quantize(&q, (KnMatrix){wf, KN_F32, rows, cols, 0, 0}, &(GfError){0}) == GF_OK, "quantize");
        nf4_on_device(d, &q, &qd);
        float *dwf = dev_put(d, wf, F(nw));
        uint16_t *dwb = dev_put(d, wb, nw * 2);
        float *dxv = dev_put(d, x, F(n * cols)), *dg = dev_put(d, g, F(n * rows));
        for (int kind = 0; kind < 3; kind++) {
            KnMatrix w = kind == 0 ? (KnMatrix){dwf, KN_F32, rows, cols, 0, 0}
                       : kind == 1 ? (KnMatrix){dwb, KN_BF16, rows, cols, 0, 0} : kn_nf4_matrix(&qd, 0, rows, cols);
            float *y = malloc(F(n * rows)), *y1 = malloc(F(n * rows)), *gx = malloc(F(n * cols)), *gx1 = malloc(F(n * cols));
            float *dy = dev_poisoned(d, F(n * rows)), *ddx = dev_put(d, dx0, F(n * cols));
            d->be.ops->matmul(&d->be.ctx, dy, dxv, w, n);
            d->be.ops->matmul_dx(&d->be.ctx, ddx, dg, w, n);
            dev_get(d, y, dy, F(n * rows));
            dev_get(d, gx, ddx, F(n * cols));
            /* one input row and one weight row a call (a weight row: a
             * one-row view, by address or, for NF4, by offset) */
            float *dy1 = dev_poisoned(d, F(1)), *dgo = dev_alloc(d, F(1)), *ddx1 = dev_put(d, dx0, F(n * cols));
            for (int o = 0; o < rows; o++) {
                KnMatrix wo = kind == 0 ? (KnMatrix){dwf + (size_t)o * cols, KN_F32, 1, cols, 0, 0}
                            : kind == 1 ? (KnMatrix){dwb + (size_t)o * cols, KN_BF16, 1, cols, 0, 0}
                                        : kn_nf4_matrix(&qd, (int64_t)o * cols, 1, cols);
                for (int i = 0; i < n; i++) {
                    d->be.ops->matmul(&d->be.ctx, dy1, dxv + (size_t)i * cols, wo, 1);
                    dev_get(d, y1 + (size_t)i * rows + o, dy1, F(1));
                    d->be.ops->upload(&d->be.ctx, dgo, &g[(size_t)i * rows + o], F(1)); /* dy[i, o] alone */
                    d->be.ops->matmul_dx(&d->be.ctx, ddx1 + (size_t)i * cols, dgo, wo, 1);
                }
            }
            dev_get(d, gx1, ddx1, F(n * cols));
            const char *names[3] = {"f32", "bf16", "nf4"};
            CHECK(memcmp(y, y1, F(n * rows)) == 0, "%s: matmul %s [%d, %d] x %d equals one row and output at a time",
                  d->be.name, names[kind], rows, cols, n);
            CHECK(memcmp(gx, gx1, F(n * cols)) == 0, "%s: matmul_dx %s [%d, %d] x %d equals one row and weight row at a time",
                  d->be.name, names[kind], rows, cols, n);
            free(y); free(y1); free(gx); free(gx1);
        }
        kn_nf4_free(&q);
        free(wf); free(x); free(g); free(dx0); free(wb);
        dev_reset(d);
    }
}

static void test_matmul_bf16(void) {
    Dev d;
    if (!dev_open_at(&d, KN_DEVICE_CUDA, 1, KN_PRECISION_BF16)) return;
    printf("backend %s, precision bf16\n", d.be.name);
    /* GEMV (n <= 16); tiled (16 < n <= 64: whole tiles, partial ones, split features); GEMM */
    int shapes[][3] = {{1, 8, 1},    {7, 40, 3},     {33, 37, 5},     {64, 2560, 16},  {129, 256, 17},
                       {300, 1536, 64}, {5, 5000, 2}, {100, 520, 33}, {256, 2560, 48}, {40, 4096, 65},
                       {70, 301, 20}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        int extra = s % 2 ? 3 : 64; /* NF4: a slice after `extra` elements, aligned for the GEMV or not */
        float *wf = rand_vec((size_t)rows * cols + extra), *x = rand_vec((size_t)n * cols), *g = rand_vec((size_t)n * rows);
        uint16_t *wb = malloc(((size_t)rows * cols + extra) * 2), *wh = malloc((size_t)rows * cols * 2);
        KnNf4 q, qd;
        KnMatrix whole = {wf, KN_F32, 1, (int64_t)rows * cols + extra, 0, 0};
        CHECK(kn_nf4_quantize(&q, whole, &(GfError){0}) == GF_OK, "quantize");
        float *wq = malloc(((size_t)rows * cols + extra) * sizeof *wq);
        kn_nf4_dequantize(&q, 0, (int64_t)rows * cols + extra, wq);
        nf4_on_device(&d, &q, &qd);
        for (int i = 0; i < rows * cols; i++) wh[i] = kn_f32_to_f16(wf[i]);
        for (int i = 0; i < rows * cols + extra; i++) wb[i] = kn_f32_to_bf16(wf[i]);
        struct { KnMatrix m; const char *name; } ws[] = {
            {{dev_put(&d, wf, F(rows * cols)), KN_F32, rows, cols, 0, 0}, "f32"},
            {{dev_put(&d, wh, (size_t)rows * cols * 2), KN_F16, rows, cols, 0, 0}, "f16"},
            {{dev_put(&d, wb, (size_t)rows * cols * 2), KN_BF16, rows, cols, 0, 0}, "bf16"},
            {kn_nf4_matrix(&qd, extra, rows, cols), "nf4"},
        };
        float *dx = dev_put(&d, x, F(n * cols)), *dg = dev_put(&d, g, F(n * rows));
        float *dy = dev_poisoned(&d, F(n * rows)), *ddx = dev_alloc(&d, F(n * cols));
        float *y = malloc(F(n * rows)), *gx = malloc(F(n * cols));
        double *ref = malloc((size_t)n * rows * sizeof *ref), *refx = malloc((size_t)n * cols * sizeof *refx);
        for (size_t k = 0; k < sizeof ws / sizeof *ws; k++) {
            double *wd = malloc((size_t)rows * cols * sizeof *wd); /* the weights as stored, widened */
            for (size_t e = 0; e < (size_t)rows * cols; e++)
                wd[e] = k == 0 ? wf[e] : k == 1 ? kn_f16_to_f32(wh[e]) : k == 2 ? kn_bf16_to_f32(wb[e]) : wq[e + extra];
            ref_products(x, g, wd, rows, cols, n, ref, refx);
            free(wd);
            d.be.ops->memset(&d.be.ctx, dy, 0xFF, F(n * rows));
            d.be.ops->matmul(&d.be.ctx, dy, dx, ws[k].m, n);
            dev_get(&d, y, dy, F(n * rows));
            EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-2, "bf16 matmul %s %dx%d n=%d", ws[k].name, rows, cols, n);
            d.be.ops->memset(&d.be.ctx, ddx, 0, F(n * cols));
            d.be.ops->matmul_dx(&d.be.ctx, ddx, dg, ws[k].m, n);
            dev_get(&d, gx, ddx, F(n * cols));
            EXPECT_CLOSE(gx, refx, (size_t)n * cols, 1e-2, "bf16 matmul_dx %s %dx%d n=%d", ws[k].name, rows, cols, n);
        }
        GfError err;
        CHECK(d.be.ops->synchronize(&d.be.ctx, &err) == GF_OK, "bf16 matmuls: %s", err.message);
        kn_nf4_free(&q);
        free(wf); free(x); free(g); free(wb); free(wh); free(wq); free(y); free(gx); free(ref); free(refx);
        dev_reset(&d);
    }
    dev_close(&d);
}

/* An exact matrix (tensor.h: the MoE router's) in the BF16 precision: its
 * matmul and matmul_dx keep float32 operands, within 1e-5 of the double
 * products where bf16 operands miss by about 1e-3, and each row of a call
 * is the bits of that row alone, so a token picks its experts whatever
 * its batch. The router's shape at 128 experts, and an odd one. */
static void test_matmul_exact(void) {
    Dev d;
    if (!dev_open_at(&d, KN_DEVICE_CUDA, 1, KN_PRECISION_BF16)) return;
    int shapes[][3] = {{128, 2816, 64}, {128, 5376, 3}, {4, 64, 19}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        float *wf = rand_vec((size_t)rows * cols), *x = rand_vec((size_t)n * cols), *g = rand_vec((size_t)n * rows);
        uint16_t *wb = malloc((size_t)rows * cols * 2);
        for (int i = 0; i < rows * cols; i++) { wb[i] = kn_f32_to_bf16(wf[i]); wf[i] = kn_bf16_to_f32(wb[i]); }
        double *ref = malloc((size_t)n * rows * sizeof *ref), *refx = malloc((size_t)n * cols * sizeof *refx);
        double *wd = malloc((size_t)rows * cols * sizeof *wd);
        for (size_t e = 0; e < (size_t)rows * cols; e++) wd[e] = wf[e];
        ref_products(x, g, wd, rows, cols, n, ref, refx);
        free(wd);
        KnMatrix w = {dev_put(&d, wb, (size_t)rows * cols * 2), KN_BF16, rows, cols, 0, 1};
        float *dx = dev_put(&d, x, F(n * cols)), *dg = dev_put(&d, g, F(n * rows));
        float *dy = dev_poisoned(&d, F(n * rows)), *ddx = dev_alloc(&d, F(n * cols)), *dy1 = dev_poisoned(&d, F(rows));
        float *y = malloc(F(n * rows)), *y1 = malloc(F(rows)), *gx = malloc(F(n * cols));
        d.be.ops->matmul(&d.be.ctx, dy, dx, w, n);
        dev_get(&d, y, dy, F(n * rows));
        EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "exact matmul in bf16 %dx%d n=%d", rows, cols, n);
        int same = 1;
        for (int i = 0; i < n; i++) {
            d.be.ops->matmul(&d.be.ctx, dy1, dx + (size_t)i * cols, w, 1);
            dev_get(&d, y1, dy1, F(rows));
            same &= memcmp(y1, y + (size_t)i * rows, F(rows)) == 0;
        }
        CHECK(same, "exact matmul in bf16 %dx%d: each of %d rows the bits of that row alone", rows, cols, n);
        d.be.ops->memset(&d.be.ctx, ddx, 0, F(n * cols));
        d.be.ops->matmul_dx(&d.be.ctx, ddx, dg, w, n);
        dev_get(&d, gx, ddx, F(n * cols));
        EXPECT_CLOSE(gx, refx, (size_t)n * cols, 1e-5, "exact matmul_dx in bf16 %dx%d n=%d", rows, cols, n);
        GfError err;
        CHECK(d.be.ops->synchronize(&d.be.ctx, &err) == GF_OK, "exact matmuls: %s", err.message);
        free(wf); free(x); free(g); free(wb); free(ref); free(refx); free(y); free(y1); free(gx);
        dev_reset(&d);
    }
    dev_close(&d);
}

/* The BF16 precision's decode GEMV (n <= 16 rows, CUDA only) keeps x and
 * the widened weights in float32: within 1e-5 of the double products for
 * F32, BF16 and NF4 weights (NF4 read eight elements at a time, or one at
 * a time in a slice at an odd offset), and each row's outputs are the bits
 * of that row alone whatever the call's rows (the four-outputs kernel of up
 * to four rows and the one-output kernel of up to sixteen sum in one
 * order). E4B's q_proj and down_proj at one row and four, and odd shapes. */
static void test_gemv(void) {
    Dev d;
    if (!dev_open_at(&d, KN_DEVICE_CUDA, 1, KN_PRECISION_BF16)) return;
    int shapes[][3] = {{2048, 2560, 1}, {2560, 10240, 4}, {33, 37, 5}, {513, 1536, 16}, {5, 5000, 2}, {3, 8, 9}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        int extra = s % 2 ? 3 : 64; /* NF4: a slice after `extra` elements, aligned for eight at a time or not */
        size_t nw = (size_t)rows * cols;
        float *wf = rand_vec(nw + extra), *x = rand_vec((size_t)n * cols);
        uint16_t *wb = malloc(nw * 2);
        for (size_t i = 0; i < nw; i++) wb[i] = kn_f32_to_bf16(wf[i]);
        KnNf4 q, qd;
        CHECK(kn_nf4_quantize(&q, (KnMatrix){wf, KN_F32, 1, (int64_t)(nw + extra), 0, 0}, &(GfError){0}) == GF_OK,
              "quantize");
        float *wq = malloc((nw + extra) * sizeof *wq);
        kn_nf4_dequantize(&q, 0, (int64_t)(nw + extra), wq);
        nf4_on_device(&d, &q, &qd);
        struct { KnMatrix m; const char *name; } ws[] = {
            {{dev_put(&d, wf, F(nw)), KN_F32, rows, cols, 0, 0}, "f32"},
            {{dev_put(&d, wb, nw * 2), KN_BF16, rows, cols, 0, 0}, "bf16"},
            {kn_nf4_matrix(&qd, extra, rows, cols), "nf4"},
        };
        float *dx = dev_put(&d, x, F(n * cols)), *dy = dev_poisoned(&d, F(n * rows)), *dy1 = dev_poisoned(&d, F(rows));
        float *y = malloc(F(n * rows)), *y1 = malloc(F(rows));
        double *ref = malloc((size_t)n * rows * sizeof *ref), *wd = malloc(nw * sizeof *wd);
        for (size_t k = 0; k < sizeof ws / sizeof *ws; k++) {
            for (size_t e = 0; e < nw; e++) wd[e] = k == 0 ? wf[e] : k == 1 ? kn_bf16_to_f32(wb[e]) : wq[e + extra];
            ref_products(x, NULL, wd, rows, cols, n, ref, NULL);
            d.be.ops->matmul(&d.be.ctx, dy, dx, ws[k].m, n);
            dev_get(&d, y, dy, F(n * rows));
            EXPECT_CLOSE(y, ref, (size_t)n * rows, 1e-5, "gemv %s %dx%d n=%d", ws[k].name, rows, cols, n);
            int same = 1;
            for (int i = 0; i < n; i++) {
                d.be.ops->matmul(&d.be.ctx, dy1, dx + (size_t)i * cols, ws[k].m, 1);
                dev_get(&d, y1, dy1, F(rows));
                same &= memcmp(y1, y + (size_t)i * rows, F(rows)) == 0;
            }
            CHECK(same, "gemv %s %dx%d: each of %d rows the bits of that row alone", ws[k].name, rows, cols, n);
        }
        GfError err;
        CHECK(d.be.ops->synchronize(&d.be.ctx, &err) == GF_OK, "gemv: %s", err.message);
        kn_nf4_free(&q);
        free(wf); free(x); free(wb); free(wq); free(y); free(y1); free(ref); free(wd);
        dev_reset(&d);
    }
    dev_close(&d);
}

/* The CPU kinds compute in fp32 only: asking them for bf16 is an error
 * naming the precision, and AUTO resolves to FP32 there. */
static void test_precision(void) {
    const KnDeviceKind kinds[] = {KN_DEVICE_CPU, KN_DEVICE_GUARDED};
    for (int k = 0; k < 2; k++) {
        KnBackend b;
        GfError err;
        KnBackendOptions o = {.n_threads = 1, .precision = KN_PRECISION_BF16};
        CHECK(kn_backend_open(kinds[k], 0, &o, &b, &err) == GF_INVALID && strcmp(err.param, "precision") == 0 &&
                  strstr(err.message, "fp32 only"),
              "bf16 on a CPU kind: %s", err.message);
        o.precision = KN_PRECISION_AUTO;
        CHECK(kn_backend_open(kinds[k], 0, &o, &b, &err) == GF_OK && b.ctx.precision == KN_PRECISION_FP32, "auto on a CPU kind");
        kn_backend_close(&b);
    }
    KnPrecision p;
    GfError err;
    CHECK(kn_precision_parse("bf16", &p, &err) == GF_OK && p == KN_PRECISION_BF16, "parse bf16");
    CHECK(kn_precision_parse("fp32", &p, &err) == GF_OK && p == KN_PRECISION_FP32, "parse fp32");
    CHECK(kn_precision_parse("fp16", &p, &err) == GF_INVALID && strstr(err.message, "fp16"), "parse fp16: %s", err.message);
}

/* Uploads of every size land whole: large ones (through the CUDA
 * backend's pinned staging, several buffers' worth, an odd tail, at an odd
 * offset) and small ones between them; the source is changed right after
 * each call returns (upload returns once it may be reused). */
static void test_transfers(Dev *d) {
    size_t sizes[] = {7, (size_t)20 << 20 | 13, 4096, ((size_t)1 << 20) + 1, (size_t)9 << 20};
    size_t most = (size_t)20 << 20 | 13;
    uint8_t *src = malloc(most), *back = malloc(most), *want = malloc(most);
    uint8_t *dev = dev_alloc(d, most + 8);
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t n = sizes[k];
        for (size_t i = 0; i < n; i++) src[i] = (uint8_t)(i * 131 + k * 7 + (i >> 13));
        memcpy(want, src, n);
        d->be.ops->upload(&d->be.ctx, dev + 3, src, n);
        memset(src, 0xA5, n);
        dev_get(d, back, dev + 3, n);
        CHECK(memcmp(back, want, n) == 0, "an upload of %zu bytes arrives whole", n);
    }
    free(src); free(back); free(want);
    dev_reset(d);
}

static void test_rmsnorm_gelu_softcap(Dev *d) {
    int n = 7, dim = 33;
    float *x = rand_vec((size_t)n * dim), *w = rand_vec((size_t)dim), *y = malloc((size_t)n * dim * sizeof *y);
    float *dx = dev_put(d, x, F(n * dim)), *dw = dev_put(d, w, F(dim)), *dy = dev_poisoned(d, F(n * dim));
    double *ref = malloc((size_t)n * dim * sizeof *ref);
    for (int r = 0; r < n; r++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        double inv = 1.0 / sqrt(ss / dim + 1e-6);
        for (int i = 0; i < dim; i++) ref[r * dim + i] = x[r * dim + i] * inv * w[i];
    }
    d->be.ops->rmsnorm(&d->be.ctx, dy, dx, dw, n, dim, 1e-6f);
    dev_get(d, y, dy, F(n * dim));
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "rmsnorm%s", " (weight used as is)");
    for (int i = 0; i < n * dim; i++) ref[i] /= w[i % dim];
    d->be.ops->rmsnorm(&d->be.ctx, dx, dx, NULL, n, dim, 1e-6f);
    dev_get(d, y, dx, F(n * dim));
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "rmsnorm%s", " without weight, in place");
    for (int i = 0; i < n * dim; i++) {
        double v = 3.0 * x[i];
        y[i] = (float)v;
        ref[i] = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
    }
    d->be.ops->upload(&d->be.ctx, dy, y, F(n * dim));
    d->be.ops->gelu_tanh(&d->be.ctx, dy, (size_t)(n * dim));
    dev_get(d, y, dy, F(n * dim));
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "gelu%s", "");
    for (int i = 0; i < n * dim; i++) { y[i] = 80 * x[i]; ref[i] = 30 * tanh(80.0 * x[i] / 30); }
    d->be.ops->upload(&d->be.ctx, dy, y, F(n * dim));
    d->be.ops->softcap(&d->be.ctx, dy, (size_t)(n * dim), 30.0f);
    dev_get(d, y, dy, F(n * dim));
    EXPECT_CLOSE(y, ref, (size_t)n * dim, 1e-6, "softcap%s", "");
    free(x); free(w); free(y); free(ref);
    dev_reset(d);
}

/* rmsnorm_add: r + rmsnorm(x) against the double-precision reference, and
 * the bits of rmsnorm into a buffer, add, then scale: with a weight into
 * its own output, and scaled without one in place over r; rows wider
 * than a block. */
static void test_rmsnorm_add(Dev *d) {
    const int n = 5, dims[2] = {33, 1100};
    for (int k = 0; k < 2; k++) {
        int dim = dims[k];
        size_t nd = (size_t)n * dim;
        float *x = rand_vec(nd), *r = rand_vec(nd), *w = rand_vec((size_t)dim);
        float *got = malloc(F(nd)), *want = malloc(F(nd));
        double *ref = malloc(nd * sizeof *ref);
        for (int row = 0; row < n; row++) {
            double ss = 0;
            for (int i = 0; i < dim; i++) ss += (double)x[row * dim + i] * x[row * dim + i];
            double inv = 1.0 / sqrt(ss / dim + 1e-6);
            for (int i = 0; i < dim; i++) ref[row * dim + i] = r[row * dim + i] + x[row * dim + i] * inv * w[i];
        }
        float *dx = dev_put(d, x, F(nd)), *dr = dev_put(d, r, F(nd)), *dw = dev_put(d, w, F(dim));
        float *dy = dev_poisoned(d, F(nd)), *dt = dev_poisoned(d, F(nd)), *dsum = dev_poisoned(d, F(nd));
        d->be.ops->rmsnorm_add(&d->be.ctx, dy, dr, dx, dw, n, dim, 1e-6f, 1.0f);
        dev_get(d, got, dy, F(nd));
        EXPECT_CLOSE(got, ref, nd, 1e-6, "rmsnorm_add, dim %d", dim);
        d->be.ops->rmsnorm(&d->be.ctx, dt, dx, dw, n, dim, 1e-6f);
        d->be.ops->add(&d->be.ctx, dsum, dr, dt, nd);
        dev_get(d, want, dsum, F(nd));
        CHECK(memcmp(got, want, F(nd)) == 0, "%s: rmsnorm_add, dim %d: the bits of rmsnorm then add", d->be.name, dim);
        d->be.ops->rmsnorm(&d->be.ctx, dt, dx, NULL, n, dim, 1e-6f);
        d->be.ops->add(&d->be.ctx, dsum, dr, dt, nd);
        d->be.ops->scale(&d->be.ctx, dsum, nd, 0.7f);
        d->be.ops->rmsnorm_add(&d->be.ctx, dr, dr, dx, NULL, n, dim, 1e-6f, 0.7f);
        dev_get(d, got, dr, F(nd));
        dev_get(d, want, dsum, F(nd));
        CHECK(memcmp(got, want, F(nd)) == 0, "%s: rmsnorm_add scaled, without weight, in place over r, dim %d",
              d->be.name, dim);
        free(x); free(r); free(w); free(got); free(want); free(ref);
        dev_reset(d);
    }
}

/* rmsnorm and rmsnorm_add give a row the same bits whatever rows share the
 * call (CUDA takes another kernel for a decode step's few rows, which must
 * sum in the same order): 70 rows at once against the first three and the
 * last alone, at E4B's and 31B's hidden sizes, one over what the few-rows
 * kernel holds, and an odd one; rmsnorm_add in place over r. */
static void test_rmsnorm_rows(Dev *d) {
    const int n = 70, dims[4] = {2560, 5376, 7000, 33};
    for (int k = 0; k < 4; k++) {
        int dim = dims[k];
        size_t nd = (size_t)n * dim;
        float *x = rand_vec(nd), *r = rand_vec(nd), *w = rand_vec((size_t)dim);
        float *all = malloc(F(nd)), *few = malloc(F(nd)), *all_add = malloc(F(nd)), *few_add = malloc(F(nd));
        float *dx = dev_put(d, x, F(nd)), *dw = dev_put(d, w, F(dim)), *dy = dev_poisoned(d, F(nd));
        float *dr = dev_put(d, r, F(nd)), *dr2 = dev_put(d, r, F(nd));
        d->be.ops->rmsnorm(&d->be.ctx, dy, dx, dw, n, dim, 1e-6f);
        dev_get(d, all, dy, F(nd));
        d->be.ops->rmsnorm_add(&d->be.ctx, dr, dr, dx, dw, n, dim, 1e-6f, 0.7f);
        dev_get(d, all_add, dr, F(nd));
        d->be.ops->memset(&d->be.ctx, dy, 0xFF, F(nd));
        const int starts[2] = {0, n - 1}, counts[2] = {3, 1};
        for (int c = 0; c < 2; c++) {
            size_t at = (size_t)starts[c] * dim;
            d->be.ops->rmsnorm(&d->be.ctx, dy + at, dx + at, dw, counts[c], dim, 1e-6f);
            d->be.ops->rmsnorm_add(&d->be.ctx, dr2 + at, dr2 + at, dx + at, dw, counts[c], dim, 1e-6f, 0.7f);
        }
        dev_get(d, few, dy, F(nd));
        dev_get(d, few_add, dr2, F(nd));
        int same = 1;
        for (int c = 0; c < 2; c++) {
            size_t at = (size_t)starts[c] * dim, len = F((size_t)counts[c] * dim);
            same &= memcmp(all + at, few + at, len) == 0 && memcmp(all_add + at, few_add + at, len) == 0;
        }
        CHECK(same, "%s: rmsnorm and rmsnorm_add of dim %d: a row's bits alike in 70, 3 and 1 rows", d->be.name, dim);
        free(x); free(r); free(w); free(all); free(few); free(all_add); free(few_add);
        dev_reset(d);
    }
}

/* rmsnorm_rope: each head's norm and rotation at its row's position, the
 * bits of rmsnorm then rope_rows (with a weight into its own output,
 * without one in place), and the double-precision reference; heads of 64
 * and 512 (wider than a block's threads) and an odd one, frequencies with
 * proportional zeros. */
static void test_rmsnorm_rope(Dev *d) {
    const int rows = 3, heads = 4, dims[3] = {64, 512, 33};
    for (int k = 0; k < 3; k++) {
        int dim = dims[k], half = dim / 2;
        size_t nd = (size_t)rows * heads * dim;
        float *x = rand_vec(nd), *w = rand_vec((size_t)dim), *inv = malloc(F(half > 0 ? half : 1));
        for (int i = 0; i < half; i++) inv[i] = i < half / 2 ? (float)pow(1e4, -2.0 * i / dim) : 0.0f;
        int32_t pos[3] = {0, 17, 4095};
        float *got = malloc(F(nd)), *want = malloc(F(nd));
        double *ref = malloc(nd * sizeof *ref);
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < heads; h++) {
                const float *xh = x + ((size_t)r * heads + h) * dim;
                double *rh = ref + ((size_t)r * heads + h) * dim, ss = 0;
                for (int i = 0; i < dim; i++) ss += (double)xh[i] * xh[i];
                double q = 1.0 / sqrt(ss / dim + 1e-6);
                for (int i = 0; i < dim; i++) rh[i] = xh[i] * q * w[i];
                for (int i = 0; i < half; i++) {
                    double th = (double)((float)pos[r] * inv[i]), a = rh[i], b = rh[i + half];
                    rh[i] = a * cos(th) - b * sin(th);
                    rh[i + half] = b * cos(th) + a * sin(th);
                }
            }
        float *dx = dev_put(d, x, F(nd)), *dw = dev_put(d, w, F(dim)), *dinv = dev_put(d, inv, F(half > 0 ? half : 1));
        int32_t *dpos = dev_put(d, pos, sizeof pos);
        float *dy = dev_poisoned(d, F(nd)), *dt = dev_poisoned(d, F(nd));
        d->be.ops->rmsnorm_rope(&d->be.ctx, dy, dx, dw, rows, heads, dim, 1e-6f, dinv, dpos);
        dev_get(d, got, dy, F(nd));
        EXPECT_CLOSE(got, ref, nd, 1e-5, "rmsnorm_rope, heads of %d", dim);
        d->be.ops->rmsnorm(&d->be.ctx, dt, dx, dw, (int64_t)rows * heads, dim, 1e-6f);
        d->be.ops->rope_rows(&d->be.ctx, dt, rows, heads, dim, dim, dinv, dpos, 1);
        dev_get(d, want, dt, F(nd));
        CHECK(memcmp(got, want, F(nd)) == 0, "%s: rmsnorm_rope, heads of %d: the bits of rmsnorm then rope_rows",
              d->be.name, dim);
        d->be.ops->rmsnorm(&d->be.ctx, dt, dx, NULL, (int64_t)rows * heads, dim, 1e-6f);
        d->be.ops->rope_rows(&d->be.ctx, dt, rows, heads, dim, dim, dinv, dpos, 1);
        d->be.ops->rmsnorm_rope(&d->be.ctx, dx, dx, NULL, rows, heads, dim, 1e-6f, dinv, dpos);
        dev_get(d, got, dx, F(nd));
        dev_get(d, want, dt, F(nd));
        CHECK(memcmp(got, want, F(nd)) == 0, "%s: rmsnorm_rope without weight in place, heads of %d", d->be.name, dim);
        free(x); free(w); free(inv); free(got); free(want); free(ref);
        dev_reset(d);
    }
}

/* Half-split rotation; the inverse frequencies carry the proportional zeros. */
static void test_rope(Dev *d) {
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
    float *dy = dev_put(d, x, F(heads * dim));
    int32_t pos32 = (int32_t)pos;
    d->be.ops->rope_rows(&d->be.ctx, dy, 1, heads, dim, dim, dev_put(d, inv, sizeof inv), dev_put(d, &pos32, 4), 1);
    dev_get(d, y, dy, F(heads * dim));
    EXPECT_CLOSE(y, ref, (size_t)heads * dim, 1e-4, "rope%s", " proportional");
    CHECK(y[10] == x[10] && y[dim / 2 + 10] == x[dim / 2 + 10], "dimensions with zero frequency pass through");
    free(x); free(y);
    dev_reset(d);
}

/* Attention with GQA, a window, padding and one bidirectional block. */
/* Attention at Gemma 4's head dims (256, 512), GQA 4:1, over several key
 * chunks (and, the second time, every stream of runs: CUDA sums them apart),
 * causal and sliding: against a double reference, and each query computed
 * alone (a decode step) equal bit for bit to the same query in the whole
 * prompt (a prefill), which preemption's recompute and batching rely on. */
static void test_attention_shapes(Dev *d) {
    const int dims[2] = {256, 512}, lens[2][2] = {{20, 50}, {12, 1100}}; /* queries, first position */
    for (int di = 0; di < 4; di++) {
        int D = dims[di % 2], nq = lens[di / 2][0], pos0 = lens[di / 2][1], nk = pos0 + nq, H = 8, KVH = 2, W = 16;
        float *q = rand_vec((size_t)nq * H * D), *k = rand_vec((size_t)nk * KVH * D), *v = rand_vec((size_t)nk * KVH * D);
        uint8_t *valid = malloc((size_t)nk);
        for (int t = 0; t < nk; t++) valid[t] = t != 7;
        float scale = 1.0f / sqrtf((float)D);
        for (int variant = 0; variant < 2; variant++) {
            int win = variant ? W : 0;
            KnMask dm = {dev_put(d, valid, (size_t)nk), NULL, win};
            double *ref = calloc((size_t)nq * H * D, sizeof *ref), *s = malloc((size_t)nk * sizeof *s);
            for (int i = 0; i < nq; i++)
                for (int h = 0; h < H; h++) {
                    int qp = pos0 + i, g = h / (H / KVH);
                    double mx = -INFINITY, sum = 0;
                    for (int t = 0; t < nk; t++) {
                        s[t] = -INFINITY;
                        if (!valid[t] || t > qp || (win && t <= qp - win)) continue;
                        double acc = 0;
                        for (int x = 0; x < D; x++) acc += (double)q[(i * H + h) * D + x] * k[(t * KVH + g) * D + x];
                        s[t] = acc * scale;
                        if (s[t] > mx) mx = s[t];
                    }
                    for (int t = 0; t < nk; t++) sum += s[t] == -INFINITY ? 0 : exp(s[t] - mx);
                    for (int t = 0; t < nk; t++)
                        if (s[t] != -INFINITY)
                            for (int x = 0; x < D; x++) ref[(i * H + h) * D + x] += exp(s[t] - mx) / sum * v[(t * KVH + g) * D + x];
                }
            size_t n = (size_t)nq * H * D;
            float *out = malloc(F(n)), *alone = malloc(F(n)), *dout = dev_poisoned(d, F(n)), *dq = dev_put(d, q, F(n));
            float *dk = dev_put(d, k, F(nk * KVH * D)), *dv = dev_put(d, v, F(nk * KVH * D));
            d->be.ops->attention(&d->be.ctx, dout, dq, dk, dv, nq, pos0, nk, H, KVH, D, scale, &dm);
            dev_get(d, out, dout, F(n));
            EXPECT_CLOSE(out, ref, n, 1e-5, "attention head_dim %d, %s", D, win ? "sliding" : "causal");
            d->be.ops->memset(&d->be.ctx, dout, 0xFF, F(n));
            for (int i = 0; i < nq; i++)
                d->be.ops->attention(&d->be.ctx, dout + (size_t)i * H * D, dq + (size_t)i * H * D, dk, dv, 1, pos0 + i, nk, H,
                                     KVH, D, scale, &dm);
            dev_get(d, alone, dout, F(n));
            CHECK(memcmp(alone, out, F(n)) == 0, "%s: attention head_dim %d %s: each query alone equals the prompt's, bit for bit",
                  d->be.name, D, win ? "sliding" : "causal");
            free(ref); free(s); free(out); free(alone);
            dev_reset(d);
        }
        free(q); free(k); free(v); free(valid);
    }
}

/* Two CUDA contexts on one GPU (a serving and a training context) taking
 * attention tiles of different shared memory in turn: the kernels' limit
 * belongs to the device, so a context whose heads are small must not leave
 * it too low for the other's head_dim 512 (which then failed to launch). */
static void test_attention_two_contexts(void) {
    Dev a, b;
    if (!dev_open_at(&a, KN_DEVICE_CUDA, 1, KN_PRECISION_FP32)) return;
    if (!dev_open_at(&b, KN_DEVICE_CUDA, 1, KN_PRECISION_FP32)) {
        CHECK(0, "a second CUDA context opens%s", "");
        dev_close(&a);
        return;
    }
    const int nq = 12, nk = 40, H = 4, KVH = 2, dims[2] = {512, 64};
    uint8_t valid[40];
    memset(valid, 1, sizeof valid);
    float *out[3];
    for (int run = 0; run < 3; run++) {
        Dev *d = run == 1 ? &b : &a;
        int D = dims[run == 1];
        uint64_t keep = rng;
        rng = 0x5EEDull + (uint64_t)D; /* the same inputs for both runs of a */
        float *q = rand_vec((size_t)nq * H * D), *k = rand_vec((size_t)nk * KVH * D), *v = rand_vec((size_t)nk * KVH * D);
        rng = keep;
        size_t n = (size_t)nq * H * D;
        KnMask dm = {dev_put(d, valid, sizeof valid), NULL, 0};
        float *dout = dev_poisoned(d, F(n));
        d->be.ops->attention(&d->be.ctx, dout, dev_put(d, q, F(n)), dev_put(d, k, F(nk * KVH * D)),
                             dev_put(d, v, F(nk * KVH * D)), nq, nk - nq, nk, H, KVH, D, 0.125f, &dm);
        GfError err = {0};
        GfStatus st = d->be.ops->synchronize(&d->be.ctx, &err);
        CHECK(st == GF_OK, "attention head_dim %d on context %c after the other's: %s", D, run == 1 ? 'b' : 'a',
              err.message);
        out[run] = malloc(F(n));
        dev_get(d, out[run], dout, F(n));
        dev_reset(d);
        free(q); free(k); free(v);
    }
    CHECK(memcmp(out[0], out[2], F((size_t)nq * H * 512)) == 0,
          "head_dim 512 gives the same bits before and after the other context's head_dim 64%s", "");
    for (int i = 0; i < 3; i++) free(out[i]);
    dev_close(&b);
    dev_close(&a);
}

static void test_attention(Dev *d) {
    int nq = 9, pos0 = 3, nk = 12, H = 4, KVH = 2, D = 8, W = 4;
    float *q = rand_vec((size_t)nq * H * D), *k = rand_vec((size_t)nk * KVH * D), *v = rand_vec((size_t)nk * KVH * D);
    uint8_t valid[12] = {1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1};
    int32_t group[12] = {-1, -1, -1, -1, 0, 0, 0, 0, 0, -1, -1, -1};
    for (int variant = 0; variant < 3; variant++) {
        KnMask m = {valid, variant == 2 ? group : NULL, variant == 0 ? 0 : W};
        KnMask dm = {dev_put(d, valid, sizeof valid), variant == 2 ? dev_put(d, group, sizeof group) : NULL, m.window};
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
        float *out = malloc(F(nq * H * D)), *dout = dev_poisoned(d, F(nq * H * D)), *dq = dev_put(d, q, F(nq * H * D));
        d->be.ops->attention(&d->be.ctx, dout, dq, dev_put(d, k, F(nk * KVH * D)), dev_put(d, v, F(nk * KVH * D)), nq, pos0,
                             nk, H, KVH, D, 0.5f, &dm);
        dev_get(d, out, dout, F(nq * H * D));
        EXPECT_CLOSE(out, ref, (size_t)nq * H * D, 1e-5, "attention variant %d (0 causal, 1 window, 2 window+block)", variant);
        /* attention_bulk: the same function, attention's own bits on the CPU kinds */
        float *bulk = malloc(F(nq * H * D));
        d->be.ops->memset(&d->be.ctx, dout, 0xFF, F(nq * H * D));
        d->be.ops->attention_bulk(&d->be.ctx, dout, dq, dev_put(d, k, F(nk * KVH * D)), dev_put(d, v, F(nk * KVH * D)), nq,
                                  pos0, nk, H, KVH, D, 0.5f, &dm);
        dev_get(d, bulk, dout, F(nq * H * D));
        EXPECT_CLOSE(bulk, ref, (size_t)nq * H * D, 1e-5, "attention_bulk variant %d", variant);
        CHECK(d->be.ctx.device == KN_DEVICE_CUDA || memcmp(bulk, out, F(nq * H * D)) == 0,
              "%s: attention_bulk gives attention's bits, variant %d", d->be.name, variant);
        free(bulk);
        /* the same keys paged: blocks of 5 positions stored out of order
         * (block b of the sequence in slot table[b]), the last one partial */
        enum { BLK = 5, SLOTS = 4 };
        int32_t table[3] = {2, 0, 3};
        float *pk = calloc((size_t)SLOTS * BLK * KVH * D, sizeof *pk), *pv = calloc((size_t)SLOTS * BLK * KVH * D, sizeof *pv);
        for (int t = 0; t < nk; t++) {
            size_t dst = ((size_t)table[t / BLK] * BLK + t % BLK) * KVH * D;
            memcpy(pk + dst, k + (size_t)t * KVH * D, (size_t)KVH * D * sizeof *pk);
            memcpy(pv + dst, v + (size_t)t * KVH * D, (size_t)KVH * D * sizeof *pv);
        }
        size_t pn = F(SLOTS * BLK * KVH * D);
        KnKv kv = {dev_put(d, pk, pn), dev_put(d, pv, pn), dev_put(d, table, sizeof table), BLK};
        float *paged = malloc(F(nq * H * D));
        d->be.ops->memset(&d->be.ctx, dout, 0xFF, F(nq * H * D));
        d->be.ops->attention_paged(&d->be.ctx, dout, dq, &kv, nq, pos0, nk, H, KVH, D, 0.5f, &dm);
        dev_get(d, paged, dout, F(nq * H * D));
        CHECK(memcmp(paged, out, (size_t)nq * H * D * sizeof *out) == 0, "paged attention equals contiguous, variant %d",
              variant);
        free(pk); free(pv); free(paged);
        free(out);
        free(ref);
        dev_reset(d);
    }
    free(q); free(k); free(v);
}

/* x[n] as a bfloat16 store on the device (*d16) and, widened back, as a
 * float32 one (returned): what attention over the bfloat16 store must
 * equal bit for bit. */
static float *bf16_store(Dev *d, const float *x, size_t n, uint16_t **d16) {
    uint16_t *h = malloc(n * sizeof *h);
    float *w = malloc(F(n));
    for (size_t i = 0; i < n; i++) {
        h[i] = kn_f32_to_bf16(x[i]);
        w[i] = kn_bf16_to_f32(h[i]);
    }
    *d16 = dev_put(d, h, n * sizeof *h);
    float *dw = dev_put(d, w, F(n));
    free(h);
    free(w);
    return dw;
}

/* 1 when the n floats at device addresses a and b are the same bits, and finite. */
static int same_finite(Dev *d, const float *a, const float *b, size_t n) {
    float *ha = malloc(F(n)), *hb = malloc(F(n));
    dev_get(d, ha, a, F(n));
    dev_get(d, hb, b, F(n));
    int ok = memcmp(ha, hb, F(n)) == 0;
    for (size_t i = 0; i < n; i++) ok &= isfinite(ha[i]);
    free(ha);
    free(hb);
    return ok;
}

/* attention_batch: a decode step's sequences in one call (decodes and
 * prefills of several lengths, each with its own blocks in shared stores,
 * its own padding and one with vision blocks, its first position read from
 * the device's positions) give, bit for bit, what attention_paged gives
 * each alone. */
static void test_attention_batch(Dev *d) {
    enum { NS = 5, BLK = 4, SLOTS = 16, H = 4, KVH = 2 };
    const int nq[NS] = {1, 6, 3, 1, 9}, pos0[NS] = {10, 0, 5, 0, 2};
    const int dims[] = {16, 256};
    for (size_t di = 0; di < sizeof dims / sizeof *dims; di++)
        for (int window = 0; window <= 3; window += 3) {
            int D = dims[di], rows = 0, next_slot = 0;
            size_t store = (size_t)SLOTS * BLK * KVH * D;
            float *k = rand_vec(store), *v = rand_vec(store);
            float *dk = dev_put(d, k, F(store)), *dv = dev_put(d, v, F(store));
            KnAttnSeq seqs[NS];
            int32_t pos[32];
            for (int s = 0; s < NS; s++) {
                int nk = pos0[s] + nq[s], nb = (nk + BLK - 1) / BLK;
                int32_t table[8] = {0}, group[32] = {0};
                uint8_t valid[32] = {0};
                for (int b = 0; b < nb; b++) table[b] = (int32_t)((next_slot++ * 7) % SLOTS); /* out of order */
                for (int t = 0; t < nk; t++) {
                    valid[t] = (uint8_t)(t == 0 || frand() > -0.7f);
                    group[t] = s == 4 && t >= 3 && t < 7 ? 0 : -1;
                }
                seqs[s] = (KnAttnSeq){rows, nq[s], dev_put(d, table, sizeof table), dev_put(d, valid, sizeof valid),
                                      s == 4 ? dev_put(d, group, sizeof group) : NULL};
                for (int i = 0; i < nq[s]; i++) pos[rows + i] = pos0[s] + i;
                rows += nq[s];
            }
            size_t qn = (size_t)rows * H * D;
            float *q = rand_vec(qn), *dq = dev_put(d, q, F(qn)), *d1 = dev_poisoned(d, F(qn)), *d2 = dev_poisoned(d, F(qn));
            int32_t *dpos = dev_put(d, pos, sizeof pos);
            d->be.ops->attention_batch(&d->be.ctx, d1, dq, dpos, dk, dv, KN_F32, BLK, seqs, NS, H, KVH, D, 0.25f, window);
            for (int s = 0; s < NS; s++) {
                KnKv kv = {dk, dv, seqs[s].table, BLK};
                KnMask m = {seqs[s].valid, seqs[s].group, window};
                size_t at = (size_t)seqs[s].row0 * H * D;
                d->be.ops->attention_paged(&d->be.ctx, d2 + at, dq + at, &kv, seqs[s].n_q, pos0[s], pos0[s] + nq[s], H,
                                           KVH, D, 0.25f, &m);
            }
            float *o1 = malloc(F(qn)), *o2 = malloc(F(qn));
            dev_get(d, o1, d1, F(qn));
            dev_get(d, o2, d2, F(qn));
            int finite = 1;
            for (size_t i = 0; i < qn; i++) finite &= isfinite(o1[i]);
            CHECK(finite && memcmp(o1, o2, F(qn)) == 0, "%s: attention_batch equals attention_paged per sequence (D %d, window %d)",
                  d->be.name, D, window);
            /* every row a sequence of its own: attention_rows, its rows in
             * device memory, equals attention_batch of one-row sequences */
            KnAttnSeq one[32];
            KnAttnRow hrows[32];
            for (int s = 0, r = 0; s < NS; s++)
                for (int i = 0; i < nq[s]; i++, r++) {
                    one[r] = (KnAttnSeq){r, 1, seqs[s].table, seqs[s].valid, seqs[s].group};
                    hrows[r] = (KnAttnRow){seqs[s].table, seqs[s].valid, seqs[s].group};
                }
            float *d3 = dev_poisoned(d, F(qn)), *d4 = dev_poisoned(d, F(qn));
            d->be.ops->attention_batch(&d->be.ctx, d3, dq, dpos, dk, dv, KN_F32, BLK, one, rows, H, KVH, D, 0.25f, window);
            d->be.ops->attention_rows(&d->be.ctx, d4, dq, dpos, dk, dv, KN_F32, BLK, dev_put(d, hrows, sizeof hrows), rows, H, KVH,
                                      D, 0.25f, window);
            dev_get(d, o1, d3, F(qn));
            dev_get(d, o2, d4, F(qn));
            finite = 1;
            for (size_t i = 0; i < qn; i++) finite &= isfinite(o2[i]);
            CHECK(finite && memcmp(o1, o2, F(qn)) == 0, "%s: attention_rows equals attention_batch of one-row sequences "
                  "(D %d, window %d)", d->be.name, D, window);
            /* bfloat16 stores: the float32 result over the stores widened, bit for bit */
            uint16_t *k16, *v16;
            float *kw = bf16_store(d, k, store, &k16), *vw = bf16_store(d, v, store, &v16);
            float *e1 = dev_poisoned(d, F(qn)), *e2 = dev_poisoned(d, F(qn)), *e3 = dev_poisoned(d, F(qn)),
                  *e4 = dev_poisoned(d, F(qn));
            d->be.ops->attention_batch(&d->be.ctx, e1, dq, dpos, k16, v16, KN_BF16, BLK, seqs, NS, H, KVH, D, 0.25f, window);
            d->be.ops->attention_batch(&d->be.ctx, e2, dq, dpos, kw, vw, KN_F32, BLK, seqs, NS, H, KVH, D, 0.25f, window);
            d->be.ops->attention_rows(&d->be.ctx, e3, dq, dpos, k16, v16, KN_BF16, BLK, dev_put(d, hrows, sizeof hrows),
                                      rows, H, KVH, D, 0.25f, window);
            d->be.ops->attention_rows(&d->be.ctx, e4, dq, dpos, kw, vw, KN_F32, BLK, dev_put(d, hrows, sizeof hrows),
                                      rows, H, KVH, D, 0.25f, window);
            CHECK(same_finite(d, e1, e2, qn) && same_finite(d, e3, e4, qn),
                  "%s: attention_batch and attention_rows over bf16 stores equal them over the stores widened (D %d, "
                  "window %d)", d->be.name, D, window);
            CHECK(!same_finite(d, e2, d1, qn), "%s: rounding the stores to bf16 changed the result (D %d)", d->be.name, D);
            free(o1); free(o2); free(q); free(k); free(v);
            dev_reset(d);
        }
}

/* A decode step's rows over long contexts in paged stores (CUDA splits
 * their keys' streams over blocks and merges them after): attention_rows,
 * and attention_batch of one-query sequences, give each row, bit for bit,
 * what the sequence's prefill gives its last query (attention_paged of its
 * last four queries), full and sliding. */
static void test_attention_rows_long(Dev *d) {
    enum { NS = 3, BLK = 16, H = 8, KVH = 2, D = 256, LAST = 4 };
    const int len[NS] = {700, 1030, 300}; /* keys, the decoding query's included */
    int blocks = 0;
    for (int s = 0; s < NS; s++) blocks += (len[s] + BLK - 1) / BLK;
    size_t store = (size_t)blocks * BLK * KVH * D;
    float *k = rand_vec(store), *v = rand_vec(store);
    float *dk = dev_put(d, k, F(store)), *dv = dev_put(d, v, F(store));
    KnAttnRow hrows[NS];
    int32_t pos[NS], *tables[NS];
    uint8_t *valid = malloc(1100);
    for (int t = 0; t < 1100; t++) valid[t] = (uint8_t)(t % 97 != 5);
    const uint8_t *dvalid = dev_put(d, valid, 1100);
    for (int s = 0, next = 0; s < NS; s++) {
        int nb = (len[s] + BLK - 1) / BLK;
        tables[s] = malloc((size_t)nb * sizeof **tables);
        /* out of order; 5 is coprime to the 128 blocks, so no table holds one twice */
        for (int b = 0; b < nb; b++) tables[s][b] = (int32_t)((next + b * 5) % blocks);
        next += nb;
        hrows[s] = (KnAttnRow){dev_put(d, tables[s], (size_t)nb * sizeof **tables), dvalid, NULL};
        pos[s] = len[s] - 1;
    }
    size_t qn = (size_t)NS * LAST * H * D;
    float *q = rand_vec(qn), *dq = dev_put(d, q, F(qn)), *drow = dev_put(d, q, F(qn)); /* rows: each sequence's last query */
    for (int s = 0; s < NS; s++)
        d->be.ops->copy(&d->be.ctx, drow + (size_t)s * H * D, dq + ((size_t)s * LAST + LAST - 1) * H * D, F(H * D));
    int32_t *dpos = dev_put(d, pos, sizeof pos);
    const KnAttnRow *drows = dev_put(d, hrows, sizeof hrows);
    KnAttnSeq one[NS];
    for (int s = 0; s < NS; s++) one[s] = (KnAttnSeq){s, 1, hrows[s].table, dvalid, NULL};
    for (int window = 0; window <= 100; window += 100) {
        float *o1 = dev_poisoned(d, F((size_t)NS * H * D)), *o2 = dev_poisoned(d, F(qn));
        float *o3 = dev_poisoned(d, F((size_t)NS * H * D));
        d->be.ops->attention_rows(&d->be.ctx, o1, drow, dpos, dk, dv, KN_F32, BLK, drows, NS, H, KVH, D, 0.0625f, window);
        d->be.ops->attention_batch(&d->be.ctx, o3, drow, dpos, dk, dv, KN_F32, BLK, one, NS, H, KVH, D, 0.0625f, window);
        for (int s = 0; s < NS; s++) {
            KnKv kv = {dk, dv, hrows[s].table, BLK};
            KnMask m = {dvalid, NULL, window};
            size_t at = (size_t)s * LAST * H * D;
            d->be.ops->attention_paged(&d->be.ctx, o2 + at, dq + at, &kv, LAST, len[s] - LAST, len[s], H, KVH, D,
                                       0.0625f, &m);
        }
        float *a = malloc(F((size_t)NS * H * D)), *b = malloc(F(qn)), *c = malloc(F((size_t)NS * H * D));
        dev_get(d, a, o1, F((size_t)NS * H * D));
        dev_get(d, b, o2, F(qn));
        dev_get(d, c, o3, F((size_t)NS * H * D));
        int same = 1, finite = 1;
        for (int s = 0; s < NS; s++)
            same &= memcmp(a + (size_t)s * H * D, b + ((size_t)s * LAST + LAST - 1) * H * D, F(H * D)) == 0;
        for (size_t i = 0; i < (size_t)NS * H * D; i++) finite &= isfinite(a[i]);
        CHECK(same && finite, "%s: attention_rows over %d, %d and %d keys equals each prefill's last query (window %d)",
              d->be.name, len[0], len[1], len[2], window);
        CHECK(memcmp(a, c, F((size_t)NS * H * D)) == 0,
              "%s: attention_batch of one-query sequences equals attention_rows over long contexts (window %d)",
              d->be.name, window);
        free(a); free(b); free(c);
        /* bfloat16 stores (a device splits these rows' streams too): the widened stores' bits */
        uint16_t *k16, *v16;
        float *kw = bf16_store(d, k, store, &k16), *vw = bf16_store(d, v, store, &v16);
        float *e1 = dev_poisoned(d, F((size_t)NS * H * D)), *e2 = dev_poisoned(d, F((size_t)NS * H * D));
        d->be.ops->attention_rows(&d->be.ctx, e1, drow, dpos, k16, v16, KN_BF16, BLK, drows, NS, H, KVH, D, 0.0625f, window);
        d->be.ops->attention_rows(&d->be.ctx, e2, drow, dpos, kw, vw, KN_F32, BLK, drows, NS, H, KVH, D, 0.0625f, window);
        CHECK(same_finite(d, e1, e2, (size_t)NS * H * D),
              "%s: attention_rows over long contexts in bf16 stores equals it over the stores widened (window %d)",
              d->be.name, window);
    }
    for (int s = 0; s < NS; s++) free(tables[s]);
    free(valid); free(q); free(k); free(v);
    dev_reset(d);
}

/* ---- backward: each gradient kernel against central differences of a
 * double-precision forward written from the definition ---- */

/* The mask rule of ops.h, on host arrays. */
static int mask_visible(const KnMask *m, int64_t q, int64_t t) {
    if (!m->valid[t]) return 0;
    int causal = t <= q || (m->group && m->group[q] >= 0 && m->group[q] == m->group[t]);
    return causal && (m->window == 0 || t > q - m->window);
}

/* Attention of double inputs (same mask rule as the kernel's contract). */
static void ref_attention(double *out, const double *q, const double *k, const double *v, int nq, int pos0, int nk, int H,
                          int KVH, int D, double scale, const KnMask *m) {
    for (int i = 0; i < nq; i++)
        for (int h = 0; h < H; h++) {
            int g = h / (H / KVH);
            double s[64], mx = -INFINITY, sum = 0;
            for (int t = 0; t < nk; t++) {
                s[t] = -INFINITY;
                if (!mask_visible(m, pos0 + i, t)) continue;
                s[t] = 0;
                for (int d = 0; d < D; d++) s[t] += q[(i * H + h) * D + d] * k[(t * KVH + g) * D + d];
                s[t] *= scale;
                if (s[t] > mx) mx = s[t];
            }
            for (int d = 0; d < D; d++) out[(i * H + h) * D + d] = 0;
            for (int t = 0; t < nk; t++) sum += s[t] == -INFINITY ? 0 : exp(s[t] - mx);
            for (int t = 0; t < nk; t++)
                if (s[t] != -INFINITY)
                    for (int d = 0; d < D; d++) out[(i * H + h) * D + d] += exp(s[t] - mx) / sum * v[(t * KVH + g) * D + d];
        }
}

static double dot_d(const double *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* d/dx_i of sum(dy . f(x)) by central differences, for every i. */
typedef void (*RefFn)(double *y, const double *x, const void *ctx);
static void numeric_grad(double *g, RefFn f, const void *ctx, const float *x0, size_t nx, const float *dy, size_t ny) {
    double *x = malloc(nx * sizeof *x), *y = malloc(ny * sizeof *y);
    for (size_t i = 0; i < nx; i++) x[i] = x0[i];
    for (size_t i = 0; i < nx; i++) {
        double h = 1e-6, keep = x[i];
        x[i] = keep + h;
        f(y, x, ctx);
        double up = dot_d(y, dy, ny);
        x[i] = keep - h;
        f(y, x, ctx);
        g[i] = (up - dot_d(y, dy, ny)) / (2 * h);
        x[i] = keep;
    }
    free(x);
    free(y);
}

typedef struct { int rows, cols, n; const float *w; int dim; float eps; } LinCtx;
static void ref_linear(double *y, const double *x, const void *c) {
    const LinCtx *l = c;
    for (int i = 0; i < l->n; i++)
        for (int o = 0; o < l->rows; o++) {
            double acc = 0;
            for (int k = 0; k < l->cols; k++) acc += x[i * l->cols + k] * l->w[o * l->cols + k];
            y[i * l->rows + o] = acc;
        }
}
static void ref_rmsnorm(double *y, const double *x, const void *c) {
    const LinCtx *l = c;
    for (int r = 0; r < l->n; r++) {
        double ss = 0;
        for (int i = 0; i < l->dim; i++) ss += x[r * l->dim + i] * x[r * l->dim + i];
        double inv = 1.0 / sqrt(ss / l->dim + l->eps);
        for (int i = 0; i < l->dim; i++) y[r * l->dim + i] = x[r * l->dim + i] * inv * (l->w ? l->w[i] : 1.0);
    }
}
static void ref_gelu(double *y, const double *x, const void *c) {
    const LinCtx *l = c;
    for (int i = 0; i < l->n; i++) y[i] = 0.5 * x[i] * (1 + tanh(sqrt(2 / M_PI) * (x[i] + 0.044715 * x[i] * x[i] * x[i])));
}

static void test_matmul_rmsnorm_gelu_dx(Dev *d) {
    int shapes[][3] = {{3, 5, 2}, {17, 40, 3}, {300, 70, 4}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        float *w = rand_vec((size_t)rows * cols), *x = rand_vec((size_t)n * cols), *dy = rand_vec((size_t)n * rows);
        float *dx = rand_vec((size_t)n * cols), *dx0 = malloc((size_t)n * cols * sizeof *dx0);
        memcpy(dx0, dx, (size_t)n * cols * sizeof *dx0);
        double *g = malloc((size_t)n * cols * sizeof *g);
        LinCtx l = {rows, cols, n, w, 0, 0};
        numeric_grad(g, ref_linear, &l, x, (size_t)n * cols, dy, (size_t)n * rows);
        for (int i = 0; i < n * cols; i++) g[i] += dx0[i]; /* accumulates */
        float *ddx = dev_put(d, dx, F(n * cols));
        d->be.ops->matmul_dx(&d->be.ctx, ddx, dev_put(d, dy, F(n * rows)),
                             (KnMatrix){dev_put(d, w, F(rows * cols)), KN_F32, rows, cols, 0, 0}, n);
        dev_get(d, dx, ddx, F(n * cols));
        EXPECT_CLOSE(dx, g, (size_t)n * cols, 1e-5, "matmul_dx %dx%d n=%d", rows, cols, n);
        free(w); free(x); free(dy); free(dx); free(dx0); free(g);
        dev_reset(d);
    }
    int n = 5, dim = 24;
    float *x = rand_vec((size_t)n * dim), *w = rand_vec((size_t)dim), *dy = rand_vec((size_t)n * dim);
    float *dx = calloc((size_t)n * dim, sizeof *dx);
    double *g = malloc((size_t)n * dim * sizeof *g);
    float *d_x = dev_put(d, x, F(n * dim)), *d_w = dev_put(d, w, F(dim)), *d_dy = dev_put(d, dy, F(n * dim));
    float *d_dx = dev_alloc(d, F(n * dim));
    for (int with_w = 0; with_w < 2; with_w++) {
        LinCtx l = {0, 0, n, with_w ? w : NULL, dim, 1e-6f};
        numeric_grad(g, ref_rmsnorm, &l, x, (size_t)n * dim, dy, (size_t)n * dim);
        d->be.ops->memset(&d->be.ctx, d_dx, 0, F(n * dim));
        d->be.ops->rmsnorm_dx(&d->be.ctx, d_dx, d_x, with_w ? d_w : NULL, d_dy, n, dim, 1e-6f);
        dev_get(d, dx, d_dx, F(n * dim));
        EXPECT_CLOSE(dx, g, (size_t)n * dim, 1e-5, "rmsnorm_dx %s weight", with_w ? "with" : "without");
    }
    for (int i = 0; i < n * dim; i++) x[i] *= 3.0f;
    LinCtx l = {0, 0, n * dim, NULL, 0, 0};
    numeric_grad(g, ref_gelu, &l, x, (size_t)n * dim, dy, (size_t)n * dim);
    d->be.ops->upload(&d->be.ctx, d_x, x, F(n * dim));
    d->be.ops->memset(&d->be.ctx, d_dx, 0xFF, F(n * dim));
    d->be.ops->gelu_tanh_dx(&d->be.ctx, d_dx, d_x, d_dy, (size_t)(n * dim));
    dev_get(d, dx, d_dx, F(n * dim));
    EXPECT_CLOSE(dx, g, (size_t)n * dim, 1e-5, "gelu_tanh_dx%s", "");
    free(x); free(w); free(dy); free(dx); free(g);
    dev_reset(d);
}

/* y = gelu(g) * u over x = [g; u], n each (the gated GELU's definition) */
static void ref_gelu_gate(double *y, const double *x, const void *c) {
    const LinCtx *l = c;
    for (int i = 0; i < l->n; i++) {
        double v = x[i];
        y[i] = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))) * x[l->n + i];
    }
}

/* gelu_gate and gelu_gate_dx: the definition (the forward to 1e-6, the
 * gradients against central differences), in place as the engine calls
 * them (y over g; dg over g and du over u), a row stride for u, enough
 * elements to span many blocks; and on the CPU kinds, bit for bit what the
 * unfused ops give (copy, gelu_tanh, mul; mul, gelu_tanh_dx), which the
 * layers ran before. Outputs poisoned first. */
static void test_gelu_gate(Dev *d) {
    const int shapes[][3] = {{5, 24, 24}, {3, 7, 50}, {33, 517, 530}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], ld = shapes[s][2];
        size_t n = (size_t)rows * cols;
        float *gu = rand_vec(2 * n), *ub = rand_vec((size_t)rows * ld), *dy = rand_vec(n);
        float *y = malloc(F(n)), *y2 = malloc(F(n)), *dg = malloc(F(n)), *du = malloc(F(n));
        float *dg2 = malloc(F(n)), *du2 = malloc(F(n));
        for (size_t i = 0; i < n; i++) gu[i] *= 3.0f; /* g across gelu's bend */
        for (int r = 0; r < rows; r++) memcpy(ub + (size_t)r * ld, gu + n + (size_t)r * cols, F(cols));
        double *ref = malloc(2 * n * sizeof *ref);
        LinCtx l = {0, 0, (int)n, NULL, 0, 0};
        double *x = malloc(2 * n * sizeof *x);
        for (size_t i = 0; i < 2 * n; i++) x[i] = gu[i];
        ref_gelu_gate(ref, x, &l);
        float *d_g = dev_put(d, gu, F(n)), *d_u = dev_put(d, gu + n, F(n)), *d_ub = dev_put(d, ub, F(rows * ld));
        float *d_dy = dev_put(d, dy, F(n)), *d_y = dev_poisoned(d, F(n));
        d->be.ops->gelu_gate(&d->be.ctx, d_y, d_g, d_ub, rows, cols, ld);
        dev_get(d, y, d_y, F(n));
        EXPECT_CLOSE(y, ref, n, 1e-6, "gelu_gate %dx%d ld %d", rows, cols, ld);
        /* the unfused ops, and in place */
        d->be.ops->copy(&d->be.ctx, d_y, d_g, F(n));
        d->be.ops->gelu_tanh(&d->be.ctx, d_y, n);
        d->be.ops->mul(&d->be.ctx, d_y, d_y, d_ub, rows, cols, ld);
        dev_get(d, y2, d_y, F(n));
        float *d_g2 = dev_put(d, gu, F(n));
        d->be.ops->gelu_gate(&d->be.ctx, d_g2, d_g2, d_u, rows, cols, cols);
        float *yi = malloc(F(n));
        dev_get(d, yi, d_g2, F(n));
        if (d->be.ctx.device != KN_DEVICE_CUDA) {
            CHECK(memcmp(y, y2, F(n)) == 0, "gelu_gate %dx%d: the bits of gelu_tanh then mul", rows, cols);
            CHECK(memcmp(y, yi, F(n)) == 0, "gelu_gate %dx%d: in place, the same bits", rows, cols);
        } else {
            EXPECT_CLOSE(yi, ref, n, 1e-6, "gelu_gate %dx%d in place", rows, cols);
        }
        /* the gradients: written, then in place over g and u */
        if (n <= 200) {
            numeric_grad(ref, ref_gelu_gate, &l, gu, 2 * n, dy, n);
        } else { /* too many for differences: the derivative's formula in double */
            for (size_t i = 0; i < n; i++) {
                double v = gu[i], c0 = sqrt(2 / M_PI), th = tanh(c0 * (v + 0.044715 * v * v * v));
                double slope = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * c0 * (1 + 3 * 0.044715 * v * v);
                ref[i] = (double)dy[i] * gu[n + i] * slope;
                ref[n + i] = (double)dy[i] * 0.5 * v * (1 + th);
            }
        }
        float *d_dg = dev_poisoned(d, F(n)), *d_du = dev_poisoned(d, F(n));
        d->be.ops->gelu_gate_dx(&d->be.ctx, d_dg, d_du, d_dy, d_g, d_u, n);
        dev_get(d, dg, d_dg, F(n));
        dev_get(d, du, d_du, F(n));
        EXPECT_CLOSE(dg, ref, n, 1e-5, "gelu_gate_dx %dx%d: dg", rows, cols);
        EXPECT_CLOSE(du, ref + n, n, 1e-5, "gelu_gate_dx %dx%d: du", rows, cols);
        float *d_gi = dev_put(d, gu, F(n)), *d_ui = dev_put(d, gu + n, F(n));
        d->be.ops->gelu_gate_dx(&d->be.ctx, d_gi, d_ui, d_dy, d_gi, d_ui, n);
        dev_get(d, dg2, d_gi, F(n));
        dev_get(d, du2, d_ui, F(n));
        CHECK(memcmp(dg, dg2, F(n)) == 0 && memcmp(du, du2, F(n)) == 0,
              "gelu_gate_dx %dx%d: over g and u, the same bits", rows, cols);
        if (d->be.ctx.device != KN_DEVICE_CUDA) {
            d->be.ops->mul(&d->be.ctx, d_dg, d_dy, d_u, rows, cols, cols);
            d->be.ops->gelu_tanh_dx(&d->be.ctx, d_dg, d_g, d_dg, n);
            d->be.ops->copy(&d->be.ctx, d_du, d_g, F(n));
            d->be.ops->gelu_tanh(&d->be.ctx, d_du, n);
            d->be.ops->mul(&d->be.ctx, d_du, d_dy, d_du, rows, cols, cols);
            dev_get(d, dg2, d_dg, F(n));
            dev_get(d, du2, d_du, F(n));
            CHECK(memcmp(dg, dg2, F(n)) == 0 && memcmp(du, du2, F(n)) == 0,
                  "gelu_gate_dx %dx%d: the bits of mul, gelu_tanh_dx and gelu_tanh", rows, cols);
        }
        free(gu); free(ub); free(dy); free(y); free(y2); free(yi); free(dg); free(du); free(dg2); free(du2);
        free(ref); free(x);
        dev_reset(d);
    }
}

typedef struct { int nq, pos0, nk, H, KVH, D, which; const float *q, *k, *v; const KnMask *m; } AttCtx;
/* Attention as a function of one of q (0), k (1), v (2). */
static void ref_attention_of(double *y, const double *x, const void *c) {
    const AttCtx *a = c;
    size_t nqv = (size_t)a->nq * a->H * a->D, nkv = (size_t)a->nk * a->KVH * a->D;
    double *q = malloc(nqv * sizeof *q), *k = malloc(nkv * sizeof *k), *v = malloc(nkv * sizeof *v);
    for (size_t i = 0; i < nqv; i++) q[i] = a->which == 0 ? x[i] : a->q[i];
    for (size_t i = 0; i < nkv; i++) { k[i] = a->which == 1 ? x[i] : a->k[i]; v[i] = a->which == 2 ? x[i] : a->v[i]; }
    ref_attention(y, q, k, v, a->nq, a->pos0, a->nk, a->H, a->KVH, a->D, 0.5, a->m);
    free(q); free(k); free(v);
}

/* attention_dx at Gemma 4's head dims over several key chunks, causal with
 * a bidirectional block and sliding, against the CPU backend's (checked by
 * central differences above): dq written, dk and dv added to what is there,
 * the same on a second run (no scheduling in the sums). */
static void attention_dx_run(Dev *d, const float *const *h, int nq, int nk, int H, int KVH, int D, const uint8_t *valid,
                             const int32_t *group, int win, float *out) {
    size_t nqv = (size_t)nq * H * D, nkv = (size_t)nk * KVH * D;
    KnMask dm = {dev_put(d, valid, (size_t)nk), dev_put(d, group, (size_t)nk * sizeof *group), win};
    float *dq = dev_poisoned(d, F(nqv)), *dk = dev_put(d, h[4], F(nkv)), *dv = dev_put(d, h[5], F(nkv));
    d->be.ops->attention_dx(&d->be.ctx, dq, dk, dv, dev_put(d, h[0], F(nqv)), dev_put(d, h[1], F(nkv)),
                            dev_put(d, h[2], F(nkv)), dev_put(d, h[3], F(nqv)), nq, 0, nk, H, KVH, D,
                            1.0f / sqrtf((float)D), &dm);
    dev_get(d, out, dq, F(nqv));
    dev_get(d, out + nqv, dk, F(nkv));
    dev_get(d, out + nqv + nkv, dv, F(nkv));
    dev_reset(d);
}

static void test_attention_dx_shapes(Dev *d) {
    Dev cpu;
    CHECK(dev_open(&cpu, KN_DEVICE_CPU, 1), "cpu backend");
    const int dims[2] = {256, 512};
    for (int di = 0; di < 2; di++) {
        int D = dims[di], n = 45, H = 8, KVH = 2;
        size_t nqv = (size_t)n * H * D, nkv = (size_t)n * KVH * D, total = nqv + 2 * nkv;
        float *h[6] = {rand_vec(nqv), rand_vec(nkv), rand_vec(nkv), rand_vec(nqv), rand_vec(nkv), rand_vec(nkv)};
        uint8_t *valid = malloc((size_t)n);
        int32_t *group = malloc((size_t)n * sizeof *group);
        for (int t = 0; t < n; t++) {
            valid[t] = t != 3;
            group[t] = t >= 10 && t < 20 ? 0 : -1; /* an image's block sees itself both ways */
        }
        for (int win = 0; win <= 16; win += 16) {
            float *got = malloc(F(total)), *again = malloc(F(total)), *want = malloc(F(total));
            attention_dx_run(d, (const float *const *)h, n, n, H, KVH, D, valid, group, win, got);
            attention_dx_run(d, (const float *const *)h, n, n, H, KVH, D, valid, group, win, again);
            attention_dx_run(&cpu, (const float *const *)h, n, n, H, KVH, D, valid, group, win, want);
            double *ref = malloc(total * sizeof *ref);
            for (size_t i = 0; i < total; i++) ref[i] = want[i];
            EXPECT_CLOSE(got, ref, nqv, 1e-5, "attention_dx dq head_dim %d window %d", D, win);
            EXPECT_CLOSE(got + nqv, ref + nqv, 2 * nkv, 1e-5, "attention_dx dk, dv head_dim %d window %d", D, win);
            CHECK(memcmp(got, again, F(total)) == 0, "%s: attention_dx head_dim %d: the same on a second run", d->be.name, D);
            free(got); free(again); free(want); free(ref);
        }
        for (int i = 0; i < 6; i++) free(h[i]);
        free(valid); free(group);
    }
    dev_close(&cpu);
}

/* attention_dx against central differences: causal, sliding and with a
 * bidirectional block, at head dims 8, 2 (fewer floats than the CPU
 * kernel's row statistics take, which it then recomputes) and 13 (odd:
 * every dot product's and accumulation's tail). */
static void test_attention_dx_dim(Dev *d, int D) {
    int nq = 9, pos0 = 3, nk = 12, H = 4, KVH = 2, W = 4;
    size_t nqv = (size_t)nq * H * D, nkv = (size_t)nk * KVH * D;
    float *q = rand_vec(nqv), *k = rand_vec(nkv), *v = rand_vec(nkv), *dout = rand_vec(nqv);
    uint8_t valid[12] = {1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1};
    int32_t group[12] = {-1, -1, -1, -1, 0, 0, 0, 0, 0, -1, -1, -1};
    for (int variant = 0; variant < 3; variant++) {
        KnMask m = {valid, variant == 2 ? group : NULL, variant == 0 ? 0 : W};
        KnMask dm = {dev_put(d, valid, sizeof valid), variant == 2 ? dev_put(d, group, sizeof group) : NULL, m.window};
        float *dq = malloc(nqv * sizeof *dq), *dk = calloc(nkv, sizeof *dk), *dv = calloc(nkv, sizeof *dv);
        float *d_dq = dev_poisoned(d, F(nqv)), *d_dk = dev_put(d, dk, F(nkv)), *d_dv = dev_put(d, dv, F(nkv));
        d->be.ops->attention_dx(&d->be.ctx, d_dq, d_dk, d_dv, dev_put(d, q, F(nqv)), dev_put(d, k, F(nkv)),
                                dev_put(d, v, F(nkv)), dev_put(d, dout, F(nqv)), nq, pos0, nk, H, KVH, D, 0.5f, &dm);
        dev_get(d, dq, d_dq, F(nqv));
        dev_get(d, dk, d_dk, F(nkv));
        dev_get(d, dv, d_dv, F(nkv));
        double *g = malloc(nqv * sizeof *g);
        for (int which = 0; which < 3; which++) {
            AttCtx a = {nq, pos0, nk, H, KVH, D, which, q, k, v, &m};
            const float *x = which == 0 ? q : which == 1 ? k : v;
            size_t nx = which == 0 ? nqv : nkv;
            numeric_grad(g, ref_attention_of, &a, x, nx, dout, nqv);
            EXPECT_CLOSE(which == 0 ? dq : which == 1 ? dk : dv, g, nx, 1e-5, "attention_dx d%c variant %d head_dim %d",
                         "qkv"[which], variant, D);
        }
        free(dq); free(dk); free(dv); free(g);
        dev_reset(d);
    }
    free(q); free(k); free(v); free(dout);
}

static void test_attention_dx(Dev *d) {
    const int dims[] = {8, 2, 13};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) test_attention_dx_dim(d, dims[i]);
}

static void test_conversions(void) {
    CHECK(kn_f32_to_bf16(1.0f) == 0x3F80 && kn_bf16_to_f32(0x3F80) == 1.0f, "bf16 one");
    CHECK(kn_f32_to_bf16(1.00390625f) == 0x3F80, "round to nearest even (tie down)");
    CHECK(kn_f32_to_bf16(1.01171875f) == 0x3F82, "round to nearest even (tie up)");
    CHECK(kn_f16_to_f32(0x3C00) == 1.0f && kn_f16_to_f32(0xC000) == -2.0f && kn_f16_to_f32(0x0001) == ldexpf(1, -24), "f16");
    CHECK(isnan(kn_bf16_to_f32(kn_f32_to_bf16(NAN))), "NaN stays NaN");
    /* kn_convert_to_f32 widens bf16 four at a time: every pattern, from
     * every start modulo 4 and lengths off the vector, as one at a time */
    uint16_t *all = malloc(65536 * sizeof *all);
    float *wide = malloc(F(65536));
    for (int i = 0; i < 65536; i++) all[i] = (uint16_t)i;
    int same = 1;
    for (int start = 0; start < 4; start++)
        for (int64_t len = 65536 - 8; len <= 65536 - start; len++) {
            kn_convert_to_f32(wide, all, KN_BF16, start, len);
            for (int64_t i = 0; i < len && same; i++) {
                float one = kn_bf16_to_f32(all[start + i]);
                same = memcmp(&wide[i], &one, sizeof one) == 0;
            }
        }
    CHECK(same, "bf16 widened in bulk equals one at a time, every pattern%s", "");
    free(all); free(wide);
}

/* ---- the small ops ---- */

static void test_elementwise(Dev *d) {
    int rows = 5, cols = 37, ld = 3 * cols;
    size_t n = (size_t)rows * cols;
    float *a = rand_vec(n), *b = rand_vec((size_t)rows * ld), *y = malloc(F(n));
    double *ref = malloc(n * sizeof *ref);
    float *da = dev_put(d, a, F(n)), *db = dev_put(d, b, F(rows * ld)), *dy = dev_poisoned(d, F(n));
    d->be.ops->add(&d->be.ctx, dy, da, db, n);
    dev_get(d, y, dy, F(n));
    for (size_t i = 0; i < n; i++) ref[i] = (double)a[i] + b[i];
    EXPECT_CLOSE(y, ref, n, 1e-7, "add%s", "");
    d->be.ops->mul(&d->be.ctx, dy, da, db + cols, rows, cols, ld);
    dev_get(d, y, dy, F(n));
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) ref[r * cols + c] = (double)a[r * cols + c] * b[r * ld + cols + c];
    EXPECT_CLOSE(y, ref, n, 1e-7, "mul with a row stride%s", "");
    d->be.ops->mul(&d->be.ctx, da, da, db, rows, cols, ld); /* in place */
    d->be.ops->scale(&d->be.ctx, da, n, -0.75f);
    dev_get(d, y, da, F(n));
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) ref[r * cols + c] = (double)a[r * cols + c] * b[r * ld + c] * -0.75;
    EXPECT_CLOSE(y, ref, n, 1e-6, "mul in place, then scale%s", "");
    free(a); free(b); free(y); free(ref);
    dev_reset(d);
}

/* round_bf16 and widen_bf16: the host's bits (kn_f32_to_bf16), ties to
 * even both ways, NaN, infinities, zeros, subnormals and the largest
 * floats (which round to infinity), over enough elements to span many
 * blocks of a device's launch; outputs poisoned first. */
static void test_bf16_round(Dev *d) {
    static const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f807fffu, 0x7f7fffffu, 0xff7fffffu,
                                       0x7f800000u, 0xff800000u, 0x7f800001u, 0xffc00001u, 0x00000000u, 0x80000000u,
                                       0x00000001u, 0x00018000u, 0x807fffffu, 0x7f7f8000u};
    size_t ns = sizeof special / sizeof *special, n = 100003;
    float *x = rand_vec(n), *got = malloc(F(n)), *wide = malloc(F(n));
    uint16_t *kept = malloc(n * sizeof *kept);
    for (size_t i = 0; i < n; i++) x[i] *= (float)ldexp(1.0, (int)(i % 61) - 30); /* many exponents */
    for (size_t i = 0; i < ns; i++) memcpy(&x[i * 997], &special[i], 4);
    float *dx = dev_put(d, x, F(n)), *dw = dev_poisoned(d, F(n));
    uint16_t *dk = dev_poisoned(d, n * sizeof *kept);
    d->be.ops->round_bf16(&d->be.ctx, dk, dx, n);
    d->be.ops->widen_bf16(&d->be.ctx, dw, dk, n);
    dev_get(d, kept, dk, n * sizeof *kept);
    dev_get(d, got, dx, F(n));
    dev_get(d, wide, dw, F(n));
    size_t bad = 0, first = n;
    for (size_t i = 0; i < n; i++) {
        uint16_t want = kn_f32_to_bf16(x[i]);
        float back = kn_bf16_to_f32(want);
        if (kept[i] != want || memcmp(&got[i], &back, 4) || memcmp(&wide[i], &back, 4)) {
            if (!bad++) first = i;
        }
    }
    CHECK(!bad, "%s: round_bf16 / widen_bf16 gave the host's bits (%zu differ, the first at %zu)", d->be.name, bad, first);
    uint16_t tie_even = kn_f32_to_bf16(1.00390625f), tie_odd = kn_f32_to_bf16(1.01171875f);
    CHECK(tie_even == 0x3f80 && tie_odd == 0x3f82 && kn_f32_to_bf16(FLT_MAX) == 0x7f80 &&
              isnan(kn_bf16_to_f32(kn_f32_to_bf16(NAN))),
          "the host's rounding: ties to even (%04x %04x), FLT_MAX to infinity, NaN stays NaN", tie_even, tie_odd);
    /* rows_scatter_bf16: rows of x (the specials among them) into slots out
     * of order, a skipped row's slot left as it was */
    enum { ROWS = 9, DIM = 997, SLOTS = 12 };
    int32_t idx[ROWS] = {7, 0, -1, 11, 3, 5, 2, 10, 8};
    uint16_t *store = malloc(SLOTS * DIM * sizeof *store), *want = malloc(SLOTS * DIM * sizeof *want);
    memset(want, 0xA5, SLOTS * DIM * sizeof *want);
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; idx[r] >= 0 && j < DIM; j++) want[idx[r] * DIM + j] = kn_f32_to_bf16(x[r * DIM + j]);
    uint16_t *ds = dev_alloc(d, SLOTS * DIM * sizeof *store);
    d->be.ops->memset(&d->be.ctx, ds, 0xA5, SLOTS * DIM * sizeof *store);
    d->be.ops->rows_scatter_bf16(&d->be.ctx, ds, dev_put(d, x, F(ROWS * DIM)), dev_put(d, idx, sizeof idx), ROWS, DIM);
    dev_get(d, store, ds, SLOTS * DIM * sizeof *store);
    CHECK(memcmp(store, want, SLOTS * DIM * sizeof *store) == 0, "%s: rows_scatter_bf16 stores the host's bits in their slots",
          d->be.name);
    free(store); free(want);
    free(x); free(got); free(wide); free(kept);
    dev_reset(d);
}

/* rope_rows: every row at its own position; the 2-D vision form (each head
 * split in two halves rotated at the x and y positions) through strides. */
static void test_rope_rows(Dev *d) {
    int rows = 6, heads = 2, dim = 16;
    float inv[8];
    for (int i = 0; i < 8; i++) inv[i] = i < 6 ? (float)pow(1e4, -2.0 * i / dim) : 0.0f;
    int32_t pos[12];
    for (int i = 0; i < 12; i++) pos[i] = 7 * i + (i % 3) * 1000;
    size_t n = (size_t)rows * heads * dim;
    float *x = rand_vec(n), *y = malloc(F(n));
    double *ref = malloc(n * sizeof *ref);
    for (int pass = 0; pass < 2; pass++) {
        /* pass 0: whole heads at pos[r]; pass 1: halves of dim/2 at pos[2r], pos[2r + 1] */
        int sub = pass ? dim / 2 : dim;
        for (int r = 0; r < rows; r++)
            for (int h = 0; h < heads; h++)
                for (int part = 0; part < dim / sub; part++) {
                    const float *xh = x + (r * heads + h) * dim + part * sub;
                    double *rh = ref + (r * heads + h) * dim + part * sub;
                    int32_t p = pass ? pos[2 * r + part] : pos[r];
                    for (int i = 0; i < sub / 2; i++) {
                        double th = (double)((float)p * inv[i]), u = xh[i], v = xh[i + sub / 2];
                        rh[i] = u * cos(th) - v * sin(th);
                        rh[i + sub / 2] = v * cos(th) + u * sin(th);
                    }
                }
        float *dx = dev_put(d, x, F(n)), *dinv = dev_put(d, inv, sizeof inv);
        int32_t *dpos = dev_put(d, pos, sizeof pos);
        if (!pass) d->be.ops->rope_rows(&d->be.ctx, dx, rows, heads, dim, dim, dinv, dpos, 1);
        else {
            d->be.ops->rope_rows(&d->be.ctx, dx, rows, heads, sub, dim, dinv, dpos, 2);
            d->be.ops->rope_rows(&d->be.ctx, dx + sub, rows, heads, sub, dim, dinv, dpos + 1, 2);
        }
        dev_get(d, y, dx, F(n));
        EXPECT_CLOSE(y, ref, n, 1e-4, "rope_rows %s", pass ? "2-D halves" : "per row");
    }
    free(x); free(y); free(ref);
    dev_reset(d);
}

/* rows_scatter stores K/V rows where a paged attention reads them (the
 * engine's slot of position p: table[p / block_len] * block_len + p %
 * block_len), leaving the other rows as they were; embed_rows gathers rows
 * of a bf16 table. */
static void test_kv_store_embed_rows(Dev *d) {
    enum { BLK = 3, SLOTS = 5, ROW = 6, N = 7, POS0 = 4 };
    int32_t table[SLOTS] = {4, 1, 3, 0, 2}, slot[N];
    float *src = rand_vec((size_t)N * ROW), store[SLOTS * BLK * ROW], *before = rand_vec((size_t)SLOTS * BLK * ROW);
    for (int i = 0; i < N; i++) slot[i] = table[(POS0 + i) / BLK] * BLK + (POS0 + i) % BLK;
    float *dstore = dev_put(d, before, sizeof store);
    d->be.ops->rows_scatter(&d->be.ctx, dstore, dev_put(d, src, F(N * ROW)), dev_put(d, slot, sizeof slot), N, ROW);
    dev_get(d, store, dstore, sizeof store);
    int ok = 1, stored[SLOTS * BLK] = {0};
    for (int i = 0; i < N; i++) {
        ok &= memcmp(store + slot[i] * ROW, src + i * ROW, ROW * sizeof(float)) == 0;
        stored[slot[i]] = 1;
    }
    for (int r = 0; r < SLOTS * BLK; r++) ok &= stored[r] || memcmp(store + r * ROW, before + r * ROW, ROW * sizeof(float)) == 0;
    CHECK(ok, "K/V rows land in block table[p / block_len], row p %% block_len%s", "");
    free(before);
    int V = 11, C = 9;
    int32_t ids[4] = {10, 0, 10, 3};
    uint16_t *tb = malloc((size_t)V * C * 2);
    float *tf = rand_vec((size_t)V * C), out[4 * 9];
    for (int i = 0; i < V * C; i++) tb[i] = kn_f32_to_bf16(tf[i]);
    float *dout = dev_poisoned(d, sizeof out);
    d->be.ops->embed_rows(&d->be.ctx, dout, (KnMatrix){dev_put(d, tb, (size_t)V * C * 2), KN_BF16, V, C, 0, 0},
                          dev_put(d, ids, sizeof ids), 4, 2.5f);
    dev_get(d, out, dout, sizeof out);
    double ref[4 * 9];
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < C; c++) ref[i * C + c] = (double)kn_bf16_to_f32(tb[ids[i] * C + c]) * 2.5;
    EXPECT_CLOSE(out, ref, (size_t)4 * C, 1e-7, "embed_rows%s", "");
    free(src); free(tb); free(tf);
    dev_reset(d);
}

/* A table in host memory the device reads (alloc_mapped, where the backend
 * has it): written by plain stores, sealed, then gathered by embed_rows as
 * from device memory, and freed with the rest. */
static void test_mapped_table(Dev *d) {
    if (!d->be.ops->alloc_mapped) {
        printf("%-40s %s\n", "mapped table", "no mapped memory on this backend");
        return;
    }
    enum { V = 37, C = 96, N = 5 };
    GfError err;
    CHECK(d->n < DEV_MAX_BUFS, "room for the mapped buffer%s", "");
    KnBuffer *buf = &d->bufs[d->n];
    CHECK_STATUS(d->be.ops->alloc_mapped(&d->be.ctx, buf, (size_t)V * C * 2, KN_BF16, "a test table", &err), GF_OK, err);
    if (!buf->data) return;
    d->n++;
    CHECK(buf->mapped == 1, "a mapped buffer says so%s", "");
    float *tf = rand_vec((size_t)V * C);
    uint16_t *tb = buf->data; /* the host's stores, at the address the device reads */
    for (int i = 0; i < V * C; i++) tb[i] = kn_f32_to_bf16(tf[i]);
    if (d->be.ops->seal) d->be.ops->seal(&d->be.ctx, buf);
    int32_t ids[N] = {36, 0, 17, 36, 5};
    float out[N * C];
    float *dout = dev_poisoned(d, sizeof out);
    d->be.ops->embed_rows(&d->be.ctx, dout, (KnMatrix){buf->data, KN_BF16, V, C, 0, 0}, dev_put(d, ids, sizeof ids), N, 1.0f);
    dev_get(d, out, dout, sizeof out);
    int same = 1;
    for (int i = 0; i < N; i++)
        for (int c = 0; c < C; c++) same &= out[i * C + c] == kn_bf16_to_f32(kn_f32_to_bf16(tf[ids[i] * C + c]));
    CHECK(same, "embed_rows gathers a table from mapped host memory exactly%s", "");
    free(tf);
    dev_reset(d);
}

/* ---- grouped LoRA: two segments with their own adapters (different
 * ranks), a gap row no adapter touches, dropout on one segment ---- */

typedef struct { int in, out, n; const float *A[2], *B[2]; int rank[2]; float scale[2]; int64_t row0[2], rows[2];
                 float p[2]; uint64_t seed[2]; int which; const float *x; } LoraRef;

static uint64_t ref_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double ref_factor(const LoraRef *l, int s, int64_t i, int j) {
    if (!(l->p[s] > 0)) return 1.0;
    uint32_t cut = (uint32_t)((double)l->p[s] * 4294967296.0);
    return (uint32_t)(ref_mix64(l->seed[s] + (uint64_t)i * l->in + (uint64_t)j) >> 32) < cut ? 0.0 : 1.0 / (1.0 - l->p[s]);
}

/* The adapters' term of every row, as a function of v: x (which 0), or A
 * (1) or B (2) of segment 0, everything else held at its value. */
static void ref_lora_of(double *y, const double *v, const void *c) {
    const LoraRef *l = c;
    for (int64_t r = 0; r < l->n; r++)
        for (int o = 0; o < l->out; o++) y[r * l->out + o] = 0;
    for (int s = 0; s < 2; s++)
        for (int64_t i = 0; i < l->rows[s]; i++) {
            int64_t r = l->row0[s] + i;
            for (int k = 0; k < l->rank[s]; k++) {
                double t = 0;
                for (int j = 0; j < l->in; j++) {
                    double a = s == 0 && l->which == 1 ? v[k * l->in + j] : l->A[s][k * l->in + j];
                    double x = l->which == 0 ? v[r * l->in + j] : l->x[r * l->in + j];
                    t += x * ref_factor(l, s, i, j) * a;
                }
                for (int o = 0; o < l->out; o++) {
                    double b = s == 0 && l->which == 2 ? v[o * l->rank[s] + k] : l->B[s][o * l->rank[s] + k];
                    y[r * l->out + o] += t * l->scale[s] * b;
                }
            }
        }
}

/* Serving segments (no gradients) of many rows and ranks, so the CUDA
 * kernels' row and rank tiles end short (21 rows, rank 37; 3 rows, rank
 * 16), with dropout on the first: against the double reference, and each
 * row of the first segment run alone (a one-row segment over the same
 * adapter at its place) equals its value in the batch bit for bit. */
static void test_lora_serving(Dev *d) {
    enum { SIN = 70, SOUT = 45, SN = 24, SR = 37 };
    LoraRef l = {SIN, SOUT, SN, {0}, {0}, {SR, 16}, {0.25f, 1.5f}, {0, 21}, {21, 3}, {0.2f, 0.0f}, {99, 0}, 0, NULL};
    float *A0 = rand_vec((size_t)SR * SIN), *B0 = rand_vec((size_t)SOUT * SR), *A1 = rand_vec((size_t)16 * SIN);
    float *B1 = rand_vec((size_t)SOUT * 16), *x = rand_vec((size_t)SN * SIN), *y0 = rand_vec((size_t)SN * SOUT);
    l.A[0] = A0; l.A[1] = A1; l.B[0] = B0; l.B[1] = B1; l.x = x;
    double *ref = malloc((size_t)SN * SOUT * sizeof *ref);
    for (int64_t r = 0; r < SN; r++)
        for (int o = 0; o < SOUT; o++) {
            int sg = r < 21 ? 0 : 1;
            int64_t i = r - l.row0[sg];
            double acc = y0[r * SOUT + o];
            for (int k = 0; k < l.rank[sg]; k++) {
                double t = 0;
                for (int j = 0; j < SIN; j++) t += (double)x[r * SIN + j] * ref_factor(&l, sg, i, j) * l.A[sg][k * SIN + j];
                acc += t * l.scale[sg] * l.B[sg][o * l.rank[sg] + k];
            }
            ref[r * SOUT + o] = acc;
        }
    float *dA0 = dev_put(d, A0, F(SR * SIN)), *dB0 = dev_put(d, B0, F(SOUT * SR));
    KnLoraSeg segs[2] = {{0, 21, dA0, dB0, NULL, NULL, SR, 0.25f, 0.2f, 99},
                         {21, 3, dev_put(d, A1, F(16 * SIN)), dev_put(d, B1, F(SOUT * 16)), NULL, NULL, 16, 1.5f, 0, 0}};
    float *dx = dev_put(d, x, F(SN * SIN)), *dy = dev_put(d, y0, F(SN * SOUT)), *t = dev_poisoned(d, F(SN * SR));
    float *buf = dev_alloc(d, F(2 * SIN)), *y = malloc(F(SN * SOUT)), *one = malloc(F(SN * SOUT));
    d->be.ops->lora_shrink(&d->be.ctx, t, SR, dx, segs, 2, SIN, buf);
    d->be.ops->lora_expand(&d->be.ctx, dy, t, SR, segs, 2, SOUT);
    dev_get(d, y, dy, F(SN * SOUT));
    EXPECT_CLOSE(y, ref, (size_t)SN * SOUT, 1e-6, "lora serving segments of %d and %d rows", 21, 3);
    int same = 1;
    float *dy1 = dev_alloc(d, F(SN * SOUT));
    for (int r = 0; r < 21; r++) { /* row r alone: its dropout mask is its own row's (seed offset by r) */
        KnLoraSeg alone = {r, 1, dA0, dB0, NULL, NULL, SR, 0.25f, 0.2f, 99 + (uint64_t)r * SIN};
        d->be.ops->upload(&d->be.ctx, dy1, y0, F(SN * SOUT));
        d->be.ops->lora_shrink(&d->be.ctx, t, SR, dx, &alone, 1, SIN, buf);
        d->be.ops->lora_expand(&d->be.ctx, dy1, t, SR, &alone, 1, SOUT);
        dev_get(d, one, dy1, F(SN * SOUT));
        same &= memcmp(one + r * SOUT, y + r * SOUT, F(SOUT)) == 0;
    }
    CHECK(same, "a row's LoRA term alone equals its term in a segment of %d rows, bit for bit", 21);
    free(A0); free(B0); free(A1); free(B1); free(x); free(y0); free(ref); free(y); free(one);
    dev_reset(d);
}

/* lora_shrink_dx in the two calls that lora_backward_weights and
 * lora_backward_input make for a linear whose input its gradient is written
 * over: dA alone (dx NULL), then dx alone (dA NULL, x NULL: not read). */
static void lora_shrink_dx_split(Dev *d, float *ddx, const float *gt, int64_t ld_t, const float *x,
                                 const KnLoraSeg *segs, int n_segs, int64_t in, float *buf) {
    KnLoraSeg only_dx[2];
    d->be.ops->lora_shrink_dx(&d->be.ctx, NULL, gt, ld_t, x, segs, n_segs, in, buf);
    for (int i = 0; i < n_segs && i < 2; i++) {
        only_dx[i] = segs[i];
        only_dx[i].dA = NULL;
    }
    d->be.ops->lora_shrink_dx(&d->be.ctx, ddx, gt, ld_t, NULL, only_dx, n_segs, in, buf);
}

/* The split calls' dx and dA [rank0, in] of segs[0] (fresh, zeroed) equal
 * the one call's, bit for bit. */
static void expect_split_same(Dev *d, const float *gt, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                              int64_t n, int64_t in, float *buf, const float *want_dx, const float *want_dA,
                              const char *what) {
    KnLoraSeg fresh[2];
    float *gA[2] = {NULL, NULL};
    for (int i = 0; i < n_segs && i < 2; i++) {
        fresh[i] = segs[i];
        gA[i] = dev_alloc(d, F(segs[i].rank * in));
        d->be.ops->memset(&d->be.ctx, gA[i], 0, F(segs[i].rank * in));
        fresh[i].dA = gA[i];
    }
    float *ddx = dev_alloc(d, F(n * in)), *got_dx = malloc(F(n * in)), *got_dA = malloc(F(segs[0].rank * in));
    d->be.ops->memset(&d->be.ctx, ddx, 0, F(n * in));
    lora_shrink_dx_split(d, ddx, gt, ld_t, x, fresh, n_segs, in, buf);
    dev_get(d, got_dx, ddx, F(n * in));
    dev_get(d, got_dA, gA[0], F(segs[0].rank * in));
    CHECK(memcmp(got_dx, want_dx, F(n * in)) == 0 && memcmp(got_dA, want_dA, F(segs[0].rank * in)) == 0,
          "%s: lora_shrink_dx as dA alone, then dx alone without x, equals the one call, bit for bit", what);
    free(got_dx);
    free(got_dA);
}

static void test_lora(Dev *d) {
    int in = 40, out = 23, n = 9, R = 6;
    LoraRef l = {in, out, n, {0}, {0}, {6, 3}, {0.5f, 2.0f}, {0, 5}, {4, 4}, {0.0f, 0.0f}, {0, 0}, 0, NULL};
    float *A0 = rand_vec((size_t)6 * in), *B0 = rand_vec((size_t)out * 6), *A1 = rand_vec((size_t)3 * in),
          *B1 = rand_vec((size_t)out * 3), *x = rand_vec((size_t)n * in), *y0 = rand_vec((size_t)n * out);
    l.A[0] = A0; l.A[1] = A1; l.B[0] = B0; l.B[1] = B1; l.x = x;
    for (int drop = 0; drop < 2; drop++) {
        l.p[1] = drop ? 0.3f : 0.0f;
        l.seed[1] = 0x1234567ull;
        /* forward against the double reference: y = y0 + term; row 4 untouched */
        double *ref = malloc((size_t)n * out * sizeof *ref);
        for (int64_t r = 0; r < n; r++)
            for (int o = 0; o < out; o++) {
                int s = r < 4 ? 0 : r >= 5 ? 1 : -1;
                double acc = y0[r * out + o];
                if (s >= 0) {
                    int64_t i = r - l.row0[s];
                    for (int k = 0; k < l.rank[s]; k++) {
                        double t = 0;
                        for (int j = 0; j < in; j++) t += (double)x[r * in + j] * ref_factor(&l, s, i, j) * l.A[s][k * in + j];
                        acc += t * l.scale[s] * l.B[s][o * l.rank[s] + k];
                    }
                }
                ref[r * out + o] = acc;
            }
        float *dA[2] = {dev_put(d, A0, F(6 * in)), dev_put(d, A1, F(3 * in))};
        float *dB[2] = {dev_put(d, B0, F(out * 6)), dev_put(d, B1, F(out * 3))};
        float *gA[2] = {dev_alloc(d, F(6 * in)), dev_alloc(d, F(3 * in))}, *gB[2] = {dev_alloc(d, F(out * 6)), dev_alloc(d, F(out * 3))};
        KnLoraSeg segs[2];
        for (int s = 0; s < 2; s++) {
            d->be.ops->memset(&d->be.ctx, gA[s], 0, F(l.rank[s] * in));
            d->be.ops->memset(&d->be.ctx, gB[s], 0, F(out * l.rank[s]));
            segs[s] = (KnLoraSeg){l.row0[s], l.rows[s], dA[s], dB[s], gA[s], gB[s], l.rank[s], l.scale[s], l.p[s], l.seed[s]};
        }
        float *dx = dev_put(d, x, F(n * in)), *dy = dev_put(d, y0, F(n * out)), *t = dev_poisoned(d, F(n * R));
        float *buf = dev_alloc(d, F(2 * in)), *y = malloc(F(n * out));
        d->be.ops->lora_shrink(&d->be.ctx, t, R, dx, segs, 2, in, buf);
        d->be.ops->lora_expand(&d->be.ctx, dy, t, R, segs, 2, out);
        dev_get(d, y, dy, F(n * out));
        EXPECT_CLOSE(y, ref, (size_t)n * out, 1e-6, "lora shrink + expand, dropout %d", drop);
        /* backward against central differences of the double forward */
        float *gout = rand_vec((size_t)n * out), *gx = calloc((size_t)n * in, sizeof *gx);
        float *ddx = dev_put(d, gx, F(n * in)), *gt = dev_poisoned(d, F(n * R));
        d->be.ops->lora_expand_dx(&d->be.ctx, gt, dev_put(d, gout, F(n * out)), t, R, segs, 2, out);
        d->be.ops->lora_shrink_dx(&d->be.ctx, ddx, gt, R, dx, segs, 2, in, buf);
        float *got = malloc(F(n * in > 6 * in ? n * in : 6 * in) + F(out * 6));
        double *g = malloc((size_t)(n * in + out * 6) * sizeof *g);
        for (int which = 0; which < 3; which++) {
            size_t nx = which == 0 ? (size_t)n * in : which == 1 ? (size_t)6 * in : (size_t)out * 6;
            const float *x0 = which == 0 ? x : which == 1 ? A0 : B0;
            l.which = which;
            numeric_grad(g, ref_lora_of, &l, x0, nx, gout, (size_t)n * out);
            dev_get(d, got, which == 0 ? ddx : which == 1 ? gA[0] : gB[0], F(nx));
            EXPECT_CLOSE(got, g, nx, 1e-5, "lora backward d%s, dropout %d", which == 0 ? "x" : which == 1 ? "A" : "B", drop);
        }
        float *want_dx = malloc(F(n * in)), *want_dA = malloc(F(6 * in));
        dev_get(d, want_dx, ddx, F(n * in));
        dev_get(d, want_dA, gA[0], F(6 * in));
        expect_split_same(d, gt, R, dx, segs, 2, n, in, buf, want_dx, want_dA, drop ? "segments, dropout" : "segments");
        free(want_dx); free(want_dA);
        free(ref); free(y); free(gout); free(gx); free(got); free(g);
        dev_reset(d);
    }
    free(A0); free(B0); free(A1); free(B1); free(x); free(y0);
}

/* The LoRA ops of one training segment (gradients set) over many rows,
 * where the CUDA backend takes its GEMM path, on d against the CPU
 * backend's: forward, gt, dx, dA and dB, with and without dropout. */
typedef struct {
    float *y, *gt, *dx, *gA, *gB;
} LoraOut;

static void lora_train_run(Dev *d, const float *const *host, int n, int in, int out, int rank, float p, LoraOut *o) {
    const float *x = host[0], *A = host[1], *B = host[2], *y0 = host[3], *gout = host[4];
    float *dA = dev_put(d, A, F(rank * in)), *dB = dev_put(d, B, F(out * rank));
    float *gA = dev_alloc(d, F(rank * in)), *gB = dev_alloc(d, F(out * rank));
    d->be.ops->memset(&d->be.ctx, gA, 0, F(rank * in));
    d->be.ops->memset(&d->be.ctx, gB, 0, F(out * rank));
    KnLoraSeg s = {0, n, dA, dB, gA, gB, rank, 0.75f, p, 0xBEEFull};
    float *dx = dev_put(d, x, F(n * in)), *dy = dev_put(d, y0, F(n * out)), *t = dev_poisoned(d, F(n * rank));
    float *buf = dev_alloc(d, F(2 * in)), *gt = dev_poisoned(d, F(n * rank));
    float *ddx = dev_alloc(d, F(n * in));
    d->be.ops->memset(&d->be.ctx, ddx, 0, F(n * in));
    d->be.ops->lora_shrink(&d->be.ctx, t, rank, dx, &s, 1, in, buf);
    d->be.ops->lora_expand(&d->be.ctx, dy, t, rank, &s, 1, out);
    d->be.ops->lora_expand_dx(&d->be.ctx, gt, dev_put(d, gout, F(n * out)), t, rank, &s, 1, out);
    d->be.ops->lora_shrink_dx(&d->be.ctx, ddx, gt, rank, dx, &s, 1, in, buf);
    dev_get(d, o->y, dy, F(n * out));
    dev_get(d, o->gt, gt, F(n * rank));
    dev_get(d, o->dx, ddx, F(n * in));
    dev_get(d, o->gA, gA, F(rank * in));
    dev_get(d, o->gB, gB, F(out * rank));
    expect_split_same(d, gt, rank, dx, &s, 1, n, in, buf, o->dx, o->gA, p > 0 ? "training rows, dropout" : "training rows");
    dev_reset(d);
}

static void lora_out_alloc(LoraOut *o, int n, int in, int out, int rank) {
    o->y = malloc(F(n * out)); o->gt = malloc(F(n * rank)); o->dx = malloc(F(n * in));
    o->gA = malloc(F(rank * in)); o->gB = malloc(F(out * rank));
}

static void lora_out_free(LoraOut *o) { free(o->y); free(o->gt); free(o->dx); free(o->gA); free(o->gB); }

static void expect_like(const float *got, const float *want, size_t n, const char *what, float p) {
    double *ref = malloc(n * sizeof *ref);
    for (size_t i = 0; i < n; i++) ref[i] = want[i];
    EXPECT_CLOSE(got, ref, n, 1e-5, "lora training rows %s, dropout %.1f", what, p);
    free(ref);
}

static void test_lora_training_rows(Dev *d) {
    int n = 48, in = 72, out = 50, rank = 8;
    float *host[5] = {rand_vec((size_t)n * in), rand_vec((size_t)rank * in), rand_vec((size_t)out * rank),
                      rand_vec((size_t)n * out), rand_vec((size_t)n * out)};
    Dev cpu;
    CHECK(dev_open(&cpu, KN_DEVICE_CPU, 1), "cpu backend");
    for (int k = 0; k < 2; k++) {
        float p = k ? 0.3f : 0.0f;
        LoraOut a, b;
        lora_out_alloc(&a, n, in, out, rank);
        lora_out_alloc(&b, n, in, out, rank);
        lora_train_run(d, (const float *const *)host, n, in, out, rank, p, &a);
        lora_train_run(&cpu, (const float *const *)host, n, in, out, rank, p, &b);
        expect_like(a.y, b.y, (size_t)n * out, "y", p);
        expect_like(a.gt, b.gt, (size_t)n * rank, "gt", p);
        expect_like(a.dx, b.dx, (size_t)n * in, "dx", p);
        expect_like(a.gA, b.gA, (size_t)rank * in, "dA", p);
        expect_like(a.gB, b.gB, (size_t)out * rank, "dB", p);
        lora_out_free(&a);
        lora_out_free(&b);
    }
    dev_close(&cpu);
    for (int i = 0; i < 5; i++) free(host[i]);
}

/* lora_rows_shrink / lora_rows_expand, each row's adapter read from device
 * memory, give each row what a serving segment of that one row gives, bit
 * for bit; a row of rank 0 keeps its t (poisoned here) and its y. */
static void test_lora_rows(Dev *d) {
    enum { N = 7, IN = 40, OUT = 23, LD = 8 };
    const int rank_of[N] = {4, 0, 7, 4, 7, 0, 4}, which[N] = {0, -1, 1, 0, 1, -1, 0};
    const float scale[2] = {0.5f, 1.75f};
    float *hA[2] = {rand_vec(4 * IN), rand_vec(7 * IN)}, *hB[2] = {rand_vec(OUT * 4), rand_vec(OUT * 7)};
    float *hx = rand_vec(N * IN), *hy = rand_vec(N * OUT);
    const float *A[2], *B[2];
    for (int a = 0; a < 2; a++) {
        A[a] = dev_put(d, hA[a], F(rank_of[a == 0 ? 0 : 2] * IN));
        B[a] = dev_put(d, hB[a], F(OUT * rank_of[a == 0 ? 0 : 2]));
    }
    KnLoraRow rows[N];
    KnLoraSeg segs[N];
    int n_segs = 0;
    for (int r = 0; r < N; r++) {
        int a = which[r];
        rows[r] = a < 0 ? (KnLoraRow){NULL, NULL, 0, 0.0f} : (KnLoraRow){A[a], B[a], rank_of[r], scale[a]};
        if (a >= 0) segs[n_segs++] = (KnLoraSeg){.row0 = r, .n_rows = 1, .A = A[a], .B = B[a], .rank = rank_of[r],
                                                 .scale = scale[a]};
    }
    float *x = dev_put(d, hx, F(N * IN)), *t1 = dev_poisoned(d, F(N * LD)), *t2 = dev_poisoned(d, F(N * LD));
    float *y1 = dev_put(d, hy, F(N * OUT)), *y2 = dev_put(d, hy, F(N * OUT));
    const KnLoraRow *drows = dev_put(d, rows, sizeof rows);
    d->be.ops->lora_shrink(&d->be.ctx, t1, LD, x, segs, n_segs, IN, NULL);
    d->be.ops->lora_expand(&d->be.ctx, y1, t1, LD, segs, n_segs, OUT);
    d->be.ops->lora_rows_shrink(&d->be.ctx, t2, LD, x, drows, N, IN, 7);
    d->be.ops->lora_rows_expand(&d->be.ctx, y2, t2, LD, drows, N, OUT);
    float g1[N * OUT], g2[N * OUT], u1[N * LD], u2[N * LD];
    dev_get(d, g1, y1, sizeof g1);
    dev_get(d, g2, y2, sizeof g2);
    dev_get(d, u1, t1, sizeof u1);
    dev_get(d, u2, t2, sizeof u2);
    int untouched = 1;
    for (int r = 0; r < N; r++)
        if (!rank_of[r]) untouched &= isnan(u2[r * LD]) && memcmp(g2 + r * OUT, hy + r * OUT, F(OUT)) == 0;
    CHECK(memcmp(g1, g2, sizeof g1) == 0 && memcmp(u1, u2, sizeof u1) == 0 && untouched,
          "%s: LoRA rows from device tables equal one-row segments (rank-0 rows untouched %d)", d->be.name, untouched);
    for (int a = 0; a < 2; a++) {
        free(hA[a]);
        free(hB[a]);
    }
    free(hx);
    free(hy);
}

/* Two short segments of one adapter (rows 0-4 and 6-11, one dA and one
 * dB) accumulate both their gradients, against double sums: a backend
 * that runs segments together must not let the two race. */
static void test_lora_shared_grads(Dev *d) {
    enum { N = 12, IN = 33, OUT = 21, RANK = 5 };
    const int64_t row0[2] = {0, 6}, rows[2] = {5, 6};
    const float scale = 0.5f;
    float *hA = rand_vec(RANK * IN), *hB = rand_vec(OUT * RANK), *hx = rand_vec(N * IN), *hdy = rand_vec(N * OUT);
    double refA[RANK * IN] = {0}, refB[OUT * RANK] = {0};
    for (int sg = 0; sg < 2; sg++)
        for (int64_t r = row0[sg]; r < row0[sg] + rows[sg]; r++) {
            double t[RANK], gt[RANK];
            for (int k = 0; k < RANK; k++) {
                t[k] = gt[k] = 0;
                for (int j = 0; j < IN; j++) t[k] += (double)hx[r * IN + j] * hA[k * IN + j];
                t[k] *= scale;
                for (int o = 0; o < OUT; o++) gt[k] += (double)hdy[r * OUT + o] * hB[o * RANK + k];
            }
            for (int o = 0; o < OUT; o++)
                for (int k = 0; k < RANK; k++) refB[o * RANK + k] += hdy[r * OUT + o] * t[k];
            for (int k = 0; k < RANK; k++)
                for (int j = 0; j < IN; j++) refA[k * IN + j] += scale * gt[k] * hx[r * IN + j];
        }
    float *A = dev_put(d, hA, F(RANK * IN)), *B = dev_put(d, hB, F(OUT * RANK)), *x = dev_put(d, hx, F(N * IN));
    float *dy = dev_put(d, hdy, F(N * OUT)), *t = dev_alloc(d, F(N * RANK)), *gt = dev_alloc(d, F(N * RANK));
    float *dA = dev_alloc(d, F(RANK * IN)), *dB = dev_alloc(d, F(OUT * RANK)), *dx = dev_alloc(d, F(N * IN));
    d->be.ops->memset(&d->be.ctx, dA, 0, F(RANK * IN));
    d->be.ops->memset(&d->be.ctx, dB, 0, F(OUT * RANK));
    d->be.ops->memset(&d->be.ctx, dx, 0, F(N * IN));
    KnLoraSeg segs[2];
    for (int sg = 0; sg < 2; sg++)
        segs[sg] = (KnLoraSeg){.row0 = row0[sg], .n_rows = rows[sg], .A = A, .B = B, .dA = dA, .dB = dB, .rank = RANK,
                               .scale = scale};
    d->be.ops->lora_shrink(&d->be.ctx, t, RANK, x, segs, 2, IN, NULL);
    d->be.ops->lora_expand_dx(&d->be.ctx, gt, dy, t, RANK, segs, 2, OUT);
    d->be.ops->lora_shrink_dx(&d->be.ctx, dx, gt, RANK, x, segs, 2, IN, NULL);
    float gotA[RANK * IN], gotB[OUT * RANK];
    dev_get(d, gotA, dA, sizeof gotA);
    dev_get(d, gotB, dB, sizeof gotB);
    EXPECT_CLOSE(gotA, refA, (size_t)RANK * IN, 1e-5, "%s: dA of two segments of one adapter", d->be.name);
    EXPECT_CLOSE(gotB, refB, (size_t)OUT * RANK, 1e-5, "%s: dB of two segments of one adapter", d->be.name);
    free(hA);
    free(hB);
    free(hx);
    free(hdy);
}

/* The LoRA ops over segments large enough that the CPU kinds split them
 * over threads (rows, and the gradients' columns): three segments, the
 * first and last of one adapter (their gradients add into one dA and dB),
 * a row between them without a term, with and without dropout; forward
 * and backward against the same calls on a one-thread CPU backend, bit for
 * bit on the CPU kinds (every output has one owner that sums in a fixed
 * order), within 1e-5 elsewhere. */
typedef struct {
    float *y, *gt, *dx, *gA[2], *gB[2];
} LoraThreadsOut;

enum { LT_N = 70, LT_IN = 300, LT_OUT = 260, LT_R0 = 16, LT_R1 = 8 };

static void lora_threads_run(Dev *d, const float *const *h, float p, LoraThreadsOut *o) {
    const int rank[2] = {LT_R0, LT_R1};
    float *A[2], *B[2], *gA[2], *gB[2];
    for (int a = 0; a < 2; a++) {
        A[a] = dev_put(d, h[a], F(rank[a] * LT_IN));
        B[a] = dev_put(d, h[2 + a], F(LT_OUT * rank[a]));
        gA[a] = dev_alloc(d, F(rank[a] * LT_IN));
        gB[a] = dev_alloc(d, F(LT_OUT * rank[a]));
        d->be.ops->memset(&d->be.ctx, gA[a], 0, F(rank[a] * LT_IN));
        d->be.ops->memset(&d->be.ctx, gB[a], 0, F(LT_OUT * rank[a]));
    }
    KnLoraSeg segs[3] = {{0, 30, A[0], B[0], gA[0], gB[0], LT_R0, 0.5f, p, 0x51ull},
                         {30, 22, A[1], B[1], gA[1], gB[1], LT_R1, 2.0f, p, 0x52ull},
                         {53, 17, A[0], B[0], gA[0], gB[0], LT_R0, 0.5f, p, 0x53ull}};
    float *x = dev_put(d, h[4], F(LT_N * LT_IN)), *y = dev_put(d, h[5], F(LT_N * LT_OUT));
    float *t = dev_poisoned(d, F(LT_N * LT_R0)), *gt = dev_poisoned(d, F(LT_N * LT_R0));
    float *dx = dev_put(d, h[7], F(LT_N * LT_IN)), *buf = dev_alloc(d, F(2 * LT_IN));
    d->be.ops->lora_shrink(&d->be.ctx, t, LT_R0, x, segs, 3, LT_IN, buf);
    d->be.ops->lora_expand(&d->be.ctx, y, t, LT_R0, segs, 3, LT_OUT);
    d->be.ops->lora_expand_dx(&d->be.ctx, gt, dev_put(d, h[6], F(LT_N * LT_OUT)), t, LT_R0, segs, 3, LT_OUT);
    d->be.ops->lora_shrink_dx(&d->be.ctx, dx, gt, LT_R0, x, segs, 3, LT_IN, buf);
    dev_get(d, o->y, y, F(LT_N * LT_OUT));
    float *all_gt = malloc(F(LT_N * LT_R0));
    dev_get(d, all_gt, gt, F(LT_N * LT_R0));
    for (int r = 0; r < LT_N; r++) /* the rows with a term: their rank's columns */
        for (int k = 0; k < LT_R0; k++) {
            int rk = r < 30 || r >= 53 ? LT_R0 : r < 52 ? LT_R1 : 0;
            o->gt[r * LT_R0 + k] = k < rk ? all_gt[r * LT_R0 + k] : 0.0f;
        }
    free(all_gt);
    dev_get(d, o->dx, dx, F(LT_N * LT_IN));
    for (int a = 0; a < 2; a++) {
        dev_get(d, o->gA[a], gA[a], F(rank[a] * LT_IN));
        dev_get(d, o->gB[a], gB[a], F(LT_OUT * rank[a]));
    }
    dev_reset(d);
}

static void lora_threads_expect(const Dev *d, const float *got, const float *want, size_t n, const char *what, float p) {
    if (d->be.ctx.device != KN_DEVICE_CUDA) {
        CHECK(memcmp(got, want, F(n)) == 0, "%s: lora over threads, %s (dropout %.1f): the one-thread bits", d->be.name,
              what, p);
        return;
    }
    double *ref = malloc(n * sizeof *ref);
    for (size_t i = 0; i < n; i++) ref[i] = want[i];
    EXPECT_CLOSE(got, ref, n, 1e-5, "lora over threads, %s, dropout %.1f", what, p);
    free(ref);
}

static void test_lora_threads(Dev *d) {
    const size_t sizes[8] = {LT_R0 * LT_IN, LT_R1 * LT_IN, LT_OUT * LT_R0, LT_OUT * LT_R1,
                             LT_N * LT_IN,  LT_N * LT_OUT, LT_N * LT_OUT,  LT_N * LT_IN};
    float *h[8];
    for (int i = 0; i < 8; i++) h[i] = rand_vec(sizes[i]);
    Dev one;
    CHECK(dev_open(&one, KN_DEVICE_CPU, 1), "cpu backend");
    for (int k = 0; k < 2; k++) {
        float p = k ? 0.25f : 0.0f;
        LoraThreadsOut o[2];
        for (int w = 0; w < 2; w++) {
            LoraThreadsOut *q = &o[w];
            q->y = malloc(F(LT_N * LT_OUT));
            q->gt = malloc(F(LT_N * LT_R0));
            q->dx = malloc(F(LT_N * LT_IN));
            for (int a = 0; a < 2; a++) {
                q->gA[a] = malloc(F(sizes[a]));
                q->gB[a] = malloc(F(sizes[2 + a]));
            }
            lora_threads_run(w ? &one : d, (const float *const *)h, p, q);
        }
        lora_threads_expect(d, o[0].y, o[1].y, LT_N * LT_OUT, "y", p);
        lora_threads_expect(d, o[0].gt, o[1].gt, LT_N * LT_R0, "gt", p);
        lora_threads_expect(d, o[0].dx, o[1].dx, LT_N * LT_IN, "dx", p);
        for (int a = 0; a < 2; a++) {
            lora_threads_expect(d, o[0].gA[a], o[1].gA[a], sizes[a], a ? "dA of the second adapter" : "dA (two segments)", p);
            lora_threads_expect(d, o[0].gB[a], o[1].gB[a], sizes[2 + a], a ? "dB of the second adapter" : "dB (two segments)", p);
        }
        for (int w = 0; w < 2; w++) {
            free(o[w].y); free(o[w].gt); free(o[w].dx);
            for (int a = 0; a < 2; a++) { free(o[w].gA[a]); free(o[w].gB[a]); }
        }
    }
    dev_close(&one);
    for (int i = 0; i < 8; i++) free(h[i]);
}

/* tanh as the ops take it (softcap with cap 1 is tanh alone): on the CPU
 * kinds the float nearest tanh (glibc's double tanh, rounded) for all but
 * one input in 10^5, and never more than one ulp away; on a GPU within two
 * ulp (CUDA's tanhf). Specials: signed zeros keep their sign, infinities
 * give +-1, NaN stays NaN, tiny inputs come back unchanged. */
static int32_t ulp_distance(float a, float b) {
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    if (ia < 0) ia = INT32_MIN - ia; /* one ordered line through both zeros */
    if (ib < 0) ib = INT32_MIN - ib;
    int64_t d = (int64_t)ia - ib;
    return d < 0 ? (int32_t)(d < -1000000 ? 1000000 : -d) : (int32_t)(d > 1000000 ? 1000000 : d);
}

static void test_tanh(Dev *d) {
    enum { N = 400000, SPECIAL = 12 };
    float *x = malloc(F(N)), *got = malloc(F(N));
    const float special[SPECIAL] = {0.0f, -0.0f, INFINITY, -INFINITY, 1e-30f, -1e-30f, 9.4f, 9.6f, -20.0f, 0x1p-10f,
                                    0x1.fffffep-11f, 0.55f};
    memcpy(x, special, sizeof special);
    for (int i = SPECIAL; i < N; i++) { /* half uniform in [-10, 10), half log-spread down to 1e-6 */
        float u = frand();
        x[i] = i % 2 ? 10.0f * u : copysignf(powf(10.0f, -6.0f + 6.0f * fabsf(u)), u);
    }
    float *dx = dev_put(d, x, F(N));
    d->be.ops->softcap(&d->be.ctx, dx, N, 1.0f);
    dev_get(d, got, dx, F(N));
    int cuda = d->be.ctx.device == KN_DEVICE_CUDA, off = 0;
    int32_t worst = 0;
    for (int i = 0; i < N; i++) {
        int32_t u = ulp_distance(got[i], (float)tanh((double)x[i]));
        off += u != 0;
        if (u > worst) worst = u;
    }
    CHECK(worst <= (cuda ? 2 : 1), "%s: tanh within %d ulp of the nearest float (worst %d)", d->be.name, cuda ? 2 : 1,
          (int)worst);
    if (!cuda) CHECK(off <= N / 100000, "%s: tanh the nearest float but for %d of %d inputs", d->be.name, off, N);
    CHECK(got[0] == 0.0f && !signbit(got[0]) && got[1] == 0.0f && signbit(got[1]), "%s: tanh(+-0) = +-0", d->be.name);
    CHECK(got[2] == 1.0f && got[3] == -1.0f, "%s: tanh(+-inf) = +-1 (got %g, %g)", d->be.name, got[2], got[3]);
    CHECK(got[4] == 1e-30f && got[5] == -1e-30f, "%s: tanh of a tiny input is the input", d->be.name);
    float nan_in = NAN, nan_out;
    float *dn = dev_put(d, &nan_in, F(1));
    d->be.ops->softcap(&d->be.ctx, dn, 1, 1.0f);
    dev_get(d, &nan_out, dn, F(1));
    CHECK(isnan(nan_out), "%s: tanh(NaN) is NaN (got %g)", d->be.name, nan_out);
    free(x);
    free(got);
    dev_reset(d);
}

/* The row-wise and element-wise ops over inputs large enough that the CPU
 * kinds split them over threads (a GELU gate whose u rows are wider than
 * its own, so that a split falls inside a row; rows of norms, RoPE and the
 * loss), against the same calls on a one-thread CPU backend: bit for bit
 * on the CPU kinds (each element or row is computed alone), within 1e-5
 * elsewhere. */
enum { ET_N = 70001, ET_GR = 37, ET_GC = 301, ET_GLD = 333, ET_NR = 67, ET_ND = 401, ET_RR = 40, ET_RH = 4,
       ET_RD = 64, ET_XR = 5, ET_XV = 1021 };

typedef struct {
    const char *name;
    size_t n;
    float *got;
} ElemOut;

enum { ET_OUTS = 13 };

/* Runs every op on d into o[ET_OUTS] (malloc'ed here) and the loss. */
static void elem_threads_run(Dev *d, const float *const *h, const int32_t *pos, ElemOut *o, double *loss) {
    const KnOps *ops = d->be.ops;
    const KnCtx *c = &d->be.ctx;
    float *a = dev_put(d, h[0], F(ET_N)), *b = dev_put(d, h[1], F(ET_N)), *w = dev_put(d, h[2], F(ET_ND));
    float *inv = dev_put(d, h[3], F(ET_RD / 2));
    int32_t *dpos = dev_put(d, pos, ET_RR * sizeof(int32_t)), *tg = dev_put(d, pos, ET_XR * sizeof(int32_t));
    float *out[ET_OUTS];
    const size_t n[ET_OUTS] = {ET_N, 5000, ET_GR * ET_GC, 5003, 3001, 3001, 3001, ET_NR * ET_ND, ET_NR * ET_ND,
                               ET_NR * ET_ND, ET_RR * ET_RH * ET_RD, ET_RR * ET_RH * ET_RD, ET_XR * ET_XV};
    const char *names[ET_OUTS] = {"add", "gelu_tanh", "gelu_gate", "softcap", "gelu_tanh_dx", "gelu_gate_dx dg",
                                  "gelu_gate_dx du", "rmsnorm", "rmsnorm_add", "rmsnorm_dx", "rmsnorm_rope",
                                  "rope_rows", "xent_softcap's gradient"};
    for (int k = 0; k < ET_OUTS; k++) out[k] = dev_poisoned(d, F(n[k]));
    ops->add(c, out[0], a, b, ET_N);
    ops->copy(c, out[1], b, F(n[1]));
    ops->gelu_tanh(c, out[1], n[1]);
    ops->gelu_gate(c, out[2], a, b, ET_GR, ET_GC, ET_GLD);
    ops->copy(c, out[3], a, F(n[3]));
    ops->softcap(c, out[3], n[3], 0.5f);
    ops->gelu_tanh_dx(c, out[4], a, b, n[4]);
    ops->gelu_gate_dx(c, out[5], out[6], a, b, a + 4000, n[5]);
    ops->rmsnorm(c, out[7], a, w, ET_NR, ET_ND, 1e-6f);
    ops->rmsnorm_add(c, out[8], b, a, w, ET_NR, ET_ND, 1e-6f, 0.7f);
    ops->copy(c, out[9], b + 9, F(n[9])); /* rmsnorm_dx accumulates */
    ops->rmsnorm_dx(c, out[9], a, w, b, ET_NR, ET_ND, 1e-6f);
    ops->rmsnorm_rope(c, out[10], a, w, ET_RR, ET_RH, ET_RD, 1e-6f, inv, dpos);
    ops->copy(c, out[11], b, F(n[11]));
    ops->rope_rows(c, out[11], ET_RR, ET_RH, ET_RD, ET_RD, inv, dpos, 1);
    ops->copy(c, out[12], a, F(n[12]));
    double *dloss = dev_poisoned(d, ET_XR * sizeof(double));
    ops->xent_softcap(c, dloss, out[12], tg, ET_XR, ET_XV, 2.0f, 0.25f, 1);
    for (int k = 0; k < ET_OUTS; k++) {
        o[k] = (ElemOut){names[k], n[k], malloc(F(n[k]))};
        dev_get(d, o[k].got, out[k], F(n[k]));
    }
    dev_get(d, loss, dloss, ET_XR * sizeof(double));
    dev_reset(d);
}

static void test_elementwise_threads(Dev *d) {
    float *h[4] = {rand_vec(ET_N), rand_vec(ET_N), rand_vec(ET_ND), rand_vec(ET_RD / 2)};
    for (int i = 0; i < ET_RD / 2; i++) h[3][i] = fabsf(h[3][i]);
    int32_t pos[ET_RR];
    for (int i = 0; i < ET_RR; i++) pos[i] = (i * 37) % 1000; /* the loss's targets too: < ET_XV */
    Dev one;
    CHECK(dev_open(&one, KN_DEVICE_CPU, 1), "cpu backend");
    ElemOut o[2][ET_OUTS];
    double loss[2][ET_XR];
    elem_threads_run(d, (const float *const *)h, pos, o[0], loss[0]);
    elem_threads_run(&one, (const float *const *)h, pos, o[1], loss[1]);
    for (int k = 0; k < ET_OUTS; k++) {
        if (d->be.ctx.device != KN_DEVICE_CUDA) {
            CHECK(memcmp(o[0][k].got, o[1][k].got, F(o[0][k].n)) == 0, "%s: %s over threads: the one-thread bits",
                  d->be.name, o[0][k].name);
        } else {
            double *ref = malloc(o[1][k].n * sizeof *ref);
            for (size_t i = 0; i < o[1][k].n; i++) ref[i] = o[1][k].got[i];
            EXPECT_CLOSE(o[0][k].got, ref, o[0][k].n, 1e-5, "%s over threads", o[0][k].name);
            free(ref);
        }
        free(o[0][k].got);
        free(o[1][k].got);
    }
    for (int r = 0; r < ET_XR; r++)
        CHECK(d->be.ctx.device == KN_DEVICE_CUDA ? fabs(loss[0][r] - loss[1][r]) <= 1e-5 * fabs(loss[1][r])
                                                 : loss[0][r] == loss[1][r],
              "%s: xent_softcap over threads, row %d's loss %.9g against %.9g", d->be.name, r, loss[0][r], loss[1][r]);
    dev_close(&one);
    for (int i = 0; i < 4; i++) free(h[i]);
}

/* ---- mixture of experts: routing against a double softmax and stable
 * top-k, the experts against a double MLP, both backward ops against
 * central differences with the chosen experts held fixed ---- */

enum { ME = 6, MK = 2, MH = 12, MI = 5, MN = 3 };

typedef struct { const float *gate_up, *down, *pes, *x, *logits; const int32_t *idx; const float *coef; int which; } MoeRef;

static double ref_gelu1(double v) { return 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))); }

/* which 0: y[MN, MH] as a function of v = x (coef held); which 1: coef[MN, MK]
 * as a function of v = logits (experts held). */
static void ref_moe_of(double *y, const double *v, const void *c) {
    const MoeRef *r = c;
    for (int t = 0; t < MN; t++) {
        if (r->which == 1) {
            double mx = -INFINITY, sum = 0, p[ME], ws = 0;
            for (int e = 0; e < ME; e++) mx = fmax(mx, v[t * ME + e]);
            for (int e = 0; e < ME; e++) sum += (p[e] = exp(v[t * ME + e] - mx));
            for (int k = 0; k < MK; k++) ws += p[r->idx[t * MK + k]] / sum;
            for (int k = 0; k < MK; k++) y[t * MK + k] = p[r->idx[t * MK + k]] / sum / ws * r->pes[r->idx[t * MK + k]];
            continue;
        }
        for (int o = 0; o < MH; o++) y[t * MH + o] = 0;
        for (int k = 0; k < MK; k++) {
            int e = r->idx[t * MK + k];
            double g[2 * MI], mm[MI];
            for (int i = 0; i < 2 * MI; i++) {
                g[i] = 0;
                for (int j = 0; j < MH; j++) g[i] += v[t * MH + j] * r->gate_up[(e * 2 * MI + i) * MH + j];
            }
            for (int i = 0; i < MI; i++) mm[i] = ref_gelu1(g[i]) * g[MI + i];
            for (int o = 0; o < MH; o++) {
                double acc = 0;
                for (int i = 0; i < MI; i++) acc += mm[i] * r->down[(e * MH + o) * MI + i];
                y[t * MH + o] += r->coef[t * MK + k] * acc;
            }
        }
    }
}

static void test_moe(Dev *d) {
    float *gate_up = rand_vec(ME * 2 * MI * MH), *down = rand_vec(ME * MH * MI), *pes = rand_vec(ME);
    float *x = rand_vec(MN * MH), *logits = rand_vec(MN * ME);
    for (int i = 0; i < MN * ME; i++) logits[i] *= 3.0f;
    logits[ME + 4] = logits[ME + 1]; /* a tie: the lower index must win */
    float *dp = dev_put(d, logits, F(MN * ME)), *dw = dev_poisoned(d, F(MN * MK)), *dcoef = dev_poisoned(d, F(MN * MK));
    int32_t *didx = dev_poisoned(d, MN * MK * sizeof(int32_t)), idx[MN * MK];
    float *dpes = dev_put(d, pes, F(ME)), coef[MN * MK], p[MN * ME];
    d->be.ops->moe_route(&d->be.ctx, didx, dw, dcoef, dp, dpes, MN, ME, MK);
    dev_get(d, idx, didx, sizeof idx);
    dev_get(d, coef, dcoef, sizeof coef);
    dev_get(d, p, dp, sizeof p);
    int ok = 1;
    double refc[MN * MK];
    for (int t = 0; t < MN; t++) {
        double mx = -INFINITY, sum = 0, pr[ME], ws = 0;
        for (int e = 0; e < ME; e++) mx = fmax(mx, logits[t * ME + e]);
        for (int e = 0; e < ME; e++) sum += (pr[e] = exp(logits[t * ME + e] - mx));
        int want[MK];
        for (int k = 0; k < MK; k++) {
            want[k] = -1;
            for (int e = 0; e < ME; e++)
                if ((k == 0 || e != want[0]) && (want[k] < 0 || pr[e] > pr[want[k]])) want[k] = e;
            ok &= idx[t * MK + k] == want[k];
            ws += pr[want[k]] / sum;
        }
        for (int k = 0; k < MK; k++) refc[t * MK + k] = pr[want[k]] / sum / ws * pes[want[k]];
    }
    CHECK(ok, "moe_route picks the most probable experts, lower index first among equals%s", "");
    EXPECT_CLOSE(coef, refc, MN * MK, 1e-6, "moe_route coefficients%s", "");
    KnMatrix mgu = {dev_put(d, gate_up, F(ME * 2 * MI * MH)), KN_F32, ME * 2 * MI, MH, 0, 0};
    KnMatrix mdown = {dev_put(d, down, F(ME * MH * MI)), KN_F32, ME * MH, MI, 0, 0};
    float *dx = dev_put(d, x, F(MN * MH)), *dy = dev_poisoned(d, F(MN * MH)), *gu = dev_alloc(d, F(MN * MK * 2 * MI));
    float *mm = dev_alloc(d, F(MN * MK * MI)), *yk = dev_alloc(d, F(MN * MK * MH)), y[MN * MH];
    d->be.ops->moe_experts(&d->be.ctx, dy, dx, didx, dcoef, gu, mm, yk, MN, MK, mgu, mdown);
    dev_get(d, y, dy, sizeof y);
    MoeRef r = {gate_up, down, pes, x, logits, idx, coef, 0};
    double ref[MN * MH], v[MN * MH];
    for (int i = 0; i < MN * MH; i++) v[i] = x[i];
    ref_moe_of(ref, v, &r);
    EXPECT_CLOSE(y, ref, MN * MH, 1e-5, "moe_experts%s", "");
    /* backward */
    float *gy = rand_vec(MN * MH), gx[MN * MH], gc[MN * MK], gl[MN * ME];
    float *dgx = dev_poisoned(d, F(MN * MH)), *dgc = dev_poisoned(d, F(MN * MK)), *dgl = dev_poisoned(d, F(MN * ME));
    d->be.ops->moe_experts_dx(&d->be.ctx, dgx, dgc, dev_put(d, gy, F(MN * MH)), gu, yk, didx, dcoef,
                              dev_alloc(d, F(4 * MI)), MN, MK, mgu, mdown);
    dev_get(d, gx, dgx, sizeof gx);
    dev_get(d, gc, dgc, sizeof gc);
    double g[MN * ME > MN * MH ? MN * ME : MN * MH];
    numeric_grad(g, ref_moe_of, &r, x, MN * MH, gy, MN * MH);
    EXPECT_CLOSE(gx, g, MN * MH, 1e-5, "moe_experts_dx through the inputs%s", "");
    double refdc[MN * MK];
    float ykh[MN * MK * MH];
    dev_get(d, ykh, yk, sizeof ykh);
    for (int t = 0; t < MN; t++)
        for (int k = 0; k < MK; k++) {
            refdc[t * MK + k] = 0;
            for (int o = 0; o < MH; o++) refdc[t * MK + k] += (double)gy[t * MH + o] * ykh[(t * MK + k) * MH + o];
        }
    EXPECT_CLOSE(gc, refdc, MN * MK, 1e-5, "moe_experts_dx coefficient gradients%s", "");
    d->be.ops->moe_route_dx(&d->be.ctx, dgl, dgc, didx, dw, dp, dpes, MN, ME, MK);
    dev_get(d, gl, dgl, sizeof gl);
    r.which = 1;
    numeric_grad(g, ref_moe_of, &r, logits, MN * ME, gc, MN * MK);
    EXPECT_CLOSE(gl, g, MN * ME, 1e-5, "moe_route_dx through renormalization and softmax%s", "");
    free(gate_up); free(down); free(pes); free(x); free(logits); free(gy);
    dev_reset(d);
}

/* moe_experts and moe_experts_dx over many pairs per expert, at sizes that
 * cut every tile of a grouped kernel short (hidden 100, intermediate 40):
 * every token's first expert is expert 3, so it has 40 pairs; the others
 * spread over the rest. F32, BF16 and NF4 weights against a double MLP and
 * its hand-derived gradient over the weights as stored; every output
 * poisoned first. */
enum { GE = 16, GK = 4, GH = 100, GI = 40, GN = 40 };

typedef struct {
    const float *x, *gy, *coef;
    const int32_t *idx;
} MoeCase;

/* y, dx [GN, GH] and dc [GN, GK] in double, over weights gate_up, down. */
static void moe_grouped_ref(const MoeCase *mc, const float *gate_up, const float *down, double *y, double *dx,
                            double *dc) {
    const double c0 = sqrt(2 / M_PI), c1 = 0.044715;
    memset(y, 0, GN * GH * sizeof *y);
    memset(dx, 0, GN * GH * sizeof *dx);
    for (int t = 0; t < GN; t++)
        for (int k = 0; k < GK; k++) {
            int e = mc->idx[t * GK + k];
            double cf = mc->coef[t * GK + k], g[2 * GI], mm[GI];
            const float *gu_e = gate_up + (size_t)e * 2 * GI * GH, *down_e = down + (size_t)e * GH * GI;
            const float *xt = mc->x + t * GH, *gyt = mc->gy + t * GH;
            for (int i = 0; i < 2 * GI; i++) {
                g[i] = 0;
                for (int h = 0; h < GH; h++) g[i] += (double)xt[h] * gu_e[(size_t)i * GH + h];
            }
            for (int i = 0; i < GI; i++) mm[i] = ref_gelu1(g[i]) * g[GI + i];
            dc[t * GK + k] = 0;
            for (int o = 0; o < GH; o++) {
                double acc = 0;
                for (int i = 0; i < GI; i++) acc += mm[i] * down_e[(size_t)o * GI + i];
                y[t * GH + o] += cf * acc;
                dc[t * GK + k] += gyt[o] * acc;
            }
            for (int i = 0; i < GI; i++) {
                double dmm = 0;
                for (int o = 0; o < GH; o++) dmm += gyt[o] * down_e[(size_t)o * GI + i];
                dmm *= cf;
                double v = g[i], th = tanh(c0 * (v + c1 * v * v * v));
                double dgelu = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * c0 * (1 + 3 * c1 * v * v);
                double dg = dgelu * dmm * g[GI + i], du = dmm * ref_gelu1(v);
                for (int h = 0; h < GH; h++)
                    dx[t * GH + h] += dg * gu_e[(size_t)i * GH + h] + du * gu_e[(size_t)(GI + i) * GH + h];
            }
        }
}

/* The grouped experts on d within tol (rel err), every weight kind. */
static void test_moe_grouped_at(Dev *d, double tol) {
    size_t ngu = (size_t)GE * 2 * GI * GH, ndown = (size_t)GE * GH * GI;
    float *gate_up = rand_vec(ngu), *down = rand_vec(ndown), *x = rand_vec(GN * GH), *gy = rand_vec(GN * GH);
    uint16_t *gub = malloc(ngu * 2), *downb = malloc(ndown * 2);
    for (size_t i = 0; i < ngu; i++) gate_up[i] = kn_bf16_to_f32(gub[i] = kn_f32_to_bf16(gate_up[i]));
    for (size_t i = 0; i < ndown; i++) down[i] = kn_bf16_to_f32(downb[i] = kn_f32_to_bf16(down[i]));
    KnNf4 q[2], qd[2];
    KnMatrix whole[2] = {{gate_up, KN_F32, GE * 2 * GI, GH, 0, 0}, {down, KN_F32, GE * GH, GI, 0, 0}};
    float *deq[2] = {malloc(ngu * sizeof(float)), malloc(ndown * sizeof(float))};
    for (int m = 0; m < 2; m++) {
        CHECK(kn_nf4_quantize(&q[m], whole[m], &(GfError){0}) == GF_OK, "quantize the experts");
        kn_nf4_dequantize(&q[m], 0, m ? (int64_t)ndown : (int64_t)ngu, deq[m]);
        nf4_on_device(d, &q[m], &qd[m]);
    }
    int32_t idx[GN * GK];
    float coef[GN * GK];
    for (int t = 0; t < GN; t++)
        for (int k = 0; k < GK; k++) {
            int v = (t * 3 + k) % (GE - 1); /* k = 1..3: three consecutive others, none of them 3 */
            idx[t * GK + k] = k == 0 ? 3 : v < 3 ? v : v + 1;
            coef[t * GK + k] = 0.25f + 0.5f * frand();
        }
    MoeCase mc = {x, gy, coef, idx};
    double *ref = malloc(GN * GH * sizeof *ref), *ref_dx = malloc(GN * GH * sizeof *ref_dx), ref_dc[GN * GK];
    int32_t *didx = dev_put(d, idx, sizeof idx);
    float *dcoef = dev_put(d, coef, sizeof coef), *dx = dev_put(d, x, F(GN * GH)), *dgy = dev_put(d, gy, F(GN * GH));
    float y[GN * GH], gx[GN * GH], gc[GN * GK];
    struct { KnMatrix gu, down; const char *name; } kinds[] = {
        {{dev_put(d, gate_up, F(ngu)), KN_F32, GE * 2 * GI, GH, 0, 0}, {dev_put(d, down, F(ndown)), KN_F32, GE * GH, GI, 0, 0}, "f32"},
        {{dev_put(d, gub, ngu * 2), KN_BF16, GE * 2 * GI, GH, 0, 0}, {dev_put(d, downb, ndown * 2), KN_BF16, GE * GH, GI, 0, 0}, "bf16"},
        {kn_nf4_matrix(&qd[0], 0, GE * 2 * GI, GH), kn_nf4_matrix(&qd[1], 0, GE * GH, GI), "nf4"},
    };
    for (size_t b = 0; b < sizeof kinds / sizeof *kinds; b++) {
        moe_grouped_ref(&mc, b == 2 ? deq[0] : gate_up, b == 2 ? deq[1] : down, ref, ref_dx, ref_dc);
        float *dy = dev_poisoned(d, F(GN * GH)), *gu = dev_poisoned(d, F(GN * GK * 2 * GI));
        float *mm = dev_poisoned(d, F(GN * GK * GI)), *yk = dev_poisoned(d, F(GN * GK * GH));
        d->be.ops->moe_experts(&d->be.ctx, dy, dx, didx, dcoef, gu, mm, yk, GN, GK, kinds[b].gu, kinds[b].down);
        dev_get(d, y, dy, sizeof y);
        EXPECT_CLOSE(y, ref, GN * GH, tol, "moe_experts, 40 pairs on one expert, %s weights", kinds[b].name);
        float *dgx = dev_poisoned(d, F(GN * GH)), *dgc = dev_poisoned(d, F(GN * GK));
        d->be.ops->moe_experts_dx(&d->be.ctx, dgx, dgc, dgy, gu, yk, didx, dcoef, dev_alloc(d, F(4 * GI)), GN, GK,
                                  kinds[b].gu, kinds[b].down);
        dev_get(d, gx, dgx, sizeof gx);
        dev_get(d, gc, dgc, sizeof gc);
        EXPECT_CLOSE(gx, ref_dx, GN * GH, tol, "moe_experts_dx inputs, 40 pairs on one expert, %s weights", kinds[b].name);
        EXPECT_CLOSE(gc, ref_dc, GN * GK, tol, "moe_experts_dx coefficients, %s weights", kinds[b].name);
    }
    GfError err;
    CHECK(d->be.ops->synchronize(&d->be.ctx, &err) == GF_OK, "grouped experts: %s", err.message);
    for (int m = 0; m < 2; m++) { kn_nf4_free(&q[m]); free(deq[m]); }
    free(gate_up); free(down); free(x); free(gy); free(gub); free(downb); free(ref); free(ref_dx);
    dev_reset(d);
}

static void test_moe_grouped(Dev *d) { test_moe_grouped_at(d, 1e-5); }

/* The same in the BF16 precision on CUDA (the tensor-core tiles): 1e-2. */
static void test_moe_grouped_bf16(void) {
    Dev d;
    if (!dev_open_at(&d, KN_DEVICE_CUDA, 1, KN_PRECISION_BF16)) return;
    printf("backend %s, precision bf16: grouped experts\n", d.be.name);
    test_moe_grouped_at(&d, 1e-2);
    dev_close(&d);
}

/* ---- rows and the loss ---- */

typedef struct { int rows, V; float cap; const int32_t *targets; } XentRef;

/* The summed cross-entropy of softcapped logits, as a function of the
 * logits before the cap (one output). */
static void ref_xent(double *y, const double *z, const void *c) {
    const XentRef *x = c;
    y[0] = 0;
    for (int r = 0; r < x->rows; r++) {
        double mx = -INFINITY, sum = 0, zz[64];
        for (int v = 0; v < x->V; v++) {
            zz[v] = x->cap > 0 ? x->cap * tanh(z[r * x->V + v] / x->cap) : z[r * x->V + v];
            mx = fmax(mx, zz[v]);
        }
        for (int v = 0; v < x->V; v++) sum += exp(zz[v] - mx);
        y[0] += mx + log(sum) - zz[x->targets[r]];
    }
}

static void test_rows_and_loss(Dev *d) {
    int n = 6, dim = 7, ld = 3 * dim;
    float *a = rand_vec((size_t)n * dim), *b = rand_vec((size_t)n * dim), *y = rand_vec((size_t)n * ld);
    double ref[6 * 21];
    float got[6 * 21];
    for (int r = 0; r < n; r++)
        for (int c = 0; c < ld; c++) ref[r * ld + c] = y[r * ld + c] + (c >= dim && c < 2 * dim ? (double)a[r * dim + c - dim] * b[r * dim + c - dim] : 0);
    float *dyv = dev_put(d, y, F(n * ld));
    d->be.ops->mul_acc(&d->be.ctx, dyv + dim, dev_put(d, a, F(n * dim)), dev_put(d, b, F(n * dim)), n, dim, ld);
    dev_get(d, got, dyv, F(n * ld));
    EXPECT_CLOSE(got, ref, (size_t)n * ld, 1e-6, "mul_acc into a strided block%s", "");
    int32_t idx[3] = {4, 0, 2};
    float *g = dev_poisoned(d, F(3 * dim)), gh[3 * 7];
    d->be.ops->rows_gather(&d->be.ctx, g, dev_put(d, a, F(n * dim)), dev_put(d, idx, sizeof idx), 3, dim);
    dev_get(d, gh, g, sizeof gh);
    int ok = 1;
    for (int i = 0; i < 3; i++) ok &= memcmp(gh + i * dim, a + idx[i] * dim, (size_t)dim * sizeof(float)) == 0;
    CHECK(ok, "rows_gather%s", "");
    float *sc = dev_put(d, b, F(n * dim)), sh[6 * 7];
    d->be.ops->rows_scatter(&d->be.ctx, sc, g, dev_put(d, idx, sizeof idx), 3, dim);
    dev_get(d, sh, sc, sizeof sh);
    ok = 1;
    for (int r = 0; r < n; r++) {
        const float *want = r == 4 ? a + 4 * dim : r == 0 ? a : r == 2 ? a + 2 * dim : b + r * dim;
        ok &= memcmp(sh + r * dim, want, (size_t)dim * sizeof(float)) == 0;
    }
    CHECK(ok, "rows_scatter writes the indexed rows and no other%s", "");
    free(a); free(b); free(y);
    /* the loss: each row against the double reference, the gradient against
     * central differences, with and without the cap */
    enum { R = 3, V = 40 };
    int32_t targets[R] = {7, 0, 39};
    float *z = rand_vec(R * V);
    for (int i = 0; i < R * V; i++) z[i] *= 20.0f;
    for (int capped = 0; capped < 2; capped++) {
        XentRef x = {R, V, capped ? 15.0f : 0.0f, targets};
        double want[1], loss[R], gref[R * V];
        for (int i = 0; i < R * V; i++) gref[i] = z[i];
        ref_xent(want, gref, &x);
        float *dz = dev_put(d, z, F(R * V)), gz[R * V];
        double *dl = dev_poisoned(d, sizeof loss);
        d->be.ops->xent_softcap(&d->be.ctx, dl, dz, dev_put(d, targets, sizeof targets), R, V, x.cap, 0.5f, 1);
        dev_get(d, loss, dl, sizeof loss);
        dev_get(d, gz, dz, sizeof gz);
        CHECK(fabs(loss[0] + loss[1] + loss[2] - want[0]) <= 1e-5 * fabs(want[0]), "xent loss%s: %g vs %g",
              capped ? " capped" : "", loss[0] + loss[1] + loss[2], want[0]);
        float one = 1.0f;
        numeric_grad(gref, ref_xent, &x, z, R * V, &one, 1);
        for (int i = 0; i < R * V; i++) gref[i] *= 0.5;
        EXPECT_CLOSE(gz, gref, (size_t)R * V, 1e-5, "xent gradient%s", capped ? " through the cap" : "");
    }
    free(z);
    dev_reset(d);
}

/* ---- the vision tower's small ops ---- */

static void test_vision_ops(Dev *d) {
    enum { N = 7, D = 5 };
    float *x = rand_vec(N * D), *base = rand_vec(3 * D), got[N * D];
    double ref[N * D];
    int32_t blocks[N] = {2, 0, -1, 2, 1, 0, -1};
    float *out = dev_put(d, base, F(3 * D));
    d->be.ops->rows_sum(&d->be.ctx, out, dev_put(d, x, F(N * D)), dev_put(d, blocks, sizeof blocks), N, D);
    dev_get(d, got, out, F(3 * D));
    for (int b = 0; b < 3; b++)
        for (int j = 0; j < D; j++) {
            ref[b * D + j] = base[b * D + j];
            for (int i = 0; i < N; i++) ref[b * D + j] += blocks[i] == b ? x[i * D + j] : 0;
        }
    EXPECT_CLOSE(got, ref, 3 * D, 1e-6, "rows_sum, skipping -1%s", "");
    int32_t ids[N] = {3, -1, 0, 3, 1, -1, 2};
    float *table = rand_vec(4 * D), *dxv = dev_put(d, x, F(N * D));
    d->be.ops->embed_rows_add(&d->be.ctx, dxv, (KnMatrix){dev_put(d, table, F(4 * D)), KN_F32, 4, D, 0, 0},
                              dev_put(d, ids, sizeof ids), N, dev_alloc(d, F(D)));
    dev_get(d, got, dxv, F(N * D));
    for (int i = 0; i < N; i++)
        for (int j = 0; j < D; j++) ref[i * D + j] = (double)x[i * D + j] + (ids[i] >= 0 ? table[ids[i] * D + j] : 0);
    EXPECT_CLOSE(got, ref, N * D, 1e-6, "embed_rows_add, skipping -1%s", "");
    float *y = dev_poisoned(d, F(N * D));
    d->be.ops->clamp(&d->be.ctx, y, dev_put(d, x, F(N * D)), N * D, -0.3f, 0.4f);
    dev_get(d, got, y, F(N * D));
    for (int i = 0; i < N * D; i++) ref[i] = fmin(fmax(x[i], (double)-0.3f), (double)0.4f);
    EXPECT_CLOSE(got, ref, N * D, 0, "clamp%s", "");
    float *dy = rand_vec(N * D), *acc = rand_vec(N * D);
    for (int accumulate = 0; accumulate < 2; accumulate++) {
        float *dd = dev_put(d, acc, F(N * D));
        d->be.ops->clamp_dx(&d->be.ctx, dd, dev_put(d, x, F(N * D)), dev_put(d, dy, F(N * D)), N * D, -0.3f, 0.4f,
                            accumulate);
        dev_get(d, got, dd, F(N * D));
        for (int i = 0; i < N * D; i++)
            ref[i] = (accumulate ? acc[i] : 0.0) + (x[i] >= -0.3f && x[i] <= 0.4f ? dy[i] : 0.0);
        EXPECT_CLOSE(got, ref, N * D, 1e-7, "clamp_dx %s", accumulate ? "accumulated" : "written");
    }
    d->be.ops->scale_shift(&d->be.ctx, y, dev_put(d, x, F(N * D)), N * D, -0.5f, 2.0f);
    dev_get(d, got, y, F(N * D));
    for (int i = 0; i < N * D; i++) ref[i] = 2.0 * (x[i] - 0.5);
    EXPECT_CLOSE(got, ref, N * D, 1e-7, "scale_shift%s", "");
    float *bias = rand_vec(D), *sc = rand_vec(D);
    d->be.ops->standardize(&d->be.ctx, y, N, D, dev_put(d, bias, F(D)), dev_put(d, sc, F(D)));
    dev_get(d, got, y, F(N * D));
    for (int i = 0; i < N * D; i++) ref[i] = (2.0 * (x[i] - 0.5) - bias[i % D]) * sc[i % D];
    EXPECT_CLOSE(got, ref, N * D, 1e-6, "standardize%s", "");
    free(x); free(base); free(table); free(dy); free(acc); free(bias); free(sc);
    dev_reset(d);
}

/* ---- the optimizer over one slab ---- */

static void test_optim_ops(Dev *d) {
    enum { N = 37 };
    float *p = rand_vec(N), *g = rand_vec(N), *m = rand_vec(N), *v = rand_vec(N), got[N];
    for (int i = 0; i < N; i++) v[i] = fabsf(v[i]);
    KnAdamW h = {0.999f, 0.9f, 0.999f, 1e-8f, 0.01f / (1.0f - 0.9f * 0.9f), sqrtf(1.0f - 0.999f * 0.999f)};
    double ref[N];
    for (int i = 0; i < N; i++) {
        double mm = m[i] + (g[i] - (double)m[i]) * (1 - (double)h.beta1);
        double vv = v[i] * (double)h.beta2 + (1 - (double)h.beta2) * g[i] * g[i];
        ref[i] = p[i] * (double)h.decay - h.step_size * mm / (sqrt(vv) / h.bc2_sqrt + h.eps);
    }
    float *dp = dev_put(d, p, F(N));
    d->be.ops->adamw(&d->be.ctx, dp, dev_put(d, g, F(N)), dev_put(d, m, F(N)), dev_put(d, v, F(N)), N, &h);
    dev_get(d, got, dp, F(N));
    EXPECT_CLOSE(got, ref, N, 1e-5, "adamw%s", "");
    double *dn = dev_poisoned(d, sizeof(double)), norm, want = 0;
    d->be.ops->sq_norm(&d->be.ctx, dn, dev_put(d, g, F(N)), N);
    dev_get(d, &norm, dn, sizeof norm);
    for (int i = 0; i < N; i++) want += (double)g[i] * g[i];
    CHECK(fabs(norm - want) <= 1e-12 * want, "sq_norm %g vs %g", norm, want);
    free(p); free(g); free(m); free(v);
    dev_reset(d);
}

/* ---- sampling: greedy takes the first maximum; draws stay inside top-k
 * and the nucleus, follow softmax(logits / T) (4,000 draws, a fixed seed),
 * and advance each row's own state ---- */

static void test_sample(Dev *d) {
    enum { V = 6, DRAWS = 4000 };
    float logits[V] = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f, 0.5f};
    float *dl = dev_put(d, logits, sizeof logits);
    int32_t *dids = dev_poisoned(d, sizeof(int32_t)), id;
    KnSampleRow *drow = dev_alloc(d, sizeof(KnSampleRow));
    void *cands = dev_alloc(d, 8 * V);
    KnSampleRow greedy = {0.0f, 1.0f, 0, 0, 7};
    d->be.ops->upload(&d->be.ctx, drow, &greedy, sizeof greedy);
    d->be.ops->sample(&d->be.ctx, dids, dl, drow, 1, V, cands);
    dev_get(d, &id, dids, sizeof id);
    KnSampleRow after;
    dev_get(d, &after, drow, sizeof after);
    CHECK(id == 1 && after.rng == 7, "greedy: the first maximum, the state untouched (got %d)", id);
    int counts[3][V] = {{0}};
    KnSampleRow kinds[3] = {{1.0f, 1.0f, 0, 0, 0}, {1.0f, 1.0f, 2, 0, 0}, {1.0f, 0.3f, 0, 0, 0}};
    for (int k = 0; k < 3; k++) {
        kinds[k].rng = 12345;
        d->be.ops->upload(&d->be.ctx, drow, &kinds[k], sizeof kinds[k]);
        for (int i = 0; i < DRAWS; i++) {
            d->be.ops->sample(&d->be.ctx, dids, dl, drow, 1, V, cands);
            dev_get(d, &id, dids, sizeof id);
            if (id >= 0 && id < V) counts[k][id]++;
        }
    }
    double z = 0, p[V];
    for (int i = 0; i < V; i++) z += exp(logits[i]);
    int ok = 1;
    for (int i = 0; i < V; i++) {
        p[i] = exp(logits[i]) / z;
        double sd = sqrt(p[i] * (1 - p[i]) / DRAWS);
        ok &= fabs((double)counts[0][i] / DRAWS - p[i]) < 5 * sd + 1e-3;
    }
    CHECK(ok, "draws follow the softmax (%d %d %d %d %d %d)", counts[0][0], counts[0][1], counts[0][2], counts[0][3],
          counts[0][4], counts[0][5]);
    CHECK(counts[1][1] + counts[1][3] == DRAWS && counts[1][1] > DRAWS / 3 && counts[1][3] > DRAWS / 3,
          "top_k 2 keeps the two best, ties by id (%d, %d)", counts[1][1], counts[1][3]);
    CHECK(counts[2][1] == DRAWS, "a nucleus of 0.3 holds only the best token (%d)", counts[2][1]);
    dev_reset(d);
}

/* ---- sampling over Gemma's vocabulary: each row's draw equals the rule of
 * ops.h applied by sorting (a reference written from it), row by row in
 * one call, with ties by id at the maximum, inside the top_k boundary and
 * where most of the mass lies (a group of 50 equal logits), over 262,144
 * softcapped logits. The CPU's draws equal it exactly; another backend's
 * may differ only where a draw lands within rounding of a boundary. ---- */

typedef struct {
    float p;
    int32_t id;
} RefCand;

static int ref_cand_cmp(const void *a, const void *b) {
    const RefCand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* A row's kept candidates, most probable first, and their mass. */
typedef struct {
    RefCand *c;
    int64_t n;
    double total;
    int32_t best;
} RefRow;

static void ref_row(RefRow *o, const float *l, int64_t V, const KnSampleRow *r) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
        if (l[i] > l[best]) best = i;
    o->best = (int32_t)best;
    o->c = malloc((size_t)V * sizeof *o->c);
    o->n = 0;
    o->total = 0;
    if (r->temperature <= 0.0f || r->top_k == 1) return;
    float inv_t = 1.0f / r->temperature;
    for (int64_t i = 0; i < V; i++) {
        float z = (l[i] - l[best]) * inv_t;
        if (z > -40.0f) o->c[o->n++] = (RefCand){expf(z), (int32_t)i};
    }
    qsort(o->c, (size_t)o->n, sizeof *o->c, ref_cand_cmp);
    if (r->top_k > 0 && o->n > r->top_k) o->n = r->top_k;
    for (int64_t i = 0; i < o->n; i++) o->total += o->c[i].p;
    if (r->top_p < 1.0f) {
        double keep = 0;
        int64_t k = 0;
        while (k < o->n && keep < r->top_p * o->total) keep += o->c[k++].p;
        o->n = k > 0 ? k : 1;
        o->total = keep > 0 ? keep : o->c[0].p;
    }
}

/* The token drawn with state *rng (advanced), and where among the kept. */
static int32_t ref_draw(const RefRow *o, uint64_t *rng, int64_t *rank) {
    if (o->n == 0) {
        *rank = -1;
        return o->best;
    }
    double u = (double)(gf_splitmix64(rng) >> 11) * (1.0 / 9007199254740992.0) * o->total, acc = 0;
    for (int64_t i = 0; i < o->n; i++) {
        acc += o->c[i].p;
        if (u < acc) {
            *rank = i;
            return o->c[i].id;
        }
    }
    *rank = o->n - 1;
    return o->c[o->n - 1].id;
}

static void test_sample_vocab(Dev *d) {
    enum { V = 262144, R = 8 };
    const KnSampleRow kinds[R] = {
        {0.0f, 1.0f, 0, 0, 0},     /* greedy: the first of two maxima */
        {1.0f, 1.0f, 0, 0, 0},     /* a draw from everything */
        {0.7f, 1.0f, 40, 0, 0},    /* top_k */
        {1.0f, 0.9f, 0, 0, 0},     /* nucleus */
        {1.3f, 0.95f, 2000, 0, 0}, /* both */
        {1.0f, 1.0f, 30, 0, 0},    /* top_k cutting the tied group */
        {1.0f, 0.5f, 0, 0, 0},     /* a nucleus ending inside the tied group */
        {0.9f, 1.0f, 1, 0, 0},     /* top_k 1: greedy */
    };
    int calls = d->be.ctx.device == KN_DEVICE_CUDA ? 50 : 3;
    float *l = malloc((size_t)R * V * sizeof *l);
    for (int r = 0; r < R; r++) {
        float *row = l + (size_t)r * V;
        for (int64_t i = 0; i < V; i++) {
            double g = 0;
            for (int k = 0; k < 4; k++) g += frand();
            row[i] = (float)(30.0 * tanh((g * 4.0 + (r % 3)) / 30.0));
        }
        float top = 0;
        for (int64_t i = 0; i < V; i++) top = fmaxf(top, row[i]);
        int64_t at = 1000 + 7919 * r;
        row[at] = row[at + 99991] = top + 1.0f;             /* two maxima */
        for (int k = 0; k < 50; k++) row[(at + 3 + 5003 * k) % V] = top + 0.5f; /* the tied group */
        for (int k = 0; k < 4000; k++) row[(at + 11 + 61 * k) % V] = top - 9.0f; /* a large tie of the tail */
    }
    RefRow ref[R];
    for (int r = 0; r < R; r++) ref_row(&ref[r], l + (size_t)r * V, V, &kinds[r]);
    float *dl = dev_put(d, l, (size_t)R * V * sizeof *l);
    int32_t *dids = dev_poisoned(d, R * sizeof(int32_t)), ids[R];
    KnSampleRow *drows = dev_alloc(d, sizeof kinds), rows[R], after[R];
    void *cands = dev_alloc(d, (size_t)8 * V);
    memcpy(rows, kinds, sizeof rows);
    for (int r = 0; r < R; r++) rows[r].rng = 0x9E3779B97F4A7C15ull * (uint64_t)(r + 1);
    int draws = 0, differ = 0, states_ok = 1, tied_inside = 0;
    for (int call = 0; call < calls; call++) {
        d->be.ops->upload(&d->be.ctx, drows, rows, sizeof rows);
        d->be.ops->memset(&d->be.ctx, dids, 0xFF, sizeof ids);
        d->be.ops->sample(&d->be.ctx, dids, dl, drows, R, V, cands);
        dev_get(d, ids, dids, sizeof ids);
        dev_get(d, after, drows, sizeof after);
        for (int r = 0; r < R; r++) {
            uint64_t st = rows[r].rng;
            int64_t rank = -1;
            int greedy = kinds[r].temperature <= 0.0f || kinds[r].top_k == 1;
            int32_t want = greedy ? ref[r].best : ref_draw(&ref[r], &st, &rank);
            states_ok &= after[r].rng == st;
            draws++;
            differ += ids[r] != want;
            if (ids[r] != want && !(ids[r] >= 0 && ids[r] < V))
                CHECK(0, "sample row %d call %d: id %d out of range", r, call, ids[r]);
            tied_inside += rank > 0 && ref[r].c[rank].p == ref[r].c[rank - 1].p;
            rows[r].rng = after[r].rng;
        }
    }
    CHECK(ref[0].best == 1000 && ids[0] == 1000, "greedy takes the first of two maxima (%d)", ids[0]);
    CHECK(ids[7] == ref[7].best, "top_k 1 is greedy (%d)", ids[7]);
    CHECK(states_ok, "each drawing row's state advanced once, greedy rows' untouched");
    CHECK(tied_inside > 0, "draws landed inside a tie (%d)", tied_inside);
    int limit = d->be.ctx.device == KN_DEVICE_CUDA ? draws / 50 : 0;
    CHECK(differ <= limit, "%s: %d of %d draws over %d logits differ from the sorted rule (limit %d)", d->be.name,
          differ, draws, V, limit);
    for (int r = 0; r < R; r++) free(ref[r].c);
    free(l);
    dev_reset(d);
}

/* ---- recorded runs (ops.h graph_begin / graph_end) ---- */

enum { GPH_N = 24, GPH_C = 40, GPH_R = 33, GPH_RANK = 4 };

/* The recorded chain: y = gelu(s x W^T), then doubled `extra` times. */
static void graph_chain(Dev *d, float *y, const float *x, KnMatrix w, float s, int extra) {
    const KnOps *o = d->be.ops;
    o->matmul(&d->be.ctx, y, x, w, GPH_N);
    o->scale(&d->be.ctx, y, (size_t)GPH_N * GPH_R, s);
    o->gelu_tanh(&d->be.ctx, y, (size_t)GPH_N * GPH_R);
    for (int i = 0; i < extra; i++) o->add(&d->be.ctx, y, y, y, (size_t)GPH_N * GPH_R);
}

/* The chain run through a graph of bucket under sig (NULL: none) into yg,
 * and op by op into ye; *same: the two outputs are equal bit for bit.
 * Returns how yg was computed: KN_GRAPH_RECORD or KN_GRAPH_REPLAY when a
 * graph ran, KN_GRAPH_NONE when the ops ran one by one (no recording, or
 * one that ran nothing and was submitted again, as the engine does). */
static int graph_run(Dev *d, float *yg, float *ye, const float *x, KnMatrix w, float s, int extra, int64_t bucket,
                     const char *sig, int *same) {
    static float g[GPH_N * GPH_R], e[GPH_N * GPH_R];
    d->be.ops->memset(&d->be.ctx, yg, 0xFF, sizeof g);
    d->be.ops->memset(&d->be.ctx, ye, 0xFF, sizeof e);
    int mode = d->be.ops->graph_begin(&d->be.ctx, bucket, sig, sig ? strlen(sig) : 0);
    if (mode != KN_GRAPH_REPLAY) graph_chain(d, yg, x, w, s, extra);
    if (mode != KN_GRAPH_NONE && d->be.ops->graph_end(&d->be.ctx)) {
        graph_chain(d, yg, x, w, s, extra);
        mode = KN_GRAPH_NONE;
    }
    graph_chain(d, ye, x, w, s, extra);
    dev_get(d, g, yg, sizeof g);
    dev_get(d, e, ye, sizeof e);
    *same = memcmp(g, e, sizeof g) == 0 && !isnan(e[0]);
    return mode;
}

/* One LoRA shrink of seg (x into t) under graph_begin(bucket, sig): its
 * mode, and in *failed what graph_end answered (-1: no recording). */
static int shrink_graphed(Dev *d, int64_t bucket, const char *sig, float *t, const float *x, const KnLoraSeg *seg,
                          float *buf, int *failed) {
    int mode = d->be.ops->graph_begin(&d->be.ctx, bucket, sig, sig ? strlen(sig) : 0);
    if (mode != KN_GRAPH_REPLAY) d->be.ops->lora_shrink(&d->be.ctx, t, GPH_RANK, x, seg, 1, GPH_C, buf);
    *failed = mode != KN_GRAPH_NONE ? d->be.ops->graph_end(&d->be.ctx) : -1;
    return mode;
}

/* A recorded call runs on what it was handed when it was submitted, as a
 * GPU's captured launch runs on its parameters: a segment array changed
 * after the submission, before graph_end or before a replay, changes
 * nothing (which is why a step's signature must name what it passes). */
static void test_graphs_kept(Dev *d, const float *x) {
    float *hA = rand_vec(GPH_RANK * GPH_C), *hA2 = rand_vec(GPH_RANK * GPH_C);
    const float *A = dev_put(d, hA, F(GPH_RANK * GPH_C)), *A2 = dev_put(d, hA2, F(GPH_RANK * GPH_C));
    float *t = dev_alloc(d, F(GPH_N * GPH_RANK));
    KnLoraSeg seg = {.row0 = 0, .n_rows = GPH_N, .A = A, .rank = GPH_RANK, .scale = 1.0f};
    float want[GPH_N * GPH_RANK], got[GPH_N * GPH_RANK];
    d->be.ops->lora_shrink(&d->be.ctx, t, GPH_RANK, x, &seg, 1, GPH_C, NULL);
    dev_get(d, want, t, sizeof want);
    int modes[2] = {-1, -1}, same = 1;
    for (int k = 0; k < 2; k++) {
        d->be.ops->memset(&d->be.ctx, t, 0xFF, F(GPH_N * GPH_RANK));
        seg.A = A;
        seg.scale = 1.0f;
        modes[k] = d->be.ops->graph_begin(&d->be.ctx, 31, "kept", 4);
        if (modes[k] != KN_GRAPH_REPLAY) d->be.ops->lora_shrink(&d->be.ctx, t, GPH_RANK, x, &seg, 1, GPH_C, NULL);
        seg.A = A2;
        seg.scale = 3.0f;
        if (modes[k] != KN_GRAPH_NONE && d->be.ops->graph_end(&d->be.ctx)) modes[k] = -1;
        dev_get(d, got, t, sizeof got);
        same &= memcmp(got, want, sizeof got) == 0;
    }
    CHECK(modes[0] == KN_GRAPH_RECORD && modes[1] == KN_GRAPH_REPLAY && same,
          "%s: a recorded call keeps the segments it was handed (%d %d, equal %d)", d->be.name, modes[0], modes[1],
          same);
    free(hA);
    free(hA2);
}

/* CUDA only: a recording that an entry refuses (an upload; a scratch that
 * would grow) runs nothing, says so and leaves no fault; a signed graph
 * over the scratch replays until the scratch moves. */
static void test_graphs_refused(Dev *d, const float *x, KnMatrix w, float *yg) {
    float poison, one = 1.0f;
    float *other = dev_alloc(d, sizeof one);
    d->be.ops->memset(&d->be.ctx, yg, 0xFF, F(GPH_N * GPH_R));
    int mode = d->be.ops->graph_begin(&d->be.ctx, 7, NULL, 0);
    graph_chain(d, yg, x, w, 1.0f, 0);
    d->be.ops->upload(&d->be.ctx, other, &one, sizeof one);
    int failed = mode == KN_GRAPH_RECORD ? d->be.ops->graph_end(&d->be.ctx) : -1;
    dev_get(d, &poison, yg, sizeof poison);
    CHECK(failed == 1 && isnan(poison), "cuda: a recording with an upload in it runs nothing (%d)", failed);
    /* a training LoRA segment with dropout drops its rows out into the
     * scratch, which this context has never grown */
    float *hA = rand_vec(GPH_RANK * GPH_C), *t = dev_alloc(d, F(GPH_N * GPH_RANK)), *buf = dev_alloc(d, F(2 * GPH_C));
    KnLoraSeg seg = {.row0 = 0, .n_rows = GPH_N, .A = dev_put(d, hA, F(GPH_RANK * GPH_C)), .rank = GPH_RANK, .scale = 1.0f,
                     .dropout = 0.25f, .dropout_seed = 9};
    seg.dA = dev_alloc(d, F(GPH_RANK * GPH_C));
    d->be.ops->memset(&d->be.ctx, t, 0xFF, F(GPH_N * GPH_RANK));
    shrink_graphed(d, 8, NULL, t, x, &seg, buf, &failed);
    dev_get(d, &poison, t, sizeof poison);
    CHECK(failed == 1 && isnan(poison), "cuda: a recording whose scratch would grow runs nothing (%d)", failed);
    d->be.ops->lora_shrink(&d->be.ctx, t, GPH_RANK, x, &seg, 1, GPH_C, buf); /* grows it */
    float want[GPH_N * GPH_RANK], got[GPH_N * GPH_RANK];
    dev_get(d, want, t, sizeof want);
    d->be.ops->memset(&d->be.ctx, t, 0xFF, F(GPH_N * GPH_RANK));
    shrink_graphed(d, 8, NULL, t, x, &seg, buf, &failed);
    dev_get(d, got, t, sizeof got);
    CHECK(failed == 0 && memcmp(got, want, sizeof got) == 0, "cuda: then, the scratch grown, it runs (%d)", failed);
    /* a signed recording over the scratch is not replayed once the
     * scratch has moved (a segment of twice the rows grows it) */
    int m1 = shrink_graphed(d, 9, "lora", t, x, &seg, buf, &failed);
    int m2 = shrink_graphed(d, 9, "lora", t, x, &seg, buf, &failed);
    float *x2 = dev_alloc(d, F(2 * GPH_N * GPH_C)), *t2 = dev_alloc(d, F(2 * GPH_N * GPH_RANK));
    d->be.ops->memset(&d->be.ctx, x2, 0, F(2 * GPH_N * GPH_C));
    KnLoraSeg twice = seg;
    twice.n_rows = 2 * GPH_N;
    d->be.ops->lora_shrink(&d->be.ctx, t2, GPH_RANK, x2, &twice, 1, GPH_C, buf);
    int m3 = shrink_graphed(d, 9, "lora", t, x, &seg, buf, &failed);
    dev_get(d, got, t, sizeof got);
    CHECK(m1 == KN_GRAPH_RECORD && m2 == KN_GRAPH_REPLAY && m3 == KN_GRAPH_RECORD && failed == 0 &&
              memcmp(got, want, sizeof got) == 0,
          "cuda: a graph over the scratch is replayed until the scratch moves (%d %d %d)", m1, m2, m3);
    GfError err;
    CHECK(d->be.ops->synchronize(&d->be.ctx, &err) == GF_OK, "cuda: no fault is left behind by the failed recordings");
    free(hA);
}

/* CUDA only: a context opened under GF_CUDA_GRAPHS=0 answers KN_GRAPH_OFF,
 * not KN_GRAPH_NONE, so that the engine stops padding decode steps for
 * graphs it will never get. */
static void test_graphs_off(void) {
    const char *env = getenv("GF_CUDA_GRAPHS");
    char *was = env ? strdup(env) : NULL;
    setenv("GF_CUDA_GRAPHS", "0", 1);
    Dev d;
    int opened = dev_open(&d, KN_DEVICE_CUDA, 1);
    if (was) setenv("GF_CUDA_GRAPHS", was, 1);
    else unsetenv("GF_CUDA_GRAPHS");
    free(was);
    if (!opened) return;
    int mode = d.be.ops->graph_begin(&d.be.ctx, 1, "off", 3);
    CHECK(mode == KN_GRAPH_OFF, "cuda: under GF_CUDA_GRAPHS=0 graph_begin answers that graphs are off (%d)", mode);
    dev_close(&d);
}

/* A graph computes what its ops run one by one compute, bit for bit:
 * three recordings of one bucket with other arguments (its graph updated
 * in place), one of another shape in it, more buckets than a context
 * keeps and an evicted one again. Under a signature, a run with the same
 * one replays the recording and reads the inputs' new contents; another
 * signature records again (test_graphs_kept; on CUDA, also
 * test_graphs_refused). A fresh context of kind;
 * skipped where the backend does not record. */
static void test_graphs(KnDeviceKind kind) {
    Dev d;
    if (!dev_open(&d, kind, 1)) return;
    if (!d.be.ops->graph_begin) {
        dev_close(&d);
        return;
    }
    float *hw = rand_vec(GPH_R * GPH_C), *hx = rand_vec(GPH_N * GPH_C);
    KnMatrix w = {.data = dev_put(&d, hw, F(GPH_R * GPH_C)), .dtype = KN_F32, .rows = GPH_R, .cols = GPH_C};
    float *x = dev_put(&d, hx, F(GPH_N * GPH_C)), *yg = dev_alloc(&d, F(GPH_N * GPH_R)), *ye = dev_alloc(&d, F(GPH_N * GPH_R));
    int ran = 1, same, all_same = 1;
    for (int k = 0; k < 3; k++) {
        ran &= graph_run(&d, yg, ye, x, w, 0.5f + (float)k, 0, 7, NULL, &same) == KN_GRAPH_RECORD;
        all_same &= same;
    }
    CHECK(ran && all_same, "%s: three recordings of one bucket, other arguments each: ran %d, equal %d", d.be.name,
          ran, all_same);
    ran = graph_run(&d, yg, ye, x, w, 0.75f, 2, 7, NULL, &same) == KN_GRAPH_RECORD;
    CHECK(ran && same, "%s: a recording of another shape in the bucket: ran %d, equal %d", d.be.name, ran, same);
    ran = 1, all_same = 1;
    for (int b = 0; b < 12; b++) {
        ran &= graph_run(&d, yg, ye, x, w, 0.1f * (float)(b + 1), b % 3, 100 + b, NULL, &same) == KN_GRAPH_RECORD;
        all_same &= same;
    }
    ran &= graph_run(&d, yg, ye, x, w, 2.5f, 0, 100, NULL, &same) == KN_GRAPH_RECORD;
    CHECK(ran && same && all_same, "%s: 12 buckets and the first again: ran %d, equal %d", d.be.name, ran,
          same && all_same);
    int m1 = graph_run(&d, yg, ye, x, w, 1.5f, 1, 20, "step of 24 rows", &same);
    all_same = same;
    for (int i = 0; i < GPH_N * GPH_C; i++) hx[i] = -hx[i] * 0.5f;
    d.be.ops->upload(&d.be.ctx, x, hx, F(GPH_N * GPH_C));
    int m2 = graph_run(&d, yg, ye, x, w, 1.5f, 1, 20, "step of 24 rows", &same);
    all_same &= same;
    int m3 = graph_run(&d, yg, ye, x, w, 0.5f, 0, 20, "another step", &same);
    all_same &= same;
    CHECK(m1 == KN_GRAPH_RECORD && m2 == KN_GRAPH_REPLAY && m3 == KN_GRAPH_RECORD && all_same,
          "%s: signed runs record, replay with the inputs' new contents, record on another signature (%d %d %d, "
          "equal %d)", d.be.name, m1, m2, m3, all_same);
    test_graphs_kept(&d, x);
    if (kind == KN_DEVICE_CUDA) test_graphs_refused(&d, x, w, yg);
    if (kind == KN_DEVICE_CUDA) test_graphs_off();
    free(hw);
    free(hx);
    dev_close(&d);
}

/* Touches guarded device memory from outside an op: reads (0) or writes (1). */
static void touch_guarded(int what) {
    Dev d;
    if (!dev_open(&d, KN_DEVICE_GUARDED, 1)) _exit(3);
    float *p = dev_poisoned(&d, 64);
    if (what == 0) { volatile float v = p[0]; (void)v; }
    else p[1] = 1.0f;
}

/* Hands an op host memory (0), or a buffer of another guarded context that
 * is no sibling (1), or uploads while a graph is recorded (3), or replays a
 * graph over a buffer freed since (4): all abort. 2: the same through a
 * sibling, which shares the region, runs. */
static void hand_guarded(int what) {
    Dev a;
    if (!dev_open(&a, KN_DEVICE_GUARDED, 1)) _exit(3);
    float host[16] = {0};
    GfError err;
    if (what == 0) a.be.ops->scale(&a.be.ctx, host, 16, 2.0f);
    if (what == 3) {
        float *p = dev_alloc(&a, sizeof host);
        if (a.be.ops->graph_begin(&a.be.ctx, 1, NULL, 0) != KN_GRAPH_RECORD) _exit(5);
        a.be.ops->upload(&a.be.ctx, p, host, sizeof host);
        _exit(6);
    }
    if (what == 4) {
        KnBuffer buf;
        if (a.be.ops->alloc(&a.be.ctx, &buf, sizeof host, KN_F32, "test", &err)) _exit(3);
        if (a.be.ops->graph_begin(&a.be.ctx, 1, "freed", 5) != KN_GRAPH_RECORD) _exit(5);
        a.be.ops->scale(&a.be.ctx, buf.data, 16, 2.0f);
        if (a.be.ops->graph_end(&a.be.ctx)) _exit(5);
        a.be.ops->free(&a.be.ctx, &buf);
        if (a.be.ops->graph_begin(&a.be.ctx, 1, "freed", 5) != KN_GRAPH_REPLAY) _exit(5);
        a.be.ops->graph_end(&a.be.ctx);
        _exit(6);
    }
    KnBackend b;
    KnBackendOptions o = {.n_threads = 1, .share = what == 2 ? &a.be : NULL};
    if (kn_backend_open(KN_DEVICE_GUARDED, 0, &o, &b, &err)) _exit(3);
    float one[4] = {1, 2, 3, 4}, got[4];
    float *p = dev_put(&a, one, sizeof one);
    b.ops->scale(&b.ctx, p, 4, 2.0f);
    a.be.ops->download(&a.be.ctx, got, p, sizeof got);
    kn_backend_close(&b);
    dev_close(&a); /* the region outlives the sibling that closed first */
    _exit(got[3] == 8.0f ? 0 : 4);
}

/* The guarded backend's promise: device memory faults when touched from
 * outside an op, and sealed buffers take no writes even inside one; an op
 * handed anything but device memory of its region aborts; siblings share
 * one region. */
static void test_guarded_faults(void) {
    for (int what = 0; what < 2; what++)
        CHECK(check_segfaults(touch_guarded, what), "guarded device memory %s from the host faults",
              what == 0 ? "read" : "written");
    CHECK(check_aborts(hand_guarded, 0), "an op handed host memory aborts");
    CHECK(check_aborts(hand_guarded, 1), "an op handed another region's buffer aborts");
    CHECK(check_aborts(hand_guarded, 3), "an upload while a graph is recorded aborts");
    CHECK(check_aborts(hand_guarded, 4), "a replay of a graph over a freed buffer aborts");
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) hand_guarded(2);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a sibling context runs ops on the region's buffers (%d)",
          status);
}

/* What a context keeps for itself, per call (ops.h scratch_bytes): nothing
 * on the CPU kinds; on CUDA its cuBLAS workspace always, and beyond it the
 * bf16 operands of a matmul (x or dy rounded, plus 64 MB of widened rows
 * unless the weights are BF16; none for a decode step's GEMV), attention_dx's
 * chunk of scores, a dropped-out LoRA training segment and the MoE backward's
 * gate_up gradients. Asked of the table
 * alone: no device needed. */
static void test_scratch_bytes(void) {
    KnBackend cpu = {.ops = kn_backend_ops(KN_DEVICE_CPU)}, guarded = {.ops = kn_backend_ops(KN_DEVICE_GUARDED)};
    KnMatrix nf4 = {.data = (void *)1, .dtype = KN_NF4, .rows = 2560, .cols = 10240};
    KnCall mm = {.op = KN_OP_MATMUL, .w = nf4, .n = 1024};
    CHECK(cpu.ops && guarded.ops && kn_scratch_bytes(&cpu, &mm) == 0 && kn_scratch_bytes(&guarded, &mm) == 0,
          "the CPU kinds keep no scratch");
    const KnOps *ops = kn_backend_ops(KN_DEVICE_CUDA);
    CHECK(!ops == !kn_cuda_built(), "the CUDA table is there exactly when built");
    if (!ops) return;
    KnBackend f32 = {.ops = ops, .ctx = {.precision = KN_PRECISION_FP32}}, b16 = {.ops = ops, .ctx = {.precision = KN_PRECISION_BF16}};
    size_t ws = kn_scratch_bytes(&f32, &mm);
    CHECK(ws > 0 && ws <= ((size_t)64 << 20), "cuBLAS workspace %zu", ws);
    size_t whole = (size_t)2560 * 10240 * 2; /* under 64 MB: every row widened at once */
    CHECK(kn_scratch_bytes(&b16, &mm) == ws + (size_t)1024 * 10240 * 2 + whole, "bf16 NF4 matmul: x and its rows");
    KnCall dx = mm;
    dx.op = KN_OP_MATMUL_DX;
    CHECK(kn_scratch_bytes(&b16, &dx) == ws + (size_t)1024 * 2560 * 2 + whole, "bf16 NF4 matmul_dx: dy and its rows");
    KnCall head = {.op = KN_OP_MATMUL_DX, .w = {.data = (void *)1, .dtype = KN_F32, .rows = 262144, .cols = 2560}, .n = 8};
    size_t chunk = (size_t)(((size_t)64 << 20) / (2 * 2560)) * 2560 * 2;
    CHECK(kn_scratch_bytes(&b16, &head) == ws + (size_t)8 * 262144 * 2 + chunk, "a vocabulary's rows 64 MB at a time");
    CHECK(kn_scratch_bytes(&f32, &dx) == ws, "fp32 matmul_dx: none of its own");
    KnCall bf = mm;
    bf.w.dtype = KN_BF16;
    CHECK(kn_scratch_bytes(&b16, &bf) == ws + (size_t)1024 * 10240 * 2, "bf16 weights are read in place");
    KnCall small = {.op = KN_OP_MATMUL, .w = {.data = (void *)1, .dtype = KN_NF4, .rows = 8, .cols = 16}, .n = 65};
    CHECK(kn_scratch_bytes(&b16, &small) == ws + 65 * 16 * 2 + 8 * 16 * 2, "a small matrix widens its own rows only");
    small.n = 64;
    CHECK(kn_scratch_bytes(&b16, &small) == ws, "a decode batch of 64 rows widens tiles in shared memory");
    KnCall down = {.op = KN_OP_MATMUL, .w = {.data = (void *)1, .dtype = KN_NF4, .rows = 2560, .cols = 10240}, .n = 32};
    /* 160 steps of 64 features over 20 blocks of outputs: 12 shares of 14 steps */
    CHECK(kn_scratch_bytes(&b16, &down) == ws + (size_t)12 * 32 * 2560 * 4, "few outputs split the features");
    down.w.dtype = KN_BF16;
    CHECK(kn_scratch_bytes(&b16, &down) == ws + (size_t)32 * 10240 * 2, "bf16 weights of a batch: cuBLAS in place");
    mm.n = 16;
    CHECK(kn_scratch_bytes(&b16, &mm) == ws, "a decode step's GEMV takes no scratch");
    /* attention_dx: per query row, its scores and dS over every key and its
     * packed q, dout and dq, for every head; as many rows as 256 MiB hold */
    KnCall att = {.op = KN_OP_ATTENTION_DX, .n = 1000, .n_heads = 8, .dim = 256};
    CHECK(kn_scratch_bytes(&f32, &att) == ws + (size_t)1000 * 8 * (2 * 1000 + 3 * 256) * 4, "attention_dx: every query at once");
    CHECK(kn_scratch_bytes(&b16, &att) == kn_scratch_bytes(&f32, &att), "attention_dx: the same in both precisions");
    att.n = 32768;
    att.dim = 512; /* 2,146,304 bytes a query row: 125 rows a chunk */
    CHECK(kn_scratch_bytes(&f32, &att) == ws + (size_t)125 * 8 * (2 * 32768 + 3 * 512) * 4, "attention_dx: long context in chunks");
    KnCall lora = {.op = KN_OP_LORA_SHRINK_DX, .n = 300, .in = 2560, .dropout = 1};
    CHECK(kn_scratch_bytes(&f32, &lora) == ws + (size_t)300 * 2560 * 4, "a dropped-out training segment");
    lora.dropout = 0;
    CHECK(kn_scratch_bytes(&f32, &lora) == ws, "a segment without dropout reads x in place");
    lora.dropout = 1;
    lora.n = 15;
    CHECK(kn_scratch_bytes(&f32, &lora) == ws, "a short segment takes the row kernels");
    KnCall moe = {.op = KN_OP_MOE_EXPERTS_DX, .w = {.data = (void *)1, .dtype = KN_BF16, .rows = 128 * 2816, .cols = 704},
                  .n = 16, .top_k = 8, .n_experts = 128};
    /* each pair's gate_up and input gradients, and the pairs grouped by
     * expert (count, cursor, offset[E + 1], order; rounded up to 64 ints) */
    size_t per_token = (size_t)8 * (2 * 704 + 2816) * sizeof(float);
    size_t ints16 = ((3 * 128 + 1 + 16 * 8 + 63) / 64) * 64 * sizeof(int32_t);
    CHECK(kn_scratch_bytes(&b16, &moe) == ws + ints16 + 16 * per_token, "moe_experts_dx: every pair's gradients");
    moe.n = 100000;
    size_t moe_chunk = ((size_t)64 << 20) / per_token;
    size_t ints = ((3 * 128 + 1 + moe_chunk * 8 + 63) / 64) * 64 * sizeof(int32_t);
    CHECK(kn_scratch_bytes(&b16, &moe) == ws + ints + moe_chunk * per_token, "moe_experts_dx: 64 MB of tokens at a time");
    KnCall group = {.op = KN_OP_MOE_EXPERTS, .n = 300, .top_k = 8, .n_experts = 128};
    CHECK(kn_scratch_bytes(&f32, &group) == ws + ((3 * 128 + 1 + 300 * 8 + 63) / 64) * 64 * sizeof(int32_t),
          "moe_experts: the pairs grouped by expert");
}

/* ---- Gemma 4's real shapes on CUDA against the CPU backend (GPU only):
 * relative L2 error <= 1e-5 in fp32 and <= 1e-2 in bf16, outputs poisoned
 * before each run ---- */

static double rel_l2(const float *got, const float *ref, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        e += d * d;
        r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

/* devs[0] the CPU (the reference), [1] CUDA fp32, [2] CUDA bf16 */
#define REAL_DEVS 3
static const double REAL_LIMIT[REAL_DEVS] = {0, 1e-5, 1e-2};
static const char *const REAL_NAME[REAL_DEVS] = {"cpu", "cuda fp32", "cuda bf16"};

/* matmul and matmul_dx of bf16 and NF4 weights [rows, cols] over n rows. */
static void real_matmul(Dev *devs, int rows, int cols, int n) {
    size_t nw = (size_t)rows * cols;
    float *wf = rand_vec(nw), *x = rand_vec((size_t)n * cols), *g = rand_vec((size_t)n * rows);
    uint16_t *wb = malloc(nw * 2);
    for (size_t i = 0; i < nw; i++) wb[i] = kn_f32_to_bf16(wf[i]);
    KnNf4 q;
    CHECK(kn_nf4_quantize(&q, (KnMatrix){wf, KN_F32, rows, cols, 0, 0}, &(GfError){0}) == GF_OK, "quantize");
    float *y[REAL_DEVS], *dx[REAL_DEVS];
    for (int kind = 0; kind < 2; kind++) {
        for (int v = 0; v < REAL_DEVS; v++) {
            Dev *d = &devs[v];
            KnNf4 qd;
            KnMatrix w;
            if (kind == 0) {
                w = (KnMatrix){dev_put(d, wb, nw * 2), KN_BF16, rows, cols, 0, 0};
            } else {
                nf4_on_device(d, &q, &qd);
                w = kn_nf4_matrix(&qd, 0, rows, cols);
            }
            float *dy = dev_poisoned(d, F(n * rows)), *ddx = dev_alloc(d, F(n * cols));
            d->be.ops->memset(&d->be.ctx, ddx, 0, F(n * cols));
            d->be.ops->matmul(&d->be.ctx, dy, dev_put(d, x, F(n * cols)), w, n);
            d->be.ops->matmul_dx(&d->be.ctx, ddx, dev_put(d, g, F(n * rows)), w, n);
            y[v] = malloc(F(n * rows));
            dx[v] = malloc(F(n * cols));
            dev_get(d, y[v], dy, F(n * rows));
            dev_get(d, dx[v], ddx, F(n * cols));
            dev_reset(d);
        }
        for (int v = 1; v < REAL_DEVS; v++) {
            double e = rel_l2(y[v], y[0], (size_t)n * rows), ex = rel_l2(dx[v], dx[0], (size_t)n * cols);
            CHECK(e <= REAL_LIMIT[v] && ex <= REAL_LIMIT[v], "%s matmul %s [%d, %d] x %d rows: rel L2 %.3g, dx %.3g",
                  REAL_NAME[v], kind ? "nf4" : "bf16", rows, cols, n, e, ex);
        }
        for (int v = 0; v < REAL_DEVS; v++) { free(y[v]); free(dx[v]); }
    }
    kn_nf4_free(&q);
    free(wf); free(x); free(g); free(wb);
}

/* The gated GELU at 31B's MLP width (21,504) over a training sequence's
 * 1,024 rows, forward and gradient: elementwise, so every precision gives
 * the CPU's values within rounding. */
static void real_gelu_gate(Dev *devs) {
    const int rows = 1024, cols = 21504;
    size_t n = (size_t)rows * cols;
    float *g = rand_vec(n), *u = rand_vec(n), *dy = rand_vec(n);
    for (size_t i = 0; i < n; i++) g[i] *= 4.0f;
    float *out[REAL_DEVS][3];
    for (int v = 0; v < REAL_DEVS; v++) {
        Dev *d = &devs[v];
        float *dg = dev_put(d, g, F(n)), *du = dev_put(d, u, F(n)), *ddy = dev_put(d, dy, F(n));
        float *y = dev_poisoned(d, F(n)), *og = dev_poisoned(d, F(n)), *ou = dev_poisoned(d, F(n));
        d->be.ops->gelu_gate(&d->be.ctx, y, dg, du, rows, cols, cols);
        d->be.ops->gelu_gate_dx(&d->be.ctx, og, ou, ddy, dg, du, n);
        float *dev_out[3] = {y, og, ou};
        for (int k = 0; k < 3; k++) {
            out[v][k] = malloc(F(n));
            dev_get(d, out[v][k], dev_out[k], F(n));
        }
        dev_reset(d);
    }
    static const char *const what[3] = {"y", "dg", "du"};
    for (int v = 1; v < REAL_DEVS; v++)
        for (int k = 0; k < 3; k++) {
            double e = rel_l2(out[v][k], out[0][k], n);
            CHECK(e <= 1e-6, "%s gelu_gate [%d, %d] %s: rel L2 %.3g", REAL_NAME[v], rows, cols, what[k], e);
        }
    for (int v = 0; v < REAL_DEVS; v++)
        for (int k = 0; k < 3; k++) free(out[v][k]);
    free(g); free(u); free(dy);
}

/* A training segment of E4B's down_proj (10,240 in, 2,560 out) at rank 64
 * over a sequence's 1,024 rows, with and without dropout: CUDA's GEMM path,
 * on bf16 operands on the tensor cores in the bf16 precision. */
static void real_lora(Dev *devs) {
    enum { LN = 1024, LIN = 10240, LOUT = 2560, LR = 64 };
    float *host[5] = {rand_vec((size_t)LN * LIN), rand_vec((size_t)LR * LIN), rand_vec((size_t)LOUT * LR),
                      rand_vec((size_t)LN * LOUT), rand_vec((size_t)LN * LOUT)};
    for (int drop = 0; drop < 2; drop++) {
        float p = drop ? 0.1f : 0.0f;
        LoraOut o[REAL_DEVS];
        for (int v = 0; v < REAL_DEVS; v++) {
            lora_out_alloc(&o[v], LN, LIN, LOUT, LR);
            lora_train_run(&devs[v], (const float *const *)host, LN, LIN, LOUT, LR, p, &o[v]);
        }
        for (int v = 1; v < REAL_DEVS; v++) {
            double e[5] = {rel_l2(o[v].y, o[0].y, (size_t)LN * LOUT), rel_l2(o[v].gt, o[0].gt, (size_t)LN * LR),
                           rel_l2(o[v].dx, o[0].dx, (size_t)LN * LIN), rel_l2(o[v].gA, o[0].gA, (size_t)LR * LIN),
                           rel_l2(o[v].gB, o[0].gB, (size_t)LOUT * LR)};
            double worst = 0;
            for (int k = 0; k < 5; k++) worst = fmax(worst, e[k]);
            CHECK(worst <= REAL_LIMIT[v],
                  "%s LoRA training segment [%d -> %d] rank %d over %d rows, dropout %.1f: rel L2 y %.3g, gt %.3g, "
                  "dx %.3g, dA %.3g, dB %.3g",
                  REAL_NAME[v], LIN, LOUT, LR, LN, p, e[0], e[1], e[2], e[3], e[4]);
        }
        for (int v = 0; v < REAL_DEVS; v++) lora_out_free(&o[v]);
    }
    for (int i = 0; i < 5; i++) free(host[i]);
}

/* A training sequence's attention at E4B's heads (8 over 2 KV heads) on its
 * full (head_dim 512) and sliding (256, window 512) layers, 2,048 tokens
 * with three of left padding and an image block of 256: attention_bulk
 * and attention_dx, whose scores take more than one chunk of queries on
 * CUDA at head_dim 512 (att_gemm.h). */
static void real_attention(Dev *devs) {
    enum { AN = 2048, AH = 8, AKV = 2 };
    const int dims[2] = {512, 256}, windows[2] = {0, 512};
    uint8_t *valid = malloc(AN);
    int32_t *group = malloc(AN * sizeof *group);
    for (int t = 0; t < AN; t++) {
        valid[t] = t >= 3;
        group[t] = t >= 100 && t < 356 ? 0 : -1;
    }
    for (int c = 0; c < 2; c++) {
        int D = dims[c];
        size_t nqv = (size_t)AN * AH * D, nkv = (size_t)AN * AKV * D;
        float *q = rand_vec(nqv), *k = rand_vec(nkv), *v = rand_vec(nkv), *go = rand_vec(nqv), *dk0 = rand_vec(nkv);
        float *out[REAL_DEVS], *grads[REAL_DEVS];
        for (int i = 0; i < REAL_DEVS; i++) {
            Dev *d = &devs[i];
            KnMask m = {dev_put(d, valid, AN), dev_put(d, group, AN * sizeof *group), windows[c]};
            float *dq_ = dev_put(d, q, F(nqv)), *dk_ = dev_put(d, k, F(nkv)), *dv_ = dev_put(d, v, F(nkv));
            float *o = dev_poisoned(d, F(nqv)), *gq = dev_poisoned(d, F(nqv));
            float *gk = dev_put(d, dk0, F(nkv)), *gv = dev_put(d, dk0, F(nkv));
            d->be.ops->attention_bulk(&d->be.ctx, o, dq_, dk_, dv_, AN, 0, AN, AH, AKV, D, 1.0f / sqrtf((float)D), &m);
            d->be.ops->attention_dx(&d->be.ctx, gq, gk, gv, dq_, dk_, dv_, dev_put(d, go, F(nqv)), AN, 0, AN, AH, AKV, D,
                                    1.0f / sqrtf((float)D), &m);
            out[i] = malloc(F(nqv));
            grads[i] = malloc(F(nqv + 2 * nkv));
            dev_get(d, out[i], o, F(nqv));
            dev_get(d, grads[i], gq, F(nqv));
            dev_get(d, grads[i] + nqv, gk, F(nkv));
            dev_get(d, grads[i] + nqv + nkv, gv, F(nkv));
            dev_reset(d);
        }
        for (int i = 1; i < REAL_DEVS; i++) {
            double e = rel_l2(out[i], out[0], nqv), eq = rel_l2(grads[i], grads[0], nqv);
            double ek = rel_l2(grads[i] + nqv, grads[0] + nqv, nkv), ev = rel_l2(grads[i] + nqv + nkv, grads[0] + nqv + nkv, nkv);
            CHECK(e <= REAL_LIMIT[i] && eq <= REAL_LIMIT[i] && ek <= REAL_LIMIT[i] && ev <= REAL_LIMIT[i],
                  "%s attention %d x %d/%d heads of %d, window %d: rel L2 %.3g, dq %.3g, dk %.3g, dv %.3g", REAL_NAME[i],
                  AN, AH, AKV, D, windows[c], e, eq, ek, ev);
        }
        for (int i = 0; i < REAL_DEVS; i++) { free(out[i]); free(grads[i]); }
        free(q); free(k); free(v); free(go); free(dk0);
    }
    free(valid); free(group);
}

/* The softcapped cross-entropy over 262,144 classes: losses and gradient. */
static void real_xent(Dev *devs) {
    enum { XR = 3 };
    const int64_t V = 262144;
    float *z = rand_vec((size_t)XR * V), *grad[REAL_DEVS];
    for (size_t i = 0; i < (size_t)XR * V; i++) z[i] *= 20.0f;
    int32_t targets[XR] = {7, 131071, 262143};
    double loss[REAL_DEVS][XR];
    for (int v = 0; v < REAL_DEVS; v++) {
        Dev *d = &devs[v];
        float *dz = dev_put(d, z, F(XR * V));
        double *dl = dev_alloc(d, XR * sizeof(double));
        d->be.ops->xent_softcap(&d->be.ctx, dl, dz, dev_put(d, targets, sizeof targets), XR, V, 30.0f, 0.5f, 1);
        dev_get(d, loss[v], dl, sizeof loss[v]);
        grad[v] = malloc(F(XR * V));
        dev_get(d, grad[v], dz, F(XR * V));
        dev_reset(d);
    }
    for (int v = 1; v < REAL_DEVS; v++) {
        double worst = 0;
        for (int r = 0; r < XR; r++) worst = fmax(worst, fabs(loss[v][r] - loss[0][r]) / fabs(loss[0][r]));
        double e = rel_l2(grad[v], grad[0], (size_t)XR * V);
        CHECK(worst <= 1e-5 && e <= REAL_LIMIT[v], "%s cross-entropy over 262144 classes: loss rel %.3g, gradient rel L2 %.3g",
              REAL_NAME[v], worst, e);
    }
    for (int v = 0; v < REAL_DEVS; v++) free(grad[v]);
    free(z);
}

/* The experts of 26B-A4B (128 experts, top 8, hidden 2816, intermediate
 * 704, bf16 weights) over 24 tokens, forward and backward. */
static void real_moe(Dev *devs) {
    enum { RE = 128, RK = 8, RH = 2816, RI = 704, RN = 24 };
    size_t ngu = (size_t)RE * 2 * RI * RH, ndown = (size_t)RE * RH * RI;
    uint16_t *gub = malloc(ngu * 2), *downb = malloc(ndown * 2);
    for (size_t i = 0; i < ngu; i++) gub[i] = kn_f32_to_bf16(frand() * 0.05f);
    for (size_t i = 0; i < ndown; i++) downb[i] = kn_f32_to_bf16(frand() * 0.05f);
    float *x = rand_vec(RN * RH), *gy = rand_vec(RN * RH), coef[RN * RK];
    int32_t idx[RN * RK];
    for (int t = 0; t < RN; t++)
        for (int k = 0; k < RK; k++) {
            idx[t * RK + k] = (t * 5 + k * 16) % RE; /* distinct within a token; experts shared across tokens */
            coef[t * RK + k] = 0.1f + 0.2f * fabsf(frand());
        }
    float *y[REAL_DEVS], *dx[REAL_DEVS], dc[REAL_DEVS][RN * RK];
    for (int v = 0; v < REAL_DEVS; v++) {
        Dev *d = &devs[v];
        KnMatrix mgu = {dev_put(d, gub, ngu * 2), KN_BF16, RE * 2 * RI, RH, 0, 0};
        KnMatrix mdown = {dev_put(d, downb, ndown * 2), KN_BF16, RE * RH, RI, 0, 0};
        int32_t *didx = dev_put(d, idx, sizeof idx);
        float *dcoef = dev_put(d, coef, sizeof coef), *dy = dev_poisoned(d, F(RN * RH));
        float *gu = dev_poisoned(d, F(RN * RK * 2 * RI)), *mm = dev_poisoned(d, F(RN * RK * RI));
        float *yk = dev_poisoned(d, F(RN * RK * RH)), *dgx = dev_poisoned(d, F(RN * RH)), *dgc = dev_poisoned(d, F(RN * RK));
        d->be.ops->moe_experts(&d->be.ctx, dy, dev_put(d, x, F(RN * RH)), didx, dcoef, gu, mm, yk, RN, RK, mgu, mdown);
        d->be.ops->moe_experts_dx(&d->be.ctx, dgx, dgc, dev_put(d, gy, F(RN * RH)), gu, yk, didx, dcoef,
                                  dev_alloc(d, F(4 * RI)), RN, RK, mgu, mdown);
        y[v] = malloc(F(RN * RH));
        dx[v] = malloc(F(RN * RH));
        dev_get(d, y[v], dy, F(RN * RH));
        dev_get(d, dx[v], dgx, F(RN * RH));
        dev_get(d, dc[v], dgc, sizeof dc[v]);
        dev_reset(d);
    }
    for (int v = 1; v < REAL_DEVS; v++) {
        double e = rel_l2(y[v], y[0], RN * RH), ex = rel_l2(dx[v], dx[0], RN * RH), ec = rel_l2(dc[v], dc[0], RN * RK);
        CHECK(e <= REAL_LIMIT[v] && ex <= REAL_LIMIT[v] && ec <= REAL_LIMIT[v],
              "%s experts 128 x top 8 [2816, 704] x %d tokens: rel L2 %.3g, dx %.3g, dcoef %.3g", REAL_NAME[v], RN, e,
              ex, ec);
    }
    for (int v = 0; v < REAL_DEVS; v++) { free(y[v]); free(dx[v]); }
    free(gub); free(downb); free(x); free(gy);
}

/* nf4_quantize: the bits kn_nf4_quantize gives on the host (codes, int8
 * absmax, group scales and the mean), from F32, BF16 and F16 weights, on
 * shapes with a partial last byte, block and group, several groups, a
 * block of zeros, a NaN and an outlier; the outputs poisoned first. */
static int nf4_same(Dev *d, const KnNf4 *dev, const KnNf4 *host) {
    size_t nc = (size_t)(host->n + 1) / 2, na = (size_t)host->n_blocks, ng = (size_t)host->n_groups * sizeof(float);
    uint8_t *c = malloc(nc), *a = malloc(na), *g = malloc(ng);
    dev_get(d, c, dev->codes, nc);
    dev_get(d, a, dev->absmax_q, na);
    dev_get(d, g, dev->group_scale, ng);
    int same = !memcmp(c, host->codes, nc) && !memcmp(a, host->absmax_q, na) && !memcmp(g, host->group_scale, ng) &&
               !memcmp(&dev->offset, &host->offset, sizeof host->offset) && dev->n == host->n &&
               dev->n_blocks == host->n_blocks && dev->n_groups == host->n_groups;
    free(c); free(a); free(g);
    return same;
}

static void nf4_quantize_at(Dev *d, int rows, int cols, KnDtype dtype, const float *wf) {
    int64_t n = (int64_t)rows * cols;
    size_t es = kn_dtype_size(dtype);
    uint8_t *stored = malloc((size_t)n * es);
    for (int64_t i = 0; i < n; i++) {
        if (dtype == KN_F32) ((float *)stored)[i] = wf[i];
        else ((uint16_t *)stored)[i] = dtype == KN_BF16 ? kn_f32_to_bf16(wf[i]) : kn_f32_to_f16(wf[i]);
    }
    KnMatrix hw = {stored, dtype, rows, cols, 0, 0};
    KnNf4 host, dev = {0};
    CHECK(kn_nf4_quantize(&host, hw, &(GfError){0}) == GF_OK, "host quantize %dx%d", rows, cols);
    kn_nf4_shape(&dev, n);
    dev.codes = dev_poisoned(d, (size_t)(n + 1) / 2);
    dev.absmax_q = dev_poisoned(d, (size_t)dev.n_blocks);
    dev.group_scale = dev_poisoned(d, (size_t)dev.n_groups * sizeof(float));
    dev.offset = NAN;
    KnMatrix dw = {dev_put(d, stored, (size_t)n * es), dtype, rows, cols, 0, 0};
    d->be.ops->nf4_quantize(&d->be.ctx, &dev, dw, dev_poisoned(d, kn_nf4_scratch_bytes(n)));
    CHECK(d->be.ops->synchronize(&d->be.ctx, &(GfError){0}) == GF_OK, "nf4_quantize %dx%d ran", rows, cols);
    CHECK(nf4_same(d, &dev, &host), "%s: nf4_quantize %dx%d from %s: the host's bits", d->be.name, rows, cols,
          dtype == KN_F32 ? "f32" : dtype == KN_BF16 ? "bf16" : "f16");
    kn_nf4_free(&host);
    free(stored);
    dev_reset(d);
}

static void test_nf4_quantize(Dev *d) {
    const int shapes[][2] = {{1, 1}, {3, 5}, {7, 64}, {33, 65}, {300, 129}, {64, 1024}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        size_t n = (size_t)rows * cols;
        float *w = rand_vec(n);
        for (size_t i = 0; i < n; i++) w[i] *= 0.05f;
        if (n > 200) {
            memset(w + 64, 0, 64 * sizeof *w); /* block 1: zeros */
            w[130] = NAN;
            w[n - 1] = 3.0f;
        }
        const KnDtype types[] = {KN_F32, KN_BF16, KN_F16};
        for (size_t t = 0; t < sizeof types / sizeof *types; t++) nf4_quantize_at(d, rows, cols, types[t], w);
        free(w);
    }
}

static void test_real_shapes(void) {
    static Dev devs[REAL_DEVS];
    if (!dev_open_at(&devs[1], KN_DEVICE_CUDA, 1, KN_PRECISION_FP32)) return; /* no GPU: nothing to compare */
    int ok2 = dev_open_at(&devs[2], KN_DEVICE_CUDA, 1, KN_PRECISION_BF16);
    int ok0 = dev_open_at(&devs[0], KN_DEVICE_CPU, 0, KN_PRECISION_FP32);
    CHECK(ok0 && ok2, "the CPU and CUDA bf16 backends open beside CUDA fp32%s", "");
    if (!ok0 || !ok2) {
        for (int v = 0; v < REAL_DEVS; v++)
            if (v == 1 || (v == 0 && ok0) || (v == 2 && ok2)) dev_close(&devs[v]);
        return;
    }
    printf("real shapes: CUDA fp32 and bf16 against the CPU\n");
    const int mm[][3] = {{6144, 1536, 7}, {2560, 10240, 300}, {5376, 5376, 16}, {1536, 2048, 1}};
    for (size_t i = 0; i < sizeof mm / sizeof *mm; i++) real_matmul(devs, mm[i][0], mm[i][1], mm[i][2]);
    real_xent(devs);
    real_moe(devs);
    real_attention(devs);
    real_gelu_gate(devs);
    real_lora(devs);
    float *w = rand_vec((size_t)2560 * 10240); /* E4B's down_proj, quantized as loading does */
    nf4_quantize_at(&devs[1], 2560, 10240, KN_BF16, w);
    free(w);
    for (int v = 0; v < REAL_DEVS; v++) dev_close(&devs[v]);
}

/* Every entry of the table is filled but the optional ones (alloc_mapped,
 * seal, scratch_bytes, graph_begin and graph_end). */
static void test_table_complete(const Dev *d) {
    typedef void (*Fn)(void);
    Fn fns[sizeof(KnOps) / sizeof(Fn)];
    memcpy(fns, d->be.ops, sizeof fns);
    KnOps probe;
    memset(&probe, 0, sizeof probe);
    probe.alloc_mapped = (GfStatus (*)(const KnCtx *, KnBuffer *, size_t, KnDtype, const char *, GfError *))(uintptr_t)1;
    probe.seal = (void (*)(const KnCtx *, const KnBuffer *))(uintptr_t)1;
    probe.scratch_bytes = (size_t (*)(const KnCtx *, const KnCall *))(uintptr_t)1;
    probe.graph_begin = (int (*)(const KnCtx *, int64_t, const void *, size_t))(uintptr_t)1;
    probe.graph_end = (int (*)(const KnCtx *))(uintptr_t)1;
    Fn optional[sizeof(KnOps) / sizeof(Fn)];
    memcpy(optional, &probe, sizeof optional);
    size_t missing = 0;
    for (size_t i = 0; i < sizeof fns / sizeof *fns; i++) missing += !fns[i] && !optional[i];
    CHECK(missing == 0, "%s: %zu required entries of KnOps are empty", d->be.name, missing);
}

/* The CPU kinds' matmul and matmul_dx in their AVX2 build (x86-64 with
 * AVX2) and their baseline build (GF_CPU_SIMD=baseline) give the same bits:
 * neither fuses a product into its sum, and both sum in one order. F32,
 * BF16 and NF4 weights, and NF4 from an offset (a row in: on a block
 * boundary where the columns are whole blocks); columns past the widening
 * chunks and not a multiple of 8 or 16; rows not a multiple of 4 or 8; more
 * tokens than a dx block; one to six tokens (the few-row kernel that
 * reads the weights' bytes, three rows a pass, and its neighbours'
 * remainder outputs);
 * gradients with zeros (fewer than four rows at once, one row). */
static void test_matmul_simd(Dev *d) {
    if (d->be.ctx.device == KN_DEVICE_CUDA) return;
#if defined(__x86_64__) && defined(__linux__)
    if (!__builtin_cpu_supports("avx2")) {
        printf("%s: no AVX2 on this CPU, the builds' comparison skipped\n", d->be.name);
        return;
    }
    const char *widest = __builtin_cpu_supports("avx512f") ? "avx512" : "avx2 (no AVX-512 on this CPU)";
    const int shapes[][3] = {{7, 4100, 5},  {13, 37, 9},  {9, 1030, 300}, {64, 520, 130}, {1, 8, 1},    {8, 1000, 6},
                             {19, 4100, 1}, {21, 4160, 1}, {13, 4160, 2}, {11, 1037, 3},  {17, 128, 4}, {26, 8256, 3},
                             {19, 2056, 5}, {16, 4160, 6}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1], n = shapes[s][2];
        size_t nw = (size_t)rows * cols;
        float *wf = rand_vec(nw), *x = rand_vec((size_t)n * cols), *g = rand_vec((size_t)n * rows);
        float *dx0 = rand_vec((size_t)n * cols);
        for (int i = 0; i < n * rows; i += 3) g[i] = 0.0f;
        for (int i = 0; i < n * rows; i++)
            if (i / rows % 5 == 1 && i % rows % 4) g[i] = 0.0f; /* one row of four left */
        uint16_t *wb = malloc(nw * 2);
        for (size_t i = 0; i < nw; i++) wb[i] = kn_f32_to_bf16(wf[i]);
        KnNf4 q, qd;
        CHECK(kn_nf4_quantize(&q, (KnMatrix){wf, KN_F32, rows, cols, 0, 0}, &(GfError){0}) == GF_OK, "quantize");
        nf4_on_device(d, &q, &qd);
        float *dwf = dev_put(d, wf, F(nw)), *dxv = dev_put(d, x, F(n * cols)), *dg = dev_put(d, g, F(n * rows));
        uint16_t *dwb = dev_put(d, wb, nw * 2);
        for (int kind = 0; kind < 4; kind++) {
            KnMatrix w = kind == 0 ? (KnMatrix){dwf, KN_F32, rows, cols, 0, 0}
                       : kind == 1 ? (KnMatrix){dwb, KN_BF16, rows, cols, 0, 0}
                       : kind == 2 ? kn_nf4_matrix(&qd, 0, rows, cols) : kn_nf4_matrix(&qd, cols, rows - 1, cols);
            int wr = (int)w.rows;
            if (wr == 0) continue;
            /* the widest build the CPU has, then at most AVX2, then the plain one */
            const char *simd[3] = {NULL, "avx2", "baseline"};
            float *y[3], *gx[3];
            for (int b = 0; b < 3; b++) {
                if (simd[b]) setenv("GF_CPU_SIMD", simd[b], 1);
                float *dy = dev_poisoned(d, F(n * wr)), *ddx = dev_put(d, dx0, F(n * cols));
                d->be.ops->matmul(&d->be.ctx, dy, dxv, w, n);
                d->be.ops->matmul_dx(&d->be.ctx, ddx, dg, w, n);
                y[b] = malloc(F(n * wr));
                gx[b] = malloc(F(n * cols));
                dev_get(d, y[b], dy, F(n * wr));
                dev_get(d, gx[b], ddx, F(n * cols));
                unsetenv("GF_CPU_SIMD");
            }
            const char *names[4] = {"f32", "bf16", "nf4", "nf4 from row 1"};
            for (int b = 1; b < 3; b++) {
                CHECK(memcmp(y[0], y[b], F(n * wr)) == 0, "%s: matmul %s [%d, %d] x %d: %s and %s builds agree",
                      d->be.name, names[kind], wr, cols, n, widest, simd[b]);
                CHECK(memcmp(gx[0], gx[b], F(n * cols)) == 0, "%s: matmul_dx %s [%d, %d] x %d: %s and %s builds agree",
                      d->be.name, names[kind], wr, cols, n, widest, simd[b]);
            }
            for (int b = 0; b < 3; b++) { free(y[b]); free(gx[b]); }
        }
        kn_nf4_free(&q);
        free(wf); free(x); free(g); free(dx0); free(wb);
        dev_reset(d);
    }
#else
    printf("%s: one build of the CPU matmul here, nothing to compare\n", d->be.name);
#endif
}

/* The dot products attention (both ways) and the LoRA terms take from the
 * widest build the CPU runs (cpu_dots) against the AVX2 and plain builds:
 * the same bits. Head dims 13 and 260 (tails and whole vectors), a causal
 * mask, ranks 6 and 16. */
typedef struct {
    float *out, *dq, *dk, *dv, *t, *y;
} DotsOut;

static void dots_run(Dev *d, int dim, int rank, const float *const *h, DotsOut *o) {
    enum { NQ = 9, NH = 4, NKV = 2, NIN = 70, NOUT = 37 };
    const KnOps *ops = d->be.ops;
    const KnCtx *c = &d->be.ctx;
    size_t nq = (size_t)NQ * NH * dim, nk = (size_t)NQ * NKV * dim;
    uint8_t valid[NQ];
    memset(valid, 1, sizeof valid);
    uint8_t *dvalid = dev_put(d, valid, sizeof valid);
    KnMask mask = {dvalid, NULL, 0};
    float *q = dev_put(d, h[0], F(nq)), *k = dev_put(d, h[1], F(nk)), *v = dev_put(d, h[2], F(nk));
    float *go = dev_put(d, h[3], F(nq)), *out = dev_poisoned(d, F(nq)), *dq = dev_poisoned(d, F(nq));
    float *dk = dev_poisoned(d, F(nk)), *dv = dev_poisoned(d, F(nk));
    ops->attention(c, out, q, k, v, NQ, 0, NQ, NH, NKV, dim, 0.3f, &mask);
    ops->attention_dx(c, dq, dk, dv, q, k, v, go, NQ, 0, NQ, NH, NKV, dim, 0.3f, &mask);
    float *A = dev_put(d, h[4], F(rank * NIN)), *B = dev_put(d, h[5], F(NOUT * rank));
    float *x = dev_put(d, h[6], F(NQ * NIN)), *t = dev_poisoned(d, F(NQ * rank)), *y = dev_put(d, h[7], F(NQ * NOUT));
    KnLoraSeg seg = {0, NQ, A, B, NULL, NULL, rank, 0.5f, 0.0f, 0};
    ops->lora_shrink(c, t, rank, x, &seg, 1, NIN, NULL);
    ops->lora_expand(c, y, t, rank, &seg, 1, NOUT);
    *o = (DotsOut){malloc(F(nq)), malloc(F(nq)), malloc(F(nk)), malloc(F(nk)), malloc(F(NQ * rank)), malloc(F(NQ * NOUT))};
    dev_get(d, o->out, out, F(nq));
    dev_get(d, o->dq, dq, F(nq));
    dev_get(d, o->dk, dk, F(nk));
    dev_get(d, o->dv, dv, F(nk));
    dev_get(d, o->t, t, F(NQ * rank));
    dev_get(d, o->y, y, F(NQ * NOUT));
    dev_reset(d);
}

static void test_dots_simd(Dev *d) {
    if (d->be.ctx.device == KN_DEVICE_CUDA) return;
    const char *simd[3] = {NULL, "avx2", "baseline"};
    const int shapes[2][2] = {{13, 6}, {260, 16}};
    for (int s = 0; s < 2; s++) {
        int dim = shapes[s][0], rank = shapes[s][1];
        size_t sizes[8] = {(size_t)9 * 4 * dim, (size_t)9 * 2 * dim, (size_t)9 * 2 * dim, (size_t)9 * 4 * dim,
                           (size_t)rank * 70, (size_t)37 * rank, 9 * 70, 9 * 37};
        float *h[8];
        for (int i = 0; i < 8; i++) h[i] = rand_vec(sizes[i]);
        DotsOut o[3];
        for (int b = 0; b < 3; b++) {
            if (simd[b]) setenv("GF_CPU_SIMD", simd[b], 1);
            dots_run(d, dim, rank, (const float *const *)h, &o[b]);
            unsetenv("GF_CPU_SIMD");
        }
        for (int b = 1; b < 3; b++) {
            int same = !memcmp(o[0].out, o[b].out, F(sizes[0])) && !memcmp(o[0].dq, o[b].dq, F(sizes[0])) &&
                       !memcmp(o[0].dk, o[b].dk, F(sizes[1])) && !memcmp(o[0].dv, o[b].dv, F(sizes[1]));
            CHECK(same, "%s: attention and attention_dx, head dim %d: the widest build's dot products and %s's agree",
                  d->be.name, dim, simd[b]);
            same = !memcmp(o[0].t, o[b].t, F((size_t)9 * rank)) && !memcmp(o[0].y, o[b].y, F(sizes[7]));
            CHECK(same, "%s: lora_shrink and lora_expand, rank %d: the widest build's dot products and %s's agree",
                  d->be.name, rank, simd[b]);
        }
        for (int b = 0; b < 3; b++) {
            free(o[b].out); free(o[b].dq); free(o[b].dk); free(o[b].dv); free(o[b].t); free(o[b].y);
        }
        for (int i = 0; i < 8; i++) free(h[i]);
    }
}

int main(void) {
    test_conversions();
    test_guarded_faults();
    test_precision();
    test_scratch_bytes();
    test_matmul_bf16();
    test_matmul_exact();
    test_gemv();
    test_moe_grouped_bf16();
    test_real_shapes();
    test_attention_two_contexts();
    const KnDeviceKind kinds[] = {KN_DEVICE_CPU, KN_DEVICE_GUARDED, KN_DEVICE_CUDA};
    for (size_t b = 0; b < sizeof kinds / sizeof *kinds; b++) test_graphs(kinds[b]);
    for (size_t b = 0; b < sizeof kinds / sizeof *kinds; b++)
        for (int threads = 1; threads <= 3; threads += 2) {
            Dev d;
            if (!dev_open(&d, kinds[b], threads)) {
                printf("backend %d: not available here, skipped\n", (int)kinds[b]);
                break;
            }
            printf("backend %s, %d thread(s)\n", d.be.name, threads);
            test_table_complete(&d);
            test_mapped_table(&d);
            test_matmul(&d);
            test_matmul_split(&d);
            test_matmul_simd(&d);
            test_dots_simd(&d);
            test_transfers(&d);
            test_rmsnorm_gelu_softcap(&d);
            test_rmsnorm_add(&d);
            test_rmsnorm_rope(&d);
            test_rmsnorm_rows(&d);
            test_attention(&d);
            test_attention_shapes(&d);
            test_attention_batch(&d);
            test_attention_rows_long(&d);
            test_matmul_rmsnorm_gelu_dx(&d);
            test_gelu_gate(&d);
            test_attention_dx(&d);
            test_attention_dx_shapes(&d);
            test_rope(&d);
            test_elementwise(&d);
            test_bf16_round(&d);
            test_rope_rows(&d);
            test_kv_store_embed_rows(&d);
            test_lora(&d);
            test_lora_serving(&d);
            test_lora_training_rows(&d);
            test_lora_shared_grads(&d);
            test_lora_threads(&d);
            test_elementwise_threads(&d);
            test_tanh(&d);
            test_lora_rows(&d);
            test_moe(&d);
            test_moe_grouped(&d);
            test_rows_and_loss(&d);
            test_vision_ops(&d);
            test_optim_ops(&d);
            test_sample(&d);
            test_sample_vocab(&d);
            test_nf4_quantize(&d);
            dev_close(&d);
        }
    return check_done("test_ops");
}
