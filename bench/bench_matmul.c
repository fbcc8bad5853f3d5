/* bench_matmul.c - one linear layer's matmul and its input gradient
 * (ops.h matmul and matmul_dx) called through a backend's table, timed and
 * printed in GFLOP/s (a benchmark, not a test): the CPU kinds' builds
 * (GF_CPU_SIMD=avx2 or baseline holds the CPU back from AVX-512 or AVX2)
 * or a GPU. Weights are BF16, NF4 (quantized on the host, then uploaded)
 * or F32, from a fixed seed, as are the inputs; each op runs once to warm
 * up, then the best of --reps runs is printed, with a hash of the outputs'
 * bits so that two builds can be compared. --copies K holds K copies of the
 * weights and runs each op over all of them in turn (the time printed is a
 * copy's), so that the weights come from memory rather than the cache, as
 * in a decode step over a model's layers; weight_gbs is the weights' bytes
 * read per second by the matmul.
 *
 * usage: bench_matmul [ROWS COLS N] [--dtype bf16|nf4|f32] [--device D]
 *                     [--threads T] [--reps R] [--copies K]
 *   default: 8192 1536 256, bf16, the CPU, all cores, 3 reps, 1 copy
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "convert.h"
#include "kernels.h"
#include "nf4.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* n values in [-1, 1) from the state s (an LCG: the same on every run) */
static void fill(float *v, int64_t n, uint64_t *s) {
    for (int64_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        v[i] = (float)((double)(*s >> 40) / 16777216.0 * 2.0 - 1.0);
    }
}

/* FNV-1a over the bits of n floats */
static uint64_t bits_hash(const float *v, int64_t n) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, v + i, sizeof u);
        h = (h ^ u) * 1099511628211ull;
    }
    return h;
}

enum { MAX_COPIES = 64 };

typedef struct {
    KnBackend *b;
    KnBuffer bufs[3 * MAX_COPIES + 3];
    int n_bufs;
} Dev;

static void *dev_put(Dev *d, const void *host, size_t bytes, GfError *err) {
    KnBuffer *buf = &d->bufs[d->n_bufs];
    if (d->b->ops->alloc(&d->b->ctx, buf, bytes, KN_U8, "bench_matmul", err) != GF_OK) return NULL;
    d->n_bufs++;
    if (host) d->b->ops->upload(&d->b->ctx, buf->data, host, bytes);
    return buf->data;
}

/* The weights as a matrix on d: wf widened or quantized as dtype asks (NF4:
 * into q on the host, then qd, whose arrays are on d and which m points at). */
static int weights_on(Dev *d, KnMatrix *m, KnNf4 *q, KnNf4 *qd, const float *wf, int64_t rows, int64_t cols,
                      const char *dtype, GfError *err) {
    size_t n = (size_t)(rows * cols);
    if (strcmp(dtype, "f32") == 0) {
        void *w = dev_put(d, wf, n * sizeof(float), err);
        *m = (KnMatrix){w, KN_F32, rows, cols, 0, 0};
        return w != NULL;
    }
    if (strcmp(dtype, "bf16") == 0) {
        uint16_t *h = malloc(n * sizeof *h);
        for (size_t i = 0; i < n; i++) h[i] = kn_f32_to_bf16(wf[i]);
        void *w = dev_put(d, h, n * sizeof *h, err);
        free(h);
        *m = (KnMatrix){w, KN_BF16, rows, cols, 0, 0};
        return w != NULL;
    }
    if (kn_nf4_quantize(q, (KnMatrix){(void *)wf, KN_F32, rows, cols, 0, 0}, err) != GF_OK) return 0;
    *qd = *q;
    qd->codes = dev_put(d, q->codes, (size_t)(q->n + 1) / 2, err);
    qd->absmax_q = qd->codes ? dev_put(d, q->absmax_q, (size_t)q->n_blocks, err) : NULL;
    qd->group_scale = qd->absmax_q ? dev_put(d, q->group_scale, (size_t)q->n_groups * sizeof(float), err) : NULL;
    *m = kn_nf4_matrix(qd, 0, rows, cols);
    return qd->group_scale != NULL;
}

int main(int argc, char **argv) {
    int64_t dims[3] = {8192, 1536, 256};
    const char *dtype = "bf16", *device = "cpu";
    int threads = 0, reps = 3, n_dims = 0, copies = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dtype") == 0 && i + 1 < argc) dtype = argv[++i];
        else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) device = argv[++i];
        else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--copies") == 0 && i + 1 < argc) copies = atoi(argv[++i]);
        else if (argv[i][0] != '-' && n_dims < 3 && atoll(argv[i]) > 0) dims[n_dims++] = atoll(argv[i]);
        else {
            fprintf(stderr, "usage: bench_matmul [ROWS COLS N] [--dtype bf16|nf4|f32] [--device D] [--threads T] "
                            "[--reps R] [--copies K]\n");
            return 2;
        }
    }
    if (copies < 1 || copies > MAX_COPIES) {
        fprintf(stderr, "bench_matmul: --copies must be 1 to %d, not %d\n", MAX_COPIES, copies);
        return 2;
    }
    if (strcmp(dtype, "bf16") && strcmp(dtype, "nf4") && strcmp(dtype, "f32")) {
        fprintf(stderr, "bench_matmul: --dtype must be bf16, nf4 or f32, not \"%s\"\n", dtype);
        return 2;
    }
    int64_t rows = dims[0], cols = dims[1], n = dims[2];
    GfError err = {0};
    KnDeviceKind kind;
    int index;
    KnBackend b;
    KnBackendOptions bo = {.n_threads = threads};
    if (kn_backend_parse(device, &kind, &index, &err) != GF_OK ||
        kn_backend_open(kind, index, &bo, &b, &err) != GF_OK) {
        fprintf(stderr, "bench_matmul: %s\n", err.message);
        return 1;
    }
    uint64_t seed = 1;
    float *wf = malloc((size_t)(rows * cols) * sizeof(float)), *x = malloc((size_t)(n * cols) * sizeof(float));
    float *y = malloc((size_t)(n * rows) * sizeof(float)), *dx = calloc((size_t)(n * cols), sizeof(float));
    fill(wf, rows * cols, &seed);
    fill(x, n * cols, &seed);
    Dev d = {&b, {{0}}, 0};
    KnMatrix m[MAX_COPIES];
    KnNf4 q[MAX_COPIES] = {{0}}, qd[MAX_COPIES] = {{0}};
    float *dx_dev = NULL, *x_dev = NULL, *y_dev = NULL;
    int ok = 1;
    for (int k = 0; k < copies && ok; k++) ok = weights_on(&d, &m[k], &q[k], &qd[k], wf, rows, cols, dtype, &err);
    ok = ok && (x_dev = dev_put(&d, x, (size_t)(n * cols) * 4, &err)) &&
         (y_dev = dev_put(&d, NULL, (size_t)(n * rows) * 4, &err)) && (dx_dev = dev_put(&d, dx, (size_t)(n * cols) * 4, &err));
    if (!ok) {
        fprintf(stderr, "bench_matmul: %s\n", err.message);
        return 1;
    }
    double best[2] = {1e30, 1e30};
    for (int r = 0; r <= reps; r++) { /* run 0 warms up */
        double t0 = now();
        for (int k = 0; k < copies; k++) b.ops->matmul(&b.ctx, y_dev, x_dev, m[k], n);
        b.ops->synchronize(&b.ctx, &err);
        double t1 = now();
        b.ops->memset(&b.ctx, dx_dev, 0, (size_t)(n * cols) * 4);
        b.ops->synchronize(&b.ctx, &err);
        double t2 = now();
        for (int k = 0; k < copies; k++) b.ops->matmul_dx(&b.ctx, dx_dev, y_dev, m[k], n);
        if (b.ops->synchronize(&b.ctx, &err) != GF_OK) {
            fprintf(stderr, "bench_matmul: %s\n", err.message);
            return 1;
        }
        double t3 = now();
        if (r > 0 && (t1 - t0) / copies < best[0]) best[0] = (t1 - t0) / copies;
        if (r > 0 && (t3 - t2) / copies < best[1]) best[1] = (t3 - t2) / copies;
    }
    /* the hashed outputs are one copy's, whatever --copies (matmul_dx adds
     * into dx) */
    b.ops->memset(&b.ctx, dx_dev, 0, (size_t)(n * cols) * 4);
    b.ops->matmul_dx(&b.ctx, dx_dev, y_dev, m[0], n);
    b.ops->download(&b.ctx, y, y_dev, (size_t)(n * rows) * 4);
    b.ops->download(&b.ctx, dx, dx_dev, (size_t)(n * cols) * 4);
    double flop = 2.0 * (double)rows * (double)cols * (double)n;
    double wbytes = m[0].dtype == KN_NF4 ? (double)(rows * cols) / 2 + (double)q[0].n_blocks + 4.0 * (double)q[0].n_groups
                                         : (double)(rows * cols) * (m[0].dtype == KN_BF16 ? 2 : 4);
    const char *simd = getenv("GF_CPU_SIMD");
    if (simd && !*simd) simd = NULL;
    printf("{\"what\":\"matmul\",\"device\":\"%s\",\"simd\":\"%s\",\"dtype\":\"%s\",\"rows\":%lld,\"cols\":%lld,"
           "\"n\":%lld,\"copies\":%d,\"matmul_s\":%.6f,\"matmul_gflops\":%.1f,\"weight_gbs\":%.1f,\"matmul_dx_s\":%.6f,"
           "\"matmul_dx_gflops\":%.1f,\"y_hash\":\"%016llx\",\"dx_hash\":\"%016llx\"}\n",
           b.name, simd ? simd : "best", dtype, (long long)rows, (long long)cols, (long long)n, copies, best[0],
           flop / best[0] / 1e9, wbytes / best[0] / 1e9, best[1], flop / best[1] / 1e9,
           (unsigned long long)bits_hash(y, n * rows), (unsigned long long)bits_hash(dx, n * cols));
    for (int i = 0; i < d.n_bufs; i++) b.ops->free(&b.ctx, &d.bufs[i]);
    kn_backend_close(&b);
    for (int k = 0; k < copies; k++)
        if (q[k].codes) kn_nf4_free(&q[k]);
    free(wf);
    free(x);
    free(y);
    free(dx);
    return 0;
}
