"""Teaching mode: the math of attention and of a whole forward pass, step by step.

    refimpl explain attention [--q "[[1,0],[0,1],[1,1]]" --k ... --v ... --dk 2 --digits 4]
    refimpl explain model [--arch llama --ids 1,2,3 --temperature 0.8 --sample-seed 7]

`explain_attention` computes exactly (refimpl.oracle.exact): fractions where
the value is rational, 50-digit decimals otherwise (shown rounded to
`digits` places), printing each equation, each shape and each value, and the
classic hand-calculation mistakes: Q Kᵀ is n_q × n_k (not n_q × d_k);
softmax normalises exponentials (softmax([1, 2]) = [0.2689, 0.7311], not
[1/3, 2/3]); the 1/√d_k scale; softmax([1, 1]) = [1/2, 1/2]; argmax of a
tie returns the first index.

The default example is the origin article's (section 4.3), done right.
Rows and columns are numbered from 1 in the printout, as on paper.
"""
from __future__ import annotations

import decimal
import sys
from decimal import Decimal
from fractions import Fraction

from refimpl.oracle import exact as X

DEFAULT_Q = [[1, 0], [0, 1], [1, 1]]
DEFAULT_K = [[0, 1], [1, 0], [1, 2]]
DEFAULT_V = [[2, 0], [0, 2], [2, 1]]


def _printer(out):
    out = out or sys.stdout
    return lambda s="": print(s, file=out)


# Decimals carry X.PREC significant digits; GUARD of them absorb the rounding of a few operations,
# so a value is printed to `digits` places only while its integer digits + digits fit in the rest
# (larger values switch to scientific notation), and `digits` itself is at most MAX_DIGITS.
GUARD = 5
MAX_DIGITS = 30


def _fmt(x, digits: int = 4) -> str:
    """A Fraction as X.fmt prints it; a Decimal rounded to `digits` places, or as
    d.ddd…e+N when its integer digits and `digits` do not fit in the precision."""
    if isinstance(x, Fraction):
        return X.fmt(x)
    if x.is_zero() or x.adjusted() + 1 + digits <= X.PREC - GUARD:
        v = x.quantize(Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_EVEN,
                       context=decimal.Context(prec=X.PREC))
        return f"{v:f}" if v != 0 else "0." + "0" * digits
    return f"{x:.{digits}e}"


def _fmt_decimal(x, digits: int = 4) -> str:
    return _fmt(X.to_decimal(x), digits)


def _fmt_matrix(A, digits: int = 4) -> str:
    return "[" + ", ".join("[" + ", ".join(_fmt(v, digits) for v in r) + "]" for r in A) + "]"


def _terms(a_row, b_col, digits):
    return " + ".join(f"{_fmt(a, digits)}·{_fmt(b, digits)}" for a, b in zip(a_row, b_col))


def explain_attention(Q=None, K=None, V=None, d_k=None, digits: int = 4, out=None) -> dict:
    """Walk softmax(Q Kᵀ / √d_k) V exactly, printing every step; return the exact values."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= MAX_DIGITS:
        raise ValueError(f"digits must be an integer from 1 to {MAX_DIGITS} (the values carry {X.PREC} "
                         f"significant digits), got {digits!r}")
    p = _printer(out)
    Q = X.matrix(DEFAULT_Q if Q is None else Q)
    K = X.matrix(DEFAULT_K if K is None else K)
    V = X.matrix(DEFAULT_V if V is None else V)
    (nq, dq), (nk, dk_), (nv, dv) = X.shape(Q), X.shape(K), X.shape(V)
    if dq != dk_:
        raise ValueError(f"Q is {nq}×{dq} and K is {nk}×{dk_}: queries and keys must have the same width d_k")
    if nv != nk:
        raise ValueError(f"K has {nk} rows (keys) but V has {nv} rows: one value row per key")
    d_k = X.exact(dq if d_k is None else d_k)
    if d_k <= 0:
        raise ValueError(f"d_k must be positive, got {d_k}")

    p("Scaled dot-product attention (Vaswani et al. 2017, eq. 1):")
    p("    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V")
    p(f"Exact arithmetic: fractions where rational, {X.PREC}-digit decimals otherwise "
      f"(shown to {digits} places). Rows numbered from 1.")
    p()
    p("Step 0. Inputs and shapes")
    p(f"    Q: n_q × d_k = {nq} × {dq}   Q = {_fmt_matrix(Q, digits)}")
    p(f"    K: n_k × d_k = {nk} × {dk_}   K = {_fmt_matrix(K, digits)}")
    p(f"    V: n_k × d_v = {nv} × {dv}   V = {_fmt_matrix(V, digits)}")
    p(f"    d_k = {_fmt(d_k)}")
    p()
    Kt = X.transpose(K)
    p(f"Step 1. Kᵀ: transpose K ({nk} × {dk_}) into d_k × n_k = {dk_} × {nk}")
    p(f"    Kᵀ = {_fmt_matrix(Kt, digits)}")
    p()
    S = X.matmul(Q, Kt)
    p(f"Step 2. S = Q Kᵀ: ({nq} × {dq}) · ({dk_} × {nk}) = {nq} × {nk}, one score per (query, key) pair")
    p("    S[i][j] = Σ_c Q[i][c] · K[j][c]   (the dot product of query i with key j)")
    for i in range(nq):
        for j in range(nk):
            p(f"    S[{i + 1}][{j + 1}] = {_terms(Q[i], K[j], digits)} = {_fmt(S[i][j], digits)}")
    p(f"    S = {_fmt_matrix(S, digits)}   ({nq} × {nk})")
    if nk != dq:
        p(f"    Mistake to avoid: Q Kᵀ is n_q × n_k = {nq} × {nk} (queries × keys), not n_q × d_k = {nq} × {dq}.")
    else:
        p(f"    Mistake to avoid: Q Kᵀ is n_q × n_k (queries × keys), not n_q × d_k; here n_k = d_k = {nk}, so the "
          "shape looks the same either way, but column j is key j, not feature j.")
    p()
    r = X.sqrt(d_k)
    c = X.div(Fraction(1), r)
    p(f"Step 3. Scale by 1/√d_k: √{_fmt(d_k)} = {_fmt(r, digits)}"
      + ("" if isinstance(r, Fraction) else " (irrational: decimals from here on)")
      + f", 1/√d_k = {_fmt(c, digits)}")
    A = X.scale(S, c)
    p(f"    S / √d_k = {_fmt_matrix(A, digits)}")
    p("    Why: for unit-variance q, k the dot product has variance d_k; the scale keeps softmax out of saturation.")
    p()
    p("Step 4. P = softmax of each row: p_j = exp(a_j − max a) / Σ_k exp(a_k − max a)")
    P = []
    for i, row in enumerate(A):
        m = max(row, key=X.to_decimal)
        e = [X.exp(X.sub(a, m)) for a in row]
        s = X.total(e)
        pr = [X.div(v, s) for v in e]
        P.append(pr)
        p(f"    row {i + 1}: a = [{', '.join(_fmt(a, digits) for a in row)}], max a = {_fmt(m, digits)}")
        p(f"        exp(a − max) = [{', '.join(_fmt(v, digits) for v in e)}], sum = {_fmt(s, digits)}")
        p(f"        p = [{', '.join(_fmt(v, digits) for v in pr)}]   (sums to 1)")
    p("    Subtracting max a changes nothing mathematically and keeps exp from overflowing (exp(89) > float32 max).")
    sm12 = X.softmax([Fraction(1), Fraction(2)])
    p(f"    Mistake to avoid: softmax normalises exponentials, not the raw values: "
      f"softmax([1, 2]) = [{', '.join(_fmt_decimal(v, digits) for v in sm12)}], not [1/3, 2/3].")
    p()
    O = X.matmul(P, V)
    p(f"Step 5. Output O = P V: ({nq} × {nk}) · ({nv} × {dv}) = {nq} × {dv}; row i mixes the value rows by p")
    for i in range(nq):
        terms = " + ".join(f"{_fmt(P[i][j], digits)}·[{', '.join(_fmt(v, digits) for v in V[j])}]"
                           for j in range(nk))
        p(f"    O[{i + 1}] = {terms} = [{', '.join(_fmt(v, digits) for v in O[i])}]")
    p(f"    O = {_fmt_matrix(O, digits)}")
    p()
    tie = X.softmax([Fraction(1), Fraction(1)])
    p("Also worth knowing")
    p(f"    softmax([1, 1]) = [{', '.join(_fmt(v) for v in tie)}] exactly (equal scores share equally).")
    p(f"    argmax([1/2, 1/2]) = index {X.argmax(tie) + 1} of 2 (0 in 0-based code): "
      "a tie picks the first index (numpy.argmax and greedy decoding do the same).")
    return {"Kt": Kt, "S": S, "scale": c, "scaled": A, "P": P, "O": O}


def _eq(arch, name):
    """The equation computed at trace point `name` (suffix after layers.{i}.)."""
    pre = arch in ("gpt2", "llama")
    norm = "RMSNorm(x) = x / √(mean(x²) + ε) · g" if arch == "llama" else "LayerNorm(x) = (x − μ)/√(σ² + ε) · g + b"
    act = {"gpt2": "gelu_tanh(x W_fc + b_fc)", "llama": "silu(x W_gate) ⊙ (x W_up)",
           "bert": "gelu_erf(x W_1 + b_1)", "classic": "relu(x W_1 + b_1)"}[arch]
    table = {
        "embed": {"gpt2": "x₀ = E[ids] + P[positions]", "llama": "x₀ = E[ids] (positions enter through RoPE)",
                  "bert": "x₀ = LayerNorm(E[ids] + P[positions] + T[token types])",
                  "classic": "x₀ = √D · E[ids] + PE_sin(positions)"}[arch],
        "attn_norm": f"a = {norm}" if pre else "a = x (post-norm: the block input)",
        "q": "q = a W_q (+ b), split into heads" + (", then RoPE" if arch == "llama" else ""),
        "k": "k = a W_k (+ b), split into heads" + (", then RoPE" if arch == "llama" else ""),
        "v": "v = a W_v (+ b), split into heads",
        "attn_probs": "P = softmax(q kᵀ / √Dh + causal mask)" if arch != "bert" else "P = softmax(q kᵀ / √Dh)",
        "attn_out": "o = merge_heads(P v) W_o (+ b)",
        "resid_attn": "x = x + o" if pre else "x = LayerNorm(x + o)",
        "ffn_norm": f"m = {norm}" if pre else "m = x",
        "ffn_hidden": f"h = {act}",
        "ffn_out": "f = h W_2 (+ b)",
        "resid_ffn": "x = x + f" if pre else "x = LayerNorm(x + f)",
        "final_norm": f"{norm}" if arch != "classic" else "x (post-norm: already normalised)",
        "logits": "z = x Eᵀ (tied) or x W_lmᵀ",
    }
    return table.get(name, "")


def explain_model(arch: str = "llama", ids=(1, 2, 3), seed: int = 0, temperature: float = 0.0,
                  sample_seed: int = 7, top: int = 5, out=None) -> dict:
    """Walk a tiny model from token ids to the next-token distribution and the chosen id."""
    import numpy as np

    from refimpl.oracle import layers as L
    from refimpl.oracle.model import tiny_model
    from refimpl.oracle.sampling import XorShift64Star, check_temperature, sample

    temp = check_temperature(temperature, XorShift64Star(0)) or 0.0   # ValueError: < 0, nan, inf (any rng)
    p = _printer(out)
    model = tiny_model(arch, seed=seed, dtype="float64")
    c = model.config
    ids = np.asarray(list(ids), dtype=np.int64)
    p(f"A tiny {arch} model (seed {seed}, float64): V={c.vocab_size} D={c.d_model} layers={c.n_layers} "
      f"H={c.n_heads} Hkv={c.n_kv_heads} Dh={c.head_dim} F={c.d_ff}")
    p(f"Input ids: {ids.tolist()} (T = {len(ids)})")
    p()
    steps = []

    def trace(name, x):
        steps.append(name)
        short = name.split(".", 2)[-1] if name.startswith("layers.") else name
        if name.startswith("layers.") and short == "attn_norm":
            p(f"Layer {name.split('.')[1]}")
        flat = np.asarray(x).reshape(-1)
        head = ", ".join(f"{v:.4f}" for v in flat[:4])
        p(f"  {name:<22} {str(list(np.shape(x))):<14} {_eq(arch, short)}")
        p(f"  {'':<22} first values [{head}{', …' if flat.size > 4 else ''}]")

    final = model.forward(ids, trace=trace)
    p()
    if arch == "bert":
        p("BERT is an encoder: its output is the last hidden state [T, D]; there is no next-token step.")
        return {"steps": steps, "hidden": final}
    z = final[-1]
    probs = L.softmax(z / temp) if temp > 0 else L.softmax(z)
    order = np.lexsort((np.arange(z.size), -probs))[:top]
    p(f"Next token: the last row of the logits z [{z.size}] → p = softmax(z"
      + (f" / {temp:g}" if temp > 0 else "") + ")")
    for t in order:
        p(f"    id {int(t):>4}  z = {z[t]: .6f}  p = {probs[t]:.6f}")
    greedy = int(np.argmax(z))
    p(f"Greedy (temperature 0): argmax z = id {greedy} (a tie would pick the lowest id)")
    chosen = greedy
    if temp > 0:
        chosen = sample(z, temp, rng=XorShift64Star(sample_seed))
        p(f"Sampled at temperature {temp:g} with xorshift64* seed {sample_seed}: id {chosen} "
          "(see refimpl.oracle.sampling for the exact rule)")
    return {"steps": steps, "logits": z, "probs": probs, "greedy": greedy, "chosen": chosen}
