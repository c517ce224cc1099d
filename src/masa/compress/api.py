"""``masa.compress.compress``: resolve the layout, calibrate, run a method, install its result, check the ratio."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from masa.accounting import count
from masa.compress.blockwise import BLOCKWISE_METHODS, DEFAULT_MODE, check_mode, fit_blockwise, is_blockwise
from masa.compress.calibration import CalibrationStats, cached_calibrate, with_fisher
from masa.compress.config import CompressConfig
from masa.compress.install import install
from masa.compress.layout import Layout, resolve_layout
from masa.compress.registry import get_method
from masa.data.tokenizer import encode
from masa.eval.datasets import load_eval_text
from masa.runtime import require_module

RATIO_TOLERANCE = 0.01  # |reached - requested| allowed, in absolute ratio


@dataclass
class CompressResult:
    """What :func:`compress` did: the budget requested and reached, sizes, timings and the method's report.

    Ratios follow the accounting of docs/compression.md: 1 - stored numbers of the targeted weights (biases included) after / before.
    """

    method: str
    ratio_requested: float
    ratio_reached: float
    targets: list[str]
    n_modules: int
    params_before: int
    params_after: int
    target_params_before: int
    target_params_after: int
    seconds: dict[str, float]
    calibration: dict | None
    report: dict
    info: dict  # for the ``masa`` block of config.json: masa.save(model, out, info=result.info)
    memory: dict | None = None  # streamed compressions: peak host/device memory growth and the files' size

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.method}: ratio {self.ratio_reached:.4f} reached (requested {self.ratio_requested:.4f}) over "
            f"{self.n_modules} modules ({', '.join(self.targets)})",
            f"  targeted params {self.target_params_before:,} -> {self.target_params_after:,}; "
            f"model params {self.params_before:,} -> {self.params_after:,}",
            "  time: " + ", ".join(f"{phase} {s:.2f}s" for phase, s in self.seconds.items()),
        ]
        if self.calibration:
            c = self.calibration
            lines.append(
                f"  calibration: {c['samples']} x {c['seq_len']} tokens ({c['rows']} rows), "
                f"peak memory +{c['peak_memory_mb']:.1f} MiB"
            )
        if self.memory:
            m = self.memory
            device = f", device +{m['peak_device_mb']:.0f} MiB" if m.get("peak_device_mb") is not None else ""
            lines.append(
                f"  streamed: peak memory host +{m['peak_host_mb']:.0f} MiB{device} (weight files {m['file_mb']:.0f} MiB)"
            )
        return "\n".join(lines)


def resolve_targets(model: nn.Module, config: CompressConfig) -> list[str]:
    """Full names of the modules ``config`` targets (unfusing fused projections first, recorded)."""
    return resolve_layout(model, config).names


def calibration_tokens(
    calib: str | os.PathLike | torch.Tensor, tokenizer, n_samples: int, seq_len: int
) -> torch.Tensor:
    """Calibration batch (N, T): the first N x T tokens of a text (eval-set name or file) or token stream.

    A 2-D tensor is used as it is. Too little text is an error saying how much is needed.
    """
    if isinstance(calib, torch.Tensor):
        if calib.ndim == 2:
            return calib.long()
        stream, source = calib.reshape(-1).long(), "the calibration token stream"
    else:
        text = load_eval_text(calib)
        if tokenizer is None:
            raise ValueError(f"calibration text {calib} needs a tokenizer: pass tokenizer= (or token ids)")
        stream, source = torch.tensor(encode(tokenizer, text), dtype=torch.long), f"calibration text {calib}"
    needed = n_samples * seq_len
    if stream.numel() < needed:
        raise ValueError(
            f"{source} has {stream.numel()} tokens but {n_samples} samples x {seq_len} tokens = {needed} are "
            "needed: give a longer text or lower --calib-samples / --calib-len"
        )
    return stream[:needed].reshape(n_samples, seq_len)  # (N, T)


def _stored_numbers(model: nn.Module) -> int:
    """Stored numbers of the whole model (shared tensors once), via ``masa.count`` when it knows the model."""
    try:
        return count(model).total
    except ValueError:  # no adapter: plain unique parameters
        return sum(p.numel() for p in model.parameters())


def compress(
    model: nn.Module,
    config: CompressConfig,
    calib: str | os.PathLike | torch.Tensor | None = None,
    tokenizer=None,
    stats: CalibrationStats | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    progress: Callable | None = None,
    mode: str | None = None,
) -> CompressResult:
    """Compress ``model`` in place (on its device, in its dtype) as ``config`` says and check the ratio reached.

    Every method fits all targets at once from statistics of the original model's activations; with
    ``mode="sequential"`` the per-layer methods (``svd``, ``asvd``, ``svd-llm``) instead fit block by block,
    each block calibrated on the outputs of the already compressed ones (``masa.compress.blockwise``).

    Args:
        calib: calibration text (eval-set name or file, tokenized with ``tokenizer``) or token ids;
            unused by methods that need no statistics, or when ``stats`` is given.
        stats: precomputed statistics (e.g. from an earlier ratio) covering the target modules.
        cache_dir: reuse/store statistics there, keyed by model, tokens and targets.
        source: the directory the model was loaded from (a cheap cache key).
        progress: iterator wrapper for the per-block calibration loop (e.g. ``tqdm``).
        mode: calibration on the ``original`` model's activations, or ``sequential`` on the outputs of the
            already compressed blocks (per-layer methods only; statistics are then neither given nor cached).
            None: ``masa.compress.blockwise.DEFAULT_MODE`` (``original``).
    Raises ValueError when the reached ratio is off by more than 1 % (the model is then left changed).
    """
    require_module(model, "masa.compress.compress")
    method = get_method(config.method)
    layout = resolve_layout(model, config)
    total_before = _stored_numbers(model)
    seconds: dict[str, float] = {}
    reused = stats is not None
    if stats is not None and mode == "sequential":
        raise ValueError(
            "sequential calibration measures each block after the previous ones are compressed, so "
            "precomputed statistics cannot be used: pass mode='original' with stats=, or drop stats="
        )
    # Block by block only for sequential calibration: in the original mode one fit over all targets
    # lets the budget move across blocks (whitened-error allocation), as the benchmarks measure it.
    blockwise = check_mode(mode or DEFAULT_MODE) == "sequential"
    if blockwise and (not is_blockwise(method, layout) or config.compensate):
        raise ValueError(
            f"sequential calibration fits block by block, which method {config.method!r} on these targets "
            f"{'with --compensate ' if config.compensate else ''}does not (per-layer methods "
            f"{', '.join(BLOCKWISE_METHODS)} on layers inside the blocks): pass mode='original' "
            "(--calib-mode original)"
        )
    mode = "sequential" if blockwise else "original"
    if blockwise:
        tokens = _inputs(model, calib, tokenizer, config) if method.needs else None
        run = fit_blockwise(
            model, layout, config, method, tokens=tokens, stats=None, mode=mode, progress=progress
        )
        seconds = {**seconds, **run.seconds}
        return _result(
            model, layout, config, method, run.calibration, False, total_before, seconds, run.report, mode
        )
    needs = (*method.needs, "grams") if config.compensate and "grams" not in method.needs else method.needs
    if needs:
        stats, reused = _statistics(model, layout, config, needs, calib, tokenizer, stats,
                                    cache_dir, source, progress, seconds)  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        if config.compensate:  # EoRA after the method, its numbers in the same budget
            from masa.compress.compensate import calibration_loss, compensated

            # the split chosen by calibration loss where it can be measured
            causal = calib is not None and layout.causal
            loss = calibration_loss(model, _inputs(model, calib, tokenizer, config)) if causal else None
            replacement = compensated(method, layout, stats, config, loss)
        else:
            replacement = method.fn(layout, stats if method.needs else None, config)
    seconds["factorisation"] = time.perf_counter() - start
    install(model, replacement)
    return _result(
        model, layout, config, method, stats, reused, total_before, seconds, replacement.report, mode
    )


def check_calib_len(model: nn.Module, seq_len: int) -> None:
    """Refuse calibration sequences of ``seq_len`` tokens beyond the positions the model was built for."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and seq_len > positions:
        raise ValueError(
            f"calibration sequences of {seq_len} tokens exceed the model's {positions} positions: pass "
            f"--calib-len (calib_len=) <= {positions}"
        )


def calibration_images(model: nn.Module, calib, n_samples: int) -> torch.Tensor:
    """Calibration images (N, C, H, W) for a vision model: a float tensor as it is (preprocessed as the
    model expects), or an image set (``digits``, an image or CIFAR binary folder) scaled to [0, 1],
    resized to the model's image size, given its channel count and normalised with mean 0.5 and std
    0.5 (the ViT image processor's defaults)."""
    if isinstance(calib, torch.Tensor):
        if calib.ndim != 4 or not calib.is_floating_point():
            raise ValueError(
                f"calibration images must be a (N, C, H, W) float tensor, got {tuple(calib.shape)}"
            )
        return calib[:n_samples]
    from masa.data.images import load_images

    images = load_images(str(calib)).images[:n_samples]  # (N, C, H, W) in [0, 1]
    size, channels = model.config.image_size, model.config.num_channels
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise ValueError(f"{calib} has {images.shape[1]} channels and the model takes {channels}")
        images = images.expand(-1, channels, -1, -1)  # grey to every channel
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images - 0.5) / 0.5


def _inputs(model: nn.Module, calib, tokenizer, config: CompressConfig) -> torch.Tensor:
    """The calibration batch: token ids (N, T), their length checked against the model's positions
    before tokenizing; or images (N, C, H, W) for a vision model."""
    if calib is None:
        raise ValueError(
            f"method {config.method!r} needs calibration data: pass calib= (text, token ids or images)"
        )
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return calibration_images(model, calib, config.calib_samples)
    given = isinstance(calib, torch.Tensor) and calib.ndim == 2
    check_calib_len(model, calib.shape[1] if given else config.calib_len)
    return calibration_tokens(calib, tokenizer, config.calib_samples, config.calib_len)


def _result(
    model: nn.Module,
    layout: Layout,
    config: CompressConfig,
    method,
    stats: CalibrationStats | None,
    reused: bool,
    total_before: int,
    seconds: dict[str, float],
    report: dict,
    mode: str,
) -> CompressResult:
    """Check the ratio reached and describe the compression."""
    names = layout.names
    target_before = sum(t.dense for t in layout.targets)
    total_after = _stored_numbers(model)
    target_after = target_before - (total_before - total_after)  # nothing outside the targets changes
    reached = 1.0 - target_after / target_before
    if abs(reached - config.ratio) > RATIO_TOLERANCE:
        raise ValueError(
            f"method {config.method!r} reached ratio {reached:.4f} instead of {config.ratio:.4f} over the "
            f"{len(names)} targeted modules (biases included, the accounting of docs/compression.md); their shapes are too coarse for this "
            "budget: choose another ratio or more/larger targets"
        )
    if stats is not None:
        stats.check_rows({t.name: t.weight.shape[1] for t in layout.targets})
    calibration = {**stats.summary(), "reused": reused, "mode": mode} if stats is not None else None
    info = {
        "method": config.method,
        "ratio": config.ratio,
        "ratio_reached": round(reached, 6),
        "targets": list(config.targets),
        "exclude": list(config.exclude),
        "options": config.options,
        "compensate": config.compensate,
        "calibration": calibration,
    }
    return CompressResult(
        config.method, config.ratio, reached, list(config.targets), len(names), total_before, total_after,
        target_before, target_after, seconds, calibration, report, info,
    )  # fmt: skip


def _statistics(
    model: nn.Module,
    layout: Layout,
    config: CompressConfig,
    needs: tuple[str, ...],
    calib,
    tokenizer,
    stats: CalibrationStats | None,
    cache_dir,
    source,
    progress,
    seconds: dict[str, float],
) -> tuple[CalibrationStats, bool]:
    """The calibration statistics a method ``needs``: given, cached or computed (Fisher information added
    from the calibration tokens when asked); records the time of each phase in ``seconds``."""
    names, reused, tokens = layout.names, stats is not None, None
    if stats is None:
        tokens = _inputs(model, calib, tokenizer, config)
        start = time.perf_counter()
        stats, reused = cached_calibrate(model, tokens, names, cache_dir, source, progress=progress)
        seconds["calibration"] = time.perf_counter() - start
    if missing := [n for n in names if n not in stats.grams]:
        raise ValueError(
            f"the calibration statistics do not cover {missing[:3]}; recalibrate for these targets"
        )
    if "fisher" in needs and any(n not in (stats.fisher or {}) for n in names):
        if calib is None:
            raise ValueError(
                f"method {config.method!r} needs loss gradients on calibration tokens, which statistics "
                "alone do not keep: pass calib= (text or token ids) as well as stats="
            )
        if tokens is None:
            tokens = calibration_tokens(calib, tokenizer, config.calib_samples, config.calib_len)
        start = time.perf_counter()
        stats = with_fisher(stats, model, tokens, names, layout.causal)
        seconds["fisher"] = time.perf_counter() - start
    return stats, reused
