/* gguf_export.c - Gemma 4's text model as a llama.cpp `gemma4` GGUF. */
#include "gguf_export.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libgen.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include "config.h"
#include "convert.h"
#include "jsoncheck.h"
#include "lora.h"
#include "merge.h"
#include "modeldir.h"
#include "safetensors.h"

#define LM "model.language_model."
#define TOKENIZER_MAX (256u << 20)

/* llama.cpp's token types */
enum { TOK_NORMAL = 1, TOK_UNKNOWN = 2, TOK_CONTROL = 3, TOK_USER_DEFINED = 4, TOK_BYTE = 6 };
/* llama.cpp's file types */
enum { FTYPE_F32 = 0, FTYPE_F16 = 1, FTYPE_Q4_0 = 2, FTYPE_Q8_0 = 7, FTYPE_BF16 = 32 };

typedef struct {
    char name[96];              /* GGUF name */
    const StTensor *src;        /* NULL: generated (rope_freqs) */
    const LoraPair *pair;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    GgmlType type;
    uint64_t rows;              /* rows of ne[0] written (token_embd: trimmed to the vocabulary) */
} Out;

typedef struct {
    const GgufExportOptions *o;
    GgufExportReport *r;
    ModelDir md;
    GemmaConfig cfg;
    int cfg_loaded;
    LoraAdapter *adapter;
    cJSON *tok;                 /* tokenizer.json */
    uint64_t n_tokens;
    Out *outs;
    size_t n_outs;
    float *row;
    uint8_t *block;
    GgufWriter *w;
    uint64_t total, done;
} Export;

/* ---- names -------------------------------------------------------------- */

typedef struct { const char *hf, *gguf; } NameMap;

static const NameMap LAYER_NAMES[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"self_attn.q_proj.weight", "attn_q.weight"},
    {"self_attn.k_proj.weight", "attn_k.weight"},
    {"self_attn.v_proj.weight", "attn_v.weight"},
    {"self_attn.o_proj.weight", "attn_output.weight"},
    {"self_attn.q_norm.weight", "attn_q_norm.weight"},
    {"self_attn.k_norm.weight", "attn_k_norm.weight"},
    {"post_attention_layernorm.weight", "post_attention_norm.weight"},
    {"pre_feedforward_layernorm.weight", "ffn_norm.weight"},
    {"post_feedforward_layernorm.weight", "post_ffw_norm.weight"},
    {"mlp.gate_proj.weight", "ffn_gate.weight"},
    {"mlp.up_proj.weight", "ffn_up.weight"},
    {"mlp.down_proj.weight", "ffn_down.weight"},
    {"layer_scalar", "layer_output_scale.weight"},
    {"per_layer_input_gate.weight", "inp_gate.weight"},
    {"per_layer_projection.weight", "proj.weight"},
    {"post_per_layer_input_norm.weight", "post_norm.weight"},
    {"router.proj.weight", "ffn_gate_inp.weight"},
    {"router.scale", "ffn_gate_inp.scale"},
    {"router.per_expert_scale", "ffn_down_exps.scale"},
    {"experts.gate_up_proj", "ffn_gate_up_exps.weight"},
    {"experts.down_proj", "ffn_down_exps.weight"},
    {"pre_feedforward_layernorm_2.weight", "pre_ffw_norm_2.weight"},
    {"post_feedforward_layernorm_1.weight", "post_ffw_norm_1.weight"},
    {"post_feedforward_layernorm_2.weight", "post_ffw_norm_2.weight"},
};

static const NameMap MODEL_NAMES[] = {
    {"embed_tokens.weight", "token_embd.weight"},
    {"embed_tokens_per_layer.weight", "per_layer_token_embd.weight"},
    {"per_layer_model_projection.weight", "per_layer_model_proj.weight"},
    {"per_layer_projection_norm.weight", "per_layer_proj_norm.weight"},
    {"norm.weight", "output_norm.weight"},
};

/* 1: mapped into out; 0: not part of the text model (lm_head, vision,
 * audio); -1: a language-model tensor without a GGUF name. */
static int gguf_name(const char *hf, char *out, size_t cap) {
    if (strcmp(hf, "lm_head.weight") == 0 || strncmp(hf, LM, strlen(LM)) != 0) return 0;
    const char *rest = hf + strlen(LM);
    for (size_t i = 0; i < sizeof MODEL_NAMES / sizeof *MODEL_NAMES; i++)
        if (strcmp(rest, MODEL_NAMES[i].hf) == 0) { snprintf(out, cap, "%s", MODEL_NAMES[i].gguf); return 1; }
    int layer, used = 0;
    if (sscanf(rest, "layers.%d.%n", &layer, &used) != 1 || used == 0 || layer < 0) return -1;
    for (size_t i = 0; i < sizeof LAYER_NAMES / sizeof *LAYER_NAMES; i++)
        if (strcmp(rest + used, LAYER_NAMES[i].hf) == 0) {
            snprintf(out, cap, "blk.%d.%s", layer, LAYER_NAMES[i].gguf);
            return 1;
        }
    return -1;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static GgmlType type_for(const Export *x, const Out *t) {
    if (t->n_dims == 1 || !t->src || ends_with(t->name, "ffn_gate_inp.weight")) return GGML_F32;
    GgmlType want = x->o->type;
    if ((want == GGML_Q8_0 || want == GGML_Q4_0) && t->ne[0] % 32) return GGML_F16;
    return want;
}

/* ---- the plan ------------------------------------------------------------- */

static GfStatus add_out(Export *x, const char *name, const StTensor *src, GfError *err) {
    Out *t = &x->outs[x->n_outs];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->src = src;
    t->pair = x->adapter ? merge_pair_for(x->adapter, src->name) : NULL;
    t->n_dims = src->n_dims ? (uint32_t)src->n_dims : 1;
    if (t->n_dims > GGUF_MAX_DIMS)
        return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL, "tensor %s has more than 4 dims", src->name);
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (int d = 0; d < src->n_dims; d++) t->ne[d] = src->shape[src->n_dims - 1 - d];
    if (strcmp(name, "token_embd.weight") == 0) {
        if (x->n_tokens > t->ne[1])
            return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "the tokenizer has %llu tokens but the embedding %llu rows",
                                (unsigned long long)x->n_tokens, (unsigned long long)t->ne[1]);
        t->ne[1] = x->n_tokens;     /* rows past the tokenizer's tokens are never used */
    }
    t->rows = 1;
    for (uint32_t d = 1; d < GGUF_MAX_DIMS; d++) t->rows *= t->ne[d];
    if (t->src->dtype != ST_F32 && t->src->dtype != ST_BF16 && t->src->dtype != ST_F16)
        return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL, "tensor %s is %s, not a float type", src->name,
                            safetensors_dtype_name(src->dtype));
    t->type = type_for(x, t);
    x->n_outs++;
    return GF_OK;
}

static GfStatus plan(Export *x, GfError *err) {
    x->outs = gf_calloc(x->md.n_tensors + 1, sizeof *x->outs, err);
    if (!x->outs) return GF_NO_MEMORY;
    size_t n_paired = 0;
    char name[96];
    for (size_t s = 0; s < x->md.n_shards; s++)
        for (size_t i = 0; i < x->md.shards[s].n_tensors; i++) {
            const StTensor *t = &x->md.shards[s].tensors[i];
            int k = gguf_name(t->name, name, sizeof name);
            if (k < 0)
                return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL,
                                    "tensor %s has no llama.cpp name (the GGUF export does not know it)", t->name);
            if (k == 0) continue;
            GfStatus st = add_out(x, name, t, err);
            if (st) return st;
            n_paired += x->outs[x->n_outs - 1].pair != NULL;
        }
    if (x->adapter && n_paired != x->adapter->n_pairs) {
        for (size_t i = 0; i < x->adapter->n_pairs; i++)
            if (strncmp(x->adapter->pairs[i].module, LM, strlen(LM)) != 0)
                return gf_error_set(err, GF_UNSUPPORTED, "unsupported_adapter", "adapter",
                                    "the adapter adapts %s, outside the text model the GGUF holds", x->adapter->pairs[i].module);
        return gf_error_set(err, GF_INVALID, "adapter_incompatible", "adapter", "the adapter names modules the base does not have");
    }
    /* rope_freqs: the proportional RoPE of the full-attention layers */
    Out *rf = &x->outs[x->n_outs++];
    memset(rf, 0, sizeof *rf);
    snprintf(rf->name, sizeof rf->name, "rope_freqs.weight");
    int full_dim = 0;
    for (int l = 0; l < x->cfg.text.n_layers; l++)
        if (x->cfg.text.layers[l].kind == LAYER_FULL) full_dim = x->cfg.text.layers[l].head_dim;
    rf->n_dims = 1;
    rf->ne[0] = (uint64_t)(full_dim > 0 ? full_dim / 2 : 1);
    rf->ne[1] = rf->ne[2] = rf->ne[3] = 1;
    rf->rows = 1;
    rf->type = GGML_F32;
    for (size_t i = 0; i < x->n_outs; i++) x->total += ggml_type_bytes(x->outs[i].type, x->outs[i].ne[0] * x->outs[i].rows);
    return GF_OK;
}

/* ---- metadata --------------------------------------------------------------- */

static int layers_vary(const TextConfig *t, int what) {
    for (int l = 1; l < t->n_layers; l++) {
        const LayerConfig *a = &t->layers[0], *b = &t->layers[l];
        if ((what == 0 && a->intermediate != b->intermediate) || (what == 1 && a->kv_heads != b->kv_heads)) return 1;
    }
    return 0;
}

static GfStatus put_hparams(Export *x, const cJSON *text_cfg, GfError *err) {
    const TextConfig *t = &x->cfg.text;
    GgufWriter *w = x->w;
    int n = t->n_layers, full_dim = t->head_dim;
    for (int l = 0; l < n; l++)
        if (t->layers[l].kind == LAYER_FULL) full_dim = t->layers[l].head_dim;
    for (int k = 0; k < 2; k++)
        if (t->rope[k].factor != 1.0f)
            return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL,
                                "RoPE with a scaling factor cannot be exported to GGUF yet");
    /* llama.cpp's gemma4 lets a KV-shared layer read the KV of layer
     * first_shared - 2 (sliding) or first_shared - 1 (full), the layout of
     * Gemma 4 E2B/E4B; another layout cannot be expressed */
    for (int l = t->first_shared; t->n_kv_shared > 0 && l < n; l++) {
        int want = t->first_shared - (t->layers[l].kind == LAYER_SLIDING ? 2 : 1);
        if (t->layers[l].store_layer != want)
            return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL,
                                "layer %d shares the KV of layer %d, but llama.cpp's gemma4 would read layer %d "
                                "(it expects the last two unshared layers to be sliding then full)",
                                l, t->layers[l].store_layer, want);
    }
    const cJSON *mpe = cJSON_GetObjectItemCaseSensitive(text_cfg, "max_position_embeddings");
    gguf_kv_u32(w, "gemma4.context_length", cJSON_IsNumber(mpe) && mpe->valuedouble > 0 ? (uint32_t)mpe->valuedouble : 131072);
    gguf_kv_u32(w, "gemma4.embedding_length", (uint32_t)t->hidden_size);
    gguf_kv_u32(w, "gemma4.block_count", (uint32_t)n);
    int32_t *arr = gf_calloc((size_t)n, sizeof *arr, err);
    uint8_t *swa = gf_calloc((size_t)n, 1, err);
    if (!arr || !swa) { free(arr); free(swa); return GF_NO_MEMORY; }
    if (layers_vary(t, 0)) {
        for (int l = 0; l < n; l++) arr[l] = t->layers[l].intermediate;
        gguf_kv_arr_i32(w, "gemma4.feed_forward_length", arr, (uint64_t)n);
    } else {
        gguf_kv_u32(w, "gemma4.feed_forward_length", (uint32_t)t->layers[0].intermediate);
    }
    gguf_kv_u32(w, "gemma4.attention.head_count", (uint32_t)t->n_heads);
    if (layers_vary(t, 1)) {
        for (int l = 0; l < n; l++) arr[l] = t->layers[l].kv_heads;
        gguf_kv_arr_i32(w, "gemma4.attention.head_count_kv", arr, (uint64_t)n);
    } else {
        gguf_kv_u32(w, "gemma4.attention.head_count_kv", (uint32_t)t->layers[0].kv_heads);
    }
    for (int l = 0; l < n; l++) swa[l] = t->layers[l].kind == LAYER_SLIDING;
    gguf_kv_arr_bool(w, "gemma4.attention.sliding_window_pattern", swa, (uint64_t)n);
    free(arr);
    free(swa);
    gguf_kv_f32(w, "gemma4.rope.freq_base", t->rope[LAYER_FULL].theta);
    gguf_kv_f32(w, "gemma4.rope.freq_base_swa", t->rope[LAYER_SLIDING].theta);
    gguf_kv_f32(w, "gemma4.attention.layer_norm_rms_epsilon", t->rms_eps);
    gguf_kv_u32(w, "gemma4.attention.key_length", (uint32_t)full_dim);
    gguf_kv_u32(w, "gemma4.attention.value_length", (uint32_t)full_dim);
    gguf_kv_u32(w, "gemma4.attention.key_length_swa", (uint32_t)t->head_dim);
    gguf_kv_u32(w, "gemma4.attention.value_length_swa", (uint32_t)t->head_dim);
    gguf_kv_u32(w, "gemma4.attention.sliding_window", (uint32_t)t->sliding_window);
    gguf_kv_u32(w, "gemma4.attention.shared_kv_layers", (uint32_t)t->n_kv_shared);
    gguf_kv_u32(w, "gemma4.embedding_length_per_layer_input", (uint32_t)t->ple_dim);
    float swa_partial = t->rope[LAYER_SLIDING].proportional ? t->rope[LAYER_SLIDING].partial : 1.0f;
    gguf_kv_u32(w, "gemma4.rope.dimension_count", (uint32_t)full_dim);
    gguf_kv_u32(w, "gemma4.rope.dimension_count_swa", (uint32_t)((float)t->head_dim * swa_partial));
    if (t->final_softcap > 0) gguf_kv_f32(w, "gemma4.final_logit_softcapping", t->final_softcap);
    if (t->moe) {
        gguf_kv_u32(w, "gemma4.expert_count", (uint32_t)t->n_experts);
        gguf_kv_u32(w, "gemma4.expert_used_count", (uint32_t)t->top_k_experts);
        gguf_kv_u32(w, "gemma4.expert_feed_forward_length", (uint32_t)t->moe_intermediate);
    }
    return GF_OK;
}

/* ---- tokenizer ------------------------------------------------------------------ */

static int is_byte_token(const char *s) {
    return strlen(s) == 6 && s[0] == '<' && s[1] == '0' && s[2] == 'x' && s[5] == '>' &&
           strchr("0123456789ABCDEFabcdef", s[3]) && strchr("0123456789ABCDEFabcdef", s[4]);
}

static const char *const VISIBLE[] = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                                      "<tool_response|>", "<|\"|>", NULL};

static int visible(const char *s) {
    for (int i = 0; VISIBLE[i]; i++)
        if (strcmp(s, VISIBLE[i]) == 0) return 1;
    return 0;
}

static GfStatus load_tokenizer(Export *x, GfError *err) {
    char path[4400];
    size_t len = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", x->o->model_dir);
    char *text = gf_read_file(path, TOKENIZER_MAX, "tokenizer.json", &len, err);
    if (!text) return err->status;
    GfError jerr;
    x->tok = json_parse_strict_max(text, len, "tokenizer.json", 1L << 26, &jerr);
    free(text);
    if (!x->tok) return json_error(err, &jerr, GF_INVALID, "invalid_model", NULL);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(x->tok, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(model, "type");
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE") != 0 || !cJSON_IsObject(vocab))
        return gf_error_set(err, GF_UNSUPPORTED, "unsupported_model", NULL, "tokenizer.json is not a BPE tokenizer with a vocab");
    uint64_t max_id = 0, n = 0;
    for (const cJSON *e = vocab->child; e; e = e->next, n++) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 16777216)
            return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tokenizer.json: a vocab id is not a token id");
        if ((uint64_t)e->valuedouble > max_id) max_id = (uint64_t)e->valuedouble;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(x->tok, "added_tokens");
    for (const cJSON *a = cJSON_IsArray(added) ? added->child : NULL; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id");
        if (cJSON_IsNumber(id) && id->valuedouble >= 0 && id->valuedouble <= 16777216 && (uint64_t)id->valuedouble > max_id)
            max_id = (uint64_t)id->valuedouble;
    }
    x->n_tokens = n ? max_id + 1 : 0;
    return x->n_tokens ? GF_OK : gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tokenizer.json has no tokens");
}

static int id_of(const Export *x, const char *token) {
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(x->tok, "model"), "vocab");
    const cJSON *v = token ? cJSON_GetObjectItemCaseSensitive(vocab, token) : NULL;
    return cJSON_IsNumber(v) ? (int)v->valuedouble : -1;
}

/* tokenizer_config.json's value of key as a token string (a string, or an
 * object with "content"), or NULL. */
static const char *special_of(const cJSON *tc, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(tc, key);
    if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static char *read_optional(const Export *x, const char *name, size_t max, size_t *len, GfError *err) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", x->o->model_dir, name);
    struct stat st;
    if (stat(path, &st) != 0) return NULL;
    return gf_read_file(path, max, name, len, err);
}

static GfStatus put_tokens(Export *x, GfError *err) {
    uint64_t n = x->n_tokens;
    const char **strs = gf_calloc(n, sizeof *strs, err);
    size_t *lens = gf_calloc(n, sizeof *lens, err);
    int32_t *types = gf_calloc(n, sizeof *types, err);
    float *scores = gf_calloc(n, sizeof *scores, err);
    GfStatus s = strs && lens && types && scores ? GF_OK : GF_NO_MEMORY;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(x->tok, "model");
    for (const cJSON *e = s ? NULL : cJSON_GetObjectItemCaseSensitive(model, "vocab")->child; e; e = e->next) {
        uint64_t id = (uint64_t)e->valuedouble;
        strs[id] = e->string;
        types[id] = is_byte_token(e->string) ? TOK_BYTE : TOK_NORMAL;
    }
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(x->tok, "added_tokens");
    for (const cJSON *a = s || !cJSON_IsArray(added) ? NULL : added->child; a; a = a->next) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(a, "id"), *content = cJSON_GetObjectItemCaseSensitive(a, "content");
        const cJSON *special = cJSON_GetObjectItemCaseSensitive(a, "special");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(content) || (uint64_t)id->valuedouble >= n) continue;
        uint64_t i = (uint64_t)id->valuedouble;
        strs[i] = content->valuestring;
        types[i] = visible(content->valuestring) ? TOK_USER_DEFINED : cJSON_IsTrue(special) ? TOK_CONTROL : TOK_USER_DEFINED;
    }
    for (uint64_t i = 0; !s && i < n; i++) {
        if (!strs[i]) s = gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tokenizer.json has no token with id %llu",
                                       (unsigned long long)i);
        else lens[i] = strlen(strs[i]);
        scores[i] = -1000.0f;
    }
    if (!s) {
        gguf_kv_str(x->w, "tokenizer.ggml.model", "gemma4", 6);
        gguf_kv_arr_str(x->w, "tokenizer.ggml.tokens", strs, lens, n);
        gguf_kv_arr_f32(x->w, "tokenizer.ggml.scores", scores, n);
        gguf_kv_arr_i32(x->w, "tokenizer.ggml.token_type", types, n);
    }
    free(strs);
    free(lens);
    free(types);
    free(scores);
    return s;
}

static GfStatus put_merges(Export *x, GfError *err) {
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(x->tok, "model"), "merges");
    uint64_t n = cJSON_IsArray(merges) ? (uint64_t)cJSON_GetArraySize(merges) : 0;
    if (!n) return GF_OK;
    char **joined = gf_calloc(n, sizeof *joined, err);
    size_t *lens = gf_calloc(n, sizeof *lens, err);
    GfStatus s = joined && lens ? GF_OK : GF_NO_MEMORY;
    uint64_t i = 0;
    for (const cJSON *m = s ? NULL : merges->child; m && !s; m = m->next, i++) {
        if (cJSON_IsString(m)) {
            joined[i] = gf_strdup(m->valuestring, err);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 && cJSON_IsString(m->child) && cJSON_IsString(m->child->next)) {
            size_t a = strlen(m->child->valuestring), b = strlen(m->child->next->valuestring);
            if ((joined[i] = gf_malloc(a + b + 2, err))) {
                memcpy(joined[i], m->child->valuestring, a);
                joined[i][a] = ' ';
                memcpy(joined[i] + a + 1, m->child->next->valuestring, b + 1);
            }
        } else {
            s = gf_error_set(err, GF_INVALID, "invalid_model", NULL, "tokenizer.json: merge %llu is neither \"a b\" nor [a, b]",
                             (unsigned long long)i);
            break;
        }
        if (!joined[i]) s = GF_NO_MEMORY;
        else lens[i] = strlen(joined[i]);
    }
    if (!s) gguf_kv_arr_str(x->w, "tokenizer.ggml.merges", (const char *const *)joined, lens, n);
    for (uint64_t k = 0; joined && k < n; k++) free(joined[k]);
    free(joined);
    free(lens);
    return s;
}

static GfStatus put_tokenizer(Export *x, GfError *err) {
    GfStatus s = put_tokens(x, err);
    if (!s) s = put_merges(x, err);
    if (s) return s;
    size_t len = 0;
    GfError e2;
    char *tc_text = read_optional(x, "tokenizer_config.json", 16u << 20, &len, &e2);
    cJSON *tc = tc_text ? json_parse_strict(tc_text, len, "tokenizer_config.json", &e2) : NULL;
    free(tc_text);
    static const struct { const char *key, *gguf; } SPECIAL[] = {{"bos_token", "tokenizer.ggml.bos_token_id"},
                                                                  {"eos_token", "tokenizer.ggml.eos_token_id"},
                                                                  {"unk_token", "tokenizer.ggml.unknown_token_id"},
                                                                  {"pad_token", "tokenizer.ggml.padding_token_id"}};
    for (size_t i = 0; i < sizeof SPECIAL / sizeof *SPECIAL; i++) {
        int id = id_of(x, special_of(tc, SPECIAL[i].key));
        if (id < 0 && i == 0) id = x->cfg.text.bos_id;
        if (id < 0 && i == 1 && x->cfg.text.n_eos) id = x->cfg.text.eos_ids[0];
        if (id < 0 && i == 3) id = x->cfg.text.pad_id;
        if (id >= 0) gguf_kv_u32(x->w, SPECIAL[i].gguf, (uint32_t)id);
    }
    gguf_kv_bool(x->w, "tokenizer.ggml.add_bos_token", 1);
    gguf_kv_bool(x->w, "tokenizer.ggml.add_space_prefix", 0);
    char *tpl = read_optional(x, "chat_template.jinja", 16u << 20, &len, &e2);
    if (tpl) {
        gguf_kv_str(x->w, "tokenizer.chat_template", tpl, len);
    } else {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(tc, "chat_template");
        if (cJSON_IsString(t)) gguf_kv_str(x->w, "tokenizer.chat_template", t->valuestring, strlen(t->valuestring));
    }
    free(tpl);
    cJSON_Delete(tc);
    return GF_OK;
}

/* ---- tensor data --------------------------------------------------------------------- */

static GfStatus tick(Export *x, uint64_t n, GfError *err) {
    x->done += n;
    if (x->o->progress && x->o->progress(x->o->ctx, x->done, x->total))
        return gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "the export was cancelled");
    return GF_OK;
}

/* One row of ne[0] floats in the output type into x->block; its bytes. */
static int64_t encode_row(Export *x, const Out *t, const float *row) {
    int64_t n = (int64_t)t->ne[0];
    switch (t->type) {
    case GGML_F32: memcpy(x->block, row, (size_t)n * 4); return n * 4;
    case GGML_BF16:
        for (int64_t i = 0; i < n; i++) { uint16_t h = kn_f32_to_bf16(row[i]); memcpy(x->block + 2 * i, &h, 2); }
        return n * 2;
    case GGML_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = kn_f32_to_f16(row[i]);
            if (isfinite(row[i]) && (h & 0x7fff) == 0x7c00) return -1;
            memcpy(x->block + 2 * i, &h, 2);
        }
        return n * 2;
    case GGML_Q8_0: gguf_quantize_q8_0(row, n, x->block); return n / 32 * 34;
    case GGML_Q4_0: gguf_quantize_q4_0(row, n, x->block); return n / 32 * 18;
    }
    return -1;
}

static void rope_freqs_row(const Export *x, const Out *t, float *row) {
    const TextConfig *c = &x->cfg.text;
    const RopeParams *rp = &c->rope[LAYER_FULL];
    int64_t half = (int64_t)t->ne[0];
    int64_t rot = rp->proportional ? (int64_t)((float)(2 * half) * rp->partial / 2.0f) : half;
    for (int64_t i = 0; i < half; i++) row[i] = i < rot ? 1.0f : 1e30f;
}

static GfStatus put_tensor(Export *x, const Out *t, GfError *err) {
    int64_t n = (int64_t)t->ne[0];
    for (uint64_t r = 0; r < t->rows; r++) {
        if (!t->src) rope_freqs_row(x, t, x->row);
        else if (t->pair) merge_lora_row(t->src, t->pair, x->adapter->scale, (int64_t)r, x->row);
        else kn_convert_to_f32(x->row, t->src->data, t->src->dtype == ST_F32 ? KN_F32 : t->src->dtype == ST_BF16 ? KN_BF16 : KN_F16,
                               (int64_t)r * n, n);
        int64_t bytes = encode_row(x, t, x->row);
        if (bytes < 0)
            return gf_error_set(err, GF_INVALID, "invalid_argument", "type", "tensor %s holds a value that float16 cannot represent",
                                t->name);
        GfStatus s = gguf_put(x->w, x->block, (uint64_t)bytes, err);
        if (s || (s = tick(x, (uint64_t)bytes, err))) return s;
    }
    x->r->n_merged += t->pair != NULL;
    return GF_OK;
}

/* ---- the whole ---------------------------------------------------------------------- */

static int ftype_of(GgmlType t) {
    switch (t) {
    case GGML_F16: return FTYPE_F16;
    case GGML_BF16: return FTYPE_BF16;
    case GGML_Q8_0: return FTYPE_Q8_0;
    case GGML_Q4_0: return FTYPE_Q4_0;
    default: return FTYPE_F32;
    }
}

/* The file's bytes (tensors, plus at most the tokenizer's size and 1 MiB of
 * other metadata) must fit where it is written. */
static GfStatus check_space(const Export *x, GfError *err) {
    char dir[4096], tok[4400];
    snprintf(dir, sizeof dir, "%s", x->o->out_path);
    snprintf(tok, sizeof tok, "%s/tokenizer.json", x->o->model_dir);
    struct stat st;
    uint64_t need = x->total + (1u << 20) + (stat(tok, &st) == 0 ? (uint64_t)st.st_size : 0);
    struct statvfs v;
    if (statvfs(dirname(dir), &v) != 0)
        return gf_error_set(err, errno == ENOENT ? GF_NOT_FOUND : GF_IO, errno == ENOENT ? "not_found" : "io_error", "out",
                            "the output's directory cannot be used (%s)", strerror(errno));
    uint64_t avail = (uint64_t)v.f_bavail * (uint64_t)v.f_frsize;
    if (avail < need)
        return gf_error_set(err, GF_NO_SPACE, "insufficient_storage", NULL,
                            "the GGUF file needs %llu bytes and %llu are free where it is written", (unsigned long long)need,
                            (unsigned long long)avail);
    return GF_OK;
}

static GfStatus prepare(Export *x, cJSON **text_cfg, GfError *err) {
    struct stat st;
    if (lstat(x->o->out_path, &st) == 0)
        return gf_error_set(err, GF_CONFLICT, "output_exists", "out", "the output file already exists");
    GfStatus s = model_dir_open(x->o->model_dir, &x->md, err);
    if (!s && !(s = gemma_config_load(x->o->model_dir, &x->cfg, err))) x->cfg_loaded = 1;
    if (!s && x->o->adapter_dir) s = lora_load_checked(x->o->adapter_dir, &x->md.base, LORA_MAX_RANK, &x->adapter, err);
    if (!s) s = load_tokenizer(x, err);
    if (!s) s = plan(x, err);
    if (!s) s = check_space(x, err);
    uint64_t widest = 1;
    for (size_t i = 0; !s && i < x->n_outs; i++) widest = x->outs[i].ne[0] > widest ? x->outs[i].ne[0] : widest;
    if (!s && (!(x->row = gf_malloc(widest * sizeof *x->row, err)) || !(x->block = gf_malloc(widest * 4, err)))) s = GF_NO_MEMORY;
    if (!s && !(x->w = gguf_writer_new(err))) s = GF_NO_MEMORY;
    if (s) return s;
    size_t len = 0;
    char path[4400];
    snprintf(path, sizeof path, "%s/config.json", x->o->model_dir);
    char *text = gf_read_file(path, 4u << 20, "config.json", &len, err);
    if (!text) return err->status;
    GfError jerr;
    *text_cfg = json_parse_strict(text, len, "config.json", &jerr);
    free(text);
    if (!*text_cfg) return json_error(err, &jerr, GF_INVALID, "invalid_model", NULL);
    return GF_OK;
}

GfStatus gguf_export(const GgufExportOptions *o, GgufExportReport *r, GfError *err) {
    Export x = {.o = o, .r = r};
    memset(r, 0, sizeof *r);
    cJSON *cfg_json = NULL;
    GfStatus s = prepare(&x, &cfg_json, err);
    if (!s) {
        const cJSON *text_cfg = cJSON_GetObjectItemCaseSensitive(cfg_json, "text_config");
        gguf_kv_str(x.w, "general.architecture", "gemma4", 6);
        gguf_kv_str(x.w, "general.name", x.md.name, strlen(x.md.name));
        gguf_kv_u32(x.w, "general.file_type", (uint32_t)ftype_of(o->type));
        if (o->type == GGML_Q8_0 || o->type == GGML_Q4_0) gguf_kv_u32(x.w, "general.quantization_version", 2);
        s = put_hparams(&x, cJSON_IsObject(text_cfg) ? text_cfg : cfg_json, err);
    }
    if (!s) s = put_tokenizer(&x, err);
    for (size_t i = 0; !s && i < x.n_outs; i++) {
        const Out *t = &x.outs[i];
        s = gguf_add_tensor(x.w, t->name, t->n_dims, t->ne, t->type, err);
    }
    if (!s) s = gguf_writer_open(x.w, o->out_path, err);
    for (size_t i = 0; !s && i < x.n_outs; i++) s = put_tensor(&x, &x.outs[i], err);
    if (!s) s = gguf_commit(x.w, err);
    if (!s) {
        r->n_tensors = x.n_outs;
        r->n_bytes = x.done;
        r->n_tokens = x.n_tokens;
    }
    gguf_writer_free(x.w);
    cJSON_Delete(cfg_json);
    cJSON_Delete(x.tok);
    free(x.row);
    free(x.block);
    free(x.outs);
    lora_free(x.adapter);
    if (x.cfg_loaded) gemma_config_free(&x.cfg);
    model_dir_close(&x.md);
    return s;
}

/* ---- a LoRA adapter alone -------------------------------------------------------- */

static GfStatus put_lora_matrix(GgufWriter *w, const float *m, int64_t n, GgmlType t, uint8_t *block, GfError *err) {
    if (t == GGML_F32) return gguf_put(w, m, (uint64_t)n * 4, err);
    for (int64_t i = 0; i < n; i++) {
        uint16_t h = kn_f32_to_f16(m[i]);
        memcpy(block + 2 * i, &h, 2);
    }
    return gguf_put(w, block, (uint64_t)n * 2, err);
}

GfStatus gguf_export_lora(const GgufExportOptions *o, GgufExportReport *r, GfError *err) {
    memset(r, 0, sizeof *r);
    if (!o->adapter_dir) return gf_error_set(err, GF_INVALID, "missing_parameter", "adapter", "a LoRA GGUF needs an adapter");
    if (o->type != GGML_F32 && o->type != GGML_F16)
        return gf_error_set(err, GF_INVALID, "invalid_argument", "type", "a LoRA GGUF is written in f32 or f16");
    struct stat st;
    if (lstat(o->out_path, &st) == 0) return gf_error_set(err, GF_CONFLICT, "output_exists", "out", "the output file already exists");
    ModelDir md;
    LoraAdapter *a = NULL;
    GgufWriter *w = NULL;
    uint8_t *block = NULL;
    GfStatus s = model_dir_open(o->model_dir, &md, err);
    if (s) return s;
    s = lora_load_checked(o->adapter_dir, &md.base, LORA_MAX_RANK, &a, err);
    int64_t widest = 1;
    for (size_t i = 0; !s && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        if (strncmp(p->module, LM, strlen(LM)) != 0)
            s = gf_error_set(err, GF_UNSUPPORTED, "unsupported_adapter", "adapter",
                             "the adapter adapts %s, outside the text model the GGUF holds", p->module);
        if (p->rank * p->in > widest) widest = p->rank * p->in;
        if (p->out * p->rank > widest) widest = p->out * p->rank;
    }
    if (!s && (!(w = gguf_writer_new(err)) || !(block = gf_malloc((size_t)widest * 2, err)))) s = GF_NO_MEMORY;
    if (!s) {
        gguf_kv_str(w, "general.architecture", "gemma4", 6);
        gguf_kv_str(w, "general.type", "adapter", 7);
        gguf_kv_str(w, "adapter.type", "lora", 4);
        gguf_kv_f32(w, "adapter.lora.alpha", a->scale * (float)a->rank);
    }
    char name[96], full[128], module_weight[200];
    for (size_t i = 0; !s && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        snprintf(module_weight, sizeof module_weight, "%s.weight", p->module);
        if (gguf_name(module_weight, name, sizeof name) != 1) {
            s = gf_error_set(err, GF_UNSUPPORTED, "unsupported_adapter", "adapter", "module %s has no llama.cpp name", p->module);
            break;
        }
        uint64_t ne_a[2] = {(uint64_t)p->in, (uint64_t)p->rank}, ne_b[2] = {(uint64_t)p->rank, (uint64_t)p->out};
        snprintf(full, sizeof full, "%s.lora_a", name);
        s = gguf_add_tensor(w, full, 2, ne_a, o->type, err);
        snprintf(full, sizeof full, "%s.lora_b", name);
        if (!s) s = gguf_add_tensor(w, full, 2, ne_b, o->type, err);
    }
    if (!s) s = gguf_writer_open(w, o->out_path, err);
    for (size_t i = 0; !s && i < a->n_pairs; i++) {
        const LoraPair *p = &a->pairs[i];
        s = put_lora_matrix(w, p->A, p->rank * p->in, o->type, block, err);
        if (!s) s = put_lora_matrix(w, p->B, p->out * p->rank, o->type, block, err);
        r->n_merged += !s;
        r->n_bytes += (uint64_t)(p->rank * p->in + p->out * p->rank) * (o->type == GGML_F32 ? 4 : 2);
    }
    if (!s) s = gguf_commit(w, err);
    if (!s) r->n_tensors = 2 * a->n_pairs;
    gguf_writer_free(w);
    free(block);
    lora_free(a);
    model_dir_close(&md);
    return s;
}
