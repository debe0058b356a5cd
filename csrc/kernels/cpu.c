#include "cpu.h"
#include "_dispatch.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <stdint.h>
static int detect(void) {
    unsigned a, b, c, d, f = 0;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx) return 0;
    /* the OS must save ymm (XCR0 bits 1,2) and for AVX-512 also opmask/zmm (bits 5,6,7) */
    uint32_t xlo, xhi;
    __asm__ __volatile__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    int ymm_ok = (xlo & 0x6) == 0x6, zmm_ok = (xlo & 0xe6) == 0xe6;
    if (!ymm_ok) return 0;
    if (fma) f |= RF_CPU_FMA;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return (int)f;
    if ((b >> 5) & 1) f |= RF_CPU_AVX2;
    if (zmm_ok) {
        if ((b >> 16) & 1) f |= RF_CPU_AVX512F;
        if ((b >> 17) & 1) f |= RF_CPU_AVX512DQ;
        if ((b >> 30) & 1) f |= RF_CPU_AVX512BW;
        if ((b >> 31) & 1) f |= RF_CPU_AVX512VL;
    }
    return (int)f;
}
#elif defined(__aarch64__)
static int detect(void) { return RF_CPU_NEON; }
#else
static int detect(void) { return 0; }
#endif

static int g_features = -1, g_path = RF_PATH_AUTO;

int rf_cpu_features(void) {
    if (g_features < 0) g_features = detect();
    return g_features;
}

static int best_path(void) {
    int f = rf_cpu_features();
    int avx512 = RF_CPU_AVX512F | RF_CPU_AVX512BW | RF_CPU_AVX512VL | RF_CPU_AVX512DQ;
    if ((f & avx512) == avx512 && (f & RF_CPU_FMA)) return RF_PATH_AVX512;
    if ((f & RF_CPU_AVX2) && (f & RF_CPU_FMA)) return RF_PATH_AVX2;
    return RF_PATH_PORTABLE;
}

int rf_path(void) {
    if (g_path == RF_PATH_AUTO) g_path = best_path();
    return g_path;
}

int rf_cpu_force_path(int path) {
    int best = best_path();
    /* a path the CPU cannot run is never forced: clamp to the best available */
    if (path <= RF_PATH_AUTO || path > best) g_path = best;
    else g_path = path;
    return g_path;
}

const char *rf_cpu_path(void) {
    switch (rf_path()) {
    case RF_PATH_AVX512: return "avx512";
    case RF_PATH_AVX2: return "avx2";
    default: return (rf_cpu_features() & RF_CPU_NEON) ? "neon" : "portable";
    }
}
