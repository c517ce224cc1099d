"""``masa eval``: perplexity of a saved model on eval texts, and its fidelity to a reference model."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from masa.cli_args import positive_int

DEFAULT_DATA = "wikitext2-test"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``masa eval`` on the top-level CLI's subparsers."""
    from masa.commands.sample import add_runtime_argument
    from masa.eval.datasets import EVAL_SETS
    from masa.eval.perplexity import PROTOCOLS

    parser = subparsers.add_parser(
        "eval",
        help="perplexity of a saved model (and fidelity to a reference model)",
        description=(
            "Token perplexity of a saved model on eval texts, printed beside its protocol. Compare models "
            "only under the same tokenizer. chunked: non-overlapping windows of T tokens, tail dropped, "
            "each window's first token unscored. stride: windows of T tokens every S tokens, each scoring "
            "only its S new tokens."
        ),
    )
    parser.add_argument(
        "model", metavar="MODEL_DIR", help="saved model directory (config.json, weights, tokenizer)"
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="NAME_OR_FILE",
        help=f"eval set ({', '.join(EVAL_SETS)}) or a text file; repeat for several (default: {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="chunked", help="window protocol (default: chunked)"
    )
    parser.add_argument(
        "--seq-len", type=positive_int, required=True, metavar="T", help="window length in tokens"
    )
    parser.add_argument(
        "--stride", type=positive_int, metavar="S", help="window step for --protocol stride, 1..T"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="B", help="windows per forward (default: 8)"
    )
    parser.add_argument(
        "--max-tokens", type=positive_int, metavar="N", help="evaluate only the first N tokens of each text"
    )
    parser.add_argument(
        "--reference",
        metavar="OTHER_DIR",
        help="original model: also report KL, top-1 agreement and logit error",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    add_runtime_argument(parser)
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="read the model (and --reference) block by block from its files on every batch instead of "
        "loading it: memory about one block plus embeddings and head",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT.json",
        help="write the results as JSON to OUT.json, or to stdout (instead of the text report) when no file is given",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate as the parsed ``masa eval`` arguments say: a text report, a JSON report, or both."""
    import torch

    from masa.data.tokenizer import encode, load_tokenizer, tokenizer_hash, vocab_size
    from masa.eval.datasets import load_eval_text
    from masa.eval.fidelity import fidelity
    from masa.eval.perplexity import perplexity
    from masa.io import load
    from masa.runtime import resolve_device

    names = args.data or [DEFAULT_DATA]
    texts = {name: load_eval_text(name) for name in names}  # fail on a bad name before loading models
    device = resolve_device(args.device)
    if args.low_memory:
        from masa.eval.streamed import StreamedCausalLM

        model = StreamedCausalLM(args.model, device=device)
        reference = StreamedCausalLM(args.reference, device=device) if args.reference else None
    else:
        model = load(args.model, device=device, runtime=args.runtime)
        reference = load(args.reference).to(device) if args.reference else None
    tokenizer = load_tokenizer(args.model)
    quiet = args.json == "-"
    report = {
        "model": str(args.model),
        "tokenizer": {
            "dir": str(args.model),
            "hash": tokenizer_hash(tokenizer),
            "vocab_size": vocab_size(tokenizer),
        },
        "reference": args.reference,
        "datasets": {},
    }
    for name, text in texts.items():
        token_ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)[: args.max_tokens]  # (N,)
        result = perplexity(model, token_ids, args.protocol, args.seq_len, args.stride, args.batch_size)
        entry = {"text_tokens": token_ids.numel(), "perplexity": asdict(result)}
        lines = [f"{name}: ppl {result.ppl:.4f} ({result.describe()})"]
        if reference is not None:
            agreement = fidelity(model, reference, token_ids, args.seq_len, args.batch_size)
            entry["fidelity"] = asdict(agreement)
            lines.append(f"  vs reference: {agreement.describe()}")
        report["datasets"][name] = entry
        if not quiet:
            print("\n".join(lines), flush=True)
    if quiet:
        json.dump(report, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
