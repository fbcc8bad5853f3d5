/* api.h - the REST API: the route table, the context handlers share, and the
 * entry point the HTTP server calls for each routed request.
 *
 * Api is created by the server at start-up and lives until shutdown; its
 * fields are read-only after api_init except Metrics, which is internally
 * synchronized. Handlers run on HTTP pool threads, parse and validate with
 * cJSON, call the store port or the engine, and fill an HttpResp. No SQL, no
 * libmicrohttpd, no tensor math here.
 */
#ifndef GF_API_H
#define GF_API_H

#include <stdint.h>
#include <cjson/cJSON.h>

#include "chat.h"
#include "config.h"
#include "http.h"
#include "preprocess.h"
#include "store.h"

typedef struct Metrics Metrics; /* metrics.h: the counters this API updates */

typedef struct {
    uint64_t json_body_max;          /* bytes, JSON routes */
    uint64_t dataset_upload_max;     /* bytes, whole multipart body */
    uint64_t adapter_upload_max;     /* bytes */
    int max_queued_jobs;             /* 429 beyond */
    int max_lora_rank;
    uint64_t dataset_min_examples;
    uint64_t image_max_bytes;
    uint64_t image_max_pixels;
} ApiLimits;

/* What the server knows of the base model. */
typedef struct {
    char id[STORE_NAME_MAX];         /* served name of the base model ("" = none configured) */
    int dir_ok;                      /* the model directory was found and its config parsed */
    int loaded;                      /* weights loaded by the engine */
    char not_ready_reason[256];      /* why it is not loaded */
    const void *base_shapes;         /* AdapterBase * of the model's safetensors, or NULL */
} ApiModel;

/* Serving: what the inference routes need of the engine (NULL serve = not
 * serving: the routes answer 503 model_not_loaded). */
typedef struct {
    struct ServeEngine *serve;       /* serve.h */
    const struct Model *model;       /* read-only uses (estimates); the engine thread owns it */
    const struct Tokenizer *tok;
    const ChatTemplate *tpl;
    const PreprocessConfig *pre;
    const GemmaConfig *cfg;
    int64_t max_tokens;              /* cap on a request's max_tokens */
    int max_images;                  /* per request */
    int max_messages;
    struct WorkPool *images;         /* work_pool.h: decodes requests' images off the HTTP threads; NULL = on them */
    struct DevSched *sched;          /* devsched.h: the device shared by serving and training, or NULL */
    uint64_t memory_limit;           /* bytes this process may use on the device (--device-memory), 0 = none */
    const struct Pipeline *pipe;     /* the model, tokenizer, template and image settings together (read-only) */
} ApiServing;

typedef struct {
    Store *store;
    Metrics *metrics;
    ApiLimits limits;
    ApiModel model;
    ApiServing serving;
    struct JobHub *job_hub;          /* job_follow.h: wakes event streams; NULL = none */
    int64_t started_at;
} Api;

typedef GfStatus (*HttpHandler)(Api *api, const HttpReq *req, HttpResp *resp);

typedef enum { BODY_NONE = 0, BODY_JSON, BODY_MULTIPART } BodyKind;

typedef struct {
    const char *method;
    const char *pattern;     /* "/v1/datasets/{id}": {x} matches one safe segment */
    HttpHandler handler;
    int needs_auth;
    BodyKind body;
    uint64_t body_max;       /* 0 = the limit from ApiLimits for this body kind */
    const char *name;        /* label for metrics ("GET /v1/datasets/{id}") */
    int idempotent;          /* honours Idempotency-Key (POST that creates) */
} Route;

extern const Route API_ROUTES[];
extern const int API_N_ROUTES;

/* Sets limits to the defaults documented in the README. */
void api_limits_default(ApiLimits *limits);

/* Body cap of a route (its own or the Api default for its kind). */
uint64_t api_route_body_max(const Api *api, const Route *route);

/* ---- handlers (one file per resource) ---------------------------------- */
GfStatus health_get(Api *, const HttpReq *, HttpResp *);
GfStatus ready_get(Api *, const HttpReq *, HttpResp *);
GfStatus metrics_get(Api *, const HttpReq *, HttpResp *);
GfStatus datasets_create(Api *, const HttpReq *, HttpResp *);
GfStatus datasets_list(Api *, const HttpReq *, HttpResp *);
GfStatus datasets_get(Api *, const HttpReq *, HttpResp *);
GfStatus datasets_delete(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_create(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_list(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_get(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_cancel(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_events(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_checkpoints(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_preflight(Api *, const HttpReq *, HttpResp *);
GfStatus adapters_create(Api *, const HttpReq *, HttpResp *);
GfStatus adapters_list(Api *, const HttpReq *, HttpResp *);
GfStatus adapters_get(Api *, const HttpReq *, HttpResp *);
GfStatus adapters_delete(Api *, const HttpReq *, HttpResp *);
GfStatus adapters_download(Api *, const HttpReq *, HttpResp *);
GfStatus models_list(Api *, const HttpReq *, HttpResp *);
GfStatus models_get(Api *, const HttpReq *, HttpResp *);
GfStatus openapi_get(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_pause(Api *, const HttpReq *, HttpResp *);
GfStatus jobs_resume(Api *, const HttpReq *, HttpResp *);
GfStatus files_create(Api *, const HttpReq *, HttpResp *);
GfStatus files_list(Api *, const HttpReq *, HttpResp *);
GfStatus files_get(Api *, const HttpReq *, HttpResp *);
GfStatus files_content(Api *, const HttpReq *, HttpResp *);
GfStatus files_delete(Api *, const HttpReq *, HttpResp *);
GfStatus models_delete(Api *, const HttpReq *, HttpResp *);
GfStatus exports_merge(Api *, const HttpReq *, HttpResp *);
GfStatus exports_list(Api *, const HttpReq *, HttpResp *);
GfStatus exports_get(Api *, const HttpReq *, HttpResp *);
GfStatus exports_cancel(Api *, const HttpReq *, HttpResp *);
GfStatus exports_delete(Api *, const HttpReq *, HttpResp *);
GfStatus exports_content(Api *, const HttpReq *, HttpResp *);
GfStatus chat_completions_create(Api *, const HttpReq *, HttpResp *);
GfStatus infer_create(Api *, const HttpReq *, HttpResp *);

#endif
