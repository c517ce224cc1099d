"""``masa compensate``: add EoRA corrections to an already compressed model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "add low-rank EoRA corrections to an already compressed model (calibrates again)"


def _amount(text: str) -> int | float:
    """argparse type: a rank (integer >= 1) or a fraction in (0, 1)."""
    from masa.compress.config import parse_compensation

    try:
        return parse_compensation(f"eora:{text}")[1]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: a rank (integer >= 1) or a fraction in (0, 1)") from err


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``masa compensate`` on the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "compensate",
        help=HELP,
        description=(
            "Fit, for every compressed layer of MODEL_DIR, a low-rank correction of its error against the "
            "original model in the eigenspace of its calibration inputs (EoRA), and save the result. The "
            "corrections' numbers count: the ratio goes down (printed). Statistics are not stored in model "
            "directories, so the original model is calibrated again."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="compressed model directory (masa compress --out)")
    parser.add_argument("--original", required=True, metavar="DIR", help="the model it was compressed from")
    parser.add_argument("--calib", required=True, metavar="FILE|NAME", help="calibration text")
    parser.add_argument("--calib-samples", type=int, default=32, metavar="N", help="sequences (default 32)")
    parser.add_argument(
        "--calib-len", type=int, default=256, metavar="T", help="tokens per sequence (default 256)"
    )
    parser.add_argument(
        "--rank",
        required=True,
        type=_amount,
        metavar="R|FRACTION",
        help="rank per layer, or the fraction of the layers' stored numbers to spend (ranks by error removed)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from masa.compress.api import calibration_tokens
    from masa.compress.compensate import compensate_model
    from masa.data.tokenizer import load_tokenizer
    from masa.io import load, save
    from masa.io.lock import directory_lock

    out = Path(args.out)
    with directory_lock(out):
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
        model, original = load(args.model), load(args.original)
        tokens = calibration_tokens(
            args.calib, load_tokenizer(args.original), args.calib_samples, args.calib_len
        )
        report = compensate_model(model, original, tokens, args.rank)
        info = json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8")).get("masa", {})
        info = {k: v for k, v in info.items() if k not in ("format_version", "version", "surgery")}
        info["compensation"] = {"kind": "eora", "rank": args.rank, "calib": str(args.calib), **report}
        save(model, out, files_from=args.model, info=info, overwrite=args.overwrite)
    ranks = sorted(set(report["ranks"].values()))
    print(
        f"EoRA on {report['modules']} layers (ranks {ranks[0]}..{ranks[-1]}): ratio "
        f"{report['ratio_before']:.4f} -> {report['ratio_after']:.4f}; saved {out}"
    )
