/* common.c - helpers shared by the resource handlers. */
#include "common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "reply.h"


GfStatus paging_or_reply(const HttpReq *req, HttpResp *resp, int *limit, char after[STORE_NAME_MAX]) {
    const char *l = req->query ? req->query(req->cls, "limit") : NULL;
    const char *a = req->query ? req->query(req->cls, "after") : NULL;
    *limit = PAGE_DEFAULT;
    after[0] = '\0';
    if (l) {
        char *end;
        long v = strtol(l, &end, 10);
        if (!*l || *end || v < 1 || v > PAGE_MAX || l[0] == '+' || l[0] == ' ')
            return reply_fail(resp, GF_INVALID, "invalid_value", "limit", "'limit' must be an integer from 1 to %d", PAGE_MAX);
        *limit = (int)v;
    }
    if (a) {
        GfError err;
        if (check_object_name(a, "after", &err)) return reply_error(resp, &err, NULL);
        snprintf(after, STORE_NAME_MAX, "%s", a);
    }
    return GF_OK;
}

GfStatus check_display_name(const char *name, const char *param, GfError *err) {
    size_t n = strlen(name);
    if (n == 0 || n > 256)
        return gf_error_set(err, GF_INVALID, "invalid_value", param, "'%s' must have 1 to 256 bytes", param);
    if (!gf_utf8_valid(name, n))
        return gf_error_set(err, GF_INVALID, "invalid_utf8", param, "'%s' is not valid UTF-8", param);
    const unsigned char *p = (const unsigned char *)name;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < 0x20 || p[i] == 0x7f)
            return gf_error_set(err, GF_INVALID, "invalid_value", param, "'%s' contains a control character", param);
        /* U+202A..U+202E and U+2066..U+2069: E2 80 AA..AE, E2 81 A6..A9 */
        if (p[i] == 0xE2 && i + 2 < n &&
            ((p[i + 1] == 0x80 && p[i + 2] >= 0xAA && p[i + 2] <= 0xAE) ||
             (p[i + 1] == 0x81 && p[i + 2] >= 0xA6 && p[i + 2] <= 0xA9)))
            return gf_error_set(err, GF_INVALID, "invalid_value", param,
                                "'%s' contains a bidirectional override character", param);
    }
    return GF_OK;
}

GfStatus check_object_name(const char *name, const char *param, GfError *err) {
    size_t n = strlen(name);
    int ok = n >= 1 && n <= 64 && !strstr(name, "..");
    for (size_t i = 0; ok && i < n; i++) {
        char c = name[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        ok = alnum || (i > 0 && (c == '.' || c == '_' || c == '-'));
    }
    if (!ok)
        return gf_error_set(err, GF_INVALID, "invalid_name", param,
                            "'%s' must be 1 to 64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit",
                            param);
    return GF_OK;
}

const HttpPart *find_part(const HttpReq *req, const char *name) {
    for (size_t i = 0; i < req->n_parts; i++)
        if (strcmp(req->parts[i].name, name) == 0) return &req->parts[i];
    return NULL;
}

GfStatus only_parts_or_reply(const HttpReq *req, HttpResp *resp, const char *const *allowed) {
    for (size_t i = 0; i < req->n_parts; i++) {
        const char *const *a = allowed;
        while (*a && strcmp(*a, req->parts[i].name) != 0) a++;
        if (!*a)
            return reply_fail(resp, GF_INVALID, "invalid_multipart", req->parts[i].name,
                              "unknown form field '%.64s'", req->parts[i].name);
    }
    return GF_OK;
}

cJSON *list_envelope(cJSON *data, int has_more) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON_AddItemToObject(o, "data", data);
    cJSON_AddBoolToObject(o, "has_more", has_more);
    return o;
}

void add_number_or_null(cJSON *o, const char *key, double v) {
    if (isnan(v)) cJSON_AddNullToObject(o, key);
    else cJSON_AddNumberToObject(o, key, v);
}

void add_time_or_null(cJSON *o, const char *key, int64_t t) {
    if (t <= 0) cJSON_AddNullToObject(o, key);
    else cJSON_AddNumberToObject(o, key, (double)t);
}
