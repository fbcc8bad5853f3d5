/* jobs.h - the job worker: one thread that runs queued fine-tuning jobs one
 * at a time on this server's device, through train_run (the trainer that
 * `gemmaforge train` runs too).
 *
 * State machine (store_worker.h): the worker claims a job left `running` by
 * an interrupted process first, then the oldest queued one. A resumed job
 * continues from its newest recorded checkpoint whose digest still matches
 * (older ones are tried next; with none it starts over), so kill -9 at any
 * moment loses at most save_every steps and ends with the same adapter as an
 * uninterrupted run. Progress, evaluation, checkpoints and log lines are
 * committed as they happen. Cancel (cancel_requested in the store) stops the
 * job between two sequences and marks it cancelled. Pause (pause_requested)
 * checkpoints the job after its current step and puts it back in the queue,
 * held (paused) until resumed; it then continues from that checkpoint. Success publishes the
 * adapter under adapters/<name>/ and registers it in the same transaction
 * that marks the job succeeded; name: "<suffix>-<8 hex of the job id>", or
 * "ft-<24 hex>" without a suffix.
 *
 * A job runs on the served base weights (cfg.base) when its quantization
 * matches theirs: one copy of the base in memory, read by the serving
 * engine and the job at once. Otherwise (no served base, or the job asks
 * for NF4 where the base is full precision, or the reverse) the job loads
 * its own copy from the model directory, says so in its log with the size,
 * and drops it when it ends; cfg.gauge counts every copy.
 *
 * Threads: jobs_start and jobs_stop are called by the main thread; the
 * worker thread owns its trainer. jobs_stop asks a running job to stop at
 * the next sequence boundary and joins the thread; that job stays `running`
 * and resumes at the next start.
 */
#ifndef GF_JOBS_H
#define GF_JOBS_H

#include "devsched.h"
#include "image.h"
#include "lora.h"
#include "preprocess.h"
#include "store.h"
#include "weights.h"

typedef struct {
    const char *model_dir;     /* the base model's directory */
    const char *model_name;    /* its served name (adapters record it) */
    int max_lora_rank;
    GemmaWeights *base;        /* the served base weights (a reference is held until jobs_stop), or NULL */
    WeightsGauge *gauge;       /* counts a job's own copy of the base (may be NULL) */
    DevSched *sched;           /* the device shared with the serving engine (devsched.h), or NULL */
    const char *device;        /* the jobs' device ("cuda:0", ...); NULL = the default (model.h) */
    const char *precision;     /* their precision ("fp32", "bf16"); NULL = the default (model.h) */
    const PreprocessConfig *pre;  /* the served pipeline's: each job checks it fits before loading (or NULL) */
    uint64_t memory_limit;     /* bytes this process may use on the device; 0 = what it has free */
    int n_threads;             /* engine threads, <= 0 = all cores */
    ImageLimits image_limits;
    double poll_s;             /* how often an idle worker looks for jobs */
    unsigned disk_full_wait_s; /* a checkpoint that finds the disk full waits this long, then the job pauses */
    /* called on the worker thread when a job's adapter is registered, with
     * the trained adapter and, when the job trained on the served base, its
     * parameters still on the device (both taken): the serving engine takes
     * them from memory. NULL = the adapter is freed. */
    void (*on_adapter)(void *cls, const char *name, LoraAdapter *adapter, KnBuffer *params);
    /* frees a job's device parameters that on_adapter did not take (its
     * registration failed); needed with on_adapter */
    void (*free_params)(void *cls, KnBuffer *params);
    void *on_adapter_cls;
    /* called on the worker thread after each commit of a job's events or
     * status (event streams wake on it); may be NULL */
    void (*on_event)(void *cls, const char *job_id);
    void *on_event_cls;
} JobsConfig;

typedef struct Jobs Jobs;

GfStatus jobs_start(const JobsConfig *cfg, Store *store, Jobs **out, GfError *err);
void jobs_stop(Jobs *j);

#endif
