"""llama2.c checkpoints (Karpathy's `run.c` / `export.py`): read and write.

Header (little-endian):
  v0 ("legacy"): 7 int32  dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
                 vocab_size < 0 means the classifier is not shared with the embedding.
  v1:            uint32 magic 0x616b3432 ("ak42"), int32 version = 1, the same 7 int32
                 (vocab_size positive), uint8 shared_classifier, zero-padded to 256 bytes.
  (v2 is llama2.c's int8-quantised format: refused.)

float32 weights, each matrix row-major (out, in) as torch Linear stores it
(D = dim, F = hidden_dim, L = n_layers, V = vocab, Dh = D / n_heads,
KV = n_kv_heads * Dh, P = seq_len):
  v0: embedding (V,D); rms_att (L,D); wq (L,D,D); wk (L,KV,D); wv (L,KV,D); wo (L,D,D);
      rms_ffn (L,D); w1 (L,F,D); w2 (L,D,F); w3 (L,F,D); rms_final (D,);
      two skipped RoPE tables of P*Dh/2 floats each; [wcls (V,D) when unshared]
  v1: rms_att (L,D); rms_ffn (L,D); rms_final (D,); embedding (V,D); wq; wk; wv; wo;
      w1; w2; w3; [wcls (V,D) when unshared]          (export.py `version1_export`)
The exact file size follows from the header and is required.

Mapping to the Llama params of `refimpl.oracle.config.expected_shapes`:
  embedding -> embed_tokens.weight, rms_att -> input_layernorm, rms_ffn ->
  post_attention_layernorm, wq/wk/wv/wo -> q/k/v/o_proj, w1 -> mlp.gate_proj,
  w3 -> mlp.up_proj, w2 -> mlp.down_proj, rms_final -> norm, wcls -> lm_head.
RoPE convention: llama2.c rotates interleaved pairs (x[2i], x[2i+1]) and its
wq/wk are stored for that convention, so they are kept as they are and the
Config says `rope_interleaved=True`.  run.c hard-codes theta = 10000 and
RMSNorm eps = 1e-5; the Config says so.

The writer `save_llama2c` takes Llama params in either convention: with
`config.rope_interleaved=False` (HF's half-split layout) it un-permutes the
rows of wq and wk to the interleaved order first, as llama2.c's export.py
does (`permute_reverse`), so the written file computes the same function.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from refimpl.io.pickles import torch_checkpoint_kind, torch_checkpoint_message
from refimpl.io.safetensors import read_rest
from refimpl.oracle.config import Config, expected_shapes

MAGIC = 0x616B3432            # "ak42"
V1_HEADER_BYTES = 256
LLAMA2C_NORM_EPS = 1e-5
LLAMA2C_ROPE_THETA = 10000.0


class Llama2cError(ValueError):
    """A llama2.c checkpoint that does not match its own header."""


def _layout(c: Config, version: int, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 block in file order; name None = skipped RoPE table."""
    D, F, L, V, P = c.d_model, c.d_ff, c.n_layers, c.vocab_size, c.max_seq_len
    KV = c.n_kv_heads * c.head_dim
    blocks = {"embedding": (V, D), "rms_att": (L, D), "wq": (L, D, D), "wk": (L, KV, D), "wv": (L, KV, D),
              "wo": (L, D, D), "rms_ffn": (L, D), "w1": (L, F, D), "w2": (L, D, F), "w3": (L, F, D),
              "rms_final": (D,), "rope_real": (P, c.head_dim // 2), "rope_imag": (P, c.head_dim // 2),
              "wcls": (V, D)}
    if version == 0:
        order = ["embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final",
                 "rope_real", "rope_imag"]
    else:
        order = ["rms_att", "rms_ffn", "rms_final", "embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not shared:
        order.append("wcls")
    return [(n, blocks[n]) for n in order]


def _header_size(version: int) -> int:
    return 7 * 4 if version == 0 else V1_HEADER_BYTES


def expected_file_size(c: Config, version: int, shared: bool) -> int:
    """Header bytes + 4 bytes per float of every block (Python ints)."""
    n = sum(math.prod(s) for _, s in _layout(c, version, shared))      # Python ints: no int64 wrap
    return _header_size(version) + 4 * n


def _config(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, shared, source, version) -> Config:
    vals = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                vocab_size=vocab, seq_len=seq_len)
    for k, v in vals.items():
        if v <= 0:
            raise Llama2cError(f"llama2.c checkpoint {source}: header field {k} = {v} must be positive")
    try:
        return Config(arch="llama", vocab_size=vocab, d_model=dim, n_layers=n_layers, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, d_ff=hidden, max_seq_len=seq_len, norm_eps=LLAMA2C_NORM_EPS,
                      rope_theta=LLAMA2C_ROPE_THETA, rope_interleaved=True, tie_embeddings=shared,
                      bos_token_id=1 if vocab > 1 else None, eos_token_id=2 if vocab > 2 else None,
                      extra={"source": "llama2c", "llama2c_version": version})
    except ValueError as e:
        raise Llama2cError(f"llama2.c checkpoint {source}: header {vals}: {e}") from None


def read_llama2c_header(data: bytes, source: str) -> tuple[Config, int, bool, int]:
    """(config, version, shared_classifier, header_bytes) from the start of a .bin file."""
    kind = torch_checkpoint_kind(data)
    if kind:
        raise Llama2cError(torch_checkpoint_message(kind, source))
    if len(data) < 28:
        raise Llama2cError(f"llama2.c checkpoint {source}: {len(data)} bytes is too short for a header (28 bytes)")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic == MAGIC:
        if len(data) < V1_HEADER_BYTES:
            raise Llama2cError(f"llama2.c checkpoint {source}: {len(data)} bytes is too short for the "
                               f"{V1_HEADER_BYTES}-byte v1 header")
        (version,) = struct.unpack_from("<i", data, 4)
        if version != 1:
            raise Llama2cError(f"llama2.c checkpoint {source}: version {version} is not supported "
                               f"(v0 and v1 float32 only; v2 is llama2.c's int8 format)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 8)
        (flag,) = struct.unpack_from("<B", data, 36)
        if flag not in (0, 1):
            raise Llama2cError(f"llama2.c checkpoint {source}: shared_classifier flag is {flag}, expected 0 or 1")
        shared = bool(flag)
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", data, 0)
        shared = vocab > 0
        vocab = abs(vocab)
    cfg = _config(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, source, version)
    return cfg, version, shared, _header_size(version)


def load_llama2c(path) -> tuple[Config, dict[str, np.ndarray]]:
    """Read a llama2.c .bin (v0 or v1) -> (Config, Llama params), weights float32."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {p} does not exist")
    size = p.stat().st_size
    with open(p, "rb") as f:                     # the header, checked against the file's size before the body
        data = f.read(V1_HEADER_BYTES)
        cfg, version, shared, hdr = read_llama2c_header(data, str(p))
        want = expected_file_size(cfg, version, shared)
        if size == want:
            data = read_rest(f, data, size)
    if size != want or len(data) != want:
        raise Llama2cError(f"llama2.c checkpoint {p}: file is {size} bytes but its v{version} header "
                           f"(dim={cfg.d_model}, hidden_dim={cfg.d_ff}, n_layers={cfg.n_layers}, "
                           f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, vocab_size={cfg.vocab_size}, "
                           f"seq_len={cfg.max_seq_len}, shared_classifier={shared}) implies {want} bytes")
    cfg.extra["path"] = str(p)
    blocks: dict[str, np.ndarray] = {}
    off = hdr
    for name, shape in _layout(cfg, version, shared):
        n = math.prod(shape)
        blocks[name] = np.frombuffer(data, dtype="<f4", count=n, offset=off).astype(np.float32).reshape(shape)
        off += 4 * n
    params = {"embed_tokens.weight": blocks["embedding"], "norm.weight": blocks["rms_final"]}
    for i in range(cfg.n_layers):
        h = f"layers.{i}."
        params[h + "input_layernorm.weight"] = blocks["rms_att"][i]
        params[h + "self_attn.q_proj.weight"] = blocks["wq"][i]
        params[h + "self_attn.k_proj.weight"] = blocks["wk"][i]
        params[h + "self_attn.v_proj.weight"] = blocks["wv"][i]
        params[h + "self_attn.o_proj.weight"] = blocks["wo"][i]
        params[h + "post_attention_layernorm.weight"] = blocks["rms_ffn"][i]
        params[h + "mlp.gate_proj.weight"] = blocks["w1"][i]
        params[h + "mlp.down_proj.weight"] = blocks["w2"][i]
        params[h + "mlp.up_proj.weight"] = blocks["w3"][i]
    if not shared:
        params["lm_head.weight"] = blocks["wcls"]
    return cfg, {k: np.ascontiguousarray(params[k]) for k in expected_shapes(cfg)}


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def half_split_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n*Dh, In] -> [n*Dh, In]
    """Reorder the rows of a q/k projection from HF's half-split RoPE layout to interleaved pairs.

    Within each head, HF row i (i < Dh/2) pairs with row i + Dh/2; interleaved
    layout puts them at rows 2i and 2i+1 (llama2.c export.py `permute_reverse`).
    """
    out_dim, in_dim = w.shape
    Dh = out_dim // n_heads
    return w.reshape(n_heads, 2, Dh // 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:  # [n*Dh, In] -> [n*Dh, In]
    """Inverse of `half_split_to_interleaved` (HF convert script's `permute`)."""
    out_dim, in_dim = w.shape
    Dh = out_dim // n_heads
    return w.reshape(n_heads, Dh // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _rope_tables(c: Config) -> tuple[np.ndarray, np.ndarray]:
    """The (unused by run.c) freq_cis tables export.py writes: cos, sin of p * theta^(-2i/Dh)."""
    Dh = c.head_dim
    inv = LLAMA2C_ROPE_THETA ** (-np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    a = np.arange(c.max_seq_len, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(a), np.sin(a)


def save_llama2c(path, config: Config, params: dict[str, np.ndarray], version: int = 0) -> None:
    """Write Llama params as a llama2.c checkpoint (v0 or v1), float32.

    Refuses what the format cannot say: a non-Llama config, RoPE theta other
    than 10000 or norm eps other than 1e-5 (run.c hard-codes both).  When the
    params use HF's half-split RoPE (config.rope_interleaved False) the rows of
    wq/wk are reordered to the interleaved convention llama2.c uses.
    """
    c = config
    if c.arch != "llama":
        raise ValueError(f"save_llama2c: only Llama models fit the llama2.c format, got arch={c.arch!r}")
    if version not in (0, 1):
        raise ValueError(f"save_llama2c: version must be 0 or 1, got {version!r}")
    if c.rope_theta != LLAMA2C_ROPE_THETA:
        raise ValueError(f"save_llama2c: rope_theta={c.rope_theta} but llama2.c hard-codes {LLAMA2C_ROPE_THETA}")
    if c.norm_eps != LLAMA2C_NORM_EPS:
        raise ValueError(f"save_llama2c: norm_eps={c.norm_eps} but llama2.c hard-codes {LLAMA2C_NORM_EPS}")
    want = expected_shapes(c)
    for k, shape in want.items():
        if k not in params:
            raise ValueError(f"save_llama2c: missing tensor {k!r}")
        if tuple(np.shape(params[k])) != shape:
            raise ValueError(f"save_llama2c: tensor {k!r} has shape {np.shape(params[k])}, config says {shape}")
    extra = sorted(set(params) - set(want))
    if extra:
        raise ValueError(f"save_llama2c: unexpected tensor {extra[0]!r}")

    def P(k):
        return np.asarray(params[k], dtype=np.float64)

    def layers(key, fix=None):
        return np.stack([(fix or (lambda w: w))(P(f"layers.{i}.{key}")) for i in range(c.n_layers)])

    qfix = kfix = None
    if not c.rope_interleaved:
        qfix = lambda w: half_split_to_interleaved(w, c.n_heads)          # noqa: E731
        kfix = lambda w: half_split_to_interleaved(w, c.n_kv_heads)       # noqa: E731
    cos, sin = _rope_tables(c)
    shared = c.tie_embeddings
    blocks = {"embedding": P("embed_tokens.weight"), "rms_att": layers("input_layernorm.weight"),
              "wq": layers("self_attn.q_proj.weight", qfix), "wk": layers("self_attn.k_proj.weight", kfix),
              "wv": layers("self_attn.v_proj.weight"), "wo": layers("self_attn.o_proj.weight"),
              "rms_ffn": layers("post_attention_layernorm.weight"), "w1": layers("mlp.gate_proj.weight"),
              "w2": layers("mlp.down_proj.weight"), "w3": layers("mlp.up_proj.weight"),
              "rms_final": P("norm.weight"), "rope_real": cos, "rope_imag": sin,
              "wcls": None if shared else P("lm_head.weight")}
    dims = (c.d_model, c.d_ff, c.n_layers, c.n_heads, c.n_kv_heads)
    if version == 0:
        head = struct.pack("<7i", *dims, c.vocab_size if shared else -c.vocab_size, c.max_seq_len)
    else:
        head = struct.pack("<Ii7iB", MAGIC, 1, *dims, c.vocab_size, c.max_seq_len, int(shared))
        head += b"\0" * (V1_HEADER_BYTES - len(head))
    parts = [head]
    for name, shape in _layout(c, version, shared):
        parts.append(np.ascontiguousarray(blocks[name], dtype="<f4").reshape(shape).tobytes())
    data = b"".join(parts)
    assert len(data) == expected_file_size(c, version, shared)
    Path(path).write_bytes(data)
