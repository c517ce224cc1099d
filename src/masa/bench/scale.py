"""`masa bench scale`: time and peak memory of streamed compression against model size.

Synthetic Llama checkpoints (random weights, small vocabulary so the blocks dominate) of growing width
and depth are written block by block (never held whole), then each method compresses each one with
``compress_checkpoint`` in a fresh process, so that process's peak RSS is the compression's own. The
results go to OUT/scale.json and OUT/scale.md with the command that made them, and OUT/scale.png plots
peak memory and time against the weight files' size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SCALE_JSON, SCALE_MD, SCALE_PNG = "scale.json", "scale.md", "scale.png"


@dataclass(frozen=True)
class Shape:
    """A synthetic Llama: width d, blocks L, FFN width, vocabulary."""

    d: int
    blocks: int
    ffn: int
    vocab: int

    def __post_init__(self):
        if min(self.d, self.blocks, self.ffn, self.vocab) < 1 or self.d % 64:
            raise ValueError(f"shape {self} needs positive sizes and d a multiple of 64 (head size 64)")

    @property
    def name(self) -> str:
        return f"d{self.d}-L{self.blocks}-ffn{self.ffn}-V{self.vocab}"


SHAPES = {
    "d256": Shape(256, 12, 688, 1024),
    "d512": Shape(512, 12, 1376, 1024),
    "d1024": Shape(1024, 12, 2752, 1024),
    "d2048": Shape(2048, 12, 5504, 1024),
    "1b": Shape(2048, 16, 8192, 32000),  # the Llama 1B shape (random weights)
}


def write_synthetic_llama(directory: str | Path, shape: Shape, dtype: str = "float32", seed: int = 0) -> Path:
    """A Llama checkpoint of ``shape`` with random weights, written one shard per block (the whole model is
    never in memory); weights ~ N(0, 0.02), norms 1."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * 0.02).to(torch_dtype)

    d, f = shape.d, shape.ffn
    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(shape.vocab, d)}]
    weight_map: dict[str, str] = {}
    names = [f"model-{i + 1:05d}-of-{shape.blocks + 2:05d}.safetensors" for i in range(shape.blocks + 2)]
    total = 0
    for i in range(shape.blocks + 2):
        if 0 < i <= shape.blocks:
            p = f"model.layers.{i - 1}."
            shard = {
                **{f"{p}self_attn.{n}_proj.weight": rand(d, d) for n in "qkvo"},
                f"{p}mlp.gate_proj.weight": rand(f, d),
                f"{p}mlp.up_proj.weight": rand(f, d),
                f"{p}mlp.down_proj.weight": rand(d, f),
                f"{p}input_layernorm.weight": torch.ones(d, dtype=torch_dtype),
                f"{p}post_attention_layernorm.weight": torch.ones(d, dtype=torch_dtype),
            }
        elif i == 0:
            shard = shards[0]
        else:
            shard = {
                "model.norm.weight": torch.ones(d, dtype=torch_dtype),
                "lm_head.weight": rand(shape.vocab, d),
            }
        save_file(shard, str(directory / names[i]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, names[i]))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": shape.blocks,
        "num_attention_heads": d // 64,
        "num_key_value_heads": d // 64,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": dtype,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def child(argv: list[str]) -> None:
    """In a fresh process: compress one checkpoint with random calibration tokens; print a JSON line with the
    result, the phase times and this process's peak RSS."""
    import torch

    from masa.compress import CompressConfig
    from masa.compress.streaming import compress_checkpoint

    model, out, method, ratio, targets, device, dtype, samples, length = argv
    rss_start = _rss_mb()
    torch.manual_seed(0)
    tokens = torch.randint(0, 1000, (int(samples), int(length)))
    config = CompressConfig(
        method, float(ratio), (targets,), calib_samples=int(samples), calib_len=int(length)
    )
    start = time.perf_counter()
    result = compress_checkpoint(
        model, config, out, tokens, device=device, dtype=None if dtype == "auto" else getattr(torch, dtype),
        overwrite=True,
    )  # fmt: skip
    peak_device = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    print(json.dumps({
        "seconds": result.seconds, "wall": time.perf_counter() - start, "ratio_reached": result.ratio_reached,
        "rss_start_mb": rss_start, "peak_rss_mb": _peak_rss_mb(), "peak_device_mb": peak_device,
        "memory": result.memory,
    }))  # fmt: skip


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    shape: Shape, method: str, *, ratio: float, targets: str, device: str, dtype: str, samples: int, length: int,
    work: Path,
) -> dict:  # fmt: skip
    """Write the checkpoint of ``shape`` (once per work dir) and compress it with ``method`` in a fresh process."""
    model = work / shape.name
    if not (model / "config.json").exists():
        write_synthetic_llama(model, shape, dtype="float32" if dtype == "auto" else dtype)
    argv = [str(model), str(work / f"{shape.name}-{method}"), method, str(ratio), targets, device, dtype,
            str(samples), str(length)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from masa.bench.scale import child; child(sys.argv[1:])", *argv],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"compressing {shape.name} with {method} failed:\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    file_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    return {"shape": asdict(shape), "name": shape.name, "method": method, "file_mb": round(file_mb, 1), **row}


def write_results(rows: list[dict], out: Path, command: str) -> None:
    """OUT/scale.json, OUT/scale.md (a table) and OUT/scale.png (peak RSS and time against file size)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    (out / SCALE_JSON).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Command: `{command}`",
        "",
        "| shape | method | weights MiB | peak RSS MiB | read s | calibration s | fit s | wall s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["seconds"]
        lines.append(
            f"| {r['name']} | {r['method']} | {r['file_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{s.get('read', 0):.1f} | {s.get('calibration', 0):.1f} | {s.get('factorisation', 0):.1f} | {r['wall']:.1f} | {r['ratio_reached']:.3f} |"
        )
    (out / SCALE_MD).write_text("\n".join(lines) + "\n")
    figure = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(figure)
    memory, seconds = figure.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        sizes = [r["file_mb"] for r in mine]
        memory.plot(sizes, [r["peak_rss_mb"] for r in mine], "o-", label=method)
        seconds.plot(sizes, [r["wall"] for r in mine], "o-", label=method)
    memory.plot(sizes, sizes, "k:", label="weights size")
    memory.set(xlabel="weights (MiB)", ylabel="peak RSS (MiB)", title="memory")
    seconds.set(xlabel="weights (MiB)", ylabel="wall time (s)", title="time")
    memory.legend()
    figure.tight_layout()
    figure.savefig(out / SCALE_PNG, dpi=120)


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """Register `masa bench scale`."""
    parser = benchmarks.add_parser(
        "scale",
        help="time and peak memory of streamed compression against model size (synthetic Llama shapes)",
        description="Write synthetic Llama checkpoints and compress each with --low-memory in a fresh process; "
        "writes OUT/scale.json, scale.md and scale.png.",
    )
    parser.add_argument("--shapes", nargs="+", default=["d256", "d512", "d1024"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["svd-llm", "masa"])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=128)
    parser.add_argument("--work", help="where the synthetic checkpoints go (default: a temporary directory)")
    parser.add_argument("--out", required=True, help="results folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = shlex.join([
        "masa", "bench", "scale", "--shapes", *args.shapes, "--methods", *args.methods, "--ratio", str(args.ratio),
        "--targets", args.targets, "--device", args.device, "--dtype", args.dtype, "--calib-samples",
        str(args.calib_samples), "--calib-len", str(args.calib_len), "--out", args.out,
    ])  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for name in args.shapes:
            for method in args.methods:
                row = measure(
                    SHAPES[name], method, ratio=args.ratio, targets=args.targets, device=args.device,
                    dtype=args.dtype, samples=args.calib_samples, length=args.calib_len, work=Path(work),
                )  # fmt: skip
                rows.append(row)
                print(
                    json.dumps({k: row[k] for k in ("name", "method", "file_mb", "peak_rss_mb", "wall")}),
                    flush=True,
                )
    write_results(rows, Path(args.out), command)
    print((Path(args.out) / SCALE_MD).read_text())
    return 0
