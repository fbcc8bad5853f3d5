/* fuzz_json.c - the strict JSON front (request bodies, JSONL lines,
 * configs), and the readers of the JSON configs behind it: the model's
 * config.json and an adapter's adapter_config.json. */
#include "adapter_check.h"
#include "config.h"
#include "jsoncheck.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    GfError err;
    cJSON *j = json_parse_strict((const char *)data, size, "fuzz", &err);
    cJSON_Delete(j);
    if (!j) return 0; /* both readers start with the strict parser */
    GemmaConfig cfg;
    if (gemma_config_parse((const char *)data, size, &cfg, &err) == GF_OK) gemma_config_free(&cfg);
    AdapterInfo info;
    adapter_check((const char *)data, size, NULL, 0, 256, NULL, &info, &err);
    return 0;
}
