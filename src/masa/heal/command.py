"""``masa heal``: train only the parameters compression created, against the original model's logits."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "heal a compressed model: train its new small parameters to match the original model's logits"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``masa heal`` on the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "heal",
        help=HELP,
        description=(
            "Distil the original model's next-token distribution (its top-k logits on --data, computed once "
            "and cached in OUT.heal/) into a compressed model, training only the parameter kinds in --train. "
            "Shapes do not change, so the compression ratio stays exactly what it was. Use text that is "
            "not your evaluation text."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="compressed model directory")
    parser.add_argument("--teacher", required=True, metavar="DIR", help="the original (uncompressed) model")
    parser.add_argument(
        "--data", required=True, metavar="FILE|NAME", help="healing text: a file or eval-set name"
    )
    parser.add_argument("--steps", required=True, type=int, metavar="N", help="optimiser steps")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per step (default 8)")
    parser.add_argument(
        "--seq-len", type=int, default=128, metavar="T", help="tokens per window (default 128)"
    )
    parser.add_argument("--top-k", type=int, default=64, metavar="K", help="teacher logits kept (default 64)")
    parser.add_argument(
        "--train",
        default="coefficients,factors,codes,bias",
        metavar="KIND[,KIND...]",
        help="parameter kinds that train (atoms, coefficients, factors, basis, codes, bias, norm ...)",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=50, metavar="N", help="state saves (default 50)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT.heal/heal_state.pt")
    parser.add_argument("--seed", type=int, default=0, help="order of the windows")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import json

    from tqdm import tqdm

    from masa.data.tokenizer import load_tokenizer
    from masa.heal.api import heal_from_teacher, healing_info, healing_windows
    from masa.heal.loop import STATE_NAME, HealConfig
    from masa.io import load, save

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    config = HealConfig(args.steps, args.lr, args.batch_size, args.seq_len, tuple(args.train.split(",")),
                        args.top_k, args.seed, args.checkpoint_every)  # fmt: skip
    work = Path(f"{out}.heal")
    work.mkdir(parents=True, exist_ok=True)
    model = load(args.model)
    ids = healing_windows(args.data, load_tokenizer(args.model), config)
    result = heal_from_teacher(
        model, lambda: load(args.teacher), ids, config, work / "teacher_topk.pt", work / STATE_NAME, args.resume,
        progress=lambda steps: tqdm(steps, desc="healing", unit="step", file=sys.stderr),
    )  # fmt: skip
    info = json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8")).get("masa", {})
    info = {k: v for k, v in info.items() if k not in ("format_version", "version", "surgery", "params")}
    info["healing"] = healing_info(args.teacher, args.data, config, result)
    save(model, out, files_from=args.model, info=info, overwrite=args.overwrite)
    losses = result["losses"]
    print(
        f"healed {len(result['trained'])} tensors for {config.steps} steps: KL {losses[0]:.4f} -> {losses[-1]:.4f}; saved {out}"
    )
