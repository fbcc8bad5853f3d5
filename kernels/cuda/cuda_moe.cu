/* cuda_moe.cu - mixture-of-experts routing and the experts' MLPs, forward
 * and backward. Routing runs one thread per token (E and K are small).
 * The forward computes every (token, expert) pair at once into the buffers
 * the contract keeps (gu, mm, yk), the pairs grouped by expert so that an
 * expert's weights are read once per 32 of its pairs, not once per pair
 * (on the tensor cores, bf16 operands, in the BF16 precision).
 * The backward takes the tokens a chunk at a time (as many as CHUNK_BYTES
 * of the context's scratch holds the gradients of their pairs' gate_up
 * outputs and inputs), grouped the same way, each token's input gradient
 * summed over its experts in order (no atomics). The experts are rows of the stacked matrices:
 * expert e's row r is row e * rows + r. */
#include <cuda_bf16.h>
#include <math.h>
#include <mma.h>

#include "cuda_impl.h"

#define THREADS 256
#define WARPS (THREADS / 32)
#define CHUNK_BYTES ((size_t)64 << 20) /* the backward's scratch */

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

/* The pairs of a call grouped by expert, in the context's scratch
 * (cuda_moe_scratch): count[E], cursor[E], offset[E + 1] (where expert e's
 * pairs start in order), order[pairs] (pair ids, expert by expert; within
 * an expert in any order: each pair's outputs are computed alone). */
static __global__ void k_expert_count(int32_t *count, const int32_t *idx, int64_t pairs, int E) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x)
        if ((unsigned)idx[p] < (unsigned)E) atomicAdd(&count[idx[p]], 1);
}

static __global__ void k_expert_offsets(int32_t *offset, int32_t *cursor, const int32_t *count, int E) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int32_t at = 0;
    for (int e = 0; e < E; e++) {
        offset[e] = cursor[e] = at;
        at += count[e];
    }
    offset[E] = at;
}

static __global__ void k_expert_order(int32_t *order, int32_t *cursor, const int32_t *idx, int64_t pairs, int E) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs; p += (int64_t)gridDim.x * blockDim.x)
        if ((unsigned)idx[p] < (unsigned)E) order[atomicAdd(&cursor[idx[p]], 1)] = (int32_t)p;
}

#define EXP_O 64  /* outputs of a block's tile */
#define EXP_P 32  /* pairs per pass (EXP_P / (THREADS / EXP_O) per thread) */
#define EXP_K 32  /* inputs per shared-memory tile */
#define EXP_Q (EXP_P / (THREADS / EXP_O))

/* One grouped product over the pairs of every expert e (order[offset[e] ..
 * offset[e + 1])): out[p * out_stride + o] = sum over k < n_in, in order,
 * of x[(p / x_div) * x_stride + k] W_e(o, k), o < n_out. W_e(o, k) is
 * row e * n_out + o, column k of w (a forward: y = x W^T), or with
 * TRANS row e * n_in + k, column o (an input gradient: dx = dy W). */
typedef struct {
    float *out;
    int64_t out_stride;
    const float *x;
    int64_t x_stride;
    int x_div;
    const int32_t *order, *offset;
    DevW w;
    int64_t n_out, n_in;
} ExpertMm;

/* Input k of the expert's pair p (0 past its pairs or inputs). */
static __device__ __forceinline__ float x_elem(const ExpertMm &a, int32_t first, int32_t count, int32_t p, int64_t k) {
    return p < count && k < a.n_in ? a.x[(int64_t)(a.order[first + p] / a.x_div) * a.x_stride + k] : 0.0f;
}

/* W_e(o, k) widened to float (0 past the outputs or inputs). */
template <bool TRANS>
static __device__ __forceinline__ float w_elem(const ExpertMm &a, int e, int64_t o, int64_t k, const float *code) {
    if (o >= a.n_out || k >= a.n_in) return 0.0f;
    return TRANS ? w_at_code(a.w, e * a.n_in + k, o, code) : w_at_code(a.w, e * a.n_out + o, k, code);
}

/* Element i of a weight tile load: its output and input in the tile, so
 * that consecutive threads read consecutive columns of w. */
#define W_OI(i) (TRANS ? (i) % EXP_O : (i) / EXP_K)
#define W_KK(i) (TRANS ? (i) / EXP_O : (i) % EXP_K)

/* Block (e, tile): a tile of expert e's weights is widened into shared
 * memory once per EXP_P of its pairs (not once per pair), the pairs'
 * inputs beside it. */
template <bool TRANS>
static __global__ void __launch_bounds__(THREADS) k_expert_mm(ExpertMm a) {
    CUDA_NF4_SHARED(code);
    __shared__ float xs[EXP_P][EXP_K];
    __shared__ float ws[EXP_O][EXP_K + 1]; /* +1: 32 outputs of one input in 32 banks */
    int e = blockIdx.x, tid = threadIdx.x, ol = tid % EXP_O, pg = tid / EXP_O;
    int32_t first = a.offset[e], count = a.offset[e + 1] - first;
    if (count <= 0) return; /* the whole block */
    int64_t o0 = (int64_t)blockIdx.y * EXP_O;
    for (int32_t p0 = 0; p0 < count; p0 += EXP_P) {
        float acc[EXP_Q];
        for (int q = 0; q < EXP_Q; q++) acc[q] = 0.0f;
        for (int64_t k0 = 0; k0 < a.n_in; k0 += EXP_K) {
            for (int i = tid; i < EXP_P * EXP_K; i += THREADS)
                xs[i / EXP_K][i % EXP_K] = x_elem(a, first, count, p0 + i / EXP_K, k0 + i % EXP_K);
            for (int i = tid; i < EXP_O * EXP_K; i += THREADS) {
                int oi = W_OI(i), kk = W_KK(i);
                ws[oi][kk] = w_elem<TRANS>(a, e, o0 + oi, k0 + kk, code);
            }
            __syncthreads();
            for (int kk = 0; kk < EXP_K; kk++) {
                float wv = ws[ol][kk];
                for (int q = 0; q < EXP_Q; q++) acc[q] += xs[pg * EXP_Q + q][kk] * wv;
            }
            __syncthreads();
        }
        if (o0 + ol < a.n_out)
            for (int q = 0; q < EXP_Q; q++) {
                int32_t pi = p0 + pg * EXP_Q + q;
                if (pi < count) a.out[(int64_t)a.order[first + pi] * a.out_stride + o0 + ol] = acc[q];
            }
    }
}

/* k_expert_mm on the tensor cores, for the BF16 precision: the tiles are
 * rounded to bf16 in shared memory (operands as the bf16 matmuls round
 * them), the 32 x 64 product of a pass is 2 x 4 warp fragments of 16 x 16
 * summed in fp32 (wmma), staged in shared memory for the scattered rows. */
#define EXP_LD (EXP_K + 8) /* bf16 row stride: a multiple of 8, fragments 32-byte aligned */
#define EXP_CLD (EXP_O + 4)

template <bool TRANS>
static __global__ void __launch_bounds__(THREADS, 2) k_expert_mm_tc(ExpertMm a) {
    using namespace nvcuda;
    CUDA_NF4_SHARED(code);
    __shared__ __align__(32) __nv_bfloat16 xs[EXP_P][EXP_LD];
    __shared__ __align__(32) __nv_bfloat16 ws[EXP_O][EXP_LD];
    __shared__ __align__(32) float cs[EXP_P][EXP_CLD];
    int e = blockIdx.x, tid = threadIdx.x, warp = tid >> 5, fr = warp / 4, fc = warp % 4;
    int32_t first = a.offset[e], count = a.offset[e + 1] - first;
    if (count <= 0) return; /* the whole block */
    int64_t o0 = (int64_t)blockIdx.y * EXP_O;
    for (int32_t p0 = 0; p0 < count; p0 += EXP_P) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
        for (int64_t k0 = 0; k0 < a.n_in; k0 += EXP_K) {
            for (int i = tid; i < EXP_P * EXP_K; i += THREADS)
                xs[i / EXP_K][i % EXP_K] = __float2bfloat16(x_elem(a, first, count, p0 + i / EXP_K, k0 + i % EXP_K));
            for (int i = tid; i < EXP_O * EXP_K; i += THREADS) {
                int oi = W_OI(i), kk = W_KK(i);
                ws[oi][kk] = __float2bfloat16(w_elem<TRANS>(a, e, o0 + oi, k0 + kk, code));
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < EXP_K; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb; /* ws[o][k]: W^T */
                wmma::load_matrix_sync(fa, &xs[fr * 16][kk], EXP_LD);
                wmma::load_matrix_sync(fb, &ws[fc * 16][kk], EXP_LD);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            __syncthreads();
        }
        wmma::store_matrix_sync(&cs[fr * 16][fc * 16], acc, EXP_CLD, wmma::mem_row_major);
        __syncthreads();
        for (int i = tid; i < EXP_P * EXP_O; i += THREADS) {
            int pi = i / EXP_O, ol = i % EXP_O;
            if (p0 + pi < count && o0 + ol < a.n_out)
                a.out[(int64_t)a.order[first + p0 + pi] * a.out_stride + o0 + ol] = cs[pi][ol];
        }
        __syncthreads();
    }
}

/* The ints of grouping `pairs` pairs over E experts (count, cursor, offset,
 * order), rounded up to 64. */
static size_t group_ints(int64_t pairs, int E) { return (size_t)((3 * (int64_t)E + 1 + pairs + 63) & ~(int64_t)63); }

/* Groups pairs idx[pairs] by expert into s (group_ints): returns order,
 * *offset set. */
static int32_t *group_pairs(CudaCtx *c, int32_t *s, const int32_t *idx, int64_t pairs, int E, int32_t **offset) {
    int32_t *count = s, *cursor = s + E, *order = s + 3 * E + 1;
    *offset = s + 2 * E;
    cuda_note(c, cudaMemsetAsync(count, 0, (size_t)E * sizeof *count, c->stream), "moe_experts");
    unsigned pb = cuda_blocks((size_t)pairs, THREADS);
    k_expert_count<<<pb, THREADS, 0, c->stream>>>(count, idx, pairs, E);
    CUDA_LAUNCHED(c, "moe_experts");
    k_expert_offsets<<<1, 1, 0, c->stream>>>(*offset, cursor, count, E);
    CUDA_LAUNCHED(c, "moe_experts");
    k_expert_order<<<pb, THREADS, 0, c->stream>>>(order, cursor, idx, pairs, E);
    CUDA_LAUNCHED(c, "moe_experts");
    return order;
}

/* One grouped product: on the tensor cores in the BF16 precision, else in
 * fp32. */
static void expert_mm(CudaCtx *c, bool trans, const ExpertMm &a, int E) {
    dim3 grid((unsigned)E, (unsigned)((a.n_out + EXP_O - 1) / EXP_O));
    if (c->bf16 && trans) k_expert_mm_tc<true><<<grid, THREADS, 0, c->stream>>>(a);
    else if (c->bf16) k_expert_mm_tc<false><<<grid, THREADS, 0, c->stream>>>(a);
    else if (trans) k_expert_mm<true><<<grid, THREADS, 0, c->stream>>>(a);
    else k_expert_mm<false><<<grid, THREADS, 0, c->stream>>>(a);
    CUDA_LAUNCHED(c, "moe_experts");
}

static __global__ void k_gelu_mul(float *mm, const float *gu, size_t n, int64_t im) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t tk = (int64_t)e / im, i = (int64_t)e % im;
        const float *g = gu + tk * 2 * im;
        mm[e] = gelu(g[i]) * g[im + i];
    }
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

size_t cuda_moe_scratch(int64_t n, int K, int E) {
    return n > 0 && K > 0 && E > 0 ? group_ints(n * K, E) * sizeof(int32_t) : 0;
}

void cuda_moe_experts(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                      float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down) {
    if (n <= 0 || K <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t H = gate_up.cols, Im = down.cols, pairs = n * K;
    int E = (int)(gate_up.rows / (2 * Im));
    int32_t *s = (int32_t *)cuda_scratch(c, cuda_moe_scratch(n, K, E), "moe_experts"), *offset;
    if (!s) return;
    int32_t *order = group_pairs(c, s, idx, pairs, E, &offset);
    expert_mm(c, false, ExpertMm{gu, 2 * Im, x, H, K, order, offset, dev_w(gate_up), 2 * Im, H}, E);
    k_gelu_mul<<<cuda_blocks((size_t)(pairs * Im), THREADS), THREADS, 0, c->stream>>>(mm, gu, (size_t)(pairs * Im), Im);
    CUDA_LAUNCHED(c, "moe_experts");
    expert_mm(c, false, ExpertMm{yk, H, mm, Im, 1, order, offset, dev_w(down), H, Im}, E);
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

/* The gate_up gradient of each pair p < n from its down input gradient
 * dmm / coef, in dgu's second half [p, Im + i] (as k_expert_mm left it):
 * dgu[p] = (gelu'(g) dmm u, dmm gelu(g)), g, u = gu[p]'s halves. */
static __global__ void k_dgu(float *dgu, const float *gu, const float *coef, size_t n, int64_t im) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t p = (int64_t)e / im, i = (int64_t)e % im;
        const float *g = gu + p * 2 * im;
        float *d = dgu + p * 2 * im, dmm = d[im + i] * coef[p];
        d[im + i] = dmm * gelu(g[i]);
        d[i] = gelu_slope(g[i]) * (dmm * g[im + i]);
    }
}

/* dx[t, h] = sum over t's experts k, in order, of dxk[t K + k, h]. */
static __global__ void k_sum_pairs(float *dx, const float *dxk, size_t n, int K, int64_t H) {
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t t = (int64_t)e / H, h = (int64_t)e % H;
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc += dxk[(t * K + k) * H + h];
        dx[e] = acc;
    }
}

/* Tokens per chunk of the backward: their pairs' gradients (2 Im of
 * gate_up, H of the input) in CHUNK_BYTES. */
static int64_t dx_chunk_tokens(int64_t n, int K, int64_t H, int64_t Im) {
    int64_t per = (int64_t)K * (2 * Im + H) * (int64_t)sizeof(float), t = (int64_t)(CHUNK_BYTES / (size_t)per);
    return t < 1 ? 1 : t > n ? n : t;
}

size_t cuda_moe_dx_scratch(int64_t n, int K, int E, int64_t H, int64_t Im) {
    if (n <= 0 || K <= 0 || E <= 0 || H <= 0 || Im <= 0) return 0;
    int64_t pairs = dx_chunk_tokens(n, K, H, Im) * K;
    return group_ints(pairs, E) * sizeof(int32_t) + (size_t)(pairs * (2 * Im + H)) * sizeof(float);
}

void cuda_moe_experts_dx(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                         const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                         KnMatrix down) {
    (void)scratch; /* the context's own, for many pairs at once */
    if (n <= 0 || K <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t H = gate_up.cols, Im = down.cols, pairs = n * K, T = dx_chunk_tokens(n, K, H, Im);
    int E = (int)(gate_up.rows / (2 * Im));
    k_dcoef<<<(unsigned)((pairs + WARPS - 1) / WARPS), THREADS, 0, c->stream>>>(dc, dy, yk, pairs, K, H);
    CUDA_LAUNCHED(c, "moe_experts_dx");
    int32_t *s = (int32_t *)cuda_scratch(c, cuda_moe_dx_scratch(n, K, E, H, Im), "moe_experts_dx"), *offset;
    if (!s) return;
    float *dgu = (float *)(s + group_ints(T * K, E)), *dxk = dgu + T * K * 2 * Im;
    DevW wd = dev_w(down), wgu = dev_w(gate_up);
    for (int64_t t0 = 0; t0 < n; t0 += T) {
        int64_t nt = n - t0 < T ? n - t0 : T, np = nt * K;
        int32_t *order = group_pairs(c, s, idx + t0 * K, np, E, &offset);
        /* dmm = dy W_down (coef applied by k_dgu), into dgu's second half */
        expert_mm(c, true, ExpertMm{dgu + Im, 2 * Im, dy + t0 * H, H, K, order, offset, wd, Im, H}, E);
        size_t elems = (size_t)(np * Im);
        k_dgu<<<cuda_blocks(elems, THREADS), THREADS, 0, c->stream>>>(dgu, gu + t0 * K * 2 * Im, coef + t0 * K, elems, Im);
        CUDA_LAUNCHED(c, "moe_experts_dx");
        /* each pair's input gradient dgu W_gate_up, then each token's sum over its experts */
        expert_mm(c, true, ExpertMm{dxk, H, dgu, 2 * Im, 1, order, offset, wgu, H, 2 * Im}, E);
        elems = (size_t)(nt * H);
        k_sum_pairs<<<cuda_blocks(elems, THREADS), THREADS, 0, c->stream>>>(dx + t0 * H, dxk, elems, K, H);
        CUDA_LAUNCHED(c, "moe_experts_dx");
    }
}
