"""Models larger than memory: the skeleton on ``meta``, a submodule's tensors read when it is needed.

:class:`StreamedModel` builds a model directory's architecture with parameters on ``meta`` (as
``masa.load`` does, replaying a masa directory's surgery), maps every parameter to the file and key
holding it, and then loads one submodule at a time with ``safe_open(...).get_tensor`` (only that
tensor's bytes are read) and puts it back on ``meta`` when done. Plain Hugging Face keys are renamed by
transformers' own conversion mapping (GPT-NeoX ``embed_out`` -> ``lm_head``, legacy ``gamma``/``beta``,
the base-model prefix), so it reads the same tensors ``from_pretrained`` does; checkpoints that need a
converter (fused or split tensors) are refused with the way out. Fused projections that ``masa.arch.unfuse``
split on the skeleton (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``) are read as
their fused tensor and split the same way when their block is loaded.

:class:`ShardWriter` writes the tensors of finished blocks as safetensors shards as they come, so a
streamed compression never holds the compressed model either; ``masa.save(..., weights=writer.finish)``
moves them into the saved directory with the shard index.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from masa import surgery
from masa.io.checkpoint import WEIGHTS_INDEX_NAME, Checkpoint, inspect_checkpoint
from masa.io.serialization import build_base, parameters_on_meta


class StreamedModel:
    """A model directory's skeleton on ``meta`` whose submodules are loaded and released on demand.

    Attributes:
        checkpoint: the checked directory.
        model: the skeleton (parameters on ``meta`` until loaded; buffers real, on ``device``).
        device, dtype: where and in which dtype loaded parameters live (dtype: the checkpoint's by default).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.checkpoint = inspect_checkpoint(directory)
        self.device = torch.device(device)
        self.dtype = dtype or self.checkpoint.dtype or torch.float32
        self.model = _skeleton(self.checkpoint)
        for module in self.model.modules():  # rotary tables, masks: real buffers, moved once
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(self.device)
        self._sources = _key_sources(self.checkpoint, self.model)
        self._fused = _fused_modules(self.model)

    def _split_fused(self, module: nn.Module, head: str, state: dict, read) -> None:
        """Fill ``state`` for the :class:`SplitLinear` s under ``module`` (fused projections split by
        ``masa.arch.unfuse`` on the skeleton) from their fused tensors in the files, split as ``unfuse``
        splits them in memory."""
        from masa.arch import linear_weight
        from masa.nn.fused import SplitLinear

        for name, split in module.named_modules():
            full = head + name
            if not isinstance(split, SplitLinear) or full not in self._fused:
                continue
            if not any(p.device.type == "meta" for p in split.parameters()):
                continue
            fused = self._fused[full]  # the fused module of the skeleton, on meta
            fused.load_state_dict(
                {leaf: read(f"{full}.{leaf}") for leaf, _ in fused.named_parameters()}, assign=True
            )
            weight, bias = linear_weight(fused)  # (d_out, d_in), (d_out,)
            parts = {part: split.get_submodule(part).out_features for part in split.parts}
            pieces = SplitLinear.from_fused(weight, bias, parts, split.groups)
            for key, value in pieces.state_dict().items():
                state[f"{name}.{key}" if name else key] = value
            for leaf, param in list(fused.named_parameters()):  # back on meta: the pieces own copies
                fused._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def load(self, prefix: str = "", *, exclude: str | None = None) -> None:
        """Read the parameters of submodule ``prefix`` ('' = the model), skipping those under ``exclude``.

        Tied parameters missing from the files are tied again (``tie_weights``) once loaded.
        """
        module = self.model.get_submodule(prefix)
        head = f"{prefix}." if prefix else ""
        state: dict[str, torch.Tensor] = {}
        handles: dict[Path, object] = {}

        def read(full: str) -> torch.Tensor:
            file, key = self._sources[full]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
            tensor = handles[file].get_tensor(key)
            if tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            return tensor.to(self.device)

        for name, param in module.named_parameters(remove_duplicate=False):
            full = head + name
            if param.device.type != "meta" or (exclude is not None and full.startswith(exclude + ".")):
                continue
            if full not in self._sources:
                continue  # tied to another parameter (checked when the skeleton was mapped), or split below
            tensor = read(full)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{self._sources[full][0]}: tensor {self._sources[full][1]} has shape {tuple(tensor.shape)} "
                    f"but {full} needs {tuple(param.shape)}; the checkpoint does not match its config.json"
                )
            state[name] = tensor
        if self._fused and exclude is None:
            self._split_fused(module, head, state, read)
        module.load_state_dict(state, strict=False, assign=True)
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def release(self, prefix: str) -> None:
        """Put the parameters of submodule ``prefix`` back on ``meta`` (their memory is freed)."""
        for module in self.model.get_submodule(prefix).modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type != "meta":
                    module._parameters[name] = nn.Parameter(
                        param.to("meta"), requires_grad=param.requires_grad
                    )

    def weights_bytes(self, prefix: str) -> int:
        """Bytes the parameters of submodule ``prefix`` take once loaded in ``dtype``."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(p.numel() * size for p in self.model.get_submodule(prefix).parameters())


def _fused_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> module of every fused projection of the blocks (before ``unfuse`` replaces them)."""
    from masa.arch import find_blocks, get_adapter

    try:
        adapter = get_adapter(model)
        blocks_path, blocks = find_blocks(model)
    except ValueError:
        return {}
    return {
        f"{blocks_path}.{i}.{path}": block.get_submodule(path)
        for i, block in enumerate(blocks)
        for path in adapter.fused
        if type(block.get_submodule(path)).__name__ != "SplitLinear"  # a masa directory: split already
    }


def _skeleton(checkpoint: Checkpoint) -> nn.Module:
    """The architecture of ``checkpoint`` with parameters on ``meta`` (a masa directory's surgery replayed)."""
    with parameters_on_meta():
        model = build_base(checkpoint.config, checkpoint.directory)
        if checkpoint.is_masa:
            surgery.replay(model, checkpoint.masa_block.get("surgery", []))
    return model.eval()


def _key_sources(checkpoint: Checkpoint, model: nn.Module) -> dict[str, tuple[Path, str]]:
    """state_dict key -> (file, key in the file), for every parameter the files hold.

    Raises naming the keys when a parameter is neither in the files nor tied to one that is.
    """
    rename = (lambda key: key) if checkpoint.is_masa else _hf_renamer(model, checkpoint.directory)
    expected = model.state_dict()
    sources: dict[str, tuple[Path, str]] = {}
    unexpected: list[str] = []
    for file in checkpoint.weight_files:
        with safe_open(str(file), framework="pt") as fh:
            aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                name = rename(key)
                if name in expected:
                    sources[name] = (file, key)
                else:
                    unexpected.append(key)
        for alias, key in aliases.items():
            if key in sources:
                sources[alias] = sources[key]
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = [k for k in unexpected if not any(p.search(k) for p in ignored)]  # legacy buffers
    tied = _tied_keys(model)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if missing := sorted(k for k in params if k not in sources and k not in tied):
        raise ValueError(
            f"{checkpoint.directory} lacks weights {missing[:5]} that {type(model).__name__} needs; the checkpoint is "
            "incomplete or its config.json belongs to another model: download it again or fix config.json"
        )
    if unexpected:
        warnings.warn(
            f"{checkpoint.directory}: {len(unexpected)} tensor(s) are not part of {type(model).__name__} and are "
            f"ignored: {unexpected[:5]}",
            stacklevel=3,
        )
    return sources


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", True):
        return set()
    return set(tied)


def _hf_renamer(model: nn.Module, directory: Path):
    """File key -> model key, by transformers' conversion mapping for this model (renames only)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> str:
        name, converter = rename_source_key(key, renamings, converters, prefix, meta_state)
        if converter is not None:
            raise ValueError(
                f"{directory}: tensor {key} must be converted ({converter}) to fit {type(model).__name__}, which "
                "streaming does not do; compress without --low-memory, or save the model once with "
                "masa.save(masa.load(dir), new_dir) and stream that"
            )
        return name

    return rename


class ShardWriter:
    """Safetensors shards written as blocks finish, in a staging directory beside the output.

    ``finish(directory)`` moves them into ``directory`` (the atomic save's temporary directory) and writes
    the shard index; ``close()`` removes whatever is left.
    """

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.staging = out.parent / f".{out.name}.shards-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.files: list[tuple[Path, list[str]]] = []
        self.bytes = 0

    def write(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str] | None = None) -> None:
        """One shard with ``tensors`` (contiguous CPU copies are written; the caller frees its own)."""
        path = self.staging / f"part-{len(self.files):05d}.safetensors"
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(data, str(path), metadata={"aliases": json.dumps(aliases or {})})
        self.bytes += sum(t.numel() * t.element_size() for t in data.values())
        self.files.append((path, list(tensors) + list(aliases or {})))

    def finish(self, directory: Path) -> None:
        """Move the shards into ``directory`` as ``model-0000i-of-0000n.safetensors`` with their index."""
        n = len(self.files)
        weight_map = {}
        for i, (path, keys) in enumerate(self.files):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, directory / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.bytes}, "weight_map": weight_map}
        (directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------ memory

MMAP_THRESHOLD = 1 << 20  # allocations from 1 MiB up get their own pages, returned to the system when freed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl and macOS have no mallopt parameters)
        return libc
    except (OSError, AttributeError):
        return None


def return_large_allocations() -> bool:
    """Make glibc malloc serve every allocation of ``MMAP_THRESHOLD`` or more with its own pages.

    By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    blocks of that size come from the heap and stay in the process when freed: a streamed compression's
    per-block arrays (weights in float64, Gram matrices, SVD work space, a few to a few hundred MiB each)
    then pile up block after block. A fixed threshold turns off that adjustment. Process-wide; a no-op
    (False) where the C library is not glibc. Measured: docs/results/scale/README.md.
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    No ``gc.collect()``: a block's tensors are freed by reference counting as soon as they are released,
    and a full collection costs about 0.4 s per block once transformers is imported (measured on the
    12-block d=256 scale shape: 4.5 s of a 12 s statistics pass)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
