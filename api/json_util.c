/* json_util.c - typed getters with field-path errors. */
#include "json_util.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "jsoncheck.h"

static GfStatus fail(const JsonCtx *c, const char *key, const char *code, const char *fmt, const char *arg) {
    char param[GF_ERR_PARAM_MAX];
    snprintf(param, sizeof param, "%s%s%s", c->prefix, c->prefix[0] ? "." : "", key);
    return gf_error_set(c->err, GF_INVALID, c->code ? c->code : code, param, fmt, param, arg ? arg : "");
}

cJSON *json_parse_body(const char *body, size_t len, GfError *err) {
    cJSON *root = json_parse_strict(body ? body : "", body ? len : 0, "request body", err);
    if (root && !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        gf_error_set(err, GF_INVALID, "invalid_json", NULL, "request body must be a JSON object");
        return NULL;
    }
    return root;
}

GfStatus json_only_keys(const JsonCtx *c, const char *const *allowed) {
    for (const cJSON *k = c->obj->child; k; k = k->next) {
        const char *const *a = allowed;
        while (*a && strcmp(*a, k->string) != 0) a++;
        if (!*a) return fail(c, k->string, "unknown_parameter", "unknown parameter '%s'%s", NULL);
    }
    return GF_OK;
}

/* NULL when absent or null; sets *missing. */
static const cJSON *field(const JsonCtx *c, const char *key, int required, GfStatus *st) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c->obj, key);
    *st = GF_OK;
    if (!v || cJSON_IsNull(v)) {
        if (required) *st = fail(c, key, "missing_parameter", "'%s' is required%s", NULL);
        return NULL;
    }
    return v;
}

GfStatus json_get_number(const JsonCtx *c, const char *key, int required, double min, int min_open,
                         double max, double def, double *out) {
    GfStatus st;
    const cJSON *v = field(c, key, required, &st);
    if (!v) { *out = def; return st; }
    if (!cJSON_IsNumber(v)) return fail(c, key, "invalid_type", "'%s' must be a number%s", NULL);
    double d = v->valuedouble;
    char range[96];
    snprintf(range, sizeof range, "%s%g, %g]", min_open ? "(" : "[", min, max);
    if (!isfinite(d) || d > max || d < min || (min_open && d == min))
        return fail(c, key, "invalid_value", "'%s' must be a finite number in %s", range);
    *out = d;
    return GF_OK;
}

GfStatus json_get_int(const JsonCtx *c, const char *key, int required, int64_t min, int64_t max,
                      int64_t def, int64_t *out) {
    GfStatus st;
    const cJSON *v = field(c, key, required, &st);
    if (!v) { *out = def; return st; }
    if (!cJSON_IsNumber(v)) return fail(c, key, "invalid_type", "'%s' must be an integer%s", NULL);
    double d = v->valuedouble;
    char range[96];
    snprintf(range, sizeof range, "%lld..%lld", (long long)min, (long long)max);
    if (!isfinite(d) || floor(d) != d || d < (double)min || d > (double)max)
        return fail(c, key, "invalid_value", "'%s' must be an integer in %s", range);
    *out = (int64_t)d;
    return GF_OK;
}

GfStatus json_get_bool(const JsonCtx *c, const char *key, int def, int *out) {
    GfStatus st;
    const cJSON *v = field(c, key, 0, &st);
    if (!v) { *out = def; return GF_OK; }
    if (!cJSON_IsBool(v)) return fail(c, key, "invalid_type", "'%s' must be true or false%s", NULL);
    *out = cJSON_IsTrue(v);
    return GF_OK;
}

GfStatus json_get_string(const JsonCtx *c, const char *key, int required, size_t max_len,
                         const char *def, const char **out) {
    GfStatus st;
    const cJSON *v = field(c, key, required, &st);
    if (!v) { *out = def; return st; }
    if (!cJSON_IsString(v)) return fail(c, key, "invalid_type", "'%s' must be a string%s", NULL);
    size_t n = strlen(v->valuestring);
    char lim[32];
    snprintf(lim, sizeof lim, "%zu", max_len);
    if (n == 0 || n > max_len) return fail(c, key, "invalid_value", "'%s' must have 1 to %s bytes", lim);
    *out = v->valuestring;
    return GF_OK;
}

GfStatus json_get_enum(const JsonCtx *c, const char *key, const char *const *choices, const char *def,
                       const char **out) {
    const char *s;
    GfStatus st = json_get_string(c, key, 0, 64, def, &s);
    if (st) return st;
    char list[160] = "";
    for (const char *const *k = choices; *k; k++) {
        if (strcmp(*k, s) == 0) { *out = *k; return GF_OK; }
        size_t n = strlen(list);
        snprintf(list + n, sizeof list - n, "%s%s", n ? ", " : "", *k);
    }
    return fail(c, key, "invalid_value", "'%s' must be one of: %s", list);
}
