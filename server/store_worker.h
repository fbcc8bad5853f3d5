/* store_worker.h - the store queries of the job worker (server/jobs.c), on
 * the same SQLite connection as api/store.h. The state machine they keep:
 * queued -> running (claim) -> succeeded (with its adapter, one transaction)
 * | failed | cancelled; a job found `running` when the worker looks for work
 * was interrupted (crash, kill, shutdown) and is claimed again to resume.
 * Every call is one transaction; progress and its event commit together.
 * Thread-safe like the rest of the store.
 */
#ifndef GF_STORE_WORKER_H
#define GF_STORE_WORKER_H

#include "store.h"

/* The next job to work on: one left `running` first (*resumed = 1), else the
 * oldest queued, which becomes running (started_at, attempt + 1, a status
 * event). GF_NOT_FOUND when there is none. */
GfStatus store_job_claim(Store *s, JobRow *out, int *resumed, GfError *err);

/* Updates step, total_steps, epoch, loss, eval_loss, tokens_per_s and eta_s
 * from p (negative steps and NAN values leave a column unchanged) and adds
 * an event (type "metrics") with message and data (JSON text, may be ""). */
GfStatus store_job_progress(Store *s, const char *id, const JobRow *p, const char *message, const char *data,
                            GfError *err);
/* Adds one event. level: info | warn | error; type: status | log | metrics. */
GfStatus store_job_event(Store *s, const char *id, const char *level, const char *type, const char *message,
                         GfError *err);
/* 1 when a cancel was asked for the job (or it no longer exists). */
int store_job_cancel_requested(Store *s, const char *id);

/* 1 when a pause was asked for the running job. */
int store_job_pause_requested(Store *s, const char *id);
/* running -> paused (queued, held; resume continues from the newest
 * checkpoint), with message as its status event and its status reason. */
GfStatus store_job_paused(Store *s, const char *id, const char *message, GfError *err);

/* A running job's status reason (reason, or NULL when it no longer
 * applies) with event as a status event (warn with a reason, else info). */
GfStatus store_job_reason(Store *s, const char *id, const char *reason, const char *event, GfError *err);

/* Records a published checkpoint (replacing rows of the same or later steps,
 * which a resumed run recomputes) and forgets all but the newest keep.
 * sha256: digest of its trainer_state.json. */
GfStatus store_checkpoint_add(Store *s, const char *job_id, int64_t step, const char *sha256, const char *metrics,
                              int keep, GfError *err);
/* The job's checkpoints, newest first: steps[] and digests[]. */
GfStatus store_checkpoint_list(Store *s, const char *job_id, int64_t *steps, char (*digests)[65], int max, int *n,
                               GfError *err);

/* running -> failed or cancelled, with the reason (code, the field it
 * names or NULL, message) and a status event. */
GfStatus store_job_finish(Store *s, const char *id, const char *status, const char *code, const char *param,
                          const char *message, GfError *err);
/* running -> succeeded (with the tokens trained, -1 = unknown): publishes the adapter's two files under
 * adapters/<a->name>/, inserts its row and marks the job, all or nothing. */
GfStatus store_job_succeed(Store *s, const char *id, const AdapterRow *a, int64_t trained_tokens, const char *config_tmp,
                           const char *weights_tmp, GfError *err);

/* ---- exports: queued -> running (claim) -> succeeded | failed | cancelled;
 * one found `running` was interrupted and is claimed again, from the start. */
/* The next export: one left running first, else the oldest queued, which
 * becomes running; bytes_done restarts at 0. GF_NOT_FOUND when none. */
GfStatus store_export_claim(Store *s, ExportRow *out, GfError *err);
/* Records progress; *cancel = 1 when a cancel was asked (or the row is gone). */
GfStatus store_export_progress(Store *s, const char *id, uint64_t done, uint64_t total, int *cancel, GfError *err);
/* running -> status (succeeded with result JSON, or failed / cancelled with
 * code and message). */
GfStatus store_export_finish(Store *s, const char *id, const char *status, const char *code, const char *message,
                             const char *result, GfError *err);

/* Files of a dataset (images.tar may not exist) and a job's directory. */
void store_dataset_paths(Store *s, const char *id, char jsonl[4096], char tar[4096]);
void store_job_dir(Store *s, const char *id, char dir[4096]);

#endif
