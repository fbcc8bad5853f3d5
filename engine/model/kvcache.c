/* kvcache.c - block pool and per-sequence tables of the paged KV cache. */
#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

static uint64_t kv_row_floats(const LayerConfig *l) { return (uint64_t)l->kv_heads * (uint64_t)l->head_dim; }

KvSpace kv_layer_space(const TextConfig *t, int li) {
    int store = t->layers[li].store_layer;
    for (int j = 0; j < t->n_layers; j++)
        if (t->layers[j].store_layer == store && t->layers[j].kind != LAYER_SLIDING) return KV_FULL;
    return KV_WINDOW;
}

uint64_t kv_block_bytes(const TextConfig *t, int64_t block_len, KvSpace s, KnDtype dtype) {
    uint64_t elements = 0;
    for (int i = 0; i < t->n_layers; i++)
        if (!t->layers[i].kv_shared && kv_layer_space(t, i) == s) elements += 2 * kv_row_floats(&t->layers[i]);
    return elements * (uint64_t)block_len * kn_dtype_size(dtype);
}

GfStatus kv_dtype_check(const TextConfig *t, KnDtype dtype, GfError *err) {
    if (dtype == KN_F32) return GF_OK;
    if (dtype != KN_BF16)
        return gf_error_set(err, GF_INVALID, "invalid_value", "kv_cache", "a KV cache holds fp32 or bf16, not %s",
                            kn_dtype_name(dtype));
    for (int i = 0; i < t->n_layers; i++)
        if (t->layers[i].head_dim > KN_KV_BF16_MAX_DIM)
            return gf_error_set(err, GF_INVALID, "invalid_value", "kv_cache",
                                "a bf16 KV cache takes heads of at most %d dimensions; layer %d has %d", KN_KV_BF16_MAX_DIM,
                                i, t->layers[i].head_dim);
    return GF_OK;
}

static GfStatus blocks_init(KvBlocks *b, int64_t n, GfError *err) {
    b->n_blocks = n;
    b->free_ids = gf_malloc((size_t)(n > 0 ? n : 1) * sizeof *b->free_ids, err);
    if (!b->free_ids) return GF_NO_MEMORY;
    for (int64_t i = 0; i < n; i++) b->free_ids[i] = (int32_t)(n - 1 - i);
    b->n_free = n;
    return GF_OK;
}

int kv_layer_read_later(const TextConfig *t, int li) {
    for (int j = li + 1; j < t->n_layers; j++)
        if (t->layers[j].kv_shared && t->layers[j].store_layer == li) return 1;
    return 0;
}

int kv_layer_transient(const TextConfig *t, int li) { return !t->layers[li].kv_shared && !kv_layer_read_later(t, li); }

uint64_t kv_transient_row(const TextConfig *t) {
    uint64_t most = 0;
    for (int i = 0; i < t->n_layers; i++)
        if (kv_layer_transient(t, i) && kv_row_floats(&t->layers[i]) > most) most = kv_row_floats(&t->layers[i]);
    return most;
}

/* The k and v stores of layer i, rows of row_floats, in its space's blocks. */
static GfStatus layer_stores(KvPool *p, uint64_t row_floats, int i, GfError *err) {
    const KnBackend *be = p->be;
    size_t row = row_floats * kn_dtype_size(p->dtype);
    size_t bytes = (size_t)(p->space[p->layer_space[i]].n_blocks * p->block_len) * row;
    if (be->ops->alloc(&be->ctx, &p->bufs[2 * i], bytes, p->dtype, "the KV cache", err) ||
        be->ops->alloc(&be->ctx, &p->bufs[2 * i + 1], bytes, p->dtype, "the KV cache", err))
        return err->status;
    p->k[i] = p->bufs[2 * i].data;
    p->v[i] = p->bufs[2 * i + 1].data;
    if (be->ops->graph_begin) { /* position 0 of block 0: what a bucketed decode step's pad rows read (forward.c) */
        be->ops->memset(&be->ctx, p->k[i], 0, row);
        be->ops->memset(&be->ctx, p->v[i], 0, row);
    }
    return GF_OK;
}

/* kv_pool_init; with transient, the layers kv_layer_transient names share
 * the stores of the first of them, of kv_transient_row's width. */
static GfStatus pool_init(KvPool *p, const TextConfig *t, const KnBackend *be, KnDtype dtype, int64_t block_len,
                          int64_t n_blocks, int64_t n_window_blocks, int transient, GfError *err) {
    memset(p, 0, sizeof *p);
    if (block_len <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX || n_window_blocks > INT32_MAX)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV pool needs blocks of at least one position");
    if (kv_dtype_check(t, dtype, err)) return err->status;
    p->be = be;
    p->dtype = dtype;
    p->block_len = block_len;
    p->window = t->sliding_window;
    p->n_layers = t->n_layers;
    p->bufs = gf_calloc(2 * (size_t)t->n_layers, sizeof *p->bufs, err);
    p->k = gf_calloc((size_t)t->n_layers, sizeof *p->k, err);
    p->v = gf_calloc((size_t)t->n_layers, sizeof *p->v, err);
    p->layer_space = gf_calloc((size_t)t->n_layers, 1, err);
    if (!p->bufs || !p->k || !p->v || !p->layer_space) { kv_pool_free(p); return GF_NO_MEMORY; }
    int windowed = 0;
    for (int i = 0; i < t->n_layers; i++) {
        p->layer_space[i] = (uint8_t)kv_layer_space(t, i);
        windowed |= p->layer_space[i] == KV_WINDOW;
    }
    if (windowed && n_window_blocks <= 0) {
        kv_pool_free(p);
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV pool of a model with sliding layers needs window blocks");
    }
    if (blocks_init(&p->space[KV_FULL], n_blocks, err) ||
        blocks_init(&p->space[KV_WINDOW], windowed ? n_window_blocks : 0, err)) {
        kv_pool_free(p);
        return GF_NO_MEMORY;
    }
    int first = -1; /* the transient layers' store */
    for (int i = 0; i < t->n_layers; i++) {
        if (t->layers[i].kv_shared) continue;
        int shared = transient && kv_layer_transient(t, i);
        if (shared && first >= 0) {
            p->k[i] = p->k[first];
            p->v[i] = p->v[first];
            continue;
        }
        if (layer_stores(p, shared ? kv_transient_row(t) : kv_row_floats(&t->layers[i]), i, err)) {
            kv_pool_free(p);
            return err->status;
        }
        if (shared) first = i;
    }
    return GF_OK;
}

GfStatus kv_pool_init(KvPool *p, const TextConfig *t, const KnBackend *be, KnDtype dtype, int64_t block_len,
                      int64_t n_blocks, int64_t n_window_blocks, GfError *err) {
    return pool_init(p, t, be, dtype, block_len, n_blocks, n_window_blocks, 0, err);
}

void kv_pool_free(KvPool *p) {
    if (!p) return;
    for (int i = 0; p->bufs && i < 2 * p->n_layers; i++) p->be->ops->free(&p->be->ctx, &p->bufs[i]);
    free(p->bufs);
    free(p->k);
    free(p->v);
    free(p->layer_space);
    for (int s = 0; s < KV_SPACES; s++) free(p->space[s].free_ids);
    memset(p, 0, sizeof *p);
}

int64_t kv_pool_used(const KvPool *p, KvSpace s) { return p->space[s].n_blocks - p->space[s].n_free; }

/* Host validity and groups of positions [p0, p1) back to a text key's
 * (valid, no vision group): what the device mirrors hold outside a cache's
 * odd range. */
static void set_plain(KvCache *c, int64_t p0, int64_t p1) {
    if (p1 <= p0) return;
    memset(c->valid + p0, 1, (size_t)(p1 - p0));
    for (int64_t p = p0; p < p1; p++) c->group[p] = -1;
}

static int is_plain(const KvCache *c, int64_t p) { return c->valid[p] == 1 && c->group[p] < 0; }

/* Host validity and groups of positions [p0, p1) to the device. */
static void upload_positions(KvCache *c, int64_t p0, int64_t p1) {
    const KnBackend *be = c->pool->be;
    if (p1 <= p0) return;
    be->ops->upload(&be->ctx, c->d_valid + p0, c->valid + p0, (size_t)(p1 - p0) * sizeof *c->valid);
    be->ops->upload(&be->ctx, c->d_group + p0, c->group + p0, (size_t)(p1 - p0) * sizeof *c->group);
}

/* Device bytes of a cache's tables: every space's block table, then each
 * position's image group and validity. */
static size_t tables_bytes(int64_t max_blocks, int64_t capacity) {
    return (size_t)(KV_SPACES * max_blocks + capacity) * sizeof(int32_t) + (size_t)capacity;
}

/* Host tables and their device mirrors for capacity positions, the mirrors
 * starting with every position plain. */
static GfStatus cache_tables(KvCache *c, int64_t capacity, GfError *err) {
    const KnBackend *be = c->pool->be;
    c->capacity = capacity;
    c->max_blocks = (capacity + c->pool->block_len - 1) / c->pool->block_len;
    for (int s = 0; s < KV_SPACES; s++) c->table[s] = gf_calloc((size_t)c->max_blocks, sizeof *c->table[s], err);
    c->valid = gf_calloc((size_t)capacity, 1, err);
    c->group = gf_calloc((size_t)capacity, sizeof *c->group, err);
    if (!c->table[KV_FULL] || !c->table[KV_WINDOW] || !c->valid || !c->group) { kv_cache_free(c); return GF_NO_MEMORY; }
    size_t bytes = tables_bytes(c->max_blocks, capacity);
    if (be->ops->alloc(&be->ctx, &c->dev, bytes, KN_I32, "the KV cache's tables", err)) {
        kv_cache_free(c);
        return err->status;
    }
    c->d_table[KV_FULL] = c->dev.data;
    c->d_table[KV_WINDOW] = c->d_table[KV_FULL] + c->max_blocks;
    c->d_group = c->d_table[KV_WINDOW] + c->max_blocks;
    c->d_valid = (uint8_t *)(c->d_group + capacity);
    set_plain(c, 0, capacity);
    upload_positions(c, 0, capacity);
    return GF_OK;
}

/* The widest store of t: kv_heads * head_dim over the layers that store. */
static int64_t widest_store(const TextConfig *t) {
    int64_t most = 0;
    for (int i = 0; i < t->n_layers; i++)
        if (!t->layers[i].kv_shared && (int64_t)t->layers[i].kv_heads * t->layers[i].head_dim > most)
            most = (int64_t)t->layers[i].kv_heads * t->layers[i].head_dim;
    return most;
}

/* A cache with its own store of capacity positions (kv_cache_init, or
 * kv_cache_init_training with transient). */
static GfStatus own_init(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, KnDtype dtype,
                         int transient, GfError *err) {
    memset(c, 0, sizeof *c);
    if (capacity <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV cache needs room for a position");
    if (pool_init(&c->own, t, be, dtype, capacity, 1, 1, transient, err)) return err->status;
    c->pool = &c->own;
    if (cache_tables(c, capacity, err)) return err->status; /* freed */
    if (dtype != KN_BF16) return GF_OK;
    size_t n = (size_t)capacity * (size_t)widest_store(t);
    if (be->ops->alloc(&be->ctx, &c->wide, 2 * n * sizeof(float), KN_F32, "the KV cache's float32 view", err)) {
        kv_cache_free(c);
        return err->status;
    }
    c->wide_k = c->wide.data;
    c->wide_v = c->wide_k + n;
    return GF_OK;
}

GfStatus kv_cache_init(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, GfError *err) {
    return own_init(c, t, be, capacity, KN_F32, 0, err);
}

GfStatus kv_cache_init_training(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, KnDtype dtype,
                                GfError *err) {
    return own_init(c, t, be, capacity, dtype, 1, err);
}

uint64_t kv_cache_training_bytes(const TextConfig *t, int64_t capacity, KnDtype dtype) {
    uint64_t per = 2 * kv_transient_row(t);
    for (int i = 0; i < t->n_layers; i++)
        if (!t->layers[i].kv_shared && !kv_layer_transient(t, i)) per += 2 * kv_row_floats(&t->layers[i]);
    uint64_t bytes = (uint64_t)capacity * per * (uint64_t)kn_dtype_size(dtype);
    if (dtype == KN_BF16) bytes += 2 * (uint64_t)capacity * (uint64_t)widest_store(t) * sizeof(float);
    return bytes + tables_bytes(1, capacity); /* one block of capacity positions */
}

void kv_cache_own_f32(KvCache *c, int li, int64_t n, int64_t kvw, const float **k, const float **v) {
    const KvPool *p = &c->own;
    if (p->dtype != KN_BF16) {
        *k = p->k[li];
        *v = p->v[li];
        return;
    }
    const KnBackend *be = p->be;
    be->ops->widen_bf16(&be->ctx, c->wide_k, p->k[li], (size_t)(n * kvw));
    be->ops->widen_bf16(&be->ctx, c->wide_v, p->v[li], (size_t)(n * kvw));
    *k = c->wide_k;
    *v = c->wide_v;
}

GfStatus kv_cache_init_paged(KvCache *c, KvPool *pool, int64_t capacity, GfError *err) {
    memset(c, 0, sizeof *c);
    if (capacity <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV cache needs room for a position");
    c->pool = pool;
    return cache_tables(c, capacity, err);
}

static int space_used(const KvCache *c, KvSpace s) { return c->pool->space[s].n_blocks > 0; }

/* Gives every block back and forgets the positions. */
static void give_back(KvCache *c) {
    for (int s = 0; s < KV_SPACES; s++) {
        KvBlocks *b = &c->pool->space[s];
        while (c->n_table[s] > 0) {
            int32_t id = c->table[s][--c->n_table[s]];
            if (id >= 0) b->free_ids[b->n_free++] = id;
        }
        c->synced_table[s] = 0;
    }
    c->n_dropped = 0;
    c->n_past = 0;
    c->n_groups = 0;
}

void kv_cache_reset(KvCache *c) {
    int64_t filled = c->n_past > c->odd_hi ? c->n_past : c->odd_hi;
    give_back(c);
    set_plain(c, 0, filled);
    upload_positions(c, c->odd_lo, c->odd_hi);
    c->odd_lo = c->odd_hi = 0;
}

void kv_cache_free(KvCache *c) {
    if (!c) return;
    if (c->pool) {
        give_back(c); /* tables not allocated hold nothing (n_table 0) */
        c->pool->be->ops->free(&c->pool->be->ctx, &c->dev);
    }
    if (c->pool == &c->own) {
        c->own.be->ops->free(&c->own.be->ctx, &c->wide);
        kv_pool_free(&c->own);
    }
    for (int s = 0; s < KV_SPACES; s++) free(c->table[s]);
    free(c->valid);
    free(c->group);
    memset(c, 0, sizeof *c);
}

int64_t kv_cache_blocks_needed(const KvCache *c, int64_t n, KvSpace s) {
    if (!space_used(c, s)) return 0;
    int64_t need = (c->n_past + n + c->pool->block_len - 1) / c->pool->block_len;
    return need > c->n_table[s] ? need - c->n_table[s] : 0;
}

void kv_cache_grow(KvCache *c, int64_t n) {
    for (int s = 0; s < KV_SPACES; s++) {
        KvBlocks *b = &c->pool->space[s];
        for (int64_t k = kv_cache_blocks_needed(c, n, (KvSpace)s); k > 0; k--)
            c->table[s][c->n_table[s]++] = b->free_ids[--b->n_free];
    }
}

int64_t kv_cache_drop_window(KvCache *c) {
    if (!space_used(c, KV_WINDOW) || c->pool == &c->own) return 0;
    /* block k's last position is (k + 1) * len - 1; unseen when <= n_past - window */
    int64_t until = (c->n_past - c->pool->window + 1) / c->pool->block_len, given = 0;
    if (until > c->n_table[KV_WINDOW]) until = c->n_table[KV_WINDOW];
    KvBlocks *b = &c->pool->space[KV_WINDOW];
    for (; c->n_dropped < until; c->n_dropped++, given++) {
        b->free_ids[b->n_free++] = c->table[KV_WINDOW][c->n_dropped];
        c->table[KV_WINDOW][c->n_dropped] = -1;
    }
    return given;
}

void kv_cache_sync(KvCache *c, int64_t pos0, int64_t n) {
    const KnBackend *be = c->pool->be;
    for (int s = 0; s < KV_SPACES; s++)
        if (c->n_table[s] > c->synced_table[s]) {
            be->ops->upload(&be->ctx, c->d_table[s] + c->synced_table[s], c->table[s] + c->synced_table[s],
                            (size_t)(c->n_table[s] - c->synced_table[s]) * sizeof *c->table[s]);
            c->synced_table[s] = c->n_table[s];
        }
    int64_t lo = pos0, hi = pos0 + n;
    while (lo < hi && is_plain(c, lo)) lo++;
    while (hi > lo && is_plain(c, hi - 1)) hi--;
    if (lo == hi) return; /* the device already holds plain positions there */
    upload_positions(c, lo, hi);
    if (c->odd_hi == c->odd_lo) c->odd_lo = lo;
    c->odd_hi = hi;
}
