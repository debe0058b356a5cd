/* refimpl._clock: fenced counter reads, timing loops in C, calibration and
 * machine probes (add chain, cache/memory bandwidth, perf_event_open). */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <string.h>
#include "clock.h"
#include "_tsc.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RF_X86 1
#define RF_T_AVX512 __attribute__((target("avx512f")))
#define RF_T_AVX2 __attribute__((target("avx2")))
#endif

const char *rf_counter_name(void) { return RF_COUNTER; }
uint64_t rf_counter_nominal_hz(void) { return rf__nominal_hz(); }
uint64_t rf_ticks_start(void) { return rf__start(); }
uint64_t rf_ticks_stop(int32_t *cpu) { return rf__stop(cpu); }
int rf_counter_cpu_ids(void) { return rf__has_rdtscp(); }
void rf_counter_without_cpu_ids(int on) {
#if defined(__x86_64__) || defined(__i386__)
    rf__aux = on ? 0 : -1;
#else
    (void)on;
#endif
}

/* ---------------------------------------------------------------- overhead */

int64_t rf_empty_regions(uint64_t *deltas /* (n,) */, int64_t n) {
    int64_t migrated = 0;
    for (int64_t i = 0; i < n; i++) {
        int32_t c0, c1;
        (void)rf__stop(&c0);                 /* cpu id before the region */
        uint64_t t0 = rf__start();
        uint64_t t1 = rf__stop(&c1);
        deltas[i] = t1 - t0;
        migrated += (c0 != c1);
    }
    return migrated;
}

/* -------------------------------------------------------------- add chain */

/* n_trips trips of 16 dependent adds: 16 core cycles per trip on any core with
 * 1-cycle integer add latency; the loop counter is an independent chain.  The added 1
 * comes from a register, not an immediate: Intel cores from Golden Cove on can fold
 * small-immediate adds at rename, several dependent ones a cycle, which would make the
 * chain run faster than its latency and core/TSC come out too high. */
static inline uint64_t rf__add_chain(uint64_t x, uint64_t n_trips) {
    uint64_t one = 1;
    if (!n_trips) return x;
#if defined(__x86_64__)
    __asm__ __volatile__(
        "1:\n\t"
        "add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
        "add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
        "add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
        "add %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\tadd %2, %0\n\t"
        "dec %1\n\t"
        "jnz 1b"
        : "+r"(x), "+r"(n_trips) : "r"(one) : "cc");
#elif defined(__aarch64__)
    __asm__ __volatile__(
        "1:\n\t"
        "add %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\t"
        "add %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\t"
        "add %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\t"
        "add %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\tadd %0, %0, %2\n\t"
        "subs %1, %1, #1\n\t"
        "b.ne 1b"
        : "+r"(x), "+r"(n_trips) : "r"(one) : "cc");
#else
    for (uint64_t i = 0; i < n_trips * 16; i++) {
        x += 1;
        __asm__ __volatile__("" : "+r"(x));   /* opaque: no folding */
    }
#endif
    return x;
}

uint64_t rf_add_chain_ticks(uint64_t n_adds) {
    uint64_t trips = (n_adds + 15) / 16;
    uint64_t t0 = rf__start();
    uint64_t x = rf__add_chain(0, trips);
    uint64_t t1 = rf__stop(NULL);
    __asm__ __volatile__("" : : "r"(x));
    return t1 - t0;
}

void rf_empty_thunk(void *ctx) { (void)ctx; __asm__ __volatile__("" : : : "memory"); }

/* ctx -> {n_adds, x}: the chain goes on from the x the previous call left, so back-to-back
 * calls in a timing loop are one chain too.  Started from 0 each time, they were independent
 * and the out-of-order core ran the next call's first adds beside this call's last ones: ~64
 * core cycles a call hidden (128 adds read 69 cycles, 16 adds 1.3). */
void rf_add_chain_thunk(void *ctx /* -> uint64_t[2] */) {
    uint64_t *c = (uint64_t *)ctx;
    c[1] = rf__add_chain(c[1], (c[0] + 15) / 16);
}

/* ----------------------------------------------------------- timing loop */

uint64_t rf_time_thunk(void (*fn)(void *), void *ctx, uint64_t reps,
                       int32_t *cpu_start, int32_t *cpu_stop) {
    int32_t c0, c1;
    (void)rf__stop(&c0);                     /* cpu id just before the region */
    uint64_t t0 = rf__start();
    for (uint64_t r = 0; r < reps; r++) fn(ctx);
    uint64_t t1 = rf__stop(&c1);
    if (cpu_start) *cpu_start = c0;
    if (cpu_stop) *cpu_stop = c1;
    return t1 - t0;
}

void rf_touch(uint8_t *buf /* (bytes,) */, size_t bytes) {
    for (size_t i = 0; i < bytes; i += 64) buf[i] += 1;
    __asm__ __volatile__("" : : "r"(buf) : "memory");
}

/* -------------------------------------------------------------- bandwidth */
/* read: sum of 64-bit words, 4 independent vector accumulators, 256 bytes a trip.
 * copy: 256 bytes a trip, ordinary (cached) stores.  bytes % 256 == 0. */

#ifdef RF_X86
RF_T_AVX512 static uint64_t bw_read_avx512(uint64_t *sink, const void *buf, size_t bytes, uint64_t passes) {
    const char *p = (const char *)buf;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++)
        for (size_t i = 0; i < bytes; i += 256) {
            a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(p + i)));
            a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + i + 64)));
            a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + i + 128)));
            a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + i + 192)));
        }
    uint64_t t1 = rf__stop(NULL);
    a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    *sink = (uint64_t)_mm512_reduce_add_epi64(a0);
    return t1 - t0;
}
RF_T_AVX512 static uint64_t bw_copy_avx512(void *dst, const void *src, size_t bytes, uint64_t passes) {
    const char *s = (const char *)src;
    char *d = (char *)dst;
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++) {
        for (size_t i = 0; i < bytes; i += 256) {
            __m512i x0 = _mm512_load_si512((const void *)(s + i));
            __m512i x1 = _mm512_load_si512((const void *)(s + i + 64));
            __m512i x2 = _mm512_load_si512((const void *)(s + i + 128));
            __m512i x3 = _mm512_load_si512((const void *)(s + i + 192));
            _mm512_store_si512((void *)(d + i), x0);
            _mm512_store_si512((void *)(d + i + 64), x1);
            _mm512_store_si512((void *)(d + i + 128), x2);
            _mm512_store_si512((void *)(d + i + 192), x3);
        }
        __asm__ __volatile__("" : : "r"(d) : "memory");
    }
    uint64_t t1 = rf__stop(NULL);
    return t1 - t0;
}
RF_T_AVX2 static uint64_t bw_read_avx2(uint64_t *sink, const void *buf, size_t bytes, uint64_t passes) {
    const char *p = (const char *)buf;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++)
        for (size_t i = 0; i < bytes; i += 128) {
            a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
            a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
        }
    uint64_t t1 = rf__stop(NULL);
    a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t w[4];
    _mm256_storeu_si256((__m256i *)w, a0);
    *sink = w[0] + w[1] + w[2] + w[3];
    return t1 - t0;
}
RF_T_AVX2 static uint64_t bw_copy_avx2(void *dst, const void *src, size_t bytes, uint64_t passes) {
    const char *s = (const char *)src;
    char *d = (char *)dst;
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++) {
        for (size_t i = 0; i < bytes; i += 128) {
            __m256i x0 = _mm256_load_si256((const __m256i *)(s + i));
            __m256i x1 = _mm256_load_si256((const __m256i *)(s + i + 32));
            __m256i x2 = _mm256_load_si256((const __m256i *)(s + i + 64));
            __m256i x3 = _mm256_load_si256((const __m256i *)(s + i + 96));
            _mm256_store_si256((__m256i *)(d + i), x0);
            _mm256_store_si256((__m256i *)(d + i + 32), x1);
            _mm256_store_si256((__m256i *)(d + i + 64), x2);
            _mm256_store_si256((__m256i *)(d + i + 96), x3);
        }
        __asm__ __volatile__("" : : "r"(d) : "memory");
    }
    uint64_t t1 = rf__stop(NULL);
    return t1 - t0;
}
#endif

static uint64_t bw_read_portable(uint64_t *sink, const void *buf, size_t bytes, uint64_t passes) {
    const uint64_t *p = (const uint64_t *)buf;
    size_t n = bytes / 8;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++)
        for (size_t i = 0; i < n; i += 4) {
            a0 += p[i]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
        }
    uint64_t t1 = rf__stop(NULL);
    *sink = a0 + a1 + a2 + a3;
    return t1 - t0;
}

static uint64_t bw_copy_portable(void *dst, const void *src, size_t bytes, uint64_t passes) {
    uint64_t t0 = rf__start();
    for (uint64_t k = 0; k < passes; k++) {
        memcpy(dst, src, bytes);
        __asm__ __volatile__("" : : "r"(dst) : "memory");
    }
    uint64_t t1 = rf__stop(NULL);
    return t1 - t0;
}

int rf_bw_simd_bits(void) {
#ifdef RF_X86
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2")) return 256;
    return 128;   /* SSE2 baseline: the compiler vectorizes the portable loop */
#else
    return 0;
#endif
}

uint64_t rf_bw_read(uint64_t *sink, const void *buf /* (bytes,) */, size_t bytes, uint64_t passes) {
    bytes &= ~(size_t)255;               /* whole 256-byte trips: never past buf + bytes */
#ifdef RF_X86
    int w = rf_bw_simd_bits();
    if (w == 512) return bw_read_avx512(sink, buf, bytes, passes);
    if (w == 256) return bw_read_avx2(sink, buf, bytes, passes);
#endif
    return bw_read_portable(sink, buf, bytes, passes);
}

uint64_t rf_bw_copy(void *dst /* (bytes,) */, const void *src /* (bytes,) */, size_t bytes, uint64_t passes) {
    bytes &= ~(size_t)255;
#ifdef RF_X86
    int w = rf_bw_simd_bits();
    if (w == 512) return bw_copy_avx512(dst, src, bytes, passes);
    if (w == 256) return bw_copy_avx2(dst, src, bytes, passes);
#endif
    return bw_copy_portable(dst, src, bytes, passes);
}

/* ------------------------------------------------------------ perf probe */

#if defined(__linux__)
#include <linux/perf_event.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PERF_FLAG_FD_CLOEXEC
#define PERF_FLAG_FD_CLOEXEC (1UL << 3)   /* Linux >= 3.14 */
#endif

static int pmu_event(uint32_t type, uint64_t config, int leader) {
    struct perf_event_attr a;
    memset(&a, 0, sizeof a);
    a.type = type;
    a.size = sizeof a;
    a.config = config;
    a.disabled = leader < 0;             /* the leader starts off; members follow it */
    a.exclude_kernel = 1;
    a.exclude_hv = 1;
    a.read_format = PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
    return (int)syscall(SYS_perf_event_open, &a, 0, -1, leader, PERF_FLAG_FD_CLOEXEC);   /* not into exec'd children */
}

int rf_pmu_open(int kind, int32_t *fds) {
    fds[0] = fds[1] = -1;
    if (kind != 0 && kind != 1) return EINVAL;
    uint32_t type = kind == 0 ? PERF_TYPE_HARDWARE : PERF_TYPE_SOFTWARE;
    uint64_t e0 = kind == 0 ? PERF_COUNT_HW_CPU_CYCLES : PERF_COUNT_SW_CPU_CLOCK;
    uint64_t e1 = kind == 0 ? PERF_COUNT_HW_INSTRUCTIONS : PERF_COUNT_SW_CPU_CLOCK;
    int l = pmu_event(type, e0, -1);
    if (l < 0) return errno ? errno : EIO;
    int m = pmu_event(type, e1, l);
    if (m < 0) {
        int e = errno ? errno : EIO;
        close(l);
        return e;
    }
    if (ioctl(l, PERF_EVENT_IOC_RESET, PERF_IOC_FLAG_GROUP) != 0 ||
        ioctl(l, PERF_EVENT_IOC_ENABLE, PERF_IOC_FLAG_GROUP) != 0) {
        int e = errno ? errno : EIO;
        close(m);
        close(l);
        return e;
    }
    fds[0] = l;
    fds[1] = m;
    return 0;
}

int rf_pmu_read(int32_t leader, uint64_t *out) {
    uint64_t b[5];                       /* nr, time enabled, time running, value 0, value 1 */
    ssize_t n = read(leader, b, sizeof b);
    if (n != (ssize_t)sizeof b) return n < 0 && errno ? errno : EIO;
    if (b[0] != 2) return EIO;
    out[0] = b[3];
    out[1] = b[4];
    out[2] = b[1];
    out[3] = b[2];
    return 0;
}

void rf_pmu_close(int32_t *fds) {
    for (int k = 1; k >= 0; k--)         /* the member before its leader */
        if (fds[k] >= 0) {
            close(fds[k]);
            fds[k] = -1;
        }
}
#else
int rf_pmu_open(int kind, int32_t *fds) {
    (void)kind;
    fds[0] = fds[1] = -1;
    return ENOSYS;
}

int rf_pmu_read(int32_t leader, uint64_t *out) {
    (void)leader;
    out[0] = out[1] = out[2] = out[3] = 0;
    return ENOSYS;
}

void rf_pmu_close(int32_t *fds) {
    fds[0] = fds[1] = -1;
}
#endif

/* the calibration's probe: the harness's counter group around one add chain */
int rf_perf_probe(uint64_t *cycles, uint64_t *instructions, uint64_t n_adds) {
    int32_t fds[2];
    uint64_t a[4], b[4];
    *cycles = 0;
    *instructions = 0;
    int rc = rf_pmu_open(0, fds);
    if (rc) return rc;
    int ok = rf_pmu_read(fds[0], a) == 0;
    uint64_t x = rf__add_chain(0, (n_adds + 15) / 16);
    ok = ok && rf_pmu_read(fds[0], b) == 0;
    __asm__ __volatile__("" : : "r"(x));
    rf_pmu_close(fds);
    if (!ok || b[0] == a[0] || b[1] == a[1]) return -1;
    if (b[3] - a[3] < b[2] - a[2]) return -2;       /* multiplexed: the counts cover part of the chain */
    *cycles = b[0] - a[0];
    *instructions = b[1] - a[1];
    return 0;
}
