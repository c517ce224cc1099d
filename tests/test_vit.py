"""ViT: every attention variant, budgets, the bundled digits, a short training run, bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from masa.bench.vit_suite import VitSuiteConfig, run_vit_suite, vit_runs
from masa.data.images import load_cifar_binary, load_digits, load_image_folder, load_images
from masa.model import ATTENTION_VARIANTS, MasaViT, MasaViTConfig, attention_ratio, configure_for_budget
from masa.train import ConfigError
from masa.train.vision import VisionTrainConfig, train_vit

KNOBS = {
    "dense": {},
    "gqa": {"gqa_groups": 2},
    "lowrank": {"rank": 4},
    "seq-share": {"n_unique": 2},
    "cycle-share": {"n_unique": 2},
    "masa-qkv": {"n_atoms": 2},
    "masa-qkvo": {"n_atoms": 2},
}


def tiny(attention: str = "dense", **overrides) -> MasaViTConfig:
    fields = dict(n_layer=6, n_head=2, d_model=16, d_ff=32, attention=attention)
    return MasaViTConfig(**(fields | KNOBS[attention] | overrides))


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
def test_every_variant_classifies_and_backpropagates(attention):
    torch.manual_seed(0)
    model = MasaViT(tiny(attention, pool="mean" if attention == "gqa" else "cls"))
    logits = model(torch.rand(3, 1, 8, 8))  # (B, n_classes)
    assert logits.shape == (3, 10)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_attention_parameters_and_budgets():
    d, L = 16, 6
    dense = L * 4 * d * d
    expected = {  # stored attention parameters of each tiny variant
        "dense": dense,
        "gqa": L * (2 * d * d + 2 * d * d // 2),  # 1 K/V head of 2
        "lowrank": L * 4 * 2 * d * 4,
        "seq-share": 2 * 4 * d * d,
        "cycle-share": 2 * 4 * d * d,
        "masa-qkv": 3 * (2 * d * d + 2 * L) + L * d * d,  # O stays per block
        "masa-qkvo": 4 * (2 * d * d + 2 * L),
    }
    for attention, stored in expected.items():
        model = MasaViT(tiny(attention))
        assert sum(p.numel() for p in model.attention_parameters()) == stored, attention
        assert attention_ratio(tiny(attention)) == pytest.approx(1 - stored / dense)
    runs = {c.attention: c for c in vit_runs(tiny(), 2 / 3, coef_generator=True)}
    assert (runs["seq-share"].n_unique, runs["masa-qkvo"].n_atoms, runs["masa-qkv"].n_atoms) == (2, 2, 2)
    assert runs["masa-qkvo"].coef_generator and not runs["lowrank"].coef_generator


def test_bundled_digits_and_split():
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.labels.shape == (1797,)
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    assert sorted(digits.labels.unique().tolist()) == list(range(10))
    train, valid = digits.split(0.2)
    assert (len(train), len(valid)) == (1438, 359)
    assert torch.equal(digits.split(0.2)[1].labels, valid.labels)  # the split never changes


def test_short_training_run_on_digits_learns_and_collapses_the_generator():
    torch.set_num_threads(1)
    config = tiny("masa-qkvo", n_layer=3, n_atoms=1, coef_generator=True, pool="mean")  # cls: slow to start
    tc = VisionTrainConfig(epochs=5, batch_size=64, lr=5e-3, min_lr=5e-4)
    model, summary = train_vit(config, load_digits(), tc)
    assert summary["top1"] > 0.35  # 10 classes: chance is 0.1 (measured 0.56 on 1 thread, 0.59 on 2)
    assert sum(summary["curve"][-5:]) < sum(summary["curve"][:5])
    assert config.coef_generator  # the caller's config is left alone
    assert all(d.generator is None for d in model.masa_bank.modules() if hasattr(d, "generator"))


def test_bench_vit_suite_writes_and_resumes(tmp_path, monkeypatch):
    overrides = ["model.n_layer=3", "model.d_model=16", "model.n_head=2", "model.d_ff=32", "train.epochs=1"]
    config = VitSuiteConfig.from_toml(overrides=overrides)
    digits = load_digits()
    small = dataclasses.replace(digits, images=digits.images[:200], labels=digits.labels[:200])
    monkeypatch.setattr("masa.bench.vit_suite.load_images", lambda source: small)
    results = run_vit_suite(config, 1, tmp_path, "masa bench vit")
    assert [r["attention"] for r in results["runs"]] == list(ATTENTION_VARIANTS)
    assert {"results.json", "results.md", "accuracy_vs_attention_params.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert "| masa-qkvo | S=1 |" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(
        "masa.bench.vit_suite.train_vit", lambda *a: pytest.fail("a finished run was retrained")
    )
    again = run_vit_suite(config, 1, tmp_path, "masa bench vit")
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(results["runs"], sort_keys=True)


def test_bad_input_is_refused_with_the_fix(tmp_path):
    with pytest.raises(
        ValueError, match=r"patch_size=3 does not divide image_size=8: pick a patch size among"
    ):
        MasaViTConfig(patch_size=3)
    with pytest.raises(ValueError, match="masa-qkv keeps O per block"):
        configure_for_budget(tiny(), "masa-qkv", 0.8)
    with pytest.raises(ValueError, match=r"this ViT takes \(batch, 1, 8, 8\)"):
        MasaViT(tiny())(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="set model.channels and model.image_size"):
        train_vit(tiny(image_size=4), load_digits(), VisionTrainConfig(epochs=1))
    with pytest.raises(FileNotFoundError, match="not found: use 'digits' or an existing folder"):
        load_images(str(tmp_path / "absent"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in .*one sub-folder per class"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "pickled" / "data_batch_1").parent.mkdir()
    (tmp_path / "pickled" / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="'python' version, which is a pickle .* use the binary version"):
        load_cifar_binary(tmp_path / "pickled")
    with pytest.raises(ConfigError, match=r"train.lr_mult.atom: 'atom' is not a parameter kind"):
        VisionTrainConfig(lr_mult={"atom": 2.0})


def test_cifar_binary_and_image_folder_load(tmp_path):
    records = np.zeros((4, 1 + 3 * 32 * 32), dtype=np.uint8)
    records[:, 0] = [3, 1, 4, 1]
    records[:, 1:] = 255
    records.tofile(tmp_path / "data_batch_1.bin")
    cifar = load_cifar_binary(tmp_path)
    assert cifar.images.shape == (4, 3, 32, 32) and cifar.labels.tolist() == [3, 1, 4, 1]
    assert cifar.images.max() == 1.0 and len(cifar.classes) == 10
    from PIL import Image

    for name, value in (("a", 0), ("b", 255)):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), (value, value, value)).save(tmp_path / "folder" / name / "1.png")
    images = load_image_folder(tmp_path / "folder")
    assert (
        images.images.shape == (2, 3, 4, 4)
        and images.labels.tolist() == [0, 1]
        and images.classes == ["a", "b"]
    )


_TINY_RUN = [
    "model.n_layer=3",
    "model.d_model=16",
    "model.n_atoms=1",
    "train.epochs=1",
    "train.batch_size=128",
]


def test_masa_train_runs_a_vit_config_and_its_model_reloads(tmp_path, capsys):
    import masa
    from masa.cli import main

    out = tmp_path / "vit"
    argv = ["train", "vit_digits", "--out", str(out), *(w for s in _TINY_RUN for w in ("--set", s))]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == "digits" and 0.0 <= summary["top1"] <= 1.0 and summary["steps"] == 12
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "summary.json"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    model = masa.load(out / "final")
    assert isinstance(model, MasaViT) and model.config.attention == "masa-qkvo"
    digits = load_digits()
    with torch.no_grad():
        assert model(digits.images[:4]).shape == (4, 10)
    assert main(argv) == 2  # an existing run is kept
    assert "already holds a training run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    assert "a ViT run keeps no checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.images=""', "data.images must name the image set"),
        ('data.text="x"', "unknown key data.text: a ViT run's \\[data\\] has only images"),
        ('data.images="no/such/folder"', "image data .* not found: use 'digits' or an existing folder"),
        ("model.patch_size=3", "patch_size=3 does not divide image_size=8"),
    ],
)
def test_masa_train_vit_bad_config_is_named(tmp_path, capsys, override, message):
    from masa.cli import main

    assert main(["train", "vit_digits", "--out", str(tmp_path / "v"), "--set", override]) == 2
    assert re.search(message, capsys.readouterr().err)
