"""Tiny Hugging Face models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

from masa.arch import linear_weight
from masa.compress.whitening import whitened_error

VOCAB = 64
# The knob of each attention variant of a tiny native MasaLM (the tests' d = 32..64 models).
NATIVE_KNOBS = {
    "dense": {},
    "gqa": {"gqa_groups": 2},
    "lowrank": {"rank": 8},
    "seq-share": {"n_unique": 2},
    "cycle-share": {"n_unique": 2},
    "masa-qkv": {"n_atoms": 2},
    "masa-qkvo": {"n_atoms": 2},
}
_HEADS = dict(vocab_size=VOCAB, num_attention_heads=4)  # hidden 32: head_dim 8
_DECODER = dict(hidden_size=32, intermediate_size=64, **_HEADS)
_GEMMA = dict(head_dim=8, num_key_value_heads=2, **_DECODER)
_ENCODER = dict(hidden_size=32, intermediate_size=64, max_position_embeddings=64, **_HEADS)
_LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

# family -> n_layer -> (model class, config); K/V heads grouped where the family allows
_BUILDERS = {
    "llama": lambda n: (
        tf.LlamaForCausalLM, tf.LlamaConfig(num_key_value_heads=2, num_hidden_layers=n, **_DECODER)
    ),
    "llama3": lambda n: (
        tf.LlamaForCausalLM,
        tf.LlamaConfig(
            num_key_value_heads=2, rope_scaling=_LLAMA3_ROPE, tie_word_embeddings=True, num_hidden_layers=n,
            **_DECODER,
        ),
    ),
    "qwen2": lambda n: (
        tf.Qwen2ForCausalLM, tf.Qwen2Config(num_key_value_heads=2, num_hidden_layers=n, **_DECODER)
    ),
    "qwen3": lambda n: (
        tf.Qwen3ForCausalLM,
        tf.Qwen3Config(head_dim=8, num_key_value_heads=2, num_hidden_layers=n, **_DECODER),
    ),
    "mistral": lambda n: (
        tf.MistralForCausalLM,
        tf.MistralConfig(num_key_value_heads=1, sliding_window=None, num_hidden_layers=n, **_DECODER),
    ),
    "gemma": lambda n: (tf.GemmaForCausalLM, tf.GemmaConfig(num_hidden_layers=n, **_GEMMA)),
    "gemma2": lambda n: (
        tf.Gemma2ForCausalLM, tf.Gemma2Config(sliding_window=8, num_hidden_layers=n, **_GEMMA)
    ),
    "gemma3": lambda n: (
        tf.Gemma3ForCausalLM,
        tf.Gemma3TextConfig(
            sliding_window=8, layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(n)],
            num_hidden_layers=n, **_GEMMA,
        ),
    ),
    "phi3": lambda n: (
        tf.Phi3ForCausalLM,
        tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=0, num_hidden_layers=n, **_DECODER),
    ),
    "gpt_neox": lambda n: (
        tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(max_position_embeddings=64, num_hidden_layers=n, **_DECODER)
    ),
    "gpt2": lambda n: (
        tf.GPT2LMHeadModel,
        tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=n, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
    ),
    "opt": lambda n: (
        tf.OPTForCausalLM,
        tf.OPTConfig(
            hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
            num_hidden_layers=n, **_HEADS,
        ),
    ),
    "bert": lambda n: (tf.BertModel, tf.BertConfig(num_hidden_layers=n, **_ENCODER)),
    "roberta": lambda n: (tf.RobertaModel, tf.RobertaConfig(num_hidden_layers=n, **_ENCODER)),
}  # fmt: skip


def build(family: str, n_layer: int = 4, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (hidden 32, 4 heads, vocab 64), in eval mode.

    Its config names its class in ``architectures``, as a checkpoint saved by transformers does.
    """
    cls, config = _BUILDERS[family](n_layer)
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    return cls(config).eval()


FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt", "bert")
# every supported family: llama3 is Llama with llama3 rope scaling and tied embeddings
ALL_FAMILIES = (
    "llama", "llama3", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2",
    "opt", "bert", "roberta",
)  # fmt: skip


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
