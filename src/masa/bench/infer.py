"""`masa bench infer`: what a compressed model costs where it runs, per runtime mode, against the original.

Every model directory is loaded once per runtime mode (a plain model once: both modes are the same),
all at the same time, and each round times every variant in turn in one process (machine drift hits
every variant alike): prefill (one forward of B x T tokens, no cache) and decoding (greedy
``generate`` of N tokens with the KV cache after a short prompt, at batch 1 and B). Reported per
variant: stored bytes (the checkpoint's tensors), resident bytes (tensors held once loaded), peak memory
during the timed calls (CUDA only), and each speed as a ratio to the first model, which should be the
original. Dense variants are checked to be plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from masa.bench.report import Point, markdown_table, scatter_plot
from masa.cli_args import positive_int
from masa.io import write_json

INFER_JSON, INFER_MD = "infer.json", "infer.md"
DECODE_PROMPT = 16  # prompt tokens before the timed greedy decoding
MIB = 2**20


@dataclass
class Variant:
    """One model directory loaded in one runtime mode, with its measurements."""

    label: str
    directory: str
    runtime: str
    model: nn.Module
    stored_bytes: int
    resident_bytes: int
    compressed: bool
    times: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)


def stored_bytes(directory: str | Path) -> int:
    """Bytes of the tensors a model directory stores (from the safetensors headers; no data read)."""
    from masa.commands.info import describe

    return sum(describe(directory)["weights"]["bytes_by_dtype"].values())


def load_variants(directories: list[str], runtimes: list[str], device: torch.device) -> list[Variant]:
    """Each directory in each runtime mode (a model masa did not compress: once)."""
    from masa.io import inspect_checkpoint, load
    from masa.nn import MasaLinear, check_runtime, resident_bytes

    for mode in runtimes:
        check_runtime(mode)
    variants = []
    for directory in directories:
        checkpoint = inspect_checkpoint(directory)
        compressed = bool(checkpoint.masa_block.get("surgery"))
        block = checkpoint.masa_block
        name = Path(directory).name
        if block.get("method"):
            name = f"{block['method']} {float(block.get('ratio', 0)):.0%} ({name})"
        for mode in runtimes if compressed else runtimes[:1]:
            model = load(directory, device=device, runtime=mode)
            if mode == "dense" and any(isinstance(m, MasaLinear) for m in model.modules()):
                raise AssertionError(f"{directory}: dense runtime left masa layers in the model")
            variants.append(
                Variant(
                    label=f"{name} [{mode}]" if compressed else name,
                    directory=str(directory),
                    runtime=mode if compressed else "plain",
                    model=model,
                    stored_bytes=stored_bytes(directory),
                    resident_bytes=resident_bytes(model),
                    compressed=compressed,
                )
            )
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(call, device: torch.device, clock: str = "wall") -> tuple[float, int]:
    """(seconds, peak bytes allocated above what was allocated before; 0 off CUDA) of ``call()``.

    ``clock="cpu"``: the process's CPU time instead of wall time. On a machine shared with other jobs
    wall time also counts the time the scheduler gave to them; with one thread the CPU time is the work
    done (a cache or memory bus shared with the other jobs still slows it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    _sync(device)
    start = CLOCKS[clock]()
    call()
    _sync(device)
    seconds = CLOCKS[clock]() - start
    extra = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return seconds, extra


def _tasks(model: nn.Module, vocab: int, batch: int, prompt_len: int, new_tokens: int, device) -> dict:
    """name -> (call, tokens it processes): prefill and greedy decoding at batch 1 and ``batch``."""
    gen = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)  # (B, T)
    prompt = torch.randint(0, vocab, (batch, DECODE_PROMPT), generator=gen).to(device)  # (B, P)
    greedy = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0
    )
    tasks = {"prefill": (lambda: model(prefill, use_cache=False), batch * prompt_len)}
    for b in sorted({1, batch}):
        ids = prompt[:b]
        tasks[f"decode_b{b}"] = (lambda ids=ids: model.generate(ids, **greedy), b * new_tokens)
    return tasks


def measure_infer(
    directories: list[str],
    runtimes: list[str],
    device: str = "cpu",
    batch: int = 8,
    prompt_len: int = 128,
    new_tokens: int = 32,
    rounds: int = 5,
    warmup: int = 1,
    clock: str = "wall",
) -> dict[str, Any]:
    """Interleaved medians of every variant's prefill and decoding; ratios to the first directory."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    dev = torch.device(device)
    if clock not in CLOCKS or (clock == "cpu" and dev.type != "cpu"):
        raise ValueError(f"clock={clock!r}: 'wall', or 'cpu' (process CPU time) on the CPU device only")
    variants = load_variants(directories, runtimes, dev)
    vocab = variants[0].model.config.vocab_size
    tasks = {v.label: _tasks(v.model, vocab, batch, prompt_len, new_tokens, dev) for v in variants}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for v in variants:
                for name, (call, _) in tasks[v.label].items():
                    seconds, extra = _timed(call, dev, clock)
                    if r >= warmup:
                        v.times.setdefault(name, []).append(seconds)
                        v.peak_bytes[name] = max(v.peak_bytes.get(name, 0), v.resident_bytes + extra)
    reference = variants[0]
    rows = []
    for v in variants:
        row = {
            "label": v.label,
            "directory": v.directory,
            "runtime": v.runtime,
            "stored_bytes": v.stored_bytes,
            "resident_bytes": v.resident_bytes,
            "resident_vs_stored": v.resident_bytes / v.stored_bytes,
            "resident_vs_reference": v.resident_bytes / reference.resident_bytes,
            "peak_bytes": dict(v.peak_bytes) if dev.type == "cuda" else None,
        }
        for name, (_, tokens) in tasks[v.label].items():
            median = statistics.median(v.times[name])
            row[name] = {
                "median_s": median,
                "tokens_per_s": tokens / median,
                "times_s": v.times[name],
                "vs_reference": statistics.median(reference.times[name]) / median,
            }
        rows.append(row)
    return {
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decode_prompt": DECODE_PROMPT,
        "rounds": rounds,
        "warmup": warmup,
        "clock": clock,
        "reference": reference.label,
        "variants": rows,
    }


def _speed(row: dict, name: str) -> str:
    return f"{row[name]['tokens_per_s']:,.0f} ({row[name]['vs_reference']:.2f}x)"


def write_infer(results: dict[str, Any], out_dir: str | Path, command: str = "") -> None:
    """infer.json, infer.md and two plots (prefill and batch-1 decoding vs resident bytes) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / INFER_JSON, {**results, "command": command})
    decodes = [k for k in results["variants"][0] if k.startswith("decode_b")]
    cuda = results["variants"][0]["peak_bytes"] is not None
    headers = ["model", "stored MiB", "resident MiB", "resident / stored", "x original"]
    headers += ["peak MiB (prefill)"] if cuda else []
    headers += ["prefill tok/s (x)"] + [f"decode b{k.removeprefix('decode_b')} tok/s (x)" for k in decodes]
    rows = []
    for v in results["variants"]:
        cells = [
            v["label"],
            f"{v['stored_bytes'] / MIB:.1f}",
            f"{v['resident_bytes'] / MIB:.1f}",
            f"{v['resident_vs_stored']:.3f}",
            f"{v['resident_vs_reference']:.3f}",
        ]
        cells += [f"{v['peak_bytes']['prefill'] / MIB:.1f}"] if cuda else []
        rows.append(cells + [_speed(v, name) for name in ["prefill", *decodes]])
    threads = f", {results['threads']} thread(s)" if results["threads"] else ""
    clock = " of process CPU time" if results.get("clock") == "cpu" else ""
    text = [
        "# masa bench infer",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Device {results['device']}{threads}; medians{clock} of {results['rounds']} interleaved rounds after "
        f"{results['warmup']} warm-up. Prefill: one forward of {results['batch']} x {results['prompt_len']} "
        f"tokens. Decode: greedy generate of {results['new_tokens']} tokens with the KV cache after a "
        f"{results['decode_prompt']}-token prompt (prompt included in the time). (x) = speed / the speed "
        f"of {results['reference']}, measured in the same rounds.",
        "",
        markdown_table(headers, rows),
    ]
    (out / INFER_MD).write_text("\n".join(text), encoding="utf-8")
    for name in ["prefill", decodes[0]]:
        points = [
            Point(v["label"], v["resident_bytes"] / MIB, v[name]["vs_reference"]) for v in results["variants"]
        ]
        scatter_plot(
            out / f"{name}.png",
            points,
            "resident weights (MiB)",
            "speed x original",
            f"{name} speed vs memory",
        )


def command_line(args: argparse.Namespace) -> str:
    """The `masa bench infer` command that reproduces these parsed arguments."""
    words = ["masa", "bench", "infer", *args.models, "--runtime", *args.runtime, "--device", args.device]
    words += ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len)]
    words += ["--new-tokens", str(args.new_tokens), "--rounds", str(args.rounds)]
    words += ["--warmup", str(args.warmup)] + (["--clock", args.clock] if args.clock != "wall" else [])
    words += ["--out", args.out]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from masa.runtime import resolve_device

    results = measure_infer(
        args.models,
        args.runtime,
        str(resolve_device(args.device)),
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.rounds,
        args.warmup,
        args.clock,
    )
    write_infer(results, args.out, command_line(args))
    print((Path(args.out) / INFER_MD).read_text())
    return 0


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench infer`."""
    from masa.nn.protocol import RUNTIMES

    parser = benchmarks.add_parser(
        "infer",
        help="prefill and decoding speed, resident and peak memory per runtime mode, against the original",
        description="Load every model in every runtime mode at once and time prefill and greedy decoding "
        "(KV cache) of each in turn, round after round, in one process; write OUT/infer.json, OUT/infer.md "
        "and plots. Put the original model first: ratios are to it.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model directories, original first")
    parser.add_argument(
        "--runtime", nargs="+", choices=RUNTIMES, default=list(RUNTIMES), help="modes (default: both)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default: cpu)")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="B", help="batch (default 8)")
    parser.add_argument(
        "--prompt-len", type=positive_int, default=128, metavar="T", help="prefill tokens (default 128)"
    )
    parser.add_argument(
        "--new-tokens", type=positive_int, default=32, metavar="N", help="decoded tokens (default 32)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=5, metavar="R", help="timed rounds (default 5)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        choices=range(10),
        default=1,
        metavar="W",
        help="untimed rounds first (default 1)",
    )
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="wall time (default), or the process's CPU time (CPU device; for a machine shared with "
        "other jobs, with one thread)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="results folder")
    parser.set_defaults(func=run)
