/* routes.c - the route table, limits, and the small handlers: health,
 * readiness and models. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "reply.h"
#include "serve.h"

#define MiB (1024ull * 1024ull)

const Route API_ROUTES[] = {
    {"GET", "/healthz", health_get, 0, BODY_NONE, 0, "GET /healthz", 0},
    {"GET", "/readyz", ready_get, 1, BODY_NONE, 0, "GET /readyz", 0},
    {"GET", "/metrics", metrics_get, 1, BODY_NONE, 0, "GET /metrics", 0},
    {"GET", "/v1/openapi.json", openapi_get, 1, BODY_NONE, 0, "GET /v1/openapi.json", 0},
    {"POST", "/v1/datasets", datasets_create, 1, BODY_MULTIPART, 0, "POST /v1/datasets", 1},
    {"GET", "/v1/datasets", datasets_list, 1, BODY_NONE, 0, "GET /v1/datasets", 0},
    {"GET", "/v1/datasets/{id}", datasets_get, 1, BODY_NONE, 0, "GET /v1/datasets/{id}", 0},
    {"DELETE", "/v1/datasets/{id}", datasets_delete, 1, BODY_NONE, 0, "DELETE /v1/datasets/{id}", 0},
    {"POST", "/v1/files", files_create, 1, BODY_MULTIPART, 0, "POST /v1/files", 1},
    {"GET", "/v1/files", files_list, 1, BODY_NONE, 0, "GET /v1/files", 0},
    {"GET", "/v1/files/{id}", files_get, 1, BODY_NONE, 0, "GET /v1/files/{id}", 0},
    {"GET", "/v1/files/{id}/content", files_content, 1, BODY_NONE, 0, "GET /v1/files/{id}/content", 0},
    {"DELETE", "/v1/files/{id}", files_delete, 1, BODY_NONE, 0, "DELETE /v1/files/{id}", 0},
    {"POST", "/v1/fine_tuning/jobs", jobs_create, 1, BODY_JSON, 0, "POST /v1/fine_tuning/jobs", 1},
    {"POST", "/v1/fine_tuning/preflight", jobs_preflight, 1, BODY_JSON, 0, "POST /v1/fine_tuning/preflight", 0},
    {"GET", "/v1/fine_tuning/jobs", jobs_list, 1, BODY_NONE, 0, "GET /v1/fine_tuning/jobs", 0},
    {"GET", "/v1/fine_tuning/jobs/{id}", jobs_get, 1, BODY_NONE, 0, "GET /v1/fine_tuning/jobs/{id}", 0},
    {"POST", "/v1/fine_tuning/jobs/{id}/cancel", jobs_cancel, 1, BODY_NONE, 0, "POST /v1/fine_tuning/jobs/{id}/cancel", 0},
    {"POST", "/v1/fine_tuning/jobs/{id}/pause", jobs_pause, 1, BODY_NONE, 0, "POST /v1/fine_tuning/jobs/{id}/pause", 0},
    {"POST", "/v1/fine_tuning/jobs/{id}/resume", jobs_resume, 1, BODY_NONE, 0, "POST /v1/fine_tuning/jobs/{id}/resume", 0},
    {"GET", "/v1/fine_tuning/jobs/{id}/events", jobs_events, 1, BODY_NONE, 0, "GET /v1/fine_tuning/jobs/{id}/events", 0},
    {"GET", "/v1/fine_tuning/jobs/{id}/checkpoints", jobs_checkpoints, 1, BODY_NONE, 0, "GET /v1/fine_tuning/jobs/{id}/checkpoints", 0},
    {"POST", "/v1/adapters", adapters_create, 1, BODY_MULTIPART, 0, "POST /v1/adapters", 0},
    {"GET", "/v1/adapters", adapters_list, 1, BODY_NONE, 0, "GET /v1/adapters", 0},
    {"GET", "/v1/adapters/{name}", adapters_get, 1, BODY_NONE, 0, "GET /v1/adapters/{name}", 0},
    {"DELETE", "/v1/adapters/{name}", adapters_delete, 1, BODY_NONE, 0, "DELETE /v1/adapters/{name}", 0},
    {"GET", "/v1/adapters/{name}/download", adapters_download, 1, BODY_NONE, 0, "GET /v1/adapters/{name}/download", 0},
    {"POST", "/v1/adapters/{name}/merge", exports_merge, 1, BODY_JSON, 0, "POST /v1/adapters/{name}/merge", 1},
    {"GET", "/v1/exports", exports_list, 1, BODY_NONE, 0, "GET /v1/exports", 0},
    {"GET", "/v1/exports/{id}", exports_get, 1, BODY_NONE, 0, "GET /v1/exports/{id}", 0},
    {"POST", "/v1/exports/{id}/cancel", exports_cancel, 1, BODY_NONE, 0, "POST /v1/exports/{id}/cancel", 0},
    {"DELETE", "/v1/exports/{id}", exports_delete, 1, BODY_NONE, 0, "DELETE /v1/exports/{id}", 0},
    {"GET", "/v1/exports/{id}/content", exports_content, 1, BODY_NONE, 0, "GET /v1/exports/{id}/content", 0},
    {"GET", "/v1/models", models_list, 1, BODY_NONE, 0, "GET /v1/models", 0},
    {"GET", "/v1/models/{id}", models_get, 1, BODY_NONE, 0, "GET /v1/models/{id}", 0},
    {"DELETE", "/v1/models/{id}", models_delete, 1, BODY_NONE, 0, "DELETE /v1/models/{id}", 0},
    {"POST", "/v1/chat/completions", chat_completions_create, 1, BODY_JSON, 64 * MiB, "POST /v1/chat/completions", 0},
    {"POST", "/v1/infer", infer_create, 1, BODY_MULTIPART, 32 * MiB, "POST /v1/infer", 0},
};
const int API_N_ROUTES = (int)(sizeof API_ROUTES / sizeof API_ROUTES[0]);

void api_limits_default(ApiLimits *l) {
    l->json_body_max = 1 * MiB;
    l->dataset_upload_max = 2048 * MiB;
    l->adapter_upload_max = 2048 * MiB;
    l->max_queued_jobs = 100;
    l->max_lora_rank = 256;
    l->dataset_min_examples = 10;
    l->image_max_bytes = 20 * MiB;
    l->image_max_pixels = 50000000;
}

uint64_t api_route_body_max(const Api *api, const Route *r) {
    if (r->body_max) return r->body_max;
    switch (r->body) {
    case BODY_JSON: return api->limits.json_body_max;
    case BODY_MULTIPART:
        return r->handler == adapters_create ? api->limits.adapter_upload_max : api->limits.dataset_upload_max;
    default: return 0;
    }
}

/* Alive, unless the device failed: only a restart brings it back. */
GfStatus health_get(Api *api, const HttpReq *req, HttpResp *resp) {
    (void)req;
    char why[GF_ERR_MSG_MAX];
    if (!api->serving.serve || !serve_failed(api->serving.serve, why, sizeof why))
        return reply_text(resp, 200, "application/json", "{\"status\":\"ok\"}", 15);
    return reply_fail(resp, GF_NOT_READY, "device_failed", NULL, "the device failed (%.300s); restart the server", why);
}

/* api/openapi.json, compiled in (openapi_embedded.c) */
extern const char GF_OPENAPI_JSON[];
extern const size_t GF_OPENAPI_JSON_LEN;

GfStatus openapi_get(Api *api, const HttpReq *req, HttpResp *resp) {
    (void)api;
    (void)req;
    return reply_text(resp, 200, "application/json", GF_OPENAPI_JSON, GF_OPENAPI_JSON_LEN);
}

GfStatus ready_get(Api *api, const HttpReq *req, HttpResp *resp) {
    (void)req;
    GfError err;
    int store_ok = store_ping(api->store, &err) == GF_OK;
    cJSON *o = cJSON_CreateObject();
    char why[GF_ERR_MSG_MAX];
    int device_failed = api->serving.serve && serve_failed(api->serving.serve, why, sizeof why);
    int ready = store_ok && api->model.loaded && !device_failed;
    cJSON_AddStringToObject(o, "status", ready ? "ready" : "not_ready");
    if (device_failed) cJSON_AddStringToObject(o, "device", why);
    cJSON_AddStringToObject(o, "store", store_ok ? "ok" : "unavailable");
    cJSON *m = cJSON_AddObjectToObject(o, "model");
    cJSON_AddStringToObject(m, "id", api->model.id);
    cJSON_AddBoolToObject(m, "loaded", api->model.loaded);
    if (!api->model.loaded) cJSON_AddStringToObject(m, "reason", api->model.not_ready_reason);
    if (api->serving.model) {
        const KnBackend *be = model_backend(api->serving.model);
        cJSON_AddStringToObject(m, "device", be->name);
        cJSON_AddStringToObject(m, "precision", kn_precision_name(be->ctx.precision));
    }
    if (api->serving.serve) {
        ServeStats st;
        serve_stats(api->serving.serve, &st);
        cJSON_AddStringToObject(m, "kv_cache", st.kv_dtype == KN_BF16 ? "bf16" : "fp32");
    }
    if (!ready) resp->retry_after = 30;
    return reply_json(resp, ready ? 200 : 503, o);
}

/* ---- models ------------------------------------------------------------ */

static cJSON *model_object(const char *id, const char *parent, int64_t created, int ready) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", "model");
    cJSON_AddNumberToObject(o, "created", (double)created);
    cJSON_AddStringToObject(o, "owned_by", "gemmaforge");
    if (parent && parent[0]) cJSON_AddStringToObject(o, "parent", parent);
    else cJSON_AddNullToObject(o, "parent");
    cJSON_AddBoolToObject(o, "ready", ready);
    return o;
}

GfStatus models_list(Api *api, const HttpReq *req, HttpResp *resp) {
    (void)req;
    GfError err;
    cJSON *root = cJSON_CreateObject(), *data = cJSON_CreateArray();
    cJSON_AddStringToObject(root, "object", "list");
    cJSON_AddItemToObject(root, "data", data);
    if (api->model.id[0])
        cJSON_AddItemToArray(data, model_object(api->model.id, NULL, api->started_at, api->model.loaded));
    char after[STORE_NAME_MAX] = "";
    enum { PAGE = 100 };
    AdapterRow *rows = malloc(PAGE * sizeof *rows);
    if (!rows) { cJSON_Delete(root); return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory"); }
    for (;;) {
        int n = 0, more = 0;
        if (store_adapter_list(api->store, after, PAGE, rows, &n, &more, &err)) {
            free(rows);
            cJSON_Delete(root);
            return reply_error(resp, &err, NULL);
        }
        for (int i = 0; i < n; i++)
            cJSON_AddItemToArray(data, model_object(rows[i].name, rows[i].base_model, rows[i].created_at,
                                                    api->model.loaded));
        if (!more || n == 0) break;
        snprintf(after, sizeof after, "%s", rows[n - 1].name);
    }
    free(rows);
    return reply_json(resp, 200, root);
}

/* OpenAI's models.del for a fine-tuned model: the adapter, as DELETE
 * /v1/adapters/{name} removes it; the base model is not deletable. */
GfStatus models_delete(Api *api, const HttpReq *req, HttpResp *resp) {
    const char *id = req->params[0];
    if (api->model.id[0] && strcmp(id, api->model.id) == 0)
        return reply_fail(resp, GF_FORBIDDEN, "model_not_deletable", "model",
                          "'%.200s' is the base model this server runs; only fine-tuned models can be deleted", id);
    GfError err;
    if (store_adapter_delete(api->store, id, &err)) {
        if (err.status != GF_NOT_FOUND) return reply_error(resp, &err, NULL);
        return reply_fail(resp, GF_NOT_FOUND, "model_not_found", "model", "no model '%.200s'", id);
    }
    if (api->serving.serve) serve_adapter_drop(api->serving.serve, id); /* running requests finish */
    return reply_deleted(resp, id, "model");
}

/* One model as the list shows it: the base, or an adapter by name
 * (OpenAI's models.retrieve). */
GfStatus models_get(Api *api, const HttpReq *req, HttpResp *resp) {
    const char *id = req->params[0];
    if (api->model.id[0] && strcmp(id, api->model.id) == 0)
        return reply_json(resp, 200, model_object(api->model.id, NULL, api->started_at, api->model.loaded));
    AdapterRow row;
    GfError err;
    if (store_adapter_get(api->store, id, &row, &err)) {
        if (err.status != GF_NOT_FOUND) return reply_error(resp, &err, NULL);
        return reply_fail(resp, GF_NOT_FOUND, "model_not_found", "model", "no model '%.200s' (neither the base nor an adapter)",
                          id);
    }
    return reply_json(resp, 200, model_object(row.name, row.base_model, row.created_at, api->model.loaded));
}
