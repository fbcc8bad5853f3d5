/* test_pool.c - the compute thread pool (pool.h): every run calls its task
 * once on each thread with the right ith and nth, and what the workers
 * wrote is visible to the caller when kn_pool_run returns. Runs back to
 * back (the workers still spinning), runs after a pause longer than any
 * spin (the workers asleep: a lost wake-up would hang the test, which
 * ctest's timeout reports), tasks of uneven length (the caller waiting on
 * a slow worker, then asleep on it), more threads than cores (no
 * spinning), one thread, and a pool freed while its workers sleep. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../unit/check.h"
#include "pool.h"

enum { MAX_THREADS = 16 };

typedef struct {
    long round;
    int nth_seen[MAX_THREADS];
    long wrote[MAX_THREADS];      /* plain stores: kn_pool_run must publish them */
    atomic_int calls[MAX_THREADS];
    int slow_ith;                 /* this thread sleeps slow_us first (-1: none) */
    int slow_us;
} Task;

static void task(void *p, int ith, int nth) {
    Task *t = p;
    if (ith == t->slow_ith) usleep((useconds_t)t->slow_us);
    t->nth_seen[ith] = nth;
    t->wrote[ith] = t->round * 1000 + ith;
    atomic_fetch_add(&t->calls[ith], 1);
}

/* rounds runs on a pool of n threads; pause_us between runs; every slow_every-th
 * run has thread (round % n) sleep slow_us */
static void run_rounds(int n, int rounds, int pause_us, int slow_every, int slow_us, const char *what) {
    GfError err = {0};
    KnPool *pool = kn_pool_new(n, &err);
    CHECK(pool != NULL, "%s: pool of %d threads: %s", what, n, err.message);
    if (!pool) return;
    CHECK(kn_pool_size(pool) == n, "%s: kn_pool_size %d, want %d", what, kn_pool_size(pool), n);
    Task t;
    memset(&t, 0, sizeof t);
    int bad_calls = 0, bad_nth = 0, bad_wrote = 0;
    for (int r = 0; r < rounds; r++) {
        t.round = r + 1;
        t.slow_ith = slow_every && r % slow_every == 0 ? r % n : -1;
        t.slow_us = slow_us;
        for (int i = 0; i < n; i++) atomic_store(&t.calls[i], 0);
        kn_pool_run(pool, task, &t);
        for (int i = 0; i < n; i++) {
            bad_calls += atomic_load(&t.calls[i]) != 1;
            bad_nth += t.nth_seen[i] != n;
            bad_wrote += t.wrote[i] != t.round * 1000 + i;
        }
        if (pause_us) usleep((useconds_t)pause_us);
    }
    CHECK(bad_calls == 0, "%s: each of %d threads ran each of %d tasks once (%d misses)", what, n, rounds, bad_calls);
    CHECK(bad_nth == 0, "%s: every call was told nth = %d (%d not)", what, n, bad_nth);
    CHECK(bad_wrote == 0, "%s: the workers' writes were visible when the run returned (%d not)", what, bad_wrote);
    if (pause_us == 0) usleep(5000); /* let the workers fall asleep before the pool is freed */
    kn_pool_free(pool);
}

static void test_split(void) {
    int bad = 0;
    for (long n = 0; n < 40; n++)
        for (int nth = 1; nth <= 7; nth++) {
            long next = 0;
            for (int ith = 0; ith < nth; ith++) {
                long lo, hi;
                kn_split(n, ith, nth, &lo, &hi);
                bad += lo != next || hi < lo || hi - lo > n / nth + 1;
                next = hi;
            }
            bad += next != n;
        }
    CHECK(bad == 0, "kn_split covers [0, n) in order, ranges within one of each other (%d bad)", bad);
}

int main(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int n = cores >= 2 ? (cores < 4 ? (int)cores : 4) : 2;
    run_rounds(n, 20000, 0, 0, 0, "back to back");
    run_rounds(n, 40, 2000, 0, 0, "after pauses");
    run_rounds(n, 200, 0, 10, 3000, "a slow thread");
    if (cores + 2 <= MAX_THREADS) run_rounds((int)cores + 2, 2000, 0, 0, 0, "more threads than cores");
    else printf("test_pool: %ld cores, more than this test's %d threads: no oversubscribed pool\n", cores, MAX_THREADS);
    run_rounds(1, 100, 0, 0, 0, "one thread");
    KnPool *none = NULL;
    Task t;
    memset(&t, 0, sizeof t);
    t.slow_ith = -1;
    t.round = 7;
    kn_pool_run(none, task, &t);
    CHECK(atomic_load(&t.calls[0]) == 1 && t.nth_seen[0] == 1, "a NULL pool runs the task inline as thread 0 of 1");
    test_split();
    return check_done("test_pool");
}
