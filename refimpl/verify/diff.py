"""`refimpl diff A B`: the first tensor where trace B leaves trace A's error bound, and why.

A is the reference (e.g. the float64 oracle's trace), B the candidate (a
port's trace, same model, same ids).  Both are walked in A's forward order;
tensors present in only one file are listed and skipped.  A file without
`ids`, with a `dtype` other than float32/float64/float16/bfloat16, or with a
tensor name that is not a trace name (TRACE.md) is refused (ValueError).

The bound (elementwise, absolute), stated
-----------------------------------------
    |b - a| <= C * gamma(n, u) * scale,      C = 2,  gamma(n, u) = n u / (1 - n u)
    u      = the largest unit roundoff of the two traces' dtypes: the compute
             dtype of the metadata and every dtype a tensor is stored in (from
             the safetensors header: a BF16 tensor is read as float32 but only
             holds bfloat16 precision); 2^-24 float32, 2^-53 float64,
             2^-11 float16, 2^-8 bfloat16
    n      = (l + 1) * (D + F + S): every block adds at most D + F + S roundings
             to each value (its longest inner products: the D-wide projections,
             the F-wide down projection, the S-long attention sum); l = 0 for
             embed, i + 1 inside layer i, n_layers + 1 for final_norm / logits
    scale  = max |a| over the tensor (1 for attn_probs)
A tensor whose C gamma(n, u) is 1 or more (or n u >= 1) is not checked: any
values of A's size would pass.  Then, with nothing out of bound, the verdict is
"inconclusive", not "pass" (a bfloat16 or float16 trace of any sizeable model).
This is the first-order forward-error size of a float computation of that
depth, relative to the tensor's own scale (cf. the matmul bound in
refimpl.kernels.contracts); it ignores error amplification between layers,
so it is a screening bound: a correct float32 port of a deep model may
exceed it late in the network, a convention bug exceeds it by orders of
magnitude at the first layer it touches.

Convention traps
----------------
At the first tensor out of bound, the layer is recomputed in float64 from
B's own inputs (the previous trace tensors, which are within bound) and the
model's weights (from the trace metadata `model`, or --model), once with the
reference convention and once with each known alternative:
    GELU tanh vs erf (and relu / silu) ............ layers.{i}.ffn_hidden
    RoPE half-split vs interleaved (or none) ...... layers.{i}.q / .k
    norm eps inside vs outside the sqrt, eps value,
      LayerNorm vs RMSNorm, unbiased variance ..... attn_norm / ffn_norm / final_norm
                                                    (post-norm: resid_attn / resid_ffn)
    softmax scale 1/sqrt(Dh) vs none, 1/Dh, 1/sqrt(D);
      mask -inf vs finite large negative, off-by-one
      causal mask, no mask; GQA head grouping ....... layers.{i}.attn_probs
    transposed weights (square matrices) .......... q / k / v / attn_out
    positions not added / off by one .............. embed
The alternative that reproduces B within the bound (and the reference
convention does not) names the trap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refimpl.kernels.contracts import unit_roundoff
from refimpl.verify.compare import ErrorStats, error_stats
from refimpl.verify.trace import COMPUTE_DTYPES

C_DIFF = 2.0
_U_NAME = {d: unit_roundoff(d) for d in COMPUTE_DTYPES}                  # the metadata's compute dtype
_U_STORED = {k: _U_NAME[d] for k, d in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"),
                                         ("BF16", "bfloat16"))}     # the stored tensors' safetensors names


@dataclass
class TensorDiff:
    name: str
    shape: tuple
    tol: float
    stats: ErrorStats | None
    passed: bool
    note: str = ""
    checked: bool = True  # False: the bound is no smaller than the tensor's own scale (or infinite)


@dataclass
class TrapCheck:
    label: str            # e.g. "gelu_erf"
    description: str      # what the convention is
    ratio: float          # max |recomputed - B| / tol


@dataclass
class DiffReport:
    a: str
    b: str
    u: float
    tensors: list = field(default_factory=list)
    first_bad: TensorDiff | None = None
    trap: TrapCheck | None = None
    trap_family: str = ""
    reference_ratio: float | None = None
    checks: list = field(default_factory=list)
    only_a: list = field(default_factory=list)
    only_b: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """"fail" (a tensor out of bound), "inconclusive" (none out of bound, but some bound too
        loose to catch anything: see `unchecked`), or "pass"."""
        return "fail" if self.first_bad is not None else "inconclusive" if self.unchecked else "pass"

    @property
    def unchecked(self) -> list:
        """Names of the compared tensors whose bound is >= their own scale, or infinite."""
        return [d.name for d in self.tensors if not d.checked]

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def as_dict(self):
        def st(t):
            return {"name": t.name, "shape": list(t.shape), "tol": t.tol, "passed": t.passed, "checked": t.checked,
                    "note": t.note, "stats": t.stats.as_dict() if t.stats else None}
        return {"a": self.a, "b": self.b, "u": self.u, "passed": self.passed, "verdict": self.verdict,
                "unchecked": self.unchecked,
                "first_bad": st(self.first_bad) if self.first_bad else None,
                "trap": (None if self.trap is None else
                         {"family": self.trap_family, "label": self.trap.label,
                          "description": self.trap.description, "ratio": self.trap.ratio}),
                "reference_ratio": self.reference_ratio,
                "checks": [{"label": c.label, "description": c.description, "ratio": c.ratio} for c in self.checks],
                "tensors": [st(t) for t in self.tensors], "only_a": self.only_a, "only_b": self.only_b,
                "notes": self.notes}

    def render(self, console=None):
        from rich.console import Console
        from rich.table import Table
        console = console or Console()
        t = Table(title=f"refimpl diff  A={self.a}  B={self.b}")
        for col in ("tensor", "shape", "max abs", "bound", "budget used", "max ulp", "NMSE", ""):
            t.add_column(col, justify="left" if col in ("tensor", "shape", "") else "right")
        for d in self.tensors:
            s = d.stats
            mark = ("[bold red]FIRST OUT OF BOUND[/]" if not d.passed else "[green]ok[/]" if d.checked
                    else "[yellow]unchecked: bound >= the tensor's scale[/]")
            t.add_row(d.name, str(list(d.shape)), f"{s.max_abs:.3g}", f"{d.tol:.3g}",
                      "inf" if not math.isfinite(s.bound_ratio) else f"{100 * s.bound_ratio:.3g}%",
                      f"{s.max_ulp:.3g}", f"{s.nmse:.3g}", mark if d.passed or d is self.first_bad else "")
        console.print(t)
        if self.first_bad is None and self.unchecked:
            n = len(self.tensors) - len(self.unchecked)
            console.print(f"[bold yellow]INCONCLUSIVE[/]: no tensor out of bound, but {len(self.unchecked)} of "
                          f"{len(self.tensors)} (from {self.unchecked[0]}) have a bound no smaller than the tensor's "
                          f"own scale at u = {self.u:.3g}: any values would pass there.  {n} tensor(s) checked.")
        elif self.first_bad is None:
            console.print(f"[bold green]PASS[/]: every common tensor is within its bound (u = {self.u:.3g}).")
        else:
            d = self.first_bad
            s = d.stats
            console.print(f"[bold red]FAIL[/]: first tensor out of bound: [bold]{d.name}[/] {list(d.shape)}", )
            if d.note:
                console.print(f"  {d.note}", markup=False)
            else:
                console.print(f"  worst element {s.worst_index}: A {s.worst_want!r}, B {s.worst_got!r}, |error| "
                              f"{abs(s.worst_got - s.worst_want):.3e} > bound {d.tol:.3e} (ratio {s.bound_ratio:.3g}); "
                              f"max rel {s.max_rel:.3g}; NMSE {s.nmse:.3g}; non-finite mismatches "
                              f"{s.nonfinite_mismatches}", markup=False)
            if self.trap is not None:
                console.print(f"  [bold]likely convention trap: {self.trap_family}[/]: B matches "
                              f"{self.trap.description} (recomputed from B's inputs: ratio {self.trap.ratio:.3g}), "
                              f"the reference convention gives ratio {self.reference_ratio:.3g}.")
            for c in self.checks:
                console.print(f"    recomputed as {c.label:<28} ratio to B {c.ratio:.3g}", markup=False)
        for n in self.notes:
            console.print(f"note: {n}", markup=False)

    def text(self, width: int = 140) -> str:
        import io

        from rich.console import Console
        con = Console(record=True, width=width, color_system=None, file=io.StringIO())
        self.render(con)
        return con.export_text()


# --------------------------------------------------------------------------
# the bound
# --------------------------------------------------------------------------


def _trace_unit(meta: dict, stored: dict) -> float:
    """The coarsest unit roundoff among the trace's compute dtype (metadata) and its stored dtypes."""
    us = [_U_NAME[meta["dtype"]]] if meta.get("dtype") in _U_NAME else []
    us += [_U_STORED[d] for d in stored.values() if d in _U_STORED]
    return max(us, default=2.0 ** -24)


def _depth(name: str, n_layers: int) -> int:
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    if name == "embed":
        return 0
    return n_layers + 1


def relative_bound(name: str, u: float, n_layers: int, D: int, F: int, S: int) -> float:
    """C gamma((l+1)(D+F+S), u): the bound as a fraction of the tensor's scale (inf when n u >= 1).
    At 1 or more it lets B be anything of A's size: that tensor is not checked."""
    n = (_depth(name, n_layers) + 1) * (D + F + S)
    return C_DIFF * n * u / (1 - n * u) if n * u < 1 else math.inf


def tolerance(name: str, a: np.ndarray, u: float, n_layers: int, D: int, F: int, S: int) -> float:
    """C gamma((l+1)(D+F+S), u) * scale (see the module docstring)."""
    r = relative_bound(name, u, n_layers, D, F, S)
    if not math.isfinite(r):  # no finite bound at this depth (inf: unchecked; inf * a zero scale would be NaN)
        return math.inf
    fin = np.abs(a[np.isfinite(a)]) if a.size else np.zeros(0)
    scale = 1.0 if name.endswith("attn_probs") else (float(fin.max()) if fin.size else 0.0)
    return r * scale + float(np.finfo(np.float64).tiny)


# --------------------------------------------------------------------------
# recomputing a layer under alternative conventions
# --------------------------------------------------------------------------


def _ln(x, w, b, eps, where="inside", unbiased=False):
    mu = x.mean(-1, keepdims=True)
    n = x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdims=True) / (n - 1 if unbiased and n > 1 else n)
    den = np.sqrt(var + eps) if where == "inside" else np.sqrt(var) + eps
    return (x - mu) / den * w + b


def _rms(x, w, eps, where="inside"):
    ms = (x * x).mean(-1, keepdims=True)
    den = np.sqrt(ms + eps) if where == "inside" else np.sqrt(ms) + eps
    return x / den * w


def _norm_alternatives(cfg, x, w, b):
    """(label, description, y) for the reference norm and its traps."""
    eps = cfg.norm_eps
    other_eps = [e for e in (1e-5, 1e-6, 1e-12) if not math.isclose(e, eps)]
    alts = []
    if cfg.norm == "rmsnorm":
        alts.append(("reference", f"RMSNorm, eps={eps:g} inside the sqrt", _rms(x, w, eps)))
        alts.append(("eps outside sqrt", "x / (sqrt(mean x^2) + eps): eps outside the square root",
                     _rms(x, w, eps, "out")))
        alts += [(f"eps={e:g}", f"RMSNorm with eps={e:g} instead of {eps:g}", _rms(x, w, e)) for e in other_eps]
        alts.append(("LayerNorm", "LayerNorm (mean subtracted) instead of RMSNorm", _ln(x, w, 0.0, eps)))
    else:
        alts.append(("reference", f"LayerNorm, eps={eps:g} inside the sqrt", _ln(x, w, b, eps)))
        alts.append(("eps outside sqrt", "(x - mean) / (sqrt(var) + eps): eps outside the square root",
                     _ln(x, w, b, eps, "out")))
        alts += [(f"eps={e:g}", f"LayerNorm with eps={e:g} instead of {eps:g}", _ln(x, w, b, e)) for e in other_eps]
        alts.append(("unbiased variance", "variance divided by D-1 (torch.var default) instead of D",
                     _ln(x, w, b, eps, unbiased=True)))
        alts.append(("RMSNorm", "RMSNorm (no mean subtraction) instead of LayerNorm", _rms(x, w, eps) + b))
    return "norm eps inside vs outside the sqrt / norm variant", alts


def _gelu_erf(x):
    from refimpl.oracle import layers as L
    return L.gelu_erf(x)


def _acts():
    from refimpl.oracle import layers as L
    return {"gelu_tanh": ("GELU, tanh approximation (gelu_new)", L.gelu_tanh),
            "gelu_erf": ("GELU, exact erf form", _gelu_erf),
            "relu": ("ReLU", L.relu), "silu": ("SiLU", L.silu)}


class _Recompute:
    """Recompute one trace point of B under alternative conventions (float64)."""

    def __init__(self, model, tb: dict, ids):
        self.m, self.cfg, self.tb = model, model.config, tb
        self.P = {k: np.asarray(v, dtype=np.float64) for k, v in model.params.items()}
        self.ids = np.asarray(ids, dtype=np.int64)

    def get(self, name):
        if name not in self.tb:
            raise KeyError(name)
        return np.asarray(self.tb[name], dtype=np.float64)

    def prev_resid(self, i):
        return self.get("embed") if i == 0 else self.get(f"layers.{i - 1}.resid_ffn")

    # weight names per architecture -----------------------------------------
    def norm_params(self, which, i=None):
        arch, P = self.cfg.arch, self.P
        keys = {("gpt2", "attn"): f"h.{i}.ln_1", ("gpt2", "ffn"): f"h.{i}.ln_2", ("gpt2", "final"): "ln_f",
                ("llama", "attn"): f"layers.{i}.input_layernorm",
                ("llama", "ffn"): f"layers.{i}.post_attention_layernorm", ("llama", "final"): "norm",
                ("classic", "attn"): f"h.{i}.ln_1", ("classic", "ffn"): f"h.{i}.ln_2",
                ("bert", "attn"): f"encoder.layer.{i}.attention.output.LayerNorm",
                ("bert", "ffn"): f"encoder.layer.{i}.output.LayerNorm"}
        k = keys[(arch, which)]
        return P[k + ".weight"], P.get(k + ".bias", 0.0)

    def qkv_pre(self, i, which):  # -> [T, n*Dh] before head split / RoPE, and the weight (in,out) and bias
        arch, P, a = self.cfg.arch, self.P, self.get(f"layers.{i}.attn_norm")
        D = self.cfg.d_model
        if arch == "llama":
            W = P[f"layers.{i}.self_attn.{which}_proj.weight"].T
            return a, W, 0.0
        if arch == "bert":
            nm = {"q": "query", "k": "key", "v": "value"}[which]
            s = f"encoder.layer.{i}.attention.self.{nm}"
            return a, P[s + ".weight"].T, P[s + ".bias"]
        j = "qkv".index(which)
        W = P[f"h.{i}.attn.c_attn.weight"][:, j * D:(j + 1) * D]
        b = P[f"h.{i}.attn.c_attn.bias"][j * D:(j + 1) * D]
        return a, W, b

    def probs(self, i, scale, mask_kind="ref", maskval=-np.inf, group="block"):  # -> [H,T,S]
        """Layer i's attention probabilities from B's q and k under one convention: the causal
        mask as is ("ref"), off by one ("plus1", "minus1") or left out ("none"); masked scores
        set to `maskval` (-inf) or `maskval` added; key/value head of query head h h // (H/Hkv)
        ("block") or h % Hkv ("mod")."""
        from refimpl.oracle import layers as L
        cfg = self.cfg
        H, Hkv = cfg.n_heads, cfg.n_kv_heads
        q, k = self.get(f"layers.{i}.q"), self.get(f"layers.{i}.k")
        T, S = q.shape[1], k.shape[1]
        out = []
        for h in range(H):
            g = h // (H // Hkv) if group == "block" else h % Hkv
            s = q[h] @ k[g].T * scale
            if cfg.causal or mask_kind != "ref":
                off = {"ref": 0, "plus1": 1, "minus1": -1, "none": S}[mask_kind]
                m = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None] + off
                s = np.where(m, s, maskval) if np.isinf(maskval) else s + np.where(m, 0.0, maskval)
            out.append(L.softmax(s))
        return np.stack(out)

    def prob_alternatives(self, i) -> list:
        """(label, description, probabilities) for the reference attention and its traps."""
        cfg = self.cfg
        H, Hkv, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        sc = 1 / math.sqrt(Dh)
        alts = [("reference", "softmax(q kᵀ / sqrt(Dh) + mask), mask -inf", self.probs(i, sc)),
                ("no scale", "softmax(q kᵀ) without 1/sqrt(Dh)", self.probs(i, 1.0)),
                ("scale 1/Dh", "scale 1/Dh instead of 1/sqrt(Dh)", self.probs(i, 1 / Dh)),
                ("scale 1/sqrt(D)", "scale 1/sqrt(D) (model width) instead of 1/sqrt(Dh)",
                 self.probs(i, 1 / math.sqrt(D)))]
        if cfg.causal:
            alts += [("mask -1e4", "finite mask value -1e4 added to the scores instead of -inf",
                      self.probs(i, sc, maskval=-1e4)),
                     ("mask -1e9", "finite mask value -1e9 instead of -inf", self.probs(i, sc, maskval=-1e9)),
                     ("mask +1 (sees next token)", "off-by-one causal mask: query t sees key t+1",
                      self.probs(i, sc, "plus1")),
                     ("mask -1 (misses itself)", "off-by-one causal mask: query t does not see key t",
                      self.probs(i, sc, "minus1")),
                     ("no mask", "no causal mask", self.probs(i, sc, "none"))]
        if Hkv not in (1, H):
            alts.append(("GQA h % Hkv", "GQA grouping h % Hkv instead of h // (H / Hkv)",
                         self.probs(i, sc, group="mod")))
        return alts

    # per trace point ------------------------------------------------------
    def alternatives(self, name):
        """(family, [(label, description, array)]) or None when no trap is known for this point."""
        from refimpl.oracle import layers as L
        cfg = self.cfg
        parts = name.split(".")
        if name in ("final_norm",) and cfg.norm_placement == "pre":
            w, b = self.norm_params("final")
            return _norm_alternatives(cfg, self.prev_resid(cfg.n_layers), w, b)
        if name == "embed" and cfg.arch in ("gpt2", "classic"):
            E = self.P["wte.weight"][self.ids]
            T = len(self.ids)
            if cfg.arch == "gpt2":
                wpe = self.P["wpe.weight"]
                alts = [("reference", "token + learned position embedding (positions 0..T-1)", E + wpe[np.arange(T)]),
                        ("no positions", "token embedding only (positions not added)", E),
                        ("positions from 1", "positions 1..T instead of 0..T-1", E + wpe[np.arange(1, T + 1)])]
            else:
                D = cfg.d_model
                pe = L.sinusoidal_positions(T, D)
                alts = [("reference", "sqrt(D) E[ids] + sinusoidal PE", math.sqrt(D) * E + pe),
                        ("no sqrt(D)", "E[ids] + PE without the sqrt(D) factor", E + pe),
                        ("no positions", "sqrt(D) E[ids] without positions", math.sqrt(D) * E)]
            return "embedding: positions / scaling", alts
        if name == "embed" and cfg.arch == "bert":
            e, T = "embeddings.", len(self.ids)
            x = self.P[e + "word_embeddings.weight"][self.ids] + self.P[e + "position_embeddings.weight"][:T] \
                + self.P[e + "token_type_embeddings.weight"][0]
            return _norm_alternatives(cfg, x, self.P[e + "LayerNorm.weight"], self.P[e + "LayerNorm.bias"])
        if len(parts) != 3 or parts[0] != "layers":
            return None
        i, point = int(parts[1]), parts[2]
        H, Hkv, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        T = len(self.ids)
        pre = cfg.norm_placement == "pre"
        if point in ("attn_norm", "ffn_norm") and pre:
            x = self.prev_resid(i) if point == "attn_norm" else self.get(f"layers.{i}.resid_attn")
            w, b = self.norm_params("attn" if point == "attn_norm" else "ffn", i)
            return _norm_alternatives(cfg, x, w, b)
        if point in ("resid_attn", "resid_ffn") and not pre:
            if point == "resid_attn":
                x = self.get(f"layers.{i}.attn_norm") + self.get(f"layers.{i}.attn_out")
            else:
                x = self.get(f"layers.{i}.resid_attn") + self.get(f"layers.{i}.ffn_out")
            w, b = self.norm_params("attn" if point == "resid_attn" else "ffn", i)
            return _norm_alternatives(cfg, x, w, b)
        if point in ("q", "k", "v"):
            a, W, b = self.qkv_pre(i, point)
            n = H if point == "q" else Hkv
            lin = lambda W_: L.split_heads(a @ W_ + b, n)  # noqa: E731
            pos = np.arange(T)
            rot = (lambda x, inter: L.rope(x, pos, cfg.rope_theta, inter)) if cfg.arch == "llama" and point != "v" \
                else (lambda x, inter: x)
            ref_inter = cfg.rope_interleaved
            alts = [("reference", "the reference projection" + (" and RoPE " + ("interleaved" if ref_inter else
                     "half-split") if cfg.arch == "llama" and point != "v" else ""), rot(lin(W), ref_inter))]
            if cfg.arch == "llama" and point != "v":
                alts.append(("rope " + ("half-split" if ref_inter else "interleaved"),
                             "RoPE in the " + ("half-split (HF) convention: pairs (i, i+Dh/2)" if ref_inter else
                                               "interleaved (llama2.c / Meta) convention: pairs (2i, 2i+1)"),
                             rot(lin(W), not ref_inter)))
                alts.append(("no rope", "no rotary embedding applied", lin(W)))
            if W.shape[0] == W.shape[1]:
                alts.append(("transposed weight", f"the {point} projection weight transposed (x W instead of x Wᵀ)",
                             rot(lin(W.T), ref_inter)))
            fam = "RoPE interleaved vs half-split / transposed weights" if cfg.arch == "llama" else "transposed weights"
            return fam, alts
        if point == "attn_probs":
            return "softmax scale / mask value / causal mask / GQA grouping", self.prob_alternatives(i)
        if point == "attn_out":
            v = self.get(f"layers.{i}.v")
            Pn = f"layers.{i}.attn_probs"
            if cfg.arch == "llama":
                W, b = self.P[f"layers.{i}.self_attn.o_proj.weight"].T, 0.0
            elif cfg.arch == "bert":
                W = self.P[f"encoder.layer.{i}.attention.output.dense.weight"].T
                b = self.P[f"encoder.layer.{i}.attention.output.dense.bias"]
            else:
                W, b = self.P[f"h.{i}.attn.c_proj.weight"], self.P[f"h.{i}.attn.c_proj.bias"]

            def out(P, group="block"):   # merge_heads(P_h v_g)
                return L.merge_heads(np.stack([P[h] @ v[h // (H // Hkv) if group == "block" else h % Hkv]
                                               for h in range(H)]))
            if Pn in self.tb:
                Pr = self.get(Pn)
                alts = [("reference", "merge_heads(P v) W_o", out(Pr) @ W + b),
                        ("transposed weight", "the output projection weight transposed", out(Pr) @ W.T + b)]
                if Hkv not in (1, H):
                    alts.append(("GQA h % Hkv", "GQA grouping h % Hkv for the values", out(Pr, "mod") @ W + b))
                return "transposed weights / GQA grouping", alts
            # a fused attention writes no attn_probs (TRACE.md): the probabilities' traps, recomputed
            # from B's q and k, go through v and W_o here
            alts = [(label, desc, out(P, "mod" if label.startswith("GQA") else "block") @ W + b)
                    for label, desc, P in self.prob_alternatives(i)]
            alts.append(("transposed weight", "the output projection weight transposed",
                         out(self.probs(i, 1 / math.sqrt(Dh))) @ W.T + b))
            return ("softmax scale / mask value / causal mask / GQA grouping / transposed weights "
                    "(attn_probs not in B's trace: recomputed from q and k)"), alts
        if point == "ffn_hidden":
            m = self.get(f"layers.{i}.ffn_norm")
            acts = _acts()
            ref = cfg.activation
            if cfg.arch == "llama":
                gate = m @ self.P[f"layers.{i}.mlp.gate_proj.weight"].T
                up = m @ self.P[f"layers.{i}.mlp.up_proj.weight"].T
                mk = lambda f: f(gate) * up  # noqa: E731
            else:
                if cfg.arch == "bert":
                    W = self.P[f"encoder.layer.{i}.intermediate.dense.weight"].T
                    b = self.P[f"encoder.layer.{i}.intermediate.dense.bias"]
                else:
                    W, b = self.P[f"h.{i}.mlp.c_fc.weight"], self.P[f"h.{i}.mlp.c_fc.bias"]
                z = m @ W + b
                mk = lambda f: f(z)  # noqa: E731
            alts = [("reference", acts[ref][0] + " (the reference activation)", mk(acts[ref][1]))]
            alts += [(k, d, mk(f)) for k, (d, f) in acts.items() if k != ref]
            return "GELU tanh vs erf / activation", alts
        return None


def _check_trace(path, tensors: dict, meta: dict):
    """ValueError naming the file: no ids, a compute dtype _trace_unit does not know, or a tensor
    name that is not a trace name (TRACE.md)."""
    from refimpl.verify.trace import LAYER_POINTS, trace_names
    if not meta.get("ids"):
        raise ValueError(f"{path}: __metadata__.ids (the input token ids, comma-separated) is missing; "
                         "it is required (see refimpl/verify/TRACE.md)")
    if "dtype" in meta and meta["dtype"] not in _U_NAME:
        raise ValueError(f"{path}: __metadata__.dtype {meta['dtype']!r} is not a compute dtype; "
                         f"accepted: {', '.join(_U_NAME)}")
    idx = [n.split(".")[1] for n in tensors if n.startswith("layers.")]
    n_layers = max((int(i) + 1 for i in idx if i.isascii() and i.isdigit()), default=0)
    valid = set(trace_names(n_layers))
    bad = [n for n in tensors if n not in valid]
    if bad:
        raise ValueError(f"{path}: tensor {bad[0]!r} is not a trace name; the names are embed, "
                         f"layers.{{i}}.{{{','.join(LAYER_POINTS)}}}, final_norm, logits "
                         "(see refimpl/verify/TRACE.md)")


def _trace_ids(path, meta) -> list[int]:
    """The metadata's comma-separated ids as ints (spaces allowed), or ValueError naming the file."""
    try:
        return [int(x) for x in meta["ids"].split(",")]
    except ValueError:
        raise ValueError(f"{path}: __metadata__.ids must be comma-separated integers, got {meta['ids']!r}") from None


def diff(path_a, path_b, model=None) -> DiffReport:
    """Compare trace B with reference trace A; see the module docstring."""
    from refimpl.verify.trace import load_model_spec, read_trace_with_dtypes
    ta, ma, sa = read_trace_with_dtypes(path_a)
    tb, mb, sb = read_trace_with_dtypes(path_b)
    _check_trace(path_a, ta, ma)
    _check_trace(path_b, tb, mb)
    mdl = None
    if model:                  # the user's model: refused now if it cannot be loaded, even when nothing differs
        try:
            mdl = load_model_spec(model, dtype="float64")
        except (OSError, ValueError) as e:
            raise ValueError(f"--model {model}: {e}") from None
    ids_a, ids = _trace_ids(path_a, ma), _trace_ids(path_b, mb)
    if ids_a != ids:                                   # as numbers: "1, 5" is "1,5"
        raise ValueError(f"the traces are of different inputs: A ids [{ma['ids']}], B ids [{mb['ids']}]")
    rep = DiffReport(str(path_a), str(path_b), 0.0)
    rep.only_a = [n for n in ta if n not in tb]
    rep.only_b = [n for n in tb if n not in ta]
    common = [n for n in ta if n in tb]
    if not common:
        raise ValueError(f"{path_a} and {path_b} have no tensor name in common")
    layers = {int(n.split(".")[1]) for n in ta if n.startswith("layers.")}
    n_layers = max(layers) + 1 if layers else 0
    D = ta["embed"].shape[-1] if "embed" in ta else ta[common[0]].shape[-1]
    F = next((ta[n].shape[-1] for n in ta if n.endswith("ffn_hidden")), 4 * D)
    S = next((ta[n].shape[-1] for n in ta if n.endswith("attn_probs")), len(ma.get("ids", "").split(",")))
    u = max(_trace_unit(ma, sa), _trace_unit(mb, sb))
    rep.u = u
    if mdl is not None:        # the user's model must be the traces', whatever the tensors say
        try:
            why = _model_mismatch(mdl, ta, (ma, mb), ids, u, n_layers, D, F, S)
        except (KeyError, IndexError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        if why:
            raise ValueError(f"--model {model} is not the model of these traces: {why}")
    for n in common:
        a, b = ta[n], tb[n]
        if a.shape != b.shape:
            d = TensorDiff(n, a.shape, math.inf, error_stats(np.full(a.shape, np.nan), a, 1.0), False,
                           f"shape mismatch: {b.shape} in B, {a.shape} in A")
            rep.tensors.append(d)
            rep.first_bad = rep.first_bad or d
            break
        tol = tolerance(n, np.asarray(a, np.float64), u, n_layers, D, F, S)
        with np.errstate(all="ignore"):
            st = error_stats(b, a, tol)
        ok = st.nonfinite_mismatches == 0 and st.bound_ratio <= 1.0
        d = TensorDiff(n, a.shape, tol, st, ok, checked=relative_bound(n, u, n_layers, D, F, S) < 1)
        rep.tensors.append(d)
        if not ok:
            rep.first_bad = d
            break
    if rep.only_a or rep.only_b:
        rep.notes.append(f"tensors only in A: {rep.only_a or 'none'}; only in B: {rep.only_b or 'none'} (skipped)")
    vacuous = [d.name for d in rep.tensors if not d.checked and not d.note]
    if vacuous:
        rep.notes.append(f"{len(vacuous)} tensor(s) from {vacuous[0]} on have a bound of C gamma(n, u) >= 1 times "
                         f"their scale, or none (n u >= 1), at u = {u:.3g}: the first-order bound says nothing at "
                         "that depth and precision, so they were not checked (verdict: inconclusive)")
    if rep.first_bad is not None and rep.first_bad.stats is not None and not rep.first_bad.note:
        spec = model or _model_spec(mb, path_b) or _model_spec(ma, path_a)
        if not spec:
            rep.notes.append("no model named in the traces' metadata (or --model): convention traps not checked")
        else:
            why = None
            try:
                if mdl is None:       # the metadata's model (a --model was checked above)
                    mdl = load_model_spec(spec, dtype="float64")
                    why = _model_mismatch(mdl, ta, (ma, mb), ids, u, n_layers, D, F, S)
                if not why:
                    _find_trap(rep, _Recompute(mdl, tb, ids), rep.first_bad)
            except (OSError, ValueError, KeyError, IndexError) as e:
                rep.notes.append(f"convention traps not checked: {type(e).__name__}: {e}")
            if why:
                rep.notes.append(f"convention traps not checked: the model {spec} named in the trace metadata "
                                 f"is not the model of these traces: {why}")
    return rep


class _EmbedDone(Exception):
    pass


def _model_mismatch(mdl, ta, metas, ids, u, n_layers, D, F, S) -> str | None:
    """Why `mdl` cannot be the model trace A was made with (arch, config, shapes, the embedding
    of the ids), or None.  Recomputing a layer with another model's weights explains nothing."""
    import json
    cfg = mdl.config
    for meta in metas:
        if meta.get("arch") and meta["arch"] != cfg.arch:
            return f"it is a {cfg.arch} model, the trace metadata says arch {meta['arch']!r}"
        try:
            tc = json.loads(meta.get("config") or "{}")
        except ValueError:
            tc = {}
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if isinstance(tc, dict) and f in tc and tc[f] != getattr(cfg, f):
                return f"its {f} is {getattr(cfg, f)}, the trace metadata's config says {tc[f]!r}"
    if n_layers > cfg.n_layers:
        return f"the traces have {n_layers} layers, the model {cfg.n_layers}"
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        return f"the traces' ids include {bad[0]}, outside the model's vocabulary of {cfg.vocab_size}"
    if "embed" not in ta:
        return None
    a = np.asarray(ta["embed"], np.float64)
    if a.shape != (len(ids), cfg.d_model):
        return f"trace A's embed has shape {a.shape}, the model gives {(len(ids), cfg.d_model)}"
    got = {}

    def stop_after_embed(name, x):
        if name == "embed":
            got["embed"] = np.asarray(x, np.float64)
            raise _EmbedDone

    try:
        mdl.forward(np.asarray(ids, np.int64), trace=stop_after_embed)
    except _EmbedDone:
        pass
    tol = tolerance("embed", a, u, n_layers, D, F, S)
    with np.errstate(all="ignore"):
        st = error_stats(got["embed"], a, tol)
    if st.nonfinite_mismatches or st.bound_ratio > 1.0:
        return (f"its embedding of the ids differs from trace A's embed ({st.bound_ratio:.3g} times the bound): "
                "other weights")
    return None


def _model_spec(meta: dict, trace_path):
    """The metadata's `model`; a relative path is taken relative to the trace file's directory."""
    from pathlib import Path
    spec = meta.get("model")
    if not spec or spec.startswith("tiny:") or Path(spec).is_absolute():
        return spec
    p = Path(trace_path).parent / spec
    return str(p) if p.exists() else spec


def _find_trap(rep: DiffReport, rc: _Recompute, bad: TensorDiff):
    try:
        found = rc.alternatives(bad.name)
    except KeyError as e:
        rep.notes.append(f"cannot recompute {bad.name}: B's trace lacks its input {e}")
        return
    if found is None:
        rep.notes.append(f"no known convention trap for {bad.name}")
        return
    family, alts = found
    b = np.asarray(rc.tb[bad.name], dtype=np.float64)
    checks = []
    for label, desc, y in alts:
        if y.shape != b.shape:
            continue
        with np.errstate(all="ignore"):
            st = error_stats(b, y, bad.tol)
        r = math.inf if st.nonfinite_mismatches else st.bound_ratio
        checks.append(TrapCheck(label, desc, r))
    rep.checks = checks
    ref = next((c for c in checks if c.label == "reference"), None)
    rep.reference_ratio = ref.ratio if ref else None
    others = sorted((c for c in checks if c.label != "reference"), key=lambda c: c.ratio)
    if others and others[0].ratio <= 1.0 and (ref is None or ref.ratio > 1.0):
        rep.trap, rep.trap_family = others[0], family
    elif ref is not None and ref.ratio <= 1.0:
        rep.notes.append(f"recomputing {bad.name} from B's inputs with the reference convention reproduces B: "
                         "B's inputs to this layer or its weights differ from A's")
    else:
        rep.notes.append(f"no known convention ({family}) reproduces B's {bad.name}")
