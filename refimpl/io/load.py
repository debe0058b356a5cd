"""`refimpl.load(path)`: a checkpoint on disk -> a runnable `Model`.

    path is a directory          -> Hugging Face layout (config.json + safetensors), see refimpl.io.hf
    path ends in .bin            -> llama2.c checkpoint (v0 or v1), see refimpl.io.llama2c
    path is a .safetensors file  -> that file's tensors, with the config.json beside it
    path is "tiny:ARCH[:SEED]"   -> a built-in tiny random model (no files), see refimpl.oracle.model.tiny_model
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from refimpl.oracle.config import Config


def load_params(path) -> tuple[Config, dict[str, np.ndarray]]:
    """Read a checkpoint: (Config, params keyed as config.expected_shapes)."""
    p = Path(path)
    if p.is_dir():
        from refimpl.io.hf import load_hf
        return load_hf(p)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.name.startswith("pytorch_model") and p.suffix == ".bin":
        raise ValueError(f"checkpoint {p} is a torch pickle; refimpl never unpickles: convert it to safetensors")
    if p.suffix == ".bin":
        from refimpl.io.llama2c import load_llama2c
        return load_llama2c(p)
    if p.name == "model.safetensors.index.json":
        from refimpl.io.hf import load_hf
        return load_hf(p.parent)
    if p.suffix == ".safetensors":                 # this file's tensors, the directory's config.json
        from refimpl.io.hf import load_hf, shard_of_index
        if shard_of_index(p):                      # one shard of a sharded checkpoint: all of them
            return load_hf(p.parent)
        return load_hf(p.parent, weights=p)
    from refimpl.io.pickles import torch_checkpoint_kind, torch_checkpoint_message
    kind = None
    if p.is_file():
        with open(p, "rb") as f:
            kind = torch_checkpoint_kind(f.read(4))
    if kind:                                      # model.pt, model.pth, ...
        raise ValueError(torch_checkpoint_message(kind, f"checkpoint {p}"))
    raise ValueError(f"checkpoint {p}: not a model directory, a llama2.c .bin or a .safetensors file")


def load(path, dtype: str = "float32", backend: str = "numpy"):
    """Load a checkpoint (or "tiny:ARCH[:SEED]") into `refimpl.oracle.model.Model(config, params, dtype, backend)`."""
    if str(path).startswith("tiny:"):
        return _tiny(str(path), dtype, backend)
    from refimpl.oracle.model import Model
    cfg, params = load_params(path)
    return Model(cfg, params, dtype=dtype, backend=backend)


def _tiny(spec: str, dtype: str, backend: str):
    """'tiny:ARCH[:SEED]' -> the built-in tiny model of that architecture and weight seed (default 0)."""
    from refimpl.oracle.config import ARCHS
    from refimpl.oracle.model import tiny_model
    parts = spec.split(":")
    arch = parts[1] if len(parts) > 1 else ""
    if arch not in ARCHS or len(parts) > 3:
        raise ValueError(f"model {spec!r}: expected tiny:ARCH[:SEED] with ARCH one of {', '.join(ARCHS)}")
    seed = parts[2] if len(parts) == 3 else "0"
    if not (seed.isascii() and seed.isdigit()):
        raise ValueError(f"model {spec!r}: the seed must be an integer >= 0")
    return tiny_model(arch, seed=int(seed), dtype=dtype, backend=backend)
