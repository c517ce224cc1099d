"""The run directory: what it holds, refusing to clobber an existing run, and the metrics log.

``OUT/`` holds ``metrics.jsonl`` (one JSON record per logged step), ``checkpoints/``, ``final/`` (the model
directory) and ``summary.json``. A new run into a folder that holds any of them needs ``resume`` (continue
it) or ``overwrite`` (start again); only the run's own files are ever deleted.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from masa.io.atomic import append_line, write_text
from masa.train.checkpoint import checkpoint_candidates

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_DIR = "final"
CHECKPOINT_DIR = "checkpoints"
RUN_FILES = (METRICS_FILE, CHECKPOINT_DIR, FINAL_DIR, SUMMARY_FILE)

log = logging.getLogger(__name__)


def describe_run(out_dir: Path) -> str | None:
    """What the run in `out_dir` has done, in words ("checkpoint step_000060, final model"); None if none."""
    if not out_dir.is_dir():
        return None
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not held:
        return None
    parts = []
    if candidates := checkpoint_candidates(out_dir / CHECKPOINT_DIR):
        parts.append(f"checkpoint {candidates[0].name}")
    if (out_dir / FINAL_DIR).exists():
        parts.append("a final model")
    return ", ".join(parts) or ", ".join(held)


def prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make `out_dir` ready for a run: refuse a file or an existing run unless resuming or overwriting.

    Resuming a run whose checkpoints are gone but whose final model is there is refused too: it would
    start from scratch and replace that model.

    With `overwrite`, the old run's checkpoints, log and summary go now; its final model stays until the
    new one replaces it.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again: pass one")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a run directory: choose a folder path")
    held = describe_run(out_dir)
    if held and not (resume or overwrite):
        raise FileExistsError(
            f"{out_dir} already holds a training run ({held}): pass --resume to continue it, --overwrite "
            "to start it again (deleting its checkpoints and log), or choose another --out"
        )
    if resume and (out_dir / FINAL_DIR).exists() and not checkpoint_candidates(out_dir / CHECKPOINT_DIR):
        raise FileExistsError(
            f"{out_dir} holds a final model but no checkpoint to resume from: pass --overwrite to train "
            "again (replacing that model), or choose another --out"
        )
    if held and overwrite:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
        for name in (METRICS_FILE, SUMMARY_FILE):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics log; a torn last line (a kill mid-write) is dropped with a warning."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(
                    f"{path} line {number} is not JSON ({err}): repair or delete that line, then resume"
                ) from err
            log.warning("warning: ignored the torn last line of %s (a run killed while writing it)", path)
    return records


def restart_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (those of a killed run past its checkpoint go)."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= last_step]
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Add one record to the log."""
    append_line(path, json.dumps(record))
