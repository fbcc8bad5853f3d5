/* cuda_ops.cu - the CUDA backend's dense ops: matmul and its input gradient
 * in the FP32 precision (matmul: a shared-memory tiled kernel that widens
 * F32, BF16, F16 and NF4 tiles as it loads them and sums each output in
 * one fixed order, so a row's result never depends on the rows beside it,
 * as in the CPU backend; matmul_dx: cuBLAS SGEMM for float32 weights, the
 * tiled kernel for the rest), RMSNorm and its
 * gradient (sums of squares in double, as the CPU), activations, and the
 * element-wise, row and RoPE ops. */
#include <stdio.h>

#include "cuda_impl.h"

#define THREADS 256
#define TILE 16

/* ---- matmul ------------------------------------------------------------------ */

/* y[i, o] = sum_c x[i, c] W[o, c]: a TILE x TILE block of (rows of x,
 * features), the reduction in tiles of TILE columns. */
static __global__ void k_matmul(float *y, const float *x, DevW w, int64_t n) {
    __shared__ float xs[TILE][TILE + 1], ws[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int64_t i = (int64_t)blockIdx.y * TILE + ty, o = (int64_t)blockIdx.x * TILE + tx;
    int64_t wo = (int64_t)blockIdx.x * TILE + ty; /* the weight row this thread loads */
    float acc = 0.0f;
    for (int64_t c0 = 0; c0 < w.cols; c0 += TILE) {
        int64_t c = c0 + tx;
        xs[ty][tx] = i < n && c < w.cols ? x[i * w.cols + c] : 0.0f;
        ws[ty][tx] = wo < w.rows && c < w.cols ? w_at(w, wo, c) : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; k++) acc += xs[ty][k] * ws[tx][k];
        __syncthreads();
    }
    if (i < n && o < w.rows) y[i * w.rows + o] = acc;
}

/* dx[i, c] += sum_o dy[i, o] W[o, c] */
static __global__ void k_matmul_dx(float *dx, const float *dy, DevW w, int64_t n) {
    __shared__ float gs[TILE][TILE + 1], ws[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int64_t i = (int64_t)blockIdx.y * TILE + ty, c = (int64_t)blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int64_t o0 = 0; o0 < w.rows; o0 += TILE) {
        gs[ty][tx] = i < n && o0 + tx < w.rows ? dy[i * w.rows + o0 + tx] : 0.0f;
        ws[ty][tx] = o0 + ty < w.rows && c < w.cols ? w_at(w, o0 + ty, c) : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; k++) acc += gs[ty][k] * ws[k][tx];
        __syncthreads();
    }
    if (i < n && c < w.cols) dx[i * w.cols + c] += acc;
}

static int dims_fit(KnMatrix w, int64_t n) { return w.rows < INT32_MAX && w.cols < INT32_MAX && n < INT32_MAX; }
static int blas_fits(KnMatrix w, int64_t n) { return w.dtype == KN_F32 && dims_fit(w, n); }

void cuda_matmul(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n) {
    if (n <= 0 || w.rows <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (c->bf16 && !w.exact && dims_fit(w, n)) {
        cuda_matmul_bf16(c, y, x, w, n);
        return;
    }
    /* the parity precision: batch-invariant rather than cuBLAS, whose
     * kernel (and so its sums' order) changes with the row count */
    dim3 grid((unsigned)((w.rows + TILE - 1) / TILE), (unsigned)((n + TILE - 1) / TILE)), block(TILE, TILE);
    k_matmul<<<grid, block, 0, c->stream>>>(y, x, dev_w(w), n);
    CUDA_LAUNCHED(c, "matmul");
}

void cuda_matmul_dx(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n) {
    if (n <= 0 || w.cols <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (c->bf16 && !w.exact && dims_fit(w, n)) {
        cuda_matmul_dx_bf16(c, dx, dy, w, n);
        return;
    }
    if (blas_fits(w, n) && !w.exact) {
        /* column-major: dx^T [cols, n] += W' [cols, rows] dy^T [rows, n] */
        const float one = 1.0f;
        cuda_blas_note(c, cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)w.cols, (int)n, (int)w.rows, &one,
                                 (const float *)w.data, (int)w.cols, dy, (int)w.rows, &one, dx, (int)w.cols),
                  "matmul_dx");
        return;
    }
    dim3 grid((unsigned)((w.cols + TILE - 1) / TILE), (unsigned)((n + TILE - 1) / TILE)), block(TILE, TILE);
    k_matmul_dx<<<grid, block, 0, c->stream>>>(dx, dy, dev_w(w), n);
    CUDA_LAUNCHED(c, "matmul_dx");
}

/* ---- RMSNorm ------------------------------------------------------------------ */

/* 1 / rms of a row of dim elements whose squares sum to ss. */
static __device__ __forceinline__ float inv_rms(double ss, int64_t dim, float eps) {
    return 1.0f / sqrtf((float)(ss / (double)dim) + eps);
}

/* An element x of the normed row: x inv, times wv when there is a weight
 * w, each product rounded. */
static __device__ __forceinline__ float normed_of(float x, float inv, const float *w, float wv) {
    return w ? __fmul_rn(__fmul_rn(x, inv), wv) : __fmul_rn(x, inv);
}

/* rmsnorm_add's output from the normed t: (rv + t) s when there is a
 * residual r (rv its element), else t. */
static __device__ __forceinline__ float plus_residual(float t, const float *r, float rv, float s) {
    return r ? __fmul_rn(__fadd_rn(rv, t), s) : t;
}

/* 1 / rms of the block's row xr[dim] (every thread gets it): the squares
 * summed in double, then the block in warp order. */
static __device__ float row_inv(const float *xr, int64_t dim, float eps, double *sh) {
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += (double)xr[i] * xr[i];
    return inv_rms(block_sum(ss, sh), dim, eps);
}

/* Element i of the normed row: xr[i] inv (w[i]), each product rounded. */
static __device__ __forceinline__ float normed(const float *xr, float inv, const float *w, int64_t i) {
    return normed_of(xr[i], inv, w, w ? w[i] : 0.0f);
}

/* One block per row; with r, r's row is added to the normed row, then
 * scaled by s. Each product and sum is rounded on its own (__fmul_rn,
 * __fadd_rn), so that nothing fuses: rmsnorm_add gives the bits of
 * rmsnorm, add, then scale. */
static __global__ void k_rmsnorm(float *y, const float *r, const float *x, const float *w, int64_t dim, float eps,
                                 float s) {
    __shared__ double sh[32];
    const float *xr = x + blockIdx.x * dim, *rr = r ? r + blockIdx.x * dim : NULL;
    float *yr = y + blockIdx.x * dim;
    float inv = row_inv(xr, dim, eps, sh);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = plus_residual(normed(xr, inv, w, i), rr, rr ? rr[i] : 0.0f, s);
}

/* k_rmsnorm for a decode step's few rows: the same sums in the same order
 * (so the same bits), but each thread's elements of the row, of w and of r
 * loaded together into registers first, so that a row costs a couple of
 * memory round trips rather than two per element a thread walks (the
 * H200's profile: 10 us a call at E4B's 2,560). Reading r ahead is safe
 * when y is r or x: a thread writes only its own elements, after every
 * thread has read x (block_sum synchronizes). dim <= NORM_REGS * THREADS. */
#define NORM_REGS 24      /* a thread's elements: rows up to 6,144 (31B's 5,376) */
#define NORM_HELD_ROWS 64 /* more rows fill the device without it */
static __global__ void __launch_bounds__(THREADS) k_rmsnorm_held(float *y, const float *r, const float *x,
                                                                 const float *w, int64_t dim, float eps, float s) {
    __shared__ double sh[32];
    const float *xr = x + blockIdx.x * dim, *rr = r ? r + blockIdx.x * dim : NULL;
    float *yr = y + blockIdx.x * dim;
    float v[NORM_REGS], wv[NORM_REGS], rv[NORM_REGS];
#pragma unroll
    for (int k = 0; k < NORM_REGS; k++) {
        int64_t i = threadIdx.x + (int64_t)k * THREADS;
        v[k] = i < dim ? xr[i] : 0.0f;
        wv[k] = i < dim && w ? w[i] : 0.0f;
        rv[k] = i < dim && rr ? rr[i] : 0.0f;
    }
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < NORM_REGS; k++)
        if (threadIdx.x + (int64_t)k * THREADS < dim) ss += (double)v[k] * v[k]; /* row_inv's order */
    float inv = inv_rms(block_sum(ss, sh), dim, eps);
#pragma unroll
    for (int k = 0; k < NORM_REGS; k++) {
        int64_t i = threadIdx.x + (int64_t)k * THREADS;
        if (i >= dim) break;
        yr[i] = plus_residual(normed_of(v[k], inv, w, wv[k]), rr, rv[k], s);
    }
}

static void launch_rmsnorm(CudaCtx *c, float *y, const float *r, const float *x, const float *w, int64_t n,
                           int64_t dim, float eps, float s, const char *what) {
    if (n <= NORM_HELD_ROWS && dim <= (int64_t)NORM_REGS * THREADS)
        k_rmsnorm_held<<<(unsigned)n, THREADS, 0, c->stream>>>(y, r, x, w, dim, eps, s);
    else
        k_rmsnorm<<<(unsigned)n, THREADS, 0, c->stream>>>(y, r, x, w, dim, eps, s);
    CUDA_LAUNCHED(c, what);
}

void cuda_rmsnorm(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps) {
    if (n <= 0) return;
    launch_rmsnorm(cuda_ctx(ctx), y, NULL, x, w, n, dim, eps, 1.0f, "rmsnorm");
}

void cuda_rmsnorm_add(const KnCtx *ctx, float *y, const float *r, const float *x, const float *w, int64_t n,
                      int64_t dim, float eps, float s) {
    if (n <= 0) return;
    launch_rmsnorm(cuda_ctx(ctx), y, r, x, w, n, dim, eps, s, "rmsnorm_add");
}

/* dx += r g - r^3 x (g . x) / dim, g = w dy, r = (mean x^2 + eps)^-1/2 */
static __global__ void k_rmsnorm_dx(float *dx, const float *x, const float *w, const float *dy, int64_t dim, float eps) {
    __shared__ double sh[32];
    const float *xr = x + blockIdx.x * dim, *dyr = dy + blockIdx.x * dim;
    float *dxr = dx + blockIdx.x * dim;
    double ss = 0.0, gx = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        ss += (double)xr[i] * xr[i];
        gx += (double)(w ? w[i] * dyr[i] : dyr[i]) * xr[i];
    }
    ss = block_sum(ss, sh);
    gx = block_sum(gx, sh);
    float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
    float k = (float)((double)inv * inv * inv * gx / (double)dim);
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dxr[i] += inv * (w ? w[i] * dyr[i] : dyr[i]) - k * xr[i];
}

void cuda_rmsnorm_dx(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                     int64_t dim, float eps) {
    if (n <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_rmsnorm_dx<<<(unsigned)n, THREADS, 0, c->stream>>>(dx, x, w, dy, dim, eps);
    CUDA_LAUNCHED(c, "rmsnorm_dx");
}

/* ---- element-wise --------------------------------------------------------------- */

#define GRID_STRIDE(i, n) for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)
#define LAUNCH(c, name, n, ...)                                                   \
    do {                                                                          \
        if ((n) == 0) return;                                                     \
        k_##name<<<cuda_blocks((n), THREADS), THREADS, 0, (c)->stream>>>(__VA_ARGS__); \
        CUDA_LAUNCHED((c), #name);                                                \
    } while (0)

static __global__ void k_gelu_tanh(float *x, size_t n) {
    GRID_STRIDE(i, n) x[i] = gelu(x[i]);
}
void cuda_gelu_tanh(const KnCtx *ctx, float *x, size_t n) { LAUNCH(cuda_ctx(ctx), gelu_tanh, n, x, n); }

static __global__ void k_gelu_gate(float *y, const float *g, const float *u, size_t n, int64_t cols, int64_t ld_u) {
    GRID_STRIDE(e, n) {
        int64_t r = (int64_t)e / cols, col = (int64_t)e % cols;
        y[e] = gelu(g[e]) * u[r * ld_u + col];
    }
}
void cuda_gelu_gate(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                    int64_t ld_u) {
    size_t n = rows > 0 && cols > 0 ? (size_t)(rows * cols) : 0;
    LAUNCH(cuda_ctx(ctx), gelu_gate, n, y, g, u, n, cols, ld_u);
}

static __global__ void k_gelu_tanh_dx(float *dx, const float *x, const float *dy, size_t n) {
    GRID_STRIDE(i, n) dx[i] = dy[i] * gelu_slope(x[i]);
}
void cuda_gelu_tanh_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n) {
    LAUNCH(cuda_ctx(ctx), gelu_tanh_dx, n, dx, x, dy, n);
}

/* dg may alias g and du may alias u: each thread reads its element's g, u
 * and dy before it writes either */
static __global__ void k_gelu_gate_dx(float *dg, float *du, const float *dy, const float *g, const float *u, size_t n) {
    GRID_STRIDE(i, n) {
        float gi = g[i], ui = u[i], d = dy[i];
        du[i] = d * gelu(gi);
        dg[i] = d * ui * gelu_slope(gi);
    }
}
void cuda_gelu_gate_dx(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                       size_t n) {
    LAUNCH(cuda_ctx(ctx), gelu_gate_dx, n, dg, du, dy, g, u, n);
}

static __global__ void k_softcap(float *x, size_t n, float cap) {
    GRID_STRIDE(i, n) x[i] = cap * tanhf(x[i] / cap);
}
void cuda_softcap(const KnCtx *ctx, float *x, size_t n, float cap) { LAUNCH(cuda_ctx(ctx), softcap, n, x, n, cap); }

static __global__ void k_add(float *y, const float *a, const float *b, size_t n) {
    GRID_STRIDE(i, n) y[i] = a[i] + b[i];
}
void cuda_add(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n) {
    LAUNCH(cuda_ctx(ctx), add, n, y, a, b, n);
}

static __global__ void k_mul(float *y, const float *a, const float *b, size_t n, int64_t cols, int64_t ld_b) {
    GRID_STRIDE(e, n) {
        int64_t r = (int64_t)e / cols, col = (int64_t)e % cols;
        y[e] = a[e] * b[r * ld_b + col];
    }
}
void cuda_mul(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b) {
    size_t n = rows > 0 && cols > 0 ? (size_t)(rows * cols) : 0;
    LAUNCH(cuda_ctx(ctx), mul, n, y, a, b, n, cols, ld_b);
}

static __global__ void k_mul_acc(float *y, const float *a, const float *b, size_t n, int64_t cols, int64_t ld_y) {
    GRID_STRIDE(e, n) {
        int64_t r = (int64_t)e / cols, col = (int64_t)e % cols;
        y[r * ld_y + col] += a[e] * b[e];
    }
}
void cuda_mul_acc(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                  int64_t ld_y) {
    size_t n = rows > 0 && cols > 0 ? (size_t)(rows * cols) : 0;
    LAUNCH(cuda_ctx(ctx), mul_acc, n, y, a, b, n, cols, ld_y);
}

static __global__ void k_scale(float *x, size_t n, float s) {
    GRID_STRIDE(i, n) x[i] *= s;
}
void cuda_scale(const KnCtx *ctx, float *x, size_t n, float s) { LAUNCH(cuda_ctx(ctx), scale, n, x, n, s); }

/* kn_f32_to_bf16's integer rounding (convert.c), so that every bit, a
 * NaN's included, is the host's */
static __device__ __forceinline__ uint16_t bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

static __global__ void k_round_bf16(uint16_t *kept, float *x, size_t n) {
    GRID_STRIDE(i, n) {
        uint16_t h = bf16_bits(x[i]);
        kept[i] = h;
        x[i] = __uint_as_float((uint32_t)h << 16);
    }
}
void cuda_round_bf16(const KnCtx *ctx, uint16_t *kept, float *x, size_t n) {
    LAUNCH(cuda_ctx(ctx), round_bf16, n, kept, x, n);
}

static __global__ void k_widen_bf16(float *y, const uint16_t *x, size_t n) {
    GRID_STRIDE(i, n) y[i] = __uint_as_float((uint32_t)x[i] << 16);
}
void cuda_widen_bf16(const KnCtx *ctx, float *y, const uint16_t *x, size_t n) {
    LAUNCH(cuda_ctx(ctx), widen_bf16, n, y, x, n);
}

static __global__ void k_clamp(float *y, const float *x, size_t n, float lo, float hi) {
    GRID_STRIDE(i, n) y[i] = x[i] < lo ? lo : x[i] > hi ? hi : x[i];
}
void cuda_clamp(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi) {
    LAUNCH(cuda_ctx(ctx), clamp, n, y, x, n, lo, hi);
}

static __global__ void k_clamp_dx(float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                                  int accumulate) {
    GRID_STRIDE(i, n) {
        float g = x[i] >= lo && x[i] <= hi ? dy[i] : 0.0f;
        dx[i] = accumulate ? dx[i] + g : g;
    }
}
void cuda_clamp_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                   int accumulate) {
    LAUNCH(cuda_ctx(ctx), clamp_dx, n, dx, x, dy, n, lo, hi, accumulate);
}

static __global__ void k_scale_shift(float *y, const float *x, size_t n, float shift, float s) {
    GRID_STRIDE(i, n) y[i] = (x[i] + shift) * s;
}
void cuda_scale_shift(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s) {
    LAUNCH(cuda_ctx(ctx), scale_shift, n, y, x, n, shift, s);
}

static __global__ void k_standardize(float *x, size_t n, int64_t cols, const float *bias, const float *scale) {
    GRID_STRIDE(e, n) {
        int64_t col = (int64_t)e % cols;
        x[e] = (x[e] - bias[col]) * scale[col];
    }
}
void cuda_standardize(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale) {
    size_t n = rows > 0 && cols > 0 ? (size_t)(rows * cols) : 0;
    LAUNCH(cuda_ctx(ctx), standardize, n, x, n, cols, bias, scale);
}

/* ---- rows and embeddings ------------------------------------------------------------ */

static __global__ void k_embed_rows(float *out, DevW t, const int32_t *ids, size_t n, float scale) {
    GRID_STRIDE(e, n) {
        int64_t i = (int64_t)e / t.cols, col = (int64_t)e % t.cols;
        out[e] = w_at(t, ids[i], col) * scale;
    }
}
void cuda_embed_rows(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale) {
    size_t total = n > 0 ? (size_t)(n * table.cols) : 0;
    LAUNCH(cuda_ctx(ctx), embed_rows, total, out, dev_w(table), ids, total, scale);
}

static __global__ void k_embed_rows_add(float *out, DevW t, const int32_t *ids, size_t n) {
    GRID_STRIDE(e, n) {
        int64_t i = (int64_t)e / t.cols, col = (int64_t)e % t.cols;
        if (ids[i] >= 0) out[e] += w_at(t, ids[i], col);
    }
}
void cuda_embed_rows_add(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row) {
    (void)row; /* the CPU's staging row; each element is widened in place here */
    size_t total = n > 0 ? (size_t)(n * table.cols) : 0;
    LAUNCH(cuda_ctx(ctx), embed_rows_add, total, out, dev_w(table), ids, total);
}

static __global__ void k_rows_gather(float *out, const float *src, const int32_t *idx, size_t n, int64_t dim) {
    GRID_STRIDE(e, n) {
        int64_t i = (int64_t)e / dim, j = (int64_t)e % dim;
        if (idx[i] >= 0) out[e] = src[(int64_t)idx[i] * dim + j];
    }
}
void cuda_rows_gather(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    size_t total = n > 0 && dim > 0 ? (size_t)(n * dim) : 0;
    LAUNCH(cuda_ctx(ctx), rows_gather, total, out, src, idx, total, dim);
}

static __global__ void k_rows_scatter(float *out, const float *src, const int32_t *idx, size_t n, int64_t dim) {
    GRID_STRIDE(e, n) {
        int64_t i = (int64_t)e / dim, j = (int64_t)e % dim;
        if (idx[i] >= 0) out[(int64_t)idx[i] * dim + j] = src[e];
    }
}
void cuda_rows_scatter(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    size_t total = n > 0 && dim > 0 ? (size_t)(n * dim) : 0;
    LAUNCH(cuda_ctx(ctx), rows_scatter, total, out, src, idx, total, dim);
}

static __global__ void k_rows_scatter_bf16(uint16_t *out, const float *src, const int32_t *idx, size_t n, int64_t dim) {
    GRID_STRIDE(e, n) {
        int64_t i = (int64_t)e / dim, j = (int64_t)e % dim;
        if (idx[i] >= 0) out[(int64_t)idx[i] * dim + j] = bf16_bits(src[e]);
    }
}
void cuda_rows_scatter_bf16(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                            int64_t dim) {
    size_t total = n > 0 && dim > 0 ? (size_t)(n * dim) : 0;
    LAUNCH(cuda_ctx(ctx), rows_scatter_bf16, total, out, src, idx, total, dim);
}

/* One thread per column, the rows in order: rows that share a target add up
 * in index order, as on the CPU. */
static __global__ void k_rows_sum(float *out, const float *src, const int32_t *idx, int64_t n, size_t dim) {
    GRID_STRIDE(j, dim)
        for (int64_t i = 0; i < n; i++)
            if (idx[i] >= 0) out[(int64_t)idx[i] * (int64_t)dim + (int64_t)j] += src[i * (int64_t)dim + (int64_t)j];
}
void cuda_rows_sum(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    if (n <= 0) return;
    size_t d = dim > 0 ? (size_t)dim : 0;
    LAUNCH(cuda_ctx(ctx), rows_sum, d, out, src, idx, n, d);
}

/* ---- RoPE, KV store ------------------------------------------------------------------ */

/* The pair (a, b) of a head rotated by theta into (*ya, *yb), every
 * product and sum rounded on its own (no fused multiply-add), so that
 * rope_rows and rmsnorm_rope give the same bits (and the CPU's). */
static __device__ __forceinline__ void rope_pair(float a, float b, float theta, float *ya, float *yb) {
    float cs = cosf(theta), sn = sinf(theta);
    *ya = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
    *yb = __fadd_rn(__fmul_rn(b, cs), __fmul_rn(a, sn));
}

static __global__ void k_rope_rows(float *x, size_t n, int n_heads, int half, int64_t ld_head, const float *inv_freq,
                                   const int32_t *pos, int64_t pos_stride) {
    GRID_STRIDE(e, n) {
        int i = (int)(e % (size_t)half);
        int64_t rh = (int64_t)(e / (size_t)half), r = rh / n_heads;
        if (inv_freq[i] == 0.0f) continue; /* cos 1, sin 0 */
        float *xh = x + rh * ld_head;
        rope_pair(xh[i], xh[i + half], __fmul_rn((float)pos[r * pos_stride], inv_freq[i]), &xh[i], &xh[i + half]);
    }
}

/* One block per head of a row: its RMSNorm (k_rmsnorm's sums), then its
 * rotation at the row's position. Each thread reads the pairs it writes. */
static __global__ void k_rmsnorm_rope(float *y, const float *x, const float *w, int n_heads, int dim, float eps,
                                      const float *inv_freq, const int32_t *pos) {
    __shared__ double sh[32];
    const float *xh = x + (int64_t)blockIdx.x * dim;
    float *yh = y + (int64_t)blockIdx.x * dim;
    float inv = row_inv(xh, dim, eps, sh);
    int half = dim / 2;
    float p = (float)pos[blockIdx.x / n_heads];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float a = normed(xh, inv, w, i), b = normed(xh, inv, w, i + half);
        if (inv_freq[i] == 0.0f) { /* cos 1, sin 0 */
            yh[i] = a;
            yh[i + half] = b;
        } else {
            rope_pair(a, b, __fmul_rn(p, inv_freq[i]), &yh[i], &yh[i + half]);
        }
    }
    if ((dim & 1) && threadIdx.x == 0) yh[dim - 1] = normed(xh, inv, w, dim - 1); /* an odd head's last: not rotated */
}
void cuda_rmsnorm_rope(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n_rows, int n_heads, int dim,
                       float eps, const float *inv_freq, const int32_t *pos) {
    if (n_rows <= 0 || n_heads <= 0 || dim <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_rmsnorm_rope<<<(unsigned)(n_rows * n_heads), THREADS, 0, c->stream>>>(y, x, w, n_heads, dim, eps, inv_freq, pos);
    CUDA_LAUNCHED(c, "rmsnorm_rope");
}

void cuda_rope_rows(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                    const float *inv_freq, const int32_t *pos, int64_t pos_stride) {
    int half = dim / 2;
    size_t n = n_rows > 0 && half > 0 ? (size_t)n_rows * (size_t)n_heads * (size_t)half : 0;
    LAUNCH(cuda_ctx(ctx), rope_rows, n, x, n, n_heads, half, ld_head, inv_freq, pos, pos_stride);
}

