/* serve.h - the serving engine: one thread owns the model, the paged KV
 * pool and the resident adapters; requests reach it through a bounded queue
 * and get their tokens back through a per-request callback.
 *
 * Continuous batching: at every step boundary the engine admits queued
 * requests (their images through the vision tower with their own adapter,
 * their prompts prefilled) beside the running sequences' decoding rows, runs
 * them all in one model_forward_batch ordered by adapter (each adapter's
 * LoRA term computed once over its rows), samples each sequence's next token
 * with its own parameters and random state, and lets finished or cancelled
 * sequences go at once, their KV blocks back in the pool.
 *
 * KV memory: a request is admitted when the pool can hold its prompt beside
 * the running sequences' next step; sequences then take blocks as they
 * decode. When a step would need more blocks than are free, the sequence
 * admitted last is preempted: its blocks go back, and once there is room
 * again (before any queued request) it recomputes its KV from its prompt
 * and the tokens it has sent, keeping its sampler state, so it goes on with
 * exactly the tokens it would have produced (the kernels compute a row the
 * same whatever the batch or the step it is in). Sliding-window layers keep
 * their KV in a second block space (kvcache.h) where a sequence holds only
 * the blocks its window still sees.
 *
 * Adapters: read and validated from their directory by serve_submit, on
 * the submitting thread, when not resident (lora_load_dir: keys, shapes and
 * a no-op adapter refused; its vision part hashed for the vision cache), so
 * the engine thread never waits on a disk, a parse or a hash; a resident one is pinned by the queued request until it runs.
 * Kept resident up to max_adapters, the least recently used idle one
 * dropped beyond that; serve_adapter_put hands
 * over an adapter already in memory (a job that just succeeded), and
 * serve_adapter_drop forgets one (deleted): requests already running keep
 * it until they end.
 *
 * Images: the vision tower's output is kept per (image digest, the
 * adapter's vision weights) in a byte-bounded LRU (vision_cache.h), so a
 * repeated image skips the tower, and a replaced adapter never sees the
 * old one's features.
 *
 * Threading: serve_* may be called from any thread. Sinks run on the engine
 * thread and must not block. The Model belongs to the engine from
 * serve_start to serve_stop (serve_submit reads only its weights' names and
 * shapes, which never change).
 */
#ifndef GF_SERVE_H
#define GF_SERVE_H

#include <stdint.h>

#include "base.h"
#include "devsched.h"
#include "lora.h"
#include "model.h"
#include "pipeline.h"
#include "sample.h"

typedef struct ServeEngine ServeEngine;
typedef struct ServeReq ServeReq;

typedef struct {
    int max_seqs;             /* sequences in the running batch */
    int max_queue;            /* requests waiting for a slot; serve_submit refuses past it */
    int64_t max_batch_tokens; /* prompt tokens prefilled in one step (at least one prompt) */
    int64_t kv_block_len;     /* positions per KV block */
    KnDtype kv_dtype;         /* what the KV pool holds: KN_F32, or KN_BF16 (half the bytes a block; keys and
                                 values rounded as they are stored, attention in fp32 on them widened) */
    int64_t kv_blocks;        /* blocks in the pool (full-attention layers) */
    int64_t kv_window_blocks; /* blocks of the sliding-window layers; 0 = serve_window_blocks' default */
    int64_t max_context;      /* positions one sequence may reach (prompt + max_tokens) */
    int max_adapters;         /* resident adapters kept when idle */
    int max_lora_rank;
    uint64_t vision_cache_bytes; /* the vision tower's outputs kept for repeated images (vision_cache.h); 0 = none */
    DevSched *sched;          /* the device shared with a training job (borrowed; each step holds it), or NULL */
} ServeConfig;

/* Defaults: 16 sequences, a queue of 64, blocks of 16 positions, a bf16
 * KV pool in the bf16 precision (where every head fits it, kv_dtype_check)
 * and fp32 otherwise, enough blocks for every slot to reach 8192 positions
 * (capped at 64 MiB of KV per slot in the full-attention layers), 8
 * adapters, 128 MiB of cached vision features. */
void serve_config_default(ServeConfig *c, const Model *m);
/* c->kv_dtype = dtype, and the default blocks and context again for it
 * (as serve_config_default sets them). GF_INVALID when the model's heads
 * cannot take it (kv_dtype_check). */
GfStatus serve_config_kv_dtype(ServeConfig *c, const Model *m, KnDtype dtype, GfError *err);

/* The window blocks serving uses: c->kv_window_blocks when set, else room
 * for every slot's window (plus a block on each side) and one prompt of
 * max_context prefilled at once, at most kv_blocks. */
int64_t serve_window_blocks(const ServeConfig *c, const Model *m);

/* One image, preprocessed by the caller (preprocess_image), pixels in [0, 1]. */
typedef struct {
    float *pixels;            /* [n_patches, 3 p^2] */
    int32_t *positions;       /* [n_patches, 2] */
    int64_t n_patches, n_soft;
    uint8_t digest[32];       /* SHA-256 of the image's bytes: the vision cache's key (with has_digest) */
    int has_digest;           /* 0: never cached */
} ServeImage;

typedef enum { SERVE_TOKEN = 0, SERVE_END } ServeEventKind;

typedef struct {
    ServeEventKind kind;
    int32_t token;            /* SERVE_TOKEN */
    FinishReason finish;      /* SERVE_END without error: stop (eos or the sink), length, cancelled */
    const GfError *error;     /* SERVE_END: non-NULL when the request failed */
    int64_t prompt_tokens, completion_tokens;
} ServeEvent;

/* Receives a request's events in order, ending with exactly one SERVE_END.
 * Returning nonzero on a token ends the request with FINISH_STOP (a stop
 * sequence matched). Runs on the engine thread; must not block. */
typedef int (*ServeSink)(void *cls, const ServeEvent *ev);

typedef struct {
    int32_t *ids;             /* [n] prompt ids (taken over) */
    uint8_t *mm_type;         /* [n] 1 on image placeholders (taken over) */
    int64_t n;
    ServeImage *images;       /* [n_images] in prompt order (taken over, with their arrays) */
    int n_images;
    char adapter[260];        /* "" = the base model */
    char adapter_dir[4096];   /* where to load the adapter from when it is not resident */
    int64_t max_tokens;
    SampleParams sample;
    uint64_t seed;
    ServeSink sink;
    void *sink_cls;
} ServeSubmit;

/* Frees what a ServeSubmit owns (a request that is not submitted after all). */
void serve_submit_free(ServeSubmit *s);

GfStatus serve_start(Model *m, const ServeConfig *cfg, ServeEngine **out, GfError *err);
/* Ends every request (SERVE_END, error shutting_down) and joins the thread;
 * later submits are refused with shutting_down. */
void serve_stop(ServeEngine *e);
/* Stops (if needed) and frees the engine; no other call may be running. */
void serve_free(ServeEngine *e);

/* Queues a request; s's arrays are taken over whatever the result. GF_BUSY
 * (queue_full) when the queue is full, GF_INVALID
 * (context_length_exceeded, both counts named) when prompt + max_tokens can
 * never fit, the adapter's error (lora_load_dir) when it is not resident
 * and cannot be loaded. On success *out is a handle for serve_cancel, valid until
 * serve_release. */
GfStatus serve_submit(ServeEngine *e, ServeSubmit *s, ServeReq **out, GfError *err);
/* Ends the request at the next step boundary (FINISH_CANCELLED). */
void serve_cancel(ServeReq *r);
void serve_release(ServeReq *r);

/* Hands over an adapter already in memory under name (replacing a resident
 * one of that name once idle). params, when not NULL and not zeroed, holds
 * a's parameters in device memory of the engine's device (a trainer's slab
 * on the served base: train_run): the engine binds them as they are,
 * without a copy. Both are taken. */
void serve_adapter_put(ServeEngine *e, const char *name, LoraAdapter *a, KnBuffer *params);
/* Frees device memory of the engine's device that was meant for it (a
 * buffer belongs to its device: any context there may free it). NULL or
 * zeroed: nothing. Any thread. */
void serve_params_free(ServeEngine *e, KnBuffer *params);
/* Forgets a resident adapter (running requests keep it until they end). */
void serve_adapter_drop(ServeEngine *e, const char *name);

#define SERVE_HIST_BUCKETS 12

typedef struct {
    int queued, running, resident_adapters;
    int64_t kv_blocks_used, kv_blocks_total;          /* full-attention layers' space */
    int64_t kv_window_blocks_used, kv_window_blocks_total; /* sliding-window layers' space */
    KnDtype kv_dtype;         /* what the KV pool holds (ServeConfig.kv_dtype) */
    uint64_t kv_bytes;        /* the pool's stores, both spaces, on the device */
    int paused;               /* preempted sequences waiting to resume */
    uint64_t preemptions;
    uint64_t requests, completed, failed, cancelled;
    uint64_t prompt_tokens, generated_tokens;
    uint64_t adapter_loads, adapter_evictions;
    uint64_t adapters_adopted;          /* a job's adapter bound from its device slab, without a copy */
    uint64_t adapter_uploads_staged;    /* adapters uploaded off the engine thread (by the submitting thread) */
    uint64_t adapter_uploads_engine;    /* adapters the engine thread had to upload itself (staging failed) */
    uint64_t vision_cache_hits, vision_cache_misses, vision_cache_bytes; /* images with a digest */
    int vision_cache_entries;
    uint64_t graph_recorded, graph_replayed, graph_resubmitted; /* decode steps through graphs (model.h) */
    uint64_t graph_padded;    /* decode steps padded to a bucket of rows for a graph (model.h) */
    double tokens_per_s;      /* generated tokens per second over the last second of work; 0 when idle */
    /* histograms: counts of observations <= SERVE_HIST_BOUNDS[i] seconds, then +Inf */
    uint64_t ttft[SERVE_HIST_BUCKETS + 1], tpot[SERVE_HIST_BUCKETS + 1];
    double ttft_sum, tpot_sum;
} ServeStats;

extern const double SERVE_HIST_BOUNDS[SERVE_HIST_BUCKETS];

void serve_stats(ServeEngine *e, ServeStats *out);
/* 1 once a step met a device fault (GF_DEVICE): every request then running,
 * paused or queued ended with it, and new ones are refused (503
 * device_failed) until the process restarts; the fault's message into why. */
int serve_failed(ServeEngine *e, char *why, size_t cap);

#endif
