/* test_gguf.c - the GGUF writer and strict reader: a file written with
 * every kind of metadata and three tensor types reads back field for field;
 * every truncation of it and every corruption the reader guards against
 * (magic, version, counts, types, alignment, overlap, duplicates) is refused
 * with invalid_gguf; the writer refuses bytes that do not match what it
 * announced and leaves no file; Q8_0 / Q4_0 blocks are ggml's rounding. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "convert.h"
#include "gguf.h"

static char g_path[256];

static uint8_t *slurp(const char *path, size_t *n) {
    GfError err;
    return (uint8_t *)gf_read_file(path, 1u << 20, "sample", n, &err);
}

/* The file every case starts from. */
static GfStatus write_sample(const char *path, int duplicate_key, GfError *err) {
    GgufWriter *w = gguf_writer_new(err);
    if (!w) return GF_NO_MEMORY;
    gguf_kv_str(w, "general.architecture", "gemma4", 6);
    gguf_kv_u32(w, "gemma4.block_count", 6);
    gguf_kv_f32(w, "gemma4.rope.freq_base", 10000.0f);
    gguf_kv_bool(w, "gemma4.flag", 1);
    static const int32_t ints[3] = {7, -1, 9};
    gguf_kv_arr_i32(w, "gemma4.ints", ints, 3);
    static const char *const strs[3] = {"<pad>", "\xe2\x96\x81" "a", ""};
    static const size_t lens[3] = {5, 4, 0};
    gguf_kv_arr_str(w, "tokenizer.ggml.tokens", strs, lens, 3);
    if (duplicate_key) gguf_kv_u32(w, "gemma4.block_count", 7);
    uint64_t ne_a[1] = {4}, ne_b[2] = {8, 2}, ne_c[2] = {32, 2};
    GfStatus s = gguf_add_tensor(w, "a", 1, ne_a, GGML_F32, err);
    if (!s) s = gguf_add_tensor(w, "b", 2, ne_b, GGML_F16, err);
    if (!s) s = gguf_add_tensor(w, "c", 2, ne_c, GGML_Q8_0, err);
    if (!s) s = gguf_writer_open(w, path, err);
    float a[4] = {1, 2, 3, 4};
    uint16_t b[16];
    for (int i = 0; i < 16; i++) b[i] = kn_f32_to_f16((float)i / 4);
    uint8_t c[68];
    float x[64];
    for (int i = 0; i < 64; i++) x[i] = sinf((float)i);
    gguf_quantize_q8_0(x, 64, c);
    if (!s) s = gguf_put(w, a, sizeof a, err);
    if (!s) s = gguf_put(w, b, 10, err);          /* in pieces of any size */
    if (!s) s = gguf_put(w, (uint8_t *)b + 10, sizeof b - 10, err);
    if (!s) s = gguf_put(w, c, sizeof c, err);
    if (!s) s = gguf_commit(w, err);
    gguf_writer_free(w);
    return s;
}

static void reads_back(void) {
    GfError err;
    CHECK_STATUS(write_sample(g_path, 0, &err), GF_OK, err);
    Gguf g;
    CHECK_STATUS(gguf_open(g_path, &g, &err), GF_OK, err);
    CHECK(g.version == 3 && g.n_kv == 6 && g.n_tensors == 3 && g.alignment == 32, "counts %zu %zu", g.n_kv, g.n_tensors);
    uint64_t len = 0;
    const char *arch = gguf_get_str(gguf_find(&g, "general.architecture"), &len);
    CHECK(arch && len == 6 && memcmp(arch, "gemma4", 6) == 0, "architecture");
    uint32_t u = 0;
    float f = 0;
    CHECK(gguf_get_u32(gguf_find(&g, "gemma4.block_count"), &u) && u == 6, "u32");
    CHECK(gguf_get_f32(gguf_find(&g, "gemma4.rope.freq_base"), &f) && f == 10000.0f, "f32");
    CHECK(!gguf_get_u32(gguf_find(&g, "gemma4.rope.freq_base"), &u), "a f32 is not a u32");
    const GgufKv *toks = gguf_find(&g, "tokenizer.ggml.tokens");
    const char *t1 = gguf_arr_str(toks, 1, &len);
    CHECK(toks && toks->n == 3 && t1 && len == 4 && memcmp(t1, "\xe2\x96\x81" "a", 4) == 0, "string array");
    CHECK(gguf_arr_str(toks, 2, &len) && len == 0 && !gguf_arr_str(toks, 3, &len), "empty string, and the end");
    const GgufKv *ints = gguf_find(&g, "gemma4.ints");
    CHECK(ints && ints->arr_type == GGUF_I32 && ints->n == 3 && ((const int32_t *)ints->val)[1] == -1, "int array");
    const GgufTensor *a = gguf_tensor(&g, "a"), *b = gguf_tensor(&g, "b"), *c = gguf_tensor(&g, "c");
    CHECK(a && b && c, "tensors found");
    if (a && b && c) {
        CHECK(a->type == GGML_F32 && a->n_dims == 1 && a->ne[0] == 4 && ((const float *)a->data)[3] == 4.0f, "f32 tensor");
        CHECK(b->type == GGML_F16 && b->ne[0] == 8 && b->ne[1] == 2 && b->offset % 32 == 0 && b->n_bytes == 32, "f16 tensor");
        CHECK(kn_f16_to_f32(((const uint16_t *)b->data)[15]) == 3.75f, "f16 data");
        CHECK(c->type == GGML_Q8_0 && c->n_bytes == 68 && c->offset % 32 == 0, "q8_0 tensor");
    }
    CHECK(!gguf_tensor(&g, "d") && !gguf_find(&g, "nope"), "absent");
    gguf_close(&g);
}

/* Parses a modified copy; 1 when refused with invalid_gguf. */
static int refused(const uint8_t *bytes, size_t n) {
    GfError err;
    Gguf g;
    GfStatus s = gguf_parse(bytes, n, &g, &err);
    if (s == GF_OK) gguf_close(&g);
    return s == GF_INVALID && strcmp(err.code, "invalid_gguf") == 0;
}

static size_t find(const uint8_t *b, size_t n, const char *needle, size_t k) {
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(b + i, needle, k) == 0) return i;
    return (size_t)-1;
}

static void corruptions(void) {
    size_t n = 0;
    uint8_t *orig = slurp(g_path, &n), *b = orig ? malloc(n) : NULL;
    CHECK(orig && b, "sample file");
    if (!b) { free(orig); return; }
    /* every truncation before the end of the last tensor (what follows is
     * the padding to the alignment) */
    Gguf g;
    GfError e;
    size_t end = 0;
    if (gguf_parse(orig, n, &g, &e) == GF_OK) {
        end = (size_t)(g.data - orig) + 64 + 68;
        gguf_close(&g);
    }
    int all = end > 0;
    for (size_t k = 0; k < end; k++) all &= refused(orig, k);
    CHECK(all, "every truncation is refused");
    memcpy(b, orig, n);
    b[0] = 'X';
    CHECK(refused(b, n), "bad magic");
    memcpy(b, orig, n);
    b[4] = 2;
    CHECK(refused(b, n), "version 2");
    memcpy(b, orig, n);
    memset(b + 16, 0xff, 7);
    CHECK(refused(b, n), "a metadata count larger than the file");
    /* the tensor infos: name "c", n_dims, ne[0], ne[1], type, offset */
    static const char info_c[] = "\x01\0\0\0\0\0\0\0c\x02\0\0\0";
    size_t ci = find(orig, n, info_c, sizeof info_c - 1);
    CHECK(ci != (size_t)-1, "tensor info of c");
    if (ci != (size_t)-1) {
        size_t type_at = ci + 9 + 4 + 16, off_at = type_at + 4;
        memcpy(b, orig, n);
        b[type_at] = 99;
        CHECK(refused(b, n), "unknown tensor type");
        memcpy(b, orig, n);
        b[off_at] += 1;
        CHECK(refused(b, n), "misaligned offset");
        memcpy(b, orig, n);
        memset(b + off_at, 0, 8);
        CHECK(refused(b, n), "overlapping tensors");
        memcpy(b, orig, n);
        b[ci + 9 + 4] = 31; /* ne[0] = 31: not a whole Q8_0 block */
        CHECK(refused(b, n), "a first dim that is not a whole block");
        memcpy(b, orig, n);
        b[off_at + 1] = 0x10;
        CHECK(refused(b, n), "data past the end of the file");
        memcpy(b, orig, n);
        b[ci + 8] = 'a';
        CHECK(refused(b, n), "two tensors named a");
    }
    size_t bool_at = find(orig, n, "gemma4.flag", 11);
    if (bool_at != (size_t)-1) {
        memcpy(b, orig, n);
        b[bool_at + 11 + 4] = 2;
        CHECK(refused(b, n), "a bool that is neither 0 nor 1");
    }
    size_t arr = find(orig, n, "gemma4.ints", 11);
    if (arr != (size_t)-1) {
        memcpy(b, orig, n);
        b[arr + 11 + 4] = GGUF_ARRAY;  /* element type: an array of arrays */
        CHECK(refused(b, n), "arrays of arrays");
    }
    free(b);
    free(orig);
    GfError err;
    char dup[300];
    snprintf(dup, sizeof dup, "%s.dup", g_path);
    CHECK_STATUS(write_sample(dup, 1, &err), GF_OK, err);
    uint8_t *d = slurp(dup, &n);
    CHECK(d && refused(d, n), "a key twice");
    free(d);
    unlink(dup);
}

static void writer_checks(void) {
    GfError err;
    char path[300];
    snprintf(path, sizeof path, "%s.w", g_path);
    GgufWriter *w = gguf_writer_new(&err);
    uint64_t ne[1] = {31};
    CHECK(gguf_add_tensor(w, "q", 1, ne, GGML_Q4_0, &err) == GF_INTERNAL, "q4_0 needs whole blocks");
    ne[0] = 4;
    CHECK_STATUS(gguf_add_tensor(w, "x", 1, ne, GGML_F32, &err), GF_OK, err);
    CHECK_STATUS(gguf_writer_open(w, path, &err), GF_OK, err);
    float v[5] = {0};
    CHECK(gguf_put(w, v, sizeof v, &err) == GF_INTERNAL, "more bytes than announced");
    gguf_writer_free(w);
    CHECK(access(path, F_OK) != 0, "no file after a refused put");
    w = gguf_writer_new(&err);
    CHECK_STATUS(gguf_add_tensor(w, "x", 1, ne, GGML_F32, &err), GF_OK, err);
    CHECK_STATUS(gguf_writer_open(w, path, &err), GF_OK, err);
    CHECK_STATUS(gguf_put(w, v, 8, &err), GF_OK, err);
    CHECK(gguf_commit(w, &err) == GF_INTERNAL, "fewer bytes than announced");
    gguf_writer_free(w);
    CHECK(access(path, F_OK) != 0, "no file after a refused commit");
}

static void quantizers(void) {
    float x[32];
    for (int i = 0; i < 32; i++) x[i] = (float)(i - 10) / 8; /* max |x| = 21/8 at i = 31 */
    uint8_t q8[34], q4[18];
    gguf_quantize_q8_0(x, 32, q8);
    uint16_t h;
    memcpy(&h, q8, 2);
    float d = (21.0f / 8) / 127;
    CHECK(h == kn_f32_to_f16(d), "q8_0 scale = amax / 127");
    CHECK((int8_t)q8[2 + 31] == 127 && (int8_t)q8[2] == (int8_t)roundf(x[0] / d), "q8_0 codes");
    gguf_quantize_q4_0(x, 32, q4);
    memcpy(&h, q4, 2);
    float d4 = (21.0f / 8) / -8;
    CHECK(h == kn_f32_to_f16(d4), "q4_0 scale = the largest magnitude / -8");
    CHECK((q4[2 + 15] >> 4) == 0, "the largest weight is code 0 (-8 steps)");
    int lo = (int)(x[0] / d4 + 8.5f);
    CHECK((q4[2] & 15) == (lo < 15 ? lo : 15), "q4_0 low nibble of weight 0");
}

int main(void) {
    snprintf(g_path, sizeof g_path, "/tmp/gf-test-gguf-%d.gguf", (int)getpid());
    reads_back();
    corruptions();
    writer_checks();
    quantizers();
    unlink(g_path);
    return check_done("test_gguf");
}
