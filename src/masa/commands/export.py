"""``masa export DIR --dense --out OUT``: a compressed model as a stock transformers checkpoint.

For serving engines that need a plain checkpoint: every compressed layer's dense weight is built once
and written under the original model's tensor names and layouts (GPT-2 ``Conv1D`` transposed, fused
projections re-fused in their row order: ``c_attn``, ``qkv_proj``, GPT-NeoX's per-head interleave), so
``AutoModelForCausalLM.from_pretrained(OUT)`` loads it without masa. It keeps the compressed model's
quality and gives up its memory saving: the checkpoint is as large as the original.

The config written is the source model's config.json byte for byte when the compressed directory kept
it (``source_config.json``, which ``masa compress`` writes from the model it read: transformers 5
rewrites keys such as ``rope_scaling`` that 4.x stacks need), otherwise the saved config without
its masa block.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def export_dense(directory: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the dense equivalent of the masa model in ``directory`` to ``out`` as a plain checkpoint."""
    from safetensors.torch import save_file

    from masa.io import CONFIG_NAME, WEIGHTS_NAME, atomic_directory, inspect_checkpoint, load, write_json
    from masa.io.serialization import SOURCE_CONFIG_NAME, _copy_files

    checkpoint = inspect_checkpoint(directory)
    operations = checkpoint.masa_block.get("surgery", []) if checkpoint.is_masa else []
    if checkpoint.config.get("model_type") == "masa_lm":
        raise ValueError(
            f"{directory} is a native masa model (masa_lm): transformers has no class for it, so there is "
            "no plain checkpoint to export; load it with masa.load"
        )
    if not operations:
        raise ValueError(
            f"{directory} is not compressed by masa (no surgery in its config.json): it already is a plain "
            "checkpoint, nothing to export; use it as it is"
        )
    tensors = _plain_tensors(load(directory, runtime="dense"), checkpoint.config)
    source_config = checkpoint.directory / SOURCE_CONFIG_NAME
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if source_config.is_file():  # the source's config.json as it was (kept by masa.save)
            shutil.copyfile(source_config, tmp / CONFIG_NAME)
        else:
            write_json(tmp / CONFIG_NAME, {k: v for k, v in checkpoint.config.items() if k != "masa"})
        _copy_files(checkpoint.directory, tmp, with_tokenizer=True)
    return Path(out)


def _plain_tensors(dense, config: dict) -> dict:
    """The dense model's tensors under the base architecture's names, shapes and layouts (each once)."""
    import torch

    from masa.io import build_base, parameters_on_meta
    from masa.io.serialization import unique_state_dict

    with parameters_on_meta():
        base = build_base(config)
    expected = base.state_dict()
    tensors, aliases = unique_state_dict(dense)
    tied = set(aliases) | set(getattr(base, "_tied_weights_keys", None) or {})
    plain: dict[str, torch.Tensor] = {}
    for key, like in expected.items():
        if key not in tensors:
            if key in tied:
                continue  # tied to a kept tensor: transformers ties it again on load
            raise ValueError(f"the dense model has no tensor {key!r} of the base architecture; re-save it")
        tensor = tensors[key]
        module = base.get_submodule(key.rpartition(".")[0])
        if type(module).__name__ == "Conv1D" and key.endswith(".weight"):
            tensor = tensor.t()  # nn.Linear (d_out, d_in) -> Conv1D (d_in, d_out)
        if tuple(tensor.shape) != tuple(like.shape):
            raise ValueError(f"{key}: dense tensor {tuple(tensor.shape)} vs base {tuple(like.shape)}")
        plain[key] = tensor.contiguous().cpu()
    return plain


def run(args: argparse.Namespace) -> int:
    if not args.dense:
        raise ValueError("say which export you want: --dense (the only one so far)")
    out = export_dense(args.directory, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: a plain transformers checkpoint (dense weights; as large as the original)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a compressed model as a plain transformers checkpoint (--dense)",
        description="Build every compressed layer's dense weight and write a stock transformers checkpoint "
        "(original tensor names and fused layouts, source config, tokenizer and generation files) that "
        "AutoModelForCausalLM.from_pretrained loads without masa. Keeps the quality; gives up the memory "
        "saving.",
    )
    p.add_argument("directory", help="model directory written by masa compress / masa.save")
    p.add_argument("--dense", action="store_true", help="export dense weights (required)")
    p.add_argument("--out", required=True, metavar="OUT", help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)
