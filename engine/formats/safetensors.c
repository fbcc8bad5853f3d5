/* safetensors.c - strict safetensors header validation and mmap loading. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "jsoncheck.h"

static const struct { const char *name; size_t size; } DTYPES[ST_DTYPE_COUNT] = {
    [ST_F64] = {"F64", 8}, [ST_F32] = {"F32", 4}, [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I64] = {"I64", 8}, [ST_I32] = {"I32", 4},
    [ST_I16] = {"I16", 2}, [ST_I8] = {"I8", 1}, [ST_U8] = {"U8", 1},
    [ST_BOOL] = {"BOOL", 1}, [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E5M2] = {"F8_E5M2", 1},
    [ST_U16] = {"U16", 2}, [ST_U32] = {"U32", 4}, [ST_U64] = {"U64", 8}};

size_t safetensors_dtype_size(StDtype d) { return d < ST_DTYPE_COUNT ? DTYPES[d].size : 0; }
const char *safetensors_dtype_name(StDtype d) { return d < ST_DTYPE_COUNT ? DTYPES[d].name : "?"; }

void safetensors_shape_str(const uint64_t *shape, int n_dims, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < n_dims && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %llu" : "%llu", (unsigned long long)shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

static GfStatus bad(GfError *err, const char *fmt, const char *name) {
    return gf_error_set(err, GF_INVALID, "invalid_safetensors", NULL, fmt, name ? name : "");
}

/* A JSON number that is a non-negative integer exactly representable. */
static int as_u64(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d < 0 || d > 9007199254740992.0 || floor(d) != d) return -1;
    *out = (uint64_t)d;
    return 0;
}

static GfStatus parse_dtype(const cJSON *v, StDtype *out) {
    if (!cJSON_IsString(v)) return GF_INVALID;
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(v->valuestring, DTYPES[i].name) == 0) { *out = (StDtype)i; return GF_OK; }
    return GF_INVALID;
}

static GfStatus parse_entry(const cJSON *e, StTensor *t, GfError *err) {
    const char *name = e->string;
    if (!cJSON_IsObject(e)) return bad(err, "tensor '%.128s': entry is not an object", name);
    if (strlen(name) == 0 || strlen(name) > ST_NAME_MAX)
        return bad(err, "tensor name '%.128s' is empty or too long", name);
    int n_keys = cJSON_GetArraySize(e);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!dt || !sh || !off || n_keys != 3)
        return bad(err, "tensor '%.128s': needs exactly dtype, shape and data_offsets", name);
    if (parse_dtype(dt, &t->dtype)) return bad(err, "tensor '%.128s': unknown dtype", name);
    if (!cJSON_IsArray(sh) || cJSON_GetArraySize(sh) > ST_MAX_DIMS)
        return bad(err, "tensor '%.128s': shape must be an array of at most 8 sizes", name);
    t->n_dims = 0;
    uint64_t numel = 1;
    for (const cJSON *d = sh->child; d; d = d->next) {
        uint64_t v;
        if (as_u64(d, &v)) return bad(err, "tensor '%.128s': shape holds a non-integer", name);
        t->shape[t->n_dims++] = v;
        if (gf_mul_u64(numel, v, &numel)) return bad(err, "tensor '%.128s': shape overflows", name);
    }
    t->n_elements = numel;
    if (gf_mul_u64(numel, DTYPES[t->dtype].size, &t->n_bytes))
        return bad(err, "tensor '%.128s': byte size overflows", name);
    uint64_t begin, end;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || as_u64(off->child, &begin) ||
        as_u64(off->child->next, &end))
        return bad(err, "tensor '%.128s': data_offsets must be two non-negative integers", name);
    if (end < begin) return bad(err, "tensor '%.128s': data_offsets end before begin", name);
    if (end - begin != t->n_bytes)
        return bad(err, "tensor '%.128s': data_offsets span does not match dtype x shape", name);
    t->offset = begin;
    return GF_OK;
}

static int cmp_offset(const void *a, const void *b) {
    const StTensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->n_bytes < y->n_bytes ? -1 : x->n_bytes > y->n_bytes;
}

/* Sorted by offset, tensors must tile [0, buffer_size) with no hole or overlap. */
static GfStatus check_layout(SafeTensors *st, GfError *err) {
    qsort(st->tensors, st->n_tensors, sizeof *st->tensors, cmp_offset);
    uint64_t expect = 0;
    for (size_t i = 0; i < st->n_tensors; i++) {
        StTensor *t = &st->tensors[i];
        if (t->offset != expect)
            return bad(err, t->offset < expect ? "tensor '%.128s' overlaps the previous tensor"
                                               : "hole in the data buffer before tensor '%.128s'",
                       t->name);
        if (t->n_bytes == 0 && i + 1 < st->n_tensors && st->tensors[i + 1].offset == t->offset &&
            st->tensors[i + 1].n_bytes > 0)
            return bad(err, "zero-size tensor '%.128s' shares the offset of another tensor", t->name);
        expect = t->offset + t->n_bytes;
        t->data = st->buffer + t->offset;
    }
    if (expect != st->buffer_size)
        return bad(err, expect < st->buffer_size ? "trailing bytes after the last tensor%s"
                                                 : "tensors extend past the end of the file%s", "");
    return GF_OK;
}

static GfStatus check_metadata(const cJSON *m, GfError *err) {
    if (!cJSON_IsObject(m)) return bad(err, "__metadata__ must be an object%s", "");
    for (const cJSON *c = m->child; c; c = c->next)
        if (!cJSON_IsString(c)) return bad(err, "__metadata__ value '%.128s' is not a string", c->string);
    return GF_OK;
}

static GfStatus parse_table(const cJSON *root, SafeTensors *st, GfError *err) {
    size_t n = 0;
    for (const cJSON *e = root->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0) n++;
    st->tensors = gf_calloc(n, sizeof *st->tensors, err);
    if (!st->tensors) return GF_NO_MEMORY;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (check_metadata(e, err)) return GF_INVALID;
            continue;
        }
        StTensor *t = &st->tensors[st->n_tensors];
        if (parse_entry(e, t, err)) return GF_INVALID;
        if (!(t->name = gf_strdup(e->string, err))) return GF_NO_MEMORY;
        st->n_tensors++;
    }
    return check_layout(st, err);
}

GfStatus safetensors_parse(const uint8_t *bytes, uint64_t size, SafeTensors *st, GfError *err) {
    memset(st, 0, sizeof *st);
    if (size < 8) return bad(err, "file is shorter than the 8-byte header length%s", "");
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | bytes[i];
    if (n > ST_HEADER_MAX) return bad(err, "header length is over 100 MB%s", "");
    if (n + 8 > size) return bad(err, "header length runs past the end of the file%s", "");
    if (n < 2 || bytes[8] != '{') return bad(err, "header does not start with '{'%s", "");
    GfError jerr;
    cJSON *root = json_parse_strict((const char *)bytes + 8, (size_t)n, "safetensors header", &jerr);
    if (!root) return json_error(err, &jerr, GF_INVALID, "invalid_safetensors", NULL);
    st->buffer = bytes + 8 + n;
    st->buffer_size = size - 8 - n;
    GfStatus rc = cJSON_IsObject(root) ? parse_table(root, st, err)
                                       : bad(err, "header is not a JSON object%s", "");
    cJSON_Delete(root);
    if (rc) safetensors_close(st);
    return rc;
}

GfStatus safetensors_open(const char *path, const char *what, SafeTensors *st, GfError *err) {
    memset(st, 0, sizeof *st);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return gf_error_set(err, errno == ENOENT ? GF_NOT_FOUND : GF_IO, "file_not_found", NULL,
                            "%s: cannot open (%s)", what, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return gf_error_set(err, GF_IO, "io_error", NULL, "%s: not a regular file", what);
    }
    void *map = NULL;
    if (sb.st_size > 0) {
        map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            close(fd);
            return gf_error_set(err, GF_IO, "io_error", NULL, "%s: mmap failed (%s)", what, strerror(errno));
        }
    }
    close(fd);
    static const uint8_t empty[1];
    GfStatus rc = safetensors_parse(map ? map : empty, (uint64_t)sb.st_size, st, err);
    if (rc) {
        if (map) munmap(map, (size_t)sb.st_size);
        char inner[GF_ERR_MSG_MAX];
        snprintf(inner, sizeof inner, "%s", err ? err->message : "");
        if (err) snprintf(err->message, sizeof err->message, "%.100s: %.400s", what, inner);
        return rc;
    }
    st->map = map;
    st->map_size = (size_t)sb.st_size;
    return GF_OK;
}

void safetensors_close(SafeTensors *st) {
    if (!st) return;
    for (size_t i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
    free(st->tensors);
    if (st->map) munmap(st->map, st->map_size);
    memset(st, 0, sizeof *st);
}

const StTensor *safetensors_find(const SafeTensors *st, const char *name) {
    for (size_t i = 0; i < st->n_tensors; i++)
        if (strcmp(st->tensors[i].name, name) == 0) return &st->tensors[i];
    return NULL;
}

/* ---- writing -------------------------------------------------------------- */

static uint64_t write_nbytes(const StWriteTensor *t) {
    uint64_t n = safetensors_dtype_size(t->dtype);
    for (int i = 0; i < t->n_dims; i++) n *= t->shape[i];
    return n;
}

static char *write_header(const StWriteTensor *tensors, size_t n, const char *format, uint64_t *len,
                          uint64_t *data_len) {
    cJSON *root = cJSON_CreateObject();
    if (format) cJSON_AddStringToObject(cJSON_AddObjectToObject(root, "__metadata__"), "format", format);
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        const StWriteTensor *t = &tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, t->name), *shape = cJSON_AddArrayToObject(e, "shape");
        cJSON_AddStringToObject(e, "dtype", safetensors_dtype_name(t->dtype));
        for (int d = 0; d < t->n_dims; d++) cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)t->shape[d]));
        cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
        uint64_t nb = write_nbytes(t);
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + nb)));
        off += nb;
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return NULL;
    size_t raw = strlen(text), padded = (raw + 7) & ~(size_t)7;
    char *out = gf_realloc(text, padded + 1, NULL);
    if (!out) { free(text); return NULL; }
    memset(out + raw, ' ', padded - raw);
    out[padded] = '\0';
    *len = padded;
    *data_len = off;
    return out;
}

static GfStatus writer_io_error(StWriter *w, int e, GfError *err) {
    st_writer_abort(w);
    return gf_error_set(err, e == ENOSPC || e == EDQUOT ? GF_NO_SPACE : GF_IO,
                        e == ENOSPC || e == EDQUOT ? "insufficient_storage" : "io_error", NULL,
                        "cannot write the output file (%s)", strerror(e));
}

GfStatus st_writer_open(StWriter *w, const char *path, const StWriteTensor *tensors, size_t n, const char *format,
                        GfError *err) {
    memset(w, 0, sizeof *w);
    w->fd = -1;
    if (strlen(path) >= sizeof w->path)
        return gf_error_set(err, GF_INVALID, "invalid_path", NULL, "the output path is too long");
    uint64_t hlen;
    char *header = write_header(tensors, n, format, &hlen, &w->remaining);
    if (!header) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    snprintf(w->path, sizeof w->path, "%s", path);
    snprintf(w->tmp, sizeof w->tmp, "%s.tmp-XXXXXX", path);
    w->fd = mkstemp(w->tmp);
    int bad = w->fd < 0 || fchmod(w->fd, 0644) != 0;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(hlen >> (8 * i));
    if (!bad) bad = gf_write_all(w->fd, len8, 8) || gf_write_all(w->fd, header, hlen);
    int e = errno;
    free(header);
    if (bad) {
        if (w->fd < 0) w->tmp[0] = '\0';
        return writer_io_error(w, e, err);
    }
    return GF_OK;
}

GfStatus st_writer_put(StWriter *w, const void *bytes, uint64_t n, GfError *err) {
    if (n > w->remaining) {
        st_writer_abort(w);
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "more tensor bytes than the header announced");
    }
    if (gf_write_all(w->fd, bytes, n)) return writer_io_error(w, errno, err);
    w->remaining -= n;
    return GF_OK;
}

GfStatus st_writer_commit(StWriter *w, GfError *err) {
    if (w->remaining) {
        st_writer_abort(w);
        return gf_error_set(err, GF_INTERNAL, "internal_error", NULL, "fewer tensor bytes than the header announced");
    }
    if (fsync(w->fd) != 0) return writer_io_error(w, errno, err);
    int e = close(w->fd) != 0 ? errno : 0;
    w->fd = -1;
    if (!e && rename(w->tmp, w->path) != 0) e = errno;
    if (e) return writer_io_error(w, e, err);
    w->tmp[0] = '\0';
    return GF_OK;
}

void st_writer_abort(StWriter *w) {
    if (w->fd >= 0) close(w->fd);
    w->fd = -1;
    if (w->tmp[0]) unlink(w->tmp);
    w->tmp[0] = '\0';
}

GfStatus safetensors_write(const char *path, const StWriteTensor *tensors, size_t n, GfError *err) {
    StWriter w;
    GfStatus s = st_writer_open(&w, path, tensors, n, NULL, err);
    for (size_t i = 0; !s && i < n; i++) s = st_writer_put(&w, tensors[i].data, write_nbytes(&tensors[i]), err);
    return s ? s : st_writer_commit(&w, err);
}
