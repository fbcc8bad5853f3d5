/* mem_store.c - the store port in memory (see mem_store.h). Rows are kept
 * in insertion order; lists walk them backwards (newest first), as the
 * SQLite store orders by its seq column. */
#include "mem_store.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MEM_EVENTS_MAX (MEM_STORE_MAX * 8)

struct MemStore {
    Store port;                       /* first: the Store * handed out */
    pthread_mutex_t lock;
    GfStatus fail_next;
    DatasetRow datasets[MEM_STORE_MAX];
    JobRow jobs[MEM_STORE_MAX];
    AdapterRow adapters[MEM_STORE_MAX];
    ExportRow exports[MEM_STORE_MAX];
    JobEvent events[MEM_EVENTS_MAX];
    char event_job[MEM_EVENTS_MAX][STORE_ID_MAX];
    int n_datasets, n_jobs, n_adapters, n_exports, n_events;
    int64_t event_seq;
};

static MemStore *lock_store(Store *s) {
    MemStore *m = (MemStore *)s;
    pthread_mutex_lock(&m->lock);
    return m;
}

static GfStatus unlock_with(MemStore *m, GfStatus st) {
    pthread_mutex_unlock(&m->lock);
    return st;
}

/* The injected failure, once. */
static GfStatus injected(MemStore *m, GfError *err) {
    GfStatus st = m->fail_next;
    m->fail_next = GF_OK;
    return st ? gf_error_set(err, st, NULL, NULL, "injected failure") : GF_OK;
}

static int find_dataset(const MemStore *m, const char *id) {
    for (int i = 0; i < m->n_datasets; i++)
        if (strcmp(m->datasets[i].id, id) == 0) return i;
    return -1;
}

static int find_job(const MemStore *m, const char *id) {
    for (int i = 0; i < m->n_jobs; i++)
        if (strcmp(m->jobs[i].id, id) == 0) return i;
    return -1;
}

static int find_adapter(const MemStore *m, const char *name) {
    for (int i = 0; i < m->n_adapters; i++)
        if (strcmp(m->adapters[i].name, name) == 0) return i;
    return -1;
}

static void take_file(const char *path) {
    if (path) unlink(path);
}

/* One page of rows[count] (each `size` bytes), newest first, after the row
 * at index `found` (the one named `after`; "" = from the newest) into out. */
static GfStatus list_page(const void *rows, size_t size, int count, int found, const char *after, int limit, void *out,
                          int *n, int *has_more, GfError *err) {
    *n = *has_more = 0;
    if (after[0] && found < 0)
        return gf_error_set(err, GF_INVALID, "invalid_value", "after", "'after' names no object in this list");
    for (int i = (after[0] ? found : count) - 1; i >= 0; i--) {
        if (*n == limit) { *has_more = 1; break; }
        memcpy((char *)out + (size_t)(*n)++ * size, (const char *)rows + (size_t)i * size, size);
    }
    return GF_OK;
}

static void add_event(MemStore *m, const char *job, const char *message) {
    if (m->n_events == MEM_EVENTS_MAX) return;
    JobEvent *e = &m->events[m->n_events];
    memset(e, 0, sizeof *e);
    e->seq = ++m->event_seq;
    e->created_at = gf_time_unix();
    snprintf(e->level, sizeof e->level, "info");
    snprintf(e->type, sizeof e->type, "status");
    snprintf(e->message, sizeof e->message, "%s", message);
    snprintf(m->event_job[m->n_events++], STORE_ID_MAX, "%s", job);
}

/* ---- datasets ---------------------------------------------------------- */

static GfStatus mem_dataset_create(Store *s, const DatasetRow *row, const char *jsonl_tmp, const char *tar_tmp,
                                   GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st && m->n_datasets == MEM_STORE_MAX) st = gf_error_set(err, GF_TOO_LARGE, NULL, NULL, "the store is full");
    if (!st) {
        m->datasets[m->n_datasets++] = *row;
        take_file(jsonl_tmp);
        take_file(tar_tmp);
    }
    return unlock_with(m, st);
}

static GfStatus mem_dataset_get(Store *s, const char *id, DatasetRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_dataset(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", "id", "no dataset '%s'", id);
    if (!st) *out = m->datasets[i];
    return unlock_with(m, st);
}

static GfStatus mem_dataset_list(Store *s, const char *after, int limit, DatasetRow *out, int *n, int *has_more,
                                 GfError *err) {
    MemStore *m = lock_store(s);
    *n = *has_more = 0;
    GfStatus st = injected(m, err);
    if (!st)
        st = list_page(m->datasets, sizeof *m->datasets, m->n_datasets, find_dataset(m, after), after, limit, out, n,
                       has_more, err);
    return unlock_with(m, st);
}

static int dataset_in_use(const MemStore *m, const char *id) {
    for (int i = 0; i < m->n_jobs; i++) {
        const JobRow *j = &m->jobs[i];
        int live = strcmp(j->status, "queued") == 0 || strcmp(j->status, "running") == 0;
        if (live && (strcmp(j->dataset_id, id) == 0 || strcmp(j->validation_dataset_id, id) == 0)) return 1;
    }
    return 0;
}

static GfStatus mem_dataset_delete(Store *s, const char *id, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_dataset(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", "id", "no dataset '%s'", id);
    if (!st && dataset_in_use(m, id))
        st = gf_error_set(err, GF_CONFLICT, "dataset_in_use", "id",
                          "dataset '%s' is used by a queued or running job; cancel the job first", id);
    if (!st) {
        memmove(&m->datasets[i], &m->datasets[i + 1], (size_t)(m->n_datasets - i - 1) * sizeof *m->datasets);
        m->n_datasets--;
    }
    return unlock_with(m, st);
}

/* ---- jobs -------------------------------------------------------------- */

static GfStatus dataset_ready(const MemStore *m, const char *id, const char *param, GfError *err) {
    int i = find_dataset(m, id);
    if (i < 0) return gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", param, "no dataset '%s'", id);
    if (strcmp(m->datasets[i].status, "ready") != 0)
        return gf_error_set(err, GF_CONFLICT, "dataset_not_ready", param, "dataset '%s' is %s, not ready", id,
                            m->datasets[i].status);
    return GF_OK;
}

static int count_queued(const MemStore *m) {
    int n = 0;
    for (int i = 0; i < m->n_jobs; i++) n += strcmp(m->jobs[i].status, "queued") == 0;
    return n;
}

static GfStatus mem_job_create(Store *s, JobRow *row, int max_queued, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st) st = dataset_ready(m, row->dataset_id, "dataset", err);
    if (!st && row->validation_dataset_id[0]) st = dataset_ready(m, row->validation_dataset_id, "validation_dataset", err);
    if (!st && count_queued(m) >= max_queued)
        st = gf_error_set(err, GF_BUSY, "queue_full", NULL, "the job queue is full (%d queued); retry later", max_queued);
    if (!st && m->n_jobs == MEM_STORE_MAX) st = gf_error_set(err, GF_TOO_LARGE, NULL, NULL, "the store is full");
    if (!st) {
        row->created_at = gf_time_unix();
        snprintf(row->status, sizeof row->status, "queued");
        row->step = row->total_steps = -1;
        row->epoch = row->loss = row->eval_loss = row->tokens_per_s = row->eta_s = NAN;
        m->jobs[m->n_jobs++] = *row;
        add_event(m, row->id, "Job created and queued");
    }
    return unlock_with(m, st);
}

static GfStatus job_get_locked(const MemStore *m, const char *id, JobRow *out, GfError *err) {
    int i = find_job(m, id);
    if (i < 0) return gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    *out = m->jobs[i];
    return GF_OK;
}

static GfStatus mem_job_get(Store *s, const char *id, JobRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    return unlock_with(m, st ? st : job_get_locked(m, id, out, err));
}

static GfStatus mem_job_list(Store *s, const char *after, int limit, JobRow *out, int *n, int *has_more, GfError *err) {
    MemStore *m = lock_store(s);
    *n = *has_more = 0;
    GfStatus st = injected(m, err);
    if (!st)
        st = list_page(m->jobs, sizeof *m->jobs, m->n_jobs, find_job(m, after), after, limit, out, n, has_more, err);
    return unlock_with(m, st);
}

static GfStatus mem_job_cancel(Store *s, const char *id, JobRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_job(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    JobRow *j = st ? NULL : &m->jobs[i];
    if (j && strcmp(j->status, "queued") == 0) {
        snprintf(j->status, sizeof j->status, "cancelled");
        j->finished_at = gf_time_unix();
        add_event(m, id, "Job cancelled before it started");
    } else if (j && strcmp(j->status, "running") == 0 && !j->cancel_requested) {
        j->cancel_requested = 1;
        add_event(m, id, "Cancellation requested; stopping after the current step");
    } else if (j && (strcmp(j->status, "succeeded") == 0 || strcmp(j->status, "failed") == 0)) {
        st = gf_error_set(err, GF_CONFLICT, "job_not_cancellable", "id", "job '%s' has already %s", id, j->status);
    }
    if (!st) *out = *j;
    return unlock_with(m, st);
}

static GfStatus mem_job_pause(Store *s, const char *id, JobRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_job(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    JobRow *j = st ? NULL : &m->jobs[i];
    if (j && strcmp(j->status, "queued") == 0 && !j->paused) {
        j->paused = 1;
        add_event(m, id, "Job paused before it started");
    } else if (j && strcmp(j->status, "running") == 0 && !j->pause_requested) {
        j->pause_requested = 1;
        add_event(m, id, "Pause requested; checkpointing after the current step");
    } else if (j && strcmp(j->status, "queued") != 0 && strcmp(j->status, "running") != 0) {
        st = gf_error_set(err, GF_CONFLICT, "job_not_pausable", "id", "job '%s' has already %s", id, j->status);
    }
    if (!st) *out = *j;
    return unlock_with(m, st);
}

static GfStatus mem_job_resume(Store *s, const char *id, JobRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_job(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    JobRow *j = st ? NULL : &m->jobs[i];
    if (j && strcmp(j->status, "queued") == 0 && j->paused) {
        j->paused = 0;
        add_event(m, id, "Job resumed; queued to continue from its newest checkpoint");
    } else if (j && strcmp(j->status, "running") == 0 && j->pause_requested) {
        j->pause_requested = 0;
        add_event(m, id, "Pause request withdrawn");
    } else if (j) {
        st = gf_error_set(err, GF_CONFLICT, "job_not_paused", "id", "job '%s' is %s, not paused", id, j->status);
    }
    if (!st) *out = *j;
    return unlock_with(m, st);
}

static GfStatus mem_job_events(Store *s, const char *id, int64_t after_seq, int limit, JobEvent *out, int *n,
                               int *has_more, GfError *err) {
    MemStore *m = lock_store(s);
    *n = *has_more = 0;
    GfStatus st = injected(m, err);
    if (!st && find_job(m, id) < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    for (int i = 0; !st && i < m->n_events; i++) {
        if (strcmp(m->event_job[i], id) != 0 || m->events[i].seq <= after_seq) continue;
        if (*n == limit) { *has_more = 1; break; }
        out[(*n)++] = m->events[i];
    }
    return unlock_with(m, st);
}

static GfStatus mem_job_checkpoint(Store *s, const char *id, int64_t step, CheckpointRow *out, GfError *err) {
    (void)out;
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st && find_job(m, id) < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    if (!st) /* jobs here never run, so they have no checkpoints */
        st = gf_error_set(err, GF_NOT_FOUND, "checkpoint_not_found", "step", "job '%s' keeps no checkpoint at step %lld", id,
                          (long long)step);
    return unlock_with(m, st);
}

static GfStatus mem_job_checkpoints(Store *s, const char *id, CheckpointRow *out, int max, int *n, GfError *err) {
    (void)out;
    (void)max;
    MemStore *m = lock_store(s);
    *n = 0; /* jobs here never run, so they have no checkpoints */
    GfStatus st = injected(m, err);
    if (!st && find_job(m, id) < 0) st = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    return unlock_with(m, st);
}

GfStatus mem_store_job_start(MemStore *m, const char *id, GfError *err) {
    pthread_mutex_lock(&m->lock);
    int i = find_job(m, id);
    GfStatus st = i < 0 ? gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id) : GF_OK;
    if (!st) {
        snprintf(m->jobs[i].status, sizeof m->jobs[i].status, "running");
        m->jobs[i].started_at = gf_time_unix();
        add_event(m, id, "Job started");
    }
    return unlock_with(m, st);
}

/* ---- adapters ---------------------------------------------------------- */

/* server/store.c's RESERVED_BY_JOB_SQL: a live job's future adapter name. */
static int reserved_by_job(const MemStore *m, const char *name) {
    for (int i = 0; i < m->n_jobs; i++) {
        const JobRow *j = &m->jobs[i];
        if (strcmp(j->status, "queued") != 0 && strcmp(j->status, "running") != 0) continue;
        const char *hex = strchr(j->id, '_') ? strchr(j->id, '_') + 1 : j->id;
        char want[STORE_NAME_MAX];
        if (j->suffix[0]) snprintf(want, sizeof want, "%s-%.8s", j->suffix, hex);
        else snprintf(want, sizeof want, "ft-%s", hex);
        if (strcmp(want, name) == 0) return 1;
    }
    return 0;
}

static GfStatus mem_adapter_create(Store *s, const AdapterRow *row, const char *config_tmp, const char *weights_tmp,
                                   GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st && find_adapter(m, row->name) >= 0)
        st = gf_error_set(err, GF_CONFLICT, "adapter_exists", "name", "an adapter named '%s' already exists", row->name);
    if (!st && reserved_by_job(m, row->name))
        st = gf_error_set(err, GF_CONFLICT, "adapter_name_reserved", "name",
                          "the name '%s' is reserved for the adapter of a queued or running fine-tuning job", row->name);
    if (!st && m->n_adapters == MEM_STORE_MAX) st = gf_error_set(err, GF_TOO_LARGE, NULL, NULL, "the store is full");
    if (!st) {
        m->adapters[m->n_adapters++] = *row;
        take_file(config_tmp);
        take_file(weights_tmp);
    }
    return unlock_with(m, st);
}

static GfStatus mem_adapter_get(Store *s, const char *name, AdapterRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_adapter(m, name);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", name);
    if (!st) *out = m->adapters[i];
    return unlock_with(m, st);
}

static GfStatus mem_adapter_list(Store *s, const char *after, int limit, AdapterRow *out, int *n, int *has_more,
                                 GfError *err) {
    MemStore *m = lock_store(s);
    *n = *has_more = 0;
    GfStatus st = injected(m, err);
    if (!st)
        st = list_page(m->adapters, sizeof *m->adapters, m->n_adapters, find_adapter(m, after), after, limit, out,
                       n, has_more, err);
    return unlock_with(m, st);
}

static GfStatus mem_adapter_delete(Store *s, const char *name, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_adapter(m, name);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", name);
    if (!st) {
        memmove(&m->adapters[i], &m->adapters[i + 1], (size_t)(m->n_adapters - i - 1) * sizeof *m->adapters);
        m->n_adapters--;
    }
    return unlock_with(m, st);
}

static GfStatus mem_adapter_files(Store *s, const char *name, char config[4096], char weights[4096], GfError *err) {
    (void)s;
    config[0] = weights[0] = '\0';
    return gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "the in-memory store keeps no files of '%s'", name);
}

/* ---- exports ----------------------------------------------------------- */

static int find_export(const MemStore *m, const char *id) {
    for (int i = 0; i < m->n_exports; i++)
        if (strcmp(m->exports[i].id, id) == 0) return i;
    return -1;
}

static int active(const ExportRow *r) { return strcmp(r->status, "queued") == 0 || strcmp(r->status, "running") == 0; }

static GfStatus mem_export_create(Store *s, ExportRow *row, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st && find_adapter(m, row->adapter) < 0)
        st = gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", row->adapter);
    for (int i = 0; !st && i < m->n_exports; i++)
        if (active(&m->exports[i]) && strcmp(m->exports[i].adapter, row->adapter) == 0)
            st = gf_error_set(err, GF_CONFLICT, "export_running", "name", "export %s of adapter '%s' is already queued or running",
                              m->exports[i].id, row->adapter);
    if (!st && m->n_exports == MEM_STORE_MAX) st = gf_error_set(err, GF_TOO_LARGE, NULL, NULL, "the in-memory store is full");
    if (!st) {
        snprintf(row->status, sizeof row->status, "queued");
        row->created_at = gf_time_unix();
        m->exports[m->n_exports++] = *row;
    }
    return unlock_with(m, st);
}

static GfStatus export_get_locked(const MemStore *m, const char *id, ExportRow *out, GfError *err) {
    int i = find_export(m, id);
    if (i < 0) return gf_error_set(err, GF_NOT_FOUND, "export_not_found", "id", "no export '%s'", id);
    *out = m->exports[i];
    return GF_OK;
}

static GfStatus mem_export_get(Store *s, const char *id, ExportRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    return unlock_with(m, st ? st : export_get_locked(m, id, out, err));
}

static GfStatus mem_export_list(Store *s, const char *after, int limit, ExportRow *out, int *n, int *has_more,
                                GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    if (!st)
        st = list_page(m->exports, sizeof *m->exports, m->n_exports, find_export(m, after), after, limit, out, n, has_more,
                       err);
    return unlock_with(m, st);
}

static GfStatus mem_export_cancel(Store *s, const char *id, ExportRow *out, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_export(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "export_not_found", "id", "no export '%s'", id);
    ExportRow *r = st ? NULL : &m->exports[i];
    if (r && strcmp(r->status, "queued") == 0) {
        snprintf(r->status, sizeof r->status, "cancelled");
        r->finished_at = gf_time_unix();
    } else if (r && strcmp(r->status, "running") == 0) {
        r->cancel_requested = 1;
    } else if (r && strcmp(r->status, "cancelled") != 0) {
        st = gf_error_set(err, GF_CONFLICT, "export_not_cancellable", "id", "export '%s' has already %s", id, r->status);
    }
    if (!st) *out = *r;
    return unlock_with(m, st);
}

static GfStatus mem_export_delete(Store *s, const char *id, GfError *err) {
    MemStore *m = lock_store(s);
    GfStatus st = injected(m, err);
    int i = st ? -1 : find_export(m, id);
    if (!st && i < 0) st = gf_error_set(err, GF_NOT_FOUND, "export_not_found", "id", "no export '%s'", id);
    if (!st && active(&m->exports[i]))
        st = gf_error_set(err, GF_CONFLICT, "export_running", "id", "export '%s' is %s; cancel it first", id,
                          m->exports[i].status);
    if (!st) {
        memmove(&m->exports[i], &m->exports[i + 1], (size_t)(m->n_exports - i - 1) * sizeof *m->exports);
        m->n_exports--;
    }
    return unlock_with(m, st);
}

static GfStatus mem_dataset_files(Store *s, const char *id, char jsonl[4096], char tar[4096], GfError *err) {
    (void)s;
    jsonl[0] = tar[0] = '\0';
    return gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", "id", "the in-memory store keeps no files of '%s'", id);
}

static GfStatus mem_export_dir(Store *s, const char *id, char dir[4096], GfError *err) {
    (void)s;
    dir[0] = '\0';
    return gf_error_set(err, GF_NOT_FOUND, "export_not_found", "id", "the in-memory store keeps no files of '%s'", id);
}

/* ---- misc -------------------------------------------------------------- */

static GfStatus mem_counts(Store *s, StoreCounts *out, GfError *err) {
    MemStore *m = lock_store(s);
    memset(out, 0, sizeof *out);
    GfStatus st = injected(m, err);
    out->datasets = (uint64_t)m->n_datasets;
    out->adapters = (uint64_t)m->n_adapters;
    for (int i = 0; i < m->n_jobs; i++)
        for (int k = 0; k < 5; k++)
            if (strcmp(m->jobs[i].status, STORE_JOB_STATUSES[k]) == 0) out->jobs_by_status[k]++;
    return unlock_with(m, st);
}

static GfStatus mem_ping(Store *s, GfError *err) {
    MemStore *m = lock_store(s);
    return unlock_with(m, injected(m, err));
}

static const StoreOps MEM_STORE_OPS = {
    .dataset_create = mem_dataset_create,
    .dataset_get = mem_dataset_get,
    .dataset_list = mem_dataset_list,
    .dataset_delete = mem_dataset_delete,
    .dataset_files = mem_dataset_files,
    .job_create = mem_job_create,
    .job_get = mem_job_get,
    .job_list = mem_job_list,
    .job_cancel = mem_job_cancel,
    .job_pause = mem_job_pause,
    .job_resume = mem_job_resume,
    .job_events = mem_job_events,
    .job_checkpoints = mem_job_checkpoints,
    .job_checkpoint = mem_job_checkpoint,
    .adapter_create = mem_adapter_create,
    .adapter_get = mem_adapter_get,
    .adapter_list = mem_adapter_list,
    .adapter_delete = mem_adapter_delete,
    .adapter_files = mem_adapter_files,
    .export_create = mem_export_create,
    .export_get = mem_export_get,
    .export_list = mem_export_list,
    .export_cancel = mem_export_cancel,
    .export_delete = mem_export_delete,
    .export_dir = mem_export_dir,
    .counts = mem_counts,
    .ping = mem_ping,
};

MemStore *mem_store_new(void) {
    MemStore *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->port.ops = &MEM_STORE_OPS;
    pthread_mutex_init(&m->lock, NULL);
    return m;
}

void mem_store_free(MemStore *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->lock);
    free(m);
}

Store *mem_store_port(MemStore *m) { return &m->port; }

void mem_store_fail_next(MemStore *m, GfStatus status) {
    pthread_mutex_lock(&m->lock);
    m->fail_next = status;
    pthread_mutex_unlock(&m->lock);
}
