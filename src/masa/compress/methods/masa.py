"""``masa`` compression: matrix atoms shared across blocks, plus whitened low-rank corrections.

For each targeted projection role and each group of consecutive blocks (one dictionary each):

    W_l  ~  sum_s c[l, s] D_s  +  U_l V_l        (S atoms shared by the group, rank-r_l correction)

1. Groups: ``auto`` cuts the blocks where the logit-lens drift between consecutive blocks is largest
   (equal consecutive groups for encoders); the number of groups per role is the candidate with the
   least whitened error. An int asks for equal groups, lists name them.
2. Atoms: uncentred matrix PCA of the group's weights in the whitened space of the group's mean Gram
   (G_bar = L_bar L_bar^T): atoms E_s of {W_l L_bar}, mapped back as D_s = E_s L_bar^-1.
3. Coefficients: refit per block by least squares in that block's whitened space,
   min_c ||(W_l - sum_s c_s D_s) L_l||_F (an S x S solve), so a shared atom serves each block's inputs.
   Both steps work in the span of the group's weights: an atom is a combination sum_j a_j W_j, so the
   PCA's Gram and every block's least-squares system are quadratic forms in the n x n matrices of
   whitened inner products <W_j L_l, W_k L_l> (``cross_products``, once per role). Neither the mean
   Gram nor its factor is formed, the atoms are built only for the chosen S, and every candidate
   grouping reads the same products; only the residual spectra need (d_out, d_in) work per tried S.
4. Correction: the block's residual gets SVD-LLM's whitened truncation (``whitened_lowrank``).
5. Budget (the accounting of docs/compression.md, biases kept and counted as ``masa.compress`` counts them): each role keeps
   (1 - CR) of its size, tilted by ``role_weights`` (Q and O 1.5 x by default, as the paper gives them
   more rank). Per group S runs from 0 (no atoms: SVD-LLM with ranks pooled over the group's blocks)
   to what the group's share affords, the rank left over going to the largest residual singular
   values of its blocks; the S of least whitened error wins. S is searched on a grid (0, 1, 2, 4, ...,
   the most) refined around the best count, scored in float32, and the winner's spectra recomputed in
   float64 (``_atom_counts``, ``_fit_unit``). A count is dropped as soon as the blocks scored so far,
   given the whole budget, already lose to a count scored before (a lower bound of its error), and a
   candidate grouping as soon as its groups can no longer beat the grouping before it (step 1). The
   budget's rounding left over goes to the best further ranks of any layer.
6. Objective: sum over roles of weight x whitened error / whitened energy (errors of different roles
   live on different scales). When SVD-LLM, with its own ranks at the same ratio, scores better on it
   (rank rounding on tiny layers, or the role tilt on blocks that share nothing), ``masa`` runs
   SVD-LLM instead and says so (``fallback``): it is never worse than SVD-LLM on its objective.

Measured on the tiny test models (llama, gpt2, opt, bert; d = 32, ratios 0.2 / 0.4 / 0.6, attention,
calibration 16 x 16 random tokens; numbers are masa's objective / SVD-LLM's, geometric means):
  * independent random blocks (4): atoms never pay (S = 0 except once); pooling ranks over a group's
    blocks gives 0.98 (0.95-1.00) at equal role weights, SVD-LLM kept in 3 of 12 cases by the
    fallback; with the default Q/O tilt SVD-LLM's uniform ranks score better in all 12 (fallback);
  * blocks sharing structure (8 blocks mixing k = 1-4 base blocks plus 10-100 % noise, 72 cases):
    S >= 1 on most roles, 0.069 at equal weights (0.001 for near-copies, 0.4-0.7 for 3 bases plus
    100 % noise); 0.093 with the default tilt;
  * PCA variant: mean-Gram whitened atoms vs raw-weight atoms (both with the whitened refit) is a tie
    here (0.0691 vs 0.0688; each wins about half the cases, by < 5 % typically and up to 2.5 x for the
    whitened atoms). The whitened ones are kept: they target output error, and real models' inputs
    are far less isotropic than these random ones (untested here).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from masa.budget import spend
from masa.compress.calibration import CalibrationStats
from masa.compress.calibration.gram_files import same_input
from masa.compress.config import CompressConfig
from masa.compress.factors import FactorStore
from masa.compress.install import Replacement, lowrank_replacement
from masa.compress.layout import Layout
from masa.compress.methods.lowrank import choose_ranks, truncate
from masa.compress.registry import method_options, register_method
from masa.compress.whitening import damped_cholesky, squared_singular_values, whiten, whitened_lowrank
from masa.sharing.surgery import DictionaryPlan, resolve_groups

# ------------------------------------------------------------------------------------------ options


@dataclass
class MasaOptions:
    """Options of the ``masa`` method (``CompressConfig.options``).

    Attributes:
        groups: ``"auto"`` (cut at the largest logit-lens drifts; count chosen by whitened error), an
            int (that many equal groups of consecutive blocks) or explicit lists of block indices.
        max_groups: most groups ``auto`` tries per role (capped at half the blocks).
        kl_threshold: with ``auto``, cut wherever the drift exceeds this instead of searching.
        role_weights: role -> weight (default 1.0). A role keeps (1 - CR) x weight / mean weight of its
            size (so more atoms or rank), and its relative whitened error counts weight-fold.
    """

    groups: str | int | list[list[int]] = "auto"
    max_groups: int = 4
    kl_threshold: float | None = None
    role_weights: dict[str, float] = field(default_factory=lambda: {"q": 1.5, "o": 1.5})

    def __post_init__(self):
        is_int = isinstance(self.groups, int) and not isinstance(self.groups, bool)
        is_lists = isinstance(self.groups, (list, tuple)) and all(
            isinstance(g, (list, tuple)) and all(isinstance(i, int) for i in g) for g in self.groups
        )
        if not (self.groups == "auto" or (is_int and self.groups >= 1) or (is_lists and self.groups)):
            raise ValueError(
                f"option groups={self.groups!r} is not 'auto', a positive int or lists of block indices "
                "such as [[0, 1], [2, 3]]"
            )
        if not isinstance(self.max_groups, int) or isinstance(self.max_groups, bool) or self.max_groups < 1:
            raise ValueError(f"option max_groups must be a positive int, got {self.max_groups!r}")
        if self.kl_threshold is not None:
            if self.groups != "auto":
                raise ValueError("option kl_threshold applies to groups='auto' only; drop one of them")
            if not isinstance(self.kl_threshold, (int, float)) or self.kl_threshold < 0:
                raise ValueError(f"option kl_threshold must be a number >= 0, got {self.kl_threshold!r}")
        weights = self.role_weights
        if not isinstance(weights, dict) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights.values()
        ):
            raise ValueError(f"option role_weights must map roles to positive numbers, got {weights!r}")


# ------------------------------------------------------------------------------------ the fit

# Residual spectra are scored in this dtype while searching S; the chosen S's are recomputed in float64.
SEARCH_DTYPE = torch.float32
# The whitened weights behind the cross products are computed in this dtype (their inner products are
# summed in float64): float32 halves the search's largest product, and its relative error (~1e-7) moves
# the least-squares coefficients by as little, the whitened error by its square.
CROSS_DTYPE = torch.float32
# Atoms whose share of the group's whitened energy is below this fraction of the first atom's are noise
# at CROSS_DTYPE's precision (linearly dependent weights, e.g. identical blocks): the search stops there.
ATOM_FLOOR = 1e-6
CROSS_SLAB = 2**23  # numbers in the slab of whitened weights the cross products are computed over


@dataclass
class Projection:
    """One targeted layer and what its fit needs: its weight, bias and the Cholesky factor of its inputs.

    The weight stays the layer's own tensor (``source``) and is widened to float64 where it is used, so
    the float64 copies of all roles' weights are never held at once (1.2 GB at d = 1024, 12 blocks). The
    Gram matrix itself is not kept: every quantity of the fit is taken from the factor, which stays in
    ``factors`` (in files in a streamed compression) and is read when used.
    """

    name: str
    block: int
    source: torch.Tensor  # (d_out, d_in), the layer's own weight in its dtype and device
    bias: torch.Tensor | None  # (d_out,), the layer's own tensor
    factors: FactorStore
    key: str  # of its input's factor L in ``factors``: L L^T = gram + damping I
    damping: float
    _spectrum: torch.Tensor | None = field(default=None, repr=False)

    @property
    def chol(self) -> torch.Tensor:
        """The factor (d_in, d_in) float64 lower."""
        return self.factors.get(self.key)

    def factor(self, dtype: torch.dtype) -> torch.Tensor:
        """The factor in ``dtype``."""
        return self.factors.get(self.key, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight (d_out, d_in) in float64 on the factor's device (a new copy unless it is that already)."""
        return self.weight_in(torch.float64)

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        return self.source.to(device=self.factors.device, dtype=dtype)

    @property
    def spectrum(self) -> torch.Tensor:
        """Squared singular values of W L (descending), computed once: the residual without atoms."""
        if self._spectrum is None:
            self._spectrum = squared_singular_values(whiten(self.weight, self.chol))
        return self._spectrum

    def error(self, approx: torch.Tensor, whitened: float) -> float:
        """Output error on the calibration inputs, tr(D G D^T) = ||D L||_F^2 - damping ||D||_F^2 for
        D = W - approx (the undamped Gram's, as ``whitening.whitened_error`` measures it), given
        ``whitened`` = ||D L||_F^2: what a whitened truncation leaves, the tail of the residual's spectrum."""
        delta = self.weight - approx.to(torch.float64)  # (d_out, d_in)
        return whitened - self.damping * float(delta.square().sum())


def cross_products(projections: list[Projection]) -> torch.Tensor:
    """(n, n, n) float64: [l, j, k] = <W_j L_l, W_k L_l>, every weight of a role whitened by block l's inputs.

    Everything the atom search needs besides the residual spectra follows from these n x n matrices:
    atoms are combinations of the group's weights, so their whitened Gram and their products with a
    block's weight are quadratic forms in them. Computed a slab of output rows at a time (at most
    ``CROSS_SLAB`` numbers of whitened weights held at once), in ``CROSS_DTYPE``, summed in float64; one
    block's factor at a time.
    """
    n, (d_out, d_in) = len(projections), projections[0].source.shape
    cross = torch.zeros(n, n, n, dtype=torch.float64, device=projections[0].factors.device)
    rows = max(1, CROSS_SLAB // (n * d_in))
    for block, p in enumerate(projections):
        lower = p.factor(CROSS_DTYPE)
        for start in range(0, d_out, rows):
            slab = torch.stack([q.source[start : start + rows] for q in projections])  # (n, r, d_in)
            slab = slab.to(device=cross.device, dtype=CROSS_DTYPE)
            whitened = whiten(slab, lower).flatten(1).double()  # (n, r*d_in)
            cross[block] += whitened @ whitened.T
    return cross


@dataclass
class Unit:
    """The projections of one role in one group of blocks: one dictionary when it has atoms."""

    role: str
    path: str
    projections: list[Projection]
    cross: torch.Tensor  # (n, n, n): the role's cross products restricted to the group's blocks
    group: int = 0  # index among the role's groups (names the dictionary)
    mix: torch.Tensor | None = None  # (n, S): atom s = sum_j mix[j, s] W_j
    coefficients: torch.Tensor | None = None  # (n, S)
    spectra: list[torch.Tensor] = field(default_factory=list)  # per block: sigma^2 of its whitened residual
    ranks: list[int] = field(default_factory=list)
    search: dict[int, float] = field(default_factory=dict)  # S -> whitened error at the unit's own budget

    @property
    def n_atoms(self) -> int:
        return 0 if self.mix is None else self.mix.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.projections[0].source.shape)

    @property
    def atom_cost(self) -> int:
        """Stored numbers of one atom: the matrix plus one coefficient per block."""
        return math.prod(self.shape) + len(self.projections)

    @property
    def rank_cost(self) -> int:
        return sum(self.shape)

    @property
    def biases(self) -> int:
        return sum(0 if p.bias is None else p.bias.numel() for p in self.projections)

    @property
    def dense(self) -> int:
        return sum(_dense(p) for p in self.projections)

    def stored(self) -> int:
        return self.n_atoms * self.atom_cost + sum(self.ranks) * self.rank_cost + self.biases

    def combine(self, weights: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """sum_j weights[j, ...] W_j: (d_out, d_in) for weights (n,), (S, d_out, d_in) for weights (n, S)."""
        columns = weights.reshape(len(self.projections), -1).to(dtype)  # (n, m)
        out = torch.zeros(columns.shape[1], *self.shape, dtype=dtype, device=weights.device)
        for w, p in zip(columns, self.projections, strict=True):
            out += w[:, None, None] * p.weight_in(dtype)
        return out.reshape(*weights.shape[1:], *self.shape)

    @property
    def atoms(self) -> torch.Tensor | None:
        """The atoms (S, d_out, d_in) float64, built from the weights."""
        return None if self.mix is None else self.combine(self.mix)

    def residual_mix(self, i: int, mix: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
        """(n,) weights of block i's residual W_i - sum_s c_s D_s as a combination of the group's weights,
        for atoms ``mix`` (n, >= s) and coefficients (s,)."""
        own = torch.zeros(len(self.projections), dtype=torch.float64, device=mix.device)
        own[i] = 1.0
        return own - mix[:, : len(coeffs)] @ coeffs


def _budget(units: list[Unit], ratio: float) -> int:
    """Stored numbers left for atoms and corrections: (1 - CR) x dense, less the biases every layer keeps."""
    return math.floor((1.0 - ratio) * sum(u.dense for u in units)) - sum(u.biases for u in units)


def _mean_gram_atoms(cross: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """(n, S) mixes of the first S atoms: uncentred matrix PCA of the group's weights whitened by the mean
    of its blocks' (damped) Grams, G_bar = mean_l L_l L_l^T. The PCA's n x n Gram is mean_l cross[l]; atom
    s is sum_j V[j, s] W_j / sqrt(lambda_s), so its whitened form has unit norm as the PCA's atoms do.
    Atoms past the weights' numerical rank (``ATOM_FLOOR``) are left out."""
    energy, vectors = torch.linalg.eigh(cross.mean(0))  # ascending
    energy, vectors = energy.flip(0), vectors.flip(1)
    kept = int((energy > ATOM_FLOOR * energy[0].clamp_min(0.0)).sum()) if len(energy) else 0
    n_atoms = min(n_atoms, kept)
    return vectors[:, :n_atoms] / energy[:n_atoms].sqrt()  # (n, S)


def _normal_equations(cross: torch.Tensor, mix: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block i's least-squares system on the atoms in its whitened space: the Gram (S, S) of the whitened
    atoms D_s L_i and their products (S,) with W_i L_i, both quadratic forms in block i's cross products."""
    return mix.T @ cross[i] @ mix, mix.T @ cross[i][:, i]


def _coefficients(system: torch.Tensor, target: torch.Tensor, s: int) -> torch.Tensor:
    """Least-squares coefficients (s,) on the first ``s`` atoms (pseudo-inverse: atoms may be dependent)."""
    if s == 0:
        return target[:0]
    return torch.linalg.pinv(system[:s, :s], hermitian=True) @ target[:s]


def _residual_spectrum(
    unit: Unit, i: int, mix: torch.Tensor, coeffs: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Squared singular values (descending, float64) of block i's whitened residual (W_i - sum c_s D_s) L_i,
    computed in ``dtype``; with no coefficients, the layer's own spectrum."""
    p = unit.projections[i]
    if len(coeffs) == 0:
        return p.spectrum
    residual = unit.combine(unit.residual_mix(i, mix, coeffs), dtype)  # (d_out, d_in)
    return squared_singular_values(whiten(residual, p.factor(dtype))).double()


def _atom_counts(s_max: int, error_of: Callable[[int], float]) -> None:
    """Call ``error_of`` on the atom counts worth trying in 0..s_max: the grid 0, 1, 2, 4, 8, ..., s_max,
    then the midpoints of the gaps beside the best count so far, until its neighbours are all tried.

    The whitened error is not monotone in S (few atoms and almost as many atoms as blocks can both
    win), but between grid points it has been smooth on every model measured, so the search tries at
    most about 3 log2(s_max) counts instead of s_max + 1, and picked the exhaustive search's S on every
    unit of the bench model (docs/results/scale/README.md).
    """
    grid = {0, s_max, *(2**i for i in range(s_max.bit_length()))}  # 2**i <= s_max
    errors = {s: error_of(s) for s in sorted(grid)}
    while True:
        best = min(errors, key=errors.get)
        tried = sorted(errors)
        at = tried.index(best)
        gaps = [(tried[at - 1], best)] if at > 0 else []
        gaps += [(best, tried[at + 1])] if at + 1 < len(tried) else []
        middle = [(a + b) // 2 for a, b in gaps if b - a > 1]
        if not middle:
            return
        errors.update({s: error_of(s) for s in middle})


def _allocate(
    spectra: list[torch.Tensor], costs: list[int], weights: list[float], minimum: list[int], budget: int
) -> list[int] | None:
    """Ranks per module: after the ``minimum`` ranks, the largest weight x sigma^2 / cost first while the
    budget lasts (a module's later singular values are never taken before its earlier ones). None when
    the minimum alone exceeds the budget."""
    budget -= sum(m * c for m, c in zip(minimum, costs, strict=True))
    if budget < 0:
        return None
    gains = [w * s[m:] for s, w, m in zip(spectra, weights, minimum, strict=True)]
    return spend(costs, gains, minimum, budget)[0]


def _pooled_error(spectra: list[torch.Tensor], minimum: int, budget: int, cost: int) -> float:
    """The least whitened error of blocks whose ranks all cost ``cost``: each keeps ``minimum`` ranks, the
    rest of ``budget`` takes the largest remaining sigma^2 of any of them (what ``_allocate`` does at
    equal costs), inf when the minimum alone exceeds the budget. Over some of a unit's blocks, with the
    whole budget less the others' minimum, it is a lower bound of the unit's error."""
    extra = budget // cost - minimum * len(spectra)
    if extra < 0:
        return math.inf
    rest = torch.cat([s[minimum:] for s in spectra])
    return float(rest.sum()) - float(rest.topk(min(extra, len(rest))).values.sum())


def _error(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    """Whitened error left after keeping the top ``ranks`` singular values of each residual."""
    return sum(float(s[r:].sum()) for s, r in zip(spectra, ranks, strict=True))


def _fit_unit(unit: Unit, keep: float, ceiling: float = math.inf) -> Unit | None:
    """Search the atom count S for the unit at its share ``keep`` x dense of the budget; keep the best fit.

    Atoms, coefficients and their least-squares systems come from the unit's cross products (n x n
    algebra in float64). The search scores each tried S from residual spectra in ``SEARCH_DTYPE``
    (float32 halves the cost of the products and eigenvalues); the chosen S's spectra are then
    recomputed in float64, so its ranks and error are those of the float64 residuals.

    With a finite ``ceiling`` the fit only matters if it scores below it (the error the rest of a
    candidate grouping leaves to this unit): counts are dropped as soon as they are shown to score above
    it, and None is returned when none scores below it.
    """
    n, budget = len(unit.projections), math.floor(keep * unit.dense) - unit.biases
    mix = _mean_gram_atoms(unit.cross, min(n - 1, max(0, budget // unit.atom_cost)))  # (n, s_max)
    equations = [_normal_equations(unit.cross, mix, i) for i in range(n)]
    costs, weights = [unit.rank_cost] * n, [1.0] * n

    def spectra_of(s: int, dtype: torch.dtype) -> list[torch.Tensor]:
        return [
            _residual_spectrum(unit, i, mix, _coefficients(*eq, s), dtype) for i, eq in enumerate(equations)
        ]

    order = sorted(range(n), key=lambda i: -float(unit.projections[i].spectrum.sum()))  # most energy first
    dropped: list[int] = []  # counts shown to lose before all their spectra were computed

    def error_of(s: int) -> float:
        """The unit's whitened error with s atoms, or a lower bound of it above the best error so far:
        the blocks' spectra come one at a time, and once the pooled error of those computed (given the
        whole budget but the others' minimum ranks) exceeds an error already found, s cannot win."""
        minimum, left = int(s == 0), budget - s * unit.atom_cost
        best = min([ceiling, *unit.search.values()])
        spectra: dict[int, torch.Tensor] = {}
        for i in order:
            spectra[i] = _residual_spectrum(unit, i, mix, _coefficients(*equations[i], s), SEARCH_DTYPE)
            if len(spectra) < n:
                others = (n - len(spectra)) * minimum * unit.rank_cost
                bound = _pooled_error(list(spectra.values()), minimum, left - others, unit.rank_cost)
                if bound > best:
                    dropped.append(s)
                    return bound
        found = _allocate([spectra[i] for i in range(n)], costs, weights, [minimum] * n, left)
        if found is None:
            return math.inf
        unit.search[s] = _error([spectra[i] for i in range(n)], found)
        return unit.search[s]

    _atom_counts(mix.shape[1], error_of)
    if min(unit.search.values(), default=math.inf) > ceiling and (dropped or unit.search):
        return None
    if not unit.search:
        raise ValueError(
            f"keeping {keep:.3g} of {unit.path!r} in blocks {[p.block for p in unit.projections]} affords not "
            "even rank 1 per layer or one shared atom; lower the ratio (or raise the role's weight)"
        )
    best = min(unit.search, key=unit.search.get)
    unit.mix = mix[:, :best] if best else None
    unit.coefficients = (
        torch.stack([_coefficients(*eq, best) for eq in equations]) if best else None
    )  # (n, S)
    unit.spectra = spectra_of(best, torch.float64)
    unit.ranks = _allocate(unit.spectra, costs, weights, [int(best == 0)] * n, budget - best * unit.atom_cost)
    unit.search[best] = _error(unit.spectra, unit.ranks)
    return unit


# ------------------------------------------------------------------------------------- grouping


def _cut(n_blocks: int, after: list[int]) -> list[list[int]]:
    """Consecutive groups of ``range(n_blocks)``, cut after each block index in ``after``."""
    bounds = [0, *sorted(i + 1 for i in after), n_blocks]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def _groupings(options: MasaOptions, block_kl: list[float] | None, n_blocks: int) -> list[list[list[int]]]:
    """Candidate groupings of the blocks, one for fixed ``groups``, several for ``auto``."""
    if options.groups != "auto":
        return [resolve_groups(options.groups, n_blocks)]
    if block_kl is not None and len(block_kl) != n_blocks - 1:
        raise ValueError(
            f"block_kl has {len(block_kl)} entries for {n_blocks} blocks; expected {n_blocks - 1}"
        )
    if options.kl_threshold is not None:
        if block_kl is None:
            raise ValueError(
                "option kl_threshold needs the logit-lens drift of a causal LM, which this model does not "
                "give; use groups=<int> or explicit groups"
            )
        return [_cut(n_blocks, [i for i, kl in enumerate(block_kl) if kl > options.kl_threshold])]
    counts = range(1, max(1, min(options.max_groups, n_blocks // 2)) + 1)
    if block_kl is None:
        return [resolve_groups(g, n_blocks) for g in counts]
    jumps = sorted(range(len(block_kl)), key=lambda i: -block_kl[i])
    return [_cut(n_blocks, jumps[: g - 1]) for g in counts]


def _split(
    role: str, path: str, projections: list[Projection], cross: torch.Tensor, grouping: list[list[int]]
) -> list[Unit]:
    """The units of one role under one grouping (groups with no targeted block are skipped); ``cross`` are
    the role's cross products (``cross_products``)."""
    covered = {i for g in grouping for i in g}
    if missing := [p.name for p in projections if p.block not in covered]:
        raise ValueError(f"groups {grouping} leave out {missing[:3]}: put every targeted block in a group")
    units = []
    for group in grouping:
        if at := [i for i, p in enumerate(projections) if p.block in group]:
            index = torch.tensor(at)
            members = cross[index][:, index][:, :, index]  # (n, n, n) of the group's blocks
            units.append(Unit(role, path, [projections[i] for i in at], members))
    return units


def _choose_grouping(
    role: str, path: str, projections: list[Projection], groupings: list[list[list[int]]], keep: float
) -> tuple[list[Unit], list[dict]]:
    """The fitted units of the grouping with the least whitened error, and every candidate's error.

    Candidates come in order of more groups (``auto`` cuts one more drift each time); the search stops
    at the first that scores worse than the one before it: a further cut splits a group again, and on
    every model measured the error only rose from there (docs/results/scale/README.md). A candidate's
    groups are fitted smallest first, and the rest are fitted only while they can still beat the
    candidate before it (``_fit_unit``'s ceiling): a losing candidate is abandoned, its error left
    unknown (None in the report).
    """
    fitted: dict[tuple[int, ...], Unit] = {}  # a group met again in another grouping is fitted once
    best: tuple[float, list[Unit]] | None = None
    cross = cross_products(projections)  # (n, n, n), shared by every candidate group
    candidates: list[dict] = []
    for grouping in groupings:
        units = _split(role, path, projections, cross, grouping)
        keys = [tuple(p.block for p in u.projections) for u in units]
        ceiling = best[0] if best else math.inf  # the candidate before this one, the best so far
        error = 0.0
        for at in sorted(range(len(units)), key=lambda at: (keys[at] not in fitted, len(keys[at]))):
            if keys[at] not in fitted:
                fit = _fit_unit(units[at], keep, ceiling - error)
                if fit is None:
                    error = None
                    break
                fitted[keys[at]] = fit
            units[at] = fitted[keys[at]]
            error += units[at].search[units[at].n_atoms]
        candidates.append({"groups": [list(k) for k in keys], "whitened_error": error})
        if error is None or error > ceiling:
            break
        if error < ceiling:
            best = (error, units)
    for g, unit in enumerate(best[1]):
        unit.group = g
    return best[1], candidates


# ---------------------------------------------------------------------------- the replacement


def _projections(layout: Layout, stats: CalibrationStats) -> dict[tuple[str, str], list[Projection]]:
    """The targeted layers grouped by role, with their Cholesky factors: {(role, path): [...]}.

    One factor per distinct input (q/k/v share one), kept in the statistics' scratch directory when they
    have one (``FactorStore``). When the statistics are ``consumable`` (a streamed compression: nobody
    reads them afterwards) each Gram is dropped once factorised, so the Grams and the factors are never
    all held together (20 GB at the 1B shape).
    """
    by_role: dict[tuple[str, str], list[Projection]] = {}
    factors = FactorStore(stats.scratch, copies=tuple({CROSS_DTYPE, SEARCH_DTYPE}))
    cholesky: dict[str, tuple[str, float]] = {}  # name -> key of its input's factor and its damping
    for key, targets in layout.by_role("masa").items():
        for t in targets:
            if t.name not in cholesky:
                gram = stats.grams[t.name]
                sharing = same_input(stats.grams, t.name)
                chol, damping = damped_cholesky(gram)
                factors.add(t.name, chol)
                cholesky.update(dict.fromkeys(sharing, (t.name, damping)))
                if stats.consumable:
                    for name in sharing:
                        del stats.grams[name]
                del gram, chol
            by_role.setdefault(key, []).append(
                Projection(t.name, t.block, t.weight, t.bias, factors, *cholesky[t.name])
            )
    return by_role


def _correction(unit: Unit, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Block i's approximation (d_out, d_in) float64 and its correction factors (up, down), if any."""
    p = unit.projections[i]
    weight = p.weight  # (d_out, d_in) float64
    shared = torch.zeros_like(weight)
    if unit.mix is not None:
        shared = unit.combine(unit.mix @ unit.coefficients[i])  # sum_s c_s D_s (d_out, d_in)
    if unit.ranks[i] == 0:
        return shared, None
    up, down = whitened_lowrank(weight - shared, p.chol, unit.ranks[i])  # (d_out, r), (r, d_in)
    return shared + up @ down, (up, down)


def _dictionaries(blocks_path: str, units: list[Unit]) -> Replacement:
    """One dictionary per unit with atoms (the ``share`` operation), its atoms, coefficients and biases."""
    plans = [
        DictionaryPlan(
            re.sub(r"\W", "_", u.role) + f"_g{u.group}", u.role, u.path, [p.block for p in u.projections],
            u.n_atoms, list(u.shape), u.biases > 0,
        )
        for u in units
    ]  # fmt: skip
    tensors = {}
    for unit, plan in zip(units, plans, strict=True):
        dtype = unit.projections[0].source.dtype  # install casts to it: the same values, less memory
        tensors[f"masa_bank.dictionaries.{plan.key}.atoms"] = unit.atoms.to(dtype)  # (S, d_out, d_in)
        for p, coeffs in zip(unit.projections, unit.coefficients, strict=True):
            tensors[f"{p.name}.coefficients"] = coeffs.to(dtype)  # (S,)
            if p.bias is not None:
                tensors[f"{p.name}.bias"] = p.bias
    entries = [{k: v for k, v in asdict(plan).items() if k != "unexplained"} for plan in plans]
    return Replacement([{"op": "share", "blocks": blocks_path, "dictionaries": entries}], tensors)


def _replacement(blocks_path: str, units: list[Unit]) -> tuple[Replacement, dict[str, float]]:
    """Every targeted layer's fit as a replacement, and each layer's whitened error."""
    result = Replacement()
    if shared := [u for u in units if u.mix is not None]:
        result = _dictionaries(blocks_path, shared)
    errors, refined, corrections = {}, [], {}
    for unit in units:
        for i, p in enumerate(unit.projections):
            approx, factors = _correction(unit, i)
            errors[p.name] = p.error(approx, float(unit.spectra[i][unit.ranks[i] :].sum()))
            del approx
            if factors is None:
                continue
            # kept in the weight's dtype, which install casts them to anyway: the same installed values,
            # and not every layer's factors in float64 at once (6.9 GB at the 1B shape, 20 %)
            factors = tuple(f.to(p.source.dtype) for f in factors)
            if unit.mix is None:
                result = result.extend(lowrank_replacement(p.name, *factors, p.bias))
                continue
            refined.append({"module": p.name, "rank": unit.ranks[i]})
            corrections[f"{p.name}.correction.up"], corrections[f"{p.name}.correction.down"] = factors
    if refined:  # the refined layer holds the shared one as ``shared``: its keys move under it
        moved = {n["module"] for n in refined}
        tensors = {}
        for key, value in result.tensors.items():
            owner, _, leaf = key.rpartition(".")
            tensors[f"{owner}.shared.{leaf}" if owner in moved else key] = value
        result = Replacement(
            result.ops + [{"op": "refine_shared", "modules": refined}], {**tensors, **corrections}
        )
    return result, errors


# ----------------------------------------------------------------------------------- the method


def _dense(p: Projection) -> int:
    return p.source.numel() + (0 if p.bias is None else p.bias.numel())


def _keep_fractions(by_role: dict, ratio: float, weights: dict[str, float]) -> dict[str, float]:
    """Fraction of its dense size each role keeps: (1 - CR) tilted by the role weights, same total."""
    dense = {role: sum(_dense(p) for p in ps) for (role, _), ps in by_role.items()}
    mean = sum(weights.get(r, 1.0) * d for r, d in dense.items()) / sum(dense.values())
    return {role: (1.0 - ratio) * weights.get(role, 1.0) / mean for role in dense}


def _energy(projections: list[Projection]) -> float:
    """Whitened energy sum_l tr(W_l G_l W_l^T) = ||W_l L_l||^2 - damping ||W_l||^2: the error of dropping
    the layers (a role's error scale), from the spectra already computed."""
    return sum(float(p.spectrum.sum()) - p.damping * float(p.weight.square().sum()) for p in projections)


def _top_up(units: list[Unit], ratio: float, weights: dict[str, float]) -> None:
    """Spend what the groups' rounding left of the budget on the best further ranks (``unit.ranks``)."""
    layers = [(u, i) for u in units for i in range(len(u.projections))]
    ranks = _allocate(
        [u.spectra[i] for u, i in layers],
        [u.rank_cost for u, _ in layers],
        [weights[u.role] for u, _ in layers],
        [u.ranks[i] for u, i in layers],
        _budget(units, ratio) - sum(u.n_atoms * u.atom_cost for u in units),
    )
    for unit in units:
        unit.ranks, ranks = ranks[: len(unit.projections)], ranks[len(unit.projections) :]


@dataclass
class Plan:
    """What ``masa`` decided, before the model is touched."""

    units: list[Unit]
    groupings: dict[str, list[dict]]  # role -> every grouping tried and its whitened error
    keep: dict[str, float]  # role -> fraction of its dense size it keeps
    energy: dict[str, float]  # role -> whitened energy
    weights: dict[str, float]  # role -> objective weight of one unit of whitened error

    def planned_errors(self) -> dict[str, float]:
        """Whitened error per layer predicted from the residual spectra."""
        return {
            p.name: _error([u.spectra[i]], [u.ranks[i]])
            for u in self.units
            for i, p in enumerate(u.projections)
        }

    def objective(self, errors: dict[str, float]) -> float:
        """What ``masa`` minimises: sum over roles of role weight x whitened error / whitened energy."""
        role_of = {p.name: u.role for u in self.units for p in u.projections}
        return sum(self.weights[role_of[name]] * e for name, e in errors.items())


def _plan(
    by_role: dict, n_blocks: int, block_kl: list[float] | None, ratio: float, options: MasaOptions
) -> Plan:
    """Groups, atoms and ranks of every targeted layer."""
    groupings = _groupings(options, block_kl, n_blocks)
    keep = _keep_fractions(by_role, ratio, options.role_weights)
    chosen = {}
    for (role, path), ps in by_role.items():
        chosen[role] = _choose_grouping(role, path, ps, groupings, keep[role])
    energy = {role: _energy(ps) or 1.0 for (role, _), ps in by_role.items()}
    weights = {role: options.role_weights.get(role, 1.0) / e for role, e in energy.items()}
    units = [u for role_units, _ in chosen.values() for u in role_units]
    _top_up(units, ratio, weights)
    return Plan(units, {role: tried for role, (_, tried) in chosen.items()}, keep, energy, weights)


def _svd_llm_ranks(layout: Layout, ratio: float) -> dict[str, int] | None:
    """SVD-LLM's own ranks at the same ratio (uniform, as ``svd-llm`` chooses them); None where SVD-LLM
    cannot reach the ratio."""
    try:
        return choose_ranks(layout.targets, None, ratio, "uniform")
    except ValueError:
        return None


def _unit_report(unit: Unit, errors: dict[str, float]) -> dict:
    return {
        "blocks": [p.block for p in unit.projections],
        "atoms": unit.n_atoms,
        "ranks": unit.ranks,
        "whitened_error": sum(errors[p.name] for p in unit.projections),
        "search": {str(s): e for s, e in unit.search.items()},  # S -> error at the group's own budget
    }


def _roles_report(plan: Plan, errors: dict[str, float], svd_errors: dict[str, float] | None) -> dict:
    """Per role: its budget share, the groupings tried, each group's fit and the relative errors."""
    report = {}
    for role, tried in plan.groupings.items():
        units = [u for u in plan.units if u.role == role]
        names = [p.name for u in units for p in u.projections]
        report[role] = {
            "keep": plan.keep[role],
            "groupings": tried,
            "groups": [_unit_report(u, errors) for u in units],
            "relative_error": sum(errors[n] for n in names) / plan.energy[role],
            "relative_error_svd_llm": None
            if svd_errors is None
            else sum(svd_errors[n] for n in names) / plan.energy[role],
        }
    return report


@register_method("masa", needs=("grams", "block_kl"), options=MasaOptions)
def compress_masa(layout: Layout, stats: CalibrationStats, config: CompressConfig) -> Replacement:
    """Shared atoms per role and group of blocks plus whitened low-rank corrections (module docstring).

    Falls back to plain SVD-LLM when that scores better on the objective (rank rounding on tiny layers).
    """
    options = method_options(MasaOptions, config)
    by_role = _projections(layout, stats)
    plan = _plan(by_role, layout.n_blocks, stats.block_kl, config.ratio, options)
    lookup = {p.name: p for ps in by_role.values() for p in ps}
    svd_ranks = _svd_llm_ranks(layout, config.ratio)
    svd_errors = None
    if svd_ranks is not None:  # in target order
        svd_errors = {n: _error([lookup[n].spectrum], [svd_ranks[n]]) for n in layout.names}
    reference = {
        "role_weights": options.role_weights,
        "error_weights": {p.name: plan.weights[u.role] for u in plan.units for p in u.projections},
        "objective_svd_llm": None if svd_errors is None else plan.objective(svd_errors),
        "whitened_error_svd_llm": None if svd_errors is None else sum(svd_errors.values()),
    }
    planned = plan.planned_errors()
    if svd_errors is not None and plan.objective(svd_errors) < plan.objective(planned):
        # svd-llm's own fit (uniform ranks, no refit) on the factors already made
        result = truncate(layout.targets, svd_ranks, lambda name: lookup[name].chol, in_weight_dtype=True)
        result.report = {
            "refit": False,
            "allocation": "uniform",
            **result.report,
            **reference,
            "fallback": "svd-llm",
            "objective": reference["objective_svd_llm"],
            "objective_masa_plan": plan.objective(planned),
            "roles": _roles_report(plan, planned, svd_errors),
        }
        return result
    result, errors = _replacement(layout.blocks_path, plan.units)
    result.report = {
        **reference,
        "fallback": None,
        "ratio_reached": 1.0 - sum(u.stored() for u in plan.units) / sum(u.dense for u in plan.units),
        "objective": plan.objective(errors),
        "whitened_error": sum(errors.values()),
        "roles": _roles_report(plan, errors, svd_errors),
    }
    return result
