"""Tokenizers trained locally (byte-level BPE or characters), cached, and saved as one `tokenizer.json`.

Every tokenizer this module makes is a `tokenizers.Tokenizer`, so a model directory always carries a
single `tokenizer.json`. Hugging Face model directories without one are read through `AutoTokenizer`;
`encode` and `decode` accept either kind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # transformers is slow to import; only `load_tokenizer` needs it at run time
    from transformers import PreTrainedTokenizerBase

    AnyTokenizer = Tokenizer | PreTrainedTokenizerBase  # for annotations only

TOKENIZER_KINDS = ("bpe", "char")
EOT = "<|endoftext|>"  # separates documents in a token stream
UNK = "[UNK]"  # characters the char tokenizer never saw
TOKENIZER_FILE = "tokenizer.json"


def _check_kind(kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: use one of {', '.join(TOKENIZER_KINDS)}")


def _read_texts(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        yield Path(path).read_text(encoding="utf-8")


def _cache_key(files: Sequence[Path], kind: str, vocab_size: int) -> str:
    """Hash of the corpus content, tokenizer kind and vocabulary size (file names do not matter)."""
    digest = hashlib.sha256(f"{kind}:{vocab_size}".encode())
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


def _train_bpe(files: Sequence[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): no unknown tokens, every byte is in the base alphabet."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(_read_texts(files), trainer)
    return tok


def _train_char(files: Sequence[Path]) -> Tokenizer:
    """One token per character seen in the corpus, `[UNK]` for the rest; decoding concatenates."""
    chars = sorted(set().union(*(set(text) for text in _read_texts(files))))
    specials = [UNK, EOT]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def train_tokenizer(files: Sequence[Path], kind: str, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Train (or fetch from `cache_dir`) a tokenizer on `files`.

    The cache key hashes the files' content, `kind` and `vocab_size` (ignored by "char"), so a second
    call on the same text returns the same tokenizer without training.
    """
    _check_kind(kind)
    if kind == "bpe" and vocab_size < 257:
        raise ValueError(
            f"vocab_size {vocab_size} is below the 256 bytes + 1 special of byte-level BPE: use >= 257"
        )
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no files to train the tokenizer on: list at least one training file")
    size = vocab_size if kind == "bpe" else 0
    path = Path(cache_dir) / f"tokenizer-{kind}-{size}-{_cache_key(files, kind, size)}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = _train_bpe(files, vocab_size) if kind == "bpe" else _train_char(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent callers never read half a file
    return tok


def load_tokenizer(model_dir: str | Path) -> AnyTokenizer:
    """The tokenizer of a model directory: its `tokenizer.json`, else whatever `AutoTokenizer` finds.

    Long texts (calibration, evaluation, training streams) must become all their tokens, so any truncation
    or padding the files carry (sentence-transformers tokenizers truncate at 128) is switched off here and
    in `encode`. Tokenizers that need their own code (an `auto_map`) are refused: no remote code runs.
    """
    model_dir = Path(model_dir)
    _refuse_remote_code(model_dir)
    path = model_dir / TOKENIZER_FILE
    if path.is_file():
        tok = Tokenizer.from_file(str(path))
        tok.no_truncation()
        tok.no_padding()
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {model_dir} and transformers could not load a tokenizer from it ({err}): "
            "save the tokenizer beside the model"
        ) from err


def _refuse_remote_code(model_dir: Path) -> None:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        auto_map = json.loads(path.read_text()).get("auto_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(
            f"{path} is not a valid JSON object ({err}); the tokenizer files are corrupt"
        ) from err
    if auto_map:
        raise ValueError(
            f"{path} names its own tokenizer code (auto_map {auto_map}), and masa never runs remote code; if "
            f"{TOKENIZER_FILE} alone tokenizes this model correctly, remove auto_map from tokenizer_config.json"
        )


def tokenizer_hash(tok: AnyTokenizer) -> str:
    """Content hash of a tokenizer, used to key token caches."""
    text = tok.to_str() if isinstance(tok, Tokenizer) else json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tok: AnyTokenizer, text: str) -> list[int]:
    """All token ids of `text` (never truncated, no length warning), without BOS/EOS or other specials."""
    if isinstance(tok, Tokenizer):
        return tok.encode(text, add_special_tokens=False).ids
    return tok.encode(text, add_special_tokens=False, truncation=False, verbose=False)


def encode_batch(tok: AnyTokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of several texts (in parallel for `tokenizers.Tokenizer`)."""
    if isinstance(tok, Tokenizer):
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    return [encode(tok, text) for text in texts]


def decode(tok: AnyTokenizer, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens skipped."""
    return tok.decode(list(ids), skip_special_tokens=True)


def vocab_size(tok: AnyTokenizer) -> int:
    """Number of ids the tokenizer can produce (the model's embedding rows)."""
    return tok.get_vocab_size() if isinstance(tok, Tokenizer) else len(tok)


def eot_id(tok: AnyTokenizer) -> int | None:
    """Id of the document separator, or None when the tokenizer has none."""
    if isinstance(tok, Tokenizer):
        return tok.token_to_id(EOT)
    return tok.eos_token_id
