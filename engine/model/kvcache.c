/* kvcache.c - block pool and per-sequence tables of the paged KV cache. */
#include "kvcache.h"

#include <stdlib.h>
#include <string.h>

static uint64_t kv_row_floats(const LayerConfig *l) { return (uint64_t)l->kv_heads * (uint64_t)l->head_dim; }

uint64_t kv_block_bytes(const TextConfig *t, int64_t block_len) {
    uint64_t floats = 0;
    for (int i = 0; i < t->n_layers; i++)
        if (!t->layers[i].kv_shared) floats += 2 * kv_row_floats(&t->layers[i]);
    return floats * (uint64_t)block_len * sizeof(float);
}

GfStatus kv_pool_init(KvPool *p, const TextConfig *t, const KnBackend *be, int64_t block_len, int64_t n_blocks,
                      GfError *err) {
    memset(p, 0, sizeof *p);
    if (block_len <= 0 || n_blocks <= 0 || n_blocks > INT32_MAX)
        return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV pool needs blocks of at least one position");
    p->be = be;
    p->block_len = block_len;
    p->n_blocks = n_blocks;
    p->n_layers = t->n_layers;
    p->bufs = gf_calloc(2 * (size_t)t->n_layers, sizeof *p->bufs, err);
    p->k = gf_calloc((size_t)t->n_layers, sizeof *p->k, err);
    p->v = gf_calloc((size_t)t->n_layers, sizeof *p->v, err);
    p->free_ids = gf_malloc((size_t)n_blocks * sizeof *p->free_ids, err);
    if (!p->bufs || !p->k || !p->v || !p->free_ids) { kv_pool_free(p); return GF_NO_MEMORY; }
    for (int i = 0; i < t->n_layers; i++) {
        if (t->layers[i].kv_shared) continue;
        size_t bytes = (size_t)(n_blocks * block_len) * kv_row_floats(&t->layers[i]) * sizeof(float);
        if (be->ops->alloc(&be->ctx, &p->bufs[2 * i], bytes, KN_F32, "the KV cache", err) ||
            be->ops->alloc(&be->ctx, &p->bufs[2 * i + 1], bytes, KN_F32, "the KV cache", err)) {
            kv_pool_free(p);
            return err->status;
        }
        p->k[i] = p->bufs[2 * i].data;
        p->v[i] = p->bufs[2 * i + 1].data;
    }
    for (int64_t b = 0; b < n_blocks; b++) p->free_ids[b] = (int32_t)(n_blocks - 1 - b);
    p->n_free = n_blocks;
    return GF_OK;
}

void kv_pool_free(KvPool *p) {
    if (!p) return;
    for (int i = 0; p->bufs && i < 2 * p->n_layers; i++) p->be->ops->free(&p->be->ctx, &p->bufs[i]);
    free(p->bufs);
    free(p->k);
    free(p->v);
    free(p->free_ids);
    memset(p, 0, sizeof *p);
}

/* Host tables and their device mirrors for capacity positions. */
static GfStatus cache_tables(KvCache *c, int64_t capacity, GfError *err) {
    const KnBackend *be = c->pool->be;
    c->capacity = capacity;
    c->max_blocks = (capacity + c->pool->block_len - 1) / c->pool->block_len;
    c->table = gf_calloc((size_t)c->max_blocks, sizeof *c->table, err);
    c->valid = gf_calloc((size_t)capacity, 1, err);
    c->group = gf_calloc((size_t)capacity, sizeof *c->group, err);
    if (!c->table || !c->valid || !c->group) { kv_cache_free(c); return GF_NO_MEMORY; }
    size_t bytes = (size_t)(c->max_blocks + capacity) * sizeof(int32_t) + (size_t)capacity;
    if (be->ops->alloc(&be->ctx, &c->dev, bytes, KN_I32, "the KV cache's tables", err)) {
        kv_cache_free(c);
        return err->status;
    }
    c->d_table = c->dev.data;
    c->d_group = c->d_table + c->max_blocks;
    c->d_valid = (uint8_t *)(c->d_group + capacity);
    return GF_OK;
}

GfStatus kv_cache_init(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, GfError *err) {
    memset(c, 0, sizeof *c);
    if (capacity <= 0) return gf_error_set(err, GF_INVALID, "invalid_request", NULL, "a KV cache needs room for a position");
    if (kv_pool_init(&c->own, t, be, capacity, 1, err)) return err->status;
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
    c->synced_table = 0;
}

void kv_cache_free(KvCache *c) {
    if (!c) return;
    if (c->pool) {
        kv_cache_reset(c);
        c->pool->be->ops->free(&c->pool->be->ctx, &c->dev);
    }
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

void kv_cache_grow(KvCache *c, int64_t n) {
    for (int64_t k = kv_cache_blocks_needed(c, n); k > 0; k--) c->table[c->n_table++] = c->pool->free_ids[--c->pool->n_free];
}

void kv_cache_sync(KvCache *c, int64_t pos0, int64_t n) {
    const KnBackend *be = c->pool->be;
    if (c->n_table > c->synced_table) {
        be->ops->upload(&be->ctx, c->d_table + c->synced_table, c->table + c->synced_table,
                        (size_t)(c->n_table - c->synced_table) * sizeof *c->table);
        c->synced_table = c->n_table;
    }
    be->ops->upload(&be->ctx, c->d_valid + pos0, c->valid + pos0, (size_t)n);
    be->ops->upload(&be->ctx, c->d_group + pos0, c->group + pos0, (size_t)n * sizeof *c->group);
}
