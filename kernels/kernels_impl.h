/* kernels_impl.h - entry points the backends export to the registry in
 * backend.c. Internal to kernels/ (and tests). */
#ifndef GF_KERNELS_IMPL_H
#define GF_KERNELS_IMPL_H

#include "kernels.h"

/* Fills *out with the host CPU. Always succeeds. */
void cpu_device_probe(KnDeviceInfo *out);

/* Fills out[0..max) with CUDA devices; returns how many (0 when none or when
 * the runtime fails to initialise). Reads the free memory of the devices
 * this process holds a context on, of every device when `all`, and of
 * device `index` (-1: none). Defined in cuda/cuda_device.cu. */
int cuda_devices_probe(KnDeviceInfo *out, int max, int all, int index);

/* Marks device index as holding this process's context (cuda_ctx_init: the
 * primary context, which lives until the process exits). */
void cuda_device_held(int index);

/* The CUDA backend (cuda/cuda_backend.cu): its table, and a context on
 * device index (stream, cuBLAS handle) in ctx->impl; GF_NOT_FOUND when the
 * device does not exist, GF_DEVICE when it cannot be initialised. */
const KnOps *cuda_backend_ops(void);
GfStatus cuda_ctx_init(KnCtx *ctx, int index, GfError *err);
void cuda_ctx_free(KnCtx *ctx);

/* The CPU table (cpu/cpu_ops.c). */
const KnOps *cpu_backend_ops(void);

/* The guarded CPU backend (cpu/cpu_guarded.c): the CPU kernels, with every
 * buffer in its own mapping, inaccessible outside op calls. Its context
 * holds the registry of live buffers (ctx->impl), shared with its siblings. */
const KnOps *guarded_backend_ops(void);
GfStatus guarded_ctx_init(KnCtx *ctx, const KnCtx *share, GfError *err); /* share: a sibling's, or NULL */
void guarded_ctx_free(KnCtx *ctx);
/* The region's held and peak bytes (kn_guarded_memory). */
void guarded_memory(const KnCtx *ctx, uint64_t *held, uint64_t *peak);
/* Sets the region's call watcher (kn_guarded_watch). */
void guarded_watch(const KnCtx *ctx, void (*fn)(void *user, const KnCall *call), void *user);

#endif
