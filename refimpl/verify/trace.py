"""Traces: the named intermediates of one forward pass, in a safetensors file.

    refimpl trace PATH --prompt TEXT --out trace.safetensors     (PATH: checkpoint, or tiny:ARCH[:SEED])
    tensors, info = read_trace("trace.safetensors")             # {name: array} in forward order, metadata

The file format (so a port in any language can write one; see TRACE.md)
-----------------------------------------------------------------------
A plain safetensors file.  One tensor per trace point, stored in the dtype
the port computes in (F32 or F64; F16/BF16 allowed), row-major, batch-free:

    embed                     [T, D]      input encoding (token + position embeddings; BERT: after its LN)
    layers.{i}.attn_norm      [T, D]      normalised input of attention (post-norm models: the block input)
    layers.{i}.q              [H, T, Dh]  queries after RoPE (Llama), heads split
    layers.{i}.k              [Hkv, T, Dh] keys after RoPE, this call's tokens only (not the cache)
    layers.{i}.v              [Hkv, T, Dh] values
    layers.{i}.attn_probs     [H, T, S]   softmax(q kᵀ / √Dh + mask), optional
    layers.{i}.attn_out       [T, D]      attention output after the output projection (+ bias)
    layers.{i}.resid_attn     [T, D]      residual stream after attention (post-norm: after its LN)
    layers.{i}.ffn_norm       [T, D]      normalised input of the FFN (post-norm: = resid_attn)
    layers.{i}.ffn_hidden     [T, F]      after the activation (Llama: silu(gate) * up)
    layers.{i}.ffn_out        [T, D]      FFN output after the down projection (+ bias)
    layers.{i}.resid_ffn      [T, D]      residual stream after the FFN (post-norm: after its LN)
    final_norm                [T, D]      final normalisation (BERT/classic: the last hidden state)
    logits                    [T, V]      decoders only

i counts from 0.  T = tokens of this call, S = keys seen (T without a
cache), D = model width, H / Hkv = query / key-value heads, Dh = D / H,
F = FFN width, V = vocabulary.  A port may leave out any tensor (diff
compares the names both files have) but must use these names and shapes.

`__metadata__` (all values are strings):
    format  "refimpl-trace"       version  "1"
    order   the tensor names in forward order, comma-separated (required:
            safetensors does not keep an order)
    ids     the input token ids, comma-separated
    dtype   the compute dtype ("float32" | "float64" | "float16" | "bfloat16")
    arch, model (optional): the architecture and where the weights came from
            ("tiny:llama", "tiny:llama:3" or a checkpoint path, as given), used by `refimpl diff` to
            recompute a layer when it looks for convention traps
    config  (optional) the refimpl Config as JSON
"""
from __future__ import annotations

import json

import numpy as np

FORMAT = "refimpl-trace"
VERSION = "1"
COMPUTE_DTYPES = ("float32", "float64", "float16", "bfloat16")   # the metadata's dtype values
LAYER_POINTS = ("attn_norm", "q", "k", "v", "attn_probs", "attn_out", "resid_attn", "ffn_norm", "ffn_hidden",
                "ffn_out", "resid_ffn")


def trace_names(n_layers: int, with_logits: bool = True, with_probs: bool = True) -> list[str]:
    """The trace point names of an n_layers model, in forward order."""
    names = ["embed"]
    for i in range(n_layers):
        names += [f"layers.{i}.{p}" for p in LAYER_POINTS if with_probs or p != "attn_probs"]
    names.append("final_norm")
    if with_logits:
        names.append("logits")
    return names


def load_model_spec(spec: str, dtype: str = "float64", backend: str = "numpy"):
    """'tiny:ARCH[:SEED]' -> a built-in tiny model; anything else -> refimpl.load(spec) (float64 by default)."""
    from refimpl.io.load import load
    return load(spec, dtype=dtype, backend=backend)


def record(model, ids) -> dict[str, np.ndarray]:
    """Run model.forward(ids) and return {name: copy} in forward order."""
    out: dict[str, np.ndarray] = {}

    def tr(name, x):
        if name in out:
            raise ValueError(f"trace point {name!r} reported twice")
        out[name] = np.array(x, copy=True)
    model.forward(np.asarray(ids, dtype=np.int64), trace=tr)
    return out


def _dtype_name(dtype) -> str:
    """'float32' for "float32", np.float32 or np.dtype('float32'); ValueError naming `dtype` otherwise."""
    if isinstance(dtype, str) and dtype in COMPUTE_DTYPES:
        return dtype                      # "bfloat16" without ml_dtypes: numpy does not know it
    try:
        name = np.dtype(dtype).name if dtype is not None else None     # np.dtype(None) is float64
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)} (or the numpy type), got {dtype!r}")
    return name


def write_trace(path, tensors: dict[str, np.ndarray], ids, dtype: str, arch: str = "", model: str = "",
                config: dict | None = None) -> None:
    """Save tensors (in forward order) with the metadata described in the module docstring."""
    from refimpl.io.safetensors import save_file
    dtype = _dtype_name(dtype)
    for n in tensors:
        if "," in n:
            raise ValueError(f"trace name {n!r} contains a comma")
    meta = {"format": FORMAT, "version": VERSION, "order": ",".join(tensors),
            "ids": ",".join(str(int(i)) for i in ids), "dtype": dtype}
    if arch:
        meta["arch"] = arch
    if model:
        meta["model"] = model
    if config is not None:
        meta["config"] = json.dumps(config, default=str)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, meta)


def read_trace(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array} in forward order, metadata); ValueError naming the file if it is not a trace."""
    tensors, meta, _ = read_trace_with_dtypes(path)
    return tensors, meta


def read_trace_with_dtypes(path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """read_trace, plus {name: safetensors dtype as stored} (a BF16 tensor is read as float32)."""
    from refimpl.io.safetensors import load_with_dtypes
    tensors, meta, stored = load_with_dtypes(path)
    meta = meta or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a refimpl trace (__metadata__.format is {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: trace version {meta.get('version')!r} not supported (expected {VERSION!r})")
    order = [n for n in meta.get("order", "").split(",") if n]
    missing = [n for n in order if n not in tensors]
    if missing:
        raise ValueError(f"{path}: __metadata__.order names {missing[0]!r}, which is not in the file")
    unlisted = sorted(set(tensors) - set(order))
    if unlisted:
        raise ValueError(f"{path}: tensor {unlisted[0]!r} is not listed in __metadata__.order")
    return {n: tensors[n] for n in order}, meta, stored


def trace_to_file(spec: str, ids, out, dtype: str = "float64", backend: str = "numpy") -> dict[str, np.ndarray]:
    """Load the model named by `spec`, trace one forward pass over `ids`, write `out`."""
    model = load_model_spec(spec, dtype=dtype, backend=backend)
    tensors = record(model, ids)
    write_trace(out, tensors, ids, dtype, model.config.arch, spec, model.config.to_dict())
    return tensors
