"""Runtime modes: every compressed layer type runs compact (only what was saved) or dense (plain
``nn.Linear``), with equal outputs and ``generate``, resident bytes as predicted and never both copies."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build

import masa
from masa.compress import CompressConfig, compress
from masa.nn import (
    AtomDictionary,
    BasisLinear,
    LowRankLinear,
    MasaLinear,
    RefinedSharedLinear,
    SharedLinear,
    SparseCodeLinear,
    SplitLinear,
    masa_layers,
    resident_bytes,
    set_runtime,
)

# (family, method) -> the layer types it must put into the model
CASES = {
    ("llama", "svd-llm"): {LowRankLinear},
    ("llama", "basis-sharing"): {BasisLinear},
    ("llama", "cospadi"): {SparseCodeLinear},
    ("llama", "masa"): {SharedLinear, RefinedSharedLinear},
    ("gpt2", "masa"): {SplitLinear, SharedLinear},
}
OPTIONS = {"cospadi": {"iterations": 2}}


def _similar_blocks(model: torch.nn.Module) -> None:
    """Blocks alike (block 0 plus noise), so that shared atoms pay off and masa refines them."""
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    with torch.no_grad():
        for block in blocks[1:]:
            for p, p0 in zip(block.parameters(), blocks[0].parameters(), strict=True):
                p.copy_(p0 + 1e-3 * torch.randn_like(p0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(family, method) -> a saved compressed tiny model."""
    root = tmp_path_factory.mktemp("runtime")
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    out = {}
    for (family, method), _ in CASES.items():
        torch.manual_seed(0)
        model = build(family, n_layer=4)
        _similar_blocks(model)
        config = CompressConfig(method, 0.3, targets=("all-linear",), options=OPTIONS.get(method, {}))
        compress(model, config, calib=tokens)
        out[family, method] = masa.save(model, root / f"{family}-{method}")
    return out


def _file_bytes(directory: Path) -> int:
    """Bytes of the tensors saved in ``directory``."""
    return sum(t.numel() * t.element_size() for t in load_file(directory / "model.safetensors").values())


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: "-".join(c))
def test_compact_and_dense_agree(case, saved, ids):
    compact = masa.load(saved[case], runtime="compact")
    dense = masa.load(saved[case], runtime="dense")
    types = {type(m) for m in compact.modules()}
    assert CASES[case] <= types
    # compact holds what was saved: resident bytes = the file's tensor bytes (+ tiny rotary tables)
    stored = _file_bytes(saved[case])
    assert stored <= resident_bytes(compact) <= stored * 1.02
    assert all(b.dtype == torch.uint8 for n, b in compact.named_buffers() if n.endswith("indices"))
    # dense: every masa layer is a plain nn.Linear, no atoms left, as many bytes as the dense layers
    names = masa_layers(compact)
    assert all(type(dense.get_submodule(n)) is torch.nn.Linear for n in names)
    assert not any(isinstance(m, (MasaLinear, AtomDictionary)) for m in dense.modules())
    predicted = resident_bytes(compact) - sum(
        resident_bytes(m) for m in [*names.values(), *_dictionaries(compact)]
    ) + sum(layer.dense_numel() * 4 for layer in names.values())  # fmt: skip
    assert resident_bytes(dense) == predicted
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
        greedy = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        torch.testing.assert_close(compact.generate(ids, **greedy), dense.generate(ids, **greedy))


def _dictionaries(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, AtomDictionary)]


def test_compact_decoding_paths_match_the_dense_weight():
    """Few tokens take the gather / thin-matmul paths, many the transient-weight paths: same outputs."""
    torch.manual_seed(0)
    from masa.nn import SharedBasis

    basis = SharedBasis(16, 24)
    torch.nn.init.normal_(basis.weight)
    codes = SparseCodeLinear(basis, 20, sparsity=3, bias=True)
    torch.nn.init.normal_(codes.values)
    codes.indices.copy_(torch.randint(0, 16, (20, 3)).to(torch.uint8))
    dictionary = AtomDictionary(3, 20, 24, n_blocks=4)
    torch.nn.init.normal_(dictionary.atoms)
    shared = SharedLinear(dictionary, 1, bias=True)
    torch.nn.init.normal_(shared.coefficients)
    torch.nn.init.normal_(shared.bias)
    correction = LowRankLinear(24, 20, rank=2)
    correction.reset_parameters(0.1)
    refined = RefinedSharedLinear(shared, correction)
    for layer in (codes, refined):
        linear = layer.to_linear()
        for tokens in (1, 64):
            x = torch.randn(2, tokens, 24)
            with torch.no_grad():
                torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_atoms", [1, 3])
def test_shared_layer_applies_atoms_directly_for_one_atom_or_one_token(n_atoms):
    """One atom, or one token, runs y = sum_s c_s x D_s^T; otherwise the weight is built: same outputs
    and gradients as the dense weight either way."""
    torch.manual_seed(0)
    dictionary = AtomDictionary(n_atoms, 20, 24, n_blocks=4)
    torch.nn.init.normal_(dictionary.atoms)
    shared = SharedLinear(dictionary, 1, bias=True)
    torch.nn.init.normal_(shared.coefficients)
    torch.nn.init.normal_(shared.bias)
    for shape in [(24,), (1, 1, 24), (2, 1, 24), (2, 64, 24)]:
        x = torch.randn(shape)
        y = shared(x)
        reference = torch.nn.functional.linear(x, shared.to_dense().detach(), shared.bias.detach())
        torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), [dictionary.atoms, shared.coefficients])
        weight = dictionary.weights(shared.coefficients)
        expected = torch.autograd.grad(
            torch.nn.functional.linear(x, weight, shared.bias).square().sum(),
            [dictionary.atoms, shared.coefficients],
        )
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_training_keeps_gradients_in_compact_form(saved, ids):
    model = masa.load(saved["llama", "masa"]).train()
    model(ids, labels=ids).loss.backward()
    atoms = _dictionaries(model)[0].atoms
    refined = next(m for m in model.modules() if isinstance(m, RefinedSharedLinear))
    assert atoms.grad is not None and atoms.grad.abs().sum() > 0
    assert refined.correction.up.grad is not None and refined.shared.coefficients.grad is not None


def test_bad_runtime_modes_are_refused(saved):
    with pytest.raises(ValueError, match="unknown runtime mode 'fast'.*compact, dense"):
        masa.load(saved["llama", "svd-llm"], runtime="fast")
    dense = masa.load(saved["llama", "svd-llm"], runtime="dense")
    with pytest.raises(ValueError, match="already dense.*runtime='compact'"):
        set_runtime(dense, "compact")

    class CompactOnly(LowRankLinear):
        RUNTIMES = ("compact",)

    model = torch.nn.Sequential(CompactOnly(8, 8, 2))
    with pytest.raises(ValueError, match="CompactOnly offers only the runtime modes compact"):
        set_runtime(model, "dense")


def test_a_generator_must_be_collapsed_before_going_dense():
    model = build("llama", n_layer=4)
    masa.share(model, atoms=2, targets=("self_attn.q_proj",), generator=True)
    with pytest.raises(ValueError, match="coefficient generator.*masa.collapse_generators"):
        set_runtime(model, "dense")
    masa.collapse_generators(model)
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        torch.testing.assert_close(set_runtime(model, "dense")(ids).logits, before, atol=1e-5, rtol=1e-5)
    assert not hasattr(model, "masa_bank")


def test_bench_infer_wiring(saved, tmp_path):
    """`masa bench infer` on a tiny original and compressed model: both modes, ratios, files."""
    import json

    from masa.cli import main

    original = masa.save(build("llama", n_layer=4), tmp_path / "original")
    models = [str(original), str(saved["llama", "masa"])]
    argv = ["bench", "infer", *models, "--batch", "2", "--prompt-len", "8", "--new-tokens", "3"]
    assert main([*argv, "--rounds", "1", "--warmup", "0", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "infer.json").read_text())
    runtimes = [v["runtime"] for v in results["variants"]]
    assert runtimes == ["plain", "compact", "dense"]
    first = results["variants"][0]
    assert first["prefill"]["vs_reference"] == 1.0 and set(first) >= {"decode_b1", "decode_b2"}
    compact = results["variants"][1]
    assert compact["resident_bytes"] <= compact["stored_bytes"] * 1.02
    assert (tmp_path / "out" / "infer.md").is_file() and (tmp_path / "out" / "prefill.png").is_file()
    assert results["clock"] == "wall" and len(first["prefill"]["times_s"]) == 1


def test_bench_infer_cpu_clock(saved, tmp_path):
    """``--clock cpu`` times process CPU time (a machine shared with other jobs); CPU device only."""
    from masa.bench.infer import measure_infer

    results = measure_infer([str(saved["llama", "svd-llm"])], ["compact"], batch=1, prompt_len=4,
                            new_tokens=2, rounds=2, warmup=0, clock="cpu")  # fmt: skip
    assert results["clock"] == "cpu" and all(t > 0 for t in results["variants"][0]["prefill"]["times_s"])
    with pytest.raises(ValueError, match="clock='gpu'"):
        measure_infer([str(saved["llama", "svd-llm"])], ["compact"], clock="gpu")


@pytest.mark.parametrize("case", [("llama", "masa"), ("llama", "cospadi")], ids="-".join)
def test_info_predicts_the_resident_bytes_of_each_mode(case, saved):
    from masa.commands.info import describe
    from masa.io.serialization import unique_state_dict

    predicted = describe(saved[case])["resident_bytes"]
    for mode in ("compact", "dense"):
        tensors, _ = unique_state_dict(masa.load(saved[case], runtime=mode))
        assert predicted[mode] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_sample_decodes_alike_in_both_modes(saved, saved_llama, tmp_path):
    import shutil

    from masa.commands.sample import sample_text

    directory = Path(shutil.copytree(saved["llama", "cospadi"], tmp_path / "cospadi"))
    shutil.copy(saved_llama / "base" / "tokenizer.json", directory)
    texts = {
        mode: sample_text(str(directory), "the quick", 8, temperature=0, runtime=mode)
        for mode in ("compact", "dense")
    }
    assert texts["compact"] == texts["dense"]
    sampled = sample_text(str(directory), "the quick", 8, temperature=0.8, seed=3)
    assert sampled == sample_text(str(directory), "the quick", 8, temperature=0.8, seed=3)


def test_lora_wraps_a_compact_model_and_trains(saved, ids):
    peft = pytest.importorskip("peft")
    from masa.nn.lora import MasaLoraLinear, lora_config

    model = masa.load(saved["llama", "masa"])
    config = lora_config(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    with pytest.warns(UserWarning, match="Unsupported layer type"):
        tuned = peft.get_peft_model(model, config)
    wrapped = [m for m in tuned.modules() if isinstance(m, MasaLoraLinear)]
    assert wrapped and all(isinstance(m.get_base_layer(), MasaLinear) for m in wrapped)
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in tuned.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    before = tuned(ids, labels=ids).loss
    before.backward()
    optimizer.step()
    assert tuned(ids, labels=ids).loss < before
    with pytest.raises(NotImplementedError, match="set_runtime\\(model, 'dense'\\)"):
        wrapped[0].merge()
