/* cuda_graph.cu - a run of ops recorded as a CUDA graph and launched at
 * once (ops.h graph_begin / graph_end): the context's stream is captured;
 * the capture is instantiated once per bucket and, on later runs of that
 * bucket, the instantiated graph is updated in place (cudaGraphExecUpdate:
 * the launches' arguments change from run to run, the graph's shape rarely)
 * and launched. A decode step's few hundred small kernels then reach the
 * device in one submission, without a gap between them.
 *
 * A capture that cannot run runs nothing, and graph_end says so: an entry
 * refused while capturing (a transfer, an allocation, a synchronize, a
 * scratch that must grow), a launch that failed, or a capture, update,
 * instantiation or graph launch the runtime refused. The faults noted while
 * capturing belong to launches that never ran and are dropped; the caller's
 * second, eager submission notes its own. After GIVE_UP failed recordings in
 * a row the context stops recording; GF_CUDA_GRAPHS=0 never starts.
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
}

void cuda_graphs_free(CudaCtx *c) {
    CudaGraphs *g = &c->graphs;
    if (g->runs || g->failures)
        GF_LOGD("cuda:%d: %llu graphs launched (%llu instantiated, %llu updated), %llu recordings failed", c->device,
                (unsigned long long)g->runs, (unsigned long long)g->instantiations,
                (unsigned long long)g->updates, (unsigned long long)g->failures);
    for (int i = 0; i < CUDA_GRAPH_SLOTS; i++)
        if (g->slot[i].exec) cudaGraphExecDestroy(g->slot[i].exec);
    memset(g, 0, sizeof *g);
}

int cuda_refused(CudaCtx *c) {
    if (!c->graphs.capturing) return 0;
    c->graphs.broken = 1;
    return 1;
}

int cuda_graph_begin(const KnCtx *ctx) {
    CudaCtx *c = cuda_ctx(ctx);
    CudaGraphs *g = &c->graphs;
    if (g->off || g->capturing) return 0;
    if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    g->capturing = 1;
    g->broken = 0;
    g->fault_before = c->fault;
    return 1;
}

/* The slot holding bucket's graph, or the one to hold it: an empty slot,
 * else the least recently launched, its graph dropped. */
static CudaGraphSlot *slot_for(CudaGraphs *g, int64_t bucket) {
    CudaGraphSlot *victim = &g->slot[0];
    for (int i = 0; i < CUDA_GRAPH_SLOTS; i++) {
        CudaGraphSlot *s = &g->slot[i];
        if (s->exec && s->bucket == bucket) return s;
        uint64_t age = s->exec ? s->last_run + 1 : 0, best = victim->exec ? victim->last_run + 1 : 0;
        if (age < best) victim = s;
    }
    if (victim->exec) cudaGraphExecDestroy(victim->exec);
    victim->exec = NULL;
    victim->bucket = bucket;
    return victim;
}

/* graph made launchable in bucket's slot: the slot's graph updated to it,
 * or (a new bucket, or a graph of another shape) instantiated; NULL when
 * the runtime refuses both. */
static CudaGraphSlot *exec_for(CudaGraphs *g, int64_t bucket, cudaGraph_t graph) {
    CudaGraphSlot *s = slot_for(g, bucket);
    if (s->exec) {
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate(s->exec, graph, &info) == cudaSuccess) {
            g->updates++;
            return s;
        }
        cudaGetLastError();
        cudaGraphExecDestroy(s->exec);
        s->exec = NULL;
    }
    if (cudaGraphInstantiate(&s->exec, graph, 0) != cudaSuccess) {
        cudaGetLastError();
        s->exec = NULL;
        return NULL;
    }
    g->instantiations++;
    return s;
}

/* A recording that ran nothing: the faults its launches noted dropped. */
static int recording_failed(CudaCtx *c) {
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

int cuda_graph_end(const KnCtx *ctx, int64_t bucket) {
    CudaCtx *c = cuda_ctx(ctx);
    CudaGraphs *g = &c->graphs;
    if (!g->capturing) return 1;
    cudaGraph_t graph = NULL;
    cudaError_t rc = cudaStreamEndCapture(c->stream, &graph);
    g->capturing = 0;
    int runnable = rc == cudaSuccess && graph && !g->broken && c->fault == g->fault_before;
    CudaGraphSlot *s = runnable ? exec_for(g, bucket, graph) : NULL;
    if (graph) cudaGraphDestroy(graph);
    if (!s || cudaGraphLaunch(s->exec, c->stream) != cudaSuccess) return recording_failed(c);
    s->last_run = ++g->runs;
    g->streak = 0;
    return 0;
}
