/* chat_completions.c - POST /v1/chat/completions (the OpenAI shape) and
 * POST /v1/infer (multipart for curl): checked here on the HTTP thread,
 * answered by the serving engine through inference.c.
 *
 * A request with images is prepared off the HTTP thread: the bytes are
 * taken as they came (data: URL or file part, size-checked), and decoding,
 * preprocessing and chat encoding run as one task of the API's image pool
 * (work_pool.h) behind a deferred reply that becomes the inference reply
 * once the task has submitted the request. So a large or hostile image
 * never holds an HTTP thread; /healthz and every other route keep theirs. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "dataset.h"
#include "inference.h"
#include "json_util.h"
#include "reply.h"
#include "work_pool.h"

#define MAX_PARTS_PER_MESSAGE 64
#define MAX_STOP_LEN 256

/* An image's bytes as the client sent them, not decoded yet. */
typedef struct {
    uint8_t *bytes;
    size_t n;
    char param[96];           /* where it was in the request, for its errors */
} RawImage;

/* Everything a parsed request holds until it is submitted. */
typedef struct {
    ChatMessage *msgs;
    ChatPart *parts;          /* all messages' parts; their text points into body or prompt */
    size_t n_msgs, n_parts;
    cJSON *body;              /* the chat request's JSON */
    char *prompt;             /* /v1/infer's prompt, copied */
    RawImage *raw;            /* in prompt order */
    int n_raw;
    ServeSubmit s;
    InferOptions o;
} Parsed;

static void parsed_free_text(Parsed *p) {
    free(p->msgs);
    free(p->parts);
    cJSON_Delete(p->body);
    free(p->prompt);
    for (int i = 0; i < p->n_raw; i++) free(p->raw[i].bytes);
    free(p->raw);
    p->msgs = NULL;
    p->parts = NULL;
    p->body = NULL;
    p->prompt = NULL;
    p->raw = NULL;
    p->n_msgs = p->n_parts = 0;
    p->n_raw = 0;
}

static void parsed_free(Parsed *p) {
    parsed_free_text(p);
    serve_submit_free(&p->s);
    inference_options_free(&p->o);
    memset(p, 0, sizeof *p);
}

/* Decodes and preprocesses the images (stopping early once *stop is set),
 * then chat-encodes the messages into p->s; the text and raw bytes are
 * released either way. */
static GfStatus prepare(Api *api, Parsed *p, const int *stop, GfError *err) {
    GfStatus st = GF_OK;
    if (p->n_raw) {
        p->s.images = calloc((size_t)p->n_raw, sizeof *p->s.images);
        if (!p->s.images) st = gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    for (int i = 0; !st && i < p->n_raw; i++) {
        if (stop && __atomic_load_n(stop, __ATOMIC_ACQUIRE))
            st = gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "the client went away");
        else if ((st = inference_image(api, p->raw[i].bytes, p->raw[i].n, &p->s.images[i], err)) == GF_OK)
            p->s.n_images++;
        else if (!err->param[0])
            snprintf(err->param, sizeof err->param, "%s", p->raw[i].param);
        free(p->raw[i].bytes);
        p->raw[i].bytes = NULL;
    }
    if (!st) st = inference_encode(api, p->msgs, p->n_msgs, &p->s, err);
    parsed_free_text(p);
    return st;
}

/* A deferred reply whose request is still being prepared on the image
 * pool; once submitted, it is the inference reply (out) and passes every
 * call through. Owned by the connection and the pool task: the last to let
 * go frees it. */
typedef struct {
    pthread_mutex_t mu;
    int refs;
    Api *api;
    Parsed p;                 /* the pool task's until it has run */
    int stop;                 /* the connection ended (atomic): skip the work */
    int done;                 /* out holds the reply */
    HttpResp out;             /* an error, or inference.c's deferred reply */
    void (*wake)(void *);
    void *wake_cls;
    int out_armed;
} Prep;

static void prep_unref(Prep *x) {
    pthread_mutex_lock(&x->mu);
    int last = --x->refs == 0;
    pthread_mutex_unlock(&x->mu);
    if (!last) return;
    parsed_free(&x->p);
    pthread_mutex_destroy(&x->mu);
    free(x);
}

/* Releases a reply nobody will send. */
static void reply_discard(HttpResp *r) {
    if (r->deferred.take) r->deferred.abandon(r->deferred.cls);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* Under x->mu: hands out's deferred reply the connection's wake. */
static void prep_arm_out(Prep *x) {
    if (x->done && x->wake && x->out.deferred.take && !x->out_armed) {
        x->out.deferred.arm(x->out.deferred.cls, x->wake, x->wake_cls);
        x->out_armed = 1;
    }
}

/* The pool task: prepare, submit, and wake the connection. */
static void prep_run(void *arg, int cancelled) {
    Prep *x = arg;
    HttpResp out;
    memset(&out, 0, sizeof out);
    GfError err;
    if (cancelled) {
        reply_fail(&out, GF_NOT_READY, "shutting_down", NULL, "the server is shutting down");
        out.retry_after = 1;
    } else if (!__atomic_load_n(&x->stop, __ATOMIC_ACQUIRE)) {
        if (prepare(x->api, &x->p, &x->stop, &err)) reply_error(&out, &err, NULL);
        else inference_start_or_reply(x->api, &x->p.s, &x->p.o, &out);
        memset(&x->p.s, 0, sizeof x->p.s); /* taken over (or freed) by inference_start_or_reply */
        memset(&x->p.o, 0, sizeof x->p.o);
    }
    parsed_free(&x->p);
    pthread_mutex_lock(&x->mu);
    int gone = x->stop;
    if (!gone) {
        x->out = out;
        x->done = 1;
        prep_arm_out(x);
        if (x->wake) x->wake(x->wake_cls);
    }
    pthread_mutex_unlock(&x->mu);
    if (gone) reply_discard(&out);
    prep_unref(x);
}

static void prep_arm(void *cls, void (*wake)(void *), void *wake_cls) {
    Prep *x = cls;
    pthread_mutex_lock(&x->mu);
    x->wake = wake;
    x->wake_cls = wake_cls;
    prep_arm_out(x);
    pthread_mutex_unlock(&x->mu);
}

static int prep_take(void *cls, HttpResp *resp) {
    Prep *x = cls;
    pthread_mutex_lock(&x->mu);
    int done = x->done;
    HttpDeferred d = x->out.deferred;
    if (done && !d.take) {
        *resp = x->out;
        memset(&x->out, 0, sizeof x->out);
    }
    pthread_mutex_unlock(&x->mu);
    if (!done) return 0;
    return d.take ? d.take(d.cls, resp) : 1;
}

static void prep_abandon(void *cls) {
    Prep *x = cls;
    pthread_mutex_lock(&x->mu);
    __atomic_store_n(&x->stop, 1, __ATOMIC_RELEASE);
    x->wake = NULL;
    HttpResp out = x->out;
    memset(&x->out, 0, sizeof x->out);
    pthread_mutex_unlock(&x->mu);
    reply_discard(&out); /* the inference reply, if submitted: cancels it */
    prep_unref(x);
}

/* Hands p (taken over) to the image pool behind a deferred reply, or
 * answers why not (the pool is full: 429 with Retry-After). */
static GfStatus prep_start_or_reply(Api *api, Parsed *p, HttpResp *resp) {
    GfError err;
    Prep *x = gf_calloc(1, sizeof *x, &err);
    if (!x) {
        parsed_free(p);
        return reply_error(resp, &err, NULL);
    }
    pthread_mutex_init(&x->mu, NULL);
    x->refs = 2;
    x->api = api;
    x->p = *p;
    memset(p, 0, sizeof *p);
    if (work_pool_submit(api->serving.images, prep_run, x, &err)) {
        x->refs = 1;
        prep_unref(x);
        reply_error(resp, &err, NULL);
        resp->retry_after = 1;
        return err.status;
    }
    resp->deferred = (HttpDeferred){x, prep_arm, prep_take, prep_abandon};
    return GF_OK;
}

/* Hands a parsed request to the engine (through the image pool when it has
 * images), or answers its parse error. */
static GfStatus submit_or_reply(Api *api, Parsed *p, GfStatus st, const GfError *err, HttpResp *resp) {
    if (st) {
        parsed_free(p);
        return reply_error(resp, err, NULL);
    }
    if (p->n_raw && api->serving.images) return prep_start_or_reply(api, p, resp);
    GfError e;
    if (prepare(api, p, NULL, &e)) {
        parsed_free(p);
        return reply_error(resp, &e, NULL);
    }
    return inference_start_or_reply(api, &p->s, &p->o, resp);
}

/* Takes bytes over: kept, undecoded, for prepare (their size was checked
 * as they were read: data_url_decode, read_part_file). */
static GfStatus add_image(Api *api, Parsed *p, uint8_t *bytes, size_t n, const char *param, GfError *err) {
    RawImage *r = NULL;
    if (p->n_raw >= api->serving.max_images)
        gf_error_set(err, GF_INVALID, "too_many_images", "messages", "at most %d images per request", api->serving.max_images);
    else if (!(r = realloc(p->raw, (size_t)(p->n_raw + 1) * sizeof *r)))
        gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    if (!r) {
        free(bytes);
        return err->status;
    }
    p->raw = r;
    r[p->n_raw] = (RawImage){bytes, n, ""};
    snprintf(r[p->n_raw].param, sizeof r[p->n_raw].param, "%s", param);
    p->n_raw++;
    return GF_OK;
}

/* An image part: {"type":"image_url","image_url":{"url":"data:..."}} (or the
 * url as a plain string). Only data: URLs; the server connects nowhere. */
static GfStatus image_part(Api *api, Parsed *p, const cJSON *part, const char *param, GfError *err) {
    const cJSON *iu = cJSON_GetObjectItemCaseSensitive(part, "image_url");
    const cJSON *url = cJSON_IsObject(iu) ? cJSON_GetObjectItemCaseSensitive(iu, "url") : iu;
    if (!cJSON_IsString(url))
        return gf_error_set(err, GF_INVALID, "invalid_type", param, "image_url.url must be a string");
    if (strncmp(url->valuestring, "data:", 5) != 0)
        return gf_error_set(err, GF_INVALID, "remote_images_not_supported", param,
                            "only data: URLs are accepted; the server makes no outbound connections");
    const char *mime;
    size_t mime_len, n = 0;
    uint8_t *bytes = NULL;
    if (data_url_decode(url->valuestring, &mime, &mime_len, &bytes, &n, api->limits.image_max_bytes, err)) {
        snprintf(err->param, sizeof err->param, "%s", param);
        return err->status;
    }
    return add_image(api, p, bytes, n, param, err);
}

static GfStatus content_parts(Api *api, Parsed *p, const cJSON *content, const char *param, ChatMessage *m, GfError *err) {
    m->parts = p->parts + p->n_parts;
    if (cJSON_IsString(content)) {
        p->parts[p->n_parts++] = (ChatPart){0, content->valuestring};
        m->n_parts = 1;
        m->content_is_string = 1;
        return GF_OK;
    }
    if (!cJSON_IsArray(content) || cJSON_GetArraySize(content) < 1 || cJSON_GetArraySize(content) > MAX_PARTS_PER_MESSAGE)
        return gf_error_set(err, GF_INVALID, "invalid_type", param, "content must be a string or an array of 1 to %d parts",
                            MAX_PARTS_PER_MESSAGE);
    int k = 0;
    for (const cJSON *part = content->child; part; part = part->next, k++) {
        char pp[96];
        snprintf(pp, sizeof pp, "%s[%d]", param, k);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        if (!cJSON_IsString(type)) return gf_error_set(err, GF_INVALID, "invalid_type", pp, "a part needs a type");
        if (strcmp(type->valuestring, "text") == 0) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, "text");
            if (!cJSON_IsString(t)) return gf_error_set(err, GF_INVALID, "invalid_type", pp, "text must be a string");
            p->parts[p->n_parts++] = (ChatPart){0, t->valuestring};
        } else if (strcmp(type->valuestring, "image_url") == 0) {
            if (image_part(api, p, part, pp, err)) return err->status;
            p->parts[p->n_parts++] = (ChatPart){1, NULL};
        } else {
            return gf_error_set(err, GF_INVALID, "invalid_value", pp, "part type must be text or image_url");
        }
        m->n_parts++;
    }
    return GF_OK;
}

static GfStatus parse_messages(Api *api, const cJSON *body, Parsed *p, GfError *err) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(body, "messages");
    if (!msgs) return gf_error_set(err, GF_INVALID, "missing_parameter", "messages", "messages is required");
    int n = cJSON_GetArraySize(msgs);
    if (!cJSON_IsArray(msgs) || n < 1)
        return gf_error_set(err, GF_INVALID, "invalid_type", "messages", "messages must be a non-empty array");
    if (n > api->serving.max_messages)
        return gf_error_set(err, GF_INVALID, "too_many_messages", "messages", "at most %d messages",
                            api->serving.max_messages);
    p->msgs = calloc((size_t)n, sizeof *p->msgs);
    p->parts = calloc((size_t)n * MAX_PARTS_PER_MESSAGE, sizeof *p->parts);
    if (!p->msgs || !p->parts) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    int i = 0;
    for (const cJSON *m = msgs->child; m; m = m->next, i++) {
        char param[64];
        snprintf(param, sizeof param, "messages[%d]", i);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsObject(m) || !cJSON_IsString(role))
            return gf_error_set(err, GF_INVALID, "invalid_type", param, "a message is an object with a role");
        ChatMessage *cm = &p->msgs[p->n_msgs++];
        if (strcmp(role->valuestring, "system") == 0 || strcmp(role->valuestring, "developer") == 0) cm->role = CHAT_SYSTEM;
        else if (strcmp(role->valuestring, "user") == 0) cm->role = CHAT_USER;
        else if (strcmp(role->valuestring, "assistant") == 0) cm->role = CHAT_ASSISTANT;
        else return gf_error_set(err, GF_INVALID, "invalid_value", param, "role must be system, user or assistant");
        snprintf(param + strlen(param), sizeof param - strlen(param), ".content");
        if (content_parts(api, p, cJSON_GetObjectItemCaseSensitive(m, "content"), param, cm, err)) return err->status;
    }
    return GF_OK;
}

static GfStatus parse_stop(const cJSON *body, Parsed *p, GfError *err) {
    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(body, "stop");
    if (!stop || cJSON_IsNull(stop)) return GF_OK;
    const cJSON *one = cJSON_IsString(stop) ? stop : NULL;
    if (!one && (!cJSON_IsArray(stop) || cJSON_GetArraySize(stop) > INFER_MAX_STOP))
        return gf_error_set(err, GF_INVALID, cJSON_IsArray(stop) ? "too_many_stop_sequences" : "invalid_type", "stop",
                            "stop is a string or an array of at most %d strings", INFER_MAX_STOP);
    for (const cJSON *s = one ? one : stop->child; s; s = one ? NULL : s->next) {
        if (!cJSON_IsString(s) || !s->valuestring[0] || strlen(s->valuestring) > MAX_STOP_LEN)
            return gf_error_set(err, GF_INVALID, "invalid_value", "stop", "stop strings are 1 to %d bytes", MAX_STOP_LEN);
        p->o.stop[p->o.n_stop] = strdup(s->valuestring);
        if (!p->o.stop[p->o.n_stop++]) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    return GF_OK;
}

/* Sampling and length settings (OpenAI names and ranges). */
static GfStatus parse_settings(Api *api, const cJSON *body, Parsed *p, GfError *err) {
    JsonCtx c = {body, "", NULL, err};
    int64_t max_tokens = 0, legacy = 0, top_k = 0, seed = 0, n = 1;
    double temperature = 1.0, top_p = 1.0, pres = 0, freq = 0;
    int stream = 0, usage = 0;
    const char *model = NULL;
    if (json_get_string(&c, "model", 1, STORE_NAME_MAX - 1, NULL, &model) ||
        json_get_int(&c, "max_completion_tokens", 0, 1, api->serving.max_tokens, 0, &max_tokens) ||
        json_get_int(&c, "max_tokens", 0, 1, api->serving.max_tokens, 0, &legacy) ||
        json_get_number(&c, "temperature", 0, 0, 0, 2, 1.0, &temperature) ||
        json_get_number(&c, "top_p", 0, 0, 1, 1, 1.0, &top_p) || json_get_int(&c, "top_k", 0, 0, 1000000, 0, &top_k) ||
        json_get_int(&c, "seed", 0, INT64_MIN / 2, INT64_MAX / 2, 0, &seed) || json_get_int(&c, "n", 0, 1, 1, 1, &n) ||
        json_get_number(&c, "presence_penalty", 0, 0, 0, 0, 0, &pres) ||
        json_get_number(&c, "frequency_penalty", 0, 0, 0, 0, 0, &freq) || json_get_bool(&c, "stream", 0, &stream))
        return err->status;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(body, "stream_options");
    JsonCtx sc = {so, "stream_options", NULL, err};
    if (cJSON_IsObject(so) && json_get_bool(&sc, "include_usage", 0, &usage)) return err->status;
    if (inference_resolve_model(api, model, &p->o, err)) return err->status;
    p->s.max_tokens = max_tokens ? max_tokens : legacy ? legacy : 256;
    p->s.sample = (SampleParams){(float)temperature, (float)top_p, (int)top_k};
    p->s.seed = (uint64_t)seed;
    p->o.stream = stream;
    p->o.include_usage = usage;
    p->o.chat = 1;
    return GF_OK;
}

static const char *const CHAT_KEYS[] = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                                        "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "user",
                                        "presence_penalty", "frequency_penalty", NULL};

static GfStatus not_serving_or_reply(Api *api, HttpResp *resp) {
    if (api->serving.serve) return GF_OK;
    reply_fail(resp, GF_NOT_READY, "model_not_loaded", NULL, "no model is loaded: %s",
               api->model.not_ready_reason[0] ? api->model.not_ready_reason : "the server was started without one");
    resp->retry_after = 30;
    return GF_NOT_READY;
}

GfStatus chat_completions_create(Api *api, const HttpReq *req, HttpResp *resp) {
    if (not_serving_or_reply(api, resp)) return GF_NOT_READY;
    GfError err;
    cJSON *body = json_parse_body(req->body, req->body_len, &err);
    if (!body) return reply_error(resp, &err, NULL);
    Parsed p;
    memset(&p, 0, sizeof p);
    p.body = body; /* the parts' text points into it until encoded */
    JsonCtx c = {body, "", NULL, &err};
    GfStatus st = json_only_keys(&c, CHAT_KEYS);
    if (!st) st = parse_settings(api, body, &p, &err);
    if (!st) st = parse_stop(body, &p, &err);
    if (!st) st = parse_messages(api, body, &p, &err);
    return submit_or_reply(api, &p, st, &err, resp);
}

/* ---- /v1/infer ---------------------------------------------------------------- */

static GfStatus read_part_file(const HttpPart *part, uint8_t **out, size_t *n, uint64_t max, GfError *err) {
    if (part->size > max)
        return gf_error_set(err, GF_TOO_LARGE, "image_too_large", "image", "the image is %llu bytes, over the %llu-byte limit",
                            (unsigned long long)part->size, (unsigned long long)max);
    FILE *f = fopen(part->path, "rb");
    *out = f ? malloc(part->size ? part->size : 1) : NULL;
    *n = *out ? fread(*out, 1, part->size, f) : 0;
    if (f) fclose(f);
    if (!*out || *n != part->size) {
        free(*out);
        *out = NULL;
        return gf_error_set(err, GF_IO, "io_error", "image", "cannot read the uploaded image");
    }
    return GF_OK;
}

static GfStatus infer_field_int(const HttpReq *req, const char *name, int64_t lo, int64_t hi, int64_t def, int64_t *out,
                                GfError *err) {
    const HttpPart *p = find_part(req, name);
    *out = def;
    if (!p) return GF_OK;
    char *end;
    long long v = p->is_file ? 0 : strtoll(p->value, &end, 10);
    if (p->is_file || !p->value[0] || *end || v < lo || v > hi)
        return gf_error_set(err, GF_INVALID, "invalid_value", name, "%s must be an integer in [%lld, %lld]", name,
                            (long long)lo, (long long)hi);
    *out = v;
    return GF_OK;
}

static GfStatus infer_parse(Api *api, const HttpReq *req, Parsed *p, GfError *err) {
    const HttpPart *prompt = find_part(req, "prompt"), *adapter = find_part(req, "adapter");
    if (!prompt || prompt->is_file || !prompt->value[0])
        return gf_error_set(err, GF_INVALID, "missing_parameter", "prompt", "prompt is required (-F prompt=...)");
    const char *model = adapter && !adapter->is_file && adapter->value[0] ? adapter->value : api->model.id;
    int64_t max_tokens;
    if (inference_resolve_model(api, model, &p->o, err) ||
        infer_field_int(req, "max_tokens", 1, api->serving.max_tokens, 256, &max_tokens, err))
        return err->status;
    p->msgs = calloc(1, sizeof *p->msgs);
    p->parts = calloc((size_t)api->serving.max_images + 1, sizeof *p->parts);
    p->prompt = strdup(prompt->value); /* the request's fields go when the handler returns */
    if (!p->msgs || !p->parts || !p->prompt) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    for (size_t i = 0; i < req->n_parts; i++) {
        const HttpPart *part = &req->parts[i];
        if (strcmp(part->name, "image") != 0) continue;
        if (!part->is_file) return gf_error_set(err, GF_INVALID, "invalid_type", "image", "image must be a file (-F image=@F)");
        uint8_t *bytes = NULL;
        size_t n = 0;
        if (read_part_file(part, &bytes, &n, api->limits.image_max_bytes, err)) return err->status;
        if (add_image(api, p, bytes, n, "image", err)) return err->status;
        p->parts[p->n_parts++] = (ChatPart){1, NULL};
    }
    p->parts[p->n_parts++] = (ChatPart){0, p->prompt};
    p->msgs[0] = (ChatMessage){.role = CHAT_USER, .parts = p->parts, .n_parts = p->n_parts};
    p->n_msgs = 1;
    p->s.max_tokens = max_tokens;
    p->s.sample = (SampleParams){0.0f, 1.0f, 0};
    return GF_OK;
}

GfStatus infer_create(Api *api, const HttpReq *req, HttpResp *resp) {
    if (not_serving_or_reply(api, resp)) return GF_NOT_READY;
    static const char *const allowed[] = {"image", "prompt", "adapter", "max_tokens", NULL};
    if (only_parts_or_reply(req, resp, allowed)) return GF_INVALID;
    GfError err;
    Parsed p;
    memset(&p, 0, sizeof p);
    GfStatus st = infer_parse(api, req, &p, &err);
    return submit_or_reply(api, &p, st, &err, resp);
}
