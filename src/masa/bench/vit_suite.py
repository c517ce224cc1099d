"""`masa bench vit`: every attention variant of a ViT trained on one image set at equal attention budget.

Like `masa bench train --suite table1` for the language model: dense, the four baselines at the knob
closest to ``bench.target_ratio``, and MASA-QKV / MASA-QKVO with S = L/3 atoms, each for every seed;
scored by top-1 accuracy on a fixed held-out split. A finished run whose configuration is unchanged
is reused from ``OUT/runs/``, so an interrupted suite resumes. Writes results.json, results.md and
accuracy_vs_attention_params.png.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from masa.bench.report import Point, fmt_mean_std, markdown_table, mean_std, scatter_plot
from masa.data.images import load_images
from masa.io import write_json
from masa.model import configure_for_budget
from masa.model.vit import MasaViTConfig
from masa.train.config import ConfigError, _checked, apply_overrides, read_toml
from masa.train.vision import VisionTrainConfig, train_vit

PRESET = Path(__file__).resolve().parent.parent / "presets" / "bench_vit_digits.toml"
RESULTS_JSON, RESULTS_MD, ACC_PLOT = "results.json", "results.md", "accuracy_vs_attention_params.png"
_VARIANTS = ("dense", "gqa", "lowrank", "seq-share", "cycle-share", "masa-qkv", "masa-qkvo")
_MASA_QKV_RATIO = 0.5  # masa-qkv keeps O per block: S = L/3 gives the paper's 50 %


@dataclass
class VitBenchConfig:
    """The `[bench]` table: the image set and the attention budget the variants meet."""

    data: str = (
        "digits"  # "digits" (bundled), a CIFAR binary folder, or an image folder (one sub-folder per class)
    )
    target_ratio: float = 2 / 3  # attention compression of the baselines and of masa-qkvo
    coef_generator: bool = False  # masa coefficients from the generator MLP (else plain)
    cpu_threads: int = 1  # torch threads per run on CPU (one count for every compared run)

    def __post_init__(self) -> None:
        if not 0.0 < self.target_ratio < 1.0:
            raise ConfigError(f"bench.target_ratio {self.target_ratio} must lie in (0, 1), e.g. 0.667")
        if self.cpu_threads < 0:
            raise ConfigError("bench.cpu_threads must be >= 0 (0 = torch's default)")


@dataclass
class VitSuiteConfig:
    """A ViT bench preset: the dense `[model]`, the `[train]` recipe and `[bench]`."""

    model: MasaViTConfig
    train: VisionTrainConfig
    bench: VitBenchConfig

    @classmethod
    def from_toml(cls, path: str | Path = PRESET, overrides: Sequence[str] = ()) -> VitSuiteConfig:
        raw = apply_overrides(read_toml(path), overrides)
        unknown = sorted(set(raw) - {"model", "train", "bench"})
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}]: valid sections are model, train, bench")
        try:
            model = MasaViTConfig(**_checked(MasaViTConfig, "model", raw.get("model", {})))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[model]: {err}") from err
        if model.attention != "dense":
            raise ConfigError("the suite sets each run's attention: leave model.attention dense")
        train = VisionTrainConfig(**_checked(VisionTrainConfig, "train", raw.get("train", {})))
        return cls(model, train, VitBenchConfig(**_checked(VitBenchConfig, "bench", raw.get("bench", {}))))


def vit_runs(base: MasaViTConfig, target_ratio: float, coef_generator: bool) -> list[MasaViTConfig]:
    """One config per variant: baselines and masa-qkvo at ``target_ratio``; masa-qkv at 50 % (S = L/3)."""
    runs = []
    for attention in _VARIANTS:
        ratio = min(target_ratio, _MASA_QKV_RATIO) if attention == "masa-qkv" else target_ratio
        config, _ = configure_for_budget(base, attention, ratio)
        if attention.startswith("masa"):
            config = dataclasses.replace(config, coef_generator=coef_generator)
        runs.append(config)
    return runs


def _knob(config: MasaViTConfig) -> str:
    for name, symbol in (("gqa_groups", "g"), ("rank", "r"), ("n_unique", "M"), ("n_atoms", "S")):
        if getattr(config, name) is not None:
            return f"{symbol}={getattr(config, name)}"
    return "-"


def run_vit_suite(
    config: VitSuiteConfig, seeds: int, out_dir: str | Path, command: str = ""
) -> dict[str, Any]:
    """Train and score every variant for ``seeds`` seeds (train.seed, +1, ...); write the results folder."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: run at least one seed")
    if config.bench.cpu_threads:
        torch.set_num_threads(config.bench.cpu_threads)
    out_dir = Path(out_dir)
    data = load_images(config.bench.data)
    models = vit_runs(config.model, config.bench.target_ratio, config.bench.coef_generator)
    records = []
    for seed in range(config.train.seed, config.train.seed + seeds):
        tc = dataclasses.replace(config.train, seed=seed)
        for model in models:
            key = {"model": model.to_dict(), "train": dataclasses.asdict(tc), "data": config.bench.data}
            path = out_dir / "runs" / model.attention / f"seed{seed}.json"
            saved = json.loads(path.read_text()) if path.is_file() else {}
            if saved.get("key") != json.loads(json.dumps(key)):
                _, summary = train_vit(model, data, tc)
                saved = {"key": key, "record": summary}
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, saved)
            record = {"attention": model.attention, "knob": _knob(model), "seed": seed, **saved["record"]}
            records.append(record)
            print(
                f"[bench vit] {model.attention} {record['knob']} seed {seed}: top-1 {record['top1']:.2%}, "
                f"{record['images_per_s']:,.0f} images/s",
                flush=True,
            )
    results = {
        "command": command,
        "seeds": sorted({r["seed"] for r in records}),
        "config": {
            "model": config.model.to_dict(),
            "train": dataclasses.asdict(config.train),
            "bench": dataclasses.asdict(config.bench),
        },
        "runs": records,
    }
    write_vit_results(results, out_dir)
    return results


def write_vit_results(results: dict[str, Any], out_dir: Path) -> None:
    """results.json (without loss curves), results.md and the accuracy plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    variants = list(dict.fromkeys(r["attention"] for r in runs))
    rows, points = [], []
    for attention in variants:
        mine = [r for r in runs if r["attention"] == attention]
        first = mine[0]
        top1 = [100 * r["top1"] for r in mine]
        rows.append([
            attention, first["knob"], f"{first['attention_params']:,}", f"{first['attention_ratio']:.1%}",
            f"{first['total_params']:,}", fmt_mean_std(top1), fmt_mean_std([r["images_per_s"] for r in mine], 0),
        ])  # fmt: skip
        mean, std = mean_std(top1)
        points.append(Point(f"{attention} {first['knob']}", first["attention_params"], mean, std))
    write_json(out_dir / RESULTS_JSON, {**results, "runs": [{**r, "curve": None} for r in runs]})
    cfg, first = results["config"], runs[0]
    model, tc = cfg["model"], cfg["train"]
    lines = [
        "# masa bench vit",
        "",
        f"Command: `{results['command']}`" if results["command"] else "",
        "",
        f"- Data: {cfg['bench']['data']}; {first['train_images']} training and {first['valid_images']} held-out "
        f"images (a fixed random {tc['valid_fraction']:.0%} split).",
        f"- Model: ViT, {model['image_size']}x{model['image_size']} images in {model['patch_size']}x"
        f"{model['patch_size']} patches, {model['n_layer']} pre-norm blocks, d={model['d_model']}, "
        f"{model['n_head']} heads, {model['pool']} pooling; baselines and masa-qkvo at the knob closest to "
        f"{cfg['bench']['target_ratio']:.1%} attention compression, masa-qkv at 50 %; masa coefficients "
        f"{'from the generator MLP' if cfg['bench']['coef_generator'] else 'plain'}.",
        f"- Training: {tc['epochs']} epochs of batches of {tc['batch_size']}, AdamW lr {tc['lr']} (10 % warmup, "
        f"cosine to {tc['min_lr']}), weight decay {tc['weight_decay']}, clip {tc['grad_clip']}; seeds "
        f"{', '.join(map(str, results['seeds']))} (mean ± sample std); {cfg['bench']['cpu_threads']} torch "
        "thread(s) per run.",
        "",
        markdown_table(
            ["method", "knob", "attn params", "attn compr.", "total params", "top-1 %", "images/s"], rows
        ),
        "",
        f"![top-1 vs attention parameters]({ACC_PLOT})",
        "",
    ]
    (out_dir / RESULTS_MD).write_text("\n".join(lines), encoding="utf-8")
    title = "ViT: held-out top-1 vs attention parameters"
    scatter_plot(out_dir / ACC_PLOT, points, "attention parameters (stored)", "top-1 accuracy (%)", title)
