/* merge.h - a LoRA adapter merged into its base: a complete Hugging Face
 * model directory that loads anywhere a Gemma 4 checkpoint loads.
 *
 * For every module the adapter adapts (language projections, PLE
 * projections, the vision tower's inner linears, its patch embedder,
 * embed_vision), the base weight W [out, in] becomes
 * W' = W + scale * B A, computed in float32 and rounded once to the output
 * dtype; every other tensor is copied byte for byte (or, with a dtype
 * given, converted). A QLoRA adapter merges into the weights as the
 * directory stores them (bf16), never into their NF4 quantization.
 *
 * The output: safetensors shards "model-0000i-of-0000N.safetensors" of at
 * most max_shard_bytes each (a larger tensor gets a shard of its own), the
 * index model.safetensors.index.json, tensor names, shapes and order the
 * base's, and the base's configuration files (config.json, generation
 * config, tokenizer files, chat template, processor config: every *.json
 * but the base's index, *.jinja, *.model, *.txt and *.md file of the base
 * directory, symlinks followed). With a dtype given, config.json's
 * top-level "dtype" says it.
 *
 * Memory stays bounded: tensors are read from the mmapped base and written
 * in blocks of a few MiB. The disk space the export needs is checked before
 * anything is written. The output is built in a hidden temporary directory
 * beside out_dir and renamed to out_dir when complete (never over an
 * existing path); on any error or cancellation the temporary directory is
 * removed. A crash leaves only a ".<name>.partial-*" directory, which the
 * next merge to the same out_dir removes.
 *
 * Errors: GF_INVALID (adapter_corrupt / adapter_incompatible from the
 * adapter's checks; invalid_model for the base; a value the dtype cannot
 * hold), GF_CONFLICT (out_dir exists), GF_NOT_FOUND (the parent of out_dir
 * is missing), GF_NO_SPACE (naming the bytes needed and free), GF_IO,
 * GF_CANCELLED. Thread-safe: everything lives in the call.
 */
#ifndef GF_MERGE_H
#define GF_MERGE_H

#include <stdint.h>

#include "base.h"
#include "lora.h"
#include "safetensors.h"

#define MERGE_SHARD_BYTES_DEFAULT 5000000000ull   /* 5 GB, as transformers shards */

typedef struct {
    const char *model_dir;      /* the base model directory */
    const char *adapter_dir;    /* adapter_config.json + adapter_model.safetensors */
    const char *out_dir;        /* must not exist; its parent must */
    int dtype;                  /* StDtype ST_BF16 / ST_F16 / ST_F32 for floating tensors, or -1: the base's */
    uint64_t max_shard_bytes;   /* 0 = MERGE_SHARD_BYTES_DEFAULT */
    /* Called after every block written with the data bytes done and the
     * total; a nonzero return cancels the merge (GF_CANCELLED). May be NULL. */
    int (*progress)(void *ctx, uint64_t done, uint64_t total);
    void *ctx;
} MergeOptions;

typedef struct {
    uint64_t n_tensors;         /* tensors written */
    uint64_t n_merged;          /* of which carry an adapter's term */
    uint64_t n_bytes;           /* tensor data bytes written */
    int n_shards;
    int n_files;                /* configuration files copied */
    double max_abs_delta;       /* largest |W' - W| over the merged weights, as stored */
    uint64_t n_unchanged;       /* merged elements that rounding left equal to W */
} MergeReport;

GfStatus merge_adapter(const MergeOptions *o, MergeReport *r, GfError *err);

/* The pieces, for other exports (GGUF): the adapter's pair whose module is
 * tensor's ("<module>.weight"), or NULL; and row r of W + scale * B A for
 * the base tensor t (2-D, F32/BF16/F16, [p->out, p->in]) as float32 into
 * out[p->in], summed as merge_adapter sums it. */
const LoraPair *merge_pair_for(const LoraAdapter *a, const char *tensor);
void merge_lora_row(const StTensor *t, const LoraPair *p, float scale, int64_t r, float *out);

#endif
