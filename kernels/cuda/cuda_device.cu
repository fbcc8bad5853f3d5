/* cuda_device.cu - CUDA device discovery for the registry. A runtime that
 * cannot initialise (no driver, no GPU) reports zero devices. Counting the
 * devices and reading their properties creates no context; reading a
 * device's free memory does (cudaSetDevice creates the primary context,
 * which holds device memory until the process exits), so it is read only
 * where the process holds one already, or where the caller asks. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include <atomic>

extern "C" {
#include "../kernels_impl.h"

/* The devices this process holds a context on, a bit each: process-wide,
 * set once and never cleared (the primary context outlives every KnCtx). */
static std::atomic<unsigned> g_held(0);

void cuda_device_held(int index) {
    if (index >= 0 && index < 32) g_held.fetch_or(1u << index);
}

static int held(int index) { return index >= 0 && index < 32 && (g_held.load() >> index & 1u); }

int cuda_devices_probe(KnDeviceInfo *out, int max, int all, int index) {
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess) {
        GF_LOGD("cuda: no device available (%s)", cudaGetErrorString(rc));
        cudaGetLastError(); /* clear the non-sticky error */
        return 0;
    }
    int n = 0;
    for (int i = 0; i < count && n < max; i++) {
        cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
        KnDeviceInfo *d = &out[n++];
        memset(d, 0, sizeof *d);
        d->kind = KN_DEVICE_CUDA;
        d->index = i;
        snprintf(d->name, sizeof d->name, "%.127s", prop.name); /* names are far shorter */
        d->n_threads = prop.multiProcessorCount;
        d->memory_total = prop.totalGlobalMem;
        d->cc_major = prop.major;
        d->cc_minor = prop.minor;
        if (!all && i != index && !held(i)) continue;
        /* every op sets its context's device first (cuda_ctx), so changing
         * this thread's current device disturbs nothing */
        size_t free_b = 0, total_b = 0;
        if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
            d->memory_free = free_b;
            d->free_known = 1;
            cuda_device_held(i);
        } else {
            cudaGetLastError();
        }
    }
    return n;
}
}
