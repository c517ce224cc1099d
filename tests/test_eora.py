"""EoRA compensation: exact on a known low-rank error, never worse, an identity on SVD-LLM, in the ratio."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import build, outlier_norms, total_whitened_error

import masa
from masa.compress import CompressConfig, calibrate, compress
from masa.compress.compensate import SPLITS, corrections, error_weights, uniform_ranks
from masa.compress.layout import resolve_layout
from masa.compress.methods.lowrank import per_input, truncate
from masa.compress.whitening import cholesky_factor, whitened_error
from masa.nn.compensated import CompensatedLinear


@pytest.fixture(scope="module")
def setup():
    model = build("llama", n_layer=2)
    outlier_norms(model)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(5))  # (N, T)
    layout = resolve_layout(model, CompressConfig("svd-llm", 0.5, targets="all-linear"))
    stats = calibrate(model, tokens, layout.names)
    return model, tokens, layout, stats


def _corrected(layout, stats, weights, ranks) -> dict[str, torch.Tensor]:
    fix = corrections(layout, stats, weights, ranks).tensors
    return {
        n: w + fix[f"{n}.correction.up"] @ fix[f"{n}.correction.down"] if ranks[n] else w
        for n, w in weights.items()
    }


def test_full_rank_recovers_a_low_rank_error_exactly(setup):
    _, _, layout, stats = setup
    gen = torch.Generator().manual_seed(0)
    weights = {
        t.name: t.weight.double()
        - torch.randn(t.shape[0], 2, generator=gen, dtype=torch.float64)
        @ torch.randn(2, t.shape[1], generator=gen, dtype=torch.float64)
        for t in layout.targets
    }  # W_hat = W - (rank-2 error)
    fixed = _corrected(layout, stats, weights, uniform_ranks(layout, 2))
    for t in layout.targets:
        torch.testing.assert_close(fixed[t.name], t.weight.double(), atol=1e-9, rtol=1e-9)


def test_never_increases_the_whitened_error(setup):
    _, _, layout, stats = setup
    sizes = {t.name: t.shape[1] for t in layout.targets}
    plain = truncate(
        layout.targets, dict.fromkeys(layout.names, 4), lambda n: torch.eye(sizes[n], dtype=torch.float64)
    )
    weights = {
        t.name: plain.tensors[f"{t.name}.up"] @ plain.tensors[f"{t.name}.down"] for t in layout.targets
    }
    for rank in (1, 3, 8):
        fixed = _corrected(layout, stats, weights, uniform_ranks(layout, rank))
        for t in layout.targets:
            gram = stats.grams[t.name]
            assert whitened_error(t.weight, fixed[t.name], gram) <= whitened_error(
                t.weight, weights[t.name], gram
            )


def test_svd_llm_plus_eora_is_svd_llm_at_the_summed_rank(setup):
    _, _, layout, stats = setup
    chol = per_input(cholesky_factor, stats.grams)
    k, r = 3, 4

    def dense(rank: int) -> dict[str, torch.Tensor]:
        out = truncate(layout.targets, dict.fromkeys(layout.names, rank), chol).tensors
        return {n: out[f"{n}.up"] @ out[f"{n}.down"] for n in layout.names}

    summed = _corrected(layout, stats, dense(k), uniform_ranks(layout, r))
    for name, weight in dense(k + r).items():
        assert (summed[name] - weight).abs().max() <= 1e-10 * weight.abs().max()


@pytest.mark.parametrize("method", ["svd", "asvd", "basis-sharing", "cospadi"])
def test_compress_with_eora_keeps_the_ratio_and_lowers_the_error(setup, method, tmp_path):
    options = {"iterations": 5} if method == "cospadi" else {}
    spec = "eora:0.3" if method == "cospadi" else "eora"  # one K-SVD run instead of a searched split
    base, tokens, layout, stats = setup
    errors, results = {}, {}
    for compensate in (None, spec):
        model = copy.deepcopy(base)
        config = CompressConfig(method, 0.4, targets="all-linear", options=options, compensate=compensate)
        # statistics alone: the split by the criterion (on these random weights the calibration loss may
        # keep share 0; test_searched_split_is_never_worse_than_plain covers that path)
        results[compensate] = compress(model, config, None, stats=stats)
        errors[compensate] = total_whitened_error(model, base, layout.names, stats)
        weights = error_weights(layout, results[None].report)  # the criterion the split is chosen by
        errors[compensate, "criterion"] = _weighted_error(model, base, stats, weights)
    assert abs(results[spec].ratio_reached - 0.4) <= 0.01
    assert masa.count(model).ratio() == pytest.approx(results[spec].ratio_reached)
    report = results[spec].report["compensation"]
    assert errors[spec, "criterion"] < errors[None, "criterion"] and report["share"] > 0 and report["ranks"]
    assert any(isinstance(m, CompensatedLinear) for m in model.modules())
    chosen = next(c for c in report["tried"] if c["share"] == report["share"])
    assert chosen["whitened_error"] == pytest.approx(errors[spec], rel=1e-3)
    assert chosen["criterion"] == pytest.approx(errors[spec, "criterion"], rel=1e-3)
    masa.save(model, tmp_path / "m", info=results[spec].info)
    loaded = masa.load(tmp_path / "m")
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


def _weighted_error(model, base, stats, weights) -> float:
    return sum(w * total_whitened_error(model, base, [n], stats) for n, w in weights.items())


def _calibration_loss(model, tokens) -> float:
    logits = model(tokens).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


@pytest.mark.parametrize("method", ["masa", "svd-llm", "svd"])
def test_searched_split_is_never_worse_than_plain(setup, method):
    """Share 0 (the plain method) is always tried; with calibration tokens the split is chosen by the
    calibration loss, without them by the method's own criterion; either way never worse than plain."""
    base, tokens, layout, stats = setup
    models, results = {}, {}
    for compensate, calib in ((None, tokens), ("eora", tokens), ("eora-stats-only", None)):
        models[compensate] = copy.deepcopy(base)
        config = CompressConfig(method, 0.4, targets="all-linear", compensate=compensate and "eora")
        results[compensate] = compress(models[compensate], config, calib, stats=stats)
        assert abs(results[compensate].ratio_reached - 0.4) <= 0.01
    # by calibration loss: the chosen split's loss is the least tried and the model's own, at most plain's
    report = results["eora"].report["compensation"]
    assert report["chosen_by"] == "calibration_loss"
    assert [c["share"] for c in report["tried"]] == list(dict.fromkeys((0.0, *SPLITS)))
    chosen = next(c for c in report["tried"] if c["share"] == report["share"])
    assert chosen["calibration_loss"] == min(c["calibration_loss"] for c in report["tried"])
    with torch.no_grad():
        searched, plain = (_calibration_loss(models[c], tokens) for c in ("eora", None))
    assert chosen["calibration_loss"] == pytest.approx(searched, rel=1e-5)
    assert searched <= plain + 1e-6
    # by the criterion (statistics alone): masa's own objective, else the summed whitened error
    report = results["eora-stats-only"].report["compensation"]
    assert report["chosen_by"] == "criterion" and all("calibration_loss" not in c for c in report["tried"])
    weights = error_weights(layout, results[None].report)
    if method == "masa":  # masa's own objective: its role weight / role energy, stated in its report
        assert weights == results[None].report["error_weights"]
    else:
        assert set(weights.values()) == {1.0}
    plain, searched = (_weighted_error(models[c], base, stats, weights) for c in (None, "eora-stats-only"))
    assert searched <= plain * (1 + 1e-9)
    chosen = next(c for c in report["tried"] if c["share"] == report["share"])
    assert chosen["criterion"] == min(c["criterion"] for c in report["tried"] if "criterion" in c)
    assert chosen["criterion"] == pytest.approx(searched, rel=1e-3)


def test_fixed_rank_and_fraction(setup):
    base, tokens, _, stats = setup
    model = copy.deepcopy(base)
    result = compress(
        model, CompressConfig("svd", 0.4, targets="all-linear", compensate="eora:2"), tokens, stats=stats
    )
    assert set(result.report["compensation"]["ranks"].values()) == {2}
    assert abs(result.ratio_reached - 0.4) <= 0.01
    model = copy.deepcopy(base)
    result = compress(
        model, CompressConfig("svd", 0.4, targets="all-linear", compensate="eora:0.2"), tokens, stats=stats
    )
    assert result.report["compensation"]["share"] == 0.2 and abs(result.ratio_reached - 0.4) <= 0.01


def test_bad_compensation_is_an_error_naming_the_fix(setup):
    base, tokens, _, stats = setup
    for spec, message in [
        ("eorb", "unknown compensation"),
        ("eora:0", "out of range"),
        ("eora:x", "not a rank"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompressConfig("svd", 0.4, compensate=spec)
    with pytest.raises(ValueError, match="exceeds what .* allows"):
        compress(copy.deepcopy(base), CompressConfig("svd", 0.4, compensate="eora:40"), tokens, stats=stats)
    with pytest.raises(ValueError, match="leave nothing of the budget"):
        compress(copy.deepcopy(base), CompressConfig("svd", 0.4, compensate="eora:12"), tokens, stats=stats)


def test_cli_compress_with_eora_then_compensate_a_compressed_model(saved_llama, capsys):
    from masa import cli

    root = saved_llama
    common = ["--calib", str(root / "calib.txt"), "--calib-samples", "4", "--calib-len", "32"]
    args = ["compress", str(root / "base"), "--method", "svd", "--ratio", "0.4", *common, "--no-cache"]
    assert cli.main([*args, "--compensate", "eora", "--out", str(root / "eora")]) == 0
    block = json.loads((root / "eora" / "config.json").read_text())["masa"]
    assert (
        block["compensate"] == "eora"
        and abs(masa.count(masa.load(root / "eora")).attention_ratio - 0.4) <= 0.01
    )
    assert cli.main([*args, "--out", str(root / "plain")]) == 0
    capsys.readouterr()
    compensate = ["compensate", str(root / "plain"), "--original", str(root / "base"), *common]
    assert cli.main([*compensate, "--rank", "2", "--out", str(root / "fixed")]) == 0
    model = masa.load(root / "fixed")
    assert f"-> {masa.count(model).attention_ratio:.4f}" in capsys.readouterr().out
    assert sum(isinstance(m, CompensatedLinear) for m in model.modules()) == 8  # q, k, v, o of 2 blocks
    assert json.loads((root / "fixed" / "config.json").read_text())["masa"]["compensation"]["rank"] == 2
    twice = ["compensate", str(root / "fixed"), *compensate[2:], "--rank", "1", "--out", str(root / "twice")]
    assert cli.main(twice) == 2 and "no compressed layer" in capsys.readouterr().err
