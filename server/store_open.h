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

/* Directory for temporary uploads (DATA/tmp), valid while the store is open. */
const char *store_tmp_dir(const Store *s);

#endif
