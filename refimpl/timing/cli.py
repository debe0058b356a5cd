"""`refimpl bench` and `refimpl profile` subcommands."""
from __future__ import annotations

import argparse
import sys


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers) -> None:
    from refimpl.timing.bench import ALL_BACKENDS
    from refimpl.timing.metrics import SHAPE_DIMS
    b = subparsers.add_parser(
        "bench", help="verify every kernel against the oracle, then time them in cycles",
        description="Verify every kernel x backend against the float64 oracle (error bounds from "
                    "refimpl.kernels.contracts), then time them single-threaded with the fenced TSC "
                    "and print ticks, estimated core cycles, FLOP/cycle, % of peak, roofline and ratios "
                    "against numpy and torch.  `refimpl bench compare OLD.json NEW.json` compares two runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--ops", type=_csv, default=None,
                   help=f"comma-separated ops (default: all): {','.join(SHAPE_DIMS)}")
    b.add_argument("--backends", type=_csv, default=None,
                   help=f"comma-separated backends (default: all available): {','.join(ALL_BACKENDS)}")
    b.add_argument("--shapes", default=None,
                   help="op:AxB..[,op:..] e.g. matmul:256x256x256,attention:8x2x128x128x64c "
                        "(matmul MxKxN, softmax RxN, attention HxHkvxLqxLkxD[c=causal], norms and "
                        "activations TxD, rope HxTxD); the ops default to those named here, and with "
                        "--ops both must name the same ops (an op of --ops without shapes here is an error)")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--cold", action="store_true", help="cold cache: flush (> L3) before every sample, 1 call each")
    b.add_argument("--quick", action="store_true", help="small shapes and a short time budget (smoke test)")
    b.add_argument("--budget", type=float, default=None, help="seconds of samples per kernel (default 0.4; quick 0.03)")
    b.add_argument("--rounds", type=int, default=None,
                   help="split each kernel's budget into this many slices, timed round-robin over all kernels "
                        "so host drift is shared by every row (default 40; quick 2; 1 = each kernel in one block)")
    b.add_argument("--no-gate", action="store_true",
                   help="keep every round: no quiet gate (by default a probe read between rounds leaves out "
                        "the rounds timed while the host was busy; see refimpl.timing.harness)")
    b.add_argument("--max-samples", type=int, default=None,
                   help="most samples a kernel keeps, spread over its rounds (default 20000: the time budget "
                        "ends sampling; at least 15 and one per round)")
    b.add_argument("--json", metavar="PATH", help="write the report as JSON (schema in refimpl.timing.bench)")
    b.add_argument("--plot", metavar="PATH", help="write a roofline PNG with every kernel placed")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)
    sub = b.add_subparsers(dest="bench_command", metavar="{compare}")
    c = sub.add_parser(
        "compare", help="compare two bench JSON files; flag regressions beyond noise",
        description="Match the rows of OLD and NEW by (op, backend, shape, dtype, cold) and judge each "
                    "ratio new / old against the rows' noise.  Exit status 1 when a row regressed or a "
                    "row of OLD is missing from NEW (rows only in NEW are listed, not a failure); 2 when "
                    "a file is unreadable or failed verification (passed: false), or no rows match.  "
                    "A difference in settings dtype, cold or quick is warned about.")
    c.add_argument("old")
    c.add_argument("new")
    c.add_argument("--sigmas", type=float, default=3.0, help="noise multiple for a change (default 3)")
    c.add_argument("--min-change", type=float, default=0.05,
                   help="smallest relative change ever flagged (default 0.05 = 5%%)")
    # `refimpl bench --json X compare A B`: the run's options would be silently ignored
    c.set_defaults(func=_compare, run_defaults={k: v for k, v in vars(b.parse_args([])).items()
                                                if k not in ("func", "bench_command")})

    p = subparsers.add_parser(
        "profile", help="cycles per token by stage (prefill and decode) against the analytic roofline",
        description="Run a model (PATH, or a built-in tiny Llama when omitted) through prefill and decode, "
                    "timing each stage between trace points, next to the analytic FLOPs / bytes per token "
                    "and the roofline minimum; beside them, transformers' model of the same weights (torch), "
                    "checked against the float64 oracle first and split into stages by forward hooks.")
    p.add_argument("path", nargs="?", default=None,
                   help="model: HF directory, llama2.c .bin or tiny:ARCH[:SEED] (default: a built-in tiny Llama, "
                        "V=512 D=128, larger than tiny:llama's V=97 D=32)")
    p.add_argument("--backends", type=_csv, default=None, help="comma-separated: numpy,numba,c,torch (default: all available; "
                   "torch = the transformers peer, float32 only)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--prompt-len", type=int, default=32, help="prefill tokens (default 32)")
    p.add_argument("--decode", type=int, default=16, help="decode steps (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="runs per backend; the fastest per stage is kept")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH", help="stacked-bar PNG of cycles per token by stage")
    p.set_defaults(func=_profile)


def check_outputs(args) -> None:
    """ValueError before any work when --json / --plot cannot be written: a missing or
    read-only directory, --plot without matplotlib or with an extension it cannot write (the
    run takes a minute and its report would be lost at the end)."""
    import importlib.util

    from refimpl.cli import check_output_path
    for opt in ("json", "plot"):
        if getattr(args, opt, None):
            check_output_path(getattr(args, opt), f"--{opt}")
    if getattr(args, "plot", None):
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib")
        from refimpl.timing.plotting import image_format
        image_format(args.plot)                       # an extension matplotlib cannot write


def _console():
    from rich.console import Console
    c = Console()
    if not c.is_terminal:          # pipes and CI logs: wide enough for the tables
        c = Console(width=200)
    return c


def _bench(args) -> int:
    from refimpl.timing import bench
    console = _console()
    try:
        check_outputs(args)
        shapes = bench.parse_shapes(args.shapes) if args.shapes is not None else None
        report = bench.run(ops=args.ops, backends=args.backends, shapes=shapes, dtype=args.dtype,
                           cold=args.cold, quick=args.quick, budget_s=args.budget, rounds=args.rounds,
                           max_samples=args.max_samples, gate=not args.no_gate,
                           progress=not args.no_progress and console.is_terminal, console=console,
                           argv=sys.argv)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    outputs = [(args.json, bench.write_json), (args.plot if report["results"] else None, bench.plot_roofline)]
    wrote = _write_outputs(report, outputs)
    bench.print_report(report, console)
    return _report_written(wrote, console) or (0 if report["passed"] else 1)


def _write_outputs(report, outputs) -> tuple[list, OSError | None]:
    """Write the report's files before it is printed (output to a closed pipe must not lose
    them): (the paths written, the error that stopped the writing or None)."""
    wrote = []
    try:
        for path, write in outputs:
            if path:
                write(report, path)
                wrote.append(path)
    except OSError as e:
        return wrote, e
    return wrote, None


def _report_written(written, console) -> int:
    """Print what _write_outputs did, after the report: 0, or 2 when a file could not be written."""
    wrote, error = written
    for path in wrote:
        console.print(f"wrote {path}")
    if error is not None:
        console.print(f"[red]error:[/] {error}")
        return 2
    return 0


def _compare(args) -> int:
    """Exit 0: no regression; 1: a regression, or a row of OLD missing from NEW; 2: bad input."""
    console = _console()
    try:
        return _compare_files(args, console)
    except (OSError, ValueError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    except Exception as e:  # a bug or a malformed file we did not foresee: never exit 1 ("regression")
        console.print(f"[red]error:[/] compare failed: {type(e).__name__}: {e}")
        return 2


def _compare_files(args, console) -> int:
    from refimpl.timing import bench
    given = [f"--{k.replace('_', '-')}" for k, v in args.run_defaults.items() if getattr(args, k) != v]
    if given:
        raise ValueError(f"{', '.join(given)}: option(s) of a bench run, not of `refimpl bench compare` "
                         "(which takes OLD NEW --sigmas --min-change)")
    old, new = bench.read_json(args.old), bench.read_json(args.new)
    for path, d in ((args.old, old), (args.new, new)):
        if not d.get("passed", True):
            raise ValueError(f"{path}: that run failed verification (passed: false): nothing was timed to compare")
    rows = bench.compare(old, new, sigmas=args.sigmas, min_change=args.min_change)
    only_old, only_new = bench.unmatched(old, new)
    diff = bench.settings_differences(old, new)
    if diff:
        console.print(f"[yellow]warning:[/] the runs differ in settings: {'; '.join(diff)}")
    if not rows:
        raise ValueError(f"no rows match between {args.old} ({len(old.get('results', []))} rows) and "
                         f"{args.new} ({len(new.get('results', []))} rows): rows are matched by op, backend, "
                         "shape, dtype and cold")
    bench.print_compare(rows, console, probes=bench.compare_probes(old, new))
    if only_old:
        console.print(f"[red]{len(only_old)} row(s) of {args.old} missing from {args.new}[/] (not compared: "
                      f"a failure): {'; '.join(only_old)}")
    if only_new:
        console.print(f"{len(only_new)} row(s) only in {args.new} (not compared): {'; '.join(only_new)}")
    return 1 if only_old or any(r["verdict"] == "regression" for r in rows) else 0


def _profile(args) -> int:
    from refimpl.timing import profile
    console = _console()
    try:
        check_outputs(args)
        report = profile.run(path=args.path, backends=args.backends, dtype=args.dtype,
                             prompt_len=args.prompt_len, decode=args.decode, repeats=args.repeats)
    except (ValueError, OSError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    wrote = _write_outputs(report, [(args.json, profile.write_json), (args.plot, profile.plot)])
    profile.print_report(report, console)
    return _report_written(wrote, console)
