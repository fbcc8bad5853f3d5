/* cpu_guarded_ops.c - the guarded backend's ops and its table: each op a
 * call (cpu_guarded.h) whose exec translates every device pointer to the
 * kernels' view (guard_hv, which aborts on host memory) and runs the CPU
 * kernel. Host memory an op reads (segments, masks, a paged store's
 * header, an NF4 header, AdamW's scalars) is kept with the call
 * (guard_keep), so that a recorded call runs later on what it was handed. */
#include <stdlib.h>
#include <string.h>

#include "../kernels_impl.h"
#include "../nf4.h"
#include "cpu_guarded.h"
#include "cpu_impl.h"

#define H(p) guard_hv(ctx, p)
/* Submits the call exec on the args struct a. */
#define SUBMIT(exec, a) guard_submit(ctx, exec, &(a), sizeof(a))
/* Reports a call of a scratch-taking entry to the region's watcher. */
#define CALLED(...) guard_called(ctx, &(KnCall){__VA_ARGS__})

/* w in the kernels' view; an NF4 matrix points at a host KnNf4 whose
 * arrays are device memory, translated into *q. */
static KnMatrix hm(const KnCtx *ctx, KnMatrix w, KnNf4 *q) {
    if (w.dtype != KN_NF4) {
        w.data = H(w.data);
        return w;
    }
    *q = *(const KnNf4 *)w.data;
    q->codes = H(q->codes);
    q->absmax_q = H(q->absmax_q);
    q->group_scale = H(q->group_scale);
    w.data = q;
    return w;
}
/* the KnNf4 lives until the end of the calling function's block */
#define HM(w) hm(ctx, (w), &(KnNf4){0})

/* w as a call keeps it: an NF4 header copied while recording. */
static KnMatrix kept_matrix(const KnCtx *ctx, KnMatrix w) {
    if (w.dtype == KN_NF4) w.data = guard_keep(ctx, w.data, sizeof(KnNf4));
    return w;
}

static KnMask hmask(const KnCtx *ctx, const KnMask *m) {
    return (KnMask){H(m->valid), H(m->group), m->window};
}

#define MAX_SEGS 1024
/* The segments with their matrices in the kernels' view, into out. */
static const KnLoraSeg *hsegs(const KnCtx *ctx, const KnLoraSeg *segs, int n, KnLoraSeg *out) {
    if (n > MAX_SEGS) abort();
    for (int i = 0; i < n; i++) {
        out[i] = segs[i];
        out[i].A = H(segs[i].A);
        out[i].B = H(segs[i].B);
        out[i].dA = H(segs[i].dA);
        out[i].dB = H(segs[i].dB);
    }
    return out;
}

static const KnLoraSeg *kept_segs(const KnCtx *ctx, const KnLoraSeg *segs, int n) {
    return guard_keep(ctx, segs, n > 0 ? (size_t)n * sizeof *segs : 0);
}

/* ---- transfers on the stream ---- */

typedef struct {
    void *dst;
    const void *src;
    size_t n;
} CopyArgs;
static void x_copy(const KnCtx *ctx, const void *p) {
    const CopyArgs *a = p;
    memmove(guard_owned(ctx, a->dst, a->n), guard_owned(ctx, a->src, a->n), a->n);
}
static void g_copy(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    CopyArgs a = {dst, src, n};
    if (n) SUBMIT(x_copy, a);
}

typedef struct {
    void *dst;
    int value;
    size_t n;
} MemsetArgs;
static void x_memset(const KnCtx *ctx, const void *p) {
    const MemsetArgs *a = p;
    memset(guard_owned(ctx, a->dst, a->n), a->value, a->n);
}
static void g_memset(const KnCtx *ctx, void *dst, int value, size_t n) {
    MemsetArgs a = {dst, value, n};
    if (n) SUBMIT(x_memset, a);
}

/* ---- forward ---- */

typedef struct {
    float *y;
    const float *x;
    KnMatrix w;
    int64_t n;
} MatmulArgs;
static void x_matmul(const KnCtx *ctx, const void *p) {
    const MatmulArgs *a = p;
    CPU_OPS.matmul(ctx, H(a->y), H(a->x), HM(a->w), a->n);
}
static void g_matmul(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n) {
    MatmulArgs a = {y, x, kept_matrix(ctx, w), n};
    CALLED(.op = KN_OP_MATMUL, .w = w, .n = n);
    SUBMIT(x_matmul, a);
}

/* rmsnorm, and rmsnorm_add with r and s */
typedef struct {
    float *y;
    const float *x, *w, *r;
    int64_t n, dim;
    float eps, s;
} RmsnormArgs;
static void x_rmsnorm(const KnCtx *ctx, const void *p) {
    const RmsnormArgs *a = p;
    CPU_OPS.rmsnorm(ctx, H(a->y), H(a->x), H(a->w), a->n, a->dim, a->eps);
}
static void g_rmsnorm(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps) {
    RmsnormArgs a = {y, x, w, NULL, n, dim, eps, 1.0f};
    SUBMIT(x_rmsnorm, a);
}
static void x_rmsnorm_add(const KnCtx *ctx, const void *p) {
    const RmsnormArgs *a = p;
    CPU_OPS.rmsnorm_add(ctx, H(a->y), H(a->r), H(a->x), H(a->w), a->n, a->dim, a->eps, a->s);
}
static void g_rmsnorm_add(const KnCtx *ctx, float *y, const float *r, const float *x, const float *w, int64_t n,
                          int64_t dim, float eps, float s) {
    RmsnormArgs a = {y, x, w, r, n, dim, eps, s};
    SUBMIT(x_rmsnorm_add, a);
}

/* attention and attention_dx: dq, dk, dv only for the backward */
typedef struct {
    float *out, *dq, *dk, *dv;
    const float *q, *k, *v, *dout;
    const KnKv *kv;
    int64_t n_q, q_pos0, n_keys;
    int n_heads, n_kv_heads, dim;
    float scale;
    const KnMask *mask;
} AttentionArgs;
static void x_attention(const KnCtx *ctx, const void *p) {
    const AttentionArgs *a = p;
    KnMask m = hmask(ctx, a->mask);
    CPU_OPS.attention(ctx, H(a->out), H(a->q), H(a->k), H(a->v), a->n_q, a->q_pos0, a->n_keys, a->n_heads,
                      a->n_kv_heads, a->dim, a->scale, &m);
}
static void g_attention(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                        int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                        const KnMask *mask) {
    AttentionArgs a = {.out = out, .q = q, .k = k, .v = v, .n_q = n_q, .q_pos0 = q_pos0, .n_keys = n_keys,
                       .n_heads = n_heads, .n_kv_heads = n_kv_heads, .dim = dim, .scale = scale,
                       .mask = guard_keep(ctx, mask, sizeof *mask)};
    SUBMIT(x_attention, a);
}
/* Reports an attention call that takes attention_dx's scratch on a GPU:
 * rows the larger of its queries and keys. */
static void attention_called(const KnCtx *ctx, int64_t n_q, int64_t n_keys, int n_heads, int dim) {
    CALLED(.op = KN_OP_ATTENTION_DX, .n = n_q > n_keys ? n_q : n_keys, .n_heads = n_heads, .dim = dim);
}
/* attention_bulk: attention's kernel; its scratch, on a GPU, attention_dx's */
static void g_attention_bulk(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                             int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                             const KnMask *mask) {
    attention_called(ctx, n_q, n_keys, n_heads, dim);
    g_attention(ctx, out, q, k, v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask);
}
static void x_attention_paged(const KnCtx *ctx, const void *p) {
    const AttentionArgs *a = p;
    KnMask m = hmask(ctx, a->mask);
    KnKv h = {H(a->kv->k), H(a->kv->v), H(a->kv->table), a->kv->block_len};
    CPU_OPS.attention_paged(ctx, H(a->out), H(a->q), &h, a->n_q, a->q_pos0, a->n_keys, a->n_heads, a->n_kv_heads,
                            a->dim, a->scale, &m);
}
static void g_attention_paged(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                              int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask) {
    AttentionArgs a = {.out = out, .q = q, .kv = guard_keep(ctx, kv, sizeof *kv), .n_q = n_q, .q_pos0 = q_pos0,
                       .n_keys = n_keys, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .dim = dim, .scale = scale,
                       .mask = guard_keep(ctx, mask, sizeof *mask)};
    SUBMIT(x_attention_paged, a);
}
static void x_attention_dx(const KnCtx *ctx, const void *p) {
    const AttentionArgs *a = p;
    KnMask m = hmask(ctx, a->mask);
    CPU_OPS.attention_dx(ctx, H(a->dq), H(a->dk), H(a->dv), H(a->q), H(a->k), H(a->v), H(a->dout), a->n_q, a->q_pos0,
                         a->n_keys, a->n_heads, a->n_kv_heads, a->dim, a->scale, &m);
}
static void g_attention_dx(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                           const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                           int n_kv_heads, int dim, float scale, const KnMask *mask) {
    AttentionArgs a = {.dq = dq, .dk = dk, .dv = dv, .q = q, .k = k, .v = v, .dout = dout, .n_q = n_q,
                       .q_pos0 = q_pos0, .n_keys = n_keys, .n_heads = n_heads, .n_kv_heads = n_kv_heads, .dim = dim,
                       .scale = scale, .mask = guard_keep(ctx, mask, sizeof *mask)};
    attention_called(ctx, n_q, n_keys, n_heads, dim);
    SUBMIT(x_attention_dx, a);
}

typedef struct {
    float *out;
    const float *q;
    const void *k, *v;
    KnDtype kv;
    const int32_t *pos;
    int64_t block_len;
    const KnAttnSeq *seqs;
    int n_seqs, n_heads, n_kv_heads, dim;
    float scale;
    int window;
} AttentionBatchArgs;
static void x_attention_batch(const KnCtx *ctx, const void *p) {
    const AttentionBatchArgs *a = p;
    KnAttnSeq h[MAX_SEGS];
    if (a->n_seqs > MAX_SEGS) abort();
    for (int i = 0; i < a->n_seqs; i++) {
        h[i] = a->seqs[i];
        h[i].table = H(a->seqs[i].table);
        h[i].valid = H(a->seqs[i].valid);
        h[i].group = H(a->seqs[i].group);
    }
    CPU_OPS.attention_batch(ctx, H(a->out), H(a->q), H(a->pos), H(a->k), H(a->v), a->kv, a->block_len, h, a->n_seqs,
                            a->n_heads, a->n_kv_heads, a->dim, a->scale, a->window);
}
static void g_attention_batch(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                              const void *v, KnDtype kv, int64_t block_len, const KnAttnSeq *seqs, int n_seqs,
                              int n_heads, int n_kv_heads, int dim, float scale, int window) {
    AttentionBatchArgs a = {out, q, k, v, kv, pos, block_len,
                            guard_keep(ctx, seqs, n_seqs > 0 ? (size_t)n_seqs * sizeof *seqs : 0),
                            n_seqs, n_heads, n_kv_heads, dim, scale, window};
    SUBMIT(x_attention_batch, a);
}

/* The n descriptors at device address rows, read now (a replay reads the
 * table's contents of then) with their arrays in the kernels' view, into
 * a copy the caller frees. */
static KnAttnRow *attn_rows_now(const KnCtx *ctx, const KnAttnRow *rows, int64_t n) {
    const KnAttnRow *d = guard_owned(ctx, rows, (size_t)n * sizeof *d);
    KnAttnRow *h = malloc((size_t)n * sizeof *h);
    if (!h) abort();
    for (int64_t i = 0; i < n; i++) h[i] = (KnAttnRow){H(d[i].table), H(d[i].valid), H(d[i].group)};
    return h;
}

static KnLoraRow *lora_rows_now(const KnCtx *ctx, const KnLoraRow *rows, int64_t n) {
    const KnLoraRow *d = guard_owned(ctx, rows, (size_t)n * sizeof *d);
    KnLoraRow *h = malloc((size_t)n * sizeof *h);
    if (!h) abort();
    for (int64_t i = 0; i < n; i++) h[i] = (KnLoraRow){H(d[i].A), H(d[i].B), d[i].rank, d[i].scale};
    return h;
}

typedef struct {
    float *out;
    const float *q;
    const void *k, *v;
    KnDtype kv;
    const int32_t *pos;
    int64_t block_len, n;
    const KnAttnRow *rows;
    int n_heads, n_kv_heads, dim;
    float scale;
    int window;
} AttentionRowsArgs;
static void x_attention_rows(const KnCtx *ctx, const void *p) {
    const AttentionRowsArgs *a = p;
    if (a->n <= 0) return;
    KnAttnRow *h = attn_rows_now(ctx, a->rows, a->n);
    CPU_OPS.attention_rows(ctx, H(a->out), H(a->q), H(a->pos), H(a->k), H(a->v), a->kv, a->block_len, h, a->n,
                           a->n_heads, a->n_kv_heads, a->dim, a->scale, a->window);
    free(h);
}
static void g_attention_rows(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                             const void *v, KnDtype kv, int64_t block_len, const KnAttnRow *rows, int64_t n, int n_heads,
                             int n_kv_heads, int dim, float scale, int window) {
    AttentionRowsArgs a = {out, q, k, v, kv, pos, block_len, n, rows, n_heads, n_kv_heads, dim, scale, window};
    SUBMIT(x_attention_rows, a);
}

/* the elementwise ops over n floats: x (in place) or y from x */
typedef struct {
    float *y;
    const float *x;
    size_t n;
    float f0, f1;
} EltArgs;
static void x_gelu_tanh(const KnCtx *ctx, const void *p) {
    const EltArgs *a = p;
    CPU_OPS.gelu_tanh(ctx, H(a->y), a->n);
}
static void g_gelu_tanh(const KnCtx *ctx, float *x, size_t n) {
    EltArgs a = {.y = x, .n = n};
    SUBMIT(x_gelu_tanh, a);
}
static void x_softcap(const KnCtx *ctx, const void *p) {
    const EltArgs *a = p;
    CPU_OPS.softcap(ctx, H(a->y), a->n, a->f0);
}
static void g_softcap(const KnCtx *ctx, float *x, size_t n, float cap) {
    EltArgs a = {.y = x, .n = n, .f0 = cap};
    SUBMIT(x_softcap, a);
}
static void x_scale(const KnCtx *ctx, const void *p) {
    const EltArgs *a = p;
    CPU_OPS.scale(ctx, H(a->y), a->n, a->f0);
}
static void g_scale(const KnCtx *ctx, float *x, size_t n, float s) {
    EltArgs a = {.y = x, .n = n, .f0 = s};
    SUBMIT(x_scale, a);
}
/* bf16 <-> float32 over n elements: kept (bf16) and x (float) */
typedef struct {
    uint16_t *kept;
    float *x;
    const uint16_t *src;
    size_t n;
} Bf16Args;
static void x_round_bf16(const KnCtx *ctx, const void *p) {
    const Bf16Args *a = p;
    CPU_OPS.round_bf16(ctx, H(a->kept), H(a->x), a->n);
}
static void g_round_bf16(const KnCtx *ctx, uint16_t *kept, float *x, size_t n) {
    Bf16Args a = {.kept = kept, .x = x, .n = n};
    SUBMIT(x_round_bf16, a);
}
static void x_widen_bf16(const KnCtx *ctx, const void *p) {
    const Bf16Args *a = p;
    CPU_OPS.widen_bf16(ctx, H(a->x), H(a->src), a->n);
}
static void g_widen_bf16(const KnCtx *ctx, float *y, const uint16_t *x, size_t n) {
    Bf16Args a = {.x = y, .src = x, .n = n};
    SUBMIT(x_widen_bf16, a);
}
static void x_clamp(const KnCtx *ctx, const void *p) {
    const EltArgs *a = p;
    CPU_OPS.clamp(ctx, H(a->y), H(a->x), a->n, a->f0, a->f1);
}
static void g_clamp(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi) {
    EltArgs a = {y, x, n, lo, hi};
    SUBMIT(x_clamp, a);
}
static void x_scale_shift(const KnCtx *ctx, const void *p) {
    const EltArgs *a = p;
    CPU_OPS.scale_shift(ctx, H(a->y), H(a->x), a->n, a->f0, a->f1);
}
static void g_scale_shift(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s) {
    EltArgs a = {y, x, n, shift, s};
    SUBMIT(x_scale_shift, a);
}

/* two-operand ops: add (n = rows), mul, gelu_gate and mul_acc (rows x cols, ld) */
typedef struct {
    float *y;
    const float *a, *b;
    int64_t rows, cols, ld;
} BinArgs;
static void x_add(const KnCtx *ctx, const void *p) {
    const BinArgs *a = p;
    CPU_OPS.add(ctx, H(a->y), H(a->a), H(a->b), (size_t)a->rows);
}
static void g_add(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n) {
    BinArgs r = {y, a, b, (int64_t)n, 0, 0};
    SUBMIT(x_add, r);
}
static void x_mul(const KnCtx *ctx, const void *p) {
    const BinArgs *a = p;
    CPU_OPS.mul(ctx, H(a->y), H(a->a), H(a->b), a->rows, a->cols, a->ld);
}
static void g_mul(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b) {
    BinArgs r = {y, a, b, rows, cols, ld_b};
    SUBMIT(x_mul, r);
}
static void x_gelu_gate(const KnCtx *ctx, const void *p) {
    const BinArgs *a = p;
    CPU_OPS.gelu_gate(ctx, H(a->y), H(a->a), H(a->b), a->rows, a->cols, a->ld);
}
static void g_gelu_gate(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                        int64_t ld_u) {
    BinArgs r = {y, g, u, rows, cols, ld_u};
    SUBMIT(x_gelu_gate, r);
}
static void x_mul_acc(const KnCtx *ctx, const void *p) {
    const BinArgs *a = p;
    CPU_OPS.mul_acc(ctx, H(a->y), H(a->a), H(a->b), a->rows, a->cols, a->ld);
}
static void g_mul_acc(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                      int64_t ld_y) {
    BinArgs r = {y, a, b, rows, cols, ld_y};
    SUBMIT(x_mul_acc, r);
}

/* row gathers: rows_gather, rows_scatter, rows_sum; embed_rows and
 * embed_rows_add (table, scale, row) */
typedef struct {
    float *out, *row;
    uint16_t *out16;
    const float *src;
    const int32_t *idx;
    int64_t n, dim;
    KnMatrix table;
    float scale;
} RowsArgs;
static void x_rows_gather(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.rows_gather(ctx, H(a->out), H(a->src), H(a->idx), a->n, a->dim);
}
static void g_rows_gather(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RowsArgs a = {.out = out, .src = src, .idx = idx, .n = n, .dim = dim};
    SUBMIT(x_rows_gather, a);
}
static void x_rows_scatter(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.rows_scatter(ctx, H(a->out), H(a->src), H(a->idx), a->n, a->dim);
}
static void g_rows_scatter(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RowsArgs a = {.out = out, .src = src, .idx = idx, .n = n, .dim = dim};
    SUBMIT(x_rows_scatter, a);
}
static void x_rows_scatter_bf16(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.rows_scatter_bf16(ctx, H(a->out16), H(a->src), H(a->idx), a->n, a->dim);
}
static void g_rows_scatter_bf16(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                                int64_t dim) {
    RowsArgs a = {.out16 = out, .src = src, .idx = idx, .n = n, .dim = dim};
    SUBMIT(x_rows_scatter_bf16, a);
}
static void x_rows_sum(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.rows_sum(ctx, H(a->out), H(a->src), H(a->idx), a->n, a->dim);
}
static void g_rows_sum(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RowsArgs a = {.out = out, .src = src, .idx = idx, .n = n, .dim = dim};
    SUBMIT(x_rows_sum, a);
}
static void x_embed_rows(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.embed_rows(ctx, H(a->out), HM(a->table), H(a->idx), a->n, a->scale);
}
static void g_embed_rows(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale) {
    RowsArgs a = {.out = out, .idx = ids, .n = n, .table = kept_matrix(ctx, table), .scale = scale};
    CALLED(.op = KN_OP_EMBED_ROWS, .w = table, .n = n);
    SUBMIT(x_embed_rows, a);
}
static void x_embed_rows_add(const KnCtx *ctx, const void *p) {
    const RowsArgs *a = p;
    CPU_OPS.embed_rows_add(ctx, H(a->out), HM(a->table), H(a->idx), a->n, H(a->row));
}
static void g_embed_rows_add(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row) {
    RowsArgs a = {.out = out, .row = row, .idx = ids, .n = n, .table = kept_matrix(ctx, table)};
    SUBMIT(x_embed_rows_add, a);
}

typedef struct {
    float *x;
    int64_t rows, cols;
    const float *bias, *scale;
} StandardizeArgs;
static void x_standardize(const KnCtx *ctx, const void *p) {
    const StandardizeArgs *a = p;
    CPU_OPS.standardize(ctx, H(a->x), a->rows, a->cols, H(a->bias), H(a->scale));
}
static void g_standardize(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale) {
    StandardizeArgs a = {x, rows, cols, bias, scale};
    SUBMIT(x_standardize, a);
}

typedef struct {
    float *x;
    int64_t n_rows, ld_head, pos_stride;
    int n_heads, dim;
    const float *inv_freq;
    const int32_t *pos;
} RopeArgs;
static void x_rope_rows(const KnCtx *ctx, const void *p) {
    const RopeArgs *a = p;
    CPU_OPS.rope_rows(ctx, H(a->x), a->n_rows, a->n_heads, a->dim, a->ld_head, H(a->inv_freq), H(a->pos),
                      a->pos_stride);
}
static void g_rope_rows(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                        const float *inv_freq, const int32_t *pos, int64_t pos_stride) {
    RopeArgs a = {x, n_rows, ld_head, pos_stride, n_heads, dim, inv_freq, pos};
    SUBMIT(x_rope_rows, a);
}

typedef struct {
    float *y;
    const float *x, *w, *inv_freq;
    const int32_t *pos;
    int64_t n_rows;
    int n_heads, dim;
    float eps;
} NormRopeArgs;
static void x_rmsnorm_rope(const KnCtx *ctx, const void *p) {
    const NormRopeArgs *a = p;
    CPU_OPS.rmsnorm_rope(ctx, H(a->y), H(a->x), H(a->w), a->n_rows, a->n_heads, a->dim, a->eps, H(a->inv_freq),
                         H(a->pos));
}
static void g_rmsnorm_rope(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n_rows, int n_heads,
                           int dim, float eps, const float *inv_freq, const int32_t *pos) {
    NormRopeArgs a = {y, x, w, inv_freq, pos, n_rows, n_heads, dim, eps};
    SUBMIT(x_rmsnorm_rope, a);
}

/* ---- mixture of experts (forward and backward) ---- */

typedef struct {
    int32_t *idx;
    float *w, *coef, *p;
    const float *expert_scale;
    int64_t n;
    int E, K;
} RouteArgs;
static void x_moe_route(const KnCtx *ctx, const void *p) {
    const RouteArgs *a = p;
    CPU_OPS.moe_route(ctx, H(a->idx), H(a->w), H(a->coef), H(a->p), H(a->expert_scale), a->n, a->E, a->K);
}
static void g_moe_route(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                        int64_t n, int E, int K) {
    RouteArgs a = {idx, w, coef, p, expert_scale, n, E, K};
    SUBMIT(x_moe_route, a);
}

typedef struct {
    float *dlogits;
    const float *dc, *w, *p, *expert_scale;
    const int32_t *idx;
    int64_t n;
    int E, K;
} RouteDxArgs;
static void x_moe_route_dx(const KnCtx *ctx, const void *p) {
    const RouteDxArgs *a = p;
    CPU_OPS.moe_route_dx(ctx, H(a->dlogits), H(a->dc), H(a->idx), H(a->w), H(a->p), H(a->expert_scale), a->n, a->E,
                         a->K);
}
static void g_moe_route_dx(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                           const float *p, const float *expert_scale, int64_t n, int E, int K) {
    RouteDxArgs a = {dlogits, dc, w, p, expert_scale, idx, n, E, K};
    SUBMIT(x_moe_route_dx, a);
}

/* The experts stacked in gate_up [E * 2Im, H] and down [E * H, Im]: E. */
static int n_experts(KnMatrix gate_up, KnMatrix down) {
    return down.cols > 0 ? (int)(gate_up.rows / (2 * down.cols)) : 0;
}

typedef struct {
    float *y, *gu, *mm, *yk;
    const float *x, *coef;
    const int32_t *idx;
    int64_t n;
    int K;
    KnMatrix gate_up, down;
} ExpertsArgs;
static void x_moe_experts(const KnCtx *ctx, const void *p) {
    const ExpertsArgs *a = p;
    CPU_OPS.moe_experts(ctx, H(a->y), H(a->x), H(a->idx), H(a->coef), H(a->gu), H(a->mm), H(a->yk), a->n, a->K,
                        HM(a->gate_up), HM(a->down));
}
static void g_moe_experts(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                          float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down) {
    ExpertsArgs a = {y, gu, mm, yk, x, coef, idx, n, K, kept_matrix(ctx, gate_up), kept_matrix(ctx, down)};
    CALLED(.op = KN_OP_MOE_EXPERTS, .w = down, .n = n, .top_k = K, .n_experts = n_experts(gate_up, down));
    SUBMIT(x_moe_experts, a);
}

typedef struct {
    float *dx, *dc, *scratch;
    const float *dy, *gu, *yk, *coef;
    const int32_t *idx;
    int64_t n;
    int K;
    KnMatrix gate_up, down;
} ExpertsDxArgs;
static void x_moe_experts_dx(const KnCtx *ctx, const void *p) {
    const ExpertsDxArgs *a = p;
    CPU_OPS.moe_experts_dx(ctx, H(a->dx), H(a->dc), H(a->dy), H(a->gu), H(a->yk), H(a->idx), H(a->coef),
                           H(a->scratch), a->n, a->K, HM(a->gate_up), HM(a->down));
}
static void g_moe_experts_dx(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                             const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                             KnMatrix down) {
    ExpertsDxArgs a = {dx, dc, scratch, dy, gu, yk, coef, idx, n, K, kept_matrix(ctx, gate_up),
                       kept_matrix(ctx, down)};
    CALLED(.op = KN_OP_MOE_EXPERTS_DX, .w = down, .n = n, .top_k = K, .n_experts = n_experts(gate_up, down));
    SUBMIT(x_moe_experts_dx, a);
}

/* ---- grouped LoRA (forward and backward) ---- */

/* shrink: out = t, in0 = x; expand: out = y, in0 = t; expand_dx: out = gt,
 * in0 = dy, in1 = t; shrink_dx: out = dx, in0 = gt, in1 = x */
typedef struct {
    float *out;
    const float *in0, *in1;
    int64_t ld_t, width;
    const KnLoraSeg *segs;
    int n_segs;
    float *dropout_buf;
} LoraArgs;
static void x_lora_shrink(const KnCtx *ctx, const void *p) {
    const LoraArgs *a = p;
    KnLoraSeg h[MAX_SEGS];
    CPU_OPS.lora_shrink(ctx, H(a->out), a->ld_t, H(a->in0), hsegs(ctx, a->segs, a->n_segs, h), a->n_segs, a->width,
                        H(a->dropout_buf));
}
static void g_lora_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                          int64_t in, float *dropout_buf) {
    LoraArgs a = {t, x, NULL, ld_t, in, kept_segs(ctx, segs, n_segs), n_segs, dropout_buf};
    for (int i = 0; i < n_segs; i++)
        CALLED(.op = KN_OP_LORA_SHRINK, .n = segs[i].n_rows, .in = in, .dropout = segs[i].dropout > 0);
    SUBMIT(x_lora_shrink, a);
}
static void x_lora_expand(const KnCtx *ctx, const void *p) {
    const LoraArgs *a = p;
    KnLoraSeg h[MAX_SEGS];
    CPU_OPS.lora_expand(ctx, H(a->out), H(a->in0), a->ld_t, hsegs(ctx, a->segs, a->n_segs, h), a->n_segs, a->width);
}
static void g_lora_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                          int64_t out) {
    LoraArgs a = {y, t, NULL, ld_t, out, kept_segs(ctx, segs, n_segs), n_segs, NULL};
    SUBMIT(x_lora_expand, a);
}
static void x_lora_expand_dx(const KnCtx *ctx, const void *p) {
    const LoraArgs *a = p;
    KnLoraSeg h[MAX_SEGS];
    CPU_OPS.lora_expand_dx(ctx, H(a->out), H(a->in0), H(a->in1), a->ld_t, hsegs(ctx, a->segs, a->n_segs, h),
                           a->n_segs, a->width);
}
static void g_lora_expand_dx(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                             const KnLoraSeg *segs, int n_segs, int64_t out) {
    LoraArgs a = {gt, dy, t, ld_t, out, kept_segs(ctx, segs, n_segs), n_segs, NULL};
    SUBMIT(x_lora_expand_dx, a);
}
static void x_lora_shrink_dx(const KnCtx *ctx, const void *p) {
    const LoraArgs *a = p;
    KnLoraSeg h[MAX_SEGS];
    CPU_OPS.lora_shrink_dx(ctx, H(a->out), H(a->in0), a->ld_t, H(a->in1), hsegs(ctx, a->segs, a->n_segs, h),
                           a->n_segs, a->width, H(a->dropout_buf));
}
static void g_lora_shrink_dx(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                             const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    LoraArgs a = {dx, gt, x, ld_t, in, kept_segs(ctx, segs, n_segs), n_segs, dropout_buf};
    for (int i = 0; i < n_segs; i++)
        CALLED(.op = KN_OP_LORA_SHRINK_DX, .n = segs[i].n_rows, .in = in, .dropout = segs[i].dropout > 0);
    SUBMIT(x_lora_shrink_dx, a);
}

/* lora_rows_shrink: out = t, in = x; lora_rows_expand: out = y, in = t */
typedef struct {
    float *out;
    const float *in;
    int64_t ld_t, n, width;
    const KnLoraRow *rows;
    int max_rank;
} LoraRowsArgs;
static void x_lora_rows_shrink(const KnCtx *ctx, const void *p) {
    const LoraRowsArgs *a = p;
    if (a->n <= 0) return;
    KnLoraRow *h = lora_rows_now(ctx, a->rows, a->n);
    CPU_OPS.lora_rows_shrink(ctx, H(a->out), a->ld_t, H(a->in), h, a->n, a->width, a->max_rank);
    free(h);
}
static void g_lora_rows_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows,
                               int64_t n, int64_t in, int max_rank) {
    LoraRowsArgs a = {t, x, ld_t, n, in, rows, max_rank};
    SUBMIT(x_lora_rows_shrink, a);
}
static void x_lora_rows_expand(const KnCtx *ctx, const void *p) {
    const LoraRowsArgs *a = p;
    if (a->n <= 0) return;
    KnLoraRow *h = lora_rows_now(ctx, a->rows, a->n);
    CPU_OPS.lora_rows_expand(ctx, H(a->out), H(a->in), a->ld_t, h, a->n, a->width);
    free(h);
}
static void g_lora_rows_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows,
                               int64_t n, int64_t out) {
    LoraRowsArgs a = {y, t, ld_t, n, out, rows, 0};
    SUBMIT(x_lora_rows_expand, a);
}

/* ---- loss, sampling, optimizer ---- */

typedef struct {
    double *loss;
    float *z;
    const int32_t *targets;
    int64_t rows, V;
    float cap, scale;
    int grad;
} XentArgs;
static void x_xent_softcap(const KnCtx *ctx, const void *p) {
    const XentArgs *a = p;
    CPU_OPS.xent_softcap(ctx, H(a->loss), H(a->z), H(a->targets), a->rows, a->V, a->cap, a->scale, a->grad);
}
static void g_xent_softcap(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                           float cap, float scale, int grad) {
    XentArgs a = {loss, z, targets, rows, V, cap, scale, grad};
    SUBMIT(x_xent_softcap, a);
}

typedef struct {
    int32_t *ids;
    const float *logits;
    KnSampleRow *rows;
    int64_t n, V;
    void *scratch;
} SampleArgs;
static void x_sample(const KnCtx *ctx, const void *p) {
    const SampleArgs *a = p;
    CPU_OPS.sample(ctx, H(a->ids), H(a->logits), H(a->rows), a->n, a->V, H(a->scratch));
}
static void g_sample(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                     void *scratch) {
    SampleArgs a = {ids, logits, rows, n, V, scratch};
    SUBMIT(x_sample, a);
}

typedef struct {
    float *p, *m, *v;
    const float *g;
    size_t n;
    const KnAdamW *h;
} AdamwArgs;
static void x_adamw(const KnCtx *ctx, const void *p) {
    const AdamwArgs *a = p;
    CPU_OPS.adamw(ctx, H(a->p), H(a->g), H(a->m), H(a->v), a->n, a->h);
}
static void g_adamw(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h) {
    AdamwArgs a = {p, m, v, g, n, guard_keep(ctx, h, sizeof *h)};
    SUBMIT(x_adamw, a);
}

typedef struct {
    double *out;
    const float *x;
    size_t n;
} SqNormArgs;
static void x_sq_norm(const KnCtx *ctx, const void *p) {
    const SqNormArgs *a = p;
    CPU_OPS.sq_norm(ctx, H(a->out), H(a->x), a->n);
}
static void g_sq_norm(const KnCtx *ctx, double *out, const float *x, size_t n) {
    SqNormArgs a = {out, x, n};
    SUBMIT(x_sq_norm, a);
}

/* ---- backward of the dense ops ---- */

/* clamp_dx, gelu_tanh_dx, rmsnorm_dx and matmul_dx: dx from x, w, dy */
typedef struct {
    float *dx;
    const float *x, *w, *dy;
    KnMatrix m;
    int64_t n, dim;
    float f0, f1;
    int accumulate;
} GradArgs;
static void x_clamp_dx(const KnCtx *ctx, const void *p) {
    const GradArgs *a = p;
    CPU_OPS.clamp_dx(ctx, H(a->dx), H(a->x), H(a->dy), (size_t)a->n, a->f0, a->f1, a->accumulate);
}
static void g_clamp_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                       int accumulate) {
    GradArgs a = {.dx = dx, .x = x, .dy = dy, .n = (int64_t)n, .f0 = lo, .f1 = hi, .accumulate = accumulate};
    SUBMIT(x_clamp_dx, a);
}
static void x_matmul_dx(const KnCtx *ctx, const void *p) {
    const GradArgs *a = p;
    CPU_OPS.matmul_dx(ctx, H(a->dx), H(a->dy), HM(a->m), a->n);
}
static void g_matmul_dx(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n) {
    GradArgs a = {.dx = dx, .dy = dy, .m = kept_matrix(ctx, w), .n = n};
    CALLED(.op = KN_OP_MATMUL_DX, .w = w, .n = n);
    SUBMIT(x_matmul_dx, a);
}
static void x_rmsnorm_dx(const KnCtx *ctx, const void *p) {
    const GradArgs *a = p;
    CPU_OPS.rmsnorm_dx(ctx, H(a->dx), H(a->x), H(a->w), H(a->dy), a->n, a->dim, a->f0);
}
static void g_rmsnorm_dx(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                         int64_t dim, float eps) {
    GradArgs a = {.dx = dx, .x = x, .w = w, .dy = dy, .n = n, .dim = dim, .f0 = eps};
    SUBMIT(x_rmsnorm_dx, a);
}
static void x_gelu_tanh_dx(const KnCtx *ctx, const void *p) {
    const GradArgs *a = p;
    CPU_OPS.gelu_tanh_dx(ctx, H(a->dx), H(a->x), H(a->dy), (size_t)a->n);
}
static void g_gelu_tanh_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n) {
    GradArgs a = {.dx = dx, .x = x, .dy = dy, .n = (int64_t)n};
    SUBMIT(x_gelu_tanh_dx, a);
}

typedef struct {
    float *dg, *du;
    const float *dy, *g, *u;
    size_t n;
} GateGradArgs;
static void x_gelu_gate_dx(const KnCtx *ctx, const void *p) {
    const GateGradArgs *a = p;
    CPU_OPS.gelu_gate_dx(ctx, H(a->dg), H(a->du), H(a->dy), H(a->g), H(a->u), a->n);
}
static void g_gelu_gate_dx(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                           size_t n) {
    GateGradArgs a = {dg, du, dy, g, u, n};
    SUBMIT(x_gelu_gate_dx, a);
}

/* ---- loading ---- */

/* Not a call: it waits for its result (q->offset), so it runs at once. */
static void g_nf4_quantize(const KnCtx *ctx, KnNf4 *q, KnMatrix w, void *scratch) {
    KnNf4 h = *q;
    h.codes = guard_owned(ctx, q->codes, (size_t)(q->n + 1) / 2);
    h.absmax_q = guard_owned(ctx, q->absmax_q, (size_t)q->n_blocks);
    h.group_scale = guard_owned(ctx, q->group_scale, (size_t)q->n_groups * sizeof(float));
    w.data = guard_owned(ctx, w.data, (size_t)q->n * kn_dtype_size(w.dtype));
    CPU_OPS.nf4_quantize(ctx, &h, w, guard_owned(ctx, scratch, kn_nf4_scratch_bytes(q->n)));
    q->offset = h.offset;
}

static const KnOps GUARDED_OPS = {
    .alloc = guard_alloc,
    .alloc_mapped = guard_alloc_mapped,
    .free = guard_free,
    .seal = guard_seal,
    .upload = guard_upload,
    .download = guard_download,
    .copy = g_copy,
    .memset = g_memset,
    .synchronize = guard_synchronize,
    .supports = cpu_supports,
    .graph_begin = guard_graph_begin,
    .graph_end = guard_graph_end,
    .matmul = g_matmul,
    .rmsnorm = g_rmsnorm,
    .rmsnorm_add = g_rmsnorm_add,
    .rmsnorm_rope = g_rmsnorm_rope,
    .attention = g_attention,
    .attention_paged = g_attention_paged,
    .attention_batch = g_attention_batch,
    .attention_rows = g_attention_rows,
    .attention_bulk = g_attention_bulk,
    .gelu_tanh = g_gelu_tanh,
    .gelu_gate = g_gelu_gate,
    .softcap = g_softcap,
    .embed_rows = g_embed_rows,
    .add = g_add,
    .mul = g_mul,
    .scale = g_scale,
    .round_bf16 = g_round_bf16,
    .widen_bf16 = g_widen_bf16,
    .sample = g_sample,
    .adamw = g_adamw,
    .sq_norm = g_sq_norm,
    .mul_acc = g_mul_acc,
    .rows_gather = g_rows_gather,
    .rows_scatter = g_rows_scatter,
    .rows_scatter_bf16 = g_rows_scatter_bf16,
    .xent_softcap = g_xent_softcap,
    .rows_sum = g_rows_sum,
    .embed_rows_add = g_embed_rows_add,
    .clamp = g_clamp,
    .clamp_dx = g_clamp_dx,
    .scale_shift = g_scale_shift,
    .standardize = g_standardize,
    .rope_rows = g_rope_rows,
    .moe_route = g_moe_route,
    .moe_experts = g_moe_experts,
    .moe_experts_dx = g_moe_experts_dx,
    .moe_route_dx = g_moe_route_dx,
    .lora_shrink = g_lora_shrink,
    .lora_expand = g_lora_expand,
    .lora_rows_shrink = g_lora_rows_shrink,
    .lora_rows_expand = g_lora_rows_expand,
    .lora_expand_dx = g_lora_expand_dx,
    .lora_shrink_dx = g_lora_shrink_dx,
    .matmul_dx = g_matmul_dx,
    .rmsnorm_dx = g_rmsnorm_dx,
    .gelu_tanh_dx = g_gelu_tanh_dx,
    .gelu_gate_dx = g_gelu_gate_dx,
    .attention_dx = g_attention_dx,
    .nf4_quantize = g_nf4_quantize,
};

const KnOps *guarded_backend_ops(void) { return &GUARDED_OPS; }
