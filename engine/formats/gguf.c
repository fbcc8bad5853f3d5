/* gguf.c - strict GGUF reader, streaming writer, Q8_0 / Q4_0 quantizers. */
#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "convert.h"

#define GGUF_MAGIC "GGUF"
#define NAME_MAX_BYTES 65535u

uint64_t ggml_type_bytes(GgmlType t, uint64_t n) {
    switch (t) {
    case GGML_F32: return 4 * n;
    case GGML_F16: case GGML_BF16: return 2 * n;
    case GGML_Q8_0: return n / QK8_0 * 34;
    case GGML_Q4_0: return n / QK4_0 * 18;
    default: return 0;
    }
}

int ggml_type_block(GgmlType t) { return t == GGML_Q8_0 || t == GGML_Q4_0 ? 32 : 1; }

const char *ggml_type_name(GgmlType t) {
    switch (t) {
    case GGML_F32: return "f32";
    case GGML_F16: return "f16";
    case GGML_BF16: return "bf16";
    case GGML_Q8_0: return "q8_0";
    case GGML_Q4_0: return "q4_0";
    default: return "?";
    }
}

int ggml_type_from_name(const char *name, GgmlType *out) {
    static const GgmlType ALL[] = {GGML_F32, GGML_F16, GGML_BF16, GGML_Q8_0, GGML_Q4_0};
    for (size_t i = 0; i < sizeof ALL / sizeof *ALL; i++)
        if (strcmp(name, ggml_type_name(ALL[i])) == 0) {
            *out = ALL[i];
            return 0;
        }
    return -1;
}

static int known_type(uint32_t t) {
    return t == GGML_F32 || t == GGML_F16 || t == GGML_BF16 || t == GGML_Q8_0 || t == GGML_Q4_0;
}

/* ---- reading ------------------------------------------------------------ */

typedef struct {
    const uint8_t *p, *end;
    GfError *err;
} Cursor;

static GfStatus bad(GfError *err, const char *fmt, const char *what) {
    return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, fmt, what);
}

static int take(Cursor *c, uint64_t n, const uint8_t **out) {
    if ((uint64_t)(c->end - c->p) < n) return -1;
    *out = c->p;
    c->p += n;
    return 0;
}

static int take_u32(Cursor *c, uint32_t *v) {
    const uint8_t *b;
    if (take(c, 4, &b)) return -1;
    memcpy(v, b, 4);
    return 0;
}

static int take_u64(Cursor *c, uint64_t *v) {
    const uint8_t *b;
    if (take(c, 8, &b)) return -1;
    memcpy(v, b, 8);
    return 0;
}

static int take_str(Cursor *c, const char **s, uint64_t *len) {
    const uint8_t *b;
    if (take_u64(c, len) || take(c, *len, &b)) return -1;
    *s = (const char *)b;
    return 0;
}

static uint64_t scalar_size(uint32_t t) {
    static const uint8_t sizes[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return t < GGUF_TYPE_COUNT ? sizes[t] : 0;
}

/* Skips one value of type t (not an array), checking strings and bools. */
static int skip_value(Cursor *c, uint32_t t) {
    if (t == GGUF_STRING) {
        const char *s;
        uint64_t n;
        return take_str(c, &s, &n) || !gf_utf8_valid(s, (size_t)n) ? -1 : 0;
    }
    const uint8_t *b;
    uint64_t n = scalar_size(t);
    if (!n || take(c, n, &b)) return -1;
    return t == GGUF_BOOL && *b > 1 ? -1 : 0;
}

static GfStatus read_kv(Cursor *c, GgufKv *kv, GfError *err) {
    uint64_t klen;
    if (take_str(c, &kv->key, &klen)) return bad(err, "the metadata is cut short%s", "");
    if (klen == 0 || klen > NAME_MAX_BYTES || !gf_utf8_valid(kv->key, (size_t)klen) || memchr(kv->key, 0, (size_t)klen))
        return bad(err, "a metadata key is empty, too long or not UTF-8%s", "");
    kv->key_len = (size_t)klen;
    if (take_u32(c, &kv->type) || kv->type >= GGUF_TYPE_COUNT)
        return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' has an unknown type", (int)(klen > 200 ? 200 : klen),
                            kv->key);
    kv->n = 1;
    if (kv->type == GGUF_ARRAY) {
        if (take_u32(c, &kv->arr_type) || take_u64(c, &kv->n) || kv->arr_type >= GGUF_TYPE_COUNT || kv->arr_type == GGUF_ARRAY)
            return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' is a bad array",
                                (int)(klen > 200 ? 200 : klen), kv->key);
        uint64_t el = scalar_size(kv->arr_type);
        if (kv->arr_type != GGUF_STRING && (el == 0 || kv->n > (uint64_t)(c->end - c->p) / el))
            return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' is longer than the file",
                                (int)(klen > 200 ? 200 : klen), kv->key);
        kv->val = c->p;
        for (uint64_t i = 0; i < kv->n; i++)
            if (skip_value(c, kv->arr_type))
                return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' has a bad element",
                                    (int)(klen > 200 ? 200 : klen), kv->key);
        return GF_OK;
    }
    kv->val = c->p;
    if (skip_value(c, kv->type))
        return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' has a bad value", (int)(klen > 200 ? 200 : klen),
                            kv->key);
    return GF_OK;
}

static GfStatus read_tensor(Cursor *c, GgufTensor *t, GfError *err) {
    const char *name;
    uint64_t len;
    if (take_str(c, &name, &len)) return bad(err, "the tensor infos are cut short%s", "");
    if (len == 0 || len > NAME_MAX_BYTES || !gf_utf8_valid(name, (size_t)len) || memchr(name, 0, (size_t)len))
        return bad(err, "a tensor name is empty, too long or not UTF-8%s", "");
    if (!(t->name = gf_malloc((size_t)len + 1, err))) return GF_NO_MEMORY;
    memcpy(t->name, name, (size_t)len);
    t->name[len] = '\0';
    uint32_t type;
    if (take_u32(c, &t->n_dims) || t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return bad(err, "tensor '%.200s' has a bad number of dims", t->name);
    uint64_t n = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++)
        if (take_u64(c, &t->ne[d]) || t->ne[d] == 0 || gf_mul_u64(n, t->ne[d], &n))
            return bad(err, "tensor '%.200s' has a bad shape", t->name);
    if (take_u32(c, &type) || !known_type(type)) return bad(err, "tensor '%.200s' has an unsupported type", t->name);
    t->type = (GgmlType)type;
    if (t->ne[0] % (uint64_t)ggml_type_block(t->type))
        return bad(err, "tensor '%.200s': its first dim is not a multiple of its type's block", t->name);
    if (n > UINT64_MAX / 4) return bad(err, "tensor '%.200s' is too large", t->name);
    t->n_bytes = ggml_type_bytes(t->type, n);
    if (take_u64(c, &t->offset)) return bad(err, "tensor '%.200s' has no offset", t->name);
    return GF_OK;
}

static int by_offset(const void *a, const void *b) {
    const GgufTensor *x = *(GgufTensor *const *)a, *y = *(GgufTensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int by_name(const void *a, const void *b) {
    return strcmp((*(GgufTensor *const *)a)->name, (*(GgufTensor *const *)b)->name);
}

static GfStatus check_layout(Gguf *g, GfError *err) {
    GgufTensor **order = gf_malloc((g->n_tensors ? g->n_tensors : 1) * sizeof *order, err);
    if (!order) return GF_NO_MEMORY;
    for (size_t i = 0; i < g->n_tensors; i++) order[i] = &g->tensors[i];
    qsort(order, g->n_tensors, sizeof *order, by_offset);
    GfStatus s = GF_OK;
    uint64_t end = 0;
    for (size_t i = 0; !s && i < g->n_tensors; i++) {
        GgufTensor *t = order[i];
        if (t->offset % g->alignment) s = bad(err, "tensor '%.200s' is not aligned", t->name);
        else if (t->offset < end) s = bad(err, "tensor '%.200s' overlaps another", t->name);
        else if (t->offset > g->data_size || t->n_bytes > g->data_size - t->offset)
            s = bad(err, "tensor '%.200s' extends past the end of the file", t->name);
        else {
            end = t->offset + t->n_bytes;
            t->data = g->data + t->offset;
        }
    }
    qsort(order, g->n_tensors, sizeof *order, by_name);
    for (size_t i = 1; !s && i < g->n_tensors; i++)
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) s = bad(err, "tensor '%.200s' appears twice", order[i]->name);
    free(order);
    return s;
}

static int key_is(const GgufKv *kv, const char *key) {
    return kv->key_len == strlen(key) && memcmp(kv->key, key, kv->key_len) == 0;
}

static GfStatus read_header(Cursor *c, Gguf *g, uint64_t n_kv, GfError *err) {
    for (uint64_t i = 0; i < n_kv; i++) {
        GfStatus s = read_kv(c, &g->kv[g->n_kv], err);
        if (s) return s;
        const GgufKv *kv = &g->kv[g->n_kv];
        for (size_t j = 0; j < g->n_kv; j++)
            if (g->kv[j].key_len == kv->key_len && memcmp(g->kv[j].key, kv->key, kv->key_len) == 0)
                return gf_error_set(err, GF_INVALID, "invalid_gguf", NULL, "metadata '%.*s' appears twice",
                                    (int)(kv->key_len > 200 ? 200 : kv->key_len), kv->key);
        g->n_kv++;
        if (key_is(kv, "general.alignment")) {
            uint32_t a;
            if (!gguf_get_u32(kv, &a) || a == 0 || (a & (a - 1)) || a > 65536)
                return bad(err, "general.alignment must be a power of two up to 65,536%s", "");
            g->alignment = a;
        }
    }
    return GF_OK;
}

GfStatus gguf_parse(const uint8_t *bytes, uint64_t size, Gguf *g, GfError *err) {
    memset(g, 0, sizeof *g);
    Cursor c = {bytes, bytes + size, err};
    const uint8_t *magic;
    uint64_t n_tensors, n_kv;
    if (take(&c, 4, &magic) || memcmp(magic, GGUF_MAGIC, 4) != 0) return bad(err, "not a GGUF file (no GGUF magic)%s", "");
    if (take_u32(&c, &g->version) || g->version != 3) return bad(err, "only GGUF version 3 is supported%s", "");
    if (take_u64(&c, &n_tensors) || take_u64(&c, &n_kv)) return bad(err, "the header is cut short%s", "");
    /* every metadata entry takes at least 13 bytes and every tensor info 28 */
    if (n_kv > size / 13 || n_tensors > size / 28) return bad(err, "the header counts more entries than the file holds%s", "");
    if (n_kv > 65536) return bad(err, "more than 65,536 metadata entries%s", "");
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    g->kv = gf_calloc(n_kv ? n_kv : 1, sizeof *g->kv, err);
    g->tensors = gf_calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors, err);
    GfStatus s = g->kv && g->tensors ? read_header(&c, g, n_kv, err) : GF_NO_MEMORY;
    for (uint64_t i = 0; !s && i < n_tensors; i++) {
        s = read_tensor(&c, &g->tensors[i], err);
        g->n_tensors = (size_t)i + 1;
    }
    if (!s) {
        uint64_t pos = (uint64_t)(c.p - bytes), start = (pos + g->alignment - 1) / g->alignment * g->alignment;
        if (start > size) s = bad(err, "the file ends before its tensor data%s", "");
        else {
            g->data = bytes + start;
            g->data_size = size - start;
            s = check_layout(g, err);
        }
    }
    if (s) gguf_close(g);
    return s;
}

GfStatus gguf_open(const char *path, Gguf *g, GfError *err) {
    memset(g, 0, sizeof *g);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int e = errno;
        if (fd >= 0) close(fd);
        return gf_error_set(err, e == ENOENT ? GF_NOT_FOUND : GF_IO, "io_error", NULL, "cannot open the GGUF file (%s)", strerror(e));
    }
    if (st.st_size == 0) {
        close(fd);
        return bad(err, "the GGUF file is empty%s", "");
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot map the GGUF file (%s)", strerror(errno));
    GfStatus s = gguf_parse(map, (uint64_t)st.st_size, g, err);
    if (s) { munmap(map, (size_t)st.st_size); return s; }
    g->map = map;
    g->map_size = (size_t)st.st_size;
    return GF_OK;
}

void gguf_close(Gguf *g) {
    for (size_t i = 0; g->tensors && i < g->n_tensors; i++) free(g->tensors[i].name);
    free(g->tensors);
    free(g->kv);
    if (g->map) munmap(g->map, g->map_size);
    memset(g, 0, sizeof *g);
}

const GgufKv *gguf_find(const Gguf *g, const char *key) {
    for (size_t i = 0; i < g->n_kv; i++)
        if (key_is(&g->kv[i], key)) return &g->kv[i];
    return NULL;
}

const GgufTensor *gguf_tensor(const Gguf *g, const char *name) {
    for (size_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return &g->tensors[i];
    return NULL;
}

int gguf_get_u32(const GgufKv *kv, uint32_t *out) {
    if (!kv || kv->type != GGUF_U32) return 0;
    memcpy(out, kv->val, 4);
    return 1;
}

int gguf_get_f32(const GgufKv *kv, float *out) {
    if (!kv || kv->type != GGUF_F32) return 0;
    memcpy(out, kv->val, 4);
    return 1;
}

const char *gguf_get_str(const GgufKv *kv, uint64_t *len) {
    if (!kv || kv->type != GGUF_STRING) return NULL;
    memcpy(len, kv->val, 8);
    return (const char *)kv->val + 8;
}

const char *gguf_arr_str(const GgufKv *kv, uint64_t i, uint64_t *len) {
    if (!kv || kv->type != GGUF_ARRAY || kv->arr_type != GGUF_STRING || i >= kv->n) return NULL;
    const uint8_t *p = kv->val;
    for (uint64_t k = 0;; k++) {
        memcpy(len, p, 8);
        if (k == i) return (const char *)p + 8;
        p += 8 + *len;
    }
}

/* ---- writing ------------------------------------------------------------ */

typedef struct {
    char *name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    GgmlType type;
    uint64_t offset, n_bytes;
} WTensor;

struct GgufWriter {
    uint8_t *meta;               /* the metadata entries, serialized */
    size_t meta_len, meta_cap;
    uint64_t n_kv;
    WTensor *tensors;
    size_t n_tensors, cap_tensors;
    uint64_t data_size;
    int failed;                  /* an allocation failed while collecting */
    int fd;
    size_t cur;                  /* the tensor being put */
    uint64_t cur_done;
    char path[4096], tmp[4112];
};

static void meta_put(GgufWriter *w, const void *p, size_t n) {
    if (w->failed) return;
    if (w->meta_len + n > w->meta_cap) {
        size_t cap = w->meta_cap ? w->meta_cap : 4096;
        while (cap < w->meta_len + n) cap *= 2;
        uint8_t *m = gf_realloc(w->meta, cap, NULL);
        if (!m) { w->failed = 1; return; }
        w->meta = m;
        w->meta_cap = cap;
    }
    memcpy(w->meta + w->meta_len, p, n);
    w->meta_len += n;
}

static void meta_u32(GgufWriter *w, uint32_t v) { meta_put(w, &v, 4); }
static void meta_u64(GgufWriter *w, uint64_t v) { meta_put(w, &v, 8); }
static void meta_str(GgufWriter *w, const char *s, size_t n) { meta_u64(w, n); meta_put(w, s, n); }

static void kv_head(GgufWriter *w, const char *key, uint32_t type) {
    meta_str(w, key, strlen(key));
    meta_u32(w, type);
    w->n_kv++;
}

GgufWriter *gguf_writer_new(GfError *err) {
    GgufWriter *w = gf_calloc(1, sizeof *w, err);
    if (w) w->fd = -1;
    return w;
}

void gguf_writer_free(GgufWriter *w) {
    if (!w) return;
    if (w->fd >= 0) {
        close(w->fd);
        unlink(w->tmp);
    }
    for (size_t i = 0; i < w->n_tensors; i++) free(w->tensors[i].name);
    free(w->tensors);
    free(w->meta);
    free(w);
}

void gguf_kv_u32(GgufWriter *w, const char *key, uint32_t v) { kv_head(w, key, GGUF_U32); meta_u32(w, v); }
void gguf_kv_i32(GgufWriter *w, const char *key, int32_t v) { kv_head(w, key, GGUF_I32); meta_put(w, &v, 4); }
void gguf_kv_f32(GgufWriter *w, const char *key, float v) { kv_head(w, key, GGUF_F32); meta_put(w, &v, 4); }

void gguf_kv_bool(GgufWriter *w, const char *key, int v) {
    uint8_t b = v ? 1 : 0;
    kv_head(w, key, GGUF_BOOL);
    meta_put(w, &b, 1);
}

void gguf_kv_str(GgufWriter *w, const char *key, const char *v, size_t len) {
    kv_head(w, key, GGUF_STRING);
    meta_str(w, v, len);
}

static void arr_head(GgufWriter *w, const char *key, uint32_t type, uint64_t n) {
    kv_head(w, key, GGUF_ARRAY);
    meta_u32(w, type);
    meta_u64(w, n);
}

void gguf_kv_arr_i32(GgufWriter *w, const char *key, const int32_t *v, uint64_t n) {
    arr_head(w, key, GGUF_I32, n);
    meta_put(w, v, (size_t)n * 4);
}

void gguf_kv_arr_f32(GgufWriter *w, const char *key, const float *v, uint64_t n) {
    arr_head(w, key, GGUF_F32, n);
    meta_put(w, v, (size_t)n * 4);
}

void gguf_kv_arr_bool(GgufWriter *w, const char *key, const uint8_t *v, uint64_t n) {
    arr_head(w, key, GGUF_BOOL, n);
    for (uint64_t i = 0; i < n; i++) {
        uint8_t b = v[i] ? 1 : 0;
        meta_put(w, &b, 1);
    }
}

void gguf_kv_arr_str(GgufWriter *w, const char *key, const char *const *strs, const size_t *lens, uint64_t n) {
    arr_head(w, key, GGUF_STRING, n);
    for (uint64_t i = 0; i < n; i++) meta_str(w, strs[i], lens[i]);
}

static uint64_t align_up(uint64_t x) { return (x + GGUF_DEFAULT_ALIGNMENT - 1) / GGUF_DEFAULT_ALIGNMENT * GGUF_DEFAULT_ALIGNMENT; }

GfStatus gguf_add_tensor(GgufWriter *w, const char *name, uint32_t n_dims, const uint64_t *ne, GgmlType t, GfError *err) {
    uint64_t n = 1;
    for (uint32_t d = 0; d < n_dims; d++) n *= ne[d];
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS || !known_type(t) || ne[0] % (uint64_t)ggml_type_block(t))
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "tensor %s cannot be stored as %s", name, ggml_type_name(t));
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 64;
        WTensor *v = gf_realloc(w->tensors, cap * sizeof *v, err);
        if (!v) return GF_NO_MEMORY;
        w->tensors = v;
        w->cap_tensors = cap;
    }
    WTensor *x = &w->tensors[w->n_tensors];
    memset(x, 0, sizeof *x);
    if (!(x->name = gf_strdup(name, err))) return GF_NO_MEMORY;
    x->n_dims = n_dims;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) x->ne[d] = d < n_dims ? ne[d] : 1;
    x->type = t;
    x->offset = w->data_size;
    x->n_bytes = ggml_type_bytes(t, n);
    w->data_size = align_up(w->data_size + x->n_bytes);
    w->n_tensors++;
    return GF_OK;
}

static GfStatus writer_fail(GgufWriter *w, int e, GfError *err) {
    if (w->fd >= 0) {
        close(w->fd);
        unlink(w->tmp);
        w->fd = -1;
    }
    int full = e == ENOSPC || e == EDQUOT;
    return gf_error_set(err, full ? GF_NO_SPACE : GF_IO, full ? "insufficient_storage" : "io_error", NULL,
                        "cannot write the GGUF file (%s)", strerror(e));
}

static const uint8_t ZEROS[GGUF_DEFAULT_ALIGNMENT];

GfStatus gguf_writer_open(GgufWriter *w, const char *path, GfError *err) {
    if (w->failed) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    if (strlen(path) >= sizeof w->path) return gf_error_set(err, GF_INVALID, "invalid_path", NULL, "the output path is too long");
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp-XXXXXX", path);
    w->fd = mkstemp(w->tmp);
    if (w->fd < 0) return writer_fail(w, errno, err);
    uint8_t head[24];
    memcpy(head, GGUF_MAGIC, 4);
    uint32_t version = 3;
    uint64_t n_tensors = w->n_tensors;
    memcpy(head + 4, &version, 4);
    memcpy(head + 8, &n_tensors, 8);
    memcpy(head + 16, &w->n_kv, 8);
    uint64_t pos = 24 + w->meta_len;
    int bad_io = fchmod(w->fd, 0644) != 0 || gf_write_all(w->fd, head, 24) || gf_write_all(w->fd, w->meta, w->meta_len);
    for (size_t i = 0; !bad_io && i < w->n_tensors; i++) {
        const WTensor *t = &w->tensors[i];
        uint64_t len = strlen(t->name);
        uint32_t type = t->type;
        bad_io = gf_write_all(w->fd, &len, 8) || gf_write_all(w->fd, t->name, len) || gf_write_all(w->fd, &t->n_dims, 4) ||
                 gf_write_all(w->fd, t->ne, 8ull * t->n_dims) || gf_write_all(w->fd, &type, 4) || gf_write_all(w->fd, &t->offset, 8);
        pos += 8 + len + 4 + 8ull * t->n_dims + 4 + 8;
    }
    if (!bad_io) bad_io = gf_write_all(w->fd, ZEROS, align_up(pos) - pos);
    if (bad_io) return writer_fail(w, errno, err);
    w->cur = 0;
    w->cur_done = 0;
    return GF_OK;
}

/* Pads after every finished tensor, moving to the next. */
static GfStatus finish_tensors(GgufWriter *w, GfError *err) {
    while (w->cur < w->n_tensors && w->cur_done == w->tensors[w->cur].n_bytes) {
        const WTensor *t = &w->tensors[w->cur];
        uint64_t pad = align_up(t->offset + t->n_bytes) - (t->offset + t->n_bytes);
        if (gf_write_all(w->fd, ZEROS, pad)) return writer_fail(w, errno, err);
        w->cur++;
        w->cur_done = 0;
    }
    return GF_OK;
}

GfStatus gguf_put(GgufWriter *w, const void *bytes, uint64_t n, GfError *err) {
    const uint8_t *p = bytes;
    while (n > 0) {
        GfStatus s = finish_tensors(w, err);
        if (s) return s;
        if (w->cur == w->n_tensors) {
            writer_fail(w, EIO, err);
            return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "more tensor bytes than the GGUF header announced");
        }
        uint64_t room = w->tensors[w->cur].n_bytes - w->cur_done, k = n < room ? n : room;
        if (gf_write_all(w->fd, p, k)) return writer_fail(w, errno, err);
        w->cur_done += k;
        p += k;
        n -= k;
    }
    return finish_tensors(w, err);
}

GfStatus gguf_commit(GgufWriter *w, GfError *err) {
    GfStatus s = finish_tensors(w, err);
    if (s) return s;
    if (w->cur != w->n_tensors) {
        writer_fail(w, EIO, err);
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "fewer tensor bytes than the GGUF header announced");
    }
    if (fsync(w->fd) != 0) return writer_fail(w, errno, err);
    int e = close(w->fd) != 0 ? errno : 0;
    w->fd = -1;
    if (!e && rename(w->tmp, w->path) != 0) e = errno;
    if (e) {
        unlink(w->tmp);
        return writer_fail(w, e, err);
    }
    return GF_OK;
}

/* ---- quantization ------------------------------------------------------- */

void gguf_quantize_q8_0(const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0, out += 34) {
        float amax = 0;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h = kn_f32_to_f16(d);
        memcpy(out, &h, 2);
        for (int j = 0; j < QK8_0; j++) out[2 + j] = (uint8_t)(int8_t)roundf(x[j] * id);
    }
}

void gguf_quantize_q4_0(const float *x, int64_t n, uint8_t *out) {
    for (int64_t b = 0; b < n / QK4_0; b++, x += QK4_0, out += 18) {
        float amax = 0, max = 0;
        for (int j = 0; j < QK4_0; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -8.0f, id = d != 0 ? 1.0f / d : 0.0f;
        uint16_t h = kn_f32_to_f16(d);
        memcpy(out, &h, 2);
        for (int j = 0; j < QK4_0 / 2; j++) {
            int8_t q0 = (int8_t)(x[j] * id + 8.5f), q1 = (int8_t)(x[QK4_0 / 2 + j] * id + 8.5f);
            uint8_t a = (uint8_t)(q0 < 15 ? q0 : 15), c = (uint8_t)(q1 < 15 ? q1 : 15);
            out[2 + j] = (uint8_t)(a | (c << 4));
        }
    }
}
