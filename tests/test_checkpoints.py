"""masa.load of checkpoints as they really come (shards, bf16, tied heads, legacy keys, renamed keys):
the same model transformers loads, strict refusals with clear messages, untruncated tokenizers."""

import json
import logging
import pickle
import warnings

import checkpoints
import pytest
import torch
import transformers
from safetensors import safe_open
from tiny_models import outputs

import masa
from masa.data.tokenizer import encode, encode_batch, load_tokenizer
from masa.io import inspect_checkpoint, read_weights

VARIANTS = ("llama", "sharded", "bf16", "tied", "gemma", "gpt_neox", "bert_position_ids", "gpt2_published")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every variant written once (read-only for the tests that share it)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: getattr(checkpoints, name)(root / name) for name in VARIANTS}


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, checkpoints.VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _keys(directory) -> set[str]:
    keys = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            keys |= set(fh.keys())
    return keys


def _reference(directory):
    """The model as transformers itself loads it."""
    config = json.loads((directory / "config.json").read_text())
    auto = transformers.AutoModel if config["model_type"] == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(str(directory)).eval()


def _load(directory):
    """masa.load, which warns only about GPT-2's stale ``masked_bias`` buffers (unknown to transformers 5)."""
    if "gpt2" in directory.name:
        with pytest.warns(UserWarning, match=r"dropped: \['h.0.attn.masked_bias', 'h.1.attn.masked_bias'\]"):
            return masa.load(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        return masa.load(directory)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loads_as_transformers_does(variant, written, ids):
    directory = written[variant]
    model, reference = _load(directory), _reference(directory)
    assert type(model) is type(reference)
    exact = next(reference.parameters()).dtype != torch.float32
    torch.testing.assert_close(
        outputs(model, ids), outputs(reference, ids), atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5
    )


def test_layouts_are_the_real_ones(written):
    """The fixtures do write what the real checkpoints hold (else the tests above prove little)."""
    assert len(list(written["sharded"].glob("model-*.safetensors"))) > 2
    assert (written["sharded"] / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in _keys(written["tied"])
    assert "embed_out.weight" in _keys(written["gpt_neox"])
    assert "embeddings.position_ids" in _keys(written["bert_position_ids"])
    gpt2 = _keys(written["gpt2_published"])
    assert {"h.0.attn.bias", "h.0.attn.masked_bias", "wte.weight"} <= gpt2
    assert not any(k.startswith("transformer.") or k.startswith("lm_head") for k in gpt2)


def test_tied_head_stays_tied(written):
    model = masa.load(written["tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_is_kept_or_converted(written):
    assert {p.dtype for p in masa.load(written["bf16"]).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in masa.load(written["llama"], dtype=torch.bfloat16).parameters()} == {
        torch.bfloat16
    }


def test_inspect_checkpoint(written, tmp_path):
    sharded = inspect_checkpoint(written["sharded"])
    assert len(sharded.weight_files) > 2 and sharded.index is not None
    assert sharded.dtype == torch.float32 and not sharded.is_masa
    assert inspect_checkpoint(written["bf16"]).dtype == torch.bfloat16
    assert set(read_weights(written["sharded"])) == _keys(written["sharded"])
    masa.save(masa.load(written["llama"]), tmp_path / "m")
    assert inspect_checkpoint(tmp_path / "m").is_masa


@pytest.mark.parametrize(
    "variant", ["tied", "bf16", "gemma", "gpt_neox", "bert_position_ids", "gpt2_published"]
)
def test_masa_round_trip_of_loaded_checkpoint(variant, written, ids, tmp_path):
    """masa.save of a loaded checkpoint is read back through masa's strict path, identical."""
    model = _load(written[variant])
    masa.save(model, tmp_path / "m", files_from=written[variant])
    loaded = masa.load(tmp_path / "m")
    assert type(loaded) is type(model)
    torch.testing.assert_close(outputs(loaded, ids), outputs(model, ids), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------- refusals


def test_file_instead_of_directory(written):
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file, not a model directory"):
        masa.load(written["llama"] / "model.safetensors")


@pytest.mark.parametrize(
    ("variant", "cls"), [("llama", "LlamaForCausalLM"), ("bert_position_ids", "BertModel")]
)
def test_pickle_only_directory_is_refused_without_unpickling(variant, cls, tmp_path, monkeypatch):
    directory = getattr(checkpoints, variant)(tmp_path / "m")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*never loaded") as err:
        masa.load(directory)
    assert f'python -c "from transformers import {cls}; {cls}.from_pretrained(' in str(err.value)
    assert f"save_pretrained('{tmp_path / 'm-safetensors'}')" in str(err.value)


def test_missing_shard_is_named(tmp_path):
    directory = checkpoints.sharded(tmp_path / "m")
    (directory / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00002-of-00006.safetensors listed in"):
        masa.load(directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the directory"):
        masa.load(directory)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
def test_missing_weight_is_named(key, tmp_path):
    directory = checkpoints.with_file_edit(
        checkpoints.llama(tmp_path / "m"), lambda t: {k: v for k, v in t.items() if k != key}
    )
    with pytest.raises(ValueError, match=rf"missing weights \['{key}'\].*random values"):
        masa.load(directory)


def test_misshaped_weight_is_named(tmp_path):
    directory = checkpoints.with_file_edit(
        checkpoints.llama(tmp_path / "m"), lambda t: {**t, "model.norm.weight": torch.ones(7)}
    )
    with pytest.raises(
        ValueError, match=r"mis-shaped weights \['model.norm.weight: file \(7,\) vs model \(32,\)"
    ):
        masa.load(directory)


def test_unknown_extra_tensor_is_dropped_with_a_warning(tmp_path, ids):
    directory = checkpoints.llama(tmp_path / "m")
    reference = outputs(masa.load(directory), ids)
    checkpoints.with_file_edit(directory, lambda t: {**t, "score.weight": torch.ones(2, 32)})
    with pytest.warns(
        UserWarning, match=r"not part of LlamaForCausalLM and were dropped: \['score.weight'\]"
    ):
        model = masa.load(directory)
    torch.testing.assert_close(outputs(model, ids), reference, atol=0, rtol=0)


def test_non_finite_weight_is_refused(tmp_path):
    def poison(tensors):
        tensors["model.norm.weight"][3] = float("inf")
        return tensors

    directory = checkpoints.with_file_edit(checkpoints.llama(tmp_path / "m"), poison)
    with pytest.raises(ValueError, match="model.norm.weight.*NaN or inf"):
        masa.load(directory)


def test_quantized_config_is_refused(tmp_path):
    directory = checkpoints.with_config(
        checkpoints.llama(tmp_path / "m"), quantization_config={"quant_method": "gptq", "bits": 4}
    )
    with pytest.raises(ValueError, match="quantized checkpoint \\(gptq\\).*not load quantized weights yet"):
        masa.load(directory)


@pytest.mark.parametrize("key", ["num_experts", "num_local_experts", "n_routed_experts"])
def test_mixture_of_experts_is_refused(key, tmp_path):
    directory = checkpoints.with_config(checkpoints.llama(tmp_path / "m"), **{key: 8})
    with pytest.raises(ValueError, match=f"mixture-of-experts model \\({key}=8\\).*not support"):
        masa.load(directory)
    checkpoints.with_config(directory, **{key: 0})  # a dense model that names the field
    masa.load(directory)


def _masa_dir(tmp_path):
    model = masa.load(checkpoints.llama(tmp_path / "hf"))
    masa.share(model, atoms=1)
    return masa.save(model, tmp_path / "m")


def _edit_block(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config["masa"].update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def test_newer_format_names_the_writing_version(tmp_path):
    directory = _masa_dir(tmp_path)
    _edit_block(directory, format_version=99, version="9.9.9")
    with pytest.raises(ValueError, match="written by masa 9.9.9 in format 99.*upgrade masa"):
        masa.load(directory)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "holds a JSON list, not an object"),
        ('{"model_type": "llama", "masa": 3}', "masa block's value is a JSON int, not an object"),
        ('{"model_type": "llama", "masa": {"surgery": "share"}}', "surgery is a JSON str, not a list"),
        ('{"model_type": "llama", "masa": {"surgery": [{"op": 3}]}}', r"surgery\[0\] is .*not an operation"),
        ('{"model_type": "llama", "masa": {"format_version": "1"}}', "format_version is '1', not an integer"),
        ('{"model_type": "llama", "architectures": "LlamaForCausalLM"}', "not a list of class names"),
    ],
)
def test_corrupt_config_is_one_sentence(text, match, tmp_path):
    directory = checkpoints.llama(tmp_path / "m")
    (directory / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        masa.load(directory)


def test_malformed_surgery_operation(tmp_path):
    directory = _masa_dir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["masa"]["surgery"] = [{"op": "share"}]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"masa.surgery\[0\] \(share\) is malformed"):
        masa.load(directory)


# ---------------------------------------------------------------------------------------- tokenizers

LONG = "the quick brown fox jumps over the lazy dog. " * 50


def test_tokenizer_json_truncation_and_padding_are_ignored(tmp_path):
    directory = checkpoints.truncating_tokenizer(tmp_path / "tok", max_length=16)
    tok = load_tokenizer(directory)
    assert len(encode(tok, LONG)) == len(LONG)
    assert [len(ids) for ids in encode_batch(tok, [LONG, "ab"])] == [len(LONG), 2]


def test_transformers_tokenizer_does_not_truncate_or_warn(tmp_path, caplog):
    from tokenizers import Tokenizer

    directory = checkpoints.truncating_tokenizer(tmp_path / "tok", max_length=16)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(directory / "tokenizer.json")), model_max_length=16
    )
    with caplog.at_level(logging.WARNING):
        assert len(encode(tok, LONG)) == len(LONG)
    assert "longer than the specified maximum" not in caplog.text


def test_remote_code_tokenizer_is_refused(tmp_path):
    directory = checkpoints.truncating_tokenizer(tmp_path / "tok")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}})
    )
    with pytest.raises(ValueError, match="own tokenizer code.*never runs remote code"):
        load_tokenizer(directory)


def test_remote_code_model_is_refused(tmp_path):
    directory = checkpoints.with_config(
        checkpoints.llama(tmp_path / "m"),
        model_type="my_custom_lm",
        architectures=["MyCustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"},
    )
    with pytest.raises(ValueError, match="as AutoModel \\(it needs its own code.*never runs remote code"):
        masa.load(directory)


RELOAD = """
import sys, torch
import masa
from safetensors.torch import load_file, save_file
ids = load_file(sys.argv[1])["ids"]
with torch.no_grad():
    for directory in sys.argv[2:]:
        model = masa.load(directory)
        out = model(ids)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        save_file({"out": out.float().contiguous()}, directory + ".out.safetensors")
"""


def test_cli_compresses_every_variant_and_a_fresh_process_reloads_it(written, ids, tmp_path, capsys):
    """``masa compress`` on each loader variant with a tokenizer that truncates at 16 tokens: calibration
    sees the whole text, the dtype is kept, and a fresh process after a plain ``import masa`` reloads
    every output to the in-process model's outputs."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from masa.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 40)  # 1,800 characters
    outs = []
    for variant in VARIANTS:
        source = tmp_path / variant
        shutil.copytree(written[variant], source)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt"):
            (source / name).unlink(missing_ok=True)
        checkpoints.truncating_tokenizer(source)
        out = tmp_path / f"{variant}-svd-llm"
        argv = ["compress", str(source), "--method", "svd-llm", "--ratio", "0.2", "--targets", "all-linear",
                "--calib", str(calib), "--calib-samples", "4", "--calib-len", "64", "--out", str(out),
                "--no-cache", "--json", "-"]  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # GPT-2's stale masked_bias buffers
            assert main(argv) == 0, capsys.readouterr().err
        report = json.loads(capsys.readouterr().out)
        assert report["calibration"]["rows"] == 4 * 64  # 256 tokens although the tokenizer truncates at 16
        assert abs(report["ratio_reached"] - 0.2) <= 0.01
        dtype = next(_reference(written[variant]).parameters()).dtype
        assert next(masa.load(out).parameters()).dtype == dtype
        outs.append(out)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "ids.safetensors"), *map(str, outs)],
        check=True,
        timeout=300,
    )
    for out in outs:
        model = masa.load(out)
        with torch.no_grad():
            expected = outputs(model, ids).float()
        torch.testing.assert_close(load_file(f"{out}.out.safetensors")["out"], expected, atol=0, rtol=0)
