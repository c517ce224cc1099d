import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20


@pytest.fixture
def saved_llama(tmp_path):
    """A tiny two-block Llama with a character tokenizer in tmp_path/base, and tmp_path/calib.txt."""
    from tiny_models import build
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    import masa

    vocab = {c: i for i, c in enumerate(["[UNK]", *sorted(set(TEXT))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    masa.save(build("llama", n_layer=2), tmp_path / "base", tokenizer=tokenizer)
    (tmp_path / "calib.txt").write_text(TEXT)
    return tmp_path
