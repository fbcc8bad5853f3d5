/* devsched.h - one device's time shared by the serving engine and a
 * training job: serving steps come first, training takes what is left.
 *
 * Each side holds the device while it runs device work: the serving engine
 * for a step (devsched_serve_enter / _leave), a training job for a
 * sequence's forward and backward or an optimizer update
 * (devsched_train_enter / _leave). Training also calls devsched_train_point
 * at every layer boundary (the Model's yield hook, model_set_yield). The
 * rules:
 *   - an idle device goes to whoever asks; a serving step waiting for it
 *     keeps a training job from taking it;
 *   - a serving step that finds training on the device waits for training's
 *     next layer boundary once it has waited max_wait seconds (0: the next
 *     boundary): the wait bound is max_wait plus one layer of training;
 *   - when serving leaves with training waiting, the device goes to
 *     training for at least one layer (so training moves on however busy
 *     serving is), then back to serving by the rule above.
 * On a CPU backend the holder gets every core; on a GPU the holder's kernels
 * are the ones queued (layer boundaries are where a stream has drained).
 *
 * Threading: any number of threads may call it; one serving engine and one
 * training job are expected (more of each share their side in turn).
 * Ownership: the caller that made it frees it after both sides are gone.
 * The clock is gf_time_mono unless a test gives its own.
 */
#ifndef GF_DEVSCHED_H
#define GF_DEVSCHED_H

#include <stdint.h>

#include "base.h"

typedef struct DevSched DevSched;

typedef struct {
    uint64_t serve_steps, serve_waits;   /* steps, and those that found training on the device */
    double serve_wait_s, serve_wait_max_s; /* their waits: total, longest */
    uint64_t train_slices, train_yields; /* training takes of the device, and layer boundaries where it gave way:
                                          * its holds (devsched_train_enter calls) are slices less yields */
    double train_wait_s;                 /* training waiting for the device */
    double train_span_max_s;             /* the longest training held the device between two layer boundaries
                                          * (or its enter or leave): what a serving step may have to wait for */
    uint64_t train_span_max_hold;        /* the hold it was in (1 = the first devsched_train_enter) */
    double serve_busy_s, train_busy_s;   /* device time held by each side */
    double max_wait_s;
    int holder;                          /* 0 idle, 1 serving, 2 training */
    int serve_waiting, train_waiting;
} DevSchedStats;

/* A scheduler whose serving steps wait at most max_wait_s (>= 0) before
 * training yields at its next layer boundary. now: the clock (NULL =
 * gf_time_mono), for tests. NULL with err set when out of memory. */
DevSched *devsched_new(double max_wait_s, double (*now)(void), GfError *err);
void devsched_free(DevSched *s);

void devsched_serve_enter(DevSched *s);
void devsched_serve_leave(DevSched *s);
void devsched_train_enter(DevSched *s);
void devsched_train_leave(DevSched *s);
/* A layer boundary of training, which holds the device: gives it to a
 * waiting serving step when the rules say so and takes it back after;
 * returns 1 when it gave way. */
int devsched_train_point(DevSched *s);
/* The hook form of devsched_train_point for model_set_yield. */
void devsched_yield_hook(void *s);

void devsched_stats(DevSched *s, DevSchedStats *out);

#endif
