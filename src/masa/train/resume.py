"""Resuming a run: pick a readable checkpoint (falling back past corrupt ones), refuse one from another run.

A resumed run must repeat the uninterrupted one, so every setting that shapes the model, the data or the
optimisation must match the checkpoint's. Only the length of the run and the bookkeeping may change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from masa.train.checkpoint import Checkpoint, CheckpointError, checkpoint_candidates, read_checkpoint
from masa.train.config import ConfigError

# settings that may differ from the checkpoint's: how long to run, where and how often to log and save
MAY_CHANGE = {
    "train": {
        "max_steps",
        "token_budget",
        "eval_every",
        "eval_batches",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "out_dir",
        "device",
    },
    "data": {"data_dir", "cache_dir"},  # locations; the text itself is checked by its fingerprint
}
_SAMPLES, _SAMPLE_LEN = 64, 1024


def data_fingerprint(tokenizer_hash: str, train: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    """What identifies the tokenised text: the tokenizer, the lengths and a digest of evenly spaced slices."""
    digest = hashlib.sha256()
    for tokens in (train, valid):
        for start in np.linspace(0, max(0, len(tokens) - _SAMPLE_LEN), _SAMPLES, dtype=np.int64):
            digest.update(np.ascontiguousarray(tokens[start : start + _SAMPLE_LEN], dtype=np.int64).tobytes())
    return {
        "tokenizer": tokenizer_hash,
        "train_tokens": len(train),
        "valid_tokens": len(valid),
        "sample_sha256": digest.hexdigest()[:16],
    }


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings of `current` that differ from `saved` and may not change on resume, in words."""
    changes = []
    for section in ("model", "data", "train"):
        before, now = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(now)):
            if key in MAY_CHANGE.get(section, ()) or before.get(key) == now.get(key):
                continue
            changes.append(f"{section}.{key} is {now.get(key)!r} here but was {before.get(key)!r}")
    return changes


def check_resumable(
    checkpoint: Checkpoint, config: dict[str, Any], model_config: dict[str, Any], fingerprint: dict[str, Any]
) -> None:
    """Raise ConfigError naming every setting of this run that differs from the checkpoint's run."""
    state = checkpoint.state
    changes = config_differences(state.get("config", {}), config)
    if not changes and state.get("model_config", model_config) != model_config:
        changes.append("the model built from [model] and the tokenizer differs")
    saved = state.get("data")  # absent in checkpoints written before fingerprints
    if saved is not None and saved != fingerprint:
        if saved["tokenizer"] != fingerprint["tokenizer"]:
            changes.append("the tokenizer differs (the training text or data.tokenizer/vocab_size changed)")
        if {k: v for k, v in saved.items() if k != "tokenizer"} != {
            k: v for k, v in fingerprint.items() if k != "tokenizer"
        }:
            changes.append(
                f"the text differs ({fingerprint['train_tokens']:,} training tokens here, "
                f"{saved['train_tokens']:,} in the checkpoint, or other content)"
            )
    if changes:
        allowed = ", ".join(f"train.{k}" for k in sorted(MAY_CHANGE["train"]))
        raise ConfigError(
            f"cannot resume from {checkpoint.path}: {'; '.join(changes)}. Resume with the run's own settings "
            f"(only {allowed} may change), or start a new run with --overwrite or another --out"
        )


def load_resume_point(ckpt_dir: Path, device: torch.device) -> tuple[Checkpoint | None, list[str]]:
    """The newest readable checkpoint (None when the run has none) and a warning per unreadable one skipped.

    Raises CheckpointError when checkpoints exist but none can be read.
    """
    candidates = checkpoint_candidates(ckpt_dir)
    warnings: list[str] = []
    for i, path in enumerate(candidates):
        try:
            return read_checkpoint(path, device), warnings
        except CheckpointError as err:
            if i + 1 == len(candidates):
                raise CheckpointError(
                    f"{err}, and there is no earlier checkpoint to fall back to: start the run again with "
                    "--overwrite (or delete the folder)"
                ) from err
            warnings.append(f"warning: {err}; resuming from the previous checkpoint {candidates[i + 1].name}")
    return None, warnings
