/* shapes_model.h - Gemma 4's real text-stack shapes (GEMMA4.md §10: E2B,
 * E4B, 31B, with PLE, KV sharing, the double-wide MLP, k_eq_v and the
 * global KV heads) written as a checkpoint of random bf16 weights, for the
 * benchmarks: config.json and model.safetensors, the layout weights.c binds.
 * Each tensor is a slice, at a random offset, of a pool of 16M random bf16
 * values per scale, so tens of GB are written in seconds; timing does not
 * depend on the values, only on their being finite and varied. Benchmark
 * code only; single-threaded. */
#ifndef GF_BENCH_SHAPES_MODEL_H
#define GF_BENCH_SHAPES_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "convert.h"
#include "model.h"

/* Bytes of base weights one decode step reads: every linear of the layers
 * as loaded, and the tied head (vocab x hidden, bf16). PLE rows, norms and
 * the KV cache are left out: small against these at a short context. */
static inline double step_weight_bytes(const Model *m) {
    ModelMemory mem;
    weights_memory(model_weights(m), &mem);
    const TextConfig *t = &model_config(m)->text;
    return (double)mem.linear_stored_bytes + 2.0 * (double)t->vocab_size * t->hidden_size;
}

/* ---- the shapes (GEMMA4.md §10, text stack) ---------------------------- */

typedef struct {
    const char *name;
    int hidden, layers, period, heads, kv, kv_full, inter, window, ple, kv_shared, double_wide, k_eq_v;
} Shape;

static const Shape SHAPES[] = {
    {"e2b", 1536, 35, 5, 8, 1, 1, 6144, 512, 256, 20, 1, 0},
    {"e4b", 2560, 42, 6, 8, 2, 2, 10240, 512, 256, 18, 0, 0},
    {"31b", 5376, 60, 6, 32, 16, 4, 21504, 1024, 0, 0, 0, 1},
};
enum { VOCAB = 262144, HEAD_DIM = 256, HEAD_DIM_FULL = 512 };

static int is_full(const Shape *s, int i, int n_layers) { return i % s->period == s->period - 1 || i == n_layers - 1; }

/* ---- a streamed random checkpoint -------------------------------------- */

enum { POOL_N = (1 << 24) - 3 };

typedef struct {
    float scale, base;
    uint16_t *v;
} Pool;

typedef struct {
    char name[128];
    int n_dims;
    uint64_t a, b;
    float scale, base;
} Ten;

typedef struct {
    Ten *t;
    size_t n, cap;
    Pool pools[8];
    int n_pools;
    uint64_t rng;
} Ckpt;

static uint64_t next_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void ten(Ckpt *c, int n_dims, uint64_t a, uint64_t b, float scale, float base, const char *fmt, int layer) {
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 256;
        c->t = realloc(c->t, c->cap * sizeof *c->t);
        if (!c->t) { perror("realloc"); exit(1); }
    }
    Ten *t = &c->t[c->n++];
    char leaf[100];
    snprintf(leaf, sizeof leaf, fmt, layer);
    *t = (Ten){.n_dims = n_dims, .a = a, .b = n_dims > 1 ? b : 1, .scale = scale, .base = base};
    snprintf(t->name, sizeof t->name, "model.language_model.%s", leaf);
}

static const uint16_t *pool_for(Ckpt *c, float scale, float base) {
    for (int i = 0; i < c->n_pools; i++)
        if (c->pools[i].scale == scale && c->pools[i].base == base) return c->pools[i].v;
    if (c->n_pools == 8) { fprintf(stderr, "too many weight scales\n"); exit(1); }
    Pool *p = &c->pools[c->n_pools++];
    *p = (Pool){scale, base, malloc((size_t)POOL_N * 2)};
    if (!p->v) { perror("malloc"); exit(1); }
    for (size_t i = 0; i < POOL_N; i++) {
        float u = (float)((double)(next_rand(&c->rng) >> 11) / 9007199254740992.0) - 0.5f;
        p->v[i] = kn_f32_to_bf16(base + scale * u);
    }
    return p->v;
}

/* The tensors of the text stack of s cut to n_layers, as weights.c binds them. */
static void list_tensors(Ckpt *c, const Shape *s, int n_layers, int n_shared) {
    int H = s->hidden, P = s->ple;
    float wh = 1.0f / sqrtf((float)H);
    ten(c, 2, VOCAB, H, 0.1f, 0, "embed_tokens.weight", 0);
    ten(c, 1, H, 0, 0.2f, 1.0f, "norm.weight", 0);
    if (P) {
        ten(c, 2, VOCAB, (uint64_t)n_layers * P, 0.1f, 0, "embed_tokens_per_layer.weight", 0);
        ten(c, 2, (uint64_t)n_layers * P, H, wh, 0, "per_layer_model_projection.weight", 0);
        ten(c, 1, P, 0, 0.2f, 1.0f, "per_layer_projection_norm.weight", 0);
    }
    for (int i = 0; i < n_layers; i++) {
        int full = is_full(s, i, n_layers), shared = i >= n_layers - n_shared;
        int d = full ? HEAD_DIM_FULL : HEAD_DIM, kv = full && s->k_eq_v ? s->kv_full : s->kv;
        int inter = s->double_wide && shared ? 2 * s->inter : s->inter;
        float wq = 1.0f / sqrtf((float)(s->heads * d)), wi = 1.0f / sqrtf((float)inter);
        ten(c, 1, H, 0, 0.2f, 1.0f, "layers.%d.input_layernorm.weight", i);
        ten(c, 1, H, 0, 0.2f, 1.0f, "layers.%d.post_attention_layernorm.weight", i);
        ten(c, 1, H, 0, 0.2f, 1.0f, "layers.%d.pre_feedforward_layernorm.weight", i);
        ten(c, 1, H, 0, 0.2f, 1.0f, "layers.%d.post_feedforward_layernorm.weight", i);
        ten(c, 1, 1, 0, 0, 1.0f, "layers.%d.layer_scalar", i);
        ten(c, 2, (uint64_t)s->heads * d, H, wh, 0, "layers.%d.self_attn.q_proj.weight", i);
        ten(c, 2, H, (uint64_t)s->heads * d, wq, 0, "layers.%d.self_attn.o_proj.weight", i);
        ten(c, 1, d, 0, 0.2f, 1.0f, "layers.%d.self_attn.q_norm.weight", i);
        if (!shared) {
            ten(c, 2, (uint64_t)kv * d, H, wh, 0, "layers.%d.self_attn.k_proj.weight", i);
            if (!(full && s->k_eq_v)) ten(c, 2, (uint64_t)kv * d, H, wh, 0, "layers.%d.self_attn.v_proj.weight", i);
            ten(c, 1, d, 0, 0.2f, 1.0f, "layers.%d.self_attn.k_norm.weight", i);
        }
        ten(c, 2, inter, H, wh, 0, "layers.%d.mlp.gate_proj.weight", i);
        ten(c, 2, inter, H, wh, 0, "layers.%d.mlp.up_proj.weight", i);
        ten(c, 2, H, inter, wi, 0, "layers.%d.mlp.down_proj.weight", i);
        if (P) {
            ten(c, 2, P, H, wh, 0, "layers.%d.per_layer_input_gate.weight", i);
            ten(c, 2, H, P, 1.0f / sqrtf((float)P), 0, "layers.%d.per_layer_projection.weight", i);
            ten(c, 1, H, 0, 0.2f, 1.0f, "layers.%d.post_per_layer_input_norm.weight", i);
        }
    }
}

static int write_config(const char *dir, const Shape *s, int n_layers, int n_shared) {
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f,
            "{\"model_type\":\"gemma4\",\"tie_word_embeddings\":true,\"vision_config\":null,\"audio_config\":null,"
            "\"text_config\":{\"model_type\":\"gemma4_text\",\"vocab_size\":%d,\"hidden_size\":%d,"
            "\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_heads\":%d,\"num_key_value_heads\":%d,"
            "\"head_dim\":%d,\"global_head_dim\":%d,\"num_global_key_value_heads\":%s,\"attention_k_eq_v\":%s,"
            "\"use_double_wide_mlp\":%s,\"num_kv_shared_layers\":%d,\"hidden_size_per_layer_input\":%d,"
            "\"vocab_size_per_layer_input\":%d,\"sliding_window\":%d,\"final_logit_softcapping\":30.0,"
            "\"max_position_embeddings\":131072,\"rms_norm_eps\":1e-06,\"hidden_activation\":\"gelu_pytorch_tanh\","
            "\"rope_parameters\":{\"full_attention\":{\"partial_rotary_factor\":0.25,\"rope_theta\":1000000.0,"
            "\"rope_type\":\"proportional\"},\"sliding_attention\":{\"rope_theta\":10000.0,\"rope_type\":\"default\"}},"
            "\"layer_types\":[",
            VOCAB, s->hidden, s->inter, n_layers, s->heads, s->kv, HEAD_DIM, HEAD_DIM_FULL,
            s->k_eq_v ? "4" : "null", s->k_eq_v ? "true" : "false", s->double_wide ? "true" : "false", n_shared,
            s->ple, VOCAB, s->window);
    for (int i = 0; i < n_layers; i++)
        fprintf(f, "%s\"%s\"", i ? "," : "", is_full(s, i, n_layers) ? "full_attention" : "sliding_attention");
    fprintf(f, "]}}\n");
    return fclose(f);
}

/* model.safetensors: the header, then every tensor's bytes from its pool;
 * sparse: the header, then a hole as long as the tensors (a file that
 * reads as zeros and takes no disk, for what needs only the shapes). */
static int write_tensors(const char *dir, Ckpt *c, int sparse, uint64_t *total) {
    size_t cap = 256 + c->n * 200, len = 0;
    char *h = malloc(cap);
    uint64_t off = 0;
    len += (size_t)snprintf(h + len, cap - len, "{");
    for (size_t i = 0; i < c->n; i++) {
        const Ten *t = &c->t[i];
        uint64_t bytes = t->a * t->b * 2;
        if (t->n_dims == 1)
            len += (size_t)snprintf(h + len, cap - len, "%s\"%s\":{\"dtype\":\"BF16\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}",
                                    i ? "," : "", t->name, (unsigned long long)t->a, (unsigned long long)off,
                                    (unsigned long long)(off + bytes));
        else
            len += (size_t)snprintf(h + len, cap - len,
                                    "%s\"%s\":{\"dtype\":\"BF16\",\"shape\":[%llu,%llu],\"data_offsets\":[%llu,%llu]}",
                                    i ? "," : "", t->name, (unsigned long long)t->a, (unsigned long long)t->b,
                                    (unsigned long long)off, (unsigned long long)(off + bytes));
        off += bytes;
    }
    len += (size_t)snprintf(h + len, cap - len, "}");
    while (len % 8) h[len++] = ' ';
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    uint64_t hl = len;
    int ok = f && fwrite(&hl, 8, 1, f) == 1 && fwrite(h, 1, len, f) == len;
    if (sparse) ok = ok && fflush(f) == 0 && ftruncate(fileno(f), (off_t)(8 + len + off)) == 0;
    for (size_t i = 0; ok && !sparse && i < c->n; i++) {
        const Ten *t = &c->t[i];
        const uint16_t *p = pool_for(c, t->scale, t->base);
        uint64_t n = t->a * t->b, at = next_rand(&c->rng) % POOL_N;
        while (ok && n) {
            uint64_t k = n < POOL_N - at ? n : POOL_N - at;
            ok = fwrite(p + at, 2, k, f) == k;
            n -= k;
            at = 0;
        }
    }
    if (f && fclose(f)) ok = 0;
    free(h);
    *total = off;
    return ok ? 0 : -1;
}

/* The shape called name, or NULL. */
static const Shape *shape_find(const char *name) {
    for (size_t i = 0; i < sizeof SHAPES / sizeof *SHAPES; i++)
        if (strcmp(name, SHAPES[i].name) == 0) return &SHAPES[i];
    return NULL;
}

/* KV sharing for s cut to n_layers: its share of the stack, leaving at
 * least one period of storing layers. */
static int shape_kv_shared(const Shape *s, int n_layers) {
    int n = s->kv_shared * n_layers / s->layers;
    if (n_layers - n < s->period) n = n_layers > s->period ? n_layers - s->period : 0;
    return n;
}

/* s cut to n_layers written into dir (sparse: tensors of zeros, in a
 * file that takes no disk; write_tensors); *bytes gets the tensors' bytes. */
static int shape_write_as(const char *dir, const Shape *s, int n_layers, int sparse, uint64_t *bytes) {
    int n_shared = shape_kv_shared(s, n_layers);
    Ckpt c = {.rng = 88172645463325252ull};
    list_tensors(&c, s, n_layers, n_shared);
    int rc = write_config(dir, s, n_layers, n_shared) || write_tensors(dir, &c, sparse, bytes);
    for (int i = 0; i < c.n_pools; i++) free(c.pools[i].v);
    free(c.t);
    return rc ? -1 : 0;
}

static inline int shape_write(const char *dir, const Shape *s, int n_layers, uint64_t *bytes) {
    return shape_write_as(dir, s, n_layers, 0, bytes);
}

/* Removes what shape_write wrote, and dir. */
static void shape_remove(const char *dir) {
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

#endif
