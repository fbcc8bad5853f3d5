/* cuda_train.cu - the CUDA backend's loss, optimizer and sampling ops: the
 * softcapped cross-entropy (one block per row; log-sum-exp in double, as
 * the CPU), AdamW, the squared norm (one block, double), and the sampler.
 *
 * The sampler follows cpu_sample.c's rule without sorting: candidates are
 * ordered by (probability descending, id ascending), a total order, encoded
 * as one 64-bit key per token; the top_k boundary, the nucleus and the
 * drawn token are each the smallest key whose prefix (count or mass) passes
 * a threshold, found by a SPLIT-ary search of the key space: each pass over
 * the row tests SPLIT - 1 keys at once (16 passes for 64 bits, where a
 * bisection took 64), with block reductions.
 * Masses are summed in double, but not in sorted order, so a draw that
 * lands within rounding of a boundary may pick its neighbour: the
 * distribution is the CPU's, the bits are not. */
#include <math.h>

#include "cuda_impl.h"

#define THREADS 256
#define ROW_THREADS 1024
#define SAMPLE_THREADS 512 /* the sampler's blocks: registers for SPLIT - 1 sums per thread */
#define SPLIT 16

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

/* One block: each thread sums a stride in double, then the block in warp
 * order (the same result on every run). */
static __global__ void k_sq_norm(double *out, const float *x, size_t n) {
    __shared__ double sh[32];
    double ss = 0.0;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)x[i] * x[i];
    ss = block_sum(ss, sh);
    if (threadIdx.x == 0) *out = ss;
}

void cuda_sq_norm(const KnCtx *ctx, double *out, const float *x, size_t n) {
    CudaCtx *c = cuda_ctx(ctx);
    k_sq_norm<<<1, ROW_THREADS, 0, c->stream>>>(out, x, n);
    CUDA_LAUNCHED(c, "sq_norm");
}

/* ---- sampling ---------------------------------------------------------------------------- */

#define CUTOFF 40.0f
#define NO_KEY 0xFFFFFFFFFFFFFFFFull
#define KEY_MAX 0xFFFFFFFEFFFFFFFFull /* no candidate's key is larger (its probability is > 0) */

typedef struct {
    const float *l;
    int64_t V;
    float top, inv_t;
} Row;

/* The key of token id, NO_KEY when it is no candidate; its probability in *c. */
static __device__ __forceinline__ uint64_t key_of(const Row &r, int64_t id, float *c) {
    float z = (r.l[id] - r.top) * r.inv_t;
    if (!(z > -CUTOFF)) return NO_KEY;
    *c = expf(z);
    return ((uint64_t)(0xFFFFFFFFu - __float_as_uint(*c)) << 32) | (uint64_t)id;
}

/* The count and mass of the candidates whose key is <= x. */
static __device__ void prefix(const Row &r, uint64_t x, long long *count, double *mass, long long *shc, double *shm) {
    long long n = 0;
    double m = 0.0;
    for (int64_t id = threadIdx.x; id < r.V; id += blockDim.x) {
        float c = 0.0f;
        uint64_t k = key_of(r, id, &c);
        if (k <= x) {
            n++;
            m += c;
        }
    }
    *count = block_sum(n, shc);
    *mass = block_sum(m, shm);
}

enum { BY_COUNT_GE, BY_MASS_GE, BY_MASS_GT };

static __device__ __forceinline__ int passes(int how, double t, long long n, double m) {
    return how == BY_COUNT_GE ? (double)n >= t : how == BY_MASS_GE ? m >= t : m > t;
}

/* Whether the prefix of each of the SPLIT - 1 keys xs passes, in one pass
 * over the row: each key's count and mass are the sums prefix() gives it
 * (the same elements per thread in the same order, the same reduction), so
 * the search finds what a bisection would. */
static __device__ void prefixes_pass(const Row &r, const uint64_t *xs, int how, double t, int *ok, long long *shc,
                                     double *shm) {
    int n[SPLIT - 1];
    double m[SPLIT - 1];
#pragma unroll
    for (int j = 0; j < SPLIT - 1; j++) {
        n[j] = 0;
        m[j] = 0.0;
    }
    for (int64_t id = threadIdx.x; id < r.V; id += blockDim.x) {
        float c = 0.0f;
        uint64_t k = key_of(r, id, &c);
#pragma unroll
        for (int j = 0; j < SPLIT - 1; j++)
            if (k <= xs[j]) {
                n[j]++;
                m[j] += c;
            }
    }
#pragma unroll
    for (int j = 0; j < SPLIT - 1; j++) {
        long long cn = block_sum((long long)n[j], shc);
        double cm = block_sum(m[j], shm);
        ok[j] = passes(how, t, cn, cm);
    }
}

/* The smallest key x <= hi whose prefix passes (count >= t, mass >= t or
 * mass > t); hi when even its prefix does not. The prefix grows with x, so
 * each pass keeps the part of [lo, hi] between the last key that fails and
 * the first that passes. */
static __device__ uint64_t smallest(const Row &r, int how, double t, uint64_t hi, long long *shc, double *shm) {
    long long n;
    double m;
    prefix(r, hi, &n, &m, shc, shm);
    if (!passes(how, t, n, m)) return hi;
    uint64_t lo = 0; /* the answer is in [lo, hi] */
    while (lo < hi) {
        uint64_t span = hi - lo, q = span / SPLIT, rem = span % SPLIT, xs[SPLIT - 1];
        int ok[SPLIT - 1];
#pragma unroll
        for (int j = 0; j < SPLIT - 1; j++) xs[j] = lo + q * (j + 1) + rem * (j + 1) / SPLIT; /* in [lo, hi) */
        prefixes_pass(r, xs, how, t, ok, shc, shm);
        uint64_t new_lo = xs[SPLIT - 2] + 1, new_hi = hi;
        for (int j = SPLIT - 2; j >= 0; j--)
            if (ok[j]) {
                new_hi = xs[j];
                new_lo = j > 0 ? xs[j - 1] + 1 : lo;
            }
        lo = new_lo < lo ? lo : new_lo;
        hi = new_hi;
    }
    return lo;
}

/* The first maximum of the row. */
static __device__ int64_t argmax_row(const float *l, int64_t V, float *shv, long long *shi) {
    float bv = -INFINITY;
    long long bi = -1;
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x)
        if (bi < 0 || l[i] > bv) {
            bv = l[i];
            bi = i;
        }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        shv[warp] = bv;
        shi[warp] = bi;
    }
    __syncthreads();
    bv = shv[0];
    bi = shi[0];
    for (int w = 1; w < nw; w++)
        if (shi[w] >= 0 && (bi < 0 || shv[w] > bv || (shv[w] == bv && shi[w] < bi))) {
            bv = shv[w];
            bi = shi[w];
        }
    return bi < 0 ? 0 : bi;
}

static __global__ void __launch_bounds__(SAMPLE_THREADS) k_sample(int32_t *ids, const float *logits, KnSampleRow *rows,
                                                                    int64_t V) {
    __shared__ float shv[32];
    __shared__ long long shc[32];
    __shared__ double shm[32];
    KnSampleRow *sr = &rows[blockIdx.x];
    const float *l = logits + blockIdx.x * V;
    int64_t best = argmax_row(l, V, shv, shc);
    float temp = sr->temperature, top_p = sr->top_p;
    int top_k = sr->top_k;
    if (temp <= 0.0f || top_k == 1) {
        if (threadIdx.x == 0) ids[blockIdx.x] = (int32_t)best;
        return;
    }
    Row r = {l, V, l[best], 1.0f / temp};
    long long n;
    double total;
    uint64_t last = KEY_MAX; /* the last candidate kept */
    prefix(r, last, &n, &total, shc, shm);
    if (top_k > 0 && n > top_k) {
        last = smallest(r, BY_COUNT_GE, (double)top_k, last, shc, shm);
        prefix(r, last, &n, &total, shc, shm);
    }
    if (top_p < 1.0f) {
        double t = (double)top_p * total;
        last = smallest(r, t > 0 ? BY_MASS_GE : BY_COUNT_GE, t > 0 ? t : 1.0, last, shc, shm);
        prefix(r, last, &n, &total, shc, shm);
    }
    uint64_t state = sr->rng + 0x9E3779B97F4A7C15ull;
    double u = (double)(dev_mix64(state) >> 11) * (1.0 / 9007199254740992.0) * total;
    uint64_t pick = smallest(r, BY_MASS_GT, u, last, shc, shm);
    __syncthreads(); /* every thread has read the row's state */
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = (int32_t)(pick & 0xFFFFFFFFu);
        sr->rng = state;
    }
}

void cuda_sample(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                 void *scratch) {
    (void)scratch; /* keys are recomputed from the logits instead of staged */
    if (n <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_sample<<<(unsigned)n, SAMPLE_THREADS, 0, c->stream>>>(ids, logits, rows, V);
    CUDA_LAUNCHED(c, "sample");
}
