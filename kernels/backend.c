/* backend.c - the registry of compute backends: CPU always, CUDA when built
 * (GF_HAVE_CUDA) and a device exists. The only C file that tests
 * GF_HAVE_CUDA. */
#include "kernels_impl.h"

int kn_cuda_built(void) {
#ifdef GF_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int kn_devices_probe(KnDeviceInfo out[KN_MAX_DEVICES]) {
    int n = 0;
    cpu_device_probe(&out[n++]);
#ifdef GF_HAVE_CUDA
    n += cuda_devices_probe(out + n, KN_MAX_DEVICES - n);
#endif
    return n;
}
