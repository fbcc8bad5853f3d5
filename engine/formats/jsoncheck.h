/* jsoncheck.h - strict JSON parsing for untrusted bytes.
 *
 * cJSON alone accepts things we must refuse: duplicate keys (it keeps both
 * and returns the first), invalid UTF-8, "\u0000" that truncates a string,
 * lone surrogates, and it recurses up to 1000 levels. json_parse_strict()
 * first scans the bytes with an iterative RFC 8259 validator that enforces a
 * depth cap and all of the above, then lets cJSON build the tree and checks
 * every object for duplicate keys.
 *
 * Errors carry stable codes: invalid_json, invalid_utf8, invalid_string,
 * nesting_too_deep, too_many_values, duplicate_key; running out of memory is GF_NO_MEMORY
 * (cJSON allocates through gf_malloc, hooked once on first use). Messages
 * give the byte offset, never the content. Thread-safe; the returned tree is
 * owned by the caller (cJSON_Delete).
 */
#ifndef GF_JSONCHECK_H
#define GF_JSONCHECK_H

#include <stddef.h>
#include <cjson/cJSON.h>

#include "base.h"

#define JSON_DEPTH_MAX 64
/* Values in one document (a string, however long, is one): the tree cJSON
 * builds costs about 64 bytes a value, so a body of tiny values (33 M zeros
 * in 64 MiB) would cost gigabytes; it is refused while scanning. */
#define JSON_VALUES_MAX (1 << 20)

/* Validates and parses buf[0..n) (no NUL terminator needed). Returns the tree
 * or NULL with err set (GF_INVALID). `what` names the input in messages
 * ("request body", "line 3"). */
cJSON *json_parse_strict(const char *buf, size_t n, const char *what, GfError *err);
/* The same with another cap on values, for large files the engine trusts
 * more than a request (a tokenizer.json holds millions). */
cJSON *json_parse_strict_max(const char *buf, size_t n, const char *what, long max_values, GfError *err);

/* A parse failure jerr reported as the caller's: status and code given, the
 * message kept, param set; running out of memory stays GF_NO_MEMORY.
 * Returns err's status. */
GfStatus json_error(GfError *err, const GfError *jerr, GfStatus status, const char *code, const char *param);

/* Only the scanning half: GF_OK when buf is one strict JSON value. */
GfStatus json_scan_strict(const char *buf, size_t n, const char *what, GfError *err);

#endif
