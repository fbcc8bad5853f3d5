/* httpd.h - the HTTP server: libmicrohttpd glue between sockets and the API.
 *
 * Runs MHD with an internal thread pool (epoll), connection, per-IP and
 * memory limits, an idle timeout and MHD_OPTION_STRICT_FOR_CLIENT. For each
 * request, in order: Host allowlist (400 invalid_host), route match (404, or
 * 405 with Allow), API key (401 missing_api_key / invalid_api_key, keys held
 * only as SHA-256 digests and compared in constant time), declared body size
 * against the route cap (413 before any byte of the body is read),
 * Content-Type (415), then the body: JSON into memory up to the cap,
 * multipart streamed part by part into a per-request temporary directory
 * (413 when the stream passes the cap, 507 when the disk is full). The
 * handler runs on the pool thread; the response gets X-Request-Id and
 * security headers; the completion callback records metrics, writes the
 * access log line and deletes the request's temporary files, whatever way
 * the request ended (client abort and timeout included).
 *
 * Lifetime: httpd_start on the main thread after the store is open,
 * httpd_stop on the main thread (stops accepting, waits up to drain_s for
 * running requests, then closes). Static files of web/ are served without a
 * key (they hold no data); everything else needs one once keys exist.
 */
#ifndef GF_HTTPD_H
#define GF_HTTPD_H

#include <stdint.h>

#include "api.h"
#include "sha256.h"

#define HTTPD_MAX_KEYS 64
#define HTTPD_MAX_HOSTS 16

typedef struct {
    const char *bind_addr;           /* "127.0.0.1" */
    uint16_t port;
    unsigned threads;
    unsigned max_connections;
    unsigned per_ip_connections;
    unsigned timeout_s;              /* idle connection timeout */
    unsigned header_timeout_s;       /* a request's head must be complete this long after the last one (0 = off) */
    unsigned min_body_rate;          /* bytes/s an upload must average once header_timeout_s has passed (0 = off) */
    uint8_t key_digests[HTTPD_MAX_KEYS][GF_SHA256_LEN];
    int n_keys;                      /* 0 = authentication off */
    char allowed_hosts[HTTPD_MAX_HOSTS][256];
    int n_allowed_hosts;             /* besides localhost, 127.0.0.1, [::1] and bind_addr */
    const char *tmp_dir;             /* per-request upload directories go here */
    const char *web_dir;             /* static dashboard files */
} HttpdConfig;

typedef struct Httpd Httpd;

/* Starts listening. On failure returns NULL with err set. cfg and api must
 * outlive the server. */
Httpd *httpd_start(const HttpdConfig *cfg, Api *api, GfError *err);

/* The bound port (useful with port 0). */
uint16_t httpd_port(const Httpd *h);

/* Stops accepting, waits up to drain_s seconds for requests in flight, then
 * shuts down and frees. NULL-safe. */
/* drained (may be NULL) runs after the drain wait, before the daemon stops:
 * it must end every deferred reply (the serving engine's stop does). */
void httpd_stop(Httpd *h, unsigned drain_s, void (*drained)(void *cls), void *cls);

#endif
