"""Tokenizers, the cached train/validation split and the deterministic batch sampler."""

from __future__ import annotations

import numpy as np
import pytest

from masa.data import corpus, tokenizer
from masa.data.corpus import WindowSampler, eval_batches, load_splits, resolve_files
from masa.data.tokenizer import decode, encode, load_tokenizer, train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog.\nA stitch in time saves nine; É très bien!\n" * 40


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizer_round_trip_and_reload(kind, book, tmp_path):
    tok = train_tokenizer([book], kind, 300, tmp_path / "cache")
    sample = "the lazy fox saves nine.\nÉ bien"
    ids = encode(tok, sample)
    assert decode(tok, ids) == sample
    if kind == "bpe":
        assert len(ids) < len(sample)  # merges were learned
        assert decode(tok, encode(tok, "unseen ✓ bytes")) == "unseen ✓ bytes"  # byte-level: nothing unknown
    tok.save(str(tmp_path / "tokenizer.json"))
    assert encode(load_tokenizer(tmp_path), sample) == ids


def test_tokenizer_cache_hit_and_key(book, tmp_path, monkeypatch):
    first = train_tokenizer([book], "bpe", 300, tmp_path)
    monkeypatch.setattr(tokenizer, "_train_bpe", lambda *a: pytest.fail("retrained although cached"))
    assert train_tokenizer([book], "bpe", 300, tmp_path).to_str() == first.to_str()
    monkeypatch.undo()
    train_tokenizer([book], "bpe", 320, tmp_path)  # another vocabulary size: another cache entry
    book.write_text(TEXT + "new text", encoding="utf-8")  # another content: another cache entry
    train_tokenizer([book], "bpe", 300, tmp_path)
    assert len(list(tmp_path.glob("tokenizer-bpe-*.json"))) == 3


def test_load_tokenizer_without_tokenizer_json_uses_transformers(book, tmp_path):
    from transformers import GPT2TokenizerFast

    tok = train_tokenizer([book], "bpe", 300, tmp_path)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    vocab, merges = tok.model.save(str(hf_dir))
    GPT2TokenizerFast(vocab_file=vocab, merges_file=merges).save_pretrained(str(hf_dir), legacy_format=True)
    (hf_dir / "tokenizer.json").unlink(missing_ok=True)
    loaded = load_tokenizer(hf_dir)
    assert encode(loaded, "the lazy dog") == encode(tok, "the lazy dog")
    assert decode(loaded, encode(loaded, "the lazy dog")) == "the lazy dog"


def test_resolve_files_names_what_is_missing(tmp_path, book):
    assert resolve_files(["book.txt", "*.txt"], tmp_path) == [book]
    with pytest.raises(FileNotFoundError, match="'nope.txt' not found"):
        resolve_files(["nope.txt"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'missing/\*.txt' matches no file"):
        resolve_files(["missing/*.txt"], tmp_path)


def test_split_holds_out_tail_and_files_and_is_cached(book, tmp_path, monkeypatch):
    other = tmp_path / "other.txt"
    other.write_text("Entirely held out text.\n" * 10, encoding="utf-8")
    tok = train_tokenizer([book, other], "char", 0, tmp_path)
    whole = corpus.tokenize_text(tok, TEXT)
    splits = load_splits([book], [other], 0.1, tok, tmp_path / "cache")
    eot = tokenizer.eot_id(tok)
    cut = len(whole) - int(np.ceil(0.1 * len(whole)))
    assert np.array_equal(splits.train, np.concatenate([whole[:cut], [eot]]))
    assert np.array_equal(splits.valid[: len(whole) - cut], whole[cut:])
    assert decode(tok, splits.valid[len(whole) - cut + 1 :].tolist()) == other.read_text()
    assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.uint16
    monkeypatch.setattr(corpus, "_split_arrays", lambda *a: pytest.fail("re-tokenised although cached"))
    again = load_splits([book], [other], 0.1, tok, tmp_path / "cache")
    assert np.array_equal(again.valid, splits.valid)


def test_sampler_covers_each_window_once_per_epoch_and_is_pure():
    tokens = np.arange(16 * 25 + 1)  # 25 windows of 16 (+1) tokens
    make = lambda seed=3: WindowSampler(tokens, 16, batch_size=2, grad_accum=2, world_size=2, seed=seed)  # noqa: E731
    sampler = make()
    assert sampler.n_windows == 25 and sampler.tokens_per_step == 8 * 16
    seen = [
        w
        for step in range(25)  # 25 steps x 8 windows = 8 epochs
        for micro in range(2)
        for rank in range(2)
        for w in sampler.window_ids(step, micro, rank)
    ]
    epochs = np.array(seen).reshape(8, 25)
    assert all(sorted(e) == list(range(25)) for e in epochs)  # each window exactly once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    fresh = make()
    x, y = fresh.batch(7, 1, 1)
    assert np.array_equal(x.numpy(), sampler.batch(7, 1, 1)[0].numpy())  # pure function of (seed, step, rank)
    assert x.shape == (2, 16) and np.array_equal(y[:, :-1].numpy(), x[:, 1:].numpy())
    assert not np.array_equal(make(seed=4).window_ids(0), sampler.window_ids(0))
    assert sampler.epochs(25) == pytest.approx(8 * 25 * 16 / len(tokens))


def test_too_short_corpus_says_how_many_tokens():
    with pytest.raises(ValueError, match=r"needs 65 tokens, there are 40"):
        WindowSampler(np.arange(40), 16, batch_size=4)
    with pytest.raises(ValueError, match=r"validation text is too short.*needs 33 tokens"):
        list(eval_batches(np.arange(20), 16, 2, 5))


def test_eval_batches_are_ordered_and_shared_between_ranks():
    tokens = np.arange(8 * 10 + 1)  # 10 windows of 8
    single = [x for x, _ in eval_batches(tokens, 8, 2, max_batches=4)]
    assert [int(x[0, 0]) for x in single] == [0, 16, 32, 48]
    shards = [[int(x[0, 0]) for x, _ in eval_batches(tokens, 8, 2, 4, rank=r, world_size=2)] for r in (0, 1)]
    assert shards == [[0, 32], [16, 48]]
