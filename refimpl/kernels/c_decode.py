"""A Llama or GPT-2 decode step in one C call (csrc/kernels/decode.c), for Model(backend="c").

At decode (one new token) the "c" backend's Python forward calls about fifteen kernels per
layer, and each call's Python cost (argument checks, a new output array, ~3-5 us) adds up:
~0.3 ms a token on a llama2.c stories15M-shaped model whose weights stream from memory in
~2 ms.  A decode step checks every weight once and packs its pointer into C structs, so a
token is a single call.  It runs the same kernels on the same operands in the same order as
the Python composition, so both give the same bits (tests/test_kernels_c_decode.py checks
that, and the composed error bound against the float64 oracle).

Letters as in decode.h: D model width, H / Hkv heads, Dh head width, F FFN width,
V vocabulary, S cache capacity.
"""
from __future__ import annotations

import operator
import threading
from types import SimpleNamespace

import numpy as np

from refimpl._kernels import ffi, lib
from refimpl.kernels.buffers import address, aligned_empty
from refimpl.kernels.contracts import check_finite, check_flag


def _ptr(what: str, a: np.ndarray, shape: tuple, writable: bool = False):
    """float* to `a`, after checking it is the float32 C-contiguous `shape` the C step indexes."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape or not a.flags.c_contiguous:
        got = (type(a).__name__ if not isinstance(a, np.ndarray)
               else f"{a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' non-contiguous'}")
        raise ValueError(f"C decode step: {what} must be a float32 C-contiguous array of shape {shape}, got {got}")
    if writable and not a.flags.writeable:
        raise ValueError(f"C decode step: {what} must be writable")
    return ffi.cast("float *", ffi.from_buffer(a, require_writable=writable))


def _spans(named) -> list:
    """[(first byte, end, what)] of contiguous arrays, sorted by address (empty ones have no bytes)."""
    return sorted((a0, a0 + a.nbytes, what) for what, a in named if a.nbytes for a0 in (address(a),))


def _merged(spans) -> list:
    """Sorted spans with the overlapping ones merged (weights may share memory: a tied head)."""
    out = []
    for a0, a1, what in spans:
        if out and a0 < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], a1), out[-1][2])
        else:
            out.append((a0, a1, what))
    return out


def _check_cache_memory(cache_spans, weight_spans):
    """ValueError if a cache array shares memory with another cache array or a weight (the step
    writes into the caches; a weight is an array it reads or a params entry one was made from).  Merged weight spans are disjoint, so any overlap shows between
    neighbours in address order, one of them a cache array."""
    spans = sorted(cache_spans + weight_spans)
    for (_, end, w0), (a1, _, w1) in zip(spans, spans[1:]):
        if a1 < end:
            raise ValueError(f"C decode step: {w0} and {w1} share memory: each cache array must be a buffer "
                             "of its own (the step writes into it)")


def decode_step(model, reference: bool = False):
    """The C decode step for `model` (a float32 llama or gpt2 Model)."""
    if model.config.arch not in _STEPS:
        raise _refused(model)
    return _STEPS[model.config.arch](model, reference)


def _refused(model) -> ValueError:
    return ValueError(f"C decode step: needs a float32 {' or '.join(_STEPS)} model, "
                      f"got {model.config.arch} {model.dtype}")


STAGES = ("embedding", "norms", "attention", "ffn", "lm_head")   # decode.h's rf_decode_stages, in order


class _DecodeStep:
    """step(token, cache) -> logits [1,V] for the token at position cache.length (the cache is
    filled at that position; the caller advances cache.length).  `reference=True` composes the
    naive _ref kernels instead of the fast ones (slow; for tests).

    Threads may share a step, each with its own KVCache: the C step's scratch, its dims (S is
    the cache's capacity) and the layer structs holding the cache pointers are per thread.  The
    weights are packed once: Model.params is read-only after construction.

    With `step.stamps = True` each call also reads the counter (refimpl.timing.cycles) at the
    stage boundaries inside the C step and leaves `step.last_stages` = {stage: ticks} for that
    call, stages as in STAGES (decode.h says which operations each holds); the logits are the
    same bits either way."""

    arch, layer_type = None, ""
    rope = False                                         # the arch rotates q, k (config.rope_* are read)
    stamps = False
    last_stages: dict | None = None

    def __init__(self, model, reference: bool = False):
        c = model.config
        if c.arch != self.arch or model.dtype != np.float32:
            raise _refused(model)
        self.model, self.reference = model, reference
        self.V, self.n_layers = c.vocab_size, c.n_layers
        self._local = threading.local()                  # per thread: dims, layers with its cache, scratch
        self.w = self._pack()

    def _pack(self) -> SimpleNamespace:
        """Check the config's scalars and every weight, and pack their pointers (w.dims, w.layers, ...)."""
        c = self.model.config
        w = SimpleNamespace(keep=[])                     # (what, array): every array a pointer points into,
        w.dims = ffi.new("rf_decode_dims *", dict(       # and the params entries they were made from
            D=c.d_model, H=c.n_heads, Hkv=c.n_kv_heads, Dh=c.head_dim, F=c.d_ff, V=c.vocab_size,
            S=c.max_seq_len, n_layers=c.n_layers, eps=check_finite("config.norm_eps", c.norm_eps, np.float32,
                                                                   nonneg=True)))
        if self.rope:
            w.dims.theta = check_finite("config.rope_theta", c.rope_theta, positive=True)
            w.dims.interleaved = check_flag("config.rope_interleaved", c.rope_interleaved)
        w.layers = ffi.new(self.layer_type + "[]", c.n_layers)
        self._pack_weights(w)
        w.spans = _merged(_spans(w.keep))                # no cache array may overlap these
        return w

    def _point(self, w, what, a, shape, names):
        """Pointer to weight `a` (made from the params `names`), kept alive with the pack."""
        p = _ptr(what, a, shape)
        w.keep.append((what, a))
        w.keep.extend((n, self.model.params[n]) for n in names)
        return p

    def param(self, w, name, shape):
        return self._point(w, name, self.model.p(name), shape, (name,))

    def linear(self, w, name, shape):
        return self._point(w, name + " (as in, out)", self.model._w(name, "out_in"), shape, (name,))

    def concat(self, w, what, names, shape):
        return self._point(w, what, self.model.concat_weight(names), shape, names)

    def _thread(self, cache):
        """This thread's dims, layer structs (pointing at `cache`) and scratch."""
        t = getattr(self._local, "t", None)
        if t is None:
            t = self._local.t = SimpleNamespace(layers=ffi.new(self.layer_type + "[]", self.n_layers),
                                                dims=ffi.new("rf_decode_dims *", self.w.dims[0]),
                                                scratch=None, cache=None, k=(), v=())
            ffi.memmove(t.layers, self.w.layers, ffi.sizeof(self.w.layers))
        if not (cache is t.cache and len(cache.k) == len(cache.v) == self.n_layers
                and all(map(operator.is_, cache.k, t.k)) and all(map(operator.is_, cache.v, t.v))):
            self._bind(t, cache)
        return t

    def _bind(self, t, cache):
        """Point t's layers' k_cache / v_cache at this cache's arrays (checked); S = its capacity."""
        c = self.model.config
        n = self.n_layers
        if len(cache.k) != n or len(cache.v) != n:
            raise ValueError(f"C decode step: the cache holds {len(cache.k)} k and {len(cache.v)} v arrays, "
                             f"expected one per layer, n_layers = {n}")
        S = operator.index(getattr(cache, "capacity", c.max_seq_len))
        if not 1 <= S <= c.max_seq_len:
            raise ValueError(f"C decode step: cache capacity {S} must be 1..max_seq_len = {c.max_seq_len}")
        shape = (c.n_kv_heads, S, c.head_dim)
        t.cache = None                                   # unbound until every array passed its checks
        ks = [_ptr(f"cache.k[{i}]", cache.k[i], shape, writable=True) for i in range(n)]
        vs = [_ptr(f"cache.v[{i}]", cache.v[i], shape, writable=True) for i in range(n)]
        named = [(f"cache.{kv}[{i}]", a) for kv, arrays in (("k", cache.k), ("v", cache.v))
                 for i, a in enumerate(arrays)]
        _check_cache_memory(_spans(named), self.w.spans)
        for i in range(n):
            t.layers[i].k_cache, t.layers[i].v_cache = ks[i], vs[i]
        t.dims.S = S
        floats = int(lib.rf_decode_scratch_floats(t.dims))
        if t.scratch is None or t.scratch.size != floats:
            t.scratch = aligned_empty(floats, np.float32)
            t.scratch_ptr = ffi.cast("float *", ffi.from_buffer(t.scratch, require_writable=True))
        t.cache, t.k, t.v = cache, tuple(cache.k), tuple(cache.v)

    def __call__(self, token: int, cache) -> np.ndarray:  # -> [1,V]
        try:
            token = operator.index(token)
        except TypeError:
            raise TypeError(f"C decode step: token must be an integer, got {type(token).__name__} {token!r}") from None
        pos = getattr(cache, "length", None)
        if not isinstance(pos, (int, np.integer)) or isinstance(pos, (bool, np.bool_)):
            raise TypeError(f"C decode step: cache must be a KVCache (model.new_cache()) whose length is an "
                            f"integer, got {type(cache).__name__}" + ("" if pos is None else f" of length {pos!r}"))
        pos = int(pos)
        if not 0 <= token < self.V:
            raise ValueError(f"token {token} is out of range: vocab_size is {self.V}")
        t = self._thread(cache)
        if not 0 <= pos < t.dims.S:
            raise ValueError(f"cache position {pos} is outside the cache's capacity of {t.dims.S} positions "
                             f"(the context limit max_seq_len is {self.model.config.max_seq_len})")
        logits = np.empty((1, self.V), np.float32)       # written with unaligned stores: NumPy's alignment will do
        stages = ffi.new("rf_decode_stages *") if self.stamps else ffi.NULL
        rc = self._run(self.w, t, ffi.cast("float *", ffi.from_buffer(logits, require_writable=True)), token, pos,
                       stages)
        if rc == -1:
            raise MemoryError("C decode step: a kernel could not allocate its scratch memory")
        if rc:
            raise RuntimeError(f"C decode step failed with status {rc}")
        self.last_stages = dict(zip(STAGES, (int(x) for x in stages.ticks))) if self.stamps else None
        return logits


class LlamaDecodeStep(_DecodeStep):
    arch, layer_type, rope = "llama", "rf_llama_layer", True

    def _pack_weights(self, w):
        c = self.model.config
        D, H, Hkv, Dh, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
        for i in range(c.n_layers):
            h, L = f"layers.{i}.", w.layers[i]
            L.attn_norm = self.param(w, h + "input_layernorm.weight", (D,))
            L.w_qkv = self.concat(w, h + "self_attn.{q,k,v}_proj", [h + f"self_attn.{x}_proj.weight" for x in "qkv"],
                                  (D, (H + 2 * Hkv) * Dh))
            L.w_o = self.linear(w, h + "self_attn.o_proj.weight", (H * Dh, D))
            L.ffn_norm = self.param(w, h + "post_attention_layernorm.weight", (D,))
            L.w_gu = self.concat(w, h + "mlp.{gate,up}_proj", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                                 (D, 2 * F))
            L.w_down = self.linear(w, h + "mlp.down_proj.weight", (F, D))
        w.embed = self.param(w, "embed_tokens.weight", (V, D))
        w.final_norm = self.param(w, "norm.weight", (D,))
        w.w_lm = self.linear(w, "embed_tokens.weight" if c.tie_embeddings else "lm_head.weight", (D, V))

    def _run(self, w, t, logits, token, pos, stages):
        fn = lib.rf_llama_decode_f32_ref if self.reference else lib.rf_llama_decode_f32
        return fn(logits, t.dims, w.embed, t.layers, w.final_norm, w.w_lm, token, pos, t.scratch_ptr, stages)


class GPT2DecodeStep(_DecodeStep):
    arch, layer_type = "gpt2", "rf_gpt2_layer"

    def _pack_weights(self, w):
        c = self.model.config
        D, F, V, S = c.d_model, c.d_ff, c.vocab_size, c.max_seq_len
        for i in range(c.n_layers):
            h, L = f"h.{i}.", w.layers[i]
            for field, name, shape in (("ln1_w", "ln_1.weight", (D,)), ("ln1_b", "ln_1.bias", (D,)),
                                       ("w_attn", "attn.c_attn.weight", (D, 3 * D)),
                                       ("b_attn", "attn.c_attn.bias", (3 * D,)),
                                       ("w_proj", "attn.c_proj.weight", (D, D)), ("b_proj", "attn.c_proj.bias", (D,)),
                                       ("ln2_w", "ln_2.weight", (D,)), ("ln2_b", "ln_2.bias", (D,)),
                                       ("w_fc", "mlp.c_fc.weight", (D, F)), ("b_fc", "mlp.c_fc.bias", (F,)),
                                       ("w_mproj", "mlp.c_proj.weight", (F, D)), ("b_mproj", "mlp.c_proj.bias", (D,))):
                setattr(L, field, self.param(w, h + name, shape))      # Conv1D: already (in, out)
        w.wte = self.param(w, "wte.weight", (V, D))
        w.wpe = self.param(w, "wpe.weight", (S, D))
        w.lnf_w = self.param(w, "ln_f.weight", (D,))
        w.lnf_b = self.param(w, "ln_f.bias", (D,))
        w.w_lm = self.linear(w, "wte.weight" if c.tie_embeddings else "lm_head.weight", (D, V))

    def _run(self, w, t, logits, token, pos, stages):
        fn = lib.rf_gpt2_decode_f32_ref if self.reference else lib.rf_gpt2_decode_f32
        return fn(logits, t.dims, w.wte, w.wpe, t.layers, w.lnf_w, w.lnf_b, w.w_lm, token, pos, t.scratch_ptr, stages)


_STEPS = {"llama": LlamaDecodeStep, "gpt2": GPT2DecodeStep}
