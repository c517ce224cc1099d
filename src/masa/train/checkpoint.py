"""Crash-safe training checkpoints: `step_000100/` folders and a `latest` pointer file.

A checkpoint folder holds `model.safetensors` (weights), `optimizer.pt` (the optimizer's state dict:
tensors and plain containers, read back with `weights_only=True`) and `state.json` (step, tokens, config).
It is written into a temporary folder beside its final place, fsynced, renamed into place, and only
then does `latest` move to it (`os.replace`), so a crash at any point leaves the previous checkpoint
whole and `latest` pointing at it. The learning rate and the random streams are pure functions of the
step (see the trainer), so nothing else needs saving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masa.io import WEIGHTS_NAME, read_weights, save_weights

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp_"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{_TEMP_PREFIX}{LATEST}{os.getpid()}"
    tmp.write_text(name + "\n")
    _fsync(tmp)
    os.replace(tmp, run_dir / LATEST)
    _fsync(run_dir)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint folders as (step, path), oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of `step` atomically, point `latest` at it, keep the newest `keep` checkpoints.

    `model` must be the bare model (not a DDP wrapper); `state` is JSON data stored in `state.json`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f"{_TEMP_PREFIX}*"):  # left by a crash during an earlier save
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    name = checkpoint_name(step)
    tmp, final = run_dir / f"{_TEMP_PREFIX}{name}", run_dir / name
    tmp.mkdir()
    try:
        save_weights(model, tmp / WEIGHTS_NAME)  # tied weights stored once, aliases in the metadata
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        for path in (*tmp.iterdir(), tmp):
            _fsync(path)
        if final.exists():  # a folder renamed into place just before a crash, never pointed to
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(run_dir, name)
    for _, old in _step_dirs(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` points to, or None when the run has no checkpoint yet."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} points to {path}, which is not a checkpoint: delete {pointer} to restart"
        )
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load weights (and optimizer state) of a checkpoint folder into `model`; returns its `state.json`."""
    path = Path(path)
    model.load_state_dict(read_weights(path))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    return json.loads((path / "state.json").read_text())
