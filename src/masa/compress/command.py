"""``masa compress``: training-free compression of a saved model into a new model directory."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "masa" / "calib"
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _option(text: str) -> tuple[str, object]:
    """argparse type for ``key=value``: the value read as JSON (numbers, true/false), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``masa compress`` on the top-level CLI's subparsers."""
    from masa.cli_args import positive_int
    from masa.compress.registry import METHOD_NAMES

    parser = subparsers.add_parser(
        "compress",
        help="compress a saved model without training (svd, asvd, svd-llm, masa ...)",
        description=(
            "Replace the target layers of a saved model by smaller ones, calibrated on a text, and save the "
            "result as a new model directory. Ratios count the stored numbers of the targeted weights "
            "(biases included): 1 - after / before."
        ),
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="saved model directory (masa or Hugging Face)")
    parser.add_argument("--method", required=True, choices=METHOD_NAMES, help="compression method")
    parser.add_argument("--ratio", required=True, type=float, metavar="R", help="compression ratio in (0, 1)")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["attn"],
        metavar="attn|all-linear|PATTERN",
        help="attn (q, k, v, o), all-linear (every block projection) or module-name suffixes/regexes",
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="PATTERN", help="regexes of modules to keep"
    )
    parser.add_argument("--calib", metavar="FILE|NAME", help="calibration text: a file or an eval-set name")
    parser.add_argument("--calib-samples", type=int, default=32, metavar="N", help="sequences (default 32)")
    parser.add_argument(
        "--calib-len", type=int, default=256, metavar="T", help="tokens per sequence (default 256)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of any randomness in the method")
    parser.add_argument(
        "--option", type=_option, action="append", default=[], metavar="KEY=VALUE", help="method option"
    )
    parser.add_argument(
        "--compensate",
        metavar="eora[:RANK|:FRACTION]",
        help="add a low-rank EoRA correction per layer within the same ratio (the split searched by calibration "
        "loss unless given; share 0, no correction, is one of the splits tried)",
    )
    parser.add_argument(
        "--heal-steps",
        type=positive_int,
        metavar="N",
        help="after compressing, heal for N steps before saving (as masa heal does, against the input "
        "model's logits on --heal-data; the ratio does not change)",
    )
    parser.add_argument(
        "--heal-data", metavar="FILE|NAME", help="healing text (not your evaluation text); needs --heal-steps"
    )
    parser.add_argument(
        "--heal-lr", type=float, default=1e-4, help="healing peak learning rate (default 1e-4)"
    )
    parser.add_argument(
        "--heal-batch", type=positive_int, default=8, metavar="B", help="healing windows per step (default 8)"
    )
    parser.add_argument(
        "--heal-seq-len",
        type=positive_int,
        default=128,
        metavar="T",
        help="healing tokens per window (default 128)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE),
        metavar="D",
        help=f"calibration cache (default {DEFAULT_CACHE})",
    )
    parser.add_argument("--no-cache", action="store_true", help="calibrate afresh and store nothing")
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="cpu|cuda|cuda:N|mps|auto",
        help="torch device to compress on (default cpu)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="dtype the weights are read and kept in (default auto: the checkpoint's own)",
    )
    parser.add_argument(
        "--calib-mode",
        choices=("original", "sequential"),
        help="calibrate each block on the original model's activations, or on the outputs of the already "
        "compressed blocks (default original: measured as good and cacheable; sequential applies to svd, asvd and svd-llm)",
    )
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="stream the model from its files block by block (peak memory about one block plus embeddings "
        "and head, reported); the output equals the in-memory result",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT.json",
        help="write the result as JSON to OUT.json, or to stdout (instead of the summary) when no file is given",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Compress as the parsed ``masa compress`` arguments say, save, and report."""
    from masa.io.lock import directory_lock

    out = Path(args.out)
    _check_paths(Path(args.model), out, args.json)
    _check_heal(args)
    with directory_lock(out):  # a second compress to the same --out is refused, naming this one
        _check_out(out, args.overwrite)
        report, result = _compress(args, out)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        return
    print(result)
    if healed := result.report.get("healing"):
        print(
            f"  healed {healed['steps']} steps on {healed['data']}: KL {healed['kl_first']:.4f} -> {healed['kl_last']:.4f}"
        )
    reused = (
        " (calibration statistics reused from the cache)" if (result.calibration or {}).get("reused") else ""
    )
    print(f"  saved {out} ({report['file_bytes'] / 2**20:.2f} MiB of weights){reused}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _check_paths(model: Path, out: Path, json_path: str | None) -> None:
    """Before any work: --out must not be (or hold) the input, and --out's and --json's places must be writable."""
    source, target = model.resolve(), out.resolve()
    if target == source or target in source.parents:
        raise ValueError(
            f"--out {out} is the input model directory or holds it; writing there would destroy the input "
            "(even with --overwrite): choose another --out"
        )
    places = [(out, "--out")] + ([(Path(json_path), "--json")] if json_path not in (None, "-") else [])
    for path, flag in places:
        parent = next((p for p in [path.resolve(), *path.resolve().parents] if p.exists()), None)
        if parent is not None and parent.is_dir() and not os.access(parent, os.W_OK):
            raise PermissionError(f"{flag} {path}: {parent} is not writable; choose another path")
        if flag == "--json" and path.is_dir():
            raise IsADirectoryError(f"--json {path} is a directory; give a file path")


def _check_heal(args: argparse.Namespace) -> None:
    """Before any work: --heal-steps needs --heal-data and the model in memory; the other --heal-* need it."""
    if args.heal_steps is None:
        if args.heal_data is not None:
            raise ValueError(
                "--heal-data is given but --heal-steps is not: add --heal-steps N to heal, or drop --heal-data"
            )
        return
    if not args.heal_data:
        raise ValueError(
            f"--heal-steps {args.heal_steps} needs training text: pass --heal-data FILE or an eval-set name "
            "(text that is not your evaluation text)"
        )
    if args.low_memory:
        raise ValueError(
            "--heal-steps trains the whole model in memory, which --low-memory avoids: drop one of them "
            "(or compress with --low-memory, then run masa heal)"
        )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty --out (or a file) unless --overwrite; an empty directory is fine."""
    if out.is_file():
        raise FileExistsError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")


def _compress(args: argparse.Namespace, out: Path) -> tuple[dict, object]:
    """Load, compress and save; returns the JSON report and the ``CompressResult``."""
    from tqdm import tqdm

    from masa.compress import CompressConfig, compress, get_method
    from masa.data.tokenizer import load_tokenizer
    from masa.io import load, save

    config = CompressConfig(
        args.method, args.ratio, tuple(args.targets), tuple(args.exclude), args.calib_samples, args.calib_len,
        args.seed, dict(args.option), args.compensate,
    )  # fmt: skip
    needs_calibration = bool(get_method(config.method).needs) or config.compensate is not None
    if needs_calibration and not args.calib:
        raise ValueError(f"method {config.method!r} calibrates: pass --calib FILE or an eval-set name")
    device, dtype = _device_dtype(args.device, args.dtype)
    tokenizer = load_tokenizer(args.model) if needs_calibration else None
    calib = args.calib if needs_calibration else None
    quiet = args.json == "-"

    def progress(blocks):
        return tqdm(blocks, desc="compressing", unit="block", disable=quiet, file=sys.stderr)

    if args.low_memory:
        from masa.compress.streaming import compress_checkpoint

        result = compress_checkpoint(
            args.model, config, out, calib, tokenizer, device=device, dtype=dtype, mode=args.calib_mode,
            overwrite=args.overwrite, progress=progress,
        )  # fmt: skip
    else:
        heal_config, heal_ids = None, None
        if args.heal_steps:  # the text is checked before the work: shorter than one batch is an error
            from masa.heal.api import healing_windows
            from masa.heal.loop import HealConfig

            heal_config = HealConfig(args.heal_steps, args.heal_lr, args.heal_batch, args.heal_seq_len)
            flags = ("--heal-batch", "--heal-seq-len")
            heal_ids = healing_windows(
                args.heal_data, tokenizer or load_tokenizer(args.model), heal_config, flags
            )
        start = time.perf_counter()
        model = load(args.model, device=device, dtype=dtype)
        load_seconds = time.perf_counter() - start
        result = compress(
            model, config, calib, tokenizer, cache_dir=None if args.no_cache else args.cache_dir,
            source=args.model, progress=progress, mode=args.calib_mode,
        )  # fmt: skip
        if heal_config is not None:
            _heal(args, model, result, heal_config, heal_ids.to(device), device, dtype, quiet)
        start = time.perf_counter()
        try:
            save(model, out, files_from=args.model, info=result.info, overwrite=args.overwrite)
        except FileExistsError as err:
            raise FileExistsError(
                f"{out} appeared while compressing; choose another --out or pass --overwrite"
            ) from err
        result.seconds = {"load": load_seconds, **result.seconds, "save": time.perf_counter() - start}
    report = {
        **result.as_dict(),
        "model": str(args.model),
        "out": str(out),
        "file_bytes": _weights_bytes(out),
    }
    return report, result


def _heal(args, model, result, config, ids, device, dtype, quiet: bool) -> None:
    """Heal the compressed ``model`` in place against the input model (loaded again for its top-k logits,
    kept in a temporary folder); records it in ``result.info``, ``result.report`` and ``result.seconds``."""
    import tempfile

    from tqdm import tqdm

    from masa.heal.api import heal_from_teacher, healing_info
    from masa.io import load

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="masa-heal-") as work:
        healed = heal_from_teacher(
            model, lambda: load(args.model, device=device, dtype=dtype), ids, config,
            Path(work) / "teacher_topk.pt",
            progress=lambda steps: tqdm(steps, desc="healing", unit="step", disable=quiet, file=sys.stderr),
        )  # fmt: skip
    info = healing_info(args.model, args.heal_data, config, healed)
    result.info["healing"] = info
    result.report["healing"] = info
    result.seconds["heal"] = time.perf_counter() - start


def _device_dtype(device: str, dtype: str):
    """The checked torch device and dtype (None: the checkpoint's own) of --device / --dtype."""
    import torch

    from masa.runtime import resolve_device

    resolved = resolve_device(device)
    chosen = None if dtype == "auto" else getattr(torch, dtype)
    if chosen is not None:
        try:
            torch.ones(2, 2, dtype=chosen, device=resolved) @ torch.ones(2, 2, dtype=chosen, device=resolved)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"--dtype {dtype} cannot run on --device {resolved} ({err}); choose float32 or another device"
            ) from err
    return resolved, chosen


def _weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))
