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


def test_export_writes_the_source_config_verbatim(tmp_path):
    """A 4.x-style config (``rope_scaling`` llama3, which transformers 5 re-saves as ``rope_parameters``)
    comes back byte for byte, and transformers loads the export to the dense runtime's logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    source = tmp_path / "source"
    build("llama3", n_layer=2).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope  # the 4.x spelling
    text = json.dumps(config, indent=3) + "\n"
    (source / "config.json").write_text(text)
    model = masa.load(source)
    assert model.config.rope_parameters["rope_type"] == "llama3"  # transformers read the 4.x keys
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    compress(model, CompressConfig("svd-llm", 0.3, targets=("all-linear",)), calib=ids)
    compressed = masa.save(model, tmp_path / "svd", files_from=source)
    assert "rope_scaling" not in (compressed / "config.json").read_text()  # transformers 5 rewrote it
    assert main(["export", str(compressed), "--dense", "--out", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "config.json").read_text() == text
    assert not (tmp_path / "plain" / "source_config.json").exists()
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits
        dense = masa.load(compressed, runtime="dense")(ids).logits
    torch.testing.assert_close(plain, dense, atol=1e-5, rtol=1e-5)
    # a masa source passes the kept text on; a model saved without a source falls back to its config
    again = masa.save(masa.load(compressed), tmp_path / "again", files_from=compressed)
    assert (again / "source_config.json").read_text() == text
    bare = masa.save(masa.load(compressed), tmp_path / "bare")
    assert main(["export", str(bare), "--dense", "--out", str(tmp_path / "bare-plain")]) == 0
    assert "rope_parameters" in json.loads((tmp_path / "bare-plain" / "config.json").read_text())


def test_export_refuses_a_native_model_and_a_missing_mode(tmp_path, capsys):
    from masa.model import MasaLM, MasaLMConfig

    config = MasaLMConfig(
        vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=16, attention="lowrank", rank=4
    )
    native = masa.save(MasaLM(config), tmp_path / "native")
    assert main(["export", str(native), "--dense", "--out", str(tmp_path / "out")]) == 2
    assert "native masa model" in capsys.readouterr().err
    assert main(["export", str(native), "--out", str(tmp_path / "out")]) == 2
    assert "--dense" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
