"""Crash-safe training checkpoints: `step_000100/` folders and a `latest` pointer file.

A checkpoint folder holds `model.safetensors` (weights), `optimizer.pt` (the optimizer's state dict:
tensors and plain containers, read back with `weights_only=True`) and `state.json` (step, tokens, config).
It is written into a temporary folder beside its final place, fsynced, renamed into place, and only
then does `latest` move to it (`os.replace`), so a crash at any point leaves the previous checkpoint
whole and `latest` pointing at it. The learning rate and the random streams are pure functions of the
step (see the trainer), so nothing else needs saving. A checkpoint that cannot be read (a truncated
file) raises `CheckpointError` naming the file; `checkpoint_candidates` lists the older ones to fall
back to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masa.io import WEIGHTS_NAME, read_weights, save_weights
from masa.io.atomic import fsync_path, is_disk_full, no_space_error, seal

LATEST = "latest"
OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIX = ".tmp_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


@dataclass
class Checkpoint:
    """A checkpoint read into memory: weights, optimizer state and `state.json`."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:06d}"


def _write_pointer(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{_TEMP_PREFIX}{LATEST}{os.getpid()}"
    tmp.write_text(name + "\n")
    fsync_path(tmp)
    os.replace(tmp, run_dir / LATEST)
    fsync_path(run_dir)


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint folders as (step, path), oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _pointed_name(run_dir: Path) -> str | None:
    pointer = run_dir / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of `step` atomically, point `latest` at it, keep the newest `keep` checkpoints.

    `model` must be the bare model (not a DDP wrapper); `optimizer` an optimizer or its (full) state dict;
    `state` is JSON data stored in `state.json`.
    A full disk raises `NoSpaceError` naming the file; the previous checkpoint stays as it was.
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
    writing = tmp / WEIGHTS_NAME
    try:
        save_weights(model, writing)  # tied weights stored once, aliases in the metadata
        writing = tmp / OPTIMIZER_NAME
        with open(writing, "wb") as fh:  # a file object: a full disk surfaces as OSError(ENOSPC)
            torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), fh)
        writing = tmp / STATE_NAME
        writing.write_text(json.dumps({**state, "step": step}, indent=1))
        seal(tmp)  # ordinary permissions, flushed to disk
        if final.exists():  # a folder renamed into place just before a crash, never pointed to
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(run_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(err):
            raise
        previous = _pointed_name(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was written"
        raise no_space_error(err, final / writing.name, kept) from err
    _write_pointer(run_dir, name)
    for _, old in _step_dirs(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `latest` points to, or None when the run has no checkpoint yet."""
    name = _pointed_name(Path(run_dir))
    if name is None:
        return None
    path = Path(run_dir) / name
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(
            f"{Path(run_dir) / LATEST} points to {path}, which is not a checkpoint: delete it to restart"
        )
    return path


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` points to, then older ones, newest first.

    Empty when `latest` does not exist (the run never finished a checkpoint).
    """
    run_dir = Path(run_dir)
    name = _pointed_name(run_dir) if run_dir.is_dir() else None
    if name is None:
        return []
    match = _STEP_DIR.match(name)
    newest = int(match.group(1)) if match else float("inf")
    older = [path for step, path in reversed(_step_dirs(run_dir)) if step < newest]
    return [run_dir / name, *(p for p in older if p.name != name)]


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `state.json`; CheckpointError naming the file when it is missing or unreadable."""
    file = Path(path) / STATE_NAME
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is missing or unreadable ({err})") from err


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a whole checkpoint into memory; CheckpointError naming the file that is missing or corrupt."""
    path = Path(path)
    state = read_state(path)
    try:
        weights = read_weights(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / WEIGHTS_NAME} is missing, truncated or corrupt ({err})") from err
    try:
        optimizer = torch.load(path / OPTIMIZER_NAME, map_location=device, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError or UnpicklingError for a torn file
        raise CheckpointError(f"{path / OPTIMIZER_NAME} is missing, truncated or corrupt ({err})") from err
    return Checkpoint(path, weights, optimizer, state)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load weights (and optimizer state) of a checkpoint folder into `model`; returns its `state.json`."""
    checkpoint = read_checkpoint(path, device)
    model.load_state_dict(checkpoint.weights)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
    return checkpoint.state
