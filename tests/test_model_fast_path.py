"""Whole models on the fast path (C and Numba kernels) against the float64 oracle.

Rule (issue: "whole models on the fast path"): logits within the composed
bound of refimpl.kernels.model_bound; greedy ids identical to the oracle's
except where the oracle's top-2 margin is inside that bound.
"""
import numpy as np
import pytest

from refimpl.kernels.model_bound import greedy_agrees, logits_with_bound
from refimpl.oracle.model import Model, random_params, tiny_config
from refimpl.verify.compare import assert_within

BACKENDS = ["c", "numba"]


def _pair(arch, backend, seed=0, **cfg_overrides):
    cfg = tiny_config(arch, **cfg_overrides)
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, seed).items()}   # the same float32 weights
    return Model(cfg, params, "float64"), Model(cfg, params, "float32", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch, overrides", [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_heads": 4}),
                                             ("llama", {"n_kv_heads": 1, "rope_interleaved": True})])
def test_forward_logits_within_composed_bound(backend, arch, overrides):
    ref, fast = _pair(arch, backend, **overrides)
    ids = np.array([5, 1, 17, 42, 8, 96, 0, 33, 3, 61, 2])
    want, bound = logits_with_bound(ref, ids)
    assert_within(fast.forward(ids), want, bound, f"{arch} {overrides} logits on backend {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_matches_oracle_greedy_rule(backend, arch):
    ref, fast = _pair(arch, backend, seed=4)
    prompt = [7, 3, 11]
    gen = fast.generate(prompt, 12, return_logits=True)
    ids = np.array(prompt + gen.tokens)
    want, bound = logits_with_bound(ref, ids[:-1])           # oracle logits for every decode step
    steps = slice(len(prompt) - 1, None)
    assert_within(np.stack(gen.logits), want[steps], bound[steps], f"{arch} decode logits on {backend}")
    ok, why = greedy_agrees(gen.tokens, want[steps], bound[steps])
    assert ok, why


def test_fast_backends_refuse_float64():
    cfg = tiny_config("llama")
    with pytest.raises(ValueError, match="float32"):
        Model(cfg, random_params(cfg), "float64", backend="c")


def test_composed_bound_catches_a_wrong_rope_convention():
    """The bound is tight enough to fail a real port bug (here: RoPE in the other convention)."""
    cfg = tiny_config("llama")
    ref = Model(cfg, {k: v.astype(np.float32) for k, v in random_params(cfg, 0).items()}, "float64")
    cfg = tiny_config("llama", rope_interleaved=True)
    wrong = Model(cfg, {k: v.astype(np.float32) for k, v in ref.params.items()}, "float32")
    ids = np.arange(1, 12)
    want, bound = logits_with_bound(ref, ids)
    with pytest.raises(AssertionError, match="exceeds its bound"):
        assert_within(wrong.forward(ids), want, bound)
    # and the correct float32 oracle passes with the same bound
    right = Model(ref.config, {k: v.astype(np.float32) for k, v in ref.params.items()}, "float32")
    assert_within(right.forward(ids), want, bound)
