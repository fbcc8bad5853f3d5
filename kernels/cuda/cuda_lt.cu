/* cuda_lt.cu - the BF16 precision's dense GEMMs (cuda_gemm.cu) through
 * cuBLASLt: bf16 operands, float32 accumulation and output, the first
 * algorithm of cuBLASLt's heuristic for the shape, the operands' alignment
 * and the context's workspace. A plan (the descriptors and that algorithm)
 * is kept per shape, transposition and alignment, up to LT_PLANS a
 * context, the least recently used replaced; a training step repeats its
 * few shapes, so the heuristic runs once per shape.
 *
 * No epilogue is asked for: Gemma's linears have no bias, and the GELU of a
 * gate follows the LoRA term added to its output (a separate GEMM), so a
 * fused epilogue would have nothing to fuse in a QLoRA step.
 *
 * The workspace (CUDA_BLAS_WORKSPACE_BYTES) is allocated when the context
 * opens and given to the context's cuBLAS handle too: both run on the
 * context's one stream, one call at a time, and a recorded graph (CUDA
 * graphs) needs a workspace that stays put. Where cuBLASLt cannot be had
 * (no handle, no workspace, no algorithm for a shape) or GF_CUBLASLT=0,
 * the GEMM is cublasGemmEx's, as before. */
#include <stdlib.h>
#include <string.h>

#include "cuda_impl.h"

#define LT_PLANS 64

typedef struct {
    int used;
    uint64_t last;            /* CudaLt.clock when last run */
    int ta, tb, m, n, k, lda, ldb, ldc;
    uint32_t align[3];        /* of A, B and C (D is C) */
    int ok;                   /* 0: no algorithm (cublasGemmEx runs it) */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} LtPlan;

struct CudaLt {
    cublasLtHandle_t handle;
    void *workspace;
    uint64_t clock;
    LtPlan plan[LT_PLANS];
};

static void plan_free(LtPlan *p) {
    if (!p->used) return;
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) cublasLtMatrixLayoutDestroy(p->c);
    memset(p, 0, sizeof *p);
}

void cuda_lt_open(CudaCtx *c) {
    const char *env = getenv("GF_CUBLASLT");
    c->lt = NULL;
    if (env && strcmp(env, "0") == 0) return;
    CudaLt *lt = (CudaLt *)calloc(1, sizeof *lt);
    if (!lt) return;
    if (cudaMalloc(&lt->workspace, CUDA_BLAS_WORKSPACE_BYTES) != cudaSuccess) {
        cudaGetLastError();
        free(lt);
        GF_LOGW("cuda:%d: no workspace for cuBLASLt: the bf16 GEMMs take cublasGemmEx", c->device);
        return;
    }
    if (cublasLtCreate(&lt->handle) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(c->blas, lt->workspace, CUDA_BLAS_WORKSPACE_BYTES) != CUBLAS_STATUS_SUCCESS) {
        if (lt->handle) cublasLtDestroy(lt->handle);
        cudaFree(lt->workspace);
        free(lt);
        GF_LOGW("cuda:%d: cuBLASLt cannot be initialised: the bf16 GEMMs take cublasGemmEx", c->device);
        return;
    }
    c->lt = lt;
}

void cuda_lt_free(CudaCtx *c) {
    CudaLt *lt = c->lt;
    if (!lt) return;
    for (int i = 0; i < LT_PLANS; i++) plan_free(&lt->plan[i]);
    cublasLtDestroy(lt->handle);
    cublasSetWorkspace(c->blas, NULL, 0);
    cudaFree(lt->workspace); /* the stream is drained before contexts are freed */
    free(lt);
    c->lt = NULL;
}

/* The largest power of two up to 256 that divides p's address. */
static uint32_t align_of(const void *p) {
    uint32_t a = 256;
    while (a > 1 && (uintptr_t)p % a) a >>= 1;
    return a;
}

/* The plan's descriptors and the heuristic's first algorithm; ok = 0 when
 * there is none (or a descriptor cannot be made). */
static void plan_make(CudaLt *lt, LtPlan *p) {
    cublasOperation_t ta = (cublasOperation_t)p->ta, tb = (cublasOperation_t)p->tb;
    int ok = cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS;
    /* column-major layouts as stored: op(A) is m x k, op(B) k x n, C m x n */
    ok = ok && cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, ta == CUBLAS_OP_N ? p->m : p->k,
                                          ta == CUBLAS_OP_N ? p->k : p->m, p->lda) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, tb == CUBLAS_OP_N ? p->k : p->n,
                                          tb == CUBLAS_OP_N ? p->n : p->k, p->ldb) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cublasLtMatrixLayoutCreate(&p->c, CUDA_R_32F, p->m, p->n, p->ldc) == CUBLAS_STATUS_SUCCESS;
    cublasLtMatmulPreference_t pref = NULL;
    uint64_t ws = CUDA_BLAS_WORKSPACE_BYTES;
    ok = ok && cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) ==
             CUBLAS_STATUS_SUCCESS;
    const cublasLtMatmulPreferenceAttributes_t at[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; ok && i < 4; i++)
        ok = cublasLtMatmulPreferenceSetAttribute(pref, at[i], &p->align[i < 3 ? i : 2], sizeof(uint32_t)) ==
             CUBLAS_STATUS_SUCCESS;
    cublasLtMatmulHeuristicResult_t r;
    int count = 0;
    ok = ok && cublasLtMatmulAlgoGetHeuristic(lt->handle, p->desc, p->a, p->b, p->c, p->c, pref, 1, &r, &count) ==
                   CUBLAS_STATUS_SUCCESS &&
         count > 0 && r.state == CUBLAS_STATUS_SUCCESS && r.workspaceSize <= ws;
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (ok) p->algo = r.algo;
    p->ok = ok;
}

/* The plan for this call: kept, or made in the least recently used slot. */
static LtPlan *plan_for(CudaLt *lt, const LtPlan *key) {
    LtPlan *oldest = &lt->plan[0];
    for (int i = 0; i < LT_PLANS; i++) {
        LtPlan *p = &lt->plan[i];
        if (p->used && p->ta == key->ta && p->tb == key->tb && p->m == key->m && p->n == key->n && p->k == key->k &&
            p->lda == key->lda && p->ldb == key->ldb && p->ldc == key->ldc && !memcmp(p->align, key->align, sizeof p->align))
            return p;
        if (!p->used || (oldest->used && p->last < oldest->last)) oldest = p;
    }
    plan_free(oldest);
    *oldest = *key;
    oldest->used = 1;
    plan_make(lt, oldest);
    return oldest;
}

void cuda_gemm_bf16(CudaCtx *c, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A, int lda,
                    const void *B, int ldb, float beta, float *C, int ldc, const char *what) {
    const float one = 1.0f;
    CudaLt *lt = c->lt;
    if (lt) {
        LtPlan key;
        memset(&key, 0, sizeof key);
        key.ta = (int)ta, key.tb = (int)tb, key.m = m, key.n = n, key.k = k, key.lda = lda, key.ldb = ldb, key.ldc = ldc;
        key.align[0] = align_of(A), key.align[1] = align_of(B), key.align[2] = align_of(C);
        LtPlan *p = plan_for(lt, &key);
        p->last = ++lt->clock;
        if (p->ok) {
            cuda_blas_note(c,
                           cublasLtMatmul(lt->handle, p->desc, &one, A, p->a, B, p->b, &beta, C, p->c, C, p->c, &p->algo,
                                          lt->workspace, CUDA_BLAS_WORKSPACE_BYTES, c->stream),
                           what);
            return;
        }
    }
    cuda_blas_note(c,
                   cublasGemmEx(c->blas, ta, tb, m, n, k, &one, A, CUDA_R_16BF, lda, B, CUDA_R_16BF, ldb, &beta, C,
                                CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   what);
}
