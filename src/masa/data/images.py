"""Image classification data for the ViT: the bundled digits, CIFAR binary files, or an image folder.

Every loader returns an :class:`ImageSet` of float images in [0, 1], shape (N, C, H, W), and integer
labels (N,). Nothing is downloaded; nothing is unpickled (CIFAR's "python" version is refused).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from masa.data.corpus import default_data_dir

DIGITS_FILE = "digits/digits.csv.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_CIFAR_BIN = {
    "cifar-10": ("data_batch_*.bin", "test_batch.bin", 1),
    "cifar-100": ("train.bin", "test.bin", 2),
}


@dataclass
class ImageSet:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64, with the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"images {tuple(self.images.shape)} and labels {tuple(self.labels.shape)} do not match: "
                "need (N, C, H, W) and (N,)"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, valid_fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """(train, valid): a fixed random ``valid_fraction`` of the images held out (same for every run)."""
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction {valid_fraction} must lie in (0, 1), e.g. 0.2")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        n_valid = max(1, round(valid_fraction * len(self)))
        held, kept = order[:n_valid], order[n_valid:]
        return (
            ImageSet(self.images[kept], self.labels[kept], self.classes),
            ImageSet(self.images[held], self.labels[held], self.classes),
        )


def load_digits(path: str | Path | None = None) -> ImageSet:
    """The bundled 1,797 handwritten digits (8 x 8, one channel, 17 grey levels scaled to [0, 1])."""
    path = Path(path) if path else default_data_dir() / DIGITS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"digits file {path} not found: it ships in the repository as data/{DIGITS_FILE}"
        )
    with gzip.open(path, "rt", encoding="ascii") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (N, 65): 64 pixels, then the label
    images = torch.from_numpy(table[:, :64].reshape(-1, 1, 8, 8).astype(np.float32) / 16.0)
    return ImageSet(images, torch.from_numpy(table[:, 64]), [str(d) for d in range(10)])


def load_cifar_binary(folder: str | Path, train: bool = True) -> ImageSet:
    """CIFAR-10 (``cifar-10-batches-bin``) or CIFAR-100 (``cifar-100-binary``) binary files (fine labels)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR folder {folder} not found: point at the extracted binary version")
    for kind, (train_glob, test_name, label_bytes) in _CIFAR_BIN.items():
        files = sorted(folder.glob(train_glob)) if train else [folder / test_name]
        if files and all(f.is_file() for f in files):
            raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
            record = label_bytes + 3 * 32 * 32
            if raw.size % record:
                raise ValueError(f"{folder}: file sizes are not whole {kind} records of {record} bytes")
            raw = raw.reshape(-1, record)
            images = torch.from_numpy(raw[:, label_bytes:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
            labels = torch.from_numpy(raw[:, label_bytes - 1].astype(np.int64))  # CIFAR-100: the fine label
            n_classes = 10 if kind == "cifar-10" else 100
            return ImageSet(images, labels, [str(c) for c in range(n_classes)])
    if (folder / "data_batch_1").is_file() or (folder / "train").is_file():
        raise ValueError(
            f"{folder} holds CIFAR's 'python' version, which is a pickle and is never loaded: use the binary "
            "version instead (cifar-10-binary.tar.gz -> cifar-10-batches-bin/data_batch_1.bin ..., or "
            "cifar-100-binary.tar.gz -> cifar-100-binary/train.bin, test.bin)"
        )
    raise FileNotFoundError(
        f"no CIFAR binary files in {folder}: expected data_batch_1.bin ... test_batch.bin (CIFAR-10) or "
        "train.bin, test.bin (CIFAR-100)"
    )


def load_image_folder(folder: str | Path, channels: int = 3) -> ImageSet:
    """Images under ``folder/<class name>/``, one class per sub-folder; all must share one size."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [
        (f, label)
        for label, name in enumerate(classes)
        for f in sorted((folder / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ValueError(
            f"no images in {folder}: put them in one sub-folder per class ({folder}/cat/1.png, ...), "
            f"as {', '.join(IMAGE_SUFFIXES)}"
        )
    mode = {1: "L", 3: "RGB"}[channels]
    arrays = [np.asarray(Image.open(f).convert(mode), dtype=np.float32) / 255.0 for f, _ in files]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(
            f"images in {folder} have several sizes {sorted(sizes)}: resize them to one size first"
        )
    stacked = np.stack(arrays).reshape(len(arrays), *arrays[0].shape[:2], channels)  # (N, H, W, C)
    images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return ImageSet(images, torch.tensor([label for _, label in files]), classes)


def load_images(source: str) -> ImageSet:
    """``digits``, a folder of CIFAR binary files, or an image folder (relative paths: the data/ folder)."""
    if source == "digits":
        return load_digits()
    folder = Path(source) if Path(source).is_absolute() else default_data_dir() / source
    if not folder.is_dir():
        raise FileNotFoundError(f"image data {folder} not found: use 'digits' or an existing folder")
    if any(folder.glob("*.bin")) or (folder / "data_batch_1").is_file():
        return load_cifar_binary(folder)
    return load_image_folder(folder)
