"""`masa train` for a ViT: a TOML with ``[model]`` (a :class:`MasaViTConfig`), ``[data] images = ...`` and
``[train]`` (a :class:`VisionTrainConfig` plus ``out_dir``).

The run directory gets the language-model runs' protections (an existing run is refused without
``--overwrite``, one process at a time through the directory lock, an atomic ``final/``) and the same
files: ``metrics.jsonl`` (the loss of every step), ``final/`` (loads with ``masa.load``) and
``summary.json``. A ViT run on the image sets masa serves takes minutes and keeps no checkpoints, so
``--resume`` is refused with what to do instead.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masa.model.vit import MasaViTConfig
from masa.train.config import ConfigError, _checked
from masa.train.vision import VisionTrainConfig

VISION_SECTIONS = ("model", "data", "train")


def is_vision_config(raw: dict[str, Any]) -> bool:
    """Whether a parsed run TOML describes a ViT run (its ``[data]`` names ``images``)."""
    data = raw.get("data")
    return isinstance(data, dict) and "images" in data


@dataclass
class VisionRunConfig:
    """A ViT training run: the model, the image set (``digits``, a CIFAR binary folder or an image
    folder, relative paths under data/) and the recipe; ``out_dir`` is the run directory."""

    model: MasaViTConfig
    images: str
    train: VisionTrainConfig
    out_dir: str = "runs/vit"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionRunConfig:
        if unknown := sorted(set(raw) - set(VISION_SECTIONS)):
            raise ConfigError(f"unknown section [{unknown[0]}]: a ViT run has {', '.join(VISION_SECTIONS)}")
        data = dict(raw.get("data", {}))
        images = data.pop("images", None)
        if data:
            raise ConfigError(f"unknown key data.{sorted(data)[0]}: a ViT run's [data] has only images")
        if not isinstance(images, str) or not images:
            raise ConfigError('data.images must name the image set: "digits", or a folder under data/')
        train = dict(raw.get("train", {}))
        out_dir = train.pop("out_dir", cls.out_dir)
        try:
            model = MasaViTConfig(**_checked(MasaViTConfig, "model", raw.get("model", {})))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[model]: {err}") from err
        tc = VisionTrainConfig(**_checked(VisionTrainConfig, "train", train))
        return cls(model, images, tc, str(out_dir))


def train_vision(config: VisionRunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the ViT of ``config`` into its run directory; returns the summary (also in summary.json)."""
    import masa
    from masa.data.images import load_images
    from masa.io import write_json
    from masa.io.atomic import write_text
    from masa.io.lock import directory_lock
    from masa.train.rundir import FINAL_DIR, METRICS_FILE, SUMMARY_FILE, prepare_run_dir
    from masa.train.vision import train_vit

    if resume:
        raise ConfigError(
            "a ViT run keeps no checkpoints (it trains in minutes), so there is nothing to resume: "
            "run it again with --overwrite"
        )
    out_dir = Path(config.out_dir)
    with directory_lock(out_dir):
        prepare_run_dir(out_dir, False, overwrite)
        data = load_images(config.images)
        model, summary = train_vit(config.model, data, config.train)
        curve = summary.pop("curve")
        lines = (json.dumps({"step": step, "loss": loss}) + "\n" for step, loss in enumerate(curve, 1))
        write_text(out_dir / METRICS_FILE, "".join(lines))
        summary = {"images": config.images, **summary, "config": {"model": config.model.to_dict(),
                   "train": dataclasses.asdict(config.train)}, "out_dir": str(out_dir),
                   "model_dir": str(out_dir / FINAL_DIR)}  # fmt: skip
        masa.save(model, out_dir / FINAL_DIR, info={"training": summary}, overwrite=True)
        write_json(out_dir / SUMMARY_FILE, summary)
    return summary
