/* job_follow.c - server-sent events of a fine-tuning job, woken by the job
 * worker's commits. */
#include "job_follow.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reply.h"

#define BATCH 64

typedef struct Follower {
    struct Follower *next;
    JobHub *hub;
    Api *api;
    char job[STORE_ID_MAX];
    int64_t after;
    void (*wake)(void *);    /* under hub->mu */
    void *wake_cls;
    /* reader side (one HTTP thread at a time) */
    char *buf;
    size_t len, cap, pos;
    int ended;               /* the end event is in buf */
} Follower;

struct JobHub {
    pthread_mutex_t mu;
    Follower *list;
    int closed;
};

JobHub *job_hub_new(void) {
    JobHub *h = calloc(1, sizeof *h);
    if (h) pthread_mutex_init(&h->mu, NULL);
    return h;
}

void job_hub_notify(JobHub *h, const char *job_id) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    for (Follower *f = h->list; f; f = f->next)
        if (f->wake && strcmp(f->job, job_id) == 0) f->wake(f->wake_cls);
    pthread_mutex_unlock(&h->mu);
}

void job_hub_close(JobHub *h) {
    if (!h) return;
    pthread_mutex_lock(&h->mu);
    h->closed = 1;
    for (Follower *f = h->list; f; f = f->next)
        if (f->wake) f->wake(f->wake_cls);
    pthread_mutex_unlock(&h->mu);
}

void job_hub_free(JobHub *h) {
    if (!h) return;
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* ---- the stream ------------------------------------------------------------------ */

static int put(Follower *f, const char *s, size_t n) {
    if (f->len + n > f->cap) {
        size_t cap = (f->len + n) * 2 + 256;
        char *b = realloc(f->buf, cap);
        if (!b) return -1;
        f->buf = b;
        f->cap = cap;
    }
    memcpy(f->buf + f->len, s, n);
    f->len += n;
    return 0;
}

static void put_event(Follower *f, long long id, const char *type, cJSON *data) {
    char *json = cJSON_PrintUnformatted(data);
    cJSON_Delete(data);
    if (!json) return;
    char head[96];
    int n = id >= 0 ? snprintf(head, sizeof head, "id: %lld\nevent: %s\ndata: ", id, type)
                    : snprintf(head, sizeof head, "event: %s\ndata: ", type);
    put(f, head, (size_t)n);
    put(f, json, strlen(json));
    put(f, "\n\n", 2);
    free(json);
}

static int job_over(const char *status) {
    return strcmp(status, "succeeded") == 0 || strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0;
}

/* Appends the events after f->after; the end event once the job is over and
 * every event is out (or the server is stopping). */
static void refill(Follower *f) {
    JobEvent ev[BATCH];
    int n = 0, more = 0;
    GfError err;
    JobRow row;
    int have_row = store_job_get(f->api->store, f->job, &row, &err) == GF_OK;
    if (store_job_events(f->api->store, f->job, f->after, BATCH, ev, &n, &more, &err) == GF_OK) {
        for (int i = 0; i < n; i++) {
            put_event(f, (long long)ev[i].seq, ev[i].type, jobs_event_json(&ev[i]));
            f->after = ev[i].seq;
        }
    }
    pthread_mutex_lock(&f->hub->mu);
    int closed = f->hub->closed;
    pthread_mutex_unlock(&f->hub->mu);
    if (more || n) return;
    if (!have_row || job_over(row.status) || closed) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "status", have_row ? row.status : "unknown");
        cJSON_AddStringToObject(o, "reason", closed && !(have_row && job_over(row.status)) ? "server_stopping" : "job_ended");
        put_event(f, -1, "end", o);
        f->ended = 1;
    }
}

static ssize_t follow_read(void *cls, uint64_t pos, char *out, size_t max) {
    Follower *f = cls;
    (void)pos;
    if (f->pos == f->len) {
        f->pos = f->len = 0;
        if (f->ended) return 0;
        refill(f);
        if (!f->len) return HTTP_STREAM_WAIT;
    }
    size_t n = f->len - f->pos < max ? f->len - f->pos : max;
    memcpy(out, f->buf + f->pos, n);
    f->pos += n;
    return (ssize_t)n;
}

/* ---- the deferred reply ---------------------------------------------------------------- */

static void follow_arm(void *cls, void (*wake)(void *), void *wake_cls) {
    Follower *f = cls;
    pthread_mutex_lock(&f->hub->mu);
    f->wake = wake;
    f->wake_cls = wake_cls;
    pthread_mutex_unlock(&f->hub->mu);
}

static int follow_take(void *cls, HttpResp *resp) {
    reply_event_stream(resp, follow_read, cls);
    return 1;
}

static void follow_abandon(void *cls) {
    Follower *f = cls;
    pthread_mutex_lock(&f->hub->mu);
    for (Follower **p = &f->hub->list; *p; p = &(*p)->next)
        if (*p == f) {
            *p = f->next;
            break;
        }
    pthread_mutex_unlock(&f->hub->mu);
    free(f->buf);
    free(f);
}

GfStatus job_follow_or_reply(Api *api, const char *job_id, int64_t after, HttpResp *resp) {
    GfError err;
    JobRow row;
    if (store_job_get(api->store, job_id, &row, &err)) return reply_error(resp, &err, NULL);
    JobHub *h = api->job_hub;
    Follower *f = h ? calloc(1, sizeof *f) : NULL;
    if (!f) return reply_fail(resp, GF_NOT_READY, "not_ready", NULL, "event streams are not available");
    f->hub = h;
    f->api = api;
    f->after = after;
    snprintf(f->job, sizeof f->job, "%s", job_id);
    pthread_mutex_lock(&h->mu);
    int closed = h->closed;
    if (!closed) {
        f->next = h->list;
        h->list = f;
    }
    pthread_mutex_unlock(&h->mu);
    if (closed) {
        free(f);
        return reply_fail(resp, GF_NOT_READY, "shutting_down", NULL, "the server is shutting down");
    }
    resp->deferred = (HttpDeferred){f, follow_arm, follow_take, follow_abandon};
    return GF_OK;
}

cJSON *jobs_event_json(const JobEvent *e) {
    cJSON *o = cJSON_CreateObject();
    char id[40];
    snprintf(id, sizeof id, "ftevent-%lld", (long long)e->seq);
    cJSON_AddStringToObject(o, "id", id);  /* OpenAI's cursor: ?after= takes it, or the seq */
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
