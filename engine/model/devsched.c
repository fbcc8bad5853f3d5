/* devsched.c - the device's holder, handed between serving and training
 * under one mutex (devsched.h has the rules). */
#include "devsched.h"

#include <pthread.h>
#include <stdlib.h>

enum { IDLE = 0, SERVE = 1, TRAIN = 2 };

struct DevSched {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    double max_wait;
    double (*now)(void);
    int holder;               /* IDLE, SERVE, TRAIN */
    int granted;              /* the holder's side was handed the device and has not taken it yet */
    int serve_waiting, train_waiting;
    double serve_since;       /* when the serving side began waiting */
    double held_since;
    double span_since;        /* training: the start of its stretch since its last layer boundary */
    DevSchedStats st;
};

DevSched *devsched_new(double max_wait_s, double (*now)(void), GfError *err) {
    DevSched *s = gf_calloc(1, sizeof *s, err);
    if (!s) return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->max_wait = max_wait_s > 0 ? max_wait_s : 0;
    s->now = now ? now : gf_time_mono;
    s->st.max_wait_s = s->max_wait;
    return s;
}

void devsched_free(DevSched *s) {
    if (!s) return;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

/* Under mu: side takes the device. */
static void take(DevSched *s, int side) {
    s->holder = side;
    s->granted = 0;
    s->held_since = s->now();
    s->span_since = s->held_since;
    if (side == TRAIN) s->st.train_slices++;
}

/* Under mu, training holding the device: the stretch since its last layer
 * boundary ends now. */
static void span_end(DevSched *s) {
    double t = s->now(), span = t - s->span_since;
    if (span > s->st.train_span_max_s) {
        s->st.train_span_max_s = span;
        s->st.train_span_max_hold = s->st.train_slices - s->st.train_yields; /* holds so far */
    }
    s->span_since = t;
}

/* Under mu: the holder lets go, handing the device to the other side when
 * it waits. */
static void let_go(DevSched *s) {
    double held = s->now() - s->held_since;
    if (s->holder == SERVE) s->st.serve_busy_s += held;
    else s->st.train_busy_s += held;
    int other = s->holder == SERVE ? TRAIN : SERVE;
    int waits = other == TRAIN ? s->train_waiting : s->serve_waiting;
    s->holder = waits ? other : IDLE;
    s->granted = waits != 0;
    pthread_cond_broadcast(&s->cv);
}

static int serve_may_take(const DevSched *s) { return s->holder == IDLE || (s->holder == SERVE && s->granted); }
static int train_may_take(const DevSched *s) {
    return (s->holder == IDLE && s->serve_waiting == 0) || (s->holder == TRAIN && s->granted);
}

/* Under mu: training waits for the device, then takes it. */
static void train_wait(DevSched *s) {
    double t0 = s->now();
    s->train_waiting++;
    while (!train_may_take(s)) pthread_cond_wait(&s->cv, &s->mu);
    s->train_waiting--;
    s->st.train_wait_s += s->now() - t0;
    take(s, TRAIN);
}

void devsched_serve_enter(DevSched *s) {
    pthread_mutex_lock(&s->mu);
    s->st.serve_steps++;
    if (s->holder == IDLE) {
        take(s, SERVE);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    double t0 = s->now();
    if (s->serve_waiting++ == 0) s->serve_since = t0;
    pthread_cond_broadcast(&s->cv); /* a training job at a layer boundary looks again */
    while (!serve_may_take(s)) pthread_cond_wait(&s->cv, &s->mu);
    s->serve_waiting--;
    double waited = s->now() - t0;
    s->st.serve_waits++;
    s->st.serve_wait_s += waited;
    if (waited > s->st.serve_wait_max_s) s->st.serve_wait_max_s = waited;
    take(s, SERVE);
    pthread_mutex_unlock(&s->mu);
}

void devsched_serve_leave(DevSched *s) {
    pthread_mutex_lock(&s->mu);
    if (s->holder == SERVE && !s->granted) let_go(s);
    pthread_mutex_unlock(&s->mu);
}

void devsched_train_enter(DevSched *s) {
    pthread_mutex_lock(&s->mu);
    train_wait(s);
    pthread_mutex_unlock(&s->mu);
}

void devsched_train_leave(DevSched *s) {
    pthread_mutex_lock(&s->mu);
    if (s->holder == TRAIN && !s->granted) {
        span_end(s);
        let_go(s);
    }
    pthread_mutex_unlock(&s->mu);
}

int devsched_train_point(DevSched *s) {
    pthread_mutex_lock(&s->mu);
    if (s->holder == TRAIN && !s->granted) span_end(s);
    int yield = s->holder == TRAIN && !s->granted && s->serve_waiting > 0 && s->now() - s->serve_since >= s->max_wait;
    if (yield) {
        s->st.train_yields++;
        let_go(s);
        train_wait(s);
    }
    pthread_mutex_unlock(&s->mu);
    return yield;
}

void devsched_yield_hook(void *s) { devsched_train_point(s); }

void devsched_stats(DevSched *s, DevSchedStats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->holder = s->holder;
    out->serve_waiting = s->serve_waiting;
    out->train_waiting = s->train_waiting;
    pthread_mutex_unlock(&s->mu);
}
