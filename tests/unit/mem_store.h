/* mem_store.h - an in-memory implementation of the store port (api/store.h)
 * for API tests that need no SQLite and no data directory: every row lives
 * in arrays, newest listed first, with the same errors (codes, params,
 * messages) as the SQLite store. It keeps no files: the temporaries handed
 * to the create calls are removed, and store_adapter_files answers
 * GF_NOT_FOUND. A failure can be injected into the next call.
 *
 * Ownership: mem_store_new returns a store freed by mem_store_free. Thread
 * safety: a mutex guards every call. Capacity: MEM_STORE_MAX rows of each
 * kind (GF_TOO_LARGE beyond).
 */
#ifndef GF_MEM_STORE_H
#define GF_MEM_STORE_H

#include "store.h"

#define MEM_STORE_MAX 256

typedef struct MemStore MemStore;

MemStore *mem_store_new(void);
void mem_store_free(MemStore *m);
/* The port to hand to an Api. */
Store *mem_store_port(MemStore *m);
/* The next call of the port fails with status (message "injected failure"). */
void mem_store_fail_next(MemStore *m, GfStatus status);
/* Test set-up: a running job's progress, as the job worker would record it. */
GfStatus mem_store_job_start(MemStore *m, const char *id, GfError *err);

#endif
