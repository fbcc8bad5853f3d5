/* worker.h - a background thread that polls for work until asked to stop:
 * the job worker and the export worker are each one. The thread function
 * loops while !worker_stopping(), and sleeps with worker_idle between polls
 * (woken at once by worker_stop).
 *
 * Threads: worker_start and worker_stop are called by the owner (the main
 * thread); worker_stopping and worker_idle by the worker thread (and
 * worker_stopping by anyone).
 */
#ifndef GF_WORKER_H
#define GF_WORKER_H

#include <pthread.h>
#include <stdatomic.h>

#include "base.h"

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_int stopping;
} Worker;

/* Starts fn(arg) on a new thread; `what` names it in the error. */
GfStatus worker_start(Worker *w, void *(*fn)(void *), void *arg, const char *what, GfError *err);
int worker_stopping(Worker *w);
/* Sleeps up to s seconds (1 when s <= 0), returning early on worker_stop. */
void worker_idle(Worker *w, double s);
/* Asks the thread to stop, wakes it and joins it. */
void worker_stop(Worker *w);

#endif
