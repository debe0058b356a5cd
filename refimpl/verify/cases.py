"""Test cases for every op in the kernel contract: edge cases and hypothesis strategies.

An op (see `SPECS`) is described by
    arrays      the array arguments, in call order (passed positionally)
    params      keyword parameters and their defaults (passed by keyword when
                the implementation accepts them, otherwise fixed at the value
                the user gave, or the default)
    varied      params the generators vary when the implementation accepts
                them (attention: `causal`, `scale`)
    reference   the float64 oracle on the same inputs (refimpl.oracle.layers)
    bound       the elementwise error bound from refimpl.kernels.contracts

Call signatures are those of refimpl/kernels/numpy_kernels.py:
    matmul(a, b)                               [M,K],[K,N] -> [M,N]
    softmax(x)                                 [R,N] -> [R,N] (last axis)
    attention(q, k, v, causal=False, scale=None)   [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    layer_norm(x, w, b, eps=1e-5)              [R,D],[D],[D] -> [R,D]
    rms_norm(x, w, eps=1e-6)                   [R,D],[D] -> [R,D]
    gelu_tanh(x)  silu(x)                      [n] -> [n]
    rope(x, positions, theta=10000.0, interleaved=False)   [H,T,D],[T] int -> [H,T,D]

Edge cases cover shapes 1, primes, K=1, long K / long rows, tile edges,
logits near +-88 (float32 exp overflow) and +-3e38, -inf masked entries,
causal with Lq < Lk, GQA and MQA, constant rows, a large mean (the
E[x^2] - E[x]^2 variance trap), large RoPE positions.  The hypothesis
strategies draw small shapes (so a shrunk failure is small enough to paste)
with values mixing ordinary magnitudes and the special values above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from refimpl.kernels import contracts as C
from refimpl.oracle import layers as L

OPS = ("matmul", "softmax", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu", "rope")


@dataclass
class Case:
    name: str
    arrays: dict            # argument name -> np.ndarray (in the spec's order)
    params: dict = field(default_factory=dict)  # varied keyword params of this case (e.g. causal)

    def describe(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.arrays.items())
        ps = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return shapes + ps

    def size(self) -> int:
        return sum(int(v.size) for v in self.arrays.values())


@dataclass
class OpSpec:
    name: str
    arrays: tuple
    params: dict
    varied: tuple
    reference: Callable     # (arrays64: dict, params: dict) -> float64 array
    bound: Callable         # (arrays: dict, params: dict, ref, dtype) -> float64 array
    signature: str          # the Python call convention, for messages


def _f64(arrays):
    return {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in arrays.items()}


def _attention_ref(a, p):
    mask = L.causal_mask(a["q"].shape[1], a["k"].shape[1]) if p.get("causal") else None
    return L.multi_head_attention(a["q"], a["k"], a["v"], mask, p.get("scale"))


SPECS: dict[str, OpSpec] = {
    "matmul": OpSpec(
        "matmul", ("a", "b"), {}, (),
        lambda a, p: a["a"] @ a["b"],
        lambda a, p, ref, dt: C.matmul_bound(a["a"], a["b"], dt),
        "matmul(a[M,K], b[K,N]) -> [M,N]"),
    "softmax": OpSpec(
        "softmax", ("x",), {}, (),
        lambda a, p: L.softmax(a["x"], axis=-1),
        lambda a, p, ref, dt: C.softmax_bound(a["x"], ref, dt),
        "softmax(x[R,N]) -> [R,N] over the last axis"),
    "attention": OpSpec(
        "attention", ("q", "k", "v"), {"causal": False, "scale": None}, ("causal", "scale"),
        _attention_ref,
        lambda a, p, ref, dt: C.attention_bound(a["q"], a["k"], a["v"], bool(p.get("causal")), p.get("scale"), dt),
        "attention(q[H,Lq,D], k[Hkv,Lk,D], v[Hkv,Lk,D], causal=False, scale=None) -> [H,Lq,D]"),
    "layer_norm": OpSpec(
        "layer_norm", ("x", "w", "b"), {"eps": 1e-5}, (),
        lambda a, p: L.layer_norm(a["x"], a["w"], a["b"], p["eps"]),
        lambda a, p, ref, dt: C.layer_norm_bound(a["x"], a["w"], a["b"], p["eps"], dt),
        "layer_norm(x[R,D], w[D], b[D], eps=1e-5) -> [R,D]"),
    "rms_norm": OpSpec(
        "rms_norm", ("x", "w"), {"eps": 1e-6}, (),
        lambda a, p: L.rms_norm(a["x"], a["w"], p["eps"]),
        lambda a, p, ref, dt: C.rms_norm_bound(a["x"], a["w"], p["eps"], dt),
        "rms_norm(x[R,D], w[D], eps=1e-6) -> [R,D]"),
    "gelu_tanh": OpSpec(
        "gelu_tanh", ("x",), {}, (),
        lambda a, p: L.gelu_tanh(a["x"]),
        lambda a, p, ref, dt: C.gelu_tanh_bound(a["x"], ref, dt),
        "gelu_tanh(x[n]) -> [n]"),
    "silu": OpSpec(
        "silu", ("x",), {}, (),
        lambda a, p: L.silu(a["x"]),
        lambda a, p, ref, dt: C.silu_bound(a["x"], ref, dt),
        "silu(x[n]) -> [n]"),
    "rope": OpSpec(
        "rope", ("x", "positions"), {"theta": 10000.0, "interleaved": False}, (),
        lambda a, p: L.rope(a["x"], a["positions"], p["theta"], p["interleaved"]),
        lambda a, p, ref, dt: C.rope_bound(a["x"], a["positions"], p["theta"], dt),
        "rope(x[H,T,D], positions[T] int, theta=10000.0, interleaved=False) -> [H,T,D]"),
}


def spec(op: str) -> OpSpec:
    if op not in SPECS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return SPECS[op]


def reference(op: str, case: Case, params: dict) -> np.ndarray:
    """The float64 oracle on the case's inputs (float32 inputs are widened exactly)."""
    return np.asarray(SPECS[op].reference(_f64(case.arrays), params), dtype=np.float64)


def bound(op: str, case: Case, params: dict, ref, dtype) -> np.ndarray:
    """The contract's elementwise error bound for a `dtype` implementation."""
    return np.asarray(SPECS[op].bound(case.arrays, params, ref, dtype), dtype=np.float64)


# --------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------

SOFTMAX_SPECIALS = (88.72, -88.72, 89.0, -103.0, 3.0e38, -3.0e38, -math.inf)


def edge_cases(op: str, dtype=np.float32, accepts=(), seed: int = 0, all_masked_rows: bool = False) -> list[Case]:
    """Deterministic edge cases for `op` in `dtype`.

    `accepts` names the varied params the implementation takes (attention:
    "causal", "scale"); cases needing a param it does not take are left out.
    `all_masked_rows`: add a softmax case with a row of only -inf (result: zeros).
    """
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)

    def r(*shape, scale=1.0, loc=0.0):
        return (loc + scale * rng.standard_normal(shape)).astype(dt)

    out: list[Case] = []
    add = lambda name, params=None, **arrays: out.append(Case(name, arrays, params or {}))  # noqa: E731
    if op == "matmul":
        add("1x1x1", a=r(1, 1), b=r(1, 1))
        add("K=1 (outer product)", a=r(5, 1), b=r(1, 7))
        add("M=1 (GEMV, decode)", a=r(1, 64), b=r(64, 33))
        add("N=1", a=r(9, 16), b=r(16, 1))
        add("primes 7x13x5", a=r(7, 13), b=r(13, 5))
        add("primes 17x31x19", a=r(17, 31), b=r(31, 19))
        add("tile edges 33x65x13", a=r(33, 65), b=r(65, 13))
        add("long K 2x4099x3", a=r(2, 4099), b=r(4099, 3))
        add("cancellation (large equal and opposite)", a=np.array([[1e4, 1.0, -1e4]], dt),
            b=np.array([[1.0], [3.0], [1.0]], dt))
        add("zeros", a=np.zeros((3, 4), dt), b=r(4, 2))
        add("mixed magnitudes", a=r(4, 40, scale=100.0) * (rng.random((4, 40)) < 0.3).astype(dt),
            b=r(40, 6, scale=0.01))
    elif op == "softmax":
        add("n=1", x=r(3, 1))
        add("ordinary 4x10", x=r(4, 10, scale=3.0))
        add("ties", x=np.array([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]], dt))
        add("logits near exp overflow (+-88)", x=np.array([[88.72, 88.0, 0.0], [-88.72, -87.0, -103.0],
                                                           [88.72, 88.72, 88.72]], dt))
        add("logits near float max (+-3e38)", x=np.array([[3.0e38, 0.0, -3.0e38], [3.0e38, 3.0e38, 1.0],
                                                          [-3.0e38, -3.0e38, -2.0e38]], dt))
        xm = r(3, 6)
        xm[0, 2:] = -np.inf
        xm[1, ::2] = -np.inf
        xm[2, :5] = -np.inf
        add("-inf masked entries", x=xm)
        if all_masked_rows:
            xa = r(3, 4)
            xa[1] = -np.inf
            add("fully masked row (all -inf: zeros)", x=xa)
        add("long row n=4099", x=r(2, 4099, scale=5.0))
        add("prime n=257, large spread", x=r(3, 257, scale=30.0))
    elif op == "attention":
        causal = "causal" in accepts
        add("1 head, 1 query, 1 key, D=1", q=r(1, 1, 1), k=r(1, 1, 1), v=r(1, 1, 1))
        add("MHA H=2 Lq=Lk=5 D=8", q=r(2, 5, 8), k=r(2, 5, 8), v=r(2, 5, 8))
        add("GQA H=4 Hkv=2", q=r(4, 3, 4), k=r(2, 6, 4), v=r(2, 6, 4))
        add("MQA H=3 Hkv=1", q=r(3, 2, 8), k=r(1, 7, 8), v=r(1, 7, 8))
        add("large logits (max shift needed)", q=r(1, 3, 4, scale=30.0), k=r(1, 5, 4, scale=30.0), v=r(1, 5, 4))
        add("long Lk=129 D=16 (tile edges)", q=r(2, 3, 16), k=r(2, 129, 16), v=r(2, 129, 16))
        add("prime shapes H=1 Lq=7 Lk=13 D=5", q=r(1, 7, 5), k=r(1, 13, 5), v=r(1, 13, 5))
        if causal:
            add("causal Lq=Lk=6", {"causal": True}, q=r(2, 6, 4), k=r(2, 6, 4), v=r(2, 6, 4))
            add("causal Lq=3 < Lk=8 (query t sees keys 0..Lk-Lq+t)", {"causal": True},
                q=r(2, 3, 4), k=r(2, 8, 4), v=r(2, 8, 4))
            add("causal decode Lq=1 Lk=9, GQA", {"causal": True}, q=r(4, 1, 8), k=r(2, 9, 8), v=r(2, 9, 8))
            add("causal Lq=Lk=1", {"causal": True}, q=r(1, 1, 4), k=r(1, 1, 4), v=r(1, 1, 4))
        if "scale" in accepts:
            add("explicit scale=0.5", {"scale": 0.5}, q=r(2, 4, 4), k=r(2, 4, 4), v=r(2, 4, 4))
    elif op == "layer_norm":
        add("D=1 (output is b)", x=r(3, 1), w=r(1), b=r(1))
        add("ordinary 4x16", x=r(4, 16, scale=2.0), w=r(16), b=r(16))
        add("constant rows (var=0)", x=np.full((2, 8), 3.0, dt), w=r(8), b=r(8))
        add("large mean 3e3 (E[x^2]-E[x]^2 trap)", x=r(3, 64, loc=3e3), w=r(64), b=r(64))
        add("prime D=257", x=r(2, 257, scale=10.0), w=r(257), b=r(257))
        add("large values 1e3", x=r(2, 31, scale=1e3), w=r(31), b=r(31))
    elif op == "rms_norm":
        add("D=1", x=r(3, 1), w=r(1))
        add("ordinary 4x16", x=r(4, 16, scale=2.0), w=r(16))
        add("zero row (eps only)", x=np.zeros((1, 8), dt), w=r(8))
        add("tiny row (eps dominates)", x=r(2, 8, scale=1e-4), w=r(8))
        add("prime D=257", x=r(2, 257, scale=10.0), w=r(257))
        add("large values 1e3", x=r(2, 31, scale=1e3), w=r(31))
    elif op in ("gelu_tanh", "silu"):
        add("grid -10..10", x=np.linspace(-10, 10, 201).astype(dt))
        add("zero and tiny normals", x=np.array([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7], dt))
        add("large magnitudes", x=np.array([30.0, -30.0, 88.0, -88.0, 1e4, -1e4, 1e30, -1e30], dt))
        add("n=1", x=np.array([0.5], dt))
        add("prime n=1031", x=r(1031, scale=4.0))
    elif op == "rope":
        add("D=2, T=1, position 0", x=r(1, 1, 2), positions=np.array([0]))
        add("H=2 T=5 D=8", x=r(2, 5, 8), positions=np.arange(5))
        add("offset positions 100..103 D=16", x=r(1, 4, 16), positions=np.arange(100, 104))
        add("large positions 65536", x=r(1, 3, 4), positions=np.array([0, 4097, 65536]))
        add("unsorted positions", x=r(3, 4, 6), positions=np.array([5, 0, 2, 9]))
    else:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return out


# --------------------------------------------------------------------------
# hypothesis strategies
# --------------------------------------------------------------------------


def _floats(st, dt, lim, specials=()):
    width = 32 if np.dtype(dt) == np.float32 else 64
    base = st.floats(-lim, lim, width=width, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    if specials:
        return st.one_of(base, st.sampled_from([float(np.dtype(dt).type(s)) for s in specials]))
    return base


def strategy(op: str, dtype=np.float32, accepts=(), all_masked_rows: bool = False):
    """A hypothesis strategy of `Case`s for `op` (small shapes, mixed values)."""
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    dt = np.dtype(dtype)
    arr = lambda shape, el: hnp.arrays(dt, shape, elements=el)  # noqa: E731

    @st.composite
    def matmul(draw):
        M, K, N = draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
        el = _floats(st, dt, 2.0 ** 10)
        return Case("hypothesis", {"a": draw(arr((M, K), el)), "b": draw(arr((K, N), el))})

    @st.composite
    def softmax(draw):
        R, N = draw(st.integers(1, 4)), draw(st.integers(1, 12))
        x = draw(arr((R, N), _floats(st, dt, 2.0 ** 7, SOFTMAX_SPECIALS)))
        if not all_masked_rows:
            x[np.isneginf(x).all(axis=-1), 0] = 0.0       # every row keeps a finite entry
        return Case("hypothesis", {"x": x})

    @st.composite
    def attention(draw):
        Hkv = draw(st.integers(1, 2))
        H = Hkv * draw(st.integers(1, 3))
        D = draw(st.integers(1, 8))
        Lk = draw(st.integers(1, 8))
        Lq = draw(st.integers(1, Lk))
        el = _floats(st, dt, 2.0 ** 3, (-64.0, 64.0))
        params = {}
        if "causal" in accepts:
            params["causal"] = draw(st.booleans())
        return Case("hypothesis", {"q": draw(arr((H, Lq, D), el)), "k": draw(arr((Hkv, Lk, D), el)),
                                   "v": draw(arr((Hkv, Lk, D), _floats(st, dt, 2.0 ** 4)))}, params)

    @st.composite
    def layer_norm(draw):
        R, D = draw(st.integers(1, 3)), draw(st.integers(1, 16))
        return Case("hypothesis", {"x": draw(arr((R, D), _floats(st, dt, 2.0 ** 8))),
                                   "w": draw(arr((D,), _floats(st, dt, 4.0))),
                                   "b": draw(arr((D,), _floats(st, dt, 4.0)))})

    @st.composite
    def rms_norm(draw):
        R, D = draw(st.integers(1, 3)), draw(st.integers(1, 16))
        return Case("hypothesis", {"x": draw(arr((R, D), _floats(st, dt, 2.0 ** 8))),
                                   "w": draw(arr((D,), _floats(st, dt, 4.0)))})

    @st.composite
    def elementwise(draw):
        n = draw(st.integers(1, 16))
        return Case("hypothesis", {"x": draw(arr((n,), _floats(st, dt, 2.0 ** 10, (88.0, -88.0, 1e30, -1e30))))})

    @st.composite
    def rope(draw):
        H, T, D = draw(st.integers(1, 3)), draw(st.integers(1, 4)), 2 * draw(st.integers(1, 6))
        pos = np.asarray(draw(st.lists(st.integers(0, 2 ** 16), min_size=T, max_size=T)), dtype=np.int64)
        return Case("hypothesis", {"x": draw(arr((H, T, D), _floats(st, dt, 2.0 ** 4))), "positions": pos})

    table = {"matmul": matmul, "softmax": softmax, "attention": attention, "layer_norm": layer_norm,
             "rms_norm": rms_norm, "gelu_tanh": elementwise, "silu": elementwise, "rope": rope}
    if op not in table:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return table[op]()


# --------------------------------------------------------------------------
# printing a case so it can be pasted
# --------------------------------------------------------------------------


def format_array(a: np.ndarray) -> str:
    """`np.array([...], dtype=np.float32)`, every value printed exactly (shortest round-trip)."""
    if a.dtype.kind == "f":
        body = np.array2string(a, separator=", ", floatmode="unique", threshold=10 ** 9, max_line_width=100)
        body = body.replace("inf", "np.inf").replace("nan", "np.nan")
        return f"np.array({body}, dtype=np.{a.dtype.name})"
    return f"np.array({np.array2string(a, separator=', ', threshold=10 ** 9)}, dtype=np.{a.dtype.name})"


def format_case(op: str, case: Case, params: dict, max_elements: int = 96, dtype=None, accepts=(),
                seed: int = 0) -> str:
    """Python source that rebuilds the case and repeats the call.

    A case larger than `max_elements` is an edge case: the source regenerates it by name.
    """
    sp = SPECS[op]
    kw = "".join(f", {k}={v!r}" for k, v in {**params, **case.params}.items())
    if case.size() > max_elements:
        dt = np.dtype(dtype or next(iter(case.arrays.values())).dtype).name
        return "\n".join([
            "import numpy as np",
            "from refimpl.verify.cases import edge_cases",
            f"case = next(c for c in edge_cases({op!r}, np.{dt}, {sorted(accepts)!r}, seed={seed}) "
            f"if c.name == {case.name!r})",
            f"out = impl(*case.arrays.values(){kw})"])
    lines = ["import numpy as np"]
    for k, v in case.arrays.items():
        lines.append(f"{k} = {format_array(v)}")
    lines.append(f"out = impl({', '.join(sp.arrays)}{kw})")
    return "\n".join(lines)
