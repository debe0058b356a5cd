"""Hugging Face model directories -> (Config, params).

A directory saved by `transformers` `save_pretrained` holds `config.json` and
either `model.safetensors` or a sharded `model.safetensors.index.json` plus
its shards.  Only safetensors are read: `pytorch_model.bin` is a pickle and is
refused (convert it with the `safetensors` tools first).

Supported architectures (`model_type` in config.json):

* gpt2  (GPT2LMHeadModel / GPT2Model): prefix `transformer.`; Conv1D weights
  stay (in, out); `attn.bias` / `attn.masked_bias` buffers are dropped.
* llama (LlamaForCausalLM / LlamaModel): prefix `model.`; RoPE in HF's
  half-split convention (`rope_interleaved=False`); rotary `inv_freq` buffers
  are dropped.
* bert  (BertModel / BertFor*): prefix `bert.`; the pooler, the MLM / NSP
  heads and task classifiers are dropped (the oracle returns hidden states).

Parameter names are the checkpoint's own keys with the class prefix stripped
(see `refimpl.oracle.config.expected_shapes`).  `lm_head.weight` is dropped
when the embeddings are tied and it equals the embedding table (an error if
it differs).  After that, missing tensors, extra tensors and shape
mismatches raise `CheckpointError` naming the tensor.

Float16 and bfloat16 weights are widened to float32 exactly; float32 and
float64 are kept as stored (the model converts to its compute dtype).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from refimpl.io import safetensors as st
from refimpl.oracle.config import Config, expected_shapes


class CheckpointError(ValueError):
    """A checkpoint's config or tensors do not describe a model the oracle runs."""


# --------------------------------------------------------------------------
# config.json -> Config
# --------------------------------------------------------------------------


def _need(cfg: dict, key: str, source: str, kind=int):
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"{source}: field {key!r} is missing")
    v = cfg[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise CheckpointError(f"{source}: field {key!r} must be an int, got {v!r}")
    return _number(v, key, source) if kind is float else kind(v)


def _number(v, key: str, source: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise CheckpointError(f"{source}: field {key!r} must be a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:
        raise CheckpointError(f"{source}: field {key!r} must be a finite number, got an integer of "
                              f"{len(str(abs(v)))} digits") from None


def _eps(cfg: dict, key: str, source: str, default: float) -> float:
    """A norm eps: a finite number > 0 (the norm divides by sqrt(var + eps) and var is 0 on a constant row)."""
    v = _need(cfg, key, source, float) if key in cfg else default
    if not math.isfinite(v) or v <= 0:
        raise CheckpointError(f"{source}: field {key!r} must be a finite number > 0 (the norm divides by "
                              f"sqrt(variance + eps), and the variance of a constant row is 0), got {v!r}")
    return v


def _flag(cfg: dict, key: str, source: str, default: bool) -> bool:
    """A JSON boolean (0 and 1 accepted); a string such as "false" is an error, not True."""
    v = cfg.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise CheckpointError(f"{source}: field {key!r} must be true or false, got {v!r}")


def _token_id(cfg: dict, key: str, vocab: int):
    """The bos/eos id(s) inside the vocabulary: an int, a tuple of several (a list of EOS ids, as
    Llama 3 gives: any of them ends a sequence), or None.  Others are dropped: a config may name
    an id its vocabulary lacks."""
    v = cfg.get(key)
    ids = [i for i in (v if isinstance(v, list) else [v])
           if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab]
    if key == "bos_token_id":                     # one id starts a prompt
        return ids[0] if len(ids) == 1 else None
    return None if not ids else ids[0] if len(ids) == 1 else tuple(dict.fromkeys(ids))


def _refuse(cfg: dict, source: str, key: str, allowed, what: str):
    v = cfg.get(key, allowed[0])
    if v not in allowed:
        raise CheckpointError(f"{source}: {what}: {key}={v!r} is not supported (supported: {list(allowed)})")


def _gpt2_config(c: dict, source: str) -> Config:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function={act!r} is not supported: GPT-2 here uses the tanh "
                              f"GELU ('gelu_new' or 'gelu_pytorch_tanh')")
    _refuse(c, source, "scale_attn_weights", (True,), "attention scaling")
    _refuse(c, source, "scale_attn_by_inverse_layer_idx", (False,), "per-layer attention scaling")
    _refuse(c, source, "add_cross_attention", (False,), "cross-attention")
    D = _need(c, "n_embd", source)
    inner = c.get("n_inner")
    V = _need(c, "vocab_size", source)
    return Config(arch="gpt2", vocab_size=V, d_model=D, n_layers=_need(c, "n_layer", source),
                  n_heads=_need(c, "n_head", source), d_ff=4 * D if inner is None else _need(c, "n_inner", source),
                  max_seq_len=_need(c, "n_positions", source),
                  norm_eps=_eps(c, "layer_norm_epsilon", source, 1e-5),
                  tie_embeddings=_flag(c, "tie_word_embeddings", source, True),
                  bos_token_id=_token_id(c, "bos_token_id", V), eos_token_id=_token_id(c, "eos_token_id", V))


def _llama_config(c: dict, source: str) -> Config:
    _refuse(c, source, "hidden_act", ("silu",), "activation")
    _refuse(c, source, "attention_bias", (False,), "biases in the attention projections")
    _refuse(c, source, "mlp_bias", (False,), "biases in the MLP")
    _refuse(c, source, "pretraining_tp", (1,), "tensor-parallel slicing")
    theta = c.get("rope_theta", 10000.0)
    rp = c.get("rope_parameters")
    if rp is not None:                                   # transformers >= 5 keeps RoPE settings here
        if not isinstance(rp, dict):
            raise CheckpointError(f"{source}: rope_parameters must be an object, got {rp!r}")
        if rp.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported "
                                  f"(only plain RoPE, 'default')")
        unknown = set(rp) - {"rope_type", "rope_theta"}
        if unknown:
            raise CheckpointError(f"{source}: rope_parameters has unsupported fields {sorted(unknown)}")
        theta = rp.get("rope_theta", theta)
    if c.get("rope_scaling") not in (None, {}):
        raise CheckpointError(f"{source}: rope_scaling={c['rope_scaling']!r} is not supported (only plain RoPE)")
    theta = _number(theta, "rope_theta", source)
    if not math.isfinite(theta) or theta <= 0:
        raise CheckpointError(f"{source}: field 'rope_theta' must be a finite number > 0, got {theta!r}")
    D = _need(c, "hidden_size", source)
    H = _need(c, "num_attention_heads", source)
    hd = c.get("head_dim")
    if hd is not None and H and D % H == 0 and hd != D // H:
        raise CheckpointError(f"{source}: head_dim={hd!r} differs from hidden_size/num_attention_heads={D // H}: "
                              f"not supported")
    V = _need(c, "vocab_size", source)
    kv = c.get("num_key_value_heads")
    return Config(arch="llama", vocab_size=V, d_model=D, n_layers=_need(c, "num_hidden_layers", source),
                  n_heads=H, n_kv_heads=H if kv is None else _need(c, "num_key_value_heads", source),
                  d_ff=_need(c, "intermediate_size", source),
                  max_seq_len=_need(c, "max_position_embeddings", source),
                  norm_eps=_eps(c, "rms_norm_eps", source, 1e-6),
                  rope_theta=float(theta), rope_interleaved=False,
                  tie_embeddings=_flag(c, "tie_word_embeddings", source, False),
                  bos_token_id=_token_id(c, "bos_token_id", V), eos_token_id=_token_id(c, "eos_token_id", V))


def _bert_config(c: dict, source: str) -> Config:
    _refuse(c, source, "hidden_act", ("gelu",), "activation (BERT here uses the exact erf GELU)")
    _refuse(c, source, "position_embedding_type", ("absolute",), "position embeddings")
    _refuse(c, source, "is_decoder", (False,), "BERT as a decoder")
    _refuse(c, source, "add_cross_attention", (False,), "cross-attention")
    V = _need(c, "vocab_size", source)
    return Config(arch="bert", vocab_size=V, d_model=_need(c, "hidden_size", source),
                  n_layers=_need(c, "num_hidden_layers", source), n_heads=_need(c, "num_attention_heads", source),
                  d_ff=_need(c, "intermediate_size", source),
                  max_seq_len=_need(c, "max_position_embeddings", source),
                  norm_eps=_eps(c, "layer_norm_eps", source, 1e-12),
                  type_vocab_size=_need(c, "type_vocab_size", source) if "type_vocab_size" in c else 2,
                  tie_embeddings=True,
                  bos_token_id=_token_id(c, "bos_token_id", V), eos_token_id=_token_id(c, "eos_token_id", V))


_CONFIGS = {"gpt2": _gpt2_config, "llama": _llama_config, "bert": _bert_config}


def config_from_dict(c: dict, source: str = "config.json") -> Config:
    """Map a transformers config.json dict to a `Config` (clear error for what is unsupported)."""
    if not isinstance(c, dict):
        raise CheckpointError(f"{source}: must be a JSON object")
    mt = c.get("model_type")
    if mt not in _CONFIGS:
        raise CheckpointError(f"{source}: model_type={mt!r} is not supported (supported: {sorted(_CONFIGS)})")
    try:
        cfg = _CONFIGS[mt](c, source)
    except CheckpointError:
        raise
    except ValueError as e:                       # Config's own checks (positive sizes, divisibility, ...)
        raise CheckpointError(f"{source}: {e}") from None
    cfg.extra.update({"source": "hf", "model_type": mt, "architectures": list(c.get("architectures") or [])})
    return cfg


def load_config(path) -> Config:
    """Read `config.json` from an HF model directory (or the file itself)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no config.json in {p}")
    c = _read_json(f)
    g = f.parent / "generation_config.json"
    if isinstance(c, dict) and g.is_file():      # transformers' generate() takes its EOS id(s) from here
        gen = _read_json(g)
        if not isinstance(gen, dict):
            raise CheckpointError(f"{g}: must be a JSON object")
        if gen.get("eos_token_id") is not None:
            c = dict(c, eos_token_id=gen["eos_token_id"])
    return config_from_dict(c, str(f))


def _read_json(f: Path):
    """The JSON value in file `f`; CheckpointError naming it for bad UTF-8 or JSON, an integer of
    more than 4300 digits, or nesting too deep."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e or type(e).__name__})") from None


# --------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------

_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}

# keys that are not parameters of the oracle's model (after prefix stripping)
_DROP = {
    "gpt2": [r"h\.\d+\.attn\.(masked_)?bias"],
    "llama": [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"rotary_emb\.inv_freq"],
    "bert": [r"pooler\..*", r"cls\..*", r"classifier\..*", r"qa_outputs\..*", r"embeddings\.position_ids"],
}


def _weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> shard file name), checked."""
    idx = _read_json(index)
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index}: needs a 'weight_map' object of tensor name -> shard file name")
    return wm


def shard_of_index(f: Path) -> bool:
    """Whether file `f` is a shard named in its directory's model.safetensors.index.json."""
    index = f.parent / "model.safetensors.index.json"
    return f.name != "model.safetensors" and index.is_file() and f.name in set(_weight_map(index).values())


def read_safetensors_dir(d: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        return st.load_file(single)
    if index.is_file():
        wm = _weight_map(index)
        shards: dict[str, set[str]] = {}
        for key, fname in wm.items():
            if not fname or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(f"{index}: tensor {key!r} maps to {fname!r}, which is not a plain file name "
                                      f"in the model directory")
            shards.setdefault(fname, set()).add(key)
        out: dict[str, np.ndarray] = {}
        for fname, keys in sorted(shards.items()):
            t = st.load_file(d / fname)
            extra = sorted(set(t) - keys)
            if extra:
                raise CheckpointError(f"{d / fname}: tensor {extra[0]!r} is not listed for this shard in {index.name}")
            missing = sorted(keys - set(t))
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} should be in shard {fname} but is not")
            out.update(t)
        return out
    if any((d / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CheckpointError(f"{d}: only pytorch_model.bin (a pickle) found; refimpl never unpickles: convert the "
                              f"checkpoint to safetensors first")
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def _widen(name: str, a: np.ndarray, source: str) -> np.ndarray:
    if a.dtype == np.float16:
        return a.astype(np.float32)                     # exact
    if a.dtype in (np.float32, np.float64):
        return a
    raise CheckpointError(f"{source}: tensor {name!r} has dtype {a.dtype}; weights must be floating point")


_LAYER_KEY = {"llama": re.compile(r"layers\.(\d+)\."), "gpt2": re.compile(r"h\.(\d+)\."),
              "bert": re.compile(r"encoder\.layer\.(\d+)\.")}


def _check_layer_count(cfg: Config, params: dict, source: str) -> None:
    """The config's layer count against the layers the tensors hold, before expected_shapes
    lists ~9 names a layer (num_hidden_layers = 10^8 in a 2-layer file: 100 GB of names)."""
    pat = _LAYER_KEY.get(cfg.arch)
    if pat is None:
        return
    found = {int(m.group(1)) for k in params for m in [pat.match(k)] if m}
    n = max(found) + 1 if found else 0
    if cfg.n_layers != n:
        raise CheckpointError(f"{source}: the config's layer count ({cfg.n_layers}) differs from the layers the "
                              f"tensors hold ({n}{', numbered 0..' + str(n - 1) if n else ''})")


def params_from_tensors(cfg: Config, tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Strip the class prefix, drop non-parameters, then require exactly `expected_shapes(cfg)`."""
    prefix = _PREFIX[cfg.arch]
    drop = [re.compile(p) for p in _DROP[cfg.arch]]
    params: dict[str, np.ndarray] = {}
    head = None
    for key, a in tensors.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name == "lm_head.weight" and cfg.arch != "bert":
            if head is not None:
                raise CheckpointError(f"{source}: the LM head appears twice, as {head[0]!r} and {key!r}")
            head = (key, a)
            continue
        if any(p.fullmatch(name) for p in drop):
            continue
        if name in params:
            raise CheckpointError(f"{source}: tensor {name!r} appears both with and without the prefix {prefix!r}")
        params[name] = a
    if head is not None:
        if cfg.tie_embeddings:
            emb = params.get("embed_tokens.weight" if cfg.arch == "llama" else "wte.weight")
            if emb is None or emb.shape != head[1].shape or not np.array_equal(emb, head[1]):
                raise CheckpointError(f"{source}: config says the embeddings are tied but tensor {head[0]!r} differs "
                                      f"from the token embedding table")
        else:
            params["lm_head.weight"] = head[1]
    _check_layer_count(cfg, params, source)
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in params]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (shape {want[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(k for k in params if k not in want)
    if extra:
        more = f", and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} (shape {params[extra[0]].shape}) that the "
                              f"{cfg.arch} model does not use{more}")
    for k, shape in want.items():
        if tuple(params[k].shape) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(params[k].shape)} but the config "
                                  f"implies {tuple(shape)}")
    return {k: _widen(k, params[k], source) for k in want}


def load_hf(path, weights=None) -> tuple[Config, dict[str, np.ndarray]]:
    """An HF model directory -> (Config, params keyed as `expected_shapes`).  `weights`: one
    .safetensors file to read the tensors from (with the directory's config.json) instead of
    the directory's model.safetensors or index."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"HF model directory {d} does not exist")
    cfg = load_config(d)
    cfg.extra["path"] = str(weights or d)
    tensors = st.load_file(weights) if weights is not None else read_safetensors_dir(d)
    return cfg, params_from_tensors(cfg, tensors, str(weights or d))
