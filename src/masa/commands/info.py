"""``masa info DIR``: what a saved model is, counted from its config alone (no weights are read)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from masa import surgery
from masa.accounting import count
from masa.io import WEIGHTS_NAME, build_base, parameters_on_meta, read_config


def describe(directory: str | Path) -> dict:
    """Architecture, variant, dictionaries, parameter counts, ratios and file size of a model directory."""
    directory = Path(directory)
    config = read_config(directory)
    block = config.get("masa", {})
    with parameters_on_meta():  # counting needs shapes only
        model = build_base(config, directory)
        surgery.replay(model, block.get("surgery", []))
    counted = count(model)
    dictionaries = [
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
    weights = sorted(directory.glob("*.safetensors"))
    return {
        "directory": str(directory),
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [type(model).__name__])[0],
        "n_layer": config.get("n_layer") or config.get("num_hidden_layers") or config.get("n_layer"),
        "variant": config.get("attention") or block.get("method") or "dense",
        "method": block.get("method"),
        "dictionaries": dictionaries,
        **counted.as_dict(),
        "file_bytes": sum(p.stat().st_size for p in weights),
        "weights_file": WEIGHTS_NAME if (directory / WEIGHTS_NAME).exists() else [p.name for p in weights],
        "masa": {k: v for k, v in block.items() if k not in ("surgery", "params")},
    }


def format_info(info: dict) -> str:
    lines = [
        f"model        {info['directory']}",
        f"architecture {info['architecture']} (model_type {info['model_type']}, {info['n_layer']} blocks)",
        f"variant      {info['variant']}",
        f"attention    {info['attention_params']:,} params (dense {info['attention_params_dense']:,}), "
        f"compression {info['attention_ratio']:.1%}",
        f"total        {info['total_params']:,} params (dense {info['total_params_dense']:,}), "
        f"compression {info['total_ratio']:.1%}",
        f"weights      {info['file_bytes']:,} bytes",
    ]
    for d in info["dictionaries"]:
        lines.append(
            f"dictionary   {d['key']}: {d['atoms']} atoms of {tuple(d['shape'])} shared by {len(d['blocks'])} blocks"
        )
    for role, v in info["by_role"].items():
        if v["stored"] != v["dense"]:
            lines.append(
                f"  {role:<6} {v['stored']:,} / {v['dense']:,} stored ({1 - v['stored'] / v['dense']:.1%} removed)"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info = describe(args.directory)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a saved model: variant, atoms, parameters, compression ratio, file size",
        description="Describe a model directory written by masa (or a Hugging Face safetensors checkpoint).",
    )
    p.add_argument("directory", help="model directory (config.json + model.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
