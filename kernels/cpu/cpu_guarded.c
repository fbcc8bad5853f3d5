/* cpu_guarded.c - the guarded CPU backend: the CPU kernels behind a table
 * whose device buffers live in a reserved region of their own, kept
 * PROT_NONE whenever no op of this backend is running. Engine code that
 * reads or writes device memory itself, instead of through an op or a
 * transfer entry, faults at once, as it would (less politely) on a GPU.
 * Sealed buffers (weights) are read-only even during ops. The transfer entries (upload, download, copy, memset) abort
 * when handed a device range outside every live buffer: host memory passed
 * where device memory belongs.
 *
 * Every pointer an op is handed must be NULL or lie in the region: host
 * memory where device memory belongs (weights left in host memory, a host
 * array) aborts with a message, as a GPU would fault on it.
 *
 * A device fault can be injected: with GF_GUARDED_FAULT_FILE naming a path,
 * synchronize reports GF_DEVICE once that file exists, and from then on,
 * as a GPU's sticky faults do (the fault belongs to the region, so every
 * sibling sees it).
 *
 * Recording (ops.h graph_begin / graph_end) is emulated: the ops between
 * the two run as they are submitted and graph_end answers 0. With
 * GF_GUARDED_GRAPH_FAIL=N, every Nth recording of a context fails as a
 * GPU's may (its ops and copies do not run, graph_end answers 1, and the
 * caller's second submission is what computes), and a run whose signature
 * equals its bucket's last recording's is answered KN_GRAPH_REPLAY, which
 * cannot run here: graph_end answers 1. An upload, download, alloc, free or
 * synchronize while recording, or an op submitted during a replay, aborts
 * with a message: engine code that a GPU would refuse or run wrongly.
 *
 * It exists for tests: the whole suite runs on it once in CI. Threading: a
 * context belongs to one thread, as any KnCtx; contexts opened as siblings
 * (KnBackendOptions.share) share one region, as contexts on one GPU share
 * its memory, so its registry is locked. The region is the contexts' own
 * (reference counted), not global; ctx->impl is a context's GuardCtx.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../kernels_impl.h"
#include "../nf4.h"
#include "cpu_impl.h"

typedef struct {
    size_t off, len;          /* the chunk: byte offset in the region, whole pages */
    int sealed, used;
} GuardBuf;

typedef struct {
    int fd;                   /* the memory both mappings share */
    char *dev;                /* the device view: PROT_NONE */
    char *host;               /* the kernels' view: read-write */
    size_t region_len, top;   /* reserved bytes; the end of the highest chunk */
    GuardBuf *bufs;
    size_t n, cap;
    size_t page;
    pthread_mutex_t lock;     /* the registry (bufs, n, cap, top), refs and faulted */
    int refs;                 /* contexts on this region */
    char *fault_file;         /* GF_GUARDED_FAULT_FILE, read once at creation, or NULL */
    int faulted;              /* an injected device fault happened */
} Guard;

#define GUARD_GRAPH_SLOTS 8

/* A bucket's last recording's signature (replays are answered in fail mode). */
typedef struct {
    int64_t bucket;
    void *sig;
    size_t bytes;
    int used;
} GuardSig;

/* One context: its region and its recording. */
typedef struct {
    Guard *g;
    int fail_every;           /* GF_GUARDED_GRAPH_FAIL, read at init: every Nth recording fails (0: none) */
    uint64_t recordings;
    int recording;            /* between graph_begin and graph_end */
    int skipping;             /* this recording fails: its ops and copies do not run */
    int replaying;            /* between graph_begin (REPLAY) and graph_end: nothing may be submitted */
    GuardSig sigs[GUARD_GRAPH_SLOTS];
} GuardCtx;

static GuardCtx *gctx(const KnCtx *ctx) { return ctx->impl; }
static Guard *guard_of(const KnCtx *ctx) { return gctx(ctx)->g; }

/* Aborts when ctx is recording or replaying: entry is one a recording
 * refuses. */
static void not_recording(const KnCtx *ctx, const char *entry) {
    if (!gctx(ctx)->recording && !gctx(ctx)->replaying) return;
    fprintf(stderr, "guarded backend: %s while a graph is recorded or replayed\n", entry);
    abort();
}

/* 1 when the op or copy submitted now must not run (a failing
 * recording); aborts during a replay, which takes no submissions. */
static int skipped(const KnCtx *ctx) {
    if (gctx(ctx)->replaying) {
        fprintf(stderr, "guarded backend: an op submitted while a graph is replayed\n");
        abort();
    }
    return gctx(ctx)->skipping;
}

/* The kernels' address of a device address; NULL stays NULL. Anything
 * else outside the region is host memory handed to an op: abort. */
static void *hv(const KnCtx *ctx, const void *p) {
    Guard *g = guard_of(ctx);
    const char *c = p;
    if (!c) return NULL;
    if (c < g->dev || c >= g->dev + g->region_len) {
        fprintf(stderr, "guarded backend: an op was handed %p, which is not device memory\n", p);
        abort();
    }
    return g->host + (c - g->dev);
}

static GuardBuf *find(Guard *g, const void *p) {
    const char *c = p;
    if (c < g->dev || c >= g->dev + g->region_len) return NULL;
    size_t off = (size_t)(c - g->dev);
    for (size_t i = 0; i < g->n; i++)
        if (g->bufs[i].used && off >= g->bufs[i].off && off < g->bufs[i].off + g->bufs[i].len) return &g->bufs[i];
    return NULL;
}

/* A new region of its own (refs 1), or NULL with err set. */
static Guard *region_new(GfError *err) {
    Guard *g = gf_calloc(1, sizeof *g, err);
    if (!g) return NULL;
    long page = sysconf(_SC_PAGESIZE);
    g->page = page > 0 ? (size_t)page : 4096;
    g->fd = memfd_create("gf-guarded", MFD_CLOEXEC);
    for (size_t len = (size_t)1 << 38; g->fd >= 0 && len >= ((size_t)1 << 30) && !g->dev; len >>= 2) {
        if (ftruncate(g->fd, (off_t)len) != 0) continue;
        void *d = mmap(NULL, len, PROT_NONE, MAP_SHARED | MAP_NORESERVE, g->fd, 0);
        void *h = d == MAP_FAILED ? MAP_FAILED : mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, g->fd, 0);
        if (h == MAP_FAILED) {
            if (d != MAP_FAILED) munmap(d, len);
            continue;
        }
        g->dev = d;
        g->host = h;
        g->region_len = len;
    }
    if (!g->dev) {
        if (g->fd >= 0) close(g->fd);
        free(g);
        gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "cannot reserve the guarded backend's memory");
        return NULL;
    }
    pthread_mutex_init(&g->lock, NULL);
    g->refs = 1;
    const char *fault = getenv("GF_GUARDED_FAULT_FILE");
    if (fault && *fault) g->fault_file = strdup(fault);
    return g;
}

GfStatus guarded_ctx_init(KnCtx *ctx, const KnCtx *share, GfError *err) {
    GuardCtx *c = gf_calloc(1, sizeof *c, err);
    if (!c) return GF_NO_MEMORY;
    if (share) {
        c->g = guard_of(share);
        pthread_mutex_lock(&c->g->lock);
        c->g->refs++;
        pthread_mutex_unlock(&c->g->lock);
    } else if (!(c->g = region_new(err))) {
        free(c);
        return err->status;
    }
    const char *fail = getenv("GF_GUARDED_GRAPH_FAIL");
    c->fail_every = fail ? atoi(fail) : 0;
    ctx->impl = c;
    return GF_OK;
}

void guarded_ctx_free(KnCtx *ctx) {
    GuardCtx *c = gctx(ctx);
    if (!c) return;
    Guard *g = c->g;
    for (int i = 0; i < GUARD_GRAPH_SLOTS; i++) free(c->sigs[i].sig);
    free(c);
    ctx->impl = NULL;
    pthread_mutex_lock(&g->lock);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->lock);
    if (!last) return;
    pthread_mutex_destroy(&g->lock);
    munmap(g->dev, g->region_len);
    munmap(g->host, g->region_len);
    close(g->fd);
    free(g->bufs);
    free(g->fault_file);
    free(g);
}

static GfStatus g_synchronize(const KnCtx *ctx, GfError *err) {
    not_recording(ctx, "synchronize");
    Guard *g = guard_of(ctx);
    if (!g->fault_file) return GF_OK;
    pthread_mutex_lock(&g->lock);
    if (!g->faulted && access(g->fault_file, F_OK) == 0) g->faulted = 1;
    int faulted = g->faulted;
    pthread_mutex_unlock(&g->lock);
    return faulted ? gf_error_set(err, GF_DEVICE, "device_error", NULL,
                                  "guarded: a device fault (injected through GF_GUARDED_FAULT_FILE)")
                   : GF_OK;
}

/* ---- memory ------------------------------------------------------------------ */

/* A free chunk of at least len bytes, or a new one at the top (NULL when
 * the region or the registry is full). */
static GuardBuf *take_chunk(Guard *g, size_t len) {
    for (size_t i = 0; i < g->n; i++)
        if (!g->bufs[i].used && g->bufs[i].len >= len) return &g->bufs[i];
    if (len > g->region_len - g->top) return NULL;
    if (g->n == g->cap) {
        size_t cap = g->cap ? 2 * g->cap : 64;
        GuardBuf *b = realloc(g->bufs, cap * sizeof *b);
        if (!b) return NULL;
        g->bufs = b;
        g->cap = cap;
    }
    GuardBuf *b = &g->bufs[g->n++];
    *b = (GuardBuf){g->top, len, 0, 0};
    g->top += len;
    return b;
}

static GfStatus g_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err) {
    not_recording(ctx, "alloc");
    Guard *g = guard_of(ctx);
    memset(buf, 0, sizeof *buf);
    size_t len = bytes > SIZE_MAX - g->page ? 0 : (bytes + g->page - 1) / g->page * g->page;
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = len && !gf_alloc_hook_refuses() ? take_chunk(g, len) : NULL;
    if (b) {
        b->used = 1;
        b->sealed = 0;
        *buf = (KnBuffer){g->dev + b->off, bytes, ctx->device, ctx->index, dtype};
    }
    pthread_mutex_unlock(&g->lock);
    if (!b)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s (%zu bytes)", what, bytes);
    return GF_OK;
}

static void g_free(const KnCtx *ctx, KnBuffer *buf) {
    Guard *g = guard_of(ctx);
    if (!buf || !buf->data) return;
    not_recording(ctx, "free");
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, buf->data);
    if (!b || g->dev + b->off != (char *)buf->data) abort(); /* not ours: a programming error */
    if (b->sealed && mprotect(g->host + b->off, b->len, PROT_READ | PROT_WRITE) != 0) abort();
    fallocate(g->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)b->off, (off_t)b->len); /* pages back */
    b->used = b->sealed = 0;
    pthread_mutex_unlock(&g->lock);
    memset(buf, 0, sizeof *buf);
}

static void g_seal(const KnCtx *ctx, const KnBuffer *buf) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, buf->data);
    if (!b) abort();
    b->sealed = 1;
    if (mprotect(g->host + b->off, b->len, PROT_READ) != 0) abort();
    pthread_mutex_unlock(&g->lock);
}

/* The device memory [p, p + n) must lie inside one live buffer: host
 * memory handed to a transfer entry (which a GPU could not read) aborts. */
static void *owned(const KnCtx *ctx, const void *p, size_t n) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, p);
    if (!b || (const char *)p + n > g->dev + b->off + b->len) abort();
    pthread_mutex_unlock(&g->lock);
    return hv(ctx, p);
}

static void g_upload(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    not_recording(ctx, "upload");
    if (n) memcpy(owned(ctx, dst, n), src, n); /* a sealed buffer faults: weights are written before sealing */
}

static void g_download(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    not_recording(ctx, "download");
    if (n) memcpy(dst, owned(ctx, src, n), n);
}

static void g_copy(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (n && !skipped(ctx)) memmove(owned(ctx, dst, n), owned(ctx, src, n), n);
}

static void g_memset(const KnCtx *ctx, void *dst, int value, size_t n) {
    if (n && !skipped(ctx)) memset(owned(ctx, dst, n), value, n);
}

/* ---- ops: each pointer argument translated to the kernels' view ---- */

#define H(p) hv(ctx, p)
/* The CPU kernel op on the translated arguments, unless a failing
 * recording skips it. */
#define RUN(op, ...)                                  \
    do {                                              \
        if (!skipped(ctx)) CPU_OPS.op(__VA_ARGS__);   \
    } while (0)

/* w in the kernels' view; an NF4 matrix points at a host KnNf4 whose
 * arrays are device memory, translated into *q. */
static KnMatrix hm(const KnCtx *ctx, KnMatrix w, KnNf4 *q) {
    if (w.dtype != KN_NF4) {
        w.data = H(w.data);
        return w;
    }
    *q = *(const KnNf4 *)w.data;
    q->codes = H(q->codes);
    q->absmax_q = H(q->absmax_q);
    q->group_scale = H(q->group_scale);
    w.data = q;
    return w;
}
/* the KnNf4 lives until the end of the calling function's block */
#define HM(w) hm(ctx, (w), &(KnNf4){0})

static KnMask hmask(const KnCtx *ctx, const KnMask *m) {
    return (KnMask){H(m->valid), H(m->group), m->window};
}

#define MAX_SEGS 1024
/* The segments with their matrices in the kernels' view, into out. */
static const KnLoraSeg *hsegs(const KnCtx *ctx, const KnLoraSeg *segs, int n, KnLoraSeg *out) {
    if (n > MAX_SEGS) abort();
    for (int i = 0; i < n; i++) {
        out[i] = segs[i];
        out[i].A = H(segs[i].A);
        out[i].B = H(segs[i].B);
        out[i].dA = H(segs[i].dA);
        out[i].dB = H(segs[i].dB);
    }
    return out;
}

static void g_matmul(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n) {
    RUN(matmul, ctx, H(y), H(x), HM(w), n);
}
static void g_rmsnorm(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps) {
    RUN(rmsnorm, ctx, H(y), H(x), H(w), n, dim, eps);
}
static void g_attention(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                        int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                        const KnMask *mask) {
    KnMask m = hmask(ctx, mask);
    RUN(attention, ctx, H(out), H(q), H(k), H(v), n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, &m);
}
static void g_attention_paged(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                              int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask) {
    KnMask m = hmask(ctx, mask);
    KnKv h = {H(kv->k), H(kv->v), H(kv->table), kv->block_len};
    RUN(attention_paged, ctx, H(out), H(q), &h, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, &m);
}
static void g_attention_batch(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const float *k,
                              const float *v, int64_t block_len, const KnAttnSeq *seqs, int n_seqs, int n_heads,
                              int n_kv_heads, int dim, float scale, int window) {
    KnAttnSeq h[MAX_SEGS];
    if (n_seqs > MAX_SEGS) abort();
    for (int i = 0; i < n_seqs; i++) {
        h[i] = seqs[i];
        h[i].table = H(seqs[i].table);
        h[i].valid = H(seqs[i].valid);
        h[i].group = H(seqs[i].group);
    }
    RUN(attention_batch, ctx, H(out), H(q), H(pos), H(k), H(v), block_len, h, n_seqs, n_heads, n_kv_heads, dim, scale,
        window);
}
static void g_gelu_tanh(const KnCtx *ctx, float *x, size_t n) { RUN(gelu_tanh, ctx, H(x), n); }
static void g_softcap(const KnCtx *ctx, float *x, size_t n, float cap) { RUN(softcap, ctx, H(x), n, cap); }
static void g_embed_rows(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale) {
    RUN(embed_rows, ctx, H(out), HM(table), H(ids), n, scale);
}
static void g_add(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n) {
    RUN(add, ctx, H(y), H(a), H(b), n);
}
static void g_mul(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b) {
    RUN(mul, ctx, H(y), H(a), H(b), rows, cols, ld_b);
}
static void g_mul_acc(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols,
                      int64_t ld_y) {
    RUN(mul_acc, ctx, H(y), H(a), H(b), rows, cols, ld_y);
}
static void g_rows_gather(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RUN(rows_gather, ctx, H(out), H(src), H(idx), n, dim);
}
static void g_rows_scatter(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RUN(rows_scatter, ctx, H(out), H(src), H(idx), n, dim);
}
static void g_rows_sum(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim) {
    RUN(rows_sum, ctx, H(out), H(src), H(idx), n, dim);
}
static void g_embed_rows_add(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row) {
    RUN(embed_rows_add, ctx, H(out), HM(table), H(ids), n, H(row));
}
static void g_clamp(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi) {
    RUN(clamp, ctx, H(y), H(x), n, lo, hi);
}
static void g_scale_shift(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s) {
    RUN(scale_shift, ctx, H(y), H(x), n, shift, s);
}
static void g_standardize(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale) {
    RUN(standardize, ctx, H(x), rows, cols, H(bias), H(scale));
}
static void g_xent_softcap(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                           float cap, float scale, int grad) {
    RUN(xent_softcap, ctx, H(loss), H(z), H(targets), rows, V, cap, scale, grad);
}
static void g_sample(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                     void *scratch) {
    RUN(sample, ctx, H(ids), H(logits), H(rows), n, V, H(scratch));
}
static void g_adamw(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h) {
    RUN(adamw, ctx, H(p), H(g), H(m), H(v), n, h);
}
static void g_sq_norm(const KnCtx *ctx, double *out, const float *x, size_t n) { RUN(sq_norm, ctx, H(out), H(x), n); }
static void g_scale(const KnCtx *ctx, float *x, size_t n, float s) { RUN(scale, ctx, H(x), n, s); }
static void g_rope_rows(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                        const float *inv_freq, const int32_t *pos, int64_t pos_stride) {
    RUN(rope_rows, ctx, H(x), n_rows, n_heads, dim, ld_head, H(inv_freq), H(pos), pos_stride);
}
static void g_moe_route(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                        int64_t n, int E, int K) {
    RUN(moe_route, ctx, H(idx), H(w), H(coef), H(p), H(expert_scale), n, E, K);
}
static void g_moe_experts(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                          float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down) {
    RUN(moe_experts, ctx, H(y), H(x), H(idx), H(coef), H(gu), H(mm), H(yk), n, K, HM(gate_up), HM(down));
}
static void g_moe_experts_dx(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                             const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                             KnMatrix down) {
    RUN(moe_experts_dx, ctx, H(dx), H(dc), H(dy), H(gu), H(yk), H(idx), H(coef), H(scratch), n, K,
                           HM(gate_up), HM(down));
}
static void g_moe_route_dx(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                           const float *p, const float *expert_scale, int64_t n, int E, int K) {
    RUN(moe_route_dx, ctx, H(dlogits), H(dc), H(idx), H(w), H(p), H(expert_scale), n, E, K);
}
static void g_lora_shrink(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                          int64_t in, float *dropout_buf) {
    KnLoraSeg h[MAX_SEGS];
    RUN(lora_shrink, ctx, H(t), ld_t, H(x), hsegs(ctx, segs, n_segs, h), n_segs, in, H(dropout_buf));
}
static void g_lora_expand(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                          int64_t out) {
    KnLoraSeg h[MAX_SEGS];
    RUN(lora_expand, ctx, H(y), H(t), ld_t, hsegs(ctx, segs, n_segs, h), n_segs, out);
}
static void g_lora_expand_dx(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                             const KnLoraSeg *segs, int n_segs, int64_t out) {
    KnLoraSeg h[MAX_SEGS];
    RUN(lora_expand_dx, ctx, H(gt), H(dy), H(t), ld_t, hsegs(ctx, segs, n_segs, h), n_segs, out);
}
static void g_lora_shrink_dx(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                             const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf) {
    KnLoraSeg h[MAX_SEGS];
    RUN(lora_shrink_dx, ctx, H(dx), H(gt), ld_t, H(x), hsegs(ctx, segs, n_segs, h), n_segs, in, H(dropout_buf));
}
static void g_clamp_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                       int accumulate) {
    RUN(clamp_dx, ctx, H(dx), H(x), H(dy), n, lo, hi, accumulate);
}
static void g_matmul_dx(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n) {
    RUN(matmul_dx, ctx, H(dx), H(dy), HM(w), n);
}
static void g_rmsnorm_dx(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                         int64_t dim, float eps) {
    RUN(rmsnorm_dx, ctx, H(dx), H(x), H(w), H(dy), n, dim, eps);
}
static void g_gelu_tanh_dx(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n) {
    RUN(gelu_tanh_dx, ctx, H(dx), H(x), H(dy), n);
}
static void g_attention_dx(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                           const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                           int n_kv_heads, int dim, float scale, const KnMask *mask) {
    KnMask m = hmask(ctx, mask);
    RUN(attention_dx, ctx, H(dq), H(dk), H(dv), H(q), H(k), H(v), H(dout), n_q, q_pos0, n_keys, n_heads, n_kv_heads,
                         dim, scale, &m);
}

/* The signature slot of bucket: its own, else a free one, else slot
 * bucket % GUARD_GRAPH_SLOTS. */
static GuardSig *sig_slot(GuardCtx *c, int64_t bucket) {
    GuardSig *free_slot = NULL;
    for (int i = 0; i < GUARD_GRAPH_SLOTS; i++) {
        if (c->sigs[i].used && c->sigs[i].bucket == bucket) return &c->sigs[i];
        if (!c->sigs[i].used && !free_slot) free_slot = &c->sigs[i];
    }
    return free_slot ? free_slot : &c->sigs[(uint64_t)bucket % GUARD_GRAPH_SLOTS];
}

static int g_graph_begin(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes) {
    GuardCtx *c = gctx(ctx);
    if (c->recording || c->replaying) return KN_GRAPH_NONE;
    GuardSig *gs = sig_slot(c, bucket);
    int same = gs->used && gs->bucket == bucket && sig && sig_bytes && gs->bytes == sig_bytes &&
               memcmp(gs->sig, sig, sig_bytes) == 0;
    if (c->fail_every > 0 && same) {
        c->replaying = 1;
        return KN_GRAPH_REPLAY;
    }
    void *copy = sig && sig_bytes ? malloc(sig_bytes) : NULL;
    if (copy) memcpy(copy, sig, sig_bytes);
    free(gs->sig);
    *gs = (GuardSig){bucket, copy, copy ? sig_bytes : 0, 1};
    c->recording = 1;
    c->recordings++;
    c->skipping = c->fail_every > 0 && c->recordings % (uint64_t)c->fail_every == 0;
    return KN_GRAPH_RECORD;
}

static int g_graph_end(const KnCtx *ctx) {
    GuardCtx *c = gctx(ctx);
    if (c->replaying) { /* a replay never runs here */
        c->replaying = 0;
        return 1;
    }
    if (!c->recording) return 1;
    int failed = c->skipping;
    c->recording = c->skipping = 0;
    return failed;
}

static const KnOps GUARDED_OPS = {
    .alloc = g_alloc,
    .free = g_free,
    .seal = g_seal,
    .upload = g_upload,
    .download = g_download,
    .copy = g_copy,
    .memset = g_memset,
    .synchronize = g_synchronize,
    .supports = cpu_supports,
    .graph_begin = g_graph_begin,
    .graph_end = g_graph_end,
    .matmul = g_matmul,
    .rmsnorm = g_rmsnorm,
    .attention = g_attention,
    .attention_paged = g_attention_paged,
    .attention_batch = g_attention_batch,
    .gelu_tanh = g_gelu_tanh,
    .softcap = g_softcap,
    .embed_rows = g_embed_rows,
    .add = g_add,
    .mul = g_mul,
    .scale = g_scale,
    .sample = g_sample,
    .adamw = g_adamw,
    .sq_norm = g_sq_norm,
    .mul_acc = g_mul_acc,
    .rows_gather = g_rows_gather,
    .rows_scatter = g_rows_scatter,
    .xent_softcap = g_xent_softcap,
    .rows_sum = g_rows_sum,
    .embed_rows_add = g_embed_rows_add,
    .clamp = g_clamp,
    .clamp_dx = g_clamp_dx,
    .scale_shift = g_scale_shift,
    .standardize = g_standardize,
    .rope_rows = g_rope_rows,
    .moe_route = g_moe_route,
    .moe_experts = g_moe_experts,
    .moe_experts_dx = g_moe_experts_dx,
    .moe_route_dx = g_moe_route_dx,
    .lora_shrink = g_lora_shrink,
    .lora_expand = g_lora_expand,
    .lora_expand_dx = g_lora_expand_dx,
    .lora_shrink_dx = g_lora_shrink_dx,
    .matmul_dx = g_matmul_dx,
    .rmsnorm_dx = g_rmsnorm_dx,
    .gelu_tanh_dx = g_gelu_tanh_dx,
    .attention_dx = g_attention_dx,
};

const KnOps *guarded_backend_ops(void) { return &GUARDED_OPS; }
