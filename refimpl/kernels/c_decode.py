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

import numpy as np

from refimpl._kernels import ffi, lib
from refimpl.kernels.buffers import aligned_empty


def _ptr(what: str, a: np.ndarray, shape: tuple, writable: bool = False):
    """float* to `a`, after checking it is the float32 C-contiguous `shape` the C step indexes."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != shape or not a.flags.c_contiguous:
        got = (type(a).__name__ if not isinstance(a, np.ndarray)
               else f"{a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' non-contiguous'}")
        raise ValueError(f"C decode step: {what} must be a float32 C-contiguous array of shape {shape}, got {got}")
    if writable and not a.flags.writeable:
        raise ValueError(f"C decode step: {what} must be writable")
    return ffi.cast("float *", ffi.from_buffer(a, require_writable=writable))


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

    With `step.stamps = True` each call also reads the counter (refimpl.timing.cycles) at the
    stage boundaries inside the C step and leaves `step.last_stages` = {stage: ticks} for that
    call, stages as in STAGES (decode.h says which operations each holds); the logits are the
    same bits either way."""

    arch, layer_type = None, ""
    stamps = False
    last_stages: dict | None = None

    def __init__(self, model):
        c = model.config
        if c.arch != self.arch or model.dtype != np.float32:
            raise _refused(model)
        self.model, self.V, self.S = model, c.vocab_size, c.max_seq_len
        self.dims = ffi.new("rf_decode_dims *", dict(
            D=c.d_model, H=c.n_heads, Hkv=c.n_kv_heads, Dh=c.head_dim, F=c.d_ff, V=c.vocab_size,
            S=c.max_seq_len, n_layers=c.n_layers, eps=c.norm_eps, theta=c.rope_theta,
            interleaved=int(c.rope_interleaved)))
        self._keep = []                                  # every array a pointer points into
        self.layers = ffi.new(self.layer_type + "[]", c.n_layers)
        self.scratch = aligned_empty(int(lib.rf_decode_scratch_floats(self.dims)), np.float32)
        self._scratch = ffi.cast("float *", ffi.from_buffer(self.scratch, require_writable=True))
        self._cache, self._cache_arrays = None, None     # the KVCache whose pointers are set

    def ptr(self, what, a, shape):
        self._keep.append(a)
        return _ptr(what, a, shape)

    def _bind(self, cache):
        """Point the layers' k_cache / v_cache at this cache's arrays (checked)."""
        c = self.model.config
        shape = (c.n_kv_heads, c.max_seq_len, c.head_dim)
        for i in range(c.n_layers):
            self.layers[i].k_cache = _ptr(f"cache.k[{i}]", cache.k[i], shape, writable=True)
            self.layers[i].v_cache = _ptr(f"cache.v[{i}]", cache.v[i], shape, writable=True)
        self._cache, self._cache_arrays = cache, (list(cache.k), list(cache.v))

    def __call__(self, token: int, cache) -> np.ndarray:  # -> [1,V]
        token, pos = int(token), int(cache.length)
        if not 0 <= token < self.V:
            raise ValueError(f"token {token} is out of range: vocab_size is {self.V}")
        if not 0 <= pos < self.S:
            raise ValueError(f"cache position {pos} is outside the context limit max_seq_len = {self.S}")
        if (cache is not self._cache or any(a is not b for a, b in zip(cache.k, self._cache_arrays[0]))
                or any(a is not b for a, b in zip(cache.v, self._cache_arrays[1]))):
            self._bind(cache)
        logits = aligned_empty((1, self.V), np.float32)
        stages = ffi.new("rf_decode_stages *") if self.stamps else ffi.NULL
        rc = self._run(ffi.cast("float *", ffi.from_buffer(logits, require_writable=True)), token, pos, stages)
        if rc == -1:
            raise MemoryError("C decode step: a kernel could not allocate its scratch memory")
        if rc:
            raise RuntimeError(f"C decode step failed with status {rc}")
        self.last_stages = dict(zip(STAGES, (int(t) for t in stages.ticks))) if self.stamps else None
        return logits


class LlamaDecodeStep(_DecodeStep):
    arch, layer_type = "llama", "rf_llama_layer"

    def __init__(self, model, reference: bool = False):
        super().__init__(model)
        c, m, ptr = model.config, model, self.ptr
        D, H, Hkv, Dh, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
        for i in range(c.n_layers):
            h, L = f"layers.{i}.", self.layers[i]
            L.attn_norm = ptr(h + "input_layernorm.weight", m.p(h + "input_layernorm.weight"), (D,))
            L.w_qkv = ptr(h + "self_attn.{q,k,v}_proj", m.concat_weight(
                [h + f"self_attn.{w}_proj.weight" for w in "qkv"]), (D, (H + 2 * Hkv) * Dh))
            L.w_o = ptr(h + "self_attn.o_proj.weight", m._w(h + "self_attn.o_proj.weight", "out_in"), (H * Dh, D))
            L.ffn_norm = ptr(h + "post_attention_layernorm.weight", m.p(h + "post_attention_layernorm.weight"), (D,))
            L.w_gu = ptr(h + "mlp.{gate,up}_proj", m.concat_weight(
                [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]), (D, 2 * F))
            L.w_down = ptr(h + "mlp.down_proj.weight", m._w(h + "mlp.down_proj.weight", "out_in"), (F, D))
        self.embed = ptr("embed_tokens.weight", m.p("embed_tokens.weight"), (V, D))
        self.final_norm = ptr("norm.weight", m.p("norm.weight"), (D,))
        lm = "embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
        self.w_lm = ptr(lm + " (as in, out)", m._w(lm, "out_in"), (D, V))
        self._fn = lib.rf_llama_decode_f32_ref if reference else lib.rf_llama_decode_f32

    def _run(self, logits, token, pos, stages):
        return self._fn(logits, self.dims, self.embed, self.layers, self.final_norm, self.w_lm, token, pos,
                        self._scratch, stages)


class GPT2DecodeStep(_DecodeStep):
    arch, layer_type = "gpt2", "rf_gpt2_layer"

    def __init__(self, model, reference: bool = False):
        super().__init__(model)
        c, m, ptr = model.config, model, self.ptr
        D, F, V, S = c.d_model, c.d_ff, c.vocab_size, c.max_seq_len
        for i in range(c.n_layers):
            h, L = f"h.{i}.", self.layers[i]
            for field, name, shape in (("ln1_w", "ln_1.weight", (D,)), ("ln1_b", "ln_1.bias", (D,)),
                                       ("w_attn", "attn.c_attn.weight", (D, 3 * D)),
                                       ("b_attn", "attn.c_attn.bias", (3 * D,)),
                                       ("w_proj", "attn.c_proj.weight", (D, D)), ("b_proj", "attn.c_proj.bias", (D,)),
                                       ("ln2_w", "ln_2.weight", (D,)), ("ln2_b", "ln_2.bias", (D,)),
                                       ("w_fc", "mlp.c_fc.weight", (D, F)), ("b_fc", "mlp.c_fc.bias", (F,)),
                                       ("w_mproj", "mlp.c_proj.weight", (F, D)), ("b_mproj", "mlp.c_proj.bias", (D,))):
                setattr(L, field, ptr(h + name, m.p(h + name), shape))      # Conv1D: already (in, out)
        self.wte = ptr("wte.weight", m.p("wte.weight"), (V, D))
        self.wpe = ptr("wpe.weight", m.p("wpe.weight"), (S, D))
        self.lnf_w = ptr("ln_f.weight", m.p("ln_f.weight"), (D,))
        self.lnf_b = ptr("ln_f.bias", m.p("ln_f.bias"), (D,))
        lm = "wte.weight" if c.tie_embeddings else "lm_head.weight"
        self.w_lm = ptr(lm + " (as in, out)", m._w(lm, "out_in"), (D, V))
        self._fn = lib.rf_gpt2_decode_f32_ref if reference else lib.rf_gpt2_decode_f32

    def _run(self, logits, token, pos, stages):
        return self._fn(logits, self.dims, self.wte, self.wpe, self.layers, self.lnf_w, self.lnf_b, self.w_lm,
                        token, pos, self._scratch, stages)


_STEPS = {"llama": LlamaDecodeStep, "gpt2": GPT2DecodeStep}
