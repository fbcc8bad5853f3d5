/* lora.h - LoRA adapters in PEFT's format, and where they plug into the model.
 *
 * An adapted linear computes y = x W^T + s (x A^T) B^T with A [r, in],
 * B [out, r] and s = alpha / r (alpha / sqrt(r) with rsLoRA). The base W
 * stays frozen and shared; A and B are float32 here whatever their stored
 * dtype. Files: adapter_config.json + adapter_model.safetensors with keys
 * "base_model.model.<module>.lora_A.weight" / "...lora_B.weight", <module>
 * being the Hugging Face module name ("model.language_model.layers.3.mlp.up_proj",
 * "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear": inside the
 * clippable linear, so the clamps stay around the adapted linear).
 *
 * Loading validates with adapter_check (keys, pairs, shapes against the base
 * model, finite, not a no-op) before anything is kept. Saving refuses a
 * missing, empty or non-finite tensor. lora_bind resolves an adapter's
 * modules to the model's linears: a module the model does not have is an
 * error, never ignored.
 *
 * Ownership: LoraAdapter owns its tensors in host memory; a LoraBinding
 * owns the device copy it computes with (parameters, and gradients when
 * training) and outlives nothing of the adapter. Read-only after load when
 * served: one binding may be used by many sequences at once. A trained
 * adapter's binding belongs to its trainer, which downloads the values
 * before saving.
 */
#ifndef GF_LORA_H
#define GF_LORA_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "model.h"

#define LORA_MAX_RANK 1024

typedef struct {
    char module[160];         /* HF module name, without ".weight" */
    int64_t in, out, rank;
    float *A;                 /* [rank, in] */
    float *B;                 /* [out, rank] */
    float *dA, *dB;           /* gradients of A and B (same shapes): a binding's pairs only (lora_binding_grads) */
    int index;                /* position in its adapter */
} LoraPair;

typedef struct {
    int rank;
    double alpha;
    int use_rslora;
    double dropout;
    float scale;              /* alpha / r or alpha / sqrt(r) */
    LoraPair *pairs;
    size_t n_pairs;
    /* every pair's A then B, pair after pair, in one slab of host memory
     * (the file's copy; a binding uploads it whole to the device) */
    float *params;            /* [n_params] */
    size_t n_params;
} LoraAdapter;

/* The linears of a text layer and of a vision layer that LoRA may adapt. */
enum { LORA_Q = 0, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_PLE_GATE, LORA_PLE_PROJ, LORA_TEXT_SLOTS };
enum { LORA_VISION_SLOTS = 7 };

/* LoRA dropout in training (PEFT: the adapter sees dropout(x), the frozen
 * linear sees x). The mask of element j of row i of a pair's input is a
 * hash of (key, the pair's index, i, j): the checkpointing forward, the
 * re-run and the backward of one sequence draw the same mask without storing
 * it, and a resumed run draws the same masks again. */
typedef struct {
    float p;                  /* drop probability; 0 = off (inference, evaluation) */
    uint64_t key;             /* one stream per training sequence */
    float *row;               /* scratch of 2 x the largest input width, owned by the trainer */
} LoraDropout;

/* An adapter on a backend: its parameters uploaded into one device slab
 * (and, for training, its gradients in another, same layout), its pairs
 * copied with A, B (dA, dB) pointing there, and where each pair applies
 * (NULL = not adapted). The adapter's host slab is not read again until
 * lora_binding_download brings the device's values back. */
struct LoraBinding {
    float scale;
    LoraDropout dropout;      /* training only; zero when serving */
    const LoraPair **text;    /* [n_layers * LORA_TEXT_SLOTS] */
    const LoraPair **vision;  /* [vision layers * LORA_VISION_SLOTS] */
    const LoraPair *ple_model_proj, *input_proj, *embed_proj;
    int n_layers, n_vision_layers;
    int max_rank;             /* largest rank bound (scratch sizing) */
    const KnBackend *be;      /* where the slabs live */
    LoraPair *pairs;          /* [n_pairs] the adapter's pairs, on the device */
    size_t n_pairs, n_params;
    float *params, *grads;    /* [n_params] device slabs; grads NULL until lora_binding_grads */
    double *grad_sq;          /* device: the gradients' squared norm (after grads in d_grads) */
    KnBuffer d_params, d_grads;
    /* SHA-256 of what the binding's text segments pass to the kernels by
     * value (scale, and each text slot's pair: its device A, B, dA, dB,
     * rank and index), set by lora_bind and lora_binding_grads: two
     * bindings with equal digests launch the same LoRA terms, whatever
     * their addresses (a decode step's graph signature, forward.c) */
    uint8_t launch_digest[32];
};

/* Moves every pair's A and B (separately allocated) into one slab
 * (a->params) in pair order, A before B. Loaders and lora_create do this;
 * code that builds an adapter by hand calls it once before use. */
GfStatus lora_adapter_pack(LoraAdapter *a, GfError *err);

/* Reads and validates DIR/adapter_config.json + DIR/adapter_model.safetensors
 * against the model m. */
GfStatus lora_load_dir(const char *dir, const Model *m, int max_rank, LoraAdapter **out, GfError *err);
/* The same against the base model's weight shapes alone (a model directory
 * opened without loading its weights, e.g. for merging). */
GfStatus lora_load_checked(const char *dir, const AdapterBase *base, int max_rank, LoraAdapter **out, GfError *err);
void lora_free(LoraAdapter *a);

/* Writes the adapter in PEFT's format (config + F32 weights) into dir, which
 * must exist. target_modules lists the module names. */
GfStatus lora_save_dir(const LoraAdapter *a, const char *dir, GfError *err);

/* Resolves every pair of a to a linear of m and uploads a's parameters to
 * m's backend (GF_NO_MEMORY / GF_DEVICE when they do not fit). The binding
 * does not refer to a afterwards. */
GfStatus lora_bind(const Model *m, const LoraAdapter *a, LoraBinding *b, GfError *err);
/* lora_bind without the upload: the binding takes *slab (device memory
 * that m's backend can address, e.g. a trainer's parameter slab on the same
 * device, holding a's parameters in a's packed layout) and zeroes it. On
 * failure *slab stays the caller's. GF_INVALID when it is too small. */
GfStatus lora_bind_adopt(const Model *m, const LoraAdapter *a, KnBuffer *slab, LoraBinding *b, GfError *err);
/* The device half of lora_bind alone (no model: no slots resolved), for
 * the optimizer's tests. */
GfStatus lora_binding_upload_new(const KnBackend *be, const LoraAdapter *a, LoraBinding *b, GfError *err);
void lora_binding_free(LoraBinding *b);

/* Training: a zeroed gradient slab (dA, dB of every pair); zero clears it. */
GfStatus lora_binding_grads(LoraBinding *b, GfError *err);
/* Device bytes of that slab for n_params parameters: the gradients, then
 * their squared norm's double (8-aligned). */
uint64_t lora_grads_bytes(uint64_t n_params);
void lora_binding_zero_grads(LoraBinding *b);
/* The device's parameters into a's host slab (a must be the adapter bound:
 * same pairs), or a's host slab onto the device. */
void lora_binding_download(const LoraBinding *b, LoraAdapter *a);
void lora_binding_upload(const LoraBinding *b, const LoraAdapter *a);
/* The gradients into host[n_params] (the params' layout). */
void lora_binding_download_grads(const LoraBinding *b, float *host);

/* The HF module name of a text or vision linear (for binding and for
 * creating adapters); returns 0, or -1 when the slot does not exist there
 * (a KV-shared layer has no k/v, k_eq_v has no v, no PLE without PLE). */
int lora_text_module(const Model *m, int layer, int slot, char *buf, size_t cap);
int lora_vision_module(const Model *m, int layer, int slot, char *buf, size_t cap);

/* y[n, out] += scale * (d(x)[n, in] A^T) B^T with the binding's scale and
 * dropout d (the identity when off), on backend be; y, x and tmp (n * rank
 * floats) are device memory. */
void lora_apply(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *y, const float *x, int64_t n,
                float *tmp);

/* The kernel segment of pair p under b for rows [row0, row0 + n) of a batch. */
KnLoraSeg lora_segment(const LoraBinding *b, const LoraPair *p, int64_t row0, int64_t n);

/* Every segment's term in one grouped call (SGMV):
 * y[rows, out] += the adapter term of each segment's rows of x[rows, in];
 * tmp holds rows * ld_tmp floats, ld_tmp >= every segment's rank;
 * dropout_buf (2 * in floats) when a segment has dropout, else NULL. */
void lora_apply_segments(const KnBackend *be, const KnLoraSeg *segs, int n_segs, float *y, const float *x, int64_t in,
                         int64_t out, float *tmp, int64_t ld_tmp, float *dropout_buf);

/* The adapter's part of a linear's backward, for dy[n, out] at input
 * x[n, in]: dx[n, in] += d'(scale (dy B) A) (dx may be NULL), p->dA += scale
 * (dy B)^T d(x), p->dB += scale dy^T (d(x) A^T). tmp holds 2 * n * rank
 * floats. Device memory, as lora_apply. */
void lora_backward(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *dx, const float *dy,
                   const float *x, int64_t n, float *tmp);

/* lora_backward in two halves, for a linear whose input x shares its
 * buffer with dx (the frozen linear's input gradient is written over x
 * between them): lora_backward_weights adds p->dA and p->dB, reading x,
 * and leaves dy B in tmp; lora_backward_input then adds the term's part of
 * dx from that tmp, reading nothing of x. The same sums as lora_backward. */
void lora_backward_weights(const KnBackend *be, const LoraBinding *b, const LoraPair *p, const float *dy,
                           const float *x, int64_t n, float *tmp);
void lora_backward_input(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *dx, int64_t n,
                         const float *tmp);

/* 1 when p adapts a linear of the vision tower or its embedder (run on an
 * image's patches or soft tokens, not on the text rows). */
int lora_pair_vision(const LoraPair *p);

/* 1 when one of pairs[n] is such a pair: an adapter's or a binding's pairs
 * (its images then run the tower's training buffers, not its inference
 * ones). */
int lora_pairs_vision(const LoraPair *pairs, size_t n);

/* The largest input width of a's pairs (the dropout scratch is twice it). */
int64_t lora_max_in(const LoraAdapter *a);

/* A new adapter on the modules of m that PEFT's target_modules select:
 * "all-linear" (every adaptable linear: text q/k/v/o/gate/up/down and PLE
 * projections, the vision tower's inner linears, its patch embedder and
 * embed_vision; never lm_head), or module names matched as PEFT does (equal,
 * or ending in "." + target). A is drawn as PEFT's default init
 * (kaiming-uniform with a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in))) from seed, B is
 * zero. GF_INVALID naming the target that matches no module. */
GfStatus lora_create(const Model *m, const char *const *targets, size_t n_targets, int rank, double alpha,
                     int use_rslora, uint64_t seed, LoraAdapter **out, GfError *err);



#endif
