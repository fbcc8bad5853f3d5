/* lora.c - PEFT LoRA adapters: load (validated), save, bind to the model's
 * linears, apply. */
#include "lora.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapter_check.h"
#include "jsoncheck.h"
#include "sha256.h"
#include "model_impl.h"

/* ---- module names ------------------------------------------------------------- */

static const char *const TEXT_SLOT_NAMES[LORA_TEXT_SLOTS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
    "mlp.up_proj",      "mlp.down_proj",    "per_layer_input_gate", "per_layer_projection"};
static const char *const VISION_SLOT_NAMES[LORA_VISION_SLOTS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

int lora_text_module(const Model *m, int layer, int slot, char *buf, size_t cap) {
    const TextConfig *t = &m->w->cfg.text;
    if (layer < 0 || layer >= t->n_layers || slot < 0 || slot >= LORA_TEXT_SLOTS) return -1;
    const LayerConfig *lc = &t->layers[layer];
    if ((slot == LORA_K || slot == LORA_V) && lc->kv_shared) return -1;
    if (slot == LORA_V && lc->k_eq_v) return -1;
    if ((slot == LORA_PLE_GATE || slot == LORA_PLE_PROJ) && !t->ple_dim) return -1;
    snprintf(buf, cap, "%slayers.%d.%s", m->w->prefix, layer, TEXT_SLOT_NAMES[slot]);
    return 0;
}

int lora_vision_module(const Model *m, int layer, int slot, char *buf, size_t cap) {
    if (!m->w->cfg.vision.present || layer < 0 || layer >= m->w->cfg.vision.n_layers || slot < 0 || slot >= LORA_VISION_SLOTS)
        return -1;
    /* the linear inside Gemma4ClippableLinear: the clamps stay outside the adapter */
    snprintf(buf, cap, "model.vision_tower.encoder.layers.%d.%s.linear", layer, VISION_SLOT_NAMES[slot]);
    return 0;
}

/* ---- load ------------------------------------------------------------------------ */

void lora_free(LoraAdapter *a) {
    if (!a) return;
    for (size_t i = 0; !a->params && i < a->n_pairs; i++) { /* not packed yet */
        free(a->pairs[i].A);
        free(a->pairs[i].B);
    }
    free(a->params);
    free(a->pairs);
    free(a);
}

GfStatus lora_adapter_pack(LoraAdapter *a, GfError *err) {
    size_t n = 0;
    for (size_t i = 0; i < a->n_pairs; i++) n += (size_t)(a->pairs[i].rank * (a->pairs[i].in + a->pairs[i].out));
    float *slab = gf_malloc((n ? n : 1) * sizeof(float), err), *p = slab;
    if (!slab) return GF_NO_MEMORY;
    for (size_t i = 0; i < a->n_pairs; i++) {
        LoraPair *q = &a->pairs[i];
        size_t na = (size_t)(q->rank * q->in), nb = (size_t)(q->out * q->rank);
        memcpy(p, q->A, na * sizeof(float));
        memcpy(p + na, q->B, nb * sizeof(float));
        free(q->A);
        free(q->B);
        q->A = p;
        q->B = p + na;
        p += na + nb;
    }
    a->params = slab;
    a->n_params = n;
    return GF_OK;
}

static float *tensor_f32(const StTensor *t, GfError *err) {
    float *f = gf_malloc((size_t)t->n_elements * sizeof(float), err);
    for (uint64_t i = 0; f && i < t->n_elements; i++) f[i] = adapter_value_f32(t, i);
    return f;
}

/* Every A with its B, as float32 (adapter_check has vouched for the pairs). */
static GfStatus take_pairs(const SafeTensors *st, LoraAdapter *a, GfError *err) {
    a->pairs = gf_calloc(st->n_tensors / 2 + 1, sizeof *a->pairs, err);
    if (!a->pairs) return GF_NO_MEMORY;
    char module[256], which, name[300];
    for (size_t i = 0; i < st->n_tensors; i++) {
        const StTensor *ta = &st->tensors[i];
        if (adapter_split_key(ta->name, module, sizeof module, &which) || which != 'A') continue;
        snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", module);
        const StTensor *tb = safetensors_find(st, name);
        LoraPair *p = &a->pairs[a->n_pairs];
        if (!tb || strlen(module) >= sizeof p->module)
            return gf_error_set(err, GF_INVALID, "adapter_incompatible", NULL, "module %.160s has no lora_B", module);
        gf_strlcpy(p->module, module, sizeof p->module);
        p->rank = (int64_t)ta->shape[0];
        p->in = (int64_t)ta->shape[1];
        p->out = (int64_t)tb->shape[0];
        p->index = (int)a->n_pairs;
        a->n_pairs++;
        if (!(p->A = tensor_f32(ta, err)) || !(p->B = tensor_f32(tb, err))) return GF_NO_MEMORY;
    }
    return GF_OK;
}

static double config_number(const char *json, size_t len, const char *key, double dflt) {
    GfError e;
    cJSON *c = json_parse_strict(json, len, "adapter_config.json", &e);
    const cJSON *v = c ? cJSON_GetObjectItemCaseSensitive(c, key) : NULL;
    double out = cJSON_IsNumber(v) ? v->valuedouble : dflt;
    cJSON_Delete(c);
    return out;
}

GfStatus lora_load_dir(const char *dir, const Model *m, int max_rank, LoraAdapter **out, GfError *err) {
    return lora_load_checked(dir, &model_dir(m)->base, max_rank, out, err);
}

GfStatus lora_load_checked(const char *dir, const AdapterBase *base, int max_rank, LoraAdapter **out, GfError *err) {
    char path[4096];
    size_t clen = 0;
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    char *cfg = gf_read_file(path, 1u << 20, "adapter_config.json", &clen, err);
    if (!cfg) return err->status;
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    SafeTensors st;
    GfError e;
    if (safetensors_open(path, "adapter_model.safetensors", &st, &e)) {
        free(cfg);
        return gf_error_set(err, e.status == GF_INVALID ? GF_INVALID : e.status, e.status == GF_INVALID ? "adapter_corrupt" : e.code,
                            "weights", "%s", e.message);
    }
    AdapterInfo info;
    GfStatus s = adapter_check(cfg, clen, st.map, st.map_size, max_rank, base, &info, err);
    LoraAdapter *a = s ? NULL : gf_calloc(1, sizeof *a, err);
    if (!s && !a) s = GF_NO_MEMORY;
    if (!s) {
        a->rank = info.rank;
        a->alpha = info.alpha;
        a->use_rslora = info.use_rslora;
        a->dropout = config_number(cfg, clen, "lora_dropout", 0.0);
        a->scale = (float)(info.use_rslora ? info.alpha / sqrt((double)info.rank) : info.alpha / info.rank);
        s = take_pairs(&st, a, err);
        if (!s) s = lora_adapter_pack(a, err);
    }
    safetensors_close(&st);
    free(cfg);
    if (s) { lora_free(a); return s; }
    *out = a;
    return GF_OK;
}

/* ---- save ------------------------------------------------------------------------ */

static int finite_nonempty(const float *x, int64_t n) {
    if (!x || n <= 0) return 0;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static cJSON *config_json(const LoraAdapter *a) {
    cJSON *c = cJSON_CreateObject(), *targets = cJSON_CreateArray();
    cJSON_AddStringToObject(c, "peft_type", "LORA");
    cJSON_AddNullToObject(c, "task_type");
    cJSON_AddNullToObject(c, "base_model_name_or_path");
    cJSON_AddNumberToObject(c, "r", a->rank);
    cJSON_AddNumberToObject(c, "lora_alpha", a->alpha);
    cJSON_AddNumberToObject(c, "lora_dropout", a->dropout);
    cJSON_AddBoolToObject(c, "use_rslora", a->use_rslora);
    cJSON_AddStringToObject(c, "bias", "none");
    cJSON_AddBoolToObject(c, "fan_in_fan_out", 0);
    cJSON_AddBoolToObject(c, "use_dora", 0);
    cJSON_AddBoolToObject(c, "inference_mode", 1);
    cJSON_AddBoolToObject(c, "init_lora_weights", 1);
    cJSON_AddNullToObject(c, "modules_to_save");
    cJSON_AddItemToObject(c, "rank_pattern", cJSON_CreateObject());
    cJSON_AddItemToObject(c, "alpha_pattern", cJSON_CreateObject());
    for (size_t i = 0; i < a->n_pairs; i++) cJSON_AddItemToArray(targets, cJSON_CreateString(a->pairs[i].module));
    cJSON_AddItemToObject(c, "target_modules", targets);
    return c;
}

/* Writes text to dir/name through a temporary file, fsync and rename. */
static GfStatus write_atomic(const char *dir, const char *name, const char *text, GfError *err) {
    char tmp[4096], path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot write %s: %s", name, strerror(errno));
    size_t len = strlen(text), done = 0;
    while (done < len) {
        ssize_t w = write(fd, text + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) break;
        done += (size_t)w;
    }
    int ok = done == len && fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return gf_error_set(err, GF_IO, "io_error", NULL, "cannot write %s: %s", name, strerror(errno));
    }
    return GF_OK;
}

GfStatus lora_save_dir(const LoraAdapter *a, const char *dir, GfError *err) {
    if (!a->n_pairs) return gf_error_set(err, GF_INVALID, "adapter_empty", NULL, "refusing to save an adapter with no tensors");
    StWriteTensor *t = gf_calloc(2 * a->n_pairs, sizeof *t, err);
    char (*names)[200] = t ? gf_calloc(2 * a->n_pairs, sizeof *names, err) : NULL;
    if (!names) { free(t); return GF_NO_MEMORY; }
    GfStatus st = GF_OK;
    for (size_t i = 0; !st && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        if (!finite_nonempty(p->A, p->rank * p->in) || !finite_nonempty(p->B, p->out * p->rank)) {
            st = gf_error_set(err, GF_INVALID, "adapter_not_finite", NULL,
                              "refusing to save: %.160s has a missing, empty or non-finite tensor", p->module);
            break;
        }
        snprintf(names[2 * i], sizeof names[0], "base_model.model.%s.lora_A.weight", p->module);
        snprintf(names[2 * i + 1], sizeof names[0], "base_model.model.%s.lora_B.weight", p->module);
        t[2 * i] = (StWriteTensor){names[2 * i], ST_F32, 2, {(uint64_t)p->rank, (uint64_t)p->in}, p->A};
        t[2 * i + 1] = (StWriteTensor){names[2 * i + 1], ST_F32, 2, {(uint64_t)p->out, (uint64_t)p->rank}, p->B};
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    if (!st) st = safetensors_write(path, t, 2 * a->n_pairs, err);
    free(t);
    free(names);
    if (st) return st;
    cJSON *c = config_json(a);
    char *text = c ? cJSON_Print(c) : NULL;
    cJSON_Delete(c);
    if (!text) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    st = write_atomic(dir, "adapter_config.json", text, err);
    free(text);
    return st;
}

/* ---- bind ---------------------------------------------------------------------- */

void lora_binding_free(LoraBinding *b) {
    if (!b) return;
    if (b->be) {
        b->be->ops->free(&b->be->ctx, &b->d_params);
        b->be->ops->free(&b->be->ctx, &b->d_grads);
    }
    free(b->pairs);
    free(b->text);
    free(b->vision);
    memset(b, 0, sizeof *b);
}

/* b's device slab: *slab taken as it is (zeroed), or a new one holding a's
 * parameters; then b's pairs pointing into it. */
static GfStatus binding_slab(const KnBackend *be, const LoraAdapter *a, KnBuffer *slab, LoraBinding *b, GfError *err) {
    if (!a->params) return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "the adapter is not packed");
    if (slab && slab->bytes < a->n_params * sizeof(float))
        return gf_error_set(err, GF_INVALID, "invalid_value", NULL, "the parameter slab holds %zu bytes, the adapter %zu",
                            slab->bytes, a->n_params * sizeof(float));
    b->be = be;
    b->n_pairs = a->n_pairs;
    b->n_params = a->n_params;
    b->pairs = gf_calloc(a->n_pairs + 1, sizeof *b->pairs, err);
    if (!b->pairs) return GF_NO_MEMORY;
    if (slab) {
        b->d_params = *slab;
        memset(slab, 0, sizeof *slab);
    } else if (be->ops->alloc(&be->ctx, &b->d_params, (a->n_params ? a->n_params : 1) * sizeof(float), KN_F32,
                              "the adapter's parameters", err)) {
        return err->status;
    }
    b->params = b->d_params.data;
    if (!slab) be->ops->upload(&be->ctx, b->params, a->params, a->n_params * sizeof(float));
    for (size_t i = 0; i < a->n_pairs; i++) {
        b->pairs[i] = a->pairs[i];
        b->pairs[i].A = b->params + (a->pairs[i].A - a->params);
        b->pairs[i].B = b->params + (a->pairs[i].B - a->params);
        b->pairs[i].dA = b->pairs[i].dB = NULL;
    }
    return GF_OK;
}

/* b->launch_digest from its scale and text slots (lora.h). */
static void launch_digest(LoraBinding *b) {
    GfSha256 h;
    gf_sha256_init(&h);
    uint32_t scale;
    memcpy(&scale, &b->scale, sizeof scale);
    uint64_t head[2] = {scale, (uint64_t)b->n_layers};
    gf_sha256_update(&h, head, sizeof head);
    size_t n = b->text ? (size_t)b->n_layers * LORA_TEXT_SLOTS : 0;
    for (size_t i = 0; i <= n; i++) {
        const LoraPair *p = i < n ? b->text[i] : b->ple_model_proj;
        uint64_t w[7] = {0};
        if (p) {
            uint64_t v[7] = {1, (uintptr_t)p->A, (uintptr_t)p->B, (uintptr_t)p->dA, (uintptr_t)p->dB,
                             (uint64_t)p->rank, (uint64_t)p->index};
            memcpy(w, v, sizeof w);
        }
        gf_sha256_update(&h, w, sizeof w);
    }
    gf_sha256_final(&h, b->launch_digest);
}

GfStatus lora_binding_upload_new(const KnBackend *be, const LoraAdapter *a, LoraBinding *b, GfError *err) {
    return binding_slab(be, a, NULL, b, err);
}

uint64_t lora_grads_bytes(uint64_t n_params) { return (n_params * sizeof(float) + 7) / 8 * 8 + sizeof(double); }

GfStatus lora_binding_grads(LoraBinding *b, GfError *err) {
    if (b->grads) return GF_OK;
    size_t bytes = (size_t)lora_grads_bytes(b->n_params);
    if (b->be->ops->alloc(&b->be->ctx, &b->d_grads, bytes, KN_F32, "the adapter's gradients", err))
        return err->status;
    b->grads = b->d_grads.data;
    b->grad_sq = (double *)((char *)b->d_grads.data + bytes - sizeof(double));
    lora_binding_zero_grads(b);
    for (size_t i = 0; i < b->n_pairs; i++) {
        LoraPair *p = &b->pairs[i];
        p->dA = b->grads + (p->A - b->params);
        p->dB = b->grads + (p->B - b->params);
    }
    launch_digest(b);
    return GF_OK;
}

void lora_binding_zero_grads(LoraBinding *b) {
    if (b->grads) b->be->ops->memset(&b->be->ctx, b->grads, 0, b->n_params * sizeof(float));
}

void lora_binding_download(const LoraBinding *b, LoraAdapter *a) {
    b->be->ops->download(&b->be->ctx, a->params, b->params, b->n_params * sizeof(float));
}

void lora_binding_upload(const LoraBinding *b, const LoraAdapter *a) {
    b->be->ops->upload(&b->be->ctx, b->params, a->params, b->n_params * sizeof(float));
}

void lora_binding_download_grads(const LoraBinding *b, float *host) {
    b->be->ops->download(&b->be->ctx, host, b->grads, b->n_params * sizeof(float));
}

/* The slot a module names, or NULL when the model has no such linear. */
static const LoraPair **find_slot(const Model *m, LoraBinding *b, const char *module) {
    char name[256];
    for (int l = 0; l < b->n_layers; l++)
        for (int s = 0; s < LORA_TEXT_SLOTS; s++)
            if (lora_text_module(m, l, s, name, sizeof name) == 0 && strcmp(name, module) == 0)
                return &b->text[l * LORA_TEXT_SLOTS + s];
    for (int l = 0; l < b->n_vision_layers; l++)
        for (int s = 0; s < LORA_VISION_SLOTS; s++)
            if (lora_vision_module(m, l, s, name, sizeof name) == 0 && strcmp(name, module) == 0)
                return &b->vision[l * LORA_VISION_SLOTS + s];
    snprintf(name, sizeof name, "%sper_layer_model_projection", m->w->prefix);
    if (m->w->cfg.text.ple_dim && strcmp(module, name) == 0) return &b->ple_model_proj;
    if (m->w->cfg.vision.present && strcmp(module, "model.vision_tower.patch_embedder.input_proj") == 0) return &b->input_proj;
    if (m->w->cfg.vision.present && strcmp(module, "model.embed_vision.embedding_projection") == 0) return &b->embed_proj;
    return NULL;
}

static GfStatus bind(const Model *m, const LoraAdapter *a, KnBuffer *slab, LoraBinding *b, GfError *err) {
    memset(b, 0, sizeof *b);
    b->scale = a->scale;
    b->n_layers = m->w->cfg.text.n_layers;
    b->n_vision_layers = m->w->cfg.vision.present ? m->w->cfg.vision.n_layers : 0;
    b->text = gf_calloc((size_t)b->n_layers * LORA_TEXT_SLOTS, sizeof *b->text, err);
    b->vision = gf_calloc((size_t)b->n_vision_layers * LORA_VISION_SLOTS + 1, sizeof *b->vision, err);
    if (!b->text || !b->vision) { lora_binding_free(b); return GF_NO_MEMORY; }
    for (size_t i = 0; i < a->n_pairs; i++) {
        const LoraPair **slot = find_slot(m, b, a->pairs[i].module);
        if (!slot) {
            lora_binding_free(b);
            return gf_error_set(err, GF_INVALID, "adapter_incompatible", NULL,
                                "the adapter's module %.160s is not a linear of this model", a->pairs[i].module);
        }
        *slot = &a->pairs[i]; /* the adapter's pair for now, its device copy below */
        if (a->pairs[i].rank > b->max_rank) b->max_rank = (int)a->pairs[i].rank;
    }
    if (binding_slab(&m->be, a, slab, b, err)) { /* a slab is taken only once nothing else can fail */
        GfStatus st = err->status;
        lora_binding_free(b);
        return st;
    }
    const LoraPair **slots[] = {b->text, b->vision};
    size_t n_slots[] = {(size_t)b->n_layers * LORA_TEXT_SLOTS, (size_t)b->n_vision_layers * LORA_VISION_SLOTS};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < n_slots[k]; i++)
            if (slots[k][i]) slots[k][i] = &b->pairs[slots[k][i] - a->pairs];
    const LoraPair **one[] = {&b->ple_model_proj, &b->input_proj, &b->embed_proj};
    for (int k = 0; k < 3; k++)
        if (*one[k]) *one[k] = &b->pairs[*one[k] - a->pairs];
    launch_digest(b);
    return GF_OK;
}

GfStatus lora_bind(const Model *m, const LoraAdapter *a, LoraBinding *b, GfError *err) { return bind(m, a, NULL, b, err); }

GfStatus lora_bind_adopt(const Model *m, const LoraAdapter *a, KnBuffer *slab, LoraBinding *b, GfError *err) {
    return bind(m, a, slab, b, err);
}

/* ---- apply ------------------------------------------------------------------ */

int64_t lora_max_in(const LoraAdapter *a) {
    int64_t m = 0;
    for (size_t i = 0; i < a->n_pairs; i++) m = a->pairs[i].in > m ? a->pairs[i].in : m;
    return m;
}

/* The kernel's description of pair p applied to rows [0, n) under b. */
static KnLoraSeg segment(const LoraBinding *b, const LoraPair *p, int64_t n) {
    KnLoraSeg s = {0, n, p->A, p->B, p->dA, p->dB, (int)p->rank, b->scale, 0.0f, 0};
    if (b->dropout.p > 0) {
        s.dropout = b->dropout.p;
        s.dropout_seed = gf_mix64(b->dropout.key ^ gf_mix64((uint64_t)p->index + 1));
    }
    return s;
}

void lora_apply(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *y, const float *x, int64_t n,
                float *tmp) {
    KnLoraSeg s = segment(b, p, n);
    be->ops->lora_shrink(&be->ctx, tmp, p->rank, x, &s, 1, p->in, b->dropout.row);
    be->ops->lora_expand(&be->ctx, y, tmp, p->rank, &s, 1, p->out);
}

void lora_apply_segments(const KnBackend *be, const KnLoraSeg *segs, int n_segs, float *y, const float *x, int64_t in,
                         int64_t out, float *tmp, int64_t ld_tmp, float *dropout_buf) {
    be->ops->lora_shrink(&be->ctx, tmp, ld_tmp, x, segs, n_segs, in, dropout_buf);
    be->ops->lora_expand(&be->ctx, y, tmp, ld_tmp, segs, n_segs, out);
}

int lora_pair_vision(const LoraPair *p) {
    static const char *const prefixes[] = {"model.vision_tower.", "model.embed_vision."};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
        if (strncmp(p->module, prefixes[i], strlen(prefixes[i])) == 0) return 1;
    return 0;
}

int lora_pairs_vision(const LoraPair *pairs, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (lora_pair_vision(&pairs[i])) return 1;
    return 0;
}

KnLoraSeg lora_segment(const LoraBinding *b, const LoraPair *p, int64_t row0, int64_t n) {
    KnLoraSeg s = segment(b, p, n);
    s.row0 = row0;
    return s;
}

/* ---- backward ------------------------------------------------------------------ */

void lora_backward(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *dx, const float *dy,
                   const float *x, int64_t n, float *tmp) {
    KnLoraSeg s = segment(b, p, n);
    int64_t r = p->rank;
    float *t = tmp, *gt = tmp + n * r;
    be->ops->lora_shrink(&be->ctx, t, r, x, &s, 1, p->in, b->dropout.row);
    be->ops->lora_expand_dx(&be->ctx, gt, dy, t, r, &s, 1, p->out);
    be->ops->lora_shrink_dx(&be->ctx, dx, gt, r, x, &s, 1, p->in, b->dropout.row);
}

void lora_backward_weights(const KnBackend *be, const LoraBinding *b, const LoraPair *p, const float *dy,
                           const float *x, int64_t n, float *tmp) {
    lora_backward(be, b, p, NULL, dy, x, n, tmp);
}

void lora_backward_input(const KnBackend *be, const LoraBinding *b, const LoraPair *p, float *dx, int64_t n,
                         const float *tmp) {
    KnLoraSeg s = segment(b, p, n);
    s.dA = NULL; /* counted by lora_backward_weights; x is not read */
    be->ops->lora_shrink_dx(&be->ctx, dx, tmp + n * p->rank, p->rank, NULL, &s, 1, p->in, b->dropout.row);
}

/* ---- create ---------------------------------------------------------------------- */

typedef struct {
    char name[160];
    int64_t in, out;
} Candidate;

/* Every linear an adapter may wrap, with its shape. */
static size_t candidates(const Model *m, Candidate *c, size_t cap) {
    size_t n = 0;
    const TextConfig *t = &m->w->cfg.text;
    for (int l = 0; l < t->n_layers; l++) {
        const Layer *L = &m->wt->layers[l];
        const KnMatrix *tm[LORA_TEXT_SLOTS] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down, &L->ple_gate, &L->ple_proj};
        for (int s = 0; s < LORA_TEXT_SLOTS && n < cap; s++)
            if (lora_text_module(m, l, s, c[n].name, sizeof c[n].name) == 0) {
                c[n].in = tm[s]->cols;
                c[n].out = tm[s]->rows;
                n++;
            }
    }
    if (t->ple_dim && n < cap) {
        snprintf(c[n].name, sizeof c[n].name, "%sper_layer_model_projection", m->w->prefix);
        c[n].in = m->wt->ple_model_proj.cols;
        c[n].out = m->wt->ple_model_proj.rows;
        n++;
    }
    if (!m->w->cfg.vision.present) return n;
    for (int l = 0; l < m->w->cfg.vision.n_layers; l++) {
        const VisionLayer *V = &m->wt->vision.layers[l];
        const ClipLinear *cl[LORA_VISION_SLOTS] = {&V->q, &V->k, &V->v, &V->o, &V->gate, &V->up, &V->down};
        for (int s = 0; s < LORA_VISION_SLOTS && n < cap; s++)
            if (lora_vision_module(m, l, s, c[n].name, sizeof c[n].name) == 0) {
                c[n].in = cl[s]->w.cols;
                c[n].out = cl[s]->w.rows;
                n++;
            }
    }
    const char *names[2] = {"model.vision_tower.patch_embedder.input_proj", "model.embed_vision.embedding_projection"};
    const KnMatrix *mats[2] = {&m->wt->vision.input_proj, &m->wt->vision.embed_proj};
    for (int i = 0; i < 2 && n < cap; i++, n++) {
        gf_strlcpy(c[n].name, names[i], sizeof c[n].name);
        c[n].in = mats[i]->cols;
        c[n].out = mats[i]->rows;
    }
    return n;
}

/* PEFT's rule: the module name is the target or ends with "." + target. */
static int target_matches(const char *name, const char *target) {
    size_t n = strlen(name), t = strlen(target);
    return strcmp(name, target) == 0 || (n > t && name[n - t - 1] == '.' && strcmp(name + n - t, target) == 0);
}

static float uniform(uint64_t *state, float bound) {
    uint64_t z = gf_mix64(*state += 0x9E3779B97F4A7C15ull); /* splitmix64 */
    return (float)(((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0) * bound);
}

static GfStatus add_pair(LoraAdapter *a, const Candidate *c, int rank, uint64_t *rng, GfError *err) {
    LoraPair *p = &a->pairs[a->n_pairs];
    gf_strlcpy(p->module, c->name, sizeof p->module);
    p->in = c->in;
    p->out = c->out;
    p->rank = rank;
    p->index = (int)a->n_pairs;
    p->A = gf_malloc((size_t)(rank * c->in) * sizeof(float), err);
    p->B = gf_calloc((size_t)(c->out * rank), sizeof(float), err);
    if (!p->A || !p->B) {
        free(p->A);
        free(p->B);
        p->A = p->B = NULL;
        return GF_NO_MEMORY;
    }
    a->n_pairs++;
    float bound = (float)(1.0 / sqrt((double)c->in));
    for (int64_t i = 0; i < rank * c->in; i++) p->A[i] = uniform(rng, bound);
    return GF_OK;
}

GfStatus lora_create(const Model *m, const char *const *targets, size_t n_targets, int rank, double alpha,
                     int use_rslora, uint64_t seed, LoraAdapter **out, GfError *err) {
    *out = NULL;
    if (rank < 1 || rank > LORA_MAX_RANK || !(alpha > 0) || n_targets == 0)
        return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "lora_r",
                            "rank must be 1..%d, alpha positive, and at least one target module", LORA_MAX_RANK);
    size_t cap = (size_t)m->w->cfg.text.n_layers * LORA_TEXT_SLOTS + 3 +
                 (m->w->cfg.vision.present ? (size_t)m->w->cfg.vision.n_layers * LORA_VISION_SLOTS : 0);
    Candidate *c = gf_calloc(cap, sizeof *c, err);
    LoraAdapter *a = c ? gf_calloc(1, sizeof *a, err) : NULL;
    if (a) a->pairs = gf_calloc(cap, sizeof *a->pairs, err);
    if (!a || !a->pairs) { free(c); lora_free(a); return GF_NO_MEMORY; }
    size_t n = candidates(m, c, cap);
    int all = n_targets == 1 && strcmp(targets[0], "all-linear") == 0;
    uint8_t *hit = gf_calloc(n_targets, 1, err);
    uint64_t rng = seed;
    GfStatus st = hit ? GF_OK : GF_NO_MEMORY;
    for (size_t i = 0; !st && i < n; i++) {
        int take = all;
        for (size_t k = 0; !all && k < n_targets; k++)
            if (target_matches(c[i].name, targets[k])) take = hit[k] = 1;
        if (take) st = add_pair(a, &c[i], rank, &rng, err);
    }
    for (size_t k = 0; !st && !all && k < n_targets; k++)
        if (!hit[k]) st = gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "target_modules",
                                       "target module '%.100s' matches no linear of this model", targets[k]);
    free(hit);
    free(c);
    if (!st) st = lora_adapter_pack(a, err);
    if (st) { lora_free(a); return st; }
    a->rank = rank;
    a->alpha = alpha;
    a->use_rslora = use_rslora;
    a->scale = (float)(use_rslora ? alpha / sqrt((double)rank) : alpha / rank);
    *out = a;
    return GF_OK;
}
