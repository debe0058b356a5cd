"""Golden logits without torch: tiny seeded HF models (config.json + model.safetensors
as `save_pretrained` wrote them) and the logits `transformers` computed for them in
float64, committed under tests/data/golden/ by tests/data/make_golden.py.

Tolerances
----------
float64: the oracle and HF run the same float64 arithmetic on the same weights
(float32 values widened exactly), differing only in summation order and in
how exp/tanh/erf are evaluated, so each logit may differ by a few ulp of the
largest intermediate: max |dlogit| <= 1e-9 max |logit| leaves ~10^6 ulp of room
for error growth through 2 layers while still catching any mistake in the math
(wrong eps, wrong RoPE pairing, wrong scale: all >= 1e-7 relative here).

float32: the oracle run in float32 on the same weights, against the float64
golden logits, within the composed first-order error bound of the whole
forward pass, `float32_bound` below.  For GPT-2 and Llama this is
refimpl.kernels.model_bound.logits_with_bound (Higham & Mary probabilistic
composition: every tensor carries the standard deviation of its float32
rounding error, propagated through each linear map with (W^2), through the
norms with their Jacobian, through softmax with P^2, plus each op's own
worst-case bound from contracts.py; bound = 6 sigma), evaluated along the
float64 run itself, i.e. the model's own sensitivity at these inputs; for
BERT the same composition over post-norm blocks, full attention over the
unpadded keys and the exact-erf GELU.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import refimpl.io.load as rload
from refimpl.io import safetensors as st
from refimpl.kernels.model_bound import logits_with_bound
from refimpl.verify.compare import assert_within

GOLDEN = Path(__file__).parent / "data" / "golden"
F64_REL = 1e-9


# --------------------------------------------------------------------------
# the float32 bound (shared with test_crosscheck_hf.py)
# --------------------------------------------------------------------------


def float32_bound(model64, ids, attention_mask=None):  # -> (float64 output, bound) each [T,V] or [T,D]
    """The float64 output of `model64` and the bound for a float32 evaluation (see the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    if model64.config.arch == "bert":
        return logits_with_bound(model64, ids, np.float32, attention_mask=attention_mask)
    return logits_with_bound(model64, ids, np.float32)


def check_f64(got, want, what):
    """max |got - want| <= 1e-9 max |want| (see the module docstring)."""
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    assert err <= F64_REL * scale, f"{what}: float64 max |diff| {err:.3e} > {F64_REL:g} * max|ref| {scale:.3e}"
    return err / scale


# --------------------------------------------------------------------------
# the golden files
# --------------------------------------------------------------------------

CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.safetensors").is_file()) if GOLDEN.is_dir() else []


def test_golden_files_exist():
    assert {"gpt2", "llama_gqa", "bert_padded"} <= set(CASES), f"golden cases in {GOLDEN}: {CASES}"
    total = sum(f.stat().st_size for f in GOLDEN.rglob("*") if f.is_file())
    assert total < 400_000, f"golden files take {total} bytes; keep them small"


@pytest.mark.parametrize("case", CASES)
def test_golden_logits(case):
    d = GOLDEN / case
    g, meta = st.load(d / "golden.safetensors")
    info = json.loads(meta["cases"])
    m64 = rload.load(d, dtype="float64")
    m32 = rload.load(d, dtype="float32")
    for j, entry in enumerate(info):
        ids = g[f"ids.{j}"]
        want = g[f"out.{j}"]
        am = g.get(f"attention_mask.{j}")
        kw = {} if am is None else {"attention_mask": am}
        got64 = m64.forward(ids, **kw)
        check_f64(got64, want, f"{case}[{j}] ({entry})")
        ref, bound = float32_bound(m64, ids, am)
        assert_within(m32.forward(ids, **kw), want, bound, f"{case}[{j}] float32")
        check_f64(ref, want, f"{case}[{j}] bound's own float64 pass")
