/* loader.c - the example loader's threads and slots (loader.h).
 *
 * A slot is FREE, QUEUED (announced, waiting for a thread), BUSY (being
 * prepared, by a loader thread or by the caller of loader_get), READY or
 * OUT (handed out). Loader threads take the queued slot announced first.
 * An announced example that loader_get passes over (the trainer asked for
 * a later one) is dropped: a queued or ready slot is freed at once, a busy
 * one when its thread is done (`drop`). */
#include "loader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { FREE, QUEUED, BUSY, READY, OUT };

typedef struct {
    TrainExample ex;
    TrainSet *set;            /* the example the slot holds or is asked for */
    size_t index;
    int state;
    int drop;                 /* BUSY, passed over: freed once prepared */
    uint64_t seq;             /* announcement order */
    GfStatus st;
    GfError err;
} Slot;

struct ExampleLoader {
    pthread_t threads[LOADER_THREADS];
    int n_threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;        /* work queued, work done */
    Slot slot[LOADER_AHEAD + 1];
    uint64_t next_seq;
    int stopping;
    LoaderStats stats;
};

/* Under mu: the queued slot announced first, or NULL. */
static Slot *first_queued(ExampleLoader *l) {
    Slot *best = NULL;
    for (int k = 0; k <= LOADER_AHEAD; k++)
        if (l->slot[k].state == QUEUED && (!best || l->slot[k].seq < best->seq)) best = &l->slot[k];
    return best;
}

/* Prepares s (BUSY, so it is this thread's) outside mu, then marks it
 * READY, or FREE when it was passed over meanwhile. Called with mu held. */
static void prepare(ExampleLoader *l, Slot *s) {
    TrainSet *set = s->set;
    size_t index = s->index;
    pthread_mutex_unlock(&l->mu);
    GfError err;
    gf_error_clear(&err);
    GfStatus st = trainset_example(set, index, &s->ex, &err);
    pthread_mutex_lock(&l->mu);
    s->st = st;
    s->err = err;
    s->state = s->drop ? FREE : READY;
    s->drop = 0;
    pthread_cond_broadcast(&l->cv);
}

static void *loader_main(void *arg) {
    ExampleLoader *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        Slot *s = NULL;
        while (!l->stopping && !(s = first_queued(l))) pthread_cond_wait(&l->cv, &l->mu);
        if (l->stopping) break;
        s->state = BUSY;
        prepare(l, s);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

static void stop_threads(ExampleLoader *l) {
    pthread_mutex_lock(&l->mu);
    l->stopping = 1;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    for (int k = 0; k < l->n_threads; k++) pthread_join(l->threads[k], NULL);
}

/* LOADER_THREADS, but a core left to the thread that drives the engine
 * (the trainer's: on a GPU it launches the kernels, and a busy machine
 * makes it wait to be scheduled), and at least one. */
static int loader_threads(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores - 1 < 1 ? 1 : cores - 1 < LOADER_THREADS ? (int)cores - 1 : LOADER_THREADS;
}

GfStatus loader_start(ExampleLoader **out, GfError *err) {
    *out = NULL;
    ExampleLoader *l = gf_calloc(1, sizeof *l, err);
    if (!l) return GF_NO_MEMORY;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    for (int k = 0; k < loader_threads(); k++) {
        if (pthread_create(&l->threads[k], NULL, loader_main, l) != 0) break;
        l->n_threads++;
    }
    if (l->n_threads == 0) { /* with fewer, the examples are prepared by fewer */
        pthread_cond_destroy(&l->cv);
        pthread_mutex_destroy(&l->mu);
        free(l);
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "cannot start the example loader");
    }
    *out = l;
    return GF_OK;
}

void loader_stop(ExampleLoader *l) {
    if (!l) return;
    stop_threads(l);
    for (int k = 0; k <= LOADER_AHEAD; k++) train_example_free(&l->slot[k].ex);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

/* Under mu: the slot holding or preparing (set, i), handed out ones aside. */
static Slot *find(ExampleLoader *l, TrainSet *set, size_t i) {
    for (int k = 0; k <= LOADER_AHEAD; k++) {
        Slot *s = &l->slot[k];
        if (s->state != FREE && s->state != OUT && !s->drop && s->set == set && s->index == i) return s;
    }
    return NULL;
}

static Slot *find_free(ExampleLoader *l) {
    for (int k = 0; k <= LOADER_AHEAD; k++)
        if (l->slot[k].state == FREE) return &l->slot[k];
    return NULL;
}

void loader_prefetch(ExampleLoader *l, TrainSet *set, size_t i) {
    pthread_mutex_lock(&l->mu);
    Slot *s = find(l, set, i) ? NULL : find_free(l);
    if (s) { /* no free slot: it is prepared when asked for */
        s->set = set;
        s->index = i;
        s->seq = l->next_seq++;
        s->state = QUEUED;
        pthread_cond_broadcast(&l->cv);
    }
    pthread_mutex_unlock(&l->mu);
}

/* Under mu: the slots announced before `seq` are passed over. */
static void drop_before(ExampleLoader *l, uint64_t seq) {
    for (int k = 0; k <= LOADER_AHEAD; k++) {
        Slot *s = &l->slot[k];
        if (s->seq >= seq || s->state == FREE || s->state == OUT) continue;
        if (s->state == BUSY) s->drop = 1;
        else s->state = FREE;
    }
}

/* Under mu: a slot for an example nobody announced, taken by the caller:
 * a free one, else one announced last that no thread is preparing (there
 * is one: at most LOADER_THREADS < LOADER_AHEAD are busy). */
static Slot *claim(ExampleLoader *l) {
    Slot *s = find_free(l);
    for (int k = 0; !s && k <= LOADER_AHEAD; k++) {
        Slot *c = &l->slot[k];
        if ((c->state == QUEUED || c->state == READY) && (!s || c->seq > s->seq)) s = c;
    }
    return s;
}

GfStatus loader_get(ExampleLoader *l, TrainSet *set, size_t i, const TrainExample **ex, GfError *err) {
    pthread_mutex_lock(&l->mu);
    for (int k = 0; k <= LOADER_AHEAD; k++)
        if (l->slot[k].state == OUT) l->slot[k].state = FREE; /* the example handed out before */
    Slot *s = find(l, set, i);
    if (s) {
        l->stats.prefetched++;
        drop_before(l, s->seq);
        while (s->state != READY) pthread_cond_wait(&l->cv, &l->mu);
    } else {
        l->stats.on_demand++;
        s = claim(l);
        s->set = set;
        s->index = i;
        s->seq = l->next_seq++;
        s->state = BUSY;
        prepare(l, s);
    }
    s->state = OUT;
    GfStatus st = s->st;
    if (st) *err = s->err;
    pthread_mutex_unlock(&l->mu);
    *ex = &s->ex;
    return st;
}

void loader_stats(ExampleLoader *l, LoaderStats *out) {
    pthread_mutex_lock(&l->mu);
    *out = l->stats;
    pthread_mutex_unlock(&l->mu);
}
