"""Plain Hugging Face checkpoints, loaded by transformers' own ``from_pretrained`` and then checked.

transformers knows every family's key renames (GPT-NeoX ``embed_out`` -> ``lm_head``), prefixes
(published GPT-2 has no ``transformer.``), ignorable legacy buffers (``position_ids``, ``attn.bias``),
tied heads, shards and dtypes, so masa does not copy those tables. What transformers only warns about,
masa refuses: a missing or mis-shaped weight would be initialised at random and a compressed model
built on it would be garbage. Extra tensors transformers does not know are dropped with a warning
naming them (they are not part of the architecture, so nothing computes with them). Remote code is
never run and pickle files are never read.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from masa.io.checkpoint import CONFIG_NAME, Checkpoint


def architecture_class(config: dict) -> type[nn.Module]:
    """The transformers class ``config.json`` names in ``architectures``, else the Auto class for its type.

    The fallback is ``AutoModelForCausalLM`` for decoder types (a causal-LM head and no masked-LM head),
    ``AutoModel`` for encoders such as BERT and everything else.
    """
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = config.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise ValueError(
            f"{CONFIG_NAME}'s architectures is {architectures!r}, not a list of class names; the file is corrupt"
        )
    if architectures:
        try:
            cls = getattr(transformers, architectures[0], None)
        except ImportError:  # a class whose optional dependency is missing
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    model_type = config.get("model_type")
    if (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    ):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def class_name_for(config: dict) -> str:
    """Name of :func:`architecture_class` for messages (``AutoModel`` when the config cannot say)."""
    try:
        return architecture_class(config).__name__
    except ValueError:
        return "AutoModel"


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' load report: masa raises or warns about the same keys itself, more precisely."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_pretrained(checkpoint: Checkpoint, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the plain Hugging Face checkpoint ``checkpoint`` on CPU, in ``dtype`` or the file's own dtype.

    Raises ValueError when a weight the architecture needs is missing or mis-shaped, naming the keys.
    """
    import transformers

    directory, config = checkpoint.directory, checkpoint.config or {}
    cls = architecture_class(config)
    try:
        with _quiet_load_report():
            model, info = cls.from_pretrained(
                str(directory),
                dtype=dtype or checkpoint.dtype or "auto",
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                ignore_mismatched_sizes=True,  # mismatches are reported below by key instead of a table
                output_loading_info=True,
            )
    except (OSError, ValueError) as err:
        remote = " (it needs its own code, named by auto_map; masa never runs remote code)"
        raise ValueError(
            f"transformers {transformers.__version__} cannot load {directory} as {cls.__name__}"
            f"{remote if 'auto_map' in config else ''}: {err}"
        ) from err
    _refuse_incomplete(info, directory, type(model).__name__)
    if unexpected := sorted(info["unexpected_keys"]):
        warnings.warn(
            f"{directory}: {len(unexpected)} tensor(s) in the checkpoint are not part of {type(model).__name__} "
            f"and were dropped: {_few(unexpected)}",
            stacklevel=3,
        )
    return model


def _refuse_incomplete(info: dict, directory, class_name: str) -> None:
    missing = sorted(info["missing_keys"])
    mismatched = sorted(f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in info["mismatched_keys"])
    if missing or mismatched:
        parts = ([f"missing weights {_few(missing)}"] if missing else []) + (
            [f"mis-shaped weights {_few(mismatched)}"] if mismatched else []
        )
        raise ValueError(
            f"{directory} does not fit {class_name} as its config.json describes it: {'; '.join(parts)}. "
            "transformers would fill these with random values; the checkpoint is incomplete or its config.json "
            "belongs to another model: download it again or fix config.json"
        )


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"
