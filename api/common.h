/* common.h - helpers shared by the resource handlers: list paging, display
 * and object name checks, multipart part lookup, list envelopes. Thread-safe;
 * functions named *_or_reply have already written the error response when
 * they return non-OK.
 */
#ifndef GF_API_COMMON_H
#define GF_API_COMMON_H

#include <cjson/cJSON.h>

#include "api.h"
#include "dataset.h"
#include "http.h"
#include "store.h"

#define PAGE_DEFAULT 20
#define PAGE_MAX 100

/* Reads ?limit= (1..100, default 20) and ?after= (an id or name). */
GfStatus paging_or_reply(const HttpReq *req, HttpResp *resp, int *limit, char after[STORE_NAME_MAX]);

/* Display names: 1..256 bytes of UTF-8, no control or bidi-override
 * characters. */
GfStatus check_display_name(const char *name, const char *param, GfError *err);

/* Object names used in URLs and on disk (adapters): [A-Za-z0-9][A-Za-z0-9._-]{0,63},
 * no "..". */
GfStatus check_object_name(const char *name, const char *param, GfError *err);

/* The part named `name`, or NULL. */
const HttpPart *find_part(const HttpReq *req, const char *name);

/* Fails (invalid_multipart) on a part whose name is not in allowed. */
GfStatus only_parts_or_reply(const HttpReq *req, HttpResp *resp, const char *const *allowed);

/* A refused dataset's per-line report: [{line, code, message}] (datasets.c). */
cJSON *dataset_issues_json(const DatasetReport *r);

/* Checks an upload (the JSONL at jsonl, the image archive at tar or NULL)
 * line by line and, when a model is loaded, measures every example in tokens
 * for it (none may be longer than a job can train on); fills row's counts.
 * A refused upload is answered here (422 with every bad line). datasets.c. */
GfStatus dataset_check_or_reply(Api *api, const char *jsonl, const char *tar, DatasetRow *row, HttpResp *resp);

/* {"object":"list","data":data,"has_more":..} */
cJSON *list_envelope(cJSON *data, int has_more);

/* Adds a number, or null when v is NAN / negative sentinel. */
void add_number_or_null(cJSON *o, const char *key, double v);
void add_time_or_null(cJSON *o, const char *key, int64_t t);

#endif
