/* modeldir.h - a Hugging Face model directory as published: config.json and
 * the weights (model.safetensors, or shards listed by
 * model.safetensors.index.json).
 *
 * model_dir_open() parses config.json strictly (it must describe a Gemma 4
 * model: model_type "gemma4") and opens every weight file with the strict
 * safetensors reader (mmapped, headers validated, data not touched), and
 * checks that the index's weight map names only tensors that exist in the
 * named shard. Shard names must be plain file names inside the directory.
 * The result is what the server needs before the engine runs: a name and the
 * shapes of the base weights (adapters are checked against them).
 *
 * Ownership: ModelDir owns its shards until model_dir_close(). Read-only
 * afterwards; may be shared between threads.
 */
#ifndef GF_MODELDIR_H
#define GF_MODELDIR_H

#include "adapter_check.h"
#include "base.h"
#include "safetensors.h"

#define MODEL_MAX_SHARDS 256

typedef struct {
    char name[256];                 /* the directory's last path component */
    char model_type[64];            /* "gemma4" */
    SafeTensors *shards;
    size_t n_shards;
    uint64_t n_tensors, n_bytes;    /* over all shards */
    AdapterBase base;               /* views of shards for adapter checks */
} ModelDir;

GfStatus model_dir_open(const char *dir, ModelDir *md, GfError *err);
void model_dir_close(ModelDir *md);

#endif
