"""The oracle's layers: one function per equation, pure NumPy.

Dimension letters used in this module (and only these):
    T  = number of query positions (tokens in this call)
    S  = number of key/value positions (T plus the KV cache)
    D  = model width (d_model)
    H  = query heads,  Hkv = key/value heads (GQA/MQA when Hkv < H)
    Dh = head width (D // H)
    F  = feed-forward hidden width
    V  = vocabulary size
    P  = rows of a learned position table (the context limit, max_seq_len)
    Dv = value width in `attention` (Dh in a Transformer; kept apart: q.k and p.v are separate sums)
    In, Out = a linear map's input and output widths
    n  = heads in `split_heads` / `merge_heads` (H or Hkv)
    ... = any leading dimensions (elementwise functions keep their input's shape)

Every function is dtype-generic: it computes in the dtype of its inputs
(float64 for the oracle's truth, float32 to mimic a float32 port); integer
inputs are computed in float64 (`as_floating`), never in integers.  Nothing
here calls BLAS in a way that changes the math: `@` is the only matmul.
"""
from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------
# input encoding
# --------------------------------------------------------------------------


def as_floating(x):  # [...] -> [...]
    """x as an array: floats keep their dtype, integers and bools become float64."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def host_array(x):  # [...] -> [...]
    """x as a NumPy array.  A torch tensor (on any device, requiring grad, or bfloat16, which
    NumPy lacks and float32 holds exactly) is detached and brought to the host first."""
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu()
        return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    return np.asarray(x)


def embedding(wte, ids):  # [V,D], [T] int -> [T,D]
    """Token embedding: row `ids[t]` of the table."""
    return wte[ids]


def sinusoidal_positions(T, D, base=10000.0, dtype=np.float64, offset=0):  # -> [T,D]
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / base^(2i/D)), PE[p, 2i+1] = cos(same)."""
    p = np.arange(offset, offset + T, dtype=np.float64)[:, None]         # [T,1]
    i2 = np.arange(0, D, 2, dtype=np.float64)[None, :]                    # [1,ceil(D/2)]
    angle = p / base ** (i2 / D)                                          # [T,ceil(D/2)]
    pe = np.zeros((T, D), dtype=np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle[:, : D // 2])
    return pe.astype(dtype)


def learned_positions(wpe, positions):  # [P,D], [T] int -> [T,D]
    """Learned absolute positions (GPT-2 `wpe`, BERT `position_embeddings`)."""
    return wpe[positions]


def rope_angles(positions, Dh, theta=10000.0):  # [T] int -> [T,Dh/2] float64
    """RoPE angle of pair i at position p: p * theta^(-2i/Dh)."""
    if Dh % 2:
        raise ValueError(f"rope: head width Dh={Dh} must be even (RoPE rotates pairs of entries)")
    inv_freq = theta ** (-np.arange(0, Dh, 2, dtype=np.float64) / Dh)     # [Dh/2]
    return np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]


def rope_half(x, positions, theta=10000.0):  # [..., T, Dh], [T] -> [..., T, Dh]
    """RoPE, half-split convention (HF Llama): pair i is (x[i], x[i + Dh/2])."""
    x = as_floating(x)
    Dh = x.shape[-1]
    a = rope_angles(positions, Dh, theta)
    cos, sin = np.cos(a).astype(x.dtype), np.sin(a).astype(x.dtype)       # [T,Dh/2]
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_interleaved(x, positions, theta=10000.0):  # [..., T, Dh], [T] -> [..., T, Dh]
    """RoPE, interleaved convention (llama2.c, Meta's original): pair i is (x[2i], x[2i+1])."""
    x = as_floating(x)
    Dh = x.shape[-1]
    a = rope_angles(positions, Dh, theta)
    cos, sin = np.cos(a).astype(x.dtype), np.sin(a).astype(x.dtype)       # [T,Dh/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


def rope(x, positions, theta=10000.0, interleaved=False):  # [..., T, Dh] -> [..., T, Dh]
    """Rotary position embedding in the named convention."""
    return (rope_interleaved if interleaved else rope_half)(x, positions, theta)


# --------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------


def layer_norm(x, w, b, eps=1e-5):  # [..., D], [D], [D] -> [..., D]
    """LayerNorm, eps inside the square root (as torch/HF): (x - mean) / sqrt(var + eps) * w + b."""
    x = as_floating(x)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)                  # biased variance
    return (x - mean) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps=1e-6):  # [..., D], [D] -> [..., D]
    """RMSNorm (Llama): x / sqrt(mean(x^2) + eps) * w."""
    x = as_floating(x)
    ms = (x * x).mean(axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * w


# --------------------------------------------------------------------------
# linear maps and activations
# --------------------------------------------------------------------------


def linear(x, w, b=None):  # [..., In], [Out,In], [Out] -> [..., Out]
    """y = x W^T + b, with W stored (out, in) as torch.nn.Linear stores it.

    GPT-2's Conv1D stores (in, out); its model passes `w.T`.
    """
    y = as_floating(x) @ as_floating(w).T
    return y if b is None else y + b


def relu(x):  # [...] -> [...]
    """max(x, 0)."""
    return np.maximum(as_floating(x), 0)


def gelu_tanh(x):  # [...] -> [...]
    """GELU, tanh approximation (GPT-2 `gelu_new`): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    x = as_floating(x)
    c = x.dtype.type(math.sqrt(2.0 / math.pi))
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * (x * x * x))))


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x):  # [...] -> [...]
    """GELU, exact form (BERT `gelu`): 0.5 x (1 + erf(x / sqrt(2))); erf from the C library."""
    x = as_floating(x)
    e = _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)).astype(np.float64)
    return (0.5 * x * (1.0 + e.astype(x.dtype))).astype(x.dtype)


def silu(x):  # [...] -> [...]
    """SiLU / swish: x * sigmoid(x) = x / (1 + exp(-x))."""
    return x / (1.0 + np.exp(-x))


def swiglu(gate, up):  # [..., F], [..., F] -> [..., F]
    """SwiGLU gating (Llama FFN): silu(gate) * up."""
    return silu(gate) * up


ACTIVATIONS = {"relu": relu, "gelu_tanh": gelu_tanh, "gelu_erf": gelu_erf, "silu": silu}


# --------------------------------------------------------------------------
# softmax and masks
# --------------------------------------------------------------------------


def softmax(x, axis=-1):  # [..., N] -> [..., N]
    """Numerically stable softmax: exp(x - max x) / sum exp(x - max x).

    Masked entries (-inf) get probability exactly 0.  A fully masked row
    (all -inf) is defined as all zeros, not NaN: it attends to nothing.
    NaN anywhere in a row makes that whole row NaN.
    """
    m = x.max(axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0, m)                # fully masked row: keep exp(-inf) = 0
    with np.errstate(over="ignore"):                   # x - m may round to -inf: exp gives 0, as it should
        e = np.exp(x - m)
    s = e.sum(axis=axis, keepdims=True)
    return e / np.where(s == 0, 1, s)


def causal_mask(T, S):  # -> [T,S] bool, True where query t may see key s
    """Causal mask with T <= S queries at the end of S keys: query t sees keys 0..S-T+t."""
    if not 0 <= T <= S:
        raise ValueError(f"causal_mask: T={T} queries must be 0..S={S} keys (the queries are the last T keys)")
    return np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]


def padding_mask(attention_mask, T):  # [S] of 0/1 -> [T,S] bool
    """Key padding mask: every query may see exactly the keys whose attention_mask is 1."""
    keep = np.asarray(attention_mask).astype(bool)
    return np.broadcast_to(keep[None, :], (T, keep.shape[0]))


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def keep_mask(mask, shape):  # [T,S] bool (or broadcastable), (..., T, S) -> the mask
    """`mask` checked as a keep-mask: bool, True where query t may see key s, broadcastable to
    the scores' `shape`.  An additive float mask (0 = keep, -inf or -1e10 = drop, as some ports
    use) would read the other way round as a truth value, so only bool is taken."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a bool array, True where a query may see a key, got dtype {mask.dtype} "
                        "(an additive mask m of 0 / -inf is the keep-mask m == 0)")
    try:
        fits = np.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:                                      # a larger mask would broadcast the scores up
        raise ValueError(f"mask of shape {mask.shape} does not fit the scores' shape {tuple(shape)} [T,S]")
    return mask


def attention_probs(q, k, mask=None, scale=None):  # [T,Dh],[S,Dh],[T,S] -> [T,S]
    """P = softmax(q k^T * scale, masked), scale = 1/sqrt(Dh) by default (also traced and taught)."""
    q, k = as_floating(q), as_floating(k)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)                # [T,S]
    if mask is not None:
        scores = np.where(keep_mask(mask, scores.shape), scores, -np.inf)  # masked -> prob 0
    return softmax(scores, axis=-1)


def attention(q, k, v, mask=None, scale=None):  # [T,Dh],[S,Dh],[S,Dv],[T,S] -> [T,Dv]
    """Scaled dot-product attention: P v with P = attention_probs(q, k, mask, scale)."""
    return attention_probs(q, k, mask, scale) @ v


def kv_head_of(h, H, Hkv):
    """GQA/MQA grouping: query head h reads key/value head h // (H / Hkv)."""
    return h // (H // Hkv)


def multi_head_attention_probs(q, k, mask=None, scale=None):  # [H,T,Dh],[Hkv,S,Dh],[T,S] -> [H,T,S]
    """P_h = attention_probs(q_h, k_g, ...) for every query head h, g = kv_head_of(h, H, Hkv):
    with Hkv < H each key/value head serves H/Hkv query heads."""
    H, Hkv = q.shape[0], k.shape[0]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    return np.stack([attention_probs(q[h], k[kv_head_of(h, H, Hkv)], mask, scale) for h in range(H)])


def heads_times_values(p, v):  # [H,T,S],[Hkv,S,Dh] -> [H,T,Dh]
    """O_h = P_h v_g, g = kv_head_of(h, H, Hkv)."""
    H, Hkv = p.shape[0], v.shape[0]
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    return np.stack([p[h] @ v[kv_head_of(h, H, Hkv)] for h in range(H)])


def multi_head_attention(q, k, v, mask=None, scale=None):  # [H,T,Dh],[Hkv,S,Dh],[Hkv,S,Dh],[T,S] -> [H,T,Dh]
    """Attention per head (`attention` on each query head and its key/value head)."""
    return heads_times_values(multi_head_attention_probs(q, k, mask, scale), v)


def split_heads(x, n_heads):  # [T, n*Dh] -> [n,T,Dh], n = n_heads
    """Reshape a projection into heads."""
    T, width = x.shape
    return x.reshape(T, n_heads, width // n_heads).transpose(1, 0, 2)


def merge_heads(x):  # [n,T,Dh] -> [T, n*Dh]
    """Concatenate heads back into one row per token."""
    n, T, Dh = x.shape
    return x.transpose(1, 0, 2).reshape(T, n * Dh)
