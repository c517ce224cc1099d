"""``masa.save`` / ``masa.load``: model directories in the Hugging Face layout, safetensors only.

A saved model is a directory with
  * ``config.json``: the base model's config plus a self-describing ``masa`` block (format version,
    the replayable surgery log, method, ratio, targets, calibration summary ...);
  * ``model.safetensors``: every tensor once (shared atom banks and tied embeddings stored once;
    aliases recorded in the file's metadata);
  * the tokenizer files, and the source's generation config, chat template, licence and model card.
``load`` reads such a directory by building the base architecture with parameters on the ``meta``
device, replaying the recorded surgery, checking every key and shape, then assigning the weights.
A plain Hugging Face directory (no ``masa`` block) goes through transformers' ``from_pretrained``
instead (see ``masa.io.pretrained``). No pickle, no remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from masa import surgery
from masa.io.atomic import atomic_directory, write_json
from masa.io.checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    Checkpoint,
    inspect_checkpoint,
)
from masa.io.pretrained import architecture_class, load_pretrained

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
# Files a model directory carries besides weights and tokenizer: generation defaults, chat format,
# and the licence terms and model card that must travel with derived weights.
COMPANION_PATTERNS = (
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE*",
    "LICENCE*",
    "README.md",
    "NOTICE",
    "USE_POLICY.md",
)
# The source model's config.json, verbatim (see _keep_source_config).
SOURCE_CONFIG_NAME = "source_config.json"


# ------------------------------------------------------------------------------------------ state dict


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each storage once, plus aliases {dropped key: kept key} (tied weights)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple, str] = {}
    for key, tensor in model.state_dict().items():
        ident = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if ident in owner and tensor.numel() > 0:
            aliases[key] = owner[ident]
            continue
        owner[ident] = key
        tensors[key] = tensor.detach().contiguous()
    return tensors, aliases


def save_weights(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the model's unique tensors to a safetensors file; returns the number of bytes of data."""
    tensors, aliases = unique_state_dict(model)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"aliases": json.dumps(aliases)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_weights(directory: str | os.PathLike | Checkpoint) -> dict[str, torch.Tensor]:
    """Read all tensors of a model directory (single or sharded safetensors), restoring aliases."""
    checkpoint = (
        directory
        if isinstance(directory, Checkpoint)
        else inspect_checkpoint(directory, require_config=False)
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint.weight_files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
                for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    tensors[key] = fh.get_tensor(key)
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(
                f"{file} is not a readable safetensors file ({err}); the checkpoint is corrupt"
            ) from err
        for alias, key in aliases.items():
            tensors[alias] = tensors[key]
    return tensors


# ------------------------------------------------------------------------------------------- save


def model_config_dict(model: nn.Module) -> dict:
    """The base model's config as a dict (native ``MasaLMConfig`` or Hugging Face ``PretrainedConfig``)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(
            f"{type(model).__name__} has no config with to_dict(); only configured models can be saved"
        )
    data = dict(config.to_dict())
    data.pop("masa", None)
    cls = type(model)
    if (
        cls.__module__.startswith("transformers.")
        and getattr(sys.modules["transformers"], cls.__name__, None) is cls
    ):
        data["architectures"] = [cls.__name__]  # as save_pretrained records it, so load rebuilds this class
    return data


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    files_from: str | os.PathLike | None = None,
    info: dict | None = None,
    overwrite: bool = False,
    weights: Callable[[Path], object] | None = None,
) -> Path:
    """Save ``model`` (shared, compressed or plain) as a self-describing directory, atomically.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer to save alongside.
        files_from: the source model directory: its tokenizer files (unless ``tokenizer`` is given),
            generation config, chat template, licence, notice and model card are copied.
        info: extra fields for the ``masa`` block of config.json (method, ratio, calibration ...).
        overwrite: replace an existing directory (only once the new one is completely written); an
            existing empty directory is used without it.
        weights: writes the weight files into the directory being saved instead of the model's tensors
            (a streamed compression's shards: ``masa.io.stream.ShardWriter.finish``).
    """
    from masa import __version__
    from masa.accounting import count
    from masa.runtime import require_module

    require_module(model, "masa.save")

    source = files_from
    config = model_config_dict(model)
    block = {"format_version": FORMAT_VERSION, "version": __version__, **(info or {})}
    block["surgery"] = surgery.operations(model)
    with contextlib.suppress(ValueError):  # a model without an adapter is saved, just not summarised
        block["params"] = count(model).as_dict()
    config["masa"] = block
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        if weights is None:
            save_weights(model, tmp / WEIGHTS_NAME)
        else:
            weights(tmp)
        write_json(tmp / CONFIG_NAME, config)
        if source is not None:
            _copy_files(Path(source), tmp, with_tokenizer=tokenizer is None)
            _keep_source_config(Path(source), tmp, config.get("model_type"))
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            else:
                tokenizer.save(str(tmp / "tokenizer.json"))
    return Path(directory)


def _keep_source_config(source: Path, target: Path, model_type: str | None) -> None:
    """Copy the source's config.json text unchanged to ``target/source_config.json`` (a masa source
    passes on the one it kept), for ``masa export --dense`` to write back verbatim: transformers 5
    rewrites some keys when it saves a config (``rope_scaling`` as ``rope_parameters``) that 4.x stacks
    do not read. Skipped when the source describes another architecture (a converted model)."""
    original = source / SOURCE_CONFIG_NAME
    if not original.is_file():
        original = source / CONFIG_NAME
        if not original.is_file():
            return
    try:
        data = json.loads(original.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(data, dict) and "masa" not in data and data.get("model_type") == model_type:
        shutil.copyfile(original, target / SOURCE_CONFIG_NAME)


def _copy_files(source: Path, target: Path, *, with_tokenizer: bool) -> None:
    """Copy the companion files (and the tokenizer files) present in ``source`` to ``target``."""
    if not source.is_dir():
        raise NotADirectoryError(f"files_from={source} is not a directory: pass the source model directory")
    names = {p.name for pattern in COMPANION_PATTERNS for p in source.glob(pattern)}
    if with_tokenizer:
        names |= set(TOKENIZER_FILES)
    for name in sorted(names):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)  # follows symlinks (hub cache snapshots)


# ------------------------------------------------------------------------------------------- load


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` (no memory) but real buffers (rotary tables, masks)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            self._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_base(config: dict, directory: str | os.PathLike | None = None) -> nn.Module:
    """Instantiate the (unshared) base architecture described by a config dict, without loading weights."""
    config = {k: v for k, v in config.items() if k != "masa"}
    if config.get("model_type") == "masa_lm":
        from masa.model import MasaLM, MasaLMConfig

        return MasaLM(MasaLMConfig.from_dict(config))
    if config.get("model_type") == "masa_vit":
        from masa.model import MasaViT, MasaViTConfig

        return MasaViT(MasaViTConfig.from_dict(config))
    import transformers

    model_type = config.get("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(f"unknown model_type {model_type!r} in config.json ({err})") from err
    cls = architecture_class(config)
    if issubclass(cls, transformers.PreTrainedModel):
        return cls._from_config(hf_config)
    return cls.from_config(hf_config)  # an Auto class


def load(
    directory: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    runtime: str = "compact",
) -> nn.Module:
    """Load a model directory: one written by :func:`save`, or any plain Hugging Face safetensors checkpoint.

    ``dtype`` converts the weights; by default they keep the checkpoint's dtype. ``runtime`` (see
    :mod:`masa.nn.runtime`): ``compact`` holds only what was saved and computes from it (the saving is
    in memory); ``dense`` builds each compressed layer's dense weight once, here, and frees the
    factors (the original's speed and memory; the saving is on disk). A plain model is the same in both.
    """
    from masa.nn.runtime import check_runtime, set_runtime

    check_runtime(runtime)
    checkpoint = inspect_checkpoint(directory)
    model = _load_masa(checkpoint) if checkpoint.is_masa else load_pretrained(checkpoint, dtype)
    _check_finite(dict(model.named_parameters()), checkpoint.directory)
    model.to(device=device, dtype=dtype)
    set_runtime(model, runtime)  # after the move: dense weights are built on the target device
    return model.eval()


def _load_masa(checkpoint: Checkpoint) -> nn.Module:
    """Rebuild on meta, replay the surgery, check keys strictly and assign the tensors of a masa directory."""
    directory = checkpoint.directory
    tensors = read_weights(checkpoint)
    with parameters_on_meta():
        model = build_base(checkpoint.config, directory)
        for i, op in enumerate(checkpoint.masa_block.get("surgery", [])):
            try:
                surgery.replay(model, [op])
            except (KeyError, TypeError, AttributeError, IndexError) as err:
                raise ValueError(
                    f"{directory / CONFIG_NAME}: masa.surgery[{i}] ({op['op']}) is malformed ({err!r}); the file "
                    "is corrupt or was edited by hand, re-save the model with masa.save"
                ) from err
    _check_keys(model, tensors, directory)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if left := [n for n, p in model.named_parameters() if p.device.type == "meta"]:
        raise ValueError(
            f"{directory}: weights missing after load for {left[:5]}; the checkpoint is incomplete"
        )
    return model


def _check_keys(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in expected if k not in tensors and k not in tied]
    extra = [k for k in tensors if k not in expected]
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append(f"mis-shaped {shapes[:5]}")
        raise ValueError(
            f"the weights of {directory} do not match its config.json: {'; '.join(parts)}. The checkpoint is "
            "corrupt or was written for another configuration; re-save it from the model"
        )


def _check_finite(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"{directory}: tensor {key!r} holds NaN or inf values; the checkpoint is unusable"
            )
