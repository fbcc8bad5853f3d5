/* bench_train.c - CPU throughput of one LoRA training step (a benchmark, not
 * a test): forward with checkpoints, the layer re-runs and the backward of a
 * sequence whose every position is trained, with an all-linear adapter, on
 * the tiny dense model and on a random 120M-parameter config, with the base
 * weights as stored (bf16) and in NF4. Prints tokens/s, ms per sequence, the
 * workspace the engine allocates, and an achieved GFLOP/s figure counted as
 * 4 x (base linear parameters) x tokens (forward plus input gradients; the
 * frozen base has no weight gradients).
 *
 * usage: bench_train [FIXTURES_DIR] [--threads N] [--tokens T] [--rank R] [--reps K]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backward.h"
#include "lora.h"
#include "model.h"
#include "random_model.h"

typedef struct {
    int threads, tokens, rank, reps;
} BenchOpts;

/* Times model_backward on one fully trained sequence and prints a line. */
static void time_steps(Model *m, const LoraBinding *b, GradWorkspace *w, const char *label, ModelQuant q,
                       const BenchOpts *o) {
    const TextConfig *t = &model_config(m)->text;
    int32_t *ids = malloc((size_t)o->tokens * sizeof *ids);
    for (int i = 0; i < o->tokens; i++) ids[i] = 3 + (i * 7919) % (t->vocab_size - 3);
    TrainSequence s = {.ids = ids, .labels = ids, .n = o->tokens};
    double loss;
    int64_t n;
    GfError err;
    model_backward(m, w, b, &s, 1.0f, &loss, &n, &err); /* warm-up */
    double t0 = gf_time_mono();
    for (int r = 0; r < o->reps; r++) model_backward(m, w, b, &s, 1.0f, &loss, &n, &err);
    double dt = (gf_time_mono() - t0) / o->reps;
    ModelMemory mem;
    weights_memory(model_weights(m), &mem);
    double flops = 4.0 * (double)mem.linear_params * o->tokens;
    printf("%-22s %-4s | %4d tokens: %9.1f tok/s, %8.1f ms/sequence, %7.2f GFLOP/s | workspace %7.1f MiB\n", label,
           q == MODEL_QUANT_NF4 ? "nf4" : "bf16", o->tokens, o->tokens / dt, dt * 1e3, flops / dt / 1e9,
           (double)grad_workspace_bytes(m, o->tokens, o->rank) / 1048576.0);
    free(ids);
}

static void bench_case(const char *label, const char *dir, ModelQuant q, const BenchOpts *o) {
    Model *m = NULL;
    LoraAdapter *a = NULL;
    LoraBinding b = {0};
    GradWorkspace *w = NULL;
    GfError err;
    const char *all[] = {"all-linear"};
    ModelOptions mo = {.n_threads = o->threads, .quantize = q};
    if (model_open(dir, &mo, &m, &err) || lora_create(m, all, 1, o->rank, 2.0 * o->rank, 0, 1, &a, &err) ||
        lora_bind(m, a, &b, &err) || lora_binding_grads(&b, &err) || grad_workspace_new(m, o->tokens, o->rank, &w, &err))
        fprintf(stderr, "%s: %s\n", label, err.message);
    else
        time_steps(m, &b, w, label, q, o);
    grad_workspace_free(w);
    lora_binding_free(&b);
    lora_free(a);
    model_close(m);
}

int main(int argc, char **argv) {
    const char *fixtures = argc > 1 && argv[1][0] != '-' ? argv[1] : "tests/fixtures";
    BenchOpts o = {0, 256, 16, 3};
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0) o.threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--tokens") == 0) o.tokens = atoi(argv[++i]);
        else if (strcmp(argv[i], "--rank") == 0) o.rank = atoi(argv[++i]);
        else if (strcmp(argv[i], "--reps") == 0) o.reps = atoi(argv[++i]);
    }
    if (o.tokens < 2 || o.rank < 1 || o.reps < 1) { fprintf(stderr, "bad options\n"); return 2; }
    gf_log_init(GF_LOG_WARN);
    KnDeviceInfo dev[KN_MAX_DEVICES];
    kn_devices_probe(dev, KN_PROBE_HELD);
    printf("CPU backend, %d threads available%s; LoRA all-linear rank %d\n", dev[0].n_threads, o.threads ? "" : " (all used)",
           o.rank);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/dense", fixtures);
    bench_case("tiny dense", dir, MODEL_QUANT_NONE, &o);
    bench_case("tiny dense", dir, MODEL_QUANT_NF4, &o);
    char tmp[] = "/tmp/gf-bench-XXXXXX";
    if (!mkdtemp(tmp) || write_random_model(tmp, 1024, 6, 4096, 32768, 8, 2, 128, 256)) { fprintf(stderr, "cannot write the random model\n"); return 1; }
    bench_case("random 1024x6 (120M)", tmp, MODEL_QUANT_NONE, &o);
    bench_case("random 1024x6 (120M)", tmp, MODEL_QUANT_NF4, &o);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    return 0;
}
