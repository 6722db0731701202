"""Entry point of the ``paca`` command.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``
(which registers the subcommand and sets ``func``); list it in
:data:`SUBCOMMANDS` to make it appear.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["paca.cli.run", "paca.cli.backends", "paca.cli.bench", "paca.cli.compare"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paca",
        description="PaCA fine-tuning on CPU, NVIDIA GPUs, Intel Gaudi and plugin backends.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, RuntimeError, FileNotFoundError, TypeError) as exc:
        if args.verbose:
            raise
        print(f"paca {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
