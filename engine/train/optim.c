/* optim.c - AdamW as torch computes it, global-norm clipping, schedules. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

GfStatus adamw_init(AdamW *o, const LoraAdapter *a, double beta1, double beta2, double eps, double weight_decay,
                    GfError *err) {
    memset(o, 0, sizeof *o);
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = weight_decay;
    o->n = a->n_params;
    o->m = gf_calloc(o->n ? 2 * o->n : 1, sizeof(float), err);
    if (!o->m) return GF_NO_MEMORY;
    o->v = o->m + o->n;
    return GF_OK;
}

void adamw_free(AdamW *o) {
    free(o->m);
    memset(o, 0, sizeof *o);
}

void adamw_step(AdamW *o, const KnBackend *be, LoraAdapter *a, double lr) {
    o->step++;
    double bc1 = 1.0 - pow(o->beta1, (double)o->step), bc2 = 1.0 - pow(o->beta2, (double)o->step);
    KnAdamW h = {(float)(1.0 - lr * o->weight_decay), (float)o->beta1, (float)o->beta2, (float)o->eps,
                 (float)(lr / bc1), (float)sqrt(bc2)};
    be->ops->adamw(&be->ctx, a->params, a->grads, o->m, o->v, o->n, &h);
}

double lora_grad_norm(const KnBackend *be, const LoraAdapter *a) {
    double ss = 0.0;
    be->ops->sq_norm(&be->ctx, &ss, a->grads, a->n_params);
    return sqrt(ss);
}

double lora_clip_grads(const KnBackend *be, LoraAdapter *a, double max_norm) {
    double norm = lora_grad_norm(be, a);
    if (max_norm <= 0 || !(norm > max_norm)) return norm;
    be->ops->scale(&be->ctx, a->grads, a->n_params, (float)(max_norm / (norm + 1e-6)));
    return norm;
}

double schedule_lr(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps, int64_t step) {
    if (step < warmup_steps) return base_lr * (double)step / (double)(warmup_steps > 0 ? warmup_steps : 1);
    if (kind == SCHED_CONSTANT) return base_lr;
    double span = (double)(total_steps - warmup_steps), progress = span > 0 ? (double)(step - warmup_steps) / span : 1.0;
    if (progress > 1.0) progress = 1.0;
    if (kind == SCHED_LINEAR) return base_lr * (1.0 - progress);
    return base_lr * 0.5 * (1.0 + cos(M_PI * progress));
}
