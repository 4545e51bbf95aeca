"""`lvd` command line: one sub-command per job, each defined next to the code it drives.

Every module in COMMAND_MODULES exposes `register(subparsers)`, which adds its sub-command(s) and sets
`func` on the parser; `main` only dispatches. Imports stay lazy so `lvd --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from infra.local import apply_quiet_env

COMMAND_MODULES = [
    "curation.sample_data",
    "flows.curate",
    "flows.serve",
    "flows.demo",
    "flows.generate",
    "flows.walk",
    "flows.train",
    "flows.evaluate",
    "flows.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvd", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_quiet_env()
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
