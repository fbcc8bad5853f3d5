/* optim.h - the optimizer of LoRA training: AdamW exactly as
 * torch.optim.AdamW (decoupled weight decay applied first, p *= 1 - lr wd;
 * moments m, v; bias corrections 1 - beta^t; denominator
 * sqrt(v) / sqrt(1 - beta2^t) + eps), gradient clipping by the global L2
 * norm (torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6)
 * when the norm exceeds it), and learning-rate schedules with linear warmup
 * (linear and cosine decay to zero at the last step as transformers'
 * get_*_schedule_with_warmup, or constant).
 *
 * The parameters are every A and B of an adapter bound for training (its
 * LoraBinding's device slabs, in pair order); the optimizer owns its moment
 * buffers (one device slab on the binding's backend). Its state (step, m,
 * v) is what a checkpoint saves to resume bit for bit (adamw_download /
 * adamw_upload move m and v).
 */
#ifndef GF_OPTIM_H
#define GF_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "lora.h"

typedef enum { SCHED_CONSTANT = 0, SCHED_LINEAR, SCHED_COSINE } ScheduleKind;

typedef struct {
    double beta1, beta2, eps, weight_decay;
    int64_t step;             /* steps taken */
    size_t n;                 /* parameters */
    float *m, *v;             /* [n] first and second moments (device memory) */
    const KnBackend *be;
    KnBuffer buf;             /* m then v */
} AdamW;

/* Moments for every parameter of b (zeroed, step 0), on b's backend. */
GfStatus adamw_init(AdamW *o, const LoraBinding *b, double beta1, double beta2, double eps, double weight_decay,
                    GfError *err);
void adamw_free(AdamW *o);
/* m and v to or from host arrays of n floats each. */
void adamw_download(const AdamW *o, float *m, float *v);
void adamw_upload(AdamW *o, const float *m, const float *v);

/* One update of every A and B of b from its dA, dB at learning rate lr. */
void adamw_step(AdamW *o, LoraBinding *b, double lr);

/* The global L2 norm of every dA, dB. */
double lora_grad_norm(const LoraBinding *b);
/* Scales the gradients so their global norm is at most max_norm (> 0);
 * returns the norm before clipping. */
double lora_clip_grads(LoraBinding *b, double max_norm);

/* The learning rate at step (0-based) of total_steps, after warmup_steps of
 * linear warmup from 0. */
double schedule_lr(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps, int64_t step);

#endif
