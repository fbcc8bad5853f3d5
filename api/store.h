/* store.h - the persistence port of the API: the queries handlers need, as
 * plain C structs. A Store is a table of functions (StoreOps, as SQLite's
 * VFS): server/store.c implements it with SQLite in WAL mode plus the files
 * under the data directory; tests/unit/mem_store.c keeps everything in
 * memory. Handlers never see SQL or filesystem layout, and the API library
 * links no database.
 *
 * Every write is one `BEGIN IMMEDIATE` transaction. Functions that take
 * temporary files (dataset and adapter creation) move them into place
 * atomically (write, fsync, rename, fsync the directory) before the row is
 * inserted, and remove them if the insert fails: an object is either wholly
 * present or absent. All functions are thread-safe. Errors: GF_NOT_FOUND,
 * GF_CONFLICT (state), GF_BUSY (queue full), GF_NOT_READY (database busy past
 * its timeout), GF_NO_SPACE (disk full), GF_IO / GF_INTERNAL otherwise; the
 * message never contains SQL or paths.
 */
#ifndef GF_STORE_H
#define GF_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

typedef struct Store Store;

#define STORE_ID_MAX 40
#define STORE_NAME_MAX 257
#define JOB_METADATA_MAX 16384       /* a job's metadata, as JSON text (16 pairs of <= 64 + 512 bytes, escaped) */

typedef struct {
    char id[STORE_ID_MAX];
    char name[STORE_NAME_MAX];
    char status[16];             /* "ready" */
    int64_t created_at;          /* unix seconds */
    uint64_t n_examples, n_images;
    uint64_t bytes;              /* JSONL + archive */
    int has_images;
    char tokens_model[STORE_NAME_MAX]; /* the model they were measured for ("": not measured, no model at upload) */
    int64_t tokens;              /* every example's tokens for that model; -1 when not measured */
    int64_t max_tokens;          /* the longest example's, -1 when not measured */
    uint64_t max_tokens_line;    /* its line */
} DatasetRow;

typedef struct {
    char id[STORE_ID_MAX];
    char dataset_id[STORE_ID_MAX];
    char validation_dataset_id[STORE_ID_MAX]; /* "" = none */
    char model[STORE_NAME_MAX];
    char suffix[64];
    char hyperparameters[2048];  /* normalized JSON written by the API */
    char status[20];             /* queued running succeeded failed cancelled */
    int cancel_requested;
    int paused;                  /* queued and held until resumed (shown as "paused") */
    int pause_requested;         /* running: checkpoint and pause after the current step */
    int64_t created_at, started_at, finished_at; /* 0 = not yet */
    char error_code[48];
    char error_message[512];
    char error_param[GF_ERR_PARAM_MAX]; /* the field the error names; "" = none */
    int64_t step, total_steps;   /* -1 = unknown */
    double epoch, loss, eval_loss, tokens_per_s, eta_s; /* NAN = unknown */
    char adapter[STORE_NAME_MAX];  /* "" until succeeded */
    int64_t trained_tokens;      /* the training set's tokens x epochs once succeeded; -1 = unknown */
    char status_reason[512];     /* why it is where it is (waiting for disk space, paused because...); "" = nothing to say */
    char metadata[JOB_METADATA_MAX]; /* OpenAI's metadata as JSON object text; "" = none */
} JobRow;

typedef struct {
    int64_t seq;                 /* monotonically increasing, for ?after= */
    int64_t created_at;
    char level[8];               /* info warn error */
    char type[16];               /* status log metrics */
    char message[512];
    char data[1024];             /* JSON object text, "" = none */
} JobEvent;

typedef struct {
    char id[STORE_ID_MAX];
    int64_t step;
    int64_t created_at;
    char metrics[512];           /* JSON object text */
    char dir[4096];              /* its directory (a PEFT adapter among its files); "" where the store keeps no files */
} CheckpointRow;

#define STORE_CHECKPOINTS_MAX 100    /* the most checkpoint rows a job lists */

typedef struct {
    char name[STORE_NAME_MAX];
    char source[12];             /* uploaded | trained */
    char job_id[STORE_ID_MAX];   /* "" for uploads */
    char base_model[STORE_NAME_MAX];
    int rank;
    double alpha;
    int use_rslora;
    int n_modules;
    int has_vision;
    uint64_t bytes;
    char sha256[65];             /* of adapter_model.safetensors */
    int64_t created_at;
} AdapterRow;

typedef struct {
    char id[STORE_ID_MAX];
    char kind[16];               /* "merge" (a Hugging Face directory) or "gguf" (one file for llama.cpp) */
    char adapter[STORE_NAME_MAX];
    char dtype[8];               /* merge: auto (the base's dtypes) bf16 f16 f32; gguf: f32 f16 bf16 q8_0 q4_0 */
    char status[20];             /* queued running succeeded failed cancelled */
    int cancel_requested;
    int64_t created_at, started_at, finished_at; /* 0 = not yet */
    uint64_t bytes_done, bytes_total;
    char error_code[48];
    char error_message[512];
    char result[1024];           /* JSON object text of the export's report, "" until succeeded */
} ExportRow;

typedef struct {
    uint64_t datasets;
    uint64_t jobs_by_status[5];  /* queued running succeeded failed cancelled */
    uint64_t adapters;
} StoreCounts;

extern const char *const STORE_JOB_STATUSES[5];

/* The port: one entry per query below (the store_* function of the same
 * name calls it), each with that function's contract. Every entry is
 * required. */
typedef struct StoreOps {
    GfStatus (*dataset_create)(Store *s, const DatasetRow *row, const char *jsonl_tmp, const char *tar_tmp, GfError *err);
    GfStatus (*dataset_get)(Store *s, const char *id, DatasetRow *out, GfError *err);
    GfStatus (*dataset_list)(Store *s, const char *after_id, int limit, DatasetRow *out, int *n, int *has_more,
                             GfError *err);
    GfStatus (*dataset_delete)(Store *s, const char *id, GfError *err);
    GfStatus (*dataset_files)(Store *s, const char *id, char jsonl[4096], char tar[4096], GfError *err);
    GfStatus (*job_create)(Store *s, JobRow *row, int max_queued, GfError *err);
    GfStatus (*job_get)(Store *s, const char *id, JobRow *out, GfError *err);
    GfStatus (*job_list)(Store *s, const char *after_id, int limit, JobRow *out, int *n, int *has_more, GfError *err);
    GfStatus (*job_cancel)(Store *s, const char *id, JobRow *out, GfError *err);
    GfStatus (*job_pause)(Store *s, const char *id, JobRow *out, GfError *err);
    GfStatus (*job_resume)(Store *s, const char *id, JobRow *out, GfError *err);
    GfStatus (*job_events)(Store *s, const char *id, int64_t after_seq, int limit, JobEvent *out, int *n,
                           int *has_more, GfError *err);
    GfStatus (*job_checkpoints)(Store *s, const char *id, CheckpointRow *out, int max, int *n, GfError *err);
    GfStatus (*job_checkpoint)(Store *s, const char *id, int64_t step, CheckpointRow *out, GfError *err);
    GfStatus (*adapter_create)(Store *s, const AdapterRow *row, const char *config_tmp, const char *weights_tmp,
                               GfError *err);
    GfStatus (*adapter_get)(Store *s, const char *name, AdapterRow *out, GfError *err);
    GfStatus (*adapter_list)(Store *s, const char *after_name, int limit, AdapterRow *out, int *n, int *has_more,
                             GfError *err);
    GfStatus (*adapter_delete)(Store *s, const char *name, GfError *err);
    GfStatus (*adapter_files)(Store *s, const char *name, char config[4096], char weights[4096], GfError *err);
    GfStatus (*export_create)(Store *s, ExportRow *row, GfError *err);
    GfStatus (*export_get)(Store *s, const char *id, ExportRow *out, GfError *err);
    GfStatus (*export_list)(Store *s, const char *after_id, int limit, ExportRow *out, int *n, int *has_more,
                            GfError *err);
    GfStatus (*export_cancel)(Store *s, const char *id, ExportRow *out, GfError *err);
    GfStatus (*export_delete)(Store *s, const char *id, GfError *err);
    GfStatus (*export_dir)(Store *s, const char *id, char dir[4096], GfError *err);
    GfStatus (*counts)(Store *s, StoreCounts *out, GfError *err);
    GfStatus (*ping)(Store *s, GfError *err);
} StoreOps;

/* An implementation's struct starts with a Store whose ops it sets. */
struct Store {
    const StoreOps *ops;
};

/* ---- datasets ---------------------------------------------------------- */
/* Moves jsonl_tmp (and tar_tmp unless NULL) into the dataset's directory and
 * inserts the row; on failure nothing remains. */
GfStatus store_dataset_create(Store *s, const DatasetRow *row, const char *jsonl_tmp,
                              const char *tar_tmp, GfError *err);
GfStatus store_dataset_get(Store *s, const char *id, DatasetRow *out, GfError *err);
/* Newest first. after_id = "" for the first page. Fills out[0..*n). */
GfStatus store_dataset_list(Store *s, const char *after_id, int limit, DatasetRow *out, int *n,
                            int *has_more, GfError *err);
/* GF_CONFLICT while a queued or running job uses it. Removes row, then files. */
GfStatus store_dataset_delete(Store *s, const char *id, GfError *err);
/* Paths of the dataset's JSONL and images archive (which may not exist),
 * server-generated, for download. */
GfStatus store_dataset_files(Store *s, const char *id, char jsonl[4096], char tar[4096], GfError *err);

/* ---- jobs -------------------------------------------------------------- */
/* Checks the datasets exist and are ready and the queue has room, then
 * inserts the job (status queued) and its first event, in one transaction.
 * Fills row->status and created_at. */
GfStatus store_job_create(Store *s, JobRow *row, int max_queued, GfError *err);
GfStatus store_job_get(Store *s, const char *id, JobRow *out, GfError *err);
GfStatus store_job_list(Store *s, const char *after_id, int limit, JobRow *out, int *n,
                        int *has_more, GfError *err);
/* queued -> cancelled; running -> cancel_requested; cancelled -> unchanged;
 * succeeded/failed -> GF_CONFLICT. Fills *out with the row afterwards. */
GfStatus store_job_cancel(Store *s, const char *id, JobRow *out, GfError *err);
/* queued -> paused; running -> pause_requested (the worker checkpoints and
 * pauses after the current step); paused -> unchanged; finished ->
 * GF_CONFLICT job_not_pausable. */
GfStatus store_job_pause(Store *s, const char *id, JobRow *out, GfError *err);
/* paused -> queued (continues from its newest checkpoint); a running job
 * with a pause requested -> the request withdrawn; else GF_CONFLICT
 * job_not_paused. */
GfStatus store_job_resume(Store *s, const char *id, JobRow *out, GfError *err);
GfStatus store_job_events(Store *s, const char *id, int64_t after_seq, int limit, JobEvent *out,
                          int *n, int *has_more, GfError *err);
GfStatus store_job_checkpoints(Store *s, const char *id, CheckpointRow *out, int max, int *n,
                               GfError *err);
/* The job's checkpoint at step; GF_NOT_FOUND (code checkpoint_not_found)
 * when the job keeps none there, job_not_found when there is no job. */
GfStatus store_job_checkpoint(Store *s, const char *id, int64_t step, CheckpointRow *out, GfError *err);

/* ---- adapters ---------------------------------------------------------- */
/* GF_CONFLICT when the name exists. Moves the two files into place. */
GfStatus store_adapter_create(Store *s, const AdapterRow *row, const char *config_tmp,
                              const char *weights_tmp, GfError *err);
GfStatus store_adapter_get(Store *s, const char *name, AdapterRow *out, GfError *err);
GfStatus store_adapter_list(Store *s, const char *after_name, int limit, AdapterRow *out, int *n,
                            int *has_more, GfError *err);
GfStatus store_adapter_delete(Store *s, const char *name, GfError *err);
/* Paths of the adapter's two files (server-generated), for download. */
GfStatus store_adapter_files(Store *s, const char *name, char config[4096], char weights[4096],
                             GfError *err);

/* ---- exports ----------------------------------------------------------- */
/* Inserts an export (status queued; fills created_at and status) of an
 * existing adapter (GF_NOT_FOUND adapter_not_found); GF_CONFLICT
 * export_running while another export of that adapter is queued or
 * running. */
GfStatus store_export_create(Store *s, ExportRow *row, GfError *err);
GfStatus store_export_get(Store *s, const char *id, ExportRow *out, GfError *err);
/* Newest first, as the other lists. */
GfStatus store_export_list(Store *s, const char *after_id, int limit, ExportRow *out, int *n, int *has_more,
                           GfError *err);
/* queued -> cancelled; running -> cancel_requested; cancelled -> unchanged;
 * succeeded/failed -> GF_CONFLICT. */
GfStatus store_export_cancel(Store *s, const char *id, ExportRow *out, GfError *err);
/* Removes a finished export's row, then its files; GF_CONFLICT while it is
 * queued or running (cancel it first). */
GfStatus store_export_delete(Store *s, const char *id, GfError *err);
/* The directory of a succeeded export's files (server-generated path). */
GfStatus store_export_dir(Store *s, const char *id, char dir[4096], GfError *err);

/* ---- misc -------------------------------------------------------------- */
GfStatus store_counts(Store *s, StoreCounts *out, GfError *err);
/* GF_OK when the database answers a trivial query. */
GfStatus store_ping(Store *s, GfError *err);
/* The name a job's adapter gets (reserved from the job's creation):
 * "<suffix>-<first 8 hex of the job id>", or "ft-<the id's hex>". */
void store_job_adapter_name(const JobRow *row, char *out, size_t cap);

/* New opaque id "<prefix>_<24 hex>". */
void store_new_id(const char *prefix, char out[STORE_ID_MAX]);

#endif
