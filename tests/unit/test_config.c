/* test_config.c - config.json parsing and the derived per-layer quantities of
 * GEMMA4.md §1.3 on the golden configs and on hand-written variants (older
 * global_head_dim keys, defaults, errors that name the field). */
#include <stdlib.h>

#include "check.h"
#include "config.h"

static void test_golden_configs(void) {
    GemmaConfig c;
    GfError err;
    CHECK_STATUS(gemma_config_load(GF_FIXTURES "/ple", &c, &err), GF_OK, err);
    const TextConfig *t = &c.text;
    CHECK(t->n_layers == 6 && t->first_shared == 4 && t->ple_dim == 8, "ple sizes");
    CHECK(t->layers[4].kv_shared && t->layers[4].store_layer == 3 && t->layers[5].store_layer == 2, "ple store layers");
    CHECK(t->layers[4].intermediate == 2 * t->intermediate_size && t->layers[3].intermediate == t->intermediate_size, "double-wide");
    CHECK(t->layers[2].head_dim == 32 && t->layers[2].kv_heads == t->kv_heads && t->layers[0].head_dim == 16, "per_layer_config");
    CHECK(t->rope[LAYER_FULL].proportional && t->rope[LAYER_FULL].partial == 0.25f && t->rope[LAYER_SLIDING].theta == 10000.0f, "rope");
    CHECK(t->n_eos == 2 && t->eos_ids[1] == 263, "eos from generation_config.json");
    CHECK(c.vision.present && c.vision.clipped_linears && c.image_token_id == 256, "vision");
    gemma_config_free(&c);
    CHECK_STATUS(gemma_config_load(GF_FIXTURES "/dense", &c, &err), GF_OK, err);
    CHECK(c.text.layers[5].k_eq_v && !c.text.layers[4].k_eq_v && c.text.layers[5].kv_heads == 1, "k_eq_v");
    CHECK(c.text.bidirectional_vision && c.text.final_softcap == 30.0f && c.vision.standardize, "dense flags");
    gemma_config_free(&c);
    CHECK_STATUS(gemma_config_load(GF_FIXTURES "/moe", &c, &err), GF_OK, err);
    CHECK(c.text.moe && c.text.n_experts == 4 && c.text.top_k_experts == 2 && c.text.moe_intermediate == 32, "moe");
    gemma_config_free(&c);
}

#define BASE "\"vocab_size\":100,\"hidden_size\":8,\"intermediate_size\":16,\"num_attention_heads\":4,\"head_dim\":4"

static GfStatus parse(const char *text_config, GemmaConfig *c, GfError *err) {
    char buf[2048];
    snprintf(buf, sizeof buf, "{\"model_type\":\"gemma4\",\"text_config\":{" BASE ",%s}}", text_config);
    return gemma_config_parse(buf, strlen(buf), c, err);
}

static void test_derivations(void) {
    GemmaConfig c;
    GfError err;
    /* no layer_types: every 6th layer full, and the last forced full */
    CHECK_STATUS(parse("\"num_hidden_layers\":8,\"num_key_value_heads\":2", &c, &err), GF_OK, err);
    CHECK(c.text.layers[5].kind == LAYER_FULL && c.text.layers[6].kind == LAYER_SLIDING && c.text.layers[7].kind == LAYER_FULL, "types");
    CHECK(c.text.layers[5].head_dim == 512 && c.text.layers[0].head_dim == 4, "global_head_dim default 512");
    gemma_config_free(&c);
    /* older keys: global_head_dim, and KV heads only with k_eq_v */
    CHECK_STATUS(parse("\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"global_head_dim\":8,\"num_global_key_value_heads\":1,"
                       "\"attention_k_eq_v\":true", &c, &err), GF_OK, err);
    CHECK(c.text.layers[1].head_dim == 8 && c.text.layers[1].kv_heads == 1 && c.text.layers[1].k_eq_v, "older keys");
    gemma_config_free(&c);
    CHECK_STATUS(parse("\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"global_head_dim\":8,\"num_global_key_value_heads\":1", &c, &err),
                 GF_OK, err);
    CHECK(c.text.layers[1].kv_heads == 2, "global KV heads ignored without k_eq_v");
    gemma_config_free(&c);
    const char *bad[][2] = {
        {"\"num_hidden_layers\":0,\"num_key_value_heads\":2", "num_hidden_layers"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":3", "num_key_value_heads"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"layer_types\":[\"full_attention\"]", "layer_types"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"num_kv_shared_layers\":2", "num_kv_shared_layers"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"rope_parameters\":{\"full_attention\":{\"rope_type\":\"yarn\"}}", "rope_type"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"per_layer_config\":{\"7\":{}}", "per_layer_config"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"enable_moe_block\":true", "num_experts"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"hidden_size_per_layer_input\":-1", "hidden_size_per_layer_input"},
        {"\"num_hidden_layers\":2.5,\"num_key_value_heads\":2", "num_hidden_layers"},
        {"\"num_hidden_layers\":2,\"num_key_value_heads\":2,\"enable_moe_block\":true,\"num_experts\":128,"
         "\"top_k_experts\":65,\"moe_intermediate_size\":8", "top_k_experts"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        gf_error_clear(&err);
        GfStatus st = parse(bad[i][0], &c, &err);
        CHECK(st == GF_INVALID && strstr(err.message, bad[i][1]), "case %zu: %s (want '%s')", i, err.message, bad[i][1]);
    }
    const char *not_gemma = "{\"model_type\":\"llama\",\"text_config\":{}}";
    CHECK(gemma_config_parse(not_gemma, strlen(not_gemma), &c, &err) == GF_INVALID, "model_type");
}

int main(void) {
    test_golden_configs();
    test_derivations();
    return check_done("test_config");
}
