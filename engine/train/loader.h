/* loader.h - training examples prepared one ahead on a thread of their own:
 * while the engine computes example k, the loader reads example k+1's line,
 * decodes its images and preprocesses them (trainset_example), so the
 * compute threads never wait on a file or a JPEG when the next example was
 * announced in time.
 *
 * Two example slots, each with pixel buffers that grow to the largest
 * example seen and are then reused: the one handed out (valid until the
 * next loader_get) and the one being prepared. Every trainset_example call
 * runs on the loader's thread (a TrainSet is used by one thread at a time).
 *
 * Threading: loader_* are called by one thread (the trainer's). Errors: an
 * example's error (a damaged image, a changed file) comes back from the
 * loader_get that asks for it; GF_INTERNAL when the thread cannot start.
 */
#ifndef GF_LOADER_H
#define GF_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "trainset.h"

typedef struct ExampleLoader ExampleLoader;

typedef struct {
    uint64_t prefetched;      /* examples that were ready (or being prepared) when asked for */
    uint64_t on_demand;       /* examples prepared only when asked for */
} LoaderStats;

GfStatus loader_start(ExampleLoader **out, GfError *err);
/* Stops the thread (after the example in progress) and frees the slots. */
void loader_stop(ExampleLoader *l);

/* Announces that example i of set comes next: the loader prepares it now,
 * unless it is already prepared. */
void loader_prefetch(ExampleLoader *l, TrainSet *set, size_t i);
/* Example i of set, prepared ahead when announced, else now (waited for);
 * valid until the next loader_get. */
GfStatus loader_get(ExampleLoader *l, TrainSet *set, size_t i, const TrainExample **ex, GfError *err);

void loader_stats(ExampleLoader *l, LoaderStats *out);

#endif
