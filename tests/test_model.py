"""Native decoder LM: every attention variant, sharing invariants, budgets, Llama exchange, sampling."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import NATIVE_KNOBS

from masa.model import (
    ATTENTION_VARIANTS,
    MasaLM,
    MasaLMConfig,
    attention_ratio,
    configure_for_budget,
    from_llama,
    generate,
    module_assignment,
    to_llama,
)
from masa.nn.shared import AtomDictionary

SHARED = ("seq-share", "cycle-share", "masa-qkv", "masa-qkvo")


def tiny(attention: str = "dense", **overrides) -> MasaLMConfig:
    fields = dict(vocab_size=64, n_layer=4, n_head=4, d_model=32, max_seq_len=16, attention=attention)
    return MasaLMConfig(**(fields | NATIVE_KNOBS[attention] | overrides))


def build(attention: str = "dense", seed: int = 0, **overrides) -> MasaLM:
    torch.manual_seed(seed)
    return MasaLM(tiny(attention, **overrides))


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_forward_and_backward_every_variant(attention):
    model = build(attention)
    logits = model(tokens())
    assert logits.shape == (2, 8, 64) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_coefficient_generator_trains():
    model = build("masa-qkvo", coef_generator=True)
    model(tokens()).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.masa_bank.parameters())


@pytest.mark.parametrize("attention", ["masa-qkv", "masa-qkvo"])
@pytest.mark.parametrize("seed", [0, 1])
def test_generator_starts_each_block_with_its_own_coefficients(attention, seed):
    """Generated coefficients have std 1/sqrt(S) and differ from block to block."""
    model = build(attention, seed, n_layer=12, n_atoms=4, coef_generator=True)
    dictionaries = [m for m in model.masa_bank.modules() if isinstance(m, AtomDictionary)]
    assert len(dictionaries) == {"masa-qkv": 3, "masa-qkvo": 4}[attention]
    for dictionary in dictionaries:
        with torch.no_grad():
            c = dictionary.generator()  # (L, S)
        assert c.shape == (12, 4)
        assert c.std().item() == pytest.approx(0.5, rel=1e-4)  # 1/sqrt(S), like plain coefficients
        spread = c.std(dim=0).mean().item()  # across blocks, per atom: 0.0006 with the first init
        assert spread > 0.25, spread
        gaps = torch.cdist(c, c) + torch.eye(12) * 1e9  # distance between any two blocks' coefficients
        assert gaps.min().item() > 0.1


def test_seq_and_cycle_assignment_by_identity():
    seq, cyc = build("seq-share", n_layer=6, n_unique=3), build("cycle-share", n_layer=6, n_unique=3)
    for model, pattern in ((seq, [0, 0, 1, 1, 2, 2]), (cyc, [0, 1, 2, 0, 1, 2])):
        assert [
            next(j for j, m in enumerate(model.shared_attn) if m is b.self_attn) for b in model.layers
        ] == pattern
    assert module_assignment(tiny("seq-share", n_layer=7, n_unique=3)) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("attention", SHARED)
def test_shared_state_dict_is_unique_and_saves(attention, tmp_path):
    model = build(attention)
    state = model.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    if attention in ("seq-share", "cycle-share"):  # one key per unique module, none per block
        assert sorted(k for k in state if k.endswith("q_proj.weight")) == [
            f"shared_attn.{i}.q_proj.weight" for i in (0, 1)
        ]
    save_file(state, str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("attention", ["cycle-share", "masa-qkvo"])
def test_deepcopy_and_to_keep_sharing(attention):
    model = build(attention)
    clone = copy.deepcopy(model).to(torch.float64)
    if attention == "cycle-share":
        assert clone.layers[0].self_attn is clone.shared_attn[0] is clone.layers[2].self_attn
        assert clone.layers[0].self_attn is not model.shared_attn[0]
    else:
        atoms = {b.self_attn.q_proj.dictionary.atoms.data_ptr() for b in clone.layers}
        assert atoms == {clone.layers[0].self_attn.q_proj.dictionary.atoms.data_ptr()}
        assert clone.layers[0].self_attn.q_proj.dictionary.atoms.dtype == torch.float64
    torch.testing.assert_close(clone(tokens()), model(tokens()).double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention", ["masa-qkv", "masa-qkvo"])
def test_masa_atoms_are_one_tensor(attention):
    model = build(attention)
    roles = (
        ("q_proj", "k_proj", "v_proj", "o_proj")
        if attention == "masa-qkvo"
        else ("q_proj", "k_proj", "v_proj")
    )
    for role in roles:
        ptrs = {getattr(b.self_attn, role).dictionary.atoms.data_ptr() for b in model.layers}
        assert len(ptrs) == 1
    if attention == "masa-qkv":
        assert isinstance(model.layers[0].self_attn.o_proj, torch.nn.Linear)


def test_masa_training_reduces_loss():
    model = build("masa-qkvo")
    batch = tokens(4, 16, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


BUDGET_BASE = MasaLMConfig(vocab_size=64, n_layer=12, n_head=4, d_model=48, max_seq_len=16)


@pytest.mark.parametrize("attention", ["lowrank", "seq-share", "cycle-share", "masa-qkvo"])
def test_configure_for_budget_reaches_two_thirds(attention):
    config, ratio = configure_for_budget(BUDGET_BASE, attention, 2 / 3)
    assert config.attention == attention and abs(ratio - 2 / 3) < 0.02
    assert ratio == attention_ratio(config)


def test_configure_for_budget_limits():
    gqa, ratio = configure_for_budget(
        BUDGET_BASE, "gqa", 2 / 3
    )  # gqa stays below 50 %: closest is g = n_head
    assert gqa.gqa_groups == 4 and ratio == pytest.approx((1 - 1 / 4) / 2)
    qkv, ratio = configure_for_budget(BUDGET_BASE, "masa-qkv", 0.5)  # the paper's S = L/3
    assert qkv.n_atoms == 4 and abs(ratio - 0.5) < 0.01
    with pytest.raises(ValueError, match="masa-qkv keeps O"):
        configure_for_budget(BUDGET_BASE, "masa-qkv", 0.8)


@pytest.mark.parametrize(
    ("attention", "overrides"),
    [("dense", {"tie_embeddings": True}), ("gqa", {}), ("lowrank", {}), ("seq-share", {}), ("masa-qkvo", {})],
)
def test_llama_export_is_exact(attention, overrides):
    model = build(attention, **overrides).eval()
    llama = to_llama(model)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids), rtol=0, atol=1e-5)
    if attention in ("dense", "gqa"):
        back = from_llama(llama)
        assert back.config == dataclasses.replace(model.config, d_ff=model.config.ff_dim)
        with torch.no_grad():
            torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="materialize=True"):
            to_llama(model, materialize=False)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"attention": "sparse"}, ValueError, "choose one of"),
        ({"attention": "lowrank"}, ValueError, "needs rank"),
        ({"attention": "masa-qkvo", "n_atoms": 5}, ValueError, r"n_atoms=5 is out of range.*\[1, 4\]"),
        ({"attention": "gqa", "gqa_groups": 3}, ValueError, "must divide n_head"),
        ({"rank": 4}, ValueError, "not used by attention='dense'"),
        ({"d_model": 30}, ValueError, "not divisible by n_head"),
        ({"n_layer": 4.0}, TypeError, "expected int"),
        ({"tie_embeddings": 1}, TypeError, "expected bool"),
    ],
)
def test_config_validation(overrides, error, match):
    fields = dict(vocab_size=64, n_layer=4, n_head=4, d_model=32)
    with pytest.raises(error, match=match):
        MasaLMConfig(**(fields | overrides))


def test_config_dict_round_trip():
    config = tiny("masa-qkvo", coef_generator=True)
    d = config.to_dict()
    assert d["model_type"] == "masa_lm" and MasaLMConfig.from_dict(d) == config
    with pytest.raises(
        ValueError, match=r"unknown MasaLMConfig field\(s\) \['n_embd'\]; valid fields: vocab_size"
    ):
        MasaLMConfig.from_dict(d | {"n_embd": 32})
    assert dataclasses.replace(config, d_model=64).ff_dim == 192


def test_generate_in_range_deterministic_and_cropped():
    model = build("dense")
    prompt = tokens(1, 10)
    runs = [generate(model, prompt, 12, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0].shape == (1, 22) and torch.equal(runs[0], runs[1])  # 22 > max_seq_len: context cropped
    assert torch.equal(runs[0][:, :10], prompt) and runs[0].min() >= 0 and runs[0].max() < 64
    greedy = generate(model, prompt, 4, temperature=0)
    assert torch.equal(generate(to_llama(model), prompt, 4, temperature=0), greedy)
