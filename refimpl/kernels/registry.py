"""Kernel registry: one contract per op, several backends.

    get(op, backend)  -> callable with the op's contract (see contracts.py)
    available()       -> {op: [backends that implement it]}
    info()            -> which SIMD path the C library chose at load time, etc.

Backends register themselves with @register(op, backend) when their module is
imported; modules are imported lazily on first use so `import refimpl` stays
cheap (Numba compiles nothing until asked).
"""
from __future__ import annotations

import importlib
from typing import Callable

OPS = ("matmul", "softmax", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu", "rope")
BACKENDS = ("numpy", "numba", "c")
_MODULES = {
    "numpy": ("refimpl.kernels.numpy_kernels",),
    "numba": ("refimpl.kernels.numba_kernels",),
    "c": ("refimpl.kernels.c_matmul", "refimpl.kernels.c_ops"),
}
_REGISTRY: dict[tuple[str, str], Callable] = {}
_LOAD_ERRORS: dict[str, str] = {}


def register(op: str, backend: str):
    """Decorator: make `fn` the implementation of `op` for `backend`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS}")

    def deco(fn):
        _REGISTRY[(op, backend)] = fn
        return fn
    return deco


def _load(backend: str) -> None:
    if backend in _LOAD_ERRORS:
        return
    errors = []
    for mod in _MODULES[backend]:
        try:
            importlib.import_module(mod)
        except ImportError as e:  # a module that is missing leaves its ops unavailable
            errors.append(f"{mod}: {e}")
    _LOAD_ERRORS[backend] = "; ".join(errors)


def get(op: str, backend: str = "numpy") -> Callable:
    """The `backend` implementation of `op`; KeyError naming what exists otherwise."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if backend not in BACKENDS:
        raise KeyError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")
    _load(backend)
    try:
        return _REGISTRY[(op, backend)]
    except KeyError:
        why = _LOAD_ERRORS.get(backend) or "not implemented"
        have = [b for b in BACKENDS if (op, b) in _REGISTRY]
        raise KeyError(f"op {op!r} has no {backend!r} backend ({why}); available: {have}") from None


def available() -> dict[str, list[str]]:
    """{op: [backends]} for every op, after trying to load every backend."""
    for b in BACKENDS:
        _load(b)
    return {op: [b for b in BACKENDS if (op, b) in _REGISTRY] for op in OPS}


def info() -> dict:
    """What the native library chose at load time, and why a backend is missing."""
    out = {"load_errors": {b: e for b, e in _LOAD_ERRORS.items() if e}}
    try:
        from refimpl._kernels import ffi, lib
        out["c_simd_path"] = ffi.string(lib.rf_cpu_path()).decode()
        out["c_cpu_features"] = int(lib.rf_cpu_features())
    except ImportError as e:
        out["c_simd_path"] = None
        out["c_error"] = str(e)
    return out
