/* moe.c - the MoE block of one token (GEMMA4.md §3.8), forward and
 * backward as a pair: router (norm without scale, router_scale / sqrt(H),
 * softmax, stable top-k, renormalized, per_expert_scale), the chosen experts'
 * gated GELU MLPs on the pre_feedforward_layernorm_2 input, and the
 * post_feedforward_layernorm_2 of their weighted sum. */
#include <math.h>
#include <string.h>

#include "model_impl.h"

static void zero(float *x, int64_t n) { memset(x, 0, (size_t)n * sizeof(float)); }

size_t moe_tape_floats(const TextConfig *t) {
    if (!t->moe) return 0;
    size_t H = (size_t)t->hidden_size, E = (size_t)t->n_experts, K = (size_t)t->top_k_experts;
    size_t Im = (size_t)t->moe_intermediate;
    return 2 * H + 2 * E + K * (3 * Im + H) + 3 * H + 4 * Im;
}

void moe_tape_init(MoeTape *mt, const TextConfig *t, float *buf) {
    size_t H = (size_t)t->hidden_size, E = (size_t)t->n_experts, K = (size_t)t->top_k_experts;
    size_t Im = (size_t)t->moe_intermediate;
    memset(mt, 0, sizeof *mt);
    if (!t->moe || !buf) return;
    float **slots[] = {&mt->u0, &mt->u2, &mt->p, &mt->dp, &mt->gu, &mt->mm, &mt->yk, &mt->y, &mt->dy, &mt->du, &mt->dgu,
                       &mt->dmm, &mt->t};
    size_t sizes[] = {H, H, E, E, K * 2 * Im, K * Im, K * H, H, H, H, 2 * Im, Im, Im};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = buf;
        buf += sizes[i];
    }
}

static KnMatrix expert(KnMatrix all, int e, int64_t rows) { return kn_matrix_rows(all, e * rows, rows); }

/* out[H] = the MoE block of residual r[H], keeping what moe_backward needs. */
void moe_forward(Model *m, const Layer *l, const float *r, float *out, MoeTape *mt) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, E = t->n_experts, K = t->top_k_experts, Im = t->moe_intermediate;
    m->be.ops->rmsnorm(&m->be.ctx, mt->u0, r, NULL, 1, H, t->rms_eps);
    float hs = (float)(1.0 / sqrt((double)H));
    for (int64_t i = 0; i < H; i++) mt->du[i] = mt->u0[i] * (l->router_scale[i] * hs); /* router input */
    m->be.ops->matmul(&m->be.ctx, mt->p, mt->du, l->router, 1);
    float mx = mt->p[0], sum = 0.0f;
    for (int64_t e = 1; e < E; e++) mx = mt->p[e] > mx ? mt->p[e] : mx;
    for (int64_t e = 0; e < E; e++) sum += (mt->p[e] = expf(mt->p[e] - mx));
    for (int64_t e = 0; e < E; e++) mt->p[e] /= sum;
    mt->wsum = 0.0f;
    for (int64_t k = 0; k < K; k++) { /* stable top-k: lower index wins ties */
        int best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= mt->idx[j] == e;
            if (!taken && (best < 0 || mt->p[e] > mt->p[best])) best = (int)e;
        }
        mt->idx[k] = best;
        mt->wsum += (mt->w[k] = mt->p[best]);
    }
    m->be.ops->rmsnorm(&m->be.ctx, mt->u2, r, l->pre_ff_ln2, 1, H, t->rms_eps);
    zero(mt->y, H);
    for (int64_t k = 0; k < K; k++) {
        float *gu = mt->gu + k * 2 * Im, *mm = mt->mm + k * Im, *yk = mt->yk + k * H;
        m->be.ops->matmul(&m->be.ctx, gu, mt->u2, expert(l->experts_gate_up, mt->idx[k], 2 * Im), 1);
        memcpy(mm, gu, (size_t)Im * sizeof(float));
        m->be.ops->gelu_tanh(&m->be.ctx, mm, (size_t)Im);
        for (int64_t i = 0; i < Im; i++) mm[i] *= gu[Im + i];
        m->be.ops->matmul(&m->be.ctx, yk, mm, expert(l->experts_down, mt->idx[k], H), 1);
        float coef = mt->w[k] / mt->wsum * l->per_expert_scale[mt->idx[k]];
        for (int64_t i = 0; i < H; i++) mt->y[i] += coef * yk[i];
    }
    m->be.ops->rmsnorm(&m->be.ctx, out, mt->y, l->post_ff_ln2, 1, H, t->rms_eps);
}

/* dr[H] += the gradient of moe_forward at r for dout[H] (after moe_forward at r).
 * The experts are frozen; the gradient flows through their inputs and
 * through the routing weights into the router's input. */
void moe_backward(Model *m, const Layer *l, const float *r, const float *dout, float *dr, MoeTape *mt) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, E = t->n_experts, K = t->top_k_experts, Im = t->moe_intermediate;
    zero(mt->dy, H);
    m->be.ops->rmsnorm_dx(&m->be.ctx, mt->dy, mt->y, l->post_ff_ln2, dout, 1, H, t->rms_eps);
    float dwn[MOE_MAX_TOP_K]; /* gradient of the normalized routing weight w_k / wsum */
    zero(mt->du, H);
    for (int64_t k = 0; k < K; k++) {
        const float *gu = mt->gu + k * 2 * Im, *yk = mt->yk + k * H;
        float pes = l->per_expert_scale[mt->idx[k]], coef = mt->w[k] / mt->wsum * pes, dc = 0.0f;
        for (int64_t i = 0; i < H; i++) dc += mt->dy[i] * yk[i];
        dwn[k] = dc * pes;
        zero(mt->dmm, Im);
        m->be.ops->matmul_dx(&m->be.ctx, mt->dmm, mt->dy, expert(l->experts_down, mt->idx[k], H), 1);
        memcpy(mt->t, gu, (size_t)Im * sizeof(float));
        m->be.ops->gelu_tanh(&m->be.ctx, mt->t, (size_t)Im);
        for (int64_t i = 0; i < Im; i++) {
            mt->dmm[i] *= coef;
            mt->dgu[Im + i] = mt->dmm[i] * mt->t[i];
            mt->t[i] = mt->dmm[i] * gu[Im + i];
        }
        m->be.ops->gelu_tanh_dx(&m->be.ctx, mt->dgu, gu, mt->t, (size_t)Im);
        m->be.ops->matmul_dx(&m->be.ctx, mt->du, mt->dgu, expert(l->experts_gate_up, mt->idx[k], 2 * Im), 1);
    }
    m->be.ops->rmsnorm_dx(&m->be.ctx, dr, r, l->pre_ff_ln2, mt->du, 1, H, t->rms_eps);
    /* routing: w_k = p_k / S over the chosen experts, then the softmax */
    float *dp = mt->dp, corr = 0.0f, pdp = 0.0f;
    zero(dp, E);
    for (int64_t k = 0; k < K; k++) corr += dwn[k] * mt->w[k];
    for (int64_t k = 0; k < K; k++) dp[mt->idx[k]] = dwn[k] / mt->wsum - corr / (mt->wsum * mt->wsum);
    for (int64_t e = 0; e < E; e++) pdp += mt->p[e] * dp[e];
    for (int64_t e = 0; e < E; e++) dp[e] = mt->p[e] * (dp[e] - pdp);
    zero(mt->du, H);
    m->be.ops->matmul_dx(&m->be.ctx, mt->du, dp, l->router, 1);
    float hs = (float)(1.0 / sqrt((double)H));
    for (int64_t i = 0; i < H; i++) mt->du[i] *= l->router_scale[i] * hs;
    m->be.ops->rmsnorm_dx(&m->be.ctx, dr, r, NULL, mt->du, 1, H, t->rms_eps);
}

