/* test_lora_dropout.c - LoRA dropout in training: with a fixed mask key the
 * loss is a deterministic function of the adapter, dropout changes it, and
 * the hand-written gradients (through the masked LoRA input and the masked
 * input gradient of every later layer) agree with central differences of
 * that loss. Runs on the dense golden model with an all-linear adapter. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "backward.h"
#include "lora.h"
#include "model.h"

#define N_TOK 24

typedef struct {
    Model *m;
    GradWorkspace *w;
    LoraAdapter *a;
    LoraBinding b;            /* the adapter on the model's device */
    TrainSequence s;
} Case;

static double loss_of(Case *c) {
    double sum = 0;
    int64_t n = 0;
    GfError err;
    CHECK_STATUS(model_loss(c->m, c->w, &c->b, &c->s, &sum, &n, &err), GF_OK, err);
    return sum;
}

/* Central difference of the summed loss in parameter j of the adapter's
 * slab (changed on the host, then uploaded) against the gradient g. */
static void check_element(Case *c, size_t j, float g, const char *what) {
    float *x = &c->a->params[j], keep = *x, h = 4e-3f;
    *x = keep + h;
    lora_binding_upload(&c->b, c->a);
    double up = loss_of(c);
    *x = keep - h;
    lora_binding_upload(&c->b, c->a);
    double down = loss_of(c);
    *x = keep;
    lora_binding_upload(&c->b, c->a);
    double fd = (up - down) / (2.0 * h);
    CHECK(fabs(fd - g) <= 0.03 * fabs(g) + 2e-3, "%s: gradient %.6f, central difference %.6f", what, g, fd);
}

/* The element of largest |gradient| in pair p's A (or B). */
static int64_t largest(const float *g, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (fabsf(g[i]) > fabsf(g[best])) best = i;
    return best;
}

int main(void) {
    Case c = {0};
    LoraAdapter *a = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = 2, .quantize = MODEL_QUANT_NONE};
    const char *all[] = {"all-linear"};
    CHECK_STATUS(model_open(GF_FIXTURES "/dense", &mo, &c.m, &err), GF_OK, err);
    if (!c.m) return check_done("test_lora_dropout");
    CHECK_STATUS(lora_create(c.m, all, 1, 4, 8.0, 0, 5, &a, &err), GF_OK, err);
    /* B away from zero, so the LoRA path (and its dropout) shows in the loss */
    uint64_t r = 99;
    for (size_t i = 0; i < a->n_pairs; i++)
        for (int64_t j = 0; j < a->pairs[i].out * a->pairs[i].rank; j++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            a->pairs[i].B[j] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) * 0.2f;
        }
    c.a = a;
    CHECK_STATUS(lora_bind(c.m, a, &c.b, &err), GF_OK, err);
    CHECK_STATUS(lora_binding_grads(&c.b, &err), GF_OK, err);
    CHECK_STATUS(grad_workspace_new(c.m, N_TOK, 4, &c.w, &err), GF_OK, err);
    int32_t ids[N_TOK], labels[N_TOK];
    int64_t vocab = model_config(c.m)->text.vocab_size;
    ids[0] = 2;
    for (int i = 1; i < N_TOK; i++) ids[i] = (int32_t)(10 + (i * 37) % (vocab - 20));
    for (int i = 0; i < N_TOK; i++) labels[i] = i < 8 ? -100 : ids[i];
    c.s = (TrainSequence){.ids = ids, .labels = labels, .n = N_TOK};
    KnBuffer row_buf = {0};
    CHECK_STATUS(model_device_alloc(c.m, &row_buf, (size_t)(2 * lora_max_in(a)) * sizeof(float), "dropout", &err), GF_OK,
                 err);
    float *row = row_buf.data;

    double plain = loss_of(&c);
    c.b.dropout = (LoraDropout){.p = 0.3f, .key = 1234, .row = row};
    double dropped = loss_of(&c), again = loss_of(&c);
    CHECK(dropped == again, "the same key draws the same masks (%.9g, %.9g)", dropped, again);
    CHECK(fabs(dropped - plain) > 1e-3, "dropout changes the loss (%.6f without, %.6f with)", plain, dropped);
    c.b.dropout.key = 4321;
    CHECK(fabs(loss_of(&c) - dropped) > 1e-4, "another key draws other masks");
    c.b.dropout.key = 1234;

    double sum;
    int64_t n;
    lora_binding_zero_grads(&c.b);
    CHECK_STATUS(model_backward(c.m, c.w, &c.b, &c.s, 1.0f, &sum, &n, &err), GF_OK, err);
    float *grads = malloc(a->n_params * sizeof *grads);
    lora_binding_download_grads(&c.b, grads);
    CHECK(fabs(sum - dropped) <= 1e-9 * fabs(dropped), "the backward's loss is the dropout loss");
    /* text layers first, middle and last; their A and B */
    const char *names[] = {"model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.2.mlp.up_proj",
                           "model.language_model.layers.5.mlp.down_proj", "model.language_model.layers.3.self_attn.o_proj"};
    for (size_t k = 0; k < sizeof names / sizeof *names; k++)
        for (size_t i = 0; i < a->n_pairs; i++) {
            LoraPair *p = &a->pairs[i];
            if (strcmp(p->module, names[k]) != 0) continue;
            size_t oa = (size_t)(p->A - a->params), ob = (size_t)(p->B - a->params);
            int64_t ja = largest(grads + oa, p->rank * p->in), jb = largest(grads + ob, p->out * p->rank);
            char what[256];
            snprintf(what, sizeof what, "%s.lora_A[%lld]", p->module, (long long)ja);
            check_element(&c, oa + (size_t)ja, grads[oa + (size_t)ja], what);
            snprintf(what, sizeof what, "%s.lora_B[%lld]", p->module, (long long)jb);
            check_element(&c, ob + (size_t)jb, grads[ob + (size_t)jb], what);
        }
    free(grads);
    model_device_free(c.m, &row_buf);
    grad_workspace_free(c.w);
    lora_binding_free(&c.b);
    lora_free(a);
    model_close(c.m);
    return check_done("test_lora_dropout");
}
