/* weights.c - the base model's weights: config.json, the checkpoint bound
 * tensor by tensor (text, PLE, MoE, the vision tower), QLoRA's NF4
 * linears, the resident-bytes count, and the reference count that lets
 * every context share one copy. */
#include "weights.h"
#include "weights_impl.h"

#include "base.h"
#include "convert.h"
#include "nf4.h"
#include "pool.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ARENA_CHUNK ((size_t)1 << 20)

/* A new mapping of size bytes (page-rounded) recorded in the arena. */
static void *new_chunk(GemmaWeights *gw, size_t size, GfError *err) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size = (size + page - 1) / page * page;
    if (gw->n_chunks == gw->cap_chunks) {
        size_t cap = gw->cap_chunks ? 2 * gw->cap_chunks : 64;
        WeightsChunk *c = gf_realloc(gw->chunks, cap * sizeof *c, err);
        if (!c) return NULL;
        gw->chunks = c;
        gw->cap_chunks = cap;
    }
    void *p = gf_alloc_hook_refuses() ? MAP_FAILED : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for the weights (%zu bytes)", size);
        return NULL;
    }
    gw->chunks[gw->n_chunks++] = (WeightsChunk){p, size};
    return p;
}

/* bytes (64-aligned) of the arena: large arrays get a mapping of their own
 * (which arena_release can give back), small ones share 1 MiB chunks. */
static void *arena_take(GemmaWeights *gw, size_t bytes, GfError *err) {
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes >= ARENA_CHUNK / 4) return new_chunk(gw, bytes, err);
    if (bytes > gw->cur_left) {
        if (!(gw->cur = new_chunk(gw, ARENA_CHUNK, err))) return NULL;
        gw->cur_left = ARENA_CHUNK;
    }
    void *p = gw->cur;
    gw->cur += bytes;
    gw->cur_left -= bytes;
    return p;
}

/* Gives back p's mapping when it has one of its own; 1 if it did. */
static int arena_release(GemmaWeights *gw, const void *p) {
    for (size_t i = 0; i < gw->n_chunks; i++)
        if (gw->chunks[i].base == p) {
            munmap(gw->chunks[i].base, gw->chunks[i].size);
            gw->chunks[i] = gw->chunks[--gw->n_chunks];
            return 1;
        }
    return 0;
}

int weights_in_arena(const GemmaWeights *gw, const void *p) {
    const uint8_t *q = p;
    for (size_t i = 0; i < gw->n_chunks; i++)
        if (q >= (const uint8_t *)gw->chunks[i].base && q < (const uint8_t *)gw->chunks[i].base + gw->chunks[i].size)
            return 1;
    return 0;
}

/* Once opened, nothing may write the weights: every chunk read-only (the
 * checkpoint's mapping already is). */
static void arena_seal(GemmaWeights *gw) {
    for (size_t i = 0; i < gw->n_chunks; i++) mprotect(gw->chunks[i].base, gw->chunks[i].size, PROT_READ);
    gw->cur = NULL;
    gw->cur_left = 0;
}

static float *weights_new_floats(GemmaWeights *gw, size_t n, GfError *err) {
    float *p = arena_take(gw, (n ? n : 1) * sizeof *p, err);
    if (!p) return NULL;
    memset(p, 0, n * sizeof *p);
    gw->resident_bytes += n * sizeof *p;
    return p;
}

static const StTensor *find(GemmaWeights *gw, const char *name, uint8_t **flag) {
    for (size_t s = 0; s < gw->dir.n_shards; s++) {
        const StTensor *t = safetensors_find(&gw->dir.shards[s], name);
        if (t) {
            if (flag) *flag = &gw->claimed[s][t - gw->dir.shards[s].tensors];
            return t;
        }
    }
    return NULL;
}

/* Finds `name` with the expected shape (dims[0..n_dims)) and a float dtype. */
static const StTensor *claim(GemmaWeights *gw, const char *name, const int64_t *dims, int n_dims, GfError *err) {
    uint8_t *flag;
    const StTensor *t = find(gw, name, &flag);
    if (!t) {
        gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tensor '%s' is missing from the checkpoint", name);
        return NULL;
    }
    int ok = t->n_dims == n_dims && (t->dtype == ST_F32 || t->dtype == ST_BF16 || t->dtype == ST_F16);
    for (int i = 0; ok && i < n_dims; i++) ok = t->shape[i] == (uint64_t)dims[i];
    if (!ok) {
        char want[96], got[96];
        uint64_t w[4];
        for (int i = 0; i < n_dims; i++) w[i] = (uint64_t)dims[i];
        safetensors_shape_str(w, n_dims, want, sizeof want);
        safetensors_shape_str(t->shape, t->n_dims, got, sizeof got);
        gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tensor '%s' has wrong shape or dtype; expected %s, got %s %s",
                     name, want, safetensors_dtype_name(t->dtype), got);
        return NULL;
    }
    *flag = 1;
    return t;
}

static KnDtype dtype_of(const StTensor *t) { return t->dtype == ST_F32 ? KN_F32 : t->dtype == ST_BF16 ? KN_BF16 : KN_F16; }

/* Widens n values of t to a new owned float array. */
static float *widen(GemmaWeights *gw, const StTensor *t, GfError *err) {
    float *out = weights_new_floats(gw, (size_t)t->n_elements, err);
    if (!out) return NULL;
    kn_convert_to_f32(out, t->data, dtype_of(t), 0, (int64_t)t->n_elements);
    return out;
}

static GfStatus weights_bind_matrix(GemmaWeights *gw, const char *name, int64_t rows, int64_t cols, KnMatrix *out, GfError *err) {
    int64_t dims[2] = {rows, cols};
    const StTensor *t = claim(gw, name, dims, 2, err);
    if (!t) return err->status;
    *out = (KnMatrix){t->data, dtype_of(t), rows, cols, 0, 0};
    if (t->dtype == ST_F16) { /* F16 kernels are not worth it: widen once */
        float *f = widen(gw, t, err);
        if (!f) return GF_NO_MEMORY;
        *out = (KnMatrix){f, KN_F32, rows, cols, 0, 0};
    } else {
        gw->resident_bytes += t->n_bytes;
    }
    return GF_OK;
}

/* 3-D tensors [E, rows, cols] viewed as [E*rows, cols]. */
static GfStatus weights_bind_3d(GemmaWeights *gw, const char *name, int64_t e, int64_t rows, int64_t cols, KnMatrix *out, GfError *err) {
    int64_t dims[3] = {e, rows, cols};
    const StTensor *t = claim(gw, name, dims, 3, err);
    if (!t) return err->status;
    *out = (KnMatrix){t->data, dtype_of(t), e * rows, cols, 0, 0};
    if (t->dtype == ST_F16) {
        float *f = widen(gw, t, err);
        if (!f) return GF_NO_MEMORY;
        out->data = f;
        out->dtype = KN_F32;
    } else {
        gw->resident_bytes += t->n_bytes;
    }
    return GF_OK;
}

static GfStatus weights_bind_vector(GemmaWeights *gw, const char *name, int64_t n, float **out, GfError *err) {
    const StTensor *t = claim(gw, name, &n, 1, err);
    if (!t) return err->status;
    return (*out = widen(gw, t, err)) ? GF_OK : GF_NO_MEMORY;
}

static GfStatus weights_bind_scalar(GemmaWeights *gw, const char *name, float *out, GfError *err) {
    const StTensor *t = claim(gw, name, NULL, 0, err);
    if (!t) return err->status;
    kn_convert_to_f32(out, t->data, dtype_of(t), 0, 1);
    return GF_OK;
}


/* Inverse RoPE frequencies of GEMMA4.md §2.3 for a head size. */
static float *rope_inv_freq(GemmaWeights *gw, const RopeParams *rp, int dim, GfError *err) {
    int half = dim / 2, live = rp->proportional ? (int)(rp->partial * (float)dim / 2.0f) : half;
    float *f = weights_new_floats(gw, (size_t)half, err);
    if (!f) return NULL;
    for (int i = 0; i < live && i < half; i++) {
        float expo = (float)(2 * i) / (float)dim;
        f[i] = (float)(1.0 / pow((double)rp->theta, (double)expo)) / rp->factor;
    }
    return f;
}

#define NAME(buf, ...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)

static GfStatus bind_attention(GemmaWeights *gw, int i, Layer *l, GfError *err) {
    const TextConfig *t = &gw->cfg.text;
    const LayerConfig *lc = &t->layers[i];
    int64_t H = t->hidden_size, D = lc->head_dim, q_out = (int64_t)t->n_heads * D, kv_out = (int64_t)lc->kv_heads * D;
    char n[256];
    const char *p = gw->prefix;
    if (weights_bind_matrix(gw, NAME(n, "%slayers.%d.self_attn.q_proj.weight", p, i), q_out, H, &l->q, err) ||
        weights_bind_matrix(gw, NAME(n, "%slayers.%d.self_attn.o_proj.weight", p, i), H, q_out, &l->o, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.self_attn.q_norm.weight", p, i), D, &l->q_norm, err))
        return err->status;
    if (!lc->kv_shared) {
        if (weights_bind_matrix(gw, NAME(n, "%slayers.%d.self_attn.k_proj.weight", p, i), kv_out, H, &l->k, err) ||
            weights_bind_vector(gw, NAME(n, "%slayers.%d.self_attn.k_norm.weight", p, i), D, &l->k_norm, err))
            return err->status;
        if (!lc->k_eq_v && weights_bind_matrix(gw, NAME(n, "%slayers.%d.self_attn.v_proj.weight", p, i), kv_out, H, &l->v, err))
            return err->status;
    }
    l->inv_freq = rope_inv_freq(gw, &t->rope[lc->kind], lc->head_dim, err);
    return l->inv_freq ? GF_OK : GF_NO_MEMORY;
}

static GfStatus bind_ffn(GemmaWeights *gw, int i, Layer *l, GfError *err) {
    const TextConfig *t = &gw->cfg.text;
    int64_t H = t->hidden_size, I = t->layers[i].intermediate, P = t->ple_dim;
    char n[256];
    const char *p = gw->prefix;
    if (weights_bind_matrix(gw, NAME(n, "%slayers.%d.mlp.gate_proj.weight", p, i), I, H, &l->gate, err) ||
        weights_bind_matrix(gw, NAME(n, "%slayers.%d.mlp.up_proj.weight", p, i), I, H, &l->up, err) ||
        weights_bind_matrix(gw, NAME(n, "%slayers.%d.mlp.down_proj.weight", p, i), H, I, &l->down, err))
        return err->status;
    if (P && (weights_bind_matrix(gw, NAME(n, "%slayers.%d.per_layer_input_gate.weight", p, i), P, H, &l->ple_gate, err) ||
              weights_bind_matrix(gw, NAME(n, "%slayers.%d.per_layer_projection.weight", p, i), H, P, &l->ple_proj, err) ||
              weights_bind_vector(gw, NAME(n, "%slayers.%d.post_per_layer_input_norm.weight", p, i), H, &l->post_ple_ln, err)))
        return err->status;
    if (!t->moe) return GF_OK;
    int64_t E = t->n_experts, Im = t->moe_intermediate;
    if (weights_bind_matrix(gw, NAME(n, "%slayers.%d.router.proj.weight", p, i), E, H, &l->router, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.router.scale", p, i), H, &l->router_scale, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.router.per_expert_scale", p, i), E, &l->per_expert_scale, err) ||
        weights_bind_3d(gw, NAME(n, "%slayers.%d.experts.gate_up_proj", p, i), E, 2 * Im, H, &l->experts_gate_up, err) ||
        weights_bind_3d(gw, NAME(n, "%slayers.%d.experts.down_proj", p, i), E, H, Im, &l->experts_down, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.pre_feedforward_layernorm_2.weight", p, i), H, &l->pre_ff_ln2, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.post_feedforward_layernorm_1.weight", p, i), H, &l->post_ff_ln1, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.post_feedforward_layernorm_2.weight", p, i), H, &l->post_ff_ln2, err))
        return err->status;
    if (!(l->router_in_scale = weights_new_floats(gw, (size_t)H, err))) return GF_NO_MEMORY;
    float hs = (float)(1.0 / sqrt((double)H));
    for (int64_t k = 0; k < H; k++) l->router_in_scale[k] = l->router_scale[k] * hs;
    return GF_OK;
}

static GfStatus bind_layer(GemmaWeights *gw, int i, Layer *l, GfError *err) {
    int64_t H = gw->cfg.text.hidden_size, one = 1;
    char n[256];
    const char *p = gw->prefix;
    float *scalar = NULL;
    if (weights_bind_vector(gw, NAME(n, "%slayers.%d.input_layernorm.weight", p, i), H, &l->input_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.post_attention_layernorm.weight", p, i), H, &l->post_attn_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.pre_feedforward_layernorm.weight", p, i), H, &l->pre_ff_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.post_feedforward_layernorm.weight", p, i), H, &l->post_ff_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%slayers.%d.layer_scalar", p, i), one, &scalar, err) || bind_attention(gw, i, l, err) ||
        bind_ffn(gw, i, l, err))
        return err->status ? err->status : GF_INVALID;
    l->layer_scalar = scalar[0];
    return GF_OK;
}

static GfStatus bind_globals(GemmaWeights *gw, GfError *err) {
    const TextConfig *t = &gw->cfg.text;
    char n[256];
    const char *p = gw->prefix;
    int64_t LP = (int64_t)t->n_layers * t->ple_dim;
    if (weights_bind_matrix(gw, NAME(n, "%sembed_tokens.weight", p), t->vocab_size, t->hidden_size, &gw->host.embed, err) ||
        weights_bind_vector(gw, NAME(n, "%snorm.weight", p), t->hidden_size, &gw->host.final_norm, err))
        return err->status;
    if (t->ple_dim &&
        (weights_bind_matrix(gw, NAME(n, "%sembed_tokens_per_layer.weight", p), t->ple_vocab, LP, &gw->host.embed_ple, err) ||
         weights_bind_matrix(gw, NAME(n, "%sper_layer_model_projection.weight", p), LP, t->hidden_size, &gw->host.ple_model_proj, err) ||
         weights_bind_vector(gw, NAME(n, "%sper_layer_projection_norm.weight", p), t->ple_dim, &gw->host.ple_norm, err)))
        return err->status;
    return GF_OK;
}

#define VT "model.vision_tower."

/* ---- the vision tower ----------------------------------------------------------------- */

static GfStatus bind_clip(GemmaWeights *gw, const char *base, int64_t rows, int64_t cols, ClipLinear *cl, GfError *err) {
    char n[300];
    if (weights_bind_matrix(gw, NAME(n, "%s.linear.weight", base), rows, cols, &cl->w, err)) return err->status;
    cl->clipped = gw->cfg.vision.clipped_linears;
    if (!cl->clipped) return GF_OK;
    if (weights_bind_scalar(gw, NAME(n, "%s.input_min", base), &cl->in_min, err) ||
        weights_bind_scalar(gw, NAME(n, "%s.input_max", base), &cl->in_max, err) ||
        weights_bind_scalar(gw, NAME(n, "%s.output_min", base), &cl->out_min, err) ||
        weights_bind_scalar(gw, NAME(n, "%s.output_max", base), &cl->out_max, err))
        return err->status;
    return GF_OK;
}

static GfStatus bind_vision_layer(GemmaWeights *gw, int i, VisionLayer *l, GfError *err) {
    const VisionConfig *v = &gw->cfg.vision;
    int64_t d = v->hidden_size, D = v->head_dim, qo = (int64_t)v->n_heads * D, kvo = (int64_t)v->kv_heads * D;
    char n[300], p[160];
    snprintf(p, sizeof p, VT "encoder.layers.%d.", i);
    if (weights_bind_vector(gw, NAME(n, "%sinput_layernorm.weight", p), d, &l->input_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%spost_attention_layernorm.weight", p), d, &l->post_attn_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%spre_feedforward_layernorm.weight", p), d, &l->pre_ff_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%spost_feedforward_layernorm.weight", p), d, &l->post_ff_ln, err) ||
        weights_bind_vector(gw, NAME(n, "%sself_attn.q_norm.weight", p), D, &l->q_norm, err) ||
        weights_bind_vector(gw, NAME(n, "%sself_attn.k_norm.weight", p), D, &l->k_norm, err) ||
        bind_clip(gw, NAME(n, "%sself_attn.q_proj", p), qo, d, &l->q, err) ||
        bind_clip(gw, NAME(n, "%sself_attn.k_proj", p), kvo, d, &l->k, err) ||
        bind_clip(gw, NAME(n, "%sself_attn.v_proj", p), kvo, d, &l->v, err) ||
        bind_clip(gw, NAME(n, "%sself_attn.o_proj", p), d, qo, &l->o, err) ||
        bind_clip(gw, NAME(n, "%smlp.gate_proj", p), v->intermediate_size, d, &l->gate, err) ||
        bind_clip(gw, NAME(n, "%smlp.up_proj", p), v->intermediate_size, d, &l->up, err) ||
        bind_clip(gw, NAME(n, "%smlp.down_proj", p), d, v->intermediate_size, &l->down, err))
        return err->status;
    return GF_OK;
}

static GfStatus vision_bind(GemmaWeights *gw, GfError *err) {
    const VisionConfig *v = &gw->cfg.vision;
    VisionWeights *w = &gw->host.vision;
    int64_t d = v->hidden_size, pp = 3 * (int64_t)v->patch_size * v->patch_size;
    if (v->head_dim % 4) return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "config.json: vision_config.head_dim must be a multiple of 4");
    if (weights_bind_matrix(gw, VT "patch_embedder.input_proj.weight", d, pp, &w->input_proj, err) ||
        /* the position table is [2, P, d]: a matrix of 2P rows, x axis first */
        weights_bind_3d(gw, VT "patch_embedder.position_embedding_table", 2, v->position_embedding_size, d, &w->pos_table, err))
        return err->status;
    w->layers = gf_calloc((size_t)v->n_layers, sizeof *w->layers, err); /* freed with the weights */
    if (!w->layers) return GF_NO_MEMORY;
    for (int i = 0; i < v->n_layers; i++)
        if (bind_vision_layer(gw, i, &w->layers[i], err)) return err->status;
    if (v->standardize && (weights_bind_vector(gw, VT "std_bias", d, &w->std_bias, err) ||
                           weights_bind_vector(gw, VT "std_scale", d, &w->std_scale, err)))
        return err->status;
    if (weights_bind_matrix(gw, "model.embed_vision.embedding_projection.weight", gw->cfg.text.hidden_size, d, &w->embed_proj, err))
        return err->status;
    int q = v->head_dim / 4; /* frequencies per half: 100^(-4j/D) */
    if (!(w->inv_freq = weights_new_floats(gw, (size_t)q, err))) return GF_NO_MEMORY;
    for (int j = 0; j < q; j++) w->inv_freq[j] = (float)(1.0 / pow((double)v->rope_theta, (double)((float)(2 * j) / (float)(v->head_dim / 2))));
    /* the pooled output's gradient factor: sqrt(d) / k^2, times std_scale */
    if (!(w->pool_grad_scale = weights_new_floats(gw, (size_t)d, err))) return GF_NO_MEMORY;
    float scale = sqrtf((float)d) / (float)(v->pooling_kernel * v->pooling_kernel);
    for (int64_t j = 0; j < d; j++) w->pool_grad_scale[j] = scale * (v->standardize ? w->std_scale[j] : 1.0f);
    return GF_OK;
}

/* ---- claim-all check ------------------------------------------------------ */

/* 1 when an unclaimed tensor is one this engine deliberately does not use. */
static int skippable(const GemmaWeights *gw, const StTensor *t, int *audio, int *vision) {
    const char *name = t->name;
    if (strncmp(name, "model.audio_tower.", 18) == 0 || strncmp(name, "model.embed_audio.", 18) == 0) return ++*audio;
    if (!gw->cfg.vision.present && (strncmp(name, "model.vision_tower.", 19) == 0 || strncmp(name, "model.embed_vision.", 19) == 0))
        return ++*vision;
    if (strcmp(name, "lm_head.weight") == 0) return 1; /* tied to embed_tokens, never a second copy */
    const char *p = gw->prefix;
    size_t pl = strlen(p);
    if (strncmp(name, p, pl) != 0 || strncmp(name + pl, "layers.", 7) != 0) return 0;
    char *end;
    long i = strtol(name + pl + 7, &end, 10);
    if (i < 0 || i >= gw->cfg.text.n_layers || !gw->cfg.text.layers[i].kv_shared) return 0;
    /* KV-shared layers of real E2B/E4B files still carry unused K/V weights */
    return strcmp(end, ".self_attn.k_proj.weight") == 0 || strcmp(end, ".self_attn.v_proj.weight") == 0 ||
           strcmp(end, ".self_attn.k_norm.weight") == 0;
}

static GfStatus check_all_claimed(GemmaWeights *gw, GfError *err) {
    int audio = 0, vision = 0;
    for (size_t s = 0; s < gw->dir.n_shards; s++)
        for (size_t i = 0; i < gw->dir.shards[s].n_tensors; i++) {
            const StTensor *t = &gw->dir.shards[s].tensors[i];
            if (gw->claimed[s][i] || skippable(gw, t, &audio, &vision)) continue;
            return gf_error_set(err, GF_INVALID, "invalid_model", NULL,
                                "tensor '%s' is not part of the Gemma 4 model this config describes", t->name);
        }
    if (audio) GF_LOGI("model: skipped %d audio-tower tensors (audio input is not supported)", audio);
    if (vision) GF_LOGI("model: skipped %d vision-tower tensors (config.json has no vision_config)", vision);
    return GF_OK;
}

/* ---- open / close ----------------------------------------------------------- */

static GfStatus bind_all(GemmaWeights *gw, GfError *err) {
    snprintf(gw->prefix, sizeof gw->prefix, "%s",
             find(gw, "model.language_model.embed_tokens.weight", NULL) ? "model.language_model." : "model.");
    gw->claimed = gf_calloc(gw->dir.n_shards, sizeof *gw->claimed, err);
    if (!gw->claimed) return GF_NO_MEMORY;
    for (size_t s = 0; s < gw->dir.n_shards; s++)
        if (!(gw->claimed[s] = gf_calloc(gw->dir.shards[s].n_tensors, 1, err))) return GF_NO_MEMORY;
    gw->host.layers = gf_calloc((size_t)gw->cfg.text.n_layers, sizeof *gw->host.layers, err);
    if (!gw->host.layers) return GF_NO_MEMORY;
    GfStatus st = bind_globals(gw, err);
    for (int i = 0; !st && i < gw->cfg.text.n_layers; i++) st = bind_layer(gw, i, &gw->host.layers[i], err);
    if (!st && gw->cfg.vision.present) st = vision_bind(gw, err);
    return st ? st : check_all_claimed(gw, err);
}

/* ---- QLoRA: the frozen linears in NF4 ------------------------------------------- */

/* Every linear the adapters may wrap, text and vision, and the experts (the
 * embedding, the tied lm_head, stays in its stored dtype): their count, and
 * their addresses into slots when not NULL. */
static size_t linear_slots(GemmaWeights *gw, KnMatrix **slots) {
    size_t n = 0;
#define SLOT(x) do { if ((x).data) { if (slots) slots[n] = &(x); n++; } } while (0)
    for (int i = 0; i < gw->cfg.text.n_layers; i++) {
        Layer *l = &gw->host.layers[i];
        SLOT(l->q); SLOT(l->k); SLOT(l->v); SLOT(l->o); SLOT(l->gate); SLOT(l->up); SLOT(l->down);
        SLOT(l->ple_gate); SLOT(l->ple_proj); SLOT(l->experts_gate_up); SLOT(l->experts_down);
    }
    for (int i = 0; gw->cfg.vision.present && i < gw->cfg.vision.n_layers; i++) {
        VisionLayer *l = &gw->host.vision.layers[i];
        SLOT(l->q.w); SLOT(l->k.w); SLOT(l->v.w); SLOT(l->o.w); SLOT(l->gate.w); SLOT(l->up.w); SLOT(l->down.w);
    }
#undef SLOT
    return n;
}

/* NF4 bytes of n elements: 4-bit codes, an int8 absmax per block of 64, a
 * float scale per group of 256 blocks (kernels/nf4.h). */
static uint64_t nf4_bytes(int64_t n) {
    int64_t blocks = (n + 63) / 64, groups = (blocks + 255) / 256;
    return (uint64_t)((n + 1) / 2 + blocks + groups * (int64_t)sizeof(float));
}

/* Bytes of the linears of slots[n] as they are bound now. */
static uint64_t linears_bytes(KnMatrix *const *slots, size_t n) {
    uint64_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t elems = slots[i]->rows * slots[i]->cols;
        bytes += slots[i]->dtype == KN_NF4 ? nf4_bytes(elems) : (uint64_t)elems * (slots[i]->dtype == KN_F32 ? 4u : 2u);
    }
    return bytes;
}

void weights_memory(const GemmaWeights *gw, ModelMemory *out) {
    memset(out, 0, sizeof *out);
    size_t n = linear_slots((GemmaWeights *)gw, NULL);
    KnMatrix **slots = gf_calloc(n + 1, sizeof *slots, NULL);
    if (!slots) return;
    linear_slots((GemmaWeights *)gw, slots);
    for (size_t i = 0; i < n; i++) {
        int64_t elems = slots[i]->rows * slots[i]->cols;
        out->linear_params += (uint64_t)elems;
        out->linear_nf4_bytes += nf4_bytes(elems);
    }
    out->linear_stored_bytes = linears_bytes(slots, n);
    out->linear_full_bytes = gw->linear_bound_bytes;
    free(slots);
    out->n_linears = n;
    out->other_bytes = gw->dir.n_bytes > gw->linear_bound_bytes ? gw->dir.n_bytes - gw->linear_bound_bytes : 0;
}

/* The linears' bytes as bound from the checkpoint (before any NF4), for
 * weights_memory's other_bytes. */
static GfStatus measure_linears(GemmaWeights *gw, GfError *err) {
    size_t n = linear_slots(gw, NULL);
    KnMatrix **slots = gf_calloc(n + 1, sizeof *slots, err);
    if (!slots) return GF_NO_MEMORY;
    linear_slots(gw, slots);
    gw->linear_bound_bytes = linears_bytes(slots, n);
    free(slots);
    return GF_OK;
}

/* q's arrays moved into the arena (read-only with the rest). */
static GfStatus nf4_to_arena(GemmaWeights *gw, KnNf4 *q, GfError *err) {
    size_t nc = (size_t)(q->n + 1) / 2, na = (size_t)q->n_blocks, ns = (size_t)q->n_groups * sizeof(float);
    uint8_t *c = arena_take(gw, nc ? nc : 1, err);
    int8_t *a = c ? arena_take(gw, na ? na : 1, err) : NULL;
    float *g = a ? arena_take(gw, ns ? ns : 1, err) : NULL;
    if (!g) return GF_NO_MEMORY;
    memcpy(c, q->codes, nc);
    memcpy(a, q->absmax_q, na);
    memcpy(g, q->group_scale, ns);
    KnNf4 old = *q;
    kn_nf4_free(&old);
    q->codes = c;
    q->absmax_q = a;
    q->group_scale = g;
    return GF_OK;
}

/* One batch of slots quantized on a thread pool: slot j of the batch by
 * thread j % nth, each with its own status and error. */
typedef struct {
    KnMatrix **slots;
    KnNf4 *out;
    GfStatus *st;
    GfError *errs;
    size_t n;
} QuantBatch;

static void quantize_task(void *ctx, int ith, int nth) {
    QuantBatch *q = ctx;
    for (size_t j = (size_t)ith; j < q->n; j += (size_t)nth) q->st[j] = kn_nf4_quantize(&q->out[j], *q->slots[j], &q->errs[j]);
}

/* Quantized linear i moved into the arena. With install, w (the weights'
 * own slot it was quantized from) views it from then on, and its stored
 * matrix, no longer read, is given back (a widened copy) or stops counting
 * (mapped pages). */
static GfStatus keep_nf4(GemmaWeights *gw, size_t i, KnMatrix *w, int install, GfError *err) {
    GfStatus st = nf4_to_arena(gw, &gw->nf4[i], err);
    if (st) {
        kn_nf4_free(&gw->nf4[i]);
        return st;
    }
    if (!install) return GF_OK;
    gw->n_nf4 = i + 1;
    uint64_t stored = linears_bytes(&w, 1);
    if (!weights_in_arena(gw, w->data) || arena_release(gw, w->data)) gw->resident_bytes -= stored;
    gw->resident_bytes += nf4_bytes(w->rows * w->cols);
    *w = kn_nf4_matrix(&gw->nf4[i], 0, w->rows, w->cols);
    return GF_OK;
}

/* slots[0..n) quantized into gw->nf4[0..n) on every core (31B's 30 B
 * parameters take minutes on one), in batches of a few per thread, each
 * kept in order as its batch ends (keep_nf4: with install, the stored
 * copies given back as it goes). On failure none past it is kept: those
 * quantized are freed, the rest left as they were. */
static GfStatus quantize_batches(GemmaWeights *gw, KnMatrix **slots, size_t n, int install, GfError *err) {
    KnPool *pool = kn_pool_new(0, err);
    size_t per = pool ? 2 * (size_t)kn_pool_size(pool) : 0;
    GfStatus *sts = pool ? gf_calloc(per, sizeof *sts, err) : NULL;
    GfError *errs = sts ? gf_calloc(per, sizeof *errs, err) : NULL;
    GfStatus st = errs ? GF_OK : GF_NO_MEMORY;
    for (size_t i0 = 0; !st && i0 < n; i0 += per) {
        QuantBatch b = {slots + i0, gw->nf4 + i0, sts, errs, n - i0 < per ? n - i0 : per};
        kn_pool_run(pool, quantize_task, &b);
        for (size_t j = 0; j < b.n; j++) {
            if (!st && (st = sts[j])) *err = errs[j];
            else if (!st) st = keep_nf4(gw, i0 + j, slots[i0 + j], install, err);
            else kn_nf4_free(&gw->nf4[i0 + j]); /* after a failure: dropped, never kept */
        }
    }
    kn_pool_free(pool);
    free(errs);
    free(sts);
    return st;
}

/* Every linear to NF4 now, on the host's cores, the payloads in the arena. */
static GfStatus quantize_linears(GemmaWeights *gw, KnMatrix **slots, size_t n, GfError *err) {
    gw->nf4 = gf_calloc(n + 1, sizeof *gw->nf4, err);
    return gw->nf4 ? quantize_batches(gw, slots, n, 1, err) : GF_NO_MEMORY;
}

/* Every linear to NF4 later, where it is used (weights_impl.h): its NF4
 * view installed now with the sizes alone, the stored matrix kept in
 * nf4_src. Counted at its NF4 size, as quantize_linears counts it. */
static GfStatus defer_linears(GemmaWeights *gw, KnMatrix **slots, size_t n, GfError *err) {
    gw->nf4 = gf_calloc(n + 1, sizeof *gw->nf4, err);
    gw->nf4_src = gw->nf4 ? gf_calloc(n + 1, sizeof *gw->nf4_src, err) : NULL;
    if (!gw->nf4_src) return GF_NO_MEMORY;
    for (size_t i = 0; i < n; i++) {
        KnMatrix *w = slots[i];
        gw->nf4_src[i] = *w;
        kn_nf4_shape(&gw->nf4[i], w->rows * w->cols);
        gw->resident_bytes -= linears_bytes(&w, 1);
        gw->resident_bytes += nf4_bytes(w->rows * w->cols);
        *w = kn_nf4_matrix(&gw->nf4[i], 0, w->rows, w->cols);
    }
    gw->n_nf4 = n;
    return GF_OK;
}

/* Every linear to NF4: deferred when asked and every stored linear is the
 * checkpoint's own (an F16 one widened into the arena is quantized here,
 * and with it the rest: the arena copy would otherwise travel to the
 * device whole). */
static GfStatus nf4_linears(GemmaWeights *gw, int defer, GfError *err) {
    size_t n = linear_slots(gw, NULL);
    KnMatrix **slots = gf_calloc(n + 1, sizeof *slots, err);
    if (!slots) return GF_NO_MEMORY;
    linear_slots(gw, slots);
    for (size_t i = 0; defer && i < n; i++)
        if (weights_in_arena(gw, slots[i]->data)) {
            GF_LOGI("model: quantizing to NF4 on the host: the checkpoint's linears are F16, widened at load");
            defer = 0;
            break;
        }
    GfStatus st = defer ? defer_linears(gw, slots, n, err) : quantize_linears(gw, slots, n, err);
    free(slots);
    return st;
}

GfStatus weights_nf4_host(GemmaWeights *gw, GfError *err) {
    if (!gw->nf4_src || atomic_load(&gw->nf4_host_ready)) return GF_OK;
    size_t n = gw->n_nf4;
    KnMatrix **src = gf_calloc(n + 1, sizeof *src, err);
    if (!src) return GF_NO_MEMORY;
    for (size_t i = 0; i < n; i++) src[i] = &gw->nf4_src[i];
    GfStatus st = quantize_batches(gw, src, n, 0, err);
    for (size_t i = 0; st && i < n; i++) { /* the sizes alone again (what reached the arena stays there) */
        gw->nf4[i] = (KnNf4){0};
        kn_nf4_shape(&gw->nf4[i], src[i]->rows * src[i]->cols);
    }
    if (!st) {
        atomic_store(&gw->nf4_host_ready, 1);
        GF_LOGI("model: %zu linears quantized to NF4 on the host for a CPU context", n);
    }
    arena_seal(gw);
    free(src);
    return st;
}

uint64_t weights_gauge_bytes(const WeightsGauge *g, KnDeviceKind kind) {
    if (!g) return 0;
    return kind == KN_DEVICE_CUDA ? atomic_load(&g->device_bytes) : atomic_load(&g->bytes);
}

/* ---- the object ---------------------------------------------------------------- */

static void weights_free(GemmaWeights *gw) {
    weights_devices_free(gw);
    pthread_mutex_destroy(&gw->devices_lock);
    if (gw->gauge) { /* set only once opened */
        atomic_fetch_sub(&gw->gauge->bytes, gw->resident_bytes);
        atomic_fetch_sub(&gw->gauge->copies, 1);
    }
    for (size_t i = 0; i < gw->n_chunks; i++) munmap(gw->chunks[i].base, gw->chunks[i].size);
    free(gw->chunks);
    free(gw->nf4); /* their payloads were in the arena */
    free(gw->nf4_src);
    for (size_t s = 0; gw->claimed && s < gw->dir.n_shards; s++) free(gw->claimed[s]);
    free(gw->claimed);
    free(gw->host.layers);
    free(gw->host.vision.layers);
    model_dir_close(&gw->dir);
    gemma_config_free(&gw->cfg);
    free(gw);
}

GfStatus weights_open(const char *dir, ModelQuant quant, int nf4_later, WeightsGauge *gauge, GemmaWeights **out,
                      GfError *err) {
    *out = NULL;
    GemmaWeights *gw = gf_calloc(1, sizeof *gw, err);
    if (!gw) return GF_NO_MEMORY;
    atomic_init(&gw->refs, 1);
    pthread_mutex_init(&gw->devices_lock, NULL);
    gw->quant = quant;
    GfStatus st = gemma_config_load(dir, &gw->cfg, err);
    if (!st) st = model_dir_open(dir, &gw->dir, err);
    if (!st) st = bind_all(gw, err);
    if (!st) st = measure_linears(gw, err);
    if (!st && quant == MODEL_QUANT_NF4) st = nf4_linears(gw, nf4_later, err);
    if (st) {
        weights_free(gw);
        return st;
    }
    arena_seal(gw);
    if ((gw->gauge = gauge)) {
        atomic_fetch_add(&gauge->bytes, gw->resident_bytes);
        atomic_fetch_add(&gauge->copies, 1);
    }
    *out = gw;
    return GF_OK;
}

GemmaWeights *weights_retain(GemmaWeights *gw) {
    atomic_fetch_add(&gw->refs, 1);
    return gw;
}

void weights_release(GemmaWeights *gw) {
    if (gw && atomic_fetch_sub(&gw->refs, 1) == 1) weights_free(gw);
}

const GemmaConfig *weights_config(const GemmaWeights *gw) { return &gw->cfg; }
const ModelDir *weights_dir(const GemmaWeights *gw) { return &gw->dir; }
ModelQuant weights_quant(const GemmaWeights *gw) { return gw->quant; }
int weights_nf4_later(const GemmaWeights *gw) { return gw->nf4_src != NULL; }
uint64_t weights_resident_bytes(const GemmaWeights *gw) { return gw->resident_bytes; }

