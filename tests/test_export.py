"""``masa export --dense``: a compressed model as a stock checkpoint that transformers loads without masa."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build

import masa
from masa.cli import main
from masa.compress import CompressConfig, compress

# family -> method: Conv1D and fused c_attn, fused qkv/gate_up, per-head interleave, tied embeddings + atoms
CASES = {"gpt2": "svd-llm", "phi3": "svd-llm", "gpt_neox": "svd-llm", "llama3": "masa"}

# Runs in a fresh process where importing masa fails: transformers alone must load every export.
PLAIN_LOAD = """
import sys
sys.modules["masa"] = None
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
ids = load_file(sys.argv[1])["ids"]
for out in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        save_file({"logits": model(ids).logits.contiguous()}, out + ".logits.safetensors")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (masa directory, export directory, masa model's logits on ids)."""
    root = tmp_path_factory.mktemp("export")
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    results = {}
    for family, method in CASES.items():
        torch.manual_seed(0)
        model = build(family, n_layer=2)
        compress(model, CompressConfig(method, 0.3, targets=("all-linear",)), calib=ids)
        source = masa.save(model, root / family)
        assert main(["export", str(source), "--dense", "--out", str(root / f"{family}-plain")]) == 0
        with torch.no_grad():
            results[family] = (source, root / f"{family}-plain", masa.load(source)(ids).logits)
    save_file({"ids": ids}, str(root / "ids.safetensors"))
    outs = [str(out) for _, out, _ in results.values()]
    run = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(root / "ids.safetensors"), *outs],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return results


@pytest.mark.parametrize("family", list(CASES))
def test_export_loads_in_plain_transformers(family, exported):
    source, out, logits = exported[family]
    plain = load_file(f"{out}.logits.safetensors")["logits"]
    torch.testing.assert_close(plain, logits, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert "masa" not in config
    assert config == {
        k: v for k, v in json.loads((source / "config.json").read_text()).items() if k != "masa"
    }


def test_export_refuses_a_plain_model_and_an_existing_target(tmp_path, capsys):
    plain = masa.save(build("llama", n_layer=2), tmp_path / "plain")
    assert main(["export", str(plain), "--dense", "--out", str(tmp_path / "out")]) == 2
    assert "not compressed by masa" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    model = build("llama", n_layer=2)
    ids = torch.randint(0, 64, (2, 8))
    compress(model, CompressConfig("svd-llm", 0.3, targets=("all-linear",)), calib=ids)
    source = masa.save(model, tmp_path / "svd")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(source), "--dense", "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
