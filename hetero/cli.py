"""The `hetero` command: thin argument parsing over library functions."""

from __future__ import annotations

import argparse
import sys

from hetero.errors import HeteroError


def _commands() -> list:
    # Each module adds its own subcommand; imported here so `hetero --help` lists them all.
    from hetero import generate, make_model, planning

    return [generate, make_model, planning]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="Run Mixture-of-Experts models on one GPU plus CPU RAM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _commands():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HeteroError as e:
        print(f"hetero {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
