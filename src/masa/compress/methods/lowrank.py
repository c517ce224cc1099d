"""Per-layer low-rank methods: ``svd``, ``asvd``, ``svd-llm`` and ``fwsvd``.

All four are one whitened truncation (``masa.compress.whitening``) under a different transform: the
identity (svd), input channel scales s^alpha with s = mean |x| (asvd), the Cholesky factor of the
input Gram matrix (svd-llm), or output row weights sqrt(Fisher information) (fwsvd; Hsu et al., ICLR
2022: I_i = sum_j (dL/dW_ij)^2 over the calibration sequences, computed by the calibration pipeline).
Ranks come from the budget module, ``uniform`` (SVD-LLM's r = floor(m n (1 - CR) / (m + n)), rounding
spent) or ``whitened-error`` (largest squared singular values of W L per stored number first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from masa.budget import ALLOCATIONS, Knob, allocate, max_useful_rank, rank_knob
from masa.compress.calibration import CalibrationStats
from masa.compress.calibration.gram_files import same_input
from masa.compress.config import CompressConfig
from masa.compress.install import Replacement, lowrank_replacement
from masa.compress.layout import Layout, Target
from masa.compress.registry import method_options, register_method
from masa.compress.whitening import cholesky_factor, whiten, whitened_lowrank

# ------------------------------------------------------------------------------------------ options


@dataclass
class LowRankOptions:
    """Options of ``svd`` and ``fwsvd``: ``allocation`` is ``uniform`` or ``whitened-error``."""

    allocation: str = "uniform"

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"option allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")


@dataclass
class AsvdOptions(LowRankOptions):
    """Options of ``asvd``: ``alpha`` is the exponent of the channel scales s^alpha."""

    alpha: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if (
            not isinstance(self.alpha, (int, float))
            or isinstance(self.alpha, bool)
            or not math.isfinite(self.alpha)
        ):
            raise ValueError(f"option alpha={self.alpha!r} of method 'asvd' must be a float")
        self.alpha = float(self.alpha)


@dataclass
class SvdLlmOptions(LowRankOptions):
    """Options of ``svd-llm``: ``refit`` refits the ``up`` factor by least squares on the Gram matrix."""

    refit: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.refit, bool):
            raise ValueError(f"option refit={self.refit!r} of method 'svd-llm' must be true or false")


# ------------------------------------------------------------------------------------------- budget


def per_input(
    fn: Callable[[torch.Tensor], torch.Tensor],
    source: Mapping[str, torch.Tensor],
    last_only: bool = False,
    consume: bool = False,
) -> Callable:
    """``transform(name)`` computing ``fn`` once per distinct statistics tensor (q/k/v share an input).

    ``last_only`` keeps only the latest result (the same values, recomputed if an input comes back): for a
    walk over targets in model order, where layers sharing an input are neighbours, it holds one (d_in,
    d_in) factor at a time instead of all of them. ``consume`` removes a statistics tensor from ``source``
    once ``fn`` has read it (statistics nobody reads again: ``CalibrationStats.consumable``).
    """
    cache: dict[str, torch.Tensor] = {}

    def transform(name: str) -> torch.Tensor:
        if name not in cache:
            stat = source[name]
            sharing = same_input(source, name)
            if last_only:
                cache.clear()
            cache.update(dict.fromkeys(sharing, fn(stat)))
            if consume:
                for key in sharing:
                    del source[key]
        return cache[name]

    return transform


def rank_knobs(targets: list[Target], stats: CalibrationStats | None, spectra: bool) -> dict[str, Knob]:
    """A rank knob per target; with ``spectra`` its gains are the squared singular values of W L (L the
    Cholesky factor of the target's Gram; the identity without statistics), rank 1 being the floor."""
    chol = per_input(cholesky_factor, stats.grams) if stats is not None else None
    knobs = {}
    for t in targets:
        gains = None
        if spectra:
            weight = t.weight.to(torch.float64)
            if chol is not None:
                weight = whiten(weight, chol(t.name).to(weight.device))
            gains = torch.linalg.svdvals(weight).square()[1 : max_useful_rank(*t.shape)]  # ranks 2 .. useful
        knobs[t.name] = rank_knob(*t.shape, t.bias is not None, gains)
    return knobs


def choose_ranks(
    targets: list[Target], stats: CalibrationStats | None, ratio: float, allocation: str
) -> dict[str, int]:
    """Ranks per target meeting ``ratio`` over ``targets`` as ``allocation`` says."""
    knobs = rank_knobs(targets, stats, spectra=allocation == "whitened-error")
    return allocate(knobs, ratio, allocation)


# ----------------------------------------------------------------------------------------- the fit


def refit_up(weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares ``up`` given ``down``: argmin ||(W - up down) X^T|| = W G down^T (down G down^T)^-1."""
    weight, down, gram = weight.to(torch.float64), down.to(torch.float64), gram.to(torch.float64)
    projected = down @ gram  # (r, d_in)
    system = projected @ down.T  # (r, r), symmetric positive definite when down has full row rank
    return torch.linalg.solve(system, projected @ weight.T).T  # (d_out, r)


def truncate(
    targets: list[Target],
    ranks: dict[str, int],
    transform: Callable[[str], torch.Tensor],
    gram_of: Callable[[str], torch.Tensor] | None = None,
    output_side: bool = False,
    in_weight_dtype: bool = False,
) -> Replacement:
    """Each target as its rank-r truncation minimising ||(W - W_hat) T||_F, T = ``transform(name)``
    (lower triangular, (d_in, d_in)); ``output_side`` minimises ||T (W - W_hat)||_F with T (d_out, d_out)
    diagonal instead; with ``gram_of`` the ``up`` factor is refitted by least squares. The factors are
    float64, or with ``in_weight_dtype`` in the weight's dtype (the one ``install`` rounds them to: the same
    installed values, half the memory while the replacement is built)."""
    result = Replacement(report={"ranks": ranks})
    for t in targets:
        weight = t.weight  # converted to float64 where it is used (one transient copy, not one per layer)
        try:
            if output_side:  # rows weighted: factor W^T with the input-side routine
                t_up, t_down = whitened_lowrank(weight.T, transform(t.name).to(weight.device), ranks[t.name])
                up, down = t_down.T, t_up.T
            else:
                up, down = whitened_lowrank(weight, transform(t.name).to(weight.device), ranks[t.name])
                if gram_of is not None:
                    up = refit_up(weight, down, gram_of(t.name).to(weight.device))
        except ValueError as err:
            raise ValueError(f"{t.name}: {err}") from err
        if in_weight_dtype:
            up, down = up.to(weight.dtype), down.to(weight.dtype)
        result = result.extend(lowrank_replacement(t.name, up, down, t.bias))
    return result


def _identity(layout: Layout) -> Callable[[str], torch.Tensor]:
    sizes = {t.name: t.shape[1] for t in layout.targets}
    return lambda name: torch.eye(sizes[name], dtype=torch.float64)


# -------------------------------------------------------------------------------------- the methods


@register_method("svd", options=LowRankOptions)
def svd(layout: Layout, stats: CalibrationStats | None, config: CompressConfig) -> Replacement:
    """Plain truncated SVD of each weight (no calibration)."""
    options = method_options(LowRankOptions, config)
    ranks = choose_ranks(layout.targets, None, config.ratio, options.allocation)
    result = truncate(layout.targets, ranks, _identity(layout))
    result.report["allocation"] = options.allocation
    return result


@register_method("asvd", needs=("grams", "abs_mean"), options=AsvdOptions)
def asvd(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """ASVD: truncate W diag(s^alpha) with s = mean |x| per input channel, then unscale."""
    options = method_options(AsvdOptions, config)

    def scales(abs_mean: torch.Tensor) -> torch.Tensor:
        s = abs_mean.to(torch.float64)
        return torch.diag(
            s.clamp_min(1e-6 * float(s.max())) ** options.alpha
        )  # dead channels keep a tiny scale

    ranks = choose_ranks(layout.targets, stats, config.ratio, options.allocation)
    result = truncate(layout.targets, ranks, per_input(scales, stats.abs_mean))
    result.report.update(alpha=options.alpha, allocation=options.allocation)
    return result


@register_method("svd-llm", needs=("grams",), options=SvdLlmOptions)
def svd_llm(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """SVD-LLM: truncate W L (L L^T = X^T X), de-whiten with L^-1; ``refit=True`` refits ``up``."""
    options = method_options(SvdLlmOptions, config)
    ranks = choose_ranks(layout.targets, stats, config.ratio, options.allocation)
    gram_of = stats.grams.__getitem__ if options.refit else None
    consume = stats.consumable and not options.refit  # each Gram freed once factorised (streaming)
    chol = per_input(cholesky_factor, stats.grams, last_only=True, consume=consume)
    result = truncate(layout.targets, ranks, chol, gram_of, in_weight_dtype=True)
    result.report.update(refit=options.refit, allocation=options.allocation)
    return result


@register_method("fwsvd", needs=("grams", "fisher"), options=LowRankOptions)
def fwsvd(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """Fisher-weighted truncation of each layer: rows the loss is sensitive to are kept more exactly."""
    options = method_options(LowRankOptions, config)
    if missing := [n for n in layout.names if n not in (stats.fisher or {})]:
        raise ValueError(
            f"fwsvd needs the Fisher information (loss gradients on the calibration tokens) of {missing[:3]}: "
            "calibrate with masa.compress.calibrate(..., fisher=True) or pass calib= to compress()"
        )

    def row_weights(name: str) -> torch.Tensor:
        importance = stats.fisher[name].to(torch.float64)
        floor = max(1e-12 * float(importance.max()), 1e-30)  # rows without gradient keep a tiny weight
        return torch.diag(importance.clamp_min(floor).sqrt())  # (d_out, d_out)

    ranks = choose_ranks(layout.targets, stats, config.ratio, options.allocation)
    result = truncate(layout.targets, ranks, row_weights, output_side=True)
    result.report["allocation"] = options.allocation
    return result
