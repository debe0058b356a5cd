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
float64 run itself, i.e. the model's own sensitivity at these inputs.  For
BERT the same composition is written out below (post-norm blocks, full
attention over the unpadded keys, exact-erf GELU whose float32 oracle error is
|dy| <= 0.5|x| u (the float32 rounding of erf, times x/2) + 2u|y| (the sum
and the product), doubled).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import refimpl.io.load as rload
from refimpl.io import safetensors as st
from refimpl.kernels import contracts as C
from refimpl.kernels.model_bound import LAMBDA, _Bounded, logits_with_bound
from refimpl.oracle import layers as L
from refimpl.verify.compare import assert_within

GOLDEN = Path(__file__).parent / "data" / "golden"
F64_REL = 1e-9
_erf = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------
# the float32 bound (shared with test_crosscheck_hf.py)
# --------------------------------------------------------------------------


class _BertBounded(_Bounded):
    """model_bound's composition, extended to the BERT encoder (post-norm, padding mask, erf GELU)."""

    def gelu_erf(self, x, sx):
        y = L.gelu_erf(x)
        phi = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)                          # normal pdf
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)))                                       # normal cdf
        slope = np.abs(cdf + x * phi)                                                  # d/dx x Phi(x)
        local = C.C_SAFETY * (0.5 * np.abs(x) * self.u + 2 * self.u * np.abs(y))
        return y, slope * sx + local

    def attention_full(self, q, sq, k, sk, v, sv, keep):  # [H,T,Dh] x3, keep [T] bool -> [T,D] x2
        H, T, Dh = q.shape
        scale = 1.0 / math.sqrt(Dh)
        mask = L.padding_mask(keep, T)
        local = C.attention_bound(q, k[:, keep], v[:, keep], causal=False, scale=scale, dtype=self.dt)
        outs, sigmas = [], []
        for h in range(H):
            P = L.attention_probs(q[h], k[h], mask, scale)
            vS = np.where(mask, (sq[h] ** 2 @ (k[h] ** 2).T + q[h] ** 2 @ (sk[h] ** 2).T) * scale ** 2, 0.0)
            vP = P ** 2 * (vS + (P ** 2 * vS).sum(-1, keepdims=True))
            outs.append(P @ v[h])
            sigmas.append(np.sqrt(vP @ v[h] ** 2 + P ** 2 @ sv[h] ** 2) + local[h])
        return L.merge_heads(np.stack(outs)), L.merge_heads(np.stack(sigmas))

    def bert(self, ids, attention_mask):
        c = self.c
        T = ids.shape[0]
        keep = np.ones(T, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        e = "embeddings."
        x = self.p(e + "word_embeddings.weight")[ids] + self.p(e + "position_embeddings.weight")[np.arange(T)] \
            + self.p(e + "token_type_embeddings.weight")[np.zeros(T, np.int64)]
        x, ex = self.layer_norm(x, 2 * self.u * np.abs(x), e + "LayerNorm")
        for i in range(c.n_layers):
            h = f"encoder.layer.{i}."
            s = h + "attention.self."
            qkv = [self.linear(x, ex, self.w(s + n + ".weight"), self.p(s + n + ".bias"))
                   for n in ("query", "key", "value")]
            (q, eq), (k, ek), (v, ev) = [(L.split_heads(y, c.n_heads), L.split_heads(ey, c.n_heads))
                                         for y, ey in qkv]
            o, eo = self.attention_full(q, eq, k, ek, v, ev, keep)
            o, eo = self.linear(o, eo, self.w(h + "attention.output.dense.weight"),
                                self.p(h + "attention.output.dense.bias"))
            x, ex = self.layer_norm(*self.add(x, ex, o, eo), h + "attention.output.LayerNorm")
            f, ef = self.linear(x, ex, self.w(h + "intermediate.dense.weight"), self.p(h + "intermediate.dense.bias"))
            g, eg = self.gelu_erf(f, ef)
            f, ef = self.linear(g, eg, self.w(h + "output.dense.weight"), self.p(h + "output.dense.bias"))
            x, ex = self.layer_norm(*self.add(x, ex, f, ef), h + "output.LayerNorm")
        return x, ex


def float32_bound(model64, ids, attention_mask=None):  # -> (float64 output, bound) each [T,V] or [T,D]
    """The float64 output of `model64` and the bound for a float32 evaluation (see the module docstring)."""
    ids = np.asarray(ids, dtype=np.int64)
    if model64.config.arch == "bert":
        out, sigma = _BertBounded(model64, np.float32).bert(ids, attention_mask)
        return out, LAMBDA * sigma
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
