/* tar_stream.c - several files as one ustar download stream. */
#include "tar_stream.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tar.h"

typedef struct {
    int fd;
    uint64_t size;
    uint64_t start;             /* offset of its header in the stream */
    uint8_t hdr[512];
} Member;

typedef struct {
    int n;
    uint64_t total;             /* every member, then two zero blocks */
    Member m[];
} TarStream;

static uint64_t padded(uint64_t n) { return (n + 511) & ~(uint64_t)511; }

/* The member whose header, data or padding holds pos; n when in the end blocks. */
static int member_at(const TarStream *t, uint64_t pos) {
    int i = 0;
    while (i < t->n && pos >= t->m[i].start + 512 + padded(t->m[i].size)) i++;
    return i;
}

static ssize_t tar_stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    TarStream *t = cls;
    size_t n = 0;
    while (n < max && pos < t->total) {
        int i = member_at(t, pos);
        size_t take, room = max - n;
        if (i == t->n) { /* the end-of-archive blocks */
            take = t->total - pos < room ? (size_t)(t->total - pos) : room;
            memset(buf + n, 0, take);
        } else {
            const Member *m = &t->m[i];
            uint64_t rel = pos - m->start, end = 512 + padded(m->size);
            if (rel < 512) {
                take = (size_t)(512 - rel) < room ? (size_t)(512 - rel) : room;
                memcpy(buf + n, m->hdr + rel, take);
            } else if (rel - 512 < m->size) {
                uint64_t left = m->size - (rel - 512);
                take = left < room ? (size_t)left : room;
                ssize_t r = pread(m->fd, buf + n, take, (off_t)(rel - 512));
                if (r <= 0) return -1;
                take = (size_t)r;
            } else {
                take = end - rel < room ? (size_t)(end - rel) : room;
                memset(buf + n, 0, take);
            }
        }
        n += take;
        pos += take;
    }
    return (ssize_t)n;
}

static void tar_stream_free(void *cls) {
    TarStream *t = cls;
    for (int i = 0; i < t->n; i++)
        if (t->m[i].fd >= 0) close(t->m[i].fd);
    free(t);
}

GfStatus tar_stream_reply(HttpResp *resp, const char *const *paths, const char *const *names, int n, int64_t mtime,
                          const char *download, const char *missing, GfError *err) {
    TarStream *t = gf_calloc(1, sizeof *t + (size_t)n * sizeof t->m[0], err);
    if (!t) return GF_NO_MEMORY;
    for (int i = 0; i < n; i++) t->m[i].fd = -1;
    t->n = n;
    for (int i = 0; i < n; i++) {
        struct stat sb;
        Member *m = &t->m[i];
        m->fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (m->fd < 0 || fstat(m->fd, &sb) != 0 || tar_header_write(m->hdr, names[i], (uint64_t)sb.st_size, mtime) != 0) {
            tar_stream_free(t);
            return gf_error_set(err, GF_NOT_FOUND, missing, NULL, "%.100s is missing", names[i]);
        }
        m->size = (uint64_t)sb.st_size;
        m->start = t->total;
        t->total += 512 + padded(m->size);
    }
    t->total += 1024;
    resp->status = 200;
    snprintf(resp->content_type, sizeof resp->content_type, "application/x-tar");
    snprintf(resp->content_disposition, sizeof resp->content_disposition, "attachment; filename=\"%.100s.tar\"", download);
    resp->stream = tar_stream_read;
    resp->stream_cls = t;
    resp->stream_free = tar_stream_free;
    resp->stream_size = t->total;
    return GF_OK;
}

/* ---- one file ------------------------------------------------------------- */

typedef struct {
    int fd;
    uint64_t size;
} FileStream;

static ssize_t file_stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    FileStream *f = cls;
    if (pos >= f->size) return 0;
    size_t want = f->size - pos < max ? (size_t)(f->size - pos) : max;
    ssize_t r = pread(f->fd, buf, want, (off_t)pos);
    return r <= 0 ? -1 : r;
}

static void file_stream_free(void *cls) {
    FileStream *f = cls;
    close(f->fd);
    free(f);
}

GfStatus file_stream_reply(HttpResp *resp, const char *path, const char *content_type, const char *download,
                           const char *missing, GfError *err) {
    FileStream *f = gf_calloc(1, sizeof *f, err);
    if (!f) return GF_NO_MEMORY;
    struct stat sb;
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0 || fstat(f->fd, &sb) != 0) {
        if (f->fd >= 0) close(f->fd);
        free(f);
        return gf_error_set(err, GF_NOT_FOUND, missing, NULL, "%.100s is missing", download);
    }
    f->size = (uint64_t)sb.st_size;
    resp->status = 200;
    snprintf(resp->content_type, sizeof resp->content_type, "%s", content_type);
    snprintf(resp->content_disposition, sizeof resp->content_disposition, "attachment; filename=\"%.100s\"", download);
    resp->stream = file_stream_read;
    resp->stream_cls = f;
    resp->stream_free = file_stream_free;
    resp->stream_size = f->size;
    return GF_OK;
}
