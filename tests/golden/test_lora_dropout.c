/* test_lora_dropout.c - LoRA dropout in training: with a fixed mask key the
 * loss is a deterministic function of the adapter, dropout changes it, and
 * the hand-written gradients (through the masked LoRA input and the masked
 * input gradient of every later layer) agree with central differences of
 * that loss. Runs on the dense golden model with an all-linear adapter;
 * on the moe model, a training step with three tokens per MoE call equals
 * one with the whole sequence in one call. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "backward.h"
#include "cuda/att_gemm.h"
#include "lora.h"
#include "lora_fill.h"
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

/* The backend's own memory over a training step (grad_scratch_bytes), as a
 * fit check counts it: none on the CPU; on CUDA (its table asked without a
 * device, when built) the largest call's: in fp32 a dropped-out LoRA
 * segment (every text pair's input at max_tokens rows, as float) or
 * attention's chunk of scores (att_gemm.h: every query at this length); in
 * bf16 also the rounded operands of the widest matmul. */
static void check_scratch(Model *m, LoraAdapter *a) {
    const int64_t T = 512;
    a->dropout = 0.1;
    const char *kind = model_backend(m)->name;
    if (strcmp(kind, "cpu") == 0 || strcmp(kind, "guarded") == 0) /* not where GF_DEVICE put the model on a GPU */
        CHECK(grad_scratch_bytes(m, model_backend(m), T, a, 0, 0) == 0, "the CPU keeps no scratch");
    const KnOps *ops = kn_backend_ops(KN_DEVICE_CUDA);
    if (!ops) return;
    KnBackend f32 = {.ops = ops, .ctx = {.device = KN_DEVICE_CUDA, .precision = KN_PRECISION_FP32}}, b16 = f32;
    b16.ctx.precision = KN_PRECISION_BF16;
    KnCall none = {.op = KN_OP_COUNT};
    uint64_t ws = kn_scratch_bytes(&f32, &none), widest = 0, widest_io = 0, widest_vision = 0;
    for (size_t i = 0; i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        if (strstr(p->module, "vision")) {
            if ((uint64_t)p->in > widest_vision) widest_vision = (uint64_t)p->in;
            continue;
        }
        if ((uint64_t)p->in > widest) widest = (uint64_t)p->in;
        if ((uint64_t)p->out > widest_io) widest_io = (uint64_t)p->out;
    }
    if (widest > widest_io) widest_io = widest;
    const TextConfig *t = &model_config(m)->text;
    uint64_t lora = (uint64_t)T * widest * sizeof(float), att = 0;
    for (int i = 0; i < t->n_layers; i++) {
        uint64_t l = att_gemm_scratch_bytes(T, T, t->n_heads, t->layers[i].head_dim, ATT_GEMM_BUDGET);
        if (l > att) att = l;
    }
    uint64_t got = grad_scratch_bytes(m, &f32, T, a, 0, 0);
    CHECK(got == ws + (lora > att ? lora : att), "fp32 with dropout: %llu, the widest segment %llu, attention %llu",
          (unsigned long long)got, (unsigned long long)lora, (unsigned long long)att);
    if (widest_vision) { /* the vision tower's pairs run on the patches */
        uint64_t vis = grad_scratch_bytes(m, &f32, T, a, 0, 8 * T);
        CHECK(vis >= ws + (uint64_t)8 * T * widest_vision * sizeof(float), "a vision segment of %lld patches: %llu",
              (long long)(8 * T), (unsigned long long)vis);
    }
    a->dropout = 0;
    got = grad_scratch_bytes(m, &f32, T, a, 0, 0);
    CHECK(got == ws + att, "fp32 without dropout: attention_dx's %llu, got %llu", (unsigned long long)att,
          (unsigned long long)got);
    uint64_t b = grad_scratch_bytes(m, &b16, T, a, 1, 0);
    /* >= got: attention's chunk of scores, the same in both, may outweigh the operands */
    CHECK(b >= ws + (uint64_t)T * widest_io * 2 && b >= got, "bf16: the widest matmul's operands (%llu)",
          (unsigned long long)b);
    CHECK(grad_scratch_bytes(m, &b16, 2 * T, a, 1, 0) > b, "more tokens, more scratch");
}

/* The gradients of an adapter on a fixture (its own B away from zero,
 * dropout on), opened with mo: *grads[*n_params] (malloc'd), *exact when
 * the backend computes a row the same whatever else is in its call (the
 * CPU kinds); the summed loss returned. */
static double chunk_grads(const char *variant, ModelOptions mo, const int32_t *ids, const int32_t *labels, float **grads,
                          size_t *n_params, int *exact) {
    char dir[512];
    Model *m = NULL;
    LoraAdapter *a = NULL;
    LoraBinding b;
    GradWorkspace *w = NULL;
    KnBuffer row_buf = {0};
    GfError err;
    const char *all[] = {"all-linear"};
    *grads = NULL;
    *n_params = 0;
    snprintf(dir, sizeof dir, "%s/%s", GF_FIXTURES, variant);
    CHECK_STATUS(model_open(dir, &mo, &m, &err), GF_OK, err);
    if (!m) return 0;
    *exact = strcmp(model_backend(m)->name, "cpu") == 0 || strcmp(model_backend(m)->name, "guarded") == 0;
    CHECK_STATUS(lora_create(m, all, 1, 4, 8.0, 0, 7, &a, &err), GF_OK, err);
    for (size_t i = 0; i < a->n_pairs; i++)
        for (int64_t j = 0; j < a->pairs[i].out * a->pairs[i].rank; j++) a->pairs[i].B[j] = 0.01f * (float)((j * 7 + (int64_t)i) % 13 - 6);
    CHECK_STATUS(lora_bind(m, a, &b, &err), GF_OK, err);
    CHECK_STATUS(lora_binding_grads(&b, &err), GF_OK, err);
    CHECK_STATUS(grad_workspace_new(m, N_TOK, 4, &w, &err), GF_OK, err);
    CHECK_STATUS(model_device_alloc(m, &row_buf, (size_t)(2 * lora_max_in(a)) * sizeof(float), "dropout", &err), GF_OK, err);
    b.dropout = (LoraDropout){.p = 0.2f, .key = 77, .row = row_buf.data};
    TrainSequence s = {.ids = (int32_t *)ids, .labels = (int32_t *)labels, .n = N_TOK};
    double sum = 0;
    int64_t n = 0;
    lora_binding_zero_grads(&b);
    CHECK_STATUS(model_backward(m, w, &b, &s, 1.0f, &sum, &n, &err), GF_OK, err);
    *n_params = a->n_params;
    *grads = malloc(a->n_params * sizeof **grads);
    lora_binding_download_grads(&b, *grads);
    model_device_free(m, &row_buf);
    grad_workspace_free(w);
    lora_binding_free(&b);
    lora_free(a);
    model_close(m);
    return sum;
}

/* A training step on variant opened with `one` and with `other` (options
 * that only cut its work into other calls) gives the same loss and every
 * gradient, bit for bit on the CPU backends. */
static void check_same_step(const char *variant, ModelOptions one, ModelOptions other, const char *what) {
    int32_t ids[N_TOK], labels[N_TOK];
    ids[0] = 2;
    for (int i = 1; i < N_TOK; i++) ids[i] = (int32_t)(10 + (i * 53) % 200);
    for (int i = 0; i < N_TOK; i++) labels[i] = i < 4 ? -100 : ids[i];
    float *g1, *g2;
    size_t n1, n2;
    int exact;
    double l1 = chunk_grads(variant, one, ids, labels, &g1, &n1, &exact);
    double l2 = chunk_grads(variant, other, ids, labels, &g2, &n2, &exact);
    CHECK(g1 && g2 && n1 == n2 && n1 > 0, "%s: the same adapter twice", what);
    if (!g1 || !g2 || n1 != n2) { free(g1); free(g2); return; }
    double tol = exact ? 0.0 : 1e-5, worst = 0, scale = 0;
    for (size_t i = 0; i < n1; i++) {
        worst = fmax(worst, fabs((double)g1[i] - g2[i]));
        scale = fmax(scale, fabs((double)g1[i]));
    }
    printf("%s: loss %.9g vs %.9g, max |gradient difference| %g of %g\n", what, l1, l2, worst, scale);
    CHECK(scale > 0 && l1 > 0, "%s: the adapter has gradients", what);
    CHECK(fabs(l1 - l2) <= tol * fabs(l1) && worst <= tol * scale, "%s change the training step", what);
    free(g1);
    free(g2);
}

/* The MoE block's training forward and backward three tokens per call
 * give what the default (one call for the whole sequence here) gives; the
 * loss over chunks of three rows of logits (the last one short), what one
 * chunk of the sequence's 19 trained rows gives. */
static void check_chunks(void) {
    ModelOptions mo = {.n_threads = 2, .quantize = MODEL_QUANT_NONE}, three = mo;
    three.moe_chunk = 3;
    check_same_step("moe", mo, three, "3 tokens per MoE call");
    three = mo;
    three.loss_chunk = 3;
    check_same_step("dense", mo, three, "3 rows of logits per loss chunk");
}

int main(void) {
    Case c = {0};
    LoraAdapter *a = NULL;
    GfError err;
    /* central differences measure the float32 function: layer checkpoints and
     * stored keys and values in fp32 whatever GF_CHECKPOINTS says (in bf16
     * they would measure its rounding steps) */
    ModelOptions mo = {.n_threads = 2, .quantize = MODEL_QUANT_NONE, .checkpoints = "fp32"};
    const char *all[] = {"all-linear"};
    CHECK_STATUS(model_open(GF_FIXTURES "/dense", &mo, &c.m, &err), GF_OK, err);
    if (!c.m) return check_done("test_lora_dropout");
    CHECK_STATUS(lora_create(c.m, all, 1, 4, 8.0, 0, 5, &a, &err), GF_OK, err);
    check_scratch(c.m, a);
    /* B away from zero, so the LoRA path (and its dropout) shows in the loss */
    lora_fill_b(a);
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
    check_chunks();
    return check_done("test_lora_dropout");
}
