"""The healing loop: distil the original model's next-token distribution into a compressed one.

Only parameters of the chosen kinds (``masa.nn.parameter_kinds``: coefficients, factors, codes, biases
by default; atoms, bases or norms on request) train; shapes never change, so the ratio stays exactly
what it was. The teacher's top-k logits on the healing text are computed once and cached on disk, so
the teacher leaves memory before training starts (with its log-normaliser, so the top-k probabilities
are exact). The loss is the KL divergence over k + 1 outcomes, the teacher's top k and "the rest":
sum_k p_k log(p_k / q_k) + p_rest log(p_rest / q_rest); it is the full KL when k is the vocabulary. A state file holds
the trained tensors, the optimiser and the step, so a run resumes exactly (batches follow the step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from masa.nn.protocol import KINDS, parameter_kinds

DEFAULT_KINDS = ("coefficients", "factors", "codes", "bias")
STATE_NAME = "heal_state.pt"


@dataclass
class HealConfig:
    """Healing settings.

    Attributes:
        steps: optimiser steps; lr: peak AdamW learning rate (cosine decay to lr / 10 after 5 % warm-up).
        batch_size, seq_len: windows per step and tokens per window.
        train: parameter kinds that train (``masa.nn.KINDS``).
        top_k: teacher logits kept per position; seed: order of the windows.
        checkpoint_every: steps between state saves (0: only at the end).
    """

    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 128
    train: tuple[str, ...] = DEFAULT_KINDS
    top_k: int = 64
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        self.train = (self.train,) if isinstance(self.train, str) else tuple(self.train)
        if unknown := [k for k in self.train if k not in KINDS]:
            raise ValueError(f"parameter kinds {unknown} are unknown; choose from {', '.join(KINDS)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


def windows(
    stream: torch.Tensor, config: HealConfig, flags: tuple[str, str] = ("--batch-size", "--seq-len")
) -> torch.Tensor:
    """Non-overlapping windows (W, T) of a token stream; raises when there is not one batch of them,
    naming ``flags`` (the options setting the batch size and the window length) in the fix."""
    count = stream.numel() // config.seq_len
    if count < config.batch_size:
        raise ValueError(
            f"the healing text has {stream.numel()} tokens, fewer than one batch of {config.batch_size} x "
            f"{config.seq_len}: give a longer text or lower {flags[0]} / {flags[1]}"
        )
    return stream[: count * config.seq_len].reshape(count, config.seq_len)


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module, ids: torch.Tensor, top_k: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """The teacher's top-k log-probabilities at every position of ``ids`` (W, T): values (W, T, k) float32,
    indices (W, T, k) int32."""
    values, indices = [], []
    for chunk in ids.split(batch_size):
        logp = F.log_softmax(teacher(chunk).logits.float(), dim=-1)  # (B, T, V)
        top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
        values.append(top.values)
        indices.append(top.indices.int())
    return {"ids": ids, "values": torch.cat(values), "indices": torch.cat(indices)}


def cached_teacher(
    teacher_fn: Callable[[], nn.Module], ids: torch.Tensor, config: HealConfig, path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """Teacher top-k logits from ``path`` when it holds them for these windows, else computed and stored
    (``teacher_fn`` loads the teacher only then)."""
    path = Path(path)
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("top_k") == config.top_k and torch.equal(cached["ids"], ids):
            return cached
    teacher = teacher_fn().eval()
    cached = {**teacher_topk(teacher, ids, config.top_k, config.batch_size), "top_k": config.top_k}
    del teacher
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cached, path)
    return cached


def distillation_loss(logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over the teacher's top k and the rest: logits
    (B, T, V); values (B, T, k), the teacher's log-probabilities at ``indices`` (B, T, k)."""
    teacher = values.float()  # (B, T, k)
    student = F.log_softmax(logits.float(), dim=-1).gather(-1, indices.long())  # (B, T, k)
    tiny = torch.finfo(torch.float32).tiny
    p_rest = (1.0 - teacher.exp().sum(-1)).clamp_min(0.0)  # (B, T)
    q_rest = (1.0 - student.exp().sum(-1)).clamp_min(tiny)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(tiny).log() - q_rest.log()), 0.0)
    return ((teacher.exp() * (teacher - student)).sum(-1) + rest).mean()


def trainable(model: nn.Module, kinds: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Mark only parameters of ``kinds`` trainable; raises when there are none (an uncompressed model)."""
    chosen = {}
    named = dict(model.named_parameters())
    for name, kind in parameter_kinds(model).items():
        named[name].requires_grad_(kind in kinds)
        if kind in kinds:
            chosen[name] = named[name]
    if not chosen:
        present = sorted(set(parameter_kinds(model).values()))
        raise ValueError(
            f"the model has no parameters of kinds {', '.join(kinds)} to train (it has {', '.join(present)}): "
            "nothing to heal; is it compressed? choose other kinds with --train"
        )
    return chosen


def _schedule(step: int, config: HealConfig) -> float:
    warm = max(1, config.steps // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _batch(step: int, n_windows: int, config: HealConfig) -> torch.Tensor:
    """Window indices of ``step``: one seeded permutation per pass over the windows."""
    per_pass = n_windows // config.batch_size
    epoch, slot = divmod(step, per_pass)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(config.seed + epoch))
    return order[slot * config.batch_size : (slot + 1) * config.batch_size]


def heal(
    model: nn.Module,
    teacher: dict[str, torch.Tensor],
    config: HealConfig,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Train ``model``'s parameters of ``config.train`` kinds in place against ``teacher`` (from
    :func:`cached_teacher`); returns the losses. With ``state_path`` the state is saved every
    ``checkpoint_every`` steps and at the end; ``resume`` continues from it exactly."""
    params = trainable(model, config.train)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config))
    start, losses = 0, []
    if resume:
        if state_path is None or not Path(state_path).exists():
            raise FileNotFoundError(f"--resume: no healing state at {state_path}; run without --resume first")
        state = torch.load(state_path, weights_only=True)
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = state["step"], state["losses"]
    ids, values, indices = teacher["ids"], teacher["values"], teacher["indices"]
    bar = progress(range(start, config.steps)) if progress else range(start, config.steps)
    for step in bar:  # eval mode: no dropout, so a resumed run repeats the same steps
        rows = _batch(step, ids.shape[0], config)
        loss = distillation_loss(model(ids[rows]).logits, values[rows], indices[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
        done = step + 1
        if state_path is not None and (
            done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            torch.save(
                {"step": done, "losses": losses, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "params": {n: p.detach().clone() for n, p in params.items()}},
                state_path,
            )  # fmt: skip
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": config.steps, "trained": sorted(params), "losses": losses}
