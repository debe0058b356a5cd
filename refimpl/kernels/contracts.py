"""Kernel contracts: argument checks every backend shares, and the error
bounds every backend is tested against.

Argument rules (all backends)
-----------------------------
* wrong dtype -> TypeError naming the argument; wrong rank or shape ->
  ValueError naming the argument and the sizes.
* inputs that are not C-contiguous (or not aligned) are copied to a
  C-contiguous array first; the result is always a new C-contiguous array.
  Masked arrays are refused (TypeError); other ndarray subclasses are read as ndarrays.
* shapes, one rule per op whatever the backend (check_matmul_args, check_rows_args,
  check_norm_args, check_rope_args, check_attention_args): matmul a [M,K], b [K,N];
  softmax, layer_norm, rms_norm x [..., N] over the last axis, w and b [N]; gelu_tanh and
  silu any shape; rope x [..., T, D] with D even and integer positions [T]; attention
  q [H,Lq,D], k and v [Hkv,Lk,D] with D >= 1 and Lk >= 1.  The C backend takes float32
  only (TypeError for float64), except matmul, which also computes float64 (a correct,
  unblocked path).
* flags (causal, interleaved): bool or 0 / 1, else TypeError (check_flag).
* scalars (eps >= 0, scale, theta > 0): a finite int or float, within float32's range
  when the kernel takes it as float32; TypeError for bool, str, arrays, ValueError for
  the rest (check_finite).

Error bounds (elementwise, absolute, computed in float64)
---------------------------------------------------------
u = unit roundoff of the kernel's dtype (2^-24 float32, 2^-53 float64),
gamma(n) = n u / (1 - n u)  (Higham, Accuracy and Stability, sec. 3.1).

* matmul, inner size K:   |C^ - C| <= c gamma(K+1) (|A| |B|)            c = 2
  (holds for every summation order and with or without FMA; +1 for the
  final rounding to the output dtype).
* softmax over n entries: |p_j^ - p_j| <= p_j ((n+3) u + 2 EXP_ULPS u
  + u |x_j - m| + u sum_i p_i |x_i - m|) + 2 tiny, m = max x  (sum of n
  exponentials: Blanchard, Higham & Higham 2021; the |x - m| terms are the
  rounding of the shift, per element; `tiny` = smallest normal, for flushed
  underflow).
* attention: the matmul bound for S = q k^T scale, the softmax bound with the
  perturbation 2 max_j |dS_ij| added, an online-softmax rescale term of
  (EXP_ULPS + 2) u per K/V block, then the matmul bound for P V with |P| |V|.
* elementwise (gelu_tanh, silu): an ulp budget on the result plus the
  cancellation term of each formula (see each function).
* layer_norm / rms_norm / rope: first-order error analysis of the formula
  as written in refimpl.oracle.layers (see each function), factor c = 2.

EXP_ULPS is the ulp budget allowed for a vector exp / tanh: 4 ulp.
"""
from __future__ import annotations

import math

import numpy as np

EXP_ULPS = 4.0
C_SAFETY = 2.0

# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(name: str, x, dtypes=_FLOATS, ndim: int | None = None) -> np.ndarray:
    """Validate `x` (argument `name`): ndarray, allowed dtype, rank; return it C-contiguous.

    Non-contiguous, misaligned or byte-swapped inputs are copied (documented contract).
    A masked array is refused (the C and Numba kernels would read the masked entries);
    other subclasses (np.matrix, np.memmap) come back as plain ndarrays.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"argument {name!r} must be a numpy.ndarray, got {type(x).__name__}")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"argument {name!r} is a masked array: the kernels read every entry, masked or "
                        "not (pass x.filled(value) or the plain data)")
    if type(x) is not np.ndarray:
        x = np.asarray(x)                            # np.matrix stays 2-D under reshape; kernels need ndarray
    dt = x.dtype if x.dtype.isnative else x.dtype.newbyteorder("=")
    if dt not in dtypes:
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"argument {name!r} has dtype {x.dtype}, expected {allowed}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"argument {name!r} must be {ndim}-D, got shape {x.shape}")
    if not x.dtype.isnative:                             # '>f4' is float32 too, but C would read swapped bytes
        x = x.astype(x.dtype.newbyteorder("="))
    if not (x.flags.c_contiguous and x.flags.aligned):
        x = np.array(x, order="C", copy=True)        # ascontiguousarray keeps a misaligned array as it is
    return x


def check_flag(name: str, value) -> bool:
    """A bool argument (`causal`, `interleaved`): bool, np.bool_ or the integers 0 / 1; TypeError
    naming the argument for anything else ('False', None, 2, an array would be truthy or ambiguous)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"argument {name!r} must be a bool (or 0 / 1), got {value!r}")


_F32_MAX = float(np.finfo(np.float32).max)
_F32_SUBNORMAL_MIN = float(np.finfo(np.float32).smallest_subnormal)


def check_finite(name: str, value, dtype=np.float64, positive: bool = False, nonneg: bool = False) -> float:
    """A real scalar argument (eps, scale, theta) as a Python float.

    TypeError naming the argument unless `value` is an int or float (Python or NumPy; not bool,
    str or an array); ValueError if it is not finite, not > 0 (`positive`) or not >= 0
    (`nonneg`), or, when the kernel takes it as float32 (`dtype`), beyond float32's range (it
    would become inf there) or so small that it rounds to 0 there.
    """
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"argument {name!r} must be a real number, got {type(value).__name__} {value!r}")
    try:
        f = float(value)
    except OverflowError:                            # an int beyond float64
        f = math.inf
    if not math.isfinite(f) or (positive and f <= 0) or (nonneg and f < 0):
        need = "finite and > 0" if positive else ("finite and >= 0" if nonneg else "finite")
        raise ValueError(f"argument {name!r} must be {need}, got {value!r}")
    if np.dtype(dtype) == np.float32:
        if abs(f) > _F32_MAX:
            raise ValueError(f"argument {name!r} = {value!r} overflows float32 (max {_F32_MAX:.7g}), "
                             "the kernel's dtype")
        if f != 0 and np.float32(f) == 0:            # eps = 1e-50 became 0: NaN rows where the oracle has 0
            raise ValueError(f"argument {name!r} = {value!r} underflows to 0 in float32 (smallest "
                             f"{_F32_SUBNORMAL_MIN:.2g}), the kernel's dtype")
    return f


def check_same_dtype(**arrays) -> np.dtype:
    """All arrays share one dtype; TypeError naming the odd one out otherwise."""
    items = list(arrays.items())
    d0 = items[0][1].dtype
    for name, a in items[1:]:
        if a.dtype != d0:
            raise TypeError(f"argument {name!r} has dtype {a.dtype} but {items[0][0]!r} has {d0}")
    return d0


def check_matmul_args(a, b, dtypes=_FLOATS):
    """a (M,K), b (K,N)."""
    a = check_array("a", a, dtypes, ndim=2)
    b = check_array("b", b, dtypes, ndim=2)
    check_same_dtype(a=a, b=b)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: a is {a.shape} and b is {b.shape}: inner sizes {a.shape[1]} != {b.shape[0]}")
    return a, b


def check_rows_args(op: str, x, dtypes=_FLOATS) -> np.ndarray:
    """x [..., N] (softmax over its last axis): at least 1-D."""
    x = check_array("x", x, dtypes)
    if x.ndim == 0:
        raise ValueError(f"{op}: argument 'x' must have at least 1 dimension ([..., N]), got a 0-D array")
    return x


def check_norm_args(op: str, x, w, *b, dtypes=_FLOATS) -> tuple:
    """x [..., D], w [D] (and b [D] for layer_norm), one dtype; returns (x, w, *b)."""
    x = check_rows_args(op, x, dtypes)
    vecs = {"w": w, **({"b": b[0]} if b else {})}
    for name, a in vecs.items():
        a = vecs[name] = check_array(name, a, dtypes, ndim=1)
        if a.shape[0] != x.shape[-1]:
            raise ValueError(f"{op}: argument {name!r} has shape {a.shape}, expected ({x.shape[-1]},) "
                             f"to match x {x.shape}")
    check_same_dtype(x=x, **vecs)
    return (x, *vecs.values())


def check_rope_args(x, positions, dtypes=_FLOATS) -> tuple:
    """x [..., T, D] with D even, positions [T] integers; returns (x, positions as int64)."""
    x = check_array("x", x, dtypes)
    if x.ndim < 2:
        raise ValueError(f"rope: argument 'x' must be [..., T, D] (at least 2-D), got shape {x.shape}")
    T, D = x.shape[-2:]
    if D % 2:
        raise ValueError(f"rope: head width D={D} (x of shape {x.shape}) must be even")
    p = np.asarray(positions)
    if p.dtype.kind not in "iu":
        raise TypeError(f"argument 'positions' must hold integers (token positions), got dtype {p.dtype}")
    if p.shape != (T,):
        raise ValueError(f"argument 'positions' has shape {p.shape}, expected ({T},) to match x {x.shape}")
    if p.dtype.kind == "u" and p.size and int(p.max()) > np.iinfo(np.int64).max:
        raise ValueError("argument 'positions' has values beyond the int64 range")
    return x, np.ascontiguousarray(p, dtype=np.int64)


def check_attention_shapes(q_shape, k_shape, v_shape, causal=False):
    """q (H,Lq,D), k (Hkv,Lk,D), v (Hkv,Lk,D), H % Hkv == 0, D >= 1, Lk >= 1 (a softmax over no
    key, and the default scale 1/sqrt(0), are undefined), causal needs Lq <= Lk.  H = 0 or
    Lq = 0 gives an empty result."""
    H, Lq, D = q_shape
    Hkv, Lk, Dk = k_shape
    if Dk != D:
        raise ValueError(f"attention: k head width {Dk} != q head width {D}")
    if D == 0:
        raise ValueError(f"attention: head width D must be >= 1, got q of shape {tuple(q_shape)}")
    if Lk == 0:
        raise ValueError(f"attention: needs at least one key (softmax over zero keys is undefined), "
                         f"got k of shape {tuple(k_shape)}")
    if tuple(v_shape) != tuple(k_shape):
        raise ValueError(f"attention: v has shape {tuple(v_shape)}, expected the shape of k {tuple(k_shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if causal and Lq > Lk:
        raise ValueError(f"attention: causal needs Lq <= Lk, got Lq={Lq}, Lk={Lk}")


def check_attention_args(q, k, v, causal=False, dtypes=_FLOATS):
    """Arrays checked (see check_array) and shapes checked (see check_attention_shapes)."""
    q = check_array("q", q, dtypes, ndim=3)
    k = check_array("k", k, dtypes, ndim=3)
    v = check_array("v", v, dtypes, ndim=3)
    check_same_dtype(q=q, k=k, v=v)
    check_attention_shapes(q.shape, k.shape, v.shape, causal)
    return q, k, v


# --------------------------------------------------------------------------
# error bounds
# --------------------------------------------------------------------------


def unit_roundoff(dtype) -> float:
    """u = 2^-p: 2^-24 for float32, 2^-53 for float64, 2^-11 for float16, 2^-8 for "bfloat16"
    (which NumPy does not know by that name)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return 2.0 ** -8
    return float(np.finfo(dtype).eps) / 2.0


def gamma(n, u: float) -> float:
    """gamma_n = n u / (1 - n u)."""
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1.0 - nu)


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def matmul_bound(a, b, dtype, c: float = C_SAFETY):  # [M,K],[K,N] -> [M,N]
    """c gamma(K+1) (|A| |B|) + K tiny: elementwise absolute bound of a float `dtype` matmul."""
    u = unit_roundoff(dtype)
    K = a.shape[-1]
    tiny = float(np.finfo(dtype).tiny)
    return c * gamma(K + 1, u) * (np.abs(_f64(a)) @ np.abs(_f64(b))) + K * tiny


def softmax_rel_bound(x, dtype, exp_ulps: float = EXP_ULPS):  # [..., n] -> [..., n]
    """Relative bound per element of softmax(x), first order:

    fl(x_j - m) = (x_j - m)(1 + d) puts u|x_j - m| into exp's argument, exp adds
    exp_ulps u, the sum of n terms adds (n+1) u plus the weighted errors of its
    terms, the division u:

        rel_j = (n+3) u + 2 exp_ulps u + u |x_j - m| + u sum_i p_i |x_i - m|

    (masked entries, -inf, have p_j = 0 exactly and contribute nothing.)
    """
    from refimpl.oracle.layers import softmax
    u = unit_roundoff(dtype)
    x = _f64(x)
    n = x.shape[-1]
    finite = np.isfinite(x)
    m = np.where(finite, x, -np.inf).max(axis=-1, keepdims=True)
    dist = np.where(finite, np.abs(x - np.where(np.isfinite(m), m, 0)), 0.0)   # |x_j - m|
    p = softmax(np.where(finite | np.isnan(x), x, -np.inf), axis=-1)
    mean_dist = np.nansum(np.where(finite, p, 0.0) * dist, axis=-1, keepdims=True)
    return (n + 3) * u + 2 * exp_ulps * u + u * dist + u * mean_dist


def softmax_bound(x, p, dtype, exp_ulps: float = EXP_ULPS):  # [..., n], [..., n] -> [..., n]
    """|p^ - p| <= p * softmax_rel_bound(x) + 2 tiny, with p the float64 reference."""
    tiny = float(np.finfo(dtype).tiny)
    return np.abs(_f64(p)) * softmax_rel_bound(x, dtype, exp_ulps) + 2 * tiny


def attention_bound(q, k, v, causal=False, scale=None, dtype=np.float32, block: int = 16,
                    c: float = C_SAFETY, exp_ulps: float = EXP_ULPS):  # -> [H,Lq,D]
    """Composed bound for attention(q, k, v): QK^T, softmax, online rescales, PV.

    `block` is the K/V tile size of an online-softmax kernel (one rescale per
    block); 16 covers every tile size >= 16.  Computed per head in float64.
    """
    from refimpl.oracle import layers as L
    u = unit_roundoff(dtype)
    tiny = float(np.finfo(dtype).tiny)
    q, k, v = _f64(q), _f64(k), _f64(v)
    H, Lq, D = q.shape
    Hkv, Lk, _ = k.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    mask = L.causal_mask(Lq, Lk) if causal else np.ones((Lq, Lk), dtype=bool)
    n_blocks = max(1, math.ceil(Lk / block))
    out = np.empty((H, Lq, v.shape[2]))
    for h in range(H):
        g = L.kv_head_of(h, H, Hkv)
        S = q[h] @ k[g].T * scale                                           # [Lq,Lk]
        dS = c * gamma(D + 1, u) * (np.abs(q[h]) @ np.abs(k[g]).T) * abs(scale) + u * np.abs(S)
        Sm = np.where(mask, S, -np.inf)
        P = L.softmax(Sm, axis=-1)
        pert = 2 * np.where(mask, dS, 0).max(axis=-1, keepdims=True)       # [Lq,1]
        rel = softmax_rel_bound(Sm, dtype, exp_ulps) + pert + n_blocks * (exp_ulps + 2) * u
        dP = P * rel + 2 * tiny
        absV = np.abs(v[g])
        out[h] = dP @ absV + c * gamma(Lk + 1, u) * (P @ absV) + Lk * tiny
    return out


def gelu_tanh_bound(x, ref, dtype, ulps: float = EXP_ULPS + 4):
    """ulps u (|ref| + |x|): 1 + tanh(y) cancels for x << 0, so the error scales with |x|."""
    u = unit_roundoff(dtype)
    return ulps * u * (np.abs(_f64(ref)) + np.abs(_f64(x))) + float(np.finfo(dtype).tiny)


def silu_bound(x, ref, dtype, ulps: float = EXP_ULPS + 3):
    """ulps u |ref|: x * sigmoid(x) is well conditioned except for exp's own error.

    One allowance: where exp(-x) overflows `dtype` (x < -log(max), -88.72 in float32), the
    common form x / (1 + exp(-x)) gives -0 (torch's does); the true value there is below
    |x| e^x < 2.6e-37 in float32.  The bound there is |ref|: any result between 0 and ref."""
    u = unit_roundoff(dtype)
    x64, r = _f64(x), np.abs(_f64(ref))
    flush = x64 < -math.log(float(np.finfo(dtype).max))
    return np.where(flush, r, ulps * u * r) + float(np.finfo(dtype).tiny)


def layer_norm_bound(x, w, b, eps, dtype, c: float = C_SAFETY):  # [..., D] -> [..., D]
    """First-order bound for (x - mean)/sqrt(var + eps) * w + b.

    d_mean <= gamma(D) mean|x|;  d(x_i - mean) <= u|x_i - mean| + d_mean;
    rel d_sigma <= (gamma(D+2) + 2 d_mean mean|x - mean| / (var + eps)) / 2 + 2u;
    |dn_i| <= d(x_i - mean)/sigma + |n_i| rel d_sigma;
    |dy_i| <= |dn_i||w_i| + 2u (|n_i w_i| + |y_i|).
    """
    u = unit_roundoff(dtype)
    x, w, b = _f64(x), _f64(w), _f64(b)
    D = x.shape[-1]
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    var = (xc ** 2).mean(-1, keepdims=True)
    sigma = np.sqrt(var + eps)
    n = xc / sigma
    y = n * w + b
    dmean = gamma(D, u) * np.abs(x).mean(-1, keepdims=True)
    dxc = u * np.abs(xc) + dmean
    rel_sigma = (gamma(D + 2, u) + 2 * dmean * np.abs(xc).mean(-1, keepdims=True) / (var + eps)) / 2 + 2 * u
    dn = dxc / sigma + np.abs(n) * rel_sigma
    return c * (dn * np.abs(w) + 2 * u * (np.abs(n * w) + np.abs(y))) + float(np.finfo(dtype).tiny)


def rms_norm_bound(x, w, eps, dtype, c: float = C_SAFETY):  # [..., D] -> [..., D]
    """|dy_i| <= |y_i| (gamma(D+1)/2 + 4u): mean of squares, rsqrt, two products."""
    u = unit_roundoff(dtype)
    x, w = _f64(x), _f64(w)
    D = x.shape[-1]
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    return c * np.abs(y) * (gamma(D + 1, u) / 2 + 4 * u) + float(np.finfo(dtype).tiny)


def rope_bound(x, positions, theta, dtype, c: float = C_SAFETY, ulps: float = EXP_ULPS):  # [..., T, D]
    """(|x1| + |x2|) (ulps + |angle|) u per output of a rotated pair.

    The |angle| u term allows the angle p theta^(-2i/D) to be formed in the
    kernel's dtype (its rounding moves cos/sin by up to u |angle|).
    """
    from refimpl.oracle import layers as L
    u = unit_roundoff(dtype)
    x = _f64(x)
    D = x.shape[-1]
    ang = np.abs(L.rope_angles(np.asarray(positions), D, theta))           # [T, D/2]
    # pair magnitudes in either convention are bounded by the row's two halves' max
    mag = np.abs(x)
    pair = np.maximum(mag[..., : D // 2], mag[..., D // 2:]) + np.maximum(mag[..., 0::2], mag[..., 1::2])
    per_pair = c * 2 * pair * (ulps + 2 + ang) * u                         # [..., T, D/2]
    bound = np.concatenate([per_pair, per_pair], axis=-1)
    # the two conventions place pairs differently: take the max over both layouts
    inter = np.repeat(per_pair, 2, axis=-1)
    return np.maximum(bound, inter) + float(np.finfo(dtype).tiny)
