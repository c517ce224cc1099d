"""The ``masa`` command: one subcommand per capability, each defined beside the code it drives.

Only the chosen subcommand's module is imported (its ``add_parser`` builds the full parser); the others
are listed by name and help from ``COMMANDS``, so ``masa --help`` and ``masa info`` start without PyTorch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module exposing add_parser(subparsers), help shown by `masa --help`); order is the order shown.
# Each help must equal the one the module's add_parser registers (tests/test_cli.py checks).
COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "masa.train.command",
        "train a language model (dense or with shared attention) from a config",
    ),
    "info": (
        "masa.commands.info",
        "describe a saved model: variant, atoms, parameters, compression ratio, file size",
    ),
    "sample": ("masa.commands.sample", "generate text from a saved model"),
    "compress": (
        "masa.compress.command",
        "compress a saved model without training (svd, asvd, svd-llm, masa ...)",
    ),
    "compensate": (
        "masa.compress.compensate_command",
        "add low-rank EoRA corrections to an already compressed model (calibrates again)",
    ),
    "heal": (
        "masa.heal.command",
        "heal a compressed model: train its new small parameters to match the original model's logits",
    ),
    "eval": (
        "masa.eval.command",
        "perplexity of a saved model (and fidelity to a reference model)",
    ),
    "lm-eval": (
        "masa.eval.lm_eval_command",
        "zero-shot accuracy through lm-evaluation-harness (pip install masa[eval])",
    ),
    "export": (
        "masa.commands.export",
        "write a compressed model as a plain transformers checkpoint (--dense)",
    ),
    "demo": (
        "masa.commands.demo",
        "train a tiny dense and a tiny MASA model on bundled text and compare them",
    ),
    "bench": (
        "masa.bench.command",
        "benchmark suites (train: attention variants at equal budget; compress: training-free methods)",
    ),
}


def chosen_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: its first word that is not an option (masa's own take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``masa`` parser, with the full parser of the command ``argv`` chooses and stubs of the others."""
    from masa import __version__

    chosen = chosen_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="masa",
        description="Matrix Atom Sharing: train, compress and measure transformers that share weights across layers.",
    )
    parser.add_argument("--version", action="version", version=f"masa {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, KeyError, OSError) as err:  # OSError: missing files, locks, full disks
        print(f"masa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
