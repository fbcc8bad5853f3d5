/* moe.c - the MoE block (GEMMA4.md §3.8) of a run of tokens, forward and
 * backward as a pair: router (norm without scale, router_scale / sqrt(H),
 * softmax, stable top-k, renormalized, per_expert_scale), the chosen experts'
 * gated GELU MLPs on the pre_feedforward_layernorm_2 input, and the
 * post_feedforward_layernorm_2 of their weighted sum. */
#include <string.h>

#include "model_impl.h"

size_t moe_tape_floats(const TextConfig *t, int64_t n) {
    if (!t->moe) return 0;
    size_t H = (size_t)t->hidden_size, E = (size_t)t->n_experts, K = (size_t)t->top_k_experts;
    size_t Im = (size_t)t->moe_intermediate;
    return (size_t)n * (6 * H + 2 * E + 4 * K + K * (3 * Im + H)) + 4 * Im;
}

#define MOE_TAPE_BYTES ((size_t)64 << 20)

int64_t moe_chunk_tokens(const TextConfig *t, int64_t asked) {
    if (!t->moe) return 0;
    if (asked > 0) return asked;
    size_t per_token = moe_tape_floats(t, 1) * sizeof(float);
    int64_t n = (int64_t)(MOE_TAPE_BYTES / per_token);
    return n < 16 ? 16 : n > 512 ? 512 : n;
}

void moe_tape_init(MoeTape *mt, const TextConfig *t, float *buf, int64_t n) {
    size_t N = (size_t)n, H = (size_t)t->hidden_size, E = (size_t)t->n_experts, K = (size_t)t->top_k_experts;
    size_t Im = (size_t)t->moe_intermediate;
    memset(mt, 0, sizeof *mt);
    if (!t->moe || !buf) return;
    mt->cap = n;
    float *idx;
    float **slots[] = {&mt->u0, &mt->rin, &mt->u2, &mt->y, &mt->dy, &mt->du, &mt->p, &mt->dp, &mt->w,
                       &mt->coef, &mt->dc, &idx, &mt->gu, &mt->mm, &mt->yk, &mt->scratch};
    size_t sizes[] = {N * H, N * H, N * H, N * H, N * H, N * H, N * E, N * E, N * K,
                      N * K, N * K, N * K, N * K * 2 * Im, N * K * Im, N * K * H, 4 * Im};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = buf;
        buf += sizes[i];
    }
    mt->idx = (int32_t *)idx;
}

/* The router's matrix, its products exact (tensor.h): its logits pick the
 * top-k experts, and a bf16 product rounded differently by row count would
 * send a token to other experts by the size of its batch or MoE chunk,
 * which no tolerance on the logits absorbs. E outputs: a small share of
 * the block's work. */
static KnMatrix router_exact(const Layer *l) {
    KnMatrix r = l->router;
    r.exact = 1;
    return r;
}

/* out[n, H] = the MoE block of the residual rows r[n, H] (n <= the tape's
 * capacity), keeping in the tape what moe_backward needs. */
void moe_forward(Model *m, const Layer *l, const float *r, float *out, int64_t n, MoeTape *mt) {
    const TextConfig *t = &m->w->cfg.text;
    const KnOps *ops = m->be.ops;
    const KnCtx *ctx = &m->be.ctx;
    int64_t H = t->hidden_size;
    int E = t->n_experts, K = t->top_k_experts;
    ops->rmsnorm(ctx, mt->u0, r, NULL, n, H, t->rms_eps);
    ops->mul(ctx, mt->rin, mt->u0, l->router_in_scale, n, H, 0); /* the router's input */
    ops->matmul(ctx, mt->p, mt->rin, router_exact(l), n);
    ops->moe_route(ctx, mt->idx, mt->w, mt->coef, mt->p, l->per_expert_scale, n, E, K);
    ops->rmsnorm(ctx, mt->u2, r, l->pre_ff_ln2, n, H, t->rms_eps);
    ops->moe_experts(ctx, mt->y, mt->u2, mt->idx, mt->coef, mt->gu, mt->mm, mt->yk, n, K, l->experts_gate_up,
                     l->experts_down);
    ops->rmsnorm(ctx, out, mt->y, l->post_ff_ln2, n, H, t->rms_eps);
}

/* dr[n, H] += the gradient of moe_forward at r for dout[n, H] (right after
 * moe_forward at r). The experts are frozen; the gradient flows through
 * their inputs and through the routing weights into the router's input. */
void moe_backward(Model *m, const Layer *l, const float *r, const float *dout, float *dr, int64_t n, MoeTape *mt) {
    const TextConfig *t = &m->w->cfg.text;
    const KnOps *ops = m->be.ops;
    const KnCtx *ctx = &m->be.ctx;
    int64_t H = t->hidden_size;
    int E = t->n_experts, K = t->top_k_experts;
    size_t bytes = (size_t)(n * H) * sizeof(float);
    ops->memset(ctx, mt->dy, 0, bytes);
    ops->rmsnorm_dx(ctx, mt->dy, mt->y, l->post_ff_ln2, dout, n, H, t->rms_eps);
    ops->moe_experts_dx(ctx, mt->du, mt->dc, mt->dy, mt->gu, mt->yk, mt->idx, mt->coef, mt->scratch, n, K,
                        l->experts_gate_up, l->experts_down);
    ops->rmsnorm_dx(ctx, dr, r, l->pre_ff_ln2, mt->du, n, H, t->rms_eps);
    ops->moe_route_dx(ctx, mt->dp, mt->dc, mt->idx, mt->w, mt->p, l->per_expert_scale, n, E, K);
    ops->memset(ctx, mt->du, 0, bytes);
    ops->matmul_dx(ctx, mt->du, mt->dp, router_exact(l), n);
    ops->mul(ctx, mt->du, mt->du, l->router_in_scale, n, H, 0);
    ops->rmsnorm_dx(ctx, dr, r, NULL, mt->du, n, H, t->rms_eps);
}
