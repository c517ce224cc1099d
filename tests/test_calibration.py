"""Calibration statistics: Grams equal X^T X of a plain forward, shared inputs, logit lens, cache, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tiny_models import FAMILIES, build

from masa.arch import find_blocks, get_adapter, unfuse
from masa.compress.api import calibration_tokens, resolve_targets
from masa.compress.calibration import (
    cached_calibrate,
    calibrate,
    calibration_cache_key,
    collect,
    load_stats,
    save_stats,
)
from masa.compress.calibration.gram_files import GramFiles, same_input, write_gram
from masa.compress.config import CompressConfig
from masa.compress.whitening import cholesky_factor, damped_cholesky, whiten, whitened_error, whitened_lowrank
from masa.data.tokenizer import load_tokenizer


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(3))  # (N, T)


def _targets(model: torch.nn.Module) -> list[str]:
    return resolve_targets(model, CompressConfig("svd", 0.5, targets="all-linear"))


def _direct_inputs(model: torch.nn.Module, names: list[str], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs (rows, d_in) of each named module in one ordinary forward over the whole batch."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_grams_equal_full_forward(family, tokens):
    model = build(family, n_layer=2)
    names = _targets(model)
    stats = calibrate(model, tokens, names, batch_size=2)  # 3 batches of 2, 2, 1 sequences
    direct = _direct_inputs(model, names, tokens)
    assert stats.n_rows == tokens.numel() and stats.streamed
    for name in names:
        x = direct[name]  # (N*T, d_in)
        exact = x.T @ x  # float64 over all rows; calibration sums float32 per-batch products in float64
        torch.testing.assert_close(stats.grams[name], exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
        torch.testing.assert_close(stats.abs_mean[name], x.abs().mean(0), rtol=1e-6, atol=1e-9)
        assert stats.grams[name].dtype == torch.float64


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_modules_fed_one_input_share_one_gram(family, tokens):
    model = build(family, n_layer=2)
    stats = calibrate(model, tokens, _targets(model))
    path, blocks = find_blocks(model)
    roles = get_adapter(model).roles
    for i in range(len(blocks)):
        gram = {role: stats.grams[f"{path}.{i}.{p}"] for role, p in roles.items()}
        assert gram["q"] is gram["k"] is gram["v"]
        assert gram["o"] is not gram["q"] and gram["down"] is not gram["up"]
        if "gate" in gram:
            assert gram["gate"] is gram["up"]
    assert len({id(g) for g in stats.grams.values()}) == len(blocks) * 4  # qkv, o, (gate+)up, down


def test_grams_written_to_scratch_files_block_by_block(tokens, tmp_path, monkeypatch):
    """With a scratch directory each block's Grams go to files as the block finishes (none held in memory
    afterwards) and read back equal; names fed one input still share one Gram."""
    model = build("llama", n_layer=3)
    names = _targets(model)
    held = calibrate(model, tokens, names)
    written = []
    monkeypatch.setattr(
        collect, "write_gram", lambda path, gram: written.append(path) or write_gram(path, gram)
    )
    stats = calibrate(model, tokens, names, scratch=tmp_path)
    assert (
        isinstance(stats.grams, GramFiles) and len(written) == 3 * 4 and set(stats.grams) == set(held.grams)
    )
    for name in names:
        assert torch.equal(stats.grams[name], held.grams[name])
        assert sorted(same_input(stats.grams, name)) == sorted(same_input(held.grams, name))
    path, _ = find_blocks(model)
    q, k = stats.grams[f"{path}.0.self_attn.q_proj"], stats.grams[f"{path}.0.self_attn.k_proj"]
    assert q is k  # one tensor while it is held, as in memory
    del stats.grams[f"{path}.0.self_attn.q_proj"]
    assert f"{path}.0.self_attn.q_proj" not in stats.grams and len(stats.grams) == len(names) - 1


def test_logit_lens_kl_matches_hidden_states(tokens):
    model = build("llama", n_layer=3)
    stats = calibrate(model, tokens, _targets(model))
    with torch.no_grad():
        hidden = model(
            tokens, output_hidden_states=True
        ).hidden_states  # embeddings, block 0, 1 outputs, final
        logp = [torch.log_softmax(model.lm_head(model.model.norm(h)).double(), -1) for h in hidden[1:3]]
    expected = torch.nn.functional.kl_div(logp[1], logp[0], log_target=True, reduction="batchmean")
    expected = float(expected) / tokens.shape[1]  # batchmean divides by N; average over all N*T tokens
    assert len(stats.block_kl) == 2 and all(kl >= 0 for kl in stats.block_kl)
    assert stats.block_kl[0] == pytest.approx(expected, rel=1e-6)
    assert calibrate(build("bert", 2), tokens, _targets(build("bert", 2))).block_kl is None


def test_logit_lens_scores_evenly_spaced_tokens_of_a_large_batch(tokens, monkeypatch):
    """Beyond LENS_TOKENS calibration tokens the drift is the mean KL over every k-th token (the head
    costs tokens x vocab; at a 128k vocabulary it would outweigh the blocks)."""
    from masa.compress.calibration import collect

    model = build("llama", n_layer=3)
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        logp = [torch.log_softmax(model.lm_head(model.model.norm(h)).double(), -1) for h in hidden[1:3]]
    per_token = (logp[0].exp() * (logp[0] - logp[1])).sum(-1).reshape(-1)  # (N*T,) KL per token
    monkeypatch.setattr(collect, "LENS_TOKENS", tokens.numel() // 4)  # every 4th token of each batch
    stats = calibrate(model, tokens, _targets(model))
    assert stats.block_kl[0] == pytest.approx(float(per_token[::4].mean()), rel=1e-6)
    assert stats.block_kl[0] != pytest.approx(float(per_token.mean()), rel=1e-6)


def test_fewer_rows_than_inputs_warn_of_a_rank_deficient_gram(saved_llama):
    import masa
    from masa.compress import compress

    model = masa.load(saved_llama / "base")  # d = 32: 2 x 8 = 16 rows < 32 inputs
    config = CompressConfig("svd-llm", 0.3, calib_samples=2, calib_len=8)
    with pytest.warns(UserWarning, match=r"saw 16 rows, fewer than the 32 inputs of .*q_proj.*rank-defic"):
        compress(model, config, str(saved_llama / "calib.txt"), load_tokenizer(saved_llama / "base"))


def test_binary_calibration_text_is_refused_by_name(saved_llama):
    binary = saved_llama / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"weights.bin is not UTF-8 text \(byte 0x80 at offset 128\)"):
        calibration_tokens(str(binary), None, 2, 8)


def test_summary_reports_shape_and_memory(tokens):
    model = build("opt", n_layer=2)
    summary = calibrate(model, tokens, _targets(model)).summary()
    assert (summary["samples"], summary["seq_len"], summary["rows"]) == (5, 12, 60)
    assert summary["peak_memory_mb"] >= 0 and summary["seconds"] > 0


def test_stats_round_trip_and_cache(tokens, tmp_path):
    model = build("gpt2", n_layer=2)
    names = _targets(model)
    stats, reused = cached_calibrate(model, tokens, names, tmp_path)
    assert not reused and len(list(tmp_path.glob("*.safetensors"))) == 1
    again, reused = cached_calibrate(model, tokens, names, tmp_path)
    assert reused and again.block_kl == pytest.approx(stats.block_kl) and again.n_rows == stats.n_rows
    for name in names:
        assert torch.equal(again.grams[name], stats.grams[name])
    q, k = names[0], names[1]  # block 0 q_proj and k_proj: one tensor, also after reloading
    assert again.grams[q] is again.grams[k]
    key = calibration_cache_key(model, tokens, names)
    assert key != calibration_cache_key(model, tokens[:, :-1], names)
    assert key != calibration_cache_key(model, tokens, names[:-1])
    assert key != calibration_cache_key(model, tokens, names, mode="sequential")
    assert key != calibration_cache_key(model, tokens, names, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert key != calibration_cache_key(model, tokens, names)
    assert load_stats(save_stats(stats, tmp_path / "s.safetensors")).grams.keys() == stats.grams.keys()


def test_unsupported_architecture_calibrates_with_whole_forward(tokens):
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
    names = ["transformer.h.0.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h"]
    stats = calibrate(model, tokens, names)
    x = _direct_inputs(model, names, tokens)[names[1]]
    assert not stats.streamed and stats.block_kl is None
    torch.testing.assert_close(stats.grams[names[1]], x.T @ x)


def test_calibration_text_errors(tokens):
    stream = torch.arange(50)
    assert calibration_tokens(stream, None, 4, 12).shape == (4, 12)
    with pytest.raises(ValueError, match="has 50 tokens but 4 samples x 16 tokens = 64 are needed"):
        calibration_tokens(stream, None, 4, 16)
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(build("llama", 1), torch.zeros(0, 4, dtype=torch.long), ["model.layers.0.self_attn.q_proj"])


def test_empty_calibration_file_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        calibration_tokens(str(tmp_path / "empty.txt"), object(), 4, 16)


def test_cholesky_damps_singular_gram_and_refuses_non_gram():
    x = torch.randn(3, 8, dtype=torch.float64)  # 3 rows, 8 features: rank-3 Gram
    chol = cholesky_factor(x.T @ x)
    assert torch.allclose(chol @ chol.T, x.T @ x, atol=1e-4)
    with pytest.raises(ValueError, match="not positive definite"):
        cholesky_factor(-torch.eye(4))
    with pytest.raises(ValueError, match="zero or not finite"):
        cholesky_factor(torch.zeros(4, 4))


def test_damping_is_reported_so_the_gram_can_be_recovered():
    x = torch.randn(3, 8, dtype=torch.float64)  # rank-deficient: needs damping
    chol, damping = damped_cholesky(x.T @ x)
    assert damping > 0 and torch.equal(chol, cholesky_factor(x.T @ x))
    torch.testing.assert_close(chol @ chol.T - damping * torch.eye(8, dtype=torch.float64), x.T @ x)


@pytest.mark.parametrize("shape, d", [((5, 11), 11), ((2, 3, 9), 9), ((4, 3), 3), ((7, 1), 1)])
def test_triangular_product_equals_the_dense_one(shape, d):
    """``whiten`` skips the zero blocks of a lower-triangular factor: the dense product, every shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    lower = torch.randn(d, d, generator=gen, dtype=torch.float64).tril()
    torch.testing.assert_close(whiten(x, lower), x @ lower, rtol=1e-12, atol=1e-12)


def test_whitened_lowrank_is_exact_at_full_rank_and_optimal():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 10, generator=gen), torch.randn(40, 10, generator=gen) * torch.linspace(0.1, 3, 10)
    gram = x.double().T @ x.double()
    up, down = whitened_lowrank(w, cholesky_factor(gram), 6)
    torch.testing.assert_close(up @ down, w.double())
    up, down = whitened_lowrank(w, cholesky_factor(gram), 2)
    plain_up, plain_down = whitened_lowrank(w, torch.eye(10, dtype=torch.float64), 2)
    assert whitened_error(w, up @ down, gram) < whitened_error(w, plain_up @ plain_down, gram)
    assert whitened_error(w, up @ down, gram) == pytest.approx(
        float(((w.double() - up @ down) @ x.double().T).pow(2).sum())
    )


def test_unfused_gpt2_targets_are_linears():
    model = build("gpt2", n_layer=1)
    names = _targets(model)
    assert "transformer.h.0.attn.c_attn.q_proj" in names and not unfuse(model)


def test_cache_key_follows_the_weights_not_their_size_or_mtime(tmp_path):
    """Two model directories with the same config, file size and modification time but other weights get
    different calibration cache keys (the key samples the files' content)."""
    import os

    from tiny_models import build

    import masa
    from masa.compress.calibration import calibration_cache_key

    for seed, name in ((0, "a"), (1, "b")):
        masa.save(build("llama", n_layer=2, seed=seed), tmp_path / name)
    for name in ("a", "b"):
        os.utime(tmp_path / name / "model.safetensors", ns=(10**18, 10**18))
    tokens = torch.zeros(2, 8, dtype=torch.long)
    names = ["model.layers.0.self_attn.q_proj"]
    a, b = (calibration_cache_key(tmp_path / n, tokens, names) for n in ("a", "b"))
    assert (tmp_path / "a" / "model.safetensors").stat().st_size == (
        tmp_path / "b" / "model.safetensors"
    ).stat().st_size
    assert a != b and a == calibration_cache_key(tmp_path / "a", tokens, names)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's high-water mark")
def test_peak_memory_sees_a_peak_between_samples():
    """Memory taken and given back between two samples (inside a fit) still counts: the kernel's VmHWM."""
    script = (
        "import torch\n"
        "from masa.compress.calibration.collect import PeakMemory\n"
        "meter = PeakMemory(torch.device('cpu'))\n"
        "big = torch.ones(2**25, dtype=torch.float64)  # 256 MiB, touched\n"
        "del big\n"
        "print(meter.bytes())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout.strip()) >= 200 * 2**20
