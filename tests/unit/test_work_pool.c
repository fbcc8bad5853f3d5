/* test_work_pool.c - the bounded pool that decodes requests' images off the
 * HTTP threads: it refuses past its bound (and counts it), runs every task
 * exactly once in order, and after close runs the tasks that had not
 * started as cancelled, refusing new ones. */
#include <pthread.h>
#include <stdlib.h>

#include "base.h"
#include "check.h"
#include "work_pool.h"

/* Tasks that block until the test opens the gate. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int open;
    int started, runs[16], cancelled[16], order[16], n_order;
} Gate;

typedef struct {
    Gate *g;
    int id;
} Arg;

static void task(void *cls, int cancelled) {
    Arg *a = cls;
    Gate *g = a->g;
    pthread_mutex_lock(&g->mu);
    g->runs[a->id]++;
    g->cancelled[a->id] = cancelled;
    g->order[g->n_order++] = a->id;
    if (!cancelled) {
        g->started++;
        pthread_cond_broadcast(&g->cv);
        while (!g->open) pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
}

static void wait_started(Gate *g, int n) {
    pthread_mutex_lock(&g->mu);
    while (g->started < n) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static void open_gate(Gate *g) {
    pthread_mutex_lock(&g->mu);
    g->open = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static Gate *gate_new(void) {
    Gate *g = calloc(1, sizeof *g);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    return g;
}

static void gate_free(Gate *g) {
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    free(g);
}

/* A pool of n_threads and n_slots given n_submit gated tasks (args[i] is
 * task i), once every thread has started one; NULL if it cannot start. */
static WorkPool *pool_busy(int n_threads, int n_slots, int n_submit, Gate *g, Arg *args) {
    GfError err;
    WorkPool *p = work_pool_new(n_threads, n_slots, &err);
    CHECK(p != NULL, "new: %s", err.message);
    if (!p) return NULL;
    for (int i = 0; i < n_submit; i++) CHECK_STATUS(work_pool_submit(p, task, &args[i], &err), GF_OK, err);
    wait_started(g, n_threads);
    return p;
}

/* Two threads, four slots: the fifth submit is refused while four are in. */
static void test_bound_and_order(void) {
    GfError err;
    Gate *g = gate_new();
    Arg args[8];
    for (int i = 0; i < 8; i++) args[i] = (Arg){g, i};
    WorkPool *p = pool_busy(2, 4, 4, g, args);
    if (!p) { gate_free(g); return; }
    WorkPoolStats s;
    work_pool_stats(p, &s);
    CHECK(s.running == 2 && s.queued == 2 && s.done == 0 && s.refused == 0, "stats %d %d %llu %llu", s.running,
          s.queued, (unsigned long long)s.done, (unsigned long long)s.refused);
    CHECK_STATUS(work_pool_submit(p, task, &args[4], &err), GF_BUSY, err);
    CHECK(strcmp(err.code, "queue_full") == 0, "code %s", err.code);
    work_pool_stats(p, &s);
    CHECK(s.refused == 1, "refused %llu", (unsigned long long)s.refused);
    open_gate(g);
    work_pool_free(p); /* closes: nothing was waiting unstarted by then, or it ran cancelled */
    int ran = 0;
    for (int i = 0; i < 4; i++) ran += g->runs[i] == 1;
    CHECK(ran == 4 && g->runs[4] == 0, "each submitted task once, the refused one never (%d)", ran);
    CHECK(g->n_order == 4, "%d runs", g->n_order);
    gate_free(g);
}

/* One thread busy: close turns the queued tasks into cancelled runs, in
 * order, and refuses new submits with shutting_down. */
static void test_close_cancels_queued(void) {
    GfError err;
    Gate *g = gate_new();
    Arg args[4];
    for (int i = 0; i < 4; i++) args[i] = (Arg){g, i};
    WorkPool *p = pool_busy(1, 4, 3, g, args);
    if (!p) { gate_free(g); return; }
    work_pool_close(p);
    CHECK_STATUS(work_pool_submit(p, task, &args[3], &err), GF_NOT_READY, err);
    CHECK(strcmp(err.code, "shutting_down") == 0, "code %s", err.code);
    open_gate(g);
    work_pool_free(p);
    CHECK(g->runs[0] == 1 && !g->cancelled[0], "the running task finished normally");
    CHECK(g->runs[1] == 1 && g->cancelled[1] && g->runs[2] == 1 && g->cancelled[2], "queued tasks ran cancelled");
    CHECK(g->runs[3] == 0, "the refused task never ran");
    CHECK(g->n_order == 3 && g->order[1] == 1 && g->order[2] == 2, "in submission order");
    gate_free(g);
}

static void test_bad_sizes(void) {
    GfError err;
    CHECK(work_pool_new(0, 4, &err) == NULL && err.status == GF_INVALID, "no threads");
    CHECK(work_pool_new(4, 2, &err) == NULL && err.status == GF_INVALID, "fewer slots than threads");
    work_pool_free(NULL);
}

int main(void) {
    test_bound_and_order();
    test_close_cancels_queued();
    test_bad_sizes();
    return check_done("test_work_pool");
}
