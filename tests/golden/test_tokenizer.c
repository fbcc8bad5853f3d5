/* test_tokenizer.c - the tokenizer against Hugging Face tokenizers: every
 * encode case of the real 262k-token Gemma tokenizer (cases.jsonl: ids,
 * decode, decode skipping specials), its decode-only cases (byte runs), the
 * public reference sequences it reproduces, and the tiny models' tokenizer
 * (tokenizer_cases.jsonl); streaming decode equals full decode on valid
 * text; and an encode throughput figure. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "../unit/check.h"
#include "jsoncheck.h"
#include "tokenizer.h"

static char *slurp(const char *path, size_t *n, int gz) {
    size_t cap = 1 << 20, len = 0;
    char *b = malloc(cap);
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

static int32_t *ids_of(const cJSON *arr, size_t *n) {
    *n = (size_t)cJSON_GetArraySize(arr);
    int32_t *v = malloc((*n + 1) * sizeof *v);
    size_t i = 0;
    for (const cJSON *e = arr ? arr->child : NULL; e; e = e->next) v[i++] = (int32_t)e->valuedouble;
    return v;
}

/* Runs fn on every JSON line of a file. */
static void each_line(const char *path, void (*fn)(const Tokenizer *, const cJSON *), const Tokenizer *t) {
    size_t n;
    char *text = slurp(path, &n, 0);
    CHECK(text != NULL, "read %s", path);
    for (char *line = text; text && line < text + n;) {
        char *end = memchr(line, '\n', (size_t)(text + n - line));
        size_t len = end ? (size_t)(end - line) : (size_t)(text + n - line);
        GfError err;
        cJSON *j = len ? json_parse_strict(line, len, "case", &err) : NULL;
        if (j) fn(t, j);
        cJSON_Delete(j);
        line += len + 1;
    }
    free(text);
}

static void encode_case(const Tokenizer *t, const cJSON *c) {
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(c, "name"), *text = cJSON_GetObjectItemCaseSensitive(c, "text");
    /* Gemma 4 sequences: the Gemma 3 file reproduces them with its own marker names */
    const cJSON *g3 = cJSON_GetObjectItemCaseSensitive(c, "text_with_gemma3_marker_names");
    if (cJSON_IsString(g3)) text = g3;
    const cJSON *want = cJSON_GetObjectItemCaseSensitive(c, "ids");
    if (!want) want = cJSON_GetObjectItemCaseSensitive(c, "expected_ids");
    int add = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_special_tokens"));
    const char *label = cJSON_IsString(name) ? name->valuestring : text->valuestring;
    size_t nw, ng = 0;
    int32_t *w = ids_of(want, &nw), *got = NULL;
    GfError err;
    CHECK_STATUS(tokenizer_encode(t, text->valuestring, strlen(text->valuestring), add, 1, &got, &ng, &err), GF_OK, err);
    int same = ng == nw && (nw == 0 || memcmp(got, w, nw * sizeof *w) == 0);
    CHECK(same, "encode '%.40s': %zu ids, want %zu (first difference at %zu)", label, ng, nw,
          (size_t)({ size_t k = 0; while (k < ng && k < nw && got[k] == w[k]) k++; k; }));
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(c, "decoded"), *dss = cJSON_GetObjectItemCaseSensitive(c, "decoded_skip_special");
    if (cJSON_IsString(dec)) {
        char *d = tokenizer_decode(t, w, nw, 0, &err);
        CHECK(d && strcmp(d, dec->valuestring) == 0, "decode '%.40s'", label);
        free(d);
        /* streaming gives the same text on these valid sequences */
        char *s = NULL;
        size_t len = 0, cap = 0;
        TokenStream ts = {0};
        for (size_t i = 0; i < nw; i++) tokenizer_stream_push(t, &ts, w[i], 0, &s, &len, &cap, &err);
        tokenizer_stream_end(t, &ts, &s, &len, &cap, &err);
        CHECK(strcmp(s ? s : "", dec->valuestring) == 0, "stream decode '%.40s'", label);
        free(s);
    }
    if (cJSON_IsString(dss)) {
        char *d = tokenizer_decode(t, w, nw, 1, &err);
        CHECK(d && strcmp(d, dss->valuestring) == 0, "decode skipping specials '%.40s'", label);
        free(d);
    }
    free(w);
    free(got);
}

static void decode_case(const Tokenizer *t, const cJSON *c) {
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(c, "name"), *want = cJSON_GetObjectItemCaseSensitive(c, "text_hf_rule");
    size_t n;
    int32_t *ids = ids_of(cJSON_GetObjectItemCaseSensitive(c, "ids"), &n);
    GfError err;
    int skip = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "skip_special_tokens"));
    char *d = tokenizer_decode(t, ids, n, skip, &err);
    CHECK(d && cJSON_IsString(want) && strcmp(d, want->valuestring) == 0, "decode case %s", name->valuestring);
    free(d);
    /* streaming, id by id, ends with the same text (invalid byte runs included) */
    char *s = NULL;
    size_t len = 0, cap = 0;
    TokenStream ts = {0};
    for (size_t i = 0; i < n; i++) tokenizer_stream_push(t, &ts, ids[i], skip, &s, &len, &cap, &err);
    tokenizer_stream_end(t, &ts, &s, &len, &cap, &err);
    CHECK(cJSON_IsString(want) && strcmp(s ? s : "", want->valuestring) == 0, "stream decode case %s", name->valuestring);
    free(s);
    free(ids);
}

static void public_ref(const Tokenizer *t, const cJSON *c) {
    if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "gemma3_tokenizer_json_reproduces"))) encode_case(t, c);
}

static void real_tokenizer(void) {
    size_t n;
    char *json = slurp(GF_FIXTURES "/tokenizer-gemma3/tokenizer.json.gz", &n, 1);
    CHECK(json != NULL, "tokenizer.json.gz");
    if (!json) return;
    Tokenizer *t = NULL;
    GfError err;
    double t0 = gf_time_mono();
    CHECK_STATUS(tokenizer_load_json(json, n, 1, &t, &err), GF_OK, err);
    printf("real tokenizer: %zu ids loaded in %.2f s\n", t ? tokenizer_vocab_size(t) : 0, gf_time_mono() - t0);
    free(json);
    if (!t) return;
    CHECK(tokenizer_token_id(t, "<0x0D>") == 251 && tokenizer_token_id(t, "<start_of_turn>") == 105, "ids");
    each_line(GF_FIXTURES "/tokenizer-gemma3/cases.jsonl", encode_case, t);
    each_line(GF_FIXTURES "/tokenizer-gemma3/decode_cases.jsonl", decode_case, t);
    each_line(GF_FIXTURES "/tokenizer-gemma3/public_refs.jsonl", public_ref, t);
    /* parse_special = 0 keeps user text from becoming control tokens */
    int32_t *ids = NULL;
    size_t k = 0;
    CHECK_STATUS(tokenizer_encode(t, "<start_of_turn>", 15, 0, 0, &ids, &k, &err), GF_OK, err);
    CHECK(k > 1 && ids[0] != 105, "special string not parsed when parse_special is off");
    CHECK(tokenizer_encode(t, "\xff", 1, 0, 1, &ids, &k, &err) == GF_INVALID, "invalid UTF-8 refused");
    /* throughput on a mixed text */
    size_t cn;
    char *corpus = slurp(GF_FIXTURES "/tokenizer-gemma3/cases.jsonl", &cn, 0);
    double t1 = gf_time_mono();
    int reps = 20;
    size_t total_ids = 0;
    for (int r = 0; r < reps; r++) {
        tokenizer_encode(t, corpus, cn, 0, 1, &ids, &k, &err);
        total_ids += k;
    }
    double dt = gf_time_mono() - t1;
    printf("encode throughput: %.1f MB/s, %.0f tokens/s (%zu bytes x %d)\n", (double)cn * reps / dt / 1e6, total_ids / dt, cn, reps);
    free(corpus);
    free(ids);
    tokenizer_free(t);
}

static void tiny_tokenizer(void) {
    Tokenizer *t = NULL;
    GfError err;
    CHECK_STATUS(tokenizer_load_dir(GF_FIXTURES "/dense", &t, &err), GF_OK, err);
    if (!t) return;
    each_line(GF_FIXTURES "/tokenizer_cases.jsonl", encode_case, t);
    CHECK(tokenizer_token_id(t, "<|image|>") == 256 && tokenizer_token_id(t, "<turn|>") == 263, "tiny special ids");
    tokenizer_free(t);
    const char *bad[] = {
        "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{},\"merges\":[]},\"added_tokens\":[]}",
        "{\"model\":{\"type\":\"BPE\",\"byte_fallback\":false,\"vocab\":{},\"merges\":[]},\"added_tokens\":[]}",
        "{\"normalizer\":{\"type\":\"NFKC\"},\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{},\"merges\":[]},\"added_tokens\":[]}",
        "{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[[\"a\",\"b\"]]},\"added_tokens\":[]}",
        "{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[]},\"added_tokens\":[{\"id\":1,\"content\":\"x\",\"lstrip\":true}]}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        gf_error_clear(&err);
        CHECK(tokenizer_load_json(bad[i], strlen(bad[i]), -1, &t, &err) == GF_INVALID, "bad tokenizer %zu accepted", i);
    }
}

int main(void) {
    tiny_tokenizer();
    real_tokenizer();
    return check_done("test_tokenizer");
}
