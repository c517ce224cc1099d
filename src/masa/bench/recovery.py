"""`masa bench recovery`: how much of the perplexity lost to compression EoRA and healing win back.

On one Llama-layout model, all linear layers: each method at each ratio plain and with EoRA (its
numbers inside the same ratio, the split searched), and a few methods healed for a few step counts.
Calibration and healing read a slice of the training text; perplexity is scored on the first
``eval_tokens`` of WikiText-2 test in chunked windows of the training length (the protocol of
`masa bench compress`). Results go to OUT/results.json as they come (a rerun resumes), then
OUT/results.md and OUT/increase.png.
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from masa.bench.compress_suite import _score, load_base
from masa.bench.report import markdown_table
from masa.compress import CompressConfig, calibrate, compress
from masa.compress.api import calibration_tokens, resolve_targets
from masa.data.tokenizer import encode, load_tokenizer
from masa.eval import load_eval_text
from masa.eval.datasets import DATA_DIR
from masa.heal.loop import HealConfig, heal, teacher_topk, windows
from masa.io import write_json

RESULTS_JSON, RESULTS_MD, PLOT = "results.json", "results.md", "increase.png"


@dataclass
class RecoveryBenchConfig:
    """The grid (the ``small`` preset: a 2-core CPU in about half an hour on the 12-block bench model)."""

    methods: list[str] = field(default_factory=lambda: ["svd-llm", "basis-sharing", "masa"])
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    compensate: str | None = "eora"  # None: plain runs only
    heal_methods: list[str] = field(default_factory=lambda: ["masa", "svd-llm"])
    heal_ratios: list[float] = field(default_factory=lambda: [0.2, 0.4])
    heal_steps: list[int] = field(default_factory=lambda: [100, 500])
    heal_lr: float = 3e-4
    heal_batch: int = 8
    heal_windows: int = 1024  # windows of T tokens of the healing text (teacher top-k cached for them)
    top_k: int = 64
    calib_text: str = "gutenberg/austen-emma.txt"  # a slice of the training text; healing reads it too
    calib_samples: int = 32
    eval_text: str = "wikitext2-test"
    eval_tokens: int = 32_768
    eval_batch_size: int = 16
    cpu_threads: int = 1


def _key(run: dict) -> tuple:
    return run["method"], run["ratio"], run["variant"]


def _plan(config: RecoveryBenchConfig) -> list[dict]:
    runs = [
        {"method": m, "ratio": r, "variant": v}
        for m in config.methods
        for r in config.ratios
        for v in ("plain", *([config.compensate] if config.compensate else []))
    ]
    runs += [
        {"method": m, "ratio": r, "variant": f"healed {s}"}
        for s in config.heal_steps  # shorter runs first: a stopped run still has every method's
        for m in config.heal_methods
        for r in config.heal_ratios
    ]
    return runs


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(base, run: dict, stats, calib, teacher, config: RecoveryBenchConfig, eval_ids, seq_len: int) -> dict:
    model = copy.deepcopy(base)
    compensate = None if run["variant"] == "plain" or run["variant"].startswith("healed") else run["variant"]
    start = time.perf_counter()
    try:
        result = compress(model, CompressConfig(run["method"], run["ratio"], "all-linear", compensate=compensate),
                          calib, stats=stats)  # fmt: skip
    except ValueError as err:
        return {**run, "error": str(err)}
    record = {**run, "ratio_reached": result.ratio_reached, "compress_seconds": time.perf_counter() - start}
    if compensate:
        chosen = result.report["compensation"]
        record["eora"] = {k: chosen[k] for k in ("share", "inner_ratio")} | {"tried": chosen["tried"]}
    if run["variant"].startswith("healed"):
        steps = int(run["variant"].split()[1])
        heal_config = HealConfig(steps, config.heal_lr, config.heal_batch, seq_len, top_k=config.top_k,
                                 checkpoint_every=0)  # fmt: skip
        start = time.perf_counter()
        healed = heal(model, teacher, heal_config)
        seconds = time.perf_counter() - start
        losses = healed["losses"]
        record["heal"] = {"seconds_per_step": seconds / steps, "kl_first10": sum(losses[:10]) / 10,
                          "kl_last10": sum(losses[-10:]) / 10, "peak_rss_mb": _peak_rss_mb(), "lr": config.heal_lr}  # fmt: skip
    return {**record, **_score(model, eval_ids, seq_len, config.eval_batch_size)}


def run_bench(model_dir: Path, config: RecoveryBenchConfig, out: Path, command: str, log=print) -> dict:
    """Run (or resume) the grid into ``out``; returns the results."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    base, seq_len = load_base(model_dir)
    tokenizer = load_tokenizer(model_dir)
    eval_ids = torch.tensor(encode(tokenizer, load_eval_text(config.eval_text)), dtype=torch.long)
    eval_ids = eval_ids[: config.eval_tokens] if config.eval_tokens else eval_ids
    calib_path = (
        DATA_DIR / config.calib_text if (DATA_DIR / config.calib_text).is_file() else config.calib_text
    )
    calib = calibration_tokens(calib_path, tokenizer, config.calib_samples, seq_len)  # (N, T)
    path = out / RESULTS_JSON
    setup = {"model": str(model_dir), "config": asdict(config), "seq_len": seq_len}
    results = _load(path)
    if results.get("setup") != setup:
        results = {"setup": setup, "runs": []}
    results["command"] = command
    if "dense" not in results:
        results["dense"] = _score(base, eval_ids, seq_len, config.eval_batch_size)
        log(f"dense: ppl {results['dense']['ppl']:.2f}")
    done = {_key(r) for r in results["runs"]}
    todo = [r for r in _plan(config) if _key(r) not in done]
    stats = calibrate(
        base, calib, resolve_targets(copy.deepcopy(base), CompressConfig("svd", 0.5, "all-linear"))
    )
    teacher = None
    if any(r["variant"].startswith("healed") for r in todo):
        stream = torch.tensor(encode(tokenizer, load_eval_text(calib_path)), dtype=torch.long)
        heal_ids = windows(stream, HealConfig(batch_size=config.heal_batch, seq_len=seq_len))[
            : config.heal_windows
        ]
        teacher = teacher_topk(base, heal_ids, config.top_k, config.eval_batch_size)
    for run in todo:
        record = _one(base, run, stats, calib, teacher, config, eval_ids, seq_len)
        results["runs"].append(record)
        write_json(path, results)
        outcome = f"ppl {record['ppl']:.2f}" if "ppl" in record else f"error: {record['error'][:120]}"
        log(f"{run['method']} {run['ratio']:.2f} {run['variant']}: {outcome}")
    write_json(path, results)
    write_report(results, out)
    return results


def _load(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _runs(results: dict) -> dict[tuple, dict]:
    return {_key(r): r for r in results["runs"] if "ppl" in r}


def write_report(results: dict, out: Path) -> None:
    """results.md (tables, the user-level ratios) and increase.png."""
    dense, runs, config = results["dense"]["ppl"], _runs(results), results["setup"]["config"]
    variants = ["plain", *([config["compensate"]] if config["compensate"] else [])]
    variants += [f"healed {s}" for s in config["heal_steps"]]
    rows = []
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        for ratio in sorted({r["ratio"] for r in results["runs"]}):
            cells = [runs.get((method, ratio, v)) for v in variants]
            if not any(cells):
                continue
            rows.append([method, f"{ratio:.0%}", *(f"+{c['ppl'] - dense:.2f}" if c else "-" for c in cells)])
    eora_rows = [_eora_row(r) for r in results["runs"] if "eora" in r]
    heal_rows = [
        [r["method"], f"{r['ratio']:.0%}", r["variant"].split()[1], f"{r['heal']['kl_first10']:.4f}",
         f"{r['heal']['kl_last10']:.4f}", f"{r['heal']['seconds_per_step']:.2f}", f"{r['heal']['peak_rss_mb']:.0f}"]
        for r in results["runs"]
        if "heal" in r and "ppl" in r
    ]  # fmt: skip
    lines = [
        "# Recovery: EoRA and healing on all linear layers",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Dense perplexity {dense:.2f} ({results['dense']['protocol']}). Cells: perplexity increase over dense.",
        "",
        markdown_table(["method", "ratio", *variants], rows),
        "## EoRA: the split chosen (share of the stored budget spent on corrections; the method's own ratio)",
        "",
        "With `eora` the split is chosen by the calibration loss (shown as calibration perplexity) of each share "
        "tried; share 0 is the plain method (its rounding left-over spent on corrections). `eora:FRACTION` "
        "fixes the split (nothing searched, no calibration loss measured).",
        "",
        markdown_table(
            [
                "method",
                "ratio",
                "EoRA share",
                "method ratio",
                "calib ppl share 0",
                "calib ppl chosen",
                "calib ppl per share",
            ],
            eora_rows,
        ),  # fmt: skip
        "## Healing cost (KL: mean of the first / last 10 steps; peak RSS of the whole process so far)",
        "",
        markdown_table(
            ["method", "ratio", "steps", "KL first", "KL last", "s/step", "peak RSS MiB"], heal_rows
        ),
        "## User-level figures (goal: <= 0.5 training-free, <= 0.25 healed)",
        "",
        *_user_level(runs, dense, config),
    ]
    (out / RESULTS_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, variants, out / PLOT)


def _eora_row(run: dict) -> list[str]:
    eora = run["eora"]
    tried = [c for c in eora["tried"] if "criterion" in c]
    plain = next((c for c in tried if c["share"] == 0), None)
    chosen = next((c for c in tried if c["share"] == eora["share"]), None)

    def loss(c):
        return f"{math.exp(c['calibration_loss']):.3f}" if c and "calibration_loss" in c else "-"

    shares = " / ".join(f"{c['share']:g}: {loss(c)}" for c in tried)
    return [run["method"], f"{run['ratio']:.0%}", f"{eora['share']:.2f}", f"{eora['inner_ratio']:.3f}",
            loss(plain), loss(chosen), shares]  # fmt: skip


def _user_level(runs: dict, dense: float, config: dict) -> list[str]:
    lines = []
    for ratio in config["ratios"]:
        svd = runs.get(("svd-llm", ratio, "plain"))
        if svd is None:
            continue
        base = svd["ppl"] - dense
        free = [
            runs[k]["ppl"] - dense
            for k in runs
            if k[0] == "masa" and k[1] == ratio and not k[2].startswith("healed")
        ]
        healed = [
            runs[k]["ppl"] - dense
            for k in runs
            if k[0] == "masa" and k[1] == ratio and k[2].startswith("healed")
        ]
        parts = [f"masa best training-free / svd-llm plain = {min(free) / base:.2f}"] if free else []
        pair = [runs.get((m, ratio, config["compensate"])) for m in ("masa", "svd-llm")]
        if config["compensate"] and all(pair):  # like with like
            masa_eora, svd_eora = (r["ppl"] - dense for r in pair)
            parts.append(f"masa + EoRA / svd-llm + EoRA = {masa_eora / svd_eora:.2f}")
        parts += [f"masa best healed / svd-llm plain = {min(healed) / base:.2f}"] if healed else []
        text = f"- {ratio:.0%}: " + ("; ".join(parts) or "no masa run")
        lines.append(text)
    return lines


def _plot(results: dict, variants: list[str], path: Path) -> None:
    dense, runs = results["dense"]["ppl"], _runs(results)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in results["runs"]):
        for variant in variants:
            points = sorted(
                (k[1], r["ppl"] - dense) for k, r in runs.items() if k[0] == method and k[2] == variant
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"{method} {variant}")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (all linear layers)")
    ax.set_ylabel("perplexity increase over dense")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=130, bbox_inches="tight")


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench recovery`."""
    parser = benchmarks.add_parser(
        "recovery",
        help="EoRA and healing against plain compression (perplexity increase over dense)",
        description="Compress one model with a few methods and ratios, plain, with EoRA and healed; score "
        "held-out perplexity; write OUT/results.json, OUT/results.md and OUT/increase.png.",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="Llama-layout model directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")
    parser.add_argument(
        "--methods",
        default="svd-llm,basis-sharing,masa",
        metavar="M[,M...]",
        help="methods run plain and with EoRA (default svd-llm,basis-sharing,masa)",
    )
    parser.add_argument(
        "--ratios", default="0.2,0.4,0.6", metavar="R[,R...]", help="ratios (default 0.2,0.4,0.6)"
    )
    parser.add_argument(
        "--compensate",
        default="eora",
        metavar="eora[:RANK|:FRACTION]",
        help="the EoRA variant (default eora: split searched; eora:0.2 fixes it, one method run instead of six)",
    )
    parser.add_argument(
        "--heal-steps", default="100,500", metavar="N[,N...]", help="healing runs (default 100,500)"
    )
    parser.add_argument("--heal-lr", type=float, default=3e-4, help="healing learning rate (default 3e-4)")
    parser.add_argument(
        "--only",
        choices=("training-free", "healing"),
        help="run one half of the grid (e.g. in two processes)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from masa.compress.config import parse_compensation
    from masa.compress.registry import METHOD_NAMES

    steps = [int(s) for s in args.heal_steps.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHOD_NAMES]:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    ratios = [float(r) for r in args.ratios.split(",") if r]
    if bad := [r for r in ratios if not 0 < r < 1]:
        raise ValueError(f"--ratios: {bad} not in (0, 1); give ratios such as 0.2,0.4")
    parse_compensation(args.compensate)  # raises naming the fix
    config = RecoveryBenchConfig(methods=methods, ratios=ratios, compensate=args.compensate, heal_steps=steps,
                                 heal_lr=args.heal_lr)  # fmt: skip
    if args.only == "training-free":
        config.heal_methods = []
    elif args.only == "healing":
        config.methods = ["svd-llm"]  # the plain reference of the user-level figure
        config.compensate = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    words = [
        "masa",
        "bench",
        "recovery",
        "--model",
        args.model,
        "--methods",
        args.methods,
        "--ratios",
        args.ratios,
    ]
    words += ["--compensate", args.compensate] if args.compensate != "eora" else []
    words += ["--heal-steps", args.heal_steps]
    words += ["--heal-lr", str(args.heal_lr)] + (["--only", args.only] if args.only else [])
    command = shlex.join([*words, "--out", args.out])
    run_bench(Path(args.model), config, out, command, log=lambda line: print(line, flush=True))
    print(f"results: {out / RESULTS_MD}")
    return 0
