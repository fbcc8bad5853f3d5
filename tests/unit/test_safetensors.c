/* test_safetensors.c - the strict safetensors reader: a valid file parses
 * with the right table, and every defect of RELIABILITY.md A1-A4 is refused
 * (one generated file per defect), plus the golden model file. */
#include <stdint.h>
#include <stdlib.h>

#include "check.h"
#include "safetensors.h"

/* header JSON + data bytes -> file bytes (caller frees). */
static uint8_t *make_file(const char *header, uint64_t declared_len, size_t data_len, size_t *out_len) {
    size_t hl = strlen(header);
    uint8_t *f = calloc(1, 8 + hl + data_len + 1);
    for (int i = 0; i < 8; i++) f[i] = (uint8_t)(declared_len >> (8 * i));
    memcpy(f + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) f[8 + hl + i] = (uint8_t)i;
    *out_len = 8 + hl + data_len;
    return f;
}

typedef struct {
    const char *name;
    const char *header;   /* NULL: use raw bytes */
    size_t data_len;
    int64_t len_delta;    /* added to the true header length */
} Defect;

static const char *GOOD =
    "{\"__metadata__\":{\"format\":\"pt\"},"
    "\"b\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[16,28]},"
    "\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";

static void test_good(void) {
    size_t n;
    uint8_t *f = make_file(GOOD, strlen(GOOD), 28, &n);
    SafeTensors st;
    GfError err;
    CHECK_STATUS(safetensors_parse(f, n, &st, &err), GF_OK, err);
    CHECK(st.n_tensors == 2, "n_tensors %zu", st.n_tensors);
    const StTensor *a = safetensors_find(&st, "a"), *b = safetensors_find(&st, "b");
    CHECK(a && a->dtype == ST_F32 && a->n_dims == 1 && a->shape[0] == 4 && a->n_bytes == 16, "tensor a");
    CHECK(b && b->dtype == ST_BF16 && b->n_elements == 6 && b->data == st.buffer + 16, "tensor b");
    CHECK(st.tensors[0].offset == 0, "sorted by offset");
    safetensors_close(&st);
    free(f);
}

static const Defect DEFECTS[] = {
    /* A1: header length */
    {"len 0", "{}", 0, -2},
    {"len past end", "{}", 0, 1000},
    {"len 2^64-1", "{}", 0, INT64_MIN},
    {"len over 100MB", "{}", 0, 200000000},
    /* A2: header content */
    {"not an object", "[1,2]", 0, 0},
    {"not starting with {", " {}", 0, 0},
    {"invalid utf8", "{\"\xff\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 0, 0},
    {"invalid json", "{\"a\":}", 0, 0},
    {"duplicate names", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, 0},
    {"metadata not strings", "{\"__metadata__\":{\"x\":1}}", 0, 0},
    /* A3: offsets */
    {"begin > end", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, 0},
    {"negative", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, 0},
    {"hole", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, 0},
    {"overlap", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, 0},
    {"zero-size reuse", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}", 4, 0},
    {"end past buffer", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, 0},
    {"trailing bytes", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, 0},
    {"float offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0.5,4]}}", 4, 0},
    /* A4: shapes and dtypes */
    {"shape overflow", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,4]}}", 4, 0},
    {"bytes overflow", "{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}", 8, 0},
    {"unknown dtype", "{\"a\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 0},
    {"size mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, 0},
    {"negative dim", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, 0},
    {"nine dims", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, 0},
    {"extra key", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", 1, 0},
};

static void test_defects(void) {
    for (size_t i = 0; i < sizeof DEFECTS / sizeof DEFECTS[0]; i++) {
        const Defect *d = &DEFECTS[i];
        uint64_t len = d->len_delta == INT64_MIN ? UINT64_MAX : (uint64_t)((int64_t)strlen(d->header) + d->len_delta);
        size_t n;
        uint8_t *f = make_file(d->header, len, d->data_len, &n);
        SafeTensors st;
        GfError err;
        gf_error_clear(&err);
        GfStatus rc = safetensors_parse(f, n, &st, &err);
        CHECK(rc == GF_INVALID && strcmp(err.code, "invalid_safetensors") == 0, "defect '%s' accepted (rc %d)", d->name, rc);
        CHECK(st.n_tensors == 0 && st.tensors == NULL, "defect '%s' left a table", d->name);
        free(f);
    }
    /* shorter than 8 bytes */
    static const uint8_t tiny[7] = {1, 0, 0, 0, 0, 0, 0};
    SafeTensors st;
    GfError err;
    for (size_t n = 0; n < 8; n++) CHECK(safetensors_parse(tiny, n, &st, &err) == GF_INVALID, "length %zu", n);
}

static void test_golden_model(void) {
    SafeTensors st;
    GfError err;
    CHECK_STATUS(safetensors_open(GF_FIXTURES "/dense/model.safetensors", "model.safetensors", &st, &err), GF_OK, err);
    const StTensor *e = safetensors_find(&st, "model.language_model.embed_tokens.weight");
    CHECK(e && e->dtype == ST_BF16 && e->n_dims == 2 && e->shape[0] == 1024 && e->shape[1] == 64, "embed_tokens");
    safetensors_close(&st);
    CHECK(safetensors_open(GF_FIXTURES "/missing.safetensors", "x", &st, &err) == GF_NOT_FOUND, "missing file");
}

int main(void) {
    test_good();
    test_defects();
    test_golden_model();
    return check_done("test_safetensors");
}
