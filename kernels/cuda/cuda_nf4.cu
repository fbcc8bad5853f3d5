/* cuda_nf4.cu - NF4 quantization on the device (ops.h nf4_quantize): the
 * bits kn_nf4_quantize (nf4.h) gives on the host, so that a checkpoint can
 * be quantized where it is used instead of on the host's cores. Every step
 * follows nf4.c's arithmetic in the same order: a warp per block of 64 for
 * the exact absmax (a maximum: any order gives the same value) and for the
 * codes, a thread per group of 256 for its sum in double and its int8
 * absmax, one thread for the mean over the groups' sums. Roundings are
 * written out (__fdiv_rn, __fmul_rn, __fadd_rn) so that no contraction into
 * a fused multiply-add changes a bit. */
#include "cuda_impl.h"

#define THREADS 256
#define GRID_STRIDE_64(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static __constant__ float NEAREST_FROM[15] = KN_NF4_NEAREST_FROM_VALUES;

/* nf4.c's nearest_code, with kn_nf4_nearest's zero absmax. */
static __device__ __forceinline__ uint8_t nearest_code(float w, float a) {
    if (a == 0.0f) return 7; /* 7: zero */
    float v = __fdiv_rn(w, a);
    v = v < -1.0f ? -1.0f : v;
    v = v <= 1.0f ? v : 1.0f; /* NaN too */
    int c = 0;
#pragma unroll
    for (int i = 0; i < 15; i++) c += v >= NEAREST_FROM[i];
    return (uint8_t)c;
}

/* The warps of the grid, one block of 64 elements at a time: lane l holds
 * elements 2l and 2l + 1 of block b. */
#define WARP_BLOCKS(b, n_blocks)                                                                       \
    for (int64_t b = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; b < (n_blocks);            \
         b += (int64_t)gridDim.x * blockDim.x / 32)

static __global__ void k_absmax(float *absmax, DevW w, int64_t n, int64_t n_blocks) {
    int lane = threadIdx.x & 31;
    WARP_BLOCKS(b, n_blocks) {
        int64_t e = b * KN_NF4_BLOCK + 2 * lane;
        float m = 0.0f;
        for (int k = 0; k < 2; k++) {
            float a = e + k < n ? fabsf(w_at(w, 0, e + k)) : 0.0f;
            m = a > m ? a : m; /* a NaN is passed over */
        }
        for (int o = 16; o > 0; o >>= 1) {
            float other = __shfl_xor_sync(0xffffffffu, m, o);
            m = other > m ? other : m;
        }
        if (lane == 0) absmax[b] = m;
    }
}

/* Group g's absmax summed in double, in order. */
static __global__ void k_group_sums(double *sums, const float *absmax, int64_t n_blocks, int64_t n_groups) {
    GRID_STRIDE_64(g, n_groups) {
        int64_t lo = g * KN_NF4_GROUP, hi = lo + KN_NF4_GROUP < n_blocks ? lo + KN_NF4_GROUP : n_blocks;
        double s = 0.0;
        for (int64_t b = lo; b < hi; b++) s = __dadd_rn(s, (double)absmax[b]);
        sums[g] = s;
    }
}

/* The mean absmax, from the groups' sums in order, as a float in *mean. */
static __global__ void k_mean(float *mean, const double *sums, int64_t n_blocks, int64_t n_groups) {
    double s = 0.0;
    for (int64_t g = 0; g < n_groups; g++) s = __dadd_rn(s, sums[g]);
    *mean = __double2float_rn(__ddiv_rn(s, (double)n_blocks));
}

/* Group g's scale and its blocks' int8 absmax. */
static __global__ void k_group_quant(int8_t *absmax_q, float *group_scale, const float *absmax, const float *mean,
                                     int64_t n_blocks, int64_t n_groups) {
    float offset = *mean;
    GRID_STRIDE_64(g, n_groups) {
        int64_t lo = g * KN_NF4_GROUP, hi = lo + KN_NF4_GROUP < n_blocks ? lo + KN_NF4_GROUP : n_blocks;
        float mx = 0.0f;
        for (int64_t b = lo; b < hi; b++) mx = fmaxf(mx, fabsf(__fsub_rn(absmax[b], offset)));
        float scale = __fdiv_rn(mx, 127.0f);
        group_scale[g] = scale;
        for (int64_t b = lo; b < hi; b++) {
            float v = scale > 0 ? __fdiv_rn(__fsub_rn(absmax[b], offset), scale) : 0.0f;
            absmax_q[b] = (int8_t)__float2int_rn(fmaxf(-127.0f, fminf(127.0f, v)));
        }
    }
}

/* Block b's codes against its dequantized absmax (kn_nf4_absmax): byte l
 * of the block from lane l, the even element in the low nibble. */
static __global__ void k_codes(uint8_t *codes, DevW w, const int8_t *absmax_q, const float *group_scale,
                               const float *mean, int64_t n, int64_t n_blocks) {
    int lane = threadIdx.x & 31;
    float offset = *mean;
    WARP_BLOCKS(b, n_blocks) {
        float a = __fadd_rn(offset, __fmul_rn((float)absmax_q[b], group_scale[b / KN_NF4_GROUP]));
        int64_t e = b * KN_NF4_BLOCK + 2 * lane;
        if (e >= n) continue;
        uint8_t lo = nearest_code(w_at(w, 0, e), a), hi = e + 1 < n ? nearest_code(w_at(w, 0, e + 1), a) : 0;
        codes[e / 2] = (uint8_t)(lo | hi << 4);
    }
}

void cuda_nf4_quantize(const KnCtx *ctx, KnNf4 *q, KnMatrix w, void *scratch) {
    CudaCtx *c = cuda_ctx(ctx);
    if (q->n <= 0 || cuda_refused(c)) return;
    KnMatrix flat = {w.data, w.dtype, 1, q->n, 0, 0};
    DevW dw = dev_w(flat);
    float *absmax = (float *)scratch;
    double *sums = (double *)((char *)scratch + kn_nf4_scratch_sums(q->n_blocks));
    float *mean = (float *)(sums + q->n_groups);
    unsigned warps = cuda_blocks((size_t)q->n_blocks * 32, THREADS), groups = cuda_blocks((size_t)q->n_groups, THREADS);
    k_absmax<<<warps, THREADS, 0, c->stream>>>(absmax, dw, q->n, q->n_blocks);
    CUDA_LAUNCHED(c, "nf4_quantize");
    k_group_sums<<<groups, THREADS, 0, c->stream>>>(sums, absmax, q->n_blocks, q->n_groups);
    CUDA_LAUNCHED(c, "nf4_quantize");
    k_mean<<<1, 1, 0, c->stream>>>(mean, sums, q->n_blocks, q->n_groups);
    CUDA_LAUNCHED(c, "nf4_quantize");
    k_group_quant<<<groups, THREADS, 0, c->stream>>>(q->absmax_q, q->group_scale, absmax, mean, q->n_blocks,
                                                     q->n_groups);
    CUDA_LAUNCHED(c, "nf4_quantize");
    k_codes<<<warps, THREADS, 0, c->stream>>>(q->codes, dw, q->absmax_q, q->group_scale, mean, q->n, q->n_blocks);
    CUDA_LAUNCHED(c, "nf4_quantize");
    float offset = 0.0f;
    cudaError_t rc = cudaMemcpyAsync(&offset, mean, sizeof offset, cudaMemcpyDeviceToHost, c->stream);
    if (rc == cudaSuccess) rc = cudaStreamSynchronize(c->stream);
    cuda_note(c, rc, "nf4_quantize");
    q->offset = offset;
}
