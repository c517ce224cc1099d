"""`masa bench train`: the run lists of both suites, and a whole tiny table1 suite through the CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from masa.bench import command
from masa.bench.train_suite import (
    CURVES_PLOT,
    PPL_PLOT,
    RESULTS_JSON,
    RESULTS_MD,
    RUN_RECORD,
    SuiteConfig,
    knob_text,
    run_config,
    suite_runs,
    variant_config,
)
from masa.model import MasaLMConfig
from masa.train.config import ConfigError


def test_suite_run_lists():
    table1 = suite_runs("table1", n_layer=12, target_ratio=2 / 3)
    assert [s.label for s in table1] == [
        "dense", "gqa", "lowrank", "seq-share", "cycle-share", "masa-qkv-S4", "masa-qkvo-S4",
    ]  # fmt: skip
    ablation = suite_runs("ablation", n_layer=12, target_ratio=2 / 3)
    assert [s.label for s in ablation] == ["dense"] + [
        f"masa-{kind}-S{s}" for kind in ("qkv", "qkvo") for s in (2, 4, 6, 8)
    ]
    generator = suite_runs("generator", n_layer=12, target_ratio=2 / 3)
    assert [s.label for s in generator] == ["dense"] + [
        f"masa-{kind}-S4-{coef}" for kind in ("qkv", "qkvo") for coef in ("generator", "plain")
    ]
    with pytest.raises(ValueError, match="unknown suite"):
        suite_runs("table2", 12, 0.5)


def test_generator_suite_sets_the_coefficients_per_run():
    base = MasaLMConfig(vocab_size=64, n_layer=12, n_head=4, d_model=128)
    runs = suite_runs("generator", 12, 2 / 3)
    flags = [variant_config(s, base, coef_generator=False).coef_generator for s in runs]  # the run decides
    assert flags == [False, True, False, True, False]


def test_variant_knobs_meet_the_budget():
    base = MasaLMConfig(vocab_size=64, n_layer=12, n_head=4, d_model=128)
    knobs = {
        s.label: knob_text(variant_config(s, base, coef_generator=True))
        for s in suite_runs("table1", 12, 2 / 3)
    }
    assert knobs == {
        "dense": "-", "gqa": "g=4", "lowrank": "r=21", "seq-share": "M=4", "cycle-share": "M=4",
        "masa-qkv-S4": "S=4", "masa-qkvo-S4": "S=4",
    }  # fmt: skip
    masa = variant_config(suite_runs("table1", 12, 2 / 3)[-1], base, coef_generator=True)
    assert masa.coef_generator


def test_suite_multipliers_apply_to_the_runs_that_have_those_parameters(tmp_path):
    """A generator learning-rate multiplier for the suite reaches the runs with a generator only (the
    trainer refuses a multiplier for parameters a model lacks), so the other runs keep their records."""
    sets = ["train.lr_mult.generator=0.1", "train.lr_mult.atoms=2", "train.wd_mult.factors=0.5"]
    config = SuiteConfig.from_toml(command.resolve_train_preset("quick"), sets)
    base = config.run.model_config(config.run.data.vocab_size)
    multipliers = {}
    for spec in suite_runs("generator", base.n_layer, config.bench.target_ratio):
        train = run_config(config.run, variant_config(spec, base, True), 0, tmp_path).train
        multipliers[spec.label] = (train.lr_mult, train.wd_mult)
    assert multipliers == {
        "dense": ({}, {}),
        "masa-qkv-S4-generator": ({"generator": 0.1, "atoms": 2.0}, {}),
        "masa-qkv-S4-plain": ({"atoms": 2.0}, {}),
        "masa-qkvo-S4-generator": ({"generator": 0.1, "atoms": 2.0}, {}),
        "masa-qkvo-S4-plain": ({"atoms": 2.0}, {}),
    }
    plain_config = SuiteConfig.from_toml(command.resolve_train_preset("quick"), [])
    written = {
        spec.label: run_config(plain_config.run, variant_config(spec, base, True), 0, tmp_path).train.lr_mult
        for spec in suite_runs("generator", base.n_layer, config.bench.target_ratio)
    }  # the default is written out where it applies, so runs recorded under another default are not reused
    assert written == {
        "dense": {}, "masa-qkv-S4-generator": {"generator": 0.1}, "masa-qkv-S4-plain": {},
        "masa-qkvo-S4-generator": {"generator": 0.1}, "masa-qkvo-S4-plain": {},
    }  # fmt: skip
    lowrank = next(s for s in suite_runs("table1", base.n_layer, 2 / 3) if s.label == "lowrank")
    assert run_config(config.run, variant_config(lowrank, base, True), 0, tmp_path).train.wd_mult == {
        "factors": 0.5
    }


def test_suite_config_rejects_a_preset_that_sets_the_attention():
    preset = command.resolve_train_preset("quick")
    with pytest.raises(ConfigError, match="leave model.attention dense"):
        SuiteConfig.from_toml(preset, ["model.attention=masa-qkvo", "model.n_atoms=4"])
    with pytest.raises(ConfigError, match="unknown key 'nope' in \\[bench\\]"):
        SuiteConfig.from_toml(preset, ["bench.nope=1"])


TINY = [
    "model.n_layer=6",
    "model.d_model=16",
    "model.n_head=4",
    'data.train=["tinyshakespeare/input.txt"]',
    "data.vocab_size=300",
    "data.seq_len=16",
    "train.batch_size=2",
    "train.max_steps=2",
    "train.eval_batches=1",
    "train.log_every=1",
    'train.device="cpu"',
    "bench.eval_tokens=64",
    "bench.cpu_threads=1",
]


def test_tiny_table1_suite_writes_every_output(tmp_path):
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    overrides = [*TINY, f'data.cache_dir="{tmp_path / "cache"}"', f'train.out_dir="{tmp_path / "runs"}"']
    argv = ["bench", "train", "--suite", "table1", "--out", str(tmp_path / "out")]
    args = parser.parse_args(argv + [word for item in overrides for word in ("--set", item)])
    assert args.func(args) == 0

    out = tmp_path / "out"
    results = json.loads((out / RESULTS_JSON).read_text())
    labels = [s.label for s in suite_runs("table1", 6, 2 / 3)]
    assert [m["label"] for m in results["methods"]] == labels
    assert results["command"].startswith("masa bench train --suite table1 --preset quick --seeds 1")
    dense, *others = results["methods"]
    assert dense["speed_vs_dense"] == 1.0 and dense["attention_ratio"] == 0.0
    for method in others:
        assert 0.3 < method["attention_ratio"] < 0.7, method
        assert method["attention_params"] < dense["attention_params"]
    for run in results["runs"]:
        assert run["eval_ppl"] > 1 and run["held_out_ppl"] > 1 and run["tokens_per_s"] > 0
        assert len(run["curve"]["loss"]) == 2 and run["steps"] == 2
    report = (out / RESULTS_MD).read_text()
    assert all(f"| {m['attention']} | {m['knob']} |" in report for m in results["methods"])
    assert (out / PPL_PLOT).stat().st_size > 0 and (out / CURVES_PLOT).stat().st_size > 0

    record = tmp_path / "runs" / "table1" / "dense" / "seed0" / RUN_RECORD
    saved = json.loads(record.read_text())
    del saved["key"]["config"]["train"]["compile"]  # recorded before that option existed
    record.write_text(json.dumps(saved))
    stamp = record.stat().st_mtime_ns
    assert args.func(args) == 0  # unchanged configuration: every run is reused, not retrained
    assert record.stat().st_mtime_ns == stamp
    assert json.loads((out / RESULTS_JSON).read_text())["runs"] == results["runs"]


def test_speed_bench_times_every_variant_against_dense(tmp_path):
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    argv = ["bench", "speed", "--suite", "table1", "--rounds", "2", "--out", str(tmp_path / "speed")]
    args = parser.parse_args(argv + [word for item in TINY for word in ("--set", item)])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert [v["label"] for v in results["variants"]] == [s.label for s in suite_runs("table1", 6, 2 / 3)]
    dense, *others = results["variants"]
    assert dense["speed_vs_dense"] == 1.0 and all(v["tokens_per_s"] > 0 for v in results["variants"])
    assert all(v["attention_params"] < dense["attention_params"] for v in others)
    assert results["command"].startswith("masa bench speed --suite table1 --preset quick --rounds 2")
    assert "| masa-qkvo S=2 |" in (tmp_path / "speed" / "speed.md").read_text()


def test_an_interrupted_bench_run_continues_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    from test_train import interrupted, losses, tiny_raw

    from masa.bench import train_suite
    from masa.train import TrainRunConfig

    for name in ("whole", "cut"):
        (tmp_path / name).mkdir()
    whole = TrainRunConfig.from_dict(tiny_raw(tmp_path / "whole", checkpoint_every=4))
    train_suite._train_or_continue(whole)
    raw = tiny_raw(tmp_path / "cut", checkpoint_every=4)
    interrupted(
        monkeypatch, lambda: train_suite._train_or_continue(TrainRunConfig.from_dict(raw)), after_step=6
    )
    train_suite._train_or_continue(TrainRunConfig.from_dict(raw))  # continues from step 4
    assert losses(tmp_path / "cut" / "run") == losses(tmp_path / "whole" / "run")
    raw["train"]["lr"] = 2e-2  # other settings: the run starts again instead of failing
    train_suite._train_or_continue(TrainRunConfig.from_dict(raw))
    assert "starting again (cannot resume from" in capsys.readouterr().out
    assert len(losses(tmp_path / "cut" / "run")) == 8


def test_methods_option_runs_only_those_runs_beside_dense(tmp_path):
    from masa.bench.command import resolve_train_preset
    from masa.bench.train_suite import run_suite

    overrides = [*TINY, f'data.cache_dir="{tmp_path / "cache"}"', f'train.out_dir="{tmp_path / "runs"}"']
    config = SuiteConfig.from_toml(resolve_train_preset("medium"), overrides)
    with pytest.raises(ValueError, match="suite table1 has no run masa-qkvo: choose among dense, gqa"):
        run_suite("table1", config, 1, tmp_path / "out", methods=["masa-qkvo"])
    results = run_suite("table1", config, 1, tmp_path / "out", methods=["lowrank"])
    assert [m["label"] for m in results["methods"]] == ["dense", "lowrank"]
    assert sorted(p.name for p in (tmp_path / "runs" / "table1").iterdir()) == ["dense", "lowrank"]


def test_speed_bench_subset_bf16_and_model_flops(tmp_path):
    from masa.bench.speed import dense_flops_per_token

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    argv = ["bench", "speed", "--suite", "table1", "--rounds", "1", "--methods", "masa-qkvo-S2"]
    argv += ["--peak-tflops", "0.5", "--out", str(tmp_path / "speed"), "--set", 'train.dtype="bfloat16"']
    args = parser.parse_args(argv + [word for item in TINY for word in ("--set", item)])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert [v["label"] for v in results["variants"]] == ["dense", "masa-qkvo-S2"]
    assert results["dtype"] == "bfloat16" and "--methods masa-qkvo-S2" in results["command"]
    config = MasaLMConfig(vocab_size=300, n_layer=6, d_model=16, n_head=4)
    # 6 x (6 blocks x (4 d^2 + 3 d d_ff) + d V) + 12 L T d
    assert (
        dense_flops_per_token(config, 16)
        == 6 * (6 * (4 * 256 + 3 * 16 * config.ff_dim) + 16 * 300) + 12 * 6 * 16 * 16
    )
    for v in results["variants"]:
        assert v["mfu"] == pytest.approx(v["model_tflops_per_s"] / 0.5) and v["peak_memory_mb"] is None
