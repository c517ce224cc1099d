"""Uniform access to models of different origins (native `MasaLM`, Hugging Face transformers) and devices."""

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


def require_module(model: object, action: str) -> nn.Module:
    """``model`` itself when it is a torch module; otherwise a TypeError saying what to pass instead
    (a path given where a model is expected is the usual mistake)."""
    if isinstance(model, nn.Module):
        return model
    hint = (
        f"; load it first with masa.load({str(model)!r})"
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")
        else ""
    )
    raise TypeError(f"{action} needs a model (a torch.nn.Module), got {type(model).__name__}{hint}")


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device a user asked for ("auto", "cpu", "cuda", "cuda:1", "mps"), checked to be usable.

    "auto" picks CUDA when a GPU is visible, else the CPU. Raises ValueError saying what is missing (no
    CUDA in this torch build, no visible GPU, too few GPUs) and what to pass instead.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(
                f"device {name!r}: there is no CUDA in this torch build ({torch.__version__}); run on the "
                "cpu device instead, or install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {name!r}: torch has CUDA but sees no GPU here; run on the cpu device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available in this torch build or on this machine")
    return device
