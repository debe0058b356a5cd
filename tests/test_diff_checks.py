"""`refimpl diff`: shape mismatches printed, --model checked against the traces, BF16 storage
sets the unit roundoff."""
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from refimpl.io.safetensors import load as st_load
from refimpl.io.safetensors import save_file
from refimpl.verify.diff import diff
from refimpl.verify.trace import trace_to_file

IDS = [1, 5, 9, 3, 7]


@pytest.fixture(scope="module")
def llama_traces(tmp_path_factory):
    """A: the float64 oracle's trace of tiny:llama; B: the same with layers.0.ffn_hidden perturbed."""
    d = tmp_path_factory.mktemp("diffchk")
    trace_to_file("tiny:llama", IDS, d / "a.safetensors")
    t, meta = st_load(d / "a.safetensors")
    t["layers.0.ffn_hidden"] = t["layers.0.ffn_hidden"] * 1.01
    save_file(t, d / "b.safetensors", meta)
    return d / "a.safetensors", d / "b.safetensors"


def _rewrite(src, dst, change=None, meta_change=None):
    t, meta = st_load(src)
    if change:
        change(t)
    if meta_change:
        meta_change(meta)
    save_file(t, dst, meta)
    return dst


def test_shape_mismatch_is_printed(llama_traces, tmp_path):
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors",
                 lambda t: t.update({"layers.0.q": np.ascontiguousarray(t["layers.0.q"].transpose(1, 0, 2))}))
    rep = diff(a, b)
    assert not rep.passed and rep.first_bad.name == "layers.0.q"
    assert "shape mismatch: (5, 4, 8) in B, (4, 5, 8) in A" in rep.text()
    assert not any("no finite bound" in n for n in rep.notes)


@pytest.mark.parametrize("model,words", [
    ("tiny:gpt2", ["it is a gpt2 model", "arch 'llama'"]),
    ("tiny:bert", ["it is a bert model"]),
])
def test_model_of_another_architecture_is_refused(llama_traces, model, words):
    a, b = llama_traces
    with pytest.raises(ValueError) as e:
        diff(a, b, model=model)
    assert f"--model {model} is not the model of these traces" in str(e.value)
    for w in words:
        assert w in str(e.value)


def _bare(meta, ids=None):
    """A port's trace: no arch, config or model in the metadata."""
    for k in ("arch", "config", "model"):
        meta.pop(k)
    if ids:
        meta["ids"] = ids


def test_model_with_other_weights_is_refused_even_without_metadata(llama_traces, tmp_path):
    a, b = llama_traces
    a2, b2 = _rewrite(a, tmp_path / "a.safetensors", None, _bare), _rewrite(b, tmp_path / "b.safetensors", None, _bare)
    with pytest.raises(ValueError, match="embedding of the ids differs from trace A's embed"):
        diff(a2, b2, model="tiny:llama:1")
    rep = diff(a2, b2, model="tiny:llama:0")                  # the right weights: the trap search runs
    assert rep.checks and rep.first_bad.name == "layers.0.ffn_hidden"


def test_ids_outside_the_models_vocabulary_are_a_message_not_an_index_error(llama_traces, tmp_path):
    a, b = llama_traces
    def strip(m):
        _bare(m, ids="1,5,9,3,200")
    a2, b2 = _rewrite(a, tmp_path / "a.safetensors", None, strip), _rewrite(b, tmp_path / "b.safetensors", None, strip)
    with pytest.raises(ValueError, match="ids include 200, outside the model's vocabulary of 97"):
        diff(a2, b2, model="tiny:gpt2")


def _write_bf16(src, dst, meta_dtype):
    """src's tensors rounded to bfloat16 and stored as BF16 (written by hand: the writer has no BF16)."""
    t, meta = st_load(src)
    meta["dtype"] = meta_dtype
    header, blobs, pos = {"__metadata__": meta}, [], 0
    for k, v in t.items():
        bits = np.ascontiguousarray(v, np.float32).view(np.uint32)
        raw = ((bits + 0x8000) >> 16).astype("<u2").tobytes()           # round to nearest (no NaN here)
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return dst


def test_bf16_storage_gives_the_bfloat16_unit_roundoff(llama_traces, tmp_path):
    a, _ = llama_traces
    b = _write_bf16(a, tmp_path / "bf16.safetensors", "float32")      # computed in float32, stored as BF16
    rep = diff(a, b)
    assert rep.u == 2.0 ** -8
    assert rep.first_bad is None, rep.text()                           # bf16 rounding is within the bf16 bound
    # but from layer 0 on that bound is no smaller than the tensors' own scale: no pass is claimed
    assert rep.verdict == "inconclusive" and not rep.passed and "embed" not in rep.unchecked
    assert rep.unchecked[0] == "layers.0.attn_norm" and "INCONCLUSIVE" in rep.text()
    assert any("were not checked (verdict: inconclusive)" in n for n in rep.notes)


def test_garbage_behind_a_vacuous_bound_is_not_a_pass(llama_traces, tmp_path):
    """A bf16 trace with attention reversed along the keys and the logits negated read PASS,
    exit 0: every bound past the embedding was infinite or larger than the values' range."""
    a, _ = llama_traces
    t, meta = st_load(a)
    t["layers.0.attn_probs"] = t["layers.0.attn_probs"][..., ::-1]
    t["logits"] = -t["logits"]
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, tmp_path / "g.safetensors", meta)
    b = _write_bf16(tmp_path / "g.safetensors", tmp_path / "bad.safetensors", "bfloat16")
    rep = diff(a, b)
    assert rep.verdict == "inconclusive" and "layers.0.attn_probs" in rep.unchecked and "logits" in rep.unchecked
    r = subprocess.run([sys.executable, "-m", "refimpl", "diff", str(a), str(b), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "INCONCLUSIVE" in r.stdout and "PASS" not in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["verdict"] == "inconclusive"


@pytest.mark.parametrize("value", ["fp32", "f32", "<class 'numpy.float32'>"])
def test_unknown_metadata_dtype_is_refused_naming_the_file(llama_traces, tmp_path, value):
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors", None, lambda m: m.update(dtype=value))
    with pytest.raises(ValueError) as e:
        diff(a, b)
    msg = str(e.value)
    assert str(b) in msg and repr(value) in msg and "float32, float64, float16, bfloat16" in msg


def test_trace_without_ids_is_refused_naming_the_file(llama_traces, tmp_path):
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors", None, lambda m: m.pop("ids"))
    with pytest.raises(ValueError, match=r"b\.safetensors: __metadata__\.ids .* is missing"):
        diff(a, b)
    with pytest.raises(ValueError, match=r"b\.safetensors: __metadata__\.ids"):
        diff(b, a)


def _rename(old, new):
    def change(t):
        t[new] = t.pop(old)

    def meta_change(m):
        m["order"] = m["order"].replace(old, new)
    return change, meta_change


@pytest.mark.parametrize("old,new", [("layers.0.attn_probs", "layers.0.attn_prob"),
                                     ("logits", "lm_head"), ("layers.1.q", "layers.x.q")])
def test_a_name_that_is_not_a_trace_name_is_an_error(llama_traces, tmp_path, old, new):
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors", *_rename(old, new))
    for x, y in ((a, b), (b, a)):
        with pytest.raises(ValueError, match=rf"b\.safetensors: tensor '{new}' is not a trace name"):
            diff(x, y)


def test_a_valid_name_in_one_file_only_is_a_note(llama_traces, tmp_path):
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors", lambda t: t.pop("layers.0.attn_probs"),
                 lambda m: m.update(order=m["order"].replace("layers.0.attn_probs,", "")))
    rep = diff(a, b)
    assert rep.passed and rep.only_a == ["layers.0.attn_probs"]
    assert any("tensors only in A" in n for n in rep.notes)


def test_vacuous_bound_of_an_all_zero_tensor_is_inf_not_nan():
    from refimpl.verify.diff import tolerance
    assert tolerance("final_norm", np.zeros((2, 3)), 2.0 ** -8, 4, 32, 48, 5) == np.inf   # n u >= 1, scale 0


def test_ids_compare_as_numbers(llama_traces, tmp_path):
    """TRACE.md asks for comma-separated ids; "1, 5, 9" was refused as other inputs than "1,5,9"."""
    a, _ = llama_traces
    b = _rewrite(a, tmp_path / "b.safetensors", None, lambda m: m.update(ids=", ".join(map(str, IDS))))
    assert diff(a, b).passed
    c = _rewrite(a, tmp_path / "c.safetensors", None, lambda m: m.update(ids="1;5;9;3;7"))
    with pytest.raises(ValueError, match=r"c\.safetensors: __metadata__\.ids must be comma-separated integers"):
        diff(a, c)
