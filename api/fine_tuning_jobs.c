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
#include "reply.h"
#include "trainer.h"

/* ---- request ----------------------------------------------------------- */

static GfStatus parse_create(Api *api, const cJSON *body, JobRow *row, GfError *err) {
    JsonCtx c = {body, "", NULL, err};
    static const char *const keys[] = {"dataset", "validation_dataset", "model", "suffix", "hyperparameters", NULL};
    const char *ds, *vds, *model, *suffix;
    if (json_only_keys(&c, keys) || json_get_string(&c, "dataset", 1, STORE_ID_MAX - 1, NULL, &ds) ||
        json_get_string(&c, "validation_dataset", 0, STORE_ID_MAX - 1, "", &vds) ||
        json_get_string(&c, "model", 0, STORE_NAME_MAX - 1, NULL, &model) ||
        json_get_string(&c, "suffix", 0, 40, "", &suffix))
        return GF_INVALID;
    if (suffix[0] && check_object_name(suffix, "suffix", err)) return GF_INVALID;
    if (model && strcmp(model, api->model.id) != 0)
        return gf_error_set(err, GF_NOT_FOUND, "model_not_found", "model",
                            "model '%.64s' is not the base model this server fine-tunes ('%.64s')", model,
                            api->model.id[0] ? api->model.id : "none configured");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(body, "hyperparameters");
    if (h && !cJSON_IsObject(h) && !cJSON_IsNull(h))
        return gf_error_set(err, GF_INVALID, "invalid_type", "hyperparameters", "'hyperparameters' must be an object");
    cJSON *norm;
    JobParams params;
    if (hyperparameters_parse(cJSON_IsObject(h) ? h : NULL, api->limits.max_lora_rank, &params, &norm, err))
        return GF_INVALID;
    char *text = cJSON_PrintUnformatted(norm);
    cJSON_Delete(norm);
    if (!text || strlen(text) >= sizeof row->hyperparameters) {
        free(text);
        return gf_error_set(err, GF_INTERNAL, NULL, NULL, "hyperparameters too long to store");
    }
    memset(row, 0, sizeof *row);
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
    cJSON_AddStringToObject(o, "status", j->status);
    cJSON_AddBoolToObject(o, "cancel_requested", j->cancel_requested);
    cJSON_AddStringToObject(o, "dataset", j->dataset_id);
    if (j->validation_dataset_id[0]) cJSON_AddStringToObject(o, "validation_dataset", j->validation_dataset_id);
    else cJSON_AddNullToObject(o, "validation_dataset");
    cJSON_AddStringToObject(o, "model", j->model);
    if (j->suffix[0]) cJSON_AddStringToObject(o, "suffix", j->suffix);
    else cJSON_AddNullToObject(o, "suffix");
    cJSON *h = cJSON_Parse(j->hyperparameters);
    cJSON_AddItemToObject(o, "hyperparameters", h ? h : cJSON_CreateObject());
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
    } else {
        cJSON_AddNullToObject(o, "error");
    }
    if (j->adapter[0]) cJSON_AddStringToObject(o, "adapter", j->adapter);
    else cJSON_AddNullToObject(o, "adapter");
    return o;
}

GfStatus jobs_create(Api *api, const HttpReq *req, HttpResp *resp) {
    GfError err;
    gf_error_clear(&err);
    cJSON *body = json_parse_body(req->body, req->body_len, &err);
    if (!body) return reply_error(resp, &err, NULL);
    JobRow row;
    GfStatus st = parse_create(api, body, &row, &err);
    cJSON_Delete(body);
    if (st) return reply_error(resp, &err, NULL);
    store_new_id("job", row.id);
    if (store_job_create(api->store, &row, api->limits.max_queued_jobs, &err)) return reply_error(resp, &err, NULL);
    return reply_json(resp, 201, job_json(&row));
}

GfStatus jobs_list(Api *api, const HttpReq *req, HttpResp *resp) {
    int limit, n = 0, more = 0;
    char after[STORE_NAME_MAX];
    if (paging_or_reply(req, resp, &limit, after)) return GF_INVALID;
    JobRow *rows = calloc((size_t)limit, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    GfError err;
    if (store_job_list(api->store, after, limit, rows, &n, &more, &err)) {
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

GfStatus jobs_events(Api *api, const HttpReq *req, HttpResp *resp) {
    const char *accept = req->header(req->cls, "Accept");
    const char *a = req->query(req->cls, "after"), *l = req->query(req->cls, "limit");
    const char *last = req->header(req->cls, "Last-Event-ID");
    int follow = accept && strstr(accept, "text/event-stream");
    if (follow && last && !a) a = last; /* a reconnecting EventSource resumes after the last event it saw */
    char *end;
    long long after = 0, limit = PAGE_DEFAULT;
    if (a && (!*a || (after = strtoll(a, &end, 10), *end) || after < 0))
        return reply_fail(resp, GF_INVALID, "invalid_value", "after", "'after' must be a non-negative event seq");
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
    enum { MAX = 100 };
    CheckpointRow *rows = calloc(MAX, sizeof *rows);
    if (!rows) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    int n = 0;
    GfError err;
    if (store_job_checkpoints(api->store, req->params[0], rows, MAX, &n, &err)) {
        free(rows);
        return reply_error(resp, &err, NULL);
    }
    cJSON *data = cJSON_CreateArray();
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "id", rows[i].id);
        cJSON_AddStringToObject(o, "object", "fine_tuning.job.checkpoint");
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

static cJSON *preflight_json(const TrainMemory *tm, const LoraAdapter *a, const JobParams *hp) {
    cJSON *o = cJSON_CreateObject(), *mem = cJSON_AddObjectToObject(o, "memory_bytes");
    cJSON_AddStringToObject(o, "object", "fine_tuning.preflight");
    cJSON_AddNumberToObject(mem, "base_weights", (double)tm->weights);
    cJSON_AddNumberToObject(mem, "adapter_training_state", (double)tm->state);
    cJSON_AddNumberToObject(mem, "activations", (double)tm->activations);
    cJSON_AddNumberToObject(mem, "vision_tower", (double)tm->vision);
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
    trainer_memory(sv->model, sv->pre, a, hp.quantization == MODEL_QUANT_NF4, hp.max_seq_len, &tm);
    cJSON *out = preflight_json(&tm, a, &hp);
    lora_free(a);
    cJSON_Delete(body);
    return reply_json(resp, 200, out);
}
