"""The "c" backend's matmul: C = A @ B in C (csrc/kernels/matmul*.c), via cffi.

    matmul(a, b, stream=False) -> new C-contiguous (M,N) array   (registered as ("matmul", "c"))
                            stream=True: b is read from DRAM once per call (a model's weights in
                            decode); the small-M path then prefetches b's next rows ahead (float32)
    matmul_into(out, a, b)  -> out, written in place (decode loops reuse one output)
    prepare(a, b)           -> CCall: the checked call packed for a timing loop in C
    matmul_ref(a, b)        -> the naive C triple loop (float32 only), for tests
    blocking()              -> {"path", "MR", "NR", "KC", "MC", "NC", "SMALL_M"} of the float32 path in force

M = rows of a, K = inner size, N = columns of b.  float32 runs the packed
Goto/BLIS GEMM (an unpacked kernel streaming b when M <= SMALL_M, which
covers the decode GEMV M = 1) on the SIMD path chosen by cpuid
(`refimpl.kernels.cdispatch.forced_path` narrows it); float64 runs plain
cache-blocked loops.  Every C call is preceded by the checks of
`contracts.check_matmul_args` (dtype -> TypeError, rank/shape -> ValueError,
non-contiguous / misaligned inputs copied), and by these: non-native byte order
is converted, the output is C-contiguous, writeable, of the inputs' dtype and
overlaps neither input.  Accuracy: |C^ - C| <= contracts.matmul_bound.
"""
from __future__ import annotations

import numpy as np

from refimpl._kernels import ffi, lib
from refimpl.kernels.buffers import apart_empty
from refimpl.kernels.ccall import CCall
from refimpl.kernels.contracts import check_flag, check_matmul_args
from refimpl.kernels.registry import register

_INT64_MAX = 2**63 - 1
# dtype -> (C array type, kernel, thunk name, argument struct)
_C = {
    np.dtype(np.float32): ("float[]", lib.rf_matmul_f32, "rf_matmul_f32_thunk", "rf_matmul_f32_args *"),
    np.dtype(np.float64): ("double[]", lib.rf_matmul_f64, "rf_matmul_f64_thunk", "rf_matmul_f64_args *"),
}


def _ready(x) -> bool:
    """x already meets every input rule: a 2-D, C-contiguous, aligned ndarray of a C dtype."""
    return (type(x) is np.ndarray and x.ndim == 2 and x.dtype in _C
            and x.flags.c_contiguous and x.flags.aligned)


def _checked(a, b):
    """Validated, C-contiguous, native a (M,K) and b (K,N) and their sizes."""
    # fast path (a decode step calls this per layer): the same rules as check_matmul_args
    if not (_ready(a) and _ready(b) and a.dtype == b.dtype and a.shape[1] == b.shape[0]):
        a, b = check_matmul_args(a, b)     # copies byte-swapped, misaligned, non-contiguous inputs
    M, K = a.shape
    N = b.shape[1]
    if M * N > _INT64_MAX:   # M*K and K*N are sizes of arrays that exist
        raise ValueError(f"matmul: the output would hold M*N = {M} * {N} elements, over the int64 limit")
    return a, b, M, K, N


def _check_out(out, a, b, M, N) -> np.ndarray:
    """out must be a writeable C-contiguous (M,N) array of a's dtype sharing no memory with a or b."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"argument 'out' must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != a.dtype:
        raise TypeError(f"argument 'out' has dtype {out.dtype}, expected {a.dtype} (the dtype of 'a' and 'b')")
    if out.shape != (M, N):
        raise ValueError(f"argument 'out' has shape {out.shape}, expected {(M, N)} for a {a.shape} @ b {b.shape}")
    if not (out.flags.c_contiguous and out.flags.aligned):
        raise ValueError("argument 'out' must be C-contiguous and aligned (it is written in place)")
    if not out.flags.writeable:
        raise ValueError("argument 'out' is read-only")
    for name, x in (("a", a), ("b", b)):
        if np.may_share_memory(out, x):
            raise ValueError(f"argument 'out' overlaps input {name!r}: the output must not alias an input")
    return out


def _run(out, a, b, M, K, N, stream=False) -> np.ndarray:
    atype, fn, _, _ = _C[a.dtype]
    if stream and a.dtype == np.float32:
        fn = lib.rf_matmul_f32_stream
    if M and N:
        buf = ffi.from_buffer
        fn(buf(atype, out), buf(atype, a), buf(atype, b), M, K, N)
    return out


@register("matmul", "c")
def matmul(a, b, stream=False):  # [M,K] @ [K,N] -> [M,N]
    """C = a @ b as a new C-contiguous array (float32 fast path, float64 correct path).

    stream=True says b comes from DRAM (decode: weights larger than the caches together): the
    GEMV then prefetches ahead, faster from DRAM, ~15% slower when b already sits in L3.
    """
    stream = check_flag("stream", stream)
    a, b, M, K, N = _checked(a, b)
    return _run(apart_empty((M, N), a.dtype, like=b), a, b, M, K, N, stream)


def matmul_into(out, a, b):  # [M,N] <- [M,K] @ [K,N]
    """Write a @ b into the preallocated `out` (M,N) and return it."""
    a, b, M, K, N = _checked(a, b)
    out = _check_out(out, a, b, M, N)
    return _run(out, a, b, M, K, N)


def prepare(a, b, out=None) -> CCall:
    """Check and pack the call once; `fn_addr(ctx_addr)` computes out = a @ b from C."""
    a, b, M, K, N = _checked(a, b)
    out = apart_empty((M, N), a.dtype, like=b) if out is None else _check_out(out, a, b, M, N)
    atype, _, thunk, struct = _C[a.dtype]
    bufs = [ffi.from_buffer(atype, x) for x in (out, a, b)]
    args = ffi.new(struct)
    args.c, args.a, args.b = bufs
    args.M, args.K, args.N = M, K, N
    fn = getattr(lib, thunk)
    fn_addr = int(ffi.cast("uintptr_t", ffi.addressof(lib, thunk)))
    ctx_addr = int(ffi.cast("uintptr_t", args))

    def run(_keep=(bufs, a, b)):  # keeps the buffers `args` points into alive while `run` lives
        fn(args)
        return out

    return CCall(fn_addr=fn_addr, ctx_addr=ctx_addr, run=run, out=out, keep=[args, bufs, out, a, b])


def matmul_ref(a, b):  # [M,K] @ [K,N] -> [M,N], float32
    """The naive C triple loop rf_matmul_f32_ref (reference and fallback), float32 only."""
    a, b, M, K, N = _checked(a, b)
    if a.dtype != np.float32:
        raise TypeError(f"matmul_ref: argument 'a' has dtype {a.dtype}, expected float32")
    out = np.zeros((M, N), dtype=np.float32)
    if M and N:
        buf = ffi.from_buffer
        lib.rf_matmul_f32_ref(buf("float[]", out), buf("float[]", a), buf("float[]", b), M, K, N)
    return out


def blocking() -> dict:
    """Register tile and cache blocks of the float32 path in force (see csrc/kernels/_matmul.h)."""
    v = ffi.new("int64_t[6]")
    name = ffi.string(lib.rf_matmul_f32_blocking(v)).decode()
    return {"path": name, **dict(zip(("MR", "NR", "KC", "MC", "NC", "SMALL_M"), (int(x) for x in v)))}


# the timing entry and the in-place variant, reachable from the registered function too
matmul.prepare = prepare
matmul.into = matmul_into
