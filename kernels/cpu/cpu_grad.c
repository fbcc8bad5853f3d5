/* cpu_grad.c - the CPU backward kernels: the gradients of RMSNorm,
 * tanh-GELU and attention (matmul's input gradient: cpu_gemm.c). Plain loops
 * in float32 (sums of squares in double, as the forward), threaded where the
 * work is large. */
#include <math.h>
#include <string.h>

#include "cpu_impl.h"

/* ---- RMSNorm, GELU ---------------------------------------------------------------- */

/* y = x r w with r = (mean x^2 + eps)^-1/2: dx = r g - r^3 x (g . x) / dim, g = w dy. */
void cpu_rmsnorm_backward(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n, int64_t dim,
                       float eps) {
    (void)ctx;
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * dim, *dyr = dy + r * dim;
        float *dxr = dx + r * dim;
        double ss = 0.0, gx = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            ss += (double)xr[i] * xr[i];
            gx += (double)(w ? w[i] * dyr[i] : dyr[i]) * xr[i];
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        float k = (float)((double)inv * inv * inv * gx / (double)dim);
        for (int64_t i = 0; i < dim; i++) dxr[i] += inv * (w ? w[i] * dyr[i] : dyr[i]) - k * xr[i];
    }
}

void cpu_gelu_tanh_backward(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) dx[i] = dy[i] * cpu_gelu_slope(x[i]);
}

void cpu_gelu_gate_backward(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                            size_t n) {
    (void)ctx;
    for (size_t i = 0; i < n; i++) {
        float gi = g[i], ui = u[i], d = dy[i];
        du[i] = d * cpu_gelu(gi);
        dg[i] = d * ui * cpu_gelu_slope(gi);
    }
}

/* ---- attention -------------------------------------------------------------------- */

typedef struct {
    float *dq, *dk, *dv;
    const float *q, *k, *v, *dout;
    int64_t n_q, q_pos0, n_keys;
    int n_heads, n_kv_heads, dim;
    float scale;
    const KnMask *mask;
} AttnDxTask;

static float dotf(const float *a, const float *b, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* One query of one head: recompute the softmax, then
 * ds_t = p_t (dout . v_t - sum_u p_u dout . v_u). Scores are recomputed in
 * each pass rather than stored, so the kernel needs no memory. */
static void attn_dx_query(const AttnDxTask *t, int64_t i, int h, int kvh) {
    int D = t->dim, KVH = t->n_kv_heads;
    const float *qv = t->q + (i * t->n_heads + h) * D, *go = t->dout + (i * t->n_heads + h) * D;
    float *dq = t->dq + (i * t->n_heads + h) * D;
    int64_t qpos = t->q_pos0 + i;
    memset(dq, 0, (size_t)D * sizeof(float));
    float mx = -INFINITY, sum = 0.0f, pdp = 0.0f;
    for (int64_t k = 0; k < t->n_keys; k++)
        if (cpu_mask_visible(t->mask, qpos, k)) {
            float s = dotf(qv, t->k + (k * KVH + kvh) * D, D) * t->scale;
            if (s > mx) mx = s;
        }
    if (mx == -INFINITY) return;
    for (int64_t k = 0; k < t->n_keys; k++)
        if (cpu_mask_visible(t->mask, qpos, k)) {
            float e = expf(dotf(qv, t->k + (k * KVH + kvh) * D, D) * t->scale - mx);
            sum += e;
            pdp += e * dotf(go, t->v + (k * KVH + kvh) * D, D);
        }
    pdp /= sum;
    for (int64_t k = 0; k < t->n_keys; k++) {
        if (!cpu_mask_visible(t->mask, qpos, k)) continue;
        const float *kv = t->k + (k * KVH + kvh) * D;
        float p = expf(dotf(qv, kv, D) * t->scale - mx) / sum;
        float ds = p * (dotf(go, t->v + (k * KVH + kvh) * D, D) - pdp) * t->scale;
        float *dk = t->dk + (k * KVH + kvh) * D, *dv = t->dv + (k * KVH + kvh) * D;
        for (int d = 0; d < D; d++) {
            dq[d] += ds * kv[d];
            dk[d] += ds * qv[d];
            dv[d] += p * go[d];
        }
    }
}

/* Each thread owns whole KV heads (with their query heads), so dk and dv of
 * a head are written by one thread only. */
static void attn_dx_task(void *arg, int ith, int nth) {
    AttnDxTask *t = arg;
    long lo, hi;
    kn_split((long)t->n_kv_heads, ith, nth, &lo, &hi);
    int group = t->n_heads / t->n_kv_heads;
    for (long kvh = lo; kvh < hi; kvh++)
        for (int h = (int)kvh * group; h < ((int)kvh + 1) * group; h++)
            for (int64_t i = 0; i < t->n_q; i++) attn_dx_query(t, i, h, (int)kvh);
}

void cpu_attention_backward(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                         const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads,
                         int dim, float scale, const KnMask *mask) {
    AttnDxTask t = {dq, dk, dv, q, k, v, dout, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask};
    if (n_q * n_heads * n_keys * dim < CPU_PARALLEL_MIN_WORK || !ctx->pool || n_kv_heads == 1) attn_dx_task(&t, 0, 1);
    else kn_pool_run(ctx->pool, attn_dx_task, &t);
}
