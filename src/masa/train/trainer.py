"""The training loop: AdamW, warmup + cosine schedule, clipping, held-out evaluation, logs, checkpoints.

Every step is a pure function of (config, step, rank) and the weights and optimizer state: the batch
comes from `WindowSampler`, the learning rate from `lr_at`, and the random stream (dropout, if any) is
re-seeded from (seed, step, rank). A run resumed from a checkpoint therefore repeats an uninterrupted
run exactly. Under torchrun the model is wrapped in DDP and only rank 0 logs and writes files.
Rank 0 holds an exclusive lock on the run directory for the whole run (see `masa.io.lock`).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import masa
from masa.data.corpus import (
    TokenSplits,
    WindowSampler,
    default_cache_dir,
    default_data_dir,
    eval_batches,
    load_splits,
    resolve_files,
)
from masa.data.tokenizer import tokenizer_hash, train_tokenizer, vocab_size
from masa.io import write_json
from masa.io.lock import directory_lock
from masa.model import MasaLM, MasaLMConfig
from masa.progress import Progress
from masa.runtime import forward_logits
from masa.train.checkpoint import save_checkpoint
from masa.train.config import ConfigError, DataConfig, TrainConfig, TrainRunConfig
from masa.train.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shutdown
from masa.train.fsdp import full_state, load_full_state, shard_model
from masa.train.groups import param_groups
from masa.train.resume import check_resumable, data_fingerprint, load_resume_point
from masa.train.rundir import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    prepare_run_dir,
    restart_metrics,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)


def lr_at(step: int, total_steps: int, lr: float, min_lr: float, warmup_fraction: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine from lr to min_lr."""
    warmup = int(round(warmup_fraction * total_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))  # 0 -> 1 over the decay
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, resident set size (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def prepare_data(cfg: DataConfig, env: DistEnv) -> tuple[Tokenizer, TokenSplits]:
    """Resolve the files, train (or fetch) the tokenizer and the token split; rank 0 fills the caches first."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    valid_files = resolve_files(cfg.valid_files, data_dir)
    train_files = [f for f in resolve_files(cfg.train, data_dir) if f not in valid_files]
    if not train_files:
        raise ConfigError(
            "every file in data.train is also in data.valid_files: leave some text for training"
        )
    if not env.is_main:
        barrier(env)  # wait for rank 0 to build the caches, then read them
    tok = train_tokenizer(train_files, cfg.tokenizer, cfg.vocab_size, cache_dir)
    splits = load_splits(train_files, valid_files, cfg.valid_fraction, tok, cache_dir)
    if env.is_main:
        barrier(env)
    return tok, splits


def check_validation_length(tokens: np.ndarray, seq_len: int, batch_size: int) -> None:
    """Refuse, before any training, held-out text too short for one evaluation batch."""
    need = batch_size * seq_len + 1
    if len(tokens) < need:
        raise ConfigError(
            f"the validation text is too short: one batch of {batch_size} windows of {seq_len}+1 tokens needs "
            f"{need} tokens, there are {len(tokens)}: raise data.valid_fraction, add data.valid_files, or "
            "lower data.seq_len or train.batch_size"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, env: DistEnv
) -> float:
    """Mean next-token loss on the first `n_batches` held-out batches, shared out over the ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # (loss sum, token count)
    for x, y in eval_batches(tokens, seq_len, batch_size, n_batches, env.rank, env.world_size):
        logits = forward_logits(model, x.to(env.device))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(env.device).flatten(), reduction="sum")
        totals += torch.stack(
            [loss.double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=env.device)]
        )
    model.train(was_training)
    loss_sum, count = all_reduce_sum(env, totals).tolist()
    return loss_sum / count


def train(config: TrainRunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train a MasaLM as configured; returns the run summary (also written to out_dir/summary.json).

    An out_dir that already holds a run is refused unless `resume` (continue from the newest readable
    checkpoint; a fresh start when there is none) or `overwrite` (start again). Another process
    training into the same out_dir is refused. Run it under torchrun for data parallelism (``train.parallel``: "ddp", or "fsdp" to shard with FSDP2).
    """
    env = init_distributed(config.train.device)
    try:
        with directory_lock(config.train.out_dir) if env.is_main else nullcontext():
            return _train(config, env, resume, overwrite)
    finally:
        shutdown(env)


def unsharded(model_config: MasaLMConfig, weights: dict[str, torch.Tensor]) -> MasaLM:
    """A plain (unsharded) model holding ``weights``, built without initialising anything."""
    with torch.device("meta"):
        model = MasaLM(model_config)
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model


def _train_step(
    ddp: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    step: int,
    tc: TrainConfig,
    env: DistEnv,
) -> float:
    """One optimizer step over `grad_accum` micro-batches; returns the mean training loss over all ranks.

    Gradients are synchronised on the last micro-batch only (DDP's ``no_sync``; FSDP2's gradient sync flag).
    """
    fsdp = env.active and tc.parallel == "fsdp"
    torch.manual_seed(_step_seed(tc.seed, step, env.rank))  # dropout and the like: a function of the step
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=tc.dtype == "bfloat16")
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(tc.grad_accum):
        x, y = (t.to(env.device) for t in sampler.batch(step, micro, env.rank))  # (B, T) each
        last = micro == tc.grad_accum - 1
        if fsdp:
            ddp.set_requires_gradient_sync(last)
        with (
            nullcontext() if last or not env.active or fsdp else ddp.no_sync()
        ):  # all-reduce on the last only
            with autocast:
                logits = forward_logits(ddp, x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            (loss / tc.grad_accum).backward()
        loss_sum += loss.detach()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(env, loss_sum / tc.grad_accum).item() / env.world_size


def _train(config: TrainRunConfig, env: DistEnv, resume: bool, overwrite: bool) -> dict[str, Any]:
    tc, seq_len = config.train, config.data.seq_len
    out_dir = Path(tc.out_dir)
    ckpt_dir, log_path = out_dir / CHECKPOINT_DIR, out_dir / METRICS_FILE
    if env.is_main:
        prepare_run_dir(out_dir, resume, overwrite)
    tok, splits = prepare_data(config.data, env)
    sampler = WindowSampler(splits.train, seq_len, tc.batch_size, tc.grad_accum, env.world_size, tc.seed)
    check_validation_length(splits.valid, seq_len, tc.batch_size)
    total = tc.max_steps or math.ceil(tc.token_budget / sampler.tokens_per_step)

    fsdp = tc.parallel == "fsdp"
    if fsdp and not env.active:
        raise ConfigError(
            "train.parallel = 'fsdp' shards the model over processes: run under torchrun with 2 or more "
            "(torchrun --nproc_per_node 2 -m masa.cli train ...), or use train.parallel = 'ddp' (the default)"
        )
    torch.manual_seed(tc.seed)
    model_config = config.model_config(vocab_size(tok))
    model = MasaLM(model_config).to(env.device)
    if fsdp:
        shard_model(model)  # before the optimizer, which must hold the sharded parameters
    try:
        groups = param_groups(model, tc.weight_decay, tc.lr_mult, tc.wd_mult)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    # the fused kernel on CUDA; the same update rule, so a run may resume on another device
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, fused=env.device.type == "cuda")
    fingerprint = data_fingerprint(tokenizer_hash(tok), splits.train, splits.valid)
    start, elapsed_before = 0, 0.0
    checkpoint, skipped = load_resume_point(ckpt_dir, env.device) if resume else (None, [])
    if checkpoint is not None:
        check_resumable(checkpoint, config.to_dict(), model_config.to_dict(), fingerprint)
        for warning in skipped if env.is_main else []:
            log.warning(warning)
        if fsdp:
            load_full_state(model, optimizer, checkpoint.weights, checkpoint.optimizer)
        else:
            model.load_state_dict(checkpoint.weights)
            optimizer.load_state_dict(checkpoint.optimizer)
        start, elapsed_before = checkpoint.state["step"], checkpoint.state["elapsed_s"]
    if env.is_main:
        restart_metrics(log_path, start)  # a fresh run (start 0) starts a fresh log
    if tc.compile:
        model.compile()  # in place: the state dict keeps its keys, so checkpoints stay interchangeable
    ddp = DistributedDataParallel(model) if env.active and not fsdp else model

    record: dict[str, Any] = {}
    val_loss = None
    t0 = time.perf_counter()
    progress = Progress(total, start, desc="train", enabled=env.is_main)
    for step in range(start, total):
        lr = lr_at(step, total, tc.lr, tc.min_lr, tc.warmup_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        train_loss = _train_step(ddp, optimizer, sampler, step, tc, env)
        done, now = step + 1, time.perf_counter() - t0
        tokens_per_s = (done - start) * sampler.tokens_per_step / now
        progress.update(done, loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        evaluating = done % tc.eval_every == 0 or done == total
        if evaluating:
            val_loss = evaluate(model, splits.valid, seq_len, tc.batch_size, tc.eval_batches, env)
        if evaluating or done % tc.log_every == 0:
            record = {
                "step": done,
                "loss": train_loss,
                "lr": lr,
                "tokens": done * sampler.tokens_per_step,
                "tokens_per_s": tokens_per_s,
                "epochs": sampler.epochs(done),
                "elapsed_s": elapsed_before + now,
                "peak_memory_mb": _peak_memory_mb(env.device),
            }
            if evaluating:
                record.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
            if env.is_main:
                append_metrics(log_path, record)
        if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == total:
            weights, optim = full_state(model, optimizer) if fsdp else (None, optimizer)  # every rank gathers
            if not env.is_main:
                continue
            state = {
                "tokens": done * sampler.tokens_per_step,
                "elapsed_s": elapsed_before + now,
                "config": config.to_dict(),
                "model_config": model_config.to_dict(),
                "data": fingerprint,
            }
            saved = unsharded(model_config, weights) if fsdp else model
            save_checkpoint(ckpt_dir, done, saved, optim, state, tc.keep_checkpoints)
    progress.close()
    wall = time.perf_counter() - t0
    if val_loss is None:  # resumed a finished run: nothing trained, score it anyway
        val_loss = evaluate(model, splits.valid, seq_len, tc.batch_size, tc.eval_batches, env)

    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": total,
        "tokens": total * sampler.tokens_per_step,
        "epochs_seen": sampler.epochs(total),
        "train_loss": record.get("loss"),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "tokens_per_s": (total - start) * sampler.tokens_per_step / wall,
        "wall_time_s": elapsed_before + wall,
        "peak_memory_mb": _peak_memory_mb(env.device),
        "train_tokens": len(splits.train),
        "valid_tokens": len(splits.valid),
        "world_size": env.world_size,
        "resumed_from_step": start if checkpoint is not None else None,
        "out_dir": str(out_dir),
        "model_dir": str(out_dir / FINAL_DIR),
    }
    final = model
    if fsdp:
        weights, _ = full_state(model, optimizer)  # every rank gathers; rank 0 saves
        final = unsharded(model_config, weights) if env.is_main else model
    if env.is_main:
        masa.collapse_generators(final)  # keep only the coefficients the generator produced (paper, 2.1)
        masa.save(final, out_dir / FINAL_DIR, tokenizer=tok, info={"training": summary}, overwrite=True)
        write_json(out_dir / SUMMARY_FILE, summary)
    barrier(env)
    return summary
