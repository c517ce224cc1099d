"""Fisher information of layer weights, a calibration statistic for ``fwsvd`` (Hsu et al., ICLR 2022).

The Fisher information of a weight, estimated by the squared gradient of the LM loss summed over the
calibration sequences (one sequence per backward pass), is summed over each output row:
I_i = sum_j sum_batches (dL/dW_ij)^2. It needs the calibration *tokens* and the whole model (a loss),
so the pipeline computes it beside the Gram matrices when a method asks for it.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from masa.arch import linear_weight
from masa.compress.calibration.collect import CalibrationStats
from masa.runtime import forward_logits


def _weight_param(module: nn.Module) -> tuple[nn.Parameter, bool]:
    """The module's weight parameter and whether it is stored transposed (GPT-2 Conv1D: (d_in, d_out))."""
    weight, _ = linear_weight(module)
    return module.weight, weight is not module.weight


def fisher_information(
    model: nn.Module, tokens: torch.Tensor, names: list[str], causal: bool = True, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Row-wise Fisher information (d_out,) of each named layer from next-token loss gradients on
    ``tokens`` (N, T), ``batch_size`` sequences per backward pass; ``causal=False`` (an encoder) raises."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"Fisher information needs (N, T >= 2) token ids, got shape {tuple(tokens.shape)}")
    if not causal:
        raise ValueError(
            f"fwsvd estimates the Fisher information from next-token loss gradients, which an encoder "
            f"({type(model).__name__}) has no head for: use svd-llm, asvd or basis-sharing on encoders"
        )
    params = {name: _weight_param(model.get_submodule(name)) for name in names}
    device = params[names[0]][0].device
    fisher = {
        name: torch.zeros(p.shape[1 if t else 0], dtype=torch.float64, device=device)
        for name, (p, t) in params.items()
    }
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in tokens.to(device).split(batch_size):
                logits = forward_logits(model, batch)[:, :-1]  # (B, T-1, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
                grads = torch.autograd.grad(loss, [p for p, _ in params.values()])
                for (name, (_, transposed)), grad in zip(params.items(), grads, strict=True):
                    fisher[name] += grad.to(torch.float64).square().sum(0 if transposed else 1)
    finally:
        model.train(was_training)
    return fisher


def with_fisher(
    stats: CalibrationStats, model: nn.Module, tokens: torch.Tensor, names: list[str], causal: bool = True
) -> CalibrationStats:
    """``stats`` with the Fisher information of ``names`` on ``tokens`` (N, T) added."""
    fisher = fisher_information(model, tokens, names, causal)
    return replace(stats, fisher={**(stats.fisher or {}), **fisher})
