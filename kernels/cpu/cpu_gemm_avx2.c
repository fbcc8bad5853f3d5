/* cpu_gemm_avx2.c - cpu_gemm.c again, compiled with AVX2 (and without FMA)
 * on x86-64: its tasks, named _avx2, which cpu_gemm.c's entries call on a
 * CPU that has AVX2. Empty elsewhere. */
#if defined(__x86_64__) && defined(__linux__)
#define CPU_GEMM_AVX2
#include "cpu_gemm.c"
#else
typedef int cpu_gemm_avx2_empty; /* ISO C: a translation unit declares something */
#endif
