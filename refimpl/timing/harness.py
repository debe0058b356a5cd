"""The benchmark harness: `measure(target, ...) -> Measurement`.

`target` is either a prepared C call (`refimpl.kernels.ccall.CCall`), timed by
a loop in C (`rf_time_thunk`: `reps` calls of `fn(ctx)` between two fenced
counter reads, no Python inside the region), or any Python callable (NumPy,
Numba, torch), timed from Python with the same counter around a loop of
`reps` calls.

Recipe (design.md "Timing on bare CPUs"):
  1. pin the thread to one CPU (restored afterwards);
  2. warm up: call until `warmup_s` has passed (>= `warmup_calls` calls).
     Numba compiles on its first call: that call is part of the warm-up and
     never of a sample;
  3. size the inner repetitions so one sample lasts >= 1000 x
     max(overhead, granularity) ticks (cold mode: 1 call per sample);
  4. take samples until `budget_s` has passed (>= `min_samples`,
     <= `max_samples`); cold mode touches a buffer larger than L3 before
     each sample, outside the timed region;
  4b. a sample during which the thread was preempted (its involuntary
     context-switch count, getrusage(RUSAGE_THREAD), grew) measured another
     process too: it is dropped and counted in `preempted`; sampling goes on
     until `min_samples` clean samples exist (or 4 x the budget has passed,
     then the preempted ones are kept and the run is flagged);
  5. per-call ticks of a sample = (sample ticks - region overhead) / reps,
     where the region overhead is the calibrated empty-region minimum (C
     loop) or the empty-loop minimum measured from Python (Python targets);
  6. statistics: min, median, MAD, p90, mean, n, CV.  `cv` is the robust
     coefficient of variation 1.4826 MAD / median (equal to std / mean for
     normal noise): one timer interrupt or preemption inside one sample makes
     the classical std / mean meaningless, so that one is kept as `cv_raw`
     (reported, not used for flags).  The run is `unstable` when cv >= 5 %, the CPU changed (TSC_AUX) or the
     hypervisor's steal time for the pinned CPU grew by more than 1 % of the
     run's wall time (/proc/stat).

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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from refimpl._clock import ffi, lib
from refimpl.timing.counter import Calibration, calibrate, current_cpu

CV_UNSTABLE = 0.05
STEAL_UNSTABLE = 0.01
SAMPLE_FACTOR = 1000


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
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def steal_of(cpu: int) -> int:
    """Steal time (USER_HZ ticks) of `cpu` (or of all CPUs when cpu < 0) from /proc/stat; 0 if unknown."""
    key = f"cpu{cpu}" if cpu >= 0 else "cpu"
    try:
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] == key:
                    return int(parts[8]) if len(parts) > 8 else 0
    except OSError:
        pass
    return 0


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


def _switches() -> int:
    """Involuntary context switches of this thread so far (-1 if unknown)."""
    if _RUSAGE_THREAD is None:
        return -1
    return resource.getrusage(_RUSAGE_THREAD).ru_nivcsw

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


def measure(target: Any, *args, name: str | None = None, cold: bool = False, pin: bool = True,
            warmup_s: float = 0.02, warmup_calls: int = 2, budget_s: float = 0.25,
            min_samples: int = 15, max_samples: int = 400, reps: int | None = None,
            sample_factor: int = SAMPLE_FACTOR, cal: Calibration | None = None,
            **kwargs) -> Measurement:
    """Time `target(*args, **kwargs)` (a callable) or a CCall; see the module docstring."""
    cal = cal or calibrate()
    is_c = _is_ccall(target)
    if not is_c and not callable(target):
        raise TypeError(f"measure: target must be a CCall or a callable, got {type(target).__name__}")
    if min_samples < 2:
        raise ValueError(f"measure: min_samples={min_samples} must be >= 2")
    if reps is not None and reps < 1:
        raise ValueError(f"measure: reps={reps} must be >= 1")
    if name is None:
        name = getattr(target, "__qualname__", None) or type(target).__name__

    if is_c:
        fn = ffi.cast("void(*)(void*)", target.fn_addr)
        ctx = ffi.cast("void*", target.ctx_addr)
        c0p, c1p = ffi.new("int32_t *"), ffi.new("int32_t *")

        def region(r):
            t = lib.rf_time_thunk(fn, ctx, r, c0p, c1p)
            return int(t), c0p[0], c1p[0]
        overhead = float(cal.overhead_ticks)
        kind = "c-loop"
    else:
        def region(r):
            return _py_region(target, args, kwargs, r)
        overhead = python_overhead_ticks()
        kind = "python"

    ctx_pin = pinned() if pin else _nullpin()
    gc_was = gc.isenabled()
    with ctx_pin as cpu:
        gc.disable()
        try:
            # warm-up (includes any JIT compilation), and a first estimate of one call
            one = math.inf
            t_end = time.perf_counter() + warmup_s
            k = 0
            while k < warmup_calls or (time.perf_counter() < t_end and k < 10000):
                one = min(one, region(1)[0] - overhead)
                k += 1
            one = max(one, 1.0)
            floor = sample_factor * cal.floor_ticks
            if cold:
                r = 1
            elif reps is not None:
                r = reps
            else:
                r = max(1, math.ceil(floor / one))
            steal0 = steal_of(cpu)
            w0 = time.perf_counter()
            deadline = w0 + budget_s
            per_call, dropped, migr = [], [], 0
            while True:
                if cold:
                    flush_caches()
                sw0 = _switches()
                t, ca, cb = region(r)
                sw1 = _switches()
                if cpu >= 0 and (ca != cpu or cb != cpu) and ca >= 0:
                    migr += 1
                elif cpu < 0 and ca != cb:
                    migr += 1
                x = (t - overhead) / r
                (dropped if sw1 != sw0 else per_call).append(x)
                n, now = len(per_call), time.perf_counter()
                if n >= max_samples or (n >= min_samples and now >= deadline):
                    break
                if now >= w0 + 4 * budget_s and n + len(dropped) >= min_samples:
                    break
            wall = time.perf_counter() - w0
            steal = steal_of(cpu) - steal0
        finally:
            if gc_was:
                gc.enable()
    reasons = []
    if len(per_call) < min_samples:
        reasons.append(f"{len(dropped)} of {len(per_call) + len(dropped)} samples preempted (kept)")
        per_call = per_call + dropped
    s = stats(per_call)
    if s["cv"] >= CV_UNSTABLE:
        reasons.append(f"CV {s['cv']:.1%} >= {CV_UNSTABLE:.0%}")
    if migr:
        reasons.append(f"{migr} samples changed CPU")
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    if wall > 0 and steal / hz > STEAL_UNSTABLE * wall:
        reasons.append(f"steal time grew by {steal / hz * 1e3:.0f} ms during {wall * 1e3:.0f} ms")
    return Measurement(name=name, kind=kind, reps=r, n=len(per_call), overhead_ticks=overhead, cold=cold,
                       cpu=cpu, migrations=migr, preempted=len(dropped), steal_ticks=steal, wall_s=wall,
                       unstable=bool(reasons), reasons=reasons, core_per_tsc=cal.core_per_tsc,
                       samples=per_call, **s)


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
            self._ctx = ffi.new("uint64_t *", n_adds)
            self.ctx_addr = int(ffi.cast("uintptr_t", self._ctx))
        self.n_adds = n_adds

    def run(self):
        getattr(lib, "rf_add_chain_thunk" if self.n_adds is not None else "rf_empty_thunk")(self._ctx)


def empty_ccall():
    """The empty C kernel as a CCall-like handle: measures ~0 ticks after overhead subtraction."""
    return _Thunk("rf_empty_thunk")


def add_chain_ccall(n_adds: int):
    """A known-cost C kernel: n_adds dependent adds (1 core cycle each), as a CCall-like handle."""
    if n_adds < 0:
        raise ValueError(f"n_adds={n_adds} must be >= 0")
    return _Thunk("rf_add_chain_thunk", n_adds)
