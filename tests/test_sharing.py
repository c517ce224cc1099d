"""Shared matrix atoms: exact conversion, one owner per dictionary, graceful degradation, errors."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, build, outputs

import masa
from masa.sharing import AtomDictionary, SharedLinear, collapse_generators, matrix_pca, share, shared_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_full_dictionary_reproduces_outputs(family, ids):
    model = build(family)
    reference = outputs(model, ids)
    report = share(model, atoms=4, targets=("q", "k", "v", "o", "up", "down"))
    assert len(report.dictionaries) == 6
    torch.testing.assert_close(outputs(model, ids), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_atoms_degrade_gracefully(family, ids):
    reference = outputs(build(family), ids)
    errors, unexplained = [], []
    for atoms in (4, 3, 2, 1):
        model = build(family)
        report = share(model, atoms=atoms)
        errors.append((outputs(model, ids) - reference).pow(2).mean().item())
        unexplained.append(report.dictionaries[0].unexplained)
    assert errors[0] < 1e-10 and unexplained[0] < 1e-10
    assert unexplained == sorted(unexplained)  # PCA: fewer atoms, more weight energy left out
    assert min(errors[1:]) > errors[0]
    assert max(errors) < reference.var().item() * 4  # degraded, not destroyed


def test_atoms_are_one_tensor_seen_by_every_layer():
    model = build("llama", n_layer=6)
    share(model, atoms=2)
    q_layers = [blk.self_attn.q_proj for blk in model.model.layers]
    assert all(isinstance(layer, SharedLinear) for layer in q_layers)
    pointers = {layer.dictionary.atoms.data_ptr() for layer in q_layers}
    assert len(pointers) == 1
    keys = [k for k in model.state_dict() if k.endswith("atoms")]
    assert sorted(keys) == sorted(f"masa_bank.dictionaries.{r}_g0.atoms" for r in "qkvo")
    # the dictionary is not registered under the layers: one owner only
    assert not any(isinstance(m, AtomDictionary) for m in q_layers[0].modules())


def test_gradients_reach_atoms_and_coefficients(ids):
    model = build("llama")
    share(model, atoms=2, init="random")
    model.train()
    outputs(model, ids).sum().backward()
    bank = model.masa_bank.dictionaries
    assert bank["q_g0"].atoms.grad is not None and bank["q_g0"].atoms.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.coefficients.grad is not None


def test_deepcopy_and_to_keep_one_dictionary(ids):
    model = build("llama")
    share(model, atoms=2)
    clone = copy.deepcopy(model)
    layers = shared_layers(clone)
    assert {id(la.dictionary) for la in layers if la.dictionary.role == "q"} == {
        id(clone.masa_bank.dictionaries["q_g0"])
    }
    assert clone.masa_bank.dictionaries["q_g0"] is not model.masa_bank.dictionaries["q_g0"]
    torch.testing.assert_close(outputs(clone, ids), outputs(model, ids))
    clone.to(torch.float64)
    assert shared_layers(clone)[0].dictionary.atoms.dtype == torch.float64
    assert outputs(clone, ids.clone()).dtype == torch.float64


def test_inference_cache_tracks_updates(ids):
    model = build("llama")
    share(model, atoms=2)
    with torch.no_grad():
        before = outputs(model, ids)
        model.masa_bank.dictionaries["q_g0"].atoms.mul_(0.5)
        after = outputs(model, ids)
    assert not torch.allclose(before, after)


def test_groups_give_one_dictionary_each(ids):
    model = build("llama", n_layer=6)
    reference = outputs(model, ids)
    report = share(model, atoms=3, groups=2, targets=("q", "k"))
    assert [d.members for d in report.dictionaries] == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]
    torch.testing.assert_close(outputs(model, ids), reference, atol=1e-5, rtol=0)


def test_ratio_budget_and_count():
    model = build("llama", n_layer=6)
    share(model, ratio=2 / 3)
    counted = masa.count(model)
    assert abs(counted.attention_ratio - 2 / 3) < 0.03
    assert [d.n_atoms for d in model.masa_bank.dictionaries.values()] == [2, 2, 2, 2]


def test_exclude_keeps_blocks_dense():
    model = build("llama")
    report = share(model, atoms=2, exclude=[r"layers\.0\."])
    assert report.dictionaries[0].members == [1, 2, 3]
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def test_coefficient_generator_collapses_exactly(ids):
    model = build("llama")
    share(model, atoms=2, init="random", generator=True)
    assert model.model.layers[0].self_attn.q_proj.coefficients is None
    with torch.no_grad():
        before = outputs(model, ids)
    collapse_generators(model)
    assert model.masa_bank.dictionaries["q_g0"].generator is None
    torch.testing.assert_close(outputs(model, ids), before, atol=1e-6, rtol=0)


def test_matrix_pca_atoms_are_orthonormal():
    weights = torch.randn(6, 5, 4, dtype=torch.float64)
    atoms, coeffs = matrix_pca(weights, 3)
    gram = torch.einsum("aij,bij->ab", atoms, atoms)
    torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(coeffs, torch.einsum("lij,sij->ls", weights, atoms))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"atoms": 0}, "at least one atom"),
        ({"atoms": 5}, "more atoms than blocks"),
        ({"ratio": 1.5}, r"outside \(0, 1\)"),
        ({"ratio": 0.0}, r"outside \(0, 1\)"),
        ({"atoms": 2, "ratio": 0.5}, "exactly one budget"),
        ({}, "exactly one budget"),
        ({"atoms": 2, "targets": ["nonexistent_proj"]}, "matches no linear module"),
        ({"atoms": 2, "targets": ["gate"], "blocks": "model.layers"}, None),
        ({"atoms": 2, "init": "zeros"}, "init must be one of"),
        ({"atoms": 2, "groups": 9}, "9 groups for 4 blocks"),
        ({"atoms": 2, "blocks": "model.nowhere"}, "no block list"),
    ],
)
def test_bad_input_is_explained(kwargs, match):
    model = build("llama")
    if match is None:
        share(model, **kwargs)  # explicit blocks path is accepted
        return
    with pytest.raises((ValueError, TypeError), match=match):
        share(model, **kwargs)


def test_shapes_that_cannot_share_are_rejected():
    model = build("llama")
    model.model.layers[2].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match="cannot share one dictionary"):
        share(model, atoms=2, targets=["q"])


def test_unsupported_architecture_names_the_escape_hatch():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

    with pytest.raises(ValueError, match="Supported: .*llama.*blocks="):
        share(Custom(), atoms=2)
    model = Custom()
    x = torch.randn(2, 8)
    ref = model.blocks[1].proj(x)
    share(model, atoms=3, blocks="blocks", targets=["proj"])
    torch.testing.assert_close(model.blocks[1].proj(x), ref, atol=1e-6, rtol=0)


def test_sharing_twice_is_refused():
    model = build("llama")
    share(model, atoms=2, targets=["q"])
    with pytest.raises(ValueError, match="already shared"):
        share(model, atoms=2, targets=["q"], blocks="model.layers")


def test_native_generator_model_saves_and_loads_after_collapse(tmp_path, ids):
    from masa.model import MasaLM, MasaLMConfig

    config = MasaLMConfig(
        vocab_size=64,
        n_layer=3,
        n_head=4,
        d_model=32,
        max_seq_len=16,
        attention="masa-qkvo",
        n_atoms=2,
        coef_generator=True,
    )
    model = MasaLM(config).eval()
    collapse_generators(model)
    masa.save(model, tmp_path / "m")
    torch.testing.assert_close(masa.load(tmp_path / "m")(ids), model(ids), atol=0, rtol=0)


def test_generator_runs_once_per_forward_and_follows_updates(ids):
    """One generator evaluation serves every layer of a forward; gradients and updates stay exact."""
    model = build("llama", n_layer=4)
    share(model, atoms=2, init="random", generator=True)
    reference = copy.deepcopy(model)
    for dictionary in reference.masa_bank.dictionaries.values():
        dictionary.generated_coefficients = dictionary.generator  # uncached: every layer runs the MLP
    calls = []
    for dictionary in model.masa_bank.dictionaries.values():
        dictionary.generator.register_forward_hook(lambda *_: calls.append(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(2):  # a second step must see the updated generator, not a stale cache
        calls.clear()
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            m(ids).logits.square().mean().backward()
            opt.step()
        assert len(calls) == len(model.masa_bank.dictionaries), step  # once per dictionary, not per layer
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("call", ["share", "count", "save", "compress"])
def test_a_path_where_a_model_belongs_is_a_clear_error(call, tmp_path):
    from masa.compress import CompressConfig, compress

    calls = {
        "share": lambda: masa.share("model", atoms=2),
        "count": lambda: masa.count("model"),
        "save": lambda: masa.save("model", tmp_path / "out"),
        "compress": lambda: compress("model", CompressConfig("svd", 0.2)),
    }
    with pytest.raises(TypeError, match=r"needs a model \(a torch.nn.Module\), got str; load it first"):
        calls[call]()
