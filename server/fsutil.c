/* fsutil.c - fsync, publish-by-rename, recursive removal. */
#include "fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

GfStatus fs_io_error(GfError *err, const char *what) {
    int e = errno;
    if (e == ENOSPC || e == EDQUOT)
        return gf_error_set(err, GF_NO_SPACE, "insufficient_storage", NULL, "the server's disk is full");
    return gf_error_set(err, GF_IO, "io_error", NULL, "storage error while %s (%s)", what, strerror(e));
}

GfStatus fs_fsync_path(const char *path, GfError *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return fs_io_error(err, "opening for sync");
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return rc ? fs_io_error(err, "syncing") : GF_OK;
}

GfStatus fs_mkdirs(const char *path, GfError *err) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0700) != 0 && errno != EEXIST) return fs_io_error(err, "creating a directory");
        *p = '/';
    }
    if (mkdir(buf, 0700) != 0 && errno != EEXIST) return fs_io_error(err, "creating a directory");
    return GF_OK;
}

static void parent_of(const char *path, char *out, size_t cap) {
    snprintf(out, cap, "%s", path);
    char *slash = strrchr(out, '/');
    if (slash && slash != out) *slash = '\0';
}

GfStatus fs_publish(const char *dir, const char *final_dir, const char *const *src,
                    const char *const *names, int n, GfError *err) {
    if (mkdir(dir, 0700) != 0) return fs_io_error(err, "creating a directory");
    char path[4096], parent[4096];
    GfStatus st = GF_OK;
    for (int i = 0; i < n && !st; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (rename(src[i], path) != 0) st = fs_io_error(err, "moving an upload");
        else st = fs_fsync_path(path, err);
    }
    if (!st) st = fs_fsync_path(dir, err);
    if (!st && rename(dir, final_dir) != 0) st = fs_io_error(err, "publishing");
    if (!st) {
        parent_of(final_dir, parent, sizeof parent);
        st = fs_fsync_path(parent, err);
        if (st) fs_remove_tree(final_dir);
    }
    if (st) fs_remove_tree(dir);
    return st;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

int fs_remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return errno == ENOENT ? 0 : -1;
    return nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}
