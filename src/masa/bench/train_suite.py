"""`masa bench train`: every attention variant of a suite trained on the same data, budget and seeds.

The runs of a suite differ only in the attention (:func:`suite_runs`). Each is trained by the ordinary
trainer in a fresh worker process (so peak memory is the run's own), then scored on the trainer's
held-out text and on an evaluation text (WikiText-2 test by default, chunked windows of the training
length). A finished run whose configuration is unchanged is reused, so an interrupted suite resumes.
The output folder gets results.json, results.md, ppl_vs_attention_params.png and loss_curves.png.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import masa
from masa.bench.report import Point, curve_plot, fmt_mean_std, markdown_table, mean_std, scatter_plot
from masa.data.tokenizer import encode, load_tokenizer, tokenizer_hash, vocab_size
from masa.eval import load_eval_text, perplexity
from masa.eval.datasets import resolve_eval_path
from masa.io import write_json
from masa.model import MasaLM, MasaLMConfig, configure_for_budget
from masa.model.config import VARIANT_KNOB
from masa.nn import parameter_kinds
from masa.train.checkpoint import latest_checkpoint
from masa.train.config import (
    FILLED_MODEL_KEYS,
    ConfigError,
    TrainConfig,
    TrainRunConfig,
    _checked,
    apply_overrides,
)
from masa.train.groups import DEFAULT_LR_MULT, multipliers
from masa.train.trainer import CHECKPOINT_DIR, METRICS_FILE, train

SUITES = ("table1", "ablation", "generator")
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PPL_PLOT, CURVES_PLOT = "ppl_vs_attention_params.png", "loss_curves.png"
RUN_RECORD = "bench_run.json"  # a finished run's configuration and scores, beside its trainer output
_BASELINES = ("gqa", "lowrank", "seq-share", "cycle-share")
_ABLATION_FRACTIONS = (1 / 6, 1 / 3, 1 / 2, 2 / 3)  # S as a fraction of L: {2, 4, 6, 8} for L = 12
_KNOB_SYMBOL = {"gqa_groups": "g", "rank": "r", "n_unique": "M", "n_atoms": "S"}
_SUITE_SET_KEYS = ("n_kv_head", "coef_generator", *_KNOB_SYMBOL)  # the suite sets these per run
_FIXED = (
    "label",
    "method",
    "attention",
    "knob",
    "coefficients",
    "attention_params",
    "attention_ratio",
    "total_params",
    "epochs",
)
_METRICS = ("held_out_loss", "held_out_ppl", "eval_ppl", "tokens_per_s", "peak_memory_mb", "wall_time_s")


@dataclass
class BenchConfig:
    """The `[bench]` table of a benchmark preset: the budget the baselines meet and how runs are scored."""

    target_ratio: float = 2 / 3  # attention compression of the equal-budget baselines (the paper's 66.7 %)
    coef_generator: bool = True  # masa runs learn coefficients through the paper's generator MLP
    eval_text: str = "wikitext2-test"  # scored with chunked windows of T = data.seq_len
    eval_tokens: int = 0  # score only the first N tokens of eval_text; 0 = all of it
    eval_batch_size: int = 8  # windows per forward when scoring eval_text
    cpu_threads: int = 0  # torch threads per run on CPU; 0 = torch's default (one per core)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_ratio < 1.0:
            raise ConfigError(f"bench.target_ratio {self.target_ratio} must lie in (0, 1), e.g. 0.667")
        if self.eval_tokens < 0 or self.cpu_threads < 0 or self.eval_batch_size < 1:
            raise ConfigError(
                "bench.eval_tokens and bench.cpu_threads must be >= 0 (0 = all / default), "
                "bench.eval_batch_size >= 1"
            )
        resolve_eval_path(self.eval_text)  # raises with the valid names when unknown


@dataclass
class SuiteConfig:
    """A benchmark preset: the training run every variant shares (dense `[model]`) and `[bench]`."""

    run: TrainRunConfig
    bench: BenchConfig

    def __post_init__(self) -> None:
        model = self.run.model
        if model.get("attention", "dense") != "dense" or any(key in model for key in _SUITE_SET_KEYS):
            raise ConfigError(
                "the suite sets each run's attention: leave model.attention dense and remove "
                f"{', '.join(_SUITE_SET_KEYS)} from [model] (use bench.coef_generator for the generator)"
            )

    @classmethod
    def from_toml(cls, path: str | Path, overrides: Sequence[str] = ()) -> SuiteConfig:
        """Read a preset ([model], [data], [train], [bench]) and apply `section.key=value` overrides."""
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
        raw = apply_overrides(raw, overrides)
        bench = _checked(BenchConfig, "bench", raw.pop("bench", {}))
        return cls(TrainRunConfig.from_dict(raw), BenchConfig(**bench))


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite: its attention variant, set to a compression budget or to S atoms."""

    attention: str
    target_ratio: float | None = None  # the knob is chosen to meet this attention compression
    n_atoms: int | None = None  # masa-*: dictionary size S, used instead of a budget
    coef_generator: bool | None = None  # masa-*: generator or plain coefficients; None = bench's choice

    @property
    def label(self) -> str:
        label = f"{self.attention}-S{self.n_atoms}" if self.n_atoms else self.attention
        if self.coef_generator is None:
            return label
        return label + ("-generator" if self.coef_generator else "-plain")


def suite_runs(suite: str, n_layer: int, target_ratio: float) -> list[RunSpec]:
    """The runs of a suite, dense first.

    table1: dense, the four baselines at ``target_ratio``, masa-qkv and masa-qkvo with S = L/3.
    ablation: dense (reference), masa-qkv and masa-qkvo with S = L/6, L/3, L/2, 2L/3.
    generator: dense (reference), masa-qkv and masa-qkvo with S = L/3, each with the generator MLP
    and with plain coefficients.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")
    dense = RunSpec("dense", target_ratio)
    s = max(1, round(n_layer / 3))
    if suite == "generator":
        masa = [
            RunSpec(a, n_atoms=s, coef_generator=g) for a in ("masa-qkv", "masa-qkvo") for g in (True, False)
        ]
        return [dense, *masa]
    if suite == "table1":
        baselines = [RunSpec(attention, target_ratio) for attention in _BASELINES]
        return [dense, *baselines, RunSpec("masa-qkv", n_atoms=s), RunSpec("masa-qkvo", n_atoms=s)]
    sizes = sorted({max(1, round(n_layer * f)) for f in _ABLATION_FRACTIONS})
    return [dense, *(RunSpec(a, n_atoms=s) for a in ("masa-qkv", "masa-qkvo") for s in sizes)]


def select_runs(suite: str, specs: list[RunSpec], methods: Sequence[str] | None) -> list[RunSpec]:
    """The runs labelled ``methods`` (all when None) and dense, the reference; an unknown label is named."""
    if not methods:
        return specs
    labels = [spec.label for spec in specs]
    if unknown := sorted(set(methods) - set(labels)):
        raise ValueError(f"suite {suite} has no run {', '.join(unknown)}: choose among {', '.join(labels)}")
    return [spec for spec in specs if spec.label in methods or spec.label == "dense"]


def variant_config(spec: RunSpec, base: MasaLMConfig, coef_generator: bool) -> MasaLMConfig:
    """The model of one run: ``base``'s shape with the run's attention and knob."""
    if spec.n_atoms is None:
        config, _ = configure_for_budget(base, spec.attention, spec.target_ratio)
    else:
        config = dataclasses.replace(base, attention=spec.attention, n_atoms=spec.n_atoms)
    if spec.coef_generator is not None:
        coef_generator = spec.coef_generator
    if coef_generator and spec.attention.startswith("masa"):
        config = dataclasses.replace(config, coef_generator=True)
    return config


def knob_text(config: MasaLMConfig) -> str:
    """The variant's knob as the paper writes it (``S=4``, ``g=4``, ``r=42``, ``M=4``; ``-`` for dense)."""
    knob = VARIANT_KNOB[config.attention]
    return f"{_KNOB_SYMBOL[knob]}={getattr(config, knob)}" if knob else "-"


def method_name(config: MasaLMConfig) -> str:
    """The variant and its knob, e.g. ``masa-qkvo S=4`` (``dense`` alone)."""
    knob = knob_text(config)
    return config.attention if knob == "-" else f"{config.attention} {knob}"


def coefficient_kind(config: MasaLMConfig) -> str:
    """How a masa model learns its coefficients (``generator`` or ``plain``); ``-`` for other variants."""
    if not config.attention.startswith("masa"):
        return "-"
    return "generator" if config.coef_generator else "plain"


def _device(preference: str) -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def _train_or_continue(config: TrainRunConfig) -> dict[str, Any]:
    """Train a bench run: continue an interrupted run of the same settings from its last checkpoint,
    else start it (again) from scratch."""
    if latest_checkpoint(Path(config.train.out_dir) / CHECKPOINT_DIR) is not None:
        try:
            return train(config, resume=True)
        except ConfigError as err:
            print(f"[bench] {config.train.out_dir}: starting again ({err})", flush=True)
    return train(config, overwrite=True)


def score_run(config: TrainRunConfig, bench: BenchConfig) -> dict[str, Any]:
    """Train one run, then count its parameters and score it; returns its record (without labels)."""
    if bench.cpu_threads:
        torch.set_num_threads(bench.cpu_threads)
    summary = _train_or_continue(config)
    out_dir, model_dir = Path(summary["out_dir"]), Path(summary["model_dir"])
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)  # the final model stays in model_dir
    model = masa.load(model_dir, device=_device(config.train.device))
    tok = load_tokenizer(model_dir)
    ids = torch.tensor(encode(tok, load_eval_text(bench.eval_text)), dtype=torch.long)  # (N,)
    ids = ids[: bench.eval_tokens or None]
    scored = perplexity(
        model, ids, "chunked", config.data.seq_len, batch_size=bench.eval_batch_size, progress=False
    )
    counts = masa.count(model)
    log = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines() if line]
    evaluated = [r for r in log if "val_loss" in r]
    return {
        "attention_params": counts.attention,
        "attention_params_dense": counts.attention_dense,
        "attention_ratio": counts.attention_ratio,
        "total_params": counts.total,
        "held_out_loss": summary["val_loss"],
        "held_out_ppl": summary["val_ppl"],
        "eval_ppl": scored.ppl,
        "eval_protocol": scored.describe(),
        "tokens_per_s": log[-1]["tokens_per_s"],  # training steps only: logged before the final evaluation
        "peak_memory_mb": summary["peak_memory_mb"],
        "wall_time_s": summary["wall_time_s"],
        "epochs": summary["epochs_seen"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_tokens": summary["train_tokens"],
        "valid_tokens": summary["valid_tokens"],
        "tokenizer": {"vocab_size": vocab_size(tok), "hash": tokenizer_hash(tok)},
        "curve": {"tokens": [r["tokens"] for r in log], "loss": [r["loss"] for r in log]},
        "val_curve": {"tokens": [r["tokens"] for r in evaluated], "loss": [r["val_loss"] for r in evaluated]},
        "model_dir": str(model_dir),
    }


def run_config(shared: TrainRunConfig, model: MasaLMConfig, seed: int, out_dir: Path) -> TrainRunConfig:
    """The shared training run with this run's model, seed and output folder."""
    table = {
        k: v for k, v in dataclasses.asdict(model).items() if k not in FILLED_MODEL_KEYS and v is not None
    }
    train_config = dataclasses.replace(
        shared.train, seed=seed, out_dir=str(out_dir), **_own_multipliers(shared.train, model)
    )
    return TrainRunConfig(model=table, data=shared.data, train=train_config)


def _own_multipliers(train: TrainConfig, model: MasaLMConfig) -> dict[str, dict[str, float]]:
    """The multipliers in effect (defaults and the suite's ``lr_mult`` / ``wd_mult``) for the parameter
    kinds this run's model has, written out: a multiplier for the generator applies to the runs that have
    one (the trainer refuses the others), and a run recorded under other defaults is not taken for this one."""
    with torch.device("meta"):
        kinds = set(parameter_kinds(MasaLM(model)).values())
    lr_mult, _ = multipliers(train.lr_mult, {})
    return {
        "lr_mult": {k: v for k, v in lr_mult.items() if k in kinds and (v != 1.0 or k in DEFAULT_LR_MULT)},
        "wd_mult": {k: v for k, v in train.wd_mult.items() if k in kinds},
    }


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a new worker process (forked from a server that has masa imported)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def _plain(data: Any) -> Any:
    return json.loads(json.dumps(data))


# [bench] fields that change a run's record; target_ratio and coef_generator act through its model config
_SCORING_KEYS = ("eval_text", "eval_tokens", "eval_batch_size", "cpu_threads")


def _normalised(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A saved run configuration as this masa writes it: settings added since take their defaults, so
    a run recorded before a new option existed still counts as the same run."""
    try:
        return _plain(TrainRunConfig.from_dict(config).to_dict()) if config else None
    except (ConfigError, TypeError, ValueError):
        return None


def _scored_run(config: TrainRunConfig, bench: BenchConfig) -> dict[str, Any]:
    """A run's record: reused from its folder when trained and scored the same way, else trained now."""
    scoring = {name: getattr(bench, name) for name in _SCORING_KEYS}
    key = _plain({"config": config.to_dict(), "bench": scoring})
    path = Path(config.train.out_dir) / RUN_RECORD
    if path.is_file():
        saved = json.loads(path.read_text())
        done = saved.get("key", {})
        same_scoring = all(done.get("bench", {}).get(name) == value for name, value in key["bench"].items())
        if _normalised(done.get("config")) == key["config"] and same_scoring:
            return saved["record"]
    record = _in_fresh_process(score_run, config, bench)
    write_json(path, {"key": key, "record": record})
    return record


def run_suite(
    suite: str,
    config: SuiteConfig,
    seeds: int,
    out_dir: str | Path,
    command: str = "",
    methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train and score every run of ``suite`` for ``seeds`` seeds; write the results folder; return results.

    Seeds are train.seed, train.seed + 1, ...; all runs of one seed go first (dense first), so a
    suite cut short still holds whole tables. Runs live in ``train.out_dir/<suite>/<label>/seed<N>``
    (``<label>-plain`` for masa runs with plain coefficients instead of the generator). ``methods``
    keeps only the runs with those labels (dense, the reference, always runs).
    """
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: run at least one seed")
    base = config.run.model_config(config.run.data.vocab_size)  # knobs do not depend on the vocabulary
    specs = suite_runs(suite, base.n_layer, config.bench.target_ratio)
    specs = select_runs(suite, specs, methods)
    models = {spec.label: variant_config(spec, base, config.bench.coef_generator) for spec in specs}
    seed_list = [config.run.train.seed + i for i in range(seeds)]
    records = []
    for seed in seed_list:
        for spec in specs:
            model = models[spec.label]
            plain = spec.n_atoms and not model.coef_generator and spec.coef_generator is None
            folder = spec.label + ("-plain" if plain else "")
            run_dir = Path(config.run.train.out_dir) / suite / folder / f"seed{seed}"
            record = {
                "label": spec.label,
                "method": method_name(model),
                "attention": spec.attention,
                "knob": knob_text(model),
                "coefficients": coefficient_kind(model),
                "seed": seed,
            }
            run = run_config(config.run, model, seed, run_dir)
            record.update(_scored_run(run, config.bench))
            records.append(record)
            print(
                f"[bench {suite}] {record['method']} seed {seed}: held-out ppl {record['held_out_ppl']:.2f}, "
                f"{config.bench.eval_text} ppl {record['eval_ppl']:.2f}, {record['tokens_per_s']:,.0f} tok/s",
                flush=True,
            )
    results = {
        "suite": suite,
        "command": command,
        "seeds": seed_list,
        "config": {**config.run.to_dict(), "bench": dataclasses.asdict(config.bench)},
        "methods": summarize(records, [spec.label for spec in specs]),
        "runs": records,
    }
    write_results(results, Path(out_dir))
    return results


def summarize(records: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: its fixed numbers, and mean / std / values over seeds of every metric."""
    methods = []
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        row = {key: runs[0][key] for key in _FIXED}
        for metric in _METRICS:
            values = [r[metric] for r in runs]
            mean, std = mean_std(values)
            row[metric] = {"mean": mean, "std": std, "values": values}
        methods.append(row)
    dense = next((m for m in methods if m["attention"] == "dense"), None)
    for row in methods:
        row["speed_vs_dense"] = row["tokens_per_s"]["mean"] / dense["tokens_per_s"]["mean"] if dense else None
    return methods


def write_results(results: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.md and the two plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_JSON, results)
    (out_dir / RESULTS_MD).write_text(markdown_report(results), encoding="utf-8")
    methods = results["methods"]
    points = [
        Point(
            m["method"],
            m["attention_params"],
            m["held_out_ppl"]["mean"],
            m["held_out_ppl"]["std"],
        )
        for m in methods
    ]
    title = f"{results['suite']}: held-out perplexity vs attention parameters"
    scatter_plot(out_dir / PPL_PLOT, points, "attention parameters (stored)", "held-out perplexity", title)
    curves = {}
    for m in methods:
        runs = [r for r in results["runs"] if r["label"] == m["label"]]
        losses = zip(*(r["curve"]["loss"] for r in runs), strict=True)  # same logged steps in every seed
        curves[m["method"]] = (
            [t / 1e6 for t in runs[0]["curve"]["tokens"]],
            [sum(step) / len(runs) for step in losses],
        )
    seeds = len(results["seeds"])
    curve_title = f"{results['suite']}: training loss (mean of {seeds} seed{'s' * (seeds > 1)})"
    curve_plot(
        out_dir / CURVES_PLOT, curves, "training tokens (millions)", "training loss (nats/token)", curve_title
    )


def markdown_report(results: dict[str, Any]) -> str:
    """The results as markdown: the setup and protocols, one table row per method, the plots."""
    cfg, runs = results["config"], results["runs"]
    model, data, tc, bench = cfg["model"], cfg["data"], cfg["train"], cfg["bench"]
    first = runs[0]
    coefficients = "from the generator MLP (collapsed after training)" if bench["coef_generator"] else "plain"
    if results["suite"] == "generator":
        coefficients = "from the generator MLP (collapsed after training) or plain, as the table says"
    held_out = tc["batch_size"] * min(
        tc["eval_batches"], (first["valid_tokens"] - 1) // data["seq_len"] // tc["batch_size"]
    )  # windows the trainer's evaluation scores
    lines = [
        f"# masa bench train: {results['suite']}",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"- Model: pre-norm decoder, {model['n_layer']} blocks, d={model['d_model']}, "
        f"{model['n_head']} heads; "
        f"tokenizer: {data['tokenizer']} with {first['tokenizer']['vocab_size']} tokens trained on the "
        f"training files (hash {first['tokenizer']['hash']}).",
        f"- Data: {', '.join(data['train'])}; held out: the last {data['valid_fraction']:.0%} of every file"
        + (f" and {', '.join(data['valid_files'])}" if data["valid_files"] else "")
        + f". {first['train_tokens']:,} training tokens, {first['valid_tokens']:,} held-out tokens.",
        f"- Budget (every run): {first['tokens']:,} tokens = {first['steps']} steps of {tc['batch_size']}x"
        f"{tc['grad_accum']} windows of T={data['seq_len']} ({first['epochs']:.3g} epochs); AdamW "
        f"betas {tuple(tc['betas'])}, weight decay {tc['weight_decay']}, lr {tc['lr']} with "
        f"{tc['warmup_fraction']:.0%} warmup then cosine to {tc['min_lr']}, clip {tc['grad_clip']}; "
        f"seeds {', '.join(map(str, results['seeds']))} (mean ± sample std).",
        f"- Attention: baselines at the knob closest to {bench['target_ratio']:.1%} attention compression; "
        f"masa coefficients {coefficients}. "
        "Attention compression = 1 - stored attention parameters / dense MHA attention parameters.",
        f"- Held-out ppl: exp(trainer's held-out loss) on the first {held_out} windows of "
        f"T={data['seq_len']} tokens of the held-out text, every target scored.",
        f"- {bench['eval_text']} ppl: {first['eval_protocol']} (same tokenizer)"
        + (f", first {bench['eval_tokens']:,} tokens of the text" if bench["eval_tokens"] else "")
        + ".",
        "- tokens/s: training steps only (evaluation excluded), runs one after another on one machine"
        + (f", {bench['cpu_threads']} torch thread(s) per run on CPU" if bench["cpu_threads"] else "")
        + "; x dense = mean tokens/s / dense mean tokens/s. Peak memory: process RSS on CPU, max allocated "
        "on GPU.",
        "",
    ]
    headers = [
        "method", "knob", "coefficients", "attn params", "attn compr.", "total params", "held-out ppl",
        f"{bench['eval_text']} ppl", "tokens/s", "x dense", "peak MB", "wall s", "epochs",
    ]  # fmt: skip
    rows = [
        [
            m["attention"],
            m["knob"],
            m.get("coefficients", "-"),
            f"{m['attention_params']:,}",
            f"{m['attention_ratio']:.1%}",
            f"{m['total_params']:,}",
            fmt_mean_std(m["held_out_ppl"]["values"]),
            fmt_mean_std(m["eval_ppl"]["values"]),
            fmt_mean_std(m["tokens_per_s"]["values"], 0),
            "-" if m["speed_vs_dense"] is None else f"{m['speed_vs_dense']:.3f}",
            fmt_mean_std(m["peak_memory_mb"]["values"], 0),
            fmt_mean_std(m["wall_time_s"]["values"], 0),
            f"{m['epochs']:.3g}",
        ]
        for m in results["methods"]
    ]
    lines += [markdown_table(headers, rows), f"![perplexity vs attention parameters]({PPL_PLOT})", ""]
    lines += [f"![training loss curves]({CURVES_PLOT})", ""]
    return "\n".join(lines)
