/* vision.c - the Gemma 4 vision tower (GEMMA4.md §6.2-§6.8): patch
 * embedder, encoder layers with clippable linears and 2-D RoPE,
 * bidirectional attention over real patches, 3x3 average pooling,
 * standardize, and embed_vision into the text hidden size; and its backward
 * for adapters on the tower. Inference and training run the same layer
 * forward (layer_fwd; its attention through attention_bulk, as no decode
 * step reads the tower); training keeps every layer's input and re-runs one
 * layer at a time in reverse. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "model_impl.h"
#include "lora.h"

#define VT "model.vision_tower."
#define NAME(buf, ...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)

/* ---- forward ------------------------------------------------------------------ */

/* y[n] = x clamped to [lo, hi] when the linear is clipped, else a copy. */
static void clamp_copy(Model *m, float *y, const float *x, size_t n, int clipped, float lo, float hi) {
    if (clipped) m->be.ops->clamp(&m->be.ctx, y, x, n, lo, hi);
    else m->be.ops->copy(&m->be.ctx, y, x, n * sizeof(float));
}

static void zero(Model *m, float *x, int64_t n) { m->be.ops->memset(&m->be.ctx, x, 0, (size_t)n * sizeof(float)); }

/* One encoder layer's forward, kept for its backward, and the gradients
 * (training only), [N, width]. */
typedef struct {
    float *h, *qy, *ky, *vy, *qr, *kr, *vn, *att, *oy, *x1, *h2, *gy, *uy, *mm, *dny; /* forward */
    float *dx, *dh, *dq, *dk, *dv, *s1, *s2, *s3;                                      /* gradients, scratch */
    int32_t *pos, *neg_pos;   /* [N, 2] patch positions (x, y), and negated: the inverse rotation */
    int64_t qi;               /* max(NH D, I): half of dq's width */
    const LoraBinding *lora;
    float *lora_tmp;          /* [N, 2 rank] */
} VTape;

static const LoraPair *tpair(const VTape *t, int li, int slot) {
    return t->lora ? t->lora->vision[li * LORA_VISION_SLOTS + slot] : NULL;
}

/* y_pre[n, rows] = clamp_in(x) W^T (+ adapter), before the output clamp;
 * scratch holds n * cols floats. */
static void cl_forward(Model *m, const VTape *t, const ClipLinear *cl, const LoraPair *p, float *y_pre, const float *x,
                       int64_t n, float *scratch) {
    clamp_copy(m, scratch, x, (size_t)(n * cl->w.cols), cl->clipped, cl->in_min, cl->in_max);
    m->be.ops->matmul(&m->be.ctx, y_pre, scratch, cl->w, n);
    if (p) lora_apply(&m->be, t->lora, p, y_pre, scratch, n, t->lora_tmp);
}

/* 2-D RoPE: first half of each head rotates with x, second half with y
 * (pos [n, 2], device). */
static void rope2d(Model *m, float *x, int64_t n, int heads, int D, const int32_t *pos) {
    int half = D / 2;
    m->be.ops->rope_rows(&m->be.ctx, x, n, heads, half, D, m->wt->vision.inv_freq, pos, 2);
    m->be.ops->rope_rows(&m->be.ctx, x + half, n, heads, half, D, m->wt->vision.inv_freq, pos + 1, 2);
}

/* Encoder layer li on x, keeping what layer_bwd needs; the layer's output
 * goes to out when not NULL (a re-run for the backward needs none). */
static void layer_fwd(Model *m, int li, const float *x, int64_t N, const KnMask *mask, VTape *t, float *out) {
    const VisionConfig *v = &m->w->cfg.vision;
    const VisionLayer *l = &m->wt->vision.layers[li];
    int64_t d = v->hidden_size, D = v->head_dim, I = v->intermediate_size, NH = v->n_heads, KVH = v->kv_heads;
    float eps = v->rms_eps;
    m->be.ops->rmsnorm(&m->be.ctx, t->h, x, l->input_ln, N, d, eps);
    cl_forward(m, t, &l->q, tpair(t, li, LORA_Q), t->qy, t->h, N, t->s1);
    cl_forward(m, t, &l->k, tpair(t, li, LORA_K), t->ky, t->h, N, t->s1);
    cl_forward(m, t, &l->v, tpair(t, li, LORA_V), t->vy, t->h, N, t->s1);
    clamp_copy(m, t->qr, t->qy, (size_t)(N * NH * D), l->q.clipped, l->q.out_min, l->q.out_max);
    clamp_copy(m, t->kr, t->ky, (size_t)(N * KVH * D), l->k.clipped, l->k.out_min, l->k.out_max);
    clamp_copy(m, t->vn, t->vy, (size_t)(N * KVH * D), l->v.clipped, l->v.out_min, l->v.out_max);
    m->be.ops->rmsnorm(&m->be.ctx, t->qr, t->qr, l->q_norm, N * NH, D, eps);
    m->be.ops->rmsnorm(&m->be.ctx, t->kr, t->kr, l->k_norm, N * KVH, D, eps);
    m->be.ops->rmsnorm(&m->be.ctx, t->vn, t->vn, NULL, N * KVH, D, eps);
    rope2d(m, t->qr, N, (int)NH, (int)D, t->pos);
    rope2d(m, t->kr, N, (int)KVH, (int)D, t->pos);
    m->be.ops->attention_bulk(&m->be.ctx, t->att, t->qr, t->kr, t->vn, N, 0, N, (int)NH, (int)KVH, (int)D, 1.0f, mask);
    cl_forward(m, t, &l->o, tpair(t, li, LORA_O), t->oy, t->att, N, t->s1);
    clamp_copy(m, t->s1, t->oy, (size_t)(N * d), l->o.clipped, l->o.out_min, l->o.out_max);
    m->be.ops->rmsnorm(&m->be.ctx, t->x1, t->s1, l->post_attn_ln, N, d, eps);
    m->be.ops->add(&m->be.ctx, t->x1, t->x1, x, (size_t)(N * d));
    m->be.ops->rmsnorm(&m->be.ctx, t->h2, t->x1, l->pre_ff_ln, N, d, eps);
    cl_forward(m, t, &l->gate, tpair(t, li, LORA_GATE), t->gy, t->h2, N, t->s1);
    cl_forward(m, t, &l->up, tpair(t, li, LORA_UP), t->uy, t->h2, N, t->s1);
    clamp_copy(m, t->mm, t->gy, (size_t)(N * I), l->gate.clipped, l->gate.out_min, l->gate.out_max);
    clamp_copy(m, t->s1, t->uy, (size_t)(N * I), l->up.clipped, l->up.out_min, l->up.out_max);
    m->be.ops->gelu_gate(&m->be.ctx, t->mm, t->mm, t->s1, N, I, I);
    cl_forward(m, t, &l->down, tpair(t, li, LORA_DOWN), t->dny, t->mm, N, t->s1);
    if (!out) return;
    clamp_copy(m, t->s1, t->dny, (size_t)(N * d), l->down.clipped, l->down.out_min, l->down.out_max);
    m->be.ops->rmsnorm(&m->be.ctx, out, t->s1, l->post_ff_ln, N, d, eps);
    m->be.ops->add(&m->be.ctx, out, out, t->x1, (size_t)(N * d));
}

/* Patch embedder (§6.2): x = 2(pixel - 0.5) W^T + T[0][x] + T[1][y]; the
 * table rows of each patch (-1 for padding) are in pos_rows [2, N]. */
static void embed_patches(Model *m, const LoraBinding *lora, float *lora_tmp, const float *pixels,
                          const int32_t *pos_rows, int64_t N, float *x, float *tmp) {
    int64_t pp = m->wt->vision.input_proj.cols;
    m->be.ops->scale_shift(&m->be.ctx, tmp, pixels, (size_t)(N * pp), -0.5f, 2.0f);
    m->be.ops->matmul(&m->be.ctx, x, tmp, m->wt->vision.input_proj, N);
    if (lora && lora->input_proj) lora_apply(&m->be, lora, lora->input_proj, x, tmp, N, lora_tmp);
    for (int axis = 0; axis < 2; axis++)
        m->be.ops->embed_rows_add(&m->be.ctx, x, m->wt->vision.pos_table, pos_rows + axis * N, N, tmp);
}

/* Columns of the pooled grid: the image is (max x + 1) patches wide. */
static int64_t pool_cols(const int32_t *pos, int64_t N, int64_t kk) {
    int64_t max_x = 0;
    for (int64_t i = 0; i < N; i++)
        if (pos[2 * i] > max_x) max_x = pos[2 * i];
    return (max_x + 1) / kk;
}

/* The soft token patch i pools into, or -1 (padding, or beyond the grid). */
static int64_t pool_block(const int32_t *pos, int64_t i, int64_t kk, int64_t cols, int64_t out_len) {
    if (pos[2 * i] < 0) return -1;
    int64_t b = pos[2 * i] / kk + cols * (pos[2 * i + 1] / kk);
    return b < out_len ? b : -1;
}

/* Pooling (§6.6), sqrt(d) scaling, standardize (§6.7) into
 * pooled[n_soft, d]; blocks [N] is each patch's soft token (-1: none). */
static void pool(Model *m, const float *x, const int32_t *blocks, int64_t N, int64_t n_soft, float *pooled) {
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t d = v->hidden_size, kk = v->pooling_kernel;
    zero(m, pooled, (N / (kk * kk)) * d);
    m->be.ops->rows_sum(&m->be.ctx, pooled, x, blocks, N, d);
    m->be.ops->scale(&m->be.ctx, pooled, (size_t)(n_soft * d), sqrtf((float)d) / (float)(kk * kk));
    if (v->standardize) m->be.ops->standardize(&m->be.ctx, pooled, n_soft, d, m->wt->vision.std_bias, m->wt->vision.std_scale);
}

/* Positions inside the table, enough patches. */
static GfStatus check_image(const Model *m, const int32_t *pos, int64_t N, GfError *err) {
    const VisionConfig *v = &m->w->cfg.vision;
    if (!v->present) return gf_error_set(err, GF_INVALID, "no_vision", NULL, "this model has no vision tower");
    for (int64_t i = 0; i < N; i++) {
        int32_t px = pos[2 * i], py = pos[2 * i + 1];
        int pad = px == -1 && py == -1;
        if (!pad && (px < 0 || py < 0 || px >= v->position_embedding_size || py >= v->position_embedding_size))
            return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "patch %lld has position (%d, %d) outside the table",
                                (long long)i, px, py);
    }
    int64_t kk = v->pooling_kernel;
    if (N < kk * kk) return gf_error_set(err, GF_INVALID, "invalid_image", NULL, "an image needs at least %lld patches", (long long)(kk * kk));
    return GF_OK;
}

/* The whole tower's buffers, one allocation. */
typedef struct {
    VTape t;
    float *xs;                /* layer inputs: [(layers + 1), N, d] when kept for training, else two that alternate */
    float *pooled, *hn, *dhn; /* [N / k^2, d]: pooled (standardized), its norm, and that norm's gradient */
    float *pixels;            /* [N, 3 p^2] the image's patches */
    /* index tables, computed on the host (idx) and uploaded in one piece
     * to the device (t.pos onwards), in this order: */
    int32_t *group;           /* [N] 0 for real patches: one bidirectional block */
    int32_t *blocks;          /* [N] the soft token each patch pools into, or -1 */
    int32_t *pos_rows;        /* [2, N] position-table rows of each patch (x axis, then y), -1 for padding */
    uint8_t *valid;           /* [N] real patch */
    int32_t *idx;             /* host staging of the tables: [8 N] ints + N bytes */
    int64_t n_soft;
    KnMask mask;
} Tower;

#define TOWER_BUFS 30

/* The float count of each tower buffer for N patches (the gradients and
 * every layer's input only when training); returns their sum. */
static size_t tower_sizes(const Model *m, int64_t N, int64_t rank, int training, int64_t sizes[TOWER_BUFS]) {
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t d = v->hidden_size, I = v->intermediate_size, qw = (int64_t)v->n_heads * v->head_dim;
    int64_t kvw = (int64_t)v->kv_heads * v->head_dim, pp = m->wt->vision.input_proj.cols, L = v->n_layers;
    int64_t qi = qw > I ? qw : I, kvi = kvw > I ? kvw : I, wmax = d, g = training ? 1 : 0;
    int64_t widths[] = {I, qw, pp};
    for (size_t i = 0; i < 3; i++) wmax = widths[i] > wmax ? widths[i] : wmax;
    int64_t out_len = N / ((int64_t)v->pooling_kernel * v->pooling_kernel);
    int64_t all[TOWER_BUFS] = {N * d, N * d, N * d, N * d, g * N * d, g * N * d, N * d,
                               N * qw, N * qw, N * qw, N * kvw, N * kvw, N * kvw, N * kvw, N * I, N * I, N * I,
                               g * 2 * N * qi, g * N * kvi, g * N * kvi, N * wmax, g * N * wmax, g * N * wmax, N * 2 * rank,
                               (training ? L + 1 : 2) * N * d, out_len * d, out_len * d, g * out_len * d, N * pp,
                               8 * N + (N + 3) / 4};
    size_t total = 0;
    for (size_t i = 0; i < TOWER_BUFS; i++) total += (size_t)(sizes[i] = all[i]);
    return total;
}

uint64_t model_vision_workspace_bytes(const Model *m, int64_t n_patches, int max_rank, int training) {
    if (!m->w->cfg.vision.present) return 0;
    int64_t sizes[TOWER_BUFS];
    return tower_sizes(m, n_patches, max_rank > 0 ? max_rank : 1, training, sizes) * sizeof(float);
}

/* Sizes every buffer for N patches: one device buffer, and the host
 * staging of the index tables. */
static GfStatus tower_alloc(Model *m, const LoraBinding *lora, int64_t N, int training, Tower *b, GfError *err) {
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t qw = (int64_t)v->n_heads * v->head_dim, I = v->intermediate_size, qi = qw > I ? qw : I;
    int64_t sizes[TOWER_BUFS];
    size_t total = tower_sizes(m, N, lora ? lora->max_rank : 1, training, sizes);
    VTape *t = &b->t;
    float *index;
    float **bufs[TOWER_BUFS] = {&t->h, &t->x1, &t->h2, &t->dny, &t->dx, &t->dh, &t->oy,
                                &t->qy, &t->qr, &t->att, &t->ky, &t->kr, &t->vn, &t->vy, &t->gy, &t->uy, &t->mm,
                                &t->dq, &t->dk, &t->dv, &t->s1, &t->s2, &t->s3, &t->lora_tmp, &b->xs, &b->pooled, &b->hn,
                                &b->dhn, &b->pixels, &index};
    memset(b, 0, sizeof *b);
    size_t idx_n = (size_t)sizes[TOWER_BUFS - 1];
    if (idx_n > m->vision_idx_cap) { /* the context's buffers grow to the largest image seen, then stay */
        int32_t *idx = gf_realloc(m->vision_idx, idx_n * sizeof *idx, err);
        if (!idx) return GF_NO_MEMORY;
        m->vision_idx = idx;
        m->vision_idx_cap = idx_n;
    }
    if (total * sizeof(float) > m->vision_mem.bytes) {
        m->be.ops->free(&m->be.ctx, &m->vision_mem);
        if (m->be.ops->alloc(&m->be.ctx, &m->vision_mem, total * sizeof(float), KN_F32, "the vision tower's buffers", err))
            return err->status;
    }
    b->idx = m->vision_idx;
    float *p = m->vision_mem.data;
    for (size_t i = 0; i < TOWER_BUFS; i++) {
        *bufs[i] = p;
        p += sizes[i];
    }
    t->pos = (int32_t *)index;
    t->neg_pos = t->pos + 2 * N;
    b->group = t->neg_pos + 2 * N;
    b->blocks = b->group + N;
    b->pos_rows = b->blocks + N;
    b->valid = (uint8_t *)(b->pos_rows + 2 * N);
    t->qi = qi;
    t->lora = lora;
    return GF_OK;
}

/* The tower's memory is the context's (kept for the next image). */
static void tower_free(Tower *b) { memset(b, 0, sizeof *b); }

/* The index tables of an image from its positions pos[N, 2] (host), into
 * the host staging in the device layout; returns the soft-token count. */
static int64_t tower_tables(const Model *m, const int32_t *pos, int64_t N, int32_t *h) {
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t kk = v->pooling_kernel, out_len = N / (kk * kk), cols = pool_cols(pos, N, kk), n_soft = 0;
    int32_t *hpos = h, *hneg = h + 2 * N, *hgroup = hneg + 2 * N, *hblk = hgroup + N, *hrows = hblk + N;
    uint8_t *hvalid = (uint8_t *)(hrows + 2 * N);
    for (int64_t i = 0; i < N; i++) {
        int real = pos[2 * i] >= 0;
        hpos[2 * i] = pos[2 * i];
        hpos[2 * i + 1] = pos[2 * i + 1];
        hneg[2 * i] = -pos[2 * i];
        hneg[2 * i + 1] = -pos[2 * i + 1];
        /* bidirectional over the real patches: they form one block, padding
         * patches are never keys */
        hvalid[i] = (uint8_t)real;
        hgroup[i] = real ? 0 : -1;
        hblk[i] = (int32_t)pool_block(pos, i, kk, cols, out_len);
        if (hblk[i] + 1 > n_soft) n_soft = hblk[i] + 1;
        hrows[i] = real ? pos[2 * i] : -1;
        hrows[N + i] = real ? (int32_t)v->position_embedding_size + pos[2 * i + 1] : -1;
    }
    return n_soft;
}

/* Patch embedder, encoder layers, pooling and standardize, then the norm
 * of embed_vision into b->hn; the soft-token count in b->n_soft. keep: every
 * layer's input stays in b->xs (for the backward). pixels and pos are host
 * memory. */
static void tower_run(Model *m, Tower *b, const float *pixels, const int32_t *pos, int64_t N, int keep) {
    const VisionConfig *v = &m->w->cfg.vision;
    VTape *t = &b->t;
    int64_t d = v->hidden_size, pp = m->wt->vision.input_proj.cols;
    b->n_soft = tower_tables(m, pos, N, b->idx);
    m->be.ops->upload(&m->be.ctx, t->pos, b->idx, (size_t)(8 * N) * sizeof(int32_t) + (size_t)N);
    m->be.ops->upload(&m->be.ctx, b->pixels, pixels, (size_t)(N * pp) * sizeof(float));
    b->mask = (KnMask){b->valid, b->group, 0};
    embed_patches(m, t->lora, t->lora_tmp, b->pixels, b->pos_rows, N, b->xs, t->s1);
    float *x = b->xs;
    for (int li = 0; li < v->n_layers; li++) {
        float *next = keep || x == b->xs ? x + N * d : b->xs;
        layer_fwd(m, li, x, N, &b->mask, t, next);
        x = next;
        model_layer_done(m);
    }
    pool(m, x, b->blocks, N, b->n_soft, b->pooled);
    m->be.ops->rmsnorm(&m->be.ctx, b->hn, b->pooled, NULL, b->n_soft, d, v->rms_eps);
}

GfStatus model_vision_forward(Model *m, const LoraBinding *lora, const float *pixels, const int32_t *pos, int64_t N,
                              float *soft, int64_t *n_soft, GfError *err) {
    Tower b;
    if (check_image(m, pos, N, err) || tower_alloc(m, lora, N, 0, &b, err)) return err->status;
    tower_run(m, &b, pixels, pos, N, 0);
    *n_soft = b.n_soft;
    m->be.ops->matmul(&m->be.ctx, soft, b.hn, m->wt->vision.embed_proj, *n_soft);
    if (lora && lora->embed_proj) lora_apply(&m->be, lora, lora->embed_proj, soft, b.hn, *n_soft, b.t.lora_tmp);
    tower_free(&b);
    return m->be.ops->synchronize(&m->be.ctx, err);
}

/* ---- backward (adapters on the tower) -------------------------------------------- */

/* dx[n, cols] += the input gradient of the clippable linear for dy (the
 * gradient of its clamped output): clamps pass the gradient only inside their
 * bounds (torch.clamp). The adapter's dA, dB accumulate. Uses s2, s3. */
static void cl_backward(Model *m, const VTape *t, const ClipLinear *cl, const LoraPair *p, float *dx, const float *dy,
                        const float *x, const float *y_pre, int64_t n) {
    int64_t rows = cl->w.rows, cols = cl->w.cols;
    float *dyp = t->s2, *dxc = t->s3;
    if (cl->clipped) m->be.ops->clamp_dx(&m->be.ctx, dyp, y_pre, dy, (size_t)(n * rows), cl->out_min, cl->out_max, 0);
    else m->be.ops->copy(&m->be.ctx, dyp, dy, (size_t)(n * rows) * sizeof(float));
    zero(m, dxc, n * cols);
    m->be.ops->matmul_dx(&m->be.ctx, dxc, dyp, cl->w, n);
    if (p) {
        float *xc = t->s1;
        clamp_copy(m, xc, x, (size_t)(n * cols), cl->clipped, cl->in_min, cl->in_max);
        lora_backward(&m->be, t->lora, p, dxc, dyp, xc, n, t->lora_tmp);
    }
    if (cl->clipped) m->be.ops->clamp_dx(&m->be.ctx, dx, x, dxc, (size_t)(n * cols), cl->in_min, cl->in_max, 1);
    else m->be.ops->add(&m->be.ctx, dx, dx, dxc, (size_t)(n * cols));
}

/* Attention part of layer_bwd: d(the clamped output of o) in t->dh on
 * entry, d(h) in t->dh on return. datt: [N, NH D] free scratch. */
static void attn_bwd(Model *m, int li, int64_t N, const KnMask *mask, float *datt, VTape *t) {
    const VisionConfig *v = &m->w->cfg.vision;
    const VisionLayer *l = &m->wt->vision.layers[li];
    int64_t d = v->hidden_size, D = v->head_dim, NH = v->n_heads, KVH = v->kv_heads;
    float eps = v->rms_eps;
    zero(m, datt, N * NH * D);
    cl_backward(m, t, &l->o, tpair(t, li, LORA_O), datt, t->dh, t->att, t->oy, N);
    zero(m, t->dk, N * KVH * D);
    zero(m, t->dv, N * KVH * D);
    m->be.ops->attention_dx(&m->be.ctx, t->dq, t->dk, t->dv, t->qr, t->kr, t->vn, datt, N, 0, N, (int)NH, (int)KVH, (int)D, 1.0f,
                         mask);
    rope2d(m, t->dq, N, (int)NH, (int)D, t->neg_pos); /* R^T = R(-pos) */
    rope2d(m, t->dk, N, (int)KVH, (int)D, t->neg_pos);
    zero(m, t->dh, N * d);
    /* each projection: back through its norm (at the clamped output), then the clippable linear */
    struct { const ClipLinear *cl; int slot, heads; const float *y; float *g; const float *w; } pr[3] = {
        {&l->q, LORA_Q, (int)NH, t->qy, t->dq, l->q_norm},
        {&l->k, LORA_K, (int)KVH, t->ky, t->dk, l->k_norm},
        {&l->v, LORA_V, (int)KVH, t->vy, t->dv, NULL}};
    for (int j = 0; j < 3; j++) {
        int64_t w = N * pr[j].heads * D;
        float *yc = datt, *dn = t->s1;
        clamp_copy(m, yc, pr[j].y, (size_t)w, pr[j].cl->clipped, pr[j].cl->out_min, pr[j].cl->out_max);
        zero(m, dn, w);
        m->be.ops->rmsnorm_dx(&m->be.ctx, dn, yc, pr[j].w, pr[j].g, N * pr[j].heads, D, eps);
        m->be.ops->copy(&m->be.ctx, pr[j].g, dn, (size_t)w * sizeof(float));
        cl_backward(m, t, pr[j].cl, tpair(t, li, pr[j].slot), t->dh, pr[j].g, t->h, pr[j].y, N);
    }
}

/* After layer_fwd(li, x): t->dx holds d(layer output) on entry, d(x) on return. */
static void layer_bwd(Model *m, int li, const float *x, int64_t N, const KnMask *mask, VTape *t) {
    const VisionConfig *v = &m->w->cfg.vision;
    const VisionLayer *l = &m->wt->vision.layers[li];
    int64_t d = v->hidden_size, I = v->intermediate_size;
    float eps = v->rms_eps;
    float *dx = t->dx;
    /* x2 = x1 + norm(down(gelu(gate(h2)) * up(h2))) */
    clamp_copy(m, t->s1, t->dny, (size_t)(N * d), l->down.clipped, l->down.out_min, l->down.out_max);
    zero(m, t->dh, N * d);
    m->be.ops->rmsnorm_dx(&m->be.ctx, t->dh, t->s1, l->post_ff_ln, dx, N, d, eps);
    float *dmm = t->dq, *datt = t->dq + N * t->qi; /* dq holds 2 N max(NH D, I) */
    zero(m, dmm, N * I);
    cl_backward(m, t, &l->down, tpair(t, li, LORA_DOWN), dmm, t->dh, t->mm, t->dny, N);
    float *dg = t->dk, *du = t->dv; /* [N, I] each */
    clamp_copy(m, t->s1, t->gy, (size_t)(N * I), l->gate.clipped, l->gate.out_min, l->gate.out_max);
    clamp_copy(m, du, t->uy, (size_t)(N * I), l->up.clipped, l->up.out_min, l->up.out_max);
    m->be.ops->gelu_gate_dx(&m->be.ctx, dg, du, dmm, t->s1, du, (size_t)(N * I)); /* du in place of up's output */
    zero(m, t->dh, N * d);
    cl_backward(m, t, &l->gate, tpair(t, li, LORA_GATE), t->dh, dg, t->h2, t->gy, N);
    cl_backward(m, t, &l->up, tpair(t, li, LORA_UP), t->dh, du, t->h2, t->uy, N);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dx, t->x1, l->pre_ff_ln, t->dh, N, d, eps);
    /* x1 = x + norm(o(attention(h))), h = norm(x) */
    clamp_copy(m, t->s1, t->oy, (size_t)(N * d), l->o.clipped, l->o.out_min, l->o.out_max);
    zero(m, t->dh, N * d);
    m->be.ops->rmsnorm_dx(&m->be.ctx, t->dh, t->s1, l->post_attn_ln, dx, N, d, eps);
    attn_bwd(m, li, N, mask, datt, t);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dx, x, l->input_ln, t->dh, N, d, eps);
}

/* d(soft tokens) -> d(pooled tower output) -> d(last layer's output) in t->dx. */
static void head_backward(Model *m, const LoraBinding *lora, Tower *b, int64_t N, const float *dsoft, int64_t n_soft) {
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t d = v->hidden_size;
    zero(m, b->dhn, n_soft * d);
    m->be.ops->matmul_dx(&m->be.ctx, b->dhn, dsoft, m->wt->vision.embed_proj, n_soft);
    if (lora && lora->embed_proj) lora_backward(&m->be, lora, lora->embed_proj, b->dhn, dsoft, b->hn, n_soft, b->t.lora_tmp);
    float *dpool = b->t.s1;
    zero(m, dpool, n_soft * d);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dpool, b->pooled, NULL, b->dhn, n_soft, d, v->rms_eps);
    m->be.ops->mul(&m->be.ctx, dpool, dpool, m->wt->vision.pool_grad_scale, n_soft, d, 0);
    zero(m, b->t.dx, N * d);
    m->be.ops->rows_gather(&m->be.ctx, b->t.dx, dpool, b->blocks, N, d); /* every block < n_soft */
}

GfStatus model_vision_backward(Model *m, const LoraBinding *lora, const float *pixels, const int32_t *pos, int64_t N,
                               const float *dsoft, int64_t n_soft, GfError *err) {
    Tower b;
    if (check_image(m, pos, N, err) || tower_alloc(m, lora, N, 1, &b, err)) return err->status;
    const VisionConfig *v = &m->w->cfg.vision;
    int64_t d = v->hidden_size, L = v->n_layers, pp = m->wt->vision.input_proj.cols;
    VTape *t = &b.t;
    tower_run(m, &b, pixels, pos, N, 1);
    int64_t got = b.n_soft;
    GfStatus st = GF_OK;
    if (got != n_soft) {
        st = gf_error_set(err, GF_INVALID, "invalid_image", NULL, "the image gives %lld soft tokens, the gradient has %lld",
                          (long long)got, (long long)n_soft);
    } else {
        head_backward(m, lora, &b, N, dsoft, n_soft);
        for (int li = (int)L - 1; li >= 0; li--) {
            layer_fwd(m, li, b.xs + li * N * d, N, &b.mask, t, NULL);
            layer_bwd(m, li, b.xs + li * N * d, N, &b.mask, t);
            model_layer_done(m);
        }
        if (lora && lora->input_proj) { /* the patch embedder's input: 2 (pixel - 0.5) */
            m->be.ops->scale_shift(&m->be.ctx, t->s1, b.pixels, (size_t)(N * pp), -0.5f, 2.0f);
            lora_backward(&m->be, lora, lora->input_proj, NULL, t->dx, t->s1, N, t->lora_tmp);
        }
    }
    tower_free(&b);
    return st ? st : m->be.ops->synchronize(&m->be.ctx, err);
}
