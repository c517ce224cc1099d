"""Tiny Hugging Face models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from masa.arch import linear_weight
from masa.compress.whitening import whitened_error

VOCAB = 64


def build(family: str, n_layer: int = 4, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model (hidden 32, 4 heads, K/V grouped where the family allows)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=n_layer, num_attention_heads=4)
    if family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        )
    elif family == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        )
    elif family == "mistral":
        model = MistralForCausalLM(
            MistralConfig(
                hidden_size=32, intermediate_size=64, num_key_value_heads=1, sliding_window=None, **common
            )
        )
    elif family == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=n_layer,
                n_head=4,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    elif family == "opt":
        model = OPTForCausalLM(
            OPTConfig(
                hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, **common
            )
        )
    elif family == "bert":
        model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, **common))
    else:
        raise KeyError(family)
    return model.eval()


FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")


def outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, last hidden states of an encoder."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def make_low_rank(model: torch.nn.Module, rank: int = 4) -> None:
    """Make every block projection exactly rank ``rank`` so a large enough truncation is lossless."""
    with torch.no_grad():
        for name, module in model.named_modules():
            linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
            if linear and "lm_head" not in name:
                u, s, vh = torch.linalg.svd(module.weight, full_matrices=False)
                module.weight.copy_((u[:, :rank] * s[:rank]) @ vh[:rank])


def outlier_norms(model: torch.nn.Module) -> None:
    """Give activations outlier channels, as trained LLMs have (random norm gains span ~e^+-2)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.mul_(torch.randn(module.weight.shape, generator=gen).exp())


def total_whitened_error(model, original, names, stats) -> float:
    """Sum over ``names`` of the whitened error of ``model``'s weights against ``original``'s."""
    return sum(
        whitened_error(
            linear_weight(original.get_submodule(n))[0], model.get_submodule(n).weight, stats.grams[n]
        )
        for n in names
    )
