/* cpu_backend.c - the CPU backend's device description. */
#include <string.h>
#include <unistd.h>

#include "../kernels_impl.h"

void cpu_device_probe(KnDeviceInfo *out) {
    memset(out, 0, sizeof *out);
    out->kind = KN_DEVICE_CPU;
    strcpy(out->name, "cpu");
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
    long page = sysconf(_SC_PAGESIZE);
    out->n_threads = cores > 0 ? (int)cores : 1;
    out->memory_total = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    out->memory_free = avail > 0 && page > 0 ? (uint64_t)avail * (uint64_t)page : 0;
}
