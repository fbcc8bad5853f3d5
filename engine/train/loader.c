/* loader.c - the example loader's thread and its two slots (loader.h). */
#include "loader.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    TrainExample ex;
    TrainSet *set;            /* what the slot holds or is asked for; NULL = nothing */
    size_t index;
    int ready;                /* prepared (st and err tell how) */
    GfStatus st;
    GfError err;
} Slot;

struct ExampleLoader {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;        /* work asked, work done */
    Slot slot[2];
    int out;                  /* the slot handed out; the other is the loader's */
    int busy;                 /* the loader's slot is being prepared */
    int stopping;
    LoaderStats stats;
};

static void *loader_main(void *arg) {
    ExampleLoader *l = arg;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        Slot *s = &l->slot[1 - l->out];
        while (!l->stopping && !(s->set && !s->ready)) {
            pthread_cond_wait(&l->cv, &l->mu);
            s = &l->slot[1 - l->out];
        }
        if (l->stopping) break;
        l->busy = 1;
        TrainSet *set = s->set;
        size_t index = s->index;
        pthread_mutex_unlock(&l->mu);
        GfError err;
        gf_error_clear(&err);
        GfStatus st = trainset_example(set, index, &s->ex, &err); /* the slot is the loader's while busy */
        pthread_mutex_lock(&l->mu);
        s->st = st;
        s->err = err;
        s->ready = 1;
        l->busy = 0;
        pthread_cond_broadcast(&l->cv);
    }
    pthread_mutex_unlock(&l->mu);
    return NULL;
}

GfStatus loader_start(ExampleLoader **out, GfError *err) {
    *out = NULL;
    ExampleLoader *l = gf_calloc(1, sizeof *l, err);
    if (!l) return GF_NO_MEMORY;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
    if (pthread_create(&l->thread, NULL, loader_main, l) != 0) {
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
    pthread_mutex_lock(&l->mu);
    l->stopping = 1;
    pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->thread, NULL);
    for (int i = 0; i < 2; i++) train_example_free(&l->slot[i].ex);
    pthread_cond_destroy(&l->cv);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

/* Under mu: the loader's slot asked for (set, i), once it is free. */
static Slot *ask(ExampleLoader *l, TrainSet *set, size_t i) {
    while (l->busy) pthread_cond_wait(&l->cv, &l->mu);
    Slot *s = &l->slot[1 - l->out];
    if (s->set != set || s->index != i) {
        s->set = set;
        s->index = i;
        s->ready = 0;
        pthread_cond_broadcast(&l->cv);
    }
    return s;
}

void loader_prefetch(ExampleLoader *l, TrainSet *set, size_t i) {
    pthread_mutex_lock(&l->mu);
    ask(l, set, i);
    pthread_mutex_unlock(&l->mu);
}

GfStatus loader_get(ExampleLoader *l, TrainSet *set, size_t i, const TrainExample **ex, GfError *err) {
    pthread_mutex_lock(&l->mu);
    Slot *s = &l->slot[1 - l->out];
    int ahead = s->set == set && s->index == i;
    s = ask(l, set, i);
    while (!s->ready) pthread_cond_wait(&l->cv, &l->mu);
    if (ahead) l->stats.prefetched++;
    else l->stats.on_demand++;
    l->out = 1 - l->out; /* hand it out; the other slot is the loader's again */
    Slot *next = &l->slot[1 - l->out];
    next->set = NULL;
    next->ready = 0;
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
