/* cpu_impl.h - what the CPU kernels share, private to kernels/cpu/: the
 * widening of weight rows, the entries each file exports to the CPU table
 * (contracts in ops.h), and the table itself for the guarded backend, which
 * runs the same kernels. */
#ifndef GF_CPU_IMPL_H
#define GF_CPU_IMPL_H

#include <math.h>
#include <string.h>

#include "../ops.h"

/* len elements of row r of w from column c0, widened to float32 (NF4
 * dequantized). w lives in host memory (the CPU device). */
void cpu_load_span(float *out, KnMatrix w, int64_t r, int64_t c0, int64_t len);

/* The mask rule of ops.h (KnMask) for query position q and key t. */
static inline int cpu_mask_visible(const KnMask *m, int64_t q, int64_t t) {
    if (!m->valid[t]) return 0;
    int causal = t <= q || (m->group && m->group[q] >= 0 && m->group[q] == m->group[t]);
    return causal && (m->window == 0 || t > q - m->window);
}

/* Four floats in one vector (GCC and clang's vector extension: SSE on
 * x86-64, NEON on arm64). Lane arithmetic is the scalar arithmetic of each
 * lane, so a loop over V4 sums what the same loop over floats sums. */
typedef float V4 __attribute__((vector_size(16)));

static inline V4 cpu_load4(const float *p) {
    V4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cpu_store4(float *p, V4 v) { memcpy(p, &v, sizeof v); }

/* y[0, n) += a x[0, n), four lanes at a time: each element the scalar
 * y + a x, so the bits of the plain loop. */
static inline void cpu_axpy(float *y, float a, const float *x, int64_t n) {
    V4 av = {a, a, a, a};
    int64_t d = 0;
    for (; d + 4 <= n; d += 4) cpu_store4(y + d, cpu_load4(y + d) + av * cpu_load4(x + d));
    for (; d < n; d++) y[d] += a * x[d];
}

/* cpu_elementwise.c: th[i] = tanh(x[i]) for i < n <= CPU_TANH_BLOCK (th
 * may be x), computed in double two at a time and rounded once: the
 * float nearest tanh but for rare ties, the same bits on every machine
 * (glibc's tanhf, which it replaces, is 1-2 ulp off for about one input
 * in eleven). Every CPU kernel that takes a tanh takes it here. */
enum { CPU_TANH_BLOCK = 64 };
void cpu_tanh_block(float *th, const float *x, int n);
/* the length of the block from i in a range ending at end */
static inline int cpu_tanh_len(int64_t i, int64_t end) {
    return end - i < CPU_TANH_BLOCK ? (int)(end - i) : CPU_TANH_BLOCK;
}

/* gelu_tanh and its slope at v from th = tanh(CPU_GELU_K (v + 0.044715
 * v^3)): every CPU kernel that applies either computes it here, so the
 * fused and the unfused ops give the same bits. */
#define CPU_GELU_K 0.7978845608028654f /* sqrt(2/pi) */
/* th[j] for v[j], j < n <= CPU_TANH_BLOCK */
static inline void cpu_gelu_th_block(float *th, const float *v, int n) {
    for (int j = 0; j < n; j++) th[j] = CPU_GELU_K * (v[j] + 0.044715f * v[j] * v[j] * v[j]);
    cpu_tanh_block(th, th, n);
}
static inline float cpu_gelu_at(float v, float th) { return 0.5f * v * (1.0f + th); }
static inline float cpu_gelu_slope_at(float v, float th) {
    return 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * CPU_GELU_K * (1.0f + 3.0f * 0.044715f * v * v);
}

/* Below this many multiply-adds, waking the pool costs more than it saves. */
#define CPU_PARALLEL_MIN_WORK 65536

/* cpu_elementwise.c: fn(arg, lo, hi) over ranges that cover [0, n) once
 * each, in order, split over ctx's pool when n times cost (multiply-adds
 * an item, roughly) reaches CPU_PARALLEL_MIN_WORK, else one call on the
 * caller's thread. For kernels whose items (elements, rows) are computed
 * independently: the split changes no bits. Not from inside a pool task. */
typedef void (*CpuRangeFn)(void *arg, int64_t lo, int64_t hi);
void cpu_for_range(const KnCtx *ctx, int64_t n, int64_t cost, CpuRangeFn fn, void *arg);

/* cpu_gemm.c: matmul (out = in W^T) and matmul_dx (out += in W), the
 * dot product in the CPU kinds' order, and the tasks of every build
 * (cpu_gemm_avx2.c's named _avx2, cpu_gemm_avx512.c's _avx512) that the
 * entries hand the pool. */
typedef struct {
    float *out;
    const float *in;
    KnMatrix w;
    int64_t n;
} CpuMatmul;
void cpu_matmul_forward(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n);
void cpu_matmul_backward(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n);
float cpu_dot(const float *a, const float *b, int64_t n);
/* cpu_dot(a, b[j], n) for j < 4, a read once */
void cpu_dot4(const float *a, const float *const b[4], int64_t n, float out[4]);
/* The two in the widest build the CPU runs (GF_CPU_SIMD holds it back as
 * for the matmul): the same sums, so the same bits, from fewer
 * instructions. An op takes them once a call (cpu_dots) and hands them to
 * its tasks. */
typedef struct {
    float (*dot)(const float *a, const float *b, int64_t n);
    void (*dot4)(const float *a, const float *const b[4], int64_t n, float out[4]);
} CpuDots;
CpuDots cpu_dots(void);
float cpu_dot_avx2(const float *a, const float *b, int64_t n);
void cpu_dot4_avx2(const float *a, const float *const b[4], int64_t n, float out[4]);
float cpu_dot_avx512(const float *a, const float *b, int64_t n);
void cpu_dot4_avx512(const float *a, const float *const b[4], int64_t n, float out[4]);
void cpu_matmul_task(void *p, int ith, int nth);
void cpu_matmul_dx_task(void *p, int ith, int nth);
void cpu_matmul_task_avx2(void *p, int ith, int nth);
void cpu_matmul_dx_task_avx2(void *p, int ith, int nth);
void cpu_matmul_task_avx512(void *p, int ith, int nth);
void cpu_matmul_dx_task_avx512(void *p, int ith, int nth);

/* cpu_ops.c, used by the fused kernels */
void cpu_gelu_gate_forward(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                           int64_t ld_u);
void cpu_softcap_forward(const KnCtx *ctx, float *x, size_t n, float cap);

/* cpu_optim.c */
void cpu_adamw_forward(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h);
void cpu_sq_norm_forward(const KnCtx *ctx, double *out, const float *x, size_t n);

/* cpu_sample.c */
void cpu_sample_forward(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                        void *scratch);

/* cpu_loss.c */
void cpu_xent_softcap_forward(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                              float cap, float scale, int grad);

/* cpu_moe.c */
void cpu_moe_route_forward(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                           int64_t n, int E, int K);
void cpu_moe_experts_forward(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef,
                             float *gu, float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down);
void cpu_moe_experts_backward(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                              const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                              KnMatrix down);
void cpu_moe_route_backward(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                            const float *p, const float *expert_scale, int64_t n, int E, int K);

/* cpu_grad.c */
void cpu_rmsnorm_backward(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                          int64_t dim, float eps);
void cpu_gelu_tanh_backward(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n);
void cpu_gelu_gate_backward(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                            size_t n);
void cpu_attention_backward(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                            const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                            int n_kv_heads, int dim, float scale, const KnMask *mask);

/* cpu_elementwise.c */
void cpu_add_forward(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n);
void cpu_mul_forward(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                     int64_t ld_b);
void cpu_scale_forward(const KnCtx *ctx, float *x, size_t n, float s);
void cpu_round_bf16_forward(const KnCtx *ctx, uint16_t *kept, float *x, size_t n);
void cpu_widen_bf16_forward(const KnCtx *ctx, float *y, const uint16_t *x, size_t n);
void cpu_rope_rows_forward(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                           const float *inv_freq, const int32_t *pos, int64_t pos_stride);
void cpu_mul_acc_forward(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                         int64_t ld_y);
void cpu_rows_gather_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cpu_rows_scatter_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cpu_rows_scatter_bf16_forward(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                                   int64_t dim);
void cpu_rows_sum_forward(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
void cpu_embed_rows_add_forward(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n,
                                float *row);
void cpu_clamp_forward(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi);
void cpu_clamp_backward(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                        int accumulate);
void cpu_scale_shift_forward(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s);
void cpu_standardize_forward(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias,
                             const float *scale);
void cpu_embed_rows_forward(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale);

/* cpu_lora.c */
void cpu_lora_rows_shrink_forward(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows,
                                  int64_t n, int64_t in, int max_rank);
void cpu_lora_rows_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows,
                                  int64_t n, int64_t out);
void cpu_lora_shrink_forward(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                             int64_t in, float *dropout_buf);
void cpu_lora_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                             int64_t out);
void cpu_lora_expand_backward(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                              const KnLoraSeg *segs, int n_segs, int64_t out);
void cpu_lora_shrink_backward(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                              const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf);

/* The CPU table (cpu_ops.c): memory entries and ops. */
extern const KnOps CPU_OPS;

/* cpu_memory.c: host memory as the CPU device's memory. */
GfStatus cpu_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err);
void cpu_free(const KnCtx *ctx, KnBuffer *buf);
void cpu_upload(const KnCtx *ctx, void *dst, const void *src, size_t n);
void cpu_download(const KnCtx *ctx, void *dst, const void *src, size_t n);
void cpu_copy(const KnCtx *ctx, void *dst, const void *src, size_t n);
void cpu_memset(const KnCtx *ctx, void *dst, int value, size_t n);
GfStatus cpu_synchronize(const KnCtx *ctx, GfError *err);
int cpu_supports(const KnCtx *ctx, KnOpId op, KnDtype w);

#endif
