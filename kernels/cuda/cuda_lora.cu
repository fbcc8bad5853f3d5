/* cuda_lora.cu - the grouped LoRA ops (ops.h KnLoraSeg), forward and
 * backward, each adapter at its own rank, never padded: segments on the
 * row kernels GROUP per launch, forward and backward (a launch never holds
 * two segments that accumulate into one gradient).
 * Dropout factors are hashed per element exactly as on the CPU.
 *
 * A serving segment (no gradients) runs on kernels that compute each row
 * alone, so a sequence's LoRA term never depends on its batch. A training
 * segment (dA or dB set) of TRAIN_GEMM_ROWS rows or more runs as cuBLAS GEMMs
 * over float32 arrays (bf16 operands on the tensor cores in the BF16
 * precision, float32 in FP32), its dropped-out x materialised in the
 * context's scratch: at a
 * training step's thousand rows the per-row kernels would cost as much as
 * the base's matmuls. Either way the sums over rows have a fixed order, so
 * the weight gradients do not depend on scheduling. */
#include <stdio.h>

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

#define TRAIN_GEMM_ROWS 16

static int gemm_segment(const KnLoraSeg *s) { return (s->dA || s->dB) && s->n_rows >= TRAIN_GEMM_ROWS && s->rank > 0; }

/* a GEMM segment's dropped-out x (segment_x, then shrink_dx_gemm's product) */
size_t cuda_lora_scratch(int64_t n, int64_t in, int dropout) {
    return dropout && n >= TRAIN_GEMM_ROWS && in > 0 ? (size_t)(n * in) * sizeof(float) : 0;
}

/* A training segment's GEMM: float32 in and out, summed in float32; the
 * BF16 precision lets cuBLAS round the operands to bfloat16 for the tensor
 * cores (as attention's, cuda_attention.cu), the FP32 one keeps them (the
 * handle's math is pedantic there: no TF32). A QLoRA step's LoRA GEMMs
 * take 8 r (in + out) flops per token and pair (4.6 TFLOP for an E4B step
 * of 4,096 tokens at rank 64, 5% of its base matmuls' 95 TFLOP): on the
 * CUDA cores (67 TFLOPS on an H200, against 989 in bf16 on the tensor
 * cores) they would take about two thirds of the base matmuls' time. */
static void sgemm(CudaCtx *c, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, float alpha,
                  const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *y, int64_t ldc,
                  const char *what) {
    cublasComputeType_t ct = c->bf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
    cuda_blas_note(c,
                   cublasGemmEx(c->blas, ta, tb, (int)m, (int)n, (int)k, &alpha, a, CUDA_R_32F, (int)lda, b, CUDA_R_32F,
                                (int)ldb, &beta, y, CUDA_R_32F, (int)ldc, ct, CUBLAS_GEMM_DEFAULT),
                   what);
}

/* The dropout factor of element j of the segment's row i (ops.h). */
static __device__ __forceinline__ float drop(const Seg &s, int64_t i, int64_t in, int64_t j) {
    if (!s.dropout) return 1.0f;
    return (uint32_t)(dev_mix64(s.seed + (uint64_t)i * (uint64_t)in + (uint64_t)j) >> 32) < s.cut ? 0.0f : s.keep;
}

/* xd[i, j] = x[row0 + i, j] * f[i, j]: the segment's rows, dropped out. */
static __global__ void k_dropped(float *xd, const float *x, Seg s, int64_t in) {
    size_t n = (size_t)(s.n_rows * in);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i = (int64_t)e / in, j = (int64_t)e % in;
        xd[e] = x[(s.row0 + i) * in + j] * drop(s, i, in, j);
    }
}

/* dx[row0 + i, j] += p[i, j] * f[i, j] */
static __global__ void k_add_dropped(float *dx, const float *p, Seg s, int64_t in) {
    size_t n = (size_t)(s.n_rows * in);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i = (int64_t)e / in, j = (int64_t)e % in;
        dx[(s.row0 + i) * in + j] += p[e] * drop(s, i, in, j);
    }
}

/* The segment's x as its matmuls read it: x's rows in place without
 * dropout, else dropped out into the scratch (NULL: the fault is noted). */
static const float *segment_x(CudaCtx *c, const Seg &s, const float *x, int64_t in, const char *what) {
    if (!s.dropout) return x + s.row0 * in;
    float *xd = (float *)cuda_scratch(c, cuda_lora_scratch(s.n_rows, in, 1), what);
    if (!xd) return NULL;
    k_dropped<<<cuda_blocks((size_t)(s.n_rows * in), THREADS), THREADS, 0, c->stream>>>(xd, x, s, in);
    CUDA_LAUNCHED(c, what);
    return xd;
}

/* Segments launched together: up to GROUP of them by value in the kernel's
 * parameters, blockIdx.z picking one, so a decode step over 64 adapters
 * takes two launches per op, not 64. */
#define GROUP 32
typedef struct {
    Seg s[GROUP];
    int n;
} Group;

/* A serving warp's share: SHRINK_ROWS rows by SHRINK_KS of the adapter's
 * ranks, so each element of A is loaded once per SHRINK_ROWS rows and each
 * of x once per SHRINK_KS ranks (a batch sharing an adapter reads it at
 * full bandwidth); an expand thread's SHRINK_ROWS rows of one output read
 * B's row once. Each row's sums are the same operations whatever its slot
 * or the other rows, so its term does not depend on its batch. */
#define SHRINK_ROWS 8
#define SHRINK_KS 4

/* t[r, k] = scale * sum_j d(x)[r, j] A[k, j] */
static __global__ void k_shrink(float *t, int64_t ld_t, const float *x, Group g, int64_t in) {
    const Seg &s = g.s[blockIdx.z];
    int lane = threadIdx.x & 31, k0 = (blockIdx.y * WARPS + (threadIdx.x >> 5)) * SHRINK_KS;
    int64_t i0 = (int64_t)blockIdx.x * SHRINK_ROWS;
    if (i0 >= s.n_rows || k0 >= s.rank) return;
    int nr = s.n_rows - i0 < SHRINK_ROWS ? (int)(s.n_rows - i0) : SHRINK_ROWS;
    int nk = s.rank - k0 < SHRINK_KS ? s.rank - k0 : SHRINK_KS;
    float acc[SHRINK_ROWS][SHRINK_KS];
    for (int q = 0; q < SHRINK_ROWS; q++)
        for (int c = 0; c < SHRINK_KS; c++) acc[q][c] = 0.0f;
#pragma unroll 4
    for (int64_t j = lane; j < in; j += 32) {
        float a[SHRINK_KS];
        for (int c = 0; c < SHRINK_KS; c++) a[c] = c < nk ? s.A[(int64_t)(k0 + c) * in + j] : 0.0f;
        for (int q = 0; q < SHRINK_ROWS; q++) {
            if (q >= nr) break;
            float xd = x[(s.row0 + i0 + q) * in + j] * drop(s, i0 + q, in, j);
            for (int c = 0; c < SHRINK_KS; c++) acc[q][c] += xd * a[c];
        }
    }
    for (int q = 0; q < nr; q++)
        for (int c = 0; c < nk; c++) {
            float v = warp_sum(acc[q][c]);
            if (lane == 0) t[(s.row0 + i0 + q) * ld_t + k0 + c] = v * s.scale;
        }
}

/* y[r, o] += sum_k t[r, k] B[o, k] */
static __global__ void k_expand(float *y, const float *t, int64_t ld_t, Group g, int64_t out) {
    const Seg &s = g.s[blockIdx.z];
    int64_t groups = (s.n_rows + SHRINK_ROWS - 1) / SHRINK_ROWS;
    size_t n = (size_t)(groups * out);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i0 = (int64_t)e / out * SHRINK_ROWS, o = (int64_t)e % out;
        int nr = s.n_rows - i0 < SHRINK_ROWS ? (int)(s.n_rows - i0) : SHRINK_ROWS;
        const float *b = s.B + o * s.rank, *t0 = t + (s.row0 + i0) * ld_t;
        float acc[SHRINK_ROWS];
        for (int q = 0; q < SHRINK_ROWS; q++) acc[q] = 0.0f;
        for (int k = 0; k < s.rank; k++) {
            float bk = b[k];
            for (int q = 0; q < SHRINK_ROWS; q++)
                if (q < nr) acc[q] += t0[q * ld_t + k] * bk;
        }
#pragma unroll
        for (int q = 0; q < SHRINK_ROWS; q++) /* constant indices: acc stays in registers */
            if (q < nr) y[(s.row0 + i0 + q) * out + o] += acc[q];
    }
}

/* 1 when s accumulates into a gradient array a segment of g does. */
static int shares_grads(const Group &g, const KnLoraSeg *s) {
    for (int i = 0; i < g.n; i++)
        if ((s->dA && g.s[i].dA == s->dA) || (s->dB && g.s[i].dB == s->dB)) return 1;
    return 0;
}

/* The segments of segs the row kernels take (not gemm_segment's, not
 * empty), GROUP at a time: fn(c, group, most rows, highest rank, cls).
 * With grads, a segment whose dA or dB a segment of the group also
 * accumulates into starts the next group (the stream orders the two). */
static void for_groups(CudaCtx *c, const KnLoraSeg *segs, int n_segs, int grads,
                       void (*fn)(CudaCtx *, const Group &, int64_t, int, void *), void *cls) {
    Group g;
    g.n = 0;
    int64_t rows = 0;
    int rank = 0;
    for (int q = 0; q <= n_segs; q++) {
        const KnLoraSeg *s = q < n_segs ? &segs[q] : NULL;
        if (s && (s->n_rows <= 0 || s->rank <= 0 || gemm_segment(s))) continue;
        if (g.n && (!s || g.n == GROUP || (grads && shares_grads(g, s)))) {
            fn(c, g, rows, rank, cls);
            g.n = 0;
            rows = 0;
            rank = 0;
        }
        if (!s) break;
        g.s[g.n++] = seg_of(s);
        rows = s->n_rows > rows ? s->n_rows : rows;
        rank = s->rank > rank ? s->rank : rank;
    }
}

typedef struct {
    float *t, *y;
    const float *x;
    int64_t ld_t, dim; /* in for shrink, out for expand */
} RowArgs;

static void shrink_group(CudaCtx *c, const Group &g, int64_t rows, int rank, void *cls) {
    const RowArgs *r = (const RowArgs *)cls;
    int per_block = WARPS * SHRINK_KS;
    dim3 grid((unsigned)((rows + SHRINK_ROWS - 1) / SHRINK_ROWS), (unsigned)((rank + per_block - 1) / per_block),
              (unsigned)g.n);
    k_shrink<<<grid, THREADS, 0, c->stream>>>(r->t, r->ld_t, r->x, g, r->dim);
    CUDA_LAUNCHED(c, "lora_shrink");
}

static void expand_group(CudaCtx *c, const Group &g, int64_t rows, int rank, void *cls) {
    (void)rank;
    const RowArgs *r = (const RowArgs *)cls;
    int64_t groups = (rows + SHRINK_ROWS - 1) / SHRINK_ROWS;
    dim3 grid(cuda_blocks((size_t)(groups * r->dim), THREADS), 1, (unsigned)g.n);
    k_expand<<<grid, THREADS, 0, c->stream>>>(r->y, r->t, r->ld_t, g, r->dim);
    CUDA_LAUNCHED(c, "lora_expand");
}

void cuda_lora_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                      int64_t in, float *dropout_buf) {
    (void)dropout_buf;
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || !gemm_segment(&segs[q])) continue;
        /* column-major: t^T[rank, n] (ld ld_t) = scale A d(x)^T */
        Seg s = seg_of(&segs[q]);
        const float *xs = segment_x(c, s, x, in, "lora_shrink");
        if (xs)
            sgemm(c, CUBLAS_OP_T, CUBLAS_OP_N, s.rank, s.n_rows, in, s.scale, s.A, in, xs, in, 0.0f, t + s.row0 * ld_t, ld_t,
                  "lora_shrink");
    }
    RowArgs r = {t, NULL, x, ld_t, in};
    for_groups(c, segs, n_segs, 0, shrink_group, &r);
}

void cuda_lora_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                      int64_t out) {
    if (out <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || !gemm_segment(&segs[q])) continue;
        /* column-major: y^T[out, n] += B t^T */
        const KnLoraSeg *s = &segs[q];
        sgemm(c, CUBLAS_OP_T, CUBLAS_OP_N, out, s->n_rows, s->rank, 1.0f, s->B, s->rank, t + s->row0 * ld_t, ld_t, 1.0f,
              y + s->row0 * out, out, "lora_expand");
    }
    RowArgs r = {(float *)t, y, NULL, ld_t, out};
    for_groups(c, segs, n_segs, 0, expand_group, &r);
}

/* ---- one adapter per row (KnLoraRow, in device memory) --------------------------------- */

/* t[r, k] = scale_r * sum_j x[r, j] A_r[k, j]. A block takes ROWS_R rows,
 * a warp one rank of them (a decode step of 64 rows at rank 16: 256
 * warps), the rows' x staged in shared memory ROWS_TILE features at a time
 * for all of them. Each lane sums j = lane, lane + 32, .. before the warp's
 * sum, so a row's term is k_shrink's, bit for bit, however the rows and
 * ranks are dealt out. The inner loop has no branch (rows without the rank
 * load nothing), so that the loads of several j are in flight at once:
 * with many distinct adapters a step reads each one's A at the device's
 * bandwidth, not at one load per round trip; rows sharing an adapter find
 * it in the cache. */
#define ROWS_R 4
#define ROWS_TILE 1024 /* a multiple of 32: each lane's j stay in order across tiles */
static __global__ void __launch_bounds__(THREADS) k_rows_shrink(float *t, int64_t ld_t, const float *x,
                                                                const KnLoraRow *rows, int64_t n, int64_t in) {
    __shared__ float xs[ROWS_R][ROWS_TILE];
    int lane = threadIdx.x & 31, k = blockIdx.y * WARPS + (threadIdx.x >> 5);
    int64_t i0 = (int64_t)blockIdx.x * ROWS_R;
    int nr = n - i0 < ROWS_R ? (int)(n - i0) : ROWS_R, any = 0, block_any = 0;
    const float *A[ROWS_R];
    float scale[ROWS_R], acc[ROWS_R];
#pragma unroll
    for (int q = 0; q < ROWS_R; q++) {
        KnLoraRow d = q < nr ? rows[i0 + q] : KnLoraRow{NULL, NULL, 0, 0.0f};
        A[q] = k < d.rank ? d.A + (int64_t)k * in : NULL; /* the same for every lane */
        scale[q] = d.scale;
        acc[q] = 0.0f;
        any |= A[q] != NULL;
        block_any |= d.rank > (int)(blockIdx.y * WARPS);
    }
    if (!block_any) return; /* the whole block: no warp of it has a rank to sum */
    for (int64_t j0 = 0; j0 < in; j0 += ROWS_TILE) {
        int len = in - j0 < ROWS_TILE ? (int)(in - j0) : ROWS_TILE;
        for (int e = threadIdx.x; e < ROWS_R * ROWS_TILE; e += THREADS) {
            int q = e / ROWS_TILE, jj = e % ROWS_TILE;
            xs[q][jj] = q < nr && jj < len ? __ldg(x + (i0 + q) * in + j0 + jj) : 0.0f;
        }
        __syncthreads();
        if (any)
#pragma unroll 4
            for (int jj = lane; jj < len; jj += 32)
#pragma unroll
                for (int q = 0; q < ROWS_R; q++) {
                    float a = A[q] ? __ldg(A[q] + j0 + jj) : 0.0f, xd = A[q] ? xs[q][jj] : 0.0f;
                    acc[q] += xd * a;
                }
        __syncthreads(); /* xs is rewritten next */
    }
#pragma unroll
    for (int q = 0; q < ROWS_R; q++) {
        float v = warp_sum(acc[q]);
        if (A[q] && lane == 0) t[(i0 + q) * ld_t + k] = v * scale[q];
    }
}

/* y[r, o] += sum_k t[r, k] B_r[o, k], k in order as k_expand sums it: a
 * thread per (SHRINK_ROWS rows, o), each run of consecutive rows on one
 * adapter reading its row of B once. Rows of rank 0 keep their y. */
static __global__ void k_rows_expand(float *y, const float *t, int64_t ld_t, const KnLoraRow *rows, int64_t n,
                                     int64_t out) {
    int64_t groups = (n + SHRINK_ROWS - 1) / SHRINK_ROWS;
    size_t total = (size_t)(groups * out);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i0 = (int64_t)e / out * SHRINK_ROWS, o = (int64_t)e % out;
        int nr = n - i0 < SHRINK_ROWS ? (int)(n - i0) : SHRINK_ROWS;
        const float *t0 = t + i0 * ld_t;
        float acc[SHRINK_ROWS];
        int has[SHRINK_ROWS];
#pragma unroll
        for (int q = 0; q < SHRINK_ROWS; q++) {
            acc[q] = 0.0f;
            has[q] = 0;
        }
        for (int q0 = 0, q1; q0 < nr; q0 = q1) {
            const KnLoraRow d = rows[i0 + q0];
            for (q1 = q0 + 1; q1 < nr && rows[i0 + q1].B == d.B && rows[i0 + q1].rank == d.rank;) q1++;
            if (d.rank <= 0) continue;
            const float *b = d.B + o * d.rank;
            for (int k = 0; k < d.rank; k++) {
                float bk = b[k];
#pragma unroll
                for (int q = 0; q < SHRINK_ROWS; q++)
                    if (q >= q0 && q < q1) acc[q] += t0[q * ld_t + k] * bk;
            }
#pragma unroll
            for (int q = 0; q < SHRINK_ROWS; q++)
                if (q >= q0 && q < q1) has[q] = 1;
        }
#pragma unroll
        for (int q = 0; q < SHRINK_ROWS; q++) /* constant indices: acc stays in registers */
            if (has[q]) y[(i0 + q) * out + o] += acc[q];
    }
}

void cuda_lora_rows_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows, int64_t n,
                           int64_t in, int max_rank) {
    if (n <= 0 || in <= 0 || max_rank <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    dim3 grid((unsigned)((n + ROWS_R - 1) / ROWS_R), (unsigned)((max_rank + WARPS - 1) / WARPS));
    k_rows_shrink<<<grid, THREADS, 0, c->stream>>>(t, ld_t, x, rows, n, in);
    CUDA_LAUNCHED(c, "lora_rows_shrink");
}

void cuda_lora_rows_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows, int64_t n,
                           int64_t out) {
    if (n <= 0 || out <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t groups = (n + SHRINK_ROWS - 1) / SHRINK_ROWS;
    k_rows_expand<<<cuda_blocks((size_t)(groups * out), THREADS), THREADS, 0, c->stream>>>(y, t, ld_t, rows, n, out);
    CUDA_LAUNCHED(c, "lora_rows_expand");
}

/* ---- backward ------------------------------------------------------------------------ */

/* The short segments' backward: blockIdx.z picks the group's segment;
 * each kernel's sums over rows run in row order, as on the CPU. */

/* gt[r, k] = sum_o dy[r, o] B[o, k]: one warp per (row, k). */
static __global__ void k_expand_gt(float *gt, const float *dy, int64_t ld_t, Group g, int64_t out) {
    const Seg &s = g.s[blockIdx.z];
    int lane = threadIdx.x & 31, k = blockIdx.y * WARPS + (threadIdx.x >> 5);
    if ((int64_t)blockIdx.x >= s.n_rows || k >= s.rank) return;
    int64_t r = s.row0 + blockIdx.x;
    float acc = 0.0f;
    for (int64_t o = lane; o < out; o += 32) acc += dy[r * out + o] * s.B[o * s.rank + k];
    acc = warp_sum(acc);
    if (lane == 0) gt[r * ld_t + k] = acc;
}

/* dB[o, k] += sum_r dy[r, o] t[r, k], the rows in order */
static __global__ void k_expand_dB(const float *dy, const float *t, int64_t ld_t, Group g, int64_t out) {
    const Seg &s = g.s[blockIdx.z];
    size_t n = (size_t)(out * s.rank);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t o = (int64_t)e / s.rank, k = (int64_t)e % s.rank;
        float acc = 0.0f;
        for (int64_t r = s.row0; r < s.row0 + s.n_rows; r++) acc += dy[r * out + o] * t[r * ld_t + k];
        s.dB[e] += acc;
    }
}

typedef struct {
    float *grad;              /* gt (expand_dx) or dx (shrink_dx, may be NULL) */
    const float *a, *b;       /* dy, t (expand_dx); gt, x (shrink_dx) */
    int64_t ld_t, dim;        /* out (expand_dx) or in (shrink_dx) */
} GradArgs;

static void expand_dx_group(CudaCtx *c, const Group &g, int64_t rows, int rank, void *cls) {
    const GradArgs *r = (const GradArgs *)cls;
    dim3 grid((unsigned)rows, (unsigned)((rank + WARPS - 1) / WARPS), (unsigned)g.n);
    k_expand_gt<<<grid, THREADS, 0, c->stream>>>(r->grad, r->a, r->ld_t, g, r->dim);
    CUDA_LAUNCHED(c, "lora_expand_dx");
    if (r->dim <= 0) return;
    dim3 grid_b(cuda_blocks((size_t)(r->dim * rank), THREADS), 1, (unsigned)g.n);
    k_expand_dB<<<grid_b, THREADS, 0, c->stream>>>(r->a, r->b, r->ld_t, g, r->dim);
    CUDA_LAUNCHED(c, "lora_expand_dx");
}

void cuda_lora_expand_dx(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                         const KnLoraSeg *segs, int n_segs, int64_t out) {
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++) {
        if (segs[q].n_rows <= 0 || !gemm_segment(&segs[q])) continue;
        Seg s = seg_of(&segs[q]);
        /* column-major: gt^T[rank, n] (ld ld_t) = B^T dy^T; dB^T[rank, out] += t^T dy */
        sgemm(c, CUBLAS_OP_N, CUBLAS_OP_N, s.rank, s.n_rows, out, 1.0f, s.B, s.rank, dy + s.row0 * out, out, 0.0f,
              gt + s.row0 * ld_t, ld_t, "lora_expand_dx");
        if (out > 0)
            sgemm(c, CUBLAS_OP_N, CUBLAS_OP_T, s.rank, out, s.n_rows, 1.0f, t + s.row0 * ld_t, ld_t, dy + s.row0 * out,
                  out, 1.0f, s.dB, s.rank, "lora_expand_dx");
    }
    GradArgs r = {gt, dy, t, ld_t, out};
    for_groups(c, segs, n_segs, 1, expand_dx_group, &r);
}

/* dA[k, j] += sum_r scale gt[r, k] d(x)[r, j], the rows in order */
static __global__ void k_shrink_dA(const float *gt, int64_t ld_t, const float *x, Group g, int64_t in) {
    const Seg &s = g.s[blockIdx.z];
    if (!s.dA) return;
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
static __global__ void k_shrink_dx(float *dx, const float *gt, int64_t ld_t, Group g, int64_t in) {
    const Seg &s = g.s[blockIdx.z];
    size_t n = (size_t)(s.n_rows * in);
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t i = (int64_t)e / in, j = (int64_t)e % in, r = s.row0 + i;
        float acc = 0.0f;
        for (int k = 0; k < s.rank; k++) acc += gt[r * ld_t + k] * s.scale * s.A[(int64_t)k * in + j];
        dx[r * in + j] += acc * drop(s, i, in, j);
    }
}

static void shrink_dx_group(CudaCtx *c, const Group &g, int64_t rows, int rank, void *cls) {
    const GradArgs *r = (const GradArgs *)cls;
    dim3 grid_a(cuda_blocks((size_t)(rank * r->dim), THREADS), 1, (unsigned)g.n);
    k_shrink_dA<<<grid_a, THREADS, 0, c->stream>>>(r->a, r->ld_t, r->b, g, r->dim);
    CUDA_LAUNCHED(c, "lora_shrink_dx");
    if (!r->grad) return;
    dim3 grid_x(cuda_blocks((size_t)(rows * r->dim), THREADS), 1, (unsigned)g.n);
    k_shrink_dx<<<grid_x, THREADS, 0, c->stream>>>(r->grad, r->a, r->ld_t, g, r->dim);
    CUDA_LAUNCHED(c, "lora_shrink_dx");
}

/* dA^T[in, rank] += scale d(x)^T gt; dx^T[in, n] += scale (A^T gt^T) * f,
 * through the scratch when dropped out (the product, then the mask). */
static void shrink_dx_gemm(CudaCtx *c, float *dx, const float *gt, int64_t ld_t, const float *x, const Seg &s,
                           int64_t in) {
    if (s.dA) {
        const float *xs = segment_x(c, s, x, in, "lora_shrink_dx");
        if (!xs) return;
        sgemm(c, CUBLAS_OP_N, CUBLAS_OP_T, in, s.rank, s.n_rows, s.scale, xs, in, gt + s.row0 * ld_t, ld_t, 1.0f, s.dA,
              in, "lora_shrink_dx");
    }
    if (!dx) return;
    if (!s.dropout) {
        sgemm(c, CUBLAS_OP_N, CUBLAS_OP_N, in, s.n_rows, s.rank, s.scale, s.A, in, gt + s.row0 * ld_t, ld_t, 1.0f,
              dx + s.row0 * in, in, "lora_shrink_dx");
        return;
    }
    /* the scratch held d(x) for dA; the stream orders its reuse for the product */
    float *p = (float *)cuda_scratch(c, cuda_lora_scratch(s.n_rows, in, 1), "lora_shrink_dx");
    if (!p) return;
    sgemm(c, CUBLAS_OP_N, CUBLAS_OP_N, in, s.n_rows, s.rank, s.scale, s.A, in, gt + s.row0 * ld_t, ld_t, 0.0f, p, in,
          "lora_shrink_dx");
    k_add_dropped<<<cuda_blocks((size_t)(s.n_rows * in), THREADS), THREADS, 0, c->stream>>>(dx, p, s, in);
    CUDA_LAUNCHED(c, "lora_shrink_dx");
}

void cuda_lora_shrink_dx(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                         const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    (void)dropout_buf;
    if (in <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    for (int q = 0; q < n_segs; q++)
        if (segs[q].n_rows > 0 && gemm_segment(&segs[q])) shrink_dx_gemm(c, dx, gt, ld_t, x, seg_of(&segs[q]), in);
    GradArgs r = {dx, gt, x, ld_t, in};
    for_groups(c, segs, n_segs, 1, shrink_dx_group, &r);
}
