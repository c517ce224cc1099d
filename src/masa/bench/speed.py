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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import masa
from masa.bench.report import markdown_table
from masa.bench.train_suite import SuiteConfig, method_name, suite_runs, variant_config
from masa.io import write_json
from masa.model import MasaLM
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


def measure_speed(
    suite: str, config: SuiteConfig, rounds: int = 20, warmup: int = 3, device: str = "cpu"
) -> dict[str, Any]:
    """Median step time and tokens/s of every run of ``suite`` (one seed), each as a ratio to dense."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds} must be >= 1 and warmup={warmup} >= 0")
    dev = torch.device(device)
    if dev.type == "cpu" and config.bench.cpu_threads:
        torch.set_num_threads(config.bench.cpu_threads)
    tc, seq_len = config.run.train, config.run.data.seq_len
    base = config.run.model_config(config.run.data.vocab_size)
    specs = suite_runs(suite, base.n_layer, config.bench.target_ratio)
    models, optimizers = {}, {}
    for spec in specs:
        torch.manual_seed(tc.seed)
        model = MasaLM(variant_config(spec, base, config.bench.coef_generator)).to(dev).train()
        models[spec.label] = model
        optimizers[spec.label] = torch.optim.AdamW(
            param_groups(model, tc.weight_decay), lr=tc.lr, betas=tc.betas
        )
    gen = torch.Generator().manual_seed(tc.seed)
    batch = torch.randint(0, base.vocab_size, (tc.batch_size, seq_len + 1), generator=gen).to(dev)  # (B, T+1)

    def step(label: str) -> float:
        model, optimizer = models[label], optimizers[label]
        _sync(dev)
        start = time.perf_counter()
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        _sync(dev)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {label: [] for label in models}
    for r in range(warmup + rounds):
        for label in models:
            seconds = step(label)
            if r >= warmup:
                times[label].append(seconds)
    tokens = tc.batch_size * seq_len
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
            }
        )
    return {
        "suite": suite,
        "device": str(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "rounds": rounds,
        "warmup": warmup,
        "tokens_per_step": tokens,
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
        f"{results['tokens_per_step']:,} tokens. x dense = dense median step time / variant median step time.",
        "",
        markdown_table(["method", "attn params", "median step ms", "IQR ms", "tokens/s", "x dense"], rows),
    ]
    (out / SPEED_MD).write_text("\n".join(text), encoding="utf-8")
