/* store.c - the store port's dispatch (each store_* call goes to the
 * implementation's table) and the helpers every implementation shares. */
#include "store.h"

#include <stdio.h>
#include <string.h>

const char *const STORE_JOB_STATUSES[5] = {"queued", "running", "succeeded", "failed", "cancelled"};

void store_new_id(const char *prefix, char out[STORE_ID_MAX]) {
    uint8_t raw[12];
    char hex[25];
    if (gf_random_bytes(raw, sizeof raw) != 0) {
        uint64_t t = (uint64_t)(gf_time_mono() * 1e9);
        memcpy(raw, &t, 8);
        memset(raw + 8, 0, 4);
    }
    gf_hex(raw, sizeof raw, hex);
    snprintf(out, STORE_ID_MAX, "%s_%s", prefix, hex);
}

void store_job_adapter_name(const JobRow *row, char *out, size_t cap) {
    const char *hex = strchr(row->id, '_') ? strchr(row->id, '_') + 1 : row->id;
    if (row->suffix[0]) snprintf(out, cap, "%s-%.8s", row->suffix, hex);
    else snprintf(out, cap, "ft-%s", hex);
}

GfStatus store_dataset_create(Store *s, const DatasetRow *row, const char *jsonl_tmp, const char *tar_tmp, GfError *err) {
    return s->ops->dataset_create(s, row, jsonl_tmp, tar_tmp, err);
}

GfStatus store_dataset_get(Store *s, const char *id, DatasetRow *out, GfError *err) {
    return s->ops->dataset_get(s, id, out, err);
}

GfStatus store_dataset_list(Store *s, const char *after_id, int limit, DatasetRow *out, int *n, int *has_more, GfError *err) {
    return s->ops->dataset_list(s, after_id, limit, out, n, has_more, err);
}

GfStatus store_dataset_delete(Store *s, const char *id, GfError *err) {
    return s->ops->dataset_delete(s, id, err);
}

GfStatus store_job_create(Store *s, JobRow *row, int max_queued, GfError *err) {
    return s->ops->job_create(s, row, max_queued, err);
}

GfStatus store_job_get(Store *s, const char *id, JobRow *out, GfError *err) {
    return s->ops->job_get(s, id, out, err);
}

GfStatus store_job_list(Store *s, const char *after_id, int limit, JobRow *out, int *n, int *has_more, GfError *err) {
    return s->ops->job_list(s, after_id, limit, out, n, has_more, err);
}

GfStatus store_job_cancel(Store *s, const char *id, JobRow *out, GfError *err) {
    return s->ops->job_cancel(s, id, out, err);
}

GfStatus store_job_events(Store *s, const char *id, int64_t after_seq, int limit, JobEvent *out, int *n, int *has_more, GfError *err) {
    return s->ops->job_events(s, id, after_seq, limit, out, n, has_more, err);
}

GfStatus store_job_checkpoints(Store *s, const char *id, CheckpointRow *out, int max, int *n, GfError *err) {
    return s->ops->job_checkpoints(s, id, out, max, n, err);
}

GfStatus store_job_checkpoint(Store *s, const char *id, int64_t step, CheckpointRow *out, GfError *err) {
    return s->ops->job_checkpoint(s, id, step, out, err);
}

GfStatus store_adapter_create(Store *s, const AdapterRow *row, const char *config_tmp, const char *weights_tmp, GfError *err) {
    return s->ops->adapter_create(s, row, config_tmp, weights_tmp, err);
}

GfStatus store_adapter_get(Store *s, const char *name, AdapterRow *out, GfError *err) {
    return s->ops->adapter_get(s, name, out, err);
}

GfStatus store_adapter_list(Store *s, const char *after_name, int limit, AdapterRow *out, int *n, int *has_more, GfError *err) {
    return s->ops->adapter_list(s, after_name, limit, out, n, has_more, err);
}

GfStatus store_adapter_delete(Store *s, const char *name, GfError *err) {
    return s->ops->adapter_delete(s, name, err);
}

GfStatus store_adapter_files(Store *s, const char *name, char config[4096], char weights[4096], GfError *err) {
    return s->ops->adapter_files(s, name, config, weights, err);
}

GfStatus store_job_pause(Store *s, const char *id, JobRow *out, GfError *err) { return s->ops->job_pause(s, id, out, err); }

GfStatus store_job_resume(Store *s, const char *id, JobRow *out, GfError *err) { return s->ops->job_resume(s, id, out, err); }

GfStatus store_dataset_files(Store *s, const char *id, char jsonl[4096], char tar[4096], GfError *err) {
    return s->ops->dataset_files(s, id, jsonl, tar, err);
}

GfStatus store_export_create(Store *s, ExportRow *row, GfError *err) { return s->ops->export_create(s, row, err); }

GfStatus store_export_get(Store *s, const char *id, ExportRow *out, GfError *err) {
    return s->ops->export_get(s, id, out, err);
}

GfStatus store_export_list(Store *s, const char *after_id, int limit, ExportRow *out, int *n, int *has_more, GfError *err) {
    return s->ops->export_list(s, after_id, limit, out, n, has_more, err);
}

GfStatus store_export_cancel(Store *s, const char *id, ExportRow *out, GfError *err) {
    return s->ops->export_cancel(s, id, out, err);
}

GfStatus store_export_delete(Store *s, const char *id, GfError *err) { return s->ops->export_delete(s, id, err); }

GfStatus store_export_dir(Store *s, const char *id, char dir[4096], GfError *err) {
    return s->ops->export_dir(s, id, dir, err);
}

GfStatus store_counts(Store *s, StoreCounts *out, GfError *err) {
    return s->ops->counts(s, out, err);
}

GfStatus store_ping(Store *s, GfError *err) {
    return s->ops->ping(s, err);
}
