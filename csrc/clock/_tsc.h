/* Private, inline fenced counter reads shared by the clock's C sources. */
#ifndef REFIMPL_TSC_H
#define REFIMPL_TSC_H
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define RF_COUNTER "rdtsc"
static inline uint64_t rf__nominal_hz(void) { return 0; }   /* the kernel knows the TSC's rate */
static inline uint64_t rf__start(void) {
    uint32_t lo, hi;
    __asm__ __volatile__("lfence\n\trdtsc" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rf__stop(int32_t *cpu) {
    uint32_t lo, hi, aux;
    __asm__ __volatile__("rdtscp\n\tlfence" : "=a"(lo), "=d"(hi), "=c"(aux) : : "memory");
    if (cpu) *cpu = (int32_t)(aux & 0xfff);   /* Linux: TSC_AUX = node << 12 | cpu */
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
static inline uint64_t rf__nominal_hz(void) { return 1000000000ull; }
#endif
#endif
