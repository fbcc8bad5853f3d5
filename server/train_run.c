/* train_run.c - a fine-tuning run: files in, checkpoints and adapter out. */
#include "train_run.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "pipeline.h"

typedef struct {
    const TrainRunSpec *spec;
    const TrainRunHooks *hooks;
    Pipeline *p;
    TrainSet *train, *val;
    LoraAdapter *a;
    Trainer *t;
    double step_s_sum;         /* wall time of the steps run here */
    int64_t steps_run;
    double eval_loss;
    int64_t set_tokens;        /* tokens of the training set */
    int shared;                /* the model runs on the served base's weights */
    TrainStepInfo last;
} Run;

static void logf_(Run *r, const char *level, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (r->hooks->on_log) r->hooks->on_log(r->hooks->user, level, msg);
}

static int stop_asked(void *user) {
    Run *r = user;
    return r->hooks->should_stop && r->hooks->should_stop(r->hooks->user);
}

void train_run_ckpt_dir(const char *root, int64_t step, char *out, size_t cap) {
    snprintf(out, cap, "%s/step-%08lld", root, (long long)step);
}

/* ---- set-up ------------------------------------------------------------------- */

/* A data set's error in the job's terms (its error.param): the
 * hyperparameter it names, else the file it came from. */
static GfStatus data_error(GfError *err, const char *file_param) {
    const char *p = strcmp(err->param, "max_seq_len") == 0 ? "hyperparameters.max_seq_len" : file_param;
    snprintf(err->param, sizeof err->param, "%s", p);
    return err->status;
}

static GfStatus open_data(Run *r, GfError *err) {
    const TrainRunSpec *s = r->spec;
    GfStatus st = trainset_open(r->p, s->train_jsonl, s->train_tar, s->params.max_seq_len, &s->image_limits,
                                TRAINSET_IMAGES_VALIDATED, &r->train, err); /* uploads are validated */
    if (st) return data_error(err, "training_file");
    int64_t tokens = 0, targets = 0;
    for (size_t i = 0; i < trainset_count(r->train); i++) {
        tokens += trainset_tokens(r->train, i);
        targets += trainset_targets(r->train, i);
    }
    r->set_tokens = tokens;
    logf_(r, "info", "training set: %zu examples, %lld tokens, %lld trained, longest %lld", trainset_count(r->train),
          (long long)tokens, (long long)targets, (long long)trainset_max_tokens(r->train));
    if (!s->val_jsonl) return GF_OK;
    st = trainset_open(r->p, s->val_jsonl, s->val_tar, s->params.max_seq_len, &s->image_limits, TRAINSET_IMAGES_VALIDATED,
                       &r->val, err);
    if (st) {
        gf_error_wrap(err, NULL, "validation set");
        return data_error(err, "validation_file");
    }
    logf_(r, "info", "validation set: %zu examples", trainset_count(r->val));
    return GF_OK;
}

static const char *quant_name(ModelQuant q) { return q == MODEL_QUANT_NF4 ? "NF4" : "full-precision"; }

#define MB(b) ((double)(b) / 1e6)

/* The estimate of tm against what the device has free (trainer_fit): a
 * line in the job's log, or the error that fails it naming the sizes. */
static GfStatus judge_fit(Run *r, const TrainMemory *tm, int share, const KnDeviceInfo *dev, const char *name,
                          GfError *err) {
    const TrainRunSpec *s = r->spec;
    TrainFit fit;
    trainer_fit(tm, share, dev->memory_free, s->memory_limit, weights_gauge_bytes(s->gauge, dev->kind), &fit);
    uint64_t train = tm->total - tm->weights, need = fit.need, avail = fit.avail;
    if (fit.fits) {
        logf_(r, "info", "memory: the job needs %.1f MB on %s at most (max_seq_len %lld), %.1f MB are free", MB(need),
              name, (long long)s->params.max_seq_len, MB(avail));
        return GF_OK;
    }
    if (share)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", "hyperparameters.max_seq_len",
                            "the job does not fit %s: its training needs %.1f MB at max_seq_len %lld (adapter state "
                            "%.1f MB, activations %.1f MB, vision tower %.1f MB, backend scratch %.1f MB), %.1f MB "
                            "are free",
                            name, MB(need), (long long)s->params.max_seq_len, MB(tm->state), MB(tm->activations),
                            MB(tm->vision), MB(tm->scratch), MB(avail));
    return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", "hyperparameters.quantization",
                        "the job does not fit %s: a second copy of the base (%s, %.1f MB) and its training (%.1f MB) "
                        "need %.1f MB, %.1f MB are free; with quantization \"%s\" it would share the served base",
                        name, quant_name(s->params.quantization), MB(tm->weights), MB(train), MB(need), MB(avail),
                        weights_quant(s->base) == MODEL_QUANT_NF4 ? "nf4" : "none");
}

/* Before anything is loaded: what the job will need on its device (its
 * adapter's state and the activations at max_seq_len, and a second copy of
 * the base when it cannot share the served one) against what is free, on a
 * context over the served base. */
static GfStatus check_fit(Run *r, int share, GfError *err) {
    const TrainRunSpec *s = r->spec;
    const JobParams *hp = &s->params;
    if (!s->base || !s->pre) return GF_OK;
    ModelOptions mo = {.device = s->device, .precision = s->precision, .n_threads = 1};
    Model *m = NULL;
    LoraAdapter *a = NULL;
    GfStatus st = model_new(s->base, &mo, &m, err);
    if (!st) st = lora_create(m, hp->targets, hp->n_targets, hp->lora_rank, hp->lora_alpha, hp->use_rslora, 0, &a, err);
    if (!st) {
        TrainMemory tm;
        a->dropout = hp->lora_dropout;
        trainer_memory(m, s->pre, a, hp->quantization == MODEL_QUANT_NF4, hp->max_seq_len, &tm);
        const KnBackend *be = model_backend(m);
        KnDeviceInfo dev;
        st = kn_device_info(be->ctx.device, be->ctx.index, &dev, err);
        if (!st) st = judge_fit(r, &tm, share, &dev, be->name, err);
    }
    lora_free(a);
    model_close(m);
    return st;
}

/* On the given base weights when the quantization matches; else a copy of
 * our own, said so with its size. */
static GfStatus open_model(Run *r, GfError *err) {
    const TrainRunSpec *s = r->spec;
    ModelQuant q = s->params.quantization;
    int share = s->base && weights_quant(s->base) == q;
    if (check_fit(r, share, err)) return err->status;
    ModelOptions mo = {.device = s->device, .precision = s->precision, .n_threads = s->n_threads, .quantize = q, .weights = share ? s->base : NULL,
                       .gauge = s->gauge};
    GfStatus st = pipeline_open(s->model_dir, &mo, &r->p, err);
    if (st) return gf_error_wrap(err, "model", "the model");
    double mb = (double)weights_resident_bytes(model_weights(r->p->model)) / 1e6;
    r->shared = share;
    if (share)
        logf_(r, "info", "model: running on the served base weights (%s, %.1f MB, shared)", quant_name(q), mb);
    else if (s->base)
        logf_(r, "info", "model: loaded a second copy of the base weights (%s, %.1f MB): the served base is %s",
              quant_name(q), mb, quant_name(weights_quant(s->base)));
    else
        logf_(r, "info", "model loaded (%s base weights, %.1f MB)", quant_name(q), mb);
    return GF_OK;
}

static GfStatus open_all(Run *r, GfError *err) {
    const TrainRunSpec *s = r->spec;
    const JobParams *hp = &s->params;
    GfStatus st;
    if ((st = open_model(r, err))) return st;
    if ((st = open_data(r, err))) return st;
    st = lora_create(r->p->model, hp->targets, hp->n_targets, hp->lora_rank, hp->lora_alpha, hp->use_rslora,
                     hp->train.seed, &r->a, err);
    if (st) {
        gf_strlcpy(err->param, "hyperparameters.target_modules", sizeof err->param);
        return st;
    }
    r->a->dropout = hp->lora_dropout;
    size_t n_params = 0;
    for (size_t i = 0; i < r->a->n_pairs; i++) n_params += (size_t)(r->a->pairs[i].rank * (r->a->pairs[i].in + r->a->pairs[i].out));
    logf_(r, "info", "adapter: %zu modules, rank %d, %zu trainable parameters", r->a->n_pairs, hp->lora_rank, n_params);
    if ((st = trainer_new(r->p->model, r->a, r->train, &hp->train, &r->t, err))) return st;
    if (s->sched) {
        trainer_set_sched(r->t, s->sched);
        logf_(r, "info", "device: shared with serving, which goes first (training gives way at layer boundaries)");
    }
    logf_(r, "info", "plan: %lld steps (%lld per epoch, %lld epochs)", (long long)trainer_total_steps(r->t),
          (long long)trainer_steps_per_epoch(r->t), (long long)hp->train.epochs);
    if (!s->resume_dir) return GF_OK;
    if ((st = trainer_resume(r->t, s->resume_dir, err))) return st;
    logf_(r, "info", "resumed from the checkpoint of step %lld", (long long)trainer_step_index(r->t));
    return GF_OK;
}

static void close_all(Run *r) {
    trainer_free(r->t);
    lora_free(r->a);
    trainset_close(r->val);
    trainset_close(r->train);
    pipeline_close(r->p);
}

/* ---- checkpoints -------------------------------------------------------------- */

static GfStatus sync_files(const char *dir, GfError *err) {
    static const char *const names[] = {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
                                        "trainer_state.json"};
    char path[4400];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (fs_fsync_path(path, err)) return err->status;
    }
    return fs_fsync_path(dir, err);
}

/* Removes step-N directories older than the newest TRAIN_KEEP_CHECKPOINTS. */
static void prune_checkpoints(const char *root) {
    int64_t newest[TRAIN_KEEP_CHECKPOINTS] = {0};
    DIR *d = opendir(root);
    if (!d) return;
    struct dirent *e;
    for (int pass = 0; pass < 2; pass++) {
        rewinddir(d);
        while ((e = readdir(d))) {
            char *end;
            long long s = strncmp(e->d_name, "step-", 5) == 0 ? strtoll(e->d_name + 5, &end, 10) : 0;
            if (s <= 0 || *end) continue;
            if (pass == 0) {
                for (int i = 0; i < TRAIN_KEEP_CHECKPOINTS; i++)
                    if (s > newest[i]) { int64_t t = newest[i]; newest[i] = s; s = t; }
            } else if (s < newest[TRAIN_KEEP_CHECKPOINTS - 1]) {
                char path[4400];
                snprintf(path, sizeof path, "%s/%s", root, e->d_name);
                fs_remove_tree(path);
            }
        }
    }
    closedir(d);
}

static GfStatus checkpoint(Run *r, GfError *err) {
    const char *root = r->spec->ckpt_root;
    int64_t step = trainer_step_index(r->t);
    char tmp[4200], final_dir[4200], metrics[256];
    snprintf(tmp, sizeof tmp, "%s/.tmp-step-%08lld", root, (long long)step);
    train_run_ckpt_dir(root, step, final_dir, sizeof final_dir);
    fs_remove_tree(tmp);
    fs_remove_tree(final_dir);
    GfStatus st = mkdir(tmp, 0700) == 0 ? GF_OK : fs_io_error(err, "creating a checkpoint directory");
    if (!st) st = trainer_save(r->t, tmp, err);
    if (!st) st = sync_files(tmp, err);
    if (!st && rename(tmp, final_dir) != 0) st = fs_io_error(err, "publishing a checkpoint");
    if (!st) st = fs_fsync_path(root, err);
    if (st) {
        fs_remove_tree(tmp);
        return st;
    }
    if (isnan(r->eval_loss)) snprintf(metrics, sizeof metrics, "{\"step\":%lld,\"train_loss\":%.6g}", (long long)step, r->last.loss);
    else snprintf(metrics, sizeof metrics, "{\"step\":%lld,\"train_loss\":%.6g,\"valid_loss\":%.6g}", (long long)step, r->last.loss, r->eval_loss);
    if (r->hooks->on_checkpoint && (st = r->hooks->on_checkpoint(r->hooks->user, step, final_dir, metrics, err))) return st;
    prune_checkpoints(root);
    logf_(r, "info", "checkpoint saved at step %lld", (long long)step);
    return GF_OK;
}

/* The run is blocked (reason) or no longer (NULL), said through on_blocked
 * or else the log. */
static void blocked(Run *r, const char *reason, const char *message) {
    if (r->hooks->on_blocked) r->hooks->on_blocked(r->hooks->user, reason, message);
    else logf_(r, reason ? "warn" : "info", "%s", message);
}

static int stop_or_pause_asked(Run *r) {
    return stop_asked(r) || (r->hooks->should_pause && r->hooks->should_pause(r->hooks->user));
}

/* A checkpoint that finds the disk full waits for space: the run says so,
 * tries again every CKPT_RETRY_S seconds for up to disk_full_wait_s, and
 * says when space is back. Still full then (or a stop or pause asked
 * meanwhile): GF_NO_SPACE, code disk_full, saying what to do. */
#define CKPT_RETRY_S 2.0
static GfStatus checkpoint_or_wait(Run *r, GfError *err) {
    GfStatus st = checkpoint(r, err);
    unsigned wait_s = r->spec->disk_full_wait_s;
    if (st != GF_NO_SPACE || !wait_s) return st;
    long long step = (long long)trainer_step_index(r->t);
    char why[GF_ERR_MSG_MAX + 160];
    snprintf(why, sizeof why, "Waiting for disk space: the checkpoint of step %lld could not be written (%s); "
             "trying again every %.0f s for up to %u s", step, err->message, CKPT_RETRY_S, wait_s);
    blocked(r, why, why);
    double until = gf_time_mono() + wait_s;
    while (st == GF_NO_SPACE && gf_time_mono() < until && !stop_or_pause_asked(r)) {
        for (double t = 0; t < CKPT_RETRY_S && !stop_or_pause_asked(r); t += 0.25) usleep(250 * 1000);
        st = checkpoint(r, err);
    }
    if (!st) {
        snprintf(why, sizeof why, "Disk space is back: the checkpoint of step %lld was written", step);
        blocked(r, NULL, why);
        return GF_OK;
    }
    if (st != GF_NO_SPACE) return st;
    if (stop_asked(r)) return gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "cancelled while waiting for disk space");
    return gf_error_set(err, GF_NO_SPACE, "disk_full", NULL,
                        "The data disk stayed full: the checkpoint of step %lld could not be written. Free space "
                        "(delete datasets, adapters or exports), then resume the job; it continues from its last checkpoint",
                        step);
}

/* ---- the loop ----------------------------------------------------------------- */

static GfStatus evaluate(Run *r, GfError *err) {
    double loss;
    GfStatus st = trainer_eval(r->t, r->val, stop_asked, r, &loss, err);
    if (st) return st;
    r->eval_loss = loss;
    if (r->hooks->on_eval) r->hooks->on_eval(r->hooks->user, trainer_step_index(r->t), loss);
    return GF_OK;
}

static void report(Run *r, const TrainStepInfo *info) {
    r->last = *info;
    r->step_s_sum += info->seconds;
    r->steps_run++;
    TrainRunRates rates = {.tokens_per_s = info->seconds > 0 ? (double)info->tokens / info->seconds : NAN,
                           .eta_s = r->step_s_sum / (double)r->steps_run * (double)(info->total_steps - info->step),
                           .eval_loss = r->eval_loss};
    if (r->hooks->on_step) r->hooks->on_step(r->hooks->user, info, &rates);
}

static GfStatus loop(Run *r, GfError *err) {
    const JobParams *hp = &r->spec->params;
    GfStatus st = GF_OK;
    while (!st && !trainer_done(r->t)) {
        TrainStepInfo info;
        if ((st = trainer_step(r->t, stop_asked, r, &info, err))) break;
        report(r, &info);
        int64_t step = info.step;
        int last = trainer_done(r->t);
        if (r->val && ((hp->eval_every && step % hp->eval_every == 0) || last)) st = evaluate(r, err);
        int saved = !st && (step % hp->save_every == 0 || last);
        if (saved) st = checkpoint_or_wait(r, err);
        if (!st && r->spec->stop_at_step && step >= r->spec->stop_at_step && !last)
            st = gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "stopped after step %lld as asked", (long long)step);
        if (!st && !last && r->hooks->should_pause && r->hooks->should_pause(r->hooks->user)) {
            if (!saved) st = checkpoint_or_wait(r, err);
            if (!st)
                st = gf_error_set(err, GF_CANCELLED, "paused", NULL, "Job paused after step %lld of %lld; resume continues from there",
                                  (long long)step, (long long)info.total_steps);
        }
    }
    return st;
}

static void summarize(const Run *r, TrainRunResult *out) {
    *out = (TrainRunResult){.steps = trainer_total_steps(r->t), .final_loss = r->steps_run ? r->last.loss : NAN,
                            .trained_tokens = r->set_tokens * r->spec->params.train.epochs,
                            .eval_loss = r->eval_loss, .n_modules = (int)r->a->n_pairs};
    for (size_t i = 0; i < r->a->n_pairs; i++)
        if (strstr(r->a->pairs[i].module, "vision")) out->has_vision = 1;
}

GfStatus train_run(const TrainRunSpec *spec, const TrainRunHooks *hooks, TrainRunResult *result, GfError *err) {
    static const TrainRunHooks none = {0};
    Run r = {.spec = spec, .hooks = hooks ? hooks : &none, .eval_loss = NAN};
    GfStatus st = fs_mkdirs(spec->ckpt_root, err);
    if (!st) st = open_all(&r, err);
    if (!st) st = loop(&r, err);
    if (!st) trainer_adapter_download(r.t); /* the trained values, from the device */
    if (!st) st = lora_save_dir(r.a, spec->adapter_out, err);
    if (!st) {
        summarize(&r, result);
        logf_(&r, "info", "training done after %lld steps", (long long)result->steps);
        if (spec->keep_adapter) {
            result->adapter = r.a;
            r.a = NULL;
            if (r.shared) { /* its device slab sits beside the served base: serving binds it as it is */
                trainer_take_params(r.t, &result->params);
                logf_(&r, "info", "adapter: handed to serving on the device as trained, without a copy");
            }
        }
    }
    close_all(&r);
    return st;
}
