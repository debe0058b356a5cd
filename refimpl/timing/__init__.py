"""Cycle counting and benchmarking: the fenced TSC counter, the harness, the machine model.

    cycles()              one fenced counter read (ticks)
    calibrate()           tsc_hz, overhead_ticks, granularity_ticks, core_per_tsc, perf availability
    measure(target, ...)  min / median / MAD / p90 / CV of a CCall or a callable, in ticks per call
    c_thunk(lib, sym)     your own `void sym(void *ctx)` in a .so, timed from the C loop
    machine.describe()    CPU, flags, peak FLOP per cycle, caches, bandwidths
    metrics.work(op, ..)  FLOPs and bytes per op; metrics.roofline(...)
    bench.run(...)        `refimpl bench`;  profile.run(...)  `refimpl profile`

Names are imported lazily, so `refimpl.timing.cli` (and `refimpl --help`)
load without touching the native clock module.
"""
import importlib

_EXPORTS = {
    "cycles": "refimpl.timing.counter", "calibrate": "refimpl.timing.counter",
    "Calibration": "refimpl.timing.counter",
    "measure": "refimpl.timing.harness", "Measurement": "refimpl.timing.harness",
    "measure_interleaved": "refimpl.timing.harness",
    "empty_ccall": "refimpl.timing.harness", "add_chain_ccall": "refimpl.timing.harness",
    "c_thunk": "refimpl.timing.harness",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'refimpl.timing' has no attribute {name!r}")
