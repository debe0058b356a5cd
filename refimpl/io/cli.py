"""`refimpl generate PATH --prompt TEXT`: load a checkpoint, tokenize, decode, print.

PATH may be `tiny:ARCH[:SEED]`, a built-in tiny random model (no download; bytes
tokenizer, so the prompt's bytes must fall in its small vocabulary).

The text (prompt + continuation) goes to stdout; the statistics line
(tokens, tokens/s) goes to stderr.  Generation stops at the model's EOS token
and, for llama2.c checkpoints, also at BOS (as run.c does).  Bad input (a prompt longer than the
context, token ids outside the vocabulary, a broken checkpoint) prints one
clear line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (HF directory or llama2.c .bin)",
                       description=__doc__.splitlines()[0])
    p.add_argument("path", help="HF model directory (config.json + model.safetensors), llama2.c .bin, "
                                "or tiny:ARCH[:SEED] (a built-in tiny model)")
    p.add_argument("--prompt", default="", help="prompt text (default: empty, which starts from the model's BOS "
                                                "token; a model without one, e.g. GPT-2 or tiny:ARCH, needs --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="new tokens at most (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--backend", choices=("numpy", "c", "numba"), default="numpy")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a tokenizer file: *.json (HF tokenizer.json) or a llama2.c tokenizer.bin (any name); "
                        "default: found next to the checkpoint, else bytes")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"refimpl generate: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from refimpl.io.load import load
    from refimpl.io.tokenizers import ByteTokenizer, load_tokenizer, load_tokenizer_file

    if args.max_new_tokens < 0:
        return _fail(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        return _fail(f"--temperature must be >= 0, got {args.temperature}")
    try:
        model = load(args.path, dtype=args.dtype, backend=args.backend)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    except (KeyError, ImportError) as e:             # the kernel registry: backend not built / not installed
        return _fail(f"backend {args.backend!r} is not available: {e.args[0] if e.args else e}")
    cfg = model.config
    if cfg.arch == "bert":
        return _fail(f"{args.path} is a BERT encoder: it does not generate text")
    try:
        if args.tokenizer:                            # the user's file: load it or say why not
            tok = load_tokenizer_file(args.tokenizer, vocab_size=cfg.vocab_size)
        elif args.path.startswith("tiny:"):          # no files: never pick up a tokenizer in the cwd
            tok = ByteTokenizer()
        else:
            tok = load_tokenizer(args.path, vocab_size=cfg.vocab_size)
    except (OSError, ValueError, ImportError) as e:
        return _fail(str(e))
    if isinstance(tok, ByteTokenizer):
        where = "a tiny model" if args.path.startswith("tiny:") else "no tokenizer found next to the checkpoint"
        if cfg.vocab_size > 256:                     # its ids >= 256 would have no byte to print
            return _fail(f"{where}, and the model's vocabulary ({cfg.vocab_size} ids) is larger than the 256 "
                         "byte values: give --tokenizer")
        print(f"refimpl generate: note: {where}; using bytes (id = byte value)", file=sys.stderr)
    try:
        ids = tok.encode(args.prompt, bos=True)
    except ValueError as e:                          # the text has no encoding in this tokenizer
        return _fail(str(e))
    if not ids:
        if cfg.bos_token_id is None:
            return _fail("empty prompt and the model has no BOS token: give --prompt")
        ids = [cfg.bos_token_id]
    if len(ids) > cfg.max_seq_len:
        return _fail(f"the prompt is {len(ids)} tokens, longer than the context limit max_seq_len = "
                     f"{cfg.max_seq_len} of {args.path}")
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
        return _fail(f"the prompt encodes to token id {bad[0]}, outside the model's vocabulary 0..{cfg.vocab_size - 1}"
                     f" ({tok.name} tokenizer)")
    stop = set(cfg.eos_token_ids)
    if cfg.extra.get("source") == "llama2c" and cfg.bos_token_id is not None:
        stop.add(cfg.bos_token_id)                    # run.c: a sampled BOS (id 1) ends the sequence
    try:
        gen = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stop=stop)
    except ValueError as e:
        return _fail(str(e))
    print(tok.decode(list(ids) + list(gen.tokens)))
    n = len(gen.tokens)
    rate = gen.tokens_per_second
    print(f"{len(ids)} prompt tokens in {gen.prefill_seconds:.3f} s; {n} new tokens, "
          f"{rate:.1f} tokens/s (decode, {args.dtype}, backend {args.backend}); stopped: {gen.stopped}",
          file=sys.stderr)
    return 0
