"""The "numpy" backend: the oracle's own functions under the kernel contract.

The flags and scalars are checked as the other backends check them (contracts.check_flag,
check_finite), so every backend accepts the same calls; the arrays go to the oracle as given."""
from __future__ import annotations

import numpy as np

from refimpl.kernels.contracts import check_attention_args, check_finite, check_flag
from refimpl.kernels.registry import register
from refimpl.oracle import layers as L


@register("matmul", "numpy")
def matmul(a, b):  # [M,K] @ [K,N] -> [M,N]
    return a @ b


@register("softmax", "numpy")
def softmax(x):  # [R,N] -> [R,N], over the last axis
    return L.softmax(x, axis=-1)


@register("attention", "numpy")
def attention(q, k, v, causal=False, scale=None):  # [H,Lq,D],[Hkv,Lk,D],[Hkv,Lk,D] -> [H,Lq,D]
    causal = check_flag("causal", causal)
    check_attention_args(q, k, v, causal)
    if scale is not None:
        scale = check_finite("scale", scale, _dtype(q))
    mask = L.causal_mask(q.shape[1], k.shape[1]) if causal else None
    return L.multi_head_attention(q, k, v, mask, scale)


def _dtype(x):
    """The dtype the oracle computes `x` in (its scalars are cast to it)."""
    return getattr(x, "dtype", np.float64)


@register("layer_norm", "numpy")
def layer_norm(x, w, b, eps=1e-5):
    return L.layer_norm(x, w, b, check_finite("eps", eps, _dtype(x), nonneg=True))


@register("rms_norm", "numpy")
def rms_norm(x, w, eps=1e-6):
    return L.rms_norm(x, w, check_finite("eps", eps, _dtype(x), nonneg=True))


@register("gelu_tanh", "numpy")
def gelu_tanh(x):
    return L.gelu_tanh(x)


@register("silu", "numpy")
def silu(x):
    return L.silu(x)


@register("rope", "numpy")
def rope(x, positions, theta=10000.0, interleaved=False):  # [H,T,D], [T] -> [H,T,D]
    return L.rope(x, np.asarray(positions), check_finite("theta", theta, positive=True),
                  check_flag("interleaved", interleaved))
