"""Hugging Face ViT and DeiT classifiers: found by the architecture table, loaded from published-style
files (legacy key names), shared exactly at full rank, compressed without calibration, reloaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import masa
from masa.arch import get_adapter
from masa.compress import CompressConfig, compress

_SHAPE = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16,
    patch_size=4, num_channels=3, num_labels=5,
)  # fmt: skip
MODELS = {
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**_SHAPE)),
    "deit": lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**_SHAPE)),
}
# transformers 5 names the projections q_proj ... fc2; published files use the names before
_LEGACY = [
    (r"\.layers\.", ".encoder.layer."),
    (
        r"attention\.([qkv])_proj",
        lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m[1]],
    ),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[family]().eval()


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).logits  # (N, labels)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # (N, C, H, W)


def _published(model: torch.nn.Module, directory) -> None:
    """``model`` written as a published checkpoint is: legacy key names, config.json, one safetensors file."""
    model.save_pretrained(directory)
    state = load_file(str(directory / "model.safetensors"))
    renamed = {}
    for key, value in state.items():
        for pattern, new in _LEGACY:
            key = re.sub(pattern, new, key)
        renamed[key] = value
    assert any(".attention.attention.query." in k for k in renamed)
    save_file(renamed, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("family", sorted(MODELS))
def test_published_vision_checkpoint_loads_shares_exactly_and_compresses(family, images, tmp_path):
    original = _model(family)
    reference = _logits(original, images)
    _published(original, tmp_path / "hf")
    model = masa.load(tmp_path / "hf")
    torch.testing.assert_close(_logits(model, images), reference, atol=1e-6, rtol=0)
    adapter = get_adapter(model)
    assert adapter.family == "vit" and not adapter.causal

    masa.share(model, atoms=3, targets=tuple(adapter.roles))  # S = L atoms: exact
    torch.testing.assert_close(_logits(model, images), reference, atol=1e-5, rtol=0)

    model = masa.load(tmp_path / "hf")
    result = compress(model, CompressConfig("svd", 0.3, targets=("all-linear",)))
    assert abs(result.ratio_reached - 0.3) < 0.05 and result.n_modules == 18
    compressed = _logits(model, images)
    masa.save(model, tmp_path / "svd")
    script = (
        "import sys, torch, masa; from safetensors.torch import save_file; "
        "m = masa.load(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True); "
        "save_file({'logits': m(x).logits.detach().contiguous()}, sys.argv[3])"
    )
    torch.save(images, tmp_path / "images.pt")
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "svd"),
            str(tmp_path / "images.pt"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    torch.testing.assert_close(load_file(str(tmp_path / "o"))["logits"], compressed, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "svd" / "config.json").read_text())["model_type"] == family


@pytest.mark.parametrize("mode", ["original", "sequential"])
def test_vision_models_calibrate_on_images(images, mode):
    """svd-llm on a ViT whose projections are exactly rank 4: calibrated on images, it keeps the logits."""
    model = _model("vit")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            u, s, vh = torch.linalg.svd(module.weight.detach(), full_matrices=False)
            module.weight.data = (u[:, :4] * s[:4]) @ vh[:4]
    reference = _logits(model, images)
    result = compress(model, CompressConfig("svd-llm", 0.3, targets=("all-linear",)), calib=images, mode=mode)
    assert result.calibration["rows"] == 4 * 17  # 16 patches and the class token per image
    torch.testing.assert_close(_logits(model, images), reference, atol=1e-4, rtol=1e-4)


def test_vision_calibration_from_an_image_set_is_resized_and_normalised():
    from masa.compress.api import calibration_images

    model = _model("vit")  # 3 channels, 16 x 16
    images = calibration_images(model, "digits", 5)  # 1-channel 8 x 8 digits in [0, 1]
    assert images.shape == (5, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match=r"must be a \(N, C, H, W\) float tensor"):
        calibration_images(model, torch.zeros(2, 16, dtype=torch.long), 5)
