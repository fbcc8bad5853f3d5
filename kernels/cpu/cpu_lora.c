/* cpu_lora.c - the grouped LoRA kernels (SGMV: segments of rows, each with
 * its own adapter matrices), forward and backward, with LoRA dropout's
 * hashed masks. Each output element sums its terms in index order, one row
 * at a time, so the result does not depend on how rows are grouped or on
 * the thread count. */
#include <string.h>

#include "cpu_impl.h"

/* Dropout factors f[in] of row i of segment s (0 or 1 / (1 - p)), as ops.h
 * defines them; and d(x) = x * f into dx when x is given. */
static void dropout_row(const KnLoraSeg *s, int64_t i, const float *x, int64_t in, float *f, float *dx) {
    float keep = 1.0f / (1.0f - s->dropout);
    uint32_t cut = (uint32_t)((double)s->dropout * 4294967296.0);
    uint64_t base = s->dropout_seed + (uint64_t)i * (uint64_t)in;
    for (int64_t j = 0; j < in; j++) f[j] = (uint32_t)(gf_mix64(base + (uint64_t)j) >> 32) < cut ? 0.0f : keep;
    if (x)
        for (int64_t j = 0; j < in; j++) dx[j] = x[j] * f[j];
}

/* The segment holding row r and r's index within it, or NULL. */
static const KnLoraSeg *seg_of(const KnLoraSeg *segs, int n_segs, int64_t r, int64_t *i) {
    for (int k = 0; k < n_segs; k++)
        if (r >= segs[k].row0 && r < segs[k].row0 + segs[k].n_rows) {
            *i = r - segs[k].row0;
            return &segs[k];
        }
    return NULL;
}

/* ---- forward ----------------------------------------------------------------- */

typedef struct {
    float *out;
    const float *in;
    const KnLoraSeg *segs;
    int n_segs;
    int64_t n_rows, width, ld_t; /* width: in (shrink) or out (expand) */
    float *buf;                  /* shrink with dropout: 2 * in floats (single-threaded then) */
} LoraTask;

/* One row's terms, shared by the segment and the row ops so that both sum
 * alike: tr[k] = scale * sum_j x[j] A[k, j], and y[o] += sum_k tr[k] B[o, k]. */
static void shrink_one(float *tr, const float *x, const float *A, int rank, float scale, int64_t in) {
    for (int k = 0; k < rank; k++) {
        const float *a = A + (int64_t)k * in;
        float acc = 0.0f;
        for (int64_t j = 0; j < in; j++) acc += x[j] * a[j];
        tr[k] = acc * scale;
    }
}

static void expand_one(float *y, const float *tr, const float *B, int rank, int64_t out) {
    for (int64_t o = 0; o < out; o++) {
        const float *b = B + o * rank;
        float acc = 0.0f;
        for (int k = 0; k < rank; k++) acc += tr[k] * b[k];
        y[o] += acc;
    }
}

/* t[r, k] = scale * sum_j d(x)[r, j] A[k, j]; the row buffer holds the
 * dropout factors and d(x) of one row (2 * in floats) when p > 0. */
static void shrink_row(const LoraTask *t, int64_t r, float *buf) {
    int64_t i;
    const KnLoraSeg *s = seg_of(t->segs, t->n_segs, r, &i);
    if (!s) return;
    const float *x = t->in + r * t->width;
    if (s->dropout > 0) {
        dropout_row(s, i, x, t->width, buf, buf + t->width);
        x = buf + t->width;
    }
    shrink_one(t->out + r * t->ld_t, x, s->A, s->rank, s->scale, t->width);
}

static void shrink_task(void *p, int ith, int nth) {
    LoraTask *t = p;
    long lo, hi;
    kn_split((long)t->n_rows, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) shrink_row(t, r, t->buf);
}

/* y[r, o] += sum_k t[r, k] B[o, k] */
static void expand_task(void *p, int ith, int nth) {
    LoraTask *t = p;
    long lo, hi;
    kn_split((long)t->n_rows, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        int64_t i;
        const KnLoraSeg *s = seg_of(t->segs, t->n_segs, r, &i);
        if (!s) continue;
        expand_one(t->out + r * t->width, t->in + r * t->ld_t, s->B, s->rank, t->width);
    }
}

/* Rows spanned by the segments. */
static int64_t rows_end(const KnLoraSeg *segs, int n_segs) {
    int64_t end = 0;
    for (int k = 0; k < n_segs; k++)
        if (segs[k].row0 + segs[k].n_rows > end) end = segs[k].row0 + segs[k].n_rows;
    return end;
}

static void run_rows(const KnCtx *ctx, KnTask fn, void *t, int64_t work) {
    if (work < CPU_PARALLEL_MIN_WORK) fn(t, 0, 1);
    else kn_pool_run(ctx->pool, fn, t);
}

void cpu_lora_shrink_forward(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                             int64_t in, float *dropout_buf) {
    LoraTask task = {t, x, segs, n_segs, rows_end(segs, n_segs), in, ld_t, dropout_buf};
    int dropout = 0;
    for (int k = 0; k < n_segs; k++) dropout |= segs[k].dropout > 0;
    if (dropout) shrink_task(&task, 0, 1);
    else run_rows(ctx, shrink_task, &task, task.n_rows * in * 8);
}

void cpu_lora_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                             int64_t out) {
    LoraTask task = {y, t, segs, n_segs, rows_end(segs, n_segs), out, ld_t, NULL};
    run_rows(ctx, expand_task, &task, task.n_rows * out * 8);
}

/* ---- one adapter per row (KnLoraRow) ------------------------------------------ */

typedef struct {
    float *out;
    const float *in;
    const KnLoraRow *rows;
    int64_t n, width, ld_t;    /* width: in (shrink) or out (expand) */
    int shrink;                /* 1: out = t (ld_t) from in = x; 0: out = y += from in = t (ld_t) */
} RowsTask;

/* Each row with an adapter (rank > 0) through shrink_one or expand_one;
 * rank-0 rows are left as they are. */
static void rows_task(void *p, int ith, int nth) {
    RowsTask *t = p;
    long lo, hi;
    kn_split((long)t->n, ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        const KnLoraRow *w = &t->rows[r];
        if (w->rank <= 0) continue;
        if (t->shrink) shrink_one(t->out + r * t->ld_t, t->in + r * t->width, w->A, w->rank, w->scale, t->width);
        else expand_one(t->out + r * t->width, t->in + r * t->ld_t, w->B, w->rank, t->width);
    }
}

void cpu_lora_rows_shrink_forward(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows,
                                  int64_t n, int64_t in, int max_rank) {
    RowsTask task = {t, x, rows, n, in, ld_t, 1};
    run_rows(ctx, rows_task, &task, n * in * max_rank);
}

void cpu_lora_rows_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows,
                                  int64_t n, int64_t out) {
    RowsTask task = {y, t, rows, n, out, ld_t, 0};
    run_rows(ctx, rows_task, &task, n * out * 8);
}

/* ---- backward ---------------------------------------------------------------- */

void cpu_lora_expand_backward(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                              const KnLoraSeg *segs, int n_segs, int64_t out) {
    (void)ctx;
    for (int q = 0; q < n_segs; q++) {
        const KnLoraSeg *s = &segs[q];
        for (int64_t r = s->row0; r < s->row0 + s->n_rows; r++) {
            const float *dyr = dy + r * out, *tr = t + r * ld_t;
            float *g = gt + r * ld_t;
            for (int k = 0; k < s->rank; k++) g[k] = 0.0f;
            for (int64_t o = 0; o < out; o++) {
                const float *b = s->B + o * s->rank;
                float *db = s->dB + o * s->rank, d = dyr[o];
                for (int k = 0; k < s->rank; k++) {
                    g[k] += d * b[k];
                    db[k] += d * tr[k];
                }
            }
        }
    }
}

void cpu_lora_shrink_backward(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                              const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    (void)ctx;
    for (int q = 0; q < n_segs; q++) {
        const KnLoraSeg *s = &segs[q];
        for (int64_t i = 0; i < s->n_rows; i++) {
            int64_t r = s->row0 + i;
            const float *xr = s->dA ? x + r * in : NULL, *f = NULL;
            if (s->dropout > 0) {
                dropout_row(s, i, xr, in, dropout_buf, dropout_buf + in);
                f = dropout_buf;
                xr = xr ? dropout_buf + in : NULL;
            }
            for (int k = 0; k < s->rank; k++) {
                float g = gt[r * ld_t + k] * s->scale;
                const float *a = s->A + (int64_t)k * in;
                if (s->dA) {
                    float *da = s->dA + (int64_t)k * in;
                    for (int64_t j = 0; j < in; j++) da[j] += g * xr[j];
                }
                if (dx && f)
                    for (int64_t j = 0; j < in; j++) dx[r * in + j] += g * a[j] * f[j];
                else if (dx)
                    for (int64_t j = 0; j < in; j++) dx[r * in + j] += g * a[j];
            }
        }
    }
}
