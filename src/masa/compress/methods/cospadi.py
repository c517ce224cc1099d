"""``cospadi``: whitened dictionary learning with sparse codes (CoSpaDi, Shopkhoev et al. 2025).

Orientation (y = W x, W (d_out, d_in)): each output row of the whitened weight W L (L L^T = X^T X,
the group's inputs) is a sparse combination of k dense atoms in the whitened input space,

    W L ~ C A,   A (k, d_in) dense dictionary,   C (d_out, k) with s non-zeros per row,

and the dictionary is de-whitened, D = A L^-1 (the paper's d_in x k dictionary is D^T and its
column-sparse codes are C^T). Stored numbers per matrix: k d_in + s d_out values + s d_out indices,
the indices counted at their byte width relative to one value (``SparseCodeLinear``). ``group_size``
n > 1 stacks the rows of n consecutive blocks' weights over one shared dictionary.

Learning is K-SVD, vectorised over every row and over the groups of one shape: batched OMP with a
progressively grown Cholesky factor (no loop per row), then one power-iteration step per atom (the
rank-1 update of that atom and its codes on the rows using it), ``iterations`` times, keeping the best
fit. The dictionary starts from the top right singular vectors of W L. The knob is s, with
k = ``atoms_per_code`` x s (k/s = 2 by default, the paper's best).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from masa.budget import ALLOCATIONS, Knob, allocate, budget_of
from masa.compress.calibration import CalibrationStats
from masa.compress.config import CompressConfig
from masa.compress.install import Replacement
from masa.compress.layout import Layout
from masa.compress.methods.basis_sharing import Group, block_groups
from masa.compress.registry import method_options, register_method
from masa.nn import index_dtype

MAX_CHOLESKY_NUMBERS = 2**25  # OMP's factors (rows x s x s) held at once; larger batches are split


# ---------------------------------------------------------------------------------------- K-SVD


def batch_omp(signals: torch.Tensor, atoms: torch.Tensor, sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for every row at once (Batch-OMP, Rubinstein et al. 2008).

    signals (B, m, d), atoms (B, k, d) -> indices (B, m, s) and values (B, m, s), the least-squares
    coefficients of each row on its s chosen atoms. The inverse Cholesky factor of the chosen atoms'
    Gram matrix grows by one row per step, so every step is a few batched matrix products.
    """
    gram = atoms @ atoms.mT  # (B, k, k)
    alpha = signals @ atoms.mT  # (B, m, k): correlations with the atoms
    (batch, rows, k), s = alpha.shape, sparsity
    indices = torch.zeros(batch, rows, s, dtype=torch.long, device=alpha.device)
    inverse = alpha.new_zeros(batch, rows, s, s)  # L^-1 with L L^T = gram[I][:, I]
    z = alpha.new_zeros(batch, rows, s)  # L^-1 alpha[I]; the coefficients are L^-T z
    taken = torch.zeros_like(alpha, dtype=torch.bool)
    residual_corr = alpha
    diagonal = gram.diagonal(dim1=-2, dim2=-1)  # (B, k)
    for j in range(s):
        pick = residual_corr.abs().masked_fill(taken, -1.0).argmax(-1)  # (B, m)
        taken.scatter_(-1, pick[..., None], True)
        indices[..., j] = pick
        overlap = gram.gather(1, pick[..., None].expand(-1, -1, k)).gather(-1, indices[..., :j])  # (B, m, j)
        w = (inverse[..., :j, :j] @ overlap[..., None])[..., 0]  # (B, m, j): L^-1 gram[I, pick]
        delta = (diagonal.gather(-1, pick) - w.square().sum(-1)).clamp_min(1e-10).sqrt()  # (B, m)
        inverse[..., j, :j] = -(w[..., None, :] @ inverse[..., :j, :j])[..., 0, :] / delta[..., None]
        inverse[..., j, j] = 1.0 / delta
        z[..., j] = (alpha.gather(-1, pick[..., None])[..., 0] - (w * z[..., :j]).sum(-1)) / delta
        values = (z[..., None, : j + 1] @ inverse[..., : j + 1, : j + 1])[..., 0, :]  # (B, m, j+1)
        if j + 1 < s:
            dense = alpha.new_zeros(alpha.shape).scatter(-1, indices[..., : j + 1], values)  # (B, m, k)
            residual_corr = alpha - dense @ gram
    return indices, values


def _omp(signals: torch.Tensor, atoms: torch.Tensor, sparsity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`batch_omp` over chunks of rows that bound the memory of the Cholesky factors."""
    step = max(1, MAX_CHOLESKY_NUMBERS // (signals.shape[0] * sparsity * sparsity))
    parts = [batch_omp(chunk, atoms, sparsity) for chunk in signals.split(step, dim=1)]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def _codes(indices: torch.Tensor, values: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """Dense codes (B, m, k) from indices and values (B, m, s)."""
    return values.new_zeros(*values.shape[:-1], n_atoms).scatter(-1, indices, values)


def _update_atoms(
    signals: torch.Tensor, atoms: torch.Tensor, codes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-SVD's dictionary step: atom by atom, one power-iteration step on the residual of the rows
    using it (codes keep their support); an unused atom restarts at the worst-fitted row."""
    atoms, codes = atoms.clone(), codes.clone()
    residual = signals - codes @ atoms  # (B, m, d)
    for j in range(atoms.shape[1]):
        c, a = codes[..., j], atoms[:, j]  # (B, m), (B, d)
        direction = (c[:, None, :] @ residual)[:, 0] + a * c.square().sum(-1, keepdim=True)  # E_j^T c
        norm = direction.norm(dim=-1, keepdim=True)
        worst = residual.gather(
            1, residual.norm(dim=-1).argmax(-1)[:, None, None].expand(-1, 1, residual.shape[-1])
        )[:, 0]
        unused = norm <= 1e-12 * (1.0 + a.norm(dim=-1, keepdim=True))
        new = torch.where(unused, worst, direction)
        new = new / new.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, d)
        used = c != 0
        new_c = torch.where(
            used, (residual @ new[..., None])[..., 0] + c * (a * new).sum(-1, keepdim=True), 0.0
        )
        residual += c[..., None] * a[:, None] - new_c[..., None] * new[:, None]
        atoms[:, j], codes[..., j] = new, new_c
    return atoms, codes


def _initial_atoms(signals: torch.Tensor, n_atoms: int, generator: torch.Generator) -> torch.Tensor:
    """Top right singular vectors of each batch item, then random rows of it (unit norm): (B, k, d)."""
    _, _, vh = torch.linalg.svd(signals, full_matrices=False)  # (B, r, d)
    atoms = vh[:, :n_atoms]
    if (extra := n_atoms - atoms.shape[1]) > 0:
        rows = torch.randint(signals.shape[1], (extra,), generator=generator)
        picked = signals[:, rows] + 1e-3 * signals.norm(dim=-1).mean() * torch.randn(
            signals.shape[0], extra, signals.shape[-1], generator=generator, dtype=signals.dtype
        ).to(signals.device)
        atoms = torch.cat([atoms, picked / picked.norm(dim=-1, keepdim=True).clamp_min(1e-30)], 1)
    return atoms


def ksvd(
    signals: torch.Tensor, n_atoms: int, sparsity: int, iterations: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dictionary (B, k, d) and sparse codes (indices, values (B, m, s)) with signals ~ codes @ atoms.

    Runs in float32, keeps the best iterate per batch item and refits the final codes in float64.
    """
    work = signals.to(torch.float32)
    atoms = _initial_atoms(work, n_atoms, torch.Generator().manual_seed(seed))
    best_atoms, best_error = atoms, torch.full((len(work),), math.inf)
    for _ in range(iterations):
        indices, values = _omp(work, atoms, sparsity)
        codes = _codes(indices, values, n_atoms)
        error = (work - codes @ atoms).square().sum((1, 2)).cpu()  # (B,)
        better = error < best_error
        best_atoms = torch.where(better[:, None, None].to(atoms.device), atoms, best_atoms)
        best_error = torch.minimum(error, best_error)
        atoms, _ = _update_atoms(work, atoms, codes)
    atoms = best_atoms.to(torch.float64)
    indices, values = _omp(signals.to(torch.float64), atoms, sparsity)
    return atoms, indices, values


# ----------------------------------------------------------------------------------------- options


@dataclass
class CospadiOptions:
    """Options of ``cospadi``.

    Attributes:
        atoms_per_code: k / s, atoms per non-zero of a code (the paper: 2 works best).
        iterations: K-SVD iterations (the paper: about 60).
        group_size: consecutive blocks sharing one dictionary per role (1: one dictionary per layer).
        allocation: ``uniform`` or ``whitened-error`` (s per matrix by the whitened spectrum, as a proxy).
    """

    atoms_per_code: int = 2
    iterations: int = 60
    group_size: int = 1
    allocation: str = "uniform"

    def __post_init__(self):
        for name in ("atoms_per_code", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"option {name} (k/s for atoms_per_code) must be an int >= 1, got {value!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"option allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")


# ---------------------------------------------------------------------------------------- budget


def _index_numbers(d_out: int, indices: torch.dtype, values: torch.dtype) -> int:
    """Stored numbers of one code index per output row: bytes of an index / bytes of a value."""
    return math.ceil(d_out * indices.itemsize / values.itemsize)


def _knob(group: Group, ks: int, spectra: bool, value_dtype: torch.dtype) -> tuple[Knob, torch.dtype]:
    """The sparsity s of a group (k = ks s) and the index dtype its largest setting needs."""
    (d_out, d_in), n = group.shape, len(group.names)
    fixed = n * d_out * group.bias
    dense = n * d_out * d_in + fixed
    widest = index_dtype(ks * max(1, min(d_in, dense // (ks * d_in))))  # k can never exceed this
    cost = ks * d_in + n * (d_out + _index_numbers(d_out, widest, value_dtype))
    high = max(1, min(d_in, math.ceil((dense - fixed) / cost) - 1))
    gains = None
    if spectra:  # proxy: a step adds ks atoms, worth the next ks squared whitened singular values
        sigma2 = torch.linalg.svdvals(group.stacked()).square()
        padded = torch.cat([sigma2, sigma2.new_zeros(ks * high)])
        gains = padded[ks : ks * high].reshape(high - 1, ks).sum(-1)  # step s -> s + 1: atoms ks s ..
    return Knob(cost, dense, fixed, 1, high, gains), widest


def _sparsities(groups: list[Group], options: CospadiOptions, ratio: float, dtype) -> tuple[dict, dict]:
    """s per group, and the index dtype of each; errors say which knob cannot meet the ratio."""
    planned = {
        f"group{i}": _knob(g, options.atoms_per_code, options.allocation == "whitened-error", dtype)
        for i, g in enumerate(groups)
    }
    knobs = {key: knob for key, (knob, _) in planned.items()}
    try:
        steps = allocate(knobs, ratio, options.allocation)
    except ValueError as err:
        raise ValueError(
            f"cospadi with k/s = {options.atoms_per_code} cannot reach ratio {ratio:.3f}: even s = 1 "
            f"(k = {options.atoms_per_code}) per matrix stores too much ({err}); lower the ratio or k/s"
        ) from err
    spent = sum(steps[key] * k.cost for key, k in knobs.items())
    if budget_of(knobs, ratio) - spent > 0.01 * sum(k.dense for k in knobs.values()):
        raise ValueError(
            f"cospadi cannot keep enough at ratio {ratio:.3f}: the densest codes it allows (s <= d_in and "
            "fewer stored numbers than the dense matrix) fall more than 1 % short; raise the ratio"
        )
    return steps, {key: widest for key, (_, widest) in planned.items()}


def _fit(
    groups: list[Group], sparsity: dict[str, int], options: CospadiOptions, seed: int
) -> dict[str, tuple]:
    """K-SVD per group, batched over the groups of equal shape and knob: key -> (atoms, indices, values)."""
    batches: dict[tuple, list[str]] = {}
    for i, group in enumerate(groups):
        batches.setdefault((group.shape, len(group.names), sparsity[f"group{i}"]), []).append(f"group{i}")
    fits = {}
    for (_, _, s), keys in batches.items():
        members = [groups[int(key.removeprefix("group"))] for key in keys]
        signals = torch.stack([g.stacked() for g in members])  # (B, n d_out, d_in), whitened
        atoms, indices, values = ksvd(signals, options.atoms_per_code * s, s, options.iterations, seed)
        for key, group, a, idx, val in zip(keys, members, atoms, indices, values, strict=True):
            dictionary = torch.linalg.solve_triangular(group.chol, a, upper=False, left=False)  # A L^-1
            fits[key] = (dictionary, idx, val)
    return fits


@register_method("cospadi", needs=("grams",), options=CospadiOptions)
def cospadi(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """Whitened K-SVD dictionaries with sparse codes per layer or group of blocks (module docstring)."""
    options = method_options(CospadiOptions, config)
    groups, _ = block_groups(layout, stats, options.group_size, None, config.method)
    sparsity, widths = _sparsities(groups, options, config.ratio, layout.targets[0].weight.dtype)
    fits = _fit(groups, sparsity, options, config.seed)
    specs, tensors = [], {}
    for i, group in enumerate(groups):
        key, s = f"group{i}", sparsity[f"group{i}"]
        specs.append(
            group.spec(
                atoms=options.atoms_per_code * s,
                sparsity=s,
                indices_dtype=str(widths[key]).removeprefix("torch."),
            )
        )
        dictionary, indices, values = fits[key]  # (k, d_in), (n d_out, s), (n d_out, s)
        tensors[f"{group.names[0]}.basis.weight"] = dictionary
        rows = group.shape[0]
        for t, idx, val in zip(group.targets, indices.split(rows), values.split(rows), strict=True):
            tensors[f"{t.name}.indices"] = idx
            tensors[f"{t.name}.values"] = val
            if t.bias is not None:
                tensors[f"{t.name}.bias"] = t.bias
    report = {
        "allocation": options.allocation,
        "iterations": options.iterations,
        "atoms_per_code": options.atoms_per_code,
        "groups": [
            {"role": s["role"], "members": s["members"], "atoms": s["atoms"], "sparsity": s["sparsity"]}
            for s in specs
        ],
    }
    return Replacement([{"op": "sparse_code", "groups": specs}], tensors, report)
