"""``masa info``: counts read from config.json and the safetensors headers agree with ``masa.count``;
damaged directories are refused with a clear error."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from tiny_models import build

import masa
from masa.cli import main
from masa.commands.info import describe
from masa.compress import CompressConfig, compress
from masa.model import MasaLM, MasaLMConfig

COUNTED = ("attention_params", "attention_params_dense", "total_params", "total_params_dense", "by_role")


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))  # (N, T)


def _compressed(family: str, method: str, tokens: torch.Tensor, dtype: torch.dtype | None) -> torch.nn.Module:
    model = build(family, n_layer=2)
    options = {"iterations": 8, "group_size": 2} if method == "cospadi" else {}
    targets = "all-linear" if method == "svd" else "attn"
    compress(model, CompressConfig(method, 0.4, targets=targets, options=options), tokens)
    return model.to(dtype) if dtype else model


def _assert_agrees_with_count(directory: Path) -> dict:
    info = describe(directory)
    counted = masa.count(masa.load(directory)).as_dict()
    assert {k: info[k] for k in COUNTED} == {k: counted[k] for k in COUNTED}
    assert info["weights"]["stored_numbers"] == counted["total_params"]
    return info


@pytest.mark.parametrize(
    ("family", "method", "dtype"),
    [
        ("llama", "svd", None),
        ("llama", "basis-sharing", None),
        ("gpt2", "cospadi", None),  # uint8 code indices, tied embeddings
        ("opt", "cospadi", torch.bfloat16),  # indices counted in numbers of bf16 width
        ("llama", "masa", None),
    ],
)
def test_compressed_counts_equal_count_of_the_loaded_model(family, method, dtype, tokens, tmp_path):
    masa.save(_compressed(family, method, tokens, dtype), tmp_path / "out")
    info = _assert_agrees_with_count(tmp_path / "out")
    assert info["counted_from"] == "masa block" and info["family"] == family
    assert (info["weights"]["code_index_numbers"] > 0) == (method == "cospadi")
    assert ("BF16" in info["weights"]["bytes_by_dtype"]) == (dtype == torch.bfloat16)


def test_shared_and_native_models_agree_with_count(tmp_path):
    model = build("gpt2", n_layer=4)
    masa.share(model, atoms=2)
    masa.save(model, tmp_path / "shared")
    assert len(_assert_agrees_with_count(tmp_path / "shared")["dictionaries"]) == 4
    config = MasaLMConfig(
        vocab_size=64, n_layer=6, n_head=4, d_model=32, max_seq_len=32, attention="masa-qkvo", n_atoms=2,
        tie_embeddings=True,
    )  # fmt: skip
    masa.save(MasaLM(config), tmp_path / "native")
    info = _assert_agrees_with_count(tmp_path / "native")
    assert info["weights"]["aliases"] == 1 and info["family"] == "masa_lm"


def test_sharded_hugging_face_checkpoint(tmp_path, capsys):
    model = build("llama", n_layer=2)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert main(["info", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    counted = masa.count(model)
    assert len(info["weights"]["files"]) > 1 and info["counted_from"] == "tensor names"
    assert (info["family"], info["n_layer"]) == ("llama", 2)
    assert (info["total_params"], info["attention_params"]) == (counted.total, counted.attention)
    assert info["mlp_params"] == sum(counted.by_role[r][0] for r in ("gate", "up", "down"))
    assert info["weights"]["bytes_by_dtype"] == {"F32": counted.total * 4}

    shard = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    (tmp_path / "hf" / next(iter(shard.values()))).unlink()
    assert main(["info", str(tmp_path / "hf")]) == 2
    assert "lists shards that are missing" in capsys.readouterr().err


def test_unknown_family_still_reports_totals(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    _write_safetensors(tmp_path / "m" / "model.safetensors", {"a.weight": ("F16", [3, 5]), "b": ("I64", [4])})
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "family unknown" in out and "attention    unknown" in out and "total        15 params" in out
    assert "F16 30 bytes, I64 32 bytes" in out


# ------------------------------------------------------------------------------------------ damage


@pytest.fixture
def saved(saved_llama) -> Path:
    return saved_llama / "base"


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file of zeros (dtype and shape per key), written without torch."""
    width = {"F16": 2, "F32": 4, "I64": 8, "U8": 1}
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        size = width[dtype] * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def _rewrite_header(path: Path, edit) -> None:
    """Replace the JSON header of a safetensors file by ``edit(header)``, keeping the data."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.dumps(edit(json.loads(data[8 : 8 + n]))).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _fails(directory: Path, capsys, message: str) -> None:
    capsys.readouterr()  # drop earlier output (save_pretrained's progress bars)
    assert main(["info", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("masa info: error:") and message in err, err


def test_a_file_or_a_directory_without_config_is_refused(saved, capsys):
    _fails(saved / "config.json", capsys, "is a file, not a model directory")
    (saved / "config.json").unlink()
    _fails(saved, capsys, "has no config.json")


def test_empty_truncated_and_non_json_weights_are_refused(saved, capsys):
    weights = saved / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1])
    _fails(saved, capsys, "is truncated")
    weights.write_bytes(good + b"\0")
    _fails(saved, capsys, "has trailing bytes")
    weights.write_bytes(b"")
    _fails(saved, capsys, "is empty (0 bytes)")
    weights.write_bytes(struct.pack("<Q", 5) + b"{oops" + good[8:])
    _fails(saved, capsys, "the header is not JSON")
    weights.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    _fails(saved, capsys, "exceeds the file")


def test_mis_shaped_weights_are_refused(saved_llama, saved, tokens, capsys):
    weights = saved / "model.safetensors"
    key = "model.layers.0.self_attn.q_proj.weight"

    def reshape(header: dict) -> dict:
        header[key]["shape"] = [16, 32]  # half the bytes its data_offsets span
        return header

    _rewrite_header(weights, reshape)
    _fails(saved, capsys, f"tensor {key!r} is mis-shaped")

    masa.save(_compressed("llama", "svd", tokens, None), saved_llama / "small")
    shutil.copy(saved_llama / "small" / "model.safetensors", weights)  # weights of another model
    _fails(saved, capsys, "the weights store")


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path, capsys):
    build("llama", n_layer=2).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    _fails(tmp_path / "hf", capsys, "names the wrong shard for 1 tensor(s)")
