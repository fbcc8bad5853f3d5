/* nf4.h - 4-bit NormalFloat weights for QLoRA (Dettmers et al. 2023): the
 * frozen base matrices stored as one 4-bit code per weight into the NF4 code
 * book (16 quantiles of N(0, 1) scaled to [-1, 1], with an exact zero),
 * times the absolute maximum of their block of 64 consecutive weights
 * (row-major, the matrix flattened). The absmax constants are themselves
 * quantized ("double quantization"): their mean is subtracted and each group
 * of 256 is stored as int8 with one float32 scale, so a block costs
 * 4 + 8/64 bits per weight instead of 4 + 32/64. The mean is summed in
 * double, each group's absmax in order, then the groups' sums in order:
 * an order a device can follow with a thread per group and get the same
 * bits (ops.h nf4_quantize).
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

/* The least float t_i for which code i + 1 is nearer than code i, as the
 * nearest code is computed: fabsf(t - code[i + 1]) < fabsf(t - code[i]).
 * Each comparison is monotone in v over the floats, so the nearest code
 * of a v in [-1, 1] is the number of t_i <= v (ties between two codes
 * going to the lower one). Found by bisection over the floats between the
 * two codes; test_nf4 checks each against that definition and the count
 * against the search over all 16 codes. An initializer for the host and
 * the CUDA kernels alike. */
#define KN_NF4_NEAREST_FROM_VALUES                                                                   \
    {-0x1.b239bp-1f,  -0x1.38a4ep-1f,  -0x1.d708fep-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,            \
     -0x1.1a7176p-3f, -0x1.74f0ep-5f,  0x1.45f6p-5f,    0x1.ec90c6p-4f,  0x1.a0cfc2p-3f,             \
     0x1.2b05aap-2f,  0x1.8ea7f4p-2f,  0x1.00da08p-1f,  0x1.491b6p-1f,   0x1.b913b4p-1f}

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

/* q's sizes (n, n_blocks, n_groups) for n elements; its arrays untouched. */
void kn_nf4_shape(KnNf4 *q, int64_t n);
/* The bytes of scratch kn_nf4_quantize_into and nf4_quantize (ops.h) take
 * for n elements: every block's exact absmax, every group's sum, the mean. */
size_t kn_nf4_scratch_bytes(int64_t n);
/* Where that scratch's group sums start (after the absmax floats,
 * 8-aligned); the mean is the double after the last sum. */
static inline size_t kn_nf4_scratch_sums(int64_t n_blocks) {
    return ((size_t)n_blocks * sizeof(float) + 7) & ~(size_t)7;
}
/* kn_nf4_quantize into q's arrays, already allocated for q's sizes (the
 * codes zeroed or not), w (F32, BF16 or F16, rows * cols = q->n) and
 * scratch (kn_nf4_scratch_bytes) in host memory. The CPU backend's
 * nf4_quantize. */
void kn_nf4_quantize_into(KnNf4 *q, KnMatrix w, void *scratch);

/* The code kn_nf4_quantize gives weight w of a block whose dequantized
 * absmax is a: the nearest to w / a clamped to [-1, 1], ties to the lower
 * code; 7 (zero) when a is 0. */
uint8_t kn_nf4_nearest(float w, float a);

/* The dequantized absmax of block b (inline: the CPU matmul reads one a
 * block of every row it sums; the kernels are built without contracting
 * the product into the sum, so every caller rounds it alike). */
static inline float kn_nf4_absmax(const KnNf4 *q, int64_t b) {
    return q->offset + (float)q->absmax_q[b] * q->group_scale[b / KN_NF4_GROUP];
}
/* Elements [start, start + len) dequantized into out. */
void kn_nf4_dequantize(const KnNf4 *q, int64_t start, int64_t len, float *out);

/* A [rows, cols] matrix view of q starting at element offset. */
KnMatrix kn_nf4_matrix(const KnNf4 *q, int64_t offset, int64_t rows, int64_t cols);

#endif
