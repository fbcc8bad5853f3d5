/* cpu_memory.c - the CPU device's memory is host memory: buffers are
 * 64-byte aligned heap blocks, transfers are memcpy, and work is finished
 * when the op returns. */
#include <stdlib.h>
#include <string.h>

#include "cpu_impl.h"

GfStatus cpu_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err) {
    memset(buf, 0, sizeof *buf);
    void *p = NULL;
    if (bytes == 0 || gf_alloc_hook_refuses() || posix_memalign(&p, 64, bytes) != 0)
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL, "out of memory for %s (%zu bytes)", what, bytes);
    *buf = (KnBuffer){p, bytes, ctx->device, ctx->index, dtype, 0};
    return GF_OK;
}

void cpu_free(const KnCtx *ctx, KnBuffer *buf) {
    (void)ctx;
    if (!buf) return;
    free(buf->data);
    memset(buf, 0, sizeof *buf);
}

void cpu_upload(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    (void)ctx;
    if (n) memcpy(dst, src, n);
}

void cpu_download(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    (void)ctx;
    if (n) memcpy(dst, src, n);
}

void cpu_copy(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    (void)ctx;
    if (n) memcpy(dst, src, n);
}

void cpu_memset(const KnCtx *ctx, void *dst, int value, size_t n) {
    (void)ctx;
    if (n) memset(dst, value, n);
}

GfStatus cpu_synchronize(const KnCtx *ctx, GfError *err) {
    (void)ctx;
    (void)err;
    return GF_OK;
}

int cpu_supports(const KnCtx *ctx, KnOpId op, KnDtype w) {
    (void)ctx;
    (void)op;
    return w == KN_F32 || w == KN_BF16 || w == KN_F16 || w == KN_NF4;
}
