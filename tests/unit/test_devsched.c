/* test_devsched.c - the device scheduler's rules, on a clock the test
 * moves: an idle device goes to whoever asks; a waiting serving step keeps
 * training off it; training gives way at a layer boundary only once the
 * serving step has waited the bound (at once with a bound of 0); a serving
 * step that leaves hands the device to waiting training, which gets at
 * least one layer however eagerly serving comes back; the figures add up. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

#include "check.h"
#include "devsched.h"

static _Atomic double g_now;
static double fake_now(void) { return atomic_load(&g_now); }

/* Serving steps on their own thread, back to back as the engine runs
 * them: step k enters (entered = k), leaves when release reaches k, and the
 * next one asks at once. */
typedef struct {
    DevSched *s;
    pthread_t th;
    int rounds;
    atomic_int entered, release;
} ServeStep;

static void *serve_main(void *arg) {
    ServeStep *p = arg;
    for (int k = 1; k <= p->rounds; k++) {
        devsched_serve_enter(p->s);
        atomic_store(&p->entered, k);
        while (atomic_load(&p->release) < k) usleep(500);
        devsched_serve_leave(p->s);
    }
    return NULL;
}

static void serve_steps(ServeStep *p, DevSched *s, int rounds) {
    atomic_init(&p->entered, 0);
    atomic_init(&p->release, 0);
    p->s = s;
    p->rounds = rounds;
    pthread_create(&p->th, NULL, serve_main, p);
}
static void serve_start(ServeStep *p, DevSched *s) { serve_steps(p, s, 1); }

static void serve_finish(ServeStep *p) {
    atomic_store(&p->release, p->rounds);
    pthread_join(p->th, NULL);
}

/* A training job's hold on its own thread: enters, runs layer boundaries
 * when told, leaves when told. */
typedef struct {
    DevSched *s;
    pthread_t th;
    atomic_int entered, asked, done, yields, leave; /* layer boundaries asked for and returned */
} TrainHold;

static void *train_main(void *arg) {
    TrainHold *p = arg;
    devsched_train_enter(p->s);
    atomic_store(&p->entered, 1);
    while (!atomic_load(&p->leave) || atomic_load(&p->done) < atomic_load(&p->asked)) {
        if (atomic_load(&p->done) < atomic_load(&p->asked)) {
            if (devsched_train_point(p->s)) atomic_fetch_add(&p->yields, 1);
            atomic_fetch_add(&p->done, 1);
        }
        usleep(500);
    }
    devsched_train_leave(p->s);
    return NULL;
}

static void train_start(TrainHold *p, DevSched *s) {
    atomic_init(&p->entered, 0);
    atomic_init(&p->asked, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->yields, 0);
    atomic_init(&p->leave, 0);
    p->s = s;
    pthread_create(&p->th, NULL, train_main, p);
}

/* Asks the training thread for one layer boundary. */
static void point_ask(TrainHold *p) { atomic_fetch_add(&p->asked, 1); }
static int point_returned(TrainHold *p) { return atomic_load(&p->done) == atomic_load(&p->asked); }

/* Waits (generously: 60 s) for a condition another thread makes true. */
#define EVENTUALLY(cond) \
    do { \
        for (int i_ = 0; i_ < 120000 && !(cond); i_++) usleep(500); \
    } while (0)

/* One layer boundary on the training thread, waited for; 1 when it gave
 * way. One that never returns ends the test (its thread holds the rest). */
static int train_point(TrainHold *p) {
    int before = atomic_load(&p->yields);
    point_ask(p);
    EVENTUALLY(point_returned(p));
    if (!point_returned(p)) {
        printf("FAIL: a layer boundary never returned (60 s)\n");
        fflush(stdout);
        _exit(1);
    }
    return atomic_load(&p->yields) > before;
}

static void train_finish(TrainHold *p) {
    atomic_store(&p->leave, 1);
    pthread_join(p->th, NULL);
}

static DevSchedStats stats(DevSched *s) {
    DevSchedStats st;
    devsched_stats(s, &st);
    return st;
}

static void test_idle_and_priority(void) {
    GfError err;
    DevSched *s = devsched_new(0, fake_now, &err);
    /* idle: serving takes it at once */
    ServeStep a;
    serve_start(&a, s);
    EVENTUALLY(atomic_load(&a.entered));
    CHECK(atomic_load(&a.entered) && stats(s).holder == 1 && stats(s).serve_waits == 0, "an idle device goes to serving");
    /* training asks while serving holds: it waits, then gets the device when serving leaves */
    TrainHold t;
    train_start(&t, s);
    EVENTUALLY(stats(s).train_waiting == 1);
    CHECK(!atomic_load(&t.entered), "training waits while serving holds the device");
    serve_finish(&a);
    EVENTUALLY(atomic_load(&t.entered));
    CHECK(atomic_load(&t.entered) && stats(s).holder == 2, "serving leaving hands the device to waiting training");
    /* serving asks while training holds: training's next layer boundary gives way (bound 0) */
    ServeStep b;
    serve_start(&b, s);
    EVENTUALLY(stats(s).serve_waiting == 1);
    CHECK(!atomic_load(&b.entered), "serving waits for training's next layer boundary");
    /* training leaves and asks again at once: the waiting serving step goes first */
    atomic_store(&t.leave, 1);
    pthread_join(t.th, NULL);
    EVENTUALLY(atomic_load(&b.entered));
    TrainHold t2;
    train_start(&t2, s);
    EVENTUALLY(stats(s).train_waiting == 1);
    CHECK(atomic_load(&b.entered) && !atomic_load(&t2.entered) && stats(s).holder == 1,
          "a waiting serving step goes before training that asks again");
    serve_finish(&b);
    EVENTUALLY(atomic_load(&t2.entered));
    CHECK(atomic_load(&t2.entered), "then training");
    train_finish(&t2);
    DevSchedStats st = stats(s);
    CHECK(st.holder == 0 && st.serve_steps == 2 && st.serve_waits == 1 && st.train_slices == 2,
          "figures: %llu steps, %llu waited, %llu training slices", (unsigned long long)st.serve_steps,
          (unsigned long long)st.serve_waits, (unsigned long long)st.train_slices);
    devsched_free(s);
}

/* Bound 5 (clock units): a layer boundary at 1 keeps the device, one at 5
 * gives way; the serving step's wait is what the clock says. */
static void test_wait_bound(void) {
    GfError err;
    atomic_store(&g_now, 100.0);
    DevSched *s = devsched_new(5.0, fake_now, &err);
    TrainHold t;
    train_start(&t, s);
    EVENTUALLY(atomic_load(&t.entered));
    CHECK(train_point(&t) == 0, "no serving step waiting: training keeps the device");
    ServeStep a;
    serve_start(&a, s);
    EVENTUALLY(stats(s).serve_waiting == 1);
    atomic_store(&g_now, 101.0);
    CHECK(train_point(&t) == 0 && !atomic_load(&a.entered), "waited 1 of 5: training keeps the device");
    atomic_store(&g_now, 104.5);
    CHECK(train_point(&t) == 0 && !atomic_load(&a.entered), "waited 4.5 of 5: training keeps the device");
    atomic_store(&g_now, 105.0);
    /* this boundary gives way and blocks until the serving step is done */
    point_ask(&t);
    EVENTUALLY(atomic_load(&a.entered));
    CHECK(atomic_load(&a.entered) && stats(s).holder == 1, "waited 5 of 5: training gave way at its layer boundary");
    CHECK(!point_returned(&t), "training waits inside its layer boundary while serving runs");
    atomic_store(&g_now, 106.0);
    serve_finish(&a);
    while (!point_returned(&t)) usleep(500);
    CHECK(atomic_load(&t.yields) == 1 && stats(s).holder == 2, "and has the device back once serving leaves");
    train_finish(&t);
    DevSchedStats st = stats(s);
    CHECK(st.serve_waits == 1 && st.serve_wait_max_s == 5.0 && st.train_yields == 1 && st.serve_busy_s == 1.0,
          "figures: waited %.1f (max %.1f), %llu yields, serving busy %.1f", st.serve_wait_s, st.serve_wait_max_s,
          (unsigned long long)st.train_yields, st.serve_busy_s);
    /* the stretches between boundaries: 0, 1, 3.5, 0.5, then 0 after the device came back at 106 */
    CHECK(st.train_span_max_s == 3.5 && st.train_span_max_hold == 1 && st.train_slices - st.train_yields == 1,
          "longest training stretch %.2f in hold %llu of %llu", st.train_span_max_s,
          (unsigned long long)st.train_span_max_hold, (unsigned long long)(st.train_slices - st.train_yields));
    devsched_free(s);
}

/* One training hold on the test's clock: it enters at `enter`, passes a
 * layer boundary at `point` (none when negative) and leaves at `leave`. */
static void timed_hold(DevSched *s, double enter, double point, double leave) {
    TrainHold t;
    atomic_store(&g_now, enter);
    train_start(&t, s);
    EVENTUALLY(atomic_load(&t.entered));
    if (point >= 0) {
        atomic_store(&g_now, point);
        train_point(&t);
    }
    atomic_store(&g_now, leave);
    train_finish(&t);
}

/* The longest stretch training held the device without a layer boundary,
 * and which hold it was in: an enter to a boundary, boundary to boundary,
 * a boundary to the leave all count. */
static void test_spans(void) {
    GfError err;
    DevSched *s = devsched_new(0, fake_now, &err);
    timed_hold(s, 10, 12, 13);
    CHECK(stats(s).train_span_max_s == 2.0 && stats(s).train_span_max_hold == 1, "hold 1: enter to its boundary, 2");
    timed_hold(s, 20, 21, 28);
    timed_hold(s, 30, -1, 31);
    DevSchedStats st = stats(s);
    CHECK(st.train_span_max_s == 7.0 && st.train_span_max_hold == 2 && st.train_slices - st.train_yields == 3,
          "the longest stretch: %.1f in hold %llu of %llu (7 in hold 2 of 3)", st.train_span_max_s,
          (unsigned long long)st.train_span_max_hold, (unsigned long long)(st.train_slices - st.train_yields));
    devsched_free(s);
}

/* Serving that comes back at once after each step still lets training run
 * one layer between steps (bound 0): steps and layers alternate. */
static void test_alternation(void) {
    GfError err;
    DevSched *s = devsched_new(0, fake_now, &err);
    ServeStep a;
    serve_steps(&a, s, 4);
    EVENTUALLY(atomic_load(&a.entered) == 1);
    TrainHold t;
    train_start(&t, s);
    EVENTUALLY(stats(s).train_waiting == 1);
    for (int k = 1; k < 4; k++) {
        atomic_store(&a.release, k);  /* step k leaves, handing the device to training; step k + 1 asks at once */
        EVENTUALLY(stats(s).serve_waiting == 1 && stats(s).holder == 2);
        CHECK(stats(s).holder == 2 && atomic_load(&a.entered) == k, "round %d: training runs between serving steps", k);
        point_ask(&t);                /* one layer, then it gives way */
        EVENTUALLY(atomic_load(&a.entered) == k + 1);
        CHECK(atomic_load(&a.entered) == k + 1, "round %d: after one layer serving has the device again", k);
    }
    serve_finish(&a);
    while (!point_returned(&t)) usleep(500);
    train_finish(&t);
    DevSchedStats st = stats(s);
    CHECK(st.train_yields == 3 && st.serve_waits == 3, "figures: %llu yields, %llu waits", (unsigned long long)st.train_yields,
          (unsigned long long)st.serve_waits);
    devsched_free(s);
}

int main(void) {
    test_idle_and_priority();
    test_wait_bound();
    test_alternation();
    test_spans();
    return check_done("test_devsched");
}
