"""The lm-eval bridge: a local cloze task runs offline on a loaded model; clear errors otherwise."""

from __future__ import annotations

import sys

import pytest

from masa import cli
from masa.eval.datasets import DATA_DIR


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_local_cloze_task_runs_offline(saved_llama, offline, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    text = str(DATA_DIR / "gutenberg" / "carroll-alice.txt")
    args = [
        "lm-eval",
        str(saved_llama / "base"),
        "--tasks",
        "masa_cloze",
        "--local-cloze",
        text,
        "--limit",
        "8",
    ]
    assert cli.main([*args, "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("masa_cloze:") and "acc,none" in out
    assert cli.main([*args[:3], "no_such_task_xyz", *args[4:]]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


def test_missing_lm_eval_names_the_extra(saved_llama, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert (
        cli.main(["lm-eval", str(saved_llama / "base"), "--tasks", "x", "--local-cloze", "wikitext2-valid"])
        == 2
    )
    assert "pip install 'masa[eval]'" in capsys.readouterr().err
