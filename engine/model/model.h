/* model.h - the Gemma 4 language model on the engine's compute backend:
 * weights bound by their Hugging Face names, and the forward pass of
 * GEMMA4.md §3 over paged KV caches, for one sequence or a batch of them
 * each with its own adapter (prefill of many tokens, or decoding one by one,
 * alone or batched, compute the same function).
 *
 * Ownership: a Model is one thread's context over GemmaWeights (weights.h,
 * shared, one reference held): it owns its backend (op table, context,
 * thread pool), its activation scratch and its step tables. KvCache and
 * KvPool are owned by the caller; a KvCache belongs to one sequence and
 * holds blocks of one pool.
 *
 * Threading: a Model is used by one thread at a time (the engine thread);
 * distinct KvCaches may be used in turn on one Model; Models on the same
 * weights run on different threads at once (serving and a training job). Errors: loading fails
 * with GF_INVALID naming the tensor and both shapes, or an unclaimed tensor;
 * forward fails only on bad ids or a full cache (GF_INVALID / GF_TOO_LARGE).
 * Units: activations float32; logits [n, vocab]; hidden states
 * [(layers + 1), n, hidden] as transformers' output_hidden_states returns them.
 */
#ifndef GF_MODEL_H
#define GF_MODEL_H

#include <stdint.h>

#include "config.h"
#include "kernels.h"
#include "kvcache.h"
#include "modeldir.h"
#include "weights.h"

typedef struct Model Model;
typedef struct LoraBinding LoraBinding;   /* lora.h */

typedef struct {
    const char *device;       /* "cpu", "guarded", "cuda[:N]"; NULL = GF_DEVICE from the environment, else the
                                 first CUDA device, else "cpu" (kn_default_device) */
    const char *precision;    /* "fp32", or "bf16" (CUDA only; KnPrecision); NULL = GF_PRECISION from the
                                 environment, else bf16 on CUDA and fp32 elsewhere */
    const char *ple;          /* where a GPU copy of the weights keeps the per-layer embedding table (E2B/E4B):
                                 "host" (pinned host memory the GPU reads, one row per token a step) or "device";
                                 NULL = GF_PLE from the environment, else "host". The first context opened on a
                                 device decides for every later one */
    const char *quantize_on;  /* where model_open's NF4 weights are quantized when the device is not the CPU:
                                 "device" (by its backend, as the first context there uploads them) or "host"
                                 (on every core at load); NULL = GF_QUANTIZE_ON from the environment, else
                                 "device". The same bits either way */
    const char *checkpoints;  /* how the training forward keeps each layer's input and the stored keys and
                                 values for the backward: "bf16" (half the bytes; the forward goes on from the
                                 rounded values, so the loss and its gradient are of one function) or "fp32";
                                 NULL = GF_CHECKPOINTS from the environment, else bf16 in the bf16 precision
                                 and fp32 in fp32 */
    int n_threads;            /* CPU threads, <= 0 = all cores */
    ModelQuant quantize;      /* NF4: every linear of the layers (text, vision, experts) quantized at load */
    GemmaWeights *weights;    /* model_open: run on these (shared) instead of loading; quantize must match */
    WeightsGauge *gauge;      /* model_open: counts the weights it loads (may be NULL) */
    int64_t moe_chunk;        /* tokens per call of the MoE block, the size of its tape; <= 0 = as many as
                                 64 MB of tape holds (16 to 512). In fp32 the results do not depend on it;
                                 in bf16 on a GPU the router's matmul rounds by row count */
    int64_t loss_chunk;       /* rows of logits the training loss takes at once (the tied lm_head's matmul,
                                 the cross-entropy and the head's input gradient over the whole vocabulary);
                                 <= 0 = as many as 256 MB of float logits hold (8 to 4096; 256 rows of
                                 262,144 classes). Each chunk reads the whole head: fewer rows, more reads.
                                 On the CPU kinds the results do not depend on it */
} ModelOptions;

/* Opens a context on the weights of dir: loaded (weights_open) unless
 * opts->weights gives them, then shared (GF_CONFLICT when their
 * quantization is not opts->quantize). */
GfStatus model_open(const char *dir, const ModelOptions *opts, Model **out, GfError *err);
/* A context on w (one reference taken) with its own backend and scratch:
 * one per thread, any number per weights. */
GfStatus model_new(GemmaWeights *w, const ModelOptions *opts, Model **out, GfError *err);
/* Frees the context and drops its reference to the weights. */
void model_close(Model *m);
/* fn(cls) runs after every layer of the text stack and the vision tower,
 * forward or backward, and every chunk of the training loss, the device's
 * queue drained first: a training job's device scheduler gives way to
 * serving there (devsched.h). NULL = none. */
void model_set_yield(Model *m, void (*fn)(void *cls), void *cls);
/* Decode steps whose layers ran through the backend's graphs (ops.h
 * graph_begin; CUDA graphs): recorded, replayed, and those whose graph ran
 * nothing and were submitted again op by op; and the decode steps padded
 * to a bucket of rows for a graph (forward.c). Counted and read on the
 * context's thread. */
typedef struct {
    uint64_t recorded, replayed, resubmitted, padded;
} ModelGraphStats;
void model_graph_stats(const Model *m, ModelGraphStats *out);
/* The weights the context runs on (valid while it is open; retain to keep). */
GemmaWeights *model_weights(const Model *m);
const GemmaConfig *model_config(const Model *m);
/* The backend (op table and context) the model runs on; valid until
 * model_close. Buffers the model's ops read (KV caches, soft tokens) are
 * allocated on it. */
const KnBackend *model_backend(const Model *m);
/* The checkpoint's tensors (names and shapes), e.g. to check adapters. */
const ModelDir *model_dir(const Model *m);


/* ---- forward ------------------------------------------------------------ */

typedef struct {
    const int32_t *ids;       /* [n] token ids */
    const uint8_t *valid;     /* [n] 1 = real token, 0 = padding (masked as a key); NULL = all real */
    const uint8_t *mm_type;   /* [n] 0 text, 1 image, 2 video, 3 audio; NULL = derived from ids */
    const float *soft_tokens; /* [n_image_tokens, hidden] device memory, written over image placeholders, or NULL */
    int64_t n;
    int last_logits_only;     /* logits of the last position only: [1, vocab] */
    const LoraBinding *lora;  /* adapter applied to this sequence, or NULL */
} ModelInput;

/* Runs n new tokens at positions cache->n_past.. and appends them to the
 * cache. logits [n, vocab] and hidden [(L+1), n, hidden] may be NULL. */
GfStatus model_forward(Model *m, KvCache *cache, const ModelInput *in, float *logits, float *hidden, GfError *err);

/* One sequence of a batch: its cache and its new tokens (prefill of a
 * prompt, or one decoded token), with its own adapter (in.lora). */
typedef struct {
    KvCache *cache;
    ModelInput in;
} ModelSeq;

/* Runs the new tokens of n_seqs sequences in one pass: the base weights'
 * matmuls over all their rows at once, each adapter's LoRA term over the rows
 * of the consecutive sequences that use it (order the batch by adapter to
 * compute each adapter's term once: the SGMV grouping), attention per
 * sequence over its own cache. Each sequence gets exactly the values it would
 * get alone. logits: per sequence in order, 1 row when in.last_logits_only,
 * else in.n rows, of vocab floats. Checks every sequence before running any
 * (ids, cache room, pool blocks). */
GfStatus model_forward_batch(Model *m, ModelSeq *seqs, int n_seqs, float *logits, GfError *err);

/* Device memory on the model's backend for arrays a caller keeps between
 * ops (soft tokens): GF_NO_MEMORY / GF_DEVICE naming `what`. Free with
 * model_device_free (a zeroed buffer is a no-op). model_download copies
 * bytes of device memory to the host (e.g. soft tokens to write out). */
GfStatus model_device_alloc(const Model *m, KnBuffer *buf, size_t bytes, const char *what, GfError *err);
void model_device_free(const Model *m, KnBuffer *buf);
void model_download(const Model *m, void *host, const void *dev, size_t bytes);
/* bytes of device memory from src to dst (not overlapping). */
void model_device_copy(const Model *m, void *dst, const void *src, size_t bytes);

/* model_forward_batch, then each sequence's next token from its last row's
 * logits under rows[n_seqs] (host: sampling parameters and random states,
 * advanced when drawn): ids[n_seqs] (host). Only the ids cross to the host. */
GfStatus model_forward_batch_sample(Model *m, ModelSeq *seqs, int n_seqs, KnSampleRow *rows, int32_t *ids,
                                    GfError *err);

/* The vision tower and embed_vision for one image (GEMMA4.md §6.2-§6.8):
 * pixels [n_patches, 3 p^2] in [0, 1] flattened (row, col, channel) per patch,
 * positions [n_patches][2] as (x, y), (-1, -1) for padding patches. Writes
 * the soft tokens [n_soft, text hidden] (n_soft <= n_patches / k^2) that
 * replace the image's placeholders. lora (may be NULL) adapts the tower's
 * linears. GF_INVALID when the model has no vision tower or the positions
 * are out of range. */
GfStatus model_vision_forward(Model *m, const LoraBinding *lora, const float *pixels, const int32_t *positions,
                              int64_t n_patches, float *soft, int64_t *n_soft, GfError *err);

/* Bytes the vision tower's buffers take for an image of n_patches patches,
 * for inference or for training (gradients and every layer's input kept). */
uint64_t model_vision_workspace_bytes(const Model *m, int64_t n_patches, int max_rank, int training);

/* 1 when id ends generation (the eos ids of config.json and
 * generation_config.json). */
int model_is_eos(const Model *m, int32_t id);

/* Called with each generated token; nonzero stops the generation. */
typedef int (*ModelTokenFn)(void *user, int32_t id);

/* Continues prompt for up to max_new tokens drawn under sampling (greedy:
 * all zero), handing each to fn; stops after an end-of-sequence id (handed
 * to fn too) or when fn says so. *n_out counts the tokens handed over. The
 * one decode loop of the CLI and the pipeline (the serving engine batches
 * model_forward_batch_sample itself). */
GfStatus model_generate(Model *m, const ModelInput *prompt, int64_t max_new, const KnSampleRow *sampling,
                        ModelTokenFn fn, void *user, int64_t *n_out, GfError *err);

/* Greedy continuation of prompt[0..n_prompt): writes up to max_new ids to
 * out, stopping after an end-of-sequence id; returns the count in *n_out. */
GfStatus model_generate_greedy(Model *m, const int32_t *prompt, int64_t n_prompt, int64_t max_new, int32_t *out,
                               int64_t *n_out, GfError *err);
/* The same from a full input (image soft tokens, mm types). */
GfStatus model_generate_greedy_input(Model *m, const ModelInput *prompt, int64_t max_new, int32_t *out, int64_t *n_out,
                                     GfError *err);

#endif
