"""`masa bench speed`: training-step throughput of each attention variant against dense, interleaved.

On a shared machine the speed drifts (other jobs, frequency scaling), so timing the variants one after
another, as a suite of training runs does, mixes that drift into the comparison. Here each round times
one full optimizer step (forward, loss, backward, clipping, AdamW) of every variant in turn, on the
same batch, in one process; the ratio to dense uses the medians over rounds. The models are the
suite's: the preset's dense shape with each variant's knob (:func:`masa.bench.train_suite.suite_runs`).
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import masa
from masa.bench.report import markdown_table
from masa.bench.train_suite import SuiteConfig, method_name, select_runs, suite_runs, variant_config
from masa.io import write_json
from masa.model import MasaLM, MasaLMConfig
from masa.runtime import resolve_device
from masa.train.trainer import param_groups

SPEED_JSON, SPEED_MD = "speed.json", "speed.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stored_attention(model: MasaLM) -> int:
    """Attention parameters as saved: a coefficient generator is folded into plain coefficients first."""
    stored = copy.deepcopy(model)
    masa.collapse_generators(stored)
    return masa.count(stored).attention


def dense_flops_per_token(config: MasaLMConfig, seq_len: int) -> int:
    """Training FLOPs per token of the *dense* model of this shape (forward + backward): 6 x its matmul
    parameters (blocks and head) + 12 L T d for the attention scores and values. Every variant is
    credited with this number: MASA and the sharing baselines do at least dense's work per token."""
    d, n_layer = config.d_model, config.n_layer
    matmul = n_layer * (4 * d * d + 3 * d * config.ff_dim) + d * config.vocab_size
    return 6 * matmul + 12 * n_layer * seq_len * d


def measure_speed(
    suite: str,
    config: SuiteConfig,
    rounds: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    methods: Sequence[str] | None = None,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Median step time and tokens/s of every run of ``suite`` (one seed; ``methods`` keeps some runs),
    each as a ratio to dense; model TFLOP/s (and utilisation of ``peak_tflops``); on CUDA each step's
    peak memory. Steps run under ``train.dtype`` autocast, as training does."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    dev = resolve_device(device)
    if dev.type == "cpu" and config.bench.cpu_threads:
        torch.set_num_threads(config.bench.cpu_threads)
    tc, seq_len = config.run.train, config.run.data.seq_len
    base = config.run.model_config(config.run.data.vocab_size)
    specs = select_runs(suite, suite_runs(suite, base.n_layer, config.bench.target_ratio), methods)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16")
    models, optimizers = {}, {}
    for spec in specs:
        torch.manual_seed(tc.seed)
        model = MasaLM(variant_config(spec, base, config.bench.coef_generator)).to(dev).train()
        if tc.compile:
            model.compile()
        models[spec.label] = model
        optimizers[spec.label] = torch.optim.AdamW(
            param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=dev.type == "cuda"
        )
    gen = torch.Generator().manual_seed(tc.seed)
    batch = torch.randint(0, base.vocab_size, (tc.batch_size, seq_len + 1), generator=gen).to(dev)  # (B, T+1)

    peak_bytes: dict[str, int] = dict.fromkeys(models, 0)

    def step(label: str) -> float:
        model, optimizer = models[label], optimizers[label]
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        with autocast:
            logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        _sync(dev)
        if dev.type == "cuda":
            peak_bytes[label] = max(peak_bytes[label], torch.cuda.max_memory_allocated(dev))
        return time.perf_counter() - start

    times: dict[str, list[float]] = {label: [] for label in models}
    for r in range(warmup + rounds):
        for label in models:
            seconds = step(label)
            if r >= warmup:
                times[label].append(seconds)
    tokens = tc.batch_size * seq_len
    flops = dense_flops_per_token(base, seq_len)
    dense = statistics.median(times[specs[0].label])
    rows = []
    for spec in specs:
        median = statistics.median(times[spec.label])
        q1, _, q3 = statistics.quantiles(times[spec.label], n=4) if rounds > 1 else (median, 0, median)
        rows.append(
            {
                "label": spec.label,
                "method": method_name(models[spec.label].config),
                "attention_params": _stored_attention(models[spec.label]),
                "median_step_s": median,
                "iqr_step_s": [q1, q3],
                "tokens_per_s": tokens / median,
                "speed_vs_dense": dense / median,
                "model_tflops_per_s": flops * tokens / median / 1e12,
                "mfu": flops * tokens / median / (peak_tflops * 1e12) if peak_tflops else None,
                "peak_memory_mb": peak_bytes[spec.label] / 2**20 if dev.type == "cuda" else None,
            }
        )
    return {
        "suite": suite,
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "rounds": rounds,
        "warmup": warmup,
        "tokens_per_step": tokens,
        "dtype": tc.dtype,
        "dense_flops_per_token": flops,
        "peak_tflops": peak_tflops,
        "model": dataclasses.asdict(base),
        "variants": rows,
    }


def write_speed(results: dict[str, Any], out_dir: str | Path, command: str = "") -> None:
    """speed.json and speed.md into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SPEED_JSON, {**results, "command": command})
    rows = [
        [
            v["method"],
            f"{v['attention_params']:,}",
            f"{v['median_step_s'] * 1000:.1f}",
            f"{v['iqr_step_s'][0] * 1000:.1f}–{v['iqr_step_s'][1] * 1000:.1f}",
            f"{v['tokens_per_s']:,.0f}",
            f"{v['speed_vs_dense']:.3f}",
            f"{v['model_tflops_per_s']:.3f}" + (f" ({100 * v['mfu']:.1f} %)" if v.get("mfu") else ""),
            "-" if v.get("peak_memory_mb") is None else f"{v['peak_memory_mb']:,.0f}",
        ]
        for v in results["variants"]
    ]
    threads = f", {results['threads']} thread(s)" if results["threads"] else ""
    text = [
        f"# masa bench speed: {results['suite']}",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Device {results['device']}{threads}; {results['rounds']} rounds after {results['warmup']} warm-up "
        f"rounds, each timing one optimizer step of every variant in turn on the same batch of "
        f"{results['tokens_per_step']:,} tokens ({results.get('dtype', 'float32')}). x dense = dense median step "
        "time / variant median step time. Model TFLOP/s credit every variant with the dense model's "
        f"{results.get('dense_flops_per_token', 0):,} FLOPs per token (MFU against the given peak).",
        "",
        markdown_table(
            [
                "method",
                "attn params",
                "median step ms",
                "IQR ms",
                "tokens/s",
                "x dense",
                "model TFLOP/s (MFU)",
                "peak MiB",
            ],
            rows,
        ),  # fmt: skip
    ]
    (out / SPEED_MD).write_text("\n".join(text), encoding="utf-8")
