/* trainer.h - the LoRA training loop: an epoch / step plan over a TrainSet,
 * gradient accumulation, clipping, the learning-rate schedule, AdamW, a
 * validation loss, and checkpoints that resume bit for bit.
 *
 * The plan: every epoch visits every example once, in an order drawn from
 * the seed and the epoch (Fisher-Yates over a splitmix64 stream, so the order
 * is a pure function of (seed, epoch) and needs no saved RNG state). An
 * optimizer step takes the next batch_size x grad_accum examples of that
 * order (the last step of an epoch takes what is left); steps_per_epoch =
 * ceil(examples / (batch_size x grad_accum)), total = epochs x that. The
 * step's loss is the mean token loss over all its examples, and each
 * sequence's gradient is scaled by 1 / (the step's trained tokens), so the
 * result is that of one large batch whatever batch_size and grad_accum are
 * (as transformers does with num_items_in_batch). Sequences are not padded:
 * each runs at its own length, which is what a padded batch with its
 * attention mask computes.
 *
 * LoRA dropout (the adapter's dropout, > 0) is on for training sequences
 * only, with masks drawn from (seed, step, position in the step).
 *
 * Per step: zero the gradients, forward and backward each example, clip by
 * global norm (max_grad_norm, 0 = off), learning rate from the schedule at
 * the 0-based step (warmup_steps = ceil(warmup_ratio x total)), AdamW. A stop
 * request (the hook, asked between sequences) abandons the step: the
 * adapter and optimizer are left as they were before it. A loss or gradient
 * that is not finite stops training (GF_UNPROCESSABLE, training_diverged)
 * before the update, so no checkpoint or adapter ever holds NaN.
 *
 * Checkpoint (trainer_save into an existing empty directory; the caller makes
 * it durable and atomic): adapter_config.json + adapter_model.safetensors
 * (PEFT, loadable as is), optimizer.safetensors (AdamW moments, F32), and
 * trainer_state.json (format, step, plan, seed, config, AdamW step and the
 * SHA-256 of both tensor files). trainer_resume checks the plan and config
 * match, the digests, every shape and dtype, and then continues exactly
 * where the checkpoint was taken.
 *
 * Ownership: the Trainer borrows the model, the adapter (whose weights it
 * updates and whose gradient buffers it allocates) and the TrainSets; it owns
 * its workspace and optimizer. Threading: one thread (the job worker or the
 * CLI) drives a trainer; the stop hook may read state set by other threads.
 */
#ifndef GF_TRAINER_H
#define GF_TRAINER_H

#include <stdint.h>

#include "devsched.h"
#include "lora.h"
#include "preprocess.h"
#include "optim.h"
#include "trainset.h"

typedef struct {
    int64_t epochs;
    int64_t batch_size;       /* sequences per micro-batch */
    int64_t grad_accum;       /* micro-batches per optimizer step */
    double lr;                /* peak learning rate */
    double warmup_ratio;      /* of total steps, in [0, 1) */
    double weight_decay;      /* AdamW decoupled decay */
    double max_grad_norm;     /* clip threshold; 0 = no clipping */
    ScheduleKind schedule;
    uint64_t seed;            /* data order */
} TrainConfig;

typedef struct {
    int64_t step;             /* steps done after this one (1-based) */
    int64_t total_steps;
    double epoch;             /* epochs done, fractional */
    double loss;              /* mean token loss of the step, nats */
    double lr;                /* learning rate used */
    double grad_norm;         /* global norm before clipping */
    int64_t tokens;           /* tokens run (prompt + answers) */
    int64_t targets;          /* tokens trained */
    double seconds;           /* wall time of the step */
} TrainStepInfo;

/* Asked between sequences; nonzero stops the step (GF_CANCELLED). */
typedef int (*TrainStopFn)(void *user);

typedef struct Trainer Trainer;

/* A trainer at step 0 for adapter a (bound to m) over train. GF_INVALID for
 * a config out of range. */
GfStatus trainer_new(Model *m, LoraAdapter *a, TrainSet *train, const TrainConfig *cfg, Trainer **out, GfError *err);
void trainer_free(Trainer *t);

int64_t trainer_total_steps(const Trainer *t);
int64_t trainer_steps_per_epoch(const Trainer *t);
int64_t trainer_step_index(const Trainer *t);   /* steps done */
int trainer_done(const Trainer *t);
/* Examples the loader thread had ready (or in progress) when the step asked
 * for them, and examples decoded only then (the first of a run, of an
 * epoch, of an evaluation). */
void trainer_loader_stats(const Trainer *t, uint64_t *prefetched, uint64_t *on_demand);

/* Shares the model's device with a serving engine (devsched.h): each
 * sequence's forward and backward and each update hold the device, giving
 * way to serving steps at layer boundaries. NULL: the device is the
 * trainer's alone. s must outlive the trainer or be unset first. */
void trainer_set_sched(Trainer *t, DevSched *s);

/* One optimizer step. GF_CANCELLED when stop asked for it (nothing changed). */
GfStatus trainer_step(Trainer *t, TrainStopFn stop, void *user, TrainStepInfo *info, GfError *err);

/* Mean token loss of the adapter over every example of val (no gradients).
 * GF_CANCELLED when stop asks. */
GfStatus trainer_eval(Trainer *t, TrainSet *val, TrainStopFn stop, void *user, double *loss, GfError *err);

/* Writes the checkpoint files into dir (existing, empty). */
GfStatus trainer_save(Trainer *t, const char *dir, GfError *err);
/* Restores adapter weights, moments and step from a checkpoint directory
 * written by trainer_save for the same model, adapter shape, data and config.
 * GF_FORMAT when a file is damaged, GF_CONFLICT when it belongs to other
 * training; on error the trainer is unchanged. */
GfStatus trainer_resume(Trainer *t, const char *dir, GfError *err);
/* The adapter's parameters live on the model's device while it trains:
 * download brings them into the LoraAdapter's host slab (before saving it
 * or handing it over; trainer_save does it), upload sends host changes back. */
void trainer_adapter_download(Trainer *t);
/* Hands the device slab of the adapter's parameters (trainer_adapter_download
 * first: the values are final) to the caller, to bind elsewhere without a
 * copy (lora_bind_adopt); the trainer may then only be freed. */
void trainer_take_params(Trainer *t, KnBuffer *out);
void trainer_adapter_upload(Trainer *t);

/* SHA-256 (lowercase hex) of a file. A checkpoint's trainer_state.json holds
 * the digests of its tensor files, so its digest identifies the whole
 * checkpoint. GF_FORMAT when the file is missing. */
GfStatus trainer_file_digest(const char *path, char hex[65], GfError *err);

/* What training adapter a on m takes in memory on m's device (sequences run
 * one at a time, so batch size and accumulation add nothing): the base
 * weights (m's copy on its device as uploaded when m is of the job's
 * quantization, weights_device_bytes; else the stored sizes with the
 * linears in NF4 when nf4, on CUDA less what m's copy keeps in host memory,
 * weights_mapped_bytes), the adapter's training state (weights, gradients,
 * AdamW m and v in float32, and the dropout scratch), the activations of
 * one seq_len sequence (grad_workspace_bytes), the vision tower's
 * workspace for one image at the processor's budget (its training buffers
 * when a adapts the tower, else its inference ones; 0 without a tower), and
 * the backend's own scratch and workspaces at m's precision
 * (grad_scratch_bytes; 0 on the CPU kinds). a's dropout is read: set it
 * first. test_memory_estimate checks the total against the guarded
 * backend's peak over a job's steps and validation. */
typedef struct {
    uint64_t n_linears, n_params;
    uint64_t weights, state, activations, vision, scratch, total;   /* bytes */
} TrainMemory;

void trainer_memory(const Model *m, const PreprocessConfig *pre, const LoraAdapter *a, int nf4, int64_t seq_len,
                    TrainMemory *out);

/* Whether a job of estimate tm fits its device: it needs tm->total there,
 * less the base weights when it shares a resident copy; it has the device's
 * free bytes, and at most limit less the resident base copies when a limit
 * (bytes this process may use there) is set. */
typedef struct {
    uint64_t need, avail;
    int fits;
} TrainFit;

void trainer_fit(const TrainMemory *tm, int shares_base, uint64_t device_free, uint64_t limit, uint64_t resident,
                 TrainFit *out);

#endif
