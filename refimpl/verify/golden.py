"""`refimpl golden --out DIR`: golden vectors so a port checks itself without Python.

Writes, for each of three seeded tiny models (GPT-2; Llama with GQA, untied
LM head; BERT), a Hugging Face style directory that `refimpl.load(DIR/arch)`
and `transformers` read, plus the expected outputs:

    DIR/README.md                 what every file is and how to compare
    DIR/<arch>/config.json        HF config (model_type gpt2 | llama | bert)
    DIR/<arch>/model.safetensors  float32 weights, HF tensor names
    DIR/<arch>/golden.safetensors float64 expected outputs (see README)
    DIR/<arch>/trace.safetensors  float64 trace of the prompt's forward pass (refimpl/verify/TRACE.md)
    DIR/<arch>/golden.json        the same ids, token streams and settings, readable

The expected outputs are the oracle in float64 on the float32 weights
(widened exactly), so they are the exact-math answer for those weights to
~1e-15, and the same file serves a float32 or a float64 port.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PROMPT = [3, 14, 15, 92, 65, 35]
N_NEW = 12
SAMPLING = {"temperature": 0.8, "top_k": None, "top_p": 0.95, "seed": 1234}
MODELS = {"gpt2": 11, "llama": 12, "bert": 13}      # arch -> weight seed


def hf_config(cfg) -> dict:
    """A transformers config.json dict for a refimpl Config (gpt2, llama, bert)."""
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": True,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    if cfg.arch == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
                "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False}
    if cfg.arch == "bert":
        return {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": cfg.vocab_size,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
                "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": cfg.norm_eps,
                "type_vocab_size": cfg.type_vocab_size, "hidden_act": "gelu",
                "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0}
    raise ValueError(f"no HF layout for arch {cfg.arch!r}")


_PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}


def hf_tensors(cfg, params) -> dict[str, np.ndarray]:
    """params keyed as expected_shapes -> HF tensor names, float32."""
    out = {}
    for k, v in params.items():
        name = k if k == "lm_head.weight" else _PREFIX[cfg.arch] + k
        out[name] = np.asarray(v, dtype=np.float32)
    return out


def _margins(logits_list) -> list[float]:
    """Per step: largest logit minus the second largest (how safe the greedy choice is)."""
    out = []
    for z in logits_list:
        s = np.sort(np.asarray(z, dtype=np.float64))
        out.append(float(s[-1] - s[-2]) if s.size > 1 else float("inf"))
    return out


def write_model(out_dir: Path, arch: str, seed: int) -> dict:
    """One golden model directory; returns a summary."""
    from refimpl.io.load import load
    from refimpl.io.safetensors import save_file
    from refimpl.oracle.model import random_params, tiny_config
    from refimpl.verify.trace import record, write_trace

    d = out_dir / arch
    d.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch)
    params = random_params(cfg, seed)
    (d / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n", encoding="utf-8")
    save_file(hf_tensors(cfg, params), d / "model.safetensors", {"format": "pt"})
    model = load(d, dtype="float64")                     # read back through the loader: what a user gets
    ids = np.array(PROMPT, dtype=np.int64)
    gold: dict[str, np.ndarray] = {"input_ids": ids}
    info = {"arch": arch, "weight_seed": seed, "input_ids": PROMPT, "dtype_of_expected_outputs": "float64",
            "config": hf_config(cfg)}
    if arch == "bert":
        gold["last_hidden_state"] = model.forward(ids)
    else:
        gold["logits"] = model.forward(ids)
        g = model.generate(ids, N_NEW, temperature=0.0, return_logits=True)
        s = model.generate(ids, N_NEW, temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"],
                           top_p=SAMPLING["top_p"], seed=SAMPLING["seed"])
        gold["greedy_tokens"] = np.array(g.tokens, dtype=np.int64)
        gold["greedy_step_logits"] = np.stack(g.logits)
        gold["sampled_tokens"] = np.array(s.tokens, dtype=np.int64)
        info.update({"max_new_tokens": N_NEW, "greedy_tokens": g.tokens,
                     "greedy_top2_margins": _margins(g.logits),
                     "sampling": SAMPLING, "sampled_tokens": s.tokens})
    save_file(gold, d / "golden.safetensors", {"format": "refimpl-golden", "version": "1"})
    tr = record(model, ids)
    write_trace(d / "trace.safetensors", tr, ids, "float64", arch, ".", model.config.to_dict())  # "." = this directory
    (d / "golden.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


README = """# refimpl golden vectors

Seeded tiny models with their exact-math outputs, for checking a port (C,
Rust, GPU, ...) without Python.  Written by `refimpl golden --out DIR`.

| directory | model | notes |
|---|---|---|
| `gpt2/`  | GPT-2: learned positions, pre-LayerNorm, tanh GELU (`gelu_new`), tied LM head | Conv1D weights are (in, out) |
| `llama/` | Llama: RMSNorm, RoPE **half-split** (HF convention: pairs (i, i+Dh/2)), SwiGLU, GQA (4 query heads, 2 kv heads), untied `lm_head` | |
| `bert/`  | BERT encoder: post-LayerNorm, exact erf GELU, token type 0 for every token | output = last hidden state |

Sizes: vocab 97, width 32, 2 layers, 4 heads (head width 8), context 64.

## Files in each directory

* `config.json`, `model.safetensors` — a Hugging Face model directory
  (float32 weights, HF tensor names); `refimpl.load(dir)` and
  `transformers` `from_pretrained(dir)` read it.
* `golden.safetensors` — expected outputs, **float64**:
  * `input_ids` (int64 [T]) — the prompt, T = {T};
  * `logits` (float64 [T, V]) — one forward pass over the prompt, no cache (decoders);
  * `last_hidden_state` (float64 [T, D]) — BERT only;
  * `greedy_tokens` (int64 [{N}]) — greedy continuation (temperature 0);
  * `greedy_step_logits` (float64 [{N}, V]) — the logits each greedy token was chosen from;
  * `sampled_tokens` (int64 [{N}]) — sampled continuation, settings below.
* `golden.json` — the ids, streams and sampling settings as JSON, and
  `greedy_top2_margins`: per greedy step, the gap between the two largest logits.
* `trace.safetensors` — every intermediate of the prompt's forward pass
  (float64), named as in refimpl's TRACE.md (`embed`, `layers.{{i}}.q`, ...,
  `logits`); write the same file from your port and run
  `refimpl diff trace.safetensors yours.safetensors` to find the first layer
  that differs and the likely convention trap.

The expected values are the oracle computed in float64 on the float32 weights
(widened exactly): the exact answer for those weights to about 1e-15.

## How to compare

* logits / hidden states: elementwise |yours − golden| ≤ 2 γ(n) · max|golden|
  with γ(n) = n u / (1 − n u), u = 2⁻²⁴ for a float32 port (2⁻⁵³ float64) and
  n = (layers + 2) · (D + F + T) — the bound `refimpl diff` uses.  For these
  models and a float32 port that is about 5e-5 · max|golden|.
* greedy tokens: must match exactly while your logit error is below half of
  `greedy_top2_margins` at each step (otherwise a tie-break may legitimately
  differ; argmax ties go to the lowest id).
* sampled tokens: must match exactly when you implement refimpl's documented
  rule: the xorshift64* generator seeded with `seed`, temperature, top-p,
  ordering by (probability descending, id ascending), one draw per token
  (see `refimpl/oracle/sampling.py`, module docstring).  Settings:
  temperature {temperature}, top_k {top_k}, top_p {top_p}, seed {seed}.
  A float32 port can differ where a draw falls within its rounding error of a
  cumulative-probability boundary (rare).
"""


def write_golden(out) -> dict:
    """Write every golden model and the README into directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {arch: write_model(out, arch, seed) for arch, seed in MODELS.items()}
    (out / "README.md").write_text(README.format(T=len(PROMPT), N=N_NEW, **{k: v for k, v in SAMPLING.items()}),
                                   encoding="utf-8")
    return summary
