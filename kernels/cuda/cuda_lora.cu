/* cuda_lora.cu - the grouped LoRA ops (ops.h KnLoraSeg), forward and
 * backward, one launch per segment (each adapter at its own rank, never
 * padded). Dropout factors are hashed per element exactly as on the CPU,
 * so no mask is stored. Sums over rows run in row order in one thread, so
 * the weight gradients do not depend on scheduling. */
#include "cuda_impl.h"

#define THREADS 256
#define WARPS (THREADS / 32)

typedef struct {
    int64_t row0, n_rows;
    const float *A, *B;
    float *dA, *dB;
    int rank;
    float scale;
    int dropout;              /* 0: none */
    uint32_t cut;             /* dropout * 2^32: a factor is 0 below it */
    float keep;               /* 1 / (1 - dropout) */
    uint64_t seed;
} Seg;

static Seg seg_of(const KnLoraSeg *s) {
    Seg g;
    g.row0 = s->row0;
    g.n_rows = s->n_rows;
    g.A = s->A;
    g.B = s->B;
    g.dA = s->dA;
    g.dB = s->dB;
    g.rank = s->rank;
    g.scale = s->scale;
    g.dropout = s->dropout > 0;
    g.cut = (uint32_t)((double)s->dropout * 4294967296.0);
    g.keep = g.dropout ? 1.0f / (1.0f - s->dropout) : 1.0f;
    g.seed = s->dropout_seed;
    return g;
}

/* The dropout factor of element j of the segment's row i (ops.h). */
static __device__ __forceinline__ float drop(const Seg &s, int64_t i, int64_t in, int64_t j) {
    if (!s.dropout) return 1.0f;
    return (uint32_t)(dev_mix64(s.seed + (uint64_t)i * (uint64_t)in + (uint64_t)j) >> 32) < s.cut ? 0.0f : s.keep;
}

/* t[r, k] = scale * sum_j d(x)[r, j] A[k, j]: one warp per (row, k). */
static __global__ void k_shrink(float *t, int64_t ld_t, const float *x, Seg s, int64_t in) {
    int lane = threadIdx.x & 31, k = blockIdx.y * WARPS + (threadIdx.x >> 5);
    int64_t i = blockIdx.x, r = s.row0 + i;
    if (k >= s.rank) return;
    const float *xr = x + r * in, *a = s.A + (int64_t)k * in;
    float acc = 0.0f;
    for (int64_t j = lane; j < in; j += 32) acc += xr[j] * drop(s, i, in, j) * a[j];
    acc = warp_sum(acc);
    if (lane == 0) t[r * ld_t + k] = acc * s.scale;
}

void cuda_lora_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                      int64_t in, float *dropout_buf) {
    (void)dropout_buf;
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || segs[q].rank <= 0) continue;
        dim3 grid((unsigned)segs[q].n_rows, (unsigned)((segs[q].rank + WARPS - 1) / WARPS));
        k_shrink<<<grid, THREADS, 0, c->stream>>>(t, ld_t, x, seg_of(&segs[q]), in);
        CUDA_LAUNCHED(c, "lora_shrink");
    }
}

/* y[r, o] += sum_k t[r, k] B[o, k] */
static __global__ void k_expand(float *y, const float *t, int64_t ld_t, Seg s, int64_t out) {
    size_t n = (size_t)(s.n_rows * out);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t r = s.row0 + (int64_t)e / out, o = (int64_t)e % out;
        const float *tr = t + r * ld_t, *b = s.B + o * s.rank;
        float acc = 0.0f;
        for (int k = 0; k < s.rank; k++) acc += tr[k] * b[k];
        y[r * out + o] += acc;
    }
}

void cuda_lora_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                      int64_t out) {
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || out <= 0) continue;
        k_expand<<<cuda_blocks((size_t)(segs[q].n_rows * out), THREADS), THREADS, 0, c->stream>>>(y, t, ld_t,
                                                                                              seg_of(&segs[q]), out);
        CUDA_LAUNCHED(c, "lora_expand");
    }
}

/* ---- backward ------------------------------------------------------------------------ */

/* gt[r, k] = sum_o dy[r, o] B[o, k]: one warp per (row, k). */
static __global__ void k_expand_gt(float *gt, const float *dy, int64_t ld_t, Seg s, int64_t out) {
    int lane = threadIdx.x & 31, k = blockIdx.y * WARPS + (threadIdx.x >> 5);
    int64_t r = s.row0 + blockIdx.x;
    if (k >= s.rank) return;
    float acc = 0.0f;
    for (int64_t o = lane; o < out; o += 32) acc += dy[r * out + o] * s.B[o * s.rank + k];
    acc = warp_sum(acc);
    if (lane == 0) gt[r * ld_t + k] = acc;
}

/* dB[o, k] += sum_r dy[r, o] t[r, k], the rows in order */
static __global__ void k_expand_dB(const float *dy, const float *t, int64_t ld_t, Seg s, int64_t out) {
    size_t n = (size_t)(out * s.rank);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t o = (int64_t)e / s.rank, k = (int64_t)e % s.rank;
        float acc = 0.0f;
        for (int64_t r = s.row0; r < s.row0 + s.n_rows; r++) acc += dy[r * out + o] * t[r * ld_t + k];
        s.dB[e] += acc;
    }
}

void cuda_lora_expand_dx(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                         const KnLoraSeg *segs, int n_segs, int64_t out) {
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || segs[q].rank <= 0) continue;
        Seg s = seg_of(&segs[q]);
        dim3 grid((unsigned)s.n_rows, (unsigned)((s.rank + WARPS - 1) / WARPS));
        k_expand_gt<<<grid, THREADS, 0, c->stream>>>(gt, dy, ld_t, s, out);
        CUDA_LAUNCHED(c, "lora_expand_dx");
        if (out <= 0) continue;
        k_expand_dB<<<cuda_blocks((size_t)(out * s.rank), THREADS), THREADS, 0, c->stream>>>(dy, t, ld_t, s, out);
        CUDA_LAUNCHED(c, "lora_expand_dx");
    }
}

/* dA[k, j] += sum_r scale gt[r, k] d(x)[r, j], the rows in order */
static __global__ void k_shrink_dA(const float *gt, int64_t ld_t, const float *x, Seg s, int64_t in) {
    size_t n = (size_t)(s.rank * in);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t k = (int64_t)e / in, j = (int64_t)e % in;
        float acc = 0.0f;
        for (int64_t i = 0; i < s.n_rows; i++) {
            int64_t r = s.row0 + i;
            acc += gt[r * ld_t + k] * s.scale * (x[r * in + j] * drop(s, i, in, j));
        }
        s.dA[e] += acc;
    }
}

/* dx[r, j] += sum_k scale gt[r, k] A[k, j] f[r, j] */
static __global__ void k_shrink_dx(float *dx, const float *gt, int64_t ld_t, Seg s, int64_t in) {
    size_t n = (size_t)(s.n_rows * in);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i = (int64_t)e / in, j = (int64_t)e % in, r = s.row0 + i;
        float acc = 0.0f;
        for (int k = 0; k < s.rank; k++) acc += gt[r * ld_t + k] * s.scale * s.A[(int64_t)k * in + j];
        dx[r * in + j] += acc * drop(s, i, in, j);
    }
}

void cuda_lora_shrink_dx(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                         const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    (void)dropout_buf;
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || segs[q].rank <= 0 || in <= 0) continue;
        Seg s = seg_of(&segs[q]);
        k_shrink_dA<<<cuda_blocks((size_t)(s.rank * in), THREADS), THREADS, 0, c->stream>>>(gt, ld_t, x, s, in);
        CUDA_LAUNCHED(c, "lora_shrink_dx");
        if (!dx) continue;
        k_shrink_dx<<<cuda_blocks((size_t)(s.n_rows * in), THREADS), THREADS, 0, c->stream>>>(dx, gt, ld_t, s, in);
        CUDA_LAUNCHED(c, "lora_shrink_dx");
    }
}
