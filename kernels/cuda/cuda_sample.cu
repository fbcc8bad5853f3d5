/* cuda_sample.cu - the CUDA backend's sampler (ops.h sample): greedy, or a
 * draw at a temperature within the top_k tokens and the nucleus top_p, by
 * cpu_sample.c's rule and without sorting.
 *
 * Candidates (tokens within e^-40 of the best after the temperature) are
 * ordered by (probability descending, id ascending), a total order: the key
 * (P, id), P = bits(1.0f) - bits(p) < 2^29 for p in (e^-40, 1]. The top_k
 * boundary, the nucleus and the drawn token are each the smallest key
 * whose prefix (count or mass) passes a threshold. A search finds it by
 * radix: three passes over the row, each a histogram over 10, 10 and 9
 * bits of P of the candidates that share the digits found so far, then the
 * tokens of that P ordered by id. So a row drawn within top_k and top_p
 * takes one pass for the maximum and nine for the searches.
 *
 * Masses are integers, p 2^63 rounded down (every candidate's > 0), summed
 * in 128 bits: exact, so a histogram is the same whatever order its blocks
 * and threads add in (a row's draw depends on its logits and seed alone),
 * and the prefix masses are exact where the CPU's are sums in double in
 * sorted order: a draw equals the CPU's unless it lands within the CPU's
 * rounding (or expf's last bit) of a boundary.
 *
 * A row is cut into slices, a block each, so that a batch of one row
 * fills the device: a pass's blocks add their slice's histogram into the
 * row's (global atomics), and the last block of the row to finish
 * (threadfence, arrival counter) takes the step: it picks the digit, or
 * resolves the tie and starts the next search. Three histograms per row
 * rotate: pass p adds into p % 3 and clears (p + 1) % 3, which nothing
 * reads during pass p. A row that needs fewer passes (greedy, no top_k,
 * no top_p, no cut) returns at once from the rest. */
#include <math.h>

#include "cuda_impl.h"

#define SMP_THREADS 256
#define SMP_BINS 1024          /* a digit's values: 10 bits (the last digit 9) */
#define SMP_BLOCKS 264         /* blocks a call aims for: two per SM of an H100 / H200 */
#define SMP_SLICE_MIN 2048     /* a slice's fewest logits */
#define SMP_PASSES 9           /* three searches of three digits */
#define SMP_CUTOFF 40.0f
#define P_ONE 0x3F800000u      /* bits of 1.0f: P = P_ONE - bits(p) */
#define P_ALL 0xFFFFFFFFu      /* last_p before any cut: every candidate kept */
#define NO_BIN 0x7FFFFFFF

enum { ST_TOPK, ST_TOPP, ST_DRAW, ST_DONE };
enum { BY_COUNT_GE, BY_MASS_GE, BY_MASS_GT };

typedef unsigned __int128 u128;

/* One row's histogram of a digit. first holds ~(the smallest id), so that
 * cleared memory means an empty bin. */
typedef struct {
    unsigned int count[SMP_BINS];
    unsigned int first[SMP_BINS];
    unsigned long long lo[SMP_BINS], hi[SMP_BINS]; /* the mass, 128 bits */
} SmpHist;

/* One row's search, written by the last block of each kernel. */
typedef struct {
    unsigned int arrived;          /* blocks of the running kernel done */
    int stage, digit, how, forced; /* forced: nothing passes (rounding): the last kept key */
    float top, inv_t;
    int32_t best;
    uint32_t last_p;               /* the kept candidates: keys <= (last_p, last_id) */
    int32_t last_id;
    uint32_t prefix;               /* the digits of P found so far */
    unsigned long long below_n, below_lo, below_hi; /* kept candidates whose P is below them */
    double t;                      /* the search's threshold (how) */
    uint64_t rng;                  /* the row's state once it draws */
} SmpRow;

static __device__ __forceinline__ int digit_shift(int d) { return d == 0 ? 19 : d == 1 ? 9 : 0; }
static __device__ __forceinline__ int digit_bits(int d) { return d < 2 ? 10 : 9; }

/* p 2^63 rounded down: > 0 for every candidate (p > e^-40 > 2^-59). */
static __device__ __forceinline__ unsigned long long mass_units(float p) {
    return __float2ull_rz(p * 9.2233720368547758e18f);
}

static __device__ __forceinline__ double u128_double(u128 m) {
    return (double)(unsigned long long)(m >> 64) * 18446744073709551616.0 + (double)(unsigned long long)m;
}

/* 1 when token id (logit l) is a candidate kept by s; its P and probability. */
static __device__ __forceinline__ int smp_kept(const SmpRow &s, float l, int64_t id, uint32_t *P, float *p) {
    float z = (l - s.top) * s.inv_t;
    if (!(z > -SMP_CUTOFF)) return 0;
    *p = expf(z);
    *P = P_ONE - __float_as_uint(*p);
    return *P < s.last_p || (*P == s.last_p && id <= (int64_t)s.last_id);
}

static __device__ __forceinline__ int smp_passes(int how, double t, unsigned long long n, u128 m) {
    return how == BY_COUNT_GE ? (double)n >= t : how == BY_MASS_GE ? u128_double(m) >= t : u128_double(m) > t;
}

/* After this block's writes: 1 in the row's last block to arrive (which
 * then sees every block's writes), having reset the counter for the next
 * kernel. */
static __device__ int last_arrival(unsigned int *arrived, unsigned int blocks) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(arrived, 1u) == blocks - 1;
        if (last) *arrived = 0;
    }
    __syncthreads();
    if (last) __threadfence();
    return last;
}

/* This block's share of h cleared (the row's S blocks share it). */
static __device__ void clear_share(SmpHist *h) {
    unsigned int *w = (unsigned int *)h;
    size_t n = sizeof(SmpHist) / sizeof(unsigned int);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) w[i] = 0;
}

/* The stage after stage that row q needs (ST_DRAW at the latest). */
static __device__ int next_stage(const KnSampleRow &q, int stage) {
    if (stage < ST_TOPK && q.top_k > 0) return ST_TOPK;
    if (stage < ST_TOPP && q.top_p < 1.0f) return ST_TOPP;
    return stage < ST_DRAW ? ST_DRAW : ST_DONE;
}

static __device__ void begin_stage(SmpRow &s, int stage) {
    s.stage = stage;
    s.digit = 0;
    s.forced = 0;
    s.prefix = 0;
    s.below_n = s.below_lo = s.below_hi = 0;
}

/* ---- the maximum ---------------------------------------------------------------- */

/* The first maximum of l[lo, hi) over the block (-1 when empty). */
static __device__ int64_t argmax_range(const float *l, int64_t lo, int64_t hi, float *shv, long long *shi) {
    float bv = -INFINITY;
    long long bi = -1;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        if (bi < 0 || l[i] > bv) {
            bv = l[i];
            bi = i;
        }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        long long oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        shv[warp] = bv;
        shi[warp] = bi;
    }
    __syncthreads();
    bv = shv[0];
    bi = shi[0];
    for (int w = 1; w < nw; w++)
        if (shi[w] >= 0 && (bi < 0 || shv[w] > bv || (shv[w] == bv && shi[w] < bi))) {
            bv = shv[w];
            bi = shi[w];
        }
    return bi;
}

/* The row's first maximum from its slices' (in slice order), then its
 * first search set up; a greedy row takes the maximum and is done. */
static __device__ void smp_begin(int32_t *ids, KnSampleRow *rows, SmpRow *g, const float *part_v, const int64_t *part_i,
                                 int S) {
    int r = blockIdx.y;
    float bv = __ldcg(&part_v[(size_t)r * S]);
    int64_t bi = __ldcg(&part_i[(size_t)r * S]);
    for (int k = 1; k < S; k++) {
        float v = __ldcg(&part_v[(size_t)r * S + k]);
        if (v > bv) {
            bv = v;
            bi = __ldcg(&part_i[(size_t)r * S + k]);
        }
    }
    KnSampleRow q = rows[r];
    SmpRow s;
    memset(&s, 0, sizeof s);
    s.top = bv;
    s.best = (int32_t)bi;
    if (q.temperature <= 0.0f || q.top_k == 1) {
        ids[r] = (int32_t)bi;
        s.stage = ST_DONE;
    } else {
        s.inv_t = 1.0f / q.temperature;
        s.last_p = P_ALL;
        s.last_id = 0x7FFFFFFF;
        s.rng = q.rng + 0x9E3779B97F4A7C15ull; /* gf_splitmix64's advance */
        begin_stage(s, next_stage(q, -1));
    }
    *g = s;
}

static __global__ void __launch_bounds__(SMP_THREADS) k_smp_max(int32_t *ids, const float *logits, KnSampleRow *rows,
                                                                SmpRow *st, SmpHist *hist, float *part_v,
                                                                int64_t *part_i, int64_t V, int64_t L) {
    __shared__ float shv[32];
    __shared__ long long shi[32];
    int r = blockIdx.y, S = gridDim.x;
    int64_t lo = blockIdx.x * L, hi = lo + L < V ? lo + L : V;
    const float *l = logits + (size_t)r * V;
    int64_t bi = argmax_range(l, lo, hi, shv, shi);
    clear_share(hist + (size_t)r * 3); /* the first pass's */
    if (threadIdx.x == 0) {
        part_v[(size_t)r * S + blockIdx.x] = l[bi];
        part_i[(size_t)r * S + blockIdx.x] = bi;
    }
    if (!last_arrival(&st[r].arrived, (unsigned)S)) return;
    if (threadIdx.x == 0) smp_begin(ids, rows, st + r, part_v, part_i, S);
}

/* ---- the step of a pass (the row's last block) ------------------------------------ */

/* The step's view of the histogram and where it cut, in shared memory. */
typedef struct {
    unsigned long long n[SMP_THREADS]; /* each thread's four bins: their sum, then the count before them */
    u128 m[SMP_THREADS];
    unsigned long long tot_n;
    u128 tot_m;
    int found, last_bin;
    unsigned long long cut_n, bin_n; /* before the found bin; in it */
    u128 cut_m;
    unsigned int bin_first;
    int64_t tied_id;
    unsigned int warp_flags[SMP_THREADS / 32];
} SmpStep;

/* Each thread's four bins summed, then the exclusive prefix of those sums
 * over the threads (warp 0: eight threads a lane, then a shuffle scan),
 * and the totals. */
static __device__ void hist_prefix(const SmpHist *h, SmpStep *sp, unsigned long long *bn, u128 *bm) {
    int t = threadIdx.x;
    unsigned long long n = 0;
    u128 m = 0;
    for (int k = 0; k < SMP_BINS / SMP_THREADS; k++) {
        int b = t * (SMP_BINS / SMP_THREADS) + k;
        bn[k] = __ldcg(&h->count[b]);
        bm[k] = ((u128)__ldcg(&h->hi[b]) << 64) | __ldcg(&h->lo[b]);
        n += bn[k];
        m += bm[k];
    }
    sp->n[t] = n;
    sp->m[t] = m;
    __syncthreads();
    if (t < 32) {
        const int per = SMP_THREADS / 32;
        unsigned long long ln = 0;
        u128 lm = 0;
        for (int k = 0; k < per; k++) {
            ln += sp->n[t * per + k];
            lm += sp->m[t * per + k];
        }
        unsigned long long incl_n = ln, mlo = (unsigned long long)lm, mhi = (unsigned long long)(lm >> 64);
        for (int o = 1; o < 32; o <<= 1) { /* inclusive scan over the lanes */
            unsigned long long on = __shfl_up_sync(0xffffffffu, incl_n, o);
            unsigned long long olo = __shfl_up_sync(0xffffffffu, mlo, o), ohi = __shfl_up_sync(0xffffffffu, mhi, o);
            if (t >= o) {
                incl_n += on;
                u128 s = (((u128)mhi << 64) | mlo) + (((u128)ohi << 64) | olo);
                mlo = (unsigned long long)s;
                mhi = (unsigned long long)(s >> 64);
            }
        }
        unsigned long long run_n = incl_n - ln;
        u128 run_m = (((u128)mhi << 64) | mlo) - lm;
        for (int k = 0; k < per; k++) { /* exclusive, thread by thread */
            unsigned long long tn = sp->n[t * per + k];
            u128 tm = sp->m[t * per + k];
            sp->n[t * per + k] = run_n;
            sp->m[t * per + k] = run_m;
            run_n += tn;
            run_m += tm;
        }
        if (t == 31) {
            sp->tot_n = run_n;
            sp->tot_m = run_m;
        }
    }
    __syncthreads();
}

/* The search's threshold, set at its first digit from the kept totals;
 * 0 when the stage has nothing to search (top_k keeps all, or a draw with
 * no candidate: then the row is done). Thread 0. */
static __device__ int set_threshold(SmpRow &s, const KnSampleRow &q, const SmpStep *sp, int32_t *ids,
                                    KnSampleRow *row) {
    if (s.stage == ST_TOPK) {
        if (sp->tot_n <= (unsigned long long)q.top_k) return 0;
        s.how = BY_COUNT_GE;
        s.t = (double)q.top_k;
    } else if (s.stage == ST_TOPP) {
        double t = (double)q.top_p * u128_double(sp->tot_m);
        s.how = t > 0 ? BY_MASS_GE : BY_COUNT_GE;
        s.t = t > 0 ? t : 1.0;
    } else {
        if (sp->tot_n == 0) { /* no candidate (non-finite logits): the maximum */
            ids[blockIdx.y] = s.best;
            row->rng = s.rng;
            s.stage = ST_DONE;
            return 0;
        }
        s.how = BY_MASS_GT;
        s.t = (double)(dev_mix64(s.rng) >> 11) * (1.0 / 9007199254740992.0) * u128_double(sp->tot_m);
    }
    return 1;
}

/* The first bin whose prefix passes (or, forced or when none does, the
 * last non-empty one), with the count and mass before it and in it. */
static __device__ void find_bin(const SmpRow &s, SmpStep *sp, const SmpHist *h, const unsigned long long *bn,
                                const u128 *bm) {
    int t = threadIdx.x, per = SMP_BINS / SMP_THREADS;
    if (t == 0) {
        sp->found = NO_BIN;
        sp->last_bin = -1;
    }
    __syncthreads();
    unsigned long long n = s.below_n + sp->n[t];
    u128 m = (((u128)s.below_hi << 64) | s.below_lo) + sp->m[t];
    int first = -1, last = -1;
    for (int k = 0; k < per; k++) {
        if (!bn[k]) continue;
        last = t * per + k;
        if (first < 0 && !s.forced && smp_passes(s.how, s.t, n + bn[k], m + bm[k])) first = last;
        n += bn[k];
        m += bm[k];
    }
    if (first >= 0) atomicMin(&sp->found, first);
    if (last >= 0) atomicMax(&sp->last_bin, last);
    __syncthreads();
    int b = sp->found == NO_BIN ? sp->last_bin : sp->found;
    if (b >= 0 && b / per == t) { /* the owner: the sums before b */
        n = s.below_n + sp->n[t];
        m = (((u128)s.below_hi << 64) | s.below_lo) + sp->m[t];
        for (int k = 0; k < b % per; k++) {
            n += bn[k];
            m += bm[k];
        }
        sp->cut_n = n;
        sp->cut_m = m;
        sp->bin_n = bn[b % per];
        sp->bin_first = __ldcg(&h->first[b]);
    }
    __syncthreads();
}

/* How many of the tied keys (those of P, count bin_n) the search takes:
 * the fewest that pass. Thread 0. */
static __device__ unsigned long long tied_take(const SmpRow &s, const SmpStep *sp, uint32_t P) {
    unsigned long long lo = 1, hi = sp->bin_n;
    if (s.forced || hi <= 1) return hi;
    if (s.how == BY_COUNT_GE) {
        double need = s.t - (double)sp->cut_n;
        unsigned long long j = need <= 1.0 ? 1 : (unsigned long long)ceil(need);
        return j < hi ? j : hi;
    }
    unsigned long long unit = mass_units(__uint_as_float(P_ONE - P));
    while (lo < hi) { /* the smallest that passes: the prefix grows with j */
        unsigned long long mid = lo + (hi - lo) / 2;
        if (smp_passes(s.how, s.t, sp->cut_n + mid, sp->cut_m + (u128)unit * mid)) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

/* The j-th (from 1) kept token of P in id order: a scan of the row by the
 * block, for a boundary inside a tie (rare: the first is in the histogram). */
static __device__ int64_t tied_id(const SmpRow &s, const float *l, int64_t V, uint32_t P, unsigned long long j,
                                  SmpStep *sp) {
    int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    unsigned long long seen = 0;
    if (t == 0) sp->tied_id = -1;
    for (int64_t base = 0; base < V; base += SMP_THREADS) {
        int64_t i = base + t;
        uint32_t q = 0;
        float p;
        int flag = i < V && smp_kept(s, l[i], i, &q, &p) && q == P;
        int count = __syncthreads_count(flag);
        if (seen + (unsigned long long)count >= j) {
            unsigned int ballot = __ballot_sync(0xffffffffu, flag);
            if (lane == 0) sp->warp_flags[warp] = __popc(ballot);
            __syncthreads();
            unsigned long long rank = seen + __popc(ballot & ((1u << lane) - 1u));
            for (int w = 0; w < warp; w++) rank += sp->warp_flags[w];
            if (flag && rank + 1 == j) sp->tied_id = i;
            __syncthreads();
            break;
        }
        seen += (unsigned long long)count;
    }
    return sp->tied_id;
}

/* The search's cut at key (P, id): a top_k or nucleus boundary becomes the
 * last kept key, a draw the row's token. Thread 0. */
static __device__ void finish_stage(SmpRow &s, const KnSampleRow &q, uint32_t P, int64_t id, int32_t *ids,
                                    KnSampleRow *row) {
    if (s.stage == ST_DRAW) {
        ids[blockIdx.y] = (int32_t)id;
        row->rng = s.rng;
        s.stage = ST_DONE;
        return;
    }
    s.last_p = P;
    s.last_id = (int32_t)id;
    begin_stage(s, next_stage(q, s.stage));
}

static __device__ void smp_step(int32_t *ids, const float *l, KnSampleRow *rows, SmpRow *g, const SmpHist *h,
                                int64_t V) {
    __shared__ SmpStep sp;
    __shared__ SmpRow s;
    __shared__ int searching;
    unsigned long long bn[SMP_BINS / SMP_THREADS];
    u128 bm[SMP_BINS / SMP_THREADS];
    KnSampleRow *row = &rows[blockIdx.y];
    KnSampleRow q = *row;
    if (threadIdx.x == 0) s = *g;
    hist_prefix(h, &sp, bn, bm);
    if (threadIdx.x == 0) searching = s.digit > 0 || set_threshold(s, q, &sp, ids, row);
    __syncthreads();
    if (!searching) {
        if (threadIdx.x == 0) {
            if (s.stage != ST_DONE) begin_stage(s, next_stage(q, s.stage)); /* top_k keeps every candidate */
            *g = s;
        }
        return;
    }
    find_bin(s, &sp, h, bn, bm);
    int b = sp.found == NO_BIN ? sp.last_bin : sp.found;
    if (threadIdx.x == 0 && (sp.found == NO_BIN || b < 0)) s.forced = 1;
    __syncthreads();
    if (b < 0) { /* no candidate kept (a nucleus over non-finite logits): keep the cut made so far */
        if (threadIdx.x == 0) {
            if (s.stage == ST_DRAW) finish_stage(s, q, s.last_p, s.last_p == P_ALL ? s.best : s.last_id, ids, row);
            else begin_stage(s, next_stage(q, s.stage));
            *g = s;
        }
        return;
    }
    if (s.digit < 2) {
        if (threadIdx.x == 0) {
            s.prefix = (s.prefix << digit_bits(s.digit)) | (uint32_t)b;
            s.below_n = sp.cut_n;
            s.below_lo = (unsigned long long)sp.cut_m;
            s.below_hi = (unsigned long long)(sp.cut_m >> 64);
            s.digit++;
            *g = s;
        }
        return;
    }
    uint32_t P = (s.prefix << digit_bits(2)) | (uint32_t)b;
    __shared__ unsigned long long j;
    if (threadIdx.x == 0) j = tied_take(s, &sp, P);
    __syncthreads();
    int64_t id = j <= 1 ? (int64_t)~sp.bin_first : tied_id(s, l, V, P, j, &sp);
    if (threadIdx.x == 0) {
        finish_stage(s, q, P, id < 0 ? (int64_t)~sp.bin_first : id, ids, row);
        *g = s;
    }
}

/* ---- a pass ------------------------------------------------------------------------ */

static __global__ void __launch_bounds__(SMP_THREADS) k_smp_pass(int32_t *ids, const float *logits, KnSampleRow *rows,
                                                                 SmpRow *st, SmpHist *hist, int64_t V, int64_t L,
                                                                 int pass) {
    __shared__ unsigned int sc[SMP_BINS], sf[SMP_BINS];
    __shared__ unsigned long long slo[SMP_BINS], shi[SMP_BINS];
    __shared__ SmpRow s;
    int r = blockIdx.y;
    if (threadIdx.x == 0) s = st[r];
    __syncthreads();
    if (s.stage == ST_DONE) return; /* the same in every block of the row */
    SmpHist *h = hist + (size_t)r * 3 + pass % 3;
    clear_share(hist + (size_t)r * 3 + (pass + 1) % 3); /* the next pass's */
    for (int b = threadIdx.x; b < SMP_BINS; b += blockDim.x) {
        sc[b] = sf[b] = 0;
        slo[b] = shi[b] = 0;
    }
    __syncthreads();
    int sh = digit_shift(s.digit), bits = digit_bits(s.digit);
    const float *l = logits + (size_t)r * V;
    int64_t lo = blockIdx.x * L, hi = lo + L < V ? lo + L : V;
    for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        uint32_t P;
        float p;
        if (!smp_kept(s, l[i], i, &P, &p) || (P >> (sh + bits)) != s.prefix) continue;
        uint32_t b = (P >> sh) & ((1u << bits) - 1u);
        unsigned long long u = mass_units(p), old;
        atomicAdd(&sc[b], 1u);
        atomicMax(&sf[b], ~(uint32_t)i);
        old = atomicAdd(&slo[b], u);
        if (old + u < old) atomicAdd(&shi[b], 1ull);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < SMP_BINS; b += blockDim.x) {
        if (!sc[b]) continue;
        atomicAdd(&h->count[b], sc[b]);
        atomicMax(&h->first[b], sf[b]);
        unsigned long long old = atomicAdd(&h->lo[b], slo[b]);
        atomicAdd(&h->hi[b], shi[b] + (old + slo[b] < old ? 1ull : 0ull));
    }
    if (!last_arrival(&st[r].arrived, gridDim.x)) return;
    smp_step(ids, l, rows, st + r, h, V);
}

/* ---- the entry ------------------------------------------------------------------------ */

void cuda_sample(const KnCtx *ctx, int32_t *ids, const float *logits, KnSampleRow *rows, int64_t n, int64_t V,
                 void *scratch) {
    (void)scratch; /* the searches keep histograms, not candidates */
    if (n <= 0 || V <= 0) return;
    CudaCtx *c = cuda_ctx(ctx);
    if (n > 65535 || V > 0x7FFFFFFF) { /* a row per grid y index; ids are int32 */
        cuda_note(c, cudaErrorInvalidValue, "sample");
        return;
    }
    int64_t S = SMP_BLOCKS / n, most = (V + SMP_SLICE_MIN - 1) / SMP_SLICE_MIN;
    if (S > most) S = most;
    if (S < 1) S = 1;
    int64_t L = (V + S - 1) / S;
    S = (V + L - 1) / L; /* no empty slice */
    size_t hist_bytes = (size_t)n * 3 * sizeof(SmpHist), st_bytes = (size_t)n * sizeof(SmpRow);
    size_t part_bytes = (size_t)(n * S) * (sizeof(float) + sizeof(int64_t));
    char *base = (char *)cuda_scratch(c, hist_bytes + st_bytes + part_bytes, "sample");
    if (!base) return;
    SmpHist *hist = (SmpHist *)base;
    SmpRow *st = (SmpRow *)(base + hist_bytes);
    int64_t *part_i = (int64_t *)(base + hist_bytes + st_bytes);
    float *part_v = (float *)(part_i + n * S);
    cuda_note(c, cudaMemsetAsync(st, 0, st_bytes, c->stream), "sample");
    dim3 grid((unsigned)S, (unsigned)n);
    k_smp_max<<<grid, SMP_THREADS, 0, c->stream>>>(ids, logits, rows, st, hist, part_v, part_i, V, L);
    CUDA_LAUNCHED(c, "sample");
    for (int p = 0; p < SMP_PASSES; p++) {
        k_smp_pass<<<grid, SMP_THREADS, 0, c->stream>>>(ids, logits, rows, st, hist, V, L, p);
        CUDA_LAUNCHED(c, "sample");
    }
}
