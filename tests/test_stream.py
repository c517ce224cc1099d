"""Streamed compression (masa.io.stream, masa.compress.streaming), calibration modes, --device/--dtype."""

from __future__ import annotations

import json
import warnings

import checkpoints
import pytest
import torch

import masa
from masa import cli
from masa.compress import CompressConfig, compress
from masa.compress.streaming import compress_checkpoint
from masa.io.stream import StreamedModel

IDS = torch.arange(12)[None]  # (1, T)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(3))  # (N, T)


def _out(model: torch.nn.Module) -> torch.Tensor:
    out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("writer", ["sharded", "bf16", "tied", "gpt_neox", "gpt2_published"])
def test_streamed_model_reads_what_load_reads(writer, tmp_path):
    directory = getattr(checkpoints, writer)(tmp_path / writer)  # gpt_neox: file key embed_out -> lm_head
    streamed = StreamedModel(directory)
    assert all(p.device.type == "meta" for p in streamed.model.parameters())
    streamed.load("")
    reference = masa.load(directory)
    assert streamed.dtype == next(reference.parameters()).dtype
    assert torch.equal(_out(streamed.model), _out(reference))
    streamed.release("")
    assert all(p.device.type == "meta" for p in streamed.model.parameters())


@pytest.mark.parametrize(
    "writer, method, targets, mode",
    [
        ("sharded", "svd-llm", "all-linear", "sequential"),
        ("bf16", "asvd", "attn", "sequential"),  # per-layer methods stream block by block in either mode
        ("tied", "masa", "attn", None),  # a statistics pass, then all blocks fitted together
        ("sharded", "masa", "all-linear", None),  # the Grams and factors in scratch files
        ("bf16", "basis-sharing", "attn", None),
        ("sharded", "cospadi", "attn", None),
    ],
)
def test_streamed_compression_equals_in_memory(writer, method, targets, mode, tokens, tmp_path):
    directory = getattr(checkpoints, writer)(tmp_path / "in")
    config = CompressConfig(method, 0.3, (targets,))
    model = masa.load(directory)
    in_memory = compress(model, config, tokens, mode=mode)
    streamed = compress_checkpoint(directory, config, tmp_path / "out", tokens, mode=mode)
    assert streamed.ratio_reached == in_memory.ratio_reached and streamed.report == in_memory.report
    assert streamed.memory["streamed"] and streamed.memory["peak_host_mb"] >= 0
    saved = masa.load(tmp_path / "out")
    assert torch.equal(_out(saved), _out(model))
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert next(saved.parameters()).dtype == next(model.parameters()).dtype  # weights keep their dtype


def test_modes_differ_and_default_is_documented(tokens):
    from tiny_models import build

    from masa.compress.blockwise import DEFAULT_MODE

    outputs = {}
    for mode in ("original", "sequential"):
        model = build("llama", n_layer=3)
        result = compress(model, CompressConfig("svd-llm", 0.5, ("all-linear",)), tokens, mode=mode)
        assert result.calibration["mode"] == mode and not result.calibration["reused"]
        outputs[mode] = _out(model)
    assert not torch.equal(outputs["original"], outputs["sequential"])  # block 1+ saw compressed inputs
    model = build("llama", n_layer=2)
    assert compress(model, CompressConfig("svd-llm", 0.3), tokens).calibration["mode"] == DEFAULT_MODE


def test_mode_errors(tokens, tmp_path):
    from tiny_models import build

    model = build("llama", n_layer=2)
    with pytest.raises(ValueError, match="sequential calibration fits block by block"):
        compress(model, CompressConfig("masa", 0.3), tokens, mode="sequential")
    with pytest.raises(ValueError, match="not one of original, sequential"):
        compress(model, CompressConfig("svd-llm", 0.3), tokens, mode="greedy")
    stats = masa.compress.calibrate(model, tokens, [f"model.layers.{i}.self_attn.q_proj" for i in range(2)])
    with pytest.raises(ValueError, match="precomputed statistics cannot be used"):
        compress(model, CompressConfig("svd-llm", 0.3, ("q_proj",)), tokens, stats=stats, mode="sequential")


def test_streaming_refusals(tokens, tmp_path):
    llama = checkpoints.llama(tmp_path / "llama")
    with pytest.raises(ValueError, match="gradients through the whole model"):
        compress_checkpoint(llama, CompressConfig("fwsvd", 0.3), tmp_path / "a", tokens)
    with pytest.raises(ValueError, match="exceed the model's"):
        compress_checkpoint(
            llama, CompressConfig("svd-llm", 0.3), tmp_path / "c", torch.zeros(1, 5000).long()
        )
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging shards left


def test_gram_float32_batches_summed_in_float64_are_accurate():
    """The calibration arithmetic (fp32 per batch, fp64 sum) against full fp64, at a realistic scale."""
    from masa.compress.calibration.collect import Accumulator, PeakMemory

    x = torch.randn(8, 512, 256, generator=torch.Generator().manual_seed(0)) * 3  # 8 batches of 512 rows
    linear = torch.nn.Linear(256, 4)
    accumulator = Accumulator(PeakMemory(torch.device("cpu")))
    with accumulator.hooks({"m": linear}):
        for batch in x:
            accumulator.new_forward()
            linear(batch)
    rows = x.reshape(-1, 256).double()
    exact = rows.T @ rows
    error = float((accumulator.grams["m"] - exact).norm() / exact.norm())
    assert error < 1e-6  # measured about 1e-7: docs/results/scale/README.md


def test_compress_cli_device_dtype_and_bad_paths(saved_llama, capsys):
    root = saved_llama
    base = ["compress", str(root / "base"), "--method", "svd-llm", "--ratio", "0.4", "--calib", str(root / "calib.txt"),
            "--calib-samples", "4", "--calib-len", "16", "--no-cache"]  # fmt: skip
    assert cli.main([*base, "--out", str(root / "base"), "--overwrite"]) == 2
    assert (
        "is the input model directory" in capsys.readouterr().err and (root / "base" / "config.json").exists()
    )
    assert cli.main([*base, "--out", str(root)]) == 2  # holds the input
    assert (
        cli.main([*base, "--out", str(root / "o"), "--device", "cuda"]) == 2
    )  # no GPU in this torch/machine
    assert "cuda" in capsys.readouterr().err
    assert cli.main([*base[:-3], "--calib-len", "100000", "--no-cache", "--out", str(root / "o")]) == 2
    assert "positions" in capsys.readouterr().err
    args = [
        *base,
        "--out",
        str(root / "lm"),
        "--low-memory",
        "--dtype",
        "bfloat16",
        "--calib-mode",
        "original",
    ]
    assert cli.main([*args, "--json", str(root / "r.json")]) == 0
    assert "streamed: peak memory host" in capsys.readouterr().out
    report = json.loads((root / "r.json").read_text())
    assert report["memory"]["streamed"] and report["calibration"]["mode"] == "original"
    assert next(masa.load(root / "lm").parameters()).dtype == torch.bfloat16


def test_streamed_eval_equals_in_memory(tmp_path):
    from masa.eval.perplexity import perplexity
    from masa.eval.streamed import StreamedCausalLM

    directory = checkpoints.sharded(tmp_path / "m")
    ids = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    expected = perplexity(masa.load(directory), ids, seq_len=32, progress=False)
    assert perplexity(StreamedCausalLM(directory), ids, seq_len=32, progress=False) == expected


@pytest.mark.parametrize("family", ["gpt2_published", "gpt_neox", "phi3"])
def test_streamed_fused_families_equal_in_memory(family, tokens, tmp_path):
    """Fused projections (GPT-2 c_attn, GPT-NeoX query_key_value, Phi-3 qkv_proj / gate_up_proj) are split
    block by block as they are read, exactly as ``unfuse`` splits them in memory."""
    if family == "phi3":
        from tiny_models import build

        directory = checkpoints._saved(build("phi3", n_layer=2), tmp_path / "in")
    else:
        directory = getattr(checkpoints, family)(tmp_path / "in")
    config = CompressConfig("svd-llm", 0.3, ("all-linear",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published GPT-2's legacy attention buffers
        model = masa.load(directory)
        in_memory = compress(model, config, tokens, mode="sequential")
        streamed = compress_checkpoint(directory, config, tmp_path / "out", tokens, mode="sequential")
    assert streamed.report == in_memory.report and streamed.ratio_reached == in_memory.ratio_reached
    assert torch.equal(_out(masa.load(tmp_path / "out")), _out(model))
