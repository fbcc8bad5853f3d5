/* cpu_gemm_avx512.c - cpu_gemm.c again, compiled with AVX-512 (and without
 * FMA) on x86-64: its tasks, named _avx512, which cpu_gemm.c's entries call
 * on a CPU that has AVX512F. Empty elsewhere. */
#if defined(__x86_64__) && defined(__linux__)
#define CPU_GEMM_AVX512
#include "cpu_gemm.c"
#else
typedef int cpu_gemm_avx512_empty; /* ISO C: a translation unit declares something */
#endif
