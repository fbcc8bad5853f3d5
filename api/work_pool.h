/* work_pool.h - a few threads that run queued tasks, for work that must not
 * hold an HTTP thread (decoding and preprocessing a request's images): the
 * HTTP threads stay free to answer /healthz and everything else while it
 * runs.
 *
 * Bounded: submit refuses (GF_BUSY) once max_tasks are queued or running,
 * so a flood of work waits nowhere without limit. Tasks run in submission
 * order, each called exactly once: fn(arg, 0) normally, fn(arg, 1) when the
 * pool was closed before the task started (it should answer "shutting
 * down" and release what it holds). Threading: submit, stats and close
 * from any thread; free from one thread once nothing submits any more.
 */
#ifndef GF_WORK_POOL_H
#define GF_WORK_POOL_H

#include <stdint.h>

#include "base.h"

typedef struct WorkPool WorkPool;
typedef void (*WorkFn)(void *arg, int cancelled);

typedef struct {
    int queued;          /* waiting for a thread */
    int running;         /* being run */
    uint64_t done;       /* tasks run to the end (cancelled ones included) */
    uint64_t refused;    /* submits refused: the pool was full or closed */
} WorkPoolStats;

/* n_threads >= 1, max_tasks >= n_threads. NULL with err on failure. */
WorkPool *work_pool_new(int n_threads, int max_tasks, GfError *err);

/* Queues fn(arg). GF_BUSY (code "queue_full") when
 * max_tasks are queued or running, GF_NOT_READY ("shutting_down") after
 * close; fn is then not called and arg stays the caller's. */
GfStatus work_pool_submit(WorkPool *p, WorkFn fn, void *arg, GfError *err);

void work_pool_stats(WorkPool *p, WorkPoolStats *out);

/* From now on tasks that have not started run as fn(arg, 1), and submits
 * are refused. Idempotent. */
void work_pool_close(WorkPool *p);

/* Closes, runs what is still queued (cancelled), joins the threads, frees.
 * NULL is a no-op. */
void work_pool_free(WorkPool *p);

#endif
