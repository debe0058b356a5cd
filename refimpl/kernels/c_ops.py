"""The "c" backend for softmax, attention, layer_norm, rms_norm, gelu_tanh, silu and rope.

Every op checks its arguments here (dtype, rank, shapes, naming the argument), copies
non-contiguous or misaligned inputs, allocates a new output and calls the C kernel in
refimpl._kernels (csrc/kernels/<op>.c: AVX-512, AVX2+FMA or portable path, chosen at run
time; see refimpl.kernels.cdispatch).  `op.prepare(...)` returns a `CCall` for timing the
same call from a loop in C (no Python in the timed region).

Dtypes: float32 only.  float64 arguments raise TypeError (the float64 truth is the oracle,
backend "numpy"); computing float64 through float32 kernels would silently lose precision.
"""
from __future__ import annotations

import math

import numpy as np

from refimpl._kernels import ffi, lib
from refimpl.kernels.buffers import address, apart_empty
from refimpl.kernels.ccall import CCall
from refimpl.kernels.contracts import (check_array, check_attention_args, check_attention_shapes, check_finite,
                                      check_flag, check_norm_args, check_rope_args, check_rows_args)
from refimpl.kernels.registry import register

_INT32_MAX = 2**31 - 1


def _f32(name: str, x, ndim: int | None = None) -> np.ndarray:
    """`x` as a C-contiguous float32 array of rank `ndim`; TypeError for float64 and others."""
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        raise TypeError(f"argument {name!r} has dtype float64: the C backend computes in float32 only "
                        "(use backend 'numpy', the oracle, for float64)")
    return check_array(name, x, dtypes=(np.float32,), ndim=ndim)   # copies misaligned / strided / swapped


def _fp(a: np.ndarray):
    return ffi.from_buffer("float[]", a)


def _prepared(thunk: str, ctype: str, fields: dict, out: np.ndarray, keep: list, status: bool = False) -> CCall:
    """Pack `fields` into a new `ctype` struct; the CCall runs `thunk(&struct)`."""
    args = ffi.new(ctype + " *")
    for name, value in fields.items():
        setattr(args, name, value)
    fn = getattr(lib, thunk)
    keep = [args, *keep]

    def run(_keep=keep):
        # `_keep` holds the (possibly copied) inputs: `prepare(...).run()` releases the
        # temporary CCall before the call, and the C kernel must not read freed memory
        fn(args)
        if status and args.status != 0:
            raise MemoryError(f"{thunk}: could not allocate its scratch buffers")
        return out

    fn_addr = int(ffi.cast("uintptr_t", ffi.addressof(lib, thunk)))
    ctx_addr = int(ffi.cast("uintptr_t", args))
    return CCall(fn_addr=fn_addr, ctx_addr=ctx_addr, run=run, out=out, keep=keep)


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


def _rows(x) -> tuple[int, int]:
    """(R, N) of x [..., N] read as R rows of N; (0, 0) when x is empty."""
    return (x.size // x.shape[-1], x.shape[-1]) if x.size else (0, 0)


def prepare_softmax(x) -> CCall:  # [..., N] -> [..., N]
    x = check_rows_args("softmax", _f32("x", x))
    out = apart_empty(x.shape, x.dtype, like=x)
    bufs = [_fp(out), _fp(x)] if x.size else [ffi.NULL, ffi.NULL]
    R, N = _rows(x)
    return _prepared("rf_softmax_thunk", "rf_softmax_args",
                     dict(out=bufs[0], x=bufs[1], R=R, N=N), out, [x, *bufs])


@register("softmax", "c")
def softmax(x):  # [..., N] -> [..., N], over the last axis
    """Row softmax (fused max / exp-sum / scale, vector exp within EXP_ULPS)."""
    x = check_rows_args("softmax", _f32("x", x))
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        lib.rf_softmax_f32(_fp(out), _fp(x), *_rows(x))
    return out


softmax.prepare = prepare_softmax


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def _kv_head_stride(k, v):
    """Floats between kv heads if k and v are the same kind of head-strided view (rows of a head
    contiguous, e.g. cache[:, :Lk] of a (Hkv, S_max, D) KV cache), else None (they get copied)."""
    if not (type(k) is np.ndarray and type(v) is np.ndarray and k.ndim == 3 and k.shape == v.shape
            and k.dtype == v.dtype == np.float32 and k.dtype.isnative and k.flags.aligned and v.flags.aligned
            and k.strides == v.strides):
        return None
    Hkv, Lk, D = k.shape
    s0, s1, s2 = k.strides
    if s2 != 4 or s1 != 4 * D or s0 % 4 or s0 < 4 * Lk * D:
        return None
    return s0 // 4


def _attention_args(q, k, v, causal, scale):  # -> q, k, v, kv_stride, causal, scale
    """Checked arguments; k, v may stay head-strided views of a KV cache (kv_stride floats apart)."""
    causal = check_flag("causal", causal)
    kv_stride = _kv_head_stride(k, v)
    q = _f32("q", q, ndim=3)
    if kv_stride is None:
        q, k, v = check_attention_args(q, _f32("k", k, ndim=3), _f32("v", v, ndim=3), causal)
    else:
        check_attention_shapes(q.shape, k.shape, v.shape, causal)
    H, Lq, D = q.shape
    Hkv, Lk, _ = k.shape
    if Lk > _INT32_MAX:
        raise ValueError(f"attention: Lk={Lk} exceeds the C kernel's limit {_INT32_MAX}")
    scale = 1.0 / math.sqrt(D) if scale is None else check_finite("scale", scale, np.float32)
    return q, k, v, kv_stride or Lk * D, causal, scale


def _kv_pointers(k, v):
    """Data pointers of k and v (views of a cache are not contiguous buffers); callers keep k, v alive."""
    return ffi.cast("float *", address(k)), ffi.cast("float *", address(v))


def prepare_attention(q, k, v, causal=False, scale=None) -> CCall:  # [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    """Also takes k, v as head-strided views of a longer KV cache without copying them."""
    q, k, v, kv_stride, causal, scale = _attention_args(q, k, v, causal, scale)
    H, Lq, D = q.shape
    Hkv, Lk, _ = k.shape
    out = apart_empty(q.shape, q.dtype, like=q)
    bufs = [_fp(out), _fp(q), *_kv_pointers(k, v)] if q.size else [ffi.NULL] * 4
    return _prepared("rf_attention_thunk", "rf_attention_args",
                     dict(out=bufs[0], q=bufs[1], k=bufs[2], v=bufs[3], H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D,
                          kv_stride=kv_stride, scale=scale, causal=int(causal), status=0),
                     out, [q, k, v, *bufs], status=True)


@register("attention", "c")
def attention(q, k, v, causal=False, scale=None):  # [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    """Flash-style attention (online softmax over 64-key tiles, 48-row query blocks, GQA in place);
    blocks of <= 8 rows per kv head (decode) take a dot-product path with a two-pass softmax."""
    q, k, v, kv_stride, causal, scale = _attention_args(q, k, v, causal, scale)
    out = apart_empty(q.shape, q.dtype, like=q)
    if q.size and lib.rf_attention_f32_strided(_fp(out), _fp(q), *_kv_pointers(k, v), q.shape[0], k.shape[0],
                                               q.shape[1], k.shape[1], q.shape[2], kv_stride, scale,
                                               int(causal)):
        raise MemoryError("rf_attention_f32: could not allocate its scratch buffers")
    return out


attention.prepare = prepare_attention


# --------------------------------------------------------------------------
# layer_norm, rms_norm
# --------------------------------------------------------------------------


def _norm_args(op, x, w, eps, *b):  # -> x, w, eps, then b if given (layer_norm)
    x, w, *b = check_norm_args(op, _f32("x", x), _f32("w", w), *(_f32("b", a) for a in b))
    return (x, w, check_finite("eps", eps, np.float32, nonneg=True), *b)


def prepare_layer_norm(x, w, b, eps=1e-5) -> CCall:  # [...,D],[D],[D] -> [...,D]
    x, w, eps, b = _norm_args("layer_norm", x, w, eps, b)
    out = apart_empty(x.shape, x.dtype, like=x)
    bufs = [_fp(a) for a in (out, x, w, b)] if x.size else [ffi.NULL] * 4
    T, D = _rows(x)
    return _prepared("rf_layer_norm_thunk", "rf_norm_args",
                     dict(out=bufs[0], x=bufs[1], w=bufs[2], b=bufs[3], T=T, D=D, eps=eps), out, [x, w, b, *bufs])


@register("layer_norm", "c")
def layer_norm(x, w, b, eps=1e-5):  # [...,D],[D],[D] -> [...,D]
    """LayerNorm over rows: (x - mean) / sqrt(var + eps) * w + b."""
    x, w, eps, b = _norm_args("layer_norm", x, w, eps, b)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        lib.rf_layer_norm_f32(_fp(out), _fp(x), _fp(w), _fp(b), *_rows(x), eps)
    return out


layer_norm.prepare = prepare_layer_norm


def prepare_rms_norm(x, w, eps=1e-6) -> CCall:  # [...,D],[D] -> [...,D]
    x, w, eps = _norm_args("rms_norm", x, w, eps)
    out = apart_empty(x.shape, x.dtype, like=x)
    bufs = [_fp(a) for a in (out, x, w)] if x.size else [ffi.NULL] * 3
    T, D = _rows(x)
    return _prepared("rf_rms_norm_thunk", "rf_norm_args",
                     dict(out=bufs[0], x=bufs[1], w=bufs[2], b=ffi.NULL, T=T, D=D, eps=eps), out, [x, w, *bufs])


@register("rms_norm", "c")
def rms_norm(x, w, eps=1e-6):  # [...,D],[D] -> [...,D]
    """RMSNorm over rows: x / sqrt(mean(x^2) + eps) * w."""
    x, w, eps = _norm_args("rms_norm", x, w, eps)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        lib.rf_rms_norm_f32(_fp(out), _fp(x), _fp(w), *_rows(x), eps)
    return out


rms_norm.prepare = prepare_rms_norm


# --------------------------------------------------------------------------
# gelu_tanh, silu (any shape)
# --------------------------------------------------------------------------


def _prepare_act(thunk: str, x) -> CCall:
    x = _f32("x", x)
    out = apart_empty(x.shape, x.dtype, like=x)
    bufs = [_fp(out), _fp(x)] if x.size else [ffi.NULL, ffi.NULL]
    return _prepared(thunk, "rf_act_args", dict(out=bufs[0], x=bufs[1], N=x.size), out, [x, *bufs])


def prepare_gelu_tanh(x) -> CCall:  # [...] -> [...]
    return _prepare_act("rf_gelu_tanh_thunk", x)


def prepare_silu(x) -> CCall:  # [...] -> [...]
    return _prepare_act("rf_silu_thunk", x)


def _act(fn, x):
    x = _f32("x", x)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        fn(_fp(out), _fp(x), x.size)
    return out


@register("gelu_tanh", "c")
def gelu_tanh(x):  # [...] -> [...]
    """GELU, tanh approximation, computed as x sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))."""
    return _act(lib.rf_gelu_tanh_f32, x)


@register("silu", "c")
def silu(x):  # [...] -> [...]
    """SiLU: x sigmoid(x)."""
    return _act(lib.rf_silu_f32, x)


gelu_tanh.prepare = prepare_gelu_tanh
silu.prepare = prepare_silu


# --------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------


def _rope_args(x, positions, theta, interleaved):  # -> x [...,T,D], positions [T] int64, theta, interleaved
    x, p = check_rope_args(_f32("x", x), positions)
    return x, p, check_finite("theta", theta, positive=True), check_flag("interleaved", interleaved)


def _heads(x) -> tuple[int, int, int]:
    """(H, T, D) of x [..., T, D] read as H = prod(...) heads of [T, D]."""
    T, D = x.shape[-2:]
    return (x.size // (T * D) if x.size else 0), T, D


def prepare_rope(x, positions, theta=10000.0, interleaved=False) -> CCall:  # [...,T,D],[T] -> [...,T,D]
    x, p, theta, interleaved = _rope_args(x, positions, theta, interleaved)
    H, T, D = _heads(x)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size:
        bufs = [_fp(out), _fp(x), ffi.from_buffer("int64_t[]", p)]
    else:
        bufs = [ffi.NULL] * 3
    return _prepared("rf_rope_thunk", "rf_rope_args",
                     dict(out=bufs[0], x=bufs[1], positions=bufs[2], H=H, T=T, D=D, theta=theta,
                          interleaved=int(interleaved), status=0),
                     out, [x, p, *bufs], status=True)


@register("rope", "c")
def rope(x, positions, theta=10000.0, interleaved=False):  # [...,T,D],[T] -> [...,T,D]
    """Rotary embedding, half-split (HF) or interleaved pairs (llama2.c); angles in double."""
    x, p, theta, interleaved = _rope_args(x, positions, theta, interleaved)
    out = apart_empty(x.shape, x.dtype, like=x)
    if x.size and lib.rf_rope_f32(_fp(out), _fp(x), ffi.from_buffer("int64_t[]", p), *_heads(x), theta,
                                  int(interleaved)):
        raise MemoryError("rf_rope_f32: could not allocate its angle table")
    return out


rope.prepare = prepare_rope
