/* metrics.h - the server's counters, exported as Prometheus text.
 *
 * Requests are counted by route (index into API_ROUTES, or the "unmatched"
 * slot) and HTTP status; latencies go into one histogram per route. Updated
 * by the HTTP server after each response (any thread; a mutex guards the
 * table), read by GET /metrics. The weights gauge is updated by the
 * GemmaWeights it is handed to (atomics). Gauges that live elsewhere (queue depth,
 * datasets, jobs, adapters, devices) are read at scrape time.
 */
#ifndef GF_METRICS_H
#define GF_METRICS_H

#include <pthread.h>
#include <stdint.h>

#include "weights.h"

#define METRICS_MAX_ROUTES 40       /* API routes + "unmatched" */
#define METRICS_MAX_STATUSES 24     /* distinct HTTP statuses tracked per route */
#define METRICS_N_BUCKETS 12

typedef struct {
    int status;
    uint64_t count;
} MetricsStatusCount;

typedef struct {
    MetricsStatusCount statuses[METRICS_MAX_STATUSES];
    uint64_t buckets[METRICS_N_BUCKETS];  /* cumulative at export, per-bucket here */
    uint64_t n;
    double sum_seconds;
} MetricsRoute;

typedef struct Metrics {
    pthread_mutex_t lock;
    MetricsRoute routes[METRICS_MAX_ROUTES];
    uint64_t bytes_received;
    WeightsGauge weights;           /* base weights resident: the served copy and any job's own */
} Metrics;

extern const double METRICS_BUCKETS[METRICS_N_BUCKETS]; /* upper bounds, seconds */

void metrics_init(Metrics *m);
void metrics_free(Metrics *m);
/* route_index: 0..n_routes-1, or -1 for requests that matched no route. */
void metrics_observe(Metrics *m, int route_index, int http_status, double seconds);

#endif
