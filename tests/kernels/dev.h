/* dev.h - test helpers for running ops on a backend's device memory: inputs
 * are made on the host and uploaded, outputs are poisoned before the op
 * (so an op that skips an element is caught) and downloaded after it. Every
 * buffer is freed by dev_reset. The guarded backend keeps these buffers
 * inaccessible to the test itself, as a GPU would. */
#ifndef GF_TEST_DEV_H
#define GF_TEST_DEV_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define DEV_MAX_BUFS 512

typedef struct {
    KnBackend be;
    KnBuffer bufs[DEV_MAX_BUFS];
    int n;
} Dev;

/* Opens backend kind with n_threads at precision (FP32 for the parity
 * checks); 0 when it cannot be had here (no such device: the caller skips it). */
static inline int dev_open_at(Dev *d, KnDeviceKind kind, int n_threads, KnPrecision precision) {
    GfError err;
    memset(d, 0, sizeof *d);
    KnBackendOptions o = {.n_threads = n_threads, .precision = precision};
    return kn_backend_open(kind, 0, &o, &d->be, &err) == GF_OK;
}

static inline int dev_open(Dev *d, KnDeviceKind kind, int n_threads) {
    return dev_open_at(d, kind, n_threads, KN_PRECISION_FP32);
}

static inline void *dev_alloc(Dev *d, size_t bytes) {
    GfError err;
    if (d->n == DEV_MAX_BUFS || d->be.ops->alloc(&d->be.ctx, &d->bufs[d->n], bytes ? bytes : 1, KN_U8, "test", &err)) {
        fprintf(stderr, "dev_alloc: %s\n", err.message);
        abort();
    }
    return d->bufs[d->n++].data;
}

/* A device copy of host[0..bytes). */
static inline void *dev_put(Dev *d, const void *host, size_t bytes) {
    void *p = dev_alloc(d, bytes);
    d->be.ops->upload(&d->be.ctx, p, host, bytes);
    return p;
}

/* Device memory of bytes, every byte 0xFF (a float NaN), for outputs. */
static inline void *dev_poisoned(Dev *d, size_t bytes) {
    void *p = dev_alloc(d, bytes);
    d->be.ops->memset(&d->be.ctx, p, 0xFF, bytes);
    return p;
}

static inline void dev_get(Dev *d, void *host, const void *dev, size_t bytes) {
    d->be.ops->download(&d->be.ctx, host, dev, bytes);
}

static inline void dev_reset(Dev *d) {
    while (d->n > 0) d->be.ops->free(&d->be.ctx, &d->bufs[--d->n]);
}

static inline void dev_close(Dev *d) {
    dev_reset(d);
    kn_backend_close(&d->be);
}

#endif
