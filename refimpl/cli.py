"""`refimpl` command line: one subcommand per job.

Each subcommand lives with its layer and exposes `add_parser(subparsers)`,
which registers the subparser and sets `func(args) -> int` (the exit status).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds) in the order `refimpl --help` lists them
SUBCOMMAND_MODULES = (
    "refimpl.timing.cli",   # bench, profile
    "refimpl.io.cli",       # generate
    "refimpl.verify.cli",   # verify, trace, diff, golden, explain
)


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
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
