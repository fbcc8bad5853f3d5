/* optim.c - AdamW as torch computes it, global-norm clipping, schedules. */
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static size_t n_params(const LoraAdapter *a) {
    size_t n = 0;
    for (size_t i = 0; i < a->n_pairs; i++) n += (size_t)(a->pairs[i].rank * (a->pairs[i].in + a->pairs[i].out));
    return n;
}

GfStatus adamw_init(AdamW *o, const LoraAdapter *a, double beta1, double beta2, double eps, double weight_decay,
                    GfError *err) {
    memset(o, 0, sizeof *o);
    o->beta1 = beta1;
    o->beta2 = beta2;
    o->eps = eps;
    o->weight_decay = weight_decay;
    o->n = n_params(a);
    o->m = gf_calloc(o->n ? 2 * o->n : 1, sizeof(float), err);
    if (!o->m) return GF_NO_MEMORY;
    o->v = o->m + o->n;
    return GF_OK;
}

void adamw_free(AdamW *o) {
    free(o->m);
    memset(o, 0, sizeof *o);
}

/* torch's single-tensor AdamW on one tensor: p[n], g[n], moments m[n], v[n]. */
static void adamw_tensor(const AdamW *o, float *p, const float *g, float *m, float *v, size_t n, double lr) {
    double bc1 = 1.0 - pow(o->beta1, (double)o->step), bc2 = 1.0 - pow(o->beta2, (double)o->step);
    float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2), decay = (float)(1.0 - lr * o->weight_decay);
    float b1 = (float)o->beta1, b2 = (float)o->beta2, eps = (float)o->eps;
    for (size_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] += (g[i] - m[i]) * (1.0f - b1); /* torch: m.lerp_(g, 1 - beta1) */
        v[i] = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        p[i] -= step_size * m[i] / denom;
    }
}

void adamw_step(AdamW *o, LoraAdapter *a, double lr) {
    o->step++;
    size_t off = 0;
    for (size_t i = 0; i < a->n_pairs; i++) {
        LoraPair *p = &a->pairs[i];
        size_t na = (size_t)(p->rank * p->in), nb = (size_t)(p->out * p->rank);
        adamw_tensor(o, p->A, p->dA, o->m + off, o->v + off, na, lr);
        off += na;
        adamw_tensor(o, p->B, p->dB, o->m + off, o->v + off, nb, lr);
        off += nb;
    }
}

double lora_grad_norm(const LoraAdapter *a) {
    double ss = 0.0;
    for (size_t i = 0; i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        for (int64_t j = 0; j < p->rank * p->in; j++) ss += (double)p->dA[j] * p->dA[j];
        for (int64_t j = 0; j < p->out * p->rank; j++) ss += (double)p->dB[j] * p->dB[j];
    }
    return sqrt(ss);
}

double lora_clip_grads(LoraAdapter *a, double max_norm) {
    double norm = lora_grad_norm(a);
    if (max_norm <= 0 || !(norm > max_norm)) return norm;
    float c = (float)(max_norm / (norm + 1e-6));
    for (size_t i = 0; i < a->n_pairs; i++) {
        LoraPair *p = &a->pairs[i];
        for (int64_t j = 0; j < p->rank * p->in; j++) p->dA[j] *= c;
        for (int64_t j = 0; j < p->out * p->rank; j++) p->dB[j] *= c;
    }
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
