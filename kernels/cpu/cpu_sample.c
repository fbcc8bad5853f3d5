/* cpu_sample.c - the next token of each row of logits: greedy, or a draw at
 * a temperature within the top-k tokens and the nucleus top_p. Candidates
 * are ordered by probability, ties by token id (a total order, so the
 * choice never depends on sort stability); tokens below e^-40 of the best
 * are left out before sorting. The draw advances the row's own splitmix64
 * state once.
 *
 * The sort is a stable radix sort of the candidates, made in id order, on
 * P = bits(1.0f) - bits(p) < 2^29 (p in (e^-40, 1]; P ascending is p
 * descending): three passes of 9, 10 and 10 bits through a buffer of the
 * call, about 25 times faster than comparison sorting Gemma's 262,144
 * tokens. Without that buffer (no memory), qsort gives the same order.
 * Rows that draw are shared among the context's threads. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_impl.h"

#define CUTOFF 40.0f

typedef struct {
    float p;                  /* unnormalized probability */
    int32_t id;
} Cand;

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

static int cand_cmp(const void *a, const void *b) {
    const Cand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

#define P_ONE 0x3F800000u /* bits of 1.0f */

static uint32_t cand_P(const Cand *c) {
    uint32_t b;
    memcpy(&b, &c->p, sizeof b);
    return P_ONE - b;
}

/* One stable counting pass of src[n] into dst by the bits of P at shift. */
static void radix_pass(const Cand *src, Cand *dst, int64_t n, int shift, int bits) {
    int64_t at[1024] = {0};
    uint32_t mask = (1u << bits) - 1u;
    for (int64_t i = 0; i < n; i++) at[cand_P(&src[i]) >> shift & mask]++;
    int64_t sum = 0;
    for (uint32_t d = 0; d <= mask; d++) {
        int64_t k = at[d];
        at[d] = sum;
        sum += k;
    }
    for (int64_t i = 0; i < n; i++) dst[at[cand_P(&src[i]) >> shift & mask]++] = src[i];
}

/* c[n] (in id order) sorted by cand_cmp's order; tmp (NULL: none) holds n. */
static void sort_cands(Cand *c, int64_t n, Cand *tmp) {
    if (!tmp) {
        qsort(c, (size_t)n, sizeof *c, cand_cmp);
        return;
    }
    radix_pass(c, tmp, n, 0, 9);
    radix_pass(tmp, c, n, 9, 10);
    radix_pass(c, tmp, n, 19, 10);
    memcpy(c, tmp, (size_t)n * sizeof *c);
}

/* 0 for a greedy row (temperature 0, or top_k 1). */
static int draws(const KnSampleRow *r) { return r->temperature > 0.0f && r->top_k != 1; }

static int32_t sample_row(const float *logits, int64_t V, KnSampleRow *r, Cand *c, Cand *tmp) {
    int32_t best = argmax(logits, V);
    if (!draws(r)) return best;
    float top = logits[best], inv_t = 1.0f / r->temperature;
    int64_t n = 0;
    for (int64_t i = 0; i < V; i++) {
        float z = (logits[i] - top) * inv_t;
        if (z > -CUTOFF) c[n++] = (Cand){expf(z), (int32_t)i};
    }
    if (n == 0) { /* no candidate (a non-finite maximum): the maximum, the draw spent */
        gf_splitmix64(&r->rng);
        return best;
    }
    sort_cands(c, n, tmp);
    if (r->top_k > 0 && n > r->top_k) n = r->top_k;
    double total = 0;
    for (int64_t i = 0; i < n; i++) total += c[i].p;
    if (r->top_p < 1.0f) {
        double keep = 0;
        int64_t k = 0;
        while (k < n && keep < r->top_p * total) keep += c[k++].p;
        n = k > 0 ? k : 1;
        total = keep > 0 ? keep : c[0].p;
    }
    double u = (double)(gf_splitmix64(&r->rng) >> 11) * (1.0 / 9007199254740992.0) * total, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc) return c[i].id;
    }
    return c[n - 1].id;
}

/* Rows ith, ith + nth, ... of a call: thread 0 sorts in the call's scratch,
 * the others in their own buffer; a thread without one leaves its drawing
 * rows to the caller (left). */
typedef struct {
    int32_t *ids;
    const float *logits;
    KnSampleRow *rows;
    int64_t n, V;
    Cand *scratch;
    uint8_t *left;
} SampleTask;

static void sample_task(void *arg, int ith, int nth) {
    SampleTask *t = arg;
    int need = 0;
    for (int64_t i = ith; i < t->n && !need; i += nth) need = draws(&t->rows[i]);
    Cand *c = !need ? NULL : ith == 0 ? t->scratch : malloc((size_t)t->V * sizeof *c);
    Cand *tmp = c ? malloc((size_t)t->V * sizeof *tmp) : NULL;
    for (int64_t i = ith; i < t->n; i += nth) {
        if (draws(&t->rows[i]) && !c) t->left[i] = 1;
        else t->ids[i] = sample_row(t->logits + i * t->V, t->V, &t->rows[i], c, tmp);
    }
    if (ith) free(c);
    free(tmp);
}

void cpu_sample_forward(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                        void *scratch) {
    int64_t drawing = 0;
    for (int64_t i = 0; i < n; i++) drawing += draws(&rows[i]);
    uint8_t *left = calloc((size_t)n + 1, 1);
    SampleTask t = {ids, logits, rows, n, V, scratch, left};
    if (drawing > 1 && left && ctx->pool) kn_pool_run(ctx->pool, sample_task, &t); /* a row a thread at a time */
    else if (left) sample_task(&t, 0, 1);
    for (int64_t i = 0; i < n; i++) /* rows no thread had memory for: one by one in scratch, qsort */
        if (!left || left[i]) ids[i] = sample_row(logits + i * V, V, &rows[i], scratch, NULL);
    free(left);
}
