/* migrate.h - applies the numbered SQL migrations (migrations/NNNN_name.sql,
 * embedded into the binary at build time) in order and records each in
 * schema_migrations (version, name, applied_at), each in its own
 * BEGIN IMMEDIATE transaction. A database whose recorded version is newer
 * than this build knows is refused rather than used. Called once at start-up
 * on the main thread, before any other connection is used.
 */
#ifndef GF_MIGRATE_H
#define GF_MIGRATE_H

#include <sqlite3.h>

#include "base.h"

typedef struct {
    int version;            /* NNNN */
    const char *name;       /* "0001_init.sql" */
    const char *sql;
} Migration;

/* The migrations compiled into this binary, sorted by version. */
extern const Migration GF_MIGRATIONS[];
extern const int GF_N_MIGRATIONS;

/* Applies list[0..n) (sorted by version, unique) that are not yet recorded.
 * Returns GF_OK with *applied = number newly applied. */
GfStatus migrate_apply(sqlite3 *db, const Migration *list, int n, int *applied, GfError *err);

#endif
