/* cpu_grad.h - the CPU backward kernels, entries of the CPU KnOps table
 * (contracts in ops.h). Private to the CPU backend. */
#ifndef GF_CPU_GRAD_H
#define GF_CPU_GRAD_H

#include "../ops.h"

void kn_cpu_matmul_dx(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n);
void kn_cpu_rmsnorm_dx(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n, int64_t dim,
                       float eps);
void kn_cpu_gelu_tanh_dx(float *dx, const float *x, const float *dy, size_t n);
void kn_cpu_attention_dx(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                         const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads,
                         int dim, float scale, const KnMask *mask);

#endif
