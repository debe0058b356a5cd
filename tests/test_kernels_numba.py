"""The Numba backend against the float64 oracle, under the contracts.py error bounds.

Every comparison: the kernel runs on float32 (or float64) inputs, the oracle
runs in float64 on the same inputs, and `assert_within` checks the elementwise
bound from refimpl.kernels.contracts (non-finite values must match exactly).
Hypothesis draws shapes (1, primes, non-multiples of the tiles, K = 1, ...) and
special values; data comes from a seeded generator so big arrays stay cheap.
Tile sizes come from numba_config so the shapes straddle the real tile edges.
"""
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, strategies as st, target

from refimpl.kernels import contracts as C
from refimpl.kernels import get
from refimpl.kernels import numba_config as cfg
from refimpl.kernels import numba_kernels as nk
from refimpl.oracle import layers as L
from refimpl.verify.compare import assert_within

F32, F64 = np.float32, np.float64
MR, NR, KC, NC = cfg.GEMM_MR, cfg.GEMM_NR, cfg.GEMM_KC, cfg.GEMM_NC
BQ, BK = cfg.ATTN_BQ, cfg.ATTN_BK
PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 97, 101]

dtypes = st.sampled_from([F32, F64])


def sizes(lo=1, hi=40):
    """1, primes, tile edges +-1, anything in between."""
    edges = [v for v in (MR - 1, MR, MR + 1, NR - 1, NR, NR + 1, 2 * NR + 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from([lo] + [p for p in PRIMES if lo <= p <= hi] + edges),
                     st.integers(lo, hi))


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def record(stats):
    target(float(min(stats.bound_ratio, 1e6)), label="bound ratio")   # steer toward the worst case


def f64(x):
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------
# import is lazy
# --------------------------------------------------------------------------


def test_import_compiles_nothing():
    code = ("import refimpl.kernels.numba_kernels as m, numba\n"
            "d = [v for v in vars(m).values() if isinstance(v, numba.core.registry.CPUDispatcher)]\n"
            "assert len(d) >= 10, d\n"
            "bad = [f.py_func.__name__ for f in d if f.signatures]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_call_restores_numba_slp_setting(monkeypatch):
    import numba
    monkeypatch.setattr(numba.config, "SLP_VECTORIZE", 0)
    monkeypatch.setattr(cfg, "_compiled", set())          # force the first-call path
    seen = []
    out = cfg.call(lambda x: seen.append(numba.config.SLP_VECTORIZE) or x + 1, "key", 1)
    assert out == 2 and seen == [1] and numba.config.SLP_VECTORIZE == 0
    cfg.call(lambda: seen.append(numba.config.SLP_VECTORIZE), "key")   # new fn: first call again
    assert seen == [1, 1] and numba.config.SLP_VECTORIZE == 0


def test_registered_for_every_op():
    from refimpl.kernels import OPS
    for op in OPS:
        assert get(op, "numba").__module__ == nk.__name__


# --------------------------------------------------------------------------
# the vector exp used by softmax and attention
# --------------------------------------------------------------------------


def test_exp_nonpos_ulp():
    # dense sweep of [-87.34, 0] plus the exact ends; reference: float64 exp rounded to float32
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(-87.336, 0, 1_000_003), -rng.exponential(8, 200_000),
                        -np.logspace(-30, 1.94, 20_000), [0.0, -0.0, -1e-45]]).astype(F32)
    x = x[x >= F32(-87.33654)]
    got = nk.exp_nonpos(x).astype(F64)
    want = np.exp(x.astype(F64))
    ulp = np.abs(got - want) / np.spacing(want.astype(F32)).astype(F64)
    assert ulp.max() <= C.EXP_ULPS, f"exp: {ulp.max():.2f} ulp at x = {x[np.argmax(ulp)]!r}"
    # below the normal range: exactly 0; -inf -> 0; NaN -> NaN
    s = nk.exp_nonpos(np.array([-87.5, -100.0, -3e38, -np.inf, np.nan], F32))
    assert s[:4].tolist() == [0, 0, 0, 0] and np.isnan(s[4])


# --------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------


@st.composite
def matmul_case(draw):
    M, K, N = draw(sizes(1, 40)), draw(st.one_of(sizes(1, 40), st.integers(KC - 2, KC + 40))), draw(sizes(1, 70))
    return M, K, N, draw(dtypes), draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from([1.0, 1e-20, 1e15]))


@given(matmul_case())
@example((1, 1, 1, F32, 0, 1.0))
@example((MR, KC + 1, NR, F32, 1, 1.0))
@example((MR + 1, 1, NR + 1, F32, 2, 1.0))
@example((2 * MR, 3 * KC + 7, 3 * NR, F64, 3, 1.0))
def test_matmul_within_bound(case):
    M, K, N, dt, seed, scale = case
    rng = np.random.default_rng(seed)
    a, b = randn(rng, (M, K), dt, scale), randn(rng, (K, N), dt)
    got = get("matmul", "numba")(a, b)
    assert got.dtype == dt and got.shape == (M, N) and got.flags.c_contiguous
    record(assert_within(got, f64(a) @ f64(b), C.matmul_bound(a, b, dt), f"matmul {M}x{K}x{N}"))


@pytest.mark.parametrize("M,K,N", [(97, 1031, 61), (130, 300, NC + 37), (1, 768, 3072), (300, 3, 1)])
def test_matmul_big_shapes(M, K, N):
    rng = np.random.default_rng(M + K + N)
    a, b = randn(rng, (M, K), F32), randn(rng, (K, N), F32)
    assert_within(get("matmul", "numba")(a, b), f64(a) @ f64(b), C.matmul_bound(a, b, F32), "matmul")


def test_matmul_zero_inner_size_and_nonfinite():
    z = get("matmul", "numba")(np.ones((3, 0), F32), np.ones((0, 4), F32))
    assert z.shape == (3, 4) and (z == 0).all()
    rng = np.random.default_rng(5)
    a, b = randn(rng, (20, 300), F32), randn(rng, (300, 40), F32)
    a[3, 7], a[11, 250], a[19, 0] = np.nan, np.inf, -np.inf
    got = get("matmul", "numba")(a, b)
    assert_within(got, f64(a) @ f64(b), C.matmul_bound(np.nan_to_num(a), b, F32), "matmul with NaN/inf")
    assert np.isnan(got[3]).all() and np.isinf(got[11]).all()


def test_matmul_noncontiguous_inputs():
    rng = np.random.default_rng(6)
    a = randn(rng, (70, 90), F32)[:, ::2]           # strided
    b = randn(rng, (60, 45), F32).T                  # Fortran order
    got = get("matmul", "numba")(a, b)
    assert_within(got, f64(a) @ f64(b), C.matmul_bound(a, b, F32), "matmul of views")
    assert np.array_equal(got, get("matmul", "numba")(np.ascontiguousarray(a), np.ascontiguousarray(b)))


def test_matmul_ref_and_tiled_agree_with_oracle():
    rng = np.random.default_rng(7)
    a, b = randn(rng, (13, 29), F32), randn(rng, (29, 17), F32)
    bound = C.matmul_bound(a, b, F32)
    for kern, ws in ((nk._matmul_ref, ()), (nk._matmul_tiled, nk._gemm_workspace(F32))):
        out = np.zeros((13, 17), F32)
        cfg.call(kern, F32, out, a, b, *ws)
        assert_within(out, f64(a) @ f64(b), bound, kern.py_func.__name__)


def test_matmul_workspace_is_rewritten_before_it_is_read():
    """The packing workspace is kept between calls: whatever an earlier call (here: NaN) left
    in it must never reach a result, whatever the edges (M, N, K off the MR, NR, KC blocks)."""
    rng = np.random.default_rng(11)
    for buf in nk._gemm_workspace(F32):             # packed panels and the edge tile
        buf[...] = np.nan
    for M, K, N in ((nk.MR * 3 + 1, nk.KC + 7, nk.NR * 2 + 5), (nk.MR, 5, nk.NR), (nk.MC + 1, 2 * nk.KC, 3)):
        a, b = randn(rng, (M, K), F32), randn(rng, (K, N), F32)
        out = get("matmul", "numba")(a, b)
        assert_within(out, f64(a) @ f64(b), C.matmul_bound(a, b, F32), f"{M}x{K}x{N}")


def test_matmul_from_two_threads_at_once():
    """One workspace per thread: two threads multiplying different matrices at the same time
    (the kernels release the GIL) each get their own product."""
    import threading
    rng = np.random.default_rng(12)
    pairs = [(randn(rng, (70, 300), F32), randn(rng, (300, 40), F32)),
             (randn(rng, (50, 260), F32), randn(rng, (260, 90), F32))]
    errors = []

    def work(a, b):
        ref, bound = f64(a) @ f64(b), C.matmul_bound(a, b, F32)
        try:
            for _ in range(30):
                assert_within(get("matmul", "numba")(a, b), ref, bound, "threaded matmul")
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


@st.composite
def softmax_case(draw):
    R, N = draw(sizes(1, 9)), draw(st.one_of(sizes(1, 70), st.integers(500, 1100)))
    kind = draw(st.sampled_from(["plain", "big", "near88", "huge", "masked", "full_mask", "nan", "posinf"]))
    return R, N, kind, draw(dtypes), draw(st.integers(0, 2 ** 32 - 1))


def make_logits(R, N, kind, dt, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, (R, N), F64, 3.0)
    if kind == "big":
        x *= 1000
    elif kind == "near88":
        x = rng.choice([-88.7, -88.0, 88.0, 88.7], size=(R, N)) + rng.uniform(-0.5, 0.5, (R, N))
    elif kind == "huge":
        x = rng.choice([-3e38, 3e38, -1.7e38, 1e38, 0.0], size=(R, N))
    elif kind == "masked":
        x[rng.random((R, N)) < 0.5] = -np.inf
    elif kind == "full_mask":
        x[rng.random((R, N)) < 0.5] = -np.inf
        x[rng.integers(R)] = -np.inf
    elif kind == "nan":
        x[rng.integers(R), rng.integers(N)] = np.nan
    elif kind == "posinf":
        x[rng.integers(R), rng.integers(N)] = np.inf
    return x.astype(dt)


@given(softmax_case())
@example((1, 1, "plain", F32, 0))
@example((3, 4, "huge", F32, 1))
@example((2, 33, "near88", F32, 2))
@example((4, 17, "full_mask", F32, 3))
@example((3, 1000, "nan", F64, 4))
def test_softmax_within_bound(case):
    R, N, kind, dt, seed = case
    x = make_logits(R, N, kind, dt, seed)
    with np.errstate(invalid="ignore"):
        ref = L.softmax(f64(x), axis=-1)
    got = get("softmax", "numba")(x)
    assert got.dtype == dt and got.shape == x.shape
    record(assert_within(got, ref, C.softmax_bound(x, ref, dt), f"softmax {kind} {R}x{N}"))
    if kind == "full_mask":
        assert (got[(x == -np.inf).all(-1)] == 0).all()
    finite = np.isfinite(x)
    assert (got[~finite & (x == -np.inf) & ~np.isnan(ref)] == 0).all()   # masked -> exactly 0


def test_softmax_nd_and_noncontiguous():
    rng = np.random.default_rng(8)
    x = randn(rng, (3, 5, 40), F32)[:, :, ::2]
    got = get("softmax", "numba")(x)
    ref = L.softmax(f64(x), axis=-1)
    assert got.shape == (3, 5, 20)
    assert_within(got, ref, C.softmax_bound(x, ref, F32), "softmax 3-D view")


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


@st.composite
def attention_case(draw):
    Hkv = draw(st.sampled_from([1, 2, 3]))
    ratio = draw(st.sampled_from([1, 2, 4, "H"]))
    H = Hkv * (4 if ratio == "H" else ratio)
    if ratio == "H":
        Hkv = 1                                      # multi-query: one kv head for all H
    Lk = draw(st.one_of(sizes(1, 60), st.integers(BK - 1, 3 * BK + 1)))
    Lq = draw(st.one_of(st.just(1), st.integers(1, Lk)))
    D = draw(st.sampled_from([1, 3, 8, NR, NR + 1, 40, 64]))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.5, 3.0, 40.0]))
    special = draw(st.sampled_from(["none", "none", "nan_q", "nan_k", "inf_q"]))
    return H, Hkv, Lq, Lk, D, causal, scale, special, draw(dtypes), draw(st.integers(0, 2 ** 32 - 1))


def oracle_attention(q, k, v, causal, scale):
    with np.errstate(invalid="ignore", over="ignore"):
        return get("attention", "numpy")(f64(q), f64(k), f64(v), causal=causal, scale=scale)


@given(attention_case())
@example((1, 1, 1, 1, 1, False, None, "none", F32, 0))
@example((4, 1, 1, 97, 64, True, None, "none", F32, 1))                 # decode, MQA
@example((8, 2, 2 * BQ + 5, 2 * BQ + 9, 64, True, None, "none", F32, 2))  # several q and kv tiles
@example((2, 2, 30, 30, 17, True, 40.0, "none", F32, 3))                 # logits in the hundreds
@example((4, 2, 5, 9, 8, False, None, "nan_k", F64, 4))
def test_attention_within_bound(case):
    H, Hkv, Lq, Lk, D, causal, scale, special, dt, seed = case
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, (H, Lq, D), dt), randn(rng, (Hkv, Lk, D), dt), randn(rng, (Hkv, Lk, D), dt)
    if special == "nan_q":
        q[rng.integers(H), rng.integers(Lq), rng.integers(D)] = np.nan
    elif special == "nan_k":
        k[rng.integers(Hkv), rng.integers(Lk), rng.integers(D)] = np.nan
    elif special == "inf_q":
        q[rng.integers(H), rng.integers(Lq), rng.integers(D)] = np.inf
    ref = oracle_attention(q, k, v, causal, scale)
    got = get("attention", "numba")(q, k, v, causal=causal, scale=scale)
    assert got.dtype == dt and got.shape == (H, Lq, D)
    with np.errstate(invalid="ignore", over="ignore"):
        bound = C.attention_bound(np.nan_to_num(q), np.nan_to_num(k), v, causal, scale, dtype=dt)
    record(assert_within(got, ref, bound, f"attention H={H} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} causal={causal}"))


@pytest.mark.parametrize("H,Hkv,L,D", [(4, 2, 300, 64), (3, 1, 200, 128)])
def test_attention_causal_long(H, Hkv, L, D):
    rng = np.random.default_rng(L)
    q, k, v = randn(rng, (H, L, D), F32), randn(rng, (Hkv, L, D), F32), randn(rng, (Hkv, L, D), F32)
    got = get("attention", "numba")(q, k, v, causal=True)
    assert_within(got, oracle_attention(q, k, v, True, None), C.attention_bound(q, k, v, True), "attention")


def test_attention_decode_matches_last_row_of_prefill():
    # Lq = 1 with the cache (Lk keys) is the last row of causal attention over Lk queries
    rng = np.random.default_rng(9)
    q, k, v = randn(rng, (8, 50, 32), F32), randn(rng, (2, 50, 32), F32), randn(rng, (2, 50, 32), F32)
    full = get("attention", "numba")(q, k, v, causal=True)
    last = get("attention", "numba")(q[:, -1:], k, v, causal=True)
    bound = C.attention_bound(q[:, -1:], k, v, True)
    assert_within(last, oracle_attention(q[:, -1:], k, v, True, None), bound, "decode")
    assert_within(full[:, -1:], oracle_attention(q[:, -1:], k, v, True, None), bound, "prefill last row")


def test_attention_noncontiguous_and_gqa_uses_right_heads():
    rng = np.random.default_rng(10)
    q = randn(rng, (20, 6, 16), F32).transpose(1, 0, 2)            # [H=6, Lq=20, D=16] non-contiguous
    k = randn(rng, (3, 25, 32), F32)[:, :, ::2]                    # strided view
    v = randn(rng, (3, 25, 16), F32)
    got = get("attention", "numba")(q, k, v, causal=True)
    assert_within(got, oracle_attention(q, k, v, True, None), C.attention_bound(q, k, v, True), "views")
    # head h reads kv head h // 2: swapping kv heads 0 and 1 must change exactly heads 0..3
    k2, v2 = k[[1, 0, 2]], v[[1, 0, 2]]
    got2 = get("attention", "numba")(q, k2, v2, causal=True)
    assert np.array_equal(got[4:], got2[4:]) and not np.array_equal(got[:4], got2[:4])


# --------------------------------------------------------------------------
# norms, activations, rope
# --------------------------------------------------------------------------


@st.composite
def rows_case(draw):
    shape = draw(st.sampled_from([(1,), (2, 1), (3, 7), (5, 64), (2, 3, 97), (1, 768)]))
    return shape, draw(dtypes), draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from([1.0, 1e-3, 1e4]))


@given(rows_case())
def test_layer_norm_within_bound(case):
    shape, dt, seed, scale = case
    rng = np.random.default_rng(seed)
    D = shape[-1]
    x = (randn(rng, shape, F64, scale) + rng.normal() * scale).astype(dt)   # with a common offset
    w, b = randn(rng, (D,), dt), randn(rng, (D,), dt)
    eps = 1e-5
    got = get("layer_norm", "numba")(x, w, b, eps)
    ref = L.layer_norm(f64(x), f64(w), f64(b), float(dt(eps)))
    record(assert_within(got, ref, C.layer_norm_bound(x, w, b, eps, dt), f"layer_norm {shape}"))


@given(rows_case())
def test_rms_norm_within_bound(case):
    shape, dt, seed, scale = case
    rng = np.random.default_rng(seed)
    x, w = randn(rng, shape, dt, scale), randn(rng, (shape[-1],), dt)
    got = get("rms_norm", "numba")(x, w, 1e-6)
    ref = L.rms_norm(f64(x), f64(w), float(dt(1e-6)))
    record(assert_within(got, ref, C.rms_norm_bound(x, w, 1e-6, dt), f"rms_norm {shape}"))


SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 88.0, -88.0, -88.8, -95.0, -104.0, 3e38, -3e38,
            np.inf, -np.inf, np.nan]


@st.composite
def elementwise_case(draw):
    n = draw(sizes(1, 300))
    return n, draw(dtypes), draw(st.integers(0, 2 ** 32 - 1)), draw(st.sampled_from([1.0, 10.0, 1e4]))


def elementwise_input(case):
    n, dt, seed, scale = case
    rng = np.random.default_rng(seed)
    x = randn(rng, (n,), F64, scale)
    k = rng.integers(0, len(SPECIALS) + 1)
    x[: min(k, n)] = rng.choice(SPECIALS, min(k, n))
    return x.astype(dt), dt


@given(elementwise_case())
@example((len(SPECIALS), F32, 0, 1.0))
def test_gelu_tanh_within_bound(case):
    x, dt = elementwise_input(case)
    if case[0] == len(SPECIALS):
        x = np.array(SPECIALS, dt)
    with np.errstate(all="ignore"):
        ref = L.gelu_tanh(f64(x))
    got = get("gelu_tanh", "numba")(x)
    record(assert_within(got, ref, C.gelu_tanh_bound(np.nan_to_num(x), ref, dt), "gelu_tanh"))


@given(elementwise_case())
@example((len(SPECIALS), F32, 0, 1.0))
def test_silu_within_bound(case):
    x, dt = elementwise_input(case)
    if case[0] == len(SPECIALS):
        x = np.array(SPECIALS, dt)
    with np.errstate(all="ignore"):
        ref = L.silu(f64(x))
    got = get("silu", "numba")(x)
    record(assert_within(got, ref, C.silu_bound(x, ref, dt), "silu"))


def float32_sweep(limit, stride):
    """Every stride-th float32 of [-limit, limit] by bit pattern (both signs), plus the specials."""
    mags = np.arange(0, F32(limit).view(np.uint32), stride, dtype=np.uint32)
    return np.concatenate([mags.view(F32), (mags | np.uint32(0x80000000)).view(F32), np.array(SPECIALS, F32)])


@pytest.mark.parametrize("op", ["silu", "gelu_tanh"])
def test_activation_float32_dense_sweep(op):
    # ~1.1M float32 values over [-110, 110]: the exp's polynomial over many binades and the
    # gradual underflow of e^-|z| (silu(x) for x in [-91.5, -87.3] is normal, e^x is not)
    x = float32_sweep(110.0, 2011)
    with np.errstate(all="ignore"):
        ref = getattr(L, op)(f64(x))
    bound = C.silu_bound(x, ref, F32) if op == "silu" else C.gelu_tanh_bound(np.nan_to_num(x), ref, F32)
    assert_within(get(op, "numba")(x), ref, bound, f"{op} float32 sweep")


@pytest.mark.parametrize("op", ["silu", "gelu_tanh"])
def test_activation_float32_kernel_vectorises(op):
    # Not a timing test: the float32 loop must compile to vector float arithmetic with no
    # float64 in it.  A Python literal (float64 unification -> libm exp) or a per-element
    # ZeroDivisionError check (error_model="python") both fall back to scalar code.
    import numba
    from numba import types
    kern = getattr(nk, f"_{op}_kernel")
    opts = {k: v for k, v in kern.targetoptions.items() if k != "nopython"}
    fresh = numba.njit(**{**opts, "cache": False})(kern.py_func)   # cached code has no IR
    sig = (types.float32[::1], types.float32[::1])
    fresh.compile(sig)
    ir = fresh.inspect_llvm(sig)
    body = ir[ir.index("define"):ir.index("define", ir.index("define") + 1)]   # the kernel, not its wrappers
    assert "double" not in body, f"{op}: float64 arithmetic in the float32 kernel"
    assert "ZeroDivisionError" not in ir, f"{op}: per-element division-by-zero check"
    assert re.search(r"fdiv[^\n]*<\d+ x float>", body), f"{op}: the division is not vectorised"


def test_activations_keep_shape_of_views():
    x = np.linspace(-5, 5, 60, dtype=F32).reshape(6, 10)[:, ::3]
    for op, f in (("gelu_tanh", L.gelu_tanh), ("silu", L.silu)):
        got = get(op, "numba")(x)
        assert got.shape == x.shape and got.dtype == F32
        np.testing.assert_array_equal(got, get(op, "numba")(np.ascontiguousarray(x)))


@st.composite
def rope_case(draw):
    H, T = draw(sizes(1, 5)), draw(sizes(1, 20))
    D = 2 * draw(sizes(1, 40))
    start = draw(st.sampled_from([0, 7, 1000, 100_000]))
    return H, T, D, start, draw(st.booleans()), draw(st.sampled_from([10000.0, 500000.0])), draw(dtypes), \
        draw(st.integers(0, 2 ** 32 - 1))


@given(rope_case())
@example((1, 1, 2, 0, False, 10000.0, F32, 0))
def test_rope_within_bound(case):
    H, T, D, start, interleaved, theta, dt, seed = case
    rng = np.random.default_rng(seed)
    x = randn(rng, (H, T, D), dt)
    pos = np.arange(start, start + T)
    got = get("rope", "numba")(x, pos, theta, interleaved)
    ref = L.rope(f64(x), pos, theta, interleaved)
    record(assert_within(got, ref, C.rope_bound(x, pos, theta, dt), f"rope {H}x{T}x{D} interleaved={interleaved}"))


# --------------------------------------------------------------------------
# bad input: clear exceptions naming the argument
# --------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    f32 = lambda *s: np.ones(s, F32)  # noqa: E731
    mm, sm, at = get("matmul", "numba"), get("softmax", "numba"), get("attention", "numba")
    with pytest.raises(TypeError, match="'a'"):
        mm([[1.0]], f32(1, 1))
    with pytest.raises(TypeError, match="'b'"):
        mm(f32(2, 2), np.ones((2, 2), np.int32))
    with pytest.raises(TypeError, match="'b'"):
        mm(f32(2, 2), np.ones((2, 2), F64))
    with pytest.raises(ValueError, match="inner sizes"):
        mm(f32(2, 3), f32(4, 2))
    with pytest.raises(ValueError, match="'a'"):
        mm(f32(2), f32(2, 2))
    with pytest.raises(TypeError, match="'x'"):
        sm(np.ones(3, np.float16))
    with pytest.raises(ValueError, match="H=3"):
        at(f32(3, 2, 4), f32(2, 2, 4), f32(2, 2, 4))
    with pytest.raises(ValueError, match="causal"):
        at(f32(2, 5, 4), f32(2, 3, 4), f32(2, 3, 4), causal=True)
    with pytest.raises(ValueError, match="head width"):
        at(f32(2, 5, 4), f32(2, 5, 3), f32(2, 5, 3))
    with pytest.raises(ValueError, match="needs at least one key"):
        at(f32(2, 5, 4), f32(2, 0, 4), f32(2, 0, 4))
    with pytest.raises(TypeError, match="'scale'"):
        at(f32(2, 5, 4), f32(2, 5, 4), f32(2, 5, 4), scale="x")
    with pytest.raises(ValueError, match="'w'|w and b"):
        get("layer_norm", "numba")(f32(2, 4), f32(3), f32(4))
    with pytest.raises(TypeError, match="'w'"):
        get("rms_norm", "numba")(f32(2, 4), np.ones(4, F64))
    with pytest.raises(ValueError, match="even"):
        get("rope", "numba")(f32(1, 2, 3), np.arange(2))
    with pytest.raises(ValueError, match="'positions'"):
        get("rope", "numba")(f32(1, 2, 4), np.arange(3))
    with pytest.raises(TypeError, match="'x'"):
        get("silu", "numba")(np.arange(4))


def test_empty_inputs():
    assert get("softmax", "numba")(np.ones((0, 5), F32)).shape == (0, 5)
    assert get("attention", "numba")(np.ones((2, 0, 4), F32), np.ones((1, 3, 4), F32),
                                     np.ones((1, 3, 4), F32)).shape == (2, 0, 4)
    assert get("silu", "numba")(np.ones(0, F32)).shape == (0,)
    assert math.isclose(float(get("silu", "numba")(np.ones(1, F32))[0]), 1 / (1 + math.exp(-1)), rel_tol=1e-6)


def test_compiled_code_is_cached_outside_the_package(tmp_path):
    """Numba's default cache is the __pycache__ beside the source: in site-packages, where
    `pip uninstall` left it behind and the leftover `refimpl/` directory shadowed a later
    editable install.  Our kernels cache under the user's cache directory, or under the
    NUMBA_CACHE_DIR a user set, or, when the cache directory cannot be made, in a private
    temporary one (fresh interpreters: Numba reads the settings at start-up)."""
    import os
    import refimpl
    package = os.path.dirname(refimpl.__file__)
    code = ("import numpy as np, numba, refimpl.kernels.numba_kernels as nk\n"
            "from refimpl.kernels import get\n"
            "get('silu', 'numba')(np.ones(8, np.float32))\n"
            "ds = [v for v in vars(nk).values() if isinstance(v, numba.core.registry.CPUDispatcher)]\n"
            "print(len(ds), *sorted({d._cache._cache_path for d in ds}), sep='\\n')\n")
    (tmp_path / "a_file").write_text("")            # XDG_CACHE_HOME under a file: no cache dir there
    for env, want in (({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, tmp_path / "xdg" / "refimpl" / "numba"),
                      ({"NUMBA_CACHE_DIR": str(tmp_path / "mine")}, tmp_path / "mine"),
                      ({"XDG_CACHE_HOME": str(tmp_path / "a_file"), "TMPDIR": str(tmp_path)},
                       tmp_path / "refimpl-numba-")):
        clean = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "TMPDIR")}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={**clean, **env})
        assert r.returncode == 0, r.stderr
        n, *paths = r.stdout.split()
        assert int(n) > 10 and len(paths) == 1 and paths[0].startswith(str(want)), r.stdout
        assert not paths[0].startswith(package)
        assert any(f.endswith(".nbi") for f in os.listdir(paths[0]))   # silu's entry was written there
