/* store.c - SQLite (WAL, synchronous=FULL) implementation of api/store.h.
 *
 * The WAL keeps STORE_HEADROOM bytes allocated beyond its end (fallocate,
 * keeping its size), topped up after every commit: on a full disk, the
 * frames of a transaction land in blocks already the WAL's, so a job's end
 * and its events are still recorded and deletes still work (they are how
 * space is freed through the API).
 *
 * One connection, serialized by a mutex: every public function holds the
 * lock for its whole transaction, and every write is BEGIN IMMEDIATE, so no
 * transaction ever upgrades from read to write (no SQLITE_BUSY_SNAPSHOT).
 * Other processes (a second server, sqlite3 in a shell) are waited for up to
 * the busy timeout, then the call fails with 503 database_busy.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "migrate.h"
#include "store_open.h"
#include "store_worker.h"
#include "train_run.h"

/* The SQLite store; a Store * handed out is the address of its port. */
typedef struct {
    Store port;              /* first */
    sqlite3 *db;
    pthread_mutex_t lock;
    char dir[3072];          /* data directory */
    char tmp[3200];          /* DATA/tmp */
    char db_path[3200];      /* DATA/gemmaforge.db */
} SqlStore;

#define STORE_HEADROOM (4u << 20)


/* ---- helpers ----------------------------------------------------------- */

static GfStatus db_fail(SqlStore *s, int rc, GfError *err) {
    if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED)
        return gf_error_set(err, GF_NOT_READY, "database_busy", NULL, "the database is busy; retry shortly");
    if (rc == SQLITE_FULL)
        return gf_error_set(err, GF_NO_SPACE, "insufficient_storage", NULL, "the server's disk is full");
    if ((rc & 0xff) == SQLITE_READONLY) {
        GF_LOGE("sqlite: %s (%d): the database has become read-only", sqlite3_errmsg(s->db), rc);
        return gf_error_set(err, GF_IO, "database_read_only", NULL,
                            "the database has become read-only (its disk or file changed under the server); see the server log");
    }
    GF_LOGE("sqlite: %s (%d)", sqlite3_errmsg(s->db), rc);
    return gf_error_set(err, GF_IO, "database_error", NULL, "the database failed; see the server log");
}

static void lock(SqlStore *s) { pthread_mutex_lock(&s->lock); }
static void unlock(SqlStore *s) { pthread_mutex_unlock(&s->lock); }

static int begin(SqlStore *s) { return sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL); }
static int commit(SqlStore *s) { return sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL); }
static void rollback(SqlStore *s) { sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL); }

/* Binds the args described by fmt: 's' text, 'i' int64, 'n' int64 or NULL
 * when negative, 'd' double. */
static void bind_args(sqlite3_stmt *st, const char *fmt, va_list ap) {
    for (int i = 0; fmt[i]; i++) {
        if (fmt[i] == 's') {
            sqlite3_bind_text(st, i + 1, va_arg(ap, const char *), -1, SQLITE_TRANSIENT);
        } else if (fmt[i] == 'i' || fmt[i] == 'n') {
            int64_t v = va_arg(ap, int64_t);
            if (fmt[i] == 'n' && v < 0) sqlite3_bind_null(st, i + 1);
            else sqlite3_bind_int64(st, i + 1, v);
        } else {
            sqlite3_bind_double(st, i + 1, va_arg(ap, double));
        }
    }
}

/* Prepares sql and binds the args described by fmt (bind_args). */
static int prep(SqlStore *s, sqlite3_stmt **st, const char *sql, const char *fmt, ...) {
    int rc = sqlite3_prepare_v2(s->db, sql, -1, st, NULL);
    if (rc != SQLITE_OK) return rc;
    va_list ap;
    va_start(ap, fmt);
    bind_args(*st, fmt, ap);
    va_end(ap);
    return SQLITE_OK;
}

/* Runs a statement that returns no rows. */
static int exec_stmt(SqlStore *s, const char *sql, const char *fmt, ...) {
    sqlite3_stmt *st;
    int rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
    if (rc != SQLITE_OK) return rc;
    va_list ap;
    va_start(ap, fmt);
    bind_args(st, fmt, ap);
    va_end(ap);
    rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? SQLITE_OK : rc;
}

static void col_text(sqlite3_stmt *st, int i, char *out, size_t cap) {
    const unsigned char *t = sqlite3_column_text(st, i);
    snprintf(out, cap, "%s", t ? (const char *)t : "");
}

static double col_real(sqlite3_stmt *st, int i) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? NAN : sqlite3_column_double(st, i);
}

static int64_t col_int_or(sqlite3_stmt *st, int i, int64_t def) {
    return sqlite3_column_type(st, i) == SQLITE_NULL ? def : sqlite3_column_int64(st, i);
}


/* Runs body inside BEGIN IMMEDIATE .. COMMIT under the lock. */
typedef GfStatus (*TxnBody)(SqlStore *s, void *ctx, GfError *err);

/* Allocates STORE_HEADROOM bytes past the end of the WAL (its size kept;
 * best effort: a full disk leaves what it could). Only the WAL: SQLite
 * holds POSIX locks on the database file, and closing any descriptor of
 * it in this process would drop them; it holds none on the WAL, where
 * every write of a transaction lands first. */
static void keep_headroom(SqlStore *s) {
    char wal[3300];
    snprintf(wal, sizeof wal, "%s-wal", s->db_path);
    int fd = open(wal, O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return;
    struct stat st;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        (void)fallocate(fd, FALLOC_FL_KEEP_SIZE, st.st_size, STORE_HEADROOM);
    close(fd);
}

static GfStatus txn_locked(SqlStore *s, TxnBody body, void *ctx, GfError *err) {
    int rc = begin(s);
    GfStatus res = rc == SQLITE_OK ? body(s, ctx, err) : db_fail(s, rc, err);
    if (!res && (rc = commit(s)) != SQLITE_OK) res = db_fail(s, rc, err);
    if (res) rollback(s);
    else keep_headroom(s);
    return res;
}

static GfStatus txn(SqlStore *s, TxnBody body, void *ctx, GfError *err) {
    lock(s);
    GfStatus res = txn_locked(s, body, ctx, err);
    unlock(s);
    return res;
}

/* ---- opening ----------------------------------------------------------- */

static GfStatus configure(SqlStore *s, GfError *err) {
    static const char *const pragmas[] = {
        "PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON",
        "PRAGMA trusted_schema=OFF", NULL};
    sqlite3_busy_timeout(s->db, 5000);
    sqlite3_db_config(s->db, SQLITE_DBCONFIG_DEFENSIVE, 1, NULL);
    sqlite3_limit(s->db, SQLITE_LIMIT_LENGTH, 16 * 1000 * 1000);
    for (int i = 0; pragmas[i]; i++)
        if (sqlite3_exec(s->db, pragmas[i], NULL, NULL, NULL) != SQLITE_OK)
            return gf_error_set(err, GF_IO, NULL, NULL, "database setup failed: %s", sqlite3_errmsg(s->db));
    sqlite3_stmt *st;
    char result[64] = "";
    if (sqlite3_prepare_v2(s->db, "PRAGMA quick_check", -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        col_text(st, 0, result, sizeof result);
    sqlite3_finalize(st);
    if (strcmp(result, "ok") != 0)
        return gf_error_set(err, GF_FORMAT, NULL, NULL, "the database failed its integrity check (%s)", result);
    return GF_OK;
}

static int row_exists(SqlStore *s, const char *sql, const char *key) {
    sqlite3_stmt *st;
    int found = 0;
    if (prep(s, &st, sql, "s", key) == SQLITE_OK) found = sqlite3_step(st) == SQLITE_ROW;
    sqlite3_finalize(st);
    return found;
}

/* Removes entries of DATA/<sub> that are temporary or have no row. */
static void gc_dir(SqlStore *s, const char *sub, const char *exists_sql) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", s->dir, sub);
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (exists_sql && e->d_name[0] != '.' && row_exists(s, exists_sql, e->d_name)) continue;
        char victim[4400];
        snprintf(victim, sizeof victim, "%s/%s", path, e->d_name);
        GF_LOGW("removing leftover %s/%s", sub, e->d_name);
        fs_remove_tree(victim);
    }
    closedir(d);
}

/* A read-only mount (or a directory the server may not write) is refused
 * at start, not found out one failed request at a time. */
static GfStatus must_be_writable(const char *path, GfError *err) {
    if (access(path, W_OK) == 0) return GF_OK;
    return gf_error_set(err, GF_IO, "read_only", NULL,
                        "the data directory cannot be written: %s: %s (gemmaforge keeps its database, uploads, jobs and "
                        "adapters there; give it a writable directory)", path, strerror(errno));
}

static GfStatus make_layout(SqlStore *s, GfError *err) {
    static const char *const subs[] = {"tmp", "datasets", "adapters", "jobs", "exports", NULL};
    char path[4096];
    for (int i = 0; subs[i]; i++) {
        snprintf(path, sizeof path, "%s/%s", s->dir, subs[i]);
        if (fs_mkdirs(path, err)) {
            GfError e = *err; /* the message names no path: it may reach a client */
            return gf_error_set(err, e.status, e.code, NULL, "cannot create %s: %s", path, e.message);
        }
        if (must_be_writable(path, err)) return err->status;
    }
    return must_be_writable(s->dir, err);
}

static const StoreOps SQL_STORE_OPS;

GfStatus store_open(const char *data_dir, Store **out, GfError *err) {
    SqlStore *s = gf_calloc(1, sizeof *s, err);
    if (!s) return GF_NO_MEMORY;
    s->port.ops = &SQL_STORE_OPS;
    snprintf(s->dir, sizeof s->dir, "%s", data_dir);
    snprintf(s->tmp, sizeof s->tmp, "%s/tmp", data_dir);
    pthread_mutex_init(&s->lock, NULL);
    snprintf(s->db_path, sizeof s->db_path, "%s/gemmaforge.db", data_dir);
    GfStatus st = make_layout(s, err);
    if (!st && sqlite3_open_v2(s->db_path, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL) != SQLITE_OK)
        st = gf_error_set(err, GF_IO, NULL, NULL, "cannot open the database: %s", s->db ? sqlite3_errmsg(s->db) : "out of memory");
    if (!st && sqlite3_db_readonly(s->db, "main") == 1)
        st = gf_error_set(err, GF_IO, "read_only", NULL,
                          "the database %s can only be opened read-only (its file or directory is not writable)", s->db_path);
    if (!st) st = configure(s, err);
    int applied = 0;
    if (!st) st = migrate_apply(s->db, GF_MIGRATIONS, GF_N_MIGRATIONS, &applied, err);
    if (st) {
        store_close(&s->port);
        return st;
    }
    /* requests that were running when the process died never finished */
    exec_stmt(s, "DELETE FROM idempotency WHERE state='in_progress'", "");
    gc_dir(s, "tmp", NULL);
    gc_dir(s, "datasets", "SELECT 1 FROM datasets WHERE id=?");
    gc_dir(s, "adapters", "SELECT 1 FROM adapters WHERE name=?");
    gc_dir(s, "exports", "SELECT 1 FROM exports WHERE id=? AND status IN ('succeeded','running')");
    keep_headroom(s);
    *out = &s->port;
    return GF_OK;
}

void store_close(Store *store) {
    SqlStore *s = (SqlStore *)store;
    if (!s) return;
    if (s->db) sqlite3_close(s->db);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

const char *store_tmp_dir(const Store *store) { return ((const SqlStore *)store)->tmp; }

static GfStatus sql_ping(Store *store, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int rc = sqlite3_exec(s->db, "SELECT 1", NULL, NULL, NULL);
    unlock(s);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

/* ---- datasets ---------------------------------------------------------- */

#define DATASET_COLS "id,name,status,created_at,n_examples,n_images,bytes,has_images,tokens_model,tokens,max_tokens,max_tokens_line"

static void read_dataset(sqlite3_stmt *st, DatasetRow *d) {
    col_text(st, 0, d->id, sizeof d->id);
    col_text(st, 1, d->name, sizeof d->name);
    col_text(st, 2, d->status, sizeof d->status);
    d->created_at = sqlite3_column_int64(st, 3);
    d->n_examples = (uint64_t)sqlite3_column_int64(st, 4);
    d->n_images = (uint64_t)sqlite3_column_int64(st, 5);
    d->bytes = (uint64_t)sqlite3_column_int64(st, 6);
    d->has_images = sqlite3_column_int(st, 7);
    int measured = sqlite3_column_type(st, 10) != SQLITE_NULL;
    col_text(st, 8, d->tokens_model, sizeof d->tokens_model);
    d->tokens = measured ? sqlite3_column_int64(st, 9) : -1;
    d->max_tokens = measured ? sqlite3_column_int64(st, 10) : -1;
    d->max_tokens_line = measured ? (uint64_t)sqlite3_column_int64(st, 11) : 0;
}

static GfStatus sql_dataset_create(Store *store, const DatasetRow *d, const char *jsonl_tmp, const char *tar_tmp,
                              GfError *err) {
    SqlStore *s = (SqlStore *)store;
    char tmp_dir[4096], final_dir[4096];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/datasets/.tmp-%s", s->dir, d->id);
    snprintf(final_dir, sizeof final_dir, "%s/datasets/%s", s->dir, d->id);
    const char *src[2] = {jsonl_tmp, tar_tmp};
    const char *names[2] = {"data.jsonl", "images.tar"};
    GfStatus st = fs_publish(tmp_dir, final_dir, src, names, tar_tmp ? 2 : 1, err);
    if (st) return st;
    lock(s);
    int rc = begin(s);
    if (rc == SQLITE_OK)
        rc = exec_stmt(s, "INSERT INTO datasets(" DATASET_COLS ") VALUES(?,?,?,?,?,?,?,?,?,?,?,?)", "sssiiiiisnnn", d->id,
                       d->name, d->status, d->created_at, (int64_t)d->n_examples, (int64_t)d->n_images,
                       (int64_t)d->bytes, (int64_t)d->has_images, d->max_tokens < 0 ? NULL : d->tokens_model,
                       d->tokens, d->max_tokens,
                       d->max_tokens < 0 ? (int64_t)-1 : (int64_t)d->max_tokens_line);
    if (rc == SQLITE_OK) rc = commit(s);
    if (rc != SQLITE_OK) {
        rollback(s);
        st = db_fail(s, rc, err);
    }
    unlock(s);
    if (st) fs_remove_tree(final_dir);
    return st;
}

static GfStatus sql_dataset_get(Store *store, const char *id, DatasetRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    sqlite3_stmt *st;
    lock(s);
    int rc = prep(s, &st, "SELECT " DATASET_COLS " FROM datasets WHERE id=?", "s", id);
    GfStatus res = GF_OK;
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) read_dataset(st, out);
    else if (rc == SQLITE_DONE) res = gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", "id", "no dataset '%s'", id);
    else res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

/* Shared list walker: newest first (seq DESC), keyset-paged by the `after`
 * key, which must exist. */
typedef void (*RowReader)(sqlite3_stmt *st, void *out, int i);

static GfStatus list_rows(SqlStore *s, const char *sql, const char *seq_sql, const char *after, int limit,
                          RowReader reader, void *out, int *n, int *has_more, GfError *err) {
    sqlite3_stmt *st = NULL;
    int64_t bound = INT64_MAX;
    GfStatus res = GF_OK;
    *n = 0;
    *has_more = 0;
    lock(s);
    if (after[0]) {
        int rc = prep(s, &st, seq_sql, "s", after);
        rc = rc == SQLITE_OK ? sqlite3_step(st) : rc;
        if (rc == SQLITE_ROW) bound = sqlite3_column_int64(st, 0);
        else res = rc == SQLITE_DONE ? gf_error_set(err, GF_INVALID, "invalid_value", "after", "'after' names no object in this list")
                                     : db_fail(s, rc, err);
        sqlite3_finalize(st);
        st = NULL;
    }
    int rc = res ? SQLITE_OK : prep(s, &st, sql, "ii", bound, (int64_t)limit + 1);
    while (!res && rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == limit) { *has_more = 1; break; }
        reader(st, out, (*n)++);
        rc = SQLITE_OK;
    }
    if (!res && rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

static void read_dataset_at(sqlite3_stmt *st, void *out, int i) { read_dataset(st, (DatasetRow *)out + i); }

static GfStatus sql_dataset_list(Store *store, const char *after, int limit, DatasetRow *out, int *n, int *has_more,
                            GfError *err) {
    SqlStore *s = (SqlStore *)store;
    return list_rows(s, "SELECT " DATASET_COLS " FROM datasets WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                     "SELECT seq FROM datasets WHERE id=?", after, limit, read_dataset_at, out, n, has_more, err);
}

static GfStatus sql_dataset_delete(Store *store, const char *id, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    GfStatus res = GF_OK;
    lock(s);
    int rc = begin(s);
    if (rc == SQLITE_OK && !row_exists(s, "SELECT 1 FROM datasets WHERE id=?", id))
        res = gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", "id", "no dataset '%s'", id);
    else if (rc == SQLITE_OK && row_exists(s, "SELECT 1 FROM jobs WHERE status IN ('queued','running') AND "
                                              "(dataset_id=?1 OR validation_dataset_id=?1)", id))
        res = gf_error_set(err, GF_CONFLICT, "dataset_in_use", "id",
                           "dataset '%s' is used by a queued or running job; cancel the job first", id);
    else if (rc == SQLITE_OK) rc = exec_stmt(s, "DELETE FROM datasets WHERE id=?", "s", id);
    if (!res && rc == SQLITE_OK) rc = commit(s);
    if (res || rc != SQLITE_OK) rollback(s);
    if (!res && rc != SQLITE_OK) res = db_fail(s, rc, err);
    unlock(s);
    if (!res) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/datasets/%s", s->dir, id);
        if (fs_remove_tree(dir) != 0) GF_LOGW("could not remove the files of dataset %s; removed at next start", id);
    }
    return res;
}

/* ---- jobs -------------------------------------------------------------- */

#define ADAPTER_COLS "name,source,job_id,base_model,rank,alpha,use_rslora,n_modules,has_vision,bytes,sha256,created_at"
#define JOB_COLS "id,dataset_id,validation_dataset_id,model,suffix,hyperparameters,status,cancel_requested," \
                 "created_at,started_at,finished_at,error_code,error_message,step,total_steps,epoch,loss," \
                 "eval_loss,tokens_per_s,eta_s,adapter_name,paused,pause_requested,trained_tokens,status_reason,metadata,error_param"

static void read_job(sqlite3_stmt *st, JobRow *j) {
    col_text(st, 0, j->id, sizeof j->id);
    col_text(st, 1, j->dataset_id, sizeof j->dataset_id);
    col_text(st, 2, j->validation_dataset_id, sizeof j->validation_dataset_id);
    col_text(st, 3, j->model, sizeof j->model);
    col_text(st, 4, j->suffix, sizeof j->suffix);
    col_text(st, 5, j->hyperparameters, sizeof j->hyperparameters);
    col_text(st, 6, j->status, sizeof j->status);
    j->cancel_requested = sqlite3_column_int(st, 7);
    j->created_at = sqlite3_column_int64(st, 8);
    j->started_at = col_int_or(st, 9, 0);
    j->finished_at = col_int_or(st, 10, 0);
    col_text(st, 11, j->error_code, sizeof j->error_code);
    col_text(st, 12, j->error_message, sizeof j->error_message);
    j->step = col_int_or(st, 13, -1);
    j->total_steps = col_int_or(st, 14, -1);
    j->epoch = col_real(st, 15);
    j->loss = col_real(st, 16);
    j->eval_loss = col_real(st, 17);
    j->tokens_per_s = col_real(st, 18);
    j->eta_s = col_real(st, 19);
    col_text(st, 20, j->adapter, sizeof j->adapter);
    j->paused = sqlite3_column_int(st, 21);
    j->pause_requested = sqlite3_column_int(st, 22);
    j->trained_tokens = col_int_or(st, 23, -1);
    col_text(st, 24, j->status_reason, sizeof j->status_reason);
    col_text(st, 25, j->metadata, sizeof j->metadata);
    col_text(st, 26, j->error_param, sizeof j->error_param);
}

static void read_job_at(sqlite3_stmt *st, void *out, int i) { read_job(st, (JobRow *)out + i); }

/* Inside a transaction: the dataset must exist and be ready. */
static GfStatus dataset_ready(SqlStore *s, const char *id, const char *param, GfError *err) {
    sqlite3_stmt *st;
    char status[16] = "";
    int rc = prep(s, &st, "SELECT status FROM datasets WHERE id=?", "s", id);
    rc = rc == SQLITE_OK ? sqlite3_step(st) : rc;
    if (rc == SQLITE_ROW) col_text(st, 0, status, sizeof status);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_fail(s, rc, err);
    if (rc == SQLITE_DONE) return gf_error_set(err, GF_NOT_FOUND, "dataset_not_found", param, "no dataset '%s'", id);
    if (strcmp(status, "ready") != 0)
        return gf_error_set(err, GF_CONFLICT, "dataset_not_ready", param, "dataset '%s' is %s, not ready", id, status);
    return GF_OK;
}

static int64_t count_queued(SqlStore *s) {
    sqlite3_stmt *st;
    int64_t n = 0;
    if (sqlite3_prepare_v2(s->db, "SELECT COUNT(*) FROM jobs WHERE status='queued'", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

static int add_event(SqlStore *s, const char *job, const char *level, const char *type, const char *msg) {
    return exec_stmt(s, "INSERT INTO job_events(job_id,created_at,level,type,message) VALUES(?,?,?,?,?)", "sisss",
                     job, gf_time_unix(), level, type, msg);
}

static GfStatus job_insert(SqlStore *s, JobRow *j, int max_queued, GfError *err) {
    GfStatus res = dataset_ready(s, j->dataset_id, "dataset", err);
    if (!res && j->validation_dataset_id[0]) res = dataset_ready(s, j->validation_dataset_id, "validation_dataset", err);
    if (!res && count_queued(s) >= max_queued)
        res = gf_error_set(err, GF_BUSY, "queue_full", NULL, "the job queue is full (%d queued); retry later", max_queued);
    if (res) return res;
    j->created_at = gf_time_unix();
    snprintf(j->status, sizeof j->status, "queued");
    j->step = j->total_steps = -1;
    j->epoch = j->loss = j->eval_loss = j->tokens_per_s = j->eta_s = NAN;
    int rc = exec_stmt(s, "INSERT INTO jobs(id,dataset_id,validation_dataset_id,model,suffix,hyperparameters,status,created_at,"
                          "metadata) VALUES(?,?,NULLIF(?,''),?,?,?,'queued',?,NULLIF(?,''))", "ssssssis", j->id, j->dataset_id,
                       j->validation_dataset_id, j->model, j->suffix, j->hyperparameters, j->created_at, j->metadata);
    if (rc == SQLITE_OK) rc = add_event(s, j->id, "info", "status", "Job created and queued");
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

static GfStatus sql_job_create(Store *store, JobRow *j, int max_queued, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int rc = begin(s);
    GfStatus res = rc == SQLITE_OK ? job_insert(s, j, max_queued, err) : db_fail(s, rc, err);
    if (!res && (rc = commit(s)) != SQLITE_OK) res = db_fail(s, rc, err);
    if (res) rollback(s);
    unlock(s);
    return res;
}

static GfStatus job_get_locked(SqlStore *s, const char *id, JobRow *out, GfError *err) {
    sqlite3_stmt *st;
    int rc = prep(s, &st, "SELECT " JOB_COLS " FROM jobs WHERE id=?", "s", id);
    GfStatus res = GF_OK;
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) read_job(st, out);
    else if (rc == SQLITE_DONE) res = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    else res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    return res;
}

static GfStatus sql_job_get(Store *store, const char *id, JobRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    GfStatus res = job_get_locked(s, id, out, err);
    unlock(s);
    return res;
}

static GfStatus sql_job_list(Store *store, const char *after, int limit, JobRow *out, int *n, int *has_more, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    return list_rows(s, "SELECT " JOB_COLS " FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                     "SELECT seq FROM jobs WHERE id=?", after, limit, read_job_at, out, n, has_more, err);
}

static GfStatus cancel_locked(SqlStore *s, const char *id, JobRow *out, GfError *err) {
    GfStatus res = job_get_locked(s, id, out, err);
    if (res) return res;
    int rc = SQLITE_OK;
    if (strcmp(out->status, "queued") == 0) {
        rc = exec_stmt(s, "UPDATE jobs SET status='cancelled', finished_at=? WHERE id=? AND status='queued'", "is",
                       gf_time_unix(), id);
        if (rc == SQLITE_OK) rc = add_event(s, id, "info", "status", "Job cancelled before it started");
    } else if (strcmp(out->status, "running") == 0 && !out->cancel_requested) {
        rc = exec_stmt(s, "UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='running'", "s", id);
        if (rc == SQLITE_OK) rc = add_event(s, id, "info", "status", "Cancellation requested; stopping after the current step");
    } else if (strcmp(out->status, "succeeded") == 0 || strcmp(out->status, "failed") == 0) {
        return gf_error_set(err, GF_CONFLICT, "job_not_cancellable", "id", "job '%s' has already %s", id, out->status);
    }
    if (rc != SQLITE_OK) return db_fail(s, rc, err);
    return job_get_locked(s, id, out, err);
}

static GfStatus sql_job_cancel(Store *store, const char *id, JobRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int rc = begin(s);
    GfStatus res = rc == SQLITE_OK ? cancel_locked(s, id, out, err) : db_fail(s, rc, err);
    if (!res && (rc = commit(s)) != SQLITE_OK) res = db_fail(s, rc, err);
    if (res) rollback(s);
    unlock(s);
    return res;
}

typedef struct {
    const char *id;
    JobRow *row;
} JobCtx;

static GfStatus pause_body(SqlStore *s, void *ctx, GfError *err) {
    JobCtx *c = ctx;
    GfStatus res = job_get_locked(s, c->id, c->row, err);
    if (res) return res;
    int rc = SQLITE_OK;
    const char *st = c->row->status;
    if (strcmp(st, "queued") == 0 && !c->row->paused) {
        rc = exec_stmt(s, "UPDATE jobs SET paused=1 WHERE id=?", "s", c->id);
        if (rc == SQLITE_OK) rc = add_event(s, c->id, "info", "status", "Job paused before it started");
    } else if (strcmp(st, "running") == 0 && !c->row->pause_requested) {
        rc = exec_stmt(s, "UPDATE jobs SET pause_requested=1 WHERE id=?", "s", c->id);
        if (rc == SQLITE_OK) rc = add_event(s, c->id, "info", "status", "Pause requested; checkpointing after the current step");
    } else if (strcmp(st, "queued") != 0 && strcmp(st, "running") != 0) {
        return gf_error_set(err, GF_CONFLICT, "job_not_pausable", "id", "job '%s' has already %s", c->id, st);
    }
    return rc == SQLITE_OK ? job_get_locked(s, c->id, c->row, err) : db_fail(s, rc, err);
}

static GfStatus resume_body(SqlStore *s, void *ctx, GfError *err) {
    JobCtx *c = ctx;
    GfStatus res = job_get_locked(s, c->id, c->row, err);
    if (res) return res;
    int rc;
    if (strcmp(c->row->status, "queued") == 0 && c->row->paused) {
        rc = exec_stmt(s, "UPDATE jobs SET paused=0, status_reason=NULL WHERE id=?", "s", c->id);
        if (rc == SQLITE_OK) rc = add_event(s, c->id, "info", "status", "Job resumed; queued to continue from its newest checkpoint");
    } else if (strcmp(c->row->status, "running") == 0 && c->row->pause_requested) {
        rc = exec_stmt(s, "UPDATE jobs SET pause_requested=0 WHERE id=?", "s", c->id);
        if (rc == SQLITE_OK) rc = add_event(s, c->id, "info", "status", "Pause request withdrawn");
    } else {
        return gf_error_set(err, GF_CONFLICT, "job_not_paused", "id", "job '%s' is %s, not paused", c->id, c->row->status);
    }
    return rc == SQLITE_OK ? job_get_locked(s, c->id, c->row, err) : db_fail(s, rc, err);
}

static GfStatus sql_job_pause(Store *store, const char *id, JobRow *out, GfError *err) {
    JobCtx c = {id, out};
    return txn((SqlStore *)store, pause_body, &c, err);
}

static GfStatus sql_job_resume(Store *store, const char *id, JobRow *out, GfError *err) {
    JobCtx c = {id, out};
    return txn((SqlStore *)store, resume_body, &c, err);
}

static GfStatus sql_job_events(Store *store, const char *id, int64_t after, int limit, JobEvent *out, int *n, int *has_more,
                          GfError *err) {
    SqlStore *s = (SqlStore *)store;
    *n = *has_more = 0;
    lock(s);
    GfStatus res = GF_OK;
    if (!row_exists(s, "SELECT 1 FROM jobs WHERE id=?", id))
        res = gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
    sqlite3_stmt *st = NULL;
    int rc = res ? SQLITE_OK : prep(s, &st, "SELECT seq,created_at,level,type,message,data FROM job_events "
                                            "WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?", "sii", id, after,
                                    (int64_t)limit + 1);
    while (!res && rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (*n == limit) { *has_more = 1; break; }
        JobEvent *e = &out[(*n)++];
        e->seq = sqlite3_column_int64(st, 0);
        e->created_at = sqlite3_column_int64(st, 1);
        col_text(st, 2, e->level, sizeof e->level);
        col_text(st, 3, e->type, sizeof e->type);
        col_text(st, 4, e->message, sizeof e->message);
        col_text(st, 5, e->data, sizeof e->data);
        rc = SQLITE_OK;
    }
    if (!res && rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

#define CHECKPOINT_COLS "id,step,created_at,metrics"

static void read_checkpoint(SqlStore *s, sqlite3_stmt *st, const char *job_id, CheckpointRow *c) {
    col_text(st, 0, c->id, sizeof c->id);
    c->step = sqlite3_column_int64(st, 1);
    c->created_at = sqlite3_column_int64(st, 2);
    col_text(st, 3, c->metrics, sizeof c->metrics);
    char root[4096 + 16];
    snprintf(root, sizeof root, "%s/jobs/%s/checkpoints", s->dir, job_id);
    train_run_ckpt_dir(root, c->step, c->dir, sizeof c->dir);
}

/* Under the lock: job_not_found unless job id exists. */
static GfStatus job_must_exist(SqlStore *s, const char *id, GfError *err) {
    if (row_exists(s, "SELECT 1 FROM jobs WHERE id=?", id)) return GF_OK;
    return gf_error_set(err, GF_NOT_FOUND, "job_not_found", "id", "no fine-tuning job '%s'", id);
}

static GfStatus sql_job_checkpoints(Store *store, const char *id, CheckpointRow *out, int max, int *n, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    *n = 0;
    lock(s);
    GfStatus res = job_must_exist(s, id, err);
    sqlite3_stmt *st = NULL;
    int rc = res ? SQLITE_OK : prep(s, &st, "SELECT " CHECKPOINT_COLS " FROM checkpoints WHERE job_id=? "
                                            "ORDER BY step DESC LIMIT ?", "si", id, (int64_t)max);
    while (!res && rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        read_checkpoint(s, st, id, &out[(*n)++]);
        rc = SQLITE_OK;
    }
    if (!res && rc != SQLITE_OK && rc != SQLITE_DONE) res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

static GfStatus sql_job_checkpoint(Store *store, const char *id, int64_t step, CheckpointRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    GfStatus res = job_must_exist(s, id, err);
    sqlite3_stmt *st = NULL;
    int rc = res ? SQLITE_OK : prep(s, &st, "SELECT " CHECKPOINT_COLS " FROM checkpoints WHERE job_id=? AND step=?",
                                    "si", id, step);
    if (!res && rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) read_checkpoint(s, st, id, out);
    else if (!res && (rc == SQLITE_OK || rc == SQLITE_DONE))
        res = gf_error_set(err, GF_NOT_FOUND, "checkpoint_not_found", "step", "job '%s' keeps no checkpoint at step %lld", id,
                           (long long)step);
    else if (!res) res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

static int insert_adapter(SqlStore *s, const AdapterRow *a) {
    return exec_stmt(s, "INSERT INTO adapters(" ADAPTER_COLS ") VALUES(?,?,NULLIF(?,''),?,?,?,?,?,?,?,?,?)", "ssssidiiiisi",
                     a->name, a->source, a->job_id, a->base_model, (int64_t)a->rank, a->alpha, (int64_t)a->use_rslora,
                     (int64_t)a->n_modules, (int64_t)a->has_vision, (int64_t)a->bytes, a->sha256, a->created_at);
}

/* ---- the job worker ---------------------------------------------------- */



typedef struct {
    JobRow *row;
    int *resumed;
} ClaimCtx;

static GfStatus claim_body(SqlStore *s, void *ctx, GfError *err) {
    ClaimCtx *c = ctx;
    sqlite3_stmt *st;
    char id[STORE_ID_MAX] = "";
    int rc = prep(s, &st, "SELECT id, status FROM jobs WHERE status='running' OR (status='queued' AND paused=0) "
                          "ORDER BY status='running' DESC, seq LIMIT 1", "");
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        col_text(st, 0, id, sizeof id);
        *c->resumed = strcmp((const char *)sqlite3_column_text(st, 1), "running") == 0;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_fail(s, rc, err);
    if (!id[0]) return gf_error_set(err, GF_NOT_FOUND, "no_job", NULL, "no job to run");
    rc = exec_stmt(s, *c->resumed ? "UPDATE jobs SET attempt=attempt+1, status_reason=NULL WHERE id=?2"
                                  : "UPDATE jobs SET status='running', started_at=?1, attempt=attempt+1, status_reason=NULL WHERE id=?2",
                   "is", gf_time_unix(), id);
    if (rc == SQLITE_OK)
        rc = add_event(s, id, "info", "status", *c->resumed ? "Job resumed after an interruption" : "Job started");
    return rc == SQLITE_OK ? job_get_locked(s, id, c->row, err) : db_fail(s, rc, err);
}

GfStatus store_job_claim(Store *store, JobRow *out, int *resumed, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    ClaimCtx c = {out, resumed};
    *resumed = 0;
    return txn(s, claim_body, &c, err);
}

typedef struct {
    const char *id;
    const JobRow *p;
    const char *level, *type, *message, *data;
} EventCtx;

static GfStatus event_body(SqlStore *s, void *ctx, GfError *err) {
    EventCtx *c = ctx;
    int rc = SQLITE_OK;
    if (c->p) {
        const JobRow *p = c->p;
        rc = exec_stmt(s, "UPDATE jobs SET step=COALESCE(?,step), total_steps=COALESCE(?,total_steps), "
                          "epoch=COALESCE(?,epoch), loss=COALESCE(?,loss), eval_loss=COALESCE(?,eval_loss), "
                          "tokens_per_s=COALESCE(?,tokens_per_s), eta_s=COALESCE(?,eta_s) WHERE id=?",
                       "ddddddds", p->step < 0 ? NAN : (double)p->step,
                       p->total_steps < 0 ? NAN : (double)p->total_steps, p->epoch, p->loss, p->eval_loss, p->tokens_per_s, p->eta_s,
                       c->id);
    }
    if (rc == SQLITE_OK)
        rc = exec_stmt(s, "INSERT INTO job_events(job_id,created_at,level,type,message,data) VALUES(?,?,?,?,?,NULLIF(?,''))",
                       "sissss", c->id, gf_time_unix(), c->level, c->type, c->message, c->data ? c->data : "");
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_job_progress(Store *store, const char *id, const JobRow *p, const char *message, const char *data,
                            GfError *err) {
    SqlStore *s = (SqlStore *)store;
    EventCtx c = {id, p, "info", "metrics", message, data};
    return txn(s, event_body, &c, err);
}

GfStatus store_job_event(Store *store, const char *id, const char *level, const char *type, const char *message,
                         GfError *err) {
    SqlStore *s = (SqlStore *)store;
    EventCtx c = {id, NULL, level, type, message, NULL};
    return txn(s, event_body, &c, err);
}

int store_job_pause_requested(Store *store, const char *id) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int yes = row_exists(s, "SELECT 1 FROM jobs WHERE id=? AND pause_requested=1", id);
    unlock(s);
    return yes;
}

typedef struct {
    const char *id, *message;
} PausedCtx;

static GfStatus paused_body(SqlStore *s, void *ctx, GfError *err) {
    const PausedCtx *c = ctx;
    int rc = exec_stmt(s, "UPDATE jobs SET status='queued', paused=1, pause_requested=0, status_reason=? WHERE id=? AND status='running'",
                       "ss", c->message, c->id);
    if (rc == SQLITE_OK) rc = add_event(s, c->id, "info", "status", c->message);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_job_paused(Store *store, const char *id, const char *message, GfError *err) {
    PausedCtx c = {id, message};
    return txn((SqlStore *)store, paused_body, &c, err);
}

typedef struct {
    const char *id, *reason, *event;
} ReasonCtx;

static GfStatus reason_body(SqlStore *s, void *ctx, GfError *err) {
    const ReasonCtx *c = ctx;
    int rc = exec_stmt(s, "UPDATE jobs SET status_reason=NULLIF(?,'') WHERE id=? AND status='running'", "ss",
                       c->reason ? c->reason : "", c->id);
    if (rc == SQLITE_OK) rc = add_event(s, c->id, c->reason ? "warn" : "info", "status", c->event);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_job_reason(Store *store, const char *id, const char *reason, const char *event, GfError *err) {
    ReasonCtx c = {id, reason, event};
    return txn((SqlStore *)store, reason_body, &c, err);
}

int store_job_cancel_requested(Store *store, const char *id) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int yes = !row_exists(s, "SELECT 1 FROM jobs WHERE id=? AND cancel_requested=0", id);
    unlock(s);
    return yes;
}

typedef struct {
    const char *job, *sha, *metrics;
    int64_t step, keep;
} CkptCtx;

static GfStatus ckpt_body(SqlStore *s, void *ctx, GfError *err) {
    CkptCtx *c = ctx;
    char id[STORE_ID_MAX];
    store_new_id("ckpt", id);
    int rc = exec_stmt(s, "DELETE FROM checkpoints WHERE job_id=? AND step>=?", "si", c->job, c->step);
    if (rc == SQLITE_OK)
        rc = exec_stmt(s, "INSERT INTO checkpoints(id,job_id,step,sha256,metrics,created_at) VALUES(?,?,?,?,?,?)", "ssissi",
                       id, c->job, c->step, c->sha, c->metrics, gf_time_unix());
    if (rc == SQLITE_OK)
        rc = exec_stmt(s, "DELETE FROM checkpoints WHERE job_id=?1 AND step NOT IN "
                          "(SELECT step FROM checkpoints WHERE job_id=?1 ORDER BY step DESC LIMIT ?2)", "si", c->job, c->keep);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_checkpoint_add(Store *store, const char *job_id, int64_t step, const char *sha256, const char *metrics,
                              int keep, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    CkptCtx c = {job_id, sha256, metrics, step, keep};
    return txn(s, ckpt_body, &c, err);
}

GfStatus store_checkpoint_list(Store *store, const char *job_id, int64_t *steps, char (*digests)[65], int max, int *n,
                               GfError *err) {
    SqlStore *s = (SqlStore *)store;
    sqlite3_stmt *st;
    *n = 0;
    lock(s);
    int rc = prep(s, &st, "SELECT step, sha256 FROM checkpoints WHERE job_id=? ORDER BY step DESC LIMIT ?", "si", job_id,
                  (int64_t)max);
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        steps[*n] = sqlite3_column_int64(st, 0);
        col_text(st, 1, digests[*n], 65);
        (*n)++;
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    GfStatus res = rc == SQLITE_DONE || rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
    unlock(s);
    return res;
}

typedef struct {
    const char *id, *status, *code, *param, *message;
    const AdapterRow *adapter;
    int64_t trained_tokens;     /* -1 = unknown */
} FinishCtx;

static GfStatus finish_body(SqlStore *s, void *ctx, GfError *err) {
    FinishCtx *c = ctx;
    int rc = exec_stmt(s, "UPDATE jobs SET status=?, finished_at=?, error_code=NULLIF(?,''), error_param=NULLIF(?,''), "
                          "error_message=NULLIF(?,''), adapter_name=NULLIF(?,''), eta_s=0, trained_tokens=NULLIF(?,-1), status_reason=NULL WHERE id=? AND status='running'",
                       "sissssis", c->status, gf_time_unix(), c->code ? c->code : "", c->param ? c->param : "",
                       c->message ? c->message : "",
                       c->adapter ? c->adapter->name : "", c->adapter ? c->trained_tokens : (int64_t)-1, c->id);
    if (rc == SQLITE_OK && sqlite3_changes(s->db) != 1)
        return gf_error_set(err, GF_CONFLICT, "job_not_running", "id", "job '%s' is not running", c->id);
    char msg[700];
    if (c->adapter) snprintf(msg, sizeof msg, "Job succeeded; adapter '%s' registered", c->adapter->name);
    else if (strcmp(c->status, "cancelled") == 0) snprintf(msg, sizeof msg, "Job cancelled");
    else snprintf(msg, sizeof msg, "Job failed: %s", c->message ? c->message : "");
    if (rc == SQLITE_OK) rc = add_event(s, c->id, strcmp(c->status, "failed") == 0 ? "error" : "info", "status", msg);
    if (rc == SQLITE_OK && c->adapter) rc = insert_adapter(s, c->adapter);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_job_finish(Store *store, const char *id, const char *status, const char *code, const char *param,
                          const char *message, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    FinishCtx c = {id, status, code, param, message, NULL, -1};
    return txn(s, finish_body, &c, err);
}

GfStatus store_job_succeed(Store *store, const char *id, const AdapterRow *a, int64_t trained_tokens, const char *config_tmp,
                           const char *weights_tmp, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    char tmp_dir[4096], final_dir[4096];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/adapters/.tmp-%s", s->dir, a->name);
    snprintf(final_dir, sizeof final_dir, "%s/adapters/%s", s->dir, a->name);
    const char *src[2] = {config_tmp, weights_tmp};
    const char *names[2] = {"adapter_config.json", "adapter_model.safetensors"};
    struct stat sb;
    FinishCtx c = {id, "succeeded", NULL, NULL, NULL, a, trained_tokens};
    GfStatus res = GF_OK;
    lock(s); /* held across publish, as for uploads, so one name cannot be taken twice */
    if (row_exists(s, "SELECT 1 FROM adapters WHERE name=?", a->name) || lstat(final_dir, &sb) == 0)
        res = gf_error_set(err, GF_CONFLICT, "adapter_exists", "name", "an adapter named '%s' already exists", a->name);
    if (!res) res = fs_publish(tmp_dir, final_dir, src, names, 2, err);
    if (!res && (res = txn_locked(s, finish_body, &c, err))) fs_remove_tree(final_dir);
    unlock(s);
    return res;
}

void store_dataset_paths(Store *store, const char *id, char jsonl[4096], char tar[4096]) {
    SqlStore *s = (SqlStore *)store;
    snprintf(jsonl, 4096, "%s/datasets/%s/data.jsonl", s->dir, id);
    snprintf(tar, 4096, "%s/datasets/%s/images.tar", s->dir, id);
}

void store_job_dir(Store *store, const char *id, char dir[4096]) {
    snprintf(dir, 4096, "%s/jobs/%s", ((SqlStore *)store)->dir, id);
}

/* ---- adapters ---------------------------------------------------------- */


static void read_adapter(sqlite3_stmt *st, AdapterRow *a) {
    col_text(st, 0, a->name, sizeof a->name);
    col_text(st, 1, a->source, sizeof a->source);
    col_text(st, 2, a->job_id, sizeof a->job_id);
    col_text(st, 3, a->base_model, sizeof a->base_model);
    a->rank = sqlite3_column_int(st, 4);
    a->alpha = sqlite3_column_double(st, 5);
    a->use_rslora = sqlite3_column_int(st, 6);
    a->n_modules = sqlite3_column_int(st, 7);
    a->has_vision = sqlite3_column_int(st, 8);
    a->bytes = (uint64_t)sqlite3_column_int64(st, 9);
    col_text(st, 10, a->sha256, sizeof a->sha256);
    a->created_at = sqlite3_column_int64(st, 11);
}

static void read_adapter_at(sqlite3_stmt *st, void *out, int i) { read_adapter(st, (AdapterRow *)out + i); }

/* A queued or running job's adapter name (jobs.c: "<suffix>-<8 hex of the
 * id>", or "ft-<24 hex>"), held from the job's creation so an upload cannot
 * take it before the job publishes. */
#define RESERVED_BY_JOB_SQL                                                                                     \
    "SELECT 1 FROM jobs WHERE status IN ('queued','running') AND "                                          \
    "(CASE WHEN suffix IS NOT NULL AND suffix != '' THEN suffix || '-' || substr(id, instr(id, '_') + 1, 8) " \
    "ELSE 'ft-' || substr(id, instr(id, '_') + 1) END) = ?"

static GfStatus sql_adapter_create(Store *store, const AdapterRow *a, const char *config_tmp, const char *weights_tmp,
                              GfError *err) {
    SqlStore *s = (SqlStore *)store;
    char tmp_dir[4096], final_dir[4096];
    snprintf(tmp_dir, sizeof tmp_dir, "%s/adapters/.tmp-%s", s->dir, a->name);
    snprintf(final_dir, sizeof final_dir, "%s/adapters/%s", s->dir, a->name);
    lock(s); /* held across publish so two uploads of one name cannot race */
    GfStatus res = GF_OK;
    struct stat sb;
    if (row_exists(s, "SELECT 1 FROM adapters WHERE name=?", a->name) || lstat(final_dir, &sb) == 0)
        res = gf_error_set(err, GF_CONFLICT, "adapter_exists", "name", "an adapter named '%s' already exists", a->name);
    if (!res && row_exists(s, RESERVED_BY_JOB_SQL, a->name))
        res = gf_error_set(err, GF_CONFLICT, "adapter_name_reserved", "name",
                           "the name '%s' is reserved for the adapter of a queued or running fine-tuning job", a->name);
    const char *src[2] = {config_tmp, weights_tmp};
    const char *names[2] = {"adapter_config.json", "adapter_model.safetensors"};
    if (!res) res = fs_publish(tmp_dir, final_dir, src, names, 2, err);
    int rc = res ? SQLITE_OK : begin(s);
    if (!res && rc == SQLITE_OK)
        rc = insert_adapter(s, a);
    if (!res && rc == SQLITE_OK) rc = commit(s);
    if (!res && rc != SQLITE_OK) {
        rollback(s);
        res = db_fail(s, rc, err);
        fs_remove_tree(final_dir);
    }
    unlock(s);
    return res;
}

static GfStatus sql_adapter_get(Store *store, const char *name, AdapterRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    sqlite3_stmt *st;
    lock(s);
    int rc = prep(s, &st, "SELECT " ADAPTER_COLS " FROM adapters WHERE name=?", "s", name);
    GfStatus res = GF_OK;
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) read_adapter(st, out);
    else if (rc == SQLITE_DONE) res = gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", name);
    else res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    unlock(s);
    return res;
}

static GfStatus sql_adapter_list(Store *store, const char *after, int limit, AdapterRow *out, int *n, int *has_more,
                            GfError *err) {
    SqlStore *s = (SqlStore *)store;
    return list_rows(s, "SELECT " ADAPTER_COLS " FROM adapters WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                     "SELECT seq FROM adapters WHERE name=?", after, limit, read_adapter_at, out, n, has_more, err);
}

static GfStatus sql_adapter_delete(Store *store, const char *name, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    GfStatus res = GF_OK;
    int rc = begin(s);
    if (rc == SQLITE_OK && !row_exists(s, "SELECT 1 FROM adapters WHERE name=?", name))
        res = gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", name);
    else if (rc == SQLITE_OK) rc = exec_stmt(s, "DELETE FROM adapters WHERE name=?", "s", name);
    if (!res && rc == SQLITE_OK) rc = commit(s);
    if (res || rc != SQLITE_OK) rollback(s);
    if (!res && rc != SQLITE_OK) res = db_fail(s, rc, err);
    if (!res) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/adapters/%s", s->dir, name);
        if (fs_remove_tree(dir) != 0) GF_LOGW("could not remove the files of adapter %s; removed at next start", name);
    }
    unlock(s);
    return res;
}

static GfStatus sql_adapter_files(Store *store, const char *name, char config[4096], char weights[4096], GfError *err) {
    SqlStore *s = (SqlStore *)store;
    (void)err;
    snprintf(config, 4096, "%s/adapters/%s/adapter_config.json", s->dir, name);
    snprintf(weights, 4096, "%s/adapters/%s/adapter_model.safetensors", s->dir, name);
    return GF_OK;
}

/* ---- exports ------------------------------------------------------------ */

#define EXPORT_COLS "id,kind,adapter,dtype,status,cancel_requested,created_at,started_at,finished_at,bytes_done,bytes_total," \
                    "error_code,error_message,result"

static void read_export(sqlite3_stmt *st, ExportRow *r) {
    memset(r, 0, sizeof *r);
    col_text(st, 0, r->id, sizeof r->id);
    col_text(st, 1, r->kind, sizeof r->kind);
    col_text(st, 2, r->adapter, sizeof r->adapter);
    col_text(st, 3, r->dtype, sizeof r->dtype);
    col_text(st, 4, r->status, sizeof r->status);
    r->cancel_requested = sqlite3_column_int(st, 5);
    r->created_at = sqlite3_column_int64(st, 6);
    r->started_at = col_int_or(st, 7, 0);
    r->finished_at = col_int_or(st, 8, 0);
    r->bytes_done = (uint64_t)sqlite3_column_int64(st, 9);
    r->bytes_total = (uint64_t)sqlite3_column_int64(st, 10);
    col_text(st, 11, r->error_code, sizeof r->error_code);
    col_text(st, 12, r->error_message, sizeof r->error_message);
    col_text(st, 13, r->result, sizeof r->result);
}

static void read_export_at(sqlite3_stmt *st, void *out, int i) { read_export(st, (ExportRow *)out + i); }

static GfStatus export_get_locked(SqlStore *s, const char *id, ExportRow *out, GfError *err) {
    sqlite3_stmt *st;
    int rc = prep(s, &st, "SELECT " EXPORT_COLS " FROM exports WHERE id=?", "s", id);
    GfStatus res = GF_OK;
    if (rc == SQLITE_OK) rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) read_export(st, out);
    else if (rc == SQLITE_DONE) res = gf_error_set(err, GF_NOT_FOUND, "export_not_found", "id", "no export '%s'", id);
    else res = db_fail(s, rc, err);
    sqlite3_finalize(st);
    return res;
}

static GfStatus export_create_body(SqlStore *s, void *ctx, GfError *err) {
    ExportRow *r = ctx;
    if (!row_exists(s, "SELECT 1 FROM adapters WHERE name=?", r->adapter))
        return gf_error_set(err, GF_NOT_FOUND, "adapter_not_found", "name", "no adapter '%s'", r->adapter);
    sqlite3_stmt *st;
    char running[STORE_ID_MAX] = "";
    int rc = prep(s, &st, "SELECT id FROM exports WHERE adapter=? AND status IN ('queued','running')", "s", r->adapter);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) col_text(st, 0, running, sizeof running);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_fail(s, rc, err);
    if (running[0])
        return gf_error_set(err, GF_CONFLICT, "export_running", "name", "export %s of adapter '%s' is already queued or running",
                            running, r->adapter);
    snprintf(r->status, sizeof r->status, "queued");
    r->created_at = gf_time_unix();
    rc = exec_stmt(s, "INSERT INTO exports(id,kind,adapter,dtype,status,created_at) VALUES(?,?,?,?,?,?)", "sssssi", r->id,
                   r->kind, r->adapter, r->dtype, r->status, r->created_at);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

static GfStatus sql_export_create(Store *store, ExportRow *row, GfError *err) {
    return txn((SqlStore *)store, export_create_body, row, err);
}

static GfStatus sql_export_get(Store *store, const char *id, ExportRow *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    GfStatus res = export_get_locked(s, id, out, err);
    unlock(s);
    return res;
}

static GfStatus sql_export_list(Store *store, const char *after, int limit, ExportRow *out, int *n, int *has_more,
                                GfError *err) {
    return list_rows((SqlStore *)store, "SELECT " EXPORT_COLS " FROM exports WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                     "SELECT seq FROM exports WHERE id=?", after, limit, read_export_at, out, n, has_more, err);
}

typedef struct {
    const char *id;
    ExportRow *row;
} ExportCtx;

static GfStatus export_cancel_body(SqlStore *s, void *ctx, GfError *err) {
    ExportCtx *c = ctx;
    GfStatus res = export_get_locked(s, c->id, c->row, err);
    if (res) return res;
    int rc = SQLITE_OK;
    if (strcmp(c->row->status, "queued") == 0)
        rc = exec_stmt(s, "UPDATE exports SET status='cancelled', finished_at=? WHERE id=?", "is", gf_time_unix(), c->id);
    else if (strcmp(c->row->status, "running") == 0)
        rc = exec_stmt(s, "UPDATE exports SET cancel_requested=1 WHERE id=?", "s", c->id);
    else if (strcmp(c->row->status, "cancelled") != 0)
        return gf_error_set(err, GF_CONFLICT, "export_not_cancellable", "id", "export '%s' has already %s", c->id,
                            c->row->status);
    return rc == SQLITE_OK ? export_get_locked(s, c->id, c->row, err) : db_fail(s, rc, err);
}

static GfStatus sql_export_cancel(Store *store, const char *id, ExportRow *out, GfError *err) {
    ExportCtx c = {id, out};
    return txn((SqlStore *)store, export_cancel_body, &c, err);
}

static GfStatus export_delete_body(SqlStore *s, void *ctx, GfError *err) {
    ExportCtx *c = ctx;
    GfStatus res = export_get_locked(s, c->id, c->row, err);
    if (res) return res;
    if (strcmp(c->row->status, "queued") == 0 || strcmp(c->row->status, "running") == 0)
        return gf_error_set(err, GF_CONFLICT, "export_running", "id", "export '%s' is %s; cancel it first", c->id,
                            c->row->status);
    int rc = exec_stmt(s, "DELETE FROM exports WHERE id=?", "s", c->id);
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

static GfStatus sql_export_delete(Store *store, const char *id, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    ExportRow row;
    ExportCtx c = {id, &row};
    GfStatus res = txn(s, export_delete_body, &c, err);
    if (!res) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/exports/%s", s->dir, id);
        if (fs_remove_tree(dir) != 0) GF_LOGW("could not remove the files of export %s; removed at next start", id);
    }
    return res;
}

static GfStatus sql_dataset_files(Store *store, const char *id, char jsonl[4096], char tar[4096], GfError *err) {
    (void)err;
    store_dataset_paths(store, id, jsonl, tar);
    return GF_OK;
}

static GfStatus sql_export_dir(Store *store, const char *id, char dir[4096], GfError *err) {
    SqlStore *s = (SqlStore *)store;
    (void)err;
    snprintf(dir, 4096, "%s/exports/%s", s->dir, id);
    return GF_OK;
}

/* the worker's side (store_worker.h) */

static GfStatus export_claim_body(SqlStore *s, void *ctx, GfError *err) {
    ExportCtx *c = ctx;
    sqlite3_stmt *st;
    char id[STORE_ID_MAX] = "";
    int rc = prep(s, &st, "SELECT id FROM exports WHERE status IN ('running','queued') ORDER BY status='running' DESC, seq LIMIT 1",
                  "");
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) col_text(st, 0, id, sizeof id);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return db_fail(s, rc, err);
    if (!id[0]) return gf_error_set(err, GF_NOT_FOUND, "no_export", NULL, "no export to run");
    rc = exec_stmt(s, "UPDATE exports SET status='running', started_at=?, bytes_done=0 WHERE id=?", "is", gf_time_unix(), id);
    return rc == SQLITE_OK ? export_get_locked(s, id, c->row, err) : db_fail(s, rc, err);
}

GfStatus store_export_claim(Store *store, ExportRow *out, GfError *err) {
    ExportCtx c = {NULL, out};
    return txn((SqlStore *)store, export_claim_body, &c, err);
}

GfStatus store_export_progress(Store *store, const char *id, uint64_t done, uint64_t total, int *cancel, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int rc = exec_stmt(s, "UPDATE exports SET bytes_done=?, bytes_total=? WHERE id=?", "iis", (int64_t)done, (int64_t)total, id);
    *cancel = !row_exists(s, "SELECT 1 FROM exports WHERE id=? AND status='running' AND cancel_requested=0", id);
    GfStatus res = rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
    unlock(s);
    return res;
}

GfStatus store_export_finish(Store *store, const char *id, const char *status, const char *code, const char *message,
                             const char *result, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    int rc = exec_stmt(s, "UPDATE exports SET status=?, finished_at=?, error_code=NULLIF(?,''), error_message=NULLIF(?,''), "
                          "result=NULLIF(?,''), bytes_done=CASE WHEN ?='succeeded' THEN bytes_total ELSE bytes_done END "
                          "WHERE id=? AND status='running'",
                       "sisssss", status, gf_time_unix(), code ? code : "", message ? message : "",
                       result ? result : "", status, id);
    GfStatus res = rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
    unlock(s);
    return res;
}

/* ---- counts ------------------------------------------------------------ */

static GfStatus sql_counts(Store *store, StoreCounts *out, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st;
    lock(s);
    int rc = sqlite3_prepare_v2(s->db, "SELECT (SELECT COUNT(*) FROM datasets), (SELECT COUNT(*) FROM adapters)",
                                -1, &st, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        out->datasets = (uint64_t)sqlite3_column_int64(st, 0);
        out->adapters = (uint64_t)sqlite3_column_int64(st, 1);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (rc == SQLITE_OK) rc = sqlite3_prepare_v2(s->db, "SELECT status, COUNT(*) FROM jobs GROUP BY status", -1, &st, NULL);
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *status = (const char *)sqlite3_column_text(st, 0);
        for (int i = 0; i < 5; i++)
            if (status && strcmp(status, STORE_JOB_STATUSES[i]) == 0) out->jobs_by_status[i] = (uint64_t)sqlite3_column_int64(st, 1);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    GfStatus res = rc == SQLITE_DONE || rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
    unlock(s);
    return res;
}

/* ---- idempotency ------------------------------------------------------------ */

static GfStatus idem_lookup(SqlStore *s, const char *key, const char *route, const char *hash, IdemResult *result, int *status,
                            char **body, GfError *err) {
    sqlite3_stmt *st;
    int rc = exec_stmt(s, "DELETE FROM idempotency WHERE created_at < ?", "i", gf_time_unix() - 86400);
    if (rc == SQLITE_OK) rc = prep(s, &st, "SELECT request_sha256, state, status, response FROM idempotency WHERE key=? AND route=?",
                                   "ss", key, route);
    if (rc != SQLITE_OK) return db_fail(s, rc, err);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        char stored[65], state[16];
        col_text(st, 0, stored, sizeof stored);
        col_text(st, 1, state, sizeof state);
        if (strcmp(stored, hash) != 0) *result = IDEM_MISMATCH;
        else if (strcmp(state, "done") != 0) *result = IDEM_IN_PROGRESS;
        else {
            *result = IDEM_REPLAY;
            *status = sqlite3_column_int(st, 2);
            const unsigned char *t = sqlite3_column_text(st, 3);
            *body = strdup(t ? (const char *)t : "");
        }
        sqlite3_finalize(st);
        return GF_OK;
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE) return db_fail(s, rc, err);
    rc = exec_stmt(s, "INSERT INTO idempotency(key, route, request_sha256, state, created_at) VALUES(?,?,?,'in_progress',?)",
                   "sssi", key, route, hash, gf_time_unix());
    *result = IDEM_NEW;
    return rc == SQLITE_OK ? GF_OK : db_fail(s, rc, err);
}

GfStatus store_idem_begin(Store *store, const char *key, const char *route, const char *hash, IdemResult *result, int *status,
                          char **body, GfError *err) {
    SqlStore *s = (SqlStore *)store;
    *body = NULL;
    lock(s);
    int rc = begin(s);
    GfStatus res = rc == SQLITE_OK ? idem_lookup(s, key, route, hash, result, status, body, err) : db_fail(s, rc, err);
    if (!res && (rc = commit(s)) != SQLITE_OK) res = db_fail(s, rc, err);
    if (res) rollback(s);
    unlock(s);
    return res;
}

void store_idem_finish(Store *store, const char *key, const char *route, int status, const char *body, size_t len) {
    SqlStore *s = (SqlStore *)store;
    char *copy = strndup(body ? body : "", len);
    lock(s);
    if (copy && begin(s) == SQLITE_OK) {
        int rc = exec_stmt(s, "UPDATE idempotency SET state='done', status=?, response=? WHERE key=? AND route=?", "isss",
                           (int64_t)status, copy, key, route);
        if (rc == SQLITE_OK) commit(s);
        else rollback(s);
    }
    unlock(s);
    free(copy);
}

void store_idem_abort(Store *store, const char *key, const char *route) {
    SqlStore *s = (SqlStore *)store;
    lock(s);
    if (begin(s) == SQLITE_OK) {
        if (exec_stmt(s, "DELETE FROM idempotency WHERE key=? AND route=? AND state='in_progress'", "ss", key, route) == SQLITE_OK)
            commit(s);
        else
            rollback(s);
    }
    unlock(s);
}

static const StoreOps SQL_STORE_OPS = {
    .dataset_create = sql_dataset_create,
    .dataset_get = sql_dataset_get,
    .dataset_list = sql_dataset_list,
    .dataset_delete = sql_dataset_delete,
    .dataset_files = sql_dataset_files,
    .job_create = sql_job_create,
    .job_get = sql_job_get,
    .job_list = sql_job_list,
    .job_cancel = sql_job_cancel,
    .job_pause = sql_job_pause,
    .job_resume = sql_job_resume,
    .job_events = sql_job_events,
    .job_checkpoints = sql_job_checkpoints,
    .job_checkpoint = sql_job_checkpoint,
    .adapter_create = sql_adapter_create,
    .adapter_get = sql_adapter_get,
    .adapter_list = sql_adapter_list,
    .adapter_delete = sql_adapter_delete,
    .adapter_files = sql_adapter_files,
    .export_create = sql_export_create,
    .export_get = sql_export_get,
    .export_list = sql_export_list,
    .export_cancel = sql_export_cancel,
    .export_delete = sql_export_delete,
    .export_dir = sql_export_dir,
    .counts = sql_counts,
    .ping = sql_ping,
};
