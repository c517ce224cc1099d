"""Training from scratch: TOML configs, the training loop, crash-safe checkpoints, torchrun support."""

from masa.train.config import ConfigError, DataConfig, TrainConfig, TrainRunConfig
from masa.train.trainer import train

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "TrainRunConfig", "train"]
