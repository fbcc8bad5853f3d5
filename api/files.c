/* files.c - OpenAI's /v1/files for fine-tuning: a file of purpose
 * "fine-tune" is a dataset (the JSONL alone, images inline as data URLs),
 * validated line by line as POST /v1/datasets validates it and listed
 * there too; here it has OpenAI's shape (object "file", filename, purpose,
 * bytes, status "processed") and OpenAI's list envelope. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "common.h"
#include "dataset.h"
#include "reply.h"
#include "tar_stream.h"

static cJSON *file_json(const DatasetRow *d) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", d->id);
    cJSON_AddStringToObject(o, "object", "file");
    cJSON_AddNumberToObject(o, "bytes", (double)d->bytes);
    cJSON_AddNumberToObject(o, "created_at", (double)d->created_at);
    cJSON_AddStringToObject(o, "filename", d->name);
    cJSON_AddStringToObject(o, "purpose", "fine-tune");
    cJSON_AddStringToObject(o, "status", strcmp(d->status, "ready") == 0 ? "processed" : d->status);
    cJSON_AddNullToObject(o, "status_details");
    cJSON_AddNullToObject(o, "expires_at");
    return o;
}

static GfStatus check_purpose(const char *purpose, GfError *err) {
    if (strcmp(purpose, "fine-tune") == 0) return GF_OK;
    return gf_error_set(err, GF_INVALID, "invalid_value", "purpose",
                        "this server stores files for fine-tuning only: 'purpose' must be \"fine-tune\", not \"%.40s\"",
                        purpose);
}

GfStatus files_create(Api *api, const HttpReq *req, HttpResp *resp) {
    static const char *const allowed[] = {"file", "purpose", NULL};
    if (only_parts_or_reply(req, resp, allowed)) return GF_INVALID;
    const HttpPart *file = find_part(req, "file"), *purpose = find_part(req, "purpose");
    GfError err;
    if (!purpose || purpose->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "purpose", "the form field 'purpose' (\"fine-tune\") is required");
    if (check_purpose(purpose->value, &err)) return reply_error(resp, &err, NULL);
    if (!file || !file->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "file", "the multipart field 'file' (the JSONL) is required");
    const char *name = file->filename && file->filename[0] ? file->filename : "upload.jsonl";
    if (check_display_name(name, "file", &err)) return reply_error(resp, &err, NULL);
    DatasetRow row;
    memset(&row, 0, sizeof row);
    GfStatus st = dataset_check_or_reply(api, file->path, NULL, &row, resp);
    if (st) return st;
    store_new_id("file", row.id);
    snprintf(row.name, sizeof row.name, "%s", name);
    snprintf(row.status, sizeof row.status, "ready");
    row.bytes = file->size;
    row.created_at = gf_time_unix();
    if (store_dataset_create(api->store, &row, file->path, NULL, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, file_json(&row));
}

GfStatus files_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    const char *purpose = req->query(req->cls, "purpose"), *order = req->query(req->cls, "order");
    if (order && strcmp(order, "desc") != 0)
        return reply_fail(resp, GF_INVALID, "invalid_value", "order", "files are listed newest first: 'order' may only be \"desc\"");
    DatasetRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    GfError err;
    if (!(purpose && strcmp(purpose, "fine-tune") != 0) && store_dataset_list(api->store, after, limit, rows, &n, &more, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, file_json(&rows[i]));
    cJSON *o = list_envelope(data, more);
    if (n) {
        cJSON_AddStringToObject(o, "first_id", rows[0].id);
        cJSON_AddStringToObject(o, "last_id", rows[n - 1].id);
    } else {
        cJSON_AddNullToObject(o, "first_id");
        cJSON_AddNullToObject(o, "last_id");
    }
    free(rows);
    return reply_json(resp, 200, o);
}

GfStatus files_get(Api *api, const HttpReq *req, HttpResp *resp) {
    DatasetRow row;
    GfError err;
    if (store_dataset_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, file_json(&row));
}

GfStatus files_content(Api *api, const HttpReq *req, HttpResp *resp) {
    DatasetRow row;
    GfError err;
    char jsonl[4096], tar[4096];
    if (store_dataset_get(api->store, req->params[0], &row, &err) ||
        store_dataset_files(api->store, req->params[0], jsonl, tar, &err))
        return reply_error(resp, &err, NULL);
    if (file_stream_reply(resp, jsonl, "application/jsonl", row.name, "file_missing", &err))
        return reply_fail(resp, GF_FORMAT, "file_missing", NULL, "the content of file '%s' is missing", row.id);
    return GF_OK;
}

GfStatus files_delete(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    if (store_dataset_delete(api->store, req->params[0], &err)) return reply_error(resp, &err, NULL);
    return reply_deleted(resp, req->params[0], "file");
}
