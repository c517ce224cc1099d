"""End-to-end runs of the `masa` command line on tiny models."""

import argparse
import importlib
import json
import subprocess
import sys

import pytest
import torch
from tiny_models import build
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import masa
from masa.cli import COMMANDS, main
from masa.model import MasaLM, MasaLMConfig


def _char_tokenizer() -> Tokenizer:
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz .,:"))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["[UNK]", *chars])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return tok


@pytest.fixture
def native_dir(tmp_path):
    torch.manual_seed(0)
    config = MasaLMConfig(
        vocab_size=64, n_layer=6, n_head=4, d_model=32, max_seq_len=32, attention="masa-qkvo", n_atoms=2
    )
    model = MasaLM(config)
    masa.save(model, tmp_path / "native", tokenizer=_char_tokenizer())
    return tmp_path / "native"


def test_every_subcommand_has_help(capsys):
    for name in ("train", "info", "sample", "eval", "demo"):
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0
        assert "usage: masa " + name in capsys.readouterr().out
    assert len(COMMANDS) >= 5


def test_listed_help_is_each_modules_own():
    for name, (module, help_text) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_parser(parser.add_subparsers())
        assert " ".join(help_text.split()) in " ".join(parser.format_help().split()), name


HEAVY = ("torch", "transformers", "matplotlib", "numpy", "tqdm", "safetensors.torch")


def test_help_and_info_do_not_import_heavy_modules(native_dir):
    script = (
        "import sys\n"
        "from masa.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "after_help = [m for m in HEAVY if m in sys.modules]\n"
        "assert main(['info', sys.argv[1]]) == 0\n"
        "print(json.dumps([after_help, [m for m in HEAVY if m in sys.modules]]))\n"
    )
    prelude = f"import json\nHEAVY = {HEAVY!r}\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + script, str(native_dir)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [[], []]


def test_info_reports_variant_atoms_and_ratio(native_dir, capsys):
    assert main(["info", str(native_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["variant"] == "masa-qkvo" and info["model_type"] == "masa_lm"
    model = masa.load(native_dir)
    counted = masa.count(model)
    assert info["attention_params"] == counted.attention
    assert info["attention_ratio"] == pytest.approx(counted.attention_ratio)
    assert info["file_bytes"] > counted.total * 4
    assert main(["info", str(native_dir)]) == 0
    assert "compression 6" in capsys.readouterr().out  # 2 atoms of 6 blocks: ~66 %


def test_info_on_a_shared_hf_model_lists_dictionaries(tmp_path, capsys):
    model = build("gpt2", n_layer=6)
    masa.share(model, atoms=2)
    masa.save(model, tmp_path / "gpt2")
    assert main(["info", str(tmp_path / "gpt2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [d["atoms"] for d in info["dictionaries"]] == [2, 2, 2, 2]
    assert info["attention_params"] == masa.count(model).attention


def test_sample_is_seeded_and_decodes(native_dir, capsys):
    args = ["sample", str(native_dir), "--prompt", "to be", "--max-new-tokens", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("to be")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-new-tokens", "0", "is not a positive integer"),
        ("--temperature", "-0.5", "is not a finite number >= 0"),
        ("--temperature", "nan", "is not a finite number >= 0"),
        ("--temperature", "inf", "is not a finite number >= 0"),
        ("--top-k", "-1", "is negative (give 0 or more)"),
    ],
)
def test_sample_refuses_bad_numbers(native_dir, capsys, flag, value, message):
    with pytest.raises(SystemExit) as stop:
        main(["sample", str(native_dir), "--prompt", "to be", flag, value])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "masa.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("masa ")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--layers", "3", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| masa-qkvo |" in out and "held-out ppl" in out
    assert (tmp_path / "demo" / "masa-qkvo" / "final" / "model.safetensors").exists()
