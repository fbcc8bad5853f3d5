/* adapters.c - /v1/adapters: upload of PEFT adapters (validated before they
 * are stored), list, get, delete and download as a tar of the PEFT files. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapter_check.h"
#include "api.h"
#include "common.h"
#include "reply.h"
#include "serve.h"
#include "sha256.h"
#include "tar.h"
#include "tar_stream.h"

#define CONFIG_MAX (1u << 20)

static cJSON *adapter_json(const AdapterRow *a) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", a->name);
    cJSON_AddStringToObject(o, "object", "adapter");
    cJSON_AddStringToObject(o, "source", a->source);
    if (a->job_id[0]) cJSON_AddStringToObject(o, "job", a->job_id);
    else cJSON_AddNullToObject(o, "job");
    if (a->base_model[0]) cJSON_AddStringToObject(o, "base_model", a->base_model);
    else cJSON_AddNullToObject(o, "base_model");
    cJSON_AddNumberToObject(o, "rank", a->rank);
    cJSON_AddNumberToObject(o, "alpha", a->alpha);
    cJSON_AddBoolToObject(o, "use_rslora", a->use_rslora);
    cJSON_AddNumberToObject(o, "modules", a->n_modules);
    cJSON_AddBoolToObject(o, "vision", a->has_vision);
    cJSON_AddNumberToObject(o, "bytes", (double)a->bytes);
    cJSON_AddStringToObject(o, "sha256", a->sha256);
    cJSON_AddNumberToObject(o, "created_at", (double)a->created_at);
    return o;
}

/* Reads a small uploaded file (the config) whole. */
static char *read_small(const char *path, size_t max, size_t *len, GfError *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        if (fd >= 0) close(fd);
        gf_error_set(err, GF_IO, "io_error", NULL, "cannot read the uploaded config");
        return NULL;
    }
    if ((uint64_t)sb.st_size > max) {
        close(fd);
        gf_error_set(err, GF_TOO_LARGE, "request_too_large", "config", "adapter_config.json is over %zu bytes", max);
        return NULL;
    }
    char *buf = gf_malloc((size_t)sb.st_size + 1, err);
    ssize_t r = buf ? read(fd, buf, (size_t)sb.st_size) : -1;
    close(fd);
    if (r != sb.st_size) {
        free(buf);
        gf_error_set(err, GF_IO, "io_error", NULL, "cannot read the uploaded config");
        return NULL;
    }
    *len = (size_t)sb.st_size;
    return buf;
}

/* Maps the uploaded weights, validates the adapter, hashes the weights. */
static GfStatus check_upload(Api *api, const char *config, size_t config_len, const HttpPart *w,
                             AdapterRow *row, GfError *err) {
    int fd = open(w->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot read the uploaded weights");
    static const uint8_t empty[1];
    const uint8_t *map = w->size ? mmap(NULL, (size_t)w->size, PROT_READ, MAP_PRIVATE, fd, 0) : empty;
    close(fd);
    if (map == MAP_FAILED) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot map the uploaded weights");
    AdapterInfo info;
    GfStatus st = adapter_check(config, config_len, map, w->size, api->limits.max_lora_rank,
                                api->model.base_shapes, &info, err);
    if (!st) {
        uint8_t digest[GF_SHA256_LEN];
        gf_sha256(map, (size_t)w->size, digest);
        gf_hex(digest, GF_SHA256_LEN, row->sha256);
        row->rank = info.rank;
        row->alpha = info.alpha;
        row->use_rslora = info.use_rslora;
        row->n_modules = (int)info.n_modules;
        row->has_vision = info.has_vision;
    }
    if (w->size) munmap((void *)map, (size_t)w->size);
    return st;
}

GfStatus adapters_create(Api *api, const HttpReq *req, HttpResp *resp) {
    static const char *const allowed[] = {"name", "config", "weights", NULL};
    if (only_parts_or_reply(req, resp, allowed)) return GF_INVALID;
    const HttpPart *name = find_part(req, "name"), *cfg = find_part(req, "config"), *w = find_part(req, "weights");
    if (!name || name->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "name", "the form field 'name' is required");
    if (!cfg || !cfg->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "config", "the file 'config' (adapter_config.json) is required");
    if (!w || !w->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "weights", "the file 'weights' (adapter_model.safetensors) is required");
    GfError err;
    gf_error_clear(&err);
    if (check_object_name(name->value, "name", &err)) return reply_error(resp, &err, NULL);
    if (strcmp(name->value, api->model.id) == 0)
        return reply_fail(resp, GF_CONFLICT, "adapter_exists", "name", "'%s' is the base model's name", name->value);
    size_t config_len;
    char *config = read_small(cfg->path, CONFIG_MAX, &config_len, &err);
    if (!config) return reply_error(resp, &err, NULL);
    AdapterRow row;
    memset(&row, 0, sizeof row);
    GfStatus st = check_upload(api, config, config_len, w, &row, &err);
    free(config);
    if (st) return reply_error(resp, &err, NULL);
    snprintf(row.name, sizeof row.name, "%s", name->value);
    snprintf(row.source, sizeof row.source, "uploaded");
    snprintf(row.base_model, sizeof row.base_model, "%s", api->model.id);
    row.bytes = w->size + cfg->size;
    row.created_at = gf_time_unix();
    if (store_adapter_create(api->store, &row, cfg->path, w->path, &err)) return reply_error(resp, &err, NULL);
    if (api->serving.serve) serve_adapter_drop(api->serving.serve, row.name); /* no stale copy of an older one */
    return reply_json(resp, 201, adapter_json(&row));
}

GfStatus adapters_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    AdapterRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    GfError err;
    if (store_adapter_list(api->store, after, limit, rows, &n, &more, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, adapter_json(&rows[i]));
    free(rows);
    return reply_json(resp, 200, list_envelope(data, more));
}

GfStatus adapters_get(Api *api, const HttpReq *req, HttpResp *resp) {
    AdapterRow row;
    GfError err;
    if (store_adapter_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, adapter_json(&row));
}

GfStatus adapters_delete(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    if (store_adapter_delete(api->store, req->params[0], &err)) return reply_error(resp, &err, NULL);
    if (api->serving.serve) serve_adapter_drop(api->serving.serve, req->params[0]); /* running requests finish */
    return reply_deleted(resp, req->params[0], "adapter");
}

/* ---- download: a ustar stream of the two PEFT files -------------------- */

GfStatus adapters_download(Api *api, const HttpReq *req, HttpResp *resp) {
    char config[4096], weights[4096];
    GfError err;
    AdapterRow row;
    if (store_adapter_get(api->store, req->params[0], &row, &err) ||
        store_adapter_files(api->store, req->params[0], config, weights, &err))
        return reply_error(resp, &err, NULL);
    const char *const paths[2] = {config, weights};
    static const char *const names[2] = {"adapter_config.json", "adapter_model.safetensors"};
    if (tar_stream_reply(resp, paths, names, 2, row.created_at, row.name, "adapter_missing", &err)) {
        if (err.status == GF_NOT_FOUND)
            return reply_fail(resp, GF_FORMAT, "adapter_missing", NULL, "the files of adapter '%s' are missing", row.name);
        return reply_error(resp, &err, NULL);
    }
    return GF_OK;
}
