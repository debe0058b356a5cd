"""Decoding invariants of the oracle, as hypothesis properties.

Criterion for two float64 evaluations of the same math in different orders
(cache vs recompute, prefill vs token-by-token): max |d logit| <= 1e-9 max|logit|,
the float64 criterion the project uses against transformers.  A real bug
(wrong mask, wrong position, stale cache) moves logits by O(1e-2) or more.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refimpl.oracle.model import Model, random_params, tiny_config, tiny_model

DECODERS = ["gpt2", "llama", "classic"]
REL64 = 1e-9


def _close(a, b):
    return np.abs(a - b).max() <= REL64 * np.abs(b).max()


prompts = st.lists(st.integers(0, 96), min_size=1, max_size=12)


@settings(max_examples=8)
@given(arch=st.sampled_from(DECODERS), prompt=prompts, seed=st.integers(0, 3))
def test_cached_generation_equals_full_recompute(arch, prompt, seed):
    m = tiny_model(arch, seed=seed)
    gen = m.generate(prompt, 6, return_logits=True)
    ids = list(prompt)
    for tok, logits in zip(gen.tokens, gen.logits):
        full = m.forward(np.array(ids))[-1]               # no cache: the whole sequence again
        assert _close(logits, full)
        assert tok == int(np.argmax(full))
        ids.append(tok)


@settings(max_examples=8)
@given(arch=st.sampled_from(DECODERS), prompt=st.lists(st.integers(0, 96), min_size=2, max_size=16),
       data=st.data())
def test_prefill_equals_token_by_token_and_any_split(arch, prompt, data):
    m = tiny_model(arch, seed=1)
    ids = np.array(prompt)
    full = m.forward(ids, m.new_cache())
    one = m.new_cache()
    steps = np.concatenate([m.forward(ids[t:t + 1], one) for t in range(len(ids))])
    assert _close(steps, full)
    cut = data.draw(st.integers(1, len(ids) - 1))
    two = m.new_cache()
    split = np.concatenate([m.forward(ids[:cut], two), m.forward(ids[cut:], two)])
    assert _close(split, full)
    assert one.length == two.length == len(ids)


@settings(max_examples=6)
@given(n_kv=st.sampled_from([1, 2]), prompt=prompts)
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv, prompt):
    cfg = tiny_config("llama", n_kv_heads=n_kv)
    params = random_params(cfg, seed=5)
    gqa = Model(cfg, params)
    group, Dh = cfg.n_heads // n_kv, cfg.head_dim
    mha_cfg = tiny_config("llama", n_kv_heads=cfg.n_heads)
    mha_params = dict(params)
    for i in range(cfg.n_layers):
        for w in ("k_proj", "v_proj"):
            key = f"layers.{i}.self_attn.{w}.weight"
            heads = params[key].reshape(n_kv, Dh, cfg.d_model)          # rows grouped by kv head
            mha_params[key] = np.repeat(heads, group, axis=0).reshape(cfg.n_heads * Dh, cfg.d_model)
    mha = Model(mha_cfg, mha_params)
    a, b = gqa.forward(prompt), mha.forward(prompt)
    assert _close(a, b)
    # and GQA is not secretly MHA: dropping the repetition changes the result
    assert gqa.config.n_kv_heads == n_kv


@settings(max_examples=6)
@given(arch=st.sampled_from(DECODERS), seed=st.integers(0, 2 ** 32), temperature=st.sampled_from([0.7, 1.0, 1.5]),
       top_k=st.one_of(st.none(), st.integers(1, 20)), top_p=st.one_of(st.none(), st.floats(0.3, 1.0)))
def test_same_seed_same_stream(arch, seed, temperature, top_k, top_p):
    m = tiny_model(arch, seed=2)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    a = m.generate([1, 2, 3], 10, seed=seed, **kw).tokens
    b = m.generate([1, 2, 3], 10, seed=seed, **kw).tokens
    assert a == b
    if top_k == 1:
        assert a == m.generate([1, 2, 3], 10).tokens        # top-1 sampling is greedy


def test_different_seeds_give_different_streams():
    m = tiny_model("llama", seed=0)
    streams = {tuple(m.generate([1, 2], 12, temperature=1.0, seed=s).tokens) for s in range(6)}
    assert len(streams) > 1


def test_float32_model_stays_near_float64_oracle():
    m64, m32 = tiny_model("llama", dtype="float64"), tiny_model("llama", dtype="float32")
    a, b = m64.forward([3, 4, 5]), m32.forward([3, 4, 5])
    assert b.dtype == np.float32
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()     # float32 roundoff, far from a bug-sized gap


def test_stop_tokens_and_context_limit():
    m = tiny_model("gpt2")
    free = m.generate([1, 2, 3], 8).tokens
    stop_at = free[2]
    g = m.generate([1, 2, 3], 8, stop=[stop_at])
    assert g.tokens == free[: free.index(stop_at) + 1] and g.stopped == "stop"
    g = m.generate(list(range(60)), 20)
    assert g.stopped == "context" and len(g.tokens) == 64 - 60 + 1


@pytest.mark.parametrize("bad, match", [
    ([1, 97], "out of range: vocab_size is 97"),
    ([-1], r"ids\[0\] = -1 is out of range"),
    ([97], r"ids\[0\] = 97 is out of range: vocab_size is 97"),
    (np.array([2**63], np.uint64), r"ids\[0\] = 9223372036854775808 is out of range"),
    (np.array([5, 2**63], np.uint64), r"ids\[1\] = 9223372036854775808 is out of range"),
    ([], "non-empty"),
    (list(range(65)), "context limit max_seq_len = 64"),
])
def test_bad_ids_name_the_limit(bad, match):
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        m.forward(np.asarray(bad, dtype=getattr(bad, "dtype", np.int64)))
    with pytest.raises(ValueError, match=match.replace("ids", "prompt")):
        m.generate(np.asarray(bad, dtype=getattr(bad, "dtype", np.int64)), 3)


def test_bad_params_name_the_tensor():
    cfg = tiny_config("gpt2")
    p = random_params(cfg)
    q = dict(p); del q["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['h.1.mlp.c_fc.bias'\]"):
        Model(cfg, q)
    q = dict(p); q["h.9.ln_1.weight"] = np.ones(32)
    with pytest.raises(ValueError, match="unexpected tensor"):
        Model(cfg, q)
    q = dict(p); q["wpe.weight"] = np.ones((10, 32))
    with pytest.raises(ValueError, match=r"'wpe.weight' has shape \(10, 32\), config says \(64, 32\)"):
        Model(cfg, q)
