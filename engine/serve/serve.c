/* serve.c - the engine thread: admission, continuous batching, sampling,
 * adapter residency. */
#include "serve.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vision_cache.h"

#define MAX_CONTROL 64

const double SERVE_HIST_BOUNDS[SERVE_HIST_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                      0.5,   1.0,  2.5,   5.0,  10.0, 30.0};

/* A resident adapter, bound to the engine's model. The list of residents
 * changes on the engine thread under the engine's mutex; submitting threads
 * look names up and pin entries under it. */
typedef struct {
    char name[260];
    LoraAdapter *a;
    LoraBinding b;
    int refs;                 /* running sequences using it (engine thread) */
    int pins;                 /* under mu: queued requests that will use it */
    uint64_t last_used;       /* step counter */
    int dropped;              /* forgotten: freed when refs and pins reach 0 */
    uint8_t vision_digest[VISION_DIGEST_LEN]; /* its vision part (vision_cache.h); zero: the base's features */
} Resident;

struct ServeReq {
    ServeSubmit s;
    atomic_int refs;          /* engine + caller */
    atomic_int cancelled;
    ServeReq *next;           /* queue link */
    /* the adapter, settled at submit: a pinned resident, or one loaded then */
    Resident *pinned;
    LoraAdapter *loaded;
    KnBuffer loaded_params;   /* its parameters, uploaded on the submitting thread (stage_params) */
    uint8_t loaded_digest[VISION_DIGEST_LEN]; /* the loaded one's vision part, hashed here, not on the engine thread */
    /* engine thread only, once admitted */
    Resident *ad;
    float *soft;              /* [sum n_soft, H] device memory (soft_buf) */
    KnBuffer soft_buf;
    KvCache cache;
    int32_t *ids;             /* [n + max_tokens] the prompt, then each generated token: a preempted
                                 sequence recomputes its KV from them */
    uint8_t *mm_type;         /* [n + max_tokens] the prompt's, then zeros */
    uint64_t admitted;        /* admission order: the latest admitted is preempted first */
    int64_t n_gen;
    int32_t next_id;
    uint64_t rng;
    double t_submit, t_first, t_last;
};

typedef struct {
    char name[260];
    LoraAdapter *a;           /* put: the adapter; drop: NULL */
    KnBuffer params;          /* put: a's parameters already on the device (bound without a copy), or zeroed */
    int handover;             /* put: params are a job's trained slab (not staged here) */
    uint8_t vision_digest[VISION_DIGEST_LEN]; /* put: a's vision part, hashed by the caller */
} Control;

struct ServeEngine {
    Model *m;
    ServeConfig cfg;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* under mu */
    ServeReq *head, *tail;
    int n_queued;
    int stopping;
    Control control[MAX_CONTROL];
    int n_control;
    ServeStats stats;
    /* engine thread */
    KvPool pool;
    ServeReq **active;        /* [max_seqs] */
    int n_active;
    ServeReq **paused;        /* [max_seqs] preempted, by admission order: resumed before the queue moves */
    int n_paused;
    uint64_t n_admitted;
    Resident **res;           /* [n_res_cap], each owned (requests point at them) */
    VisionCache *vcache;
    int n_res, n_res_cap;
    uint64_t step;
    KnSampleRow *rows;        /* [max_seqs] each running sequence's sampling parameters and state */
    int32_t *next;            /* [max_seqs] the tokens the step sampled */
    ModelSeq *batch;          /* [max_seqs] */
    double rate_t0;           /* start of the tokens/s window */
    uint64_t rate_tokens;     /* generated in this step */
    uint64_t window_tokens;   /* generated in this window */
    double last_token_t;      /* under mu: when a token was last generated */
    char failed[GF_ERR_MSG_MAX]; /* under mu: the device fault that ended serving ("" = none) */
    /* adapters' uploads, off the engine thread: a context of the engine's
     * device sharing its memory (its own stream on a GPU), one upload at a time */
    KnBackend up;
    pthread_mutex_t up_mu;
};

/* ---- configuration ------------------------------------------------------------ */

/* The default blocks and context for c's KV dtype: every slot reaching
 * 8192 positions, at most 64 MiB of KV each in the full-attention layers. */
static void default_blocks(ServeConfig *c, const Model *m) {
    int64_t ctx = 8192;
    uint64_t per_block = kv_block_bytes(&model_config(m)->text, c->kv_block_len, KV_FULL, c->kv_dtype), cap = 64ull << 20;
    int64_t per_slot = (ctx + c->kv_block_len - 1) / c->kv_block_len;
    if (per_block && (uint64_t)per_slot * per_block > cap) per_slot = (int64_t)(cap / per_block);
    c->kv_blocks = per_slot * c->max_seqs;
    c->max_context = per_slot * c->kv_block_len;
}

void serve_config_default(ServeConfig *c, const Model *m) {
    memset(c, 0, sizeof *c);
    c->max_seqs = 16;
    c->max_queue = 64;
    c->max_batch_tokens = 4096;
    c->kv_block_len = 16;
    int bf16 = model_backend(m)->ctx.precision == KN_PRECISION_BF16;
    c->kv_dtype = bf16 && !kv_dtype_check(&model_config(m)->text, KN_BF16, NULL) ? KN_BF16 : KN_F32;
    default_blocks(c, m);
    c->max_adapters = 8;
    c->max_lora_rank = LORA_MAX_RANK;
    c->vision_cache_bytes = 128ull << 20;
}

GfStatus serve_config_kv_dtype(ServeConfig *c, const Model *m, KnDtype dtype, GfError *err) {
    if (kv_dtype_check(&model_config(m)->text, dtype, err)) return err->status;
    c->kv_dtype = dtype;
    default_blocks(c, m);
    return GF_OK;
}

static int64_t blocks_for(const ServeEngine *e, int64_t positions) {
    return (positions + e->cfg.kv_block_len - 1) / e->cfg.kv_block_len;
}

int64_t serve_window_blocks(const ServeConfig *c, const Model *m) {
    if (c->kv_window_blocks > 0) return c->kv_window_blocks;
    int64_t len = c->kv_block_len, window = model_config(m)->text.sliding_window;
    int64_t steady = (window + len - 1) / len + 2, prefill = (c->max_context + len - 1) / len;
    int64_t n = (int64_t)c->max_seqs * steady + prefill;
    return n < c->kv_blocks ? n : c->kv_blocks;
}

/* ---- requests ------------------------------------------------------------------- */

void serve_submit_free(ServeSubmit *s) {
    free(s->ids);
    free(s->mm_type);
    for (int i = 0; i < s->n_images; i++) {
        free(s->images[i].pixels);
        free(s->images[i].positions);
    }
    free(s->images);
    s->ids = NULL;
    s->mm_type = NULL;
    s->images = NULL;
    s->n_images = 0;
}

void serve_release(ServeReq *r) {
    if (!r || atomic_fetch_sub(&r->refs, 1) != 1) return;
    serve_submit_free(&r->s);
    free(r); /* its cache and soft tokens went in finish(), on the engine thread */
}

void serve_cancel(ServeReq *r) {
    if (r) atomic_store(&r->cancelled, 1); /* the engine lets it go at its next step, queued or running */
}

/* Under mu: why a request cannot be queued now, or GF_OK. */
static GfStatus refused(ServeEngine *e, GfError *err) {
    if (e->stopping) return gf_error_set(err, GF_NOT_READY, "shutting_down", NULL, "the server is shutting down");
    if (e->failed[0])
        return gf_error_set(err, GF_NOT_READY, "device_failed", NULL, "the device failed (%.300s); restart the server",
                            e->failed);
    if (e->n_queued >= e->cfg.max_queue)
        return gf_error_set(err, GF_BUSY, "queue_full", NULL, "%d requests are already waiting for a slot; retry later",
                            e->cfg.max_queue);
    return GF_OK;
}

static Resident *find_resident(ServeEngine *e, const char *name);

/* a's parameters in a new slab of the engine's device, uploaded and landed
 * on the calling thread (any but the engine's), for add_resident to bind
 * as they are: the engine thread never waits on an adapter's upload. */
static GfStatus stage_params(ServeEngine *e, const LoraAdapter *a, KnBuffer *out, GfError *err) {
    memset(out, 0, sizeof *out);
    size_t bytes = (a->n_params ? a->n_params : 1) * sizeof(float);
    pthread_mutex_lock(&e->up_mu);
    GfStatus st = e->up.ops->alloc(&e->up.ctx, out, bytes, KN_F32, "an adapter's parameters", err);
    if (!st) {
        e->up.ops->upload(&e->up.ctx, out->data, a->params, a->n_params * sizeof(float));
        if ((st = e->up.ops->synchronize(&e->up.ctx, err))) e->up.ops->free(&e->up.ctx, out);
    }
    pthread_mutex_unlock(&e->up_mu);
    return st;
}

/* On the submitting thread: the request's adapter pinned where resident,
 * else read and validated from its directory here (lora_load_dir reads the
 * weights' names and shapes, which never change), never on the engine
 * thread. */
static GfStatus settle_adapter(ServeEngine *e, ServeReq *r, GfError *err) {
    if (!r->s.adapter[0]) return GF_OK;
    pthread_mutex_lock(&e->mu);
    Resident *res = find_resident(e, r->s.adapter);
    if (res) res->pins++;
    pthread_mutex_unlock(&e->mu);
    if ((r->pinned = res)) return GF_OK;
    if (lora_load_dir(r->s.adapter_dir, e->m, e->cfg.max_lora_rank, &r->loaded, err)) return err->status;
    if (stage_params(e, r->loaded, &r->loaded_params, err)) return err->status;
    vision_cache_adapter_digest(r->loaded, r->loaded_digest);
    pthread_mutex_lock(&e->mu);
    e->stats.adapter_loads++;
    pthread_mutex_unlock(&e->mu);
    return GF_OK;
}

/* Releases what settle_adapter kept for a request that will not use it. */
static void drop_adapter(ServeEngine *e, ServeReq *r) {
    if (r->pinned) {
        pthread_mutex_lock(&e->mu);
        r->pinned->pins--;
        pthread_mutex_unlock(&e->mu);
        r->pinned = NULL;
    }
    lora_free(r->loaded);
    r->loaded = NULL;
    serve_params_free(e, &r->loaded_params);
}

GfStatus serve_submit(ServeEngine *e, ServeSubmit *s, ServeReq **out, GfError *err) {
    *out = NULL;
    int64_t need = s->n + s->max_tokens, cap = e->cfg.max_context;
    if (need > cap || blocks_for(e, need) > e->cfg.kv_blocks || blocks_for(e, need) > e->cfg.kv_window_blocks) {
        serve_submit_free(s);
        return gf_error_set(err, GF_INVALID, "context_length_exceeded", "max_tokens",
                            "the prompt has %lld tokens and max_tokens is %lld: %lld in all, over the context of %lld "
                            "positions", (long long)s->n, (long long)s->max_tokens, (long long)need,
                            (long long)cap);
    }
    ServeReq *r = gf_calloc(1, sizeof *r, err);
    if (!r) { serve_submit_free(s); return GF_NO_MEMORY; }
    r->s = *s;
    memset(s, 0, sizeof *s);
    atomic_init(&r->refs, 2);
    atomic_init(&r->cancelled, 0);
    r->t_submit = gf_time_mono();
    r->rng = sample_seed(r->s.seed);
    pthread_mutex_lock(&e->mu);
    GfStatus st = refused(e, err);
    pthread_mutex_unlock(&e->mu);
    if (!st) st = settle_adapter(e, r, err);
    pthread_mutex_lock(&e->mu);
    if (!st) st = refused(e, err);
    if (st) {
        pthread_mutex_unlock(&e->mu);
        drop_adapter(e, r);
        serve_submit_free(&r->s);
        free(r);
        return st;
    }
    if (e->tail) e->tail->next = r;
    else e->head = r;
    e->tail = r;
    e->n_queued++;
    e->stats.requests++;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return GF_OK;
}

/* ---- adapters (engine thread) ---------------------------------------------------- */

static void resident_free(Resident *r) {
    lora_binding_free(&r->b);
    lora_free(r->a);
    free(r);
}

/* Drops idle entries (no running sequence, no queued request pinning
 * them): forgotten ones, then the least recently used while more than
 * max_adapters are resident. */
static void evict(ServeEngine *e) {
    pthread_mutex_lock(&e->mu);
    for (;;) {
        int victim = -1;
        for (int i = 0; i < e->n_res; i++) {
            Resident *r = e->res[i];
            if (r->refs || r->pins) continue;
            if (r->dropped) { victim = i; break; }
            if (e->n_res > e->cfg.max_adapters && (victim < 0 || r->last_used < e->res[victim]->last_used)) victim = i;
        }
        if (victim < 0) break;
        if (!e->res[victim]->dropped) e->stats.adapter_evictions++;
        resident_free(e->res[victim]);
        e->res[victim] = e->res[--e->n_res];
    }
    pthread_mutex_unlock(&e->mu);
}

/* Engine thread, or any thread under mu. */
static Resident *find_resident(ServeEngine *e, const char *name) {
    for (int i = 0; i < e->n_res; i++)
        if (!e->res[i]->dropped && strcmp(e->res[i]->name, name) == 0) return e->res[i];
    return NULL;
}

/* a (and params, when it holds a's parameters on the device: bound as
 * they are; a job's slab when handover) made resident under name; both are
 * taken, also on failure. */
static GfStatus add_resident(ServeEngine *e, const char *name, LoraAdapter *a, KnBuffer *params, int handover,
                             const uint8_t *vision_digest, Resident **out, GfError *err) {
    evict(e);
    int adopt = params && params->data;
    Resident *r = NULL;
    GfStatus st;
    if (e->n_res == e->n_res_cap)
        st = gf_error_set(err, GF_BUSY, "adapters_busy", "model", "every adapter slot is in use; retry later");
    else if (!(r = gf_calloc(1, sizeof *r, err)))
        st = GF_NO_MEMORY;
    else if (adopt)
        st = lora_bind_adopt(e->m, a, params, &r->b, err);
    else
        st = lora_bind(e->m, a, &r->b, err);
    if (st) {
        serve_params_free(e, params);
        lora_free(a);
        free(r);
        return st;
    }
    if (adopt && handover) e->stats.adapters_adopted++;
    else if (adopt) e->stats.adapter_uploads_staged++;
    else e->stats.adapter_uploads_engine++;
    snprintf(r->name, sizeof r->name, "%s", name);
    r->a = a;
    r->last_used = e->step;
    memcpy(r->vision_digest, vision_digest, sizeof r->vision_digest);
    pthread_mutex_lock(&e->mu);
    e->res[e->n_res++] = r;
    pthread_mutex_unlock(&e->mu);
    *out = r;
    return GF_OK;
}

/* The adapter of a request, settled at submit: the resident it pinned, or
 * the one it loaded (made resident now, unless another request of the
 * same name got there first). */
static GfStatus acquire_adapter(ServeEngine *e, ServeReq *q, GfError *err) {
    if (!q->s.adapter[0]) return GF_OK;
    Resident *r = q->pinned;
    if (r) {
        drop_adapter(e, q); /* the running reference below replaces the pin */
    } else {
        r = find_resident(e, q->s.adapter);
        LoraAdapter *a = q->loaded;
        q->loaded = NULL;
        if (r) {
            lora_free(a);
            serve_params_free(e, &q->loaded_params);
        } else if (add_resident(e, q->s.adapter, a, &q->loaded_params, 0, q->loaded_digest, &r, err)) {
            return err->status;
        }
    }
    r->refs++;
    r->last_used = e->step;
    q->ad = r;
    return GF_OK;
}

static void apply_control(ServeEngine *e, Control *c) {
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->n_res; i++)
        if (strcmp(e->res[i]->name, c->name) == 0) e->res[i]->dropped = 1;
    pthread_mutex_unlock(&e->mu);
    evict(e);
    if (!c->a) return;
    Resident *r;
    GfError err;
    if (add_resident(e, c->name, c->a, &c->params, c->handover, c->vision_digest, &r, &err))
        GF_LOGW("adapter %s not kept in memory: %s", c->name, err.message);
}

static void post_control(ServeEngine *e, const char *name, LoraAdapter *a, KnBuffer *params) {
    uint8_t digest[VISION_DIGEST_LEN];
    vision_cache_adapter_digest(a, digest); /* here, on the caller's thread */
    KnBuffer staged = {0};
    GfError err;
    int handover = params && params->data;
    if (a && !handover) { /* uploaded here too; failing that, the engine binds it */
        if (stage_params(e, a, &staged, &err)) GF_LOGW("adapter %s: %s", name, err.message);
        else params = &staged;
    }
    pthread_mutex_lock(&e->mu);
    if (e->n_control < MAX_CONTROL) {
        Control *c = &e->control[e->n_control++];
        snprintf(c->name, sizeof c->name, "%s", name);
        c->a = a;
        memset(&c->params, 0, sizeof c->params);
        c->handover = handover;
        if (params) {
            c->params = *params;
            memset(params, 0, sizeof *params);
        }
        memcpy(c->vision_digest, digest, sizeof digest);
        a = NULL;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    /* only when the control list was full: the adapter loads from disk on first use */
    lora_free(a);
    serve_params_free(e, params);
}

void serve_adapter_put(ServeEngine *e, const char *name, LoraAdapter *a, KnBuffer *params) {
    post_control(e, name, a, params);
}
void serve_adapter_drop(ServeEngine *e, const char *name) { post_control(e, name, NULL, NULL); }

void serve_params_free(ServeEngine *e, KnBuffer *params) {
    if (!params || !params->data) return;
    const KnBackend *be = model_backend(e->m);
    be->ops->free(&be->ctx, params);
}

/* ---- ending a request --------------------------------------------------------------- */

static void hist_add(uint64_t *h, double *sum, double v) {
    int i = 0;
    while (i < SERVE_HIST_BUCKETS && v > SERVE_HIST_BOUNDS[i]) i++;
    h[i]++;
    *sum += v;
}

/* Sends the END event and lets the request go (its blocks back in the pool). */
static void finish(ServeEngine *e, ServeReq *q, FinishReason why, const GfError *error) {
    ServeEvent ev = {.kind = SERVE_END, .finish = why, .error = error, .prompt_tokens = q->s.n,
                     .completion_tokens = q->n_gen};
    q->s.sink(q->s.sink_cls, &ev);
    kv_cache_free(&q->cache); /* device memory is freed here, on the thread that owns the backend */
    model_device_free(e->m, &q->soft_buf);
    q->soft = NULL;
    free(q->ids);
    free(q->mm_type);
    q->ids = NULL;
    q->mm_type = NULL;
    if (q->ad) q->ad->refs--;
    q->ad = NULL;
    drop_adapter(e, q); /* a request that never ran */
    pthread_mutex_lock(&e->mu);
    if (error) e->stats.failed++;
    else if (why == FINISH_CANCELLED) e->stats.cancelled++;
    else e->stats.completed++;
    if (q->n_gen > 1) hist_add(e->stats.tpot, &e->stats.tpot_sum, (q->t_last - q->t_first) / (double)(q->n_gen - 1));
    pthread_mutex_unlock(&e->mu);
    serve_release(q);
}

/* ---- admission -------------------------------------------------------------------- */

/* The vision cache's figures into the stats (under mu). */
static void note_vision_cache(ServeEngine *e) {
    VisionCacheStats v;
    vision_cache_stats(e->vcache, &v);
    pthread_mutex_lock(&e->mu);
    e->stats.vision_cache_hits = v.hits;
    e->stats.vision_cache_misses = v.misses;
    e->stats.vision_cache_bytes = v.bytes;
    e->stats.vision_cache_entries = v.entries;
    pthread_mutex_unlock(&e->mu);
}

/* Soft tokens of one image at dst: from the cache, or from the tower with
 * the request's adapter (then kept). */
static GfStatus encode_image(ServeEngine *e, ServeReq *q, const ServeImage *im, float *dst, GfError *err) {
    static const uint8_t base[VISION_DIGEST_LEN];
    const uint8_t *vision = q->ad ? q->ad->vision_digest : base;
    if (im->has_digest && vision_cache_get(e->vcache, im->digest, vision, im->n_soft, dst)) return GF_OK;
    int64_t got = 0;
    if (model_vision_forward(e->m, q->ad ? &q->ad->b : NULL, im->pixels, im->positions, im->n_patches, dst, &got, err))
        return err->status;
    if (got != im->n_soft)
        return gf_error_set(err, GF_INTERNAL, "internal_error", "image", "an image gave %lld soft tokens, %lld expected",
                            (long long)got, (long long)im->n_soft);
    if (im->has_digest) vision_cache_put(e->vcache, im->digest, vision, got, dst);
    return GF_OK;
}

/* Vision tower of each image, with the request's adapter. */
static GfStatus encode_images(ServeEngine *e, ServeReq *q, GfError *err) {
    if (!q->s.n_images) return GF_OK;
    int64_t H = model_config(e->m)->text.hidden_size, total = 0;
    for (int i = 0; i < q->s.n_images; i++) total += q->s.images[i].n_patches;
    if (model_device_alloc(e->m, &q->soft_buf, (size_t)(total * H) * sizeof(float), "soft tokens", err)) return err->status;
    q->soft = q->soft_buf.data;
    int64_t at = 0;
    GfStatus st = GF_OK;
    for (int i = 0; !st && i < q->s.n_images; i++) {
        st = encode_image(e, q, &q->s.images[i], q->soft + at * H, err);
        at += q->s.images[i].n_soft;
    }
    note_vision_cache(e);
    return st;
}

/* Tokens the sequence's next forward carries: its whole known text when
 * its cache is empty (a new prompt, or a preempted sequence recomputing),
 * else the one token sampled last. */
static int64_t step_tokens(const ServeReq *q) { return q->cache.n_past ? 1 : q->s.n + q->n_gen; }

/* Blocks of space sp the running sequences take in the coming step. */
static int64_t step_need(const ServeEngine *e, KvSpace sp) {
    int64_t need = 0;
    for (int i = 0; i < e->n_active; i++) need += kv_cache_blocks_needed(&e->active[i]->cache, step_tokens(e->active[i]), sp);
    return need;
}

/* Whether a sequence needing `positions` positions now fits beside the
 * running sequences' next step. */
static int room_for(const ServeEngine *e, int64_t positions) {
    for (int sp = 0; sp < KV_SPACES; sp++) {
        const KvBlocks *b = &e->pool.space[sp];
        if (b->n_blocks && step_need(e, (KvSpace)sp) + blocks_for(e, positions) > b->n_free) return 0;
    }
    return 1;
}

static GfStatus admit_one(ServeEngine *e, ServeReq *q, GfError *err) {
    int64_t total = q->s.n + q->s.max_tokens;
    if (acquire_adapter(e, q, err) || encode_images(e, q, err) || kv_cache_init_paged(&q->cache, &e->pool, total, err))
        return err->status;
    q->ids = gf_malloc((size_t)total * sizeof *q->ids, err);
    q->mm_type = gf_calloc((size_t)total, 1, err);
    if (!q->ids || !q->mm_type) return GF_NO_MEMORY;
    memcpy(q->ids, q->s.ids, (size_t)q->s.n * sizeof *q->ids);
    if (q->s.mm_type) memcpy(q->mm_type, q->s.mm_type, (size_t)q->s.n);
    return GF_OK;
}

/* Resumes preempted sequences, oldest first, while slots and blocks allow;
 * 1 when every one is back (the queue may move). */
static int resume(ServeEngine *e, int64_t *prefill) {
    while (e->n_paused) {
        ServeReq *q = e->paused[0];
        int64_t n = step_tokens(q);
        if (e->n_active >= e->cfg.max_seqs || !room_for(e, n) ||
            (*prefill > 0 && *prefill + n > e->cfg.max_batch_tokens))
            return 0;
        memmove(e->paused, e->paused + 1, (size_t)--e->n_paused * sizeof *e->paused);
        *prefill += n;
        e->active[e->n_active++] = q;
    }
    return 1;
}

/* Moves queued requests into the batch while slots, blocks and the prefill
 * budget allow (preempted sequences first); cancelled ones end without
 * running. A request needs room only for its prompt: sequences grow as
 * they decode, and when the pool runs dry the latest admitted is preempted
 * (make_room). */
static void admit(ServeEngine *e) {
    int64_t prefill = 0;
    if (!resume(e, &prefill)) return;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        ServeReq *q = e->head;
        int ok = q && e->n_active < e->cfg.max_seqs && room_for(e, q->s.n) &&
                 (prefill == 0 || prefill + q->s.n <= e->cfg.max_batch_tokens);
        if (ok) {
            e->head = q->next;
            if (!e->head) e->tail = NULL;
            e->n_queued--;
        }
        pthread_mutex_unlock(&e->mu);
        if (!ok) return;
        GfError err;
        if (atomic_load(&q->cancelled)) { finish(e, q, FINISH_CANCELLED, NULL); continue; }
        if (admit_one(e, q, &err)) { finish(e, q, FINISH_STOP, &err); continue; }
        q->admitted = ++e->n_admitted;
        prefill += q->s.n;
        e->active[e->n_active++] = q;
    }
}

/* Pauses sequence i: its blocks go back to the pool, and it recomputes its
 * KV from its tokens when resumed (its sampler state is kept, so it goes
 * on with the tokens it would have produced). */
static void preempt(ServeEngine *e, int i) {
    ServeReq *q = e->active[i];
    kv_cache_reset(&q->cache);
    e->active[i] = e->active[--e->n_active];
    int at = e->n_paused;
    while (at > 0 && e->paused[at - 1]->admitted > q->admitted) at--;
    memmove(e->paused + at + 1, e->paused + at, (size_t)(e->n_paused - at) * sizeof *e->paused);
    e->paused[at] = q;
    e->n_paused++;
    pthread_mutex_lock(&e->mu);
    e->stats.preemptions++;
    pthread_mutex_unlock(&e->mu);
}

/* Preempts the latest admitted sequences until the step fits the pool. One
 * sequence always fits: serve_submit refuses any that could outgrow it. */
static void make_room(ServeEngine *e) {
    for (;;) {
        int fits = 1;
        for (int sp = 0; sp < KV_SPACES; sp++)
            if (step_need(e, (KvSpace)sp) > e->pool.space[sp].n_free) fits = 0;
        if (fits || e->n_active <= 1) return;
        int victim = 0;
        for (int i = 1; i < e->n_active; i++)
            if (e->active[i]->admitted > e->active[victim]->admitted) victim = i;
        preempt(e, victim);
    }
}

/* ---- one step ------------------------------------------------------------------------ */

static int by_adapter(const void *a, const void *b) {
    const ServeReq *x = *(ServeReq *const *)a, *y = *(ServeReq *const *)b;
    uintptr_t px = (uintptr_t)x->ad, py = (uintptr_t)y->ad;
    if (px != py) return px < py ? -1 : 1;
    return x->t_submit < y->t_submit ? -1 : x->t_submit > y->t_submit;
}

/* Drops cancelled sequences. */
static void prune(ServeEngine *e) {
    int k = 0;
    for (int i = 0; i < e->n_active; i++) {
        ServeReq *q = e->active[i];
        if (atomic_load(&q->cancelled)) finish(e, q, FINISH_CANCELLED, NULL);
        else e->active[k++] = q;
    }
    e->n_active = k;
    k = 0;
    for (int i = 0; i < e->n_paused; i++) {
        ServeReq *q = e->paused[i];
        if (atomic_load(&q->cancelled)) finish(e, q, FINISH_CANCELLED, NULL);
        else e->paused[k++] = q;
    }
    e->n_paused = k;
}

/* Ends queued requests whose client went away, so they stop holding queue
 * slots while the running batch keeps every sequence slot busy. */
static void prune_queue(ServeEngine *e) {
    for (;;) {
        pthread_mutex_lock(&e->mu);
        ServeReq *prev = NULL, *q = e->head;
        while (q && !atomic_load(&q->cancelled)) {
            prev = q;
            q = q->next;
        }
        if (q) {
            if (prev) prev->next = q->next;
            else e->head = q->next;
            if (e->tail == q) e->tail = prev;
            e->n_queued--;
        }
        pthread_mutex_unlock(&e->mu);
        if (!q) return;
        finish(e, q, FINISH_CANCELLED, NULL);
    }
}

/* Hands sequence q its next token id; 1 when it has finished. */
static int deliver(ServeEngine *e, ServeReq *q, int32_t id, double now) {
    if (!q->t_first) {
        q->t_first = now;
        pthread_mutex_lock(&e->mu);
        hist_add(e->stats.ttft, &e->stats.ttft_sum, now - q->t_submit);
        pthread_mutex_unlock(&e->mu);
    }
    if (model_is_eos(e->m, id)) { finish(e, q, FINISH_STOP, NULL); return 1; }
    q->ids[q->s.n + q->n_gen] = id; /* kept for a recompute: n + n_gen < n + max_tokens here */
    q->n_gen++;
    q->t_last = now;
    e->rate_tokens++;
    ServeEvent ev = {.kind = SERVE_TOKEN, .token = id, .prompt_tokens = q->s.n, .completion_tokens = q->n_gen};
    if (q->s.sink(q->s.sink_cls, &ev)) { finish(e, q, FINISH_STOP, NULL); return 1; }
    if (q->n_gen >= q->s.max_tokens) { finish(e, q, FINISH_LENGTH, NULL); return 1; }
    q->next_id = id;
    return 0;
}

static void run_step(ServeEngine *e) {
    int n = e->n_active;
    for (int i = 0; i < n; i++) {
        ServeReq *q = e->active[i];
        const LoraBinding *lb = q->ad ? &q->ad->b : NULL;
        if (!q->cache.n_past)
            e->batch[i] = (ModelSeq){&q->cache, {.ids = q->ids, .mm_type = q->mm_type, .soft_tokens = q->soft,
                                                 .n = step_tokens(q), .last_logits_only = 1, .lora = lb}};
        else
            e->batch[i] = (ModelSeq){&q->cache, {.ids = &q->next_id, .n = 1, .last_logits_only = 1, .lora = lb}};
        e->rows[i] = (KnSampleRow){q->s.sample.temperature, q->s.sample.top_p, q->s.sample.top_k, 0, q->rng};
    }
    GfError err;
    if (model_forward_batch_sample(e->m, e->batch, n, e->rows, e->next, &err)) {
        GF_LOGE("serving step failed: %s", err.message);
        for (int i = 0; i < n; i++) finish(e, e->active[i], FINISH_STOP, &err);
        e->n_active = 0;
        if (err.status == GF_DEVICE) { /* the device is lost to this process (a CUDA fault is sticky) */
            pthread_mutex_lock(&e->mu);
            snprintf(e->failed, sizeof e->failed, "%s", err.message);
            pthread_mutex_unlock(&e->mu);
        }
        return;
    }
    double now = gf_time_mono();
    int k = 0;
    for (int i = 0; i < n; i++) {
        ServeReq *q = e->active[i];
        q->rng = e->rows[i].rng;
        if (deliver(e, q, e->next[i], now)) continue;
        kv_cache_drop_window(&q->cache);
        e->active[k++] = q;
    }
    e->n_active = k;
}

/* ---- the thread ------------------------------------------------------------------------ */

static void update_stats(ServeEngine *e) {
    double now = gf_time_mono();
    ModelGraphStats g;
    model_graph_stats(e->m, &g);
    pthread_mutex_lock(&e->mu);
    e->stats.graph_recorded = g.recorded;
    e->stats.graph_replayed = g.replayed;
    e->stats.graph_resubmitted = g.resubmitted;
    e->stats.graph_padded = g.padded;
    e->stats.queued = e->n_queued;
    e->stats.running = e->n_active;
    e->stats.resident_adapters = e->n_res;
    e->stats.kv_blocks_used = kv_pool_used(&e->pool, KV_FULL);
    e->stats.kv_window_blocks_used = kv_pool_used(&e->pool, KV_WINDOW);
    e->stats.paused = e->n_paused;
    e->stats.generated_tokens += e->rate_tokens;
    e->window_tokens += e->rate_tokens;
    if (e->rate_tokens) e->last_token_t = now;
    e->rate_tokens = 0;
    if (now - e->rate_t0 >= 1.0) {
        e->stats.tokens_per_s = (double)e->window_tokens / (now - e->rate_t0);
        e->rate_t0 = now;
        e->window_tokens = 0;
    }
    pthread_mutex_unlock(&e->mu);
}

/* Waits for work; applies adapter changes; 0 when stopping. */
static int wait_for_work(ServeEngine *e) {
    pthread_mutex_lock(&e->mu);
    while (!e->stopping && !e->head && !e->n_control && e->n_active == 0 && e->n_paused == 0)
        pthread_cond_wait(&e->cv, &e->mu);
    Control ctl[MAX_CONTROL];
    int n_ctl = e->n_control, stopping = e->stopping;
    memcpy(ctl, e->control, (size_t)n_ctl * sizeof *ctl);
    e->n_control = 0;
    pthread_mutex_unlock(&e->mu);
    for (int i = 0; i < n_ctl; i++) apply_control(e, &ctl[i]);
    return !stopping;
}

/* Ends every running, paused and queued request with err. */
static void drain(ServeEngine *e, const GfError *err) {
    for (int i = 0; i < e->n_active; i++) finish(e, e->active[i], FINISH_STOP, err);
    e->n_active = 0;
    for (int i = 0; i < e->n_paused; i++) finish(e, e->paused[i], FINISH_STOP, err);
    e->n_paused = 0;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        ServeReq *q = e->head;
        if (q) { e->head = q->next; e->n_queued--; }
        pthread_mutex_unlock(&e->mu);
        if (!q) break;
        finish(e, q, FINISH_STOP, err);
    }
}

int serve_failed(ServeEngine *e, char *why, size_t cap) {
    pthread_mutex_lock(&e->mu);
    int failed = e->failed[0] != 0;
    if (why && cap) snprintf(why, cap, "%s", e->failed);
    pthread_mutex_unlock(&e->mu);
    return failed;
}

static void *engine_main(void *arg) {
    ServeEngine *e = arg;
    e->rate_t0 = gf_time_mono();
    while (wait_for_work(e)) {
        e->step++;
        prune(e);
        prune_queue(e);
        if (e->cfg.sched) devsched_serve_enter(e->cfg.sched); /* a training job gives way at its next layer */
        admit(e);
        make_room(e);
        qsort(e->active, (size_t)e->n_active, sizeof *e->active, by_adapter);
        if (e->n_active) run_step(e);
        if (e->cfg.sched) devsched_serve_leave(e->cfg.sched);
        evict(e);
        update_stats(e);
        GfError err;
        pthread_mutex_lock(&e->mu);
        int failed = refused(e, &err) && strcmp(err.code, "device_failed") == 0;
        pthread_mutex_unlock(&e->mu);
        if (failed) drain(e, &err); /* what waits would only fail again */
    }
    GfError err;
    gf_error_set(&err, GF_NOT_READY, "shutting_down", NULL, "the server is shutting down");
    drain(e, &err);
    return NULL;
}

/* ---- lifetime ---------------------------------------------------------------------------- */

static void engine_free(ServeEngine *e) {
    for (int i = 0; i < e->n_res; i++) resident_free(e->res[i]);
    for (int i = 0; i < e->n_control; i++) {
        lora_free(e->control[i].a);
        serve_params_free(e, &e->control[i].params);
    }
    kn_backend_close(&e->up);
    pthread_mutex_destroy(&e->up_mu);
    kv_pool_free(&e->pool);
    vision_cache_free(e->vcache);
    free(e->res);
    free(e->active);
    free(e->paused);
    free(e->batch);
    free(e->rows);
    free(e->next);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

GfStatus serve_start(Model *m, const ServeConfig *cfg, ServeEngine **out, GfError *err) {
    *out = NULL;
    if (cfg->max_seqs < 1 || cfg->max_queue < 0 || cfg->kv_block_len < 1 || cfg->kv_blocks < 1 || cfg->max_adapters < 0 ||
        cfg->max_context < 1)
        return gf_error_set(err, GF_INVALID, "invalid_config", NULL, "serving limits must be positive");
    ServeEngine *e = gf_calloc(1, sizeof *e, err);
    if (!e) return GF_NO_MEMORY;
    e->m = m;
    e->cfg = *cfg;
    e->cfg.kv_window_blocks = serve_window_blocks(cfg, m);
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->up_mu, NULL);
    const KnBackend *be = model_backend(m);
    KnBackendOptions up = {.n_threads = 1, .share = be, .precision = be->ctx.precision};
    if (kn_backend_open(be->ctx.device, be->ctx.index, &up, &e->up, err)) {
        engine_free(e);
        return err->status;
    }
    pthread_cond_init(&e->cv, NULL);
    e->n_res_cap = cfg->max_adapters + cfg->max_seqs + cfg->max_queue; /* idle, running and pinned by the queue */
    e->res = gf_calloc((size_t)e->n_res_cap, sizeof *e->res, err);
    e->active = gf_calloc((size_t)cfg->max_seqs, sizeof *e->active, err);
    e->paused = gf_calloc((size_t)cfg->max_seqs, sizeof *e->paused, err);
    e->batch = gf_calloc((size_t)cfg->max_seqs, sizeof *e->batch, err);
    e->rows = gf_calloc((size_t)cfg->max_seqs, sizeof *e->rows, err);
    e->next = gf_calloc((size_t)cfg->max_seqs, sizeof *e->next, err);
    e->vcache = e->next ? vision_cache_new(m, cfg->vision_cache_bytes, err) : NULL;
    if (!e->res || !e->active || !e->paused || !e->batch || !e->rows || !e->next || !e->vcache ||
        kv_pool_init(&e->pool, &model_config(m)->text, model_backend(m), cfg->kv_dtype, cfg->kv_block_len, cfg->kv_blocks,
                     e->cfg.kv_window_blocks, err)) {
        engine_free(e);
        return err->status ? err->status : GF_NO_MEMORY;
    }
    e->stats.kv_blocks_total = cfg->kv_blocks;
    e->stats.kv_window_blocks_total = e->pool.space[KV_WINDOW].n_blocks;
    e->stats.kv_dtype = e->pool.dtype;
    for (int i = 0; i < 2 * e->pool.n_layers; i++) e->stats.kv_bytes += e->pool.bufs[i].bytes;
    if (pthread_create(&e->thread, NULL, engine_main, e)) {
        engine_free(e);
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "cannot start the engine thread");
    }
    *out = e;
    return GF_OK;
}

void serve_stop(ServeEngine *e) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    int running = !e->stopping;
    e->stopping = 1;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (running) pthread_join(e->thread, NULL);
}

void serve_free(ServeEngine *e) {
    if (!e) return;
    serve_stop(e);
    engine_free(e);
}

void serve_stats(ServeEngine *e, ServeStats *out) {
    pthread_mutex_lock(&e->mu);
    *out = e->stats;
    out->queued = e->n_queued;
    if (gf_time_mono() - e->last_token_t > 2.0) out->tokens_per_s = 0; /* idle: the last window is stale */
    pthread_mutex_unlock(&e->mu);
}
