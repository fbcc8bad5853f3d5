/* golden.h - tolerances of shared/golden/README.md as named constants, and a
 * check_tensor-style reporter (first values, max abs error relative to
 * max |ref|, the limit, OK / NOT OK). */
#ifndef GF_GOLDEN_H
#define GF_GOLDEN_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

/* logits and hidden states: max abs error <= 1e-3 of max |ref| (float32 math) */
#define GOLDEN_LOGITS_REL 1e-3
/* KV-cache decoding against the full forward: the same limit */
#define GOLDEN_KV_REL 1e-3
/* either under the BF16 precision (bf16 matmul operands, CUDA's production
 * mode; ops.h KnPrecision): against the golden, 2e-2 relative L2 error
 * (golden_rel_l2), the metric of the op tests (test_batch holds two runs
 * of this engine to it as max abs error of max |logit|). Not of max |ref|: one token whose rounding is
 * amplified by later layers sets the max. The reference's own numpy
 * re-implementation with every matmul operand rounded to bf16 (as the
 * precision defines) misses the fp32 golden logits by 2.3e-2 and 3.1e-2 of
 * max |ref| on the ple rows, 1.7e-2 and 1.6e-2 in relative L2. */
#define GOLDEN_BF16_REL 2e-2

/* Max abs error of got vs ref over the entries where use (may be NULL) is
 * set, divided by max |ref| there. */
static inline double golden_rel_err(const float *got, const float *ref, size_t n, size_t stride, const uint8_t *use,
                                    size_t *worst) {
    double max_err = 0, max_ref = 0;
    for (size_t i = 0; i < n; i++) {
        if (use && !use[i / stride]) continue;
        double e = fabs((double)got[i] - ref[i]), r = fabs((double)ref[i]);
        if (e > max_err || isnan(e)) { max_err = isnan(e) ? INFINITY : e; if (worst) *worst = i; }
        if (r > max_ref) max_ref = r;
    }
    return max_ref > 0 ? max_err / max_ref : max_err;
}

/* ||got - ref|| / ||ref|| over the entries where use (may be NULL) is set. */
static inline double golden_rel_l2(const float *got, const float *ref, size_t n, size_t stride, const uint8_t *use) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        if (use && !use[i / stride]) continue;
        double d = (double)got[i] - ref[i];
        e += d * d;
        r += (double)ref[i] * ref[i];
    }
    return r > 0 ? sqrt(e / r) : sqrt(e);
}

/* golden_report's line with the relative L2 error as the measure (the max
 * abs error of max |ref| beside it). */
static inline int golden_report_l2(const char *what, const float *got, const float *ref, size_t n, size_t stride,
                                   const uint8_t *use, double limit) {
    size_t worst = 0;
    double l2 = golden_rel_l2(got, ref, n, stride, use), rel = golden_rel_err(got, ref, n, stride, use, &worst);
    int ok = l2 <= limit;
    printf("%-40s got %+.5f %+.5f %+.5f ref %+.5f %+.5f %+.5f  rel L2 %.2e (limit %.0e; max %.2e at #%zu) %s\n",
           what, got[0], got[1], got[2], ref[0], ref[1], ref[2], l2, limit, rel, worst, ok ? "OK" : "NOT OK");
    return ok;
}

/* Prints one line and returns 1 when within limit. */
static inline int golden_report(const char *what, const float *got, const float *ref, size_t n, size_t stride,
                                const uint8_t *use, double limit) {
    size_t worst = 0;
    double rel = golden_rel_err(got, ref, n, stride, use, &worst);
    int ok = rel <= limit;
    printf("%-40s got %+.5f %+.5f %+.5f ref %+.5f %+.5f %+.5f  rel %.2e (limit %.0e, worst #%zu) %s\n", what,
           got[0], got[1], got[2], ref[0], ref[1], ref[2], rel, limit, worst, ok ? "OK" : "NOT OK");
    return ok;
}

#endif
