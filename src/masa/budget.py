"""Budget arithmetic shared by every method: how many atoms or what rank meets a compression ratio.

Accounting (DESIGN 2.4): CR = 1 - stored numbers after / stored numbers before, over the targeted
weights only. Shared atoms count once; per-block coefficients count. Biases are kept by every method
and appear on both sides, so they are left out of the knob arithmetic (``masa.count`` reports the
ratio actually reached, biases included).
"""

from __future__ import annotations

import math


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
