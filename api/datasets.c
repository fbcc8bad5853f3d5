/* datasets.c - POST/GET/DELETE /v1/datasets: multipart upload validated line
 * by line before anything is stored. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "common.h"
#include "dataset.h"
#include "hyperparameters.h"
#include "reply.h"
#include "trainset.h"

/* "tokens": what the upload measured for the model loaded then, or null. */
static void add_tokens(cJSON *o, const DatasetRow *d) {
    if (d->max_tokens < 0) {
        cJSON_AddNullToObject(o, "tokens");
        return;
    }
    cJSON *t = cJSON_AddObjectToObject(o, "tokens");
    cJSON_AddStringToObject(t, "model", d->tokens_model);
    cJSON_AddNumberToObject(t, "total", (double)d->tokens);
    cJSON_AddNumberToObject(t, "longest", (double)d->max_tokens);
    cJSON_AddNumberToObject(t, "longest_line", (double)d->max_tokens_line);
}

static cJSON *dataset_json(const DatasetRow *d) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", d->id);
    cJSON_AddStringToObject(o, "object", "dataset");
    cJSON_AddStringToObject(o, "name", d->name);
    cJSON_AddStringToObject(o, "status", d->status);
    cJSON_AddNumberToObject(o, "created_at", (double)d->created_at);
    cJSON_AddNumberToObject(o, "examples", (double)d->n_examples);
    cJSON_AddNumberToObject(o, "images", (double)d->n_images);
    cJSON_AddNumberToObject(o, "bytes", (double)d->bytes);
    cJSON_AddBoolToObject(o, "has_images_archive", d->has_images);
    add_tokens(o, d);
    return o;
}

cJSON *dataset_issues_json(const DatasetReport *r) {
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; i < r->n_issues; i++) {
        cJSON *o = cJSON_CreateObject();
        if (r->issues[i].line) cJSON_AddNumberToObject(o, "line", (double)r->issues[i].line);
        else cJSON_AddNullToObject(o, "line");
        cJSON_AddStringToObject(o, "code", r->issues[i].code);
        cJSON_AddStringToObject(o, "message", r->issues[i].message);
        cJSON_AddItemToArray(arr, o);
    }
    return arr;
}

static GfStatus parts_or_reply(const HttpReq *req, HttpResp *resp, const HttpPart **file,
                               const HttpPart **images, const char **name) {
    static const char *const allowed[] = {"file", "images", "name", NULL};
    if (only_parts_or_reply(req, resp, allowed)) return GF_INVALID;
    *file = find_part(req, "file");
    *images = find_part(req, "images");
    const HttpPart *n = find_part(req, "name");
    if (!*file || !(*file)->is_file)
        return reply_fail(resp, GF_INVALID, "missing_parameter", "file", "the multipart field 'file' (the JSONL) is required");
    if (*images && !(*images)->is_file)
        return reply_fail(resp, GF_INVALID, "invalid_multipart", "images", "'images' must be a file (a tar archive)");
    if (n && n->is_file)
        return reply_fail(resp, GF_INVALID, "invalid_multipart", "name", "'name' must be a plain form field");
    *name = n ? n->value : NULL;
    if (*name) {
        GfError err;
        if (check_display_name(*name, "name", &err)) return reply_error(resp, &err, NULL);
    }
    return GF_OK;
}

/* The longest sequence a job can train: max_seq_len's bound, and the
 * model's context when its config gives one. */
static int64_t trainable_tokens(const Api *api) {
    int64_t ctx = api->serving.cfg ? api->serving.cfg->text.max_positions : 0;
    return ctx > 0 && ctx < HP_MAX_SEQ_LEN ? ctx : HP_MAX_SEQ_LEN;
}

/* The examples in tokens, for the loaded model. */
static GfStatus measure_or_reply(Api *api, const char *jsonl, const char *tar, const DatasetLimits *lim,
                                 DatasetRow *row, HttpResp *resp) {
    TrainSetStats stats;
    DatasetReport report;
    GfError err;
    gf_error_clear(&err);
    GfStatus st = trainset_measure(api->serving.pipe, jsonl, tar, trainable_tokens(api), &lim->image,
                                   lim->max_issues_kept, &stats, &report, &err);
    if (st) {
        GfStatus out = reply_error(resp, &err, st == GF_UNPROCESSABLE ? dataset_issues_json(&report) : NULL);
        dataset_report_free(&report);
        return out;
    }
    dataset_report_free(&report);
    snprintf(row->tokens_model, sizeof row->tokens_model, "%s", api->model.id);
    row->tokens = stats.tokens;
    row->max_tokens = stats.max_tokens;
    row->max_tokens_line = stats.max_tokens_line;
    return GF_OK;
}

GfStatus dataset_check_or_reply(Api *api, const char *jsonl, const char *tar, DatasetRow *row, HttpResp *resp) {
    DatasetLimits lim;
    dataset_limits_default(&lim);
    lim.min_examples = api->limits.dataset_min_examples;
    lim.image.max_bytes = api->limits.image_max_bytes;
    lim.image.max_pixels = api->limits.image_max_pixels;
    DatasetReport report;
    GfError err;
    gf_error_clear(&err);
    GfStatus st = dataset_validate(jsonl, tar, &lim, &report, &err);
    if (st) {
        GfStatus out = reply_error(resp, &err, st == GF_UNPROCESSABLE ? dataset_issues_json(&report) : NULL);
        dataset_report_free(&report);
        return out;
    }
    row->n_examples = report.n_examples;
    row->n_images = report.n_images;
    dataset_report_free(&report);
    row->tokens = row->max_tokens = -1;
    return api->serving.pipe ? measure_or_reply(api, jsonl, tar, &lim, row, resp) : GF_OK;
}

GfStatus datasets_create(Api *api, const HttpReq *req, HttpResp *resp) {
    const HttpPart *file = NULL, *images = NULL;
    const char *name = NULL;
    if (parts_or_reply(req, resp, &file, &images, &name)) return GF_INVALID;
    DatasetRow row;
    memset(&row, 0, sizeof row);
    GfStatus st = dataset_check_or_reply(api, file->path, images ? images->path : NULL, &row, resp);
    if (st) return st;
    GfError err;
    store_new_id("ds", row.id);
    snprintf(row.name, sizeof row.name, "%s", name ? name : row.id);
    snprintf(row.status, sizeof row.status, "ready");
    row.bytes = file->size + (images ? images->size : 0);
    row.has_images = images != NULL;
    row.created_at = gf_time_unix();
    if (store_dataset_create(api->store, &row, file->path, images ? images->path : NULL, &err))
        return reply_error(resp, &err, NULL);
    return reply_json(resp, 201, dataset_json(&row));
}

GfStatus datasets_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    DatasetRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    GfError err;
    if (store_dataset_list(api->store, after, limit, rows, &n, &more, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, dataset_json(&rows[i]));
    free(rows);
    return reply_json(resp, 200, list_envelope(data, more));
}

GfStatus datasets_get(Api *api, const HttpReq *req, HttpResp *resp) {
    DatasetRow row;
    GfError err;
    if (store_dataset_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, dataset_json(&row));
}

GfStatus datasets_delete(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    if (store_dataset_delete(api->store, req->params[0], &err)) return reply_error(resp, &err, NULL);
    return reply_deleted(resp, req->params[0], "dataset");
}
