/* fsutil.h - durable file operations for the data directory: fsync of files
 * and directories, atomic directory publication, recursive removal of
 * server-created trees. Paths passed here are always built by the server
 * from generated ids or validated names, never taken from a request.
 * Thread-safe. Errors: GF_NO_SPACE on ENOSPC/EDQUOT, GF_IO otherwise.
 */
#ifndef GF_FSUTIL_H
#define GF_FSUTIL_H

#include "base.h"

/* The error of a failed system call from errno: GF_NO_SPACE
 * (insufficient_storage) on ENOSPC/EDQUOT, else GF_IO naming what failed. */
GfStatus fs_io_error(GfError *err, const char *what);

/* fsync of a file or directory by path. */
GfStatus fs_fsync_path(const char *path, GfError *err);

/* mkdir -p for the data directory's own folders (mode 0700). */
GfStatus fs_mkdirs(const char *path, GfError *err);

/* Moves each src[i] to dir/names[i] (same filesystem), fsyncs each file and
 * dir, then renames dir to final and fsyncs the parent. On failure removes
 * dir; the sources may be gone. */
GfStatus fs_publish(const char *dir, const char *final_dir, const char *const *src,
                    const char *const *names, int n, GfError *err);

/* rm -rf of a server-created tree; does not follow symlinks. 0 or -1. */
int fs_remove_tree(const char *path);

#endif
