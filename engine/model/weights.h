/* weights.h - the base model's weights, loaded once and shared: config.json,
 * the mapped checkpoint and every tensor bound by its Hugging Face name
 * (shapes checked, every tensor claimed or deliberately skipped), F16
 * matrices and small vectors widened to F32, and under QLoRA every linear of
 * the layers quantized to NF4 (at load, or where it is used: nf4_later).
 * llama.cpp's llama_model to Model's llama_context: a Model (model.h) is
 * one thread's context over weights.
 *
 * Ownership: GemmaWeights is reference counted. weights_open returns it with
 * one reference; model_new (model.h) takes another for the context's
 * lifetime; the last weights_release frees it. Threading: read-only once
 * opened (deferred NF4 is made once, under the weights' lock, by the first
 * context that needs it), so any number of contexts on any threads may run
 * on it at once; retain and release are atomic. Where: the weights live in host memory
 * (views into the mapped files, owned F32 and NF4 arrays), which the CPU
 * backend reads directly; any other device gets one copy of the tensors it
 * reads, uploaded by the first context opened on it and shared by every
 * later one (weights_impl.h, weights_on_device), freed with the weights.
 *
 * A WeightsGauge, when given, counts the bytes and copies of base weights
 * resident, from open to the last release (the server's /metrics shows it):
 * a second copy of the base is never silent.
 *
 * Errors: GF_INVALID naming the tensor and both shapes, or an unclaimed
 * tensor; GF_NO_MEMORY; the config's and the directory's errors.
 */
#ifndef GF_WEIGHTS_H
#define GF_WEIGHTS_H

#include <stdatomic.h>
#include <stdint.h>

#include "config.h"
#include "modeldir.h"
#include "tensor.h"

typedef struct GemmaWeights GemmaWeights;

typedef enum { MODEL_QUANT_NONE = 0, MODEL_QUANT_NF4 } ModelQuant;

/* Base weights resident in this process: open copies and their bytes in
 * host memory, and their copies on other devices (weights_impl.h). */
typedef struct {
    _Atomic uint64_t bytes;
    atomic_int copies;
    _Atomic uint64_t device_bytes;
    atomic_int device_copies;
    _Atomic uint64_t mapped_bytes;  /* of the device copies, kept in host memory the device reads */
} WeightsGauge;

/* The base-weight bytes g counts in the memory of a device of kind: the
 * host copies for the CPU kinds (the guarded backend's memory is host
 * memory), the device copies for CUDA. 0 when g is NULL. */
uint64_t weights_gauge_bytes(const WeightsGauge *g, KnDeviceKind kind);

/* Loads dir's config and weights (NF4 linears under MODEL_QUANT_NF4);
 * gauge (may be NULL, else must outlive the weights) counts them.
 * nf4_later: the linears are quantized where they are used rather than
 * now: on a device, by its backend as the first context there uploads
 * them (nf4_quantize, ops.h), which spares the host's cores; on the host,
 * by the first CPU context. The same bits either way, and counted at
 * their NF4 size from the start. Ignored when a stored linear is F16 (it
 * is widened at load): all are quantized now. */
GfStatus weights_open(const char *dir, ModelQuant quant, int nf4_later, WeightsGauge *gauge, GemmaWeights **out,
                      GfError *err);
/* Another reference; returns w. */
GemmaWeights *weights_retain(GemmaWeights *w);
/* Drops a reference; the last one frees the weights. NULL is a no-op. */
void weights_release(GemmaWeights *w);

const GemmaConfig *weights_config(const GemmaWeights *w);
const ModelDir *weights_dir(const GemmaWeights *w);
ModelQuant weights_quant(const GemmaWeights *w);
/* 1 when NF4 was left to where it is used (weights_open's nf4_later, not
 * ignored): quantized by a device as its copy was made. */
int weights_nf4_later(const GemmaWeights *w);
/* Bytes the engine reads at run time: the mapped tensors it uses as stored,
 * plus its own widened and NF4 arrays (unused mapped bytes excluded). */
uint64_t weights_resident_bytes(const GemmaWeights *w);

/* What the weights take in memory, for estimates (`gemmaforge preflight`).
 * The adaptable linears (text, vision, experts) as stored and in NF4; the
 * other tensors (embedding, norms, ...) stay in their stored dtype. */
typedef struct {
    uint64_t n_linears;
    uint64_t linear_params;        /* elements of those linears */
    uint64_t linear_stored_bytes;  /* as loaded now */
    uint64_t linear_full_bytes;    /* as a copy without NF4 holds them (F16 widened to F32) */
    uint64_t linear_nf4_bytes;     /* if quantized to NF4 */
    uint64_t other_bytes;          /* every other tensor of the checkpoint */
} ModelMemory;

void weights_memory(const GemmaWeights *w, ModelMemory *out);

/* Bytes of w's copy on device (kind, index) that stay in host memory the
 * device reads (the per-layer embedding table; weights_impl.h); 0 when
 * there is no such copy. Thread-safe. */
uint64_t weights_mapped_bytes(GemmaWeights *w, KnDeviceKind kind, int index);
/* Bytes of w's copy on device (kind, index) in that device's memory (every
 * tensor the model reads there, as uploaded: arena chunks whole, vectors
 * widened; not the mapped table); 0 when there is no such copy. Thread-safe. */
uint64_t weights_device_bytes(GemmaWeights *w, KnDeviceKind kind, int index);

#endif
