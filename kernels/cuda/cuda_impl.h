/* cuda_impl.h - what the CUDA backend's files share, private to
 * kernels/cuda/: the context (stream, cuBLAS handle, the first fault since
 * the last synchronize), launch checking, and weights as kernels read them.
 *
 * Faults: ops return nothing (ops.h), so every launch and transfer is
 * checked at once and the first error is kept in the context;
 * synchronize() reports it as GF_DEVICE naming the op, and clears it.
 *
 * Weights: a KnMatrix of F32, BF16 or F16 points at its elements in device
 * memory. A KN_NF4 matrix points at a KnNf4 (nf4.h) whose struct lives on the
 * host and whose three arrays (codes, absmax_q, group_scale) live in device
 * memory; DevW carries what a kernel needs by value.
 *
 * The kernels are written for exactness first (fp32 arithmetic, every
 * reduction in a fixed order within a launch, except attention_dx's dk and
 * dv beyond head_dim 512, which queries of one KV head add atomically;
 * cuda_gemm.cu's bf16 matmuls when the context's precision asks); speed comes from the
 * specialised kernels that replace them entry by entry, checked against
 * these and the CPU by test_ops.
 *
 * Threading: a context belongs to one thread (ops.h); every entry makes the
 * context's device current on the calling thread first. */
#ifndef GF_CUDA_IMPL_H
#define GF_CUDA_IMPL_H

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "../kernels_impl.h"
#include "../nf4.h"
}

/* Rows of x up to which a BF16 matmul is a GEMV (a decode step's batch). */
#define CUDA_GEMV_MAX_ROWS 16

/* A context's recorded graphs (cuda_graph.cu): whether its stream is being
 * captured and whether that capture can still run, the graphs instantiated
 * so far (one per bucket, with the signature they were recorded under; the
 * least recently run replaced) and counts. */
#define CUDA_GRAPH_SLOTS 8

typedef struct {
    int64_t bucket;
    cudaGraphExec_t exec;
    void *sig;                /* the signature of the recording exec holds (NULL: none, never replayed) */
    size_t sig_bytes, sig_cap;
    uint64_t scratch_gen;     /* the context's scratch it was recorded over (CudaCtx.scratch_gen) */
    uint64_t last_run;
} CudaGraphSlot;

typedef struct {
    int off;                  /* GF_CUDA_GRAPHS=0, or recordings kept failing: never record */
    int no_replay;            /* GF_CUDA_GRAPHS=record: record every run, never replay */
    int capturing;            /* between graph_begin (RECORD) and graph_end */
    int broken;               /* something refused while capturing: the recording will not run */
    CudaGraphSlot *replay;    /* between graph_begin (REPLAY) and graph_end: the graph to launch */
    int64_t bucket;           /* the recording's bucket and signature (a copy) */
    void *sig;
    size_t sig_bytes, sig_cap;
    int streak;               /* failed recordings in a row */
    cudaError_t fault_before; /* the context's fault when the capture or replay began */
    uint64_t runs;            /* graphs launched (the slots' clock) */
    uint64_t replays, updates, instantiations, failures;
    CudaGraphSlot slot[CUDA_GRAPH_SLOTS];
} CudaGraphs;

/* cuBLAS's workspace per context: its default on Hopper and later (4 MiB
 * before), allocated once and shared with cuBLASLt (cuda_lt.cu). */
#define CUDA_BLAS_WORKSPACE_BYTES ((size_t)32 << 20)

typedef struct CudaLt CudaLt; /* cuda_lt.cu */

typedef struct {
    int device;
    int bf16;                 /* KN_PRECISION_BF16: matmuls on bf16 operands (cuda_gemm.cu) */
    CudaLt *lt;               /* cuBLASLt's handle, workspace and plans (cuda_lt.cu); NULL: cublasGemmEx */
    cudaStream_t stream;
    cublasHandle_t blas;
    void *scratch;            /* cuda_gemm.cu's bf16 operands, grown on the stream */
    size_t scratch_bytes;
    uint64_t scratch_gen;     /* times the scratch moved: a graph recorded over an older one is never replayed */
    void *stage[2];           /* pinned staging of large uploads (cuda_backend.cu), allocated on first use */
    cudaEvent_t staged[2];    /* the copy out of each staging buffer done */
    int stage_ready;          /* 1: allocated; -1: pinned memory refused (uploads go direct) */
    cudaError_t fault;        /* the first error since the last synchronize, cudaSuccess if none */
    char fault_where[48];     /* the op or transfer that met it */
    CudaGraphs graphs;        /* cuda_graph.cu */
} CudaCtx;

/* The context of ctx, its device made current on this thread. */
CudaCtx *cuda_ctx(const KnCtx *ctx);

/* Keeps rc as the context's fault when it is the first one. */
void cuda_note(CudaCtx *c, cudaError_t rc, const char *where);

/* A cuBLAS call's status: anything but success becomes the fault, naming
 * what and the status. */
void cuda_blas_note(CudaCtx *c, cublasStatus_t st, const char *what);

/* cuda_graph.cu: the graph entries (ops.h graph_begin / graph_end); the
 * context's graphs read GF_CUDA_GRAPHS once (init) and are freed with it.
 * cuda_refused marks an entry that cannot be recorded: 1 (and the
 * recording will not run) while the stream is being captured, else 0. */
void cuda_graphs_init(CudaCtx *c);
void cuda_graphs_free(CudaCtx *c);
int cuda_graph_begin(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes);
int cuda_graph_end(const KnCtx *ctx);
int cuda_refused(CudaCtx *c);

/* For a kernel launched with more than 48 KB of dynamic shared memory:
 * lets kernel take all the device allows a block (the opt-in maximum less
 * its static shared memory); called when a context starts (not per
 * launch: host work on the decode path). Every context sets the
 * same value, so that none lowers what another's launch needs (the
 * attribute belongs to the kernel on the device, not to the context). A
 * launch that needs more than the device has fails at launch; a refusal
 * here is returned (the context then fails to open, naming the kernel). */
cudaError_t cuda_smem_full(const CudaCtx *c, const void *kernel);

/* After a launch: the launch's own error, if any, becomes the fault. */
#define CUDA_LAUNCHED(c, where) cuda_note((c), cudaGetLastError(), (where))

/* Blocks for n items of a grid-stride kernel, capped so the grid stays small. */
static inline unsigned cuda_blocks(size_t n, unsigned threads) {
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

/* A weight matrix as a kernel reads it (by value). */
typedef struct {
    const void *data;         /* F32, BF16, F16: the elements */
    const uint8_t *codes;     /* NF4 */
    const int8_t *absmax_q;
    const float *group_scale;
    float nf4_offset;
    int64_t elem0;            /* NF4: index of element (0, 0) in the quantized tensor */
    int64_t rows, cols;
    int dtype;                /* KnDtype */
} DevW;

static inline DevW dev_w(KnMatrix m) {
    DevW w;
    w.data = m.data;
    w.codes = NULL;
    w.absmax_q = NULL;
    w.group_scale = NULL;
    w.nf4_offset = 0.0f;
    w.elem0 = 0;
    w.rows = m.rows;
    w.cols = m.cols;
    w.dtype = (int)m.dtype;
    if (m.dtype == KN_NF4) {
        const KnNf4 *q = (const KnNf4 *)m.data;
        w.codes = q->codes;
        w.absmax_q = q->absmax_q;
        w.group_scale = q->group_scale;
        w.nf4_offset = q->offset;
        w.elem0 = m.offset;
    }
    return w;
}

/* one copy per translation unit (no relocatable device code needed) */
static __constant__ float CUDA_NF4_CODE[16] = KN_NF4_CODE_VALUES;

/* The code book in shared memory, for the kernels that dequantize NF4 in
 * bulk (the decode GEMV, the bf16 GEMM's widening, the MoE experts): the
 * constant cache serves a warp's loads of different entries one after
 * another (up to 16 here), shared memory at once. Declare it at the top of
 * the kernel, before any thread returns (blockDim.x >= 16). */
#define CUDA_NF4_SHARED(name)                                            \
    __shared__ float name[16];                                           \
    if (threadIdx.x < 16) name[threadIdx.x] = CUDA_NF4_CODE[threadIdx.x]; \
    __syncthreads()

/* Element (r, c) of w widened to float (NF4 dequantized as
 * kn_nf4_dequantize, its codes looked up in code). */
static __device__ __forceinline__ float w_at_code(const DevW &w, int64_t r, int64_t c, const float *code) {
    int64_t e = r * w.cols + c;
    switch (w.dtype) {
    case KN_F32: return ((const float *)w.data)[e];
    case KN_BF16: return __uint_as_float((uint32_t)((const uint16_t *)w.data)[e] << 16);
    case KN_F16: return __half2float(((const __half *)w.data)[e]);
    default: {
        e += w.elem0;
        int64_t b = e / KN_NF4_BLOCK;
        float a = __fadd_rn(w.nf4_offset, __fmul_rn((float)w.absmax_q[b], w.group_scale[b / KN_NF4_GROUP]));
        uint8_t byte = w.codes[e / 2];
        return __fmul_rn(code[(e & 1) ? byte >> 4 : byte & 15], a);
    }
    }
}

/* The same, the codes read from constant memory (kernels off the hot paths). */
static __device__ __forceinline__ float w_at(const DevW &w, int64_t r, int64_t c) {
    return w_at_code(w, r, c, CUDA_NF4_CODE);
}

/* The mask rule of ops.h (KnMask) for query position q and key t. */
static __device__ __forceinline__ int mask_visible(const uint8_t *valid, const int32_t *group, int window, int64_t q,
                                                   int64_t t) {
    if (!valid[t]) return 0;
    int causal = t <= q || (group && group[q] >= 0 && group[q] == group[t]);
    return causal && (window == 0 || t > q - window);
}

/* SplitMix64's finalizer (base.h gf_mix64), on the device. */
static __device__ __forceinline__ uint64_t dev_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The sum of v over a block (every thread gets it); sh holds 32 values of T. */
template <typename T> static __device__ __forceinline__ T block_sum(T v, T *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    T s = 0;
    for (int i = 0; i < nw; i++) s += sh[i]; /* in warp order: the same sum in every thread */
    return s;
}

/* The maximum of v over a block (every thread gets it). */
static __device__ __forceinline__ float block_max(float v, float *sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float m = sh[0];
    for (int i = 1; i < nw; i++) m = fmaxf(m, sh[i]);
    return m;
}

/* The sum of v over a warp (every lane gets it). */
static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* gelu_tanh and its slope at v, for every kernel that applies either */
#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */
static __device__ __forceinline__ float gelu(float v) {
    return 0.5f * v * (1.0f + tanhf(GELU_K * (v + 0.044715f * v * v * v)));
}
static __device__ __forceinline__ float gelu_slope(float v) {
    float th = tanhf(GELU_K * (v + 0.044715f * v * v * v));
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
}

/* Entries each file exports to the table (contracts in ops.h). */
/* The context's scratch, at least bytes, grown on its stream (an op's
 * temporaries, valid until the next op asks for it); NULL with the fault
 * noted when it cannot grow, and NULL (the recording failing) when it
 * would have to grow while the stream is recorded. cuda_gemm.cu. */
void *cuda_scratch(CudaCtx *c, size_t bytes, const char *what);
/* sq_norm's partial sums in the scratch: one double per block (cuda_train.cu);
 * the least scratch a context holds once it has run a training step. */
#define CUDA_NORM_SCRATCH_BYTES ((size_t)4096)
/* cuda_lt.cu: cuBLASLt for the context (c->lt; NULL where it cannot be
 * had or GF_CUBLASLT=0), freed with it; and C = op(A) op(B) + beta C in
 * column-major order (cuBLAS's arguments), A and B bf16, C float32, through
 * a cuBLASLt plan or else cublasGemmEx, a failure noted as the fault. */
void cuda_lt_open(CudaCtx *c);
void cuda_lt_free(CudaCtx *c);
void cuda_gemm_bf16(CudaCtx *c, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A, int lda,
                    const void *B, int ldb, float beta, float *C, int ldc, const char *what);
/* cuda_gemm.cu: the BF16 precision's matmul and its input gradient */
void cuda_matmul_bf16(CudaCtx *c, float *y, const float *x, KnMatrix w, int64_t n);
void cuda_matmul_dx_bf16(CudaCtx *c, float *dx, const float *dy, KnMatrix w, int64_t n);
/* the scratch those take for n rows over w (dx: the input gradient's) */
size_t cuda_gemm_scratch(KnMatrix w, int64_t n, int dx);
/* cuda_lora.cu: the scratch of a training segment of n rows of in features */
size_t cuda_lora_scratch(int64_t n, int64_t in, int dropout);
/* cuda_moe.cu: the scratch of moe_experts_dx over n tokens, K of E experts
 * of hidden H and intermediate Im */
size_t cuda_moe_dx_scratch(int64_t n, int K, int E, int64_t H, int64_t Im);
/* the forward's grouping of n tokens' K pairs over E experts */
size_t cuda_moe_scratch(int64_t n, int K, int E);
/* cuda_attention.cu: the scratch of attention_dx over n_q queries */
size_t cuda_attention_dx_scratch(int64_t n_q, int n_heads, int dim);
/* cuda_ops.cu */
void cuda_matmul(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n);
void cuda_matmul_dx(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n);
void cuda_rmsnorm(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps);
void cuda_rmsnorm_add(const KnCtx *ctx, float *y, const float *r, const float *x, const float *w, int64_t n,
                      int64_t dim, float eps, float s);
void cuda_rmsnorm_dx(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                     int64_t dim, float eps);
void cuda_gelu_tanh(const KnCtx *ctx, float *x, size_t n);
void cuda_gelu_gate(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                    int64_t ld_u);
void cuda_gelu_tanh_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n);
void cuda_gelu_gate_dx(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                       size_t n);
void cuda_softcap(const KnCtx *ctx, float *x, size_t n, float cap);
void cuda_embed_rows(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale);
void cuda_embed_rows_add(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row);
void cuda_add(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n);
void cuda_mul(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b);
void cuda_mul_acc(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                  int64_t ld_y);
void cuda_rows_gather(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cuda_rows_scatter(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cuda_rows_scatter_bf16(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                            int64_t dim);
void cuda_rows_sum(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cuda_clamp(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi);
void cuda_clamp_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                   int accumulate);
void cuda_scale_shift(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s);
void cuda_standardize(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale);
void cuda_scale(const KnCtx *ctx, float *x, size_t n, float s);
void cuda_round_bf16(const KnCtx *ctx, uint16_t *kept, float *x, size_t n);
void cuda_widen_bf16(const KnCtx *ctx, float *y, const uint16_t *x, size_t n);
void cuda_rmsnorm_rope(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n_rows, int n_heads, int dim,
                       float eps, const float *inv_freq, const int32_t *pos);
void cuda_rope_rows(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                    const float *inv_freq, const int32_t *pos, int64_t pos_stride);
/* cuda_nf4.cu */
void cuda_nf4_quantize(const KnCtx *ctx, KnNf4 *q, KnMatrix w, void *scratch);
/* cuda_attention.cu */
void cuda_attention(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                    int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                    const KnMask *mask);
void cuda_attention_paged(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                          int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask);
void cuda_attention_batch(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                          const void *v, KnDtype kv, int64_t block_len, const KnAttnSeq *seqs, int n_seqs,
                          int n_heads, int n_kv_heads, int dim, float scale, int window);
void cuda_attention_rows(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                         const void *v, KnDtype kv, int64_t block_len, const KnAttnRow *rows, int64_t n, int n_heads,
                         int n_kv_heads, int dim, float scale, int window);
void cuda_attention_bulk(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                         int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                         const KnMask *mask);
/* Every attention kernel may take the shared memory it needs
 * (cuda_smem_full), set once when the context starts: not per launch, and
 * never while a decode step is recorded (attention_rows runs only there).
 * The first refusal, *what naming its kernel; cudaSuccess when none. */
cudaError_t cuda_attention_open(const CudaCtx *c, const char **what);
void cuda_attention_dx(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                       const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                       int n_kv_heads, int dim, float scale, const KnMask *mask);
/* cuda_train.cu */
void cuda_xent_softcap(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                       float cap, float scale, int grad);
void cuda_adamw(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h);
void cuda_sq_norm(const KnCtx *ctx, double *out, const float *x, size_t n);
/* cuda_sample.cu */
void cuda_sample(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                 void *scratch);
/* cuda_lora.cu */
void cuda_lora_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                      int64_t in, float *dropout_buf);
void cuda_lora_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                      int64_t out);
void cuda_lora_rows_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows, int64_t n,
                           int64_t in, int max_rank);
void cuda_lora_rows_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows, int64_t n,
                           int64_t out);
void cuda_lora_expand_dx(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                         const KnLoraSeg *segs, int n_segs, int64_t out);
void cuda_lora_shrink_dx(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                         const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf);
/* cuda_moe.cu */
void cuda_moe_route(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                    int64_t n, int E, int K);
void cuda_moe_experts(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                      float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down);
void cuda_moe_experts_dx(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                         const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                         KnMatrix down);
void cuda_moe_route_dx(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                       const float *p, const float *expert_scale, int64_t n, int E, int K);

#endif
