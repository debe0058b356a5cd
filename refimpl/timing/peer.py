"""The peer of `refimpl profile`: transformers' own model, same architecture, same weights.

    hf_peer(model) -> torch.nn.Module       (LlamaForCausalLM or GPT2LMHeadModel, float32, eval)
    check_peer(peer, model, ids)             raises PeerError unless its logits are within the
                                             composed float32 bound of the float64 oracle
    profile_peer(peer, arch, ids, decode, repeats, seed) -> measured, as profile.profile_model

Nothing is timed before the peer's prefill logits pass the same check as refimpl's own
float32 kernels (llm.c style): a mis-mapped weight would otherwise be timed as a result.

Stages come from forward hooks on the modules that do each stage's work:

    llama: model.embed_tokens -> embedding; layers.i.input_layernorm,
           layers.i.post_attention_layernorm, model.norm -> norms; model.rotary_emb,
           layers.i.self_attn -> attention; layers.i.mlp -> ffn; lm_head -> lm_head
    gpt2:  transformer.wte, transformer.wpe -> embedding; h.i.ln_1, h.i.ln_2,
           transformer.ln_f -> norms; h.i.attn -> attention; h.i.mlp -> ffn; lm_head -> lm_head

The counter is read in a pre-hook and a post-hook of each: the ticks inside a module are its
stage's, and the ticks between one module's end and the next one's start (the residual adds,
the mask and position set-up the decoder layer does itself) go to the stage that just ended,
as the Python composition's residual adds belong to its attention and FFN stages.  From the
call until the first module starts (transformers' wrappers around forward) counts as
embedding, and so does the model's own set-up between the embedding and the first layer
(cache positions, the causal mask): on the built-in tiny Llama, in decode, those two were
112k and 130k ticks, the embedding lookup itself (with its hooks) 43k.  A hook is one Python
call (~1 us); `decode_forward_untraced` times the same steps without hooks.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np


class PeerError(ValueError):
    """The peer cannot be built for this model, or its logits disagree with the oracle's."""


def available() -> str | None:
    """None when torch and transformers import; else why not."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        return f"torch and transformers are needed for the peer: {e}"
    return None


def hf_peer(model):
    """transformers' model for `model`'s config with its weights (float32, eval mode)."""
    import torch
    import transformers as T
    c = model.config
    if c.arch == "llama":
        if c.rope_interleaved:
            raise PeerError("transformers' Llama rotates (i, i + Dh/2) pairs; this model uses interleaved RoPE")
        hc = T.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                           num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                           num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                           rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                           bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
        peer, prefix = T.LlamaForCausalLM(hc), "model."
    elif c.arch == "gpt2":
        hc = T.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
                          n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff, layer_norm_epsilon=c.norm_eps,
                          activation_function="gelu_new", tie_word_embeddings=c.tie_embeddings,
                          bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
        peer, prefix = T.GPT2LMHeadModel(hc), "transformer."
    else:
        raise PeerError(f"no transformers peer for arch {c.arch!r} (llama and gpt2 have one)")
    state = {(k if k == "lm_head.weight" else prefix + k): torch.from_numpy(np.array(v, np.float32))
             for k, v in model.params.items()}
    missing, unexpected = peer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and c.tie_embeddings)]
    if missing or unexpected:
        raise PeerError(f"transformers peer: weights not mapped: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if c.tie_embeddings:
        peer.tie_weights()
    return peer.float().eval()


@functools.lru_cache(maxsize=None)
def _cache_arg(cls) -> str:
    """The name transformers gives the KV cache, in and out: `cache` (>= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _forward(peer, input_ids, cache, begin=None):
    """(output, its KV cache) of one forward, input_ids a (1, T) int64 tensor; `begin()` is
    called right before the model's own call, so nothing of this wrapper is timed with it."""
    kw = _cache_arg(type(peer))
    if begin is not None:
        begin()
    out = peer(input_ids=input_ids, use_cache=True, **{kw: cache})
    return out, getattr(out, kw)


def _logits(peer, ids, cache=None, begin=None):
    """(logits (T, V) as float32 NumPy, the KV cache) of one forward of `ids` (`begin` as in _forward)."""
    import torch
    import transformers as T
    with torch.inference_mode():
        x = torch.from_numpy(np.asarray(ids, np.int64)[None])
        out, cache = _forward(peer, x, T.DynamicCache() if cache is None else cache, begin)
    return out.logits[0].numpy(), cache


def check_peer(peer, model, ids) -> float:
    """The peer's prefill logits against the float64 oracle, within the composed float32 bound that
    refimpl's own float32 kernels are held to.  Returns the worst |error| / bound; raises PeerError."""
    from refimpl.kernels.model_bound import logits_with_bound
    from refimpl.oracle.model import Model
    oracle = Model(model.config, {k: np.asarray(v, np.float64) for k, v in model.params.items()}, "float64")
    want, bound = logits_with_bound(oracle, np.asarray(ids))
    got, _ = _logits(peer, ids)
    ratio = np.abs(got.astype(np.float64) - want) / bound
    worst = float(np.max(ratio))
    if not worst <= 1.0:
        i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        raise PeerError(f"transformers peer: logits{list(i)} = {got[i]:.6g}, the float64 oracle's {want[i]:.6g}: "
                        f"|error| is {worst:.3g} x the float32 bound; not timed")
    return worst


def _stage_modules(peer, arch):
    """[(module, stage, layer index or None)] of the hooked modules (module docstring)."""
    if arch == "llama":
        m = peer.model
        out = [(m.embed_tokens, "embedding", None)]
        if getattr(m, "rotary_emb", None) is not None:
            out.append((m.rotary_emb, "attention", None))
        for i, L in enumerate(m.layers):
            out += [(L.input_layernorm, "norms", i), (L.self_attn, "attention", i),
                    (L.post_attention_layernorm, "norms", i), (L.mlp, "ffn", i)]
        return out + [(m.norm, "norms", None), (peer.lm_head, "lm_head", None)]
    m = peer.transformer
    out = [(m.wte, "embedding", None), (m.wpe, "embedding", None)]
    for i, L in enumerate(m.h):
        out += [(L.ln_1, "norms", i), (L.attn, "attention", i), (L.ln_2, "norms", i), (L.mlp, "ffn", i)]
    return out + [(m.ln_f, "norms", None), (peer.lm_head, "lm_head", None)]


class _HookTracer:
    """Counter reads in a pre- and a post-hook of each stage module (module docstring)."""

    def __init__(self, peer, arch):
        from refimpl._clock import lib
        start = self._start = lib.rf_ticks_start
        self.marks: list = []
        self.handles = []
        for mod, stage, layer in _stage_modules(peer, arch):
            key = (stage, layer)
            self.handles.append(mod.register_forward_pre_hook(
                lambda _m, _a, key=key: self.marks.append((key, False, start()))))
            self.handles.append(mod.register_forward_hook(
                lambda _m, _a, _o, key=key: self.marks.append((key, True, start()))))

    def begin(self):
        self.marks = [(("embedding", None), True, self._start())]

    def _intervals(self):
        for (k0, _, t0), (k1, ends, t1) in zip(self.marks, self.marks[1:]):
            yield (k1 if ends else k0), t1 - t0          # inside a module: its own; after one: the one that ended

    def stages(self) -> dict:
        out: dict = {}
        for (stage, _), dt in self._intervals():
            out[stage] = out.get(stage, 0) + dt
        return out

    def per_layer(self) -> dict:
        out: dict = {}
        for (stage, layer), dt in self._intervals():
            if layer is not None:
                key = f"layers.{layer}.{stage}"
                out[key] = out.get(key, 0) + dt
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def profile_peer(peer, arch: str, ids, decode: int, repeats: int = 3, seed: int = 0, pmu=None) -> dict:
    """Measured ticks per token by stage for the peer, as `profile.profile_model` returns them: the
    prompt as one forward, then `decode` steps with transformers' KV cache (DynamicCache), the
    same sampler and seed; the fastest of `repeats` runs per stage."""
    import gc

    import torch

    from refimpl.oracle.sampling import XorShift64Star
    from refimpl.timing.profile import Counted, _fastest, _min_per_key, _put_sampling, _sample_parts
    T_prompt = len(ids)
    best: dict = {}
    gc_was = gc.isenabled()
    gc.disable()
    best_plain = None
    tr = _HookTracer(peer, arch)
    try:
        _logits(peer, ids)                                                     # warm-up
        for _ in range(repeats):
            rng = XorShift64Star(seed + 1)
            logits, cache = _logits(peer, ids, begin=tr.begin)
            pre = tr.stages()
            layers = tr.per_layer()
            tok = _put_sampling(pre, _sample_parts(logits[-1], rng))
            pre = {k: v / T_prompt for k, v in pre.items()}
            steps = []
            for _ in range(decode):
                logits, cache = _logits(peer, [tok], cache, begin=tr.begin)
                st = tr.stages()
                tok = _put_sampling(st, _sample_parts(logits[-1], rng))
                steps.append(st)
            dec = {k: float(np.median([s.get(k, 0) for s in steps])) for k in steps[0]} if steps else {}
            tr.remove()                                                        # the same steps, no hooks
            _, cache = _logits(peer, ids)
            plain = Counted(pmu)
            with torch.inference_mode():
                for _ in range(decode):
                    x = torch.tensor([[1]])
                    with plain:
                        cache = _forward(peer, x, cache)[1]
            best_plain = _fastest(best_plain, plain)
            tr = _HookTracer(peer, arch)
            for part, val in {"prefill": pre, "decode": dec, "prefill_per_layer": layers}.items():
                best[part] = _min_per_key(best.get(part), val)
    finally:
        tr.remove()
        if gc_was:
            gc.enable()
    return best | {"decode_forward_untraced": best_plain.median(),
                   "decode_forward_untraced_pmu": best_plain.pmu_summary(),
                   "decode_fused": None, "decode_fused_call_pmu": None}
