/* kvcache.h - the paged KV cache of the text decoder (vLLM's
 * PagedAttention): keys and values live in a pool of fixed-size blocks on
 * the backend's device; each sequence holds a table of the blocks it fills,
 * takes one more every block_len positions, and gives them all back when it
 * is freed or reset, so memory follows the real lengths of the sequences
 * rather than their limits. Sliding-window layers keep their keys in a
 * space of their own, where a sequence holds only the blocks its window
 * can still see.
 *
 * A pool's stores hold float32 or bfloat16 (serving's default in the bf16
 * precision: half the bytes a position, each key and value rounded once as
 * it is stored and widened exactly as attention reads it).
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

/* The two block spaces. A layer's keys stay in the full space unless every
 * layer reading its store is a sliding-window layer: then they live in the
 * window space, whose blocks a sequence gives back once every future query
 * is past their window (kv_cache_drop_window), so a long sequence holds
 * only its window there. */
typedef enum { KV_FULL = 0, KV_WINDOW = 1 } KvSpace;
#define KV_SPACES 2

typedef struct {
    int64_t n_blocks;
    int32_t *free_ids;        /* stack of free block ids (host) */
    int64_t n_free;
} KvBlocks;

typedef struct {
    const KnBackend *be;      /* the device the stores live on (borrowed) */
    KnDtype dtype;            /* what the stores hold: KN_F32, or KN_BF16 (half the bytes; rounded as stored) */
    int64_t block_len;        /* positions per block */
    int64_t window;           /* positions a window layer sees back (sliding_window) */
    KvBlocks space[KV_SPACES];
    uint8_t *layer_space;     /* [n_layers] the space of the store each layer reads (KvSpace) */
    KnBuffer *bufs;           /* [2 * n_layers]: k then v of each layer (empty for KV-shared layers) */
    void **k, **v;            /* per layer [space blocks * block_len][kv_heads][head_dim] of dtype, device; NULL for
                                 KV-shared layers */
    int n_layers;
} KvPool;

/* The space layer li's keys and values live in (its store layer's). */
KvSpace kv_layer_space(const TextConfig *t, int li);
/* Bytes one block of block_len positions takes over the layers of space s,
 * its stores holding dtype. */
uint64_t kv_block_bytes(const TextConfig *t, int64_t block_len, KvSpace s, KnDtype dtype);
/* GF_INVALID (param "kv_cache") unless the stores of t may hold dtype:
 * KN_F32, or KN_BF16 for heads of up to KN_KV_BF16_MAX_DIM (ops.h). */
GfStatus kv_dtype_check(const TextConfig *t, KnDtype dtype, GfError *err);
/* A pool of n_blocks blocks in the full space and n_window_blocks in the
 * window space (ignored, and none allocated, when no layer uses it), its
 * stores holding dtype (kv_dtype_check). A sequence's own pool
 * (kv_cache_init) holds KN_F32: the training forward's attention reads it. */
GfStatus kv_pool_init(KvPool *p, const TextConfig *t, const KnBackend *be, KnDtype dtype, int64_t block_len,
                      int64_t n_blocks, int64_t n_window_blocks, GfError *err);
void kv_pool_free(KvPool *p);
/* Blocks of space s in use. */
int64_t kv_pool_used(const KvPool *p, KvSpace s);

typedef struct {
    KvPool *pool;             /* the blocks' owner: &own, or a shared pool (kv_cache_init_paged) */
    KvPool own;               /* kv_cache_init: one private block of `capacity` positions per space */
    int32_t *table[KV_SPACES]; /* [max_blocks] block ids by position / block_len, the first n_table held (host);
                                  window entries below n_dropped are given back (-1) */
    int64_t n_table[KV_SPACES], max_blocks;
    int64_t n_dropped;        /* window blocks given back, from the first */
    int64_t capacity;         /* positions this sequence may reach */
    int64_t n_past;           /* positions filled */
    uint8_t *valid;           /* [capacity] key is real (not padding) (host) */
    int32_t *group;           /* [capacity] vision block id or -1 (host) */
    int32_t n_groups;
    KnBuffer dev;             /* device mirrors, cut into: */
    int32_t *d_table[KV_SPACES]; /* [max_blocks] each */
    int32_t *d_group;         /*   [capacity] */
    uint8_t *d_valid;         /*   [capacity] */
    int64_t synced_table[KV_SPACES]; /* table entries already on the device */
    int64_t odd_lo, odd_hi;   /* the device's validity and groups are a text key's (valid, group -1) outside
                                 positions [odd_lo, odd_hi), the host's inside */
    KnBuffer wide;            /* an own bf16 store's float32 view, cut into: */
    float *wide_k, *wide_v;   /*   [capacity][widest kv_heads * head_dim] each (kv_cache_own_f32) */
} KvCache;

/* 1 when a later layer reads layer li's keys and values (KV sharing). */
int kv_layer_read_later(const TextConfig *t, int li);
/* 1 when layer li stores keys and values that no later layer reads: in a
 * training cache they go to the store such layers share, and the training
 * backward gives their gradients one shared pair of buffers. */
int kv_layer_transient(const TextConfig *t, int li);
/* The widest row (kv_heads * head_dim) of those layers; 0 without any. */
uint64_t kv_transient_row(const TextConfig *t);

/* A cache with its own contiguous store for up to capacity positions:
 * c->own.k[l] / c->own.v[l] hold positions 0.. of layer l in order, as
 * float32 (kv_cache_init).
 * kv_cache_init_training: the training forward's and its replays', of dtype
 * (KN_BF16 halves the store; each key and value rounded once as it is
 * stored, and kv_cache_own_f32 widens a layer's for attention into one
 * float32 pair of the widest layer's size, which the cache also holds).
 * Only the layers a later layer reads (kv_layer_read_later) keep stores of
 * their own; the others share one, where a layer's keys and values stay
 * until the next of them stores: its attention reads them right after, and
 * the backward's replay of the layer stores them again. */
GfStatus kv_cache_init(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, GfError *err);
GfStatus kv_cache_init_training(KvCache *c, const TextConfig *t, const KnBackend *be, int64_t capacity, KnDtype dtype,
                                GfError *err);
/* Device bytes of the stores, the float32 view and the tables that
 * kv_cache_init_training allocates for capacity positions of dtype. */
uint64_t kv_cache_training_bytes(const TextConfig *t, int64_t capacity, KnDtype dtype);
/* Positions 0 .. n - 1 of store layer li (rows of kvw = kv_heads *
 * head_dim floats) of a cache with its own store, as float32 for attention:
 * the store itself, or a bf16 store widened into c->wide_k and c->wide_v
 * (enqueued on the backend; valid until the next call). */
void kv_cache_own_f32(KvCache *c, int li, int64_t n, int64_t kvw, const float **k, const float **v);
/* A cache for up to capacity positions whose blocks come from pool as they
 * fill (model_forward fails with GF_TOO_LARGE, code kv_cache_full, when the
 * pool has none left, before changing anything). */
GfStatus kv_cache_init_paged(KvCache *c, KvPool *pool, int64_t capacity, GfError *err);
/* Gives the blocks back and frees the tables. */
void kv_cache_free(KvCache *c);
/* Forgets every position (a paged cache gives its blocks back). */
void kv_cache_reset(KvCache *c);
/* Blocks of space s a paged cache still needs to take to hold n more positions. */
int64_t kv_cache_blocks_needed(const KvCache *c, int64_t n, KvSpace s);
/* Takes the blocks to hold n more positions (room checked by the caller). */
void kv_cache_grow(KvCache *c, int64_t n);
/* Gives back the window blocks no later query can see: those whose last
 * position is at least `window` before n_past (queries come at n_past or
 * later, and a window layer's query at q sees keys after q - window only).
 * Only for a cache whose next forward starts at n_past (serving); training
 * replays earlier positions and must not call it. Returns the blocks given. */
int64_t kv_cache_drop_window(KvCache *c);
/* Uploads the host tables' new entries: block ids taken since the last
 * sync, and validity and groups of positions [pos0, pos0 + n) (pos0 =
 * n_past). The device mirrors start, and are put back by kv_cache_reset,
 * with every position a text key's, so a step of plain text tokens (every
 * decode step) uploads no validity or groups at all. */
void kv_cache_sync(KvCache *c, int64_t pos0, int64_t n);

#endif
