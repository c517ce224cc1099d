"""Training a ViT classifier on an image set: AdamW by parameter kind, warmup + cosine, top-1 accuracy.

The same optimiser recipe as the language-model trainer (``train.groups``, ``lr_at``, clipping), on
one process: the image sets it serves (the bundled digits, CIFAR) fit in memory as one tensor.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import masa
from masa.data.images import ImageSet
from masa.model.vit import MasaViT, MasaViTConfig
from masa.train.config import ConfigError
from masa.train.groups import check_multipliers, param_groups
from masa.train.trainer import lr_at


@dataclass
class VisionTrainConfig:
    """Optimisation of a ViT run (the `[train]` table of a ViT bench preset)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_fraction: float = 0.1
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    lr_mult: dict[str, float] = field(default_factory=dict)
    wd_mult: dict[str, float] = field(default_factory=dict)
    valid_fraction: float = 0.2  # images held out for top-1 accuracy (a fixed split, seed 0)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} is {getattr(self, name)}: it must be >= 1")
        if not 0.0 < self.min_lr <= self.lr:
            raise ConfigError(f"need 0 < train.min_lr <= train.lr, got min_lr={self.min_lr}, lr={self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError("train.warmup_fraction must lie in [0, 1) and train.valid_fraction in (0, 1)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
        try:
            check_multipliers("lr_mult", self.lr_mult)
            check_multipliers("wd_mult", self.wd_mult)
        except ValueError as err:
            raise ConfigError(str(err)) from err


@torch.no_grad()
def accuracy(model: MasaViT, data: ImageSet, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(data.images[i : i + batch_size]).argmax(-1) == data.labels[i : i + batch_size]).sum())
        for i in range(0, len(data), batch_size)
    )
    model.train(was_training)
    return correct / len(data)


def train_vit(config: MasaViTConfig, data: ImageSet, tc: VisionTrainConfig) -> tuple[MasaViT, dict[str, Any]]:
    """Train a ViT on ``data`` (split by ``tc.valid_fraction``); returns the model (generator collapsed)
    and a summary: top-1 accuracy, parameters, images/s, the loss curve."""
    shape = tuple(data.images.shape[1:])
    if shape != (config.channels, config.image_size, config.image_size):
        raise ConfigError(
            f"images of shape {shape} but the model takes ({config.channels}, {config.image_size}, "
            f"{config.image_size}): set model.channels and model.image_size to the data's"
        )
    train_set, valid_set = data.split(tc.valid_fraction)
    torch.manual_seed(tc.seed)
    model = MasaViT(dataclasses.replace(config)).train()  # collapsing the generator edits its config
    try:
        groups = param_groups(model, tc.weight_decay, tc.lr_mult, tc.wd_mult)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    per_epoch = math.ceil(len(train_set) / tc.batch_size)
    total = tc.epochs * per_epoch
    curve: list[float] = []
    start = time.perf_counter()
    for epoch in range(tc.epochs):
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(tc.seed * 10_000 + epoch)
        )
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, tc.lr, tc.min_lr, tc.warmup_fraction) * group["lr_mult"]
            idx = order[i * tc.batch_size : (i + 1) * tc.batch_size]
            loss = F.cross_entropy(model(train_set.images[idx]), train_set.labels[idx])
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
    wall = time.perf_counter() - start
    masa.collapse_generators(model)
    stored = sum(p.numel() for p in model.attention_parameters())
    summary = {
        "top1": accuracy(model, valid_set),
        "train_top1": accuracy(model, train_set),
        "attention_params": stored,
        "attention_ratio": 1.0 - stored / model.dense_attention_params(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "images_per_s": tc.epochs * len(train_set) / wall,
        "wall_time_s": wall,
        "steps": total,
        "train_images": len(train_set),
        "valid_images": len(valid_set),
        "curve": curve,
    }
    return model, summary
