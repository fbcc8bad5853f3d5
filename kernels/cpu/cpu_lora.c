/* cpu_lora.c - the grouped LoRA kernels (SGMV: segments of rows, each with
 * its own adapter matrices), forward and backward, with LoRA dropout's
 * hashed masks. Each output element sums its terms in one order, one row at
 * a time (dot products in cpu_dot's order, accumulations over rows and
 * ranks in index order), so the result does not depend on how rows are
 * grouped or on the thread count: every output has one owner. */
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
    CpuDots dots;
} LoraTask;

/* One row's terms, shared by the segment and the row ops so that both sum
 * alike: tr[k] = scale * sum_j x[j] A[k, j], and y[o] += sum_k tr[k] B[o, k]. */
static void shrink_one(const CpuDots *d, float *tr, const float *x, const float *A, int rank, float scale, int64_t in) {
    int k = 0;
    for (; k + 4 <= rank; k += 4) {
        const float *a[4] = {A + (int64_t)k * in, A + (int64_t)(k + 1) * in, A + (int64_t)(k + 2) * in,
                             A + (int64_t)(k + 3) * in};
        float acc[4];
        d->dot4(x, a, in, acc);
        for (int j = 0; j < 4; j++) tr[k + j] = acc[j] * scale;
    }
    for (; k < rank; k++) tr[k] = d->dot(x, A + (int64_t)k * in, in) * scale;
}

static void expand_one(const CpuDots *d, float *y, const float *tr, const float *B, int rank, int64_t out) {
    int64_t o = 0;
    for (; o + 4 <= out; o += 4) {
        const float *b[4] = {B + o * rank, B + (o + 1) * rank, B + (o + 2) * rank, B + (o + 3) * rank};
        float acc[4];
        d->dot4(tr, b, rank, acc);
        for (int j = 0; j < 4; j++) y[o + j] += acc[j];
    }
    for (; o < out; o++) y[o] += d->dot(tr, B + o * rank, rank);
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
    shrink_one(&t->dots, t->out + r * t->ld_t, x, s->A, s->rank, s->scale, t->width);
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
        expand_one(&t->dots, t->out + r * t->width, t->in + r * t->ld_t, s->B, s->rank, t->width);
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
    LoraTask task = {t, x, segs, n_segs, rows_end(segs, n_segs), in, ld_t, dropout_buf, cpu_dots()};
    int dropout = 0;
    for (int k = 0; k < n_segs; k++) dropout |= segs[k].dropout > 0;
    if (dropout) shrink_task(&task, 0, 1);
    else run_rows(ctx, shrink_task, &task, task.n_rows * in * 8);
}

void cpu_lora_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                             int64_t out) {
    LoraTask task = {y, t, segs, n_segs, rows_end(segs, n_segs), out, ld_t, NULL, cpu_dots()};
    run_rows(ctx, expand_task, &task, task.n_rows * out * 8);
}

/* ---- one adapter per row (KnLoraRow) ------------------------------------------ */

typedef struct {
    float *out;
    const float *in;
    const KnLoraRow *rows;
    int64_t n, width, ld_t;    /* width: in (shrink) or out (expand) */
    int shrink;                /* 1: out = t (ld_t) from in = x; 0: out = y += from in = t (ld_t) */
    CpuDots dots;
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
        if (t->shrink)
            shrink_one(&t->dots, t->out + r * t->ld_t, t->in + r * t->width, w->A, w->rank, w->scale, t->width);
        else expand_one(&t->dots, t->out + r * t->width, t->in + r * t->ld_t, w->B, w->rank, t->width);
    }
}

void cpu_lora_rows_shrink_forward(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows,
                                  int64_t n, int64_t in, int max_rank) {
    RowsTask task = {t, x, rows, n, in, ld_t, 1, cpu_dots()};
    run_rows(ctx, rows_task, &task, n * in * max_rank);
}

void cpu_lora_rows_expand_forward(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows,
                                  int64_t n, int64_t out) {
    RowsTask task = {y, t, rows, n, out, ld_t, 0, cpu_dots()};
    run_rows(ctx, rows_task, &task, n * out * 8);
}

/* ---- backward ---------------------------------------------------------------- */

/* A backward pass over the segments' rows (the row's outputs are its own)
 * or over columns (each thread a range of the adapters' gradient columns,
 * every row in order), with the op's arguments. */
typedef struct {
    float *dx, *gt;             /* shrink's dx, expand's gt (outputs) */
    const float *g;             /* shrink's gt */
    const float *dy, *t, *x;
    const KnLoraSeg *segs;
    int n_segs, dropout;
    int64_t ld_t, width;        /* width: out (expand) or in (shrink) */
    float *buf;                 /* dropout: 2 * in floats (single-threaded then) */
} LoraDxTask;

/* gt[r, k] = sum_o dy[r, o] B[o, k], o in order */
static void expand_dx_rows(void *p, int ith, int nth) {
    const LoraDxTask *t = p;
    long lo, hi;
    kn_split((long)rows_end(t->segs, t->n_segs), ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        int64_t i;
        const KnLoraSeg *s = seg_of(t->segs, t->n_segs, r, &i);
        if (!s) continue;
        float *g = t->gt + r * t->ld_t;
        const float *dyr = t->dy + r * t->width;
        memset(g, 0, (size_t)s->rank * sizeof *g);
        for (int64_t o = 0; o < t->width; o++) cpu_axpy(g, dyr[o], s->B + o * s->rank, s->rank);
    }
}

/* dB[o, k] += dy[r, o] t[r, k] for the thread's outputs o, segments and
 * rows in order */
static void expand_dx_cols(void *p, int ith, int nth) {
    const LoraDxTask *t = p;
    long lo, hi;
    kn_split((long)t->width, ith, nth, &lo, &hi);
    for (int q = 0; q < t->n_segs; q++) {
        const KnLoraSeg *s = &t->segs[q];
        if (!s->dB) continue;
        for (int64_t r = s->row0; r < s->row0 + s->n_rows; r++) {
            const float *dyr = t->dy + r * t->width, *tr = t->t + r * t->ld_t;
            for (long o = lo; o < hi; o++) cpu_axpy(s->dB + o * s->rank, dyr[o], tr, s->rank);
        }
    }
}

static void run_dx(const KnCtx *ctx, KnTask fn, LoraDxTask *t, int64_t work) {
    if (t->dropout) fn(t, 0, 1);
    else run_rows(ctx, fn, t, work);
}

void cpu_lora_expand_backward(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                              const KnLoraSeg *segs, int n_segs, int64_t out) {
    LoraDxTask task = {NULL, gt, NULL, dy, t, NULL, segs, n_segs, 0, ld_t, out, NULL};
    int64_t work = rows_end(segs, n_segs) * out * 8;
    run_dx(ctx, expand_dx_rows, &task, work);
    run_dx(ctx, expand_dx_cols, &task, work);
}

/* Row i of segment s's input as the adapter saw it: x's row, or d(x) in
 * the second half of the task's buffer. */
static const float *shrink_input(const LoraDxTask *t, const KnLoraSeg *s, int64_t i) {
    int64_t in = t->width;
    const float *xr = t->x + (s->row0 + i) * in;
    if (s->dropout <= 0) return xr;
    dropout_row(s, i, xr, in, t->buf, t->buf + in);
    return t->buf + in;
}

/* dA[k, j] += g[r, k] d(x)[r, j] for the thread's columns j, segments, rows
 * and ranks in order */
static void shrink_dx_cols(void *p, int ith, int nth) {
    const LoraDxTask *t = p;
    long lo, hi;
    kn_split((long)t->width, ith, nth, &lo, &hi);
    for (int q = 0; q < t->n_segs; q++) {
        const KnLoraSeg *s = &t->segs[q];
        if (!s->dA) continue;
        for (int64_t i = 0; i < s->n_rows; i++) {
            const float *xr = shrink_input(t, s, i);
            const float *gr = t->g + (s->row0 + i) * t->ld_t;
            for (int k = 0; k < s->rank; k++)
                cpu_axpy(s->dA + (int64_t)k * t->width + lo, gr[k] * s->scale, xr + lo, hi - lo);
        }
    }
}

/* dx[r, j] += g[r, k] A[k, j] f[r, j], ranks in order */
static void shrink_dx_rows(void *p, int ith, int nth) {
    const LoraDxTask *t = p;
    long lo, hi;
    int64_t in = t->width;
    kn_split((long)rows_end(t->segs, t->n_segs), ith, nth, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        int64_t i;
        const KnLoraSeg *s = seg_of(t->segs, t->n_segs, r, &i);
        if (!s) continue;
        const float *f = NULL;
        if (s->dropout > 0) {
            dropout_row(s, i, NULL, in, t->buf, NULL);
            f = t->buf;
        }
        float *dxr = t->dx + r * in;
        for (int k = 0; k < s->rank; k++) {
            float g = t->g[r * t->ld_t + k] * s->scale;
            const float *a = s->A + (int64_t)k * in;
            if (f)
                for (int64_t j = 0; j < in; j++) dxr[j] += g * a[j] * f[j];
            else
                cpu_axpy(dxr, g, a, in);
        }
    }
}

void cpu_lora_shrink_backward(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                              const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    LoraDxTask task = {dx, NULL, gt, NULL, NULL, x, segs, n_segs, 0, ld_t, in, dropout_buf};
    int max_rank = 0;
    for (int k = 0; k < n_segs; k++) {
        task.dropout |= segs[k].dropout > 0;
        if (segs[k].rank > max_rank) max_rank = segs[k].rank;
    }
    int64_t work = rows_end(segs, n_segs) * in * max_rank;
    run_dx(ctx, shrink_dx_cols, &task, work);
    if (dx) run_dx(ctx, shrink_dx_rows, &task, work);
}
