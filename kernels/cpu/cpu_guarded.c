/* cpu_guarded.c - the guarded CPU backend: the CPU kernels behind a table
 * whose device buffers each live in their own anonymous mapping, kept
 * PROT_NONE whenever no op of this backend is running. Engine code that
 * reads or writes device memory itself, instead of through an op or a
 * transfer entry, faults at once, as it would (less politely) on a GPU.
 * Sealed buffers (weights) are read-only even during ops. Each mapping is
 * followed by an inaccessible guard page, so running off a buffer's end
 * faults too. The transfer entries (upload, download, copy, memset) abort
 * when handed a device range outside every live buffer: host memory passed
 * where device memory belongs.
 *
 * It exists for tests: the whole suite runs on it once in CI. Every op call
 * changes the protection of every live buffer twice, so it is slow by
 * design. Threading: as any KnCtx, one owner thread; the registry is the
 * context's (ctx->impl), not global.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../kernels_impl.h"
#include "cpu_impl.h"

typedef struct {
    char *base;               /* the mapping: data, then the guard page */
    size_t len;               /* bytes mapped, guard page included */
    int sealed;
} GuardBuf;

typedef struct {
    GuardBuf *bufs;
    size_t n, cap;
    size_t page;
} Guard;

static Guard *guard_of(const KnCtx *ctx) { return ctx->impl; }

/* Opens every buffer for an op (sealed ones read-only), or closes them all. */
static void set_access(const KnCtx *ctx, int open) {
    Guard *g = guard_of(ctx);
    for (size_t i = 0; i < g->n; i++) {
        int prot = !open ? PROT_NONE : g->bufs[i].sealed ? PROT_READ : PROT_READ | PROT_WRITE;
        if (mprotect(g->bufs[i].base, g->bufs[i].len - g->page, prot) != 0) abort();
    }
}

static GuardBuf *find(Guard *g, const void *p) {
    for (size_t i = 0; i < g->n; i++)
        if ((const char *)p >= g->bufs[i].base && (const char *)p < g->bufs[i].base + g->bufs[i].len) return &g->bufs[i];
    return NULL;
}

GfStatus guarded_ctx_init(KnCtx *ctx, GfError *err) {
    Guard *g = gf_calloc(1, sizeof *g, err);
    if (!g) return GF_NO_MEMORY;
    long page = sysconf(_SC_PAGESIZE);
    g->page = page > 0 ? (size_t)page : 4096;
    ctx->impl = g;
    return GF_OK;
}

void guarded_ctx_free(KnCtx *ctx) {
    Guard *g = guard_of(ctx);
    if (!g) return;
    for (size_t i = 0; i < g->n; i++) munmap(g->bufs[i].base, g->bufs[i].len);
    free(g->bufs);
    free(g);
    ctx->impl = NULL;
}

/* ---- memory ------------------------------------------------------------------ */

static GfStatus g_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err) {
    Guard *g = guard_of(ctx);
    memset(buf, 0, sizeof *buf);
    if (bytes == 0 || bytes > SIZE_MAX - 2 * g->page)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s (%zu bytes)", what, bytes);
    if (g->n == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 64;
        GuardBuf *b = realloc(g->bufs, cap * sizeof *b);
        if (!b) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s", what);
        g->bufs = b;
        g->cap = cap;
    }
    size_t len = (bytes + g->page - 1) / g->page * g->page + g->page;
    char *p = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s (%zu bytes)", what, bytes);
    g->bufs[g->n++] = (GuardBuf){p, len, 0};
    *buf = (KnBuffer){p, bytes, ctx->device, ctx->index, dtype};
    return GF_OK;
}

static void g_free(const KnCtx *ctx, KnBuffer *buf) {
    Guard *g = guard_of(ctx);
    if (!buf || !buf->data) return;
    GuardBuf *b = find(g, buf->data);
    if (!b) abort(); /* not ours: a programming error */
    munmap(b->base, b->len);
    *b = g->bufs[--g->n];
    memset(buf, 0, sizeof *buf);
}

static void g_seal(const KnCtx *ctx, const KnBuffer *buf) {
    GuardBuf *b = find(guard_of(ctx), buf->data);
    if (!b) abort();
    b->sealed = 1;
}

/* The device memory [p, p + n) must lie inside one live buffer: host
 * memory handed to a transfer entry (which a GPU could not read) aborts. */
static GuardBuf *owner(const KnCtx *ctx, const void *p, size_t n) {
    GuardBuf *b = find(guard_of(ctx), p);
    if (!b || (const char *)p + n > b->base + b->len - guard_of(ctx)->page) abort();
    return b;
}

/* Transfers open only the buffers they touch; a sealed buffer takes no
 * writes (weights are written once, before sealing). */
static void with_open(const KnCtx *ctx, const void *p, int write, int open) {
    GuardBuf *b = find(guard_of(ctx), p);
    if (!b || (write && b->sealed)) abort();
    size_t page = guard_of(ctx)->page;
    if (mprotect(b->base, b->len - page, open ? (write ? PROT_READ | PROT_WRITE : PROT_READ) : PROT_NONE) != 0) abort();
}

static void g_upload(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    owner(ctx, dst, n);
    with_open(ctx, dst, 1, 1);
    memcpy(dst, src, n);
    with_open(ctx, dst, 1, 0);
}

static void g_download(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    owner(ctx, src, n);
    with_open(ctx, src, 0, 1);
    memcpy(dst, src, n);
    with_open(ctx, src, 0, 0);
}

static void g_copy(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    owner(ctx, dst, n);
    owner(ctx, src, n);
    set_access(ctx, 1);
    memcpy(dst, src, n);
    set_access(ctx, 0);
}

static void g_memset(const KnCtx *ctx, void *dst, int value, size_t n) {
    if (!n) return;
    owner(ctx, dst, n);
    with_open(ctx, dst, 1, 1);
    memset(dst, value, n);
    with_open(ctx, dst, 1, 0);
}

/* ---- ops: the CPU kernels between opening and closing every buffer ---- */

#define GUARDED(name, params, args) \
    static void g_##name params {   \
        set_access(ctx, 1);         \
        CPU_OPS.name args;          \
        set_access(ctx, 0);         \
    }

GUARDED(matmul, (const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n), (ctx, y, x, w, n))
GUARDED(rmsnorm, (const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps),
        (ctx, y, x, w, n, dim, eps))
GUARDED(rope, (const KnCtx *ctx, float *x, int n_heads, int dim, const float *inv_freq, int64_t pos),
        (ctx, x, n_heads, dim, inv_freq, pos))
GUARDED(attention,
        (const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q, int64_t q_pos0,
         int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask),
        (ctx, out, q, k, v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask))
GUARDED(attention_paged,
        (const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0, int64_t n_keys,
         int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask),
        (ctx, out, q, kv, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask))
GUARDED(gelu_tanh, (const KnCtx *ctx, float *x, size_t n), (ctx, x, n))
GUARDED(softcap, (const KnCtx *ctx, float *x, size_t n, float cap), (ctx, x, n, cap))
GUARDED(embed_row, (const KnCtx *ctx, float *out, KnMatrix table, int64_t row, float scale), (ctx, out, table, row, scale))
GUARDED(matmul_dx, (const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n), (ctx, dx, dy, w, n))
GUARDED(rmsnorm_dx,
        (const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n, int64_t dim, float eps),
        (ctx, dx, x, w, dy, n, dim, eps))
GUARDED(gelu_tanh_dx, (const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n), (ctx, dx, x, dy, n))
GUARDED(attention_dx,
        (const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k, const float *v,
         const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim,
         float scale, const KnMask *mask),
        (ctx, dq, dk, dv, q, k, v, dout, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask))

GUARDED(embed_rows, (const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale),
        (ctx, out, table, ids, n, scale))
GUARDED(add, (const KnCtx *ctx, float *y, const float *a, const float *b, size_t n), (ctx, y, a, b, n))
GUARDED(mul, (const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b),
        (ctx, y, a, b, rows, cols, ld_b))
GUARDED(scale, (const KnCtx *ctx, float *x, size_t n, float s), (ctx, x, n, s))
GUARDED(rope_rows,
        (const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head, const float *inv_freq,
         const int32_t *pos, int64_t pos_stride),
        (ctx, x, n_rows, n_heads, dim, ld_head, inv_freq, pos, pos_stride))
GUARDED(kv_store,
        (const KnCtx *ctx, float *store, const float *src, int64_t n, int64_t row_floats, const int32_t *table,
         int64_t block_len, int64_t pos0),
        (ctx, store, src, n, row_floats, table, block_len, pos0))
GUARDED(lora_shrink,
        (const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs, int64_t in,
         float *dropout_buf),
        (ctx, t, ld_t, x, segs, n_segs, in, dropout_buf))
GUARDED(lora_expand,
        (const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs, int64_t out),
        (ctx, y, t, ld_t, segs, n_segs, out))
GUARDED(lora_expand_dx,
        (const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
         int64_t out),
        (ctx, gt, dy, t, ld_t, segs, n_segs, out))
GUARDED(lora_shrink_dx,
        (const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x, const KnLoraSeg *segs,
         int n_segs, int64_t in, float *dropout_buf),
        (ctx, dx, gt, ld_t, x, segs, n_segs, in, dropout_buf))

GUARDED(moe_route,
        (const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale, int64_t n, int E,
         int K),
        (ctx, idx, w, coef, p, expert_scale, n, E, K))
GUARDED(moe_experts,
        (const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu, float *mm,
         float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down),
        (ctx, y, x, idx, coef, gu, mm, yk, n, K, gate_up, down))
GUARDED(moe_experts_dx,
        (const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk, const int32_t *idx,
         const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up, KnMatrix down),
        (ctx, dx, dc, dy, gu, yk, idx, coef, scratch, n, K, gate_up, down))
GUARDED(moe_route_dx,
        (const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w, const float *p,
         const float *expert_scale, int64_t n, int E, int K),
        (ctx, dlogits, dc, idx, w, p, expert_scale, n, E, K))

GUARDED(mul_acc, (const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_y),
        (ctx, y, a, b, rows, cols, ld_y))
GUARDED(rows_gather, (const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim),
        (ctx, out, src, idx, n, dim))
GUARDED(rows_scatter, (const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim),
        (ctx, out, src, idx, n, dim))
GUARDED(xent_softcap,
        (const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V, float cap,
         float scale, int grad),
        (ctx, loss, z, targets, rows, V, cap, scale, grad))

GUARDED(rows_sum, (const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim),
        (ctx, out, src, idx, n, dim))
GUARDED(embed_rows_add, (const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row),
        (ctx, out, table, ids, n, row))
GUARDED(clamp, (const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi), (ctx, y, x, n, lo, hi))
GUARDED(clamp_dx,
        (const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi, int accumulate),
        (ctx, dx, x, dy, n, lo, hi, accumulate))
GUARDED(scale_shift, (const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s),
        (ctx, y, x, n, shift, s))
GUARDED(standardize, (const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale),
        (ctx, x, rows, cols, bias, scale))

GUARDED(adamw,
        (const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h),
        (ctx, p, g, m, v, n, h))
GUARDED(sq_norm, (const KnCtx *ctx, double *out, const float *x, size_t n), (ctx, out, x, n))

GUARDED(sample,
        (const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V, void *scratch),
        (ctx, ids, logits, rows, n, V, scratch))

static const KnOps GUARDED_OPS = {
    .alloc = g_alloc,
    .free = g_free,
    .seal = g_seal,
    .upload = g_upload,
    .download = g_download,
    .copy = g_copy,
    .memset = g_memset,
    .synchronize = cpu_synchronize,
    .supports = cpu_supports,
    .matmul = g_matmul,
    .rmsnorm = g_rmsnorm,
    .rope = g_rope,
    .attention = g_attention,
    .attention_paged = g_attention_paged,
    .gelu_tanh = g_gelu_tanh,
    .softcap = g_softcap,
    .embed_row = g_embed_row,
    .embed_rows = g_embed_rows,
    .add = g_add,
    .mul = g_mul,
    .scale = g_scale,
    .sample = g_sample,
    .adamw = g_adamw,
    .sq_norm = g_sq_norm,
    .mul_acc = g_mul_acc,
    .rows_gather = g_rows_gather,
    .rows_scatter = g_rows_scatter,
    .xent_softcap = g_xent_softcap,
    .rows_sum = g_rows_sum,
    .embed_rows_add = g_embed_rows_add,
    .clamp = g_clamp,
    .clamp_dx = g_clamp_dx,
    .scale_shift = g_scale_shift,
    .standardize = g_standardize,
    .rope_rows = g_rope_rows,
    .kv_store = g_kv_store,
    .moe_route = g_moe_route,
    .moe_experts = g_moe_experts,
    .moe_experts_dx = g_moe_experts_dx,
    .moe_route_dx = g_moe_route_dx,
    .lora_shrink = g_lora_shrink,
    .lora_expand = g_lora_expand,
    .lora_expand_dx = g_lora_expand_dx,
    .lora_shrink_dx = g_lora_shrink_dx,
    .matmul_dx = g_matmul_dx,
    .rmsnorm_dx = g_rmsnorm_dx,
    .gelu_tanh_dx = g_gelu_tanh_dx,
    .attention_dx = g_attention_dx,
};

const KnOps *guarded_backend_ops(void) { return &GUARDED_OPS; }
