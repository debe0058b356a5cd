"""Traces (names, order, layout) and `diff`: the planted layer and the convention trap are named.

Bugs are planted by monkeypatching the oracle layer function a Model uses,
then tracing the same tiny model twice (reference and planted).
"""
import subprocess
import sys

import numpy as np
import pytest

from refimpl.io.safetensors import load as st_load
from refimpl.oracle import layers as L
from refimpl.oracle.model import tiny_model
from refimpl.verify.diff import diff
from refimpl.verify.trace import read_trace, record, trace_names, trace_to_file, write_trace

IDS = [1, 5, 9, 3, 7]
ORIG = {k: getattr(L, k) for k in ("rope", "layer_norm", "rms_norm", "attention_probs", "causal_mask", "gelu_tanh")}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "classic"])
def test_trace_names_order_and_shapes(arch, tmp_path):
    m = tiny_model(arch)
    c = m.config
    tr = record(m, IDS)
    assert list(tr) == trace_names(c.n_layers, with_logits=arch != "bert")
    T, D, H, Hkv, Dh, F = len(IDS), c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff
    assert tr["embed"].shape == (T, D)
    assert tr["layers.0.q"].shape == (H, T, Dh) and tr["layers.1.k"].shape == (Hkv, T, Dh)
    assert tr["layers.0.attn_probs"].shape == (H, T, T)
    assert tr["layers.1.ffn_hidden"].shape == (T, F)
    if arch != "bert":
        assert tr["logits"].shape == (T, c.vocab_size)
        np.testing.assert_array_equal(tr["logits"], m.forward(np.array(IDS)))
    # the file: safetensors with the documented metadata, order preserved on reading
    path = tmp_path / "t.safetensors"
    write_trace(path, tr, IDS, "float64", arch, f"tiny:{arch}")
    tensors, meta = st_load(path)
    assert meta["format"] == "refimpl-trace" and meta["version"] == "1" and meta["ids"] == "1,5,9,3,7"
    assert meta["order"].split(",") == list(tr)
    back, _ = read_trace(path)
    assert list(back) == list(tr) and all(np.array_equal(back[k], tr[k]) for k in tr)


def test_read_trace_rejects_non_traces(tmp_path):
    from refimpl.io.safetensors import save_file
    save_file({"x": np.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a refimpl trace"):
        read_trace(tmp_path / "plain.safetensors")
    save_file({"x": np.zeros(2)}, tmp_path / "bad.safetensors",
              {"format": "refimpl-trace", "version": "1", "order": "x,y"})
    with pytest.raises(ValueError, match="'y', which is not in the file"):
        read_trace(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def ref_traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    return {arch: trace_to_file(f"tiny:{arch}", IDS, d / f"{arch}.safetensors") and d / f"{arch}.safetensors"
            for arch in ("gpt2", "llama", "bert", "classic")}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "classic"])
def test_float32_port_is_within_bound(arch, ref_traces, tmp_path):
    trace_to_file(f"tiny:{arch}", IDS, tmp_path / "f32.safetensors", dtype="float32")
    rep = diff(ref_traces[arch], tmp_path / "f32.safetensors")
    assert rep.passed, rep.text()
    assert rep.u == 2.0 ** -24
    assert max(t.stats.bound_ratio for t in rep.tensors) < 0.2


def _plant(monkeypatch, tmp_path, arch, attr, fn):
    with monkeypatch.context() as m:
        m.setattr(L, attr, fn)
        trace_to_file(f"tiny:{arch}", IDS, tmp_path / "planted.safetensors")
    return tmp_path / "planted.safetensors"


def ln_eps_outside(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / (np.sqrt(var) + eps) * w + b


def rms_eps_outside(x, w, eps=1e-6):
    return x / (np.sqrt((x * x).mean(-1, keepdims=True)) + eps) * w


def probs_unscaled(q, k, mask=None, scale=None):
    return ORIG["attention_probs"](q, k, mask, 1.0)


def mask_sees_next(T, S):
    return np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None] + 1


def probs_finite_mask(q, k, mask=None, scale=None):   # mask adds -1: "large negative" far too small
    s = (q @ k.T) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = s + np.where(mask, 0.0, -1.0)             # a "large negative" that is not large enough
    return L.softmax(s)


PLANTS = [
    ("gpt2", "gelu_tanh", L.gelu_erf, "layers.0.ffn_hidden", "gelu_erf"),
    ("llama", "rope", lambda x, p, theta=10000.0, interleaved=False: ORIG["rope"](x, p, theta, not interleaved),
     "layers.0.q", "rope interleaved"),
    ("gpt2", "layer_norm", ln_eps_outside, "layers.0.attn_norm", "eps outside sqrt"),
    ("llama", "rms_norm", rms_eps_outside, "layers.0.attn_norm", "eps outside sqrt"),
    ("bert", "layer_norm", ln_eps_outside, "embed", "eps outside sqrt"),
    ("classic", "layer_norm", ln_eps_outside, "layers.0.resid_attn", "eps outside sqrt"),
    ("gpt2", "attention_probs", probs_unscaled, "layers.0.attn_probs", "no scale"),
    ("llama", "causal_mask", mask_sees_next, "layers.0.attn_probs", "mask +1 (sees next token)"),
]


@pytest.mark.parametrize("arch,attr,fn,layer,trap", PLANTS, ids=[f"{p[0]}-{p[4]}" for p in PLANTS])
def test_diff_names_planted_layer_and_trap(arch, attr, fn, layer, trap, ref_traces, tmp_path, monkeypatch):
    b = _plant(monkeypatch, tmp_path, arch, attr, fn)
    rep = diff(ref_traces[arch], b)
    assert not rep.passed
    assert rep.first_bad.name == layer, rep.text()
    assert rep.trap is not None and rep.trap.label == trap, rep.text()
    assert rep.reference_ratio > 1 and rep.trap.ratio <= 1
    assert f"first tensor out of bound: {layer}" in rep.text()


@pytest.mark.parametrize("attr,fn,trap", [("causal_mask", mask_sees_next, "mask +1 (sees next token)"),
                                           ("kv_head_of", lambda h, H, Hkv: h % Hkv, "GQA h % Hkv")])
def test_a_fused_port_without_attn_probs_still_gets_the_attention_trap(attr, fn, trap, ref_traces, tmp_path,
                                                                       monkeypatch):
    """TRACE.md lets a fused attention leave attn_probs out; its traps were then "no known
    convention trap for layers.0.attn_out".  They are recomputed from B's q and k."""
    from refimpl.io.safetensors import save_file
    t, meta = st_load(_plant(monkeypatch, tmp_path, "llama", attr, fn))
    keep = [k for k in t if not k.endswith("attn_probs")]
    meta["order"] = ",".join(keep)
    save_file({k: t[k] for k in keep}, tmp_path / "fused.safetensors", meta)
    rep = diff(ref_traces["llama"], tmp_path / "fused.safetensors")
    assert rep.first_bad.name == "layers.0.attn_out", rep.text()
    assert rep.trap is not None and rep.trap.label == trap, rep.text()
    assert "recomputed from q and k" in rep.trap_family and rep.reference_ratio > 1 >= rep.trap.ratio


def test_unexplained_divergence_is_reported_without_a_trap(ref_traces, tmp_path, monkeypatch):
    b = _plant(monkeypatch, tmp_path, "gpt2", "attention_probs", probs_finite_mask)
    rep = diff(ref_traces["gpt2"], b)
    assert rep.first_bad.name == "layers.0.attn_probs" and rep.trap is None
    assert any("no known convention" in n for n in rep.notes)


def test_diff_without_model_metadata_still_names_the_layer(ref_traces, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(L, "gelu_tanh", L.gelu_erf)
        tr = record(tiny_model("gpt2"), IDS)
    del tr["layers.0.attn_probs"]                       # a port with a fused attention kernel
    write_trace(tmp_path / "port.safetensors", tr, IDS, "float64")
    rep = diff(ref_traces["gpt2"], tmp_path / "port.safetensors", model="tiny:gpt2")
    assert rep.first_bad.name == "layers.0.ffn_hidden" and rep.trap.label == "gelu_erf"
    assert "layers.0.attn_probs" in rep.only_a
    rep = diff(ref_traces["gpt2"], tmp_path / "port.safetensors")   # model from A's metadata
    assert rep.trap is not None
    with pytest.raises(ValueError, match="different inputs"):
        write_trace(tmp_path / "other.safetensors", tr, [1, 2, 3, 4, 5], "float64")
        diff(ref_traces["gpt2"], tmp_path / "other.safetensors")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "refimpl", *args], capture_output=True, text=True, timeout=300)


def test_cli_trace_and_diff(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    r = _cli("trace", "tiny:llama", "--ids", "1,2,3", "--out", str(a))
    assert r.returncode == 0, r.stderr
    r = _cli("trace", "tiny:llama", "--ids", "1,2,3", "--out", str(b), "--dtype", "float32")
    assert r.returncode == 0
    r = _cli("diff", str(a), str(b), "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0 and "PASS" in r.stdout
    r = _cli("trace", "tiny:nope", "--ids", "1", "--out", str(b))
    assert r.returncode == 2 and "tiny:ARCH" in r.stderr
    r = _cli("trace", "tiny:gpt2", "--ids", "1,500", "--out", str(b))
    assert r.returncode == 2 and "out of range" in r.stderr
    r = _cli("diff", str(a), str(tmp_path / "missing.safetensors"))
    assert r.returncode == 2
    from refimpl.verify.golden import write_model
    write_model(tmp_path, "gpt2", 0)                    # a checkpoint directory without a tokenizer
    r = _cli("trace", str(tmp_path / "gpt2"), "--prompt", "!#", "--out", str(b))   # ids 33, 35 < V = 97
    assert r.returncode == 0 and "no tokenizer found next to the checkpoint; using bytes" in r.stderr, r.stderr


def test_diff_refuses_a_model_it_cannot_load_even_when_the_traces_agree(ref_traces, tmp_path, capsys):
    from refimpl.cli import main
    a = str(ref_traces["llama"])
    for model, words in ((str(tmp_path / "nosuch"), "nosuch does not exist"), ("tiny:nope", "tiny:ARCH")):
        assert main(["diff", a, a, "--model", model]) == 2
        out, err = capsys.readouterr()
        assert f"--model {model}: " in err and words in err and "PASS" not in out
        with pytest.raises(ValueError, match=words):
            diff(a, a, model=model)
    assert main(["diff", a, a, "--model", "tiny:llama"]) == 0 and "PASS" in capsys.readouterr().out
    # a model that loads but is not the traces' is refused too, though nothing differs
    assert main(["diff", a, a, "--model", "tiny:gpt2"]) == 2
    assert "--model tiny:gpt2 is not the model of these traces: it is a gpt2 model" in capsys.readouterr().err
    assert main(["diff", a, a, "--model", "tiny:llama:1"]) == 2         # same architecture, other weights
    assert "is not the model of these traces" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_run(ref_traces, tmp_path, capsys):
    from refimpl.cli import main
    missing = tmp_path / "nonexist"
    a = str(ref_traces["llama"])
    for args, opt in ((["trace", "tiny:llama", "--ids", "1"], "--out"), (["diff", a, a], "--json")):
        assert main([*args, opt, str(missing / "x.out")]) == 2
        assert f"{opt} {missing / 'x.out'}: directory {str(missing)!r} does not exist" in capsys.readouterr().err
        assert main([*args, opt, str(tmp_path)]) == 2
        assert "is a directory, not a file" in capsys.readouterr().err
    assert not missing.exists()
