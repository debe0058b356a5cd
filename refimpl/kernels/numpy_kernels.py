"""The "numpy" backend: the oracle's own functions under the kernel contract.

Arguments are checked by the same rules as the other backends' (contracts.check_*: dtype
float32 or float64, one dtype per call, the op's shapes, flags and scalars), so every
backend accepts and refuses the same calls; the checked arrays go to the oracle.
"""
from __future__ import annotations

import numpy as np

from refimpl.kernels.contracts import (check_array, check_attention_args, check_finite, check_flag,
                                      check_matmul_args, check_norm_args, check_rope_args, check_rows_args)
from refimpl.kernels.registry import register
from refimpl.oracle import layers as L


@register("matmul", "numpy")
def matmul(a, b):  # [M,K] @ [K,N] -> [M,N]
    a, b = check_matmul_args(a, b)
    return a @ b


@register("softmax", "numpy")
def softmax(x):  # [..., N] -> [..., N], over the last axis
    x = check_rows_args("softmax", x)
    return L.softmax(x, axis=-1) if x.size else x.copy()    # rows of no entries: nothing to normalise


@register("attention", "numpy")
def attention(q, k, v, causal=False, scale=None):  # [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    causal = check_flag("causal", causal)
    q, k, v = check_attention_args(q, k, v, causal)
    if scale is not None:
        scale = check_finite("scale", scale, q.dtype)
    if q.size == 0:                                      # H = 0 or Lq = 0: no query, nothing to attend
        return np.zeros(q.shape, q.dtype)
    mask = L.causal_mask(q.shape[1], k.shape[1]) if causal else None
    return L.multi_head_attention(q, k, v, mask, scale)


@register("layer_norm", "numpy")
def layer_norm(x, w, b, eps=1e-5):  # [..., D], [D], [D] -> [..., D]
    x, w, b = check_norm_args("layer_norm", x, w, b)
    return L.layer_norm(x, w, b, check_finite("eps", eps, x.dtype, nonneg=True))


@register("rms_norm", "numpy")
def rms_norm(x, w, eps=1e-6):  # [..., D], [D] -> [..., D]
    x, w = check_norm_args("rms_norm", x, w)
    return L.rms_norm(x, w, check_finite("eps", eps, x.dtype, nonneg=True))


@register("gelu_tanh", "numpy")
def gelu_tanh(x):  # [...] -> [...]
    return L.gelu_tanh(check_array("x", x))


@register("silu", "numpy")
def silu(x):  # [...] -> [...]
    return L.silu(check_array("x", x))


@register("rope", "numpy")
def rope(x, positions, theta=10000.0, interleaved=False):  # [..., T, D], [T] -> [..., T, D]
    x, positions = check_rope_args(x, positions)
    return L.rope(x, positions, check_finite("theta", theta, positive=True),
                  check_flag("interleaved", interleaved))
