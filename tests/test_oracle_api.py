"""The oracle's Python API under a user's slips: each was a silent wrong result or a raw error."""
import numpy as np
import pytest

import refimpl
from refimpl.oracle import layers as L
from refimpl.oracle.config import Config
from refimpl.oracle.model import KVCache, Model, random_params, tiny_config, tiny_model


def test_the_model_owns_its_weights():
    """Changing the caller's arrays after building the model changed some weights (those not yet
    copied for the kernels) and not others: the model now keeps copies."""
    cfg = tiny_config("llama")
    p = random_params(cfg)
    m = Model(cfg, p)
    before = m.forward([1, 2, 3])
    p["norm.weight"] *= 3
    p["layers.0.self_attn.q_proj.weight"] *= 3
    np.testing.assert_array_equal(m.forward([1, 2, 3]), before)


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "int32"])
def test_a_model_computes_in_float32_or_float64_only(dtype):
    cfg = tiny_config("llama")
    with pytest.raises(ValueError, match="dtype must be"):
        Model(cfg, random_params(cfg), dtype=dtype)


def test_layers_compute_integer_inputs_in_float64():
    """sqrt(2/pi) and 1/sqrt(Dh) were cast to the integers' dtype (0): GELU of [-2..2] came out
    as [-1, -0.5, 0, 0.5, 1] and attention probabilities uniform."""
    i, f = np.arange(-2, 3), np.arange(-2, 3, dtype=np.float64)
    np.testing.assert_array_equal(L.gelu_tanh(i), L.gelu_tanh(f))
    np.testing.assert_array_equal(L.gelu_erf(i), L.gelu_erf(f))
    q = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(L.attention_probs(q, q), L.attention_probs(q * 1.0, q * 1.0))
    x = np.ones((1, 4), int)
    np.testing.assert_array_equal(L.rope(x, [1]), L.rope(x * 1.0, [1]))
    assert L.gelu_tanh(np.ones(3, np.float32)).dtype == np.float32      # floats keep their dtype


def test_grouped_key_value_heads_are_llama_only():
    with pytest.raises(ValueError, match="n_kv_heads=2: gpt2 has one key/value head per query head"):
        Config("gpt2", 50, 32, 2, 4, 64, 16, n_kv_heads=2)
    assert Config("llama", 50, 32, 2, 4, 64, 16, n_kv_heads=2).n_kv_heads == 2


def test_forward_checks_its_cache_and_trace():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="cache holds 2 layers of .* float32; this model needs 2 layers"):
        m.forward([1, 2], KVCache(m.config, np.float32))               # stored float32 keys silently
    with pytest.raises(ValueError, match="cache holds 3 layers"):
        m.forward([1, 2], tiny_model("llama", n_layers=3).new_cache())
    with pytest.raises(TypeError, match="a trace callback goes by keyword: trace="):
        m.forward([1, 2], lambda name, a: None)
    with pytest.raises(TypeError, match="trace must be a callable"):
        m.forward([1, 2], trace="yes")
    cache = m.new_cache()
    m.forward([1, 2], cache)                                           # the right one still works
    assert cache.length == 2


def test_generate_checks_its_arguments():
    m = tiny_model("llama")
    out = m.generate([1, 2], 5, stop=np.array([5, 6]))                 # was: "truth value ... ambiguous"
    assert 1 <= len(out.tokens) <= 5
    for bad in (None, 2.7, -1, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            m.generate([1, 2], bad)
    for bad in (1.5, -1, 2 ** 64):                                     # 2**64 wrapped onto seed 0
        with pytest.raises(ValueError, match="seed must be an int in 0..2\\^64-1"):
            m.generate([1, 2], 3, temperature=0.8, seed=bad)


def test_bert_token_types_must_be_integers():
    m = tiny_model("bert")
    with pytest.raises(TypeError, match="token_type_ids must be integers"):
        m.forward([1, 2, 3], token_type_ids=[0.5, 0.2, 1.7])           # was truncated to [0, 0, 1]
    m.forward([1, 2, 3], token_type_ids=[0, 0, 1])


def test_tiny_model_overrides_and_load_of_tiny():
    assert refimpl.tiny_model("llama", n_layers=3).config.n_layers == 3
    m = refimpl.load("tiny:llama:1", dtype="float64")
    np.testing.assert_array_equal(m.forward([1, 2]), refimpl.tiny_model("llama", seed=1).forward([1, 2]))


def test_unknown_backend_and_wrong_rng_are_named():
    with pytest.raises(ValueError, match="backend must be 'numpy' \\(the oracle\\), 'numba' or 'c', got 'cuda'"):
        refimpl.load("tiny:llama", backend="cuda")                    # was a KeyError
    from refimpl.oracle.sampling import XorShift64Star, sample
    logits = np.array([0.0, 1.0, 2.0])
    for rng in (np.random.default_rng(0), 7):
        with pytest.raises(TypeError, match="rng must be an XorShift64Star"):
            sample(logits, 0.8, rng=rng)                               # was an AttributeError
    assert sample(logits, 0.8, rng=XorShift64Star(7)) in (0, 1, 2)


def test_unit_roundoff_of_bfloat16():
    from refimpl.kernels.contracts import unit_roundoff
    assert unit_roundoff("bfloat16") == 2.0 ** -8 and unit_roundoff(np.float32) == 2.0 ** -24


def test_missing_weights_under_a_prefix_say_so():
    """`Model(cfg, hf_model.state_dict())`: the keys carry "transformer."; the error says so."""
    cfg = tiny_config("gpt2")
    p = {("transformer." + k): v for k, v in random_params(cfg).items()}
    with pytest.raises(ValueError, match=r"28 missing\) .*; 28 given key\(s\) carry a prefix \('transformer\.'\)"):
        Model(cfg, p)


def test_a_model_takes_torch_parameters_and_bfloat16_tensors():
    """`Model(cfg, dict(port.named_parameters()))` raised torch's "Can't call numpy() on Tensor
    that requires grad", and bfloat16 tensors (which NumPy lacks) failed in the conversion."""
    from conftest import require
    torch = require("torch")
    cfg = tiny_config("llama")
    p = random_params(cfg)
    want = Model(cfg, p).forward([1, 2, 3])
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p.items()}
    np.testing.assert_array_equal(Model(cfg, params).forward([1, 2, 3]), want)
    bf16 = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in p.items()}
    m = Model(cfg, bf16, "float32")
    for k, v in bf16.items():                         # float32 holds every bfloat16 exactly
        np.testing.assert_array_equal(m.params[k], v.float().numpy())
