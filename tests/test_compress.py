"""Training-free low-rank methods (svd, asvd, svd-llm): ratio reached, fidelity, error ordering, save/load, CLI."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from tiny_models import FAMILIES, build, make_low_rank, outlier_norms, outputs, total_whitened_error

import masa
from masa import cli
from masa.budget import allocate, rank_knob
from masa.compress import CompressConfig, calibrate, compress
from masa.compress.api import resolve_targets
from masa.compress.install import install, lowrank_replacement

METHODS = ("svd", "asvd", "svd-llm")


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))  # (N, T)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_reaches_ratio(family, method, tokens):
    model = build(family, n_layer=2)
    result = compress(model, CompressConfig(method, 0.4), tokens)
    assert abs(result.ratio_reached - 0.4) <= 0.01
    assert masa.count(model).attention_ratio == pytest.approx(result.ratio_reached)  # attn = every q, k, v, o
    assert result.params_after < result.params_before and "factorisation" in result.seconds
    assert (result.calibration is None) == (method == "svd")


def test_all_linear_ratio_and_ranks_balanced(tokens):
    model = build("llama", n_layer=2)
    result = compress(model, CompressConfig("svd-llm", 0.3, targets="all-linear"), tokens)
    assert abs(result.ratio_reached - 0.3) <= 0.01 and result.n_modules == 14
    assert masa.count(model).ratio() == pytest.approx(result.ratio_reached)
    q_ranks = [r for n, r in result.report["ranks"].items() if n.endswith("q_proj")]
    assert max(q_ranks) - min(q_ranks) <= 1


def test_allocate_ranks_spends_rounding_and_bias_budget():
    ranks = allocate({f"m{i}": rank_knob(32, 32, True) for i in range(8)}, 0.5)
    stored = sum(r * 64 + 32 for r in ranks.values())
    assert abs(1 - stored / (8 * (1024 + 32)) - 0.5) < 0.01 and max(ranks.values()) - min(ranks.values()) <= 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", METHODS)
def test_tiny_ratio_reproduces_outputs(family, method, tokens):
    model = build(family, n_layer=2)
    make_low_rank(model)
    reference = outputs(model, tokens)
    compress(model, CompressConfig(method, 1e-3), tokens)
    torch.testing.assert_close(outputs(model, tokens), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_whitened_methods_beat_plain_svd(family, tokens):
    base = build(family, n_layer=2)
    outlier_norms(base)
    names = resolve_targets(base, CompressConfig("svd", 0.5))
    stats = calibrate(base, tokens, names)
    errors = {}
    for method, options in [*((m, {}) for m in METHODS), ("svd-llm", {"refit": True})]:
        model = copy.deepcopy(base)
        compress(model, CompressConfig(method, 0.5, options=options), stats=stats)
        errors[method + "+refit" * bool(options)] = total_whitened_error(model, base, names, stats)
    assert errors["svd-llm"] <= errors["asvd"] < errors["svd"]
    assert errors["svd-llm+refit"] <= errors["svd-llm"] * (1 + 1e-6)


@pytest.mark.parametrize(("family", "method"), [("llama", "svd-llm"), ("gpt2", "asvd"), ("bert", "svd")])
def test_save_load_round_trip_is_exact(family, method, tokens, tmp_path):
    model = build(family, n_layer=2)
    result = compress(model, CompressConfig(method, 0.5, targets="all-linear"), tokens)
    masa.save(model, tmp_path / "out", info=result.info)
    loaded = masa.load(tmp_path / "out")
    assert torch.equal(outputs(loaded, tokens), outputs(model, tokens))
    block = json.loads((tmp_path / "out" / "config.json").read_text())["masa"]
    assert block["method"] == method and block["ratio"] == 0.5 and block["targets"] == ["all-linear"]


def test_errors_name_the_problem(tokens):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: ratio 0\.990 leaves rank"):
        compress(build("llama", 2), CompressConfig("svd", 0.99))
    with pytest.raises(ValueError, match="reached ratio"):  # one 16x32 layer: ranks too coarse for 0.3
        compress(build("qwen2", 1), CompressConfig("svd", 0.3, targets=["layers.0.self_attn.k_proj"]))
    with pytest.raises(ValueError, match="matches no module"):
        compress(build("llama", 1), CompressConfig("svd", 0.3, targets=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="unknown compression method 'nope'"):
        compress(build("llama", 1), CompressConfig("nope", 0.3))
    with pytest.raises(ValueError, match="has no option"):
        compress(build("llama", 1), CompressConfig("asvd", 0.3, options={"beta": 1}), tokens)
    with pytest.raises(ValueError, match="needs calibration data"):
        compress(build("llama", 1), CompressConfig("svd-llm", 0.3))
    model = build("llama", 1)
    nan = lowrank_replacement(
        "model.layers.0.self_attn.q_proj", torch.full((32, 2), torch.nan), torch.ones(2, 32), None
    )
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.up: the fitted values hold NaN"
    ):
        install(model, nan)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # left unchanged


def test_non_pd_gram_is_an_error_naming_the_layer(tokens):
    model = build("llama", 1)
    names = resolve_targets(model, CompressConfig("svd-llm", 0.5))
    stats = calibrate(model, tokens, names)
    stats.grams[names[0]].neg_()  # q, k and v share it
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: the calibration Gram .* not positive"
    ):
        compress(model, CompressConfig("svd-llm", 0.5), stats=stats)


def test_unsupported_architecture_needs_explicit_targets(tokens):
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(ValueError, match="--targets attn needs a known architecture.*bloom"):
        compress(model, CompressConfig("svd-llm", 0.4), tokens)
    result = compress(model, CompressConfig("svd-llm", 0.4, targets=["self_attention.dense"]), tokens)
    assert abs(result.ratio_reached - 0.4) <= 0.01


# ------------------------------------------------------------------------------------------- CLI


def _compress_cli(root, out: str, *extra: str) -> int:
    args = [
        "compress",
        str(root / "base"),
        "--method",
        "svd-llm",
        "--ratio",
        "0.4",
        "--calib",
        str(root / "calib.txt"),
    ]
    args += [
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(root / out),
    ]
    return cli.main([*args, *extra])


def test_cli_compress_end_to_end(saved_llama, capsys):
    root = saved_llama
    assert _compress_cli(root, "small", "--option", "refit=true") == 0
    summary = capsys.readouterr().out
    assert "ratio 0.3984 reached (requested 0.4000)" in summary and "MiB of weights" in summary
    block = json.loads((root / "small" / "config.json").read_text())["masa"]
    assert block["method"] == "svd-llm" and block["options"] == {"refit": True}
    assert block["calibration"]["samples"] == 4 and (root / "small" / "tokenizer.json").exists()
    model = masa.load(root / "small")
    assert abs(masa.count(model).attention_ratio - 0.4) <= 0.01

    assert _compress_cli(root, "small") == 2  # existing --out refused, left as it was
    assert "already exists" in capsys.readouterr().err
    assert _compress_cli(root, "small", "--overwrite", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["reused"] and report["file_bytes"] > 0  # statistics from the cache


def test_cli_errors_leave_no_directory(saved_llama, capsys):
    root = saved_llama
    assert _compress_cli(root, "bad", "--calib-samples", "64") == 2
    assert "tokens but 64 samples x 32 tokens" in capsys.readouterr().err
    assert _compress_cli(root, "bad", "--ratio", "0.99") == 2
    assert "leaves rank" in capsys.readouterr().err
    assert not (root / "bad").exists() and not list(root.glob(".bad.tmp*"))  # the lock file stays
    (root / "empty").mkdir()
    args = ["compress", str(root / "empty"), "--method", "svd", "--ratio", "0.5", "--out", str(root / "x")]
    assert cli.main(args) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_second_compress_to_a_busy_out_is_refused(saved_llama):
    """While one process holds --out (here: this test, through the same lock), a second ``masa compress``
    in another process is refused at once, naming the holder, and writes nothing."""
    import subprocess
    import sys

    from masa.io.lock import directory_lock

    root, out = saved_llama, saved_llama / "busy"
    argv = [sys.executable, "-m", "masa.cli", "compress", str(root / "base"), "--method", "svd", "--ratio",
            "0.4", "--out", str(out)]  # fmt: skip
    with directory_lock(out):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "pid" in done.stderr and str(os.getpid()) in done.stderr
    assert not out.exists()
    assert subprocess.run(argv, capture_output=True, text=True, timeout=300).returncode == 0  # free again
