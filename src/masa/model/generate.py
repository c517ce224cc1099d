"""Sampling from any causal LM (native MasaLM or Hugging Face); the native model decodes with its KV cache."""

from __future__ import annotations

import torch
from torch import nn

from masa.runtime import forward_logits


def context_length(model: nn.Module) -> int | None:
    """Longest context the model accepts (max_seq_len, max_position_embeddings or n_positions), if known."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``input_ids`` (B, T) -> (B, T + max_new_tokens).

    ``temperature <= 0`` picks the most likely token; ``top_k`` None or 0 samples from the full
    vocabulary. The context is cropped to the model's maximum length. Runs in eval mode and restores
    the model's previous mode.

    A model with ``new_cache()`` (the native :class:`~masa.model.MasaLM`) keeps its keys and values:
    the prompt runs once, then each step runs only the new token (``use_cache=False`` reruns the whole
    context every step, the same numbers up to rounding). When the context outgrows the model's length
    the cache is dropped and the cropped context rerun, as without a cache. Other models rerun the
    context every step.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    max_len = context_length(model)
    was_training = model.training
    model.eval()
    ids = input_ids
    cached = use_cache and hasattr(model, "new_cache")
    cache = None
    try:
        for _ in range(max_new_tokens):
            if cached and cache is not None and (max_len is None or len(cache) < max_len):
                logits = model(ids[:, -1:], cache=cache)[:, -1, :].float()  # (B, V): the new token only
            else:
                context = ids if max_len is None else ids[:, -max_len:]
                cache = model.new_cache() if cached else None
                out = model(context, cache=cache) if cached else forward_logits(model, context)
                logits = out[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
    finally:
        model.train(was_training)
    return ids
