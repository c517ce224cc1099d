"""Token streams for training: file lookup, a cached tokenised train/validation split, and batching.

The tokenised corpus is cached as raw numpy arrays (`train.bin`, `valid.bin`, uint16 or uint32) plus a
JSON sidecar, keyed by the content of the files, the split and the tokenizer, and opened as memmaps.
`WindowSampler` makes every batch a pure function of (seed, step, micro-batch, rank), so a resumed run
draws exactly the batches an uninterrupted one would, without saving any data state.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from masa.data.tokenizer import encode_batch, eot_id, tokenizer_hash, vocab_size

if TYPE_CHECKING:
    from masa.data.tokenizer import AnyTokenizer

_REPO_DIR = Path(__file__).resolve().parents[3]  # src/masa/data/corpus.py -> repository root
_CHUNK_CHARS = 1 << 16  # texts are encoded in line-aligned chunks of about this many characters


def default_data_dir() -> Path:
    """The repository's bundled corpora (`data/`)."""
    return _REPO_DIR / "data"


def default_cache_dir() -> Path:
    """Where trained tokenizers and token arrays are cached (`.cache/masa/`, git-ignored)."""
    return _REPO_DIR / ".cache" / "masa"


def resolve_files(patterns: Sequence[str], data_dir: Path) -> list[Path]:
    """Paths of corpus files given as names or globs relative to `data_dir` (absolute paths kept).

    Raises FileNotFoundError naming a file that does not exist or a glob that matches nothing.
    """
    files: list[Path] = []
    for pattern in patterns:
        full = Path(data_dir) / pattern  # an absolute pattern stays absolute
        if glob.has_magic(str(full)):
            matches = sorted(Path(p) for p in glob.glob(str(full)) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(
                    f"corpus glob {pattern!r} matches no file in {data_dir}: check data_dir"
                )
            files.extend(matches)
        elif full.is_file():
            files.append(full)
        else:
            raise FileNotFoundError(f"corpus file {pattern!r} not found (looked for {full}): check the name")
    return list(dict.fromkeys(files))  # drop duplicates, keep order


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _line_chunks(text: str) -> list[str]:
    """Split text at line ends into chunks of about `_CHUNK_CHARS` characters (their concatenation is text)."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + _CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    return chunks


def tokenize_text(tok: AnyTokenizer, text: str) -> np.ndarray:
    """Token ids (int64) of a whole text, encoded in line-aligned chunks for parallelism and memory."""
    chunks = encode_batch(tok, _line_chunks(text))
    return np.concatenate([np.zeros(0, dtype=np.int64)] + [np.asarray(c, dtype=np.int64) for c in chunks])


@dataclass(frozen=True)
class TokenSplits:
    """Token ids of the training and validation text (read-only memmaps when cached)."""

    train: np.ndarray
    valid: np.ndarray


def _split_arrays(
    train_files: Sequence[Path], valid_files: Sequence[Path], valid_fraction: float, tok: AnyTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise; hold out the last `valid_fraction` of each training file plus all of `valid_files`."""
    eot = eot_id(tok)
    sep = np.array([] if eot is None else [eot], dtype=np.int64)
    train, valid = [], []
    for path in train_files:
        ids = tokenize_text(tok, Path(path).read_text(encoding="utf-8"))
        cut = len(ids) - int(math.ceil(len(ids) * valid_fraction))
        train += [ids[:cut], sep]
        if cut < len(ids):
            valid += [ids[cut:], sep]
    for path in valid_files:
        valid += [tokenize_text(tok, Path(path).read_text(encoding="utf-8")), sep]
    empty = np.zeros(0, dtype=np.int64)
    return np.concatenate(train or [empty]), np.concatenate(valid or [empty])


def load_splits(
    train_files: Sequence[Path],
    valid_files: Sequence[Path],
    valid_fraction: float,
    tok: AnyTokenizer,
    cache_dir: Path,
) -> TokenSplits:
    """The tokenised train/validation split, built once and then read from `cache_dir` as memmaps.

    Held out: the last `valid_fraction` of the tokens of every training file, and every file in
    `valid_files` whole. The cache key covers file contents, the split and the tokenizer.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(
            f"valid_fraction {valid_fraction} must lie in [0, 1): e.g. 0.05 holds out the last 5 %"
        )
    key = hashlib.sha256(
        json.dumps(
            {
                "train": [_file_digest(p) for p in train_files],
                "valid": [_file_digest(p) for p in valid_files],
                "fraction": valid_fraction,
                "tokenizer": tokenizer_hash(tok),
            }
        ).encode()
    ).hexdigest()[:16]
    folder = Path(cache_dir) / f"corpus-{key}"
    if not (folder / "meta.json").is_file():
        train, valid = _split_arrays(train_files, valid_files, valid_fraction, tok)
        _write_cache(folder, train, valid, tok, [str(p) for p in (*train_files, *valid_files)])
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenSplits(
        *(_open(folder / f"{name}.bin", dtype, meta[f"{name}_tokens"]) for name in ("train", "valid"))
    )


def _open(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if length == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


def _write_cache(
    folder: Path, train: np.ndarray, valid: np.ndarray, tok: AnyTokenizer, files: list[str]
) -> None:
    """Write the arrays and sidecar into a temporary folder, then rename it into place."""
    dtype = np.uint16 if vocab_size(tok) <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.astype(dtype).tofile(tmp / "train.bin")
    valid.astype(dtype).tofile(tmp / "valid.bin")
    meta = {
        "dtype": np.dtype(dtype).name,
        "train_tokens": len(train),
        "valid_tokens": len(valid),
        "files": files,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process cached the same split first
        shutil.rmtree(tmp, ignore_errors=True)


def _check_length(tokens: np.ndarray, seq_len: int, n_windows: int, what: str) -> None:
    need = n_windows * seq_len + 1
    if len(tokens) < need:
        raise ValueError(
            f"the {what} text is too short: one batch of {n_windows} windows of {seq_len}+1 tokens needs "
            f"{need} tokens, there are {len(tokens)}: add text, or lower seq_len or batch_size"
        )


def _window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both (B, T), of the windows tokens[s : s + T + 1]."""
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    batch = torch.from_numpy(rows)
    return batch[:, :-1], batch[:, 1:]


class WindowSampler:
    """Training batches over windows of seq_len + 1 tokens, visited once per epoch in shuffled order.

    Window i covers tokens[i T : i T + T + 1]: consecutive windows share one token, so every token is a
    target exactly once per epoch. The windows of one optimizer step are the next
    `batch_size * grad_accum * world_size` entries of the epoch's permutation (drawn from a generator
    seeded by (seed, epoch)); rank r's micro-batch m takes its own slice of them.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        grad_accum: int = 1,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.grad_accum, self.world_size = grad_accum, world_size
        self.windows_per_step = batch_size * grad_accum * world_size
        _check_length(tokens, seq_len, self.windows_per_step, "training")
        self.n_windows = (len(tokens) - 1) // seq_len
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        """Training tokens (targets) consumed by one optimizer step over all ranks."""
        return self.windows_per_step * self.seq_len

    def epochs(self, steps: int) -> float:
        """Epochs seen after `steps` optimizer steps: tokens consumed / training tokens."""
        return steps * self.tokens_per_step / len(self.tokens)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perm

    def window_ids(self, step: int, micro: int = 0, rank: int = 0) -> np.ndarray:
        """Indices of the windows in rank `rank`'s micro-batch `micro` of optimizer step `step`."""
        first = step * self.windows_per_step + (micro * self.world_size + rank) * self.batch_size
        ids = np.empty(self.batch_size, dtype=np.int64)
        for j, position in enumerate(range(first, first + self.batch_size)):
            epoch, offset = divmod(position, self.n_windows)
            ids[j] = self._permutation(epoch)[offset]
        return ids

    def batch(self, step: int, micro: int = 0, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) int64 of one micro-batch."""
        return _window_batch(self.tokens, self.window_ids(step, micro, rank) * self.seq_len, self.seq_len)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out batches (B, T) in text order: the first `max_batches` batches of consecutive windows.

    Batch i goes to rank i mod world_size, so the ranks together score each window once.
    """
    _check_length(tokens, seq_len, batch_size, "validation")
    n_batches = min(max_batches, (len(tokens) - 1) // seq_len // batch_size)
    for i in range(rank, n_batches, world_size):
        starts = (np.arange(batch_size) + i * batch_size) * seq_len
        yield _window_batch(tokens, starts, seq_len)
