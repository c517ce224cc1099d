"""Sampling from any causal LM (native MasaLM or Hugging Face), without a KV cache (models are small)."""

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
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``input_ids`` (B, T) -> (B, T + max_new_tokens).

    ``temperature <= 0`` picks the most likely token; ``top_k`` None or 0 samples from the full
    vocabulary. The context is cropped to the model's maximum length. Runs in eval mode and restores
    the model's previous mode.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    max_len = context_length(model)
    was_training = model.training
    model.eval()
    ids = input_ids
    try:
        for _ in range(max_new_tokens):
            context = ids if max_len is None else ids[:, -max_len:]
            logits = forward_logits(model, context)[:, -1, :].float()  # (B, V)
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
