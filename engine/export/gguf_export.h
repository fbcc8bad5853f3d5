/* gguf_export.h - a Gemma 4 text model (with an adapter merged in when one
 * is given) as one GGUF file for llama.cpp's `gemma4` architecture.
 *
 * What llama.cpp's convert_hf_to_gguf.py writes for Gemma4ForConditional-
 * Generation's text model, computed here in C from the model directory:
 * - metadata: general.* (architecture "gemma4", name, file type), the
 *   `gemma4.*` hyperparameters (context and embedding length, blocks,
 *   feed-forward length per layer when it varies, heads and KV heads per
 *   layer, full and sliding head dims, sliding window and its per-layer
 *   pattern, RMS epsilon, RoPE bases and rotated dims for both layer
 *   types, final softcapping, shared-KV layers, per-layer-input width,
 *   experts), and the tokenizer: model "gemma4" (BPE on raw UTF-8 with ▁),
 *   every token with its type (control for special tokens, byte for
 *   <0xXX>), the merges, the special ids, add_bos_token and the chat
 *   template;
 * - tensors under llama.cpp's names (token_embd, blk.N.attn_q, ...,
 *   per_layer_token_embd, ffn_gate_up_exps, ...), the tied lm_head left
 *   out, norms as stored (Gemma 4's RMSNorm multiplies by the weight: no
 *   +1), the MoE router's scale and per-expert scale as ".scale" tensors,
 *   and rope_freqs: the proportional RoPE of full-attention layers as
 *   factors 1 for the rotated pairs and 1e30 for the others.
 * Types: f32, f16, bf16, or q8_0 / q4_0 for matrices whose rows are a
 * multiple of 32 (others f16); vectors, the router and rope_freqs stay f32.
 * The vision tower is not exported (llama.cpp runs it from a separate
 * mmproj file, not written here).
 *
 * Memory stays bounded (one row at a time from the mmapped checkpoint);
 * the file appears at its path when complete. Errors as merge.h's, and
 * GF_UNSUPPORTED for a config this export cannot express (RoPE scaling).
 */
#ifndef GF_GGUF_EXPORT_H
#define GF_GGUF_EXPORT_H

#include <stdint.h>

#include "base.h"
#include "gguf.h"

typedef struct {
    const char *model_dir;
    const char *adapter_dir;    /* NULL: the base alone */
    const char *out_path;       /* must not exist */
    GgmlType type;              /* GGML_F32 / F16 / BF16 / Q8_0 / Q4_0 */
    int (*progress)(void *ctx, uint64_t done, uint64_t total);   /* nonzero cancels; may be NULL */
    void *ctx;
} GgufExportOptions;

typedef struct {
    uint64_t n_tensors, n_merged, n_bytes, n_tokens;
} GgufExportReport;

GfStatus gguf_export(const GgufExportOptions *o, GgufExportReport *r, GfError *err);

/* The adapter alone as a llama.cpp LoRA GGUF (for `--lora` on top of the
 * base's GGUF): general.type "adapter", adapter.type "lora",
 * adapter.lora.alpha = scale x rank (llama.cpp multiplies by alpha / rank,
 * so rsLoRA's alpha / sqrt(rank) is kept), and per adapted matrix
 * "<name>.lora_a" (ne {in, rank}) and "<name>.lora_b" (ne {rank, out}) in
 * f32 (o->type GGML_F32) or f16. Text-model modules only. */
GfStatus gguf_export_lora(const GgufExportOptions *o, GgufExportReport *r, GfError *err);

#endif
