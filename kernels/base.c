/* base.c - status codes, errors, logging, checked allocation, arena. */
#include "base.h"

#include <errno.h>
#include <unistd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* ---- errors ------------------------------------------------------------ */

void gf_error_clear(GfError *err) {
    if (!err) return;
    err->status = GF_OK;
    err->code[0] = err->param[0] = err->message[0] = '\0';
}

static void copy_str(char *dst, size_t cap, const char *src) {
    if (!src) { dst[0] = '\0'; return; }
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

GfStatus gf_error_set(GfError *err, GfStatus status, const char *code,
                      const char *param, const char *fmt, ...) {
    if (!err) return status;
    err->status = status;
    copy_str(err->code, sizeof err->code, code);
    copy_str(err->param, sizeof err->param, param);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return status;
}

GfStatus gf_error_wrap(GfError *err, const char *param, const char *fmt, ...) {
    if (!err) return GF_INTERNAL;
    char inner[GF_ERR_MSG_MAX], context[GF_ERR_MSG_MAX / 2];
    memcpy(inner, err->message, sizeof inner);
    inner[sizeof inner - 1] = '\0';
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(context, sizeof context, fmt, ap);
    va_end(ap);
    size_t n = strlen(context);
    if (inner[0] && n + 2 < sizeof context) memcpy(context + n, ": ", 3);
    n = strlen(context);
    memcpy(err->message, context, n);
    gf_strlcpy(err->message + n, inner, sizeof err->message - n);
    if (param) copy_str(err->param, sizeof err->param, param);
    if (err->status == GF_OK) err->status = GF_INTERNAL;
    return err->status;
}

const char *gf_status_name(GfStatus status) {
    static const char *names[GF_STATUS_COUNT] = {
        "OK", "INVALID", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "CONFLICT",
        "TOO_LARGE", "UNSUPPORTED", "UNPROCESSABLE", "BUSY", "NOT_READY",
        "NOT_IMPLEMENTED", "NO_SPACE", "NO_MEMORY", "IO", "FORMAT", "DEVICE",
        "CANCELLED", "INTERNAL"};
    if ((int)status < 0 || status >= GF_STATUS_COUNT) return "UNKNOWN";
    return names[status];
}

/* ---- logging ----------------------------------------------------------- */

static GfLogLevel g_log_level = GF_LOG_INFO; /* set once by gf_log_init */

void gf_log_init(GfLogLevel level) { g_log_level = level; }

void gf_log(GfLogLevel level, const char *fmt, ...) {
    if (level < g_log_level) return;
    static const char *tags[] = {"debug", "info", "warn", "error"};
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                     tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, tags[level]);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    /* One fputs per line keeps lines from different threads whole. */
    size_t len = strlen(line);
    line[len] = '\n';
    line[len + 1] = '\0';
    fputs(line, stderr);
}

/* ---- checked arithmetic and allocation --------------------------------- */

int gf_mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) return -1;
    *out = r;
    return 0;
}

int gf_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) return -1;
    *out = r;
    return 0;
}

static _Atomic long g_alloc_budget = -1; /* allocations left before the hook fails them; < 0: off */
static _Atomic long g_alloc_refused;

void gf_alloc_fail_after(long n) {
    atomic_store(&g_alloc_refused, 0);
    atomic_store(&g_alloc_budget, n);
}

long gf_alloc_failures(void) { return atomic_load(&g_alloc_refused); }

/* 1 when the test hook refuses this allocation. */
int gf_alloc_hook_refuses(void) {
    long left = atomic_load(&g_alloc_budget);
    while (left >= 0) {
        if (left == 0) {
            atomic_fetch_add(&g_alloc_refused, 1);
            return 1;
        }
        if (atomic_compare_exchange_weak(&g_alloc_budget, &left, left - 1)) return 0;
    }
    return 0;
}

void *gf_malloc(size_t n, GfError *err) {
    void *p = gf_alloc_hook_refuses() ? NULL : malloc(n ? n : 1);
    if (!p) gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory (%zu bytes)", n);
    return p;
}

void *gf_calloc(size_t count, size_t size, GfError *err) {
    void *p = gf_alloc_hook_refuses() ? NULL : calloc(count ? count : 1, size ? size : 1);
    if (!p) gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
    return p;
}

void *gf_realloc(void *p, size_t n, GfError *err) {
    void *q = gf_alloc_hook_refuses() ? NULL : realloc(p, n ? n : 1);
    if (!q) gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory (%zu bytes)", n);
    return q;
}

char *gf_strdup(const char *s, GfError *err) {
    size_t n = strlen(s) + 1;
    char *p = gf_malloc(n, err);
    if (p) memcpy(p, s, n);
    return p;
}

int gf_write_all(int fd, const void *buf, uint64_t n) {
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : (size_t)n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            return -1;
        }
        p += w;
        n -= (uint64_t)w;
    }
    return 0;
}

char *gf_read_file(const char *path, size_t max, const char *what, size_t *len, GfError *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (errno == ENOENT || errno == ENOTDIR) gf_error_set(err, GF_NOT_FOUND, "file_not_found", NULL, "%s does not exist", what);
        else gf_error_set(err, GF_IO, "io_error", NULL, "cannot open %s: %s", what, strerror(errno));
        return NULL;
    }
    char *b = malloc(max + 1);
    size_t n = b ? fread(b, 1, max + 1, f) : 0;
    int failed = b && ferror(f);
    fclose(f);
    if (!b) { gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory reading %s", what); return NULL; }
    if (failed) { free(b); gf_error_set(err, GF_IO, "io_error", NULL, "cannot read %s", what); return NULL; }
    if (n > max) {
        free(b);
        gf_error_set(err, GF_TOO_LARGE, "file_too_large", NULL, "%s is larger than %zu bytes", what, max);
        return NULL;
    }
    b[n] = '\0';
    if (len) *len = n;
    return b;
}

/* ---- arena ------------------------------------------------------------- */

struct GfArenaBlock {
    GfArenaBlock *next;
    size_t cap, used;
    _Alignas(16) unsigned char data[];
};

void gf_arena_init(GfArena *arena, size_t limit) {
    arena->head = NULL;
    arena->used_total = 0;
    arena->limit = limit;
}

void *gf_arena_alloc(GfArena *arena, size_t n, GfError *err) {
    size_t need = (n + 15) & ~(size_t)15;
    if (need < n || (arena->limit && arena->used_total + need > arena->limit)) {
        gf_error_set(err, GF_TOO_LARGE, "request_too_large", NULL, "request needs too much memory");
        return NULL;
    }
    GfArenaBlock *b = arena->head;
    if (!b || b->cap - b->used < need) {
        size_t cap = need > 16384 ? need : 16384;
        b = malloc(sizeof *b + cap);
        if (!b) {
            gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
            return NULL;
        }
        b->cap = cap;
        b->used = 0;
        b->next = arena->head;
        arena->head = b;
    }
    void *p = b->data + b->used;
    b->used += need;
    arena->used_total += need;
    memset(p, 0, n);
    return p;
}

char *gf_arena_strndup(GfArena *arena, const char *s, size_t n, GfError *err) {
    char *p = gf_arena_alloc(arena, n + 1, err);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

void gf_arena_free(GfArena *arena) {
    GfArenaBlock *b = arena->head;
    while (b) {
        GfArenaBlock *next = b->next;
        free(b);
        b = next;
    }
    arena->head = NULL;
    arena->used_total = 0;
}

/* ---- misc -------------------------------------------------------------- */

int64_t gf_time_unix(void) { return (int64_t)time(NULL); }

double gf_time_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int gf_random_bytes(void *buf, size_t n) {
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t r = getrandom(p, n, 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

void gf_strlcpy(char *dst, const char *src, size_t cap) {
    if (cap == 0) return;
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

uint64_t gf_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t gf_splitmix64(uint64_t *state) { return gf_mix64(*state += 0x9E3779B97F4A7C15ull); }

void gf_hex(const uint8_t *bytes, size_t n, char *out) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

int gf_utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) { i++; continue; }
        size_t len;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; min = 0x80; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; min = 0x800; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; min = 0x10000; }
        else return 0;
        if (n - i < len) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += len;
    }
    return 1;
}
