/* gguf.h - the GGUF file format (version 3) of ggml / llama.cpp: a strict
 * reader and a streaming writer.
 *
 * Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count; the
 * metadata as (string key, u32 type, value) with strings as u64 length +
 * bytes and arrays as (u32 element type, u64 count, elements); the tensor
 * infos as (string name, u32 n_dims, u64 ne[n_dims] (ne[0] the contiguous
 * dimension), u32 ggml type, u64 offset); padding to the alignment
 * (general.alignment, default 32); the tensor data, each tensor at its
 * offset from the data start, aligned.
 *
 * Reader: every count and length is checked against the bytes left before
 * anything is allocated; keys and names are non-empty UTF-8 (at most 65,535
 * bytes), keys unique, names unique; value types known, arrays of arrays
 * refused; 1 to 4 dims, each >= 1, known tensor types whose first dim is a
 * multiple of their block size; offsets aligned, inside the data, tensors
 * not overlapping. Errors: GF_INVALID with code "invalid_gguf" and a message
 * naming the key or tensor; GF_NO_MEMORY; GF_IO (gguf_open).
 *
 * Writer: metadata and tensor infos are collected in memory, then the
 * header is written and the caller puts each tensor's bytes in order, in
 * pieces of any size; the writer pads between tensors and checks every
 * size. The file appears at its path on commit only (written to a
 * temporary name, fsync, rename). Errors: GF_NO_SPACE / GF_IO, GF_INTERNAL
 * for bytes that do not match the announced tensors.
 *
 * Ownership: a Gguf owns its tables; values and data point into the
 * caller's bytes (gguf_parse) or its own mapping (gguf_open). A GgufWriter
 * owns everything it collects. Neither is shared between threads.
 */
#ifndef GF_GGUF_H
#define GF_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"

/* metadata value types */
enum {
    GGUF_U8 = 0, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY,
    GGUF_U64, GGUF_I64, GGUF_F64, GGUF_TYPE_COUNT
};

/* the ggml tensor types this project reads and writes */
typedef enum { GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q8_0 = 8, GGML_BF16 = 30 } GgmlType;

#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define QK4_0 32
#define QK8_0 32

/* Bytes of n elements (n a multiple of the block size) of type t; 0 for an
 * unknown type. Block size of t (1 for plain types). */
uint64_t ggml_type_bytes(GgmlType t, uint64_t n);
int ggml_type_block(GgmlType t);
const char *ggml_type_name(GgmlType t);
/* The type named "f32", "f16", "bf16", "q8_0" or "q4_0"; -1 for another name. */
int ggml_type_from_name(const char *name, GgmlType *out);

/* ---- reading ------------------------------------------------------------ */

typedef struct {
    const char *key;            /* not NUL-terminated: key_len bytes */
    size_t key_len;
    uint32_t type;              /* GGUF_* */
    uint32_t arr_type;          /* element type when type == GGUF_ARRAY */
    uint64_t n;                 /* elements of an array (1 otherwise) */
    const uint8_t *val;         /* the value's bytes (for an array: its first element) */
} GgufKv;

typedef struct {
    char *name;                 /* NUL-terminated, owned */
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* unused dims are 1 */
    GgmlType type;
    uint64_t offset, n_bytes;
    const uint8_t *data;
} GgufTensor;

typedef struct {
    uint32_t version;
    uint32_t alignment;
    GgufKv *kv;
    size_t n_kv;
    GgufTensor *tensors;
    size_t n_tensors;
    const uint8_t *data;        /* start of the tensor data */
    uint64_t data_size;
    void *map;                  /* gguf_open's mapping, else NULL */
    size_t map_size;
} Gguf;

GfStatus gguf_parse(const uint8_t *bytes, uint64_t size, Gguf *g, GfError *err);
GfStatus gguf_open(const char *path, Gguf *g, GfError *err);
void gguf_close(Gguf *g);

const GgufKv *gguf_find(const Gguf *g, const char *key);
const GgufTensor *gguf_tensor(const Gguf *g, const char *name);
/* Scalar values (0 when the type does not match). Strings: *len bytes, not
 * NUL-terminated. Element i of an array of strings likewise (walks the
 * array: O(i)). */
int gguf_get_u32(const GgufKv *kv, uint32_t *out);
int gguf_get_f32(const GgufKv *kv, float *out);
const char *gguf_get_str(const GgufKv *kv, uint64_t *len);
const char *gguf_arr_str(const GgufKv *kv, uint64_t i, uint64_t *len);

/* ---- writing ------------------------------------------------------------ */

typedef struct GgufWriter GgufWriter;

GgufWriter *gguf_writer_new(GfError *err);
void gguf_writer_free(GgufWriter *w);   /* also aborts an open file */

/* Metadata, in the order added; a failed allocation is reported by
 * gguf_writer_open. */
void gguf_kv_u32(GgufWriter *w, const char *key, uint32_t v);
void gguf_kv_i32(GgufWriter *w, const char *key, int32_t v);
void gguf_kv_f32(GgufWriter *w, const char *key, float v);
void gguf_kv_bool(GgufWriter *w, const char *key, int v);
void gguf_kv_str(GgufWriter *w, const char *key, const char *v, size_t len);
void gguf_kv_arr_i32(GgufWriter *w, const char *key, const int32_t *v, uint64_t n);
void gguf_kv_arr_f32(GgufWriter *w, const char *key, const float *v, uint64_t n);
void gguf_kv_arr_bool(GgufWriter *w, const char *key, const uint8_t *v, uint64_t n);
/* strs[i] of lens[i] bytes */
void gguf_kv_arr_str(GgufWriter *w, const char *key, const char *const *strs, const size_t *lens, uint64_t n);

/* A tensor of n_dims dims ne[] (ne[0] contiguous) and type t. */
GfStatus gguf_add_tensor(GgufWriter *w, const char *name, uint32_t n_dims, const uint64_t *ne, GgmlType t, GfError *err);

/* Writes the header to path's temporary file; then gguf_put the tensors'
 * bytes in the order added; gguf_commit publishes the file. */
GfStatus gguf_writer_open(GgufWriter *w, const char *path, GfError *err);
GfStatus gguf_put(GgufWriter *w, const void *bytes, uint64_t n, GfError *err);
GfStatus gguf_commit(GgufWriter *w, GfError *err);

/* ---- quantization (ggml's reference rounding) ------------------------------ */

/* n (a multiple of 32) floats into n/32 blocks of Q8_0 (34 bytes each) or
 * Q4_0 (18 bytes each). */
void gguf_quantize_q8_0(const float *x, int64_t n, uint8_t *out);
void gguf_quantize_q4_0(const float *x, int64_t n, uint8_t *out);

#endif
