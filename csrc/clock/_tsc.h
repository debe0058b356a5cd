/* Private, inline fenced counter reads shared by the clock's C sources. */
#ifndef REFIMPL_TSC_H
#define REFIMPL_TSC_H
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define RF_COUNTER "rdtsc"
static inline uint64_t rf__nominal_hz(void) { return 0; }   /* the kernel knows the TSC's rate */
static inline uint64_t rf__start(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("lfence\n\trdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}
/* Some virtual CPUs lack RDTSCP (QEMU's default qemu64 model, some hypervisors hide it):
 * there a stop is  lfence; rdtsc; lfence  and the cpu id is unknown (-1).
 * rf__aux: 1 rdtscp, 0 rdtsc, -1 not asked yet (CPUID 0x80000001 EDX bit 27, once). */
static int rf__aux __attribute__((unused)) = -1;
static inline int rf__has_rdtscp(void) {
    if (__builtin_expect(rf__aux < 0, 0)) {
        unsigned a, b, c, d;
        rf__aux = __get_cpuid(0x80000001u, &a, &b, &c, &d) && ((d >> 27) & 1u);
    }
    return rf__aux;
}
static inline uint64_t rf__stop(int32_t *cpu) {
    uint32_t lo, hi, aux;
    if (__builtin_expect(rf__has_rdtscp(), 1)) {
        __asm__ __volatile__("rdtscp\n\tlfence" : "=a"(lo), "=d"(hi), "=c"(aux) : : "memory");
        if (cpu) *cpu = (int32_t)(aux & 0xfff);   /* Linux: TSC_AUX = node << 12 | cpu */
    } else {
        __asm__ __volatile__("lfence\n\trdtsc\n\tlfence" : "=a"(lo), "=d"(hi) : : "memory");
        if (cpu) *cpu = -1;
    }
    return ((uint64_t)hi << 32) | lo;
}
#elif defined(__aarch64__)
#define RF_COUNTER "cntvct"
static inline uint64_t rf__start(void) {
    uint64_t v;
    __asm__ __volatile__("isb\n\tmrs %0, cntvct_el0" : "=r"(v) : : "memory");
    return v;
}
static inline uint64_t rf__stop(int32_t *cpu) {
    uint64_t v;
    __asm__ __volatile__("isb\n\tmrs %0, cntvct_el0\n\tisb" : "=r"(v) : : "memory");
    if (cpu) *cpu = -1;
    return v;
}
static inline int rf__has_rdtscp(void) { return 0; }
static inline uint64_t rf__nominal_hz(void) {
    uint64_t f;
    __asm__ __volatile__("mrs %0, cntfrq_el0" : "=r"(f));
    return f;
}
#else
#define RF_COUNTER "clock_gettime"
static inline uint64_t rf__start(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
static inline uint64_t rf__stop(int32_t *cpu) {
    if (cpu) *cpu = -1;
    return rf__start();
}
static inline int rf__has_rdtscp(void) { return 0; }
static inline uint64_t rf__nominal_hz(void) { return 1000000000ull; }
#endif
#endif
