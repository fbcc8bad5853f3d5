/* adapter_check.h - validation of a PEFT LoRA adapter before it is accepted.
 *
 * An adapter is adapter_config.json + adapter_model.safetensors in PEFT's
 * format: tensors "base_model.model.<module>.lora_A.weight" [r, in] and
 * "...lora_B.weight" [out, r]. Checks, in order: the config is strict JSON
 * with peft_type "LORA", an integer r in 1..max_rank, a positive finite
 * lora_alpha, target_modules present, and no feature we do not apply (DoRA,
 * modules_to_save, biases, per-module rank or alpha patterns); the weights
 * file passes the strict safetensors reader; every tensor is a lora_A/lora_B
 * of a known Gemma 4 linear module (language q/k/v/o/gate/up/down and PLE
 * projections, the vision tower's inner .linear, the patch embedder's
 * input_proj, embed_vision's projection; never lm_head); A and B come in
 * pairs with rank r, in F32/BF16/F16, non-empty and finite; when the base
 * model's weights are known (`base` not NULL), the module exists there and
 * the shapes fit its [out, in]; and at least one B is non-zero (an adapter
 * that changes nothing is refused, never applied as a silent no-op).
 *
 * Errors: GF_INVALID with code adapter_corrupt (unreadable files) or
 * adapter_incompatible (readable but wrong), the message naming the tensor
 * and both shapes. Thread-safe; allocates nothing that outlives the call.
 */
#ifndef GF_ADAPTER_CHECK_H
#define GF_ADAPTER_CHECK_H

/* Values an adapter may hold, so that scale * B (A x) cannot overflow
 * float32 in the forward pass: lora_alpha up to the jobs' 4096, every
 * weight within +-1e4 (trained LoRA weights are far below 1). With rank
 * <= 1024, inputs <= 65,536 wide and activations <= 1e4 the term stays
 * under 4096 * 1024 * 65536 * 1e4^3 ~ 3e24, far from 3.4e38. */
#define ADAPTER_ALPHA_MAX 4096.0
#define ADAPTER_VALUE_MAX 1e4f

#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "safetensors.h"

typedef struct {
    int rank;                    /* r */
    double alpha;                /* lora_alpha */
    int use_rslora;              /* scale alpha/sqrt(r) instead of alpha/r */
    size_t n_modules;            /* adapted modules (A/B pairs) */
    int has_vision;              /* any module in the vision tower or embed_vision */
} AdapterInfo;

/* Shapes of the base model's weights, to check modules against (optional). */
typedef struct {
    const SafeTensors *shards;   /* the model's safetensors files */
    size_t n_shards;
} AdapterBase;

GfStatus adapter_check(const char *config_json, size_t config_len, const uint8_t *weights,
                       uint64_t weights_len, int max_rank, const AdapterBase *base,
                       AdapterInfo *info, GfError *err);

/* 1 when `module` (e.g. "model.language_model.layers.3.mlp.up_proj") is a
 * Gemma 4 linear that LoRA may adapt. */
int adapter_module_known(const char *module);

/* Splits "base_model.model.<module>.lora_X.weight" into module (cap bytes)
 * and X ('A' or 'B'); -1 when the key has another form. */
int adapter_split_key(const char *key, char *module, size_t cap, char *which);

/* Element i of an F32, BF16 or F16 tensor as float. */
float adapter_value_f32(const StTensor *t, uint64_t i);

#endif
