/* tensor.h - what a backend's memory holds: element types, device buffers
 * and weight-matrix views, independent of any one backend.
 *
 * A KnBuffer is one allocation made by a backend (KnOps.alloc) on its device:
 * host memory for the CPU backend, GPU memory for CUDA, a guarded mapping for
 * the guarded CPU backend. Its `data` is a device address: code outside the
 * backend may do pointer arithmetic on it (views into the buffer) and pass
 * it to ops, but never reads or writes through it; bytes cross between host
 * and device only through the backend's upload / download / copy entries.
 *
 * A KnMatrix is a read-only weight view [rows = out, cols = in] (y = x W^T)
 * in F32, BF16, F16 or NF4, on the device of the backend that runs it.
 *
 * Ownership: a KnBuffer is owned by whoever allocated it and freed with the
 * same backend's free entry; views borrow it. Threading: plain data.
 */
#ifndef GF_TENSOR_H
#define GF_TENSOR_H

#include <stddef.h>
#include <stdint.h>

typedef enum { KN_DEVICE_CPU = 0, KN_DEVICE_CUDA = 1, KN_DEVICE_GUARDED = 2 } KnDeviceKind;

typedef enum {
    KN_F32 = 0,
    KN_BF16,
    KN_F16,
    KN_NF4,                   /* a KnNf4 (nf4.h) per matrix: 4-bit codes, double-quantized absmax */
    KN_I32,
    KN_U8,
} KnDtype;

/* Bytes of one element (0 for KN_NF4, whose size is per block). */
size_t kn_dtype_size(KnDtype t);
/* "f32", "bf16", ... for messages. */
const char *kn_dtype_name(KnDtype t);

typedef struct {
    void *data;               /* device address of byte 0 */
    size_t bytes;
    KnDeviceKind device;
    int device_index;
    KnDtype dtype;            /* what the buffer holds, for messages and checks */
    int mapped;               /* host memory the device reads over the bus (KnOps.alloc_mapped) */
} KnBuffer;

typedef struct {
    const void *data;         /* device address of the elements; for KN_NF4 a const KnNf4 * (nf4.h): a host
                                 struct whose three arrays are device memory */
    KnDtype dtype;
    int64_t rows, cols;       /* [out, in] */
    int64_t offset;           /* KN_NF4 only: index of element (0, 0) in the quantized tensor */
    int exact;                /* 1: matmul and matmul_dx over it keep float32 operands, summed in an order that
                                 does not depend on the row count, in every precision (ops.h KnPrecision): for
                                 a product whose outputs pick something discrete, as the MoE router's top-k */
} KnMatrix;

/* Rows [row0, row0 + rows) of w, e.g. one expert of a stacked tensor. */
static inline KnMatrix kn_matrix_rows(KnMatrix w, int64_t row0, int64_t rows) {
    KnMatrix m = w;
    m.rows = rows;
    if (w.dtype == KN_NF4) m.offset += row0 * w.cols;
    else m.data = (const char *)w.data + (size_t)(row0 * w.cols) * (w.dtype == KN_F32 ? 4u : 2u);
    return m;
}

#endif
