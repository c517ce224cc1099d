"""Healing: lowers the distillation loss, keeps the ratio exactly, resumes exactly, refuses bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from tiny_models import build

import masa
from masa import cli
from masa.compress import CompressConfig, compress
from masa.heal.loop import HealConfig, heal, teacher_topk, windows


@pytest.fixture(scope="module")
def pair():
    teacher = build("llama", n_layer=2)
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(3))  # (W, T)
    student = copy.deepcopy(teacher)
    compress(
        student, CompressConfig("svd-llm", 0.5, targets="all-linear", calib_samples=8, calib_len=16), ids
    )
    return teacher, student, teacher_topk(teacher, ids, 64, 8)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_healing_lowers_the_loss_and_keeps_the_ratio(pair):
    _, student, topk = pair
    student = copy.deepcopy(student)
    before = masa.count(student)
    result = heal(student, topk, HealConfig(steps=15, lr=1e-2, batch_size=4, seq_len=16, top_k=64))
    assert sum(result["losses"][-5:]) < 0.8 * sum(result["losses"][:5])
    assert masa.count(student) == before and result["trained"]
    assert all(n.endswith((".up", ".down")) for n in result["trained"])  # factors only: no bias in Llama


def test_resume_is_exact(pair, tmp_path):
    _, student, topk = pair
    config = HealConfig(steps=6, lr=1e-2, batch_size=4, seq_len=16, top_k=16, checkpoint_every=3)
    whole = copy.deepcopy(student)
    heal(whole, topk, config)
    first, second = copy.deepcopy(student), copy.deepcopy(student)
    heal(first, topk, config, tmp_path / "state.pt", progress=lambda r: itertools.islice(r, 3))  # interrupted
    result = heal(second, topk, config, tmp_path / "state.pt", resume=True)
    assert len(result["losses"]) == 6
    for name, value in _params(whole).items():
        torch.testing.assert_close(_params(second)[name], value, atol=0, rtol=0)


def test_bad_input_names_the_problem(pair):
    teacher, _, topk = pair
    with pytest.raises(ValueError, match="nothing to heal"):
        heal(copy.deepcopy(teacher), topk, HealConfig(steps=1, batch_size=4, seq_len=16))
    with pytest.raises(ValueError, match="fewer than one batch"):
        windows(torch.arange(100), HealConfig(batch_size=8, seq_len=16))
    with pytest.raises(ValueError, match="unknown"):
        HealConfig(train=("atomz",))


def test_cli_heal(saved_llama, capsys):
    root = saved_llama
    common = ["--calib", str(root / "calib.txt"), "--calib-samples", "4", "--calib-len", "32", "--no-cache"]
    args = ["compress", str(root / "base"), "--method", "svd-llm", "--ratio", "0.4", *common]
    assert cli.main([*args, "--out", str(root / "small")]) == 0
    heal_args = ["heal", str(root / "small"), "--teacher", str(root / "base"), "--data", str(root / "calib.txt"),
                 "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--top-k", "8", "--lr", "1e-2"]  # fmt: skip
    assert cli.main([*heal_args, "--out", str(root / "healed")]) == 0
    assert "KL" in capsys.readouterr().out
    healed, small = masa.load(root / "healed"), masa.load(root / "small")
    assert masa.count(healed) == masa.count(small)
    assert cli.main([*heal_args[:1], str(root / "base"), *heal_args[2:], "--out", str(root / "x")]) == 2
    assert "nothing to heal" in capsys.readouterr().err


def _compress_args(root, *extra):
    common = ["--calib", str(root / "calib.txt"), "--calib-samples", "4", "--calib-len", "32", "--no-cache"]
    return ["compress", str(root / "base"), "--method", "svd-llm", "--ratio", "0.4", *common, *extra]


def test_cli_compress_with_heal_steps(saved_llama, capsys):
    """``masa compress --heal-steps``: heals before saving; the ratio is the plain compression's; it loads."""
    import json

    root = saved_llama
    heal = ["--heal-steps", "6", "--heal-data", str(root / "calib.txt"), "--heal-batch", "2",
            "--heal-seq-len", "32", "--heal-lr", "1e-2"]  # fmt: skip
    assert (
        cli.main(_compress_args(root, *heal, "--json", str(root / "r.json"), "--out", str(root / "healed")))
        == 0
    )
    assert "healed 6 steps" in capsys.readouterr().out
    assert cli.main(_compress_args(root, "--out", str(root / "plain"))) == 0
    healed, plain = masa.load(root / "healed"), masa.load(root / "plain")
    assert masa.count(healed) == masa.count(plain)
    assert masa.count(healed).attention_ratio == pytest.approx(
        json.loads((root / "r.json").read_text())["ratio_reached"]
    )
    record = json.loads((root / "healed" / "config.json").read_text())["masa"]["healing"]
    assert record["steps"] == 6 and record["lr"] == 1e-2 and record["data"] == str(root / "calib.txt")
    changed = [n for n, p in healed.named_parameters() if not torch.equal(p, plain.get_parameter(n))]
    assert changed and all(n.endswith((".up", ".down")) for n in changed)  # factors trained, nothing else
    tokens = torch.randint(0, 20, (2, 16))
    assert torch.isfinite(healed(tokens).logits).all()


def test_cli_compress_heal_bad_input_names_the_fix(saved_llama, capsys):
    root = saved_llama
    (root / "short.txt").write_text("the quick brown fox")
    cases = [
        (["--heal-steps", "5"], "needs training text: pass --heal-data"),
        (["--heal-steps", "5", "--heal-data", str(root / "short.txt"), "--heal-seq-len", "32"],
         "fewer than one batch of 8 x 32: give a longer text or lower --heal-batch / --heal-seq-len"),
        (["--heal-data", str(root / "calib.txt")], "--heal-steps is not: add --heal-steps N"),
        (["--heal-steps", "5", "--heal-data", str(root / "calib.txt"), "--low-memory"], "drop one of them"),
    ]  # fmt: skip
    for extra, message in cases:
        assert cli.main(_compress_args(root, *extra, "--out", str(root / "x"))) == 2
        assert message in capsys.readouterr().err
        assert not (root / "x" / "config.json").exists()  # refused before any work
    for steps in ("-3", "0"):
        with pytest.raises(SystemExit):
            cli.main(
                _compress_args(
                    root,
                    "--heal-steps",
                    steps,
                    "--heal-data",
                    str(root / "calib.txt"),
                    "--out",
                    str(root / "x"),
                )
            )
        assert (
            "--heal-steps: " + steps + " is not a positive integer (give 1 or more)"
            in capsys.readouterr().err
        )
