/* cuda_attention.cu - attention over contiguous or paged keys, and its
 * gradient. The keys pass in chunks of CHUNK, each warp scoring a few of
 * them, and the output is accumulated with an online softmax (running
 * maximum and sum), so no T x T score matrix is ever stored; a block takes
 * QT queries of one head, or a decode step's query for up to QT heads of
 * one KV head, sharing each chunk loaded into shared memory.
 * Keys the mask hides are never read (a paged block given back may be -1).
 * A paged store may hold bfloat16 (serving's KV cache): each element is
 * widened exactly as its chunk is loaded, and the arithmetic is the
 * float32 path's, so the result is that of the widened store.
 * The gradient (training only, where nothing has to equal a decode step)
 * is matmuls on cuBLAS over chunks of queries (att_gemm.h): the chunk's
 * scores, their softmax and dS stored in the scratch, dq, dk and dv as
 * products with them, so that the tensor cores take its arithmetic in the
 * BF16 precision; no atomics, and dk and dv summed in cuBLAS's order. */
#include <math.h>
#include <stdio.h>

#include "att_gemm.h"
#include "cuda_impl.h"

#define CHUNK 32

typedef struct {
    const void *k, *v;        /* float32, or bfloat16 when kv16 */
    const int32_t *table;     /* NULL: contiguous */
    int64_t blk;
    const uint8_t *valid;
    const int32_t *group;
    int window;
    int64_t n_q, q_pos0, n_keys;
    int n_heads, n_kv_heads, dim;
    float scale;
    int hp;                   /* the forward tile's heads (attention_tile): 1, or packed for one query */
    int kv16;                 /* k and v hold bfloat16, widened as they are loaded */
} AttArgs;

/* Where key's row of KV head kvh starts in the stores (elements). */
static __device__ __forceinline__ int64_t kv_offset(const AttArgs &a, int64_t key, int kvh) {
    int64_t slot = a.table ? (int64_t)a.table[key / a.blk] * a.blk + key % a.blk : key;
    return (slot * a.n_kv_heads + kvh) * a.dim;
}

/* The forward, QT queries of one head per block: each chunk of CHUNK keys
 * (and then its values) is loaded once into shared memory for all of them,
 * and skipped whole when none of them sees any of its keys. Each query's
 * arithmetic is the one-query kernel's, in the same order (a warp's lanes
 * striding the dimensions of q . k, then a butterfly sum; one thread's
 * running maximum and sum over the chunk in key order; each output
 * dimension rescaled, then the chunk's values added in key order), so a
 * query gets the same bits whatever tile, prompt or batch it is in: a
 * prefill and the decode steps it replaces agree exactly. */
#define QT 8
#define TILE_THREADS 256
#define TILE_WARPS (TILE_THREADS / 32)
#define TILE_PER_THREAD (QT * 1024 / TILE_THREADS) /* outputs per thread at head_dim 1024 */
static_assert(QT * CHUNK == TILE_THREADS, "a thread per (slot, key) pair of a chunk");

static size_t tile_smem(int dim) { return ((size_t)QT * dim + (size_t)CHUNK * dim) * sizeof(float); }

/* One warp, lane j taking key k0 + j: which of the tile's ns slots (slot
 * i: the query at position qpos0 + i / hp) see it (vis[i][j]), where its
 * row starts in k and v (row[j], -1 when no slot sees it, so that it is
 * never read: a paged block given back may be -1) and, in *any, whether any
 * slot sees any key of the chunk. */
static_assert(CHUNK == 32, "chunk_rows takes a key per lane of one warp");
static __device__ void chunk_rows(const AttArgs &a, int64_t k0, int ns, int hp, int64_t qpos0, int kvh,
                                  uint8_t (*vis)[CHUNK], int64_t *row, int *any) {
    int j = threadIdx.x & 31, seen = 0;
    int64_t key = k0 + j;
    for (int i = 0; i < QT; i++) {
        uint8_t v = i < ns && key < a.n_keys && mask_visible(a.valid, a.group, a.window, qpos0 + i / hp, key);
        vis[i][j] = v;
        seen |= v;
    }
    row[j] = seen ? kv_offset(a, key, kvh) : -1;
    int some = __any_sync(0xffffffffu, seen);
    if (j == 0) *any = some;
}

/* An element of a store as float: bfloat16 widened exactly. */
static __device__ __forceinline__ float widen(float x) { return x; }
static __device__ __forceinline__ float widen(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

/* Four elements from p (16-byte aligned for float, 8 for bfloat16). */
static __device__ __forceinline__ float4 load4(const float *p) { return __ldg((const float4 *)p); }
static __device__ __forceinline__ float4 load4(const uint16_t *p) {
    ushort4 h = __ldg((const ushort4 *)p);
    return make_float4(widen(h.x), widen(h.y), widen(h.z), widen(h.w));
}

/* The chunk's rows of src (keys or values) into kv[CHUNK][dim], zeros for
 * the rows no query sees; four elements a load when vec4 (dim a multiple
 * of 4, k and v aligned as load4 asks). The loops are unrolled so that a
 * thread's loads (8 at head_dim 256, 16 at 512) are in flight together: a
 * decode step's attention waits on little else (the H200's profile: 48 us
 * a layer for a few chunks). */
template <typename T>
static __device__ __forceinline__ void chunk_load_as(float *kv, const T *src, const int64_t *row, int dim, int vec4) {
    if (vec4) {
        int d4 = dim / 4;
#pragma unroll 8
        for (int e = threadIdx.x; e < CHUNK * d4; e += TILE_THREADS) {
            int64_t r = row[e / d4];
            ((float4 *)kv)[e] = r >= 0 ? load4(src + r + 4 * (e % d4)) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        return;
    }
#pragma unroll 8
    for (int e = threadIdx.x; e < CHUNK * dim; e += TILE_THREADS) {
        int64_t r = row[e / dim];
        kv[e] = r >= 0 ? widen(__ldg(src + r + e % dim)) : 0.0f;
    }
}

/* chunk_load_as over a float32 store, or a bfloat16 one when kv16. */
static __device__ __forceinline__ void chunk_load(float *kv, const void *store, int kv16, const int64_t *row, int dim,
                                                  int vec4) {
    if (kv16) chunk_load_as(kv, (const uint16_t *)store, row, dim, vec4);
    else chunk_load_as(kv, (const float *)store, row, dim, vec4);
}

/* The order a query's keys are summed in, the same on every path so that
 * a decode step equals its prefill bit for bit however it is split: the
 * keys fall into runs of ATT_RUN (key t in run t / ATT_RUN), run g into
 * stream g % ATT_STREAMS. A stream's runs are summed in order by the online
 * softmax, chunk by chunk, from nothing; then the streams' sums are merged
 * in stream order (att_merge). One block may take every stream of a tile
 * in turn, or ATT_STREAMS blocks one stream each and k_att_merge merges
 * them (a decode step's few rows over a long context). A context of up to
 * ATT_RUN keys has one stream, merged exactly as it was summed. */
#define ATT_RUN 64
#define ATT_STREAMS 8
static_assert(ATT_RUN % CHUNK == 0, "a run is whole chunks");

/* Merges a stream's (m, l) into the running (*M, *L): 0 (the stream saw
 * nothing: keep), 1 (nothing before it: take the stream's sums) or 2 (sum
 * both, the running one times *fa, the stream's times *fb). */
static __device__ __forceinline__ int att_merge(float *M, float *L, float m, float l, float *fa, float *fb) {
    if (m == -INFINITY) return 0;
    if (*M == -INFINITY) {
        *M = m;
        *L = l;
        return 1;
    }
    float nm = fmaxf(*M, m);
    *fa = expf(*M - nm);
    *fb = expf(m - nm);
    *L = __fmaf_rn(*L, *fa, __fmul_rn(l, *fb));
    *M = nm;
    return 2;
}

/* An output element after a merge of mode (att_merge): tot the running
 * sum, acc the stream's. */
static __device__ __forceinline__ float att_merged(int mode, float tot, float acc, float fa, float fb) {
    return mode == 1 ? acc : mode == 2 ? __fmaf_rn(tot, fa, __fmul_rn(acc, fb)) : tot;
}

/* One stream's (m, l, acc[dim]) of a query row and head, in the split's
 * partial sums: [row][head][stream]. */
static __device__ __forceinline__ float *att_part(float *part, int64_t row, int h, int r, const AttArgs &a) {
    return part + (((size_t)row * (size_t)a.n_heads + (size_t)h) * ATT_STREAMS + (size_t)r) * (size_t)(a.dim + 2);
}

/* Tile `tile` of a: QT slots, slot i the query i0 + i / hp of head h0 + i %
 * hp (queries i0 = tile * QT / hp.., heads h0 = blockIdx.y * hp.. of one
 * KV head; a decode step's one query takes hp heads, so that they share
 * each chunk of keys and values). Each slot's arithmetic is the same
 * whatever else is in its tile. stream < 0: every stream, merged, into
 * out (the running sums kept there until the end); else that stream's sums
 * into part (att_part). One compiled body for every forward kernel, so
 * all give the same bits. */
static __device__ __noinline__ void attention_tile(float *out, const float *q, const AttArgs a, int64_t tile, int stream,
                                                   float *part) {
    extern __shared__ __align__(16) float sm[];
    float *qs = sm, *kv = sm + QT * a.dim; /* [QT][dim], then one chunk's keys or values [CHUNK][dim] */
    __shared__ float s[QT][CHUNK], p[QT][CHUNK], alpha_sh[QT], l_sh[QT], m_sh[QT];
    __shared__ float M_sh[QT], L_sh[QT], fa_sh[QT], fb_sh[QT]; /* the streams merged so far, and this merge */
    __shared__ int mode_sh[QT];
    __shared__ uint8_t vis[QT][CHUNK];
    __shared__ int64_t row_sh[CHUNK]; /* where key j's row starts in k and v; -1: no slot of the tile sees it */
    __shared__ int any_sh;
    int hp = a.hp, qt = QT / hp;
    int64_t i0 = tile * qt;
    int h0 = (int)blockIdx.y * hp, kvh = h0 / (a.n_heads / a.n_kv_heads), tid = threadIdx.x, lane = tid & 31,
        warp = tid >> 5;
    int nq = a.n_q - i0 < qt ? (int)(a.n_q - i0) : qt, ns = nq * hp; /* slots in use: the first ns */
#define SLOT_AT(i) ((((i0) + (i) / hp) * a.n_heads + h0 + (i) % hp) * a.dim) /* slot i's row in q and out */
#pragma unroll 8
    for (int e = tid; e < QT * a.dim; e += TILE_THREADS) {
        int i = e / a.dim;
        qs[e] = i < ns ? q[SLOT_AT(i) + e % a.dim] : 0.0f;
    }
    if (tid < QT) {
        M_sh[tid] = -INFINITY;
        L_sh[tid] = 0.0f;
    }
    int vec4 = a.dim % 4 == 0 && (((uintptr_t)a.k | (uintptr_t)a.v) & (a.kv16 ? 7 : 15)) == 0;
    /* the chunks before the window of the tile's first query: no slot sees them, so skipping them changes nothing */
    int64_t k_lo = a.window > 0 ? a.q_pos0 + i0 - a.window + 1 : 0;
    k_lo = k_lo > 0 ? k_lo / CHUNK * CHUNK : 0;
    float acc[TILE_PER_THREAD];
    for (int r = stream < 0 ? 0 : stream; r < (stream < 0 ? ATT_STREAMS : stream + 1); r++) {
        if (tid < QT) {
            m_sh[tid] = -INFINITY;
            l_sh[tid] = 0.0f;
        }
#pragma unroll
        for (int t = 0; t < TILE_PER_THREAD; t++) acc[t] = 0.0f;
        int64_t g = k_lo / ATT_RUN; /* the stream's first run that reaches k_lo */
        g = g <= r ? r : r + (g - r + ATT_STREAMS - 1) / ATT_STREAMS * ATT_STREAMS;
        for (int64_t g0 = g * ATT_RUN; g0 < a.n_keys; g0 += (int64_t)ATT_STREAMS * ATT_RUN)
            for (int64_t k0 = g0 > k_lo ? g0 : k_lo; k0 < g0 + ATT_RUN && k0 < a.n_keys; k0 += CHUNK) {
                __syncthreads(); /* vis, row_sh and any_sh of the chunk before are read no more */
                if (warp == 0) chunk_rows(a, k0, ns, hp, a.q_pos0 + i0, kvh, vis, row_sh, &any_sh);
                __syncthreads();
                if (!any_sh) continue; /* no slot sees the chunk: its state stays as it is */
                chunk_load(kv, a.k, a.kv16, row_sh, a.dim, vec4); /* unseen keys are never read */
                __syncthreads();
                for (int pr = warp; pr < QT * CHUNK; pr += TILE_WARPS) {
                    int qi = pr / CHUNK, j = pr % CHUNK;
                    float dot = 0.0f;
                    if (vis[qi][j]) { /* uniform over the warp */
                        for (int d = lane; d < a.dim; d += 32) dot += qs[qi * a.dim + d] * kv[j * a.dim + d];
                        dot = warp_sum(dot);
                    }
                    if (lane == 0) s[qi][j] = vis[qi][j] ? dot * a.scale : -INFINITY;
                }
                __syncthreads();
                if (tid < QT) { /* the slot's new maximum, and what its sums so far are scaled by */
                    float m = m_sh[tid], cm = m;
                    for (int j = 0; j < CHUNK; j++) cm = fmaxf(cm, s[tid][j]);
                    alpha_sh[tid] = cm == -INFINITY || m == -INFINITY ? 0.0f : expf(m - cm);
                    m_sh[tid] = cm;
                }
                __syncthreads();
                { /* every (slot, key) weight at once: QT * CHUNK = TILE_THREADS of them */
                    int qi = tid / CHUNK, j = tid % CHUNK;
                    p[qi][j] = s[qi][j] == -INFINITY ? 0.0f : expf(s[qi][j] - m_sh[qi]);
                }
                chunk_load(kv, a.v, a.kv16, row_sh, a.dim, vec4); /* the values replace the keys (all scored) */
                __syncthreads();
                if (tid < QT) { /* the weights summed in key order */
                    float ps = 0.0f;
                    for (int j = 0; j < CHUNK; j++) ps += p[tid][j];
                    l_sh[tid] = l_sh[tid] * alpha_sh[tid] + ps;
                }
#pragma unroll
                for (int t = 0; t < TILE_PER_THREAD; t++) {
                    int e = tid + t * TILE_THREADS, qi = e / a.dim, d = e % a.dim;
                    if (qi >= ns) break;
                    float v = acc[t] * alpha_sh[qi];
                    for (int j = 0; j < CHUNK; j++)
                        if (p[qi][j] != 0.0f) v += p[qi][j] * kv[j * a.dim + d];
                    acc[t] = v;
                }
            }
        __syncthreads(); /* the stream's m_sh and l_sh are final */
        if (stream >= 0) { /* this stream's sums for k_att_merge */
            if (tid < ns) {
                float *pt = att_part(part, i0 + tid / hp, h0 + tid % hp, r, a);
                pt[0] = m_sh[tid];
                pt[1] = l_sh[tid];
            }
#pragma unroll
            for (int t = 0; t < TILE_PER_THREAD; t++) {
                int e = tid + t * TILE_THREADS, qi = e / a.dim, d = e % a.dim;
                if (qi >= ns) break;
                att_part(part, i0 + qi / hp, h0 + qi % hp, r, a)[2 + d] = acc[t];
            }
            return;
        }
        if (tid < QT) mode_sh[tid] = att_merge(&M_sh[tid], &L_sh[tid], m_sh[tid], l_sh[tid], &fa_sh[tid], &fb_sh[tid]);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < TILE_PER_THREAD; t++) {
            int e = tid + t * TILE_THREADS, qi = e / a.dim, d = e % a.dim;
            if (qi >= ns) break;
            float *o = &out[SLOT_AT(qi) + d];
            if (mode_sh[qi]) *o = att_merged(mode_sh[qi], mode_sh[qi] == 2 ? *o : 0.0f, acc[t], fa_sh[qi], fb_sh[qi]);
        }
        __syncthreads(); /* mode_sh, fa_sh, fb_sh and m_sh are rewritten next */
    }
#pragma unroll
    for (int t = 0; t < TILE_PER_THREAD; t++) {
        int e = tid + t * TILE_THREADS, qi = e / a.dim, d = e % a.dim;
        if (qi >= ns) break;
        float *o = &out[SLOT_AT(qi) + d];
        *o = M_sh[qi] == -INFINITY ? 0.0f : *o / L_sh[qi]; /* no visible key: zeros */
    }
#undef SLOT_AT
}

/* out[row, h, d] from the streams' sums of a split (attention_tile's
 * stream >= 0), merged in stream order as one block merges them. */
static __global__ void k_att_merge(float *out, float *part, AttArgs a, int64_t rows) {
    size_t n = (size_t)rows * (size_t)a.n_heads * (size_t)a.dim;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t row = (int64_t)(e / ((size_t)a.n_heads * a.dim));
        int h = (int)(e / (size_t)a.dim % (size_t)a.n_heads), d = (int)(e % (size_t)a.dim);
        float M = -INFINITY, L = 0.0f, tot = 0.0f, fa = 0.0f, fb = 0.0f;
        for (int r = 0; r < ATT_STREAMS; r++) {
            const float *pt = att_part(part, row, h, r, a);
            int mode = att_merge(&M, &L, pt[0], pt[1], &fa, &fb);
            tot = att_merged(mode, tot, pt[2 + d], fa, fb);
        }
        out[e] = M == -INFINITY ? 0.0f : tot / L;
    }
}

/* One sequence's tiles; with part, its one query's streams (blockIdx.x)
 * for k_att_merge. */
static __global__ void k_attention(float *out, const float *q, AttArgs a, float *part) {
    if (part) attention_tile(out, q, a, 0, (int)blockIdx.x, part);
    else attention_tile(out, q, a, blockIdx.x, -1, NULL);
}

/* A batch's sequences launched together: up to ATT_GROUP of them by value
 * in the kernel's parameters, blockIdx.z picking one, its first position
 * read from pos (so a decode step's parameters are the same every step);
 * a block past its sequence's queries has nothing to do. */
#define ATT_GROUP 32
typedef struct {
    KnAttnSeq s[ATT_GROUP];
} AttSeqs;

static __global__ void k_attention_batch(float *out, const float *q, const int32_t *pos, AttArgs a, AttSeqs g,
                                         float *part) {
    const KnAttnSeq &s = g.s[blockIdx.z];
    int64_t tile = part ? 0 : blockIdx.x; /* with part (every sequence one query): blockIdx.x is the stream */
    if (s.n_q != 1) a.hp = 1; /* a.hp heads share a tile of a decode step's one query */
    if (tile * (QT / a.hp) >= s.n_q || (int)blockIdx.y * a.hp >= a.n_heads) return; /* the whole block */
    a.table = s.table;
    a.valid = s.valid;
    a.group = s.group;
    a.n_q = s.n_q;
    a.q_pos0 = pos[s.row0];
    a.n_keys = a.q_pos0 + s.n_q;
    size_t at = (size_t)s.row0 * (size_t)a.n_heads * (size_t)a.dim;
    if (part) attention_tile(out + at, q + at, a, 0, (int)blockIdx.x, att_part(part, s.row0, 0, 0, a));
    else attention_tile(out + at, q + at, a, tile, -1, NULL);
}

/* One sequence of one query row per blockIdx.z, described in device
 * memory (KnAttnRow): what k_attention_batch computes for that row; with
 * part, its streams (blockIdx.x) for k_att_merge. */
static __global__ void k_attention_rows(float *out, const float *q, const int32_t *pos, AttArgs a,
                                        const KnAttnRow *rows, float *part) {
    const KnAttnRow s = rows[blockIdx.z];
    a.table = s.table;
    a.valid = s.valid;
    a.group = s.group;
    a.n_q = 1;
    a.q_pos0 = pos[blockIdx.z];
    a.n_keys = a.q_pos0 + 1;
    size_t at = (size_t)blockIdx.z * (size_t)a.n_heads * (size_t)a.dim;
    if (part) attention_tile(out + at, q + at, a, 0, (int)blockIdx.x, att_part(part, blockIdx.z, 0, 0, a));
    else attention_tile(out + at, q + at, a, 0, -1, NULL);
}

static int att_ok(CudaCtx *c, int dim, int n_heads, int n_kv_heads, const char *what) {
    if (dim > 0 && dim <= 1024 && n_kv_heads > 0 && n_heads % n_kv_heads == 0) return 1;
    cuda_note(c, cudaErrorInvalidValue, what); /* a shape the kernel does not take: reported at synchronize */
    return 0;
}

/* Heads a tile of one query takes (attention_tile): the most, up to QT, a
 * power of two dividing the heads of a KV head. */
static int heads_packed(int n_heads, int n_kv_heads) {
    int g = n_heads / n_kv_heads, hp = 1;
    while (2 * hp <= QT && g % (2 * hp) == 0) hp *= 2;
    return hp;
}

/* The partial sums of a decode step's rows split by stream (attention_tile),
 * in the context's scratch; NULL when the step does not split: its rows
 * and heads already fill the device (rows * heads / hp tiles of at least
 * ATT_SPLIT_BELOW), or the scratch cannot grow (then unsplit, which sums
 * the same bits). */
#define ATT_SPLIT_BELOW 1024
static float *att_split(CudaCtx *c, int64_t rows, const AttArgs &a, const char *what) {
    if (rows * (a.n_heads / a.hp) >= ATT_SPLIT_BELOW) return NULL;
    size_t bytes = (size_t)rows * (size_t)a.n_heads * ATT_STREAMS * (size_t)(a.dim + 2) * sizeof(float);
    return (float *)cuda_scratch(c, bytes, what);
}

/* 1 when seqs are a decode step's rows in one launch: one query each, at
 * rows 0 .. n_seqs - 1 (each once), n_seqs <= ATT_GROUP; then the step may
 * split its streams (att_split) as attention_rows does. */
static int decode_rows(const KnAttnSeq *seqs, int n_seqs) {
    uint32_t seen = 0;
    if (n_seqs > ATT_GROUP) return 0;
    for (int i = 0; i < n_seqs; i++) {
        if (seqs[i].n_q != 1 || seqs[i].row0 < 0 || seqs[i].row0 >= n_seqs || (seen >> seqs[i].row0 & 1u)) return 0;
        seen |= 1u << seqs[i].row0;
    }
    return 1;
}

static void launch_merge(CudaCtx *c, float *out, float *part, const AttArgs &a, int64_t rows, const char *what) {
    size_t n = (size_t)rows * (size_t)a.n_heads * (size_t)a.dim;
    k_att_merge<<<cuda_blocks(n, 256), 256, 0, c->stream>>>(out, part, a, rows);
    CUDA_LAUNCHED(c, what);
}

/* The dynamic shared memory of one of the tile kernels for dim, once the
 * shape is checked (att_ok); 0 when the shape is refused. The kernels may
 * take it since the context opened (cuda_attention_open). */
static size_t att_smem(CudaCtx *c, int dim, int n_heads, int n_kv_heads, const char *what) {
    return att_ok(c, dim, n_heads, n_kv_heads, what) ? tile_smem(dim) : 0;
}

static void launch_attention(const KnCtx *ctx, float *out, const float *q, AttArgs a, const char *what) {
    if (a.n_q <= 0 || a.n_heads <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    size_t smem = att_smem(c, a.dim, a.n_heads, a.n_kv_heads, what);
    if (!smem) return;
    a.hp = a.n_q == 1 ? heads_packed(a.n_heads, a.n_kv_heads) : 1;
    int qt = QT / a.hp;
    float *part = a.n_q == 1 ? att_split(c, 1, a, what) : NULL;
    dim3 grid(part ? ATT_STREAMS : (unsigned)((a.n_q + qt - 1) / qt), (unsigned)(a.n_heads / a.hp));
    k_attention<<<grid, TILE_THREADS, smem, c->stream>>>(out, q, a, part);
    CUDA_LAUNCHED(c, what);
    if (part) launch_merge(c, out, part, a, 1, what);
}

void cuda_attention_batch(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                          const void *v, KnDtype kv, int64_t block_len, const KnAttnSeq *seqs, int n_seqs,
                          int n_heads, int n_kv_heads, int dim, float scale, int window) {
    if (n_seqs <= 0 || n_heads <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    size_t smem = att_smem(c, dim, n_heads, n_kv_heads, "attention_batch");
    if (!smem) return;
    AttArgs a = {k, v, NULL, block_len, NULL, NULL, window, 0, 0, 0, n_heads, n_kv_heads, dim, scale,
                 heads_packed(n_heads, n_kv_heads), kv == KN_BF16};
    /* a decode step's rows split their streams over blocks (one group: decode_rows) */
    float *part = decode_rows(seqs, n_seqs) ? att_split(c, n_seqs, a, "attention_batch") : NULL;
    for (int s0 = 0; s0 < n_seqs; s0 += ATT_GROUP) {
        AttSeqs g;
        int ng = n_seqs - s0 < ATT_GROUP ? n_seqs - s0 : ATT_GROUP;
        int64_t tiles = 0;
        for (int i = 0; i < ng; i++) {
            g.s[i] = seqs[s0 + i];
            int64_t t = (g.s[i].n_q + QT - 1) / QT;
            if (t > tiles) tiles = t;
        }
        if (tiles == 0) continue;
        dim3 grid(part ? ATT_STREAMS : (unsigned)tiles, (unsigned)n_heads, (unsigned)ng);
        k_attention_batch<<<grid, TILE_THREADS, smem, c->stream>>>(out, q, pos, a, g, part);
        CUDA_LAUNCHED(c, "attention_batch");
    }
    if (part) launch_merge(c, out, part, a, n_seqs, "attention_batch");
}

void cuda_attention_rows(const KnCtx *ctx, float *out, const float *q, const int32_t *pos, const void *k,
                         const void *v, KnDtype kv, int64_t block_len, const KnAttnRow *rows, int64_t n, int n_heads,
                         int n_kv_heads, int dim, float scale, int window) {
    if (n <= 0 || n_heads <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (n > 65535) { /* one row per grid z index */
        cuda_note(c, cudaErrorInvalidValue, "attention_rows");
        return;
    }
    size_t smem = att_smem(c, dim, n_heads, n_kv_heads, "attention_rows");
    if (!smem) return;
    AttArgs a = {k, v, NULL, block_len, NULL, NULL, window, 0, 0, 0, n_heads, n_kv_heads, dim, scale,
                 heads_packed(n_heads, n_kv_heads), kv == KN_BF16};
    float *part = att_split(c, n, a, "attention_rows");
    dim3 grid(part ? ATT_STREAMS : 1, (unsigned)(n_heads / a.hp), (unsigned)n);
    k_attention_rows<<<grid, TILE_THREADS, smem, c->stream>>>(out, q, pos, a, rows, part);
    CUDA_LAUNCHED(c, "attention_rows");
    if (part) launch_merge(c, out, part, a, n, "attention_rows");
}

void cuda_attention(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                    int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                    const KnMask *mask) {
    AttArgs a = {k, v, NULL, 1, mask->valid, mask->group, mask->window, n_q, q_pos0, n_keys, n_heads, n_kv_heads,
                 dim, scale, 1, 0};
    launch_attention(ctx, out, q, a, "attention");
}

void cuda_attention_paged(const KnCtx *ctx, float *out, const float *q, const KnKv *kv, int64_t n_q, int64_t q_pos0,
                          int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale, const KnMask *mask) {
    AttArgs a = {kv->k, kv->v, kv->table, kv->block_len, mask->valid, mask->group, mask->window, n_q, q_pos0, n_keys,
                 n_heads, n_kv_heads, dim, scale, 1, 0};
    launch_attention(ctx, out, q, a, "attention_paged");
}

/* ---- attention_bulk and the gradient: matmuls over chunks of queries (att_gemm.h) ---------- */

/* Packs the chunk's rows of src ([n_q, n_heads, dim]) into dst ([b][i][g][d]),
 * or, unpacking, the packed src into dst's rows. */
static __global__ void k_att_pack(float *dst, const float *src, AttChunk ch, int unpack) {
    size_t n = (size_t)ch.n_heads * (size_t)ch.nq * (size_t)ch.dim;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        int64_t at = att_pack_at((int64_t)e, &ch);
        if (unpack) dst[at] = src[e];
        else dst[e] = src[at];
    }
}

/* Row blockIdx.x of the chunk's scores s[rows, nk] (already scaled) becomes
 * the softmax over the keys its query sees, 0 at every other key (a row
 * that sees none is all 0). */
static __global__ void k_att_softmax(float *s, AttChunk ch, int64_t q_pos0, KnMask m) {
    __shared__ float sh[32];
    int64_t r = blockIdx.x, qpos = q_pos0 + ch.q0 + att_row_query(r, &ch);
    float *row = s + r * ch.nk, mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < ch.nk; j += blockDim.x)
        if (mask_visible(m.valid, m.group, m.window, qpos, ch.k0 + j)) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, sh);
    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < ch.nk; j += blockDim.x) {
        float e = mx != -INFINITY && mask_visible(m.valid, m.group, m.window, qpos, ch.k0 + j) ? expf(row[j] - mx) : 0.0f;
        row[j] = e;
        sum += e;
    }
    sum = block_sum(sum, sh);
    for (int64_t j = threadIdx.x; j < ch.nk; j += blockDim.x) row[j] = sum > 0.0f ? row[j] / sum : 0.0f;
}

/* Row blockIdx.x: dp[j] = p[j] (dp[j] - sum_u p[u] dp[u]) scale (dS). */
static __global__ void k_att_softmax_dx(float *dp, const float *p, AttChunk ch) {
    __shared__ float sh[32];
    int64_t r = blockIdx.x;
    float *g = dp + r * ch.nk;
    const float *pr = p + r * ch.nk;
    float dot = 0.0f;
    for (int64_t j = threadIdx.x; j < ch.nk; j += blockDim.x) dot += pr[j] * g[j];
    dot = block_sum(dot, sh);
    for (int64_t j = threadIdx.x; j < ch.nk; j += blockDim.x) g[j] = pr[j] * (g[j] - dot) * ch.scale;
}

/* One strided batched GEMM of the plan: float32 in and out, summed in
 * float32; the BF16 precision lets cuBLAS round the operands to bfloat16
 * for the tensor cores, the FP32 one keeps them (the handle's math is
 * pedantic there: no TF32). */
static void att_gemm_run(CudaCtx *c, const AttGemm *g, const char *what) {
    cublasComputeType_t ct = c->bf16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
    cuda_blas_note(c,
                   cublasGemmStridedBatchedEx(c->blas, g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                                              g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, (int)g->m, (int)g->n, (int)g->k,
                                              &g->alpha, g->a, CUDA_R_32F, (int)g->lda, g->stride_a, g->b, CUDA_R_32F,
                                              (int)g->ldb, g->stride_b, &g->beta, g->c, CUDA_R_32F, (int)g->ldc,
                                              g->stride_c, (int)g->batch, ct, CUBLAS_GEMM_DEFAULT),
                   what);
}

size_t cuda_attention_dx_scratch(int64_t n_q, int n_heads, int dim) {
    return att_gemm_scratch_bytes(n_q, n_q, n_heads, dim, ATT_GEMM_BUDGET);
}

/* The chunk's packed queries and their softmax weights P (bf.qp, bf.s). */
static void chunk_weights(CudaCtx *c, const AttChunk &ch, const AttGemmBufs &bf, const AttGemm *g, const float *q,
                          int64_t q_pos0, const KnMask *mask, const char *what) {
    size_t packed = (size_t)ch.n_heads * (size_t)ch.nq * (size_t)ch.dim;
    k_att_pack<<<cuda_blocks(packed, 256), 256, 0, c->stream>>>(bf.qp, q, ch, 0);
    CUDA_LAUNCHED(c, what);
    att_gemm_run(c, &g[ATT_GEMM_S], what);
    k_att_softmax<<<(unsigned)(ch.n_heads * ch.nq), 256, 0, c->stream>>>(bf.s, ch, q_pos0, *mask);
    CUDA_LAUNCHED(c, what);
}

/* The chunk's packed result (in bf.dqp) into its rows of out; 0 there when
 * its queries see no key. */
static void chunk_unpack(CudaCtx *c, const AttChunk &ch, const AttGemmBufs &bf, float *out, const char *what) {
    size_t packed = (size_t)ch.n_heads * (size_t)ch.nq * (size_t)ch.dim;
    if (ch.nk <= 0) {
        cuda_note(c, cudaMemsetAsync(out + ch.q0 * ch.n_heads * ch.dim, 0, packed * sizeof(float), c->stream), what);
        return;
    }
    k_att_pack<<<cuda_blocks(packed, 256), 256, 0, c->stream>>>(out, bf.dqp, ch, 1);
    CUDA_LAUNCHED(c, what);
}

/* The scratch of a call over n_q queries and n_keys keys, cut into the
 * plan's buffers; NULL (the context's fault noted) when it cannot grow.
 * *rows: the queries of each chunk. */
static float *att_gemm_scratch(CudaCtx *c, int64_t n_q, int64_t n_keys, int n_heads, int dim, int64_t *rows,
                               AttGemmBufs *bf, const char *what) {
    *rows = att_gemm_rows(n_q, n_keys, n_heads, dim, ATT_GEMM_BUDGET);
    float *s = (float *)cuda_scratch(c, att_gemm_scratch_bytes(n_q, n_keys, n_heads, dim, ATT_GEMM_BUDGET), what);
    if (s) *bf = att_gemm_bufs(s, *rows, n_keys, n_heads, dim);
    return s;
}

/* The gradient's own arguments (attention_dx); NULL for the forward. */
typedef struct {
    float *dk, *dv;
    const float *dout;
} AttGrads;

/* The rest of a chunk of the gradient, once P is in bf.s: dS, then dV, dK
 * and dq (packed, in bf.dqp). */
static void chunk_grads(CudaCtx *c, const AttChunk &ch, const AttGemmBufs &bf, const AttGemm *g, const float *dout,
                        const char *what) {
    size_t packed = (size_t)ch.n_heads * (size_t)ch.nq * (size_t)ch.dim;
    k_att_pack<<<cuda_blocks(packed, 256), 256, 0, c->stream>>>(bf.gop, dout, ch, 0);
    CUDA_LAUNCHED(c, what);
    att_gemm_run(c, &g[ATT_GEMM_DP], what);
    k_att_softmax_dx<<<(unsigned)(ch.n_heads * ch.nq), 256, 0, c->stream>>>(bf.ds, bf.s, ch);
    CUDA_LAUNCHED(c, what);
    att_gemm_run(c, &g[ATT_GEMM_DV], what);
    att_gemm_run(c, &g[ATT_GEMM_DK], what);
    att_gemm_run(c, &g[ATT_GEMM_DQ], what);
}

/* attention_bulk (gr NULL: out is the output) or attention_dx (out is dq)
 * as the plan of att_gemm.h, chunk by chunk. */
static void attention_gemm(const KnCtx *ctx, float *out, const AttGrads *gr, const float *q, const float *k,
                           const float *v, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads,
                           int dim, float scale, const KnMask *mask, const char *what) {
    if (n_q <= 0 || n_heads <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    int64_t rows;
    AttGemmBufs bf;
    if (!att_ok(c, dim, n_heads, n_kv_heads, what) || !att_gemm_scratch(c, n_q, n_keys, n_heads, dim, &rows, &bf, what))
        return;
    for (int64_t q0 = 0; q0 < n_q; q0 += rows) {
        AttChunk ch = att_gemm_chunk(q0, n_q - q0 < rows ? n_q - q0 : rows, q_pos0, n_keys, mask->window,
                                     mask->group != NULL, n_heads, n_kv_heads, dim, scale);
        AttGemm g[ATT_GEMM_COUNT];
        att_gemm_plan(&ch, &bf, k, v, gr ? gr->dk : NULL, gr ? gr->dv : NULL, g);
        if (ch.nk > 0) { /* else out is 0 (and dk, dv get nothing) */
            chunk_weights(c, ch, bf, g, q, q_pos0, mask, what);
            if (gr) chunk_grads(c, ch, bf, g, gr->dout, what);
            else att_gemm_run(c, &g[ATT_GEMM_O], what);
        }
        chunk_unpack(c, ch, bf, out, what);
    }
}

void cuda_attention_dx(const KnCtx *ctx, float *dq, float *dk, float *dv, const float *q, const float *k,
                       const float *v, const float *dout, int64_t n_q, int64_t q_pos0, int64_t n_keys, int n_heads,
                       int n_kv_heads, int dim, float scale, const KnMask *mask) {
    AttGrads gr = {dk, dv, dout};
    attention_gemm(ctx, dq, &gr, q, k, v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask, "attention_dx");
}

void cuda_attention_bulk(const KnCtx *ctx, float *out, const float *q, const float *k, const float *v, int64_t n_q,
                         int64_t q_pos0, int64_t n_keys, int n_heads, int n_kv_heads, int dim, float scale,
                         const KnMask *mask) {
    attention_gemm(ctx, out, NULL, q, k, v, n_q, q_pos0, n_keys, n_heads, n_kv_heads, dim, scale, mask,
                   "attention_bulk");
}

cudaError_t cuda_attention_open(const CudaCtx *c, const char **what) {
    static const struct { const void *kernel; const char *name; } kernels[] = {
        {(const void *)k_attention, "attention"},          {(const void *)k_attention_batch, "attention_batch"},
        {(const void *)k_attention_rows, "attention_rows"}};
    for (size_t i = 0; i < sizeof kernels / sizeof *kernels; i++) {
        cudaError_t rc = cuda_smem_full(c, kernels[i].kernel);
        if (rc != cudaSuccess) {
            *what = kernels[i].name;
            return rc;
        }
    }
    return cudaSuccess;
}
