/* adapter_check.c - PEFT adapter validation against Gemma 4 module names. */
#include "adapter_check.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jsoncheck.h"

#define PREFIX "base_model.model."

static GfStatus incompatible(GfError *err, const char *fmt, const char *a, const char *b) {
    return gf_error_set(err, GF_INVALID, "adapter_incompatible", NULL, fmt, a ? a : "", b ? b : "");
}

/* ---- module names ------------------------------------------------------ */

/* Consumes "<digits>." from *p; 0 on success. */
static int eat_index(const char **p) {
    const char *s = *p;
    if (*s < '0' || *s > '9') return -1;
    while (*s >= '0' && *s <= '9') s++;
    if (*s != '.' || s - *p > 4) return -1;
    *p = s + 1;
    return 0;
}

static int one_of(const char *s, const char *const *names) {
    for (; *names; names++)
        if (strcmp(s, *names) == 0) return 1;
    return 0;
}

int adapter_module_known(const char *m) {
    static const char *const lm_layer[] = {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "per_layer_input_gate",
        "per_layer_projection", NULL};
    static const char *const vision_layer[] = {
        "self_attn.q_proj.linear", "self_attn.k_proj.linear", "self_attn.v_proj.linear",
        "self_attn.o_proj.linear", "mlp.gate_proj.linear", "mlp.up_proj.linear",
        "mlp.down_proj.linear", NULL};
    static const char *const singles[] = {
        "model.language_model.per_layer_model_projection", "model.vision_tower.patch_embedder.input_proj",
        "model.embed_vision.embedding_projection", NULL};
    if (one_of(m, singles)) return 1;
    const char *p = m;
    if (strncmp(p, "model.language_model.layers.", 28) == 0) {
        p += 28;
        return eat_index(&p) == 0 && one_of(p, lm_layer);
    }
    if (strncmp(p, "model.vision_tower.encoder.layers.", 34) == 0) {
        p += 34;
        return eat_index(&p) == 0 && one_of(p, vision_layer);
    }
    return 0;
}

/* ---- config ------------------------------------------------------------ */

static int is_empty(const cJSON *v) {
    return !v || cJSON_IsNull(v) || (cJSON_IsObject(v) && !v->child) || (cJSON_IsArray(v) && !v->child) ||
           cJSON_IsFalse(v);
}

static GfStatus check_config(const cJSON *c, int max_rank, AdapterInfo *info, GfError *err) {
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(c, "peft_type");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(c, "r");
    const cJSON *alpha = cJSON_GetObjectItemCaseSensitive(c, "lora_alpha");
    const cJSON *targets = cJSON_GetObjectItemCaseSensitive(c, "target_modules");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(c, "use_rslora");
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(c, "bias");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "LORA") != 0)
        return incompatible(err, "adapter_config.json: peft_type must be \"LORA\"%s%s", NULL, NULL);
    if (!cJSON_IsNumber(r) || r->valuedouble != floor(r->valuedouble) || r->valuedouble < 1 ||
        r->valuedouble > max_rank) {
        char lim[32];
        snprintf(lim, sizeof lim, "%d", max_rank);
        return incompatible(err, "adapter_config.json: r must be an integer from 1 to %s%s", lim, NULL);
    }
    if (!cJSON_IsNumber(alpha) || !isfinite(alpha->valuedouble) || alpha->valuedouble <= 0 ||
        alpha->valuedouble > ADAPTER_ALPHA_MAX)
        return incompatible(err, "adapter_config.json: lora_alpha must be a number in (0, 4096]%s%s", NULL, NULL);
    if (!targets || !(cJSON_IsString(targets) || cJSON_IsArray(targets)))
        return incompatible(err, "adapter_config.json: target_modules must be a string or a list%s%s", NULL, NULL);
    if (rs && !cJSON_IsBool(rs))
        return incompatible(err, "adapter_config.json: use_rslora must be a boolean%s%s", NULL, NULL);
    if (bias && !(cJSON_IsString(bias) && strcmp(bias->valuestring, "none") == 0))
        return incompatible(err, "adapter_config.json: bias must be \"none\"%s%s", NULL, NULL);
    static const char *const unsupported[] = {"use_dora", "modules_to_save", "rank_pattern",
                                              "alpha_pattern", "lora_bias", "trainable_token_indices", NULL};
    for (const char *const *k = unsupported; *k; k++)
        if (!is_empty(cJSON_GetObjectItemCaseSensitive(c, *k)))
            return incompatible(err, "adapter_config.json: '%s' is set; it is not supported%s", *k, NULL);
    info->rank = (int)r->valuedouble;
    info->alpha = alpha->valuedouble;
    info->use_rslora = cJSON_IsTrue(rs);
    return GF_OK;
}

/* ---- tensors ----------------------------------------------------------- */

/* Splits "base_model.model.<module>.lora_X.weight" into module and X. */
int adapter_split_key(const char *key, char *module, size_t cap, char *which) {
    size_t n = strlen(key), plen = strlen(PREFIX);
    const size_t slen = strlen(".lora_A.weight");
    if (n <= plen + slen || strncmp(key, PREFIX, plen) != 0) return -1;
    const char *tail = key + n - slen;
    if (strcmp(tail, ".lora_A.weight") == 0) *which = 'A';
    else if (strcmp(tail, ".lora_B.weight") == 0) *which = 'B';
    else return -1;
    size_t mlen = (size_t)(tail - key) - plen;
    if (mlen >= cap) return -1;
    memcpy(module, key + plen, mlen);
    module[mlen] = '\0';
    return 0;
}

float adapter_value_f32(const StTensor *t, uint64_t i) {
    const uint8_t *p = t->data;
    if (t->dtype == ST_F32) { float f; memcpy(&f, p + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    if (t->dtype == ST_BF16) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
    /* F16: handle normals, subnormals, inf/nan */
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, u;
    if (exp == 31) u = sign | 0x7F800000u | (man << 13);
    else if (exp == 0) { float f = ldexpf((float)man, -24); return sign ? -f : f; }
    else u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Finite check, and whether any value is non-zero. */
static GfStatus scan_values(const StTensor *t, int *nonzero, GfError *err) {
    for (uint64_t i = 0; i < t->n_elements; i++) {
        float v = adapter_value_f32(t, i);
        if (!isfinite(v)) return incompatible(err, "tensor '%s' holds a non-finite value%s", t->name, NULL);
        if (fabsf(v) > ADAPTER_VALUE_MAX)
            return incompatible(err, "tensor '%s' holds a value beyond +-1e4, which can overflow the forward pass%s",
                                t->name, NULL);
        if (v != 0.0f) *nonzero = 1;
    }
    return GF_OK;
}

static const StTensor *base_weight(const AdapterBase *base, const char *module) {
    char name[ST_NAME_MAX + 16];
    snprintf(name, sizeof name, "%s.weight", module);
    for (size_t i = 0; i < base->n_shards; i++) {
        const StTensor *t = safetensors_find(&base->shards[i], name);
        if (t) return t;
    }
    return NULL;
}

static GfStatus check_pair(const StTensor *a, const StTensor *b, const char *module, int r,
                           const AdapterBase *base, GfError *err) {
    char sa[64], sb[64], msg[480];
    safetensors_shape_str(a->shape, a->n_dims, sa, sizeof sa);
    safetensors_shape_str(b->shape, b->n_dims, sb, sizeof sb);
    if (a->n_dims != 2 || b->n_dims != 2 || a->shape[0] != (uint64_t)r || b->shape[1] != (uint64_t)r) {
        snprintf(msg, sizeof msg, "%.200s: lora_A is %s and lora_B is %s; expected [%d, in] and [out, %d]",
                 module, sa, sb, r, r);
        return incompatible(err, "module %s%s", msg, NULL);
    }
    if (!base) return GF_OK;
    const StTensor *w = base_weight(base, module);
    if (!w) return incompatible(err, "module '%s' does not exist in the base model%s", module, NULL);
    if (w->n_dims != 2 || w->shape[0] != b->shape[0] || w->shape[1] != a->shape[1]) {
        char sw[64];
        safetensors_shape_str(w->shape, w->n_dims, sw, sizeof sw);
        snprintf(msg, sizeof msg, "%.200s: the base weight is %s but lora_A is %s and lora_B is %s", module, sw, sa, sb);
        return incompatible(err, "module %s%s", msg, NULL);
    }
    return GF_OK;
}

static GfStatus check_tensors(const SafeTensors *st, const AdapterInfo *info, const AdapterBase *base,
                              size_t *n_modules, int *has_vision, GfError *err) {
    int any_nonzero_b = 0;
    *n_modules = 0;
    for (size_t i = 0; i < st->n_tensors; i++) {
        const StTensor *t = &st->tensors[i];
        char module[ST_NAME_MAX + 1], which, other[ST_NAME_MAX + 32];
        if (adapter_split_key(t->name, module, sizeof module, &which))
            return incompatible(err, "tensor '%s' is not a PEFT LoRA weight (base_model.model.<module>.lora_A/B.weight)%s", t->name, NULL);
        if (!adapter_module_known(module))
            return incompatible(err, "tensor '%s' targets '%s', which is not a Gemma 4 linear LoRA can adapt", t->name, module);
        if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16)
            return incompatible(err, "tensor '%s' has dtype %s; expected F32, BF16 or F16", t->name, safetensors_dtype_name(t->dtype));
        if (t->n_elements == 0) return incompatible(err, "tensor '%s' is empty%s", t->name, NULL);
        int nonzero = 0;
        GfStatus s = scan_values(t, &nonzero, err);
        if (s) return s;
        if (which == 'B') any_nonzero_b |= nonzero;
        snprintf(other, sizeof other, PREFIX "%s.lora_%c.weight", module, which == 'A' ? 'B' : 'A');
        const StTensor *o = safetensors_find(st, other);
        if (!o) return incompatible(err, "tensor '%s' has no matching '%s'", t->name, other);
        if (which == 'A') {
            if ((s = check_pair(t, o, module, info->rank, base, err))) return s;
            (*n_modules)++;
            if (strncmp(module, "model.language_model.", 21) != 0) *has_vision = 1;
        }
    }
    if (*n_modules == 0) return incompatible(err, "the adapter has no LoRA tensors%s%s", NULL, NULL);
    if (!any_nonzero_b)
        return incompatible(err, "every lora_B is zero: the adapter would change nothing%s%s", NULL, NULL);
    return GF_OK;
}

GfStatus adapter_check(const char *config_json, size_t config_len, const uint8_t *weights,
                       uint64_t weights_len, int max_rank, const AdapterBase *base, AdapterInfo *info,
                       GfError *err) {
    memset(info, 0, sizeof *info);
    GfError jerr;
    cJSON *cfg = json_parse_strict(config_json, config_len, "adapter_config.json", &jerr);
    if (!cfg) return json_error(err, &jerr, GF_INVALID, "adapter_corrupt", "config");
    GfStatus st = cJSON_IsObject(cfg) ? check_config(cfg, max_rank, info, err)
                                      : incompatible(err, "adapter_config.json is not a JSON object%s%s", NULL, NULL);
    cJSON_Delete(cfg);
    if (st) return st;
    SafeTensors tensors;
    if (safetensors_parse(weights, weights_len, &tensors, &jerr)) {
        if (jerr.status == GF_NO_MEMORY) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", "weights", "%s", jerr.message);
        return gf_error_set(err, GF_INVALID, "adapter_corrupt", "weights", "adapter_model.safetensors: %s", jerr.message);
    }
    st = check_tensors(&tensors, info, base, &info->n_modules, &info->has_vision, err);
    safetensors_close(&tensors);
    return st;
}
