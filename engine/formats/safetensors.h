/* safetensors.h - strict reader of the safetensors format.
 *
 * Layout: u64 little-endian header length N, N bytes of UTF-8 JSON mapping
 * tensor names to {dtype, shape, data_offsets:[begin,end]} (plus an optional
 * "__metadata__" object of strings), then the data buffer. Every rule of the
 * reference implementation is enforced and a few more: N <= 100 MB and
 * 8 + N <= file size (no overflow), header starts with '{', strict JSON (no
 * duplicate names), known dtypes, shape product x dtype size without
 * overflow, end - begin == byte size, tensors tile the buffer exactly (sorted
 * by offset: first begin 0, each begin == previous end, last end == buffer
 * size), and no zero-size tensor sharing an offset with a non-empty one.
 *
 * Ownership: SafeTensors owns its tensor table; `data` points into the
 * caller's bytes (safetensors_parse) or into a private read-only mapping
 * (safetensors_open), valid until safetensors_close(). Errors: GF_INVALID
 * with code "invalid_safetensors" and a message naming the defect and the
 * tensor; GF_IO / GF_NO_MEMORY for the system. Thread-safe on distinct
 * objects; a parsed file is read-only and may be shared between threads.
 */
#ifndef GF_SAFETENSORS_H
#define GF_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

#define ST_MAX_DIMS 8
#define ST_HEADER_MAX (100u * 1000u * 1000u)
#define ST_NAME_MAX 512

typedef enum {
    ST_F64, ST_F32, ST_F16, ST_BF16, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8,
    ST_BOOL, ST_F8_E4M3, ST_F8_E5M2, ST_U16, ST_U32, ST_U64, ST_DTYPE_COUNT
} StDtype;

typedef struct {
    char *name;                 /* NUL-terminated, owned */
    StDtype dtype;
    int n_dims;
    uint64_t shape[ST_MAX_DIMS];
    uint64_t n_elements;
    uint64_t offset;            /* byte offset inside the data buffer */
    uint64_t n_bytes;
    const uint8_t *data;        /* = buffer + offset */
} StTensor;

typedef struct {
    StTensor *tensors;          /* sorted by offset */
    size_t n_tensors;
    const uint8_t *buffer;      /* start of the data buffer */
    uint64_t buffer_size;
    void *map;                  /* mapping owned by safetensors_open, else NULL */
    size_t map_size;
} SafeTensors;

/* Parses bytes[0..size) (the whole file). On success fills *st and returns
 * GF_OK; bytes must outlive *st. On failure *st is empty. */
GfStatus safetensors_parse(const uint8_t *bytes, uint64_t size, SafeTensors *st, GfError *err);

/* mmaps path read-only and parses it. `what` names the file in messages
 * (never the path itself). */
GfStatus safetensors_open(const char *path, const char *what, SafeTensors *st, GfError *err);

/* Frees the table and the mapping. Safe on a zeroed struct. */
void safetensors_close(SafeTensors *st);

/* Linear lookup by name; NULL when absent. */
const StTensor *safetensors_find(const SafeTensors *st, const char *name);

/* Bytes per element, and the canonical name ("BF16"). */
size_t safetensors_dtype_size(StDtype dtype);
const char *safetensors_dtype_name(StDtype dtype);

/* A tensor to write: data holds n_elements x dtype size bytes. */
typedef struct {
    const char *name;
    StDtype dtype;
    int n_dims;
    uint64_t shape[ST_MAX_DIMS];
    const void *data;
} StWriteTensor;

/* Writes a safetensors file (tensors in the given order, 8-byte aligned
 * header) to path via a temporary file, fsync and rename. */
GfStatus safetensors_write(const char *path, const StWriteTensor *tensors, size_t n, GfError *err);

/* A safetensors file written as a stream: the header (from the tensors'
 * names, dtypes and shapes; their data is not read) goes out first, then
 * the caller puts exactly the announced bytes, tensor after tensor, in
 * pieces of any size. The file is written to "<path>.tmp-XXXXXX" and
 * appears at path only on commit (fsync, rename); any error, or abort,
 * removes it. format, when not NULL, goes into __metadata__ ("pt" is what
 * transformers writes and checks). Errors: GF_NO_SPACE on ENOSPC/EDQUOT,
 * GF_IO otherwise, GF_INTERNAL for more or fewer bytes than announced; the
 * writer is aborted after any error. */
typedef struct {
    int fd;
    uint64_t remaining;         /* data bytes still to put */
    char path[4096], tmp[4112];
} StWriter;

GfStatus st_writer_open(StWriter *w, const char *path, const StWriteTensor *tensors, size_t n, const char *format,
                        GfError *err);
GfStatus st_writer_put(StWriter *w, const void *bytes, uint64_t n, GfError *err);
GfStatus st_writer_commit(StWriter *w, GfError *err);
void st_writer_abort(StWriter *w);

/* Formats a shape as "[4, 32]" into buf. */
void safetensors_shape_str(const uint64_t *shape, int n_dims, char *buf, size_t cap);

#endif
