"""Perplexity protocols, fidelity, eval texts and the `masa eval` command on tiny models."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from masa.eval import EVAL_SETS, command, fidelity, load_eval_text, perplexity

VOCAB = 64
T = 16


def tiny_llama(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    ).eval()


class Uniform(nn.Module):
    """Equal logits for every token: perplexity must equal the vocabulary size."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, VOCAB)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(0))  # 6 windows + 4 tail


def token_nll(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """NLL (T-1,) of tokens 1..T-1 of one window, the slow way."""
    with torch.no_grad():
        logits = model(window[None]).logits[0]
    return F.cross_entropy(logits[:-1], window[1:], reduction="none").double()


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_chunked_is_exp_of_manual_mean_nll(make_model, tokens):
    model = make_model().train()
    result = perplexity(model, tokens, "chunked", T, batch_size=4, progress=False)  # batches of 4 + 2
    assert model.training  # dropout was off only while scoring
    model.eval()
    manual = torch.cat([token_nll(model, tokens[i : i + T]) for i in range(0, 96, T)])
    assert result.n_windows == 6 and result.n_tokens == 6 * (T - 1) == manual.numel()
    assert result.nll == pytest.approx(manual.mean().item(), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(manual.mean().item()), rel=1e-5)
    assert result.describe() == f"chunked, T={T}, {6 * (T - 1):,} tokens scored"


def test_stride_equal_to_window_is_chunked(tokens):
    model = tiny_llama()
    chunked = perplexity(model, tokens, "chunked", T, batch_size=3, progress=False)
    strided = perplexity(model, tokens, "stride", T, stride=T, batch_size=5, progress=False)
    assert (strided.n_tokens, strided.n_windows) == (chunked.n_tokens, chunked.n_windows)
    assert strided.nll == pytest.approx(chunked.nll, rel=1e-6)


def test_stride_scores_each_new_token_once(tokens):
    model, stride = tiny_llama(), 5
    result = perplexity(model, tokens, "stride", T, stride=stride, batch_size=4, progress=False)
    n_windows = (100 - T) // stride + 1  # 17 windows, the last ends at token 96
    assert result.n_windows == n_windows
    assert result.n_tokens == (T - 1) + (n_windows - 1) * stride == 95  # tokens 1..95, once each
    starts = range(0, 100 - T + 1, stride)
    manual = torch.cat(
        [token_nll(model, tokens[s : s + T])[-(T - 1 if s == 0 else stride) :] for s in starts]
    )
    assert result.nll == pytest.approx(manual.mean().item(), rel=1e-5)
    assert "stride=5" in result.describe()


def test_uniform_logits_give_vocabulary_size(tokens):
    assert perplexity(Uniform(), tokens, "chunked", T, progress=False).ppl == pytest.approx(VOCAB, rel=1e-6)
    assert perplexity(Uniform(), tokens, "stride", T, stride=3, progress=False).ppl == pytest.approx(VOCAB)


def test_fidelity_against_itself_and_a_perturbed_copy(tokens):
    model = tiny_llama()
    same = fidelity(model, model, tokens, T, batch_size=4, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-9)
    assert same.top1_agreement == 1.0 and same.max_abs_logit_diff == 0.0
    assert same.n_positions == 6 * T and same.n_windows == 6

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.model.layers[0].self_attn.q_proj.weight.add_(0.5 * torch.randn(32, 32))
        perturbed.lm_head.weight.add_(0.5 * torch.randn(VOCAB, 32))
    other = fidelity(perturbed, model, tokens, T, progress=False)
    assert other.kl > 1e-4 and other.max_abs_logit_diff > 0
    assert 0.0 <= other.top1_agreement < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 128}, "one window needs 128 tokens but only 100"),
        ({"protocol": "stride", "stride": 0}, r"stride=0 is outside \[1, seq_len=16\]"),
        ({"protocol": "stride", "stride": T + 1}, r"stride=17 is outside"),
        ({"protocol": "stride"}, "needs a stride"),
        ({"protocol": "chunked", "stride": 4}, "drop the stride"),
        ({"protocol": "sliding"}, "unknown protocol 'sliding'"),
        ({"seq_len": 1}, "seq_len >= 2"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_perplexity_errors(kwargs, match, tokens):
    args = {"protocol": "chunked", "seq_len": T, "progress": False} | kwargs
    with pytest.raises(ValueError, match=match):
        perplexity(Uniform(), tokens, **args)


def test_input_errors(tokens):
    with pytest.raises(ValueError, match="1-D tensor of integer ids"):
        perplexity(Uniform(), tokens.view(4, 25), "chunked", T, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's 64 positions"):
        perplexity(tiny_llama(), torch.zeros(200, dtype=torch.long), "chunked", 128, progress=False)
    with pytest.raises(ValueError, match="model has 80 output tokens but the reference has 64"):
        fidelity(tiny_llama(vocab=80), tiny_llama(), tokens, T, progress=False)


@pytest.mark.parametrize("name", sorted(EVAL_SETS))
def test_named_eval_sets_load(name):
    assert len(load_eval_text(name)) > 100_000


def test_eval_text_errors_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown eval set 'wikitext3'.*wikitext2-test, wikitext2-valid"):
        load_eval_text("wikitext3")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_eval_text(tmp_path / "empty.txt")
    (tmp_path / "mine.txt").write_text("some text")
    assert load_eval_text(str(tmp_path / "mine.txt")) == "some text"


def test_eval_command_writes_report(tmp_path, capsys):
    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tok.save(str(model_dir / "tokenizer.json"))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i * 5 % len(words)] for i in range(120)))

    parser = argparse.ArgumentParser(prog="masa")
    command.add_parser(parser.add_subparsers())
    argv = ["eval", str(model_dir), "--data", str(text), "--seq-len", str(T), "--max-tokens", "100"]
    args = parser.parse_args([*argv, "--reference", str(model_dir), "--json", str(tmp_path / "out.json")])
    args.func(args)
    printed = capsys.readouterr().out
    assert "ppl" in printed and f"chunked, T={T}, 90 tokens scored" in printed and "vs reference" in printed
    report = json.loads((tmp_path / "out.json").read_text())
    entry = report["datasets"][str(text)]
    assert entry["text_tokens"] == 100 and entry["perplexity"]["n_windows"] == 6
    assert entry["fidelity"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert report["tokenizer"]["vocab_size"] == VOCAB

    args = parser.parse_args([*argv, "--protocol", "stride", "--stride", "4", "--json"])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["datasets"][str(text)]["perplexity"]["stride"] == 4
