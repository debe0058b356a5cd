"""The C matmul (backend "c") against the float64 oracle, under contracts.matmul_bound.

M = rows of a, K = inner size, N = columns of b.  The oracle is
a.astype(float64) @ b.astype(float64) on the very float32 inputs the kernel
sees; every comparison uses the error bound c gamma(K+1) (|A| |B|) + K tiny
through verify.compare.assert_within (non-finite entries must match exactly).
Every SIMD path this CPU runs is tested (cdispatch.forced_path).
"""
import numpy as np
import pytest
from hypothesis import event, example, given, target
from hypothesis import strategies as st

from refimpl.kernels import get
from refimpl.kernels import c_matmul as cm
from refimpl.kernels.cdispatch import forced_path, runnable_paths
from refimpl.kernels.contracts import matmul_bound
from refimpl.verify.compare import assert_within

matmul = get("matmul", "c")


RUNNABLE = runnable_paths()      # on aarch64: "portable" (which simd_path() calls "neon")
PATHS = [pytest.param(p, marks=pytest.mark.skipif(p not in RUNNABLE, reason=f"CPU cannot run the {p} path"))
         for p in ("portable", "avx2", "avx512")]

# sizes around every tile (MR 2/6/8, NR 16/32) and block (KC 256/512, MC 128/144): 1, primes, off-by-one
AWKWARD = (1, 2, 3, 5, 7, 9, 13, 15, 17, 31, 33, 37, 47, 63, 65, 97, 127, 129, 131, 143, 145)
LONG_K = (1, 2, 3, 255, 257, 511, 513, 1031, 2053)


def oracle(a, b):  # [M,K],[K,N] -> [M,N] float64
    with np.errstate(invalid="ignore", over="ignore"):
        return a.astype(np.float64) @ b.astype(np.float64)


def check(got, a, b, what="matmul"):
    with np.errstate(invalid="ignore", over="ignore"):
        bound = matmul_bound(a, b, a.dtype)
    assert got.shape == (a.shape[0], b.shape[1])
    assert got.dtype == a.dtype and got.flags.c_contiguous
    with np.errstate(invalid="ignore"):   # inf - inf inside error_stats where both are inf
        return assert_within(got, oracle(a, b), bound, what)


@st.composite
def sizes(draw, max_m=150, max_k=600, max_n=200):
    """(M, K, N): awkward sizes, any size, and long K across several KC blocks."""
    def dim(hi):
        return draw(st.one_of(st.sampled_from([d for d in AWKWARD if d <= hi]), st.integers(1, hi)))
    M, N = dim(max_m), dim(max_n)
    K = draw(st.one_of(st.sampled_from(LONG_K), st.integers(1, max_k)))
    return M, K, N


KINDS = ("normal", "mixed", "positive", "small_ints", "tiny")


def values(rng, shape, kind, dtype):
    """normal; mixed magnitudes 1e-12..1e12; positive (no cancellation); exact small ints;
    tiny (products underflow into subnormals)."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "mixed":
        x = rng.standard_normal(shape) * 10.0 ** rng.integers(-12, 13, size=shape)
    elif kind == "positive":
        x = rng.random(shape)
    elif kind == "small_ints":
        x = rng.integers(-8, 9, size=shape)
    else:
        x = rng.standard_normal(shape) * 1e-20
    return x.astype(dtype)


@st.composite
def operands(draw, dtype=np.float32, **size_kw):
    M, K, N = draw(sizes(**size_kw))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return values(rng, (M, K), kind, dtype), values(rng, (K, N), kind, dtype)


def _pair(M, K, N, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return values(rng, (M, K), "normal", dtype), values(rng, (K, N), "normal", dtype)


# --------------------------------------------------------------------------- properties --


@pytest.mark.parametrize("path", PATHS)
@given(ab=operands())
@example(ab=_pair(1, 1, 1))
@example(ab=_pair(3, 0, 5))
@example(ab=_pair(1, 0, 7))
def test_f32_within_bound_every_path(path, ab):
    a, b = ab
    M, K = a.shape
    event(f"M {'<= 8 (small kernel)' if M <= 8 else '> 8 (packed)'}; K {'> 512 (several KC blocks)' if K > 512 else '<= 512'}")
    with forced_path(path):
        got = matmul(a, b)
    s = check(got, a, b, f"matmul f32 {a.shape}@{b.shape} on {path}")
    target(s.bound_ratio, label="bound ratio")


@pytest.mark.parametrize("path", PATHS)
@given(ab=operands(max_m=3, max_k=80, max_n=300))
@example(ab=_pair(1, 7, 5))          # fewer rows than one prefetch block
@example(ab=_pair(1, 17, 33))        # a block and a tail, a masked column tail
@example(ab=_pair(1, 768, 4100))     # two column chunks
def test_stream_hint_changes_speed_not_results(path, ab):
    """stream=True (decode weights from DRAM) only adds prefetches: the same bits as without it."""
    a, b = ab
    with forced_path(path):
        got = matmul(a, b, stream=True)
        assert np.array_equal(got, matmul(a, b), equal_nan=True)
    check(got, a, b, f"matmul stream {a.shape}@{b.shape} on {path}")


@given(ab=operands(dtype=np.float64, max_m=60, max_k=300, max_n=80))
@example(ab=_pair(1, 1, 1, np.float64))
@example(ab=_pair(4, 0, 2, np.float64))
def test_f64_within_bound(ab):
    a, b = ab
    check(matmul(a, b), a, b, "matmul f64")


@given(ab=operands(max_m=40, max_k=200, max_n=60))
@example(ab=_pair(1, 1, 1))
def test_c_ref_within_bound(ab):
    a, b = ab
    check(cm.matmul_ref(a, b), a, b, "rf_matmul_f32_ref")


@pytest.mark.parametrize("path", PATHS)
@given(ab=operands(max_m=40, max_k=300, max_n=70),
       layout=st.sampled_from(["transposed", "strided", "offset4", "unaligned"]))
def test_noncontiguous_and_misaligned_inputs(path, ab, layout):
    a0, b0 = ab

    def relayout(x, salt):
        if layout == "transposed":         # a Fortran-ordered view
            return np.asfortranarray(x)
        if layout == "strided":            # every other row and column of a bigger array
            big = np.full((2 * x.shape[0], 3 * x.shape[1]), np.nan, dtype=x.dtype)
            big[::2, ::3] = x
            return big[::2, ::3]
        if layout == "offset4":            # starts 4 bytes into a buffer: not 8/16/64-byte aligned
            buf = np.zeros(x.size + 1, dtype=x.dtype)
            v = buf[1:].reshape(x.shape)
            v[...] = x
            return v
        raw = np.zeros(x.nbytes + 1, dtype=np.uint8)   # byte offset 1: numpy calls it unaligned
        v = raw[1:].view(x.dtype).reshape(x.shape)
        v[...] = x
        return v

    a, b = relayout(a0, 0), relayout(b0, 1)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)
    handed = cm._checked(a, b)[:2]   # what the wrapper passes to C: C-contiguous and aligned
    assert all(x.flags.c_contiguous and x.flags.aligned for x in handed)
    with forced_path(path):
        got = matmul(a, b)
        want_same = matmul(a0, b0)
    check(got, a0, b0, f"matmul with {layout} inputs on {path}")
    np.testing.assert_array_equal(got, want_same)


@pytest.mark.parametrize("path", PATHS)
@given(ab=operands(max_m=30, max_k=80, max_n=50),
       n_special=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
@example(ab=(np.array([[np.inf, 1.0]], np.float32), np.array([[0.0], [1.0]], np.float32)),
         n_special=1, seed=0)   # inf * 0 = NaN
def test_nan_inf_propagate_like_the_oracle(path, ab, n_special, seed):
    a, b = (x.copy() for x in ab)
    rng = np.random.default_rng(seed)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0], dtype=a.dtype)
    for _ in range(n_special):
        x = a if rng.random() < 0.5 else b
        x[rng.integers(0, x.shape[0]), rng.integers(0, x.shape[1])] = rng.choice(specials)
    with forced_path(path):
        got = matmul(a, b)
    check(got, a, b, f"matmul with NaN/inf on {path}")


@pytest.mark.parametrize("path", PATHS)
@given(ab=operands(max_m=40, max_k=300, max_n=70))
@example(ab=_pair(1, 768, 37))
def test_prepare_run_equals_call(path, ab):
    a, b = ab
    with forced_path(path):
        call = cm.prepare(a, b)
        want = matmul(a, b)
        got = call.run()
    assert got is call.out
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------- big shapes --

BIG = [(256, 256, 256), (513, 513, 513), (1024, 1024, 1024), (128, 768, 768), (1, 768, 3072),
       (2, 768, 3072), (5, 301, 4133), (9, 700, 77), (100, 3000, 33)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mkn", BIG, ids=lambda s: "x".join(map(str, s)))
def test_big_shapes(path, mkn):
    a, b = _pair(*mkn, seed=sum(mkn))
    with forced_path(path):
        got = matmul(a, b)
    check(got, a, b, f"matmul {mkn} on {path}")


def test_f64_big_shape():
    a, b = _pair(300, 700, 257, np.float64)
    check(matmul(a, b), a, b, "matmul f64 300x700x257")


# ------------------------------------------------------------------- sizes and zeros --


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mkn", [(0, 0, 0), (0, 5, 3), (4, 0, 3), (4, 5, 0), (1, 0, 1), (0, 3, 1)])
def test_empty_sizes(dtype, mkn):
    M, K, N = mkn
    a, b = np.ones((M, K), dtype), np.ones((K, N), dtype)
    got = matmul(a, b)
    assert got.shape == (M, N) and got.dtype == dtype and got.flags.c_contiguous
    assert np.all(got == 0)   # K = 0: the empty sum is 0
    out = np.full((M, N), 7, dtype)
    assert cm.matmul_into(out, a, b) is out and np.all(out == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_is_new_and_inputs_untouched(dtype):
    a, b = _pair(17, 33, 17, dtype)
    a0, b0 = a.copy(), b.copy()
    got = matmul(a, b)
    assert not np.may_share_memory(got, a) and not np.may_share_memory(got, b)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def test_byte_swapped_inputs_are_converted():
    a, b = _pair(9, 20, 11)
    got = matmul(a.astype(">f4"), b.astype(">f4"))
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, matmul(a, b))


# ------------------------------------------------------------------------- matmul_into --


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mkn", [(1, 768, 300), (5, 64, 33), (130, 70, 65)])
def test_matmul_into_writes_in_place(dtype, mkn):
    a, b = _pair(*mkn, dtype)
    out = np.full((mkn[0], mkn[2]), np.nan, dtype)
    assert cm.matmul_into(out, a, b) is out
    np.testing.assert_array_equal(out, matmul(a, b))


def test_matmul_into_rejects_bad_out():
    a, b = _pair(8, 8, 8)
    with pytest.raises(TypeError, match="'out'.*float64"):
        cm.matmul_into(np.empty((8, 8)), a, b)
    with pytest.raises(ValueError, match=r"'out' has shape \(8, 9\)"):
        cm.matmul_into(np.empty((8, 9), np.float32), a, b)
    with pytest.raises(ValueError, match="'out' must be C-contiguous"):
        cm.matmul_into(np.empty((8, 16), np.float32)[:, ::2], a, b)
    ro = np.empty((8, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'out' is read-only"):
        cm.matmul_into(ro, a, b)
    with pytest.raises(ValueError, match="'out' overlaps input 'a'"):
        cm.matmul_into(a, a, b)
    with pytest.raises(ValueError, match="'out' overlaps input 'b'"):
        cm.matmul_into(b, a, b)
    with pytest.raises(TypeError, match="'out' must be a numpy.ndarray"):
        cm.matmul_into([[0.0] * 8] * 8, a, b)


# ------------------------------------------------------------------------- bad inputs --

_a, _b = _pair(3, 4, 5)


@pytest.mark.parametrize("fn", [matmul, cm.matmul_ref, cm.prepare], ids=["matmul", "ref", "prepare"])
@pytest.mark.parametrize("args, exc, pattern", [
    ((_a.astype(np.float16), _b), TypeError, "'a' has dtype float16"),
    ((_a.astype(np.int32), _b), TypeError, "'a' has dtype int32"),
    ((_a, _b.astype(np.complex64)), TypeError, "'b' has dtype complex64"),
    ((_a, _b.astype(np.float64)), TypeError, "'b' has dtype float64 but 'a' has float32"),
    ((_a.astype(np.float64), _b), TypeError, "'b' has dtype float32 but 'a' has float64"),
    ((_a[0], _b), ValueError, "'a' must be 2-D"),
    ((_a, _b[None]), ValueError, "'b' must be 2-D"),
    ((_a, _b[:3]), ValueError, r"inner sizes 4 != 3"),
    ((_a.tolist(), _b), TypeError, "'a' must be a numpy.ndarray, got list"),
    ((_a, 2.0), TypeError, "'b' must be a numpy.ndarray, got float"),
])
def test_bad_inputs_name_the_argument(fn, args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn(*args)


# ----------------------------------------------------------------------- prepare / CCall --


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prepare_thunk_runs_from_its_address(dtype):
    from refimpl._kernels import ffi
    a, b = _pair(21, 40, 35, dtype)
    call = cm.prepare(a, b)
    assert call.fn_addr and call.ctx_addr and call.out.shape == (21, 35)
    call.out[...] = np.nan
    ffi.cast("void (*)(void *)", call.fn_addr)(ffi.cast("void *", call.ctx_addr))
    np.testing.assert_array_equal(call.out, matmul(a, b))


def test_prepare_into_given_out():
    a, b = _pair(6, 10, 7)
    out = np.empty((6, 7), np.float32)
    call = cm.prepare(a, b, out=out)
    assert call.run() is out
    np.testing.assert_array_equal(out, matmul(a, b))
    sq, _ = _pair(6, 6, 1)
    with pytest.raises(ValueError, match="'out' overlaps input 'a'"):
        cm.prepare(sq, sq.copy(), out=sq)


def test_blocking_reports_the_table():
    info = cm.blocking()
    assert info["path"] in ("portable", "avx2", "avx512")
    assert info["MR"] >= 1 and info["NR"] >= 1 and info["MC"] % info["MR"] == 0
    with forced_path("portable"):
        assert cm.blocking()["path"] == "portable"


# ------------------------------------------------------------- packing buffers, threads --


def test_threads_use_their_own_packing_buffers():
    """cffi drops the GIL around the C call; each thread packs into its own buffer."""
    from concurrent.futures import ThreadPoolExecutor
    shapes = [(130, 600, 70), (40, 1030, 200), (257, 65, 129), (9, 300, 33)] * 3
    pairs = [_pair(*s, seed=i) for i, s in enumerate(shapes)]
    serial = [matmul(a, b) for a, b in pairs]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda ab: matmul(*ab), pairs))
    for got, want in zip(threaded, serial):
        np.testing.assert_array_equal(got, want)


def test_release_then_reuse():
    from refimpl._kernels import lib
    a, b = _pair(200, 700, 90)
    want = matmul(a, b)
    lib.rf_matmul_release()
    np.testing.assert_array_equal(matmul(a, b), want)
    lib.rf_matmul_release()
    lib.rf_matmul_release()   # twice is harmless


def test_a_thread_s_packing_buffer_is_freed_when_the_thread_exits():
    """Each thread keeps its packing buffer between calls; 50 short-lived threads at
    (64,512)@(512,2048) grew the process by 208 MB before the buffer was freed at thread exit."""
    import threading
    a, b = np.ones((64, 512), np.float32), np.ones((512, 2048), np.float32)

    def rss_mb():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024
    matmul(a, b)
    before = rss_mb()
    for _ in range(50):
        t = threading.Thread(target=matmul, args=(a, b))
        t.start()
        t.join()
    assert rss_mb() - before < 50          # ~4 MB a thread if each leaked its buffer: 200 MB


def test_registered_function_carries_prepare_and_into():
    assert matmul is cm.matmul and matmul.prepare is cm.prepare and matmul.into is cm.matmul_into
