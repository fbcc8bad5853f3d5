/* tar.h - a strict, read-only index of a POSIX/GNU tar archive.
 *
 * Used for the image archives uploaded with datasets. tar_index_open() reads
 * only headers (never extracts anything to disk) and builds a table of
 * regular-file members: name, offset and size. It refuses what could escape
 * or mislead: absolute names, ".." components, backslashes, control
 * characters, invalid UTF-8, symbolic and hard links, devices and FIFOs,
 * duplicate names, bad header checksums, sizes that run past the end of the
 * file, and more members than the cap. Leading "./" is stripped; directory
 * members are skipped; GNU long names ('L') and pax "path"/"size" records
 * ('x') are honoured.
 *
 * Ownership: TarIndex owns its fd and table until tar_index_close(). Errors:
 * GF_INVALID with code "invalid_archive" naming the member; GF_IO. A TarIndex
 * may be read by one thread at a time (tar_read_member uses pread, so reads
 * are position-independent).
 */
#ifndef GF_TAR_H
#define GF_TAR_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

#define TAR_NAME_MAX 255

typedef struct {
    char *name;          /* normalized member name, owned */
    uint64_t offset;     /* byte offset of the data inside the archive */
    uint64_t size;       /* bytes */
} TarMember;

typedef struct {
    int fd;
    uint64_t file_size;
    TarMember *members;  /* sorted by name */
    size_t n_members;
} TarIndex;

/* Indexes the archive at path (a server-generated path). max_members caps the
 * table. On failure *tar is closed and empty. */
GfStatus tar_index_open(const char *path, size_t max_members, TarIndex *tar, GfError *err);
void tar_index_close(TarIndex *tar);

/* Binary search by exact (normalized) name; -1 when absent. */
long tar_find(const TarIndex *tar, const char *name);

/* Reads member i whole into a new malloc'd buffer (caller frees). Fails with
 * GF_TOO_LARGE when its size exceeds max_bytes, before allocating. */
GfStatus tar_read_member(const TarIndex *tar, size_t i, uint64_t max_bytes, uint8_t **out,
                         GfError *err);

/* Reads the first min(size, max) bytes of member i into a new malloc'd
 * buffer (caller frees), their count in *n: enough to read a file's
 * headers without reading the file. */
GfStatus tar_read_prefix(const TarIndex *tar, size_t i, size_t max, uint8_t **out, size_t *n, GfError *err);

/* Normalizes a member name in place (strips leading "./") and returns 0 when
 * it is a safe relative name, -1 otherwise. Also used to check image
 * references in datasets before they are looked up. */
int tar_name_normalize(char *name);

/* Writes a ustar header for a regular file (mode 0644) into hdr[512].
 * Returns -1 when name is longer than 100 bytes. Used to build downloads. */
int tar_header_write(uint8_t hdr[512], const char *name, uint64_t size, int64_t mtime);

#endif
