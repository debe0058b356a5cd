"""C kernels (backend "c") for softmax, attention, norms, activations and RoPE, against the
float64 oracle with the error bounds of refimpl.kernels.contracts, on every SIMD path this CPU
runs (cdispatch.forced_path).  No timing here."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import currently_in_test_context, example, given, settings, target
from hypothesis import strategies as st

from refimpl._kernels import ffi, lib
from refimpl.kernels import c_ops
from refimpl.kernels import contracts as C
from refimpl.kernels import registry
from refimpl.kernels.cdispatch import forced_path, runnable_paths
from refimpl.oracle import layers as L
from refimpl.verify.compare import assert_within


PATHS = runnable_paths()
F32 = np.float32
INF = float("inf")


def f64(a):
    return np.asarray(a, dtype=np.float64)


def check(got, want, bound, what):
    s = assert_within(got, want, bound, what)
    if currently_in_test_context():
        target(float(s.bound_ratio), label=what.split()[0])
    return s


def offset4(a):
    """A copy of `a` whose data starts 4 bytes into its buffer (still float32-aligned)."""
    buf = np.empty(a.size + 1, dtype=a.dtype)
    view = buf[1:].reshape(a.shape)
    view[...] = a
    assert view.ctypes.data % 8 == (buf.ctypes.data + 4) % 8
    return view


def unaligned(a):
    """A copy of `a` at byte offset 1 (numpy marks it unaligned: the wrapper must copy it)."""
    raw = bytearray(a.nbytes + 1)
    view = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


def test_runnable_paths_start_with_portable_and_reach_the_best():
    from refimpl.kernels.cdispatch import simd_path
    best = simd_path()                    # the automatic choice
    assert PATHS[0] == "portable"         # every CPU runs it (as "neon" on aarch64)
    assert PATHS[-1] == ("portable" if best == "neon" else best)


def test_registered():
    for op in ("softmax", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu", "rope"):
        assert registry.get(op, "c") is getattr(c_ops, op)
        assert callable(getattr(c_ops, op).prepare)


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------

SPECIAL_LOGITS = [-INF, 88.0, -88.0, 88.7, -87.4, 3e38, -3e38, 0.0]


@st.composite
def logits(draw):
    R = draw(st.integers(1, 4))
    N = draw(st.one_of(st.integers(1, 70), st.sampled_from([127, 129, 255, 4095, 4097, 9000])))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    spread = draw(st.sampled_from([1.0, 30.0, 1e3, 1e38]))
    x = np.clip(rng.standard_normal((R, N)) * spread, -3.4e38, 3.4e38).astype(F32)
    n_special = draw(st.integers(0, 4))
    for _ in range(n_special):
        x[rng.integers(R), rng.integers(N)] = draw(st.sampled_from(SPECIAL_LOGITS))
    if draw(st.booleans()):
        x[rng.integers(R)] = -INF                    # a fully masked row
    return x


def _softmax_check(x, what):
    got = c_ops.softmax(x)
    want = L.softmax(f64(x), axis=-1)
    check(got, want, C.softmax_bound(x, want, F32), what)
    return got


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150)
@given(x=logits())
@example(x=np.array([[1.5]], F32))
@example(x=np.full((2, 5), -INF, F32))
@example(x=np.array([[88.0, -88.0, 87.9, 0.0], [-88.0, -87.9, -88.5, -104.0]], F32))
@example(x=np.array([[3e38, -3e38, 3.4e38, 1.0], [-3.4e38, -3e38, -3.4e38, -3.4e38]], F32))
@example(x=np.array([[-INF, 2.0, -INF, 1.0, -INF]], F32))
def test_softmax_matches_oracle(path, x):
    with forced_path(path):
        got = _softmax_check(x, f"softmax[{path}] {x.shape}")
    masked = np.isneginf(x)
    clean = ~np.any(np.isnan(x) | np.isposinf(x), axis=1, keepdims=True)   # rows that are not NaN
    assert np.all(got[masked & clean] == 0.0)        # -inf -> exactly 0
    assert np.all(got[np.all(masked, axis=1)] == 0.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(3, 1), (2, 17), (5, 4096), (2, 4097), (1, 32000), (2, 70001)])
def test_softmax_shapes(path, shape):
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 20).astype(F32)
    x[0, -1] = -INF
    with forced_path(path):
        _softmax_check(x, f"softmax[{path}] {shape}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N", [1, 5, 16, 33, 5000])
def test_softmax_nan_and_inf_rows(path, N):
    x = np.zeros((4, N), F32)
    x[0, N // 2] = np.nan                          # NaN -> NaN row
    x[1, :] = -INF
    x[1, 0] = np.nan                               # masked row holding a NaN -> NaN row
    x[2, N - 1] = INF                              # +inf -> NaN row (inf - inf), as the oracle
    x[3, :] = -INF                                 # fully masked -> zeros
    with forced_path(path), np.errstate(invalid="ignore"):
        got = c_ops.softmax(x)
        want = L.softmax(f64(x), axis=-1)
    assert np.isnan(got[:3]).all() and np.isnan(want[:3]).all()
    assert (got[3] == 0).all() and (want[3] == 0).all()


def _at_offset(buf, off, shape):
    """The view of `buf` (64-byte aligned float32) starting `off` floats in."""
    n = int(np.prod(shape))
    return buf[off:off + n].reshape(shape)


def _aligned_buffer(nfloats):
    raw = np.empty(nfloats + 16, F32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + nfloats]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N", [5, 37, 4096, 4100])
def test_softmax_every_alignment(path, N):
    """The kernel peels a head so the vector body's accesses are aligned: every float offset of x
    and out within a 64-byte line (independently), special values at the ends of the peeled head
    and of the tail, and nothing written outside out."""
    rng = np.random.default_rng(N)
    R = 5
    x0 = (rng.standard_normal((R, N)) * 20).astype(F32)
    x0[0, 0] = x0[0, -1] = -INF                    # -inf -> exactly 0, in the head and the tail
    x0[1, min(1, N - 1)] = np.nan                  # NaN in a head -> NaN row
    x0[2, :] = -INF                                # fully masked -> zeros
    x0[3, min(11, N - 2)] = 300.0                  # the row max inside a head (a missed max
    x0[4, N - 1] = 300.0                           # overflows exp), and inside a tail
    want = L.softmax(f64(x0), axis=-1)
    bound = C.softmax_bound(x0, want, F32)
    xbuf, obuf = _aligned_buffer(R * N + 16), _aligned_buffer(R * N + 32)
    P = lambda a: ffi.from_buffer("float[]", a)    # noqa: E731
    with forced_path(path), np.errstate(invalid="ignore"):
        for ox in range(16):
            for oy in sorted({0, 4, ox, (ox + 7) % 16}):
                x = _at_offset(xbuf, ox, (R, N))
                x[...] = x0
                obuf[...] = 7.0                    # a canary around out
                out = _at_offset(obuf, oy + 8, (R, N))
                lib.rf_softmax_f32(P(out), P(x), R, N)
                what = f"softmax[{path}] ({R},{N}) x at +{ox} floats, out at +{oy}"
                assert_within(out, want, bound, what)
                assert (out[0, [0, -1]] == 0).all() and (out[2] == 0).all(), what
                assert (obuf[:oy + 8] == 7.0).all() and (obuf[oy + 8 + R * N:] == 7.0).all(), what
                np.testing.assert_array_equal(x, x0, err_msg=what)


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


@st.composite
def attention_case(draw):
    Hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 4, "H"]))
    G = draw(st.integers(1, 6)) if group == "H" else group
    H = Hkv * G
    if group == "H":
        Hkv = 1
        H = G
    causal = draw(st.booleans())
    Lk = draw(st.one_of(st.integers(1, 70), st.sampled_from([97, 128, 129, 191])))
    Lq = draw(st.one_of(st.just(1), st.integers(1, Lk if causal else 100)))
    if causal:
        Lq = min(Lq, Lk)
    D = draw(st.sampled_from([1, 3, 8, 16, 17, 31, 64, 65, 80]))
    seed = draw(st.integers(0, 2**32 - 1))
    mag = draw(st.sampled_from([0.5, 2.0, 6.0]))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.05, 1.0])))
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((H, Lq, D)) * mag).astype(F32)
    k = (rng.standard_normal((Hkv, Lk, D)) * mag).astype(F32)
    v = rng.standard_normal((Hkv, Lk, D)).astype(F32)
    return q, k, v, causal, scale


def _attention_check(q, k, v, causal, scale, what):
    got = c_ops.attention(q, k, v, causal=causal, scale=scale)
    mask = L.causal_mask(q.shape[1], k.shape[1]) if causal else None
    want = L.multi_head_attention(f64(q), f64(k), f64(v), mask, scale)
    check(got, want, C.attention_bound(q, k, v, causal, scale, F32), what)
    return got


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=100)
@given(case=attention_case())
@example(case=(np.ones((1, 1, 1), F32), np.ones((1, 1, 1), F32), np.full((1, 1, 1), 2.0, F32), True, None))
def test_attention_matches_oracle(path, case):
    q, k, v, causal, scale = case
    with forced_path(path):
        _attention_check(q, k, v, causal, scale,
                         f"attention[{path}] q{q.shape} k{k.shape} causal={causal} scale={scale}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("H,Hkv,Lq,Lk,D,causal", [
    (12, 12, 200, 200, 64, True),      # prefill, several query blocks and key tiles
    (32, 8, 1, 1024, 64, True),        # decode with a KV cache, GQA 4
    (32, 8, 1, 1024, 64, False),
    (4, 2, 37, 300, 64, True),         # Lq < Lk causal (chunked prefill)
    (6, 1, 50, 77, 128, False),        # MQA
    (2, 2, 49, 65, 96, True),          # one past every tile
    # the few-rows (decode) path
    (8, 1, 1, 3000, 64, True),         # MQA decode, long cache: scratch from malloc
    (16, 2, 1, 1500, 80, False),
    (4, 1, 2, 1100, 128, True),        # 8 rows: 2 positions x 4 heads
    (32, 8, 1, 60, 64, True),          # the GQA decode shape of the benchmark
    (6, 6, 1, 250, 48, True),          # the MHA decode shape of the benchmark
])
def test_attention_shapes(path, H, Hkv, Lq, Lk, D, causal):
    rng = np.random.default_rng(H * 1000 + Lk)
    q = rng.standard_normal((H, Lq, D)).astype(F32)
    k = rng.standard_normal((Hkv, Lk, D)).astype(F32)
    v = rng.standard_normal((Hkv, Lk, D)).astype(F32)
    with forced_path(path):
        _attention_check(q, k, v, causal, None, f"attention[{path}] {(H, Hkv, Lq, Lk, D, causal)}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Hkv,Lk,S_max,Lq", [(2, 10, 64, 1), (8, 300, 301, 1), (1, 77, 80, 5), (4, 1, 9, 1)])
def test_attention_reads_a_kv_cache_slice_in_place(path, Hkv, Lk, S_max, Lq):
    """k, v = cache[:, :Lk] of a (Hkv, S_max, D) cache: read with a head stride, not copied."""
    rng = np.random.default_rng(Lk)
    D, H = 32, 2 * Hkv
    cache_k = rng.standard_normal((Hkv, S_max, D)).astype(F32)
    cache_v = rng.standard_normal((Hkv, S_max, D)).astype(F32)
    q = rng.standard_normal((H, Lq, D)).astype(F32)
    k, v = cache_k[:, :Lk], cache_v[:, :Lk]
    assert c_ops._kv_head_stride(k, v) == S_max * D
    with forced_path(path):
        got = c_ops.attention(q, k, v, causal=True)
        assert (got == c_ops.attention(q, k.copy(), v.copy(), causal=True)).all()
        _attention_check(q, k, v, True, None, f"attention[{path}] cache slice {(Hkv, Lk, S_max, Lq)}")
    # views that do not fit the rule are copied, with the same result
    assert c_ops._kv_head_stride(k, cache_v[:, 1:Lk + 1]) is not None      # same strides: fine
    assert c_ops._kv_head_stride(k[:, :, ::2], v[:, :, ::2]) is None        # rows not contiguous
    if S_max != Lk:
        assert c_ops._kv_head_stride(k, v.copy()) is None                   # k and v strided differently


@pytest.mark.parametrize("path", PATHS)
def test_attention_large_scores(path):
    """Scores of several hundred: the online softmax must rescale without overflow."""
    rng = np.random.default_rng(7)
    q = (rng.standard_normal((2, 60, 16)) * 8).astype(F32)
    k = (rng.standard_normal((2, 150, 16)) * 8).astype(F32)
    k[:, 100] = q[:, -1] * 3                           # one dominant key late in the sequence
    v = rng.standard_normal((2, 150, 16)).astype(F32)
    with forced_path(path):
        _attention_check(q, k, v, True, 1.0, f"attention[{path}] large scores")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Lq", [1, 70])            # the few-rows path and the flash path
def test_attention_scale_q_overflowing_where_the_scores_do_not(path, Lq):
    """q = 1e30 with scale = 1e9: q scale overflows float32 but the scores q.k scale are ~1e9.
    The C kernel scaled q before the dot and returned NaN; it now scales the scores then."""
    rng = np.random.default_rng(11)
    q = (rng.standard_normal((4, Lq, 8)) * 1e30).astype(F32)
    k = (rng.standard_normal((2, 90, 8)) * 1e-30).astype(F32)
    v = rng.standard_normal((2, 90, 8)).astype(F32)
    with forced_path(path):
        _attention_check(q, k, v, True, 1e9, f"attention[{path}] scale q overflows, Lq={Lq}")
        _attention_check(q, k, v, False, 1e9, f"attention[{path}] scale q overflows, Lq={Lq}, not causal")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("Lq", [1, 70])
def test_attention_overflow_fallback_is_per_row(path, Lq):
    """Scaling the scores after the dot is decided per row: one head's overflowing q switched a
    whole block of rows, so head 0's bits depended on head 1's values (differences of 5e-7)."""
    rng = np.random.default_rng(5)
    q = (rng.standard_normal((2, Lq, 8)) * 3e28).astype(F32)
    k = (rng.standard_normal((2, 90, 8)) * 1e-37).astype(F32)
    v = rng.standard_normal((2, 90, 8)).astype(F32)
    with forced_path(path):
        before = c_ops.attention(q, k, v, scale=1e9)
        q[1, -1, 0] = 1e30                                 # head 1's last row now overflows scale q
        after = c_ops.attention(q, k, v, scale=1e9)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1, :-1], after[1, :-1])


@pytest.mark.parametrize("path", PATHS)
def test_attention_nan_propagates(path):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 5, 16)).astype(F32)
    k = rng.standard_normal((1, 9, 16)).astype(F32)
    v = rng.standard_normal((1, 9, 16)).astype(F32)
    q[1, 2, 3] = np.nan
    with forced_path(path):
        got = c_ops.attention(q, k, v)
    assert np.isnan(got[1, 2]).all()
    assert np.isfinite(np.delete(got.reshape(10, 16), 7, axis=0)).all()


# --------------------------------------------------------------------------
# attention, the few-rows path: G Lq <= 8 query rows per kv head (decode, GQA decode, short chunks)
# take dot products along D with a horizontal-reduction tree, a two-pass softmax over an Lk-score
# buffer (on the stack, from malloc above 32 KiB) and P V along D (csrc/kernels/attention.c)
# --------------------------------------------------------------------------

FEW_ROWS = 8        # RF_ATT_FEW in csrc/kernels/attention.c


@st.composite
def few_rows_case(draw):  # -> (Hkv, G, Lq, Lk, D, causal, mag, scale, seed), G Lq <= FEW_ROWS
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, FEW_ROWS))
    Lq = draw(st.integers(1, FEW_ROWS // G))
    causal = draw(st.booleans())
    Lk = draw(st.one_of(st.integers(Lq if causal else 1, 40), st.sampled_from([63, 64, 65, 257, 1100])))
    D = draw(st.sampled_from([1, 2, 7, 8, 15, 16, 17, 33, 48, 64, 65, 100, 128]))
    mag = draw(st.sampled_from([0.5, 2.0, 6.0]))
    scale = draw(st.one_of(st.none(), st.sampled_from([0.05, 1.0])))
    return Hkv, G, Lq, Lk, D, causal, mag, scale, draw(st.integers(0, 2**32 - 1))


def _few_rows_arrays(Hkv, G, Lq, Lk, D, mag, seed):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((Hkv * G, Lq, D)) * mag).astype(F32)
    k = (rng.standard_normal((Hkv, Lk, D)) * mag).astype(F32)
    v = rng.standard_normal((Hkv, Lk, D)).astype(F32)
    return q, k, v


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=80)
@given(case=few_rows_case())
@example(case=(1, 1, 1, 1, 1, False, 2.0, None, 0))        # one row, one key, D = 1
@example(case=(2, 8, 1, 17, 17, True, 2.0, None, 1))       # 8 rows: a partial key step and a partial D vector
@example(case=(1, 3, 1, 16, 33, False, 6.0, 1.0, 2))       # R = 3 does not divide the vector width
@example(case=(1, 1, 8, 8, 16, True, 2.0, None, 3))        # causal Lq = Lk = 8: row 0 sees one key
@example(case=(3, 2, 4, 5, 65, True, 6.0, 1.0, 4))         # causal, rows of two heads x 4 positions
@example(case=(1, 8, 1, 1100, 64, False, 0.5, None, 5))    # 8 rows x 1100 keys: scores from malloc
@example(case=(1, 1, 1, 63, 48, True, 6.0, 1.0, 6))        # scores of several hundred (mag 6, scale 1)
def test_attention_few_rows_match_oracle(path, case):
    Hkv, G, Lq, Lk, D, causal, mag, scale, seed = case
    q, k, v = _few_rows_arrays(Hkv, G, Lq, Lk, D, mag, seed)
    assert G * Lq <= FEW_ROWS
    with forced_path(path):
        _attention_check(q, k, v, causal, scale, f"attention few-rows[{path}] q{q.shape} k{k.shape} "
                                                 f"causal={causal} scale={scale}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("D", [16, 37])
def test_attention_few_rows_nan_stays_in_its_row(path, D):
    """The dot products of several rows and keys share one reduction tree: a NaN in one query row
    must reach only that row, a NaN in one key only the rows of its kv head."""
    rng = np.random.default_rng(D)
    q = rng.standard_normal((8, 1, D)).astype(F32)       # Hkv = 2, G = 4: 4 rows per kv head
    k = rng.standard_normal((2, 21, D)).astype(F32)
    v = rng.standard_normal((2, 21, D)).astype(F32)
    q[1, 0, D - 1] = np.nan
    with forced_path(path):
        got = c_ops.attention(q, k, v)
    assert np.isnan(got[1]).all()
    assert np.isfinite(np.delete(got, 1, axis=0)).all()
    q[1, 0, D - 1] = 0.0
    k[1, 7, 3] = np.nan                                  # kv head 1 serves query heads 4..7
    with forced_path(path):
        got = c_ops.attention(q, k, v)
    assert np.isnan(got[4:]).all() and np.isfinite(got[:4]).all()


# --------------------------------------------------------------------------
# layer_norm, rms_norm
# --------------------------------------------------------------------------


@st.composite
def norm_case(draw):
    T = draw(st.integers(1, 5))
    D = draw(st.one_of(st.integers(1, 70), st.sampled_from([127, 768, 4097])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e20]))
    offset = draw(st.sampled_from([0.0, 1.0, 100.0]))
    x = (rng.standard_normal((T, D)) * mag + offset * mag).astype(F32)
    w = rng.standard_normal(D).astype(F32)
    b = rng.standard_normal(D).astype(F32)
    eps = draw(st.sampled_from([1e-5, 1e-6, 0.0, 0.1]))
    return x, w, b, eps


@pytest.mark.parametrize("path", PATHS)
@given(case=norm_case())
@example(case=(np.array([[3.0]], F32), np.array([2.0], F32), np.array([0.5], F32), 1e-5))
@example(case=(np.full((2, 9), 7.0, F32), np.ones(9, F32), np.zeros(9, F32), 1e-5))   # zero variance
def test_norms_match_oracle(path, case):
    x, w, b, eps = case
    # eps = 0 with a constant row is 0/0: NaN in the oracle and in the kernel alike
    with forced_path(path), np.errstate(divide="ignore", invalid="ignore"):
        got = c_ops.layer_norm(x, w, b, eps)
        check(got, L.layer_norm(f64(x), f64(w), f64(b), eps), C.layer_norm_bound(x, w, b, eps, F32),
              f"layer_norm[{path}] {x.shape} eps={eps}")
        if eps > 0 or np.all(np.any(x != 0, axis=1)):
            got = c_ops.rms_norm(x, w, eps)
            check(got, L.rms_norm(f64(x), f64(w), eps), C.rms_norm_bound(x, w, eps, F32),
                  f"rms_norm[{path}] {x.shape} eps={eps}")


# --------------------------------------------------------------------------
# gelu_tanh, silu
# --------------------------------------------------------------------------

SPECIAL_X = [0.0, -0.0, INF, -INF, np.nan, 1e-40, -1e-40, 88.5, -88.5, -87.0, -103.0, -105.0,
             -9.0, 9.0, 1e13, -1e13, 3.4e38, -3.4e38]


@st.composite
def act_input(draw):
    shape = draw(st.sampled_from([(1,), (7,), (3, 5), (2, 3, 17), (1000,), (33, 65)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    x = (rng.standard_normal(shape) * scale).astype(F32)
    flat = x.reshape(-1)
    for _ in range(draw(st.integers(0, 3))):
        flat[rng.integers(flat.size)] = draw(st.sampled_from(SPECIAL_X))
    return x


def _act_check(name, x, what):
    with np.errstate(all="ignore"):
        want = getattr(L, name)(f64(x))
    got = getattr(c_ops, name)(x)
    assert got.shape == x.shape
    bound = C.gelu_tanh_bound(x, want, F32) if name == "gelu_tanh" else C.silu_bound(x, want, F32)
    check(got, want, bound, what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["gelu_tanh", "silu"])
@given(x=act_input())
@example(x=np.array(SPECIAL_X, F32))
@example(x=np.linspace(-110, 30, 2801).astype(F32))
def test_activations_match_oracle(path, name, x):
    with forced_path(path):
        _act_check(name, x, f"{name}[{path}] {x.shape}")


# --------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------


@st.composite
def rope_case(draw):
    H = draw(st.integers(1, 4))
    T = draw(st.integers(1, 20))
    D = 2 * draw(st.one_of(st.integers(1, 40), st.sampled_from([64])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((H, T, D)).astype(F32)
    pmax = draw(st.sampled_from([10, 4096, 100000]))
    positions = rng.integers(0, pmax, size=T)
    theta = draw(st.sampled_from([10000.0, 500000.0, 10.0]))
    return x, positions, theta, draw(st.booleans())


@pytest.mark.parametrize("path", PATHS)
@given(case=rope_case())
@example(case=(np.ones((1, 1, 2), F32), np.array([0]), 10000.0, False))
@example(case=(np.ones((2, 3, 4), F32), np.array([0, 1, 2]), 10000.0, True))
def test_rope_matches_oracle(path, case):
    x, positions, theta, interleaved = case
    with forced_path(path):
        got = c_ops.rope(x, positions, theta, interleaved)
    want = L.rope(f64(x), positions, theta, interleaved)
    check(got, want, C.rope_bound(x, positions, theta, F32), f"rope[{path}] {x.shape} il={interleaved}")


# --------------------------------------------------------------------------
# layouts: non-contiguous and misaligned inputs, prepare().run(), the naive _ref kernels
# --------------------------------------------------------------------------


def _layouts(a):
    yield "contiguous", a
    yield "offset4", offset4(a)
    yield "unaligned", unaligned(a)
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    yield "strided", big[..., ::2]


def _cases():
    rng = np.random.default_rng(11)
    x2 = rng.standard_normal((5, 37)).astype(F32)
    q = rng.standard_normal((4, 9, 24)).astype(F32)
    k = rng.standard_normal((2, 13, 24)).astype(F32)
    v = rng.standard_normal((2, 13, 24)).astype(F32)
    w = rng.standard_normal(37).astype(F32)
    b = rng.standard_normal(37).astype(F32)
    xr = rng.standard_normal((2, 6, 10)).astype(F32)
    pos = np.arange(3, 9)
    return {
        "softmax": ((x2,), {}),
        "attention": ((q, k, v), {"causal": True}),
        "layer_norm": ((x2, w, b), {}),
        "rms_norm": ((x2, w), {}),
        "gelu_tanh": ((x2,), {}),
        "silu": ((x2,), {}),
        "rope": ((xr, pos), {"interleaved": True}),
    }


@pytest.mark.parametrize("op", sorted(_cases()))
def test_layouts_and_prepare(op):
    args, kw = _cases()[op]
    fn = getattr(c_ops, op)
    want = fn(*args, **kw)
    for i, a in enumerate(args):
        if a.dtype != F32:
            continue
        for name, alt in _layouts(a):
            new = list(args)
            new[i] = alt
            got = fn(*new, **kw)
            assert got.flags.c_contiguous and got is not alt
            np.testing.assert_array_equal(got, want, err_msg=f"{op}: argument {i} {name}")
    call = fn.prepare(*args, **kw)
    assert call.fn_addr and call.ctx_addr
    out = call.run()
    assert out is call.out
    np.testing.assert_array_equal(out, want)
    call.out[...] = np.nan
    np.testing.assert_array_equal(call.run(), want)   # runs again into the same buffer


def test_inputs_not_modified():
    args, kw = _cases()["attention"]
    before = [a.copy() for a in args]
    c_ops.attention(*args, **kw)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(a, b)


def test_ref_kernels_match_oracle():
    rng = np.random.default_rng(5)
    P = lambda a: ffi.from_buffer("float[]", a)  # noqa: E731
    x = (rng.standard_normal((3, 50)) * 10).astype(F32)
    x[1, 4] = -INF
    out = np.empty_like(x)
    lib.rf_softmax_f32_ref(P(out), P(x), 3, 50)
    want = L.softmax(f64(x))
    assert_within(out, want, C.softmax_bound(x, want, F32, exp_ulps=1), "softmax_ref")
    q = rng.standard_normal((4, 7, 16)).astype(F32)
    k = rng.standard_normal((2, 11, 16)).astype(F32)
    v = rng.standard_normal((2, 11, 16)).astype(F32)
    o = np.empty_like(q)
    assert lib.rf_attention_f32_ref(P(o), P(q), P(k), P(v), 4, 2, 7, 11, 16, 0.25, 1) == 0
    assert_within(o, L.multi_head_attention(f64(q), f64(k), f64(v), L.causal_mask(7, 11), 0.25),
                  C.attention_bound(q, k, v, True, 0.25, F32), "attention_ref")
    w = rng.standard_normal(50).astype(F32)
    b = rng.standard_normal(50).astype(F32)
    lib.rf_layer_norm_f32_ref(P(out), P(x[[0, 2]].copy()), P(w), P(b), 2, 50, 1e-5)
    assert_within(out[:2], L.layer_norm(f64(x[[0, 2]]), f64(w), f64(b), 1e-5),
                  C.layer_norm_bound(x[[0, 2]], w, b, 1e-5, F32), "layer_norm_ref")
    xs = x[[0, 2]].copy()
    lib.rf_rms_norm_f32_ref(P(out), P(xs), P(w), 2, 50, 1e-6)
    assert_within(out[:2], L.rms_norm(f64(xs), f64(w), 1e-6), C.rms_norm_bound(xs, w, 1e-6, F32), "rms_norm_ref")
    for name, fn in (("gelu_tanh", lib.rf_gelu_tanh_f32_ref), ("silu", lib.rf_silu_f32_ref)):
        y = np.empty_like(xs)
        fn(P(y), P(xs), xs.size)
        want = getattr(L, name)(f64(xs))
        bound = C.gelu_tanh_bound(xs, want, F32) if name == "gelu_tanh" else C.silu_bound(xs, want, F32)
        assert_within(y, want, bound, f"{name}_ref")
    xr = rng.standard_normal((2, 5, 8)).astype(F32)
    pos = np.arange(10, 15, dtype=np.int64)
    yr = np.empty_like(xr)
    for il in (0, 1):
        assert lib.rf_rope_f32_ref(P(yr), P(xr), ffi.from_buffer("int64_t[]", pos), 2, 5, 8, 10000.0, il) == 0
        assert_within(yr, L.rope(f64(xr), pos, 10000.0, bool(il)), C.rope_bound(xr, pos, 10000.0, F32),
                      f"rope_ref il={il}")


def test_empty_inputs():
    assert c_ops.softmax(np.zeros((0, 4), F32)).shape == (0, 4)
    assert c_ops.silu(np.zeros((0,), F32)).shape == (0,)
    assert c_ops.attention(np.zeros((2, 0, 8), F32), np.zeros((1, 3, 8), F32),
                           np.zeros((1, 3, 8), F32)).shape == (2, 0, 8)
    assert c_ops.layer_norm(np.zeros((0, 5), F32), np.ones(5, F32), np.zeros(5, F32)).shape == (0, 5)
    assert c_ops.rope(np.zeros((1, 0, 4), F32), np.zeros(0, np.int64)).shape == (1, 0, 4)


# --------------------------------------------------------------------------
# bad input: a clear exception naming the argument
# --------------------------------------------------------------------------

X2 = np.zeros((2, 4), F32)
Q = np.zeros((4, 3, 8), F32)
KV = np.zeros((2, 5, 8), F32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: c_ops.softmax(X2.astype(np.float64)), TypeError, "'x'.*float64.*float32 only"),
    (lambda: c_ops.softmax(X2.astype(np.float16)), TypeError, "'x'"),
    (lambda: c_ops.softmax([[1.0, 2.0]]), TypeError, "'x'.*ndarray"),
    (lambda: c_ops.softmax(np.zeros((), F32)), ValueError, "'x'.*at least 1 dimension"),
    (lambda: c_ops.attention(Q.astype(np.float64), KV, KV), TypeError, "'q'.*float64"),
    (lambda: c_ops.attention(Q, KV, KV.astype(np.float64)), TypeError, "'v'"),
    (lambda: c_ops.attention(Q[0], KV, KV), ValueError, "'q'.*3-D"),
    (lambda: c_ops.attention(Q, np.zeros((3, 5, 8), F32), np.zeros((3, 5, 8), F32)), ValueError, "multiple"),
    (lambda: c_ops.attention(Q, np.zeros((2, 5, 7), F32), np.zeros((2, 5, 7), F32)), ValueError, "head width"),
    (lambda: c_ops.attention(Q, KV, np.zeros((2, 6, 8), F32)), ValueError, "'?v'? has shape"),
    (lambda: c_ops.attention(np.zeros((4, 6, 8), F32), KV, KV, causal=True), ValueError, "Lq <= Lk"),
    (lambda: c_ops.attention(np.zeros((4, 3, 0), F32), np.zeros((2, 5, 0), F32), np.zeros((2, 5, 0), F32)),
     ValueError, "head width D"),
    (lambda: c_ops.attention(Q, np.zeros((2, 0, 8), F32), np.zeros((2, 0, 8), F32)), ValueError, "at least one key"),
    (lambda: c_ops.attention(Q, KV, KV, scale=float("nan")), ValueError, "'scale'"),
    (lambda: c_ops.layer_norm(X2, np.ones(3, F32), np.zeros(4, F32)), ValueError, "'w'.*\\(4,\\)"),
    (lambda: c_ops.layer_norm(X2, np.ones(4, F32), np.zeros(5, F32)), ValueError, "'b'"),
    (lambda: c_ops.layer_norm(X2, np.ones(4, np.float64), np.zeros(4, F32)), TypeError, "'w'"),
    (lambda: c_ops.rms_norm(X2, np.ones(4, F32), eps=-1.0), ValueError, "'eps'"),
    (lambda: c_ops.rms_norm(np.zeros((2, 2, 4), F32), np.ones(2, F32)), ValueError, "'w'.*\\(4,\\)"),
    (lambda: c_ops.gelu_tanh(np.zeros(3, np.float64)), TypeError, "'x'.*float64"),
    (lambda: c_ops.silu(np.zeros(3, np.int32)), TypeError, "'x'"),
    (lambda: c_ops.rope(np.zeros((1, 2, 5), F32), [0, 1]), ValueError, "even"),
    (lambda: c_ops.rope(np.zeros((1, 2, 4), F32), [0.0, 1.0]), TypeError, "'positions'.*integers"),
    (lambda: c_ops.rope(np.zeros((1, 2, 4), F32), [0, 1, 2]), ValueError, "'positions'.*\\(2,\\)"),
    (lambda: c_ops.rope(np.zeros((1, 2, 4), F32), [0, 1], theta=0.0), ValueError, "'theta'"),
    (lambda: c_ops.rope(np.zeros(4, F32), [0]), ValueError, "'x'.*at least 2-D"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------
# softmax: the streaming route for large outputs (csrc/kernels/softmax.c: out > RF_SM_NT_BYTES =
# 4 MiB, rows of 1024 .. 65536 floats, AVX-512 / AVX2: pass A into two scratch rows, pass B
# streamed to out with non-temporal stores, 64-byte aligned by a per-chunk head)
# --------------------------------------------------------------------------

_SM_STREAM_SHAPES = [(33, 32000),   # 4.2 MB: rows a whole number of 64-byte lines, 8 chunks
                     (257, 4100)]   # 4.2 MB: rows 16 bytes longer than whole lines, a 4-float chunk


def _softmax_stream_input(R, N, last_masked):
    """Random logits with the special rows at the places the streaming route treats apart."""
    assert R * N * 4 > 4 << 20                     # above the kernel's threshold
    rng = np.random.default_rng(R * N)
    x = (rng.standard_normal((R, N)) * 20).astype(F32)
    x[0, :] = -INF                                 # fully masked first row: zeros, nothing pending
    x[3, N // 2] = np.nan                          # NaN -> NaN row
    x[4, N - 1] = INF                              # +inf -> NaN row
    x[5, :4096] = -INF                             # a fully masked chunk beside finite ones
    x[6, :4096] = -INF
    x[6, N - 1] = 300.0                            # ... and the row max in the last chunk
    x[7, :] = -INF
    x[7, 1] = np.nan                               # masked row holding a NaN -> NaN row
    x[8, 0] = x[8, -1] = -INF
    if last_masked:
        x[-1, :] = -INF                            # the previous row is scaled apart
    return x


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("R,N", _SM_STREAM_SHAPES)
@pytest.mark.parametrize("last_masked", [False, True])
def test_softmax_streaming_route(path, R, N, last_masked):
    """Large outputs match the oracle, every special value keeps its rule, and (rows of whole
    64-byte lines, where both routes split each chunk alike) the result is bit for bit that of
    the same rows computed two at a time (small outputs: the plain route)."""
    x = _softmax_stream_input(R, N, last_masked)
    with forced_path(path), np.errstate(invalid="ignore"):
        got = c_ops.softmax(x)
        want = L.softmax(f64(x), axis=-1)
        if N * 4 % 64 == 0:                        # out and x 16 bytes past a line, as NumPy's
            P = lambda a: ffi.from_buffer("float[]", a)    # noqa: E731
            xs, whole, pieces = (_at_offset(_aligned_buffer(R * N + 16), 4, (R, N)) for _ in range(3))
            xs[...] = x
            lib.rf_softmax_f32(P(whole), P(xs), R, N)
            for r in range(0, R, 2):
                lib.rf_softmax_f32(P(pieces[r:r + 2]), P(xs[r:r + 2]), min(2, R - r), N)
            np.testing.assert_array_equal(whole, pieces)
    nan_rows = np.zeros(R, bool)
    nan_rows[[3, 4, 7]] = True
    assert np.isnan(got[nan_rows]).all() and not np.isnan(got[~nan_rows]).any()
    ok = ~nan_rows
    assert_within(got[ok], want[ok], C.softmax_bound(x[ok], want[ok], F32), f"softmax[{path}] ({R},{N})")
    assert (got[0] == 0).all() and (got[5, :4096] == 0).all() and (got[6, :4096] == 0).all()
    assert got[8, 0] == 0 and got[8, -1] == 0
    if last_masked:
        assert (got[-1] == 0).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("R,N", _SM_STREAM_SHAPES)
def test_softmax_streaming_alignment(path, R, N):
    """The streamed stores need 64-byte aligned addresses: out at several float offsets within a
    line (x at the same one, as NumPy's, or another), nothing written outside out, x unchanged."""
    x0 = _softmax_stream_input(R, N, last_masked=False)[8:]   # the finite rows (row 0 fully masked)
    x0[0, 0] = x0[0, -1] = -INF
    want = L.softmax(f64(x0), axis=-1)
    bound = C.softmax_bound(x0, want, F32)
    n = x0.size
    xbuf, obuf = _aligned_buffer(n + 16), _aligned_buffer(n + 32)
    P = lambda a: ffi.from_buffer("float[]", a)    # noqa: E731
    with forced_path(path):
        for oy, ox in [(0, 0), (1, 1), (4, 4), (15, 15), (4, 11), (9, 0)]:
            x = _at_offset(xbuf, ox, x0.shape)
            x[...] = x0
            obuf[...] = 7.0                        # a canary around out
            out = _at_offset(obuf, oy + 8, x0.shape)
            lib.rf_softmax_f32(P(out), P(x), *x0.shape)
            what = f"softmax[{path}] {x0.shape} x at +{ox} floats, out at +{oy}"
            assert_within(out, want, bound, what)
            assert out[0, 0] == 0 and out[0, -1] == 0, what
            assert (obuf[:oy + 8] == 7.0).all() and (obuf[oy + 8 + n:] == 7.0).all(), what
            np.testing.assert_array_equal(x, x0, err_msg=what)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N", [3, 40, 5000, 9000])
def test_softmax_masked_row_nan_anywhere(path, N):
    """A fully masked row holding a NaN anywhere (not only first) is a NaN row, as the oracle's
    (GCC 12 -O3 once vectorized the kernel's NaN scan so that only x[0] counted)."""
    for pos in sorted({1 % N, N // 2, N - 1}):
        x = np.full((2, N), -INF, F32)
        x[1, pos] = np.nan
        with forced_path(path), np.errstate(invalid="ignore"):
            got = c_ops.softmax(x)
            want = L.softmax(f64(x), axis=-1)
        assert (got[0] == 0).all() and (want[0] == 0).all()
        assert np.isnan(got[1]).all() and np.isnan(want[1]).all(), f"softmax[{path}] N={N} NaN at {pos}"
