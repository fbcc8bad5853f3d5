/* cpu_guarded.h - what the guarded backend's two files share, private to
 * kernels/cpu/. cpu_guarded.c keeps the region, the memory entries and the
 * recordings (graph_begin / graph_end); cpu_guarded_ops.c the ops and the
 * table. An op is a call: its arguments, by value, in a struct of its own,
 * and an exec function that runs the CPU kernel on them. guard_submit runs
 * a call, or, while a graph is recorded, keeps it to run at graph_end and
 * at each replay, as a GPU keeps a captured launch with its parameters.
 * Contract of the backend itself: cpu_guarded.c's head comment. */
#ifndef GF_CPU_GUARDED_H
#define GF_CPU_GUARDED_H

#include "../ops.h"

/* Runs the call args (bytes bytes, read only) on ctx. */
typedef void (*GuardExec)(const KnCtx *ctx, const void *args);

/* The kernels' address of device address p; NULL stays NULL. Anything
 * outside the region aborts (host memory handed to an op), and so, during
 * a replay, does an address in no live buffer (a graph over freed memory). */
void *guard_hv(const KnCtx *ctx, const void *p);

/* [p, p + n) must lie inside one live buffer: its kernels' address, else
 * abort (host memory handed to a transfer entry, which a GPU cannot read). */
void *guard_owned(const KnCtx *ctx, const void *p, size_t n);

/* Submits the call exec(args): run now; while a graph is recorded, args
 * (bytes) copied into the recording and run when it ends (nothing, when
 * the recording fails); abort during a replay, which takes no submissions. */
void guard_submit(const KnCtx *ctx, GuardExec exec, const void *args, size_t bytes);

/* The n host bytes at p that a call reads when it runs (segments, masks, an
 * NF4 header): p itself, or while a graph is recorded a copy the recording
 * owns, as a captured launch holds its parameters. NULL stays NULL. */
const void *guard_keep(const KnCtx *ctx, const void *p, size_t n);

/* Reports call to the region's watcher, if any (kn_guarded_watch). */
void guard_called(const KnCtx *ctx, const KnCall *call);

/* cpu_guarded.c: the memory and graph entries of the table (ops.h). */
GfStatus guard_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err);
GfStatus guard_alloc_mapped(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what,
                            GfError *err);
void guard_free(const KnCtx *ctx, KnBuffer *buf);
void guard_seal(const KnCtx *ctx, const KnBuffer *buf);
void guard_upload(const KnCtx *ctx, void *dst, const void *src, size_t n);
void guard_download(const KnCtx *ctx, void *dst, const void *src, size_t n);
GfStatus guard_synchronize(const KnCtx *ctx, GfError *err);
int guard_graph_begin(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes);
int guard_graph_end(const KnCtx *ctx);

#endif
