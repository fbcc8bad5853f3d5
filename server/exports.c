/* exports.c - the export worker thread: claim, merge, record. */
#include "exports.h"

#include <errno.h>
#include <libgen.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "gguf_export.h"
#include "cJSON.h"
#include "merge.h"
#include "qlora_gap.h"
#include "safetensors.h"
#include "store_worker.h"
#include "worker.h"

struct Exports {
    ExportsConfig cfg;
    Store *store;
    Worker w;
};

typedef struct {
    Exports *x;
    const ExportRow *row;
    double last;               /* when progress was last recorded */
    int cancelled;             /* asked through the API */
} ExportCtx;

static int on_progress(void *ctx, uint64_t done, uint64_t total) {
    ExportCtx *c = ctx;
    if (worker_stopping(&c->x->w)) return 1;
    double now = gf_time_mono();
    if (now - c->last < 1.0 && done < total) return 0;
    c->last = now;
    GfError err;
    int cancel = 0;
    if (store_export_progress(c->x->store, c->row->id, done, total, &cancel, &err))
        GF_LOGW("export %s: could not record progress: %s", c->row->id, err.message);
    c->cancelled = cancel;
    return cancel;
}

/* The GGUF file into out/model.gguf (out created here, removed by the caller on failure). */
static GfStatus run_gguf(Exports *x, const ExportRow *row, const char *out, char *adapter_dir, ExportCtx *c, char *result,
                         size_t cap, GfError *err) {
    char path[4200];
    if (fs_mkdirs(out, err)) return err->status;
    snprintf(path, sizeof path, "%s/model.gguf", out);
    GgufExportOptions o = {.model_dir = x->cfg.model_dir, .adapter_dir = adapter_dir, .out_path = path,
                           .type = GGML_F16, .progress = on_progress, .ctx = c};
    ggml_type_from_name(row->dtype, &o.type); /* the API let only these names in */
    GgufExportReport r;
    double t0 = gf_time_mono();
    GfStatus s = gguf_export(&o, &r, err);
    if (!s && fs_fsync_path(out, err)) s = err->status;
    if (!s)
        snprintf(result, cap, "{\"tensors\":%llu,\"merged_tensors\":%llu,\"bytes\":%llu,\"tokens\":%llu,\"seconds\":%.3f}",
                 (unsigned long long)r.n_tensors, (unsigned long long)r.n_merged, (unsigned long long)r.n_bytes,
                 (unsigned long long)r.n_tokens, gf_time_mono() - t0);
    return s;
}

static int dtype_of(const char *name) {
    if (strcmp(name, "auto") == 0) return -1;
    return strcmp(name, "f32") == 0 ? ST_F32 : strcmp(name, "f16") == 0 ? ST_F16 : ST_BF16;
}

/* 1 when the adapter was trained here by a job with quantization nf4
 * (QLoRA); its dataset's files into jsonl and tar. */
static int qlora_job_dataset(Exports *x, const char *adapter, char jsonl[4096], char tar[4096]) {
    AdapterRow a;
    JobRow *j = calloc(1, sizeof *j);
    GfError err;
    int yes = 0;
    if (j && store_adapter_get(x->store, adapter, &a, &err) == GF_OK && a.job_id[0] &&
        store_job_get(x->store, a.job_id, j, &err) == GF_OK) {
        cJSON *h = cJSON_Parse(j->hyperparameters);
        const cJSON *q = cJSON_GetObjectItemCaseSensitive(h, "quantization");
        yes = cJSON_IsString(q) && strcmp(q->valuestring, "nf4") == 0;
        cJSON_Delete(h);
        if (yes) store_dataset_paths(x->store, j->dataset_id, jsonl, tar);
    }
    free(j);
    return yes;
}

#define QLORA_CHECK_EXAMPLES 4

/* The merge's result: its report and, for a QLoRA adapter of a job here,
 * how far the merged model is from the NF4 base + adapter on the job's
 * dataset (or why that could not be measured). */
static char *merge_result(Exports *x, const ExportRow *row, const char *adapter_dir, const char *out,
                          const MergeReport *r, double seconds) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "tensors", (double)r->n_tensors);
    cJSON_AddNumberToObject(o, "merged_tensors", (double)r->n_merged);
    cJSON_AddNumberToObject(o, "bytes", (double)r->n_bytes);
    cJSON_AddNumberToObject(o, "shards", r->n_shards);
    cJSON_AddNumberToObject(o, "files", r->n_files);
    cJSON_AddNumberToObject(o, "max_abs_delta", r->max_abs_delta);
    cJSON_AddNumberToObject(o, "unchanged_elements", (double)r->n_unchanged);
    cJSON_AddNumberToObject(o, "seconds", seconds);
    char jsonl[4096], tar[4096];
    if (qlora_job_dataset(x, row->adapter, jsonl, tar)) {
        QloraGapSpec q = {.base_dir = x->cfg.model_dir, .adapter_dir = adapter_dir, .merged_dir = out, .jsonl = jsonl,
                          .tar = access(tar, F_OK) == 0 ? tar : NULL, .max_examples = QLORA_CHECK_EXAMPLES,
                          .image_limits = x->cfg.image_limits, .images = TRAINSET_IMAGES_VALIDATED};
        QloraGap g;
        GfError err;
        GF_LOGI("export %s: measuring the merged model against the NF4 base + adapter", row->id);
        if (qlora_gap_measure(&q, &g, &err) == GF_OK) {
            cJSON *gap = cJSON_AddObjectToObject(o, "qlora_gap");
            cJSON_AddNumberToObject(gap, "examples", g.n_examples);
            cJSON_AddNumberToObject(gap, "rows", (double)g.n_rows);
            cJSON_AddNumberToObject(gap, "rel_l2", g.rel_l2);
            cJSON_AddNumberToObject(gap, "max_abs", g.max_abs);
            cJSON_AddNumberToObject(gap, "top1_agreement", g.top1_agreement);
        } else {
            cJSON_AddStringToObject(o, "qlora_gap_error", err.message);
        }
    }
    char *text = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return text;
}

static void run_export(Exports *x, const ExportRow *row) {
    ExportCtx c = {x, row, 0, 0};
    char out[4096], config[4096], weights[4096], gguf_result[1024], *result = gguf_result, *merged = NULL;
    GfError err;
    gf_error_clear(&err);
    store_export_dir(x->store, row->id, out, &err);
    fs_remove_tree(out); /* what an interrupted run published before it was recorded */
    GfStatus st = store_adapter_files(x->store, row->adapter, config, weights, &err);
    MergeReport rep;
    double t0 = gf_time_mono();
    int gguf = strcmp(row->kind, "gguf") == 0;
    GF_LOGI("export %s: merging adapter %s (%s, %s)", row->id, row->adapter, row->kind, row->dtype);
    if (!st && gguf) {
        st = run_gguf(x, row, out, dirname(config), &c, gguf_result, sizeof gguf_result, &err);
    } else if (!st) {
        MergeOptions o = {.model_dir = x->cfg.model_dir, .adapter_dir = dirname(config), .out_dir = out,
                          .dtype = dtype_of(row->dtype), .progress = on_progress, .ctx = &c};
        st = merge_adapter(&o, &rep, &err);
        if (!st && !(result = merged = merge_result(x, row, o.adapter_dir, out, &rep, gf_time_mono() - t0)))
            st = gf_error_set(&err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    }
    GfError rec;
    GfStatus r = GF_OK;
    /* A failed or cancelled export's files go before its end is recorded, so
     * that a client that sees the end never finds them. */
    if (st) fs_remove_tree(out);
    if (!st) {
        r = store_export_finish(x->store, row->id, "succeeded", NULL, NULL, result, &rec);
        GF_LOGI("export %s: done", row->id);
    } else if (st == GF_CANCELLED && !c.cancelled) {
        GF_LOGI("export %s: the server is stopping; the export runs again at the next start", row->id);
    } else if (st == GF_CANCELLED) {
        r = store_export_finish(x->store, row->id, "cancelled", NULL, NULL, NULL, &rec);
    } else {
        GF_LOGW("export %s failed: %s", row->id, err.message);
        r = store_export_finish(x->store, row->id, "failed", err.code[0] ? err.code : "export_failed", err.message, NULL, &rec);
    }
    if (r) GF_LOGE("export %s: could not record its end: %s", row->id, rec.message);
    free(merged);
}

static void *worker(void *arg) {
    Exports *x = arg;
    while (!worker_stopping(&x->w)) {
        ExportRow row;
        GfError err;
        GfStatus st = store_export_claim(x->store, &row, &err);
        if (!st) run_export(x, &row);
        else if (st != GF_NOT_FOUND) GF_LOGW("export worker: %s", err.message);
        if (st) worker_idle(&x->w, x->cfg.poll_s);
    }
    return NULL;
}

GfStatus exports_start(const ExportsConfig *cfg, Store *store, Exports **out, GfError *err) {
    Exports *x = gf_calloc(1, sizeof *x, err);
    if (!x) return GF_NO_MEMORY;
    x->cfg = *cfg;
    x->store = store;
    if (worker_start(&x->w, worker, x, "export worker", err)) {
        free(x);
        return err->status;
    }
    *out = x;
    return GF_OK;
}

void exports_stop(Exports *x) {
    if (!x) return;
    worker_stop(&x->w);
    free(x);
}
