/* test_optim.c - the optimizer pieces against their definitions: torch's
 * AdamW over three steps (computed here in double from torch's formula),
 * global-norm clipping as clip_grad_norm_, and the schedules of
 * transformers' get_{constant,linear,cosine}_schedule_with_warmup. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "optim.h"

static KnBackend g_be; /* the backend the optimizer's ops run on: the CPU, or GF_DEVICE's */

/* A one-pair adapter (rank 2, 3 in, 2 out) and its binding with gradients. */
static LoraAdapter *tiny_adapter(LoraBinding *b) {
    LoraAdapter *a = calloc(1, sizeof *a);
    a->pairs = calloc(1, sizeof *a->pairs);
    a->n_pairs = 1;
    LoraPair *p = &a->pairs[0];
    p->rank = 2; p->in = 3; p->out = 2;
    p->A = calloc(6, sizeof(float)); p->B = calloc(4, sizeof(float));
    for (int i = 0; i < 6; i++) p->A[i] = 0.1f * (float)(i - 2);
    for (int i = 0; i < 4; i++) p->B[i] = -0.05f * (float)(i + 1);
    GfError err;
    memset(b, 0, sizeof *b);
    CHECK(lora_adapter_pack(a, &err) == GF_OK && a->n_params == 10, "one slab of 10 parameters");
    CHECK(lora_binding_upload_new(&g_be, a, b, &err) == GF_OK, "on the device");
    CHECK(lora_binding_grads(b, &err) == GF_OK, "gradient buffers");
    return a;
}

/* Gradients g[10] (A's 6 then B's 4) onto the device. */
static void set_grads(const LoraBinding *b, const float *g) { g_be.ops->upload(&g_be.ctx, b->grads, g, 10 * sizeof(float)); }

static void test_adamw(void) {
    LoraBinding b;
    LoraAdapter *a = tiny_adapter(&b);
    AdamW opt;
    GfError err;
    CHECK(adamw_init(&opt, &b, 0.9, 0.999, 1e-8, 0.01, &err) == GF_OK && opt.n == 10, "moments for 10 parameters");
    double ref[10], m[10] = {0}, v[10] = {0};
    for (int i = 0; i < 10; i++) ref[i] = a->params[i];
    double lr = 0.01;
    for (int step = 1; step <= 3; step++) {
        float g[10];
        for (int i = 0; i < 10; i++) {
            g[i] = (float)(0.3 * sin(step * 1.7 + i));
            ref[i] *= 1 - lr * 0.01; /* decoupled weight decay first */
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * (double)g[i] * g[i];
            double mh = m[i] / (1 - pow(0.9, step)), denom = sqrt(v[i]) / sqrt(1 - pow(0.999, step)) + 1e-8;
            ref[i] -= lr * mh / denom;
        }
        set_grads(&b, g);
        adamw_step(&opt, &b, lr);
    }
    lora_binding_download(&b, a);
    double worst = 0;
    for (int i = 0; i < 10; i++) worst = fmax(worst, fabs(a->params[i] - ref[i]));
    CHECK(worst < 1e-6 && opt.step == 3, "three AdamW steps as torch computes them (worst %.2g)", worst);
    float mh[10], vh[10];
    adamw_download(&opt, mh, vh);
    CHECK(fabs(mh[0] - m[0]) < 1e-7 && fabs(vh[9] - v[9]) < 1e-4 * v[9], "the moments come back to the host (%g %g, %g %g)", mh[0], m[0], vh[9], v[9]);
    adamw_free(&opt);
    lora_binding_free(&b);
    lora_free(a);
}

static void test_clip(void) {
    LoraBinding b;
    LoraAdapter *a = tiny_adapter(&b);
    float g[10];
    for (int i = 0; i < 10; i++) g[i] = i < 6 ? 3.0f : -4.0f;
    set_grads(&b, g);
    double norm = sqrt(6 * 9.0 + 4 * 16.0);
    CHECK(fabs(lora_grad_norm(&b) - norm) < 1e-9, "global L2 norm");
    CHECK(fabs(lora_clip_grads(&b, 1.0) - norm) < 1e-9, "clip returns the norm before clipping");
    CHECK(fabs(lora_grad_norm(&b) - 1.0 / (norm + 1e-6) * norm) < 1e-6, "clipped to max_norm (torch's + 1e-6)");
    double before = lora_grad_norm(&b);
    lora_clip_grads(&b, 5.0);
    CHECK(lora_grad_norm(&b) == before, "a norm under the limit is left alone");
    lora_binding_zero_grads(&b);
    CHECK(lora_grad_norm(&b) == 0.0, "zeroed");
    lora_binding_free(&b);
    lora_free(a);
}

static void test_schedules(void) {
    /* 100 steps, 10 of warmup, base 1e-3 */
    CHECK(schedule_lr(SCHED_LINEAR, 1e-3, 10, 100, 0) == 0.0, "warmup starts at 0");
    CHECK(fabs(schedule_lr(SCHED_COSINE, 1e-3, 10, 100, 5) - 0.5e-3) < 1e-15, "half-way through warmup");
    CHECK(fabs(schedule_lr(SCHED_LINEAR, 1e-3, 10, 100, 10) - 1e-3) < 1e-15, "peak after warmup");
    CHECK(fabs(schedule_lr(SCHED_LINEAR, 1e-3, 10, 100, 55) - 0.5e-3) < 1e-15, "linear: half-way down");
    CHECK(fabs(schedule_lr(SCHED_COSINE, 1e-3, 10, 100, 55) - 0.5e-3) < 1e-15, "cosine: half at the middle");
    CHECK(fabs(schedule_lr(SCHED_COSINE, 1e-3, 10, 100, 33) -
               1e-3 * 0.5 * (1 + cos(M_PI * 23.0 / 90.0))) < 1e-15, "cosine curve");
    CHECK(schedule_lr(SCHED_LINEAR, 1e-3, 10, 100, 100) == 0.0, "linear ends at 0");
    CHECK(schedule_lr(SCHED_CONSTANT, 1e-3, 10, 100, 99) == 1e-3, "constant after warmup");
    CHECK(schedule_lr(SCHED_CONSTANT, 1e-3, 0, 100, 0) == 1e-3, "no warmup");
}

int main(void) {
    GfError err;
    KnDeviceKind kind = KN_DEVICE_CPU;
    int index = 0;
    const char *dev = getenv("GF_DEVICE");
    if (dev && *dev && kn_backend_parse(dev, &kind, &index, &err)) return 1;
    if (kn_backend_open(kind, index, NULL, &g_be, &err)) return 1;
    test_adamw();
    test_clip();
    test_schedules();
    kn_backend_close(&g_be);
    return check_done("test_optim");
}
