/* test_forward_image.c - the vision tower and the multimodal forward against
 * transformers 5.17 for dense, ple and moe (forward_image.safetensors: one
 * image, wide.png at a budget of 70 soft tokens, inside an 83-token chat):
 * vision_soft_tokens, logits with the bidirectional image mask, and the
 * greedy image continuation of generate.json. */
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "golden.h"
#include "golden_inputs.h"
#include "jsoncheck.h"
#include "model.h"
#include "safetensors.h"

/* The image continuation prompt of generate.json, with its expected output. */
static int load_generate(const char *dir, int32_t *prompt, int64_t *n_prompt, int32_t *want, int64_t *n_want) {
    char path[700], buf[16384];
    snprintf(path, sizeof path, "%s/generate.json", dir);
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f) fclose(f);
    GfError err;
    cJSON *j = json_parse_strict(buf, n, "generate.json", &err);
    const cJSON *img = cJSON_GetObjectItemCaseSensitive(j, "image");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(img, "prompt"), *o = cJSON_GetObjectItemCaseSensitive(img, "output");
    *n_prompt = *n_want = 0;
    for (const cJSON *e = p ? p->child : NULL; e; e = e->next) prompt[(*n_prompt)++] = (int32_t)e->valuedouble;
    for (const cJSON *e = o ? o->child : NULL; e; e = e->next) want[(*n_want)++] = (int32_t)e->valuedouble;
    cJSON_Delete(j);
    return *n_prompt && *n_want ? 0 : -1;
}

static void run_variant(const char *variant) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, GF_FIXTURES "/%s", variant);
    snprintf(path, sizeof path, "%s/forward_image.safetensors", dir);
    Model *m = NULL;
    GfError err;
    ModelOptions opts = {.n_threads = 2, .quantize = MODEL_QUANT_NONE};
    SafeTensors st;
    CHECK_STATUS(model_open(dir, &opts, &m, &err), GF_OK, err);
    CHECK_STATUS(safetensors_open(path, "forward_image", &st, &err), GF_OK, err);
    if (!m || !st.n_tensors) return;
    const float *ref_soft = (const float *)safetensors_find(&st, "vision_soft_tokens")->data;
    const float *ref_logits = (const float *)safetensors_find(&st, "logits")->data;
    int64_t T = (int64_t)safetensors_find(&st, "input_ids")->shape[1];
    int64_t H = model_config(m)->text.hidden_size, V = model_config(m)->text.vocab_size;
    float *pixels;
    int32_t *positions, *tokens = malloc((size_t)T * sizeof *tokens);
    int64_t N = golden_image(&st, &pixels, &positions);
    uint8_t *types = malloc((size_t)T);
    golden_prompt(&st, T, tokens, types);
    KnBuffer soft_buf;
    CHECK_STATUS(model_device_alloc(m, &soft_buf, (size_t)(N * H) * sizeof(float), "soft tokens", &err), GF_OK, err);
    float *soft = soft_buf.data, *soft_host = malloc((size_t)(N * H) * sizeof(float));
    int64_t n_soft = 0;
    CHECK_STATUS(model_vision_forward(m, NULL, pixels, positions, N, soft, &n_soft, &err), GF_OK, err);
    model_download(m, soft_host, soft, (size_t)(n_soft * H) * sizeof(float));
    char what[96];
    snprintf(what, sizeof what, "%s vision_soft_tokens (%lld)", variant, (long long)n_soft);
    CHECK(n_soft == 60, "%s: %lld soft tokens, want 60", variant, (long long)n_soft);
    CHECK(golden_report(what, soft_host, ref_soft, (size_t)(60 * H), (size_t)H, NULL, GOLDEN_LOGITS_REL), "%s", what);
    KvCache c;
    float *logits = malloc((size_t)(T * V) * sizeof(float));
    CHECK_STATUS(kv_cache_init(&c, &model_config(m)->text, model_backend(m), T, &err), GF_OK, err);
    ModelInput in = {.ids = tokens, .mm_type = types, .soft_tokens = soft, .n = T};
    CHECK_STATUS(model_forward(m, &c, &in, logits, NULL, &err), GF_OK, err);
    snprintf(what, sizeof what, "%s image logits", variant);
    CHECK(golden_report(what, logits, ref_logits, (size_t)(T * V), (size_t)V, NULL, GOLDEN_LOGITS_REL), "%s", what);
    kv_cache_free(&c);
    int32_t prompt[512], want[64], got[64];
    int64_t np, nw, ng = 0;
    CHECK(load_generate(dir, prompt, &np, want, &nw) == 0, "%s generate.json image case", variant);
    ModelInput gen = {.ids = prompt, .soft_tokens = soft, .n = np};
    CHECK_STATUS(model_generate_greedy_input(m, &gen, nw, got, &ng, &err), GF_OK, err);
    int same = ng == nw && memcmp(got, want, (size_t)nw * sizeof *got) == 0;
    printf("%-40s %lld tokens %s\n", "greedy image continuation", (long long)ng, same ? "OK" : "NOT OK");
    CHECK(same, "%s: image continuation differs from generate.json", variant);
    free(pixels); free(positions); free(tokens); free(types); free(soft_host); free(logits);
    model_device_free(m, &soft_buf);
    safetensors_close(&st);
    model_close(m);
}

int main(void) {
    run_variant("dense");
    run_variant("ple");
    run_variant("moe");
    return check_done("test_forward_image");
}
