"""``masa.save`` / ``masa.load``: model directories in the Hugging Face layout, safetensors only.

A saved model is a directory with
  * ``config.json``: the base model's config plus a self-describing ``masa`` block (format version,
    the replayable surgery log, method, ratio, targets, calibration summary ...);
  * ``model.safetensors``: every tensor once (shared atom banks and tied embeddings stored once;
    aliases recorded in the file's metadata);
  * the tokenizer files.
Loading builds the base architecture with parameters on the ``meta`` device, replays the recorded
surgery, checks every key and shape, then assigns the weights. No pickle, no remote code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from masa import surgery
from masa.io.atomic import atomic_directory, write_json

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)


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


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read all tensors of a model directory (single or sharded safetensors), restoring aliases."""
    directory = Path(directory)
    files = [directory / WEIGHTS_NAME]
    if not files[0].exists() and (directory / WEIGHTS_INDEX_NAME).exists():
        index = json.loads((directory / WEIGHTS_INDEX_NAME).read_text())
        files = [directory / f for f in sorted(set(index["weight_map"].values()))]
    if not files[0].exists():
        pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        hint = (
            f" (found {pickled}: pickle files are never loaded; convert them to safetensors first)"
            if pickled
            else ""
        )
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
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
    return data


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    tokenizer_from: str | os.PathLike | None = None,
    info: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (shared, compressed or plain) as a self-describing directory, atomically.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer to save alongside.
        tokenizer_from: a directory whose tokenizer files are copied (e.g. the source checkpoint).
        info: extra fields for the ``masa`` block of config.json (method, ratio, calibration ...).
        overwrite: replace an existing directory (only once the new one is completely written).
    """
    from masa import __version__
    from masa.accounting import count

    config = model_config_dict(model)
    block = {"format_version": FORMAT_VERSION, "version": __version__, **(info or {})}
    block["surgery"] = surgery.operations(model)
    with contextlib.suppress(ValueError):  # a model without an adapter is saved, just not summarised
        block["params"] = count(model).as_dict()
    config["masa"] = block
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        save_weights(model, tmp / WEIGHTS_NAME)
        write_json(tmp / CONFIG_NAME, config)
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            else:
                tokenizer.save(str(tmp / "tokenizer.json"))
        elif tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).exists():
                    shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    return Path(directory)


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


def read_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_NAME}: not a model directory (save one with masa.save)"
        )
    try:
        return json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{directory / CONFIG_NAME} is not valid JSON ({err}); the checkpoint is corrupt"
        ) from err


def build_base(config: dict, directory: str | os.PathLike | None = None) -> nn.Module:
    """Instantiate the (unshared) base architecture described by a config dict."""
    config = {k: v for k, v in config.items() if k != "masa"}
    if config.get("model_type") == "masa_lm":
        from masa.model import MasaLM, MasaLMConfig

        return MasaLM(MasaLMConfig.from_dict(config))
    import transformers

    model_type = config.get("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(**config)
    except (KeyError, ValueError) as err:
        raise ValueError(f"unknown model_type {model_type!r} in config.json ({err})") from err
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM if model_type != "bert" else transformers.AutoModel
        return cls.from_config(hf_config)
    return cls._from_config(hf_config)


def load(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a model saved by :func:`save` (or a plain Hugging Face safetensors checkpoint)."""
    directory = Path(directory)
    config = read_config(directory)
    block = config.get("masa", {})
    if block.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(
            f"{directory} was written by a newer masa (format {block['format_version']}); upgrade masa"
        )
    tensors = read_weights(directory)
    with parameters_on_meta():
        model = build_base(config, directory)
        surgery.replay(model, block.get("surgery", []))
    _check_keys(model, tensors, directory)
    _check_finite(tensors, directory)
    model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if left := [n for n, p in model.named_parameters() if p.device.type == "meta"]:
        raise ValueError(
            f"{directory}: weights missing after load for {left[:5]}; the checkpoint is incomplete"
        )
    model.to(device=device, dtype=dtype)
    return model.eval()


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
            f"{directory / WEIGHTS_NAME} does not match its config.json: {'; '.join(parts)}. The checkpoint is "
            "corrupt or was written for another configuration; re-save it from the model"
        )


def _check_finite(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(
                f"{directory}: tensor {key!r} holds NaN or inf values; the checkpoint is unusable"
            )
