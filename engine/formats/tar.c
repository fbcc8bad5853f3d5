/* tar.c - strict tar index (ustar, GNU long names, pax path/size). */
#include "tar.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512

static GfStatus bad(GfError *err, const char *what, const char *name) {
    return gf_error_set(err, GF_INVALID, "invalid_archive", "images",
                        "images archive: %s%s%.100s%s", what, name ? " ('" : "", name ? name : "",
                        name ? "')" : "");
}

/* Octal field (NUL/space terminated) or GNU base-256. -1 on garbage. */
static int parse_num(const uint8_t *f, size_t n, uint64_t *out) {
    uint64_t v = 0;
    if (f[0] & 0x80) { /* base-256, big-endian */
        if (f[0] != 0x80) return -1; /* negative or too big */
        for (size_t i = 1; i < n; i++) {
            if (v >> 56) return -1;
            v = v << 8 | f[i];
        }
        *out = v;
        return 0;
    }
    size_t i = 0;
    while (i < n && f[i] == ' ') i++;
    int digits = 0;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++, digits++) {
        if (v >> 60) return -1;
        v = v << 3 | (uint64_t)(f[i] - '0');
    }
    for (; i < n; i++)
        if (f[i] != ' ' && f[i] != '\0') return -1;
    if (!digits) return -1;
    *out = v;
    return 0;
}

static int checksum_ok(const uint8_t *h) {
    uint64_t want;
    if (parse_num(h + 148, 8, &want)) return 0;
    uint64_t sum = 0;
    for (int i = 0; i < BLOCK; i++) sum += (i >= 148 && i < 156) ? ' ' : h[i];
    return sum == want;
}

int tar_name_normalize(char *name) {
    while (name[0] == '.' && name[1] == '/') memmove(name, name + 2, strlen(name + 2) + 1);
    size_t n = strlen(name);
    if (n == 0 || n > TAR_NAME_MAX || name[0] == '/') return -1;
    if (!gf_utf8_valid(name, n)) return -1;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x20 || name[i] == 0x7f || name[i] == '\\') return -1;
    /* every component must be non-empty and not "." or ".." */
    const char *p = name;
    for (;;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 0 && slash) return -1;
        if ((len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.')) return -1;
        if (!slash) break;
        p = slash + 1;
        if (!*p) break; /* trailing slash: a directory name */
    }
    return 0;
}

static GfStatus read_at(int fd, void *buf, size_t n, uint64_t off, GfError *err) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "images archive: read failed");
        if (r == 0) return bad(err, "truncated archive", NULL);
        done += (size_t)r;
    }
    return GF_OK;
}

/* pax records "LEN key=value\n"; we honour path and size. */
static GfStatus parse_pax(const char *d, size_t n, char *path, size_t path_cap, uint64_t *size,
                          int *has_size, GfError *err) {
    size_t i = 0;
    while (i < n) {
        size_t len = 0, j = i;
        while (j < n && d[j] >= '0' && d[j] <= '9' && len < 1000000) len = len * 10 + (size_t)(d[j++] - '0');
        if (j >= n || d[j] != ' ' || len == 0 || len > n - i || d[i + len - 1] != '\n')
            return bad(err, "malformed pax header", NULL);
        const char *kv = d + j + 1, *end = d + i + len - 1;
        const char *eq = memchr(kv, '=', (size_t)(end - kv));
        if (!eq) return bad(err, "malformed pax record", NULL);
        size_t klen = (size_t)(eq - kv), vlen = (size_t)(end - eq - 1);
        if (klen == 4 && memcmp(kv, "path", 4) == 0) {
            if (vlen >= path_cap || memchr(eq + 1, '\0', vlen)) return bad(err, "pax path too long", NULL);
            memcpy(path, eq + 1, vlen);
            path[vlen] = '\0';
        } else if (klen == 4 && memcmp(kv, "size", 4) == 0) {
            char tmp[32];
            if (vlen == 0 || vlen >= sizeof tmp) return bad(err, "bad pax size", NULL);
            memcpy(tmp, eq + 1, vlen);
            tmp[vlen] = '\0';
            char *e;
            errno = 0;
            unsigned long long v = strtoull(tmp, &e, 10);
            if (*e || errno || tmp[0] == '-') return bad(err, "bad pax size", NULL);
            *size = v;
            *has_size = 1;
        } else if ((klen == 8 && memcmp(kv, "linkpath", 8) == 0)) {
            return bad(err, "links are not allowed", NULL);
        }
        i += len;
    }
    return GF_OK;
}

static int cmp_member(const void *a, const void *b) {
    return strcmp(((const TarMember *)a)->name, ((const TarMember *)b)->name);
}

/* Reads a metadata member ('L' or 'x') into a buffer of at most 64 KiB. */
static GfStatus read_meta(TarIndex *t, uint64_t off, uint64_t size, char **out, GfError *err) {
    if (size > 65536) return bad(err, "extended header too large", NULL);
    char *d = gf_malloc((size_t)size + 1, err);
    if (!d) return GF_NO_MEMORY;
    if (read_at(t->fd, d, (size_t)size, off, err)) { free(d); return err ? err->status : GF_IO; }
    d[size] = '\0';
    *out = d;
    return GF_OK;
}

static GfStatus add_member(TarIndex *t, size_t *cap, size_t max_members, const char *name,
                           uint64_t off, uint64_t size, GfError *err) {
    if (t->n_members == max_members) return bad(err, "too many members", NULL);
    if (t->n_members == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        TarMember *m = gf_realloc(t->members, nc * sizeof *m, NULL);
        if (!m) return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory");
        t->members = m;
        *cap = nc;
    }
    TarMember *m = &t->members[t->n_members];
    if (!(m->name = gf_strdup(name, err))) return GF_NO_MEMORY;
    m->offset = off;
    m->size = size;
    t->n_members++;
    return GF_OK;
}

static GfStatus build_name(const uint8_t *h, char *name) {
    char base[101], prefix[156];
    memcpy(base, h, 100); base[100] = '\0';
    prefix[0] = '\0';
    if (memcmp(h + 257, "ustar\0", 6) == 0) { memcpy(prefix, h + 345, 155); prefix[155] = '\0'; }
    if (prefix[0]) snprintf(name, TAR_NAME_MAX + 2, "%s/%s", prefix, base);
    else snprintf(name, TAR_NAME_MAX + 2, "%s", base);
    return GF_OK;
}

/* After the end-of-archive marker only zero padding may follow. */
static GfStatus check_zero_tail(TarIndex *t, uint64_t off, GfError *err) {
    uint8_t buf[BLOCK];
    for (; off < t->file_size; off += BLOCK) {
        if (read_at(t->fd, buf, BLOCK, off, err)) return err ? err->status : GF_IO;
        for (int i = 0; i < BLOCK; i++)
            if (buf[i]) return bad(err, "data after the end-of-archive marker", NULL);
    }
    return t->n_members ? GF_OK : bad(err, "no files in archive", NULL);
}

static GfStatus scan(TarIndex *t, size_t max_members, GfError *err) {
    uint8_t h[BLOCK];
    uint64_t off = 0;
    size_t cap = 0;
    char long_name[TAR_NAME_MAX + 2] = "";
    uint64_t pax_size = 0;
    int pax_has_size = 0;
    while (off + BLOCK <= t->file_size) {
        if (read_at(t->fd, h, BLOCK, off, err)) return err ? err->status : GF_IO;
        int zero = 1;
        for (int i = 0; i < BLOCK && zero; i++) zero = h[i] == 0;
        if (zero) return check_zero_tail(t, off + BLOCK, err); /* end-of-archive marker */
        if (!checksum_ok(h)) return bad(err, "bad header checksum", NULL);
        uint64_t size;
        if (parse_num(h + 124, 12, &size)) return bad(err, "bad size field", NULL);
        char type = (char)h[156];
        if (pax_has_size) size = pax_size;
        uint64_t data = off + BLOCK, padded;
        if (gf_add_u64(size, BLOCK - 1, &padded)) return bad(err, "member size overflows", NULL);
        padded &= ~(uint64_t)(BLOCK - 1);
        if (size > t->file_size || data + size > t->file_size) return bad(err, "member runs past the end of the archive", NULL);
        char name[TAR_NAME_MAX + 2];
        if (long_name[0]) snprintf(name, sizeof name, "%s", long_name);
        else build_name(h, name);
        if (type == 'L' || type == 'x') {
            char *meta = NULL;
            GfStatus st = read_meta(t, data, size, &meta, err);
            if (st) return st;
            if (type == 'L') {
                size_t n = strnlen(meta, (size_t)size);
                if (n > TAR_NAME_MAX) { free(meta); return bad(err, "member name too long", NULL); }
                memcpy(long_name, meta, n);
                long_name[n] = '\0';
            } else {
                st = parse_pax(meta, (size_t)size, long_name, sizeof long_name, &pax_size, &pax_has_size, err);
            }
            free(meta);
            if (st) return st;
            off = data + padded;
            continue;
        }
        long_name[0] = '\0';
        pax_has_size = 0;
        if (type == 'g') { off = data + padded; continue; }
        if (type == '1' || type == '2' || type == 'K') return bad(err, "links are not allowed", name);
        if (type != '0' && type != '\0' && type != '5' && type != '7')
            return bad(err, "only regular files and directories are allowed", name);
        if (tar_name_normalize(name)) return bad(err, "unsafe member name", name);
        size_t nlen = strlen(name);
        if (type == '5' || (nlen && name[nlen - 1] == '/')) { off = data + padded; continue; }
        GfStatus st = add_member(t, &cap, max_members, name, data, size, err);
        if (st) return st;
        off = data + padded;
    }
    if (off < t->file_size || t->n_members == 0)
        return bad(err, t->n_members ? "truncated archive" : "no files in archive", NULL);
    return GF_OK;
}

GfStatus tar_index_open(const char *path, size_t max_members, TarIndex *t, GfError *err) {
    memset(t, 0, sizeof *t);
    t->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (t->fd < 0) return gf_error_set(err, GF_IO, "io_error", NULL, "images archive: cannot open");
    struct stat sb;
    if (fstat(t->fd, &sb) != 0) { tar_index_close(t); return gf_error_set(err, GF_IO, "io_error", NULL, "images archive: stat failed"); }
    t->file_size = (uint64_t)sb.st_size;
    if (t->file_size == 0 || t->file_size % BLOCK) {
        tar_index_close(t);
        return bad(err, t->file_size ? "size is not a multiple of 512 (not a tar file?)" : "empty archive", NULL);
    }
    GfStatus st = scan(t, max_members, err);
    if (!st) {
        qsort(t->members, t->n_members, sizeof *t->members, cmp_member);
        for (size_t i = 1; i < t->n_members; i++)
            if (strcmp(t->members[i - 1].name, t->members[i].name) == 0) {
                st = bad(err, "duplicate member", t->members[i].name);
                break;
            }
    }
    if (st) tar_index_close(t);
    return st;
}

void tar_index_close(TarIndex *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n_members; i++) free(t->members[i].name);
    free(t->members);
    if (t->fd > 0) close(t->fd);
    memset(t, 0, sizeof *t);
    t->fd = -1;
}

long tar_find(const TarIndex *t, const char *name) {
    size_t lo = 0, hi = t->n_members;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(t->members[mid].name, name);
        if (c == 0) return (long)mid;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

GfStatus tar_read_member(const TarIndex *t, size_t i, uint64_t max_bytes, uint8_t **out, GfError *err) {
    const TarMember *m = &t->members[i];
    if (m->size > max_bytes)
        return gf_error_set(err, GF_TOO_LARGE, "image_too_large", NULL,
                            "image '%.100s' is %llu bytes, over the cap of %llu", m->name,
                            (unsigned long long)m->size, (unsigned long long)max_bytes);
    uint8_t *buf = gf_malloc((size_t)m->size, err);
    if (!buf) return GF_NO_MEMORY;
    if (read_at(t->fd, buf, (size_t)m->size, m->offset, err)) { free(buf); return err ? err->status : GF_IO; }
    *out = buf;
    return GF_OK;
}

GfStatus tar_read_prefix(const TarIndex *t, size_t i, size_t max, uint8_t **out, size_t *n, GfError *err) {
    const TarMember *m = &t->members[i];
    size_t len = m->size < (uint64_t)max ? (size_t)m->size : max;
    uint8_t *buf = gf_malloc(len ? len : 1, err);
    if (!buf) return GF_NO_MEMORY;
    if (len && read_at(t->fd, buf, len, m->offset, err)) { free(buf); return err ? err->status : GF_IO; }
    *out = buf;
    *n = len;
    return GF_OK;
}

int tar_header_write(uint8_t h[512], const char *name, uint64_t size, int64_t mtime) {
    size_t n = strlen(name);
    if (n > 100 || size > 077777777777ull) return -1;
    mtime = mtime > 0 && mtime <= 077777777777ll ? mtime : 0;
    memset(h, 0, 512);
    memcpy(h, name, n);
    snprintf((char *)h + 100, 8, "%07o", 0644);
    snprintf((char *)h + 108, 8, "%07o", 0);
    snprintf((char *)h + 116, 8, "%07o", 0);
    snprintf((char *)h + 124, 12, "%011llo", (unsigned long long)size & 077777777777ull);
    snprintf((char *)h + 136, 12, "%011llo", (unsigned long long)mtime & 077777777777ull);
    h[156] = '0';
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++) sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum);
    h[155] = ' ';
    return 0;
}
