"""The layer protocol: every masa layer reproduces its output from ``to_dense``, counts what it stores,
and names the kind of each parameter (the classifier healing and per-kind learning rates use)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build

import masa
from masa.compress import CompressConfig, compress
from masa.nn import KINDS, MasaLinear, parameter_kinds

# method -> the kinds its layers must introduce
EXPECTED = {
    "svd-llm": {"factors"},
    "basis-sharing": {"basis", "coefficients", "factors"},  # o and down stay per-layer low-rank
    "cospadi": {"basis", "codes"},
    "masa": {"atoms", "coefficients"},
}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


def _compressed(method: str, tokens: torch.Tensor, family: str = "llama") -> torch.nn.Module:
    model = build(family, n_layer=4)
    with torch.no_grad():  # blocks alike (copies of block 0 plus noise), so that atoms pay off
        for block in model.model.layers[1:]:
            for p, p0 in zip(block.parameters(), model.model.layers[0].parameters(), strict=True):
                p.copy_(p0 + 1e-3 * torch.randn_like(p0))
    options = {"iterations": 2} if method == "cospadi" else {}
    compress(model, CompressConfig(method, 0.3, targets=("all-linear",), options=options), tokens)
    return model


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_layers_follow_the_protocol(method, tokens):
    model = _compressed(method, tokens)
    layers = [m for m in model.modules() if isinstance(m, MasaLinear)]
    assert layers
    x = torch.randn(3, layers[0].in_features)
    for layer in layers:
        bias = getattr(layer, "bias", None)
        if bias is None and hasattr(layer, "shared"):
            bias = getattr(layer.shared, "bias", None)
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), bias), atol=1e-5, rtol=1e-5)
        assert layer.to_dense().shape == (layer.out_features, layer.in_features)
        assert layer.stored_numel() < layer.dense_numel() or method in ("masa", "basis-sharing")
        assert layer.stored_bytes() == sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    kinds = parameter_kinds(model)
    assert set(kinds) == {n for n, _ in model.named_parameters()}
    assert set(kinds.values()) <= set(KINDS)
    assert EXPECTED[method] <= set(kinds.values())
    assert {kinds[n] for n in kinds if "norm" in n} == {"norm"}
    assert kinds["model.embed_tokens.weight"] == "dense"
    stored = sum(m.stored_numel() for m in layers if not any(m is not o and m in o.modules() for o in layers))
    atoms = sum(p.numel() for n, p in model.named_parameters() if kinds[n] in ("atoms", "generator"))
    assert masa.count(model).ratio() == pytest.approx(
        1 - (stored + atoms) / sum(m.dense_numel() for m in layers if m.in_features and _is_target(m, layers))
    )


def _is_target(layer: MasaLinear, layers: list[MasaLinear]) -> bool:
    """An outermost masa layer (a refined layer's inner shared and low-rank parts are not targets)."""
    return not any(layer is not other and layer in other.modules() for other in layers)


def test_split_fused_layer_is_exact_and_dense(tokens):
    model = build("phi3", n_layer=2)
    fused = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    masa.share(model, atoms=2, targets=["q"])  # unfuses first
    split = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(split, MasaLinear)
    q_rows = split.q.out_features
    dense = split.to_dense()
    torch.testing.assert_close(dense[q_rows:], fused[q_rows:])  # k and v untouched
    assert parameter_kinds(model)["masa_bank.dictionaries.q_g0.atoms"] == "atoms"


def test_generator_parameters_are_their_own_kind():
    model = build("llama", n_layer=3)
    masa.share(model, atoms=2, init="random", generator=True)
    kinds = parameter_kinds(model)
    assert {k for n, k in kinds.items() if ".generator." in n} == {"generator"}
    assert "coefficients" not in kinds.values()  # the generator produces them
