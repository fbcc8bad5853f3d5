/* test_image_processor.c - decoding + preprocessing of every image in
 * shared/golden/image_processor against Gemma4ImageProcessorPil: PNGs give
 * pixel_values exactly, JPEGs within 2/255 per value (decoders may differ by
 * a few levels), positions identical, for budgets 70 and 280. The golden
 * files are stored gzip-compressed. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "../unit/check.h"
#include "jsoncheck.h"
#include "preprocess.h"
#include "safetensors.h"

static uint8_t *slurp(const char *path, size_t *n, int gz) {
    size_t cap = 1 << 20, len = 0;
    uint8_t *b = malloc(cap);
    gzFile g = gz ? gzopen(path, "rb") : NULL;
    FILE *f = gz ? NULL : fopen(path, "rb");
    if (!g && !f) { free(b); return NULL; }
    for (;;) {
        if (len == cap) b = realloc(b, cap *= 2);
        int r = g ? gzread(g, b + len, (unsigned)(cap - len)) : (int)fread(b + len, 1, cap - len, f);
        if (r <= 0) break;
        len += (size_t)r;
    }
    if (g) gzclose(g);
    if (f) fclose(f);
    *n = len;
    return b;
}

static void check_case(const char *file, int budget, const char *golden) {
    char path[512];
    snprintf(path, sizeof path, GF_FIXTURES "/images/%s", file);
    size_t n;
    uint8_t *bytes = slurp(path, &n, 0);
    snprintf(path, sizeof path, GF_FIXTURES "/image_processor/%s.gz", golden);
    size_t gn;
    uint8_t *gold = slurp(path, &gn, 1);
    CHECK(bytes && gold, "%s: fixtures", golden);
    if (!bytes || !gold) return;
    ImageLimits lim = {50u << 20, 100000000};
    Image img;
    GfError err;
    SafeTensors st;
    CHECK_STATUS(image_decode(bytes, n, &lim, &img, &err), GF_OK, err);
    CHECK_STATUS(safetensors_parse(gold, gn, &st, &err), GF_OK, err);
    const StTensor *px = safetensors_find(&st, "pixel_values_u8"), *pos = safetensors_find(&st, "image_position_ids");
    PreprocessConfig cfg = {budget, 16, 3};
    int64_t P = 9 * budget, n_real = 0, n_soft = 0;
    uint8_t *pixels = malloc((size_t)P * 768);
    int32_t *positions = malloc((size_t)P * 2 * sizeof *positions);
    CHECK_STATUS(preprocess_image(&cfg, &img, pixels, positions, &n_real, &n_soft, &err), GF_OK, err);
    CHECK(px && pos && px->shape[1] == (uint64_t)P && pos->shape[1] == (uint64_t)P, "%s: golden shapes", golden);
    int is_jpeg = strstr(file, ".jpg") != NULL, max_diff = 0, pos_ok = 1;
    size_t n_diff = 0;
    for (int64_t i = 0; px && i < P * 768; i++) {
        int d = abs((int)pixels[i] - (int)px->data[i]);
        if (d > max_diff) max_diff = d;
        n_diff += d != 0;
    }
    for (int64_t i = 0; pos && i < P * 2; i++) {
        int64_t v;
        memcpy(&v, pos->data + 8 * i, 8);
        pos_ok &= v == positions[i];
    }
    printf("%-24s %4lld patches %3lld soft tokens: %zu values differ, max %d/255, positions %s\n", golden,
           (long long)n_real, (long long)n_soft, n_diff, max_diff, pos_ok ? "equal" : "DIFFER");
    CHECK(pos_ok, "%s: positions differ", golden);
    CHECK(is_jpeg ? max_diff <= 2 : max_diff == 0, "%s: pixels differ by up to %d", golden, max_diff);
    image_free(&img);
    safetensors_close(&st);
    free(pixels); free(positions); free(bytes); free(gold);
}

int main(void) {
    size_t n;
    char *idx = (char *)slurp(GF_FIXTURES "/image_processor/index.json", &n, 0);
    GfError err;
    cJSON *root = idx ? json_parse_strict(idx, n, "index.json", &err) : NULL;
    CHECK(cJSON_IsArray(root) && cJSON_GetArraySize(root) == 16, "index.json lists 16 cases");
    for (const cJSON *e = root ? root->child : NULL; e; e = e->next) {
        const cJSON *f = cJSON_GetObjectItemCaseSensitive(e, "file"), *b = cJSON_GetObjectItemCaseSensitive(e, "max_soft_tokens");
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(e, "golden"), *ns = cJSON_GetObjectItemCaseSensitive(e, "num_soft_tokens");
        check_case(f->valuestring, (int)b->valuedouble, g->valuestring);
        PreprocessConfig cfg = {(int)b->valuedouble, 16, 3};
        int tw, th;
        const cJSON *w = cJSON_GetObjectItemCaseSensitive(e, "width"), *h = cJSON_GetObjectItemCaseSensitive(e, "height");
        CHECK(preprocess_target_size(&cfg, (int)w->valuedouble, (int)h->valuedouble, &tw, &th, &err) == GF_OK &&
              (tw / 48) * (th / 48) == (int)ns->valuedouble, "%s: soft tokens", g->valuestring);
    }
    cJSON_Delete(root);
    free(idx);
    /* extreme shapes take the thin branches or fail cleanly, never divide by zero */
    PreprocessConfig cfg = {280, 16, 3};
    int tw, th;
    CHECK(preprocess_target_size(&cfg, 1, 1, &tw, &th, &err) == GF_OK && tw == 768 && th == 768, "1x1 upscales (%dx%d)", tw, th);
    CHECK(preprocess_target_size(&cfg, 65535, 1, &tw, &th, &err) == GF_OK && th == 48 && tw == 280 * 48, "65535x1: %dx%d", tw, th);
    CHECK(preprocess_target_size(&cfg, 1, 65535, &tw, &th, &err) == GF_OK && tw == 48 && th == 280 * 48, "1x65535: %dx%d", tw, th);
    cfg.max_soft_tokens = 100;
    CHECK(preprocess_target_size(&cfg, 10, 10, &tw, &th, &err) == GF_INVALID, "budget 100 refused");
    return check_done("test_image_processor");
}
