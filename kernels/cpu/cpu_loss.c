/* cpu_loss.c - the softcapped cross-entropy of a chunk of rows: the loss of
 * each row (in double) and, when asked, the gradient written over the
 * logits. The log-sum-exp runs in double over float differences. */
#include <math.h>

#include "cpu_impl.h"

void cpu_xent_softcap_forward(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                              float cap, float scale, int grad) {
    for (int64_t r = 0; r < rows; r++) {
        float *zr = z + r * V;
        if (cap > 0) cpu_softcap_forward(ctx, zr, (size_t)V, cap);
        float mx = zr[0];
        for (int64_t v = 1; v < V; v++) mx = zr[v] > mx ? zr[v] : mx;
        double sum = 0.0;
        for (int64_t v = 0; v < V; v++) sum += exp((double)(zr[v] - mx));
        double lse = (double)mx + log(sum);
        loss[r] = lse - (double)zr[targets[r]];
        for (int64_t v = 0; grad && v < V; v++) {
            float g = (float)exp((double)zr[v] - lse) - (v == targets[r] ? 1.0f : 0.0f);
            if (cap > 0) g *= 1.0f - (zr[v] / cap) * (zr[v] / cap); /* d cap tanh(l / cap) / dl */
            zr[v] = g * scale;
        }
    }
}
