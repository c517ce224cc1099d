"""`masa train`: train a model from a TOML config or a bundled preset."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"

_EPILOG = """examples:
  masa train demo                                  tiny dense model, 1-2 CPU minutes
  masa train small12 --set model.attention=masa-qkvo --set model.n_atoms=4 --out runs/masa
  masa train my.toml --set train.max_steps=20 --set train.device=cpu
  torchrun --nproc_per_node 2 -m masa.cli train demo    data-parallel on two processes
  masa train demo --resume                         continue from OUT/checkpoints/latest
  masa train demo --overwrite                      start the run in OUT again
"""


def presets() -> list[str]:
    """Names of the bundled presets (`masa train NAME`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_config_path(config: str) -> Path:
    """A TOML path as given, else the bundled preset of that name."""
    path = Path(config)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{config}.toml"
    if preset.is_file():
        return preset
    raise FileNotFoundError(
        f"{config!r} is neither a file nor a preset: use a .toml path or one of {', '.join(presets())}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `train` sub-command on the `masa` command line."""
    parser = subparsers.add_parser(
        "train",
        help="train a language model (dense or with shared attention) from a config",
        description="Train a MasaLM on the bundled corpora. Writes OUT/metrics.jsonl, OUT/checkpoints/, "
        "OUT/final/ (the model directory) and OUT/summary.json, and prints the summary as JSON.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help=f"TOML file or preset name ({', '.join(presets())})")
    protect = parser.add_mutually_exclusive_group()
    protect.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    protect.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUT that holds a run (its checkpoints and log are deleted)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax, bare words are strings); repeatable",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="output folder (overrides train.out_dir); refused if it holds a run"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `masa train` for parsed arguments; prints the summary (rank 0) and returns the exit code."""
    from masa.train.config import TrainRunConfig, apply_overrides, read_toml
    from masa.train.vision_run import VisionRunConfig, is_vision_config, train_vision

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"train.out_dir={json.dumps(args.out)}")
    raw = apply_overrides(read_toml(resolve_config_path(args.config)), overrides)
    if is_vision_config(raw):
        summary = train_vision(VisionRunConfig.from_dict(raw), resume=args.resume, overwrite=args.overwrite)
    else:
        from masa.train.trainer import train

        summary = train(TrainRunConfig.from_dict(raw), resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0
