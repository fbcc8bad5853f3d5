/* exports.c - export jobs: POST /v1/adapters/{name}/merge queues an
 * adapter's merge into the base model, as a Hugging Face directory or one
 * GGUF file (run by the server's export worker, server/exports.c);
 * /v1/exports lists, shows, cancels and deletes them and downloads a
 * finished one: a tar of its model directory, or the GGUF file. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "api.h"
#include "common.h"
#include "json_util.h"
#include "reply.h"
#include "tar_stream.h"

#define EXPORT_FILES_MAX 100512   /* 100,000 shards and the configuration files */

static cJSON *export_json(const ExportRow *r) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", r->id);
    cJSON_AddStringToObject(o, "object", "export");
    cJSON_AddStringToObject(o, "kind", r->kind);
    cJSON_AddStringToObject(o, "adapter", r->adapter);
    cJSON_AddStringToObject(o, "dtype", r->dtype);
    cJSON_AddStringToObject(o, "status", r->status);
    cJSON_AddBoolToObject(o, "cancel_requested", r->cancel_requested);
    cJSON_AddNumberToObject(o, "created_at", (double)r->created_at);
    add_time_or_null(o, "started_at", r->started_at);
    add_time_or_null(o, "finished_at", r->finished_at);
    cJSON *p = cJSON_AddObjectToObject(o, "progress");
    cJSON_AddNumberToObject(p, "bytes_done", (double)r->bytes_done);
    cJSON_AddNumberToObject(p, "bytes_total", (double)r->bytes_total);
    if (r->error_code[0]) {
        cJSON *e = cJSON_AddObjectToObject(o, "error");
        cJSON_AddStringToObject(e, "code", r->error_code);
        cJSON_AddStringToObject(e, "message", r->error_message);
    } else {
        cJSON_AddNullToObject(o, "error");
    }
    cJSON *res = r->result[0] ? cJSON_Parse(r->result) : NULL;
    if (res) cJSON_AddItemToObject(o, "result", res);
    else cJSON_AddNullToObject(o, "result");
    if (strcmp(r->status, "succeeded") == 0) {
        char url[96];
        snprintf(url, sizeof url, "/v1/exports/%s/content", r->id);
        cJSON_AddStringToObject(o, "download_url", url);
    } else {
        cJSON_AddNullToObject(o, "download_url");
    }
    return o;
}

static int one_of(const char *v, const char *const *allowed) {
    for (int i = 0; allowed[i]; i++)
        if (strcmp(v, allowed[i]) == 0) return 1;
    return 0;
}

/* {"format": "safetensors" | "gguf", "dtype": ...} into row; GF_INVALID naming the field. */
static GfStatus parse_merge(const HttpReq *req, ExportRow *row, GfError *err) {
    static const char *const ST[] = {"auto", "bf16", "f16", "f32", NULL};
    static const char *const GG[] = {"f16", "bf16", "f32", "q8_0", "q4_0", NULL};
    const char *format = "safetensors", *dtype = NULL;
    cJSON *body = NULL;
    if (req->body_len) {
        if (!(body = json_parse_body(req->body, req->body_len, err))) return err->status;
        JsonCtx c = {body, "", NULL, err};
        static const char *const keys[] = {"format", "dtype", NULL};
        if (json_only_keys(&c, keys) || json_get_string(&c, "format", 0, 16, "safetensors", &format) ||
            json_get_string(&c, "dtype", 0, 8, NULL, &dtype)) {
            cJSON_Delete(body);
            return GF_INVALID;
        }
    }
    int gguf = strcmp(format, "gguf") == 0;
    GfStatus s = GF_OK;
    if (!gguf && strcmp(format, "safetensors") != 0)
        s = gf_error_set(err, GF_INVALID, "invalid_value", "format", "'format' must be \"safetensors\" or \"gguf\"");
    else if (dtype && !one_of(dtype, gguf ? GG : ST))
        s = gf_error_set(err, GF_INVALID, "invalid_value", "dtype",
                         gguf ? "'dtype' of a GGUF export must be \"f16\", \"bf16\", \"f32\", \"q8_0\" or \"q4_0\""
                              : "'dtype' must be \"auto\" (the base's), \"bf16\", \"f16\" or \"f32\"");
    if (!s) {
        snprintf(row->kind, sizeof row->kind, "%s", gguf ? "gguf" : "merge");
        snprintf(row->dtype, sizeof row->dtype, "%s", dtype ? dtype : gguf ? "f16" : "auto");
    }
    cJSON_Delete(body);
    return s;
}

GfStatus exports_merge(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    if (!api->model.dir_ok)
        return reply_fail(resp, GF_NOT_READY, "model_not_loaded", NULL, "the server has no base model to merge into");
    ExportRow row;
    memset(&row, 0, sizeof row);
    if (parse_merge(req, &row, &err)) return reply_error(resp, &err, NULL);
    snprintf(row.adapter, sizeof row.adapter, "%s", req->params[0]);
    store_new_id("exp", row.id);
    if (store_export_create(api->store, &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 202, export_json(&row));
}

GfStatus exports_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    ExportRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    GfError err;
    if (store_export_list(api->store, after, limit, rows, &n, &more, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, export_json(&rows[i]));
    free(rows);
    return reply_json(resp, 200, list_envelope(data, more));
}

GfStatus exports_get(Api *api, const HttpReq *req, HttpResp *resp) {
    ExportRow row;
    GfError err;
    if (store_export_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, export_json(&row));
}

GfStatus exports_cancel(Api *api, const HttpReq *req, HttpResp *resp) {
    ExportRow row;
    GfError err;
    if (store_export_cancel(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, export_json(&row));
}

GfStatus exports_delete(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    if (store_export_delete(api->store, req->params[0], &err)) return reply_error(resp, &err, NULL);
    return reply_deleted(resp, req->params[0], "export");
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* The regular files of dir, sorted (*names and the strings are malloc'd). */
static int list_files(const char *dir, char ***names) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0, cap = 16;
    char **v = malloc((size_t)cap * sizeof *v);
    struct dirent *e;
    while (v && (e = readdir(d))) {
        if (e->d_name[0] == '.' || n == EXPORT_FILES_MAX) continue;
        if (n == cap) {
            char **nv = realloc(v, (size_t)(cap *= 2) * sizeof *v);
            if (!nv) break;
            v = nv;
        }
        if (!(v[n] = strdup(e->d_name))) break;
        n++;
    }
    closedir(d);
    if (v) qsort(v, (size_t)n, sizeof *v, by_name);
    *names = v;
    return v ? n : -1;
}

GfStatus exports_content(Api *api, const HttpReq *req, HttpResp *resp) {
    ExportRow row;
    GfError err;
    char dir[4096];
    if (store_export_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    if (strcmp(row.status, "succeeded") != 0)
        return reply_fail(resp, GF_CONFLICT, "export_not_ready", "id", "export '%s' is %s; only a succeeded export has content",
                          row.id, row.status);
    if (store_export_dir(api->store, row.id, dir, &err)) return reply_error(resp, &err, NULL);
    if (strcmp(row.kind, "gguf") == 0) {
        char path[4200], download[STORE_NAME_MAX + 16];
        snprintf(path, sizeof path, "%s/model.gguf", dir);
        snprintf(download, sizeof download, "%s.gguf", row.adapter);
        if (file_stream_reply(resp, path, "application/octet-stream", download, "export_missing", &err))
            return reply_fail(resp, GF_FORMAT, "export_missing", NULL, "the file of export '%s' is missing", row.id);
        return GF_OK;
    }
    char **names = NULL;
    int n = list_files(dir, &names);
    char **paths = n > 0 ? calloc((size_t)n, sizeof *paths) : NULL;
    GfStatus st = n <= 0 || !paths ? GF_FORMAT : GF_OK;
    for (int i = 0; !st && i < n; i++)
        if (asprintf(&paths[i], "%s/%s", dir, names[i]) < 0) { paths[i] = NULL; st = GF_NO_MEMORY; }
    char download[STORE_NAME_MAX + 16];
    snprintf(download, sizeof download, "%s-merged", row.adapter);
    if (!st) st = tar_stream_reply(resp, (const char *const *)paths, (const char *const *)names, n, row.finished_at, download,
                                   "export_missing", &err);
    for (int i = 0; i < n; i++) {
        free(names[i]);
        if (paths) free(paths[i]);
    }
    free(names);
    free(paths);
    if (st == GF_NO_MEMORY) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    if (st) return reply_fail(resp, GF_FORMAT, "export_missing", NULL, "the files of export '%s' are missing", row.id);
    return GF_OK;
}
