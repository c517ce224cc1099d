"""`masa bench compress`: a tiny preset end to end through the CLI, resuming, and preset validation."""

from __future__ import annotations

import json

import pytest

from masa import cli
from masa.bench.compress_suite import RESULTS_JSON, RESULTS_MD, CompressBenchConfig, plan_runs


def _preset(root, methods: list[str]) -> str:
    path = root / "tiny.toml"
    path.write_text(
        f"methods = {json.dumps(methods)}\n"
        "ratios = [0.2, 0.4]\n"
        'targets = ["attn"]\n'
        'allocations = ["uniform", "whitened-error"]\n'
        f'calib_text = "{root / "calib.txt"}"\n'
        "calib_samples = 4\ncalib_len = 32\n"
        f'eval_text = "{root / "calib.txt"}"\n'
        "eval_tokens = 256\neval_batch_size = 4\nseq_len = 32\n"
        "[options.cospadi]\niterations = 4\n"
    )
    return str(path)


def test_tiny_bench_writes_results_and_resumes(saved_llama, capsys):
    root = saved_llama
    methods = ["svd", "svd-llm", "basis-sharing", "cospadi", "masa"]
    argv = ["bench", "compress", "--preset", _preset(root, methods), "--model", str(root / "base")]
    assert cli.main([*argv, "--out", str(root / "out")]) == 0
    results = json.loads((root / "out" / RESULTS_JSON).read_text())
    runs = results["runs"]
    assert len(runs) == 2 * (2 * 4 + 1)  # ratios x (allocations x methods + masa's own)
    for run in runs:
        assert "error" not in run, run
        assert abs(run["ratio_reached"] - run["ratio"]) <= 0.01 and run["ppl"] > 1
    assert results["dense"]["ppl"] > 1 and results["dense"]["params"] > runs[0]["params_after"]
    report = (root / "out" / RESULTS_MD).read_text()
    assert "| masa |" in report and "| basis-sharing [whitened-error] |" in report
    assert (root / "out" / "ppl_attn.png").stat().st_size > 0
    assert (root / "out" / "compress_time.png").stat().st_size > 0

    capsys.readouterr()
    assert cli.main([*argv, "--out", str(root / "out")]) == 0  # the same setup: every run is reused
    assert "attn svd" not in capsys.readouterr().out
    assert json.loads((root / "out" / RESULTS_JSON).read_text())["runs"] == runs


def test_preset_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        CompressBenchConfig(methods=["nope"])
    with pytest.raises(ValueError, match=r"ratios \[1.5\] must be a non-empty list in \(0, 1\)"):
        CompressBenchConfig(ratios=[1.5])
    with pytest.raises(ValueError, match="targets .* are not presets"):
        CompressBenchConfig(targets=["q_proj"])
    with pytest.raises(ValueError, match="options given for methods"):
        CompressBenchConfig(methods=["svd"], options={"cospadi": {"iterations": 2}})
    bad = tmp_path / "bad.toml"
    bad.write_text("ratio = 0.3\n")
    with pytest.raises(ValueError, match="unknown keys \\['ratio'\\]"):
        CompressBenchConfig.from_toml(bad)
    config = CompressBenchConfig(methods=["svd", "masa"], ratios=[0.1], targets=["attn", "all-linear"])
    assert len(plan_runs(config)) == 2 * (2 + 1)
