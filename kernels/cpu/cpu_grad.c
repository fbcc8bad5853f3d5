/* cpu_grad.c - the CPU backward kernels: the gradients of RMSNorm,
 * tanh-GELU and attention (matmul's input gradient: cpu_gemm.c). Plain loops
 * in float32 (sums of squares in double, as the forward), threaded where the
 * work is large. */
#include <math.h>
#include <string.h>

#include "cpu_impl.h"

/* ---- RMSNorm, GELU ---------------------------------------------------------------- */

typedef struct {
    float *dx, *du;
    const float *x, *w, *dy, *u;
    int64_t dim;
    float eps;
} GradArgs;

/* y = x r w with r = (mean x^2 + eps)^-1/2: dx = r g - r^3 x (g . x) / dim, g = w dy. */
static void rmsnorm_dx_span(void *p, int64_t lo, int64_t hi) {
    const GradArgs *a = p;
    const float *w = a->w;
    int64_t dim = a->dim;
    for (int64_t r = lo; r < hi; r++) {
        const float *xr = a->x + r * dim, *dyr = a->dy + r * dim;
        float *dxr = a->dx + r * dim;
        double ss = 0.0, gx = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            ss += (double)xr[i] * xr[i];
            gx += (double)(w ? w[i] * dyr[i] : dyr[i]) * xr[i];
        }
        float inv = 1.0f / sqrtf((float)(ss / (double)dim) + a->eps);
        float k = (float)((double)inv * inv * inv * gx / (double)dim);
        for (int64_t i = 0; i < dim; i++) dxr[i] += inv * (w ? w[i] * dyr[i] : dyr[i]) - k * xr[i];
    }
}

void cpu_rmsnorm_backward(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n, int64_t dim,
                       float eps) {
    GradArgs a = {.dx = dx, .x = x, .w = w, .dy = dy, .dim = dim, .eps = eps};
    cpu_for_range(ctx, n, 5 * dim, rmsnorm_dx_span, &a);
}

/* The cost of an element of the GELU gradients in multiply-adds, roughly. */
enum { GELU_DX_COST = 24 };

static void gelu_dx_span(void *p, int64_t lo, int64_t hi) {
    const GradArgs *a = p;
    float th[CPU_TANH_BLOCK];
    for (int64_t i = lo; i < hi; i += CPU_TANH_BLOCK) {
        int m = cpu_tanh_len(i, hi);
        cpu_gelu_th_block(th, a->x + i, m);
        for (int j = 0; j < m; j++) a->dx[i + j] = a->dy[i + j] * cpu_gelu_slope_at(a->x[i + j], th[j]);
    }
}

void cpu_gelu_tanh_backward(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n) {
    GradArgs a = {.dx = dx, .x = x, .dy = dy};
    cpu_for_range(ctx, (int64_t)n, GELU_DX_COST, gelu_dx_span, &a);
}

/* dg in dx, from the gate g in x, one tanh an element for both; elements
 * may be written over their own inputs (each is read before it is written) */
static void gelu_gate_dx_span(void *p, int64_t lo, int64_t hi) {
    const GradArgs *a = p;
    float th[CPU_TANH_BLOCK];
    for (int64_t i = lo; i < hi; i += CPU_TANH_BLOCK) {
        int m = cpu_tanh_len(i, hi);
        cpu_gelu_th_block(th, a->x + i, m);
        for (int j = 0; j < m; j++) {
            float gi = a->x[i + j], ui = a->u[i + j], d = a->dy[i + j];
            a->du[i + j] = d * cpu_gelu_at(gi, th[j]);
            a->dx[i + j] = d * ui * cpu_gelu_slope_at(gi, th[j]);
        }
    }
}

void cpu_gelu_gate_backward(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                            size_t n) {
    GradArgs a = {.dx = dg, .du = du, .x = g, .dy = dy, .u = u};
    cpu_for_range(ctx, (int64_t)n, GELU_DX_COST + 8, gelu_gate_dx_span, &a);
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
    CpuDots dots;
} AttnDxTask;

typedef struct {
    float m, l, pdp; /* m = -inf: the query sees no key */
} AttnRow;

/* Where the row of query i, head h starts in q, dout and dq; and that of
 * key k, KV head kvh in k, v, dk and dv. */
static inline int64_t dx_at(const AttnDxTask *t, int64_t i, int h) { return (i * t->n_heads + h) * t->dim; }
static inline int64_t kv_at(const AttnDxTask *t, int64_t k, int kvh) { return (k * t->n_kv_heads + kvh) * t->dim; }

/* Up to four of the keys from *k on that query position qpos sees, in
 * order, into keys[]; *k moves past them. 0: none left. */
static int next_keys(const AttnDxTask *t, int64_t qpos, int64_t *k, int64_t keys[4]) {
    int m = 0;
    for (; *k < t->n_keys && m < 4; (*k)++)
        if (cpu_mask_visible(t->mask, qpos, *k)) keys[m++] = *k;
    return m;
}

/* Up to four of the queries from *i that see key `key`, likewise. */
static int next_queries(const AttnDxTask *t, int64_t key, int64_t *i, int64_t queries[4]) {
    int m = 0;
    for (; *i < t->n_q && m < 4; (*i)++)
        if (cpu_mask_visible(t->mask, t->q_pos0 + *i, key)) queries[m++] = *i;
    return m;
}

/* cpu_dot(a, b[j], dim) for j < m: four at once when there are four (the
 * same sums, with four independent chains of additions). */
static inline void dots(const AttnDxTask *t, const float *a, const float *const b[4], int m, float out[4]) {
    if (m == 4) t->dots.dot4(a, b, t->dim, out);
    else
        for (int j = 0; j < m; j++) out[j] = t->dots.dot(a, b[j], t->dim);
}

/* Scores (times scale) of query row qv against keys[0..m) of KV head kvh,
 * and, with go, the products go . v of the same keys. */
static void key_dots(const AttnDxTask *t, const float *qv, const float *go, const int64_t keys[4], int m, int kvh,
                     float s[4], float gv[4]) {
    const float *b[4] = {NULL, NULL, NULL, NULL};
    for (int j = 0; j < m; j++) b[j] = t->k + kv_at(t, keys[j], kvh);
    dots(t, qv, b, m, s);
    for (int j = 0; j < m; j++) s[j] *= t->scale;
    if (!go) return;
    for (int j = 0; j < m; j++) b[j] = t->v + kv_at(t, keys[j], kvh);
    dots(t, go, b, m, gv);
}

static AttnRow attn_dx_row_stats(const AttnDxTask *t, int64_t i, int h) {
    int kvh = h / (t->n_heads / t->n_kv_heads);
    const float *qv = t->q + dx_at(t, i, h), *go = t->dout + dx_at(t, i, h);
    int64_t qpos = t->q_pos0 + i, keys[4];
    float s[4], gv[4];
    AttnRow r = {-INFINITY, 0.0f, 0.0f};
    int m;
    for (int64_t k = 0; (m = next_keys(t, qpos, &k, keys)) > 0;) {
        key_dots(t, qv, NULL, keys, m, kvh, s, NULL);
        for (int j = 0; j < m; j++)
            if (s[j] > r.m) r.m = s[j];
    }
    if (r.m == -INFINITY) return r;
    for (int64_t k = 0; (m = next_keys(t, qpos, &k, keys)) > 0;) {
        key_dots(t, qv, go, keys, m, kvh, s, gv);
        for (int j = 0; j < m; j++) {
            float e = expf(s[j] - r.m);
            r.l += e;
            r.pdp += e * gv[j];
        }
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

/* p and ds of a key for a query of statistics r, from its score s and
 * go . v: p = exp(s - m) / l, ds = p (go . v - pdp) scale. */
static inline void attn_dx_p(const AttnDxTask *t, AttnRow r, float s, float gv, float *p, float *ds) {
    *p = expf(s - r.m) / r.l;
    *ds = *p * (gv - r.pdp) * t->scale;
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
        int64_t key = item / t->n_kv_heads, queries[4];
        int kvh = (int)(item % t->n_kv_heads), m;
        const float *kr = t->k + kv_at(t, key, kvh), *vr = t->v + kv_at(t, key, kvh);
        float *dk = t->dk + kv_at(t, key, kvh), *dv = t->dv + kv_at(t, key, kvh);
        for (int h = kvh * group; h < (kvh + 1) * group; h++)
            for (int64_t i = 0; (m = next_queries(t, key, &i, queries)) > 0;) {
                const float *qv[4] = {NULL, NULL, NULL, NULL}, *go[4] = {NULL, NULL, NULL, NULL};
                float s[4], gv[4];
                for (int j = 0; j < m; j++) {
                    qv[j] = t->q + dx_at(t, queries[j], h);
                    go[j] = t->dout + dx_at(t, queries[j], h);
                }
                dots(t, kr, qv, m, s); /* k . q: the products of q . k, the same sums */
                dots(t, vr, go, m, gv);
                for (int j = 0; j < m; j++) {
                    float p, ds;
                    attn_dx_p(t, attn_dx_row(t, queries[j], h), s[j] * t->scale, gv[j], &p, &ds);
                    cpu_axpy(dk, ds, qv[j], t->dim);
                    cpu_axpy(dv, p, go[j], t->dim);
                }
            }
    }
}

static void attn_dx_q_task(void *arg, int ith, int nth) {
    const AttnDxTask *t = arg;
    for (int64_t item = ith; item < t->n_q * t->n_heads; item += nth) {
        int64_t i = item / t->n_heads, qpos = t->q_pos0 + i, keys[4];
        int h = (int)(item % t->n_heads), kvh = h / (t->n_heads / t->n_kv_heads), m;
        AttnRow r = attn_dx_row(t, i, h);
        const float *qv = t->q + dx_at(t, i, h), *go = t->dout + dx_at(t, i, h);
        float *dq = t->dq + dx_at(t, i, h);
        memset(dq, 0, (size_t)t->dim * sizeof(float));
        if (r.m == -INFINITY) continue;
        for (int64_t k = 0; (m = next_keys(t, qpos, &k, keys)) > 0;) {
            float s[4], gv[4];
            key_dots(t, qv, go, keys, m, kvh, s, gv);
            for (int j = 0; j < m; j++) {
                float p, ds;
                attn_dx_p(t, r, s[j], gv[j], &p, &ds);
                cpu_axpy(dq, ds, t->k + kv_at(t, keys[j], kvh), t->dim);
            }
        }
    }
}

void cpu_attention_backward(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
                         const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads,
                         int dim, float scale, const KnMask *mask) {
    AttnDxTask t = {dq, dk, dv, q, k, v, dout, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask, cpu_dots()};
    KnTask pass[3] = {attn_dx_stats_task, attn_dx_kv_task, attn_dx_q_task};
    int alone = n_q * n_heads * n_keys * dim < CPU_PARALLEL_MIN_WORK || !ctx->pool;
    for (int s = t.dim < 3; s < 3; s++) {
        if (alone) pass[s](&t, 0, 1);
        else kn_pool_run(ctx->pool, pass[s], &t);
    }
}
