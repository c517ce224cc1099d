"""The ``masa`` compression method: ratio, whitened error against SVD-LLM, sharing, round trip, options."""

import copy
import json
import math
import re
from collections import defaultdict

import pytest
import torch
from tiny_models import build, outputs

import masa
import masa.compress.methods.masa as masa_method
from masa.arch import find_blocks, get_adapter, linear_weight
from masa.compress import CompressConfig, calibrate, compress
from masa.compress.api import resolve_targets
from masa.compress.factors import FactorStore
from masa.compress.layout import resolve_layout
from masa.compress.methods.masa import MasaOptions, _allocate, _atom_counts, _groupings
from masa.compress.registry import method_options
from masa.compress.whitening import whitened_error
from masa.nn import LowRankLinear, RefinedSharedLinear
from masa.sharing import SharedLinear

ATTENTION = ("q", "k", "v", "o")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting on a shared machine (100x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokens(n: int = 16, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(0))


def _share_structure(model, roles=ATTENTION, noise: float = 0.1):
    """Copy block 0's projections of ``roles`` into every block, plus ``noise`` x their std."""
    generator = torch.Generator().manual_seed(0)
    _, blocks = find_blocks(model)
    paths = get_adapter(model).roles
    with torch.no_grad():
        for role in roles:
            first, _ = linear_weight(blocks[0].get_submodule(paths[role]))
            for block in blocks[1:]:
                weight, _ = linear_weight(block.get_submodule(paths[role]))
                weight.copy_(first + noise * first.std() * torch.randn(first.shape, generator=generator))
    return model


def _prepared(
    family: str, n_layer: int = 4, structured=(), noise: float = 0.1, ratio: float = 0.4, **options
):
    """A tiny model (GPT-2 unfused), its config and calibration statistics."""
    model = build(family, n_layer)
    config = CompressConfig("masa", ratio, options=options)
    names = resolve_targets(model, config)
    _share_structure(model, structured, noise)
    return model, config, calibrate(model, _tokens(), names)


def _objective(model, originals: dict, stats) -> float:
    """masa's objective at equal role weights, from the layers' materialised weights: the sum over
    roles of whitened error / whitened energy."""
    error, energy = defaultdict(float), defaultdict(float)
    for name, weight in originals.items():
        role, gram = re.sub(r"\.\d+\.", ".", name), stats.grams[name]
        error[role] += whitened_error(weight, model.get_submodule(name).weight, gram)
        energy[role] += whitened_error(weight, torch.zeros_like(weight), gram)
    return sum(error[r] / energy[r] for r in error)


def _originals(model, stats) -> dict:
    return {name: linear_weight(model.get_submodule(name))[0].detach().clone() for name in stats.grams}


def _masa_vs_svd_llm(model, config, stats) -> tuple[float, float, dict]:
    originals, svd_model = _originals(model, stats), copy.deepcopy(model)
    report = compress(model, config, stats=stats).report
    compress(svd_model, CompressConfig("svd-llm", config.ratio), stats=stats)
    return _objective(model, originals, stats), _objective(svd_model, originals, stats), report


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_reaches_the_ratio(family):
    model, config, stats = _prepared(family, structured=("q", "k"))
    result = compress(model, config, stats=stats)
    reached = masa.count(model).ratio(ATTENTION)
    assert abs(reached - 0.4) <= 0.01
    assert result.report["fallback"] is None  # q and k share structure: atoms pay
    assert result.report["ratio_reached"] == pytest.approx(reached, abs=1e-9) == result.ratio_reached


@pytest.mark.parametrize("family, ratio", [("llama", 0.4), ("bert", 0.4), ("gpt2", 0.6), ("opt", 0.2)])
def test_never_worse_than_svd_llm(family, ratio):
    model, config, stats = _prepared(family, ratio=ratio, role_weights={})  # independent random blocks
    masa_objective, svd_objective, report = _masa_vs_svd_llm(model, config, stats)
    assert masa_objective <= svd_objective * (1 + 1e-6)
    assert report["objective"] == pytest.approx(masa_objective, rel=1e-4)  # the layers hold the fit
    assert report["objective_svd_llm"] == pytest.approx(svd_objective, rel=1e-4)


def test_falls_back_to_svd_llm_when_it_scores_better(ids):
    model, config, stats = _prepared("llama")  # nothing shared; the default Q/O tilt loses to uniform ranks
    svd_model = copy.deepcopy(model)
    result = compress(model, config, stats=stats)
    assert result.report["fallback"] == "svd-llm"
    assert result.report["objective"] <= result.report["objective_masa_plan"]
    assert all(isinstance(model.get_submodule(name), LowRankLinear) for name in stats.grams)
    assert abs(result.ratio_reached - 0.4) <= 0.01
    svd = compress(svd_model, CompressConfig("svd-llm", 0.4), stats=stats)  # the same fit as svd-llm's own
    assert result.report["ranks"] == svd.report["ranks"]
    assert torch.equal(outputs(model, ids), outputs(svd_model, ids))


def _random_projections(n: int, d_out: int, d_in: int, scratch=None) -> list:
    generator = torch.Generator().manual_seed(0)
    projections, factors = [], FactorStore(scratch)
    for block in range(n):
        inputs = torch.randn(4 * d_in, d_in, generator=generator, dtype=torch.float64) * torch.linspace(
            0.1, 3, d_in
        )
        chol, damping = masa_method.damped_cholesky(inputs.T @ inputs)
        factors.add(f"b{block}", chol)
        weight = torch.randn(d_out, d_in, generator=generator)
        projections.append(
            masa_method.Projection(f"b{block}", block, weight, None, factors, f"b{block}", damping)
        )
    return projections


@pytest.mark.parametrize("in_files", [False, True])
def test_cross_products_are_the_whitened_inner_products(monkeypatch, tmp_path, in_files):
    """<W_j L_l, W_k L_l> for every block l, also when the products are taken over several row slabs and
    the factors are read from scratch files."""
    projections = _random_projections(4, 12, 8, tmp_path if in_files else None)
    monkeypatch.setattr(masa_method, "CROSS_SLAB", 4 * 8 * 5)  # slabs of 5 rows: 12 = 5 + 5 + 2
    cross = masa_method.cross_products(projections)
    for block, q in enumerate(projections):
        whitened = torch.stack([(p.weight @ q.chol).reshape(-1) for p in projections])  # (n, d_out*d_in)
        torch.testing.assert_close(cross[block], whitened @ whitened.T, rtol=1e-5, atol=0)
    assert len(list(tmp_path.glob("*.safetensors"))) == (4 if in_files else 0)


def test_factors_in_scratch_files_give_the_same_fit(tmp_path):
    """A streamed fit keeps the Cholesky factors in files: the same replacement to the bit, none held."""
    model, config, stats = _prepared("llama", n_layer=6, structured=ATTENTION, noise=0.3, ratio=0.3)
    held = compress(copy.deepcopy(model), config, stats=stats).report
    stats.scratch = tmp_path / "scratch"
    streamed = compress(model, config, stats=stats).report
    assert streamed == held
    assert len(list(stats.scratch.glob("factor-*.safetensors"))) == 6 * 2  # q/k/v share one input, o one


def test_factor_store_reads_one_factor_at_a_time(tmp_path):
    lower = torch.linalg.cholesky(torch.eye(5, dtype=torch.float64) * 2 + 0.1)
    store = FactorStore(tmp_path)
    store.add("a", lower)
    store.add("b", 2 * lower)
    assert torch.equal(store.get("a"), lower) and torch.equal(
        store.get("b", torch.float32), (2 * lower).float()
    )
    assert store.get("a") is store.get("a")  # read once while it is the last one used
    assert {key for key, _ in store._last.values()} == {"a", "b"}  # one per precision, no more
    assert store.get("a", torch.float32).dtype == torch.float32 and store._held == {}


def test_atoms_are_the_mean_gram_pca():
    """The atoms built from the cross products are the matrix PCA of the weights whitened by the mean
    (damped) Gram: orthonormal there, spanning the top principal subspace."""
    projections = _random_projections(5, 6, 4)
    unit = masa_method.Unit("q", "q_proj", projections, masa_method.cross_products(projections))
    mix = masa_method._mean_gram_atoms(unit.cross, 3)  # (n, 3)
    mean_chol = torch.linalg.cholesky(torch.stack([p.chol @ p.chol.T for p in projections]).mean(0))
    whitened_atoms = (unit.combine(mix) @ mean_chol).flatten(1)  # (3, d_out*d_in)
    torch.testing.assert_close(
        whitened_atoms @ whitened_atoms.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    stacked = torch.stack([(p.weight @ mean_chol).reshape(-1) for p in projections])  # (n, d_out*d_in)
    top = torch.linalg.svd(stacked, full_matrices=False)[2][:3]  # (3, d_out*d_in) principal directions
    torch.testing.assert_close(whitened_atoms.T @ whitened_atoms, top.T @ top, atol=1e-5, rtol=0)


def test_consumable_statistics_are_dropped_once_factorised():
    """A streamed compression's statistics are read once: masa keeps the Cholesky factors, not the Grams."""
    model, config, stats = _prepared("llama")
    stats.consumable = True
    by_role = masa_method._projections(resolve_layout(model, config), stats)
    assert stats.grams == {} and sum(len(ps) for ps in by_role.values()) == 4 * 4


def test_shared_structure_is_found_and_wins():
    model, config, stats = _prepared("llama", n_layer=6, structured=ATTENTION, groups=2, role_weights={})
    masa_objective, svd_objective, report = _masa_vs_svd_llm(model, config, stats)
    assert report["objective"] == pytest.approx(masa_objective, rel=1e-4)  # the layers hold the fit
    assert json.loads(json.dumps(report)) == report
    for role in ATTENTION:
        groups = report["roles"][role]["groups"]
        assert [g["blocks"] for g in groups] == [[0, 1, 2], [3, 4, 5]]
        assert all(g["atoms"] >= 1 for g in groups)
        assert all(g["search"][str(g["atoms"])] <= g["search"]["0"] for g in groups)
    assert masa_objective < 0.2 * svd_objective
    q = [block.self_attn.q_proj for block in model.model.layers]
    assert all(isinstance(layer, (RefinedSharedLinear, SharedLinear)) for layer in q)
    atoms = {
        (layer.shared if isinstance(layer, RefinedSharedLinear) else layer).dictionary.atoms for layer in q
    }
    assert len(atoms) == 2  # one dictionary per group, referenced by its blocks


@pytest.mark.parametrize(
    "curve",
    [
        lambda s: s,  # rising: no atoms
        lambda s: -s,  # falling: as many atoms as the budget allows
        lambda s: (s - 5) ** 2,  # a minimum between grid points
        lambda s: (s - 11) ** 2,  # just below the top of the grid
        lambda s: min((s - 3) ** 2, (s - 31) ** 2 - 1),  # two valleys, the deeper one at the top (real q/o)
        lambda s: abs(s - 21) + (s == 0) * 100,  # a kink
    ],
)
def test_atom_count_search_finds_the_minimum_in_few_tries(curve):
    tried = []

    def error_of(s):
        tried.append(s)
        return float(curve(s))

    _atom_counts(31, error_of)
    assert min(tried, key=curve) == min(range(32), key=curve)
    assert len(tried) == len(set(tried)) <= 16  # about 3 log2(32); every count would be 32


def test_searched_plan_equals_the_exhaustive_float64_search(monkeypatch):
    """The grid and the float32 spectra only choose S: the plan is the exhaustive float64 search's."""
    model, config, stats = _prepared("llama", n_layer=8, structured=("q", "k", "v"), noise=0.3, ratio=0.3)
    fast = compress(copy.deepcopy(model), config, stats=stats).report
    monkeypatch.setattr(masa_method, "SEARCH_DTYPE", torch.float64)
    monkeypatch.setattr(
        masa_method, "_atom_counts", lambda s_max, error_of: [error_of(s) for s in range(s_max + 1)]
    )
    exhaustive = compress(model, config, stats=stats).report
    assert fast["objective"] == pytest.approx(exhaustive["objective"], rel=1e-12)
    for role in ATTENTION:
        chosen = [(g["blocks"], g["atoms"], g["ranks"]) for g in fast["roles"][role]["groups"]]
        assert chosen == [(g["blocks"], g["atoms"], g["ranks"]) for g in exhaustive["roles"][role]["groups"]]
    assert any(g["atoms"] for role in ("q", "k", "v") for g in fast["roles"][role]["groups"])


def test_atom_counts_ruled_out_early_leave_the_plan_unchanged(monkeypatch):
    """An atom count is dropped once the blocks scored so far already lose to a better count: the same plan."""
    model, config, stats = _prepared("llama", n_layer=8, structured=("q", "k", "v"), noise=0.3, ratio=0.3)
    pruned = compress(copy.deepcopy(model), config, stats=stats).report
    monkeypatch.setattr(masa_method, "_pooled_error", lambda *args: -math.inf)  # never a bound: every block
    full = compress(model, config, stats=stats).report
    assert pruned["objective"] == full["objective"]
    tried = {"pruned": 0, "full": 0}
    for role in ATTENTION:
        for name, report in (("pruned", pruned), ("full", full)):
            tried[name] += sum(len(g["search"]) for g in report["roles"][role]["groups"])
        chosen = [(g["blocks"], g["atoms"], g["ranks"]) for g in pruned["roles"][role]["groups"]]
        assert chosen == [(g["blocks"], g["atoms"], g["ranks"]) for g in full["roles"][role]["groups"]]
    assert tried["pruned"] < tried["full"]  # some counts were ruled out before all their blocks were scored


def test_losing_groupings_are_abandoned_and_the_plan_is_unchanged(monkeypatch):
    """A candidate grouping stops being fitted once it cannot beat the one before it: the same plan."""
    model, config, stats = _prepared("llama", n_layer=8, structured=("q", "k", "v"), noise=0.3, ratio=0.3)
    abandoned = compress(copy.deepcopy(model), config, stats=stats).report
    monkeypatch.setattr(masa_method, "_pooled_error", lambda *args: -math.inf)  # never a bound
    full = compress(model, config, stats=stats).report
    assert abandoned["objective"] == full["objective"]
    for role in ATTENTION:
        kept, every = abandoned["roles"][role]["groupings"], full["roles"][role]["groupings"]
        assert [c["groups"] for c in kept] == [c["groups"] for c in every]
        for short, whole in zip(kept, every, strict=True):  # a candidate left unfinished lost
            assert short["whitened_error"] in (None, whole["whitened_error"])
        chosen = [(g["blocks"], g["atoms"], g["ranks"]) for g in abandoned["roles"][role]["groups"]]
        assert chosen == [(g["blocks"], g["atoms"], g["ranks"]) for g in full["roles"][role]["groups"]]
    assert any(c["whitened_error"] is None for r in ATTENTION for c in abandoned["roles"][r]["groupings"])


def test_tiny_ratio_reproduces_identical_blocks(ids):
    model, config, stats = _prepared("llama", structured=ATTENTION, noise=0.0, ratio=1e-3)
    reference = outputs(model, ids)
    report = compress(model, config, stats=stats).report
    assert all(g["atoms"] >= 1 for role in ATTENTION for g in report["roles"][role]["groups"])
    torch.testing.assert_close(outputs(model, ids), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip(family, ids, tmp_path):
    model, config, stats = _prepared(family, structured=("q", "k", "v"))
    report = compress(model, config, stats=stats).report
    kinds = {type(model.get_submodule(name)) for name in stats.grams}
    assert LowRankLinear in kinds and kinds & {RefinedSharedLinear, SharedLinear}  # o: no shared structure
    assert report["roles"]["o"]["groups"][0]["atoms"] == 0
    reference = outputs(model, ids)
    masa.save(model, tmp_path / "m")
    loaded = masa.load(tmp_path / "m")
    assert torch.equal(outputs(loaded, ids), reference)
    assert masa.count(loaded).ratio(ATTENTION) == pytest.approx(masa.count(model).ratio(ATTENTION))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"groups": "sometimes"}, "not 'auto'"),
        ({"groups": 0}, "not 'auto'"),
        ({"groups": [[0, 1], "2"]}, "not 'auto'"),
        ({"groups": "auto", "max_groups": 0}, "max_groups"),
        ({"groups": 2, "kl_threshold": 0.5}, "groups='auto' only"),
        ({"role_weights": {"q": -1}}, "positive numbers"),
        ({"atoms": 3}, "no option ['atoms']"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        method_options(MasaOptions, CompressConfig("masa", 0.4, options=options))


@pytest.mark.parametrize(
    "family, options, message",
    [
        ("llama", {"groups": [[0, 1], [2]]}, "leave out"),
        ("llama", {"groups": [[0, 1], [1, 2, 3]]}, "disjoint"),
        ("llama", {"groups": [[0, 1], [2, 7]]}, "outside"),
        ("llama", {"groups": 9}, "at most one group per block"),
        ("bert", {"kl_threshold": 0.5}, "logit-lens"),
    ],
)
def test_bad_groups_are_refused(family, options, message):
    model, config, stats = _prepared(family, **options)
    with pytest.raises(ValueError, match=message):
        compress(model, config, stats=stats)


def test_auto_groups_cut_at_the_largest_drifts():
    kl = [0.1, 5.0, 0.2, 0.1, 3.0]  # drift after blocks 1 and 4
    auto = _groupings(MasaOptions(max_groups=3), kl, 6)
    assert auto == [[[0, 1, 2, 3, 4, 5]], [[0, 1], [2, 3, 4, 5]], [[0, 1], [2, 3, 4], [5]]]
    assert _groupings(MasaOptions(kl_threshold=1.0), kl, 6) == [[[0, 1], [2, 3, 4], [5]]]
    assert _groupings(MasaOptions(max_groups=2), None, 6) == [[[0, 1, 2, 3, 4, 5]], [[0, 1, 2], [3, 4, 5]]]


def test_allocation_spends_the_budget_on_the_largest_values():
    spectra = [torch.tensor([9.0, 4.0, 1.0]), torch.tensor([8.0, 0.5])]
    assert _allocate(spectra, [2, 3], [1.0, 1.0], [0, 0], budget=7) == [2, 1]  # 4.5, 2.67, 2.0 per number
    assert _allocate(spectra, [2, 3], [1.0, 1.0], [1, 1], budget=6) == [1, 1]
    assert _allocate(spectra, [2, 3], [1.0, 1.0], [1, 1], budget=4) is None
    assert _allocate(spectra, [2, 3], [1.0, 4.0], [0, 0], budget=3) == [0, 1]  # weights move rank
