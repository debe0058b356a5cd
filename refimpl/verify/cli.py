"""`refimpl verify | trace | diff | golden | explain`: the verifier's command line.

    refimpl verify mypkg.kernels:my_softmax --op softmax [--examples N] [--json PATH] [--param eps=1e-5]
    refimpl verify --lib ./libmine.so --symbol my_sgemm \\
        --signature "void(float*, const float*, const float*, int, int, int)" --op matmul
    refimpl trace PATH|tiny:ARCH[:SEED] --prompt TEXT --out trace.safetensors
    refimpl diff A.safetensors B.safetensors [--model PATH] [--json PATH]
    refimpl golden --out DIR
    refimpl explain attention [--q JSON --k JSON --v JSON --dk N]
    refimpl explain model [--arch llama --ids 1,2,3 --temperature T --sample-seed S]

Exit status: 0 pass, 1 fail (out of bound / first divergent tensor found; for diff also
inconclusive: a bound too loose to check a tensor), 2 usage error (bad arguments, unloadable target, unparseable signature).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
from pathlib import Path

OPS = ("matmul", "softmax", "attention", "layer_norm", "rms_norm", "gelu_tanh", "silu", "rope")


def _err(cmd: str, msg: str) -> int:
    print(f"refimpl {cmd}: error: {msg}", file=sys.stderr)
    return 2


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _json_safe(x.item())
        except (ValueError, AttributeError):
            return str(x)
    return x


def _write_json(path, obj) -> str | None:
    """Write the report; the error message when it cannot be (None when written)."""
    try:
        Path(path).write_text(json.dumps(_json_safe(obj), indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        return f"--json {path}: {e}"
    return None


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check an implementation of a kernel op against the oracle",
                       description="Check a Python/torch function or a C function in a shared library against the "
                                   "oracle under the contract's error bounds (edge cases + hypothesis). Call "
                                   "conventions: refimpl/verify/check.py (Python), refimpl/verify/cabi.py (C).")
    p.add_argument("target", nargs="?", help="module:function or path/to/file.py:function")
    p.add_argument("--op", required=True, choices=OPS)
    p.add_argument("--lib", help="shared library holding a C implementation")
    p.add_argument("--symbol", help="the C function's name in --lib")
    p.add_argument("--signature",
                   help='its C signature, e.g. "void(float*, const float*, const float*, int, int, int)"')
    p.add_argument("--examples", type=int, default=100, metavar="N", help="hypothesis examples (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default=None)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix an op parameter (eps, theta, interleaved, causal, scale); repeatable")
    p.add_argument("--convert", choices=("auto", "numpy", "torch"), default="auto")
    p.add_argument("--all-masked-rows", action="store_true",
                   help="softmax: also require zeros for rows of only -inf (the oracle's definition)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=run_verify)

    t = sub.add_parser("trace", help="dump the named intermediates of one forward pass to safetensors",
                       description="Trace one forward pass (names and layout: refimpl/verify/TRACE.md).")
    t.add_argument("path", help="checkpoint (HF directory or llama2.c .bin) or tiny:ARCH[:SEED]")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text (tokenized with the checkpoint's tokenizer)")
    g.add_argument("--ids", help="token ids, comma-separated")
    t.add_argument("--out", required=True, help="output .safetensors")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    t.add_argument("--backend", choices=("numpy", "c", "numba"), default="numpy")
    t.set_defaults(func=run_trace)

    d = sub.add_parser("diff", help="name the first tensor where trace B leaves trace A's bound, and the trap",
                       description="Walk two traces in forward order; report the first tensor out of bound and the "
                                   "convention trap that explains it.")
    d.add_argument("a", help="reference trace (e.g. the oracle's)")
    d.add_argument("b", help="candidate trace")
    d.add_argument("--model", help="checkpoint or tiny:ARCH[:SEED] for trap detection (default: from the traces)")
    d.add_argument("--json", metavar="PATH")
    d.set_defaults(func=run_diff)

    o = sub.add_parser("golden", help="write golden vectors (tiny GPT-2, Llama, BERT) for checking a port",
                       description="Write seeded tiny models with float64 expected outputs and token streams.")
    o.add_argument("--out", required=True, metavar="DIR")
    o.set_defaults(func=run_golden)

    e = sub.add_parser("explain", help="teaching mode: walk attention or a tiny model step by step",
                       description="Print each equation, shape and value (exact where rational).")
    esub = e.add_subparsers(dest="what", metavar="WHAT")
    ea = esub.add_parser("attention", help="softmax(Q Kᵀ/√d_k) V on small matrices, exactly")
    ea.add_argument("--q", help="Q as JSON, e.g. '[[1,0],[0,1],[1,1]]' (default: the article's example)")
    ea.add_argument("--k", help="K as JSON")
    ea.add_argument("--v", help="V as JSON")
    ea.add_argument("--dk", help="d_k (default: the width of Q)")
    ea.add_argument("--digits", type=int, default=4)
    ea.set_defaults(func=run_explain_attention)
    em = esub.add_parser("model", help="a tiny model from token ids to the next token")
    em.add_argument("--arch", choices=("gpt2", "llama", "bert", "classic"), default="llama")
    em.add_argument("--ids", default="1,2,3", help="token ids, comma-separated (default 1,2,3)")
    em.add_argument("--seed", type=int, default=0, help="weight seed")
    em.add_argument("--temperature", type=float, default=0.0)
    em.add_argument("--sample-seed", type=int, default=7)
    em.set_defaults(func=run_explain_model)
    e.set_defaults(func=lambda a: (e.print_help(), 2)[1])


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def _parse_value(s: str):
    low = s.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:                                              # nan / inf as floats, so the check names them
        return float(low) if low.lstrip("+-") in ("nan", "inf", "infinity") else ast.literal_eval(s)
    except (ValueError, SyntaxError):                 # "--nan", "abc": a string, named by the check
        return s


def load_target(spec: str):
    """'pkg.mod:func', 'pkg.mod:Class.attr' or 'path/file.py:func' -> the callable."""
    if ":" not in spec:
        raise ValueError(f"target {spec!r} must be module:function (or path/to/file.py:function)")
    mod_part, _, attr = spec.rpartition(":")
    if not mod_part or not attr:
        raise ValueError(f"target {spec!r} must be module:function")
    if mod_part.endswith(".py") or "/" in mod_part:
        path = Path(mod_part)
        if not path.is_file():
            raise ValueError(f"file {mod_part!r} not found")
        # a private module name: a file called random.py or types.py must not replace the stdlib module
        name = "_refimpl_verify_target_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        s = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[name] = mod
        s.loader.exec_module(mod)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")
        try:
            mod = importlib.import_module(mod_part)
        except ImportError as e:
            raise ValueError(f"cannot import module {mod_part!r}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj


def run_verify(args) -> int:
    from rich.console import Console

    from refimpl.cli import check_output_path
    from refimpl.verify.check import check
    params = {}
    for kv in args.param:
        if "=" not in kv:
            return _err("verify", f"--param {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        params[k.strip()] = _parse_value(v)
    if args.examples < 0:
        return _err("verify", f"--examples must be >= 0, got {args.examples}")
    c_args = (args.lib, args.symbol, args.signature)
    if args.target and any(c_args):
        return _err("verify", "give either a Python target (module:function) or --lib/--symbol/--signature, not both")
    try:
        if args.json:
            check_output_path(args.json, "--json")
        if args.target:
            impl = load_target(args.target)
        elif all(c_args):
            from refimpl.verify.cabi import load_c
            impl = load_c(args.lib, args.symbol, args.signature, args.op)
        else:
            return _err("verify", "give a target module:function, or all of --lib, --symbol and --signature")
    except (ValueError, OSError, AttributeError) as e:
        return _err("verify", str(e))
    except Exception as e:  # the user's module failed while importing
        return _err("verify", f"loading {args.target or args.lib}: {type(e).__name__}: {e}")
    def verify_and_report() -> int:
        try:
            report = check(impl, args.op, examples=args.examples, seed=args.seed, dtype=args.dtype,
                           convert=args.convert, all_masked_rows=args.all_masked_rows,
                           name=args.target, **params)      # as the user wrote it, not the private module name
        except (ValueError, TypeError) as e:               # check's own refusals (op, dtype, --param values)
            return _err("verify", str(e))
        failed_write = _write_json(args.json, report.as_dict()) if args.json else None   # first: a closed
        con = Console(width=None if sys.stdout.isatty() else 140)                      # pipe loses no file
        if hasattr(impl, "describe"):
            con.print(f"C convention: {impl.describe()}", markup=False)
        report.render(con)
        if failed_write:
            return _err("verify", failed_write)
        return 0 if report.passed else 1

    if args.target or not hasattr(os, "fork"):
        return verify_and_report()
    return _isolated(verify_and_report, f"{args.symbol} in {args.lib}")


def _isolated(run, what: str) -> int:
    """Run `run()` in a forked child, so a C function that crashes ends the check, not the verifier.
    The child reports its exit code through a pipe before it leaves: a function that calls exit()
    ends the child with no report, and that is a failure, whatever the status it exits with."""
    sys.stdout.flush()
    sys.stderr.flush()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: run the check, flush, leave without unwinding the parent's state
        os.close(done_r)
        code = 2
        try:
            code = run()
        except BrokenPipeError:     # the reader of our output left (`| head`): as refimpl.cli.main
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                os.write(done_w, b"done")
            except BaseException:    # fds the code under test closed: never run the parent's code on
                pass
            finally:
                os._exit(code)
    os.close(done_w)
    _, status = os.waitpid(pid, 0)
    # read after the child is gone, without waiting: a process the function under test started
    # may still hold the pipe's write end (reading to EOF waited for it)
    os.set_blocking(done_r, False)
    try:
        reported = os.read(done_r, 16) == b"done"
    except BlockingIOError:
        reported = False
    finally:
        os.close(done_r)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        print(f"refimpl verify: FAIL: {what} crashed the check with {sig} (an out-of-bounds access or a "
              f"bad pointer; the check ran in a child process)", file=sys.stderr)
        return 1
    if not reported:
        print(f"refimpl verify: FAIL: {what} ended the check's process with exit status {os.WEXITSTATUS(status)} "
              "before the check finished (it called exit(), or the like); the check ran in a child process",
              file=sys.stderr)
        return 1
    return os.WEXITSTATUS(status)


# --------------------------------------------------------------------------
# trace, diff, golden
# --------------------------------------------------------------------------


def _ids_arg(s: str, what="--ids"):
    try:
        ids = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise ValueError(f"{what} is empty")
    return ids


def run_trace(args) -> int:
    from refimpl.cli import check_output_path
    from refimpl.verify.trace import load_model_spec, record, write_trace
    try:
        check_output_path(args.out, "--out")
        model = load_model_spec(args.path, dtype=args.dtype, backend=args.backend)
    except (OSError, ValueError) as e:
        return _err("trace", str(e))
    cfg = model.config
    try:
        if args.ids:
            ids = _ids_arg(args.ids)
        elif args.prompt is not None:
            if args.path.startswith("tiny:"):
                ids = [b % cfg.vocab_size for b in args.prompt.encode("utf-8")]
                print(f"refimpl trace: note: tiny model: ids = UTF-8 bytes mod {cfg.vocab_size}", file=sys.stderr)
            else:
                from refimpl.io.tokenizers import ByteTokenizer, load_tokenizer
                tok = load_tokenizer(args.path, vocab_size=cfg.vocab_size)
                if isinstance(tok, ByteTokenizer):
                    print("refimpl trace: note: no tokenizer found next to the checkpoint; using bytes "
                          "(id = byte value): give --ids for the model's own token ids", file=sys.stderr)
                ids = tok.encode(args.prompt, bos=True)
            if not ids:
                raise ValueError("the prompt encodes to no tokens")
        else:
            raise ValueError("give --prompt TEXT or --ids 1,2,3")
        tensors = record(model, ids)
        write_trace(args.out, tensors, ids, args.dtype, cfg.arch, args.path, cfg.to_dict())
    except (OSError, ValueError, TypeError) as e:
        return _err("trace", str(e))
    print(f"wrote {len(tensors)} tensors ({cfg.arch}, {len(ids)} tokens, {args.dtype}) to {args.out}")
    return 0


def run_diff(args) -> int:
    from rich.console import Console

    from refimpl.cli import check_output_path
    from refimpl.verify.diff import diff
    try:
        if args.json:
            check_output_path(args.json, "--json")
        rep = diff(args.a, args.b, model=args.model)
    except (OSError, ValueError) as e:
        return _err("diff", str(e))
    failed_write = _write_json(args.json, rep.as_dict()) if args.json else None
    rep.render(Console(width=140))
    if failed_write:
        return _err("diff", failed_write)
    return 0 if rep.passed else 1


def run_golden(args) -> int:
    from refimpl.verify.golden import write_golden
    try:
        summary = write_golden(args.out)
    except OSError as e:
        return _err("golden", str(e))
    for arch, info in summary.items():
        extra = f"greedy {info['greedy_tokens']}" if "greedy_tokens" in info else "last hidden state"
        print(f"{args.out}/{arch}: {extra}")
    print(f"see {args.out}/README.md")
    return 0


# --------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------


def _matrix_arg(s, name):
    if s is None:
        return None
    try:
        m = json.loads(s)
    except json.JSONDecodeError:
        raise ValueError(f"--{name} must be a JSON matrix like [[1,0],[0,1]], got {s!r}") from None
    if not isinstance(m, list) or not all(isinstance(r, list) for r in m):
        raise ValueError(f"--{name} must be a list of rows, got {s!r}")
    for r in m:
        for v in r:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise ValueError(f"--{name}: entry {v!r} is not a number")
    return m


def run_explain_attention(args) -> int:
    from fractions import Fraction

    from refimpl.verify.explain import explain_attention
    try:
        q, k, v = (_matrix_arg(args.q, "q"), _matrix_arg(args.k, "k"), _matrix_arg(args.v, "v"))
        dk = Fraction(args.dk) if args.dk is not None else None
        explain_attention(q, k, v, dk, digits=args.digits)
    except (ValueError, ZeroDivisionError) as e:
        return _err("explain", str(e))
    return 0


def run_explain_model(args) -> int:
    from refimpl.verify.explain import explain_model
    try:
        explain_model(args.arch, _ids_arg(args.ids), seed=args.seed, temperature=args.temperature,
                      sample_seed=args.sample_seed)
    except (ValueError, TypeError) as e:
        return _err("explain", str(e))
    return 0
