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
 * Recording (ops.h graph_begin / graph_end) is emulated as a GPU records:
 * the ops, copies and memsets submitted between the two are kept, with
 * every argument they were handed (host arrays copied), not run; graph_end
 * runs them in order and keeps them as the bucket's graph, and a later
 * graph_begin of that bucket with an equal signature is answered
 * KN_GRAPH_REPLAY: graph_end runs the kept calls again, on the device
 * memory's contents of then. A replay that reaches memory no live buffer
 * holds (a graph over freed memory) aborts. Each context keeps
 * GUARD_GRAPH_SLOTS graphs. With GF_GUARDED_GRAPH_FAIL=N, every Nth
 * recording of a context fails as a GPU's may (nothing of it runs,
 * graph_end answers 1, and the caller's second submission is what
 * computes), and every replay fails likewise; with GF_GUARDED_GRAPHS=0 it
 * records nothing, answering KN_GRAPH_OFF as a GPU's context with graphs
 * switched off does. An upload, download, alloc,
 * free or synchronize while recording or replaying, or an op submitted
 * during a replay, aborts with a message: engine code that a GPU would
 * refuse or run wrongly.
 *
 * A test may watch the calls of the entries that take scratch on a GPU
 * (kn_guarded_watch), which this backend has none of, to price them with
 * another kind's table.
 *
 * It exists for tests: the whole suite runs on it once in CI. Threading: a
 * context belongs to one thread, as any KnCtx; contexts opened as siblings
 * (KnBackendOptions.share) share one region, as contexts on one GPU share
 * its memory, so its registry is locked. The region is the contexts' own
 * (reference counted), not global; ctx->impl is a context's GuardCtx.
 * The ops and the table are cpu_guarded_ops.c's (cpu_guarded.h).
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../kernels_impl.h"
#include "cpu_guarded.h"

typedef struct {
    size_t off, len;          /* the chunk: byte offset in the region, whole pages */
    int sealed, used;
    int mapped;               /* alloc_mapped: its device view is open to the host too */
    size_t bytes;             /* as asked of alloc */
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
    uint64_t held, peak;      /* bytes the live unmapped buffers asked for; the most they ever held */
    void (*watch)(void *user, const KnCall *call); /* kn_guarded_watch, or NULL */
    void *watch_user;
} Guard;

#define GUARD_GRAPH_SLOTS 8

/* One kept call: exec on its own copy of the arguments. */
typedef struct {
    GuardExec exec;
    void *args;
} GuardCall;

/* A recording's calls and the host bytes they read (guard_keep). */
typedef struct {
    GuardCall *calls;
    size_t n, cap;
    void **kept;
    size_t n_kept, kept_cap;
} GuardTape;

/* A bucket's graph: its last recording's signature, and its calls once
 * that recording ended well (ready). */
typedef struct {
    int64_t bucket;
    void *sig;
    size_t bytes;
    int used, ready;
    GuardTape tape;
} GuardSlot;

/* One context: its region and its recording. */
typedef struct {
    Guard *g;
    int fail_every;           /* GF_GUARDED_GRAPH_FAIL, read at init: every Nth recording fails (0: none) */
    int off;                  /* GF_GUARDED_GRAPHS=0, read at init: records nothing (KN_GRAPH_OFF) */
    uint64_t recordings;
    int recording;            /* between graph_begin (RECORD) and graph_end */
    int broken;               /* this recording fails: nothing of it will run */
    GuardTape rec;            /* the recording's calls */
    GuardSlot *slot;          /* the recording's bucket */
    GuardSlot *replay;        /* between graph_begin (REPLAY) and graph_end: the graph to run */
    int running_replay;       /* a replay's calls are running: addresses must be live */
    GuardSlot slots[GUARD_GRAPH_SLOTS];
} GuardCtx;

static GuardCtx *gctx(const KnCtx *ctx) { return ctx->impl; }
static Guard *guard_of(const KnCtx *ctx) { return gctx(ctx)->g; }

/* Aborts when ctx is recording or replaying: entry is one a recording
 * refuses. */
static void not_recording(const KnCtx *ctx, const char *entry) {
    if (!gctx(ctx)->recording && !gctx(ctx)->replay) return;
    fprintf(stderr, "guarded backend: %s while a graph is recorded or replayed\n", entry);
    abort();
}

static GuardBuf *find(Guard *g, const void *p) {
    const char *c = p;
    if (c < g->dev || c >= g->dev + g->region_len) return NULL;
    size_t off = (size_t)(c - g->dev);
    for (size_t i = 0; i < g->n; i++)
        if (g->bufs[i].used && off >= g->bufs[i].off && off < g->bufs[i].off + g->bufs[i].len) return &g->bufs[i];
    return NULL;
}

void *guard_hv(const KnCtx *ctx, const void *p) {
    Guard *g = guard_of(ctx);
    const char *c = p;
    if (!c) return NULL;
    if (c < g->dev || c >= g->dev + g->region_len) {
        fprintf(stderr, "guarded backend: an op was handed %p, which is not device memory\n", p);
        abort();
    }
    if (gctx(ctx)->running_replay) {
        pthread_mutex_lock(&g->lock);
        GuardBuf *b = find(g, p);
        pthread_mutex_unlock(&g->lock);
        if (!b) {
            fprintf(stderr, "guarded backend: a replayed graph reaches %p, which no live buffer holds\n", p);
            abort();
        }
    }
    return g->host + (c - g->dev);
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

static void graphs_free(GuardCtx *c);

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
    const char *graphs = getenv("GF_GUARDED_GRAPHS");
    c->off = graphs && strcmp(graphs, "0") == 0;
    ctx->impl = c;
    return GF_OK;
}

void guarded_ctx_free(KnCtx *ctx) {
    GuardCtx *c = gctx(ctx);
    if (!c) return;
    Guard *g = c->g;
    graphs_free(c);
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

GfStatus guard_synchronize(const KnCtx *ctx, GfError *err) {
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
    *b = (GuardBuf){g->top, len, 0, 0, 0, 0};
    g->top += len;
    return b;
}

/* A buffer of bytes into buf; counted in held (and peak) unless mapped
 * (host memory on a GPU). */
static GfStatus alloc_chunk(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, int mapped,
                            GfError *err) {
    not_recording(ctx, "alloc");
    Guard *g = guard_of(ctx);
    memset(buf, 0, sizeof *buf);
    size_t len = bytes > SIZE_MAX - g->page ? 0 : (bytes + g->page - 1) / g->page * g->page;
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = len && !gf_alloc_hook_refuses() ? take_chunk(g, len) : NULL;
    if (b) {
        b->used = 1;
        b->sealed = 0;
        b->bytes = mapped ? 0 : bytes;
        g->held += b->bytes;
        if (g->held > g->peak) g->peak = g->held;
        *buf = (KnBuffer){g->dev + b->off, bytes, ctx->device, ctx->index, dtype, 0};
    }
    pthread_mutex_unlock(&g->lock);
    if (!b)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s (%zu bytes)", what, bytes);
    return GF_OK;
}

GfStatus guard_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err) {
    return alloc_chunk(ctx, buf, bytes, dtype, what, 0, err);
}

/* As a GPU's mapped host memory: a chunk of the region whose device view
 * the host may read and write at the same addresses (until it is sealed:
 * then read only), and which ops take as any buffer. */
GfStatus guard_alloc_mapped(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what,
                            GfError *err) {
    GfStatus st = alloc_chunk(ctx, buf, bytes, dtype, what, 1, err);
    if (st) return st;
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, buf->data);
    int rc = mprotect(g->dev + b->off, b->len, PROT_READ | PROT_WRITE);
    b->mapped = rc == 0;
    pthread_mutex_unlock(&g->lock);
    if (rc != 0) {
        guard_free(ctx, buf);
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "cannot map %s (%zu bytes) for the host", what,
                            bytes);
    }
    buf->mapped = 1;
    return GF_OK;
}

void guard_free(const KnCtx *ctx, KnBuffer *buf) {
    Guard *g = guard_of(ctx);
    if (!buf || !buf->data) return;
    not_recording(ctx, "free");
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, buf->data);
    if (!b || g->dev + b->off != (char *)buf->data) abort(); /* not ours: a programming error */
    if (b->sealed && mprotect(g->host + b->off, b->len, PROT_READ | PROT_WRITE) != 0) abort();
    if (b->mapped && mprotect(g->dev + b->off, b->len, PROT_NONE) != 0) abort();
    fallocate(g->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)b->off, (off_t)b->len); /* pages back */
    b->used = b->sealed = b->mapped = 0;
    g->held -= b->bytes;
    b->bytes = 0;
    pthread_mutex_unlock(&g->lock);
    memset(buf, 0, sizeof *buf);
}

void guard_seal(const KnCtx *ctx, const KnBuffer *buf) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, buf->data);
    if (!b) abort();
    b->sealed = 1;
    if (mprotect(g->host + b->off, b->len, PROT_READ) != 0) abort();
    if (b->mapped && mprotect(g->dev + b->off, b->len, PROT_READ) != 0) abort();
    pthread_mutex_unlock(&g->lock);
}

void *guard_owned(const KnCtx *ctx, const void *p, size_t n) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    GuardBuf *b = find(g, p);
    if (!b || (const char *)p + n > g->dev + b->off + b->len) abort();
    pthread_mutex_unlock(&g->lock);
    return guard_hv(ctx, p);
}

void guard_upload(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    not_recording(ctx, "upload");
    if (n) memcpy(guard_owned(ctx, dst, n), src, n); /* a sealed buffer faults: weights are written before sealing */
}

void guard_download(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    not_recording(ctx, "download");
    if (n) memcpy(dst, guard_owned(ctx, src, n), n);
}


/* ---- recordings ---------------------------------------------------------------- */

/* *arr (of elem-byte elements, capacity *cap) holding at least n; 0 when
 * it cannot grow. */
static int grow(void *arr, size_t *cap, size_t n, size_t elem) {
    if (n <= *cap) return 1;
    size_t want = *cap ? 2 * *cap : 64;
    void *p = realloc(*(void **)arr, want * elem);
    if (!p) return 0;
    *(void **)arr = p;
    *cap = want;
    return 1;
}

static void tape_clear(GuardTape *t) {
    for (size_t i = 0; i < t->n; i++) free(t->calls[i].args);
    for (size_t i = 0; i < t->n_kept; i++) free(t->kept[i]);
    t->n = t->n_kept = 0;
}

static void tape_free(GuardTape *t) {
    tape_clear(t);
    free(t->calls);
    free(t->kept);
    memset(t, 0, sizeof *t);
}

static void tape_run(const KnCtx *ctx, const GuardTape *t) {
    for (size_t i = 0; i < t->n; i++) t->calls[i].exec(ctx, t->calls[i].args);
}

static void graphs_free(GuardCtx *c) {
    for (int i = 0; i < GUARD_GRAPH_SLOTS; i++) {
        free(c->slots[i].sig);
        tape_free(&c->slots[i].tape);
    }
    tape_free(&c->rec);
}

const void *guard_keep(const KnCtx *ctx, const void *p, size_t n) {
    GuardCtx *c = gctx(ctx);
    if (!c->recording || c->broken || !p || !n) return p;
    void *copy = malloc(n);
    if (!copy || !grow(&c->rec.kept, &c->rec.kept_cap, c->rec.n_kept + 1, sizeof *c->rec.kept)) {
        free(copy);
        c->broken = 1; /* the recording cannot hold it: it fails, and the caller submits again */
        return p;
    }
    memcpy(copy, p, n);
    c->rec.kept[c->rec.n_kept++] = copy;
    return copy;
}

void guard_submit(const KnCtx *ctx, GuardExec exec, const void *args, size_t bytes) {
    GuardCtx *c = gctx(ctx);
    if (c->replay) {
        fprintf(stderr, "guarded backend: an op submitted while a graph is replayed\n");
        abort();
    }
    if (!c->recording) {
        exec(ctx, args);
        return;
    }
    if (c->broken) return;
    void *copy = malloc(bytes);
    if (!copy || !grow(&c->rec.calls, &c->rec.cap, c->rec.n + 1, sizeof *c->rec.calls)) {
        free(copy);
        c->broken = 1;
        return;
    }
    memcpy(copy, args, bytes);
    c->rec.calls[c->rec.n++] = (GuardCall){exec, copy};
}

/* The slot of bucket: its own, else a free one, else slot bucket %
 * GUARD_GRAPH_SLOTS. */
static GuardSlot *slot_of(GuardCtx *c, int64_t bucket) {
    GuardSlot *free_slot = NULL;
    for (int i = 0; i < GUARD_GRAPH_SLOTS; i++) {
        if (c->slots[i].used && c->slots[i].bucket == bucket) return &c->slots[i];
        if (!c->slots[i].used && !free_slot) free_slot = &c->slots[i];
    }
    return free_slot ? free_slot : &c->slots[(uint64_t)bucket % GUARD_GRAPH_SLOTS];
}

/* s made bucket's, signed sig, with no graph yet; 0 when out of memory. */
static int slot_sign(GuardSlot *s, int64_t bucket, const void *sig, size_t sig_bytes) {
    void *copy = sig && sig_bytes ? malloc(sig_bytes) : NULL;
    if (sig && sig_bytes && !copy) return 0;
    if (copy) memcpy(copy, sig, sig_bytes);
    free(s->sig);
    tape_clear(&s->tape);
    s->bucket = bucket;
    s->sig = copy;
    s->bytes = copy ? sig_bytes : 0;
    s->used = 1;
    s->ready = 0;
    return 1;
}

int guard_graph_begin(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes) {
    GuardCtx *c = gctx(ctx);
    if (c->off) return KN_GRAPH_OFF;
    if (c->recording || c->replay) return KN_GRAPH_NONE;
    GuardSlot *s = slot_of(c, bucket);
    int same = s->used && s->bucket == bucket && sig && sig_bytes && s->bytes == sig_bytes &&
               memcmp(s->sig, sig, sig_bytes) == 0;
    if (same && (s->ready || c->fail_every > 0)) {
        c->replay = s;
        return KN_GRAPH_REPLAY;
    }
    if (!slot_sign(s, bucket, sig, sig_bytes)) return KN_GRAPH_NONE;
    c->recording = 1;
    c->slot = s;
    c->recordings++;
    c->broken = c->fail_every > 0 && c->recordings % (uint64_t)c->fail_every == 0;
    return KN_GRAPH_RECORD;
}

/* Runs the replay begun: 1 (nothing ran) in fail mode. */
static int replay_end(const KnCtx *ctx, GuardCtx *c) {
    GuardSlot *s = c->replay;
    c->replay = NULL;
    if (c->fail_every > 0) return 1;
    c->running_replay = 1;
    tape_run(ctx, &s->tape);
    c->running_replay = 0;
    return 0;
}

int guard_graph_end(const KnCtx *ctx) {
    GuardCtx *c = gctx(ctx);
    if (c->replay) return replay_end(ctx, c);
    if (!c->recording) return 1;
    GuardSlot *s = c->slot;
    c->recording = 0;
    c->slot = NULL;
    if (c->broken) {
        c->broken = 0;
        tape_clear(&c->rec);
        return 1;
    }
    GuardTape old = s->tape; /* the recording becomes the bucket's graph */
    s->tape = c->rec;
    c->rec = old;
    tape_clear(&c->rec);
    s->ready = 1;
    tape_run(ctx, &s->tape);
    return 0;
}

void guarded_memory(const KnCtx *ctx, uint64_t *held, uint64_t *peak) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    *held = g->held;
    *peak = g->peak;
    pthread_mutex_unlock(&g->lock);
}

void guarded_watch(const KnCtx *ctx, void (*fn)(void *user, const KnCall *call), void *user) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    g->watch = fn;
    g->watch_user = user;
    pthread_mutex_unlock(&g->lock);
}

void guard_called(const KnCtx *ctx, const KnCall *call) {
    Guard *g = guard_of(ctx);
    pthread_mutex_lock(&g->lock);
    if (g->watch) g->watch(g->watch_user, call);
    pthread_mutex_unlock(&g->lock);
}
