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
/* the BF16 precision (bf16 matmul operands, CUDA's production mode; ops.h
 * KnPrecision) where the reference is float32 math: decoding (whose GEMV
 * keeps x in float32) against the golden, 2e-2 relative L2 (golden_rel_l2);
 * test_batch holds two runs of this engine to it as max abs error of max
 * |logit|. A bf16 prefill is held to its own golden instead (below): the
 * rounding alone moves the ple model's logits 2.3e-2 in relative L2 from
 * the float32 golden, the moe model's 0.2 (a token sent to another expert) */
#define GOLDEN_BF16_REL 2e-2
/* the BF16 precision against its own golden (tools/gen_bf16_golden.py: the
 * numpy reference with the same rounding, forward_text_bf16.safetensors):
 * 1e-2 relative L2, the op tests' bound in bf16. What remains is the order
 * of the float32 sums and the operands that it tips over a rounding
 * boundary; the same reference with float64 sums moves by 1e-4 to 3e-3 */
#define GOLDEN_BF16_PREC_REL 1e-2

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
