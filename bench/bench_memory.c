/* bench_memory.c - what a QLoRA training step of Gemma 4 takes in GPU memory
 * at the real shapes (a benchmark, not a test; it needs no GPU): the text
 * stack of E2B, E4B or 31B (GEMMA4.md §10, shapes_model.h) written as a
 * sparse checkpoint (the shapes only: the tensors read as zeros and take
 * no disk), opened on the CPU, and the estimate a job makes of itself
 * (trainer_memory, which `preflight`, the CLI's train and the jobs' fit
 * check use) for an NF4 base, rank 64 on q/k/v/o/gate/up/down, bf16 layer
 * checkpoints, one sequence of --seq tokens (the batch adds nothing:
 * sequences run one at a time and their gradients accumulate).
 *
 * Each term is printed, and the total a GPU holds: the per-layer embedding
 * table of E2B and E4B stays in pinned host memory there (the default,
 * GF_PLE=host) and is left out of it, and the CUDA backend's own scratch
 * and workspaces in the bf16 precision (grad_scratch_bytes) are added,
 * sized by the CUDA table without a device (kn_backend_ops) when this
 * binary has it (a build with CUDA); without it they are left out, and the
 * line says so.
 *
 * usage: bench_memory [e2b|e4b|31b ...] [--seq T] [--rank R] [--dir DIR]
 *   default: all three at T1024, rank 64, the checkpoint under /tmp
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backward.h"
#include "kernels.h"
#include "lora.h"
#include "model.h"
#include "preprocess.h"
#include "trainer.h"

#include "shapes_model.h"

static const char *const TARGETS[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

static double gb(uint64_t bytes) { return (double)bytes / 1e9; }

/* The estimate for shape s; 0 when it could be made (printed), else 1. */
static int estimate(const Shape *s, const char *root, int64_t seq, int rank) {
    char dir[600];
    snprintf(dir, sizeof dir, "%s/gf-memory-XXXXXX", root);
    if (!mkdtemp(dir)) {
        perror(dir);
        return 1;
    }
    uint64_t bytes = 0;
    if (shape_write_as(dir, s, s->layers, 1, &bytes)) {
        fprintf(stderr, "%s: cannot write the sparse checkpoint\n", dir);
        shape_remove(dir);
        return 1;
    }
    GfError err = {0};
    Model *m = NULL;
    LoraAdapter *a = NULL;
    ModelOptions mo = {.device = "cpu", .n_threads = 1, .quantize = MODEL_QUANT_NONE, .checkpoints = "bf16"};
    int rc = 1;
    if (model_open(dir, &mo, &m, &err) || lora_create(m, TARGETS, 7, rank, (double)rank, 0, 1, &a, &err)) {
        fprintf(stderr, "%s: %s\n", s->name, err.message);
    } else {
        PreprocessConfig pre = {0}; /* no vision tower at these shapes */
        TrainMemory tm;
        a->dropout = 0.0f;
        trainer_memory(m, &pre, a, 1, seq, &tm);
        const TextConfig *t = &model_config(m)->text;
        uint64_t ple = (uint64_t)t->ple_vocab * (uint64_t)t->n_layers * (uint64_t)t->ple_dim * 2;
        const KnOps *cuda = kn_backend_ops(KN_DEVICE_CUDA);
        KnBackend sizing = {.ops = cuda, .ctx = {.device = KN_DEVICE_CUDA, .precision = KN_PRECISION_BF16}};
        uint64_t scratch = cuda ? grad_scratch_bytes(m, &sizing, seq, a, 1, 0) : 0;
        uint64_t gpu = tm.total - ple + scratch;
        char scratch_json[32] = "null";
        if (cuda) snprintf(scratch_json, sizeof scratch_json, "%llu", (unsigned long long)scratch);
        printf("{\"bench\":\"memory\",\"shape\":\"%s\",\"layers\":%d,\"seq\":%lld,\"rank\":%d,\"linears\":%llu,"
               "\"adapter_params\":%llu,\"weights\":%llu,\"ple_table_host\":%llu,\"state\":%llu,\"activations\":%llu,"
               "\"cuda_scratch\":%s,\"gpu_total\":%llu}\n",
               s->name, t->n_layers, (long long)seq, rank, (unsigned long long)tm.n_linears,
               (unsigned long long)tm.n_params, (unsigned long long)tm.weights, (unsigned long long)ple,
               (unsigned long long)tm.state, (unsigned long long)tm.activations, scratch_json, (unsigned long long)gpu);
        printf("  %s T%lld r%d: base weights %.2f GB (NF4 linears; %.2f GB of them the per-layer table, in host "
               "memory on a GPU), adapter state %.2f GB (%llu parameters x weights, gradients, AdamW m and v), "
               "activations %.2f GB, CUDA scratch %.2f GB%s; on a GPU %.2f GB\n",
               s->name, (long long)seq, rank, gb(tm.weights), gb(ple), gb(tm.state), (unsigned long long)tm.n_params,
               gb(tm.activations), gb(scratch), cuda ? "" : " (not in this build: left out)", gb(gpu));
        rc = 0;
    }
    lora_free(a);
    model_close(m);
    shape_remove(dir);
    return rc;
}

int main(int argc, char **argv) {
    const Shape *want[8];
    int n = 0, rank = 64;
    int64_t seq = 1024;
    const char *root = "/tmp";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--seq") == 0 && i + 1 < argc) seq = atoll(argv[++i]);
        else if (strcmp(argv[i], "--rank") == 0 && i + 1 < argc) rank = atoi(argv[++i]);
        else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) root = argv[++i];
        else if (shape_find(argv[i]) && n < 8) want[n++] = shape_find(argv[i]);
        else {
            fprintf(stderr, "usage: bench_memory [e2b|e4b|31b ...] [--seq T] [--rank R] [--dir DIR]\n");
            return 2;
        }
    }
    if (seq <= 0 || rank <= 0) {
        fprintf(stderr, "bench_memory: --seq and --rank must be positive\n");
        return 2;
    }
    if (n == 0)
        for (size_t i = 0; i < sizeof SHAPES / sizeof *SHAPES; i++) want[n++] = &SHAPES[i];
    int failed = 0;
    for (int i = 0; i < n; i++) failed |= estimate(want[i], root, seq, rank);
    return failed;
}
