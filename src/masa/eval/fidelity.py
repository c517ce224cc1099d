"""How closely a (compressed) model reproduces a reference model's next-token distributions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masa.eval.perplexity import Windows, as_token_ids, check_context, eval_mode
from masa.progress import Progress
from masa.runtime import forward_logits, model_device


@dataclass(frozen=True)
class FidelityResult:
    """Agreement of a model with a reference over every position of non-overlapping windows.

    kl: mean KL(reference || model) of the next-token distributions, nats per position.
    top1_agreement: fraction of positions where both models' most likely next token is the same.
    max_abs_logit_diff: largest |model logit - reference logit| over all positions and tokens.
    """

    kl: float
    top1_agreement: float
    max_abs_logit_diff: float
    n_positions: int
    n_windows: int
    seq_len: int

    def describe(self) -> str:
        """One line for the report, e.g. 'KL 0.012 nats, top-1 agreement 97.50 %, ...'."""
        return (
            f"KL {self.kl:.4g} nats, top-1 agreement {100 * self.top1_agreement:.2f} %, "
            f"max |logit diff| {self.max_abs_logit_diff:.4g} "
            f"(chunked, T={self.seq_len}, {self.n_positions:,} positions)"
        )


def _logits(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32 logits (B, T, V) of a model for windows (B, T), moved to ``device``."""
    return forward_logits(model, batch.to(model_device(model))).float().to(device)


def fidelity(
    model: nn.Module,
    reference: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = 2048,
    batch_size: int = 8,
    progress: bool = True,
) -> FidelityResult:
    """Compare ``model`` to ``reference`` on chunked windows of a token stream (N,); both share a vocabulary."""
    windows = Windows(seq_len, seq_len)
    token_ids = as_token_ids(token_ids)
    n_windows = windows.count(token_ids.numel())
    check_context(model, seq_len)
    check_context(reference, seq_len)
    device = model_device(model)
    kl_sum = torch.zeros((), dtype=torch.float64)
    n_agree = n_positions = 0
    max_diff = 0.0
    bar = Progress(n_windows, desc=f"fidelity (T={seq_len})", unit="window", enabled=progress)
    with bar, eval_mode(model), eval_mode(reference), torch.inference_mode():
        for _, batch in windows.batches(token_ids, batch_size):
            logits = _logits(model, batch, device)  # (B, T, V)
            ref = _logits(reference, batch, device)  # (B, T, V')
            if logits.shape[-1] != ref.shape[-1]:
                raise ValueError(
                    f"model has {logits.shape[-1]} output tokens but the reference has {ref.shape[-1]}: "
                    "fidelity compares distributions over one vocabulary; compare models that share a tokenizer"
                )
            log_p = F.log_softmax(logits, dim=-1)
            ref_log_p = F.log_softmax(ref, dim=-1)
            kl = F.kl_div(log_p, ref_log_p, log_target=True, reduction="none").sum(-1)  # (B, T)
            kl_sum += kl.cpu().double().sum()
            n_agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            n_positions += kl.numel()
            max_diff = max(max_diff, (logits - ref).abs().max().item())
            bar.advance(len(batch))
    return FidelityResult(
        kl=kl_sum.item() / n_positions,
        top1_agreement=n_agree / n_positions,
        max_abs_logit_diff=max_diff,
        n_positions=n_positions,
        n_windows=n_windows,
        seq_len=seq_len,
    )
