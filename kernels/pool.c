/* pool.c - thread pool with a generation counter: a run bumps it, the
 * workers run the task and count down `pending`.
 *
 * A decode step submits a hundred or more small runs back to back, so a
 * wait first spins on the atomics (see SPIN_ROUNDS: long while spinning
 * pays, short once it has not), and only then sleeps on a condition
 * variable: a futex sleep and wake-up cost each run several microseconds
 * (on the development machine, spinning made a 120M model's decode step
 * 10-20% shorter). The sleeps pair with the wake-ups through sequentially
 * consistent atomics: a worker counts itself in `sleepers` before it reads
 * the generation, a run bumps the generation before it reads `sleepers`,
 * so one of them sees the other (the same for the caller's `waiting` and a
 * worker's last `pending`). */
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* A wait spins SPIN_ROUNDS pauses (about 80 us on the development
 * machine, an AMD EPYC) while its waits end in the spin, SPIN_SHORT (about
 * 1 us) after one that had to sleep: a machine busy with other threads (a
 * second pool, another process) has the thread waited on off its core
 * for milliseconds, and spinning there only takes the core from it (two
 * processes decoding the 120M model at once on 2 cores: 43-52 tok/s each
 * with a fixed 80 us spin, 72-90 without spinning, 73-90 with this rule,
 * which decodes at 141-158 tok/s alone where no spinning gives 113-128). */
enum { SPIN_ROUNDS = 1 << 12, SPIN_SHORT = 64 };

struct KnPool {
    int n;                    /* threads including the caller */
    int spin;                 /* the most rounds a wait spins before it sleeps: SPIN_ROUNDS, or 0 where
                                 the pool has more threads than the machine has cores (a spinning thread
                                 would hold the core the one it waits for needs, as libgomp reasons) */
    int caller_spin;          /* the caller's next wait's rounds (its thread's alone) */
    pthread_t *threads;
    pthread_mutex_t lock;
    pthread_cond_t start, done;
    atomic_long generation;   /* bumped for each run, after fn and ctx are set */
    atomic_int pending;       /* workers still running the current task */
    atomic_int stop;
    atomic_int sleepers;      /* workers asleep on start, or about to be */
    atomic_int waiting;       /* the caller asleep on done, or about to be */
    KnTask fn;
    void *ctx;
};

typedef struct {
    KnPool *pool;
    int ith;
} Worker;

/* The rounds of the wait after one that ended in its spin (ok) or not. */
static int spin_after(const KnPool *p, int ok) { return ok || p->spin < SPIN_SHORT ? p->spin : SPIN_SHORT; }

/* The generation after `seen`, or -1 once the pool stops; *spin: this
 * worker's rounds, updated. */
static long next_generation(KnPool *p, long seen, int *spin) {
    for (int i = 0; i < *spin; i++) {
        long g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen) { *spin = spin_after(p, 1); return g; }
        if (atomic_load_explicit(&p->stop, memory_order_relaxed)) return -1;
        cpu_relax();
    }
    *spin = spin_after(p, 0);
    pthread_mutex_lock(&p->lock);
    atomic_fetch_add(&p->sleepers, 1);
    long g;
    while ((g = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->start, &p->lock);
    atomic_fetch_sub(&p->sleepers, 1);
    pthread_mutex_unlock(&p->lock);
    return atomic_load(&p->stop) ? -1 : g;
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    KnPool *p = w->pool;
    long seen = 0;
    int spin = p->spin;
    for (;;) {
        long g = next_generation(p, seen, &spin);
        if (g < 0) break;
        seen = g;
        p->fn(p->ctx, w->ith, p->n);
        if (atomic_fetch_sub(&p->pending, 1) == 1 && atomic_load(&p->waiting)) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->lock);
        }
    }
    free(w);
    return NULL;
}

KnPool *kn_pool_new(int n_threads, GfError *err) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores <= 0) cores = 1;
    if (n_threads <= 0) n_threads = (int)cores;
    KnPool *p = gf_calloc(1, sizeof *p, err);
    if (!p) return NULL;
    p->n = n_threads;
    p->spin = n_threads <= cores ? SPIN_ROUNDS : 0;
    p->caller_spin = p->spin;
    atomic_init(&p->generation, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->sleepers, 0);
    atomic_init(&p->waiting, 0);
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
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}

int kn_pool_size(const KnPool *p) { return p ? p->n : 1; }

void kn_pool_run(KnPool *p, KnTask fn, void *ctx) {
    if (!p || p->n == 1) { fn(ctx, 0, 1); return; }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store(&p->pending, p->n - 1);
    atomic_fetch_add(&p->generation, 1);
    if (atomic_load(&p->sleepers) > 0) {
        pthread_mutex_lock(&p->lock);
        pthread_cond_broadcast(&p->start);
        pthread_mutex_unlock(&p->lock);
    }
    fn(ctx, 0, p->n);
    for (int i = 0; i < p->caller_spin; i++) {
        if (atomic_load_explicit(&p->pending, memory_order_acquire) == 0) { p->caller_spin = spin_after(p, 1); return; }
        cpu_relax();
    }
    p->caller_spin = spin_after(p, 0);
    pthread_mutex_lock(&p->lock);
    atomic_store(&p->waiting, 1);
    while (atomic_load(&p->pending) > 0) pthread_cond_wait(&p->done, &p->lock);
    atomic_store(&p->waiting, 0);
    pthread_mutex_unlock(&p->lock);
}

void kn_split(long n, int ith, int nth, long *lo, long *hi) {
    long per = n / nth, extra = n % nth;
    *lo = ith * per + (ith < extra ? ith : extra);
    *hi = *lo + per + (ith < extra ? 1 : 0);
}
