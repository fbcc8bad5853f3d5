/* sample.c - greedy, temperature, top-k and top-p token choice. */
#include "sample.h"

#include <math.h>
#include <stdlib.h>

#define CUTOFF 40.0f          /* candidates within e^-40 of the best */

GfStatus sample_work_init(SampleWork *w, int64_t vocab, GfError *err) {
    w->vocab = vocab;
    w->c = gf_malloc((size_t)vocab * sizeof *w->c, err);
    return w->c ? GF_OK : GF_NO_MEMORY;
}

void sample_work_free(SampleWork *w) {
    free(w->c);
    w->c = NULL;
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t sample_seed(uint64_t seed) {
    uint64_t s = seed;
    return splitmix(&s);
}

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

/* Descending probability, ties by id: a total order. */
static int cand_cmp(const void *a, const void *b) {
    const SampleCand *x = a, *y = b;
    if (x->p != y->p) return x->p > y->p ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

int32_t sample_next(const float *logits, const SampleParams *p, uint64_t *rng, SampleWork *w) {
    int64_t V = w->vocab;
    int32_t best = argmax(logits, V);
    if (p->temperature <= 0.0f || p->top_k == 1) return best;
    SampleCand *c = w->c;
    float top = logits[best], inv_t = 1.0f / p->temperature;
    int64_t n = 0;
    for (int64_t i = 0; i < V; i++) {
        float z = (logits[i] - top) * inv_t;
        if (z > -CUTOFF) c[n++] = (SampleCand){expf(z), (int32_t)i};
    }
    qsort(c, (size_t)n, sizeof *c, cand_cmp);
    if (p->top_k > 0 && n > p->top_k) n = p->top_k;
    double total = 0;
    for (int64_t i = 0; i < n; i++) total += c[i].p;
    if (p->top_p < 1.0f) {
        double keep = 0;
        int64_t k = 0;
        while (k < n && keep < p->top_p * total) keep += c[k++].p;
        n = k > 0 ? k : 1;
        total = keep > 0 ? keep : c[0].p;
    }
    double u = (double)(splitmix(rng) >> 11) * (1.0 / 9007199254740992.0) * total, acc = 0;
    for (int64_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc) return c[i].id;
    }
    return c[n - 1].id;
}
