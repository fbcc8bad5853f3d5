/* httpd.c - libmicrohttpd glue: admission checks, bodies, responses. */
#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fsutil.h"
#include "metrics.h"
#include "reply.h"
#include "router.h"
#include "static_files.h"
#include "store_open.h"

#define MAX_PARTS 8
#define FIELD_MAX 4096
#define NO_BODY_MAX 1024       /* tolerated and ignored on routes without a body */

struct Req;

/* A connection, from accept to close: when it started waiting for a
 * request head, and the request in progress (NULL between requests). */
typedef struct Conn {
    int fd;
    double since;
    struct Req *req;
    struct Conn *prev, *next;
} Conn;

struct Httpd {
    struct MHD_Daemon *mhd;
    const HttpdConfig *cfg;
    Api *api;
    /* a sweeper ends connections whose head is late (slowloris) and looks
     * after suspended connections whose client may have gone */
    pthread_mutex_t conns_mu;
    Conn *conns;
    pthread_t sweeper;
    int sweeping;              /* under conns_mu: 0 asks the sweeper to stop */
    pthread_cond_t sweep_cv;
    int line_ends_known;       /* libmicrohttpd's in-place head layout is known (see head_lines_bad) */
};

/* Per-request state, hung on MHD's con_cls; freed in on_completed. */
typedef struct Req {
    Httpd *httpd;
    int fd;                    /* the connection's socket */
    int http11;                /* an HTTP/1.1 request (may be sent an interim 1xx) */
    double t_start;
    char request_id[40];
    char method[16];
    char *path;                /* copy of the URL, for the log */
    char *param_storage;
    const Route *route;
    int route_index;           /* -1 = unmatched */
    const char *params[HTTP_ROUTE_PARAMS_MAX];
    int responded;             /* a response has been queued */
    int status;                /* HTTP status sent */
    uint64_t body_max, received;
    GfError fail;              /* set when the body phase failed */
    GfError early;             /* refused from its head, answered once its body is read (refuse()) */
    char early_allow[64];
    /* JSON body */
    char *body;
    size_t body_len, body_cap;
    /* multipart */
    struct MHD_PostProcessor *pp;
    char upload_dir[4096];
    HttpPart parts[MAX_PARTS];
    char part_paths[MAX_PARTS][4200];
    char part_names[MAX_PARTS][72];
    char part_filenames[MAX_PARTS][256];
    char *field_values[MAX_PARTS];
    size_t n_parts;
    int cur_fd;                /* open file of the current file part, -1 */
    /* Idempotency-Key: the request's content is hashed as it arrives */
    char idem_key[256];        /* "" = none */
    GfSha256 idem_hash;
    /* deferred reply (inference): the connection sleeps until the producer wakes it */
    struct MHD_Connection *conn;
    HttpDeferred def;          /* def.take != NULL once armed */
    pthread_mutex_t wake_mu;   /* guards suspended, woken, probed and settled */
    int suspended, woken;
    int probed;                /* an interim 100 was sent after the client's FIN (client_gone) */
    int settled;               /* handed back unsuspended once (sleep_unless_woken) */
    HttpStreamRead def_read;   /* the deferred reply's stream */
    void *def_read_cls;
} Req;

/* ---- small helpers ---------------------------------------------------- */

static const char *header_get(void *cls, const char *name) {
    return MHD_lookup_connection_value(cls, MHD_HEADER_KIND, name);
}

static const char *query_get(void *cls, const char *name) {
    return MHD_lookup_connection_value(cls, MHD_GET_ARGUMENT_KIND, name);
}

typedef struct {
    void (*fn)(void *ctx, const char *name, const char *value);
    void *ctx;
} QueryEach;

static enum MHD_Result query_one(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    QueryEach *e = cls;
    e->fn(e->ctx, key, value ? value : "");
    return MHD_YES;
}

static void query_each(void *cls, void (*fn)(void *ctx, const char *name, const char *value), void *ctx) {
    QueryEach e = {fn, ctx};
    MHD_get_connection_values(cls, MHD_GET_ARGUMENT_KIND, query_one, &e);
}

static void add_headers(struct MHD_Response *r, const Req *q, const HttpResp *resp) {
    MHD_add_response_header(r, "Content-Type", resp->content_type[0] ? resp->content_type : "application/json");
    MHD_add_response_header(r, "X-Request-Id", q->request_id);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, "Content-Security-Policy",
                            "default-src 'self'; script-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'");
    MHD_add_response_header(r, "Cache-Control", q->route_index == -2 ? "no-cache" : "no-store");
    if (resp->allow[0]) MHD_add_response_header(r, "Allow", resp->allow);
    if (resp->status == 401) MHD_add_response_header(r, "WWW-Authenticate", "Bearer");
    if (resp->content_disposition[0]) MHD_add_response_header(r, "Content-Disposition", resp->content_disposition);
    if (resp->etag[0]) MHD_add_response_header(r, "ETag", resp->etag);
    if (resp->retry_after > 0) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", resp->retry_after);
        MHD_add_response_header(r, "Retry-After", ra);
    }
}

/* Hands resp to MHD. Takes ownership of the body or stream. */
static enum MHD_Result send_resp(struct MHD_Connection *c, Req *q, HttpResp *resp, int close_after) {
    struct MHD_Response *r;
    if (resp->stream) {
        uint64_t size = resp->stream_size == HTTP_SIZE_UNKNOWN ? MHD_SIZE_UNKNOWN : resp->stream_size;
        r = MHD_create_response_from_callback(size, 64 * 1024, (MHD_ContentReaderCallback)resp->stream,
                                              resp->stream_cls, resp->stream_free);
        resp->stream = NULL;
    } else {
        r = MHD_create_response_from_buffer(resp->body_len, resp->body, MHD_RESPMEM_MUST_FREE);
        if (r) resp->body = NULL;
    }
    free(resp->body);
    if (!r) return MHD_NO;
    add_headers(r, q, resp);
    if (close_after) MHD_add_response_header(r, "Connection", "close");
    if (strcmp(q->method, "HEAD") == 0) { /* nothing special: MHD omits the body */ }
    q->responded = 1;
    q->status = resp->status;
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)resp->status, r);
    MHD_destroy_response(r);
    return ok;
}

/* Error response; with `allow` it is a 405 listing the allowed methods. */
static enum MHD_Result send_error(struct MHD_Connection *c, Req *q, const GfError *err, const char *allow,
                                  int close_after) {
    HttpResp resp;
    memset(&resp, 0, sizeof resp);
    reply_error(&resp, err, NULL);
    if (allow) {
        snprintf(resp.allow, sizeof resp.allow, "%s", allow);
        resp.status = 405;
    }
    return send_resp(c, q, &resp, close_after);
}

/* ---- admission: host, route, key, size, type ------------------------- */

static long long declared_length(struct MHD_Connection *c) {
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    return cl ? strtoll(cl, NULL, 10) : -1;
}

/* A body this size or smaller is read and dropped before a refusal is
 * answered, so the client, still sending, reads the answer rather than a
 * reset connection (nginx's lingering close); a larger one, or a client
 * that asked `Expect: 100-continue` (it sends nothing until told), gets the
 * answer at once, and so does a declared length over the route's cap (413
 * before the body, RELIABILITY.md H8). */
#define LINGER_MAX ((long long)16 << 20)

static int sends_body(struct MHD_Connection *c) {
    long long len = declared_length(c);
    const char *te = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding");
    return len > 0 || (te && strcasecmp(te, "chunked") == 0);
}

/* Answers err now, or records it to answer after the body (see LINGER_MAX). */
static enum MHD_Result refuse(struct MHD_Connection *c, Req *q, const GfError *err, const char *allow) {
    const char *expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Expect");
    long long len = declared_length(c);
    if (!sends_body(c) || (expect && strcasecmp(expect, "100-continue") == 0) || len > LINGER_MAX)
        return send_error(c, q, err, allow, 1);
    q->early = *err;
    snprintf(q->early_allow, sizeof q->early_allow, "%s", allow ? allow : "");
    return MHD_YES;
}

static int host_allowed(const HttpdConfig *cfg, const char *host) {
    if (!host || !*host || strpbrk(host, "/?#\\@ ")) return 0;
    char name[256];
    snprintf(name, sizeof name, "%s", host);
    char *colon = name[0] == '[' ? strchr(name, ']') : strrchr(name, ':');
    if (colon && name[0] == '[') colon = colon[1] == ':' ? colon + 1 : NULL;
    if (colon) *colon = '\0';
    if (strcasecmp(name, "localhost") == 0 || strcmp(name, "127.0.0.1") == 0 || strcmp(name, "[::1]") == 0)
        return 1;
    if (cfg->bind_addr && strcmp(name, cfg->bind_addr) == 0 && strcmp(cfg->bind_addr, "0.0.0.0") != 0) return 1;
    for (int i = 0; i < cfg->n_allowed_hosts; i++)
        if (strcasecmp(name, cfg->allowed_hosts[i]) == 0) return 1;
    return 0;
}

/* 0 = authorized; else fills err (401). */
static int check_key(const HttpdConfig *cfg, struct MHD_Connection *c, GfError *err) {
    if (cfg->n_keys == 0) return 0;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || !*h) {
        gf_error_set(err, GF_UNAUTHORIZED, "missing_api_key", NULL,
                     "an API key is required: send 'Authorization: Bearer <key>'");
        return -1;
    }
    if (strncasecmp(h, "Bearer ", 7) != 0) { /* the scheme is case-insensitive (RFC 9110 §11.1) */
        gf_error_set(err, GF_UNAUTHORIZED, "invalid_api_key", NULL, "the Authorization header must be 'Bearer <key>'");
        return -1;
    }
    uint8_t digest[GF_SHA256_LEN];
    gf_sha256(h + 7, strlen(h + 7), digest);
    int match = 0;
    for (int i = 0; i < cfg->n_keys; i++) match |= gf_ct_equal(digest, cfg->key_digests[i], GF_SHA256_LEN);
    if (!match) {
        gf_error_set(err, GF_UNAUTHORIZED, "invalid_api_key", NULL, "the API key is not valid");
        return -1;
    }
    return 0;
}

static int content_type_is(struct MHD_Connection *c, const char *want) {
    const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    size_t n = strlen(want);
    return ct && strncasecmp(ct, want, n) == 0 && (ct[n] == '\0' || ct[n] == ';' || ct[n] == ' ');
}

/* Declared Content-Length, or -1 when absent (chunked). */
static enum MHD_Result post_iterator(void *cls, enum MHD_ValueKind kind, const char *key, const char *filename,
                                     const char *content_type, const char *transfer_encoding, const char *data,
                                     uint64_t off, size_t size);

static GfStatus start_multipart(Req *q, struct MHD_Connection *c, GfError *err) {
    snprintf(q->upload_dir, sizeof q->upload_dir, "%s/up-%s-XXXXXX", q->httpd->cfg->tmp_dir, q->request_id);
    if (!mkdtemp(q->upload_dir)) {
        q->upload_dir[0] = '\0';
        return gf_error_set(err, errno == ENOSPC ? GF_NO_SPACE : GF_IO, errno == ENOSPC ? "insufficient_storage" : "io_error",
                            NULL, "cannot create upload storage");
    }
    q->pp = MHD_create_post_processor(c, 64 * 1024, post_iterator, q);
    if (!q->pp)
        return gf_error_set(err, GF_INVALID, "invalid_multipart", NULL,
                            "the multipart body cannot be parsed (missing or invalid boundary)");
    return GF_OK;
}

/* Idempotency-Key: 1..255 printable ASCII characters. */
static GfStatus read_idempotency_key(Req *q, struct MHD_Connection *c, GfError *err) {
    const char *k = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Idempotency-Key");
    if (!k) return GF_OK;
    size_t n = strlen(k);
    int ok = n >= 1 && n < sizeof q->idem_key;
    for (size_t i = 0; ok && i < n; i++) ok = k[i] >= 0x21 && k[i] <= 0x7e;
    if (!ok)
        return gf_error_set(err, GF_INVALID, "invalid_idempotency_key", "Idempotency-Key",
                            "Idempotency-Key must be 1 to 255 printable ASCII characters");
    memcpy(q->idem_key, k, n + 1);
    gf_sha256_init(&q->idem_hash);
    return GF_OK;
}

typedef struct {
    int host, length, encoding, bad_name;
} HeaderCounts;

/* RFC 9110's token characters, which a header name is made of. */
static int is_token(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr("!#$%&'*+-.^_`|~", *s)))
            return 0;
    return 1;
}

static enum MHD_Result count_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    (void)value;
    HeaderCounts *n = cls;
    if (strcasecmp(key, "Host") == 0) n->host++;
    else if (strcasecmp(key, "Content-Length") == 0) n->length++;
    else if (strcasecmp(key, "Transfer-Encoding") == 0) n->encoding++;
    if (!is_token(key)) n->bad_name++;
    return MHD_YES;
}

/* Line ends and folded lines, which libmicrohttpd 0.9.75 accepts, read
 * back from where its parser left the head: it parses in place, turning
 * each line end into NUL bytes (CRLF two, a bare LF one; a lone CR ends
 * nothing), leaving each header as "Name\0<blanks>value" where it was, and
 * appending a folded line (one starting with a blank) to the header's
 * *name* in a new allocation. So in a head of CRLF lines without folding,
 * the version is followed by two NULs and the first name, each value by
 * two NULs and the next name (or two more NULs: the empty line), each
 * value starts right after its name's NUL and blanks, and no name or
 * value holds a CR. Anything else is a bare LF, a bare CR or a folded
 * line. Used only with the libmicrohttpd whose layout this is (0.9.75). */
typedef struct {
    const char *next;          /* where the next line must start */
    int bad;
} LineWalk;

static enum MHD_Result walk_line(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    LineWalk *w = cls;
    const char *p = key + strlen(key) + 1, *end = value + strlen(value);
    while (p < value && (*p == ' ' || *p == '\t')) p++;
    if (key != w->next || p != value || end[1] != '\0' || strchr(key, '\r') || strchr(value, '\r')) {
        w->bad = 1;
        return MHD_NO;
    }
    w->next = end + 2;
    return MHD_YES;
}

static int head_lines_bad(struct MHD_Connection *c, const char *version) {
    const char *v_end = version + strlen(version);
    LineWalk w = {v_end + 2, v_end[1] != '\0'};
    if (!w.bad) MHD_get_connection_values(c, MHD_HEADER_KIND, walk_line, &w);
    return w.bad || w.next[0] != '\0' || w.next[1] != '\0'; /* then the empty line, CRLF */
}

/* Framing a proxy in front could read differently (request smuggling):
 * another HTTP version than 1.0/1.1, a second Host or Content-Length,
 * both Content-Length and Transfer-Encoding, a header name that is not a
 * token (libmicrohttpd keeps the space of "Name : value" in the name),
 * line ends other than CRLF, or a folded header line. 0 when the head is
 * clean. */
static int ambiguous_head(Httpd *h, struct MHD_Connection *c, const char *version, GfError *err) {
    if (strcmp(version, "HTTP/1.1") != 0 && strcmp(version, "HTTP/1.0") != 0) {
        gf_error_set(err, GF_INVALID, "invalid_request", NULL, "only HTTP/1.0 and HTTP/1.1 are served");
        return -1;
    }
    HeaderCounts n = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, count_header, &n);
    if (n.host > 1 || n.length > 1 || (n.length && n.encoding) || n.bad_name) {
        gf_error_set(err, GF_INVALID, "invalid_request", NULL, "%s",
                     n.host > 1     ? "the request has more than one Host header"
                     : n.length > 1 ? "the request has more than one Content-Length header"
                     : n.bad_name   ? "a header name has a space or a character HTTP does not allow in names"
                                    : "the request has both Content-Length and Transfer-Encoding");
        return -1;
    }
    if (h->line_ends_known && head_lines_bad(c, version)) {
        gf_error_set(err, GF_INVALID, "invalid_request", NULL,
                     "the request head must end every line with CRLF and must not fold header lines");
        return -1;
    }
    return 0;
}

/* First call for a request: every check that needs no body. Returns 1 when
 * an error response was queued. */
static int admit(Req *q, struct MHD_Connection *c, const char *url, const char *version, enum MHD_Result *ret) {
    Httpd *h = q->httpd;
    GfError err;
    gf_error_clear(&err);
    char allow[64];
    if (ambiguous_head(h, c, version, &err)) {
        *ret = send_error(c, q, &err, NULL, 1); /* never read a body whose length is in doubt */
        return 1;
    }
    const char *host = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Host");
    if (!host_allowed(h->cfg, host)) {
        gf_error_set(&err, GF_INVALID, "invalid_host", NULL, "the Host header is not one this server answers to");
        *ret = refuse(c, q, &err, NULL);
        return 1;
    }
    if (static_files_match(q->method, url)) { q->route_index = -2; return 0; }
    /* every /v1 path needs the key before it is routed: 404 and 405 would
     * map the API for a client without one */
    if (strncmp(url, "/v1/", 4) == 0 && check_key(h->cfg, c, &err)) { *ret = refuse(c, q, &err, NULL); return 1; }
    RouterResult rr = router_match(API_ROUTES, API_N_ROUTES, q->method, url, &q->route, q->params, q->param_storage, allow);
    if (rr != ROUTER_FOUND) {
        if (rr == ROUTER_BAD_METHOD) gf_error_set(&err, GF_INVALID, "method_not_allowed", NULL, "method %s is not allowed here", q->method);
        else gf_error_set(&err, GF_NOT_FOUND, "not_found", NULL, "no such route");
        *ret = refuse(c, q, &err, rr == ROUTER_BAD_METHOD ? allow : NULL);
        return 1;
    }
    q->route_index = (int)(q->route - API_ROUTES);
    if (q->route->needs_auth && check_key(h->cfg, c, &err)) { *ret = refuse(c, q, &err, NULL); return 1; }
    q->body_max = q->route->body == BODY_NONE ? NO_BODY_MAX : api_route_body_max(h->api, q->route);
    long long len = declared_length(c);
    if (len > 0 && (unsigned long long)len > q->body_max) { /* answered before the body (RELIABILITY.md H8) */
        gf_error_set(&err, GF_TOO_LARGE, "request_too_large", NULL, "the body is %lld bytes; this route accepts at most %llu",
                     len, (unsigned long long)q->body_max);
        *ret = send_error(c, q, &err, NULL, 1);
        return 1;
    }
    int is_json = q->route->body == BODY_JSON && !content_type_is(c, "application/json");
    int is_mp = q->route->body == BODY_MULTIPART && !content_type_is(c, "multipart/form-data");
    if (is_json || is_mp) {
        gf_error_set(&err, GF_UNSUPPORTED, "unsupported_media_type", NULL, "Content-Type must be %s",
                     is_json ? "application/json" : "multipart/form-data");
        *ret = refuse(c, q, &err, NULL);
        return 1;
    }
    if (q->route->idempotent && read_idempotency_key(q, c, &err)) {
        *ret = refuse(c, q, &err, NULL);
        return 1;
    }
    if (q->route->body == BODY_MULTIPART && start_multipart(q, c, &err)) {
        *ret = refuse(c, q, &err, NULL);
        return 1;
    }
    return 0;
}

/* ---- body ------------------------------------------------------------- */

static int valid_part_name(const char *key) {
    size_t n = key ? strlen(key) : 0;
    if (n == 0 || n > 64) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)key[i] < 0x21 || (unsigned char)key[i] > 0x7e) return 0;
    return 1;
}

static GfStatus open_part(Req *q, const char *key, const char *filename, GfError *err) {
    int is_file = filename != NULL;
    for (size_t i = 0; i < q->n_parts; i++)
        if (strcmp(q->part_names[i], key) == 0)
            return gf_error_set(err, GF_INVALID, "invalid_multipart", key, "the form field '%s' appears twice", key);
    if (q->n_parts == MAX_PARTS) return gf_error_set(err, GF_INVALID, "invalid_multipart", NULL, "too many form fields");
    if (q->cur_fd >= 0) { close(q->cur_fd); q->cur_fd = -1; }
    size_t i = q->n_parts++;
    snprintf(q->part_names[i], sizeof q->part_names[i], "%s", key);
    HttpPart *p = &q->parts[i];
    p->name = q->part_names[i];
    p->is_file = is_file;
    if (is_file) {
        /* the client's name, as far as it is short, UTF-8 and without control characters */
        size_t n = strlen(filename);
        int ok = n < sizeof q->part_filenames[i] && gf_utf8_valid(filename, n);
        for (size_t k = 0; ok && k < n; k++) ok = (unsigned char)filename[k] >= 0x20 && filename[k] != 0x7f;
        snprintf(q->part_filenames[i], sizeof q->part_filenames[i], "%s", ok ? filename : "");
        p->filename = q->part_filenames[i];
        snprintf(q->part_paths[i], sizeof q->part_paths[i], "%s/part%zu", q->upload_dir, i);
        q->cur_fd = open(q->part_paths[i], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (q->cur_fd < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot store the upload");
        p->path = q->part_paths[i];
    } else {
        q->field_values[i] = calloc(1, FIELD_MAX + 1);
        if (!q->field_values[i]) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
        p->value = q->field_values[i];
    }
    return GF_OK;
}

static GfStatus append_part(Req *q, const char *data, size_t size, GfError *err) {
    HttpPart *p = &q->parts[q->n_parts - 1];
    if (!p->is_file) {
        if (p->size + size > FIELD_MAX)
            return gf_error_set(err, GF_TOO_LARGE, "request_too_large", p->name, "the form field '%s' is too long", p->name);
        memcpy(q->field_values[q->n_parts - 1] + p->size, data, size);
        p->size += size;
        return GF_OK;
    }
    while (size > 0) {
        ssize_t w = write(q->cur_fd, data, size);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0)
            return errno == ENOSPC || errno == EDQUOT
                       ? gf_error_set(err, GF_NO_SPACE, "insufficient_storage", NULL, "the server's disk is full")
                       : gf_error_set(err, GF_IO, "io_error", NULL, "cannot store the upload");
        data += w;
        size -= (size_t)w;
        p->size += (uint64_t)w;
    }
    return GF_OK;
}

static enum MHD_Result post_iterator(void *cls, enum MHD_ValueKind kind, const char *key, const char *filename,
                                     const char *content_type, const char *transfer_encoding, const char *data,
                                     uint64_t off, size_t size) {
    (void)kind;
    (void)content_type;
    (void)transfer_encoding;
    Req *q = cls;
    if (q->fail.status) return MHD_NO;
    if (!valid_part_name(key)) {
        gf_error_set(&q->fail, GF_INVALID, "invalid_multipart", NULL, "a form field has an invalid name");
        return MHD_NO;
    }
    /* MHD reports each part's value in chunks at their offset, and when the
     * bytes arrive split it may report a part again at offset 0 with
     * nothing in it: a chunk continues the last part when it has the same
     * name and starts where that part ends. */
    int new_part = q->n_parts == 0 || strcmp(q->part_names[q->n_parts - 1], key) != 0 ||
                   off != q->parts[q->n_parts - 1].size;
    if (new_part && open_part(q, key, filename, &q->fail)) return MHD_NO;
    if (q->idem_key[0]) { /* the parts' names and bytes, not the random boundary */
        if (new_part) gf_sha256_update(&q->idem_hash, key, strlen(key) + 1);
        gf_sha256_update(&q->idem_hash, data, size);
    }
    if (size && append_part(q, data, size, &q->fail)) return MHD_NO;
    return MHD_YES;
}

static void body_chunk(Req *q, const char *data, size_t size) {
    q->received += size;
    if (q->fail.status || q->responded) return;
    if (q->received > q->body_max) {
        gf_error_set(&q->fail, GF_TOO_LARGE, "request_too_large", NULL, "the body is over this route's cap of %llu bytes",
                     (unsigned long long)q->body_max);
        return;
    }
    if (q->pp) {
        if (MHD_post_process(q->pp, data, size) != MHD_YES && !q->fail.status)
            gf_error_set(&q->fail, GF_INVALID, "invalid_multipart", NULL, "the multipart body is malformed");
        return;
    }
    if (q->route_index < 0 || q->route->body != BODY_JSON) return; /* ignored */
    if (q->idem_key[0]) gf_sha256_update(&q->idem_hash, data, size);
    if (q->body_len + size > q->body_cap) {
        size_t cap = q->body_cap ? q->body_cap : 4096;
        while (cap < q->body_len + size) cap *= 2;
        char *nb = realloc(q->body, cap);
        if (!nb) { gf_error_set(&q->fail, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory"); return; }
        q->body = nb;
        q->body_cap = cap;
    }
    memcpy(q->body + q->body_len, data, size);
    q->body_len += size;
}

/* ---- dispatch ---------------------------------------------------------- */

static GfStatus finish_multipart(Req *q, GfError *err) {
    if (q->pp && MHD_destroy_post_processor(q->pp) != MHD_YES && !q->fail.status)
        gf_error_set(&q->fail, GF_INVALID, "invalid_multipart", NULL, "the multipart body ended early");
    q->pp = NULL;
    if (q->cur_fd >= 0) { close(q->cur_fd); q->cur_fd = -1; }
    if (q->fail.status) { *err = q->fail; return err->status; }
    return GF_OK;
}

/* With an Idempotency-Key: replays the first response, refuses a key reused
 * for other content (422) or still in flight (409). Returns 1 when an answer
 * was queued, 0 to run the handler. */
static int idempotency_gate(Req *q, struct MHD_Connection *c, enum MHD_Result *ret) {
    uint8_t digest[GF_SHA256_LEN];
    char hex[2 * GF_SHA256_LEN + 1];
    gf_sha256_final(&q->idem_hash, digest);
    gf_hex(digest, GF_SHA256_LEN, hex);
    IdemResult r;
    int status = 0;
    char *body = NULL;
    GfError err;
    if (store_idem_begin(q->httpd->api->store, q->idem_key, q->route->name, hex, &r, &status, &body, &err)) {
        *ret = send_error(c, q, &err, NULL, 0);
        return 1;
    }
    if (r == IDEM_NEW) return 0;
    if (r == IDEM_MISMATCH)
        gf_error_set(&err, GF_UNPROCESSABLE, "idempotency_key_reused", "Idempotency-Key",
                     "this Idempotency-Key was used for a different request");
    else if (r == IDEM_IN_PROGRESS)
        gf_error_set(&err, GF_CONFLICT, "idempotency_key_in_use", "Idempotency-Key",
                     "a request with this Idempotency-Key is still being processed");
    if (r != IDEM_REPLAY) {
        *ret = send_error(c, q, &err, NULL, 0);
        return 1;
    }
    HttpResp resp;
    memset(&resp, 0, sizeof resp);
    reply_text(&resp, status, "application/json", body, strlen(body));
    free(body);
    *ret = send_resp(c, q, &resp, 0);
    return 1;
}

/* ---- deferred replies: suspend, wake, resume ------------------------------- */

/* Producer side (any thread): something new for q. */
static void wake_conn(void *cls) {
    Req *q = cls;
    pthread_mutex_lock(&q->wake_mu);
    q->woken = 1;
    if (q->suspended) {
        q->suspended = 0;
        MHD_resume_connection(q->conn);
    }
    pthread_mutex_unlock(&q->wake_mu);
}

/* Suspends q's connection unless a wake came since `woken` was cleared;
 * 1 when suspended (or handed back to libmicrohttpd once, see below), 0
 * when the caller should look again.
 *
 * The first time, the connection goes back to libmicrohttpd unsuspended:
 * 0.9.75 keeps the poll state a connection had when it was suspended, and
 * within the request's final call that is still "read"; resumed, it would
 * read the socket, find the FIN of a client that half-closed after its
 * request, and close the connection unanswered. Handed back once, it
 * records that the request is complete ("block") and calls again at once. */
static int sleep_unless_woken(Req *q) {
    pthread_mutex_lock(&q->wake_mu);
    int sleep = !q->woken;
    if (sleep && !q->settled) {
        q->settled = 1;
    } else if (sleep) {
        q->suspended = 1;
        MHD_suspend_connection(q->conn);
    }
    pthread_mutex_unlock(&q->wake_mu);
    return sleep;
}

static void clear_woken(Req *q) {
    pthread_mutex_lock(&q->wake_mu);
    q->woken = 0;
    pthread_mutex_unlock(&q->wake_mu);
}

/* What the client's side of a TCP connection has done: still open, sent
 * its FIN (a hang-up or a half-close: the same bytes on the wire), or
 * reset the connection. */
typedef enum { PEER_OPEN, PEER_FIN, PEER_RESET } PeerState;

static PeerState peer_state(int fd) {
    struct tcp_info ti;
    socklen_t n = sizeof ti;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &n) == 0 && n >= sizeof ti.tcpi_state)
        return ti.tcpi_state == TCP_ESTABLISHED ? PEER_OPEN : ti.tcpi_state == TCP_CLOSE_WAIT ? PEER_FIN : PEER_RESET;
    char b;
    ssize_t r = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0) return PEER_FIN;
    return r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR ? PEER_RESET : PEER_OPEN;
}

/* Under q->wake_mu: 1 when q's client has gone. A FIN alone is not enough:
 * a client may half-close (shutdown(SHUT_WR)) after its request and still
 * wait for the answer. Before any of the answer is sent, an HTTP/1.1
 * client past its FIN is sent an interim "100 Continue", which every
 * HTTP/1.1 client accepts and skips; a socket the client closed answers it
 * with a reset, which the next look sees. An HTTP/1.0 client cannot be
 * sent a 1xx: its FIN counts as a hang-up. Once the answer has started,
 * writing it finds out. */
static int client_gone(Req *q) {
    static const char probe[] = "HTTP/1.1 100 Continue\r\n\r\n";
    switch (peer_state(q->fd)) {
    case PEER_OPEN: return 0;
    case PEER_RESET: return 1;
    case PEER_FIN: break;
    }
    if (q->responded) return 0;
    if (!q->http11) return 1;
    if (q->probed) return 0;
    q->probed = 1;
    return send(q->fd, probe, sizeof probe - 1, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)(sizeof probe - 1);
}

static int client_gone_now(Req *q) {
    pthread_mutex_lock(&q->wake_mu);
    int gone = client_gone(q);
    pthread_mutex_unlock(&q->wake_mu);
    return gone;
}

/* MHD's reader for a deferred stream: waits (suspended) for bytes. */
static ssize_t deferred_read(void *cls, uint64_t pos, char *buf, size_t max) {
    Req *q = cls;
    for (;;) {
        clear_woken(q);
        ssize_t n = q->def_read(q->def_read_cls, pos, buf, max);
        if (n > 0) return n;
        if (n == 0) return MHD_CONTENT_READER_END_OF_STREAM;
        if (n != HTTP_STREAM_WAIT || client_gone_now(q)) return MHD_CONTENT_READER_END_WITH_ERROR;
        if (sleep_unless_woken(q)) return 0;
    }
}

/* Sends the deferred reply once its head is known, else sleeps; a client
 * that hung up meanwhile ends the connection (abandon cancels the work). */
static enum MHD_Result deferred_poll(Req *q, struct MHD_Connection *c) {
    for (;;) {
        clear_woken(q);
        if (client_gone_now(q)) return MHD_NO;
        HttpResp resp;
        memset(&resp, 0, sizeof resp);
        if (q->def.take(q->def.cls, &resp)) {
            if (resp.stream) {
                q->def_read = resp.stream;
                q->def_read_cls = resp.stream_cls;
                resp.stream = deferred_read;
                resp.stream_cls = q;
                resp.stream_free = NULL; /* the stream belongs to the deferred reply (abandon) */
            }
            return send_resp(c, q, &resp, 0);
        }
        if (sleep_unless_woken(q)) return MHD_YES;
    }
}

static enum MHD_Result dispatch(Req *q, struct MHD_Connection *c) {
    Httpd *h = q->httpd;
    GfError err;
    if (q->route->body == BODY_MULTIPART && finish_multipart(q, &err)) return send_error(c, q, &err, NULL, 0);
    if (q->fail.status) return send_error(c, q, &q->fail, NULL, 1);
    enum MHD_Result gated;
    if (q->idem_key[0] && idempotency_gate(q, c, &gated)) return gated;
    HttpReq req = {.method = q->method, .path = q->path, .header = header_get, .query = query_get, .query_each = query_each, .cls = c,
                   .body = q->body, .body_len = q->body_len, .parts = q->parts, .n_parts = q->n_parts,
                   .upload_dir = q->upload_dir, .request_id = q->request_id};
    memcpy(req.params, q->params, sizeof req.params);
    HttpResp resp;
    memset(&resp, 0, sizeof resp);
    q->route->handler(h->api, &req, &resp);
    if (resp.deferred.take) {
        /* a suspended connection is not subject to the idle timeout: a
         * client that hangs up is seen by the sweeper, at the next wake
         * (client_gone) or at the next write */
        q->def = resp.deferred;
        q->def.arm(q->def.cls, wake_conn, q);
        return deferred_poll(q, c);
    }
    if (!resp.status) reply_fail(&resp, GF_INTERNAL, "internal_error", NULL, "the handler produced no response");
    if (q->idem_key[0] && resp.status >= 200 && resp.status < 300)
        store_idem_finish(h->api->store, q->idem_key, q->route->name, resp.status, resp.body, resp.body_len);
    else if (q->idem_key[0])
        store_idem_abort(h->api->store, q->idem_key, q->route->name);
    return send_resp(c, q, &resp, 0);
}

static enum MHD_Result serve_static(Req *q, struct MHD_Connection *c, const char *url) {
    HttpResp resp;
    memset(&resp, 0, sizeof resp);
    static_files_serve(q->httpd->cfg->web_dir, url, MHD_lookup_connection_value(c, MHD_HEADER_KIND, "If-None-Match"),
                       &resp);
    enum MHD_Result r = send_resp(c, q, &resp, 0);
    return r;
}

static Req *req_new(Httpd *h, struct MHD_Connection *c, const char *url, const char *method) {
    Req *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->httpd = h;
    q->t_start = gf_time_mono();
    q->cur_fd = -1;
    q->route_index = -1;
    q->conn = c;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    q->fd = ci ? ci->connect_fd : -1;
    pthread_mutex_init(&q->wake_mu, NULL);
    uint8_t raw[8];
    if (gf_random_bytes(raw, sizeof raw) == 0) {
        char hex[17];
        gf_hex(raw, sizeof raw, hex);
        snprintf(q->request_id, sizeof q->request_id, "req_%s", hex);
    }
    snprintf(q->method, sizeof q->method, "%s", method);
    q->path = strdup(url);
    q->param_storage = malloc(strlen(url) + 1);
    if (!q->path || !q->param_storage) {
        free(q->path);
        free(q->param_storage);
        pthread_mutex_destroy(&q->wake_mu);
        free(q);
        return NULL;
    }
    return q;
}

static Conn *conn_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* A request head arrived (q) or a request ended (NULL: waiting for the next head). */
static void conn_mark(Httpd *h, struct MHD_Connection *c, Req *q) {
    Conn *k = conn_of(c);
    if (!k) return;
    pthread_mutex_lock(&h->conns_mu);
    k->req = q;
    k->since = gf_time_mono();
    pthread_mutex_unlock(&h->conns_mu);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls) {
    Httpd *h = cls;
    Req *q = *con_cls;
    if (!q) {
        q = req_new(h, c, url, method);
        if (!q) return MHD_NO;
        *con_cls = q;
        q->http11 = strcmp(version, "HTTP/1.1") == 0;
        conn_mark(h, c, q);
        enum MHD_Result ret = MHD_YES;
        if (admit(q, c, url, version, &ret)) return ret;
        return MHD_YES;
    }
    if (q->early.status) { /* refused from its head: the body is dropped, then the answer goes */
        if (!*upload_data_size) return send_error(c, q, &q->early, q->early_allow[0] ? q->early_allow : NULL, 1);
        q->received += *upload_data_size;
        *upload_data_size = 0;
        return q->received > (uint64_t)LINGER_MAX ? MHD_NO : MHD_YES;
    }
    if (*upload_data_size) {
        /* A failed body is discarded up to the route's cap and answered at
         * its end; past the cap the connection is closed (libmicrohttpd
         * cannot answer in the middle of a body). */
        double el = gf_time_mono() - q->t_start;
        if (h->cfg->min_body_rate && h->cfg->header_timeout_s && el > (double)h->cfg->header_timeout_s &&
            (double)(q->received + *upload_data_size) < el * (double)h->cfg->min_body_rate) {
            GF_LOGI("%s %s: closing an upload slower than %u bytes/s", q->method, q->path, h->cfg->min_body_rate);
            return MHD_NO;
        }
        body_chunk(q, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return q->received > q->body_max ? MHD_NO : MHD_YES;
    }
    if (q->def.take && !q->responded) return deferred_poll(q, c);
    if (q->responded) return MHD_YES;
    if (q->route_index == -2) return serve_static(q, c, url);
    return dispatch(q, c);
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    Httpd *h = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        Conn *k = calloc(1, sizeof *k);
        if (!k || !ci) { free(k); *socket_context = NULL; return; }
        k->fd = ci->connect_fd;
        k->since = gf_time_mono();
        pthread_mutex_lock(&h->conns_mu);
        k->next = h->conns;
        if (h->conns) h->conns->prev = k;
        h->conns = k;
        pthread_mutex_unlock(&h->conns_mu);
        *socket_context = k;
    } else if (*socket_context) {
        Conn *k = *socket_context;
        pthread_mutex_lock(&h->conns_mu);
        if (k->prev) k->prev->next = k->next;
        else h->conns = k->next;
        if (k->next) k->next->prev = k->prev;
        pthread_mutex_unlock(&h->conns_mu);
        free(k);
        *socket_context = NULL;
    }
}

/* Under h->conns_mu, every quarter second: ends connections that have
 * waited longer than header_timeout_s for a complete request head, however
 * many bytes trickle in (slowloris: the idle timeout only counts silence;
 * shutdown() makes libmicrohttpd close the connection on its own thread),
 * and collects the suspended connections whose client has gone (a queued
 * request would otherwise keep its slot until its turn came). Their
 * suspended flag is cleared here, so they stay alive until the caller
 * resumes them. Returns how many went into gone[]. */
static size_t sweep(Httpd *h, struct MHD_Connection **gone, size_t max) {
    size_t n = 0;
    double now = gf_time_mono();
    for (Conn *k = h->conns; k; k = k->next) {
        Req *q = k->req;
        if (!q && h->cfg->header_timeout_s && now - k->since > (double)h->cfg->header_timeout_s) {
            GF_LOGI("closing a connection whose request head took over %u s", h->cfg->header_timeout_s);
            shutdown(k->fd, SHUT_RDWR);
            k->since = now + 1e9; /* once */
        }
        if (!q || n == max) continue;
        pthread_mutex_lock(&q->wake_mu);
        if (q->suspended && client_gone(q)) {
            q->suspended = 0;
            q->woken = 1;
            gone[n++] = q->conn;
        }
        pthread_mutex_unlock(&q->wake_mu);
    }
    return n;
}

static void *sweep_main(void *arg) {
    Httpd *h = arg;
    pthread_mutex_lock(&h->conns_mu);
    while (h->sweeping) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 250 * 1000 * 1000;
        if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
        pthread_cond_timedwait(&h->sweep_cv, &h->conns_mu, &until);
        struct MHD_Connection *gone[64];
        size_t n = sweep(h, gone, sizeof gone / sizeof gone[0]);
        pthread_mutex_unlock(&h->conns_mu);
        for (size_t i = 0; i < n; i++) MHD_resume_connection(gone[i]); /* its handler sees the client gone */
        pthread_mutex_lock(&h->conns_mu);
    }
    pthread_mutex_unlock(&h->conns_mu);
    return NULL;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    Httpd *h = cls;
    Req *q = *con_cls;
    if (!q) return;
    conn_mark(h, c, NULL);
    double dt = gf_time_mono() - q->t_start;
    int status = q->responded ? q->status : 499;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && q->responded == 0) status = 499;
    metrics_observe(q->httpd->api->metrics, q->route_index >= 0 ? q->route_index : -1, status, dt);
    GF_LOGI("%s %s %d %.1fms %s%s", q->method, q->path, status, dt * 1000.0, q->request_id,
            toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED ? " timeout" : " aborted");
    if (q->def.abandon) q->def.abandon(q->def.cls); /* no wake after this returns */
    pthread_mutex_destroy(&q->wake_mu);
    if (q->pp) MHD_destroy_post_processor(q->pp);
    if (q->cur_fd >= 0) close(q->cur_fd);
    if (q->upload_dir[0]) fs_remove_tree(q->upload_dir);
    for (size_t i = 0; i < MAX_PARTS; i++) free(q->field_values[i]);
    free(q->body);
    free(q->path);
    free(q->param_storage);
    free(q);
    *con_cls = NULL;
}

/* libmicrohttpd's messages, into our log. Its "Application reported
 * internal error" follows every MHD_NO, which this glue returns only for a
 * client that has gone (already logged as 499 with its request id). */
static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
    gf_log(strncmp(line, "Application reported internal error", 35) == 0 ? GF_LOG_DEBUG : GF_LOG_INFO,
           "libmicrohttpd: %s", line);
}

/* ---- lifetime ---------------------------------------------------------- */

Httpd *httpd_start(const HttpdConfig *cfg, Api *api, GfError *err) {
    Httpd *h = gf_calloc(1, sizeof *h, err);
    if (!h) return NULL;
    h->cfg = cfg;
    h->api = api;
    h->line_ends_known = strcmp(MHD_get_version(), "0.9.75") == 0;
    if (!h->line_ends_known)
        GF_LOGW("libmicrohttpd %s: bare-LF line ends and folded header lines are not refused (checked with 0.9.75 only)",
                MHD_get_version());
    pthread_mutex_init(&h->conns_mu, NULL);
    pthread_cond_init(&h->sweep_cv, NULL);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(cfg->port);
    if (inet_pton(AF_INET, cfg->bind_addr, &addr.sin_addr) != 1) {
        free(h);
        gf_error_set(err, GF_INVALID, NULL, "host", "--host must be an IPv4 address");
        return NULL;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG | MHD_USE_ITC |
                     MHD_ALLOW_SUSPEND_RESUME;
    h->mhd = MHD_start_daemon(
        flags, cfg->port, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_SOCK_ADDR, &addr,
        MHD_OPTION_THREAD_POOL_SIZE, cfg->threads, MHD_OPTION_CONNECTION_LIMIT, cfg->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, cfg->per_ip_connections, MHD_OPTION_CONNECTION_TIMEOUT, cfg->timeout_s,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(64 * 1024), MHD_OPTION_STRICT_FOR_CLIENT, 1,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, h, MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_END);
    if (!h->mhd) {
        pthread_mutex_destroy(&h->conns_mu);
        pthread_cond_destroy(&h->sweep_cv);
        free(h);
        gf_error_set(err, GF_IO, NULL, NULL, "cannot listen on %s:%u (port in use?)", cfg->bind_addr, cfg->port);
        return NULL;
    }
    h->sweeping = 1;
    if (pthread_create(&h->sweeper, NULL, sweep_main, h) != 0) {
        MHD_stop_daemon(h->mhd);
        pthread_mutex_destroy(&h->conns_mu);
        pthread_cond_destroy(&h->sweep_cv);
        free(h);
        gf_error_set(err, GF_NO_MEMORY, NULL, NULL, "cannot start the connection sweeper thread");
        return NULL;
    }
    return h;
}

uint16_t httpd_port(const Httpd *h) {
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_BIND_PORT);
    return info ? info->port : 0;
}

void httpd_stop(Httpd *h, unsigned drain_s, void (*drained)(void *cls), void *cls) {
    if (!h) return;
    MHD_quiesce_daemon(h->mhd);
    double deadline = gf_time_mono() + drain_s;
    while (gf_time_mono() < deadline) {
        const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
        if (!info || info->num_connections == 0) break;
        usleep(50 * 1000);
    }
    if (drained) drained(cls); /* ends deferred replies, so no connection stays suspended */
    usleep(100 * 1000);
    MHD_stop_daemon(h->mhd);
    pthread_mutex_lock(&h->conns_mu);
    int sweeping = h->sweeping;
    h->sweeping = 0;
    pthread_cond_signal(&h->sweep_cv);
    pthread_mutex_unlock(&h->conns_mu);
    if (sweeping) pthread_join(h->sweeper, NULL);
    pthread_cond_destroy(&h->sweep_cv);
    pthread_mutex_destroy(&h->conns_mu);
    free(h);
}
