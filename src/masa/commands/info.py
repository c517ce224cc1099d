"""``masa info DIR``: what a model directory holds, read from config.json and the safetensors headers.

No tensor data is read and torch is not imported. The weights are checked (sizes, offsets, shards) and
counted: numbers stored, bytes per dtype. A directory written by ``masa.save`` records its parameter
counts in config.json's ``masa`` block; they must agree with what the weights hold. A plain Hugging Face
checkpoint is counted by matching its tensor names against the architecture table (``masa.arch.families``).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from masa.arch.families import ADAPTERS, ATTENTION_ROLES, MLP_ROLES, Adapter
from masa.commands.checkpoint import DTYPE_BITS, Tensor, WeightsFile, read_config, read_weights

FUSED = "+"  # a fused projection's pseudo-role joins the roles it holds: "q+k+v", "gate+up"


def _roles_in(role: str) -> set[str]:
    return set(role.split(FUSED))


# ------------------------------------------------------------------------------------------ counting


def stored_numbers(key: str, tensors: dict[str, Tensor]) -> int:
    """Stored numbers of one tensor, as ``masa.count`` counts them.

    Floating-point tensors count their elements. Integer code indices (CoSpaDi's ``<layer>.indices``
    beside float ``<layer>.values``) count their bytes in numbers of the values' width, rounded up, as
    ``SparseCodeLinear.extra_stored_numel``. Other integer tensors are buffers, not parameters: 0.
    """
    tensor = tensors[key]
    if not tensor.is_integer:
        return tensor.numel
    values = tensors.get(key.removesuffix("indices") + "values") if key.endswith(".indices") else None
    if values is None or values.is_integer:
        return 0
    return -(-tensor.numel * tensor.bits // values.bits)


@dataclass(frozen=True)
class Layout:
    """Tensor names matched to one row of the architecture table."""

    family: str
    n_blocks: int
    by_role: dict[str, int]  # role (or a fused pseudo-role such as q+k+v) -> stored numbers


def _role_patterns(adapter: Adapter) -> list[tuple[str, re.Pattern]]:
    """(role, regex) per projection, matching ``<blocks>.<N>.<path>.`` after a dot; a fused projection (as
    stored in a checkpoint) under its pseudo-role."""
    blocks = "|".join(re.escape(b) for b in sorted(adapter.blocks, key=len, reverse=True))
    fused = [(FUSED.join(adapter.fused_roles(path)), path) for path in adapter.fused]
    paths = [
        *((r, p) for r, p in adapter.roles.items() if not any(p.startswith(f + ".") for f in adapter.fused)),
        *fused,
    ]
    return [
        (role, re.compile(rf"(?:^|\.)(?P<blocks>{blocks})\.(?P<index>\d+)\.{re.escape(path)}\."))
        for role, path in paths
    ]


def _match_roles(adapter: Adapter, keys: list[str]) -> tuple[dict[str, str], set[tuple[str, str]], int]:
    """Roles of the keys ``adapter`` matches ({key: role}), the blocks seen, the longest blocks path."""
    roles, blocks, longest = {}, set(), 0
    patterns = _role_patterns(adapter)
    for key in keys:
        for role, pattern in patterns:
            if match := pattern.search(key):
                roles[key] = role
                blocks.add((match["blocks"], match["index"]))
                longest = max(longest, len(match["blocks"]))
                break
    return roles, blocks, longest


def match_layout(tensors: dict[str, Tensor], model_type: str | None) -> Layout | None:
    """The table row matching most tensor names; ties go to the config's model_type, then the longest path."""
    best, best_score = None, (0,)
    for adapter in ADAPTERS:
        roles, blocks, longest = _match_roles(adapter, list(tensors))
        score = (len(roles), model_type in adapter.model_types, longest)
        if roles and score > best_score:
            found = set(roles.values())
            table = [*adapter.roles, *(FUSED.join(adapter.fused_roles(p)) for p in adapter.fused)]
            by_role = {role: 0 for role in table if role in found}  # table order
            for key, role in roles.items():
                by_role[role] += stored_numbers(key, tensors)
            best, best_score = Layout(adapter.family, len(blocks), by_role), score
    return best


def counts_from_layout(layout: Layout | None, total: int) -> dict:
    """Parameter counts of an uncompressed checkpoint (stored = dense), in ``ParamCount.as_dict`` form."""
    attention, by_role = None, {}
    if layout is not None:
        attention = sum(n for role, n in layout.by_role.items() if _roles_in(role) <= set(ATTENTION_ROLES))
        by_role = {role: {"stored": n, "dense": n} for role, n in layout.by_role.items()}
    return {
        "attention_params": attention,
        "attention_params_dense": attention,
        "attention_ratio": None if attention is None else 0.0,
        "total_params": total,
        "total_params_dense": total,
        "total_ratio": 0.0,
        "by_role": by_role,
    }


def mlp_counts(by_role: dict[str, dict[str, int]]) -> dict:
    """MLP stored and dense numbers and ratio over the MLP roles (None when no MLP role was found)."""
    roles = [v for role, v in by_role.items() if _roles_in(role) <= set(MLP_ROLES)]
    stored, dense = sum(v["stored"] for v in roles), sum(v["dense"] for v in roles)
    if not dense:
        return {"mlp_params": None, "mlp_params_dense": None, "mlp_ratio": None}
    return {"mlp_params": stored, "mlp_params_dense": dense, "mlp_ratio": 1 - stored / dense}


def check_recorded(directory: Path, recorded: object, stored: int) -> dict:
    """The masa block's ``params``, after checking its total equals the numbers the weights store."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("total_params"), int):
        raise ValueError(
            f"{directory / 'config.json'}: masa.params has no integer total_params; re-save the model"
        )
    if recorded["total_params"] != stored:
        raise ValueError(
            f"{directory}: the weights store {stored:,} numbers but config.json's masa block records "
            f"total_params {recorded['total_params']:,}: the weights do not belong to this config "
            "(mis-shaped or swapped files); re-save the model with masa.save"
        )
    return recorded


# ------------------------------------------------------------------------------------------ describe


def weights_summary(files: list[WeightsFile], tensors: dict[str, Tensor]) -> dict:
    """Files, tensors, stored numbers, code-index numbers, bytes per dtype and file bytes."""
    bytes_by_dtype: dict[str, int] = {}
    for tensor in tensors.values():
        bytes_by_dtype[tensor.dtype] = bytes_by_dtype.get(tensor.dtype, 0) + tensor.nbytes
    return {
        "files": [file.path.name for file in files],
        "tensors": len(tensors),
        "aliases": sum(len(file.aliases()) for file in files),
        "stored_numbers": sum(stored_numbers(key, tensors) for key in tensors),
        "code_index_numbers": sum(stored_numbers(k, tensors) for k, t in tensors.items() if t.is_integer),
        "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
        "file_bytes": sum(file.size for file in files),
    }


def resident_by_mode(weights: dict, total_dense: int, compressed: bool) -> dict[str, int]:
    """Bytes of weights each runtime mode holds once loaded (``masa.load(DIR, runtime=...)``): compact
    holds what is stored; dense holds the original's numbers in the weights' main float dtype."""
    compact = sum(weights["bytes_by_dtype"].values())
    floats = {d: n for d, n in weights["bytes_by_dtype"].items() if d.startswith(("F", "BF"))}
    if not compressed or not floats:
        return {"compact": compact, "dense": compact}
    return {"compact": compact, "dense": total_dense * DTYPE_BITS[max(floats, key=floats.get)] // 8}


def dictionaries(block: dict) -> list[dict]:
    """The shared atom dictionaries recorded in the masa block's surgery log."""
    return [
        {
            "key": d["key"],
            "role": d["role"],
            "atoms": d["n_atoms"],
            "blocks": d["members"],
            "shape": d["shape"],
        }
        for op in block.get("surgery", [])
        if op["op"] == "share"
        for d in op["dictionaries"]
    ]


def describe(directory: str | Path) -> dict:
    """Architecture, variant, dictionaries, parameter counts, ratios and weights of a model directory."""
    directory = Path(directory)
    config = read_config(directory)
    files = read_weights(directory)
    tensors = {key: tensor for file in files for key, tensor in file.tensors.items()}
    weights = weights_summary(files, tensors)
    block = config.get("masa") or {}
    layout = match_layout(tensors, config.get("model_type"))
    if "params" in block:
        counts, source = check_recorded(directory, block["params"], weights["stored_numbers"]), "masa block"
    else:
        counts, source = counts_from_layout(layout, weights["stored_numbers"]), "tensor names"
    return {
        "directory": str(directory),
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [config.get("model_type") or "unknown"])[0],
        "family": layout.family if layout else "unknown",
        "n_layer": config.get("n_layer") or config.get("num_hidden_layers") or (layout and layout.n_blocks),
        "variant": config.get("attention") or block.get("method") or "dense",
        "method": block.get("method"),
        "dictionaries": dictionaries(block),
        **counts,
        **mlp_counts(counts["by_role"]),
        "counted_from": source,
        "weights": weights,
        "file_bytes": weights["file_bytes"],
        "resident_bytes": resident_by_mode(weights, counts["total_params_dense"], bool(block.get("surgery"))),
        "masa": {k: v for k, v in block.items() if k not in ("surgery", "params")},
    }


# ------------------------------------------------------------------------------------------ output


def _count_line(label: str, stored: int | None, dense: int | None, ratio: float | None) -> str:
    if stored is None:
        return f"{label:<12} unknown (no family of the architecture table matches the tensor names)"
    return f"{label:<12} {stored:,} params (dense {dense:,}), compression {ratio:.1%}"


def _weights_lines(weights: dict) -> list[str]:
    files = weights["files"][0] if len(weights["files"]) == 1 else f"{len(weights['files'])} shards"
    indices = weights["code_index_numbers"]
    lines = [
        f"weights      {weights['file_bytes']:,} bytes in {files}: {weights['tensors']:,} tensors, "
        f"{weights['stored_numbers']:,} numbers stored"
        + (f" ({indices:,} of them integer code indices)" if indices else ""),
        "dtypes       " + ", ".join(f"{dtype} {n:,} bytes" for dtype, n in weights["bytes_by_dtype"].items()),
    ]
    if weights["aliases"]:
        lines.append(f"tied         {weights['aliases']} tensors stored once (aliases in the metadata)")
    return lines


def format_info(info: dict) -> str:
    source = (
        "config.json's masa block, checked against the weights"
        if info["counted_from"] == "masa block"
        else "the tensor names and shapes in the weights"
    )
    lines = [
        f"model        {info['directory']}",
        f"architecture {info['architecture']} (model_type {info['model_type']}, family {info['family']}, "
        f"{info['n_layer']} blocks)",
        f"variant      {info['variant']}",
        _count_line(
            "attention", info["attention_params"], info["attention_params_dense"], info["attention_ratio"]
        ),
        *(
            [_count_line("mlp", info["mlp_params"], info["mlp_params_dense"], info["mlp_ratio"])]
            if info["mlp_params"] is not None
            else []
        ),
        _count_line("total", info["total_params"], info["total_params_dense"], info["total_ratio"]),
        f"counted from {source}",
        *_weights_lines(info["weights"]),
        "resident     "
        + ", ".join(f"{mode} {n / 2**20:,.1f} MiB" for mode, n in info["resident_bytes"].items())
        + " of weights once loaded (masa.load(DIR, runtime=...))",
    ]
    for d in info["dictionaries"]:
        shape, blocks = tuple(d["shape"]), len(d["blocks"])
        lines.append(f"dictionary   {d['key']}: {d['atoms']} atoms of {shape} shared by {blocks} blocks")
    for role, v in info["by_role"].items():
        if v["stored"] != v["dense"]:
            removed = 1 - v["stored"] / v["dense"]
            lines.append(f"  {role:<6} {v['stored']:,} / {v['dense']:,} stored ({removed:.1%} removed)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a saved model: variant, atoms, parameters, compression ratio, file size",
        description="Describe a model directory written by masa (or a Hugging Face safetensors checkpoint) "
        "from its config.json and safetensors headers, without loading the weights; checks that the files "
        "are complete and that the weights hold the parameters config.json records.",
    )
    p.add_argument("directory", help="model directory (config.json + model.safetensors or a sharded index)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
