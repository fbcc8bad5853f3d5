/* static.c - the dashboard's static files. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "reply.h"
#include "static_files.h"

static const struct { const char *ext, *type; } TYPES[] = {
    {".html", "text/html; charset=utf-8"}, {".css", "text/css; charset=utf-8"},
    {".js", "text/javascript; charset=utf-8"}, {".svg", "image/svg+xml"}, {".png", "image/png"},
    {".ico", "image/x-icon"}, {".json", "application/json"}, {NULL, NULL}};

static const char *type_of(const char *name) {
    const char *dot = strrchr(name, '.');
    for (int i = 0; dot && TYPES[i].ext; i++)
        if (strcmp(dot, TYPES[i].ext) == 0) return TYPES[i].type;
    return NULL;
}

static int safe_name(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > 64 || s[0] == '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') || s[i] == '_' || s[i] == '-' || s[i] == '.'))
            return 0;
    return strstr(s, "..") == NULL && type_of(s) != NULL;
}

int static_files_match(const char *method, const char *url) {
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) return 0;
    return strcmp(url, "/") == 0 || (url[0] == '/' && safe_name(url + 1));
}

void static_files_serve(const char *web_dir, const char *url, const char *if_none_match, HttpResp *resp) {
    const char *name = strcmp(url, "/") == 0 ? "index.html" : url + 1;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", web_dir, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size > 16 * 1024 * 1024) {
        if (fd >= 0) close(fd);
        reply_fail(resp, GF_NOT_FOUND, "not_found", NULL, "no such file");
        return;
    }
    snprintf(resp->etag, sizeof resp->etag, "\"%llx-%llx-%lx\"", (unsigned long long)sb.st_size,
             (unsigned long long)sb.st_mtim.tv_sec, (long)sb.st_mtim.tv_nsec);
    snprintf(resp->content_type, sizeof resp->content_type, "%s", type_of(name));
    if (if_none_match && strcmp(if_none_match, resp->etag) == 0) {
        close(fd);
        resp->status = 304;
        return;
    }
    char *buf = malloc((size_t)sb.st_size + 1);
    ssize_t r = buf ? read(fd, buf, (size_t)sb.st_size) : -1;
    close(fd);
    if (r != sb.st_size) {
        free(buf);
        reply_fail(resp, GF_IO, "io_error", NULL, "cannot read the file");
        return;
    }
    resp->status = 200;
    resp->body = buf;
    resp->body_len = (size_t)sb.st_size;
    snprintf(resp->content_type, sizeof resp->content_type, "%s", type_of(name));
}
