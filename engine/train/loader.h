/* loader.h - training examples prepared ahead on threads of their own:
 * while the engine computes example k, the loader reads the next examples'
 * lines, decodes their images and preprocesses them (trainset_example),
 * up to LOADER_AHEAD of them on up to LOADER_THREADS threads, so the
 * compute threads never wait on a file or a JPEG when the next examples
 * were announced in time, even when one example's images take longer to
 * decode than the engine takes to compute it (large photos on a GPU).
 *
 * LOADER_AHEAD + 1 example slots, each with pixel buffers that grow to the
 * largest example it held and are then reused: the one handed out (valid
 * until the next loader_get) and the ones announced. trainset_example runs
 * on several threads at once, each into its own slot.
 *
 * Threading: loader_* are called by one thread (the trainer's). Errors: an
 * example's error (a damaged image, a changed file) comes back from the
 * loader_get that asks for it; GF_INTERNAL when no thread can start.
 */
#ifndef GF_LOADER_H
#define GF_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "trainset.h"

#define LOADER_AHEAD 4        /* examples announced and prepared ahead at most */
#define LOADER_THREADS 4      /* preparing them at once at most (<= LOADER_AHEAD; one core is
                                 left to the trainer's thread: one thread on 2 cores) */

typedef struct ExampleLoader ExampleLoader;

typedef struct {
    uint64_t prefetched;      /* examples that were ready (or being prepared) when asked for */
    uint64_t on_demand;       /* examples prepared only when asked for */
} LoaderStats;

GfStatus loader_start(ExampleLoader **out, GfError *err);
/* Stops the thread (after the example in progress) and frees the slots. */
void loader_stop(ExampleLoader *l);

/* Announces that example i of set comes after those announced before it:
 * a loader thread prepares it when one is free, unless it is announced
 * already or LOADER_AHEAD examples are (then it is prepared when asked
 * for). Asking for an example passes over those announced before it. */
void loader_prefetch(ExampleLoader *l, TrainSet *set, size_t i);
/* Example i of set, prepared ahead when announced (waited for if still
 * being prepared), else now on the calling thread; valid until the next
 * loader_get. */
GfStatus loader_get(ExampleLoader *l, TrainSet *set, size_t i, const TrainExample **ex, GfError *err);

void loader_stats(ExampleLoader *l, LoaderStats *out);

#endif
