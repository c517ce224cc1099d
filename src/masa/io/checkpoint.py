"""What a model directory holds, checked before any weight is read.

``inspect_checkpoint`` finds the safetensors files (single or sharded), reads the shard index and the
tensor headers (not the data), and parses and validates ``config.json``: every loader (masa's own
format, plain Hugging Face directories, a streaming loader) starts from the same checked description,
and every malformed input fails here with one sentence naming the problem and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from masa.io.atomic import recover_leftovers

NATIVE_MODEL_TYPES = ("masa_lm", "masa_vit")  # masa's own models (masa.model), not transformers classes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FORMAT_VERSION = 1  # of the ``masa`` block; bumped when an older masa could not read a newer directory
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    """A checked model directory: its config (None when it has no config.json) and weight files."""

    directory: Path
    config: dict | None
    weight_files: tuple[Path, ...]  # in load order; one file, or the shards named by the index
    index: dict | None  # the parsed model.safetensors.index.json of a sharded checkpoint
    dtype: torch.dtype | None  # the floating dtype holding most weights (None: no floating tensor)

    @property
    def is_masa(self) -> bool:
        """Written by ``masa.save`` (exact ``state_dict`` keys, replayable surgery), not by transformers."""
        return self.config is not None and (
            "masa" in self.config or self.config.get("model_type") in NATIVE_MODEL_TYPES
        )

    @property
    def masa_block(self) -> dict:
        return (self.config or {}).get("masa", {})


def inspect_checkpoint(directory: str | os.PathLike, *, require_config: bool = True) -> Checkpoint:
    """Describe and check the model directory ``directory`` without reading tensor data.

    ``require_config=False`` accepts a bare weights folder (a training checkpoint has no config.json).
    """
    directory = _checked_directory(directory)
    config = read_config(directory) if require_config or (directory / CONFIG_NAME).exists() else None
    files, index = _weight_files(directory, config)
    return Checkpoint(directory, config, files, index, _majority_dtype(files))


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed and validated ``config.json`` of ``directory``."""
    directory = _checked_directory(directory)
    path = directory / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: not a model directory (save one with masa.save or save_pretrained)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the checkpoint is corrupt, download it again"
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds a JSON {type(config).__name__}, not an object; the checkpoint is corrupt"
        )
    _check_supported(config, path)
    if "masa" in config:
        _check_masa_block(config["masa"], path)
    return config


def _checked_directory(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(
            f"{directory} is a file, not a model directory: pass the directory holding config.json and the "
            f"weights ({directory.parent})"
        )
    if not directory.is_dir():
        _put_back(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    return directory


def _put_back(directory: Path) -> None:
    """A save killed in the middle of replacing ``directory`` may have left it hidden: restore it."""
    with contextlib.suppress(OSError):  # a read-only place: report the directory as missing
        recover_leftovers(directory)


def _sub_configs(config: dict, path: str = "") -> list[tuple[str, dict]]:
    """``config`` and every nested config dict (``text_config`` ...), with their dotted paths."""
    found = [(path, config)]
    for key, value in config.items():
        if isinstance(value, dict) and key != "masa":
            found += _sub_configs(value, f"{path}{key}.")
    return found


def _is_positive(value) -> bool:
    if isinstance(value, list):
        return any(_is_positive(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _check_supported(config: dict, path: Path) -> None:
    """Refuse what masa cannot compress faithfully yet: quantized weights and mixtures of experts."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown method") if isinstance(quant, dict) else quant
        raise ValueError(
            f"{path} describes a quantized checkpoint ({method}); masa does not load quantized weights yet: "
            "use the unquantized (bf16/fp16/fp32) release of the model"
        )
    for prefix, sub in _sub_configs(config):
        for key in MOE_KEYS:
            if _is_positive(sub.get(key)):
                raise ValueError(
                    f"{path} describes a mixture-of-experts model ({prefix}{key}={sub[key]}); masa does not "
                    "support mixture-of-experts models yet: use a dense model"
                )


def _check_masa_block(block, path: Path) -> None:
    """The ``masa`` block must be what ``masa.save`` writes, and of a format this masa reads."""
    from masa import __version__

    def corrupt(what: str) -> ValueError:
        return ValueError(
            f"{path}: the masa block's {what}; the file is corrupt or was edited by hand, re-save the model "
            "with masa.save"
        )

    if not isinstance(block, dict):
        raise corrupt(f"value is a JSON {type(block).__name__}, not an object")
    version = block.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise corrupt(f"format_version is {version!r}, not an integer")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by masa {block.get('version', '(unknown version)')} in format {version}; this "
            f"masa {__version__} reads formats up to {FORMAT_VERSION}: upgrade masa to load it"
        )
    ops = block.get("surgery", [])
    if not isinstance(ops, list):
        raise corrupt(f"surgery is a JSON {type(ops).__name__}, not a list of operations")
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise corrupt(f"surgery[{i}] is {str(op)[:60]!r}, not an operation object with an 'op' name")


def _weight_files(directory: Path, config: dict | None) -> tuple[tuple[Path, ...], dict | None]:
    """The safetensors files of ``directory`` and its shard index (None for a single file)."""
    if (directory / WEIGHTS_NAME).exists():
        return (directory / WEIGHTS_NAME,), None
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.exists():
        raise FileNotFoundError(_no_weights_message(directory, config))
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index_path} is not valid JSON ({err}); the checkpoint is corrupt") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(
            f"{index_path} has no weight_map of tensor name -> shard file; the checkpoint is corrupt"
        )
    names = sorted(set(weight_map.values()))
    if outside := [n for n in names if Path(n).name != n]:
        raise ValueError(
            f"{index_path} names shards outside the directory ({outside[:3]}); refusing to read them"
        )
    if missing := [n for n in names if not (directory / n).is_file()]:
        raise FileNotFoundError(
            f"{directory} is incomplete: shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} listed in "
            f"{WEIGHTS_INDEX_NAME} {'are' if len(missing) > 1 else 'is'} missing; download the checkpoint again"
        )
    return tuple(directory / n for n in names), index


def _no_weights_message(directory: Path, config: dict | None) -> str:
    pickled = sorted({p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
    if not pickled:
        return f"{directory} has no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME}): no weights to load"
    from masa.io.pretrained import class_name_for

    cls = class_name_for(config or {})
    out = f"{directory.name}-safetensors"
    return (
        f"{directory} holds only pickle weights ({', '.join(pickled[:3])}); pickle files are never loaded "
        f"because unpickling can run arbitrary code. If you trust the file, convert it once: "
        f"python -c \"from transformers import {cls}; {cls}.from_pretrained('{directory}')"
        f".save_pretrained('{directory.parent / out}')\" and load that directory"
    )


def _majority_dtype(files: tuple[Path, ...]) -> torch.dtype | None:
    """The floating dtype holding the most elements, read from the safetensors headers only."""
    counts: Counter[torch.dtype] = Counter()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    part = fh.get_slice(key)
                    if (dtype := _DTYPES.get(part.get_dtype())) is not None:
                        counts[dtype] += math.prod(part.get_shape())
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise ValueError(
                f"{file} is not a readable safetensors file ({err}); the checkpoint is corrupt"
            ) from err
    return counts.most_common(1)[0][0] if counts else None
