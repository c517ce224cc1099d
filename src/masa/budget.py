"""The budget: how a compression ratio becomes integer knobs (atoms, ranks, basis sizes, sparsities).

Accounting (``docs/compression.md``): CR = 1 - stored numbers after / stored numbers before,
over the targeted weights only. Shared atoms count once; per-block coefficients and kept biases count.

Every method states its knobs as :class:`Knob` s (cost per step in stored numbers, the dense numbers
replaced, what is kept fixed, the allowed range, and optionally the error each step removes) and
:func:`allocate` turns the ratio into steps, once:
  * ``uniform``: every knob starts at SVD-LLM's share, floor((1 - CR) (dense - fixed) / cost), and the
    budget's rounding is then spent (or recovered) one step at a time, each on the knob that brings the
    total closest to the target, least-adjusted knobs first (equal knobs differ by at most one step);
  * ``whitened-error``: steps go greedily to the largest error removed per stored number (a knob's
    later steps never before its earlier ones), then half a step over if that lands closer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALLOCATIONS = ("uniform", "whitened-error")


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio: it must lie strictly between 0 and 1."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(
            f"compression ratio {ratio!r} is outside (0, 1): pass the fraction of parameters to remove, "
            "e.g. 0.2 to keep 80 %"
        )
    return float(ratio)


def shared_params(n_blocks: int, d_out: int, d_in: int, n_atoms: int) -> int:
    """Stored numbers of one dictionary serving n_blocks: S atoms plus S coefficients per block."""
    return n_atoms * (d_out * d_in + n_blocks)


def shared_ratio(n_blocks: int, d_out: int, d_in: int, n_atoms: int) -> float:
    """Compression ratio of sharing n_blocks weights of shape (d_out, d_in) through n_atoms atoms."""
    return 1.0 - shared_params(n_blocks, d_out, d_in, n_atoms) / (n_blocks * d_out * d_in)


def atoms_for_ratio(n_blocks: int, d_out: int, d_in: int, ratio: float) -> int:
    """Atoms S whose ratio is closest to ``ratio``: S = round(L d_out d_in (1 - CR) / (d_out d_in + L)).

    Raises when the ratio would need fewer than one atom; caps S at n_blocks (full reconstruction).
    """
    ratio = check_ratio(ratio)
    exact = n_blocks * d_out * d_in * (1.0 - ratio) / (d_out * d_in + n_blocks)
    n_atoms = min(n_blocks, int(math.floor(exact + 0.5)))
    if n_atoms < 1:
        raise ValueError(
            f"ratio {ratio:.3f} needs {exact:.2f} atoms for a group of {n_blocks} blocks; at least one atom "
            f"is needed (best reachable: {shared_ratio(n_blocks, d_out, d_in, 1):.3f}): lower the ratio or "
            "use larger groups"
        )
    return n_atoms


def lowrank_params(d_out: int, d_in: int, rank: int) -> int:
    """Stored numbers of a rank-r factorisation A (d_out x r) B (r x d_in)."""
    return rank * (d_out + d_in)


def rank_for_ratio(d_out: int, d_in: int, ratio: float) -> int:
    """Rank r = floor(d_out d_in (1 - CR) / (d_out + d_in)) (SVD-LLM's rule); raises below rank 1."""
    ratio = check_ratio(ratio)
    exact = d_out * d_in * (1.0 - ratio) / (d_out + d_in)
    rank = int(math.floor(exact))
    if rank < 1:
        raise ValueError(
            f"ratio {ratio:.3f} leaves rank {exact:.2f} < 1 for a {d_out}x{d_in} weight: lower the ratio "
            f"(at most {1.0 - (d_out + d_in) / (d_out * d_in):.3f} for this shape)"
        )
    return min(rank, min(d_out, d_in))


def max_useful_rank(d_out: int, d_in: int) -> int:
    """Largest rank whose factors store fewer numbers than the dense matrix (so the ratio stays > 0)."""
    return max(1, min(d_out, d_in, math.ceil(d_out * d_in / (d_out + d_in)) - 1))


@dataclass
class Knob:
    """One integer budget knob of a method.

    Attributes:
        cost: stored numbers per step (a rank of a (d_out, d_in) matrix costs d_out + d_in).
        dense: stored numbers of what the knob's modules replace (biases included).
        fixed: stored numbers kept whatever the knob (biases).
        low, high: allowed range of the knob (inclusive).
        gains: whitened error removed by each step above ``low`` (non-increasing); ``whitened-error``
            takes at most ``len(gains)`` steps (a rank whose factors store as much as the dense matrix
            gains nothing); None for ``uniform``.
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


def budget_of(knobs: dict[str, Knob], ratio: float) -> int:
    """Stored numbers the knobs may spend in total: (1 - CR) x dense, less what is fixed."""
    ratio = check_ratio(ratio)
    return math.floor((1.0 - ratio) * sum(k.dense for k in knobs.values())) - sum(
        k.fixed for k in knobs.values()
    )


def check_allocation(allocation: str) -> str:
    if allocation not in ALLOCATIONS:
        raise ValueError(f"option allocation={allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    return allocation


def allocate(knobs: dict[str, Knob], ratio: float, allocation: str = "uniform") -> dict[str, int]:
    """Steps per knob spending the budget of ``ratio`` as ``allocation`` says (module docstring).

    Raises naming the knob when ``uniform`` leaves one below its lowest setting, and when even every
    knob at its lowest setting exceeds the budget.
    """
    ratio, allocation = check_ratio(ratio), check_allocation(allocation)
    if allocation == "uniform":
        return _uniform(knobs, ratio)
    budget = budget_of(knobs, ratio)
    floor = sum(k.low * k.cost for k in knobs.values())
    if floor > budget:
        raise ValueError(
            f"ratio {ratio:.3f} leaves {budget:,} stored numbers but the smallest setting of the "
            f"{len(knobs)} modules needs {floor:,}: lower the ratio"
        )
    steps = {n: k.low for n, k in knobs.items()}
    gains = {n: _checked_gains(n, k) for n, k in knobs.items()}
    return _greedy(knobs, steps, gains, budget - sum(k.low * k.cost for k in knobs.values()))


def _uniform(knobs: dict[str, Knob], ratio: float) -> dict[str, int]:
    steps: dict[str, int] = {}
    for name, k in knobs.items():
        exact = (1.0 - ratio) * (k.dense - k.fixed) / k.cost
        if math.floor(exact) < k.low:
            most = 1.0 - (k.low * k.cost + k.fixed) / k.dense
            raise ValueError(
                f"{name}: ratio {ratio:.3f} leaves rank {exact:.2f} < {k.low} (its smallest setting): lower "
                f"the ratio (at most {most:.3f} for this layer)"
            )
        steps[name] = min(k.high, math.floor(exact))
    target = (1.0 - ratio) * sum(k.dense for k in knobs.values())
    stored = sum(steps[n] * k.cost + k.fixed for n, k in knobs.items())
    adjusted = dict.fromkeys(knobs, 0)
    while True:
        step = 1 if stored < target else -1
        gaps = {  # |stored - target| after one step on each knob that can take it
            n: abs(stored + step * k.cost - target)
            for n, k in knobs.items()
            if k.low <= steps[n] + step <= k.high
        }
        candidates = [n for n, gap in gaps.items() if gap < abs(stored - target)]
        if not candidates:
            return steps
        best = min(candidates, key=lambda n: (step * adjusted[n], gaps[n]))  # least-adjusted first
        steps[best] += step
        adjusted[best] += step
        stored += step * knobs[best].cost


def rank_knob(d_out: int, d_in: int, bias: bool, gains: torch.Tensor | None = None) -> Knob:
    """The rank of one (d_out, d_in) factorisation as a knob, from 1 to full rank (which a tiny ratio
    needs to reproduce the layer; the ratio check then tells whether the budget was met)."""
    fixed = d_out if bias else 0
    return Knob(d_out + d_in, d_out * d_in + fixed, fixed, 1, min(d_out, d_in), gains)


def _checked_gains(name: str, knob: Knob) -> torch.Tensor:
    """The gains of the steps worth taking (at most up to ``high``); a knob's greedy steps end there."""
    if knob.gains is None:
        raise ValueError(f"{name}: whitened-error allocation needs the error each step removes")
    return knob.gains[: knob.high - knob.low].to(torch.float64)


def _greedy(knobs: dict[str, Knob], steps: dict[str, int], gains: dict[str, torch.Tensor], left: int) -> dict:
    """Add steps by largest gain per stored number while ``left`` lasts, then one more if it lands closer."""
    names = list(knobs)
    costs = [knobs[n].cost for n in names]
    taken, left = spend(costs, [gains[n] for n in names], [steps[n] for n in names], left)
    steps = dict(zip(names, taken, strict=True))
    nxt = [n for n in names if steps[n] < knobs[n].low + len(gains[n]) and knobs[n].cost < 2 * left]
    if nxt:  # half a step over is closer to the target than the leftover under it
        best = min(nxt, key=lambda n: knobs[n].cost)
        steps[best] += 1
    return steps


def spend(costs: list[int], gains: list[torch.Tensor], steps: list[int], left: int) -> tuple[list[int], int]:
    """Greedy steps: largest gain per stored number first while ``left`` lasts; a knob's later steps never
    come before its earlier ones (its gains are non-increasing). Returns the steps and what is left."""
    cost_t = torch.tensor(costs, dtype=torch.float64)
    owner = torch.cat([torch.full((len(g),), i) for i, g in enumerate(gains)])  # (items,)
    per_number = torch.cat([g.to(torch.float64) / c for g, c in zip(gains, costs, strict=True)])  # (items,)
    order = per_number.argsort(descending=True, stable=True)
    item_cost = cost_t[owner[order]]
    taken = int(torch.searchsorted(item_cost.cumsum(0), left, right=True))
    steps = list(steps)
    for i in owner[order[:taken]].tolist():
        steps[i] += 1
    left -= int(item_cost[:taken].sum())
    closed: set[int] = set()
    cheapest = min(costs, default=0)
    for i in owner[order[taken:]].tolist():  # cheaper steps of other knobs may still fit
        if left < cheapest:
            break
        if i not in closed and costs[i] <= left:
            steps[i], left = steps[i] + 1, left - costs[i]
        else:
            closed.add(i)
    return steps, left
