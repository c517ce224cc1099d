"""Reading and writing model directories: safetensors only, atomic saves, meta-device rebuilds, and
plain Hugging Face checkpoints through transformers' own loader (checked strictly)."""

from masa.io.atomic import atomic_directory, write_json
from masa.io.checkpoint import CONFIG_NAME, WEIGHTS_NAME, Checkpoint, inspect_checkpoint, read_config
from masa.io.pretrained import architecture_class, load_pretrained
from masa.io.serialization import build_base, load, parameters_on_meta, read_weights, save, save_weights

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Checkpoint",
    "architecture_class",
    "atomic_directory",
    "build_base",
    "inspect_checkpoint",
    "load",
    "load_pretrained",
    "parameters_on_meta",
    "read_config",
    "read_weights",
    "save",
    "save_weights",
    "write_json",
]
