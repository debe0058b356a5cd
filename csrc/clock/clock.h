/* refimpl._clock: the cycle counter, timing loops and machine probes.
 *
 * On x86-64 a region is read as  start = lfence; rdtsc   and
 *                                 stop  = rdtscp; lfence  (TSC_AUX -> cpu id),
 * or stop = lfence; rdtsc; lfence (cpu id unknown) on a CPU without RDTSCP.
 * On aarch64 the virtual counter cntvct_el0 (isb-fenced) is read instead, and
 * elsewhere clock_gettime(CLOCK_MONOTONIC) in nanoseconds.
 * Units are "ticks" of that counter: reference ticks, not core cycles.
 *
 * Sizes: n = number of samples, reps = calls per timed region,
 *        n_adds = length of a dependent add chain, bytes = buffer size.
 */
#include <stdint.h>
#include <stddef.h>

/* which counter this build reads: "rdtsc", "cntvct", or "clock_gettime" */
const char *rf_counter_name(void);
/* the counter's nominal frequency in Hz, where the hardware states it: CNTFRQ_EL0
 * (aarch64), 1e9 (clock_gettime counts nanoseconds); 0 on x86-64, where the TSC's
 * rate is the kernel's to tell (refimpl.timing.counter.kernel_tsc_hz) */
uint64_t rf_counter_nominal_hz(void);
/* one fenced read for the start of a region */
uint64_t rf_ticks_start(void);
/* one fenced read for the end of a region; *cpu <- TSC_AUX (cpu id) or -1 */
uint64_t rf_ticks_stop(int32_t *cpu);
/* 1 when stops read the cpu id (x86-64 with RDTSCP), else 0: without RDTSCP a stop is
 * lfence; rdtsc; lfence and migrations cannot be seen from the counter */
int rf_counter_cpu_ids(void);
/* for tests: on = 1 makes the x86-64 stops take the path without RDTSCP from now on (as on
 * a CPU without it); on = 0 goes back to asking CPUID.  No effect on other counters. */
void rf_counter_without_cpu_ids(int on);

/* deltas[i] = stop - start of an empty fenced region, i < n (overhead, granularity);
 * returns the number of regions whose start and stop cpu ids differed */
int64_t rf_empty_regions(uint64_t *deltas /* (n,) */, int64_t n);

/* ticks of one fenced region around a dependent chain of n_adds 1-cycle adds
 * (inline asm, 16 adds per loop trip; n_adds is rounded up to a multiple of 16) */
uint64_t rf_add_chain_ticks(uint64_t n_adds);

/* ticks of one fenced region around reps calls fn(ctx), the loop in C;
 * *cpu_start, *cpu_stop <- cpu ids read just before and at the end (-1 if unknown) */
uint64_t rf_time_thunk(void (*fn)(void *), void *ctx, uint64_t reps,
                       int32_t *cpu_start, int32_t *cpu_stop);

/* thunks for tests and calibration: the empty kernel, and an add chain of
 * *(uint64_t *)ctx dependent adds */
void rf_empty_thunk(void *ctx);
void rf_add_chain_thunk(void *ctx /* -> uint64_t[2] {n_adds (rounded up to 16s), chain value} */);

/* write one byte per 64-byte line of buf (bytes long): evicts other data from the caches */
void rf_touch(uint8_t *buf /* (bytes,) */, size_t bytes);

/* (both: bytes should be a multiple of 256 and buf 64-byte aligned; bytes is rounded down
 * to a multiple of 256, so nothing past buf + bytes is touched)
 * streaming read of buf (bytes, a multiple of 256, 64-byte aligned) passes times;
 * returns ticks of the whole region; *sink <- xor of all words (keeps the loads live) */
uint64_t rf_bw_read(uint64_t *sink, const void *buf /* (bytes,) */, size_t bytes, uint64_t passes);
/* copy src -> dst (bytes, a multiple of 256, 64-byte aligned) passes times; returns ticks */
uint64_t rf_bw_copy(void *dst /* (bytes,) */, const void *src /* (bytes,) */, size_t bytes, uint64_t passes);
/* SIMD width in bits the bandwidth kernels use: 512, 256 or 128 (0 = scalar) */
int rf_bw_simd_bits(void);

/* perf_event_open probe: count core cycles and instructions (user space) around
 * an add chain of n_adds.  Returns 0 and fills *cycles, *instructions when the
 * counters work; else a positive errno from perf_event_open, or -1 if the
 * counters opened but counted nothing (a VM without a virtual PMU), -2 if they were
 * multiplexed during the chain. */
int rf_perf_probe(uint64_t *cycles, uint64_t *instructions, uint64_t n_adds);

/* Counters for the harness: a perf_event_open group of two events of this thread,
 * user space only, read together.  kind 0: core cycles and instructions (the PMU);
 * kind 1: the software CPU clock (ns) in both places, a stand-in that exercises the
 * same code where no PMU exists.  Returns 0 and fds[0] (the group leader), fds[1];
 * else a positive errno (EINVAL for another kind, ENOSYS off Linux). */
int rf_pmu_open(int kind, int32_t *fds /* (2,) */);
/* out = {event 0, event 1, time enabled, time running} (ns for the times: running <
 * enabled means the kernel multiplexed the counters and they did not count all along).
 * Returns 0, or a positive errno. */
int rf_pmu_read(int32_t leader, uint64_t *out /* (4,) */);
/* close both (fds set to -1; -1 entries are skipped) */
void rf_pmu_close(int32_t *fds /* (2,) */);
