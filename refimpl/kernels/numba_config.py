"""Numba compiler flags and block sizes: the one place they live (stumpy `config.py` style).

Fastmath
--------
`fastmath=True` turns on every LLVM fast-math flag, among them `nnan` and
`ninf` ("assume no NaN / no inf").  With those, LLVM may delete `x != x`
tests, fold `x - x` to 0 and `max` to a NaN-dropping min/max instruction,
which silently breaks the contract the tests check: NaN propagates, -inf is a
masked logit with probability exactly 0, +inf overflows stay inf.  So each
kernel family gets the smallest subset it needs:

* ``contract`` -- fuse a*b + c into one FMA.  Only removes a rounding, so every
  error bound in contracts.py (Higham's gamma_n analysis) still holds.
* ``reassoc`` -- let LLVM reorder a sum or a max so the loop vectorizer can
  keep several partial accumulators.  The matmul / softmax bounds hold for any
  summation order; it has no effect on NaN/inf handling.  Not given to the
  elementwise formulas (gelu, silu), where reassociation could turn
  x + c x^3 into x (1 + c x^2) and change where float32 overflows.

Never used: ``nnan``, ``ninf`` (NaN/inf semantics), ``afn`` (approximate
libm calls: exp/tanh accuracy is part of the bound), ``arcp`` (x / y ->
x * (1/y), one more rounding than the bounds assume), ``nsz``.

SLP vectorizer
--------------
Numba switches LLVM's SLP (straight-line) vectorizer off by default
(`NUMBA_SLP_VECTORIZE=0`).  The GEMM micro-kernel keeps its MR x NR tile of C in
named scalar locals (LLVM cannot keep a heap-allocated tile in registers), and
only the SLP vectorizer turns those scalars into SIMD registers: with it off
the micro-kernel runs scalar (about 7 GFLOP/s instead of 85 at N=512).
`numba_config.call()` turns it on just while our kernels compile; the
global Numba setting is restored afterwards.

`cache=True` everywhere: the first call compiles (seconds) and writes the
machine code to disk; later processes load it.  Not to Numba's default, the
__pycache__ beside the source: in an installed (not editable) copy that is
site-packages/refimpl/kernels/__pycache__, which `pip uninstall` leaves behind
(it removes only the files it installed), and the `refimpl/` directory it keeps
alive is then imported as a namespace package that shadows a later editable
install.  Our kernels' entries go under `cache_dir()` instead (the user's cache
directory, else a private temporary one); a NUMBA_CACHE_DIR the user set is respected.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading

import numba
from numba import njit

# --------------------------------------------------------------------------
# fastmath subsets (see the module docstring for why)
# --------------------------------------------------------------------------
FASTMATH_GEMM = frozenset({"contract"})                   # register-tile GEMM, attention tiles
FASTMATH_REDUCE = frozenset({"contract", "reassoc"})      # row sums / maxima (softmax, norms)
FASTMATH_ELEMENTWISE = frozenset({"contract"})            # gelu, silu, rope, exp polynomial
# float "/" under Numba's default error_model="python" checks every divisor for zero and raises,
# a branch out of the loop that stops LLVM vectorising it; "numpy" (IEEE: x/0 = inf) for kernels
# whose divisors cannot be 0 (the logistic's 1 + e >= 1)
ERROR_MODEL_ELEMENTWISE = "numpy"
# the norms' 1 / sqrt(var + eps) is 1 / 0 for a constant row at eps = 0: IEEE inf (the row becomes
# 0 * inf = NaN, as in the oracle), not the "python" model's ZeroDivisionError
ERROR_MODEL_NORMS = "numpy"
CACHE = True

# --------------------------------------------------------------------------
# block sizes (BLIS style: one table)
# --------------------------------------------------------------------------
# GEMM: micro-tile MR x NR of C in registers (6 x 16 float32 = 6 zmm with AVX-512,
# 12 ymm with AVX2); KC x NR panels of B (L1), MC x KC block of A (L2), NC columns of B.
GEMM_MR = 6
GEMM_NR = 16
GEMM_KC = 256
GEMM_MC = 96
GEMM_NC = 2048
# GEMM with fewer than GEMM_MR rows (decode): no packing, GEMV_NB columns of C per pass (L1).
GEMV_NB = 4096

# Attention: BQ query rows x BK keys per tile.  BQ is a multiple of GEMM_NR and of
# GEMM_MR (full micro-tiles); BK a multiple of GEMM_MR.
ATTN_BQ = 96
ATTN_BK = 48


# Numba's on-disk cache is invalidated only when the kernel's own source file
# changes, not when a value here does.  So every kernel's cache entry is named
# with a fingerprint of this table: edit a block size or a fastmath set and the
# kernels recompile instead of silently loading code built with the old values.
FINGERPRINT = hashlib.sha1(repr((
    sorted(FASTMATH_GEMM), sorted(FASTMATH_REDUCE), sorted(FASTMATH_ELEMENTWISE), ERROR_MODEL_ELEMENTWISE,
    ERROR_MODEL_NORMS, GEMM_MR, GEMM_NR, GEMM_KC, GEMM_MC, GEMM_NC, GEMV_NB, ATTN_BQ, ATTN_BK)).encode()).hexdigest()[:10]


@functools.cache
def cache_dir() -> str:
    """Where our kernels' compiled code is kept: $XDG_CACHE_HOME/refimpl/numba (default
    ~/.cache/refimpl/numba), or NUMBA_CACHE_DIR when the user set one.  When that directory
    cannot be made or written (Numba would fall back to the source's __pycache__), a private
    temporary directory of this process (mode 0700: not one another user could have made
    first and filled with code for us to load), so the kernels compile again per process.
    Decided once per process (every kernel's decoration asks)."""
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "refimpl", "numba")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="refimpl-numba-")


def kernel(fastmath, **kw):
    """@kernel(FASTMATH_...) -- the one njit decorator every private kernel uses."""
    def deco(fn):
        fn.__qualname__ = f"{fn.__qualname__}__cfg{FINGERPRINT}"   # the cache entry's name (see above)
        # Numba picks the cache's place when it decorates: point it at cache_dir() just for
        # that (the global setting, which other Numba code reads, is restored)
        old = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = cache_dir()
        try:
            return njit(cache=CACHE, fastmath=set(fastmath), nogil=True, **kw)(fn)
        finally:
            numba.config.CACHE_DIR = old
    return deco


_lock = threading.Lock()
_compiled: set = set()


def call(fn, key, *args):
    """fn(*args), with the SLP vectorizer on if this (fn, key) may compile now.

    `key` names the specialisation (the wrappers pass the dtype: they hand the
    kernels C-contiguous arrays of one dtype, so the dtype fixes the signature).
    The first call per key compiles (or loads from the disk cache) with
    numba.config.SLP_VECTORIZE = 1 and restores the global value afterwards;
    later calls go straight to the compiled code.
    """
    k = (fn, key)
    if k in _compiled:
        return fn(*args)
    with _lock:
        old = numba.config.SLP_VECTORIZE
        numba.config.SLP_VECTORIZE = 1
        try:
            out = fn(*args)
        finally:
            numba.config.SLP_VECTORIZE = old
        _compiled.add(k)
    return out
