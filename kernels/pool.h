/* pool.h - a fixed thread pool for data-parallel kernels (ggml's ith/nth).
 *
 * kn_pool_run(pool, fn, ctx) calls fn(ctx, ith, nth) once on each of the nth
 * threads (the caller is thread 0) and returns when all have finished; the
 * kernel splits its rows by ith. Runs must not overlap: one thread (the
 * engine thread that owns the pool) submits work. A NULL pool runs fn(ctx,0,1)
 * inline.
 */
#ifndef GF_POOL_H
#define GF_POOL_H

#include "base.h"

typedef struct KnPool KnPool;
typedef void (*KnTask)(void *ctx, int ith, int nth);

/* n_threads <= 0: one per online core. NULL with err on failure. */
KnPool *kn_pool_new(int n_threads, GfError *err);
void kn_pool_free(KnPool *pool);
int kn_pool_size(const KnPool *pool);
void kn_pool_run(KnPool *pool, KnTask fn, void *ctx);

/* Splits [0, n) into nth nearly equal ranges; range ith is [*lo, *hi). */
void kn_split(long n, int ith, int nth, long *lo, long *hi);

#endif
