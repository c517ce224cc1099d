"""`masa bench`: benchmark suites, one sub-command each (`masa bench train ...`)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from masa.cli_args import positive_int

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
TRAIN_PRESET_PREFIX = "bench_train_"

_TRAIN_EPILOG = """examples:
  masa bench train --suite table1 --preset quick --seeds 2 --out docs/results/train/table1
  masa bench train --suite ablation --seeds 1 --out runs/ablation
  masa bench train --suite table1 --preset full --set train.device=cuda:0
  masa bench train --suite table1 --set train.token_budget=200_000 --set bench.eval_tokens=8192

Every run of a suite trains on the same data, in the same order, for the same tokens and schedule
with the same seeds; only the attention changes. Runs go to TRAIN.OUT_DIR/SUITE/LABEL/seedN (set with
--set train.out_dir=...); a finished run with an unchanged configuration is reused, not retrained.
"""


def train_presets() -> list[str]:
    """Names of the bundled `masa bench train` presets (`--preset NAME`)."""
    return sorted(
        p.stem.removeprefix(TRAIN_PRESET_PREFIX) for p in PRESET_DIR.glob(f"{TRAIN_PRESET_PREFIX}*.toml")
    )


def resolve_train_preset(preset: str) -> Path:
    """A bundled bench preset by name, else a TOML file path."""
    bundled = PRESET_DIR / f"{TRAIN_PRESET_PREFIX}{preset}.toml"
    if bundled.is_file():
        return bundled
    if Path(preset).is_file():
        return Path(preset)
    raise FileNotFoundError(
        f"bench preset {preset!r} is neither bundled nor a file: use one of {', '.join(train_presets())} "
        "or the path of a TOML file with [model], [data], [train] and [bench]"
    )


def _suite_arguments(parser: argparse.ArgumentParser) -> None:
    """--suite, --preset and --set, shared by `masa bench train` and `masa bench speed`."""
    from masa.bench.train_suite import SUITES

    parser.add_argument(
        "--suite",
        choices=SUITES,
        required=True,
        help="table1: every method at about 66.7 %% attention compression; ablation: MASA with S = L/6..2L/3",
    )
    parser.add_argument(
        "--preset",
        default="quick",
        metavar="NAME_OR_TOML",
        help=f"bundled preset ({', '.join(train_presets())}) or a TOML file (default: quick)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a preset value, e.g. train.token_budget=200_000 or bench.eval_tokens=0; repeatable",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="LABEL",
        help="only these runs of the suite, e.g. lowrank masa-qkvo-S4 (dense always runs; bench train "
        "reuses finished runs when more are asked for later)",
    )


def add_train_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench train`."""
    parser = benchmarks.add_parser(
        "train",
        help="train every attention variant of a suite at equal budget and compare them",
        description="Train dense, GQA, low-rank, sequential/cyclic sharing and MASA models on the same data "
        "and budget; write OUT/results.json, OUT/results.md, OUT/ppl_vs_attention_params.png and "
        "OUT/loss_curves.png.",
        epilog=_TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _suite_arguments(parser)
    parser.add_argument(
        "--seeds", type=positive_int, default=1, metavar="N", help="seeds per method (default: 1)"
    )
    parser.add_argument("--out", metavar="DIR", help="results folder (default: TRAIN.OUT_DIR/SUITE)")
    parser.set_defaults(func=run_train)


def add_speed_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench speed`."""
    parser = benchmarks.add_parser(
        "speed",
        help="training-step speed of every attention variant of a suite against dense, interleaved",
        description="Time one optimizer step of each variant in turn, round after round, in one process "
        "(so machine drift hits every variant alike); write OUT/speed.json and OUT/speed.md.",
    )
    _suite_arguments(parser)
    parser.add_argument(
        "--rounds", type=positive_int, default=20, metavar="N", help="timed rounds (default 20)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        metavar="T",
        help="the device's peak dense TFLOP/s in the training dtype, to report model FLOPs utilisation "
        "(e.g. 989 for an H100/H200 in bf16)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")
    parser.set_defaults(func=run_speed)


def run_speed(args: argparse.Namespace) -> int:
    """Run `masa bench speed` for parsed arguments; prints the table."""
    from masa.bench.speed import SPEED_MD, measure_speed, write_speed
    from masa.bench.train_suite import SuiteConfig

    config = SuiteConfig.from_toml(resolve_train_preset(args.preset), args.overrides)
    results = measure_speed(
        args.suite, config, rounds=args.rounds, device=args.device, methods=args.methods,
        peak_tflops=args.peak_tflops,
    )  # fmt: skip
    write_speed(results, args.out, command_line(args))
    print((Path(args.out) / SPEED_MD).read_text())
    return 0


def add_vit_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench vit`."""
    parser = benchmarks.add_parser(
        "vit",
        help="train every attention variant of a small ViT on an image set at equal budget",
        description="Train dense, GQA, low-rank, sequential/cyclic sharing and MASA ViTs on the same images "
        "(the bundled digits by default); write OUT/results.json, OUT/results.md and a plot of top-1 "
        "accuracy against attention parameters.",
    )
    parser.add_argument("--preset", default="", help="TOML file (default: the bundled bench_vit_digits)")
    parser.add_argument(
        "--seeds", type=positive_int, default=1, metavar="N", help="seeds per method (default: 1)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a preset value, e.g. train.epochs=5 or bench.data=cifar-10-batches-bin; repeatable",
    )  # fmt: skip
    parser.set_defaults(func=run_vit)


def run_vit(args: argparse.Namespace) -> int:
    """Run `masa bench vit` for parsed arguments; prints the table."""
    from masa.bench.vit_suite import PRESET, RESULTS_MD, VitSuiteConfig, run_vit_suite

    config = VitSuiteConfig.from_toml(args.preset or PRESET, args.overrides)
    words = ["masa", "bench", "vit", "--seeds", str(args.seeds), "--out", args.out]
    words += (["--preset", args.preset] if args.preset else []) + [
        w for o in args.overrides for w in ("--set", o)
    ]
    run_vit_suite(config, args.seeds, args.out, shlex.join(words))
    print((Path(args.out) / RESULTS_MD).read_text())
    return 0


def add_compress_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench compress` (its module is imported only here, when the CLI is built)."""
    from masa.bench.compress_suite import add_parser as add_compress

    add_compress(benchmarks)


def add_recovery_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench recovery` (EoRA and healing; its module is imported only here)."""
    from masa.bench.recovery import add_parser as add_recovery

    add_recovery(benchmarks)


def add_infer_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench infer` (its module is imported only here, when the CLI is built)."""
    from masa.bench.infer import add_parser as add_infer

    add_infer(benchmarks)


def add_scale_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench scale` (streamed compression's time and memory against model size)."""
    from masa.bench.scale import add_parser as add_scale

    add_scale(benchmarks)


BENCHMARKS = (
    add_train_parser,
    add_speed_parser,
    add_vit_parser,
    add_compress_parser,
    add_recovery_parser,
    add_infer_parser,
    add_scale_parser,
)  # one registration function per benchmark


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `bench` command group on the `masa` command line."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark suites (train: attention variants at equal budget; compress: training-free methods)",
        description="Benchmark suites; each writes results.json, results.md and plots into its --out folder.",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for register in BENCHMARKS:
        register(benchmarks)


def command_line(args: argparse.Namespace) -> str:
    """The `masa bench train|speed` command that reproduces these parsed arguments."""
    words = ["masa", "bench", args.benchmark, "--suite", args.suite, "--preset", args.preset]
    if args.benchmark == "train":
        words += ["--seeds", str(args.seeds)]
    else:
        words += ["--rounds", str(args.rounds), "--device", args.device]
        words += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    words += ["--methods", *args.methods] if args.methods else []
    words += ["--out", args.out] if args.out else []
    words += [word for override in args.overrides for word in ("--set", override)]
    return shlex.join(words)


def run_train(args: argparse.Namespace) -> int:
    """Run `masa bench train` for parsed arguments; prints where the results went."""
    from masa.bench.train_suite import RESULTS_MD, SuiteConfig, run_suite

    config = SuiteConfig.from_toml(resolve_train_preset(args.preset), args.overrides)
    out = Path(args.out) if args.out else Path(config.run.train.out_dir) / args.suite
    run_suite(args.suite, config, args.seeds, out, command_line(args), methods=args.methods)
    print(f"results: {out / RESULTS_MD}")
    return 0
