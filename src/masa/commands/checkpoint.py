"""What a model directory holds, read from config.json and the safetensors headers as plain JSON.

No tensor data is read and neither torch nor safetensors is imported: ``masa info`` stays fast and can
describe (and check) a checkpoint of any size. A safetensors file is an 8-byte little-endian header
length, a JSON header ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the tensor data, whose offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# the names masa.io.serialization writes (not imported from there: that module imports torch)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too

# safetensors dtype -> bits per element
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32,
    "U64": 64, "I64": 64, "F64": 64, "C64": 64,
}  # fmt: skip
INTEGER_DTYPES = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})


@dataclass(frozen=True)
class Tensor:
    """One header entry: dtype and shape (the data itself is never read)."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return -(-self.numel * self.bits // 8)

    @property
    def bits(self) -> int:
        """Bits per element."""
        return DTYPE_BITS[self.dtype]

    @property
    def is_integer(self) -> bool:
        return self.dtype in INTEGER_DTYPES


@dataclass(frozen=True)
class WeightsFile:
    """A checked safetensors file: its size, tensors and ``__metadata__``."""

    path: Path
    size: int
    tensors: dict[str, Tensor]
    metadata: dict[str, str]

    def aliases(self) -> dict[str, str]:
        """Tied keys masa.save dropped: {alias: stored key} (from the metadata; empty when none)."""
        try:
            return json.loads(self.metadata.get("aliases", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.path}: metadata 'aliases' is not JSON ({err}); the file is corrupt"
            ) from err


# ------------------------------------------------------------------------------------------ config


def read_config(directory: Path) -> dict:
    """config.json of a model directory, checking the path is a directory that holds one."""
    if not directory.exists():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file, not a model directory: pass the directory that holds {CONFIG_NAME}"
        )
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: not a model directory (save one with masa.save)"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt") from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{path} holds a JSON {type(config).__name__}, not an object; the checkpoint is corrupt"
        )
    return config


# ------------------------------------------------------------------------------------------ one file


def read_weights_file(path: Path) -> WeightsFile:
    """Read and check one safetensors header; the file size must be exactly header + data."""
    size = path.stat().st_size
    header, header_len = _read_header(path, size)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ is not a JSON object; the file is corrupt")
    tensors, spans = {}, []
    for key, entry in header.items():
        tensors[key], span = _parse_entry(path, key, entry)
        spans.append((span, key))
    data_len = _check_spans(path, spans)
    expected = 8 + header_len + data_len
    if size != expected:
        problem = "is truncated" if size < expected else "has trailing bytes"
        raise ValueError(
            f"{path} {problem}: its header describes {expected:,} bytes (8 + {header_len:,} header + "
            f"{data_len:,} data) but the file has {size:,}; re-save or re-download the checkpoint"
        )
    return WeightsFile(path, size, tensors, metadata)


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """The JSON header of a safetensors file and its length in bytes."""
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes); the checkpoint is corrupt, re-save or re-download it")
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{path} has {size} bytes, too few for a safetensors header; the file is corrupt"
            )
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(
                f"{path}: header length {header_len:,} exceeds the file ({size:,} bytes) or the "
                f"{MAX_HEADER_BYTES:,}-byte limit; the file is truncated or not safetensors"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path}: the header is not JSON ({err}); the file is corrupt or not safetensors"
        ) from err
    if not isinstance(header, dict):
        raise ValueError(
            f"{path}: the header is a JSON {type(header).__name__}, not an object; the file is corrupt"
        )
    return header, header_len


def _parse_entry(path: Path, key: str, entry: object) -> tuple[Tensor, tuple[int, int]]:
    """A header entry as a Tensor and its (begin, end) data offsets, checked against its dtype and shape."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(
            f"{path}: tensor {key!r} lacks dtype, shape or data_offsets [begin, end]; the file is corrupt"
        ) from err
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(
            f"{path}: tensor {key!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})"
        )
    if not _naturals(shape) or not _naturals([begin, end]) or begin > end:
        raise ValueError(f"{path}: tensor {key!r} has a malformed shape or data_offsets; the file is corrupt")
    tensor = Tensor(dtype, tuple(shape))
    if end - begin != tensor.nbytes:
        raise ValueError(
            f"{path}: tensor {key!r} is mis-shaped: {dtype} {list(shape)} needs {tensor.nbytes:,} bytes but "
            f"its data_offsets span {end - begin:,}; the file is corrupt"
        )
    return tensor, (begin, end)


def _naturals(values: object) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _check_spans(path: Path, spans: list[tuple[tuple[int, int], str]]) -> int:
    """Check the tensors' data tile the data section without gaps or overlaps; returns its length."""
    position = 0
    for (begin, end), key in sorted(spans):
        if begin != position:
            raise ValueError(
                f"{path}: tensor {key!r} starts at byte {begin:,} of the data, expected {position:,} (data "
                "overlaps or has gaps); the file is corrupt"
            )
        position = end
    return position


# ------------------------------------------------------------------------------------------ directory


def weight_paths(directory: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files of a model directory and the index's {key: file name} (empty if unsharded)."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME], {}
    index_path = directory / WEIGHTS_INDEX_NAME
    if not index_path.is_file():
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt") for p in directory.glob(pattern))
        hint = (
            f" (found {pickled}: pickle files are never read; convert them to safetensors)" if pickled else ""
        )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}{hint}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_path} is not JSON with a weight_map ({err}); the checkpoint is corrupt"
        ) from err
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(
            f"{index_path}: weight_map is not a {{key: file name}} object; the checkpoint is corrupt"
        )
    names = sorted(set(weight_map.values()))
    if missing := [name for name in names if not (directory / name).is_file()]:
        raise FileNotFoundError(
            f"{index_path} lists shards that are missing: {', '.join(missing)}; the download is incomplete"
        )
    return [directory / name for name in names], weight_map


def read_weights(directory: Path) -> list[WeightsFile]:
    """Read and check every weights file of a model directory (sharded or not) against its index."""
    paths, weight_map = weight_paths(directory)
    files = [read_weights_file(path) for path in paths]
    held = {key: file.path.name for file in files for key in file.tensors}
    if astray := [key for key, name in weight_map.items() if held.get(key) != name]:
        raise ValueError(
            f"{directory / WEIGHTS_INDEX_NAME} names the wrong shard for {len(astray)} tensor(s) (e.g. "
            f"{astray[0]!r} is not in {weight_map[astray[0]]}); the checkpoint is corrupt"
        )
    if sum(len(file.tensors) for file in files) != len(held):
        raise ValueError(
            f"{directory}: a tensor name appears in more than one shard; the checkpoint is corrupt"
        )
    return files
