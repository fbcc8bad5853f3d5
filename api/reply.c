/* reply.c - status table and JSON replies. */
#include "reply.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct { int http; const char *code; const char *type; } TABLE[GF_STATUS_COUNT] = {
    [GF_OK] = {200, "ok", ""},
    [GF_INVALID] = {400, "invalid_request", "invalid_request_error"},
    [GF_UNAUTHORIZED] = {401, "invalid_api_key", "authentication_error"},
    [GF_FORBIDDEN] = {403, "forbidden", "permission_error"},
    [GF_NOT_FOUND] = {404, "not_found", "not_found_error"},
    [GF_CONFLICT] = {409, "conflict", "conflict_error"},
    [GF_TOO_LARGE] = {413, "request_too_large", "invalid_request_error"},
    [GF_UNSUPPORTED] = {415, "unsupported_media_type", "invalid_request_error"},
    [GF_UNPROCESSABLE] = {422, "unprocessable", "invalid_request_error"},
    [GF_BUSY] = {429, "queue_full", "rate_limit_error"},
    [GF_NOT_READY] = {503, "not_ready", "server_error"},
    [GF_NOT_IMPLEMENTED] = {501, "not_implemented", "server_error"},
    [GF_NO_SPACE] = {507, "insufficient_storage", "server_error"},
    [GF_NO_MEMORY] = {500, "out_of_memory", "server_error"},
    [GF_IO] = {500, "io_error", "server_error"},
    [GF_FORMAT] = {500, "corrupt_data", "server_error"},
    [GF_DEVICE] = {500, "device_error", "server_error"},
    [GF_CANCELLED] = {499, "cancelled", "server_error"},
    [GF_INTERNAL] = {500, "internal_error", "server_error"},
};

int reply_http_status(GfStatus s) { return s < GF_STATUS_COUNT ? TABLE[s].http : 500; }
const char *reply_default_code(GfStatus s) { return s < GF_STATUS_COUNT ? TABLE[s].code : "internal_error"; }

static GfStatus set_body(HttpResp *resp, int status, char *text) {
    resp->status = status;
    if (!text) {
        resp->status = 500;
        static const char oom[] = "{\"error\":{\"type\":\"server_error\",\"code\":\"out_of_memory\",\"message\":\"out of memory\",\"param\":null}}";
        text = strdup(oom);
    }
    free(resp->body);
    resp->body = text;
    resp->body_len = text ? strlen(text) : 0;
    snprintf(resp->content_type, sizeof resp->content_type, "application/json");
    return GF_OK;
}

GfStatus reply_error(HttpResp *resp, const GfError *err, cJSON *details) {
    GfStatus s = err->status == GF_OK ? GF_INTERNAL : err->status;
    cJSON *root = cJSON_CreateObject(), *e = cJSON_AddObjectToObject(root, "error");
    cJSON_AddStringToObject(e, "type", TABLE[s].type);
    cJSON_AddStringToObject(e, "code", err->code[0] ? err->code : TABLE[s].code);
    cJSON_AddStringToObject(e, "message", err->message[0] ? err->message : TABLE[s].code);
    if (err->param[0]) cJSON_AddStringToObject(e, "param", err->param);
    else cJSON_AddNullToObject(e, "param");
    if (details) cJSON_AddItemToObject(e, "details", details);
    set_body(resp, TABLE[s].http, cJSON_PrintUnformatted(root));
    cJSON_Delete(root);
    if (s == GF_BUSY && resp->retry_after == 0) resp->retry_after = 5;
    if (s == GF_NOT_READY && resp->retry_after == 0) resp->retry_after = 5;
    return s;
}

GfStatus reply_fail(HttpResp *resp, GfStatus status, const char *code, const char *param,
                    const char *fmt, ...) {
    GfError err;
    gf_error_clear(&err);
    err.status = status;
    snprintf(err.code, sizeof err.code, "%s", code ? code : "");
    snprintf(err.param, sizeof err.param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err.message, sizeof err.message, fmt, ap);
    va_end(ap);
    return reply_error(resp, &err, NULL);
}

GfStatus reply_json(HttpResp *resp, int http_status, cJSON *json) {
    char *text = json ? cJSON_PrintUnformatted(json) : NULL;
    cJSON_Delete(json);
    return set_body(resp, http_status, text);
}

GfStatus reply_text(HttpResp *resp, int http_status, const char *content_type, const char *body, size_t len) {
    char *copy = malloc(len + 1);
    if (!copy) return set_body(resp, 500, NULL);
    memcpy(copy, body, len);
    copy[len] = '\0';
    free(resp->body);
    resp->status = http_status;
    resp->body = copy;
    resp->body_len = len;
    snprintf(resp->content_type, sizeof resp->content_type, "%s", content_type);
    return GF_OK;
}

void reply_event_stream(HttpResp *resp, HttpStreamRead read, void *cls) {
    resp->status = 200;
    snprintf(resp->content_type, sizeof resp->content_type, "text/event-stream");
    resp->stream = read;
    resp->stream_cls = cls;
    resp->stream_size = HTTP_SIZE_UNKNOWN;
}

GfStatus reply_deleted(HttpResp *resp, const char *id, const char *object) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddBoolToObject(o, "deleted", 1);
    return reply_json(resp, 200, o);
}
