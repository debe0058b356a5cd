"""The "numpy" backend: the oracle's own functions under the kernel contract."""
from __future__ import annotations

import numpy as np

from refimpl.kernels.contracts import check_attention_args
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
    check_attention_args(q, k, v, causal)
    mask = L.causal_mask(q.shape[1], k.shape[1]) if causal else None
    return L.multi_head_attention(q, k, v, mask, scale)


@register("layer_norm", "numpy")
def layer_norm(x, w, b, eps=1e-5):
    return L.layer_norm(x, w, b, eps)


@register("rms_norm", "numpy")
def rms_norm(x, w, eps=1e-6):
    return L.rms_norm(x, w, eps)


@register("gelu_tanh", "numpy")
def gelu_tanh(x):
    return L.gelu_tanh(x)


@register("silu", "numpy")
def silu(x):
    return L.silu(x)


@register("rope", "numpy")
def rope(x, positions, theta=10000.0, interleaved=False):  # [H,T,D], [T] -> [H,T,D]
    return L.rope(x, np.asarray(positions), theta, interleaved)
