/* cpu_grad.c - the CPU backward kernels: the gradients of matmul (input
 * side; weights are frozen), RMSNorm, tanh-GELU and attention. Plain loops
 * in float32 (sums of squares in double, as the forward), threaded where the
 * work is large. */
#include <math.h>
#include <string.h>

#include "cpu_impl.h"


/* ---- matmul ----------------------------------------------------------------- */

typedef struct {
    float *dx;
    const float *dy;
    KnMatrix w;
    int64_t n;
} MatmulDxTask;

/* d[0..n) += g x[0..n), in blocks of 8 the compiler vectorizes (restrict:
 * d and x never overlap). */
static void axpy(float *restrict d, const float *restrict x, float g, int64_t n) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) d[c + k] += g * x[c + k];
    for (; c < n; c++) d[c] += g * x[c];
}

enum { DX_CHUNK = 512, DX_TOKENS = 32, DX_ROWS = 4 };

/* d[0..n) += g[k] w[k][0..n) for the k in order whose g is not 0, in one
 * pass over d: each element takes the same additions, in the same order,
 * as axpy row after row would give it. */
static void axpy_rows(float *restrict d, const float *const w[DX_ROWS], const float g[DX_ROWS], int nb, int64_t n) {
    const float *wk[DX_ROWS];
    float gk[DX_ROWS];
    int m = 0;
    for (int k = 0; k < nb; k++)
        if (g[k] != 0.0f) {
            wk[m] = w[k];
            gk[m++] = g[k];
        }
    if (m <= 1) {
        if (m == 1) axpy(d, wk[0], gk[0], n);
        return;
    }
    int64_t c = 0;
    for (; c + 4 <= n; c += 4) {
        V4 v = cpu_load4(d + c);
        for (int k = 0; k < m; k++) v += gk[k] * cpu_load4(wk[k] + c);
        cpu_store4(d + c, v);
    }
    for (; c < n; c++) {
        float v = d[c];
        for (int k = 0; k < m; k++) v += gk[k] * wk[k][c];
        d[c] = v;
    }
}

/* Each thread owns a range of input features (columns of W), so no two
 * threads write the same dx element. The range is cut in chunks of
 * DX_CHUNK columns and the tokens in blocks of DX_TOKENS, so the block of
 * dx being accumulated stays in cache while the rows of W pass over it,
 * DX_ROWS rows at a time (each dx element read and written once for them);
 * each dx element still sums over the rows of W in order. */
static void matmul_dx_task(void *p, int ith, int nth) {
    MatmulDxTask *t = p;
    long lo, hi;
    kn_split((long)t->w.cols, ith, nth, &lo, &hi);
    float row[DX_ROWS][DX_CHUNK];
    const float *const rows[DX_ROWS] = {row[0], row[1], row[2], row[3]};
    for (long c0 = lo; c0 < hi; c0 += DX_CHUNK) {
        int64_t len = hi - c0 < DX_CHUNK ? hi - c0 : DX_CHUNK;
        for (int64_t i0 = 0; i0 < t->n; i0 += DX_TOKENS) {
            int64_t i1 = i0 + DX_TOKENS < t->n ? i0 + DX_TOKENS : t->n;
            for (int64_t o = 0; o < t->w.rows; o += DX_ROWS) {
                int nb = t->w.rows - o < DX_ROWS ? (int)(t->w.rows - o) : DX_ROWS;
                for (int k = 0; k < nb; k++) cpu_load_span(row[k], t->w, o + k, c0, len);
                for (int64_t i = i0; i < i1; i++) {
                    float g[DX_ROWS];
                    for (int k = 0; k < nb; k++) g[k] = t->dy[i * t->w.rows + o + k];
                    axpy_rows(t->dx + i * t->w.cols + c0, rows, g, nb, len);
                }
            }
        }
    }
}

void cpu_matmul_backward(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n) {
    MatmulDxTask t = {dx, dy, w, n};
    if (w.rows * w.cols * n < CPU_PARALLEL_MIN_WORK || !ctx->pool) matmul_dx_task(&t, 0, 1);
    else kn_pool_run(ctx->pool, matmul_dx_task, &t);
}

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
