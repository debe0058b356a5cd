"""`refimpl` command line: one subcommand per job.

Each subcommand lives with its layer and exposes `add_parser(subparsers)`,
which registers the subparser and sets `func(args) -> int` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# (module, what it adds) in the order `refimpl --help` lists them
SUBCOMMAND_MODULES = (
    "refimpl.timing.cli",   # bench, profile
    "refimpl.io.cli",       # generate
    "refimpl.verify.cli",   # verify, trace, diff, golden, explain
)


def check_output_path(path, opt: str) -> None:
    """ValueError naming option `opt` before any work when `path` cannot be written: a directory,
    or a missing or read-only parent directory (else the run's result would be lost at the end)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{opt} {path}: is a directory, not a file")
    if not p.parent.is_dir():
        raise ValueError(f"{opt} {path}: directory {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{opt} {path}: directory {str(p.parent)!r} is not writable")


def _closed_pipe_is_broken_pipe() -> None:
    """rich's Console answers output to a closed pipe with SystemExit(1), which `refimpl verify`
    and `diff` mean as FAIL: in this process it raises BrokenPipeError instead, handled in main."""
    try:
        from rich.console import Console
    except ImportError:
        return

    def on_broken_pipe(self):
        raise BrokenPipeError("the reader of this output closed it")
    Console.on_broken_pipe = on_broken_pipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refimpl", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            if e.name != mod:          # the module exists but is broken: say so loudly
                raise
            continue
        m.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _closed_pipe_is_broken_pipe()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:     # `refimpl explain model | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nor one at exit's flush
        return 141              # 128 + SIGPIPE, as a shell reports a command killed by it


if __name__ == "__main__":
    sys.exit(main())
