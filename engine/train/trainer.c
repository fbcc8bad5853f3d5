/* trainer.c - the training loop, validation and checkpoints. */
#include "trainer.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "jsoncheck.h"
#include "loader.h"
#include "safetensors.h"
#include "sha256.h"

#define STATE_FORMAT 1

struct Trainer {
    Model *m;
    LoraAdapter *a;
    LoraBinding b;
    TrainSet *train;
    TrainConfig cfg;
    GradWorkspace *w;
    ExampleLoader *loader;     /* the next example, decoded while this one computes */
    int64_t w_tokens;          /* the workspace's capacity */
    AdamW opt;
    int64_t step;              /* steps done */
    int64_t steps_per_epoch, total_steps, warmup_steps, per_step;
    KnBuffer dropout_row;      /* LoRA dropout scratch (2 x the widest input, device) */
    uint32_t *order;           /* the current epoch's example order */
    int64_t order_epoch;       /* which epoch order holds, -1 = none */
    DevSched *sched;           /* the device shared with serving (borrowed), NULL = ours alone */
};

void trainer_set_sched(Trainer *t, DevSched *s) {
    t->sched = s;
    model_set_yield(t->m, s ? devsched_yield_hook : NULL, s);
}

static void device_enter(Trainer *t) {
    if (t->sched) devsched_train_enter(t->sched);
}
static void device_leave(Trainer *t) {
    if (t->sched) devsched_train_leave(t->sched);
}

/* ---- the plan ------------------------------------------------------------------ */

/* The example order of an epoch: Fisher-Yates from (seed, epoch). */
static void epoch_order(Trainer *t, int64_t epoch) {
    if (t->order_epoch == epoch) return;
    size_t n = trainset_count(t->train);
    uint64_t s = t->cfg.seed ^ (0xD1B54A32D192ED03ull * (uint64_t)(epoch + 1));
    for (size_t i = 0; i < n; i++) t->order[i] = (uint32_t)i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(gf_splitmix64(&s) % i);
        uint32_t tmp = t->order[i - 1];
        t->order[i - 1] = t->order[j];
        t->order[j] = tmp;
    }
    t->order_epoch = epoch;
}

/* LoRA dropout of the k-th sequence of a step: its masks are a function of
 * (seed, step, k), so a resumed run draws them again. Off for evaluation. */
static void set_dropout(Trainer *t, int64_t step, int64_t k, int on) {
    t->b.dropout = (LoraDropout){0};
    if (!on || !(t->a->dropout > 0)) return;
    uint64_t s = t->cfg.seed ^ 0x5DEECE66Dull;
    uint64_t key = gf_splitmix64(&s) ^ ((uint64_t)step << 24 | (uint64_t)k); /* k < 2^24 (check_config) */
    t->b.dropout = (LoraDropout){.p = (float)t->a->dropout, .key = gf_splitmix64(&key), .row = t->dropout_row.data};
}

static GfStatus check_config(const TrainConfig *c, GfError *err) {
    if (c->epochs < 1 || c->batch_size < 1 || c->grad_accum < 1 || c->batch_size * c->grad_accum > (1 << 24))
        return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters",
                            "epochs, batch_size and gradient_accumulation_steps must be at least 1");
    if (!(c->lr >= 0) || !(c->warmup_ratio >= 0 && c->warmup_ratio < 1) || !(c->weight_decay >= 0) ||
        !(c->max_grad_norm >= 0))
        return gf_error_set(err, GF_INVALID, "invalid_hyperparameter", "hyperparameters",
                            "learning_rate, warmup_ratio, weight decay and max_grad_norm are out of range");
    return GF_OK;
}

static void plan(Trainer *t) {
    int64_t n = (int64_t)trainset_count(t->train);
    t->per_step = t->cfg.batch_size * t->cfg.grad_accum;
    t->steps_per_epoch = (n + t->per_step - 1) / t->per_step;
    t->total_steps = t->cfg.epochs * t->steps_per_epoch;
    t->warmup_steps = (int64_t)ceil(t->cfg.warmup_ratio * (double)t->total_steps);
}

/* The LoRA dropout's scratch: two rows of the widest input (0 without dropout). */
static size_t dropout_bytes(const LoraAdapter *a) {
    return a->dropout > 0 ? (size_t)(2 * lora_max_in(a)) * sizeof(float) : 0;
}

GfStatus trainer_new(Model *m, LoraAdapter *a, TrainSet *train, const TrainConfig *cfg, Trainer **out, GfError *err) {
    *out = NULL;
    if (check_config(cfg, err)) return err->status;
    if (trainset_count(train) == 0 || trainset_count(train) > UINT32_MAX)
        return gf_error_set(err, GF_INVALID, "empty_dataset", "dataset", "the training set has no examples");
    Trainer *t = gf_calloc(1, sizeof *t, err);
    if (!t) return GF_NO_MEMORY;
    *t = (Trainer){.m = m, .a = a, .train = train, .cfg = *cfg, .order_epoch = -1, .w_tokens = trainset_max_tokens(train)};
    plan(t);
    const KnBackend *be = model_backend(m);
    GfStatus st = lora_bind(m, a, &t->b, err);
    if (!st) st = lora_binding_grads(&t->b, err);
    if (!st) st = adamw_init(&t->opt, &t->b, 0.9, 0.999, 1e-8, cfg->weight_decay, err);
    if (!st) st = grad_workspace_new(m, t->w_tokens, t->b.max_rank, &t->w, err);
    if (!st && !(t->order = gf_malloc(trainset_count(train) * sizeof *t->order, err))) st = GF_NO_MEMORY;
    if (!st) st = loader_start(&t->loader, err);
    if (!st && a->dropout > 0)
        st = be->ops->alloc(&be->ctx, &t->dropout_row, dropout_bytes(a), KN_F32, "the LoRA dropout scratch", err);
    if (st) {
        trainer_free(t);
        return st;
    }
    *out = t;
    return GF_OK;
}

void trainer_free(Trainer *t) {
    if (!t) return;
    loader_stop(t->loader);
    trainer_set_sched(t, NULL);
    grad_workspace_free(t->w);
    adamw_free(&t->opt);
    lora_binding_free(&t->b);
    free(t->order);
    const KnBackend *be = model_backend(t->m);
    be->ops->free(&be->ctx, &t->dropout_row);
    free(t);
}

int64_t trainer_total_steps(const Trainer *t) { return t->total_steps; }
int64_t trainer_steps_per_epoch(const Trainer *t) { return t->steps_per_epoch; }
int64_t trainer_step_index(const Trainer *t) { return t->step; }
int trainer_done(const Trainer *t) { return t->step >= t->total_steps; }

void trainer_loader_stats(const Trainer *t, uint64_t *prefetched, uint64_t *on_demand) {
    LoaderStats s;
    loader_stats(t->loader, &s);
    *prefetched = s.prefetched;
    *on_demand = s.on_demand;
}

/* ---- a step -------------------------------------------------------------------- */

/* The examples of step: [*first, *first + *count) of its epoch's order. */
static void step_slice(Trainer *t, int64_t step, int64_t *first, int64_t *count) {
    int64_t n = (int64_t)trainset_count(t->train), k = step % t->steps_per_epoch;
    epoch_order(t, step / t->steps_per_epoch);
    *first = k * t->per_step;
    *count = *first + t->per_step <= n ? t->per_step : n - *first;
}

/* A sequence longer than the workspace grows it (a validation example may
 * be longer than every training one): the old one freed first, so that the
 * device never holds both (trainer_memory counts one, at the longest
 * sequence); when the larger one cannot be had, the old size is taken again
 * for the examples that fit it, or none (w_tokens 0: the next example asks
 * again). */
static GfStatus ensure_workspace(Trainer *t, int64_t n, GfError *err) {
    if (n <= t->w_tokens) return GF_OK; /* 0 exactly when there is none */
    int64_t had = t->w_tokens;
    grad_workspace_free(t->w);
    t->w = NULL;
    t->w_tokens = 0;
    GfStatus st = grad_workspace_new(t->m, n, t->b.max_rank, &t->w, err);
    if (!st) {
        t->w_tokens = n;
        return GF_OK;
    }
    GfError again;
    if (had && grad_workspace_new(t->m, had, t->b.max_rank, &t->w, &again) == GF_OK) t->w_tokens = had;
    return st;
}

/* The examples that follow: up to LOADER_AHEAD of set, in order. */
typedef struct {
    TrainSet *set;
    size_t ids[LOADER_AHEAD];
    int n;
} Upcoming;

/* Forward (and backward when grad_scale > 0) of example i of set, the
 * loader preparing the upcoming examples meanwhile. */
static GfStatus run_example(Trainer *t, TrainSet *set, size_t i, const Upcoming *next, float grad_scale,
                            double *loss, int64_t *targets, GfError *err) {
    const TrainExample *ex = NULL;
    GfStatus st = ensure_workspace(t, trainset_tokens(set, i), err);
    if (!st) st = loader_get(t->loader, set, i, &ex, err);
    for (int k = 0; !st && k < next->n; k++) loader_prefetch(t->loader, next->set, next->ids[k]);
    if (st) return st;
    device_enter(t);
    st = grad_scale > 0 ? model_backward(t->m, t->w, &t->b, &ex->seq, grad_scale, loss, targets, err)
                        : model_loss(t->m, t->w, &t->b, &ex->seq, loss, targets, err);
    device_leave(t);
    if (st) gf_error_wrap(err, "dataset", "line %llu", (unsigned long long)ex->line);
    return st;
}

/* The training examples after position pos of this epoch's order, up to
 * its end (the next epoch's order is drawn when it starts). */
static Upcoming upcoming_train(const Trainer *t, int64_t pos) {
    Upcoming u = {t->train, {0}, 0};
    int64_t n = (int64_t)trainset_count(t->train);
    for (int64_t p = pos + 1; p < n && u.n < LOADER_AHEAD; p++) u.ids[u.n++] = t->order[p];
    return u;
}

static GfStatus cancelled(GfError *err) {
    return gf_error_set(err, GF_CANCELLED, "cancelled", NULL, "stopped on request");
}

GfStatus trainer_step(Trainer *t, TrainStopFn stop, void *user, TrainStepInfo *info, GfError *err) {
    memset(info, 0, sizeof *info);
    if (trainer_done(t)) return gf_error_set(err, GF_CONFLICT, "training_done", NULL, "every step of the plan is done");
    double t0 = gf_time_mono(), loss_sum = 0.0;
    int64_t first, count, total = 0, tokens = 0;
    step_slice(t, t->step, &first, &count);
    for (int64_t k = 0; k < count; k++) total += trainset_targets(t->train, t->order[first + k]);
    lora_binding_zero_grads(&t->b);
    for (int64_t k = 0; k < count; k++) {
        if (stop && stop(user)) return cancelled(err);
        size_t i = t->order[first + k];
        double l;
        int64_t n;
        Upcoming next = upcoming_train(t, first + k);
        set_dropout(t, t->step, k, 1);
        GfStatus st = run_example(t, t->train, i, &next, 1.0f / (float)total, &l, &n, err);
        set_dropout(t, 0, 0, 0);
        if (st) return st;
        loss_sum += l;
        tokens += trainset_tokens(t->train, i);
    }
    if (stop && stop(user)) return cancelled(err);
    device_enter(t);
    double norm = lora_grad_norm(&t->b);
    if (!isfinite(loss_sum) || !isfinite(norm)) {
        device_leave(t);
        return gf_error_set(err, GF_UNPROCESSABLE, "training_diverged", "hyperparameters.learning_rate",
                            "training diverged at step %lld: the %s is not finite; lower the learning rate",
                            (long long)t->step + 1, isfinite(loss_sum) ? "gradient" : "loss");
    }
    info->grad_norm = lora_clip_grads(&t->b, t->cfg.max_grad_norm);
    info->lr = schedule_lr(t->cfg.schedule, t->cfg.lr, t->warmup_steps, t->total_steps, t->step);
    adamw_step(&t->opt, &t->b, info->lr);
    device_leave(t);
    t->step++;
    info->step = t->step;
    info->total_steps = t->total_steps;
    info->epoch = (double)t->step / (double)t->steps_per_epoch;
    info->loss = loss_sum / (double)total;
    info->tokens = tokens;
    info->targets = total;
    info->seconds = gf_time_mono() - t0;
    return GF_OK;
}

GfStatus trainer_eval(Trainer *t, TrainSet *val, TrainStopFn stop, void *user, double *loss, GfError *err) {
    double sum = 0.0;
    int64_t targets = 0;
    for (size_t i = 0; i < trainset_count(val); i++) {
        if (stop && stop(user)) return cancelled(err);
        double l;
        int64_t n;
        Upcoming next = {val, {0}, 0};
        for (size_t j = i + 1; j < trainset_count(val) && next.n < LOADER_AHEAD; j++) next.ids[next.n++] = j;
        if (run_example(t, val, i, &next, 0.0f, &l, &n, err)) return err->status;
        sum += l;
        targets += n;
    }
    *loss = targets ? sum / (double)targets : NAN;
    return GF_OK;
}

/* ---- checkpoints ----------------------------------------------------------------- */

GfStatus trainer_file_digest(const char *path, char hex[65], GfError *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return gf_error_set(err, GF_FORMAT, "checkpoint_damaged", NULL, "a checkpoint file is missing: %s", strerror(errno));
    GfSha256 ctx;
    gf_sha256_init(&ctx);
    uint8_t buf[1 << 16], digest[GF_SHA256_LEN];
    ssize_t r;
    while ((r = read(fd, buf, sizeof buf)) > 0 || (r < 0 && errno == EINTR))
        if (r > 0) gf_sha256_update(&ctx, buf, (size_t)r);
    close(fd);
    if (r < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot read a checkpoint file: %s", strerror(errno));
    gf_sha256_final(&ctx, digest);
    gf_hex(digest, GF_SHA256_LEN, hex);
    return GF_OK;
}

static void path_in(char *out, size_t cap, const char *dir, const char *name) { snprintf(out, cap, "%s/%s", dir, name); }

static GfStatus save_moments(const Trainer *t, const char *dir, GfError *err) {
    char path[4096];
    path_in(path, sizeof path, dir, "optimizer.safetensors");
    float *m = gf_malloc((t->opt.n ? 2 * t->opt.n : 1) * sizeof *m, err);
    if (!m) return GF_NO_MEMORY;
    adamw_download(&t->opt, m, m + t->opt.n);
    StWriteTensor ts[2] = {{"exp_avg", ST_F32, 1, {(uint64_t)t->opt.n}, m},
                           {"exp_avg_sq", ST_F32, 1, {(uint64_t)t->opt.n}, m + t->opt.n}};
    GfStatus st = safetensors_write(path, ts, 2, err);
    free(m);
    return st;
}

/* The config and plan a checkpoint must match to be resumed. */
static cJSON *plan_json(const Trainer *t) {
    cJSON *o = cJSON_CreateObject();
    const TrainConfig *c = &t->cfg;
    cJSON_AddNumberToObject(o, "epochs", (double)c->epochs);
    cJSON_AddNumberToObject(o, "batch_size", (double)c->batch_size);
    cJSON_AddNumberToObject(o, "grad_accum", (double)c->grad_accum);
    cJSON_AddNumberToObject(o, "lr", c->lr);
    cJSON_AddNumberToObject(o, "warmup_ratio", c->warmup_ratio);
    cJSON_AddNumberToObject(o, "weight_decay", c->weight_decay);
    cJSON_AddNumberToObject(o, "max_grad_norm", c->max_grad_norm);
    cJSON_AddNumberToObject(o, "lora_dropout", t->a->dropout);
    cJSON_AddNumberToObject(o, "schedule", (double)c->schedule);
    char seed[24];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)c->seed);
    cJSON_AddStringToObject(o, "seed", seed);
    cJSON_AddNumberToObject(o, "examples", (double)trainset_count(t->train));
    cJSON_AddNumberToObject(o, "total_steps", (double)t->total_steps);
    cJSON_AddNumberToObject(o, "parameters", (double)t->opt.n);
    return o;
}

static GfStatus write_text(const char *path, const char *text, GfError *err) {
    FILE *f = fopen(path, "we");
    if (!f) return gf_error_set(err, GF_IO, "io_error", NULL, "cannot write the checkpoint: %s", strerror(errno));
    int ok = fputs(text, f) >= 0;
    ok = fflush(f) == 0 && ok && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    int full = errno == ENOSPC || errno == EDQUOT;
    return ok ? GF_OK : gf_error_set(err, full ? GF_NO_SPACE : GF_IO, full ? "insufficient_storage" : "io_error", NULL,
                                     "cannot write the checkpoint: %s", strerror(errno));
}

void trainer_adapter_download(Trainer *t) { lora_binding_download(&t->b, t->a); }
void trainer_adapter_upload(Trainer *t) { lora_binding_upload(&t->b, t->a); }

void trainer_take_params(Trainer *t, KnBuffer *out) {
    *out = t->b.d_params;
    memset(&t->b.d_params, 0, sizeof t->b.d_params);
    t->b.params = NULL;
}

GfStatus trainer_save(Trainer *t, const char *dir, GfError *err) {
    char path[4096], sha_a[65], sha_o[65];
    trainer_adapter_download(t);
    GfStatus st = lora_save_dir(t->a, dir, err);
    if (!st) st = save_moments(t, dir, err);
    if (!st) { path_in(path, sizeof path, dir, "adapter_model.safetensors"); st = trainer_file_digest(path, sha_a, err); }
    if (!st) { path_in(path, sizeof path, dir, "optimizer.safetensors"); st = trainer_file_digest(path, sha_o, err); }
    if (st) return st;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "format", STATE_FORMAT);
    cJSON_AddNumberToObject(o, "step", (double)t->step);
    cJSON_AddNumberToObject(o, "adamw_step", (double)t->opt.step);
    cJSON_AddItemToObject(o, "plan", plan_json(t));
    cJSON *files = cJSON_AddObjectToObject(o, "sha256");
    cJSON_AddStringToObject(files, "adapter_model.safetensors", sha_a);
    cJSON_AddStringToObject(files, "optimizer.safetensors", sha_o);
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    if (!text) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    path_in(path, sizeof path, dir, "trainer_state.json");
    st = write_text(path, text, err);
    free(text);
    return st;
}

/* ---- resume ---------------------------------------------------------------------- */

static GfStatus damaged(GfError *err, const char *what) {
    return gf_error_set(err, GF_FORMAT, "checkpoint_damaged", NULL, "the checkpoint is damaged: %s", what);
}

/* Checks a tensor file's digest against the state's record, then opens it. */
static GfStatus open_checked(const char *dir, const char *name, const cJSON *shas, SafeTensors *st, GfError *err) {
    char path[4096], hex[65];
    path_in(path, sizeof path, dir, name);
    const cJSON *want = cJSON_GetObjectItemCaseSensitive(shas, name);
    if (!cJSON_IsString(want)) return damaged(err, "trainer_state.json has no digest for a tensor file");
    if (trainer_file_digest(path, hex, err)) return err->status;
    if (strcmp(hex, want->valuestring) != 0) return damaged(err, "a tensor file does not match its digest");
    if (!safetensors_open(path, name, st, err)) return GF_OK;
    err->status = GF_FORMAT;
    gf_strlcpy(err->code, "checkpoint_damaged", sizeof err->code);
    return gf_error_wrap(err, NULL, "the checkpoint is damaged");
}

static const float *f32_tensor(const SafeTensors *st, const char *name, uint64_t d0, uint64_t d1, int dims) {
    const StTensor *x = safetensors_find(st, name);
    if (!x || x->dtype != ST_F32 || x->n_dims != dims || x->shape[0] != d0 || (dims == 2 && x->shape[1] != d1)) return NULL;
    return (const float *)x->data;
}

/* Every A and B of the checkpoint's adapter, checked against ours, into
 * params (pair order, A then B: the optimizer's layout). */
static GfStatus read_params(const Trainer *t, const SafeTensors *st, float *params, GfError *err) {
    char name[256];
    size_t off = 0;
    for (size_t i = 0; i < t->a->n_pairs; i++) {
        const LoraPair *p = &t->a->pairs[i];
        snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", p->module);
        const float *A = f32_tensor(st, name, (uint64_t)p->rank, (uint64_t)p->in, 2);
        snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", p->module);
        const float *B = f32_tensor(st, name, (uint64_t)p->out, (uint64_t)p->rank, 2);
        if (!A || !B)
            return gf_error_set(err, GF_CONFLICT, "checkpoint_mismatch", NULL,
                                "the checkpoint's adapter does not have this job's %.160s", p->module);
        memcpy(params + off, A, (size_t)(p->rank * p->in) * sizeof(float));
        off += (size_t)(p->rank * p->in);
        memcpy(params + off, B, (size_t)(p->out * p->rank) * sizeof(float));
        off += (size_t)(p->out * p->rank);
    }
    if (st->n_tensors != 2 * t->a->n_pairs)
        return gf_error_set(err, GF_CONFLICT, "checkpoint_mismatch", NULL, "the checkpoint's adapter has other modules");
    return GF_OK;
}

static void commit_params(Trainer *t, const float *params) {
    size_t off = 0;
    for (size_t i = 0; i < t->a->n_pairs; i++) {
        LoraPair *p = &t->a->pairs[i];
        memcpy(p->A, params + off, (size_t)(p->rank * p->in) * sizeof(float));
        off += (size_t)(p->rank * p->in);
        memcpy(p->B, params + off, (size_t)(p->out * p->rank) * sizeof(float));
        off += (size_t)(p->out * p->rank);
    }
}

static GfStatus read_state(const Trainer *t, const char *dir, cJSON **state, int64_t *step, int64_t *adam_step, GfError *err) {
    char path[4096];
    path_in(path, sizeof path, dir, "trainer_state.json");
    GfError ferr;
    size_t len = 0;
    char *text = gf_read_file(path, 1u << 20, "trainer_state.json", &len, &ferr);
    if (!text) return damaged(err, ferr.message);
    *state = json_parse_strict(text, len, "trainer_state.json", &ferr);
    free(text);
    if (!*state) return damaged(err, ferr.message);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(*state, "format");
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(*state, "step");
    const cJSON *as = cJSON_GetObjectItemCaseSensitive(*state, "adamw_step");
    if (!cJSON_IsNumber(fmt) || fmt->valuedouble != STATE_FORMAT || !cJSON_IsNumber(s) || !cJSON_IsNumber(as))
        return damaged(err, "trainer_state.json lacks format, step or adamw_step");
    *step = (int64_t)s->valuedouble;
    *adam_step = (int64_t)as->valuedouble;
    cJSON *want = plan_json(t);
    int same = cJSON_Compare(want, cJSON_GetObjectItemCaseSensitive(*state, "plan"), 1);
    cJSON_Delete(want);
    if (!same)
        return gf_error_set(err, GF_CONFLICT, "checkpoint_mismatch", NULL,
                            "the checkpoint was taken with other hyperparameters or data");
    if (*step < 0 || *step > t->total_steps || (double)*step != s->valuedouble || *adam_step != *step)
        return damaged(err, "its step is out of range");
    return GF_OK;
}

GfStatus trainer_resume(Trainer *t, const char *dir, GfError *err) {
    cJSON *state = NULL;
    SafeTensors ad = {0}, op = {0};
    int64_t step = 0, adam_step = 0;
    float *params = NULL;
    GfStatus st = read_state(t, dir, &state, &step, &adam_step, err);
    const cJSON *shas = state ? cJSON_GetObjectItemCaseSensitive(state, "sha256") : NULL;
    if (!st) st = open_checked(dir, "adapter_model.safetensors", shas, &ad, err);
    if (!st) st = open_checked(dir, "optimizer.safetensors", shas, &op, err);
    const float *m = st ? NULL : f32_tensor(&op, "exp_avg", (uint64_t)t->opt.n, 0, 1);
    const float *v = st ? NULL : f32_tensor(&op, "exp_avg_sq", (uint64_t)t->opt.n, 0, 1);
    if (!st && (!m || !v)) st = damaged(err, "optimizer.safetensors does not hold this adapter's moments");
    if (!st && !(params = gf_malloc(t->opt.n * sizeof *params, err))) st = GF_NO_MEMORY;
    if (!st) st = read_params(t, &ad, params, err);
    if (!st) {
        commit_params(t, params);
        trainer_adapter_upload(t);
        adamw_upload(&t->opt, m, v);
        t->opt.step = adam_step;
        t->step = step;
    }
    free(params);
    safetensors_close(&ad);
    safetensors_close(&op);
    cJSON_Delete(state);
    return st;
}

/* ---- memory estimate ---------------------------------------------------------- */

void trainer_fit(const TrainMemory *tm, int shares_base, uint64_t device_free, uint64_t limit, uint64_t resident,
                 TrainFit *out) {
    out->need = shares_base ? tm->total - tm->weights : tm->total;
    out->avail = device_free;
    uint64_t room = limit > resident ? limit - resident : 0;
    if (limit && room < out->avail) out->avail = room;
    out->fits = out->need <= out->avail;
}

void trainer_memory(const Model *m, const PreprocessConfig *pre, const LoraAdapter *a, int nf4, int64_t seq_len,
                    TrainMemory *out) {
    ModelMemory mm;
    GemmaWeights *gw = model_weights(m);
    weights_memory(gw, &mm);
    uint64_t n_params = 0;
    int max_rank = 0;
    for (size_t i = 0; i < a->n_pairs; i++) {
        n_params += (uint64_t)(a->pairs[i].rank * (a->pairs[i].in + a->pairs[i].out));
        if (a->pairs[i].rank > max_rank) max_rank = (int)a->pairs[i].rank;
    }
    out->n_linears = mm.n_linears;
    out->n_params = n_params;
    /* m's own copy on its device when it is of the job's quantization: its
     * bytes as uploaded (a GPU copy keeps the per-layer embedding table in
     * host memory, which is not the device's to count); else the stored
     * sizes, the linears as the job would bind them */
    const KnCtx *ctx = &model_backend(m)->ctx;
    int same_quant = (weights_quant(gw) == MODEL_QUANT_NF4) == (nf4 != 0);
    uint64_t copy = same_quant ? weights_device_bytes(gw, ctx->device, ctx->index) : 0; /* 0 on the CPU: no copy */
    out->weights = copy ? copy : mm.other_bytes + (nf4 ? mm.linear_nf4_bytes : mm.linear_full_bytes);
    uint64_t mapped = !copy && ctx->device == KN_DEVICE_CUDA ? weights_mapped_bytes(gw, ctx->device, ctx->index) : 0;
    out->weights -= mapped < out->weights ? mapped : 0;
    /* weights, gradients, AdamW's m and v, all float32 (lora_bind,
     * lora_binding_grads, adamw_init), and the dropout scratch */
    uint64_t slab = n_params * sizeof(float);
    out->state = slab + lora_grads_bytes(n_params) + 2 * slab + dropout_bytes(a);
    out->activations = grad_workspace_bytes(m, seq_len, max_rank);
    int64_t patches = preprocess_max_patches(pre);
    out->vision = model_vision_workspace_bytes(m, patches, max_rank, lora_pairs_vision(a->pairs, a->n_pairs));
    out->scratch = grad_scratch_bytes(m, model_backend(m), seq_len, a, nf4, model_config(m)->vision.present ? patches : 0);
    out->total = out->weights + out->state + out->activations + out->vision + out->scratch;
}
