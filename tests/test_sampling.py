"""Sampling: the portable RNG against independent implementations (NumPy
uint64 arithmetic and a C program), and the kept sets of top-k / top-p against
their definitions, with exact (dyadic) probabilities at the boundaries."""
import shutil
import subprocess
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from refimpl.oracle import sampling as S


def _xorshift_numpy(seed, n):
    """The same spec, written again with numpy uint64 wrap-around arithmetic."""
    s = np.uint64(seed if seed else 0x853C49E6748FEA9B)
    out = []
    with np.errstate(over="ignore"):
        for _ in range(n):
            s ^= s >> np.uint64(12)
            s ^= s << np.uint64(25)
            s ^= s >> np.uint64(27)
            out.append(int((s * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32)))
    return out


@given(st.integers(0, 2 ** 64 - 1))
@example(0)
@example(1)
def test_rng_matches_an_independent_numpy_implementation(seed):
    r = S.XorShift64Star(seed)
    assert [r.next_u32() for _ in range(20)] == _xorshift_numpy(seed, 20)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")
def test_rng_matches_a_c_port(tmp_path):
    src = tmp_path / "rng.c"
    src.write_text(r"""
#include <stdio.h>
#include <stdint.h>
static uint32_t next(uint64_t *s) { *s ^= *s >> 12; *s ^= *s << 25; *s ^= *s >> 27;
  return (uint32_t)((*s * 0x2545F4914F6CDD1Dull) >> 32); }
int main(void) { uint64_t s = 42; for (int i = 0; i < 8; i++) { uint32_t u = next(&s);
  double f = (double)(next(&s) >> 8) / 16777216.0; printf("%u %.17g\n", u, f); } return 0; }
""")
    exe = tmp_path / "rng"
    subprocess.run(["gcc", "-O2", str(src), "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    r = S.XorShift64Star(42)
    for line in filter(None, lines):
        u, f = line.split()
        assert r.next_u32() == int(u)
        assert r.next_f64() == float(f)


def test_greedy_ties_pick_the_lowest_id():
    assert S.sample(np.array([0.0, 3.0, 1.0, 3.0])) == 1
    assert S.sample(np.array([1.0, 1.0])) == 0


def _expected_kept(p, top_k, top_p):
    """The definition, in exact rational arithmetic."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None:
        total = sum(Fraction(p[i]) for i in order)
        cum, kept = Fraction(0), []
        for i in order:
            kept.append(i)
            cum += Fraction(p[i]) / total
            if cum >= Fraction(top_p):
                break
        order = kept
    return order


@st.composite
def dyadic_probs(draw):
    """Probabilities that are multiples of 1/64 summing to 1: every sum is exact in float64."""
    n = draw(st.integers(1, 10))
    cuts = sorted(draw(st.lists(st.integers(0, 64), min_size=n - 1, max_size=n - 1)))
    counts = np.diff([0, *cuts, 64])
    return counts / 64.0


@given(dyadic_probs(), st.one_of(st.none(), st.integers(1, 12)),
       st.one_of(st.none(), st.sampled_from([1 / 64, 0.25, 0.5, 0.75, 0.875, 1.0])))
@example(np.array([0.5, 0.25, 0.25]), None, 0.75)          # boundary: cumulative mass exactly p
@example(np.array([0.25, 0.25, 0.25, 0.25]), 2, None)     # ties broken by id
@example(np.array([0.25, 0.25, 0.25, 0.25]), None, 0.5)
def test_top_k_top_p_keep_exactly_the_documented_set(p, top_k, top_p):
    got = S.kept_tokens(p, top_k, top_p).tolist()
    assert got == _expected_kept(p.tolist(), top_k, top_p)


def test_sampling_draws_only_from_the_kept_set_and_follows_the_cdf():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    rng = S.XorShift64Star(7)
    draws = [S.sample(logits, 1.0, top_p=0.75, rng=rng) for _ in range(4000)]
    assert set(draws) <= {0, 1}
    frac0 = draws.count(0) / len(draws)
    assert abs(frac0 - 2 / 3) < 0.03          # kept {0: 0.5, 1: 0.25} renormalised: 2/3, 1/3
    # the walk: r < 2/3 -> token 0; compare the stream with its definition
    rng1, rng2 = S.XorShift64Star(11), S.XorShift64Star(11)
    for _ in range(200):
        expect = 0 if rng2.next_f64() < 2 / 3 else 1
        assert S.sample(logits, 1.0, top_p=0.75, rng=rng1) == expect


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_k"):
        S.kept_tokens(np.array([0.5, 0.5]), 0, None)
    with pytest.raises(ValueError, match="top_p"):
        S.kept_tokens(np.array([0.5, 0.5]), None, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        S.sample(np.zeros(3), -1.0, rng=S.XorShift64Star(1))
    for t in (float("nan"), float("inf")):          # no silent NaN probabilities or uniform draw
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            S.sample(np.zeros(3), t, rng=S.XorShift64Star(1))
    with pytest.raises(ValueError, match="needs an rng"):
        S.sample(np.zeros(3), 1.0)
    for p in ("0.5", "abc", True):                  # "0.5" was read as 0.5, True as 1.0
        with pytest.raises(TypeError, match="top_p must be a number"):
            S.check_top(None, p)
    assert S.check_top(None, np.float32(0.5)) == (None, 0.5) and S.check_top(None, 1) == (None, 1.0)


@pytest.mark.parametrize("stop, err, match", [
    ("ab", TypeError, "stop must be a token id or an iterable of token ids, got str"),
    (2.7, TypeError, "got float 2.7"),
    ([2.7], TypeError, "stop must hold token ids .* got float 2.7"),     # was truncated to 2
    ([1, True], TypeError, "got bool True"),
])
def test_generate_names_a_bad_stop(stop, err, match):
    from refimpl.oracle.model import tiny_model
    with pytest.raises(err, match=match):
        tiny_model("gpt2").generate([1, 2], 2, stop=stop)


def test_generate_takes_stop_as_an_id_a_list_a_set_or_an_array():
    from refimpl.oracle.model import tiny_model
    m = tiny_model("gpt2")
    free = m.generate([1, 2], 6).tokens
    cut = free[: free.index(free[2]) + 1]
    for stop in (free[2], np.int64(free[2]), [free[2]], {free[2]}, np.array([free[2]])):
        assert m.generate([1, 2], 6, stop=stop).tokens == cut


def _literal_rule(p, top_k, top_p, r):
    """Steps 3-6 of the module docstring as a port would write them: plain Python float loops."""
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None:
        s = 0.0
        for i in order:
            s += p[i]
        c, n = 0.0, len(order)
        for j, i in enumerate(order):
            c += p[i] / s
            if c >= top_p:
                n = j + 1
                break
        order = order[:n]
    s = 0.0
    for i in order:
        s += p[i]
    c = 0.0
    for i in order:
        c += p[i] / s
        if c > r:
            return i, order
    return order[-1], order


def test_a_literal_port_of_the_rule_draws_the_oracles_tokens():
    """Given the same p, the docstring's rule written as plain loops keeps the same set and draws
    the same token, also with top_p placed exactly on running-sum boundaries (where a total
    summed in another order, e.g. NumPy's pairwise sum, keeps a different set)."""
    from refimpl.oracle.layers import softmax
    rng = np.random.default_rng(7)
    z = rng.standard_normal(1000) * 2.0
    p = softmax(z)
    pl = [float(x) for x in p]
    order = sorted(range(len(pl)), key=lambda i: (-pl[i], i))
    total = 0.0
    for i in order:
        total += pl[i]
    c, bounds = 0.0, []
    for i in order:
        c += pl[i] / total
        bounds.append(c)
    tops = [None, 1.0, 0.5] + [bounds[j] for j in range(0, 999, 37)]
    for seed, top_p in enumerate(tops, 1):
        for top_k in (None, 10, 400):
            want_tok, want_kept = _literal_rule(pl, top_k, top_p, S.XorShift64Star(seed).next_f64())
            assert list(S.kept_tokens(p, top_k, top_p)) == want_kept, (top_k, top_p)
            assert S.sample(z, 1.0, top_k, top_p, S.XorShift64Star(seed)) == want_tok, (top_k, top_p)


BAD_LOGITS = [([1.0, np.nan, 2.0], 1.0, r"logits\[1\] = nan"), ([1.0, np.nan], 0.0, r"logits\[1\] = nan"),
              ([1.0, np.inf, 2.0], 1.0, r"logits\[1\] = inf"), ([-np.inf, -np.inf], 1.0, "all -inf"),
              ([1.0, 3.0, 2.0], 5e-324, "overflows float64"), ([10.0, 30.0, 20.0], 1e-307, "overflows float64")]


@pytest.mark.parametrize("logits, temperature, match", BAD_LOGITS)
def test_both_samplers_refuse_logits_the_rule_has_no_answer_for(logits, temperature, match):
    """The oracle used to return token 0 here (NaN probabilities through lexsort and searchsorted):
    both samplers refuse, by the first bad index or the overflow, and draw nothing."""
    from refimpl.kernels.c_sample import sample as c_sample
    for sample in (S.sample, c_sample):
        rng = S.XorShift64Star(3)
        with pytest.raises(ValueError, match=match):
            sample(np.array(logits), temperature, rng=rng)
        assert rng.state == S.XorShift64Star(3).state
    assert S.sample(np.array([1.0, np.inf]), 0.0) == 1                 # greedy: +inf is the argmax
