"""The "numba" backend: tiled Numba kernels with the oracle's contract.

Dimension letters (this module only):
    M, K, N  matmul: A [M,K] @ B [K,N] -> C [M,N]
    R, N     rows and row length of a row-wise op (softmax, norms)
    H, Hkv   query / key-value heads; G = H // Hkv query heads per kv head
    Lq, Lk   query / key positions;  D = head width;  T = positions (rope)

Layout (stumpy style): each public function validates its arguments with the
contracts.py checks (TypeError / ValueError naming the argument), allocates
the output and calls a private `@njit` kernel through `numba_config.call`.
Nothing compiles at import: each kernel compiles on its first call per dtype
(`cache=True` keeps the machine code on disk for the next process).  Compiler
flags and block sizes live in numba_config.py.  No kernel calls BLAS (no
`np.dot` / `@` inside a jitted function).

float32 and float64 inputs are both accepted; the result has the input dtype.
"""
from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic, overload

from refimpl.kernels import numba_config as cfg
from refimpl.kernels.buffers import aligned_empty, apart_empty, apart_zeros
from refimpl.kernels.contracts import (check_array, check_attention_args, check_finite, check_flag, check_matmul_args,
                                      check_norm_args, check_rope_args, check_rows_args)
from refimpl.kernels.registry import register

MR, NR = cfg.GEMM_MR, cfg.GEMM_NR
KC, MC, NC = cfg.GEMM_KC, cfg.GEMM_MC, cfg.GEMM_NC
BQ, BK = cfg.ATTN_BQ, cfg.ATTN_BK
GEMV_NB = cfg.GEMV_NB

# ==========================================================================
# exp(x) for x <= 0, vectorisable
# ==========================================================================
# Without Intel SVML (not installed here) LLVM cannot vectorise a loop that
# calls expf.  For float32 we evaluate exp ourselves with operations LLVM does
# vectorise: Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, the Cephes
# expf degree-6 polynomial for exp(r), and 2^k built from its exponent bits.
# Max error on a dense sweep of [-87.34, 0]: 1.0 ulp (mean 0.27 ulp) against
# float64 exp; tests/test_kernels_numba.py::test_exp_nonpos_ulp holds it to
# the bounds' budget contracts.EXP_ULPS = 4 ulp.
# Inputs below -87.3365 (where exp(x) leaves the normal range) give exactly 0:
# the bounds allow 2 * tiny absolute for flushed underflow.  -inf -> 0, NaN -> NaN.
# float64 uses libm exp (scalar).


# the float32 exps' constants: Cody-Waite ln2 = _LN2_HI + _LN2_LO (_LN2_HI exact in
# 9 bits, so k * _LN2_HI is exact) and the Cephes expf polynomial for e^r, |r| <= ln2/2
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
             np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@intrinsic
def _f32_from_bits(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion)."""
    if not isinstance(i, types.Integer):
        return None
    sig = types.float32(i)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, llvm_ir.IntType(32))
        return builder.bitcast(v, llvm_ir.FloatType())
    return sig, codegen


def _exp_nonpos(x):  # pragma: no cover - replaced by the overload inside jitted code
    """exp(x) for x <= 0 (or NaN); only callable from jitted code."""
    raise NotImplementedError


@overload(_exp_nonpos, jit_options={"fastmath": set(cfg.FASTMATH_ELEMENTWISE)})
def _exp_nonpos_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        lo = np.float32(-87.33654)           # log(2^-126): below this exp(x) is subnormal -> 0
        log2e, c1, c2 = _LOG2E, _LN2_HI, _LN2_LO
        p0, p1, p2, p3, p4, p5 = _EXP_POLY
        half, one, zero = np.float32(0.5), np.float32(1.0), np.float32(0.0)

        def impl(x):
            xs = x if x >= lo else lo          # NaN -> lo, so the integer path never sees NaN
            xs = xs if xs <= zero else zero
            k = np.floor(xs * log2e + half)    # k in [-126, 0]
            r = xs - k * c1
            r = r - k * c2
            p = p0 * r + p1
            p = p * r + p2
            p = p * r + p3
            p = p * r + p4
            p = p * r + p5
            p = p * r * r + r + one
            y = p * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))
            y = y if x >= lo else zero         # -inf and deep underflow -> 0 (NaN also lands here...)
            return y if x == x else x          # ...and is restored: NaN -> NaN
        return impl
    if isinstance(x, types.Float):
        return lambda x: math.exp(x)
    return None


# e^-|t| with gradual underflow, for the logistic function (silu, gelu).
# _exp_nonpos flushes below e^-87.34 to 0, but silu(x) = x e^x / (1 + e^x) is still
# a normal float32 down to x = -91.5 (silu(-88.8) = -2.4e-37 while e^-88.8 is
# subnormal).  So this exp applies 2^n as two normal powers of two, 2^n1 2^n2
# with n1 = floor(n/2), n2 = n - n1 (both >= -75 for n >= -150): p 2^n1 is exact
# and the last product rounds once, into the subnormal range where it belongs
# (absolute error <= half a subnormal ulp, 7e-46) -- as the C kernels' vexp.
# Same reduction and polynomial as _exp_nonpos (1.0 ulp for normal results); the
# round-to-integer by the 1.5 * 2^23 shifter instead of floor saves an instruction.
# |t| >= 104 -> +0 (e^-104 < 2^-150); +-inf -> +0; NaN -> NaN.


def _exp_neg_abs(t):  # pragma: no cover - replaced by the overload inside jitted code
    """e^-|t| with gradual underflow; only callable from jitted code."""
    raise NotImplementedError


# Vectorising an elementwise formula in Numba takes two things besides a
# vectorisable exp (found on the LLVM IR of freshly compiled kernels):
#  * every constant typed float32: a Python literal (`1 + e`, `0.5 * x`, `64 - a`)
#    unifies float32 with int64 / float64 to float64, so the formula runs in
#    float64 from there on (half the lanes), and an exp reached by a float64
#    argument dispatches to libm's scalar exp (the lead's first attempt: `64 - a`);
#  * error_model="numpy" on the function holding the division: under Numba's
#    default "python" model every float `/` tests its divisor for zero and
#    raises ZeroDivisionError, a branch out of the loop that stops the loop
#    vectorizer (silu 64x3072: 12 ticks/element instead of 1.0).  Here the divisor
#    is 1 + e >= 1, so the model changes no result.
# The error model that counts is the one of the function the division is
# written in (an @overload's own jit_options), not its caller's.  The SLP
# vectorizer plays no part: the loop vectorizer does it.
_ELEMENTWISE_JIT = {"fastmath": set(cfg.FASTMATH_ELEMENTWISE), "error_model": cfg.ERROR_MODEL_ELEMENTWISE}


@overload(_exp_neg_abs, jit_options=_ELEMENTWISE_JIT)
def _exp_neg_abs_ov(t):
    if isinstance(t, types.Float) and t.bitwidth == 32:
        lo = np.float32(-104.0)
        shifter = np.float32(12582912.0)     # 1.5 * 2^23: adding it rounds to an integer
        log2e, c1, c2 = _LOG2E, _LN2_HI, _LN2_LO
        p0, p1, p2, p3, p4, p5 = _EXP_POLY
        one, bias, mant, i1 = np.float32(1.0), np.int32(127), np.int32(23), np.int32(1)

        def impl(t):
            x = -abs(t)
            xs = x if x >= lo else lo          # -inf -> lo; NaN -> lo, so the integer path never sees NaN
            n = (xs * log2e + shifter) - shifter   # n = round(x / ln2), in [-150, 0]
            r = xs - n * c1
            r = r - n * c2
            p = p0 * r + p1
            p = p * r + p2
            p = p * r + p3
            p = p * r + p4
            p = p * r + p5
            p = p * r * r + r + one
            ni = np.int32(n)
            n1 = ni >> i1
            n2 = ni - n1
            y = p * _f32_from_bits((n1 + bias) << mant) * _f32_from_bits((n2 + bias) << mant)
            return y if x == x else x          # NaN -> NaN
        return impl
    return None


def _logistic(z):  # pragma: no cover - replaced by the overload inside jitted code
    """sigma(z) = 1 / (1 + e^-z); only callable from jitted code."""
    raise NotImplementedError


@overload(_logistic, jit_options=_ELEMENTWISE_JIT)
def _logistic_ov(z):
    if isinstance(z, types.Float) and z.bitwidth == 32:
        zero, one = np.float32(0.0), np.float32(1.0)

        def impl(z):
            # e = e^-|z| <= 1, so nothing overflows: sigma(z) = 1/(1+e) for z >= 0, e/(1+e) below
            e = _exp_neg_abs(z)
            return (one if z >= zero else e) / (one + e)
        return impl
    return None


@cfg.kernel(cfg.FASTMATH_ELEMENTWISE)
def _exp_nonpos_kernel(out, x):  # out [N], x [N]
    """out = exp(x) elementwise with the kernels' own exp (exposed for its accuracy test)."""
    for i in range(x.shape[0]):
        out[i] = _exp_nonpos(x[i])


def exp_nonpos(x):  # [N] -> [N]
    """The attention/softmax exp, for testing: exp(x) for x <= 0 (NaN -> NaN)."""
    x = check_array("x", x, ndim=1)
    if np.any(x > 0):
        raise ValueError("exp_nonpos: argument 'x' must be <= 0 (or NaN)")
    out = np.empty_like(x)
    cfg.call(_exp_nonpos_kernel, x.dtype, out, x)
    return out


# ==========================================================================
# GEMM micro-kernels
# ==========================================================================
# C[cr:cr+MR, cc:cc+NR] (+)= sum_p A_p^T B_p over kc rank-1 updates, with the
# MR x NR tile of C in named scalar locals so LLVM's SLP vectorizer packs each
# row of the tile into SIMD registers (numba_config explains why not a local
# array).  Two ways to read A:
#   _micro_an: A[ar + p, ac + i]   (A packed as KC x MR panels; or P^T in attention)
#   _micro_at: A[ar + i, ac + p]   (A read transposed: rows of K in attention)
# B is read B[br + p, bc + j] (NR consecutive elements per p).
# Column indices are uint64 so Numba emits no negative-index wraparound test
# per element (that test hides the consecutive addresses from the vectorizer).
# Callers guarantee every index is in range; edge tiles go to _edge_an / _edge_dot
# (attention) or through a scratch tile (_matmul_tiled).


def _gen_micro(name: str, a_trans: bool) -> str:
    acc = [[f"c{i}_{j}" for j in range(NR)] for i in range(MR)]
    L = [f"def {name}(kc, A, ar, ac, B, br, bc, C, cr, cc, add):",
         f"    # C[cr:cr+{MR}, cc:cc+{NR}] (+)= sum_p A(p, 0:{MR})^T B[br+p, bc:bc+{NR}]  (generated)",
         "    z = C.dtype.type(0)"]
    for i in range(MR):
        L.append("    " + ", ".join(acc[i]) + " = " + ", ".join("z" for _ in range(NR)))
    L.append("    aru = np.uint64(ar)\n    acu = np.uint64(ac)\n    bru = np.uint64(br)")
    L.append("    " + ", ".join(f"bc{j}" for j in range(NR)) + " = "
             + ", ".join(f"np.uint64(bc + {j})" for j in range(NR)))
    L.append("    " + ", ".join(f"cc{j}" for j in range(NR)) + " = "
             + ", ".join(f"np.uint64(cc + {j})" for j in range(NR)))
    idx = [f"np.uint64(ar + {i})" if a_trans else f"np.uint64(ac + {i})" for i in range(MR)]
    L.append("    " + ", ".join(f"ai{i}" for i in range(MR)) + " = " + ", ".join(idx))
    L.append("    for p in range(kc):")
    L.append("        pu = np.uint64(p)")
    L.append("        " + ", ".join(f"b{j}" for j in range(NR)) + " = "
             + ", ".join(f"B[bru + pu, bc{j}]" for j in range(NR)))
    for i in range(MR):
        L.append(f"        a = A[ai{i}, acu + pu]" if a_trans else f"        a = A[aru + pu, ai{i}]")
        for j in range(NR):
            L.append(f"        {acc[i][j]} += a * b{j}")
    for mode, op in (("if add:", "+="), ("else:", "=")):
        L.append("    " + mode)
        for i in range(MR):
            L.append(f"        r = np.uint64(cr + {i})")
            for j in range(NR):
                L.append(f"        C[r, cc{j}] {op} {acc[i][j]}")
    return "\n".join(L) + "\n"


# exec'd into this module's globals with this file as its filename, so
# numba's on-disk cache can locate (and invalidate) them like hand-written code.
# To read the generated source: print(_gen_micro("micro", False)).
exec(compile(_gen_micro("_micro_an_py", False) + _gen_micro("_micro_at_py", True), __file__, "exec"), globals())
_micro_an = cfg.kernel(cfg.FASTMATH_GEMM)(globals()["_micro_an_py"])
_micro_at = cfg.kernel(cfg.FASTMATH_GEMM)(globals()["_micro_at_py"])


@cfg.kernel(cfg.FASTMATH_GEMM)
def _edge_an(kc, A, ar, ac, B, br, bc, C, cr, cc, mr, nr, add):
    """_micro_an for an mr x nr edge tile (mr <= MR, nr <= NR): one row of C at a time,
    the j loop over a contiguous row of B (vectorised by the loop vectorizer)."""
    for i in range(mr):
        cb = C[cr + i, cc:cc + nr]
        if not add:
            cb[:] = 0
        for p in range(kc):
            a = A[ar + p, ac + i]
            bb = B[br + p, bc:bc + nr]
            for j in range(nr):
                cb[j] += a * bb[j]


@cfg.kernel(cfg.FASTMATH_REDUCE)
def _edge_dot(kc, A, ar, Bt, bt, C, cr, cc, mr, nr):
    """C[cr+i, cc+j] = sum_p A[ar+i, p] Bt[bt+j, p]: the _micro_at product for an edge tile,
    as dot products of two contiguous rows (reassoc: a vectorised sum)."""
    for i in range(mr):
        for j in range(nr):
            s = C.dtype.type(0)
            for p in range(kc):
                s += A[ar + i, p] * Bt[bt + j, p]
            C[cr + i, cc + j] = s


# ==========================================================================
# matmul
# ==========================================================================


@cfg.kernel(cfg.FASTMATH_GEMM)
def _matmul_ref(C, A, B):  # C [M,N] = A [M,K] @ B [K,N]; naive, the reference beside the tiled one
    M, K = A.shape
    N = B.shape[1]
    for i in range(M):
        for j in range(N):
            s = C.dtype.type(0)
            for p in range(K):
                s += A[i, p] * B[p, j]
            C[i, j] = s


@cfg.kernel(cfg.FASTMATH_GEMM)
def _matmul_tiled(C, A, B, Bp, Ap, T):  # C [M,N] (zeroed) += A [M,K] @ B [K,N]
    """Goto/BLIS loops: NC columns of B -> KC slice -> pack B as KC x NR panels
    -> MC rows of A, packed as KC x MR panels -> MR x NR register micro-tile.
    Bp [panel, p, j] and Ap [panel, p, i] are the packing workspace (_gemm_workspace):
    every entry the micro-tiles read is written by the packing first, the edge panels
    padded with zeros.  An edge tile (fewer than MR rows or NR columns of C left) runs
    the same micro-tile into the MR x NR scratch T, and its mr x nr corner is added to C.
    Packing reads 1-D row slices (contiguous, no per-element index fix-ups): with 2-D
    indexing and a row-at-a-time edge kernel, 256^3 ran 28 FLOP/tick against 40 now.
    B is packed row by row, read front to back as the C packers do (one stream the hardware
    prefetcher follows), into Bp through its flat view: walking down each NR-wide panel
    instead reads with a stride of a row of B, and when B sits in the L3 that ran
    1.09-1.40x NumPy's time at 128x768x768 against 1.02-1.05x, 1.64x against 1.16x at
    64x768x3072, and 1.13-1.19x against 1.00-1.09x at 512^3 (same at 256^3; interleaved
    in one process, medians of 8 rounds).  Bp's panels hold KC + 1 rows (one unused): 16 KiB
    apart, the NR-float rows a packed row of B writes into every panel all fell in the same
    L1 set (128x768x768 1.068 -> 1.024 of NumPy's time, 64x768x3072 1.187 -> 1.17)."""
    M, K = A.shape
    N = B.shape[1]
    PS = Bp.shape[1] * NR                                   # floats from one panel to the next
    Bf = Bp.reshape(-1)                                     # [panel * PS + p * NR + j]
    for jc in range(0, N, NC):
        nc = min(NC, N - jc)
        nfull = nc // NR
        for pc in range(0, K, KC):
            kc = min(KC, K - pc)
            for p in range(kc):                             # pack B[pc:pc+kc, jc:jc+nc], row by row
                src = B[pc + p, jc:jc + nc]
                for q in range(nfull):
                    o, s0 = q * PS + p * NR, q * NR
                    for j in range(NR):
                        Bf[o + j] = src[s0 + j]
                if nfull * NR < nc:                         # the edge panel, zero-padded
                    o, w = nfull * PS + p * NR, nc - nfull * NR
                    for j in range(w):
                        Bf[o + j] = src[nfull * NR + j]
                    for j in range(w, NR):
                        Bf[o + j] = 0
            for ic in range(0, M, MC):
                mc = min(MC, M - ic)
                for ir in range(0, mc, MR):                 # pack A[ic:ic+mc, pc:pc+kc]
                    mr = min(MR, mc - ir)
                    P = Ap[ir // MR]
                    for i in range(mr):
                        src = A[ic + ir + i, pc:pc + kc]
                        for p in range(kc):
                            P[p, i] = src[p]
                    for i in range(mr, MR):
                        for p in range(kc):
                            P[p, i] = 0
                for jr in range(0, nc, NR):
                    nr = min(NR, nc - jr)
                    for ir in range(0, mc, MR):
                        mr = min(MR, mc - ir)
                        if mr == MR and nr == NR:
                            _micro_an(kc, Ap[ir // MR], 0, 0, Bp[jr // NR], 0, 0, C, ic + ir, jc + jr, True)
                        else:
                            _micro_an(kc, Ap[ir // MR], 0, 0, Bp[jr // NR], 0, 0, T, 0, 0, False)
                            for i in range(mr):
                                cr = C[ic + ir + i, jc + jr:jc + jr + nr]
                                tr = T[i]
                                for j in range(nr):
                                    cr[j] += tr[j]


@cfg.kernel(cfg.FASTMATH_GEMM)
def _matmul_few_rows(C, A, B):  # C [M,N] (zeroed) += A [M,K] @ B [K,N], M < MR (decode GEMV)
    """Stream B once, row by row, without packing: for a block of GEMV_NB columns,
    C[i, block] += A[i, p] B[p, block] over p (the C block stays in L1)."""
    M, K = A.shape
    N = B.shape[1]
    for j0 in range(0, N, GEMV_NB):
        nb = min(GEMV_NB, N - j0)
        for p in range(K):
            bb = B[p, j0:j0 + nb]              # 1-D slices: contiguous, no per-element index fix-ups
            for i in range(M):
                a = A[i, p]
                cb = C[i, j0:j0 + nb]
                for j in range(nb):
                    cb[j] += a * bb[j]


_SMALL_MATMUL = 4096  # M*N*K below this: the naive loop (no packing overhead)
_WORKSPACE = threading.local()


def _gemm_workspace(dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Bp, Ap, T): _matmul_tiled's packed panels and edge tile, on cache lines, one set per thread and dtype,
    kept between calls as a BLAS keeps its buffers.  Allocated inside the kernel (2 MiB of
    Bp per call), (128x768)(768x768) ran 6.66M ticks (median of 40 interleaved rounds'
    medians) against 5.82M, its rounds spread 1.53x (p95/p5) against 1.28x."""
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    ws = bufs.get(dtype)
    if ws is None:
        ws = bufs[dtype] = (aligned_empty(((NC + NR - 1) // NR, KC + 1, NR), dtype),   # + 1: see _matmul_tiled
                            aligned_empty(((MC + MR - 1) // MR, KC, MR), dtype),
                            aligned_empty((MR, NR), dtype))
    return ws


@register("matmul", "numba")
def matmul(a, b):  # [M,K] @ [K,N] -> [M,N]
    """Tiled, register-blocked matmul (no BLAS)."""
    a, b = check_matmul_args(a, b)
    M, K = a.shape
    N = b.shape[1]
    if M * N * K <= _SMALL_MATMUL:
        out = np.zeros((M, N), dtype=a.dtype)
        cfg.call(_matmul_ref, a.dtype, out, a, b)
    elif M < MR:
        # the GEMV adds every row of b into out: out starts half a page from b (buffers.apart_zeros)
        out = apart_zeros((M, N), a.dtype, like=b)
        cfg.call(_matmul_few_rows, a.dtype, out, a, b)
    else:
        out = np.zeros((M, N), dtype=a.dtype)
        cfg.call(_matmul_tiled, a.dtype, out, a, b, *_gemm_workspace(a.dtype))
    return out


# ==========================================================================
# softmax
# ==========================================================================


@cfg.kernel(cfg.FASTMATH_REDUCE)
def _row_max(x, r, N):  # x [R,N] -> max x[r, :N]; NaN compares false: skipped (the caller propagates it)
    """The max by 8 independent running maxima, then one over them.

    One running max is a chain of compare-selects, each waiting for the last (~4 cycles an
    element), and LLVM vectorizes a select-based max only under `nnan`, which the kernels
    must not have (see numba_config).  Eight independent chains overlap, and the SLP
    vectorizer packs them into one vector compare and blend.  A max is exact in any order."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x.dtype.type(-np.inf)
    j = 0
    while j + 8 <= N:
        v0, v1, v2, v3 = x[r, j], x[r, j + 1], x[r, j + 2], x[r, j + 3]
        v4, v5, v6, v7 = x[r, j + 4], x[r, j + 5], x[r, j + 6], x[r, j + 7]
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
        m4 = v4 if v4 > m4 else m4
        m5 = v5 if v5 > m5 else m5
        m6 = v6 if v6 > m6 else m6
        m7 = v7 if v7 > m7 else m7
        j += 8
    for i in range(j, N):
        v = x[r, i]
        m0 = v if v > m0 else m0
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@cfg.kernel(cfg.FASTMATH_REDUCE)
def _softmax_kernel(out, x):  # out [R,N], x [R,N]
    """out[r] = exp(x[r] - max x[r]) / sum exp(x[r] - max x[r]).

    -inf entries give 0; an all -inf row gives zeros; NaN (or +inf, which makes
    inf - inf) anywhere in a row makes the row NaN -- the oracle's semantics.
    """
    R, N = x.shape
    ninf = x.dtype.type(-np.inf)
    zero = x.dtype.type(0)
    for r in range(R):
        m = _row_max(x, r, N)
        if m == ninf:                        # fully masked row: exp(-inf - 0) = 0 everywhere
            m = zero
        s = zero
        for j in range(N):
            e = _exp_nonpos(x[r, j] - m)
            out[r, j] = e
            s += e
        if s == zero:
            s = x.dtype.type(1)
        for j in range(N):
            out[r, j] = out[r, j] / s


@register("softmax", "numba")
def softmax(x):  # [..., N] -> [..., N], over the last axis
    x = check_rows_args("softmax", x)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        N = x.shape[-1]
        cfg.call(_softmax_kernel, x.dtype, out.reshape(-1, N), x.reshape(-1, N))
    return out


# ==========================================================================
# attention (flash style)
# ==========================================================================


@cfg.kernel(cfg.FASTMATH_GEMM)
def _attention_kernel(out, q, k, v, causal, scale):  # out [H,Lq,D], q [H,Lq,D], k [Hkv,Lk,D], v [Hkv,Lk,D]
    """out = softmax(q k^T scale, causal mask) v per head, by online softmax over K/V tiles.

    For kv head g the G query heads that share it are stacked as G*Lq rows
    (row r = query head g*G + r // Lq, position t = r % Lq): K and V are read
    once per tile of BQ rows and never copied per query head.  Per tile of BK
    keys: S^T = K_tile Q_tile^T (keys x rows, so the row-wise max and sum run
    down columns and vectorise), mask, running max m, P^T = exp(S^T - m),
    l = l exp(m_old - m) + sum P, O = O exp(m_old - m) + P V.  Causal: query t
    sees keys 0 .. Lk - Lq + t; tiles past a row block's last visible key are
    skipped.  No Lq x Lk buffer: scratch is BK x BQ + D x BQ + BQ x D.
    """
    H, Lq, D = q.shape
    Hkv, Lk, _ = k.shape
    G = H // Hkv
    dt = q.dtype.type
    ninf = dt(-np.inf)
    zero = dt(0)
    Qp = np.empty((D, BQ), q.dtype)          # [d, row]   Q tile transposed (the B operand of S^T)
    Qr = np.empty((BQ, D), q.dtype)          # [row, d]   the same tile by rows (edge dot products)
    ST = np.empty((BK, BQ), q.dtype)         # [key, row] scores, then probabilities
    O = np.empty((BQ, D), q.dtype)           # [row, d]   output accumulator
    m = np.empty(BQ, q.dtype)                # running max per row
    mu = np.empty(BQ, q.dtype)               # the max the exponentials are taken against
    mt = np.empty(BQ, q.dtype)               # this tile's max
    alpha = np.empty(BQ, q.dtype)
    lsum = np.empty(BQ, q.dtype)
    lim = np.empty(BQ, np.int64)             # last visible key per row
    R = G * Lq
    for g in range(Hkv):
        Kg = k[g]                            # [Lk, D]
        Vg = v[g]                            # [Lk, D]
        for r0 in range(0, R, BQ):
            nq = min(BQ, R - r0)
            lim_max = 0
            for rr in range(nq):
                h = g * G + (r0 + rr) // Lq
                t = (r0 + rr) % Lq
                for d in range(D):
                    Qp[d, rr] = q[h, t, d]
                    Qr[rr, d] = q[h, t, d]
                lim[rr] = Lk - Lq + t if causal else Lk - 1
                lim_max = max(lim_max, lim[rr])
                m[rr] = ninf
                lsum[rr] = zero
                for d in range(D):
                    O[rr, d] = zero
            for j0 in range(0, lim_max + 1, BK):   # causal tile skipping: stop after the last visible key
                nk = min(BK, Lk - j0)
                # S^T[j, rr] = K[j0 + j] . Q[rr]
                for i0 in range(0, nk, MR):
                    mr = min(MR, nk - i0)
                    for c0 in range(0, nq, NR):
                        nr = min(NR, nq - c0)
                        if mr == MR and nr == NR:
                            _micro_at(D, Kg, j0 + i0, 0, Qp, 0, c0, ST, i0, c0, False)
                        else:
                            _edge_dot(D, Kg, j0 + i0, Qr, c0, ST, i0, c0, mr, nr)
                # scale, mask, this tile's row max
                for rr in range(nq):
                    mt[rr] = ninf
                for j in range(nk):
                    key = j0 + j
                    for rr in range(nq):
                        s = ST[j, rr] * scale
                        s = s if key <= lim[rr] else ninf
                        ST[j, rr] = s
                        mt[rr] = s if s > mt[rr] else mt[rr]
                # new running max; rescale factor exp(m_old - m_new)
                for rr in range(nq):
                    mn = mt[rr] if mt[rr] > m[rr] else m[rr]
                    use = mn if mn != ninf else zero     # nothing visible yet: exp(-inf - 0) = 0
                    alpha[rr] = _exp_nonpos(m[rr] - use)
                    m[rr] = mn
                    mu[rr] = use
                    lsum[rr] = lsum[rr] * alpha[rr]
                for j in range(nk):
                    for rr in range(nq):
                        p = _exp_nonpos(ST[j, rr] - mu[rr])
                        ST[j, rr] = p
                        lsum[rr] += p
                for rr in range(nq):
                    a = alpha[rr]
                    for d in range(D):
                        O[rr, d] *= a
                # O[rr, :] += sum_j P^T[j, rr] V[j0 + j, :]
                for i0 in range(0, nq, MR):
                    mr = min(MR, nq - i0)
                    if mr < MR:                          # edge rows (decode: G*Lq < MR): whole rows
                        _edge_an(nk, ST, 0, i0, Vg, j0, 0, O, i0, 0, mr, D, True)
                        continue
                    for c0 in range(0, D - NR + 1, NR):
                        _micro_an(nk, ST, 0, i0, Vg, j0, c0, O, i0, c0, True)
                    c0 = D - D % NR
                    if c0 < D:
                        _edge_an(nk, ST, 0, i0, Vg, j0, c0, O, i0, c0, MR, D - c0, True)
            for rr in range(nq):
                h = g * G + (r0 + rr) // Lq
                t = (r0 + rr) % Lq
                den = lsum[rr] if lsum[rr] != zero else dt(1)
                for d in range(D):
                    out[h, t, d] = O[rr, d] / den


@register("attention", "numba")
def attention(q, k, v, causal=False, scale=None):  # [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    """Flash-style attention with GQA (H % Hkv == 0) and an optional causal mask."""
    causal = check_flag("causal", causal)
    q, k, v = check_attention_args(q, k, v, causal)
    H, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else check_finite("scale", scale, q.dtype)
    out = np.zeros((H, Lq, D), dtype=q.dtype)
    if out.size:
        cfg.call(_attention_kernel, q.dtype, out, q, k, v, causal, q.dtype.type(scale))
    return out


# ==========================================================================
# normalisation
# ==========================================================================


# Rows float32 cannot normalise are redone in float64, as the C kernels do (csrc/kernels/norms.c):
# sums not finite (x^2 overflows above |x| ~ 1.8e19), var + eps below 2^-100 (x^2 lost bits to
# the subnormal range or rounded to 0: tiny rows with eps = 0), and for LayerNorm a row constant
# to a few ulps of its mean (var + eps <= 2^-40 mean^2: the float32 mean's rounding is the variance).
# `_norm_limits(dtype)` gives (tiny, flat, big); for float64 inputs they let every finite row through.


_NORM_LIMITS = {np.dtype(np.float32): (np.float32(2.0 ** -100), np.float32(2.0 ** -40), np.finfo(np.float32).max),
                np.dtype(np.float64): (np.float64(0), np.float64(0), np.float64(np.inf))}


def _norm_limits(dtype):
    return _NORM_LIMITS[np.dtype(dtype)]


@cfg.kernel(cfg.FASTMATH_REDUCE, error_model=cfg.ERROR_MODEL_NORMS)
def _layer_norm_row64(out, x, w, b, eps, r):  # row r of out [R,D] from x [R,D], in float64
    D = x.shape[1]
    s = 0.0
    for i in range(D):
        s += np.float64(x[r, i])
    mean = s / D
    s2 = 0.0
    for i in range(D):
        c = np.float64(x[r, i]) - mean
        s2 += c * c
    rs = 1.0 / np.sqrt(s2 / D + np.float64(eps))
    for i in range(D):
        out[r, i] = (np.float64(x[r, i]) - mean) * rs * np.float64(w[i]) + np.float64(b[i])


@cfg.kernel(cfg.FASTMATH_REDUCE, error_model=cfg.ERROR_MODEL_NORMS)
def _layer_norm_kernel(out, x, w, b, eps, tiny, flat, big):  # out [R,D], x [R,D], w [D], b [D]
    """out = (x - mean) (1 / sqrt(var + eps)) w + b, biased variance, per row, in x's dtype
    (as the C kernel; an int D or a float64 literal would turn the row into float64 math);
    the rows above in float64.  A constant row with eps = 0 is then 0 / 0 = NaN, as the oracle's."""
    R, D = x.shape
    dt = x.dtype.type
    zero, n = dt(0), dt(D)
    for r in range(R):
        s = zero
        for i in range(D):
            s += x[r, i]
        mean = s / n
        s2 = zero
        for i in range(D):
            c = x[r, i] - mean
            s2 += c * c
        v = s2 / n + eps
        if not (v >= tiny and v <= big and v > flat * mean * mean):      # NaN fails too
            _layer_norm_row64(out, x, w, b, eps, r)
            continue
        rs = dt(1) / np.sqrt(v)
        for i in range(D):
            out[r, i] = (x[r, i] - mean) * rs * w[i] + b[i]


@register("layer_norm", "numba")
def layer_norm(x, w, b, eps=1e-5):  # [..., D], [D], [D] -> [..., D]
    x, w, b = check_norm_args("layer_norm", x, w, b)
    eps = check_finite("eps", eps, x.dtype, nonneg=True)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        D = x.shape[-1]
        cfg.call(_layer_norm_kernel, x.dtype, out.reshape(-1, D), x.reshape(-1, D), w, b, x.dtype.type(eps),
                 *_norm_limits(x.dtype))
    return out


@cfg.kernel(cfg.FASTMATH_REDUCE, error_model=cfg.ERROR_MODEL_NORMS)
def _rms_norm_row64(out, x, w, eps, r):  # row r of out [R,D] from x [R,D], in float64
    D = x.shape[1]
    s = 0.0
    for i in range(D):
        s += np.float64(x[r, i]) * np.float64(x[r, i])
    rs = 1.0 / np.sqrt(s / D + np.float64(eps))
    for i in range(D):
        out[r, i] = np.float64(x[r, i]) * rs * np.float64(w[i])


@cfg.kernel(cfg.FASTMATH_REDUCE, error_model=cfg.ERROR_MODEL_NORMS)
def _rms_norm_kernel(out, x, w, eps, tiny, big):  # out [R,D], x [R,D], w [D]
    """out = x (1 / sqrt(mean(x^2) + eps)) w, per row, in x's dtype (as layer_norm; the rows
    float32 cannot normalise in float64)."""
    R, D = x.shape
    dt = x.dtype.type
    zero, n = dt(0), dt(D)
    for r in range(R):
        s = zero
        for i in range(D):
            s += x[r, i] * x[r, i]
        v = s / n + eps
        if not (v >= tiny and v <= big):                                  # NaN fails too
            _rms_norm_row64(out, x, w, eps, r)
            continue
        rs = dt(1) / np.sqrt(v)
        for i in range(D):
            out[r, i] = x[r, i] * rs * w[i]


@register("rms_norm", "numba")
def rms_norm(x, w, eps=1e-6):  # [..., D], [D] -> [..., D]
    x, w = check_norm_args("rms_norm", x, w)
    eps = check_finite("eps", eps, x.dtype, nonneg=True)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        D = x.shape[-1]
        tiny, _, big = _norm_limits(x.dtype)
        cfg.call(_rms_norm_kernel, x.dtype, out.reshape(-1, D), x.reshape(-1, D), w, x.dtype.type(eps), tiny, big)
    return out


# ==========================================================================
# activations
# ==========================================================================
# float32: through the logistic function with the vectorised e^-|z| above,
#   gelu_tanh(x) = x sigma(2y),  y = sqrt(2/pi) (x + 0.044715 x^3)   [0.5 (1 + tanh y) = sigma(2y)]
#   silu(x)      = x sigma(x),
# every constant a float32 (see _ELEMENTWISE_JIT for why), as the C kernels do.
# Error: e^-|z| 1 ulp, then 1 + e, the division and the product: 3u more; for
# gelu the rounding of y (about 4u relative) moves sigma(2y) by |2y| sigma(2y)
# sigma(-2y) 4u <= 0.9u relative to |x|: inside contracts.silu_bound (7 ulp) and
# gelu_tanh_bound (8 ulp of |ref| + |x|).  Special values follow the oracle:
# NaN -> NaN, +inf -> +inf, -inf -> NaN (-inf * sigma(-inf) = -inf * 0).
# float64: the oracle's formula through libm (scalar), rounded once.


def _gelu_tanh(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_gelu_tanh, jit_options=_ELEMENTWISE_JIT)
def _gelu_tanh_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        c = np.float32(math.sqrt(2.0 / math.pi))
        a = np.float32(0.044715)

        def impl(x):
            y = (x + a * (x * x * x)) * c
            return x * _logistic(y + y)
        return impl
    if isinstance(x, types.Float):
        c = math.sqrt(2.0 / math.pi)
        return lambda x: 0.5 * x * (1.0 + math.tanh(c * (x + 0.044715 * (x * x * x))))
    return None


def _silu(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_silu, jit_options=_ELEMENTWISE_JIT)
def _silu_ov(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return lambda x: x * _logistic(x)
    if isinstance(x, types.Float):
        return lambda x: x / (1.0 + math.exp(-x))
    return None


@cfg.kernel(cfg.FASTMATH_ELEMENTWISE, error_model=cfg.ERROR_MODEL_ELEMENTWISE)
def _gelu_tanh_kernel(out, x):  # out [N], x [N]
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (float32: x sigma(2y), vectorised)."""
    for i in range(x.shape[0]):
        out[i] = _gelu_tanh(x[i])


def _elementwise(kernel, x):  # [...] -> [...]
    """Check x, allocate the output, run the elementwise `kernel` over the flattened arrays."""
    x = check_array("x", x)
    out = apart_empty(x.shape, x.dtype, like=x)
    cfg.call(kernel, x.dtype, out.reshape(-1), x.reshape(-1))
    return out


@register("gelu_tanh", "numba")
def gelu_tanh(x):  # [...] -> [...]
    return _elementwise(_gelu_tanh_kernel, x)


@cfg.kernel(cfg.FASTMATH_ELEMENTWISE, error_model=cfg.ERROR_MODEL_ELEMENTWISE)
def _silu_kernel(out, x):  # out [N], x [N]
    """x / (1 + exp(-x))  (float32: x sigma(x), vectorised)."""
    for i in range(x.shape[0]):
        out[i] = _silu(x[i])


@register("silu", "numba")
def silu(x):  # [...] -> [...]
    return _elementwise(_silu_kernel, x)


# ==========================================================================
# rope
# ==========================================================================


@cfg.kernel(cfg.FASTMATH_ELEMENTWISE)
def _rope_kernel(out, x, pos, theta, interleaved):  # out [B,T,D], x [B,T,D], pos [T] float64
    """Rotate pair i of position p by the angle p theta^(-2i/D).

    Angles, cos and sin in float64, rounded to x's dtype (as the oracle does);
    the rotation (x1 cos - x2 sin, x2 cos + x1 sin) in x's dtype.
    Pairs: (x[i], x[i + D/2]) (half-split, HF) or (x[2i], x[2i+1]) (interleaved).
    """
    B, T, D = x.shape
    half = D // 2
    cs = np.empty((T, half), x.dtype)
    sn = np.empty((T, half), x.dtype)
    for t in range(T):
        for i in range(half):
            a = pos[t] * theta ** (-(2.0 * i) / D)
            cs[t, i] = math.cos(a)
            sn[t, i] = math.sin(a)
    for bb in range(B):
        for t in range(T):
            for i in range(half):
                if interleaved:
                    i1, i2 = 2 * i, 2 * i + 1
                else:
                    i1, i2 = i, i + half
                x1 = x[bb, t, i1]
                x2 = x[bb, t, i2]
                out[bb, t, i1] = x1 * cs[t, i] - x2 * sn[t, i]
                out[bb, t, i2] = x2 * cs[t, i] + x1 * sn[t, i]


@register("rope", "numba")
def rope(x, positions, theta=10000.0, interleaved=False):  # [..., T, D], [T] -> [..., T, D]
    x, pos = check_rope_args(x, positions)
    T, D = x.shape[-2:]
    theta, interleaved = check_finite("theta", theta, positive=True), check_flag("interleaved", interleaved)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        cfg.call(_rope_kernel, x.dtype, out.reshape(-1, T, D), x.reshape(-1, T, D),
                 np.ascontiguousarray(pos, dtype=np.float64), theta, interleaved)
    return out
