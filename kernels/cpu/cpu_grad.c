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

/* The gradient in three passes over the pool, none of which needs memory
 * beyond the outputs:
 *   1. per (query, head): the softmax's maximum m, its sum l and
 *      pdp = sum_t p_t dout . v_t, kept in the first three floats of the
 *      query's dq row (recomputed instead where dim < 3);
 *   2. per (KV head, key): dk_t += sum ds_t q and dv_t += sum p_t dout over
 *      the queries that see key t, each head of the group in turn, queries
 *      in order, with ds_t = p_t (dout . v_t - pdp) scale;
 *   3. per (query, head): dq = sum_t ds_t k_t, keys in order (the row's
 *      statistics read first).
 * Every output has one owner and sums in a fixed order, so the result does
 * not depend on the threads; scores are cpu_dot's, the forward's bits. */

typedef struct {
    float *dq, *dk, *dv;
    const float *q, *k, *v, *dout;
    int64_t n_q, q_pos0, n_keys;
    int n_heads, n_kv_heads, dim;
    float scale;
    const KnMask *mask;
} AttnDxTask;

typedef struct {
    float m, l, pdp; /* m = -inf: the query sees no key */
} AttnRow;

static inline const float *dx_key(const AttnDxTask *t, const float *base, int64_t k, int kvh) {
    return base + (k * t->n_kv_heads + kvh) * t->dim;
}

static inline int64_t dx_at(const AttnDxTask *t, int64_t i, int h) { return (i * t->n_heads + h) * t->dim; }

static AttnRow attn_dx_row_stats(const AttnDxTask *t, int64_t i, int h) {
    int kvh = h / (t->n_heads / t->n_kv_heads);
    const float *qv = t->q + dx_at(t, i, h), *go = t->dout + dx_at(t, i, h);
    int64_t qpos = t->q_pos0 + i;
    AttnRow r = {-INFINITY, 0.0f, 0.0f};
    for (int64_t k = 0; k < t->n_keys; k++)
        if (cpu_mask_visible(t->mask, qpos, k)) {
            float s = cpu_dot(qv, dx_key(t, t->k, k, kvh), t->dim) * t->scale;
            if (s > r.m) r.m = s;
        }
    if (r.m == -INFINITY) return r;
    for (int64_t k = 0; k < t->n_keys; k++)
        if (cpu_mask_visible(t->mask, qpos, k)) {
            float e = expf(cpu_dot(qv, dx_key(t, t->k, k, kvh), t->dim) * t->scale - r.m);
            r.l += e;
            r.pdp += e * cpu_dot(go, dx_key(t, t->v, k, kvh), t->dim);
        }
    r.pdp /= r.l;
    return r;
}

/* The statistics of pass 1, from the dq row that keeps them. */
static AttnRow attn_dx_row(const AttnDxTask *t, int64_t i, int h) {
    if (t->dim < 3) return attn_dx_row_stats(t, i, h);
    const float *s = t->dq + dx_at(t, i, h);
    return (AttnRow){s[0], s[1], s[2]};
}

/* p_t and ds_t of query i, head h (statistics r) for key t. */
static inline void attn_dx_p(const AttnDxTask *t, AttnRow r, const float *qv, const float *go, int64_t key, int kvh,
                             float *p, float *ds) {
    *p = expf(cpu_dot(qv, dx_key(t, t->k, key, kvh), t->dim) * t->scale - r.m) / r.l;
    *ds = *p * (cpu_dot(go, dx_key(t, t->v, key, kvh), t->dim) - r.pdp) * t->scale;
}

/* Work items of a pass dealt out in turn, so that a causal mask's long and
 * short rows spread over the threads. */
static void attn_dx_stats_task(void *arg, int ith, int nth) {
    const AttnDxTask *t = arg;
    for (int64_t item = ith; item < t->n_q * t->n_heads; item += nth) {
        int64_t i = item / t->n_heads;
        int h = (int)(item % t->n_heads);
        AttnRow r = attn_dx_row_stats(t, i, h);
        float *s = t->dq + dx_at(t, i, h);
        s[0] = r.m;
        s[1] = r.l;
        s[2] = r.pdp;
    }
}

static void attn_dx_kv_task(void *arg, int ith, int nth) {
    const AttnDxTask *t = arg;
    int group = t->n_heads / t->n_kv_heads;
    for (int64_t item = ith; item < t->n_keys * t->n_kv_heads; item += nth) {
        int64_t key = item / t->n_kv_heads;
        int kvh = (int)(item % t->n_kv_heads);
        float *dk = t->dk + (key * t->n_kv_heads + kvh) * t->dim, *dv = t->dv + (key * t->n_kv_heads + kvh) * t->dim;
        for (int h = kvh * group; h < (kvh + 1) * group; h++)
            for (int64_t i = 0; i < t->n_q; i++) {
                if (!cpu_mask_visible(t->mask, t->q_pos0 + i, key)) continue;
                const float *qv = t->q + dx_at(t, i, h), *go = t->dout + dx_at(t, i, h);
                float p, ds;
                attn_dx_p(t, attn_dx_row(t, i, h), qv, go, key, kvh, &p, &ds);
                cpu_axpy(dk, ds, qv, t->dim);
                cpu_axpy(dv, p, go, t->dim);
            }
    }
}

static void attn_dx_q_task(void *arg, int ith, int nth) {
    const AttnDxTask *t = arg;
    for (int64_t item = ith; item < t->n_q * t->n_heads; item += nth) {
        int64_t i = item / t->n_heads, qpos = t->q_pos0 + i;
        int h = (int)(item % t->n_heads), kvh = h / (t->n_heads / t->n_kv_heads);
        AttnRow r = attn_dx_row(t, i, h);
        const float *qv = t->q + dx_at(t, i, h), *go = t->dout + dx_at(t, i, h);
        float *dq = t->dq + dx_at(t, i, h);
        memset(dq, 0, (size_t)t->dim * sizeof(float));
        if (r.m == -INFINITY) continue;
        for (int64_t key = 0; key < t->n_keys; key++) {
            if (!cpu_mask_visible(t->mask, qpos, key)) continue;
            float p, ds;
            attn_dx_p(t, r, qv, go, key, kvh, &p, &ds);
            cpu_axpy(dq, ds, dx_key(t, t->k, key, kvh), t->dim);
        }
    }
}

void cpu_attention_backward(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                         const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads,
                         int dim, float scale, const KnMask *mask) {
    AttnDxTask t = {dq, dk, dv, q, k, v, dout, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask};
    KnTask pass[3] = {attn_dx_stats_task, attn_dx_kv_task, attn_dx_q_task};
    int alone = n_q * n_heads * n_keys * dim < CPU_PARALLEL_MIN_WORK || !ctx->pool;
    for (int s = t.dim < 3; s < 3; s++) {
        if (alone) pass[s](&t, 0, 1);
        else kn_pool_run(ctx->pool, pass[s], &t);
    }
}
