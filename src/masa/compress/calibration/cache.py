"""A cache of calibration statistics on disk, keyed by model, tokens and targets (one safetensors file each)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from masa.compress.calibration.collect import CalibrationStats, calibrate

STATS_VERSION = 3  # bump when the statistics or their file layout change (invalidates caches)


SAMPLES, CHUNK = 64, 1 << 16  # sampled content of a weight file: 64 chunks of 64 KiB (4 MiB at most)


def _sample_file(path: Path, digest) -> None:
    """Feed ``digest`` a weight file's name, size, safetensors header and evenly spaced content chunks."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8:
            digest.update(fh.read(min(int.from_bytes(head, "little"), size - 8)))  # the JSON header
        for i in range(SAMPLES):
            fh.seek(i * max(0, size - CHUNK) // (SAMPLES - 1))
            digest.update(fh.read(CHUNK))


def calibration_cache_key(
    model: nn.Module | str | os.PathLike,
    tokens: torch.Tensor,
    module_names: list[str],
    *,
    mode: str = "original",
    dtype: torch.dtype | None = None,
) -> str:
    """A hex digest identifying (model weights, calibration tokens, target modules, calibration mode, the
    dtype the model ran in).

    A model directory is identified by its config.json and, per weight file, its name, size, safetensors
    header and a sampled digest of its content (``SAMPLES`` evenly spaced chunks of ``CHUNK`` bytes: a few
    MiB read per file, not gigabytes, yet two different models of equal shape, size and modification time
    get different keys); an in-memory model by the bytes of its state dict.
    """
    digest = hashlib.sha256(f"masa-calibration-v{STATS_VERSION}".encode())
    if isinstance(model, nn.Module):
        for key, tensor in model.state_dict().items():
            digest.update(key.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        directory = Path(model)
        digest.update((directory / "config.json").read_bytes())
        for file in sorted(directory.glob("*.safetensors")):
            _sample_file(file, digest)
    tokens = tokens.detach().cpu().to(torch.int64).contiguous()
    digest.update(str(tuple(tokens.shape)).encode())
    digest.update(tokens.numpy().tobytes())
    digest.update(json.dumps(sorted(module_names)).encode())
    digest.update(f"mode={mode};dtype={dtype}".encode())
    return digest.hexdigest()[:32]


def save_stats(stats: CalibrationStats, path: str | os.PathLike) -> Path:
    """Write ``stats`` to one safetensors file (shared tensors once; the rest as JSON metadata), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owners: dict[int, str] = {}  # id(gram) -> key of its first module
    tensors: dict[str, torch.Tensor] = {}
    for name, gram in stats.grams.items():
        if id(gram) not in owners:
            owners[id(gram)] = name
            tensors[f"gram/{name}"] = gram.detach().cpu().contiguous()
            tensors[f"abs_mean/{name}"] = stats.abs_mean[name].detach().cpu().contiguous()
    meta = {
        "version": STATS_VERSION,
        "shares": {name: owners[id(gram)] for name, gram in stats.grams.items()},
        "n_rows": stats.n_rows,
        "block_kl": stats.block_kl,
        "n_samples": stats.n_samples,
        "seq_len": stats.seq_len,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "seconds": stats.seconds,
        "streamed": stats.streamed,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"masa_calibration": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_stats(path: str | os.PathLike) -> CalibrationStats:
    """Read statistics written by :func:`save_stats` (shared Grams come back as one tensor object)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["masa_calibration"])
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path} is not a masa calibration file ({err}); delete it to recalibrate") from err
    if meta.get("version") != STATS_VERSION:
        raise ValueError(
            f"{path} holds calibration format {meta.get('version')}, not {STATS_VERSION}; delete it"
        )
    shares = meta["shares"]
    grams = {name: tensors[f"gram/{owner}"] for name, owner in shares.items()}
    abs_mean = {name: tensors[f"abs_mean/{owner}"] for name, owner in shares.items()}
    return CalibrationStats(
        grams, abs_mean, meta["n_rows"], meta["block_kl"], meta["n_samples"], meta["seq_len"],
        meta["peak_memory_bytes"], meta["seconds"], meta["streamed"],
    )  # fmt: skip


def cached_calibrate(
    model: nn.Module,
    tokens: torch.Tensor,
    module_names: list[str],
    cache_dir: str | os.PathLike | None,
    source: str | os.PathLike | None = None,
    **kwargs,
) -> tuple[CalibrationStats, bool]:
    """:func:`calibrate` through a cache directory (None: no cache); returns (stats, whether it was cached).

    ``source`` (the model directory it was loaded from) makes the key cheap; else the weights are hashed.
    Only ``original``-mode statistics are cached (sequential ones depend on the compression itself).
    """
    if cache_dir is None:
        return calibrate(model, tokens, module_names, **kwargs), False
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    key = calibration_cache_key(source if source is not None else model, tokens, module_names, dtype=dtype)
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.exists():
        return load_stats(path), True
    stats = calibrate(model, tokens, module_names, **kwargs)
    save_stats(stats, path)
    return stats, False
