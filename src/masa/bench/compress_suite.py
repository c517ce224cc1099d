"""`masa bench compress`: every training-free method at every ratio, on one model, under one protocol.

The base model (a Llama-layout directory; a native ``masa_lm`` one is converted with ``to_llama``, or
one is trained from a ``masa train`` preset) is calibrated once per target set on the first N x T
tokens of a calibration text (a slice of its training text), then compressed by each method at each
ratio with each budget allocation, always from a fresh copy and the same statistics. Every compressed
model is scored on the first ``eval_tokens`` tokens of the evaluation text (chunked windows of T, the
training length; docs/compression.md). Results are appended to OUT/results.json as they come (an interrupted
run resumes), then OUT/results.md and the plots are written.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

import masa
from masa.bench.report import markdown_table
from masa.budget import ALLOCATIONS
from masa.compress import CompressConfig, calibrate, compress, get_method
from masa.compress.api import calibration_tokens, resolve_targets
from masa.compress.calibration import with_fisher
from masa.compress.config import TARGET_PRESETS
from masa.data.tokenizer import encode, load_tokenizer
from masa.eval import load_eval_text, perplexity
from masa.eval.datasets import DATA_DIR
from masa.io import write_json

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PRESET_PREFIX = "bench_compress_"
OWN_ALLOCATION = ("masa",)  # methods that always allocate by whitened error themselves (no option)


@dataclass
class CompressBenchConfig:
    """A `masa bench compress` preset (TOML: top-level keys, plus ``[options.METHOD]`` tables)."""

    methods: list[str] = field(
        default_factory=lambda: ["svd", "asvd", "svd-llm", "fwsvd", "basis-sharing", "cospadi", "masa"]
    )
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    targets: list[str] = field(default_factory=lambda: ["attn", "all-linear"])
    allocations: list[str] = field(default_factory=lambda: list(ALLOCATIONS))
    calib_text: str = "gutenberg/austen-emma.txt"  # under data/, or a path: a slice of the training text
    calib_samples: int = 32
    calib_len: int = 0  # tokens per calibration sequence; 0 = the model's training length T
    eval_text: str = "wikitext2-test"
    eval_tokens: int = 32_768  # score the first N tokens; 0 = all
    eval_batch_size: int = 16
    seq_len: int = 0  # evaluation window T; 0 = the model's training length
    cpu_threads: int = 1  # torch threads on CPU (0 = torch's default)
    seed: int = 0
    options: dict[str, dict] = field(default_factory=dict)  # method -> options for every run of it

    def __post_init__(self):
        for method in self.methods:
            get_method(method)  # raises listing the available methods
        if unknown := [t for t in self.targets if t not in TARGET_PRESETS]:
            raise ValueError(f"targets {unknown} are not presets: use {', '.join(TARGET_PRESETS)}")
        if unknown := [a for a in self.allocations if a not in ALLOCATIONS]:
            raise ValueError(f"allocations {unknown} are unknown: use {', '.join(ALLOCATIONS)}")
        if not self.ratios or not all(0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"ratios {self.ratios} must be a non-empty list in (0, 1), e.g. [0.1, 0.2]")
        for name in ("calib_samples", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("calib_len", "eval_tokens", "seq_len", "cpu_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = default)")
        if stray := sorted(set(self.options) - set(self.methods)):
            raise ValueError(f"options given for methods {stray} that the preset does not run")

    @classmethod
    def from_toml(cls, path: str | Path) -> CompressBenchConfig:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from err
        if unknown := sorted(set(raw) - {f.name for f in fields(cls)}):
            raise ValueError(
                f"{path}: unknown keys {unknown}; known: {', '.join(f.name for f in fields(cls))}"
            )
        return cls(**raw)


def resolve_preset(preset: str) -> Path:
    """A bundled `bench_compress_NAME.toml`, else a TOML path."""
    bundled = Path(__file__).resolve().parent.parent / "presets" / f"{PRESET_PREFIX}{preset}.toml"
    if bundled.is_file():
        return bundled
    if Path(preset).is_file():
        return Path(preset)
    raise FileNotFoundError(
        f"bench preset {preset!r} is neither bundled ({PRESET_PREFIX}NAME.toml) nor a file"
    )


# -------------------------------------------------------------------------------------------- model


def train_base(preset: str) -> Path:
    """Train a model from a `masa train` preset; returns its final model directory."""
    from masa.train.command import resolve_config_path
    from masa.train.config import TrainRunConfig
    from masa.train.trainer import train

    return Path(train(TrainRunConfig.from_toml(resolve_config_path(preset)), overwrite=True)["model_dir"])


def load_base(directory: Path) -> tuple[nn.Module, int]:
    """The model as a Llama (native models converted) and its training sequence length."""
    model = masa.load(directory)
    if getattr(model.config, "model_type", None) == "masa_lm":
        from masa.model import to_llama

        model = to_llama(model)
    return model.eval(), int(model.config.max_position_embeddings)


def convert(source: str | Path, out: str | Path) -> Path:
    """Save the model at ``source`` as a Llama-layout directory ``out`` (tokenizer copied)."""
    model, _ = load_base(Path(source))
    return masa.save(model, out, files_from=source, info={"converted_from": str(source)})


# --------------------------------------------------------------------------------------------- runs


def _key(run: dict) -> tuple:
    return run["target"], run["method"], run["allocation"], run["ratio"]


def plan_runs(config: CompressBenchConfig) -> list[dict]:
    """Every (target, method, allocation, ratio) to run; methods with their own allocation run once."""
    runs = []
    for target in config.targets:
        for method in config.methods:
            allocations = ["own"] if method in OWN_ALLOCATION else config.allocations
            for allocation in allocations:
                for ratio in config.ratios:
                    runs.append(
                        {"target": target, "method": method, "allocation": allocation, "ratio": ratio}
                    )
    return runs


def _run_options(config: CompressBenchConfig, method: str, allocation: str) -> dict:
    options = dict(config.options.get(method, {}))
    if allocation != "own":
        options["allocation"] = allocation
    return options


def _score(model: nn.Module, eval_ids: torch.Tensor, seq_len: int, batch_size: int) -> dict:
    result = perplexity(model, eval_ids, "chunked", seq_len=seq_len, batch_size=batch_size, progress=False)
    return {"ppl": result.ppl, "nll": result.nll, "protocol": result.describe()}


def _one(base: nn.Module, run: dict, stats, config: CompressBenchConfig, eval_ids, seq_len: int) -> dict:
    """Compress a copy of ``base`` as ``run`` says and score it; a method error is recorded, not raised."""
    model = copy.deepcopy(base)
    options = _run_options(config, run["method"], run["allocation"])
    compress_config = CompressConfig(
        run["method"], run["ratio"], run["target"], seed=config.seed, options=options
    )
    start = time.perf_counter()
    try:
        result = compress(model, compress_config, stats=stats)
    except ValueError as err:
        return {**run, "options": options, "error": str(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    return {
        **run,
        "options": options,
        "ratio_reached": result.ratio_reached,
        "seconds": seconds,
        "params_after": result.params_after,
        **_score(model, eval_ids, seq_len, config.eval_batch_size),
    }


def run_bench(model_dir: Path, config: CompressBenchConfig, out: Path, command: str, log=print) -> dict:
    """Run the benchmark into ``out`` (resuming finished runs of the same setup); returns the results."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    base, train_len = load_base(model_dir)
    tokenizer = load_tokenizer(model_dir)
    seq_len = config.seq_len or train_len
    calib_len = config.calib_len or train_len
    eval_ids = torch.tensor(encode(tokenizer, load_eval_text(config.eval_text)), dtype=torch.long)
    eval_ids = eval_ids[: config.eval_tokens] if config.eval_tokens else eval_ids
    calib_path = (
        DATA_DIR / config.calib_text if (DATA_DIR / config.calib_text).is_file() else config.calib_text
    )
    calib = calibration_tokens(calib_path, tokenizer, config.calib_samples, calib_len)  # (N, T)
    setup = {"model": str(model_dir), "config": asdict(config), "seq_len": seq_len, "calib_len": calib_len}
    path = out / RESULTS_JSON
    previous = _load(path)
    if _same_data(previous.get("setup", {}), setup):  # keep the runs whose method options are unchanged
        kept = [
            r
            for r in previous["runs"]
            if r.get("options") == _run_options(config, r["method"], r["allocation"])
        ]
        results = {**previous, "setup": setup, "runs": kept}
    else:
        results = {"setup": setup, "runs": []}
    results["command"] = command
    if "dense" not in results:
        results["dense"] = {
            **_score(base, eval_ids, seq_len, config.eval_batch_size),
            "params": masa.count(base).total,
        }
        log(f"dense: ppl {results['dense']['ppl']:.2f} ({results['dense']['protocol']})")
    done = {_key(r) for r in results["runs"]}
    results.setdefault("calibration", {})
    for target in config.targets:
        todo = [r for r in plan_runs(config) if r["target"] == target and _key(r) not in done]
        if not todo:
            continue
        names = resolve_targets(copy.deepcopy(base), CompressConfig("svd", 0.5, target))
        start = time.perf_counter()
        stats = calibrate(base, calib, names)
        fisher_start = time.perf_counter()
        stats = with_fisher(stats, base, calib, names)  # fwsvd's gradients; the other methods ignore them
        results["calibration"][target] = {
            **stats.summary(),
            "seconds": fisher_start - start,
            "fisher_seconds": time.perf_counter() - fisher_start,
        }
        for run in todo:
            record = _one(base, run, stats, config, eval_ids, seq_len)
            results["runs"].append(record)
            write_json(path, results)
            outcome = f"ppl {record['ppl']:.2f}" if "ppl" in record else f"error: {record['error'][:120]}"
            log(
                f"{target} {run['method']} [{run['allocation']}] {run['ratio']:.2f}: {outcome} ({record['seconds']:.1f}s)"
            )
    order = {key: i for i, key in enumerate(_key(r) for r in plan_runs(config))}
    results["runs"] = sorted((r for r in results["runs"] if _key(r) in order), key=lambda r: order[_key(r)])
    write_json(path, results)
    write_report(results, out)
    return results


def _same_data(old: dict, new: dict) -> bool:
    """Same model, calibration and evaluation: everything of the setup but the method list and options."""

    def data(setup: dict) -> dict:
        config = {
            k: v
            for k, v in setup.get("config", {}).items()
            if k not in ("methods", "options", "ratios", "targets", "allocations")
        }
        return {**setup, "config": config}

    return bool(old) and data(old) == data(new)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------- report


def _label(run: dict) -> str:
    return run["method"] if run["allocation"] == "own" else f"{run['method']} [{run['allocation']}]"


def _series(results: dict, target: str) -> dict[str, dict[float, dict]]:
    """label -> ratio -> run, for one target set, in preset order."""
    series: dict[str, dict[float, dict]] = {}
    for run in results["runs"]:
        if run["target"] == target:
            series.setdefault(_label(run), {})[run["ratio"]] = run
    return series


def _cell(run: dict | None, best: float) -> str:
    if run is None:
        return "—"
    if "ppl" not in run:
        return "error"
    text = f"{run['ppl']:,.1f}" if run["ppl"] < 1e5 else f"{run['ppl']:.2e}"
    return f"**{text}**" if math.isclose(run["ppl"], best) else text


def ppl_table(results: dict, target: str) -> str:
    """Markdown table: one row per method [allocation], one column per ratio; the best per ratio in bold."""
    ratios = results["setup"]["config"]["ratios"]
    series = _series(results, target)
    best = {
        r: min((s[r]["ppl"] for s in series.values() if "ppl" in s.get(r, {})), default=math.nan)
        for r in ratios
    }
    rows = [[label, *(_cell(runs.get(r), best[r]) for r in ratios)] for label, runs in series.items()]
    return markdown_table(["method [allocation]", *(f"{r:.0%}" for r in ratios)], rows)


def time_table(results: dict) -> str:
    """Markdown table of the mean compression wall time per method and target set (calibration excluded)."""
    targets = results["setup"]["config"]["targets"]
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    rows = []
    for method in methods:
        cells = []
        for target in targets:
            seconds = [
                r["seconds"] for r in results["runs"] if r["method"] == method and r["target"] == target
            ]
            cells.append(f"{sum(seconds) / len(seconds):.2f}" if seconds else "—")
        rows.append([method, *cells])
    return markdown_table(["method", *(f"{t} (s)" for t in targets)], rows)


def _figure(path: Path, draw) -> None:
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    draw(ax)
    ax.grid(True, alpha=0.3)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def ppl_plot(results: dict, target: str, path: Path) -> None:
    """Perplexity (log scale) against the ratio, one line per method [allocation], dense as a line."""

    def draw(ax):
        for i, (label, runs) in enumerate(_series(results, target).items()):
            points = sorted((r, run["ppl"]) for r, run in runs.items() if "ppl" in run)
            if points:
                style = "--" if "whitened-error" in label else "-"
                ax.plot(*zip(*points, strict=True), style, marker="osD^vP*Xph<>"[i % 12], label=label, lw=1.2)
        ax.axhline(results["dense"]["ppl"], color="black", lw=0.8, ls=":", label="dense")
        ax.set_yscale("log")
        ax.set(xlabel="compression ratio of the targeted weights", ylabel="perplexity (log)",
               title=f"{target}: {results['dense']['protocol']}")  # fmt: skip
        ax.legend(fontsize=7, loc="upper left", ncol=2)

    _figure(path, draw)


def time_plot(results: dict, path: Path) -> None:
    """Mean compression wall time per method, one bar group per target set."""
    targets = results["setup"]["config"]["targets"]
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))

    def draw(ax):
        width = 0.8 / len(targets)
        for t, target in enumerate(targets):
            means = []
            for method in methods:
                seconds = [
                    r["seconds"] for r in results["runs"] if r["method"] == method and r["target"] == target
                ]
                means.append(sum(seconds) / len(seconds) if seconds else 0.0)
            ax.bar([m + t * width for m in range(len(methods))], means, width, label=target)
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(methods))], methods, rotation=30)
        ax.set_yscale("log")
        ax.set(ylabel="seconds per compression (log)", title="compression wall time (calibration excluded)")
        ax.legend()

    _figure(path, draw)


def write_report(results: dict, out: Path) -> None:
    """results.md and the plots from a results dict."""
    setup, dense = results["setup"], results["dense"]
    config = setup["config"]
    lines = [
        "# `masa bench compress`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model: `{setup['model']}`; dense perplexity **{dense['ppl']:.2f}**. Perplexity protocol: "
        f"{config['eval_text']}, {dense['protocol']} (chunked windows of the training length). Calibration: "
        f"first {config['calib_samples']} x {setup['calib_len']} tokens of `{config['calib_text']}`. Ratios "
        "count the stored numbers of the targeted weights, biases and code indices included (the accounting of docs/compression.md); "
        "every run reached its ratio within 1 % or is marked `error`. Best per column in bold.",
        "",
    ]
    for target in config["targets"]:
        lines += [
            f"## Perplexity, targets `{target}`",
            "",
            ppl_table(results, target),
            f"![{target}](ppl_{target}.png)",
            "",
        ]
        ppl_plot(results, target, out / f"ppl_{target}.png")
    errors = [r for r in results["runs"] if "error" in r]
    if errors:
        lines += (
            ["## Errors", ""]
            + [f"- {r['target']} {_label(r)} {r['ratio']:.0%}: {r['error']}" for r in errors]
            + [""]
        )
    lines += ["## Compression wall time", "", time_table(results), "![time](compress_time.png)", ""]
    time_plot(results, out / "compress_time.png")
    (out / RESULTS_MD).write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- CLI

_EPILOG = """examples:
  masa bench compress --preset quick --model runs/bench_compress/base --out docs/results/compress
  masa bench compress --preset quick --train-preset small12 --out runs/bench_compress/small12
  masa bench compress --convert runs/bench-train/table1/dense/seed0/final --model runs/bench_compress/base ...
"""


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench compress`."""
    parser = benchmarks.add_parser(
        "compress",
        help="every training-free compression method at every ratio on one model",
        description="Compress one model with every method, ratio, target set and budget allocation; score "
        "held-out perplexity; write OUT/results.json, OUT/results.md and plots.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="quick", metavar="NAME_OR_TOML", help="bench preset (default: quick)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="DIR", help="Llama-layout model directory (native ones are converted)"
    )
    source.add_argument(
        "--train-preset", metavar="NAME", help="train the base model from a `masa train` preset"
    )
    parser.add_argument("--convert", metavar="DIR", help="first save this native model as Llama into --model")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")


def command_line(args: argparse.Namespace) -> str:
    words = ["masa", "bench", "compress", "--preset", args.preset]
    words += ["--convert", args.convert] if args.convert else []
    words += ["--model", args.model] if args.model else ["--train-preset", args.train_preset]
    return shlex.join([*words, "--out", args.out])


def run(args: argparse.Namespace) -> int:
    """Run `masa bench compress` for parsed arguments."""
    config = CompressBenchConfig.from_toml(resolve_preset(args.preset))
    if args.convert:
        if not args.model:
            raise ValueError("--convert needs --model DIR: where to write the Llama-layout copy")
        convert(args.convert, args.model)
    model_dir = Path(args.model) if args.model else train_base(args.train_preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_bench(model_dir, config, out, command_line(args), log=lambda line: print(line, flush=True))
    print(f"results: {out / RESULTS_MD}")
    return 0


if __name__ == "__main__":  # `python -m masa.bench.compress_suite ...` (same arguments)
    cli = argparse.ArgumentParser(prog="masa bench compress")
    add_arguments(cli)
    raise SystemExit(run(cli.parse_args()))
