"""The C sampler (refimpl.kernels.c_sample, csrc/kernels/sample.c) against the oracle's rule.

Its probabilities are computed with its own float64 vector exp (< 1 ulp from libm's, checked
here on every SIMD path) and sums split into lanes, the oracle's with NumPy's exp and
pairwise sums: they may differ in the last bits (relative error below
TOL_PER_V * V).  The token is then the oracle's unless the draw r (or top_p) lies within
that rounding of one of the running sums the rule compares it with, or two probabilities
are that close without being equal (their order could flip): `_near_a_boundary` says when,
from the oracle's own quantities.  On random logits that essentially never happens, so a
sampler with a wrong order, cut or draw fails here at once.  The fast C path and the naive
one (insertion sort) do the same arithmetic and must agree exactly.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.kernels.c_sample import sample as c_sample
from refimpl.kernels.cdispatch import forced_path, runnable_paths
from refimpl.oracle import sampling as S
from refimpl.oracle.layers import softmax
from refimpl.oracle.model import tiny_model

EPS = np.finfo(np.float64).eps
TOL_PER_V = 8 * EPS       # exp and division: 1-2 ulp each; a sum of V terms: V ulp; margin 2x


def _near_a_boundary(z, temperature, top_k, top_p, r) -> bool:
    """Could rounding at the level of TOL_PER_V * V change the oracle's answer?"""
    p = softmax(np.asarray(z, np.float64) / temperature)
    tol = TOL_PER_V * len(z)
    order = S.sampling_order(p)
    po = p[order]
    close = np.abs(np.diff(po)) <= tol * po[:-1]
    if np.any(close & (po[1:] != po[:-1])):
        return True
    head = order[:top_k] if top_k else order
    if top_p is not None:
        cum = np.cumsum(p[head] / p[head].sum())
        if np.any(np.abs(cum - top_p) <= tol):
            return True
    kept = S.kept_tokens(p, top_k, top_p)
    cum = np.cumsum(p[kept] / p[kept].sum())
    return bool(np.any(np.abs(cum - r) <= tol))


@st.composite
def cases(draw):
    V = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    g = np.random.default_rng(seed)
    z = g.standard_normal(V) * draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    if V > 2 and draw(st.booleans()):                 # exact ties: broken by id
        z[g.integers(0, V, V // 3)] = z[g.integers(0, V)]
    if V > 2 and draw(st.booleans()):                 # masked entries: probability 0
        z[g.integers(0, V, V // 4)] = -np.inf
        z[g.integers(0, V)] = 0.0                     # not all masked
    temperature = draw(st.sampled_from([0.05, 0.7, 1.0, 2.5]))
    top_k = draw(st.one_of(st.none(), st.integers(1, V + 3)))
    top_p = draw(st.one_of(st.none(), st.sampled_from([0.05, 0.5, 0.9, 1.0])))
    return z, temperature, top_k, top_p, draw(st.integers(0, 2 ** 64 - 1))


def _c_order(p):
    from refimpl._kernels import ffi, lib
    p = np.ascontiguousarray(p, np.float64)
    work = np.empty(lib.rf_sample_work_words(len(p)), np.uint64)
    order = np.empty(len(p), np.int64)
    lib.rf_sample_order(ffi.from_buffer("double[]", p), len(p), ffi.from_buffer("uint64_t[]", work),
                        ffi.from_buffer("int64_t[]", order))
    return order


@pytest.mark.parametrize("path", runnable_paths())
def test_the_exp_is_within_one_ulp_of_libm(path):
    """The sampler's vector exp against libm's (math.exp, within half an ulp of e^x in glibc):
    at most 1 ulp apart wherever e^x is a normal double, at most one subnormal apart below
    that (gradual underflow), +0 for -inf and past e^-745.13, 1 at 0; every length of tail."""
    from refimpl._kernels import ffi, lib
    g = np.random.default_rng(7)
    x = np.concatenate([-g.uniform(0, 746, 20000), -g.uniform(0, 1e-3, 2000), -g.uniform(700, 746, 5000),
                        -np.ldexp(1.0, -g.integers(1, 1074, 500)),
                        [0.0, -0.0, -np.inf, -745.1332191019411, -745.1332191019412, -746.0, -1e4,
                         -708.3964185322641, np.log(np.finfo(float).tiny)]])
    want = np.array([math.exp(v) for v in x])
    tiny = np.finfo(float).tiny
    with forced_path(path):
        for n in [len(x)] + list(range(1, 18)):                 # the vector body and each tail length
            got = np.full(n + 1, 7.0)                           # a guard after the n outputs
            lib.rf_exp_f64(ffi.from_buffer("double[]", got, require_writable=True),
                           ffi.from_buffer("double[]", np.ascontiguousarray(x[-n:])), n)
            assert got[n] == 7.0                                # nothing written past y[n - 1]
            w, y = want[-n:], got[:n]
            normal = w >= tiny
            assert np.all(np.abs(y - w)[normal] <= np.spacing(w[normal])), path
            assert np.all(np.abs(y - w)[~normal] <= 5e-324), path
    with forced_path(path):
        y = np.empty(3)
        lib.rf_exp_f64(ffi.from_buffer("double[]", y, require_writable=True),
                       ffi.from_buffer("double[]", np.array([-np.inf, 0.0, -1e6])), 3)
    assert y.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("path", runnable_paths())
def test_the_softmax_on_every_path_and_tail(path):
    """The probabilities the sampler leaves in p, for V = 1..40 (every split into vectors and
    tail) and a few -inf, against the float64 oracle's softmax: relative error below
    TOL_PER_V * V; masked entries exactly 0."""
    from refimpl._kernels import ffi, lib
    g = np.random.default_rng(11)
    for V in range(1, 41):
        z = g.standard_normal(V) * 4
        if V > 3:
            z[g.integers(0, V, V // 4)] = -np.inf
            z[0] = 1.0
        for T in (0.05, 1.0, 3.0):
            p = np.full(V + 1, 7.0)
            work = np.empty(lib.rf_sample_work_words(V), np.uint64)
            with forced_path(path):
                lib.rf_sample_f64(ffi.from_buffer("double[]", z), V, T, 0, 0.0, 0.5,
                                  ffi.from_buffer("double[]", p, require_writable=True),
                                  ffi.from_buffer("uint64_t[]", work, require_writable=True))
            want = softmax(z / T)
            assert p[V] == 7.0
            assert np.all(np.abs(p[:V] - want) <= TOL_PER_V * V * want), (path, V, T)
            assert np.all(p[:V][np.isneginf(z)] == 0.0)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), V=st.integers(1, 3000),
       kind=st.sampled_from(["normal", "one binade", "dyadic", "ties", "zeros"]))
def test_the_order_is_lexsorts(seed, V, kind):
    """The C order (binades, each sorted when reached: insertion up to 48 ids, else a radix
    sort on the highest varying bits first, then each part the same way) is np.lexsort's
    (p desc, id asc), on probabilities built to hit each path: one binade holding every id,
    few significant bits (the low bytes equal, the high ones not), exact ties, zeros."""
    g = np.random.default_rng(seed)
    p = {"normal": lambda: np.exp(g.standard_normal(V) * 3),
         "one binade": lambda: 1.0 + g.random(V),
         "dyadic": lambda: (1 + g.integers(0, 64, V)) / 64.0 * 2.0 ** -g.integers(0, 3, V),
         "ties": lambda: g.integers(1, 4, V) / 8.0,
         "zeros": lambda: np.where(g.random(V) < 0.5, 0.0, g.random(V))}[kind]()
    assert np.array_equal(_c_order(p), S.sampling_order(p))     # any p >= 0 orders (no need to sum to 1)


@settings(max_examples=300, deadline=None)
@given(case=cases())
def test_same_token_as_the_oracle(case):
    z, temperature, top_k, top_p, seed = case
    want = S.sample(z, temperature, top_k, top_p, S.XorShift64Star(seed))
    rng = S.XorShift64Star(seed)
    got = c_sample(z, temperature, top_k, top_p, rng)
    one = S.XorShift64Star(seed)
    one.next_f64()
    assert rng.state == one.state                     # exactly one draw
    if got != want:
        r = S.XorShift64Star(seed).next_f64()
        assert _near_a_boundary(z, temperature, top_k, top_p, r), (got, want)
    assert c_sample(z, temperature, top_k, top_p, S.XorShift64Star(seed), reference=True) == got


@pytest.mark.parametrize("V", [32000, 50257])
def test_large_vocabularies(V):
    """The sort over real vocabulary sizes (binades of thousands of ids), against the oracle."""
    g = np.random.default_rng(V)
    for seed in range(1, 9):
        z = (g.standard_normal(V) * 3).astype(np.float32)     # float32 logits, as the C model gives
        z[:100] = z[100]                                        # a block of ties
        for kw in (dict(temperature=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=1.2, top_k=40)):
            want = S.sample(z, rng=S.XorShift64Star(seed), **kw)
            got = c_sample(z, rng=S.XorShift64Star(seed), **kw)
            r = S.XorShift64Star(seed).next_f64()
            assert got == want or _near_a_boundary(z, kw["temperature"], kw.get("top_k"), kw.get("top_p"), r)


@pytest.mark.parametrize("seed", [1, 2, 3, 99, 12345])
def test_uniform_logits_known_answer(seed):
    """Equal logits: p = 1/4 each, order 0, 1, 2, 3, running sums 1/4 .. 1 exact in binary,
    so the token is floor(4 r) for the draw r: an answer worked out without the sampler.
    top_p = 0.5 is reached exactly at the second token ("cum >= top_p"), as top_k = 2 keeps
    two: then floor(2 r)."""
    r = S.XorShift64Star(seed).next_f64()
    assert c_sample(np.zeros(4), 1.0, rng=S.XorShift64Star(seed)) == int(4 * r)
    assert c_sample(np.zeros(4), 1.0, top_p=0.5, rng=S.XorShift64Star(seed)) == int(2 * r)
    assert c_sample(np.zeros(4), 1.0, top_k=2, rng=S.XorShift64Star(seed)) == int(2 * r)


def test_ties_go_to_the_lowest_id_and_masked_tokens_never_come():
    z = np.array([1.0, 5.0, 5.0, 1.0, -np.inf])
    assert c_sample(z, 1.0, top_k=1, rng=S.XorShift64Star(7)) == 1
    seen = {c_sample(z, 1.0, top_k=2, rng=S.XorShift64Star(s)) for s in range(1, 200)}
    assert seen == {1, 2}
    assert 4 not in {c_sample(z, 3.0, rng=S.XorShift64Star(s)) for s in range(1, 200)}


def test_one_draw_per_sampled_token_none_when_greedy():
    z = np.linspace(-1, 1, 50)
    for kw in (dict(temperature=1.0), dict(temperature=0.5, top_k=3, top_p=0.5)):
        a, b = S.XorShift64Star(11), S.XorShift64Star(11)
        S.sample(z, rng=a, **kw)
        c_sample(z, rng=b, **kw)
        assert a.state == b.state != S.XorShift64Star(11).state
    g = S.XorShift64Star(11)
    assert c_sample(z, 0.0, rng=g) == 49 and g.state == S.XorShift64Star(11).state


@pytest.mark.parametrize("logits, kw, pattern", [
    (np.array([0.0, np.nan, 1.0]), {}, r"logits\[1\] = nan"),
    (np.array([0.0, 1.0, np.inf]), {}, r"logits\[2\] = inf"),
    (np.full(3, -np.inf), {}, "all -inf"),
    (np.array([1e300, 0.0]), dict(temperature=1e-10), "overflows float64"),
    (np.zeros((2, 3)), {}, r"1-D array \[V\], got shape \(2, 3\)"),
    (np.zeros(0), {}, "non-empty"),
    (np.zeros(3), dict(temperature=-1.0), "temperature must be >= 0"),
    (np.zeros(3), dict(temperature=float("nan")), "temperature must be a finite number"),
    (np.zeros(3), dict(top_k=0), "top_k must be >= 1"),
    (np.zeros(3), dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (np.zeros(3), dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
])
def test_bad_input_is_named_and_draws_nothing(logits, kw, pattern):
    rng = S.XorShift64Star(5)
    kw = {"temperature": 1.0, **kw}
    with pytest.raises(ValueError, match=pattern):
        c_sample(logits, rng=rng, **kw)
    assert rng.state == S.XorShift64Star(5).state


def test_needs_an_rng_above_temperature_zero():
    with pytest.raises(ValueError, match="needs an rng"):
        c_sample(np.zeros(3), 1.0)


def test_generate_on_the_c_backend_samples_with_the_c_sampler():
    """Model(backend="c").generate runs the C sampler, and gives the tokens a loop of the C
    model's own logits through the oracle's sampler gives (same seed)."""
    m = tiny_model(arch="llama", dtype=np.float32, backend="c", vocab_size=300, d_model=32, n_layers=1,
                   n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
    assert m.ops.sample is c_sample
    prompt = np.array([3, 1, 4, 1, 5])
    gen = m.generate(prompt, 12, temperature=0.9, top_p=0.95, seed=2024, return_logits=True)
    rng = S.XorShift64Star(2024)
    assert gen.tokens == [S.sample(lg, 0.9, None, 0.95, rng) for lg in gen.logits]
