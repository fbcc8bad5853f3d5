/* nf4.h - 4-bit NormalFloat weights for QLoRA (Dettmers et al. 2023): the
 * frozen base matrices stored as one 4-bit code per weight into the NF4 code
 * book (16 quantiles of N(0, 1) scaled to [-1, 1], with an exact zero),
 * times the absolute maximum of their block of 64 consecutive weights
 * (row-major, the matrix flattened). The absmax constants are themselves
 * quantized ("double quantization"): their mean is subtracted and each group
 * of 256 is stored as int8 with one float32 scale, so a block costs
 * 4 + 8/64 bits per weight instead of 4 + 32/64.
 *
 * Each weight takes the code nearest to w / absmax', absmax' being the
 * dequantized constant, so |w - code absmax'| <= absmax' * (half the widest
 * gap of the code book) + |absmax - absmax'| when |w| <= absmax'.
 *
 * Ownership: KnNf4 owns its buffers (kn_nf4_free). A KnMatrix of dtype
 * KN_NF4 points at one (data) and may start at an element offset (a slice of
 * stacked experts). The struct always lives on the host; on a device other
 * than the CPU its arrays are that device's memory (a copy owned elsewhere,
 * never freed with kn_nf4_free). Read-only after quantization; any thread may read it.
 */
#ifndef GF_NF4_H
#define GF_NF4_H

#include <stdint.h>

#include "base.h"
#include "tensor.h"

#define KN_NF4_BLOCK 64
#define KN_NF4_GROUP 256

/* The NF4 data type of the QLoRA paper (as bitsandbytes ships it), as an
 * initializer: KN_NF4_CODE on the host, the CUDA kernels' constant table. */
#define KN_NF4_CODE_VALUES                                                                           \
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                       \
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                      \
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,         \
     0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

extern const float KN_NF4_CODE[16];

typedef struct KnNf4 {
    uint8_t *codes;           /* [ceil(n / 2)]: element 2i in the low nibble of byte i */
    int8_t *absmax_q;         /* [n_blocks] (absmax - offset) / scale of its group, rounded */
    float *group_scale;       /* [n_groups] */
    float offset;             /* mean absmax */
    int64_t n, n_blocks, n_groups;
} KnNf4;

/* Quantizes every element of w (F32, BF16 or F16, in host memory) into q
 * (host arrays; a backend uploads them into its own layout). */
GfStatus kn_nf4_quantize(KnNf4 *q, KnMatrix w, GfError *err);
void kn_nf4_free(KnNf4 *q);

/* The code kn_nf4_quantize gives weight w of a block whose dequantized
 * absmax is a: the nearest to w / a clamped to [-1, 1], ties to the lower
 * code; 7 (zero) when a is 0. */
uint8_t kn_nf4_nearest(float w, float a);

/* The dequantized absmax of block b. */
float kn_nf4_absmax(const KnNf4 *q, int64_t b);
/* Elements [start, start + len) dequantized into out. */
void kn_nf4_dequantize(const KnNf4 *q, int64_t start, int64_t len, float *out);

/* A [rows, cols] matrix view of q starting at element offset. */
KnMatrix kn_nf4_matrix(const KnNf4 *q, int64_t offset, int64_t rows, int64_t cols);

#endif
