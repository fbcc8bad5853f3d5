/* model.c - Gemma 4 text model: weight binding and the forward pass. */
#include "model.h"
#include "model_impl.h"
#include "convert.h"
#include "nf4.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const GemmaConfig *model_config(const Model *m) { return &m->cfg; }
const ModelDir *model_dir(const Model *m) { return &m->dir; }
const KnBackend *model_backend(const Model *m) { return &m->be; }

GfStatus model_device_alloc(const Model *m, KnBuffer *buf, size_t bytes, const char *what, GfError *err) {
    return m->be.ops->alloc(&m->be.ctx, buf, bytes ? bytes : 1, KN_F32, what, err);
}

void model_device_free(const Model *m, KnBuffer *buf) {
    if (m && buf) m->be.ops->free(&m->be.ctx, buf);
}

void model_download(const Model *m, void *host, const void *dev, size_t bytes) {
    m->be.ops->download(&m->be.ctx, host, dev, bytes);
}

static int keep(Model *m, void *p, GfError *err) {
    void **n = gf_realloc(m->owned, (m->n_owned + 1) * sizeof *n, err);
    if (!n) return -1;
    m->owned = n;
    m->owned[m->n_owned++] = p;
    return 0;
}

static const StTensor *find(Model *m, const char *name, uint8_t **flag) {
    for (size_t s = 0; s < m->dir.n_shards; s++) {
        const StTensor *t = safetensors_find(&m->dir.shards[s], name);
        if (t) {
            if (flag) *flag = &m->claimed[s][t - m->dir.shards[s].tensors];
            return t;
        }
    }
    return NULL;
}

/* Finds `name` with the expected shape (dims[0..n_dims)) and a float dtype. */
static const StTensor *claim(Model *m, const char *name, const int64_t *dims, int n_dims, GfError *err);

int model_keep(Model *m, void *p, GfError *err) { return keep(m, p, err); }

GfStatus model_bind_matrix(Model *m, const char *name, int64_t rows, int64_t cols, KnMatrix *out, GfError *err);
GfStatus model_bind_vector(Model *m, const char *name, int64_t n, float **out, GfError *err);

static const StTensor *claim(Model *m, const char *name, const int64_t *dims, int n_dims, GfError *err) {
    uint8_t *flag;
    const StTensor *t = find(m, name, &flag);
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
static float *widen(Model *m, const StTensor *t, GfError *err) {
    float *out = gf_malloc((size_t)t->n_elements * sizeof(float), err);
    if (!out || keep(m, out, err)) { free(out); return NULL; }
    kn_convert_to_f32(out, t->data, dtype_of(t), 0, (int64_t)t->n_elements);
    return out;
}

GfStatus model_bind_matrix(Model *m, const char *name, int64_t rows, int64_t cols, KnMatrix *out, GfError *err) {
    int64_t dims[2] = {rows, cols};
    const StTensor *t = claim(m, name, dims, 2, err);
    if (!t) return err->status;
    *out = (KnMatrix){t->data, dtype_of(t), rows, cols, 0};
    if (t->dtype == ST_F16) { /* F16 kernels are not worth it: widen once */
        float *f = widen(m, t, err);
        if (!f) return GF_NO_MEMORY;
        *out = (KnMatrix){f, KN_F32, rows, cols, 0};
    }
    return GF_OK;
}

/* 3-D tensors [E, rows, cols] viewed as [E*rows, cols]. */
GfStatus model_bind_3d(Model *m, const char *name, int64_t e, int64_t rows, int64_t cols, KnMatrix *out, GfError *err) {
    int64_t dims[3] = {e, rows, cols};
    const StTensor *t = claim(m, name, dims, 3, err);
    if (!t) return err->status;
    *out = (KnMatrix){t->data, dtype_of(t), e * rows, cols, 0};
    if (t->dtype == ST_F16) {
        float *f = widen(m, t, err);
        if (!f) return GF_NO_MEMORY;
        out->data = f;
        out->dtype = KN_F32;
    }
    return GF_OK;
}

GfStatus model_bind_vector(Model *m, const char *name, int64_t n, float **out, GfError *err) {
    const StTensor *t = claim(m, name, &n, 1, err);
    if (!t) return err->status;
    return (*out = widen(m, t, err)) ? GF_OK : GF_NO_MEMORY;
}

GfStatus model_bind_scalar(Model *m, const char *name, float *out, GfError *err) {
    const StTensor *t = claim(m, name, NULL, 0, err);
    if (!t) return err->status;
    kn_convert_to_f32(out, t->data, dtype_of(t), 0, 1);
    return GF_OK;
}

#define bind_matrix model_bind_matrix
#define bind_vector model_bind_vector

/* Inverse RoPE frequencies of GEMMA4.md §2.3 for a head size. */
static float *rope_inv_freq(Model *m, const RopeParams *rp, int dim, GfError *err) {
    int half = dim / 2, live = rp->proportional ? (int)(rp->partial * (float)dim / 2.0f) : half;
    float *f = gf_calloc((size_t)half, sizeof *f, err);
    if (!f || keep(m, f, err)) { free(f); return NULL; }
    for (int i = 0; i < live && i < half; i++) {
        float expo = (float)(2 * i) / (float)dim;
        f[i] = (float)(1.0 / pow((double)rp->theta, (double)expo)) / rp->factor;
    }
    return f;
}

#define NAME(buf, ...) (snprintf(buf, sizeof buf, __VA_ARGS__), buf)

static GfStatus bind_attention(Model *m, int i, Layer *l, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    const LayerConfig *lc = &t->layers[i];
    int64_t H = t->hidden_size, D = lc->head_dim, q_out = (int64_t)t->n_heads * D, kv_out = (int64_t)lc->kv_heads * D;
    char n[256];
    const char *p = m->prefix;
    if (bind_matrix(m, NAME(n, "%slayers.%d.self_attn.q_proj.weight", p, i), q_out, H, &l->q, err) ||
        bind_matrix(m, NAME(n, "%slayers.%d.self_attn.o_proj.weight", p, i), H, q_out, &l->o, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.self_attn.q_norm.weight", p, i), D, &l->q_norm, err))
        return err->status;
    if (!lc->kv_shared) {
        if (bind_matrix(m, NAME(n, "%slayers.%d.self_attn.k_proj.weight", p, i), kv_out, H, &l->k, err) ||
            bind_vector(m, NAME(n, "%slayers.%d.self_attn.k_norm.weight", p, i), D, &l->k_norm, err))
            return err->status;
        if (!lc->k_eq_v && bind_matrix(m, NAME(n, "%slayers.%d.self_attn.v_proj.weight", p, i), kv_out, H, &l->v, err))
            return err->status;
    }
    l->inv_freq = rope_inv_freq(m, &t->rope[lc->kind], lc->head_dim, err);
    return l->inv_freq ? GF_OK : GF_NO_MEMORY;
}

static GfStatus bind_ffn(Model *m, int i, Layer *l, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    int64_t H = t->hidden_size, I = t->layers[i].intermediate, P = t->ple_dim;
    char n[256];
    const char *p = m->prefix;
    if (bind_matrix(m, NAME(n, "%slayers.%d.mlp.gate_proj.weight", p, i), I, H, &l->gate, err) ||
        bind_matrix(m, NAME(n, "%slayers.%d.mlp.up_proj.weight", p, i), I, H, &l->up, err) ||
        bind_matrix(m, NAME(n, "%slayers.%d.mlp.down_proj.weight", p, i), H, I, &l->down, err))
        return err->status;
    if (P && (bind_matrix(m, NAME(n, "%slayers.%d.per_layer_input_gate.weight", p, i), P, H, &l->ple_gate, err) ||
              bind_matrix(m, NAME(n, "%slayers.%d.per_layer_projection.weight", p, i), H, P, &l->ple_proj, err) ||
              bind_vector(m, NAME(n, "%slayers.%d.post_per_layer_input_norm.weight", p, i), H, &l->post_ple_ln, err)))
        return err->status;
    if (!t->moe) return GF_OK;
    int64_t E = t->n_experts, Im = t->moe_intermediate;
    if (bind_matrix(m, NAME(n, "%slayers.%d.router.proj.weight", p, i), E, H, &l->router, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.router.scale", p, i), H, &l->router_scale, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.router.per_expert_scale", p, i), E, &l->per_expert_scale, err) ||
        model_bind_3d(m, NAME(n, "%slayers.%d.experts.gate_up_proj", p, i), E, 2 * Im, H, &l->experts_gate_up, err) ||
        model_bind_3d(m, NAME(n, "%slayers.%d.experts.down_proj", p, i), E, H, Im, &l->experts_down, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.pre_feedforward_layernorm_2.weight", p, i), H, &l->pre_ff_ln2, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.post_feedforward_layernorm_1.weight", p, i), H, &l->post_ff_ln1, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.post_feedforward_layernorm_2.weight", p, i), H, &l->post_ff_ln2, err))
        return err->status;
    l->router_in_scale = gf_malloc((size_t)H * sizeof(float), err);
    if (!l->router_in_scale || keep(m, l->router_in_scale, err)) {
        free(l->router_in_scale);
        return GF_NO_MEMORY;
    }
    float hs = (float)(1.0 / sqrt((double)H));
    for (int64_t k = 0; k < H; k++) l->router_in_scale[k] = l->router_scale[k] * hs;
    return GF_OK;
}

static GfStatus bind_layer(Model *m, int i, Layer *l, GfError *err) {
    int64_t H = m->cfg.text.hidden_size, one = 1;
    char n[256];
    const char *p = m->prefix;
    float *scalar = NULL;
    if (bind_vector(m, NAME(n, "%slayers.%d.input_layernorm.weight", p, i), H, &l->input_ln, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.post_attention_layernorm.weight", p, i), H, &l->post_attn_ln, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.pre_feedforward_layernorm.weight", p, i), H, &l->pre_ff_ln, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.post_feedforward_layernorm.weight", p, i), H, &l->post_ff_ln, err) ||
        bind_vector(m, NAME(n, "%slayers.%d.layer_scalar", p, i), one, &scalar, err) || bind_attention(m, i, l, err) ||
        bind_ffn(m, i, l, err))
        return err->status ? err->status : GF_INVALID;
    l->layer_scalar = scalar[0];
    return GF_OK;
}

static GfStatus bind_globals(Model *m, GfError *err) {
    const TextConfig *t = &m->cfg.text;
    char n[256];
    const char *p = m->prefix;
    int64_t LP = (int64_t)t->n_layers * t->ple_dim;
    if (bind_matrix(m, NAME(n, "%sembed_tokens.weight", p), t->vocab_size, t->hidden_size, &m->embed, err) ||
        bind_vector(m, NAME(n, "%snorm.weight", p), t->hidden_size, &m->final_norm, err))
        return err->status;
    if (t->ple_dim &&
        (bind_matrix(m, NAME(n, "%sembed_tokens_per_layer.weight", p), t->ple_vocab, LP, &m->embed_ple, err) ||
         bind_matrix(m, NAME(n, "%sper_layer_model_projection.weight", p), LP, t->hidden_size, &m->ple_model_proj, err) ||
         bind_vector(m, NAME(n, "%sper_layer_projection_norm.weight", p), t->ple_dim, &m->ple_norm, err)))
        return err->status;
    return GF_OK;
}

/* ---- claim-all check ------------------------------------------------------ */

/* 1 when an unclaimed tensor is one this engine deliberately does not use. */
static int skippable(const Model *m, const StTensor *t, int *audio, int *vision) {
    const char *name = t->name;
    if (strncmp(name, "model.audio_tower.", 18) == 0 || strncmp(name, "model.embed_audio.", 18) == 0) return ++*audio;
    if (!m->cfg.vision.present && (strncmp(name, "model.vision_tower.", 19) == 0 || strncmp(name, "model.embed_vision.", 19) == 0))
        return ++*vision;
    if (strcmp(name, "lm_head.weight") == 0) return 1; /* tied to embed_tokens, never a second copy */
    const char *p = m->prefix;
    size_t pl = strlen(p);
    if (strncmp(name, p, pl) != 0 || strncmp(name + pl, "layers.", 7) != 0) return 0;
    char *end;
    long i = strtol(name + pl + 7, &end, 10);
    if (i < 0 || i >= m->cfg.text.n_layers || !m->cfg.text.layers[i].kv_shared) return 0;
    /* KV-shared layers of real E2B/E4B files still carry unused K/V weights */
    return strcmp(end, ".self_attn.k_proj.weight") == 0 || strcmp(end, ".self_attn.v_proj.weight") == 0 ||
           strcmp(end, ".self_attn.k_norm.weight") == 0;
}

static GfStatus check_all_claimed(Model *m, GfError *err) {
    int audio = 0, vision = 0;
    for (size_t s = 0; s < m->dir.n_shards; s++)
        for (size_t i = 0; i < m->dir.shards[s].n_tensors; i++) {
            const StTensor *t = &m->dir.shards[s].tensors[i];
            if (m->claimed[s][i] || skippable(m, t, &audio, &vision)) continue;
            return gf_error_set(err, GF_INVALID, "invalid_model", NULL,
                                "tensor '%s' is not part of the Gemma 4 model this config describes", t->name);
        }
    if (audio) GF_LOGI("model: skipped %d audio-tower tensors (audio input is not supported)", audio);
    if (vision) GF_LOGI("model: skipped %d vision-tower tensors (config.json has no vision_config)", vision);
    return GF_OK;
}

/* ---- open / close ----------------------------------------------------------- */

static GfStatus bind_all(Model *m, GfError *err) {
    snprintf(m->prefix, sizeof m->prefix, "%s",
             find(m, "model.language_model.embed_tokens.weight", NULL) ? "model.language_model." : "model.");
    m->claimed = gf_calloc(m->dir.n_shards, sizeof *m->claimed, err);
    if (!m->claimed) return GF_NO_MEMORY;
    for (size_t s = 0; s < m->dir.n_shards; s++)
        if (!(m->claimed[s] = gf_calloc(m->dir.shards[s].n_tensors, 1, err))) return GF_NO_MEMORY;
    m->layers = gf_calloc((size_t)m->cfg.text.n_layers, sizeof *m->layers, err);
    if (!m->layers) return GF_NO_MEMORY;
    GfStatus st = bind_globals(m, err);
    for (int i = 0; !st && i < m->cfg.text.n_layers; i++) st = bind_layer(m, i, &m->layers[i], err);
    if (!st && m->cfg.vision.present) st = vision_bind(m, err);
    return st ? st : check_all_claimed(m, err);
}

/* ---- QLoRA: the frozen linears in NF4 ------------------------------------------- */

/* Every linear the adapters may wrap, text and vision, and the experts (the
 * embedding, the tied lm_head, stays in its stored dtype): their count, and
 * their addresses into slots when not NULL. */
static size_t linear_slots(Model *m, KnMatrix **slots) {
    size_t n = 0;
#define SLOT(x) do { if ((x).data) { if (slots) slots[n] = &(x); n++; } } while (0)
    for (int i = 0; i < m->cfg.text.n_layers; i++) {
        Layer *l = &m->layers[i];
        SLOT(l->q); SLOT(l->k); SLOT(l->v); SLOT(l->o); SLOT(l->gate); SLOT(l->up); SLOT(l->down);
        SLOT(l->ple_gate); SLOT(l->ple_proj); SLOT(l->experts_gate_up); SLOT(l->experts_down);
    }
    for (int i = 0; m->cfg.vision.present && i < m->cfg.vision.n_layers; i++) {
        VisionLayer *l = &m->vision.layers[i];
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

void model_memory(const Model *m, ModelMemory *out) {
    memset(out, 0, sizeof *out);
    size_t n = linear_slots((Model *)m, NULL);
    KnMatrix **slots = gf_calloc(n + 1, sizeof *slots, NULL);
    if (!slots) return;
    linear_slots((Model *)m, slots);
    uint64_t linear_stored = 0;
    for (size_t i = 0; i < n; i++) {
        const KnMatrix *w = slots[i];
        int64_t elems = w->rows * w->cols;
        out->linear_params += (uint64_t)elems;
        out->linear_nf4_bytes += nf4_bytes(elems);
        linear_stored += w->dtype == KN_NF4 ? nf4_bytes(elems) : (uint64_t)elems * (w->dtype == KN_F32 ? 4u : 2u);
    }
    free(slots);
    out->n_linears = n;
    out->other_bytes = m->dir.n_bytes > linear_stored ? m->dir.n_bytes - linear_stored : 0;
    out->linear_stored_bytes = linear_stored;
}

static GfStatus quantize_linears(Model *m, GfError *err) {
    size_t n = linear_slots(m, NULL);
    KnMatrix **slots = gf_calloc(n + 1, sizeof *slots, err);
    m->nf4 = gf_calloc(n + 1, sizeof *m->nf4, err);
    if (!slots || !m->nf4) { free(slots); return GF_NO_MEMORY; }
    linear_slots(m, slots);
    GfStatus st = GF_OK;
    for (size_t i = 0; !st && i < n; i++) {
        KnMatrix *w = slots[i];
        st = kn_nf4_quantize(&m->nf4[i], *w, err);
        if (st) break;
        m->n_nf4 = i + 1;
        *w = kn_nf4_matrix(&m->nf4[i], 0, w->rows, w->cols);
    }
    free(slots);
    return st;
}

/* The device from the options, else from GF_DEVICE in the environment, else
 * the CPU. */
static GfStatus open_backend(Model *m, const ModelOptions *opts, GfError *err) {
    KnDeviceKind kind = KN_DEVICE_CPU;
    int index = 0;
    const char *env = getenv("GF_DEVICE");
    if (opts && opts->device) {
        if (kn_backend_parse(opts->device, &kind, &index, err)) return err->status;
    } else if (env && *env && kn_backend_parse(env, &kind, &index, err)) {
        return gf_error_wrap(err, NULL, "GF_DEVICE");
    }
    KnBackendOptions bo = {.n_threads = opts ? opts->n_threads : 0};
    return kn_backend_open(kind, index, &bo, &m->be, err);
}

GfStatus model_open(const char *dir, const ModelOptions *opts, Model **out, GfError *err) {
    Model *m = gf_calloc(1, sizeof *m, err);
    if (!m) return GF_NO_MEMORY;
    GfStatus st = gemma_config_load(dir, &m->cfg, err);
    if (!st) st = model_dir_open(dir, &m->dir, err);
    if (!st) st = bind_all(m, err);
    if (!st && opts && opts->quantize == MODEL_QUANT_NF4) st = quantize_linears(m, err);
    if (!st) st = open_backend(m, opts, err);
    if (st) {
        model_close(m);
        return st;
    }
    *out = m;
    return GF_OK;
}

void model_close(Model *m) {
    if (!m) return;
    if (m->be.ops) m->be.ops->free(&m->be.ctx, &m->act);
    kn_backend_close(&m->be);
    for (size_t i = 0; i < m->n_owned; i++) free(m->owned[i]);
    for (size_t i = 0; i < m->n_nf4; i++) kn_nf4_free(&m->nf4[i]);
    free(m->nf4);
    free(m->owned);
    for (size_t s = 0; m->claimed && s < m->dir.n_shards; s++) free(m->claimed[s]);
    free(m->claimed);
    free(m->layers);
    free(m->tables.row0);
    free(m->tables.segs);
    free(m->tables.ids);
    free(m->tables.pos);
    model_dir_close(&m->dir);
    gemma_config_free(&m->cfg);
    free(m);
}
