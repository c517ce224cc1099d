"""Uniform access to models of different origins (native `MasaLM`, Hugging Face transformers)."""

from __future__ import annotations

import torch
from torch import nn


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, V) for input_ids (B, T), whatever the model returns."""
    out = model(input_ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if logits is None:
        raise TypeError(f"{type(model).__name__} returned {type(out).__name__} without logits")
    return logits


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
