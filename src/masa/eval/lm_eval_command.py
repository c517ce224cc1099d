"""``masa lm-eval``: zero-shot accuracy of a saved model through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HELP = "zero-shot accuracy through lm-evaluation-harness (pip install masa[eval])"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``masa lm-eval`` on the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "lm-eval",
        help=HELP,
        description=(
            "Score a saved model (passed to lm-eval as the loaded object) on lm-eval tasks. Standard tasks "
            "(arc_easy, hellaswag, piqa, winogrande) download their data and need network access; offline, "
            "use --local-cloze FILE (a cloze task built from a local text, task name masa_cloze) or --include "
            "DIR of task YAMLs reading local files."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="saved model directory")
    parser.add_argument("--tasks", required=True, metavar="TASK[,TASK...]", help="lm-eval task names")
    parser.add_argument("--include", metavar="DIR", help="directory of extra task YAMLs")
    parser.add_argument("--local-cloze", metavar="FILE|NAME", help="build the masa_cloze task from this text")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N documents per task")
    parser.add_argument("--json", metavar="OUT.json", help="also write the metrics as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ImportError as err:  # lm-eval missing: name the extra
        print(f"masa lm-eval: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from masa.data.tokenizer import load_tokenizer
    from masa.eval.datasets import load_eval_text
    from masa.eval.lm_eval import evaluate, write_cloze_task
    from masa.io import load

    tasks = [t for t in args.tasks.split(",") if t]
    with tempfile.TemporaryDirectory() as scratch:
        include = args.include
        if args.local_cloze:
            if include:
                raise ValueError("give --include or --local-cloze, not both")
            write_cloze_task(load_eval_text(args.local_cloze), scratch)
            include = scratch
        metrics = evaluate(load(args.model), load_tokenizer(args.model), tasks, include, args.limit)
    for task, values in metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        print(f"{task}: {shown}", file=sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2, default=str) + "\n", encoding="utf-8")
    return 0
