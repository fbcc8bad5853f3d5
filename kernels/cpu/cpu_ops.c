/* cpu_ops.c - the CPU reference kernels: plain loops, threaded by rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../convert.h"
#include "../nf4.h"
#include "../kernels_impl.h"
#include "cpu_impl.h"

void cpu_load_span(float *out, KnMatrix w, int64_t r, int64_t c0, int64_t len) {
    int64_t e = r * w.cols + c0;
    if (w.dtype == KN_NF4) kn_nf4_dequantize(w.data, w.offset + e, len, out);
    else kn_convert_to_f32(out, w.data, w.dtype, e, len);
}

/* ---- norms, activations ------------------------------------------------- */

/* 1 / rms(x[dim]), eps inside the root: the sum of squares in double. */
static float rms_inv(const float *x, int64_t dim, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < dim; i++) ss += (double)x[i] * x[i];
    return 1.0f / sqrtf((float)(ss / (double)dim) + eps);
}

/* Element i of a normed row: x[i] inv (w[i]). */
static inline float normed(const float *x, float inv, const float *w, int64_t i) {
    return w ? x[i] * inv * w[i] : x[i] * inv;
}

/* The norms' arguments: rows of dim from x normed by w into y; with r,
 * (r + normed) s (rmsnorm_add); with n_heads, each row n_heads heads of
 * dim, normed each and rotated at pos (rmsnorm_rope). */
typedef struct {
    float *y;
    const float *r, *x, *w;
    int64_t dim;
    float eps, s;
    int n_heads;
    const float *inv_freq;
    const int32_t *pos;
} NormArgs;

static void norm_span(void *p, int64_t lo, int64_t hi) {
    const NormArgs *a = p;
    for (int64_t row = lo; row < hi; row++) {
        const float *xr = a->x + row * a->dim;
        float *yr = a->y + row * a->dim, inv = rms_inv(xr, a->dim, a->eps);
        for (int64_t i = 0; i < a->dim; i++) yr[i] = normed(xr, inv, a->w, i);
    }
}

static void norm_add_span(void *p, int64_t lo, int64_t hi) {
    const NormArgs *a = p;
    for (int64_t row = lo; row < hi; row++) {
        const float *xr = a->x + row * a->dim, *rr = a->r + row * a->dim;
        float *yr = a->y + row * a->dim, inv = rms_inv(xr, a->dim, a->eps);
        for (int64_t i = 0; i < a->dim; i++) {
            float sum = rr[i] + normed(xr, inv, a->w, i);
            yr[i] = sum * a->s;
        }
    }
}

static void norm_rope_span(void *p, int64_t lo, int64_t hi) {
    const NormArgs *a = p;
    const KnCtx serial = {0}; /* no pool: this runs inside one */
    int64_t width = a->n_heads * a->dim;
    NormArgs heads = *a;
    for (int64_t row = lo; row < hi; row++) {
        heads.y = a->y + row * width;
        heads.x = a->x + row * width;
        norm_span(&heads, 0, a->n_heads);
        cpu_rope_rows_forward(&serial, heads.y, 1, a->n_heads, (int)a->dim, a->dim, a->inv_freq, a->pos + row, 1);
    }
}

static void cpu_rmsnorm_forward(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim,
                                float eps) {
    NormArgs a = {.y = y, .x = x, .w = w, .dim = dim, .eps = eps};
    cpu_for_range(ctx, n, 3 * dim, norm_span, &a);
}

static void cpu_rmsnorm_add(const KnCtx *ctx, float *y, const float *r, const float *x, const float *w, int64_t n,
                            int64_t dim, float eps, float s) {
    NormArgs a = {.y = y, .r = r, .x = x, .w = w, .dim = dim, .eps = eps, .s = s};
    cpu_for_range(ctx, n, 4 * dim, norm_add_span, &a);
}

static void cpu_rmsnorm_rope(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n_rows, int n_heads,
                             int dim, float eps, const float *inv_freq, const int32_t *pos) {
    NormArgs a = {.y = y, .x = x, .w = w, .dim = dim, .eps = eps, .n_heads = n_heads, .inv_freq = inv_freq, .pos = pos};
    cpu_for_range(ctx, n_rows, (int64_t)n_heads * dim * 12, norm_rope_span, &a);
}

/* The activations' arguments: y from g (and u, rows of cols apart ld_u). */
typedef struct {
    float *y;
    const float *g, *u;
    int64_t cols, ld_u;
    float cap;
} ActArgs;

/* The cost of an element of tanh-GELU in multiply-adds, roughly. */
enum { GELU_COST = 16 };

static void gelu_span(void *p, int64_t lo, int64_t hi) {
    const ActArgs *a = p;
    float th[CPU_TANH_BLOCK];
    for (int64_t i = lo; i < hi; i += CPU_TANH_BLOCK) {
        int m = cpu_tanh_len(i, hi);
        cpu_gelu_th_block(th, a->y + i, m);
        for (int j = 0; j < m; j++) a->y[i + j] = cpu_gelu_at(a->y[i + j], th[j]);
    }
}

/* elements [lo, hi) of the rows x cols y: a row's u is ld_u apart */
static void gelu_gate_span(void *p, int64_t lo, int64_t hi) {
    const ActArgs *a = p;
    float th[CPU_TANH_BLOCK];
    for (int64_t i = lo; i < hi;) {
        int64_t r = i / a->cols, end = (r + 1) * a->cols < hi ? (r + 1) * a->cols : hi;
        const float *ur = a->u + r * a->ld_u - r * a->cols;
        while (i < end) {
            int m = cpu_tanh_len(i, end);
            cpu_gelu_th_block(th, a->g + i, m);
            for (int j = 0; j < m; j++) a->y[i + j] = cpu_gelu_at(a->g[i + j], th[j]) * ur[i + j];
            i += m;
        }
    }
}

static void softcap_span(void *p, int64_t lo, int64_t hi) {
    const ActArgs *a = p;
    float th[CPU_TANH_BLOCK];
    for (int64_t i = lo; i < hi; i += CPU_TANH_BLOCK) {
        int m = cpu_tanh_len(i, hi);
        for (int j = 0; j < m; j++) th[j] = a->y[i + j] / a->cap;
        cpu_tanh_block(th, th, m);
        for (int j = 0; j < m; j++) a->y[i + j] = a->cap * th[j];
    }
}

static void cpu_gelu_tanh_forward(const KnCtx *ctx, float *x, size_t n) {
    ActArgs a = {.y = x};
    cpu_for_range(ctx, (int64_t)n, GELU_COST, gelu_span, &a);
}

void cpu_gelu_gate_forward(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                           int64_t ld_u) {
    ActArgs a = {.y = y, .g = g, .u = u, .cols = cols, .ld_u = ld_u};
    if (cols > 0) cpu_for_range(ctx, rows * cols, GELU_COST, gelu_gate_span, &a);
}

void cpu_softcap_forward(const KnCtx *ctx, float *x, size_t n, float cap) {
    ActArgs a = {.y = x, .cap = cap};
    cpu_for_range(ctx, (int64_t)n, GELU_COST, softcap_span, &a);
}

/* ---- attention ---------------------------------------------------------- */

typedef struct {
    float *out;
    const float *q;
    const void *k, *v;        /* float32, or bfloat16 when bf16 */
    int64_t n_q, q_pos0, n_keys;
    int n_heads, n_kv_heads, dim;
    float scale;
    const KnMask *mask;
    const int32_t *table;     /* paged keys: block of each run of blk positions; NULL = contiguous */
    int64_t blk;
    int bf16;
    CpuDots dots;
} AttnTask;

/* Row of key (or value) position k, head kvh, in a contiguous or paged
 * store: in place for float32, widened into buf for bfloat16. */
static inline const float *kv_row(const AttnTask *t, const void *base, int64_t k, int kvh, float *buf) {
    int64_t slot = t->table ? (int64_t)t->table[k / t->blk] * t->blk + k % t->blk : k, at = (slot * t->n_kv_heads + kvh) * t->dim;
    if (!t->bf16) return (const float *)base + at;
    const uint16_t *h = (const uint16_t *)base + at;
    for (int d = 0; d < t->dim; d++) buf[d] = kn_bf16_to_f32(h[d]);
    return buf;
}


enum { ATTN_STACK = 8192 }; /* scores kept on the stack up to this many keys */

/* The scores of keys k .. k + 3 (times scale) into s, four dot products at
 * once (dot4: the same sums), where the store is float32 and the
 * query sees all four; else 0. */
static int scores4(const AttnTask *t, const float *qv, int64_t qpos, int64_t k, int kvh, float s[4]) {
    if (t->bf16 || k + 4 > t->n_keys) return 0;
    const float *rows[4];
    for (int j = 0; j < 4; j++) {
        if (!cpu_mask_visible(t->mask, qpos, k + j)) return 0;
        rows[j] = kv_row(t, t->k, k + j, kvh, NULL);
    }
    t->dots.dot4(qv, rows, t->dim, s);
    for (int j = 0; j < 4; j++) s[j] *= t->scale;
    return 1;
}

/* Work item `item` = (query, head): scores, softmax in float32, sum of V. */
static void attn_item(const AttnTask *t, long item, float *stack_scores) {
    int64_t i = item / t->n_heads;
    int h = (int)(item % t->n_heads), kvh = h / (t->n_heads / t->n_kv_heads);
    int64_t qpos = t->q_pos0 + i;
    float row[KN_KV_BF16_MAX_DIM]; /* a bfloat16 store's row, widened */
    const float *qv = t->q + (i * t->n_heads + h) * t->dim;
    float *o = t->out + (i * t->n_heads + h) * t->dim;
    memset(o, 0, (size_t)t->dim * sizeof(float));
    float mx = -INFINITY, sum = 0.0f, s4[4];
    /* two passes when the key count is larger than the stack buffer */
    float *scores = t->n_keys <= ATTN_STACK ? stack_scores : NULL;
    for (int64_t k = 0; k < t->n_keys;) {
        int n = scores4(t, qv, qpos, k, kvh, s4) ? 4 : 1;
        if (n == 1)
            s4[0] = cpu_mask_visible(t->mask, qpos, k) ? t->dots.dot(qv, kv_row(t, t->k, k, kvh, row), t->dim) * t->scale
                                                        : -INFINITY;
        for (int j = 0; j < n; j++, k++) {
            if (scores) scores[k] = s4[j];
            if (s4[j] > mx) mx = s4[j];
        }
    }
    if (mx == -INFINITY) return; /* no visible key: zeros */
    for (int64_t k = 0; k < t->n_keys; k++) {
        float s = scores ? scores[k]
                         : (cpu_mask_visible(t->mask, qpos, k) ? t->dots.dot(qv, kv_row(t, t->k, k, kvh, row), t->dim) * t->scale
                                                      : -INFINITY);
        if (s == -INFINITY) continue;
        float w = expf(s - mx);
        sum += w;
        const float *vv = kv_row(t, t->v, k, kvh, row);
        cpu_axpy(o, w, vv, t->dim);
    }
    for (int d = 0; d < t->dim; d++) o[d] /= sum;
}

/* One (query, head) pair per work item. */
static void attn_task(void *p, int ith, int nth) {
    AttnTask *t = p;
    long lo, hi;
    kn_split((long)(t->n_q * t->n_heads), ith, nth, &lo, &hi);
    float stack_scores[ATTN_STACK];
    for (long item = lo; item < hi; item++) attn_item(t, item, stack_scores);
}

static void cpu_attention_forward(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim,
                                  float scale, const KnMask *mask) {
    AttnTask t = {out, q, k, v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask, NULL, 1, 0, cpu_dots()};
    if (n_q * n_heads * n_keys * dim < CPU_PARALLEL_MIN_WORK) attn_task(&t, 0, 1);
    else kn_pool_run(ctx->pool, attn_task, &t);
}

static void cpu_attention_paged_forward(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q,
                                int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                                const KnMask *mask) {
    AttnTask t = {out, q, kv->k, kv->v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask, kv->table,
                  kv->block_len, 0, cpu_dots()};
    if (n_q * n_heads * n_keys * dim < CPU_PARALLEL_MIN_WORK) attn_task(&t, 0, 1);
    else kn_pool_run(ctx->pool, attn_task, &t);
}

/* A batch's sequences: their (query, head) items numbered one after the
 * other (first[s] is sequence s's first), split over the threads. */
typedef struct {
    AttnTask *seqs;
    KnMask *masks;
    long *first;              /* [n + 1] */
    int n;
} AttnBatch;

static void attn_batch_task(void *p, int ith, int nth) {
    AttnBatch *b = p;
    long lo, hi;
    kn_split(b->first[b->n], ith, nth, &lo, &hi);
    float stack_scores[ATTN_STACK];
    int s = 0;
    for (long item = lo; item < hi; item++) {
        while (item >= b->first[s + 1]) s++;
        attn_item(&b->seqs[s], item - b->first[s], stack_scores);
    }
}

/* Batches of at most this many sequences per pool run (their tasks on the stack). */
#define ATTN_BATCH 64

static void cpu_attention_batch_forward(const KnCtx *ctx, float *out, const float *q, const int32_t *pos,
                                        const void *k, const void *v, KnDtype kv, int64_t block_len,
                                        const KnAttnSeq *seqs, int n_seqs, int n_heads, int n_kv_heads, int dim,
                                        float scale, int window) {
    if (kv == KN_BF16 && dim > KN_KV_BF16_MAX_DIM) abort(); /* outside the contract (ops.h): a caller's bug */
    AttnTask tasks[ATTN_BATCH];
    KnMask masks[ATTN_BATCH];
    CpuDots dots = cpu_dots();
    long first[ATTN_BATCH + 1];
    for (int s0 = 0; s0 < n_seqs; s0 += ATTN_BATCH) {
        AttnBatch b = {tasks, masks, first, n_seqs - s0 < ATTN_BATCH ? n_seqs - s0 : ATTN_BATCH};
        int64_t work = 0;
        first[0] = 0;
        for (int i = 0; i < b.n; i++) {
            const KnAttnSeq *sq = &seqs[s0 + i];
            masks[i] = (KnMask){sq->valid, sq->group, window};
            size_t at = (size_t)(sq->row0 * n_heads * dim);
            int64_t pos0 = pos[sq->row0], n_keys = pos0 + sq->n_q;
            tasks[i] = (AttnTask){out + at, q + at, k, v, sq->n_q, pos0, n_keys, n_heads, n_kv_heads, dim,
                                  scale, &masks[i], sq->table, block_len, kv == KN_BF16, dots};
            first[i + 1] = first[i] + (long)(sq->n_q * n_heads);
            work += sq->n_q * n_heads * n_keys * dim;
        }
        if (work < CPU_PARALLEL_MIN_WORK) attn_batch_task(&b, 0, 1);
        else kn_pool_run(ctx->pool, attn_batch_task, &b);
    }
}

/* One sequence of one row per entry of rows: attention_batch's tasks. */
static void cpu_attention_rows_forward(const KnCtx *ctx, float *out, const float *q, const int32_t *pos,
                                       const void *k, const void *v, KnDtype kv, int64_t block_len,
                                       const KnAttnRow *rows, int64_t n, int n_heads, int n_kv_heads, int dim,
                                       float scale, int window) {
    KnAttnSeq seqs[ATTN_BATCH];
    for (int64_t r0 = 0; r0 < n; r0 += ATTN_BATCH) {
        int m = n - r0 < ATTN_BATCH ? (int)(n - r0) : ATTN_BATCH;
        for (int i = 0; i < m; i++) seqs[i] = (KnAttnSeq){r0 + i, 1, rows[r0 + i].table, rows[r0 + i].valid, rows[r0 + i].group};
        cpu_attention_batch_forward(ctx, out, q, pos, k, v, kv, block_len, seqs, m, n_heads, n_kv_heads, dim, scale,
                                    window);
    }
}

static void cpu_nf4_quantize(const KnCtx *ctx, KnNf4 *q, KnMatrix w, void *scratch) {
    (void)ctx;
    kn_nf4_quantize_into(q, w, scratch);
}

const KnOps CPU_OPS = {
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .copy = cpu_copy,
    .memset = cpu_memset,
    .synchronize = cpu_synchronize,
    .supports = cpu_supports,
    .matmul = cpu_matmul_forward,
    .rmsnorm = cpu_rmsnorm_forward,
    .rmsnorm_add = cpu_rmsnorm_add,
    .rmsnorm_rope = cpu_rmsnorm_rope,
    .attention = cpu_attention_forward,
    .attention_paged = cpu_attention_paged_forward,
    .attention_batch = cpu_attention_batch_forward,
    .attention_rows = cpu_attention_rows_forward,
    .attention_bulk = cpu_attention_forward,
    .gelu_tanh = cpu_gelu_tanh_forward,
    .gelu_gate = cpu_gelu_gate_forward,
    .softcap = cpu_softcap_forward,
    .embed_rows = cpu_embed_rows_forward,
    .add = cpu_add_forward,
    .mul = cpu_mul_forward,
    .scale = cpu_scale_forward,
    .round_bf16 = cpu_round_bf16_forward,
    .widen_bf16 = cpu_widen_bf16_forward,
    .sample = cpu_sample_forward,
    .adamw = cpu_adamw_forward,
    .sq_norm = cpu_sq_norm_forward,
    .mul_acc = cpu_mul_acc_forward,
    .rows_gather = cpu_rows_gather_forward,
    .rows_scatter = cpu_rows_scatter_forward,
    .rows_scatter_bf16 = cpu_rows_scatter_bf16_forward,
    .xent_softcap = cpu_xent_softcap_forward,
    .rows_sum = cpu_rows_sum_forward,
    .embed_rows_add = cpu_embed_rows_add_forward,
    .clamp = cpu_clamp_forward,
    .clamp_dx = cpu_clamp_backward,
    .scale_shift = cpu_scale_shift_forward,
    .standardize = cpu_standardize_forward,
    .rope_rows = cpu_rope_rows_forward,
    .moe_route = cpu_moe_route_forward,
    .moe_experts = cpu_moe_experts_forward,
    .moe_experts_dx = cpu_moe_experts_backward,
    .moe_route_dx = cpu_moe_route_backward,
    .lora_shrink = cpu_lora_shrink_forward,
    .lora_expand = cpu_lora_expand_forward,
    .lora_rows_shrink = cpu_lora_rows_shrink_forward,
    .lora_rows_expand = cpu_lora_rows_expand_forward,
    .lora_expand_dx = cpu_lora_expand_backward,
    .lora_shrink_dx = cpu_lora_shrink_backward,
    .matmul_dx = cpu_matmul_backward,
    .rmsnorm_dx = cpu_rmsnorm_backward,
    .gelu_tanh_dx = cpu_gelu_tanh_backward,
    .gelu_gate_dx = cpu_gelu_gate_backward,
    .attention_dx = cpu_attention_backward,
    .nf4_quantize = cpu_nf4_quantize,
};

const KnOps *cpu_backend_ops(void) { return &CPU_OPS; }
