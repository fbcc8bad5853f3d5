/* ops.h - the math of the engine behind one table, KnOps, so that a CUDA
 * backend can plug in beside the CPU reference (ggml_backend_i style).
 *
 * Conventions: activations are float32, row-major, with shapes in the
 * comments; weights are KnMatrix views [rows = out, cols = in] in F32, BF16
 * or F16 that may point straight into a mapped checkpoint (never written).
 * A linear layer is y = x W^T. Kernels know nothing of Gemma: head counts,
 * windows and masks arrive as plain numbers and arrays.
 *
 * Threading: every op may be called only by the thread that owns the KnCtx
 * (the engine thread); ops split their work over ctx->pool internally. No op
 * allocates except cpu_matmul's per-call row buffers on the stack of each
 * worker (bounded by cols).
 */
#ifndef GF_OPS_H
#define GF_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels.h"
#include "pool.h"

typedef enum { KN_F32 = 0, KN_BF16, KN_F16, KN_NF4 } KnDtype;

typedef struct {
    const void *data;         /* the elements; for KN_NF4 a const KnNf4 * (nf4.h) */
    KnDtype dtype;
    int64_t rows, cols;       /* [out, in] */
    int64_t offset;           /* KN_NF4 only: index of element (0, 0) in the quantized tensor */
} KnMatrix;

/* Rows [row0, row0 + rows) of w, e.g. one expert of a stacked tensor. */
static inline KnMatrix kn_matrix_rows(KnMatrix w, int64_t row0, int64_t rows) {
    KnMatrix m = w;
    m.rows = rows;
    if (w.dtype == KN_NF4) m.offset += row0 * w.cols;
    else m.data = (const char *)w.data + (size_t)(row0 * w.cols) * (w.dtype == KN_F32 ? 4u : 2u);
    return m;
}

/* len elements of row r of w from column c0, widened to float32. */
void kn_load_span(float *out, KnMatrix w, int64_t r, int64_t c0, int64_t len);

typedef struct {
    KnDeviceKind device;
    KnPool *pool;             /* CPU threads (NULL: single thread) */
} KnCtx;

/* Attention masks are described, not materialized: key t is visible to the
 * query at absolute position q when valid[t] and
 *   (t <= q or (group[q] >= 0 and group[q] == group[t]))   -- causal, or same block
 *   and (window == 0 or t > q - window).                     -- sliding window
 * group may be NULL (no blocks). */
typedef struct {
    const uint8_t *valid;     /* [n_keys] 1 = real key */
    const int32_t *group;     /* [n_keys] block id or -1, or NULL */
    int window;               /* 0 = unlimited */
} KnMask;

static inline int kn_mask_visible(const KnMask *m, int64_t q, int64_t t) {
    if (!m->valid[t]) return 0;
    int causal = t <= q || (m->group && m->group[q] >= 0 && m->group[q] == m->group[t]);
    return causal && (m->window == 0 || t > q - m->window);
}

/* Keys and values stored in blocks (a paged KV cache): position t of a
 * sequence lives in block table[t / block_len], row t % block_len, of
 * stores k, v [n_blocks * block_len, n_kv_heads, dim]. */
typedef struct {
    const float *k, *v;
    const int32_t *table;     /* [ceil(n_keys / block_len)] block ids */
    int64_t block_len;        /* positions per block, >= 1 */
} KnKv;

typedef struct {
    /* y[n, rows] = x[n, cols] W^T */
    void (*matmul)(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n);
    /* y[n, dim] = x / rms(x) * (w ? w : 1), eps inside the root; y may alias x */
    void (*rmsnorm)(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps);
    /* in place on x[n_heads, dim] at one position: half-split rotation with
     * inverse frequencies inv_freq[dim/2] (zeros pass through) */
    void (*rope)(float *x, int n_heads, int dim, const float *inv_freq, int64_t pos);
    /* out[n_q, n_heads, dim]: q[n_q, n_heads, dim] at absolute positions
     * q_pos0.., k/v[n_keys, n_kv_heads, dim]; scale multiplies q.k */
    void (*attention)(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                      int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                      const KnMask *mask);
    /* the same over a paged store (KnKv); the same sums in the same order,
     * so the result equals attention over the keys laid out contiguously */
    void (*attention_paged)(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                            int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask);
    void (*gelu_tanh)(float *x, size_t n);
    /* x = cap * tanh(x / cap) */
    void (*softcap)(float *x, size_t n, float cap);
    /* out[dim] = row r of an embedding matrix, times scale */
    void (*embed_row)(float *out, KnMatrix table, int64_t row, float scale);

    /* ---- backward (training): d-outputs are accumulated (+=) unless said ---- */
    /* dx[n, cols] += dy[n, rows] W: the input gradient of y = x W^T */
    void (*matmul_dx)(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n);
    /* dx += the input gradient of rmsnorm (w may be NULL) at x for dy */
    void (*rmsnorm_dx)(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                       int64_t dim, float eps);
    /* dx[i] = dy[i] * gelu_tanh'(x[i]) (written, not accumulated) */
    void (*gelu_tanh_dx)(float *dx, const float *x, const float *dy, size_t n);
    /* dq written; dk, dv accumulated: the gradients of attention (same
     * arguments as attention) for dout[n_q, n_heads, dim] */
    void (*attention_dx)(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                         const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                         int n_kv_heads, int dim, float scale, const KnMask *mask);
} KnOps;


/* The CPU reference backend (always available). */
const KnOps *kn_cpu_ops(void);

/* Scalar conversions used by loaders and tests. */
float kn_bf16_to_f32(uint16_t h);
uint16_t kn_f32_to_bf16(float f);   /* round to nearest even */
float kn_f16_to_f32(uint16_t h);

#endif
