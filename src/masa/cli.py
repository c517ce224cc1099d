"""The ``masa`` command: one subcommand per capability, each defined beside the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> each exposes add_parser(subparsers); order is the order shown in --help
COMMANDS = (
    "masa.train.command",
    "masa.commands.info",
    "masa.commands.sample",
    "masa.compress.command",
    "masa.eval.command",
    "masa.commands.demo",
    "masa.bench.command",
)


def build_parser() -> argparse.ArgumentParser:
    from masa import __version__

    parser = argparse.ArgumentParser(
        prog="masa",
        description="Matrix Atom Sharing: train, compress and measure transformers that share weights across layers.",
    )
    parser.add_argument("--version", action="version", version=f"masa {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, KeyError) as err:
        print(f"masa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
