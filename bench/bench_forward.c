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
#include "ops.h"
#include "safetensors.h"

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
    kv_cache_init(&c, m, o->prompt + o->decode, &err);
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

/* ---- a random model on disk ------------------------------------------------ */

static uint64_t rng = 88172645463325252ull;
static float frand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0) - 0.5f;
}

typedef struct {
    StWriteTensor *t;
    size_t n, cap;
} Writer;

static void add(Writer *w, const char *name, int n_dims, uint64_t a, uint64_t b, float scale, float base) {
    if (w->n == w->cap) { w->cap = w->cap ? 2 * w->cap : 64; w->t = realloc(w->t, w->cap * sizeof *w->t); }
    uint64_t n = a * (n_dims > 1 ? b : 1);
    uint16_t *d = malloc(n * 2);
    for (uint64_t i = 0; i < n; i++) d[i] = kn_f32_to_bf16(base + scale * frand());
    StWriteTensor *t = &w->t[w->n++];
    t->name = strdup(name);
    t->dtype = ST_BF16;
    t->n_dims = n_dims;
    t->shape[0] = a;
    t->shape[1] = b;
    t->data = d;
}

static int write_random_model(const char *dir, int H, int L, int I, int V, int NH, int KV, int D, int Dfull) {
    char path[512], name[160];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "{\"model_type\":\"gemma4\",\"text_config\":{\"vocab_size\":%d,\"hidden_size\":%d,\"intermediate_size\":%d,"
               "\"num_hidden_layers\":%d,\"num_attention_heads\":%d,\"num_key_value_heads\":%d,\"head_dim\":%d,"
               "\"global_head_dim\":%d,\"sliding_window\":512,\"final_logit_softcapping\":30.0,"
               "\"layer_types\":[", V, H, I, L, NH, KV, D, Dfull);
    for (int i = 0; i < L; i++) fprintf(f, "%s\"%s\"", i ? "," : "", i % 3 == 2 ? "full_attention" : "sliding_attention");
    fprintf(f, "]},\"vision_config\":null}\n");
    fclose(f);
    Writer w = {0};
    float ws = 1.0f / sqrtf((float)H);
    add(&w, "model.language_model.embed_tokens.weight", 2, V, H, 0.1f, 0);
    add(&w, "model.language_model.norm.weight", 1, H, 0, 0.2f, 1.0f);
    for (int i = 0; i < L; i++) {
        int d = i % 3 == 2 ? Dfull : D;
        const char *norms[] = {"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"};
        for (int k = 0; k < 4; k++) { snprintf(name, sizeof name, "model.language_model.layers.%d.%s.weight", i, norms[k]); add(&w, name, 1, H, 0, 0.2f, 1.0f); }
        snprintf(name, sizeof name, "model.language_model.layers.%d.layer_scalar", i); add(&w, name, 1, 1, 0, 0, 1.0f);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.q_proj.weight", i); add(&w, name, 2, NH * d, H, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.k_proj.weight", i); add(&w, name, 2, KV * d, H, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.v_proj.weight", i); add(&w, name, 2, KV * d, H, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.o_proj.weight", i); add(&w, name, 2, H, NH * d, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.q_norm.weight", i); add(&w, name, 1, d, 0, 0.2f, 1.0f);
        snprintf(name, sizeof name, "model.language_model.layers.%d.self_attn.k_norm.weight", i); add(&w, name, 1, d, 0, 0.2f, 1.0f);
        snprintf(name, sizeof name, "model.language_model.layers.%d.mlp.gate_proj.weight", i); add(&w, name, 2, I, H, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.mlp.up_proj.weight", i); add(&w, name, 2, I, H, ws, 0);
        snprintf(name, sizeof name, "model.language_model.layers.%d.mlp.down_proj.weight", i); add(&w, name, 2, H, I, ws, 0);
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    GfError err;
    int rc = safetensors_write(path, w.t, w.n, &err) ? -1 : 0;
    for (size_t i = 0; i < w.n; i++) { free((void *)w.t[i].name); free((void *)w.t[i].data); }
    free(w.t);
    return rc;
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
    kn_devices_probe(dev);
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
