/* cuda_graph.cu - a run of ops recorded as a CUDA graph and launched at
 * once, then launched again without recording (ops.h graph_begin /
 * graph_end).
 *
 * Recording captures the context's stream. The capture is instantiated once
 * per bucket; a later recording of the bucket updates the instantiated
 * graph in place (cudaGraphExecUpdate), or instantiates it anew when its
 * shape changed. Each bucket's graph keeps the signature it was recorded
 * under: a run with an equal signature replays it (the caller promises the
 * same launches), so a decode step whose batch did not change costs the
 * host one launch instead of a few hundred. The caller's promise cannot
 * cover the context's own scratch: a graph recorded before the scratch
 * last moved is recorded again, never replayed.
 *
 * A recording that cannot run runs nothing, and graph_end says so: an entry
 * refused while capturing (a transfer, an allocation, a synchronize, a
 * scratch that must grow), a launch that failed, or a capture, update,
 * instantiation or graph launch the runtime refused. The faults noted while
 * capturing belong to launches that never ran and are dropped; the caller's
 * own submission notes its own. After GIVE_UP failed recordings in a row
 * the context stops recording. GF_CUDA_GRAPHS=0 never records;
 * GF_CUDA_GRAPHS=record records every run and never replays.
 *
 * The capture is thread-local (cudaStreamCaptureModeThreadLocal): other
 * contexts on the device (a training job, an adapter upload) go on as
 * usual on their own threads and streams. */
#include <stdlib.h>
#include <string.h>

#include "cuda_impl.h"

#define GIVE_UP 8

void cuda_graphs_init(CudaCtx *c) {
    const char *e = getenv("GF_CUDA_GRAPHS");
    memset(&c->graphs, 0, sizeof c->graphs);
    c->graphs.off = e && strcmp(e, "0") == 0;
    c->graphs.no_replay = e && strcmp(e, "record") == 0;
}

/* s's graph and signature dropped. */
static void slot_clear(CudaGraphSlot *s) {
    if (s->exec) cudaGraphExecDestroy(s->exec);
    s->exec = NULL;
    s->sig_bytes = 0;
}

void cuda_graphs_free(CudaCtx *c) {
    CudaGraphs *g = &c->graphs;
    if (g->capturing) { /* a recording never ended: dropped, never run */
        cudaGraph_t graph = NULL;
        if (cudaStreamEndCapture(c->stream, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
        cudaGetLastError();
    }
    if (g->runs || g->failures)
        GF_LOGD("cuda:%d: %llu graphs launched (%llu replayed, %llu instantiated, %llu updated), %llu recordings failed",
                c->device, (unsigned long long)g->runs, (unsigned long long)g->replays,
                (unsigned long long)g->instantiations, (unsigned long long)g->updates,
                (unsigned long long)g->failures);
    for (int i = 0; i < CUDA_GRAPH_SLOTS; i++) {
        slot_clear(&g->slot[i]);
        free(g->slot[i].sig);
    }
    free(g->sig);
    memset(g, 0, sizeof *g);
}

int cuda_refused(CudaCtx *c) {
    if (!c->graphs.capturing) return 0;
    c->graphs.broken = 1;
    return 1;
}

/* The slot holding bucket's graph, or NULL. */
static CudaGraphSlot *slot_of(CudaGraphs *g, int64_t bucket) {
    for (int i = 0; i < CUDA_GRAPH_SLOTS; i++)
        if (g->slot[i].exec && g->slot[i].bucket == bucket) return &g->slot[i];
    return NULL;
}

/* The slot to hold bucket's graph: its own, else an empty one, else the
 * least recently launched, its graph dropped. */
static CudaGraphSlot *slot_for(CudaGraphs *g, int64_t bucket) {
    CudaGraphSlot *s = slot_of(g, bucket), *victim = &g->slot[0];
    if (s) return s;
    for (int i = 1; i < CUDA_GRAPH_SLOTS; i++) {
        CudaGraphSlot *t = &g->slot[i];
        uint64_t age = t->exec ? t->last_run + 1 : 0, best = victim->exec ? victim->last_run + 1 : 0;
        if (age < best) victim = t;
    }
    slot_clear(victim);
    victim->bucket = bucket;
    return victim;
}

/* sig[n] kept as the recording's (NULL when it cannot be copied: the
 * recording is then never replayed). */
static void keep_sig(CudaGraphs *g, const void *sig, size_t n) {
    g->sig_bytes = 0;
    if (!sig || !n || g->no_replay) return;
    if (n > g->sig_cap) {
        void *p = realloc(g->sig, n);
        if (!p) return;
        g->sig = p;
        g->sig_cap = n;
    }
    memcpy(g->sig, sig, n);
    g->sig_bytes = n;
}

int cuda_graph_begin(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes) {
    CudaCtx *c = cuda_ctx(ctx);
    CudaGraphs *g = &c->graphs;
    if (g->off) return KN_GRAPH_OFF;
    if (g->capturing || g->replay) return KN_GRAPH_NONE;
    CudaGraphSlot *s = slot_of(g, bucket);
    if (s && sig && sig_bytes && s->sig_bytes == sig_bytes && s->scratch_gen == c->scratch_gen &&
        memcmp(s->sig, sig, sig_bytes) == 0) {
        g->replay = s;
        return KN_GRAPH_REPLAY;
    }
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return KN_GRAPH_NONE;
    }
    g->capturing = 1;
    g->broken = 0;
    g->fault_before = c->fault;
    g->bucket = bucket;
    keep_sig(g, sig, sig_bytes);
    return KN_GRAPH_RECORD;
}

/* graph made launchable in bucket's slot: the slot's graph updated to it,
 * or (a new bucket, or a graph of another shape) instantiated; NULL when
 * the runtime refuses both. The slot's signature is the recording's. */
static CudaGraphSlot *exec_for(CudaCtx *c, int64_t bucket, cudaGraph_t graph) {
    CudaGraphs *g = &c->graphs;
    CudaGraphSlot *s = slot_for(g, bucket);
    s->sig_bytes = 0;
    s->scratch_gen = c->scratch_gen; /* the scratch cannot move while recording */
    if (s->exec) {
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate(s->exec, graph, &info) == cudaSuccess) {
            g->updates++;
        } else {
            cudaGetLastError();
            slot_clear(s);
        }
    }
    if (!s->exec) {
        if (cudaGraphInstantiate(&s->exec, graph, 0) != cudaSuccess) {
            cudaGetLastError();
            s->exec = NULL;
            return NULL;
        }
        g->instantiations++;
    }
    if (g->sig_bytes) { /* the recording's signature, swapped in (no copy) */
        void *p = s->sig;
        size_t cap = s->sig_cap;
        s->sig = g->sig;
        s->sig_cap = g->sig_cap;
        s->sig_bytes = g->sig_bytes;
        g->sig = p;
        g->sig_cap = cap;
        g->sig_bytes = 0;
    }
    return s;
}

/* A recording or replay that ran nothing: the faults its launches noted
 * dropped. */
static int run_failed(CudaCtx *c) {
    CudaGraphs *g = &c->graphs;
    cudaGetLastError();
    if (g->fault_before == cudaSuccess) {
        c->fault = cudaSuccess;
        c->fault_where[0] = '\0';
    }
    g->failures++;
    if (++g->streak >= GIVE_UP) {
        g->off = 1;
        GF_LOGI("cuda:%d: %d graph recordings in a row could not run; running ops one by one from now on",
                c->device, GIVE_UP);
    }
    return 1;
}

/* s's graph launched on the stream; 0, or 1 with it dropped when the launch
 * is refused. */
static int launch(CudaCtx *c, CudaGraphSlot *s) {
    CudaGraphs *g = &c->graphs;
    if (cudaGraphLaunch(s->exec, c->stream) != cudaSuccess) {
        slot_clear(s);
        return run_failed(c);
    }
    s->last_run = ++g->runs;
    g->streak = 0;
    return 0;
}

int cuda_graph_end(const KnCtx *ctx) {
    CudaCtx *c = cuda_ctx(ctx);
    CudaGraphs *g = &c->graphs;
    if (g->replay) {
        CudaGraphSlot *s = g->replay;
        g->replay = NULL;
        g->fault_before = c->fault;
        g->replays++;
        return launch(c, s);
    }
    if (!g->capturing) return 1;
    cudaGraph_t graph = NULL;
    cudaError_t rc = cudaStreamEndCapture(c->stream, &graph);
    g->capturing = 0;
    int runnable = rc == cudaSuccess && graph && !g->broken && c->fault == g->fault_before;
    CudaGraphSlot *s = runnable ? exec_for(c, g->bucket, graph) : NULL;
    if (graph) cudaGraphDestroy(graph);
    return s ? launch(c, s) : run_failed(c);
}
