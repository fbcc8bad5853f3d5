/* cuda_gemm.cu - the matmuls of the BF16 precision (ops.h KnPrecision): the
 * operands rounded to bfloat16 (round to nearest even), the products summed
 * in float32 on the tensor cores (cuBLASLt, cuda_lt.cu), float32
 * in and out. BF16 weights are read as stored; F32, F16 and NF4 weights are
 * widened to bfloat16 a chunk of rows at a time into the context's scratch
 * (dequantize, then GEMM: what QLoRA does on a GPU). A decode step's few rows
 * (n <= CUDA_GEMV_MAX_ROWS) take a GEMV instead that reads each weight byte
 * once and never rounds x: a block per output feature (four for up to four
 * rows of x), its threads striding the input features, NF4 codes read four
 * bytes (eight elements, one absmax) at a time when the matrix allows.
 * Between the two (a decode batch of up to TILED_MAX_ROWS rows) F32, F16
 * and NF4 weights are widened a tile at a time in shared memory, next to
 * x's tile, for the tensor cores (wmma): each weight byte is still read
 * once, where widening whole rows would write and read them again as bf16.
 * Matrices of few outputs split the features over blocks (partial sums in
 * the scratch, added in a fixed order).
 *
 * The context's scratch (cuda_scratch) grows on the stream
 * (cudaMallocAsync); a failure to grow is the context's fault, reported by
 * synchronize naming the op. */
#include <cuda_bf16.h>
#include <mma.h>
#include <stdio.h>

#include "cuda_impl.h"

#define GEMV_THREADS 128 /* a GEMV block's threads: its features' share of the sum order */
/* bytes of widened weight rows per GEMM chunk */
#define CHUNK_BYTES ((size_t)64 << 20)

void *cuda_scratch(CudaCtx *c, size_t bytes, const char *what) {
    if (bytes <= c->scratch_bytes) return c->scratch;
    if (cuda_refused(c)) return NULL; /* a recording grows nothing (cuda_graph.cu) */
    c->scratch_gen++;
    if (c->scratch) cuda_note(c, cudaFreeAsync(c->scratch, c->stream), what);
    c->scratch = NULL;
    c->scratch_bytes = 0;
    void *p = NULL;
    cudaError_t rc = cudaMallocAsync(&p, bytes, c->stream);
    if (rc != cudaSuccess) {
        cudaGetLastError();
        char where[48];
        snprintf(where, sizeof where, "%s: %zu MB of scratch", what, bytes >> 20);
        cuda_note(c, rc, where);
        return NULL;
    }
    c->scratch = p;
    c->scratch_bytes = bytes;
    return p;
}

static __global__ void k_to_bf16(__nv_bfloat16 *out, const float *in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(in[i]);
}

/* Rows [r0, r0 + n_rows) of w, widened and rounded to bfloat16. */
static __global__ void k_w_to_bf16(__nv_bfloat16 *out, DevW w, int64_t r0, size_t n) {
    CUDA_NF4_SHARED(code);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(w_at_code(w, r0 + (int64_t)(i / (size_t)w.cols), (int64_t)(i % (size_t)w.cols), code));
}

static void to_bf16(CudaCtx *c, __nv_bfloat16 *out, const float *in, size_t n) {
    k_to_bf16<<<cuda_blocks(n, 256), 256, 0, c->stream>>>(out, in, n);
    CUDA_LAUNCHED(c, "matmul bf16: x to bf16");
}

/* Rows of w per chunk: all of a BF16 matrix (read in place), else as many
 * as CHUNK_BYTES hold. */
static int64_t chunk_rows(KnMatrix w) {
    if (w.dtype == KN_BF16) return w.rows;
    int64_t r = (int64_t)(CHUNK_BYTES / (2 * (size_t)w.cols));
    return r < 1 ? 1 : r > w.rows ? w.rows : r;
}

/* w's rows [r0, r0 + R) as bfloat16: in place for BF16, else widened into dst. */
static const __nv_bfloat16 *w_rows_bf16(CudaCtx *c, KnMatrix w, int64_t r0, int64_t R, __nv_bfloat16 *dst) {
    if (w.dtype == KN_BF16) return (const __nv_bfloat16 *)w.data + r0 * w.cols;
    size_t n = (size_t)R * (size_t)w.cols;
    k_w_to_bf16<<<cuda_blocks(n, 256), 256, 0, c->stream>>>(dst, dev_w(w), r0, n);
    CUDA_LAUNCHED(c, "matmul bf16: weights to bf16");
    return dst;
}

/* ---- the decode GEMV ---------------------------------------------------------- */

/* The eight weights of row o from feature c (a multiple of 8) as floats. */
static __device__ __forceinline__ void gemv_w8(const DevW &w, int64_t o, int64_t c, const float *code, float *v) {
    if (w.dtype == KN_NF4) {
        int64_t e = w.elem0 + o * w.cols + c, b = e / KN_NF4_BLOCK;
        float a = __fadd_rn(w.nf4_offset, __fmul_rn((float)w.absmax_q[b], w.group_scale[b / KN_NF4_GROUP]));
        uint32_t q = __ldg((const uint32_t *)(w.codes + e / 2));
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = __fmul_rn(code[(q >> (4 * k)) & 15], a);
        return;
    }
    uint4 q = __ldg((const uint4 *)((const uint16_t *)w.data + o * w.cols + c));
    uint32_t p[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(p[k] << 16);
        v[2 * k + 1] = __uint_as_float(p[k] & 0xFFFF0000u);
    }
}

/* y[i, o] = sum_c x[i, c] W[o, c] for n <= NMAX rows of x: a block of
 * GEMV_THREADS threads per R consecutive outputs, thread t taking the
 * features' granules t, t + GEMV_THREADS, ... of each (a granule: eight
 * features with vec8, NF4 or BF16 weights read eight elements at once and
 * x in two 16-byte loads, cols and the NF4 start a multiple of 8, BF16
 * rows and x 16-byte aligned; else one feature). A whole matrix of a few
 * MB is thus asked for at once, by every SM, rather than a warp's row at a
 * time (x, a few KB, comes from L1 for the block's R outputs). A thread sums its
 * granules in order, a warp its lanes by shuffles, then one thread the
 * warps in order: each output is summed in the same order whatever R, NMAX
 * and n, so a row's result never depends on the rows beside it. */
template <int R, int NMAX>
static __global__ void __launch_bounds__(GEMV_THREADS, 8) k_gemv(float *y, const float *x, DevW w, int n, int vec8) {
    CUDA_NF4_SHARED(code);
    __shared__ float part[GEMV_THREADS / 32][R][NMAX];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int64_t o0 = (int64_t)blockIdx.x * R;
    int nr = w.rows - o0 < R ? (int)(w.rows - o0) : R; /* the same in every thread */
    float acc[R][NMAX];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < NMAX; i++) acc[r][i] = 0.0f;
    if (vec8) {
        for (int64_t c = (int64_t)threadIdx.x * 8; c < w.cols; c += 8 * GEMV_THREADS) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (r >= nr) break; /* the same in every thread */
                float v[8];
                gemv_w8(w, o0 + r, c, code, v);
#pragma unroll
                for (int i = 0; i < NMAX; i++) {
                    if (i >= n) break;
                    const float4 *xr = (const float4 *)(x + i * w.cols + c); /* again for each r: from L1 */
                    float4 lo = __ldg(xr), hi = __ldg(xr + 1);
                    float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                    for (int k = 0; k < 8; k++) acc[r][i] = fmaf(xv[k], v[k], acc[r][i]);
                }
            }
        }
    } else {
        for (int64_t k = threadIdx.x; k < w.cols; k += GEMV_THREADS) {
            float v[R];
#pragma unroll
            for (int r = 0; r < R; r++) v[r] = r < nr ? w_at_code(w, o0 + r, k, code) : 0.0f;
#pragma unroll
            for (int i = 0; i < NMAX; i++) { /* bounds known: acc stays in registers */
                if (i >= n) break;
                float xi = __ldg(x + i * w.cols + k);
#pragma unroll
                for (int r = 0; r < R; r++) acc[r][i] = fmaf(xi, v[r], acc[r][i]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int i = 0; i < NMAX; i++) {
            if (i >= n) break; /* n is the same in every thread: the shuffles have the whole warp */
            float s = warp_sum(acc[r][i]);
            if (lane == 0) part[warp][r][i] = s;
        }
    __syncthreads();
    if (threadIdx.x < R * NMAX) {
        int r = threadIdx.x / NMAX, i = threadIdx.x % NMAX;
        if (r < nr && i < n) {
            float s = part[0][r][i];
            for (int k = 1; k < GEMV_THREADS / 32; k++) s += part[k][r][i];
            y[(int64_t)i * w.rows + o0 + r] = s;
        }
    }
}

/* Outputs per block of the GEMV: 4 for up to GEMV_FEW_ROWS rows of x, else 1
 * (sixteen rows' accumulators leave no registers for more). */
#define GEMV_FEW_ROWS 4

static void launch_gemv(CudaCtx *c, float *y, const float *x, KnMatrix w, int64_t n, int vec8) {
    DevW dw = dev_w(w);
    if (n <= GEMV_FEW_ROWS) {
        unsigned blocks = (unsigned)((w.rows + 3) / 4);
        k_gemv<4, GEMV_FEW_ROWS><<<blocks, GEMV_THREADS, 0, c->stream>>>(y, x, dw, (int)n, vec8);
    } else {
        k_gemv<1, CUDA_GEMV_MAX_ROWS><<<(unsigned)w.rows, GEMV_THREADS, 0, c->stream>>>(y, x, dw, (int)n, vec8);
    }
    CUDA_LAUNCHED(c, "matmul bf16: gemv");
}

/* 1 when w's NF4 codes may be read eight elements (four bytes) at a time. */
static int nf4_vec8(KnMatrix w) {
    const KnNf4 *q = (const KnNf4 *)w.data;
    return w.dtype == KN_NF4 && w.cols % 8 == 0 && w.offset % 8 == 0 && ((uintptr_t)q->codes & 3) == 0;
}

static int gemv_vec8(KnMatrix w, const float *x) {
    if (w.cols % 8 || ((uintptr_t)x & 15)) return 0;
    if (w.dtype == KN_NF4) return nf4_vec8(w);
    return w.dtype == KN_BF16 && ((uintptr_t)w.data & 15) == 0;
}

/* ---- a decode batch's few rows: weight tiles widened in shared memory -------- */

#define TILED_MAX_ROWS 64   /* rows of x: 4 fragments of 16 */
#define TILED_O 128         /* outputs per block: 16 per warp */
#define TILED_K 64          /* features per step */
#define TILED_THREADS 256
#define TILED_LD (TILED_K + 8)  /* bf16 row stride: a multiple of 8, fragments 32-byte aligned */
#define TILED_CLD (TILED_O + 4)
#define TILED_BLOCKS 256    /* blocks a split of the features aims at */

typedef struct {
    __align__(16) __nv_bfloat16 x[TILED_MAX_ROWS][TILED_LD];
    __align__(16) __nv_bfloat16 w[TILED_O][TILED_LD];
} TiledTiles;

typedef union {
    TiledTiles t;
    float c[TILED_MAX_ROWS][TILED_CLD]; /* the block's sums, staged for rows past n */
} TiledSmem;

/* a and b rounded to bf16 (as __float2bfloat16_rn), a in the low half. */
static __device__ __forceinline__ uint32_t bf16x2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *(const uint32_t *)&h;
}

/* Rows [o0, o0 + TILED_O) of w at features [k0, k0 + TILED_K), widened and
 * rounded to bf16 as the GEMM's widening rounds them; zeros past w. */
static __device__ void tiled_w(__nv_bfloat16 (*ws)[TILED_LD], const DevW &w, int64_t o0, int64_t k0, int vec8,
                               const float *code) {
    if (vec8) { /* eight elements, four bytes of codes, one absmax a thread */
        for (int g = threadIdx.x; g < TILED_O * TILED_K / 8; g += TILED_THREADS) {
            int o = g / (TILED_K / 8), kk = g % (TILED_K / 8) * 8;
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (o0 + o < w.rows && k0 + kk < w.cols) gemv_w8(w, o0 + o, k0 + kk, code, v);
            /* one 16-byte store: rows are TILED_LD * 2 = 144 bytes, kk a multiple of 8 */
            *(uint4 *)&ws[o][kk] = make_uint4(bf16x2(v[0], v[1]), bf16x2(v[2], v[3]), bf16x2(v[4], v[5]),
                                              bf16x2(v[6], v[7]));
        }
        return;
    }
    for (int i = threadIdx.x; i < TILED_O * TILED_K; i += TILED_THREADS) {
        int o = i / TILED_K, kk = i % TILED_K;
        float v = o0 + o < w.rows && k0 + kk < w.cols ? w_at_code(w, o0 + o, k0 + kk, code) : 0.0f;
        ws[o][kk] = __float2bfloat16_rn(v);
    }
}

/* Rows [0, 16 nt) of x at features [k0, k0 + TILED_K), rounded to bf16;
 * zeros past x. Four floats a load when x4 (cols a multiple of 4, x
 * 16-byte aligned). */
static __device__ __forceinline__ void tiled_x(__nv_bfloat16 (*xs)[TILED_LD], const float *x, int n, int nt, int64_t cols,
                                               int64_t k0, int x4) {
    if (x4) {
        for (int i = threadIdx.x; i < nt * 16 * (TILED_K / 4); i += TILED_THREADS) {
            int r = i / (TILED_K / 4), kk = i % (TILED_K / 4) * 4;
            float4 v = r < n && k0 + kk < cols ? __ldg((const float4 *)(x + r * cols + k0 + kk))
                                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            *(uint2 *)&xs[r][kk] = make_uint2(bf16x2(v.x, v.y), bf16x2(v.z, v.w)); /* 8-byte aligned: 144-byte rows */
        }
        return;
    }
    for (int i = threadIdx.x; i < nt * 16 * TILED_K; i += TILED_THREADS) {
        int r = i / TILED_K, kk = i % TILED_K;
        xs[r][kk] = __float2bfloat16_rn(r < n && k0 + kk < cols ? __ldg(x + r * cols + k0 + kk) : 0.0f);
    }
}

/* y[i, o] = sum_c x[i, c] W[o, c] for 16 < n <= TILED_MAX_ROWS: block
 * (blockIdx.x, blockIdx.y) sums outputs [128 bx, +128) over its share of
 * the features (split: steps of TILED_K each), into y (one share) or
 * part + by * n * rows. Warp w owns outputs [16 w, +16) for every 16 rows
 * of x. */
static __global__ void __launch_bounds__(TILED_THREADS, 2)
    k_matmul_tiled(float *y, float *part, const float *x, DevW w, int n, int vec8, int x4, int steps_per) {
    using namespace nvcuda;
    CUDA_NF4_SHARED(code);
    __shared__ __align__(32) TiledSmem sm;
    int warp = threadIdx.x >> 5, nt = (n + 15) / 16;
    int64_t o0 = (int64_t)blockIdx.x * TILED_O, k_lo = (int64_t)blockIdx.y * steps_per * TILED_K;
    int64_t k_hi = k_lo + (int64_t)steps_per * TILED_K < w.cols ? k_lo + (int64_t)steps_per * TILED_K : w.cols;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TILED_MAX_ROWS / 16];
#pragma unroll
    for (int f = 0; f < TILED_MAX_ROWS / 16; f++) wmma::fill_fragment(acc[f], 0.0f);
    for (int64_t k0 = k_lo; k0 < k_hi; k0 += TILED_K) {
        tiled_x(sm.t.x, x, n, nt, w.cols, k0, x4);
        tiled_w(sm.t.w, w, o0, k0, vec8, code);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILED_K; kk += 16) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb; /* w[o][k]: W^T */
            wmma::load_matrix_sync(fb, &sm.t.w[warp * 16][kk], TILED_LD);
#pragma unroll
            for (int f = 0; f < TILED_MAX_ROWS / 16; f++) {
                if (f >= nt) break; /* uniform over the block */
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
                wmma::load_matrix_sync(fa, &sm.t.x[f * 16][kk], TILED_LD);
                wmma::mma_sync(acc[f], fa, fb, acc[f]);
            }
        }
        __syncthreads(); /* the tiles are rewritten next */
    }
#pragma unroll
    for (int f = 0; f < TILED_MAX_ROWS / 16; f++)
        if (f < nt) wmma::store_matrix_sync(&sm.c[f * 16][warp * 16], acc[f], TILED_CLD, wmma::mem_row_major);
    __syncthreads();
    float *out = gridDim.y > 1 ? part + (size_t)blockIdx.y * (size_t)n * (size_t)w.rows : y;
    for (int i = threadIdx.x; i < n * TILED_O; i += TILED_THREADS) {
        int r = i / TILED_O, ol = i % TILED_O;
        if (o0 + ol < w.rows) out[(int64_t)r * w.rows + o0 + ol] = sm.c[r][ol];
    }
}

/* y[e] = the splits' partial sums of element e, in order. */
static __global__ void k_sum_splits(float *y, const float *part, int splits, size_t n) {
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < splits; k++) s += part[(size_t)k * n + e];
        y[e] = s;
    }
}

/* 1 when a matmul of n rows over w takes the tiled kernel. */
static int tiled_takes(KnMatrix w, int64_t n) {
    return w.dtype != KN_BF16 && n > CUDA_GEMV_MAX_ROWS && n <= TILED_MAX_ROWS;
}

/* How the tiled kernel shares w's feature steps among blocks: all to one
 * block per outputs' tile, or split into shares when w has too few outputs
 * to fill TILED_BLOCKS blocks (never under four steps a share, never over
 * 16 shares). A function of the shape only. */
typedef struct {
    int64_t per;    /* feature steps a block takes */
    int64_t splits; /* shares (blocks per outputs' tile) */
} TiledSplit;

static TiledSplit tiled_split(KnMatrix w) {
    int64_t steps = (w.cols + TILED_K - 1) / TILED_K, blocks = (w.rows + TILED_O - 1) / TILED_O;
    int64_t splits = TILED_BLOCKS / blocks;
    if (splits > steps / 4) splits = steps / 4;
    if (splits > 16) splits = 16;
    if (splits < 1) splits = 1;
    TiledSplit t;
    t.per = (steps + splits - 1) / splits;
    t.splits = (steps + t.per - 1) / t.per; /* rounding per up may leave fewer */
    return t;
}

static void matmul_tiled(CudaCtx *c, float *y, const float *x, KnMatrix w, int64_t n) {
    TiledSplit t = tiled_split(w);
    int64_t splits = t.splits;
    size_t part_n = (size_t)n * (size_t)w.rows;
    float *part = NULL;
    if (splits > 1 && !(part = (float *)cuda_scratch(c, (size_t)splits * part_n * sizeof(float), "matmul bf16")))
        return;
    dim3 grid((unsigned)((w.rows + TILED_O - 1) / TILED_O), (unsigned)splits);
    int x4 = w.cols % 4 == 0 && ((uintptr_t)x & 15) == 0;
    k_matmul_tiled<<<grid, TILED_THREADS, 0, c->stream>>>(y, part, x, dev_w(w), (int)n, nf4_vec8(w), x4, (int)t.per);
    CUDA_LAUNCHED(c, "matmul bf16: tiled");
    if (splits == 1) return;
    k_sum_splits<<<cuda_blocks(part_n, 256), 256, 0, c->stream>>>(y, part, (int)splits, part_n);
    CUDA_LAUNCHED(c, "matmul bf16: tiled splits");
}

/* ---- the entries -------------------------------------------------------------- */

size_t cuda_gemm_scratch(KnMatrix w, int64_t n, int dx) {
    if (n <= 0 || w.rows <= 0 || w.cols <= 0 || (!dx && n <= CUDA_GEMV_MAX_ROWS)) return 0;
    if (!dx && tiled_takes(w, n)) {
        int64_t splits = tiled_split(w).splits;
        return splits > 1 ? (size_t)splits * (size_t)n * (size_t)w.rows * sizeof(float) : 0;
    }
    size_t ab = (size_t)n * (size_t)(dx ? w.rows : w.cols) * 2;
    return ab + (w.dtype == KN_BF16 ? 0 : (size_t)chunk_rows(w) * (size_t)w.cols * 2);
}

/* The scratch for a GEMM's operands over n rows (dx: the input gradient's,
 * src being dy): act (src rounded to bf16) and then wbuf (a chunk of
 * widened rows of w unless w is BF16), sized by cuda_gemm_scratch; 0 when
 * the scratch cannot grow (the fault is noted). */
static int gemm_operands(CudaCtx *c, KnMatrix w, const float *src, int64_t n, int dx, const char *what,
                         __nv_bfloat16 **act, __nv_bfloat16 **wbuf) {
    size_t n_act = (size_t)n * (size_t)(dx ? w.rows : w.cols), ab = n_act * 2;
    char *s = (char *)cuda_scratch(c, cuda_gemm_scratch(w, n, dx), what);
    if (!s) return 0;
    *act = (__nv_bfloat16 *)s;
    *wbuf = (__nv_bfloat16 *)(s + ab);
    to_bf16(c, *act, src, n_act);
    return 1;
}

void cuda_matmul_bf16(CudaCtx *c, float *y, const float *x, KnMatrix w, int64_t n) {
    if (n <= CUDA_GEMV_MAX_ROWS) {
        launch_gemv(c, y, x, w, n, gemv_vec8(w, x));
        return;
    }
    if (tiled_takes(w, n)) {
        matmul_tiled(c, y, x, w, n);
        return;
    }
    int64_t R = chunk_rows(w);
    __nv_bfloat16 *x16, *w16;
    if (!gemm_operands(c, w, x, n, 0, "matmul bf16", &x16, &w16)) return;
    for (int64_t r0 = 0; r0 < w.rows; r0 += R) {
        int64_t rr = w.rows - r0 < R ? w.rows - r0 : R;
        const __nv_bfloat16 *a = w_rows_bf16(c, w, r0, rr, w16);
        /* column-major: y^T[r0.., n] (ld rows) = W[r0..]^T' x^T */
        cuda_gemm_bf16(c, CUBLAS_OP_T, CUBLAS_OP_N, (int)rr, (int)n, (int)w.cols, a, (int)w.cols, x16, (int)w.cols, 0.0f,
                       y + r0, (int)w.rows, "matmul bf16");
    }
}

void cuda_matmul_dx_bf16(CudaCtx *c, float *dx, const float *dy, KnMatrix w, int64_t n) {
    int64_t R = chunk_rows(w);
    __nv_bfloat16 *g16, *w16;
    if (!gemm_operands(c, w, dy, n, 1, "matmul_dx bf16", &g16, &w16)) return;
    for (int64_t r0 = 0; r0 < w.rows; r0 += R) {
        int64_t rr = w.rows - r0 < R ? w.rows - r0 : R;
        const __nv_bfloat16 *a = w_rows_bf16(c, w, r0, rr, w16);
        /* column-major: dx^T[cols, n] += W[r0..]' [cols, rr] dy^T[r0.., n] (ld rows) */
        cuda_gemm_bf16(c, CUBLAS_OP_N, CUBLAS_OP_N, (int)w.cols, (int)n, (int)rr, a, (int)w.cols, g16 + r0, (int)w.rows,
                       1.0f, dx, (int)w.cols, "matmul_dx bf16");
    }
}
