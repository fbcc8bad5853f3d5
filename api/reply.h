/* reply.h - JSON responses: success bodies and the error shape
 * {"error":{"type","code","message","param"}} with the HTTP status mapped
 * from GfStatus by one table. Thread-safe; every function fills an HttpResp
 * whose body is malloc'd (the server frees it).
 */
#ifndef GF_REPLY_H
#define GF_REPLY_H

#include <cjson/cJSON.h>

#include "http.h"

/* HTTP status and default API code for a GfStatus. */
int reply_http_status(GfStatus status);
const char *reply_default_code(GfStatus status);

/* Writes err as the error body. `details` (may be NULL, ownership taken) is
 * attached as error.details. Returns err->status. */
GfStatus reply_error(HttpResp *resp, const GfError *err, cJSON *details);

/* Shorthand: builds the GfError and replies. */
GfStatus reply_fail(HttpResp *resp, GfStatus status, const char *code, const char *param,
                    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* 200 {"id": id, "object": object, "deleted": true}, as OpenAI's deletes answer. */
GfStatus reply_deleted(HttpResp *resp, const char *id, const char *object);

/* Serializes json (takes ownership, deletes it) with the given status. */
GfStatus reply_json(HttpResp *resp, int http_status, cJSON *json);

/* Plain bytes with a content type (copies body). */
GfStatus reply_text(HttpResp *resp, int http_status, const char *content_type, const char *body,
                    size_t len);

/* 200 text/event-stream of unknown length, read through read(cls, ...)
 * (which may answer HTTP_STREAM_WAIT: deferred replies only). */
void reply_event_stream(HttpResp *resp, HttpStreamRead read, void *cls);

#endif
