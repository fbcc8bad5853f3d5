/* fine_tuning_jobs.c - /v1/fine_tuning/jobs: create with hyperparameter
 * validation, list, get, cancel, events, checkpoints. Jobs wait in the queue
 * until a trainer claims them; this file never pretends to train. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "common.h"
#include "json_util.h"
#include "hyperparameters.h"
#include "job_follow.h"
#include "kernels.h"
#include "metrics.h"
#include "reply.h"
#include "trainer.h"

/* ---- request ----------------------------------------------------------- */

/* learning_rate_multiplier multiplies the default learning rate */
#define BASE_LEARNING_RATE 5e-5

/* OpenAI's hyperparameters (n_epochs, batch_size, learning_rate_multiplier,
 * each a number or "auto" for our default) into ours, in a copy of h that
 * keeps our own keys; seed joins it. *out is NULL when there is nothing. */
static GfStatus openai_hyperparameters(const cJSON *h, const cJSON *seed, cJSON **out, GfError *err) {
    *out = h ? cJSON_Duplicate(h, 1) : seed ? cJSON_CreateObject() : NULL;
    if ((h || seed) && !*out) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    if (!*out) return GF_OK;
    static const struct { const char *from, *to; } RENAME[] = {{"n_epochs", "epochs"}, {"batch_size", "batch_size"}};
    for (size_t i = 0; i < 2; i++) {
        cJSON *v = cJSON_DetachItemFromObjectCaseSensitive(*out, RENAME[i].from);
        if (!v) continue;
        if (cJSON_IsString(v) && strcmp(v->valuestring, "auto") == 0) { cJSON_Delete(v); continue; }
        if (i == 0 && cJSON_HasObjectItem(*out, "epochs")) {
            cJSON_Delete(v);
            return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.n_epochs",
                                "give 'n_epochs' or 'epochs', not both");
        }
        cJSON_AddItemToObject(*out, RENAME[i].to, v);
    }
    cJSON *m = cJSON_DetachItemFromObjectCaseSensitive(*out, "learning_rate_multiplier");
    if (m && !(cJSON_IsString(m) && strcmp(m->valuestring, "auto") == 0)) {
        int both = cJSON_HasObjectItem(*out, "learning_rate"), bad = !cJSON_IsNumber(m) || !(m->valuedouble > 0) || m->valuedouble > 1000;
        double lr = bad ? 0 : m->valuedouble * BASE_LEARNING_RATE;
        cJSON_Delete(m);
        if (both) return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.learning_rate_multiplier",
                                      "give 'learning_rate_multiplier' or 'learning_rate', not both");
        if (bad) return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.learning_rate_multiplier",
                                     "'learning_rate_multiplier' must be \"auto\" or a number in (0, 1000]");
        cJSON_AddNumberToObject(*out, "learning_rate", lr);
    } else {
        cJSON_Delete(m);
    }
    if (seed) {
        if (cJSON_HasObjectItem(*out, "seed"))
            return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "seed", "give 'seed' or 'hyperparameters.seed', not both");
        cJSON_AddItemToObject(*out, "seed", cJSON_Duplicate(seed, 0));
    }
    return GF_OK;
}

/* OpenAI's method: {"type": "supervised", "supervised": {"hyperparameters": {...}}}. */
static GfStatus method_hyperparameters(const cJSON *method, const cJSON **h, GfError *err) {
    if (!method || cJSON_IsNull(method)) return GF_OK;
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(method, "type");
    if (!cJSON_IsObject(method) || !cJSON_IsString(type))
        return gf_error_set(err, GF_INVALID, "invalid_type", "method", "'method' must be an object with a 'type'");
    if (strcmp(type->valuestring, "supervised") != 0)
        return gf_error_set(err, GF_INVALID, "unsupported_method", "method.type",
                            "only supervised fine-tuning is supported here, not '%.40s'", type->valuestring);
    const cJSON *sup = cJSON_GetObjectItemCaseSensitive(method, "supervised");
    const cJSON *mh = cJSON_IsObject(sup) ? cJSON_GetObjectItemCaseSensitive(sup, "hyperparameters") : NULL;
    if (!mh || cJSON_IsNull(mh)) return GF_OK;
    if (*h) return gf_error_set(err, GF_INVALID, "invalid_value", "method", "give hyperparameters in 'method' or at the top level, not both");
    *h = mh;
    return GF_OK;
}

/* OpenAI's metadata: null, or an object of at most 16 string values, keys
 * of 1 to 64 bytes, values of at most 512; into out as JSON text ("" = none). */
static GfStatus parse_metadata(const cJSON *m, char out[JOB_METADATA_MAX], GfError *err) {
    out[0] = '\0';
    if (!m || cJSON_IsNull(m)) return GF_OK;
    if (!cJSON_IsObject(m))
        return gf_error_set(err, GF_INVALID, "invalid_type", "metadata", "'metadata' must be an object of strings");
    int n = 0;
    for (const cJSON *e = m->child; e; e = e->next, n++) {
        size_t k = strlen(e->string);
        if (n == 16) return gf_error_set(err, GF_INVALID, "invalid_value", "metadata", "'metadata' has more than 16 keys");
        if (k == 0 || k > 64)
            return gf_error_set(err, GF_INVALID, "invalid_value", "metadata", "metadata keys must have 1 to 64 bytes");
        if (!cJSON_IsString(e) || strlen(e->valuestring) > 512)
            return gf_error_set(err, GF_INVALID, "invalid_value", "metadata",
                                "metadata['%.64s'] must be a string of at most 512 bytes", e->string);
    }
    if (n == 0) return GF_OK;
    char *text = cJSON_PrintUnformatted(m);
    GfStatus st = !text ? gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory")
                  : strlen(text) >= JOB_METADATA_MAX
                      ? gf_error_set(err, GF_INVALID, "invalid_value", "metadata", "'metadata' is too long once encoded")
                      : GF_OK;
    if (!st) memcpy(out, text, strlen(text) + 1);
    free(text);
    return st;
}

static GfStatus parse_create(Api *api, const cJSON *body, JobRow *row, int64_t *max_seq_len, GfError *err) {
    JsonCtx c = {body, "", NULL, err};
    static const char *const keys[] = {"dataset", "validation_dataset", "training_file", "validation_file", "model", "suffix",
                                       "hyperparameters", "method", "seed", "metadata", NULL};
    const char *ds, *vds, *tf, *vf, *model, *suffix;
    if (json_only_keys(&c, keys) || json_get_string(&c, "dataset", 0, STORE_ID_MAX - 1, NULL, &ds) ||
        json_get_string(&c, "validation_dataset", 0, STORE_ID_MAX - 1, NULL, &vds) ||
        json_get_string(&c, "training_file", 0, STORE_ID_MAX - 1, NULL, &tf) ||
        json_get_string(&c, "validation_file", 0, STORE_ID_MAX - 1, NULL, &vf) ||
        json_get_string(&c, "model", 0, STORE_NAME_MAX - 1, NULL, &model) ||
        json_get_string(&c, "suffix", 0, 40, "", &suffix))
        return GF_INVALID;
    if (ds && tf) return gf_error_set(err, GF_INVALID, "invalid_value", "training_file", "give 'training_file' or 'dataset', not both");
    if (vds && vf)
        return gf_error_set(err, GF_INVALID, "invalid_value", "validation_file", "give 'validation_file' or 'validation_dataset', not both");
    if (!ds && !(ds = tf)) return gf_error_set(err, GF_INVALID, "missing_parameter", "training_file", "'training_file' is required");
    if (!vds) vds = vf ? vf : "";
    if (suffix[0] && check_object_name(suffix, "suffix", err)) return GF_INVALID;
    if (model && strcmp(model, api->model.id) != 0)
        return gf_error_set(err, GF_NOT_FOUND, "model_not_found", "model",
                            "model '%.64s' is not the base model this server fine-tunes ('%.64s')", model,
                            api->model.id[0] ? api->model.id : "none configured");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(body, "hyperparameters"), *seed = cJSON_GetObjectItemCaseSensitive(body, "seed");
    if (h && !cJSON_IsObject(h) && !cJSON_IsNull(h))
        return gf_error_set(err, GF_INVALID, "invalid_type", "hyperparameters", "'hyperparameters' must be an object");
    if (!cJSON_IsObject(h)) h = NULL;
    if (cJSON_IsNull(seed)) seed = NULL;
    if (method_hyperparameters(cJSON_GetObjectItemCaseSensitive(body, "method"), &h, err)) return GF_INVALID;
    cJSON *given, *norm;
    if (openai_hyperparameters(h, seed, &given, err)) { cJSON_Delete(given); return GF_INVALID; }
    JobParams params;
    GfStatus st = hyperparameters_parse(given, api->limits.max_lora_rank, &params, &norm, err);
    cJSON_Delete(given);
    if (st) return GF_INVALID;
    *max_seq_len = params.max_seq_len;
    char *text = cJSON_PrintUnformatted(norm);
    cJSON_Delete(norm);
    if (!text || strlen(text) >= sizeof row->hyperparameters) {
        free(text);
        return gf_error_set(err, GF_INTERNAL, NULL, NULL, "hyperparameters too long to store");
    }
    memset(row, 0, sizeof *row);
    if (parse_metadata(cJSON_GetObjectItemCaseSensitive(body, "metadata"), row->metadata, err)) return GF_INVALID;
    row->trained_tokens = -1;
    snprintf(row->hyperparameters, sizeof row->hyperparameters, "%s", text);
    free(text);
    snprintf(row->dataset_id, sizeof row->dataset_id, "%s", ds);
    snprintf(row->validation_dataset_id, sizeof row->validation_dataset_id, "%s", vds);
    snprintf(row->model, sizeof row->model, "%s", api->model.id);
    snprintf(row->suffix, sizeof row->suffix, "%s", suffix);
    return GF_OK;
}

/* ---- responses --------------------------------------------------------- */

static cJSON *job_json(const JobRow *j) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", j->id);
    cJSON_AddStringToObject(o, "object", "fine_tuning.job");
    cJSON_AddStringToObject(o, "status", j->paused && strcmp(j->status, "queued") == 0 ? "paused" : j->status);
    cJSON_AddBoolToObject(o, "cancel_requested", j->cancel_requested);
    cJSON_AddBoolToObject(o, "pause_requested", j->pause_requested);
    cJSON_AddStringToObject(o, "dataset", j->dataset_id);
    if (j->validation_dataset_id[0]) cJSON_AddStringToObject(o, "validation_dataset", j->validation_dataset_id);
    else cJSON_AddNullToObject(o, "validation_dataset");
    cJSON_AddStringToObject(o, "model", j->model);
    if (j->suffix[0]) cJSON_AddStringToObject(o, "suffix", j->suffix);
    else cJSON_AddNullToObject(o, "suffix");
    cJSON *h = cJSON_Parse(j->hyperparameters);
    if (!h) h = cJSON_CreateObject();
    /* OpenAI's names for three of them, beside ours */
    const cJSON *ep = cJSON_GetObjectItemCaseSensitive(h, "epochs"), *lr = cJSON_GetObjectItemCaseSensitive(h, "learning_rate");
    const cJSON *sd = cJSON_GetObjectItemCaseSensitive(h, "seed");
    if (cJSON_IsNumber(ep)) cJSON_AddNumberToObject(h, "n_epochs", ep->valuedouble);
    if (cJSON_IsNumber(lr)) cJSON_AddNumberToObject(h, "learning_rate_multiplier", lr->valuedouble / BASE_LEARNING_RATE);
    if (cJSON_IsNumber(sd)) cJSON_AddNumberToObject(o, "seed", sd->valuedouble);
    cJSON *method = cJSON_AddObjectToObject(o, "method");
    cJSON_AddStringToObject(method, "type", "supervised");
    cJSON_AddItemToObject(cJSON_AddObjectToObject(method, "supervised"), "hyperparameters", cJSON_Duplicate(h, 1));
    cJSON_AddItemToObject(o, "hyperparameters", h);
    /* OpenAI's job fields */
    cJSON_AddStringToObject(o, "training_file", j->dataset_id);
    if (j->validation_dataset_id[0]) cJSON_AddStringToObject(o, "validation_file", j->validation_dataset_id);
    else cJSON_AddNullToObject(o, "validation_file");
    if (j->adapter[0]) cJSON_AddStringToObject(o, "fine_tuned_model", j->adapter);
    else cJSON_AddNullToObject(o, "fine_tuned_model");
    cJSON_AddStringToObject(o, "organization_id", "gemmaforge");
    cJSON_AddItemToObject(o, "result_files", cJSON_CreateArray());
    if (j->trained_tokens >= 0) cJSON_AddNumberToObject(o, "trained_tokens", (double)j->trained_tokens);
    else cJSON_AddNullToObject(o, "trained_tokens");
    cJSON_AddItemToObject(o, "integrations", cJSON_CreateArray());
    if (strcmp(j->status, "running") == 0 && isfinite(j->eta_s) && j->eta_s >= 0)
        cJSON_AddNumberToObject(o, "estimated_finish", (double)(gf_time_unix() + (int64_t)j->eta_s));
    else
        cJSON_AddNullToObject(o, "estimated_finish");
    cJSON_AddNumberToObject(o, "created_at", (double)j->created_at);
    add_time_or_null(o, "started_at", j->started_at);
    add_time_or_null(o, "finished_at", j->finished_at);
    cJSON *p = cJSON_AddObjectToObject(o, "progress");
    add_number_or_null(p, "step", j->step < 0 ? NAN : (double)j->step);
    add_number_or_null(p, "total_steps", j->total_steps < 0 ? NAN : (double)j->total_steps);
    add_number_or_null(p, "epoch", j->epoch);
    add_number_or_null(p, "loss", j->loss);
    add_number_or_null(p, "eval_loss", j->eval_loss);
    add_number_or_null(p, "tokens_per_s", j->tokens_per_s);
    add_number_or_null(p, "eta_s", j->eta_s);
    if (j->error_code[0]) {
        cJSON *e = cJSON_AddObjectToObject(o, "error");
        cJSON_AddStringToObject(e, "code", j->error_code);
        cJSON_AddStringToObject(e, "message", j->error_message);
        if (j->error_param[0]) cJSON_AddStringToObject(e, "param", j->error_param);
        else cJSON_AddNullToObject(e, "param");
    } else {
        cJSON_AddNullToObject(o, "error");
    }
    if (j->adapter[0]) cJSON_AddStringToObject(o, "adapter", j->adapter);
    else cJSON_AddNullToObject(o, "adapter");
    cJSON *meta = j->metadata[0] ? cJSON_Parse(j->metadata) : NULL;
    if (meta) cJSON_AddItemToObject(o, "metadata", meta);
    else cJSON_AddNullToObject(o, "metadata");
    if (j->status_reason[0]) cJSON_AddStringToObject(o, "status_reason", j->status_reason);
    else cJSON_AddNullToObject(o, "status_reason");
    return o;
}

/* A job is refused when an example of its dataset (param: "training_file"
 * or "validation_file") is longer than its max_seq_len, as measured at
 * upload for the model served now. Unmeasured datasets (uploaded with no
 * model loaded, or for another model) are checked when the job starts; a
 * missing one is job_insert's to report. */
static GfStatus check_lengths(Api *api, const char *id, const char *param, int64_t max_seq_len, GfError *err) {
    DatasetRow d;
    if (!id[0]) return GF_OK;
    if (store_dataset_get(api->store, id, &d, err)) return err->status == GF_NOT_FOUND ? GF_OK : err->status;
    if (d.max_tokens <= max_seq_len || strcmp(d.tokens_model, api->model.id) != 0) return GF_OK;
    return gf_error_set(err, GF_INVALID, "sequence_too_long", "hyperparameters.max_seq_len",
                        "line %llu of %s '%s' is %lld tokens, over max_seq_len %lld: raise max_seq_len to at least "
                        "%lld or shorten that conversation", (unsigned long long)d.max_tokens_line, param, id,
                        (long long)d.max_tokens, (long long)max_seq_len, (long long)d.max_tokens);
}

GfStatus jobs_create(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    gf_error_clear(&err);
    cJSON *body = json_parse_body(req->body, req->body_len, &err);
    if (!body) return reply_error(resp, &err, NULL);
    JobRow row;
    int64_t max_seq_len = 0;
    GfStatus st = parse_create(api, body, &row, &max_seq_len, &err);
    cJSON_Delete(body);
    if (!st) st = check_lengths(api, row.dataset_id, "training_file", max_seq_len, &err);
    if (!st) st = check_lengths(api, row.validation_dataset_id, "validation_file", max_seq_len, &err);
    if (st) return reply_error(resp, &err, NULL);
    store_new_id("job", row.id);
    if (store_job_create(api->store, &row, api->limits.max_queued_jobs, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 201, job_json(&row));
}

/* OpenAI's list filter: metadata[KEY]=VALUE (all must match), or
 * metadata=null or empty (jobs without metadata). */
typedef struct {
    char keys[16][65], values[16][513];
    int n, none, bad;
} MetaFilter;

static void collect_filter(void *ctx, const char *name, const char *value) {
    MetaFilter *f = ctx;
    size_t n = strlen(name);
    if (strcmp(name, "metadata") == 0) {
        if (strcmp(value, "null") == 0 || !value[0]) f->none = 1; /* the SDKs send metadata=null as "metadata=" */
        else f->bad = 1;
        return;
    }
    if (strncmp(name, "metadata[", 9) != 0) return;
    if (name[n - 1] != ']' || n - 10 < 1 || n - 10 > 64 || f->n == 16 || strlen(value) > 512) {
        f->bad = 1;
        return;
    }
    memcpy(f->keys[f->n], name + 9, n - 10);
    f->keys[f->n][n - 10] = '\0';
    snprintf(f->values[f->n], sizeof f->values[f->n], "%s", value);
    f->n++;
}

static int job_matches(const JobRow *j, const MetaFilter *f) {
    if (f->none) return !j->metadata[0];
    if (!f->n) return 1;
    cJSON *m = j->metadata[0] ? cJSON_Parse(j->metadata) : NULL;
    int ok = m != NULL;
    for (int i = 0; ok && i < f->n; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, f->keys[i]);
        ok = cJSON_IsString(v) && strcmp(v->valuestring, f->values[i]) == 0;
    }
    cJSON_Delete(m);
    return ok;
}

/* Pages of the store until limit jobs match the filter or none are left. */
static GfStatus list_matching(Api *api, const MetaFilter *f, const char *after, int limit, JobRow *out, int *n_out,
                              int *more, GfError *err) {
    JobRow *page = calloc((size_t)limit, sizeof *page);
    if (!page) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    char cursor[STORE_NAME_MAX];
    snprintf(cursor, sizeof cursor, "%s", after);
    GfStatus st = GF_OK;
    *n_out = *more = 0;
    for (;;) {
        int n = 0, page_more = 0;
        if ((st = store_job_list(api->store, cursor, limit, page, &n, &page_more, err))) break;
        int i = 0;
        for (; i < n && *n_out < limit; i++)
            if (job_matches(&page[i], f)) out[(*n_out)++] = page[i];
        if (*n_out == limit) { *more = i < n || page_more; break; }
        if (!page_more || n == 0) break;
        snprintf(cursor, sizeof cursor, "%s", page[n - 1].id);
    }
    free(page);
    return st;
}

GfStatus jobs_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    MetaFilter *f = calloc(1, sizeof *f);
    JobRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows || !f) {
        free(rows);
        free(f);
        return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    }
    if (req->query_each) req->query_each(req->cls, collect_filter, f);
    GfError err;
    GfStatus st = f->bad ? gf_error_set(&err, GF_INVALID, "invalid_value", "metadata",
                                        "filter with metadata[KEY]=VALUE (at most 16; keys of 1 to 64 bytes, values "
                                        "of at most 512) or metadata=null")
                  : list_matching(api, f, after, limit, rows, &n, &more, &err);
    free(f);
    if (st) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, job_json(&rows[i]));
    free(rows);
    return reply_json(resp, 200, list_envelope(data, more));
}

GfStatus jobs_get(Api *api, const HttpReq *req, HttpResp *resp) {
    JobRow row;
    GfError err;
    if (store_job_get(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 200, job_json(&row));
}

GfStatus jobs_cancel(Api *api, const HttpReq *req, HttpResp *resp) {
    JobRow row;
    GfError err;
    if (store_job_cancel(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    job_hub_notify(api->job_hub, req->params[0]);
    return reply_json(resp, 200, job_json(&row));
}

GfStatus jobs_pause(Api *api, const HttpReq *req, HttpResp *resp) {
    JobRow row;
    GfError err;
    if (store_job_pause(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    job_hub_notify(api->job_hub, req->params[0]);
    return reply_json(resp, 200, job_json(&row));
}

GfStatus jobs_resume(Api *api, const HttpReq *req, HttpResp *resp) {
    JobRow row;
    GfError err;
    if (store_job_resume(api->store, req->params[0], &row, &err)) return reply_error(resp, &err, NULL);
    job_hub_notify(api->job_hub, req->params[0]);
    return reply_json(resp, 200, job_json(&row));
}

GfStatus jobs_events(Api *api, const HttpReq *req, HttpResp *resp) {
    const char *accept = req->header(req->cls, "Accept");
    const char *a = req->query(req->cls, "after"), *l = req->query(req->cls, "limit");
    const char *last = req->header(req->cls, "Last-Event-ID");
    int follow = accept && strstr(accept, "text/event-stream");
    if (follow && last && !a) a = last; /* a reconnecting EventSource resumes after the last event it saw */
    char *end;
    long long after = 0, limit = PAGE_DEFAULT;
    if (a && strncmp(a, "ftevent-", 8) == 0) a += 8; /* an event's id */
    if (a && (!*a || (after = strtoll(a, &end, 10), *end) || after < 0))
        return reply_fail(resp, GF_INVALID, "invalid_value", "after", "'after' must be an event's id or a non-negative seq");
    if (follow) return job_follow_or_reply(api, req->params[0], after, resp);
    if (l && (!*l || (limit = strtoll(l, &end, 10), *end) || limit < 1 || limit > PAGE_MAX))
        return reply_fail(resp, GF_INVALID, "invalid_value", "limit", "'limit' must be an integer from 1 to %d", PAGE_MAX);
    JobEvent *ev = calloc((size_t)limit, sizeof *ev);
    if (!ev) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    int n = 0, more = 0;
    GfError err;
    if (store_job_events(api->store, req->params[0], after, (int)limit, ev, &n, &more, &err)) {
        free(ev);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, jobs_event_json(&ev[i]));
    free(ev);
    return reply_json(resp, 200, list_envelope(data, more));
}

GfStatus jobs_checkpoints(Api *api, const HttpReq *req, HttpResp *resp) {
    enum { MAX = STORE_CHECKPOINTS_MAX };
    CheckpointRow *rows = calloc(MAX, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    int n = 0;
    GfError err;
    JobRow job;
    if (store_job_get(api->store, req->params[0], &job, &err) ||
        store_job_checkpoints(api->store, req->params[0], rows, MAX, &n, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    char adapter[STORE_NAME_MAX], model[STORE_NAME_MAX + STORE_ID_MAX + 48];
    store_job_adapter_name(&job, adapter, sizeof adapter);
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", rows[i].id);
        cJSON_AddStringToObject(o, "object", "fine_tuning.job.checkpoint");
        cJSON_AddStringToObject(o, "fine_tuning_job_id", job.id);
        snprintf(model, sizeof model, "ft:%s:%s:ckpt-step-%lld", adapter, job.id, (long long)rows[i].step);
        if (rows[i].dir[0]) cJSON_AddStringToObject(o, "fine_tuned_model_checkpoint", model);
        else cJSON_AddNullToObject(o, "fine_tuned_model_checkpoint");
        cJSON_AddNumberToObject(o, "step_number", (double)rows[i].step);
        cJSON_AddNumberToObject(o, "created_at", (double)rows[i].created_at);
        cJSON *m = cJSON_Parse(rows[i].metrics);
        cJSON_AddItemToObject(o, "metrics", m ? m : cJSON_CreateObject());
        cJSON_AddItemToArray(data, o);
    }
    free(rows);
    return reply_json(resp, 200, list_envelope(data, 0));
}

/* ---- preflight: what a job with these hyperparameters will take ---------------- */

/* "device": where a job would train, and whether it fits there now (as
 * the job checks at its start). */
static void preflight_device(Api *api, const TrainMemory *tm, const JobParams *hp, cJSON *o) {
    const ApiServing *sv = &api->serving;
    const KnBackend *be = model_backend(sv->model);
    KnDeviceInfo dev;
    GfError err;
    cJSON *d = cJSON_AddObjectToObject(o, "device");
    cJSON_AddStringToObject(d, "name", be->name);
    cJSON_AddStringToObject(d, "precision", kn_precision_name(be->ctx.precision));
    if (kn_device_info(be->ctx.device, be->ctx.index, &dev, &err)) return;
    int shares = weights_quant(model_weights(sv->model)) == hp->quantization;
    TrainFit fit;
    trainer_fit(tm, shares, dev.memory_free, sv->memory_limit, weights_gauge_bytes(&api->metrics->weights, dev.kind), &fit);
    cJSON_AddBoolToObject(d, "shares_served_base", shares);
    cJSON_AddNumberToObject(d, "needed_bytes", (double)fit.need);
    cJSON_AddNumberToObject(d, "free_bytes", (double)fit.avail);
    cJSON_AddBoolToObject(d, "fits", fit.fits);
}

static cJSON *preflight_json(const TrainMemory *tm, const LoraAdapter *a, const JobParams *hp) {
    cJSON *o = cJSON_CreateObject(), *mem = cJSON_AddObjectToObject(o, "memory_bytes");
    cJSON_AddStringToObject(o, "object", "fine_tuning.preflight");
    cJSON_AddNumberToObject(mem, "base_weights", (double)tm->weights);
    cJSON_AddNumberToObject(mem, "adapter_training_state", (double)tm->state);
    cJSON_AddNumberToObject(mem, "activations", (double)tm->activations);
    cJSON_AddNumberToObject(mem, "vision_tower", (double)tm->vision);
    cJSON_AddNumberToObject(mem, "backend_scratch", (double)tm->scratch);
    cJSON_AddNumberToObject(mem, "total", (double)tm->total);
    cJSON_AddStringToObject(o, "quantization", hp->quantization == MODEL_QUANT_NF4 ? "nf4" : "none");
    cJSON_AddNumberToObject(o, "max_seq_len", (double)hp->max_seq_len);
    cJSON_AddNumberToObject(o, "trainable_parameters", (double)tm->n_params);
    cJSON *mods = cJSON_AddArrayToObject(o, "modules");
    for (size_t i = 0; i < a->n_pairs; i++) cJSON_AddItemToArray(mods, cJSON_CreateString(a->pairs[i].module));
    return o;
}

GfStatus jobs_preflight(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    const ApiServing *sv = &api->serving;
    if (!sv->model) return reply_fail(resp, GF_NOT_READY, "model_not_loaded", NULL, "no model is loaded");
    cJSON *body = json_parse_body(req->body, req->body_len, &err);
    if (!body) return reply_error(resp, &err, NULL);
    static const char *const keys[] = {"hyperparameters", NULL};
    JsonCtx c = {body, "", NULL, &err};
    JobParams hp;
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(body, "hyperparameters");
    LoraAdapter *a = NULL;
    GfStatus st = json_only_keys(&c, keys);
    if (!st) st = hyperparameters_parse(cJSON_IsObject(h) ? h : NULL, api->limits.max_lora_rank, &hp, NULL, &err);
    if (!st) st = lora_create(sv->model, hp.targets, hp.n_targets, hp.lora_rank, hp.lora_alpha, hp.use_rslora, 0, &a, &err);
    if (st) {
        cJSON_Delete(body);
        return reply_error(resp, &err, NULL);
    }
    TrainMemory tm;
    a->dropout = hp.lora_dropout;
    trainer_memory(sv->model, sv->pre, a, hp.quantization == MODEL_QUANT_NF4, hp.max_seq_len, &tm);
    cJSON *out = preflight_json(&tm, a, &hp);
    preflight_device(api, &tm, &hp, out);
    lora_free(a);
    cJSON_Delete(body);
    return reply_json(resp, 200, out);
}
