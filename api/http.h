/* http.h - plain-C request and response types between the HTTP server and
 * the API handlers, independent of libmicrohttpd so handlers can be tested
 * without a socket.
 *
 * The server fills HttpReq: method, routed path, header and query lookups,
 * the body (JSON routes: in memory, at most the route's body_max) or the
 * multipart parts (file parts streamed to server-owned temporary files that
 * are deleted after the request, small fields in memory). Path parameters
 * come from the route pattern and have already been checked against a safe
 * character set. Everything in HttpReq is valid for the duration of the
 * handler call only.
 *
 * The handler fills HttpResp: status, content type, and either a malloc'd
 * body (the server frees it) or a stream callback (the server calls
 * stream_free when done). Handlers run on HTTP pool threads.
 */
#ifndef GF_HTTP_H
#define GF_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "base.h"

#define HTTP_ROUTE_PARAMS_MAX 2

typedef struct {
    const char *name;        /* form field name */
    int is_file;             /* 1: bytes are in `path`; 0: in `value` */
    const char *path;        /* server-owned temporary file (is_file) */
    const char *filename;    /* the file name the client gave (is_file; "" when none), at most 255 bytes */
    const char *value;       /* NUL-terminated field value (!is_file) */
    uint64_t size;           /* bytes */
} HttpPart;

typedef struct {
    const char *method;
    const char *path;
    const char *params[HTTP_ROUTE_PARAMS_MAX];       /* from {placeholders} */
    const char *(*header)(void *cls, const char *name); /* NULL when absent */
    const char *(*query)(void *cls, const char *name);  /* NULL when absent */
    /* Calls fn for every query argument, in order (may be NULL: none). */
    void (*query_each)(void *cls, void (*fn)(void *ctx, const char *name, const char *value), void *ctx);
    void *cls;
    const char *body;        /* JSON routes; not NUL-terminated */
    size_t body_len;
    const HttpPart *parts;   /* multipart routes */
    size_t n_parts;
    const char *upload_dir;  /* temporary directory of this request (multipart) */
    const char *request_id;
} HttpReq;

/* Reads up to max bytes at pos into buf; returns bytes written, 0 at the end,
 * -1 on error (the server then aborts the connection), or HTTP_STREAM_WAIT
 * when nothing is ready yet (deferred replies only: the server suspends the
 * connection until the producer's wake). */
typedef ssize_t (*HttpStreamRead)(void *cls, uint64_t pos, char *buf, size_t max);
#define HTTP_STREAM_WAIT ((ssize_t)-2)

/* A reply produced later by another thread (inference). The server suspends
 * the connection, no thread waits: it calls arm once with a wake function
 * that the producer calls (any thread, any number of times, never after
 * abandon has returned) when take or the stream has something new; then,
 * on each wake, take, which fills the reply (status and body, or status and
 * stream) once its head is known and returns 1, or returns 0 to keep
 * waiting. abandon is called exactly once when the connection ends (done,
 * client gone, shutdown): it cancels the work and releases cls. */
struct HttpResp;

typedef struct {
    void *cls;
    void (*arm)(void *cls, void (*wake)(void *wake_cls), void *wake_cls);
    int (*take)(void *cls, struct HttpResp *resp);
    void (*abandon)(void *cls);
} HttpDeferred;

typedef struct HttpResp {
    int status;                    /* HTTP status */
    char content_type[96];
    char *body;                    /* malloc'd, owned by the server after return */
    size_t body_len;
    char allow[64];                /* "GET, POST" for 405, else "" */
    int retry_after;               /* seconds, 0 = none */
    char content_disposition[160]; /* "" = none */
    char etag[80];                 /* "" = none */
    HttpStreamRead stream;         /* set instead of body for large downloads */
    void *stream_cls;
    void (*stream_free)(void *cls);
    uint64_t stream_size;          /* total bytes of the stream; HTTP_SIZE_UNKNOWN = chunked */
    HttpDeferred deferred;         /* set (deferred.take != NULL) instead of status for a later reply */
} HttpResp;

#define HTTP_SIZE_UNKNOWN UINT64_MAX

#endif
