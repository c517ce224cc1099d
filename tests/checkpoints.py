"""Tiny checkpoints written the ways real ones come (no downloads): each writer takes an empty-or-new
directory, writes a complete Hugging Face model directory there with ``save_pretrained`` of
transformers' own classes, and returns it. Legacy layouts are made by rewriting the safetensors file
with ``safetensors.torch.save_file``, as the published checkpoints were written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB = 64
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def _saved(model: PreTrainedModel, directory: str | Path, **kwargs) -> Path:
    directory = Path(directory)
    model.eval().save_pretrained(str(directory), **kwargs)
    return directory


def _llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_key_value_heads": 2, **overrides}))


def llama(directory: str | Path) -> Path:
    """A plain fp32 Llama, untied output head, one ``model.safetensors``."""
    return _saved(_llama(), directory)


def sharded(directory: str | Path) -> Path:
    """A Llama split over several shards with a ``model.safetensors.index.json``."""
    return _saved(_llama(), directory, max_shard_size="20KB")


def bf16(directory: str | Path) -> Path:
    """A Llama stored in bfloat16 (config.json says so too, as ``save_pretrained`` writes it)."""
    return _saved(_llama().to(torch.bfloat16), directory)


def tied(directory: str | Path) -> Path:
    """A Llama with ``tie_word_embeddings=True``: the file has no ``lm_head.weight``."""
    return _saved(_llama(tie_word_embeddings=True), directory)


def gemma(directory: str | Path) -> Path:
    """A Gemma (tied head, scaled embeddings, (1 + w) norms)."""
    torch.manual_seed(0)
    config = GemmaConfig(**{**SMALL, "num_key_value_heads": 1, "head_dim": 8})
    return _saved(GemmaForCausalLM(config), directory)


def gpt_neox(directory: str | Path) -> Path:
    """A GPT-NeoX as transformers 5 saves it: the output head is ``embed_out.weight`` in the file."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(**SMALL, max_position_embeddings=64)
    return _saved(GPTNeoXForCausalLM(config), directory)


def _rewrite(directory: Path, edit) -> Path:
    """Replace ``model.safetensors`` by ``edit(tensors)``, written as the published files were."""
    path = directory / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
    return directory


def bert_position_ids(directory: str | Path) -> Path:
    """A BERT whose file carries the ``embeddings.position_ids`` buffer older versions saved."""
    torch.manual_seed(0)
    config = BertConfig(**SMALL, max_position_embeddings=64)
    directory = _saved(BertModel(config), directory)
    positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
    return _rewrite(directory, lambda t: {**t, "embeddings.position_ids": positions})


def gpt2_published(directory: str | Path) -> Path:
    """A GPT-2 in the published layout: no ``transformer.`` prefix, no ``lm_head`` (tied), and the
    ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` buffers of old transformers versions."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    directory = _saved(GPT2LMHeadModel(config), directory)
    mask = torch.tril(torch.ones(64, 64, dtype=torch.uint8)).view(1, 1, 64, 64)

    def published(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
        for n in range(config.n_layer):
            out[f"h.{n}.attn.bias"] = mask.clone()
            out[f"h.{n}.attn.masked_bias"] = torch.tensor(-1e4)
        return out

    return _rewrite(directory, published)


def with_file_edit(directory: Path, edit) -> Path:
    """Apply ``edit(tensors) -> tensors`` to the single ``model.safetensors`` of ``directory``."""
    return _rewrite(Path(directory), edit)


def with_config(directory: Path, **fields) -> Path:
    """Set top-level fields of ``directory``'s config.json (None removes the field)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return Path(directory)


def truncating_tokenizer(directory: str | Path, max_length: int = 16) -> Path:
    """A character tokenizer whose ``tokenizer.json`` truncates at ``max_length`` tokens and pads,
    as sentence-transformers tokenizers ship."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(["[UNK]", "[PAD]", *"abcdefghijklmnopqrstuvwxyz .,"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=1, pad_token="[PAD]", length=max_length)
    tok.save(str(directory / "tokenizer.json"))
    return directory
