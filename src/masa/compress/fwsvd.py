"""``fwsvd``: Fisher-weighted SVD (Hsu et al., ICLR 2022).

The Fisher information of a weight, estimated by the squared gradient of the LM loss summed over the
calibration sequences (one sequence per backward pass by default), is summed over each output row:
I_i = sum_j sum_batches (dL/dW_ij)^2. FWSVD then truncates diag(sqrt(I)) W and unscales the rows,
minimising ||diag(sqrt(I)) (W - W_hat)||_F: rows the loss is sensitive to are kept more exactly.

Gradients need the calibration *tokens*, which plain calibration statistics do not keep: compute them
here; ``masa.compress.compress`` adds them (:func:`with_fisher`) to the statistics of any method that
``needs`` "fisher", from the calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from masa.arch import get_adapter, linear_weight
from masa.compress.allocation import register_allocation
from masa.compress.calibration import CalibrationStats, calibrate
from masa.compress.config import CompressConfig
from masa.compress.methods import allocate_ranks, method_options, register_method, replace_with_lowrank
from masa.compress.whitening import whitened_lowrank
from masa.runtime import forward_logits


@dataclass
class FisherStats(CalibrationStats):
    """Calibration statistics plus each target's row-wise Fisher information (d_out,) float64."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)


def _weight_param(module: nn.Module) -> tuple[nn.Parameter, bool]:
    """The module's weight parameter and whether it is stored transposed (GPT-2 Conv1D: (d_in, d_out))."""
    weight, _ = linear_weight(module)
    return module.weight, weight is not module.weight


def fisher_information(
    model: nn.Module, tokens: torch.Tensor, names: list[str], batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Row-wise Fisher information (d_out,) of each named layer from next-token loss gradients on
    ``tokens`` (N, T), ``batch_size`` sequences per backward pass."""
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"Fisher information needs (N, T >= 2) token ids, got shape {tuple(tokens.shape)}")
    try:
        causal = get_adapter(model).causal
    except ValueError:  # no adapter: the model must at least return next-token logits (checked below)
        causal = True
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
    stats: CalibrationStats, model: nn.Module, tokens: torch.Tensor, names: list[str]
) -> FisherStats:
    """``stats`` with the Fisher information of ``names`` on ``tokens`` added."""
    fisher = fisher_information(model, tokens, names)
    return FisherStats(**{f.name: getattr(stats, f.name) for f in fields(CalibrationStats)}, fisher=fisher)


def fisher_stats(model: nn.Module, tokens: torch.Tensor, names: list[str]) -> FisherStats:
    """Calibration statistics and Fisher information of ``names`` over ``tokens`` (N, T)."""
    return with_fisher(calibrate(model, tokens, names), model, tokens, names)


@register_method("fwsvd", needs=("grams", "fisher"))
def fwsvd(model: nn.Module, stats: CalibrationStats, names: list[str], config: CompressConfig) -> dict:
    """Fisher-weighted truncation of each layer (module docstring); needs :class:`FisherStats`."""
    method_options(config, {})
    missing = [n for n in names if n not in getattr(stats, "fisher", {})]
    if missing:
        raise ValueError(
            f"fwsvd needs the Fisher information (loss gradients on the calibration tokens) of {missing[:3]}: "
            "pass stats=masa.compress.fwsvd.fisher_stats(model, tokens, names) to compress()"
        )
    pairs = {name: linear_weight(model.get_submodule(name)) for name in names}
    ranks = allocate_ranks({n: (*w.shape, b is not None) for n, (w, b) in pairs.items()}, config.ratio)
    for name, (weight, bias) in pairs.items():
        importance = stats.fisher[name].to(torch.float64)
        floor = max(1e-12 * float(importance.max()), 1e-30)  # rows without gradient keep a tiny weight
        scale = torch.diag(importance.clamp_min(floor).sqrt())  # (d_out, d_out)
        # rows weighted on the output side: factor W^T with the same routine as the input-side methods
        t_up, t_down = whitened_lowrank(weight.detach().T, scale.to(weight.device), ranks[name])
        replace_with_lowrank(model, name, t_down.T, t_up.T, None if bias is None else bias.detach())
    return {"ranks": ranks}


register_allocation("fwsvd")
