/* dataset.h - validation of an uploaded fine-tuning dataset: a JSONL file of
 * conversations plus an optional tar archive of the images they reference.
 *
 * Each line must be a JSON object {"messages":[...]} where every message has
 * a role (system first only, user, assistant) and content that is a non-empty
 * string or a non-empty list of parts: {"type":"text","text":...},
 * {"type":"image","image":<archive path | data URL>} or OpenAI's
 * {"type":"image_url","image_url":{"url":<data URL>}}. At least one assistant
 * turn; no image in assistant or system turns; at most max_images_per_example
 * images; every image resolved (archive member or inline data URL; remote
 * URLs are refused, nothing on the server's disk is ever named) and decoded
 * under the image caps. Blank lines are skipped (they keep their number);
 * a UTF-8 byte-order mark at the start and CRLF line ends are accepted.
 *
 * The report lists every bad line with its 1-based number, a stable code and
 * a reason (the first problem found on that line). The lengths in tokens
 * need the model (its tokenizer, chat template and image budget):
 * trainset_measure (trainset.h) checks them once this validation passed.
 *
 * Ownership: DatasetReport owns its issue array (dataset_report_free).
 * Thread-safe: no shared state.
 */
#ifndef GF_DATASET_H
#define GF_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "base.h"
#include "image.h"

typedef struct {
    uint64_t max_line_bytes;        /* longer lines are reported, never buffered */
    uint64_t min_examples;
    uint64_t max_examples;          /* over it: GF_TOO_LARGE dataset_too_large */
    uint32_t max_images_per_example;
    uint32_t max_archive_members;
    uint32_t max_issues_kept;       /* report at most this many lines in detail */
    int n_threads;                  /* lines checked in that many ranges at once; <= 0: by the
                                       cores (up to 8) and the file's size (a range per 16 KiB) */
    ImageLimits image;
} DatasetLimits;

typedef struct {
    uint64_t line;                  /* 1-based; 0 = about the whole file */
    char code[48];
    char message[240];
} DatasetIssue;

typedef struct {
    uint64_t n_lines;               /* lines read, blank ones included */
    uint64_t n_examples;            /* valid examples */
    uint64_t n_images;              /* image references that decoded */
    uint64_t n_bad_lines;           /* every bad line, even past max_issues_kept */
    DatasetIssue *issues;
    size_t n_issues;
} DatasetReport;

/* Fills limits with the defaults documented in README (8 MiB lines, 10 to
 * 1,000,000 examples, 10 images per example, 20 MiB and 50 MP per image). */
void dataset_limits_default(DatasetLimits *limits);

/* Validates the JSONL at jsonl_path against the archive at tar_path (NULL
 * when none was uploaded). Returns GF_OK when every line is valid,
 * GF_UNPROCESSABLE when the report lists bad lines (or too few examples),
 * GF_INVALID (code invalid_archive) for a bad archive, GF_TOO_LARGE for too
 * many examples, GF_IO on read failure. The report is filled in every case. */
GfStatus dataset_validate(const char *jsonl_path, const char *tar_path, const DatasetLimits *limits,
                          DatasetReport *report, GfError *err);

void dataset_report_free(DatasetReport *report);

/* Adds an issue about line (0: the whole file) to report, counting every bad
 * line but keeping at most max_kept in detail (the array is allocated for
 * max_kept at the first one). GF_NO_MEMORY when it cannot be allocated. */
GfStatus dataset_report_add(DatasetReport *report, uint64_t line, const char *code, const char *message, size_t max_kept);

/* Strict RFC 4648 base64 decode of s[0..n) (padding required, no
 * whitespace) into a new buffer. Returns NULL with err set. */
uint8_t *base64_decode_strict(const char *s, size_t n, size_t *out_len, GfError *err);

/* Splits a data URL "data:<mime>;base64,<b64>" into its mime type and payload
 * and decodes it. *mime points into url. */
GfStatus data_url_decode(const char *url, const char **mime, size_t *mime_len, uint8_t **bytes,
                         size_t *n_bytes, uint64_t max_bytes, GfError *err);

#endif
