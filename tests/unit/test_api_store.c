/* test_api_store.c - the API's handlers against the in-memory store, with
 * no SQLite, no socket and no model: datasets, jobs (create, list with
 * paging, get, cancel from queued and from running, events), the job a
 * dataset is used by, export jobs (merge checks, one per adapter, cancel
 * and delete rules), /readyz and /metrics, and failures of the store (an
 * injected GF_NO_SPACE, GF_NOT_READY) turned into the documented answers.
 * Links gf_api only. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "check.h"
#include "mem_store.h"
#include "metrics.h"

typedef struct {
    const char *query[2][2];         /* {name, value} */
} Query;

static const char *no_header(void *cls, const char *name) {
    (void)cls;
    (void)name;
    return NULL;
}

static const char *query_of(void *cls, const char *name) {
    Query *q = cls;
    for (int i = 0; q && i < 2; i++)
        if (q->query[i][0] && strcmp(q->query[i][0], name) == 0) return q->query[i][1];
    return NULL;
}

/* Calls h with a JSON body (or none), a path parameter and a query; returns
 * the parsed reply (freed by the caller) and its status in *status. */
static cJSON *call(Api *api, HttpHandler h, const char *param, const char *body, Query *q, int *status) {
    HttpReq req = {.method = "GET", .path = "/", .params = {param}, .header = no_header, .query = query_of, .cls = q,
                   .body = body, .body_len = body ? strlen(body) : 0, .request_id = "req_test"};
    HttpResp resp = {0};
    h(api, &req, &resp);
    *status = resp.status;
    cJSON *j = resp.body ? cJSON_ParseWithLength(resp.body, resp.body_len) : NULL;
    if (!j && resp.body) j = cJSON_CreateString(resp.body); /* text replies (/metrics) */
    free(resp.body);
    return j;
}

static const char *str(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : "";
}

static const cJSON *error_of(const cJSON *o) { return cJSON_GetObjectItemCaseSensitive(o, "error"); }

static void add_dataset(MemStore *m, const char *id, const char *status) {
    DatasetRow row = {.created_at = 1, .n_examples = 3, .bytes = 100};
    snprintf(row.id, sizeof row.id, "%s", id);
    snprintf(row.name, sizeof row.name, "%s.jsonl", id);
    snprintf(row.status, sizeof row.status, "%s", status);
    GfError err;
    CHECK(store_dataset_create(mem_store_port(m), &row, NULL, NULL, &err) == GF_OK, "add %s", id);
}

static void datasets(Api *api, MemStore *m) {
    int st;
    cJSON *r = call(api, datasets_list, NULL, NULL, NULL, &st);
    CHECK(st == 200 && cJSON_GetArraySize(cJSON_GetObjectItem(r, "data")) == 0, "empty list: %d", st);
    cJSON_Delete(r);
    add_dataset(m, "ds_a", "ready");
    add_dataset(m, "ds_b", "ready");
    add_dataset(m, "ds_c", "ready");
    Query q = {{{"limit", "2"}, {NULL, NULL}}};
    r = call(api, datasets_list, NULL, NULL, &q, &st);
    const cJSON *data = cJSON_GetObjectItem(r, "data");
    CHECK(st == 200 && cJSON_GetArraySize(data) == 2 && strcmp(str(cJSON_GetArrayItem(data, 0), "id"), "ds_c") == 0 &&
          cJSON_IsTrue(cJSON_GetObjectItem(r, "has_more")), "first page, newest first");
    cJSON_Delete(r);
    Query q2 = {{{"limit", "2"}, {"after", "ds_b"}}};
    r = call(api, datasets_list, NULL, NULL, &q2, &st);
    data = cJSON_GetObjectItem(r, "data");
    CHECK(st == 200 && cJSON_GetArraySize(data) == 1 && strcmp(str(cJSON_GetArrayItem(data, 0), "id"), "ds_a") == 0 &&
          cJSON_IsFalse(cJSON_GetObjectItem(r, "has_more")), "second page");
    cJSON_Delete(r);
    Query q3 = {{{"after", "ds_zz"}, {NULL, NULL}}};
    r = call(api, datasets_list, NULL, NULL, &q3, &st);
    CHECK(st == 400 && strcmp(str(error_of(r), "param"), "after") == 0, "unknown cursor: %d", st);
    cJSON_Delete(r);
    r = call(api, datasets_get, "ds_nope", NULL, NULL, &st);
    CHECK(st == 404 && strcmp(str(error_of(r), "code"), "dataset_not_found") == 0, "missing dataset: %d", st);
    cJSON_Delete(r);
}

static void jobs(Api *api, MemStore *m) {
    int st;
    cJSON *r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_nope\"}", NULL, &st);
    CHECK(st == 404 && strcmp(str(error_of(r), "param"), "dataset") == 0, "job on a missing dataset: %d", st);
    cJSON_Delete(r);
    r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\",\"hyperparameters\":{\"lora_rank\":0}}", NULL, &st);
    CHECK(st == 400 && strcmp(str(error_of(r), "param"), "hyperparameters.lora_rank") == 0, "bad rank: %d %s", st,
          str(error_of(r), "param"));
    cJSON_Delete(r);
    r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\",\"validation_dataset\":\"ds_b\",\"suffix\":\"pets\"}", NULL, &st);
    char first[STORE_ID_MAX];
    snprintf(first, sizeof first, "%s", str(r, "id"));
    CHECK(st == 201 && strcmp(str(r, "status"), "queued") == 0 && strcmp(str(r, "model"), "dense") == 0 &&
          strncmp(first, "job_", 4) == 0, "created: %d", st);
    cJSON_Delete(r);
    r = call(api, datasets_delete, "ds_b", NULL, NULL, &st);
    CHECK(st == 409 && strcmp(str(error_of(r), "code"), "dataset_in_use") == 0, "validation set in use: %d", st);
    cJSON_Delete(r);
    r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\"}", NULL, &st);
    char second[STORE_ID_MAX];
    snprintf(second, sizeof second, "%s", str(r, "id"));
    cJSON_Delete(r);
    r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\"}", NULL, &st);
    CHECK(st == 429 && strcmp(str(error_of(r), "code"), "queue_full") == 0, "queue of 2 full: %d", st);
    cJSON_Delete(r);
    r = call(api, jobs_cancel, first, NULL, NULL, &st);
    CHECK(st == 200 && strcmp(str(r, "status"), "cancelled") == 0, "queued -> cancelled: %d", st);
    cJSON_Delete(r);
    r = call(api, datasets_delete, "ds_b", NULL, NULL, &st);
    CHECK(st == 200, "validation set free once its job is cancelled: %d", st);
    cJSON_Delete(r);
    GfError err;
    CHECK(mem_store_job_start(m, second, &err) == GF_OK, "start");
    r = call(api, jobs_cancel, second, NULL, NULL, &st);
    CHECK(st == 200 && strcmp(str(r, "status"), "running") == 0 && cJSON_IsTrue(cJSON_GetObjectItem(r, "cancel_requested")),
          "running -> cancel requested: %d", st);
    cJSON_Delete(r);
    r = call(api, jobs_events, second, NULL, NULL, &st);
    const cJSON *data = cJSON_GetObjectItem(r, "data");
    CHECK(st == 200 && cJSON_GetArraySize(data) == 3 &&
          strcmp(str(cJSON_GetArrayItem(data, 0), "message"), "Job created and queued") == 0 &&
          strcmp(str(cJSON_GetArrayItem(data, 2), "message"), "Cancellation requested; stopping after the current step") == 0,
          "the job's own events: %d %d", st, cJSON_GetArraySize(data));
    char after[32];
    snprintf(after, sizeof after, "%d", cJSON_GetObjectItem(cJSON_GetArrayItem(data, 0), "seq")->valueint);
    cJSON_Delete(r);
    Query q = {{{"after", after}, {"limit", "1"}}};
    r = call(api, jobs_events, second, NULL, &q, &st);
    data = cJSON_GetObjectItem(r, "data");
    CHECK(st == 200 && cJSON_GetArraySize(data) == 1 && strcmp(str(cJSON_GetArrayItem(data, 0), "message"), "Job started") == 0 &&
          cJSON_IsTrue(cJSON_GetObjectItem(r, "has_more")), "a page after the first event: %d", st);
    cJSON_Delete(r);
    r = call(api, jobs_list, NULL, NULL, NULL, &st);
    data = cJSON_GetObjectItem(r, "data");
    CHECK(st == 200 && cJSON_GetArraySize(data) == 2 && strcmp(str(cJSON_GetArrayItem(data, 0), "id"), second) == 0,
          "jobs newest first");
    cJSON_Delete(r);
}

/* A queued job's adapter name is reserved (the SQLite store's rule too). */
static void reserved_names(Api *api, MemStore *m) {
    (void)m;
    int st;
    cJSON *r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\",\"suffix\":\"held\"}", NULL, &st);
    char name[64];
    const char *id = str(r, "id");
    snprintf(name, sizeof name, "held-%.8s", strchr(id, '_') ? strchr(id, '_') + 1 : id);
    CHECK(st == 201, "job with a suffix: %d", st);
    cJSON_Delete(r);
    AdapterRow row = {.rank = 4, .alpha = 8};
    snprintf(row.name, sizeof row.name, "%s", name);
    GfError err;
    CHECK(store_adapter_create(api->store, &row, NULL, NULL, &err) == GF_CONFLICT &&
          strcmp(err.code, "adapter_name_reserved") == 0, "the job's name is reserved: %s", err.message);
}

/* Export jobs: the merge route's checks and the queue rules. */
static void exports(Api *api, MemStore *m) {
    int st;
    cJSON *r = call(api, exports_merge, "pets", "{}", NULL, &st);
    CHECK(st == 503 && strcmp(str(error_of(r), "code"), "model_not_loaded") == 0, "no model directory: %d", st);
    cJSON_Delete(r);
    api->model.dir_ok = 1;
    r = call(api, exports_merge, "pets", "{}", NULL, &st);
    CHECK(st == 404 && strcmp(str(error_of(r), "code"), "adapter_not_found") == 0, "no such adapter: %d", st);
    cJSON_Delete(r);
    AdapterRow row = {.rank = 4, .alpha = 8};
    snprintf(row.name, sizeof row.name, "pets");
    GfError err;
    CHECK(store_adapter_create(api->store, &row, NULL, NULL, &err) == GF_OK, "adapter");
    r = call(api, exports_merge, "pets", "{\"dtype\":\"fp8\"}", NULL, &st);
    CHECK(st == 400 && strcmp(str(error_of(r), "param"), "dtype") == 0, "bad dtype: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_merge, "pets", "{\"format\":\"gguf\",\"dtype\":\"auto\"}", NULL, &st);
    CHECK(st == 400 && strcmp(str(error_of(r), "param"), "dtype") == 0, "auto is not a GGUF type: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_merge, "pets", "{\"format\":\"onnx\"}", NULL, &st);
    CHECK(st == 400 && strcmp(str(error_of(r), "param"), "format") == 0, "bad format: %d", st);
    cJSON_Delete(r);
    mem_store_fail_next(m, GF_NO_SPACE);
    r = call(api, exports_merge, "pets", NULL, NULL, &st);
    CHECK(st == 507, "disk full: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_list, NULL, NULL, NULL, &st);
    CHECK(st == 200 && cJSON_GetArraySize(cJSON_GetObjectItem(r, "data")) == 0, "nothing stored by a failed create");
    cJSON_Delete(r);
    r = call(api, exports_merge, "pets", "{\"dtype\":\"f16\"}", NULL, &st);
    char id[STORE_ID_MAX];
    snprintf(id, sizeof id, "%s", str(r, "id"));
    CHECK(st == 202 && strcmp(str(r, "status"), "queued") == 0 && strcmp(str(r, "dtype"), "f16") == 0 &&
          strncmp(id, "exp_", 4) == 0 && cJSON_IsNull(cJSON_GetObjectItem(r, "download_url")), "queued: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_merge, "pets", NULL, NULL, &st);
    CHECK(st == 409 && strcmp(str(error_of(r), "code"), "export_running") == 0 && strstr(str(error_of(r), "message"), id),
          "one export per adapter at a time: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_content, id, NULL, NULL, &st);
    CHECK(st == 409 && strcmp(str(error_of(r), "code"), "export_not_ready") == 0, "no content yet: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_delete, id, NULL, NULL, &st);
    CHECK(st == 409 && strcmp(str(error_of(r), "code"), "export_running") == 0, "delete a queued export: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_cancel, id, NULL, NULL, &st);
    CHECK(st == 200 && strcmp(str(r, "status"), "cancelled") == 0, "queued -> cancelled: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_delete, id, NULL, NULL, &st);
    CHECK(st == 200, "delete: %d", st);
    cJSON_Delete(r);
    r = call(api, exports_get, id, NULL, NULL, &st);
    CHECK(st == 404 && strcmp(str(error_of(r), "code"), "export_not_found") == 0, "deleted: %d", st);
    cJSON_Delete(r);
}

static void store_failures(Api *api, MemStore *m) {
    int st;
    mem_store_fail_next(m, GF_NO_SPACE);
    cJSON *r = call(api, jobs_create, NULL, "{\"dataset\":\"ds_a\"}", NULL, &st);
    CHECK(st == 507 && strcmp(str(error_of(r), "code"), "insufficient_storage") == 0, "disk full: %d", st);
    cJSON_Delete(r);
    mem_store_fail_next(m, GF_NOT_READY);
    r = call(api, ready_get, NULL, NULL, NULL, &st);
    CHECK(st == 503 && strcmp(str(r, "store"), "unavailable") == 0, "store down: %d", st);
    cJSON_Delete(r);
    r = call(api, metrics_get, NULL, NULL, NULL, &st);
    const char *text = cJSON_IsString(r) ? r->valuestring : "";
    CHECK(st == 200 && strstr(text, "gf_datasets 2\n") && strstr(text, "gf_jobs{status=\"running\"} 1\n") &&
          strstr(text, "gf_jobs{status=\"cancelled\"} 1\n") && strstr(text, "gf_base_weights_copies{device=\"cpu0\"} 0\n"),
          "metrics from the store: %d", st);
    cJSON_Delete(r);
}

int main(void) {
    MemStore *m = mem_store_new();
    Metrics metrics;
    metrics_init(&metrics);
    Api api = {.store = mem_store_port(m), .metrics = &metrics};
    api_limits_default(&api.limits);
    api.limits.max_queued_jobs = 2;
    snprintf(api.model.id, sizeof api.model.id, "dense");
    datasets(&api, m);
    jobs(&api, m);
    api.limits.max_queued_jobs = 3;
    reserved_names(&api, m);
    exports(&api, m);
    store_failures(&api, m);
    metrics_free(&metrics);
    mem_store_free(m);
    return check_done("test_api_store");
}
