"""Training: config checking, schedule, exact resume, crash-safe checkpoints, DDP on two CPU processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import masa
from masa.model import MasaLM, MasaLMConfig
from masa.train import ConfigError, TrainRunConfig, checkpoint, train, trainer
from masa.train.command import presets, resolve_config_path
from masa.train.config import apply_overrides
from masa.train.trainer import lr_at, param_groups

SENTENCES = "the cat sat on the mat. a dog ran to the sun. we see the big red bus.\n"


def tiny_raw(root: Path, **train) -> dict:
    """A config for a 2-block model on a small synthetic book in `root`; trains in well under a second."""
    book = root / "book.txt"
    if not book.exists():
        book.write_text(SENTENCES * 60)
    return {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
        "data": {
            "train": ["book.txt"],
            "tokenizer": "char",
            "seq_len": 16,
            "valid_fraction": 0.1,
            "data_dir": str(root),
            "cache_dir": str(root / "cache"),
        },
        "train": {
            "batch_size": 4,
            "max_steps": 8,
            "lr": 1e-2,
            "min_lr": 1e-3,
            "eval_every": 4,
            "eval_batches": 2,
            "log_every": 1,
            "out_dir": str(root / "run"),
            "device": "cpu",
            **train,
        },
    }


def interrupted(monkeypatch, run, after_step: int) -> None:
    """Call ``run`` (a training) and kill it, as an exception, right after it logs ``after_step``."""
    from masa.train import trainer

    real_append = trainer.append_metrics

    def append_then_die(path, record):
        real_append(path, record)
        if record["step"] == after_step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "append_metrics", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["demo", "small12"])
def test_presets_parse(name):
    assert name in presets()
    config = TrainRunConfig.from_toml(resolve_config_path(name), ["train.max_steps=20", "model.n_layer=3"])
    assert config.train.max_steps == 20 and config.model["n_layer"] == 3
    assert TrainRunConfig.from_dict(config.to_dict()) == config


def test_overrides_parse_toml_values_or_bare_strings(tmp_path):
    raw = tiny_raw(tmp_path)
    config = TrainRunConfig.from_dict(
        apply_overrides(raw, ["train.lr=3e-3", "train.betas=[0.9, 0.95]", "train.device=cpu"])
    )
    assert config.train.lr == 3e-3 and config.train.betas == (0.9, 0.95) and config.train.device == "cpu"
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(raw, ["max_steps=3"])


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "train",
            "max_step",
            3,
            r"unknown key 'max_step' in \[train\]: valid keys are batch_size, .*max_steps",
        ),
        ("data", "seq_len", "long", r"data.seq_len must be int, got 'long'"),
        ("train", "batch_size", True, r"train.batch_size must be int"),
        ("train", "betas", [0.9], r"train.betas must be tuple"),
        ("model", "n_heads", 2, r"unknown key 'n_heads' in \[model\]: valid keys are .*n_head"),
        ("model", "vocab_size", 99, r"model.vocab_size is set from the tokenizer"),
        ("model", "d_model", 33, r"\[model\]: d_model=33 is not divisible by n_head=2"),
        ("train", "dtype", "float16", r"train.dtype 'float16' is unsupported"),
        ("loss", "kind", "x", r"unknown section \[loss\]: valid sections are model, data, train"),
    ],
)
def test_config_errors_name_the_key(tmp_path, section, key, value, message):
    raw = tiny_raw(tmp_path)
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=message):
        TrainRunConfig.from_dict(raw)


def test_missing_and_too_short_corpus(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["data"]["train"] = ["book.txt", "absent.txt"]
    with pytest.raises(FileNotFoundError, match="'absent.txt' not found"):
        train(TrainRunConfig.from_dict(raw))
    (tmp_path / "short.txt").write_text("too short")
    raw["data"]["train"] = ["short.txt"]
    with pytest.raises(ValueError, match=r"training text is too short: .* needs 65 tokens, there are \d+"):
        train(TrainRunConfig.from_dict(raw))


# ------------------------------------------------------------------------------------ optimisation


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # cosine decay, never rising
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 45 / 89)))


def _masa_model(generator: bool = False) -> MasaLM:
    config = MasaLMConfig(
        vocab_size=50,
        n_layer=3,
        n_head=2,
        d_model=16,
        attention="masa-qkvo",
        n_atoms=1,
        coef_generator=generator,
    )
    return MasaLM(config)


def test_groups_by_kind_decay_matrices_and_atoms_only():
    model = _masa_model()
    groups = param_groups(model, 0.1)
    kinds = {(g["kind"], g["weight_decay"]) for g in groups}
    assert kinds == {("atoms", 0.1), ("coefficients", 0.0), ("norm", 0.0), ("dense", 0.1)}
    assert all(g["lr_mult"] == 1.0 for g in groups)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    generator = {g["kind"]: g["weight_decay"] for g in param_groups(_masa_model(generator=True), 0.1)}
    assert generator["generator"] == 0.0 and "coefficients" not in generator
    by_kind = {g["kind"]: g["lr_mult"] for g in param_groups(_masa_model(generator=True), 0.1)}
    assert by_kind == {"atoms": 1.0, "generator": 0.1, "norm": 1.0, "dense": 1.0}  # the measured default
    asked = param_groups(_masa_model(generator=True), 0.1, lr_mult={"generator": 1})
    assert {g["kind"]: g["lr_mult"] for g in asked}["generator"] == 1
    decayed = {g["kind"]: g["weight_decay"] for g in param_groups(model, 0.1, wd_mult={"coefficients": 0.5})}
    assert decayed["coefficients"] == 0.0  # 1-D tensors never decay
    assert {g["kind"]: g["weight_decay"] for g in param_groups(model, 0.1, wd_mult={"atoms": 0})}[
        "atoms"
    ] == 0


def test_lr_mult_for_a_kind_the_model_lacks_or_an_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"train.lr_mult sets generator, which this model does not have"):
        param_groups(_masa_model(), 0.1, lr_mult={"generator": 2.0})
    raw = tiny_raw(tmp_path, lr_mult={"atom": 2.0})
    with pytest.raises(ConfigError, match=r"train.lr_mult.atom: 'atom' is not a parameter kind; use one of"):
        TrainRunConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"train.wd_mult.atoms = -1.0 must be >= 0"):
        TrainRunConfig.from_dict(apply_overrides(tiny_raw(tmp_path), ["train.wd_mult.atoms=-1"]))
    with pytest.raises(ConfigError, match="this model does not have"):  # dense: no atoms
        train(TrainRunConfig.from_dict(apply_overrides(tiny_raw(tmp_path), ["train.lr_mult.atoms=2"])))


def test_parameter_groups_receive_their_learning_rates(tmp_path):
    overrides = [
        "model.attention=masa-qkvo",
        "model.n_atoms=1",
        "train.lr_mult.atoms=3",
        "train.lr_mult.coefficients=0.5",
    ]
    config = TrainRunConfig.from_dict(apply_overrides(tiny_raw(tmp_path, max_steps=4), overrides))
    assert config.train.lr_mult == {"atoms": 3.0, "coefficients": 0.5}
    assert TrainRunConfig.from_dict(config.to_dict()) == config
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append({g["kind"]: g["lr"] for g in self.param_groups})
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        train(config)
    assert len(seen) == 4
    for step, lrs in enumerate(seen):
        lr = lr_at(step, 4, 1e-2, 1e-3, 0.1)
        assert lrs == pytest.approx({"atoms": 3 * lr, "coefficients": 0.5 * lr, "norm": lr, "dense": lr})


# -------------------------------------------------------------------------------------- end to end


def test_train_end_to_end_loss_decreases_and_saves(tmp_path):
    summary = train(TrainRunConfig.from_dict(tiny_raw(tmp_path, max_steps=30, eval_every=15, lr=2e-2)))
    curve = losses(tmp_path / "run")
    assert len(curve) == 30 and sum(curve[-5:]) < sum(curve[:5]) - 5 * 0.5
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["epochs_seen"] == pytest.approx(30 * 4 * 16 / summary["train_tokens"])
    for key in ("parameters", "tokens_per_s", "wall_time_s", "peak_memory_mb"):
        assert summary[key] > 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[14])
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "val_loss", "val_ppl", "elapsed_s"} <= set(record)
    model = masa.load(tmp_path / "run" / "final")
    assert sum(p.numel() for p in model.parameters()) == summary["parameters"]
    assert (tmp_path / "run" / "final" / "tokenizer.json").is_file()


def test_resume_repeats_an_uninterrupted_run_exactly(tmp_path, monkeypatch):
    full = train(TrainRunConfig.from_dict(tiny_raw(tmp_path, out_dir=str(tmp_path / "full"))))
    raw = tiny_raw(tmp_path, out_dir=str(tmp_path / "cut"), checkpoint_every=4)
    real_append = trainer.append_metrics

    def append_then_die(path, record):
        real_append(path, record)
        if record["step"] == 6:  # two steps past the checkpoint of step 4
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "append_metrics", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(TrainRunConfig.from_dict(raw))
    monkeypatch.undo()
    assert len(losses(tmp_path / "cut")) == 6
    resumed = train(TrainRunConfig.from_dict(raw), resume=True)
    assert resumed["resumed_from_step"] == 4
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    a, b = (masa.load(tmp_path / name / "final").state_dict() for name in ("full", "cut"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = MasaLM(
        MasaLMConfig(vocab_size=20, n_layer=1, n_head=2, d_model=8, max_seq_len=8, tie_embeddings=True)
    )
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, {"tokens": 1}, keep=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", fail)  # dies after model.safetensors is written
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 2, model, optimizer, {"tokens": 2}, keep=3)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "step_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]
    fresh, fresh_opt = _model_and_optimizer(1)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state == {"tokens": 1, "step": 1}
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert fresh.lm_head.weight is fresh.embed_tokens.weight  # tied weights survive the round trip
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )


def test_hard_crash_leftovers_are_cleaned_and_old_checkpoints_pruned(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    (tmp_path / ".tmp_step_000003").mkdir(parents=True)  # a save killed before its rename
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000004"


# ------------------------------------------------------------------------------------- distributed

_DDP_SCRIPT = """
import json, sys
from masa.train import TrainRunConfig, train
train(TrainRunConfig.from_dict(json.loads(open(sys.argv[1]).read())))
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_accumulation(tmp_path):
    """Two gloo ranks with batch b each take the same windows as one process with grad_accum 2."""
    steps = {"max_steps": 3, "eval_every": 3}
    single = train(
        TrainRunConfig.from_dict(tiny_raw(tmp_path, grad_accum=2, out_dir=str(tmp_path / "one"), **steps))
    )
    config, script = tmp_path / "ddp.json", tmp_path / "ddp_train.py"
    config.write_text(json.dumps(tiny_raw(tmp_path, out_dir=str(tmp_path / "two"), **steps)))
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(config),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == single["tokens"]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)


_FSDP_SCRIPT = """
import json, sys
from masa.train import TrainRunConfig, train
train(TrainRunConfig.from_dict(json.loads(open(sys.argv[1]).read())), resume=sys.argv[2] == "resume")
"""


@pytest.mark.slow
def test_fsdp_two_processes_resume_exactly_and_match_one_process(tmp_path):
    """FSDP2 on two gloo ranks (atom bank and generator sharded at the root, blocks one by one) repeats one
    process with grad_accum 2, and resumed from its checkpoint of step 2 it repeats steps 3-4 exactly."""
    model = {"model.attention": "masa-qkvo", "model.n_atoms": 1, "model.coef_generator": True}
    sets = [f"{k}={json.dumps(v)}" for k, v in model.items()]
    steps = {"max_steps": 4, "eval_every": 4, "checkpoint_every": 2}
    single_raw = apply_overrides(
        tiny_raw(tmp_path, grad_accum=2, out_dir=str(tmp_path / "one"), **steps), sets
    )
    single = train(TrainRunConfig.from_dict(single_raw))
    raw = apply_overrides(tiny_raw(tmp_path, out_dir=str(tmp_path / "two"), parallel="fsdp", **steps), sets)
    config, script = tmp_path / "fsdp.json", tmp_path / "fsdp_train.py"
    config.write_text(json.dumps(raw))
    script.write_text(_FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    ckpts = tmp_path / "two" / "checkpoints"
    for mode in ("fresh", "resume"):
        done = subprocess.run([*run, str(config), mode], capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
        if mode == "fresh":  # rewind: as if the run had stopped after the checkpoint of step 2
            (ckpts / "latest").write_text("step_000002\n")
            shutil.rmtree(ckpts / "step_000004")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_from_step"] == 2
    assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=1e-5)
    a, b = (masa.load(tmp_path / name / "final").state_dict() for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_fsdp_without_torchrun_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match="train.parallel = 'fsdp' shards the model over processes: run under torchrun"
    ):
        train(TrainRunConfig.from_dict(tiny_raw(tmp_path, parallel="fsdp")))
    with pytest.raises(ConfigError, match="train.parallel 'zero' is unknown: use one of ddp, fsdp"):
        TrainRunConfig.from_dict(tiny_raw(tmp_path, parallel="zero"))


def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """train.compile = true runs the model through torch.compile (dynamo's graph capture; the eager
    backend here, as inductor's code generation takes minutes on a CPU) with the same losses."""
    from masa.model import MasaLM

    calls = []
    real_compile = torch.nn.Module.compile

    def eager_compile(self, **kwargs):
        calls.append(type(self).__name__)
        real_compile(self, backend="eager", **kwargs)

    monkeypatch.setattr(MasaLM, "compile", eager_compile)
    for name, compiled in (("eager", False), ("compiled", True)):
        (tmp_path / name).mkdir()
        raw = tiny_raw(tmp_path / name, compile=compiled, max_steps=3)
        raw["model"] |= {"attention": "masa-qkvo", "n_atoms": 1}
        train(TrainRunConfig.from_dict(raw))
    assert calls == ["MasaLM"]
    torch.testing.assert_close(
        losses(tmp_path / "compiled" / "run"), losses(tmp_path / "eager" / "run"), rtol=1e-5, atol=1e-6
    )
