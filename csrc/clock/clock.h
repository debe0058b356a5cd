/* refimpl._clock: the cycle counter.
 *
 * On x86-64 a region is read as  start = lfence; rdtsc   and
 *                                 stop  = rdtscp; lfence  (TSC_AUX -> cpu id).
 * On aarch64 the virtual counter cntvct_el0 (isb-fenced) is read instead, and
 * elsewhere clock_gettime(CLOCK_MONOTONIC_RAW) in nanoseconds.
 * Units are "ticks" of that counter: reference ticks, not core cycles.
 */
#include <stdint.h>

/* which counter this build reads: "rdtsc", "cntvct", or "clock_gettime" */
const char *rf_counter_name(void);
/* one fenced read for the start of a region */
uint64_t rf_ticks_start(void);
/* one fenced read for the end of a region; *cpu <- TSC_AUX (cpu id) or -1 */
uint64_t rf_ticks_stop(int32_t *cpu);
