/* Private: feature bits and the path chosen at load time. */
#ifndef REFIMPL_DISPATCH_H
#define REFIMPL_DISPATCH_H
enum {
    RF_CPU_AVX2 = 1 << 0, RF_CPU_FMA = 1 << 1, RF_CPU_AVX512F = 1 << 2,
    RF_CPU_AVX512BW = 1 << 3, RF_CPU_AVX512VL = 1 << 4, RF_CPU_AVX512DQ = 1 << 5,
    RF_CPU_NEON = 1 << 6,
};
enum { RF_PATH_AUTO = 0, RF_PATH_PORTABLE = 1, RF_PATH_AVX2 = 2, RF_PATH_AVX512 = 3 };
/* the path every kernel uses (set once by cpu.c, may be forced by tests) */
int rf_path(void);

#if defined(__x86_64__)
#define RF_X86 1
#define RF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define RF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#endif
#endif
