"""Faults and bad inputs a careless user hits: existing runs, two processes, kills, full disks, torn files.

Each test is one row of the table in docs/reliability.md. The concurrency cases run real processes
(`python -m masa.cli ...` or a small script) with an injected delay or a SIGKILL.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import interrupted, losses, tiny_raw
from tiny_models import build

import masa
from masa.cli import main
from masa.eval.perplexity import perplexity
from masa.io import serialization
from masa.io.atomic import NoSpaceError, atomic_directory, recover_leftovers
from masa.io.lock import DirectoryLockedError, directory_lock
from masa.model import MasaLM, MasaLMConfig
from masa.progress import Progress
from masa.runtime import resolve_device
from masa.train import ConfigError, TrainRunConfig, checkpoint, train
from masa.train.checkpoint import CheckpointError
from masa.train.rundir import read_metrics

SRC = Path(__file__).resolve().parent.parent / "src"

# Runs `masa` in a fresh process; HOLD_AT_STEP=N stops after logging step N, HOLD_FINAL=FILE stops inside
# the save of final/ (after its weights are written) after touching FILE.
_DRIVER = """
import os, sys, time
from pathlib import Path
if os.environ.get("HOLD_AT_STEP"):
    from masa.train import trainer
    real_append = trainer.append_metrics
    def hold(path, record):
        real_append(path, record)
        if record["step"] == int(os.environ["HOLD_AT_STEP"]):
            time.sleep(600)
    trainer.append_metrics = hold
if os.environ.get("HOLD_FINAL"):
    from masa.io import serialization
    real_save = serialization.save_weights
    def hold(model, path):
        real_save(model, path)
        Path(os.environ["HOLD_FINAL"]).touch()
        time.sleep(600)
    serialization.save_weights = hold
from masa.cli import main
from masa.eval.perplexity import perplexity
sys.exit(main(sys.argv[1:]))
"""

# Saves "who" into TARGET with atomic_directory; waits inside the save for GO ("-": no wait) after touching
# READY. FLAGS: "overwrite"; "fallback" (no renameat2); "kill-swap" (SIGKILL between the fallback's renames).
_SAVER = """
import os, signal, sys, time
from pathlib import Path
from masa.io import atomic
target, who, ready, go, flags = sys.argv[1:6]
if "fallback" in flags:
    atomic.renameat2 = lambda *args: False
if "kill-swap" in flags:
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.rename = rename
try:
    with atomic.atomic_directory(target, overwrite="overwrite" in flags) as tmp:
        (tmp / "who").write_text(who)
        Path(ready).touch()
        while go != "-" and not Path(go).exists():
            time.sleep(0.05)
except FileExistsError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
print("saved")
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        env={**_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _toml(raw: dict) -> str:
    """A TOML file for `raw` (values are strings, numbers, booleans or lists of them: JSON spells them alike)."""
    return "".join(
        f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for section, table in raw.items()
    )


def _config_file(tmp_path: Path, **train_settings) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(_toml(tiny_raw(tmp_path, **train_settings)))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "masa.cli", *args]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- run directory (train)


def test_train_refuses_an_out_dir_holding_a_run(tmp_path, capsys):
    config = _config_file(tmp_path, checkpoint_every=4)
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(config), "--out", str(run), "--set", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a training run (checkpoint step_000008, a final model)" in err
    assert "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing touched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000004", "step_000008"]

    assert main(["train", str(config), "--out", str(run), "--set", "train.max_steps=3", "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003"]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_resume_without_checkpoints_keeps_the_final_model(tmp_path):
    raw = tiny_raw(tmp_path)
    train(TrainRunConfig.from_dict(raw))
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as `masa bench` does once a run is scored
    with pytest.raises(FileExistsError, match="holds a final model but no checkpoint to resume from"):
        train(TrainRunConfig.from_dict(raw), resume=True)
    masa.load(tmp_path / "run" / "final")


def test_train_out_is_a_file(tmp_path, capsys):
    config = _config_file(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["train", str(config), "--out", str(tmp_path / "notes.txt")]) == 2
    assert (
        "--out " + str(tmp_path / "notes.txt") + " is a file, not a run directory" in capsys.readouterr().err
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pass one"):
        train(TrainRunConfig.from_dict(tiny_raw(tmp_path)), resume=True, overwrite=True)


def test_two_trainings_into_one_out_dir(tmp_path):
    """A second `masa train` on a busy run is refused naming the first; after a kill -9 it can resume."""
    config, run = _config_file(tmp_path, checkpoint_every=2), tmp_path / "run"
    driver = _script(tmp_path, "driver.py", _DRIVER)
    first = _start([str(driver), "train", str(config), "--out", str(run)], HOLD_AT_STEP="3")
    try:
        _wait_for(lambda: len(read_metrics(run / "metrics.jsonl")) == 3, first)
        second = _cli("train", str(config), "--out", str(run), "--overwrite")
        assert second.returncode != 0
        assert f"{run} is in use by another masa process (pid {first.pid}" in second.stderr
        assert f"train {config} --out {run}`" in second.stderr  # the holder's command line
    finally:
        _kill(first)  # the kernel releases the lock of a killed process
    resumed = _cli("train", str(config), "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))  # one run, in order
    assert json.loads(resumed.stdout)["resumed_from_step"] == 2


def test_directory_lock_names_the_holder_and_dies_with_it(tmp_path):
    holder = _script(
        tmp_path,
        "hold.py",
        "import sys, time\nfrom masa.io.lock import directory_lock\n"
        "with directory_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n",
    )
    proc = _start([str(holder), str(tmp_path / "out")])
    try:
        assert proc.stdout.readline().strip() == "locked"
        with (
            pytest.raises(
                DirectoryLockedError, match=rf"in use by another masa process \(pid {proc.pid} on "
            ),
            directory_lock(tmp_path / "out"),
        ):
            pass
    finally:
        _kill(proc)
    with directory_lock(tmp_path / "out") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    with directory_lock(tmp_path / "out"):  # released on exit, taken again
        pass


# ----------------------------------------------------------------------------- atomic directories


@pytest.mark.parametrize("mode", ["renameat2", "fallback"])
def test_two_saves_to_one_target_never_replace_each_other(tmp_path, mode):
    """Neither save asked to overwrite: the one that finishes second fails instead of replacing."""
    saver, target = _script(tmp_path, "saver.py", _SAVER), tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = _start([str(saver), str(target), "first", str(ready), str(go), mode])
    try:
        _wait_for(ready.exists, first)  # the first save is under way, its target not there yet
        second = subprocess.run(
            [sys.executable, str(saver), str(target), "second", str(tmp_path / "r2"), "-", mode],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0 and "saved" in second.stdout
        go.touch()
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            _kill(first)
    assert first.returncode == 3 and "appeared while this save was running" in err
    assert (target / "who").read_text() == "second"  # the finished save was kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_overwrite_killed_mid_write_keeps_the_old_copy(tmp_path):
    """With renameat2(RENAME_EXCHANGE) a kill at any point leaves the target old or new, never missing."""
    saver, target = _script(tmp_path, "saver.py", _SAVER), tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "who").write_text("old")
    ready = tmp_path / "ready"
    proc = _start([str(saver), str(target), "new", str(ready), str(tmp_path / "never"), "overwrite"])
    _wait_for(ready.exists, proc)
    _kill(proc)
    assert (target / "who").read_text() == "old"
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1  # the killed save's leftover
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "who").write_text("newer")
    assert (target / "who").read_text() == "newer"
    assert list(tmp_path.glob(".out.*")) == []


def test_overwrite_killed_between_fallback_renames_is_put_back(tmp_path, caplog):
    saver, target = _script(tmp_path, "saver.py", _SAVER), tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "who").write_text("old")
    killed = subprocess.run(
        [
            sys.executable,
            str(saver),
            str(target),
            "new",
            str(tmp_path / "ready"),
            "-",
            "overwrite,fallback,kill-swap",
        ],
        env=_env(),
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL
    assert not target.exists() and len(list(tmp_path.glob(".out.old-*"))) == 1  # the window of the fallback
    with pytest.raises(FileExistsError, match="already exists"), atomic_directory(target):
        pass  # the next save puts the old copy back first, so this one needs overwrite
    assert (target / "who").read_text() == "old" and "put back" in caplog.text
    assert list(tmp_path.glob(".out.*")) == []


def test_training_final_model_survives_a_kill_during_its_save(tmp_path):
    config, run = _config_file(tmp_path), tmp_path / "run"
    assert _cli("train", str(config), "--out", str(run)).returncode == 0
    old = masa.load(run / "final").state_dict()
    held = tmp_path / "held"
    driver = _script(tmp_path, "driver.py", _DRIVER)
    proc = _start(
        [str(driver), "train", str(config), "--out", str(run), "--overwrite", "--set", "train.seed=1"],
        HOLD_FINAL=str(held),
    )
    _wait_for(held.exists, proc)
    _kill(proc)
    assert all(torch.equal(v, masa.load(run / "final").state_dict()[k]) for k, v in old.items())
    assert list(run.glob(".final.tmp-*"))  # leftover of the killed save
    resumed = _cli("train", str(config), "--out", str(run), "--resume", "--set", "train.seed=1")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert list(run.glob(".final.*")) == []
    masa.load(run / "final")


def test_leftovers_of_killed_saves_are_removed(tmp_path, caplog):
    target, model = tmp_path / "m", build("llama")
    masa.save(model, target)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead, alive = int(gone.stdout), f".m.tmp-{os.getpid()}-1234"  # a save under way in this process
    for name in (f".m.tmp-{dead}-00ff", ".m.tmp-abc_1234", f".m.old-{dead}-0a0b", alive, ".other.tmp-1-00"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
    masa.save(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive, ".other.tmp-1-00", "m"]
    assert "removed 3 leftover(s) of killed saves" in caplog.text
    assert recover_leftovers(target) == []


def test_load_puts_back_a_model_hidden_by_a_killed_swap(tmp_path, caplog):
    """A kill between the fallback's two renames leaves only .m.old-PID-HEX: loading m restores it."""
    target, model = tmp_path / "m", build("llama")
    masa.save(model, target)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    os.rename(target, tmp_path / f".m.old-{int(gone.stdout)}-0a0b")
    loaded = masa.load(target)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and "put back" in caplog.text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        masa.load(tmp_path / "missing")


def test_empty_directory_accepted_non_empty_refused(tmp_path):
    model = build("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    masa.save(model, empty)  # like save_pretrained into tempfile.mkdtemp()
    assert (empty / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="not empty; choose another output or pass overwrite=True"):
        masa.save(model, empty)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        masa.save(model, tmp_path / "file", overwrite=True)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_have_ordinary_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        masa.save(build("llama"), tmp_path / "m")
        model, optimizer = _model_and_optimizer()
        checkpoint.save_checkpoint(tmp_path / "ckpt", 1, model, optimizer, {}, keep=1)
    finally:
        os.umask(previous)
    files = [*(tmp_path / "m").iterdir(), *(tmp_path / "ckpt" / "step_000001").iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files
    }
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------------------------- disk full


def _disk_full(*args, **kwargs):
    Path(args[1]).write_bytes(b"partial")  # the writer got this far
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_a_model(tmp_path, monkeypatch):
    model = build("llama")
    masa.save(model, tmp_path / "m")
    monkeypatch.setattr(serialization, "save_file", _disk_full)
    with pytest.raises(NoSpaceError) as raised:
        masa.save(model, tmp_path / "m", overwrite=True)
    message = str(raised.value)
    assert message.startswith("no space left on /")
    assert (
        f"{tmp_path / 'm' / 'model.safetensors'}; the previous copy of {tmp_path / 'm'} is intact" in message
    )
    with pytest.raises(NoSpaceError, match=f"nothing was written to {tmp_path / 'new'}"):
        masa.save(model, tmp_path / "new")
    monkeypatch.undo()
    masa.load(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no leftovers


def test_disk_full_reported_only_in_a_message(tmp_path, monkeypatch):
    """safetensors raises its own error type, saying "No space left on device" only in its text."""

    def rust_error(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(serialization, "save_file", rust_error)
    with pytest.raises(NoSpaceError, match="no space left on .* while writing"):
        masa.save(build("llama"), tmp_path / "m")


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=3)
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, fh: _disk_full(None, fh.name))
    with pytest.raises(NoSpaceError) as raised:
        checkpoint.save_checkpoint(tmp_path, 2, model, optimizer, {}, keep=3)
    assert f"while writing {tmp_path / 'step_000002' / 'optimizer.pt'}" in str(raised.value)
    assert "the previous checkpoint step_000001 is intact" in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]


def test_disk_full_while_logging_metrics_keeps_the_log_whole(tmp_path, monkeypatch):
    from masa.io import atomic
    from masa.train.rundir import append_metrics

    log = tmp_path / "metrics.jsonl"
    append_metrics(log, {"step": 1, "loss": 2.0})
    real_write = os.write

    def write_half_then_fail(fd, data):
        real_write(fd, data[: len(data) // 2])  # a torn line reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "write", write_half_then_fail)
    with pytest.raises(
        NoSpaceError, match=r"while writing .*metrics.jsonl; metrics.jsonl keeps every earlier"
    ):
        append_metrics(log, {"step": 2, "loss": 1.5})
    monkeypatch.undo()
    assert read_metrics(log) == [{"step": 1, "loss": 2.0}] and log.read_text().endswith("}\n")


def test_disk_full_while_writing_a_summary_keeps_the_old_one(tmp_path, monkeypatch):
    from masa.io import atomic
    from masa.io.atomic import write_json

    summary = tmp_path / "summary.json"
    write_json(summary, {"step": 1})

    def fsync_fails(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fsync_fails)
    with pytest.raises(NoSpaceError, match="summary.json; the previous summary.json is intact"):
        write_json(summary, {"step": 2})
    monkeypatch.undo()
    assert json.loads(summary.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------- resume


def _interrupted_run(tmp_path: Path, monkeypatch, **settings) -> dict:
    """Train 8 steps with checkpoints every 4, killed (an exception) after logging step 6."""
    raw = tiny_raw(tmp_path, checkpoint_every=4, **settings)
    interrupted(monkeypatch, lambda: train(TrainRunConfig.from_dict(raw)), after_step=6)
    return raw


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", 2e-2, r"train.lr is 0.02 here but was 0.01"),
        ("train", "seed", 3, r"train.seed is 3 here but was 0"),
        ("train", "batch_size", 2, r"train.batch_size is 2 here but was 4"),
        ("model", "d_model", 16, r"model.d_model is 16 here but was 32"),
        ("data", "seq_len", 8, r"data.seq_len is 8 here but was 16"),
        ("data", "valid_fraction", 0.2, r"data.valid_fraction is 0.2 here but was 0.1"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, section, key, value, message):
    raw = _interrupted_run(tmp_path, monkeypatch)
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"cannot resume from .*step_000004: .*{message}.*--overwrite"):
        train(TrainRunConfig.from_dict(raw), resume=True)


def test_resume_with_other_text_is_refused(tmp_path, monkeypatch):
    raw = _interrupted_run(tmp_path, monkeypatch)
    book = tmp_path / "book.txt"
    book.write_text(book.read_text().replace("cat", "cow"))  # same files, same settings, other text
    with pytest.raises(ConfigError, match=r"cannot resume from .*: the text differs"):
        train(TrainRunConfig.from_dict(raw), resume=True)


def test_resume_may_extend_the_run(tmp_path, monkeypatch):
    raw = _interrupted_run(tmp_path, monkeypatch)
    raw["train"].update(max_steps=10, eval_every=5, log_every=2, keep_checkpoints=1, device="cpu")
    summary = train(TrainRunConfig.from_dict(raw), resume=True)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 10


def test_torn_last_metrics_line_is_ignored_with_a_warning(tmp_path, monkeypatch, caplog):
    full = tiny_raw(tmp_path, out_dir=str(tmp_path / "full"))
    train(TrainRunConfig.from_dict(full))
    raw = _interrupted_run(tmp_path, monkeypatch)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 7, "lo')  # killed mid-write
    summary = train(TrainRunConfig.from_dict(raw), resume=True)
    assert "ignored the torn last line of" in caplog.text
    assert summary["resumed_from_step"] == 4
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_corrupt_metrics_line_in_the_middle_is_named(tmp_path, monkeypatch):
    raw = _interrupted_run(tmp_path, monkeypatch)
    log = tmp_path / "run" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines[:2], "garbage", *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is not JSON .*repair or delete that line"):
        train(TrainRunConfig.from_dict(raw), resume=True)


def test_truncated_optimizer_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    train(TrainRunConfig.from_dict(tiny_raw(tmp_path, out_dir=str(tmp_path / "full"))))
    raw = tiny_raw(tmp_path, checkpoint_every=4, max_steps=8)
    train(TrainRunConfig.from_dict(raw))
    torn = tmp_path / "run" / "checkpoints" / "step_000008" / "optimizer.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    summary = train(TrainRunConfig.from_dict(raw), resume=True)
    assert summary["resumed_from_step"] == 4
    assert f"{torn} is missing, truncated or corrupt" in caplog.text
    assert "resuming from the previous checkpoint step_000004" in caplog.text
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_truncated_only_checkpoint_is_named(tmp_path):
    raw = tiny_raw(tmp_path, max_steps=4)
    train(TrainRunConfig.from_dict(raw))
    torn = tmp_path / "run" / "checkpoints" / "step_000004" / "optimizer.pt"
    torn.write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(torn))} is .*truncated.*no earlier checkpoint"
    ):
        train(TrainRunConfig.from_dict(raw), resume=True)


# ---------------------------------------------------------------------------------- inputs, devices


def test_validation_text_too_short_is_refused_before_training(tmp_path):
    raw = tiny_raw(tmp_path, batch_size=8)
    raw["data"]["valid_fraction"] = 0.02  # ~85 held-out tokens; one batch of 8 x 16 needs 129
    with pytest.raises(
        ConfigError, match=r"validation text is too short: .* needs 129 tokens.*valid_fraction"
    ):
        train(TrainRunConfig.from_dict(raw))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a single step was trained


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_only_torch(tmp_path):
    with pytest.raises(
        ValueError, match=r"there is no CUDA in this torch build \(.*\); run on the cpu device"
    ):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA in this torch build"):
        train(TrainRunConfig.from_dict(tiny_raw(tmp_path, device="cuda:0")))
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_progress_off_a_terminal_is_plain_periodic_lines(tmp_path, capfd):
    stream = io.StringIO()
    progress = Progress(200, desc="train", every_s=3600, stream=stream)
    for done in range(1, 201):
        progress.update(done, loss="1.000")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 2  # the first and the last
    assert lines[-1].startswith("train: step 200/200 (100%), loss=1.000, ")
    train(TrainRunConfig.from_dict(tiny_raw(tmp_path)))  # stderr captured: not a terminal
    err = capfd.readouterr().err
    assert "\r" not in err and 1 <= err.count("train: step") <= 3
    model = MasaLM(MasaLMConfig(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_seq_len=8))
    perplexity(model, torch.arange(400) % 20, seq_len=8, batch_size=1)  # 50 windows, one at a time
    err = capfd.readouterr().err
    assert (
        "\r" not in err and err.startswith("perplexity (chunked, T=8): window 1/50") and err.count("\n") <= 3
    )


def _model_and_optimizer():
    torch.manual_seed(0)
    model = MasaLM(MasaLMConfig(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_seq_len=8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer
