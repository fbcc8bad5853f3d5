/* jsoncheck.c - iterative strict JSON validator in front of cJSON. */
#include "jsoncheck.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const unsigned char *p, *end, *start;
    const char *what;
    GfError *err;
} Scan;

static GfStatus fail(Scan *s, const char *code, const char *msg) {
    return gf_error_set(s->err, GF_INVALID, code, NULL, "%s: %s at byte %zu", s->what, msg,
                        (size_t)(s->p - s->start));
}

static void skip_ws(Scan *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

/* One escape after the backslash; validates \u pairs and refuses \u0000. */
static GfStatus scan_escape(Scan *s) {
    if (s->p >= s->end) return fail(s, "invalid_json", "unterminated string");
    unsigned char c = *s->p++;
    if (strchr("\"\\/bfnrt", c) && c) return GF_OK;
    if (c != 'u') return fail(s, "invalid_string", "invalid escape");
    unsigned cp;
    if (s->end - s->p < 4 || hex4(s->p, &cp)) return fail(s, "invalid_string", "invalid \\u escape");
    s->p += 4;
    if (cp == 0) return fail(s, "invalid_string", "\\u0000 is not allowed in strings");
    if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(s, "invalid_string", "lone low surrogate");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        unsigned lo;
        if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u' || hex4(s->p + 2, &lo) ||
            lo < 0xDC00 || lo > 0xDFFF)
            return fail(s, "invalid_string", "lone high surrogate");
        s->p += 6;
    }
    return GF_OK;
}

static GfStatus scan_string(Scan *s) {
    s->p++; /* opening quote */
    const unsigned char *run = s->p;
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            if (!gf_utf8_valid((const char *)run, (size_t)(s->p - run)))
                return fail(s, "invalid_utf8", "invalid UTF-8 in string");
            s->p++;
            return GF_OK;
        }
        if (c < 0x20) return fail(s, "invalid_string", "control character in string");
        if (c == '\\') {
            if (!gf_utf8_valid((const char *)run, (size_t)(s->p - run)))
                return fail(s, "invalid_utf8", "invalid UTF-8 in string");
            s->p++;
            GfStatus st = scan_escape(s);
            if (st) return st;
            run = s->p;
            continue;
        }
        s->p++;
    }
    return fail(s, "invalid_json", "unterminated string");
}

static int is_digit(const Scan *s) { return s->p < s->end && *s->p >= '0' && *s->p <= '9'; }

static GfStatus scan_number(Scan *s) {
    if (s->p < s->end && *s->p == '-') s->p++;
    if (!is_digit(s)) return fail(s, "invalid_json", "invalid number");
    if (*s->p == '0') s->p++;
    else while (is_digit(s)) s->p++;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!is_digit(s)) return fail(s, "invalid_json", "invalid number");
        while (is_digit(s)) s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!is_digit(s)) return fail(s, "invalid_json", "invalid number");
        while (is_digit(s)) s->p++;
    }
    return GF_OK;
}

static GfStatus scan_literal(Scan *s, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, lit, n) != 0)
        return fail(s, "invalid_json", "unexpected character");
    s->p += n;
    return GF_OK;
}

static GfStatus scan_scalar(Scan *s) {
    switch (*s->p) {
    case '"': return scan_string(s);
    case 't': return scan_literal(s, "true");
    case 'f': return scan_literal(s, "false");
    case 'n': return scan_literal(s, "null");
    default: return scan_number(s);
    }
}

/* The grammar as a loop over a stack of open containers: '{' or '['. */
static GfStatus scan(const char *buf, size_t n, const char *what, long max_values, GfError *err) {
    Scan s = {(const unsigned char *)buf, (const unsigned char *)buf + n,
              (const unsigned char *)buf, what, err};
    char stack[JSON_DEPTH_MAX];
    int depth = 0;
    long values = 0;
    skip_ws(&s);
    if (s.p >= s.end) return fail(&s, "invalid_json", "empty document");
    for (;;) {
        /* expecting a value */
        if (++values > max_values) {
            char msg[64];
            snprintf(msg, sizeof msg, "more than %ld values", max_values);
            return fail(&s, "too_many_values", msg);
        }
        skip_ws(&s);
        if (s.p >= s.end) return fail(&s, "invalid_json", "unexpected end");
        unsigned char c = *s.p;
        if (c == '{' || c == '[') {
            if (depth == JSON_DEPTH_MAX) return fail(&s, "nesting_too_deep", "nesting deeper than 64");
            stack[depth++] = (char)c;
            s.p++;
            skip_ws(&s);
            if (s.p < s.end && *s.p == (c == '{' ? '}' : ']')) {
                s.p++;
                depth--;
                goto after_value;
            }
            if (c == '{') goto object_key;
            continue;
        }
        {
            GfStatus st = scan_scalar(&s);
            if (st) return st;
        }
    after_value:
        skip_ws(&s);
        if (depth == 0) {
            if (s.p != s.end) return fail(&s, "invalid_json", "trailing characters");
            return GF_OK;
        }
        if (s.p >= s.end) return fail(&s, "invalid_json", "unexpected end");
        if (*s.p == ',') {
            s.p++;
            if (stack[depth - 1] == '{') goto object_key;
            continue;
        }
        if (*s.p == (stack[depth - 1] == '{' ? '}' : ']')) {
            s.p++;
            depth--;
            goto after_value;
        }
        return fail(&s, "invalid_json", "expected ',' or a closing bracket");
    object_key:
        skip_ws(&s);
        if (s.p >= s.end || *s.p != '"') return fail(&s, "invalid_json", "expected a string key");
        {
            GfStatus st = scan_string(&s);
            if (st) return st;
        }
        skip_ws(&s);
        if (s.p >= s.end || *s.p != ':') return fail(&s, "invalid_json", "expected ':'");
        s.p++;
    }
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Walks the tree; every object's keys are sorted and compared neighbour to
 * neighbour, so the check is O(k log k) per object. */
static GfStatus check_duplicates(const cJSON *node, const char *what, GfError *err) {
    for (; node; node = node->next) {
        if (cJSON_IsObject(node)) {
            size_t k = 0;
            for (const cJSON *c = node->child; c; c = c->next) k++;
            if (k > 1) {
                const char **keys = gf_malloc(k * sizeof *keys, err);
                if (!keys) return GF_NO_MEMORY;
                size_t i = 0;
                for (const cJSON *c = node->child; c; c = c->next) keys[i++] = c->string;
                qsort(keys, k, sizeof *keys, cmp_str);
                for (i = 1; i < k; i++) {
                    if (strcmp(keys[i - 1], keys[i]) == 0) {
                        gf_error_set(err, GF_INVALID, "duplicate_key", keys[i],
                                     "%s: duplicate key \"%.64s\"", what, keys[i]);
                        free(keys);
                        return GF_INVALID;
                    }
                }
                free(keys);
            }
        }
        if (node->child) {
            GfStatus st = check_duplicates(node->child, what, err); /* depth <= 64 */
            if (st) return st;
        }
    }
    return GF_OK;
}

/* cJSON allocates through the checked allocator; a refusal is remembered
 * per thread so a parse can tell running out of memory from bad JSON. */
static _Thread_local int json_oom;
static pthread_once_t hooks_once = PTHREAD_ONCE_INIT;

static void *json_malloc(size_t n) {
    void *p = gf_malloc(n, NULL);
    if (!p) json_oom = 1;
    return p;
}

static void install_hooks(void) {
    cJSON_Hooks h = {json_malloc, free};
    cJSON_InitHooks(&h);
}

GfStatus json_scan_strict(const char *buf, size_t n, const char *what, GfError *err) {
    return scan(buf, n, what, JSON_VALUES_MAX, err);
}

cJSON *json_parse_strict(const char *buf, size_t n, const char *what, GfError *err) {
    return json_parse_strict_max(buf, n, what, JSON_VALUES_MAX, err);
}

cJSON *json_parse_strict_max(const char *buf, size_t n, const char *what, long max_values, GfError *err) {
    pthread_once(&hooks_once, install_hooks);
    if (scan(buf, n, what, max_values, err)) return NULL;
    json_oom = 0;
    cJSON *root = cJSON_ParseWithLength(buf, n);
    if (!root) {
        if (json_oom) gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory parsing %s", what);
        else gf_error_set(err, GF_INVALID, "invalid_json", NULL, "%s: invalid JSON", what);
        return NULL;
    }
    if (check_duplicates(root, what, err)) {
        cJSON_Delete(root);
        return NULL;
    }
    return root;
}

GfStatus json_error(GfError *err, const GfError *jerr, GfStatus status, const char *code, const char *param) {
    if (jerr->status == GF_NO_MEMORY) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", param, "%s", jerr->message);
    return gf_error_set(err, status, code, param, "%s", jerr->message);
}
