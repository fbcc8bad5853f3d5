/* config.c - config.json -> GemmaConfig, with GEMMA4.md §1.3 derivations. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsoncheck.h"

typedef struct {
    const cJSON *obj;
    const char *prefix;
    GfError *err;
} Cfg;

static GfStatus bad(const Cfg *c, const char *key, const char *what) {
    return gf_error_set(c->err, GF_INVALID, "invalid_model", key, "config.json: %s%s%s %s", c->prefix,
                        c->prefix[0] ? "." : "", key, what);
}

/* Integer field in [min, max]; absent or null -> def (or an error when def < min). */
static GfStatus get_int(const Cfg *c, const char *key, long min, long max, long def, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, key);
    if (!v || cJSON_IsNull(v)) {
        if (def < min) return bad(c, key, "is required");
        *out = (int)def;
        return GF_OK;
    }
    if (!cJSON_IsNumber(v) || floor(v->valuedouble) != v->valuedouble || v->valuedouble < min || v->valuedouble > max)
        return bad(c, key, "must be an integer in range");
    *out = (int)v->valuedouble;
    return GF_OK;
}

static GfStatus get_float(const Cfg *c, const char *key, double min, double max, double def, float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, key);
    if (!v || cJSON_IsNull(v)) { *out = (float)def; return GF_OK; }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble < min || v->valuedouble > max)
        return bad(c, key, "must be a number in range");
    *out = (float)v->valuedouble;
    return GF_OK;
}

static GfStatus get_bool(const Cfg *c, const char *key, int def, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, key);
    if (!v || cJSON_IsNull(v)) { *out = def; return GF_OK; }
    if (!cJSON_IsBool(v)) return bad(c, key, "must be true or false");
    *out = cJSON_IsTrue(v);
    return GF_OK;
}

/* ---- text config ------------------------------------------------------- */

static GfStatus parse_rope(const Cfg *c, const cJSON *rp, const char *kind, int proportional_default, RopeParams *r) {
    r->theta = proportional_default ? 1000000.0f : 10000.0f;
    r->proportional = proportional_default;
    r->partial = 0.25f;
    r->factor = 1.0f;
    const cJSON *o = rp ? cJSON_GetObjectItemCaseSensitive(rp, kind) : NULL;
    if (!o) return GF_OK;
    if (!cJSON_IsObject(o)) return bad(c, "rope_parameters", "entries must be objects");
    Cfg sub = {o, "text_config.rope_parameters", c->err};
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(o, "rope_type");
    if (type && !cJSON_IsString(type)) return bad(&sub, "rope_type", "must be a string");
    const char *t = type ? type->valuestring : (proportional_default ? "proportional" : "default");
    if (strcmp(t, "proportional") == 0) r->proportional = 1;
    else if (strcmp(t, "default") == 0) r->proportional = 0;
    else return bad(&sub, "rope_type", "must be \"default\" or \"proportional\"");
    if (get_float(&sub, "rope_theta", 1.0, 1e12, r->theta, &r->theta) ||
        get_float(&sub, "partial_rotary_factor", 0.0, 1.0, r->partial, &r->partial) ||
        get_float(&sub, "factor", 1e-6, 1e6, 1.0, &r->factor))
        return GF_INVALID;
    if (!r->proportional) r->partial = 1.0f;
    return GF_OK;
}

static GfStatus parse_layer_types(const Cfg *c, TextConfig *t) {
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(c->obj, "layer_types");
    if (lt && !cJSON_IsNull(lt)) {
        if (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != t->n_layers)
            return bad(c, "layer_types", "must list one type per layer");
        int i = 0;
        for (const cJSON *e = lt->child; e; e = e->next, i++) {
            if (cJSON_IsString(e) && strcmp(e->valuestring, "full_attention") == 0) t->layers[i].kind = LAYER_FULL;
            else if (cJSON_IsString(e) && strcmp(e->valuestring, "sliding_attention") == 0) t->layers[i].kind = LAYER_SLIDING;
            else return bad(c, "layer_types", "entries must be \"sliding_attention\" or \"full_attention\"");
        }
    } else {
        for (int i = 0; i < t->n_layers; i++) t->layers[i].kind = (i + 1) % 6 == 0 ? LAYER_FULL : LAYER_SLIDING;
    }
    t->layers[t->n_layers - 1].kind = LAYER_FULL; /* as HF does, whatever the source */
    return GF_OK;
}

/* per_layer_config, or the older global_head_dim / num_global_key_value_heads. */
static GfStatus parse_layer_geometry(const Cfg *c, TextConfig *t) {
    const cJSON *plc = cJSON_GetObjectItemCaseSensitive(c->obj, "per_layer_config");
    int global_hd = 512, global_kv = 0;
    if (!plc || cJSON_IsNull(plc)) {
        if (get_int(c, "global_head_dim", 1, 65536, 512, &global_hd) ||
            get_int(c, "num_global_key_value_heads", 0, 4096, 0, &global_kv))
            return GF_INVALID;
    } else if (!cJSON_IsObject(plc)) {
        return bad(c, "per_layer_config", "must be an object");
    }
    for (int i = 0; i < t->n_layers; i++) {
        LayerConfig *l = &t->layers[i];
        l->head_dim = t->head_dim;
        l->kv_heads = t->kv_heads;
        if (!plc || cJSON_IsNull(plc)) {
            if (l->kind == LAYER_FULL) {
                l->head_dim = global_hd;
                if (t->attention_k_eq_v && global_kv) l->kv_heads = global_kv;
            }
            continue;
        }
        char key[16];
        snprintf(key, sizeof key, "%d", i);
        const cJSON *o = cJSON_GetObjectItemCaseSensitive(plc, key);
        if (!o) continue;
        if (!cJSON_IsObject(o)) return bad(c, "per_layer_config", "entries must be objects");
        Cfg sub = {o, "text_config.per_layer_config", c->err};
        if (get_int(&sub, "head_dim", 2, 65536, l->head_dim, &l->head_dim) ||
            get_int(&sub, "num_key_value_heads", 1, 4096, l->kv_heads, &l->kv_heads))
            return GF_INVALID;
    }
    for (const cJSON *e = plc && cJSON_IsObject(plc) ? plc->child : NULL; e; e = e->next) {
        char *end;
        long i = strtol(e->string, &end, 10);
        if (*end || i < 0 || i >= t->n_layers) return bad(c, "per_layer_config", "keys must be layer indices");
    }
    return GF_OK;
}

/* KV sharing, double-wide MLP, k_eq_v, and the checks that tie them together. */
static GfStatus derive_layers(const Cfg *c, TextConfig *t) {
    t->first_shared = t->n_layers - t->n_kv_shared;
    if (t->n_kv_shared >= t->n_layers) return bad(c, "num_kv_shared_layers", "must be less than num_hidden_layers");
    for (int i = 0; i < t->n_layers; i++) {
        LayerConfig *l = &t->layers[i];
        l->kv_shared = t->n_kv_shared > 0 && i >= t->first_shared;
        l->store_layer = i;
        if (l->kv_shared) {
            l->store_layer = -1;
            for (int j = t->first_shared - 1; j >= 0 && l->store_layer < 0; j--)
                if (t->layers[j].kind == l->kind) l->store_layer = j;
            if (l->store_layer < 0) return bad(c, "num_kv_shared_layers", "leaves a shared layer with no earlier layer of its type");
            const LayerConfig *s = &t->layers[l->store_layer];
            if (s->head_dim != l->head_dim || s->kv_heads != l->kv_heads)
                return bad(c, "per_layer_config", "gives a KV-shared layer a geometry unlike its store layer");
        }
        l->k_eq_v = t->attention_k_eq_v && l->kind == LAYER_FULL;
        l->intermediate = t->double_wide_mlp && l->kv_shared ? 2 * t->intermediate_size : t->intermediate_size;
        if (t->n_heads % l->kv_heads != 0) return bad(c, "num_key_value_heads", "must divide num_attention_heads");
        if (l->head_dim % 2) return bad(c, "head_dim", "must be even");
    }
    return GF_OK;
}

static GfStatus parse_eos(const Cfg *c, const cJSON *v, TextConfig *t) {
    if (!v || cJSON_IsNull(v)) return GF_OK;
    t->n_eos = 0;
    if (cJSON_IsNumber(v)) {
        t->eos_ids[t->n_eos++] = (int)v->valuedouble;
        return GF_OK;
    }
    if (!cJSON_IsArray(v)) return bad(c, "eos_token_id", "must be an id or a list of ids");
    for (const cJSON *e = v->child; e && t->n_eos < 8; e = e->next) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= t->vocab_size) return bad(c, "eos_token_id", "holds an invalid id");
        t->eos_ids[t->n_eos++] = (int)e->valuedouble;
    }
    return GF_OK;
}

static GfStatus parse_text(const Cfg *c, TextConfig *t) {
    const cJSON *bidir = cJSON_GetObjectItemCaseSensitive(c->obj, "use_bidirectional_attention");
    if (get_int(c, "vocab_size", 1, 1 << 24, -1, &t->vocab_size) || get_int(c, "hidden_size", 1, 1 << 16, -1, &t->hidden_size) ||
        get_int(c, "intermediate_size", 1, 1 << 20, -1, &t->intermediate_size) ||
        get_int(c, "num_hidden_layers", 1, 1024, -1, &t->n_layers) || get_int(c, "num_attention_heads", 1, 4096, -1, &t->n_heads) ||
        get_int(c, "num_key_value_heads", 1, 4096, -1, &t->kv_heads) || get_int(c, "head_dim", 2, 65536, -1, &t->head_dim) ||
        get_float(c, "rms_norm_eps", 0, 1, 1e-6, &t->rms_eps) || get_int(c, "sliding_window", 1, 1 << 24, 512, &t->sliding_window) ||
        get_int(c, "max_position_embeddings", 0, 1 << 30, 0, &t->max_positions) ||
        get_float(c, "final_logit_softcapping", 0, 1e6, 0, &t->final_softcap) ||
        get_int(c, "hidden_size_per_layer_input", 0, 1 << 16, 0, &t->ple_dim) ||
        get_int(c, "vocab_size_per_layer_input", 1, 1 << 24, t->vocab_size, &t->ple_vocab) ||
        get_int(c, "num_kv_shared_layers", 0, 1024, 0, &t->n_kv_shared) ||
        get_bool(c, "attention_k_eq_v", 0, &t->attention_k_eq_v) || get_bool(c, "use_double_wide_mlp", 0, &t->double_wide_mlp) ||
        get_bool(c, "enable_moe_block", 0, &t->moe) || get_int(c, "pad_token_id", 0, 1 << 24, 0, &t->pad_id) ||
        get_int(c, "bos_token_id", 0, 1 << 24, 2, &t->bos_id))
        return GF_INVALID;
    if (bidir && !cJSON_IsNull(bidir)) {
        if (!cJSON_IsString(bidir) || (strcmp(bidir->valuestring, "vision") && strcmp(bidir->valuestring, "all")))
            return bad(c, "use_bidirectional_attention", "must be null, \"vision\" or \"all\"");
        if (strcmp(bidir->valuestring, "all") == 0)
            return bad(c, "use_bidirectional_attention", "\"all\" (encoder mode) is not supported by this engine");
        t->bidirectional_vision = 1;
    }
    if (t->moe && (get_int(c, "num_experts", 1, 4096, -1, &t->n_experts) || get_int(c, "top_k_experts", 1, 4096, -1, &t->top_k_experts) ||
                   get_int(c, "moe_intermediate_size", 1, 1 << 20, -1, &t->moe_intermediate)))
        return GF_INVALID;
    if (t->moe && t->top_k_experts > t->n_experts) return bad(c, "top_k_experts", "must not exceed num_experts");
    if (t->moe && t->top_k_experts > MOE_MAX_TOP_K)
        return bad(c, "top_k_experts", "more than 64 experts per token is not supported");
    if (t->n_heads % t->kv_heads) return bad(c, "num_key_value_heads", "must divide num_attention_heads");
    t->eos_ids[0] = 1;
    t->n_eos = 1;
    if (parse_eos(c, cJSON_GetObjectItemCaseSensitive(c->obj, "eos_token_id"), t)) return GF_INVALID;
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(c->obj, "rope_parameters");
    if (rp && !cJSON_IsNull(rp) && !cJSON_IsObject(rp)) return bad(c, "rope_parameters", "must be an object");
    if (parse_rope(c, rp, "sliding_attention", 0, &t->rope[LAYER_SLIDING]) ||
        parse_rope(c, rp, "full_attention", 1, &t->rope[LAYER_FULL]))
        return GF_INVALID;
    t->layers = gf_calloc((size_t)t->n_layers, sizeof *t->layers, c->err);
    if (!t->layers) return GF_NO_MEMORY;
    if (parse_layer_types(c, t) || parse_layer_geometry(c, t) || derive_layers(c, t)) return GF_INVALID;
    return GF_OK;
}

/* ---- vision and top level ---------------------------------------------- */

static GfStatus parse_vision(const Cfg *c, VisionConfig *v) {
    v->present = 1;
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(c->obj, "rope_parameters");
    Cfg rc = {rp, "vision_config.rope_parameters", c->err};
    if (get_int(c, "hidden_size", 1, 1 << 16, 768, &v->hidden_size) || get_int(c, "intermediate_size", 1, 1 << 20, 3072, &v->intermediate_size) ||
        get_int(c, "num_hidden_layers", 1, 1024, 16, &v->n_layers) || get_int(c, "num_attention_heads", 1, 4096, 12, &v->n_heads) ||
        get_int(c, "num_key_value_heads", 1, 4096, 12, &v->kv_heads) || get_int(c, "head_dim", 2, 65536, 64, &v->head_dim) ||
        get_float(c, "rms_norm_eps", 0, 1, 1e-6, &v->rms_eps) || get_int(c, "pooling_kernel_size", 1, 64, 3, &v->pooling_kernel) ||
        get_int(c, "patch_size", 1, 1024, 16, &v->patch_size) ||
        get_int(c, "position_embedding_size", 1, 1 << 20, 10240, &v->position_embedding_size) ||
        get_bool(c, "use_clipped_linears", 0, &v->clipped_linears) || get_bool(c, "standardize", 0, &v->standardize))
        return GF_INVALID;
    v->rope_theta = 100.0f;
    if (cJSON_IsObject(rp) && get_float(&rc, "rope_theta", 1.0, 1e12, 100.0, &v->rope_theta)) return GF_INVALID;
    return GF_OK;
}

GfStatus gemma_config_parse(const char *json, size_t len, GemmaConfig *cfg, GfError *err) {
    memset(cfg, 0, sizeof *cfg);
    GfError jerr;
    cJSON *root = json_parse_strict(json, len, "config.json", &jerr);
    if (!root) return json_error(err, &jerr, GF_INVALID, "invalid_model", NULL);
    Cfg top = {root, "", err};
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    const cJSON *vc = cJSON_GetObjectItemCaseSensitive(root, "vision_config");
    const cJSON *ac = cJSON_GetObjectItemCaseSensitive(root, "audio_config");
    GfStatus st = GF_OK;
    if (!cJSON_IsString(mt) || strcmp(mt->valuestring, "gemma4") != 0) st = bad(&top, "model_type", "must be \"gemma4\"");
    else if (!cJSON_IsObject(tc)) st = bad(&top, "text_config", "must be an object");
    Cfg text = {tc, "text_config", err}, vis = {vc, "vision_config", err};
    if (!st) st = parse_text(&text, &cfg->text);
    if (!st && cJSON_IsObject(vc)) st = parse_vision(&vis, &cfg->vision);
    else if (!st && vc && !cJSON_IsNull(vc)) st = bad(&top, "vision_config", "must be an object or null");
    cfg->has_audio = ac && cJSON_IsObject(ac);
    if (!st)
        st = get_int(&top, "image_token_id", 0, 1 << 24, 258880, &cfg->image_token_id) ||
             get_int(&top, "video_token_id", 0, 1 << 24, 258884, &cfg->video_token_id) ||
             get_int(&top, "audio_token_id", 0, 1 << 24, 258881, &cfg->audio_token_id) ||
             get_int(&top, "boi_token_id", 0, 1 << 24, 255999, &cfg->boi_token_id) ||
             get_int(&top, "eoi_token_id", 0, 1 << 24, 258882, &cfg->eoi_token_id) ||
             get_bool(&top, "tie_word_embeddings", 1, &cfg->tie_word_embeddings) ? GF_INVALID : GF_OK;
    if (!st && !cfg->tie_word_embeddings) st = bad(&top, "tie_word_embeddings", "must be true (Gemma 4 ties lm_head)");
    cJSON_Delete(root);
    if (st) gemma_config_free(cfg);
    return st;
}

GfStatus gemma_config_load(const char *dir, GemmaConfig *cfg, GfError *err) {
    char path[4096];
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = gf_read_file(path, 16u << 20, "the model's config.json", &len, err);
    if (!text) return err->status;
    GfStatus st = gemma_config_parse(text, len, cfg, err);
    free(text);
    if (st) return st;
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    GfError ferr;
    if (!(text = gf_read_file(path, 16u << 20, "generation_config.json", &len, &ferr))) return GF_OK;
    GfError jerr;
    cJSON *g = json_parse_strict(text, len, "generation_config.json", &jerr);
    free(text);
    if (!g) return GF_OK;
    Cfg c = {g, "generation_config", err};
    st = parse_eos(&c, cJSON_GetObjectItemCaseSensitive(g, "eos_token_id"), &cfg->text);
    cJSON_Delete(g);
    if (st) gemma_config_free(cfg);
    return st;
}

void gemma_config_free(GemmaConfig *cfg) {
    if (!cfg) return;
    free(cfg->text.layers);
    cfg->text.layers = NULL;
}
