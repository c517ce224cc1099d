"""Budget allocation across matrices and blocks: ``--option allocation=uniform|whitened-error``.

Every method spends one global budget (DESIGN 2.4: (1 - CR) x the targeted dense numbers). A method
exposes it as integer *knobs* (a rank, a shared basis size, a sparsity), each with a cost in stored
numbers per step. ``uniform`` gives every knob the same fraction of its own dense size (equal-shaped
modules differ by at most one step); ``whitened-error`` hands out steps greedily, largest whitened error
removed per stored number first, where a step's gain is the next squared singular value of the knob's
whitened matrix (exact for truncated SVD in the whitened space, a proxy for sparse codes).

The low-rank methods (``svd``, ``asvd``, ``svd-llm``, ``fwsvd``) factorise every module on its own, so
an allocated budget is applied by running the method module by module at the ratio that gives each
module its allocated rank (:func:`allocated`); the chosen ranks land in the method's report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from masa.arch import linear_weight
from masa.budget import check_ratio
from masa.compress.calibration import CalibrationStats
from masa.compress.config import CompressConfig
from masa.compress.methods import Method, MethodFn, get_method, register_method
from masa.compress.whitening import cholesky_factor

ALLOCATIONS = ("uniform", "whitened-error")


@dataclass
class Knob:
    """One integer budget knob of a method.

    Attributes:
        cost: stored numbers per step (a rank of a (d_out, d_in) matrix costs d_out + d_in).
        dense: stored numbers of what the knob's modules replace (biases included).
        fixed: stored numbers kept whatever the knob (biases).
        low, high: allowed range of the knob (inclusive).
        gains: whitened error removed by each step above ``low`` (non-increasing, length high - low);
            None for ``uniform``.
    """

    cost: int
    dense: int
    fixed: int = 0
    low: int = 1
    high: int = 1
    gains: torch.Tensor | None = None

    def __post_init__(self):
        if self.cost < 1 or not 0 <= self.low <= self.high:
            raise ValueError(f"a knob needs cost >= 1 and 0 <= low <= high, got {self}")


def split_allocation(config: CompressConfig) -> tuple[str, CompressConfig]:
    """The ``allocation`` option (default ``uniform``) and the config without it."""
    options = dict(config.options)
    allocation = options.pop("allocation", "uniform")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"option allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    return allocation, replace(config, options=options)


def budget_of(knobs: dict[str, Knob], ratio: float) -> int:
    """Stored numbers the knobs may spend in total: (1 - CR) x dense, less what is fixed."""
    ratio = check_ratio(ratio)
    return math.floor((1.0 - ratio) * sum(k.dense for k in knobs.values())) - sum(
        k.fixed for k in knobs.values()
    )


def allocate(knobs: dict[str, Knob], ratio: float, allocation: str = "uniform") -> dict[str, int]:
    """Steps per knob spending the budget of ``ratio`` as ``allocation`` says (module docstring).

    Ends as close to the budget as one step allows (possibly half a step over, as ``allocate_ranks``
    does); raises when even every knob at its lowest value exceeds the budget.
    """
    budget = budget_of(knobs, ratio)
    floor = sum(k.low * k.cost for k in knobs.values())
    if floor > budget:
        raise ValueError(
            f"ratio {ratio:.3f} leaves {budget:,} stored numbers but the smallest setting of the "
            f"{len(knobs)} modules needs {floor:,}: lower the ratio"
        )
    if allocation == "uniform":
        start = {
            n: min(k.high, max(k.low, math.floor(((1.0 - ratio) * k.dense - k.fixed) / k.cost)))
            for n, k in knobs.items()
        }
        gains = {
            n: 1.0 / torch.arange(1, k.high - start[n] + 1, dtype=torch.float64) for n, k in knobs.items()
        }
    elif allocation == "whitened-error":
        start = {n: k.low for n, k in knobs.items()}
        gains = {n: _checked_gains(n, k) for n, k in knobs.items()}
    else:
        raise ValueError(f"allocation {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    spent = sum(start[n] * k.cost for n, k in knobs.items())
    if spent > budget:  # knobs clamped at their lowest value overspent: take steps back
        return _recover(knobs, start, spent - budget)
    return _greedy(knobs, start, gains, budget - spent)


def _checked_gains(name: str, knob: Knob) -> torch.Tensor:
    if knob.gains is None or len(knob.gains) < knob.high - knob.low:
        raise ValueError(f"{name}: whitened-error allocation needs a gain per step ({knob.high - knob.low})")
    return knob.gains[: knob.high - knob.low].to(torch.float64)


def _greedy(knobs: dict[str, Knob], steps: dict[str, int], gains: dict[str, torch.Tensor], left: int) -> dict:
    """Add steps by largest gain per stored number while ``left`` lasts, then one more if it lands closer."""
    names = list(knobs)
    costs = torch.tensor([knobs[n].cost for n in names], dtype=torch.float64)
    owner = torch.cat([torch.full((len(gains[n]),), i) for i, n in enumerate(names)])  # (items,)
    per_number = torch.cat([gains[n] / knobs[n].cost for n in names])  # (items,)
    order = per_number.argsort(descending=True, stable=True)  # a knob's steps stay in order (non-increasing)
    item_cost = costs[owner[order]]
    taken = int(torch.searchsorted(item_cost.cumsum(0), left, right=True))
    steps = dict(steps)
    for i in owner[order[:taken]].tolist():
        steps[names[i]] += 1
    left -= int(item_cost[:taken].sum())
    closed: set[int] = set()
    for i in owner[order[taken:]].tolist():  # cheaper steps of other knobs may still fit
        cost = knobs[names[i]].cost
        if i not in closed and cost <= left:
            steps[names[i]], left = steps[names[i]] + 1, left - cost
        else:
            closed.add(i)  # a knob's later steps never come before its earlier ones
    nxt = [n for n in names if steps[n] < knobs[n].high and knobs[n].cost < 2 * left]
    if nxt:  # half a step over is closer to the target than the leftover under it
        best = min(nxt, key=lambda n: knobs[n].cost)
        steps[best] += 1
    return steps


def _recover(knobs: dict[str, Knob], steps: dict[str, int], excess: int) -> dict[str, int]:
    """Take steps back, largest knob first, until the budget holds."""
    steps = dict(steps)
    while excess > 0:
        name = max((n for n in knobs if steps[n] > knobs[n].low), key=lambda n: steps[n] * knobs[n].cost)
        steps[name] -= 1
        excess -= knobs[name].cost
    return steps


# ------------------------------------------------------------------------------------ low-rank methods


def max_useful_rank(d_out: int, d_in: int) -> int:
    """Largest rank whose factors store fewer numbers than the dense matrix (so the ratio stays > 0)."""
    return max(1, min(d_out, d_in, math.ceil(d_out * d_in / (d_out + d_in)) - 1))


def rank_knobs(
    model: nn.Module, names: list[str], stats: CalibrationStats | None, spectra: bool
) -> dict[str, Knob]:
    """A rank knob per module; with ``spectra`` its gains are the squared singular values of W L
    (L the Cholesky factor of the module's calibration Gram; the identity without statistics)."""
    knobs, factors = {}, {}
    for name in names:
        weight, bias = linear_weight(model.get_submodule(name))
        d_out, d_in = weight.shape
        fixed = 0 if bias is None else d_out
        gains = None
        if spectra:
            weight = weight.detach().to(torch.float64)
            if stats is not None:
                gram = stats.grams[name]
                if id(gram) not in factors:  # q/k/v share one input
                    factors[id(gram)] = cholesky_factor(gram)
                weight = weight @ factors[id(gram)]
            gains = torch.linalg.svdvals(weight).square()[1:]  # rank 1 is the floor; gains of ranks 2..
        knobs[name] = Knob(d_out + d_in, d_out * d_in + fixed, fixed, 1, max_useful_rank(d_out, d_in), gains)
    return knobs


def ratio_for_rank(knob: Knob, rank: int) -> float:
    """The single-module ratio at which ``allocate_ranks`` gives exactly ``rank``."""
    return 1.0 - (rank * knob.cost + knob.fixed) / knob.dense


def apply_ranks(
    fn: MethodFn,
    model: nn.Module,
    stats: CalibrationStats | None,
    knobs: dict[str, Knob],
    ranks: dict[str, int],
    config: CompressConfig,
) -> dict:
    """Run the per-module low-rank method ``fn`` on each module of ``ranks`` at the ratio of its rank."""
    report: dict = {}
    for name, rank in ranks.items():
        part = fn(model, stats, [name], replace(config, ratio=ratio_for_rank(knobs[name], rank)))
        report = {**part, **report, "ranks": {**report.get("ranks", {}), **part["ranks"]}}
    return report


def allocated(method: Method) -> Method:
    """``method`` (a per-module low-rank method) taking ``allocation=uniform|whitened-error``."""

    def fn(
        model: nn.Module, stats: CalibrationStats | None, names: list[str], config: CompressConfig
    ) -> dict:
        allocation, config = split_allocation(config)
        if allocation == "uniform":
            return {**method.fn(model, stats, names, config), "allocation": allocation}
        knobs = rank_knobs(model, names, stats, spectra=True)
        ranks = allocate(knobs, config.ratio, allocation)
        report = apply_ranks(method.fn, model, stats, knobs, ranks, config)
        return {**report, "allocation": allocation}

    fn.__doc__ = method.fn.__doc__
    return Method(method.name, fn, method.needs)


def register_allocation(name: str) -> None:
    """Give the registered low-rank method ``name`` the ``allocation`` option (re-registers it)."""
    method = get_method(name)
    wrapped = allocated(method)
    register_method(name, method.needs)(wrapped.fn)


for _name in ("svd", "asvd", "svd-llm"):
    register_allocation(_name)
