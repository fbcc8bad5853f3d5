/* backward.c - loss and LoRA gradients of one training sequence: forward
 * with per-layer checkpoints (model_forward's hidden states are the layer
 * inputs, its KV cache the stored K/V), then for each layer from the last:
 * replay its forward keeping every intermediate (model_layer_replay: the
 * one decoder layer of forward.c, into a tape), and walk it back
 * (layer_backward). */
#include "backward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model_impl.h"

#define MAX_IMAGES 64         /* images in one training sequence */
/* The loss's default chunk (ModelOptions.loss_chunk): as many rows as
 * LOSS_LOGIT_BYTES of float logits hold, within [LOSS_ROWS_MIN,
 * LOSS_ROWS_MAX]. Each chunk reads the whole tied head (E4B's 1.3 GB in
 * bf16, twice: logits and their input gradient), so a chunk of 8 rows read
 * it 1,024 times in a step of 4,096 tokens (1.4 TB, about the whole time
 * of such a step on a GPU); 256 rows read it 32 times. */
#define LOSS_LOGIT_BYTES ((uint64_t)256 << 20)
#define LOSS_ROWS_MIN 8
#define LOSS_ROWS_MAX 4096

/* ---- workspace -------------------------------------------------------------- */

struct GradWorkspace {
    int64_t max_tokens;
    int max_rank;
    int64_t loss_rows;            /* rows of logits the loss takes at once (loss_rows) */
    KvCache cache;
    int bf16;                     /* layer inputs and stored K/V kept in bf16 (Model.checkpoints_bf16) */
    float *hidden;                /* [(L + 1), n, H]: layer inputs, then the final normed output; with bf16
                                     [2, n, H]: layer 0's input, then the final normed output */
    uint16_t *kept;               /* with bf16: [L - 1, n, H] the inputs of layers 1 .. L - 1 */
    float *xin;                   /* with bf16: [n, H] one of them widened for its layer's re-run */
    float *soft;                  /* [n, H] image soft tokens */
    int64_t soft_counts[MAX_IMAGES];
    float *ple, *dple, *ple_buf;  /* [n, L, P] */
    float **dK, **dV;             /* per store layer [n, KVH, D]: its own for a layer that later
                                     layers read (their gradients gather there), else one pair
                                     that the rest share (each uses it within its own backward) */
    /* one layer's forward, [n, width] */
    float *h1, *o, *x1, *h2, *d, *f, *x2, *pp, *out;          /* H (pp with PLE) */
    float *qlin, *qr, *att;                                    /* NH * D */
    float *klin, *vlin;                                        /* KVH * D */
    float *g, *u, *mm;                                         /* I (mm: dI's buffer) */
    float *moe;                                                /* H (MoE only) */
    float *pg, *pm;                                            /* P */
    /* its gradients */
    float *dx, *dh, *dh2, *df;                                 /* H */
    float *dq, *dqlin;                                         /* NH * D (dq over att) */
    float *dklin, *dvlin;                                      /* KVH * D */
    float *dI;                                                 /* I (then d(g), d(u) over g, u) */
    float *dP1, *dP2;                                          /* P */
    float *lora_tmp;                                           /* [n, 2 rank] */
    float *logits, *gx, *gdx;                                  /* [loss_rows, V], [loss_rows, H] x2 */
    float *xn, *dxn;                                           /* [n, H], over dh and dh2 */
    int32_t *ids;                                              /* [n] embedding rows */
    int32_t *host_ids;                                         /* [n] their host staging */
    int32_t *pos, *neg_pos;                                    /* [n] positions 0.., and their negatives */
    int32_t *rows_idx, *targets;                               /* [loss_rows] a chunk's rows and labels */
    double *row_loss;                                          /* [loss_rows] */
    int32_t *host_rows, *host_targets;                         /* [loss_rows] their host staging */
    double *host_loss;                                         /* [loss_rows] */
    MoeTape moe_tape;
    LayerBufs tape;                                            /* the layer's buffers above, for its replay */
    KnBuffer slab;                                             /* every buffer above: device memory */
    const KnBackend *be;
};

typedef struct {
    float *base;
    size_t used;
} Slab;

/* Cuts n floats (16-aligned) from the slab; with no base it only counts. */
static float *take(Slab *s, size_t n) {
    float *p = s->base ? s->base + s->used : NULL;
    s->used += (n + 15) & ~(size_t)15;
    return p;
}

/* Rows of logits a workspace of max_tokens takes at once: what the model
 * was opened with, else the default above; never more than max_tokens. */
static int64_t loss_rows(const Model *m, int64_t max_tokens) {
    int64_t rows = m->loss_chunk;
    if (rows <= 0) {
        uint64_t per_row = (uint64_t)m->w->cfg.text.vocab_size * sizeof(float);
        uint64_t fit = per_row ? LOSS_LOGIT_BYTES / per_row : LOSS_ROWS_MAX;
        rows = fit < LOSS_ROWS_MIN ? LOSS_ROWS_MIN : fit > LOSS_ROWS_MAX ? LOSS_ROWS_MAX : (int64_t)fit;
    }
    return rows < max_tokens ? rows : max_tokens;
}

static void layout(const Model *m, GradWorkspace *w, Slab *s) {
    const TextConfig *t = &m->w->cfg.text;
    size_t n = (size_t)w->max_tokens, H = (size_t)t->hidden_size, L = (size_t)t->n_layers, P = (size_t)t->ple_dim;
    size_t dmax = 0, kvmax = 0, imax = 0;
    for (size_t i = 0; i < L; i++) {
        const LayerConfig *l = &t->layers[i];
        if ((size_t)l->head_dim > dmax) dmax = (size_t)l->head_dim;
        if ((size_t)l->kv_heads * l->head_dim > kvmax) kvmax = (size_t)l->kv_heads * l->head_dim;
        if ((size_t)l->intermediate > imax) imax = (size_t)l->intermediate;
    }
    size_t qw = (size_t)t->n_heads * dmax;
    w->hidden = take(s, (w->bf16 ? 2 : L + 1) * n * H);
    w->kept = w->bf16 && L > 1 ? (uint16_t *)take(s, ((L - 1) * n * H + 1) / 2) : NULL;
    w->xin = w->bf16 ? take(s, n * H) : NULL;
    w->soft = take(s, n * H);
    w->ple = take(s, n * L * P);
    w->dple = take(s, n * L * P);
    w->ple_buf = take(s, n * L * P);
    size_t common = (size_t)kv_transient_row(t);
    float *ck = common ? take(s, n * common) : NULL, *cv = common ? take(s, n * common) : NULL;
    for (size_t i = 0; i < L; i++) {
        const LayerConfig *l = &t->layers[i];
        int own = !l->kv_shared && kv_layer_read_later(t, (int)i);
        w->dK[i] = l->kv_shared ? NULL : own ? take(s, n * (size_t)l->kv_heads * (size_t)l->head_dim) : ck;
        w->dV[i] = l->kv_shared ? NULL : own ? take(s, n * (size_t)l->kv_heads * (size_t)l->head_dim) : cv;
    }
    float **h_bufs[] = {&w->h1, &w->o, &w->x1, &w->h2, &w->f, &w->out, &w->dx, &w->dh, &w->dh2, &w->df};
    for (size_t i = 0; i < sizeof h_bufs / sizeof *h_bufs; i++) *h_bufs[i] = take(s, n * H);
    /* what the backward never reads shares a buffer: without MoE the down
     * projection (d) is the feed-forward output f itself, and without PLE
     * the layer's output is x2 scaled in place (the forward then copies
     * nothing); the normed block outputs are added to the residual stream
     * as they are computed (rmsnorm_add) and kept nowhere */
    w->d = t->moe ? take(s, n * H) : w->f;
    w->x2 = P ? take(s, n * H) : w->out;
    w->pp = P ? take(s, n * H) : NULL;
    w->moe = t->moe ? take(s, n * H) : NULL;
    /* the loss is taken before the last layer's backward, which writes dh
     * and dh2 before it reads them; d(q) is written once d(att) no longer
     * needs att */
    w->xn = w->dh;
    w->dxn = w->dh2;
    float **q_bufs[] = {&w->qlin, &w->qr, &w->att, &w->dqlin};
    for (size_t i = 0; i < sizeof q_bufs / sizeof *q_bufs; i++) *q_bufs[i] = take(s, n * qw);
    w->dq = w->att;
    float **kv_bufs[] = {&w->klin, &w->vlin, &w->dklin, &w->dvlin};
    for (size_t i = 0; i < sizeof kv_bufs / sizeof *kv_bufs; i++) *kv_bufs[i] = take(s, n * kvmax);
    /* d(mm) is written over mm once the down projection's adapter has read
     * it (down_backward) */
    float **i_bufs[] = {&w->g, &w->u, &w->dI};
    for (size_t i = 0; i < sizeof i_bufs / sizeof *i_bufs; i++) *i_bufs[i] = take(s, n * imax);
    w->mm = w->dI;
    float **p_bufs[] = {&w->pg, &w->pm, &w->dP1, &w->dP2};
    for (size_t i = 0; i < sizeof p_bufs / sizeof *p_bufs; i++) *p_bufs[i] = take(s, n * P);
    w->lora_tmp = take(s, n * 2 * (size_t)(w->max_rank > 0 ? w->max_rank : 1));
    size_t lr = (size_t)w->loss_rows;
    w->logits = take(s, lr * (size_t)t->vocab_size);
    w->ids = (int32_t *)take(s, n);
    w->pos = (int32_t *)take(s, n);
    w->neg_pos = (int32_t *)take(s, n);
    w->rows_idx = (int32_t *)take(s, lr);
    w->targets = (int32_t *)take(s, lr);
    w->row_loss = (double *)take(s, 2 * lr);
    w->gx = take(s, lr * H);
    w->gdx = take(s, lr * H);
    int64_t moe_cap = w->max_tokens < m->moe_chunk ? w->max_tokens : m->moe_chunk;
    moe_tape_init(&w->moe_tape, t, take(s, moe_tape_floats(t, moe_cap)), moe_cap);
    w->tape = (LayerBufs){.h1 = w->h1, .qlin = w->qlin, .qr = w->qr, .klin = w->klin, .vlin = w->vlin,
                          .kn = w->dklin, .vn = w->dvlin, .att = w->att,
                          .o = w->o, .x1 = w->x1, .h2 = w->h2, .g = w->g, .u = w->u, .mm = w->mm, .d = w->d,
                          .f = w->f, .moe = w->moe, .x2 = w->x2, .pg = w->pg, .pm = w->pm, .pp = w->pp, .out = w->out};
}

/* Positions 0.. and their negatives (RoPE and its transpose), once. */
static GfStatus upload_positions(Model *m, GradWorkspace *w, GfError *err) {
    int32_t *p = gf_malloc((size_t)w->max_tokens * 2 * sizeof *p, err);
    if (!p) return GF_NO_MEMORY;
    for (int64_t i = 0; i < w->max_tokens; i++) {
        p[i] = (int32_t)i;
        p[w->max_tokens + i] = (int32_t)-i;
    }
    m->be.ops->upload(&m->be.ctx, w->pos, p, (size_t)w->max_tokens * sizeof *p);
    m->be.ops->upload(&m->be.ctx, w->neg_pos, p + w->max_tokens, (size_t)w->max_tokens * sizeof *p);
    free(p);
    return GF_OK;
}

GfStatus grad_workspace_new(Model *m, int64_t max_tokens, int max_rank, GradWorkspace **out, GfError *err) {
    const TextConfig *t = &m->w->cfg.text;
    *out = NULL;
    if (max_tokens <= 0 || max_rank < 0 || max_rank > LORA_MAX_RANK)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "bad workspace size");
    GradWorkspace *w = gf_calloc(1, sizeof *w, err);
    if (!w) return GF_NO_MEMORY;
    w->max_tokens = max_tokens;
    w->max_rank = max_rank;
    w->loss_rows = loss_rows(m, max_tokens);
    w->bf16 = m->checkpoints_bf16;
    w->dK = gf_calloc((size_t)t->n_layers, sizeof *w->dK, err);
    w->dV = gf_calloc((size_t)t->n_layers, sizeof *w->dV, err);
    w->host_ids = gf_malloc((size_t)max_tokens * sizeof *w->host_ids, err);
    w->host_rows = gf_malloc((size_t)w->loss_rows * sizeof *w->host_rows, err);
    w->host_targets = gf_malloc((size_t)w->loss_rows * sizeof *w->host_targets, err);
    w->host_loss = gf_malloc((size_t)w->loss_rows * sizeof *w->host_loss, err);
    w->be = &m->be;
    Slab s = {NULL, 0};
    if (!w->dK || !w->dV || !w->host_ids || !w->host_rows || !w->host_targets || !w->host_loss) {
        grad_workspace_free(w);
        return GF_NO_MEMORY;
    }
    layout(m, w, &s);
    if (m->be.ops->alloc(&m->be.ctx, &w->slab, s.used * sizeof(float), KN_F32, "the training activations", err) ||
        kv_cache_init_training(&w->cache, &model_config(m)->text, model_backend(m), max_tokens, w->bf16 ? KN_BF16 : KN_F32, err)) {
        grad_workspace_free(w);
        return err->status;
    }
    s = (Slab){w->slab.data, 0};
    layout(m, w, &s);
    if (upload_positions(m, w, err)) {
        grad_workspace_free(w);
        return err->status;
    }
    *out = w;
    return GF_OK;
}

uint64_t grad_workspace_bytes(const Model *m, int64_t max_tokens, int max_rank) {
    const TextConfig *t = &m->w->cfg.text;
    float *dk[t->n_layers > 0 ? t->n_layers : 1], *dv[t->n_layers > 0 ? t->n_layers : 1];
    GradWorkspace w = {.max_tokens = max_tokens, .max_rank = max_rank, .loss_rows = loss_rows(m, max_tokens),
                       .bf16 = m->checkpoints_bf16, .dK = dk, .dV = dv};
    Slab s = {NULL, 0};
    layout(m, &w, &s);
    return (uint64_t)s.used * sizeof(float) + kv_cache_training_bytes(t, max_tokens, w.bf16 ? KN_BF16 : KN_F32) +
           model_scratch_bytes(m, max_tokens, max_rank, 0);
}

/* ---- the backend's own memory ----------------------------------------------- */

static uint64_t most(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* The matmul and its input gradient over w at n rows; an adaptable linear
 * counted as NF4 when the job quantizes (as weights.c would make it). */
static uint64_t linear_scratch(const KnBackend *be, KnMatrix w, int adaptable, int nf4, int64_t n) {
    if (!w.data || n <= 0) return 0;
    if (adaptable && nf4) w.dtype = KN_NF4;
    KnCall f = {.op = KN_OP_MATMUL, .w = w, .n = n}, b = {.op = KN_OP_MATMUL_DX, .w = w, .n = n};
    return most(kn_scratch_bytes(be, &f), kn_scratch_bytes(be, &b));
}

static uint64_t attention_scratch(const KnBackend *be, int64_t n, int n_heads, int dim) {
    KnCall c = {.op = KN_OP_ATTENTION_DX, .n = n, .n_heads = n_heads, .dim = dim};
    return n > 0 ? kn_scratch_bytes(be, &c) : 0;
}

static uint64_t text_scratch(const Model *m, const KnBackend *be, int nf4, int64_t n) {
    const TextConfig *t = &m->w->cfg.text;
    const WeightsTensors *h = &m->w->host;
    uint64_t most_bytes = linear_scratch(be, h->embed, 0, nf4, loss_rows(m, n)); /* the tied head */
    most_bytes = most(most_bytes, linear_scratch(be, h->ple_model_proj, 0, nf4, n));
    for (int i = 0; i < t->n_layers; i++) {
        const Layer *l = &h->layers[i];
        const KnMatrix lin[] = {l->q, l->k, l->v, l->o, l->gate, l->up, l->down, l->ple_gate, l->ple_proj};
        for (size_t j = 0; j < sizeof lin / sizeof *lin; j++) most_bytes = most(most_bytes, linear_scratch(be, lin[j], 1, nf4, n));
        most_bytes = most(most_bytes, attention_scratch(be, n, t->n_heads, t->layers[i].head_dim));
        if (l->experts_down.data) { /* the MoE block runs m->moe_chunk tokens at a time */
            int64_t c = n < m->moe_chunk ? n : m->moe_chunk;
            most_bytes = most(most_bytes, linear_scratch(be, l->router, 0, nf4, c));
            KnCall moe = {.op = KN_OP_MOE_EXPERTS, .n = c, .top_k = t->top_k_experts, .n_experts = t->n_experts};
            most_bytes = most(most_bytes, kn_scratch_bytes(be, &moe));
            moe.op = KN_OP_MOE_EXPERTS_DX;
            moe.w = l->experts_down;
            most_bytes = most(most_bytes, kn_scratch_bytes(be, &moe));
        }
    }
    return most_bytes;
}

static uint64_t vision_scratch(const Model *m, const KnBackend *be, int nf4, int64_t n) {
    const VisionConfig *v = &m->w->cfg.vision;
    const VisionWeights *h = &m->w->host.vision;
    if (!v->present || n <= 0) return 0;
    uint64_t most_bytes = most(linear_scratch(be, h->input_proj, 0, nf4, n), linear_scratch(be, h->embed_proj, 0, nf4, n));
    for (int i = 0; i < v->n_layers; i++) {
        const VisionLayer *l = &h->layers[i];
        const ClipLinear *lin[] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
        for (size_t j = 0; j < sizeof lin / sizeof *lin; j++) most_bytes = most(most_bytes, linear_scratch(be, lin[j]->w, 1, nf4, n));
    }
    return most(most_bytes, attention_scratch(be, n, v->n_heads, v->head_dim));
}

/* A training segment of each pair: the text stack's at n rows, the vision
 * tower's at n_patches. */
static uint64_t lora_scratch(const KnBackend *be, const LoraAdapter *a, int64_t n, int64_t n_patches) {
    uint64_t most_bytes = 0;
    for (size_t i = 0; a && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        int64_t rows = lora_pair_vision(p) ? n_patches : n;
        KnCall f = {.op = KN_OP_LORA_SHRINK, .n = rows, .in = p->in, .dropout = a->dropout > 0};
        KnCall b = f;
        b.op = KN_OP_LORA_SHRINK_DX;
        if (rows > 0) most_bytes = most(most_bytes, most(kn_scratch_bytes(be, &f), kn_scratch_bytes(be, &b)));
    }
    return most_bytes;
}

uint64_t grad_scratch_bytes(const Model *m, const KnBackend *be, int64_t max_tokens, const LoraAdapter *a, int nf4,
                            int64_t n_patches) {
    uint64_t most_bytes = most(text_scratch(m, be, nf4, max_tokens), vision_scratch(m, be, nf4, n_patches));
    return most(most_bytes, lora_scratch(be, a, max_tokens, n_patches));
}

void grad_workspace_free(GradWorkspace *w) {
    if (!w) return;
    kv_cache_free(&w->cache);
    free(w->dK);
    free(w->dV);
    free(w->host_ids);
    free(w->host_rows);
    free(w->host_targets);
    free(w->host_loss);
    if (w->be) w->be->ops->free(&w->be->ctx, &w->slab);
    free(w);
}

int64_t train_sequence_targets(const TrainSequence *s) {
    int64_t c = 0;
    for (int64_t t = 0; t + 1 < s->n; t++) c += s->labels[t + 1] != -100;
    return c;
}

/* ---- linears ------------------------------------------------------------------- */

static const LoraPair *text_pair(const LoraBinding *b, int li, int slot) {
    return b ? b->text[li * LORA_TEXT_SLOTS + slot] : NULL;
}

/* dx[n, in] += dy W (+ the adapter's term); the adapter's dA, dB accumulate. */
static void linear_bwd(Model *m, GradWorkspace *w, const LoraBinding *b, float *dx, const float *dy, const float *x,
                       KnMatrix W, const LoraPair *p, int64_t n) {
    m->be.ops->matmul_dx(&m->be.ctx, dx, dy, W, n);
    if (p) lora_backward(&m->be, b, p, dx, dy, x, n, w->lora_tmp);
}

static void zero(Model *m, float *x, int64_t n) { m->be.ops->memset(&m->be.ctx, x, 0, (size_t)n * sizeof(float)); }

/* linear_bwd of the down projection, whose input gradient d(mm) [n, I] is
 * written over mm: its adapter's weight gradients first, which read mm. */
static void down_backward(Model *m, GradWorkspace *w, const LoraBinding *b, const Layer *l, const LoraPair *p,
                          const float *dd, int64_t n) {
    if (p) lora_backward_weights(&m->be, b, p, dd, w->mm, n, w->lora_tmp);
    zero(m, w->dI, n * l->down.cols);
    m->be.ops->matmul_dx(&m->be.ctx, w->dI, dd, l->down, n);
    if (p) lora_backward_input(&m->be, b, p, w->dI, n, w->lora_tmp);
}

static void copy(Model *m, float *dst, const float *src, int64_t n) {
    m->be.ops->copy(&m->be.ctx, dst, src, (size_t)n * sizeof(float));
}

/* ---- one decoder layer ------------------------------------------------------------- */

static KnMask layer_mask(const Model *m, const KvCache *c, int li) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    KnMask mask = {c->d_valid, t->bidirectional_vision ? c->d_group : NULL, lc->kind == LAYER_SLIDING ? t->sliding_window : 0};
    if (lc->kind == LAYER_FULL) mask.group = NULL; /* full layers stay causal (§4) */
    return mask;
}

/* Attention backward from d(o) in w->dh2 to d(h1) in w->dh (written). */
static void attention_backward(Model *m, GradWorkspace *w, const LoraBinding *b, int li, int64_t n) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const Layer *l = &m->wt->layers[li];
    int64_t H = t->hidden_size, D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads;
    float eps = t->rms_eps;
    int src = lc->store_layer;
    zero(m, w->dqlin, n * NH * D); /* d(att) first */
    linear_bwd(m, w, b, w->dqlin, w->dh2, w->att, l->o, text_pair(b, li, LORA_O), n);
    KnMask mask = layer_mask(m, &w->cache, li);
    if (kv_layer_transient(t, li)) { /* the shared pair: this layer's alone from here */
        zero(m, w->dK[li], n * KVH * D);
        zero(m, w->dV[li], n * KVH * D);
    }
    const float *k, *v;
    kv_cache_own_f32(&w->cache, src, n, KVH * D, &k, &v);
    m->be.ops->attention_dx(&m->be.ctx, w->dq, w->dK[src], w->dV[src], w->qr, k, v, w->dqlin, n, 0, n, (int)NH, (int)KVH,
                            (int)D, 1.0f, &mask);
    m->be.ops->rope_rows(&m->be.ctx, w->dq, n, (int)NH, (int)D, D, l->inv_freq, w->neg_pos, 1); /* R^T = R(-pos) */
    zero(m, w->dqlin, n * NH * D);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->dqlin, w->qlin, l->q_norm, w->dq, n * NH, D, eps);
    zero(m, w->dh, n * H);
    linear_bwd(m, w, b, w->dh, w->dqlin, w->h1, l->q, text_pair(b, li, LORA_Q), n);
    if (lc->kv_shared) return;
    /* this layer stores K/V: dK, dV now hold the gradients of every layer reading them */
    float *dk = w->dK[li], *dv = w->dV[li];
    m->be.ops->rope_rows(&m->be.ctx, dk, n, (int)KVH, (int)D, D, l->inv_freq, w->neg_pos, 1);
    zero(m, w->dklin, n * KVH * D);
    zero(m, w->dvlin, n * KVH * D);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->dklin, w->klin, l->k_norm, dk, n * KVH, D, eps);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->dvlin, w->vlin, NULL, dv, n * KVH, D, eps);
    if (lc->k_eq_v) {
        m->be.ops->add(&m->be.ctx, w->dklin, w->dklin, w->dvlin, (size_t)(n * KVH * D));
    } else {
        linear_bwd(m, w, b, w->dh, w->dvlin, w->h1, l->v, text_pair(b, li, LORA_V), n);
    }
    linear_bwd(m, w, b, w->dh, w->dklin, w->h1, l->k, text_pair(b, li, LORA_K), n);
}

/* After model_layer_replay(li, x) into w->tape: w->dx holds d(out) on
 * entry and d(x) on return. The decoder layer's backward, op by op the
 * forward's (forward.c: decoder_layer) in reverse. */
static void layer_backward(Model *m, GradWorkspace *w, const LoraBinding *b, int li, int64_t n, const float *x) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const Layer *l = &m->wt->layers[li];
    int64_t H = t->hidden_size, I = lc->intermediate, P = t->ple_dim, L = t->n_layers;
    float eps = t->rms_eps;
    float *dx = w->dx;
    m->be.ops->scale(&m->be.ctx, dx, (size_t)(n * H), l->layer_scalar);
    if (P) { /* out = x2 + norm(proj(gelu(gate(x2)) * ple)) */
        zero(m, w->dh, n * H);
        m->be.ops->rmsnorm_dx(&m->be.ctx, w->dh, w->pp, l->post_ple_ln, dx, n, H, eps);
        zero(m, w->dP1, n * P);
        linear_bwd(m, w, b, w->dP1, w->dh, w->pm, l->ple_proj, text_pair(b, li, LORA_PLE_PROJ), n);
        copy(m, w->dP2, w->pg, n * P);
        m->be.ops->gelu_tanh(&m->be.ctx, w->dP2, (size_t)(n * P));
        m->be.ops->mul_acc(&m->be.ctx, w->dple + li * P, w->dP1, w->dP2, n, P, L * P);
        m->be.ops->mul(&m->be.ctx, w->dP1, w->dP1, w->ple + li * P, n, P, L * P);
        m->be.ops->gelu_tanh_dx(&m->be.ctx, w->dP2, w->pg, w->dP1, (size_t)(n * P));
        linear_bwd(m, w, b, dx, w->dP2, w->x2, l->ple_gate, text_pair(b, li, LORA_PLE_GATE), n);
    }
    /* x2 = x1 + norm(f) */
    zero(m, w->df, n * H);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->df, w->f, l->post_ff_ln, dx, n, H, eps);
    float *dd = w->df;
    if (t->moe) { /* f = norm1(d) + moe(x1) */
        for (int64_t i = 0; i < n; i += m->moe_chunk) {
            int64_t c = n - i < m->moe_chunk ? n - i : m->moe_chunk;
            moe_forward(m, l, w->x1 + i * H, w->moe + i * H, c, &w->moe_tape);
            moe_backward(m, l, w->x1 + i * H, w->df + i * H, dx + i * H, c, &w->moe_tape);
        }
        zero(m, w->dh, n * H);
        m->be.ops->rmsnorm_dx(&m->be.ctx, w->dh, w->d, l->post_ff_ln1, w->df, n, H, eps);
        dd = w->dh;
    }
    /* d = down(gelu(gate(h2)) * up(h2)); the gradients of g and u take
     * their places in the tape (neither is read again) */
    down_backward(m, w, b, l, text_pair(b, li, LORA_DOWN), dd, n);
    m->be.ops->gelu_gate_dx(&m->be.ctx, w->g, w->u, w->dI, w->g, w->u, (size_t)(n * I));
    zero(m, w->dh2, n * H);
    linear_bwd(m, w, b, w->dh2, w->g, w->h2, l->gate, text_pair(b, li, LORA_GATE), n);
    linear_bwd(m, w, b, w->dh2, w->u, w->h2, l->up, text_pair(b, li, LORA_UP), n);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dx, w->x1, l->pre_ff_ln, w->dh2, n, H, eps);
    /* x1 = x + norm(attention(norm(x))) */
    zero(m, w->dh2, n * H);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->dh2, w->o, l->post_attn_ln, dx, n, H, eps);
    attention_backward(m, w, b, li, n);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dx, x, l->input_ln, w->dh, n, H, eps);
}

/* ---- loss ------------------------------------------------------------------------ */

/* The loss of rows (<= w->loss_rows) of normed outputs already gathered
 * in w->gx against w->host_targets, through the tied lm_head and the
 * softcap, added to *loss row by row (the sum then does not depend on the
 * chunks); with grad, their gradients (times scale) d(rows) into w->gdx. */
static void loss_of_rows(Model *m, GradWorkspace *w, int64_t rows, float scale, int grad, double *loss) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t V = t->vocab_size, H = t->hidden_size;
    m->be.ops->upload(&m->be.ctx, w->targets, w->host_targets, (size_t)rows * sizeof *w->host_targets);
    m->be.ops->matmul(&m->be.ctx, w->logits, w->gx, m->wt->embed, rows);
    m->be.ops->xent_softcap(&m->be.ctx, w->row_loss, w->logits, w->targets, rows, V, t->final_softcap, scale, grad);
    m->be.ops->download(&m->be.ctx, w->host_loss, w->row_loss, (size_t)rows * sizeof *w->host_loss);
    for (int64_t r = 0; r < rows; r++) *loss += w->host_loss[r];
    if (!grad) return;
    zero(m, w->gdx, rows * H);
    m->be.ops->matmul_dx(&m->be.ctx, w->gdx, w->logits, m->wt->embed, rows);
}

/* The loss of every trained position of the normed outputs xn[n, H], in
 * chunks of w->loss_rows rows; with grad, d(xn) into w->dxn (zeroed first). */
static double loss_chunks(Model *m, GradWorkspace *w, const TrainSequence *s, const float *xn, float scale, int grad) {
    int64_t n = s->n, H = m->w->cfg.text.hidden_size, k = 0;
    int32_t *rows = w->host_rows, *targets = w->host_targets;
    double loss = 0.0;
    if (grad) zero(m, w->dxn, n * H);
    for (int64_t i = 0; i < n; i++) {
        int last = i + 1 == n;
        if (!last && s->labels[i + 1] != -100) {
            rows[k] = (int32_t)i;
            targets[k] = s->labels[i + 1];
            k++;
        }
        if (k == w->loss_rows || (last && k > 0)) {
            m->be.ops->upload(&m->be.ctx, w->rows_idx, rows, (size_t)k * sizeof *rows);
            m->be.ops->rows_gather(&m->be.ctx, w->gx, xn, w->rows_idx, k, H);
            loss_of_rows(m, w, k, scale, grad, &loss);
            if (grad) m->be.ops->rows_scatter(&m->be.ctx, w->dxn, w->gdx, w->rows_idx, k, H);
            k = 0;
            model_layer_done(m); /* a chunk of the vocabulary-wide loss is as long as a layer */
        }
    }
    return loss;
}

/* The loss on the last layer's output xL[n, H]; d(xL) into w->dx. */
static double loss_backward(Model *m, GradWorkspace *w, const TrainSequence *s, const float *xL, float scale) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t n = s->n, H = t->hidden_size;
    m->be.ops->rmsnorm(&m->be.ctx, w->xn, xL, m->wt->final_norm, n, H, t->rms_eps);
    double loss = loss_chunks(m, w, s, w->xn, scale, 1);
    zero(m, w->dx, n * H);
    m->be.ops->rmsnorm_dx(&m->be.ctx, w->dx, xL, m->wt->final_norm, w->dxn, n, H, t->rms_eps);
    return loss;
}

/* ---- the embedded sequence ------------------------------------------------------------ */

/* d(x0) += the per-layer inputs' share, through ple_model_proj (§3.3);
 * ple_model_proj's adapter gets its gradient. */
static void ple_backward(Model *m, GradWorkspace *w, const LoraBinding *b, int64_t n, const float *x0, float *dx0) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t L = t->n_layers, P = t->ple_dim, H = t->hidden_size;
    const LoraPair *p = b ? b->ple_model_proj : NULL;
    float ctx_scale = (float)(1.0 / sqrt((double)H)), mix = (float)(1.0 / sqrt(2.0));
    m->be.ops->matmul(&m->be.ctx, w->ple_buf, x0, m->wt->ple_model_proj, n);
    if (p) lora_apply(&m->be, b, p, w->ple_buf, x0, n, w->lora_tmp);
    m->be.ops->scale(&m->be.ctx, w->ple_buf, (size_t)(n * L * P), ctx_scale);
    m->be.ops->scale(&m->be.ctx, w->dple, (size_t)(n * L * P), mix);
    float *dproj = w->ple; /* the per-layer inputs are no longer needed */
    zero(m, dproj, n * L * P);
    m->be.ops->rmsnorm_dx(&m->be.ctx, dproj, w->ple_buf, m->wt->ple_norm, w->dple, n * L, P, t->rms_eps);
    m->be.ops->scale(&m->be.ctx, dproj, (size_t)(n * L * P), ctx_scale);
    linear_bwd(m, w, b, dx0, dproj, x0, m->wt->ple_model_proj, p, n);
}

/* Soft tokens of every image into w->soft; their count in *n_soft. */
static GfStatus images_forward(Model *m, GradWorkspace *w, const LoraBinding *b, const TrainSequence *s, int64_t *n_soft,
                               GfError *err) {
    const GemmaConfig *g = &m->w->cfg;
    int64_t H = g->text.hidden_size, placeholders = 0, pp = 3 * (int64_t)g->vision.patch_size * g->vision.patch_size;
    for (int64_t i = 0; i < s->n; i++) placeholders += s->ids[i] == g->image_token_id;
    *n_soft = 0;
    for (int im = 0; im < s->n_images; im++) {
        int64_t got = 0;
        int64_t kk = g->vision.pooling_kernel;
        if (*n_soft + s->n_patches / (kk * kk) > w->max_tokens)
            return gf_error_set(err, GF_TOO_LARGE, "context_length_exceeded", NULL, "the images give more soft tokens than the sequence holds");
        if (model_vision_forward(m, b, s->pixels + im * s->n_patches * pp, s->positions + im * s->n_patches * 2, s->n_patches,
                                 w->soft + *n_soft * H, &got, err))
            return err->status;
        w->soft_counts[im] = got;
        *n_soft += got;
    }
    if (*n_soft != placeholders)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "%lld image placeholders for %lld soft tokens",
                            (long long)placeholders, (long long)*n_soft);
    return GF_OK;
}

/* The tower's adapters: d(soft tokens) are the rows of d(x0) at the image
 * placeholders, image after image. */
static GfStatus images_backward(Model *m, GradWorkspace *w, const LoraBinding *b, const TrainSequence *s, GfError *err) {
    const GemmaConfig *g = &m->w->cfg;
    int64_t H = g->text.hidden_size, pp = 3 * (int64_t)g->vision.patch_size * g->vision.patch_size, k = 0;
    float *dsoft = w->soft; /* the soft tokens themselves are no longer needed */
    for (int64_t i = 0, j; i < s->n; i = j) { /* runs of placeholders */
        for (j = i + 1; j < s->n && (s->ids[i] == g->image_token_id) == (s->ids[j] == g->image_token_id);) j++;
        if (s->ids[i] != g->image_token_id) continue;
        copy(m, dsoft + k * H, w->dx + i * H, (j - i) * H);
        k += j - i;
    }
    for (int im = 0, used = 0; im < s->n_images; im++) {
        int64_t count = w->soft_counts[im];
        if (model_vision_backward(m, b, s->pixels + im * s->n_patches * pp, s->positions + im * s->n_patches * 2,
                                  s->n_patches, dsoft + used * H, count, err))
            return err->status;
        used += (int)count;
    }
    return GF_OK;
}

/* ---- the whole sequence ------------------------------------------------------------------ */

/* Refuses a sequence the workspace cannot hold or whose labels or images are
 * out of range. */
static GfStatus check_sequence(const Model *m, const GradWorkspace *w, const LoraBinding *b, const TrainSequence *s,
                               GfError *err) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t n = s->n;
    if (n <= 0 || n > w->max_tokens)
        return gf_error_set(err, n <= 0 ? GF_INVALID : GF_TOO_LARGE, "context_length_exceeded", NULL,
                            "a training sequence of %lld tokens (the workspace holds %lld)", (long long)n,
                            (long long)w->max_tokens);
    if (b && b->max_rank > w->max_rank)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "adapter rank %d above the workspace's %d", b->max_rank,
                            w->max_rank);
    for (int64_t i = 0; i < n; i++)
        if (s->labels[i] != -100 && (s->labels[i] < 0 || s->labels[i] >= t->vocab_size))
            return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "label %d at position %lld is outside the vocabulary",
                                s->labels[i], (long long)i);
    if (s->n_images < 0 || s->n_images > MAX_IMAGES)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "%d images in one sequence (at most %d)", s->n_images,
                            MAX_IMAGES);
    return GF_OK;
}

/* The checkpointing forward: soft tokens, then every layer's input (and the
 * final normed output) into w->hidden, or w->kept in bf16, and the stored
 * K/V into w->cache. */
static GfStatus forward_tape(Model *m, GradWorkspace *w, const LoraBinding *b, const TrainSequence *s, int64_t *n_soft,
                             ModelInput *in, GfError *err) {
    *n_soft = 0;
    if (s->n_images && images_forward(m, w, b, s, n_soft, err)) return err->status;
    *in = (ModelInput){.ids = s->ids, .mm_type = s->mm_type, .soft_tokens = *n_soft ? w->soft : NULL, .n = s->n, .lora = b};
    kv_cache_reset(&w->cache);
    return model_forward_hidden(m, &w->cache, in, w->hidden, w->kept, &w->tape, err);
}

/* Layer li's input as the forward kept it: in w->hidden, or widened from
 * bf16 into w->xin (valid until the next call). */
static const float *layer_input(Model *m, GradWorkspace *w, int64_t li, int64_t n) {
    int64_t H = m->w->cfg.text.hidden_size;
    if (!w->bf16) return w->hidden + li * n * H;
    if (li == 0) return w->hidden;
    m->be.ops->widen_bf16(&m->be.ctx, w->xin, w->kept + (li - 1) * n * H, (size_t)(n * H));
    return w->xin;
}

/* The final normed output of the forward. */
static const float *final_output(const Model *m, const GradWorkspace *w, int64_t n) {
    return w->hidden + (w->bf16 ? 1 : m->w->cfg.text.n_layers) * n * m->w->cfg.text.hidden_size;
}

GfStatus model_loss(Model *m, GradWorkspace *w, const LoraBinding *b, const TrainSequence *s, double *loss_sum,
                    int64_t *n_targets, GfError *err) {
    int64_t n = s->n, n_soft;
    ModelInput in;
    *loss_sum = 0.0;
    *n_targets = 0;
    if (check_sequence(m, w, b, s, err) || forward_tape(m, w, b, s, &n_soft, &in, err)) return err->status;
    *loss_sum = loss_chunks(m, w, s, final_output(m, w, n), 0.0f, 0);
    *n_targets = train_sequence_targets(s);
    return GF_OK;
}

GfStatus model_backward(Model *m, GradWorkspace *w, const LoraBinding *b, const TrainSequence *s, float grad_scale,
                        double *loss_sum, int64_t *n_targets, GfError *err) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t n = s->n, L = t->n_layers, P = t->ple_dim;
    *loss_sum = 0.0;
    *n_targets = 0;
    int64_t n_soft = 0;
    ModelInput in;
    if (check_sequence(m, w, b, s, err) || forward_tape(m, w, b, s, &n_soft, &in, err)) return err->status;
    if (P) {
        model_embed_ids(m, &in, w->host_ids);
        m->be.ops->upload(&m->be.ctx, w->ids, w->host_ids, (size_t)n * sizeof *w->ids);
        model_ple_inputs(m, &in, w->ids, w->hidden, w->ple, w->ple_buf, w->lora_tmp);
        zero(m, w->dple, n * L * P);
    }
    for (int64_t li = 0; li < L; li++)
        if (w->dK[li] && kv_layer_read_later(t, (int)li)) { /* the shared pair is zeroed where it is used */
            const LayerConfig *lc = &t->layers[li];
            zero(m, w->dK[li], n * lc->kv_heads * lc->head_dim);
            zero(m, w->dV[li], n * lc->kv_heads * lc->head_dim);
        }
    /* backward, one re-run layer at a time */
    for (int64_t li = L - 1; li >= 0; li--) {
        const float *x = layer_input(m, w, li, n);
        if (model_layer_replay(m, &w->cache, &in, (int)li, x, P ? w->ple : NULL, &w->tape, err)) return err->status;
        if (li == L - 1) *loss_sum = loss_backward(m, w, s, w->out, grad_scale);
        layer_backward(m, w, b, (int)li, n, x);
        model_layer_done(m);
    }
    int tower = n_soft && b && lora_pairs_vision(b->pairs, b->n_pairs);
    if (P && b && (b->ple_model_proj || tower)) ple_backward(m, w, b, n, w->hidden, w->dx);
    if (tower && images_backward(m, w, b, s, err)) return err->status;
    *n_targets = train_sequence_targets(s);
    return GF_OK;
}
