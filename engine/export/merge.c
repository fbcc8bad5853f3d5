/* merge.c - W' = W + scale * B A into a new, complete model directory. */
#include "merge.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "convert.h"
#include "jsoncheck.h"
#include "lora.h"
#include "modeldir.h"
#include "safetensors.h"

#define BLOCK_BYTES (4u << 20)      /* output bytes per block written */
#define COPY_MAX (1ull << 30)       /* largest configuration file copied */

/* One tensor of the output: where it comes from and what it becomes. */
typedef struct {
    const StTensor *src;
    StDtype dtype;              /* output dtype */
    uint64_t n_bytes;           /* output bytes */
    const LoraPair *pair;       /* the adapter's term, or NULL: copied */
    int shard;
} Item;

typedef struct {
    const MergeOptions *o;
    MergeReport *r;
    ModelDir md;
    LoraAdapter *adapter;
    Item *items;
    size_t n_items;
    int n_shards;
    uint64_t total, done;       /* tensor data bytes to write, written */
    uint64_t file_bytes;        /* configuration files to copy */
    char tmp[4400];             /* the temporary output directory, "" when none */
    float *row;                 /* [largest merged input width] */
    uint8_t *block;             /* [BLOCK_BYTES] */
} Merge;

static int is_float(StDtype d) { return d == ST_F32 || d == ST_BF16 || d == ST_F16; }

static KnDtype kn_dtype(StDtype d) { return d == ST_F32 ? KN_F32 : d == ST_BF16 ? KN_BF16 : KN_F16; }

/* ---- the plan ----------------------------------------------------------- */

const LoraPair *merge_pair_for(const LoraAdapter *a, const char *tensor) {
    size_t n = strlen(tensor);
    if (n < 8 || strcmp(tensor + n - 7, ".weight") != 0) return NULL;
    for (size_t i = 0; i < a->n_pairs; i++)
        if (strlen(a->pairs[i].module) == n - 7 && strncmp(a->pairs[i].module, tensor, n - 7) == 0) return &a->pairs[i];
    return NULL;
}

static GfStatus plan(Merge *m, GfError *err) {
    m->items = gf_calloc(m->md.n_tensors ? m->md.n_tensors : 1, sizeof *m->items, err);
    if (!m->items) return GF_NO_MEMORY;
    uint64_t cap = m->o->max_shard_bytes ? m->o->max_shard_bytes : MERGE_SHARD_BYTES_DEFAULT, in_shard = 0;
    size_t n_paired = 0;
    for (size_t s = 0; s < m->md.n_shards; s++)
        for (size_t i = 0; i < m->md.shards[s].n_tensors; i++) {
            const StTensor *t = &m->md.shards[s].tensors[i];
            Item *it = &m->items[m->n_items++];
            it->src = t;
            it->dtype = m->o->dtype >= 0 && is_float(t->dtype) ? (StDtype)m->o->dtype : t->dtype;
            it->n_bytes = t->n_elements * safetensors_dtype_size(it->dtype);
            it->pair = merge_pair_for(m->adapter, t->name);
            if (it->pair) {
                n_paired++;
                if (t->n_dims != 2 || !is_float(t->dtype) || (int64_t)t->shape[0] != it->pair->out ||
                    (int64_t)t->shape[1] != it->pair->in)
                    return gf_error_set(err, GF_INVALID, "adapter_incompatible", NULL,
                                        "the adapter's module %s does not fit the base tensor %s", it->pair->module, t->name);
            }
            if (m->n_shards == 0 || (in_shard && in_shard + it->n_bytes > cap)) {
                m->n_shards++;
                in_shard = 0;
            }
            in_shard += it->n_bytes;
            it->shard = m->n_shards - 1;
            m->total += it->n_bytes;
        }
    if (n_paired != m->adapter->n_pairs)
        return gf_error_set(err, GF_INVALID, "adapter_incompatible", NULL,
                            "%zu of the adapter's %zu modules have no weight in the base", m->adapter->n_pairs - n_paired,
                            m->adapter->n_pairs);
    if (m->n_shards > 99999)
        return gf_error_set(err, GF_INVALID, "invalid_argument", "max_shard_bytes", "more than 99,999 shards");
    return GF_OK;
}

/* ---- the output directory ------------------------------------------------- */

static void split_out(const char *out, char *parent, size_t pcap, char *base, size_t bcap) {
    char tmp[4096];
    gf_strlcpy(tmp, out, sizeof tmp);
    size_t n = strlen(tmp);
    while (n > 1 && tmp[n - 1] == '/') tmp[--n] = '\0';
    char *slash = strrchr(tmp, '/');
    if (!slash) { gf_strlcpy(parent, ".", pcap); gf_strlcpy(base, tmp, bcap); return; }
    gf_strlcpy(base, slash + 1, bcap);
    if (slash == tmp) gf_strlcpy(parent, "/", pcap);
    else { *slash = '\0'; gf_strlcpy(parent, tmp, pcap); }
}

/* Removes a flat directory this merge created (its files, then itself). */
static void remove_flat(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        char path[4400];
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                unlink(path);
            }
        closedir(d);
    }
    rmdir(dir);
}

/* Leftovers of an earlier merge to the same name that did not finish. */
static void remove_stale(const char *parent, const char *base) {
    char prefix[400], path[4400];
    snprintf(prefix, sizeof prefix, ".%s.partial-", base);
    DIR *d = opendir(parent);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0 && strlen(e->d_name) == strlen(prefix) + 6) {
            snprintf(path, sizeof path, "%s/%s", parent, e->d_name);
            remove_flat(path);
        }
    closedir(d);
}

static GfStatus io_error(GfError *err, int e, const char *what) {
    int full = e == ENOSPC || e == EDQUOT;
    return gf_error_set(err, full ? GF_NO_SPACE : GF_IO, full ? "insufficient_storage" : "io_error", NULL,
                        "cannot write %s (%s)", what, strerror(e));
}

static GfStatus write_file(const char *dir, const char *name, const void *bytes, size_t n, GfError *err) {
    char path[4700];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    int e = fd < 0 ? errno : 0;
    if (!e && gf_write_all(fd, bytes, n) != 0) e = errno;
    if (!e && fsync(fd) != 0) e = errno;
    if (fd >= 0 && close(fd) != 0 && !e) e = errno;
    return e ? io_error(err, e, name) : GF_OK;
}

/* ---- configuration files ---------------------------------------------------- */

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The base's files that are not weights and describe the model. */
static int copied_file(const char *name) {
    if (name[0] == '.' || strcmp(name, "model.safetensors.index.json") == 0) return 0;
    return ends_with(name, ".json") || ends_with(name, ".jinja") || ends_with(name, ".model") || ends_with(name, ".txt") ||
           ends_with(name, ".md");
}

/* config.json with its top-level dtype set to the export's. */
static char *config_with_dtype(const char *text, size_t n, StDtype dtype, size_t *out_len, GfError *err) {
    GfError jerr;
    cJSON *c = json_parse_strict(text, n, "config.json", &jerr);
    if (!c) { json_error(err, &jerr, GF_INVALID, "invalid_model", NULL); return NULL; }
    const char *name = dtype == ST_F32 ? "float32" : dtype == ST_F16 ? "float16" : "bfloat16";
    cJSON_DeleteItemFromObjectCaseSensitive(c, "dtype");
    cJSON_DeleteItemFromObjectCaseSensitive(c, "torch_dtype");
    cJSON_AddStringToObject(c, "dtype", name);
    char *out = cJSON_Print(c);
    cJSON_Delete(c);
    if (!out) { gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory"); return NULL; }
    *out_len = strlen(out);
    return out;
}

typedef GfStatus (*FileFn)(Merge *m, const char *name, const struct stat *st, GfError *err);

static GfStatus each_file(Merge *m, FileFn fn, GfError *err) {
    DIR *d = opendir(m->o->model_dir);
    if (!d) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot list the model directory (%s)", strerror(errno));
    struct dirent *e;
    char path[4400];
    GfStatus s = GF_OK;
    while (!s && (e = readdir(d))) {
        struct stat st;
        if (!copied_file(e->d_name)) continue;
        snprintf(path, sizeof path, "%s/%s", m->o->model_dir, e->d_name);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if ((uint64_t)st.st_size > COPY_MAX) {
            s = gf_error_set(err, GF_INVALID, "invalid_model", NULL, "%.200s is larger than 1 GiB", e->d_name);
            break;
        }
        s = fn(m, e->d_name, &st, err);
    }
    closedir(d);
    return s;
}

static GfStatus count_file(Merge *m, const char *name, const struct stat *st, GfError *err) {
    (void)name, (void)err;
    m->file_bytes += (uint64_t)st->st_size;
    return GF_OK;
}

static GfStatus copy_file(Merge *m, const char *name, const struct stat *st, GfError *err) {
    char path[4400];
    size_t n = 0;
    snprintf(path, sizeof path, "%s/%s", m->o->model_dir, name);
    char *text = gf_read_file(path, (size_t)st->st_size + 1, name, &n, err);
    if (!text) return err->status;
    GfStatus s;
    if (strcmp(name, "config.json") == 0 && m->o->dtype >= 0) {
        size_t cn;
        char *c = config_with_dtype(text, n, (StDtype)m->o->dtype, &cn, err);
        s = c ? write_file(m->tmp, name, c, cn, err) : err->status;
        free(c);
    } else {
        s = write_file(m->tmp, name, text, n, err);
    }
    free(text);
    m->r->n_files += !s;
    return s;
}

static GfStatus check_space(Merge *m, const char *parent, GfError *err) {
    GfStatus s = each_file(m, count_file, err);
    if (s) return s;
    uint64_t need = m->total + m->file_bytes + m->n_items * 512ull + (1u << 20);
    struct statvfs v;
    if (statvfs(parent, &v) != 0)
        return gf_error_set(err, GF_IO, "io_error", NULL, "cannot read the free space of the output's filesystem (%s)",
                            strerror(errno));
    uint64_t avail = (uint64_t)v.f_bavail * (uint64_t)v.f_frsize;
    if (avail < need)
        return gf_error_set(err, GF_NO_SPACE, "insufficient_storage", NULL,
                            "the merged model needs %llu bytes and %llu are free where it is written",
                            (unsigned long long)need, (unsigned long long)avail);
    return GF_OK;
}

/* ---- tensor data ------------------------------------------------------------- */

static GfStatus tick(Merge *m, uint64_t n, GfError *err) {
    m->done += n;
    m->r->n_bytes += n;
    if (m->o->progress && m->o->progress(m->o->ctx, m->done, m->total))
        return gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "the merge was cancelled");
    return GF_OK;
}

/* Stores v at element i of the block in dtype; -1 when f16 cannot hold it. */
static int store(uint8_t *block, uint64_t i, StDtype dtype, float v) {
    if (dtype == ST_F32) { memcpy(block + 4 * i, &v, 4); return 0; }
    uint16_t h = dtype == ST_BF16 ? kn_f32_to_bf16(v) : kn_f32_to_f16(v);
    if (dtype == ST_F16 && isfinite(v) && (h & 0x7fff) == 0x7c00) return -1;
    memcpy(block + 2 * i, &h, 2);
    return 0;
}

static float stored(const uint8_t *block, uint64_t i, StDtype dtype) {
    if (dtype == ST_F32) { float f; memcpy(&f, block + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, block + 2 * i, 2);
    return dtype == ST_BF16 ? kn_bf16_to_f32(h) : kn_f16_to_f32(h);
}

static GfStatus too_big(const Item *it, GfError *err) {
    return gf_error_set(err, GF_INVALID, "invalid_argument", "dtype", "tensor %s holds a value that float16 cannot represent",
                        it->src->name);
}

/* A tensor without an adapter's term: its bytes, or converted. */
static GfStatus put_copy(Merge *m, StWriter *w, const Item *it, GfError *err) {
    const StTensor *t = it->src;
    if (it->dtype == t->dtype) {
        for (uint64_t off = 0; off < t->n_bytes; off += BLOCK_BYTES) {
            uint64_t n = t->n_bytes - off < BLOCK_BYTES ? t->n_bytes - off : BLOCK_BYTES;
            GfStatus s = st_writer_put(w, t->data + off, n, err);
            if (s || (s = tick(m, n, err))) return s;
        }
        return GF_OK;
    }
    uint64_t per = BLOCK_BYTES / 4, osize = safetensors_dtype_size(it->dtype);
    float *f = (float *)m->block;   /* widened, then narrowed in place (output <= 4 bytes per element) */
    for (uint64_t e0 = 0; e0 < t->n_elements; e0 += per) {
        uint64_t n = t->n_elements - e0 < per ? t->n_elements - e0 : per;
        kn_convert_to_f32(f, t->data, kn_dtype(t->dtype), (int64_t)e0, (int64_t)n);
        for (uint64_t i = 0; i < n; i++)
            if (store(m->block, i, it->dtype, f[i])) return too_big(it, err);
        GfStatus s = st_writer_put(w, m->block, n * osize, err);
        if (s || (s = tick(m, n * osize, err))) return s;
    }
    return GF_OK;
}

void merge_lora_row(const StTensor *t, const LoraPair *p, float scale, int64_t r, float *out) {
    int64_t in = p->in;
    memset(out, 0, (size_t)in * sizeof *out);
    for (int64_t k = 0; k < p->rank; k++) {
        float b = p->B[r * p->rank + k];
        const float *a = p->A + k * in;
        for (int64_t c = 0; c < in; c++) out[c] += b * a[c];
    }
    float w[256];
    for (int64_t c0 = 0; c0 < in; c0 += 256) {
        int64_t n = in - c0 < 256 ? in - c0 : 256;
        kn_convert_to_f32(w, t->data, kn_dtype(t->dtype), r * in + c0, n);
        for (int64_t c = 0; c < n; c++) out[c0 + c] = w[c] + scale * out[c0 + c];
    }
}

/* Row r of W + scale * B A into the block at row slot j. */
static int merge_row(Merge *m, const Item *it, int64_t r, int64_t j) {
    int64_t in = it->pair->in;
    merge_lora_row(it->src, it->pair, m->adapter->scale, r, m->row);
    float w[256];
    for (int64_t c0 = 0; c0 < in; c0 += 256) {
        int64_t n = in - c0 < 256 ? in - c0 : 256;
        kn_convert_to_f32(w, it->src->data, kn_dtype(it->src->dtype), r * in + c0, n);
        for (int64_t c = 0; c < n; c++) {
            uint64_t i = (uint64_t)(j * in + c0 + c);
            if (store(m->block, i, it->dtype, m->row[c0 + c])) return -1;
            double d = fabs((double)stored(m->block, i, it->dtype) - (double)w[c]);
            if (d > m->r->max_abs_delta) m->r->max_abs_delta = d;
            if (d == 0) m->r->n_unchanged++;
        }
    }
    return 0;
}

static GfStatus put_merged(Merge *m, StWriter *w, const Item *it, GfError *err) {
    int64_t out = it->pair->out, in = it->pair->in, osize = (int64_t)safetensors_dtype_size(it->dtype);
    int64_t rows = (int64_t)BLOCK_BYTES / (in * osize);
    if (rows < 1) rows = 1;
    for (int64_t r0 = 0; r0 < out; r0 += rows) {
        int64_t n = out - r0 < rows ? out - r0 : rows;
        for (int64_t j = 0; j < n; j++)
            if (merge_row(m, it, r0 + j, j)) return too_big(it, err);
        GfStatus s = st_writer_put(w, m->block, (uint64_t)(n * in * osize), err);
        if (s || (s = tick(m, (uint64_t)(n * in * osize), err))) return s;
    }
    m->r->n_merged++;
    return GF_OK;
}

static void shard_name(char *buf, size_t cap, int i, int n) {
    snprintf(buf, cap, "model-%05d-of-%05d.safetensors", i + 1, n);
}

static GfStatus write_shard(Merge *m, int shard, size_t first, size_t end, GfError *err) {
    StWriteTensor *desc = gf_calloc(end - first, sizeof *desc, err);
    if (!desc) return GF_NO_MEMORY;
    for (size_t i = first; i < end; i++) {
        const StTensor *t = m->items[i].src;
        desc[i - first] = (StWriteTensor){.name = t->name, .dtype = m->items[i].dtype, .n_dims = t->n_dims};
        memcpy(desc[i - first].shape, t->shape, sizeof t->shape);
    }
    char name[64], path[sizeof m->tmp + sizeof name + 1];
    shard_name(name, sizeof name, shard, m->n_shards);
    snprintf(path, sizeof path, "%s/%s", m->tmp, name);
    StWriter w;
    GfStatus s = st_writer_open(&w, path, desc, end - first, "pt", err);
    free(desc);
    for (size_t i = first; !s && i < end; i++) {
        s = m->items[i].pair ? put_merged(m, &w, &m->items[i], err) : put_copy(m, &w, &m->items[i], err);
        m->r->n_tensors += !s;
    }
    if (!s) s = st_writer_commit(&w, err);
    else st_writer_abort(&w);
    m->r->n_shards += !s;
    return s;
}

static GfStatus write_index(Merge *m, GfError *err) {
    cJSON *root = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(root, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)m->total);
    cJSON *map = cJSON_AddObjectToObject(root, "weight_map");
    char name[64];
    for (size_t i = 0; i < m->n_items; i++) {
        shard_name(name, sizeof name, m->items[i].shard, m->n_shards);
        cJSON_AddStringToObject(map, m->items[i].src->name, name);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    GfStatus s = write_file(m->tmp, "model.safetensors.index.json", text, strlen(text), err);
    free(text);
    return s;
}

static GfStatus write_all_shards(Merge *m, GfError *err) {
    size_t first = 0;
    for (int sh = 0; sh < m->n_shards; sh++) {
        size_t end = first;
        while (end < m->n_items && m->items[end].shard == sh) end++;
        GfStatus s = write_shard(m, sh, first, end, err);
        if (s) return s;
        first = end;
    }
    return GF_OK;
}

/* ---- the whole ------------------------------------------------------------------ */

static GfStatus prepare(Merge *m, char *parent, size_t pcap, char *base, size_t bcap, GfError *err) {
    const MergeOptions *o = m->o;
    if (o->dtype >= 0 && !is_float((StDtype)o->dtype))
        return gf_error_set(err, GF_INVALID, "invalid_argument", "dtype", "dtype must be bf16, f16 or f32");
    split_out(o->out_dir, parent, pcap, base, bcap);
    struct stat st;
    if (!base[0] || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
        return gf_error_set(err, GF_INVALID, "invalid_argument", "out", "the output must name a new directory");
    if (lstat(o->out_dir, &st) == 0)
        return gf_error_set(err, GF_CONFLICT, "output_exists", "out", "the output directory already exists");
    if (stat(parent, &st) != 0 || !S_ISDIR(st.st_mode))
        return gf_error_set(err, GF_NOT_FOUND, "not_found", "out", "the output's parent directory does not exist");
    GfStatus s = model_dir_open(o->model_dir, &m->md, err);
    if (!s) s = lora_load_checked(o->adapter_dir, &m->md.base, LORA_MAX_RANK, &m->adapter, err);
    if (!s) s = plan(m, err);
    int64_t widest = 1;
    for (size_t i = 0; !s && i < m->adapter->n_pairs; i++)
        if (m->adapter->pairs[i].in > widest) widest = m->adapter->pairs[i].in;
    if (!s && (!(m->row = gf_malloc((size_t)widest * sizeof *m->row, err)) || !(m->block = gf_malloc(BLOCK_BYTES, err))))
        s = GF_NO_MEMORY;
    return s ? s : check_space(m, parent, err);
}

static GfStatus publish(Merge *m, const char *parent, GfError *err) {
    int fd = open(m->tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int e = fd < 0 || fsync(fd) != 0 ? errno : 0;
    if (fd >= 0) close(fd);
    if (!e && renameat2(AT_FDCWD, m->tmp, AT_FDCWD, m->o->out_dir, RENAME_NOREPLACE) != 0) e = errno;
    if (e == EEXIST) return gf_error_set(err, GF_CONFLICT, "output_exists", "out", "the output directory already exists");
    if (e) return io_error(err, e, "the output directory");
    m->tmp[0] = '\0';
    if ((fd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
        fsync(fd);
        close(fd);
    }
    return GF_OK;
}

GfStatus merge_adapter(const MergeOptions *o, MergeReport *r, GfError *err) {
    Merge m = {.o = o, .r = r};
    memset(r, 0, sizeof *r);
    char parent[4096], base[256];
    GfStatus s = prepare(&m, parent, sizeof parent, base, sizeof base, err);
    if (!s) {
        remove_stale(parent, base);
        snprintf(m.tmp, sizeof m.tmp, "%s/.%s.partial-XXXXXX", parent, base);
        if (!mkdtemp(m.tmp)) {
            s = io_error(err, errno, "the output directory");
            m.tmp[0] = '\0';
        } else if (chmod(m.tmp, 0755) != 0) {      /* mkdtemp's 0700: the export is for others to read */
            s = io_error(err, errno, "the output directory");
        }
    }
    if (!s) s = write_all_shards(&m, err);
    if (!s) s = write_index(&m, err);
    if (!s) s = each_file(&m, copy_file, err);
    if (!s) s = publish(&m, parent, err);
    if (m.tmp[0]) remove_flat(m.tmp);
    free(m.row);
    free(m.block);
    free(m.items);
    lora_free(m.adapter);
    model_dir_close(&m.md);
    return s;
}
