"""Per-layer methods, one block at a time: calibrate block i, fit its layers, install, go on.

``svd``, ``asvd`` and ``svd-llm`` fit each layer from its own weight and input statistics, so the unit
they need in memory is one block. :func:`fit_blockwise` walks the blocks in order; for each it asks a
:class:`BlockAccess` to make the block's weights available (a no-op for a model in memory, a read from
the safetensors files when streaming), fits the block's targets with the method (ranks chosen over the
block's layers), installs the result with the one install step, and tells the access the block is done
(streaming writes its tensors and frees them). Calibration runs inside the same walk, in one of two
modes:

* ``original``: every block's statistics come from the original model's activations (SVD-LLM's
  whitening, Basis Sharing); statistics may then also come precomputed or from the cache.
* ``sequential``: block i is calibrated on the outputs of the already compressed blocks 0..i-1 (as
  GPTQ, llm-compressor and SVD-LLM's local update do), so later blocks absorb earlier errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from masa.arch import find_blocks, linear_weight
from masa.compress.calibration.collect import (
    Accumulator,
    BlockAccess,
    BlockFeed,
    CalibrationStats,
    PeakMemory,
    model_device,
)
from masa.compress.config import CompressConfig
from masa.compress.install import install
from masa.compress.layout import Layout, Target
from masa.compress.registry import Method

CALIBRATION_MODES = ("original", "sequential")
DEFAULT_MODE = "original"  # measured: docs/results/scale/README.md (equal quality, cacheable, no refit pass)
# methods whose fit of a layer reads only that layer's weight and statistics (the unit is one block)
BLOCKWISE_METHODS = ("svd", "asvd", "svd-llm")
BATCH_SIZE = 8


def check_mode(mode: str) -> str:
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration mode {mode!r} is not one of {', '.join(CALIBRATION_MODES)}")
    return mode


def is_blockwise(method: Method, layout: Layout) -> bool:
    """Whether ``method`` fits ``layout`` block by block: a per-layer method, every target inside a block."""
    return method.name in BLOCKWISE_METHODS and all(t.block is not None for t in layout.targets)


@dataclass
class BlockwiseRun:
    """What a blockwise walk did: the merged report of the method, the statistics summary and timings."""

    report: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: CalibrationStats | None = None
    rows: int = 0  # calibration rows each target saw (tokens; patch and class tokens for images)

    def add_time(self, phase: str, start: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def merge(self, report: dict) -> None:
        """Reports of successive blocks: per-layer dicts (``ranks``) merged, other values kept."""
        for key, value in report.items():
            if isinstance(value, dict) and isinstance(self.report.get(key), dict):
                self.report[key] = {**self.report[key], **value}
            else:
                self.report[key] = value


def block_targets(model: nn.Module, layout: Layout, index: int) -> list[Target]:
    """The targets of block ``index``, their weights read from the model now (loaded, maybe just now)."""
    targets = []
    for t in layout.targets:
        if t.block == index:
            weight, bias = linear_weight(model.get_submodule(t.name))
            targets.append(
                Target(
                    t.name, t.block, t.role, t.path, weight.detach(), None if bias is None else bias.detach()
                )
            )
    return targets


@torch.no_grad()
def fit_blockwise(
    model: nn.Module,
    layout: Layout,
    config: CompressConfig,
    method: Method,
    *,
    tokens: torch.Tensor | None = None,
    stats: CalibrationStats | None = None,
    mode: str = DEFAULT_MODE,
    access: BlockAccess | None = None,
    progress: Callable | None = None,
) -> BlockwiseRun:
    """Compress ``layout``'s targets block by block with the per-layer ``method``, in place.

    Statistics come from ``stats`` (original mode only: computed beforehand, e.g. cached) or are
    accumulated on ``tokens`` (N, T) during the walk in ``mode``; a method without statistics needs
    neither.
    """
    check_mode(mode)
    if stats is not None and mode == "sequential":
        raise ValueError(
            "sequential calibration measures each block after the previous ones are compressed, so "
            "precomputed statistics cannot be used: pass mode='original' with stats=, or drop stats="
        )
    access = access or BlockAccess()
    blocks_path, blocks = find_blocks(model)
    run = BlockwiseRun()
    feed = meter = None
    if method.needs and stats is None:
        if tokens is None:
            raise ValueError(f"method {config.method!r} needs calibration tokens or statistics")
        meter = PeakMemory(model_device(model))
        start = time.perf_counter()
        feed = BlockFeed.capture(
            model, blocks, list(tokens.to(model_device(model)).split(BATCH_SIZE)), access
        )
        run.add_time("calibration", start)
    indices = range(len(blocks)) if progress is None else progress(range(len(blocks)))
    for i in indices:
        access.load(i)
        _fit_block(model, layout, config, method, i, run, stats, tokens, feed, meter, mode)
        access.done(i)  # the block's statistics and factors died with _fit_block's frame
    if feed is not None:  # a summary: each block's statistics were dropped once it was fitted
        run.calibration = CalibrationStats(
            {},
            {},
            run.rows,
            None,
            len(tokens),
            run.rows // len(tokens),
            meter.bytes(),
            run.seconds["calibration"],
        )
    return run


def _fit_block(
    model: nn.Module,
    layout: Layout,
    config: CompressConfig,
    method: Method,
    i: int,
    run: BlockwiseRun,
    stats: CalibrationStats | None,
    tokens: torch.Tensor | None,
    feed: BlockFeed | None,
    meter: PeakMemory | None,
    mode: str,
) -> None:
    """Calibrate (when ``feed``) and fit block ``i``; its statistics are freed on return."""
    blocks_path, blocks = find_blocks(model)
    targets = [t for t in layout.targets if t.block == i]
    block_stats = stats
    if feed is not None:
        start = time.perf_counter()
        accumulator = Accumulator(meter)
        with accumulator.hooks({t.name: model.get_submodule(t.name) for t in targets}):
            outputs, _ = feed.run(i, blocks[i], accumulator)
        block_grams, block_means, n_rows = accumulator.shared()
        del accumulator
        block_stats = CalibrationStats(
            block_grams, block_means, n_rows, None, len(tokens), n_rows // len(tokens), consumable=True
        )  # this block's own: the method may free each Gram as it goes
        run.rows = n_rows
        del block_grams, block_means
        run.add_time("calibration", start)
    if targets:
        start = time.perf_counter()
        replacement = method.fn(
            Layout(blocks_path, len(blocks), layout.causal, block_targets(model, layout, i)),
            block_stats if method.needs else None,
            config,
        )
        del block_stats
        install(model, replacement)
        run.merge(replacement.report)
        del replacement
        run.add_time("factorisation", start)
    if feed is not None:
        start = time.perf_counter()
        if mode == "sequential" and targets:
            outputs, _ = feed.run(i, blocks[i])  # the compressed block's outputs feed the next block
        feed.advance(outputs)
        meter.sample()
        run.add_time("calibration", start)
