/* cuda_device.cu - CUDA device discovery for the registry. A runtime that
 * cannot initialise (no driver, no GPU) reports zero devices. */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

extern "C" {
#include "../kernels_impl.h"

int cuda_devices_probe(KnDeviceInfo *out, int max) {
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
        size_t free_b = 0, total_b = 0;
        if (cudaSetDevice(i) == cudaSuccess && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
            d->memory_free = free_b;
    }
    return n;
}
}
