/* cpu_moe.c - mixture-of-experts routing and the experts' MLPs, forward and
 * backward. Tokens run one after another (each expert matmul threaded over
 * its outputs), so every token gets exactly what it would get alone. */
#include <math.h>
#include <string.h>

#include "cpu_impl.h"

static KnMatrix expert(KnMatrix all, int e, int64_t rows) { return kn_matrix_rows(all, e * rows, rows); }

/* Softmax in place, stable top-K (lower index wins ties), renormalized
 * coefficients times the expert's scale. */
void cpu_moe_route_forward(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                           int64_t n, int E, int K) {
    (void)ctx;
    for (int64_t t = 0; t < n; t++) {
        float *pt = p + t * E, mx = pt[0], sum = 0.0f, wsum = 0.0f;
        int32_t *it = idx + t * K;
        for (int e = 1; e < E; e++) mx = pt[e] > mx ? pt[e] : mx;
        for (int e = 0; e < E; e++) sum += (pt[e] = expf(pt[e] - mx));
        for (int e = 0; e < E; e++) pt[e] /= sum;
        for (int k = 0; k < K; k++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int j = 0; j < k; j++) taken |= it[j] == e;
                if (!taken && (best < 0 || pt[e] > pt[best])) best = e;
            }
            it[k] = best;
            wsum += (w[t * K + k] = pt[best]);
        }
        for (int k = 0; k < K; k++) coef[t * K + k] = w[t * K + k] / wsum * expert_scale[it[k]];
    }
}

void cpu_moe_experts_forward(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef,
                             float *gu, float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down) {
    int64_t H = gate_up.cols, Im = down.cols;
    for (int64_t t = 0; t < n; t++) {
        float *yt = y + t * H;
        memset(yt, 0, (size_t)H * sizeof(float));
        for (int k = 0; k < K; k++) {
            int64_t tk = t * K + k;
            float *g = gu + tk * 2 * Im, *m = mm + tk * Im, *o = yk + tk * H;
            cpu_matmul_forward(ctx, g, x + t * H, expert(gate_up, idx[tk], 2 * Im), 1);
            cpu_gelu_gate_forward(ctx, m, g, g + Im, 1, Im, Im);
            cpu_matmul_forward(ctx, o, m, expert(down, idx[tk], H), 1);
            for (int64_t i = 0; i < H; i++) yt[i] += coef[tk] * o[i];
        }
    }
}

void cpu_moe_experts_backward(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                              const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                              KnMatrix down) {
    int64_t H = gate_up.cols, Im = down.cols;
    float *dmm = scratch, *dgu = scratch + Im; /* [Im], then [2 Im] */
    for (int64_t t = 0; t < n; t++) {
        const float *dyt = dy + t * H;
        memset(dx + t * H, 0, (size_t)H * sizeof(float));
        for (int k = 0; k < K; k++) {
            int64_t tk = t * K + k;
            const float *g = gu + tk * 2 * Im, *o = yk + tk * H;
            float d = 0.0f;
            for (int64_t i = 0; i < H; i++) d += dyt[i] * o[i];
            dc[tk] = d;
            memset(dmm, 0, (size_t)Im * sizeof(float));
            cpu_matmul_backward(ctx, dmm, dyt, expert(down, idx[tk], H), 1);
            for (int64_t i = 0; i < Im; i++) dmm[i] *= coef[tk];
            cpu_gelu_gate_backward(ctx, dgu, dgu + Im, dmm, g, g + Im, (size_t)Im);
            cpu_matmul_backward(ctx, dx + t * H, dgu, expert(gate_up, idx[tk], 2 * Im), 1);
        }
    }
}

void cpu_moe_route_backward(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                            const float *p, const float *expert_scale, int64_t n, int E, int K) {
    (void)ctx;
    for (int64_t t = 0; t < n; t++) {
        const int32_t *it = idx + t * K;
        const float *wt = w + t * K, *pt = p + t * E;
        float *dp = dlogits + t * E, dwn[256], wsum = 0.0f, corr = 0.0f, pdp = 0.0f;
        for (int k = 0; k < K; k++) wsum += wt[k];
        for (int k = 0; k < K; k++) dwn[k] = dc[t * K + k] * expert_scale[it[k]];
        memset(dp, 0, (size_t)E * sizeof(float));
        for (int k = 0; k < K; k++) corr += dwn[k] * wt[k];
        for (int k = 0; k < K; k++) dp[it[k]] = dwn[k] / wsum - corr / (wsum * wsum);
        for (int e = 0; e < E; e++) pdp += pt[e] * dp[e];
        for (int e = 0; e < E; e++) dp[e] = pt[e] * (dp[e] - pdp);
    }
}
