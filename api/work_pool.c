/* work_pool.c - the bounded task pool of work_pool.h: a ring of pending
 * tasks under one mutex, worker threads waiting on a condition variable. */
#include <pthread.h>
#include <stdlib.h>

#include "work_pool.h"

typedef struct {
    WorkFn fn;
    void *arg;
} Task;

struct WorkPool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Task *ring;             /* max_tasks slots */
    int max_tasks, head, queued, running;
    int closed;
    uint64_t done, refused;
    pthread_t *threads;
    int n_threads;          /* started */
};

static void *worker(void *cls) {
    WorkPool *p = cls;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->queued == 0 && !p->closed) pthread_cond_wait(&p->cv, &p->mu);
        if (p->queued == 0) break; /* closed and drained */
        Task t = p->ring[p->head];
        p->head = (p->head + 1) % p->max_tasks;
        p->queued--;
        p->running++;
        int cancelled = p->closed;
        pthread_mutex_unlock(&p->mu);
        t.fn(t.arg, cancelled);
        pthread_mutex_lock(&p->mu);
        p->running--;
        p->done++;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

WorkPool *work_pool_new(int n_threads, int max_tasks, GfError *err) {
    if (n_threads < 1 || max_tasks < n_threads) {
        gf_error_set(err, GF_INVALID, "invalid_value", NULL, "a work pool needs 1+ threads and at least as many task slots");
        return NULL;
    }
    WorkPool *p = gf_calloc(1, sizeof *p, err);
    if (!p) return NULL;
    p->ring = gf_calloc((size_t)max_tasks, sizeof *p->ring, err);
    p->threads = p->ring ? gf_calloc((size_t)n_threads, sizeof *p->threads, err) : NULL;
    if (!p->threads) {
        free(p->ring);
        free(p);
        return NULL;
    }
    p->max_tasks = max_tasks;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (; p->n_threads < n_threads; p->n_threads++)
        if (pthread_create(&p->threads[p->n_threads], NULL, worker, p) != 0) {
            gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "cannot start work pool thread %d", p->n_threads);
            work_pool_free(p);
            return NULL;
        }
    return p;
}

GfStatus work_pool_submit(WorkPool *p, WorkFn fn, void *arg, GfError *err) {
    pthread_mutex_lock(&p->mu);
    GfStatus st = GF_OK;
    if (p->closed) {
        st = gf_error_set(err, GF_NOT_READY, "shutting_down", NULL, "the server is shutting down");
    } else if (p->queued + p->running >= p->max_tasks) {
        st = gf_error_set(err, GF_BUSY, "queue_full", NULL, "%d requests' images are already being decoded or waiting to be; retry later",
                          p->queued + p->running);
    } else {
        p->ring[(p->head + p->queued) % p->max_tasks] = (Task){fn, arg};
        p->queued++;
        pthread_cond_signal(&p->cv);
    }
    if (st) p->refused++;
    pthread_mutex_unlock(&p->mu);
    return st;
}

void work_pool_stats(WorkPool *p, WorkPoolStats *out) {
    pthread_mutex_lock(&p->mu);
    *out = (WorkPoolStats){p->queued, p->running, p->done, p->refused};
    pthread_mutex_unlock(&p->mu);
}

void work_pool_close(WorkPool *p) {
    pthread_mutex_lock(&p->mu);
    p->closed = 1;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

void work_pool_free(WorkPool *p) {
    if (!p) return;
    work_pool_close(p);
    for (int i = 0; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->ring);
    free(p);
}
