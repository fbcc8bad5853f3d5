/* vision.c - the Gemma 4 vision tower (GEMMA4.md §6.2-§6.8): patch
 * embedder, encoder layers with clippable linears and 2-D RoPE,
 * bidirectional attention over real patches, 3x3 average pooling,
 * standardize, and embed_vision into the text hidden size. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "model_impl.h"
#include "lora.h"

#define VT "model.vision_tower."
#define NAME(buf, ...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)

/* ---- binding ----------------------------------------------------------------- */

static GfStatus bind_clip(Model *m, const char *base, int64_t rows, int64_t cols, ClipLinear *cl, GfError *err) {
    char n[300];
    if (model_bind_matrix(m, NAME(n, "%s.linear.weight", base), rows, cols, &cl->w, err)) return GF_INVALID;
    cl->clipped = m->cfg.vision.clipped_linears;
    if (!cl->clipped) return GF_OK;
    if (model_bind_scalar(m, NAME(n, "%s.input_min", base), &cl->in_min, err) ||
        model_bind_scalar(m, NAME(n, "%s.input_max", base), &cl->in_max, err) ||
        model_bind_scalar(m, NAME(n, "%s.output_min", base), &cl->out_min, err) ||
        model_bind_scalar(m, NAME(n, "%s.output_max", base), &cl->out_max, err))
        return GF_INVALID;
    return GF_OK;
}

static GfStatus bind_vision_layer(Model *m, int i, VisionLayer *l, GfError *err) {
    const VisionConfig *v = &m->cfg.vision;
    int64_t d = v->hidden_size, D = v->head_dim, qo = (int64_t)v->n_heads * D, kvo = (int64_t)v->kv_heads * D;
    char n[300], p[160];
    snprintf(p, sizeof p, VT "encoder.layers.%d.", i);
    if (model_bind_vector(m, NAME(n, "%sinput_layernorm.weight", p), d, &l->input_ln, err) ||
        model_bind_vector(m, NAME(n, "%spost_attention_layernorm.weight", p), d, &l->post_attn_ln, err) ||
        model_bind_vector(m, NAME(n, "%spre_feedforward_layernorm.weight", p), d, &l->pre_ff_ln, err) ||
        model_bind_vector(m, NAME(n, "%spost_feedforward_layernorm.weight", p), d, &l->post_ff_ln, err) ||
        model_bind_vector(m, NAME(n, "%sself_attn.q_norm.weight", p), D, &l->q_norm, err) ||
        model_bind_vector(m, NAME(n, "%sself_attn.k_norm.weight", p), D, &l->k_norm, err) ||
        bind_clip(m, NAME(n, "%sself_attn.q_proj", p), qo, d, &l->q, err) ||
        bind_clip(m, NAME(n, "%sself_attn.k_proj", p), kvo, d, &l->k, err) ||
        bind_clip(m, NAME(n, "%sself_attn.v_proj", p), kvo, d, &l->v, err) ||
        bind_clip(m, NAME(n, "%sself_attn.o_proj", p), d, qo, &l->o, err) ||
        bind_clip(m, NAME(n, "%smlp.gate_proj", p), v->intermediate_size, d, &l->gate, err) ||
        bind_clip(m, NAME(n, "%smlp.up_proj", p), v->intermediate_size, d, &l->up, err) ||
        bind_clip(m, NAME(n, "%smlp.down_proj", p), d, v->intermediate_size, &l->down, err))
        return GF_INVALID;
    return GF_OK;
}

GfStatus vision_bind(Model *m, GfError *err) {
    const VisionConfig *v = &m->cfg.vision;
    VisionWeights *w = &m->vision;
    int64_t d = v->hidden_size, pp = 3 * (int64_t)v->patch_size * v->patch_size;
    if (v->head_dim % 4) return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "config.json: vision_config.head_dim must be a multiple of 4");
    if (model_bind_matrix(m, VT "patch_embedder.input_proj.weight", d, pp, &w->input_proj, err) ||
        /* the position table is [2, P, d]: a matrix of 2P rows, x axis first */
        model_bind_3d(m, VT "patch_embedder.position_embedding_table", 2, v->position_embedding_size, d, &w->pos_table, err))
        return GF_INVALID;
    w->layers = gf_calloc((size_t)v->n_layers, sizeof *w->layers, err);
    if (!w->layers || model_keep(m, w->layers)) return GF_NO_MEMORY;
    for (int i = 0; i < v->n_layers; i++)
        if (bind_vision_layer(m, i, &w->layers[i], err)) return GF_INVALID;
    if (v->standardize && (model_bind_vector(m, VT "std_bias", d, &w->std_bias, err) ||
                           model_bind_vector(m, VT "std_scale", d, &w->std_scale, err)))
        return GF_INVALID;
    if (model_bind_matrix(m, "model.embed_vision.embedding_projection.weight", m->cfg.text.hidden_size, d, &w->embed_proj, err))
        return GF_INVALID;
    int q = v->head_dim / 4; /* frequencies per half: 100^(-4j/D) */
    w->inv_freq = gf_calloc((size_t)q, sizeof *w->inv_freq, err);
    if (!w->inv_freq || model_keep(m, w->inv_freq)) return GF_NO_MEMORY;
    for (int j = 0; j < q; j++) w->inv_freq[j] = (float)(1.0 / pow((double)v->rope_theta, (double)((float)(2 * j) / (float)(v->head_dim / 2))));
    return GF_OK;
}

/* ---- forward ------------------------------------------------------------------ */

static void clip(float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = x[i] < lo ? lo : x[i] > hi ? hi : x[i];
}

typedef struct {
    float *x, *h, *t, *q, *k, *v, *att, *g, *u;
    const LoraBinding *lora;
    float *lora_tmp;          /* [N, max rank] */
} VScratch;

/* The adapter's pair for a vision linear, or NULL. */
static const LoraPair *vpair(const VScratch *s, int li, int slot) {
    return s->lora ? s->lora->vision[li * LORA_VISION_SLOTS + slot] : NULL;
}

/* y[n, rows] = CL(x[n, cols]); x is clamped in place (callers pass a scratch
 * copy). An adapter acts on the inner linear, inside the clamps (as PEFT). */
static void clip_linear(Model *m, const VScratch *s, const ClipLinear *cl, const LoraPair *p, float *y, float *x, int64_t n) {
    if (cl->clipped) clip(x, (size_t)(n * cl->w.cols), cl->in_min, cl->in_max);
    m->ops->matmul(&m->ctx, y, x, cl->w, n);
    if (p) lora_apply(p, s->lora->scale, y, x, n, s->lora_tmp);
    if (cl->clipped) clip(y, (size_t)(n * cl->w.rows), cl->out_min, cl->out_max);
}

/* 2-D RoPE: first half of each head rotates with x, second half with y. */
static void rope2d(Model *m, float *x, int64_t n, int heads, int D, const int32_t *pos) {
    int half = D / 2;
    for (int64_t i = 0; i < n; i++)
        for (int h = 0; h < heads; h++) {
            float *v = x + (i * heads + h) * D;
            m->ops->rope(v, 1, half, m->vision.inv_freq, pos[2 * i]);
            m->ops->rope(v + half, 1, half, m->vision.inv_freq, pos[2 * i + 1]);
        }
}

static void encoder_layer(Model *m, int li, const VisionLayer *l, int64_t N, const int32_t *pos, const KnMask *mask, VScratch *s) {
    const VisionConfig *v = &m->cfg.vision;
    int64_t d = v->hidden_size, D = v->head_dim, I = v->intermediate_size;
    int NH = v->n_heads, KVH = v->kv_heads;
    float eps = v->rms_eps;
    m->ops->rmsnorm(&m->ctx, s->h, s->x, l->input_ln, N, d, eps);
    memcpy(s->t, s->h, (size_t)(N * d) * sizeof(float));
    clip_linear(m, s, &l->q, vpair(s, li, LORA_Q), s->q, s->t, N);
    memcpy(s->t, s->h, (size_t)(N * d) * sizeof(float));
    clip_linear(m, s, &l->k, vpair(s, li, LORA_K), s->k, s->t, N);
    memcpy(s->t, s->h, (size_t)(N * d) * sizeof(float));
    clip_linear(m, s, &l->v, vpair(s, li, LORA_V), s->v, s->t, N);
    m->ops->rmsnorm(&m->ctx, s->q, s->q, l->q_norm, N * NH, D, eps);
    m->ops->rmsnorm(&m->ctx, s->k, s->k, l->k_norm, N * KVH, D, eps);
    m->ops->rmsnorm(&m->ctx, s->v, s->v, NULL, N * KVH, D, eps);
    rope2d(m, s->q, N, NH, (int)D, pos);
    rope2d(m, s->k, N, KVH, (int)D, pos);
    m->ops->attention(&m->ctx, s->att, s->q, s->k, s->v, N, 0, N, NH, KVH, (int)D, 1.0f, mask);
    clip_linear(m, s, &l->o, vpair(s, li, LORA_O), s->h, s->att, N);
    m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_attn_ln, N, d, eps);
    for (int64_t i = 0; i < N * d; i++) s->x[i] += s->h[i];
    m->ops->rmsnorm(&m->ctx, s->h, s->x, l->pre_ff_ln, N, d, eps);
    memcpy(s->t, s->h, (size_t)(N * d) * sizeof(float));
    clip_linear(m, s, &l->gate, vpair(s, li, LORA_GATE), s->g, s->t, N);
    memcpy(s->t, s->h, (size_t)(N * d) * sizeof(float));
    clip_linear(m, s, &l->up, vpair(s, li, LORA_UP), s->u, s->t, N);
    m->ops->gelu_tanh(s->g, (size_t)(N * I));
    for (int64_t i = 0; i < N * I; i++) s->g[i] *= s->u[i];
    clip_linear(m, s, &l->down, vpair(s, li, LORA_DOWN), s->h, s->g, N);
    m->ops->rmsnorm(&m->ctx, s->h, s->h, l->post_ff_ln, N, d, eps);
    for (int64_t i = 0; i < N * d; i++) s->x[i] += s->h[i];
}

/* Patch embedder (§6.2): x = 2(pixel - 0.5) W^T + T[0][x] + T[1][y]. */
static void embed_patches(Model *m, const VScratch *s, const float *pixels, const int32_t *pos, int64_t N, float *x, float *tmp) {
    const VisionConfig *v = &m->cfg.vision;
    int64_t d = v->hidden_size, pp = m->vision.input_proj.cols;
    for (int64_t i = 0; i < N * pp; i++) tmp[i] = 2.0f * (pixels[i] - 0.5f);
    m->ops->matmul(&m->ctx, x, tmp, m->vision.input_proj, N);
    if (s->lora && s->lora->input_proj) lora_apply(s->lora->input_proj, s->lora->scale, x, tmp, N, s->lora_tmp);
    float *row = tmp;
    for (int64_t i = 0; i < N; i++) {
        if (pos[2 * i] < 0) continue;
        for (int axis = 0; axis < 2; axis++) {
            m->ops->embed_row(row, m->vision.pos_table, (int64_t)axis * v->position_embedding_size + pos[2 * i + axis], 1.0f);
            for (int64_t j = 0; j < d; j++) x[i * d + j] += row[j];
        }
    }
}

/* Pooling (§6.6), sqrt(d) scaling, standardize (§6.7) into pooled[n_soft, d]. */
static int64_t pool(Model *m, const float *x, const int32_t *pos, int64_t N, float *pooled) {
    const VisionConfig *v = &m->cfg.vision;
    int64_t d = v->hidden_size, kk = v->pooling_kernel, out_len = N / (kk * kk), max_x = 0, n_soft = 0;
    for (int64_t i = 0; i < N; i++)
        if (pos[2 * i] > max_x) max_x = pos[2 * i];
    int64_t cols = (max_x + 1) / kk;
    memset(pooled, 0, (size_t)(out_len * d) * sizeof(float));
    for (int64_t i = 0; i < N; i++) {
        if (pos[2 * i] < 0) continue;
        int64_t b = pos[2 * i] / kk + cols * (pos[2 * i + 1] / kk);
        if (b >= out_len) continue;
        for (int64_t j = 0; j < d; j++) pooled[b * d + j] += x[i * d + j];
        if (b + 1 > n_soft) n_soft = b + 1;
    }
    float scale = sqrtf((float)d) / (float)(kk * kk);
    for (int64_t b = 0; b < n_soft; b++)
        for (int64_t j = 0; j < d; j++) {
            float val = pooled[b * d + j] * scale;
            if (v->standardize) val = (val - m->vision.std_bias[j]) * m->vision.std_scale[j];
            pooled[b * d + j] = val;
        }
    return n_soft;
}

GfStatus model_vision_forward(Model *m, const LoraBinding *lora, const float *pixels, const int32_t *pos, int64_t N,
                              float *soft, int64_t *n_soft, GfError *err) {
    const VisionConfig *v = &m->cfg.vision;
    if (!v->present) return gf_error_set(err, GF_INVALID, "no_vision", NULL, "this model has no vision tower");
    int64_t kk = v->pooling_kernel;
    for (int64_t i = 0; i < N; i++) {
        int32_t px = pos[2 * i], py = pos[2 * i + 1];
        int pad = px == -1 && py == -1;
        if (!pad && (px < 0 || py < 0 || px >= v->position_embedding_size || py >= v->position_embedding_size))
            return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "patch %lld has position (%d, %d) outside the table",
                                (long long)i, px, py);
    }
    if (N < kk * kk) return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "an image needs at least %lld patches", (long long)(kk * kk));
    int64_t d = v->hidden_size, I = v->intermediate_size, qw = (int64_t)v->n_heads * v->head_dim, kvw = (int64_t)v->kv_heads * v->head_dim;
    int64_t pp = m->vision.input_proj.cols, tmp_w = pp > d ? pp : d;
    int64_t rmax = lora ? lora->max_rank : 0;
    size_t total = (size_t)(N * (d + d + tmp_w + qw + kvw + kvw + qw + I + I + rmax));
    float *buf = gf_malloc(total * sizeof(float), err);
    uint8_t *valid = gf_malloc((size_t)N, err);
    int32_t *group = gf_malloc((size_t)N * sizeof *group, err);
    if (!buf || !valid || !group) { free(buf); free(valid); free(group); return GF_NO_MEMORY; }
    VScratch s;
    float *p = buf;
    s.x = p; p += N * d;
    s.h = p; p += N * d;
    s.t = p; p += N * tmp_w;
    s.q = p; p += N * qw;
    s.k = p; p += N * kvw;
    s.v = p; p += N * kvw;
    s.att = p; p += N * qw;
    s.g = p; p += N * I;
    s.u = p; p += N * I;
    s.lora_tmp = p;
    s.lora = lora;
    /* bidirectional over the real patches: they form one block, padding
     * patches are never keys */
    for (int64_t i = 0; i < N; i++) {
        valid[i] = pos[2 * i] >= 0;
        group[i] = valid[i] ? 0 : -1;
    }
    KnMask mask = {valid, group, 0};
    embed_patches(m, &s, pixels, pos, N, s.x, s.t);
    for (int i = 0; i < v->n_layers; i++) encoder_layer(m, i, &m->vision.layers[i], N, pos, &mask, &s);
    for (int64_t i = 0; i < N; i++)
        if (!valid[i]) memset(s.x + i * d, 0, (size_t)d * sizeof(float));
    *n_soft = pool(m, s.x, pos, N, s.h);
    m->ops->rmsnorm(&m->ctx, s.h, s.h, NULL, *n_soft, d, v->rms_eps);
    m->ops->matmul(&m->ctx, soft, s.h, m->vision.embed_proj, *n_soft);
    if (lora && lora->embed_proj) lora_apply(lora->embed_proj, lora->scale, soft, s.h, *n_soft, s.lora_tmp);
    free(buf);
    free(valid);
    free(group);
    return GF_OK;
}
