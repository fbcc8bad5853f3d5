/* base.h - the floor every layer stands on: status codes, error values,
 * logging, checked allocation and a bump arena.
 *
 * Errors are values: a fallible function takes a caller-owned GfError *err as
 * its last argument, fills it with gf_error_set() and returns a GfStatus (or
 * NULL / -1 with err->status set). The message is for people: it names the
 * field, line or tensor and never contains a filesystem path of the server,
 * SQL text or key material. `param` names the offending request field when
 * there is one ("hyperparameters.epochs", "line 17").
 *
 * Threading: everything here is thread-safe. The log sink and level are the
 * only global state and are set once at start-up (gf_log_init) before any
 * thread starts.
 */
#ifndef GF_BASE_H
#define GF_BASE_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    GF_OK = 0,
    GF_INVALID,       /* bad input from the caller (HTTP 400) */
    GF_UNAUTHORIZED,  /* missing or wrong credential (401) */
    GF_FORBIDDEN,     /* authenticated but not allowed (403) */
    GF_NOT_FOUND,     /* no such object (404) */
    GF_CONFLICT,      /* state does not allow it (409) */
    GF_TOO_LARGE,     /* over a size cap (413) */
    GF_UNSUPPORTED,   /* unsupported media type or format (415) */
    GF_UNPROCESSABLE, /* well-formed but invalid content, e.g. a dataset (422) */
    GF_BUSY,          /* queue full or rate limited (429) */
    GF_NOT_READY,     /* not ready, try later (503) */
    GF_NOT_IMPLEMENTED, /* the feature is not built yet (501) */
    GF_NO_SPACE,      /* disk full (507) */
    GF_NO_MEMORY,     /* allocation failed (500) */
    GF_IO,            /* operating-system I/O failure (500) */
    GF_FORMAT,        /* a file we wrote or trust is corrupt (500) */
    GF_DEVICE,        /* accelerator failure (500) */
    GF_CANCELLED,     /* the operation was cancelled */
    GF_INTERNAL,      /* a bug or an unexpected failure (500) */
    GF_STATUS_COUNT
} GfStatus;

#define GF_ERR_MSG_MAX 512
#define GF_ERR_CODE_MAX 48
#define GF_ERR_PARAM_MAX 96

typedef struct {
    GfStatus status;
    char code[GF_ERR_CODE_MAX];     /* stable snake_case API code, "" = default for status */
    char param[GF_ERR_PARAM_MAX];   /* offending field, "" = none */
    char message[GF_ERR_MSG_MAX];   /* human-readable, no paths, no SQL */
} GfError;

/* Resets err to GF_OK with empty strings. err may be NULL. */
void gf_error_clear(GfError *err);

/* Fills err (if not NULL) and returns status. code and param may be NULL. */
GfStatus gf_error_set(GfError *err, GfStatus status, const char *code,
                      const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Puts the formatted context before err's message ("line 3: " + message),
 * keeping its status and code; param replaces err's when not NULL. The old
 * message is copied before formatting, so err's own fields may be arguments.
 * Returns err's status (GF_INTERNAL if it was GF_OK: wrapping no error is a
 * bug). err may be NULL. */
GfStatus gf_error_wrap(GfError *err, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Name of a status for logs ("INVALID"). Never NULL. */
const char *gf_status_name(GfStatus status);

/* ---- logging ----------------------------------------------------------- */
typedef enum { GF_LOG_DEBUG, GF_LOG_INFO, GF_LOG_WARN, GF_LOG_ERROR } GfLogLevel;

/* Sets the minimum level written to stderr. Call once, before threads start. */
void gf_log_init(GfLogLevel level);
void gf_log(GfLogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define GF_LOGD(...) gf_log(GF_LOG_DEBUG, __VA_ARGS__)
#define GF_LOGI(...) gf_log(GF_LOG_INFO, __VA_ARGS__)
#define GF_LOGW(...) gf_log(GF_LOG_WARN, __VA_ARGS__)
#define GF_LOGE(...) gf_log(GF_LOG_ERROR, __VA_ARGS__)

/* ---- checked arithmetic and allocation --------------------------------- */
/* Return 0 and store the result, or -1 on overflow (*out untouched). */
int gf_mul_u64(uint64_t a, uint64_t b, uint64_t *out);
int gf_add_u64(uint64_t a, uint64_t b, uint64_t *out);

/* malloc/calloc that set err to GF_NO_MEMORY on failure. Free with free(). */
void *gf_malloc(size_t n, GfError *err);
void *gf_calloc(size_t count, size_t size, GfError *err);
/* Test hook, as SQLite's malloc-failure loop: after n more successful
 * allocations, every gf_malloc / gf_calloc / gf_realloc / gf_strdup fails
 * (as out of memory), and so does device memory (every backend's alloc),
 * until it is called again with n < 0. The only global
 * besides the log settings; tests set it while one thread allocates. */
void gf_alloc_fail_after(long n);
/* Allocations refused by the hook since it was last set. */
long gf_alloc_failures(void);
/* 1 when the hook refuses the allocation about to be made (counted as
 * refused): allocators outside this file (device memory) ask it too. */
int gf_alloc_hook_refuses(void);

/* realloc that sets err to GF_NO_MEMORY on failure (p is then untouched). */
void *gf_realloc(void *p, size_t n, GfError *err);
/* strdup that sets err on failure; s must not be NULL. */
char *gf_strdup(const char *s, GfError *err);
/* A whole file of at most max bytes, NUL-terminated (the NUL not counted in
 * *len). `what` names it in messages. Errors: file_not_found (GF_NOT_FOUND),
 * file_too_large (GF_TOO_LARGE), io_error (GF_IO). Caller frees. */
char *gf_read_file(const char *path, size_t max, const char *what, size_t *len, GfError *err);
/* Writes all n bytes of buf to fd (retrying short writes and EINTR): 0, or
 * -1 with errno set (EIO when write wrote nothing). */
int gf_write_all(int fd, const void *buf, uint64_t n);

/* ---- arena ------------------------------------------------------------- */
/* A bump allocator for per-request memory: many allocations, one free.
 * Blocks are chained; nothing is moved, so pointers stay valid until
 * gf_arena_free(). Not thread-safe: one arena per request. */
typedef struct GfArenaBlock GfArenaBlock;
typedef struct {
    GfArenaBlock *head;
    size_t used_total;   /* bytes handed out, for caps */
    size_t limit;        /* 0 = unlimited, else gf_arena_alloc fails past it */
} GfArena;

void gf_arena_init(GfArena *arena, size_t limit);
/* Returns zeroed memory aligned to 16 bytes, or NULL (err set) past the limit
 * or on allocation failure. */
void *gf_arena_alloc(GfArena *arena, size_t n, GfError *err);
char *gf_arena_strndup(GfArena *arena, const char *s, size_t n, GfError *err);
/* Frees every block. Safe on a zeroed or already-freed arena. */
void gf_arena_free(GfArena *arena);

/* ---- misc -------------------------------------------------------------- */
/* Wall-clock seconds since the epoch, and a monotonic clock in seconds. */
int64_t gf_time_unix(void);
double gf_time_mono(void);

/* Fills buf with n cryptographically random bytes (getrandom). 0 or -1. */
int gf_random_bytes(void *buf, size_t n);

/* Copies src into dst[cap] (truncating, always NUL-terminated). */
void gf_strlcpy(char *dst, const char *src, size_t cap);

/* SplitMix64 (Steele et al. 2014): gf_mix64 is its finalizer, a bijective
 * hash of 64 bits (dropout masks hash (seed, element) with it);
 * gf_splitmix64 advances *state by the golden-ratio increment and returns
 * the finalized value (the samplers' and the data order's generator). */
uint64_t gf_mix64(uint64_t z);
uint64_t gf_splitmix64(uint64_t *state);

/* Lowercase hex of n bytes into out (2n+1 bytes incl. NUL). */
void gf_hex(const uint8_t *bytes, size_t n, char *out);

/* 1 if s[0..n) is valid UTF-8 (no overlongs, no surrogates, <= U+10FFFF). */
int gf_utf8_valid(const char *s, size_t n);

#endif /* GF_BASE_H */
