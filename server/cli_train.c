/* cli_train.c - `gemmaforge lora-step`: the gradient and optimizer parity
 * tool (see cli_train.h). */
#include "cli_train.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backward.h"
#include "cli_inputs.h"
#include "fsutil.h"
#include "lora.h"
#include "model.h"
#include "optim.h"
#include "safetensors.h"

typedef struct {
    const char *model, *adapter, *inputs, *out;
    const char *device;        /* NULL: the default (model.h) */
    const char *precision;     /* NULL: the default (model.h) */
    long steps, threads;
    double lr, weight_decay;
    ModelQuant quantize;
} StepOptions;

static int parse_step(int argc, char **argv, StepOptions *o) {
    memset(o, 0, sizeof *o);
    o->steps = 1;
    o->lr = 1e-4;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!v) { fprintf(stderr, "gemmaforge lora-step: %s needs a value\n", a); return -1; }
        if (strcmp(a, "--model") == 0) o->model = v;
        else if (strcmp(a, "--adapter") == 0) o->adapter = v;
        else if (strcmp(a, "--inputs") == 0) o->inputs = v;
        else if (strcmp(a, "--out") == 0) o->out = v;
        else if (strcmp(a, "--quantize") == 0 && cli_parse_quantize(v, &o->quantize) == 0) {}
        else if (strcmp(a, "--steps") == 0 && (o->steps = strtol(v, &end, 10), !*end) && o->steps >= 1 && o->steps <= 100000) {}
        else if (strcmp(a, "--device") == 0 && cli_parse_device(v) == 0) o->device = v;
        else if (strcmp(a, "--precision") == 0 && cli_parse_precision(v) == 0) o->precision = v;
        else if (strcmp(a, "--threads") == 0 && (o->threads = strtol(v, &end, 10), !*end) && o->threads >= 0 && o->threads <= 1024) {}
        else if (strcmp(a, "--lr") == 0 && (o->lr = strtod(v, &end), !*end) && o->lr >= 0 && o->lr < 10) {}
        else if (strcmp(a, "--weight-decay") == 0 && (o->weight_decay = strtod(v, &end), !*end) && o->weight_decay >= 0 &&
                 o->weight_decay < 10) {}
        else { fprintf(stderr, "gemmaforge lora-step: unknown option or bad value: %s %s\n", a, v); return -1; }
        i++;
    }
    return 0;
}

typedef struct {
    int32_t *ids, *labels, *mm;
    uint8_t *types;
    CliImages images;
    TrainSequence seq;
} StepInputs;

static void inputs_free(StepInputs *in) {
    free(in->ids); free(in->labels); free(in->mm); free(in->types);
    cli_images_free(&in->images);
}

/* input_ids, labels, mm_token_type_ids (one sequence) and the images, as in
 * forward_image.safetensors. */
static int read_inputs(const SafeTensors *st, StepInputs *in) {
    memset(in, 0, sizeof *in);
    int64_t B = 0, T = 0;
    int bad = 0;
    in->ids = cli_read_ids(st, "lora-step", "input_ids", &B, &T, 1, &bad);
    if (!bad) in->labels = cli_read_ids(st, "lora-step", "labels", &B, &T, 1, &bad);
    if (!bad) in->mm = cli_read_ids(st, "lora-step", "mm_token_type_ids", &B, &T, 0, &bad);
    if (bad) return 1;
    if (B != 1) { fprintf(stderr, "gemmaforge lora-step: the inputs must hold one sequence (input_ids [1, T])\n"); return 1; }
    if (in->mm) {
        in->types = malloc((size_t)T);
        if (!in->types) return 1;
        for (int64_t i = 0; i < T; i++) in->types[i] = (uint8_t)(in->mm[i] >= 0 && in->mm[i] <= 3 ? in->mm[i] : 0);
    }
    if (cli_read_images(st, "lora-step", &in->images)) return 1;
    in->seq = (TrainSequence){.ids = in->ids, .labels = in->labels, .mm_type = in->types, .n = T,
                              .pixels = in->images.pixels, .positions = in->images.positions,
                              .n_patches = in->images.n_patches, .n_images = (int)in->images.n_images};
    return 0;
}

/* Every dA, dB (downloaded from the binding) under PEFT's training key
 * names (adapter "default"). */
static GfStatus write_grads(const LoraAdapter *a, const LoraBinding *lb, const char *path, GfError *err) {
    StWriteTensor *t = gf_calloc(2 * a->n_pairs + 1, sizeof *t, err);
    char (*names)[220] = t ? gf_calloc(2 * a->n_pairs + 1, sizeof *names, err) : NULL;
    float *grads = names ? gf_malloc((a->n_params ? a->n_params : 1) * sizeof *grads, err) : NULL;
    if (!grads) { free(t); free(names); return GF_NO_MEMORY; }
    lora_binding_download_grads(lb, grads);
    for (size_t i = 0; i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        const float *dA = grads + (p->A - a->params), *dB = grads + (p->B - a->params);
        snprintf(names[2 * i], sizeof names[0], "base_model.model.%s.lora_A.default.weight", p->module);
        snprintf(names[2 * i + 1], sizeof names[0], "base_model.model.%s.lora_B.default.weight", p->module);
        t[2 * i] = (StWriteTensor){names[2 * i], ST_F32, 2, {(uint64_t)p->rank, (uint64_t)p->in}, dA};
        t[2 * i + 1] = (StWriteTensor){names[2 * i + 1], ST_F32, 2, {(uint64_t)p->out, (uint64_t)p->rank}, dB};
    }
    GfStatus st = safetensors_write(path, t, 2 * a->n_pairs, err);
    free(t);
    free(names);
    free(grads);
    return st;
}

static int write_losses(const char *dir, const double *losses, long n) {
    char path[4096];
    snprintf(path, sizeof path, "%s/losses.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) { fprintf(stderr, "gemmaforge lora-step: cannot write %s: %s\n", path, strerror(errno)); return 1; }
    fprintf(f, "{\"losses_before_each_step\": [");
    for (long i = 0; i < n; i++) fprintf(f, "%s%.9g", i ? ", " : "", losses[i]);
    fprintf(f, "]}\n");
    return fclose(f) != 0;
}

/* The N steps: loss and gradients, grads of step 0 saved, AdamW update. */
static int run_steps(Model *m, LoraAdapter *a, LoraBinding *lb, const StepOptions *o, const StepInputs *in,
                     double *losses) {
    GfError err;
    GradWorkspace *w = NULL;
    AdamW opt;
    memset(&opt, 0, sizeof opt);
    int64_t targets = train_sequence_targets(&in->seq);
    if (targets == 0) { fprintf(stderr, "gemmaforge lora-step: the labels train no position\n"); return 1; }
    int rc = 0;
    char path[4096];
    if (grad_workspace_new(m, in->seq.n, lb->max_rank, &w, &err) || lora_binding_grads(lb, &err) ||
        adamw_init(&opt, lb, 0.9, 0.999, 1e-8, o->weight_decay, &err))
        rc = 1;
    for (long s = 0; !rc && s < o->steps; s++) {
        double sum;
        int64_t count;
        lora_binding_zero_grads(lb);
        if (model_backward(m, w, lb, &in->seq, 1.0f / (float)targets, &sum, &count, &err)) { rc = 1; break; }
        losses[s] = sum / (double)count;
        fprintf(stderr, "step %ld: loss %.6f\n", s, losses[s]);
        snprintf(path, sizeof path, "%s/grads_step0.safetensors", o->out);
        if (s == 0 && write_grads(a, lb, path, &err)) { rc = 1; break; }
        adamw_step(&opt, lb, o->lr);
    }
    if (!rc) lora_binding_download(lb, a); /* the trained adapter, for adapter_final */
    if (rc) fprintf(stderr, "gemmaforge lora-step: %s\n", err.message);
    adamw_free(&opt);
    grad_workspace_free(w);
    return rc;
}

int cli_lora_step(int argc, char **argv) {
    StepOptions o;
    if (parse_step(argc, argv, &o) || !o.model || !o.adapter || !o.inputs || !o.out) {
        fprintf(stderr, "usage: gemmaforge lora-step --model DIR --adapter DIR --inputs IN.safetensors --out DIR "
                        "[--steps N] [--lr X] [--weight-decay W] [--quantize nf4|none] [--device D] [--precision fp32|bf16] [--threads N]\n");
        return 2;
    }
    gf_log_init(GF_LOG_WARN);
    GfError err;
    SafeTensors st;
    if (safetensors_open(o.inputs, "the inputs file", &st, &err)) {
        fprintf(stderr, "gemmaforge lora-step: %s\n", err.message);
        return 1;
    }
    StepInputs in;
    int rc = read_inputs(&st, &in);
    Model *m = NULL;
    LoraAdapter *a = NULL;
    LoraBinding lb = {0};
    ModelOptions mo = {.device = o.device, .precision = o.precision, .n_threads = (int)o.threads, .quantize = o.quantize};
    char final_dir[4096];
    snprintf(final_dir, sizeof final_dir, "%s/adapter_final", o.out);
    if (!rc && model_open(o.model, &mo, &m, &err)) { fprintf(stderr, "gemmaforge lora-step: the model: %s\n", err.message); rc = 1; }
    if (!rc && (lora_load_dir(o.adapter, m, LORA_MAX_RANK, &a, &err) || lora_bind(m, a, &lb, &err))) {
        fprintf(stderr, "gemmaforge lora-step: the adapter: %s\n", err.message);
        rc = 1;
    }
    if (!rc && a->dropout > 0) {
        fprintf(stderr, "gemmaforge lora-step: the adapter sets lora_dropout %g; the parity tool compares with PEFT, "
                        "whose dropout masks cannot be reproduced (use an adapter_config.json with lora_dropout 0)\n", a->dropout);
        rc = 1;
    }
    if (!rc && fs_mkdirs(final_dir, &err)) { fprintf(stderr, "gemmaforge lora-step: %s\n", err.message); rc = 1; }
    double *losses = rc ? NULL : calloc((size_t)o.steps, sizeof *losses);
    if (!rc) rc = !losses || run_steps(m, a, &lb, &o, &in, losses);
    if (!rc) rc = write_losses(o.out, losses, o.steps);
    if (!rc && lora_save_dir(a, final_dir, &err)) { fprintf(stderr, "gemmaforge lora-step: %s\n", err.message); rc = 1; }
    free(losses);
    lora_binding_free(&lb);
    lora_free(a);
    model_close(m);
    inputs_free(&in);
    safetensors_close(&st);
    return rc;
}
