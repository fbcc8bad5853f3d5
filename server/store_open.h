/* store_open.h - opening and closing the SQLite store that implements
 * api/store.h, and the files it keeps under the data directory:
 *
 *   DATA/gemmaforge.db (+ -wal, -shm)   SQLite, WAL, synchronous=FULL
 *   DATA/tmp/                          per-request upload directories
 *   DATA/datasets/<id>/                data.jsonl, images.tar
 *   DATA/adapters/<name>/              adapter_config.json, adapter_model.safetensors
 *   DATA/jobs/<id>/                    checkpoints/, log (written by the trainer)
 *
 * store_open creates the layout, applies migrations, runs PRAGMA quick_check,
 * and removes leftovers of interrupted work (upload temp files, half-moved
 * directories, directories without a row). Called on the main thread before
 * the HTTP server starts; store_close after it stops.
 */
#ifndef GF_STORE_OPEN_H
#define GF_STORE_OPEN_H

#include "store.h"

GfStatus store_open(const char *data_dir, Store **out, GfError *err);
void store_close(Store *s);

/* ---- idempotency keys (used by the HTTP layer around handlers) ---------- */
typedef enum { IDEM_NEW, IDEM_REPLAY, IDEM_MISMATCH, IDEM_IN_PROGRESS } IdemResult;

/* Looks up (key, route). IDEM_NEW: an in-progress row now exists and the
 * caller must finish or abort it. IDEM_REPLAY: *status and *body (malloc'd,
 * caller frees) hold the first response. Rows older than 24 h are dropped. */
GfStatus store_idem_begin(Store *s, const char *key, const char *route, const char *sha256_hex, IdemResult *result,
                          int *status, char **body, GfError *err);
/* Records the response of a successful first request. */
void store_idem_finish(Store *s, const char *key, const char *route, int status, const char *body, size_t len);
/* Forgets the in-progress row of a failed first request. */
void store_idem_abort(Store *s, const char *key, const char *route);

/* Directory for temporary uploads (DATA/tmp), valid while the store is open. */
const char *store_tmp_dir(const Store *s);

#endif
