"""Every supported family on tiny models built from transformers' own classes: exact unfusing, exact
full-rank sharing, every compression method with a reload in a fresh process, exact low-rank recovery;
unsupported architectures (mixtures of experts, multimodal wrappers) refused with the escape hatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file
from tiny_models import ALL_FAMILIES, build, make_low_rank, outputs

import masa
from masa import surgery
from masa.arch import find_blocks, get_adapter, linear_weight, unfuse
from masa.compress import CompressConfig, available_methods, calibrate, compress
from masa.nn import SplitLinear

N_LAYER = 2
FAST = {"cospadi": {"iterations": 2}}  # K-SVD iterations: the test checks wiring, not fit quality
ESCAPE_HATCH = r"Supported: .*llama.*gpt_neox.*--targets PATTERN"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(5))  # (N, T)


# ------------------------------------------------------------------------------------- unfusing


@pytest.mark.parametrize(("groups", "bias"), [(1, False), (1, True), (4, True)])
def test_split_linear_reproduces_the_fused_layout(groups, bias):
    parts = {"q": 16, "k": 8, "v": 8} if groups == 1 else {"q": 16, "k": 16, "v": 16}
    d_out = sum(parts.values())
    weight, b = torch.randn(d_out, 12), torch.randn(d_out) if bias else None
    split = SplitLinear.from_fused(weight, b, parts, groups)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(split(x), F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    if groups > 1:  # per head: rows [q_h0, k_h0, v_h0, q_h1, ...], head size 4
        torch.testing.assert_close(split.k.weight[:4], weight[4:8], atol=0, rtol=0)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unfusing_is_exact_and_counted_alike(family, tokens):
    model = build(family, n_layer=N_LAYER)
    adapter = get_adapter(model)
    reference, before = outputs(model, tokens), masa.count(model)
    assert unfuse(model) == bool(adapter.fused) and not unfuse(model)  # a second call changes nothing
    torch.testing.assert_close(outputs(model, tokens), reference, atol=1e-5, rtol=0)
    after = masa.count(model)
    assert (after.total, after.total_dense, after.attention, after.attention_dense) == (
        before.total, before.total_dense, before.attention, before.attention_dense,
    )  # fmt: skip
    blocks_path, blocks = find_blocks(model)
    for path in adapter.roles.values():
        linear_weight(blocks[-1].get_submodule(path))  # every role is one linear layer now
    assert after.by_role.keys() == adapter.roles.keys()
    expected = [{"op": "unfuse", "blocks": blocks_path}] if adapter.fused else []
    assert surgery.operations(model) == expected


@pytest.mark.parametrize("op_name", ["unfuse", "unfuse_qkv"])  # unfuse_qkv: directories written before
def test_unfuse_replays_under_both_names(op_name, tokens, tmp_path):
    model = build("phi3", n_layer=N_LAYER)
    masa.share(model, atoms=N_LAYER, targets=("q", "k", "up"))
    masa.save(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["masa"]["surgery"][0]["op"] = op_name
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(outputs(masa.load(tmp_path / "m"), tokens), outputs(model, tokens))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_logit_lens_maps_the_last_block_to_the_logits(family, tokens):
    model = build(family, n_layer=N_LAYER)
    adapter = get_adapter(model)
    if adapter.lens is None:
        assert not adapter.causal
        return
    hidden = {}
    last_block = find_blocks(model)[1][-1]
    last_block.register_forward_hook(
        lambda m, a, out: hidden.update(h=out[0] if isinstance(out, tuple) else out)
    )
    logits = outputs(model, tokens)
    lensed = hidden["h"]  # (N, T, d)
    for path in adapter.lens:
        parent, _, name = path.rpartition(".")
        module = getattr(model.get_submodule(parent), name)  # None: OPT without project_out
        lensed = lensed if module is None else module(lensed)
    if cap := getattr(model.config, "final_logit_softcapping", None):  # Gemma-2/3: outside the lens
        lensed = cap * torch.tanh(lensed / cap)
    torch.testing.assert_close(lensed, logits, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- sharing


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_rank_sharing_is_exact(family, tokens):
    model = build(family, n_layer=N_LAYER)
    reference = outputs(model, tokens)
    masa.share(model, atoms=N_LAYER, targets=tuple(get_adapter(model).roles))
    torch.testing.assert_close(outputs(model, tokens), reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- compression


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_calibration_gives_each_block_its_own_mask(family, tokens):
    model = build(family, n_layer=N_LAYER)  # sliding window 8 < 16 tokens: the layer types differ
    name = "model.layers.1.self_attn.o_proj"  # a global layer: its input depends on its mask
    inputs = []
    model.get_submodule(name).register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    outputs(model, tokens)
    x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (N T, d)
    exact = x.T @ x  # calibration sums float32 per-batch products in float64
    torch.testing.assert_close(
        calibrate(model, tokens, [name]).grams[name], exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max())
    )


RELOAD = """
import sys
import torch
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
import masa
sys.path.insert(0, sys.argv[1])
from tiny_models import outputs
tokens = load_file(sys.argv[2])["tokens"]
with torch.no_grad():
    for directory in sys.argv[3:]:
        save_file({"outputs": outputs(masa.load(directory), tokens)}, directory + ".outputs.safetensors")
"""


def _compress_and_save(family: str, tokens: torch.Tensor, root: Path) -> dict[str, torch.Tensor]:
    """Compress ``family`` with every method (and share it), save each; returns directory -> outputs."""
    expected: dict[str, torch.Tensor] = {}
    for method in [*available_methods(), "share"]:
        model = build(family, n_layer=N_LAYER)
        if method == "share":
            masa.share(model, atoms=1, targets=tuple(get_adapter(model).roles))
        else:
            config = CompressConfig(method, 0.3, targets=("all-linear",), options=FAST.get(method, {}))
            if method == "fwsvd" and not get_adapter(model).causal:
                with pytest.raises(ValueError, match="fwsvd .* an encoder"):
                    compress(model, config, calib=tokens)
                continue
            compress(model, config, calib=tokens)
        directory = str(root / f"{family}-{method}")
        masa.save(model, directory)
        with torch.no_grad():
            expected[directory] = outputs(model, tokens)
    return expected


@pytest.fixture(scope="module")
def reloaded(request, tokens, tmp_path_factory) -> dict[str, dict | Exception]:
    """family -> {directory: (in-memory outputs, fresh-process outputs)}, or the error compressing it.

    Only the families this session runs are compressed; all reload in ONE fresh process (fast).
    """
    test = "test_compressed_models_reload_in_a_fresh_process"
    families = {i.callspec.params["family"] for i in request.session.items if i.originalname == test}
    root = tmp_path_factory.mktemp("families")
    expected: dict[str, dict[str, torch.Tensor]] = {}
    results: dict[str, dict | Exception] = {}
    for family in sorted(families):
        try:
            expected[family] = _compress_and_save(family, tokens, root)
        except Exception as err:  # reported by that family's test only
            results[family] = err
    save_file({"tokens": tokens}, str(root / "tokens.safetensors"))
    directories = [d for family_dirs in expected.values() for d in family_dirs]
    args = [str(Path(__file__).parent), str(root / "tokens.safetensors"), *directories]
    run = subprocess.run([sys.executable, "-c", RELOAD, *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for family, family_dirs in expected.items():
        results[family] = {
            d: (out, load_file(d + ".outputs.safetensors")["outputs"]) for d, out in family_dirs.items()
        }
    return results


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_compressed_models_reload_in_a_fresh_process(family, reloaded):
    if isinstance(reloaded[family], Exception):
        raise reloaded[family]
    for directory, (in_memory, fresh) in reloaded[family].items():
        torch.testing.assert_close(
            fresh, in_memory, atol=1e-5, rtol=0, msg=lambda m, d=directory: f"{d}: {m}"
        )


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_svd_llm_recovers_an_exactly_low_rank_model(family, tokens):
    model = build(family, n_layer=N_LAYER)
    make_low_rank(model, rank=4)
    reference = outputs(model, tokens)
    result = compress(model, CompressConfig("svd-llm", 0.3, targets=("all-linear",)), calib=tokens)
    assert min(result.report["ranks"].values()) >= 4  # the budget keeps every projection's rank
    torch.testing.assert_close(outputs(model, tokens), reference, atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------- unsupported


def _tiny_moe(kind: str) -> torch.nn.Module:
    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **common))
    return tf.Qwen2MoeForCausalLM(
        tf.Qwen2MoeConfig(
            num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **common
        )
    )


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused_with_the_escape_hatch(kind, tokens):
    model = _tiny_moe(kind).eval()
    with pytest.raises(
        ValueError, match=rf"model_type '{kind}'\) is a mixture-of-experts model.*{ESCAPE_HATCH}"
    ):
        get_adapter(model)
    result = compress(model, CompressConfig("svd-llm", 0.25, targets=["self_attn.q_proj"]), calib=tokens)
    assert result.n_modules == 2  # the escape hatch: name the dense layers


def test_multimodal_wrapper_is_refused_with_the_escape_hatch():
    text = tf.Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
        patch_size=4,
    )  # fmt: skip
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299
    )
    with pytest.raises(ValueError, match=rf"model_type 'gemma3'\) is a multimodal wrapper.*{ESCAPE_HATCH}"):
        get_adapter(tf.Gemma3ForConditionalGeneration(config))
