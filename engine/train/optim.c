/* optim.c - AdamW as torch computes it, global-norm clipping, schedules. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

GfStatus adamw_init(AdamW *o, const LoraBinding *b, double beta1, double beta2, double eps, double weight_decay,
                    GfError *err) {
    memset(o, 0, sizeof *o);
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = weight_decay;
    o->n = b->n_params;
    if (b->be->ops->alloc(&b->be->ctx, &o->buf, (o->n ? 2 * o->n : 1) * sizeof(float), KN_F32, "the optimizer's moments",
                          err))
        return err->status;
    o->be = b->be;
    o->m = o->buf.data;
    o->v = o->m + o->n;
    o->be->ops->memset(&o->be->ctx, o->m, 0, 2 * o->n * sizeof(float));
    return GF_OK;
}

void adamw_free(AdamW *o) {
    if (o->be) o->be->ops->free(&o->be->ctx, &o->buf);
    memset(o, 0, sizeof *o);
}

void adamw_download(const AdamW *o, float *m, float *v) {
    o->be->ops->download(&o->be->ctx, m, o->m, o->n * sizeof(float));
    o->be->ops->download(&o->be->ctx, v, o->v, o->n * sizeof(float));
}

void adamw_upload(AdamW *o, const float *m, const float *v) {
    o->be->ops->upload(&o->be->ctx, o->m, m, o->n * sizeof(float));
    o->be->ops->upload(&o->be->ctx, o->v, v, o->n * sizeof(float));
}

void adamw_step(AdamW *o, LoraBinding *b, double lr) {
    o->step++;
    double bc1 = 1.0 - pow(o->beta1, (double)o->step), bc2 = 1.0 - pow(o->beta2, (double)o->step);
    KnAdamW h = {(float)(1.0 - lr * o->weight_decay), (float)o->beta1, (float)o->beta2, (float)o->eps,
                 (float)(lr / bc1), (float)sqrt(bc2)};
    b->be->ops->adamw(&b->be->ctx, b->params, b->grads, o->m, o->v, o->n, &h);
}

double lora_grad_norm(const LoraBinding *b) {
    double ss = 0.0;
    b->be->ops->sq_norm(&b->be->ctx, b->grad_sq, b->grads, b->n_params);
    b->be->ops->download(&b->be->ctx, &ss, b->grad_sq, sizeof ss);
    return sqrt(ss);
}

double lora_clip_grads(LoraBinding *b, double max_norm) {
    double norm = lora_grad_norm(b);
    if (max_norm <= 0 || !(norm > max_norm)) return norm;
    b->be->ops->scale(&b->be->ctx, b->grads, b->n_params, (float)(max_norm / (norm + 1e-6)));
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
