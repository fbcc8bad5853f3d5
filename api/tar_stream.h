/* tar_stream.h - a download of several files as one uncompressed ustar
 * stream (HttpResp.stream), or of one file as it is, read from disk as the
 * client takes it: no file
 * is held in memory, the total size is known up front (Content-Length).
 *
 * Ownership: tar_stream_reply opens every file (a file removed afterwards
 * stays readable through its descriptor) and hands the stream to resp; the
 * server frees it. Names are the members' names (at most 100 bytes).
 */
#ifndef GF_TAR_STREAM_H
#define GF_TAR_STREAM_H

#include <stdint.h>

#include "base.h"
#include "http.h"

/* Fills resp with a 200 application/x-tar stream of paths[i] as names[i],
 * offered as "<download>.tar". GF_NOT_FOUND (code `missing`, naming
 * names[i]) when a file cannot be opened; GF_NO_MEMORY. */
GfStatus tar_stream_reply(HttpResp *resp, const char *const *paths, const char *const *names, int n, int64_t mtime,
                          const char *download, const char *missing, GfError *err);

/* One file as it is (a GGUF export): 200, content_type, offered as
 * `download`. GF_NOT_FOUND (code `missing`) when it cannot be opened. */
GfStatus file_stream_reply(HttpResp *resp, const char *path, const char *content_type, const char *download,
                           const char *missing, GfError *err);

#endif
