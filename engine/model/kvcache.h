/* kvcache.h - the paged KV cache of the text decoder (vLLM's
 * PagedAttention): keys and values live in a pool of fixed-size blocks on
 * the backend's device; each sequence holds a table of the blocks it fills,
 * takes one more every block_len positions, and gives them all back when it
 * is freed or reset, so memory follows the real lengths of the sequences
 * rather than their limits.
 *
 * Host and device: the stores (k, v) and each cache's mirrors of its block
 * table, key validity and vision groups are device memory, read by the
 * attention and KV-store ops; the host keeps the small index tables (block
 * ids, validity, groups) and uploads what a step changed (kv_cache_sync).
 *
 * Ownership: a KvPool owns its stores; a KvCache owns its tables and holds
 * blocks of one pool (its own private pool for kv_cache_init). Both are used
 * by the thread that owns their backend. Errors: GF_INVALID for bad sizes,
 * GF_NO_MEMORY / GF_DEVICE naming what could not be allocated.
 */
#ifndef GF_KVCACHE_H
#define GF_KVCACHE_H

#include <stdint.h>

#include "config.h"
#include "kernels.h"

typedef struct {
    const KnBackend *be;      /* the device the stores live on (borrowed) */
    int64_t block_len;        /* positions per block */
    int64_t n_blocks;
    KnBuffer *bufs;           /* [2 * n_layers]: k then v of each layer (empty for KV-shared layers) */
    float **k, **v;           /* per layer [n_blocks * block_len][kv_heads][head_dim] device; NULL for KV-shared layers */
    int32_t *free_ids;        /* stack of free block ids (host) */
    int64_t n_free;
    int n_layers;
} KvPool;

/* Bytes one block of block_len positions takes over all layers. */
uint64_t kv_block_bytes(const TextConfig *t, int64_t block_len);
GfStatus kv_pool_init(KvPool *p, const TextConfig *t, const KnBackend *be, int64_t block_len, int64_t n_blocks,
                      GfError *err);
void kv_pool_free(KvPool *p);

typedef struct {
    KvPool *pool;             /* the blocks' owner: &own, or a shared pool (kv_cache_init_paged) */
    KvPool own;               /* kv_cache_init: one private block of `capacity` positions */
    int32_t *table;           /* [max_blocks] block ids, the first n_table held (host) */
    int64_t n_table, max_blocks;
    int64_t capacity;         /* positions this sequence may reach */
    int64_t n_past;           /* positions filled */
    uint8_t *valid;           /* [capacity] key is real (not padding) (host) */
    int32_t *group;           /* [capacity] vision block id or -1 (host) */
    int32_t n_groups;
    KnBuffer dev;             /* device mirrors, cut into: */
    int32_t *d_table;         /*   [max_blocks] */
    int32_t *d_group;         /*   [capacity] */
    uint8_t *d_valid;         /*   [capacity] */
    int64_t synced_table;     /* table entries already on the device */
} KvCache;

/* A cache with its own contiguous store for up to capacity positions:
 * c->own.k[l] / c->own.v[l] hold positions 0.. of layer l in order. */
GfStatus kv_cache_init(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, GfError *err);
/* A cache for up to capacity positions whose blocks come from pool as they
 * fill (model_forward fails with GF_TOO_LARGE, code kv_cache_full, when the
 * pool has none left, before changing anything). */
GfStatus kv_cache_init_paged(KvCache *c, KvPool *pool, int64_t capacity, GfError *err);
/* Gives the blocks back and frees the tables. */
void kv_cache_free(KvCache *c);
/* Forgets every position (a paged cache gives its blocks back). */
void kv_cache_reset(KvCache *c);
/* Blocks a paged cache still needs to take to hold n more positions. */
int64_t kv_cache_blocks_needed(const KvCache *c, int64_t n);
/* Takes the blocks to hold n more positions (room checked by the caller). */
void kv_cache_grow(KvCache *c, int64_t n);
/* Uploads the host tables' new entries: block ids taken since the last
 * sync, and validity and groups of positions [pos0, pos0 + n). */
void kv_cache_sync(KvCache *c, int64_t pos0, int64_t n);

#endif
