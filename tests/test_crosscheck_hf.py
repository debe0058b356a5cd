"""Cross-check against an independent implementation: `transformers` (torch).

Tiny random models (D = 32, 2 layers, vocab 128) are built with transformers,
saved with `save_pretrained`, loaded with `refimpl.load`, and compared with the
same HF model run in float64 (`model.double()`).  Tolerances are explained in
tests/test_golden_logits.py: float64 within 1e-9 max|logit|; float32 within
the composed bound `float32_bound` of the whole forward pass.

One HF detail: two Llama modules compute in float32 whatever the model dtype:
LlamaRotaryEmbedding (angles and cos/sin, an explicit `.float()`) and
LlamaRMSNorm (`hidden_states.to(torch.float32)` for the mean of squares); they
put ~1e-7 relative error in float64 Llama logits.  The float64 reference
therefore replaces those two forward methods by the same formulas in float64
(`_rotary_f64`, `_rms_norm_f64`); everything else, RoPE application and
attention included, is HF's code (sdpa attention, which keeps the dtype).
"""
from __future__ import annotations

import numpy as np
import pytest

import refimpl
import refimpl.io.load as rload
from refimpl.io.llama2c import save_llama2c
from refimpl.verify.compare import assert_within
from test_golden_logits import check_f64, float32_bound

pytestmark = pytest.mark.crosscheck

V, D, LAYERS, HEADS, P = 128, 32, 2, 4, 32


# --------------------------------------------------------------------------
# builders (also used by tests/data/make_golden.py)
# --------------------------------------------------------------------------


def hf_config(kind: str, V: int = V, P: int = P, D: int = D):
    import transformers as T
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                            bos_token_id=0, eos_token_id=None)
    if kind in ("llama_gqa", "llama_mha"):
        gqa = kind == "llama_gqa"
        return T.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=LAYERS,
                             num_attention_heads=HEADS, num_key_value_heads=2 if gqa else HEADS,
                             max_position_embeddings=P, rms_norm_eps=1e-5, tie_word_embeddings=not gqa,
                             bos_token_id=1, eos_token_id=2)
    if kind == "bert":
        return T.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=48, max_position_embeddings=P)
    raise ValueError(kind)


def build_hf(kind: str, seed: int, **sizes):
    """A transformers model of `kind` with seeded weights large enough to exercise every op.

    Matrices ~ N(0, 1/fan_in) (GPT-2's Conv1D is (in, out)), embeddings
    N(0, 0.5^2), norm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2).  float32.
    """
    import torch
    import transformers as T
    cls = {"gpt2": T.GPT2LMHeadModel, "llama_gqa": T.LlamaForCausalLM, "llama_mha": T.LlamaForCausalLM,
           "bert": T.BertModel}[kind]
    torch.manual_seed(seed)
    model = cls(hf_config(kind, **sizes)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim == 1:
                gain = name.endswith("weight") and ("norm" in name.lower() or ".ln_" in name)
                p.copy_((1.0 if gain else 0.0) + 0.1 * r)
            elif "embed" in name or name.split(".")[-2] in ("wte", "wpe"):
                p.copy_(0.5 * r)
            else:
                fan_in = p.shape[0] if kind == "gpt2" else p.shape[1]
                p.copy_(r / fan_in ** 0.5)
    return model


def _rotary_f64(rot, theta: float, dh: int):
    import torch

    def forward(x, position_ids):
        inv = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot.forward = forward


def _rms_norm_f64(norm):
    import torch

    def forward(h):
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    norm.forward = forward


def hf_float64(model):
    """A float64 copy of `model`, with Llama's float32 islands made float64 (see module docstring)."""
    import copy

    import torch
    m = copy.deepcopy(model).to(torch.float64).eval()
    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            _rms_norm_f64(mod)
    if hasattr(m, "model") and hasattr(m.model, "rotary_emb"):
        c = m.config
        theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
        _rotary_f64(m.model.rotary_emb, float(theta), c.hidden_size // c.num_attention_heads)
    return m


def hf_run(model64, ids, attention_mask=None):  # [B,T] -> [B,T,V] logits or [B,T,D] hidden states (numpy)
    import torch
    ids_t = torch.as_tensor(np.atleast_2d(ids))
    kw = {} if attention_mask is None else {"attention_mask": torch.as_tensor(np.atleast_2d(attention_mask))}
    with torch.no_grad():
        out = model64(input_ids=ids_t, **kw)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") and not hasattr(out, "logits")
            else out.logits).numpy()


IDS = np.array([5, 0, 127, 64, 3, 3, 99, 17, 42, 1, 8, 120])


@pytest.fixture(scope="module")
def hf():
    from conftest import require
    return require("torch"), require("transformers")


def check_both(path, want, ids, what, **kw):
    """refimpl float64 vs HF float64 (1e-9 relative) and refimpl float32 within the composed bound."""
    m64 = refimpl.load(path, dtype="float64")
    check_f64(m64.forward(ids, **kw), want, what + " float64")
    ref, bound = float32_bound(m64, ids, kw.get("attention_mask"))
    return assert_within(refimpl.load(path, dtype="float32").forward(ids, **kw), want, bound, what + " float32")


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "llama_mha"])
def test_causal_lm_matches_transformers(hf, tmp_path, kind):
    model = build_hf(kind, seed=11)
    model.save_pretrained(tmp_path)
    want = hf_run(hf_float64(model), IDS)[0]
    check_both(tmp_path, want, IDS, kind)
    cfg = refimpl.load(tmp_path).config
    assert cfg.n_kv_heads == (2 if kind == "llama_gqa" else HEADS)
    assert cfg.tie_embeddings == (kind != "llama_gqa")


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
def test_greedy_generation_matches_transformers(hf, tmp_path, kind):
    torch, _ = hf
    model = build_hf(kind, seed=12)
    model.save_pretrained(tmp_path)
    m64 = hf_float64(model)
    prompt = IDS[:5]
    with torch.no_grad():
        # attention_mask given: HF would otherwise mask every prompt token equal to pad_token_id
        out = m64.generate(torch.as_tensor(prompt)[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=m64.config.eos_token_id)
    want = out[0, len(prompt):].tolist()
    ours = refimpl.load(tmp_path, dtype="float64")
    got = ours.generate(prompt, 8, stop=ours.config.eos_token_id).tokens
    assert got == want


def test_bert_padded_batch_matches_transformers(hf, tmp_path):
    model = build_hf("bert", seed=13)
    model.save_pretrained(tmp_path)
    T = 10
    ids = np.stack([IDS[:T], np.concatenate([IDS[2:T - 1], np.zeros(3, np.int64)])])
    am = np.array([[1] * T, [1] * (T - 3) + [0] * 3])
    want = hf_run(hf_float64(model), ids, am)                    # [2,T,D], one batched HF call
    for b in range(2):                                           # the oracle runs one sequence at a time
        check_both(tmp_path, want[b], ids[b], f"bert seq {b}", attention_mask=am[b])


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(hf, tmp_path, kind, half):
    torch, _ = hf
    model = build_hf(kind, seed=14).to(getattr(torch, half))
    model.save_pretrained(tmp_path)
    from refimpl.io.safetensors import read_header
    stored = {dt for dt, _ in read_header(tmp_path / "model.safetensors").values()}
    assert stored == {"F16" if half == "float16" else "BF16"}
    want = hf_run(hf_float64(model), IDS)[0]                     # half -> float64 is exact on both sides
    check_f64(refimpl.load(tmp_path, dtype="float64").forward(IDS), want, f"{kind} {half}")


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_written_from_hf_matches_hf(hf, tmp_path, version):
    """HF Llama -> params (half-split RoPE) -> llama2.c .bin (wq/wk un-permuted to interleaved) -> same model."""
    model = build_hf("llama_gqa", seed=15)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = rload.load_params(tmp_path / "hf")
    save_llama2c(tmp_path / "m.bin", cfg, params, version=version)
    from_bin = refimpl.load(tmp_path / "m.bin", dtype="float64")
    assert from_bin.config.rope_interleaved and not cfg.rope_interleaved
    got = from_bin.forward(IDS)
    check_f64(got, refimpl.load(tmp_path / "hf", dtype="float64").forward(IDS), "llama2.c vs HF directory")
    check_f64(got, hf_run(hf_float64(model), IDS)[0], "llama2.c vs transformers")
