/* static_files.h - serves the dashboard's files from web/: "/" is
 * index.html, "/<name>.<ext>" a top-level file with a known extension
 * (html, css, js, svg, png, ico, json). Names are matched against
 * [a-z0-9_.-] before anything touches the filesystem, so no path escapes and
 * no directory listing exist. Responses carry the right content type, a
 * Content-Security-Policy that allows only the dashboard's own scripts, and
 * Cache-Control: no-cache with an ETag (size and modification time), so a
 * browser revalidates each time and gets 304 when nothing changed.
 * Thread-safe.
 */
#ifndef GF_STATIC_FILES_H
#define GF_STATIC_FILES_H

#include "http.h"

/* 1 when (method, url) is a static file route. */
int static_files_match(const char *method, const char *url);

/* Fills resp with the file, a 304 when if_none_match (may be NULL) is its
 * current ETag, or a 404. */
void static_files_serve(const char *web_dir, const char *url, const char *if_none_match, HttpResp *resp);

#endif
