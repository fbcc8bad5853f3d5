/* tensor.c - dtype sizes and names. */
#include "tensor.h"

size_t kn_dtype_size(KnDtype t) {
    switch (t) {
    case KN_F32: case KN_I32: return 4;
    case KN_BF16: case KN_F16: return 2;
    case KN_U8: return 1;
    case KN_NF4: return 0;
    }
    return 0;
}

const char *kn_dtype_name(KnDtype t) {
    static const char *names[] = {"f32", "bf16", "f16", "nf4", "i32", "u8"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "unknown";
}
