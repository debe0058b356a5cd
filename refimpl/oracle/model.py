"""The oracle's models: GPT-2, Llama, BERT and the classic (Vaswani) decoder.

Dimension letters: T (tokens in this call), S (tokens in the KV cache after
this call), D, H, Hkv, Dh, F, V as in refimpl.oracle.layers.

Each architecture's forward pass is written out once, as the equations of its
paper/checkpoint, over `self.ops` (the kernels of the chosen backend: the
oracle's own NumPy functions for backend="numpy", C or Numba kernels
otherwise).  Parameters keep their checkpoint keys (see config.expected_shapes).

Trace points: `trace(name, array)` is called right after each named
intermediate, in forward order:
    embed,
    layers.{i}.attn_norm, layers.{i}.q, layers.{i}.k, layers.{i}.v  (after RoPE: [H|Hkv, T, Dh]),
    layers.{i}.attn_probs [H, T, S] (numpy backend only), layers.{i}.attn_out [T, D],
    layers.{i}.resid_attn, layers.{i}.ffn_norm, layers.{i}.ffn_hidden [T, F],
    layers.{i}.ffn_out, layers.{i}.resid_ffn,
    final_norm, logits
For post-norm models (BERT, classic) `attn_norm` is the block input and
`ffn_norm` the normalised residual after attention; `resid_*` are the
normalised residual streams.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import time
from dataclasses import dataclass, field
from types import MappingProxyType, SimpleNamespace
from typing import Callable, Iterable

import numpy as np

from refimpl.oracle import layers as L
from refimpl.oracle.config import Config, expected_shapes
from refimpl.oracle.sampling import XorShift64Star, check_top, random_seed, sample

DTYPES = {"float32": np.float32, "float64": np.float64}
Trace = Callable[[str, np.ndarray], None]


def _no_trace(name, x):
    pass


# --------------------------------------------------------------------------
# the KV cache
# --------------------------------------------------------------------------


def _physical_memory() -> int | None:
    """Bytes of RAM on this machine (None if the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _read_only(a: np.ndarray) -> np.ndarray:
    """A view of `a` that cannot be written through (`a` itself keeps its flags)."""
    v = a.view()
    v.flags.writeable = False
    return v


class KVCache:
    """Keys and values of up to `capacity` positions (default: max_seq_len), per layer: [Hkv, capacity, Dh].

    A cache larger than this machine's memory, or one NumPy cannot allocate, raises
    MemoryError naming its size (a checkpoint may declare a context of 10^9 positions)."""

    def __init__(self, cfg: Config, dtype, capacity: int | None = None):
        cap = cfg.max_seq_len if capacity is None else int(capacity)
        if not 1 <= cap <= cfg.max_seq_len:
            raise ValueError(f"KV cache capacity must be 1..max_seq_len = {cfg.max_seq_len}, got {capacity}")
        shape = (cfg.n_kv_heads, cap, cfg.head_dim)
        nbytes = 2 * cfg.n_layers * math.prod(shape) * np.dtype(dtype).itemsize
        what = (f"a KV cache of {cap} positions (2 x {cfg.n_layers} layers x {shape} {np.dtype(dtype).name}) "
                f"needs {nbytes / 2 ** 30:.3g} GiB")
        ram = _physical_memory()
        if ram and nbytes > ram:
            raise MemoryError(f"{what}, more than this machine's {ram / 2 ** 30:.3g} GiB of memory "
                              f"(max_seq_len = {cfg.max_seq_len}; ask for fewer positions)")
        try:
            self.k = [np.zeros(shape, dtype) for _ in range(cfg.n_layers)]
            self.v = [np.zeros(shape, dtype) for _ in range(cfg.n_layers)]
        except (MemoryError, ValueError) as e:
            raise MemoryError(f"{what} and cannot be allocated ({e})") from None
        self.capacity = cap
        self.length = 0                                   # positions filled so far

    def append(self, layer, k, v):  # [Hkv,T,Dh] x2 -> keys, values [Hkv,S,Dh]
        """Store this call's k, v after the cached ones and return all of them."""
        T = k.shape[1]
        s0 = self.length
        self.k[layer][:, s0:s0 + T] = k
        self.v[layer][:, s0:s0 + T] = v
        return self.k[layer][:, : s0 + T], self.v[layer][:, : s0 + T]


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------


def _kernel_ops(backend: str) -> SimpleNamespace:
    """The kernels the forward pass calls, for one backend."""
    if backend == "numpy":
        # the oracle itself: plain NumPy, the equations as written in layers.py
        return SimpleNamespace(
            matmul=lambda a, b: a @ b,
            attention=None,                 # the oracle path computes probabilities explicitly
            layer_norm=L.layer_norm, rms_norm=L.rms_norm,
            gelu_tanh=L.gelu_tanh, silu=L.silu,
            rope=lambda x, pos, theta, interleaved: L.rope(x, pos, theta, interleaved),
            sample=sample)
    from refimpl import kernels
    ops = SimpleNamespace(**{op: kernels.get(op, backend) for op in
                             ("matmul", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu", "rope")})
    ops.sample = sample
    if backend == "c":
        # the same rule in C: the oracle's np.lexsort of the V ids takes ~3 ms at V = 32000
        from refimpl.kernels.c_sample import sample as c_sample
        ops.sample = c_sample
    if "stream" in inspect.signature(ops.matmul).parameters:
        # a decode step reads every weight from memory once: let the kernel prefetch ahead
        ops.matmul = functools.partial(ops.matmul, stream=True)
    return ops


@dataclass
class Generation:
    """What `Model.generate` returns."""
    tokens: list[int]                          # the new token ids (prompt excluded)
    logits: list[np.ndarray] = field(default_factory=list)  # [V] per new token (when asked)
    stopped: str = "max_new_tokens"            # "max_new_tokens" | "stop" | "context"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        n = max(len(self.tokens) - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class Model:
    """A Transformer with its weights, runnable on any kernel backend.

    Model(config, params, dtype="float64", backend="numpy")
      params: {checkpoint key: array} exactly as config.expected_shapes(config) lists; kept
              as `model.params`, read-only (another weight: build another Model).
      dtype:  the dtype every weight and activation is computed in.
      backend: "numpy" (the oracle), "c" or "numba" (fast kernels, float32).
    """

    def __init__(self, config: Config, params: dict, dtype="float64", backend="numpy"):
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        if backend not in ("numpy", "numba", "c"):
            raise ValueError(f"backend must be 'numpy' (the oracle), 'numba' or 'c', got {backend!r}")
        if backend != "numpy" and self.dtype != np.float32:
            raise ValueError(f"backend {backend!r} runs float32 models; got dtype {self.dtype} "
                             "(use backend='numpy' for the float64 oracle)")
        self.config = config
        self.backend = backend
        check_params(config, params)
        # fixed from here on (our own copies, read-only, in a read-only mapping: the caller's arrays
        # can change without reaching the model): the (in, out) copies below and the C decode
        # step's packed pointers are made from them once; for other weights, a new Model
        self.params = MappingProxyType({k: _read_only(np.array(L.host_array(v), dtype=self.dtype, order="C"))
                                        for k, v in params.items()})
        self.ops = _kernel_ops(backend)
        self._w_io = {}                                  # linear weights as contiguous (in, out)
        self._cuts = {}                                  # column ranges of concatenated weights
        # Llama and GPT-2 on the C backend decode a token in one C call (refimpl.kernels.c_decode:
        # the same kernels in the same order as _llama / _gpt2, without ~15 Python-level calls a
        # layer); set False to run the Python composition instead
        self.fused_decode = backend == "c" and config.arch in ("llama", "gpt2")
        self._decode_step = None

    def fused_step(self):
        """The C decode step a one-token forward runs through when `fused_decode` (made on first use)."""
        if self._decode_step is None:
            from refimpl.kernels.c_decode import decode_step
            self._decode_step = decode_step(self)
        return self._decode_step

    # -- small helpers: each is one line of math ----------------------------
    def p(self, name):
        return self.params[name]

    def _w(self, name, layout):
        """Weight `name` as a contiguous (in, out) matrix; layout "out_in" (Linear) or "in_out" (Conv1D)."""
        w = self._w_io.get(name)
        if w is None:
            w = self.params[name]
            w = np.ascontiguousarray(w.T) if layout == "out_in" else w
            self._w_io[name] = w
        return w

    def linear(self, x, name, bias=None, layout="out_in"):  # [T,In] -> [T,Out]
        """y = x W + b, W as (in, out)."""
        y = self.ops.matmul(np.ascontiguousarray(x), self._w(name, layout))
        return y if bias is None else y + self.p(bias)

    def concat_weight(self, names):  # -> [In, Out_1 + ... + Out_n]
        """[W_1 | ... | W_n] as one contiguous (in, out) matrix, for Linear weights (out, in) of one input."""
        key = tuple(names)
        if key not in self._w_io:
            self._w_io[key] = np.ascontiguousarray(np.concatenate([self.params[n].T for n in names], axis=1))
            ends = np.cumsum([self.params[n].shape[0] for n in names])
            self._cuts[key] = list(zip([0, *ends[:-1]], ends))
        return self._w_io[key]

    def linears(self, x, names):  # [T,In] -> [T,Out_1], ..., [T,Out_n]
        """Several maps of the same input, y_i = x W_i, as one product x [W_1 | ... | W_n] (one pass over x)."""
        y = self.ops.matmul(np.ascontiguousarray(x), self.concat_weight(names))
        return [y[:, a:b] for a, b in self._cuts[tuple(names)]]

    def norm(self, x, prefix):  # [T,D] -> [T,D]
        c = self.config
        if c.norm == "rmsnorm":
            return self.ops.rms_norm(x, self.p(prefix + ".weight"), c.norm_eps)
        return self.ops.layer_norm(x, self.p(prefix + ".weight"), self.p(prefix + ".bias"), c.norm_eps)

    def attend(self, q, k, v, mask_kind, attention_mask, name, trace):  # [H,T,Dh],[Hkv,S,Dh]x2 -> [T,H*Dh]
        """Multi-head attention: softmax(q k^T / sqrt(Dh) + mask) v, heads merged."""
        T, Dh = q.shape[1:]
        S = k.shape[1]
        scale = 1.0 / math.sqrt(Dh)
        if self.ops.attention is not None and attention_mask is None:
            o = self.ops.attention(q, k, v, causal=(mask_kind == "causal"), scale=scale)
            return L.merge_heads(o)
        mask = L.causal_mask(T, S) if mask_kind == "causal" else np.ones((T, S), bool)
        if attention_mask is not None:
            mask = mask & L.padding_mask(attention_mask, T)
        probs = L.multi_head_attention_probs(q, k, mask, scale)            # [H,T,S]
        trace(name + ".attn_probs", probs)
        return L.merge_heads(L.heads_times_values(probs, v))              # [H,T,Dh] -> [T,H*Dh]

    # -- input checks -------------------------------------------------------
    def _check_ids(self, ids, cache, what="ids"):
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] == 0:
            raise ValueError(f"{what} must be a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":                  # np.issubdtype(., np.integer), 1 us cheaper
            raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
        V = self.config.vocab_size
        if ids.shape[0] == 1:                            # a decode step: Python compares cost 1/5 of the mask's
            bad = None if 0 <= int(ids[0]) < V else 0
        else:
            mask = (ids < 0) | (ids >= V)
            bad = int(np.argmax(mask)) if mask.any() else None
        if bad is not None:
            raise ValueError(f"{what}[{bad}] = {int(ids[bad])} is out of range: vocab_size is {V} (ids 0..{V - 1})")
        start = cache.length if cache is not None else 0
        if start + ids.shape[0] > self.config.max_seq_len:
            raise ValueError(f"{what}: {start} cached + {ids.shape[0]} new tokens exceed the context limit "
                             f"max_seq_len = {self.config.max_seq_len}")
        if cache is not None and start + ids.shape[0] > cache.capacity:
            raise ValueError(f"{what}: {start} cached + {ids.shape[0]} new tokens exceed the KV cache's "
                             f"capacity of {cache.capacity} positions")
        return ids.astype(np.int64)

    def _check_cache(self, cache):
        """A KVCache made for this model's shapes and dtype (model.new_cache())."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (model.new_cache()), got {type(cache).__name__}"
                            + ("; a trace callback goes by keyword: trace=..." if callable(cache) else ""))
        c = self.config
        want = (c.n_layers, (c.n_kv_heads, cache.capacity, c.head_dim), self.dtype)
        got = (len(cache.k), cache.k[0].shape if cache.k else None, cache.k[0].dtype if cache.k else None)
        if got != want:
            raise ValueError(f"cache holds {got[0]} layers of {got[1]} {got[2]}; this model needs {want[0]} "
                             f"layers of {want[1]} {want[2]} (model.new_cache())")

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache for `capacity` positions (default and at most max_seq_len)."""
        return KVCache(self.config, self.dtype, capacity)

    # -- forward ------------------------------------------------------------
    def forward(self, ids, cache: KVCache | None = None, trace: Trace | None = None,
                token_type_ids=None, attention_mask=None):
        """ids [T] -> logits [T,V] (decoders) or last hidden state [T,D] (BERT).

        With a cache, the T new tokens follow the cache.length cached ones and
        the cache is extended.  BERT takes token_type_ids [T] and
        attention_mask [T] (1 = real token, 0 = padding).
        """
        if cache is not None:
            self._check_cache(cache)
        if trace is not None and not callable(trace):
            raise TypeError(f"trace must be a callable (name, array), got {type(trace).__name__}")
        ids = self._check_ids(ids, cache)
        trace = _no_trace if trace is None else trace
        arch = self.config.arch
        if arch == "bert":
            if cache is not None:
                raise ValueError("BERT is an encoder: it has no KV cache")
            return self._bert(ids, token_type_ids, attention_mask, trace)
        if attention_mask is not None or token_type_ids is not None:
            raise ValueError(f"attention_mask/token_type_ids are BERT inputs; {arch} is a causal decoder")
        start = cache.length if cache is not None else 0
        if self.fused_decode and cache is not None and ids.shape[0] == 1 and trace is _no_trace:
            logits = self.fused_step()(ids[0], cache)
            cache.length += 1
            return logits
        out = {"gpt2": self._gpt2, "llama": self._llama, "classic": self._classic}[arch](ids, start, cache, trace)
        if cache is not None:
            cache.length += ids.shape[0]
        return out

    __call__ = forward

    def _lm_head(self, x, table_key, trace):  # [T,D] -> [T,V]
        """Logits = x E^T (tied) or x W_lm^T (untied)."""
        key = table_key if self.config.tie_embeddings else "lm_head.weight"
        logits = self.linear(x, key)
        trace("logits", logits)
        return logits

    def _causal_self_attention(self, a, i, cache, trace):  # [T,D] -> [T,D], GPT-2 names (Conv1D)
        """W_o Attn(q, k, v) with [q | k | v] = a W_attn + b_attn: block i of GPT-2 and the classic model."""
        h, n = f"h.{i}.", f"layers.{i}"
        qkv = self.linear(a, h + "attn.c_attn.weight", h + "attn.c_attn.bias", layout="in_out")
        q, k, v = (L.split_heads(t, self.config.n_heads) for t in np.split(qkv, 3, axis=-1))
        trace(n + ".q", q); trace(n + ".k", k); trace(n + ".v", v)
        if cache is not None:
            k, v = cache.append(i, k, v)
        o = self.attend(q, k, v, "causal", None, n, trace)
        o = self.linear(o, h + "attn.c_proj.weight", h + "attn.c_proj.bias", layout="in_out")
        trace(n + ".attn_out", o)
        return o

    def _gpt2(self, ids, start, cache, trace):
        c = self.config
        pos = np.arange(start, start + ids.shape[0])
        # x_0 = token embedding + learned position embedding
        x = L.embedding(self.p("wte.weight"), ids) + L.learned_positions(self.p("wpe.weight"), pos)
        trace("embed", x)
        for i in range(c.n_layers):
            h, n = f"h.{i}.", f"layers.{i}"
            # pre-norm attention: x = x + W_o Attn(LN_1(x))
            a = self.norm(x, h + "ln_1"); trace(n + ".attn_norm", a)
            o = self._causal_self_attention(a, i, cache, trace)
            x = x + o; trace(n + ".resid_attn", x)
            # pre-norm MLP: x = x + W_2 gelu_tanh(W_1 LN_2(x))
            m = self.norm(x, h + "ln_2"); trace(n + ".ffn_norm", m)
            f = self.ops.gelu_tanh(self.linear(m, h + "mlp.c_fc.weight", h + "mlp.c_fc.bias", layout="in_out"))
            trace(n + ".ffn_hidden", f)
            f = self.linear(f, h + "mlp.c_proj.weight", h + "mlp.c_proj.bias", layout="in_out")
            trace(n + ".ffn_out", f)
            x = x + f; trace(n + ".resid_ffn", x)
        x = self.norm(x, "ln_f"); trace("final_norm", x)
        return self._lm_head(x, "wte.weight", trace)

    def _llama(self, ids, start, cache, trace):
        c = self.config
        pos = np.arange(start, start + ids.shape[0])
        x = L.embedding(self.p("embed_tokens.weight"), ids)
        trace("embed", x)
        for i in range(c.n_layers):
            h, n = f"layers.{i}.", f"layers.{i}"
            # x = x + W_o Attn(RoPE(W_q a), RoPE(W_k a), W_v a),  a = RMSNorm(x)
            a = self.norm(x, h + "input_layernorm"); trace(n + ".attn_norm", a)
            q, k, v = self.linears(a, [h + f"self_attn.{w}_proj.weight" for w in "qkv"])
            q, k, v = L.split_heads(q, c.n_heads), L.split_heads(k, c.n_kv_heads), L.split_heads(v, c.n_kv_heads)
            q = self.ops.rope(np.ascontiguousarray(q), pos, c.rope_theta, c.rope_interleaved)
            k = self.ops.rope(np.ascontiguousarray(k), pos, c.rope_theta, c.rope_interleaved)
            trace(n + ".q", q); trace(n + ".k", k); trace(n + ".v", v)
            if cache is not None:
                k, v = cache.append(i, k, v)
            o = self.linear(self.attend(q, k, v, "causal", None, n, trace), h + "self_attn.o_proj.weight")
            trace(n + ".attn_out", o)
            x = x + o; trace(n + ".resid_attn", x)
            # x = x + W_down (silu(W_gate m) * W_up m),  m = RMSNorm(x)
            m = self.norm(x, h + "post_attention_layernorm"); trace(n + ".ffn_norm", m)
            gate, up = self.linears(m, [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"])
            f = self.ops.silu(gate) * up
            trace(n + ".ffn_hidden", f)
            f = self.linear(f, h + "mlp.down_proj.weight"); trace(n + ".ffn_out", f)
            x = x + f; trace(n + ".resid_ffn", x)
        x = self.norm(x, "norm"); trace("final_norm", x)
        return self._lm_head(x, "embed_tokens.weight", trace)

    def _classic(self, ids, start, cache, trace):
        c = self.config
        D = c.d_model
        # x_0 = sqrt(D) E[ids] + PE (Vaswani et al. 2017, sec. 3.4 and 3.5)
        x = L.embedding(self.p("wte.weight"), ids) * self.dtype.type(math.sqrt(D)) \
            + L.sinusoidal_positions(ids.shape[0], D, dtype=self.dtype, offset=start)
        trace("embed", x)
        for i in range(c.n_layers):
            h, n = f"h.{i}.", f"layers.{i}"
            trace(n + ".attn_norm", x)             # post-norm: the block input is not normalised
            o = self._causal_self_attention(x, i, cache, trace)
            # post-norm: x = LN_1(x + Attn(x))
            x = self.norm(x + o, h + "ln_1"); trace(n + ".resid_attn", x)
            trace(n + ".ffn_norm", x)
            # x = LN_2(x + W_2 relu(W_1 x + b_1) + b_2)
            f = L.relu(self.linear(x, h + "mlp.c_fc.weight", h + "mlp.c_fc.bias", layout="in_out"))
            trace(n + ".ffn_hidden", f)
            f = self.linear(f, h + "mlp.c_proj.weight", h + "mlp.c_proj.bias", layout="in_out")
            trace(n + ".ffn_out", f)
            x = self.norm(x + f, h + "ln_2"); trace(n + ".resid_ffn", x)
        trace("final_norm", x)
        return self._lm_head(x, "wte.weight", trace)

    def _bert(self, ids, token_type_ids, attention_mask, trace):
        c = self.config
        T = ids.shape[0]
        if token_type_ids is not None and not np.issubdtype(np.asarray(token_type_ids).dtype, np.integer):
            raise TypeError(f"token_type_ids must be integers, got dtype {np.asarray(token_type_ids).dtype}")
        tt = np.zeros(T, np.int64) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        if tt.shape != (T,) or (tt < 0).any() or (tt >= c.type_vocab_size).any():
            raise ValueError(f"token_type_ids must be {T} ids in 0..{c.type_vocab_size - 1}")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != (T,):
                raise ValueError(f"attention_mask must have shape ({T},), got {attention_mask.shape}")
            if not attention_mask.any():
                raise ValueError("attention_mask masks every token")
        e = "embeddings."
        # x_0 = LN(word + position + token type)
        x = L.embedding(self.p(e + "word_embeddings.weight"), ids) \
            + L.learned_positions(self.p(e + "position_embeddings.weight"), np.arange(T)) \
            + L.embedding(self.p(e + "token_type_embeddings.weight"), tt)
        x = self.norm(x, e + "LayerNorm"); trace("embed", x)
        for i in range(c.n_layers):
            h, n = f"encoder.layer.{i}.", f"layers.{i}"
            trace(n + ".attn_norm", x)
            s = h + "attention.self."
            q = L.split_heads(self.linear(x, s + "query.weight", s + "query.bias"), c.n_heads)
            k = L.split_heads(self.linear(x, s + "key.weight", s + "key.bias"), c.n_heads)
            v = L.split_heads(self.linear(x, s + "value.weight", s + "value.bias"), c.n_heads)
            trace(n + ".q", q); trace(n + ".k", k); trace(n + ".v", v)
            o = self.attend(q, k, v, "full", attention_mask, n, trace)
            o = self.linear(o, h + "attention.output.dense.weight", h + "attention.output.dense.bias")
            trace(n + ".attn_out", o)
            # post-norm: x = LN(x + Attn(x))
            x = self.norm(x + o, h + "attention.output.LayerNorm"); trace(n + ".resid_attn", x)
            trace(n + ".ffn_norm", x)
            f = L.gelu_erf(self.linear(x, h + "intermediate.dense.weight", h + "intermediate.dense.bias"))
            trace(n + ".ffn_hidden", f)
            f = self.linear(f, h + "output.dense.weight", h + "output.dense.bias"); trace(n + ".ffn_out", f)
            x = self.norm(x + f, h + "output.LayerNorm"); trace(n + ".resid_ffn", x)
        trace("final_norm", x)
        return x

    # -- autoregressive decoding --------------------------------------------
    def generate(self, ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: Iterable[int] | int | None = None,
                 return_logits: bool = False) -> Generation:
        """Prefill the prompt once, then decode one token at a time with the KV cache.

        Sampling follows refimpl.oracle.sampling (greedy at temperature 0;
        top-k, top-p and temperature compose; the portable xorshift64* RNG is
        seeded with `seed`); the "c" backend runs the same rule in C
        (refimpl.kernels.c_sample).  Stops after max_new_tokens, after a token in
        `stop` (included in the output), or when the context is full.
        """
        if self.config.arch == "bert":
            raise ValueError("BERT is an encoder: it does not generate")
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)
                                 or not 0 <= seed < 2 ** 64):
            raise ValueError(f"seed must be an int in 0..2^64-1 (the xorshift64* state), got {seed!r}")
        top_k, top_p = check_top(top_k, top_p)      # refused even when greedy, which does not use them
        ids = self._check_ids(ids, None, "prompt")
        stop_set = _stop_ids(stop)
        rng = XorShift64Star(random_seed() if seed is None else seed) if temperature else None
        # positions for this prompt and continuation only: a checkpoint may declare a context of 10^9
        cache = self.new_cache(min(len(ids) + int(max_new_tokens), self.config.max_seq_len))
        out = Generation(tokens=[])
        t0 = time.perf_counter()
        logits = self.forward(ids, cache)[-1]
        out.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in range(int(max_new_tokens)):
            if return_logits:
                out.logits.append(np.array(logits))
            tok = self.ops.sample(logits, temperature, top_k, top_p, rng)
            out.tokens.append(tok)
            if tok in stop_set:
                out.stopped = "stop"
                break
            if n + 1 == int(max_new_tokens):
                break
            if cache.length >= self.config.max_seq_len:
                out.stopped = "context"
                break
            logits = self.forward(np.array([tok]), cache)[-1]
        out.decode_seconds = time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------
# parameter checks and tiny random models
# --------------------------------------------------------------------------


def _stop_ids(stop) -> set[int]:
    """generate's `stop`: None, one id, or an iterable of ids (a list, a set, an array) -> a set of
    ints; TypeError naming `stop` for anything else (a str, a float: 2.7 is no token id)."""
    def is_id(s):
        return isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
    if stop is None:
        return set()
    if is_id(stop):
        return {int(stop)}
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
        raise TypeError(f"stop must be a token id or an iterable of token ids, got {type(stop).__name__} {stop!r}")
    stops = list(stop)                                # an array too (`stop or ()` asked its truth)
    bad = [s for s in stops if not is_id(s)]
    if bad:
        raise TypeError(f"stop must hold token ids (integers), got {type(bad[0]).__name__} {bad[0]!r}")
    return {int(s) for s in stops}


def check_params(cfg: Config, params: dict, source: str = "params") -> None:
    """Every expected tensor present with its shape, nothing extra: ValueError naming the tensor."""
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    if missing:
        pairs = [(e, m) for m in missing for e in extra if e.endswith("." + m)]   # e.g. HF's "transformer."
        prefixes = sorted({e[: -len(m)] for e, m in pairs})
        hint = (f"; {len({e for e, _ in pairs})} given key(s) carry a prefix ({', '.join(map(repr, prefixes[:3]))}): "
                "strip it, as a loader of that checkpoint does" if pairs else "")
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} missing) for a {cfg.arch} model with {cfg.n_layers} layers{hint}")
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"({len(extra)} extra) for a {cfg.arch} model with {cfg.n_layers} layers")
    for k, shape in want.items():
        got = tuple(np.shape(params[k]))
        if got != shape:
            raise ValueError(f"{source}: tensor {k!r} has shape {got}, config says {shape}")


def tiny_config(arch: str = "llama", **overrides) -> Config:
    """A small config of each architecture (V=97, D=32, 2 layers, 4 heads; Llama with GQA Hkv=2)."""
    base = dict(arch=arch, vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)
    if arch == "llama":
        base.update(n_kv_heads=2, d_ff=48, norm_eps=1e-6, tie_embeddings=False)
    base.update(overrides)
    return Config(**base)


def random_params(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float64 weights: matrices ~ N(0, 1/fan_in), norm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            is_gain = "norm" in k.lower() or k.split(".")[-2].startswith("ln") or "LayerNorm" in k
            out[k] = (1.0 if is_gain and k.endswith("weight") else 0.0) + 0.1 * rng.standard_normal(shape)
        elif "embed" in k or k.startswith(("wte", "wpe")):
            out[k] = rng.standard_normal(shape) * 0.5
        else:
            fan_in = shape[1] if not k.startswith("h.") else shape[0]   # Conv1D is (in, out)
            out[k] = rng.standard_normal(shape) / math.sqrt(fan_in)
    return out


def tiny_model(arch: str = "llama", seed: int = 0, dtype="float64", backend="numpy", **overrides) -> Model:
    """A built-in tiny random model: for examples, profiling and tests (no files needed)."""
    cfg = tiny_config(arch, **overrides)
    return Model(cfg, random_params(cfg, seed), dtype=dtype, backend=backend)
