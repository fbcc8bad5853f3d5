/* bench_forward.c - CPU throughput of the text forward pass (a benchmark, not
 * a test): prefill tokens/s and decode tokens/s through the KV cache, on the
 * tiny golden models and on a larger random Gemma 4 config written to a
 * temporary directory (bf16 weights, 4 sliding + 2 full layers, GQA).
 *
 * usage: bench_forward [FIXTURES_DIR] [--threads N] [--prompt T] [--decode N]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"
#include "random_model.h"

typedef struct {
    int threads, prompt, decode;
} BenchOpts;

static void bench_model(const char *label, const char *dir, const BenchOpts *o) {
    Model *m = NULL;
    GfError err;
    ModelOptions mo = {.n_threads = o->threads, .quantize = MODEL_QUANT_NONE};
    if (model_open(dir, &mo, &m, &err)) { fprintf(stderr, "%s: %s\n", label, err.message); return; }
    const TextConfig *t = &model_config(m)->text;
    int32_t *ids = malloc((size_t)o->prompt * sizeof *ids);
    for (int i = 0; i < o->prompt; i++) ids[i] = 3 + (i * 7919) % (t->vocab_size - 3);
    float *logits = malloc((size_t)t->vocab_size * sizeof(float));
    KvCache c;
    kv_cache_init(&c, &model_config(m)->text, model_backend(m), o->prompt + o->decode, &err);
    ModelInput warm = {.ids = ids, .n = o->prompt < 4 ? o->prompt : 4, .last_logits_only = 1};
    model_forward(m, &c, &warm, logits, NULL, &err);
    kv_cache_reset(&c);
    double t0 = gf_time_mono();
    ModelInput in = {.ids = ids, .n = o->prompt, .last_logits_only = 1};
    model_forward(m, &c, &in, logits, NULL, &err);
    double t1 = gf_time_mono();
    for (int i = 0; i < o->decode; i++) {
        int32_t next = ids[i % o->prompt];
        ModelInput step = {.ids = &next, .n = 1, .last_logits_only = 1};
        model_forward(m, &c, &step, logits, NULL, &err);
    }
    double t2 = gf_time_mono();
    printf("%-28s layers %2d hidden %5d vocab %6d | prefill %4d tok: %9.1f tok/s | decode %3d tok: %8.1f tok/s\n", label,
           t->n_layers, t->hidden_size, t->vocab_size, o->prompt, o->prompt / (t1 - t0), o->decode, o->decode / (t2 - t1));
    kv_cache_free(&c);
    free(logits);
    free(ids);
    model_close(m);
}

int main(int argc, char **argv) {
    const char *fixtures = argc > 1 && argv[1][0] != '-' ? argv[1] : "tests/fixtures";
    BenchOpts o = {0, 128, 32};
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0) o.threads = atoi(argv[++i]);
        else if (strcmp(argv[i], "--prompt") == 0) o.prompt = atoi(argv[++i]);
        else if (strcmp(argv[i], "--decode") == 0) o.decode = atoi(argv[++i]);
    }
    gf_log_init(GF_LOG_WARN);
    KnDeviceInfo dev[KN_MAX_DEVICES];
    kn_devices_probe(dev, KN_PROBE_HELD);
    printf("CPU backend, %d threads available%s\n", dev[0].n_threads, o.threads ? "" : " (all used)");
    const char *tiny[] = {"dense", "ple", "moe"};
    for (int i = 0; i < 3; i++) {
        char dir[600], label[64];
        snprintf(dir, sizeof dir, "%s/%s", fixtures, tiny[i]);
        snprintf(label, sizeof label, "tiny %s", tiny[i]);
        bench_model(label, dir, &o);
    }
    char tmp[] = "/tmp/gf-bench-XXXXXX";
    if (!mkdtemp(tmp) || write_random_model(tmp, 1024, 6, 4096, 32768, 8, 2, 128, 256)) { fprintf(stderr, "cannot write the random model\n"); return 1; }
    bench_model("random 1024x6 (120M, bf16)", tmp, &o);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
    return 0;
}
