/* forward.c - the Gemma 4 text forward pass (GEMMA4.md §3-§4) over a KV
 * cache, and greedy generation. One sequence per call; prefill of n tokens
 * and n single-token steps compute the same function. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "model_impl.h"
#include "lora.h"

/* ---- KV cache ------------------------------------------------------------- */

static uint64_t kv_row_floats(const LayerConfig *l) { return (uint64_t)l->kv_heads * (uint64_t)l->head_dim; }

uint64_t kv_block_bytes(const Model *m, int64_t block_len) {
    const TextConfig *t = &m->cfg.text;
    uint64_t floats = 0;
    for (int i = 0; i < t->n_layers; i++)
        if (!t->layers[i].kv_shared) floats += 2 * kv_row_floats(&t->layers[i]);
    return floats * (uint64_t)block_len * sizeof(float);
}

GfStatus kv_pool_init(KvPool *p, const Model *m, int64_t block_len, int64_t n_blocks, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    memset(p, 0, sizeof *p);
    if (block_len <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV pool needs blocks of at least one position");
    p->block_len = block_len;
    p->n_blocks = n_blocks;
    p->n_layers = t->n_layers;
    p->k = gf_calloc((size_t)t->n_layers, sizeof *p->k, err);
    p->v = gf_calloc((size_t)t->n_layers, sizeof *p->v, err);
    p->free_ids = gf_malloc((size_t)n_blocks * sizeof *p->free_ids, err);
    if (!p->k || !p->v || !p->free_ids) { kv_pool_free(p); return GF_NO_MEMORY; }
    for (int i = 0; i < t->n_layers; i++) {
        if (t->layers[i].kv_shared) continue;
        size_t n = (size_t)(n_blocks * block_len) * kv_row_floats(&t->layers[i]);
        p->k[i] = gf_malloc(n * sizeof(float), err);
        p->v[i] = gf_malloc(n * sizeof(float), err);
        if (!p->k[i] || !p->v[i]) { kv_pool_free(p); return GF_NO_MEMORY; }
    }
    for (int64_t b = 0; b < n_blocks; b++) p->free_ids[b] = (int32_t)(n_blocks - 1 - b);
    p->n_free = n_blocks;
    return GF_OK;
}

void kv_pool_free(KvPool *p) {
    if (!p) return;
    for (int i = 0; p->k && i < p->n_layers; i++) free(p->k[i]);
    for (int i = 0; p->v && i < p->n_layers; i++) free(p->v[i]);
    free(p->k);
    free(p->v);
    free(p->free_ids);
    memset(p, 0, sizeof *p);
}

static GfStatus cache_tables(KvCache *c, int64_t capacity, GfError *err) {
    c->capacity = capacity;
    c->max_blocks = (capacity + c->pool->block_len - 1) / c->pool->block_len;
    c->table = gf_calloc((size_t)c->max_blocks, sizeof *c->table, err);
    c->valid = gf_calloc((size_t)capacity, 1, err);
    c->group = gf_calloc((size_t)capacity, sizeof *c->group, err);
    if (!c->table || !c->valid || !c->group) { kv_cache_free(c); return GF_NO_MEMORY; }
    return GF_OK;
}

GfStatus kv_cache_init(KvCache *c, const Model *m, int64_t capacity, GfError *err) {
    memset(c, 0, sizeof *c);
    if (capacity <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV cache needs room for a position");
    if (kv_pool_init(&c->own, m, capacity, 1, err)) return err->status;
    c->pool = &c->own;
    return cache_tables(c, capacity, err);
}

GfStatus kv_cache_init_paged(KvCache *c, KvPool *pool, int64_t capacity, GfError *err) {
    memset(c, 0, sizeof *c);
    if (capacity <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV cache needs room for a position");
    c->pool = pool;
    return cache_tables(c, capacity, err);
}

void kv_cache_reset(KvCache *c) {
    while (c->n_table > 0) c->pool->free_ids[c->pool->n_free++] = c->table[--c->n_table];
    c->n_past = 0;
    c->n_groups = 0;
}

void kv_cache_free(KvCache *c) {
    if (!c) return;
    if (c->pool) kv_cache_reset(c);
    if (c->pool == &c->own) kv_pool_free(&c->own);
    free(c->table);
    free(c->valid);
    free(c->group);
    memset(c, 0, sizeof *c);
}

int64_t kv_cache_blocks_needed(const KvCache *c, int64_t n) {
    int64_t need = (c->n_past + n + c->pool->block_len - 1) / c->pool->block_len;
    return need > c->n_table ? need - c->n_table : 0;
}

/* Takes the blocks to hold n more positions (room checked by the caller). */
static void cache_grow(KvCache *c, int64_t n) {
    for (int64_t k = kv_cache_blocks_needed(c, n); k > 0; k--) c->table[c->n_table++] = c->pool->free_ids[--c->pool->n_free];
}

/* Row of position pos of layer li's keys (or values) in the pool. */
static float *cache_row(const KvCache *c, float *store, int li_row_floats, int64_t pos) {
    int64_t blk = c->pool->block_len;
    return store + ((int64_t)c->table[pos / blk] * blk + pos % blk) * li_row_floats;
}

/* ---- scratch -------------------------------------------------------------- */

/* The batch being run: its sequences and where each one's rows start. */
typedef struct {
    ModelSeq *seqs;
    int n_seqs;
    int64_t *row0;             /* [n_seqs + 1]: rows of sequence i are row0[i] .. row0[i + 1] */
    int64_t n;                 /* rows in all */
} Batch;

typedef struct {
    float *x, *h, *a;          /* [n, H] */
    float *q, *att;            /* [n, NH * Dmax] */
    float *k, *v;              /* [n, KVH * Dmax] */
    float *gate, *up;          /* [n, Imax] */
    float *ple, *ple_g;        /* [n, L, P], [n, P] */
    MoeTape moe;
    float *lora_tmp;           /* [n, max rank] */
} Scratch;

/* Cuts the scratch of an n-row batch from the Model's buffer (grown to the
 * largest batch seen; the Model is used by one thread at a time). */
static GfStatus scratch_take(Model *m, int64_t n, int max_rank, Scratch *s, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, dmax = 0, kvmax = 0, imax = 0, LP = (int64_t)t->n_layers * t->ple_dim;
    for (int i = 0; i < t->n_layers; i++) {
        const LayerConfig *l = &t->layers[i];
        if (l->head_dim > dmax) dmax = l->head_dim;
        if ((int64_t)l->kv_heads * l->head_dim > kvmax) kvmax = (int64_t)l->kv_heads * l->head_dim;
        if (l->intermediate > imax) imax = l->intermediate;
    }
    int64_t qw = t->n_heads * dmax;
    float *moe_buf;
    size_t sizes[] = {n * H, n * H, n * H, n * qw, n * qw, n * kvmax, n * kvmax, n * imax, n * imax,
                      n * LP, n * t->ple_dim, moe_tape_floats(t), (size_t)(n * max_rank)};
    float **slots[] = {&s->x, &s->h, &s->a, &s->q, &s->att, &s->k, &s->v, &s->gate, &s->up,
                       &s->ple, &s->ple_g, &moe_buf, &s->lora_tmp};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) total += (sizes[i] + 15) & ~(size_t)15;
    if (total > m->scratch_floats) {
        float *b = realloc(m->scratch, total * sizeof(float));
        if (!b) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for activations");
        m->scratch = b;
        m->scratch_floats = total;
    }
    float *p = m->scratch;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = p;
        p += (sizes[i] + 15) & ~(size_t)15;
    }
    moe_tape_init(&s->moe, t, moe_buf);
    return GF_OK;
}

/* ---- pieces of the forward pass --------------------------------------------- */

/* y[n, out] = x W^T over every row of the batch, plus each adapter's term
 * on the rows of the run of consecutive sequences that use it. */
static void linear(Model *m, const Batch *b, const Scratch *s, float *y, const float *x, KnMatrix w, int li, int slot) {
    m->be.ops->matmul(&m->be.ctx, y, x, w, b->n);
    for (int i = 0, j; i < b->n_seqs; i = j) {
        const LoraBinding *lb = b->seqs[i].in.lora;
        for (j = i + 1; j < b->n_seqs && b->seqs[j].in.lora == lb;) j++;
        const LoraPair *p = lb ? lb->text[li * LORA_TEXT_SLOTS + slot] : NULL;
        int64_t r0 = b->row0[i];
        if (p) lora_apply(lb, p, y + r0 * w.rows, x + r0 * w.cols, b->row0[j] - r0, s->lora_tmp);
    }
}

int model_mm_kind(const GemmaConfig *c, int32_t id) {
    if (id == c->image_token_id) return 1;
    if (id == c->video_token_id) return 2;
    if (id == c->audio_token_id) return 3;
    return 0;
}

/* Token rows, placeholders looked up as pad and then overwritten by soft
 * tokens (§3.2, §5); fills the cache's validity and vision groups (§4).
 * The ids were checked by batch_check. */
static void embed(Model *m, KvCache *c, const ModelInput *in, float *x) {
    const GemmaConfig *g = &m->cfg;
    const TextConfig *t = &g->text;
    float scale = sqrtf((float)t->hidden_size);
    int64_t soft = 0;
    for (int64_t i = 0; i < in->n; i++) {
        int32_t id = in->ids[i];
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(g, id);
        int64_t pos = c->n_past + i;
        m->be.ops->embed_row(&m->be.ctx, x + i * t->hidden_size, m->embed, kind ? t->pad_id : id, scale);
        if (in->soft_tokens && id == g->image_token_id)
            memcpy(x + i * t->hidden_size, in->soft_tokens + (soft++) * t->hidden_size, (size_t)t->hidden_size * sizeof(float));
        c->valid[pos] = in->valid ? in->valid[i] : 1;
        int vision = kind == 1 || kind == 2;
        c->group[pos] = !vision ? -1 : (pos > 0 && c->group[pos - 1] >= 0) ? c->group[pos - 1] : c->n_groups++;
    }
}

/* Per-layer embeddings (§3.3): ple[n, L, P] from the token ids and the
 * embedded sequence x0[n, H]; lora_tmp holds n * rank floats. */
void model_ple_inputs(Model *m, const ModelInput *in, const float *x, float *ple, float *lora_tmp) {
    const TextConfig *t = &m->cfg.text;
    int64_t L = t->n_layers, P = t->ple_dim, H = t->hidden_size, n = in->n;
    m->be.ops->matmul(&m->be.ctx, ple, x, m->ple_model_proj, n);
    if (in->lora && in->lora->ple_model_proj) lora_apply(in->lora, in->lora->ple_model_proj, ple, x, n, lora_tmp);
    float ctx_scale = (float)(1.0 / sqrt((double)H)), tok_scale = sqrtf((float)P), mix = (float)(1.0 / sqrt(2.0));
    for (int64_t i = 0; i < n * L * P; i++) ple[i] *= ctx_scale;
    m->be.ops->rmsnorm(&m->be.ctx, ple, ple, m->ple_norm, n * L, P, t->rms_eps);
    float *tok = malloc((size_t)(L * P) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        int32_t id = in->ids[i];
        int kind = in->mm_type ? in->mm_type[i] : model_mm_kind(&m->cfg, id);
        if (tok) m->be.ops->embed_row(&m->be.ctx, tok, m->embed_ple, kind ? t->pad_id : id, tok_scale);
        for (int64_t j = 0; tok && j < L * P; j++) ple[i * L * P + j] = (ple[i * L * P + j] + tok[j]) * mix;
    }
    free(tok);
}

/* Keys, values and the attention of sequence `seq` of the batch for its
 * rows of s->q (already normed and rotated), written to s->att. */
static void attend(Model *m, const Batch *b, int seq, int li, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    KvCache *c = b->seqs[seq].cache;
    int D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads;
    int64_t r0 = b->row0[seq], n = b->row0[seq + 1] - r0, pos0 = c->n_past, kvw = (int64_t)KVH * D;
    if (!lc->kv_shared) {
        for (int64_t i = 0; i < n; i++) {
            memcpy(cache_row(c, c->pool->k[li], (int)kvw, pos0 + i), s->k + (r0 + i) * kvw, (size_t)kvw * sizeof(float));
            memcpy(cache_row(c, c->pool->v[li], (int)kvw, pos0 + i), s->v + (r0 + i) * kvw, (size_t)kvw * sizeof(float));
        }
    }
    KnMask mask = {c->valid, t->bidirectional_vision ? c->group : NULL,
                   lc->kind == LAYER_SLIDING ? t->sliding_window : 0};
    if (lc->kind == LAYER_FULL) mask.group = NULL; /* full layers stay causal (§4) */
    int src = lc->store_layer;
    KnKv kv = {c->pool->k[src], c->pool->v[src], c->table, c->pool->block_len};
    m->be.ops->attention_paged(&m->be.ctx, s->att + r0 * NH * D, s->q + r0 * NH * D, &kv, n, pos0, pos0 + n, NH, KVH, D, 1.0f,
                            &mask);
}

/* Self-attention of layer li over the batch (§3.5, §3.6); result in s->h [n, H]. */
static void attention(Model *m, const Batch *b, int li, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const LayerConfig *lc = &t->layers[li];
    const Layer *l = &m->layers[li];
    int D = lc->head_dim, NH = t->n_heads, KVH = lc->kv_heads;
    int64_t n = b->n;
    linear(m, b, s, s->q, s->h, l->q, li, LORA_Q);
    m->be.ops->rmsnorm(&m->be.ctx, s->q, s->q, l->q_norm, n * NH, D, t->rms_eps);
    if (!lc->kv_shared) {
        linear(m, b, s, s->k, s->h, l->k, li, LORA_K);
        if (lc->k_eq_v) memcpy(s->v, s->k, (size_t)(n * KVH * D) * sizeof(float));
        else linear(m, b, s, s->v, s->h, l->v, li, LORA_V);
        m->be.ops->rmsnorm(&m->be.ctx, s->k, s->k, l->k_norm, n * KVH, D, t->rms_eps);
        m->be.ops->rmsnorm(&m->be.ctx, s->v, s->v, NULL, n * KVH, D, t->rms_eps);
    }
    for (int q = 0; q < b->n_seqs; q++) {
        int64_t pos0 = b->seqs[q].cache->n_past;
        for (int64_t i = b->row0[q]; i < b->row0[q + 1]; i++) {
            int64_t pos = pos0 + i - b->row0[q];
            m->be.ops->rope(&m->be.ctx, s->q + i * NH * D, NH, D, l->inv_freq, pos);
            if (!lc->kv_shared) m->be.ops->rope(&m->be.ctx, s->k + i * KVH * D, KVH, D, l->inv_freq, pos);
        }
        attend(m, b, q, li, s);
    }
    linear(m, b, s, s->h, s->att, l->o, li, LORA_O);
}

/* Feed-forward block of layer li (§3.4, §3.7, §3.8): x += FFN(x) in place. */
static void feed_forward(Model *m, const Batch *b, int li, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size, I = t->layers[li].intermediate, n = b->n;
    m->be.ops->rmsnorm(&m->be.ctx, s->h, s->x, l->pre_ff_ln, n, H, t->rms_eps);
    linear(m, b, s, s->gate, s->h, l->gate, li, LORA_GATE);
    linear(m, b, s, s->up, s->h, l->up, li, LORA_UP);
    m->be.ops->gelu_tanh(&m->be.ctx, s->gate, (size_t)(n * I));
    for (int64_t i = 0; i < n * I; i++) s->gate[i] *= s->up[i];
    linear(m, b, s, s->h, s->gate, l->down, li, LORA_DOWN);
    if (t->moe) {
        m->be.ops->rmsnorm(&m->be.ctx, s->h, s->h, l->post_ff_ln1, n, H, t->rms_eps);
        for (int64_t i = 0; i < n; i++) {
            moe_forward(m, l, s->x + i * H, s->a + i * H, &s->moe);
            for (int64_t j = 0; j < H; j++) s->h[i * H + j] += s->a[i * H + j];
        }
    }
    m->be.ops->rmsnorm(&m->be.ctx, s->h, s->h, l->post_ff_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
}

/* PLE injection at the end of layer li (§3.4). */
static void per_layer_inject(Model *m, const Batch *b, int li, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size, P = t->ple_dim, L = t->n_layers, n = b->n;
    linear(m, b, s, s->ple_g, s->x, l->ple_gate, li, LORA_PLE_GATE);
    m->be.ops->gelu_tanh(&m->be.ctx, s->ple_g, (size_t)(n * P));
    for (int64_t i = 0; i < n; i++)
        for (int64_t p = 0; p < P; p++) s->ple_g[i * P + p] *= s->ple[(i * L + li) * P + p];
    linear(m, b, s, s->h, s->ple_g, l->ple_proj, li, LORA_PLE_PROJ);
    m->be.ops->rmsnorm(&m->be.ctx, s->h, s->h, l->post_ple_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
}

static void decoder_layer(Model *m, const Batch *b, int li, Scratch *s) {
    const TextConfig *t = &m->cfg.text;
    const Layer *l = &m->layers[li];
    int64_t H = t->hidden_size, n = b->n;
    m->be.ops->rmsnorm(&m->be.ctx, s->h, s->x, l->input_ln, n, H, t->rms_eps);
    attention(m, b, li, s);
    m->be.ops->rmsnorm(&m->be.ctx, s->h, s->h, l->post_attn_ln, n, H, t->rms_eps);
    for (int64_t i = 0; i < n * H; i++) s->x[i] += s->h[i];
    feed_forward(m, b, li, s);
    if (t->ple_dim) per_layer_inject(m, b, li, s);
    for (int64_t i = 0; i < n * H; i++) s->x[i] *= l->layer_scalar;
}

/* ---- forward ------------------------------------------------------------------ */

/* Every sequence runnable before any runs: tokens, room in its cache, and
 * blocks in the pools for all of them together. */
static GfStatus batch_check(const Model *m, ModelSeq *seqs, int n_seqs, GfError *err) {
    for (int q = 0; q < n_seqs; q++) {
        const KvCache *c = seqs[q].cache;
        int64_t n = seqs[q].in.n;
        if (n <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no tokens to run");
        for (int64_t i = 0; i < n; i++) {
            int32_t id = seqs[q].in.ids[i];
            if (id < 0 || id >= m->cfg.text.vocab_size)
                return gf_error_set(err, GF_INVALID, "invalid_token", NULL,
                                    "token id %d at position %lld is outside the vocabulary", id, (long long)i);
        }
        if (c->n_past + n > c->capacity)
            return gf_error_set(err, GF_TOO_LARGE, "context_length_exceeded", NULL,
                                "%lld tokens do not fit the cache of %lld", (long long)(c->n_past + n),
                                (long long)c->capacity);
    }
    for (int q = 0; q < n_seqs; q++) {
        KvPool *pool = seqs[q].cache->pool;
        int64_t need = 0;
        for (int r = 0; r < n_seqs; r++)
            if (seqs[r].cache->pool == pool) need += kv_cache_blocks_needed(seqs[r].cache, seqs[r].in.n);
        if (need > pool->n_free)
            return gf_error_set(err, GF_TOO_LARGE, "kv_cache_full", NULL,
                                "the KV cache has %lld free blocks of %lld positions, the batch needs %lld",
                                (long long)pool->n_free, (long long)pool->block_len, (long long)need);
    }
    return GF_OK;
}

static GfStatus batch_rows(Model *m, ModelSeq *seqs, int n_seqs, Batch *b, int *max_rank, GfError *err) {
    if (n_seqs <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "no sequences to run");
    if ((size_t)n_seqs + 1 > m->rows_cap) {
        int64_t *r = realloc(m->rows, ((size_t)n_seqs + 1) * sizeof *r);
        if (!r) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for the batch");
        m->rows = r;
        m->rows_cap = (size_t)n_seqs + 1;
    }
    *b = (Batch){seqs, n_seqs, m->rows, 0};
    *max_rank = 0;
    for (int q = 0; q < n_seqs; q++) {
        b->row0[q] = b->n;
        b->n += seqs[q].in.n;
        if (seqs[q].in.lora && seqs[q].in.lora->max_rank > *max_rank) *max_rank = seqs[q].in.lora->max_rank;
    }
    b->row0[n_seqs] = b->n;
    return GF_OK;
}

/* logits of the rows each sequence asks for, in one matmul over them. */
static void batch_logits(Model *m, const Batch *b, Scratch *s, float *logits) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, rows = 0;
    for (int q = 0; q < b->n_seqs; q++) {
        int64_t n = b->row0[q + 1] - b->row0[q], k = b->seqs[q].in.last_logits_only ? 1 : n;
        memcpy(s->a + rows * H, s->x + (b->row0[q + 1] - k) * H, (size_t)(k * H) * sizeof(float));
        rows += k;
    }
    m->be.ops->matmul(&m->be.ctx, logits, s->a, m->embed, rows);
    if (t->final_softcap > 0) m->be.ops->softcap(&m->be.ctx, logits, (size_t)(rows * t->vocab_size), t->final_softcap);
}

static GfStatus forward_batch(Model *m, ModelSeq *seqs, int n_seqs, float *logits, float *hidden, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, L = t->n_layers, LP = L * t->ple_dim;
    Batch b = {0};
    Scratch s;
    int max_rank = 0;
    if (batch_check(m, seqs, n_seqs, err) || batch_rows(m, seqs, n_seqs, &b, &max_rank, err) ||
        scratch_take(m, b.n, max_rank, &s, err))
        return err->status;
    for (int q = 0; q < n_seqs; q++) {
        embed(m, seqs[q].cache, &seqs[q].in, s.x + b.row0[q] * H);
        cache_grow(seqs[q].cache, seqs[q].in.n);
        if (t->ple_dim) model_ple_inputs(m, &seqs[q].in, s.x + b.row0[q] * H, s.ple + b.row0[q] * LP, s.lora_tmp);
    }
    int64_t n = b.n;
    if (hidden) memcpy(hidden, s.x, (size_t)(n * H) * sizeof(float));
    for (int li = 0; li < L; li++) {
        decoder_layer(m, &b, li, &s);
        if (hidden && li < L - 1) memcpy(hidden + (li + 1) * n * H, s.x, (size_t)(n * H) * sizeof(float));
    }
    m->be.ops->rmsnorm(&m->be.ctx, s.x, s.x, m->final_norm, n, H, t->rms_eps);
    if (hidden) memcpy(hidden + L * n * H, s.x, (size_t)(n * H) * sizeof(float));
    for (int q = 0; q < n_seqs; q++) seqs[q].cache->n_past += seqs[q].in.n;
    if (logits) batch_logits(m, &b, &s, logits);
    return GF_OK;
}

GfStatus model_forward_batch(Model *m, ModelSeq *seqs, int n_seqs, float *logits, GfError *err) {
    return forward_batch(m, seqs, n_seqs, logits, NULL, err);
}

GfStatus model_forward(Model *m, KvCache *c, const ModelInput *in, float *logits, float *hidden, GfError *err) {
    ModelSeq one = {c, *in};
    return forward_batch(m, &one, 1, logits, hidden, err);
}

static int is_eos(const TextConfig *t, int32_t id) {
    for (int i = 0; i < t->n_eos; i++)
        if (t->eos_ids[i] == id) return 1;
    return 0;
}

int model_is_eos(const Model *m, int32_t id) { return is_eos(&m->cfg.text, id); }

static int32_t argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return (int32_t)best;
}

GfStatus model_generate_greedy_input(Model *m, const ModelInput *prompt, int64_t max_new, int32_t *out, int64_t *n_out,
                                     GfError *err) {
    const TextConfig *t = &m->cfg.text;
    KvCache c;
    *n_out = 0;
    if (kv_cache_init(&c, m, prompt->n + max_new, err)) return err->status;
    float *logits = gf_malloc((size_t)t->vocab_size * sizeof(float), err);
    GfStatus st = logits ? GF_OK : GF_NO_MEMORY;
    ModelInput in = *prompt;
    in.last_logits_only = 1;
    if (!st) st = model_forward(m, &c, &in, logits, NULL, err);
    while (!st && *n_out < max_new) {
        int32_t next = argmax(logits, t->vocab_size);
        out[(*n_out)++] = next;
        if (is_eos(t, next) || *n_out == max_new) break;
        ModelInput step = {.ids = &next, .n = 1, .last_logits_only = 1, .lora = prompt->lora};
        st = model_forward(m, &c, &step, logits, NULL, err);
    }
    free(logits);
    kv_cache_free(&c);
    return st;
}

GfStatus model_generate_greedy(Model *m, const int32_t *prompt, int64_t n_prompt, int64_t max_new, int32_t *out,
                               int64_t *n_out, GfError *err) {
    ModelInput in = {.ids = prompt, .n = n_prompt};
    return model_generate_greedy_input(m, &in, max_new, out, n_out, err);
}
