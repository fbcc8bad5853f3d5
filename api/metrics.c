/* metrics.c - request counters and latency histograms, and GET /metrics. */
#include "metrics.h"
#include "serve.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "kernels.h"
#include "reply.h"
#include "work_pool.h"

const double METRICS_BUCKETS[METRICS_N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                   0.1,   0.25,   0.5,   1.0,  2.5,   10.0};

void metrics_init(Metrics *m) {
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->lock, NULL);
}

void metrics_free(Metrics *m) { pthread_mutex_destroy(&m->lock); }

void metrics_observe(Metrics *m, int route_index, int http_status, double seconds) {
    int slot = route_index < 0 || route_index >= METRICS_MAX_ROUTES - 1 ? METRICS_MAX_ROUTES - 1 : route_index;
    pthread_mutex_lock(&m->lock);
    MetricsRoute *r = &m->routes[slot];
    for (int i = 0; i < METRICS_MAX_STATUSES; i++) {
        if (r->statuses[i].status == http_status || r->statuses[i].status == 0) {
            r->statuses[i].status = http_status;
            r->statuses[i].count++;
            break;
        }
    }
    int b = 0;
    while (b < METRICS_N_BUCKETS && seconds > METRICS_BUCKETS[b]) b++;
    if (b < METRICS_N_BUCKETS) r->buckets[b]++;
    r->n++;
    r->sum_seconds += seconds;
    pthread_mutex_unlock(&m->lock);
}

/* ---- exposition -------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
} Text;

static void put(Text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(Text *t, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = t->buf ? vsnprintf(t->buf + t->len, t->cap - t->len, fmt, ap) : -1;
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) { t->len += (size_t)n; return; }
        size_t nc = t->cap ? t->cap * 2 : 8192;
        char *nb = realloc(t->buf, nc);
        if (!nb) return;
        t->buf = nb;
        t->cap = nc;
    }
}

static const char *route_label(int i) { return i < API_N_ROUTES ? API_ROUTES[i].name : "unmatched"; }

static void put_requests(Text *t, const Metrics *m) {
    put(t, "# HELP gf_http_requests_total HTTP requests by route and status.\n"
           "# TYPE gf_http_requests_total counter\n");
    for (int i = 0; i < METRICS_MAX_ROUTES; i++)
        for (int k = 0; k < METRICS_MAX_STATUSES && m->routes[i].statuses[k].status; k++)
            put(t, "gf_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n", route_label(i),
                m->routes[i].statuses[k].status, (unsigned long long)m->routes[i].statuses[k].count);
    put(t, "# HELP gf_http_request_duration_seconds Time from request start to response queued.\n"
           "# TYPE gf_http_request_duration_seconds histogram\n");
    for (int i = 0; i < METRICS_MAX_ROUTES; i++) {
        const MetricsRoute *r = &m->routes[i];
        if (!r->n) continue;
        uint64_t cum = 0;
        for (int b = 0; b < METRICS_N_BUCKETS; b++) {
            cum += r->buckets[b];
            put(t, "gf_http_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %llu\n", route_label(i),
                METRICS_BUCKETS[b], (unsigned long long)cum);
        }
        put(t, "gf_http_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %llu\n", route_label(i),
            (unsigned long long)r->n);
        put(t, "gf_http_request_duration_seconds_sum{route=\"%s\"} %.6f\n", route_label(i), r->sum_seconds);
        put(t, "gf_http_request_duration_seconds_count{route=\"%s\"} %llu\n", route_label(i),
            (unsigned long long)r->n);
    }
}

static void put_store(Text *t, const StoreCounts *c) {
    put(t, "# HELP gf_queue_depth Fine-tuning jobs waiting to run.\n# TYPE gf_queue_depth gauge\n"
           "gf_queue_depth %llu\n", (unsigned long long)c->jobs_by_status[0]);
    put(t, "# HELP gf_jobs Fine-tuning jobs by status.\n# TYPE gf_jobs gauge\n");
    for (int i = 0; i < 5; i++)
        put(t, "gf_jobs{status=\"%s\"} %llu\n", STORE_JOB_STATUSES[i], (unsigned long long)c->jobs_by_status[i]);
    put(t, "# HELP gf_datasets Stored datasets.\n# TYPE gf_datasets gauge\ngf_datasets %llu\n",
        (unsigned long long)c->datasets);
    put(t, "# HELP gf_adapters Registered adapters.\n# TYPE gf_adapters gauge\ngf_adapters %llu\n",
        (unsigned long long)c->adapters);
}

static void put_hist(Text *t, const char *name, const char *help, const uint64_t *h, double sum) {
    put(t, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int b = 0; b < SERVE_HIST_BUCKETS; b++) {
        cum += h[b];
        put(t, "%s_bucket{le=\"%g\"} %llu\n", name, SERVE_HIST_BOUNDS[b], (unsigned long long)cum);
    }
    cum += h[SERVE_HIST_BUCKETS];
    put(t, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)cum, name, sum, name,
        (unsigned long long)cum);
}

/* The serving engine's gauges, counters and latency histograms. */
static void put_serving(Text *t, ServeEngine *e) {
    ServeStats s;
    serve_stats(e, &s);
    put(t, "# HELP gf_inference_queue_depth Inference requests waiting for a slot.\n# TYPE gf_inference_queue_depth gauge\n"
           "gf_inference_queue_depth %d\n", s.queued);
    put(t, "# HELP gf_inference_running Sequences in the running batch.\n# TYPE gf_inference_running gauge\n"
           "gf_inference_running %d\n", s.running);
    put(t, "# HELP gf_inference_tokens_per_second Generated tokens per second (last second).\n"
           "# TYPE gf_inference_tokens_per_second gauge\ngf_inference_tokens_per_second %.3f\n", s.tokens_per_s);
    put(t, "# HELP gf_inference_requests_total Inference requests by outcome.\n# TYPE gf_inference_requests_total counter\n"
           "gf_inference_requests_total{outcome=\"completed\"} %llu\ngf_inference_requests_total{outcome=\"failed\"} %llu\n"
           "gf_inference_requests_total{outcome=\"cancelled\"} %llu\n", (unsigned long long)s.completed,
        (unsigned long long)s.failed, (unsigned long long)s.cancelled);
    put(t, "# HELP gf_inference_generated_tokens_total Tokens generated.\n# TYPE gf_inference_generated_tokens_total counter\n"
           "gf_inference_generated_tokens_total %llu\n", (unsigned long long)s.generated_tokens);
    put(t, "# HELP gf_adapter_loads_total Adapters loaded into the engine.\n# TYPE gf_adapter_loads_total counter\n"
           "gf_adapter_loads_total %llu\n", (unsigned long long)s.adapter_loads);
    put(t, "# HELP gf_adapters_adopted_total Jobs' adapters served from their device slab as trained, without a "
           "copy.\n# TYPE gf_adapters_adopted_total counter\ngf_adapters_adopted_total %llu\n",
        (unsigned long long)s.adapters_adopted);
    put(t, "# HELP gf_adapter_uploads_total Adapters' parameters uploaded to the device, by the thread that did it: "
           "staged (the submitting thread, off the decode path) or engine.\n# TYPE gf_adapter_uploads_total counter\n"
           "gf_adapter_uploads_total{thread=\"staged\"} %llu\ngf_adapter_uploads_total{thread=\"engine\"} %llu\n",
        (unsigned long long)s.adapter_uploads_staged, (unsigned long long)s.adapter_uploads_engine);
    put(t, "# HELP gf_decode_graph_steps_total Decode steps run as a device graph: recorded, replayed, or "
           "resubmitted op by op when the graph could not run.\n# TYPE gf_decode_graph_steps_total counter\n"
           "gf_decode_graph_steps_total{how=\"recorded\"} %llu\ngf_decode_graph_steps_total{how=\"replayed\"} %llu\n"
           "gf_decode_graph_steps_total{how=\"resubmitted\"} %llu\n", (unsigned long long)s.graph_recorded,
        (unsigned long long)s.graph_replayed, (unsigned long long)s.graph_resubmitted);
    put(t, "# HELP gf_decode_steps_padded_total Decode steps padded to a bucket of rows so that a device graph of the "
           "bucket can run them.\n# TYPE gf_decode_steps_padded_total counter\ngf_decode_steps_padded_total %llu\n",
        (unsigned long long)s.graph_padded);
    put(t, "# HELP gf_adapter_evictions_total Idle adapters dropped beyond the resident budget.\n"
           "# TYPE gf_adapter_evictions_total counter\ngf_adapter_evictions_total %llu\n",
        (unsigned long long)s.adapter_evictions);
    put(t, "# HELP gf_vision_cache_lookups_total Images looked up in the vision cache, by result.\n"
           "# TYPE gf_vision_cache_lookups_total counter\ngf_vision_cache_lookups_total{result=\"hit\"} %llu\n"
           "gf_vision_cache_lookups_total{result=\"miss\"} %llu\n", (unsigned long long)s.vision_cache_hits,
        (unsigned long long)s.vision_cache_misses);
    put(t, "# HELP gf_vision_cache_bytes Vision tower outputs kept for repeated images.\n# TYPE gf_vision_cache_bytes gauge\n"
           "gf_vision_cache_bytes %llu\n# HELP gf_vision_cache_entries Images (with an adapter's vision weights) cached.\n"
           "# TYPE gf_vision_cache_entries gauge\ngf_vision_cache_entries %d\n", (unsigned long long)s.vision_cache_bytes,
        s.vision_cache_entries);
    put(t, "# HELP gf_adapters_resident Adapters in the engine's memory.\n# TYPE gf_adapters_resident gauge\n"
           "gf_adapters_resident %d\n", s.resident_adapters);
    put(t, "# HELP gf_kv_blocks_used KV cache blocks in use.\n# TYPE gf_kv_blocks_used gauge\ngf_kv_blocks_used %lld\n"
           "# HELP gf_kv_blocks_total KV cache blocks in the pool.\n# TYPE gf_kv_blocks_total gauge\ngf_kv_blocks_total %lld\n",
        (long long)s.kv_blocks_used, (long long)s.kv_blocks_total);
    put(t, "# HELP gf_kv_cache_bytes Device bytes of the KV cache's stores (both spaces).\n"
           "# TYPE gf_kv_cache_bytes gauge\ngf_kv_cache_bytes %llu\n", (unsigned long long)s.kv_bytes);
    put(t, "# HELP gf_kv_window_blocks_used KV cache blocks of the sliding-window layers in use.\n"
           "# TYPE gf_kv_window_blocks_used gauge\ngf_kv_window_blocks_used %lld\n"
           "# HELP gf_kv_window_blocks_total KV cache blocks of the sliding-window layers in the pool.\n"
           "# TYPE gf_kv_window_blocks_total gauge\ngf_kv_window_blocks_total %lld\n",
        (long long)s.kv_window_blocks_used, (long long)s.kv_window_blocks_total);
    put(t, "# HELP gf_inference_preemptions_total Sequences paused for KV blocks (resumed by recomputing).\n"
           "# TYPE gf_inference_preemptions_total counter\ngf_inference_preemptions_total %llu\n"
           "# HELP gf_inference_paused Preempted sequences waiting to resume.\n# TYPE gf_inference_paused gauge\n"
           "gf_inference_paused %d\n", (unsigned long long)s.preemptions, s.paused);
    put_hist(t, "gf_time_to_first_token_seconds", "From submission to the first generated token.", s.ttft, s.ttft_sum);
    put_hist(t, "gf_time_per_output_token_seconds", "Mean time between a request's generated tokens.", s.tpot, s.tpot_sum);
}

/* The device's time between serving steps and a training job (devsched.h). */
static void put_devsched(Text *t, DevSched *d) {
    DevSchedStats s;
    devsched_stats(d, &s);
    put(t, "# HELP gf_device_busy_seconds_total Device time held, by user.\n# TYPE gf_device_busy_seconds_total counter\n"
           "gf_device_busy_seconds_total{user=\"serving\"} %.6f\ngf_device_busy_seconds_total{user=\"training\"} %.6f\n",
        s.serve_busy_s, s.train_busy_s);
    put(t, "# HELP gf_device_serving_steps_total Serving steps, and those that found a training job on the device.\n"
           "# TYPE gf_device_serving_steps_total counter\ngf_device_serving_steps_total{waited=\"no\"} %llu\n"
           "gf_device_serving_steps_total{waited=\"yes\"} %llu\n",
        (unsigned long long)(s.serve_steps - s.serve_waits), (unsigned long long)s.serve_waits);
    put(t, "# HELP gf_device_serving_wait_seconds_total Time serving steps waited for a training job.\n"
           "# TYPE gf_device_serving_wait_seconds_total counter\ngf_device_serving_wait_seconds_total %.6f\n"
           "# HELP gf_device_serving_wait_max_seconds The longest a serving step waited.\n"
           "# TYPE gf_device_serving_wait_max_seconds gauge\ngf_device_serving_wait_max_seconds %.6f\n"
           "# HELP gf_device_serving_wait_bound_seconds How long a serving step waits before training gives way (--decode-wait-ms).\n"
           "# TYPE gf_device_serving_wait_bound_seconds gauge\ngf_device_serving_wait_bound_seconds %.6f\n",
        s.serve_wait_s, s.serve_wait_max_s, s.max_wait_s);
    put(t, "# HELP gf_device_training_yields_total Layer boundaries where a training job gave way to serving.\n"
           "# TYPE gf_device_training_yields_total counter\ngf_device_training_yields_total %llu\n"
           "# HELP gf_device_training_wait_seconds_total Time a training job waited for the device.\n"
           "# TYPE gf_device_training_wait_seconds_total counter\ngf_device_training_wait_seconds_total %.6f\n"
           "# HELP gf_device_training_span_max_seconds The longest a training job held the device between layer boundaries.\n"
           "# TYPE gf_device_training_span_max_seconds gauge\ngf_device_training_span_max_seconds %.6f\n",
        (unsigned long long)s.train_yields, s.train_wait_s, s.train_span_max_s);
}

/* Base weights live in host memory (mapped, widened or NF4), which the
 * CPU backend reads; a model on another device reads a copy there, one per
 * device and set of weights. */
static void put_weights(Text *t, WeightsGauge *g) {
    put(t, "# HELP gf_base_weights_resident_bytes Bytes of base model weights resident, all copies.\n"
           "# TYPE gf_base_weights_resident_bytes gauge\ngf_base_weights_resident_bytes{device=\"cpu0\"} %llu\n"
           "# HELP gf_base_weights_copies Copies of the base model's weights resident (serving and jobs share one).\n"
           "# TYPE gf_base_weights_copies gauge\ngf_base_weights_copies{device=\"cpu0\"} %d\n",
        (unsigned long long)atomic_load(&g->bytes), atomic_load(&g->copies));
    put(t, "# HELP gf_base_weights_device_bytes Bytes of the base weights' copies on devices other than the CPU.\n"
           "# TYPE gf_base_weights_device_bytes gauge\ngf_base_weights_device_bytes %llu\n"
           "# HELP gf_base_weights_device_copies Copies of the base weights on devices other than the CPU (every "
           "context on a device shares one).\n# TYPE gf_base_weights_device_copies gauge\ngf_base_weights_device_copies %d\n"
           "# HELP gf_base_weights_mapped_bytes Bytes of those copies kept in pinned host memory that the device "
           "reads (the per-layer embedding table).\n# TYPE gf_base_weights_mapped_bytes gauge\n"
           "gf_base_weights_mapped_bytes %llu\n",
        (unsigned long long)atomic_load(&g->device_bytes), atomic_load(&g->device_copies),
        (unsigned long long)atomic_load(&g->mapped_bytes));
}

static void put_devices(Text *t) {
    KnDeviceInfo dev[KN_MAX_DEVICES];
    int n = kn_devices_probe(dev, KN_PROBE_HELD); /* a GPU the server does not use is left alone */
    put(t, "# HELP gf_device_memory_total_bytes Memory of each compute device.\n"
           "# TYPE gf_device_memory_total_bytes gauge\n");
    for (int i = 0; i < n; i++)
        put(t, "gf_device_memory_total_bytes{device=\"%s%d\"} %llu\n", dev[i].kind == KN_DEVICE_CPU ? "cpu" : "cuda",
            dev[i].index, (unsigned long long)dev[i].memory_total);
    put(t, "# HELP gf_device_memory_free_bytes Free memory of each compute device the server uses.\n"
           "# TYPE gf_device_memory_free_bytes gauge\n");
    for (int i = 0; i < n; i++)
        if (dev[i].free_known)
            put(t, "gf_device_memory_free_bytes{device=\"%s%d\"} %llu\n",
                dev[i].kind == KN_DEVICE_CPU ? "cpu" : "cuda", dev[i].index, (unsigned long long)dev[i].memory_free);
}

/* The pool decoding requests' images off the HTTP threads. */
static void put_image_pool(Text *t, WorkPool *p) {
    WorkPoolStats s;
    work_pool_stats(p, &s);
    put(t, "# HELP gf_image_decode_requests Requests whose images are decoding (running) or waiting to (queued).\n"
           "# TYPE gf_image_decode_requests gauge\ngf_image_decode_requests{state=\"queued\"} %d\n"
           "gf_image_decode_requests{state=\"running\"} %d\n", s.queued, s.running);
    put(t, "# HELP gf_image_decode_total Requests whose images were decoded (or refused), and requests refused a place.\n"
           "# TYPE gf_image_decode_total counter\ngf_image_decode_total{outcome=\"done\"} %llu\n"
           "gf_image_decode_total{outcome=\"refused\"} %llu\n", (unsigned long long)s.done, (unsigned long long)s.refused);
}

GfStatus metrics_get(Api *api, const HttpReq *req, HttpResp *resp) {
    (void)req;
    GfError err;
    StoreCounts counts;
    if (store_counts(api->store, &counts, &err)) return reply_error(resp, &err, NULL);
    Metrics snap;
    pthread_mutex_lock(&api->metrics->lock);
    memcpy(snap.routes, api->metrics->routes, sizeof snap.routes);
    pthread_mutex_unlock(&api->metrics->lock);
    Text t = {0};
    put_requests(&t, &snap);
    put_store(&t, &counts);
    put(&t, "# HELP gf_model_loaded 1 when the base model's weights are loaded.\n# TYPE gf_model_loaded gauge\n"
            "gf_model_loaded %d\n", api->model.loaded);
    if (api->serving.serve) put_serving(&t, api->serving.serve);
    if (api->serving.images) put_image_pool(&t, api->serving.images);
    if (api->serving.sched) put_devsched(&t, api->serving.sched);
    put_weights(&t, &api->metrics->weights);
    put_devices(&t);
    put(&t, "# HELP gf_uptime_seconds Seconds since the server started.\n# TYPE gf_uptime_seconds gauge\n"
            "gf_uptime_seconds %lld\n", (long long)(gf_time_unix() - api->started_at));
    if (!t.buf) return reply_fail(resp, GF_NO_MEMORY, NULL, NULL, "out of memory");
    free(resp->body);
    resp->status = 200;
    resp->body = t.buf;
    resp->body_len = t.len;
    snprintf(resp->content_type, sizeof resp->content_type, "text/plain; version=0.0.4; charset=utf-8");
    return GF_OK;
}
