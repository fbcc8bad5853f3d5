/* jobs.c - the job worker thread: claim, train, record, register. */
#include "jobs.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fsutil.h"
#include "store_worker.h"
#include "worker.h"
#include "train_run.h"

#define MAX_RESUME_TRIES 16

struct Jobs {
    JobsConfig cfg;
    Store *store;
    Worker w;
};

/* One job being run: what the hooks need. */
typedef struct {
    Jobs *j;
    const JobRow *row;
} JobCtx;

/* ---- hooks --------------------------------------------------------------------- */

/* Tells the job's event followers that something was committed. */
static void notify(Jobs *j, const char *job_id) {
    if (j->cfg.on_event) j->cfg.on_event(j->cfg.on_event_cls, job_id);
}

static void hook_log(void *user, const char *level, const char *message) {
    JobCtx *c = user;
    GfError err;
    GF_LOGI("job %s: %s", c->row->id, message);
    if (store_job_event(c->j->store, c->row->id, level, "log", message, &err))
        GF_LOGW("job %s: could not record an event: %s", c->row->id, err.message);
    notify(c->j, c->row->id);
}

static void hook_step(void *user, const TrainStepInfo *in, const TrainRunRates *r) {
    JobCtx *c = user;
    JobRow p = {.step = in->step, .total_steps = in->total_steps, .epoch = in->epoch, .loss = in->loss,
                .eval_loss = NAN, .tokens_per_s = r->tokens_per_s, .eta_s = r->eta_s};
    char msg[128], data[512];
    snprintf(msg, sizeof msg, "step %lld/%lld: loss %.4f", (long long)in->step, (long long)in->total_steps, in->loss);
    snprintf(data, sizeof data,
             "{\"step\":%lld,\"total_steps\":%lld,\"epoch\":%.6g,\"loss\":%.9g,\"learning_rate\":%.9g,"
             "\"grad_norm\":%.9g,\"tokens\":%lld,\"tokens_per_s\":%.6g,\"step_seconds\":%.6g}",
             (long long)in->step, (long long)in->total_steps, in->epoch, in->loss, in->lr, isfinite(in->grad_norm) ? in->grad_norm : -1.0,
             (long long)in->tokens, isfinite(r->tokens_per_s) ? r->tokens_per_s : 0.0, in->seconds);
    GfError err;
    if (store_job_progress(c->j->store, c->row->id, &p, msg, data, &err))
        GF_LOGW("job %s: could not record progress: %s", c->row->id, err.message);
    notify(c->j, c->row->id);
}

static void hook_eval(void *user, int64_t step, double loss) {
    JobCtx *c = user;
    JobRow p = {.step = -1, .total_steps = -1, .epoch = NAN, .loss = NAN, .eval_loss = loss, .tokens_per_s = NAN, .eta_s = NAN};
    char msg[128], data[128];
    snprintf(msg, sizeof msg, "step %lld: validation loss %.4f", (long long)step, loss);
    snprintf(data, sizeof data, "{\"step\":%lld,\"eval_loss\":%.9g}", (long long)step, loss);
    GfError err;
    if (store_job_progress(c->j->store, c->row->id, &p, msg, data, &err))
        GF_LOGW("job %s: could not record the validation loss: %s", c->row->id, err.message);
    notify(c->j, c->row->id);
}

static GfStatus hook_checkpoint(void *user, int64_t step, const char *dir, const char *metrics, GfError *err) {
    JobCtx *c = user;
    char path[4200], hex[65];
    snprintf(path, sizeof path, "%s/trainer_state.json", dir);
    if (trainer_file_digest(path, hex, err)) return err->status;
    return store_checkpoint_add(c->j->store, c->row->id, step, hex, metrics, TRAIN_KEEP_CHECKPOINTS, err);
}

static int hook_stop(void *user) {
    JobCtx *c = user;
    return worker_stopping(&c->j->w) || store_job_cancel_requested(c->j->store, c->row->id);
}

static int hook_pause(void *user) {
    JobCtx *c = user;
    return store_job_pause_requested(c->j->store, c->row->id);
}

static void hook_blocked(void *user, const char *reason, const char *message) {
    JobCtx *c = user;
    GfError err;
    if (reason) GF_LOGW("job %s: %s", c->row->id, message);
    else GF_LOGI("job %s: %s", c->row->id, message);
    if (store_job_reason(c->j->store, c->row->id, reason, message, &err))
        GF_LOGW("job %s: could not record its status reason: %s", c->row->id, err.message);
    notify(c->j, c->row->id);
}

/* ---- one job ------------------------------------------------------------------- */

/* The newest recorded checkpoint whose trainer_state.json still has its
 * recorded digest, into dir; 0 when none. */
static int64_t pick_checkpoint(JobCtx *c, const char *root, char *dir, size_t cap) {
    int64_t steps[MAX_RESUME_TRIES];
    char digests[MAX_RESUME_TRIES][65], path[4500], hex[65];
    int n = 0;
    GfError err;
    if (store_checkpoint_list(c->j->store, c->row->id, steps, digests, MAX_RESUME_TRIES, &n, &err)) return 0;
    for (int i = 0; i < n; i++) {
        train_run_ckpt_dir(root, steps[i], dir, cap);
        snprintf(path, sizeof path, "%s/trainer_state.json", dir);
        if (trainer_file_digest(path, hex, &err) == GF_OK && strcmp(hex, digests[i]) == 0) return steps[i];
        char msg[200];
        snprintf(msg, sizeof msg, "the checkpoint of step %lld is missing or damaged; trying an older one", (long long)steps[i]);
        hook_log(c, "warn", msg);
    }
    return 0;
}

/* Registers the trained adapter in dir (and marks the job succeeded). */
static GfStatus register_adapter(JobCtx *c, const JobParams *hp, const TrainRunResult *res, const char *dir, GfError *err) {
    AdapterRow a = {.rank = hp->lora_rank, .alpha = hp->lora_alpha, .use_rslora = hp->use_rslora,
                    .n_modules = res->n_modules, .has_vision = res->has_vision, .created_at = gf_time_unix()};
    store_job_adapter_name(c->row, a.name, sizeof a.name);
    snprintf(a.source, sizeof a.source, "trained");
    snprintf(a.job_id, sizeof a.job_id, "%s", c->row->id);
    snprintf(a.base_model, sizeof a.base_model, "%s", c->j->cfg.model_name);
    char config[4500], weights[4500];
    snprintf(config, sizeof config, "%s/adapter_config.json", dir);
    snprintf(weights, sizeof weights, "%s/adapter_model.safetensors", dir);
    struct stat sb;
    if (stat(weights, &sb) != 0 || trainer_file_digest(weights, a.sha256, err))
        return gf_error_set(err, GF_IO, "io_error", NULL, "the trained adapter's files cannot be read");
    a.bytes = (uint64_t)sb.st_size;
    return store_job_succeed(c->j->store, c->row->id, &a, res->trained_tokens, config, weights, err);
}

/* Fills the run's inputs from the job row; the path buffers live in paths. */
typedef struct {
    char jsonl[4096], tar[4096], vjsonl[4096], vtar[4096], job[4096], ckpt[4200], out[4200], resume[4400];
} JobPaths;

static GfStatus prepare(JobCtx *c, JobPaths *p, TrainRunSpec *spec, GfError *err) {
    Jobs *j = c->j;
    const JobRow *row = c->row;
    memset(spec, 0, sizeof *spec);
    if (hyperparameters_from_text(row->hyperparameters, j->cfg.max_lora_rank, &spec->params, err)) return err->status;
    store_dataset_paths(j->store, row->dataset_id, p->jsonl, p->tar);
    store_job_dir(j->store, row->id, p->job);
    snprintf(p->ckpt, sizeof p->ckpt, "%s/checkpoints", p->job);
    snprintf(p->out, sizeof p->out, "%s/adapter-tmp", p->job);
    fs_remove_tree(p->out);
    if (fs_mkdirs(p->out, err)) return err->status;
    spec->model_dir = j->cfg.model_dir;
    spec->base = j->cfg.base;
    spec->gauge = j->cfg.gauge;
    spec->sched = j->cfg.sched;
    spec->train_jsonl = p->jsonl;
    spec->train_tar = access(p->tar, F_OK) == 0 ? p->tar : NULL;
    if (row->validation_dataset_id[0]) {
        store_dataset_paths(j->store, row->validation_dataset_id, p->vjsonl, p->vtar);
        spec->val_jsonl = p->vjsonl;
        spec->val_tar = access(p->vtar, F_OK) == 0 ? p->vtar : NULL;
    }
    spec->ckpt_root = p->ckpt;
    spec->adapter_out = p->out;
    spec->keep_adapter = c->j->cfg.on_adapter != NULL;
    spec->device = j->cfg.device;
    spec->precision = j->cfg.precision;
    spec->pre = j->cfg.pre;
    spec->memory_limit = j->cfg.memory_limit;
    spec->n_threads = j->cfg.n_threads;
    spec->image_limits = j->cfg.image_limits;
    spec->disk_full_wait_s = j->cfg.disk_full_wait_s;
    if (pick_checkpoint(c, p->ckpt, p->resume, sizeof p->resume)) spec->resume_dir = p->resume;
    return GF_OK;
}

/* The job's end: succeeded, cancelled, failed, or left running for the next
 * start when the server is stopping. */
static void conclude(JobCtx *c, GfStatus st, const GfError *run_err, const JobParams *hp, TrainRunResult *res,
                     const char *out_dir) {
    Jobs *j = c->j;
    const char *id = c->row->id;
    GfError err;
    GfStatus rec = GF_OK;
    if (!st) {
        char name[STORE_NAME_MAX];
        store_job_adapter_name(c->row, name, sizeof name);
        if ((rec = register_adapter(c, hp, res, out_dir, &err))) {
            char code[GF_ERR_CODE_MAX], param[GF_ERR_PARAM_MAX], msg[GF_ERR_MSG_MAX + 64];
            snprintf(code, sizeof code, "%s", err.code[0] ? err.code : "registration_failed");
            snprintf(param, sizeof param, "%s", err.param);
            snprintf(msg, sizeof msg, "the adapter could not be registered: %s", err.message);
            rec = store_job_finish(j->store, id, "failed", code, param, msg, &err);
        } else if (j->cfg.on_adapter && res->adapter) {
            j->cfg.on_adapter(j->cfg.on_adapter_cls, name, res->adapter, &res->params); /* served at once, from memory */
            res->adapter = NULL;
        }
    } else if ((st == GF_CANCELLED && strcmp(run_err->code, "paused") == 0) || st == GF_NO_SPACE) {
        GF_LOGI("job %s: %s", id, run_err->message);
        rec = store_job_paused(j->store, id, run_err->message, &err);
    } else if (st == GF_CANCELLED && worker_stopping(&j->w)) {
        hook_log(c, "info", "the server is stopping; the job resumes from its last checkpoint at the next start");
    } else if (st == GF_CANCELLED) {
        rec = store_job_finish(j->store, id, "cancelled", NULL, NULL, NULL, &err);
    } else {
        rec = store_job_finish(j->store, id, "failed", run_err->code[0] ? run_err->code : "training_failed", run_err->param,
                               run_err->message, &err);
    }
    if (rec) GF_LOGE("job %s: could not record its end: %s", id, err.message);
    notify(j, id);
    fs_remove_tree(out_dir);
}

static void run_job(Jobs *j, const JobRow *row, int resumed) {
    JobCtx c = {j, row};
    JobPaths *p = calloc(1, sizeof *p);
    TrainRunSpec spec;
    TrainRunResult res = {0};
    GfError err;
    gf_error_clear(&err);
    GF_LOGI("job %s: %s", row->id, resumed ? "resuming" : "starting");
    GfStatus st = p ? prepare(&c, p, &spec, &err) : gf_error_set(&err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    if (!st) {
        TrainRunHooks hooks = {.user = &c, .on_log = hook_log, .on_step = hook_step, .on_eval = hook_eval,
                               .on_checkpoint = hook_checkpoint, .should_stop = hook_stop,
                               .should_pause = hook_pause, .on_blocked = hook_blocked};
        st = train_run(&spec, &hooks, &res, &err);
    }
    if (p) conclude(&c, st, &err, &spec.params, &res, p->out);
    else if (store_job_finish(j->store, row->id, "failed", "out_of_memory", NULL, "the server ran out of memory", &err))
        GF_LOGE("job %s: could not record its end: %s", row->id, err.message);
    lora_free(res.adapter); /* not handed over */
    if (res.params.data && j->cfg.free_params) j->cfg.free_params(j->cfg.on_adapter_cls, &res.params);
    free(p);
}

/* ---- the thread ---------------------------------------------------------------- */

static void *worker(void *arg) {
    Jobs *j = arg;
    while (!worker_stopping(&j->w)) {
        JobRow *row = calloc(1, sizeof *row);
        int resumed = 0;
        GfError err;
        GfStatus st = row ? store_job_claim(j->store, row, &resumed, &err) : GF_NO_MEMORY;
        if (!st) notify(j, row->id); /* its "running" status event */
        if (!st) run_job(j, row, resumed);
        else if (st != GF_NOT_FOUND) GF_LOGW("job worker: %s", row ? err.message : "out of memory");
        free(row);
        if (st) worker_idle(&j->w, j->cfg.poll_s);
    }
    return NULL;
}

GfStatus jobs_start(const JobsConfig *cfg, Store *store, Jobs **out, GfError *err) {
    Jobs *j = gf_calloc(1, sizeof *j, err);
    if (!j) return GF_NO_MEMORY;
    j->cfg = *cfg;
    if (cfg->base) j->cfg.base = weights_retain(cfg->base);
    j->store = store;
    if (worker_start(&j->w, worker, j, "job worker", err)) {
        weights_release(j->cfg.base);
        free(j);
        return err->status;
    }
    *out = j;
    return GF_OK;
}

void jobs_stop(Jobs *j) {
    if (!j) return;
    worker_stop(&j->w);
    weights_release(j->cfg.base);
    free(j);
}
