"""masa.save / masa.load: exact round trips, unique keys, honest sizes, clear errors, atomic saves."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import FAMILIES, build, outputs

import masa
from masa.io import serialization


def _data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (file size minus its JSON header)."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header_len


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, ids, tmp_path):
    model = build(family)
    masa.share(model, atoms=2)
    reference = outputs(model, ids)
    masa.save(model, tmp_path / "m")
    loaded = masa.load(tmp_path / "m")
    torch.testing.assert_close(outputs(loaded, ids), reference, atol=0, rtol=0)
    counted = masa.count(model)
    assert _data_bytes(tmp_path / "m" / "model.safetensors") == counted.total * 4
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["masa"]["surgery"][-1]["op"] == "share"
    assert config["masa"]["params"]["attention_params"] == counted.attention
    assert masa.count(loaded).as_dict() == counted.as_dict()


def test_atom_banks_are_stored_once(tmp_path):
    model = build("llama", n_layer=6)
    masa.share(model, atoms=2)
    masa.save(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert sum(k.endswith(".atoms") for k in keys) == 4
    assert not any("q_proj.weight" in k for k in keys)


def test_plain_model_and_tokenizer_files(tmp_path, ids):
    from tokenizers import Tokenizer, models

    model = build("gpt2")
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    masa.save(model, tmp_path / "m", tokenizer=tok)
    assert (tmp_path / "m" / "tokenizer.json").exists()
    torch.testing.assert_close(outputs(masa.load(tmp_path / "m"), ids), outputs(model, ids))
    masa.save(model, tmp_path / "copy", files_from=tmp_path / "m")
    assert (tmp_path / "copy" / "tokenizer.json").exists()


def test_existing_directory_needs_overwrite(tmp_path):
    model = build("llama")
    masa.save(model, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        masa.save(model, tmp_path / "m")
    masa.share(model, atoms=1)
    masa.save(model, tmp_path / "m", overwrite=True)
    assert masa.count(masa.load(tmp_path / "m")).attention == masa.count(model).attention


def test_interrupted_save_keeps_previous_model(tmp_path, monkeypatch, ids):
    model = build("llama")
    masa.save(model, tmp_path / "m")
    before = sorted(p.name for p in tmp_path.iterdir())

    def broken(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(serialization, "write_json", broken)
    masa.share(model, atoms=1)
    with pytest.raises(KeyboardInterrupt):
        masa.save(model, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp left, old one intact
    monkeypatch.undo()
    torch.testing.assert_close(outputs(masa.load(tmp_path / "m"), ids), outputs(build("llama"), ids))


def _saved(tmp_path):
    model = build("llama")
    masa.share(model, atoms=2)
    masa.save(model, tmp_path / "m")
    return tmp_path / "m"


def test_missing_extra_and_misshaped_keys_are_named(tmp_path):
    path = _saved(tmp_path)
    weights = serialization.read_weights(path)
    del weights["masa_bank.dictionaries.q_g0.atoms"]
    weights["stray.weight"] = torch.zeros(2)
    weights["model.norm.weight"] = torch.zeros(7)
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['masa_bank.*unexpected keys \['stray.*mis-shaped"):
        masa.load(path)


def test_non_finite_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    weights = serialization.read_weights(path)
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight.*NaN or inf"):
        masa.load(path)


def test_corrupt_and_absent_files(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        masa.load(path)
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle files are never loaded"):
        masa.load(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        masa.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        masa.load(tmp_path / "nowhere")


COMPANIONS = [
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENCE.md",
    "README.md",
    "NOTICE",
    "USE_POLICY.md",
]


def test_save_copies_companion_files_from_the_source(tmp_path, ids):
    from tokenizers import Tokenizer, models

    source = tmp_path / "source"
    source.mkdir()
    for name in [*COMPANIONS, "tokenizer.json", "tokenizer_config.json", "notes.txt", "model.safetensors"]:
        (source / name).write_text(f"source {name}")
    model = build("llama")
    expected = sorted(
        [*COMPANIONS, "tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"]
    )
    masa.save(model, tmp_path / "a", files_from=source)
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == expected
    assert (out / "LICENSE").read_text() == "source LICENSE"
    torch.testing.assert_close(outputs(masa.load(out), ids), outputs(model, ids), atol=0, rtol=0)
    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    masa.save(model, tmp_path / "c", tokenizer=tok, files_from=source)  # the given tokenizer wins
    assert not (tmp_path / "c" / "tokenizer_config.json").exists()
    assert Tokenizer.from_file(str(tmp_path / "c" / "tokenizer.json")).get_vocab() == tok.get_vocab()
    assert (tmp_path / "c" / "chat_template.jinja").exists()
