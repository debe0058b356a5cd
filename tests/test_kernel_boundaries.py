"""What every backend accepts at its boundary, and what it refuses (contracts.check_array,
check_flag, check_finite; the C decode step; both samplers): bad input gets a TypeError or
ValueError naming the argument, never a crash or a silently wrong result, and the backends
accept the same calls."""
import threading

import numpy as np
import pytest

from refimpl.kernels import c_ops, get
from refimpl.kernels import contracts as C
from refimpl.kernels.c_decode import decode_step
from refimpl.kernels.c_sample import sample as c_sample
from refimpl.oracle import sampling as S
from refimpl.oracle.model import Model, random_params, tiny_config
from refimpl.verify.compare import assert_within

F32 = np.float32
BACKENDS = ["c", "numba", "numpy"]


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


QKV = (f32(4, 5, 8), f32(2, 7, 8, seed=1), f32(2, 7, 8, seed=2))
X3 = f32(2, 5, 8)


def _calls(backend):
    """Each op of `backend` with its flag and scalar arguments open: name -> fn(**kw)."""
    x, w, b = f32(4, 16), f32(16, seed=1), f32(16, seed=2)
    return {
        "causal": lambda v: get("attention", backend)(*QKV, causal=v),
        "scale": lambda v: get("attention", backend)(*QKV, scale=v),
        "interleaved": lambda v: get("rope", backend)(X3, np.arange(5), interleaved=v),
        "theta": lambda v: get("rope", backend)(X3, np.arange(5), theta=v),
        "eps": lambda v: get("layer_norm", backend)(x, w, b, eps=v),
        "rms eps": lambda v: get("rms_norm", backend)(x, w, eps=v),
    }


# ---------------------------------------------------------------- flags: causal, interleaved

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["causal", "interleaved"])
@pytest.mark.parametrize("bad", ["False", 2, None, np.array([1, 0]), 0.0])
def test_flags_refuse_anything_but_a_bool_or_0_1(backend, arg, bad):
    with pytest.raises(TypeError, match=f"'{arg}'"):
        _calls(backend)[arg](bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["causal", "interleaved"])
def test_flags_take_bools_and_0_1(backend, arg):
    call = _calls(backend)[arg]
    on, off = call(True), call(False)
    assert not np.array_equal(on, off)
    for v in (np.bool_(True), 1, np.int64(1)):
        assert np.array_equal(call(v), on)
    for v in (np.bool_(False), 0, np.uint8(0)):
        assert np.array_equal(call(v), off)


def test_prepared_attention_refuses_a_string_flag():
    with pytest.raises(TypeError, match="'causal'"):
        c_ops.prepare_attention(*QKV, causal="False")


# ---------------------------------------------------------------- scalars: eps, scale, theta

BAD_SCALARS = [
    ("scale", float("nan"), ValueError), ("scale", float("inf"), ValueError), ("scale", 1e39, ValueError),
    ("scale", "1", TypeError), ("scale", True, TypeError), ("scale", np.array(0.5), TypeError),
    ("theta", 0, ValueError), ("theta", -10.0, ValueError), ("theta", float("nan"), ValueError),
    ("theta", "100", TypeError),
    ("eps", None, TypeError), ("eps", -1.0, ValueError), ("eps", float("nan"), ValueError),
    ("eps", float("inf"), ValueError), ("eps", 1e39, ValueError), ("eps", "0.1", TypeError),
    ("rms eps", None, TypeError), ("rms eps", -1e-6, ValueError), ("rms eps", np.inf, ValueError),
    ("rms eps", 2 ** 1100, ValueError), ("rms eps", False, TypeError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg, value, error", BAD_SCALARS, ids=[f"{a}={v!r:.12}" for a, v, _ in BAD_SCALARS])
def test_scalars_are_checked_by_every_backend(backend, arg, value, error):
    with pytest.raises(error, match=f"'{arg.split()[-1]}'") as e:
        _calls(backend)[arg](value)
    assert "finite and finite" not in str(e.value)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_float32_range_applies_to_float32_kernels_only(backend):
    q, k, v = (a.astype(np.float64) for a in QKV)
    x, w, b = f32(4, 16).astype(np.float64), np.ones(16), np.zeros(16)
    assert get("attention", backend)(q, k, v, scale=1e39).shape == q.shape       # float64 kernels take it
    assert get("layer_norm", backend)(x, w, b, eps=1e39).shape == x.shape
    with pytest.raises(ValueError, match="'eps' = 1e\\+39 overflows float32"):
        get("layer_norm", backend)(x.astype(F32), w.astype(F32), b.astype(F32), eps=1e39)
    # eps = 1e-50 is 0 in float32: a constant row came out NaN where the float64 oracle has 0
    assert np.all(get("layer_norm", backend)(np.ones((1, 4)), np.ones(4), np.zeros(4), eps=1e-50) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eps_float32_rounds_to_zero_is_refused_by_float32_kernels(backend):
    x, w, b = f32(4, 16), np.ones(16, F32), np.zeros(16, F32)
    with pytest.raises(ValueError, match="'eps' = 1e-50 underflows to 0 in float32"):
        get("layer_norm", backend)(x, w, b, eps=1e-50)
    with pytest.raises(ValueError, match="'eps' = 5e-46 underflows"):
        get("rms_norm", backend)(x, w, eps=5e-46)
    assert get("rms_norm", backend)(x, w, eps=1e-45).shape == x.shape      # a subnormal: kept


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_norm_at_eps_zero_on_a_constant_row_gives_the_oracles_nan(op, dtype):
    x = np.ones((2, 16), dtype) if op == "layer_norm" else np.zeros((2, 16), dtype)
    args = (x, np.ones(16, dtype)) + ((np.zeros(16, dtype),) if op == "layer_norm" else ())
    with np.errstate(all="ignore"):
        want = get(op, "numpy")(*args, eps=0)
    got = get(op, "numba")(*args, eps=0)                  # was ZeroDivisionError
    assert np.isnan(want).all() and np.array_equal(got, want, equal_nan=True)


def test_c_layer_norm_without_bias_names_b():
    for fn in (c_ops.layer_norm, c_ops.prepare_layer_norm):
        with pytest.raises(TypeError, match="argument 'b'"):
            fn(f32(4, 8), f32(8), None)


# ---------------------------------------------------------------- array subclasses

def _masked(*shape):
    x = f32(*shape)
    return np.ma.masked_array(x, mask=np.arange(x.size).reshape(shape) % 3 == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_arrays_are_refused(backend):
    with pytest.raises(TypeError, match="'x' is a masked array"):
        get("softmax", backend)(_masked(2, 4))
    with pytest.raises(TypeError, match="'a' is a masked array"):
        get("matmul", backend)(_masked(3, 4), f32(4, 2))
    cache = _masked(2, 20, 8)                             # head-strided views of a cache (C: not copied)
    with pytest.raises(TypeError, match="'k' is a masked array"):
        get("attention", backend)(f32(2, 3, 8), cache[:, :10], cache[:, 10:])


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_inputs_are_read_as_plain_arrays(backend):
    x, w = f32(4, 16), f32(16, seed=1)
    for op, args in (("silu", (x,)), ("softmax", (x,)), ("rms_norm", (x, w)), ("matmul", (x, x.T.copy()))):
        got = get(op, backend)(*(np.matrix(a) if a.ndim == 2 else a for a in args))
        assert type(got) is np.ndarray and np.array_equal(got, get(op, backend)(*args)), op


# ---------------------------------------------------------------- one shape contract for every backend

_BAD_ARRAYS = {   # op, args -> (exception, what the message must name); the same for every backend
    "matmul 1-D a": ("matmul", (f32(4), f32(4, 3)), ValueError, "'a' must be 2-D"),
    "matmul 3-D a": ("matmul", (f32(2, 4, 4), f32(4, 3)), ValueError, "'a' must be 2-D"),
    "matmul inner sizes": ("matmul", (f32(4, 5), f32(4, 3)), ValueError, "inner sizes 5 != 4"),
    "matmul int": ("matmul", (np.ones((4, 4), np.int32), f32(4, 3)), TypeError, "'a' has dtype int32"),
    "matmul float16": ("matmul", (f32(4, 4).astype(np.float16), f32(4, 3)), TypeError, "'a' has dtype float16"),
    "matmul mixed": ("matmul", (f32(4, 4), f32(4, 3).astype(np.float64)), TypeError, "'b' has dtype float64"),
    "softmax 0-D": ("softmax", (np.zeros((), F32),), ValueError, "'x'.*at least 1 dimension"),
    "softmax int": ("softmax", (np.ones((2, 3), np.int64),), TypeError, "'x' has dtype int64"),
    "softmax list": ("softmax", ([[1.0, 2.0]],), TypeError, "'x' must be a numpy.ndarray"),
    "layer_norm w size": ("layer_norm", (f32(2, 5), f32(4), f32(5)), ValueError, "'w' has shape \\(4,\\)"),
    "layer_norm b size": ("layer_norm", (f32(2, 5), f32(5), f32(6)), ValueError, "'b' has shape \\(6,\\)"),
    "layer_norm w 2-D": ("layer_norm", (f32(2, 5), f32(1, 5), f32(5)), ValueError, "'w' must be 1-D"),
    "layer_norm mixed": ("layer_norm", (f32(2, 5), f32(5).astype(np.float64), f32(5)), TypeError,
                         "'w' has dtype float64"),
    "rms_norm w size": ("rms_norm", (f32(2, 3, 5), f32(3)), ValueError, "'w' has shape \\(3,\\)"),
    "gelu int": ("gelu_tanh", (np.arange(4),), TypeError, "'x' has dtype int64"),
    "silu float16": ("silu", (f32(4).astype(np.float16),), TypeError, "'x' has dtype float16"),
    "rope odd D": ("rope", (f32(2, 3, 5), np.arange(3)), ValueError, "D=5.*must be even"),
    "rope 1-D x": ("rope", (f32(4), np.arange(1)), ValueError, "'x' must be \\[..., T, D\\]"),
    "rope float positions": ("rope", (f32(2, 3, 4), np.arange(3) + 0.5), TypeError, "'positions' must hold integers"),
    "rope positions size": ("rope", (f32(2, 3, 4), np.arange(4)), ValueError, "'positions' has shape \\(4,\\)"),
    "attention D": ("attention", (f32(2, 3, 4), f32(2, 3, 5), f32(2, 3, 5)), ValueError, "head width 5 != .* 4"),
    "attention heads": ("attention", (f32(3, 3, 4), f32(2, 3, 4), f32(2, 3, 4)), ValueError, "multiple"),
    "attention 2-D": ("attention", (f32(3, 4), f32(3, 4), f32(3, 4)), ValueError, "'q' must be 3-D"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_BAD_ARRAYS))
def test_every_backend_refuses_the_same_arrays_naming_them(backend, case):
    """The numpy backend (the oracle under the kernel contract) refused nothing here before:
    it multiplied 3-D and int32 matrices, took float positions and float16, and failed on an
    odd D with numpy's own broadcast error."""
    op, args, exc, match = _BAD_ARRAYS[case]
    with pytest.raises(exc, match=match):
        get(op, backend)(*args)


_LEADING_AXES = {   # op, args, bound(args, ref) for shapes beyond [R, N] / [H, T, D]
    "softmax 1-D": ("softmax", (f32(19),), lambda a, r: C.softmax_bound(a[0], r, F32)),
    "softmax 3-D": ("softmax", (f32(2, 3, 19),), lambda a, r: C.softmax_bound(a[0], r, F32)),
    "layer_norm 1-D": ("layer_norm", (f32(19), f32(19, seed=1), f32(19, seed=2)),
                       lambda a, r: C.layer_norm_bound(*a, 1e-5, F32)),
    "layer_norm 3-D": ("layer_norm", (f32(2, 3, 19), f32(19, seed=1), f32(19, seed=2)),
                       lambda a, r: C.layer_norm_bound(*a, 1e-5, F32)),
    "rms_norm 3-D": ("rms_norm", (f32(2, 3, 19), f32(19, seed=1)), lambda a, r: C.rms_norm_bound(*a, 1e-6, F32)),
    "rope 2-D": ("rope", (f32(5, 8), np.arange(5)), lambda a, r: C.rope_bound(*a, 10000.0, F32)),
    "rope 4-D": ("rope", (f32(2, 3, 5, 8), np.arange(5) * 7), lambda a, r: C.rope_bound(*a, 10000.0, F32)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_LEADING_AXES))
def test_every_backend_takes_leading_axes_as_the_oracle_does(backend, case):
    """softmax and the norms over [..., N], rope over [..., T, D] (the C kernels took only
    [R, N] and [H, T, D] before): within the float32 bound of the float64 oracle."""
    op, args, bound = _LEADING_AXES[case]
    ref = get(op, "numpy")(*(a.astype(np.float64) if a.dtype == F32 else a for a in args))
    got = get(op, backend)(*args)
    assert got.shape == ref.shape and got.dtype == F32
    assert_within(got, ref, bound(args, ref), f"{backend} {case}")


# ---------------------------------------------------------------- the C decode step

def _model(arch="llama", **overrides):
    cfg = tiny_config(arch, **overrides)
    return Model(cfg, {k: v.astype(F32) for k, v in random_params(cfg, 0).items()}, "float32", backend="c")


def _decode(step, m, tokens):
    cache, out = m.new_cache(), []
    for tok in tokens:
        out.append(step(tok, cache).copy())
        cache.length += 1
    return out


def test_threads_sharing_a_step_each_with_its_own_cache_get_the_sequential_logits():
    m = _model(d_model=256, d_ff=512, vocab_size=2048)
    step = decode_step(m)
    runs = {t: [t, 1, 4, 1, 5, 9, 2, 6] * 2 for t in (3, 5)}
    want = {t: _decode(step, m, toks) for t, toks in runs.items()}
    start, bad = threading.Barrier(2), []

    def worker(t):
        start.wait()
        for _ in range(6):
            got = _decode(step, m, runs[t])
            bad.extend(i for i, (a, b) in enumerate(zip(got, want[t])) if not np.array_equal(a, b))

    threads = [threading.Thread(target=worker, args=(t,)) for t in runs]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not bad, f"{len(bad)} positions differ from the sequential run"


@pytest.mark.parametrize("arch, overrides, pattern", [
    ("llama", dict(rope_theta=-10.0), "'config.rope_theta'"),
    ("llama", dict(rope_theta=float("nan")), "'config.rope_theta'"),
    ("llama", dict(norm_eps=float("nan")), "'config.norm_eps'"),
    ("gpt2", dict(norm_eps=-1.0), "'config.norm_eps'"),
    ("gpt2", dict(norm_eps=1e39), "'config.norm_eps'"),
])
def test_step_checks_the_configs_scalars_as_the_python_path_does(arch, overrides, pattern):
    m = _model(arch)
    for name, value in overrides.items():     # set after Config's own checks (it is a mutable dataclass)
        setattr(m.config, name, value)
    with pytest.raises(ValueError, match=pattern):
        decode_step(m)
    m.fused_decode = False
    with pytest.raises(ValueError, match="'eps'|'theta'"):       # the Python composition refuses it too
        m.forward([1, 2])


def test_step_takes_integral_tokens_only():
    m = _model()
    step = decode_step(m)
    want = step(3, m.new_cache())
    assert np.array_equal(step(np.int64(3), m.new_cache()), want)
    for bad in (3.9, "3", np.float64(3.0), None):
        with pytest.raises(TypeError, match="token must be an integer"):
            step(bad, m.new_cache())


def test_step_checks_the_caches_layer_count():
    m = _model()
    step = decode_step(m)
    cache = m.new_cache()
    step(1, cache)
    cache.k.pop()                                         # the bound cache, shortened in place
    with pytest.raises(ValueError, match="1 k and 2 v arrays.*n_layers = 2"):
        step(1, cache)
    cache = m.new_cache()
    cache.v = cache.v[:1]
    with pytest.raises(ValueError, match="n_layers = 2"):
        step(1, cache)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_refuses_cache_arrays_sharing_memory(arch):
    cfg = tiny_config(arch)
    weights = {k: v.astype(F32) for k, v in random_params(cfg, 0).items()}
    m = Model(cfg, weights, "float32", backend="c")       # model.params: read-only views of its own copies
    step = decode_step(m)
    table = "embed_tokens.weight" if arch == "llama" else "wte.weight"

    def cache_with(layer_kv, make):
        c = m.new_cache()
        getattr(c, layer_kv[0])[layer_kv[1]] = make(c)
        return c

    shape = m.new_cache().k[0].shape
    before = m.params[table].copy()
    for where, make, pattern in [
        (("v", 0), lambda c: c.k[0], r"cache\.k\[0\].*cache\.v\[0\]|cache\.v\[0\].*cache\.k\[0\]"),
        (("k", 1), lambda c: c.k[0], r"cache\.k\[0\].*cache\.k\[1\]|cache\.k\[1\].*cache\.k\[0\]"),
        (("k", 0), lambda c: m.params[table].base.reshape(-1)[:np.prod(shape)].reshape(shape), table),
    ]:
        with pytest.raises(ValueError, match=f"({pattern}).*share memory"):
            step(1, cache_with(where, make))
    assert np.array_equal(m.params[table], before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_params_are_read_only_after_construction(arch):
    """The (in, out) copies and the C step's packed pointers are made from model.params once:
    replacing an entry, or writing into one, is refused (a stale copy would be silently used)."""
    m = _model(arch)
    name = next(iter(m.params))
    with pytest.raises(TypeError):
        m.params[name] = np.zeros_like(m.params[name])
    with pytest.raises(ValueError, match="read-only"):
        m.params[name][...] = 0


def test_step_runs_on_a_cache_smaller_than_the_context():
    """The C step lays the cache out with its own capacity (S in its dims): logits equal those
    of a full-size cache, and a position past the capacity is refused by name."""
    m = _model("llama")
    step = decode_step(m)
    full, small = m.new_cache(), m.new_cache(4)
    for tok in (1, 2, 3, 4):
        a, b = step(tok, full), step(tok, small)
        full.length += 1
        small.length += 1
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="capacity of 4 positions"):
        step(5, small)


# ---------------------------------------------------------------- sampling

SAMPLERS = [S.sample, c_sample]


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("logits", [np.zeros((2, 3)), np.array(1.5), np.zeros(0)])
def test_samplers_refuse_logits_that_are_not_a_non_empty_vector(sample, temperature, logits):
    with pytest.raises(ValueError, match=r"non-empty 1-D array \[V\]"):
        sample(logits, temperature, rng=S.XorShift64Star(1))


@pytest.mark.parametrize("sample", SAMPLERS)
@pytest.mark.parametrize("top_k", [1.9, float("nan"), True, "2", 2.0])
def test_samplers_take_integral_top_k_only(sample, top_k):
    with pytest.raises(TypeError, match="top_k must be an integer"):
        sample(np.arange(5.0), 1.0, top_k=top_k, rng=S.XorShift64Star(1))


@pytest.mark.parametrize("sample", SAMPLERS)
def test_top_k_beyond_v_keeps_every_token(sample):
    z = np.random.default_rng(3).standard_normal(50)
    for seed in range(1, 20):
        want = sample(z, 1.0, rng=S.XorShift64Star(seed))
        for top_k in (50, 51, np.int64(2 ** 62), 2 ** 70):
            assert sample(z, 1.0, top_k=top_k, rng=S.XorShift64Star(seed)) == want


# ---------------------------------------------------------------- norms at float32's edges

NORM_EDGES = [
    ("overflow", np.array([[2e19, -1e19, 3e19, 5e18]], F32), 0.0),       # x^2 overflows float32
    ("tiny, eps 0", np.array([[1e-30, -2e-30, 3e-30]], F32), 0.0),         # x^2 underflows to 0
    ("subnormal square", np.array([[1.2345678e-21]], F32), 0.0),           # x^2 keeps 3 digits
    ("constant row, eps 0", np.full((1, 127), 0.001, F32), 0.0),           # the float32 mean is the variance
    ("near-constant row", (100.0 + np.arange(64) * 2.0 ** -17).astype(F32)[None], 1e-12),
]


@pytest.mark.parametrize("case, x, eps", NORM_EDGES, ids=[c[0] for c in NORM_EDGES])
@pytest.mark.parametrize("backend", ["c", "numba"])
def test_norms_fall_back_to_double_where_float32_cannot(backend, case, x, eps):
    """Rows whose float32 sums overflow, underflow or cancel are redone in double (norms.c, and
    the Numba kernels alike): within the bound of the float64 oracle, NaN where it is NaN (a
    constant row with eps = 0 is 0 / 0).  Numba gave zeros for the overflow row; both gave inf
    for the tiny row and finite values of ~0.24 for the constant one."""
    from refimpl.kernels import contracts as C
    from refimpl.kernels.cdispatch import forced_path, runnable_paths
    from refimpl.oracle import layers as L
    from refimpl.verify.compare import assert_within
    D = x.shape[1]
    w, b = f32(D, seed=1), f32(D, seed=2)
    f = lambda a: a.astype(np.float64)  # noqa: E731
    for path in (runnable_paths() if backend == "c" else [None]):
        with forced_path(path) if path else _nothing(), np.errstate(all="ignore"):
            got = get("layer_norm", backend)(x, w, b, eps)
            want = L.layer_norm(f(x), f(w), f(b), eps)
            assert_within(got, want, C.layer_norm_bound(x, w, b, eps, F32))
            if case != "constant row, eps 0":
                got = get("rms_norm", backend)(x, w, eps)
                assert_within(got, L.rms_norm(f(x), f(w), eps), C.rms_norm_bound(x, w, eps, F32))


def _nothing():
    import contextlib
    return contextlib.nullcontext()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qs, ks, match", [
    ((2, 3, 0), (1, 4, 0), "head width D must be >= 1"),
    ((2, 0, 4), (1, 0, 4), "needs at least one key"),
    ((2, 3, 4), (1, 0, 4), "needs at least one key"),
])
def test_degenerate_attention_is_refused_alike(backend, qs, ks, match):
    """D = 0 and Lk = 0 raised ZeroDivisionError and NumPy's reduction error on the numpy
    backend, and Numba returned a result for D = 0 where C refused."""
    with pytest.raises(ValueError, match=match):
        get("attention", backend)(f32(*qs), f32(*ks), f32(*ks))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qs", [(0, 1, 4), (2, 0, 4)])
def test_attention_without_queries_gives_an_empty_result(backend, qs):
    out = get("attention", backend)(f32(*qs), f32(1, 3, 4), f32(1, 3, 4))
    assert out.shape == qs and out.dtype == F32


def test_c_matmul_stream_is_a_flag():
    for bad in ("no", np.array([1, 0]), 2):
        with pytest.raises(TypeError, match="'stream' must be a bool"):
            get("matmul", "c")(f32(2, 3), f32(3, 4), stream=bad)


def test_step_names_a_cache_that_is_not_one():
    m = _model()
    step = decode_step(m)
    with pytest.raises(TypeError, match="cache must be a KVCache .* got NoneType"):
        step(1, None)
    cache = m.new_cache()
    cache.length = 2.0
    with pytest.raises(TypeError, match="whose length is an integer, got KVCache of length 2.0"):
        step(1, cache)


def test_forced_path_blocks_of_two_threads_do_not_interleave():
    """Thread A forced portable, B avx2, A left, B left: B restored the portable path it had
    found, for the rest of the process.  Now B's block waits for A's to end."""
    import threading

    from refimpl.kernels.cdispatch import forced_path, simd_path
    start = simd_path()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with forced_path("portable"):
            a_in.set()
            b_in.wait(1.0)                       # B cannot get in while A's block runs
        a_out.set()

    def b():
        a_in.wait(5)
        with forced_path("avx2"):
            b_in.set()
            a_out.wait(5)
    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert simd_path() == start
