"""The C library's run-time SIMD dispatch, seen from Python.

    simd_path()            -> "avx512" | "avx2" | "neon" | "portable"
    with forced_path("portable"): ...   # run every C kernel on a narrower path (tests)

A path the CPU cannot run is never forced: the request is clamped to the
best path available and `forced_path` yields the path actually in force.
"""
from __future__ import annotations

from contextlib import contextmanager

from refimpl._kernels import ffi, lib

_PATHS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}


def simd_path() -> str:
    return ffi.string(lib.rf_cpu_path()).decode()


@contextmanager
def forced_path(name: str):
    if name not in _PATHS:
        raise ValueError(f"unknown SIMD path {name!r}; choose from {sorted(_PATHS)}")
    before = _PATHS.get(simd_path(), 0)
    lib.rf_cpu_force_path(_PATHS[name])
    try:
        yield simd_path()
    finally:
        lib.rf_cpu_force_path(before)
