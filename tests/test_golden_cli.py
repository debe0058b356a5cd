"""`refimpl golden`: files a port can check itself against, cross-checked with transformers."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import require

import refimpl
from refimpl.io.safetensors import load_file
from refimpl.oracle.sampling import XorShift64Star
from refimpl.verify.diff import diff


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    r = subprocess.run([sys.executable, "-m", "refimpl", "golden", "--out", str(d)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return d


def test_layout_and_readme(golden):
    readme = (golden / "README.md").read_text()
    for arch in ("gpt2", "llama", "bert"):
        for f in ("config.json", "model.safetensors", "golden.safetensors", "golden.json", "trace.safetensors"):
            assert (golden / arch / f).is_file(), (arch, f)
        assert f"`{arch}/`" in readme
    assert "xorshift64*" in readme and "greedy_top2_margins" in readme
    cfg = json.loads((golden / "llama" / "config.json").read_text())
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]           # GQA


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_vectors_are_self_consistent(golden, arch):
    g = load_file(golden / arch / "golden.safetensors")
    info = json.loads((golden / arch / "golden.json").read_text())
    assert g["logits"].dtype == np.float64 and g["logits"].shape == (len(info["input_ids"]), 97)
    # greedy tokens are the argmax of the logits they were chosen from; step 0 is the prompt's last row
    np.testing.assert_array_equal(g["greedy_tokens"], np.argmax(g["greedy_step_logits"], axis=-1))
    np.testing.assert_array_equal(g["greedy_step_logits"][0], g["logits"][-1])
    assert info["greedy_tokens"] == g["greedy_tokens"].tolist()
    assert info["sampled_tokens"] == g["sampled_tokens"].tolist()
    assert len(info["sampled_tokens"]) == info["max_new_tokens"]
    # refimpl.load reads the directory; a float32 load is within the documented bound
    m32 = refimpl.load(golden / arch, dtype="float32")
    z = m32.forward(g["input_ids"])
    T, D, F = len(info["input_ids"]), m32.config.d_model, m32.config.d_ff
    n = (m32.config.n_layers + 2) * (D + F + T)
    u = 2.0 ** -24
    assert np.abs(z - g["logits"]).max() <= 2 * n * u / (1 - n * u) * np.abs(g["logits"]).max()


def test_documented_rng_first_draws():
    # xorshift64* by hand (module docstring of refimpl.oracle.sampling), independent of the class
    s, M = 1234, (1 << 64) - 1
    want = []
    for _ in range(3):
        s ^= s >> 12
        s ^= (s << 25) & M
        s ^= s >> 27
        want.append((((s * 0x2545F4914F6CDD1D) & M) >> 32 >> 8) / 2 ** 24)
    rng = XorShift64Star(1234)
    assert [rng.next_f64() for _ in range(3)] == want


def test_golden_trace_locates_a_port_bug(golden, tmp_path, monkeypatch):
    from refimpl.oracle import layers as L
    from refimpl.verify.trace import record, write_trace
    ref = golden / "gpt2" / "trace.safetensors"
    assert diff(ref, ref).passed
    ids = load_file(golden / "gpt2" / "golden.safetensors")["input_ids"]
    with monkeypatch.context() as m:            # a "port" that uses the erf GELU
        m.setattr(L, "gelu_tanh", L.gelu_erf)
        tr = record(refimpl.load(golden / "gpt2", dtype="float32"), ids)
    write_trace(tmp_path / "port.safetensors", tr, ids, "float32")      # no model in its metadata
    rep = diff(ref, tmp_path / "port.safetensors")   # the golden trace names its model: "." = its directory
    assert rep.first_bad.name == "layers.0.ffn_hidden"
    assert rep.trap is not None and rep.trap.label == "gelu_erf", rep.text()


@pytest.mark.crosscheck
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_transformers_reproduces_golden_outputs(golden, arch):
    torch = require("torch")
    transformers = require("transformers")
    torch.set_num_threads(1)
    g = load_file(golden / arch / "golden.safetensors")
    cls = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "bert": transformers.BertModel}[arch]
    model = cls.from_pretrained(str(golden / arch), torch_dtype=torch.float64, attn_implementation="eager")
    model.eval()
    ids = torch.from_numpy(g["input_ids"])[None]
    with torch.no_grad():
        out = model(ids)
    got = (out.last_hidden_state if arch == "bert" else out.logits)[0].numpy()
    want = g["last_hidden_state" if arch == "bert" else "logits"]
    scale = np.abs(want).max()
    if arch == "llama":
        # HF Llama builds the RoPE tables and runs RMSNorm in float32 even in a float64 model:
        # the README's float32 bound, n = (layers + 2)(D + F + T), u = 2^-24
        n = (2 + 2) * (32 + 48 + len(g["input_ids"]))
        tol = 2 * n * 2.0 ** -24 / (1 - n * 2.0 ** -24) * scale
    else:
        tol = 1e-10 * scale     # both are float64 computations of the same math
    assert np.abs(got - want).max() <= tol
    if arch != "bert":
        gen = model.generate(ids, max_new_tokens=len(g["greedy_tokens"]), do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
        assert gen[0, ids.shape[1]:].tolist() == g["greedy_tokens"].tolist()
