"""EoRA: a low-rank correction of each compressed layer's error, fitted in the geometry of its inputs.

For a layer W (d_out, d_in) compressed to W_hat, with G = X^T X = L L^T its input Gram, the rank-r
correction B A minimising ||(W - W_hat - B A) X^T||_F is the truncated SVD of (W - W_hat) L mapped back
with L^-1: :func:`masa.compress.whitening.whitened_lowrank` applied to the error. The paper writes it
with G = Q diag(lambda) Q^T; any square root of G gives the same B A, and a singular G is damped as for
SVD-LLM (``cholesky_factor``). So SVD-LLM at rank k plus EoRA at rank r *is* SVD-LLM at rank k + r;
the correction helps methods that are not optimal in this metric (svd, asvd, fwsvd, shared bases,
sparse codes, masa's atoms).

One implementation composes after every method: :func:`approximation` reads what a method's
:class:`Replacement` stands for (installed on a scratch copy of the targets, never the model),
:func:`corrections` fits the terms, and :func:`compensated` searches, at a fixed ratio, how much of
the stored budget goes to the method and how much to the corrections.

The correction ranks are spread by :func:`error_weights`: a weighted sum of the layers' whitened
errors, the weights being the method's own where it states them (masa's role-weighted relative
objective, report key ``error_weights``) and otherwise 1 (the summed whitened error). The split is
chosen by the calibration loss (next-token cross-entropy on the calibration tokens, a copy of the model
holding each candidate) where :func:`compensated` is given it, as :func:`masa.compress.compress` does
for causal LMs; else by the same weighted error. Why (12-block Llama, all linear layers, ratio 0.4):
every whitened-error criterion falls as the share grows, so it always took the largest share tried,
while perplexity has its minimum near a 10 % share: SVD-LLM + EoRA at shares 0.02 / 0.05 / 0.1 /
0.2 / 0.5 gave +2.26 / +1.42 / +1.20 / +1.26 / +1.66 ppl (plain +5.87), and the calibration
perplexity, 71.23 / 70.80 / 70.73 / 70.73 / 70.84 (plain 72.30), tracks that; masa's own objective
fell 2.7 x from share 0 to 0.5 at 20 % while its perplexity increase rose from +0.31 to +0.65.
Share 0 (the plain method, its rounding left-over spent on corrections) is always a candidate, so a
searched split is never worse than the plain method on what it is chosen by.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masa.arch.adapters import set_submodule
from masa.budget import spend
from masa.compress.calibration import CalibrationStats, calibrate
from masa.compress.config import CompressConfig, parse_compensation
from masa.compress.install import Replacement, install
from masa.compress.layout import Layout, resolve_layout
from masa.compress.methods.lowrank import per_input
from masa.compress.whitening import cholesky_factor, whiten, whitened_lowrank
from masa.nn.protocol import MasaLinear

SPLITS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # fractions of the stored budget tried for the corrections


@dataclass
class Approximation:
    """What a method's result stands for: each target's dense weight and the numbers stored in all."""

    weights: dict[str, torch.Tensor]  # name -> W_hat (d_out, d_in), float64
    stored: int


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """``set_submodule`` creating empty containers on the way."""
    parent = root
    for part in path.split(".")[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    set_submodule(root, path, module)


def _scratch(layout: Layout) -> nn.Module:
    """A module tree holding only the targets (sharing the model's weight tensors) at their names."""
    root = nn.Module()
    if layout.blocks_path:
        _put(root, layout.blocks_path, nn.ModuleList(nn.Module() for _ in range(layout.n_blocks)))
    for t in layout.targets:
        linear = nn.Linear(t.shape[1], t.shape[0], bias=t.bias is not None, device="meta")
        linear.weight = nn.Parameter(t.weight, requires_grad=False)
        if t.bias is not None:
            linear.bias = nn.Parameter(t.bias, requires_grad=False)
        _put(root, t.name, linear)
    return root


def stored_numbers(module: nn.Module) -> int:
    """Numbers ``module`` stores: each parameter once, plus what masa layers keep beside them."""
    extra = sum(m.extra_stored_numel() for m in module.modules() if isinstance(m, MasaLinear))
    return sum(p.numel() for p in module.parameters()) + extra


@torch.no_grad()
def approximation(layout: Layout, replacement: Replacement) -> Approximation:
    """The dense weights and stored numbers of ``replacement`` (installed on a scratch copy of the targets)."""
    scratch = _scratch(layout)
    install(scratch, replacement)
    weights = {
        t.name: scratch.get_submodule(t.name).weight.detach().to(torch.float64) for t in layout.targets
    }
    return Approximation(weights, stored_numbers(scratch))


def residual_spectra(
    layout: Layout, stats: CalibrationStats, weights: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per target, the squared singular values of (W - W_hat) L: the whitened error each correction rank removes."""
    chol = per_input(cholesky_factor, stats.grams)
    spectra = {}
    for t in layout.targets:
        error = t.weight.to(torch.float64) - weights[t.name].to(t.weight.device)  # (d_out, d_in)
        spectra[t.name] = torch.linalg.svdvals(whiten(error, chol(t.name).to(error.device))).square()
    return spectra


def error_weights(layout: Layout, report: dict | None = None) -> dict[str, float]:
    """The compensation criterion: per target, what one unit of its whitened error counts (the criterion
    is sum_layers weight x whitened error). The method's own weights where its report states them
    (``report["error_weights"]``: masa's role weight / role energy), else 1: the summed output error on
    the calibration inputs, the metric SVD-LLM and EoRA minimise. Measured on the 12-block bench model
    (all linear layers), each layer's *relative* error (1 / ||W L||_F^2) spread SVD-LLM's corrections
    worse: +2.02 / +11.90 ppl at 40 / 60 % against +1.66 / +5.92 for the absolute error."""
    own = (report or {}).get("error_weights")
    if own:
        return {t.name: float(own[t.name]) for t in layout.targets}
    return {t.name: 1.0 for t in layout.targets}


def criterion(spectra: dict[str, torch.Tensor], ranks: dict[str, int], weights: dict[str, float]) -> float:
    """Weighted whitened error left after corrections of ``ranks`` (each removes its spectrum's head)."""
    return sum(weights[n] * float(s[ranks.get(n, 0) :].sum()) for n, s in spectra.items())


def spread_ranks(
    layout: Layout, spectra: dict[str, torch.Tensor], numbers: int, weights: dict[str, float] | None = None
) -> dict[str, int]:
    """Correction ranks spending at most ``numbers`` stored numbers, largest weighted error removed per
    number first (``weights``: :func:`error_weights`; unweighted without)."""
    names = [t.name for t in layout.targets]
    costs = [sum(t.shape) for t in layout.targets]
    gains = [spectra[n] * (1.0 if weights is None else weights[n]) for n in names]
    steps, _ = spend(costs, gains, [0] * len(names), max(0, numbers))
    return dict(zip(names, steps, strict=True))


def uniform_ranks(layout: Layout, rank: int) -> dict[str, int]:
    """Rank ``rank`` for every target; raises naming a layer too small for it."""
    for t in layout.targets:
        if rank > min(t.shape):
            raise ValueError(
                f"EoRA rank {rank} exceeds what {t.name} ({t.shape[0]}x{t.shape[1]}) allows "
                f"(at most {min(t.shape)}): give a smaller rank or a fraction (eora:0.1)"
            )
    return {t.name: rank for t in layout.targets}


def corrections(
    layout: Layout, stats: CalibrationStats, weights: dict[str, torch.Tensor], ranks: dict[str, int]
) -> Replacement:
    """The EoRA terms for targets with rank > 0: a ``compensate`` operation and ``NAME.correction.*`` tensors."""
    chol = per_input(cholesky_factor, stats.grams)
    entries, tensors = [], {}
    for t in layout.targets:
        rank = ranks.get(t.name, 0)
        if rank < 1:
            continue
        error = t.weight.to(torch.float64) - weights[t.name].to(t.weight.device)  # (d_out, d_in)
        up, down = whitened_lowrank(error, chol(t.name).to(error.device), rank)  # (d_out, r), (r, d_in)
        entries.append({"module": t.name, "rank": rank})
        tensors |= {f"{t.name}.correction.up": up, f"{t.name}.correction.down": down}
    return Replacement([{"op": "compensate", "modules": entries}] if entries else [], tensors)


def nest(replacement: Replacement, names: list[str]) -> Replacement:
    """``replacement`` with the tensors of the modules ``names`` moved under ``NAME.inner`` (where a
    :class:`~masa.nn.compensated.CompensatedLinear` wraps them)."""
    prefixes = tuple(f"{n}." for n in names)
    tensors = {}
    for key, value in replacement.tensors.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        tensors[key if owner is None else f"{owner}inner.{key[len(owner) :]}"] = value
    return Replacement(list(replacement.ops), tensors, dict(replacement.report))


def _candidate(method, layout: Layout, stats: CalibrationStats, config: CompressConfig, budget: float,
               share: float, rank: int | None) -> dict:  # fmt: skip
    """The method run with ``share`` of ``budget`` (or ``rank`` per layer) left for the corrections."""
    dense = sum(t.dense for t in layout.targets)
    fixed = uniform_ranks(layout, rank) if rank is not None else None
    reserved = sum(r * sum(t.shape) for t, r in zip(layout.targets, fixed.values(), strict=True)) if fixed \
        else share * budget  # fmt: skip
    inner_ratio = 1.0 - (budget - reserved) / dense
    if inner_ratio >= 1.0:
        raise ValueError(
            f"EoRA's corrections ({reserved:,.0f} numbers) leave nothing of the budget of ratio {config.ratio:.3f} "
            f"({budget:,.0f} numbers) for the method: give a smaller rank or fraction"
        )
    inner = dataclasses.replace(config, ratio=max(inner_ratio, config.ratio), compensate=None)
    replacement = method.fn(layout, stats if method.needs else None, inner)
    approx = approximation(layout, replacement)
    spectra = residual_spectra(layout, stats, approx.weights)
    weights = error_weights(layout, replacement.report)
    ranks = fixed or spread_ranks(layout, spectra, math.floor(budget) - approx.stored, weights)
    plain = dict.fromkeys(spectra, 0)
    return {"share": share, "inner_ratio": round(inner_ratio, 6),
            "criterion_method": criterion(spectra, plain, weights), "criterion": criterion(spectra, ranks, weights),
            "whitened_error_method": criterion(spectra, plain, dict.fromkeys(spectra, 1.0)),
            "whitened_error": criterion(spectra, ranks, dict.fromkeys(spectra, 1.0)),
            "ranks": ranks, "replacement": replacement, "approx": approx}  # fmt: skip


def calibration_loss(
    model: nn.Module, tokens: torch.Tensor, batch_size: int = 8
) -> Callable[[Replacement], float]:
    """``loss(replacement)``: the mean next-token cross-entropy on ``tokens`` (N, T) of a copy of the causal
    LM ``model`` with ``replacement`` installed (the model is untouched; one more copy of it is held
    while a candidate is scored)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def loss(replacement: Replacement) -> float:
        trial = copy.deepcopy(model).eval()
        install(trial, replacement)
        total, count = 0.0, 0
        for chunk in tokens.split(batch_size):
            chunk = chunk.to(device)  # (B, T)
            logits = trial(chunk).logits[:, :-1].float()  # (B, T - 1, V)
            total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
            count += chunk[:, 1:].numel()
        del trial
        return total / count

    return loss


def _score(candidate: dict) -> float:
    """What the split search minimises: the calibration loss where it was measured, else :func:`criterion`."""
    return candidate.get("calibration_loss", candidate["criterion"])


def _assembled(layout: Layout, stats: CalibrationStats, candidate: dict) -> Replacement:
    """A candidate's whole replacement: the method's layers wrapped with their corrections."""
    names = [n for n, r in candidate["ranks"].items() if r > 0]
    return nest(candidate["replacement"], names).extend(
        corrections(layout, stats, candidate["approx"].weights, candidate["ranks"])
    )


def compensated(
    method,
    layout: Layout,
    stats: CalibrationStats,
    config: CompressConfig,
    loss: Callable[[Replacement], float] | None = None,
) -> Replacement:
    """``method`` plus EoRA at ``config.ratio`` in all: the split fixed by ``config.compensate`` or
    searched over :data:`SPLITS` (share 0, the plain method, always among them) for the least
    calibration ``loss`` (:func:`calibration_loss`) when given, else the least :func:`criterion`; the
    choice and the tries reported."""
    _, amount = parse_compensation(config.compensate)
    budget = (1.0 - config.ratio) * sum(t.dense for t in layout.targets)
    if amount is None:
        tried = []
        for share in dict.fromkeys((0.0, *SPLITS)):  # the plain method first, whatever SPLITS says
            try:
                tried.append(_candidate(method, layout, stats, config, budget, share, None))
            except ValueError as err:  # the method cannot reach this inner ratio: skip the split
                tried.append({"share": share, "error": str(err)})
        feasible = [c for c in tried if "error" not in c]
        if not feasible:
            raise ValueError(f"no compression/compensation split works: {tried[0]['error']}")
        if loss is not None:
            for candidate in feasible:
                candidate["calibration_loss"] = loss(_assembled(layout, stats, candidate))
        best = min(feasible, key=_score)
    else:
        rank = amount if isinstance(amount, int) else None
        best = _candidate(method, layout, stats, config, budget, 0.0 if rank else amount, rank)
        tried = [best]
    result = _assembled(layout, stats, best)
    result.report["compensation"] = {
        "kind": "eora",
        "spec": config.compensate,
        "chosen_by": "calibration_loss" if "calibration_loss" in best else "criterion",
        "share": best["share"],
        "inner_ratio": best["inner_ratio"],
        "ranks": {n: r for n, r in best["ranks"].items() if r > 0},
        "tried": [{k: v for k, v in c.items() if k not in ("replacement", "approx", "ranks")} for c in tried],
    }
    return result


def compressed_layers(model: nn.Module) -> list[str]:
    """Names of the outermost masa layers of ``model`` that compression put there (not yet compensated)."""
    from masa.nn.compensated import CompensatedLinear
    from masa.nn.fused import SplitLinear

    names, inside = [], ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if isinstance(module, MasaLinear) and not isinstance(module, SplitLinear):
            inside = name + "."
            if not isinstance(module, CompensatedLinear):
                names.append(name)
    return names


@torch.no_grad()
def compensate_model(
    model: nn.Module, original: nn.Module, tokens: torch.Tensor, amount: int | float
) -> dict:
    """Add EoRA corrections to an already compressed ``model`` in place, fitted against ``original`` (its
    uncompressed source) on calibration ``tokens`` (N, T): rank ``amount`` per layer (an int), or that
    fraction (a float) of the layers' stored numbers spent on them (ranks by :func:`error_weights`).
    Returns the ratios and ranks."""
    names = compressed_layers(model)
    if not names:
        raise ValueError(
            "the model has no compressed layer to compensate (nothing masa replaced, or every layer already "
            "carries a correction): compress it first with masa compress"
        )
    layout = resolve_layout(original, CompressConfig("svd", 0.5, targets=tuple(re.escape(n) for n in names)))
    dense = sum(t.dense for t in layout.targets)
    for t in layout.targets:
        if t.shape != (model.get_submodule(t.name).out_features, model.get_submodule(t.name).in_features):
            raise ValueError(
                f"{t.name} has another shape in the original model: give the model it was compressed from"
            )
    stored = sum(stored_numbers(model.get_submodule(n)) for n in names)
    stats = calibrate(original, tokens, names)
    weights = {n: model.get_submodule(n).weight.detach().to(torch.float64) for n in names}
    if isinstance(amount, int):
        ranks = uniform_ranks(layout, amount)
    else:
        spectra = residual_spectra(layout, stats, weights)
        ranks = spread_ranks(layout, spectra, math.floor(amount * stored), error_weights(layout))
    install(model, corrections(layout, stats, weights, ranks))
    after = sum(stored_numbers(model.get_submodule(n)) for n in names)
    return {
        "modules": len(names),
        "ratio_before": 1.0 - stored / dense,
        "ratio_after": 1.0 - after / dense,
        "ranks": {n: r for n, r in ranks.items() if r > 0},
    }
