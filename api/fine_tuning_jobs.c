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
#include "reply.h"

/* ---- hyperparameters --------------------------------------------------- */

static const char *const TARGET_NAMES[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj", NULL};

static GfStatus parse_targets(const JsonCtx *c, cJSON *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, "target_modules");
    JsonCtx tc = *c;
    if (!v || cJSON_IsNull(v) || (cJSON_IsString(v) && strcmp(v->valuestring, "all-linear") == 0)) {
        cJSON_AddStringToObject(out, "target_modules", "all-linear");
        return GF_OK;
    }
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0 || cJSON_GetArraySize(v) > 7)
        return gf_error_set(c->err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                            "'hyperparameters.target_modules' must be \"all-linear\" or a list of module names");
    cJSON *arr = cJSON_AddArrayToObject(out, "target_modules");
    for (const cJSON *e = v->child; e; e = e->next) {
        const char *const *k = TARGET_NAMES;
        while (*k && !(cJSON_IsString(e) && strcmp(*k, e->valuestring) == 0)) k++;
        if (!*k)
            return gf_error_set(tc.err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                                "'hyperparameters.target_modules' entries must be among q_proj, k_proj, v_proj, "
                                "o_proj, gate_proj, up_proj, down_proj");
        for (const cJSON *d = arr->child; d; d = d->next)
            if (strcmp(d->valuestring, *k) == 0)
                return gf_error_set(tc.err, GF_INVALID, "invalid_hyperparameter", "hyperparameters.target_modules",
                                    "'hyperparameters.target_modules' lists '%s' twice", *k);
        cJSON_AddItemToArray(arr, cJSON_CreateString(*k));
    }
    return GF_OK;
}

/* Validates every hyperparameter and writes the normalized set (defaults
 * filled in) to *out. */
static GfStatus parse_hyperparameters(const cJSON *h, int max_rank, cJSON **out, GfError *err) {
    static const cJSON empty_obj = {.type = cJSON_Object};
    JsonCtx c = {h ? h : &empty_obj, "hyperparameters", "invalid_hyperparameter", err};
    static const char *const keys[] = {
        "epochs", "learning_rate", "lr_scheduler", "warmup_ratio", "batch_size",
        "gradient_accumulation_steps", "lora_rank", "lora_alpha", "lora_dropout", "use_rslora",
        "target_modules", "quantization", "gradient_checkpointing", "max_seq_len", "eval_every",
        "save_every", "seed", NULL};
    static const char *const schedulers[] = {"cosine", "linear", "constant", NULL};
    static const char *const quant[] = {"nf4", "none", NULL};
    int64_t epochs, bs, accum, rank, seq, eval_every, save_every, seed;
    double lr, warmup, alpha, dropout;
    const char *sched, *q;
    int rslora, ckpt;
    if (json_only_keys(&c, keys) ||
        json_get_int(&c, "epochs", 0, 1, 1000, 3, &epochs) ||
        json_get_number(&c, "learning_rate", 0, 0, 1, 1.0, 5e-5, &lr) ||
        json_get_enum(&c, "lr_scheduler", schedulers, "cosine", &sched) ||
        json_get_number(&c, "warmup_ratio", 0, 0, 0, 0.5, 0.03, &warmup) ||
        json_get_int(&c, "batch_size", 0, 1, 1024, 2, &bs) ||
        json_get_int(&c, "gradient_accumulation_steps", 0, 1, 1024, 4, &accum) ||
        json_get_int(&c, "lora_rank", 0, 1, max_rank, 64, &rank) ||
        json_get_number(&c, "lora_alpha", 0, 0, 1, 4096, 64, &alpha) ||
        json_get_number(&c, "lora_dropout", 0, 0, 0, 0.9, 0.05, &dropout) ||
        json_get_bool(&c, "use_rslora", 0, &rslora) ||
        json_get_enum(&c, "quantization", quant, "nf4", &q) ||
        json_get_bool(&c, "gradient_checkpointing", 1, &ckpt) ||
        json_get_int(&c, "max_seq_len", 0, 16, 131072, 2048, &seq) ||
        json_get_int(&c, "eval_every", 0, 0, 1000000, 0, &eval_every) ||
        json_get_int(&c, "save_every", 0, 1, 1000000, 100, &save_every) ||
        json_get_int(&c, "seed", 0, 0, 2147483647, 42, &seed))
        return GF_INVALID;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "epochs", (double)epochs);
    cJSON_AddNumberToObject(o, "learning_rate", lr);
    cJSON_AddStringToObject(o, "lr_scheduler", sched);
    cJSON_AddNumberToObject(o, "warmup_ratio", warmup);
    cJSON_AddNumberToObject(o, "batch_size", (double)bs);
    cJSON_AddNumberToObject(o, "gradient_accumulation_steps", (double)accum);
    cJSON_AddNumberToObject(o, "lora_rank", (double)rank);
    cJSON_AddNumberToObject(o, "lora_alpha", alpha);
    cJSON_AddNumberToObject(o, "lora_dropout", dropout);
    cJSON_AddBoolToObject(o, "use_rslora", rslora);
    if (parse_targets(&c, o)) { cJSON_Delete(o); return GF_INVALID; }
    cJSON_AddStringToObject(o, "quantization", q);
    cJSON_AddBoolToObject(o, "gradient_checkpointing", ckpt);
    cJSON_AddNumberToObject(o, "max_seq_len", (double)seq);
    cJSON_AddNumberToObject(o, "eval_every", (double)eval_every);
    cJSON_AddNumberToObject(o, "save_every", (double)save_every);
    cJSON_AddNumberToObject(o, "seed", (double)seed);
    *out = o;
    return GF_OK;
}

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
    if (parse_hyperparameters(cJSON_IsObject(h) ? h : NULL, api->limits.max_lora_rank, &norm, err)) return GF_INVALID;
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
    return reply_json(resp, 200, job_json(&row));
}

static cJSON *event_json(const JobEvent *e) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "seq", (double)e->seq);
    cJSON_AddStringToObject(o, "object", "fine_tuning.job.event");
    cJSON_AddNumberToObject(o, "created_at", (double)e->created_at);
    cJSON_AddStringToObject(o, "level", e->level);
    cJSON_AddStringToObject(o, "type", e->type);
    cJSON_AddStringToObject(o, "message", e->message);
    cJSON *d = e->data[0] ? cJSON_Parse(e->data) : NULL;
    if (d) cJSON_AddItemToObject(o, "data", d);
    else cJSON_AddNullToObject(o, "data");
    return o;
}

GfStatus jobs_events(Api *api, const HttpReq *req, HttpResp *resp) {
    const char *accept = req->header(req->cls, "Accept");
    if (accept && strstr(accept, "text/event-stream"))
        return reply_fail(resp, GF_NOT_IMPLEMENTED, "not_implemented", NULL,
                          "following events as a stream arrives with the trainer; poll with ?after=<seq>");
    const char *a = req->query(req->cls, "after"), *l = req->query(req->cls, "limit");
    char *end;
    long long after = 0, limit = PAGE_DEFAULT;
    if (a && (!*a || (after = strtoll(a, &end, 10), *end) || after < 0))
        return reply_fail(resp, GF_INVALID, "invalid_value", "after", "'after' must be a non-negative event seq");
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
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(data, event_json(&ev[i]));
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
