/* worker.c - a polling background thread with a prompt stop. */
#include "worker.h"

#include <errno.h>
#include <math.h>
#include <string.h>
#include <time.h>

GfStatus worker_start(Worker *w, void *(*fn)(void *), void *arg, const char *what, GfError *err) {
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->wake, NULL);
    atomic_init(&w->stopping, 0);
    int e = pthread_create(&w->thread, NULL, fn, arg);
    if (e == 0) return GF_OK;
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "cannot start the %s: %s", what, strerror(e));
}

int worker_stopping(Worker *w) { return atomic_load(&w->stopping); }

void worker_idle(Worker *w, double s) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    if (s <= 0) s = 1.0;
    until.tv_sec += (time_t)s;
    until.tv_nsec += (long)((s - floor(s)) * 1e9);
    if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&w->lock);
    if (!atomic_load(&w->stopping)) pthread_cond_timedwait(&w->wake, &w->lock, &until);
    pthread_mutex_unlock(&w->lock);
}

void worker_stop(Worker *w) {
    pthread_mutex_lock(&w->lock);
    atomic_store(&w->stopping, 1);
    pthread_cond_broadcast(&w->wake);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
}
