/* modeldir.c - config.json and safetensors shards of a model directory. */
#include "modeldir.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "jsoncheck.h"

static char *read_text(const char *path, size_t max, size_t *len, GfError *err, const char *what) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        gf_error_set(err, GF_NOT_FOUND, "file_not_found", NULL, "the model directory has no %s", what);
        return NULL;
    }
    char *buf = gf_malloc(max + 1, err);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (buf && n > max) {
        free(buf);
        gf_error_set(err, GF_INVALID, "invalid_model", NULL, "%s is larger than %zu bytes", what, max);
        return NULL;
    }
    *len = n;
    return buf;
}

static GfStatus read_config(const char *dir, ModelDir *md, GfError *err) {
    char path[4096];
    size_t n;
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = read_text(path, 4u << 20, &n, err, "config.json");
    if (!text) return err->status;
    GfError jerr;
    cJSON *cfg = json_parse_strict(text, n, "config.json", &jerr);
    free(text);
    if (!cfg) return json_error(err, &jerr, GF_INVALID, "invalid_model", NULL);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(cfg, "model_type");
    GfStatus st = GF_OK;
    if (!cJSON_IsString(mt) || strcmp(mt->valuestring, "gemma4") != 0)
        st = gf_error_set(err, GF_INVALID, "invalid_model", NULL,
                          "config.json: model_type must be \"gemma4\" (this server runs Gemma 4 only)");
    else snprintf(md->model_type, sizeof md->model_type, "%s", mt->valuestring);
    cJSON_Delete(cfg);
    return st;
}

static GfStatus open_shard(const char *dir, const char *file, ModelDir *md, GfError *err) {
    if (md->n_shards == MODEL_MAX_SHARDS)
        return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "more than %d weight shards", MODEL_MAX_SHARDS);
    if (!file[0] || strchr(file, '/') || strcmp(file, "..") == 0 || strcmp(file, ".") == 0)
        return gf_error_set(err, GF_INVALID, "invalid_model", NULL, "weight shard name '%.64s' is not a plain file name", file);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    GfStatus st = safetensors_open(path, file, &md->shards[md->n_shards], err);
    if (st) return st;
    SafeTensors *s = &md->shards[md->n_shards++];
    md->n_tensors += s->n_tensors;
    md->n_bytes += s->buffer_size;
    return GF_OK;
}

static long shard_index(const char *const *names, size_t n, const char *file) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], file) == 0) return (long)i;
    return -1;
}

/* model.safetensors.index.json: {"weight_map": {tensor: file}}. */
static GfStatus open_index(const char *dir, const char *text, size_t n, ModelDir *md, GfError *err) {
    GfError jerr;
    cJSON *idx = json_parse_strict(text, n, "model.safetensors.index.json", &jerr);
    if (!idx) return json_error(err, &jerr, GF_INVALID, "invalid_model", NULL);
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    const char *files[MODEL_MAX_SHARDS];
    size_t n_files = 0;
    GfStatus st = cJSON_IsObject(map) ? GF_OK
                                      : gf_error_set(err, GF_INVALID, "invalid_model", NULL, "the index has no weight_map object");
    for (const cJSON *e = st ? NULL : map->child; e && !st; e = e->next) {
        if (!cJSON_IsString(e)) { st = gf_error_set(err, GF_INVALID, "invalid_model", NULL, "weight_map['%.64s'] is not a file name", e->string); break; }
        long i = shard_index(files, n_files, e->valuestring);
        if (i < 0) {
            if ((st = open_shard(dir, e->valuestring, md, err))) break;
            files[n_files] = e->valuestring;
            i = (long)n_files++;
        }
        if (!safetensors_find(&md->shards[i], e->string))
            st = gf_error_set(err, GF_INVALID, "invalid_model", NULL, "the index puts '%.96s' in %.64s, which does not hold it",
                              e->string, e->valuestring);
    }
    cJSON_Delete(idx);
    return st;
}

GfStatus model_dir_open(const char *dir, ModelDir *md, GfError *err) {
    memset(md, 0, sizeof *md);
    const char *slash = strrchr(dir, '/');
    const char *base = slash && slash[1] ? slash + 1 : dir;
    snprintf(md->name, sizeof md->name, "%s", base);
    size_t nl = strlen(md->name);
    while (nl > 1 && md->name[nl - 1] == '/') md->name[--nl] = '\0';
    md->shards = gf_calloc(MODEL_MAX_SHARDS, sizeof *md->shards, err);
    if (!md->shards) return GF_NO_MEMORY;
    GfStatus st = read_config(dir, md, err);
    char path[4096];
    struct stat sb;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (!st && stat(path, &sb) == 0) {
        size_t n;
        char *text = read_text(path, 64u << 20, &n, err, "model.safetensors.index.json");
        st = text ? open_index(dir, text, n, md, err) : err->status;
        free(text);
    } else if (!st) {
        st = open_shard(dir, "model.safetensors", md, err);
    }
    if (st) { model_dir_close(md); return st; }
    md->base.shards = md->shards;
    md->base.n_shards = md->n_shards;
    return GF_OK;
}

void model_dir_close(ModelDir *md) {
    if (!md) return;
    for (size_t i = 0; md->shards && i < md->n_shards; i++) safetensors_close(&md->shards[i]);
    free(md->shards);
    memset(md, 0, sizeof *md);
}
