/* cuda_train.cu - the CUDA backend's loss and optimizer ops: the
 * softcapped cross-entropy (one block per row; log-sum-exp in double, as
 * the CPU), AdamW and the squared norm (double, in a fixed order). */
#include <math.h>

#include "cuda_impl.h"

#define THREADS 256
#define ROW_THREADS 1024
#define NORM_BLOCKS ((int)(CUDA_NORM_SCRATCH_BYTES / sizeof(double)))

/* ---- cross-entropy ------------------------------------------------------------------ */

static __global__ void k_xent_softcap(double *loss, float *z, const int32_t *targets, int64_t V, float cap, float scale,
                                      int grad) {
    __shared__ float shf[32];
    __shared__ double shd[32];
    float *zr = z + blockIdx.x * V;
    float mx = -INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        if (cap > 0) zr[v] = cap * tanhf(zr[v] / cap);
        mx = fmaxf(mx, zr[v]);
    }
    mx = block_max(mx, shf);
    double sum = 0.0;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) sum += exp((double)(zr[v] - mx));
    sum = block_sum(sum, shd);
    double lse = (double)mx + log(sum);
    int32_t target = targets[blockIdx.x];
    float zt = zr[target];
    __syncthreads(); /* every thread has read z[target] before any gradient overwrites it */
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - (double)zt;
    if (!grad) return;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        float g = (float)exp((double)zr[v] - lse) - (v == target ? 1.0f : 0.0f);
        if (cap > 0) g *= 1.0f - (zr[v] / cap) * (zr[v] / cap); /* d cap tanh(l / cap) / dl */
        zr[v] = g * scale;
    }
}

void cuda_xent_softcap(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                       float cap, float scale, int grad) {
    if (rows <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_xent_softcap<<<(unsigned)rows, ROW_THREADS, 0, c->stream>>>(loss, z, targets, V, cap, scale, grad);
    CUDA_LAUNCHED(c, "xent_softcap");
}

/* ---- optimizer ------------------------------------------------------------------------ */

static __global__ void k_adamw(float *p, const float *g, float *m, float *v, size_t n, KnAdamW h) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i] * h.decay;
        float mi = m[i] + (g[i] - m[i]) * (1.0f - h.beta1); /* torch: m.lerp_(g, 1 - beta1) */
        float vi = v[i] * h.beta2 + (1.0f - h.beta2) * g[i] * g[i];
        float denom = sqrtf(vi) / h.bc2_sqrt + h.eps;
        p[i] = pi - h.step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

void cuda_adamw(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h) {
    if (!n) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_adamw<<<cuda_blocks(n, THREADS), THREADS, 0, c->stream>>>(p, g, m, v, n, *h);
    CUDA_LAUNCHED(c, "adamw");
}

/* Two launches, summing in the same order on every run: block b of
 * NORM_BLOCKS sums its contiguous share of x (each thread a stride, then
 * the block in warp order) into part[b] in the context's scratch, then one
 * block sums the parts in the same way. One block over the whole slab read
 * a 31B adapter's 1.85 GB of gradients through one SM. */
static __global__ void k_sq_norm_part(double *part, const float *x, size_t n) {
    __shared__ double sh[32];
    size_t per = (n + gridDim.x - 1) / gridDim.x, lo = (size_t)blockIdx.x * per;
    size_t hi = lo + per < n ? lo + per : n;
    double ss = 0.0;
    for (size_t i = lo + threadIdx.x; i < hi; i += blockDim.x) ss += (double)x[i] * x[i];
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = ss;
}

static __global__ void k_sq_norm_sum(double *out, const double *part, int parts) {
    __shared__ double sh[32];
    double ss = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) ss += part[i];
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) *out = ss;
}

void cuda_sq_norm(const KnCtx *ctx, double *out, const float *x, size_t n) {
    CudaCtx *c = cuda_ctx(ctx);
    double *part = (double *)cuda_scratch(c, CUDA_NORM_SCRATCH_BYTES, "sq_norm");
    if (!part) return;
    k_sq_norm_part<<<NORM_BLOCKS, THREADS, 0, c->stream>>>(part, x, n);
    CUDA_LAUNCHED(c, "sq_norm");
    k_sq_norm_sum<<<1, NORM_BLOCKS, 0, c->stream>>>(out, part, NORM_BLOCKS);
    CUDA_LAUNCHED(c, "sq_norm");
}
