"""Build the models of docs/results/infer: a synthetic 12-block d=256 Llama (blocks alike: block 0 plus
noise, so shared atoms pay off as in a trained model) and its compressions, saved under OUT.

    python docs/results/infer/build_models.py OUT [RATIO ...]
"""

import sys
from pathlib import Path

import torch
import transformers as tf

import masa
from masa.compress import CompressConfig, compress

METHODS = {"svd-llm": {}, "basis-sharing": {}, "cospadi": {"iterations": 2}, "masa": {}}


def base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers[1:]:
            for p, p0 in zip(block.parameters(), model.model.layers[0].parameters(), strict=True):
                p.copy_(p0 + 0.3 * p0.std() * torch.randn_like(p0))
    return model


def main(out: Path, ratios: list[float]) -> None:
    masa.save(base(), out / "original", overwrite=True)
    calib = torch.randint(0, 4096, (16, 128), generator=torch.Generator().manual_seed(1))
    for ratio in ratios:
        for method, options in METHODS.items():
            target = out / f"{method}-{round(ratio * 100)}"
            if target.exists():
                continue
            model = base()
            compress(model, CompressConfig(method, ratio, targets=("all-linear",), options=options), calib)
            masa.save(model, target)
            print("saved", target, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), [float(r) for r in sys.argv[2:]] or [0.4])
