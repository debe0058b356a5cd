"""One configuration dataclass for every model the oracle runs.

Parameter names are the checkpoint's own keys, with the model-class prefix
stripped (`transformer.`, `model.`, `bert.`): see `expected_shapes`.
Linear weights keep the checkpoint's layout: (out, in) for torch Linear
(Llama, BERT), (in, out) for GPT-2's Conv1D.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ARCHS = ("gpt2", "llama", "bert", "classic")


def _is_int(v) -> bool:
    """A Python int that is not a bool (True is not a layer count)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_positive(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        v = float(v)
    except OverflowError:             # an int beyond float range
        return False
    return math.isfinite(v) and v > 0


@dataclass
class Config:
    arch: str                    # "gpt2" | "llama" | "bert" | "classic" (Vaswani decoder-only)
    vocab_size: int              # V
    d_model: int                 # D
    n_layers: int                # number of transformer blocks
    n_heads: int                 # H, query heads
    d_ff: int                    # F, feed-forward hidden width
    max_seq_len: int             # context limit (positions table size for learned PE)
    n_kv_heads: int | None = None  # Hkv; None means H (MHA); 1 is MQA; between is GQA
    norm_eps: float = 1e-5       # eps inside the sqrt of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base (llama only)
    rope_interleaved: bool = False  # RoPE pairs: False = half-split (HF), True = (2i, 2i+1) (llama2.c)
    tie_embeddings: bool = True  # LM head reuses the token embedding table
    type_vocab_size: int = 2     # BERT token types
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None   # several: any of them ends generation (Llama 3)
    extra: dict = field(default_factory=dict)  # anything a loader wants to remember (not used by the math)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"config.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "n_kv_heads",
                     "type_vocab_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"config.{name} must be a positive int, got {v!r}")
        if self.bos_token_id is not None and not (_is_int(self.bos_token_id) and self.bos_token_id >= 0):
            raise ValueError(f"config.bos_token_id must be an int >= 0 or None, got {self.bos_token_id!r}")
        eos = self.eos_token_id
        ids = tuple(eos) if isinstance(eos, (list, tuple)) else () if eos is None else (eos,)
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"config.eos_token_id must be an int >= 0, a list of them, or None, got {eos!r}")
        self.eos_token_id = None if not ids else ids[0] if len(ids) == 1 else ids
        for name, why in (("norm_eps", "the norms divide by sqrt(variance + eps), and a constant row has variance 0"),
                          ("rope_theta", "RoPE's frequencies are theta^(-2i/Dh)")):
            v = getattr(self, name)
            if not _finite_positive(v):
                raise ValueError(f"config.{name} must be a finite number > 0 ({why}), got {v!r}")
        for name in ("rope_interleaved", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be True or False, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config.d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.arch != "llama" and self.n_kv_heads != self.n_heads:
            raise ValueError(f"config.n_kv_heads={self.n_kv_heads}: {self.arch} has one key/value head per query "
                             f"head (n_heads={self.n_heads}); grouped key/value heads are Llama's")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head width, got {self.head_dim}")

    # derived facts of the architecture ------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (none, one, or several)."""
        e = self.eos_token_id
        return () if e is None else e if isinstance(e, tuple) else (e,)

    @property
    def head_dim(self) -> int:
        """Dh = D / H."""
        return self.d_model // self.n_heads

    @property
    def causal(self) -> bool:
        """Decoders mask the future; the BERT encoder sees every token."""
        return self.arch != "bert"

    @property
    def norm(self) -> str:
        return "rmsnorm" if self.arch == "llama" else "layernorm"

    @property
    def norm_placement(self) -> str:
        """pre-norm (GPT-2, Llama) or post-norm (BERT, the original Transformer)."""
        return "post" if self.arch in ("bert", "classic") else "pre"

    @property
    def activation(self) -> str:
        return {"gpt2": "gelu_tanh", "llama": "silu", "bert": "gelu_erf", "classic": "relu"}[self.arch]

    @property
    def positions(self) -> str:
        return {"gpt2": "learned", "llama": "rope", "bert": "learned", "classic": "sinusoidal"}[self.arch]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**d)


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter the model reads, by checkpoint key, with its shape."""
    D, F, V, P = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    KV = cfg.n_kv_heads * cfg.head_dim
    s: dict[str, tuple[int, ...]] = {}
    if cfg.arch in ("gpt2", "classic"):
        s["wte.weight"] = (V, D)
        if cfg.arch == "gpt2":
            s["wpe.weight"] = (P, D)
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            s[h + "ln_1.weight"] = (D,); s[h + "ln_1.bias"] = (D,)
            s[h + "attn.c_attn.weight"] = (D, 3 * D); s[h + "attn.c_attn.bias"] = (3 * D,)
            s[h + "attn.c_proj.weight"] = (D, D); s[h + "attn.c_proj.bias"] = (D,)
            s[h + "ln_2.weight"] = (D,); s[h + "ln_2.bias"] = (D,)
            s[h + "mlp.c_fc.weight"] = (D, F); s[h + "mlp.c_fc.bias"] = (F,)
            s[h + "mlp.c_proj.weight"] = (F, D); s[h + "mlp.c_proj.bias"] = (D,)
        if cfg.arch == "gpt2":
            s["ln_f.weight"] = (D,); s["ln_f.bias"] = (D,)
    elif cfg.arch == "llama":
        s["embed_tokens.weight"] = (V, D)
        for i in range(cfg.n_layers):
            h = f"layers.{i}."
            s[h + "input_layernorm.weight"] = (D,)
            s[h + "self_attn.q_proj.weight"] = (D, D)
            s[h + "self_attn.k_proj.weight"] = (KV, D)
            s[h + "self_attn.v_proj.weight"] = (KV, D)
            s[h + "self_attn.o_proj.weight"] = (D, D)
            s[h + "post_attention_layernorm.weight"] = (D,)
            s[h + "mlp.gate_proj.weight"] = (F, D)
            s[h + "mlp.up_proj.weight"] = (F, D)
            s[h + "mlp.down_proj.weight"] = (D, F)
        s["norm.weight"] = (D,)
    elif cfg.arch == "bert":
        e = "embeddings."
        s[e + "word_embeddings.weight"] = (V, D)
        s[e + "position_embeddings.weight"] = (P, D)
        s[e + "token_type_embeddings.weight"] = (cfg.type_vocab_size, D)
        s[e + "LayerNorm.weight"] = (D,); s[e + "LayerNorm.bias"] = (D,)
        for i in range(cfg.n_layers):
            h = f"encoder.layer.{i}."
            for name in ("query", "key", "value"):
                s[h + f"attention.self.{name}.weight"] = (D, D); s[h + f"attention.self.{name}.bias"] = (D,)
            s[h + "attention.output.dense.weight"] = (D, D); s[h + "attention.output.dense.bias"] = (D,)
            s[h + "attention.output.LayerNorm.weight"] = (D,); s[h + "attention.output.LayerNorm.bias"] = (D,)
            s[h + "intermediate.dense.weight"] = (F, D); s[h + "intermediate.dense.bias"] = (F,)
            s[h + "output.dense.weight"] = (D, F); s[h + "output.dense.bias"] = (D,)
            s[h + "output.LayerNorm.weight"] = (D,); s[h + "output.LayerNorm.bias"] = (D,)
    if cfg.arch != "bert" and not cfg.tie_embeddings:
        s["lm_head.weight"] = (V, D)
    return s
