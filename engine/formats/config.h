/* config.h - a Gemma 4 config.json as C structs, with every derived per-layer
 * quantity of GEMMA4.md §1.3 resolved at load: layer types (last layer forced
 * full), RoPE per layer type, head dim and KV heads per layer
 * (per_layer_config, or global_head_dim / num_global_key_value_heads of
 * older configs), KV sharing (store layer per type), double-wide MLPs.
 *
 * Nothing here is specific to a model size: all values come from the file or
 * from the documented defaults. Parsing is strict (jsoncheck) and every
 * number is range-checked; an error names the field. GemmaConfig owns its
 * per-layer array (gemma_config_free). Read-only after load; thread-safe.
 */
#ifndef GF_CONFIG_H
#define GF_CONFIG_H

#include <stdint.h>

#include "base.h"

typedef enum { LAYER_SLIDING = 0, LAYER_FULL = 1 } LayerKind;

#define MOE_MAX_TOP_K 64          /* experts per token the engine supports */

typedef struct {
    float theta;              /* rope_theta */
    int proportional;         /* rope_type "proportional" (else default) */
    float partial;            /* partial_rotary_factor (proportional only) */
    float factor;             /* divides every inverse frequency */
} RopeParams;

typedef struct {
    LayerKind kind;
    int head_dim;             /* D_i */
    int kv_heads;             /* KVH_i */
    int kv_shared;            /* 1: reads K/V of store_layer */
    int store_layer;          /* the layer whose K/V this layer uses (itself when not shared) */
    int k_eq_v;               /* full layer with attention_k_eq_v: no v_proj */
    int intermediate;         /* I_i */
} LayerConfig;

typedef struct {
    int vocab_size, hidden_size, intermediate_size, n_layers, n_heads;
    int head_dim, kv_heads;                 /* defaults of sliding layers */
    float rms_eps;
    int sliding_window;
    int max_positions;                      /* max_position_embeddings: the context it was trained for; 0 = not given */
    float final_softcap;                    /* 0 = none */
    int bidirectional_vision;               /* use_bidirectional_attention == "vision" */
    int ple_dim, ple_vocab;                 /* hidden_size_per_layer_input, vocab_size_per_layer_input */
    int n_kv_shared, first_shared;
    int attention_k_eq_v, double_wide_mlp;
    int moe, n_experts, top_k_experts, moe_intermediate;
    int pad_id, bos_id;
    int eos_ids[8], n_eos;
    RopeParams rope[2];                     /* by LayerKind */
    LayerConfig *layers;                    /* [n_layers], owned */
} TextConfig;

typedef struct {
    int present;
    int hidden_size, intermediate_size, n_layers, n_heads, kv_heads, head_dim;
    float rms_eps, rope_theta;
    int pooling_kernel, patch_size, position_embedding_size;
    int clipped_linears, standardize;
} VisionConfig;

typedef struct {
    TextConfig text;
    VisionConfig vision;
    int has_audio;
    int image_token_id, video_token_id, audio_token_id, boi_token_id, eoi_token_id;
    int tie_word_embeddings;
} GemmaConfig;

/* Parses config.json text. On failure cfg is freed and err names the field. */
GfStatus gemma_config_parse(const char *json, size_t len, GemmaConfig *cfg, GfError *err);

/* Reads DIR/config.json (and eos ids from DIR/generation_config.json when
 * present). */
GfStatus gemma_config_load(const char *dir, GemmaConfig *cfg, GfError *err);

void gemma_config_free(GemmaConfig *cfg);

#endif
