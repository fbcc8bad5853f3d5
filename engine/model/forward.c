/* forward.c - the Gemma 4 text forward pass (GEMMA4.md §3-§4) over paged KV
 * caches, for a batch of sequences, and greedy generation. Prefill of n
 * tokens and n single-token steps compute the same function, bit for bit
 * (a training forward's attention, attention_bulk, within rounding).
 *
 * Every activation lives in device memory (the Model's activation buffer)
 * and is touched only by ops; this file computes small host tables (row
 * offsets, token ids, positions, adapter segments, the caches' block tables)
 * and uploads them. Logits and hidden states are downloaded to the caller. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "model_impl.h"
#include "lora.h"

/* ---- scratch -------------------------------------------------------------- */

/* The batch being run: its sequences and where each one's rows start. */
typedef struct {
    ModelSeq *seqs;
    int n_seqs;
    int64_t *row0;             /* [n_seqs + 1]: rows of sequence i are row0[i] .. row0[i + 1] */
    int64_t n;                 /* rows in all */
    KnLoraSeg *segs;           /* [n_seqs] one linear's adapter segments */
    int max_rank;              /* the largest rank of the batch's adapters (bucketed: rounded up) */
    int bucketed;              /* a decode step padded to a bucket of rows: row0[n_seqs] .. n are pad rows,
                                  and attention and adapters read the row tables (row_tables) */
    int bulk;                  /* a training forward or replay: one sequence, whose attention over its own
                                  contiguous cache no decode step has to equal (attend_bulk) */
} Batch;

#define LOGIT_CHUNK 32         /* rows of logits materialized on the device at once */

typedef struct {
    float *x, *h, *a;          /* [n, H] residual stream, block output, gathered rows */
    float *q, *att;            /* [n, NH * Dmax] queries, attention output */
    float *k, *v;              /* [n, KVH * Dmax] */
    float *gate, *up;          /* [n, Imax] */
    float *ple, *ple_tok;      /* [n, L, P] per-layer inputs, their token part */
    float *ple_g;              /* [n, P] */
    float *moe_buf;            /* moe_tape_floats */
    float *lora_tmp;           /* [n, max rank] */
    float *logits;             /* [LOGIT_CHUNK, V] */
    int32_t *ids, *pos;        /* [n] embedding rows, positions */
    int32_t *slots;            /* [KV_SPACES, n] each row's slot in its KV store, space by space */
    void *cands;               /* [V] sampling candidates (8 bytes each) */
    KnSampleRow *rows;         /* [LOGIT_CHUNK] a chunk's sampling parameters */
    int32_t *next;             /* [LOGIT_CHUNK] a chunk's sampled tokens */
} Scratch;

enum { SCRATCH_PARTS = 19 };

/* The scratch's parts of an n-row batch, in floats, in Scratch's order
 * (scratch_take). Without layer buffers (a caller's tape holds a layer's
 * buffers: the training forward and its replay, which return no logits),
 * the layer, logits and sampling parts are 0. */
static void scratch_sizes(const Model *m, int64_t n, int max_rank, int layer_bufs, size_t sizes[SCRATCH_PARTS]) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t H = t->hidden_size, dmax = 0, kvmax = 0, imax = 0, LP = (int64_t)t->n_layers * t->ple_dim;
    for (int i = 0; i < t->n_layers; i++) {
        const LayerConfig *l = &t->layers[i];
        if (l->head_dim > dmax) dmax = l->head_dim;
        if ((int64_t)l->kv_heads * l->head_dim > kvmax) kvmax = (int64_t)l->kv_heads * l->head_dim;
        if (l->intermediate > imax) imax = l->intermediate;
    }
    int64_t qw = t->n_heads * dmax, moe_cap = n < m->moe_chunk ? n : m->moe_chunk;
    size_t all = layer_bufs ? 1 : 0;
    size_t s[SCRATCH_PARTS] = {n * H, all * n * H, all * n * H, all * n * qw, all * n * qw, all * n * kvmax,
                               all * n * kvmax, all * n * imax, all * n * imax, n * LP, n * LP, all * n * t->ple_dim,
                               moe_tape_floats(t, moe_cap), (size_t)(n * max_rank),
                               all * LOGIT_CHUNK * t->vocab_size, (2 + KV_SPACES) * (size_t)n,
                               all * 2 * (size_t)t->vocab_size, all * LOGIT_CHUNK * sizeof(KnSampleRow) / sizeof(float),
                               all * LOGIT_CHUNK};
    memcpy(sizes, s, sizeof s);
}

static size_t scratch_floats(const size_t sizes[SCRATCH_PARTS]) {
    size_t total = 0;
    for (size_t i = 0; i < SCRATCH_PARTS; i++) total += (sizes[i] + 15) & ~(size_t)15;
    return total;
}

uint64_t model_scratch_bytes(const Model *m, int64_t n, int max_rank, int layer_bufs) {
    size_t sizes[SCRATCH_PARTS];
    scratch_sizes(m, n, max_rank, layer_bufs, sizes);
    return (uint64_t)scratch_floats(sizes) * sizeof(float);
}

/* Cuts the scratch of an n-row batch from the Model's device buffer (grown
 * to the largest batch seen; the Model is used by one thread at a time);
 * the parts scratch_sizes leaves out are NULL. */
static GfStatus scratch_take(Model *m, int64_t n, int max_rank, int layer_bufs, Scratch *s, MoeTape *moe,
                             GfError *err) {
    const TextConfig *t = &m->w->cfg.text;
    size_t sizes[SCRATCH_PARTS];
    scratch_sizes(m, n, max_rank, layer_bufs, sizes);
    float *index, *cands, *rows, *next;
    float **slots[SCRATCH_PARTS] = {&s->x, &s->h, &s->a, &s->q, &s->att, &s->k, &s->v, &s->gate, &s->up,
                                    &s->ple, &s->ple_tok, &s->ple_g, &s->moe_buf, &s->lora_tmp, &s->logits, &index,
                                    &cands, &rows, &next};
    size_t total = scratch_floats(sizes);
    if (total * sizeof(float) > m->act.bytes) {
        m->be.ops->free(&m->be.ctx, &m->act);
        if (m->be.ops->alloc(&m->be.ctx, &m->act, total * sizeof(float), KN_F32, "activations", err)) return err->status;
    }
    float *p = m->act.data;
    for (size_t i = 0; i < SCRATCH_PARTS; i++) {
        *slots[i] = sizes[i] ? p : NULL;
        p += (sizes[i] + 15) & ~(size_t)15;
    }
    s->ids = (int32_t *)index;
    s->pos = s->ids + n;
    s->slots = s->pos + n;
    s->cands = cands;
    s->rows = (KnSampleRow *)rows;
    s->next = (int32_t *)next;
    moe_tape_init(moe, t, s->moe_buf, n < m->moe_chunk ? n : m->moe_chunk);
    return GF_OK;
}

/* ---- a bucketed decode step's row tables ---------------------------------------- */

/* The device tables a bucketed step reads (StepTables.d_rows): the pad
 * table (int32 0) and pad validity (uint8 1) in the first ROWS_PAD bytes,
 * then each row's KnAttnRow per (space, with groups or not), then each
 * row's KnLoraRow per (layer, slot). */
#define ROWS_PAD 64
typedef struct {
    size_t att, lora, total;
} RowsLayout;

static RowsLayout rows_layout(const Model *m, int64_t n) {
    RowsLayout l;
    l.att = ROWS_PAD;
    l.lora = l.att + 2 * KV_SPACES * (size_t)n * sizeof(KnAttnRow);
    l.total = l.lora + (size_t)((int64_t)m->w->cfg.text.n_layers * LORA_TEXT_SLOTS * n) * sizeof(KnLoraRow);
    return l;
}

/* The device rows of the attention of a layer in space sp (groups: it
 * sees the vision groups). */
static const KnAttnRow *att_rows(const Model *m, const Batch *b, int sp, int groups) {
    const char *d = m->tables.d_rows.data;
    return (const KnAttnRow *)(d + rows_layout(m, b->n).att) + (2 * sp + groups) * b->n;
}

/* The device rows of the adapters on text slot `slot` of layer li. */
static const KnLoraRow *lora_rows(const Model *m, const Batch *b, int li, int slot) {
    const char *d = m->tables.d_rows.data;
    return (const KnLoraRow *)(d + rows_layout(m, b->n).lora) + (int64_t)(li * LORA_TEXT_SLOTS + slot) * b->n;
}

/* 1 when some row of the step has an adapter on slot `slot` of layer li. */
static int lora_active(const Model *m, int li, int slot) {
    int i = li * LORA_TEXT_SLOTS + slot;
    return (int)(m->tables.lora_active[i / 64] >> (i % 64) & 1);
}

/* ---- pieces of the forward pass --------------------------------------------- */

/* The pair a binding puts on text slot `slot` of layer li, or on
 * ple_model_proj for li < 0 (NULL: none). */
static const LoraPair *batch_pair(const LoraBinding *lb, int li, int slot) {
    if (!lb) return NULL;
    return li < 0 ? lb->ple_model_proj : lb->text[li * LORA_TEXT_SLOTS + slot];
}

/* y[n, out] += each adapter's term (its pair at li, slot: batch_pair) on
 * the rows of the run of consecutive sequences that use it, all adapters
 * in one grouped call. */
static void batch_adapters(Model *m, const Batch *b, const Scratch *s, float *y, const float *x, int64_t in,
                           int64_t out, int li, int slot) {
    if (b->bucketed && li >= 0) { /* every row's adapter from the row tables */
        if (!lora_active(m, li, slot)) return;
        const KnLoraRow *rows = lora_rows(m, b, li, slot);
        m->be.ops->lora_rows_shrink(&m->be.ctx, s->lora_tmp, b->max_rank, x, rows, b->n, in, b->max_rank);
        m->be.ops->lora_rows_expand(&m->be.ctx, y, s->lora_tmp, b->max_rank, rows, b->n, out);
        return;
    }
    int n_segs = 0;
    float *dropout_buf = NULL; /* training runs one sequence: one binding, one buffer */
    for (int i = 0, j; i < b->n_seqs; i = j) {
        const LoraBinding *lb = b->seqs[i].in.lora;
        for (j = i + 1; j < b->n_seqs && b->seqs[j].in.lora == lb;) j++;
        const LoraPair *p = batch_pair(lb, li, slot);
        if (!p) continue;
        b->segs[n_segs++] = lora_segment(lb, p, b->row0[i], b->row0[j] - b->row0[i]);
        if (lb->dropout.p > 0) dropout_buf = lb->dropout.row;
    }
    if (n_segs) lora_apply_segments(&m->be, b->segs, n_segs, y, x, in, out, s->lora_tmp, b->max_rank, dropout_buf);
}

/* y[n, out] = x W^T over every row of the batch, plus the adapters' terms. */
static void linear(Model *m, const Batch *b, const Scratch *s, float *y, const float *x, KnMatrix w, int li, int slot) {
    m->be.ops->matmul(&m->be.ctx, y, x, w, b->n);
    batch_adapters(m, b, s, y, x, w.cols, w.rows, li, slot);
}

int model_mm_kind(const GemmaConfig *c, int32_t id) {
    if (id == c->image_token_id) return 1;
    if (id == c->video_token_id) return 2;
    if (id == c->audio_token_id) return 3;
    return 0;
}

/* The embedding row of each token (placeholders of images, video and audio
 * look up the pad row, §3.2) into ids[n] (host). */
void model_embed_ids(const Model *m, const ModelInput *in, int32_t *ids) {
    const GemmaConfig *g = &m->w->cfg;
    for (int64_t i = 0; i < in->n; i++) {
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(g, in->ids[i]);
        ids[i] = kind ? g->text.pad_id : in->ids[i];
    }
}

/* The cache's validity and vision groups of the sequence's new positions
 * (§4), on the host. */
static void mark_positions(const Model *m, KvCache *c, const ModelInput *in) {
    for (int64_t i = 0; i < in->n; i++) {
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(&m->w->cfg, in->ids[i]);
        int64_t pos = c->n_past + i;
        c->valid[pos] = in->valid ? in->valid[i] : 1;
        int vision = kind == 1 || kind == 2;
        c->group[pos] = !vision ? -1 : (pos > 0 && c->group[pos - 1] >= 0) ? c->group[pos - 1] : c->n_groups++;
    }
}

/* Soft tokens over the image placeholders of x[n, H] (§5), one copy per run
 * of consecutive placeholders. */
static void place_soft_tokens(Model *m, const ModelInput *in, float *x) {
    int64_t H = m->w->cfg.text.hidden_size, soft = 0;
    int32_t image = m->w->cfg.image_token_id;
    for (int64_t i = 0, j; i < in->n; i = j) {
        for (j = i + 1; j < in->n && (in->ids[i] == image) == (in->ids[j] == image);) j++;
        if (in->ids[i] != image) continue;
        m->be.ops->copy(&m->be.ctx, x + i * H, in->soft_tokens + soft * H, (size_t)((j - i) * H) * sizeof(float));
        soft += j - i;
    }
}

/* The per-layer inputs of n rows (§3.3) from their projection (x
 * ple_model_proj^T, with its adapter's term) in ple[n, L, P]: scaled and
 * normed, the token part of embedding rows ids added (tok: scratch of the
 * same size), mixed. */
static void ple_finish(Model *m, const int32_t *ids, int64_t n, float *ple, float *tok) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t L = t->n_layers, P = t->ple_dim, H = t->hidden_size;
    float ctx_scale = (float)(1.0 / sqrt((double)H)), tok_scale = sqrtf((float)P), mix = (float)(1.0 / sqrt(2.0));
    m->be.ops->scale(&m->be.ctx, ple, (size_t)(n * L * P), ctx_scale);
    m->be.ops->rmsnorm(&m->be.ctx, ple, ple, m->wt->ple_norm, n * L, P, t->rms_eps);
    m->be.ops->embed_rows(&m->be.ctx, tok, m->wt->embed_ple, ids, n, tok_scale);
    m->be.ops->add(&m->be.ctx, ple, ple, tok, (size_t)(n * L * P));
    m->be.ops->scale(&m->be.ctx, ple, (size_t)(n * L * P), mix);
}

void model_ple_inputs(Model *m, const ModelInput *in, const int32_t *ids, const float *x, float *ple, float *tok,
                      float *lora_tmp) {
    m->be.ops->matmul(&m->be.ctx, ple, x, m->wt->ple_model_proj, in->n);
    if (in->lora && in->lora->ple_model_proj) lora_apply(&m->be, in->lora, in->lora->ple_model_proj, ple, x, in->n, lora_tmp);
    ple_finish(m, ids, in->n, ple, tok);
}

/* The per-layer inputs of every row of the batch at once: one matmul over
 * ple_model_proj for all its sequences (read once per step, not once per
 * sequence), the adapters on it added in one grouped call. After the soft
 * tokens are placed. */
static void batch_ple(Model *m, const Batch *b, Scratch *s) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t LP = (int64_t)t->n_layers * t->ple_dim;
    m->be.ops->matmul(&m->be.ctx, s->ple, s->x, m->wt->ple_model_proj, b->n);
    batch_adapters(m, b, s, s->ple, s->x, t->hidden_size, LP, -1, 0);
    ple_finish(m, s->ids, b->n, s->ple, s->ple_tok);
}

/* ---- one decoder layer (§3.4-§3.8) --------------------------------------------- */

/* The inference layout of a layer's buffers: one scratch row block reused
 * step after step and the residual stream updated in place. */
static LayerBufs scratch_bufs(const Scratch *s) {
    return (LayerBufs){.h1 = s->h, .qlin = s->q, .qr = s->q, .klin = s->k, .vlin = s->v, .att = s->att, .o = s->h,
                       .x1 = s->x, .h2 = s->h, .g = s->gate, .u = s->up, .mm = s->gate, .d = s->h,
                       .f = s->h, .moe = s->a, .x2 = s->x, .pg = s->ple_g, .pm = s->ple_g, .pp = s->h, .out = s->x};
}

/* dst[n] = src[n], nothing when they are the same buffer (inference). */
static void copy_rows(Model *m, float *dst, const float *src, int64_t n) {
    if (dst != src) m->be.ops->copy(&m->be.ctx, dst, src, (size_t)n * sizeof(float));
}

/* A training sequence's attention through attention_bulk, when its cache
 * keeps positions 0.. of each layer in order (its own store, kv_cache_init;
 * a bf16 store is read widened, kv_cache_own_f32):
 * the batch's rows are positions pos[0].. of the one sequence, after any it
 * already holds. 0 when the batch is not such a sequence. */
static int attend_bulk(Model *m, const Batch *b, int li, const LayerBufs *u, int groups, int window) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    KvCache *c = b->seqs[0].cache;
    if (!b->bulk || c->pool != &c->own) return 0;
    int64_t q_pos0 = m->tables.pos[0];
    KnMask mask = {c->d_valid, groups ? c->d_group : NULL, window};
    const float *k, *v;
    kv_cache_own_f32(c, lc->store_layer, q_pos0 + b->n, (int64_t)lc->kv_heads * lc->head_dim, &k, &v);
    m->be.ops->attention_bulk(&m->be.ctx, u->att, u->qr, k, v, b->n, q_pos0, q_pos0 + b->n, t->n_heads, lc->kv_heads,
                              lc->head_dim, 1.0f, &mask);
    return 1;
}

/* Rows [n, kvw] of src into their slots of a pool's store of layer li
 * (slots < 0: skipped), rounded when the pool holds bf16. */
static void kv_store(Model *m, const KvPool *pool, void *store, const float *src, const int32_t *slots, int64_t n,
                     int64_t kvw) {
    if (pool->dtype == KN_BF16) m->be.ops->rows_scatter_bf16(&m->be.ctx, store, src, slots, n, kvw);
    else m->be.ops->rows_scatter(&m->be.ctx, store, src, slots, n, kvw);
}

/* The batch's new keys and values, kn and vn (normed and rotated), into
 * their caches' stores, then each sequence's attention over its cache for
 * its rows of u->qr (normed and rotated) into u->att: one scatter each and
 * one attention call per run of sequences that share a pool (all of them
 * when serving), not a launch per sequence. */
static void attend(Model *m, const Batch *b, const Scratch *s, int li, const LayerBufs *u, const float *kn,
                   const float *vn) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const KnOps *ops = m->be.ops;
    int D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads, src = lc->store_layer;
    int64_t kvw = (int64_t)KVH * D;
    int window = lc->kind == LAYER_SLIDING ? t->sliding_window : 0;
    int groups = t->bidirectional_vision && lc->kind != LAYER_FULL; /* full layers stay causal (§4) */
    KnAttnSeq *att = m->tables.att;
    if (b->bucketed) { /* one pool; every row's sequence from the row tables, pad rows store nothing */
        KvPool *pool = b->seqs[0].cache->pool;
        int sp = pool->layer_space[li];
        if (!lc->kv_shared) {
            kv_store(m, pool, pool->k[li], kn, s->slots + sp * b->n, b->n, kvw);
            kv_store(m, pool, pool->v[li], vn, s->slots + sp * b->n, b->n, kvw);
        }
        ops->attention_rows(&m->be.ctx, u->att, u->qr, s->pos, pool->k[src], pool->v[src], pool->dtype,
                            pool->block_len, att_rows(m, b, sp, groups), b->n, NH, KVH, D, 1.0f, window);
        return;
    }
    for (int i = 0, j; i < b->n_seqs; i = j) {
        KvPool *pool = b->seqs[i].cache->pool;
        for (j = i + 1; j < b->n_seqs && b->seqs[j].cache->pool == pool;) j++;
        KvSpace sp = (KvSpace)pool->layer_space[li];
        int64_t r0 = b->row0[i], rows = b->row0[j] - r0;
        if (!lc->kv_shared) {
            const int32_t *slots = s->slots + sp * b->n + r0;
            kv_store(m, pool, pool->k[li], kn + r0 * kvw, slots, rows, kvw);
            kv_store(m, pool, pool->v[li], vn + r0 * kvw, slots, rows, kvw);
        }
        if (attend_bulk(m, b, li, u, groups, window)) return;
        for (int q = i; q < j; q++) {
            KvCache *c = b->seqs[q].cache;
            int64_t n = b->row0[q + 1] - b->row0[q];
            att[q - i] = (KnAttnSeq){b->row0[q], n, c->d_table[sp], c->d_valid, groups ? c->d_group : NULL};
        }
        /* the positions each sequence's rows start at: s->pos (uploaded) */
        ops->attention_batch(&m->be.ctx, u->att, u->qr, s->pos, pool->k[src], pool->v[src], pool->dtype,
                             pool->block_len, att, j - i, NH, KVH, D, 1.0f, window);
    }
}

/* Self-attention of layer li (§3.5, §3.6) from u->h1 to u->o. Replaying,
 * the K/V projections are recomputed and kept as they are (their backward
 * needs them), and normed and rotated into u->kn, u->vn to be stored again:
 * the layers of a training cache share a store (kv_cache_init_training),
 * so the forward's may be gone, and these are the same bits. */
static void attention(Model *m, const Batch *b, int li, Scratch *s, const LayerBufs *u, int replay) {
    const TextConfig *t = &m->w->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const Layer *l = &m->wt->layers[li];
    int D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads;
    int64_t n = b->n;
    linear(m, b, s, u->qlin, u->h1, l->q, li, LORA_Q);
    m->be.ops->rmsnorm_rope(&m->be.ctx, u->qr, u->qlin, l->q_norm, n, NH, D, t->rms_eps, l->inv_freq, s->pos);
    if (!lc->kv_shared) {
        linear(m, b, s, u->klin, u->h1, l->k, li, LORA_K);
        if (lc->k_eq_v) copy_rows(m, u->vlin, u->klin, n * KVH * D);
        else linear(m, b, s, u->vlin, u->h1, l->v, li, LORA_V);
    }
    float *kn = replay ? u->kn : u->klin, *vn = replay ? u->vn : u->vlin; /* in place when not replaying */
    if (!lc->kv_shared) { /* normed (keys rotated too), then stored */
        m->be.ops->rmsnorm_rope(&m->be.ctx, kn, u->klin, l->k_norm, n, KVH, D, t->rms_eps, l->inv_freq, s->pos);
        m->be.ops->rmsnorm(&m->be.ctx, vn, u->vlin, NULL, n * KVH, D, t->rms_eps);
    }
    attend(m, b, s, li, u, kn, vn);
    linear(m, b, s, u->o, u->att, l->o, li, LORA_O);
}

/* Feed-forward block of layer li (§3.4, §3.7, §3.8): u->x2 = (u->x1 +
 * FFN(u->x1)) * out_scale. */
static void feed_forward(Model *m, const Batch *b, int li, Scratch *s, MoeTape *moe, const LayerBufs *u,
                         float out_scale) {
    const TextConfig *t = &m->w->cfg.text;
    const Layer *l = &m->wt->layers[li];
    int64_t H = t->hidden_size, I = t->layers[li].intermediate, n = b->n;
    m->be.ops->rmsnorm(&m->be.ctx, u->h2, u->x1, l->pre_ff_ln, n, H, t->rms_eps);
    linear(m, b, s, u->g, u->h2, l->gate, li, LORA_GATE);
    linear(m, b, s, u->u, u->h2, l->up, li, LORA_UP);
    m->be.ops->gelu_gate(&m->be.ctx, u->mm, u->g, u->u, n, I, I);
    linear(m, b, s, u->d, u->mm, l->down, li, LORA_DOWN);
    if (t->moe) {
        m->be.ops->rmsnorm(&m->be.ctx, u->f, u->d, l->post_ff_ln1, n, H, t->rms_eps);
        for (int64_t i = 0, c = m->moe_chunk; i < n; i += c)
            moe_forward(m, l, u->x1 + i * H, u->moe + i * H, n - i < c ? n - i : c, moe);
        m->be.ops->add(&m->be.ctx, u->f, u->f, u->moe, (size_t)(n * H));
    } else {
        copy_rows(m, u->f, u->d, n * H);
    }
    m->be.ops->rmsnorm_add(&m->be.ctx, u->x2, u->x1, u->f, l->post_ff_ln, n, H, t->rms_eps, out_scale);
}

/* PLE injection at the end of layer li (§3.4): u->out = (u->x2 + the
 * layer's share of the per-layer inputs ple[n, L, P]) * layer_scalar. */
static void per_layer_inject(Model *m, const Batch *b, int li, Scratch *s, const float *ple, const LayerBufs *u) {
    const TextConfig *t = &m->w->cfg.text;
    const Layer *l = &m->wt->layers[li];
    int64_t H = t->hidden_size, P = t->ple_dim, L = t->n_layers, n = b->n;
    linear(m, b, s, u->pg, u->x2, l->ple_gate, li, LORA_PLE_GATE);
    m->be.ops->gelu_gate(&m->be.ctx, u->pm, u->pg, ple + li * P, n, P, L * P);
    linear(m, b, s, u->pp, u->pm, l->ple_proj, li, LORA_PLE_PROJ);
    m->be.ops->rmsnorm_add(&m->be.ctx, u->out, u->x2, u->pp, l->post_ple_ln, n, H, t->rms_eps, l->layer_scalar);
}

/* The layer on its input x[n, H], every step into u (scratch_bufs: the
 * serving and CLI forward, x updated in place; a tape: the training
 * backward's replay, every intermediate kept); the output in u->out. */
static void decoder_layer(Model *m, const Batch *b, int li, Scratch *s, MoeTape *moe, const float *x, const float *ple,
                          const LayerBufs *u, int replay) {
    const TextConfig *t = &m->w->cfg.text;
    const Layer *l = &m->wt->layers[li];
    int64_t H = t->hidden_size, n = b->n;
    m->be.ops->rmsnorm(&m->be.ctx, u->h1, x, l->input_ln, n, H, t->rms_eps);
    attention(m, b, li, s, u, replay);
    m->be.ops->rmsnorm_add(&m->be.ctx, u->x1, x, u->o, l->post_attn_ln, n, H, t->rms_eps, 1.0f);
    /* the layer's output scaled by the last op that writes it */
    feed_forward(m, b, li, s, moe, u, t->ple_dim ? 1.0f : l->layer_scalar);
    if (t->ple_dim) per_layer_inject(m, b, li, s, ple, u);
    else copy_rows(m, u->out, u->x2, n * H);
}

/* ---- forward ------------------------------------------------------------------ */

/* Every sequence runnable before any runs: tokens, room in its cache, and
 * blocks in the pools for all of them together. */
static GfStatus batch_check(const Model *m, ModelSeq *seqs, int n_seqs, GfError *err) {
    if (n_seqs <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no sequences to run");
    for (int q = 0; q < n_seqs; q++) {
        const KvCache *c = seqs[q].cache;
        int64_t n = seqs[q].in.n;
        if (n <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no tokens to run");
        for (int64_t i = 0; i < n; i++) {
            int32_t id = seqs[q].in.ids[i];
            if (id < 0 || id >= m->w->cfg.text.vocab_size)
                return gf_error_set(err, GF_INVALID, "invalid_token", NULL,
                                    "token id %d at position %lld is outside the vocabulary", id, (long long)i);
        }
        if (c->n_past + n > c->capacity)
            return gf_error_set(err, GF_TOO_LARGE, "context_length_exceeded", NULL,
                                "%lld tokens do not fit the cache of %lld", (long long)(c->n_past + n),
                                (long long)c->capacity);
    }
    for (int q = 0; q < n_seqs; q++)
        for (int sp = 0; sp < KV_SPACES; sp++) {
            KvPool *pool = seqs[q].cache->pool;
            int64_t need = 0;
            for (int r = 0; r < n_seqs; r++)
                if (seqs[r].cache->pool == pool) need += kv_cache_blocks_needed(seqs[r].cache, seqs[r].in.n, (KvSpace)sp);
            if (need > pool->space[sp].n_free)
                return gf_error_set(err, GF_TOO_LARGE, "kv_cache_full", NULL,
                                    "the KV cache has %lld free %sblocks of %lld positions, the batch needs %lld",
                                    (long long)pool->space[sp].n_free, sp == KV_WINDOW ? "sliding-window " : "",
                                    (long long)pool->block_len, (long long)need);
        }
    return GF_OK;
}

/* Grows the host index tables to n_seqs sequences and n rows. */
static GfStatus tables_reserve(Model *m, int n_seqs, int64_t n, GfError *err) {
    StepTables *t = &m->tables;
    if ((size_t)n_seqs + 1 > t->seq_cap) {
        size_t cap = (size_t)n_seqs + 1;
        int64_t *r = gf_realloc(t->row0, cap * sizeof *r, err);
        if (r) t->row0 = r;
        KnLoraSeg *g = r ? gf_realloc(t->segs, cap * sizeof *g, err) : NULL;
        if (g) t->segs = g;
        KnAttnSeq *a = g ? gf_realloc(t->att, cap * sizeof *a, err) : NULL;
        if (!a) return GF_NO_MEMORY;
        t->att = a;
        t->seq_cap = cap;
    }
    if ((size_t)n > t->row_cap) {
        int32_t *ids = gf_realloc(t->ids, (size_t)n * sizeof *ids, err);
        if (ids) t->ids = ids;
        int32_t *pos = ids ? gf_realloc(t->pos, (size_t)n * sizeof *pos, err) : NULL;
        if (pos) t->pos = pos;
        int32_t *slots = pos ? gf_realloc(t->slots, (size_t)n * KV_SPACES * sizeof *slots, err) : NULL;
        if (!slots) return GF_NO_MEMORY;
        t->slots = slots;
        t->row_cap = (size_t)n;
    }
    return GF_OK;
}

/* Row offsets, embedding ids and positions of every row of the batch. */
static GfStatus batch_rows(Model *m, ModelSeq *seqs, int n_seqs, Batch *b, GfError *err) {
    int64_t n = 0;
    for (int q = 0; q < n_seqs; q++) n += seqs[q].in.n;
    if (tables_reserve(m, n_seqs, n, err)) return err->status;
    StepTables *t = &m->tables;
    *b = (Batch){seqs, n_seqs, t->row0, 0, t->segs, 0, 0, 0};
    for (int q = 0; q < n_seqs; q++) {
        b->row0[q] = b->n;
        model_embed_ids(m, &seqs[q].in, t->ids + b->n);
        for (int64_t i = 0; i < seqs[q].in.n; i++) t->pos[b->n + i] = (int32_t)(seqs[q].cache->n_past + i);
        b->n += seqs[q].in.n;
        if (seqs[q].in.lora && seqs[q].in.lora->max_rank > b->max_rank) b->max_rank = seqs[q].in.lora->max_rank;
    }
    b->row0[n_seqs] = b->n;
    return GF_OK;
}

/* The rows each sequence wants logits of (its last, or all with
 * last_only 0 and !in.last_logits_only) gathered into s->a in one call;
 * returns their count. After the layers: their indices reuse the KV slot
 * tables, host and device. */
static int64_t gather_logit_rows(Model *m, const Batch *b, Scratch *s, int last_only) {
    int64_t H = m->w->cfg.text.hidden_size, rows = 0;
    int32_t *idx = m->tables.slots;
    for (int q = 0; q < b->n_seqs; q++) {
        int64_t n = b->row0[q + 1] - b->row0[q], k = last_only || b->seqs[q].in.last_logits_only ? 1 : n;
        for (int64_t r = b->row0[q + 1] - k; r < b->row0[q + 1]; r++) idx[rows++] = (int32_t)r;
    }
    m->be.ops->upload(&m->be.ctx, s->slots, idx, (size_t)rows * sizeof *idx);
    m->be.ops->rows_gather(&m->be.ctx, s->a, s->x, s->slots, rows, H);
    return rows;
}

/* Softcapped logits of k gathered rows from row r0 into s->logits. */
static void logits_chunk(Model *m, Scratch *s, int64_t r0, int64_t k) {
    const TextConfig *t = &m->w->cfg.text;
    m->be.ops->matmul(&m->be.ctx, s->logits, s->a + r0 * t->hidden_size, m->wt->embed, k);
    if (t->final_softcap > 0) m->be.ops->softcap(&m->be.ctx, s->logits, (size_t)(k * t->vocab_size), t->final_softcap);
}

/* logits of the rows each sequence asks for, in chunks of rows, each
 * downloaded. */
static void batch_logits(Model *m, const Batch *b, Scratch *s, float *logits) {
    int64_t V = m->w->cfg.text.vocab_size, rows = gather_logit_rows(m, b, s, 0);
    for (int64_t r0 = 0; r0 < rows; r0 += LOGIT_CHUNK) {
        int64_t k = rows - r0 < LOGIT_CHUNK ? rows - r0 : LOGIT_CHUNK;
        logits_chunk(m, s, r0, k);
        m->be.ops->download(&m->be.ctx, logits + r0 * V, s->logits, (size_t)(k * V) * sizeof(float));
    }
}

/* Each sequence's next token from its last row: ids[n_seqs], the rows'
 * random states advanced; only token ids cross to the host. */
static void batch_sample(Model *m, const Batch *b, Scratch *s, KnSampleRow *rows, int32_t *ids) {
    int64_t V = m->w->cfg.text.vocab_size, n = gather_logit_rows(m, b, s, 1);
    for (int64_t r0 = 0; r0 < n; r0 += LOGIT_CHUNK) {
        int64_t k = n - r0 < LOGIT_CHUNK ? n - r0 : LOGIT_CHUNK;
        logits_chunk(m, s, r0, k);
        m->be.ops->upload(&m->be.ctx, s->rows, rows + r0, (size_t)k * sizeof *rows);
        m->be.ops->sample(&m->be.ctx, s->next, s->logits, s->rows, k, V, s->cands);
        m->be.ops->download(&m->be.ctx, ids + r0, s->next, (size_t)k * sizeof *ids);
        m->be.ops->download(&m->be.ctx, rows + r0, s->rows, (size_t)k * sizeof *rows);
    }
}

/* Each row's slot in its cache's store of each space (KnKv's rule: position
 * p lives in block table[p / block_len], row p % block_len; -1 where the
 * space holds no block for it, never stored), uploaded for the layers'
 * scatters. After the caches took their blocks. */
static void batch_slots(Model *m, const Batch *b, Scratch *s) {
    int32_t *h = m->tables.slots;
    for (int sp = 0; sp < KV_SPACES; sp++)
        for (int q = 0; q < b->n_seqs; q++) {
            const KvCache *c = b->seqs[q].cache;
            int64_t blk = c->pool->block_len, n = b->row0[q + 1] - b->row0[q];
            int32_t *out = h + sp * b->n + b->row0[q];
            for (int64_t i = 0; i < n; i++) {
                int64_t pos = c->n_past + i, e = pos / blk;
                out[i] = e < c->n_table[sp] && c->table[sp][e] >= 0 ? (int32_t)(c->table[sp][e] * blk + pos % blk) : -1;
            }
        }
    for (int sp = 0; sp < KV_SPACES; sp++) /* a bucketed step's pad rows store nothing */
        for (int64_t r = b->row0[b->n_seqs]; r < b->n; r++) h[sp * b->n + r] = -1;
    m->be.ops->upload(&m->be.ctx, s->slots, h, (size_t)(KV_SPACES * b->n) * sizeof *h);
}

/* Embeds every sequence's new tokens into s->x, takes their cache blocks and
 * syncs the caches' tables, and computes the per-layer inputs. */
static void batch_embed(Model *m, const Batch *b, Scratch *s) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t H = t->hidden_size;
    m->be.ops->upload(&m->be.ctx, s->ids, m->tables.ids, (size_t)b->n * sizeof(int32_t));
    m->be.ops->upload(&m->be.ctx, s->pos, m->tables.pos, (size_t)b->n * sizeof(int32_t));
    m->be.ops->embed_rows(&m->be.ctx, s->x, m->wt->embed, s->ids, b->n, sqrtf((float)H));
    for (int q = 0; q < b->n_seqs; q++) {
        ModelSeq *sq = &b->seqs[q];
        int64_t r0 = b->row0[q];
        if (sq->in.soft_tokens) place_soft_tokens(m, &sq->in, s->x + r0 * H);
        mark_positions(m, sq->cache, &sq->in);
        kv_cache_grow(sq->cache, sq->in.n);
        kv_cache_sync(sq->cache, sq->cache->n_past, sq->in.n);
    }
    if (t->ple_dim) batch_ple(m, b, s);
    batch_slots(m, b, s);
}

/* What a forward hands back: any of logits (host), hidden states (host or
 * device; with kept, model_forward_hidden's bf16 layout), sampled next
 * tokens. */
typedef struct {
    float *logits;
    float *hidden;
    uint16_t *kept;            /* layer inputs 1 .. L - 1 in bf16 (device), or NULL */
    int hidden_on_device;
    int bulk;                  /* the training forward: Batch.bulk */
    const LayerBufs *tape;     /* the layers' buffers (a training workspace's), or NULL: the scratch's */
    KnSampleRow *rows;         /* with ids: sample each sequence's next token */
    int32_t *ids;
} Outputs;

/* Keeps the batch's residual stream x[n, H], the input of layer li (L: the
 * final normed output), where o says: slot li of o->hidden [(L + 1), n, H]
 * in host memory (download) or on the device (copy); with o->kept, the
 * inputs of layers 1 .. L - 1 in bf16 there, rounding x in place to what
 * was kept, and the others in slots 0 and 1 of o->hidden. */
static void keep_hidden(Model *m, const Outputs *o, int64_t li, float *x, int64_t n) {
    int64_t H = m->w->cfg.text.hidden_size, L = m->w->cfg.text.n_layers;
    size_t count = (size_t)(n * H);
    if (o->kept && li > 0 && li < L) {
        m->be.ops->round_bf16(&m->be.ctx, o->kept + (li - 1) * n * H, x, count);
        return;
    }
    float *at = o->hidden + (o->kept ? (li ? 1 : 0) : li) * n * H;
    if (o->hidden_on_device) m->be.ops->copy(&m->be.ctx, at, x, count * sizeof(float));
    else m->be.ops->download(&m->be.ctx, at, x, count * sizeof(float));
}

/* The batch's decoder layers and final norm over s->x, each layer's
 * output kept in o->hidden when asked. Device work only (and the yield
 * hook): submitted again as it is when a recording of it ran nothing. */
static void batch_layers(Model *m, const Batch *b, Scratch *s, MoeTape *moe, const Outputs *o) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t H = t->hidden_size, L = t->n_layers, n = b->n;
    LayerBufs u = scratch_bufs(s);
    if (o->tape) { /* the tape's buffers, the residual stream still updated in place */
        u = *o->tape;
        u.out = s->x;
    }
    for (int li = 0; li < L; li++) {
        decoder_layer(m, b, li, s, moe, s->x, s->ple, &u, 0);
        if (o->hidden && li < L - 1) keep_hidden(m, o, li + 1, s->x, n);
        model_layer_done(m);
    }
    m->be.ops->rmsnorm(&m->be.ctx, s->x, s->x, m->wt->final_norm, n, H, t->rms_eps);
}

/* 1 when the batch's layers may be recorded and launched as one graph
 * (ops.h graph_begin; CUDA graphs): a decode step, every sequence feeding
 * one token, on a backend that records, with no hidden states to keep (a
 * download needs the host mid-run; a device copy's target is the caller's),
 * no yield hook between layers and no LoRA dropout (training's, whose seeds
 * change from sequence to sequence). */
static int layers_recordable(const Model *m, const Batch *b, const Outputs *o) {
    if (!m->be.ops->graph_begin || o->hidden || m->yield) return 0;
    for (int q = 0; q < b->n_seqs; q++)
        if (b->seqs[q].in.n != 1 || (b->seqs[q].in.lora && b->seqs[q].in.lora->dropout.p > 0)) return 0;
    return 1;
}

/* Appends v to the step's signature at *n; 0 when it cannot grow. */
static int sig_put(StepTables *t, size_t *n, uint64_t v) {
    if (*n == t->sig_cap) {
        size_t cap = t->sig_cap ? 2 * t->sig_cap : 256;
        uint64_t *p = realloc(t->sig, cap * sizeof *p);
        if (!p) return 0;
        t->sig = p;
        t->sig_cap = cap;
    }
    t->sig[(*n)++] = v;
    return 1;
}

/* Appends what a sequence's launches read through pointers: its cache's
 * device tables (block tables, validity, groups) and, when digest, its
 * adapter's launch digest (lora.h; zeros without an adapter). 0 when the
 * signature cannot grow. */
static int seq_put(StepTables *t, size_t *n, const KvCache *c, const LoraBinding *lb, int digest) {
    uint64_t w[] = {(uintptr_t)c->d_table[KV_FULL], (uintptr_t)c->d_table[KV_WINDOW], (uintptr_t)c->d_valid,
                    (uintptr_t)c->d_group};
    int ok = 1;
    for (size_t i = 0; ok && i < sizeof w / sizeof *w; i++) ok = sig_put(t, n, w[i]);
    for (int i = 0; ok && digest && i < 4; i++) {
        uint64_t v = 0;
        if (lb) memcpy(&v, lb->launch_digest + 8 * i, sizeof v);
        ok = sig_put(t, n, v);
    }
    return ok;
}

/* What a decode step's layers pass to the ops by value, beyond what the
 * Model fixes for its life (weights, config, MoE chunk), as ops.h
 * graph_begin's signature: two steps with equal signatures submit the same
 * launches, so the second may replay the first's graph. The rows, the
 * activation buffer (every scratch address follows from it and the rows)
 * and the largest rank; per sequence its first row and its cache's device
 * tables (block tables, validity, groups); where a run of sequences on one
 * KV pool starts (attend), that pool's stores; where a run on one adapter
 * starts (batch_adapters), its launch digest (lora.h); a pool's dtype
 * with its stores (one freed and another allocated at its addresses must
 * not replay the other's launches). Token ids,
 * positions, KV slots and the tables' contents are device memory, uploaded
 * before the layers. 0 words when it cannot be built: the step is then
 * recorded and never replayed. */
static size_t step_signature(Model *m, const Batch *b) {
    StepTables *t = &m->tables;
    size_t n = 0;
    int ok = sig_put(t, &n, (uint64_t)b->n) && sig_put(t, &n, (uintptr_t)m->act.data) &&
             sig_put(t, &n, (uint64_t)b->max_rank) && sig_put(t, &n, (uint64_t)b->n_seqs);
    for (int q = 0; ok && q < b->n_seqs; q++) {
        const KvCache *c = b->seqs[q].cache;
        int new_pool = q == 0 || c->pool != b->seqs[q - 1].cache->pool;
        int new_lora = q == 0 || b->seqs[q].in.lora != b->seqs[q - 1].in.lora;
        ok = sig_put(t, &n, (uint64_t)b->row0[q]) && sig_put(t, &n, (uint64_t)new_pool) &&
             sig_put(t, &n, (uint64_t)new_lora) && seq_put(t, &n, c, b->seqs[q].in.lora, new_lora);
        for (int l = 0; ok && new_pool && l < c->pool->n_layers; l++)
            ok = sig_put(t, &n, (uintptr_t)c->pool->k[l]) && sig_put(t, &n, (uintptr_t)c->pool->v[l]);
        /* the dtype too: a pool freed and another of the other dtype allocated at its addresses */
        if (ok && new_pool) ok = sig_put(t, &n, (uint64_t)c->pool->block_len) && sig_put(t, &n, (uint64_t)c->pool->dtype);
    }
    return ok ? n : 0;
}

/* A bucketed step's signature: what step_signature names, less all that
 * now comes from the row tables (each sequence's cache tables and
 * adapter), plus the tables' buffer and which (layer, slot) pairs have an
 * adapter somewhere in the step. Sequences joining and leaving within a
 * bucket leave it unchanged. */
static size_t bucket_signature(Model *m, const Batch *b) {
    StepTables *t = &m->tables;
    const KvPool *pool = b->seqs[0].cache->pool;
    size_t n = 0;
    int ok = sig_put(t, &n, 0x7465646b63756221ull) && sig_put(t, &n, (uint64_t)b->n) &&
             sig_put(t, &n, (uintptr_t)m->act.data) && sig_put(t, &n, (uint64_t)b->max_rank) &&
             sig_put(t, &n, (uintptr_t)t->d_rows.data) && sig_put(t, &n, (uint64_t)pool->block_len) &&
             sig_put(t, &n, (uint64_t)pool->dtype);
    for (int l = 0; ok && l < pool->n_layers; l++)
        ok = sig_put(t, &n, (uintptr_t)pool->k[l]) && sig_put(t, &n, (uintptr_t)pool->v[l]);
    for (size_t w = 0; ok && w < t->active_words; w++) ok = sig_put(t, &n, t->lora_active[w]);
    return ok ? n : 0;
}

/* Rows of the bucket a decode step of n rows is padded to. */
static int64_t bucket_rows(int64_t n) {
    if (n <= 4) return n <= 1 ? 1 : n <= 2 ? 2 : 4;
    return (n + 7) / 8 * 8;
}

/* A rank rounded up to a power of two of at least 16 (0 stays 0), so that
 * adapters of nearby ranks share a graph. */
static int rank_bucket(int r) {
    int b = 16;
    while (r > 0 && b < r) b *= 2;
    return r > 0 ? b : 0;
}

/* 1 when the step is padded to a bucket: a step that may be recorded,
 * every sequence on one KV pool. */
static int step_bucketable(const Model *m, const Batch *b, const Outputs *o) {
    if (m->graphs_off || !layers_recordable(m, b, o)) return 0;
    for (int q = 1; q < b->n_seqs; q++)
        if (b->seqs[q].cache->pool != b->seqs[0].cache->pool) return 0;
    return b->n_seqs > 0;
}

/* Pads the batch to its bucket: the pad rows' token ids (the pad token)
 * and positions (0), the rank rounded up, and room for the row tables on
 * both sides. Before the scratch is cut and anything is embedded. */
static GfStatus batch_pad(Model *m, Batch *b, GfError *err) {
    int64_t n = bucket_rows(b->n);
    if (tables_reserve(m, b->n_seqs, n, err)) return err->status;
    StepTables *t = &m->tables;
    b->row0 = t->row0; /* unmoved (batch_rows reserved n_seqs), but the batch must follow the tables */
    b->segs = t->segs;
    for (int64_t r = b->n; r < n; r++) {
        t->ids[r] = m->w->cfg.text.pad_id;
        t->pos[r] = 0;
    }
    b->n = n;
    b->max_rank = rank_bucket(b->max_rank);
    RowsLayout lay = rows_layout(m, n);
    size_t words = ((size_t)m->w->cfg.text.n_layers * LORA_TEXT_SLOTS + 63) / 64;
    if (lay.total > t->rows_cap) {
        uint8_t *h = gf_realloc(t->rows_host, lay.total, err);
        if (!h) return GF_NO_MEMORY;
        t->rows_host = h;
        t->rows_cap = lay.total;
    }
    if (words > t->active_words) {
        uint64_t *a = gf_realloc(t->lora_active, words * sizeof *a, err);
        if (!a) return GF_NO_MEMORY;
        t->lora_active = a;
        t->active_words = words;
    }
    if (lay.total > t->d_rows.bytes) { /* room for 64 rows, or twice these: its address is in every signature */
        size_t bytes = rows_layout(m, n < 32 ? 64 : 2 * n).total;
        m->be.ops->free(&m->be.ctx, &t->d_rows);
        t->rows_key_words = 0; /* a new buffer holds no tables, even at the old address */
        if (m->be.ops->alloc(&m->be.ctx, &t->d_rows, bytes, KN_I32, "a decode step's row tables", err))
            return err->status;
    }
    return GF_OK;
}

/* The host image of the row tables: the pad constants, each row's
 * attention per (space, groups) (pad rows: position 0 of the pad table),
 * each row's adapter per (layer, slot), and the active bits. */
static void rows_build(Model *m, const Batch *b, uint8_t *h, RowsLayout lay) {
    StepTables *t = &m->tables;
    const char *dev = t->d_rows.data;
    int64_t n = b->n, L = m->w->cfg.text.n_layers, real = b->row0[b->n_seqs];
    memset(h, 0, lay.total);
    h[4] = 1; /* the pad table holds block 0 (bytes 0-3), the pad validity 1 */
    memset(t->lora_active, 0, t->active_words * sizeof *t->lora_active);
    KnAttnRow *att = (KnAttnRow *)(h + lay.att), pad = {(const int32_t *)dev, (const uint8_t *)(dev + 4), NULL};
    KnLoraRow *lr = (KnLoraRow *)(h + lay.lora);
    for (int v = 0; v < 2 * KV_SPACES; v++)
        for (int64_t r = real; r < n; r++) att[v * n + r] = pad;
    for (int q = 0; q < b->n_seqs; q++) {
        const KvCache *c = b->seqs[q].cache;
        const LoraBinding *lb = b->seqs[q].in.lora;
        int64_t r = b->row0[q];
        for (int sp = 0; sp < KV_SPACES; sp++) {
            att[(2 * sp) * n + r] = (KnAttnRow){c->d_table[sp], c->d_valid, NULL};
            att[(2 * sp + 1) * n + r] = (KnAttnRow){c->d_table[sp], c->d_valid, c->d_group};
        }
        for (int i = 0; lb && i < L * LORA_TEXT_SLOTS; i++) {
            const LoraPair *p = batch_pair(lb, i / LORA_TEXT_SLOTS, i % LORA_TEXT_SLOTS);
            if (!p) continue;
            KnLoraSeg sg = lora_segment(lb, p, r, 1);
            lr[(int64_t)i * n + r] = (KnLoraRow){sg.A, sg.B, sg.rank, sg.scale};
            t->lora_active[i / 64] |= 1ull << (i % 64);
        }
    }
}

/* What the row tables are built from: the rows, the tables' buffer, and
 * per sequence its cache's device tables and its adapter's binding and
 * launch digest (lora.h), into t->sig's words (0: none could be kept). */
static size_t rows_key(Model *m, const Batch *b) {
    StepTables *t = &m->tables;
    size_t n = 0;
    int ok = sig_put(t, &n, (uint64_t)b->n) && sig_put(t, &n, (uintptr_t)t->d_rows.data);
    for (int q = 0; ok && q < b->n_seqs; q++)
        ok = sig_put(t, &n, (uintptr_t)b->seqs[q].in.lora) && seq_put(t, &n, b->seqs[q].cache, b->seqs[q].in.lora, 1);
    return ok ? n : 0;
}

/* 1 when the tables in d_rows were built from the same key; else the key
 * is kept as theirs, when there is room (the caller then builds them). */
static int rows_unchanged(Model *m, size_t words) {
    StepTables *t = &m->tables;
    if (words && words == t->rows_key_words && memcmp(t->sig, t->rows_key, words * 8) == 0)
        return 1;
    t->rows_key_words = 0;
    if (words > t->rows_key_cap) {
        uint64_t *k = realloc(t->rows_key, words * sizeof *k);
        if (!k) return 0;
        t->rows_key = k;
        t->rows_key_cap = words;
    }
    memcpy(t->rows_key, t->sig, words * sizeof *t->rows_key);
    t->rows_key_words = words;
    return 0;
}

/* The row tables built and uploaded, unless the batch's sequences and
 * adapters are the ones they were last built from (a batch decoding on
 * unchanged: nothing to do). After the caches took their blocks and
 * synced their tables (batch_embed). */
static void row_tables(Model *m, const Batch *b) {
    StepTables *t = &m->tables;
    RowsLayout lay = rows_layout(m, b->n);
    if (rows_unchanged(m, rows_key(m, b))) return;
    rows_build(m, b, t->rows_host, lay);
    m->be.ops->upload(&m->be.ctx, t->d_rows.data, t->rows_host, lay.total);
}

/* The graph a bucketed step's launches belong to: its rows, and (bits 20
 * and up) a hash of its rank and the (layer, slot) pairs its adapters
 * touch, so that a bucket's base-only and adapter steps keep a graph each
 * rather than evicting one another. */
static int64_t bucket_key(const Model *m, const Batch *b) {
    uint64_t h = 1469598103934665603ull ^ (uint64_t)b->max_rank;
    for (size_t w = 0; w < m->tables.active_words; w++) h = (h ^ m->tables.lora_active[w]) * 1099511628211ull;
    return b->n | (int64_t)((h >> 24) << 20 & INT64_MAX);
}

/* Starts the step's graph (ops.h graph_begin): KN_GRAPH_NONE when its
 * layers run op by op. */
static int layers_graph(Model *m, const Batch *b, const Outputs *o) {
    if (!layers_recordable(m, b, o)) return KN_GRAPH_NONE;
    size_t words = b->bucketed ? bucket_signature(m, b) : step_signature(m, b);
    int64_t key = b->bucketed ? bucket_key(m, b) : b->n;
    int mode = m->be.ops->graph_begin(&m->be.ctx, key, words ? m->tables.sig : NULL, words * sizeof(uint64_t));
    if (mode != KN_GRAPH_OFF) return mode;
    m->graphs_off = 1; /* graphs off for good (GF_CUDA_GRAPHS=0, or given up): pad no more */
    return KN_GRAPH_NONE;
}

static GfStatus forward_batch(Model *m, ModelSeq *seqs, int n_seqs, const Outputs *o, GfError *err) {
    const TextConfig *t = &m->w->cfg.text;
    int64_t L = t->n_layers;
    Batch b = {0};
    Scratch s = {0};
    MoeTape moe;
    if (batch_check(m, seqs, n_seqs, err) || batch_rows(m, seqs, n_seqs, &b, err)) return err->status;
    b.bucketed = step_bucketable(m, &b, o);
    b.bulk = o->bulk && n_seqs == 1; /* attend_bulk takes one sequence */
    if ((b.bucketed && batch_pad(m, &b, err)) || scratch_take(m, b.n, b.max_rank, !o->tape, &s, &moe, err))
        return err->status;
    batch_embed(m, &b, &s);
    if (b.bucketed) row_tables(m, &b);
    if (o->hidden) keep_hidden(m, o, 0, s.x, b.n);
    /* a decode step's launches recorded and submitted at once, keyed by its
     * rows, or the last recording of the same launches replayed; a graph
     * that ran nothing is submitted again op by op */
    int graph = layers_graph(m, &b, o);
    if (graph != KN_GRAPH_REPLAY) batch_layers(m, &b, &s, &moe, o);
    if (graph != KN_GRAPH_NONE && m->be.ops->graph_end(&m->be.ctx)) {
        batch_layers(m, &b, &s, &moe, o);
        m->graphs.resubmitted++;
    } else if (graph == KN_GRAPH_REPLAY) {
        m->graphs.replayed++;
    } else if (graph == KN_GRAPH_RECORD) {
        m->graphs.recorded++;
    }
    m->graphs.padded += (uint64_t)b.bucketed;
    if (o->hidden) keep_hidden(m, o, L, s.x, b.n);
    for (int q = 0; q < n_seqs; q++) seqs[q].cache->n_past += seqs[q].in.n;
    if (o->logits) batch_logits(m, &b, &s, o->logits);
    if (o->ids) batch_sample(m, &b, &s, o->rows, o->ids);
    return m->be.ops->synchronize(&m->be.ctx, err);
}

GfStatus model_forward_batch(Model *m, ModelSeq *seqs, int n_seqs, float *logits, GfError *err) {
    Outputs o = {.logits = logits};
    return forward_batch(m, seqs, n_seqs, &o, err);
}

GfStatus model_forward_batch_sample(Model *m, ModelSeq *seqs, int n_seqs, KnSampleRow *rows, int32_t *ids,
                                    GfError *err) {
    Outputs o = {.rows = rows, .ids = ids};
    return forward_batch(m, seqs, n_seqs, &o, err);
}

GfStatus model_forward(Model *m, KvCache *c, const ModelInput *in, float *logits, float *hidden, GfError *err) {
    ModelSeq one = {c, *in};
    Outputs o = {.logits = logits, .hidden = hidden};
    return forward_batch(m, &one, 1, &o, err);
}

GfStatus model_forward_hidden(Model *m, KvCache *c, const ModelInput *in, float *hidden, uint16_t *kept,
                              const LayerBufs *tape, GfError *err) {
    ModelSeq one = {c, *in};
    Outputs o = {.hidden = hidden, .kept = kept, .hidden_on_device = 1, .bulk = 1, .tape = tape};
    return forward_batch(m, &one, 1, &o, err);
}

GfStatus model_layer_replay(Model *m, KvCache *c, const ModelInput *in, int li, const float *x, const float *ple,
                            const LayerBufs *tape, GfError *err) {
    int64_t n = in->n;
    if (n <= 0 || n > c->n_past || li < 0 || li >= m->w->cfg.text.n_layers)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no forward of these %lld positions to replay",
                            (long long)n);
    ModelSeq one = {c, *in};
    Batch b = {0};
    Scratch s = {0};
    MoeTape moe;
    if (tables_reserve(m, 1, n, err)) return err->status;
    b = (Batch){&one, 1, m->tables.row0, n, m->tables.segs, in->lora ? in->lora->max_rank : 0, 0, 1};
    b.row0[0] = 0;
    b.row0[1] = n;
    if (scratch_take(m, n, b.max_rank, 0, &s, &moe, err)) return err->status;
    for (int64_t i = 0; i < n; i++) m->tables.pos[i] = (int32_t)(c->n_past - n + i);
    m->be.ops->upload(&m->be.ctx, s.pos, m->tables.pos, (size_t)n * sizeof(int32_t));
    decoder_layer(m, &b, li, &s, &moe, x, ple, tape, 1);
    return GF_OK;
}

static int is_eos(const TextConfig *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

int model_is_eos(const Model *m, int32_t id) { return is_eos(&m->w->cfg.text, id); }

GfStatus model_generate(Model *m, const ModelInput *prompt, int64_t max_new, const KnSampleRow *sampling,
                        ModelTokenFn fn, void *user, int64_t *n_out, GfError *err) {
    KvCache c;
    *n_out = 0;
    if (kv_cache_init(&c, &m->w->cfg.text, &m->be, prompt->n + (max_new > 0 ? max_new : 0), err)) return err->status;
    KnSampleRow row = *sampling;
    ModelSeq seq = {&c, *prompt};
    seq.in.last_logits_only = 1;
    GfStatus st = GF_OK;
    for (;;) {
        int32_t next;
        if ((st = model_forward_batch_sample(m, &seq, 1, &row, &next, err)) || *n_out >= max_new) break;
        (*n_out)++;
        if (fn(user, next) || is_eos(&m->w->cfg.text, next) || *n_out == max_new) break;
        seq.in = (ModelInput){.ids = &next, .n = 1, .last_logits_only = 1, .lora = prompt->lora};
    }
    kv_cache_free(&c);
    return st;
}

typedef struct {
    int32_t *out;
    int64_t n;
} GreedyOut;

static int keep_token(void *user, int32_t id) {
    GreedyOut *g = user;
    g->out[g->n++] = id;
    return 0;
}

GfStatus model_generate_greedy_input(Model *m, const ModelInput *prompt, int64_t max_new, int32_t *out, int64_t *n_out,
                                     GfError *err) {
    GreedyOut g = {out, 0};
    KnSampleRow greedy = {0};
    return model_generate(m, prompt, max_new, &greedy, keep_token, &g, n_out, err);
}

GfStatus model_generate_greedy(Model *m, const int32_t *prompt, int64_t n_prompt, int64_t max_new, int32_t *out,
                               int64_t *n_out, GfError *err) {
    ModelInput in = {.ids = prompt, .n = n_prompt};
    return model_generate_greedy_input(m, &in, max_new, out, n_out, err);
}
