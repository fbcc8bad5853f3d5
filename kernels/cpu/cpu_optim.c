/* cpu_optim.c - the optimizer's kernels over one slab of parameters:
 * torch's AdamW update and the squared L2 norm (summed in double, in
 * order, as torch's clip_grad_norm_ reference computes it here). */
#include <math.h>

#include "cpu_impl.h"

void cpu_adamw_forward(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        p[i] *= h->decay;
        m[i] += (g[i] - m[i]) * (1.0f - h->beta1); /* torch: m.lerp_(g, 1 - beta1) */
        v[i] = v[i] * h->beta2 + (1.0f - h->beta2) * g[i] * g[i];
        float denom = sqrtf(v[i]) / h->bc2_sqrt + h->eps;
        p[i] -= h->step_size * m[i] / denom;
    }
}

void cpu_sq_norm_forward(const KnCtx *ctx, double *out, const float *x, size_t n) {
    (void)ctx;
    double ss = 0.0;
    for (size_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    *out = ss;
}
