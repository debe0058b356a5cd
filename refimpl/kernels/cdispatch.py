"""The C library's run-time SIMD dispatch, seen from Python.

    simd_path()            -> "avx512" | "avx2" | "neon" | "portable"
    with forced_path("portable"): ...   # run every C kernel on a narrower path (tests)
    runnable_paths()       -> the names forced_path takes that this CPU runs

On aarch64 the portable C path is the only one (the compiler vectorizes it for NEON,
which every aarch64 CPU has); simd_path() calls it "neon" there.

A path the CPU cannot run is never forced: the request is clamped to the
best path available and `forced_path` yields the path actually in force.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from refimpl._kernels import ffi, lib

_PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}


def simd_path() -> str:
    return ffi.string(lib.rf_cpu_path()).decode()


_FORCE_LOCK = threading.RLock()


@contextmanager
def forced_path(name: str):
    """Run the block with the C kernels on SIMD path `name` (tests, benchmarks of one path).
    The path is process-wide, so the block holds a lock: another thread's forced_path waits for
    it to end (overlapping blocks restored each other's paths out of order and left the process
    on one of them); nested blocks in one thread are fine.  Kernels called from other threads
    meanwhile run on the forced path too."""
    if name not in _PATHS:
        raise ValueError(f"unknown SIMD path {name!r}; choose from {sorted(_PATHS)}")
    with _FORCE_LOCK:
        before = _PATHS.get(simd_path(), 0)
        lib.rf_cpu_force_path(_PATHS[name])
        try:
            yield simd_path()
        finally:
            lib.rf_cpu_force_path(before)


def runnable_paths() -> list[str]:
    """The paths this CPU runs, by the names `forced_path` takes, narrowest first.  The
    portable path counts when forcing it gives "neon" (its name on an aarch64 CPU)."""
    have = []
    for name in ("portable", "avx2", "avx512"):
        with forced_path(name) as got:
            if got == name or (name == "portable" and got == "neon"):
                have.append(name)
    return have
