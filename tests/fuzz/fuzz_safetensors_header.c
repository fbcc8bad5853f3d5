/* fuzz_safetensors_header.c - the strict safetensors reader, and the PEFT
 * adapter checks on top of it, on arbitrary bytes. */
#include "adapter_check.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    SafeTensors st;
    GfError err;
    if (safetensors_parse(data, size, &st, &err) == GF_OK) {
        for (size_t i = 0; i < st.n_tensors; i++) (void)st.tensors[i].data[st.tensors[i].n_bytes ? st.tensors[i].n_bytes - 1 : 0];
        safetensors_close(&st);
    }
    static const char cfg[] = "{\"peft_type\":\"LORA\",\"r\":4,\"lora_alpha\":8,\"target_modules\":\"all-linear\"}";
    AdapterInfo info;
    adapter_check(cfg, sizeof cfg - 1, data, size, 256, NULL, &info, &err);
    return 0;
}
