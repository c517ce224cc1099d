"""The native LM's KV cache: cached logits equal full-context logits (every attention variant, chunked
and one token at a time), greedy ``generate`` is the same with and without the cache (also past the
context length, where the cache is dropped and the cropped context rerun), and in both runtimes."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import NATIVE_KNOBS

from masa.model import ATTENTION_VARIANTS, MasaLM, MasaLMConfig, generate
from masa.nn import set_runtime


def build(attention: str = "dense", **overrides) -> MasaLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=64, n_layer=4, n_head=4, d_model=32, max_seq_len=16, attention=attention)
    return MasaLM(MasaLMConfig(**(fields | NATIVE_KNOBS.get(attention, {}) | overrides))).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
@torch.no_grad()
def test_cached_logits_equal_full_context_logits(attention):
    model = build(attention)
    ids = tokens(2, 12)
    full = model(ids)  # (B, T, V)
    cache = model.new_cache()
    pieces = [model(ids[:, :5], cache=cache)]  # prompt
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(5, 9)]  # one token at a time
    pieces.append(model(ids[:, 9:], cache=cache))  # several tokens after a filled cache (explicit mask)
    assert len(cache) == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_refuses_to_outgrow_the_context():
    model = build()
    cache = model.new_cache()
    model(tokens(1, 16), cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(tokens(1, 1), cache=cache)


@pytest.mark.parametrize("attention", ["dense", "seq-share", "masa-qkvo"])
def test_greedy_generate_is_the_same_with_and_without_the_cache(attention):
    model = build(attention)
    prompt = tokens(3, 6)
    cached = generate(model, prompt, 14, temperature=0)  # 20 tokens > max_seq_len 16: crops on the way
    assert cached.shape == (3, 20)
    assert torch.equal(cached, generate(model, prompt, 14, temperature=0, use_cache=False))
    sampled = [
        generate(model, prompt, 8, generator=torch.Generator().manual_seed(1), use_cache=use)
        for use in (True, False)
    ]
    assert torch.equal(*sampled)


def test_greedy_generate_is_the_same_in_compact_and_dense_runtimes():
    compact = build("masa-qkvo")
    dense = set_runtime(copy.deepcopy(compact), "dense")
    assert not any(type(m).__name__ == "SharedLinear" for m in dense.modules())
    prompt = tokens(2, 4)
    assert torch.equal(
        generate(compact, prompt, 10, temperature=0), generate(dense, prompt, 10, temperature=0)
    )
