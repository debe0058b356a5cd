"""The C Llama and GPT-2 decode steps (csrc/kernels/decode.c, refimpl/kernels/c_decode.py).

It must give the same bits as the Python composition of the same C kernels (it runs the same
kernels in the same order), stay within the composed bound of the float64 oracle (fast and
_ref kernels alike), fill the KV cache exactly as the Python path does, and refuse bad input
with a message naming it.  This file runs in the sanitizer lane too.
"""
import numpy as np
import pytest

from refimpl.kernels.c_decode import STAGES, LlamaDecodeStep, decode_step
from refimpl.kernels.cdispatch import forced_path
from refimpl.kernels.model_bound import logits_with_bound
from refimpl.oracle.model import Model, random_params, tiny_config
from refimpl.timing import cycles
from refimpl.verify.compare import assert_within

CONFIGS = [("llama", {}), ("llama", {"n_kv_heads": 4}), ("llama", {"n_kv_heads": 1, "rope_interleaved": True}),
           ("llama", {"tie_embeddings": True, "n_kv_heads": 2}),    # tiny_config llama: GQA 4/2, untied head
           ("gpt2", {}), ("gpt2", {"tie_embeddings": False})]    # tiny_config gpt2: tied head


def _models(arch="llama", seed=0, **overrides):
    cfg = tiny_config(arch, **overrides)
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, seed).items()}
    fused = Model(cfg, params, "float32", backend="c")
    python = Model(cfg, params, "float32", backend="c")
    python.fused_decode = False
    return cfg, params, fused, python


@pytest.mark.parametrize("path", ["auto", "avx2", "portable"])
@pytest.mark.parametrize("arch, overrides", CONFIGS)
def test_fused_step_gives_the_python_compositions_bits(arch, overrides, path):
    cfg, _, fused, python = _models(arch, seed=2, **overrides)
    prompt = [7, 3, 11, 5]
    with forced_path(path):                  # both sides on the same SIMD path, whichever it is
        a = fused.generate(prompt, 10, return_logits=True)
        b = python.generate(prompt, 10, return_logits=True)
    assert fused._decode_step is not None and python._decode_step is None    # each took its own path
    assert a.tokens == b.tokens
    for t, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert np.array_equal(x, y), f"decode step {t}: max |diff| {np.max(np.abs(x - y)):.3e}"


@pytest.mark.parametrize("arch, overrides", CONFIGS[:3] + CONFIGS[4:5])
def test_cache_filled_as_the_python_path_fills_it(arch, overrides):
    cfg, _, fused, python = _models(arch, seed=5, **overrides)
    ids = [4, 9, 2, 30, 1]
    ca, cb = fused.new_cache(), python.new_cache()
    fused.forward(ids[:2], ca), python.forward(ids[:2], cb)          # prefill (Python path on both)
    for tok in ids[2:]:
        fused.forward([tok], ca), python.forward([tok], cb)
    assert ca.length == cb.length == len(ids)
    for i in range(cfg.n_layers):
        assert np.array_equal(ca.k[i], cb.k[i]) and np.array_equal(ca.v[i], cb.v[i]), f"layer {i}"


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "ref"])
@pytest.mark.parametrize("arch, overrides", CONFIGS[1:3] + CONFIGS[4:])
def test_step_within_composed_bound_of_oracle(reference, arch, overrides):
    cfg, params, fused, _ = _models(arch, seed=4, **overrides)
    oracle = Model(cfg, params, "float64")
    ids = np.array([7, 3, 11, 40, 2, 19, 8])
    want, bound = logits_with_bound(oracle, ids)
    step = decode_step(fused, reference=reference)
    cache = fused.new_cache()
    got = []
    for tok in ids:                                       # every position through the C step
        got.append(step(tok, cache)[0])
        cache.length += 1
    assert_within(np.stack(got), want, bound, f"C decode step ({'ref' if reference else 'fast'}) {arch} {overrides}")


def test_step_rejects_bad_input():
    cfg, _, fused, _ = _models()
    step = LlamaDecodeStep(fused)
    cache = fused.new_cache()
    with pytest.raises(ValueError, match=f"token {cfg.vocab_size} is out of range: vocab_size is {cfg.vocab_size}"):
        step(cfg.vocab_size, cache)
    cache.length = cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        step(1, cache)
    cache = fused.new_cache()
    cache.k[1] = cache.k[1].astype(np.float64)
    with pytest.raises(ValueError, match=r"cache\.k\[1\] must be a float32"):
        step(1, cache)
    cache = fused.new_cache()
    cache.v[0] = cache.v[0][:, ::2]
    with pytest.raises(ValueError, match=r"cache\.v\[0\]"):
        step(1, cache)
    with pytest.raises(ValueError, match="float32 llama or gpt2"):
        decode_step(Model(tiny_config("classic"), random_params(tiny_config("classic")), "float32", backend="c"))
    with pytest.raises(ValueError, match="float32 llama or gpt2"):
        decode_step(Model(cfg, random_params(cfg), "float64"))
    with pytest.raises(ValueError, match="got gpt2 float32"):      # a step built for the wrong arch
        LlamaDecodeStep(_models("gpt2")[2])


def test_traced_and_prefill_calls_take_the_python_path():
    """A trace needs every intermediate tensor, and T > 1 is prefill: both stay in Python."""
    cfg, _, fused, python = _models()
    seen = []
    cache = fused.new_cache()
    fused.forward([1, 2], cache)
    fused.forward([3], cache, trace=lambda name, x: seen.append(name))
    assert "layers.0.attn_norm" in seen and fused._decode_step is None


# ---------------------------------------------------------------- stage stamps (refimpl profile)

def _stamped(step, cache, token=5):
    """(logits, stage ticks, ticks of the whole call read from Python) of one stamped step."""
    step.stamps = True
    t0 = cycles()
    logits = step(token, cache)
    t1 = cycles()
    return logits, step.last_stages, t1 - t0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stage_stamps_keep_the_bits_and_fit_inside_the_call(arch):
    cfg, _, fused, _ = _models(arch, seed=3)
    step = decode_step(fused)
    plain = step(5, fused.new_cache())
    assert step.last_stages is None                       # stamps are off unless asked for
    logits, st, outer = _stamped(step, fused.new_cache())
    assert np.array_equal(plain, logits)
    assert list(st) == list(STAGES)
    assert all(v >= 0 for v in st.values()) and 0 < sum(st.values()) <= outer
    step.stamps = False
    step(5, fused.new_cache())
    assert step.last_stages is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("grow, stage", [({"d_ff": 1024}, "ffn"), ({"vocab_size": 4096}, "lm_head"),
                                         ({"d_model": 256}, None)])
def test_stage_stamps_charge_the_work_to_its_stage(arch, grow, stage):
    """16 to 64 times the work of one part of the model (d_ff 48 or 64 -> 1024, vocab 97 -> 4096):
    its stage's ticks grow the most.  A boundary charged to the wrong stage moves those ticks
    elsewhere and fails this.  The width D enters every stage; D = 256 makes each projection 64x
    bigger: attention then gains more ticks than the norms and the embedding."""
    def best(**overrides):
        _, _, fused, _ = _models(arch, seed=1, **overrides)
        step = decode_step(fused)
        runs = [_stamped(step, fused.new_cache())[1] for _ in range(7)]
        return {k: min(r[k] for r in runs) for k in STAGES}
    small, big = best(), best(**grow)
    gain = {k: big[k] - small[k] for k in STAGES}
    if stage is not None:
        assert max(gain, key=gain.get) == stage, (small, big)
        assert big[stage] >= 4 * small[stage], (small, big)
    else:
        assert gain["attention"] > max(gain["norms"], gain["embedding"]), (small, big)
