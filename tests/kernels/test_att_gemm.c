/* test_att_gemm.c - the plan of CUDA's attention gradient and bulk forward
 * (att_gemm.h), run on the CPU: its packing, its six strided batched GEMMs (a plain
 * column-major GEMM with cuBLAS's arguments) and the softmax rows the CUDA
 * kernels compute, against the CPU backend's attention and attention_dx
 * (which test_ops checks by central differences). Many chunk sizes, down to one query a
 * chunk, grouped query heads, sliding windows, image blocks, padding and
 * queries past the first key, so that every stride and offset of the plan
 * is exercised where CI runs, without a GPU. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../unit/check.h"
#include "cuda/att_gemm.h"
#include "kernels.h"
#include "rand.h"

/* C_i = alpha op(A_i) op(B_i) + beta C_i, column-major, as cuBLAS computes
 * it (C is not read when beta is 0). */
static void gemm_ref(const AttGemm *g) {
    for (int64_t t = 0; t < g->batch; t++) {
        const float *A = g->a + t * g->stride_a, *B = g->b + t * g->stride_b;
        float *C = g->c + t * g->stride_c;
        for (int64_t i = 0; i < g->m; i++)
            for (int64_t j = 0; j < g->n; j++) {
                double acc = 0;
                for (int64_t p = 0; p < g->k; p++) {
                    double a = g->trans_a ? A[p + i * g->lda] : A[i + p * g->lda];
                    double b = g->trans_b ? B[j + p * g->ldb] : B[p + j * g->ldb];
                    acc += a * b;
                }
                float *c = &C[i + j * g->ldc];
                *c = (float)(g->alpha * acc + (g->beta != 0.0f ? g->beta * (double)*c : 0.0));
            }
    }
}

/* The mask rule of ops.h (KnMask). */
static int visible(const KnMask *m, int64_t q, int64_t t) {
    if (!m->valid[t]) return 0;
    int causal = t <= q || (m->group && m->group[q] >= 0 && m->group[q] == m->group[t]);
    return causal && (m->window == 0 || t > q - m->window);
}

/* What k_att_softmax and k_att_softmax_dx do to each row. */
static void softmax_rows(float *s, const AttChunk *c, int64_t q_pos0, const KnMask *m) {
    for (int64_t r = 0; r < (int64_t)c->n_heads * c->nq; r++) {
        float *row = s + r * c->nk, mx = -INFINITY, sum = 0.0f;
        int64_t qpos = q_pos0 + c->q0 + att_row_query(r, c);
        for (int64_t j = 0; j < c->nk; j++)
            if (visible(m, qpos, c->k0 + j) && row[j] > mx) mx = row[j];
        for (int64_t j = 0; j < c->nk; j++) {
            row[j] = mx != -INFINITY && visible(m, qpos, c->k0 + j) ? expf(row[j] - mx) : 0.0f;
            sum += row[j];
        }
        for (int64_t j = 0; j < c->nk; j++) row[j] = sum > 0.0f ? row[j] / sum : 0.0f;
    }
}

static void softmax_dx_rows(float *dp, const float *p, const AttChunk *c) {
    for (int64_t r = 0; r < (int64_t)c->n_heads * c->nq; r++) {
        float *g = dp + r * c->nk, dot = 0.0f;
        const float *pr = p + r * c->nk;
        for (int64_t j = 0; j < c->nk; j++) dot += pr[j] * g[j];
        for (int64_t j = 0; j < c->nk; j++) g[j] = pr[j] * (g[j] - dot) * c->scale;
    }
}

typedef struct {
    int64_t n_q, q_pos0, n_keys;
    int H, KVH, D, window, groups, pad;
} Case;

/* The gradient's own arguments; NULL for the forward. */
typedef struct {
    float *dk, *dv;
    const float *dout;
} Grads;

/* cuda_attention_bulk (gr NULL: out is the output) or cuda_attention_dx
 * (out is dq) as attention_gemm runs it, chunk by chunk, with a budget of
 * `budget` bytes. */
static void plan_run(const Case *cs, size_t budget, float *out, const Grads *gr, const float *q, const float *k,
                     const float *v, float scale, const KnMask *m) {
    int64_t rows = att_gemm_rows(cs->n_q, cs->n_keys, cs->H, cs->D, budget);
    size_t bytes = att_gemm_scratch_bytes(cs->n_q, cs->n_keys, cs->H, cs->D, budget);
    float *scratch = malloc(bytes); /* exactly: ASan sees an overrun */
    AttGemmBufs bf = att_gemm_bufs(scratch, rows, cs->n_keys, cs->H, cs->D);
    CHECK(bf.dqp + (size_t)cs->H * rows * cs->D == scratch + bytes / sizeof(float), "the buffers fill the scratch");
    CHECK(rows == cs->n_q || (size_t)(rows + 1) * att_gemm_row_floats(cs->n_keys, cs->H, cs->D) * 4 > budget,
          "as many rows as the budget holds");
    for (int64_t q0 = 0; q0 < cs->n_q; q0 += rows) {
        memset(scratch, 0xFF, bytes); /* NaN: a value read before it is written shows */
        AttChunk c = att_gemm_chunk(q0, cs->n_q - q0 < rows ? cs->n_q - q0 : rows, cs->q_pos0, cs->n_keys, m->window,
                                    m->group != NULL, cs->H, cs->KVH, cs->D, scale);
        size_t packed = (size_t)c.n_heads * c.nq * c.dim;
        if (c.nk <= 0) {
            memset(out + c.q0 * c.n_heads * c.dim, 0, packed * sizeof(float));
            continue;
        }
        AttGemm g[ATT_GEMM_COUNT];
        att_gemm_plan(&c, &bf, k, v, gr ? gr->dk : NULL, gr ? gr->dv : NULL, g);
        for (size_t e = 0; e < packed; e++) bf.qp[e] = q[att_pack_at((int64_t)e, &c)];
        gemm_ref(&g[ATT_GEMM_S]);
        softmax_rows(bf.s, &c, cs->q_pos0, m);
        if (gr) {
            for (size_t e = 0; e < packed; e++) bf.gop[e] = gr->dout[att_pack_at((int64_t)e, &c)];
            gemm_ref(&g[ATT_GEMM_DP]);
            softmax_dx_rows(bf.ds, bf.s, &c);
            gemm_ref(&g[ATT_GEMM_DV]);
            gemm_ref(&g[ATT_GEMM_DK]);
            gemm_ref(&g[ATT_GEMM_DQ]);
        } else {
            gemm_ref(&g[ATT_GEMM_O]);
        }
        for (size_t e = 0; e < packed; e++) out[att_pack_at((int64_t)e, &c)] = bf.dqp[e];
    }
    free(scratch);
}

static double rel_l2(const float *got, const float *want, size_t n) {
    double e = 0, w = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        e += isnan(d) ? INFINITY : d * d;
        w += (double)want[i] * want[i];
    }
    return w > 0 ? sqrt(e / w) : sqrt(e);
}

static void run_case(const KnBackend *cpu, const Case *cs) {
    size_t nqv = (size_t)cs->n_q * cs->H * cs->D, nkv = (size_t)cs->n_keys * cs->KVH * cs->D;
    float *q = rand_vec(nqv), *k = rand_vec(nkv), *v = rand_vec(nkv), *dout = rand_vec(nqv);
    float *dk0 = rand_vec(nkv), *dv0 = rand_vec(nkv), scale = 1.0f / sqrtf((float)cs->D);
    uint8_t *valid = malloc((size_t)cs->n_keys);
    int32_t *group = malloc((size_t)(cs->n_keys + cs->q_pos0 + cs->n_q) * sizeof *group);
    for (int64_t t = 0; t < cs->n_keys + cs->q_pos0 + cs->n_q; t++) group[t] = t >= 10 && t < 19 ? 7 : t >= 25 && t < 29 ? 2 : -1;
    for (int64_t t = 0; t < cs->n_keys; t++) valid[t] = !(t == 3 || (cs->pad && t < cs->pad));
    KnMask m = {valid, cs->groups ? group : NULL, cs->window};
    float *want = malloc((nqv + 2 * nkv) * sizeof *want), *got = malloc((nqv + 2 * nkv) * sizeof *got);
    memcpy(want + nqv, dk0, nkv * sizeof *dk0);
    memcpy(want + nqv + nkv, dv0, nkv * sizeof *dv0);
    cpu->ops->attention_dx(&cpu->ctx, want, want + nqv, want + nqv + nkv, q, k, v, dout, cs->n_q, cs->q_pos0,
                           cs->n_keys, cs->H, cs->KVH, cs->D, scale, &m);
    float *fwd_want = malloc(nqv * sizeof *fwd_want), *fwd = malloc(nqv * sizeof *fwd);
    cpu->ops->attention(&cpu->ctx, fwd_want, q, k, v, cs->n_q, cs->q_pos0, cs->n_keys, cs->H, cs->KVH, cs->D, scale, &m);
    size_t row = att_gemm_row_floats(cs->n_keys, cs->H, cs->D) * sizeof(float);
    size_t budgets[] = {ATT_GEMM_BUDGET, row, 2 * row + row / 2, 7 * row, (size_t)cs->n_q * row - 1};
    for (size_t b = 0; b < sizeof budgets / sizeof *budgets; b++) {
        memset(got, 0xFF, nqv * sizeof *got); /* dq is written */
        memcpy(got + nqv, dk0, nkv * sizeof *dk0);
        memcpy(got + nqv + nkv, dv0, nkv * sizeof *dv0);
        Grads gr = {got + nqv, got + nqv + nkv, dout};
        plan_run(cs, budgets[b], got, &gr, q, k, v, scale, &m);
        memset(fwd, 0xFF, nqv * sizeof *fwd);
        plan_run(cs, budgets[b], fwd, NULL, q, k, v, scale, &m);
        double ef = rel_l2(fwd, fwd_want, nqv);
        CHECK(ef <= 1e-5, "forward: n_q %lld at %lld over %lld keys, %d/%d heads of %d, window %d, groups %d, pad %d, "
              "%lld rows a chunk: rel L2 %.3g", (long long)cs->n_q, (long long)cs->q_pos0, (long long)cs->n_keys, cs->H,
              cs->KVH, cs->D, cs->window, cs->groups, cs->pad,
              (long long)att_gemm_rows(cs->n_q, cs->n_keys, cs->H, cs->D, budgets[b]), ef);
        const char *what[3] = {"dq", "dk", "dv"};
        size_t at[3] = {0, nqv, nqv + nkv}, n[3] = {nqv, nkv, nkv};
        for (int o = 0; o < 3; o++) {
            double e = rel_l2(got + at[o], want + at[o], n[o]);
            CHECK(e <= 1e-5, "%s: n_q %lld at %lld over %lld keys, %d/%d heads of %d, window %d, groups %d, pad %d, "
                  "%lld rows a chunk: rel L2 %.3g", what[o], (long long)cs->n_q, (long long)cs->q_pos0,
                  (long long)cs->n_keys, cs->H, cs->KVH, cs->D, cs->window, cs->groups, cs->pad,
                  (long long)att_gemm_rows(cs->n_q, cs->n_keys, cs->H, cs->D, budgets[b]), e);
        }
    }
    free(q); free(k); free(v); free(dout); free(dk0); free(dv0);
    free(valid); free(group); free(want); free(got); free(fwd_want); free(fwd);
}

/* Which keys a chunk takes: the window's start, the causal end without
 * image blocks, every key after the first with them. */
static void test_chunk_keys(void) {
    AttChunk c = att_gemm_chunk(40, 8, 0, 100, 16, 0, 8, 2, 64, 0.125f);
    CHECK(c.k0 == 25 && c.nk == 23, "window 16 from query 40, causal to 47: keys 25..47 (%lld, %lld)", (long long)c.k0,
          (long long)c.nk);
    c = att_gemm_chunk(40, 8, 0, 100, 16, 1, 8, 2, 64, 0.125f);
    CHECK(c.k0 == 25 && c.nk == 75, "an image block may reach every later key");
    c = att_gemm_chunk(0, 8, 20, 100, 0, 0, 8, 2, 64, 0.125f);
    CHECK(c.k0 == 0 && c.nk == 28, "queries at 20..27 see keys 0..27");
    c = att_gemm_chunk(0, 4, 50, 10, 4, 0, 8, 2, 64, 0.125f);
    CHECK(c.nk == 0, "no key within the window");
    CHECK(att_gemm_rows(1000, 1000, 8, 256, 1) == 1, "a query row whatever the budget");
    CHECK(att_gemm_rows(10, 10, 8, 256, ATT_GEMM_BUDGET) == 10, "never more rows than queries");
    CHECK(att_gemm_scratch_bytes(0, 10, 8, 256, ATT_GEMM_BUDGET) == 0, "no queries, no scratch");
}

int main(void) {
    KnBackend cpu;
    GfError err;
    KnBackendOptions o = {.n_threads = 1};
    CHECK(kn_backend_open(KN_DEVICE_CPU, 0, &o, &cpu, &err) == GF_OK, "cpu backend: %s", err.message);
    test_chunk_keys();
    const Case cases[] = {
        {45, 0, 45, 8, 2, 32, 0, 1, 0},  /* causal with an image block (keys 10..18 and 25..28 both ways) */
        {45, 0, 45, 8, 2, 32, 16, 1, 0}, /* and a sliding window */
        {33, 0, 33, 4, 4, 24, 0, 0, 0},  /* one head per KV head, causal only: the keys end at the chunk */
        {33, 0, 33, 4, 4, 24, 5, 0, 6},  /* a short window over left padding: the first queries see nothing */
        {20, 0, 20, 6, 1, 16, 0, 1, 0},  /* six heads over one KV head */
        {6, 30, 36, 4, 2, 8, 0, 0, 0},   /* queries after a cache of 30 keys */
        {6, 30, 36, 4, 2, 8, 8, 1, 0},
        {4, 50, 10, 2, 1, 8, 4, 0, 0},   /* queries past every key of their window: dq 0, dk and dv as given */
        {64, 0, 64, 2, 2, 256, 0, 1, 0}, /* Gemma's sliding head dim */
        {17, 0, 17, 4, 2, 512, 9, 1, 2}, /* and its full one */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) run_case(&cpu, &cases[i]);
    kn_backend_close(&cpu);
    return check_done("att_gemm");
}
