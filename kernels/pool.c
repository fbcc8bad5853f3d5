/* pool.c - condition-variable thread pool with a generation counter. */
#include "pool.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

struct KnPool {
    int n;                    /* threads including the caller */
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t start, done;
    long generation;          /* bumped for each run */
    int pending;              /* workers still running the current task */
    int stop;
    KnTask fn;
    void *ctx;
};

typedef struct {
    KnPool *pool;
    int ith;
} Worker;

static void *worker_main(void *arg) {
    Worker *w = arg;
    KnPool *p = w->pool;
    long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->lock);
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->start, &p->lock);
        if (p->stop) { pthread_mutex_unlock(&p->lock); break; }
        seen = p->generation;
        KnTask fn = p->fn;
        void *ctx = p->ctx;
        pthread_mutex_unlock(&p->lock);
        fn(ctx, w->ith, p->n);
        pthread_mutex_lock(&p->lock);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->lock);
    }
    free(w);
    return NULL;
}

KnPool *kn_pool_new(int n_threads, GfError *err) {
    if (n_threads <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    KnPool *p = gf_calloc(1, sizeof *p, err);
    if (!p) return NULL;
    p->n = n_threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = gf_calloc((size_t)n_threads, sizeof *p->threads, err);
    if (!p->threads) { free(p); return NULL; }
    for (int i = 1; i < n_threads; i++) {
        Worker *w = gf_malloc(sizeof *w, NULL);
        if (w) {
            w->pool = p;
            w->ith = i;
        }
        if (!w || pthread_create(&p->threads[i], NULL, worker_main, w) != 0) {
            free(w);
            p->n = i;
            kn_pool_free(p);
            gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "cannot start compute threads");
            return NULL;
        }
    }
    return p;
}

void kn_pool_free(KnPool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    free(p);
}

int kn_pool_size(const KnPool *p) { return p ? p->n : 1; }

void kn_pool_run(KnPool *p, KnTask fn, void *ctx) {
    if (!p || p->n == 1) { fn(ctx, 0, 1); return; }
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->pending = p->n - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->lock);
    fn(ctx, 0, p->n);
    pthread_mutex_lock(&p->lock);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

void kn_split(long n, int ith, int nth, long *lo, long *hi) {
    long per = n / nth, extra = n % nth;
    *lo = ith * per + (ith < extra ? ith : extra);
    *hi = *lo + per + (ith < extra ? 1 : 0);
}
