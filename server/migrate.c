/* migrate.c - numbered SQL migrations, applied once each. */
#include "migrate.h"

#include <stdio.h>

static int is_applied(sqlite3 *db, int version) {
    sqlite3_stmt *st;
    int found = 0;
    if (sqlite3_prepare_v2(db, "SELECT 1 FROM schema_migrations WHERE version=?", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_int(st, 1, version);
        found = sqlite3_step(st) == SQLITE_ROW;
    }
    sqlite3_finalize(st);
    return found;
}

static GfStatus apply_one(sqlite3 *db, const Migration *m, GfError *err) {
    char *msg = NULL;
    int rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, &msg);
    if (rc == SQLITE_OK) rc = sqlite3_exec(db, m->sql, NULL, NULL, &msg);
    if (rc == SQLITE_OK) {
        sqlite3_stmt *st;
        rc = sqlite3_prepare_v2(db, "INSERT INTO schema_migrations(version,name,applied_at) "
                                    "VALUES(?,?,strftime('%s','now'))", -1, &st, NULL);
        if (rc == SQLITE_OK) {
            sqlite3_bind_int(st, 1, m->version);
            sqlite3_bind_text(st, 2, m->name, -1, SQLITE_STATIC);
            rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        }
        sqlite3_finalize(st);
    }
    if (rc == SQLITE_OK) rc = sqlite3_exec(db, "COMMIT", NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        gf_error_set(err, GF_FORMAT, NULL, NULL, "migration %s failed: %s", m->name, msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return GF_FORMAT;
    }
    GF_LOGI("applied migration %s", m->name);
    return GF_OK;
}

static int max_recorded(sqlite3 *db) {
    sqlite3_stmt *q;
    int v = 0;
    if (sqlite3_prepare_v2(db, "SELECT COALESCE(MAX(version),0) FROM schema_migrations", -1, &q, NULL) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW)
        v = sqlite3_column_int(q, 0);
    sqlite3_finalize(q);
    return v;
}

GfStatus migrate_apply(sqlite3 *db, const Migration *list, int n, int *applied, GfError *err) {
    *applied = 0;
    if (sqlite3_exec(db, "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                         "name TEXT NOT NULL, applied_at INTEGER NOT NULL)", NULL, NULL, NULL) != SQLITE_OK)
        return gf_error_set(err, GF_IO, NULL, NULL, "cannot create schema_migrations: %s", sqlite3_errmsg(db));
    for (int i = 1; i < n; i++)
        if (list[i].version <= list[i - 1].version)
            return gf_error_set(err, GF_FORMAT, NULL, NULL, "migrations out of order at %s", list[i].name);
    int known = n ? list[n - 1].version : 0, recorded = max_recorded(db);
    if (recorded > known)
        return gf_error_set(err, GF_FORMAT, NULL, NULL,
                            "the database has schema version %d, newer than this build knows (%d)", recorded, known);
    for (int i = 0; i < n; i++) {
        if (is_applied(db, list[i].version)) continue;
        GfStatus st = apply_one(db, &list[i], err);
        if (st) return st;
        (*applied)++;
    }
    return GF_OK;
}
