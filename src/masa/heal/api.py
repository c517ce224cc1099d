"""Healing from a text, shared by ``masa heal`` and ``masa compress --heal-steps``: the windows of the
text, the teacher's cached top-k logits, the loop, and the check that the stored size did not change."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from masa.heal.loop import HealConfig, cached_teacher, heal, windows


def healing_windows(
    data: str | os.PathLike,
    tokenizer,
    config: HealConfig,
    flags: tuple[str, str] = ("--batch-size", "--seq-len"),
) -> torch.Tensor:
    """Windows (W, T) of the healing text ``data`` (a file or eval-set name); raises, naming ``flags``
    (the batch-size and window-length options of the caller), when the text is shorter than one batch."""
    from masa.data.tokenizer import encode
    from masa.eval.datasets import load_eval_text

    stream = torch.tensor(encode(tokenizer, load_eval_text(data)), dtype=torch.long)
    return windows(stream, config, flags)


def heal_from_teacher(
    model: nn.Module,
    teacher_fn: Callable[[], nn.Module],
    ids: torch.Tensor,
    config: HealConfig,
    cache: str | os.PathLike,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable | None = None,
) -> dict:
    """Heal ``model`` in place on ``ids`` against the teacher ``teacher_fn`` loads (only when its top-k
    logits are not cached at ``cache``); returns :func:`~masa.heal.loop.heal`'s result. Raises if the
    stored size changed (a bug)."""
    from masa.accounting import count

    before = count(model).total
    teacher = cached_teacher(teacher_fn, ids, config, cache)
    result = heal(model, teacher, config, state_path, resume, progress=progress)
    if count(model).total != before:
        raise RuntimeError("healing changed the number of stored parameters; this is a bug in masa")
    return result


def healing_info(teacher: str, data: str, config: HealConfig, result: dict) -> dict:
    """What a saved model's ``config.json`` records of its healing."""
    losses = result["losses"]
    return {"teacher": str(teacher), "data": str(data), "steps": config.steps, "lr": config.lr,
            "batch_size": config.batch_size, "seq_len": config.seq_len, "train": list(config.train),
            "kl_first": losses[0], "kl_last": losses[-1]}  # fmt: skip
