/* test_migrate.c - the migration runner: applies in order once, records each,
 * rolls back a failing one, refuses a database newer than the build. */
#include <sqlite3.h>

#include "check.h"
#include "migrate.h"

static int count(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st;
    int n = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) n = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    return n;
}

int main(void) {
    sqlite3 *db;
    sqlite3_open(":memory:", &db);
    GfError err;
    int applied = -1;
    CHECK_STATUS(migrate_apply(db, GF_MIGRATIONS, GF_N_MIGRATIONS, &applied, &err), GF_OK, err);
    CHECK(applied == GF_N_MIGRATIONS && applied >= 1, "applied %d", applied);
    CHECK(count(db, "SELECT COUNT(*) FROM datasets") == 0 && count(db, "SELECT COUNT(*) FROM jobs") == 0, "tables exist");
    CHECK_STATUS(migrate_apply(db, GF_MIGRATIONS, GF_N_MIGRATIONS, &applied, &err), GF_OK, err);
    CHECK(applied == 0, "second run applied %d", applied);
    Migration extra[2] = {GF_MIGRATIONS[GF_N_MIGRATIONS - 1],
                          {9998, "9998_bad.sql", "CREATE TABLE t1(x); CREATE TABLE datasets(y);"}};
    CHECK(migrate_apply(db, extra, 2, &applied, &err) == GF_FORMAT, "failing migration reported");
    CHECK(count(db, "SELECT COUNT(*) FROM sqlite_master WHERE name='t1'") == 0, "failing migration rolled back");
    CHECK(count(db, "SELECT COUNT(*) FROM schema_migrations WHERE version=9998") == 0, "not recorded");
    Migration good[2] = {GF_MIGRATIONS[GF_N_MIGRATIONS - 1], {9999, "9999_x.sql", "CREATE TABLE t2(x);"}};
    CHECK_STATUS(migrate_apply(db, good, 2, &applied, &err), GF_OK, err);
    CHECK(migrate_apply(db, GF_MIGRATIONS, GF_N_MIGRATIONS, &applied, &err) == GF_FORMAT, "newer database refused");
    Migration unordered[2] = {good[1], good[0]};
    CHECK(migrate_apply(db, unordered, 2, &applied, &err) == GF_FORMAT, "order checked");
    sqlite3_close(db);
    return check_done("test_migrate");
}
