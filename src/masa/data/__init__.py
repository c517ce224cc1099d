"""Text data: locally trained tokenizers, cached token streams and deterministic batching."""

from masa.data.corpus import TokenSplits, WindowSampler, eval_batches, load_splits, resolve_files
from masa.data.tokenizer import decode, encode, load_tokenizer, train_tokenizer

__all__ = [
    "TokenSplits",
    "WindowSampler",
    "decode",
    "encode",
    "eval_batches",
    "load_splits",
    "load_tokenizer",
    "resolve_files",
    "train_tokenizer",
]
