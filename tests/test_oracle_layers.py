"""The oracle's layers against independent truths: closed forms, hand-computed
values, algebraic identities, and torch in float64 (when installed)."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from hypothesis.extra import numpy as hnp

from conftest import require
from refimpl.oracle import layers as L

F64_TOL = 64 * 2.0 ** -53   # a few ulps of float64: these are single formulas of a few roundings


def test_worked_example_of_the_article_done_right():
    # design.md, "The article's worked example, done right" (values computed by hand there)
    Q = np.array([[1, 0], [0, 1], [1, 1]], float)
    K = np.array([[0, 1], [1, 0], [1, 2]], float)
    V = np.array([[2, 0], [0, 2], [2, 1]], float)
    assert (Q @ K.T == np.array([[0, 1, 1], [1, 0, 2], [1, 1, 3]])).all()
    np.testing.assert_allclose(L.softmax(np.array([1.0, 2.0])), [0.2689414, 0.7310586], atol=1e-7)
    P = L.attention_probs(Q, K)
    np.testing.assert_allclose(P[0], [0.1978, 0.4011, 0.4011], atol=1e-4)
    np.testing.assert_allclose(L.attention(Q, K, V)[0], [1.1978, 1.2033], atol=1e-4)
    assert L.softmax(np.array([1.0, 1.0])).tolist() == [0.5, 0.5]


def test_softmax_closed_form_row():
    # softmax([0, log 2, log 5]) = [1, 2, 5] / 8
    p = L.softmax(np.array([0.0, math.log(2), math.log(5)]))
    np.testing.assert_allclose(p, [1 / 8, 2 / 8, 5 / 8], rtol=4 * F64_TOL)


@given(hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(-1e308, 1e308)))
@example(np.array([3e38, -3e38, 88.0, -88.0]))
@example(np.array([1e308, 1e308]))
def test_softmax_never_overflows_and_sums_to_one(x):
    p = L.softmax(x)
    assert np.isfinite(p).all() and (p >= 0).all()
    assert abs(p.sum() - 1) <= (x.size + 3) * 2.0 ** -53 * 4
    assert p[np.argmax(x)] == p.max()


def test_softmax_masks_and_nan():
    x = np.array([[1.0, -np.inf, 2.0], [-np.inf, -np.inf, -np.inf], [1.0, np.nan, 0.0]])
    p = L.softmax(x)
    assert p[0, 1] == 0.0 and abs(p[0].sum() - 1) < 1e-15          # masked entry exactly 0
    assert (p[1] == 0).all()                                          # fully masked row: all zeros (documented)
    assert np.isnan(p[2]).all()                                       # NaN poisons its row


def test_causal_mask_with_cache_offset():
    m = L.causal_mask(2, 5)            # 2 new queries after 3 cached keys
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    assert (L.causal_mask(4, 4) == np.tril(np.ones((4, 4), bool))).all()


def test_sinusoidal_positions_match_the_paper():
    D = 8
    pe = L.sinusoidal_positions(5, D)
    for p in range(5):
        for i in range(D // 2):
            assert pe[p, 2 * i] == pytest.approx(math.sin(p / 10000 ** (2 * i / D)), abs=1e-15)
            assert pe[p, 2 * i + 1] == pytest.approx(math.cos(p / 10000 ** (2 * i / D)), abs=1e-15)
    assert (L.sinusoidal_positions(3, D, offset=2) == pe[2:5]).all()


@given(st.integers(1, 6), st.integers(0, 50), st.integers(0, 50), st.sampled_from([10000.0, 500000.0]))
def test_rope_is_a_rotation_that_sees_only_relative_position(half_dh, m, n, theta):
    rng = np.random.default_rng(half_dh * 1000 + m)
    Dh = 2 * half_dh
    q, k = rng.standard_normal((1, Dh)), rng.standard_normal((1, Dh))
    for rope in (L.rope_half, L.rope_interleaved):
        qm = rope(q, [m], theta)
        assert np.linalg.norm(qm) == pytest.approx(np.linalg.norm(q), rel=1e-13)
        # <R_m q, R_n k> = <R_{m-n} q, k> when m >= n
        lhs = (rope(q, [m], theta) @ rope(k, [n], theta).T).item()
        rhs = (rope(q, [m - n], theta) @ k.T).item() if m >= n else (q @ rope(k, [n - m], theta).T).item()
        assert lhs == pytest.approx(rhs, abs=1e-11 * (1 + abs(lhs)))


def test_rope_conventions_differ_by_a_permutation():
    rng = np.random.default_rng(1)
    Dh = 8
    x = rng.standard_normal((3, Dh))
    pos = np.array([0, 3, 7])
    perm = np.concatenate([np.arange(0, Dh, 2), np.arange(1, Dh, 2)])   # interleaved -> half layout
    a = L.rope_interleaved(x, pos)
    b = L.rope_half(x[:, perm], pos)
    np.testing.assert_allclose(a[:, perm], b, atol=1e-15)
    assert np.abs(L.rope_half(x, pos) - a).max() > 0.1                  # and they are not the same map


@pytest.mark.parametrize("rope", [L.rope_half, L.rope_interleaved])
def test_rope_refuses_an_odd_head_width_by_name(rope):
    # the half split read x[..., :2] and x[..., 2:] of Dh = 5 and failed in numpy's broadcasting
    with pytest.raises(ValueError, match="head width Dh=5 must be even"):
        rope(np.ones((3, 5)), np.arange(3))


def test_layer_norm_and_rms_norm_by_definition():
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    w, b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.0, 1.0, 0.0, -1.0])
    mean, var = 3.0, (4 + 1 + 0 + 9) / 4
    np.testing.assert_allclose(L.layer_norm(x, w, b, 1e-5), (x - mean) / math.sqrt(var + 1e-5) * w + b, rtol=1e-15)
    ms = (1 + 4 + 9 + 36) / 4
    np.testing.assert_allclose(L.rms_norm(x, w, 1e-6), x / math.sqrt(ms + 1e-6) * w, rtol=1e-15)


def test_gelu_variants_are_distinct_and_match_their_formulas():
    x = np.linspace(-6, 6, 49)
    erf = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in x])
    np.testing.assert_allclose(L.gelu_erf(x), erf, rtol=1e-15, atol=1e-300)
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(L.gelu_tanh(x), tanh, rtol=1e-15)
    assert np.abs(L.gelu_tanh(x) - L.gelu_erf(x)).max() > 1e-4      # named distinctly for a reason
    np.testing.assert_allclose(L.silu(x), x / (1 + np.exp(-x)), rtol=1e-15)


def test_gqa_reads_kv_head_h_over_group():
    rng = np.random.default_rng(0)
    H, Hkv, T, Dh = 8, 2, 5, 4
    q, k, v = rng.standard_normal((H, T, Dh)), rng.standard_normal((Hkv, T, Dh)), rng.standard_normal((Hkv, T, Dh))
    mask = L.causal_mask(T, T)
    o = L.multi_head_attention(q, k, v, mask)
    o_rep = L.multi_head_attention(q, np.repeat(k, H // Hkv, 0), np.repeat(v, H // Hkv, 0), mask)
    assert (o == o_rep).all()
    with pytest.raises(ValueError, match="multiple"):
        L.multi_head_attention(q[:3], k, v)


# --- torch in float64 as an independent implementation ----------------------------------

@pytest.mark.crosscheck
def test_layers_match_torch_float64():
    torch = require("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    x = rng.standard_normal((7, 16)) * 3
    w, b = rng.standard_normal(16), rng.standard_normal(16)
    t = torch.from_numpy
    tol = dict(rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(L.layer_norm(x, w, b, 1e-5), F.layer_norm(t(x), (16,), t(w), t(b), 1e-5).numpy(), **tol)
    np.testing.assert_allclose(L.rms_norm(x, w, 1e-6), F.rms_norm(t(x), (16,), t(w), 1e-6).numpy(), **tol)
    np.testing.assert_allclose(L.gelu_tanh(x), F.gelu(t(x), approximate="tanh").numpy(), **tol)
    np.testing.assert_allclose(L.gelu_erf(x), F.gelu(t(x)).numpy(), **tol)
    np.testing.assert_allclose(L.silu(x), F.silu(t(x)).numpy(), **tol)
    np.testing.assert_allclose(L.softmax(x), torch.softmax(t(x), -1).numpy(), **tol)
    H, Hkv, T, S, Dh = 6, 2, 3, 9, 8
    q, k, v = rng.standard_normal((H, T, Dh)), rng.standard_normal((Hkv, S, Dh)), rng.standard_normal((Hkv, S, Dh))
    ours = L.multi_head_attention(q, k, v, L.causal_mask(T, S))
    ref = F.scaled_dot_product_attention(t(q), t(np.repeat(k, 3, 0)), t(np.repeat(v, 3, 0)),
                                         attn_mask=t(L.causal_mask(T, S)))
    np.testing.assert_allclose(ours, ref.numpy(), **tol)


def test_attention_takes_a_bool_keep_mask_only():
    """An additive mask (0 keep, -1e10 drop) read as a truth value would keep exactly the
    dropped keys: only bool is taken, and a mask that does not fit the scores is named."""
    q, k, v = np.random.default_rng(0).standard_normal((3, 3, 4))
    keep = L.causal_mask(3, 3)
    p = L.attention_probs(q, k, keep)
    assert (p[~keep] == 0).all() and np.allclose(p.sum(-1), 1)
    with pytest.raises(TypeError, match="mask must be a bool array.*m == 0"):
        L.attention_probs(q, k, np.where(keep, 0.0, -1e10))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        L.attention(q, k, v, keep.astype(np.int64))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\) does not fit the scores' shape \(3, 3\)"):
        L.attention_probs(q, k, keep[:2])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 3\) does not fit the scores' shape \(3, 3\)"):
        L.attention_probs(q, k, np.ones((2, 3, 3), bool))       # would broadcast the scores up to 3-D
    with pytest.raises(ValueError, match="causal_mask: T=4 queries must be 0..S=3"):
        L.causal_mask(4, 3)


def test_integer_inputs_are_computed_in_float64():
    """The module's promise: integers are computed in float64, never in integers (int16 x*x
    wrapped to NaN in rms_norm; int8 100*2 + 100*2 wrapped to -112 in linear)."""
    x16 = np.array([[200, 300]], np.int16)
    assert np.array_equal(L.rms_norm(x16, np.ones(2)), L.rms_norm(x16.astype(np.float64), np.ones(2)))
    assert L.linear(np.array([[100, 100]], np.int8), np.array([[2, 2]], np.int8)).tolist() == [[400.0]]
    assert L.layer_norm(x16, np.ones(2), np.zeros(2)).dtype == np.float64
    assert L.relu(np.array([-3, 4], np.int8)).dtype == np.float64
