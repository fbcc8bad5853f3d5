/* cpu_loss.c - the softcapped cross-entropy of a chunk of rows: the loss of
 * each row (in double) and, when asked, the gradient written over the
 * logits. The log-sum-exp runs in double over float differences. */
#include <math.h>

#include "cpu_impl.h"

typedef struct {
    double *loss;
    float *z;
    const int32_t *targets;
    int64_t V;
    float cap, scale;
    int grad;
} XentArgs;

static void xent_rows(void *p, int64_t lo, int64_t hi) {
    const XentArgs *a = p;
    const KnCtx serial = {0}; /* no pool: this runs inside one */
    float cap = a->cap;
    for (int64_t r = lo; r < hi; r++) {
        float *zr = a->z + r * a->V;
        if (cap > 0) cpu_softcap_forward(&serial, zr, (size_t)a->V, cap);
        float mx = zr[0];
        for (int64_t v = 1; v < a->V; v++) mx = zr[v] > mx ? zr[v] : mx;
        double sum = 0.0;
        for (int64_t v = 0; v < a->V; v++) sum += exp((double)(zr[v] - mx));
        double lse = (double)mx + log(sum);
        a->loss[r] = lse - (double)zr[a->targets[r]];
        for (int64_t v = 0; a->grad && v < a->V; v++) {
            float g = (float)exp((double)zr[v] - lse) - (v == a->targets[r] ? 1.0f : 0.0f);
            if (cap > 0) g *= 1.0f - (zr[v] / cap) * (zr[v] / cap); /* d cap tanh(l / cap) / dl */
            zr[v] = g * a->scale;
        }
    }
}

/* A row at a time on each thread: a row's sums keep their order. */
void cpu_xent_softcap_forward(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                              float cap, float scale, int grad) {
    XentArgs a = {loss, z, targets, V, cap, scale, grad};
    cpu_for_range(ctx, rows, V * 64, xent_rows, &a);
}
