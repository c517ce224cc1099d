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
        "compile",
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


def _differences(section: str, saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys of one section that both configs have and that differ, in words (new keys are not compared)."""
    return [
        f"{section}.{key} is {current[key]!r} here but was {saved[key]!r}"
        for key in sorted(set(saved) & set(current))
        if key not in MAY_CHANGE.get(section, ()) and saved[key] != current[key]
    ]


def check_resumable(
    checkpoint: Checkpoint, config: dict[str, Any], model_config: dict[str, Any], fingerprint: dict[str, Any]
) -> None:
    """Raise ConfigError naming every setting of this run that differs from the checkpoint's run.

    `config` is the run's `TrainRunConfig.to_dict()`, `model_config` the full model configuration (with the
    tokenizer's vocabulary size), `fingerprint` the `data_fingerprint` of the tokenised text.
    """
    state = checkpoint.state
    changes = _differences("model", state.get("model_config", {}), model_config)
    for section in ("data", "train"):
        changes += _differences(section, state.get("config", {}).get(section, {}), config[section])
    saved = state.get("data")  # absent in checkpoints written before fingerprints
    if saved is not None and saved["tokenizer"] != fingerprint["tokenizer"]:
        changes.append("the tokenizer differs (the training text or the tokenizer settings changed)")
    if saved is not None and any(saved[k] != fingerprint[k] for k in saved if k != "tokenizer"):
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
