"""The method registry, and the low-rank methods: ``svd``, ``asvd`` and ``svd-llm``.

A method replaces the named modules of a model in place (recording replayable surgery) and returns
a JSON-able report. All three low-rank methods are one whitened truncation (see ``whitening``) under
a different input transform: identity (svd), channel scales s^alpha (asvd), Cholesky factor of the
Gram matrix (svd-llm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import torch
from torch import nn

from masa import surgery
from masa.arch import linear_weight, set_submodule
from masa.budget import check_ratio, lowrank_params, rank_for_ratio
from masa.compress.calibration import CalibrationStats
from masa.compress.config import CompressConfig
from masa.compress.whitening import cholesky_factor, whitened_lowrank
from masa.nn import LowRankLinear

T = TypeVar("T")

MethodFn = Callable[[nn.Module, CalibrationStats, list[str], CompressConfig], dict]
NEEDS = ("grams", "abs_mean", "block_kl", "fisher")  # statistics a method may ask the pipeline to calibrate


@dataclass(frozen=True)
class Method:
    """A registered compression method and the calibration statistics it needs (empty: none)."""

    name: str
    fn: MethodFn
    needs: tuple[str, ...]


_METHODS: dict[str, Method] = {}


def register_method(name: str, needs: tuple[str, ...] = ()) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(model, stats, names, config) -> report`` as method ``name``.

    ``needs`` names the statistics it reads (``grams``, ``abs_mean``, ``block_kl``); a method needing
    none runs without calibration (``stats`` is then None).
    """
    if unknown := [n for n in needs if n not in NEEDS]:
        raise ValueError(f"method {name!r} needs unknown statistics {unknown}; choose from {NEEDS}")

    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[name] = Method(name, fn, tuple(needs))
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The registered method ``name``; raises listing the available ones."""
    if name not in _METHODS:
        raise ValueError(f"unknown compression method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    return sorted(_METHODS)


# ------------------------------------------------------------------------------------ replacement


def replace_with_lowrank(
    model: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Swap module ``name`` for a :class:`LowRankLinear` holding ``up`` (d_out, r) and ``down`` (r, d_in).

    Factors are cast to the replaced weight's dtype and device; a non-finite factor is an error naming
    the layer (never silently replaced). Records the replayable ``factorize`` operation.
    """
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError(
            f"{name}: the low-rank factors hold NaN or inf values; the layer's weight or calibration "
            "statistics are not finite (check the model in float32 and the calibration text)"
        )
    weight, _ = linear_weight(model.get_submodule(name))
    (d_out, rank), (_, d_in) = up.shape, down.shape
    layer = _build_lowrank(name, [d_out, d_in], rank, bias is not None, weight.device, weight.dtype)
    with torch.no_grad():
        layer.up.copy_(up)
        layer.down.copy_(down)
        if bias is not None:
            layer.bias.copy_(bias)
    set_submodule(model, name, layer)
    op = {"op": "factorize", "module": name, "shape": [d_out, d_in], "rank": rank, "bias": bias is not None}
    surgery.record(model, op)


def _build_lowrank(name: str, shape: list[int], rank: int, bias: bool, device, dtype) -> LowRankLinear:
    d_out, d_in = shape
    try:
        return LowRankLinear(d_in, d_out, rank, bias=bias, device=device, dtype=dtype)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


@surgery.register_replay("factorize")
def _replay_factorize(model: nn.Module, op: dict) -> None:
    weight, _ = linear_weight(model.get_submodule(op["module"]))
    layer = _build_lowrank(op["module"], op["shape"], op["rank"], op["bias"], weight.device, weight.dtype)
    set_submodule(model, op["module"], layer)
    surgery.record(model, op)


# ------------------------------------------------------------------------------------------ budget


def allocate_ranks(shapes: dict[str, tuple[int, int, bool]], ratio: float) -> dict[str, int]:
    """Ranks per module (name -> (d_out, d_in, has_bias)) so the targets reach ``ratio`` overall.

    Each module starts at SVD-LLM's r = floor(d_out d_in (1 - CR) / (d_out + d_in)) (an error naming
    the layer below rank 1). That rule ignores the rounding and the kept biases, which on small layers
    miss the ratio by up to (d_out + d_in) / (d_out d_in); the leftover budget is then spent (or
    recovered) one rank at a time, each step on the module it brings closest to the target, so ranks
    of equal-shaped modules differ by at most one.
    """
    ratio = check_ratio(ratio)
    ranks: dict[str, int] = {}
    for name, (d_out, d_in, _) in shapes.items():
        try:
            ranks[name] = rank_for_ratio(d_out, d_in, ratio)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    dense = sum(d_out * d_in + bias * d_out for d_out, d_in, bias in shapes.values())
    target = (1.0 - ratio) * dense
    stored = sum(
        lowrank_params(d_out, d_in, ranks[n]) + bias * d_out for n, (d_out, d_in, bias) in shapes.items()
    )
    adjusted = dict.fromkeys(shapes, 0)
    while True:
        step = 1 if stored < target else -1
        gaps = {  # |stored - target| after one rank step on each module that can take it
            n: abs(stored + step * (d_out + d_in) - target)
            for n, (d_out, d_in, _) in shapes.items()
            if 1 <= ranks[n] + step <= min(d_out, d_in)
        }
        candidates = [n for n, g in gaps.items() if g < abs(stored - target)]
        if not candidates:
            return ranks
        best = min(candidates, key=lambda n: (step * adjusted[n], gaps[n]))  # least-adjusted first
        ranks[best] += step
        adjusted[best] += step
        stored += step * sum(shapes[best][:2])


def options_from_config(cls: type[T], config: CompressConfig) -> T:
    """The options dataclass ``cls`` built from ``config.options``; unknown keys are an error naming the known ones."""
    known = [f.name for f in fields(cls)]
    if unknown := sorted(set(config.options) - set(known)):
        raise ValueError(
            f"method {config.method!r} has no option {unknown}; its options are {', '.join(known)}"
        )
    return cls(**config.options)


def method_options(config: CompressConfig, defaults: dict) -> dict:
    """``config.options`` merged over ``defaults``; unknown keys and wrong types are errors."""
    if unknown := sorted(set(config.options) - set(defaults)):
        raise ValueError(
            f"method {config.method!r} has no option {unknown}; its options are "
            f"{', '.join(f'{k}={v!r}' for k, v in defaults.items()) or 'none'}"
        )
    options = {**defaults, **config.options}
    for key, default in defaults.items():
        value, kind = options[key], type(default)
        ok = (
            isinstance(value, bool)
            if kind is bool
            else isinstance(value, kind) and not isinstance(value, bool)
        )
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            options[key], ok = float(value), True
        if not ok:
            raise ValueError(f"option {key}={value!r} of method {config.method!r} must be a {kind.__name__}")
    return options


# ----------------------------------------------------------------------------------- the methods


def factorize_modules(
    model: nn.Module,
    names: list[str],
    config: CompressConfig,
    transform: Callable[[str, torch.Tensor], torch.Tensor],
    gram_of: Callable[[str], torch.Tensor] | None = None,
) -> dict:
    """Replace each named module by its whitened rank-r truncation; ranks from :func:`allocate_ranks`.

    ``transform(name, weight)`` gives the layer's lower-triangular input transform (d_in, d_in);
    with ``gram_of`` the ``up`` factor is refitted by least squares on the calibration Gram.
    """
    pairs = {name: linear_weight(model.get_submodule(name)) for name in names}
    shapes = {name: (*w.shape, b is not None) for name, (w, b) in pairs.items()}
    ranks = allocate_ranks(shapes, config.ratio)
    for name, (weight, bias) in pairs.items():
        weight = weight.detach()
        try:
            up, down = whitened_lowrank(weight, transform(name, weight), ranks[name])
            if gram_of is not None:
                up = refit_up(weight, down, gram_of(name))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        replace_with_lowrank(model, name, up, down, None if bias is None else bias.detach())
    return {"ranks": ranks}


def refit_up(weight: torch.Tensor, down: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Least-squares ``up`` given ``down``: argmin ||(W - up down) X^T|| = W G down^T (down G down^T)^-1."""
    weight, down, gram = weight.to(torch.float64), down.to(torch.float64), gram.to(torch.float64)
    projected = down @ gram  # (r, d_in)
    system = projected @ down.T  # (r, r), symmetric positive definite when down has full row rank
    return torch.linalg.solve(system, projected @ weight.T).T  # (d_out, r)


def _per_input(fn: Callable[[torch.Tensor], torch.Tensor], source: dict[str, torch.Tensor]) -> Callable:
    """``transform(name, weight)`` computing ``fn`` once per distinct statistics tensor (q/k/v share)."""
    cache: dict[int, torch.Tensor] = {}

    def transform(name: str, weight: torch.Tensor) -> torch.Tensor:
        stat = source[name]
        if id(stat) not in cache:
            cache[id(stat)] = fn(stat)
        return cache[id(stat)]

    return transform


@register_method("svd")
def svd(model: nn.Module, stats: CalibrationStats | None, names: list[str], config: CompressConfig) -> dict:
    """Plain truncated SVD of each weight (no calibration)."""
    method_options(config, {})
    return factorize_modules(model, names, config, lambda name, w: torch.eye(w.shape[1], dtype=torch.float64))


@register_method("asvd", needs=("abs_mean",))
def asvd(model: nn.Module, stats: CalibrationStats, names: list[str], config: CompressConfig) -> dict:
    """ASVD: truncate W diag(s^alpha) with s = mean |x| per input channel, then unscale."""
    alpha = method_options(config, {"alpha": 0.5})["alpha"]

    def scales(abs_mean: torch.Tensor) -> torch.Tensor:
        s = abs_mean.to(torch.float64)
        return torch.diag(s.clamp_min(1e-6 * float(s.max())) ** alpha)  # dead channels keep a tiny scale

    report = factorize_modules(model, names, config, _per_input(scales, stats.abs_mean))
    return {**report, "alpha": alpha}


@register_method("svd-llm", needs=("grams",))
def svd_llm(model: nn.Module, stats: CalibrationStats, names: list[str], config: CompressConfig) -> dict:
    """SVD-LLM: truncate W L (L L^T = X^T X), de-whiten with L^-1; ``refit=True`` refits ``up``."""
    refit = method_options(config, {"refit": False})["refit"]
    gram_of = stats.grams.__getitem__ if refit else None
    report = factorize_modules(model, names, config, _per_input(cholesky_factor, stats.grams), gram_of)
    return {**report, "refit": refit}
