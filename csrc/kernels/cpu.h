/* refimpl._kernels: CPU feature detection for run-time dispatch. */

/* bit set of RF_CPU_* features found by cpuid (x86-64) or hwcaps (aarch64) */
int rf_cpu_features(void);
/* name of the best SIMD path this CPU runs: "avx512", "avx2", "neon" or "portable" */
const char *rf_cpu_path(void);
/* force a path for testing: 0 auto, 1 portable, 2 avx2, 3 avx512; returns the path in force */
int rf_cpu_force_path(int path);
