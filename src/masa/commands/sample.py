"""``masa sample DIR --prompt ...``: generate text from a saved model with its own tokenizer."""

from __future__ import annotations

import argparse
import math

from masa.cli_args import nonnegative_int, positive_int


def sample_text(
    directory: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    runtime: str = "compact",
) -> str:
    """Continue ``prompt`` with the model saved in ``directory``; returns prompt + continuation.

    A transformers model decodes with its own ``generate`` (KV cache); a native one with masa's.
    """
    import torch
    from transformers import GenerationMixin

    from masa.data.tokenizer import decode, encode, load_tokenizer
    from masa.io import load
    from masa.model.generate import generate

    model = load(directory, runtime=runtime)
    tok = load_tokenizer(directory)
    ids = encode(tok, prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    input_ids = torch.tensor([ids])  # (1, T)
    if isinstance(model, GenerationMixin):
        torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None)
        greedy = dict(do_sample=False)
        out = model.generate(
            input_ids,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            **(sampling if temperature > 0 else greedy),
        )  # (1, T + new)
    else:
        generator = torch.Generator().manual_seed(seed)
        out = generate(model, input_ids, max_new_tokens, temperature, top_k, generator)  # (1, T + new)
    return decode(tok, out[0].tolist())


def temperature(text: str) -> float:
    """argparse type: a finite softmax temperature >= 0 (0 = greedy)."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0 (0 samples greedily)")
    return value


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    """``--runtime compact|dense`` (masa.nn.runtime; the names are repeated here to keep torch unimported)."""
    parser.add_argument(
        "--runtime",
        choices=("compact", "dense"),
        default="compact",
        help="compact: hold only what was saved (the memory saving); dense: build plain weights at load "
        "(the original's speed and memory) (default: compact)",
    )


def run(args: argparse.Namespace) -> int:
    for i in range(args.num_samples):
        text = sample_text(
            args.directory,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.seed + i,
            args.runtime,
        )
        print(text if args.num_samples == 1 else f"--- sample {i + 1}\n{text}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate text from a saved model",
        description="Sample continuations of a prompt from a model directory (config.json, model.safetensors, tokenizer.json).",
    )
    p.add_argument("directory", help="model directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    p.add_argument(
        "--temperature", type=temperature, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)"
    )
    p.add_argument(
        "--top-k",
        type=nonnegative_int,
        default=50,
        help="sample among the k most likely tokens; 0 = all (default 50)",
    )
    p.add_argument("--num-samples", type=positive_int, default=1, help="number of samples (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_runtime_argument(p)
    p.set_defaults(func=run)
