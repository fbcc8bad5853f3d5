/* train_run.h - one fine-tuning run from files to a trained adapter, shared
 * by `gemmaforge train` and the server's job worker: open the model (NF4 when
 * asked; on the given base weights when their quantization matches), encode the datasets, create the adapter, resume from a checkpoint
 * when one is given, step until the plan is done, evaluate every eval_every
 * steps and at the end, checkpoint every save_every steps and at the end,
 * and write the final adapter.
 *
 * Checkpoints: CKPT_ROOT/step-NNNNNNNN/ written by trainer_save into
 * CKPT_ROOT/.tmp-step-NNNNNNNN/, every file fsynced, the directory renamed
 * into place and CKPT_ROOT fsynced; only then is on_checkpoint called (the
 * worker records the row there). A directory that exists is complete; one
 * that is not recorded (a crash between rename and record) is replaced when
 * its step comes again. Only the newest TRAIN_KEEP_CHECKPOINTS stay: older
 * directories are removed once the new one is recorded.
 *
 * Hooks are called on the running thread; any may be NULL. should_stop is
 * asked between sequences: a stop abandons the current step and train_run
 * returns GF_CANCELLED (the last checkpoint stays the resume point).
 * Errors carry a message a user can act on (the dataset line, the memory
 * needed, the hyperparameter at fault). A checkpoint that finds the disk
 * full waits up to disk_full_wait_s for space (on_blocked says so), then
 * fails with GF_NO_SPACE, code disk_full.
 */
#ifndef GF_TRAIN_RUN_H
#define GF_TRAIN_RUN_H

#include <stdint.h>

#include "hyperparameters.h"
#include "trainer.h"

#define TRAIN_KEEP_CHECKPOINTS 3

typedef struct {
    const char *model_dir;
    GemmaWeights *base;                   /* weights loaded from model_dir, shared when their quantization matches; or NULL */
    WeightsGauge *gauge;                  /* counts a copy loaded here (may be NULL) */
    DevSched *sched;                      /* the device shared with the serving engine (devsched.h), or NULL */
    const PreprocessConfig *pre;          /* the served pipeline's image processor: with base, the job checks
                                             that it fits its device before loading anything; NULL = no check */
    uint64_t memory_limit;                /* bytes this process may use on the device (base copies included);
                                             0 = as much as the device has free */
    const char *train_jsonl, *train_tar;  /* tar may be NULL */
    const char *val_jsonl, *val_tar;      /* NULL = no validation set */
    const char *ckpt_root;                /* checkpoints go here (created) */
    const char *resume_dir;               /* a checkpoint to continue from, or NULL */
    const char *adapter_out;              /* existing empty directory for the final adapter */
    int keep_adapter;                     /* hand the trained adapter back in TrainRunResult.adapter */
    JobParams params;
    const char *device;                   /* "cpu", "cuda:N", ...; NULL = the default (model.h) */
    const char *precision;                /* "fp32", "bf16"; NULL = the default (model.h) */
    int n_threads;                        /* <= 0 = all cores */
    int64_t stop_at_step;                 /* stop (GF_CANCELLED) once this step is done; 0 = never */
    unsigned disk_full_wait_s;            /* a checkpoint that finds the disk full waits this long for space; 0 = fail at once */
    ImageLimits image_limits;
} TrainRunSpec;

typedef struct {
    double tokens_per_s;                  /* of the last step */
    double eta_s;                         /* remaining steps x mean step time */
    double eval_loss;                     /* latest, NAN = none yet */
} TrainRunRates;

typedef struct {
    void *user;
    void (*on_log)(void *user, const char *level, const char *message);
    void (*on_step)(void *user, const TrainStepInfo *info, const TrainRunRates *rates);
    void (*on_eval)(void *user, int64_t step, double eval_loss);
    /* A published checkpoint; a failure here fails the run. */
    GfStatus (*on_checkpoint)(void *user, int64_t step, const char *dir, const char *metrics_json, GfError *err);
    int (*should_stop)(void *user);
    /* Asked after each step: yes checkpoints that step (unless it just
     * was) and ends the run with GF_CANCELLED, code "paused"; resuming from
     * that checkpoint continues exactly where it paused. */
    int (*should_pause)(void *user);
    /* The run is blocked (reason: why, in words) or no longer (NULL);
     * message says it for an event. NULL: said in on_log. */
    void (*on_blocked)(void *user, const char *reason, const char *message);
} TrainRunHooks;

typedef struct {
    int64_t steps;                        /* steps of the plan (all done) */
    int64_t trained_tokens;               /* the training set's tokens x epochs (OpenAI's trained_tokens) */
    double final_loss;                    /* of the last step run, NAN if none ran here */
    double eval_loss;                     /* NAN = no validation set */
    int n_modules;                        /* adapted modules */
    int has_vision;                       /* some are in the vision tower */
    LoraAdapter *adapter;                 /* keep_adapter: the trained adapter, owned by the caller */
    KnBuffer params;                      /* keep_adapter, on the served base's weights: the adapter's parameters
                                             as trained, in device memory any context of the device can bind
                                             (lora_bind_adopt) and free; zeroed otherwise. The caller's. */
} TrainRunResult;

/* Checkpoint directory name of a step under root. */
void train_run_ckpt_dir(const char *root, int64_t step, char *out, size_t cap);

GfStatus train_run(const TrainRunSpec *spec, const TrainRunHooks *hooks, TrainRunResult *result, GfError *err);

#endif
