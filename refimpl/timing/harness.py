"""The benchmark harness: `measure(target, ...) -> Measurement`.

`target` is either a prepared C call (`refimpl.kernels.ccall.CCall`), timed by
a loop in C (`rf_time_thunk`: `reps` calls of `fn(ctx)` between two fenced
counter reads, no Python inside the region), or any Python callable (NumPy,
Numba, torch), timed from Python with the same counter around a loop of
`reps` calls.

Recipe (from the project's design notes, "Timing on bare CPUs"):
  1. pin the thread to one CPU (restored afterwards);
  2. warm up: call until `warmup_s` has passed (>= `warmup_calls` calls).
     Numba compiles on its first call: that call is part of the warm-up and
     never of a sample;
  3. size the inner repetitions so one sample lasts >= 1000 x
     max(overhead, granularity) ticks, the overhead of the region the target is
     timed in: the C loop's (~26 ticks here) or the Python loop's (~390), checked
     by timing regions of that many calls, with a margin (SIZING_MARGIN: the core
     clock may be faster when the samples are taken), and checked again by the
     first SIZE_CHECKS samples of every slice, which grow the repetitions when
     the machine now runs faster (cold mode: 1 call per sample);
  4. take samples until `budget_s` has passed (>= `min_samples`,
     <= `max_samples`); cold mode touches a buffer larger than L3 before
     each sample, outside the timed region;
  4b. a sample during which the thread was preempted (its involuntary
     context-switch count, getrusage(RUSAGE_THREAD), grew) measured another
     process too: it is dropped and counted in `preempted`; sampling goes on
     until `min_samples` clean samples exist (or 4 x the budget has passed,
     then the preempted ones are kept and the run is flagged);
  4c. the same getrusage call counts the thread's page faults around each sample:
     `faults_per_call` (a buffer the allocator returned to the kernel and maps
     again on every call pays for each page, on this VM ~1-4k ticks per 4 KiB);
  4d. when the PMU counts (`calibrate().perf_available`; `pmu=` chooses), its core
     cycles and instructions are read around each sample too, outside the ticks'
     region, and reduced the same way: (counts - an empty region's counts) / reps,
     medians over the pooled samples in `pmu_cycles`, `pmu_instructions` (a sample
     during which the kernel multiplexed the counters is left out of them);
  5. per-call ticks of a sample = (sample ticks - region overhead) / reps,
     where the region overhead is the calibrated empty-region minimum (C
     loop) or the empty-loop minimum measured from Python (Python targets);
  6. statistics: min, median, MAD, p90, mean, n, CV.  `cv` is the robust
     coefficient of variation 1.4826 MAD / median (equal to std / mean for
     normal noise): one timer interrupt or preemption inside one sample makes
     the classical std / mean meaningless, so that one is kept as `cv_raw`
     (reported, not used for flags).  `cv_within` is the median of the robust
     CVs of the separate slices the samples were taken in (one slice for
     `measure()`; see `measure_interleaved`): the kernel's short-term jitter,
     while `cv` also holds the machine's drift between slices.  The run is
     `unstable` when cv >= 5 %, the CPU changed (TSC_AUX) or the hypervisor's
     steal time for the pinned CPU grew by more than 1 % of the run's wall
     time (/proc/stat).

`measure_interleaved(targets, rounds=R, budget_s=B)` times several targets
round-robin: all are warmed up (step 2-3), then `interleave_order(n, R)` is
followed, one slice of B / R seconds per visit (its first >= 3 samples and
>= 2 ms are discarded: the previous target evicted this one's data), and each
target's statistics pool the samples of its R slices (`Measurement.rounds`,
`round_sizes`).  A drift of the machine during the run is then shared by every
target instead of landing on whichever was being timed.  `measure()` is the
one-target, one-slice case.

Quiet gate (`measure_interleaved(..., gate=QuietProbe())`): on a shared host the
machine switches between a quiet state and a busy one (another tenant on the same
core's SMT sibling or caches) for 0.5-5 s at a time; measured here, Python-called
code ran 1.6x and L1/L2-bound C kernels 1.2-1.3x slower in the busy state, ~50 % of
the time.  A median pooled over both states then jumps by 10-20 % between runs,
depending on which state held longer.  The gate reads a short probe before the first
slice and after every slice (`QuietProbe.read`: Python-level calls of a 16 KiB C read,
the code that showed the busy state most), and after the run calls a slice quiet when
the readings on both sides of it are <= (1 + GATE_TOL) x the run's quiet level (the
GATE_LEVEL_PCT-th percentile of all its readings).  Each target's statistics then
pool its quiet slices only.  A target with fewer than GATE_MIN_ROUNDS quiet slices
gets extra slices (up to `gate_extra_s` seconds in all); if still short, its
GATE_MIN_ROUNDS least busy slices are pooled and it is flagged.  On an idle machine
(or one busy throughout) nearly every slice is within the tolerance and the gate
changes nothing; `median_all` and `cv_all` keep the statistics of every slice.

What the harness cannot control: where the target's buffers sit.  A load whose
address matches a pending store's in the low 12 bits waits for it, so the same
kernel on the same shape ran 20.0-21.0k or 22.7-25.5k ticks here (C layer_norm,
64 x 768) depending on where its inputs sat mod 4 KiB, with CV < 1 % either way; a
tight `cv` does not say another process would agree.  `refimpl.kernels.buffers.
spread_copies` lays inputs out the same way in every process (`refimpl bench` does).

All figures are TSC ticks (reference ticks); `*_core` fields are estimated
core cycles = ticks x core_per_tsc.
"""
from __future__ import annotations

import gc
import math
import os
try:
    import resource
    _RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)
except ImportError:  # not on every platform
    resource = None
    _RUSAGE_THREAD = None
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from refimpl._clock import ffi, lib
from refimpl.timing.counter import PMU, Calibration, calibrate, current_cpu, whole_trips

CV_UNSTABLE = 0.05
STEAL_UNSTABLE = 0.01
SAMPLE_FACTOR = 1000
SIZING_MARGIN = 2.0    # size samples for 2 x the target: the host can change state between sizing
                       # and sampling, and its busy state runs code up to 1.8x slower (the quiet gate's
                       # readings); in CI a 64-add chain sized while busy ran 1.33x faster in its samples
SIZE_CHECKS = 3        # the first samples of every slice re-check the size and grow the repetitions
                       # when the machine now runs faster than that margin allows
GATE_TOL = 0.10        # a slice is quiet when the probe readings around it are <= (1 + GATE_TOL) x quiet level
GATE_LEVEL_PCT = 10    # the quiet level: this percentile of all the run's probe readings
GATE_MIN_ROUNDS = 3    # fewer quiet slices than this: extra slices, else the least busy ones (flagged)


@dataclass
class Measurement:
    name: str
    kind: str                     # "c-loop" (CCall) or "python"
    reps: int                     # calls per sample
    n: int                        # samples
    min: float                    # ticks per call (overhead subtracted)
    median: float
    mad: float                    # median absolute deviation, ticks
    p90: float
    mean: float
    cv: float                     # robust: 1.4826 MAD / median
    cv_raw: float                 # std / mean (outlier-sensitive)
    overhead_ticks: float         # subtracted once per sample (divided by reps per call)
    cold: bool
    cpu: int                      # the CPU the run was pinned to (-1: not pinned)
    migrations: int               # samples whose start/stop CPU differed from the pinned one
    preempted: int                # samples dropped because the thread was switched out during them
    steal_ticks: int              # growth of /proc/stat steal (USER_HZ) for that CPU during the run
    wall_s: float
    unstable: bool
    reasons: list = field(default_factory=list)
    core_per_tsc: float = 1.0
    samples: list = field(default_factory=list, repr=False)   # per-call ticks of every sample
    rounds: int = 1               # separate slices the samples were taken in (measure_interleaved)
    round_sizes: list = field(default_factory=list, repr=False)  # clean samples per slice, in order
    cv_within: float | None = None  # median over slices (>= 5 samples) of each slice's robust CV:
                                    # the short-term jitter; cv above also holds the drift between slices
    round_medians: list = field(default_factory=list)  # median of each slice's clean samples, in order:
                                    # the machine's drift over the run, seen by this kernel
    round_kept: list = field(default_factory=list)     # per slice: pooled in the statistics (all True without a gate)
    quiet_rounds: int | None = None  # slices the gate found quiet (None: no gate)
    median_all: float | None = None  # median and robust CV over every slice, quiet or not (None: no gate)
    cv_all: float | None = None
    faults_per_call: float | None = None  # page faults per call inside the samples (None: unknown)
    pmu: str | None = None            # counters read around every sample: "hardware" (core cycles,
                                      # instructions), "cpu-clock" (a test stand-in), None: none
    pmu_cycles: float | None = None   # median per call of the pooled samples' first counter (core
                                      # cycles: counted, not estimated), region overhead subtracted
    pmu_instructions: float | None = None  # the same for the second (instructions)

    @property
    def median_core(self) -> float:
        """Estimated core cycles per call (median)."""
        return self.median * self.core_per_tsc

    @property
    def min_core(self) -> float:
        return self.min * self.core_per_tsc

    def as_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples")
            d.pop("round_sizes")
        d["median_core"] = self.median_core
        d["min_core"] = self.min_core
        return d


def stats(x) -> dict:
    """min, median, MAD, p90, mean, robust CV (1.4826 MAD/median) and std/mean of per-call ticks."""
    x = np.asarray(x, dtype=np.float64)
    med = float(np.median(x))
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    mad = float(np.median(np.abs(x - med)))
    return dict(min=float(x.min()), median=med, mad=mad, p90=float(np.percentile(x, 90)), mean=mean,
                cv=(1.4826 * mad / med if med > 0 else (0.0 if mad == 0 else math.inf)),
                cv_raw=(std / mean if mean > 0 else (0.0 if std == 0 else math.inf)))


# ------------------------------------------------------------------ pinning


@contextmanager
def pinned(cpu: int | None = None):
    """Pin the calling thread to one CPU (the current one by default); restore after.

    Yields the CPU pinned to, or -1 when affinity is not supported.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield -1
        return
    before = os.sched_getaffinity(0)
    if cpu is None:
        here = current_cpu()
        cpu = here if here in before else min(before)
    if cpu not in before:
        raise ValueError(f"cpu={cpu} is not in this process's affinity set {sorted(before)}")
    threads = _threads()
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)
        # a thread started meanwhile (torch's or Numba's pool, made on first use inside a timed
        # call) inherited the pin and would keep it for the life of the process
        for tid in _threads() - threads:
            try:
                os.sched_setaffinity(tid, before)
            except OSError:                              # it has ended
                pass


def _threads() -> set[int]:
    """This process's thread ids (Linux), or an empty set."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


class SingleThreaded:
    """BLAS / OpenMP pools (threadpoolctl), torch and Numba limited to one thread; restored after.

    The harness times on one pinned CPU: a pool of several threads there only takes turns (and
    a NumPy matmul timed with OpenBLAS on both CPUs read 159 % of one core's peak).  Enter it
    before pinning, so that a pool it starts does not start pinned."""

    def __enter__(self):
        import sys

        from threadpoolctl import threadpool_limits
        self._tp = threadpool_limits(limits=1)
        # numba first: starting its threading layer can reset the OpenMP thread
        # count torch reads, so torch is limited last
        self._numba = self._torch = None
        if "numba" in sys.modules:
            try:
                import numba
                self._numba = (numba, numba.get_num_threads())
                numba.set_num_threads(1)
            except Exception:                            # no threading layer: nothing to limit
                self._numba = None
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            self._torch = (torch, torch.get_num_threads())
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        self._tp.restore_original_limits()
        if self._torch:
            self._torch[0].set_num_threads(self._torch[1])
        if self._numba:
            self._numba[0].set_num_threads(self._numba[1])
        return False


def steal_of(cpu: int, path: str = "/proc/stat") -> int:
    """Steal time (USER_HZ ticks) of `cpu` from /proc/stat; 0 if unknown.  cpu < 0 (an unpinned
    run, which may have been on any CPU): the mean over all CPUs, not their sum, so that it
    compares with one thread's wall time as a pinned CPU's does."""
    key = f"cpu{cpu}" if cpu >= 0 else "cpu"
    steal, n_cpus = 0, 0
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == key:
                    steal = int(parts[8]) if len(parts) > 8 else 0
                    if cpu >= 0:
                        return steal
                elif parts[0][:3] == "cpu" and parts[0][3:].isdigit():
                    n_cpus += 1
    except OSError:
        return 0
    return round(steal / n_cpus) if n_cpus else steal


# ------------------------------------------------------------- cold caches

_FLUSH: np.ndarray | None = None


def flush_bytes() -> int:
    """2 x the largest cache (sysfs), at least 64 MiB."""
    from refimpl.timing.machine import cache_sizes
    sizes = cache_sizes()
    biggest = max((c["size"] for c in sizes), default=0)
    return max(2 * biggest, 64 << 20)


def flush_caches() -> None:
    """Touch (write) every line of a buffer larger than the last-level cache."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = np.zeros(flush_bytes(), dtype=np.uint8)
    lib.rf_touch(ffi.cast("uint8_t *", _FLUSH.ctypes.data), _FLUSH.nbytes)


# --------------------------------------------------------------- sampling


def _switches_and_faults() -> tuple[int, int]:
    """(involuntary context switches, page faults) of this thread so far ((-1, -1) if unknown).
    Page faults are minor + major: a minor fault maps a page the process had given back to
    the kernel (an output buffer freed and allocated again per call), ~1-4k ticks each here."""
    if _RUSAGE_THREAD is None:
        return -1, -1
    ru = resource.getrusage(_RUSAGE_THREAD)
    return ru.ru_nivcsw, ru.ru_minflt + ru.ru_majflt

_PY_OVERHEAD: float | None = None


def _py_region(fn, args, kw, reps: int) -> tuple[int, int, int]:
    start, stop = lib.rf_ticks_start, lib.rf_ticks_stop
    cpu = ffi.new("int32_t *")
    c0 = ffi.new("int32_t *")
    stop(c0)
    t0 = start()
    for _ in range(reps):
        fn(*args, **kw)
    t1 = stop(cpu)
    return t1 - t0, c0[0], cpu[0]


def python_overhead_ticks() -> float:
    """Min ticks of an empty region read from Python (the loop of 0 calls)."""
    global _PY_OVERHEAD
    if _PY_OVERHEAD is None:
        noop = lambda: None  # noqa: E731
        _PY_OVERHEAD = float(min(_py_region(noop, (), {}, 0)[0] for _ in range(2000)))
    return _PY_OVERHEAD


def _is_ccall(target) -> bool:
    return hasattr(target, "fn_addr") and hasattr(target, "ctx_addr")


def cpu_times() -> dict:
    """{cpu: (busy, total)} USER_HZ ticks per CPU from /proc/stat (busy = all but idle, iowait
    and steal); {} when unknown."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                p = line.split()
                if p and p[0].startswith("cpu") and p[0] != "cpu":
                    v = [int(x) for x in p[1:]]
                    idle = v[3] + (v[4] if len(v) > 4 else 0)
                    steal = v[7] if len(v) > 7 else 0
                    total = sum(v[:8])
                    out[int(p[0][3:])] = (total - idle - steal, total)
    except (OSError, ValueError):
        pass
    return out


def busy_fraction(before: dict, after: dict, exclude=()) -> float | None:
    """Fraction of the elapsed CPU time the CPUs not in `exclude` were busy (None if unknown)."""
    busy = total = 0
    for c, (b1, t1) in after.items():
        if c in exclude or c not in before:
            continue
        busy += b1 - before[c][0]
        total += t1 - before[c][1]
    return busy / total if total > 0 else None


def interleave_order(n_rows: int, rounds: int) -> list[tuple[int, int]]:
    """[(round, row)]: round 0 visits rows 0..n_rows-1, then round 1 visits them again, ...

    Every row gets exactly `rounds` visits, one per round, so a slow drift of the host
    (frequency, a neighbour's cache traffic) is spread over every row instead of landing
    on the rows that happened to be timed during it.
    """
    if n_rows < 0 or rounds < 1:
        raise ValueError(f"interleave_order: n_rows={n_rows} must be >= 0 and rounds={rounds} >= 1")
    return [(k, i) for k in range(rounds) for i in range(n_rows)]


_PMU = threading.local()
if hasattr(os, "register_at_fork"):                      # a child's threads are not its parent's
    os.register_at_fork(after_in_child=lambda: _PMU.__dict__.clear())


def default_pmu():
    """This thread's hardware counters (counter.PMU) when calibrate() found perf_event_open
    counting real core cycles, else None: opened once per thread, shared by its measurements."""
    if not hasattr(_PMU, "pmu"):
        _PMU.pmu = None
        if calibrate().perf_available:
            try:
                _PMU.pmu = PMU("hardware")
            except OSError:
                pass
    return _PMU.pmu


def _resolve_pmu(pmu, cal):
    if isinstance(pmu, str) and pmu == "auto":
        return default_pmu() if cal.perf_available else None
    if pmu is None or pmu is False:
        return None
    if isinstance(pmu, PMU):
        return pmu
    raise ValueError(f"measure: pmu={pmu!r} must be 'auto', None or a refimpl.timing.counter.PMU")


def _pmu_region_base(pmu, region, n: int = 200) -> tuple[float, float]:
    """Counts of each counter around an empty region (0 calls), read the way the samples
    read them: the reads' and the region's own cost, subtracted from every sample.  The
    median, not the min as for the ticks' overhead: reading the counters is a system call
    whose cost varies by microseconds (software counters count the kernel's part too)."""
    c, i = [], []
    for _ in range(n):
        a = pmu.read()
        region(0)
        b = pmu.read()
        if b[3] - a[3] >= b[2] - a[2]:
            c.append(b[0] - a[0])
            i.append(b[1] - a[1])
    return (float(np.median(c)), float(np.median(i))) if c else (0.0, 0.0)


def _finite_median(x) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None


class Sampler:
    """Samples of one target, possibly taken in several separate slices (`take`).

    `measure()` is one `warm()` + one `take()`; `measure_interleaved()` warms every
    target, then takes one slice of each per round.  The caller pins the thread and
    disables the GC around the whole thing; the sampler records the CPU it must stay on.
    """

    def __init__(self, target: Any, args=(), kwargs=None, *, name: str | None = None, cold: bool = False,
                 cpu: int = -1, reps: int | None = None, sample_factor: int = SAMPLE_FACTOR,
                 cal: Calibration | None = None, pmu: Any = "auto"):
        self.cal = cal or calibrate()
        self.pmu = _resolve_pmu(pmu, self.cal)
        self.pmu_base = None      # counts of an empty region (median; first take()), subtracted like the ticks' overhead
        self.pmu_c: list[float] = []   # per call, parallel to per_call (nan: the sample's counts were partial)
        self.pmu_i: list[float] = []
        kwargs = kwargs or {}
        self.target = target      # keeps a CCall's context alive while its address is timed
        self.is_c = _is_ccall(target)
        if not self.is_c and not callable(target):
            raise TypeError(f"measure: target must be a CCall or a callable, got {type(target).__name__}")
        if reps is not None and (not isinstance(reps, (int, np.integer)) or isinstance(reps, bool)):
            raise TypeError(f"measure: reps must be an integer (or None: sized), got {type(reps).__name__} {reps!r}")
        if reps is not None and reps < 1:
            raise ValueError(f"measure: reps={reps} must be >= 1")
        if self.is_c and (args or kwargs):                # the C loop calls fn(ctx): nothing else reaches it
            raise TypeError(f"measure: a CCall takes its arguments in prepare(...), not here; got "
                            f"{len(args)} positional and {sorted(kwargs)} keyword argument(s)")
        if self.is_c and not target.fn_addr:
            raise ValueError("measure: the CCall's fn_addr is 0 (NULL): nothing to call")
        if cold and reps not in (None, 1):
            raise ValueError(f"measure: reps={reps} with cold=True: a cold sample is one call after a flush")
        self.name = name or getattr(target, "__qualname__", None) or type(target).__name__
        if self.is_c:
            fn = ffi.cast("void(*)(void*)", target.fn_addr)
            ctx = ffi.cast("void*", target.ctx_addr)
            c0p, c1p = ffi.new("int32_t *"), ffi.new("int32_t *")

            def region(r):
                t = lib.rf_time_thunk(fn, ctx, r, c0p, c1p)
                return int(t), c0p[0], c1p[0]
            self.overhead = float(self.cal.overhead_ticks)
            self.kind = "c-loop"
        else:
            def region(r):
                return _py_region(target, args, kwargs, r)
            self.overhead = python_overhead_ticks()
            self.kind = "python"
        self.region = region
        self.cold, self.cpu, self.sample_factor = cold, cpu, sample_factor
        self.r = 1 if cold else reps
        self.sized = self.r is None   # r sized here (warm), so checked and regrown in take()
        self.per_call: list[float] = []
        self.dropped: list[float] = []
        self.migrations = 0
        self.steal = 0
        self.wall = 0.0
        self.slices = 0
        self.sizes: list[int] = []
        self.faults = 0           # page faults inside the timed samples (rewarm excluded)
        self.calls = 0            # calls inside those samples

    def floor_ticks(self) -> float:
        """max(overhead, granularity) of this target's regions: the C loop's fenced region, or
        the Python loop's (~15x larger here: the counter is read through two cffi calls)."""
        return max(self.overhead, self.cal.floor_ticks)

    def warm(self, warmup_s: float = 0.02, warmup_calls: int = 2) -> None:
        """Call until `warmup_s` has passed (>= warmup_calls calls); size the inner repetitions
        so a sample lasts >= sample_factor x floor_ticks() (sized for SIZING_MARGIN x that):
        first from the cheapest one-call region, then by timing regions of r calls and growing r
        until one is long enough (one call alone costs more than a call inside a loop, so the
        first estimate falls short)."""
        one = math.inf
        t_end = time.perf_counter() + warmup_s
        k = 0
        while k < warmup_calls or (time.perf_counter() < t_end and k < 10000):
            one = min(one, self.region(1)[0] - self.overhead)
            k += 1
        if self.r is None:
            target = SIZING_MARGIN * self.sample_factor * self.floor_ticks()
            r = max(1, math.ceil(target / max(one, 1.0)))
            for _ in range(8):
                t = min(self.region(r)[0] for _ in range(3)) - self.overhead
                if t >= target:
                    break
                r = max(r + 1, math.ceil(r * 1.1 * target / max(t, 1.0)))
            self.r = r

    def take(self, budget_s: float, min_samples: int, max_samples: int, rewarm: int = 0,
             rewarm_s: float = 0.0, give_up_s: float | None = None) -> None:
        """Sample until `budget_s` has passed and this slice holds >= min_samples clean samples,
        or it holds max_samples, or `give_up_s` (default 4 x budget_s) has passed with
        min_samples taken, preempted ones included.  The first samples are discarded until
        `rewarm` of them and `rewarm_s` seconds have passed: after another target ran, the
        first samples of this one ran slow (its data, code and allocator state come back)."""
        if self.r is None:
            self.warm()
        r, cpu, region, pmu = self.r, self.cpu, self.region, self.pmu
        if pmu is not None and self.pmu_base is None:
            self.pmu_base = _pmu_region_base(pmu, region)
        steal0 = steal_of(cpu)
        w0 = time.perf_counter()
        # re-warm through the sampling loop itself (same code between regions as a kept
        # sample), discarding what it measures: `rewarm` samples and `rewarm_s` seconds
        warm_left, warm_end = rewarm, w0 + rewarm_s
        # with r sized here, the first SIZE_CHECKS kept samples check that a sample still lasts the
        # target (the machine may run faster than when r was sized); r grows if not, checked again
        target = self.sample_factor * self.floor_ticks()
        check, regrown = ([] if self.sized else None), 0
        deadline = give_up = math.inf
        n0, d0 = len(self.per_call), len(self.dropped)
        while len(self.per_call) - n0 < max_samples:
            if self.cold:
                flush_caches()
            sw0, pf0 = _switches_and_faults()
            if pmu is not None:
                p0 = pmu.read()
            t, ca, cb = region(r)
            if pmu is not None:
                p1 = pmu.read()
            sw1, pf1 = _switches_and_faults()
            if warm_left > 0 or (rewarm_s > 0 and deadline == math.inf and time.perf_counter() < warm_end):
                warm_left -= 1
                continue
            if deadline == math.inf:
                t0 = time.perf_counter()
                deadline = t0 + budget_s
                give_up = t0 + (4 * budget_s if give_up_s is None else give_up_s)
            migrated = (cpu >= 0 and (ca != cpu or cb != cpu) and ca >= 0) or (cpu < 0 and ca != cb)
            self.migrations += bool(migrated)
            if t >= 1 << 63:             # stop before start: a migration across unsynchronised TSCs
                continue                 # wrapped to ~1.8e19 ticks; no figure at all
            x = (t - self.overhead) / r
            # a sample that changed CPU read two CPUs' counters: dropped, as a preempted one is
            (self.dropped if sw1 != sw0 or migrated else self.per_call).append(x)
            if pmu is not None and sw1 == sw0 and not migrated:
                whole = p1[3] - p0[3] >= p1[2] - p0[2]          # counted the whole sample
                self.pmu_c.append((p1[0] - p0[0] - self.pmu_base[0]) / r if whole else math.nan)
                self.pmu_i.append((p1[1] - p0[1] - self.pmu_base[1]) / r if whole else math.nan)
            self.faults += pf1 - pf0
            self.calls += r
            if check is not None:       # kept: a short sample is still a right one, just noisier
                check.append(t - self.overhead)
                if len(check) == SIZE_CHECKS:
                    t_med = float(np.median(check))
                    check = None
                    if t_med < target and regrown < 4:
                        r = self.r = max(r + 1, math.ceil(r * SIZING_MARGIN * target / max(t_med, 1.0)))
                        check, regrown = [], regrown + 1
            n, now = len(self.per_call) - n0, time.perf_counter()
            if n >= min_samples and now >= deadline:
                break
            if now >= give_up and n + len(self.dropped) - d0 >= min_samples:
                break
        self.wall += time.perf_counter() - w0
        self.steal += steal_of(cpu) - steal0
        self.slices += 1
        self.sizes.append(len(self.per_call) - n0)

    def result(self, min_samples: int, busy: list[float] | None = None, tol: float = GATE_TOL) -> Measurement:
        """Statistics of the samples.  `busy` (from the quiet gate: per slice, the larger probe
        reading around it over the quiet level) keeps the quiet slices (busy <= 1 + tol) when
        there are >= GATE_MIN_ROUNDS of them holding >= min_samples samples; else the
        GATE_MIN_ROUNDS least busy slices, and the row is flagged."""
        reasons = []
        slices, starts, k = [], [], 0
        for n in self.sizes:
            slices.append(self.per_call[k:k + n])
            starts.append(k)
            k += n
        if busy is not None and len(busy) != len(slices):
            raise ValueError(f"result: {len(busy)} gate readings for {len(slices)} slices")
        flags = [b <= 1 + tol for b in busy] if busy is not None else [True] * len(slices)
        keep = list(flags)
        extra = {}
        if busy is not None:
            n_kept = sum(len(x) for x, q in zip(slices, keep) if q)
            if not (sum(keep) >= GATE_MIN_ROUNDS and n_kept >= min_samples):
                least = sorted(range(len(slices)), key=lambda j: (busy[j], j))[:GATE_MIN_ROUNDS]
                keep = [j in least for j in range(len(slices))]
                reasons.append(f"host busy: {sum(flags)} of {len(slices)} slices quiet, the {len(least)} least "
                               "busy ones used")
            all_s = stats(self.per_call)
            extra = dict(quiet_rounds=sum(flags), median_all=all_s["median"], cv_all=all_s["cv"])
        per_call = [x for sl, q in zip(slices, keep) if q for x in sl]
        if self.pmu is not None:
            kept = [j for k0, sl, q in zip(starts, slices, keep) if q for j in range(k0, k0 + len(sl))]
            extra.update(pmu=self.pmu.kind, pmu_cycles=_finite_median([self.pmu_c[j] for j in kept]),
                         pmu_instructions=_finite_median([self.pmu_i[j] for j in kept]))
        if len(self.per_call) < min_samples:
            reasons.append(f"{len(self.dropped)} of {len(self.per_call) + len(self.dropped)} samples preempted (kept)")
            per_call = per_call + self.dropped
        s = stats(per_call)
        cvs = [stats(sl)["cv"] for sl, q in zip(slices, keep) if q and len(sl) >= 5]
        meds = [float(np.median(sl)) for sl in slices if len(sl)]
        if len(self.per_call) >= min_samples and cvs:
            s["cv_within"] = float(np.median(cvs))
        if s["cv"] >= CV_UNSTABLE:
            reasons.append(f"CV {s['cv']:.1%} >= {CV_UNSTABLE:.0%}")
        if self.migrations:
            reasons.append(f"{self.migrations} samples changed CPU")
        if not self.sized and self.r and s["median"] * self.r < self.sample_factor * self.floor_ticks():
            # reps given (or cold: 1): a sample of a few counter steps has a CV of 0 or 100 %
            reasons.append(f"samples of {s['median'] * self.r:.0f} ticks are below {self.sample_factor}x the "
                           f"timer's floor ({self.floor_ticks():.0f} ticks): the figure is quantised")
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        # /proc/stat counts steal in whole 1/hz ticks: one tick may be any steal below 2/hz, so
        # two are needed before the steal is known to exceed the threshold
        if self.wall > 0 and self.steal >= 2 and self.steal / hz > STEAL_UNSTABLE * self.wall:
            reasons.append(f"steal time grew by {self.steal / hz * 1e3:.0f} ms during {self.wall * 1e3:.0f} ms")
        return Measurement(name=self.name, kind=self.kind, reps=self.r, n=len(per_call),
                           overhead_ticks=self.overhead, cold=self.cold, cpu=self.cpu,
                           migrations=self.migrations, preempted=len(self.dropped), steal_ticks=self.steal,
                           wall_s=self.wall, unstable=bool(reasons), reasons=reasons,
                           core_per_tsc=self.cal.core_per_tsc, samples=per_call, rounds=self.slices,
                           round_sizes=list(self.sizes), round_medians=meds,
                           round_kept=[q for q, sl in zip(keep, slices) if len(sl)],
                           faults_per_call=self.faults / self.calls if self.calls and _RUSAGE_THREAD is not None else None,
                           **extra, **s)


@contextmanager
def _quiet(pin: bool):
    """One thread per pool (SingleThreaded), pin (optionally) and disable the GC; yields the
    CPU (-1: not pinned)."""
    gc_was = gc.isenabled()
    with SingleThreaded(), (pinned() if pin else _nullpin()) as cpu:
        gc.disable()
        try:
            yield cpu
        finally:
            if gc_was:
                gc.enable()


def measure(target: Any, *args, name: str | None = None, cold: bool = False, pin: bool = True,
            warmup_s: float = 0.02, warmup_calls: int = 2, budget_s: float = 0.25,
            min_samples: int = 15, max_samples: int = 400, reps: int | None = None,
            sample_factor: int = SAMPLE_FACTOR, cal: Calibration | None = None, pmu: Any = "auto",
            **kwargs) -> Measurement:
    """Time `target(*args, **kwargs)` (a callable) or a CCall; see the module docstring."""
    _check_sampling("measure", budget_s=budget_s, warmup_s=warmup_s, warmup_calls=warmup_calls,
                    min_samples=min_samples, max_samples=max_samples, sample_factor=sample_factor, cal=cal)
    if max_samples < min_samples:
        raise ValueError(f"measure: max_samples={max_samples} is below min_samples={min_samples}")
    s = Sampler(target, args, kwargs, name=name, cold=cold, reps=reps, sample_factor=sample_factor, cal=cal,
                pmu=pmu)
    with _quiet(pin) as cpu:
        s.cpu = cpu
        s.warm(warmup_s, warmup_calls)
        s.take(budget_s, min_samples, max_samples)
    return s.result(min_samples)


def _check_sampling(who: str, *, budget_s, warmup_s, warmup_calls, min_samples, max_samples, sample_factor,
                    cal) -> None:
    """TypeError / ValueError naming the argument: a NaN or infinite budget ran until max_samples
    (400 calls of a 1 s callable), a negative one became min_samples, strings failed deep inside."""
    def real(name, v, lo_ok):
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
            raise TypeError(f"{who}: {name} must be a number of seconds, got {type(v).__name__} {v!r}")
        if not (math.isfinite(v) and (v >= 0 if lo_ok else v > 0)):
            raise ValueError(f"{who}: {name}={v!r} must be finite and {'>= 0' if lo_ok else '> 0'}")

    def integer(name, v, lo):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{who}: {name} must be an integer, got {type(v).__name__} {v!r}")
        if v < lo:
            raise ValueError(f"{who}: {name}={v} must be >= {lo}")
    real("budget_s", budget_s, False)
    real("warmup_s", warmup_s, True)
    integer("warmup_calls", warmup_calls, 0)
    integer("min_samples", min_samples, 2)
    integer("max_samples", max_samples, 2)
    integer("sample_factor", sample_factor, 1)
    if cal is not None and not isinstance(cal, Calibration):
        raise TypeError(f"{who}: cal must be a Calibration (refimpl.timing.calibrate()), got {type(cal).__name__}")


def fewest_max_samples(rounds: int, min_samples: int = 15) -> int:
    """The smallest max_samples measure_interleaved takes: ceil(min_samples / rounds) a round."""
    return rounds * max(1, math.ceil(min_samples / rounds))


def measure_interleaved(targets: list, *, rounds: int = 8, cold: bool = False, pin: bool = True,
                        warmup_s: float = 0.02, warmup_calls: int = 2, budget_s: float = 0.25,
                        min_samples: int = 15, max_samples: int = 400, rewarm: int = 3,
                        rewarm_s: float = 0.002, sample_factor: int = SAMPLE_FACTOR, cal: Calibration | None = None,
                        on_slice=None, gate: QuietProbe | None = None, gate_tol: float = GATE_TOL,
                        gate_extra_s: float = 0.0, pmu: Any = "auto") -> list[Measurement]:
    """Time several targets round-robin: `budget_s` per target, split into `rounds` slices.

    `targets` is a list of (target, args, kwargs, name).  All are warmed up first (their
    inner repetitions sized), then `interleave_order(len(targets), rounds)` is followed:
    each visit first discards >= `rewarm` samples taken for >= `rewarm_s` seconds (the
    previous target has evicted this one's data; measured here, the first two samples
    after a switch ran up to 2x slow on Python-called kernels), then keeps
    >= ceil(min_samples / rounds) samples taken for budget_s / rounds seconds.
    Each target's statistics pool the samples of all its rounds.  `on_slice(round, i)` is
    called after every visit (progress).  rounds=1 is the same as one `measure()` per target
    (warm-up and sampling back to back, no rewarm).  With `gate` (a QuietProbe; rounds > 1),
    the probe is read before the first visit and after every visit, and each target's
    statistics pool its quiet slices (module docstring, "Quiet gate").  Targets left with
    fewer than GATE_MIN_ROUNDS quiet slices get extra visits, round-robin among them, for
    at most `gate_extra_s` seconds.  `gate.readings`, `gate.level`, `gate.quiet` and
    `gate.extra_visits` describe the run afterwards.  No target keeps more than `max_samples`
    samples, extra visits included (max_samples // rounds a slice; at least
    rounds x ceil(min_samples / rounds), else ValueError).
    """
    _check_sampling("measure_interleaved", budget_s=budget_s, warmup_s=warmup_s, warmup_calls=warmup_calls,
                    min_samples=min_samples, max_samples=max_samples, sample_factor=sample_factor, cal=cal)
    for t in targets:
        if not (isinstance(t, (tuple, list)) and len(t) == 4):
            raise TypeError(f"measure_interleaved: each target must be a (target, args, kwargs, name) tuple, got {t!r}")
    cal = cal or calibrate()
    if gate is not None and rounds < 2:
        raise ValueError("measure_interleaved: the quiet gate needs rounds >= 2 (it keeps the quiet ones)")
    if rounds < 1:
        raise ValueError(f"measure_interleaved: rounds={rounds} must be >= 1")
    samplers = [Sampler(t, a, kw, name=nm, cold=cold, sample_factor=sample_factor, cal=cal, pmu=pmu)
                for t, a, kw, nm in targets]
    per_min, fewest = max(1, math.ceil(min_samples / rounds)), fewest_max_samples(rounds, min_samples)
    if max_samples < fewest:
        raise ValueError(f"measure_interleaved: max_samples={max_samples} cannot hold {per_min} sample(s) in "
                         f"each of rounds={rounds} (needs >= {fewest})")
    per_max = max_samples // rounds
    with _quiet(pin) as cpu:
        for s in samplers:
            s.cpu = cpu
        if rounds == 1:
            for i, s in enumerate(samplers):
                s.warm(warmup_s, warmup_calls)
                s.take(budget_s, min_samples, max_samples)
                if on_slice:
                    on_slice(0, i)
        else:
            for s in samplers:
                s.warm(warmup_s, warmup_calls)
            order = interleave_order(len(samplers), rounds)

            def visit(k, i):
                room = max_samples - len(samplers[i].per_call)      # max_samples holds, extra visits too
                samplers[i].take(budget_s / rounds, per_min, min(per_max, room), rewarm=0 if cold else rewarm,
                                 rewarm_s=0.0 if cold else rewarm_s)
                if gate is not None:
                    gate.read()
                if on_slice:
                    on_slice(k, i)

            if gate is not None:
                gate.readings = []
                gate.read()
            for k, i in order:
                visit(k, i)
            if gate is not None:
                gate.extra_visits = 0
                t_end = time.perf_counter() + gate_extra_s
                k = rounds
                while time.perf_counter() < t_end:
                    level = quiet_readings(gate.readings, gate_tol)[0]
                    need = [i for i, q in enumerate(_slice_busy(order, gate.readings, len(samplers), level))
                            if sum(b <= 1 + gate_tol for b in q) < GATE_MIN_ROUNDS
                            and max_samples - len(samplers[i].per_call) >= per_min]
                    if not need:
                        break
                    for i in need:
                        order.append((k, i))
                        visit(k, i)
                        gate.extra_visits += 1
                    k += 1
                gate.level, gate.quiet = quiet_readings(gate.readings, gate_tol)
                busy = _slice_busy(order, gate.readings, len(samplers), gate.level)
                return [s.result(min_samples, b, gate_tol) for s, b in zip(samplers, busy)]
    return [s.result(min_samples) for s in samplers]


def _slice_busy(order, readings, n_targets: int, level: float) -> list[list[float]]:
    """Per target, per slice: the larger of the two probe readings around it, over `level`
    (visit v of `order` lies between readings v and v + 1)."""
    out: list[list[float]] = [[] for _ in range(n_targets)]
    for v, (_, i) in enumerate(order):
        out[i].append(max(readings[v], readings[v + 1]) / level if level > 0 else 1.0)
    return out


class BufferRead:
    """`nbytes` of a cache-line-aligned buffer read once by a C streaming read (rf_bw_read)
    per call: a machine probe (bench's L3 read, the quiet gate's L1 read)."""

    def __init__(self, nbytes: int):
        from refimpl.kernels.buffers import aligned_empty
        if nbytes < 256 or nbytes % 256:
            raise ValueError(f"BufferRead: nbytes={nbytes} must be a positive multiple of 256 "
                             "(the read goes in whole 256-byte trips)")
        self.nbytes = nbytes
        self._buf = aligned_empty(nbytes, np.uint8)
        self._buf[:] = 1
        self._p = ffi.cast("void *", self._buf.ctypes.data)
        self._sink = ffi.new("uint64_t *")

    def __call__(self):
        lib.rf_bw_read(self._sink, self._p, self.nbytes, 1)


class QuietProbe:
    """The quiet gate's probe (see the module docstring): `read()` -> median ticks of
    `calls` Python-level calls of a BufferRead of `nbytes` (L1-resident), after `warm` calls.
    About 15 us here; the busy state of the host shows as a 1.6x slower reading."""

    def __init__(self, nbytes: int = 16 << 10, calls: int = 15, warm: int = 3):
        if calls < 1 or warm < 0:
            raise ValueError(f"QuietProbe: calls={calls} must be >= 1, warm={warm} >= 0")
        self.read_buffer = BufferRead(nbytes)
        self.nbytes, self.calls, self.warm = nbytes, calls, warm
        self._cpu = ffi.new("int32_t *")
        self.readings: list[float] = []     # filled by measure_interleaved: one per slice boundary
        self.level: float | None = None     # ... then the quiet level,
        self.quiet: list[bool] = []         # which readings were quiet,
        self.extra_visits = 0               # and the slices added for targets short of quiet ones

    def read(self) -> float:
        f, start, stop, cpu = self.read_buffer, lib.rf_ticks_start, lib.rf_ticks_stop, self._cpu
        for _ in range(self.warm):
            f()
        ts = []
        for _ in range(self.calls):
            t0 = start()
            f()
            ts.append(stop(cpu) - t0)
        x = float(np.median(ts))
        self.readings.append(x)
        return x


def quiet_readings(readings, tol: float = GATE_TOL, pct: float = GATE_LEVEL_PCT) -> tuple[float, list[bool]]:
    """(quiet level, [reading <= (1 + tol) x level]) with level = the pct-th percentile of readings."""
    if not readings:
        raise ValueError("quiet_readings: no probe readings")
    level = float(np.percentile(np.asarray(readings, dtype=np.float64), pct))
    return level, [x <= (1 + tol) * level for x in readings]


@contextmanager
def _nullpin():
    yield -1


# -------------------------------------------------------------- built-ins


class _Thunk:
    """A CCall-like handle for the clock's own thunks (empty kernel, add chain)."""

    def __init__(self, fn_name: str, n_adds: int | None = None):
        self.fn_addr = int(ffi.cast("uintptr_t", getattr(lib, fn_name)))
        if n_adds is None:
            self._ctx = ffi.NULL
            self.ctx_addr = 0
        else:
            self._ctx = ffi.new("uint64_t[2]", [n_adds, 0])     # {n_adds, the chain's value}
            self.ctx_addr = int(ffi.cast("uintptr_t", self._ctx))
        self.n_adds = n_adds

    def run(self):
        getattr(lib, "rf_add_chain_thunk" if self.n_adds is not None else "rf_empty_thunk")(self._ctx)


def c_thunk(lib, symbol: str, ctx=None):
    """Your own C function `void symbol(void *ctx)` in the shared library `lib`, as a CCall: the
    harness's C loop calls it `reps` times between two fenced counter reads, as it times the
    project's kernels (no Python in the timed region).  Write the thunk to call your kernel with
    its arguments; `ctx` is None (NULL) or a buffer (a NumPy array, a bytearray) whose address
    the thunk gets, e.g. sizes and pointers you packed.  (`refimpl.verify.load_c` wraps a C
    function for the verifier, with guard zones and copies around every call: not for timing.)"""
    import cffi

    from refimpl.kernels.ccall import CCall, check_c_identifier, dlopen_symbol
    f = cffi.FFI()
    f.cdef(f"void {check_c_identifier(symbol, 'c_thunk: ')}(void *);")
    handle, fn = dlopen_symbol(f, lib, symbol, "c_thunk: ")
    if ctx is None:
        cptr = f.NULL
    else:
        try:
            cptr = f.from_buffer(ctx, require_writable=False)
        except TypeError:
            raise TypeError(f"c_thunk: ctx must be None or a buffer (a NumPy array, bytearray), "
                            f"got {type(ctx).__name__}") from None
    fn_addr = int(f.cast("uintptr_t", f.addressof(handle, symbol)))
    ctx_addr = int(f.cast("uintptr_t", cptr))
    return CCall(fn_addr=fn_addr, ctx_addr=ctx_addr, run=lambda: fn(cptr), out=None, keep=[f, handle, ctx, cptr])


def empty_ccall():
    """The empty C kernel as a CCall-like handle: measures ~0 ticks after overhead subtraction."""
    return _Thunk("rf_empty_thunk")


def add_chain_ccall(n_adds: int):
    """A known-cost C kernel: n_adds dependent adds (1 core cycle each), as a CCall-like handle.

    The adds run 16 to a loop trip, so n_adds is rounded up to a multiple of 16 (`.n_adds` says
    how many run).  Each call goes on with the chain the previous one left, so calls in a timing
    loop do not overlap: a call costs its adds plus the loop's call, return and the chain value's
    trip through memory (a few cycles)."""
    if not isinstance(n_adds, (int, np.integer)) or isinstance(n_adds, bool):
        raise TypeError(f"n_adds must be an integer, got {type(n_adds).__name__} {n_adds!r}")
    if n_adds < 0:
        raise ValueError(f"n_adds={n_adds} must be >= 0")
    return _Thunk("rf_add_chain_thunk", whole_trips(n_adds))
