/* backward.h - the training loss of one sequence and the gradients of the
 * LoRA weights, by hand: the forward pass of GEMMA4.md read in reverse.
 *
 * The loss is the sum of token cross-entropies over positions t whose next
 * label labels[t + 1] is not -100 (transformers shifts labels by one), on the
 * softcapped logits; logits are materialized a few rows at a time, never the
 * whole [n, vocab]. Gradient checkpointing: the forward keeps each layer's
 * input (in bf16 when the model's checkpoints are, ModelOptions.checkpoints:
 * the forward then goes on from the rounded input, so the loss and the
 * gradients are of one function) and the K/V of the layers that store
 * them; the backward re-runs one layer at a time, then walks it in
 * reverse. Layers that share K/V pass their
 * dK/dV to the storing layer. With adapted vision linears the gradient goes on
 * through the soft tokens into the vision tower.
 *
 * Gradients are added (+=) into each bound pair's dA and dB, multiplied by
 * grad_scale: with grad_scale = 1 / (targets in the whole batch), summing the
 * calls of a batch's sequences gives the gradient of the batch's mean loss,
 * whatever the split into micro-batches.
 *
 * Ownership: a GradWorkspace holds every activation and gradient buffer for
 * sequences of up to max_tokens (sized once); it belongs to one Model and one
 * thread. The adapter's gradient buffers must be allocated (lora_grads_alloc).
 * Units: loss in nats.
 */
#ifndef GF_BACKWARD_H
#define GF_BACKWARD_H

#include <stdint.h>

#include "lora.h"
#include "model.h"

typedef struct {
    const int32_t *ids;         /* [n] token ids (image placeholders expanded) */
    const int32_t *labels;      /* [n] transformers labels (-100 = not trained) */
    const uint8_t *mm_type;     /* [n] or NULL (derived from ids) */
    int64_t n;
    /* images in the order of their placeholders, each of n_patches patches */
    const float *pixels;        /* [n_images, n_patches, 3 p^2] in [0, 1] */
    const int32_t *positions;   /* [n_images, n_patches, 2] */
    int64_t n_patches;
    int n_images;
} TrainSequence;

typedef struct GradWorkspace GradWorkspace;

/* The positions the sequence trains (labels[t + 1] != -100). */
int64_t train_sequence_targets(const TrainSequence *s);

GfStatus grad_workspace_new(Model *m, int64_t max_tokens, int max_rank, GradWorkspace **out, GfError *err);
void grad_workspace_free(GradWorkspace *w);
/* What grad_workspace_new(m, max_tokens, max_rank) allocates, in bytes (the
 * layer re-run buffers, the checkpointed layer inputs and the K/V cache),
 * with the Model's scratch that its forward and replays grow to (the
 * residual stream and the per-layer inputs: the layers run in the
 * workspace's buffers); images add model_vision_workspace_bytes each while
 * they run. */
uint64_t grad_workspace_bytes(const Model *m, int64_t max_tokens, int max_rank);
/* The device memory backend be (m's, or any other's table and precision)
 * keeps for itself over model_backward's calls on m for sequences of up to
 * max_tokens with adapter a (its dropout as set) and images of up to
 * n_patches patches (0: none), the adaptable linears in NF4 when nf4: the
 * most any one call asks (kn_scratch_bytes), since a context keeps its
 * largest scratch. 0 on a backend without scratch (the CPU). */
uint64_t grad_scratch_bytes(const Model *m, const KnBackend *be, int64_t max_tokens, const LoraAdapter *a, int nf4,
                            int64_t n_patches);

/* Forward and backward of one sequence with the adapter bound by lora (its
 * pairs need gradient buffers). *loss_sum gets the summed token losses and
 * *n_targets their count; grad_scale * d(loss_sum) is added into dA/dB.
 * GF_INVALID on bad ids or images; GF_TOO_LARGE beyond max_tokens. */
GfStatus model_backward(Model *m, GradWorkspace *w, const LoraBinding *lora, const TrainSequence *s, float grad_scale,
                        double *loss_sum, int64_t *n_targets, GfError *err);

/* The loss of one sequence without gradients (validation): the same
 * forward and cross-entropy as model_backward. */
GfStatus model_loss(Model *m, GradWorkspace *w, const LoraBinding *lora, const TrainSequence *s, double *loss_sum,
                    int64_t *n_targets, GfError *err);

#endif
