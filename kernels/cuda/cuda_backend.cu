/* cuda_backend.cu - the CUDA backend's context (device, stream, cuBLAS
 * handle, first fault), its memory entries and its op table. Transfers run
 * on the context's stream: upload returns once the source may be reused
 * (pageable host memory is staged before the call returns), download once
 * the bytes are on the host. A large upload (a checkpoint's weights,
 * streamed from the mmapped file) goes through two pinned staging buffers
 * of the context, the host filling one while the other copies. */
#include <stdio.h>
#include <string.h>

#include "cuda_impl.h"

CudaCtx *cuda_ctx(const KnCtx *ctx) {
    CudaCtx *c = (CudaCtx *)ctx->impl;
    cudaSetDevice(c->device);
    return c;
}

void cuda_note(CudaCtx *c, cudaError_t rc, const char *where) {
    if (rc == cudaSuccess || c->fault != cudaSuccess) return;
    c->fault = rc;
    snprintf(c->fault_where, sizeof c->fault_where, "%s", where);
}

void cuda_blas_note(CudaCtx *c, cublasStatus_t st, const char *what) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    char where[48];
    snprintf(where, sizeof where, "%s (cuBLAS status %d)", what, (int)st);
    cuda_note(c, cudaErrorUnknown, where);
}

cudaError_t cuda_smem_full(const CudaCtx *c, const void *kernel) {
    int optin = 0;
    cudaFuncAttributes fa;
    cudaError_t rc = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device);
    if (rc == cudaSuccess) rc = cudaFuncGetAttributes(&fa, kernel);
    if (rc == cudaSuccess)
        rc = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - (int)fa.sharedSizeBytes);
    return rc;
}

extern "C" GfStatus cuda_ctx_init(KnCtx *ctx, int index, GfError *err) {
    int count = 0;
    cudaError_t rc = cudaGetDeviceCount(&count);
    if (rc != cudaSuccess || index < 0 || index >= count) {
        cudaGetLastError();
        return gf_error_set(err, GF_NOT_FOUND, "device_not_available", "device", "cuda:%d: no such device (%s)", index,
                            rc != cudaSuccess ? cudaGetErrorString(rc) : "index out of range");
    }
    CudaCtx *c = (CudaCtx *)gf_calloc(1, sizeof *c, err);
    if (!c) return GF_NO_MEMORY;
    c->device = index;
    const char *step = "cudaSetDevice", *what = NULL;
    if ((rc = cudaSetDevice(index)) != cudaSuccess) goto fail;
    cuda_device_held(index);
    step = "cudaStreamCreate";
    if ((rc = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess) goto fail;
    if (cublasCreate(&c->blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(c->blas, c->stream) != CUBLAS_STATUS_SUCCESS) {
        cudaStreamDestroy(c->stream);
        free(c);
        return gf_error_set(err, GF_DEVICE, "device_error", "device", "cuda:%d: cuBLAS cannot be initialised", index);
    }
    /* fp32 GEMMs stay fp32: no TF32 tensor-op rounding behind the caller's
     * back; the BF16 precision's GEMMs (cuda_gemm.cu) need the tensor cores */
    c->bf16 = ctx->precision == KN_PRECISION_BF16;
    cublasSetMathMode(c->blas, c->bf16 ? CUBLAS_DEFAULT_MATH : CUBLAS_PEDANTIC_MATH);
    if (c->bf16) cuda_lt_open(c);
    if ((rc = cuda_attention_open(c, &what)) != cudaSuccess) {
        cuda_lt_free(c);
        cublasDestroy(c->blas);
        cudaStreamDestroy(c->stream);
        free(c);
        cudaGetLastError();
        return gf_error_set(err, GF_DEVICE, "device_error", "device",
                            "cuda:%d: the %s kernel cannot be given the device's shared memory: %s", index, what,
                            cudaGetErrorString(rc));
    }
    cuda_graphs_init(c);
    ctx->impl = c;
    ctx->stream = c->stream;
    return GF_OK;
fail:
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
    cudaGetLastError();
    return gf_error_set(err, GF_DEVICE, "device_error", "device", "cuda:%d: %s failed: %s", index, step,
                        cudaGetErrorString(rc));
}

extern "C" void cuda_ctx_free(KnCtx *ctx) {
    CudaCtx *c = (CudaCtx *)ctx->impl;
    if (!c) return;
    cudaSetDevice(c->device);
    cuda_graphs_free(c);
    if (c->scratch) cudaFreeAsync(c->scratch, c->stream);
    cudaStreamSynchronize(c->stream);
    for (int b = 0; c->stage_ready == 1 && b < 2; b++) {
        cudaFreeHost(c->stage[b]);
        cudaEventDestroy(c->staged[b]);
    }
    cuda_lt_free(c);
    cublasDestroy(c->blas);
    cudaStreamDestroy(c->stream);
    free(c);
    ctx->impl = NULL;
    ctx->stream = NULL;
}

/* ---- memory ------------------------------------------------------------------ */

static GfStatus cu_alloc(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what, GfError *err) {
    CudaCtx *c = cuda_ctx(ctx);
    memset(buf, 0, sizeof *buf);
    if (cuda_refused(c))
        return gf_error_set(err, GF_DEVICE, "device_error", NULL,
                            "cuda:%d: cannot allocate %s while recording a graph", c->device, what);
    void *p = NULL;
    cudaError_t rc = bytes == 0 || gf_alloc_hook_refuses() ? cudaErrorMemoryAllocation : cudaMalloc(&p, bytes);
    if (rc != cudaSuccess) {
        cudaGetLastError(); /* an allocation failure is not sticky: clear it */
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL,
                            "out of memory on cuda:%d for %s (%zu bytes; %zu of %zu bytes free)", c->device, what,
                            bytes, free_b, total_b);
    }
    buf->data = p;
    buf->bytes = bytes;
    buf->device = ctx->device;
    buf->device_index = ctx->index;
    buf->dtype = dtype;
    return GF_OK;
}

/* Pinned host memory mapped into the device's address space: with unified
 * addressing (every 64-bit Linux system CUDA supports) the device reads it
 * at the host's address. Write-combined: the host writes it once, the
 * device reads it over the bus without snooping the host's caches. */
static GfStatus cu_alloc_mapped(const KnCtx *ctx, KnBuffer *buf, size_t bytes, KnDtype dtype, const char *what,
                                GfError *err) {
    CudaCtx *c = cuda_ctx(ctx);
    memset(buf, 0, sizeof *buf);
    if (cuda_refused(c))
        return gf_error_set(err, GF_DEVICE, "device_error", NULL,
                            "cuda:%d: cannot allocate %s while recording a graph", c->device, what);
    void *p = NULL, *dev = NULL;
    unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable | cudaHostAllocWriteCombined;
    cudaError_t rc = bytes == 0 || gf_alloc_hook_refuses() ? cudaErrorMemoryAllocation : cudaHostAlloc(&p, bytes, flags);
    if (rc == cudaSuccess) rc = cudaHostGetDevicePointer(&dev, p, 0);
    if (rc != cudaSuccess || dev != p) {
        cudaGetLastError();
        if (p) cudaFreeHost(p);
        return gf_error_set(err, GF_NO_MEMORY, "out_of_memory", NULL,
                            "cuda:%d: no pinned host memory mapped at one address for %s (%zu bytes): %s", c->device,
                            what, bytes, rc != cudaSuccess ? cudaGetErrorString(rc) : "no unified addressing");
    }
    buf->data = p;
    buf->bytes = bytes;
    buf->device = ctx->device;
    buf->device_index = ctx->index;
    buf->dtype = dtype;
    buf->mapped = 1;
    return GF_OK;
}

static void cu_free(const KnCtx *ctx, KnBuffer *buf) {
    if (!buf || !buf->data) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (cuda_refused(c)) return; /* ops.h: refused while recording */
    cuda_note(c, buf->mapped ? cudaFreeHost(buf->data) : cudaFree(buf->data), "free");
    memset(buf, 0, sizeof *buf);
}

#define STAGE_BYTES ((size_t)8 << 20) /* each staging buffer */
#define STAGE_MIN ((size_t)1 << 20)   /* smaller uploads go direct */

/* The staging buffers, allocated on first use; 0 when pinned memory is
 * refused (uploads then go direct, as pageable copies). */
static int stage_init(CudaCtx *c) {
    if (c->stage_ready) return c->stage_ready > 0;
    c->stage_ready = -1;
    for (int b = 0; b < 2; b++)
        if (cudaHostAlloc(&c->stage[b], STAGE_BYTES, cudaHostAllocDefault) != cudaSuccess ||
            cudaEventCreateWithFlags(&c->staged[b], cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            for (int i = 0; i <= b; i++) {
                if (c->stage[i]) cudaFreeHost(c->stage[i]);
                if (c->staged[i]) cudaEventDestroy(c->staged[i]);
                c->stage[i] = NULL;
                c->staged[i] = NULL;
            }
            return 0;
        }
    c->stage_ready = 1;
    return 1;
}

static void cu_upload(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (cuda_refused(c)) return;
    if (n < STAGE_MIN || !stage_init(c)) {
        cuda_note(c, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, c->stream), "upload");
        return;
    }
    /* a buffer is refilled once its previous copy is done; the last copies
     * read only the staging buffers, so src is free on return */
    for (size_t off = 0, i = 0; off < n; off += STAGE_BYTES, i++) {
        int b = (int)(i & 1);
        size_t len = n - off < STAGE_BYTES ? n - off : STAGE_BYTES;
        cuda_note(c, cudaEventSynchronize(c->staged[b]), "upload");
        memcpy(c->stage[b], (const char *)src + off, len);
        cuda_note(c, cudaMemcpyAsync((char *)dst + off, c->stage[b], len, cudaMemcpyHostToDevice, c->stream), "upload");
        cuda_note(c, cudaEventRecord(c->staged[b], c->stream), "upload");
    }
}

static void cu_download(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (cuda_refused(c)) {
        memset(dst, 0xFF, n);
        return;
    }
    cudaError_t rc = cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, c->stream);
    if (rc == cudaSuccess) rc = cudaStreamSynchronize(c->stream);
    if (rc != cudaSuccess) memset(dst, 0xFF, n); /* never stale bytes that look valid; synchronize reports it */
    cuda_note(c, rc, "download");
}

static void cu_copy(const KnCtx *ctx, void *dst, const void *src, size_t n) {
    if (!n) return;
    CudaCtx *c = cuda_ctx(ctx);
    cuda_note(c, cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, c->stream), "copy");
}

static void cu_memset(const KnCtx *ctx, void *dst, int value, size_t n) {
    if (!n) return;
    CudaCtx *c = cuda_ctx(ctx);
    cuda_note(c, cudaMemsetAsync(dst, value, n, c->stream), "memset");
}

static GfStatus cu_synchronize(const KnCtx *ctx, GfError *err) {
    CudaCtx *c = cuda_ctx(ctx);
    if (cuda_refused(c)) return GF_OK;
    cuda_note(c, cudaStreamSynchronize(c->stream), "synchronize");
    if (c->fault == cudaSuccess) return GF_OK;
    cudaError_t rc = c->fault;
    c->fault = cudaSuccess;
    return gf_error_set(err, GF_DEVICE, "device_error", NULL, "cuda:%d: %s failed: %s", c->device, c->fault_where,
                        cudaGetErrorString(rc));
}

static int cu_supports(const KnCtx *ctx, KnOpId op, KnDtype w) {
    (void)ctx;
    (void)op;
    return w == KN_F32 || w == KN_BF16 || w == KN_F16 || w == KN_NF4;
}


static size_t cu_scratch_bytes(const KnCtx *ctx, const KnCall *call) {
    size_t own = 0;
    int bf16 = ctx->precision == KN_PRECISION_BF16;
    switch (call->op) {
    case KN_OP_MATMUL: own = bf16 ? cuda_gemm_scratch(call->w, call->n, 0) : 0; break;
    case KN_OP_MATMUL_DX: own = bf16 ? cuda_gemm_scratch(call->w, call->n, 1) : 0; break;
    case KN_OP_ATTENTION_DX: own = cuda_attention_dx_scratch(call->n, call->n_heads, call->dim); break;
    case KN_OP_LORA_SHRINK:
    case KN_OP_LORA_SHRINK_DX: own = cuda_lora_scratch(call->n, call->in, call->dropout); break;
    case KN_OP_MOE_EXPERTS: own = cuda_moe_scratch(call->n, call->top_k, call->n_experts); break;
    case KN_OP_MOE_EXPERTS_DX:
        own = call->n_experts > 0 ? cuda_moe_dx_scratch(call->n, call->top_k, call->n_experts,
                                                        call->w.rows / call->n_experts, call->w.cols)
                                  : 0;
        break;
    default: break;
    }
    /* cuBLAS's and cuBLASLt's workspace, and sq_norm's parts beside the
     * call's own (the scratch holds the larger: 4 KB over at most) */
    return CUDA_BLAS_WORKSPACE_BYTES + CUDA_NORM_SCRATCH_BYTES + own;
}

/* The table, filled by name (C++17 has no designated initializers). */
static KnOps make_ops(void) {
    KnOps o;
    memset(&o, 0, sizeof o);
    o.alloc = cu_alloc;
    o.alloc_mapped = cu_alloc_mapped;
    o.free = cu_free;
    o.upload = cu_upload;
    o.download = cu_download;
    o.copy = cu_copy;
    o.memset = cu_memset;
    o.synchronize = cu_synchronize;
    o.supports = cu_supports;
    o.scratch_bytes = cu_scratch_bytes;
    o.graph_begin = cuda_graph_begin;
    o.graph_end = cuda_graph_end;
    o.matmul = cuda_matmul;
    o.rmsnorm = cuda_rmsnorm;
    o.rmsnorm_add = cuda_rmsnorm_add;
    o.attention = cuda_attention;
    o.attention_paged = cuda_attention_paged;
    o.attention_batch = cuda_attention_batch;
    o.attention_rows = cuda_attention_rows;
    o.attention_bulk = cuda_attention_bulk;
    o.gelu_tanh = cuda_gelu_tanh;
    o.gelu_gate = cuda_gelu_gate;
    o.softcap = cuda_softcap;
    o.embed_rows = cuda_embed_rows;
    o.add = cuda_add;
    o.mul = cuda_mul;
    o.mul_acc = cuda_mul_acc;
    o.rows_gather = cuda_rows_gather;
    o.rows_scatter = cuda_rows_scatter;
    o.rows_scatter_bf16 = cuda_rows_scatter_bf16;
    o.rows_sum = cuda_rows_sum;
    o.embed_rows_add = cuda_embed_rows_add;
    o.clamp = cuda_clamp;
    o.scale_shift = cuda_scale_shift;
    o.standardize = cuda_standardize;
    o.xent_softcap = cuda_xent_softcap;
    o.sample = cuda_sample;
    o.adamw = cuda_adamw;
    o.sq_norm = cuda_sq_norm;
    o.scale = cuda_scale;
    o.round_bf16 = cuda_round_bf16;
    o.widen_bf16 = cuda_widen_bf16;
    o.rope_rows = cuda_rope_rows;
    o.rmsnorm_rope = cuda_rmsnorm_rope;
    o.lora_shrink = cuda_lora_shrink;
    o.moe_route = cuda_moe_route;
    o.moe_experts = cuda_moe_experts;
    o.lora_expand = cuda_lora_expand;
    o.lora_rows_shrink = cuda_lora_rows_shrink;
    o.lora_rows_expand = cuda_lora_rows_expand;
    o.matmul_dx = cuda_matmul_dx;
    o.rmsnorm_dx = cuda_rmsnorm_dx;
    o.gelu_tanh_dx = cuda_gelu_tanh_dx;
    o.gelu_gate_dx = cuda_gelu_gate_dx;
    o.moe_experts_dx = cuda_moe_experts_dx;
    o.moe_route_dx = cuda_moe_route_dx;
    o.clamp_dx = cuda_clamp_dx;
    o.lora_expand_dx = cuda_lora_expand_dx;
    o.lora_shrink_dx = cuda_lora_shrink_dx;
    o.attention_dx = cuda_attention_dx;
    o.nf4_quantize = cuda_nf4_quantize;
    return o;
}

static const KnOps CUDA_OPS = make_ops();

extern "C" const KnOps *cuda_backend_ops(void) { return &CUDA_OPS; }
