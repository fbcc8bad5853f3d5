/* kernels.h - the compute backends behind one interface: which devices
 * exist, and an opened backend (op table + context, ops.h) for one of them.
 *
 * Backends: `cpu` (reference, always built), `guarded` (the CPU kernels with
 * device memory kept inaccessible between op calls: a test backend that
 * proves the engine never touches device memory itself) and `cuda` (CUDA +
 * cuBLAS, built when nvcc is found at configure time). Kernels know nothing
 * of Gemma.
 *
 * Threading: kn_devices_probe() may be called from any thread; it reads
 * device properties and, unless asked for every device's free memory,
 * creates nothing that outlives the call (reading a GPU's free memory
 * creates the process's CUDA context on it, which holds device memory
 * until the process exits). An opened KnBackend belongs to the thread that
 * uses it (ops.h); open one per thread.
 */
#ifndef GF_KERNELS_H
#define GF_KERNELS_H

#include <stdint.h>

#include "base.h"
#include "ops.h"
#include "tensor.h"

#define KN_MAX_DEVICES 16

typedef struct {
    KnDeviceKind kind;
    int index;                 /* ordinal within its kind */
    char name[128];            /* "cpu", or the CUDA device name */
    int n_threads;             /* CPU: cores used by the thread pool; CUDA: SM count */
    uint64_t memory_total;     /* bytes */
    uint64_t memory_free;      /* bytes, at probe time, when free_known */
    int free_known;            /* 0: not read (a GPU this process holds no context on, KN_PROBE_HELD) */
    int cc_major, cc_minor;    /* CUDA compute capability (0.0 for the CPU) */
} KnDeviceInfo;

/* Whose free memory kn_devices_probe reads: the CPU's and that of the GPUs
 * this process already holds a context on (a server's /metrics, its
 * start-up log: a GPU it does not use is left as it is), or every GPU's
 * (`gemmaforge devices`, a short-lived listing: it creates a context on
 * each). */
typedef enum { KN_PROBE_HELD = 0, KN_PROBE_ALL = 1 } KnProbe;

/* Fills out[0..n) with the CPU followed by every CUDA device that the CUDA
 * backend (if built) can open, and returns n (>= 1). Never fails: a CUDA
 * runtime that cannot be initialised simply contributes no device, and the
 * reason is logged once at debug level. */
int kn_devices_probe(KnDeviceInfo out[KN_MAX_DEVICES], KnProbe how);

/* The description of the device of kind (the guarded backend's is the
 * CPU's: its memory is host memory) and index, its free memory read now
 * (a GPU's context created if this process held none: the device is about
 * to be used); GF_NOT_FOUND naming it when there is none. */
GfStatus kn_device_info(KnDeviceKind kind, int index, KnDeviceInfo *out, GfError *err);

/* 1 when this binary contains the CUDA backend, whether or not a GPU exists. */
int kn_cuda_built(void);

/* The device to run on when none is named: the first CUDA device when this
 * binary has the backend and one exists, else the CPU. */
void kn_default_device(KnDeviceKind *kind, int *index);

/* An opened backend: its op table and a context on one device. */
typedef struct KnBackend {
    const KnOps *ops;
    KnCtx ctx;
    char name[32];             /* "cpu", "guarded", "cuda:0" */
} KnBackend;

typedef struct {
    int n_threads;             /* CPU threads for the CPU kernels, <= 0 = all cores */
    /* an open backend of the same kind and device whose memory the new one
     * must be able to address (NULL: none). Contexts on one GPU always
     * share its memory; the guarded backend's contexts share their region
     * only when opened this way (a sibling keeps it alive). */
    const struct KnBackend *share;
    KnPrecision precision;     /* AUTO: BF16 on CUDA, else FP32; BF16 on a CPU kind is refused */
} KnBackendOptions;

/* Opens the backend of kind on device index (0 for the CPU kinds): its op
 * table and a fresh context (thread pool, stream). GF_NOT_FOUND naming the
 * device when it does not exist or is not built; GF_NO_MEMORY. opts may be
 * NULL. Close with kn_backend_close. */
GfStatus kn_backend_open(KnDeviceKind kind, int index, const KnBackendOptions *opts, KnBackend *out, GfError *err);
void kn_backend_close(KnBackend *b);

/* The guarded backend's device memory, which its sibling contexts share as
 * contexts share a GPU's: *held, the bytes its live buffers asked for;
 * *peak, the most they held at once since the region opened. Mapped buffers (alloc_mapped) are host memory on a GPU and do not count.
 * For checking the engine's memory estimates against what it allocates;
 * GF_INVALID when b is not a guarded backend. */
GfStatus kn_guarded_memory(const KnBackend *b, uint64_t *held, uint64_t *peak, GfError *err);

/* The calls of the entries that may take scratch (ops.h KnOpId) made on a
 * guarded backend's region (b's context and its siblings): fn(user, call)
 * as each is submitted, on the submitting thread, under the region's lock,
 * until watched again with fn NULL. attention_bulk over n_q queries and
 * n_keys keys is reported as KN_OP_ATTENTION_DX at the larger of the two
 * (the entry whose scratch it shares), and a grouped LoRA op as one call
 * per segment. For checking an engine's scratch estimates against the
 * calls it makes, priced by another kind's table (kn_backend_ops).
 * GF_INVALID when b is not a guarded backend. */
typedef void (*KnCallWatch)(void *user, const KnCall *call);
GfStatus kn_guarded_watch(const KnBackend *b, KnCallWatch fn, void *user, GfError *err);

/* Parses "fp32" or "bf16" (the --precision values); GF_INVALID naming the
 * text otherwise. kn_precision_name gives the text back ("auto" for AUTO). */
GfStatus kn_precision_parse(const char *text, KnPrecision *out, GfError *err);
const char *kn_precision_name(KnPrecision p);

/* The op table of kind when this binary has it (NULL otherwise), without a
 * device or a context: for the entries that need neither (scratch_bytes). */
const KnOps *kn_backend_ops(KnDeviceKind kind);

/* The device memory b's context holds for itself once call has run
 * (ops.h scratch_bytes; 0 for a backend without scratch). */
size_t kn_scratch_bytes(const KnBackend *b, const KnCall *call);

/* Parses "cpu", "guarded", "cuda" or "cuda:N" into a kind and index;
 * GF_INVALID naming the text otherwise. */
GfStatus kn_backend_parse(const char *text, KnDeviceKind *kind, int *index, GfError *err);

#endif /* GF_KERNELS_H */
