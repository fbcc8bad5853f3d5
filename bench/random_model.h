/* random_model.h - a random Gemma 4 text model written to a directory, for
 * the benchmarks (bf16 weights, sliding and full layers, GQA): the same
 * config.json + model.safetensors layout a Hugging Face snapshot has.
 * Benchmark code only; single-threaded (one global generator). */
#ifndef GF_BENCH_RANDOM_MODEL_H
#define GF_BENCH_RANDOM_MODEL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "convert.h"
#include "safetensors.h"

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

#endif
