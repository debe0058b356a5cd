"""The cycle counter seen from Python: `cycles()` and `calibrate()`.

    cycles()       -> int       one fenced counter read (start flavour)
    calibrate()    -> Calibration (cached per process; `calibrate(force=True)` re-measures)

Units.  A *tick* is one increment of the counter the native module reads
(`counter` field): the x86 TSC (`rdtsc`, reference ticks at a constant
frequency, *not* core cycles), aarch64 `cntvct_el0`, or nanoseconds of
CLOCK_MONOTONIC as a last resort.  Core cycles are estimated as
ticks x `core_per_tsc`, measured with a dependent add chain (1 core cycle per
add) timed at N and 2N adds; the difference cancels the fixed costs.

Calibration fields
------------------
tsc_hz             ticks per second, against CLOCK_MONOTONIC over `hz_seconds`
overhead_ticks     min over >= 10,000 empty fenced regions (measured in a C loop)
granularity_ticks  GCD of those regions' recurring deltas (the counter's visible step)
core_per_tsc       core cycles per tick (1.0 when the chain cannot be trusted)
perf_available     perf_event_open counted real core cycles and instructions
perf_reason        why not (e.g. "ENOENT: no hardware PMU in this VM")
perf_core_per_tsc  core/TSC from the PMU when available (a cross-check)
cpu_ids            stops read the cpu id (x86-64 RDTSCP's TSC_AUX), so a migration inside a
                   region is seen; False on aarch64, clock_gettime and x86 CPUs without RDTSCP

When the PMU works, `PMU("hardware")` counts core cycles and instructions of this
thread, and the harness reads them around every sample beside the ticks
(`Measurement.pmu_cycles`, `pmu_instructions`): then core cycles are counted,
not estimated.
"""
from __future__ import annotations

import errno
import math
import os
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

from refimpl._clock import ffi, lib

COUNTER = ffi.string(lib.rf_counter_name()).decode()


def cycles() -> int:
    """One fenced counter read (`lfence; rdtsc` on x86-64), in ticks."""
    return int(lib.rf_ticks_start())


def cycles_stop() -> tuple[int, int]:
    """The end-of-region read (`rdtscp; lfence`): (ticks, cpu id or -1)."""
    cpu = ffi.new("int32_t *")
    t = int(lib.rf_ticks_stop(cpu))
    return t, int(cpu[0])


def current_cpu() -> int:
    """The cpu id the counter reports (TSC_AUX), or -1 when it cannot tell."""
    return cycles_stop()[1]


def reads_cpu_ids() -> bool:
    """Whether a stop read also gives the cpu id (x86-64 with RDTSCP): only then does the harness
    see a migration inside a region.  Without RDTSCP (some virtual CPUs) a stop is
    `lfence; rdtsc; lfence`, and pinning alone keeps the thread in place."""
    return bool(lib.rf_counter_cpu_ids())


def tsc_aux_is_the_cpu(limit: int = 16) -> bool:
    """Whether the cpu id a stop reads (RDTSCP's TSC_AUX) is the CPU the thread runs on, pinned in
    turn to each CPU it may use (the first `limit`).  Linux writes TSC_AUX only when it uses RDTSCP
    or RDPID itself; elsewhere (clearcpuid=rdtscp, some hypervisors, other kernels) it may read 0
    on every CPU, and every pinned sample off CPU 0 would count as a migration."""
    if not reads_cpu_ids() or not hasattr(os, "sched_setaffinity"):
        return reads_cpu_ids()
    before = os.sched_getaffinity(0)
    try:
        for c in sorted(before)[:limit]:
            os.sched_setaffinity(0, {c})
            if current_cpu() != c:
                return False
        return True
    finally:
        os.sched_setaffinity(0, before)


@dataclass(frozen=True)
class Calibration:
    counter: str
    tsc_hz: float
    overhead_ticks: int
    granularity_ticks: int
    core_per_tsc: float
    core_per_tsc_spread: float     # relative spread of the chain estimate over trials
    perf_available: bool
    perf_reason: str
    perf_core_per_tsc: float | None
    n_empty_regions: int
    empty_region_migrations: int
    cpu_ids: bool = True           # stops read the cpu id (RDTSCP): migrations are detected

    @property
    def floor_ticks(self) -> int:
        """max(overhead, granularity): the smallest meaningful region."""
        return max(self.overhead_ticks, self.granularity_ticks, 1)

    def ticks_to_seconds(self, ticks: float) -> float:
        return ticks / self.tsc_hz

    def ticks_to_core_cycles(self, ticks: float) -> float:
        return ticks * self.core_per_tsc

    def as_dict(self) -> dict:
        d = asdict(self)
        d["floor_ticks"] = self.floor_ticks
        return d


# ---------------------------------------------------------------- measurements


def measure_tsc_hz(seconds: float = 0.1) -> float:
    """Ticks per second against CLOCK_MONOTONIC, over `seconds`.

    Each end pairs a counter read with the midpoint of two monotonic reads
    taken around it, and keeps the tightest of a few tries.
    """
    def pair():
        best = None
        for _ in range(5):
            a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            t = cycles()
            b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            if best is None or b - a < best[0]:
                best = (b - a, t, (a + b) / 2)
        return best[1], best[2]

    t0, n0 = pair()
    time.sleep(seconds)
    t1, n1 = pair()
    return (t1 - t0) / ((n1 - n0) * 1e-9)


def empty_regions(n: int = 20000) -> tuple[np.ndarray, int]:
    """(deltas of n empty fenced regions, number that saw a cpu change), from a C loop."""
    d = np.zeros(n, dtype=np.uint64)
    migrated = int(lib.rf_empty_regions(ffi.cast("uint64_t *", d.ctypes.data), n))
    return d, migrated


def granularity(deltas, min_share: float = 0.001) -> int:
    """The counter's visible step: the GCD of the nonzero deltas, over those that recur (in at
    least `min_share` of the regions; all of them when none recurs).  One region that a VM exit
    or an interrupt stretched to an odd length does not set it: on this VM the empty regions
    read multiples of 26 ticks, but once, under heavy host load, a GCD over every delta of a
    calibration read 2 (a test comparing two calibrations failed on it)."""
    values, counts = np.unique(np.asarray(deltas, dtype=np.uint64), return_counts=True)
    keep = values > 0
    values, counts = values[keep], counts[keep]
    common = values[counts >= max(2, min_share * len(deltas))]
    use = common if common.size else values
    return math.gcd(*(int(x) for x in use)) if use.size else 1


def whole_trips(n_adds: int) -> int:
    """n_adds rounded up to the 16 adds of a loop trip (what the C chain runs)."""
    return -(-int(n_adds) // 16) * 16


def add_chain_ticks(n_adds: int, trials: int = 7) -> int:
    """Min over trials of the ticks of one region around n_adds dependent adds."""
    return min(int(lib.rf_add_chain_ticks(n_adds)) for _ in range(trials))


def measure_core_per_tsc(n_adds: int = 1 << 20, rounds: int = 5) -> tuple[float, float]:
    """(core cycles per tick, relative spread): N / (t(2N) - t(N)) over `rounds` rounds
    (N rounded up to a multiple of 16: the adds run 16 to a trip)."""
    n_adds = whole_trips(n_adds)
    est = []
    for _ in range(rounds):
        t1 = add_chain_ticks(n_adds)
        t2 = add_chain_ticks(2 * n_adds)
        if t2 > t1:
            est.append(n_adds / (t2 - t1))
    if not est:
        return 1.0, math.inf
    est.sort()
    med = est[len(est) // 2]
    return med, (est[-1] - est[0]) / med


def perf_probe(n_adds: int = 1 << 20) -> tuple[bool, str, float | None, int, int]:
    """(works, reason, cycles per add, cycles, instructions) from perf_event_open."""
    n_adds = whole_trips(n_adds)
    c = ffi.new("uint64_t *")
    i = ffi.new("uint64_t *")
    rc = int(lib.rf_perf_probe(c, i, n_adds))
    if rc == 0:
        return True, "perf_event_open counts core cycles and instructions", c[0] / n_adds, int(c[0]), int(i[0])
    if rc == -1:
        return False, "perf_event_open opened but counted nothing (no virtual PMU)", None, 0, 0
    if rc == -2:
        return False, ("perf_event_open's counters were multiplexed with other events during the probe "
                       "(their counts would cover part of each sample)"), None, 0, 0
    name = errno.errorcode.get(rc, str(rc))
    why = {errno.ENOENT: "no hardware PMU exposed (typical in a VM)",
           errno.EACCES: "not permitted (kernel.perf_event_paranoid)",
           errno.EPERM: "not permitted (kernel.perf_event_paranoid / seccomp)",
           errno.ENOSYS: "perf_event_open not supported by this kernel",
           errno.EOPNOTSUPP: "hardware events not supported"}.get(rc, os.strerror(rc))
    return False, f"perf_event_open failed: {name}: {why}", None, 0, 0


class PMU:
    """Two counters of the calling thread, user space only, read together (perf_event_open).

    kind "hardware": core cycles and instructions, what `measure()` counts beside the
    ticks when `calibrate().perf_available`.  kind "cpu-clock": the software CPU clock of
    this thread (nanoseconds it was on a CPU) in both places, a stand-in that runs the same
    code on machines without a PMU (tests).  Not the task clock: that one leaves out the
    time the hypervisor stole and interrupts took, which the TSC counts.  Counters follow the thread that opened them: read them from it.

        pmu = PMU("hardware")              # OSError (its errno) when the kernel refuses
        a, b, enabled, running = pmu.read()  # counts so far; the ns the group was enabled
                                           # and counting (running < enabled: multiplexed)
    """

    KINDS = {"hardware": (0, ("cycles", "instructions")),
             "cpu-clock": (1, ("cpu-clock ns", "cpu-clock ns"))}

    def __init__(self, kind: str = "hardware"):
        if kind not in self.KINDS:
            raise ValueError(f"PMU: kind={kind!r} must be one of {list(self.KINDS)}")
        code, self.events = self.KINDS[kind]
        self.kind = kind
        self._fds = ffi.new("int32_t[2]")
        self._out = ffi.new("uint64_t[4]")
        rc = int(lib.rf_pmu_open(code, self._fds))
        if rc:
            raise OSError(rc, f"perf_event_open ({kind}): {os.strerror(rc)}")
        self._owner = (os.getpid(), threading.get_native_id())

    def read(self) -> tuple[int, int, int, int]:
        """(event 0, event 1, ns enabled, ns running).  Over an interval, running < enabled
        means the kernel multiplexed the counters: their counts cover part of it only.
        ValueError from any thread but the one that opened them (or a forked child): they count
        that thread only, and another one's reads would be ~0, taken for counts."""
        if self._fds[0] < 0:
            raise ValueError("PMU: read after close()")
        if (os.getpid(), threading.get_native_id()) != self._owner:
            raise ValueError(f"PMU: read from thread {threading.get_native_id()} of process {os.getpid()}, "
                             f"but the counters count thread {self._owner[1]} of process {self._owner[0]}, "
                             "which opened them: open a PMU in the thread that runs the code")
        rc = int(lib.rf_pmu_read(self._fds[0], self._out))
        if rc:
            raise OSError(rc, f"reading the {self.kind} counters: {os.strerror(rc)}")
        o = self._out
        return int(o[0]), int(o[1]), int(o[2]), int(o[3])

    def close(self) -> None:
        lib.rf_pmu_close(self._fds)

    def __del__(self):
        if getattr(self, "_fds", None) is not None:
            try:
                self.close()
            except Exception:       # interpreter shutdown: the native module may be gone
                pass


_CACHE: Calibration | None = None


def calibrate(force: bool = False, hz_seconds: float = 0.1, n_empty: int = 20000) -> Calibration:
    """Measure (once per process unless `force`) the counter's rate, overhead, step and core/TSC."""
    global _CACHE
    if _CACHE is not None and not force:
        return _CACHE
    if n_empty < 10000:
        raise ValueError(f"n_empty={n_empty}: the overhead needs at least 10000 empty regions")
    if reads_cpu_ids() and not tsc_aux_is_the_cpu():
        lib.rf_counter_without_cpu_ids(1)                # stops read no cpu id from here on
    d, migrated = empty_regions(n_empty)
    overhead = int(d.min())
    gran = granularity(d)
    hz = measure_tsc_hz(hz_seconds)
    if COUNTER == "clock_gettime":
        hz = 1e9
    cpt, spread = measure_core_per_tsc()
    ok, reason, cyc_per_add, _, _ = perf_probe()
    perf_cpt = None
    if ok and cyc_per_add:
        # the chain costs 1 core cycle per add; ticks per add from the chain timing
        ticks_per_add = add_chain_ticks(1 << 20) / (1 << 20)
        perf_cpt = cyc_per_add / ticks_per_add
    _CACHE = Calibration(counter=COUNTER, tsc_hz=hz, overhead_ticks=overhead, granularity_ticks=gran,
                         core_per_tsc=cpt, core_per_tsc_spread=spread, perf_available=ok,
                         perf_reason=reason, perf_core_per_tsc=perf_cpt, n_empty_regions=n_empty,
                         empty_region_migrations=migrated, cpu_ids=reads_cpu_ids())
    return _CACHE


def kernel_tsc_hz() -> tuple[float | None, str]:
    """The counter's frequency as the hardware or the kernel states it: (Hz, source) or (None, why not).

    The counter is not always a TSC: aarch64's generic timer states its own rate in
    CNTFRQ_EL0 (24 MHz to 1 GHz on real parts), and clock_gettime counts nanoseconds.
    For the TSC, sources in order: /sys/devices/system/cpu/cpu0/tsc_freq_khz (some kernels);
    a `tsc` line in /proc/cpuinfo; and, on a KVM guest whose TSC frequency the
    hypervisor announced (flags `hypervisor` + `tsc_known_freq`, no
    `aperfmperf`), the `cpu MHz` line, which is then cpu_khz = tsc_khz (both
    come from the hypervisor's TSC frequency leaf and the kernel cannot
    measure a different core clock without APERF/MPERF).
    """
    nominal = int(lib.rf_counter_nominal_hz())
    if COUNTER == "cntvct":
        if nominal > 0:
            return float(nominal), "CNTFRQ_EL0 (the generic timer's frequency register)"
        return None, "CNTFRQ_EL0 reads 0: the firmware did not set the generic timer's frequency"
    if COUNTER == "clock_gettime":
        return float(nominal), "clock_gettime(CLOCK_MONOTONIC) counts nanoseconds"
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return float(f.read().strip()) * 1e3, "/sys/devices/system/cpu/cpu0/tsc_freq_khz"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, "neither tsc_freq_khz in sysfs nor /proc/cpuinfo is readable"
    flags, mhz = set(), None
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k = k.strip()
        if k == "tsc" or k.lower() in ("tsc mhz", "tsc_mhz"):
            try:
                return float(v.split()[0]) * 1e6, f"/proc/cpuinfo {k!r} line"
            except (ValueError, IndexError):
                pass
        if k == "flags" and not flags:
            flags = set(v.split())
        if k == "cpu MHz" and mhz is None:
            try:
                mhz = float(v)
            except ValueError:
                pass
        if not line.strip() and flags:
            break
    if mhz and {"hypervisor", "tsc_known_freq"} <= flags and "aperfmperf" not in flags:
        return mhz * 1e6, "/proc/cpuinfo 'cpu MHz' (KVM guest with tsc_known_freq and no aperfmperf: cpu_khz = tsc_khz)"
    return None, ("the kernel exposes no TSC frequency here (no /sys/.../tsc_freq_khz, no tsc line in "
                  "/proc/cpuinfo, and 'cpu MHz' is not known to equal the TSC rate on this CPU)")
