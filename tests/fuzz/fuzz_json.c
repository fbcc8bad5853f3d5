/* fuzz_json.c - the strict JSON front (request bodies, JSONL lines, configs). */
#include "jsoncheck.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    GfError err;
    cJSON *j = json_parse_strict((const char *)data, size, "fuzz", &err);
    cJSON_Delete(j);
    return 0;
}
