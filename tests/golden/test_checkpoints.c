/* test_checkpoints.c - the training forward's layer inputs and stored keys
 * and values kept in bf16 (ModelOptions.checkpoints, the default in the
 * bf16 precision). On each
 * golden model (dense, ple, moe) with an all-linear adapter whose B is away
 * from zero: the loss and the gradients with bf16 checkpoints are within
 * bf16's rounding of the fp32 ones and differ from them (the rounding took
 * place); the backward's loss is model_loss's (to 1e-9), in both modes
 * (the forward goes on from what it kept, so the loss and its gradient are
 * of one function); the workspace is smaller by what the bf16 inputs save;
 * an unknown value is refused, naming the option. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "backward.h"
#include "lora.h"
#include "lora_fill.h"
#include "model.h"

#define N_TOK 24

typedef struct {
    double loss, again;       /* model_backward's, then model_loss's */
    float *grads;             /* [n_params] */
    size_t n_params;
    uint64_t bytes;           /* grad_workspace_bytes */
    int64_t layers, hidden;   /* the text stack's */
    int64_t kv, widest;       /* floats a position stores over the layers (K and V), the widest layer's K */
} Run;

/* One training step's loss and gradients on variant with checkpoints kept
 * as `mode`; 0 when the model could not be opened (reported). */
static int run(const char *variant, const char *mode, Run *out) {
    char dir[512];
    snprintf(dir, sizeof dir, "%s/%s", GF_FIXTURES, variant);
    ModelOptions mo = {.n_threads = 2, .checkpoints = mode};
    Model *m = NULL;
    LoraAdapter *a = NULL;
    LoraBinding b;
    GradWorkspace *w = NULL;
    GfError err;
    const char *all[] = {"all-linear"};
    memset(out, 0, sizeof *out);
    CHECK_STATUS(model_open(dir, &mo, &m, &err), GF_OK, err);
    if (!m) return 0;
    CHECK_STATUS(lora_create(m, all, 1, 4, 8.0, 0, 5, &a, &err), GF_OK, err);
    lora_fill_b(a);
    CHECK_STATUS(lora_bind(m, a, &b, &err), GF_OK, err);
    CHECK_STATUS(lora_binding_grads(&b, &err), GF_OK, err);
    CHECK_STATUS(grad_workspace_new(m, N_TOK, 4, &w, &err), GF_OK, err);
    int32_t ids[N_TOK], labels[N_TOK];
    int64_t vocab = model_config(m)->text.vocab_size;
    ids[0] = 2;
    for (int i = 1; i < N_TOK; i++) ids[i] = (int32_t)(10 + (i * 37) % (vocab - 20));
    for (int i = 0; i < N_TOK; i++) labels[i] = i < 8 ? -100 : ids[i];
    TrainSequence s = {.ids = ids, .labels = labels, .n = N_TOK};
    int64_t n;
    lora_binding_zero_grads(&b);
    CHECK_STATUS(model_backward(m, w, &b, &s, 1.0f, &out->loss, &n, &err), GF_OK, err);
    CHECK_STATUS(model_loss(m, w, &b, &s, &out->again, &n, &err), GF_OK, err);
    out->n_params = a->n_params;
    out->grads = malloc(a->n_params * sizeof *out->grads);
    lora_binding_download_grads(&b, out->grads);
    out->bytes = grad_workspace_bytes(m, N_TOK, 4);
    out->layers = model_config(m)->text.n_layers;
    out->hidden = model_config(m)->text.hidden_size;
    int64_t shared = 0; /* the store the layers no later layer reads share: the widest of them */
    for (int i = 0; i < out->layers; i++) {
        const TextConfig *t = &model_config(m)->text;
        const LayerConfig *l = &t->layers[i];
        int64_t kvw = (int64_t)l->kv_heads * l->head_dim;
        if (l->kv_shared) continue;
        int read_later = 0;
        for (int j = i + 1; j < out->layers; j++) read_later |= t->layers[j].kv_shared && t->layers[j].store_layer == i;
        if (read_later) out->kv += 2 * kvw;
        else if (kvw > shared) shared = kvw;
        if (kvw > out->widest) out->widest = kvw;
    }
    out->kv += 2 * shared;
    grad_workspace_free(w);
    lora_binding_free(&b);
    lora_free(a);
    model_close(m);
    return 1;
}

/* What bf16 checkpoints save over fp32 ones (backward.c's layout: the
 * layer inputs 1 .. L - 1 in two bytes each instead of four, less one
 * widened input; kvcache.c's: the stores of keys and values, those of the
 * layers a later layer reads and the one the others share, in two bytes
 * instead of four, less one widened layer's), up to the 64-byte alignment
 * of the three buffers of the slab. */
static void check_bytes(const char *variant, const Run *f32, const Run *b16) {
    int64_t nh = (int64_t)N_TOK * f32->hidden, L = f32->layers;
    int64_t want = (L - 1) * nh * 4 - (L - 1) * nh * 2 - nh * 4 + N_TOK * f32->kv * 2 - 2 * N_TOK * f32->widest * 4;
    int64_t saved = (int64_t)f32->bytes - (int64_t)b16->bytes;
    printf("%s: the workspace %llu bytes with fp32 checkpoints, %llu with bf16 (%lld saved, %lld expected)\n", variant,
           (unsigned long long)f32->bytes, (unsigned long long)b16->bytes, (long long)saved, (long long)want);
    CHECK(llabs(saved - want) <= 3 * 64, "%s: bf16 checkpoints save %lld bytes, not %lld", variant, (long long)saved,
          (long long)want);
}

/* How far bf16 checkpoints may move the gradients (relative L2) and the
 * loss (relative) on a tiny random fixture, whose layers amplify a
 * rounding of the residual stream and of the keys and values. Measured on
 * the CPU: gradients 3.4e-2 (dense), 6.3e-2 (ple), 0.39 (moe); the loss
 * 4.7e-4, 5.0e-4, 8.9e-4. The layer inputs alone gave 1.7e-2, 3.6e-2 and
 * 0.10; rounding them to one mantissa bit fewer doubled the dense and ple
 * figures, as did rounding the keys and values to one bit fewer (5.2e-2,
 * 9.8e-2 in all) and two (0.14, 0.23): the rounding's own effect, growing
 * with its size, where a layer input or a store read from the wrong place
 * would miss by O(1). The moe model's top-k routing flips for tokens near
 * a tie, so a rounding moves its gradients further, and by a step rather
 * than in proportion. */
typedef struct {
    const char *variant;
    double grads, loss;
} Bound;

static void check_variant(const Bound *bound) {
    const char *variant = bound->variant;
    Run f32, b16;
    if (!run(variant, "fp32", &f32) || !run(variant, "bf16", &b16)) {
        free(f32.grads);
        return;
    }
    CHECK(f32.n_params == b16.n_params && f32.n_params > 0, "%s: one adapter", variant);
    double num = 0, den = 0;
    for (size_t i = 0; i < f32.n_params && f32.n_params == b16.n_params; i++) {
        double d = (double)b16.grads[i] - f32.grads[i];
        num += d * d;
        den += (double)f32.grads[i] * f32.grads[i];
    }
    double e = den > 0 ? sqrt(num / den) : INFINITY, dl = fabs(b16.loss - f32.loss) / fabs(f32.loss);
    printf("%s: loss %.9g (fp32) %.9g (bf16 checkpoints), gradients' relative L2 difference %.3g\n", variant, f32.loss,
           b16.loss, e);
    /* a forward that kept its rounded inputs but went on unrounded would
     * miss by bf16's rounding (~1e-4 here), far past 1e-9 */
    CHECK(fabs(f32.loss - f32.again) <= 1e-9 * fabs(f32.loss) && fabs(b16.loss - b16.again) <= 1e-9 * fabs(b16.loss),
          "%s: the backward's loss is model_loss's (fp32 %.17g / %.17g, bf16 %.17g / %.17g)", variant, f32.loss, f32.again,
          b16.loss, b16.again);
    CHECK(e > 0 && b16.loss != f32.loss, "%s: bf16 checkpoints changed nothing (were they kept in bf16?)", variant);
    CHECK(e <= bound->grads && dl <= bound->loss,
          "%s: bf16 checkpoints move the gradients by %.3g (at most %g) and the loss by %.3g (at most %g), relative",
          variant, e, bound->grads, dl, bound->loss);
    check_bytes(variant, &f32, &b16);
    free(f32.grads);
    free(b16.grads);
}

static void check_refused(void) {
    ModelOptions mo = {.n_threads = 1, .checkpoints = "fp16"};
    Model *m = NULL;
    GfError err;
    GfStatus st = model_open(GF_FIXTURES "/dense", &mo, &m, &err);
    CHECK(st == GF_INVALID && !m && strcmp(err.param, "checkpoints") == 0 && strstr(err.message, "fp16"),
          "checkpoints \"fp16\" refused by name: %s", err.message);
    model_close(m);
}

int main(void) {
    static const Bound bounds[] = {{"dense", 0.1, 1e-3}, {"ple", 0.1, 1e-3}, {"moe", 0.5, 5e-3}};
    for (size_t i = 0; i < sizeof bounds / sizeof *bounds; i++) check_variant(&bounds[i]);
    check_refused();
    return check_done("test_checkpoints");
}
