"""Token perplexity under the two protocols of docs/compression.md, with the protocol recorded beside the number.

Which tokens count (positions are 0-based in the token stream; a window covers ``[s, s + T)``):

- ``chunked``: windows start at 0, T, 2T, ...; the tail that fills no whole window is dropped. In each
  window every token except the first is scored, given the window's preceding tokens; the first has
  no context and is not scored. n_tokens = n_windows * (T - 1). (GPTQ, SVD-LLM, Basis Sharing.)
- ``stride``: windows of T tokens start at 0, S, 2S, ...; again only whole windows. The first window
  scores its tokens 1..T-1; each later window scores only its last S tokens, the ones no earlier window
  covered (Hugging Face's perplexity guide), each with at least T - S tokens of context. For S < T
  every token from position 1 to the end of the last window is scored exactly once:
  n_tokens = (T - 1) + (n_windows - 1) * S. With S = T a window's first token has no context and is
  skipped, so ``stride`` with S = T is exactly ``chunked``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masa.progress import Progress
from masa.runtime import forward_logits, model_device

PROTOCOLS = ("chunked", "stride")


@dataclass(frozen=True)
class Windows:
    """Whole windows of ``seq_len`` tokens starting every ``step`` tokens; the leftover tail is dropped."""

    seq_len: int
    step: int

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} leaves nothing to score: pass seq_len >= 2")
        if not 1 <= self.step <= self.seq_len:
            raise ValueError(
                f"stride={self.step} is outside [1, seq_len={self.seq_len}]: "
                f"pass a stride between 1 and {self.seq_len} (e.g. {self.seq_len // 2 or 1})"
            )

    @classmethod
    def for_protocol(cls, protocol: str, seq_len: int, stride: int | None) -> Windows:
        """Windows of a named protocol; ``chunked`` takes no stride, ``stride`` needs one."""
        if protocol == "chunked":
            if stride not in (None, seq_len):
                raise ValueError(
                    f"protocol 'chunked' uses non-overlapping windows, but stride={stride} was given: "
                    "drop the stride or use protocol 'stride'"
                )
            return cls(seq_len, seq_len)
        if protocol == "stride":
            if stride is None:
                raise ValueError(
                    f"protocol 'stride' needs a stride between 1 and seq_len={seq_len} (e.g. {seq_len // 2 or 1})"
                )
            return cls(seq_len, stride)
        raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")

    def count(self, n_tokens: int) -> int:
        """Number of whole windows in a text of n_tokens tokens; raises when not even one fits."""
        if n_tokens < self.seq_len:
            raise ValueError(
                f"text too short: one window needs {self.seq_len} tokens but only {n_tokens} are available; "
                "use a longer text or a smaller seq_len"
            )
        return (n_tokens - self.seq_len) // self.step + 1

    def batches(self, token_ids: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the batch's first window, windows (B, T)) for consecutive batches of windows."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        n_windows = self.count(token_ids.numel())
        windows = token_ids.unfold(0, self.seq_len, self.step)  # (N,) -> (n_windows, T), a view
        for first in range(0, n_windows, batch_size):
            yield first, windows[first : first + batch_size]

    def scored(self, first: int, count: int) -> torch.Tensor:
        """Mask (count, T-1) of scored targets for windows first.., where target j is window token j+1."""
        targets = self.seq_len - 1
        new = torch.full((count,), min(self.step, targets))  # tokens no earlier window scored
        if first == 0:
            new[0] = targets
        return torch.arange(targets) >= (targets - new)[:, None]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and how it was measured; ``nll`` is the mean negative log-likelihood per token (nats)."""

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    protocol: str
    seq_len: int
    stride: int

    def describe(self) -> str:
        """Protocol summary to print beside the number, e.g. 'chunked, T=256, 12,288 tokens scored'."""
        stride = f", stride={self.stride}" if self.protocol == "stride" else ""
        return f"{self.protocol}, T={self.seq_len}{stride}, {self.n_tokens:,} tokens scored"


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run with dropout off, then restore the model's training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def as_token_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """Validate a 1-D tensor of token ids and return it as int64 on the CPU."""
    token_ids = torch.as_tensor(token_ids)
    if token_ids.ndim != 1 or token_ids.is_floating_point() or token_ids.is_complex():
        raise ValueError(
            f"token_ids must be a 1-D tensor of integer ids, got {token_ids.dtype} of shape "
            f"{tuple(token_ids.shape)}: concatenate the text's tokens into one stream"
        )
    return token_ids.long().cpu()


def check_context(model: nn.Module, seq_len: int) -> None:
    """Raise when seq_len exceeds the positions a Hugging Face model was built for."""
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ValueError(
            f"seq_len={seq_len} exceeds the model's {max_positions} positions: pass seq_len <= {max_positions}"
        )


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    protocol: str = "chunked",
    seq_len: int = 2048,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on one token stream (N,) under ``chunked`` or ``stride`` windows.

    See the module docstring for exactly which tokens are scored. NLL is summed in float64.
    """
    windows = Windows.for_protocol(protocol, seq_len, stride)
    token_ids = as_token_ids(token_ids)
    n_windows = windows.count(token_ids.numel())
    check_context(model, seq_len)
    device = model_device(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    bar = Progress(n_windows, desc=f"perplexity ({protocol}, T={seq_len})", unit="window", enabled=progress)
    with bar, eval_mode(model), torch.inference_mode():
        for first, batch in windows.batches(token_ids, batch_size):
            batch = batch.to(device)  # (B, T)
            logits = forward_logits(model, batch)[:, :-1]  # (B, T-1, V): position j predicts token j+1
            nll = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:], reduction="none")  # (B, T-1)
            scored = windows.scored(first, len(batch))
            nll_sum += nll.cpu()[scored].double().sum()
            n_tokens += int(scored.sum())
            bar.advance(len(batch))
    mean_nll = nll_sum.item() / n_tokens
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        n_tokens=n_tokens,
        n_windows=n_windows,
        protocol=protocol,
        seq_len=seq_len,
        stride=windows.step,
    )
