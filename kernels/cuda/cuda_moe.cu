/* cuda_moe.cu - mixture-of-experts routing and the experts' MLPs, forward
 * and backward. Routing runs one thread per token (E and K are small).
 * The forward computes every (token, expert) pair at once into the buffers
 * the contract keeps (gu, mm, yk); the backward takes the tokens a chunk at
 * a time (as many as CHUNK_BYTES of the context's scratch holds the
 * gradients of their pairs' gate_up outputs), two launches per chunk, each
 * token's input gradient summed over its experts in order by one warp per
 * feature (no atomics). The experts are rows of the stacked matrices:
 * expert e's row r is row e * rows + r. */
#include <math.h>

#include "cuda_impl.h"

#define THREADS 256
#define WARPS (THREADS / 32)
#define CHUNK_BYTES ((size_t)64 << 20) /* the backward's scratch */
#define GELU_K 0.7978845608028654f

static __device__ __forceinline__ float gelu(float v) {
    return 0.5f * v * (1.0f + tanhf(GELU_K * (v + 0.044715f * v * v * v)));
}

static __device__ __forceinline__ float gelu_d(float v) {
    float th = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
}

/* ---- routing ------------------------------------------------------------------------- */

static __global__ void k_route(int32_t *idx, float *w, float *coef, float *p, const float *expert_scale, int64_t n,
                               int E, int K) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= n) return;
    float *pt = p + t * E, mx = pt[0], sum = 0.0f, wsum = 0.0f;
    int32_t *it = idx + t * K;
    for (int e = 1; e < E; e++) mx = pt[e] > mx ? pt[e] : mx;
    for (int e = 0; e < E; e++) sum += (pt[e] = expf(pt[e] - mx));
    for (int e = 0; e < E; e++) pt[e] /= sum;
    for (int k = 0; k < K; k++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= it[j] == e;
            if (!taken && (best < 0 || pt[e] > pt[best])) best = e;
        }
        it[k] = best;
        wsum += (w[t * K + k] = pt[best]);
    }
    for (int k = 0; k < K; k++) coef[t * K + k] = w[t * K + k] / wsum * expert_scale[it[k]];
}

void cuda_moe_route(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                    int64_t n, int E, int K) {
    if (n <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_route<<<cuda_blocks((size_t)n, 64), 64, 0, c->stream>>>(idx, w, coef, p, expert_scale, n, E, K);
    CUDA_LAUNCHED(c, "moe_route");
}

static __global__ void k_route_dx(float *dlogits, const float *dc, const int32_t *idx, const float *w, const float *p,
                                  const float *expert_scale, int64_t n, int E, int K) {
    int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (t >= n) return;
    const int32_t *it = idx + t * K;
    const float *wt = w + t * K, *pt = p + t * E;
    float *dp = dlogits + t * E, wsum = 0.0f, corr = 0.0f, pdp = 0.0f;
    for (int k = 0; k < K; k++) wsum += wt[k];
    for (int e = 0; e < E; e++) dp[e] = 0.0f;
    for (int k = 0; k < K; k++) corr += dc[t * K + k] * expert_scale[it[k]] * wt[k];
    for (int k = 0; k < K; k++) dp[it[k]] = dc[t * K + k] * expert_scale[it[k]] / wsum - corr / (wsum * wsum);
    for (int e = 0; e < E; e++) pdp += pt[e] * dp[e];
    for (int e = 0; e < E; e++) dp[e] = pt[e] * (dp[e] - pdp);
}

void cuda_moe_route_dx(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                       const float *p, const float *expert_scale, int64_t n, int E, int K) {
    if (n <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    k_route_dx<<<cuda_blocks((size_t)n, 64), 64, 0, c->stream>>>(dlogits, dc, idx, w, p, expert_scale, n, E, K);
    CUDA_LAUNCHED(c, "moe_route_dx");
}

/* ---- experts, forward ------------------------------------------------------------------ */

/* gu[tk, j] = x[t] . gate_up row (e * 2Im + j): one warp per (pair, j). */
static __global__ void k_gate_up(float *gu, const float *x, const int32_t *idx, DevW w, int K, int64_t two_im) {
    CUDA_NF4_SHARED(code);
    int lane = threadIdx.x & 31;
    int64_t tk = blockIdx.x, j = (int64_t)blockIdx.y * WARPS + (threadIdx.x >> 5);
    if (j >= two_im) return;
    const float *xt = x + (tk / K) * w.cols;
    int64_t row = (int64_t)idx[tk] * two_im + j;
    float acc = 0.0f;
    for (int64_t h = lane; h < w.cols; h += 32) acc += xt[h] * w_at_code(w, row, h, code);
    acc = warp_sum(acc);
    if (lane == 0) gu[tk * two_im + j] = acc;
}

static __global__ void k_gelu_mul(float *mm, const float *gu, size_t n, int64_t im) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t tk = (int64_t)e / im, i = (int64_t)e % im;
        const float *g = gu + tk * 2 * im;
        mm[e] = gelu(g[i]) * g[im + i];
    }
}

/* yk[tk, h] = mm[tk] . down row (e * H + h): one warp per (pair, h). */
static __global__ void k_down(float *yk, const float *mm, const int32_t *idx, DevW w, int64_t H) {
    CUDA_NF4_SHARED(code);
    int lane = threadIdx.x & 31;
    int64_t tk = blockIdx.x, h = (int64_t)blockIdx.y * WARPS + (threadIdx.x >> 5);
    if (h >= H) return;
    const float *m = mm + tk * w.cols;
    int64_t row = (int64_t)idx[tk] * H + h;
    float acc = 0.0f;
    for (int64_t i = lane; i < w.cols; i += 32) acc += m[i] * w_at_code(w, row, i, code);
    acc = warp_sum(acc);
    if (lane == 0) yk[tk * H + h] = acc;
}

/* y[t, h] = sum_k coef[tk] yk[tk, h], the experts in order */
static __global__ void k_combine(float *y, const float *yk, const float *coef, size_t n, int K, int64_t H) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t t = (int64_t)e / H, h = (int64_t)e % H;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += coef[t * K + k] * yk[(t * K + k) * H + h];
        y[e] = acc;
    }
}

void cuda_moe_experts(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                      float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down) {
    if (n <= 0 || K <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t H = gate_up.cols, Im = down.cols, pairs = n * K;
    dim3 g1((unsigned)pairs, (unsigned)((2 * Im + WARPS - 1) / WARPS));
    k_gate_up<<<g1, THREADS, 0, c->stream>>>(gu, x, idx, dev_w(gate_up), K, 2 * Im);
    CUDA_LAUNCHED(c, "moe_experts");
    k_gelu_mul<<<cuda_blocks((size_t)(pairs * Im), THREADS), THREADS, 0, c->stream>>>(mm, gu, (size_t)(pairs * Im), Im);
    CUDA_LAUNCHED(c, "moe_experts");
    dim3 g3((unsigned)pairs, (unsigned)((H + WARPS - 1) / WARPS));
    k_down<<<g3, THREADS, 0, c->stream>>>(yk, mm, idx, dev_w(down), H);
    CUDA_LAUNCHED(c, "moe_experts");
    k_combine<<<cuda_blocks((size_t)(n * H), THREADS), THREADS, 0, c->stream>>>(y, yk, coef, (size_t)(n * H), K, H);
    CUDA_LAUNCHED(c, "moe_experts");
}

/* ---- experts, backward ----------------------------------------------------------------- */

/* dc[tk] = dy[t] . yk[tk]: one warp per pair. */
static __global__ void k_dcoef(float *dc, const float *dy, const float *yk, int64_t pairs, int K, int64_t H) {
    int lane = threadIdx.x & 31;
    int64_t tk = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (tk >= pairs) return;
    const float *d = dy + (tk / K) * H, *o = yk + tk * H;
    float acc = 0.0f;
    for (int64_t h = lane; h < H; h += 32) acc += d[h] * o[h];
    acc = warp_sum(acc);
    if (lane == 0) dc[tk] = acc;
}

/* For pair tk0 + blockIdx.x: dmm[i] = coef (dy[t] . down column i of
 * expert e), then dgu = (gelu'(g) dmm u, dmm gelu(g)) into its row of
 * dgu [pairs of the chunk, 2 Im]. One warp per i. */
static __global__ void k_dgu(float *dgu, const float *dy, const float *gu, const int32_t *idx, const float *coef,
                             DevW down, int64_t tk0, int K, int64_t H) {
    CUDA_NF4_SHARED(code);
    int lane = threadIdx.x & 31;
    int64_t i = (int64_t)blockIdx.y * WARPS + (threadIdx.x >> 5), Im = down.cols, tk = tk0 + blockIdx.x;
    if (i >= Im) return;
    const float *d = dy + (tk / K) * H, *g = gu + tk * 2 * Im;
    float *out = dgu + (int64_t)blockIdx.x * 2 * Im;
    int64_t row0 = (int64_t)idx[tk] * H;
    float acc = 0.0f;
    for (int64_t h = lane; h < H; h += 32) acc += d[h] * w_at_code(down, row0 + h, i, code);
    acc = warp_sum(acc);
    if (lane == 0) {
        float dmm = acc * coef[tk];
        out[Im + i] = dmm * gelu(g[i]);
        out[i] = gelu_d(g[i]) * (dmm * g[Im + i]);
    }
}

/* dx[t, h] = sum over t's experts k, in order, of dgu[t, k] . gate_up
 * column h of expert e_k, for token t = t0 + blockIdx.x: one warp per h. */
static __global__ void k_dx(float *dx, const float *dgu, const int32_t *idx, DevW gate_up, int64_t t0, int K) {
    CUDA_NF4_SHARED(code);
    int lane = threadIdx.x & 31;
    int64_t h = (int64_t)blockIdx.y * WARPS + (threadIdx.x >> 5), H = gate_up.cols, two_im = gate_up.rows;
    if (h >= H) return;
    int64_t t = t0 + blockIdx.x;
    float sum = 0.0f;
    for (int k = 0; k < K; k++) {
        const float *g = dgu + ((int64_t)blockIdx.x * K + k) * two_im;
        int64_t row0 = (int64_t)idx[t * K + k] * two_im;
        float acc = 0.0f;
        for (int64_t j = lane; j < two_im; j += 32) acc += g[j] * w_at_code(gate_up, row0 + j, h, code);
        sum += warp_sum(acc);
    }
    if (lane == 0) dx[t * H + h] = sum;
}

/* Tokens per chunk of the backward: their pairs' 2 Im gradients in CHUNK_BYTES. */
static int64_t dx_chunk_tokens(int64_t n, int K, int64_t Im) {
    int64_t per = (int64_t)K * 2 * Im * (int64_t)sizeof(float), t = (int64_t)(CHUNK_BYTES / (size_t)per);
    return t < 1 ? 1 : t > n ? n : t;
}

size_t cuda_moe_dx_scratch(int64_t n, int K, int64_t Im) {
    return n > 0 && K > 0 && Im > 0 ? (size_t)(dx_chunk_tokens(n, K, Im) * K * 2 * Im) * sizeof(float) : 0;
}

void cuda_moe_experts_dx(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                         const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                         KnMatrix down) {
    (void)scratch; /* the context's own, for many pairs at once */
    if (n <= 0 || K <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t H = gate_up.cols, Im = down.cols, pairs = n * K, T = dx_chunk_tokens(n, K, Im);
    k_dcoef<<<(unsigned)((pairs + WARPS - 1) / WARPS), THREADS, 0, c->stream>>>(dc, dy, yk, pairs, K, H);
    CUDA_LAUNCHED(c, "moe_experts_dx");
    float *dgu = (float *)cuda_scratch(c, cuda_moe_dx_scratch(n, K, Im), "moe_experts_dx");
    if (!dgu) return;
    /* gate_up as one expert's rows, so k_dx reads its row count from the view */
    KnMatrix gu_one = gate_up;
    gu_one.rows = 2 * Im;
    DevW wd = dev_w(down), wgu = dev_w(gu_one);
    for (int64_t t0 = 0; t0 < n; t0 += T) {
        int64_t nt = n - t0 < T ? n - t0 : T;
        dim3 g1((unsigned)(nt * K), (unsigned)((Im + WARPS - 1) / WARPS)), g2((unsigned)nt, (unsigned)((H + WARPS - 1) / WARPS));
        k_dgu<<<g1, THREADS, 0, c->stream>>>(dgu, dy, gu, idx, coef, wd, t0 * K, K, H);
        CUDA_LAUNCHED(c, "moe_experts_dx");
        k_dx<<<g2, THREADS, 0, c->stream>>>(dx, dgu, idx, wgu, t0, K);
        CUDA_LAUNCHED(c, "moe_experts_dx");
    }
}
