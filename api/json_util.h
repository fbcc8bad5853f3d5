/* json_util.h - typed, range-checked reads of request JSON that name the
 * failing field.
 *
 * All getters treat an absent key or null as "use the default" unless the
 * field is required. Numbers are checked on valuedouble (finite, integral
 * where asked, inside [min, max]) because cJSON's valueint saturates. Codes:
 * missing_parameter, invalid_type, invalid_value, unknown_parameter; a
 * JsonCtx may override them with one code (e.g. invalid_hyperparameter).
 * `param` is "prefix.key". Thread-safe.
 */
#ifndef GF_JSON_UTIL_H
#define GF_JSON_UTIL_H

#include <stdint.h>
#include <cjson/cJSON.h>

#include "base.h"

typedef struct {
    const cJSON *obj;        /* the object being read */
    const char *prefix;      /* "" or "hyperparameters" */
    const char *code;        /* NULL, or the one code for every failure */
    GfError *err;
} JsonCtx;

/* Parses a request body strictly (see engine/jsoncheck.h) and requires an
 * object. Returns NULL with err set (400 invalid_json, ...). */
cJSON *json_parse_body(const char *body, size_t len, GfError *err);

/* Fails with unknown_parameter on a key not in allowed (NULL-terminated). */
GfStatus json_only_keys(const JsonCtx *c, const char *const *allowed);

GfStatus json_get_int(const JsonCtx *c, const char *key, int required, int64_t min, int64_t max,
                      int64_t def, int64_t *out);
/* min_open: the lower bound is exclusive. */
GfStatus json_get_number(const JsonCtx *c, const char *key, int required, double min, int min_open,
                         double max, double def, double *out);
GfStatus json_get_bool(const JsonCtx *c, const char *key, int def, int *out);
/* String of 1..max_len bytes (valid UTF-8 guaranteed by the strict parser);
 * *out points into the tree (or is def). */
GfStatus json_get_string(const JsonCtx *c, const char *key, int required, size_t max_len,
                         const char *def, const char **out);
/* String that must be one of choices (NULL-terminated). */
GfStatus json_get_enum(const JsonCtx *c, const char *key, const char *const *choices,
                       const char *def, const char **out);

#endif
