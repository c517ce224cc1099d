"""``compress_checkpoint``: compress a model directory without holding the model in memory.

The skeleton is built on ``meta`` and the weights outside the blocks (embeddings, final norm, head) are
read (``masa.io.stream.StreamedModel``). Per-layer methods then walk the blocks once
(``masa.compress.blockwise``): each block is read from the files, calibrated, fitted, installed by the
one install step, written as a safetensors shard and freed. Methods that fit groups of blocks together
(masa, Basis Sharing, CoSpaDi, fwsvd's whole-model gradients aside) first make a statistics pass that
streams the blocks the same way, then hold the targeted blocks to fit them together and write them.
Fused projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``) are unfused on
the skeleton (the operation recorded once) and split block by block as their tensors are read. Peak host
memory is reported next to the file size; glibc's heap is told to return large freed arrays to the system
(``masa.io.stream.return_large_allocations``) and trimmed after each block, so a block's work space does
not stay in the process (measured: docs/results/scale/README.md). A streamed per-layer method chooses its ranks block
by block (the in-memory ``compress`` in the original mode chooses them over all targets at once, so its
``whitened-error`` allocation can move rank across blocks; the two agree exactly in the sequential mode).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from masa.arch import find_blocks, get_adapter, unfuse
from masa.compress.api import CompressResult, _inputs, _result, _stored_numbers
from masa.compress.blockwise import DEFAULT_MODE, check_mode, fit_blockwise, is_blockwise
from masa.compress.calibration.collect import BlockAccess, CalibrationStats, PeakMemory, calibrate
from masa.compress.config import CompressConfig
from masa.compress.install import install
from masa.compress.layout import resolve_layout
from masa.compress.registry import Method, get_method
from masa.io.serialization import save, unique_state_dict
from masa.io.stream import ShardWriter, StreamedModel, return_large_allocations, trim_heap


class StreamedBlocks(BlockAccess):
    """Blocks read from the files when needed; when done, written as a shard (``writer``) and freed.

    ``read_seconds`` adds up the time spent reading, so the phases it happens inside can leave it out.
    """

    def __init__(
        self, streamed: StreamedModel, blocks_path: str, writer: ShardWriter | None, meter: PeakMemory
    ):
        self.streamed, self.blocks_path, self.writer, self.meter = streamed, blocks_path, writer, meter
        self.read_seconds = 0.0

    def load(self, index: int) -> None:
        prefix = f"{self.blocks_path}.{index}"
        start = time.perf_counter()
        self.streamed.load(prefix)
        self.read_seconds += time.perf_counter() - start
        block = self.streamed.model.get_submodule(prefix)
        if left := [name for name, p in block.named_parameters() if p.device.type == "meta"]:
            raise ValueError(
                f"{prefix}: parameters {left[:3]} have no tensor in {self.streamed.checkpoint.directory} (a "
                "converted layout); compress this model without --low-memory"
            )
        self.meter.sample()

    def done(self, index: int) -> None:
        prefix = f"{self.blocks_path}.{index}"
        self.meter.sample()
        if self.writer is not None:
            state = self.streamed.model.get_submodule(prefix).state_dict()
            self.writer.write({f"{prefix}.{key}": value for key, value in state.items()})
            del state
        self.streamed.release(prefix)
        trim_heap()


def compress_checkpoint(
    directory: str | os.PathLike,
    config: CompressConfig,
    out: str | os.PathLike,
    calib: str | os.PathLike | torch.Tensor | None = None,
    tokenizer=None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mode: str | None = None,
    overwrite: bool = False,
    progress: Callable | None = None,
) -> CompressResult:
    """Compress the model directory ``directory`` block by block from its files and save it to ``out``.

    Weights are read in ``dtype`` (default: the checkpoint's) onto ``device``; ``mode`` as in
    :func:`masa.compress.compress`. ``result.memory`` holds the peak host (and device) memory growth.
    """
    if config.compensate:
        raise ValueError(
            "--compensate is not applied by a streamed compression yet; compress without --low-memory"
        )
    return_large_allocations()  # freed per-block arrays go back to the system (masa.io.stream)
    meter = PeakMemory(torch.device("cpu"))
    device_meter = PeakMemory(torch.device(device)) if torch.device(device).type == "cuda" else None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    streamed = StreamedModel(directory, device=device, dtype=dtype)
    model = streamed.model
    blocks_path, blocks = find_blocks(model)
    if get_adapter(model).fused:
        unfuse(model, blocks_path)  # on meta, recorded; each block's fused tensors are split as it is read
    streamed.load("", exclude=blocks_path)
    method = get_method(config.method)
    layout = resolve_layout(model, config)
    total_before = _stored_numbers(model)
    blockwise = is_blockwise(method, layout)
    mode = check_mode(mode or (DEFAULT_MODE if blockwise else "original"))
    if method.needs and "fisher" in method.needs:
        raise ValueError(
            f"method {config.method!r} needs gradients through the whole model, which streaming cannot take: "
            "compress without --low-memory"
        )
    if mode == "sequential" and not blockwise:
        raise ValueError(
            f"sequential calibration applies to per-layer methods; {config.method!r} fits across blocks: "
            "pass --calib-mode original"
        )
    seconds["load"] = time.perf_counter() - start
    tokens = _inputs(model, calib, tokenizer, config) if method.needs else None
    writer = ShardWriter(out)
    try:
        access = StreamedBlocks(streamed, blocks_path, writer, meter)
        if blockwise:
            run = fit_blockwise(
                model, layout, config, method, tokens=tokens, mode=mode, access=access, progress=progress
            )
            stats, report = run.calibration, run.report
            seconds.update(run.seconds)
            seconds["read"] = access.read_seconds  # between the timed phases
        else:
            stats, report = _fit_groups(model, streamed, config, method, tokens, access, progress, seconds)
        result = _result(model, layout, config, method, stats, False, total_before, seconds, report, mode)
        start = time.perf_counter()
        tensors, aliases = unique_state_dict(model)
        inside = f"{blocks_path}."
        writer.write(
            {k: v for k, v in tensors.items() if not k.startswith(inside)},
            {a: k for a, k in aliases.items() if not a.startswith(inside) and not k.startswith(inside)},
        )
        save(model, out, files_from=directory, info=result.info, overwrite=overwrite, weights=writer.finish)
        result.seconds["save"] = time.perf_counter() - start
    finally:
        writer.close()
    meter.sample()
    result.memory = {
        "peak_host_mb": round(meter.bytes() / 2**20, 1),
        "peak_device_mb": round(device_meter.bytes() / 2**20, 1) if device_meter else None,
        "file_mb": round(sum(f.stat().st_size for f in streamed.checkpoint.weight_files) / 2**20, 1),
        "streamed": True,
    }
    return result


def _fit_groups(
    model: torch.nn.Module,
    streamed: StreamedModel,
    config: CompressConfig,
    method: Method,
    tokens: torch.Tensor | None,
    access: StreamedBlocks,
    progress: Callable | None,
    seconds: dict[str, float],
) -> tuple[CalibrationStats | None, dict]:
    """Methods fitting across blocks: a streamed statistics pass, then all targeted blocks at once."""
    blocks_path, blocks = find_blocks(model)
    stats = None
    names = resolve_layout(model, config).names
    read = 0.0
    if method.needs:
        start = time.perf_counter()
        stats_access = StreamedBlocks(streamed, blocks_path, None, access.meter)  # read, calibrate, free
        scratch = access.writer.staging / "scratch"  # removed with the staging directory
        # each block's Grams go to files as it finishes: a whole model's are never in memory together
        stats = calibrate(model, tokens, names, progress=progress, access=stats_access, scratch=scratch)
        stats.consumable = True  # read by the one fit below only: it may drop each Gram once done with it
        stats.scratch = scratch
        read = stats_access.read_seconds
        seconds["calibration"] = time.perf_counter() - start - read  # the reads are counted apart
    for i in range(len(blocks)):
        access.load(i)
    seconds["read"] = read + access.read_seconds
    start = time.perf_counter()
    layout = resolve_layout(model, config)  # the weights are loaded now
    with torch.no_grad():
        replacement = method.fn(layout, stats, config)
    del layout  # its targets hold the original weights: each goes as install replaces its layer
    install(model, replacement)
    seconds["factorisation"] = time.perf_counter() - start
    for i in range(len(blocks)):
        access.done(i)
    return stats, replacement.report
