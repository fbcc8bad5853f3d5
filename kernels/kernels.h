/* kernels.h - the compute backends behind one interface.
 *
 * Two backends exist: `cpu` (reference, always built) and `cuda` (CUDA +
 * cuBLAS, built when nvcc is found at configure time). This header exposes
 * what every layer may ask of them without knowing which one runs: which
 * devices exist and how much memory they have. The op table (matmul, norms,
 * attention, ...) joins this header as the engine lands; kernels know nothing
 * of Gemma.
 *
 * Threading: kn_devices_probe() may be called from any thread; it reads
 * device properties and allocates nothing that outlives the call.
 */
#ifndef GF_KERNELS_H
#define GF_KERNELS_H

#include <stdint.h>

#include "base.h"

typedef enum { KN_DEVICE_CPU = 0, KN_DEVICE_CUDA = 1 } KnDeviceKind;

#define KN_MAX_DEVICES 16

typedef struct {
    KnDeviceKind kind;
    int index;                 /* ordinal within its kind */
    char name[128];            /* "cpu", or the CUDA device name */
    int n_threads;             /* CPU: cores used by the thread pool; CUDA: SM count */
    uint64_t memory_total;     /* bytes */
    uint64_t memory_free;      /* bytes, at probe time */
} KnDeviceInfo;

/* Fills out[0..n) with the CPU followed by every CUDA device that the CUDA
 * backend (if built) can open, and returns n (>= 1). Never fails: a CUDA
 * runtime that cannot be initialised simply contributes no device, and the
 * reason is logged once at debug level. */
int kn_devices_probe(KnDeviceInfo out[KN_MAX_DEVICES]);

/* 1 when this binary contains the CUDA backend, whether or not a GPU exists. */
int kn_cuda_built(void);

#endif /* GF_KERNELS_H */
