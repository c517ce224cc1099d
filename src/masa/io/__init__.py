"""Reading and writing model directories: safetensors only, atomic saves, meta-device rebuilds."""

from masa.io.atomic import atomic_directory, write_json
from masa.io.serialization import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    build_base,
    load,
    parameters_on_meta,
    read_config,
    read_weights,
    save,
    save_weights,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "atomic_directory",
    "build_base",
    "load",
    "parameters_on_meta",
    "read_config",
    "read_weights",
    "save",
    "save_weights",
    "write_json",
]
