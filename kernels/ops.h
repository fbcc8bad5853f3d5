/* ops.h - the math of the engine behind one table, KnOps, that every
 * backend fills (ggml_backend_i style): memory entries (alloc, free, upload,
 * download, copy, memset, synchronize) and the ops. The engine holds a
 * KnBackend (kernels.h: table + context, from kn_backend_open) and never
 * names a backend.
 *
 * Memory: every float / int pointer an op takes is a device address inside
 * a KnBuffer of the same backend (or a view into one): activations,
 * gradients, KV, masks and index tables alike. Only the arguments passed by
 * value (sizes, positions of a single call, scales) live on the host. For
 * the CPU backend device memory is host memory; for CUDA it is GPU memory;
 * the guarded CPU backend keeps it inaccessible between op calls, so that any
 * engine code touching it directly faults.
 *
 * Conventions: activations are float32, row-major, with shapes in the
 * comments (a KV store of attention_batch / attention_rows may hold
 * bfloat16, and round_bf16 keeps an activation in bfloat16 for later); weights are KnMatrix views (tensor.h) [rows = out, cols = in]
 * that are never written. A linear layer is y = x W^T. Kernels know nothing
 * of Gemma: head counts, windows and masks arrive as plain numbers and arrays.
 * Every op takes the context first, then outputs, then inputs, then sizes.
 *
 * Ordering: ops run in submission order on the context's stream; download
 * returns when the bytes are on the host. synchronize waits for everything
 * submitted and reports a device fault, if one happened, as a GfError.
 *
 * Optional entries are marked "(optional)" and may be NULL; supports() says
 * whether an op accepts a weight dtype on this backend.
 *
 * Threading: a KnCtx and everything run on it belong to one thread (its
 * owner: the serving engine thread, or a job worker); ops split their work
 * over ctx->pool (CPU) or the device internally. No op allocates except the
 * CPU kernels' per-worker row buffers on the stack and a backend's scratch
 * of its own, kept by the context and grown to its largest call (CUDA: the
 * bf16 operands of a matmul); scratch_bytes says how much a call needs, so
 * that a fit check can count it.
 */
#ifndef GF_OPS_H
#define GF_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "pool.h"
#include "tensor.h"

struct KnNf4; /* nf4.h */

/* How a backend's matmuls compute: FP32 (float32 operands, TF32 off: the
 * parity mode, the only one on the CPU kinds) or BF16 (operands rounded to
 * bfloat16 on the tensor cores, float32 accumulation; CUDA's production
 * mode). The ops' activations, LoRA weights, gradients and optimizer state
 * stay float32 in both (what the engine keeps in bfloat16 between layers
 * it rounds with round_bf16 and rows_scatter_bf16). A matrix marked exact
 * (tensor.h: the MoE router's) keeps float32 operands in both, in a sum
 * order that does not depend on the row count. AUTO, only as an option:
 * BF16 on CUDA, else FP32. */
typedef enum { KN_PRECISION_AUTO = 0, KN_PRECISION_FP32, KN_PRECISION_BF16 } KnPrecision;

/* The widest head whose keys and values attention_batch and attention_rows
 * take from bfloat16 stores. */
#define KN_KV_BF16_MAX_DIM 1024

/* One backend instance on one device: the state its ops need. */
typedef struct {
    KnDeviceKind device;
    int index;                /* device ordinal within its kind */
    KnPrecision precision;    /* FP32 or BF16, resolved when opened */
    KnPool *pool;             /* CPU threads (NULL: single thread) */
    void *stream;             /* CUDA stream (NULL: the backend's default); unused on the CPU */
    void *impl;               /* the backend's private state */
} KnCtx;

/* Attention masks are described, not materialized: key t is visible to the
 * query at absolute position q when valid[t] and
 *   (t <= q or (group[q] >= 0 and group[q] == group[t]))   -- causal, or same block
 *   and (window == 0 or t > q - window).                     -- sliding window
 * group may be NULL (no blocks). valid and group are device arrays. */
typedef struct {
    const uint8_t *valid;     /* [n_keys] 1 = real key */
    const int32_t *group;     /* [n_keys] block id or -1, or NULL */
    int window;               /* 0 = unlimited */
} KnMask;

/* Keys and values stored in blocks (a paged KV cache): position t of a
 * sequence lives in block table[t / block_len], row t % block_len, of
 * stores k, v [n_blocks * block_len, n_kv_heads, dim] (device arrays). */
typedef struct {
    const float *k, *v;
    const int32_t *table;     /* [ceil(n_keys / block_len)] block ids; a block whose keys the mask hides
                                 from every query may be -1 (given back): never read it */
    int64_t block_len;        /* positions per block, >= 1 */
} KnKv;

/* One sequence of a batch for attention_batch: its rows [row0, row0 + n_q)
 * of q and out, at the consecutive absolute positions that start at the
 * call's pos[row0] (a device array: a decode step's launches then stay the
 * same from step to step), attending the keys before its last query's
 * position and that position itself, pos[row0] + n_q in all, of the shared
 * paged stores through its own block table and mask arrays (KnKv's and
 * KnMask's meaning; device arrays, group may be NULL). */
typedef struct {
    int64_t row0, n_q;
    const int32_t *table;
    const uint8_t *valid;
    const int32_t *group;
} KnAttnSeq;

/* One query row of attention_rows, in device memory: the block table,
 * validity and vision groups of its sequence's cache (KnAttnSeq's meaning;
 * device arrays, group may be NULL). */
typedef struct {
    const int32_t *table;
    const uint8_t *valid;
    const int32_t *group;
} KnAttnRow;

/* One row's adapter for lora_rows_shrink / lora_rows_expand, in device
 * memory: A [rank, in], B [out, rank] (device arrays) scaled by scale, as a
 * serving KnLoraSeg of that one row (no dropout, no gradients); rank 0: the
 * row has no term. */
typedef struct {
    const float *A, *B;
    int32_t rank;
    float scale;
} KnLoraRow;

/* One adapter's rows of a grouped LoRA op (SGMV): rows [row0, row0 +
 * n_rows) of x, t and y use A [rank, in] and B [out, rank] (device arrays),
 * scaled by scale. Backward ops accumulate into dA, dB (same shapes).
 * LoRA dropout (training): when dropout > 0 the adapter sees d(x) = x * f,
 * f[i, j] = 0 when the high 32 bits of splitmix64's finalizer of
 * (dropout_seed + i * in + j) are below dropout * 2^32, else 1 / (1 - dropout),
 * i counted from row0; the frozen linear still sees x. */
typedef struct {
    int64_t row0, n_rows;
    const float *A, *B;
    float *dA, *dB;
    int rank;
    float scale;
    float dropout;
    uint64_t dropout_seed;
} KnLoraSeg;

/* One AdamW step's scalars, as torch computes them from lr, the betas and
 * the step t: decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1^t),
 * bc2_sqrt = sqrt(1 - beta2^t). */
typedef struct {
    float decay, beta1, beta2, eps, step_size, bc2_sqrt;
} KnAdamW;

/* How one row picks its next token (device array, one per row):
 * temperature 0 (or top_k 1) is greedy (the first maximum); otherwise a
 * draw from softmax(logits / temperature) within the top_k most probable
 * (0: all) and the smallest nucleus holding top_p of their mass, ties
 * ordered by token id, tokens below e^-40 of the best left out. rng is the
 * row's splitmix64 state, advanced once per draw. */
typedef struct {
    float temperature, top_p;
    int32_t top_k, pad;
    uint64_t rng;
} KnSampleRow;

/* graph_begin's answers (KnOps). */
enum { KN_GRAPH_NONE = 0, KN_GRAPH_RECORD = 1, KN_GRAPH_REPLAY = 2, KN_GRAPH_OFF = 3 };

/* The entries, for supports() and scratch_bytes(). */
typedef enum {
    KN_OP_MATMUL,
    KN_OP_MATMUL_DX,
    KN_OP_EMBED_ROWS,
    KN_OP_ATTENTION_DX,
    KN_OP_LORA_SHRINK,
    KN_OP_LORA_SHRINK_DX,
    KN_OP_MOE_EXPERTS,
    KN_OP_MOE_EXPERTS_DX,
    KN_OP_COUNT
} KnOpId;

/* One call of an entry, for scratch_bytes(): the entry and the sizes that
 * decide the device memory it takes beyond its arguments. */
typedef struct {
    KnOpId op;
    KnMatrix w;          /* MATMUL, MATMUL_DX: the weights; MOE_EXPERTS_DX: down (its rows, E * H, and cols, Im) */
    int64_t n;           /* rows of x: tokens; ATTENTION_DX: queries, and keys (its calls attend as
                            many keys as they have queries); LORA_*: one training segment's rows */
    int64_t in;          /* LORA_*: input features */
    int n_heads, dim;    /* ATTENTION_DX */
    int dropout;         /* LORA_*: the segment is dropped out */
    int top_k;           /* MOE_EXPERTS, MOE_EXPERTS_DX: K */
    int n_experts;       /* MOE_EXPERTS, MOE_EXPERTS_DX: E */
} KnCall;

typedef struct {
    /* ---- memory ---- */
    /* A buffer of bytes (> 0) on ctx's device, tagged with dtype; `what`
     * names it in the error (GF_NO_MEMORY, or GF_DEVICE) when it cannot be
     * had. Contents undefined. */
    GfStatus (*alloc)(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err);
    /* (optional; NULL: none) A buffer of host memory that ctx's device reads
     * directly over the bus (CUDA: pinned and mapped), for a large table of
     * which a step reads a few rows. Its data is one address for both: the
     * host fills it with plain stores before the device first reads it (no
     * upload), then it is read-only. Freed with free. */
    GfStatus (*alloc_mapped)(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what,
                             GfError *err);
    /* Frees buf (a zeroed buffer is a no-op) and zeroes it. A buffer belongs
     * to its device: any context there (for the guarded backend, any
     * sibling) may free it, on any thread. */
    void (*free)(const KnCtx *ctx, KnBuffer *buf);
    /* (optional) buf's contents are final (weights, after their upload):
     * read-only from now on. */
    void (*seal)(const KnCtx *ctx, const KnBuffer *buf);
    /* n bytes from host src to device dst (a weight buffer is written only
     * this way, once, before it is sealed). */
    void (*upload)(const KnCtx *ctx, void *dst, const void *src, size_t n);
    /* n bytes from device src to host dst; returns when dst holds them. */
    void (*download)(const KnCtx *ctx, void *dst, const void *src, size_t n);
    /* n bytes from device src to device dst (may not overlap). */
    void (*copy)(const KnCtx *ctx, void *dst, const void *src, size_t n);
    /* n bytes of device dst set to byte value. */
    void (*memset)(const KnCtx *ctx, void *dst, int value, size_t n);
    /* Waits for all work submitted on ctx; GF_DEVICE with the fault, if any. */
    GfStatus (*synchronize)(const KnCtx *ctx, GfError *err);
    /* 1 when op accepts weights of dtype w on this backend. */
    int (*supports)(const KnCtx *ctx, KnOpId op, KnDtype w);
    /* (optional; NULL: none) Bytes of device memory a context of ctx's
     * precision holds for itself once call has run: the scratch the call
     * grows (a context keeps its largest) and the workspaces the context
     * holds from its start. A run of calls needs the most of their answers
     * beyond its own buffers. Reads only ctx->precision: a pure function,
     * callable without a device (kn_backend_ops). */
    size_t (*scratch_bytes)(const KnCtx *ctx, const KnCall *call);
    /* (optional; NULL: none) Recording a run of ops to submit as one unit
     * and launching it again (CUDA: a stream capture launched as a CUDA
     * graph, so a decode step's hundreds of small launches reach the device
     * at once, and from then on without the host making them). bucket
     * names the run's shape (the caller's choice; a backend keeps a few
     * buckets' graphs); sig[sig_bytes] is the caller's promise that two runs
     * of a bucket with equal signatures submit the same ops with the same
     * arguments, only device memory's contents differing (NULL: no
     * promise, never replayed). graph_begin answers
     *   KN_GRAPH_NONE: nothing recorded this time: submit the ops as
     *     usual, and no graph_end;
     *   KN_GRAPH_OFF: as KN_GRAPH_NONE, and the context will record
     *     nothing for the rest of its life (switched off, or given up
     *     after recordings that kept failing);
     *   KN_GRAPH_RECORD: recording: the ops submitted until graph_end are
     *     recorded, not run. Only ops, copy and memset may be submitted
     *     then; an upload, download, alloc, free or synchronize is refused
     *     (does nothing; alloc fails) and makes the recording fail, as does
     *     an op that would grow the context's scratch;
     *   KN_GRAPH_REPLAY: the bucket's graph, recorded under an equal
     *     signature, is what graph_end launches: submit nothing between.
     * graph_end answers 0 when the recording or the replay was submitted,
     * in order, and 1 when nothing of it ran: the caller then submits the
     * same ops itself. Either way the results are those of the ops run one
     * by one. */
    int (*graph_begin)(const KnCtx *ctx, int64_t bucket, const void *sig, size_t sig_bytes);
    int (*graph_end)(const KnCtx *ctx);

    /* ---- forward ---- */
    /* y[n, rows] = x[n, cols] W^T */
    void (*matmul)(const KnCtx *ctx, float *y, const float *x, KnMatrix w, int64_t n);
    /* y[n, dim] = x / rms(x) * (w ? w : 1), eps inside the root; y may alias x */
    void (*rmsnorm)(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n, int64_t dim, float eps);
    /* y[n, dim] = (r + rmsnorm(x)) * s (w as rmsnorm's): a block's normed
     * output added to the residual stream in one pass (and a layer's output
     * scaled), the bits of rmsnorm into a buffer, add, then scale (s = 1
     * is exact); y may alias r, not x */
    void (*rmsnorm_add)(const KnCtx *ctx, float *y, const float *r, const float *x, const float *w, int64_t n,
                        int64_t dim, float eps, float s);
    /* out[n_q, n_heads, dim]: q[n_q, n_heads, dim] at absolute positions
     * q_pos0.., k/v[n_keys, n_kv_heads, dim]; scale multiplies q.k */
    void (*attention)(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                      int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                      const KnMask *mask);
    /* the same over a paged store (KnKv); the same sums in the same order,
     * so the result equals attention over the keys laid out contiguously */
    void (*attention_paged)(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                            int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask);
    /* attention_paged of every sequence of a batch in one call (a decode
     * step's sequences, each with its own table and mask, over the stores
     * k, v of block_len positions per block, the same window for all):
     * the same sums in the same order as attention_paged of each alone, so
     * the result is the same. seqs is a host array of n_seqs; pos[rows]
     * (device) holds each row's absolute position, of which the call reads
     * each sequence's first (KnAttnSeq). The stores hold float32 or
     * bfloat16 (kv: KN_F32 or KN_BF16, the latter for heads of at most
     * KN_KV_BF16_MAX_DIM); bfloat16 keys and values are widened exactly as
     * they are read, so the result is the float32 one over the widened
     * stores, bit for bit. */
    void (*attention_batch)(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                            const void *v, KnDtype kv, int64_t block_len, const KnAttnSeq *seqs, int n_seqs,
                            int n_heads, int n_kv_heads, int dim, float scale, int window);
    /* attention_batch of n sequences of one query row each, described in
     * device memory: row r of q and out, at position pos[r], attends the
     * keys 0 .. pos[r] through rows[r] (a device array of n); the same sums
     * as attention_batch gives that row. A decode step's launch then
     * depends on its row count alone, not on which sequences hold its rows. */
    void (*attention_rows)(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                           const void *v, KnDtype kv, int64_t block_len, const KnAttnRow *rows, int64_t n,
                           int n_heads, int n_kv_heads, int dim, float scale, int window);
    /* attention (the same arguments) for a forward that no decode step has
     * to equal bit for bit: a training sequence's forward and its layers'
     * replays, the vision encoder. The same function within rounding, in
     * whatever order the backend sums fastest (CUDA: matmuls on cuBLAS over
     * chunks of queries, in attention_dx's scratch); the CPU kinds give
     * attention's own bits. */
    void (*attention_bulk)(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                           int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                           const KnMask *mask);
    /* x[n] = gelu_tanh(x) in place */
    void (*gelu_tanh)(const KnCtx *ctx, float *x, size_t n);
    /* the gated GELU in one pass: y[r, c] = gelu_tanh(g[r, c]) * u[r * ld_u + c]
     * over [rows, cols], the bits of gelu_tanh then mul (y may alias g) */
    void (*gelu_gate)(const KnCtx *ctx, float *y, const float *g, const float *u, int64_t rows, int64_t cols,
                      int64_t ld_u);
    /* x = cap * tanh(x / cap) */
    void (*softcap)(const KnCtx *ctx, float *x, size_t n, float cap);
    /* out[n, cols] = rows ids[n] of table, times scale */
    void (*embed_rows)(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float scale);
    /* y[n] = a + b (y may alias a or b) */
    void (*add)(const KnCtx *ctx, float *y, const float *a, const float *b, size_t n);
    /* y[r, c] = a[r, c] * b[r * ld_b + c] over [rows, cols] (y may alias a;
     * ld_b 0 broadcasts one row of b) */
    void (*mul)(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_b);
    /* y[r * ld_y + c] += a[r, c] * b[r, c] over [rows, cols] */
    void (*mul_acc)(const KnCtx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols, int64_t ld_y);
    /* out[i] = src row idx[i], for n rows of dim floats (idx < 0: out[i] untouched) */
    void (*rows_gather)(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
    /* out row idx[i] = src[i], for n rows of dim floats (distinct idx; idx < 0: skipped) */
    void (*rows_scatter)(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
    /* rows_scatter into a bfloat16 store: each float rounded as
     * kn_f32_to_bf16 rounds it (convert.h) */
    void (*rows_scatter_bf16)(const KnCtx *ctx, uint16_t *out, const float *src, const int32_t *idx, int64_t n,
                              int64_t dim);
    /* out row idx[i] += src[i] for i = 0.. in order (idx < 0: skipped) */
    void (*rows_sum)(const KnCtx *ctx, float *out, const float *src, const int32_t *idx, int64_t n, int64_t dim);
    /* out[i, :] += row ids[i] of table (ids < 0: skipped); row holds table.cols floats */
    void (*embed_rows_add)(const KnCtx *ctx, float *out, KnMatrix table, const int32_t *ids, int64_t n, float *row);
    /* y[n] = min(max(x, lo), hi) (y may alias x) */
    void (*clamp)(const KnCtx *ctx, float *y, const float *x, size_t n, float lo, float hi);
    /* y[n] = (x + shift) * s (y may alias x) */
    void (*scale_shift)(const KnCtx *ctx, float *y, const float *x, size_t n, float shift, float s);
    /* x[r, c] = (x[r, c] - bias[c]) * scale[c] over [rows, cols] */
    void (*standardize)(const KnCtx *ctx, float *x, int64_t rows, int64_t cols, const float *bias, const float *scale);
    /* The cross-entropy of rows of logits z[rows, V] against targets[rows],
     * after cap * tanh(z / cap) when cap > 0: loss[r] = logsumexp - z[target]
     * (double). With grad, z is replaced by scale * d(loss)/d(z before the
     * cap); without, z is left softcapped. */
    void (*xent_softcap)(const KnCtx *ctx, double *loss, float *z, const int32_t *targets, int64_t rows, int64_t V,
                         float cap, float scale, int grad);
    /* ids[n] = the next token of each row of logits[n, V] under rows[n]
     * (whose rng advance); scratch holds 8 V bytes */
    void (*sample)(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                   void *scratch);
    /* torch's AdamW on n parameters p with gradients g and moments m, v
     * (all updated in place but g) */
    void (*adamw)(const KnCtx *ctx, float *p, const float *g, float *m, float *v, size_t n, const KnAdamW *h);
    /* *out (device double) = sum of x[i]^2, accumulated in double in an
     * order that n alone decides, the same on every run (the CPU kinds:
     * index order; CUDA: slices, then their sums) */
    void (*sq_norm)(const KnCtx *ctx, double *out, const float *x, size_t n);
    /* x[n] *= s */
    void (*scale)(const KnCtx *ctx, float *x, size_t n, float s);
    /* kept[i] = x[i] rounded to bfloat16, the bits of kn_f32_to_bf16
     * (convert.h: to nearest even, NaN stays NaN), and x[i] = kept[i]
     * widened: an activation kept in half the bytes, the computation going
     * on from exactly what was kept */
    void (*round_bf16)(const KnCtx *ctx, uint16_t *kept, float *x, size_t n);
    /* y[i] = x[i] widened from bfloat16 to float32 (exact) */
    void (*widen_bf16)(const KnCtx *ctx, float *y, const uint16_t *x, size_t n);
    /* RoPE at each row's own position, in place on x [n_rows, n_heads, *]:
     * the half-split rotation with inverse frequencies inv_freq[dim / 2]
     * (zeros pass through);
     * head h of row r starts at x + (r * n_heads + h) * ld_head and rotates
     * its first dim values at position pos[r * pos_stride] */
    void (*rope_rows)(const KnCtx *ctx, float *x, int64_t n_rows, int n_heads, int dim, int64_t ld_head,
                      const float *inv_freq, const int32_t *pos, int64_t pos_stride);
    /* rmsnorm over each head of x [n_rows, n_heads, dim] (contiguous), then
     * rope_rows at pos[r] (pos_stride 1) into y, in one pass: a head's
     * query or key norm and rotation, the bits of the two ops; y may alias x */
    void (*rmsnorm_rope)(const KnCtx *ctx, float *y, const float *x, const float *w, int64_t n_rows, int n_heads,
                         int dim, float eps, const float *inv_freq, const int32_t *pos);
    /* t[r, k] = scale * sum_j d(x)[r, j] A[k, j] for the rows of each
     * segment (t's rows are ld_t apart, ld_t >= rank); dropout_buf holds
     * 2 * in floats when a segment has dropout, else may be NULL */
    void (*lora_shrink)(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraSeg *segs, int n_segs,
                        int64_t in, float *dropout_buf);
    /* mixture-of-experts routing of n tokens over E experts, K <= 256 per
     * token: p[n, E] holds the router logits and becomes their softmax; the
     * K most probable experts (lower index first among equals) into
     * idx[n, K], their probabilities into w[n, K], and coef[n, K] =
     * w / (sum of the token's w) * expert_scale[idx] */
    void (*moe_route)(const KnCtx *ctx, int32_t *idx, float *w, float *coef, float *p, const float *expert_scale,
                      int64_t n, int E, int K);
    /* y[t] = sum_k coef[t, k] * down_e(gelu_tanh(g) * u) with [g, u] =
     * gate_up_e(x[t]) and e = idx[t, k], for n tokens x[n, H]; the experts
     * are stacked, gate_up [E * 2Im, H] and down [E * H, Im] (expert e's
     * block starts at row e * 2Im, e * H). Keeps gu[n, K, 2Im] and
     * yk[n, K, H] (each expert's output) for the backward; mm[n, K, Im] is
     * scratch */
    void (*moe_experts)(const KnCtx *ctx, float *y, const float *x, const int32_t *idx, const float *coef, float *gu,
                        float *mm, float *yk, int64_t n, int K, KnMatrix gate_up, KnMatrix down);
    /* y[r, o] += sum_k t[r, k] B[o, k] for the rows of each segment */
    void (*lora_expand)(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraSeg *segs, int n_segs,
                        int64_t out);
    /* lora_shrink and lora_expand with each of n rows' adapter read from
     * rows (a device array of n; every rank <= max_rank <= ld_t): t[r, k]
     * for k < rows[r].rank, and y[r] += its term, the same sums as a
     * serving segment gives the row; rows of rank 0 are left untouched. */
    void (*lora_rows_shrink)(const KnCtx *ctx, float *t, int64_t ld_t, const float *x, const KnLoraRow *rows, int64_t n,
                             int64_t in, int max_rank);
    void (*lora_rows_expand)(const KnCtx *ctx, float *y, const float *t, int64_t ld_t, const KnLoraRow *rows, int64_t n,
                             int64_t out);

    /* ---- backward (training): d-outputs are accumulated (+=) unless said ---- */
    /* dx[n, cols] += dy[n, rows] W: the input gradient of y = x W^T */
    void (*matmul_dx)(const KnCtx *ctx, float *dx, const float *dy, KnMatrix w, int64_t n);
    /* dx += the input gradient of rmsnorm (w may be NULL) at x for dy */
    void (*rmsnorm_dx)(const KnCtx *ctx, float *dx, const float *x, const float *w, const float *dy, int64_t n,
                       int64_t dim, float eps);
    /* dx[i] = dy[i] * gelu_tanh'(x[i]) (written, not accumulated) */
    void (*gelu_tanh_dx)(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n);
    /* gelu_gate's gradients at g, u [n] for dy [n], written: dg = gelu_tanh'(g)
     * * (dy * u) and du = dy * gelu_tanh(g), the bits of the unfused ops;
     * dg may alias g and du may alias u (each element read before written) */
    void (*gelu_gate_dx)(const KnCtx *ctx, float *dg, float *du, const float *dy, const float *g, const float *u,
                         size_t n);
    /* for dy[n, H] at moe_experts' x: dx[n, H] (written) through the
     * experts' inputs, and dc[n, K] = dy . yk (the gradient of each coef);
     * scratch holds 4 Im floats */
    void (*moe_experts_dx)(const KnCtx *ctx, float *dx, float *dc, const float *dy, const float *gu, const float *yk,
                           const int32_t *idx, const float *coef, float *scratch, int64_t n, int K, KnMatrix gate_up,
                           KnMatrix down);
    /* dlogits[n, E] (written): the gradient of moe_route's coefficients
     * dc[n, K] through the renormalization and the softmax p[n, E] */
    void (*moe_route_dx)(const KnCtx *ctx, float *dlogits, const float *dc, const int32_t *idx, const float *w,
                         const float *p, const float *expert_scale, int64_t n, int E, int K);
    /* dx[n] (= or += with accumulate) dy where lo <= x <= hi, else 0: the
     * gradient through a clamp at x */
    void (*clamp_dx)(const KnCtx *ctx, float *dx, const float *x, const float *dy, size_t n, float lo, float hi,
                     int accumulate);
    /* gt[r, k] = sum_o dy[r, o] B[o, k] (written); dB[o, k] += sum_r dy[r, o] t[r, k] */
    void (*lora_expand_dx)(const KnCtx *ctx, float *gt, const float *dy, const float *t, int64_t ld_t,
                           const KnLoraSeg *segs, int n_segs, int64_t out);
    /* with g = scale * gt: dA[k, j] += sum_r g[r, k] d(x)[r, j]; dx[r, j] +=
     * sum_k g[r, k] A[k, j] f[r, j] (dx may be NULL); dropout_buf as lora_shrink.
     * A segment whose dA is NULL adds to dx alone and reads nothing of x
     * (then x may be NULL, or a buffer dx is being written over); a segment
     * with dA or dB is a training segment either way (its rows' path) */
    void (*lora_shrink_dx)(const KnCtx *ctx, float *dx, const float *gt, int64_t ld_t, const float *x,
                           const KnLoraSeg *segs, int n_segs, int64_t in, float *dropout_buf);
    /* dq written; dk, dv accumulated: the gradients of attention (same
     * arguments as attention) for dout[n_q, n_heads, dim] */
    void (*attention_dx)(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                         const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                         int n_kv_heads, int dim, float scale, const KnMask *mask);

    /* ---- loading ---- */
    /* w [rows, cols] (F32, BF16 or F16, offset 0) quantized to
     * NF4 into q's arrays: the bits kn_nf4_quantize (nf4.h) gives on the
     * host. q is a host struct whose sizes are set (kn_nf4_shape, n = rows
     * * cols) and whose arrays are device memory; scratch is device memory
     * of kn_nf4_scratch_bytes(n). Sets q->offset, so it waits for the
     * device before returning; never inside a graph. */
    void (*nf4_quantize)(const KnCtx *ctx, struct KnNf4 *q, KnMatrix w, void *scratch);
} KnOps;

#endif
