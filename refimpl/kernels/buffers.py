"""Cache-line-aligned arrays.

NumPy aligns its data to 16 bytes, so where an array starts within a 64-byte cache
line depends on the allocation history of the process (measured: the inputs of the
same `refimpl bench` case started at offsets 0 and 48 in two runs).  A SIMD kernel
whose vectors straddle lines runs up to ~7 % slower (C softmax, (64, 1024)), so
results would differ between runs for no reason of their own.  The C wrappers
allocate their outputs here, and the benchmarks their inputs: the offset is then
always 0.

`apart_zeros(shape, dtype, like)` places an output half a page (mod 4 KiB) away from
an input it is updated against: a load whose address matches the low 12 bits of a
pending store waits for it ("4K aliasing"), and the Numba GEMV, which adds each row of
B into the output block, measured 1.3-1.9x slower when the output started 0-64 bytes
(mod 4 KiB) from B than at 2 KiB.
"""
from __future__ import annotations

import numpy as np

LINE = 64   # bytes: an x86-64 / Zen 4 cache line, and one AVX-512 vector


def aligned_empty(shape, dtype=np.float32, align: int = LINE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary
    (an empty array has no data: its pointer is NumPy's)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(a, align: int = LINE) -> np.ndarray:
    """A C-contiguous copy of `a` (same dtype) starting on an `align`-byte boundary."""
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


PAGE = 4096   # bytes: the span of the address bits a load is first matched on against pending stores


def apart_zeros(shape, dtype, like: np.ndarray, apart: int = PAGE // 2) -> np.ndarray:
    """A zeroed C-contiguous array on a cache line, starting `apart` bytes (mod PAGE) after
    `like`'s data: e.g. a GEMV's output, away from the 4K aliases of the matrix rows."""
    if apart % LINE:
        raise ValueError(f"apart_zeros: apart={apart} must be a multiple of {LINE}")
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + PAGE + LINE, np.uint8)
    off = (like.ctypes.data % PAGE + apart - raw.ctypes.data) % PAGE
    off += (-(raw.ctypes.data + off)) % LINE         # `like` itself may sit off a line
    return raw[off:off + nbytes].view(dtype).reshape(shape)
