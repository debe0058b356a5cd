"""Regenerate tests/data/golden/: tiny seeded HF models and their float64 outputs.

Run by hand (needs torch and transformers), not by the test suite:

    python tests/data/make_golden.py

Each case directory holds what `save_pretrained` wrote (config.json,
model.safetensors; float32 weights) and golden.safetensors with, per input j:
ids.{j} [T] int64, out.{j} (logits [T,V] or BERT hidden states [T,D],
float64, computed by transformers in float64 with Llama's float32 islands
made float64, see tests/test_crosscheck_hf.py), attention_mask.{j} for BERT.
Its metadata says what each input is and which versions produced it.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))                      # tests/: the builders live in test_crosscheck_hf

from test_crosscheck_hf import build_hf, hf_float64, hf_run  # noqa: E402

from refimpl.io import safetensors as st  # noqa: E402

SIZES = dict(V=64, P=16, D=16)                                   # smaller than the cross-check: committed files
rng = np.random.default_rng(2024)
SEQS = [rng.integers(0, SIZES["V"], 11), rng.integers(0, SIZES["V"], 1)]


def write_case(name: str, kind: str, seed: int) -> None:
    import torch
    import transformers
    d = HERE / "golden" / name
    shutil.rmtree(d, ignore_errors=True)
    model = build_hf(kind, seed, **SIZES)
    model.save_pretrained(d)
    for extra in d.iterdir():                               # keep only what the loader reads
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    m64 = hf_float64(model)
    tensors, cases = {}, []
    if kind == "bert":
        T = 10
        ids = np.stack([SEQS[0][:T], np.concatenate([SEQS[0][1:T - 3], np.zeros(4, np.int64)])])
        am = np.array([[1] * T, [1] * (T - 4) + [0] * 4])
        out = hf_run(m64, ids, am)                           # one padded batch
        for j in range(2):
            tensors[f"ids.{j}"], tensors[f"attention_mask.{j}"], tensors[f"out.{j}"] = ids[j], am[j], out[j]
            cases.append(f"padded batch row {j}: {int(am[j].sum())} real tokens of {T}")
    else:
        for j, ids in enumerate(SEQS):
            tensors[f"ids.{j}"], tensors[f"out.{j}"] = ids.astype(np.int64), hf_run(m64, ids)[0]
            cases.append(f"{len(ids)} tokens")
    meta = {"cases": json.dumps(cases), "kind": kind, "seed": str(seed),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "made_by": "tests/data/make_golden.py"}
    st.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, d / "golden.safetensors", meta)
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name}: {size} bytes, {cases}")


if __name__ == "__main__":
    write_case("gpt2", "gpt2", 101)
    write_case("llama_gqa", "llama_gqa", 102)
    write_case("llama_mha_tied", "llama_mha", 103)
    write_case("bert_padded", "bert", 104)
