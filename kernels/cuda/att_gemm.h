/* att_gemm.h - the plan of CUDA's attention gradient (ops.h attention_dx)
 * and bulk forward (attention_bulk) as dense matmuls, so that their
 * products run on cuBLAS (the tensor cores in the BF16 precision) instead
 * of a hand-written kernel. Plain C: the CUDA backend runs the plan
 * (cuda_attention.cu), and a CPU test runs the same plan with a reference
 * matmul against the CPU backend's attention and gradient
 * (tests/kernels/test_att_gemm.c), so every layout below is checked in CI.
 *
 * The queries go in chunks of att_gemm_rows() (the scores of a chunk, not
 * the T x T matrix, are what the scratch holds). For a chunk of nq queries
 * [q0, q0 + nq) and the keys [k0, k0 + nk) they may see, per KV head b with
 * its G = n_heads / n_kv_heads query heads, rows r = (i, g) (R = nq * G of
 * them per KV head):
 *   Qp, dOp = the chunk's queries and output gradients, packed [b][i][g][d]
 *   S  = scale Qp K_b^T           (ATT_GEMM_S)    P  = softmax over the visible keys, 0 elsewhere
 *   dP = dOp V_b^T                (ATT_GEMM_DP)   dS = P (dP - sum_j P dP) scale
 *   dV_b += P^T dOp               (ATT_GEMM_DV)
 *   dK_b += dS^T Qp               (ATT_GEMM_DK)
 *   dQp = dS K_b                  (ATT_GEMM_DQ)   then unpacked into dq
 * The forward (attention_bulk) computes S and P, then
 *   Op = P V_b                    (ATT_GEMM_O)    into dQp's buffer, unpacked into out
 * Each AttGemm is one strided batched GEMM over the KV heads, in cuBLAS's
 * column-major convention: C_i = alpha op(A_i) op(B_i) + beta C_i, matrix i
 * of A at a + i * stride_a (and so on), op transposing when trans_*. */
#ifndef GF_ATT_GEMM_H
#define GF_ATT_GEMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define ATT_HD __host__ __device__
#else
#define ATT_HD
#endif

/* The scratch one call may take for its chunk's scores, at most (one query
 * row's needs are taken whatever they are). */
#define ATT_GEMM_BUDGET ((size_t)256 << 20)

typedef struct {
    int64_t q0, nq;           /* the chunk's queries (indices into q, dout, dq) */
    int64_t k0, nk;           /* the keys any of them may see */
    int n_heads, n_kv_heads, dim;
    float scale;
} AttChunk;

/* The scratch, carved by att_gemm_bufs: S (then P) and dP (then dS) of
 * n_heads * rows * n_keys floats, Qp, dOp and dQp of n_heads * rows * dim. */
typedef struct {
    float *s, *ds, *qp, *gop, *dqp;
} AttGemmBufs;

typedef struct {
    int trans_a, trans_b;
    int64_t m, n, k, batch;
    float alpha, beta;
    const float *a;
    int64_t lda, stride_a;
    const float *b;
    int64_t ldb, stride_b;
    float *c;
    int64_t ldc, stride_c;
} AttGemm;

enum { ATT_GEMM_S, ATT_GEMM_O, ATT_GEMM_DP, ATT_GEMM_DV, ATT_GEMM_DK, ATT_GEMM_DQ, ATT_GEMM_COUNT };

/* Floats of scratch one query row of a chunk takes. */
static inline size_t att_gemm_row_floats(int64_t n_keys, int n_heads, int dim) {
    return (size_t)n_heads * (2 * (size_t)n_keys + 3 * (size_t)dim);
}

/* Queries per chunk: as many as budget bytes hold, at least 1, at most n_q. */
static inline int64_t att_gemm_rows(int64_t n_q, int64_t n_keys, int n_heads, int dim, size_t budget) {
    size_t row = att_gemm_row_floats(n_keys, n_heads, dim) * sizeof(float);
    int64_t rows = row ? (int64_t)(budget / row) : n_q;
    if (rows > n_q) rows = n_q;
    return rows < 1 ? 1 : rows;
}

static inline size_t att_gemm_scratch_bytes(int64_t n_q, int64_t n_keys, int n_heads, int dim, size_t budget) {
    if (n_q <= 0 || n_heads <= 0) return 0;
    return (size_t)att_gemm_rows(n_q, n_keys, n_heads, dim, budget) * att_gemm_row_floats(n_keys, n_heads, dim) *
           sizeof(float);
}

static inline AttGemmBufs att_gemm_bufs(float *scratch, int64_t rows, int64_t n_keys, int n_heads, int dim) {
    size_t sc = (size_t)n_heads * (size_t)rows * (size_t)n_keys, pk = (size_t)n_heads * (size_t)rows * (size_t)dim;
    AttGemmBufs b = {scratch, scratch + sc, scratch + 2 * sc, scratch + 2 * sc + pk, scratch + 2 * sc + 2 * pk};
    return b;
}

/* The chunk of queries [q0, q0 + nq) at absolute positions q_pos0 + q0..:
 * the keys the mask rule (ops.h KnMask) lets any of them see lie at or after
 * the first query's window and, without image blocks (groups), at or before
 * its last query. nk is 0 when no key remains. */
static inline AttChunk att_gemm_chunk(int64_t q0, int64_t nq, int64_t q_pos0, int64_t n_keys, int window,
                                      int has_groups, int n_heads, int n_kv_heads, int dim, float scale) {
    int64_t first = q_pos0 + q0, lo = window > 0 ? first - window + 1 : 0, hi = n_keys;
    if (lo < 0) lo = 0;
    if (!has_groups && first + nq < hi) hi = first + nq;
    AttChunk c = {q0, nq, lo, hi > lo ? hi - lo : 0, n_heads, n_kv_heads, dim, scale};
    return c;
}

/* Where packed element e of a chunk ([b][i][g][d], n_heads * nq * dim of
 * them) lies in q, dout or dq ([n_q, n_heads, dim]). */
static inline ATT_HD int64_t att_pack_at(int64_t e, const AttChunk *c) {
    int G = c->n_heads / c->n_kv_heads;
    int64_t d = e % c->dim, r = e / c->dim, R = c->nq * G;
    int64_t b = r / R, i = (r % R) / G, g = r % G;
    return ((c->q0 + i) * c->n_heads + b * G + g) * c->dim + d;
}

/* The chunk's query (0 .. nq) of packed row r (0 .. n_heads * nq). */
static inline ATT_HD int64_t att_row_query(int64_t r, const AttChunk *c) {
    int G = c->n_heads / c->n_kv_heads;
    return (r % (c->nq * G)) / G;
}

/* The six GEMMs of a chunk over k, v (dk, dv accumulated; NULL for the
 * forward) and the scratch. */
static inline void att_gemm_plan(const AttChunk *c, const AttGemmBufs *bf, const float *k, const float *v, float *dk,
                                 float *dv, AttGemm g[ATT_GEMM_COUNT]) {
    int64_t D = c->dim, KVH = c->n_kv_heads, R = c->nq * (c->n_heads / c->n_kv_heads), nk = c->nk;
    int64_t at = c->k0 * KVH * D; /* the first key's row in k, v, dk, dv */
    /* S^T (nk x R) = K_b^T-as-stored (D x nk, transposed) times Qp_b^T (D x R) */
    AttGemm s = {1, 0, nk, R, D, KVH, c->scale, 0.0f, k + at, KVH * D, D, bf->qp, D, R * D, bf->s, nk, R * nk};
    g[ATT_GEMM_S] = s;
    AttGemm dp = s;
    dp.alpha = 1.0f;
    dp.a = v + at;
    dp.b = bf->gop;
    dp.c = bf->ds;
    g[ATT_GEMM_DP] = dp;
    /* dV_b^T (D x nk) += dOp_b^T (D x R) times P_b (R x nk, stored as its transpose) */
    AttGemm gv = {0, 1, D, nk, R, KVH, 1.0f, 1.0f, bf->gop, D, R * D, bf->s, nk, R * nk, dv ? dv + at : NULL, KVH * D, D};
    g[ATT_GEMM_DV] = gv;
    AttGemm gk = gv;
    gk.a = bf->qp;
    gk.b = bf->ds;
    gk.c = dk ? dk + at : NULL;
    g[ATT_GEMM_DK] = gk;
    /* dQp_b^T (D x R) = K_b^T-as-stored (D x nk) times dS_b^T (nk x R) */
    AttGemm gq = {0, 0, D, R, nk, KVH, 1.0f, 0.0f, k + at, KVH * D, D, bf->ds, nk, R * nk, bf->dqp, D, R * D};
    g[ATT_GEMM_DQ] = gq;
    /* the forward's output: Op_b (into the dQp buffer) = P_b V_b, as dQp = dS K_b */
    AttGemm go = gq;
    go.a = v + at;
    go.b = bf->s;
    g[ATT_GEMM_O] = go;
}

#endif
