"""Cache-line-aligned arrays.

NumPy aligns its data to 16 bytes, so where an array starts within a 64-byte cache
line depends on the allocation history of the process (measured: the inputs of the
same `refimpl bench` case started at offsets 0 and 48 in two runs).  A SIMD kernel
whose vectors straddle lines runs up to ~7 % slower (C softmax, (64, 1024)), so
results would differ between runs for no reason of their own.  The C wrappers
allocate their outputs here, and the benchmarks their inputs: the offset is then
always 0.

`apart_empty(shape, dtype, like)` (and `apart_zeros`) places an output half a page
(mod 4 KiB) after the input it is computed from: a load whose address matches the low
12 bits of a pending store waits for it ("4K aliasing").  Measured, 30 interleaved
rounds (10th percentile of the rounds' medians): C gelu_tanh (64, 3072) ran 205k ticks
with its output 0 or 256-4032 bytes after x, 224k at 128 bytes and 264k (+29 %) at 64;
where NumPy's allocator put the output changed from process to process, and so did the
kernel's speed.  The Numba GEMV, which adds each row of B into the output block, ran
423-436k ticks (median of 25 rounds' medians) with the output 1-3 KiB after B and
495-534k at 0-256 bytes.  The C matmul, the C and Numba elementwise and row wrappers and
the C attention allocate their outputs this way; the Numba matmul and attention, the naive
reference kernels, the sampler's scratch and the C decode step's [1, V] logits (a plain
np.empty: 2 us a token saved) do not.

The inputs' places matter as much.  Measured, C layer_norm (64, 768) (median of
harness medians) ran 20.0-21.0k ticks or 22.7-25.5k depending on where w and b sat
(mod 4 KiB) relative to x, and C rms_norm 13.7-14.1k or 15.9-17.3k depending on w: so
six `refimpl bench` runs of the same build gave rms_norm 13.7-14.9k and layer_norm
20.2-22.4k, each with CV under 1.6 %.  `spread_copies` lays a case's inputs out the
same way in every process (the benchmarks use it): the first on a page, the others
spread over the half page before the outputs' place.
"""
from __future__ import annotations

import math

import cffi
import numpy as np

LINE = 64   # bytes: an x86-64 / Zen 4 cache line, and one AVX-512 vector
_ffi = cffi.FFI()


def address(a: np.ndarray) -> int:
    """Address of `a`'s first byte: through cffi (~0.4 us) where `a` is a contiguous buffer,
    else NumPy's array interface (~1 us, as is `.ctypes.data`)."""
    if a.flags.c_contiguous and a.size:
        return int(_ffi.cast("uintptr_t", _ffi.from_buffer(a)))
    return a.__array_interface__["data"][0]


def _carve(shape, dtype, slack: int, offset) -> np.ndarray:
    """A C-contiguous `shape` array cut from a byte buffer `slack` bytes longer, starting
    `offset(address of the buffer)` bytes into it.  Most C and Numba wrappers' outputs come
    from here (see the module docstring), so it is kept cheap (~2 us, a quarter of it the buffer's address through cffi;
    np.prod, `.ctypes` and a shape check by `min` each cost more than the rest together)."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if type(shape) is not tuple:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:   # NumPy checks the dimensions (negative ones, non-integers) in np.empty or np.ndarray
        raw = np.empty(math.prod(shape) * dtype.itemsize + slack, np.uint8)
        off = offset(address(raw))
        return np.ndarray(shape, dtype, raw, off)
    except (TypeError, ValueError):
        ints = all(isinstance(d, (int, np.integer)) for d in shape)
        raise (ValueError if ints else TypeError)(
            f"array shape {shape} (dtype {dtype}): dimensions must be non-negative integers") from None


def aligned_empty(shape, dtype=np.float32, align: int = LINE) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary
    (an empty array has no data: its pointer is NumPy's)."""
    return _carve(shape, dtype, align, lambda addr: (-addr) % align)


def aligned_copy(a, align: int = LINE) -> np.ndarray:
    """A C-contiguous copy of `a` (same dtype) starting on an `align`-byte boundary."""
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype, align)
    out[...] = a
    return out


PAGE = 4096   # bytes: the span of the address bits a load is first matched on against pending stores


def apart_empty(shape, dtype, like: np.ndarray, apart: int = PAGE // 2) -> np.ndarray:
    """An uninitialised C-contiguous array on a cache line, starting `apart` bytes (mod PAGE)
    after `like`'s data: an output away from the 4K aliases of the input it is computed from."""
    if apart % LINE:
        raise ValueError(f"apart_empty: apart={apart} must be a multiple of {LINE}")

    def offset(addr):
        off = (address(like) % PAGE + apart - addr) % PAGE
        return off + (-(addr + off)) % LINE              # `like` itself may sit off a line
    return _carve(shape, dtype, PAGE + LINE, offset)


def apart_zeros(shape, dtype, like: np.ndarray, apart: int = PAGE // 2) -> np.ndarray:
    """`apart_empty`, zeroed (e.g. a GEMV's output, accumulated into)."""
    out = apart_empty(shape, dtype, like, apart)
    out[...] = 0
    return out


def spread_copies(arrays, span: int = PAGE // 2) -> list[np.ndarray]:
    """C-contiguous copies of `arrays`, laid out the same way in every process: of n
    arrays, the i-th starts i*span/n bytes past a page boundary (rounded down to a cache
    line).  The first starts on a page, and the outputs `apart_empty` places half a page
    after it find no input at their offset."""
    if span % LINE or not 0 < span <= PAGE:
        raise ValueError(f"spread_copies: span={span} must be a multiple of {LINE} in (0, {PAGE}]")
    arrays = [np.asarray(a) for a in arrays]
    out = []
    for i, a in enumerate(arrays):
        at = i * span // len(arrays) // LINE * LINE
        c = _carve(a.shape, a.dtype, PAGE, lambda addr: (at - addr) % PAGE)
        c[...] = a
        out.append(c)
    return out
